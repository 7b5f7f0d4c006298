//! conv2d (implicit GEMM, NHWC) against the f64 reference: awkward sizes, every padding/stride
//! mode, with and without bias/residual, the fused input modes (2× nearest upsampling, two-source
//! channel concatenation), both dtypes, NaN-poisoned outputs, and SD 1.5 shapes. Every case runs
//! on every kernel variant (tile × K step) the adapter can hold, forced, not left to the shape
//! heuristic; the heuristic itself is tested separately.
//!
//! Tolerances (relative L2): f32 ≤ 1e-5: the kernel accumulates K = KH·KW·Cin products in f32 in a
//! different order than the f64 reference; the error of such a sum grows like √K·2⁻²⁴ relative to
//! the sum's scale, ≈ 6e-6 at the largest K here (11,520), and the measured errors stay below 2e-6.
//! f16 ≤ 2e-3: inputs are rounded to f16 on both sides; what remains is the final rounding of each
//! output to f16 (2⁻¹¹ relative, ≈ 3e-4 in L2).

mod common;

use common::*;
use ldm_wgpu::kernels::conv2d::{choose_variant, Conv, Input, Tile, Variant};
use ldm_wgpu::kernels::coop::{CoopPlan, CoopTile};
use ldm_wgpu::kernels::{conv2d, fill, norm};
use ldm_wgpu::runtime::KernelPolicy;
use ldm_wgpu::{DType, Error, Gpu, GpuOptions, Tensor};

/// How the kernel receives the input x [b, h, w, cin] of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Plain,
    /// `Input::Upsampled2x`: the convolution sees x upsampled to [b, 2h, 2w, cin].
    Upsampled,
    /// `Input::Concat`: x is uploaded as two tensors, channels [0, ca) and [ca, cin), and the
    /// convolution sees their concatenation, i.e. x again.
    Concat {
        ca: usize,
    },
}

#[derive(Clone, Copy, Debug)]
struct Case {
    mode: Mode,
    name: &'static str,
    b: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pads: [usize; 4],
    bias: bool,
    residual: bool,
}

#[allow(clippy::too_many_arguments)]
const fn case(
    name: &'static str,
    b: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: (usize, usize),
    stride: usize,
    pads: [usize; 4],
    bias: bool,
    residual: bool,
) -> Case {
    Case {
        mode: Mode::Plain,
        name,
        b,
        h,
        w,
        cin,
        cout,
        kh: k.0,
        kw: k.1,
        stride,
        pads,
        bias,
        residual,
    }
}

/// The case with its input upsampled 2× (nearest) by the kernel.
const fn up(c: Case) -> Case {
    Case {
        mode: Mode::Upsampled,
        ..c
    }
}

/// The case with its input split into two tensors at channel `ca` and concatenated by the kernel.
const fn cat(ca: usize, c: Case) -> Case {
    Case {
        mode: Mode::Concat { ca },
        ..c
    }
}

impl Case {
    /// Input height and width as the convolution sees them.
    fn in_hw(&self) -> (usize, usize) {
        match self.mode {
            Mode::Upsampled => (2 * self.h, 2 * self.w),
            _ => (self.h, self.w),
        }
    }

    fn out_hw(&self) -> (usize, usize) {
        let (h, w) = self.in_hw();
        let ho = (h + self.pads[0] + self.pads[1] - self.kh) / self.stride + 1;
        let wo = (w + self.pads[2] + self.pads[3] - self.kw) / self.stride + 1;
        (ho, wo)
    }
}

const P1: [usize; 4] = [1, 1, 1, 1];
const P0: [usize; 4] = [0, 0, 0, 0];
/// VAE encoder Downsample2D: F.pad(x, (0, 1, 0, 1)) then a stride-2 3×3 conv without padding.
const PVAE: [usize; 4] = [0, 1, 0, 1];

/// Host inputs of one case, scaled so outputs are O(1) whatever K is.
struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    residual: Option<Vec<f32>>,
    /// Instead of `bias`: a bias per (batch, channel), read as the [B, Cout] block at (row, col)
    /// of a wider table (ResnetBlock2D's conv1 with its time embedding).
    bias_rows: Option<BiasRows>,
    /// GroupNorm (+ SiLU) of the input, fused into the conv's loads.
    norm: Option<NormHost>,
    /// A 1×1 convolution of another input added in the same GEMM (`conv2d::Shortcut`).
    shortcut: Option<ShortcutHost>,
}

/// A shortcut's input s [b, ho, wo, cs] (uploaded as two parts split at `ca` when set) and its
/// weight [cout, cs].
#[derive(Clone)]
struct ShortcutHost {
    cs: usize,
    ca: Option<usize>,
    s: Vec<f32>,
    w: Vec<f32>,
}

/// A fused GroupNorm's parameters on the host (eps [`GN_EPS`]).
#[derive(Clone)]
struct NormHost {
    groups: usize,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    silu: bool,
}

const GN_EPS: f32 = 1e-5;

struct BiasRows {
    table: Vec<f32>,
    rows: usize,
    width: usize,
    row: usize,
    col: usize,
}

fn inputs(c: &Case, seed: u64) -> Inputs {
    let mut rng = Rng::new(seed);
    let (ho, wo) = c.out_hw();
    let k = c.kh * c.kw * c.cin;
    Inputs {
        x: rng.normals(c.b * c.h * c.w * c.cin, 1.0),
        w: rng.normals(c.cout * k, 1.0 / (k as f64).sqrt()),
        bias: c.bias.then(|| rng.normals(c.cout, 1.0)),
        residual: c.residual.then(|| rng.normals(c.b * ho * wo * c.cout, 1.0)),
        bias_rows: None,
        norm: None,
        shortcut: None,
    }
}

/// `base` with a shortcut of `cs` channels (split into two parts at `ca` when given).
fn with_shortcut(c: &Case, mut base: Inputs, cs: usize, ca: Option<usize>, seed: u64) -> Inputs {
    let mut rng = Rng::new(seed ^ 0x5c07);
    let (ho, wo) = c.out_hw();
    base.shortcut = Some(ShortcutHost {
        cs,
        ca,
        s: rng.normals(c.b * ho * wo * cs, 1.0),
        w: rng.normals(c.cout * cs, 1.0 / (cs as f64).sqrt()),
    });
    base
}

/// [`inputs`] with a GroupNorm (+ SiLU) fused into the conv: x gets a mean and a scale per
/// channel (so groups mix channel statistics and |mean| is not 0), gamma and beta are random
/// (beta ≠ 0: a padding tap that read `shift` instead of 0 would show).
fn inputs_norm(c: &Case, groups: usize, silu: bool, seed: u64) -> Inputs {
    let mut i = inputs(c, seed);
    let mut rng = Rng::new(seed ^ 0x6e0f);
    let shift = rng.normals(c.cin, 1.0);
    for (k, v) in i.x.iter_mut().enumerate() {
        *v = 0.5 + 1.5 * *v + shift[k % c.cin];
    }
    i.norm = Some(NormHost {
        groups,
        gamma: rng.normals(c.cin, 1.0),
        beta: rng.normals(c.cin, 1.0),
        silu,
    });
    i
}

/// [`inputs`] with the bias replaced by a per-(batch, channel) block of a wider table, at an
/// offset (3, 5) that is not a multiple of anything the kernels tile by.
fn inputs_bias_rows(c: &Case, seed: u64) -> Inputs {
    let mut i = inputs(c, seed);
    let mut rng = Rng::new(seed ^ 0xb1a5);
    let (row, col) = (3, 5);
    let (rows, width) = (row + c.b + 2, col + c.cout + 3);
    i.bias = None;
    i.bias_rows = Some(BiasRows {
        table: rng.normals(rows * width, 1.0),
        rows,
        width,
        row,
        col,
    });
    i
}

/// The specification: the f64 reference on the input as the convolution sees it (upsampled on
/// the host for `Mode::Upsampled`).
fn reference(c: &Case, i: &Inputs) -> Vec<f64> {
    // A fused GroupNorm: the reference normalises x [b, h·w, cin] (the concatenation, or the
    // stored image before upsampling) in f64 first, as torch would before its conv.
    let normed: Vec<f32> = match &i.norm {
        Some(n) => norm::reference_group_norm(
            &i.x,
            &[c.b, c.h * c.w, c.cin],
            n.groups,
            GN_EPS,
            &n.gamma,
            &n.beta,
            n.silu,
        )
        .iter()
        .map(|&v| v as f32)
        .collect(),
        None => i.x.clone(),
    };
    let x = match c.mode {
        Mode::Plain => normed,
        Mode::Upsampled => conv2d::upsample_nearest2x_host(&normed, c.b, c.h, c.w, c.cin),
        Mode::Concat { ca } => {
            let (a, b) = split_channels(&normed, ca, c.cin);
            conv2d::concat_channels_host(&a, &b, c.b * c.h * c.w, ca, c.cin - ca)
        }
    };
    let (h, w) = c.in_hw();
    let shape = conv2d::ConvShape {
        b: c.b,
        h,
        w,
        cin: c.cin,
        cout: c.cout,
        kh: c.kh,
        kw: c.kw,
        stride: c.stride,
        pads: c.pads,
    };
    let mut out = conv2d::reference(&x, &i.w, (i.bias.as_deref(), i.residual.as_deref()), &shape);
    if let Some(sc) = &i.shortcut {
        // The shortcut: a 1×1 convolution of s, added.
        let (ho, wo) = c.out_hw();
        let shape = conv2d::ConvShape {
            b: c.b,
            h: ho,
            w: wo,
            cin: sc.cs,
            cout: c.cout,
            kh: 1,
            kw: 1,
            stride: 1,
            pads: P0,
        };
        let tail = conv2d::reference(&sc.s, &sc.w, (None, None), &shape);
        for (v, t) in out.iter_mut().zip(tail) {
            *v += t;
        }
    }
    if let Some(br) = &i.bias_rows {
        let (ho, wo) = c.out_hw();
        for (o, v) in out.iter_mut().enumerate() {
            let (b, co) = (o / (ho * wo * c.cout), o % c.cout);
            *v += br.table[(br.row + b) * br.width + br.col + co] as f64;
        }
    }
    out
}

/// NHWC x [.., cin] as (x[.., :ca], x[.., ca:]).
fn split_channels(x: &[f32], ca: usize, cin: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for px in x.chunks(cin) {
        a.extend_from_slice(&px[..ca]);
        b.extend_from_slice(&px[ca..]);
    }
    (a, b)
}

/// Upload `i` to `g` in `dtype` (values already representable, or rounded on upload) and run the
/// kernel (`variant` forced, or chosen by shape when `None`) into a NaN-poisoned output.
fn run_on(g: &Gpu, c: &Case, i: &Inputs, dtype: DType, variant: Option<Variant>) -> Tensor {
    let up = |data: &[f32], shape: &[usize]| g.upload(data, shape, dtype).unwrap();
    let (ho, wo) = c.out_hw();
    let x = up(&i.x, &[c.b, c.h, c.w, c.cin]);
    // Concat: the two parts (`x` itself is then unused).
    let parts = match c.mode {
        Mode::Concat { ca } => {
            let (a, b) = split_channels(&i.x, ca, c.cin);
            Some((
                up(&a, &[c.b, c.h, c.w, ca]),
                up(&b, &[c.b, c.h, c.w, c.cin - ca]),
            ))
        }
        _ => None,
    };
    let w = up(&i.w, &[c.cout, c.kh, c.kw, c.cin]);
    let bias = i.bias.as_ref().map(|v| up(v, &[c.cout]));
    let table = i
        .bias_rows
        .as_ref()
        .map(|br| up(&br.table, &[br.rows, br.width]));
    let bias_rows =
        i.bias_rows
            .as_ref()
            .zip(table.as_ref())
            .map(|(br, t)| conv2d::ChannelBiasView {
                table: t,
                row: br.row,
                col: br.col,
            });
    let residual = i.residual.as_ref().map(|v| up(v, &[c.b, ho, wo, c.cout]));
    let out = fill::poisoned(g, &[c.b, ho, wo, c.cout], dtype).unwrap();
    let input = match (&c.mode, &parts) {
        (Mode::Upsampled, _) => Input::Upsampled2x(&x),
        (Mode::Concat { .. }, Some((a, b))) => Input::Concat(a, b),
        _ => Input::Plain(&x),
    };
    // A fused GroupNorm: its statistics table from the same input the conv reads.
    let table = i.norm.as_ref().map(|n| {
        let (gamma, beta) = (up(&n.gamma, &[c.cin]), up(&n.beta, &[c.cin]));
        let op = norm::GroupNormOp {
            groups: n.groups,
            eps: GN_EPS,
            gamma: &gamma,
            beta: &beta,
            silu: false,
        };
        let table = match input {
            Input::Concat(a, b) => op.stats(g, a, Some(b)),
            _ => op.stats(g, &x, None),
        };
        (table.unwrap(), n.silu)
    });
    let fused = table.as_ref().map(|(table, silu)| conv2d::FusedNorm {
        stats: conv2d::NormStats::Table(table),
        silu: *silu,
    });
    // A shortcut: its input (whole, or in two parts) and weight.
    let tail = i.shortcut.as_ref().map(|sc| {
        let w = up(&sc.w, &[c.cout, 1, 1, sc.cs]);
        let parts = match sc.ca {
            Some(ca) => {
                let (a, b) = split_channels(&sc.s, ca, sc.cs);
                (
                    up(&a, &[c.b, ho, wo, ca]),
                    Some(up(&b, &[c.b, ho, wo, sc.cs - ca])),
                )
            }
            None => (up(&sc.s, &[c.b, ho, wo, sc.cs]), None),
        };
        (w, parts)
    });
    let shortcut = tail.as_ref().map(|(w, (a, b))| conv2d::Shortcut {
        input: match b {
            Some(b) => Input::Concat(a, b),
            None => Input::Plain(a),
        },
        weight: w,
    });
    Conv {
        input,
        weight: &w,
        bias: bias.as_ref(),
        bias_rows,
        residual: residual.as_ref(),
        norm: fused,
        shortcut,
        stride: c.stride,
        pads: c.pads,
        variant,
    }
    .run_into(g, &out)
    .unwrap();
    out
}

