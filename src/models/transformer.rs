//! diffusers `Transformer2DModel` as Stable Diffusion uses it (models/transformers/
//! transformer_2d.py, attention.py `BasicTransformerBlock`, attention_processor.py `Attention`):
//! group norm, proj_in, blocks of self-attention / cross-attention / GEGLU feed-forward, proj_out
//! with the residual. On NHWC activations the 1×1-conv projections of SD 1.x and the linear ones
//! of SD 2.x (`use_linear_projection`) are the same matmul over channels, and no permute is needed.

use crate::kernels::attention::HeadsView;
use crate::kernels::conv2d::{Conv, GroupPartials, Input};
use crate::kernels::elementwise;
use crate::kernels::matmul::{self, Activation};
use crate::models::blocks::Conditioning;
use crate::nn::{self, AttentionShape, GroupNorm, LayerNorm, Linear, VarBuilder};
use crate::{Error, Gpu, Result, Tensor};

/// Settings shared by every transformer of a U-Net block.
#[derive(Clone, Copy, Debug)]
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub norm_groups: usize,
}

/// Column block `index` (of width `width`) of a packed [B, N, k·width] projection, read by the
/// attention kernel in place: q, k and v of a fused projection need no split.
fn packed(tensor: &Tensor, width: usize, index: usize) -> HeadsView<'_> {
    HeadsView {
        tensor,
        tokens: tensor.dim(1),
        row_stride: tensor.dim(2),
        offset: index * width,
    }
}

/// [`Attention`]'s constructor arguments.
#[derive(Clone, Copy, Debug)]
struct AttentionConfig {
    /// Width of the hidden states (heads·head_dim in Stable Diffusion).
    query_dim: usize,
    /// Some(width of the context): k and v are read from the context (cross-attention).
    cross_attention_dim: Option<usize>,
    heads: usize,
    head_dim: usize,
}

/// diffusers `Attention` (attention_processor.py, `AttnProcessor2_0`, no bias on q/k/v):
/// out = to_out(softmax(q·kᵀ/√d)·v) + residual, the residual added in to_out's epilogue.
struct Attention {
    /// Self-attention: to_q, to_k, to_v fused ([3·inner, query_dim]); cross-attention: to_q.
    to_q_or_qkv: Linear,
    /// Cross-attention: to_k and to_v fused ([2·inner, cross_attention_dim]).
    to_kv: Option<Linear>,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    /// Cross-attention: index of its K/V in [`crate::models::blocks::Hoisted::context_kv`].
    kv_slot: usize,
}

impl Attention {
    fn load(vb: VarBuilder<'_>, cfg: AttentionConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let (to_q_or_qkv, to_kv) = match cfg.cross_attention_dim {
            Some(ctx) => (
                Linear::load(vb.pp("to_q"), cfg.query_dim, inner, false)?,
                Some(Linear::load_fused(
                    vb.clone(),
                    &["to_k", "to_v"],
                    ctx,
                    &[inner, inner],
                    false,
                )?),
            ),
            None => (
                Linear::load_fused(
                    vb.clone(),
                    &["to_q", "to_k", "to_v"],
                    cfg.query_dim,
                    &[inner; 3],
                    false,
                )?,
                None,
            ),
        };
        Ok(Attention {
            to_q_or_qkv,
            to_kv,
            to_out: Linear::load(vb.pp("to_out.0"), inner, cfg.query_dim, true)?,
            heads: cfg.heads,
            head_dim: cfg.head_dim,
            kv_slot: 0,
        })
    }

    /// hidden: [B, N, query_dim], pre-normed by `norm` inside the Q (or QKV) projection's loads;
    /// cond's context [B, Nc, cross_attention_dim] is read only by cross-attention, whose K/V
    /// come from the hoisted table where there is one. Returns to_out(attention) + hidden,
    /// [B, N, query_dim].
    fn forward(
        &self,
        gpu: &Gpu,
        norm: &LayerNorm,
        hidden: &Tensor,
        cond: &Conditioning<'_>,
    ) -> Result<Tensor> {
        let x = hidden;
        let project = |proj: &Linear| proj.forward_normed(gpu, norm, x, Activation::None, None);
        let inner = self.heads * self.head_dim;
        let shape = AttentionShape {
            batch: x.dim(0),
            heads: self.heads,
            head_dim: self.head_dim,
            causal: false,
        };
        let attn = match &self.to_kv {
            Some(kv_proj) => {
                let q = project(&self.to_q_or_qkv)?; // [B, N, inner]
                let projected;
                let kv = match &cond.hoisted {
                    Some(h) => h.context_kv.get(self.kv_slot).ok_or_else(|| {
                        Error::shape(
                            "attention",
                            format!("no context K/V for slot {}", self.kv_slot),
                        )
                    })?,
                    None => {
                        projected = kv_proj.forward(gpu, cond.context)?; // [B, Nc, 2·inner]
                        &projected
                    }
                };
                let (k, v) = (packed(kv, inner, 0), packed(kv, inner, 1));
                nn::multi_head_attention(gpu, packed(&q, inner, 0), k, v, shape)?
                // [B, N, inner]
            }
            None => {
                let qkv = project(&self.to_q_or_qkv)?; // [B, N, 3·inner]
                let (q, k, v) = (
                    packed(&qkv, inner, 0),
                    packed(&qkv, inner, 1),
                    packed(&qkv, inner, 2),
                );
                nn::multi_head_attention(gpu, q, k, v, shape)? // [B, N, inner]
            }
        };
        // [B, N, query_dim]
        self.to_out
            .forward_fused(gpu, &attn, Activation::None, Some(hidden))
    }
}

