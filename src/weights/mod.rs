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

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, WeightError>;

/// Everything that can go wrong between a path and a host tensor. Keys are always the full
/// key (prefix included) that model code asked for.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The OS refused to open, stat or map a file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file or folder that should be there is not.
    #[error("{}: not found", path.display())]
    NotFound { path: PathBuf, hint: String },
    /// The file exists but is not a valid safetensors file (garbage header, truncated data, ...).
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    /// Model code asked for a tensor the store does not have.
    #[error("weight `{key}` is missing from {store}")]
    Missing {
        key: String,
        store: String,
        nearest: Option<String>,
    },
    /// The tensor exists but has another shape. `location` says where it came from.
    #[error("weight `{key}` has shape {found:?}, expected {expected:?} (from {location})")]
    Shape {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        location: String,
    },
    /// The tensor is stored in a dtype we do not convert (e.g. I64 buffers, F64, F8).
    #[error("weight `{key}` has dtype {found}, which is not F32, F16 or BF16")]
    DType { key: String, found: String },
    /// A config could not be read or inferred.
    #[error("config of {what}: {reason}")]
    Config { what: String, reason: String },
    /// A model or file kind we deliberately do not read (SDXL, pickles).
    #[error("unsupported: {what}")]
    Unsupported { what: String, hint: String },
    /// Tensors nobody asked for (see [`WeightStore::check_all_used`]).
    #[error("{} unused tensor(s) in {store}: {}", keys.len(), unused_list(keys))]
    Unused { store: String, keys: Vec<String> },
}

/// The first 8 keys, then how many more.
fn unused_list(keys: &[String]) -> String {
    let shown: Vec<&str> = keys.iter().take(8).map(|k| k.as_str()).collect();
    let more = keys.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{}, ... ({more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
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
