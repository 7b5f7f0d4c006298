//! GroupNorm and LayerNorm against their f64 references: awkward sizes, |mean| >> std, and SD 1.5
//! shapes, both dtypes, outputs poisoned with NaN (the `_into` variants write into them). The
//! two-source GroupNorm against the reference of the host-built concatenation, the same way.

mod common;

use common::*;
use ldm_wgpu::kernels::{elementwise, fill, norm};
use ldm_wgpu::nn::GroupNorm;
use ldm_wgpu::DType;

// f32: sums are taken relative to a pivot from the data over ≤ 32 values per thread, then merged
// pairwise (tree, then Chan across chunks), so even 40,960-value groups keep the statistics to a
// few ulps: measured ≤ 3.5e-7 on every case here (incl. |mean| = 1000 std; the worst a 120-value
// two-source case), so 1e-6 leaves ~3× margin.
// f16: the output is rounded to 11 bits (2^-11 / sqrt(3) ~ 3e-4 rms relative) and gamma/beta too.
const F32_TOL: f64 = 1e-6;
const F16_TOL: f64 = 2e-3;

fn check_group_norm(shape: &[usize], groups: usize, silu: bool, offset: f64, seed: u64) {
    let gpu = gpu();
    let c = *shape.last().unwrap();
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(seed);
    for dtype in dtypes() {
        // x = offset + N(0, 1) per value, with a per-channel shift so groups mix channel means.
        let chan_shift: Vec<f64> = (0..c).map(|_| rng.normal() * 0.5).collect();
        let xs: Vec<f32> = (0..n)
            .map(|i| (offset + chan_shift[i % c] + rng.normal()) as f32)
            .collect();
        let (x, xq) = upload(&xs, shape, dtype);
        let (gamma, gq) = upload(&rng.normals(c, 1.0), &[c], dtype);
        let (beta, bq) = upload(&rng.normals(c, 1.0), &[c], dtype);
        let out = fill::poisoned(gpu, shape, dtype).unwrap();
        let op = norm::GroupNormOp {
            groups,
            eps: 1e-5,
            gamma: &gamma,
            beta: &beta,
            silu,
        };
        op.run_into(gpu, &x, &out).unwrap();
        let got = gpu.download(&out).unwrap();
        let want = norm::reference_group_norm(&xq, shape, groups, 1e-5, &gq, &bq, silu);
        eprintln!(
            "group_norm {shape:?} G={groups} {}: rel L2 {:.2e}",
            dtype.name(),
            rel_l2(&got, &want)
        );
        assert_close(
            &format!(
                "group_norm {shape:?} G={groups} silu={silu} offset={offset} {}",
                dtype.name()
            ),
            &got,
            &want,
            tol(dtype, F32_TOL, F16_TOL),
        );
    }
}

fn check_layer_norm(shape: &[usize], offset: f64, seed: u64) {
    let gpu = gpu();
    let c = *shape.last().unwrap();
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(seed);
    for dtype in dtypes() {
        let xs: Vec<f32> = (0..n).map(|_| (offset + rng.normal()) as f32).collect();
        let (x, xq) = upload(&xs, shape, dtype);
        let (gamma, gq) = upload(&rng.normals(c, 1.0), &[c], dtype);
        let (beta, bq) = upload(&rng.normals(c, 1.0), &[c], dtype);
        let out = fill::poisoned(gpu, shape, dtype).unwrap();
        norm::layer_norm_into(gpu, &x, &gamma, &beta, 1e-5, &out).unwrap();
        let got = gpu.download(&out).unwrap();
        let want = norm::reference_layer_norm(&xq, c, &gq, &bq, 1e-5);
        eprintln!(
            "layer_norm {shape:?} {}: rel L2 {:.2e}",
            dtype.name(),
            rel_l2(&got, &want)
        );
        assert_close(
            &format!("layer_norm {shape:?} offset={offset} {}", dtype.name()),
            &got,
            &want,
            tol(dtype, F32_TOL, F16_TOL),
        );
    }
}

