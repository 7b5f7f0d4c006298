//! `shaders/matmul.wgsl` against its f64 reference: linear (every activation, with and without
//! bias and residual, in-place residual), fused GEGLU, batched A·Bᵀ; awkward sizes that hit every
//! edge of the 64 × 64 and 128 × 128 tiles and both the vec4 and scalar load paths; and SD 1.5 /
//! CLIP shapes. Where the tensor-core path runs (`LDM_COOP_MATMUL=1` on a lavapipe with
//! cooperative matrices, or a GPU), the f16 cases go through `shaders/matmul_coop.wgsl`, and the
//! large coop tile is also forced on the awkward shapes and compared with and without bounds
//! checks (the `coop_large_tile_*` tests, each on its own engine).
//!
//! Tolerances: f32 1e-5 relative L2 — inputs are O(1) and weights scaled by 1/√K, so f32
//! accumulation error grows like √K·2⁻²⁴ ≈ 4e-6 even at K = 5120 in the worst case (the random
//! walk is far smaller). f16 2e-3 — the reference starts from the same f16-rounded inputs, so the
//! error is the output's rounding to 11 bits (≈ 3e-4 relative L2) plus f32 accumulation.

mod common;

use common::{assert_close, dtypes, gpu, quantize, rel_l2, set_coop_tile, tol, Rng};
use ldm_wgpu::kernels::coop::{self, CoopPlan, CoopTile, COOP_LARGE_TILE_MIN_GROUPS};
use ldm_wgpu::kernels::fill::poisoned;
use ldm_wgpu::kernels::matmul::{self, Activation, RowLayerNorm};
use ldm_wgpu::kernels::norm::reference_layer_norm;
use ldm_wgpu::{DType, Gpu, GpuOptions, Tensor};

const ACTS: [Activation; 4] = [
    Activation::None,
    Activation::Gelu,
    Activation::Silu,
    Activation::QuickGelu,
];

fn tol_for(dtype: DType) -> f64 {
    tol(dtype, 1e-5, 2e-3)
}

/// Upload to `g` (any engine, not only the shared one), returning the exact values it holds.
fn upload_on(g: &Gpu, data: &[f32], shape: &[usize], dtype: DType) -> (Tensor, Vec<f32>) {
    let q = quantize(data, dtype);
    (g.upload(&q, shape, dtype).unwrap(), q)
}

/// Run `linear_into` on random data and compare every `row_step`-th row with the reference.
#[allow(clippy::too_many_arguments)]
fn check_linear(
    dtype: DType,
    lead: &[usize],
    n: usize,
    k: usize,
    bias: bool,
    residual: bool,
    act: Activation,
    seed: u64,
    row_step: usize,
) -> f64 {
    check_linear_on(
        gpu(),
        dtype,
        lead,
        n,
        k,
        bias,
        residual,
        act,
        seed,
        row_step,
    )
}

/// [`check_linear`] on engine `g`.
#[allow(clippy::too_many_arguments)]
fn check_linear_on(
    g: &Gpu,
    dtype: DType,
    lead: &[usize],
    n: usize,
    k: usize,
    bias: bool,
    residual: bool,
    act: Activation,
    seed: u64,
    row_step: usize,
) -> f64 {
    let m: usize = lead.iter().product();
    let mut rng = Rng::new(seed);
    let mut x_shape = lead.to_vec();
    x_shape.push(k);
    let mut y_shape = lead.to_vec();
    y_shape.push(n);
    let (x, xq) = upload_on(g, &rng.normals(m * k, 1.0), &x_shape, dtype);
    let (w, wq) = upload_on(
        g,
        &rng.normals(n * k, 1.0 / (k as f64).sqrt()),
        &[n, k],
        dtype,
    );
    let (b, bq) = upload_on(g, &rng.normals(n, 0.5), &[n], dtype);
    let (r, rq) = upload_on(g, &rng.normals(m * n, 1.0), &y_shape, dtype);
    let out = poisoned(g, &y_shape, dtype).unwrap();
    matmul::linear_into(
        g,
        &x,
        &w,
        bias.then_some(&b),
        residual.then_some(&r),
        act,
        &out,
    )
    .unwrap();
    let got = g.download(&out).unwrap();

    // Reference on every `row_step`-th row (the big shapes would take the f64 CPU loop too long).
    let rows: Vec<usize> = (0..m).step_by(row_step).collect();
    let xs: Vec<f32> = rows
        .iter()
        .flat_map(|&i| xq[i * k..(i + 1) * k].iter().copied())
        .collect();
    let rs: Vec<f32> = rows
        .iter()
        .flat_map(|&i| rq[i * n..(i + 1) * n].iter().copied())
        .collect();
    let want = matmul::reference_linear(
        &xs,
        &wq,
        (bias.then_some(&bq[..]), residual.then_some(&rs[..])),
        act,
        [rows.len(), n, k],
    );
    let got_rows: Vec<f32> = rows
        .iter()
        .flat_map(|&i| got[i * n..(i + 1) * n].iter().copied())
        .collect();
    assert!(
        got.iter().all(|v| v.is_finite()),
        "linear {lead:?}x{n}x{k} {dtype:?}: non-finite output"
    );
    let e = rel_l2(&got_rows, &want);
    assert!(
        e <= tol_for(dtype),
        "linear {lead:?} N={n} K={k} {dtype:?} bias={bias} residual={residual} {act:?}: rel L2 {e:.3e}"
    );
    e
}

