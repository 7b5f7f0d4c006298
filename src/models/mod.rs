//! The three networks of a latent diffusion model, assembled on the runtime from `nn` layers,
//! each named after the diffusers / transformers class it ports.

pub mod blocks;
pub mod clip;
pub mod config;
pub mod taesd;
pub mod transformer;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod vae_tiling;