/// [`run_on`] the shared engine, the output on the host.
fn run_gpu(c: &Case, i: &Inputs, dtype: DType, variant: Option<Variant>) -> Vec<f32> {
    let g = gpu();
    g.download(&run_on(g, c, i, dtype, variant)).unwrap()
}

fn quantized(i: &Inputs, dtype: DType) -> Inputs {
    Inputs {
        x: quantize(&i.x, dtype),
        w: quantize(&i.w, dtype),
        bias: i.bias.as_ref().map(|v| quantize(v, dtype)),
        residual: i.residual.as_ref().map(|v| quantize(v, dtype)),
        bias_rows: i.bias_rows.as_ref().map(|br| BiasRows {
            table: quantize(&br.table, dtype),
            ..*br
        }),
        norm: i.norm.as_ref().map(|n| NormHost {
            gamma: quantize(&n.gamma, dtype),
            beta: quantize(&n.beta, dtype),
            ..n.clone()
        }),
        shortcut: i.shortcut.as_ref().map(|sc| ShortcutHost {
            s: quantize(&sc.s, dtype),
            w: quantize(&sc.w, dtype),
            ..sc.clone()
        }),
    }
}

/// Every kernel variant this adapter can run (lavapipe: all of them).
fn all_variants() -> Vec<Variant> {
    conv2d::variants(gpu().caps.max_workgroup_storage)
}

fn check(c: &Case, seed: u64) {
    for dtype in dtypes() {
        let i = quantized(&inputs(c, seed), dtype);
        let want = reference(c, &i);
        for v in all_variants() {
            let got = run_gpu(c, &i, dtype, Some(v));
            let e = rel_l2(&got, &want);
            let what = format!("{} [{}] ({})", c.name, v.name(), dtype.name());
            eprintln!("{what:<52} rel_l2 {e:.2e}");
            assert_close(&what, &got, &want, tol(dtype, 1e-5, 2e-3));
        }
    }
}

#[rustfmt::skip]
const AWKWARD_SIZES_CASES: &[Case] = &[
    case("1x1 image cin3 cout13 3x3 p1", 1, 1, 1, 3, 13, (3, 3), 1, P1, true, false),
    case("5x7 cin3 cout13 3x3 p1 B2", 2, 5, 7, 3, 13, (3, 3), 1, P1, true, true),
    case("5x7 cin1 cout1 3x3 p1", 1, 5, 7, 1, 1, (3, 3), 1, P1, false, false),
    case("primes 17x19 cin37 cout67 B2", 2, 17, 19, 37, 67, (3, 3), 1, P1, true, true),
    case("latent 9x9 cin4 cout70 (K=36)", 1, 9, 9, 4, 70, (3, 3), 1, P1, true, false),
    case("multi-tile 23x29 cin36 cout130 B2", 2, 23, 29, 36, 130, (3, 3), 1, P1, true, true),
    case("1 row 1x31 cin8 cout5", 1, 1, 31, 8, 5, (3, 3), 1, P1, false, true),
    case("cout1 vec4 11x13 cin16", 1, 11, 13, 16, 1, (3, 3), 1, P1, true, false),
];

#[test]
fn awkward_sizes() {
    for (s, c) in AWKWARD_SIZES_CASES.iter().enumerate() {
        check(c, 100 + s as u64);
    }
}

#[rustfmt::skip]
const EVERY_MODE_CASES: &[Case] = &[
    // 3×3 stride 1 pad 1 (the bulk of SD), both load paths.
    case("3x3 s1 p1 vec4 13x11 cin24", 2, 13, 11, 24, 19, (3, 3), 1, P1, false, false),
    case("3x3 s1 p1 scalar 13x11 cin6", 2, 13, 11, 6, 19, (3, 3), 1, P1, true, true),
    // U-Net Downsample2D: 3×3 stride 2 pad 1, even and odd sizes.
    case("3x3 s2 p1 16x16 cin32", 2, 16, 16, 32, 24, (3, 3), 2, P1, true, false),
    case("3x3 s2 p1 7x5 cin8", 2, 7, 5, 8, 13, (3, 3), 2, P1, true, true),
    case("3x3 s2 p1 7x5 cin3", 1, 7, 5, 3, 13, (3, 3), 2, P1, false, false),
    // VAE encoder Downsample2D: pad (0, 1, 0, 1) then stride 2.
    case("3x3 s2 pad(0,1,0,1) 9x9 cin12", 2, 9, 9, 12, 16, (3, 3), 2, PVAE, true, false),
    case("3x3 s2 pad(0,1,0,1) 8x10 cin5", 1, 8, 10, 5, 7, (3, 3), 2, PVAE, true, true),
    // 1×1: shortcuts, quant convs, proj_in/proj_out.
    case("1x1 11x13 cin20 cout13", 2, 11, 13, 20, 13, (1, 1), 1, P0, true, true),
    case("1x1 7x9 cin4 cout4 (post_quant)", 1, 7, 9, 4, 4, (1, 1), 1, P0, true, false),
    case("1x1 5x5 cin7 cout66", 1, 5, 5, 7, 66, (1, 1), 1, P0, false, false),
    // Generic: odd kernels, strides and paddings.
    case("5x2 s3 pads(2,0,1,3) cin3", 2, 11, 10, 3, 9, (5, 2), 3, [2, 0, 1, 3], true, true),
    case("5x2 s3 pads(2,0,1,3) cin8", 2, 11, 10, 8, 9, (5, 2), 3, [2, 0, 1, 3], true, false),
    case("7x7 s2 p3 cin4", 1, 12, 9, 4, 17, (7, 7), 2, [3, 3, 3, 3], false, false),
    case("2x2 s2 p0 cin6", 1, 8, 6, 6, 11, (2, 2), 2, P0, true, false),
    case("1x3 s1 pads(0,0,1,1) cin12", 1, 4, 9, 12, 10, (1, 3), 1, [0, 0, 1, 1], false, true),
    case("3x3 kernel = image 3x3 p0 cin16", 2, 3, 3, 16, 8, (3, 3), 1, P0, true, false),
];

#[test]
fn every_mode() {
    for (s, c) in EVERY_MODE_CASES.iter().enumerate() {
        check(c, 200 + s as u64);
    }
}

/// Upsample2D fused into the conv: the kernel reads x [b, h, w, cin] at (iy / 2, ix / 2) and must
/// equal the reference convolution of the host-upsampled x. Awkward (odd, prime, 1-pixel) stored
/// sizes, 1 channel, the scalar path, several M and N tiles, and the other conv modes on an
/// upsampled input (the index map is independent of kernel size, stride and padding).
#[rustfmt::skip]
const UPSAMPLED_CASES: &[Case] = &[
    up(case("up 5x7 cin8 cout13 3x3 p1", 1, 5, 7, 8, 13, (3, 3), 1, P1, true, false)),
    up(case("up 1x1 image cin4 cout6 3x3 p1 B2", 2, 1, 1, 4, 6, (3, 3), 1, P1, true, true)),
    up(case("up 3x5 cin1 cout1 3x3 p1", 1, 3, 5, 1, 1, (3, 3), 1, P1, false, false)),
    up(case("up 7x3 cin3 cout67 3x3 p1 B2", 2, 7, 3, 3, 67, (3, 3), 1, P1, true, true)),
    up(case("up 9x11 cin36 cout70 3x3 p1 B2", 2, 9, 11, 36, 70, (3, 3), 1, P1, false, true)),
    up(case("up 13x1 cin20 cout130 3x3 p1", 1, 13, 1, 20, 130, (3, 3), 1, P1, true, false)),
    up(case("up 4x6 cin12 cout9 1x1", 1, 4, 6, 12, 9, (1, 1), 1, P0, true, true)),
    up(case("up 5x5 cin8 cout16 3x3 s2 p1", 2, 5, 5, 8, 16, (3, 3), 2, P1, true, false)),
    up(case("up 6x5 cin6 cout7 2x3 pads(0,1,2,0)", 1, 6, 5, 6, 7, (2, 3), 1, [0, 1, 2, 0], false, true)),
];

#[test]
fn upsampled_input() {
    for (s, c) in UPSAMPLED_CASES.iter().enumerate() {
        check(c, 700 + s as u64);
    }
}

/// Two-source channel concatenation: awkward splits (odd Ca and/or Cb: the scalar path even when
/// Ca + Cb is a multiple of 4; both multiples of 4: the vec4 path), 1-channel parts, 1×1 (the
/// decoder's ResnetBlock2D shortcut) and 3×3, several M and N tiles, with bias and residual.
#[rustfmt::skip]
const CONCAT_CASES: &[Case] = &[
    cat(8, case("cat 1x1 8+12 -> 13 (vec4)", 2, 7, 9, 20, 13, (1, 1), 1, P0, true, true)),
    cat(3, case("cat 1x1 3+5 -> 10 (odd parts, scalar)", 1, 5, 11, 8, 10, (1, 1), 1, P0, true, false)),
    cat(4, case("cat 1x1 4+1 -> 6", 1, 6, 3, 5, 6, (1, 1), 1, P0, false, true)),
    cat(1, case("cat 1x1 1+1 -> 1", 2, 3, 7, 2, 1, (1, 1), 1, P0, true, false)),
    cat(17, case("cat 1x1 17+4 -> 70", 1, 9, 9, 21, 70, (1, 1), 1, P0, true, true)),
    cat(12, case("cat 3x3 p1 12+20 -> 67 B2 (vec4)", 2, 11, 7, 32, 67, (3, 3), 1, P1, true, true)),
    cat(7, case("cat 3x3 p1 7+9 -> 19 (scalar)", 1, 9, 13, 16, 19, (3, 3), 1, P1, true, false)),
    cat(36, case("cat 3x3 p1 36+4 -> 130 B2", 2, 13, 5, 40, 130, (3, 3), 1, P1, false, true)),
    cat(5, case("cat 3x3 s2 p1 5+3 -> 9", 2, 9, 8, 8, 9, (3, 3), 2, P1, true, false)),
    cat(1, case("cat 1x1 image 3x3 p1 1+2 -> 5", 1, 1, 1, 3, 5, (3, 3), 1, P1, true, true)),
];

#[test]
fn concatenated_input() {
    for (s, c) in CONCAT_CASES.iter().enumerate() {
        check(c, 800 + s as u64);
    }
}

