//! The persistent pipeline cache: a damaged or foreign file on disk is ignored and rewritten,
//! never trusted, and a good one is reused by the next `Gpu`.

use ldm_wgpu::kernels::elementwise;
use ldm_wgpu::{DType, Gpu, GpuOptions};

/// Open a `Gpu` on `path`, run one kernel, check its result, save the cache.
fn run_once(path: &std::path::Path) -> Gpu {
    let gpu = Gpu::new(&GpuOptions {
        pipeline_cache_path: Some(path.to_path_buf()),
        ..GpuOptions::from_env().unwrap()
    })
    .expect("a damaged cache file must not stop the engine from opening");
    let x = gpu.upload(&[1.0, -2.0, 3.5], &[3], DType::F32).unwrap();
    let y = elementwise::scale(&gpu, &x, 2.0).unwrap();
    assert_eq!(gpu.download(&y).unwrap(), vec![2.0, -4.0, 7.0]);
    gpu.save_pipeline_cache().unwrap();
    gpu
}

#[test]
fn damaged_cache_files_are_ignored_and_rewritten() {
    let dir = std::env::temp_dir().join(format!("ldm-pipeline-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pipelines.bin");

    let gpu = run_once(&path);
    if !gpu.caps.pipeline_cache {
        eprintln!("adapter has no PIPELINE_CACHE feature; nothing to test");
        return;
    }
    drop(gpu);
    let good = std::fs::read(&path).expect("the cache was saved");
    assert!(!good.is_empty());

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    let damaged: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"not a cache at all".to_vec()),
        ("truncated", good[..good.len() / 3].to_vec()),
        ("one byte flipped", flipped),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in damaged {
        std::fs::write(&path, &bytes).unwrap();
        drop(run_once(&path));
        let rewritten = std::fs::read(&path).unwrap();
        assert_ne!(rewritten, bytes, "{what}: the damaged file was kept");
        // The rewritten file is good again: the next start reads it.
        drop(run_once(&path));
    }
    std::fs::remove_dir_all(&dir).ok();
}
