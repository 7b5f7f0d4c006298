//! The shipped model (weights/tiny-shapes) through `ldm` equals diffusers'
//! StableDiffusionPipeline on it: same prompt, seed, sampler, steps and guidance give the same
//! image (PSNR ≥ 40 dB in f32, the acceptance bound of the tiny-model issue) and the same final
//! latents. Fixtures: tools/reference_image.py → tests/fixtures/pipeline/.

mod common;

use std::path::{Path, PathBuf};

use ldm_wgpu::image::Image;
use ldm_wgpu::pipeline::{default_model_dir, GenerateRequest, ModelOptions, StableDiffusion};
use ldm_wgpu::weights::SafetensorsFile;
use ldm_wgpu::{DType, Gpu, GpuOptions};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline")
}

fn psnr(a: &Image, b: &Image) -> f64 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let mse: f64 = a
        .rgb
        .iter()
        .zip(&b.rgb)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.rgb.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// NCHW [1, C, h, w] from the fixture -> NHWC, as `Generated::latents` holds them.
fn nchw_to_nhwc(x: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for ci in 0..c {
        for y in 0..h {
            for xi in 0..w {
                out[(y * w + xi) * c + ci] = x[(ci * h + y) * w + xi];
            }
        }
    }
    out
}

#[test]
fn shipped_model_matches_diffusers() {
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
    let options = ModelOptions {
        dtype: Some(DType::F32),
        vae_f32: Some(true),
        ..Default::default()
    };
    let sd = StableDiffusion::load(gpu, &default_model_dir(), &options)
        .expect("the shipped model loads");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no fixtures in tests/fixtures/pipeline");
    for case in cases {
        let meta: Value = serde_json::from_slice(&std::fs::read(&case).unwrap()).unwrap();
        let req = GenerateRequest {
            prompt: meta["prompt"].as_str().unwrap().into(),
            negative_prompt: meta["negative_prompt"].as_str().unwrap_or("").into(),
            width: meta["width"].as_u64().unwrap() as usize,
            height: meta["height"].as_u64().unwrap() as usize,
            steps: meta["steps"].as_u64().unwrap() as usize,
            guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
            seed: meta["seed"].as_u64().unwrap(),
            sampler: Some(meta["sampler"].as_str().unwrap().parse().unwrap()),
            ..Default::default()
        };
        let out = sd.generate(&req, &mut |_| true).unwrap();
        let want = Image::load_png(&case.with_extension("png")).unwrap();
        let p = psnr(&out.images[0], &want);

        let tensors = SafetensorsFile::open(case.with_extension("safetensors")).unwrap();
        let latents = tensors.tensor("latents").unwrap();
        let (c, h, w) = (latents.shape[1], latents.shape[2], latents.shape[3]);
        let want_latents = nchw_to_nhwc(&latents.to_f32_vec(), c, h, w);
        let want64: Vec<f64> = want_latents.iter().map(|&v| v as f64).collect();
        let err = common::rel_l2(&out.latents, &want64);
        let name = case.file_stem().unwrap().to_string_lossy().to_string();
        eprintln!("{name}: PSNR {p:.1} dB, final latents rel-L2 {err:.2e}");
        assert!(
            p >= 40.0,
            "{name}: PSNR {p:.1} dB < 40 dB against diffusers"
        );
        // Latents: f32 kernels vs torch differ only in summation order (~1e-6 per op), so 20
        // steps stay far below 1e-3.
        assert!(
            err <= 1e-3,
            "{name}: final latents differ from diffusers by {err:.2e}"
        );
    }
}

#[test]
fn shipped_model_loads_with_every_tensor_used() {
    let w = ldm_wgpu::weights::open_model(default_model_dir(), &Default::default()).unwrap();
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).unwrap();
    use ldm_wgpu::models::{clip, unet, vae};
    let c = clip::ClipConfig::from_json(&w.text_encoder.as_ref().unwrap().config).unwrap();
    clip::ClipTextModel::load(
        &gpu,
        &w.text_encoder.as_ref().unwrap().weights.root(),
        c,
        DType::F32,
    )
    .unwrap();
    w.text_encoder
        .as_ref()
        .unwrap()
        .weights
        .check_all_used()
        .unwrap();
    let u = unet::UNetConfig::from_json(&w.unet.config).unwrap();
    unet::UNet2DConditionModel::load(&gpu, &w.unet.weights.root(), u, DType::F32).unwrap();
    w.unet.weights.check_all_used().unwrap();
    let v = vae::VaeConfig::from_json(&w.vae.config).unwrap();
    vae::AutoencoderKL::load(&gpu, &w.vae.weights.root(), v, DType::F32, true).unwrap();
    w.vae.weights.check_all_used().unwrap();
    // The model card's size promise: the whole folder stays within 40 MB.
    let mut total = 0u64;
    let mut stack = vec![default_model_dir()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                total += e.metadata().unwrap().len();
            }
        }
    }
    assert!(
        total <= 40 * 1000 * 1000,
        "weights/tiny-shapes is {total} bytes"
    );
}

/// The checks that need no model reject bad requests before anything loads: sizes, counts,
/// ranges and non-finite numbers (a NaN guidance scale once switched guidance off silently).
#[test]
fn requests_are_checked_without_a_model() {
    let ok = GenerateRequest {
        width: 64,
        height: 48,
        ..Default::default()
    };
    assert!(ok.validate().is_ok());
    let bad = [
        (
            "width 100",
            GenerateRequest {
                width: 100,
                ..ok.clone()
            },
        ),
        (
            "height 0",
            GenerateRequest {
                height: 0,
                ..ok.clone()
            },
        ),
        (
            "0 steps",
            GenerateRequest {
                steps: 0,
                ..ok.clone()
            },
        ),
        (
            "batch 0",
            GenerateRequest {
                batch_size: 0,
                ..ok.clone()
            },
        ),
        (
            "strength 1.5",
            GenerateRequest {
                strength: 1.5,
                ..ok.clone()
            },
        ),
        (
            "strength NaN",
            GenerateRequest {
                strength: f64::NAN,
                ..ok.clone()
            },
        ),
        (
            "guidance NaN",
            GenerateRequest {
                guidance_scale: f64::NAN,
                ..ok.clone()
            },
        ),
        (
            "guidance inf",
            GenerateRequest {
                guidance_scale: f64::INFINITY,
                ..ok.clone()
            },
        ),
        (
            "eta NaN",
            GenerateRequest {
                eta: Some(f64::NAN),
                ..ok.clone()
            },
        ),
        (
            "eta -1",
            GenerateRequest {
                eta: Some(-1.0),
                ..ok.clone()
            },
        ),
    ];
    for (what, req) in bad {
        let err = req.validate().expect_err(what);
        assert!(
            matches!(err, ldm_wgpu::Error::InvalidInput(_)),
            "{what}: {err}"
        );
    }
}
