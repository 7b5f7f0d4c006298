//! Weight-owning layers: each loads its tensors from a [`WeightView`] under the diffusers key
//! names (so a missing tensor fails with its full key) and records its kernels in `forward`.
//! Models in `src/models/` are built from these.

use crate::kernels::attention::{self, HeadsView};
use crate::kernels::conv2d;
use crate::kernels::matmul::{self, Activation};
use crate::kernels::norm;
use std::cell::RefCell;
use std::sync::{Mutex, OnceLock};

use crate::weights::{HostTensor, WeightView};
use crate::{DType, Error, Gpu, Result, Tensor};

/// Upload a host tensor in the compute dtype (f32/f16/bf16 sources converted with `half`).
pub fn upload_host(gpu: &Gpu, t: &HostTensor<'_>, dtype: DType) -> Result<Tensor> {
    match dtype {
        DType::F16 => gpu.upload_f16(&t.to_f16_vec(), &t.shape, dtype),
        DType::F32 => gpu.upload(&t.to_f32_vec(), &t.shape, dtype),
    }
}

/// The loader context (candle's `VarBuilder`): a [`WeightView`] key path plus the GPU and the
/// compute dtype every layer needs, so constructors read `Conv2d::load(vb.pp("conv_in"), cfg)`.
/// A missing or misshapen tensor still fails with its full key.
#[derive(Clone)]
pub struct VarBuilder<'a> {
    view: WeightView<'a>,
    gpu: &'a Gpu,
    dtype: DType,
    /// Where the linear and conv layers record their weights as LoRA sites (the U-Net and the
    /// text encoder; None for the VAE).
    sites: Option<&'a RefCell<Vec<WeightSite>>>,
}

impl<'a> VarBuilder<'a> {
    pub fn new(gpu: &'a Gpu, view: &WeightView<'a>, dtype: DType) -> Self {
        VarBuilder {
            view: view.clone(),
            gpu,
            dtype,
            sites: None,
        }
    }

    /// Record every linear and conv weight loaded through this builder (and its sub-paths) in
    /// `sites`, so a LoRA can later find it by its checkpoint key.
    pub fn recording_sites(mut self, sites: &'a RefCell<Vec<WeightSite>>) -> Self {
        self.sites = Some(sites);
        self
    }

    /// A sub-path: `vb.pp("down_blocks.0").pp("resnets.1")` reads `down_blocks.0.resnets.1.*`.
    pub fn pp(&self, name: &str) -> VarBuilder<'a> {
        VarBuilder {
            view: self.view.pp(name),
            gpu: self.gpu,
            dtype: self.dtype,
            sites: self.sites,
        }
    }

    /// Record `tensor` elements `[offset, offset + numel(torch_shape))` as the weight `name` of
    /// this path, stored as the checkpoint's `torch_shape` tensor in our layout.
    pub fn record_site(&self, name: &str, tensor: &Tensor, offset: usize, torch_shape: &[usize]) {
        if let Some(sites) = self.sites {
            sites.borrow_mut().push(WeightSite {
                key: self.view.full_key(name),
                tensor: tensor.clone(),
                offset,
                torch_shape: torch_shape.to_vec(),
            });
        }
    }

    pub fn gpu(&self) -> &'a Gpu {
        self.gpu
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The underlying key view, for layers that transform weights on the host.
    pub fn view(&self) -> &WeightView<'a> {
        &self.view
    }

    pub fn prefix(&self) -> &str {
        self.view.prefix()
    }

    /// Read `name` with `shape` and upload it in the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.view.get(name, shape)?;
        upload_host(self.gpu, &t, self.dtype)
    }

    /// Upload host values computed by the caller (e.g. a rescaled weight) in the compute dtype.
    pub fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.gpu.upload(data, shape, self.dtype)
    }

    /// The 3×3, stride 1, padding 1 convolution most blocks use.
    pub fn conv3x3(&self, cin: usize, cout: usize) -> Result<Conv2d> {
        Conv2d::load(self.clone(), Conv2dConfig::k3(cin, cout))
    }
}

