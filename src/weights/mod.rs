//! Weights: from files on disk to host-side tensors, under diffusers key names.
//!
//! Two layouts are read, and both come out the same way to model code:
//! - a diffusers folder (`unet/diffusion_pytorch_model.safetensors`, `vae/...`,
//!   `text_encoder/model.safetensors`, each with its `config.json`), see [`diffusers`];
//! - a single-file CompVis/LDM checkpoint (`model.diffusion_model.*`, `first_stage_model.*`,
//!   `cond_stage_model.*`), whose keys [`rename`] presents under diffusers names and whose
//!   configs it infers from tensor shapes.
//!
//! Files are memory-mapped ([`safetensors`]): a [`HostTensor`] borrows its bytes straight from the
//! map, so the host never holds a second full copy of a checkpoint. Model code asks for tensors
//! candle-style through a [`WeightStore`] (`store.pp("down_blocks.0").get("conv.weight", &[..])`),
//! which checks shapes and remembers what was used so leftovers can be reported.
//!
//! Text-encoder keys are always presented with the `text_model.` prefix (as on the Hugging Face
//! hub and in diffusers' converters), whatever the file holds: transformers >= 5 saves
//! `CLIPTextModel` without it.

pub mod diffusers;
pub mod lora;
pub mod rename;
pub mod safetensors;
pub mod store;

pub use self::diffusers::{
    open_component, open_diffusers_folder, open_model, open_single_file, Component, ComponentKind,
    LoadOptions, PipelineWeights, SourceLayout, Variant,
};
pub use self::rename::{ModelFamily, PredictionType};
pub use self::safetensors::{HostTensor, SafetensorsFile, SourceDType};
pub use self::store::{Transform, WeightStore, WeightView};

use std::fmt;
use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, WeightError>;

/// Everything that can go wrong between a path and a host tensor. Keys are always the full
/// key (prefix included) that model code asked for.
#[derive(Debug)]
pub enum WeightError {
    /// The OS refused to open, stat or map a file.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file or folder that should be there is not.
    NotFound { path: PathBuf, hint: String },
    /// The file exists but is not a valid safetensors file (garbage header, truncated data, ...).
    Malformed { path: PathBuf, reason: String },
    /// Model code asked for a tensor the store does not have.
    Missing {
        key: String,
        store: String,
        nearest: Option<String>,
    },
    /// The tensor exists but has another shape. `location` says where it came from.
    Shape {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        location: String,
    },
    /// The tensor is stored in a dtype we do not convert (e.g. I64 buffers, F64, F8).
    DType { key: String, found: String },
    /// A config could not be read or inferred.
    Config { what: String, reason: String },
    /// A model or file kind we deliberately do not read (SDXL, pickles).
    Unsupported { what: String, hint: String },
    /// Tensors nobody asked for (see [`WeightStore::check_all_used`]).
    Unused { store: String, keys: Vec<String> },
}

impl WeightError {
    /// One line telling the user what to do about it, where there is something to do.
    pub fn hint(&self) -> Option<String> {
        match self {
            WeightError::NotFound { hint, .. } | WeightError::Unsupported { hint, .. } => {
                Some(hint.clone())
            }
            WeightError::Malformed { .. } => Some(
                "re-download the file (it may be truncated) or check that it is a .safetensors file"
                    .into(),
            ),
            WeightError::Missing { nearest: Some(n), .. } => Some(format!("closest key present: `{n}`")),
            WeightError::Shape { .. } => Some(
                "the weights do not match the config: check config.json (or the inferred config) \
                 against the checkpoint"
                    .into(),
            ),
            WeightError::DType { .. } => {
                Some("only F32, F16 and BF16 tensors are read; re-save the weights in one of them".into())
            }
            _ => None,
        }
    }
}

impl fmt::Display for WeightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            WeightError::NotFound { path, .. } => write!(f, "{}: not found", path.display()),
            WeightError::Malformed { path, reason } => {
                write!(
                    f,
                    "{}: not a valid safetensors file: {reason}",
                    path.display()
                )
            }
            WeightError::Missing { key, store, .. } => {
                write!(f, "weight `{key}` is missing from {store}")
            }
            WeightError::Shape {
                key,
                expected,
                found,
                location,
            } => write!(
                f,
                "weight `{key}` has shape {found:?}, expected {expected:?} (from {location})"
            ),
            WeightError::DType { key, found } => {
                write!(
                    f,
                    "weight `{key}` has dtype {found}, which is not F32, F16 or BF16"
                )
            }
            WeightError::Config { what, reason } => write!(f, "config of {what}: {reason}"),
            WeightError::Unsupported { what, .. } => write!(f, "unsupported: {what}"),
            WeightError::Unused { store, keys } => {
                let shown: Vec<&str> = keys.iter().take(8).map(|k| k.as_str()).collect();
                let more = keys.len().saturating_sub(shown.len());
                write!(
                    f,
                    "{} unused tensor(s) in {store}: {}",
                    keys.len(),
                    shown.join(", ")
                )?;
                if more > 0 {
                    write!(f, ", ... ({more} more)")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for WeightError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WeightError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<WeightError> for crate::error::Error {
    fn from(e: WeightError) -> Self {
        let with_hint = match e.hint() {
            Some(h) => format!("{e} (hint: {h})"),
            None => e.to_string(),
        };
        match e {
            WeightError::Io { path, source } => crate::error::Error::Io {
                path: path.display().to_string(),
                message: source.to_string(),
            },
            WeightError::Unsupported { .. } => crate::error::Error::Unsupported(with_hint),
            _ => crate::error::Error::Weights(with_hint),
        }
    }
}
