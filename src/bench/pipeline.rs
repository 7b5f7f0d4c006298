//! The end-to-end benchmark behind `ldm bench --model DIR` and `cargo bench --bench pipeline`:
//! cold and warm start, seconds per image, the denoising loop timed as diffusers is timed, text
//! encode and VAE decode, the pool's peak memory, then one profiled image for the per-kernel
//! table and the gap between summed kernel time and wall time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::pipeline::{GenerateRequest, ModelOptions, StableDiffusion};
use crate::runtime::timing::KernelTime;
use crate::sched::SamplerKind;
use crate::{DType, Gpu, GpuOptions, Result};

#[derive(Clone, Debug)]
pub struct PipelineBenchOptions {
    pub model: PathBuf,
    /// Image side in pixels (default: the model's native size).
    pub size: Option<usize>,
    pub steps: usize,
    pub sampler: SamplerKind,
    pub dtype: Option<DType>,
    /// Timed images (medians are reported).
    pub images: usize,
    /// Engine options (adapter, policy); profiling and the pipeline cache are set here.
    pub gpu: GpuOptions,
    /// Where the cold start's caches live (emptied first): our pipeline cache file and the
    /// driver's shader cache (`MESA_SHADER_CACHE_DIR`, `__GL_SHADER_DISK_CACHE_PATH`, which the
    /// caller must point here before the process opens its first device; see
    /// [`point_driver_caches_at`]).
    pub cache_dir: PathBuf,
}

