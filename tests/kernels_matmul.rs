//! `shaders/matmul.wgsl` against its f64 reference: linear (every activation, with and without
//! bias and residual, in-place residual), fused GEGLU, batched A·Bᵀ; awkward sizes that hit every
//! edge of the 64 × 64 and 128 × 128 tiles and both the vec4 and scalar load paths; and SD 1.5 /
//! CLIP shapes.
//!
//! Tolerances: f32 1e-5 relative L2 — inputs are O(1) and weights scaled by 1/√K, so f32
//! accumulation error grows like √K·2⁻²⁴ ≈ 4e-6 even at K = 5120 in the worst case (the random
//! walk is far smaller). f16 2e-3 — the reference starts from the same f16-rounded inputs, so the
//! error is the output's rounding to 11 bits (≈ 3e-4 relative L2) plus f32 accumulation.

mod common;

use common::{assert_close, dtypes, gpu, rel_l2, tol, upload, Rng};
use ldm_wgpu::kernels::fill::poisoned;
use ldm_wgpu::kernels::matmul::{self, Activation};
use ldm_wgpu::DType;

const ACTS: [Activation; 4] = [
    Activation::None,
    Activation::Gelu,
    Activation::Silu,
    Activation::QuickGelu,
];

fn tol_for(dtype: DType) -> f64 {
    tol(dtype, 1e-5, 2e-3)
}

/// Run `linear_into` on random data and compare rows `rows` (all when None) with the reference.
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
    let g = gpu();
    let m: usize = lead.iter().product();
    let mut rng = Rng::new(seed);
    let mut x_shape = lead.to_vec();
    x_shape.push(k);
    let mut y_shape = lead.to_vec();
    y_shape.push(n);
    let (x, xq) = upload(&rng.normals(m * k, 1.0), &x_shape, dtype);
    let (w, wq) = upload(&rng.normals(n * k, 1.0 / (k as f64).sqrt()), &[n, k], dtype);
    let (b, bq) = upload(&rng.normals(n, 0.5), &[n], dtype);
    let (r, rq) = upload(&rng.normals(m * n, 1.0), &y_shape, dtype);
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
        bias.then_some(&bq[..]),
        residual.then_some(&rs[..]),
        act,
        rows.len(),
        n,
        k,
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

/// `x = x + linear(x')`: the residual is the output tensor itself.
#[test]
fn linear_residual_in_place() {
    let g = gpu();
    for &dtype in &dtypes() {
        let (m, n, k) = (37, 45, 24);
        let mut rng = Rng::new(7);
        let (x, xq) = upload(&rng.normals(m * k, 1.0), &[m, k], dtype);
        let (w, wq) = upload(&rng.normals(n * k, 0.2), &[n, k], dtype);
        let (b, bq) = upload(&rng.normals(n, 0.5), &[n], dtype);
        let (y, yq) = upload(&rng.normals(m * n, 1.0), &[m, n], dtype);
        matmul::linear_into(g, &x, &w, Some(&b), Some(&y), Activation::Silu, &y).unwrap();
        let want =
            matmul::reference_linear(&xq, &wq, Some(&bq), Some(&yq), Activation::Silu, m, n, k);
        assert_close(
            &format!("in-place residual {dtype:?}"),
            &g.download(&y).unwrap(),
            &want,
            tol_for(dtype),
        );
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
    let g = gpu();
    let m: usize = lead.iter().product();
    let mut rng = Rng::new(seed);
    let mut x_shape = lead.to_vec();
    x_shape.push(k);
    let mut y_shape = lead.to_vec();
    y_shape.push(n);
    let (x, xq) = upload(&rng.normals(m * k, 1.0), &x_shape, dtype);
    let (w, wq) = upload(
        &rng.normals(2 * n * k, 1.0 / (k as f64).sqrt()),
        &[2 * n, k],
        dtype,
    );
    let (b, bq) = upload(&rng.normals(2 * n, 0.5), &[2 * n], dtype);
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

#[test]
fn batched_matmul_bt_awkward_shapes() {
    let g = gpu();
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
        for (b, m, n, k) in cases {
            seed += 1;
            let mut rng = Rng::new(seed);
            let (a, aq) = upload(&rng.normals(b * m * k, 1.0), &[b, m, k], dtype);
            let (bt, btq) = upload(
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

/// Every f16 case above runs on the tensor-core kernel (`shaders/matmul_coop.wgsl`) when the
/// adapter offers f16 cooperative matrices and the path is on (by default on GPUs; CI forces it
/// with `LDM_COOP_MATMUL=1` on a lavapipe that offers 8×8 fragments). This checks that it really
/// was that kernel, so the suite cannot pass on the FMA kernel while claiming the coop path.
#[test]
fn tensor_core_path_runs_where_offered() {
    let g = gpu();
    let forced = std::env::var("LDM_COOP_MATMUL").is_ok_and(|v| v == "1");
    let plan = matmul::coop_plan(g, DType::F16);
    if forced && g.caps.shader_f16 && g.caps.coop_f16_frag.is_some() {
        assert!(
            plan.is_some(),
            "LDM_COOP_MATMUL=1 and the adapter offers {:?}, but the path is off: {:?}",
            g.caps.coop_f16_frag,
            g.caps
        );
    }
    let Some(plan) = plan else {
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
    let shader = format!("matmul_coop{}", plan.frag);
    for entry in ["linear_coop", "geglu_coop"] {
        assert!(
            ran.iter().any(|&(s, e)| s == shader && e == entry),
            "{shader}/{entry} never compiled; pipelines: {ran:?}"
        );
    }
    eprintln!("tensor-core matmul ran: {shader} with {plan:?}");
}