/// A loaded weight a LoRA may change: which checkpoint tensor it is, and where its values live
/// on the GPU. `tensor` shares the layer's buffer, so writing into it changes the layer in place
/// (its bind groups stay valid). Fused layers hold several checkpoint tensors in one buffer,
/// each its own site at its element `offset`.
#[derive(Clone, Debug)]
pub struct WeightSite {
    /// The checkpoint key (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight`).
    pub key: String,
    /// The layer's whole weight tensor.
    pub tensor: Tensor,
    /// First element of this checkpoint tensor in `tensor`.
    pub offset: usize,
    /// Its shape in the checkpoint: [out, in] (linear) or [out, in, kh, kw] (conv; stored as
    /// [out, kh, kw, in], a 1×1 projection read as a linear as [out, in]).
    pub torch_shape: Vec<usize>,
}

impl WeightSite {
    /// Its shape in our layout ([out, in] or [out, kh, kw, in]).
    pub fn our_shape(&self) -> Vec<usize> {
        match self.torch_shape.as_slice() {
            [o, i, kh, kw] => vec![*o, *kh, *kw, *i],
            other => other.to_vec(),
        }
    }

    pub fn numel(&self) -> usize {
        self.torch_shape.iter().product()
    }
}

/// torch.nn.Linear: y = x·Wᵀ + b, W [out, in].
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(vb: VarBuilder<'_>, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[d_out, d_in])?;
        vb.record_site("weight", &weight, 0, &[d_out, d_in]);
        let bias = if bias {
            Some(vb.get("bias", &[d_out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// Several linears applied to the same input fused into one (rows stacked): q, k and v
    /// projections become one [3C, C] matmul that attention reads through strided views.
    /// `parts` are sub-paths of `vb` (`["to_q", "to_k", "to_v"]`), `d_outs` their widths.
    pub fn load_fused(
        vb: VarBuilder<'_>,
        parts: &[&str],
        d_in: usize,
        d_outs: &[usize],
        bias: bool,
    ) -> Result<Self> {
        let mut w: Vec<f32> = Vec::new();
        let mut b: Vec<f32> = Vec::new();
        for (part, &d_out) in parts.iter().zip(d_outs) {
            let pv = vb.view().pp(part);
            w.extend(pv.get("weight", &[d_out, d_in])?.to_f32_vec());
            if bias {
                b.extend(pv.get("bias", &[d_out])?.to_f32_vec());
            }
        }
        let total: usize = d_outs.iter().sum();
        let weight = vb.upload(&w, &[total, d_in])?;
        let mut row = 0;
        for (part, &d_out) in parts.iter().zip(d_outs) {
            vb.pp(part)
                .record_site("weight", &weight, row * d_in, &[d_out, d_in]);
            row += d_out;
        }
        let bias = if bias {
            Some(vb.upload(&b, &[total])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        matmul::linear(
            gpu,
            x,
            &self.weight,
            self.bias.as_ref(),
            None,
            Activation::None,
        )
    }

    /// act(x·Wᵀ + b) + residual, all in the matmul's epilogue.
    pub fn forward_fused(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        act: Activation,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        matmul::linear(gpu, x, &self.weight, self.bias.as_ref(), residual, act)
    }

    /// diffusers GEGLU: this linear has 2N outputs; returns hidden * gelu(gate), [.., N].
    pub fn forward_geglu(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        matmul::linear_geglu(gpu, x, &self.weight, self.bias.as_ref())
    }

    /// act(norm(x)·Wᵀ + b) + residual with the LayerNorm applied in the matmul's loads
    /// ([`matmul::linear_norm`]): no normalised tensor, no norm dispatch.
    pub fn forward_normed(
        &self,
        gpu: &Gpu,
        norm: &LayerNorm,
        x: &Tensor,
        act: Activation,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (w, b) = (&self.weight, self.bias.as_ref());
        matmul::linear_norm(gpu, x, norm.on_load(), w, b, residual, act)
    }

    /// [`Linear::forward_geglu`] of norm(x), the LayerNorm applied in the matmul's loads.
    pub fn forward_geglu_normed(&self, gpu: &Gpu, norm: &LayerNorm, x: &Tensor) -> Result<Tensor> {
        matmul::linear_geglu_norm(gpu, x, norm.on_load(), &self.weight, self.bias.as_ref())
    }
}

/// torch.nn.Conv2d's geometry: square kernel, one stride and one padding on every side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2dConfig {
    /// 3×3, stride 1, padding 1: shape-preserving.
    pub fn k3(cin: usize, cout: usize) -> Self {
        Conv2dConfig {
            cin,
            cout,
            kernel: 3,
            stride: 1,
            padding: 1,
        }
    }

    /// 1×1, stride 1, no padding (a per-pixel linear, e.g. `conv_shortcut`).
    pub fn k1(cin: usize, cout: usize) -> Self {
        Conv2dConfig {
            cin,
            cout,
            kernel: 1,
            stride: 1,
            padding: 0,
        }
    }
}

/// torch.nn.Conv2d on NHWC activations; the weight is reordered to [Cout, kh, kw, Cin] at load.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    /// [top, bottom, left, right]
    pub pads: [usize; 4],
}

impl Conv2d {
    pub fn load(vb: VarBuilder<'_>, cfg: Conv2dConfig) -> Result<Self> {
        let Conv2dConfig {
            cin: c_in,
            cout: c_out,
            kernel,
            stride,
            padding,
        } = cfg;
        let (gpu, dtype) = (vb.gpu(), vb.dtype());
        let t = vb.view().get("weight", &[c_out, c_in, kernel, kernel])?;
        let ohwi = [c_out, kernel, kernel, c_in];
        // Reordered in the storage dtype: a permutation, no round trip through f32.
        let weight = match dtype {
            DType::F16 => {
                let w = conv2d::weight_oihw_to_ohwi(&t.to_f16_vec(), c_out, c_in, kernel, kernel);
                gpu.upload_f16(&w, &ohwi, dtype)?
            }
            DType::F32 => {
                let w = conv2d::weight_oihw_to_ohwi(&t.to_f32_vec(), c_out, c_in, kernel, kernel);
                gpu.upload(&w, &ohwi, dtype)?
            }
        };
        vb.record_site("weight", &weight, 0, &[c_out, c_in, kernel, kernel]);
        let bias = match vb.view().get_opt("bias", &[c_out])? {
            Some(b) => Some(upload_host(gpu, &b, dtype)?),
            None => None,
        };
        Ok(Conv2d {
            weight,
            bias,
            stride,
            pads: [padding; 4],
        })
    }

    /// Override the padding: the VAE encoder's Downsample2D pads only bottom and right.
    pub fn with_pads(mut self, pads: [usize; 4]) -> Self {
        self.pads = pads;
        self
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        conv2d::conv2d(
            gpu,
            x,
            &self.weight,
            self.bias.as_ref(),
            None,
            self.stride,
            self.pads,
        )
    }

    /// conv(x) + residual, the add fused into the store.
    pub fn forward_residual(&self, gpu: &Gpu, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        conv2d::conv2d(
            gpu,
            x,
            &self.weight,
            self.bias.as_ref(),
            Some(residual),
            self.stride,
            self.pads,
        )
    }

    /// conv(x) + bias per (batch, channel) instead of this conv's own bias: `bias_rows` is a
    /// [B, Cout] block of a wider table (ResnetBlock2D's conv1 with its time embedding, whose
    /// table already holds conv1's bias).
    pub fn forward_bias_rows(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        bias_rows: conv2d::ChannelBiasView<'_>,
    ) -> Result<Tensor> {
        conv2d::Conv {
            bias: None,
            bias_rows: Some(bias_rows),
            ..self.on(conv2d::Input::Plain(x))
        }
        .run(gpu)
    }

    /// conv(concat_channels(a, b)) without writing the concatenation: a [B, H, W, Ca],
    /// b [B, H, W, Cb], this conv's Cin = Ca + Cb (the U-Net decoder's `torch.cat([h, skip])`).
    pub fn forward_concat(&self, gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.on(conv2d::Input::Concat(a, b)).run(gpu)
    }

    /// conv(concat_channels(a, b)) + residual, neither the concatenation nor the sum written
    /// separately.
    pub fn forward_concat_residual(
        &self,
        gpu: &Gpu,
        a: &Tensor,
        b: &Tensor,
        residual: &Tensor,
    ) -> Result<Tensor> {
        conv2d::Conv {
            residual: Some(residual),
            ..self.on(conv2d::Input::Concat(a, b))
        }
        .run(gpu)
    }

    /// This convolution of `input` with its own bias and nothing else fused: the start of a
    /// [`conv2d::Conv`] whose other fields the caller sets (`Conv { norm, residual,
    /// ..conv.on(input) }`).
    /// This convolution of `input` (plain, or upsampled as [`Conv2d::forward_upsampled`]), its
    /// output's GroupNorm statistics left for `next` (the GroupNorm that reads it,
    /// [`GroupNorm::produce`]) where given.
    pub fn forward_producing(
        &self,
        gpu: &Gpu,
        input: conv2d::Input<'_>,
        next: Option<&GroupNorm>,
    ) -> Result<(Tensor, Option<conv2d::GroupPartials>)> {
        match next {
            Some(next) => next.produce(gpu, self.on(input)),
            None => Ok((self.on(input).run(gpu)?, None)),
        }
    }

    pub fn on<'a>(&'a self, input: conv2d::Input<'a>) -> conv2d::Conv<'a> {
        conv2d::Conv {
            input,
            weight: &self.weight,
            bias: self.bias.as_ref(),
            bias_rows: None,
            residual: None,
            norm: None,
            shortcut: None,
            stride: self.stride,
            pads: self.pads,
            variant: None,
        }
    }

    /// conv(upsample_nearest_2x(x)), the upsampling folded into the conv's loads (diffusers
    /// `Upsample2D`): [B, H, W, C] -> [B, 2H, 2W, Cout] for the 3×3, stride 1, padding 1 conv.
    pub fn forward_upsampled(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        conv2d::conv2d_upsampled(
            gpu,
            x,
            &self.weight,
            self.bias.as_ref(),
            None,
            self.stride,
            self.pads,
        )
    }
}

/// torch.nn.GroupNorm over NHWC (or [B, N, C]) activations, with an optional fused SiLU; or
/// fused into the next convolution's loads ([`GroupNorm::into_conv`]).
pub struct GroupNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub groups: usize,
    pub eps: f32,
    /// The [B, C, 2] statistics table of [`GroupNorm::into_conv`], one per layer, kept from call
    /// to call (reallocated only when B changes). Taken from the buffer pool per call, these
    /// small tables shifted the pool's size classes enough that the denoising loop's
    /// allocations and bind groups settled two calls later (tests/steady_state.rs); held here
    /// they are allocated once, in the first call, and bound at the same buffer every step. The
    /// lock is held from the statistics dispatch to the convolution's, so two threads recording
    /// through one layer cannot interleave on the table.
    table: Mutex<Option<Tensor>>,
    /// [C, 2] f32 (gamma, beta), for a consumer that merges its input's statistics from the
    /// producer's pieces ([`GroupNorm::into_conv_linked`]); None for a norm built by `new`.
    gamma_beta: Option<Tensor>,
    /// The pieces buffer its input's producer writes ([`GroupNorm::into_conv_linked`]), kept
    /// per layer for the reason `table` is.
    partials: Mutex<Option<Tensor>>,
    /// [`GroupNorm::second_part`], made on first use.
    second_part: OnceLock<Box<GroupNorm>>,
}

impl GroupNorm {
    pub fn load(vb: VarBuilder<'_>, groups: usize, channels: usize, eps: f32) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::Unsupported(format!(
                "GroupNorm `{}`: {channels} channels are not divisible into {groups} groups",
                vb.prefix()
            )));
        }
        let gamma = vb.view().get("weight", &[channels])?.to_f32_vec();
        let beta = vb.view().get("bias", &[channels])?.to_f32_vec();
        let pairs: Vec<f32> = gamma
            .iter()
            .zip(&beta)
            .flat_map(|(&g, &b)| [g, b])
            .collect();
        Ok(GroupNorm {
            gamma_beta: Some(vb.gpu().upload(&pairs, &[channels, 2], DType::F32)?),
            ..GroupNorm::new(
                vb.get("weight", &[channels])?,
                vb.get("bias", &[channels])?,
                groups,
                eps,
            )
        })
    }

    /// From its affine parameters ([C] each, in the activations' dtype).
    pub fn new(gamma: Tensor, beta: Tensor, groups: usize, eps: f32) -> Self {
        GroupNorm {
            gamma,
            beta,
            groups,
            eps,
            table: Mutex::new(None),
            gamma_beta: None,
            partials: Mutex::new(None),
            second_part: OnceLock::new(),
        }
    }

    /// This layer again, with kept buffers of its own: what the producer of the second part of
    /// a concatenated input (the U-Net decoder's skip) leaves its pieces for
    /// ([`GroupNorm::produce`]), since the first part's producer writes this layer's buffer
    /// while those pieces are still to be read.
    pub fn second_part(&self) -> &GroupNorm {
        self.second_part.get_or_init(|| {
            Box::new(GroupNorm {
                gamma_beta: self.gamma_beta.clone(),
                ..GroupNorm::new(self.gamma.clone(), self.beta.clone(), self.groups, self.eps)
            })
        })
    }

    /// The width of the piece groups a producer of `out_channels` of this layer's input leaves
    /// ([`GroupNorm::produce`]): this layer's group width for its whole input; for one part
    /// of a concatenation (either: first with out_channels, second with the rest before it)
    /// the largest width that tiles its groups there, gcd(group width, Ca, Cb).
    fn piece_width(&self, out_channels: usize) -> usize {
        let channels = self.gamma.dim(0);
        let gw = channels / self.groups.max(1);
        if out_channels >= channels {
            return gw;
        }
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        gcd(gcd(gw, out_channels), channels - out_channels)
    }

    /// `producer`'s output, with its GroupNorm statistics (this layer's groups, or finer ones
    /// where the output is one part of a concatenated input: [`GroupNorm::piece_width`]) left
    /// as per-tile pieces for [`GroupNorm::into_conv_linked`], in this layer's kept buffer. The
    /// pieces are None where the producer's tiles cannot make them.
    pub fn produce(
        &self,
        gpu: &Gpu,
        producer: conv2d::Conv<'_>,
    ) -> Result<(Tensor, Option<conv2d::GroupPartials>)> {
        if self.gamma_beta.is_none() {
            return Ok((producer.run(gpu)?, None));
        }
        let mut kept = self.partials.lock().unwrap_or_else(|p| p.into_inner());
        let dry = gpu.is_dry_run();
        let width = self.piece_width(producer.weight.dim(0));
        producer.run_with_partials(gpu, width, |pieces| {
            // A dry run's tensors are virtual and its pool is not the loop's: a fresh buffer.
            if dry {
                return gpu.empty(&[pieces, 4], DType::F32);
            }
            if kept.as_ref().is_none_or(|t| t.shape() != [pieces, 4]) {
                *kept = Some(gpu.empty(&[pieces, 4], DType::F32)?);
            }
            Ok(kept.as_ref().expect("allocated above").clone())
        })
    }

    /// Whether this layer can take its input's statistics as a producer's pieces
    /// ([`GroupNorm::into_conv_linked`]): loaded layers can (they keep a (gamma, beta) table).
    pub fn merges_pieces(&self) -> bool {
        self.gamma_beta.is_some()
    }

    /// `conv(silu?(self(input)))` linked to its neighbours: the input's statistics merged by
    /// the conv's own workgroups from `input` (what the input's producers left for this layer,
    /// [`GroupNorm::produce`]: [the input's or a concatenation's first part's, the second
    /// part's]; no statistics dispatch), else the statistics dispatch of
    /// [`GroupNorm::into_conv`]; and the output's statistics left as pieces for `next`, the
    /// GroupNorm that reads the output, where given.
    pub fn into_conv_linked(
        &self,
        gpu: &Gpu,
        conv: conv2d::Conv<'_>,
        silu: bool,
        input: [Option<&conv2d::GroupPartials>; 2],
        next: Option<&GroupNorm>,
    ) -> Result<(Tensor, Option<conv2d::GroupPartials>)> {
        let (Some(partials), Some(gamma_beta)) = (input[0], &self.gamma_beta) else {
            return self.into_conv_producing(gpu, conv, silu, next);
        };
        let norm = Some(conv2d::FusedNorm {
            stats: conv2d::NormStats::Partials {
                partials,
                partials_b: input[1],
                groups: self.groups,
                gamma: &self.gamma,
                beta: &self.beta,
                gamma_beta,
                eps: self.eps,
            },
            silu,
        });
        let conv = conv2d::Conv { norm, ..conv };
        match next {
            Some(next) => next.produce(gpu, conv),
            None => Ok((conv.run(gpu)?, None)),
        }
    }

    /// `conv(silu?(self(input)))` in two dispatches instead of three: the statistics of the
    /// input as the convolution sees it (both parts of a concatenation) into this layer's
    /// [B, C, 2] table, then `conv` — whose other fused options (bias rows, residual) are the
    /// caller's — normalising each input element as it loads it
    /// ([`conv2d::FusedNorm`]). The normalised activation is never written.
    pub fn into_conv(&self, gpu: &Gpu, conv: conv2d::Conv<'_>, silu: bool) -> Result<Tensor> {
        Ok(self.into_conv_producing(gpu, conv, silu, None)?.0)
    }

    /// [`GroupNorm::into_conv`], the conv's output also leaving its statistics for `next`
    /// ([`GroupNorm::produce`]) where given.
    pub fn into_conv_producing(
        &self,
        gpu: &Gpu,
        conv: conv2d::Conv<'_>,
        silu: bool,
        next: Option<&GroupNorm>,
    ) -> Result<(Tensor, Option<conv2d::GroupPartials>)> {
        let run = |conv: conv2d::Conv<'_>| match next {
            Some(next) => next.produce(gpu, conv),
            None => Ok((conv.run(gpu)?, None)),
        };
        let (x, x_b) = match conv.input {
            conv2d::Input::Plain(x) | conv2d::Input::Upsampled2x(x) => (x, None),
            conv2d::Input::Concat(a, b) => (a, Some(b)),
        };
        let c = x.dim(-1) + x_b.map_or(0, |t| t.dim(-1));
        let shape = [x.dim(0), c, 2];
        let op = self.op(false);
        // A dry run's tensors are virtual and its pool is not the loop's: a fresh table each time.
        if gpu.is_dry_run() {
            let table = gpu.empty(&shape, DType::F32)?;
            op.stats_into(gpu, x, x_b, &table)?;
            let norm = Some(conv2d::FusedNorm {
                stats: conv2d::NormStats::Table(&table),
                silu,
            });
            return run(conv2d::Conv { norm, ..conv });
        }
        let mut cached = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if cached.as_ref().is_none_or(|t| t.shape() != shape) {
            *cached = Some(gpu.empty(&shape, DType::F32)?);
        }
        let table = cached.as_ref().expect("allocated above");
        op.stats_into(gpu, x, x_b, table)?;
        let norm = Some(conv2d::FusedNorm {
            stats: conv2d::NormStats::Table(table),
            silu,
        });
        run(conv2d::Conv { norm, ..conv })
    }

    /// Drops the kept statistics table ([`GroupNorm::into_conv`]): the pipeline calls this at
    /// the end of every request, so a request (finished or failed) leaves the pool's live
    /// bytes as it found them.
    pub fn release_table(&self) {
        *self.table.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.partials.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(second) = self.second_part.get() {
            second.release_table();
        }
    }

    fn op(&self, silu: bool) -> norm::GroupNormOp<'_> {
        norm::GroupNormOp {
            groups: self.groups,
            eps: self.eps,
            gamma: &self.gamma,
            beta: &self.beta,
            silu,
        }
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        self.op(silu).run(gpu, x)
    }

    /// `forward(concat_channels(a, b))` without building the concatenation: a [B, H, W, Ca] and
    /// b [B, H, W, Cb] give [B, H, W, Ca + Cb]. For the up-block ResnetBlock2D, whose input is
    /// `torch.cat([hidden_states, res_hidden_states], dim=1)`.
    pub fn forward_concat(&self, gpu: &Gpu, a: &Tensor, b: &Tensor, silu: bool) -> Result<Tensor> {
        self.op(silu).run_concat(gpu, a, b)
    }
}

