//! Faults become errors and the engine survives them: a lost device, and a request larger than
//! the GPU memory it may use.

use std::sync::mpsc;
use std::time::Duration;

use ldm_wgpu::kernels::elementwise;
use ldm_wgpu::pipeline::{default_model_dir, GenerateRequest, ModelOptions, StableDiffusion};
use ldm_wgpu::{DType, Gpu, GpuOptions, Result};

/// Run `f` on a worker thread; a hang fails the test instead of stalling the suite.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no answer within 120 s (hang)"),
        // The worker panicked: fail with its message.
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(payload) => std::panic::resume_unwind(payload),
            Ok(()) => unreachable!("the worker sends before it ends"),
        },
    }
}

fn triple(gpu: &Gpu) -> Result<Vec<f32>> {
    let x = gpu.upload(&[1.0, -2.0, 0.5], &[3], DType::F32)?;
    let y = elementwise::scale(gpu, &x, 3.0)?;
    gpu.download(&y)
}

#[test]
fn a_lost_device_is_an_error_and_a_new_engine_works() {
    bounded("device loss", || {
        let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
        assert_eq!(triple(&gpu).unwrap(), vec![3.0, -6.0, 1.5]);
        gpu.simulate_device_loss();
        // The first call may see the loss as the driver reports it (an invalid buffer, a failed
        // submit): an error either way, never a panic or a hang.
        let err = triple(&gpu).expect_err("work on a lost device must fail");
        eprintln!("first error after the loss: {err}");
        let _ = gpu.wait();
        assert!(gpu.is_lost(), "the loss was not recorded");
        // Every later call fails too, and says why.
        let err = triple(&gpu).expect_err("work on a lost device must fail");
        assert!(err.to_string().contains("lost"), "{err}");
        assert!(gpu.wait().is_err());
        drop(gpu);
        let fresh =
            Gpu::new(&GpuOptions::from_env().unwrap()).expect("a new engine after a lost one");
        assert_eq!(triple(&fresh).unwrap(), vec![3.0, -6.0, 1.5]);
    });
}

fn load(budget: Option<u64>) -> StableDiffusion {
    let gpu = Gpu::new(&GpuOptions {
        memory_budget: budget,
        ..GpuOptions::from_env().unwrap()
    })
    .expect("adapter");
    let options = ModelOptions {
        dtype: Some(DType::F32),
        vae_f32: Some(true),
        ..Default::default()
    };
    StableDiffusion::load(gpu, &default_model_dir(), &options).expect("the shipped model loads")
}

fn request(size: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red square".into(),
        width: size,
        height: size,
        steps: 2,
        seed: 7,
        sampler: Some("euler".parse().unwrap()),
        ..Default::default()
    }
}

/// A request over the budget fails with the numbers and a hint, nothing leaks, and the same
/// engine then serves a request that fits with exactly the image an unconstrained engine makes.
#[test]
fn over_budget_requests_fail_cleanly_and_the_engine_stays_usable() {
    bounded("memory budget", || {
        let free = load(None);
        let weights = free.gpu.pool_stats().live_bytes;
        let small = free.generate(&request(64), &mut |_| true).unwrap();
        let small_peak = free.gpu.pool_stats().peak_bytes;
        assert!(small_peak > weights);
        drop(free);

        let budget = small_peak + (1 << 20);
        let tight = load(Some(budget));
        assert_eq!(tight.gpu.pool_stats().live_bytes, weights);
        let Err(err) = tight.generate(&request(192), &mut |_| true) else {
            panic!("a request 9× the area of one that just fits must not fit");
        };
        let message = err.to_string();
        assert!(message.contains("budget"), "{message}");
        assert!(err.hint().is_some(), "no hint for {message}");
        assert_eq!(
            tight.gpu.pool_stats().live_bytes,
            weights,
            "the failed request left tensors alive"
        );
        let again = tight.generate(&request(64), &mut |_| true).unwrap();
        assert_eq!(
            again.images, small.images,
            "the image after a refusal differs"
        );
        assert!(tight.gpu.pool_stats().peak_bytes <= budget);
    });
}