#[test]
fn group_norm_awkward_sizes() {
    // (shape, groups): C = 1, C = 3, C/G = 1, C/G = 3, C/G = 5, odd and prime spatial sizes, a
    // 1-element tensor, many chunks with a short last chunk (C/G = 1 → 2048 rows per chunk).
    let cases: &[(&[usize], usize)] = &[
        (&[1, 1, 1, 1], 1),
        (&[1, 1, 1, 3], 3),
        (&[2, 3, 5, 3], 1),
        (&[1, 7, 11, 6], 2),
        (&[3, 13, 1, 15], 3),
        (&[2, 17, 19, 10], 2),
        (&[1, 67, 71, 4], 4),
        (&[2, 29, 37], 1),
        (&[2, 5, 40], 8),
        (&[1, 2, 2, 32], 32),
    ];
    for (i, &(shape, groups)) in cases.iter().enumerate() {
        for silu in [false, true] {
            check_group_norm(shape, groups, silu, 0.0, 100 + i as u64);
        }
    }
}

#[test]
fn group_norm_large_mean() {
    // |mean| >> std: a naive E[x^2] - E[x]^2 in f32 would lose every digit of the variance here.
    check_group_norm(&[2, 33, 31, 20], 4, false, 1000.0, 7);
    check_group_norm(&[1, 9, 9, 6], 3, true, -300.0, 8);
}

#[test]
fn group_norm_sd15_shapes() {
    // U-Net 64×64×320 with CFG batch, a VAE-like shape, and the VAE decoder's 256×256×256 (16.7M
    // values: past 4096 × 2048, so workgroups take more than the minimum 2048 values each).
    check_group_norm(&[2, 64, 64, 320], 32, true, 0.0, 21);
    check_group_norm(&[1, 128, 128, 256], 32, true, 0.0, 22);
    check_group_norm(&[1, 256, 256, 256], 32, true, 0.0, 24);
    check_group_norm(&[2, 8, 8, 1280], 32, false, 0.0, 23);
}

#[test]
fn layer_norm_awkward_sizes() {
    for (i, shape) in [
        &[1usize, 1][..],
        &[1, 3],
        &[5, 1],
        &[3, 7, 65],
        &[2, 1, 129],
        &[1, 300, 13],
    ]
    .iter()
    .enumerate()
    {
        check_layer_norm(shape, 0.0, 200 + i as u64);
    }
    check_layer_norm(&[4, 9, 320], 500.0, 210);
}

#[test]
fn layer_norm_sd15_shapes() {
    check_layer_norm(&[2, 4096, 320], 0.0, 31);
    check_layer_norm(&[2, 77, 768], 0.0, 32);
}

#[test]
fn shape_errors_are_errors() {
    let gpu = gpu();
    let x = gpu.empty(&[1, 4, 4, 6], DType::F32).unwrap();
    let g = gpu.empty(&[6], DType::F32).unwrap();
    let g5 = gpu.empty(&[5], DType::F32).unwrap();
    assert!(
        norm::group_norm(gpu, &x, 4, 1e-5, &g, &g, false).is_err(),
        "6 channels into 4 groups"
    );
    assert!(
        norm::group_norm(gpu, &x, 3, 1e-5, &g5, &g5, false).is_err(),
        "gamma of the wrong size"
    );
    assert!(
        norm::GroupNormOp {
            groups: 3,
            eps: 1e-5,
            gamma: &g,
            beta: &g,
            silu: false
        }
        .run_into(gpu, &x, &x)
        .is_err(),
        "aliased output"
    );
    assert!(
        norm::layer_norm(gpu, &x, &g5, &g5, 1e-5).is_err(),
        "gamma of the wrong size"
    );
}

