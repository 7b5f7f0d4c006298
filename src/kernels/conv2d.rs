//! `shaders/conv2d.wgsl`: 2-D convolution as an implicit GEMM on NHWC activations, with bias and
//! residual add fused into the store. Covers every (kh, kw, stride, padding) including the
//! asymmetric padding of the VAE encoder's Downsample2D (`F.pad(x, (0, 1, 0, 1))`, then stride 2).
//!
//! Weights are reordered once on the host from PyTorch's [Cout, Cin, KH, KW] to
//! [Cout, KH, KW, Cin] ([`weight_oihw_to_ohwi`]) so that the GEMM's K index is contiguous in both
//! operands.
//!
//! The input can also be read through an index map instead of being materialised
//! ([`Input::Upsampled2x`] for diffusers' Upsample2D, [`Input::Concat`] for the U-Net decoder's
//! skip concatenation), and the kernel comes in three output tiles ([`Tile`]) chosen by shape
//! ([`choose_variant`]); `LDM_CONV_TILE=64|128|small` forces one for benchmarking.

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::kernels::coop::{self, CoopPlan};
pub use crate::kernels::elementwise::ChannelBiasView;
use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::{DType, Error, Result};

/// The kernel variants' output tiles (defined beside the policy that can force one).
pub use crate::runtime::policy::ConvTile as Tile;

impl Tile {
    /// Output pixels and channels of one workgroup (for Cout = `cout`).
    fn size(self, cout: usize) -> (usize, usize) {
        match self {
            Tile::T64 => (64, 64),
            Tile::T128 => (128, 128),
            Tile::Small => (64, 4 * small_quads(cout)),
            // At 16×16 fragments; `dispatch_coop` uses the plan's own tile.
            Tile::Coop => {
                let side = coop::CoopTile::T64.side(COOP_16X16);
                (side, side)
            }
        }
    }
}

/// Workgroup memory every entry point adds for the GroupNorm partials (`gn_sh`, 256 vec4<f32>:
/// the producer's per-invocation pieces, the consumer's merged (mean, rstd) table).
pub const GN_SHARED_BYTES: u32 = 256 * 16;

/// The tensor-core plan the [`Tile::Coop`] figures are quoted for (the larger fragments).
const COOP_16X16: CoopPlan = CoopPlan {
    frag: 16,
    subgroup: 32,
};

/// The tensor-core conv's tile: `forced` if given, else the large one (`conv2d_coop_l`, with
/// [`split_k`] where its grid is small), which on the H200 ran every SD 1.5 conv it could take
/// 1.5-3.5× faster than the 64 tile. The large tile needs its staging to come out at exactly 4
/// rows per invocation (frag² = 8 · subgroup: 16 × 16 fragments on 32-wide subgroups, 8 × 8 on
/// 8-wide; see the shader) and its workgroup to fit; elsewhere the 64 tile.
pub fn coop_conv_tile(
    plan: CoopPlan,
    caps: &crate::runtime::Caps,
    _m: usize,
    _cout: usize,
    forced: Option<coop::CoopTile>,
) -> coop::CoopTile {
    let large = coop::CoopTile::T128;
    let large_ok = plan.frag * plan.frag == 8 * plan.subgroup as usize
        && large.fits(plan, caps)
        && large.tile_bytes(plan) + GN_SHARED_BYTES <= caps.max_workgroup_storage;
    match forced {
        Some(coop::CoopTile::T64) => coop::CoopTile::T64,
        _ if large_ok => large,
        _ => coop::CoopTile::T64,
    }
}

pub use crate::kernels::coop::{split_k, SPLIT_K_MIN_STEPS, SPLIT_K_TARGET_GROUPS};

/// `conv2d_small`'s NQ: channel quads per thread, ⌈Cout/4⌉ up to 4 (wider Cout: several N tiles).
fn small_quads(cout: usize) -> usize {
    cout.div_ceil(4).clamp(1, 4)
}

/// One compiled form of the kernel: the tile and its K step (the workgroup-memory footprint).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub tile: Tile,
    /// K consumed per workgroup barrier pair: 32 or 16 for [`Tile::T64`], 16 for the others.
    pub k_step: u32,
}

impl Variant {
    /// The tensor-core kernel (`shaders/conv2d_coop.wgsl`), not one of [`Variant::ALL`]: it runs
    /// only where [`coop::coop_plan`] allows (see [`Tile::Coop`]).
    pub const COOP: Variant = Variant {
        tile: Tile::Coop,
        k_step: 0,
    };

    /// Every variant the FMA shader implements. Tests force each one the adapter can run.
    pub const ALL: [Variant; 4] = [
        Variant {
            tile: Tile::T64,
            k_step: 32,
        },
        Variant {
            tile: Tile::T64,
            k_step: 16,
        },
        Variant {
            tile: Tile::T128,
            k_step: 16,
        },
        Variant {
            tile: Tile::Small,
            k_step: 16,
        },
    ];

    /// Bytes of workgroup memory the entry point declares (see the shader header), the
    /// GroupNorm partials' [`GN_SHARED_BYTES`] included.
    pub fn workgroup_bytes(self) -> u32 {
        let rows_padded = |rows: u32| rows * (self.k_step / 4 + 1) * 16;
        GN_SHARED_BYTES
            + match self.tile {
                Tile::T64 => 2 * rows_padded(64),
                Tile::T128 => 2 * rows_padded(128),
                Tile::Small => rows_padded(64) + 16 * 4 * 16,
                // conv2d_coop declares what matmul_coop's 4·frag tile does; at 16×16 fragments
                // (the larger variant).
                Tile::Coop => coop::CoopTile::T64.tile_bytes(COOP_16X16),
            }
    }

    /// `64`, `64/k16` (the small-workgroup-memory fallback), `128`, `small`.
    pub fn name(self) -> String {
        match (self.tile, self.k_step) {
            (Tile::T64, 16) => "64/k16".into(),
            (t, _) => t.name().into(),
        }
    }
}

/// The variants an adapter with `max_workgroup_storage` bytes of workgroup memory can run.
pub fn variants(max_workgroup_storage: u32) -> Vec<Variant> {
    Variant::ALL
        .into_iter()
        .filter(|v| v.workgroup_bytes() <= max_workgroup_storage)
        .collect()
}

/// 128 × 128 tiles are used from this many upward. The 128 tile's advantage (16 FMA per
/// workgroup-memory read instead of 8, half the loads per FLOP) only pays when every SM gets
/// several of its workgroups: below that, the 64 tile's 4× more workgroups fill the GPU and
/// balance its last wave better. 256 is about 2× the SM count of the large GPUs this targets
/// (H100: 132 SMs, RTX 4090: 128, RX 7900 XTX: 96 CUs); wgpu does not report SM counts, and on
/// smaller GPUs 256 tiles are several waves, where the 128 tile is the better choice anyway.
/// SD 1.5 at 512²: the VAE decoder's convs at 128² and up (~90% of its FLOPs) get 128 tiles;
/// the U-Net stays on 64 (at most 192 tiles of 128) except up-block 2's upsampler conv (640
/// channels at 64², 320 tiles).
pub const LARGE_TILE_MIN_TILES: usize = 256;

