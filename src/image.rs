//! 8-bit RGB images in and out of the engine: PNG decode/encode (atomic writes), and the
//! conversions diffusers' `VaeImageProcessor` does at the model boundary.

use std::path::Path;

use crate::error::{Error, Result};

/// The largest side an input image may declare. Latent diffusion models work at up to a few
/// thousand pixels; a header claiming more is either a mistake or an attempt to make us allocate
/// an absurd buffer before a single pixel has been decoded.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// The largest pixel count an input image may declare (8192², 192 MiB as 8-bit RGB).
pub const MAX_IMAGE_PIXELS: u64 = 8192 * 8192;

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
        // Streamed: the header is checked before the rest of the file is read.
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Image::read_png(std::io::BufReader::new(file), path)
    }

    /// Decode a PNG held in memory (an upload, a base64 field); `what` names it in errors.
    pub fn from_png_bytes(bytes: &[u8], what: impl AsRef<Path>) -> Result<Image> {
        Image::read_png(std::io::Cursor::new(bytes), what.as_ref())
    }

    fn read_png<R: std::io::BufRead + std::io::Seek>(source: R, path: &Path) -> Result<Image> {
        let mut decoder = png::Decoder::new(source);
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        // The decoder's own budget, in case a chunk other than the frame asks for memory.
        decoder.set_limits(png::Limits {
            bytes: (MAX_IMAGE_PIXELS * 8) as usize,
        });
        let mut reader = decoder
            .read_info()
            .map_err(|e| Error::io(path, format!("not a readable PNG: {e}")))?;
        // The output buffer is sized from the header, so bound the header before allocating.
        let (declared_w, declared_h) = (reader.info().width, reader.info().height);
        if declared_w > MAX_IMAGE_SIDE
            || declared_h > MAX_IMAGE_SIDE
            || declared_w as u64 * declared_h as u64 > MAX_IMAGE_PIXELS
        {
            return Err(Error::io(
                path,
                format!(
                    "PNG declares {declared_w}×{declared_h} pixels; the limit is \
                     {MAX_IMAGE_SIDE} per side and {MAX_IMAGE_PIXELS} pixels in all"
                ),
            ));
        }
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
        let bytes = self.encode_png(path, text)?;
        crate::util::write_atomic(path, &bytes)
    }

    /// The PNG bytes `save_png_with_text` writes (`what` names the image in errors).
    pub fn encode_png(&self, what: impl AsRef<Path>, text: &[(&str, &str)]) -> Result<Vec<u8>> {
        let path = what.as_ref();
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
        Ok(bytes)
    }

    /// The text chunks (tEXt, zTXt, iTXt) of a PNG, as (keyword, text), without decoding its
    /// pixels (A1111's `png-info`).
    pub fn png_text(bytes: &[u8], what: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
        let path = what.as_ref();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder
            .read_info()
            .map_err(|e| Error::io(path, format!("not a readable PNG: {e}")))?;
        let info = reader.info();
        let mut out: Vec<(String, String)> = info
            .uncompressed_latin1_text
            .iter()
            .map(|t| (t.keyword.clone(), t.text.clone()))
            .collect();
        for t in &info.compressed_latin1_text {
            if let Ok(text) = t.get_text() {
                out.push((t.keyword.clone(), text));
            }
        }
        for t in &info.utf8_text {
            if let Ok(text) = t.get_text() {
                out.push((t.keyword.clone(), text));
            }
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32 (IEEE), as PNG chunks carry it: enough to forge a header by hand.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
        out
    }

    /// A PNG whose header claims `width`×`height` RGB pixels and carries no image data.
    fn forged_png(width: u32, height: u32) -> Vec<u8> {
        let mut ihdr = width.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter/interlace tricks
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(b"IDAT", &[]));
        png.extend(chunk(b"IEND", &[]));
        png
    }

    #[test]
    fn huge_declared_size_is_an_error_before_any_allocation() {
        let dir = std::env::temp_dir().join(format!("ldm-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (w, h) in [(100_000, 100_000), (16_385, 8), (12_000, 12_000)] {
            let path = dir.join(format!("forged-{w}x{h}.png"));
            std::fs::write(&path, forged_png(w, h)).unwrap();
            let err = Image::load_png(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("declares {w}×{h}")), "{w}×{h}: {err}");
        }
        // A small forged header passes the bound and fails later, on the missing data.
        let path = dir.join("forged-small.png");
        std::fs::write(&path, forged_png(64, 64)).unwrap();
        let err = Image::load_png(&path).unwrap_err().to_string();
        assert!(!err.contains("declares"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn round_trip_keeps_pixels() {
        let dir = std::env::temp_dir().join(format!("ldm-image-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = Image {
            width: 5,
            height: 3,
            rgb: (0..45).map(|i| (i * 5) as u8).collect(),
        };
        let path = dir.join("rt.png");
        image.save_png(&path).unwrap();
        assert_eq!(Image::load_png(&path).unwrap(), image);
        std::fs::remove_dir_all(&dir).ok();
    }
}
