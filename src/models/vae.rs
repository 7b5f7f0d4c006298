//! KL autoencoder: a port of diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py,
//! vae.py `Encoder` / `Decoder`). Images and latents are NHWC on the GPU.

use serde::Deserialize;
use serde_json::Value;

use crate::models::blocks::{ResnetBlock2D, ResnetBlock2DConfig, VaeAttention};
use crate::models::config::{parse, require_str, size_or, sizes, Number, PerBlock, Size};
pub use crate::models::vae_tiling::{ActivationBytes, TileConfig, VaeTiling};
use crate::nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
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

/// `vae/config.json` as diffusers writes it (`AutoencoderKL`; the keys we read).
#[derive(Debug, Deserialize)]
struct VaeConfigFile {
    in_channels: Option<Size>,
    out_channels: Option<Size>,
    block_out_channels: Vec<Size>,
    down_block_types: Option<Vec<String>>,
    up_block_types: Option<Vec<String>>,
    layers_per_block: Option<Size>,
    latent_channels: Option<Size>,
    norm_num_groups: Option<Size>,
    act_fn: Option<String>,
    #[serde(default)]
    scaling_factor: Number,
    shift_factor: Option<f64>,
    force_upcast: Option<bool>,
    mid_block_add_attention: Option<bool>,
    use_quant_conv: Option<bool>,
    use_post_quant_conv: Option<bool>,
    /// An int or an [h, w] list; diffusers tiles with the first entry.
    sample_size: Option<PerBlock<Size>>,
}

impl VaeConfigFile {
    fn validate(self) -> Result<VaeConfig> {
        const WHAT: &str = "vae";
        require_str("VAE", "act_fn", &self.act_fn, "silu")?;
        for (key, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(t) = types.iter().flatten().find(|t| *t != want) {
                return Err(Error::Unsupported(format!(
                    "VAE {key} entry `{t}` (only {want})"
                )));
            }
        }
        if self.block_out_channels.is_empty() {
            return Err(Error::config(WHAT, "`block_out_channels` is empty"));
        }
        Ok(VaeConfig {
            in_channels: size_or(self.in_channels, 3),
            out_channels: size_or(self.out_channels, 3),
            block_out_channels: sizes(&self.block_out_channels),
            layers_per_block: size_or(self.layers_per_block, 1),
            latent_channels: size_or(self.latent_channels, 4),
            norm_num_groups: size_or(self.norm_num_groups, 32),
            // Real VAEs: 0.18215 (SD 1.x/2.x), 0.13025 (SDXL), 1.5305 (SD3), 0.3611 (FLUX).
            scaling_factor: self.scaling_factor.within(
                WHAT,
                "scaling_factor",
                0.18215,
                1e-4..=100.0,
            )?,
            shift_factor: self.shift_factor,
            force_upcast: self.force_upcast.unwrap_or(true),
            mid_block_add_attention: self.mid_block_add_attention.unwrap_or(true),
            use_quant_conv: self.use_quant_conv.unwrap_or(true),
            use_post_quant_conv: self.use_post_quant_conv.unwrap_or(true),
            sample_size: match &self.sample_size {
                None => 32,
                Some(PerBlock::All(s)) => s.0,
                Some(PerBlock::Each(list)) => list.first().map_or(32, |s| s.0),
            },
        })
    }
}

impl VaeConfig {
    /// From `vae/config.json`.
    pub fn from_json(v: &Value) -> Result<Self> {
        parse::<VaeConfigFile>("vae", v)?.validate()
    }

    /// Pixels per latent along each side: 2^(number of downsamplers).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// diffusers `UNetMidBlock2D` as the autoencoder uses it: resnet, attention, resnet.
struct UNetMidBlock2D {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

/// A VAE resnet (no time embedding, eps 1e-6).
fn vae_resnet(
    vb: VarBuilder<'_>,
    c_in: usize,
    c_out: usize,
    groups: usize,
) -> Result<ResnetBlock2D> {
    let cfg = ResnetBlock2DConfig {
        c_in,
        c_out,
        temb_channels: None,
        groups,
        eps: VAE_EPS,
        // The VAE keeps separate GroupNorm passes. Fused, the tiling planner's dry run (which
        // takes a fresh statistics table per norm, `GroupNorm::into_conv`) and the real pass
        // (which keeps one table per layer) would no longer allocate the same bytes, and
        // tests/vae_tiling.rs's dry_run_measures_what_the_real_pass_allocates fails (measured:
        // f32 decode peak 622,336 planned vs 624,640 real). Its groups at 128² and above also
        // exceed norm::GN_STATS_ONE_PASS_MAX and would take the split statistics path (two
        // dispatches, as many as the unfused norm), so there the fusion would save only the
        // write + read of the normalised activation, not a dispatch (decode runs once per image).
        fused_norm: false,
    };
    ResnetBlock2D::load(vb, cfg)
}

impl UNetMidBlock2D {
    fn load(vb: VarBuilder<'_>, c: usize, groups: usize, attn: bool) -> Result<Self> {
        let attention = if attn {
            Some(VaeAttention::load(
                vb.pp("attentions.0"),
                c,
                groups,
                VAE_EPS,
            )?)
        } else {
            None
        };
        Ok(UNetMidBlock2D {
            resnet0: vae_resnet(vb.pp("resnets.0"), c, c, groups)?,
            attention,
            resnet1: vae_resnet(vb.pp("resnets.1"), c, c, groups)?,
        })
    }