/// a [lead.., ca] and b [lead.., cb] -> group norm of their channel concatenation, against the
/// reference of the concatenation built on the host; same numerics as `check_group_norm`, so the
/// same tolerances. Returns the worst rel-L2 over the dtypes.
fn check_group_norm_concat(
    lead: &[usize],
    (ca, cb): (usize, usize),
    groups: usize,
    silu: bool,
    offset: f64,
    seed: u64,
) {
    let gpu = gpu();
    let c = ca + cb;
    let rows: usize = lead.iter().product();
    let shape = |ch: usize| [lead, &[ch]].concat();
    let mut rng = Rng::new(seed);
    for dtype in dtypes() {
        // Per-channel shifts over the concatenated channels, so a straddling group mixes a's and
        // b's channel means.
        let chan_shift: Vec<f64> = (0..c).map(|_| rng.normal() * 0.5).collect();
        let mut gen = |c0: usize, width: usize| -> Vec<f32> {
            (0..rows * width)
                .map(|i| (offset + chan_shift[c0 + i % width] + rng.normal()) as f32)
                .collect()
        };
        let (av, bv) = (gen(0, ca), gen(ca, cb));
        let (a, aq) = upload(&av, &shape(ca), dtype);
        let (b, bq) = upload(&bv, &shape(cb), dtype);
        let (gamma, gq) = upload(&rng.normals(c, 1.0), &[c], dtype);
        let (beta, bq2) = upload(&rng.normals(c, 1.0), &[c], dtype);
        let out = fill::poisoned(gpu, &shape(c), dtype).unwrap();
        let op = norm::GroupNormOp {
            groups,
            eps: 1e-5,
            gamma: &gamma,
            beta: &beta,
            silu,
        };
        op.run_concat_into(gpu, &a, &b, &out).unwrap();
        let got = gpu.download(&out).unwrap();
        let host = norm::GroupNormHost {
            groups,
            eps: 1e-5,
            gamma: &gq,
            beta: &bq2,
            silu,
        };
        let want = norm::reference_group_norm_concat((&aq, &bq), &shape(c), ca, &host);
        let what = format!(
            "group_norm_concat {lead:?} x ({ca} + {cb}) G={groups} silu={silu} offset={offset} {}",
            dtype.name()
        );
        eprintln!("{what}: rel L2 {:.2e}", rel_l2(&got, &want));
        assert_close(&what, &got, &want, tol(dtype, F32_TOL, F16_TOL));
    }
}

#[test]
fn group_norm_concat_awkward_sizes() {
    // (lead dims, (Ca, Cb), G): one channel each; C/G = 1 with the boundary on a group edge; groups
    // straddling the boundary with odd channel counts on both sides (3 + 5 in groups of 4, 7 + 8 in
    // groups of 3, 2 + 13 in groups of 5: one group holds all of a); a single group over both;
    // many chunks with a short last one (C/G = 1 → 2048 rows per chunk); a 1-element b.
    let cases: &[(&[usize], (usize, usize), usize)] = &[
        (&[1, 1, 1], (1, 1), 1),
        (&[1, 1, 1], (1, 2), 3),
        (&[2, 3, 5], (3, 5), 2),
        (&[1, 7, 11], (7, 8), 5),
        (&[3, 13, 1], (2, 13), 3),
        (&[2, 5, 3], (13, 2), 1),
        (&[2, 17, 19], (9, 3), 4),
        (&[1, 67, 71], (3, 1), 4),
        (&[2, 29], (5, 1), 6),
        (&[1, 9, 9], (1, 14), 5),
    ];
    for (i, &(lead, split, groups)) in cases.iter().enumerate() {
        for silu in [false, true] {
            check_group_norm_concat(lead, split, groups, silu, 0.0, 400 + i as u64);
        }
    }
}

#[test]
fn group_norm_concat_large_mean() {
    // |mean| >> std with the group pivot in a and most of the group in b.
    check_group_norm_concat(&[2, 33, 31], (3, 17), 4, false, 1000.0, 410);
    check_group_norm_concat(&[1, 9, 9], (5, 4), 3, true, -300.0, 411);
}

#[test]
fn group_norm_concat_sd15_decoder_shapes() {
    // SD 1.5 U-Net up blocks at 512×512, CFG batch 2, G = 32: 1280 + 640 in groups of 60 (group
    // 21 straddles), 640 + 320 in groups of 30 (group 21 straddles) at 32×32 and 64×64, and
    // 1280 + 1280 (the boundary on a group edge).
    check_group_norm_concat(&[2, 16, 16], (1280, 640), 32, true, 0.0, 420);
    check_group_norm_concat(&[2, 32, 32], (640, 320), 32, true, 0.0, 421);
    check_group_norm_concat(&[2, 64, 64], (640, 320), 32, true, 0.0, 422);
    check_group_norm_concat(&[2, 8, 8], (1280, 1280), 32, true, 0.0, 423);
}

