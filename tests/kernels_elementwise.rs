//! Every elementwise op against its f64 reference: awkward sizes (1 element, C = 1 and 3, odd and
//! prime counts, vec4 and scalar paths) and SD 1.5 shapes, both dtypes, NaN-poisoned outputs
//! through the `_into` variants.

mod common;

use common::*;
use ldm_wgpu::kernels::{elementwise as ew, fill};
use ldm_wgpu::{DType, Tensor};

// Pure data movement and single roundings: f32 exact up to the op's own rounding (1e-6 covers
// exp/erf's few ulps), f16 one output rounding (2^-11 relative at most, ~3e-4 rms).
const MOVE_TOL: (f64, f64) = (0.0, 0.0);
const MATH_TOL: (f64, f64) = (1e-6, 1e-3);

fn poisoned(shape: &[usize], dtype: DType) -> Tensor {
    fill::poisoned(gpu(), shape, dtype).unwrap()
}

fn check(what: &str, out: &Tensor, want: &[f64], tols: (f64, f64)) {
    let got = gpu().download(out).unwrap();
    let tol = tol(out.dtype(), tols.0, tols.1);
    assert_close(
        &format!("{what} {:?} {}", out.shape(), out.dtype().name()),
        &got,
        want,
        tol,
    );
}

/// Exact ops on f16 still compare values that went through f16 on both sides: tolerance 0.
fn move_tol() -> (f64, f64) {
    MOVE_TOL
}

type Unary = fn(&ldm_wgpu::Gpu, &Tensor, &Tensor) -> ldm_wgpu::Result<()>;
/// (name, op, reference output, (f32, f16) tolerance)
type UnaryCase = (&'static str, Unary, Vec<f64>, (f64, f64));

const SIZES: &[&[usize]] = &[
    &[1],
    &[3],
    &[7, 1],
    &[2, 5, 3, 1],
    &[1, 13, 17, 3],
    &[2, 9, 11, 8],
    &[4099],
];

#[test]
fn unary_and_binary() {
    let mut rng = Rng::new(1);
    for dtype in dtypes() {
        for &shape in SIZES.iter().chain([&[2usize, 64, 64, 320][..]].iter()) {
            let n: usize = shape.iter().product();
            let (a, aq) = upload(&rng.normals(n, 3.0), shape, dtype);
            let (b, bq) = upload(&rng.normals(n, 1.0), shape, dtype);
            let unary: [UnaryCase; 8] = [
                ("silu", ew::silu_into, ew::reference_silu(&aq), MATH_TOL),
                ("gelu", ew::gelu_into, ew::reference_gelu(&aq), MATH_TOL),
                (
                    "quick_gelu",
                    ew::quick_gelu_into,
                    ew::reference_quick_gelu(&aq),
                    MATH_TOL,
                ),
                ("copy", ew::copy_into, ew::reference_copy(&aq), move_tol()),
                (
                    "scale",
                    |g, x, o| ew::scale_into(g, x, 0.18215, o),
                    ew::reference_scale(&aq, 0.18215),
                    MATH_TOL,
                ),
                ("relu", ew::relu_into, ew::reference_relu(&aq), move_tol()),
                (
                    "tanh_clamp",
                    |g, x, o| ew::tanh_clamp_into(g, x, 3.0, o),
                    ew::reference_tanh_clamp(&aq, 3.0),
                    MATH_TOL,
                ),
                (
                    "affine",
                    |g, x, o| ew::affine_into(g, x, 2.0, -1.0, o),
                    ew::reference_affine(&aq, 2.0, -1.0),
                    MATH_TOL,
                ),
            ];
            for (name, f, want, tols) in unary {
                let out = poisoned(shape, dtype);
                f(gpu(), &a, &out).unwrap();
                check(name, &out, &want, tols);
            }
            let out = poisoned(shape, dtype);
            ew::add_into(gpu(), &a, &b, &out).unwrap();
            check("add", &out, &ew::reference_add(&aq, &bq), MATH_TOL);
            let out = poisoned(shape, dtype);
            ew::mul_into(gpu(), &a, &b, &out).unwrap();
            check("mul", &out, &ew::reference_mul(&aq, &bq), MATH_TOL);
        }
    }
}

#[test]
fn gelu_tails() {
    // Large |x|: the left tail is where 1 + erf(x) would cancel; the kernel uses erfc directly.
    let xs: Vec<f32> = (-120..=120).map(|i| i as f32 * 0.1).collect();
    let (a, aq) = upload(&xs, &[xs.len()], DType::F32);
    let out = poisoned(&[xs.len()], DType::F32);
    ew::gelu_into(gpu(), &a, &out).unwrap();
    let got = gpu().download(&out).unwrap();
    let want = ew::reference_gelu(&aq);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let err = (g as f64 - w).abs();
        // Relative accuracy everywhere, including the left tail (where 1 + erf would cancel):
        // ~3e-7 for |x| < 2, then limited by f32 exp of a large argument (see erfc_pos).
        let bound = if xs[i].abs() < 2.0 {
            5e-7
        } else if xs[i].abs() < 4.0 {
            3e-6
        } else {
            5e-5
        };
        assert!(
            err <= bound * w.abs(),
            "gelu({}) = {g}, want {w}: relative error {:.2e}",
            xs[i],
            err / w.abs()
        );
    }
}