/// diffusers `BasicTransformerBlock` (norm_type "layer_norm", activation "geglu"):
/// self-attention (context attention with only_cross_attention), cross-attention on the text
/// context, GEGLU feed-forward; each pre-normed, each with a residual.
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    /// ff.net.0 (GEGLU): [8·inner, inner], hidden and gate halves.
    ff_geglu: Linear,
    ff_out: Linear,
}

impl BasicTransformerBlock {
    fn load(vb: VarBuilder<'_>, spec: &TransformerSpec) -> Result<Self> {
        let inner = spec.heads * spec.head_dim;
        let attention = |cross: bool| AttentionConfig {
            query_dim: inner,
            cross_attention_dim: cross.then_some(spec.cross_attention_dim),
            heads: spec.heads,
            head_dim: spec.head_dim,
        };
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(vb.pp("norm1"), inner, 1e-5)?,
            attn1: Attention::load(vb.pp("attn1"), attention(spec.only_cross_attention))?,
            norm2: LayerNorm::load(vb.pp("norm2"), inner, 1e-5)?,
            attn2: Attention::load(vb.pp("attn2"), attention(true))?,
            norm3: LayerNorm::load(vb.pp("norm3"), inner, 1e-5)?,
            ff_geglu: Linear::load(vb.pp("ff.net.0.proj"), inner, 8 * inner, true)?,
            ff_out: Linear::load(vb.pp("ff.net.2"), 4 * inner, inner, true)?,
        })
    }

    /// hidden: [B, HW, inner]; context: [B, Nc, context_dim]. Returns [B, HW, inner].
    fn forward(&self, gpu: &Gpu, hidden: Tensor, cond: &Conditioning<'_>) -> Result<Tensor> {
        let (hidden, mid) = self.forward_to_ff_hidden(gpu, hidden, cond)?;
        self.ff_out
            .forward_fused(gpu, &mid, Activation::None, Some(&hidden)) // [B, HW, inner]
    }

    /// Everything but the last projection: (h, g) with the block's output = h + ff_out(g),
    /// h [B, HW, inner] (after both attentions), g [B, HW, 4·inner] (the GEGLU's output).
    fn forward_to_ff_hidden(
        &self,
        gpu: &Gpu,
        mut hidden: Tensor,
        cond: &Conditioning<'_>,
    ) -> Result<(Tensor, Tensor)> {
        // Each LayerNorm is applied by the next projection as it loads `hidden` (no normalised
        // tensor, no norm dispatch). Self-attention (or context attention when
        // only_cross_attention), then cross-attention on the text context:
        hidden = self.attn1.forward(gpu, &self.norm1, &hidden, cond)?; // [B, HW, inner]
        hidden = self.attn2.forward(gpu, &self.norm2, &hidden, cond)?; // [B, HW, inner]

        // GEGLU feed-forward's first half: [B, HW, inner] -> [B, HW, 4·inner].
        let mid = self
            .ff_geglu
            .forward_geglu_normed(gpu, &self.norm3, &hidden)?;
        Ok((hidden, mid))
    }
}