#[test]
fn group_norm_concat_matches_the_materialised_concat_bit_for_bit() {
    // Same walk, same pivots, same values in the same order as the one-source kernel over
    // concat_channels(a, b): the two must agree exactly, and GroupNorm::forward_concat with them.
    let gpu = gpu();
    let mut rng = Rng::new(430);
    for dtype in dtypes() {
        for &(lead, (ca, cb), groups) in &[
            (&[2usize, 7, 5][..], (7usize, 8usize), 5usize),
            (&[2, 16, 16], (1280, 640), 32),
        ] {
            let c = ca + cb;
            let rows: usize = lead.iter().product();
            let (a, _) = upload(&rng.normals(rows * ca, 1.0), &[lead, &[ca]].concat(), dtype);
            let (b, _) = upload(&rng.normals(rows * cb, 1.0), &[lead, &[cb]].concat(), dtype);
            let layer = GroupNorm::new(
                upload(&rng.normals(c, 1.0), &[c], dtype).0,
                upload(&rng.normals(c, 1.0), &[c], dtype).0,
                groups,
                1e-5,
            );
            let cat = elementwise::concat_channels(gpu, &a, &b).unwrap();
            let want = gpu
                .download(&layer.forward(gpu, &cat, true).unwrap())
                .unwrap();
            let got = gpu
                .download(&layer.forward_concat(gpu, &a, &b, true).unwrap())
                .unwrap();
            assert!(got.iter().all(|v| v.is_finite()));
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "{lead:?} x ({ca} + {cb}) G={groups} {}: {differ} of {} values differ",
                dtype.name(),
                got.len()
            );
        }
    }
}

#[test]
fn group_norm_concat_shape_errors() {
    let gpu = gpu();
    let a = gpu.empty(&[1, 4, 4, 3], DType::F32).unwrap();
    let b = gpu.empty(&[1, 4, 4, 5], DType::F32).unwrap();
    let g8 = gpu.empty(&[8], DType::F32).unwrap();
    let g3 = gpu.empty(&[3], DType::F32).unwrap();
    let run = |a, b, groups, gamma, out| {
        norm::GroupNormOp {
            groups,
            eps: 1e-5,
            gamma,
            beta: gamma,
            silu: false,
        }
        .run_concat_into(gpu, a, b, out)
    };
    let out = gpu.empty(&[1, 4, 4, 8], DType::F32).unwrap();
    run(&a, &b, 4, &g8, &out).unwrap();
    assert!(
        run(&a, &b, 3, &g8, &out).is_err(),
        "8 channels into 3 groups"
    );
    assert!(run(&a, &b, 4, &g3, &out).is_err(), "gamma sized for a only");
    let b_other = gpu.empty(&[1, 4, 5, 5], DType::F32).unwrap();
    assert!(
        run(&a, &b_other, 4, &g8, &out).is_err(),
        "spatial sizes differ"
    );
    let out_a = gpu.empty(&[1, 4, 4, 3], DType::F32).unwrap();
    assert!(
        run(&a, &b, 4, &g8, &out_a).is_err(),
        "output without b's channels"
    );
    let b8 = gpu.empty(&[1, 4, 4, 8], DType::F32).unwrap();
    let a0 = gpu.empty(&[1, 4, 4, 0], DType::F32).unwrap();
    assert!(run(&a0, &b8, 4, &g8, &b8).is_err(), "output aliasing b");
    if dtypes().contains(&DType::F16) {
        let b16 = gpu.empty(&[1, 4, 4, 5], DType::F16).unwrap();
        assert!(run(&a, &b16, 4, &g8, &out).is_err(), "mixed dtypes");
    }
    gpu.flush().unwrap();
}

