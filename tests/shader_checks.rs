//! The shaders we compile without naga's runtime checks (`shaders::indexing_proven`) give the
//! same bits as with them, on awkward sizes and through a whole generation.
//!
//! Why this proves something: with the checks, an out-of-range workgroup/local-array index is
//! clamped to the last element and every loop is bounded; without them the same index reads
//! whatever lies there. A kernel whose correct output depended on the clamp would differ between
//! the two engines below. (The kernel tests themselves run unchecked, the default, on
//! NaN-poisoned outputs; these tests add the comparison.)

mod common;

use common::Rng;
use ldm_wgpu::kernels::matmul::Activation;
use ldm_wgpu::kernels::{attention, conv2d, coop, elementwise, matmul, norm};
use ldm_wgpu::pipeline::{default_model_dir, GenerateRequest, ModelOptions, StableDiffusion};
use ldm_wgpu::{DType, Gpu, GpuOptions, Tensor};

fn engines() -> (Gpu, Gpu) {
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
    assert!(checked.shader_checks_everywhere());
    assert!(!unchecked.shader_checks_everywhere());
    (checked, unchecked)
}

fn dtypes(gpu: &Gpu) -> Vec<DType> {
    if gpu.caps.shader_f16 {
        vec![DType::F32, DType::F16]
    } else {
        vec![DType::F32]
    }
}

/// Runs `case` on both engines with the same inputs and demands bit-identical outputs.
fn same_bits(
    what: &str,
    (checked, unchecked): (&Gpu, &Gpu),
    inputs: &[(Vec<f32>, Vec<usize>)],
    dtype: DType,
    case: impl Fn(&Gpu, &[Tensor]) -> Tensor,
) {
    let run = |gpu: &Gpu| {
        let tensors: Vec<Tensor> = inputs
            .iter()
            .map(|(data, shape)| gpu.upload(data, shape, dtype).unwrap())
            .collect();
        let out = case(gpu, &tensors);
        gpu.download_bytes(&out).unwrap()
    };
    let (a, b) = (run(checked), run(unchecked));
    assert_eq!(a.len(), b.len(), "{what} {dtype:?}: output sizes differ");
    let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(
        differing,
        0,
        "{what} {dtype:?}: {differing} of {} bytes differ with and without bounds checks",
        a.len()
    );
}

fn random(rng: &mut Rng, shape: &[usize]) -> (Vec<f32>, Vec<usize>) {
    (rng.normals(shape.iter().product(), 1.0), shape.to_vec())
}

