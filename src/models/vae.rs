//! KL autoencoder: a port of diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py,
//! vae.py `Encoder` / `Decoder`). Images and latents are NHWC on the GPU.

use serde_json::Value;

use crate::kernels::elementwise;
use crate::models::blocks::{ResnetBlock2D, VaeAttention};
use crate::models::config::Config;
use crate::nn::{Conv2d, GroupNorm};
use crate::weights::WeightView;
use crate::{DType, Error, Gpu, Result, Tensor};

/// diffusers uses eps 1e-6 for every norm of the autoencoder.
const VAE_EPS: f32 = 1e-6;

#[derive(Clone, Debug)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    pub mid_block_add_attention: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    /// Training resolution in pixels: diffusers' default tile size (`tile_sample_min_size`).
    pub sample_size: usize,
}

impl VaeConfig {
    /// From `vae/config.json`.
    pub fn from_json(v: &Value) -> Result<Self> {
        let c = Config::new("vae", v);
        let act = c.str_or("act_fn", "silu")?;
        if act != "silu" {
            return Err(Error::Unsupported(format!(
                "VAE act_fn `{act}` (only silu)"
            )));
        }
        for (key, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            if c.is_set(key) {
                for t in c.str_list(key)? {
                    if t != want {
                        return Err(Error::Unsupported(format!(
                            "VAE {key} entry `{t}` (only {want})"
                        )));
                    }
                }
            }
        }
        let shift = c.f64_or("shift_factor", f64::NAN)?;
        Ok(VaeConfig {
            in_channels: c.usize_or("in_channels", 3)?,
            out_channels: c.usize_or("out_channels", 3)?,
            block_out_channels: c.usize_list("block_out_channels")?,
            layers_per_block: c.usize_or("layers_per_block", 1)?,
            latent_channels: c.usize_or("latent_channels", 4)?,
            norm_num_groups: c.usize_or("norm_num_groups", 32)?,
            scaling_factor: c.f64_or("scaling_factor", 0.18215)?,
            shift_factor: (!shift.is_nan()).then_some(shift),
            force_upcast: c.bool_or("force_upcast", true)?,
            mid_block_add_attention: c.bool_or("mid_block_add_attention", true)?,
            use_quant_conv: c.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: c.bool_or("use_post_quant_conv", true)?,
            // diffusers accepts an int or a [h, w] list and tiles with the first entry.
            sample_size: match v.get("sample_size") {
                Some(Value::Array(a)) => a.first().and_then(Value::as_u64).unwrap_or(32) as usize,
                _ => c.usize_or("sample_size", 32)?,
            },
        })
    }

    /// Pixels per latent along each side: 2^(number of downsamplers).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// diffusers `UNetMidBlock2D` as the autoencoder uses it: resnet, attention, resnet.
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn load(
        gpu: &Gpu,
        vb: &WeightView<'_>,
        c: usize,
        groups: usize,
        attn: bool,
        dtype: DType,
    ) -> Result<Self> {
        Ok(MidBlock {
            resnet0: ResnetBlock2D::load(
                gpu,
                &vb.pp("resnets.0"),
                c,
                c,
                None,
                groups,
                VAE_EPS,
                dtype,
            )?,
            attention: if attn {
                Some(VaeAttention::load(
                    gpu,
                    &vb.pp("attentions.0"),
                    c,
                    groups,
                    VAE_EPS,
                    dtype,
                )?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::load(
                gpu,
                &vb.pp("resnets.1"),
                c,
                c,
                None,
                groups,
                VAE_EPS,
                dtype,
            )?,
        })
    }
    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(gpu, x, None)?; // [B, h, w, C]
        if let Some(a) = &self.attention {
            h = a.forward(gpu, &h)?; // [B, h, w, C]
        }
        self.resnet1.forward(gpu, &h, None)
    }
}

/// diffusers `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets then an optional resampler.
struct ResampleBlock {
    resnets: Vec<ResnetBlock2D>,
    /// Downsample: conv stride 2 after padding bottom/right; upsample: nearest ×2 then conv.
    resample: Option<Conv2d>,
}

pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<ResampleBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<ResampleBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub dtype: DType,
    encoder: Option<Encoder>,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    /// Bytes of activations one encode or decode may hold at once (weights excluded); `None`:
    /// only the device's binding limits count. The `_auto` paths tile to stay under it.
    pub memory_budget: Option<u64>,
}