/// diffusers `Transformer2DModel` (continuous input): group norm, proj_in, the blocks, proj_out
/// plus the input as residual.
pub struct Transformer2DModel {
    spec: TransformerSpec,
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
    /// The last block's ff_out and proj_out as one projection ([`FoldedOutput`]).
    folded_out: FoldedOutput,
}

/// The transformer's last two projections, `ff_out` (ff.net.2) of its last block and
/// `proj_out`, multiplied into one: with h the hidden state after the attentions and g the
/// GEGLU's output, the transformer's output is
///
/// ```text
/// x + proj_out(h + ff_out(g)) = x + [W_po | W_po·W_ff] · [h ; g] + (b_po + W_po·b_ff)
/// ```
///
/// — linear maps with nothing between them compose — which is one 1×1 convolution over the
/// channel concatenation of h and g (the conv reads the two tensors in place, as it reads the
/// U-Net decoder's skip concatenation). Same FLOPs as the two projections (M·5C·C), one dispatch
/// instead of two, and the block's output h + ff_out(g) is never written and read back (issue 21,
/// item 4: −1 dispatch per transformer, 16 per SD 1.5 step). Numerics: W_po·W_ff is accumulated
/// in f32 and rounded once to the weight dtype, where the reference rounds h + ff_out(g) to the
/// activation dtype instead; the diffusers parity tests hold it to their tolerances.
///
/// The product is made on the GPU with our matmul at load, and again whenever a LoRA changes
/// `ff_out` or `proj_out` ([`Transformer2DModel::refold`]): those two keep their own buffers,
/// which are the LoRA sites.
struct FoldedOutput {
    /// [C, 1, 1, inner + 4·inner]: the conv weight, `W_po` then `W_po·W_ff` along Cin.
    weight: Tensor,
    /// [C]: b_po + W_po·b_ff.
    bias: Tensor,
}

impl FoldedOutput {
    fn new(gpu: &Gpu, proj_out: &Linear, ff_out: &Linear) -> Result<Self> {
        let (c, inner) = (proj_out.weight.dim(0), proj_out.weight.dim(1));
        let dtype = proj_out.weight.dtype();
        let folded = FoldedOutput {
            weight: gpu.empty(&[c, 1, 1, 5 * inner], dtype)?,
            bias: gpu.empty(&[c], dtype)?,
        };
        folded.compute(gpu, proj_out, ff_out)?;
        Ok(folded)
    }

    /// (Re)compute the product from the current `proj_out` and `ff_out` weights.
    fn compute(&self, gpu: &Gpu, proj_out: &Linear, ff_out: &Linear) -> Result<()> {
        let (c, inner) = (proj_out.weight.dim(0), proj_out.weight.dim(1));
        let missing = |what: &str| Error::shape("transformer", format!("{what} has no bias"));
        let b_po = proj_out.bias.as_ref().ok_or_else(|| missing("proj_out"))?;
        let b_ff = ff_out.bias.as_ref().ok_or_else(|| missing("ff.net.2"))?;
        // W_ff [inner, 4·inner] transposed to [4·inner, inner] (the NHWC -> NCHW permutation of
        // [1, inner, 1, 4·inner]), so that linear(W_po, W_ffᵀ) = W_po·W_ff [C, 4·inner].
        let w_ff_t = gpu.empty(&[1, 4 * inner, inner, 1], ff_out.weight.dtype())?;
        elementwise::nhwc_to_nchw_into(
            gpu,
            &ff_out.weight.reshape(&[1, inner, 1, 4 * inner])?,
            &w_ff_t,
        )?;
        let product = matmul::linear(
            gpu,
            &proj_out.weight,
            &w_ff_t.reshape(&[4 * inner, inner])?,
            None,
            None,
            Activation::None,
        )?; // [C, 4·inner]
        elementwise::concat_channels_into(
            gpu,
            &proj_out.weight,
            &product,
            &self.weight.reshape(&[c, 5 * inner])?,
        )?;
        let bias = self.bias.reshape(&[1, c])?;
        let b_ff = b_ff.reshape(&[1, inner])?;
        matmul::linear_into(
            gpu,
            &b_ff,
            &proj_out.weight,
            Some(b_po),
            None,
            Activation::None,
            &bias,
        )
    }
}

