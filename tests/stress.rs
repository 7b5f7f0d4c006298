//! Several threads generating and cancelling at once on one `StableDiffusion`: every finished
//! image equals the single-threaded one, every cancelled call returns an error, nothing hangs, and
//! the pool returns to its baseline (no tensor leaked by a cancelled or concurrent call).

use std::sync::{mpsc, Arc};
use std::time::Duration;

use ldm_wgpu::image::Image;
use ldm_wgpu::pipeline::{default_model_dir, GenerateRequest, ModelOptions, StableDiffusion};
use ldm_wgpu::{DType, Gpu, GpuOptions};

fn request(seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a blue circle on a yellow background".into(),
        width: 64,
        height: 64,
        steps: 3,
        seed,
        ..Default::default()
    }
}

#[test]
fn threads_generating_and_cancelling_share_one_engine() {
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
    let options = ModelOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    let sd = Arc::new(StableDiffusion::load(gpu, &default_model_dir(), &options).unwrap());
    let baseline = sd.gpu.pool_stats().live_bytes;
    let want: Vec<Vec<Image>> = (0..2)
        .map(|seed| sd.generate(&request(seed), &mut |_| true).unwrap().images)
        .collect();

    const THREADS: usize = 4;
    const ROUNDS: usize = 3;
    let (tx, rx) = mpsc::channel();
    for thread in 0..THREADS {
        let (sd, tx) = (sd.clone(), tx.clone());
        std::thread::spawn(move || {
            for round in 0..ROUNDS {
                let seed = ((thread + round) % 2) as u64;
                // Odd threads cancel their second round at the first progress report.
                let cancel = thread % 2 == 1 && round == 1;
                let result = sd.generate(&request(seed), &mut |_| !cancel);
                let _ = tx.send((thread, round, seed, cancel, result.map(|g| g.images)));
            }
        });
    }
    drop(tx);
    let mut finished = 0;
    let mut cancelled = 0;
    for _ in 0..THREADS * ROUNDS {
        let (thread, round, seed, cancel, result) = rx
            .recv_timeout(Duration::from_secs(600))
            .expect("a generation neither finished nor failed within 600 s (hang)");
        match (cancel, result) {
            (false, Ok(images)) => {
                assert!(
                    images == want[seed as usize],
                    "thread {thread} round {round}: image differs"
                );
                finished += 1;
            }
            (true, Err(e)) => {
                assert!(e.to_string().contains("cancel"), "{e}");
                cancelled += 1;
            }
            (false, Err(e)) => panic!("thread {thread} round {round}: {e}"),
            (true, Ok(_)) => panic!("thread {thread} round {round}: cancel ignored"),
        }
    }
    assert_eq!(
        (finished, cancelled),
        (THREADS * ROUNDS - THREADS / 2, THREADS / 2)
    );
    assert_eq!(sd.gpu.pool_stats().live_bytes, baseline, "tensors leaked");
}
