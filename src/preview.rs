//! Cheap latent previews: a linear map from the 4 latent channels to RGB, run on the GPU as one
//! matmul over the latents (no VAE decode), as the A1111 web UI's "Approx cheap" preview and
//! ComfyUI's latent previews do. The factors are fitted to the SD 1.x/2.x VAE; for other VAEs
//! (e.g. the tiny model in weights/) the colours are only indicative.

use crate::image::Image;
use crate::kernels::matmul::{self, Activation};
use crate::{Error, Gpu, Result, Tensor};

/// RGB contribution of each SD latent channel (rows: R, G, B; columns: latent channels).
const SD_LATENT_RGB: [[f32; 4]; 3] = [
    [0.3512, 0.3250, -0.2829, -0.2120],
    [0.2297, 0.4974, 0.1762, -0.2616],
    [0.3227, 0.2350, 0.2721, -0.7177],
];

/// Preview image `index` of a batch of NHWC latents [B, h, w, 4] at latent resolution.
pub fn latent_preview(gpu: &Gpu, latents: &Tensor, index: usize) -> Result<Image> {
    let s = latents.shape();
    if s.len() != 4 || s[3] != 4 || index >= s[0] {
        return Err(Error::shape(
            "latent_preview",
            format!("latents {s:?}, image {index}"),
        ));
    }
    let (h, w) = (s[1], s[2]);
    let weight: Vec<f32> = SD_LATENT_RGB.iter().flatten().copied().collect();
    let weight = gpu.upload(&weight, &[3, 4], latents.dtype())?;
    let rgb = matmul::linear(gpu, latents, &weight, None, None, Activation::None)?; // [B, h, w, 3]
    let all = gpu.download(&rgb)?;
    let one = &all[index * h * w * 3..(index + 1) * h * w * 3];
    // The factors map to roughly [-1, 1], like the VAE's output.
    Image::from_model_output(one, w, h)
}

/// Nearest-neighbour upscale so a latent-size preview is viewable.
pub fn upscale(img: &Image, factor: usize) -> Image {
    let (w, h) = (img.width * factor, img.height * factor);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let p = ((y / factor) * img.width + x / factor) * 3;
            rgb.extend_from_slice(&img.rgb[p..p + 3]);
        }
    }
    Image {
        width: w,
        height: h,
        rgb,
    }
}

/// A full-resolution preview of image `index` through a tiny autoencoder (TAESD): the current
/// latents times `scale` (the U-Net's input scaling, which brings them to the decoder's range),
/// decoded on the GPU. Much closer to the final image than [`latent_preview`].
pub fn tiny_vae_preview(
    gpu: &Gpu,
    tiny: &crate::models::taesd::AutoencoderTiny,
    latents: &Tensor,
    index: usize,
    scale: f64,
) -> Result<Image> {
    let s = latents.shape();
    if s.len() != 4 || index >= s[0] {
        return Err(Error::shape(
            "tiny_vae_preview",
            format!("latents {s:?}, image {index}"),
        ));
    }
    let per_image = s[1] * s[2] * s[3];
    let all = gpu.download(latents)?;
    let one = &all[index * per_image..(index + 1) * per_image];
    let z = gpu.upload(one, &[1, s[1], s[2], s[3]], latents.dtype())?;
    let z = crate::kernels::elementwise::scale(gpu, &z, scale as f32)?;
    let img = tiny.decode(gpu, &z)?; // [1, H, W, 3] in [-1, 1]
    let (h, w) = (img.shape()[1], img.shape()[2]);
    Image::from_model_output(&gpu.download(&img)?, w, h)
}