/// One kernel of the profiled image.
#[derive(Clone, Debug, Serialize)]
pub struct KernelLine {
    pub kernel: String,
    pub calls: u64,
    pub ms: f64,
    pub gflops: f64,
    pub gbs: f64,
    pub percent_of_time: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PipelineReport {
    pub device: String,
    pub model: String,
    pub size: usize,
    pub steps: usize,
    pub sampler: String,
    pub dtype: &'static str,
    pub vae_dtype: &'static str,
    /// Device, empty caches, shader compilation, weight upload, first image.
    pub cold_start_s: f64,
    /// The same with the driver's and our pipeline caches filled by the cold start.
    pub warm_start_s: f64,
    pub pipeline_cache: bool,
    pub seconds_per_image: f64,
    /// U-Net iterations per second as diffusers' progress bar counts them, on the GPU's
    /// timeline: an unprofiled image waits for the GPU after its first and its last step and
    /// counts the steps in between.
    pub unet_its: f64,
    /// The denoising loop's wall time per step (1 / `unet_its`, in ms).
    pub step_ms: f64,
    /// Recording time of the text encoder on the CPU (its GPU work overlaps the first step).
    pub text_encode_s: f64,
    /// From the last step done on the GPU to the image in memory.
    pub vae_decode_s: f64,
    pub peak_pool_mib: f64,
    /// The profiled image (timestamps around every dispatch), when the adapter has them.
    pub profiled: Option<Profiled>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Profiled {
    /// Wall time of the profiled image (profiling itself adds a pass per dispatch).
    pub wall_s: f64,
    /// Sum of every kernel's GPU time: what the image would take with no gaps between
    /// dispatches.
    pub kernel_sum_s: f64,
    pub dispatches: u64,
    /// Every kernel, by GPU time.
    pub kernels: Vec<KernelLine>,
}

/// Point the drivers' shader caches at `dir` (created empty): must run before the process opens
/// its first device, since drivers read these when they start.
pub fn point_driver_caches_at(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let shaders = dir.join("driver-shaders");
    std::fs::create_dir_all(&shaders).map_err(|e| crate::Error::io(&shaders, e))?;
    // Only the process's own environment changes, before any other thread exists.
    std::env::set_var("MESA_SHADER_CACHE_DIR", &shaders);
    std::env::set_var("__GL_SHADER_DISK_CACHE_PATH", &shaders);
    Ok(())
}

/// Run the benchmark; `progress` hears what is being measured (it takes minutes on big models).
pub fn run_pipeline(
    options: &PipelineBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<PipelineReport> {
    let cache = options.cache_dir.join("pipeline-cache.bin");
    let _ = std::fs::remove_file(&cache);
    let gpu_options = |profile| GpuOptions {
        profile,
        pipeline_cache_path: Some(cache.clone()),
        ..options.gpu.clone()
    };
    let model_options = ModelOptions {
        dtype: options.dtype,
        ..Default::default()
    };

    progress("cold start");
    let t0 = Instant::now();
    let gpu = Gpu::new(&gpu_options(false))?;
    let sd = StableDiffusion::load(gpu, &options.model, &model_options)?;
    let native = sd.unet.config.sample_size * sd.vae.config.downscale();
    let size = options.size.unwrap_or(native);
    let req = GenerateRequest {
        prompt: "a blue circle on a yellow background".into(),
        width: size,
        height: size,
        steps: options.steps,
        sampler: Some(options.sampler),
        seed: 1,
        ..Default::default()
    };
    sd.generate(&req, &mut |_| true)?;
    let cold = t0.elapsed().as_secs_f64();
    sd.gpu.save_pipeline_cache()?;
    drop(sd);

    progress("warm start");
    let t0 = Instant::now();
    let sd = StableDiffusion::load(
        Gpu::new(&gpu_options(false))?,
        &options.model,
        &model_options,
    )?;
    sd.generate(&req, &mut |_| true)?;
    let warm = t0.elapsed().as_secs_f64();

    progress("steady state");
    let images = options.images.max(1);
    let (mut per_image, mut text) = (Vec::new(), Vec::new());
    for _ in 0..images {
        let out = sd.generate(&req, &mut |_| true)?;
        per_image.push(out.timings.total.as_secs_f64());
        text.push(out.timings.text_encode.as_secs_f64());
    }
    // The step times in `Timings` are CPU recording times (submission does not wait), so these
    // images wait for the GPU at the end of the first and of the last step and count the steps
    // in between, which ran back to back as in the untimed images; the same waits date the
    // decode, from the end of the last step on the GPU to the image.
    let (mut its, mut decode) = (Vec::new(), Vec::new());
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
            its.push((last - first) as f64 / (t_last - t_first).as_secs_f64());
            decode.push((t_image - t_last).as_secs_f64());
        }
    }
    let median = |mut v: Vec<f64>| {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let unet_its = median(its);
    let mut report = PipelineReport {
        device: format!(
            "{} ({}, {})",
            sd.gpu.adapter.name, sd.gpu.adapter.backend, sd.gpu.adapter.driver
        ),
        model: options.model.display().to_string(),
        size,
        steps: options.steps,
        sampler: options.sampler.name().to_string(),
        dtype: sd.dtype.name(),
        vae_dtype: sd.vae_dtype.name(),
        cold_start_s: cold,
        warm_start_s: warm,
        pipeline_cache: sd.gpu.caps.pipeline_cache,
        seconds_per_image: median(per_image),
        unet_its,
        step_ms: 1e3 / unet_its,
        text_encode_s: median(text),
        vae_decode_s: median(decode),
        peak_pool_mib: sd.gpu.pool_stats().peak_bytes as f64 / 1048576.0,
        profiled: None,
    };
    if !sd.gpu.set_profiling(true)? {
        return Ok(report);
    }
    progress("profiled image");
    let wall_s = sd
        .generate(&req, &mut |_| true)?
        .timings
        .total
        .as_secs_f64();
    let table = sd.gpu.profile()?;
    let kernel_sum_ns: f64 = table.values().map(|k| k.total_ns).sum();
    let mut kernels: Vec<(&String, &KernelTime)> = table.iter().collect();
    kernels.sort_by(|a, b| b.1.total_ns.total_cmp(&a.1.total_ns));
    let kernels = kernels
        .into_iter()
        .map(|(name, k)| {
            let s = k.total_ns * 1e-9;
            KernelLine {
                kernel: name.clone(),
                calls: k.calls,
                ms: k.total_ns * 1e-6,
                gflops: k.flops / s * 1e-9,
                gbs: k.bytes / s * 1e-9,
                percent_of_time: 100.0 * k.total_ns / kernel_sum_ns,
            }
        })
        .collect();
    report.profiled = Some(Profiled {
        wall_s,
        kernel_sum_s: kernel_sum_ns * 1e-9,
        dispatches: table.values().map(|k| k.calls).sum(),
        kernels,
    });
    Ok(report)
}

impl PipelineReport {
    /// The report as text (the profiled table cut to `top` kernels; 0: all).
    pub fn text(&self, top: usize) -> String {
        let mut out = format!(
            "device: {}\nmodel: {} | {s}x{s} | {} {} steps | CFG 7.5 | batch 1 | {} (VAE {})\n",
            self.device,
            self.model,
            self.sampler,
            self.steps,
            self.dtype,
            self.vae_dtype,
            s = self.size
        );
        out += &format!(
            "cold start to first image: {:.2} s (driver shader cache and pipeline cache empty)\n",
            self.cold_start_s
        );
        out += &format!(
            "warm start to first image: {:.2} s (pipeline cache: {})\n",
            self.warm_start_s, self.pipeline_cache
        );
        out += &format!("seconds per image:   {:.3}\n", self.seconds_per_image);
        out += &format!(
            "U-Net it/s:          {:.2} ({:.1} ms per step; unprofiled, GPU timeline, steps 2..N)\n",
            self.unet_its, self.step_ms
        );
        out += &format!(
            "text encode:         {:.3} s (CPU recording)\n",
            self.text_encode_s
        );
        out += &format!(
            "VAE decode:          {:.3} s (last step done on the GPU -> image in memory)\n",
            self.vae_decode_s
        );
        out += &format!("peak pool memory:    {:.1} MiB\n", self.peak_pool_mib);
        match &self.profiled {
            None => out += "no timestamp queries on this adapter: no per-kernel table\n",
            Some(p) => {
                out += &format!(
                    "profiled image:      {:.3} s wall, {:.3} s summed kernel time ({:.0}% of \
                     wall; {} dispatches, each timed in its own pass)\n",
                    p.wall_s,
                    p.kernel_sum_s,
                    100.0 * p.kernel_sum_s / p.wall_s,
                    p.dispatches
                );
                out += &format!(
                    "{:<28} {:>7} {:>10} {:>6} {:>10} {:>9}\n",
                    "kernel", "calls", "ms", "%", "GFLOP/s", "GB/s"
                );
                let n = if top == 0 { p.kernels.len() } else { top };
                for k in p.kernels.iter().take(n) {
                    out += &format!(
                        "{:<28} {:>7} {:>10.3} {:>6.1} {:>10.1} {:>9.1}\n",
                        k.kernel, k.calls, k.ms, k.percent_of_time, k.gflops, k.gbs
                    );
                }
            }
        }
        out
    }
}