/// The variant for a convolution with `m` output pixels and `cout` channels on an adapter with
/// `max_workgroup_storage` bytes of workgroup memory; `forced` (from `LDM_CONV_TILE`) overrides
/// the tile. Every tile computes every shape; a tile the adapter cannot hold falls back to 64,
/// whose K step is the largest that fits.
pub fn choose_variant(
    m: usize,
    cout: usize,
    max_workgroup_storage: u32,
    forced: Option<Tile>,
) -> Variant {
    let tile = forced.unwrap_or(if cout <= 16 {
        Tile::Small
    } else if m.div_ceil(128) * cout.div_ceil(128) >= LARGE_TILE_MIN_TILES {
        Tile::T128
    } else {
        Tile::T64
    });
    let fits = |v: &Variant| v.workgroup_bytes() <= max_workgroup_storage;
    Variant::ALL
        .into_iter()
        .filter(|v| v.tile == tile)
        .find(fits)
        .or_else(|| {
            Variant::ALL
                .into_iter()
                .filter(|v| v.tile == Tile::T64)
                .find(fits)
        })
        .unwrap_or(Variant {
            // 10 KiB: below WebGPU's 16 KiB minimum, so every adapter has it.
            tile: Tile::T64,
            k_step: 16,
        })
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    batch: u32,
    h: u32,
    w: u32,
    cin: u32,
    ho: u32,
    wo: u32,
    cout: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    m: u32,
    k: u32,
    n_tiles: u32,
    flags: u32,
    xh: u32,
    xw: u32,
    ca: u32,
    /// `conv2d_coop_l` split along K: K per split (a multiple of its K step); 0: no split.
    k_chunk: u32,
    /// With `bias_rows` (flags bit 2): the bias table's row stride and first element.
    bias_stride: u32,
    bias_offset: u32,
    /// K of the convolution proper (KH·KW·Cin); `k - k_main` are the [`Shortcut`]'s channels.
    k_main: u32,
    /// With a [`Shortcut`]: channels of its input's first part (all of them unless concatenated).
    tail_ca: u32,
    /// [`GroupPartials`] of the output (flags bit 5): channels per group, pieces per tile image.
    so_gw: u32,
    so_jmax: u32,
    /// [`NormStats::Partials`] of the input (flags bit 6): its group width, the producer's
    /// pieces per tile image and tile, the groups, eps and 1 / group width.
    si_gw: u32,
    si_jmax: u32,
    si_tm: u32,
    si_tn: u32,
    si_groups: u32,
    si_eps: f32,
    si_inv_gw: f32,
    /// The input's producer's piece-group width; with a concatenation, the second part's
    /// producer's width, pieces per tile image and tile.
    si_pw: u32,
    sb_pw: u32,
    sb_jmax: u32,
    sb_tm: u32,
    sb_tn: u32,
    _pad: [u32; 2],
}

/// Output spatial size for one axis, `None` if the padded input is smaller than the kernel.
fn out_size(n: usize, pad_a: usize, pad_b: usize, k: usize, stride: usize) -> Option<usize> {
    let padded = n + pad_a + pad_b;
    if stride == 0 || k == 0 || padded < k {
        return None;
    }
    Some((padded - k) / stride + 1)
}

/// What a convolution reads as its input (NHWC).
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// `x` [B, H, W, Cin].
    Plain(&'a Tensor),
    /// The nearest-neighbour 2× upsampling of `x` [B, H, W, Cin]: the convolution sees
    /// [B, 2H, 2W, Cin] (diffusers `Upsample2D`: `F.interpolate(x, scale_factor=2.0,
    /// mode="nearest")`, then its conv). The kernel reads `x` through the index map
    /// (iy, ix) -> (iy / 2, ix / 2), so the 4×-sized tensor is never written.
    Upsampled2x(&'a Tensor),
    /// The channel concatenation of `a` [B, H, W, Ca] and `b` [B, H, W, Cb]: the convolution sees
    /// [B, H, W, Ca + Cb], channels of `a` first (the U-Net decoder's `torch.cat([h, skip],
    /// dim=1)`). Each load picks `a` or `b` by channel, so the concatenation is never written.
    Concat(&'a Tensor, &'a Tensor),
}

impl Input<'_> {
    /// The tensor bound at binding 0 (x, or the first part of a concatenation).
    fn x(&self) -> &Tensor {
        match self {
            Input::Plain(x) | Input::Upsampled2x(x) | Input::Concat(x, _) => x,
        }
    }

    /// The second part of a concatenation.
    fn second(&self) -> Option<&Tensor> {
        match self {
            Input::Concat(_, b) => Some(b),
            _ => None,
        }
    }

    /// [B, H, W, Cin] as the convolution sees it (after upsampling or concatenation).
    fn shape(&self) -> Result<[usize; 4]> {
        let nhwc = |t: &Tensor| match *t.shape() {
            [b, h, w, c] => Ok([b, h, w, c]),
            _ => Err(Error::shape(
                "conv2d",
                format!(
                    "{} must be NHWC [B, H, W, C], got {:?}",
                    self.describe(),
                    t.shape()
                ),
            )),
        };
        let [b, h, w, c] = nhwc(self.x())?;
        Ok(match self {
            Input::Plain(_) => [b, h, w, c],
            Input::Upsampled2x(_) => [b, 2 * h, 2 * w, c],
            Input::Concat(_, second) => {
                let [b2, h2, w2, c2] = nhwc(second)?;
                if [b2, h2, w2] != [b, h, w] {
                    return Err(Error::shape(
                        "conv2d",
                        format!("{}: both parts must share [B, H, W]", self.describe()),
                    ));
                }
                [b, h, w, c + c2]
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            Input::Plain(x) => format!("x {:?}", x.shape()),
            Input::Upsampled2x(x) => format!("x {:?} upsampled 2×", x.shape()),
            Input::Concat(a, b) => {
                format!("concat(a {:?}, b {:?})", a.shape(), b.shape())
            }
        }
    }
}

/// GroupNorm (+ SiLU) applied to the convolution's input while it is loaded (flags bits 3, 4 of
/// the shaders): the convolution computes `conv(silu(group_norm(x)))` without the normalised
/// tensor ever being written, padding applied after the normalisation (a padding tap is 0).
/// `table` is [B, Cin, 2] f32 (scale, shift) per (batch, input channel) as
/// [`GroupNormOp::stats_into`](crate::kernels::norm::GroupNormOp::stats_into) writes it, over
/// the input as the convolution sees it (both parts of a [`Input::Concat`]; an
/// [`Input::Upsampled2x`] has the statistics of x, which upsampling by repetition keeps).
#[derive(Clone, Copy, Debug)]
pub struct FusedNorm<'a> {
    pub stats: NormStats<'a>,
    pub silu: bool,
}

/// Where a [`FusedNorm`]'s statistics come from.
#[derive(Clone, Copy, Debug)]
pub enum NormStats<'a> {
    /// [B, Cin, 2] f32 (scale, shift) per (batch, input channel), from a statistics dispatch.
    Table(&'a Tensor),
    /// The per-tile pieces the convolution that produced the input left
    /// ([`Conv::run_with_partials`]), merged by this convolution's workgroups as they start: no
    /// statistics dispatch. With an [`Input::Concat`] each part has its producer: `partials`
    /// the first part's, `partials_b` the second's. `groups` are the norm's (over all Cin
    /// channels). `gamma_beta` is [Cin, 2] f32; `gamma` and `beta` (the layer's, [Cin] in the
    /// input's dtype) serve the fallback: where this convolution's tile geometry cannot merge
    /// the pieces (a tile over three images, an upsampled input, a part without pieces, pieces
    /// that straddle a group, more than 128 groups), it computes the table with its own
    /// statistics dispatch.
    Partials {
        partials: &'a GroupPartials,
        partials_b: Option<&'a GroupPartials>,
        groups: usize,
        gamma: &'a Tensor,
        beta: &'a Tensor,
        gamma_beta: &'a Tensor,
        eps: f32,
    },
}

/// The GroupNorm statistics of a convolution's output [B, H, W, C], as its workgroups left them:
/// (count, mean, M2) per (output tile, image, channel group) piece (shaders/conv2d.wgsl, the
/// shared section). Made by [`Conv::run_with_partials`], read by [`NormStats::Partials`]. The
/// piece groups are `width` channels wide (the last one narrower where `width` does not divide
/// C): a consumer's group may merge several of them, and a concatenation's parts each bring
/// their own.
#[derive(Clone, Debug)]
pub struct GroupPartials {
    /// [tiles · 2 · jmax, 4] f32.
    pub buffer: Tensor,
    /// Channels per piece group.
    pub width: usize,
    /// The output it describes, [B, H, W, C].
    pub shape: [usize; 4],
    /// The producer's output tile (rows, channels) and pieces per (tile, image).
    tm: usize,
    tn: usize,
    jmax: usize,
}

/// The most groups a consumer merges (its workgroup table holds 2 images × 128 groups), and the
/// most piece groups a producer writes.
pub const PARTIALS_MAX_GROUPS: usize = 128;

impl GroupPartials {
    /// Whether a consumer whose groups are `gw` channels wide can merge these pieces where
    /// they start at channel `offset` of its input (a concatenation's second part): every
    /// consumer group boundary inside them falls on a piece-group boundary.
    fn tiles_groups(&self, gw: usize, offset: usize) -> bool {
        gw.is_multiple_of(self.width) && offset.is_multiple_of(self.width)
    }
}

/// Whether every tile of `tm` rows over `m` rows of images of `hw` rows spans at most two
/// images (the pieces' and the consumer table's limit).
fn tiles_span_two_images(tm: usize, hw: usize, m: usize) -> bool {
    (0..m.div_ceil(tm)).all(|t| {
        let first = t * tm / hw;
        let last = ((t + 1) * tm).min(m).saturating_sub(1) / hw;
        last <= first + 1
    })
}

/// The most groups one tile of `tn` channels over `c` channels in groups of `gw` touches.
fn pieces_per_tile(tn: usize, gw: usize, c: usize) -> usize {
    (0..c.div_ceil(tn))
        .map(|u| {
            let first = u * tn / gw;
            let last = ((u + 1) * tn).min(c) - 1;
            last / gw - first + 1
        })
        .max()
        .unwrap_or(1)
}

/// A 1×1 convolution (stride 1, no padding, no bias) of another input added to the
/// convolution's output: diffusers ResnetBlock2D's `conv_shortcut(x) + conv2(..)`, computed as
/// more K of conv2's own GEMM (A = [im2col(input) | shortcut input], B = [w | shortcut weight];
/// the shaders' TAIL), so the shortcut's output is never written or read back and takes no
/// dispatch of its own. Its bias is the caller's to fold into the convolution's `bias`.
#[derive(Clone, Copy, Debug)]
pub struct Shortcut<'a> {
    /// [B, Ho, Wo, Cs] (the output's pixels), or a [`Input::Concat`] of two such parts. Read as
    /// stored: no norm, no upsampling.
    pub input: Input<'a>,
    /// [Cout, 1, 1, Cs] (OHWI, as [`weight_oihw_to_ohwi`] leaves a 1×1 conv's weight).
    pub weight: &'a Tensor,
}

