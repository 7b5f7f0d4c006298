//! 8-bit RGB images in and out of the engine: PNG decode/encode (atomic writes), and the
//! conversions diffusers' `VaeImageProcessor` does at the model boundary.

use std::path::Path;

use crate::error::{Error, Result};

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    /// Read a PNG (gray, RGB or RGBA; 8 or 16 bit); alpha is dropped.
    pub fn load_png(path: &Path) -> Result<Image> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder
            .read_info()
            .map_err(|e| Error::io(path, format!("not a readable PNG: {e}")))?;
        let size = reader
            .output_buffer_size()
            .ok_or_else(|| Error::io(path, "PNG too large"))?;
        let mut buf = vec![0; size];
        let info = reader
            .next_frame(&mut buf)
            .map_err(|e| Error::io(path, format!("PNG decode: {e}")))?;
        let (w, h) = (info.width as usize, info.height as usize);
        let channels = match info.color_type {
            png::ColorType::Grayscale => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            png::ColorType::Indexed => return Err(Error::io(path, "indexed PNG after expansion")),
        };
        let mut rgb = Vec::with_capacity(w * h * 3);
        for px in buf[..w * h * channels].chunks_exact(channels) {
            match channels {
                1 | 2 => rgb.extend_from_slice(&[px[0], px[0], px[0]]),
                _ => rgb.extend_from_slice(&px[..3]),
            }
        }
        Ok(Image {
            width: w,
            height: h,
            rgb,
        })
    }

    /// Encode as PNG and write atomically (temporary file + rename).
    pub fn save_png(&self, path: &Path) -> Result<()> {
        self.save_png_with_text(path, &[])
    }

    /// Encode as PNG with tEXt chunks (e.g. `("parameters", ...)` in the A1111 format that
    /// image browsers and other SD tools read) and write atomically.
    pub fn save_png_with_text(&self, path: &Path, text: &[(&str, &str)]) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            for (key, value) in text {
                // tEXt is Latin-1; prompts with other characters go in an iTXt chunk (UTF-8).
                let latin1 = value.chars().all(|c| (c as u32) < 256);
                let r = if latin1 {
                    enc.add_text_chunk(key.to_string(), value.to_string())
                } else {
                    enc.add_itxt_chunk(key.to_string(), value.to_string())
                };
                r.map_err(|e| Error::io(path, format!("PNG text chunk: {e}")))?;
            }
            let mut w = enc.write_header().map_err(|e| Error::io(path, e))?;
            w.write_image_data(&self.rgb)
                .map_err(|e| Error::io(path, e))?;
        }
        crate::util::write_atomic(path, &bytes)
    }

    /// Pixels as floats in [-1, 1], NHWC order [1, H, W, 3] (`VaeImageProcessor.preprocess`:
    /// x / 255 * 2 - 1).
    pub fn to_model_input(&self) -> Vec<f32> {
        self.rgb
            .iter()
            .map(|&v| v as f32 / 255.0 * 2.0 - 1.0)
            .collect()
    }

    /// The inverse of the VAE's output range, as `VaeImageProcessor.postprocess` does it:
    /// (x / 2 + 0.5).clamp(0, 1), then `(x * 255).round()` to u8. `nhwc` is [H, W, 3].
    pub fn from_model_output(nhwc: &[f32], width: usize, height: usize) -> Result<Image> {
        if nhwc.len() != width * height * 3 {
            return Err(Error::shape(
                "image",
                format!("{} values for {width}×{height}×3", nhwc.len()),
            ));
        }
        if nhwc.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "the VAE decoder".into(),
            });
        }
        let rgb = nhwc
            .iter()
            .map(|&x| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        Ok(Image { width, height, rgb })
    }

    /// A mask as diffusers' `mask_processor` reads it: grayscale in [0, 1], binarised at 0.5
    /// (white = repaint). Returns [H, W] values 0 or 1.
    pub fn to_mask(&self) -> Vec<f32> {
        self.rgb
            .chunks_exact(3)
            .map(|p| {
                // PIL's convert("L"): L = R * 299/1000 + G * 587/1000 + B * 114/1000.
                let l = (p[0] as f32 * 299.0 + p[1] as f32 * 587.0 + p[2] as f32 * 114.0) / 1000.0;
                if l / 255.0 < 0.5 {
                    0.0
                } else {
                    1.0
                }
            })
            .collect()
    }
}