impl AutoencoderKL {
    /// Load the decoder, and the encoder too when `with_encoder` (img2img, inpainting).
    pub fn load(
        gpu: &Gpu,
        vb: &WeightView<'_>,
        config: VaeConfig,
        dtype: DType,
        with_encoder: bool,
    ) -> Result<Self> {
        let c = &config;
        let g = c.norm_num_groups;
        let boc = &c.block_out_channels;
        if boc.is_empty() {
            return Err(Error::Unsupported("VAE with no blocks".into()));
        }
        let last = *boc.last().expect("non-empty");
        let l = c.latent_channels;

        let encoder = if with_encoder {
            let ev = vb.pp("encoder");
            let mut down_blocks = Vec::new();
            let mut prev = boc[0];
            for (i, &out) in boc.iter().enumerate() {
                let bv = ev.pp("down_blocks").pp(&i.to_string());
                let mut resnets = Vec::new();
                for j in 0..c.layers_per_block {
                    let cin = if j == 0 { prev } else { out };
                    resnets.push(ResnetBlock2D::load(
                        gpu,
                        &bv.pp("resnets").pp(&j.to_string()),
                        cin,
                        out,
                        None,
                        g,
                        VAE_EPS,
                        dtype,
                    )?);
                }
                let resample = if i + 1 < boc.len() {
                    // F.pad(x, (0, 1, 0, 1)) then conv 3×3 stride 2 padding 0.
                    Some(
                        Conv2d::load(gpu, &bv.pp("downsamplers.0.conv"), out, out, 3, 2, 0, dtype)?
                            .with_pads([0, 1, 0, 1]),
                    )
                } else {
                    None
                };
                down_blocks.push(ResampleBlock { resnets, resample });
                prev = out;
            }
            Some(Encoder {
                conv_in: Conv2d::load(
                    gpu,
                    &ev.pp("conv_in"),
                    c.in_channels,
                    boc[0],
                    3,
                    1,
                    1,
                    dtype,
                )?,
                down_blocks,
                mid_block: MidBlock::load(
                    gpu,
                    &ev.pp("mid_block"),
                    last,
                    g,
                    c.mid_block_add_attention,
                    dtype,
                )?,
                conv_norm_out: GroupNorm::load(
                    gpu,
                    &ev.pp("conv_norm_out"),
                    g,
                    last,
                    VAE_EPS,
                    dtype,
                )?,
                conv_out: Conv2d::load(gpu, &ev.pp("conv_out"), last, 2 * l, 3, 1, 1, dtype)?,
            })
        } else {
            None
        };

        let dv = vb.pp("decoder");
        let reversed: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut prev = reversed[0];
        for (i, &out) in reversed.iter().enumerate() {
            let bv = dv.pp("up_blocks").pp(&i.to_string());
            let mut resnets = Vec::new();
            for j in 0..c.layers_per_block + 1 {
                let cin = if j == 0 { prev } else { out };
                resnets.push(ResnetBlock2D::load(
                    gpu,
                    &bv.pp("resnets").pp(&j.to_string()),
                    cin,
                    out,
                    None,
                    g,
                    VAE_EPS,
                    dtype,
                )?);
            }
            let resample = if i + 1 < reversed.len() {
                Some(Conv2d::load(
                    gpu,
                    &bv.pp("upsamplers.0.conv"),
                    out,
                    out,
                    3,
                    1,
                    1,
                    dtype,
                )?)
            } else {
                None
            };
            up_blocks.push(ResampleBlock { resnets, resample });
            prev = out;
        }
        let decoder = Decoder {
            conv_in: Conv2d::load(gpu, &dv.pp("conv_in"), l, last, 3, 1, 1, dtype)?,
            mid_block: MidBlock::load(
                gpu,
                &dv.pp("mid_block"),
                last,
                g,
                c.mid_block_add_attention,
                dtype,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                gpu,
                &dv.pp("conv_norm_out"),
                g,
                boc[0],
                VAE_EPS,
                dtype,
            )?,
            conv_out: Conv2d::load(
                gpu,
                &dv.pp("conv_out"),
                boc[0],
                c.out_channels,
                3,
                1,
                1,
                dtype,
            )?,
        };
        let quant_conv = if with_encoder && c.use_quant_conv {
            Some(Conv2d::load(
                gpu,
                &vb.pp("quant_conv"),
                2 * l,
                2 * l,
                1,
                1,
                0,
                dtype,
            )?)
        } else {
            None
        };
        let post_quant_conv = if c.use_post_quant_conv {
            Some(Conv2d::load(
                gpu,
                &vb.pp("post_quant_conv"),
                l,
                l,
                1,
                1,
                0,
                dtype,
            )?)
        } else {
            None
        };
        Ok(AutoencoderKL {
            config,
            dtype,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            memory_budget: None,
        })
    }