/// One convolution with all its options. [`conv2d`], [`conv2d_into`], [`conv2d_upsampled`] and
/// [`conv2d_concat`] are shorthands for it.
///
/// `weight` is [Cout, KH, KW, Cin] (PyTorch weights reordered by [`weight_oihw_to_ohwi`]), `bias`
/// [Cout], `residual` [B, Ho, Wo, Cout] (added after the bias); `pads = [top, bottom, left,
/// right]`; Ho = (H + top + bottom - KH) / stride + 1 with H the input height as the convolution
/// sees it, likewise Wo. The output is [B, Ho, Wo, Cout].
#[derive(Clone, Copy, Debug)]
pub struct Conv<'a> {
    pub input: Input<'a>,
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    /// Instead of `bias`: a bias per (batch, channel), the [B, Cout] block of a wider table
    /// (the U-Net's conv1 bias plus the call's projected time embedding).
    pub bias_rows: Option<ChannelBiasView<'a>>,
    pub residual: Option<&'a Tensor>,
    /// GroupNorm (+ SiLU) of the input, applied as it is loaded.
    pub norm: Option<FusedNorm<'a>>,
    /// A 1×1 convolution of a second input added in the same GEMM ([`Shortcut`]).
    pub shortcut: Option<Shortcut<'a>>,
    pub stride: usize,
    pub pads: [usize; 4],
    /// The kernel variant; `None` picks one by shape ([`choose_variant`], `LDM_CONV_TILE`).
    pub variant: Option<Variant>,
}