    /// x: [B, h, w, C] -> [B, h, w, C].
    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(gpu, x, None)?; // [B, h, w, C]
        if let Some(a) = &self.attention {
            h = a.forward(gpu, &h)?; // [B, h, w, C]
        }
        self.resnet1.forward(gpu, &h, None) // [B, h, w, C]
    }
}

/// diffusers `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets then an optional resampler.
struct ResampleBlock {
    resnets: Vec<ResnetBlock2D>,
    /// Downsample: conv stride 2 after padding bottom/right; upsample: nearest ×2 then conv.
    resample: Option<Conv2d>,
}

impl ResampleBlock {
    fn load_resnets(
        vb: &VarBuilder<'_>,
        n: usize,
        (c_in, c_out): (usize, usize),
        groups: usize,
    ) -> Result<Vec<ResnetBlock2D>> {
        let rv = vb.pp("resnets");
        (0..n)
            .map(|j| {
                vae_resnet(
                    rv.pp(&j.to_string()),
                    if j == 0 { c_in } else { c_out },
                    c_out,
                    groups,
                )
            })
            .collect()
    }

    /// diffusers `DownEncoderBlock2D`; `downsample`: end with Downsample2D
    /// (F.pad(x, (0, 1, 0, 1)) then conv 3×3 stride 2 padding 0).
    fn load_down(
        vb: VarBuilder<'_>,
        chans: (usize, usize),
        c: &VaeConfig,
        downsample: bool,
    ) -> Result<Self> {
        let out = chans.1;
        let resnets = Self::load_resnets(&vb, c.layers_per_block, chans, c.norm_num_groups)?;
        let resample = if downsample {
            let cfg = Conv2dConfig {
                cin: out,
                cout: out,
                kernel: 3,
                stride: 2,
                padding: 0,
            };
            Some(Conv2d::load(vb.pp("downsamplers.0.conv"), cfg)?.with_pads([0, 1, 0, 1]))
        } else {
            None
        };
        Ok(ResampleBlock { resnets, resample })
    }

    /// diffusers `UpDecoderBlock2D`; `upsample`: end with Upsample2D (nearest 2× then conv).
    fn load_up(
        vb: VarBuilder<'_>,
        chans: (usize, usize),
        c: &VaeConfig,
        upsample: bool,
    ) -> Result<Self> {
        let out = chans.1;
        let resnets = Self::load_resnets(&vb, c.layers_per_block + 1, chans, c.norm_num_groups)?;
        let resample = if upsample {
            Some(vb.pp("upsamplers.0.conv").conv3x3(out, out)?)
        } else {
            None
        };
        Ok(ResampleBlock { resnets, resample })
    }

