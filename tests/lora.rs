//! LoRA files in every format we read, matched to the shipped model's weights: which layers,
//! which tensors, which scale; and the files that must be refused, with what the error says.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ldm_wgpu::pipeline::default_model_dir;
use ldm_wgpu::weights::lora::{find_lora, open_lora, LoraFormat, LoraTarget, LoraTargets};
use ldm_wgpu::weights::{open_model, LoadOptions};
use safetensors::tensor::{Dtype, TensorView};

fn targets() -> LoraTargets {
    let model = open_model(default_model_dir(), &LoadOptions::default()).unwrap();
    LoraTargets::default()
        .with(LoraTarget::Unet, model.unet.weights.shapes())
        .with(
            LoraTarget::TextEncoder,
            model.text_encoder.as_ref().unwrap().weights.shapes(),
        )
}

/// Write a safetensors file of f32 tensors with deterministic pseudo-random values, and scalar
/// alphas of 4.
fn write(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>)]) -> PathBuf {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            let bytes: Vec<u8> = if k.ends_with(".alpha") {
                4.0f32.to_le_bytes().to_vec()
            } else {
                // Deterministic values in [-0.5, 0.5), different per tensor.
                let mut state = k
                    .bytes()
                    .fold(0x9e37_79b9u32, |h, b| h.wrapping_mul(31) ^ b as u32);
                (0..n)
                    .flat_map(|_| {
                        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5).to_le_bytes()
                    })
                    .collect()
            };
            (k.to_string(), shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let path = dir.join(format!("{name}.safetensors"));
    safetensors::tensor::serialize_to_file(views, None, &path).unwrap();
    path
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ldm-lora-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const Q: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
const OUT: &str = "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0";
const CONV: &str = "down_blocks.1.resnets.0.conv1"; // [128, 64, 3, 3]
const TE_Q: &str = "text_model.encoder.layers.0.self_attn.q_proj"; // [128, 128]

fn under(s: &str) -> String {
    s.replace('.', "_")
}

#[test]
fn kohya_with_locon_and_text_encoder() {
    let dir = scratch("kohya");
    let (uq, uc, ut) = (under(Q), under(CONV), under(TE_Q));
    let path = write(
        &dir,
        "style",
        &[
            (&format!("lora_unet_{uq}.lora_down.weight"), vec![8, 128]),
            (&format!("lora_unet_{uq}.lora_up.weight"), vec![128, 8]),
            (&format!("lora_unet_{uq}.alpha"), vec![]),
            (
                &format!("lora_unet_{uc}.lora_down.weight"),
                vec![4, 64, 3, 3],
            ),
            (
                &format!("lora_unet_{uc}.lora_up.weight"),
                vec![128, 4, 1, 1],
            ),
            (&format!("lora_te_{ut}.lora_down.weight"), vec![2, 128]),
            (&format!("lora_te_{ut}.lora_up.weight"), vec![128, 2]),
        ],
    );
    let lora = open_lora(&path, &targets()).unwrap();
    assert_eq!(
        (lora.name.as_str(), lora.format),
        ("style", LoraFormat::Kohya)
    );
    assert_eq!(lora.layers.len(), 3);
    let q = lora
        .layers
        .iter()
        .find(|l| l.key == format!("{Q}.weight"))
        .unwrap();
    assert_eq!((q.rank, q.alpha, q.alpha_scale()), (8, Some(4.0), 0.5));
    let conv = lora
        .layers
        .iter()
        .find(|l| l.key == format!("{CONV}.weight"))
        .unwrap();
    assert_eq!(
        (conv.rank, conv.alpha_scale(), conv.weight_shape.clone()),
        (4, 1.0, vec![128, 64, 3, 3])
    );
    let te = lora
        .layers
        .iter()
        .find(|l| l.target == LoraTarget::TextEncoder)
        .unwrap();
    assert!(
        te.key.ends_with("encoder.layers.0.self_attn.q_proj.weight"),
        "{}",
        te.key
    );
    assert_eq!(find_lora(&dir, "style").unwrap(), path);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn peft_and_legacy_diffusers_names() {
    let dir = scratch("peft");
    let peft = write(
        &dir,
        "peft",
        &[
            (&format!("unet.{Q}.lora_A.weight"), vec![4, 128]),
            (&format!("unet.{Q}.lora_B.weight"), vec![128, 4]),
            (&format!("text_encoder.{TE_Q}.lora_A.weight"), vec![4, 128]),
            (&format!("text_encoder.{TE_Q}.lora_B.weight"), vec![128, 4]),
        ],
    );
    let lora = open_lora(&peft, &targets()).unwrap();
    assert_eq!(lora.format, LoraFormat::Peft);
    let counts: BTreeMap<_, _> = lora.layer_counts().into_iter().collect();
    assert_eq!(counts[&LoraTarget::Unet], 1);
    assert_eq!(counts[&LoraTarget::TextEncoder], 1);

    let attn = OUT.trim_end_matches(".to_out.0");
    let legacy = write(
        &dir,
        "legacy",
        &[
            (
                &format!("unet.{attn}.processor.to_out_lora.down.weight"),
                vec![4, 64],
            ),
            (
                &format!("unet.{attn}.processor.to_out_lora.up.weight"),
                vec![64, 4],
            ),
            (&format!("unet.{CONV}.lora.down.weight"), vec![4, 64, 3, 3]),
            (&format!("unet.{CONV}.lora.up.weight"), vec![128, 4, 1, 1]),
        ],
    );
    let lora = open_lora(&legacy, &targets()).unwrap();
    assert_eq!(lora.format, LoraFormat::DiffusersLegacy);
    let keys: Vec<&str> = lora.layers.iter().map(|l| l.key.as_str()).collect();
    assert!(keys.contains(&format!("{OUT}.weight").as_str()), "{keys:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tucker_conv_layers() {
    let dir = scratch("tucker");
    let uc = under(CONV);
    let path = write(
        &dir,
        "tucker",
        &[
            (
                &format!("lora_unet_{uc}.lora_down.weight"),
                vec![4, 64, 1, 1],
            ),
            (&format!("lora_unet_{uc}.lora_mid.weight"), vec![4, 4, 3, 3]),
            (
                &format!("lora_unet_{uc}.lora_up.weight"),
                vec![128, 4, 1, 1],
            ),
        ],
    );
    let lora = open_lora(&path, &targets()).unwrap();
    assert!(lora.layers[0].mid.is_some());
    std::fs::remove_dir_all(&dir).ok();
}

fn error_of(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>)]) -> String {
    let path = write(dir, name, tensors);
    open_lora(&path, &targets()).unwrap_err().to_string()
}

#[test]
fn bad_files_are_refused_with_a_reason() {
    let dir = scratch("bad");
    let uq = under(Q);
    // A module the model does not have (an SDXL block name): listed.
    let err = error_of(
        &dir,
        "other_model",
        &[
            (
                "lora_unet_down_blocks_2_attentions_1_proj_in.lora_down.weight",
                vec![4, 1280],
            ),
            (
                "lora_unet_down_blocks_2_attentions_1_proj_in.lora_up.weight",
                vec![1280, 4],
            ),
            (&format!("lora_unet_{uq}.lora_down.weight"), vec![4, 128]),
            (&format!("lora_unet_{uq}.lora_up.weight"), vec![128, 4]),
        ],
    );
    assert!(
        err.contains("unet:down_blocks_2_attentions_1_proj_in"),
        "{err}"
    );
    assert!(err.contains("1 of its 2 layers"), "{err}");
    // Nothing LoRA-like at all.
    let err = error_of(
        &dir,
        "not_lora",
        &[("model.diffusion_model.out.2.weight", vec![4, 4])],
    );
    assert!(err.contains("no LoRA tensors"), "{err}");
    // A shape that does not fit: the tensor is named.
    let err = error_of(
        &dir,
        "bad_shape",
        &[
            (&format!("lora_unet_{uq}.lora_down.weight"), vec![4, 96]),
            (&format!("lora_unet_{uq}.lora_up.weight"), vec![128, 4]),
        ],
    );
    assert!(
        err.contains(&format!("lora_unet_{uq}.lora_down.weight")),
        "{err}"
    );
    // An up matrix without its down.
    let err = error_of(
        &dir,
        "half",
        &[(&format!("lora_unet_{uq}.lora_up.weight"), vec![128, 4])],
    );
    assert!(err.contains("not both down and up"), "{err}");
    // LoHa is a different decomposition: refused, not half-applied.
    let err = error_of(
        &dir,
        "loha",
        &[
            (&format!("lora_unet_{uq}.hada_w1_a"), vec![128, 4]),
            (&format!("lora_unet_{uq}.hada_w1_b"), vec![4, 128]),
        ],
    );
    assert!(err.contains("LoHa"), "{err}");
    // Names that are paths, and pickles, are refused by the folder lookup.
    assert!(find_lora(&dir, "../etc/passwd").is_err());
    std::fs::write(dir.join("old.pt"), b"\x80\x02").unwrap();
    let err = find_lora(&dir, "old").unwrap_err().to_string();
    assert!(err.contains("pickle"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Merging on the GPU (our matmul, the base as its residual) against the f64 reference, for a
/// linear, a LoCon 3×3 conv, a 1×1 conv with a 2-D down matrix and a Tucker conv, at odd ranks,
/// in both dtypes.
#[test]
fn merged_weights_match_the_reference() {
    use ldm_wgpu::lora::{merged_weight, reference_merged};
    use ldm_wgpu::{DType, Gpu, GpuOptions};
    let dir = scratch("merge");
    let (uq, uc) = (under(Q), under(CONV));
    let shortcut = under("down_blocks.1.resnets.0.conv_shortcut"); // [128, 64, 1, 1]
    let path = write(
        &dir,
        "merge",
        &[
            (&format!("lora_unet_{uq}.lora_down.weight"), vec![3, 128]),
            (&format!("lora_unet_{uq}.lora_up.weight"), vec![128, 3]),
            (&format!("lora_unet_{uq}.alpha"), vec![]),
            (
                &format!("lora_unet_{uc}.lora_down.weight"),
                vec![5, 64, 3, 3],
            ),
            (
                &format!("lora_unet_{uc}.lora_up.weight"),
                vec![128, 5, 1, 1],
            ),
            (
                &format!("lora_unet_{shortcut}.lora_down.weight"),
                vec![2, 64],
            ),
            (
                &format!("lora_unet_{shortcut}.lora_up.weight"),
                vec![128, 2],
            ),
        ],
    );
    let tucker_path = write(
        &dir,
        "tucker",
        &[
            (
                &format!("lora_unet_{uc}.lora_down.weight"),
                vec![3, 64, 1, 1],
            ),
            (&format!("lora_unet_{uc}.lora_mid.weight"), vec![3, 3, 3, 3]),
            (
                &format!("lora_unet_{uc}.lora_up.weight"),
                vec![128, 3, 1, 1],
            ),
        ],
    );
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
    let targets = targets();
    let mut dtypes = vec![DType::F32];
    if gpu.caps.shader_f16 {
        dtypes.push(DType::F16);
    }
    for path in [&path, &tucker_path] {
        let lora = open_lora(path, &targets).unwrap();
        for layer in &lora.layers {
            let ws = &layer.weight_shape;
            let ours: Vec<usize> = if ws.len() == 2 {
                ws.clone()
            } else {
                vec![ws[0], ws[2], ws[3], ws[1]]
            };
            let n: usize = ours.iter().product();
            let base: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            for &dtype in &dtypes {
                let base_t = gpu.upload(&base, &ours, dtype).unwrap();
                let base_q = gpu.download(&base_t).unwrap();
                let scale = -0.7 * layer.alpha_scale();
                let merged = merged_weight(&gpu, &lora, layer, &base_t, scale).unwrap();
                assert_eq!(merged.shape(), ours.as_slice());
                let got = gpu.download(&merged).unwrap();
                let want = reference_merged(&lora, layer, &base_q, scale).unwrap();
                let num: f64 = got
                    .iter()
                    .zip(&want)
                    .map(|(&g, &w)| (g as f64 - w).powi(2))
                    .sum();
                let den: f64 = want.iter().map(|w| w * w).sum();
                let err = (num / den).sqrt();
                // f32: one accumulation of ≤ 64·9 products; f16: the output rounding (and the
                // f16 intermediate of the Tucker product).
                let tol = if dtype == DType::F32 { 1e-6 } else { 2e-3 };
                eprintln!(
                    "{} {:?} {}: rel-L2 {err:.2e}",
                    lora.name,
                    layer.key,
                    dtype.name()
                );
                assert!(
                    err <= tol && got.iter().all(|v| v.is_finite()),
                    "{}: {err:.2e}",
                    layer.key
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------------------------------------------ applying to a loaded model

use ldm_wgpu::lora::{reference_merged, LoraBackup, LoraSpec};
use ldm_wgpu::pipeline::{GenerateRequest, ModelOptions, StableDiffusion};
use ldm_wgpu::DType;

/// The tiny SD 1.x model of the pipeline parity fixtures (32 channels, 2 text-encoder layers).
fn parity_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline_parity/model")
}

fn load_parity(dtype: DType) -> StableDiffusion {
    load_parity_with(dtype, LoraBackup::default())
}

fn load_parity_with(dtype: DType, lora_backup: LoraBackup) -> StableDiffusion {
    let gpu = ldm_wgpu::Gpu::new(&ldm_wgpu::GpuOptions::from_env().unwrap()).expect("adapter");
    let opts = ModelOptions {
        dtype: Some(dtype),
        lora_backup,
        vae_f32: Some(true),
        tokenizer_dir: Some(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tiny-shapes/tokenizer"),
        ),
        ..Default::default()
    };
    StableDiffusion::load(gpu, &parity_model(), &opts).unwrap()
}

fn small_request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a red circle".into(),
        negative_prompt: "blurry".into(),
        width: 64,
        height: 64,
        steps: 4,
        seed: 42,
        ..Default::default()
    }
}

/// (image bytes, latents) of one generation.
fn render(sd: &StableDiffusion) -> (Vec<u8>, Vec<f32>) {
    let out = sd.generate(&small_request(), &mut |_| true).unwrap();
    (out.images[0].rgb.clone(), out.latents)
}

/// Every LoRA-able weight buffer of the model, as bytes, by buffer (fused layers once).
fn weight_bytes(sd: &StableDiffusion) -> BTreeMap<u64, Vec<u8>> {
    sd.unet
        .lora_sites
        .iter()
        .chain(&sd.text_encoder.as_ref().unwrap().lora_sites)
        .map(|s| {
            let id = s.tensor.buffer_id();
            (id, sd.gpu.download_bytes(&s.tensor).unwrap())
        })
        .collect()
}

const P_K: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"; // fused q|k|v
const P_V2: &str = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"; // fused k|v
const P_CONV: &str = "down_blocks.1.resnets.0.conv1"; // [32, 32, 3, 3]
const P_PROJ: &str = "up_blocks.1.attentions.0.proj_in"; // 1×1 conv read as a linear
const P_FF: &str = "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"; // [256, 32]
const P_TE_Q: &str = "text_model.encoder.layers.0.self_attn.q_proj"; // fused q|k|v
const P_TE_V: &str = "text_model.encoder.layers.1.self_attn.v_proj";

/// A kohya LoRA on fused and plain linears, a LoCon 3×3 conv, a 1×1 projection and two text
/// encoder projections of the parity model.
fn kohya_for_parity(dir: &Path) -> PathBuf {
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |prefix: &str, module: &str, down: Vec<usize>, up: Vec<usize>| {
        let m = under(module);
        t.push((format!("{prefix}_{m}.lora_down.weight"), down));
        t.push((format!("{prefix}_{m}.lora_up.weight"), up));
        t.push((format!("{prefix}_{m}.alpha"), vec![]));
    };
    add("lora_unet", P_K, vec![4, 32], vec![32, 4]);
    add("lora_unet", P_V2, vec![4, 32], vec![32, 4]);
    add("lora_unet", P_CONV, vec![4, 32, 3, 3], vec![32, 4, 1, 1]);
    add("lora_unet", P_PROJ, vec![4, 32, 1, 1], vec![32, 4, 1, 1]);
    add("lora_unet", P_FF, vec![4, 32], vec![256, 4]);
    add("lora_te", P_TE_Q, vec![4, 32], vec![32, 4]);
    add("lora_te", P_TE_V, vec![4, 32], vec![32, 4]);
    let refs: Vec<(&str, Vec<usize>)> = t.iter().map(|(k, s)| (k.as_str(), s.clone())).collect();
    write(dir, "kohya_parity", &refs)
}

/// A PEFT LoRA that changes one weight the kohya one changes too, and another.
fn peft_for_parity(dir: &Path) -> PathBuf {
    write(
        dir,
        "peft_parity",
        &[
            (&format!("unet.{P_K}.lora_A.weight"), vec![2, 32]),
            (&format!("unet.{P_K}.lora_B.weight"), vec![32, 2]),
            (&format!("unet.{P_FF}.lora_A.weight"), vec![2, 32]),
            (&format!("unet.{P_FF}.lora_B.weight"), vec![256, 2]),
        ],
    )
}

/// Applying merges into the right row block of fused weights (and only there); changing the set
/// between generations leaks nothing; removing restores the base weights and image bit for bit.
/// In both dtypes, with the originals kept in host memory and on the GPU.
#[test]
fn set_and_clear_loras_on_a_loaded_model() {
    let dir = scratch("apply");
    let (kohya, peft) = (kohya_for_parity(&dir), peft_for_parity(&dir));
    let gpu0 = ldm_wgpu::Gpu::new(&ldm_wgpu::GpuOptions::from_env().unwrap()).unwrap();
    let mut dtypes = vec![DType::F32];
    if gpu0.caps.shader_f16 {
        dtypes.push(DType::F16);
    }
    drop(gpu0);
    let backups = [LoraBackup::Host, LoraBackup::Gpu];
    for (dtype, backup) in dtypes.iter().flat_map(|&d| backups.map(|b| (d, b))) {
        let sd = load_parity_with(dtype, backup);
        let base_weights = weight_bytes(&sd);
        let base = render(&sd);
        let a = sd.open_lora(&kohya).unwrap();
        let b = sd.open_lora(&peft).unwrap();

        let start = std::time::Instant::now();
        let applied = sd.set_loras(&[LoraSpec::new(a.clone(), 0.8)]).unwrap();
        sd.gpu.wait().unwrap();
        eprintln!(
            "{} {backup:?}: applied {} layers in {:.1} ms, {} bytes of originals kept",
            dtype.name(),
            a.layers.len(),
            start.elapsed().as_secs_f64() * 1e3,
            sd.lora_saved_bytes()
        );
        assert_eq!(applied[0].name, "kohya_parity");
        assert_eq!(applied[0].modules[&LoraTarget::Unet], 5);
        assert_eq!(applied[0].modules[&LoraTarget::TextEncoder], 2);
        // The fused q|k|v weight: only the k rows changed, to W + 0.8·(4/4)·up·down.
        let k_key = format!("{P_K}.weight");
        let site = sd.unet.lora_sites.iter().find(|s| s.key == k_key).unwrap();
        let fused_before = to_f32(&base_weights[&site.tensor.buffer_id()], dtype);
        let fused_now = sd.gpu.download(&site.tensor).unwrap();
        let n = site.numel();
        let (lo, hi) = (site.offset, site.offset + n);
        assert_eq!((lo, hi), (32 * 32, 2 * 32 * 32));
        assert_eq!(fused_now[..lo], fused_before[..lo], "q rows changed");
        assert_eq!(fused_now[hi..], fused_before[hi..], "v rows changed");
        let layer = a.layers.iter().find(|l| l.key == k_key).unwrap();
        let want = reference_merged(&a, layer, &fused_before[lo..hi], 0.8).unwrap();
        let err = rel_l2(&fused_now[lo..hi], &want);
        let tol = if dtype == DType::F32 { 1e-6 } else { 2e-3 };
        assert!(err <= tol, "{} k rows: rel-L2 {err:.2e}", dtype.name());
        assert!(sd.lora_saved_bytes() > 0);

        let with_a = render(&sd);
        assert_ne!(with_a.1, base.1, "the LoRA changed nothing");
        // Another set, then back: the same image as the first time (nothing accumulates).
        sd.set_loras(&[
            LoraSpec::new(a.clone(), 0.8),
            LoraSpec::new(b.clone(), -1.5),
        ])
        .unwrap();
        let with_ab = render(&sd);
        assert_ne!(with_ab.1, with_a.1);
        sd.set_loras(&[LoraSpec::new(a.clone(), 0.8)]).unwrap();
        assert_eq!(render(&sd), with_a, "{}: A after A+B differs", dtype.name());

        sd.clear_loras().unwrap();
        assert!(sd.loras().is_empty());
        assert_eq!(sd.lora_saved_bytes(), 0);
        assert!(weight_bytes(&sd) == base_weights, "weights not restored");
        assert_eq!(
            render(&sd),
            base,
            "{}: base image not restored",
            dtype.name()
        );

        // A text-encoder-only weight of 0 and a U-Net weight: only the U-Net changes.
        let spec = LoraSpec {
            lora: a.clone(),
            text_encoder_weight: 0.0,
            unet_weight: 1.0,
        };
        sd.set_loras(&[spec]).unwrap();
        for s in &sd.text_encoder.as_ref().unwrap().lora_sites {
            let now = sd.gpu.download_bytes(&s.tensor).unwrap();
            assert!(
                base_weights[&s.tensor.buffer_id()] == now,
                "{} changed at weight 0",
                s.key
            );
        }
        sd.clear_loras().unwrap();
        assert!(weight_bytes(&sd) == base_weights);
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytemuck_f32(bytes),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

fn bytemuck_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

/// What `set_loras` refuses, and that a refused set leaves the applied one in place.
#[test]
fn set_loras_refuses_what_does_not_fit() {
    let dir = scratch("refuse");
    let sd = load_parity(DType::F32);
    let a = sd.open_lora(&kohya_for_parity(&dir)).unwrap();
    sd.set_loras(&[LoraSpec::new(a.clone(), 1.0)]).unwrap();
    let applied = sd.loras();
    let weights = weight_bytes(&sd);

    // Opened for another model (the shipped one, 128 channels): the shape error names the tensor.
    let uq = under(Q);
    let other = write(
        &dir,
        "other_size",
        &[
            (&format!("lora_unet_{uq}.lora_down.weight"), vec![4, 128]),
            (&format!("lora_unet_{uq}.lora_up.weight"), vec![128, 4]),
        ],
    );
    let wrong = open_lora(&other, &targets()).unwrap();
    let err = sd
        .set_loras(&[LoraSpec::new(a.clone(), 1.0), LoraSpec::new(wrong, 1.0)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("lora_unet_{uq}.lora_down.weight")),
        "{err}"
    );
    // A weight this model stores but no LoRA can change here (the token table): listed.
    let te = write(
        &dir,
        "token_table",
        &[
            (
                "lora_te_text_model_embeddings_token_embedding.lora_down.weight",
                vec![2, 32],
            ),
            (
                "lora_te_text_model_embeddings_token_embedding.lora_up.weight",
                vec![49408, 2],
            ),
        ],
    );
    let store = ldm_wgpu::weights::open_model(parity_model(), &Default::default()).unwrap();
    let store_targets = LoraTargets::default().with(
        LoraTarget::TextEncoder,
        store.text_encoder.as_ref().unwrap().weights.shapes(),
    );
    let table = open_lora(&te, &store_targets).unwrap();
    let err = sd
        .set_loras(&[LoraSpec::new(table, 1.0)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("embeddings.token_embedding.weight"), "{err}");
    assert!(err.contains("1 of its 1 layers"), "{err}");
    // Refused sets changed nothing.
    assert_eq!(sd.loras(), applied);
    assert!(weight_bytes(&sd) == weights);

    // Through the model's own targets: misfits, unknown modules (this model's third level has no
    // attention) and files matching nothing fail to open.
    let err = sd.open_lora(&other).unwrap_err().to_string();
    assert!(
        err.contains(&format!("lora_unet_{uq}.lora_down.weight")),
        "{err}"
    );
    let absent = "down_blocks_2_attentions_0_proj_in";
    let missing = write(
        &dir,
        "missing",
        &[
            (&format!("lora_unet_{absent}.lora_down.weight"), vec![4, 32]),
            (&format!("lora_unet_{absent}.lora_up.weight"), vec![32, 4]),
            (&format!("lora_unet_{uq}.lora_down.weight"), vec![4, 32]),
            (&format!("lora_unet_{uq}.lora_up.weight"), vec![32, 4]),
        ],
    );
    let err = sd.open_lora(&missing).unwrap_err().to_string();
    assert!(err.contains(&format!("unet:{absent}")), "{err}");
    assert!(err.contains("1 of its 2 layers"), "{err}");
    let err = sd.open_lora(&te).unwrap_err().to_string();
    assert!(err.contains("1 of its 1 layers"), "{err}");
    sd.clear_loras().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------------------------------------------ the command line

/// `--lora FILE:W` and `<lora:NAME:W>` in the prompt: both applied (and reported), the tag gone
/// from the text the encoder reads (the image is the library's with the same LoRAs and the bare
/// prompt), both recorded in the PNG's prompt the A1111 way.
#[test]
fn cli_applies_lora_files_and_prompt_tags() {
    let dir = scratch("cli");
    let lora_dir = dir.join("loras");
    std::fs::create_dir_all(&lora_dir).unwrap();
    kohya_for_parity(&lora_dir);
    let peft = peft_for_parity(&dir);
    let png = dir.join("out.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args([
            "generate", "--dtype", "f32", "-W", "64", "-H", "64", "-s", "4",
        ])
        .args(["--seed", "42", "-n", "blurry", "--no-pipeline-cache"])
        .args(["-p", "a red circle <lora:kohya_parity:0.8>"])
        .arg("-m")
        .arg(parity_model())
        .arg("--lora-dir")
        .arg(&lora_dir)
        .arg("--lora")
        .arg(format!("{}:-1.5", peft.display()))
        .arg("-o")
        .arg(&png)
        .env_remove("LDM_ADAPTER")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    for line in [
        "lora:    peft_parity weight -1.5: 2 U-Net and 0 text-encoder modules",
        "lora:    kohya_parity weight 0.8: 5 U-Net and 2 text-encoder modules",
    ] {
        assert!(stderr.contains(line), "`{line}` not in:\n{stderr}");
    }

    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let reader = decoder.read_info().unwrap();
    let params = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .unwrap();
    assert!(
        params.starts_with(
            "a red circle <lora:kohya_parity:0.8> <lora:peft_parity:-1.5>\nNegative prompt: blurry\n"
        ),
        "{params}"
    );

    // The library with the same LoRAs, in the CLI's order (files, then tags), and no tag.
    let sd = load_parity(DType::F32);
    let kohya_path = lora_dir.join("kohya_parity.safetensors");
    let hash = |p: &Path| sd.open_lora(p).unwrap().short_hash();
    let hashes = format!(
        ", Lora hashes: \"peft_parity: {}, kohya_parity: {}\",",
        hash(&peft),
        hash(&kohya_path)
    );
    assert!(params.contains(&hashes), "`{hashes}` not in {params}");
    sd.set_loras(&[
        LoraSpec::new(sd.open_lora(&peft).unwrap(), -1.5),
        LoraSpec::new(sd.open_lora(&kohya_path).unwrap(), 0.8),
    ])
    .unwrap();
    let (want, _) = render(&sd);
    let got = ldm_wgpu::image::Image::load_png(&png).unwrap();
    assert!(got.rgb == want, "the CLI's image is not the library's");
    std::fs::remove_dir_all(&dir).ok();
}

/// The short hash of a LoRA file opened for the parity model.
fn sd_short_hash(path: &Path) -> String {
    let store = ldm_wgpu::weights::open_model(parity_model(), &Default::default()).unwrap();
    let targets = LoraTargets::default()
        .with(LoraTarget::Unet, store.unet.weights.shapes())
        .with(
            LoraTarget::TextEncoder,
            store.text_encoder.as_ref().unwrap().weights.shapes(),
        );
    open_lora(path, &targets).unwrap().short_hash()
}

/// SHA-256 against FIPS 180-4's examples, and A1111's short LoRA hash against Python's hashlib
/// on a fixture file (`sha256(data after the header)[:12]`, computed by hand with hashlib).
#[test]
fn lora_file_hashes_are_a1111s() {
    use ldm_wgpu::util::sha256_hex;
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
    assert_eq!(
        sha256_hex(&[b'a'; 1000]),
        "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
    );
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora_parity");
    assert_eq!(
        sd_short_hash(&fixtures.join("kohya_style.safetensors")),
        "140a3035be2c"
    );
    assert_eq!(
        sd_short_hash(&fixtures.join("peft_detail.safetensors")),
        "83d92de2b4c2"
    );
}

// ------------------------------------------------------------------ parity with diffusers

/// tests/fixtures/lora_parity, made by tools/make_lora_fixtures.py: for the SD 1.x parity model
/// (PNDM) and a tiny SD 2.x one (linear projections, gelu text encoder, v-prediction DDIM), a
/// kohya LoRA (every attention and feed-forward linear, proj_in/proj_out, a LoCon 3×3 conv, a
/// 1×1 shortcut, a time_emb_proj, every text-encoder linear; per-layer ranks under one alpha)
/// and a PEFT one (q and v only, no alpha), applied by diffusers' `load_lora_weights` +
/// `set_adapters` in f32 on the CPU, alone (one at a negative weight) and together.
///
/// Bounds as tests/pipeline.rs: image PSNR >= 40 dB (the bound; the script measures each
/// case 18..30 dB from no LoRA, 18..26 dB from its U-Net part alone and, both together, 18..24 dB
/// from the kohya LoRA alone, so a LoRA or a part of one left out fails by far; measured here
/// 84 dB to identical), final latents rel-L2 <= 1e-3 (f32 on both sides: what is left is
/// summation order, the merged weight against PEFT's unmerged low-rank branch included; measured
/// ~2.5e-6).
#[test]
fn lora_parity_with_diffusers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("tests/fixtures/lora_parity");
    let settings: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("cases.json"))
            .expect("tests/fixtures/lora_parity/cases.json (run tools/make_lora_fixtures.py)"),
    )
    .unwrap();
    let s = &settings;
    let mut failures = Vec::new();
    for model in s["models"].as_array().unwrap() {
        let gpu = ldm_wgpu::Gpu::new(&ldm_wgpu::GpuOptions::from_env().unwrap()).unwrap();
        let opts = ModelOptions {
            dtype: Some(DType::F32),
            vae_f32: Some(true),
            ..Default::default()
        };
        // No tokenizer folder in either: the shipped CLIP tokenizer (SD 2.x: padding with "!").
        let sd = StableDiffusion::load(gpu, &root.join(model["model"].as_str().unwrap()), &opts)
            .unwrap();
        let req = GenerateRequest {
            prompt: s["prompt"].as_str().unwrap().into(),
            negative_prompt: s["negative_prompt"].as_str().unwrap().into(),
            width: s["width"].as_u64().unwrap() as usize,
            height: s["height"].as_u64().unwrap() as usize,
            steps: s["steps"].as_u64().unwrap() as usize,
            guidance_scale: s["guidance_scale"].as_f64().unwrap(),
            seed: s["seed"].as_u64().unwrap(),
            sampler: Some(model["sampler"].as_str().unwrap().parse().unwrap()),
            ..Default::default()
        };
        for case in model["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let specs: Vec<LoraSpec> = case["loras"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    let path = fixtures.join(l["file"].as_str().unwrap());
                    LoraSpec::new(
                        sd.open_lora(&path).unwrap(),
                        l["weight"].as_f64().unwrap() as f32,
                    )
                })
                .collect();
            sd.set_loras(&specs).unwrap();
            let out = sd.generate(&req, &mut |_| true).unwrap();
            let image = fixtures.join(case["image"].as_str().unwrap());
            let want = ldm_wgpu::image::Image::load_png(&image).unwrap();
            let psnr = common::psnr_rgb8(&out.images[0].rgb, &want.rgb);
            let latents = fixtures.join(case["latents"].as_str().unwrap());
            let want_latents: Vec<f64> = bytemuck_f32(&std::fs::read(latents).unwrap())
                .iter()
                .map(|&x| x as f64)
                .collect();
            let rel = rel_l2(&nhwc_to_nchw(&out.latents, [1, 4, 8, 8]), &want_latents);
            eprintln!("{name}: PSNR {psnr:.1} dB, latents rel-L2 {rel:.2e}");
            if psnr < 40.0 || rel > 1e-3 {
                failures.push(format!("{name}: {psnr:.1} dB, rel-L2 {rel:.2e}"));
            }
        }
        sd.clear_loras().unwrap();
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// NHWC [B, h, w, C] -> NCHW [B, C, h, w] (`shape` in NCHW), torch's layout.
fn nhwc_to_nchw(x: &[f32], shape: [usize; 4]) -> Vec<f32> {
    let [b, c, h, w] = shape;
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for yi in 0..h {
            for xi in 0..w {
                for ci in 0..c {
                    out[((bi * c + ci) * h + yi) * w + xi] = x[((bi * h + yi) * w + xi) * c + ci];
                }
            }
        }
    }
    out
}

/// Where `<lora:NAME>` looks without `--lora-dir`: `loras/` inside the model folder when there
/// is one, else the current directory.
#[test]
fn cli_default_lora_dir() {
    let dir = scratch("cli-dir");
    // A copy of the parity model with a loras/ folder in it.
    let model = dir.join("model");
    for sub in ["unet", "vae", "text_encoder", "scheduler"] {
        std::fs::create_dir_all(model.join(sub)).unwrap();
        for f in std::fs::read_dir(parity_model().join(sub)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, model.join(sub).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir_all(model.join("loras")).unwrap();
    kohya_for_parity(&model.join("loras"));
    let cwd = dir.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    peft_for_parity(&cwd);
    let run = |model: &Path, prompt: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ldm"))
            .args([
                "generate", "--dtype", "f32", "-W", "64", "-H", "64", "-s", "1",
            ])
            .args(["--no-pipeline-cache", "-p", prompt, "-o", "out.png"])
            .arg("-m")
            .arg(model)
            .current_dir(&cwd)
            .env_remove("LDM_ADAPTER")
            .output()
            .unwrap()
    };
    // loras/ beside the model: found there, and only there.
    let o = run(&model, "x <lora:kohya_parity:0.5>");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("lora:    kohya_parity weight 0.5"), "{err}");
    let o = run(&model, "x <lora:peft_parity>");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("loras/peft_parity.safetensors"), "{err}");
    // A model without loras/ (the fixture itself): the current directory.
    let o = run(&parity_model(), "x <lora:peft_parity>");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("lora:    peft_parity weight 1"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
