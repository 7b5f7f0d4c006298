//! diffusers `UNet2DConditionModel` (models/unets/unet_2d_condition.py) for Stable Diffusion 1.x
//! and 2.x configurations, with the down/mid/up blocks of unet_2d_blocks.py
//! (CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D).
//! Activations NHWC: sample [B, h, w, C_in] -> [B, h, w, C_out].

use serde::Deserialize;
use serde_json::Value;

use crate::kernels::matmul::Activation;
use crate::kernels::{conv2d, elementwise};
use crate::models::blocks::{Conditioning, Hoisted, ResnetBlock2D};
use crate::models::config::{
    parse, per_block_or, require_str, size_or, sizes, Number, PerBlock, Size,
};
use crate::models::transformer::{Transformer2DModel, TransformerSpec};
use crate::models::unet_blocks::{
    CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlockConfig, MidBlockConfig, ResnetSettings,
    UNetMidBlock2DCrossAttn, UpBlockConfig,
};
use crate::nn::{Conv2d, GroupNorm, Linear, VarBuilder, WeightSite};
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
    /// SDXL's added conditioning (`addition_embed_type: "text_time"`), when present.
    pub text_time: Option<TextTimeConfig>,
}

/// diffusers' `addition_embed_type: "text_time"` (SDXL): the pooled text embedding and the
/// sinusoidal embeddings of the micro-conditioning ids (`add_time_proj`), concatenated and put
/// through `add_embedding` (a TimestepEmbedding), are added to the time embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextTimeConfig {
    /// `addition_time_embed_dim`: the sinusoidal width of each time id (256 in SDXL).
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim`: the pooled width + ids · time_embed_dim
    /// (1280 + 6 · 256 = 2816 in SDXL base).
    pub input_dim: usize,
}

/// `unet/config.json` as diffusers writes it (the keys we read; others are ignored).
#[derive(Debug, Deserialize)]
struct UNetConfigFile {
    in_channels: Option<Size>,
    out_channels: Option<Size>,
    block_out_channels: Vec<Size>,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    mid_block_type: Option<String>,
    layers_per_block: Option<PerBlock<Size>>,
    transformer_layers_per_block: Option<PerBlock<Size>>,
    num_attention_heads: Option<PerBlock<Size>>,
    attention_head_dim: Option<PerBlock<Size>>,
    cross_attention_dim: Option<PerBlock<Size>>,
    use_linear_projection: Option<bool>,
    only_cross_attention: Option<PerBlock<bool>>,
    dual_cross_attention: Option<bool>,
    flip_sin_to_cos: Option<bool>,
    #[serde(default)]
    freq_shift: Number,
    norm_num_groups: Option<Size>,
    #[serde(default)]
    norm_eps: Number,
    downsample_padding: Option<Size>,
    sample_size: Option<Size>,
    conv_in_kernel: Option<Size>,
    conv_out_kernel: Option<Size>,
    act_fn: Option<String>,
    resnet_time_scale_shift: Option<String>,
    time_embedding_type: Option<String>,
    addition_embed_type: Option<String>,
    addition_time_embed_dim: Option<Size>,
    projection_class_embeddings_input_dim: Option<Size>,
    // Conditioning we do not run yet: any non-null value is refused by name.
    class_embed_type: Option<Value>,
    encoder_hid_dim_type: Option<Value>,
    time_cond_proj_dim: Option<Value>,
}

impl UNetConfigFile {
    fn validate(self) -> Result<UNetConfig> {
        const WHAT: &str = "unet";
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let (Some(dim), Some(input)) = (
                    self.addition_time_embed_dim,
                    self.projection_class_embeddings_input_dim,
                ) else {
                    return Err(Error::Unsupported(
                        "U-Net config: `addition_embed_type` \"text_time\" without \
                         `addition_time_embed_dim` and `projection_class_embeddings_input_dim`"
                            .into(),
                    ));
                };
                if dim.0 == 0 || input.0 == 0 {
                    return Err(Error::config(WHAT, "zero-width text_time embedding"));
                }
                Some(TextTimeConfig {
                    time_embed_dim: dim.0,
                    input_dim: input.0,
                })
            }
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "U-Net config: `addition_embed_type` = \"{other}\" (only SDXL's \"text_time\")"
                )))
            }
        };
        for (key, value) in [
            ("class_embed_type", &self.class_embed_type),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
            ("time_cond_proj_dim", &self.time_cond_proj_dim),
        ] {
            if let Some(v) = value {
                return Err(Error::Unsupported(format!(
                    "U-Net config: `{key}` = {v} (class-, image- or guidance-conditioned U-Nets are not supported yet)"
                )));
            }
        }
        if self.dual_cross_attention == Some(true) {
            return Err(Error::Unsupported(
                "U-Net config: dual_cross_attention".into(),
            ));
        }
        let what = "U-Net config:";
        require_str(
            what,
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift,
            "default",
        )?;
        require_str(
            what,
            "time_embedding_type",
            &self.time_embedding_type,
            "positional",
        )?;
        require_str(what, "act_fn", &self.act_fn, "silu")?;
        require_str(
            what,
            "mid_block_type",
            &self.mid_block_type,
            "UNetMidBlock2DCrossAttn",
        )?;
        if size_or(self.conv_in_kernel, 3) != 3 || size_or(self.conv_out_kernel, 3) != 3 {
            return Err(Error::Unsupported(
                "U-Net config: conv kernels other than 3".into(),
            ));
        }
        let cross_attention_dim = match &self.cross_attention_dim {
            None => 1280,
            Some(PerBlock::All(d)) => d.0,
            Some(PerBlock::Each(_)) => {
                return Err(Error::Unsupported(
                    "U-Net config: per-block cross_attention_dim".into(),
                ))
            }
        };
        let block_out_channels = sizes(&self.block_out_channels);
        let n = block_out_channels.len();
        if n == 0 {
            return Err(Error::config(WHAT, "`block_out_channels` is empty"));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Unsupported(
                "U-Net config: block type lists must have one entry per block_out_channels".into(),
            ));
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
        let down_has_attention = self
            .down_block_types
            .iter()
            .map(|t| kind(t, "DownBlock2D", "CrossAttnDownBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let up_has_attention = self
            .up_block_types
            .iter()
            .map(|t| kind(t, "UpBlock2D", "CrossAttnUpBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        // diffusers keeps a historical naming quirk: `attention_head_dim` is really the number of
        // heads unless `num_attention_heads` is given.
        let heads = match (&self.num_attention_heads, &self.attention_head_dim) {
            (Some(h), _) => h.expand(WHAT, "num_attention_heads", n)?,
            (None, Some(h)) => h.expand(WHAT, "attention_head_dim", n)?,
            (None, None) => vec![Size(8); n],
        };
        let heads = sizes(&heads);
        for (i, (&ch, &h)) in block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || ch % h != 0 {
                return Err(Error::Unsupported(format!(
                    "U-Net config: block {i}: {ch} channels not divisible by {h} heads"
                )));
            }
        }
        let layers = per_block_or(&self.layers_per_block, WHAT, "layers_per_block", n, Size(2))?;
        let transformer_layers = per_block_or(
            &self.transformer_layers_per_block,
            WHAT,
            "transformer_layers_per_block",
            n,
            Size(1),
        )?;
        Ok(UNetConfig {
            in_channels: size_or(self.in_channels, 4),
            out_channels: size_or(self.out_channels, 4),
            down_has_attention,
            up_has_attention,
            layers_per_block: sizes(&layers),
            transformer_layers_per_block: sizes(&transformer_layers),
            num_attention_heads: heads,
            cross_attention_dim,
            use_linear_projection: self.use_linear_projection.unwrap_or(false),
            only_cross_attention: per_block_or(
                &self.only_cross_attention,
                WHAT,
                "only_cross_attention",
                n,
                false,
            )?,
            flip_sin_to_cos: self.flip_sin_to_cos.unwrap_or(true),
            freq_shift: self
                .freq_shift
                .within(WHAT, "freq_shift", 0.0, -16.0..=16.0)? as f32,
            norm_num_groups: size_or(self.norm_num_groups, 32),
            norm_eps: self.norm_eps.within(WHAT, "norm_eps", 1e-5, 1e-12..=1.0)? as f32,
            downsample_padding: size_or(self.downsample_padding, 1),
            sample_size: size_or(self.sample_size, 64),
            block_out_channels,
            text_time,
        })
    }
}

impl UNetConfig {
    /// From `unet/config.json`. Configurations we do not run (class or image embeddings, other
    /// block types) are refused by name.
    ///
    /// `upcast_attention` (SD 2.1) needs nothing here: the attention kernel computes scores,
    /// softmax and the weighted sum in f32 whatever the storage dtype.
    pub fn from_json(v: &Value) -> Result<Self> {
        parse::<UNetConfigFile>("unet", v)?.validate()
    }

    /// Latent sides must be divisible by this (one halving per downsampler).
    pub fn latent_multiple(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// A resnet, optionally followed by a transformer (the Cross-Attn blocks).
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

/// diffusers `UNet2DConditionModel`: time embedding, conv_in, down blocks, mid block, up blocks
/// (each taking the down path's skips in reverse), norm, conv_out.
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub dtype: DType,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// SDXL's `add_embedding` (linear_1, SiLU, linear_2) for the text_time conditioning.
    add_embedding: Option<(Linear, Linear)>,
    conv_in: Conv2d,
    down_blocks: Vec<CrossAttnDownBlock2D>,
    mid_block: UNetMidBlock2DCrossAttn,
    up_blocks: Vec<CrossAttnUpBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// The linear and conv weights a LoRA may change (fused q/k/v as row blocks).
    pub lora_sites: Vec<WeightSite>,
    /// How many resnets and cross-attentions (their slots in an [`ImageConditioning`]).
    resnet_slots: usize,
    kv_slots: usize,
}

/// [`UNet2DConditionModel::prepare_image`]'s result: what every call of one image's denoising
/// loop reads and no call changes.
pub struct ImageConditioning {
    /// silu(temb) of every call, [calls·B, 4C0].
    time: TimeEmbeddingTable,
    /// By resnet slot: time_emb_proj of `time`, [calls·B, Cout].
    time_proj: Vec<Tensor>,
    /// The text context [B, Nc, cross_attention_dim].
    context: Tensor,
    /// By cross-attention slot: K and V of `context`, [B, Nc, 2·inner].
    context_kv: Vec<Tensor>,
}

impl ImageConditioning {
    /// The schedule's time embeddings (SDXL's added embedding included).
    pub fn time_table(&self) -> &TimeEmbeddingTable {
        &self.time
    }
}

impl UNetConfig {
    /// The transformer settings of level `block` (an index into the down-block lists).
    fn transformer_spec(&self, channels: usize, block: usize, only_cross: bool) -> TransformerSpec {
        TransformerSpec {
            channels,
            heads: self.num_attention_heads[block],
            head_dim: channels / self.num_attention_heads[block],
            layers: self.transformer_layers_per_block[block],
            cross_attention_dim: self.cross_attention_dim,
            use_linear_projection: self.use_linear_projection,
            only_cross_attention: only_cross,
            norm_groups: self.norm_num_groups,
        }
    }

    fn resnet_settings(&self) -> ResnetSettings {
        ResnetSettings {
            temb_channels: 4 * self.block_out_channels[0],
            groups: self.norm_num_groups,
            eps: self.norm_eps,
        }
    }

    /// Down block `i`'s config (diffusers `get_down_block`).
    fn down_block(&self, i: usize) -> DownBlockConfig {
        let boc = &self.block_out_channels;
        let out = boc[i];
        DownBlockConfig {
            in_channels: if i == 0 { boc[0] } else { boc[i - 1] },
            out_channels: out,
            num_layers: self.layers_per_block[i],
            resnet: self.resnet_settings(),
            downsample_padding: (i + 1 < boc.len()).then_some(self.downsample_padding),
            transformer: self.down_has_attention[i]
                .then(|| self.transformer_spec(out, i, self.only_cross_attention[i])),
        }
    }

    /// Up block `i`'s config (diffusers `get_up_block` over the reversed_* lists); it mirrors
    /// down block `n - 1 - i` (heads, transformer layers, only_cross_attention).
    fn up_block(&self, i: usize) -> UpBlockConfig {
        let n = self.block_out_channels.len();
        let rboc = |k: usize| self.block_out_channels[n - 1 - k];
        let mirror = n - 1 - i;
        let out = rboc(i);
        UpBlockConfig {
            in_channels: rboc((i + 1).min(n - 1)),
            prev_output_channels: if i == 0 { rboc(0) } else { rboc(i - 1) },
            out_channels: out,
            num_layers: self.layers_per_block[mirror] + 1,
            resnet: self.resnet_settings(),
            add_upsample: i + 1 < n,
            transformer: self.up_has_attention[i]
                .then(|| self.transformer_spec(out, mirror, self.only_cross_attention[mirror])),
        }
    }
}

impl UNet2DConditionModel {
    pub fn load(gpu: &Gpu, vb: &WeightView<'_>, config: UNetConfig, dtype: DType) -> Result<Self> {
        let sites = std::cell::RefCell::new(Vec::new());
        let vb = VarBuilder::new(gpu, vb, dtype).recording_sites(&sites);
        let c = &config;
        let (n, c0) = (c.block_out_channels.len(), c.block_out_channels[0]);
        let last = c.block_out_channels[n - 1];
        let temb_dim = 4 * c0;
        let down_blocks = (0..n)
            .map(|i| {
                CrossAttnDownBlock2D::load(vb.pp("down_blocks").pp(&i.to_string()), c.down_block(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let mid = MidBlockConfig {
            channels: last,
            resnet: c.resnet_settings(),
            transformer: c.transformer_spec(last, n - 1, false),
        };
        let mid_block = UNetMidBlock2DCrossAttn::load(vb.pp("mid_block"), mid)?;
        let up_blocks = (0..n)
            .map(|i| CrossAttnUpBlock2D::load(vb.pp("up_blocks").pp(&i.to_string()), c.up_block(i)))
            .collect::<Result<Vec<_>>>()?;
        let add_embedding = match c.text_time {
            Some(tt) => Some((
                Linear::load(
                    vb.pp("add_embedding.linear_1"),
                    tt.input_dim,
                    temb_dim,
                    true,
                )?,
                Linear::load(vb.pp("add_embedding.linear_2"), temb_dim, temb_dim, true)?,
            )),
            None => None,
        };
        let mut unet = UNet2DConditionModel {
            add_embedding,
            time_linear_1: Linear::load(vb.pp("time_embedding.linear_1"), c0, temb_dim, true)?,
            time_linear_2: Linear::load(
                vb.pp("time_embedding.linear_2"),
                temb_dim,
                temb_dim,
                true,
            )?,
            conv_in: vb.pp("conv_in").conv3x3(c.in_channels, c0)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                vb.pp("conv_norm_out"),
                c.norm_num_groups,
                c0,
                c.norm_eps,
            )?,
            conv_out: vb.pp("conv_out").conv3x3(c0, c.out_channels)?,
            config,
            dtype,
            lora_sites: sites.into_inner(),
            resnet_slots: 0,
            kv_slots: 0,
        };
        unet.assign_slots();
        Ok(unet)
    }

    /// Number every resnet and cross-attention: their rows of an [`ImageConditioning`].
    fn assign_slots(&mut self) {
        let (mut resnets, mut kv) = (0, 0);
        let mut visit =
            |rs: &mut dyn Iterator<Item = &mut ResnetBlock2D>,
             ts: &mut dyn Iterator<Item = &mut Transformer2DModel>| {
                for r in rs {
                    r.slot = resnets;
                    resnets += 1;
                }
                for t in ts {
                    t.assign_kv_slots(&mut kv);
                }
            };
        for b in &mut self.down_blocks {
            let (mut rs, mut ts) = b.layers_mut();
            visit(&mut rs, &mut ts);
        }
        let (mut rs, mut ts) = self.mid_block.layers_mut();
        visit(&mut rs, &mut ts);
        for b in &mut self.up_blocks {
            let (mut rs, mut ts) = b.layers_mut();
            visit(&mut rs, &mut ts);
        }
        self.resnet_slots = resnets;
        self.kv_slots = kv;
    }

    /// Drops the statistics tables of its fused GroupNorms ([`GroupNorm::release_table`]):
    /// they live through a request's denoising loop (so every call binds the same buffers) and
    /// no longer, so a finished or failed request leaves the pool's live bytes as it found
    /// them (tests/faults.rs).
    pub fn release_norm_tables(&self) {
        let (resnets, transformers) = self.layers();
        resnets
            .into_iter()
            .for_each(ResnetBlock2D::release_norm_tables);
        transformers
            .into_iter()
            .for_each(Transformer2DModel::release_norm_tables);
        self.conv_norm_out.release_table();
    }

    /// Recompute what each transformer derives from its weights at load (its folded output
    /// projection): after a LoRA changed those weights, or gave the originals back.
    pub fn refold(&self, gpu: &Gpu) -> Result<()> {
        self.layers().1.into_iter().try_for_each(|t| t.refold(gpu))
    }

    /// Every resnet and transformer, in slot order.
    fn layers(&self) -> (Vec<&ResnetBlock2D>, Vec<&Transformer2DModel>) {
        let (mut resnets, mut transformers) = (Vec::new(), Vec::new());
        for b in &self.down_blocks {
            let (rs, ts) = b.layers();
            resnets.extend(rs);
            transformers.extend(ts);
        }
        let (rs, ts) = self.mid_block.layers();
        resnets.extend(rs);
        transformers.extend(ts);
        for b in &self.up_blocks {
            let (rs, ts) = b.layers();
            resnets.extend(rs);
            transformers.extend(ts);
        }
        (resnets, transformers)
    }

    /// The step-invariant work of a denoising loop, done once per image (issue 21): every
    /// resnet's `time_emb_proj` over the whole schedule's time embeddings (one dispatch per
    /// resnet for all calls, instead of one per resnet per call) and every cross-attention's
    /// K/V projection of the text context (one per cross-attention instead of one per call).
    /// context: [B, Nc, cross_attention_dim], B the table's batch.
    pub fn prepare_image(
        &self,
        gpu: &Gpu,
        time: TimeEmbeddingTable,
        context: &Tensor,
    ) -> Result<ImageConditioning> {
        let c = &self.config;
        if context.dim(0) != time.batch || context.dim(2) != c.cross_attention_dim {
            return Err(Error::shape(
                "unet",
                format!(
                    "context {:?} does not fit batch {} and cross_attention_dim {}",
                    context.shape(),
                    time.batch,
                    c.cross_attention_dim
                ),
            ));
        }
        let (resnets, transformers) = self.layers();
        let mut time_proj = Vec::with_capacity(self.resnet_slots);
        for (slot, r) in resnets.iter().enumerate() {
            debug_assert_eq!(r.slot, slot);
            let proj = r.time_projection(gpu, &time.table)?.ok_or_else(|| {
                Error::shape("unet", format!("resnet {slot} has no time_emb_proj"))
            })?; // [calls·B, Cout]
            time_proj.push(proj);
        }
        let mut kv: Vec<Option<Tensor>> = vec![None; self.kv_slots];
        for t in transformers {
            for (slot, tensor) in t.context_kv(gpu, context)? {
                kv[slot] = Some(tensor); // [B, Nc, 2·inner]
            }
        }
        let context_kv = kv
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::shape("unet", "a cross-attention slot without K/V"))?;
        Ok(ImageConditioning {
            time,
            time_proj,
            context: context.clone(),
            context_kv,
        })
    }

    /// One model call `call` of the schedule `prepared` was made for: no time or context
    /// projection is recorded. sample: [B, h, w, C_in]. Returns [B, h, w, C_out].
    pub fn forward_prepared(
        &self,
        gpu: &Gpu,
        sample: &Tensor,
        prepared: &ImageConditioning,
        call: usize,
    ) -> Result<Tensor> {
        let t = &prepared.time;
        if call >= t.calls || sample.dim(0) != t.batch {
            return Err(Error::shape(
                "unet",
                format!(
                    "call {call} with batch {} of a schedule of {} calls × batch {}",
                    sample.dim(0),
                    t.calls,
                    t.batch
                ),
            ));
        }
        let cond = Conditioning {
            temb_silu: None,
            context: &prepared.context,
            hoisted: Some(Hoisted {
                time_proj: &prepared.time_proj,
                row: call * t.batch,
                context_kv: &prepared.context_kv,
            }),
        };
        self.check_inputs(sample, &prepared.context)?;
        self.forward_conditioned(gpu, sample, &cond)
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

    /// [`Self::forward`] for a U-Net with SDXL's added conditioning: `added` [B, 4·C0] from
    /// [`Self::added_embedding`].
    pub fn forward_added(
        &self,
        gpu: &Gpu,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: &Tensor,
    ) -> Result<Tensor> {
        let timesteps = vec![timestep as f32; sample.dim(0)];
        let temb_silu = self.time_embeddings_with(gpu, &timesteps, Some(added))?; // [B, 4C0]
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
        self.time_embeddings_with(gpu, timesteps, None)
    }

    /// [`Self::time_embeddings`] with SDXL's added embedding (from [`Self::added_embedding`],
    /// [`rows`, 4·C0]) added before the SiLU, as diffusers adds `aug_emb` to `emb`: row `r` of the
    /// result takes row `r mod rows` of `added` (the rows of one call's batch repeat per call).
    pub fn time_embeddings_with(
        &self,
        gpu: &Gpu,
        timesteps: &[f32],
        added: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        if self.config.text_time.is_some() && added.is_none() {
            return Err(Error::InvalidInput(
                "this U-Net (text_time) needs its added conditioning: pooled text embeddings \
                         and time ids"
                    .into(),
            ));
        }
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
        let Some(added) = added else {
            return self
                .time_linear_2
                .forward_fused(gpu, &emb, Activation::Silu, None); // [N, 4C0]
        };
        let (n, rows, dim) = (timesteps.len(), added.dim(0), self.time_embedding_dim());
        if added.shape() != [rows, dim] || rows == 0 || !n.is_multiple_of(rows) {
            return Err(Error::shape(
                "unet added embedding",
                format!("{added:?} for {n} timestep rows of width {dim}"),
            ));
        }
        // The added rows repeated over the calls: [N, 4C0] (N / rows copies, one dispatch each).
        let repeated = gpu.empty(&[n, dim], self.dtype)?;
        let bytes = added.size_bytes();
        for k in 0..n / rows {
            gpu.copy_bytes(added, 0, &repeated, k as u64 * bytes, bytes)?;
        }
        let sum = self
            .time_linear_2
            .forward_fused(gpu, &emb, Activation::None, Some(&repeated))?; // [N, 4C0]: emb + aug_emb
        elementwise::silu(gpu, &sum) // [N, 4C0]
    }

    /// SDXL's `aug_emb` (diffusers' `get_aug_embed` for "text_time"): `add_time_proj` of every
    /// time id (sinusoidal, `addition_time_embed_dim` wide, f32), one row per batch row,
    /// concatenated after the pooled `text_embeds` [B, P] and put through `add_embedding`
    /// (linear_1, SiLU, linear_2). `time_ids`: [B, ids] row-major (6 ids per row in SDXL:
    /// original size, crop top-left, target size, each (height, width)). Returns [B, 4·C0].
    pub fn added_embedding(
        &self,
        gpu: &Gpu,
        text_embeds: &Tensor,
        time_ids: &[f32],
    ) -> Result<Tensor> {
        let c = &self.config;
        let (Some(tt), Some((linear_1, linear_2))) = (c.text_time, &self.add_embedding) else {
            return Err(Error::InvalidInput(
                "this U-Net takes no added (text_time) conditioning".into(),
            ));
        };
        let b = text_embeds.dim(0);
        let ids_per_row = time_ids.len() / b.max(1);
        let want = tt.input_dim;
        if text_embeds.shape().len() != 2
            || time_ids.len() != b * ids_per_row
            || text_embeds.dim(1) + ids_per_row * tt.time_embed_dim != want
        {
            return Err(Error::shape(
                "unet added embedding",
                format!(
                    "text_embeds {text_embeds:?} and {} time ids do not make the {want} inputs of \
                     add_embedding ({} per id)",
                    time_ids.len(),
                    tt.time_embed_dim
                ),
            ));
        }
        let time_embeds = elementwise::timestep_embedding(
            gpu,
            time_ids,
            tt.time_embed_dim,
            c.flip_sin_to_cos,
            c.freq_shift,
            self.dtype,
        )?; // [B·ids, D], read as [B, ids·D]
        let time_embeds = time_embeds.reshape(&[b, ids_per_row * tt.time_embed_dim])?; // [B, ids·D]
        let text_embeds = if text_embeds.dtype() == self.dtype {
            text_embeds.clone()
        } else {
            elementwise::cast(gpu, text_embeds, self.dtype)? // [B, P]
        };
        let add_embeds = elementwise::concat_channels(gpu, &text_embeds, &time_embeds)?; // [B, P + ids·D]
        let h = linear_1.forward_fused(gpu, &add_embeds, Activation::Silu, None)?; // [B, 4C0]
        linear_2.forward(gpu, &h) // [B, 4C0]
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
        self.schedule_time_embeddings_with(gpu, timesteps, batch, None)
    }

    /// [`Self::schedule_time_embeddings`] with SDXL's added embedding ([batch, 4·C0] from
    /// [`Self::added_embedding`]: rows differ where the uncond and cond rows' pooled embeddings
    /// do) added to every call's rows.
    pub fn schedule_time_embeddings_with(
        &self,
        gpu: &Gpu,
        timesteps: &[f64],
        batch: usize,
        added: Option<&Tensor>,
    ) -> Result<TimeEmbeddingTable> {
        if let Some(a) = added {
            if a.dim(0) != batch {
                return Err(Error::shape(
                    "time embedding",
                    format!("added embedding {a:?} for batch {batch}"),
                ));
            }
        }
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
        let table = self.time_embeddings_with(gpu, &rows, added)?; // [calls·batch, 4C0]
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
        self.check_inputs(sample, context)?;
        let b = sample.dim(0);
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
        let cond = Conditioning {
            temb_silu: Some(temb_silu),
            context,
            hoisted: None,
        };
        self.forward_conditioned(gpu, sample, &cond)
    }

    /// The shape checks every entry point makes: sample [B, h, w, C_in] with h, w multiples of
    /// the down-sampling factor, context [B, Nc, cross_attention_dim].
    fn check_inputs(&self, sample: &Tensor, context: &Tensor) -> Result<()> {
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
        Ok(())
    }

    /// Per down block, the GroupNorm that reads the skip of its last layer where a downsampler
    /// follows (so no down-path norm does): the decoder resnet that pops that skip reads it as
    /// the second part of its [h ; skip] ([`CrossAttnUpBlock2D::skip_readers`]). Skips are
    /// pushed in order (conv_in's, then each down block's) and popped in reverse.
    fn down_skip_readers(&self) -> Vec<Option<&GroupNorm>> {
        let readers: Vec<Option<&GroupNorm>> = self
            .up_blocks
            .iter()
            .flat_map(|b| b.skip_readers())
            .collect();
        let total = 1 + self
            .down_blocks
            .iter()
            .map(|b| b.skip_count())
            .sum::<usize>();
        // Skip i (push order) is popped by the decoder resnet total - 1 - i.
        let reader = |i: usize| readers.get(total.checked_sub(i + 1)?).copied().flatten();
        let mut pushed = 1; // conv_in's
        self.down_blocks
            .iter()
            .map(|block| {
                pushed += block.skip_count();
                // The skip before the downsampled output (the last one pushed).
                reader(pushed.checked_sub(2)?)
            })
            .collect()
    }

    fn forward_conditioned(
        &self,
        gpu: &Gpu,
        sample: &Tensor,
        cond: &Conditioning<'_>,
    ) -> Result<Tensor> {
        // Each layer leaves its output's GroupNorm statistics (per-tile pieces) for the norm
        // that reads it: no statistics dispatch there. A skip's pieces travel with it to the
        // decoder resnet whose [h ; skip] norm merges them with h's.
        let first_norm = self
            .down_blocks
            .first()
            .map_or(self.mid_block.input_norm(), |b| b.input_norm());
        let sample = conv2d::Input::Plain(sample);
        let mut h = self.conv_in.forward_producing(gpu, sample, first_norm)?; // [B, h, w, C0]
        let mut skips = vec![h.clone()];
        let skip_readers = self.down_skip_readers();
        for (i, block) in self.down_blocks.iter().enumerate() {
            let next = match self.down_blocks.get(i + 1) {
                Some(b) => b.input_norm(),
                None => self.mid_block.input_norm(),
            };
            let readers = (next, skip_readers[i]);
            h = block.forward(gpu, h, cond, &mut skips, readers)?; // [B, h/2, w/2, C]
        }
        let up_norm = |i: usize| match self.up_blocks.get(i) {
            Some(b) => b.input_norm(),
            None => Some(&self.conv_norm_out).filter(|n| n.merges_pieces()),
        };
        let mut x = self.mid_block.forward(gpu, h, cond, up_norm(0))?; // [B, h/f, w/f, C_last]
        for (i, block) in self.up_blocks.iter().enumerate() {
            x = block.forward(gpu, x, cond, &mut skips, up_norm(i + 1))?; // [B, 2h, 2w, C]
        }
        // conv_out(silu(conv_norm_out(h))), the norm applied in the conv's loads.
        let (x, x_stats) = x;
        let conv_out = self.conv_out.on(conv2d::Input::Plain(&x));
        let (out, _) = self.conv_norm_out.into_conv_linked(
            gpu,
            conv_out,
            true,
            [x_stats.as_ref(), None],
            None,
        )?;
        Ok(out) // [B, h, w, C_out]
    }
}