#[test]
fn linear_awkward_shapes_all_epilogues() {
    let t = std::time::Instant::now();
    // (leading dims, N, K): 1 row / 1 column / K = 1, primes, K % 4 != 0 (scalar loads),
    // K % 4 == 0 (vec4 loads), leading batch dims, more than one tile along M, N and K.
    let cases: &[(&[usize], usize, usize)] = &[
        (&[1], 1, 1),
        (&[1], 7, 13),
        (&[67], 129, 61),
        (&[3, 33], 5, 7),
        (&[2, 3, 11], 33, 5),
        (&[1], 64, 64),
        (&[65], 1, 36),
        (&[130], 67, 64),
        (&[2, 97], 70, 100),
        (&[13], 300, 4),
        (&[1031], 131, 19),
    ];
    let mut seed = 1;
    for &dtype in &dtypes() {
        for &(lead, n, k) in cases {
            for (i, &act) in ACTS.iter().enumerate() {
                seed += 1;
                check_linear(dtype, lead, n, k, i % 2 == 0, i / 2 == 1, act, seed, 1);
            }
        }
    }
    eprintln!("linear awkward shapes: {:.1} s", t.elapsed().as_secs_f64());
}

/// Shapes large enough for the 128 × 128 tiles, with both load paths.
#[test]
fn linear_large_tiles() {
    let t = std::time::Instant::now();
    for &dtype in &dtypes() {
        check_linear(
            dtype,
            &[2053],
            2050,
            20,
            true,
            true,
            Activation::Gelu,
            100,
            3,
        );
        check_linear(
            dtype,
            &[2, 1029],
            2051,
            19,
            true,
            false,
            Activation::Silu,
            101,
            3,
        );
    }
    eprintln!("linear large tiles: {:.1} s", t.elapsed().as_secs_f64());
}

/// The activations themselves, over [-8, 8] (K = 1, w = 1): checks the f32 erf closely.
#[test]
fn activations_match_f64() {
    let g = gpu();
    let m = 4001;
    let xs: Vec<f32> = (0..m)
        .map(|i| -8.0 + 16.0 * i as f32 / (m - 1) as f32)
        .collect();
    let x = g.upload(&xs, &[m, 1], DType::F32).unwrap();
    let w = g.upload(&[1.0], &[1, 1], DType::F32).unwrap();
    for act in ACTS {
        let out = poisoned(g, &[m, 1], DType::F32).unwrap();
        matmul::linear_into(g, &x, &w, None, None, act, &out).unwrap();
        let got = g.download(&out).unwrap();
        let want: Vec<f64> = xs.iter().map(|&v| act.apply(v as f64)).collect();
        assert_close(&format!("{act:?}"), &got, &want, 1e-6);
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(max_abs < 4e-6, "{act:?}: max abs error {max_abs:.2e}");
    }
    // The f64 reference erf itself, at known values.
    for (x, e) in [
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (2.4, 0.999_311_486_103_355),
        (3.0, 0.9999779095030014),
        (-4.0, -0.9999999845827421),
    ] {
        assert!(
            (matmul::erf_f64(x) - e).abs() < 1e-14,
            "erf({x}) = {}",
            matmul::erf_f64(x)
        );
    }
}

/// `y = y + silu(x·wᵀ + b)` with the residual being the output tensor itself, on engine `g`.
fn check_residual_in_place(g: &Gpu, dtype: DType, m: usize, n: usize, k: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let (x, xq) = upload_on(g, &rng.normals(m * k, 1.0), &[m, k], dtype);
    let (w, wq) = upload_on(g, &rng.normals(n * k, 0.2), &[n, k], dtype);
    let (b, bq) = upload_on(g, &rng.normals(n, 0.5), &[n], dtype);
    let (y, yq) = upload_on(g, &rng.normals(m * n, 1.0), &[m, n], dtype);
    matmul::linear_into(g, &x, &w, Some(&b), Some(&y), Activation::Silu, &y).unwrap();
    let want = matmul::reference_linear(
        &xq,
        &wq,
        (Some(&bq), Some(&yq)),
        Activation::Silu,
        [m, n, k],
    );
    assert_close(
        &format!("in-place residual {m}x{n}x{k} {dtype:?}"),
        &g.download(&y).unwrap(),
        &want,
        tol_for(dtype),
    );
}

/// `x = x + linear(x')`: the residual is the output tensor itself.
#[test]
fn linear_residual_in_place() {
    for &dtype in &dtypes() {
        check_residual_in_place(gpu(), dtype, 37, 45, 24, 7);
    }
}

fn check_geglu(
    dtype: DType,
    lead: &[usize],
    n: usize,
    k: usize,
    bias: bool,
    seed: u64,
    row_step: usize,
) {
    check_geglu_on(gpu(), dtype, lead, n, k, bias, seed, row_step)
}

/// [`check_geglu`] on engine `g`.
#[allow(clippy::too_many_arguments)]
fn check_geglu_on(
    g: &Gpu,
    dtype: DType,
    lead: &[usize],
    n: usize,
    k: usize,
    bias: bool,
    seed: u64,
    row_step: usize,
) {
    let m: usize = lead.iter().product();
    let mut rng = Rng::new(seed);
    let mut x_shape = lead.to_vec();
    x_shape.push(k);
    let mut y_shape = lead.to_vec();
    y_shape.push(n);
    let (x, xq) = upload_on(g, &rng.normals(m * k, 1.0), &x_shape, dtype);
    let (w, wq) = upload_on(
        g,
        &rng.normals(2 * n * k, 1.0 / (k as f64).sqrt()),
        &[2 * n, k],
        dtype,
    );
    let (b, bq) = upload_on(g, &rng.normals(2 * n, 0.5), &[2 * n], dtype);
    let out = poisoned(g, &y_shape, dtype).unwrap();
    matmul::linear_geglu_into(g, &x, &w, bias.then_some(&b), &out).unwrap();
    let got = g.download(&out).unwrap();
    let rows: Vec<usize> = (0..m).step_by(row_step).collect();
    let xs: Vec<f32> = rows
        .iter()
        .flat_map(|&i| xq[i * k..(i + 1) * k].iter().copied())
        .collect();
    let want = matmul::reference_geglu(&xs, &wq, bias.then_some(&bq[..]), rows.len(), n, k);
    let got_rows: Vec<f32> = rows
        .iter()
        .flat_map(|&i| got[i * n..(i + 1) * n].iter().copied())
        .collect();
    assert!(
        got.iter().all(|v| v.is_finite()),
        "geglu {lead:?}x{n}x{k} {dtype:?}: non-finite output"
    );
    assert_close(
        &format!("geglu {lead:?} N={n} K={k} {dtype:?} bias={bias}"),
        &got_rows,
        &want,
        tol_for(dtype),
    );
}