#[test]
fn channel_bias_concat_upsample() {
    let mut rng = Rng::new(2);
    for dtype in dtypes() {
        // (B, H, W, C) with C = 1, 3 (scalar paths), 4, 8 and SD's 64×64×320.
        for &[b, h, w, c] in &[
            [1usize, 1, 1, 1],
            [2, 3, 5, 3],
            [1, 7, 3, 4],
            [2, 5, 5, 8],
            [2, 64, 64, 320],
        ] {
            let shape = [b, h, w, c];
            let n = b * h * w * c;
            let (x, xq) = upload(&rng.normals(n, 1.0), &shape, dtype);
            let (v, vq) = upload(&rng.normals(b * c, 1.0), &[b, c], dtype);
            let out = poisoned(&shape, dtype);
            ew::add_channel_bias_into(gpu(), &x, &v, &out).unwrap();
            check(
                "add_channel_bias",
                &out,
                &ew::reference_add_channel_bias(&xq, &vq, b, c),
                MATH_TOL,
            );

            // The same bias as a block of a wider table (the U-Net's per-schedule time
            // projections): rows row0.., columns col0.. of [row0 + b + 1, col0 + c + extra];
            // offsets that keep and that break the vec4 path.
            for (row0, col0, extra) in [(0usize, 0usize, 0usize), (3, 4, 8), (1, 1, 3)] {
                let (rows, width) = (row0 + b + 1, col0 + c + extra);
                let (t, tq) = upload(&rng.normals(rows * width, 1.0), &[rows, width], dtype);
                let block: Vec<f32> = (0..b)
                    .flat_map(|i| {
                        let start = (row0 + i) * width + col0;
                        tq[start..start + c].to_vec()
                    })
                    .collect();
                let view = ew::ChannelBiasView {
                    table: &t,
                    row: row0,
                    col: col0,
                };
                let out = poisoned(&shape, dtype);
                ew::add_channel_bias_view_into(gpu(), &x, view, &out).unwrap();
                check(
                    "add_channel_bias (table block)",
                    &out,
                    &ew::reference_add_channel_bias(&xq, &block, b, c),
                    MATH_TOL,
                );
            }

            for c2 in [1usize, 4, c] {
                let (y, yq) = upload(&rng.normals(b * h * w * c2, 1.0), &[b, h, w, c2], dtype);
                let out = poisoned(&[b, h, w, c + c2], dtype);
                ew::concat_channels_into(gpu(), &x, &y, &out).unwrap();
                check(
                    "concat_channels",
                    &out,
                    &ew::reference_concat_channels(&xq, &yq, c, c2),
                    move_tol(),
                );
            }

            let out = poisoned(&[b, 2 * h, 2 * w, c], dtype);
            ew::upsample_nearest2x_into(gpu(), &x, &out).unwrap();
            check(
                "upsample_nearest2x",
                &out,
                &ew::reference_upsample_nearest2x(&xq, shape),
                move_tol(),
            );
        }
    }
}

