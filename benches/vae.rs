//! VAE decode against TAESD decode (`cargo bench --bench vae -- --model DIR --taesd DIR
//! [--size N] [--dtype f16|f32] [--runs N]`): the wall time of one decode of random latents at
//! N×N pixels, ended by a GPU wait, median of `--runs` after one untimed warm-up (shader
//! compilation), for the model's AutoencoderKL decoder (as the pipeline runs it: tiled when the
//! activations would not fit) and for the tiny autoencoder, and their ratio.
//!
//! For SD 1.5's VAE without downloading it: `tools/make_random_sd.py --arch sd15` writes a
//! random-weight folder with the real configuration; `tests/fixtures/taesd/real` is the real
//! TAESD architecture with random weights (the time does not depend on the values).

use std::path::PathBuf;
use std::time::Instant;

use ldm_wgpu::models::taesd::AutoencoderTiny;
use ldm_wgpu::models::vae::{AutoencoderKL, VaeConfig, VaeTiling};
use ldm_wgpu::weights::{open_model, LoadOptions};
use ldm_wgpu::{DType, Gpu, GpuOptions, Result, Tensor};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let model = get("--model")
        .map(PathBuf::from)
        .unwrap_or_else(ldm_wgpu::pipeline::default_model_dir);
    let taesd = get("--taesd")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tests/fixtures/taesd/real"));
    let size: usize = get("--size").and_then(|v| v.parse().ok()).unwrap_or(512);
    let runs: usize = get("--runs").and_then(|v| v.parse().ok()).unwrap_or(3);
    let gpu = Gpu::new(&GpuOptions::from_env()?)?;
    let dtype: DType = match get("--dtype") {
        Some(d) => d.parse().expect("f16 or f32"),
        None => gpu.compute_dtype(),
    };

    let w = open_model(&model, &LoadOptions::default())?;
    let cfg = VaeConfig::from_json(&w.vae.config)?;
    let vae_dtype = if dtype == DType::F16 && cfg.force_upcast {
        DType::F32
    } else {
        dtype
    };
    let f = cfg.downscale();
    let latent_channels = cfg.latent_channels;
    let vae = AutoencoderKL::load(&gpu, &w.vae.weights.root(), cfg, vae_dtype, false)?;
    let tiny = AutoencoderTiny::open(&gpu, &taesd, dtype)?;

    let side = size / f;
    let n = side * side * latent_channels;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let shape = [1, side, side, latent_channels];
    let time = |decode: &dyn Fn(&Tensor) -> Result<Tensor>, z: &Tensor| -> Result<f64> {
        decode(z)?;
        gpu.wait()?;
        let mut times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let out = decode(z)?;
            gpu.wait()?;
            times.push(t.elapsed().as_secs_f64());
            drop(out);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let z_vae = gpu.upload(&values, &shape, vae_dtype)?;
    let tiled = vae.plan_decode(&gpu, &shape, VaeTiling::Auto)?.is_some();
    let full = time(&|z| vae.decode_with(&gpu, z, VaeTiling::Auto), &z_vae)?;
    let z_tiny = gpu.upload(&values, &shape, dtype)?;
    let small = time(&|z| tiny.decode(&gpu, z), &z_tiny)?;
    println!("device: {} ({})", gpu.adapter.name, gpu.adapter.driver);
    println!(
        "{size}x{size}: VAE decode {full:.3} s ({}{}), TAESD decode {small:.3} s ({}), \
         ratio TAESD/VAE {:.4} ({:.0}x faster); median of {runs}",
        vae_dtype.name(),
        if tiled { ", tiled" } else { "" },
        dtype.name(),
        small / full,
        full / small
    );
    Ok(())
}