/// Cases with a shortcut (`conv2d::Shortcut`: a 1×1 conv of a second input as K tail of the
/// same GEMM, ResnetBlock2D's conv2 + conv_shortcut): (case, Cs, split of the shortcut input,
/// GroupNorm groups of a fused norm on the main input). Awkward sizes, both load paths (Cs or a
/// part not a multiple of 4 forces the scalar path), a K tail that starts inside a K step
/// (K_main = 9·Cin not a multiple of 16 or 32), residual and tail together.
#[rustfmt::skip]
const SHORTCUT_CASES: &[(Case, usize, Option<usize>, Option<usize>)] = &[
    (case("tail 3x3 13x11 cin12 cout21 cs20 gn", 2, 13, 11, 12, 21, (3, 3), 1, P1, true, false), 20, None, Some(4)),
    (case("tail cat 3x3 7x9 cin8 cout19 cs12+8 gn", 2, 7, 9, 8, 19, (3, 3), 1, P1, true, false), 20, Some(12), Some(2)),
    (case("tail scalar 3x3 5x7 cin6 cout9 cs7", 1, 5, 7, 6, 9, (3, 3), 1, P1, true, false), 7, None, None),
    (case("tail scalar cat 3x3 6x5 cin8 cout13 cs3+6", 2, 6, 5, 8, 13, (3, 3), 1, P1, false, false), 9, Some(3), Some(4)),
    (case("tail + residual 3x3 9x9 cin4 cout70 cs36", 1, 9, 9, 4, 70, (3, 3), 1, P1, true, true), 36, None, None),
    (case("tail multi-tile 23x29 cin36 cout130 cs52+24", 2, 23, 29, 36, 130, (3, 3), 1, P1, true, false), 76, Some(52), Some(4)),
    (case("tail cout4 (small tile) 11x13 cin16 cs24", 1, 11, 13, 16, 4, (3, 3), 1, P1, true, false), 24, None, None),
];

fn shortcut_inputs(
    (c, cs, ca, groups): &(Case, usize, Option<usize>, Option<usize>),
    seed: u64,
) -> Inputs {
    let base = match groups {
        Some(g) => inputs_norm(c, *g, true, seed),
        None => inputs(c, seed),
    };
    with_shortcut(c, base, *cs, *ca, seed)
}

/// The shortcut as K tail on every FMA variant (f16; f32 on the shape's variant), and on the tensor-core kernel
/// (both tiles, split K included) where the adapter runs it, against conv + 1×1 conv in f64.
#[test]
fn shortcut_in_the_same_gemm() {
    for (s, sc) in SHORTCUT_CASES.iter().enumerate() {
        let c = &sc.0;
        for dtype in dtypes() {
            let i = quantized(&shortcut_inputs(sc, 1500 + s as u64), dtype);
            let want = reference(c, &i);
            // Every variant in f16; f32 on the shape's own (each variant × dtype × input mode is
            // a pipeline, and lavapipe takes seconds to compile one).
            let variants: Vec<Option<Variant>> = match dtype {
                DType::F16 => all_variants().into_iter().map(Some).collect(),
                DType::F32 => vec![None],
            };
            for v in variants {
                let got = run_gpu(c, &i, dtype, v);
                let name = v.map_or("by shape".into(), |v| v.name());
                let what = format!("{} [{name}] ({})", c.name, dtype.name());
                eprintln!("{what:<60} rel_l2 {:.2e}", rel_l2(&got, &want));
                assert_close(&what, &got, &want, tol(dtype, 1e-5, 2e-3));
            }
        }
    }
    // The tensor-core kernel, on an engine of its own (tiles are forced).
    let engine = Gpu::new(&GpuOptions::from_env().unwrap()).expect("a wgpu adapter");
    let g = &engine;
    let Some(plan) = ldm_wgpu::kernels::coop::coop_plan(g, DType::F16) else {
        eprintln!("no tensor-core conv on {}: FMA variants only", g.adapter);
        return;
    };
    // Plus SD 1.5's up-block conv2 at 8×8 with its concatenated shortcut, at a quarter of the
    // channels: a small grid, so the large tile splits K, with a split inside the tail.
    let sd = (
        case(
            "unet.up1.res conv2 320 + tail 320+320 8x8 B2",
            2,
            8,
            8,
            320,
            320,
            (3, 3),
            1,
            P1,
            true,
            false,
        ),
        640,
        Some(320),
        Some(32),
    );
    let takes = |(c, cs, ca, _): &(Case, usize, Option<usize>, Option<usize>)| {
        coop_takes(c) && cs.is_multiple_of(4) && ca.is_none_or(|a| a.is_multiple_of(4))
    };
    for &tile in &coop_tiles(g, plan) {
        force_coop(g, Some(tile));
        for (s, sc) in SHORTCUT_CASES.iter().chain([&sd]).enumerate() {
            if !takes(sc) {
                continue;
            }
            let c = &sc.0;
            let i = quantized(&shortcut_inputs(sc, 1600 + s as u64), DType::F16);
            let want = reference(c, &i);
            let got = g
                .download(&run_on(g, c, &i, DType::F16, Some(Variant::COOP)))
                .unwrap();
            let what = format!("{} [coop {tile:?} frag {}] (f16)", c.name, plan.frag);
            eprintln!("{what:<60} rel_l2 {:.2e}", rel_l2(&got, &want));
            assert_close(&what, &got, &want, tol(DType::F16, 1e-5, 2e-3));
        }
        force_coop(g, None);
    }
}

/// A shortcut that does not fit the convolution is refused with a clear error.
#[test]
fn rejects_bad_shortcuts() {
    let g = gpu();
    let up = |shape: &[usize]| {
        g.upload(&vec![0.5; shape.iter().product()], shape, DType::F32)
            .unwrap()
    };
    let (x, w) = (up(&[1, 6, 5, 8]), up(&[12, 3, 3, 8]));
    let conv = |s: &Tensor, sw: &Tensor| {
        Conv {
            input: Input::Plain(&x),
            weight: &w,
            bias: None,
            bias_rows: None,
            residual: None,
            norm: None,
            shortcut: Some(conv2d::Shortcut {
                input: Input::Plain(s),
                weight: sw,
            }),
            stride: 1,
            pads: P1,
            variant: None,
        }
        .run(g)
    };
    let ok = conv(&up(&[1, 6, 5, 4]), &up(&[12, 1, 1, 4]));
    assert!(ok.is_ok(), "{:?}", ok.err());
    for (s, sw, why) in [
        (up(&[1, 5, 5, 4]), up(&[12, 1, 1, 4]), "pixels"),
        (up(&[2, 6, 5, 4]), up(&[12, 1, 1, 4]), "batch"),
        (up(&[1, 6, 5, 4]), up(&[12, 1, 1, 5]), "weight Cs"),
        (up(&[1, 6, 5, 4]), up(&[11, 1, 1, 4]), "weight Cout"),
        (up(&[1, 6, 5, 4]), up(&[12, 3, 3, 4]), "weight not 1x1"),
    ] {
        assert!(is_shape(conv(&s, &sw)), "{why}: not refused");
    }
    let half = g.upload(&[0.5f32; 120], &[1, 6, 5, 4], DType::F16).unwrap();
    assert!(
        is_shape(conv(&half, &up(&[12, 1, 1, 4]))),
        "dtype: not refused"
    );
}

/// Real SD 1.5 shapes. Inputs are drawn once and rounded to f16 so that one f64 reference serves
/// both dtypes (f16 × f16 products are exact in f32, so the f32 run still tests accumulation).
/// The VAE's 3×3 convs at 256×256 and 512×512 take minutes on lavapipe; "vae 128ch 64x64" is the
/// same kernel path (Cin = Cout = 128, K = 1152) on a 64×64 image.
#[rustfmt::skip]
const SD15_SHAPES_CASES: &[Case] = &[
    case("unet.res 1280 8x8 B2", 2, 8, 8, 1280, 1280, (3, 3), 1, P1, true, true),
    case("unet.down2.downsample 1280 16x16 B2", 2, 16, 16, 1280, 1280, (3, 3), 2, P1, true, false),
    case("unet.down2.res0.shortcut 640->1280", 2, 16, 16, 640, 1280, (1, 1), 1, P0, true, true),
    case("unet.conv_in 4->320 64x64 B2", 2, 64, 64, 4, 320, (3, 3), 1, P1, true, false),
    case("vae 128ch 3x3 64x64", 1, 64, 64, 128, 128, (3, 3), 1, P1, true, true),
    case("vae.enc downsample 128 64x64", 1, 64, 64, 128, 128, (3, 3), 2, PVAE, true, false),
    case("vae.dec.conv_out 128->3 64x64", 1, 64, 64, 128, 3, (3, 3), 1, P1, true, false),
    // Upsample2D: the U-Net's up0 upsampler at half size (1280 ch, 4x4 -> 8x8), and the VAE's
    // 128-channel path (32x32 -> 64x64).
    up(case("unet.up0.upsample 1280 4x4->8x8 B2", 2, 4, 4, 1280, 1280, (3, 3), 1, P1, true, false)),
    up(case("vae upsample 128ch 32x32->64x64", 1, 32, 32, 128, 128, (3, 3), 1, P1, true, false)),
    // The up blocks' ResnetBlock2D shortcut on cat([h, skip]) (16x16 instead of 64x64 for the
    // last one), residual fused.
    cat(1280, case("unet.up1.shortcut 1280+1280->1280 8x8", 2, 8, 8, 2560, 1280, (1, 1), 1, P0, true, true)),
    cat(640, case("unet.up3.shortcut 640+320->320 16x16", 2, 16, 16, 960, 320, (1, 1), 1, P0, true, true)),
];

#[test]
fn sd15_shapes() {
    for (s, c) in SD15_SHAPES_CASES.iter().enumerate() {
        let i = quantized(&inputs(c, 300 + s as u64), DType::F16);
        let want = reference(c, &i);
        // The small tile on wide Cout is covered by the awkward sizes; here it only runs where
        // it would be chosen.
        let variants: Vec<Variant> = all_variants()
            .into_iter()
            .filter(|v| v.tile != Tile::Small || c.cout <= 16)
            .collect();
        for dtype in dtypes() {
            for &v in &variants {
                let t = std::time::Instant::now();
                let got = run_gpu(c, &i, dtype, Some(v));
                let e = rel_l2(&got, &want);
                let what = format!("{} [{}] ({})", c.name, v.name(), dtype.name());
                eprintln!(
                    "{what:<52} rel_l2 {e:.2e} ({:.2} s on GPU)",
                    t.elapsed().as_secs_f64()
                );
                assert_close(&what, &got, &want, tol(dtype, 1e-5, 2e-3));
            }
        }
    }
}

/// The U-Net's most frequent conv (3×3, 320→320, 64×64, batch 2: 15 GFLOP). The full f64
/// reference would take 7.5 G multiply-adds on the CPU, so it checks bands of output rows (top
/// edge, middle, bottom edge) by running the reference on the input rows they depend on.
#[rustfmt::skip]
const UNET_RES_320_64X64: Case = case("unet.res 320 64x64 B2", 2, 64, 64, 320, 320, (3, 3), 1, P1, true, true);

#[test]
fn sd15_unet_res_320_64x64() {
    let c = UNET_RES_320_64X64;
    let i = quantized(&inputs(&c, 400), DType::F16);
    let (hh, ww, cin, cout) = (c.h, c.w, c.cin, c.cout);
    let bands = [(0usize, 2usize), (31, 33), (62, 64)];
    let mut want = Vec::new();
    for b in 0..c.b {
        for &(r0, r1) in &bands {
            // Output rows [r0, r1) read input rows [r0 - 1, r1 + 1) clipped to the image; the
            // clipped sides keep their zero padding.
            let (i0, i1) = (r0.saturating_sub(1), (r1 + 1).min(hh));
            let xs = &i.x[(b * hh + i0) * ww * cin..(b * hh + i1) * ww * cin];
            let rs = i.residual.as_ref().unwrap()
                [(b * hh + r0) * ww * cout..(b * hh + r1) * ww * cout]
                .to_vec();
            let pads = [usize::from(r0 == 0), usize::from(r1 == hh), 1, 1];
            let shape = conv2d::ConvShape {
                b: 1,
                h: i1 - i0,
                w: ww,
                cin,
                cout,
                kh: 3,
                kw: 3,
                stride: 1,
                pads,
            };
            let part = conv2d::reference(xs, &i.w, (i.bias.as_deref(), Some(&rs)), &shape);
            assert_eq!(part.len(), (r1 - r0) * ww * cout);
            want.extend(part);
        }
    }
    // The shape picks 64 (192 tiles of 128); 128 is what it gets at larger images (SD 2.x at
    // 768²), so both run here.
    let tiles: Vec<Variant> = all_variants()
        .into_iter()
        .filter(|v| v.tile != Tile::Small)
        .collect();
    for (dtype, v) in dtypes()
        .into_iter()
        .flat_map(|d| tiles.iter().map(move |&v| (d, v)))
    {
        let t = std::time::Instant::now();
        let full = run_gpu(&c, &i, dtype, Some(v));
        let secs = t.elapsed().as_secs_f64();
        let mut got = Vec::new();
        for b in 0..c.b {
            for &(r0, r1) in &bands {
                got.extend_from_slice(&full[(b * hh + r0) * ww * cout..(b * hh + r1) * ww * cout]);
            }
        }
        assert!(
            full.iter().all(|v| v.is_finite()),
            "{}: non-finite output (unwritten?)",
            c.name
        );
        let e = rel_l2(&got, &want);
        let what = format!("{} [{}] ({})", c.name, v.name(), dtype.name());
        eprintln!("{what:<52} rel_l2 {e:.2e} ({secs:.2} s on GPU)");
        assert_close(&what, &got, &want, tol(dtype, 1e-5, 2e-3));
    }
}

