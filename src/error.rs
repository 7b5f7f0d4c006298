//! The library's one error type. Every fallible call returns `Result<T>`; the CLI prints the
//! error with its `hint()` and exits non-zero (no panics on bad input).

use std::fmt;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug)]
pub enum Error {
    /// No adapter at all (no Vulkan/Metal/DX12 driver, and no software fallback installed).
    NoAdapter,
    /// `--adapter` / `LDM_ADAPTER` named an adapter that does not exist.
    AdapterNotFound {
        requested: String,
        available: Vec<String>,
    },
    /// The adapter lacks a feature that the requested path needs.
    MissingFeature { feature: String, adapter: String },
    /// A device limit would be exceeded (binding size, buffer size, workgroups per dimension).
    LimitExceeded {
        what: String,
        requested: u64,
        limit: u64,
        hint: String,
    },
    /// Tensor shapes or dtypes do not fit together.
    Shape { op: String, detail: String },
    /// A WGSL shader failed to compile or a pipeline failed to build.
    Shader {
        name: String,
        entry: String,
        message: String,
    },
    /// The GPU ran out of memory while allocating `requested` bytes.
    OutOfMemory { requested: u64 },
    /// Any other error reported by the device (validation, lost device, mapping).
    Device(String),
    /// Reading or writing a file.
    Io { path: String, message: String },
    /// Weights missing, malformed or of the wrong shape.
    Weights(String),
    /// A configuration we cannot run (yet).
    Unsupported(String),
    /// Bad user input (CLI flags, image sizes, ...).
    InvalidInput(String),
    /// A model produced NaN or infinity.
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
            Error::Weights(m) if m.contains("(hint:") => return None,
            Error::Weights(_) => "check the model path: a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a single .safetensors checkpoint".into(),
            _ => return None,
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoAdapter => write!(f, "no GPU adapter found"),
            Error::AdapterNotFound { requested, .. } => {
                write!(f, "no adapter matches `{requested}`")
            }
            Error::MissingFeature { feature, adapter } => {
                write!(f, "adapter `{adapter}` lacks the feature {feature}")
            }
            Error::LimitExceeded {
                what,
                requested,
                limit,
                ..
            } => {
                write!(f, "{what}: {requested} exceeds the device limit of {limit}")
            }
            Error::Shape { op, detail } => write!(f, "{op}: {detail}"),
            Error::Shader {
                name,
                entry,
                message,
            } => {
                write!(
                    f,
                    "shader `{name}` (entry `{entry}`) failed to compile: {message}"
                )
            }
            Error::OutOfMemory { requested } => {
                write!(
                    f,
                    "out of GPU memory allocating {:.1} MiB",
                    *requested as f64 / 1048576.0
                )
            }
            Error::Device(m) => write!(f, "GPU device error: {m}"),
            Error::Io { path, message } => write!(f, "{path}: {message}"),
            Error::Weights(m) => write!(f, "weights: {m}"),
            Error::Unsupported(m) => write!(f, "unsupported: {m}"),
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::NonFinite { what } => write!(f, "{what} produced NaN or infinite values"),
        }
    }
}

impl std::error::Error for Error {}

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
