//! diffusers `Transformer2DModel` as Stable Diffusion uses it (models/transformers/
//! transformer_2d.py, attention.py `BasicTransformerBlock`, attention_processor.py `Attention`):
//! group norm, proj_in, blocks of self-attention / cross-attention / GEGLU feed-forward, proj_out
//! with the residual. On NHWC activations the 1×1-conv projections of SD 1.x and the linear ones
//! of SD 2.x (`use_linear_projection`) are the same matmul over channels, and no permute is needed.

use crate::kernels::attention::HeadsView;
use crate::kernels::matmul::Activation;
use crate::nn::{self, GroupNorm, LayerNorm, Linear};
use crate::weights::WeightView;
use crate::{DType, Gpu, Result, Tensor};

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

/// diffusers `BasicTransformerBlock` (norm_type "layer_norm", activation "geglu").
struct BasicTransformerBlock {
    norm1: LayerNorm,
    /// Self-attention: to_q, to_k, to_v fused ([3C, C], no bias). With only_cross_attention,
    /// attn1 attends to the context instead: q alone, k/v from the context.
    attn1_q_or_qkv: Linear,
    attn1_kv: Option<Linear>,
    attn1_out: Linear,
    norm2: LayerNorm,
    attn2_q: Linear,
    /// to_k and to_v of the cross-attention fused ([2C, context_dim]).
    attn2_kv: Linear,
    attn2_out: Linear,
    norm3: LayerNorm,
    ff_geglu: Linear,
    ff_out: Linear,
}

pub struct Transformer2DModel {
    spec: TransformerSpec,
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

/// proj_in / proj_out: a Linear [out, in], or a 1×1 Conv2d [out, in, 1, 1] read as one.
fn load_projection(
    gpu: &Gpu,
    vb: &WeightView<'_>,
    c_in: usize,
    c_out: usize,
    linear: bool,
    dtype: DType,
) -> Result<Linear> {
    if linear {
        return Linear::load(gpu, vb, c_in, c_out, true, dtype);
    }
    let w = vb.get("weight", &[c_out, c_in, 1, 1])?;
    let weight = gpu.upload(&w.to_f32_vec(), &[c_out, c_in], dtype)?;
    let bias = nn::load(gpu, vb, "bias", &[c_out], dtype)?;
    Ok(Linear {
        weight,
        bias: Some(bias),
    })
}

impl Transformer2DModel {
    pub fn load(
        gpu: &Gpu,
        vb: &WeightView<'_>,
        spec: TransformerSpec,
        dtype: DType,
    ) -> Result<Self> {
        let c = spec.channels;
        let inner = spec.heads * spec.head_dim;
        let ctx = spec.cross_attention_dim;
        let mut blocks = Vec::with_capacity(spec.layers);
        for i in 0..spec.layers {
            let bv = vb.pp("transformer_blocks").pp(&i.to_string());
            let a1 = bv.pp("attn1");
            let a2 = bv.pp("attn2");
            let (attn1_q_or_qkv, attn1_kv) = if spec.only_cross_attention {
                (
                    Linear::load(gpu, &a1.pp("to_q"), inner, inner, false, dtype)?,
                    Some(Linear::load_fused(
                        gpu,
                        &[a1.pp("to_k"), a1.pp("to_v")],
                        ctx,
                        &[inner, inner],
                        false,
                        dtype,
                    )?),
                )
            } else {
                (
                    Linear::load_fused(
                        gpu,
                        &[a1.pp("to_q"), a1.pp("to_k"), a1.pp("to_v")],
                        inner,
                        &[inner; 3],
                        false,
                        dtype,
                    )?,
                    None,
                )
            };
            blocks.push(BasicTransformerBlock {
                norm1: LayerNorm::load(gpu, &bv.pp("norm1"), inner, 1e-5, dtype)?,
                attn1_q_or_qkv,
                attn1_kv,
                attn1_out: Linear::load(gpu, &a1.pp("to_out.0"), inner, inner, true, dtype)?,
                norm2: LayerNorm::load(gpu, &bv.pp("norm2"), inner, 1e-5, dtype)?,
                attn2_q: Linear::load(gpu, &a2.pp("to_q"), inner, inner, false, dtype)?,
                attn2_kv: Linear::load_fused(
                    gpu,
                    &[a2.pp("to_k"), a2.pp("to_v")],
                    ctx,
                    &[inner, inner],
                    false,
                    dtype,
                )?,
                attn2_out: Linear::load(gpu, &a2.pp("to_out.0"), inner, inner, true, dtype)?,
                norm3: LayerNorm::load(gpu, &bv.pp("norm3"), inner, 1e-5, dtype)?,
                ff_geglu: Linear::load(
                    gpu,
                    &bv.pp("ff.net.0.proj"),
                    inner,
                    8 * inner,
                    true,
                    dtype,
                )?,
                ff_out: Linear::load(gpu, &bv.pp("ff.net.2"), 4 * inner, inner, true, dtype)?,
            });
        }
        Ok(Transformer2DModel {
            spec,
            // Transformer2DModel's group norm uses eps 1e-6 whatever the U-Net's norm_eps.
            norm: GroupNorm::load(gpu, &vb.pp("norm"), spec.norm_groups, c, 1e-6, dtype)?,
            proj_in: load_projection(
                gpu,
                &vb.pp("proj_in"),
                c,
                inner,
                spec.use_linear_projection,
                dtype,
            )?,
            blocks,
            proj_out: load_projection(
                gpu,
                &vb.pp("proj_out"),
                inner,
                c,
                spec.use_linear_projection,
                dtype,
            )?,
        })
    }