impl Conv<'_> {
    /// [B, Ho, Wo, Cout], checking the input and the weight against each other.
    pub fn output_shape(&self) -> Result<[usize; 4]> {
        let op = "conv2d";
        let (xs, ws) = (self.input.shape()?, self.weight.shape());
        let (stride, pads) = (self.stride, self.pads);
        if ws.len() != 4 {
            return Err(Error::shape(
                op,
                format!("w must be [Cout, KH, KW, Cin] (reorder PyTorch weights with weight_oihw_to_ohwi), got {:?}", ws),
            ));
        }
        if ws[3] != xs[3] {
            return Err(Error::shape(
                op,
                format!(
                    "w {:?} has Cin = {} but {} has {} channels",
                    ws,
                    ws[3],
                    self.input.describe(),
                    xs[3]
                ),
            ));
        }
        if xs.contains(&0) || ws.contains(&0) {
            return Err(Error::shape(
                op,
                format!("empty tensor: {}, w {:?}", self.input.describe(), ws),
            ));
        }
        if stride == 0 {
            return Err(Error::shape(op, "stride must be at least 1"));
        }
        let ho = out_size(xs[1], pads[0], pads[1], ws[1], stride);
        let wo = out_size(xs[2], pads[2], pads[3], ws[2], stride);
        match (ho, wo) {
            (Some(ho), Some(wo)) => Ok([xs[0], ho, wo, ws[0]]),
            _ => Err(Error::shape(
                op,
                format!(
                    "kernel {}x{} larger than the padded input {:?} (pads [t, b, l, r] = {:?})",
                    ws[1], ws[2], xs, pads
                ),
            )),
        }
    }

    /// The uniform parameters (shared by conv2d.wgsl and conv2d_coop.wgsl) for an output tile
    /// grid of `n_tiles` along Cout.
    fn params(
        &self,
        [b, ho, wo, cout]: [usize; 4],
        [h, wi, cin]: [usize; 3],
        k: usize,
        n_tiles: usize,
    ) -> Params {
        let x = self.input.x();
        let [kh, kw] = [self.weight.shape()[1], self.weight.shape()[2]];
        Params {
            batch: b as u32,
            h: h as u32,
            w: wi as u32,
            cin: cin as u32,
            ho: ho as u32,
            wo: wo as u32,
            cout: cout as u32,
            kh: kh as u32,
            kw: kw as u32,
            stride: self.stride as u32,
            pad_top: self.pads[0] as u32,
            pad_left: self.pads[2] as u32,
            m: (b * ho * wo) as u32,
            k: k as u32,
            n_tiles: n_tiles as u32,
            flags: (self.bias.is_some() || self.bias_rows.is_some()) as u32
                | (self.residual.is_some() as u32) << 1
                | (self.bias_rows.is_some() as u32) << 2
                | (self.norm.is_some() as u32) << 3
                | (self.norm.is_some_and(|n| n.silu) as u32) << 4,
            xh: x.shape()[1] as u32,
            xw: x.shape()[2] as u32,
            ca: x.shape()[3] as u32,
            k_chunk: 0,
            bias_stride: self.bias_rows.map_or(0, |v| v.table.dim(1) as u32),
            bias_offset: self
                .bias_rows
                .map_or(0, |v| (v.row * v.table.dim(1) + v.col) as u32),
            k_main: (kh * kw * cin) as u32,
            tail_ca: self.shortcut.map_or(0, |sc| sc.input.x().shape()[3] as u32),
            so_gw: 0,
            so_jmax: 0,
            si_gw: 0,
            si_jmax: 0,
            si_tm: 0,
            si_tn: 0,
            si_groups: 0,
            si_eps: 0.0,
            si_inv_gw: 0.0,
            si_pw: 0,
            sb_pw: 0,
            sb_jmax: 0,
            sb_tm: 0,
            sb_tn: 0,
            _pad: [0; 2],
        }
    }

    /// The TAIL and TAIL_CONCAT overrides both shaders read ([`Shortcut`]).
    fn tail_overrides(&self) -> [(&'static str, f64); 2] {
        let on = |b: bool| f64::from(u8::from(b));
        [
            ("TAIL", on(self.shortcut.is_some())),
            (
                "TAIL_CONCAT",
                on(self.shortcut.is_some_and(|sc| sc.input.second().is_some())),
            ),
        ]
    }

    /// What binding 3 reads: the bias, or the table `bias_rows` is a block of.
    fn bias_table(&self) -> Option<&Tensor> {
        self.bias.or(self.bias_rows.map(|v| v.table))
    }

    /// The tensors at bindings 0-14 (unused ones get x, read-only like them; 6 is the uniform,
    /// 7 the tensor-core kernel's partial sums, 9-11 the [`Shortcut`]'s input parts and weight,
    /// 12 the output's [`GroupPartials`] (else `out` again: both read-write, never written
    /// there), 13 and 14 the input's: its first part's and its second's) and their bytes.
    fn bindings<'t>(&'t self, out: &'t Tensor, gn: &GnSide<'t>) -> ([&'t Tensor; 15], f64) {
        let x = self.input.x();
        let second = self.input.second();
        let table = self.norm.map(|n| match n.stats {
            NormStats::Table(t) => t,
            NormStats::Partials { gamma_beta, .. } => gamma_beta,
        });
        let gn_in = gn.input.as_ref().map(|i| &i.first.buffer);
        let gn_in_b = gn.input.as_ref().and_then(|i| i.second.map(|p| &p.buffer));
        let tail_x = self.shortcut.as_ref().map(|sc| sc.input.x());
        let tail_second = self.shortcut.as_ref().and_then(|sc| sc.input.second());
        let tail_w = self.shortcut.map(|sc| sc.weight);
        let tensors = [
            x,
            second.unwrap_or(x),
            self.weight,
            self.bias_table().unwrap_or(x),
            self.residual.unwrap_or(x),
            out,
            x,
            x,
            table.unwrap_or(x),
            tail_x.unwrap_or(x),
            tail_second.unwrap_or(x),
            tail_w.unwrap_or(x),
            gn.out.map_or(out, |(t, _, _)| t),
            gn_in.unwrap_or(x),
            gn_in_b.unwrap_or(x),
        ];
        let bytes = [
            Some(x),
            second,
            Some(self.weight),
            self.bias_table(),
            self.residual,
            Some(out),
            table,
            tail_x,
            tail_second,
            tail_w,
            gn.out.map(|(t, _, _)| t),
            gn_in,
            gn_in_b,
        ]
        .into_iter()
        .flatten()
        .map(|t| t.size_bytes() as f64)
        .sum();
        (tensors, bytes)
    }

    /// Record the tensor-core kernel (`shaders/conv2d_coop.wgsl`); shapes already checked. The
    /// large tile splits K where its grid is small ([`split_k`]): then one more dispatch adds
    /// the splits' f32 partial sums.
    fn dispatch_coop(
        &self,
        gpu: &Gpu,
        out: &Tensor,
        plan: CoopPlan,
        shape: &Checked,
        gn: &GnSide<'_>,
    ) -> Result<()> {
        let (out_shape, in_shape, k) = (shape.out, shape.input, shape.k);
        let [b, ho, wo, cout] = out_shape;
        let m = b * ho * wo;
        let CoopGeometry {
            tile: coop_tile,
            tm,
            tn,
            k_chunk,
        } = coop_geometry(gpu, plan, m, cout, k);
        let n_tiles = cout.div_ceil(tn);
        let tiles = m.div_ceil(tm) * n_tiles;
        let mut params = self.params(out_shape, in_shape, k, n_tiles);
        gn.apply(&mut params);
        let (tensors, bytes) = self.bindings(out, gn);
        let flag = |on: bool| f64::from(u8::from(on));
        let tail = self.tail_overrides();
        let entry = match coop_tile {
            coop::CoopTile::T64 => "conv2d_coop",
            coop::CoopTile::T128 => "conv2d_coop_l",
        };
        let splits = k_chunk.map_or(1, |c| k.div_ceil(c));
        params.k_chunk = k_chunk.unwrap_or(0) as u32;
        // Binding 7: the partial sums, or a small stand-in (the large tile declares it always).
        let partial = gpu.empty(
            &[if splits > 1 { splits * m * cout } else { 1 }],
            DType::F32,
        )?;
        let mut with_partial = tensors;
        with_partial[7] = &partial;
        let grid = grid_1d(tiles as u64);
        gpu.dispatch(&Dispatch {
            shader: plan.shader(ShaderId::Conv2dCoop),
            entry,
            dtype: out.dtype(),
            overrides: &[
                ("SG", plan.subgroup as f64),
                (
                    "UPSAMPLE",
                    flag(matches!(self.input, Input::Upsampled2x(_))),
                ),
                ("CONCAT", flag(self.input.second().is_some())),
                ("SPLIT", flag(splits > 1)),
                // The large tile's channels. The 64 tile never reads the large tile's layout,
                // but the overrides derived from TLN (SG_COLS, SG_ROWS, FR_ROWS) are evaluated
                // for its pipeline too, so it gets the default, 8·frag, not a placeholder 0.
                (
                    "TLN",
                    if coop_tile == coop::CoopTile::T128 {
                        tn as f64
                    } else {
                        coop::CoopTile::T128.side(plan) as f64
                    },
                ),
                tail[0],
                tail[1],
            ],
            tensors: &with_partial,
            params: bytemuck::bytes_of(&params),
            workgroups: [grid[0], grid[1], splits as u32],
            label: entry,
            work: Work {
                flops: 2.0 * (m * cout * k) as f64,
                bytes: bytes + (splits > 1) as u8 as f64 * partial.size_bytes() as f64,
            },
        })?;
        if splits == 1 {
            return Ok(());
        }
        let reduce_tile = coop::CoopTile::T64.side(plan);
        gpu.dispatch(&Dispatch {
            shader: plan.shader(ShaderId::Conv2dCoop),
            entry: "conv2d_split_reduce",
            dtype: out.dtype(),
            overrides: &[],
            tensors: &with_partial,
            params: bytemuck::bytes_of(&params),
            workgroups: grid_1d((m.div_ceil(reduce_tile) * cout.div_ceil(reduce_tile)) as u64),
            label: "conv2d_split_reduce",
            work: Work {
                flops: (splits * m * cout) as f64,
                bytes: partial.size_bytes() as f64 + out.size_bytes() as f64,
            },
        })
    }

    /// Run into a new tensor.
    pub fn run(&self, gpu: &Gpu) -> Result<Tensor> {
        let out = gpu.empty(&self.output_shape()?, self.input.x().dtype())?;
        self.run_into(gpu, &out)?;
        Ok(out)
    }

    /// Run into `out`, which must not share a buffer with any input: check the shapes, choose
    /// the kernel, record it.
    pub fn run_into(&self, gpu: &Gpu, out: &Tensor) -> Result<()> {
        self.run_inner(gpu, out, None).map(|_| ())
    }

    /// Run into a new tensor, and leave the GroupNorm statistics of the output in groups of
    /// `width` channels (the last one narrower where `width` does not divide Cout) as per-tile
    /// pieces ([`GroupPartials`]) for a consumer's [`NormStats::Partials`]: the next GroupNorm
    /// then needs no statistics dispatch. None where this convolution's tile geometry cannot (a
    /// tile over three images, more than [`PARTIALS_MAX_GROUPS`] groups, width 0): the output
    /// is the same, the consumer computes its table. `buffer(pieces)` gives the [pieces, 4]
    /// f32 tensor the pieces go to.
    pub fn run_with_partials(
        &self,
        gpu: &Gpu,
        width: usize,
        buffer: impl FnOnce(usize) -> Result<Tensor>,
    ) -> Result<(Tensor, Option<GroupPartials>)> {
        let out = gpu.empty(&self.output_shape()?, self.input.x().dtype())?;
        let mut buffer = Some(buffer);
        let mut take = |pieces: usize| (buffer.take().expect("one buffer per run"))(pieces);
        let partials = self.run_inner(gpu, &out, Some((width, &mut take)))?;
        Ok((out, partials))
    }

    /// `produce`: the piece-group width of the output's statistics and where their pieces go.
    fn run_inner(
        &self,
        gpu: &Gpu,
        out: &Tensor,
        produce: Option<(usize, &mut PiecesBuffer<'_>)>,
    ) -> Result<Option<GroupPartials>> {
        let shape = self.validate(out)?;
        let (variant, plan) = self.choose(gpu, &shape)?;
        let [b, ho, wo, cout] = shape.out;
        let m = b * ho * wo;
        // This convolution's own tile rows (where its fused norm reads the merged statistics)
        // and the tile of the kernel that writes `out` (the split-K reduce's where K splits).
        let (own_tm, out_tile) = match plan {
            Some(plan) => {
                let g = coop_geometry(gpu, plan, m, cout, shape.k);
                // The reduce's tile is the small tile's (TM × TN).
                let out_tile = if g.k_chunk.is_some() {
                    let t = coop::CoopTile::T64.side(plan);
                    (t, t)
                } else {
                    (g.tm, g.tn)
                };
                (g.tm, out_tile)
            }
            None => {
                let (tm, tn) = variant.tile.size(cout);
                (tm, (tm, tn))
            }
        };
        // The input's statistics: merged here where this geometry can, else a table first.
        if let Some(FusedNorm {
            stats:
                NormStats::Partials {
                    partials,
                    partials_b,
                    groups,
                    gamma,
                    beta,
                    eps,
                    ..
                },
            silu,
        }) = self.norm
        {
            let [_, _, _, cin] = self.input.shape()?;
            let gw = cin / groups.max(1);
            let part = |p: &GroupPartials, t: &Tensor, offset: usize| {
                p.shape[..] == *t.shape() && p.tiles_groups(gw, offset)
            };
            let parts_merge = match self.input {
                Input::Plain(x) => part(partials, x, 0),
                Input::Concat(a, b) => {
                    part(partials, a, 0) && partials_b.is_some_and(|p| part(p, b, a.dim(3)))
                }
                Input::Upsampled2x(_) => false,
            };
            let mergeable = parts_merge
                && groups > 0
                && groups <= PARTIALS_MAX_GROUPS
                && cin.is_multiple_of(groups)
                && tiles_span_two_images(own_tm, ho * wo, m);
            if !mergeable {
                let table = gpu.empty(&[b, cin, 2], DType::F32)?;
                let op = crate::kernels::norm::GroupNormOp {
                    groups,
                    eps,
                    gamma,
                    beta,
                    silu: false,
                };
                op.stats_into(gpu, self.input.x(), self.input.second(), &table)?;
                let conv = Conv {
                    norm: Some(FusedNorm {
                        stats: NormStats::Table(&table),
                        silu,
                    }),
                    ..*self
                };
                return conv.run_inner(gpu, out, produce);
            }
        }
        // The output's statistics, where its writer's tiles allow.
        let produced = match produce {
            Some((width, buffer))
                if width > 0
                    && cout.div_ceil(width) <= PARTIALS_MAX_GROUPS
                    && tiles_span_two_images(out_tile.0, ho * wo, m) =>
            {
                let (tm, tn) = out_tile;
                let jmax = pieces_per_tile(tn, width, cout);
                let pieces = m.div_ceil(tm) * cout.div_ceil(tn) * 2 * jmax;
                Some(GroupPartials {
                    buffer: buffer(pieces)?,
                    width,
                    shape: shape.out,
                    tm,
                    tn,
                    jmax,
                })
            }
            _ => None,
        };
        let gn = GnSide {
            out: produced.as_ref().map(|p| (&p.buffer, p.width, p.jmax)),
            input: self.norm.and_then(|n| match n.stats {
                NormStats::Partials {
                    partials,
                    partials_b,
                    groups,
                    eps,
                    ..
                } => Some(MergedInput {
                    first: partials,
                    second: partials_b.filter(|_| self.input.second().is_some()),
                    groups,
                    eps,
                }),
                NormStats::Table(_) => None,
            }),
        };
        match plan {
            Some(plan) => self.dispatch_coop(gpu, out, plan, &shape, &gn)?,
            None => self.dispatch_fma(gpu, out, variant, &shape, &gn)?,
        }
        Ok(produced)
    }

    /// Every input's shape and dtype against the convolution's, no aliasing of `out`, and
    /// sizes that 32-bit indexing covers.
    fn validate(&self, out: &Tensor) -> Result<Checked> {
        let op = "conv2d";
        let [b, ho, wo, cout] = self.output_shape()?;
        let [_, h, wi, cin] = self.input.shape()?;
        let (x, w) = (self.input.x(), self.weight);
        let (bias, residual, stride, pads) = (self.bias, self.residual, self.stride, self.pads);
        let dtype = x.dtype();
        let mut inputs = vec![("x", x), ("w", w)];
        if let Some(t) = self.input.second() {
            inputs[0].0 = "a";
            inputs.insert(1, ("b", t));
        }
        if let Some(t) = bias {
            if t.shape() != [cout] {
                return Err(Error::shape(
                    op,
                    format!("bias must be [{cout}], got {:?}", t.shape()),
                ));
            }
            inputs.push(("bias", t));
        }
        if let Some(v) = self.bias_rows {
            let t = v.table;
            let fits = bias.is_none()
                && t.shape().len() == 2
                && v.row + b <= t.dim(0)
                && v.col + cout <= t.dim(1)
                && t.numel() <= u32::MAX as usize;
            if !fits {
                return Err(Error::shape(
                    op,
                    format!(
                        "bias_rows (without bias) must be a [{b}, {cout}] block: rows {}.., \
                         columns {}.. of {:?}",
                        v.row,
                        v.col,
                        t.shape()
                    ),
                ));
            }
            inputs.push(("bias_rows", t));
        }
        if let Some(t) = residual {
            if t.shape() != [b, ho, wo, cout] {
                return Err(Error::shape(
                    op,
                    format!(
                        "residual must be {:?}, got {:?}",
                        [b, ho, wo, cout],
                        t.shape()
                    ),
                ));
            }
            inputs.push(("residual", t));
        }
        if out.shape() != [b, ho, wo, cout] {
            return Err(Error::shape(
                op,
                format!("out must be {:?}, got {:?}", [b, ho, wo, cout], out.shape()),
            ));
        }
        let mut tail_channels = 0;
        if let Some(sc) = &self.shortcut {
            let [sb, sh, sw, cs] = match &sc.input {
                Input::Upsampled2x(_) => {
                    return Err(Error::shape(
                        op,
                        "a shortcut reads its input as stored: not upsampled",
                    ))
                }
                input => input.shape()?,
            };
            if [sb, sh, sw] != [b, ho, wo] {
                return Err(Error::shape(
                    op,
                    format!(
                        "the shortcut's input {} must have the output's pixels {:?}",
                        sc.input.describe(),
                        [b, ho, wo]
                    ),
                ));
            }
            if sc.weight.shape() != [cout, 1, 1, cs] {
                return Err(Error::shape(
                    op,
                    format!(
                        "the shortcut's weight must be [{cout}, 1, 1, {cs}], got {:?}",
                        sc.weight.shape()
                    ),
                ));
            }
            tail_channels = cs;
            inputs.push(("shortcut input", sc.input.x()));
            if let Some(t) = sc.input.second() {
                inputs.push(("shortcut input (second part)", t));
            }
            inputs.push(("shortcut weight", sc.weight));
        }
        for (name, t) in inputs.iter().chain([("out", out)].iter()) {
            if t.dtype() != dtype {
                return Err(Error::shape(
                    op,
                    format!(
                        "{name} is {} but {} is {}",
                        t.dtype().name(),
                        inputs[0].0,
                        dtype.name()
                    ),
                ));
            }
        }
        match self.norm.map(|n| n.stats) {
            Some(NormStats::Table(table)) => {
                if table.shape() != [b, cin, 2] || table.dtype() != DType::F32 {
                    return Err(Error::shape(
                        op,
                        format!(
                            "the GroupNorm table must be [{b}, {cin}, 2] f32 (scale, shift per \
                             batch item and input channel), got {table:?}"
                        ),
                    ));
                }
                inputs.push(("GroupNorm table", table));
            }
            Some(NormStats::Partials {
                gamma_beta,
                partials,
                ..
            }) => {
                if gamma_beta.shape() != [cin, 2] || gamma_beta.dtype() != DType::F32 {
                    return Err(Error::shape(
                        op,
                        format!(
                            "the GroupNorm (gamma, beta) table must be [{cin}, 2] f32, got \
                             {gamma_beta:?}"
                        ),
                    ));
                }
                inputs.push(("GroupNorm (gamma, beta)", gamma_beta));
                inputs.push(("GroupNorm partials", &partials.buffer));
            }
            None => {}
        }
        // wgpu refuses a buffer bound read-only and read-write in one dispatch (wgpu#8470).
        for (name, t) in &inputs {
            if t.buffer_id() == out.buffer_id() {
                return Err(Error::shape(
                    op,
                    format!("out shares its buffer with {name}: convolution cannot run in place"),
                ));
            }
        }
        let [kh, kw] = [w.shape()[1], w.shape()[2]];
        let m = b * ho * wo;
        let k = kh * kw * cin + tail_channels;
        // The shader indexes in u32 elements; the binding limits keep tensors far below this, but a
        // pathological shape on a huge-binding adapter must not wrap silently.
        let second_numel = self.input.second().map_or(0, |t| t.numel());
        let tail_numel = inputs.iter().map(|(_, t)| t.numel()).max().unwrap_or(0);
        let too_big = [
            x.numel(),
            second_numel,
            w.numel(),
            out.numel(),
            m,
            k,
            tail_numel,
        ]
        .iter()
        .any(|&v| v >= u32::MAX as usize / 2)
            || [h, wi, stride, pads[0], pads[2]]
                .iter()
                .any(|&v| v >= i32::MAX as usize / 4);
        if too_big {
            return Err(Error::shape(
                op,
                format!(
                    "shapes too large for 32-bit indexing: {}, w {:?}",
                    self.input.describe(),
                    w.shape()
                ),
            ));
        }
        Ok(Checked {
            out: [b, ho, wo, cout],
            input: [h, wi, cin],
            m,
            k,
            dtype,
            // The vec4 paths need every aligned group of 4 channels inside one source.
            vec4_ok: cin.is_multiple_of(4)
                && x.shape()[3].is_multiple_of(4)
                && tail_channels.is_multiple_of(4)
                && self
                    .shortcut
                    .is_none_or(|sc| sc.input.x().shape()[3].is_multiple_of(4)),
        })
    }

    /// The kernel: the forced variant if any (refused where this adapter cannot run it), else
    /// the default policy. Returns the tensor-core plan when the tensor-core kernel runs.
    fn choose(&self, gpu: &Gpu, shape: &Checked) -> Result<(Variant, Option<CoopPlan>)> {
        let (m, cout, dtype) = (shape.m, shape.out[3], shape.dtype);
        let coop_plan = coop::coop_plan(gpu, dtype).filter(|_| shape.vec4_ok);
        let variant = match self.variant {
            Some(v) if v.tile == Tile::Coop => {
                if coop_plan.is_none() {
                    return Err(Error::Unsupported(format!(
                        "conv2d coop variant for {} {}: needs f16, an adapter with f16 \
                         cooperative matrices with the path on (LDM_COOP_MATMUL), and channels \
                         (of each concatenated part) a multiple of 4",
                        self.input.describe(),
                        dtype.name()
                    )));
                }
                v
            }
            Some(v) => {
                if !Variant::ALL.contains(&v) {
                    return Err(Error::Unsupported(format!(
                        "conv2d variant {v:?}: the shader implements {:?}",
                        Variant::ALL
                    )));
                }
                if v.workgroup_bytes() > gpu.caps.max_workgroup_storage {
                    return Err(Error::LimitExceeded {
                        what: format!("conv2d variant {}: workgroup memory", v.name()),
                        requested: v.workgroup_bytes() as u64,
                        limit: gpu.caps.max_workgroup_storage as u64,
                        hint: "force a variant from conv2d::variants(..) for this adapter, or \
                               none"
                            .into(),
                    });
                }
                v
            }
            None => {
                let max_wg = gpu.caps.max_workgroup_storage;
                match (gpu.policy().conv_tile, coop_plan) {
                    // Tensor cores where the adapter runs their large tile (`conv2d_coop_l`:
                    // division-free staging, prefetch, split K on small grids), except the
                    // conv_out layers (Cout ≤ 16 would waste most of a fragment); the FMA tiles
                    // elsewhere. On the first real GPU (NVIDIA H200, 2026-12-04,
                    // benches/RESULTS.md) the 64-tile tensor-core kernel ran every SD 1.5 conv
                    // 1.3-2.4× slower than the FMA tiles, so it runs only when forced
                    // (LDM_CONV_TILE=coop LDM_COOP_TILE=64).
                    (None, Some(plan))
                        if cout > 16
                            && coop_conv_tile(plan, &gpu.caps, m, cout, None)
                                == coop::CoopTile::T128 =>
                    {
                        Variant::COOP
                    }
                    (Some(Tile::Coop), Some(_)) => Variant::COOP,
                    (Some(Tile::Coop), None) => choose_variant(m, cout, max_wg, None),
                    (forced, _) => choose_variant(m, cout, max_wg, forced),
                }
            }
        };
        let plan = (variant.tile == Tile::Coop).then_some(coop_plan).flatten();
        Ok((variant, plan))
    }

    /// Record an FMA variant (`shaders/conv2d.wgsl`); shapes already checked.
    fn dispatch_fma(
        &self,
        gpu: &Gpu,
        out: &Tensor,
        variant: Variant,
        shape: &Checked,
        gn: &GnSide<'_>,
    ) -> Result<()> {
        let (m, k, cout) = (shape.m, shape.k, shape.out[3]);
        let (tile_m, tile_n) = variant.tile.size(cout);
        let n_tiles = cout.div_ceil(tile_n);
        let m_tiles = m.div_ceil(tile_m);
        let mut params = self.params(shape.out, shape.input, k, n_tiles);
        gn.apply(&mut params);
        let vec4_k = f64::from(u8::from(shape.vec4_ok));
        let upsample = f64::from(u8::from(matches!(self.input, Input::Upsampled2x(_))));
        let concat = f64::from(u8::from(self.input.second().is_some()));
        let (tensors, bytes) = self.bindings(out, gn);
        // Only the overrides an entry point reads (each distinct set is a pipeline).
        let [tail, tail_concat] = self.tail_overrides();
        let mut overrides = vec![
            ("VEC4_K", vec4_k),
            ("UPSAMPLE", upsample),
            ("CONCAT", concat),
            tail,
            tail_concat,
        ];
        let entry = match variant.tile {
            Tile::T64 => {
                // BK = 32 halves the barriers per FLOP; its tiles need 18 KiB of workgroup memory,
                // 2 KiB over WebGPU's minimum, hence the 16 fallback (chosen in choose_variant).
                overrides.push(("BK", variant.k_step as f64));
                "conv2d_64"
            }
            Tile::T128 => "conv2d_128",
            Tile::Small => {
                overrides.push(("NQ", small_quads(cout) as f64));
                "conv2d_small"
            }
            Tile::Coop => unreachable!("the tensor-core kernel is dispatch_coop's"),
        };
        gpu.dispatch(&Dispatch {
            shader: ShaderId::Conv2d,
            entry,
            dtype: shape.dtype,
            overrides: &overrides,
            tensors: &tensors,
            params: bytemuck::bytes_of(&params),
            workgroups: grid_1d((m_tiles * n_tiles) as u64),
            label: "conv2d",
            work: Work {
                flops: 2.0 * (m * cout * k) as f64,
                bytes,
            },
        })
    }
}

/// What [`Conv::validate`] established: the output [B, Ho, Wo, Cout] and input [H, W, Cin]
/// shapes as the convolution sees them, the GEMM's M and K, the dtype, and whether every
/// aligned group of 4 channels lies in one source (the vec4 paths).
struct Checked {
    out: [usize; 4],
    input: [usize; 3],
    m: usize,
    k: usize,
    dtype: DType,
    vec4_ok: bool,
}

/// Gives the [pieces, 4] f32 tensor a producer's [`GroupPartials`] go to.
type PiecesBuffer<'a> = dyn FnMut(usize) -> Result<Tensor> + 'a;

/// The GroupNorm side of one dispatch: the output's pieces to write (buffer, group width,
/// pieces per tile image) and the input's to merge.
struct GnSide<'a> {
    out: Option<(&'a Tensor, usize, usize)>,
    input: Option<MergedInput<'a>>,
}

/// The pieces a consumer merges: its input's (a concatenation's first part's), the second
/// part's, and the norm's groups and eps.
struct MergedInput<'a> {
    first: &'a GroupPartials,
    second: Option<&'a GroupPartials>,
    groups: usize,
    eps: f32,
}