/// proj_in / proj_out: a Linear [out, in], or a 1×1 Conv2d [out, in, 1, 1] read as one.
fn load_projection(vb: VarBuilder<'_>, c_in: usize, c_out: usize, linear: bool) -> Result<Linear> {
    if linear {
        return Linear::load(vb, c_in, c_out, true);
    }
    let w = vb.view().get("weight", &[c_out, c_in, 1, 1])?;
    let weight = vb.upload(&w.to_f32_vec(), &[c_out, c_in])?;
    // A 1×1 conv's LoRA is a 1×1 conv too: the site keeps the checkpoint's 4-D shape.
    vb.record_site("weight", &weight, 0, &[c_out, c_in, 1, 1]);
    let bias = vb.get("bias", &[c_out])?;
    Ok(Linear {
        weight,
        bias: Some(bias),
    })
}

impl Transformer2DModel {
    /// Drops the statistics table its fused norm keeps ([`GroupNorm::release_table`]).
    pub fn release_norm_tables(&self) {
        self.norm.release_table();
    }

    pub fn load(vb: VarBuilder<'_>, spec: TransformerSpec) -> Result<Self> {
        let (c, inner) = (spec.channels, spec.heads * spec.head_dim);
        let blocks_vb = vb.pp("transformer_blocks");
        let blocks = (0..spec.layers)
            .map(|i| BasicTransformerBlock::load(blocks_vb.pp(&i.to_string()), &spec))
            .collect::<Result<Vec<_>>>()?;
        let linear = spec.use_linear_projection;
        let proj_out = load_projection(vb.pp("proj_out"), inner, c, linear)?;
        let last = blocks
            .last()
            .ok_or_else(|| Error::Unsupported("a transformer with no layers".into()))?;
        let folded_out = FoldedOutput::new(vb.gpu(), &proj_out, &last.ff_out)?;
        Ok(Transformer2DModel {
            spec,
            // Transformer2DModel's group norm uses eps 1e-6 whatever the U-Net's norm_eps.
            norm: GroupNorm::load(vb.pp("norm"), spec.norm_groups, c, 1e-6)?,
            proj_in: load_projection(vb.pp("proj_in"), c, inner, linear)?,
            blocks,
            proj_out,
            folded_out,
        })
    }

    /// Recompute the folded output projection ([`FoldedOutput`]) from the current ff_out and
    /// proj_out weights: after a LoRA changed (or restored) them.
    pub fn refold(&self, gpu: &Gpu) -> Result<()> {
        let last = self.blocks.last().expect("checked at load");
        self.folded_out.compute(gpu, &self.proj_out, &last.ff_out)
    }

    /// Give each cross-attention the next K/V slot (`next` counts them over the U-Net).
    pub(crate) fn assign_kv_slots(&mut self, next: &mut usize) {
        for blk in &mut self.blocks {
            for attn in [&mut blk.attn1, &mut blk.attn2] {
                if attn.to_kv.is_some() {
                    attn.kv_slot = *next;
                    *next += 1;
                }
            }
        }
    }

    /// K and V of `context` [B, Nc, context_dim] for each cross-attention, as (slot,
    /// [B, Nc, 2·inner]): step-invariant, so computed once per image.
    pub(crate) fn context_kv(&self, gpu: &Gpu, context: &Tensor) -> Result<Vec<(usize, Tensor)>> {
        let mut out = Vec::new();
        for blk in &self.blocks {
            for attn in [&blk.attn1, &blk.attn2] {
                if let Some(kv_proj) = &attn.to_kv {
                    out.push((attn.kv_slot, kv_proj.forward(gpu, context)?)); // [B, Nc, 2·inner]
                }
            }
        }
        Ok(out)
    }