/// `conv2d` allocates [B, Ho, Wo, Cout] itself; asymmetric padding changes Ho and Wo separately.
#[test]
fn allocating_wrapper_shapes() {
    let g = gpu();
    #[rustfmt::skip]
    let c = case("alloc", 1, 9, 6, 4, 5, (3, 3), 2, [0, 1, 1, 0], true, false);
    let i = inputs(&c, 500);
    let x = g.upload(&i.x, &[1, 9, 6, 4], DType::F32).unwrap();
    let w = g.upload(&i.w, &[5, 3, 3, 4], DType::F32).unwrap();
    let bias = g
        .upload(i.bias.as_ref().unwrap(), &[5], DType::F32)
        .unwrap();
    let out = conv2d::conv2d(g, &x, &w, Some(&bias), None, 2, [0, 1, 1, 0]).unwrap();
    assert_eq!(out.shape(), &[1, 4, 3, 5]);
    assert_eq!(c.out_hw(), (4, 3));
    assert_close(
        "alloc",
        &g.download(&out).unwrap(),
        &reference(&c, &i),
        1e-5,
    );
    // Upsample2D: [1, 9, 6, 4] seen as [1, 18, 12, 4], 3×3 s1 p1 keeps that size.
    let c = up(case("alloc up", 1, 9, 6, 4, 5, (3, 3), 1, P1, true, false));
    let out = conv2d::conv2d_upsampled(g, &x, &w, Some(&bias), None, 1, P1).unwrap();
    assert_eq!(out.shape(), &[1, 18, 12, 5]);
    assert_close(
        "alloc up",
        &g.download(&out).unwrap(),
        &reference(&c, &i),
        1e-5,
    );
}

/// The reorder is checked against a direct convolution written on PyTorch's own layouts
/// (NCHW activations, OIHW weights).
#[test]
fn weight_reorder_matches_pytorch_layout() {
    let (b, cin, h, w, cout, kh, kw, stride, pad) = (2, 3, 6, 5, 4, 3, 2, 2, 1);
    let mut rng = Rng::new(600);
    let x_nchw = rng.normals(b * cin * h * w, 1.0);
    let w_oihw = rng.normals(cout * cin * kh * kw, 1.0);
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (w + 2 * pad - kw) / stride + 1;
    let mut want_nchw = vec![0.0f64; b * cout * ho * wo];
    for n in 0..b {
        for o in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = 0.0f64;
                    for i in 0..cin {
                        for y in 0..kh {
                            for xk in 0..kw {
                                let iy = (oy * stride + y) as isize - pad as isize;
                                let ix = (ox * stride + xk) as isize - pad as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    acc += x_nchw
                                        [((n * cin + i) * h + iy as usize) * w + ix as usize]
                                        as f64
                                        * w_oihw[((o * cin + i) * kh + y) * kw + xk] as f64;
                                }
                            }
                        }
                    }
                    want_nchw[((n * cout + o) * ho + oy) * wo + ox] = acc;
                }
            }
        }
    }
    let mut x_nhwc = vec![0.0f32; x_nchw.len()];
    for n in 0..b {
        for i in 0..cin {
            for y in 0..h {
                for xx in 0..w {
                    x_nhwc[((n * h + y) * w + xx) * cin + i] =
                        x_nchw[((n * cin + i) * h + y) * w + xx];
                }
            }
        }
    }
    let w_ohwi = conv2d::weight_oihw_to_ohwi(&w_oihw, cout, cin, kh, kw);
    let shape = conv2d::ConvShape {
        b,
        h,
        w,
        cin,
        cout,
        kh,
        kw,
        stride,
        pads: [pad; 4],
    };
    let got = conv2d::reference(&x_nhwc, &w_ohwi, (None, None), &shape);
    for n in 0..b {
        for o in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let g = got[((n * ho + oy) * wo + ox) * cout + o];
                    let e = want_nchw[((n * cout + o) * ho + oy) * wo + ox];
                    assert!(
                        (g - e).abs() <= 1e-12 * (1.0 + e.abs()),
                        "({n},{o},{oy},{ox}): {g} vs {e}"
                    );
                }
            }
        }
    }
    // And on the GPU, from the reordered weights.
    let g = gpu();
    let xt = g.upload(&x_nhwc, &[b, h, w, cin], DType::F32).unwrap();
    let wt = g.upload(&w_ohwi, &[cout, kh, kw, cin], DType::F32).unwrap();
    let out = conv2d::conv2d(g, &xt, &wt, None, None, stride, [pad; 4]).unwrap();
    assert_close(
        "reordered weights on GPU",
        &g.download(&out).unwrap(),
        &got,
        1e-5,
    );
}

fn is_shape<T>(r: ldm_wgpu::Result<T>) -> bool {
    matches!(r, Err(Error::Shape { .. }))
}

#[test]
fn rejects_bad_shapes() {
    let g = gpu();
    let f = DType::F32;
    let x = g.empty(&[1, 8, 8, 4], f).unwrap();
    let w = g.empty(&[6, 3, 3, 4], f).unwrap();
    // Cin mismatch.
    let w5 = g.empty(&[6, 3, 3, 5], f).unwrap();
    assert!(is_shape(conv2d::conv2d(g, &x, &w5, None, None, 1, [1; 4])));
    // Kernel larger than the padded input.
    let x1 = g.empty(&[1, 1, 1, 4], f).unwrap();
    assert!(is_shape(conv2d::conv2d(g, &x1, &w, None, None, 1, [0; 4])));
    // Stride 0, wrong rank, bias / residual / out shapes.
    assert!(is_shape(conv2d::conv2d(g, &x, &w, None, None, 0, [1; 4])));
    let x3 = g.empty(&[8, 8, 4], f).unwrap();
    assert!(is_shape(conv2d::conv2d(g, &x3, &w, None, None, 1, [1; 4])));
    let bad_bias = g.empty(&[5], f).unwrap();
    assert!(is_shape(conv2d::conv2d(
        g,
        &x,
        &w,
        Some(&bad_bias),
        None,
        1,
        [1; 4]
    )));
    let bad_res = g.empty(&[1, 8, 8, 5], f).unwrap();
    assert!(is_shape(conv2d::conv2d(
        g,
        &x,
        &w,
        None,
        Some(&bad_res),
        1,
        [1; 4]
    )));
    let bad_out = g.empty(&[1, 4, 4, 6], f).unwrap();
    assert!(is_shape(
        Conv {
            input: Input::Plain(&x),
            weight: &w,
            bias: None,
            bias_rows: None,
            residual: None,
            norm: None,
            shortcut: None,
            stride: 1,
            pads: [1; 4],
            variant: None,
        }
        .run_into(g, &bad_out)
    ));
    // In place: out == residual.
    let res = g.empty(&[1, 8, 8, 6], f).unwrap();
    assert!(is_shape(
        Conv {
            input: Input::Plain(&x),
            weight: &w,
            bias: None,
            bias_rows: None,
            residual: Some(&res),
            norm: None,
            shortcut: None,
            stride: 1,
            pads: [1; 4],
            variant: None,
        }
        .run_into(g, &res)
    ));
    // Upsampled input: the kernel must fit the upsampled size, not the stored one.
    let x1 = g.empty(&[1, 1, 1, 4], f).unwrap();
    assert!(is_shape(conv2d::conv2d_upsampled(
        g, &x1, &w, None, None, 1, [0; 4]
    )));
    assert!(conv2d::conv2d_upsampled(g, &x1, &w, None, None, 1, [1; 4]).is_ok());
    assert!(is_shape(conv2d::conv2d_upsampled(
        g, &x3, &w, None, None, 1, [1; 4]
    )));
    assert!(is_shape(conv2d::conv2d_upsampled(
        g, &x, &w5, None, None, 1, [1; 4]
    )));
    // Concatenation: parts disagreeing on [B, H, W], Cin != Ca + Cb, out aliasing the second
    // part (a read-only and read-write binding of one buffer), a rank-3 part.
    let xb = g.empty(&[1, 8, 8, 2], f).unwrap();
    let w6 = g.empty(&[6, 3, 3, 6], f).unwrap();
    let cat = |a: &ldm_wgpu::Tensor, b: &ldm_wgpu::Tensor, w: &ldm_wgpu::Tensor| {
        Conv {
            input: Input::Concat(a, b),
            weight: w,
            bias: None,
            bias_rows: None,
            residual: None,
            norm: None,
            shortcut: None,
            stride: 1,
            pads: [1; 4],
            variant: None,
        }
        .run(g)
    };
    assert!(cat(&x, &xb, &w6).is_ok());
    assert!(is_shape(cat(&x, &g.empty(&[1, 8, 7, 2], f).unwrap(), &w6)));
    assert!(is_shape(cat(&x, &g.empty(&[2, 8, 8, 2], f).unwrap(), &w6)));
    assert!(is_shape(cat(&x, &xb, &w)));
    assert!(is_shape(cat(&x3, &xb, &w6)));
    let out6 = g.empty(&[1, 8, 8, 6], f).unwrap();
    let aliased = Conv {
        input: Input::Concat(&x, &out6),
        weight: &g.empty(&[6, 1, 1, 10], f).unwrap(),
        bias: None,
        bias_rows: None,
        residual: None,
        norm: None,
        shortcut: None,
        stride: 1,
        pads: [0; 4],
        variant: None,
    };
    assert!(is_shape(aliased.run_into(g, &out6)));
    // Mixed dtypes.
    if g.caps.shader_f16 {
        let xbh = g.empty(&[1, 8, 8, 2], DType::F16).unwrap();
        assert!(is_shape(cat(&x, &xbh, &w6)));
        let wh = g.empty(&[6, 3, 3, 4], DType::F16).unwrap();
        assert!(is_shape(conv2d::conv2d(g, &x, &wh, None, None, 1, [1; 4])));
    }
}

#[test]
fn sd15_shape_table_is_consistent() {
    for &(name, b, h, w, cin, cout, k, stride) in ldm_wgpu::kernels::sd15::CONV {
        assert!(
            b >= 1 && h >= 1 && w >= 1 && cin >= 1 && cout >= 1,
            "{name}"
        );
        assert!(k == 1 || k == 3, "{name}: SD 1.5 convs are 1x1 or 3x3");
        assert!(stride == 1 || (stride == 2 && k == 3), "{name}");
    }
}

