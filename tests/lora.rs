//! LoRA files in every format we read, matched to the shipped model's weights: which layers,
//! which tensors, which scale; and the files that must be refused, with what the error says.

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
        .with(LoraTarget::TextEncoder, model.text_encoder.weights.shapes())
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