#[test]
fn geglu_awkward_shapes() {
    let t = std::time::Instant::now();
    let cases: &[(&[usize], usize, usize)] = &[
        (&[1], 1, 1),
        (&[1], 7, 13),
        (&[67], 129, 61),
        (&[3, 33], 5, 8),
        (&[2, 65], 33, 40),
        (&[130], 64, 12),
        // Big enough for the 128 × 128 tiles (≥ 256 workgroups), vec4 and scalar loads.
        (&[2100], 1100, 20),
        (&[2100], 1030, 9),
    ];
    let mut seed = 200;
    for &dtype in &dtypes() {
        for &(lead, n, k) in cases {
            for bias in [true, false] {
                seed += 1;
                check_geglu(
                    dtype,
                    lead,
                    n,
                    k,
                    bias,
                    seed,
                    if lead[0] > 1000 { 5 } else { 1 },
                );
            }
        }
    }
    eprintln!("geglu awkward shapes: {:.1} s", t.elapsed().as_secs_f64());
}

/// Batched `a · btᵀ` (B × M × N × K) on engine `g` against the reference.
fn check_batched(g: &Gpu, dtype: DType, (b, m, n, k): (usize, usize, usize, usize), seed: u64) {
    let mut rng = Rng::new(seed);
    let (a, aq) = upload_on(g, &rng.normals(b * m * k, 1.0), &[b, m, k], dtype);
    let (bt, btq) = upload_on(
        g,
        &rng.normals(b * n * k, 1.0 / (k as f64).sqrt()),
        &[b, n, k],
        dtype,
    );
    let out = poisoned(g, &[b, m, n], dtype).unwrap();
    matmul::batched_matmul_bt_into(g, &a, &bt, &out).unwrap();
    let want = matmul::reference_batched_matmul_bt(&aq, &btq, b, m, n, k);
    assert_close(
        &format!("batched {b}x{m}x{n}x{k} {dtype:?}"),
        &g.download(&out).unwrap(),
        &want,
        tol_for(dtype),
    );
    // The allocating form gives the same numbers.
    let c = matmul::batched_matmul_bt(g, &a, &bt).unwrap();
    assert_eq!(c.shape(), &[b, m, n]);
}

#[test]
fn batched_matmul_bt_awkward_shapes() {
    // (B, M, N, K)
    let cases = [
        (1, 1, 1, 1),
        (3, 7, 13, 5),
        (2, 67, 129, 61),
        (5, 33, 17, 40),
        (2, 77, 77, 40),
        (4, 130, 70, 64),
    ];
    let mut seed = 300;
    for &dtype in &dtypes() {
        for case in cases {
            seed += 1;
            check_batched(gpu(), dtype, case, seed);
        }
    }
}

