//! The U-Net's down, mid and up blocks (diffusers models/unets/unet_2d_blocks.py), each a struct
//! named after its class with `load` (a per-block config) and `forward`. Nothing here assumes
//! SD 1.5's layout: which levels attend, how many resnets and transformer layers each has, and
//! whether it resamples all come from the config. Activations NHWC: [B, H, W, C].

use crate::kernels::conv2d::{GroupPartials, Input};
use crate::models::blocks::{Conditioning, ResnetBlock2D, ResnetBlock2DConfig};
use crate::models::transformer::{Transformer2DModel, TransformerSpec};
use crate::nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use crate::{Error, Gpu, Result, Tensor};

/// An activation between U-Net layers, with its GroupNorm statistics as the per-tile pieces its
/// producer left for the norm that reads it ([`GroupNorm::into_conv_linked`]), where it did.
pub type Hidden = (Tensor, Option<GroupPartials>);

/// What every block's resnets share.
#[derive(Clone, Copy, Debug)]
pub struct ResnetSettings {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f32,
}

impl ResnetSettings {
    fn load(&self, vb: VarBuilder<'_>, c_in: usize, c_out: usize) -> Result<ResnetBlock2D> {
        let cfg = ResnetBlock2DConfig {
            c_in,
            c_out,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            fused_norm: true,
        };
        ResnetBlock2D::load(vb, cfg)
    }
}

/// Config of a `DownBlock2D` / `CrossAttnDownBlock2D`.
#[derive(Clone, Copy, Debug)]
pub struct DownBlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub resnet: ResnetSettings,
    /// Some(padding): end with `Downsample2D` (a 3×3 stride-2 conv).
    pub downsample_padding: Option<usize>,
    /// Some: `CrossAttnDownBlock2D`, one transformer after each resnet.
    pub transformer: Option<TransformerSpec>,
}

/// Config of an `UpBlock2D` / `CrossAttnUpBlock2D`.
#[derive(Clone, Copy, Debug)]
pub struct UpBlockConfig {
    /// Channels of the last skip this block takes (the mirrored down block's input).
    pub in_channels: usize,
    /// Channels of the hidden state coming from the block below.
    pub prev_output_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub resnet: ResnetSettings,
    /// End with `Upsample2D` (nearest 2× then a 3×3 conv).
    pub add_upsample: bool,
    /// Some: `CrossAttnUpBlock2D`, one transformer after each resnet.
    pub transformer: Option<TransformerSpec>,
}

/// Config of `UNetMidBlock2DCrossAttn` (num_layers 1: resnet, transformer, resnet).
#[derive(Clone, Copy, Debug)]
pub struct MidBlockConfig {
    pub channels: usize,
    pub resnet: ResnetSettings,
    pub transformer: TransformerSpec,
}

fn load_transformers(
    vb: &VarBuilder<'_>,
    spec: Option<TransformerSpec>,
    n: usize,
) -> Result<Vec<Transformer2DModel>> {
    let Some(spec) = spec else {
        return Ok(Vec::new());
    };
    let av = vb.pp("attentions");
    (0..n)
        .map(|j| Transformer2DModel::load(av.pp(&j.to_string()), spec))
        .collect()
}

/// diffusers `DownBlock2D` (no `attentions`) and `CrossAttnDownBlock2D` (a Transformer2DModel
/// after each resnet): the two differ only in whether `attentions` is empty.
pub struct CrossAttnDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    /// Downsample2D's conv (stride 2).
    downsampler: Option<Conv2d>,
}

/// diffusers `DownBlock2D`: a [`CrossAttnDownBlock2D`] without attentions.
pub type DownBlock2D = CrossAttnDownBlock2D;

