//! The library's one error type. Every fallible call returns `Result<T>`; the CLI prints the
//! error with its `hint()` and exits non-zero (no panics on bad input).

use std::fmt;

use crate::weights::WeightError;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter at all (no Vulkan/Metal/DX12 driver, and no software fallback installed).
    #[error("no GPU adapter found")]
    NoAdapter,
    /// `--adapter` / `LDM_ADAPTER` named an adapter that does not exist.
    #[error("no adapter matches `{requested}`")]
    AdapterNotFound {
        requested: String,
        available: Vec<String>,
    },
    /// The adapter lacks a feature that the requested path needs.
    #[error("adapter `{adapter}` lacks the feature {feature}")]
    MissingFeature { feature: String, adapter: String },
    /// A device limit would be exceeded (binding size, buffer size, workgroups per dimension).
    #[error("{what}: {requested} exceeds the device limit of {limit}")]
    LimitExceeded {
        what: String,
        requested: u64,
        limit: u64,
        hint: String,
    },
    /// Tensor shapes or dtypes do not fit together.
    #[error("{op}: {detail}")]
    Shape { op: String, detail: String },
    /// A WGSL shader failed to compile or a pipeline failed to build.
    #[error("shader `{name}` (entry `{entry}`) failed to compile: {message}")]
    Shader {
        name: String,
        entry: String,
        message: String,
    },
    /// The GPU ran out of memory while allocating `requested` bytes.
    #[error("out of GPU memory allocating {:.1} MiB", *.requested as f64 / 1048576.0)]
    OutOfMemory { requested: u64 },
    /// Any other error reported by the device (validation, lost device, mapping).
    #[error("GPU device error: {0}")]
    Device(String),
    /// Reading or writing a file.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// Weights or a config missing, malformed or of the wrong shape; the weight error is kept as
    /// the source, with its own hint.
    #[error("weights: {0}")]
    Weights(#[from] WeightError),
    /// A configuration we cannot run (yet).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Bad user input (CLI flags, image sizes, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A model produced NaN or infinity.
    #[error("{what} produced NaN or infinite values")]
    NonFinite { what: String },
}

impl Error {
    /// One line telling the user what to do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            Error::NoAdapter => "install a Vulkan, Metal or DX12 driver; on a machine without a GPU install Mesa's lavapipe (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)".into(),
            Error::AdapterNotFound { available, .. } => format!("run `ldm info` to list adapters; available: {}", available.join(", ")),
            Error::MissingFeature { .. } => "choose another adapter with --adapter, or run in f32 (--dtype f32) if the missing feature is SHADER_F16".into(),
            Error::LimitExceeded { hint, .. } => hint.clone(),
            Error::OutOfMemory { .. } => "use a smaller size or batch, enable tiled VAE decode (--vae-tiling), or use f16".into(),
            Error::Shader { .. } => "this is a bug in ldm-wgpu or the driver: please report it with the output of `ldm info`".into(),
            Error::NonFinite { .. } => "try --dtype f32 (f16 can overflow in the VAE or in attention)".into(),
            Error::Weights(e) => return e.hint().or_else(|| Some("check the model path: a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a single .safetensors checkpoint".into())),
            _ => return None,
        })
    }

    /// A config value that cannot be used (`what`: which config, `reason`: which field and why).
    pub fn config(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Weights(WeightError::Config {
            what: what.into(),
            reason: reason.into(),
        })
    }
}

impl Error {
    pub fn io(path: impl AsRef<std::path::Path>, e: impl fmt::Display) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            message: e.to_string(),
        }
    }
    pub fn shape(op: &str, detail: impl Into<String>) -> Self {
        Error::Shape {
            op: op.to_string(),
            detail: detail.into(),
        }
    }
}
