//! End-to-end benchmark (`cargo bench --bench pipeline -- [--model DIR] [--size N] [--steps N]
//! [--sampler NAME] [--dtype f16|f32] [--images N]`), the same as `ldm bench --model DIR` (the
//! code is `ldm_wgpu::bench::pipeline`): cold start with empty caches and warm start, seconds per
//! image, U-Net it/s on the GPU timeline with profiling off, text-encode and VAE-decode time,
//! peak pool memory, then one profiled image: every kernel by GPU time with GFLOP/s and GB/s, and
//! summed kernel time against wall time.
//!
//! Default model: the shipped weights/tiny-shapes. For the SD 1.5 / 2.1 architectures, make a
//! random-weight folder with `tools/make_random_sd.py --arch sd15` and pass `--model`.

use std::path::PathBuf;

use ldm_wgpu::bench::pipeline::{point_driver_caches_at, run_pipeline, PipelineBenchOptions};
use ldm_wgpu::pipeline::default_model_dir;
use ldm_wgpu::{GpuOptions, Result};

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
    let cache_dir = std::env::temp_dir().join("ldm-bench-pipeline");
    point_driver_caches_at(&cache_dir)?;
    let options = PipelineBenchOptions {
        model: get("--model")
            .map(PathBuf::from)
            .unwrap_or_else(default_model_dir),
        size: get("--size").and_then(|v| v.parse().ok()),
        steps: get("--steps").and_then(|v| v.parse().ok()).unwrap_or(25),
        sampler: get("--sampler")
            .unwrap_or_else(|| "dpmpp_2m".into())
            .parse()?,
        dtype: get("--dtype").map(|d| d.parse().expect("f16 or f32")),
        images: get("--images").and_then(|v| v.parse().ok()).unwrap_or(3),
        gpu: GpuOptions::from_env()?,
        cache_dir,
    };
    let report = run_pipeline(&options, &mut |stage| eprintln!("bench: {stage}..."))?;
    print!("{}", report.text(0));
    Ok(())
}