/// The shape heuristic on the SD 1.5 table, on adapters with NVIDIA's 48 KiB, lavapipe's (and
/// Apple's) 32 KiB and WebGPU's minimum 16 KiB of workgroup memory.
#[test]
fn variant_choice_follows_the_shape() {
    let v = |tile, k_step| Variant { tile, k_step };
    for &(name, b, h, w, _, cout, _, stride) in ldm_wgpu::kernels::sd15::CONV {
        let m = b * (h / stride) * (w / stride);
        let large = m.div_ceil(128) * cout.div_ceil(128) >= conv2d::LARGE_TILE_MIN_TILES;
        let want = if cout <= 16 {
            v(Tile::Small, 16)
        } else if large {
            v(Tile::T128, 16)
        } else {
            v(Tile::T64, 32)
        };
        for wg in [48 << 10, 32 << 10] {
            assert_eq!(choose_variant(m, cout, wg, None), want, "{name} at {wg} B");
        }
        // 16 KiB: the 128 tile does not fit (20 KiB), 64 falls back to K step 16, small fits.
        let want16 = if cout <= 16 {
            v(Tile::Small, 16)
        } else {
            v(Tile::T64, 16)
        };
        assert_eq!(
            choose_variant(m, cout, 16 << 10, None),
            want16,
            "{name} at 16 KiB"
        );
        // What the table says in words.
        if name.ends_with("conv_out") {
            assert_eq!(want.tile, Tile::Small, "{name}");
        } else if name == "unet.up2.upsample 64x64" {
            // 640 channels at 64², batch 2: 64 × 5 = 320 tiles of 128.
            assert_eq!(want.tile, Tile::T128, "{name}");
        } else if name.starts_with("unet.") {
            assert_eq!(want.tile, Tile::T64, "{name}: < 256 tiles of 128 at 512²");
        } else if name.starts_with("vae.dec") && h >= 128 {
            assert_eq!(want.tile, Tile::T128, "{name}");
        }
    }
    // LDM_CONV_TILE's tile wins whatever the shape, except where it does not fit.
    assert_eq!(
        choose_variant(8192, 4, 32 << 10, Some(Tile::T64)),
        v(Tile::T64, 32)
    );
    assert_eq!(
        choose_variant(64, 320, 32 << 10, Some(Tile::T128)),
        v(Tile::T128, 16)
    );
    assert_eq!(
        choose_variant(1 << 18, 512, 32 << 10, Some(Tile::Small)),
        v(Tile::Small, 16)
    );
    assert_eq!(
        choose_variant(1 << 18, 512, 16 << 10, Some(Tile::T128)),
        v(Tile::T64, 16)
    );
    assert_eq!(Tile::parse("64"), Some(Tile::T64));
    assert_eq!(Tile::parse("128"), Some(Tile::T128));
    assert_eq!(Tile::parse("small"), Some(Tile::Small));
    assert_eq!(Tile::parse("256"), None);
    // The workgroup memory of each variant, as the shader header states it.
    let bytes: Vec<u32> = Variant::ALL.iter().map(|v| v.workgroup_bytes()).collect();
    assert_eq!(bytes, [22_528, 14_336, 24_576, 10_240]);
    assert_eq!(
        conv2d::variants(16 << 10),
        [v(Tile::T64, 16), v(Tile::Small, 16)]
    );
}

/// A forced variant the shader does not implement is refused, not silently replaced.
#[test]
fn rejects_unknown_variant() {
    let g = gpu();
    let x = g.empty(&[1, 4, 4, 4], DType::F32).unwrap();
    let w = g.empty(&[8, 3, 3, 4], DType::F32).unwrap();
    let conv = Conv {
        input: Input::Plain(&x),
        weight: &w,
        bias: None,
        bias_rows: None,
        residual: None,
        norm: None,
        shortcut: None,
        stride: 1,
        pads: [1; 4],
        variant: Some(Variant {
            tile: Tile::T128,
            k_step: 32,
        }),
    };
    assert!(matches!(conv.run(g), Err(Error::Unsupported(_))));
}

/// The conv2d entry points run without naga's runtime checks (`shaders::indexing_proven`): each
/// variant and input mode must give the same bits with and without them (a kernel whose output
/// depended on the checks' index clamping would differ). tests/shader_checks.rs does this for
/// the shape-chosen variant; this covers every forced one.
#[test]
fn every_variant_gives_the_same_bits_with_and_without_bounds_checks() {
    let open = |checks| {
        Gpu::new(&GpuOptions {
            policy: ldm_wgpu::runtime::KernelPolicy {
                shader_checks: checks,
                ..ldm_wgpu::runtime::KernelPolicy::from_env().unwrap()
            },
            ..ldm_wgpu::GpuOptions::from_env().unwrap()
        })
        .expect("a wgpu adapter")
    };
    let (checked, unchecked) = (open(true), open(false));
    #[rustfmt::skip]
    let cases = [
        case("3x3 vec4 13x11 cin12 cout21", 2, 13, 11, 12, 21, (3, 3), 1, P1, true, true),
        case("3x3 s2 scalar 9x7 cin3 cout5", 1, 9, 7, 3, 5, (3, 3), 2, P1, true, false),
        up(case("up 5x3 cin8 cout70", 2, 5, 3, 8, 70, (3, 3), 1, P1, true, false)),
        cat(8, case("cat 1x1 8+4 cout133", 1, 7, 9, 12, 133, (1, 1), 1, P0, false, true)),
        cat(3, case("cat 3x3 3+6 cout9", 1, 6, 5, 9, 9, (3, 3), 1, P1, true, true)),
    ];
    let max_wg = checked
        .caps
        .max_workgroup_storage
        .min(unchecked.caps.max_workgroup_storage);
    // And with a fused GroupNorm + SiLU (its table is another binding the kernels index).
    #[rustfmt::skip]
    let fused = [
        (cat(12, case("gn cat 3x3 12+8 cout21", 2, 7, 5, 20, 21, (3, 3), 1, P1, true, true)), 4),
        (case("gn 3x3 s2 scalar 9x7 cin6 cout5", 1, 9, 7, 6, 5, (3, 3), 2, P1, true, false), 3),
    ];
    let plain = cases
        .iter()
        .enumerate()
        .map(|(s, c)| (*c, inputs(c, 900 + s as u64)));
    let with_norm = fused
        .iter()
        .enumerate()
        .map(|(s, &(c, groups))| (c, inputs_norm(&c, groups, true, 950 + s as u64)));
    // And with a shortcut as K tail (three more bindings), whole and in two parts; in f16 only
    // (every variant × input mode × dtype is a pipeline to compile, twice here).
    let with_tail = SHORTCUT_CASES
        .iter()
        .take(2)
        .enumerate()
        .map(|(s, sc)| (sc.0, shortcut_inputs(sc, 970 + s as u64)));
    for (c, i) in plain.chain(with_norm).chain(with_tail) {
        let (c, i) = (&c, quantized(&i, DType::F16));
        let tail_vec4 = i
            .shortcut
            .as_ref()
            .is_none_or(|sc| sc.cs.is_multiple_of(4) && sc.ca.is_none_or(|a| a.is_multiple_of(4)));
        for dtype in dtypes() {
            if i.shortcut.is_some() && dtype == DType::F32 {
                continue;
            }
            let mut vs = conv2d::variants(max_wg);
            // The tensor-core kernel too, where both engines can run it.
            let coop = |g: &Gpu| ldm_wgpu::kernels::coop::coop_plan(g, dtype).is_some();
            if coop(&checked) && coop(&unchecked) && coop_takes(c) && tail_vec4 {
                vs.push(Variant::COOP);
            }
            for v in vs {
                // The tensor-core kernel in both its tiles (the large one where it can run).
                let tiles: &[Option<CoopConvTile>] = if v == Variant::COOP {
                    &[
                        Some(CoopConvTile::T64),
                        Some(CoopConvTile::T128),
                        Some(CoopConvTile::T128x64),
                    ]
                } else {
                    &[None]
                };
                for &tile in tiles {
                    force_coop(&checked, tile);
                    force_coop(&unchecked, tile);
                    let run =
                        |g: &Gpu| g.download_bytes(&run_on(g, c, &i, dtype, Some(v))).unwrap();
                    let same = run(&checked) == run(&unchecked);
                    force_coop(&checked, None);
                    force_coop(&unchecked, None);
                    assert!(
                        same,
                        "{} [{} {tile:?}] ({}): bits differ with and without bounds checks",
                        c.name,
                        v.name(),
                        dtype.name()
                    );
                }
            }
        }
    }
}

/// Whether the tensor-core kernel can take case `c` (f16; channels of each part % 4 == 0).
fn coop_takes(c: &Case) -> bool {
    let parts_ok = match c.mode {
        Mode::Concat { ca } => ca.is_multiple_of(4) && (c.cin - ca).is_multiple_of(4),
        _ => true,
    };
    c.cin.is_multiple_of(4) && parts_ok
}

/// The tensor-core kernel (`shaders/conv2d_coop.wgsl`, forced) against the same f64 reference on
/// every case it takes, where the adapter offers f16 cooperative matrices and the path is on (CI
/// runs this file on Mesa 26's lavapipe with `LDM_COOP_MATMUL=1`: 8×8 fragments). Elsewhere,
/// forcing it must be refused with a clear error, not replaced by another kernel.
#[test]
fn coop_variant_matches_reference() {
    // An engine of its own: this test forces tiles, which must not reach the other tests.
    let engine = Gpu::new(&GpuOptions::from_env().unwrap()).expect("a wgpu adapter");
    let g = &engine;
    let plan = ldm_wgpu::kernels::coop::coop_plan(g, DType::F16);
    let all: Vec<&Case> = AWKWARD_SIZES_CASES
        .iter()
        .chain(EVERY_MODE_CASES)
        .chain(UPSAMPLED_CASES)
        .chain(CONCAT_CASES)
        .chain(SD15_SHAPES_CASES.iter().take(4))
        .collect();
    let Some(plan) = plan else {
        let c = all.iter().find(|c| coop_takes(c)).unwrap();
        let i = quantized(&inputs(c, 1), DType::F16);
        let up = |data: &[f32], shape: &[usize]| g.upload(data, shape, DType::F16).unwrap();
        let x = up(&i.x, &[c.b, c.h, c.w, c.cin]);
        let w = up(&i.w, &[c.cout, c.kh, c.kw, c.cin]);
        let conv = Conv {
            input: Input::Plain(&x),
            weight: &w,
            bias: None,
            bias_rows: None,
            residual: None,
            norm: None,
            shortcut: None,
            stride: c.stride,
            pads: c.pads,
            variant: Some(Variant::COOP),
        };
        assert!(matches!(conv.run(g), Err(Error::Unsupported(_))));
        eprintln!(
            "no tensor-core conv on {}: forcing it is refused",
            g.adapter
        );
        return;
    };
    // Both tiles (the large one where its staging geometry holds), forced on this engine.
    let tiles = coop_tiles(g, plan);
    let large = tiles.contains(&CoopConvTile::T128);
    for &tile in &tiles {
        let entry = tile.entry();
        force_coop(g, Some(tile));
        let mut ran = 0;
        for (s, c) in all.iter().enumerate() {
            if !coop_takes(c) {
                continue;
            }
            let i = quantized(&inputs(c, 1000 + s as u64), DType::F16);
            let want = reference(c, &i);
            let got = g
                .download(&run_on(g, c, &i, DType::F16, Some(Variant::COOP)))
                .unwrap();
            let what = format!("{} [{entry} {tile:?} frag {}] (f16)", c.name, plan.frag);
            eprintln!("{what:<60} rel_l2 {:.2e}", rel_l2(&got, &want));
            assert_close(&what, &got, &want, tol(DType::F16, 1e-5, 2e-3));
            ran += 1;
        }
        force_coop(g, None);
        assert!(ran >= 10, "only {ran} cases suit the tensor-core kernel");
        let shader = plan.shader(ldm_wgpu::shaders::ShaderId::Conv2dCoop);
        assert!(
            g.compiled_pipelines()
                .iter()
                .any(|&(s, e)| s == shader && e == entry),
            "{shader} {entry} never ran"
        );
    }
    // The SD 1.5 8×8 and 16×16 shapes above split K on the large tile (`conv2d::split_k`): the
    // reduction ran, so the split path is what those cases checked.
    if large {
        let shader = plan.shader(ldm_wgpu::shaders::ShaderId::Conv2dCoop);
        assert!(
            g.compiled_pipelines()
                .iter()
                .any(|&(s, e)| s == shader && e == "conv2d_split_reduce"),
            "the split-K path never ran"
        );
    }
    // f32 cannot take it: refused, not silently run on another kernel.
    let c = &AWKWARD_SIZES_CASES[0];
    let x = g.empty(&[1, 4, 4, 4], DType::F32).unwrap();
    let w = g.empty(&[8, 3, 3, 4], DType::F32).unwrap();
    let conv = Conv {
        input: Input::Plain(&x),
        weight: &w,
        bias: None,
        bias_rows: None,
        residual: None,
        norm: None,
        shortcut: None,
        stride: 1,
        pads: c.pads,
        variant: Some(Variant::COOP),
    };
    assert!(matches!(conv.run(g), Err(Error::Unsupported(_))));
}