#[test]
fn layout_batch_gather() {
    let mut rng = Rng::new(3);
    for dtype in dtypes() {
        for &[b, c, h, w] in &[
            [1usize, 1, 1, 1],
            [1, 3, 5, 7],
            [2, 4, 64, 64],
            [1, 3, 31, 17],
        ] {
            let n = b * c * h * w;
            let (x, xq) = upload(&rng.normals(n, 1.0), &[b, c, h, w], dtype);
            let out = poisoned(&[b, h, w, c], dtype);
            ew::nchw_to_nhwc_into(gpu(), &x, &out).unwrap();
            check(
                "nchw_to_nhwc",
                &out,
                &ew::reference_nchw_to_nhwc(&xq, [b, c, h, w]),
                move_tol(),
            );
            // Interpret the same values as NHWC [b, h, w, c] and go back.
            let xh = x.reshape(&[b, h, w, c]).unwrap();
            let out = poisoned(&[b, c, h, w], dtype);
            ew::nhwc_to_nchw_into(gpu(), &xh, &out).unwrap();
            check(
                "nhwc_to_nchw",
                &out,
                &ew::reference_nhwc_to_nchw(&xq, [b, h, w, c]),
                move_tol(),
            );
        }
        // concat_batch: vec4 path (4 | numel(a)), scalar path, and the repeat concat_batch(x, x).
        for &(ba, bb, rest) in &[
            (1usize, 1usize, &[4usize, 64, 64][..]),
            (1, 2, &[3, 1][..]),
            (2, 1, &[5][..]),
            (1, 1, &[1][..]),
        ] {
            let sa: Vec<usize> = [ba].iter().chain(rest).copied().collect();
            let sb: Vec<usize> = [bb].iter().chain(rest).copied().collect();
            let (a, aq) = upload(&rng.normals(sa.iter().product(), 1.0), &sa, dtype);
            let (bt, bq) = upload(&rng.normals(sb.iter().product(), 1.0), &sb, dtype);
            let mut so = sa.clone();
            so[0] += bb;
            let out = poisoned(&so, dtype);
            ew::concat_batch_into(gpu(), &a, &bt, &out).unwrap();
            check(
                "concat_batch",
                &out,
                &ew::reference_concat_batch(&aq, &bq),
                move_tol(),
            );
            let mut sr = sa.clone();
            sr[0] *= 2;
            let out = poisoned(&sr, dtype);
            ew::concat_batch_into(gpu(), &a, &a, &out).unwrap();
            check(
                "concat_batch (repeat)",
                &out,
                &ew::reference_concat_batch(&aq, &aq),
                move_tol(),
            );
        }
        // gather_rows: CLIP pooled output at the EOS position.
        for &[b, n, c] in &[[1usize, 1, 1], [2, 77, 768], [3, 5, 3]] {
            let (x, xq) = upload(&rng.normals(b * n * c, 1.0), &[b, n, c], dtype);
            let idx: Vec<u32> = (0..b).map(|i| ((i * 31 + 7) % n) as u32).collect();
            let out = poisoned(&[b, c], dtype);
            ew::gather_rows_into(gpu(), &x, &idx, &out).unwrap();
            check(
                "gather_rows",
                &out,
                &ew::reference_gather_rows(&xq, [b, n, c], &idx),
                move_tol(),
            );
        }
    }
}

