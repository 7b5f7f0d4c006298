//! Building blocks shared by the VAE and the U-Net, ported from diffusers
//! (`models/resnet.py`, `models/attention_processor.py`, `models/unets/unet_2d_blocks.py`).
//! Activations are NHWC: [B, H, W, C].

use crate::kernels::attention::{self, HeadsView};
use crate::kernels::conv2d::{Conv, GroupPartials, Input, Shortcut};
use crate::kernels::elementwise::{self, ChannelBiasView};
use crate::kernels::matmul::{self, Activation};
use crate::nn::{self, AttentionShape, Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};
use crate::{Gpu, Result, Tensor};

/// What a U-Net call conditions its resnets and transformers on.
pub struct Conditioning<'a> {
    /// silu(temb) [B, T], shared by every resnet's `time_emb_proj` (None when hoisted).
    pub temb_silu: Option<&'a Tensor>,
    /// The text context [B, Nc, context_dim], read by cross-attention's K/V projections.
    pub context: &'a Tensor,
    /// The step-invariant projections, computed once per image: with them no resnet projects
    /// `temb_silu` and no cross-attention projects `context` inside the step.
    pub hoisted: Option<Hoisted<'a>>,
}

/// Projections made before the denoising loop (`UNet2DConditionModel::prepare_image`).
#[derive(Clone, Copy)]
pub struct Hoisted<'a> {
    /// By resnet slot: `time_emb_proj` of every call's silu(temb), [calls·B, Cout].
    pub time_proj: &'a [Tensor],
    /// This call's first row in `time_proj` (call·B).
    pub row: usize,
    /// By cross-attention slot: K and V of the context, [B, Nc, 2·inner].
    pub context_kv: &'a [Tensor],
}

/// diffusers `ResnetBlock2D` (time_embedding_norm "default", output_scale_factor 1):
/// h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb))]; h = conv2(silu(norm2(h)));
/// out = shortcut(x) + h — the add fused into conv2's store, and where the shortcut is the 1×1
/// `conv_shortcut` (Cin ≠ Cout) that conv runs inside conv2 as more K of the same GEMM
/// ([`Shortcut`]; conv2's bias then holds both biases). In the U-Net each
/// `conv(silu(norm(..)))` is one statistics dispatch and the conv, which normalises its input as
/// it loads it ([`GroupNorm::into_conv`]); the VAE's keep the separate normalise pass.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    /// With `conv_shortcut`: conv2's bias plus the shortcut's (summed in f32, rounded once),
    /// the one bias of the conv that computes both.
    conv2_shortcut_bias: Option<Tensor>,
    fused_norm: bool,
    /// Index of this block's row in [`Hoisted::time_proj`] (set by the U-Net after loading).
    pub(crate) slot: usize,
}

/// [`ResnetBlock2D`]'s constructor arguments (diffusers' `in_channels`, `out_channels`,
/// `temb_channels`, `groups`, `eps`).
#[derive(Clone, Copy, Debug)]
pub struct ResnetBlock2DConfig {
    pub c_in: usize,
    pub c_out: usize,
    /// None: no `time_emb_proj` (the VAE's blocks).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f32,
    /// Apply norm1 / norm2 (+ SiLU) in conv1's / conv2's loads instead of separate passes.
    pub fused_norm: bool,
}

impl ResnetBlock2D {
    /// Drops the statistics tables its fused norms keep ([`GroupNorm::release_table`]).
    pub fn release_norm_tables(&self) {
        self.norm1.release_table();
        self.norm2.release_table();
    }

