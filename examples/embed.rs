//! Embedding ldm-wgpu in an application: load a pipeline once, then generate from worker
//! threads, with progress reporting and cancellation.
//!
//! `cargo run --release --example embed -- [MODEL_DIR]` (default: the shipped tiny model).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ldm_wgpu::pipeline::{default_model_dir, GenerateRequest, ModelOptions, StableDiffusion};
use ldm_wgpu::{Gpu, GpuOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(default_model_dir);
    // One engine and one loaded model for the whole app.
    let gpu = Gpu::new(&GpuOptions::default())?;
    println!("running on {}", gpu.adapter);
    let sd = Arc::new(StableDiffusion::load(
        gpu,
        &model,
        &ModelOptions::default(),
    )?);
    let native = sd.unet.config.sample_size * sd.vae.config.downscale();

    // A "cancel" button the UI could press; here nobody presses it.
    let cancel = Arc::new(AtomicBool::new(false));

    let prompts = [
        "a red circle on a white background",
        "a large green triangle on the left",
    ];
    let workers: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let sd = Arc::clone(&sd);
            let cancel = Arc::clone(&cancel);
            let prompt = prompt.to_string();
            std::thread::spawn(move || -> ldm_wgpu::Result<()> {
                let req = GenerateRequest {
                    prompt,
                    width: native,
                    height: native,
                    steps: 20,
                    seed: 42 + i as u64,
                    ..Default::default()
                };
                // Calls from several threads are serialised inside `generate`.
                let out = sd.generate(&req, &mut |p| {
                    println!("[job {i}] step {}/{}", p.call + 1, p.calls);
                    !cancel.load(Ordering::Relaxed)
                })?;
                let path = format!("embed-{i}.png");
                out.images[0].save_png(path.as_ref())?;
                println!(
                    "[job {i}] wrote {path} in {:.2}s",
                    out.timings.total.as_secs_f64()
                );
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker thread")?;
    }
    Ok(())
}
