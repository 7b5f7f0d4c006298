//! The fused sampler update against its f64 reference: guided and unguided, 0-5 slots, with and
//! without the second output, vec4 and scalar paths, SD latents, NaN-poisoned outputs. Then the
//! VAE posterior sample (img2img initial latents) against its reference, the same way; `lincomb`;
//! and the GPU interpreter of sampler plans (`sched::execute_on_gpu`) against its CPU spec.

mod common;

use common::*;
use ldm_wgpu::kernels::fill;
use ldm_wgpu::kernels::sampler_step::{self as step, StepCoefs};
use ldm_wgpu::{DType, Tensor};

// f32: a handful of FMAs per value (~1e-7). f16: one output rounding (~3e-4 rms) — the inputs are
// f16 on both sides.
const F32_TOL: f64 = 1e-6;
const F16_TOL: f64 = 1e-3;

fn run_case(shape: &[usize], guidance: Option<f32>, present: [bool; 5], with_b: bool, seed: u64) {
    let gpu = gpu();
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(seed);
    for dtype in dtypes() {
        let mut model_shape = shape.to_vec();
        if guidance.is_some() {
            model_shape[0] *= 2;
        }
        let (model, mq) = upload(
            &rng.normals(model_shape.iter().product(), 1.0),
            &model_shape,
            dtype,
        );
        let slots_data: Vec<Option<(Tensor, Vec<f32>)>> = present
            .iter()
            .map(|&p| p.then(|| upload(&rng.normals(n, 1.0), shape, dtype)))
            .collect();
        let mut coefs = StepCoefs::default();
        for (k, _) in present.iter().enumerate().filter(|(_, &p)| p) {
            coefs.a[k] = rng.normal() as f32;
            coefs.b[k] = if with_b { rng.normal() as f32 } else { 0.0 };
        }
        coefs.a_model = rng.normal() as f32;
        coefs.b_model = if with_b { rng.normal() as f32 } else { 0.0 };

        let out_a = fill::poisoned(gpu, shape, dtype).unwrap();
        let out_b = fill::poisoned(gpu, shape, dtype).unwrap();
        let slots: [Option<&Tensor>; 5] =
            std::array::from_fn(|k| slots_data[k].as_ref().map(|s| &s.0));
        step::sampler_step(
            gpu,
            &model,
            guidance,
            slots,
            &coefs,
            &out_a,
            with_b.then_some(&out_b),
        )
        .unwrap();

        let host: [Option<&[f32]>; 5] =
            std::array::from_fn(|k| slots_data[k].as_ref().map(|s| s.1.as_slice()));
        let (want_a, want_b) = step::reference(&mq, guidance, host, &coefs);
        let what = format!(
            "{shape:?} guidance={guidance:?} slots={present:?} {}",
            dtype.name()
        );
        let tol = tol(dtype, F32_TOL, F16_TOL);
        let check =
            |name: &str, got: &[f32], want: &[f64], model_coef: f32, slot_coef: &[f32; 5]| {
                // Relative to the size of the terms, not of their sum: a few random terms can cancel
                // (one element here), and f32 rounding is relative to the terms.
                let g = guidance.unwrap_or(0.0) as f64;
                let bound: Vec<f64> = (0..n)
                    .map(|i| {
                        let eps = match guidance {
                            Some(_) => {
                                (1.0 - g).abs() * (mq[i] as f64).abs()
                                    + g.abs() * (mq[n + i] as f64).abs()
                            }
                            None => (mq[i] as f64).abs(),
                        };
                        let slots: f64 = (0..5)
                            .filter_map(|k| {
                                slots_data[k]
                                    .as_ref()
                                    .map(|s| (slot_coef[k] as f64 * s.1[i] as f64).abs())
                            })
                            .sum();
                        model_coef.abs() as f64 * eps + slots
                    })
                    .collect();
                let err = got
                    .iter()
                    .zip(want)
                    .map(|(&g, &w)| (g as f64 - w).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let scale = bound.iter().map(|w| w * w).sum::<f64>().sqrt();
                // NaN never passes (NaN <= tol is false, and inf is caught by the finite check).
                let e = if got.iter().all(|v| v.is_finite()) {
                    err / scale.max(f64::MIN_POSITIVE)
                } else {
                    f64::INFINITY
                };
                assert!(
                    e <= tol,
                    "{name} {what}: error {e:.3e} relative to the terms > {tol:.1e}"
                );
            };
        check(
            "out_a",
            &gpu.download(&out_a).unwrap(),
            &want_a,
            coefs.a_model,
            &coefs.a,
        );
        if with_b {
            check(
                "out_b",
                &gpu.download(&out_b).unwrap(),
                &want_b,
                coefs.b_model,
                &coefs.b,
            );
        } else {
            // out_b was not passed: still all NaN (nothing wrote it).
            assert!(gpu.download(&out_b).unwrap().iter().all(|v| v.is_nan()));
        }
    }
}

#[test]
fn awkward_sizes_and_slot_sets() {
    let slot_sets = [
        [false; 5],
        [true, false, false, false, false],
        [false, true, false, true, false],
        [true; 5],
        [false, false, false, false, true],
    ];
    // 1 element, odd (scalar path, guided cond half not vector aligned), 4 | n (vec4 path).
    let shapes: &[&[usize]] = &[&[1], &[1, 3, 5, 7], &[2, 4, 3, 3], &[3, 1, 1, 1]];
    let mut seed = 0;
    for shape in shapes {
        for guidance in [None, Some(7.5)] {
            for set in slot_sets {
                for with_b in [false, true] {
                    seed += 1;
                    run_case(shape, guidance, set, with_b, seed);
                }
            }
        }
    }
}

#[test]
fn sd15_latents() {
    // 512×512: latents [1, 4, 64, 64] (NCHW as the scheduler keeps them), CFG model output batch 2;
    // and batch 2 with a full set of slots (DPM++ 2M / LMS history).
    run_case(
        &[1, 4, 64, 64],
        Some(7.5),
        [true, false, false, false, false],
        true,
        100,
    );
    run_case(&[2, 4, 64, 64], Some(7.5), [true; 5], true, 101);
    run_case(
        &[1, 4, 64, 64],
        None,
        [true, true, false, false, false],
        false,
        102,
    );
}

#[test]
fn aliasing_and_shape_errors() {
    let gpu = gpu();
    let lat = gpu.empty(&[1, 4, 8, 8], DType::F32).unwrap();
    let model = gpu.empty(&[2, 4, 8, 8], DType::F32).unwrap();
    let other = gpu.empty(&[1, 4, 8, 8], DType::F32).unwrap();
    let coefs = StepCoefs {
        a: [1.0, 0.0, 0.0, 0.0, 0.0],
        a_model: 0.5,
        ..Default::default()
    };
    // In-place update of a slot: refused with a message telling the caller to ping-pong.
    let err = step::sampler_step(
        gpu,
        &model,
        Some(7.5),
        [Some(&lat), None, None, None, None],
        &coefs,
        &lat,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ping-pong"), "{err}");
    // out_b aliasing out_a or a slot.
    assert!(step::sampler_step(
        gpu,
        &model,
        Some(7.5),
        [Some(&lat), None, None, None, None],
        &coefs,
        &other,
        Some(&other)
    )
    .is_err());
    assert!(step::sampler_step(
        gpu,
        &model,
        Some(7.5),
        [Some(&lat), None, None, None, None],
        &coefs,
        &other,
        Some(&lat)
    )
    .is_err());
    // A None slot with a coefficient.
    assert!(step::sampler_step(gpu, &model, Some(7.5), [None; 5], &coefs, &other, None).is_err());
    // Unguided call with a doubled model output.
    assert!(step::sampler_step(
        gpu,
        &model,
        None,
        [Some(&lat), None, None, None, None],
        &coefs,
        &other,
        None
    )
    .is_err());
    // The ping-pong the doc asks for works.
    step::sampler_step(
        gpu,
        &model,
        Some(7.5),
        [Some(&lat), None, None, None, None],
        &coefs,
        &other,
        None,
    )
    .unwrap();
    gpu.flush().unwrap();
}

// The posterior sample reads its moments exactly (f16 moments are quantised on both sides) and does
// a clamp, one exp and two FMAs in f32 into an f32 output, whatever the moments' dtype: a few ulps
// (measured ≤ 2.4e-7 on both, the worst a single value), so both dtypes are held to 1e-6.
const POSTERIOR_TOL: f64 = 1e-6;

/// moments [bm, h, w, 2l] with means ~ offset + N(0, 1) and log-variances from `logvar`, eps
/// [b, h, w, l]; checks `posterior_sample` against the reference for every dtype.
#[allow(clippy::too_many_arguments)]
fn run_posterior(
    bm: usize,
    b: usize,
    h: usize,
    w: usize,
    l: usize,
    mean_offset: f64,
    logvar: impl Fn(&mut Rng) -> f64,
    seed: u64,
) {
    let gpu = gpu();
    let mut rng = Rng::new(seed);
    // SD 1.x's scaling factor and a non-zero shift, so both parameters are exercised.
    let (scale, shift) = (0.18215f32, 0.0609f32);
    for dtype in dtypes() {
        let mut moments = Vec::with_capacity(bm * h * w * 2 * l);
        for _ in 0..bm * h * w {
            for _ in 0..l {
                moments.push((mean_offset + rng.normal()) as f32);
            }
            for _ in 0..l {
                moments.push(logvar(&mut rng) as f32);
            }
        }
        let (mt, mq) = upload(&moments, &[bm, h, w, 2 * l], dtype);
        let eps = rng.normals(b * h * w * l, 1.0);
        let et = gpu.upload(&eps, &[b, h, w, l], DType::F32).unwrap();
        let out = fill::poisoned(gpu, &[b, h, w, l], DType::F32).unwrap();
        step::posterior_sample(gpu, &mt, &et, scale, shift, &out).unwrap();
        let got = gpu.download(&out).unwrap();
        let want = step::reference_posterior_sample(&mq, &eps, l, scale, shift);
        let what = format!(
            "posterior_sample moments [{bm}, {h}, {w}, {}] -> batch {b} {}",
            2 * l,
            dtype.name()
        );
        eprintln!("{what}: rel L2 {:.2e}", rel_l2(&got, &want));
        assert_close(&what, &got, &want, POSTERIOR_TOL);
    }
}

#[test]
fn posterior_sample_awkward_sizes() {
    // (Bm, B, h, w, L): single values, one latent channel, odd spatial sizes, batch repetition of
    // one image (Bm = 1 < B), one image per batch item (Bm = B), and k-fold repetition (2 -> 6).
    let cases = [
        (1, 1, 1, 1, 1),
        (1, 3, 5, 7, 3),
        (3, 3, 7, 11, 1),
        (2, 6, 3, 1, 4),
        (1, 2, 13, 9, 4),
        (1, 1, 17, 3, 16),
    ];
    for (i, &(bm, b, h, w, l)) in cases.iter().enumerate() {
        // log-variances of a real encoder sit around -10..0; a few beyond -30 exercise the clamp.
        run_posterior(
            bm,
            b,
            h,
            w,
            l,
            0.0,
            |r| {
                if r.uniform() < 0.1 {
                    -35.0 - 5.0 * r.uniform()
                } else {
                    -4.0 + 3.0 * r.normal()
                }
            },
            300 + i as u64,
        );
    }
}

#[test]
fn posterior_sample_clamps_logvar() {
    // With zero means the output is the std term alone, so a missing clamp at either end changes
    // every value: below -30 the std is exp(-15), above 20 it is exp(10).
    run_posterior(1, 2, 5, 3, 4, 0.0, |r| -31.0 - 20.0 * r.uniform(), 310);
    run_posterior(1, 2, 5, 3, 4, 0.0, |r| 20.5 + 10.0 * r.uniform(), 311);
    // And a large mean with a tiny std: the mean must survive unchanged.
    run_posterior(2, 2, 3, 7, 4, 30.0, |r| -12.0 + r.normal(), 312);
}

#[test]
fn posterior_sample_sd15_latents() {
    // 512×512: moments [1, 64, 64, 8]; batch 2 from one image (diffusers' one generator) and
    // from two (one generator per image).
    run_posterior(1, 2, 64, 64, 4, 0.0, |r| -6.0 + 2.0 * r.normal(), 320);
    run_posterior(2, 2, 64, 64, 4, 0.0, |r| -6.0 + 2.0 * r.normal(), 321);
}

#[test]
fn posterior_sample_shape_errors() {
    let gpu = gpu();
    let moments = gpu.empty(&[1, 4, 4, 8], DType::F32).unwrap();
    let eps = gpu.empty(&[2, 4, 4, 4], DType::F32).unwrap();
    let out = gpu.empty(&[2, 4, 4, 4], DType::F32).unwrap();
    let run =
        |m: &Tensor, e: &Tensor, o: &Tensor| step::posterior_sample(gpu, m, e, 0.18215, 0.0, o);
    run(&moments, &eps, &out).unwrap();
    let odd = gpu.empty(&[1, 4, 4, 7], DType::F32).unwrap();
    assert!(run(&odd, &eps, &out).is_err(), "odd moment channels");
    let wrong_l = gpu.empty(&[2, 4, 4, 3], DType::F32).unwrap();
    assert!(
        run(&moments, &wrong_l, &wrong_l).is_err(),
        "eps with the wrong channel count"
    );
    let m2 = gpu.empty(&[2, 4, 4, 8], DType::F32).unwrap();
    let e3 = gpu.empty(&[3, 4, 4, 4], DType::F32).unwrap();
    let o3 = gpu.empty(&[3, 4, 4, 4], DType::F32).unwrap();
    assert!(run(&m2, &e3, &o3).is_err(), "batch 3 from 2 moments");
    let wrong_hw = gpu.empty(&[2, 4, 5, 4], DType::F32).unwrap();
    assert!(
        run(&moments, &wrong_hw, &out).is_err(),
        "eps of another size"
    );
    assert!(run(&moments, &eps, &eps).is_err(), "out aliasing eps");
    if dtypes().contains(&DType::F16) {
        let eps16 = gpu.empty(&[2, 4, 4, 4], DType::F16).unwrap();
        assert!(run(&moments, &eps16, &out).is_err(), "f16 noise");
    }
    gpu.flush().unwrap();
}

/// `lincomb` is the step kernel with no model term: `out = sum_k c_k * t_k`.
#[test]
fn lincomb_against_reference() {
    let gpu = gpu();
    let shape = [2, 5, 7, 4];
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(11);
    let (model, _) = upload(&rng.normals(n, 1.0), &shape, DType::F32);
    let data: Vec<(f32, (Tensor, Vec<f32>))> = (0..3)
        .map(|_| {
            let c = rng.normal() as f32;
            (c, upload(&rng.normals(n, 1.0), &shape, DType::F32))
        })
        .collect();
    let terms: Vec<(f32, &Tensor)> = data.iter().map(|(c, (t, _))| (*c, t)).collect();
    let out = fill::poisoned(gpu, &shape, DType::F32).unwrap();
    step::lincomb(gpu, &model, &terms, &out).unwrap();
    let want: Vec<f64> = (0..n)
        .map(|i| data.iter().map(|(c, (_, h))| *c as f64 * h[i] as f64).sum())
        .collect();
    assert_close("lincomb", &gpu.download(&out).unwrap(), &want, F32_TOL);
    let six = [terms[0]; 6];
    assert!(step::lincomb(gpu, &model, &six, &out).is_err());
}

/// `sched::execute_on_gpu` does what its specification `sched::execute_on_cpu` says, for every
/// sampler's plans over a whole (guided) loop, fresh noise included.
#[test]
fn execute_on_gpu_follows_execute_on_cpu() {
    use ldm_wgpu::sched::{
        build_sampler, execute_on_cpu, execute_on_gpu, Buf, CpuBuffers, GpuBuffers, SamplerKind,
        SchedulerConfig,
    };
    let gpu = gpu();
    let shape = [2, 4, 6, 4];
    let n: usize = shape.iter().product();
    let config = SchedulerConfig::sd15();
    for name in SamplerKind::ALL {
        let mut rng = Rng::new(5);
        let mut sampler = build_sampler(&config, Some(name), 5).unwrap();
        let sigma = sampler.init_noise_sigma();
        let init: Vec<f32> = rng.normals(n, sigma);
        let mut cpu = CpuBuffers::new(init.clone());
        let mut gpu_bufs = GpuBuffers::new(gpu.upload(&init, &shape, DType::F32).unwrap());
        for call in 0..sampler.timesteps().len() {
            let plan = sampler.step(call);
            if plan.needs_noise {
                let noise = rng.normals(n, 1.0);
                gpu_bufs.set(Buf::Noise, gpu.upload(&noise, &shape, DType::F32).unwrap());
                cpu.set(Buf::Noise, noise);
            }
            let model_out = rng.normals(2 * n, 1.0); // [uncond; cond]
            let mut model_shape = shape;
            model_shape[0] *= 2;
            let model = gpu.upload(&model_out, &model_shape, DType::F32).unwrap();
            execute_on_gpu(gpu, &plan, &model, Some(7.5), &mut gpu_bufs).unwrap();
            execute_on_cpu(&plan, &model_out, Some(7.5), &mut cpu).unwrap();
            let want: Vec<f64> = cpu.latents().iter().map(|&v| v as f64).collect();
            let got = gpu.download(gpu_bufs.latents()).unwrap();
            // f32 on the GPU against f64 accumulation, over a few steps of a loop.
            assert_close(&format!("{name} call {call}"), &got, &want, 1e-5);
        }
    }
}
