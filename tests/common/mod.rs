//! Shared test helpers: one engine per test binary, deterministic random inputs, and the
//! relative-L2 comparison every kernel test uses (NaN or infinity never passes).
#![allow(dead_code)]

use std::sync::OnceLock;

use ldm_wgpu::{DType, Gpu, GpuOptions, Tensor};

/// One engine shared by the tests of a binary (pipelines compile once).
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let g = Gpu::new(&GpuOptions::from_env().unwrap())
            .expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)");
        eprintln!("tests run on: {}", g.adapter);
        g
    })
}

/// The dtypes to test on this adapter (f16 only where SHADER_F16 is offered).
pub fn dtypes() -> Vec<DType> {
    if gpu().caps.shader_f16 {
        vec![DType::F32, DType::F16]
    } else {
        vec![DType::F32]
    }
}

/// xorshift64* with a Box-Muller normal: fresh, reproducible inputs without extra crates.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn normals(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
}

/// Values as the GPU will see them after upload in `dtype` (f16 rounding applied), so the CPU
/// reference and the kernel start from identical inputs.
pub fn quantize(data: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => data.to_vec(),
        DType::F16 => data
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect(),
    }
}

/// Upload, returning the tensor and the exact values it holds.
pub fn upload(data: &[f32], shape: &[usize], dtype: DType) -> (Tensor, Vec<f32>) {
    let q = quantize(data, dtype);
    (gpu().upload(&q, shape, dtype).unwrap(), q)
}

/// ||got - want|| / ||want||; infinity if anything is not finite or lengths differ.
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w) * (g as f64 - w);
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let e = rel_l2(got, want);
    assert!(
        e <= tol,
        "{what}: relative L2 error {e:.3e} > tolerance {tol:.1e}"
    );
}

/// Tolerance by storage dtype: f32 ≤ 1e-5 (accumulation-order noise), f16 ≤ 2e-3 (output
/// rounding to 11 bits plus f16 intermediate storage).
pub fn tol(dtype: DType, f32_tol: f64, f16_tol: f64) -> f64 {
    match dtype {
        DType::F32 => f32_tol,
        DType::F16 => f16_tol,
    }
}

/// Force (or release, `None`) the tensor-core tile on engine `g` for what it records next.
pub fn set_coop_tile(g: &Gpu, tile: Option<ldm_wgpu::runtime::CoopTile>) {
    g.set_policy(ldm_wgpu::runtime::KernelPolicy {
        coop_tile: tile,
        ..g.policy()
    });
}

/// PSNR in dB between two 8-bit images of the same size (infinite when identical).
pub fn psnr_rgb8(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "images of different sizes");
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// A torch-layout fixture tensor [B, C, H, W] as NHWC values in f64 (our latents' layout).
pub fn nchw_to_nhwc_f64(t: &ldm_wgpu::weights::HostTensor<'_>) -> Vec<f64> {
    let [b, c, h, w] = t.shape[..] else {
        panic!("{:?} is not [B, C, H, W]", t.shape)
    };
    let nchw = t.to_f32_vec();
    let mut out = vec![0.0f64; nchw.len()];
    for bi in 0..b {
        for ci in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[((bi * h + y) * w + x) * c + ci] =
                        nchw[((bi * c + ci) * h + y) * w + x] as f64;
                }
            }
        }
    }
    out
}

/// A sparse `sd_xl_base_1.0.safetensors` in `dir`: the real SDXL base header (from the
/// shapes fixture), F16 everywhere, holes for data; for tests that read headers or plan only.
pub fn sparse_sdxl_base(dir: &std::path::Path) -> std::path::PathBuf {
    let shapes = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sdxl/single_file/sdxl-base-real.shapes.json");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(shapes).unwrap()).unwrap();
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (key, shape) in doc["ldm_shapes"].as_object().unwrap() {
        let numel: u64 = shape
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .product();
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + 2 * numel]}),
        );
        offset += 2 * numel;
    }
    let mut bytes = serde_json::Value::Object(header).to_string().into_bytes();
    while !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("sd_xl_base_1.0.safetensors");
    let mut file_bytes = (bytes.len() as u64).to_le_bytes().to_vec();
    file_bytes.extend_from_slice(&bytes);
    std::fs::write(&path, &file_bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(file_bytes.len() as u64 + offset).unwrap();
    path
}