impl GnSide<'_> {
    /// Flags bits 5 and 6 and their parameters.
    fn apply(&self, params: &mut Params) {
        if let Some((_, gw, jmax)) = self.out {
            params.flags |= 1 << 5;
            params.so_gw = gw as u32;
            params.so_jmax = jmax as u32;
        }
        if let Some(input) = &self.input {
            let (p, groups) = (input.first, input.groups);
            let gw = params.cin as usize / groups;
            params.flags |= 1 << 6;
            params.si_gw = gw as u32;
            params.si_jmax = p.jmax as u32;
            params.si_tm = p.tm as u32;
            params.si_tn = p.tn as u32;
            params.si_groups = groups as u32;
            params.si_eps = input.eps;
            params.si_inv_gw = 1.0 / gw as f32;
            params.si_pw = p.width as u32;
            if let Some(q) = input.second {
                params.sb_pw = q.width as u32;
                params.sb_jmax = q.jmax as u32;
                params.sb_tm = q.tm as u32;
                params.sb_tn = q.tn as u32;
            }
        }
    }
}

/// How the tensor-core conv covers an [m, cout] output with reduction length k.
struct CoopGeometry {
    tile: coop::CoopTile,
    /// Output pixels and channels per workgroup: the tile's side, and for the large tile's
    /// narrow variant (the policy's `coop_conv_narrow`) half of it in channels.
    tm: usize,
    tn: usize,
    /// K per split where the large tile splits K ([`split_k`]; only where the partial sums fit
    /// one binding).
    k_chunk: Option<usize>,
}