/// Real SD 1.5 / CLIP shapes (batch 1; the CPU reference checks every 16th row).
#[test]
fn sd15_shapes() {
    let t = std::time::Instant::now();
    for &dtype in &dtypes() {
        // Self-attention to_out at 64 × 64 latents: [4096, 320] · [320, 320]ᵀ + b + residual.
        let e = check_linear(
            dtype,
            &[1, 4096],
            320,
            320,
            true,
            true,
            Activation::None,
            400,
            16,
        );
        eprintln!("sd15 to_out 4096x320x320 {dtype:?}: rel L2 {e:.2e}");
        // CLIP text encoder fc1: [77, 768] · [3072, 768]ᵀ, quick_gelu.
        let e = check_linear(
            dtype,
            &[1, 77],
            3072,
            768,
            true,
            false,
            Activation::QuickGelu,
            401,
            1,
        );
        eprintln!("clip fc1 77x3072x768 {dtype:?}: rel L2 {e:.2e}");
    }
    // FeedForward GEGLU at 64 × 64 latents: [4096, 320] → [4096, 1280] (f16 only: the f32 path
    // runs the same kernel; lavapipe is slow).
    let dtype = *dtypes().last().unwrap();
    check_geglu(dtype, &[1, 4096], 1280, 320, true, 402, 16);
    eprintln!("sd15 shapes: {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn shape_errors_are_errors() {
    let g = gpu();
    let x = g.upload(&[0.0; 12], &[3, 4], DType::F32).unwrap();
    let w = g.upload(&[0.0; 10], &[2, 5], DType::F32).unwrap();
    assert!(matmul::linear(g, &x, &w, None, None, Activation::None).is_err());
    let w = g.upload(&[0.0; 8], &[2, 4], DType::F32).unwrap();
    let b = g.upload(&[0.0; 3], &[3], DType::F32).unwrap();
    assert!(matmul::linear(g, &x, &w, Some(&b), None, Activation::None).is_err());
    let y = matmul::linear(g, &x, &w, None, None, Activation::None).unwrap();
    assert_eq!(y.shape(), &[3, 2]);
    assert!(matmul::linear_into(g, &x, &w, None, None, Activation::None, &x).is_err());
    let w3 = g.upload(&[0.0; 12], &[3, 4], DType::F32).unwrap();
    assert!(matmul::linear_geglu(g, &x, &w3, None).is_err());
    assert_eq!(
        matmul::linear_geglu(g, &x, &w, None).unwrap().shape(),
        &[3, 1]
    );
    assert!(matmul::batched_matmul_bt(g, &x, &w).is_err());
    if g.caps.shader_f16 {
        let wh = g.upload(&[0.0; 8], &[2, 4], DType::F16).unwrap();
        assert!(matmul::linear(g, &x, &wh, None, None, Activation::None).is_err());
    }
}

/// One LayerNorm-on-load case ([`matmul::linear_norm_into`] / [`matmul::linear_geglu_norm_into`]):
/// rows of `lead` × K with a common `offset` (the pivot must keep it exact), a random affine,
/// the linear with bias, residual and `act` (or GEGLU with bias), against LayerNorm → linear in
/// f64. Every `row_step`-th row is compared; the output is poisoned first. Returns the rel L2.
#[allow(clippy::too_many_arguments)]
fn check_linear_norm_on(
    g: &Gpu,
    dtype: DType,
    lead: &[usize],
    n: usize,
    k: usize,
    geglu: Option<bool>,
    act: Activation,
    offset: f32,
    seed: u64,
    row_step: usize,
) -> f64 {
    let m: usize = lead.iter().product();
    let mut rng = Rng::new(seed);
    let mut x_shape = lead.to_vec();
    x_shape.push(k);
    let n_w = if geglu.is_some() { 2 * n } else { n };
    let mut y_shape = lead.to_vec();
    y_shape.push(n);
    // Rows of different scales around `offset`.
    let scales = rng.normals(m, 1.0);
    let x_data: Vec<f32> = rng
        .normals(m * k, 1.0)
        .iter()
        .enumerate()
        .map(|(i, v)| offset + v * (0.2 + scales[i / k].abs()))
        .collect();
    let (x, xq) = upload_on(g, &x_data, &x_shape, dtype);
    let gamma: Vec<f32> = rng.normals(k, 0.3).iter().map(|v| 1.0 + v).collect();
    let (ln_w, gq) = upload_on(g, &gamma, &[k], dtype);
    let (ln_b, bq_ln) = upload_on(g, &rng.normals(k, 0.2), &[k], dtype);
    let (w, wq) = upload_on(
        g,
        &rng.normals(n_w * k, 1.0 / (k as f64).sqrt()),
        &[n_w, k],
        dtype,
    );
    let (b, bq) = upload_on(g, &rng.normals(n_w, 0.5), &[n_w], dtype);
    let (r, rq) = upload_on(g, &rng.normals(m * n, 1.0), &y_shape, dtype);
    let out = poisoned(g, &y_shape, dtype).unwrap();
    let eps = 1e-5;
    let norm = RowLayerNorm {
        weight: &ln_w,
        bias: &ln_b,
        eps,
    };
    match geglu {
        None => matmul::linear_norm_into(g, &x, norm, &w, (Some(&b), Some(&r)), act, &out),
        Some(bias) => matmul::linear_geglu_norm_into(g, &x, norm, &w, bias.then_some(&b), &out),
    }
    .unwrap();
    let got = g.download(&out).unwrap();
    assert!(
        got.iter().all(|v| v.is_finite()),
        "layer norm on load {lead:?}x{n}x{k} {dtype:?}: non-finite output"
    );
    let rows: Vec<usize> = (0..m).step_by(row_step).collect();
    let xs: Vec<f32> = rows
        .iter()
        .flat_map(|&i| xq[i * k..(i + 1) * k].iter().copied())
        .collect();
    let normed: Vec<f32> = reference_layer_norm(&xs, k, &gq, &bq_ln, eps)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let want = match geglu {
        None => {
            let rs: Vec<f32> = rows
                .iter()
                .flat_map(|&i| rq[i * n..(i + 1) * n].iter().copied())
                .collect();
            matmul::reference_linear(
                &normed,
                &wq,
                (Some(&bq[..]), Some(&rs[..])),
                act,
                [rows.len(), n, k],
            )
        }
        Some(bias) => {
            matmul::reference_geglu(&normed, &wq, bias.then_some(&bq[..]), rows.len(), n, k)
        }
    };
    let got_rows: Vec<f32> = rows
        .iter()
        .flat_map(|&i| got[i * n..(i + 1) * n].iter().copied())
        .collect();
    let e = rel_l2(&got_rows, &want);
    assert!(
        e <= tol_for(dtype),
        "layer norm on load {lead:?} N={n} K={k} {dtype:?} geglu={geglu:?} {act:?} offset {offset}: rel L2 {e:.3e}"
    );
    e
}

/// The LayerNorm-on-load cases every matmul kernel must pass on `g` (`dtype`): awkward M, N and
/// K (the 4-element vec4 minimum, K % 4 != 0 through the separate-norm fallback), a large common
/// offset, every activation, GEGLU with and without bias. Returns the worst rel L2.
fn check_layer_norm_on_load(g: &Gpu, dtype: DType, seed0: u64) -> f64 {
    let mut worst = 0.0f64;
    let mut seed = seed0;
    let cases: &[(&[usize], usize, usize, f32)] = &[
        (&[1], 1, 4, 0.0),
        (&[37], 29, 44, 0.0),
        (&[2, 65], 70, 36, 30.0),
        (&[130], 131, 68, -3.0),
        (&[259], 67, 320, 0.5),
        (&[19], 10, 30, 2.0), // K % 4 != 0: LayerNorm, then the linear
    ];
    for (i, &(lead, n, k, offset)) in cases.iter().enumerate() {
        seed += 1;
        let act = ACTS[i % ACTS.len()];
        worst = worst.max(check_linear_norm_on(
            g, dtype, lead, n, k, None, act, offset, seed, 1,
        ));
    }
    let geglu: &[(&[usize], usize, usize, f32)] = &[
        (&[67], 33, 40, 0.0),
        (&[131], 70, 68, 10.0),
        (&[5], 3, 6, 0.0),
    ];
    for &(lead, n, k, offset) in geglu {
        for bias in [true, false] {
            seed += 1;
            let e = check_linear_norm_on(
                g,
                dtype,
                lead,
                n,
                k,
                Some(bias),
                Activation::None,
                offset,
                seed,
                1,
            );
            worst = worst.max(e);
        }
    }
    worst
}

/// LayerNorm applied in the matmul's loads (issue 21 item 4) on the default kernels, both
/// dtypes, plus a shape that takes the 128 × 128 FMA tile, whose 256 invocations share each row's
/// statistics two to a row (the merge of partial statistics).
#[test]
fn layer_norm_on_load() {
    let g = gpu();
    for dtype in dtypes() {
        let worst = check_layer_norm_on_load(g, dtype, 900);
        let big = check_linear_norm_on(
            g,
            dtype,
            &[2053],
            2050,
            8,
            None,
            Activation::Silu,
            4.0,
            950,
            7,
        );
        eprintln!("layer norm on load {dtype:?}: worst rel L2 {worst:.2e}, 2053x2050x8 {big:.2e}");
    }
}

/// Every f16 case above runs on the tensor-core kernel (`shaders/matmul_coop.wgsl`) when the
/// adapter offers f16 cooperative matrices and the path is on (by default on GPUs; CI forces it
/// with `LDM_COOP_MATMUL=1` on a lavapipe that offers 8×8 fragments). This checks that it really
/// was that kernel, so the suite cannot pass on the FMA kernel while claiming the coop path.
#[test]
fn tensor_core_path_runs_where_offered() {
    let g = gpu();
    let forced = std::env::var("LDM_COOP_MATMUL").is_ok_and(|v| v == "1");
    let plan = coop::coop_plan(g, DType::F16);
    if forced && g.caps.shader_f16 && g.caps.coop_f16_frag.is_some() {
        assert!(
            plan.is_some(),
            "LDM_COOP_MATMUL=1 and the adapter offers {:?}, but the path is off: {:?}",
            g.caps.coop_f16_frag,
            g.caps
        );
    }
    // Where the shader's staging slots do not fit the plan, the matmul runs the FMA kernel.
    let Some(plan) = plan.filter(|p| p.matmul_staging_fits()) else {
        eprintln!(
            "tensor-core matmul not in use on {} (FMA kernel tested)",
            g.adapter
        );
        return;
    };
    check_linear(
        DType::F16,
        &[1, 37],
        29,
        44,
        true,
        true,
        Activation::Gelu,
        500,
        1,
    );
    check_geglu(DType::F16, &[1, 37], 29, 44, true, 501, 1);
    let ran = g.compiled_pipelines();
    let shader = plan.shader(ldm_wgpu::shaders::ShaderId::MatmulCoop);
    // Either tile (`LDM_COOP_TILE=128` forces the large one everywhere).
    for entry in ["linear_coop", "geglu_coop"] {
        assert!(
            ran.iter()
                .any(|&(s, e)| s == shader && e.strip_suffix("_l").unwrap_or(e) == entry),
            "{shader}/{entry}[_l] never compiled; pipelines: {ran:?}"
        );
    }
    eprintln!("tensor-core matmul ran: {shader} with {plan:?}");
}

// ------------------------------------------------------ tensor cores: the large (8·frag) tile

/// The tile heuristic and the workgroup-memory formula, for NVIDIA's plan (16 × 16 fragments,
/// 32-wide subgroups) and lavapipe's (8 × 8, 8-wide); needs no cooperative matrices.
#[test]
fn coop_tile_choice_and_budget() {
    let nvidia = CoopPlan {
        frag: 16,
        subgroup: 32,
    };
    let lavapipe = CoopPlan {
        frag: 8,
        subgroup: 8,
    };
    // The shader's declarations: 2 staged tiles of side × (2f + 8) f16, plus the f32 epilogue
    // tile (T64) or 8 subgroup slots of f × 2f f32 (T128), plus the LayerNorm row statistics
    // (8f vec4<f32>) both tiles share.
    assert_eq!(CoopTile::T64.workgroup_bytes(nvidia), 28 * 1024);
    assert_eq!(CoopTile::T128.workgroup_bytes(nvidia), 38 * 1024);
    assert_eq!(CoopTile::T64.workgroup_bytes(lavapipe), 8 * 1024);
    assert_eq!(CoopTile::T128.workgroup_bytes(lavapipe), 11 * 1024);
    assert!(CoopTile::T128.workgroup_bytes(nvidia) <= 48 * 1024);
    assert!(CoopTile::T128.workgroup_bytes(lavapipe) <= 32 * 1024);
    assert_eq!(CoopTile::T128.invocations(nvidia), 256);
    assert_eq!(CoopTile::T128.invocations(lavapipe), 64);
    assert_eq!(CoopTile::parse("128"), Some(CoopTile::T128));
    assert_eq!(CoopTile::parse("64"), Some(CoopTile::T64));
    assert_eq!(CoopTile::parse("coop"), None);
    // The shader's fixed staging slots: f² / (2 · subgroup) rows per invocation, 1, 2 or 4.
    assert_eq!(nvidia.matmul_staging_slots(), Some(4));
    assert_eq!(lavapipe.matmul_staging_slots(), Some(4));
    assert!(nvidia.matmul_staging_fits() && lavapipe.matmul_staging_fits());
    let plan = |frag, subgroup| CoopPlan { frag, subgroup };
    assert!(plan(16, 64).matmul_staging_fits(), "AMD wave64: 2 slots");
    assert!(plan(8, 16).matmul_staging_fits() && plan(8, 32).matmul_staging_fits());
    assert_eq!(plan(16, 16).matmul_staging_slots(), Some(8));
    assert!(
        !plan(16, 16).matmul_staging_fits(),
        "8 slots: the shader has 4"
    );
    assert!(!plan(8, 4).matmul_staging_fits());
    assert_eq!(
        plan(8, 64).matmul_staging_slots(),
        None,
        "half a row per invocation"
    );
    assert!(!plan(8, 64).matmul_staging_fits());

    let mut caps = gpu().caps.clone();
    caps.max_workgroup_storage = 48 * 1024;
    caps.max_invocations = 1024;
    let choose =
        |m, n_tile_cols, forced| CoopTile::choose(nvidia, &caps, 1, m, n_tile_cols, forced);
    // SD 1.5 at 512² (batch 2 in M), as measured on an H200: every shape with 40 or more large
    // tiles is T128 (the 64² projections and ff.out, 192; the 16² projections, 40; the
    // GEGLUs); the 8² mid-block projections and ff.out (10) and the 77-token K/V (6) are T64.
    assert_eq!(choose(8192, 320, None), CoopTile::T128);
    assert_eq!(choose(512, 1280, None), CoopTile::T128);
    assert_eq!(choose(8192, 2 * 1280, None), CoopTile::T128);
    assert_eq!(choose(2048, 2 * 2560, None), CoopTile::T128);
    assert_eq!(choose(512, 2 * 5120, None), CoopTile::T128);
    assert_eq!(choose(128, 2 * 5120, None), CoopTile::T128);
    assert_eq!(choose(128, 1280, None), CoopTile::T64);
    assert_eq!(choose(154, 320, None), CoopTile::T64);
    assert_eq!(choose(4096, 4096, None), CoopTile::T128);
    // The threshold: 32 tiles of 128.
    assert_eq!(COOP_LARGE_TILE_MIN_GROUPS, 32);
    assert_eq!(choose(4 * 128, 8 * 128, None), CoopTile::T128);
    assert_eq!(choose(4 * 128, 7 * 128, None), CoopTile::T64);
    assert_eq!(
        CoopTile::choose(nvidia, &caps, 2, 2 * 128, 8 * 128, None),
        CoopTile::T128,
        "the batch counts"
    );
    // Split K (single GEMMs on a small large-tile grid): SD 1.5's 8×8 and 16×16 projections
    // and feed-forwards split; the 64×64 level, batched GEMMs and a forced 64 tile do not.
    let split = |batch, m, n_tile_cols, k, forced| {
        let (tile, chunk) =
            coop::gemm_tile_and_split(nvidia, &caps, [batch, m, n_tile_cols, k], forced);
        (tile, chunk.map(|c| k.div_ceil(c)))
    };
    assert_eq!(split(1, 128, 1280, 1280, None), (CoopTile::T128, Some(5)));
    assert_eq!(split(1, 128, 1280, 5120, None), (CoopTile::T128, Some(20)));
    assert_eq!(split(1, 512, 1280, 5120, None), (CoopTile::T128, Some(7)));
    assert_eq!(
        split(1, 128, 2 * 5120, 1280, None),
        (CoopTile::T128, Some(4))
    );
    assert_eq!(split(1, 8192, 320, 320, None), (CoopTile::T128, None));
    assert_eq!(split(1, 8192, 320, 1280, None), (CoopTile::T128, None));
    assert_eq!(split(1, 154, 320, 768, None), (CoopTile::T128, Some(3)));
    assert_eq!(split(2, 128, 1280, 1280, None), (CoopTile::T64, None));
    assert_eq!(
        split(1, 128, 1280, 1280, Some(CoopTile::T64)),
        (CoopTile::T64, None)
    );
    assert_eq!(
        split(1, 128, 1280, 100, None),
        (CoopTile::T64, None),
        "K too short"
    );
    // Forcing, and the fallback where the adapter cannot hold the large tile.
    assert_eq!(choose(1, 1, Some(CoopTile::T128)), CoopTile::T128);
    assert_eq!(choose(4096, 4096, Some(CoopTile::T64)), CoopTile::T64);
    caps.max_workgroup_storage = 32 * 1024;
    let choose = |plan, forced| CoopTile::choose(plan, &caps, 1, 4096, 4096, forced);
    assert_eq!(choose(nvidia, Some(CoopTile::T128)), CoopTile::T64);
    assert_eq!(choose(lavapipe, Some(CoopTile::T128)), CoopTile::T128);
    caps.max_workgroup_storage = 48 * 1024;
    caps.max_invocations = 128;
    assert_eq!(
        CoopTile::choose(nvidia, &caps, 1, 4096, 4096, None),
        CoopTile::T64,
        "256 invocations do not fit"
    );
}

/// A fresh engine (so that its pipeline list shows only what ran here) with the tensor-core
/// matmul on, or None where it cannot run (then the FMA kernel is what the other tests cover)
/// or, with `large`, where the adapter cannot hold the large tile.
fn coop_engine(options: &GpuOptions, large: bool) -> Option<(Gpu, CoopPlan)> {
    let g = Gpu::new(options).expect("a wgpu adapter");
    let Some(plan) = coop::coop_plan(&g, DType::F16).filter(|p| p.matmul_staging_fits()) else {
        eprintln!(
            "tensor-core matmul not in use on {} (coop tiles not tested)",
            g.adapter
        );
        return None;
    };
    if large && !CoopTile::T128.fits(plan, &g.caps) {
        eprintln!("{} cannot hold the large coop tile: not tested", g.adapter);
        return None;
    }
    Some((g, plan))
}

/// The entry points that compiled on `g` from the coop matmul shader.
fn coop_entries(g: &Gpu, plan: CoopPlan) -> Vec<&'static str> {
    let shader = plan.shader(ldm_wgpu::shaders::ShaderId::MatmulCoop);
    g.compiled_pipelines()
        .into_iter()
        .filter(|&(s, _)| s == shader)
        .map(|(_, e)| e)
        .collect()
}

