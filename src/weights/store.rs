//! [`WeightStore`]: diffusers key -> tensor in one or more mapped files, with shape checks and
//! usage tracking; [`WeightView`]: a prefixed view (`store.pp("mid_block")`), candle-style.
//!
//! A store entry may present a file tensor under another name and, without copying, in another
//! shape ([`Transform`]): that is how a single-file LDM checkpoint looks like a diffusers folder.

use super::safetensors::{HostTensor, SafetensorsFile};
use super::{Result, WeightError};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// How a stored tensor becomes the presented one. All but `Transpose` keep the bytes where they
/// are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Same bytes.
    None,
    /// Same bytes, another shape with the same element count (LDM VAE attention stores 1x1
    /// conv weights [C, C, 1, 1] that diffusers uses as linear [C, C]).
    Reshape(Vec<usize>),
    /// Rows `start..start + count` along dim 0: a contiguous byte range of a row-major tensor
    /// (OpenCLIP's fused `in_proj_weight` [3C, C] split into q, k, v [C, C]).
    Rows { start: usize, count: usize },
    /// A 2-D tensor [R, C] presented as [C, R], copied (OpenCLIP's `text_projection`, applied as
    /// `x @ P`, is diffusers' `text_projection.weight` = P.T).
    Transpose,
}

impl Transform {
    /// The presented shape for a stored shape, or None if the transform does not fit it.
    pub fn apply_shape(&self, stored: &[usize]) -> Option<Vec<usize>> {
        match self {
            Transform::None => Some(stored.to_vec()),
            Transform::Reshape(to) => {
                // Checked: a hostile header may declare dimensions whose product overflows.
                let numel = |dims: &[usize]| dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                (numel(to)? == numel(stored)?).then(|| to.clone())
            }
            Transform::Rows { start, count } => {
                let rows = *stored.first()?;
                if start.checked_add(*count)? > rows {
                    return None;
                }
                let mut s = stored.to_vec();
                s[0] = *count;
                Some(s)
            }
            Transform::Transpose => match stored {
                [r, c] => Some(vec![*c, *r]),
                _ => None,
            },
        }
    }
}

/// [R, C] -> [C, R], element by element (any dtype: the bytes of one element move together).
fn transpose_2d<'a>(t: &HostTensor<'_>) -> HostTensor<'a> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let size = t.dtype.size_in_bytes();
    let mut out = vec![0u8; t.bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (from, to) = ((r * cols + c) * size, (c * rows + r) * size);
            out[to..to + size].copy_from_slice(&t.bytes[from..from + size]);
        }
    }
    HostTensor {
        shape: vec![cols, rows],
        dtype: t.dtype,
        bytes: Cow::Owned(out),
    }
}

/// Where a presented tensor comes from.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Index into the store's files.
    pub file: usize,
    /// The key inside that file.
    pub source_key: String,
    pub transform: Transform,
}