#[test]
fn kernels_give_the_same_bits_with_and_without_bounds_checks() {
    let (checked, unchecked) = engines();
    let pair = (&checked, &unchecked);
    let mut rng = Rng::new(0x5eed_c4ec);
    for dtype in dtypes(&checked) {
        // matmul, scalar path (K % 4 != 0) and vec4 path, with every epilogue.
        for &(m, n, k) in &[(37usize, 29usize, 19usize), (131, 67, 44)] {
            let inputs = [
                random(&mut rng, &[m, k]),
                random(&mut rng, &[n, k]),
                random(&mut rng, &[n]),
                random(&mut rng, &[m, n]),
            ];
            same_bits("linear", pair, &inputs, dtype, |g, t| {
                matmul::linear(g, &t[0], &t[1], Some(&t[2]), Some(&t[3]), Activation::Gelu).unwrap()
            });
            let geglu = [
                random(&mut rng, &[m, k]),
                random(&mut rng, &[2 * n, k]),
                random(&mut rng, &[2 * n]),
            ];
            same_bits("linear_geglu", pair, &geglu, dtype, |g, t| {
                matmul::linear_geglu(g, &t[0], &t[1], Some(&t[2])).unwrap()
            });
        }
        // conv2d: 3×3 stride 1 and 2 (vec4 path), RGB input (scalar path), 1×1.
        for &(h, w, cin, cout, kern, stride) in &[
            (13usize, 11usize, 12usize, 21usize, 3usize, 1usize),
            (17, 9, 8, 70, 3, 2),
            (10, 7, 3, 5, 3, 1),
            (9, 5, 20, 33, 1, 1),
        ] {
            let pad = kern / 2;
            let inputs = [
                random(&mut rng, &[2, h, w, cin]),
                random(&mut rng, &[cout, kern, kern, cin]),
                random(&mut rng, &[cout]),
            ];
            same_bits("conv2d", pair, &inputs, dtype, |g, t| {
                conv2d::conv2d(g, &t[0], &t[1], Some(&t[2]), None, stride, [pad; 4]).unwrap()
            });
        }
        // group norm with fused SiLU (channels per group 3), layer norm on an odd width.
        let gn = [
            random(&mut rng, &[2, 7, 5, 24]),
            random(&mut rng, &[24]),
            random(&mut rng, &[24]),
        ];
        same_bits("group_norm", pair, &gn, dtype, |g, t| {
            norm::group_norm(g, &t[0], 8, 1e-5, &t[1], &t[2], true).unwrap()
        });
        let ln = [
            random(&mut rng, &[3, 11, 37]),
            random(&mut rng, &[37]),
            random(&mut rng, &[37]),
        ];
        same_bits("layer_norm", pair, &ln, dtype, |g, t| {
            norm::layer_norm(g, &t[0], &t[1], &t[2], 1e-5).unwrap()
        });
        // flash attention: cross-attention to 77 keys at head_dim 40, causal self-attention at
        // an odd head_dim.
        for &(nq, nk, heads, d, causal) in &[
            (70usize, 77usize, 2usize, 40usize, false),
            (33, 33, 3, 13, true),
        ] {
            let inputs = [
                random(&mut rng, &[2, nq, heads * d]),
                random(&mut rng, &[2, nk, heads * d]),
                random(&mut rng, &[2, nk, heads * d]),
            ];
            same_bits("attention", pair, &inputs, dtype, |g, t| {
                let view = attention::HeadsView::contiguous;
                attention::Sdpa {
                    q: view(&t[0]),
                    k: view(&t[1]),
                    v: view(&t[2]),
                    batch: 2,
                    heads,
                    head_dim: d,
                    causal,
                    scale: None,
                }
                .run(g)
                .unwrap()
            });
        }
        // glue: channel concat, nearest upsample, softmax over an odd width.
        let glue = [
            random(&mut rng, &[2, 5, 3, 7]),
            random(&mut rng, &[2, 5, 3, 6]),
        ];
        same_bits("concat+upsample", pair, &glue, dtype, |g, t| {
            let cat = elementwise::concat_channels(g, &t[0], &t[1]).unwrap();
            elementwise::upsample_nearest2x(g, &cat).unwrap()
        });
        let sm = [random(&mut rng, &[3, 5, 77])];
        same_bits("softmax", pair, &sm, dtype, |g, t| {
            elementwise::softmax_last_dim(g, &t[0]).unwrap()
        });
        // prompt emphasis over two 77-token chunks at an odd width.
        let em = [random(&mut rng, &[2, 77, 45])];
        let weights: Vec<f32> = (0..154).map(|r| 0.7 + (r % 5) as f32 * 0.2).collect();
        same_bits("emphasis", pair, &em, dtype, |g, t| {
            ldm_wgpu::kernels::emphasis::emphasis(g, &t[0], &weights).unwrap()
        });
    }
    // Where the tensor-core matmul is on (CI's cooperative-matrix lavapipe run), the f16 linear
    // cases above went through it: make sure, so that its proof is not vacuous.
    if let Some(plan) = coop::coop_plan(&unchecked, DType::F16) {
        let shader = plan.shader(ldm_wgpu::shaders::ShaderId::MatmulCoop);
        for gpu in [&checked, &unchecked] {
            assert!(
                gpu.compiled_pipelines().iter().any(|&(s, _)| s == shader),
                "{shader} did not run"
            );
        }
        eprintln!("compared with and without checks: {shader} too");
    }
}

#[test]
fn a_whole_generation_gives_the_same_bits_with_and_without_bounds_checks() {
    let (checked, unchecked) = engines();
    let dtype = if checked.caps.shader_f16 {
        DType::F16
    } else {
        DType::F32
    };
    let request = GenerateRequest {
        prompt: "a red square on a green background".into(),
        negative_prompt: "blurry".into(),
        width: 64,
        height: 48,
        steps: 3,
        guidance_scale: 7.5,
        seed: 7,
        sampler: Some("euler_a".parse().unwrap()),
        ..Default::default()
    };
    let generate = |gpu: Gpu| {
        let options = ModelOptions {
            dtype: Some(dtype),
            ..Default::default()
        };
        let sd = StableDiffusion::load(gpu, &default_model_dir(), &options)
            .expect("the shipped model loads");
        sd.generate(&request, &mut |_| true)
            .expect("generation runs")
    };
    let (a, b) = (generate(checked), generate(unchecked));
    assert!(
        a.latents.iter().all(|v| v.is_finite()),
        "non-finite latents"
    );
    assert_eq!(a.latents, b.latents, "final latents differ");
    assert_eq!(a.images[0].rgb, b.images[0].rgb, "images differ");
}
