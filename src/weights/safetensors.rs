//! One safetensors file, memory-mapped, and the host tensors that borrow from it.
//!
//! Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
//! N bytes of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`,
//! then the tensor bytes, row-major, little-endian, packed back to back. The header is checked
//! by the `safetensors` crate (offsets contiguous, sizes match shapes, file length exact), so a
//! truncated file or a garbage header is an error here, never a panic later.

use super::{Result, WeightError};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Element types we read. Everything else in a file (I64 `position_ids`, F64, F8, ...) can be
/// listed but asking for it gives [`WeightError::DType`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceDType {
    F32,
    F16,
    BF16,
}

impl SourceDType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            SourceDType::F32 => 4,
            SourceDType::F16 | SourceDType::BF16 => 2,
        }
    }

    fn from_safetensors(d: ::safetensors::Dtype) -> Option<Self> {
        match d {
            ::safetensors::Dtype::F32 => Some(SourceDType::F32),
            ::safetensors::Dtype::F16 => Some(SourceDType::F16),
            ::safetensors::Dtype::BF16 => Some(SourceDType::BF16),
            _ => None,
        }
    }
}

/// A tensor as stored on disk: shape, dtype and its bytes, borrowed from the memory map
/// (little-endian, row-major, not necessarily aligned to the element size); owned only where a
/// renaming had to reorder them (`Transform::Transpose`).
#[derive(Clone, Debug)]
pub struct HostTensor<'a> {
    pub shape: Vec<usize>,
    pub dtype: SourceDType,
    pub bytes: std::borrow::Cow<'a, [u8]>,
}

impl<'a> HostTensor<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts to f32 (exact for every source dtype).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        // chunks_exact + from_le_bytes: the data offset in the file is not aligned to 4 bytes
        // in general, so the bytes cannot be reinterpreted in place.
        match self.dtype {
            SourceDType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            SourceDType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            SourceDType::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// Converts to f16 (round to nearest even from f32 and bf16, as torch's `.half()`).
    pub fn to_f16_vec(&self) -> Vec<f16> {
        match self.dtype {
            SourceDType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                .collect(),
            SourceDType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|b| f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            SourceDType::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| f16::from_f32(bf16::from_le_bytes([b[0], b[1]]).to_f32()))
                .collect(),
        }
    }
}

/// Where one tensor lives in the map.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The dtype as the file names it ("F16", "I64", ...).
    pub dtype_name: String,
    pub dtype: Option<SourceDType>,
    pub shape: Vec<usize>,
    /// Absolute byte range inside the file.
    pub range: std::ops::Range<usize>,
}

/// A memory-mapped safetensors file with its parsed header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| WeightError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                WeightError::NotFound {
                    path: path.clone(),
                    hint: "check the path to the weights".into(),
                }
            } else {
                io(e)
            }
        })?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(WeightError::Malformed {
                path,
                reason: format!("file is {len} bytes, shorter than the 8-byte header length"),
            });
        }
        // SAFETY: the map is read-only and we never hand out anything that outlives `self`.
        // If another process truncates or rewrites the file while it is mapped, reads may see
        // the new bytes or fault; that is the usual contract of mmap-based loaders (candle,
        // safetensors' own `safe_open`) and the price of not copying gigabytes.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::from_mmap(path, mmap)
    }

    fn from_mmap(path: PathBuf, mmap: Mmap) -> Result<Self> {
        if let Some(kind) = pickle_kind(&mmap) {
            return Err(WeightError::Unsupported {
                what: format!(
                    "{}: this is a {kind}, not a safetensors file",
                    path.display()
                ),
                hint: PICKLE_HINT.into(),
            });
        }
        let (header_len, meta) = ::safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            WeightError::Malformed {
                path: path.clone(),
                reason: describe_safetensors_error(&e, mmap.len()),
            }
        })?;
        let data_start = 8 + header_len;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (begin, end) = info.data_offsets;
                let dtype_name = format!("{:?}", info.dtype);
                let info = TensorInfo {
                    dtype: SourceDType::from_safetensors(info.dtype),
                    dtype_name,
                    shape: info.shape.clone(),
                    range: data_start + begin..data_start + end,
                };
                (name, info)
            })
            .collect();
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile {
            path,
            mmap,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The `__metadata__` string map of the header (often empty).
    /// The bytes after the header (every tensor's data), as A1111's "addnet" file hash reads them.
    pub fn data_bytes(&self) -> &[u8] {
        // The header length was checked when the file was opened.
        let n = u64::from_le_bytes(self.mmap[..8].try_into().unwrap_or([0; 8])) as usize;
        &self.mmap[(8 + n).min(self.mmap.len())..]
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The tensor stored under `name`, borrowing from the map.
    pub fn tensor(&self, name: &str) -> Result<HostTensor<'_>> {
        let info = self.tensors.get(name).ok_or_else(|| WeightError::Missing {
            key: name.to_string(),
            store: self.path.display().to_string(),
            nearest: None,
        })?;
        let dtype = info.dtype.ok_or_else(|| WeightError::DType {
            key: name.to_string(),
            found: info.dtype_name.clone(),
        })?;
        Ok(HostTensor {
            shape: info.shape.clone(),
            dtype,
            bytes: std::borrow::Cow::Borrowed(&self.mmap[info.range.clone()]),
        })
    }
}

pub(crate) const PICKLE_HINT: &str =
    "ldm-wgpu reads only .safetensors (a pickle can run arbitrary \
code when loaded). Convert it once with Python, e.g. `python -c \"import torch; from \
safetensors.torch import save_file; sd = torch.load('IN', map_location='cpu', weights_only=True); \
sd = sd.get('state_dict', sd); save_file({k: v.contiguous() for k, v in sd.items() if \
hasattr(v, 'contiguous')}, 'OUT.safetensors')\"`, or for a diffusers folder \
`pipe.save_pretrained(DIR, safe_serialization=True)`";

/// Recognises the two PyTorch pickle containers by their magic bytes.
fn pickle_kind(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"PK\x03\x04") {
        Some("PyTorch zip checkpoint (torch.save)")
    } else if bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]) {
        Some("Python pickle (legacy torch.save)")
    } else {
        None
    }
}

fn describe_safetensors_error(e: &::safetensors::SafeTensorError, file_len: usize) -> String {
    use ::safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => format!(
            "the header's tensors do not add up to the file length ({file_len} bytes): \
             the file is truncated or has trailing bytes"
        ),
        E::InvalidHeaderLength | E::HeaderTooLarge | E::HeaderTooSmall => format!(
            "the 8-byte header length does not fit the file ({file_len} bytes): \
             truncated file or not safetensors ({e})"
        ),
        other => format!("{other}"),
    }
}