/// Where the large tensor-core tile splits K (pure arithmetic, every adapter): SD 1.5's small
/// grids get enough splits for ~256 workgroups, each split at least 8 K steps and a whole
/// number of them; large grids and short K run unsplit.
#[test]
fn split_k_choice() {
    let nvidia = CoopPlan {
        frag: 16,
        subgroup: 32,
    };
    let splits = |tiles: usize, k: usize| conv2d::split_k(nvidia, tiles, k).map(|c| k.div_ceil(c));
    // 8×8 level, 3×3 over 1280 channels (K 11520): 10 tiles of 128 → 26 splits.
    assert_eq!(splits(10, 9 * 1280), Some(26));
    // 16×16 level: 40 tiles → 7; 32×32 level: 80 tiles → 4.
    assert_eq!(splits(40, 9 * 1280), Some(7));
    assert_eq!(splits(80, 9 * 640), Some(4));
    // 64×64 level: 192 tiles, unsplit; a short K (1×1 over 64 channels: 2 steps), unsplit.
    assert_eq!(splits(192, 9 * 320), None);
    assert_eq!(splits(10, 64), None);
    // At most K / 8 steps splits: 1×1 over 1280 channels is 40 steps → 5 splits.
    assert_eq!(splits(10, 1280), Some(5));
    for (tiles, k) in [
        (1, 4),
        (3, 36),
        (10, 11520),
        (63, 324),
        (40, 23040),
        (127, 99_996),
    ] {
        if let Some(chunk) = conv2d::split_k(nvidia, tiles, k) {
            assert_eq!(chunk % 32, 0, "chunk {chunk} not a whole number of K steps");
            assert!(chunk >= 8 * 32);
            assert!(k.div_ceil(chunk) >= 2 && k.div_ceil(chunk) * tiles <= 2 * 256 + tiles);
        }
    }
}

/// A bias per (batch, channel) read from a block of a wider table (flags bit 2: the U-Net's
/// conv1 + time embedding, one epilogue instead of a separate add pass) on every variant, both
/// dtypes, awkward sizes and SD 1.5 shapes, NaN-poisoned outputs; and on the tensor-core kernel
/// (both tiles and its split-K reduction) where the adapter has it.
#[test]
fn bias_per_batch_row() {
    // Refused: a table too small for [B, Cout], and bias_rows together with a bias.
    let g = gpu();
    let f = DType::F32;
    let x = g.empty(&[2, 4, 4, 4], f).unwrap();
    let w = g.empty(&[8, 3, 3, 4], f).unwrap();
    let bias = g.empty(&[8], f).unwrap();
    let table = g.empty(&[3, 10], f).unwrap();
    let conv = |bias: Option<&Tensor>, row, col| {
        Conv {
            input: Input::Plain(&x),
            weight: &w,
            bias,
            bias_rows: Some(conv2d::ChannelBiasView {
                table: &table,
                row,
                col,
            }),
            residual: None,
            norm: None,
            shortcut: None,
            stride: 1,
            pads: P1,
            variant: None,
        }
        .run(g)
    };
    assert!(conv(None, 1, 2).is_ok());
    assert!(is_shape(conv(None, 2, 0)), "rows past the table");
    assert!(is_shape(conv(None, 0, 3)), "columns past the table");
    assert!(is_shape(conv(Some(&bias), 0, 0)), "bias and bias_rows");

    let cases: Vec<&Case> = AWKWARD_SIZES_CASES
        .iter()
        .chain(SD15_SHAPES_CASES.iter().take(4))
        .collect();
    for (s, c) in cases.iter().enumerate() {
        for dtype in dtypes() {
            let i = quantized(&inputs_bias_rows(c, 2000 + s as u64), dtype);
            let want = reference(c, &i);
            for v in all_variants() {
                let got = run_gpu(c, &i, dtype, Some(v));
                let what = format!("{} bias rows [{}] ({})", c.name, v.name(), dtype.name());
                eprintln!("{what:<60} rel_l2 {:.2e}", rel_l2(&got, &want));
                assert_close(&what, &got, &want, tol(dtype, 1e-5, 2e-3));
            }
        }
    }
    let engine = Gpu::new(&GpuOptions::from_env().unwrap()).expect("a wgpu adapter");
    let g = &engine;
    let Some(plan) = ldm_wgpu::kernels::coop::coop_plan(g, DType::F16) else {
        eprintln!("no tensor-core conv on {}", g.adapter);
        return;
    };
    for tile in coop_tiles(g, plan) {
        force_coop(g, Some(tile));
        for (s, c) in cases.iter().enumerate() {
            if !coop_takes(c) {
                continue;
            }
            let i = quantized(&inputs_bias_rows(c, 3000 + s as u64), DType::F16);
            let want = reference(c, &i);
            let got = g
                .download(&run_on(g, c, &i, DType::F16, Some(Variant::COOP)))
                .unwrap();
            let what = format!(
                "{} bias rows [coop {tile:?} frag {}] (f16)",
                c.name, plan.frag
            );
            eprintln!("{what:<60} rel_l2 {:.2e}", rel_l2(&got, &want));
            assert_close(&what, &got, &want, tol(DType::F16, 1e-5, 2e-3));
        }
        force_coop(g, None);
    }
}

/// GroupNorm (+ SiLU) fused into the conv's loads (flags bits 3, 4; `Conv::norm`), the table from
/// `GroupNormOp::stats`: padding (a padding tap is 0 after the normalisation, not `shift`),
/// stride 2, asymmetric padding, 1×1 (proj_in), both load paths, several tiles, the concat input
/// with groups straddling the boundary (the statistics read both sources), the upsampled input,
/// with bias / residual, and SD 1.5 shapes (conv1 at 8×8, an up block's concat conv1 at 6×6).
/// Tolerances as the plain conv's: the reference normalises in f64; the kernel's x·scale + shift
/// in f32 adds ~|mean| / std · 2⁻²⁴ (|mean| / std ≤ ~3 here), far below the f32 bound.
#[rustfmt::skip]
const FUSED_NORM_CASES: &[(Case, usize, bool)] = &[
    (case("gn 3x3 p1 vec4 13x11 cin24 G6 silu", 2, 13, 11, 24, 19, (3, 3), 1, P1, true, false), 6, true),
    (case("gn 3x3 p1 scalar 13x11 cin6 G3 silu", 2, 13, 11, 6, 19, (3, 3), 1, P1, true, true), 3, true),
    (case("gn 3x3 s2 p1 7x5 cin8 G4 silu", 2, 7, 5, 8, 13, (3, 3), 2, P1, true, true), 4, true),
    (case("gn 3x3 s2 pad(0,1,0,1) 9x9 cin12 G3", 1, 9, 9, 12, 16, (3, 3), 2, PVAE, true, false), 3, false),
    (case("gn 1x1 11x13 cin20 cout70 G5 (proj_in)", 2, 11, 13, 20, 70, (1, 1), 1, P0, true, false), 5, false),
    (case("gn multi-tile 23x29 cin36 cout130 G6 silu", 2, 23, 29, 36, 130, (3, 3), 1, P1, true, true), 6, true),
    (case("gn 1x1 image 3x3 p1 cin8 G2 silu", 1, 1, 1, 8, 5, (3, 3), 1, P1, false, false), 2, true),
    (case("gn conv_out 9x7 cin16 cout4 G4 silu", 2, 9, 7, 16, 4, (3, 3), 1, P1, true, false), 4, true),
    (cat(12, case("gn cat 3x3 p1 12+20 -> 67 G4 silu (vec4)", 2, 11, 7, 32, 67, (3, 3), 1, P1, true, true)), 4, true),
    (cat(7, case("gn cat 3x3 p1 7+9 -> 19 G4 silu (scalar)", 1, 9, 13, 16, 19, (3, 3), 1, P1, true, false)), 4, true),
    (cat(8, case("gn cat 1x1 8+12 -> 13 G5", 2, 7, 9, 20, 13, (1, 1), 1, P0, true, true)), 5, false),
    (up(case("gn up 5x7 cin8 cout13 G2 silu", 1, 5, 7, 8, 13, (3, 3), 1, P1, true, false)), 2, true),
    (up(case("gn up 9x11 cin36 cout70 G4 silu B2", 2, 9, 11, 36, 70, (3, 3), 1, P1, false, true)), 4, true),
    (case("gn unet.res conv1 320 8x8 G32 silu B2", 2, 8, 8, 320, 320, (3, 3), 1, P1, true, false), 32, true),
    (cat(640, case("gn unet.up3 conv1 640+320 6x6 G32 silu B2", 2, 6, 6, 960, 320, (3, 3), 1, P1, true, false)), 32, true),
];

#[test]
fn fused_group_norm() {
    for (s, &(c, groups, silu)) in FUSED_NORM_CASES.iter().enumerate() {
        for dtype in dtypes() {
            let i = quantized(&inputs_norm(&c, groups, silu, 4000 + s as u64), dtype);
            let want = reference(&c, &i);
            // The small tile on wide convs is slow on lavapipe and runs there only when forced.
            let variants = all_variants()
                .into_iter()
                .filter(|v| v.tile != Tile::Small || c.cin < 320);
            for v in variants {
                let got = run_gpu(&c, &i, dtype, Some(v));
                let what = format!("{} [{}] ({})", c.name, v.name(), dtype.name());
                eprintln!("{what:<60} rel_l2 {:.2e}", rel_l2(&got, &want));
                assert_close(&what, &got, &want, tol(dtype, 1e-5, 2e-3));
            }
        }
    }
}

/// [`fused_group_norm`]'s cases on the tensor-core kernel, forced, in both its tiles (the large
/// one with its prefetch, and split K on the SD shapes' small grids), where the adapter has it.
/// f16 tolerance as the plain conv's: the normalised input is rounded to f16 once, as staged.
#[test]
fn fused_group_norm_coop() {
    let engine = Gpu::new(&GpuOptions::from_env().unwrap()).expect("a wgpu adapter");
    let g = &engine;
    let Some(plan) = ldm_wgpu::kernels::coop::coop_plan(g, DType::F16) else {
        eprintln!("no tensor-core conv on {}", g.adapter);
        return;
    };
    let tiles = coop_tiles(g, plan);
    let large = tiles.contains(&CoopConvTile::T128);
    for &tile in &tiles {
        force_coop(g, Some(tile));
        let mut ran = 0;
        for (s, &(c, groups, silu)) in FUSED_NORM_CASES.iter().enumerate() {
            if !coop_takes(&c) {
                continue;
            }
            let i = quantized(&inputs_norm(&c, groups, silu, 5000 + s as u64), DType::F16);
            let want = reference(&c, &i);
            let got = g
                .download(&run_on(g, &c, &i, DType::F16, Some(Variant::COOP)))
                .unwrap();
            let what = format!("{} [coop {tile:?} frag {}] (f16)", c.name, plan.frag);
            eprintln!("{what:<64} rel_l2 {:.2e}", rel_l2(&got, &want));
            assert_close(&what, &got, &want, tol(DType::F16, 1e-5, 2e-3));
            ran += 1;
        }
        force_coop(g, None);
        assert!(
            ran >= 10,
            "only {ran} fused-norm cases suit the tensor-core kernel"
        );
    }
    if large {
        let shader = plan.shader(ldm_wgpu::shaders::ShaderId::Conv2dCoop);
        assert!(
            g.compiled_pipelines()
                .iter()
                .any(|&(s, e)| s == shader && e == "conv2d_split_reduce"),
            "the split-K path never ran"
        );
    }
}

/// A GroupNorm table of the wrong shape or dtype, or one aliasing the output, is refused.
#[test]
fn fused_group_norm_rejects_bad_tables() {
    let g = gpu();
    let f = DType::F32;
    let x = g.empty(&[2, 4, 4, 8], f).unwrap();
    let w = g.empty(&[6, 3, 3, 8], f).unwrap();
    let run = |table: &Tensor| {
        Conv {
            input: Input::Plain(&x),
            weight: &w,
            bias: None,
            bias_rows: None,
            residual: None,
            norm: Some(conv2d::FusedNorm {
                stats: conv2d::NormStats::Table(table),
                silu: true,
            }),
            shortcut: None,
            stride: 1,
            pads: P1,
            variant: None,
        }
        .run(g)
    };
    assert!(run(&g.empty(&[2, 8, 2], f).unwrap()).is_ok());
    assert!(
        is_shape(run(&g.empty(&[1, 8, 2], f).unwrap())),
        "one batch row"
    );
    assert!(
        is_shape(run(&g.empty(&[2, 6, 2], f).unwrap())),
        "Cout, not Cin"
    );
    if dtypes().contains(&DType::F16) {
        let h = g.empty(&[2, 8, 2], DType::F16).unwrap();
        assert!(is_shape(run(&h)), "an f16 table");
    }
    g.flush().unwrap();
}