    /// x: [B, H, W, C]; context: [B, Nc, context_dim]. Returns [B, H, W, C].
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        let (b, h, w) = (x.dim(0), x.dim(1), x.dim(2));
        let n = h * w;
        let inner = s.heads * s.head_dim;
        let nc = context.dim(1);
        let residual = x.reshape(&[b, n, s.channels])?; // [B, HW, C]
        let normed = self.norm.forward(gpu, &residual, false)?; // [B, HW, C]
        let mut hidden = self.proj_in.forward(gpu, &normed)?; // [B, HW, inner]
        let attend = |q: HeadsView<'_>, k: HeadsView<'_>, v: HeadsView<'_>| {
            nn::multi_head_attention(gpu, q, k, v, b, s.heads, s.head_dim, false)
        };
        for blk in &self.blocks {
            // Self-attention (or context attention when only_cross_attention). [B, HW, inner]
            let normed = blk.norm1.forward(gpu, &hidden)?; // [B, HW, inner]
            let attn = match &blk.attn1_kv {
                None => {
                    let qkv = blk.attn1_q_or_qkv.forward(gpu, &normed)?; // [B, HW, 3·inner]
                    let v = |o| HeadsView {
                        tensor: &qkv,
                        tokens: n,
                        row_stride: 3 * inner,
                        offset: o,
                    };
                    attend(v(0), v(inner), v(2 * inner))?
                }
                Some(kv_proj) => {
                    let q = blk.attn1_q_or_qkv.forward(gpu, &normed)?; // [B, HW, inner]
                    let kv = kv_proj.forward(gpu, context)?; // [B, Nc, 2·inner]
                    attend(
                        HeadsView {
                            tensor: &q,
                            tokens: n,
                            row_stride: inner,
                            offset: 0,
                        },
                        HeadsView {
                            tensor: &kv,
                            tokens: nc,
                            row_stride: 2 * inner,
                            offset: 0,
                        },
                        HeadsView {
                            tensor: &kv,
                            tokens: nc,
                            row_stride: 2 * inner,
                            offset: inner,
                        },
                    )?
                }
            };
            hidden = blk
                .attn1_out
                .forward_fused(gpu, &attn, Activation::None, Some(&hidden))?;
            // Cross-attention on the text context. [B, HW, inner]
            let normed = blk.norm2.forward(gpu, &hidden)?; // [B, HW, inner]
            let q = blk.attn2_q.forward(gpu, &normed)?; // [B, HW, inner]
            let kv = blk.attn2_kv.forward(gpu, context)?; // [B, Nc, 2·inner]
            let attn = attend(
                HeadsView {
                    tensor: &q,
                    tokens: n,
                    row_stride: inner,
                    offset: 0,
                },
                HeadsView {
                    tensor: &kv,
                    tokens: nc,
                    row_stride: 2 * inner,
                    offset: 0,
                },
                HeadsView {
                    tensor: &kv,
                    tokens: nc,
                    row_stride: 2 * inner,
                    offset: inner,
                },
            )?;
            hidden = blk
                .attn2_out
                .forward_fused(gpu, &attn, Activation::None, Some(&hidden))?;
            // GEGLU feed-forward. [B, HW, inner] -> [B, HW, 4·inner] -> [B, HW, inner]
            let normed = blk.norm3.forward(gpu, &hidden)?; // [B, HW, inner]
            let mid = blk.ff_geglu.forward_geglu(gpu, &normed)?;
            hidden = blk
                .ff_out
                .forward_fused(gpu, &mid, Activation::None, Some(&hidden))?;
        }
        let out = self
            .proj_out
            .forward_fused(gpu, &hidden, Activation::None, Some(&residual))?; // [B, HW, C]
        out.reshape(&[b, h, w, s.channels])
    }
}