/// The awkward shapes every coop tile must pass, on `g` with its tile forced: M, N, K that are
/// multiples of neither 8·frag nor 2·frag, K = 4, more than one tile in each direction, every
/// epilogue, the in-place residual, GEGLU with and without bias, batched A·Bᵀ. Returns the
/// worst linear rel L2.
fn check_awkward_shapes(g: &Gpu, seed0: u64) -> f64 {
    let f16 = DType::F16;
    let mut worst = 0.0f64;
    let cases: &[(&[usize], usize, usize)] = &[
        (&[1], 1, 4),
        (&[1], 7, 12),
        (&[67], 129, 44),
        (&[3, 33], 5, 8),
        (&[2, 65], 70, 100),
        (&[13], 300, 4),
        (&[130], 131, 36),
        (&[259], 257, 68),
    ];
    let mut seed = seed0;
    for &(lead, n, k) in cases {
        for (i, &act) in ACTS.iter().enumerate() {
            seed += 1;
            let e = check_linear_on(g, f16, lead, n, k, i % 2 == 0, i / 2 == 1, act, seed, 1);
            worst = worst.max(e);
        }
    }
    check_residual_in_place(g, f16, 37, 45, 24, seed0 + 40);
    check_residual_in_place(g, f16, 130, 131, 36, seed0 + 41);
    let geglu: &[(&[usize], usize, usize)] = &[
        (&[1], 1, 4),
        (&[67], 129, 44),
        (&[2, 65], 33, 40),
        (&[130], 70, 12),
        (&[131], 200, 68),
    ];
    for &(lead, n, k) in geglu {
        for bias in [true, false] {
            seed += 1;
            check_geglu_on(g, f16, lead, n, k, bias, seed, 1);
        }
    }
    worst = worst.max(check_layer_norm_on_load(g, f16, seed0 + 60));
    for case in [
        (1, 1, 1, 4),
        (3, 7, 13, 8),
        (2, 67, 129, 44),
        (2, 77, 77, 40),
        (4, 130, 70, 64),
    ] {
        seed += 1;
        check_batched(g, f16, case, seed);
    }
    worst
}