/// torch.nn.LayerNorm over the last dimension.
pub struct LayerNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder<'_>, channels: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            gamma: vb.get("weight", &[channels])?,
            beta: vb.get("bias", &[channels])?,
            eps,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        norm::layer_norm(gpu, x, &self.gamma, &self.beta, self.eps)
    }

    /// This norm as the next matmul applies it while staging its input.
    pub fn on_load(&self) -> matmul::RowLayerNorm<'_> {
        matmul::RowLayerNorm {
            weight: &self.gamma,
            bias: &self.beta,
            eps: self.eps,
        }
    }
}

/// The geometry of a multi-head attention call: q is [batch, N, heads·head_dim].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Mask future positions (CLIP's text encoder).
    pub causal: bool,
}

/// Multi-head attention over [B, N, heads·head_dim] tensors (diffusers' head layout), reading q,
/// k and v through strided views so a fused QKV projection needs no split.
pub fn multi_head_attention(
    gpu: &Gpu,
    q: HeadsView<'_>,
    k: HeadsView<'_>,
    v: HeadsView<'_>,
    shape: AttentionShape,
) -> Result<Tensor> {
    let AttentionShape {
        batch,
        heads,
        head_dim,
        causal,
    } = shape;
    attention::Sdpa {
        q,
        k,
        v,
        batch,
        heads,
        head_dim,
        causal,
        scale: None,
    }
    .run(gpu)
}