impl CrossAttnDownBlock2D {
    pub fn load(vb: VarBuilder<'_>, cfg: DownBlockConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let rv = vb.pp("resnets");
        let resnets = (0..cfg.num_layers)
            .map(|j| {
                let c_in = if j == 0 { cin } else { cout };
                cfg.resnet.load(rv.pp(&j.to_string()), c_in, cout)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_transformers(&vb, cfg.transformer, cfg.num_layers)?;
        let downsampler = match cfg.downsample_padding {
            Some(padding) => Some(Conv2d::load(
                vb.pp("downsamplers.0.conv"),
                Conv2dConfig {
                    cin: cout,
                    cout,
                    kernel: 3,
                    stride: 2,
                    padding,
                },
            )?),
            None => None,
        };
        Ok(CrossAttnDownBlock2D {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// The resnets and transformers, for the U-Net's per-image projections and slot numbering.
    pub(crate) fn layers_mut(
        &mut self,
    ) -> (
        impl Iterator<Item = &mut ResnetBlock2D>,
        impl Iterator<Item = &mut Transformer2DModel>,
    ) {
        (self.resnets.iter_mut(), self.attentions.iter_mut())
    }

    pub(crate) fn layers(
        &self,
    ) -> (
        impl Iterator<Item = &ResnetBlock2D>,
        impl Iterator<Item = &Transformer2DModel>,
    ) {
        (self.resnets.iter(), self.attentions.iter())
    }

    /// The GroupNorm that reads this block's input (its first resnet's norm1), where a
    /// producer can leave it pieces.
    pub fn input_norm(&self) -> Option<&GroupNorm> {
        self.resnets.first().and_then(|r| r.input_norm())
    }

    /// How many skips [`CrossAttnDownBlock2D::forward`] pushes: one per layer, and the
    /// downsampled output.
    pub fn skip_count(&self) -> usize {
        self.resnets.len() + usize::from(self.downsampler.is_some())
    }

    /// h: [B, H, W, Cin] -> [B, H/2, W/2, Cout] (or [B, H, W, Cout] without downsampler);
    /// pushes each layer's output (and the downsampled one) onto `skips`, with its pieces.
    /// Each layer leaves its output's GroupNorm statistics for the next one's norm (`h_stats`:
    /// h's, from the layer before this block; `next`: the GroupNorm after this block), and the
    /// last layer before a downsampler (which has no norm) for `skip_reader`, the decoder norm
    /// that reads its skip.
    pub fn forward(
        &self,
        gpu: &Gpu,
        h: Hidden,
        cond: &Conditioning<'_>,
        skips: &mut Vec<Hidden>,
        (next, skip_reader): (Option<&GroupNorm>, Option<&GroupNorm>),
    ) -> Result<Hidden> {
        let (mut h, mut h_stats) = h;
        for (j, resnet) in self.resnets.iter().enumerate() {
            let attention = self.attentions.get(j);
            // The norm after this resnet: its transformer's, the next resnet's, or (with
            // neither and no downsampler) the block's successor's.
            let after_resnet = match attention {
                Some(t) => t.input_norm(),
                None => self.norm_after_layer(j, next, skip_reader),
            };
            // [B, H, W, Cin] -> [B, H, W, Cout]
            (h, h_stats) =
                resnet.forward_linked(gpu, &h, h_stats.as_ref(), Some(cond), after_resnet)?;
            if let Some(t) = attention {
                let after = self.norm_after_layer(j, next, skip_reader);
                // [B, H, W, Cout] -> [B, H, W, Cout]
                (h, h_stats) = t.forward_linked(gpu, &h, h_stats.as_ref(), cond, after)?;
            }
            skips.push((h.clone(), h_stats.clone()));
        }
        if let Some(down) = &self.downsampler {
            // [B, H/2, W/2, Cout]
            (h, h_stats) = down.forward_producing(gpu, Input::Plain(&h), next)?;
            skips.push((h.clone(), h_stats.clone()));
        }
        Ok((h, h_stats))
    }

    /// The GroupNorm that reads layer j's output (its resnet and transformer): the next
    /// resnet's norm1, else the block's successor's `next`, or `skip_reader` (the decoder's,
    /// through the skip) where a downsampler comes first.
    fn norm_after_layer<'a>(
        &'a self,
        j: usize,
        next: Option<&'a GroupNorm>,
        skip_reader: Option<&'a GroupNorm>,
    ) -> Option<&'a GroupNorm> {
        match self.resnets.get(j + 1) {
            Some(r) => r.input_norm(),
            None if self.downsampler.is_none() => next,
            None => skip_reader,
        }
    }
}

/// diffusers `UNetMidBlock2DCrossAttn` (num_layers 1): resnet, transformer, resnet.
pub struct UNetMidBlock2DCrossAttn {
    resnets: [ResnetBlock2D; 2],
    attention: Transformer2DModel,
}

impl UNetMidBlock2DCrossAttn {
    pub fn load(vb: VarBuilder<'_>, cfg: MidBlockConfig) -> Result<Self> {
        let c = cfg.channels;
        let resnet0 = cfg.resnet.load(vb.pp("resnets.0"), c, c)?;
        let attention = Transformer2DModel::load(vb.pp("attentions.0"), cfg.transformer)?;
        let resnet1 = cfg.resnet.load(vb.pp("resnets.1"), c, c)?;
        Ok(UNetMidBlock2DCrossAttn {
            resnets: [resnet0, resnet1],
            attention,
        })
    }

    /// See [`CrossAttnDownBlock2D::layers_mut`].
    pub(crate) fn layers_mut(
        &mut self,
    ) -> (
        impl Iterator<Item = &mut ResnetBlock2D>,
        impl Iterator<Item = &mut Transformer2DModel>,
    ) {
        (
            self.resnets.iter_mut(),
            std::iter::once(&mut self.attention),
        )
    }

    pub(crate) fn layers(
        &self,
    ) -> (
        impl Iterator<Item = &ResnetBlock2D>,
        impl Iterator<Item = &Transformer2DModel>,
    ) {
        (self.resnets.iter(), std::iter::once(&self.attention))
    }

    /// The GroupNorm that reads this block's input (the first resnet's norm1).
    pub fn input_norm(&self) -> Option<&GroupNorm> {
        self.resnets[0].input_norm()
    }

    /// h: [B, H, W, C] -> [B, H, W, C], each layer leaving its output's GroupNorm statistics
    /// for the next layer's norm (as [`CrossAttnDownBlock2D::forward`]).
    pub fn forward(
        &self,
        gpu: &Gpu,
        (h, h_stats): Hidden,
        cond: &Conditioning<'_>,
        next: Option<&GroupNorm>,
    ) -> Result<Hidden> {
        let [r0, r1] = &self.resnets;
        let t = &self.attention;
        // Every layer: [B, H, W, C] -> [B, H, W, C].
        let (h, h_stats) =
            r0.forward_linked(gpu, &h, h_stats.as_ref(), Some(cond), t.input_norm())?;
        let (h, h_stats) = t.forward_linked(gpu, &h, h_stats.as_ref(), cond, r1.input_norm())?;
        r1.forward_linked(gpu, &h, h_stats.as_ref(), Some(cond), next)
    }
}

/// diffusers `UpBlock2D` (no `attentions`) and `CrossAttnUpBlock2D`: each resnet takes
/// `torch.cat([h, skip], dim=1)`, the concatenation never written.
pub struct CrossAttnUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    /// Upsample2D's conv, the nearest 2× folded into its loads.
    upsampler: Option<Conv2d>,
}

/// diffusers `UpBlock2D`: a [`CrossAttnUpBlock2D`] without attentions.
pub type UpBlock2D = CrossAttnUpBlock2D;

impl CrossAttnUpBlock2D {
    pub fn load(vb: VarBuilder<'_>, cfg: UpBlockConfig) -> Result<Self> {
        let (n, cout) = (cfg.num_layers, cfg.out_channels);
        let rv = vb.pp("resnets");
        let resnets = (0..n)
            .map(|j| {
                let skip = if j == n - 1 { cfg.in_channels } else { cout };
                let res_in = if j == 0 {
                    cfg.prev_output_channels
                } else {
                    cout
                };
                cfg.resnet.load(rv.pp(&j.to_string()), res_in + skip, cout)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_transformers(&vb, cfg.transformer, n)?;
        let upsampler = if cfg.add_upsample {
            Some(vb.pp("upsamplers.0.conv").conv3x3(cout, cout)?)
        } else {
            None
        };
        Ok(CrossAttnUpBlock2D {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// See [`CrossAttnDownBlock2D::layers_mut`].
    pub(crate) fn layers_mut(
        &mut self,
    ) -> (
        impl Iterator<Item = &mut ResnetBlock2D>,
        impl Iterator<Item = &mut Transformer2DModel>,
    ) {
        (self.resnets.iter_mut(), self.attentions.iter_mut())
    }

    pub(crate) fn layers(
        &self,
    ) -> (
        impl Iterator<Item = &ResnetBlock2D>,
        impl Iterator<Item = &Transformer2DModel>,
    ) {
        (self.resnets.iter(), self.attentions.iter())
    }

    /// The GroupNorm that reads this block's input h (as the first part of its first resnet's
    /// [h ; skip]), where a producer can leave it pieces.
    pub fn input_norm(&self) -> Option<&GroupNorm> {
        self.resnets.first().and_then(|r| r.input_norm())
    }

    /// Per resnet, in the order they pop their skips, the GroupNorm a skip's producer leaves
    /// its pieces for where no down-path norm reads it ([`GroupNorm::second_part`] of norm1).
    pub fn skip_readers(&self) -> impl Iterator<Item = Option<&GroupNorm>> {
        self.resnets
            .iter()
            .map(|r| r.input_norm().map(|n| n.second_part()))
    }

    /// h: [B, H, W, Cprev] -> [B, 2H, 2W, Cout] (or [B, H, W, Cout] without upsampler); pops one
    /// skip per resnet from `skips`. The resnets read [h ; skip], norm1 merging the pieces the
    /// producers of both parts left (h's: `h.1`; the skip's: pushed with it); each layer leaves
    /// its output's statistics for the next layer's norm, and the last one (or the upsampler)
    /// for `next`, the GroupNorm after this block.
    pub fn forward(
        &self,
        gpu: &Gpu,
        h: Hidden,
        cond: &Conditioning<'_>,
        skips: &mut Vec<Hidden>,
        next: Option<&GroupNorm>,
    ) -> Result<Hidden> {
        let (mut h, mut h_stats) = h;
        let after_block = if self.upsampler.is_none() { next } else { None };
        for (j, resnet) in self.resnets.iter().enumerate() {
            let (skip, skip_stats) = skips
                .pop()
                .ok_or_else(|| Error::shape("unet", "ran out of skip connections"))?;
            let attention = self.attentions.get(j);
            let after_layer = match self.resnets.get(j + 1) {
                Some(r) => r.input_norm(),
                None => after_block,
            };
            let after_resnet = match attention {
                Some(t) => t.input_norm(),
                None => after_layer,
            };
            // [h ; skip] -> [B, H, W, Cout]
            let parts = [(&h, h_stats.as_ref()), (&skip, skip_stats.as_ref())];
            (h, h_stats) = resnet.forward_concat_linked(gpu, parts, Some(cond), after_resnet)?;
            if let Some(t) = attention {
                // [B, H, W, Cout] -> [B, H, W, Cout]
                (h, h_stats) = t.forward_linked(gpu, &h, h_stats.as_ref(), cond, after_layer)?;
            }
        }
        if let Some(up) = &self.upsampler {
            // [B, 2H, 2W, Cout]
            (h, h_stats) = up.forward_producing(gpu, Input::Upsampled2x(&h), next)?;
        }
        Ok((h, h_stats))
    }
}