/// Tensors of one model (U-Net, VAE or text encoder) under diffusers key names.
pub struct WeightStore {
    name: String,
    files: Vec<Arc<SafetensorsFile>>,
    entries: BTreeMap<String, Entry>,
    used: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("name", &self.name)
            .field("files", &self.files)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl WeightStore {
    /// Every tensor of every file under its own name (a diffusers component, possibly sharded).
    /// A key present in two files is an error: shards must not overlap.
    pub fn from_files(name: impl Into<String>, files: Vec<Arc<SafetensorsFile>>) -> Result<Self> {
        let mut entries = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            for key in file.names() {
                let entry = Entry {
                    file: i,
                    source_key: key.to_string(),
                    transform: Transform::None,
                };
                if let Some(prev) = entries.insert(key.to_string(), entry) {
                    return Err(WeightError::Malformed {
                        path: file.path().to_path_buf(),
                        reason: format!(
                            "tensor `{key}` is also in {}",
                            files[prev.file].path().display()
                        ),
                    });
                }
            }
        }
        Ok(WeightStore {
            name: name.into(),
            files,
            entries,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// A store with an explicit key map (used by the renaming of single-file checkpoints).
    /// Every entry is checked against its file: the source key exists and the transform fits.
    pub fn from_entries(
        name: impl Into<String>,
        files: Vec<Arc<SafetensorsFile>>,
        entries: BTreeMap<String, Entry>,
    ) -> Result<Self> {
        for (key, e) in &entries {
            let file = files.get(e.file).ok_or_else(|| WeightError::Config {
                what: key.clone(),
                reason: format!("entry refers to file #{} of {}", e.file, files.len()),
            })?;
            let info = file
                .info(&e.source_key)
                .ok_or_else(|| WeightError::Missing {
                    key: e.source_key.clone(),
                    store: file.path().display().to_string(),
                    nearest: None,
                })?;
            if e.transform.apply_shape(&info.shape).is_none() {
                return Err(WeightError::Malformed {
                    path: file.path().to_path_buf(),
                    reason: format!(
                        "tensor `{}` of shape {:?} cannot be presented as `{key}` ({:?})",
                        e.source_key, info.shape, e.transform
                    ),
                });
            }
        }
        Ok(WeightStore {
            name: name.into(),
            files,
            entries,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// What this store is, for messages ("unet (/models/sd15/unet/...)").
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn files(&self) -> &[Arc<SafetensorsFile>] {
        &self.files
    }

    /// Presented (diffusers) keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|k| k.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Presented shape of every tensor (what config inference reads).
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.entries
            .keys()
            .filter_map(|k| Some((k.clone(), self.shape_of(k)?)))
            .collect()
    }

    fn shape_of(&self, key: &str) -> Option<Vec<usize>> {
        let e = self.entries.get(key)?;
        let info = self.files[e.file].info(&e.source_key)?;
        e.transform.apply_shape(&info.shape)
    }

    /// The root view (no prefix).
    pub fn root(&self) -> WeightView<'_> {
        WeightView {
            store: self,
            prefix: String::new(),
        }
    }

    /// A view whose keys are prefixed with `prefix.`.
    pub fn pp(&self, prefix: &str) -> WeightView<'_> {
        self.root().pp(prefix)
    }

    pub fn get(&self, key: &str, expected_shape: &[usize]) -> Result<HostTensor<'_>> {
        self.root().get(key, expected_shape)
    }

    pub fn get_opt(&self, key: &str, expected_shape: &[usize]) -> Result<Option<HostTensor<'_>>> {
        self.root().get_opt(key, expected_shape)
    }

    /// The tensor whatever its shape (for code that reads shapes to configure itself).
    pub fn get_any(&self, key: &str) -> Result<HostTensor<'_>> {
        self.root().get_any(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.shape_of(key)
    }

    /// Presented keys that no `get` has asked for yet, sorted.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        self.entries
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// Err([`WeightError::Unused`]) if some tensors were never asked for: call after building a
    /// model to catch a config that silently skips part of the checkpoint.
    pub fn check_all_used(&self) -> Result<()> {
        let keys = self.unused_keys();
        if keys.is_empty() {
            Ok(())
        } else {
            Err(WeightError::Unused {
                store: self.name.clone(),
                keys,
            })
        }
    }

    /// Forget what was used (e.g. before building a second model from the same store).
    pub fn reset_usage(&self) {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn fetch(&self, key: &str) -> Result<HostTensor<'_>> {
        let Some(e) = self.entries.get(key) else {
            return Err(WeightError::Missing {
                key: key.to_string(),
                store: self.name.clone(),
                nearest: self.nearest_key(key),
            });
        };
        let file = &self.files[e.file];
        let stored = file.tensor(&e.source_key).map_err(|err| match err {
            // report the key model code asked for, not the file's
            WeightError::DType { found, .. } => WeightError::DType {
                key: key.to_string(),
                found,
            },
            other => other,
        })?;
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        Ok(match &e.transform {
            Transform::None => stored,
            Transform::Reshape(to) => HostTensor {
                shape: to.clone(),
                ..stored
            },
            Transform::Rows { start, count } => {
                let row_elems: usize = stored.shape[1..].iter().product();
                let row_bytes = row_elems * stored.dtype.size_in_bytes();
                let mut shape = stored.shape.clone();
                shape[0] = *count;
                let range = start * row_bytes..(start + count) * row_bytes;
                HostTensor {
                    shape,
                    dtype: stored.dtype,
                    bytes: match stored.bytes {
                        Cow::Borrowed(b) => Cow::Borrowed(&b[range]),
                        Cow::Owned(b) => Cow::Owned(b[range].to_vec()),
                    },
                }
            }
            Transform::Transpose => transpose_2d(&stored),
        })
    }

    fn location(&self, key: &str) -> String {
        match self.entries.get(key) {
            Some(e) if e.source_key == key => self.files[e.file].path().display().to_string(),
            Some(e) => format!(
                "`{}` in {}",
                e.source_key,
                self.files[e.file].path().display()
            ),
            None => self.name.clone(),
        }
    }

    /// The present key sharing the longest prefix with `key`: usually the one that was meant.
    fn nearest_key(&self, key: &str) -> Option<String> {
        let common = |k: &str| {
            k.bytes()
                .zip(key.bytes())
                .take_while(|(a, b)| a == b)
                .count()
        };
        self.entries
            .keys()
            .max_by_key(|k| common(k))
            .filter(|k| common(k) > 0)
            .cloned()
    }
}

/// A prefixed view of a [`WeightStore`]; cheap to create and clone.
#[derive(Clone, Debug)]
pub struct WeightView<'a> {
    store: &'a WeightStore,
    prefix: String,
}

impl<'a> WeightView<'a> {
    /// A sub-view: `store.pp("down_blocks.0").pp("resnets.1")` reads `down_blocks.0.resnets.1.*`.
    pub fn pp(&self, name: &str) -> WeightView<'a> {
        WeightView {
            store: self.store,
            prefix: self.full_key(name),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn store(&self) -> &'a WeightStore {
        self.store
    }

    pub fn full_key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else if name.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The tensor `prefix.name`, which must have `expected_shape`.
    pub fn get(&self, name: &str, expected_shape: &[usize]) -> Result<HostTensor<'a>> {
        let key = self.full_key(name);
        let t = self.store.fetch(&key)?;
        if t.shape != expected_shape {
            return Err(WeightError::Shape {
                location: self.store.location(&key),
                key,
                expected: expected_shape.to_vec(),
                found: t.shape,
            });
        }
        Ok(t)
    }

    /// Like [`get`](Self::get), but Ok(None) when absent (a wrong shape is still an error).
    pub fn get_opt(&self, name: &str, expected_shape: &[usize]) -> Result<Option<HostTensor<'a>>> {
        if self.contains(name) {
            self.get(name, expected_shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The tensor whatever its shape.
    pub fn get_any(&self, name: &str) -> Result<HostTensor<'a>> {
        self.store.fetch(&self.full_key(name))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.full_key(name))
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.store.shape(&self.full_key(name))
    }
}
