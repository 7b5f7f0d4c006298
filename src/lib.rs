//! ldm-wgpu: latent diffusion models (Stable Diffusion 1.x / 2.x) on any Vulkan, Metal or DX12 GPU
//! through wgpu, with our own WGSL kernels. See ARCHITECTURE.md for how data flows from prompt to PNG.

pub mod bench;
pub mod embeddings;
pub mod error;
pub mod image;
pub mod info;
pub mod inspect;
pub mod kernels;
pub mod lora;
pub mod models;
pub mod nn;
pub mod parameters;
pub mod pipeline;
pub mod preview;
pub mod prompt;
pub mod rng;
pub mod runtime;
pub mod sched;
#[cfg(feature = "server")]
pub mod server;
pub mod shaders;
pub mod tokenizer;
pub mod util;
pub mod weights;

pub use error::{Error, Result};
pub use runtime::{DType, Gpu, GpuOptions, Tensor};
