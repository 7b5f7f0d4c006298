//! One Rust wrapper per WGSL kernel family: the `Params` twin of the shader's uniform struct,
//! `dispatch`-style functions that record the kernel, and `reference` CPU implementations
//! (f64 accumulation) that are the specification the tests hold the shaders to.

pub mod attention;
pub mod cast;
pub mod conv2d;
pub mod coop;
pub mod elementwise;
pub mod emphasis;
pub mod fill;
pub mod matmul;
pub mod norm;
pub mod peak;
pub mod sampler_step;
pub mod sd15;
pub mod sdxl;
pub mod tiling;