    pub fn load(vb: VarBuilder<'_>, cfg: ResnetBlock2DConfig) -> Result<Self> {
        let ResnetBlock2DConfig {
            c_in,
            c_out,
            temb_channels,
            groups,
            eps,
            fused_norm,
        } = cfg;
        let conv_shortcut = if c_in != c_out {
            Some(Conv2d::load(
                vb.pp("conv_shortcut"),
                Conv2dConfig::k1(c_in, c_out),
            )?)
        } else {
            None
        };
        let conv2_shortcut_bias = match conv_shortcut {
            Some(_) => {
                let bias = |name: &str| -> Result<Vec<f32>> {
                    Ok(match vb.view().pp(name).get_opt("bias", &[c_out])? {
                        Some(b) => b.to_f32_vec(),
                        None => vec![0.0; c_out],
                    })
                };
                let (b2, bs) = (bias("conv2")?, bias("conv_shortcut")?);
                let sum: Vec<f32> = b2.iter().zip(&bs).map(|(a, b)| a + b).collect();
                Some(vb.upload(&sum, &[c_out])?)
            }
            None => None,
        };
        let mut conv1 = vb.pp("conv1").conv3x3(c_in, c_out)?;
        // conv1's bias is folded into time_emb_proj's: the projected time embedding [B, Cout]
        // is then conv1's whole bias, added per (batch, channel) in its epilogue (no separate
        // add pass). The VAE's blocks (no time embedding) keep their conv1 bias.
        let time_emb_proj = match temb_channels {
            Some(t) => {
                let tv = vb.pp("time_emb_proj");
                let Linear { weight, .. } = Linear::load(tv.clone(), t, c_out, true)?;
                let proj_bias = tv.view().get("bias", &[c_out])?.to_f32_vec();
                let conv_bias = vb.view().pp("conv1").get("bias", &[c_out])?.to_f32_vec();
                let folded: Vec<f32> = proj_bias
                    .iter()
                    .zip(&conv_bias)
                    .map(|(a, b)| a + b)
                    .collect();
                conv1.bias = None;
                Some(Linear {
                    weight,
                    bias: Some(vb.upload(&folded, &[c_out])?),
                })
            }
            None => None,
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(vb.pp("norm1"), groups, c_in, eps)?,
            conv1,
            time_emb_proj,
            norm2: GroupNorm::load(vb.pp("norm2"), groups, c_out, eps)?,
            conv2: vb.pp("conv2").conv3x3(c_out, c_out)?,
            conv_shortcut,
            conv2_shortcut_bias,
            fused_norm,
            slot: 0,
        })
    }

    /// `time_emb_proj` of every row of `temb_silu` [R, T] -> [R, Cout] (None for the VAE's
    /// blocks): one dispatch for all of a schedule's calls.
    pub(crate) fn time_projection(&self, gpu: &Gpu, temb_silu: &Tensor) -> Result<Option<Tensor>> {
        self.time_emb_proj
            .as_ref()
            .map(|proj| proj.forward(gpu, temb_silu))
            .transpose()
    }

    /// `conv(silu(norm(input)))`: the norm applied in the conv's loads where this block fuses
    /// them, else written by its own pass first (the VAE). `conv` carries the input and the
    /// epilogue options.
    fn norm_conv(&self, gpu: &Gpu, norm: &GroupNorm, conv: Conv<'_>) -> Result<Tensor> {
        if self.fused_norm {
            return norm.into_conv(gpu, conv, true);
        }
        self.norm_conv_unfused(gpu, norm, conv)
    }

    /// conv1(silu(norm1(input))), its output leaving norm2's statistics as per-tile pieces
    /// where this block fuses its norms ([`GroupNorm::produce`]): conv2 then merges them as it
    /// starts, and norm2 takes no statistics dispatch.
    /// `x_stats`: norm1's statistics as the input's producers left them, if they did (the
    /// input's or a concatenation's first part's, the second part's).
    fn norm_conv1(
        &self,
        gpu: &Gpu,
        conv: Conv<'_>,
        x_stats: [Option<&GroupPartials>; 2],
    ) -> Result<(Tensor, Option<GroupPartials>)> {
        if self.fused_norm {
            return self
                .norm1
                .into_conv_linked(gpu, conv, true, x_stats, Some(&self.norm2));
        }
        Ok((self.norm_conv_unfused(gpu, &self.norm1, conv)?, None))
    }

    fn norm_conv_unfused(&self, gpu: &Gpu, norm: &GroupNorm, conv: Conv<'_>) -> Result<Tensor> {
        let normed = match conv.input {
            Input::Plain(x) => norm.forward(gpu, x, true)?, // [B, H, W, Cin]
            Input::Concat(a, b) => norm.forward_concat(gpu, a, b, true)?, // [B, H, W, Ca + Cb]
            Input::Upsampled2x(_) => {
                return Err(crate::Error::shape(
                    "resnet",
                    "an unfused norm before an upsampling conv",
                ))
            }
        };
        Conv {
            input: Input::Plain(&normed),
            ..conv
        }
        .run(gpu)
    }

    /// conv1(silu(norm1(input))) + time_emb_proj(silu(temb)) per (batch, channel), the
    /// projection (which holds conv1's bias) added in conv1's epilogue and read from the hoisted
    /// table where there is one. input: [B, H, W, Cin] (or a concatenation) -> [B, H, W, Cout].
    fn conv1_with_time(
        &self,
        gpu: &Gpu,
        input: Input<'_>,
        x_stats: [Option<&GroupPartials>; 2],
        cond: Option<&Conditioning<'_>>,
    ) -> Result<(Tensor, Option<GroupPartials>)> {
        let Some(proj) = &self.time_emb_proj else {
            return self.norm_conv1(gpu, self.conv1.on(input), x_stats);
        };
        let missing = |what: &str| crate::Error::shape("resnet", what.to_string());
        let cond = cond.ok_or_else(|| missing("a U-Net resnet needs its time embedding"))?;
        let with_rows = |view: ChannelBiasView<'_>| {
            let conv = Conv {
                bias: None,
                bias_rows: Some(view),
                ..self.conv1.on(input)
            };
            self.norm_conv1(gpu, conv, x_stats) // [B, H, W, Cout]
        };
        match &cond.hoisted {
            Some(hoisted) => {
                let table = hoisted
                    .time_proj
                    .get(self.slot)
                    .ok_or_else(|| missing("no time projection for this resnet's slot"))?; // [calls·B, Cout]
                with_rows(ChannelBiasView {
                    table,
                    row: hoisted.row,
                    col: 0,
                })
            }
            None => {
                let temb = cond
                    .temb_silu
                    .ok_or_else(|| missing("neither a time embedding nor its projection"))?;
                let t = proj.forward(gpu, temb)?; // [B, Cout]
                with_rows(ChannelBiasView {
                    table: &t,
                    row: 0,
                    col: 0,
                })
            }
        }
    }

    /// x: [B, H, W, Cin]; cond: the U-Net call's time embedding (None in the VAE). Returns
    /// [B, H, W, Cout].
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        cond: Option<&Conditioning<'_>>,
    ) -> Result<Tensor> {
        Ok(self.forward_linked(gpu, x, None, cond, None)?.0)
    }

    /// The GroupNorm that reads this block's input (norm1), where a producer can leave it
    /// pieces ([`GroupNorm::into_conv_linked`]): where this block fuses its norms.
    pub fn input_norm(&self) -> Option<&GroupNorm> {
        (self.fused_norm && self.norm1.merges_pieces()).then_some(&self.norm1)
    }

    /// [`ResnetBlock2D::forward`] linked to its neighbours: norm1's statistics from `x_stats`
    /// (what x's producer left for [`ResnetBlock2D::input_norm`]) where given, and the output's
    /// statistics left for `next` (the GroupNorm that reads it) where given.
    pub fn forward_linked(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        x_stats: Option<&GroupPartials>,
        cond: Option<&Conditioning<'_>>,
        next: Option<&GroupNorm>,
    ) -> Result<(Tensor, Option<GroupPartials>)> {
        let (h, h_stats) = self.conv1_with_time(gpu, Input::Plain(x), [x_stats, None], cond)?; // [B, H, W, Cout]
        self.conv2_with_shortcut(gpu, &h, h_stats.as_ref(), Input::Plain(x), next)
    }

    /// conv2(silu(norm2(h))) + shortcut(x): x added in conv2's epilogue, or its 1×1 conv run
    /// as conv2's K tail. h [B, H, W, Cout], x [B, H, W, Cin] (or a concatenation, which needs
    /// the conv_shortcut). Returns [B, H, W, Cout].
    /// `h_stats`: norm2's statistics as conv1 left them, if it did; `next`: the GroupNorm that
    /// reads the output, to leave its statistics for.
    fn conv2_with_shortcut(
        &self,
        gpu: &Gpu,
        h: &Tensor,
        h_stats: Option<&GroupPartials>,
        x: Input<'_>,
        next: Option<&GroupNorm>,
    ) -> Result<(Tensor, Option<GroupPartials>)> {
        let conv2 = match (&self.conv_shortcut, x) {
            (Some(shortcut), x) => Conv {
                bias: self.conv2_shortcut_bias.as_ref(),
                shortcut: Some(Shortcut {
                    input: x,
                    weight: &shortcut.weight,
                }),
                ..self.conv2.on(Input::Plain(h))
            },
            (None, Input::Plain(x)) => Conv {
                residual: Some(x),
                ..self.conv2.on(Input::Plain(h))
            },
            (None, _) => {
                return Err(crate::Error::shape(
                    "resnet",
                    "an identity shortcut of a concatenated or upsampled input",
                ))
            }
        };
        // [B, H, W, Cout]
        if self.fused_norm {
            return self
                .norm2
                .into_conv_linked(gpu, conv2, true, [h_stats, None], next);
        }
        Ok((self.norm_conv(gpu, &self.norm2, conv2)?, None)) // [B, H, W, Cout]
    }

    /// `forward(concat_channels(a, b), temb)` for the U-Net decoder, whose resnets take
    /// `torch.cat([hidden_states, res_hidden_states], dim=1)`: norm1 (its statistics or its
    /// pass), conv1 and the 1×1 shortcut read the two tensors directly, so the concatenation is
    /// never written. a [B, H, W, Ca], b [B, H, W, Cb] with Ca + Cb = Cin.
    pub fn forward_concat(
        &self,
        gpu: &Gpu,
        a: &Tensor,
        b: &Tensor,
        cond: Option<&Conditioning<'_>>,
    ) -> Result<Tensor> {
        Ok(self
            .forward_concat_linked(gpu, [(a, None), (b, None)], cond, None)?
            .0)
    }

    /// [`ResnetBlock2D::forward_concat`] linked to its neighbours: each part with the pieces
    /// its producer left for norm1 ([`GroupNorm::produce`] for the first part,
    /// [`GroupNorm::second_part`] for the second), merged where both parts have them, and the
    /// output's statistics left for `next` where given.
    pub fn forward_concat_linked(
        &self,
        gpu: &Gpu,
        [(a, a_stats), (b, b_stats)]: [(&Tensor, Option<&GroupPartials>); 2],
        cond: Option<&Conditioning<'_>>,
        next: Option<&GroupNorm>,
    ) -> Result<(Tensor, Option<GroupPartials>)> {
        if self.conv_shortcut.is_none() {
            // An identity shortcut would have to add the concatenation itself: build it.
            let x = elementwise::concat_channels(gpu, a, b)?;
            return self.forward_linked(gpu, &x, None, cond, next);
        }
        let stats = [a_stats, b_stats];
        let (h, h_stats) = self.conv1_with_time(gpu, Input::Concat(a, b), stats, cond)?; // [B, H, W, Cout]
        self.conv2_with_shortcut(gpu, &h, h_stats.as_ref(), Input::Concat(a, b), next)
    }
}