/// The tensor-core conv tiles this engine can be forced to: the 64 tile, and the large one
/// where its staging geometry holds.
fn coop_tiles(g: &Gpu, plan: CoopPlan) -> Vec<CoopConvTile> {
    let large = conv2d::coop_conv_tile(plan, &g.caps, 1 << 20, 1 << 10, Some(CoopTile::T128))
        == CoopTile::T128;
    if large {
        vec![CoopConvTile::T64, CoopConvTile::T128, CoopConvTile::T128x64]
    } else {
        vec![CoopConvTile::T64]
    }
}

/// A tensor-core conv tile a test forces: the 64 tile (`conv2d_coop`), the large tile
/// (`conv2d_coop_l`) or the large tile's narrow variant (half its channels, override TLN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CoopConvTile {
    T64,
    T128,
    T128x64,
}

impl CoopConvTile {
    fn entry(self) -> &'static str {
        match self {
            CoopConvTile::T64 => "conv2d_coop",
            CoopConvTile::T128 | CoopConvTile::T128x64 => "conv2d_coop_l",
        }
    }
}

/// Force (or release, `None`) a tensor-core conv tile on engine `g` for what it records next.
fn force_coop(g: &Gpu, tile: Option<CoopConvTile>) {
    g.set_policy(KernelPolicy {
        coop_tile: tile.map(|t| match t {
            CoopConvTile::T64 => CoopTile::T64,
            CoopConvTile::T128 | CoopConvTile::T128x64 => CoopTile::T128,
        }),
        coop_conv_narrow: tile == Some(CoopConvTile::T128x64),
        ..g.policy()
    });
}

/// A producer conv and a consumer conv with a fused GroupNorm + SiLU between them (ResnetBlock2D's
/// conv1 → norm2 → conv2): producer x [b, h, w, cin] → y [.., c] (3×3, bias); consumer 3×3
/// c → cout over silu(GroupNorm(y, groups)).
#[derive(Clone, Copy, Debug)]
struct PairCase {
    name: &'static str,
    b: usize,
    h: usize,
    w: usize,
    cin: usize,
    c: usize,
    groups: usize,
    cout: usize,
}

#[rustfmt::skip]
const PAIR_CASES: &[PairCase] = &[
    // 10-channel groups across 64-channel tiles, 143 pixels per image (tiles over two images).
    PairCase { name: "13x11 B2 12->40 (4 groups of 10) ->21", b: 2, h: 13, w: 11, cin: 12, c: 40, groups: 4, cout: 21 },
    // Three images of 64 pixels: a 128-row tile holds two whole images.
    PairCase { name: "8x8 B3 8->64 (32 groups of 2) ->19", b: 3, h: 8, w: 8, cin: 8, c: 64, groups: 32, cout: 19 },
    // 35 pixels per image, more channels than one tile, one group per channel and one group.
    PairCase { name: "5x7 B2 4->136 (8 groups of 17) ->70", b: 2, h: 5, w: 7, cin: 4, c: 136, groups: 8, cout: 70 },
    PairCase { name: "6x6 B2 8->24 (24 groups of 1) ->8", b: 2, h: 6, w: 6, cin: 8, c: 24, groups: 24, cout: 8 },
    PairCase { name: "9x9 B1 8->32 (1 group) ->12", b: 1, h: 9, w: 9, cin: 8, c: 32, groups: 1, cout: 12 },
];

/// Host data of a pair: x, the producer's weight and bias, gamma, beta, the consumer's weight.
struct PairInputs {
    x: Vec<f32>,
    w1: Vec<f32>,
    b1: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    w2: Vec<f32>,
}

fn pair_inputs(p: &PairCase, dtype: DType, seed: u64) -> PairInputs {
    let mut rng = Rng::new(seed);
    let q = |v: Vec<f32>| quantize(&v, dtype);
    PairInputs {
        x: q(rng.normals(p.b * p.h * p.w * p.cin, 1.0)),
        w1: q(rng.normals(p.c * 9 * p.cin, 1.0 / ((9 * p.cin) as f64).sqrt())),
        // A mean per channel, so groups have |mean| ≠ 0 and mix channel statistics.
        b1: q(rng.normals(p.c, 1.5)),
        gamma: q(rng.normals(p.c, 1.0)),
        beta: q(rng.normals(p.c, 1.0)),
        w2: q(rng.normals(p.cout * 9 * p.c, 1.0 / ((9 * p.c) as f64).sqrt())),
    }
}

/// Run the pair on `g`: the producer (variant `pv`) leaving its pieces in a NaN-poisoned buffer,
/// then the consumer (variant `cv`, reading y upsampled 2× when `upsampled`: a geometry that
/// cannot merge, so the conv must fall back to its own statistics) into a NaN-poisoned output.
/// Returns (y, the consumer's output, whether the producer made pieces).
fn run_pair(
    g: &Gpu,
    p: &PairCase,
    i: &PairInputs,
    dtype: DType,
    (pv, cv): (Option<Variant>, Option<Variant>),
    upsampled: bool,
    spoil: bool,
) -> (Vec<f32>, Vec<f32>, bool) {
    let up = |data: &[f32], shape: &[usize]| g.upload(data, shape, dtype).unwrap();
    let x = up(&i.x, &[p.b, p.h, p.w, p.cin]);
    let w1 = up(&i.w1, &[p.c, 3, 3, p.cin]);
    let b1 = up(&i.b1, &[p.c]);
    let (gamma, beta) = (up(&i.gamma, &[p.c]), up(&i.beta, &[p.c]));
    let pairs: Vec<f32> = i
        .gamma
        .iter()
        .zip(&i.beta)
        .flat_map(|(&a, &b)| [a, b])
        .collect();
    let gamma_beta = g.upload(&pairs, &[p.c, 2], DType::F32).unwrap();
    let w2 = up(&i.w2, &[p.cout, 3, 3, p.c]);
    let conv = |input, weight, bias, norm, variant| Conv {
        input,
        weight,
        bias,
        bias_rows: None,
        residual: None,
        norm,
        shortcut: None,
        stride: 1,
        pads: P1,
        variant,
    };
    let (y, partials) = conv(Input::Plain(&x), &w1, Some(&b1), None, pv)
        .run_with_partials(g, p.c / p.groups, |pieces| {
            fill::poisoned(g, &[pieces, 4], DType::F32)
        })
        .unwrap();
    let made = partials.is_some();
    if let (true, Some(p)) = (spoil, &partials) {
        fill::fill(g, &p.buffer, f32::NAN).unwrap();
    }
    let (ho, wo) = if upsampled {
        (2 * p.h, 2 * p.w)
    } else {
        (p.h, p.w)
    };
    let out = fill::poisoned(g, &[p.b, ho, wo, p.cout], dtype).unwrap();
    let norm = partials.as_ref().map(|partials| conv2d::FusedNorm {
        stats: conv2d::NormStats::Partials {
            partials,
            partials_b: None,
            groups: p.groups,
            gamma: &gamma,
            beta: &beta,
            gamma_beta: &gamma_beta,
            eps: GN_EPS,
        },
        silu: true,
    });
    let input = if upsampled {
        Input::Upsampled2x(&y)
    } else {
        Input::Plain(&y)
    };
    conv(input, &w2, None, norm, cv).run_into(g, &out).unwrap();
    (g.download(&y).unwrap(), g.download(&out).unwrap(), made)
}

/// The consumer's f64 reference: conv(silu(GroupNorm(y))) on the y the producer wrote.
fn pair_reference(p: &PairCase, i: &PairInputs, y: &[f32], upsampled: bool) -> Vec<f64> {
    let normed: Vec<f32> = norm::reference_group_norm(
        y,
        &[p.b, p.h * p.w, p.c],
        p.groups,
        GN_EPS,
        &i.gamma,
        &i.beta,
        true,
    )
    .iter()
    .map(|&v| v as f32)
    .collect();
    let (x, h, w) = if upsampled {
        (
            conv2d::upsample_nearest2x_host(&normed, p.b, p.h, p.w, p.c),
            2 * p.h,
            2 * p.w,
        )
    } else {
        (normed, p.h, p.w)
    };
    let shape = conv2d::ConvShape {
        b: p.b,
        h,
        w,
        cin: p.c,
        cout: p.cout,
        kh: 3,
        kw: 3,
        stride: 1,
        pads: P1,
    };
    conv2d::reference(&x, &i.w2, (None, None), &shape)
}

/// GroupNorm statistics without a statistics dispatch: every producer variant leaves per-tile
/// pieces, every consumer variant merges them, against the f64 reference of the consumer on
/// the producer's own output; both dtypes; pieces and outputs NaN-poisoned; where the tensor-core
/// kernel runs, its tiles as producer (split K included) and consumer.
#[test]
fn group_norm_statistics_from_the_producer() {
    for (s, p) in PAIR_CASES.iter().enumerate() {
        for dtype in dtypes() {
            let i = pair_inputs(p, dtype, 1700 + s as u64);
            // Every producer variant with the default consumer, every consumer variant with the
            // default producer (f32: the shape's own pair only; each is a pipeline to compile).
            let mut pairs: Vec<(Option<Variant>, Option<Variant>)> = vec![(None, None)];
            if dtype == DType::F16 {
                for v in all_variants() {
                    pairs.push((Some(v), None));
                    pairs.push((None, Some(v)));
                }
            }
            for pair in pairs {
                let (y, got, made) = run_pair(gpu(), p, &i, dtype, pair, false, false);
                assert!(made, "{}: the producer made no pieces", p.name);
                let want = pair_reference(p, &i, &y, false);
                let name = |v: Option<Variant>| v.map_or("by shape".into(), |v| v.name());
                let what = format!(
                    "{} [{} -> {}] ({})",
                    p.name,
                    name(pair.0),
                    name(pair.1),
                    dtype.name()
                );
                eprintln!("{what:<70} rel_l2 {:.2e}", rel_l2(&got, &want));
                assert_close(&what, &got, &want, tol(dtype, 1e-5, 2e-3));
            }
        }
        // Not vacuous: every consumer variant reads the pieces (NaN pieces, NaN output).
        let i = pair_inputs(p, DType::F16, 1750 + s as u64);
        for v in all_variants() {
            let (_, got, _) = run_pair(gpu(), p, &i, DType::F16, (None, Some(v)), false, true);
            assert!(
                got.iter().any(|x| x.is_nan()),
                "{} [{}]: the consumer did not read the pieces",
                p.name,
                v.name()
            );
        }
    }
    // A consumer that cannot merge (upsampled input) computes its own statistics instead.
    let p = &PAIR_CASES[0];
    let i = pair_inputs(p, DType::F32, 1790);
    let (y, got, _) = run_pair(gpu(), p, &i, DType::F32, (None, None), true, false);
    let want = pair_reference(p, &i, &y, true);
    assert_close("upsampled consumer (fallback)", &got, &want, 1e-5);
    // Tensor cores, on an engine of their own (tiles are forced).
    let engine = Gpu::new(&GpuOptions::from_env().unwrap()).expect("a wgpu adapter");
    let g = &engine;
    let Some(plan) = ldm_wgpu::kernels::coop::coop_plan(g, DType::F16) else {
        return;
    };
    // Plus a small grid with a long K, where the large tile splits K and the reduce writes
    // the pieces.
    let split = PairCase {
        name: "8x8 B2 256->256 (32 groups of 8) ->64 (split K)",
        b: 2,
        h: 8,
        w: 8,
        cin: 256,
        c: 256,
        groups: 32,
        cout: 64,
    };
    for &tile in &coop_tiles(g, plan) {
        force_coop(g, Some(tile));
        // Both sides on tensor cores (Mesa 26's emulated cooperative matrices are slow: three
        // cases).
        for (s, p) in PAIR_CASES.iter().take(2).chain([&split]).enumerate() {
            let i = pair_inputs(p, DType::F16, 1800 + s as u64);
            let pair = (Some(Variant::COOP), Some(Variant::COOP));
            let (y, got, made) = run_pair(g, p, &i, DType::F16, pair, false, false);
            assert!(made, "{}: the producer made no pieces", p.name);
            let want = pair_reference(p, &i, &y, false);
            let what = format!("{} [coop {tile:?} -> coop {tile:?}] (f16)", p.name);
            eprintln!("{what:<70} rel_l2 {:.2e}", rel_l2(&got, &want));
            assert_close(&what, &got, &want, tol(DType::F16, 1e-5, 2e-3));
        }
        force_coop(g, None);
    }
}

