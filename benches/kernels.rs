//! Kernel benchmarks at the Stable Diffusion 1.5 512×512 shapes (`cargo bench --bench kernels`);
//! the same as `ldm bench` (the code is `ldm_wgpu::bench`), driven by the environment:
//! LDM_BENCH_DTYPE=f16|f32, LDM_BENCH_REPS=N, LDM_BENCH_FILTER=a,b,c (substrings),
//! LDM_BENCH_QUICK=1 (small peak runs and only the cheaper cases; automatic on CPU adapters).
//!
//! One line per case: kernel and path, shape, dtype, median GPU time, GFLOP/s or GB/s, and the %
//! of this device's peak measured in the same run; `*` marks the path the default policy takes.
//! Matmuls print `matmul[fma]` and, on adapters with f16 cooperative matrices, `matmul[coop]`
//! (64 tile) and `matmul[coop128]` (`matmul[coop128/splitN]` where the large tile splits K);
//! convolutions one line per kernel tile (`conv2d[64]`, `conv2d[128]`, `conv2d[small]`,
//! `conv2d[coop]`, `conv2d[coop128]`); attention
//! `attention[fma]`, `attention[coop]` and one `attention[coop RxK]` per tensor-core tile shape.

use ldm_wgpu::bench::{run_kernels, KernelBenchOptions};
use ldm_wgpu::{Gpu, GpuOptions, Result};

fn main() -> Result<()> {
    let gpu = Gpu::new(&GpuOptions {
        profile: true,
        ..GpuOptions::from_env()?
    })?;
    if !gpu.caps.timestamps {
        eprintln!("this adapter has no TIMESTAMP_QUERY: GPU timing is impossible here");
        return Ok(());
    }
    let env = |k: &str| std::env::var(k).ok();
    let dtype = env("LDM_BENCH_DTYPE")
        .map(|s| s.parse().expect("f16 or f32"))
        .unwrap_or(gpu.compute_dtype());
    let quick = env("LDM_BENCH_QUICK").map_or(gpu.adapter.device_type == "Cpu", |v| v == "1");
    let options = KernelBenchOptions {
        shapes: env("LDM_BENCH_SHAPES")
            .map(|s| s.parse().expect("sd15 or sdxl"))
            .unwrap_or_default(),
        dtype,
        reps: env("LDM_BENCH_REPS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 3 } else { 10 }),
        filter: env("LDM_BENCH_FILTER")
            .map(|f| f.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
        quick,
    };
    println!(
        "device: {} ({} {}), dtype {}, {} reps{}",
        gpu.adapter.name,
        gpu.adapter.backend,
        gpu.adapter.driver,
        dtype.name(),
        options.reps,
        if quick { ", quick" } else { "" }
    );
    run_kernels(
        &gpu,
        &options,
        &mut |p| {
            println!(
                "measured peaks: FMA {:.1} GFLOP/s, copy {:.1} GB/s",
                p.fma_gflops, p.copy_gbs
            );
            if let Some(t) = p.tensor_core_gflops {
                println!("measured tensor-core peak: {t:.1} GFLOP/s (the [coop] lines' %)");
            }
        },
        &mut |row| println!("{}", row.text()),
    )?;
    Ok(())
}