/// The VAE's mid-block self-attention (diffusers `Attention` built from the deprecated
/// `AttentionBlock`: one head of width C, its own group norm, residual connection).
///
/// The SD VAE's head is 512 wide, more than the flash kernel's register/workgroup budget on
/// many adapters. Then the attention runs unfused: scores = (q/√C)·kᵀ [B, N, N], a row softmax,
/// and P·V, all on the GPU. That is one head at the VAE's lowest resolution (N = 4096 at
/// 512×512: 64 MiB of f32 scores), and automatic VAE tiling keeps N bounded at larger sizes.
pub struct VaeAttention {
    group_norm: GroupNorm,
    projections: VaeAttentionProjections,
    to_out: Linear,
    channels: usize,
}

enum VaeAttentionProjections {
    /// q, k, v fused into one [3C, C] linear, read by the flash kernel through strided views.
    Fused(Linear),
    /// Separate projections for the unfused path; q's weights are pre-scaled by 1/√C.
    Separate { q: Linear, k: Linear, v: Linear },
}

impl VaeAttention {
    pub fn load(vb: VarBuilder<'_>, channels: usize, groups: usize, eps: f32) -> Result<Self> {
        let (gpu, c) = (vb.gpu(), channels);
        // The policy can force the unfused path (`LDM_VAE_ATTENTION=unfused`: tests, comparing).
        let forced_unfused = gpu.policy().vae_attention_unfused;
        let flash_fits = !forced_unfused
            && attention::config(c, gpu.caps.max_workgroup_storage as u64).is_some();
        let projections = if flash_fits {
            VaeAttentionProjections::Fused(Linear::load_fused(
                vb.clone(),
                &["to_q", "to_k", "to_v"],
                c,
                &[c, c, c],
                true,
            )?)
        } else {
            // Fold the softmax scale into q's weights and bias: (x·Wᵀ + b)/√C.
            let qv = vb.view().pp("to_q");
            let s = 1.0 / (c as f32).sqrt();
            let w: Vec<f32> = qv
                .get("weight", &[c, c])?
                .to_f32_vec()
                .iter()
                .map(|x| x * s)
                .collect();
            let b: Vec<f32> = qv
                .get("bias", &[c])?
                .to_f32_vec()
                .iter()
                .map(|x| x * s)
                .collect();
            VaeAttentionProjections::Separate {
                q: Linear {
                    weight: vb.upload(&w, &[c, c])?,
                    bias: Some(vb.upload(&b, &[c])?),
                },
                k: Linear::load(vb.pp("to_k"), c, c, true)?,
                v: Linear::load(vb.pp("to_v"), c, c, true)?,
            }
        };
        Ok(VaeAttention {
            group_norm: GroupNorm::load(vb.pp("group_norm"), groups, c, eps)?,
            projections,
            to_out: Linear::load(vb.pp("to_out.0"), c, c, true)?,
            channels,
        })
    }

