//! Textual-inversion embeddings: learned token vectors that a word of the prompt stands for.
//!
//! Formats read (all `.safetensors`; the file name without extension is the embedding's name,
//! the word that triggers it, as in the AUTOMATIC1111 web UI):
//! - A1111: `emb_params` [n, C] (or `string_to_param.*` from converted `.pt` files);
//! - SDXL: `clip_l` [n, 768] and `clip_g` [n, 1280], one set per text encoder;
//! - diffusers `learned_embeds.safetensors`: a single tensor named after its token, [C] or [n, C].
//!
//! `.pt` / `.bin` files are Python pickles, which can run arbitrary code when loaded: they are
//! refused with a pointer to `.safetensors`, never opened.
//!
//! How a prompt uses them (A1111's `EmbeddingDatabase`, diffusers' `load_textual_inversion`):
//! each embedding gets `n` new token ids past the vocabulary; wherever the tokens of its name
//! appear in a tokenized prompt they are replaced by those ids (`ClipTokenizer::tokenize`), and
//! the text encoder's token table gains one row per new id (`ClipTextModel::set_extra_tokens`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::weights::SafetensorsFile;
use crate::{Error, Result};

/// At most this many vectors per embedding: more would not leave a 75-token window any room.
pub const MAX_VECTORS: usize = 75;

/// One embedding file.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// The word that triggers it: the file name without extension.
    pub name: String,
    pub path: PathBuf,
    /// Vectors by width (the text encoder's hidden size): (count, row-major values).
    vectors: BTreeMap<usize, (usize, Vec<f32>)>,
}

impl Embedding {
    /// Read an embedding file (see the module doc for the formats).
    pub fn open(path: &Path) -> Result<Embedding> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let bad = |reason: String| Error::config(format!("embedding {}", path.display()), reason);
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("safetensors") => {}
            Some("pt" | "bin" | "ckpt" | "pth") => {
                return Err(Error::Unsupported(format!(
                    "embedding {}: a Python pickle, which can run code when loaded; ldm-wgpu \
                     never unpickles files. Use the .safetensors version of this embedding \
                     (most sites offer one), or convert it where you trust the file",
                    path.display()
                )))
            }
            _ => return Err(bad("not a .safetensors file".into())),
        }
        if name.trim().is_empty() {
            return Err(bad(
                "the file name (the embedding's trigger word) is empty".into()
            ));
        }
        let file = SafetensorsFile::open(path)?;
        let names: Vec<String> = file.names().map(str::to_string).collect();
        let chosen: Vec<&str> = if names.iter().any(|k| k == "clip_l" || k == "clip_g") {
            names
                .iter()
                .filter(|k| *k == "clip_l" || *k == "clip_g")
                .map(String::as_str)
                .collect()
        } else if let Some(k) = names
            .iter()
            .find(|k| *k == "emb_params" || k.starts_with("string_to_param."))
        {
            vec![k.as_str()]
        } else if names.len() == 1 {
            vec![names[0].as_str()]
        } else {
            return Err(bad(format!(
                "no embedding tensor (emb_params, clip_l/clip_g, string_to_param.*, or a single \
                 token tensor) among {names:?}"
            )));
        };
        let mut vectors = BTreeMap::new();
        for key in chosen {
            let t = file.tensor(key)?;
            let (count, width) = match t.shape[..] {
                [width] => (1, width),
                [count, width] => (count, width),
                _ => return Err(bad(format!("`{key}` has shape {:?}, not [n, C]", t.shape))),
            };
            if !(1..=MAX_VECTORS).contains(&count) || !(1..=16384).contains(&width) {
                return Err(bad(format!(
                    "`{key}` has shape {:?}: 1 to {MAX_VECTORS} vectors of 1 to 16384 values",
                    t.shape
                )));
            }
            let values = t.to_f32_vec();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!("`{key}` holds NaN or infinite values")));
            }
            if vectors.insert(width, (count, values)).is_some() {
                return Err(bad(format!("two tensors of width {width}")));
            }
        }
        Ok(Embedding {
            name,
            path: path.to_path_buf(),
            vectors,
        })
    }

    /// The vectors for a text encoder of hidden size `width`: (count, [count·width] values).
    pub fn vectors(&self, width: usize) -> Option<(usize, &[f32])> {
        self.vectors.get(&width).map(|(n, v)| (*n, v.as_slice()))
    }

    /// The widths it has vectors for (768: CLIP-L, 1024: OpenCLIP-H, 1280: OpenCLIP-bigG).
    pub fn widths(&self) -> Vec<usize> {
        self.vectors.keys().copied().collect()
    }
}

/// Files of an embeddings folder that could not be read, with the reason.
pub type Unreadable = Vec<(PathBuf, String)>;

/// Every embedding in `dir` (not recursive), by file name; files that cannot be used are listed
/// with the reason instead of failing the whole directory (A1111 skips them the same way).
pub fn load_dir(dir: &Path) -> Result<(Vec<Embedding>, Unreadable)> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension().is_some_and(|e| {
                matches!(
                    e.to_string_lossy().to_ascii_lowercase().as_str(),
                    "safetensors" | "pt" | "bin"
                )
            })
        })
        .collect();
    paths.sort();
    let (mut found, mut skipped) = (Vec::new(), Vec::new());
    for path in paths {
        match Embedding::open(&path) {
            Ok(e) => found.push(e),
            Err(e) => skipped.push((path, e.to_string())),
        }
    }
    Ok((found, skipped))
}
