//! GroupNorm and LayerNorm against their f64 references: awkward sizes, |mean| >> std, and SD 1.5
//! shapes, both dtypes, outputs poisoned with NaN (the `_into` variants write into them).

mod common;

use common::*;
use ldm_wgpu::kernels::{fill, norm};
use ldm_wgpu::DType;

// f32: sums are taken relative to a pivot from the data over ≤ 32 values per thread, then merged
// pairwise (tree, then Chan across chunks), so even 40,960-value groups keep the statistics to a
// few ulps: measured ≤ 2e-7 on every case here (incl. |mean| = 1000 std); 1e-6 leaves 5× margin.
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
        norm::group_norm_into(gpu, &x, groups, 1e-5, &gamma, &beta, silu, &out).unwrap();
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
        norm::group_norm_into(gpu, &x, 3, 1e-5, &g, &g, false, &x).is_err(),
        "aliased output"
    );
    assert!(
        norm::layer_norm(gpu, &x, &g5, &g5, 1e-5).is_err(),
        "gamma of the wrong size"
    );
}