    /// True when the [B, N, N] scores are materialised (head too wide for the flash kernel).
    pub fn is_unfused(&self) -> bool {
        matches!(self.projections, VaeAttentionProjections::Separate { .. })
    }

    /// x: [B, H, W, C] -> [B, H, W, C].
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), self.channels);
        let n = h * w;
        let tokens = x.reshape(&[b, n, c])?; // [B, HW, C]
        let normed = self.group_norm.forward(gpu, &tokens, false)?;
        let attn = match &self.projections {
            VaeAttentionProjections::Fused(qkv_proj) => {
                let qkv = qkv_proj.forward(gpu, &normed)?; // [B, HW, 3C]
                let view = |offset| HeadsView {
                    tensor: &qkv,
                    tokens: n,
                    row_stride: 3 * c,
                    offset,
                };
                let shape = AttentionShape {
                    batch: b,
                    heads: 1,
                    head_dim: c,
                    causal: false,
                };
                nn::multi_head_attention(gpu, view(0), view(c), view(2 * c), shape)?
                // [B, HW, C]
            }
            VaeAttentionProjections::Separate { q, k, v } => {
                let q = q.forward(gpu, &normed)?; // [B, HW, C], already scaled by 1/√C
                let k = k.forward(gpu, &normed)?; // [B, HW, C]
                let scores = matmul::batched_matmul_bt(gpu, &q, &k)?; // [B, HW, HW]
                drop((q, k));
                let probs = elementwise::softmax_last_dim(gpu, &scores)?; // [B, HW, HW]
                drop(scores);
                let v = v.forward(gpu, &normed)?.reshape(&[b, 1, n, c])?; // [B, 1, HW, C]
                let v_t = elementwise::nhwc_to_nchw(gpu, &v)?.reshape(&[b, c, n])?; // [B, C, HW]
                matmul::batched_matmul_bt(gpu, &probs, &v_t)? // [B, HW, C]
            }
        };
        let out = self
            .to_out
            .forward_fused(gpu, &attn, Activation::None, Some(&tokens))?;
        out.reshape(&[b, h, w, c])
    }
}