    /// image [B, H, W, 3] in [-1, 1] -> moments [B, H/f, W/f, 2·latent] (mean, then logvar),
    /// the `quant_conv` output before diffusers' `DiagonalGaussianDistribution`: whoever samples
    /// from it must clamp logvar to [-30, 20] first, as that class does.
    pub fn encode_moments(&self, gpu: &Gpu, image: &Tensor) -> Result<Tensor> {
        let enc = self
            .encoder
            .as_ref()
            .ok_or_else(|| Error::Unsupported("the VAE was loaded without its encoder".into()))?;
        let f = self.config.downscale();
        if !image.dim(1).is_multiple_of(f) || !image.dim(2).is_multiple_of(f) {
            return Err(Error::InvalidInput(format!(
                "image size {}×{} is not a multiple of {f}",
                image.dim(2),
                image.dim(1)
            )));
        }
        let mut h = enc.conv_in.forward(gpu, image)?; // [B, H, W, C0]
        for block in &enc.down_blocks {
            for r in &block.resnets {
                h = r.forward(gpu, &h, None)?; // [B, h, w, C]
            }
            if let Some(down) = &block.resample {
                h = down.forward(gpu, &h)?; // [B, H/2, W/2, C]
            }
        }
        h = enc.mid_block.forward(gpu, &h)?; // [B, H/f, W/f, C_last]
        h = enc.conv_norm_out.forward(gpu, &h, true)?; // [B, H/f, W/f, C_last]
        h = enc.conv_out.forward(gpu, &h)?; // [B, h, w, 2L]
        match &self.quant_conv {
            Some(q) => q.forward(gpu, &h),
            None => Ok(h),
        }
    }

    /// Latents already divided by `config.scaling_factor` (and shifted by `shift_factor` where
    /// set) by the caller, as the pipeline does before `vae.decode`: [B, h, w, L] -> image
    /// [B, H, W, 3] in about [-1, 1].
    pub fn decode(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        let dec = &self.decoder;
        let mut h = match &self.post_quant_conv {
            Some(p) => p.forward(gpu, z)?, // [B, h, w, L]
            None => z.clone(),
        };
        h = dec.conv_in.forward(gpu, &h)?; // [B, h, w, C_last]
        h = dec.mid_block.forward(gpu, &h)?; // [B, h, w, C_last]
        for block in &dec.up_blocks {
            for r in &block.resnets {
                h = r.forward(gpu, &h, None)?; // [B, h, w, C]
            }
            if let Some(up) = &block.resample {
                let u = elementwise::upsample_nearest2x(gpu, &h)?; // [B, 2h, 2w, C]
                h = up.forward(gpu, &u)?; // [B, 2h, 2w, C]
            }
        }
        h = dec.conv_norm_out.forward(gpu, &h, true)?; // [B, H, W, C0]
        dec.conv_out.forward(gpu, &h) // [B, H, W, 3]
    }
}