#[test]
fn embeddings_and_softmax() {
    let mut rng = Rng::new(4);
    for dtype in dtypes() {
        // CLIP: vocab 49408 is too big to upload per test on lavapipe cheaply; 1000 rows exercise
        // the same indexing. Plus odd sizes.
        for &(batch, n, v, p, c) in &[
            (2usize, 77usize, 1000usize, 77usize, 768usize),
            (1, 1, 1, 1, 1),
            (3, 5, 7, 9, 3),
        ] {
            let (tok, tq) = upload(&rng.normals(v * c, 1.0), &[v, c], dtype);
            let (pos, pq) = upload(&rng.normals(p * c, 1.0), &[p, c], dtype);
            let ids: Vec<u32> = (0..batch * n)
                .map(|_| (rng.next_u64() % v as u64) as u32)
                .collect();
            let out = poisoned(&[batch, n, c], dtype);
            ew::embed_tokens_into(gpu(), &ids, batch, &tok, &pos, &out).unwrap();
            check(
                "embed_tokens",
                &out,
                &ew::reference_embed_tokens(&ids, batch, &tq, &pq, c),
                MATH_TOL,
            );
        }
        // SD 1.5 U-Net: dim 320, flip_sin_to_cos = true, shift 0; plus odd dims and the other flags.
        let ts = [999.0f32, 1.0, 0.0, 500.5, 27.0];
        for &(dim, flip, shift) in &[
            (320usize, true, 0.0f32),
            (320, false, 1.0),
            (7, true, 0.0),
            (1, false, 1.0),
            (2, false, 0.0),
        ] {
            let out = poisoned(&[ts.len(), dim], dtype);
            ew::timestep_embedding_into(gpu(), &ts, dim, flip, shift, &out).unwrap();
            // f32: |phase| <= 1000 after an exact reduction leaves sin/cos's own error (~1e-7 abs).
            check(
                "timestep_embedding",
                &out,
                &ew::reference_timestep_embedding(&ts, dim, flip, shift),
                (2e-6, 1e-3),
            );
        }
        // Softmax rows: 1 value, 3, 77 (cross-attention keys), 4096 (self-attention at 64×64).
        for &(rows, c) in &[(1usize, 1usize), (5, 3), (16, 77), (4, 4096), (3, 1000)] {
            let (x, xq) = upload(&rng.normals(rows * c, 4.0), &[rows, c], dtype);
            let out = poisoned(&[rows, c], dtype);
            ew::softmax_last_dim_into(gpu(), &x, &out).unwrap();
            check(
                "softmax",
                &out,
                &ew::reference_softmax_last_dim(&xq, c),
                MATH_TOL,
            );
        }
    }
}

#[test]
fn cast_both_ways() {
    if !gpu().caps.shader_f16 {
        return;
    }
    let mut rng = Rng::new(5);
    for n in [1usize, 3, 5, 4096, 2 * 4 * 64 * 64 + 3] {
        let (x32, xq) = upload(&rng.normals(n, 10.0), &[n], DType::F32);
        let out16 = poisoned(&[n], DType::F16);
        ew::cast_into(gpu(), &x32, &out16).unwrap();
        // Round to nearest even, as the reference: exact.
        check(
            "cast f32->f16",
            &out16,
            &ew::reference_cast(&xq, DType::F16),
            (0.0, 0.0),
        );
        let back = poisoned(&[n], DType::F32);
        ew::cast_into(gpu(), &out16, &back).unwrap();
        let h = gpu().download(&out16).unwrap();
        check(
            "cast f16->f32",
            &back,
            &ew::reference_cast(&h, DType::F32),
            (0.0, 0.0),
        );
    }
}

#[test]
fn allocating_forms_and_errors() {
    let g = gpu();
    let x = g
        .upload(&[1.0, -2.0, 3.0], &[1, 1, 1, 3], DType::F32)
        .unwrap();
    let y = ew::upsample_nearest2x(g, &x).unwrap();
    assert_eq!(y.shape(), &[1, 2, 2, 3]);
    let z = ew::concat_channels(g, &x, &x).unwrap();
    assert_eq!(z.shape(), &[1, 1, 1, 6]);
    let e = ew::timestep_embedding(g, &[10.0, 20.0], 5, true, 1.0, DType::F32).unwrap();
    assert_eq!(e.shape(), &[2, 5]);
    assert_eq!(
        g.download(&ew::add(g, &x, &x).unwrap()).unwrap(),
        vec![2.0, -4.0, 6.0]
    );
    let w = g.upload(&[0.0; 4], &[1, 1, 1, 4], DType::F32).unwrap();
    assert!(ew::add(g, &x, &w).is_err(), "shape mismatch");
    assert!(ew::add_into(g, &x, &x, &x).is_err(), "aliased output");
    let v = g.upload(&[0.0; 2], &[1, 2], DType::F32).unwrap();
    assert!(
        ew::add_channel_bias(g, &x, &v).is_err(),
        "bias of the wrong width"
    );
    let table = g.upload(&[0.0; 8], &[2, 4], DType::F32).unwrap();
    let view = |row, col| ew::ChannelBiasView {
        table: &table,
        row,
        col,
    };
    assert!(
        ew::add_channel_bias_view(g, &x, view(1, 1)).is_ok(),
        "a block inside the table"
    );
    assert!(
        ew::add_channel_bias_view(g, &x, view(2, 0)).is_err(),
        "rows past the table"
    );
    assert!(
        ew::add_channel_bias_view(g, &x, view(0, 2)).is_err(),
        "columns past the table"
    );
    let t = g.upload(&[0.0; 6], &[3, 2], DType::F32).unwrap();
    assert!(
        ew::embed_tokens(g, &[3], 1, &t, &t).is_err(),
        "id outside the vocabulary"
    );
    assert!(
        ew::gather_rows(g, &t.reshape(&[1, 3, 2]).unwrap(), &[3]).is_err(),
        "row outside"
    );
}