/// The GroupNorm statistics table (`GroupNormOp::stats_into`: [B, C, 2] f32 scale = gamma·rstd,
/// shift = beta − mean·scale, what conv2d's fused norm reads) of x [lead.., ca] — or of the
/// concatenation with a second tensor [lead.., cb] — against `reference_group_norm_table` (f64,
/// two-pass), into a NaN-poisoned table. Tolerance 1e-6 (rel L2) for both dtypes: the table is
/// f32 whatever x's dtype, and the reference reads the same f16-rounded x, gamma and beta, so
/// only the f32 statistics differ — the numerics of the normalising kernel (see F32_TOL).
fn check_table(lead: &[usize], (ca, cb): (usize, usize), groups: usize, offset: f64, seed: u64) {
    let gpu = gpu();
    let c = ca + cb;
    let rows: usize = lead.iter().product();
    let mut rng = Rng::new(seed);
    for dtype in dtypes() {
        let chan_shift: Vec<f64> = (0..c).map(|_| rng.normal() * 0.5).collect();
        let xs: Vec<f32> = (0..rows * c)
            .map(|i| (offset + chan_shift[i % c] + rng.normal()) as f32)
            .collect();
        let xq = quantize(&xs, dtype);
        let part = |lo: usize, hi: usize| -> Vec<f32> {
            xq.chunks(c).flat_map(|px| px[lo..hi].to_vec()).collect()
        };
        let shape_of = |ch: usize| [lead, &[ch]].concat();
        let a = gpu.upload(&part(0, ca), &shape_of(ca), dtype).unwrap();
        let b = (cb > 0).then(|| gpu.upload(&part(ca, c), &shape_of(cb), dtype).unwrap());
        let (gamma, gq) = upload(&rng.normals(c, 1.0), &[c], dtype);
        let (beta, bq) = upload(&rng.normals(c, 1.0), &[c], dtype);
        let table = fill::poisoned(gpu, &[lead[0], c, 2], DType::F32).unwrap();
        let op = norm::GroupNormOp {
            groups,
            eps: 1e-5,
            gamma: &gamma,
            beta: &beta,
            silu: false,
        };
        op.stats_into(gpu, &a, b.as_ref(), &table).unwrap();
        let got = gpu.download(&table).unwrap();
        let want = norm::reference_group_norm_table(&xq, &shape_of(c), groups, 1e-5, &gq, &bq);
        let per_group = rows / lead[0] * (c / groups);
        let path = if per_group > norm::GN_STATS_ONE_PASS_MAX {
            "split"
        } else {
            "one pass"
        };
        let what = format!(
            "group_norm table {lead:?} x ({ca} + {cb}) G={groups} offset={offset} ({path}) {}",
            dtype.name()
        );
        eprintln!("{what}: rel L2 {:.2e}", rel_l2(&got, &want));
        assert_close(&what, &got, &want, 1e-6);
    }
}

#[test]
fn group_norm_table_matches_reference() {
    // Awkward sizes: cpg 1, 2, 3, 7; one pixel; odd batch rows.
    check_table(&[2, 7, 5], (12, 0), 4, 0.0, 600);
    check_table(&[1, 1, 1], (6, 0), 3, 0.0, 601);
    check_table(&[3, 5, 3], (7, 0), 7, 0.0, 602);
    check_table(&[2, 9, 11], (14, 0), 2, 0.0, 603);
    // |mean| >> std: the pivot keeps the variance.
    check_table(&[2, 6, 7], (12, 0), 4, 1000.0, 604);
    // The concatenated input, groups straddling the boundary (7 + 8 in 5 groups of 3).
    check_table(&[2, 7, 5], (7, 8), 5, 0.0, 605);
    check_table(&[2, 16, 16], (1280, 640), 32, 0.0, 606);
    // SD 1.5 U-Net shapes (one pass): 64×64×320 (40,960 values per group) and the largest, the
    // up block's 640 + 320 concat at 64×64 (122,880).
    check_table(&[2, 64, 64], (320, 0), 32, 0.0, 607);
    check_table(&[2, 64, 64], (640, 320), 32, 0.0, 608);
    // Beyond GN_STATS_ONE_PASS_MAX: the split path (chunks, then the merge), also concatenated
    // and with a large offset.
    check_table(&[1, 200, 200], (8, 0), 2, 0.0, 609);
    check_table(&[2, 200, 181], (6, 2), 2, 500.0, 610);
    let entries: Vec<&str> = gpu().compiled_pipelines().iter().map(|&(_, e)| e).collect();
    for entry in ["gn_stats", "gn_partial", "gn_affine"] {
        assert!(entries.contains(&entry), "{entry} never ran");
    }
}