fn coop_geometry(gpu: &Gpu, plan: CoopPlan, m: usize, cout: usize, k: usize) -> CoopGeometry {
    let tile = coop_conv_tile(plan, &gpu.caps, m, cout, coop::forced_coop_tile(gpu));
    let tm = tile.side(plan);
    let narrow = tile == coop::CoopTile::T128 && gpu.policy().coop_conv_narrow;
    let tn = if narrow { tm / 2 } else { tm };
    let tiles = m.div_ceil(tm) * cout.div_ceil(tn);
    let k_chunk = match tile {
        coop::CoopTile::T64 => None,
        coop::CoopTile::T128 => split_k(plan, tiles, k)
            .filter(|&c| (k.div_ceil(c) * m * cout * 4) as u64 <= gpu.caps.max_storage_binding),
    };
    CoopGeometry {
        tile,
        tm,
        tn,
        k_chunk,
    }
}

/// 2-D convolution: `x` [B, H, W, Cin] NHWC, `w` [Cout, KH, KW, Cin], `bias` [Cout],
/// `residual` [B, Ho, Wo, Cout] added after the bias. `pads = [top, bottom, left, right]`;
/// Ho = (H + top + bottom - KH) / stride + 1, likewise Wo. Returns [B, Ho, Wo, Cout].
pub fn conv2d(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    stride: usize,
    pads: [usize; 4],
) -> Result<Tensor> {
    Conv {
        input: Input::Plain(x),
        weight: w,
        bias,
        bias_rows: None,
        residual,
        norm: None,
        shortcut: None,
        stride,
        pads,
        variant: None,
    }
    .run(gpu)
}