/// A token table bound in row slices (how CLIP's 145 MiB f32 table fits a 128 MiB binding)
/// gives exactly the unsliced result: every output row is written by the slice holding its id.
#[test]
fn embed_tokens_in_row_slices() {
    let g = gpu();
    let mut rng = Rng::new(77);
    let (vocab, c, n, batch) = (37usize, 5usize, 7usize, 2usize);
    let ids: Vec<u32> = (0..batch * n)
        .map(|i| ((i * 11 + 3) % vocab) as u32)
        .collect();
    for dtype in dtypes() {
        let (_, table) = upload(&rng.normals(vocab * c, 1.0), &[vocab, c], dtype);
        let (pos_t, pos) = upload(&rng.normals(n * c, 1.0), &[n, c], dtype);
        let want = ew::reference_embed_tokens(&ids, batch, &table, &pos, c);
        let out = fill::poisoned(g, &[batch, n, c], dtype).unwrap();
        for (first, rows) in [(0usize, 20usize), (20, 13), (33, 4)] {
            let slice = g
                .upload(&table[first * c..(first + rows) * c], &[rows, c], dtype)
                .unwrap();
            ew::embed_tokens_slice_into(g, &ids, batch, &slice, first, &pos_t, &out).unwrap();
        }
        let got = g.download(&out).unwrap();
        // One f32 add (f16: plus output rounding) from the f64 reference.
        assert_close(
            "embed_tokens in slices",
            &got,
            &want,
            tol(dtype, 1e-6, 1e-3),
        );
    }
}

/// The U-Net input pass (scale, 9-channel inpainting concat, CFG repeat, cast) against the same
/// steps composed on the host, at awkward sizes and the SD 1.5 shape.
#[test]
fn unet_input_matches_its_composition() {
    let mut rng = Rng::new(5);
    for &(b, h, w, l) in &[
        (1usize, 1usize, 1usize, 1usize),
        (2, 3, 5, 4),
        (1, 7, 3, 3),
        (1, 64, 64, 4),
    ] {
        let n = b * h * w;
        let (lat, lat_h) = upload(&rng.normals(n * l, 1.0), &[b, h, w, l], DType::F32);
        let (mask, mask_h) = upload(&rng.normals(n, 1.0), &[b, h, w, 1], DType::F32);
        let (masked, masked_h) = upload(&rng.normals(n * l, 1.0), &[b, h, w, l], DType::F32);
        for &dtype in &dtypes() {
            for inpaint in [false, true] {
                for repeat in [1usize, 2] {
                    let scale = 0.3125f32;
                    let c = if inpaint { 2 * l + 1 } else { l };
                    let mut want = Vec::with_capacity(repeat * n * c);
                    for r in 0..repeat * b {
                        for p in 0..h * w {
                            let px = (r % b) * h * w + p;
                            for ch in 0..c {
                                want.push(if ch < l {
                                    scale as f64 * lat_h[px * l + ch] as f64
                                } else if ch == l {
                                    mask_h[px] as f64
                                } else {
                                    masked_h[px * l + ch - l - 1] as f64
                                });
                            }
                        }
                    }
                    let out = poisoned(&[repeat * b, h, w, c], dtype);
                    let extra = inpaint.then_some((&mask, &masked));
                    ew::unet_input_into(gpu(), &lat, scale, extra, repeat, &out).unwrap();
                    check("unet_input", &out, &want, MATH_TOL);
                }
            }
        }
    }
    // Wrong mask shape and non-f32 latents are shape errors, not panics.
    let (lat, _) = upload(&[0.0; 8], &[1, 2, 1, 4], DType::F32);
    let (bad_mask, _) = upload(&[0.0; 4], &[1, 2, 2, 1], DType::F32);
    assert!(ew::unet_input(gpu(), &lat, 1.0, Some((&bad_mask, &lat)), 2, DType::F32).is_err());
    assert!(ew::unet_input(gpu(), &lat, 1.0, None, 0, DType::F32).is_err());
}
