//! Building blocks shared by the VAE and the U-Net, ported from diffusers
//! (`models/resnet.py`, `models/attention_processor.py`, `models/unets/unet_2d_blocks.py`).
//! Activations are NHWC: [B, H, W, C].

use crate::kernels::attention::HeadsView;
use crate::kernels::elementwise;
use crate::kernels::matmul::Activation;
use crate::nn::{self, Conv2d, GroupNorm, Linear};
use crate::weights::WeightView;
use crate::{DType, Gpu, Result, Tensor};

/// diffusers `ResnetBlock2D` (time_embedding_norm "default", output_scale_factor 1):
/// h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb))]; h = conv2(silu(norm2(h)));
/// out = shortcut(x) + h — the add fused into conv2's store.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        gpu: &Gpu,
        vb: &WeightView<'_>,
        c_in: usize,
        c_out: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f32,
        dtype: DType,
    ) -> Result<Self> {
        let conv_shortcut = if c_in != c_out {
            Some(Conv2d::load(
                gpu,
                &vb.pp("conv_shortcut"),
                c_in,
                c_out,
                1,
                1,
                0,
                dtype,
            )?)
        } else {
            None
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(gpu, &vb.pp("norm1"), groups, c_in, eps, dtype)?,
            conv1: Conv2d::load(gpu, &vb.pp("conv1"), c_in, c_out, 3, 1, 1, dtype)?,
            time_emb_proj: match temb_channels {
                Some(t) => Some(Linear::load(
                    gpu,
                    &vb.pp("time_emb_proj"),
                    t,
                    c_out,
                    true,
                    dtype,
                )?),
                None => None,
            },
            norm2: GroupNorm::load(gpu, &vb.pp("norm2"), groups, c_out, eps, dtype)?,
            conv2: Conv2d::load(gpu, &vb.pp("conv2"), c_out, c_out, 3, 1, 1, dtype)?,
            conv_shortcut,
        })
    }

    /// x: [B, H, W, Cin]; temb_silu: silu(temb) [B, T] (computed once per U-Net call and shared
    /// by every block). Returns [B, H, W, Cout].
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb_silu: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(gpu, x, true)?; // [B, H, W, Cin]
        let mut h = self.conv1.forward(gpu, &h)?; // [B, H, W, Cout]
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb_silu) {
            let t = proj.forward(gpu, t)?; // [B, Cout]
            h = elementwise::add_channel_bias(gpu, &h, &t)?; // [B, H, W, Cout]
        }
        let h = self.norm2.forward(gpu, &h, true)?; // [B, H, W, Cout]
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(gpu, x)?, // [B, H, W, Cout]
            None => x.clone(),
        };
        self.conv2.forward_residual(gpu, &h, &shortcut) // [B, H, W, Cout]
    }
}

/// The VAE's mid-block self-attention (diffusers `Attention` built from the deprecated
/// `AttentionBlock`: one head of width C, its own group norm, residual connection).
pub struct VaeAttention {
    group_norm: GroupNorm,
    qkv: Linear,
    to_out: Linear,
    channels: usize,
}

impl VaeAttention {
    pub fn load(
        gpu: &Gpu,
        vb: &WeightView<'_>,
        channels: usize,
        groups: usize,
        eps: f32,
        dtype: DType,
    ) -> Result<Self> {
        let c = channels;
        Ok(VaeAttention {
            group_norm: GroupNorm::load(gpu, &vb.pp("group_norm"), groups, c, eps, dtype)?,
            qkv: Linear::load_fused(
                gpu,
                &[vb.pp("to_q"), vb.pp("to_k"), vb.pp("to_v")],
                c,
                &[c, c, c],
                true,
                dtype,
            )?,
            to_out: Linear::load(gpu, &vb.pp("to_out.0"), c, c, true, dtype)?,
            channels,
        })
    }

    /// x: [B, H, W, C] -> [B, H, W, C].
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), self.channels);
        let tokens = x.reshape(&[b, h * w, c])?; // [B, HW, C]
        let normed = self.group_norm.forward(gpu, &tokens, false)?; // [B, HW, C]
        let qkv = self.qkv.forward(gpu, &normed)?; // [B, HW, 3C]
        let view = |offset| HeadsView {
            tensor: &qkv,
            tokens: h * w,
            row_stride: 3 * c,
            offset,
        };
        let attn = nn::multi_head_attention(gpu, view(0), view(c), view(2 * c), b, 1, c, false)?; // [B, HW, C]
        let out = self
            .to_out
            .forward_fused(gpu, &attn, Activation::None, Some(&tokens))?;
        out.reshape(&[b, h, w, c])
    }
}