/// The 64 tile forced on the awkward shapes (most SD linears run it by shape, and a
/// `LDM_COOP_TILE=128` run of this suite would otherwise not test it). On a fresh engine, whose
/// pipeline list then proves that only the 64 tile's entry points ran.
#[test]
fn coop_small_tile_awkward_shapes_all_epilogues() {
    let Some((g, plan)) = coop_engine(&GpuOptions::from_env().unwrap(), false) else {
        return;
    };
    let t = std::time::Instant::now();
    set_coop_tile(&g, Some(CoopTile::T64));
    let worst = check_awkward_shapes(&g, 710);
    set_coop_tile(&g, None);
    let mut ran = coop_entries(&g, plan);
    ran.sort();
    assert_eq!(
        ran,
        ["geglu_coop", "linear_coop"],
        "only the 64 tile may have run"
    );
    eprintln!(
        "64 coop tile, {plan:?}: awkward shapes pass, worst linear rel L2 {worst:.2e}, {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// The large tile forced on the awkward shapes of [`check_awkward_shapes`], and the shape
/// heuristic picking it by itself on a big shape. On a fresh engine, whose pipeline list then
/// proves that only the large entry points ran.
#[test]
fn coop_large_tile_awkward_shapes_all_epilogues() {
    let Some((g, plan)) = coop_engine(&GpuOptions::from_env().unwrap(), true) else {
        return;
    };
    let t = std::time::Instant::now();
    let f16 = DType::F16;
    // Chosen by shape: 2053 × 2050 is ≥ 256 large tiles at frag 16 (17 × 17) and at 8 (33 × 33).
    set_coop_tile(&g, None);
    let e = check_linear_on(
        &g,
        f16,
        &[2053],
        2050,
        4,
        true,
        true,
        Activation::Gelu,
        600,
        7,
    );
    eprintln!("large tile by shape 2053x2050x4: rel L2 {e:.2e}");
    assert_eq!(coop_entries(&g, plan), ["linear_coop_l"]);

    set_coop_tile(&g, Some(CoopTile::T128));
    let worst = check_awkward_shapes(&g, 610);
    set_coop_tile(&g, None);
    let mut ran = coop_entries(&g, plan);
    ran.sort();
    // (The longest-K LayerNorm cases split K on the large tile: then its reduces ran too.)
    ran.retain(|e| !e.ends_with("_split_reduce"));
    assert_eq!(
        ran,
        ["geglu_coop_l", "linear_coop_l"],
        "only the large tile may have run"
    );
    eprintln!(
        "large coop tile, {plan:?}: awkward shapes pass, worst linear rel L2 {worst:.2e}, {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// Split K on the large tile (chosen by shape: small grids with a long K), against f64 on
/// awkward shapes: K not a multiple of the split or of the K step, every epilogue, the in-place
/// residual, GEGLU with and without bias, LayerNorm on load (each split normalises with the
/// statistics of whole rows). On a fresh engine, whose pipeline list proves that the split
/// kernels and their reduces ran.
#[test]
fn coop_split_k_awkward_shapes_all_epilogues() {
    let Some((g, plan)) = coop_engine(&GpuOptions::from_env().unwrap(), true) else {
        return;
    };
    let t = std::time::Instant::now();
    let f16 = DType::F16;
    set_coop_tile(&g, None);
    // Each shape's split, as the engine picks it (at most 8 large tiles; K of 16 steps or more).
    let linear: &[(&[usize], usize, usize)] =
        &[(&[67], 129, 1000), (&[2, 33], 70, 644), (&[5], 7, 2052)];
    let mut seed = 800;
    let mut worst = 0.0f64;
    for &(lead, n, k) in linear {
        let m: usize = lead.iter().product();
        let (tile, chunk) = coop::gemm_tile_and_split(plan, &g.caps, [1, m, n, k], None);
        assert_eq!(tile, CoopTile::T128);
        assert!(
            chunk.is_some_and(|c| k.div_ceil(c) > 1),
            "{m}x{n}x{k} should split K"
        );
        for (i, &act) in ACTS.iter().enumerate() {
            seed += 1;
            let e = check_linear_on(&g, f16, lead, n, k, i % 2 == 0, i / 2 == 1, act, seed, 1);
            worst = worst.max(e);
        }
    }
    check_residual_in_place(&g, f16, 37, 45, 1000, 850);
    for &(lead, n, k) in &[(&[131][..], 70, 516), (&[3][..], 9, 1028)] {
        for bias in [true, false] {
            seed += 1;
            check_geglu_on(&g, f16, lead, n, k, bias, seed, 1);
        }
    }
    for (geglu, act) in [(None, Activation::Gelu), (Some(true), Activation::None)] {
        seed += 1;
        let e = check_linear_norm_on(&g, f16, &[67], 33, 1000, geglu, act, 3.0, seed, 1);
        worst = worst.max(e);
    }
    let mut ran = coop_entries(&g, plan);
    ran.sort();
    assert_eq!(
        ran,
        [
            "geglu_coop_l",
            "geglu_split_reduce",
            "linear_coop_l",
            "linear_split_reduce"
        ],
        "the split large tile and its reduces"
    );
    eprintln!(
        "split-K coop tile, {plan:?}: awkward shapes pass, worst linear rel L2 {worst:.2e}, {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// tests/shader_checks.rs for the large tile: the same bits with and without naga's bounds
/// checks (the shader is compiled unchecked by default, `shaders::indexing_proven`).
#[test]
fn coop_large_tile_same_bits_with_and_without_bounds_checks() {
    let open = |checks| {
        coop_engine(
            &GpuOptions {
                policy: ldm_wgpu::runtime::KernelPolicy {
                    shader_checks: checks,
                    ..ldm_wgpu::runtime::KernelPolicy::from_env().unwrap()
                },
                ..ldm_wgpu::GpuOptions::from_env().unwrap()
            },
            true,
        )
    };
    let (Some((checked, plan)), Some((unchecked, _))) = (open(true), open(false)) else {
        return;
    };
    assert!(checked.shader_checks_everywhere());
    assert!(!unchecked.shader_checks_everywhere());
    set_coop_tile(&checked, Some(CoopTile::T128));
    set_coop_tile(&unchecked, Some(CoopTile::T128));
    let mut rng = Rng::new(0x1a26e);
    let mut random = |shape: &[usize]| (rng.normals(shape.iter().product(), 1.0), shape.to_vec());
    // Bytes of `case`'s output on `g` from `inputs` uploaded as f16.
    let run =
        |g: &Gpu, inputs: &[(Vec<f32>, Vec<usize>)], case: &dyn Fn(&Gpu, &[Tensor]) -> Tensor| {
            let t: Vec<Tensor> = inputs
                .iter()
                .map(|(d, s)| g.upload(d, s, DType::F16).unwrap())
                .collect();
            g.download_bytes(&case(g, &t)).unwrap()
        };
    let same = |what: &str,
                inputs: &[(Vec<f32>, Vec<usize>)],
                case: &dyn Fn(&Gpu, &[Tensor]) -> Tensor| {
        let (a, b) = (run(&checked, inputs, case), run(&unchecked, inputs, case));
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(a.len(), b.len(), "{what}: output sizes differ");
        assert_eq!(
            differing,
            0,
            "{what}: {differing} of {} bytes differ",
            a.len()
        );
    };
    // The last shape splits K (linear, LayerNorm-on-load and GEGLU; batched does not).
    for &(m, n, k) in &[
        (37usize, 29usize, 20usize),
        (131, 67, 44),
        (67, 130, 4),
        (67, 130, 1000),
    ] {
        let lin = [
            random(&[m, k]),
            random(&[n, k]),
            random(&[n]),
            random(&[m, n]),
        ];
        same("linear gelu + bias + residual", &lin, &|g, t| {
            matmul::linear(g, &t[0], &t[1], Some(&t[2]), Some(&t[3]), Activation::Gelu).unwrap()
        });
        same("linear in-place residual", &lin, &|g, t| {
            matmul::linear_into(g, &t[0], &t[1], None, Some(&t[3]), Activation::Silu, &t[3])
                .unwrap();
            t[3].clone()
        });
        let ln = [
            random(&[m, k]),
            random(&[k]),
            random(&[k]),
            random(&[n, k]),
            random(&[m, n]),
        ];
        same("linear with LayerNorm on load", &ln, &|g, t| {
            let norm = RowLayerNorm {
                weight: &t[1],
                bias: &t[2],
                eps: 1e-5,
            };
            matmul::linear_norm(g, &t[0], norm, &t[3], None, Some(&t[4]), Activation::None).unwrap()
        });
        let geglu = [random(&[m, k]), random(&[2 * n, k]), random(&[2 * n])];
        same("linear_geglu", &geglu, &|g, t| {
            matmul::linear_geglu(g, &t[0], &t[1], Some(&t[2])).unwrap()
        });
        let bat = [random(&[3, m, k]), random(&[3, n, k])];
        same("batched_matmul_bt", &bat, &|g, t| {
            matmul::batched_matmul_bt(g, &t[0], &t[1]).unwrap()
        });
    }
    set_coop_tile(&checked, None);
    set_coop_tile(&unchecked, None);
    for g in [&checked, &unchecked] {
        let mut ran = coop_entries(g, plan);
        ran.sort();
        assert_eq!(
            ran,
            [
                "geglu_coop_l",
                "geglu_split_reduce",
                "linear_coop_l",
                "linear_split_reduce"
            ]
        );
    }
    eprintln!("large coop tile: same bits with and without bounds checks");
}
