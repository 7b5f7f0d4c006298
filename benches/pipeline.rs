//! End-to-end benchmark (`cargo bench --bench pipeline -- [--model DIR] [--size N] [--steps N]
//! [--sampler NAME] [--dtype f16|f32]`): cold and warm start, seconds per image, U-Net it/s,
//! text-encode and VAE-decode time, peak GPU memory held by the buffer pool (steady state with
//! profiling off), then one profiled image: every kernel by GPU time with GFLOP/s and GB/s.
//!
//! Default model: the shipped weights/tiny-shapes. For the SD 1.5 / 2.1 architectures, make a
//! random-weight folder with `tools/make_random_sd.py --arch sd15` and pass `--model`.

use std::path::PathBuf;
use std::time::Instant;

use ldm_wgpu::pipeline::{default_model_dir, GenerateRequest, ModelOptions, StableDiffusion};
use ldm_wgpu::runtime::timing::format_table;
use ldm_wgpu::{DType, Gpu, GpuOptions, Result};

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
        .unwrap_or_else(default_model_dir);
    let steps: usize = get("--steps").and_then(|v| v.parse().ok()).unwrap_or(25);
    let sampler: ldm_wgpu::sched::SamplerKind = get("--sampler")
        .unwrap_or_else(|| "dpmpp_2m".into())
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let dtype: Option<DType> = get("--dtype").map(|d| d.parse().expect("f16 or f32"));
    let images: usize = get("--images").and_then(|v| v.parse().ok()).unwrap_or(3);
    let cache = std::env::temp_dir().join("ldm-bench-pipeline-cache.bin");
    let _ = std::fs::remove_file(&cache);

    let options = |profile| GpuOptions {
        profile,
        pipeline_cache_path: Some(cache.clone()),
        ..Default::default()
    };
    let model_options = ModelOptions {
        dtype,
        ..Default::default()
    };

    // Cold start: device, shader compilation, weight upload, first image.
    let t0 = Instant::now();
    let sd = StableDiffusion::load(Gpu::new(&options(false))?, &model, &model_options)?;
    let native = sd.unet.config.sample_size * sd.vae.config.downscale();
    let size: usize = get("--size").and_then(|v| v.parse().ok()).unwrap_or(native);
    let req = GenerateRequest {
        prompt: "a blue circle on a yellow background".into(),
        width: size,
        height: size,
        steps,
        sampler: Some(sampler),
        seed: 1,
        ..Default::default()
    };
    sd.generate(&req, &mut |_| true)?;
    let cold = t0.elapsed();
    sd.gpu.save_pipeline_cache()?;
    drop(sd);

    // Warm start: the same with the driver's pipeline cache on disk.
    let t0 = Instant::now();
    let sd = StableDiffusion::load(Gpu::new(&options(false))?, &model, &model_options)?;
    sd.generate(&req, &mut |_| true)?;
    let warm = t0.elapsed();
    println!(
        "device: {} ({}, {})",
        sd.gpu.adapter.name, sd.gpu.adapter.backend, sd.gpu.adapter.driver
    );
    println!(
        "model: {} | {size}x{size} | {sampler} {steps} steps | CFG 7.5 | batch 1 | {} (VAE {})",
        model.display(),
        sd.dtype.name(),
        sd.vae_dtype.name()
    );
    println!("cold start to first image: {:.2} s", cold.as_secs_f64());
    println!(
        "warm start to first image: {:.2} s (pipeline cache: {})",
        warm.as_secs_f64(),
        sd.gpu.caps.pipeline_cache
    );

    // Steady state, profiling off: timestamps put every dispatch in its own pass, which would
    // add wall time, so the per-kernel table comes from separate profiled images below.
    let mut per_image = Vec::new();
    let mut unet_its = Vec::new();
    let mut text = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..images {
        let out = sd.generate(&req, &mut |_| true)?;
        per_image.push(out.timings.total.as_secs_f64());
        text.push(out.timings.text_encode.as_secs_f64());
    }
    // U-Net it/s as diffusers' progress bar counts it, on the GPU's timeline: the step times in
    // `Timings` are CPU recording times (submission does not wait), so these images wait for
    // the GPU at the end of the first and of the last step and count the steps in between,
    // which ran back to back as in the untimed images.
    // The same waits date the decode: from the end of the last step on the GPU to the image.
    for _ in 0..images {
        let mut marks = Vec::new();
        sd.generate(&req, &mut |p| {
            if p.call == 0 || p.call + 1 == p.calls {
                let waited = sd.gpu.wait();
                marks.push((p.call, Instant::now(), waited.is_ok()));
            }
            true
        })?;
        let t_image = Instant::now();
        if let [(first, t_first, true), (last, t_last, true)] = marks[..] {
            unet_its.push((last - first) as f64 / (t_last - t_first).as_secs_f64());
            decode.push((t_image - t_last).as_secs_f64());
        }
    }
    if unet_its.is_empty() {
        unet_its.push(f64::NAN); // fewer than 2 steps, or a wait failed
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "seconds per image:   {:.3} (median of {images})",
        median(&mut per_image)
    );
    println!(
        "U-Net it/s:          {:.2} (GPU timeline, steps 2..N)",
        median(&mut unet_its)
    );
    // Timings' stage times are CPU recording times (nothing waits for the GPU between stages),
    // so the text encoder's GPU work is not in this line and would hide in the first step.
    println!(
        "text encode:         {:.3} s (CPU recording)",
        median(&mut text)
    );
    if decode.is_empty() {
        decode.push(f64::NAN);
    }
    println!(
        "VAE decode:          {:.3} s (last step done on the GPU -> image in memory)",
        median(&mut decode)
    );
    println!(
        "peak pool memory:    {:.1} MiB",
        sd.gpu.pool_stats().peak_bytes as f64 / 1048576.0
    );
    if !sd.gpu.set_profiling(true)? {
        println!("no timestamp queries on this adapter: no per-kernel table");
        return Ok(());
    }
    let profiled_images = 1;
    let mut profiled_s = 0.0;
    for _ in 0..profiled_images {
        profiled_s += sd
            .generate(&req, &mut |_| true)?
            .timings
            .total
            .as_secs_f64();
    }
    let table = sd.gpu.profile()?;
    let gpu_ns: f64 = table.values().map(|k| k.total_ns).sum();
    println!(
        "profiled image:      {:.3} s wall, {:.3} s summed kernel time ({} dispatches timed one per pass)",
        profiled_s / profiled_images as f64,
        gpu_ns / 1e9 / profiled_images as f64,
        table.values().map(|k| k.calls).sum::<u64>() / profiled_images as u64
    );
    // The whole table (sorted by GPU time, so its head is the top 15), so the % column is of
    // the image's total kernel time.
    println!("kernels by GPU time ({profiled_images} profiled image):");
    print!("{}", format_table(&table));
    Ok(())
}