    /// x: [B, h, w, Cin] -> [B, h/2, w/2, Cout] (down) or [B, 2h, 2w, Cout] (up).
    fn forward(&self, gpu: &Gpu, mut h: Tensor, up: bool) -> Result<Tensor> {
        for r in &self.resnets {
            h = r.forward(gpu, &h, None)?; // [B, h, w, Cout]
        }
        match &self.resample {
            // Upsample2D: nearest 2× then conv, the upsampling done by the conv's loads.
            Some(conv) if up => conv.forward_upsampled(gpu, &h), // [B, 2h, 2w, Cout]
            Some(conv) => conv.forward(gpu, &h),                 // [B, h/2, w/2, Cout]
            None => Ok(h),
        }
    }
}

/// diffusers `Encoder` (vae.py): conv_in, DownEncoderBlock2Ds, UNetMidBlock2D, norm, conv_out
/// to the 2·latent moments.
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<ResampleBlock>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: VarBuilder<'_>, c: &VaeConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let (g, last) = (c.norm_num_groups, boc[boc.len() - 1]);
        let bv = vb.pp("down_blocks");
        let down_blocks = (0..boc.len())
            .map(|i| {
                let chans = (if i == 0 { boc[0] } else { boc[i - 1] }, boc[i]);
                ResampleBlock::load_down(bv.pp(&i.to_string()), chans, c, i + 1 < boc.len())
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_block =
            UNetMidBlock2D::load(vb.pp("mid_block"), last, g, c.mid_block_add_attention)?;
        Ok(Encoder {
            conv_in: vb.pp("conv_in").conv3x3(c.in_channels, boc[0])?,
            down_blocks,
            mid_block,
            conv_norm_out: GroupNorm::load(vb.pp("conv_norm_out"), g, last, VAE_EPS)?,
            conv_out: vb.pp("conv_out").conv3x3(last, 2 * c.latent_channels)?,
        })
    }

    /// image [B, H, W, 3] -> [B, H/f, W/f, 2L].
    fn forward(&self, gpu: &Gpu, image: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(gpu, image)?; // [B, H, W, C0]
        for block in &self.down_blocks {
            h = block.forward(gpu, h, false)?; // [B, H/2, W/2, C]
        }
        h = self.mid_block.forward(gpu, &h)?; // [B, H/f, W/f, C_last]
        h = self.conv_norm_out.forward(gpu, &h, true)?; // [B, H/f, W/f, C_last]
        self.conv_out.forward(gpu, &h) // [B, H/f, W/f, 2L]
    }
}

/// diffusers `Decoder` (vae.py): conv_in, UNetMidBlock2D, UpDecoderBlock2Ds, norm, conv_out.
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<ResampleBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: VarBuilder<'_>, c: &VaeConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let n = boc.len();
        let (g, last) = (c.norm_num_groups, boc[n - 1]);
        let reversed = |k: usize| boc[n - 1 - k];
        let bv = vb.pp("up_blocks");
        let up_blocks = (0..n)
            .map(|i| {
                let chans = (if i == 0 { last } else { reversed(i - 1) }, reversed(i));
                ResampleBlock::load_up(bv.pp(&i.to_string()), chans, c, i + 1 < n)
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_block =
            UNetMidBlock2D::load(vb.pp("mid_block"), last, g, c.mid_block_add_attention)?;
        Ok(Decoder {
            conv_in: vb.pp("conv_in").conv3x3(c.latent_channels, last)?,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(vb.pp("conv_norm_out"), g, boc[0], VAE_EPS)?,
            conv_out: vb.pp("conv_out").conv3x3(boc[0], c.out_channels)?,
        })
    }

    /// z: [B, h, w, L] (after post_quant_conv, dropped once read) -> [B, H, W, 3].
    fn forward(&self, gpu: &Gpu, z: Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(gpu, &z)?; // [B, h, w, C_last]
        drop(z);
        h = self.mid_block.forward(gpu, &h)?; // [B, h, w, C_last]
        for block in &self.up_blocks {
            h = block.forward(gpu, h, true)?; // [B, 2h, 2w, C]
        }
        h = self.conv_norm_out.forward(gpu, &h, true)?; // [B, H, W, C0]
        self.conv_out.forward(gpu, &h) // [B, H, W, 3]
    }
}

/// diffusers `AutoencoderKL`: encoder, quant_conv, post_quant_conv, decoder.
pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub dtype: DType,
    pub(crate) encoder: Option<Encoder>,
    pub(crate) decoder: Decoder,
    pub(crate) quant_conv: Option<Conv2d>,
    pub(crate) post_quant_conv: Option<Conv2d>,
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
        let vb = VarBuilder::new(gpu, vb, dtype);
        let c = &config;
        if c.block_out_channels.is_empty() {
            return Err(Error::Unsupported("VAE with no blocks".into()));
        }
        let l = c.latent_channels;
        let encoder = if with_encoder {
            Some(Encoder::load(vb.pp("encoder"), c)?)
        } else {
            None
        };
        let decoder = Decoder::load(vb.pp("decoder"), c)?;
        let quant_conv = if with_encoder && c.use_quant_conv {
            Some(Conv2d::load(
                vb.pp("quant_conv"),
                Conv2dConfig::k1(2 * l, 2 * l),
            )?)
        } else {
            None
        };
        let post_quant_conv = if c.use_post_quant_conv {
            Some(Conv2d::load(
                vb.pp("post_quant_conv"),
                Conv2dConfig::k1(l, l),
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
        let h = enc.forward(gpu, image)?; // [B, H/f, W/f, 2L]
        match &self.quant_conv {
            Some(q) => q.forward(gpu, &h), // [B, H/f, W/f, 2L]
            None => Ok(h),
        }
    }

    /// Latents already divided by `config.scaling_factor` (and shifted by `shift_factor` where
    /// set) by the caller, as the pipeline does before `vae.decode`: [B, h, w, L] -> image
    /// [B, H, W, 3] in about [-1, 1].
    pub fn decode(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        let h = match &self.post_quant_conv {
            Some(p) => p.forward(gpu, z)?, // [B, h, w, L]
            None => z.clone(),
        };
        self.decoder.forward(gpu, h) // [B, H, W, 3]
    }
}
