//! diffusers `UNet2DConditionModel` (models/unets/unet_2d_condition.py) for Stable Diffusion 1.x
//! and 2.x configurations, with the down/mid/up blocks of unet_2d_blocks.py
//! (CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D).
//! Activations NHWC: sample [B, h, w, C_in] -> [B, h, w, C_out].

use serde_json::Value;

use crate::kernels::elementwise;
use crate::kernels::matmul::Activation;
use crate::models::blocks::ResnetBlock2D;
use crate::models::config::Config;
use crate::models::transformer::{Transformer2DModel, TransformerSpec};
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::weights::WeightView;
use crate::{DType, Error, Gpu, Result, Tensor};

#[derive(Clone, Debug)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// true for CrossAttn*Block2D, per down block (up blocks mirror `up_block_types`).
    pub down_has_attention: Vec<bool>,
    pub up_has_attention: Vec<bool>,
    pub layers_per_block: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    pub num_attention_heads: Vec<usize>,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: Vec<bool>,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub norm_num_groups: usize,
    pub norm_eps: f32,
    pub downsample_padding: usize,
    pub sample_size: usize,
}

impl UNetConfig {
    /// From `unet/config.json`. Configurations we do not run (SDXL's added embeddings, class
    /// embeddings, other block types) are refused by name.
    ///
    /// `upcast_attention` (SD 2.1) needs nothing here: the attention kernel computes scores,
    /// softmax and the weighted sum in f32 whatever the storage dtype.
    pub fn from_json(v: &Value) -> Result<Self> {
        let c = Config::new("unet", v);
        let unsupported = |what: String| Err(Error::Unsupported(format!("U-Net config: {what}")));
        for key in [
            "addition_embed_type",
            "class_embed_type",
            "encoder_hid_dim_type",
            "time_cond_proj_dim",
        ] {
            if c.is_set(key) {
                return unsupported(format!(
                    "`{key}` = {} (SDXL-style and conditioned U-Nets are not supported yet)",
                    v[key]
                ));
            }
        }
        if c.bool_or("dual_cross_attention", false)? {
            return unsupported("dual_cross_attention".into());
        }
        if c.str_or("resnet_time_scale_shift", "default")? != "default" {
            return unsupported("resnet_time_scale_shift other than `default`".into());
        }
        if c.str_or("time_embedding_type", "positional")? != "positional" {
            return unsupported("time_embedding_type other than `positional`".into());
        }
        if c.str_or("act_fn", "silu")? != "silu" {
            return unsupported("act_fn other than silu".into());
        }
        if c.str_or("mid_block_type", "UNetMidBlock2DCrossAttn")? != "UNetMidBlock2DCrossAttn" {
            return unsupported(format!("mid_block_type {}", v["mid_block_type"]));
        }
        if c.usize_or("conv_in_kernel", 3)? != 3 || c.usize_or("conv_out_kernel", 3)? != 3 {
            return unsupported("conv kernels other than 3".into());
        }
        if c.is_set("cross_attention_dim") && !v["cross_attention_dim"].is_u64() {
            return unsupported("per-block cross_attention_dim".into());
        }
        let block_out_channels = c.usize_list("block_out_channels")?;
        let n = block_out_channels.len();
        let down_types = c.str_list("down_block_types")?;
        let up_types = c.str_list("up_block_types")?;
        if down_types.len() != n || up_types.len() != n {
            return unsupported(
                "block type lists must have one entry per block_out_channels".into(),
            );
        }
        let kind = |t: &String, plain: &str, attn: &str| -> Result<bool> {
            if t == plain {
                Ok(false)
            } else if t == attn {
                Ok(true)
            } else {
                Err(Error::Unsupported(format!("U-Net block type `{t}`")))
            }
        };
        let down_has_attention = down_types
            .iter()
            .map(|t| kind(t, "DownBlock2D", "CrossAttnDownBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let up_has_attention = up_types
            .iter()
            .map(|t| kind(t, "UpBlock2D", "CrossAttnUpBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        // diffusers keeps a historical naming quirk: `attention_head_dim` is really the number of
        // heads unless `num_attention_heads` is given.
        let heads = match c.per_block("num_attention_heads", n)? {
            Some(h) => h,
            None => c.per_block("attention_head_dim", n)?.unwrap_or(vec![8; n]),
        };
        let layers_per_block = c.per_block("layers_per_block", n)?.unwrap_or(vec![2; n]);
        let transformer_layers_per_block = c
            .per_block("transformer_layers_per_block", n)?
            .unwrap_or(vec![1; n]);
        for (i, (&ch, &h)) in block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || ch % h != 0 {
                return unsupported(format!(
                    "block {i}: {ch} channels not divisible by {h} heads"
                ));
            }
        }
        Ok(UNetConfig {
            in_channels: c.usize_or("in_channels", 4)?,
            out_channels: c.usize_or("out_channels", 4)?,
            down_has_attention,
            up_has_attention,
            layers_per_block,
            transformer_layers_per_block,
            num_attention_heads: heads,
            cross_attention_dim: c.usize_or("cross_attention_dim", 1280)?,
            use_linear_projection: c.bool_or("use_linear_projection", false)?,
            only_cross_attention: c.per_block_bool("only_cross_attention", n, false)?,
            flip_sin_to_cos: c.bool_or("flip_sin_to_cos", true)?,
            freq_shift: c.f64_in("freq_shift", 0.0, -16.0..=16.0)? as f32,
            norm_num_groups: c.usize_or("norm_num_groups", 32)?,
            norm_eps: c.f64_in("norm_eps", 1e-5, 1e-12..=1.0)? as f32,
            downsample_padding: c.usize_or("downsample_padding", 1)?,
            sample_size: c.usize_or("sample_size", 64)?,
            block_out_channels,
        })
    }

    /// Latent sides must be divisible by this (one halving per downsampler).
    pub fn latent_multiple(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// A resnet, optionally followed by a transformer (the Cross-Attn blocks).
struct Layer {
    resnet: ResnetBlock2D,
    transformer: Option<Transformer2DModel>,
}

impl Layer {
    fn forward(&self, gpu: &Gpu, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.resnet.forward(gpu, x, Some(temb))?; // [B, H, W, Cout]
        self.attend(gpu, h, context)
    }

    /// The decoder's layer on `torch.cat([h, skip], dim=1)`, the concatenation never written.
    fn forward_concat(
        &self,
        gpu: &Gpu,
        h: &Tensor,
        skip: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let h = self.resnet.forward_concat(gpu, h, skip, Some(temb))?; // [B, H, W, Cout]
        self.attend(gpu, h, context)
    }

    fn attend(&self, gpu: &Gpu, h: Tensor, context: &Tensor) -> Result<Tensor> {
        match &self.transformer {
            Some(t) => t.forward(gpu, &h, context),
            None => Ok(h),
        }
    }
}

struct DownBlock {
    layers: Vec<Layer>,
    downsampler: Option<Conv2d>,
}

struct UpBlock {
    layers: Vec<Layer>,
    upsampler: Option<Conv2d>,
}

/// `silu(time_embedding(time_proj(t)))` for every model call of a schedule: [calls·batch, 4C0],
/// rows `call·batch .. (call+1)·batch` for call `call`.
pub struct TimeEmbeddingTable {
    table: Tensor,
    calls: usize,
    batch: usize,
    dim: usize,
}

impl TimeEmbeddingTable {
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Record the copy of call `call`'s rows into `out` [batch, 4C0] (no submit). A loop that
    /// copies every call into the same tensor binds the same buffer every step, which keeps its
    /// cached bind groups valid.
    pub fn row_into(&self, gpu: &Gpu, call: usize, out: &Tensor) -> Result<()> {
        if call >= self.calls
            || out.shape() != [self.batch, self.dim]
            || out.dtype() != self.table.dtype()
        {
            return Err(Error::shape(
                "time embedding",
                format!(
                    "call {call} of {} into {out:?} (want [{}, {}] {})",
                    self.calls,
                    self.batch,
                    self.dim,
                    self.table.dtype().name()
                ),
            ));
        }
        let bytes = out.size_bytes();
        gpu.copy_bytes(&self.table, call as u64 * bytes, out, 0, bytes)
    }

    /// Call `call`'s rows as a new tensor [batch, 4C0].
    pub fn row(&self, gpu: &Gpu, call: usize) -> Result<Tensor> {
        let out = gpu.empty(&[self.batch, self.dim], self.table.dtype())?; // [batch, 4C0]
        self.row_into(gpu, call, &out)?;
        Ok(out)
    }
}

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub dtype: DType,
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_resnet0: ResnetBlock2D,
    mid_transformer: Transformer2DModel,
    mid_resnet1: ResnetBlock2D,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn load(gpu: &Gpu, vb: &WeightView<'_>, config: UNetConfig, dtype: DType) -> Result<Self> {
        let c = &config;
        let boc = &c.block_out_channels;
        let n = boc.len();
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);
        let temb_dim = boc[0] * 4;
        let spec = |channels: usize, block: usize, only_cross: bool| TransformerSpec {
            channels,
            heads: c.num_attention_heads[block],
            head_dim: channels / c.num_attention_heads[block],
            layers: c.transformer_layers_per_block[block],
            cross_attention_dim: c.cross_attention_dim,
            use_linear_projection: c.use_linear_projection,
            only_cross_attention: only_cross,
            norm_groups: groups,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, &block_ch) in boc.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = block_ch;
            let bv = vb.pp("down_blocks").pp(&i.to_string());
            let mut layers = Vec::new();
            for j in 0..c.layers_per_block[i] {
                let cin = if j == 0 { in_ch } else { out_ch };
                let resnet = ResnetBlock2D::load(
                    gpu,
                    &bv.pp("resnets").pp(&j.to_string()),
                    cin,
                    out_ch,
                    Some(temb_dim),
                    groups,
                    eps,
                    dtype,
                )?;
                let transformer = if c.down_has_attention[i] {
                    Some(Transformer2DModel::load(
                        gpu,
                        &bv.pp("attentions").pp(&j.to_string()),
                        spec(out_ch, i, c.only_cross_attention[i]),
                        dtype,
                    )?)
                } else {
                    None
                };
                layers.push(Layer {
                    resnet,
                    transformer,
                });
            }
            let downsampler = if i + 1 < n {
                let p = c.downsample_padding;
                Some(Conv2d::load(
                    gpu,
                    &bv.pp("downsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    2,
                    p,
                    dtype,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                layers,
                downsampler,
            });
        }

        let last = boc[n - 1];
        let mv = vb.pp("mid_block");
        let mid_resnet0 = ResnetBlock2D::load(
            gpu,
            &mv.pp("resnets.0"),
            last,
            last,
            Some(temb_dim),
            groups,
            eps,
            dtype,
        )?;
        let mid_transformer =
            Transformer2DModel::load(gpu, &mv.pp("attentions.0"), spec(last, n - 1, false), dtype)?;
        let mid_resnet1 = ResnetBlock2D::load(
            gpu,
            &mv.pp("resnets.1"),
            last,
            last,
            Some(temb_dim),
            groups,
            eps,
            dtype,
        )?;

        // Up blocks walk the reversed lists (diffusers' reversed_* variables).
        let rev = |v: &Vec<usize>| v.iter().rev().copied().collect::<Vec<_>>();
        let (rboc, rlayers) = (rev(boc), rev(&c.layers_per_block));
        let ronly: Vec<bool> = c.only_cross_attention.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = rboc[0];
        for i in 0..n {
            let prev_out = out_ch;
            out_ch = rboc[i];
            let in_ch = rboc[(i + 1).min(n - 1)];
            let block_index = n - 1 - i; // the down block this one mirrors (heads, transformer layers)
            let bv = vb.pp("up_blocks").pp(&i.to_string());
            let num_layers = rlayers[i] + 1;
            let mut layers = Vec::new();
            for j in 0..num_layers {
                let skip = if j == num_layers - 1 { in_ch } else { out_ch };
                let res_in = if j == 0 { prev_out } else { out_ch };
                let resnet = ResnetBlock2D::load(
                    gpu,
                    &bv.pp("resnets").pp(&j.to_string()),
                    res_in + skip,
                    out_ch,
                    Some(temb_dim),
                    groups,
                    eps,
                    dtype,
                )?;
                let transformer = if c.up_has_attention[i] {
                    Some(Transformer2DModel::load(
                        gpu,
                        &bv.pp("attentions").pp(&j.to_string()),
                        spec(out_ch, block_index, ronly[i]),
                        dtype,
                    )?)
                } else {
                    None
                };
                layers.push(Layer {
                    resnet,
                    transformer,
                });
            }
            let upsampler = if i + 1 < n {
                Some(Conv2d::load(
                    gpu,
                    &bv.pp("upsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    1,
                    1,
                    dtype,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { layers, upsampler });
        }

        Ok(UNet2DConditionModel {
            time_linear_1: Linear::load(
                gpu,
                &vb.pp("time_embedding.linear_1"),
                boc[0],
                temb_dim,
                true,
                dtype,
            )?,
            time_linear_2: Linear::load(
                gpu,
                &vb.pp("time_embedding.linear_2"),
                temb_dim,
                temb_dim,
                true,
                dtype,
            )?,
            conv_in: Conv2d::load(
                gpu,
                &vb.pp("conv_in"),
                c.in_channels,
                boc[0],
                3,
                1,
                1,
                dtype,
            )?,
            down_blocks,
            mid_resnet0,
            mid_transformer,
            mid_resnet1,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                gpu,
                &vb.pp("conv_norm_out"),
                groups,
                boc[0],
                eps,
                dtype,
            )?,
            conv_out: Conv2d::load(
                gpu,
                &vb.pp("conv_out"),
                boc[0],
                c.out_channels,
                3,
                1,
                1,
                dtype,
            )?,
            config,
            dtype,
        })
    }

    /// sample: [B, h, w, C_in]; timestep: the scheduler's t (the same for the whole batch, as
    /// diffusers broadcasts it); context: [B, Nc, cross_attention_dim]. Returns [B, h, w, C_out].
    ///
    /// Uploads the timestep (which submits what was recorded before): a denoising loop should
    /// compute its embeddings up front with [`Self::schedule_time_embeddings`] and call
    /// [`Self::forward_with_time_embedding`].
    pub fn forward(
        &self,
        gpu: &Gpu,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
    ) -> Result<Tensor> {
        let temb_silu = self.time_embeddings(gpu, &vec![timestep as f32; sample.dim(0)])?; // [B, 4C0]
        self.forward_with_time_embedding(gpu, sample, &temb_silu, context)
    }

    /// Width of the time embedding the resnets take (4·C0).
    pub fn time_embedding_dim(&self) -> usize {
        4 * self.config.block_out_channels[0]
    }

    /// diffusers' `time_proj` + `time_embedding` (sinusoidal, f32 as diffusers' Timesteps ->
    /// linear -> SiLU -> linear), followed by the SiLU every resnet applies to it first (done
    /// once here, fused into linear_2). One row per timestep: [N] -> [N, 4·C0]. Uploads the
    /// timesteps.
    pub fn time_embeddings(&self, gpu: &Gpu, timesteps: &[f32]) -> Result<Tensor> {
        let c = &self.config;
        let t_emb = elementwise::timestep_embedding(
            gpu,
            timesteps,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
            self.dtype,
        )?; // [N, C0]
        let emb = self
            .time_linear_1
            .forward_fused(gpu, &t_emb, Activation::Silu, None)?; // [N, 4C0]
        self.time_linear_2
            .forward_fused(gpu, &emb, Activation::Silu, None) // [N, 4C0]
    }

    /// The time embeddings of a whole schedule, computed before the denoising loop so that the
    /// loop uploads nothing for them: one upload and three dispatches for all calls at once.
    /// `batch` is the U-Net batch (2B when guided).
    pub fn schedule_time_embeddings(
        &self,
        gpu: &Gpu,
        timesteps: &[f64],
        batch: usize,
    ) -> Result<TimeEmbeddingTable> {
        if timesteps.is_empty() || batch == 0 {
            return Err(Error::InvalidInput(format!(
                "time embeddings for {} timesteps × batch {batch}",
                timesteps.len()
            )));
        }
        let rows: Vec<f32> = timesteps
            .iter()
            .flat_map(|&t| std::iter::repeat_n(t as f32, batch))
            .collect();
        let table = self.time_embeddings(gpu, &rows)?; // [calls·batch, 4C0]
        Ok(TimeEmbeddingTable {
            table,
            calls: timesteps.len(),
            batch,
            dim: self.time_embedding_dim(),
        })
    }

    /// [`Self::forward`] with the time embedding given: `temb_silu` [B, 4·C0] from
    /// [`Self::time_embeddings`] or a [`TimeEmbeddingTable`] row. Records dispatches only (no
    /// upload, no submit).
    pub fn forward_with_time_embedding(
        &self,
        gpu: &Gpu,
        sample: &Tensor,
        temb_silu: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let b = sample.dim(0);
        let m = c.latent_multiple();
        if !sample.dim(1).is_multiple_of(m) || !sample.dim(2).is_multiple_of(m) {
            return Err(Error::InvalidInput(format!(
                "latent size {}×{} must be a multiple of {m} for this U-Net (image sides a multiple of {})",
                sample.dim(2),
                sample.dim(1),
                m * 8
            )));
        }
        if sample.dim(3) != c.in_channels {
            return Err(Error::shape(
                "unet",
                format!(
                    "sample has {} channels, the U-Net takes {}",
                    sample.dim(3),
                    c.in_channels
                ),
            ));
        }
        if context.dim(0) != b || context.dim(2) != c.cross_attention_dim {
            return Err(Error::shape(
                "unet",
                format!(
                    "context {:?} does not fit batch {b} and cross_attention_dim {}",
                    context.shape(),
                    c.cross_attention_dim
                ),
            ));
        }
        if temb_silu.shape() != [b, self.time_embedding_dim()] || temb_silu.dtype() != self.dtype {
            return Err(Error::shape(
                "unet",
                format!(
                    "time embedding {temb_silu:?} should be [{b}, {}] {}",
                    self.time_embedding_dim(),
                    self.dtype.name()
                ),
            ));
        }

        let mut h = self.conv_in.forward(gpu, sample)?; // [B, h, w, C0]
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for layer in &block.layers {
                h = layer.forward(gpu, &h, temb_silu, context)?; // [B, h, w, C]
                skips.push(h.clone());
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(gpu, &h)?; // [B, h/2, w/2, C]
                skips.push(h.clone());
            }
        }
        h = self.mid_resnet0.forward(gpu, &h, Some(temb_silu))?; // [B, h/f, w/f, C_last]
        h = self.mid_transformer.forward(gpu, &h, context)?; // [B, h/f, w/f, C_last]
        h = self.mid_resnet1.forward(gpu, &h, Some(temb_silu))?; // [B, h/f, w/f, C_last]
        for block in &self.up_blocks {
            for layer in &block.layers {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::shape("unet", "ran out of skip connections"))?;
                // ResnetBlock2D on [h, skip] (channels concatenated, as torch.cat(dim=1)).
                h = layer.forward_concat(gpu, &h, &skip, temb_silu, context)?; // [B, h, w, C]
            }
            if let Some(up) = &block.upsampler {
                // Upsample2D: nearest 2× then conv, the upsampling done by the conv's loads.
                h = up.forward_upsampled(gpu, &h)?; // [B, 2h, 2w, C]
            }
        }
        let h = self.conv_norm_out.forward(gpu, &h, true)?; // [B, h, w, C0]
        self.conv_out.forward(gpu, &h) // [B, h, w, C_out]
    }
}