    /// proj_in(norm(x)), x [B, H, W, C] -> [B, HW, inner]. SD 1.x's proj_in is a 1×1 conv
    /// (its [inner, C] weight is the conv's [inner, 1, 1, C]): it runs as one, with the norm
    /// applied in its loads (one statistics dispatch, no normalised tensor). A linear
    /// proj_in (SD 2.x, SDXL: `use_linear_projection`) runs on the matmul kernels, which take no
    /// fused norm: there the norm keeps its own pass.
    /// `x_stats`: the norm's statistics as x's producer left them, if it did.
    fn norm_proj_in(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        x_stats: Option<&GroupPartials>,
    ) -> Result<Tensor> {
        let s = &self.spec;
        let (b, h, w) = (x.dim(0), x.dim(1), x.dim(2));
        let inner = s.heads * s.head_dim;
        if s.use_linear_projection {
            let tokens = x.reshape(&[b, h * w, s.channels])?; // [B, HW, C]
            let normed = self.norm.forward(gpu, &tokens, false)?; // [B, HW, C]
            return self.proj_in.forward(gpu, &normed); // [B, HW, inner]
        }
        let weight = self.proj_in.weight.reshape(&[inner, 1, 1, s.channels])?; // [inner, 1, 1, C]
        let conv = Conv {
            input: Input::Plain(x),
            weight: &weight,
            bias: self.proj_in.bias.as_ref(),
            bias_rows: None,
            residual: None,
            norm: None,
            shortcut: None,
            stride: 1,
            pads: [0; 4],
            variant: None,
        };
        let (out, _) = self
            .norm
            .into_conv_linked(gpu, conv, false, [x_stats, None], None)?; // [B, H, W, inner]
        out.reshape(&[b, h * w, inner]) // [B, HW, inner]
    }

    /// x: [B, H, W, C]; cond: the context (or its hoisted K/V). Returns [B, H, W, C].
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, cond: &Conditioning<'_>) -> Result<Tensor> {
        Ok(self.forward_linked(gpu, x, None, cond, None)?.0)
    }

    /// The GroupNorm that reads this model's input, where a producer can leave it pieces: the
    /// 1×1-conv proj_in's (SD 1.x); a linear proj_in's norm keeps its own pass.
    pub fn input_norm(&self) -> Option<&GroupNorm> {
        (!self.spec.use_linear_projection && self.norm.merges_pieces()).then_some(&self.norm)
    }

    /// [`Transformer2DModel::forward`] linked to its neighbours: the norm's statistics from
    /// `x_stats` (what x's producer left for [`Transformer2DModel::input_norm`]) where given,
    /// and the output's statistics left for `next` (the GroupNorm that reads it) where given.
    pub fn forward_linked(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        x_stats: Option<&GroupPartials>,
        cond: &Conditioning<'_>,
        next: Option<&GroupNorm>,
    ) -> Result<(Tensor, Option<GroupPartials>)> {
        let s = &self.spec;
        let (b, h, w) = (x.dim(0), x.dim(1), x.dim(2));
        let mut hidden = self.norm_proj_in(gpu, x, x_stats)?; // [B, HW, inner]
        let (last, rest) = self.blocks.split_last().expect("checked at load");
        for blk in rest {
            hidden = blk.forward(gpu, hidden, cond)?; // [B, HW, inner]
        }
        // The last block's ff_out and proj_out, folded into one 1×1 conv over [h ; g].
        let (hidden, mid) = last.forward_to_ff_hidden(gpu, hidden, cond)?;
        let inner = s.heads * s.head_dim;
        let (h_nhwc, g_nhwc) = (
            hidden.reshape(&[b, h, w, inner])?,  // [B, H, W, inner]
            mid.reshape(&[b, h, w, 4 * inner])?, // [B, H, W, 4·inner]
        );
        let proj_out = Conv {
            input: Input::Concat(&h_nhwc, &g_nhwc),
            weight: &self.folded_out.weight,
            bias: Some(&self.folded_out.bias),
            bias_rows: None,
            residual: Some(x),
            norm: None,
            shortcut: None,
            stride: 1,
            pads: [0; 4],
            variant: None,
        };
        match next {
            Some(next) => next.produce(gpu, proj_out), // [B, H, W, C]
            None => Ok((proj_out.run(gpu)?, None)),
        }
    }
}