/// Where a producer's tiles cannot make pieces (a tile over three images, too many piece
/// groups, width 0), it says so (None) and its output is unchanged.
#[test]
fn group_norm_pieces_only_where_the_geometry_allows() {
    let g = gpu();
    let up = |shape: &[usize]| {
        let n = shape.iter().product::<usize>();
        g.upload(&Rng::new(n as u64).normals(n, 1.0), shape, DType::F32)
            .unwrap()
    };
    let run = |x: &Tensor, w: &Tensor, width: usize| {
        let conv = Conv {
            input: Input::Plain(x),
            weight: w,
            bias: None,
            bias_rows: None,
            residual: None,
            norm: None,
            shortcut: None,
            stride: 1,
            pads: P1,
            variant: None,
        };
        let (y, p) = conv
            .run_with_partials(g, width, |n| g.empty(&[n, 4], DType::F32))
            .unwrap();
        let plain = conv.run(g).unwrap();
        assert_eq!(
            g.download_bytes(&y).unwrap(),
            g.download_bytes(&plain).unwrap()
        );
        p.is_some()
    };
    let (x, w) = (up(&[2, 6, 6, 8]), up(&[16, 3, 3, 8]));
    assert!(run(&x, &w, 4));
    assert!(
        run(&x, &w, 5),
        "a narrower last piece group (16 = 5 + 5 + 5 + 1)"
    );
    assert!(!run(&x, &w, 0), "width 0");
    // 9 pixels per image: a 64-row tile holds more than two images.
    let (x, w) = (up(&[8, 3, 3, 8]), up(&[16, 3, 3, 8]));
    assert!(!run(&x, &w, 4), "tiles over three images");
    let (x, w) = (up(&[1, 4, 4, 8]), up(&[256, 3, 3, 8]));
    assert!(!run(&x, &w, 1), "over 128 piece groups");
    assert!(run(&x, &w, 2), "128 piece groups");
}

/// The U-Net decoder's resnet norm1 over [h ; skip]: two producers, each leaving pieces of its
/// own width, and a consumer whose groups straddle the two parts. a: x_a [b, h, w, 8] → y_a
/// [.., ca] in pieces of `wa` channels; b likewise (`wb`); the consumer is a 3×3 conv of
/// silu(GroupNorm(concat(y_a, y_b), groups)) → cout.
#[derive(Clone, Copy, Debug)]
struct ConcatPairCase {
    name: &'static str,
    b: usize,
    h: usize,
    w: usize,
    ca: usize,
    cb: usize,
    groups: usize,
    wa: usize,
    wb: usize,
    cout: usize,
}

impl ConcatPairCase {
    /// Whether the pieces tile the consumer's groups (else the consumer takes its own
    /// statistics).
    fn merges(&self) -> bool {
        let gw = (self.ca + self.cb) / self.groups;
        gw.is_multiple_of(self.wa) && gw.is_multiple_of(self.wb) && self.ca.is_multiple_of(self.wb)
    }
}

#[rustfmt::skip]
const CONCAT_PAIR_CASES: &[ConcatPairCase] = &[
    // 143 pixels per image (tiles over two images); a group [30, 45) straddles the parts.
    ConcatPairCase { name: "13x11 B2 40+20 (4 groups of 15; pieces 5 | 5) ->21", b: 2, h: 13, w: 11, ca: 40, cb: 20, groups: 4, wa: 5, wb: 5, cout: 21 },
    // h's pieces in the consumer's groups, the last one narrower (40 = 15 + 15 + 10).
    ConcatPairCase { name: "13x11 B2 40+20 (4 groups of 15; pieces 15 | 5) ->9", b: 2, h: 13, w: 11, ca: 40, cb: 20, groups: 4, wa: 15, wb: 5, cout: 9 },
    // The skip's pieces finer than h's (its own down-path norm's groups).
    ConcatPairCase { name: "8x8 B3 32+32 (4 groups of 16; pieces 16 | 8) ->19", b: 3, h: 8, w: 8, ca: 32, cb: 32, groups: 4, wa: 16, wb: 8, cout: 19 },
    // More channels than a 64-wide tile on either side.
    ConcatPairCase { name: "5x7 B2 96+72 (8 groups of 21; pieces 21 | 3) ->70", b: 2, h: 5, w: 7, ca: 96, cb: 72, groups: 8, wa: 21, wb: 3, cout: 70 },
    // Pieces of 10 would straddle the groups of 15 in b: the consumer computes its own.
    ConcatPairCase { name: "13x11 B2 40+20 (4 groups of 15; pieces 5 | 10: no merge) ->21", b: 2, h: 13, w: 11, ca: 40, cb: 20, groups: 4, wa: 5, wb: 10, cout: 21 },
];

/// A stride-1, padding-1 convolution with nothing else fused but `norm`.
fn conv3x3<'a>(
    input: Input<'a>,
    weight: &'a Tensor,
    bias: Option<&'a Tensor>,
    norm: Option<conv2d::FusedNorm<'a>>,
    variant: Option<Variant>,
) -> Conv<'a> {
    Conv {
        input,
        weight,
        bias,
        bias_rows: None,
        residual: None,
        norm,
        shortcut: None,
        stride: 1,
        pads: P1,
        variant,
    }
}

/// What a concat pair's producers wrote, the consumer's output, and the consumer's host data.
struct ConcatPairRun {
    ya: Vec<f32>,
    yb: Vec<f32>,
    got: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    w2: Vec<f32>,
}

/// Runs a concat pair on `g` (pieces and output NaN-poisoned; `spoil`: the second part's
/// pieces NaN-filled after the producer ran) and returns (y_a, y_b, the consumer's output).
fn run_concat_pair(
    g: &Gpu,
    p: &ConcatPairCase,
    dtype: DType,
    (pv, cv): (Option<Variant>, Option<Variant>),
    spoil: bool,
    seed: u64,
) -> ConcatPairRun {
    let c = p.ca + p.cb;
    let mut rng = Rng::new(seed);
    let q = |v: Vec<f32>| quantize(&v, dtype);
    let pixels = p.b * p.h * p.w;
    let host = [
        q(rng.normals(pixels * 8, 1.0)),
        q(rng.normals(p.ca * 9 * 8, 1.0 / 72f64.sqrt())),
        q(rng.normals(p.ca, 1.5)),
        q(rng.normals(pixels * 8, 1.0)),
        q(rng.normals(p.cb * 9 * 8, 1.0 / 72f64.sqrt())),
        q(rng.normals(p.cb, 1.5)),
    ];
    let gamma = q(rng.normals(c, 1.0));
    let beta = q(rng.normals(c, 1.0));
    let w2 = q(rng.normals(p.cout * 9 * c, 1.0 / ((9 * c) as f64).sqrt()));
    let up = |data: &[f32], shape: &[usize]| g.upload(data, shape, dtype).unwrap();
    let produce = |x: &[f32], w: &[f32], bias: &[f32], channels: usize, width: usize| {
        let x = up(x, &[p.b, p.h, p.w, 8]);
        let w = up(w, &[channels, 3, 3, 8]);
        let bias = up(bias, &[channels]);
        let (y, partials) = conv3x3(Input::Plain(&x), &w, Some(&bias), None, pv)
            .run_with_partials(g, width, |n| fill::poisoned(g, &[n, 4], DType::F32))
            .unwrap();
        (y, partials.expect("the producer made pieces"))
    };
    let (ya, pa) = produce(&host[0], &host[1], &host[2], p.ca, p.wa);
    let (yb, pb) = produce(&host[3], &host[4], &host[5], p.cb, p.wb);
    if spoil {
        fill::fill(g, &pb.buffer, f32::NAN).unwrap();
    }
    let pairs: Vec<f32> = gamma
        .iter()
        .zip(&beta)
        .flat_map(|(&a, &b)| [a, b])
        .collect();
    let gamma_beta = g.upload(&pairs, &[c, 2], DType::F32).unwrap();
    let (gamma_t, beta_t) = (up(&gamma, &[c]), up(&beta, &[c]));
    let w2_t = up(&w2, &[p.cout, 3, 3, c]);
    let norm = conv2d::FusedNorm {
        stats: conv2d::NormStats::Partials {
            partials: &pa,
            partials_b: Some(&pb),
            groups: p.groups,
            gamma: &gamma_t,
            beta: &beta_t,
            gamma_beta: &gamma_beta,
            eps: GN_EPS,
        },
        silu: true,
    };
    let out = fill::poisoned(g, &[p.b, p.h, p.w, p.cout], dtype).unwrap();
    conv3x3(Input::Concat(&ya, &yb), &w2_t, None, Some(norm), cv)
        .run_into(g, &out)
        .unwrap();
    ConcatPairRun {
        ya: g.download(&ya).unwrap(),
        yb: g.download(&yb).unwrap(),
        got: g.download(&out).unwrap(),
        gamma,
        beta,
        w2,
    }
}

/// The consumer's f64 reference on what the producers wrote.
fn concat_pair_check(p: &ConcatPairCase, run: ConcatPairRun, what: &str, tolerance: f64) {
    let ConcatPairRun {
        ya,
        yb,
        got,
        gamma,
        beta,
        w2,
    } = run;
    let c = p.ca + p.cb;
    let y = conv2d::concat_channels_host(&ya, &yb, p.b * p.h * p.w, p.ca, p.cb);
    let normed: Vec<f32> = norm::reference_group_norm(
        &y,
        &[p.b, p.h * p.w, c],
        p.groups,
        GN_EPS,
        &gamma,
        &beta,
        true,
    )
    .iter()
    .map(|&v| v as f32)
    .collect();
    let shape = conv2d::ConvShape {
        b: p.b,
        h: p.h,
        w: p.w,
        cin: c,
        cout: p.cout,
        kh: 3,
        kw: 3,
        stride: 1,
        pads: P1,
    };
    let want = conv2d::reference(&normed, &w2, (None, None), &shape);
    eprintln!("{what:<80} rel_l2 {:.2e}", rel_l2(&got, &want));
    assert_close(what, &got, &want, tolerance);
}

/// GroupNorm statistics of a concatenated input merged from both parts' producers (the U-Net
/// decoder's [h ; skip]): every consumer variant, both dtypes, groups that straddle the parts,
/// pieces of different widths per part, a narrower last piece group; where the pieces do not
/// tile the groups the consumer takes its own statistics. Not vacuous: NaN pieces of the second
/// part reach the output exactly where the consumer merges them.
#[test]
fn group_norm_statistics_from_both_concat_producers() {
    for (s, p) in CONCAT_PAIR_CASES.iter().enumerate() {
        for dtype in dtypes() {
            let mut consumers = vec![None];
            if dtype == DType::F16 {
                consumers.extend(all_variants().into_iter().map(Some));
            }
            for cv in consumers {
                let run = run_concat_pair(gpu(), p, dtype, (None, cv), false, 2100 + s as u64);
                let name = cv.map_or("by shape".into(), |v| v.name());
                let what = format!("{} [-> {name}] ({})", p.name, dtype.name());
                concat_pair_check(p, run, &what, tol(dtype, 1e-5, 2e-3));
            }
        }
        for v in all_variants() {
            let run = run_concat_pair(gpu(), p, DType::F16, (None, Some(v)), true, 2150 + s as u64);
            let nan = run.got.iter().any(|x| x.is_nan());
            assert_eq!(
                nan,
                p.merges(),
                "{} [{}]: NaN second-part pieces {} the output",
                p.name,
                v.name(),
                if p.merges() {
                    "did not reach"
                } else {
                    "reached"
                }
            );
        }
    }
    // Tensor cores on both sides, on an engine of their own (tiles are forced).
    let engine = Gpu::new(&GpuOptions::from_env().unwrap()).expect("a wgpu adapter");
    let g = &engine;
    let Some(plan) = ldm_wgpu::kernels::coop::coop_plan(g, DType::F16) else {
        return;
    };
    for &tile in &coop_tiles(g, plan) {
        force_coop(g, Some(tile));
        for (s, p) in CONCAT_PAIR_CASES.iter().take(2).enumerate() {
            let pair = (Some(Variant::COOP), Some(Variant::COOP));
            let run = run_concat_pair(g, p, DType::F16, pair, false, 2200 + s as u64);
            let what = format!("{} [coop {tile:?} -> coop {tile:?}] (f16)", p.name);
            concat_pair_check(p, run, &what, tol(DType::F16, 1e-5, 2e-3));
        }
        force_coop(g, None);
    }
}
