//! The fused sampler update against its f64 reference: guided and unguided, 0-5 slots, with and
//! without the second output, vec4 and scalar paths, SD latents, NaN-poisoned outputs.

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