/// The convolution of `x` [B, H, W, Cin] upsampled 2× (nearest), without writing the upsampled
/// tensor: diffusers `Upsample2D` in one kernel. Returns [B, Ho, Wo, Cout] with Ho computed
/// from 2H (Ho = 2H for the 3×3, stride 1, padding 1 conv of Upsample2D).
pub fn conv2d_upsampled(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    stride: usize,
    pads: [usize; 4],
) -> Result<Tensor> {
    Conv {
        input: Input::Upsampled2x(x),
        weight: w,
        bias,
        bias_rows: None,
        residual,
        norm: None,
        shortcut: None,
        stride,
        pads,
        variant: None,
    }
    .run(gpu)
}

/// The geometry of one convolution, for the host [`reference`]: input [B, H, W, Cin], weight
/// [Cout, KH, KW, Cin], stride and `pads = [top, bottom, left, right]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pads: [usize; 4],
}

/// Nearest-neighbour 2× upsampling of NHWC `x` [B, H, W, C] on the host: the input that
/// [`Input::Upsampled2x`] stands for (`reference(upsample_nearest2x_host(x), ..)` is its
/// specification).
pub fn upsample_nearest2x_host(x: &[f32], b: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    assert_eq!(
        x.len(),
        b * h * w * c,
        "upsample_nearest2x_host: x is not [{b}, {h}, {w}, {c}]"
    );
    let mut out = Vec::with_capacity(4 * x.len());
    for bi in 0..b {
        for y in 0..2 * h {
            for xx in 0..2 * w {
                let src = ((bi * h + y / 2) * w + xx / 2) * c;
                out.extend_from_slice(&x[src..src + c]);
            }
        }
    }
    out
}

