//! conv2d (implicit GEMM, NHWC) against the f64 reference: awkward sizes, every padding/stride
//! mode, with and without bias/residual, both dtypes, NaN-poisoned outputs, and SD 1.5 shapes.
//!
//! Tolerances (relative L2): f32 ≤ 1e-5: the kernel accumulates K = KH·KW·Cin products in f32 in a
//! different order than the f64 reference; the error of such a sum grows like √K·2⁻²⁴ relative to
//! the sum's scale, ≈ 6e-6 at the largest K here (11,520), and the measured errors stay below 2e-6.
//! f16 ≤ 2e-3: inputs are rounded to f16 on both sides; what remains is the final rounding of each
//! output to f16 (2⁻¹¹ relative, ≈ 3e-4 in L2).

mod common;

use common::*;
use ldm_wgpu::kernels::{conv2d, fill};
use ldm_wgpu::{DType, Error};

#[derive(Clone, Copy, Debug)]
struct Case {
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

impl Case {
    fn out_hw(&self) -> (usize, usize) {
        let ho = (self.h + self.pads[0] + self.pads[1] - self.kh) / self.stride + 1;
        let wo = (self.w + self.pads[2] + self.pads[3] - self.kw) / self.stride + 1;
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
    }
}

fn reference(c: &Case, i: &Inputs) -> Vec<f64> {
    conv2d::reference(
        &i.x,
        &i.w,
        i.bias.as_deref(),
        i.residual.as_deref(),
        c.b,
        c.h,
        c.w,
        c.cin,
        c.cout,
        c.kh,
        c.kw,
        c.stride,
        c.pads,
    )
}

/// Upload `i` in `dtype` (values already representable, or rounded here), run the kernel into a
/// NaN-poisoned output, return the output on the host.
fn run_gpu(c: &Case, i: &Inputs, dtype: DType) -> Vec<f32> {
    let g = gpu();
    let (ho, wo) = c.out_hw();
    let (x, _) = upload(&i.x, &[c.b, c.h, c.w, c.cin], dtype);
    let (w, _) = upload(&i.w, &[c.cout, c.kh, c.kw, c.cin], dtype);
    let bias = i.bias.as_ref().map(|v| upload(v, &[c.cout], dtype).0);
    let residual = i
        .residual
        .as_ref()
        .map(|v| upload(v, &[c.b, ho, wo, c.cout], dtype).0);
    let out = fill::poisoned(g, &[c.b, ho, wo, c.cout], dtype).unwrap();
    conv2d::conv2d_into(
        g,
        &x,
        &w,
        bias.as_ref(),
        residual.as_ref(),
        c.stride,
        c.pads,
        &out,
    )
    .unwrap();
    g.download(&out).unwrap()
}

fn quantized(i: &Inputs, dtype: DType) -> Inputs {
    Inputs {
        x: quantize(&i.x, dtype),
        w: quantize(&i.w, dtype),
        bias: i.bias.as_ref().map(|v| quantize(v, dtype)),
        residual: i.residual.as_ref().map(|v| quantize(v, dtype)),
    }
}

fn check(c: &Case, seed: u64) {
    for dtype in dtypes() {
        let i = quantized(&inputs(c, seed), dtype);
        let want = reference(c, &i);
        let got = run_gpu(c, &i, dtype);
        let e = rel_l2(&got, &want);
        eprintln!("{:<40} {:>4} rel_l2 {e:.2e}", c.name, dtype.name());
        assert_close(
            &format!("{} ({})", c.name, dtype.name()),
            &got,
            &want,
            tol(dtype, 1e-5, 2e-3),
        );
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
];

#[test]
fn sd15_shapes() {
    for (s, c) in SD15_SHAPES_CASES.iter().enumerate() {
        let i = quantized(&inputs(c, 300 + s as u64), DType::F16);
        let want = reference(c, &i);
        for dtype in dtypes() {
            let t = std::time::Instant::now();
            let got = run_gpu(c, &i, dtype);
            let e = rel_l2(&got, &want);
            eprintln!(
                "{:<40} {:>4} rel_l2 {e:.2e} ({:.2} s on GPU)",
                c.name,
                dtype.name(),
                t.elapsed().as_secs_f64()
            );
            assert_close(
                &format!("{} ({})", c.name, dtype.name()),
                &got,
                &want,
                tol(dtype, 1e-5, 2e-3),
            );
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
            let part = conv2d::reference(
                xs,
                &i.w,
                i.bias.as_deref(),
                Some(&rs),
                1,
                i1 - i0,
                ww,
                cin,
                cout,
                3,
                3,
                1,
                pads,
            );
            assert_eq!(part.len(), (r1 - r0) * ww * cout);
            want.extend(part);
        }
    }
    for dtype in dtypes() {
        let t = std::time::Instant::now();
        let full = run_gpu(&c, &i, dtype);
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
        eprintln!(
            "{:<40} {:>4} rel_l2 {e:.2e} ({secs:.2} s on GPU)",
            c.name,
            dtype.name()
        );
        assert_close(
            &format!("{} ({})", c.name, dtype.name()),
            &got,
            &want,
            tol(dtype, 1e-5, 2e-3),
        );
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
    let got = conv2d::reference(
        &x_nhwc, &w_ohwi, None, None, b, h, w, cin, cout, kh, kw, stride, [pad; 4],
    );
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
    assert!(is_shape(conv2d::conv2d_into(
        g, &x, &w, None, None, 1, [1; 4], &bad_out
    )));
    // In place: out == residual.
    let res = g.empty(&[1, 8, 8, 6], f).unwrap();
    assert!(is_shape(conv2d::conv2d_into(
        g,
        &x,
        &w,
        None,
        Some(&res),
        1,
        [1; 4],
        &res
    )));
    // Mixed dtypes.
    if g.caps.shader_f16 {
        let wh = g.empty(&[6, 3, 3, 4], DType::F16).unwrap();
        assert!(is_shape(conv2d::conv2d(g, &x, &wh, None, None, 1, [1; 4])));
    }
}

#[test]
fn sd15_shape_table_is_consistent() {
    for &(name, b, h, w, cin, cout, k, stride) in conv2d::SD15_SHAPES {
        assert!(
            b >= 1 && h >= 1 && w >= 1 && cin >= 1 && cout >= 1,
            "{name}"
        );
        assert!(k == 1 || k == 3, "{name}: SD 1.5 convs are 1x1 or 3x3");
        assert!(stride == 1 || (stride == 2 && k == 3), "{name}");
    }
}