/// Channel concatenation of NHWC `a` [.., Ca] and `b` [.., Cb] over `pixels` pixels on the host:
/// the input that [`Input::Concat`] stands for.
pub fn concat_channels_host(a: &[f32], b: &[f32], pixels: usize, ca: usize, cb: usize) -> Vec<f32> {
    assert_eq!(
        a.len(),
        pixels * ca,
        "concat_channels_host: a is not [{pixels}, {ca}]"
    );
    assert_eq!(
        b.len(),
        pixels * cb,
        "concat_channels_host: b is not [{pixels}, {cb}]"
    );
    let mut out = Vec::with_capacity(a.len() + b.len());
    for p in 0..pixels {
        out.extend_from_slice(&a[p * ca..(p + 1) * ca]);
        out.extend_from_slice(&b[p * cb..(p + 1) * cb]);
    }
    out
}

/// PyTorch's conv weight [Cout, Cin, KH, KW] reordered to [Cout, KH, KW, Cin] (done once, at
/// weight-load time). Panics if `w.len() != cout·cin·kh·kw` (a loader bug, not user input: the
/// weight loader checks checkpoint shapes first).
pub fn weight_oihw_to_ohwi<T: Copy + Default>(
    w: &[T],
    cout: usize,
    cin: usize,
    kh: usize,
    kw: usize,
) -> Vec<T> {
    assert_eq!(
        w.len(),
        cout * cin * kh * kw,
        "weight_oihw_to_ohwi: {} values for [{cout}, {cin}, {kh}, {kw}]",
        w.len()
    );
    let mut out = vec![T::default(); w.len()];
    for o in 0..cout {
        for i in 0..cin {
            for y in 0..kh {
                for x in 0..kw {
                    out[((o * kh + y) * kw + x) * cin + i] = w[((o * cin + i) * kh + y) * kw + x];
                }
            }
        }
    }
    out
}

/// The specification: direct convolution in f64 over NHWC `x`, OHWI `w_ohwi`, with zero padding
/// `pads = [top, bottom, left, right]`, then `+ bias[co] + residual[b, oy, ox, co]`.
/// Returns [B, Ho, Wo, Cout].
pub fn reference(
    x: &[f32],
    w_ohwi: &[f32],
    (bias, residual): (Option<&[f32]>, Option<&[f32]>),
    shape: &ConvShape,
) -> Vec<f64> {
    let ConvShape {
        b,
        h,
        w,
        cin,
        cout,
        kh,
        kw,
        stride,
        pads,
    } = *shape;
    let ho = out_size(h, pads[0], pads[1], kh, stride).expect("kernel larger than padded input");
    let wo = out_size(w, pads[2], pads[3], kw, stride).expect("kernel larger than padded input");
    assert_eq!(x.len(), b * h * w * cin);
    assert_eq!(w_ohwi.len(), cout * kh * kw * cin);
    let mut out = vec![0.0f64; b * ho * wo * cout];
    for bi in 0..b {
        for oy in 0..ho {
            for ox in 0..wo {
                let o = ((bi * ho + oy) * wo + ox) * cout;
                for co in 0..cout {
                    let mut acc = bias.map_or(0.0, |bs| bs[co] as f64);
                    for ky in 0..kh {
                        let iy = (oy * stride + ky) as isize - pads[0] as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..kw {
                            let ix = (ox * stride + kx) as isize - pads[2] as isize;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            let xr = &x[((bi * h + iy as usize) * w + ix as usize) * cin..][..cin];
                            let wr = &w_ohwi[((co * kh + ky) * kw + kx) * cin..][..cin];
                            acc += xr
                                .iter()
                                .zip(wr)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>();
                        }
                    }
                    if let Some(r) = residual {
                        acc += r[o + co] as f64;
                    }
                    out[o + co] = acc;
                }
            }
        }
    }
    out
}
