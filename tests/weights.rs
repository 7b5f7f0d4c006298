//! Weight loading: single-file LDM checkpoints vs diffusers folders, config inference, errors.
//!
//! Fixtures: tests/fixtures/weights/, made by tools/make_weight_fixtures.py (tiny random SD1-
//! and SD2-like models saved as diffusers folders in f32 and as single LDM files in f16, with
//! every value exactly representable in f16; plus real SD 1.5 / 2.1 key->shape maps).

use ldm_wgpu::weights::rename::{self, InferHints, ModelFamily};
use ldm_wgpu::weights::{
    open_diffusers_folder, open_model, open_single_file, LoadOptions, PipelineWeights,
    PredictionType, SafetensorsFile, SourceDType, SourceLayout, Variant, WeightError, WeightStore,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights")
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ldm_wgpu_weights_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A safetensors file from (name, dtype, shape, bytes), written by hand.
fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// Single file == diffusers folder
// ---------------------------------------------------------------------------------------------

fn assert_same_tensors(what: &str, folder: &WeightStore, single: &WeightStore) {
    let fk: Vec<&str> = folder.keys().collect();
    let sk: Vec<&str> = single.keys().collect();
    let only_f: Vec<_> = fk.iter().filter(|k| !single.contains(k)).collect();
    let only_s: Vec<_> = sk.iter().filter(|k| !folder.contains(k)).collect();
    assert!(
        only_f.is_empty() && only_s.is_empty(),
        "{what}: only in folder {only_f:?}, only in single file {only_s:?}"
    );
    for key in fk {
        let a = folder.get_any(key).unwrap();
        let b = single
            .get(key, &a.shape)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(a.dtype, SourceDType::F32, "{key}");
        assert_eq!(b.dtype, SourceDType::F16, "{key}");
        let (va, vb) = (a.to_f32_vec(), b.to_f32_vec());
        assert_eq!(va.len(), a.numel());
        assert!(
            va == vb,
            "{what}: `{key}` differs between folder and single file"
        );
        // and the f16 path agrees with the f32 one
        let ha: Vec<f32> = a.to_f16_vec().iter().map(|h| h.to_f32()).collect();
        assert!(ha == vb, "{what}: `{key}` f16 conversion differs");
    }
    folder.check_all_used().unwrap();
    single.check_all_used().unwrap();
}

fn open_pair(name: &str) -> (PipelineWeights, PipelineWeights) {
    let opts = LoadOptions::default();
    let folder = open_model(fixtures().join(name), &opts).unwrap();
    let single = open_model(fixtures().join(format!("{name}.ckpt.safetensors")), &opts).unwrap();
    assert_eq!(folder.layout, SourceLayout::DiffusersFolder);
    assert_eq!(single.layout, SourceLayout::SingleFile);
    (folder, single)
}

fn check_pair(name: &str, family: ModelFamily) -> (PipelineWeights, PipelineWeights) {
    let (folder, single) = open_pair(name);
    assert_same_tensors(
        &format!("{name} unet"),
        &folder.unet.weights,
        &single.unet.weights,
    );
    assert_same_tensors(
        &format!("{name} vae"),
        &folder.vae.weights,
        &single.vae.weights,
    );
    assert_same_tensors(
        &format!("{name} text_encoder"),
        &folder.text_encoder.as_ref().unwrap().weights,
        &single.text_encoder.as_ref().unwrap().weights,
    );
    assert_eq!(folder.family, family);
    assert_eq!(single.family, family);
    assert!(
        single.unrecognized_keys.is_empty(),
        "{:?}",
        single.unrecognized_keys
    );
    (folder, single)
}

#[test]
fn sd1_single_file_equals_folder() {
    let (_, single) = check_pair("sd1-tiny", ModelFamily::Sd1);
    let ignored: Vec<&str> = single
        .ignored_keys
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert!(ignored.contains(&"betas"), "{ignored:?}");
    assert_eq!(single.scheduler_config["prediction_type"], "epsilon");
}

#[test]
fn sd2_single_file_equals_folder() {
    let (_, single) = check_pair("sd2-tiny", ModelFamily::Sd2);
    let ignored: Vec<&str> = single
        .ignored_keys
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    // the final OpenCLIP layer (SD 2.x uses the penultimate one) and the projection are dropped
    assert!(
        ignored.contains(&"cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"),
        "{ignored:?}"
    );
    assert!(
        ignored.contains(&"cond_stage_model.model.text_projection"),
        "{ignored:?}"
    );
    // fused q/k/v is presented as three [C, C] views of the same mapped bytes
    let q = single
        .text_encoder
        .as_ref()
        .unwrap()
        .weights
        .get(
            "text_model.encoder.layers.1.self_attn.q_proj.weight",
            &[32, 32],
        )
        .unwrap();
    let v = single
        .text_encoder
        .as_ref()
        .unwrap()
        .weights
        .get("text_model.encoder.layers.1.self_attn.v_proj.bias", &[32])
        .unwrap();
    assert_eq!((q.bytes.len(), v.bytes.len()), (32 * 32 * 2, 32 * 2));
    // diffusers' single-file default for "v2" checkpoints; the user can say otherwise
    assert_eq!(single.scheduler_config["prediction_type"], "v_prediction");
    let opts = LoadOptions {
        prediction_type: Some(PredictionType::Epsilon),
        ..Default::default()
    };
    let base = open_single_file(fixtures().join("sd2-tiny.ckpt.safetensors"), &opts).unwrap();
    assert_eq!(base.scheduler_config["prediction_type"], "epsilon");
}

#[test]
fn vae_attention_is_presented_as_linear() {
    let single = open_single_file(
        fixtures().join("sd1-tiny.ckpt.safetensors"),
        &LoadOptions::default(),
    )
    .unwrap();
    let w = &single.vae.weights;
    let e = w
        .entry("decoder.mid_block.attentions.0.to_q.weight")
        .unwrap();
    assert_eq!(
        e.source_key,
        "first_stage_model.decoder.mid.attn_1.q.weight"
    );
    assert_eq!(
        single.vae.weights.files()[0]
            .info(&e.source_key)
            .unwrap()
            .shape,
        vec![32, 32, 1, 1]
    );
    assert_eq!(
        w.shape("decoder.mid_block.attentions.0.to_q.weight"),
        Some(vec![32, 32])
    );
    assert_eq!(
        w.shape("decoder.mid_block.attentions.0.to_out.0.weight"),
        Some(vec![32, 32])
    );
}

// ---------------------------------------------------------------------------------------------
// Config inference
// ---------------------------------------------------------------------------------------------

fn assert_keys_equal(what: &str, inferred: &Value, reference: &Value, keys: &[&str]) {
    for k in keys {
        // diffusers writes tuples as lists and ints as ints: compare as JSON
        let (a, b) = (&inferred[*k], &reference[*k]);
        let same = a == b || (a.as_f64().is_some() && a.as_f64() == b.as_f64());
        assert!(
            same,
            "{what}: `{k}` inferred {a}, diffusers config.json has {b}"
        );
    }
}

const UNET_KEYS: &[&str] = &[
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "cross_attention_dim",
    "use_linear_projection",
    "transformer_layers_per_block",
];
const VAE_KEYS: &[&str] = &[
    "in_channels",
    "out_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
];
const TEXT_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "max_position_embeddings",
    "num_hidden_layers",
    "hidden_act",
];

#[test]
fn inferred_configs_match_tiny_fixtures() {
    for name in ["sd1-tiny", "sd2-tiny"] {
        let (folder, single) = open_pair(name);
        assert!(single.unet.config_inferred && !folder.unet.config_inferred);
        assert_keys_equal(
            &format!("{name} unet"),
            &single.unet.config,
            &folder.unet.config,
            UNET_KEYS,
        );
        assert_keys_equal(
            &format!("{name} vae"),
            &single.vae.config,
            &folder.vae.config,
            VAE_KEYS,
        );
        assert_keys_equal(
            &format!("{name} text"),
            &single.text_encoder.as_ref().unwrap().config,
            &folder.text_encoder.as_ref().unwrap().config,
            TEXT_KEYS,
        );
        // every key the inferred config has, diffusers' config.json has too
        for (c, f) in [
            (&single.unet, &folder.unet),
            (&single.vae, &folder.vae),
            (
                single.text_encoder.as_ref().unwrap(),
                folder.text_encoder.as_ref().unwrap(),
            ),
        ] {
            for k in c.config.as_object().unwrap().keys() {
                assert!(
                    f.config.get(k).is_some(),
                    "{name}: inferred key `{k}` is not a diffusers config key"
                );
            }
        }
    }
    // what the weights cannot say (tiny head counts, group counts) comes in as overrides
    let mut opts = LoadOptions::default();
    opts.unet_overrides
        .insert("attention_head_dim".into(), json!([2, 4]));
    opts.unet_overrides
        .insert("norm_num_groups".into(), json!(8));
    opts.text_encoder_overrides
        .insert("num_attention_heads".into(), json!(2));
    let single = open_single_file(fixtures().join("sd2-tiny.ckpt.safetensors"), &opts).unwrap();
    let folder =
        open_diffusers_folder(fixtures().join("sd2-tiny"), &LoadOptions::default()).unwrap();
    assert_keys_equal(
        "sd2-tiny overrides",
        &single.unet.config,
        &folder.unet.config,
        &["attention_head_dim", "norm_num_groups"],
    );
    assert_keys_equal(
        "sd2-tiny overrides",
        &single.text_encoder.as_ref().unwrap().config,
        &folder.text_encoder.as_ref().unwrap().config,
        &["num_attention_heads"],
    );
}

/// Real SD 1.5 / 2.1 architectures as key->shape maps (no weights): the renaming must produce
/// exactly diffusers' keys and shapes, and inference diffusers' configs, at real size.
fn check_real(name: &str, family: ModelFamily) {
    let text =
        std::fs::read_to_string(fixtures().join(format!("{name}-real.shapes.json"))).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let to_map = |v: &Value| -> BTreeMap<String, Vec<usize>> {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    s.as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap() as usize)
                        .collect(),
                )
            })
            .collect()
    };
    let stored = to_map(&doc["ldm_shapes"]);
    let plan = rename::plan_single_file(&stored).unwrap();
    assert!(plan.unrecognized.is_empty(), "{:?}", plan.unrecognized);
    let present = |m: &BTreeMap<String, rename::Renamed>| -> BTreeMap<String, Vec<usize>> {
        m.iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    r.transform.apply_shape(&stored[&r.source_key]).unwrap(),
                )
            })
            .collect()
    };
    let parts = [
        ("unet", &plan.unet),
        ("vae", &plan.vae),
        ("text_encoder", &plan.text_encoder),
    ];
    let mut shapes = BTreeMap::new();
    for (part, map) in parts {
        let got = present(map);
        let want = to_map(&doc["diffusers_shapes"][part]);
        for (k, s) in &want {
            assert_eq!(got.get(k), Some(s), "{name} {part}: `{k}`");
        }
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(extra.is_empty(), "{name} {part}: unexpected {extra:?}");
        shapes.insert(part, got);
    }
    assert_eq!(plan.family(&shapes["unet"]), family);
    let hints = InferHints::default();
    let configs = &doc["configs"];
    let unet = rename::infer_unet_config(&shapes["unet"], family, &hints).unwrap();
    let more = [
        "attention_head_dim",
        "sample_size",
        "upcast_attention",
        "norm_num_groups",
    ];
    assert_keys_equal(name, &unet, &configs["unet"], &[UNET_KEYS, &more].concat());
    let vae = rename::infer_vae_config(&shapes["vae"], family, &hints).unwrap();
    assert_keys_equal(
        name,
        &vae,
        &configs["vae"],
        &[
            VAE_KEYS,
            &["sample_size", "scaling_factor", "norm_num_groups"],
        ]
        .concat(),
    );
    let text = rename::infer_text_encoder_config(&shapes["text_encoder"], family).unwrap();
    assert_keys_equal(
        name,
        &text,
        &configs["text_encoder"],
        &[TEXT_KEYS, &["num_attention_heads", "layer_norm_eps"]].concat(),
    );
}

#[test]
fn real_sd15_shapes_rename_and_infer() {
    check_real("sd15", ModelFamily::Sd1);
}

#[test]
fn real_sd21_shapes_rename_and_infer() {
    check_real("sd21", ModelFamily::Sd2);
}

// ---------------------------------------------------------------------------------------------
// Store API and errors
// ---------------------------------------------------------------------------------------------

#[test]
fn prefixed_views_and_shape_errors() {
    let folder =
        open_diffusers_folder(fixtures().join("sd1-tiny"), &LoadOptions::default()).unwrap();
    let unet = &folder.unet.weights;
    let resnet = unet.pp("down_blocks.0").pp("resnets.0");
    let w = resnet.get("conv1.weight", &[16, 16, 3, 3]).unwrap();
    assert_eq!(w.to_f32_vec().len(), 16 * 16 * 9);
    assert!(resnet
        .get_opt("conv_shortcut.weight", &[16, 16, 1, 1])
        .unwrap()
        .is_none());

    match resnet.get("conv1.weight", &[16, 16, 1, 1]) {
        Err(WeightError::Shape {
            key,
            expected,
            found,
            ..
        }) => {
            assert_eq!(key, "down_blocks.0.resnets.0.conv1.weight");
            assert_eq!((expected, found), (vec![16, 16, 1, 1], vec![16, 16, 3, 3]));
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    match resnet.get("conv3.weight", &[1]) {
        Err(e @ WeightError::Missing { .. }) => {
            let WeightError::Missing {
                ref key,
                ref nearest,
                ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(key, "down_blocks.0.resnets.0.conv3.weight");
            assert!(nearest
                .as_deref()
                .unwrap()
                .starts_with("down_blocks.0.resnets.0.conv"));
            assert!(e
                .to_string()
                .contains("down_blocks.0.resnets.0.conv3.weight"));
            assert!(e.hint().is_some());
        }
        other => panic!("expected a missing-key error, got {other:?}"),
    }
    // a wrong shape is an error even through get_opt
    assert!(resnet.get_opt("conv1.weight", &[1]).is_err());
    // a fresh store reports what nobody asked for
    let single = open_single_file(
        fixtures().join("sd1-tiny.ckpt.safetensors"),
        &LoadOptions::default(),
    )
    .unwrap();
    single
        .vae
        .weights
        .pp("decoder")
        .get("conv_in.weight", &[32, 4, 3, 3])
        .unwrap();
    let unused = single.vae.weights.unused_keys();
    assert!(!unused.contains(&"decoder.conv_in.weight".to_string()));
    assert!(unused.contains(&"decoder.conv_in.bias".to_string()));
    let err = single.vae.weights.check_all_used().unwrap_err();
    assert!(matches!(err, WeightError::Unused { .. }), "{err}");
    // and the crate error keeps the message
    let top: ldm_wgpu::Error = err.into();
    assert!(top.to_string().contains("unused"), "{top}");
}

fn open_err(path: &Path) -> WeightError {
    match SafetensorsFile::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => {
            let _ = (e.to_string(), e.hint()); // Display never panics
            e
        }
    }
}

#[test]
fn bad_files_are_errors_not_panics() {
    let dir = scratch_dir("bad");
    let good = std::fs::read(fixtures().join("sd1-tiny.ckpt.safetensors")).unwrap();

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &good[..good.len() - 100]).unwrap();
    assert!(matches!(
        open_err(&truncated),
        WeightError::Malformed { .. }
    ));
    let e = open_model(&truncated, &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");

    let trailing = dir.join("trailing.safetensors");
    std::fs::write(&trailing, [good.as_slice(), b"xx"].concat()).unwrap();
    assert!(matches!(open_err(&trailing), WeightError::Malformed { .. }));

    let cut_header = dir.join("cut_header.safetensors");
    std::fs::write(&cut_header, &good[..200]).unwrap();
    assert!(matches!(
        open_err(&cut_header),
        WeightError::Malformed { .. }
    ));

    let garbage = dir.join("garbage.safetensors");
    let mut bytes = 20u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"this is not json!!!!");
    std::fs::write(&garbage, &bytes).unwrap();
    assert!(matches!(open_err(&garbage), WeightError::Malformed { .. }));

    let huge = dir.join("huge_header.safetensors");
    std::fs::write(&huge, u64::MAX.to_le_bytes()).unwrap();
    assert!(matches!(open_err(&huge), WeightError::Malformed { .. }));

    let bad_offsets = dir.join("bad_offsets.safetensors");
    let header = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 8]);
    std::fs::write(&bad_offsets, &bytes).unwrap();
    assert!(matches!(
        open_err(&bad_offsets),
        WeightError::Malformed { .. }
    ));

    let tiny = dir.join("tiny.safetensors");
    std::fs::write(&tiny, b"abc").unwrap();
    assert!(matches!(open_err(&tiny), WeightError::Malformed { .. }));
    let empty = dir.join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(open_err(&empty), WeightError::Malformed { .. }));

    let pickle = dir.join("model.safetensors");
    std::fs::write(&pickle, b"PK\x03\x04archive/data.pkl......").unwrap();
    assert!(matches!(open_err(&pickle), WeightError::Unsupported { .. }));
    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04").unwrap();
    assert!(matches!(
        open_model(&ckpt, &LoadOptions::default()),
        Err(WeightError::Unsupported { .. })
    ));

    assert!(matches!(
        open_err(&dir.join("absent.safetensors")),
        WeightError::NotFound { .. }
    ));
    assert!(matches!(
        open_model(dir.join("absent"), &LoadOptions::default()),
        Err(WeightError::NotFound { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dtypes_convert_and_unknown_dtypes_error() {
    let dir = scratch_dir("dtypes");
    let path = dir.join("t.safetensors");
    let vals = [1.0f32, -2.5, 0.15625, 65504.0];
    let bf: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let f16b: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    write_safetensors(
        &path,
        &[
            ("a_bf16", "BF16", vec![2, 2], bf),
            ("b_f16", "F16", vec![4], f16b),
            ("c_f32", "F32", vec![4], f32_bytes(&vals)),
            ("d_i64", "I64", vec![2], vec![0; 16]),
            // odd offset: the next tensor's data is not aligned to its element size
            ("e_u8", "U8", vec![1], vec![7]),
            ("f_f32", "F32", vec![2], f32_bytes(&[3.0, 4.0])),
        ],
    );
    let store = WeightStore::from_files(
        "test",
        vec![Arc::new(SafetensorsFile::open(&path).unwrap())],
    )
    .unwrap();
    let bf = store.get("a_bf16", &[2, 2]).unwrap();
    assert_eq!(bf.dtype, SourceDType::BF16);
    assert_eq!(bf.to_f32_vec(), vec![1.0, -2.5, 0.15625, 65536.0]); // bf16 rounds 65504 up
    assert_eq!(
        store.get("b_f16", &[4]).unwrap().to_f32_vec(),
        vals.to_vec()
    );
    let c = store.get("c_f32", &[4]).unwrap();
    assert_eq!(
        c.to_f16_vec()
            .iter()
            .map(|h| h.to_f32())
            .collect::<Vec<_>>(),
        vals.to_vec()
    );
    assert_eq!(
        store.get("f_f32", &[2]).unwrap().to_f32_vec(),
        vec![3.0, 4.0]
    );
    match store.get("d_i64", &[2]) {
        Err(WeightError::DType { key, found }) => {
            assert_eq!((key.as_str(), found.as_str()), ("d_i64", "I64"))
        }
        other => panic!("expected a dtype error, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sdxl_refiner_and_non_ldm_files_are_refused() {
    let dir = scratch_dir("sdxl");
    let path = dir.join("sdxl.safetensors");
    // the SDXL refiner: OpenCLIP bigG alone, in slot 0 (SDXL base files are read: tests/sdxl.rs)
    write_safetensors(
        &path,
        &[
            (
                "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias",
                "F32",
                vec![1],
                f32_bytes(&[0.0]),
            ),
            (
                "model.diffusion_model.input_blocks.0.0.weight",
                "F32",
                vec![1],
                f32_bytes(&[0.0]),
            ),
        ],
    );
    match open_model(&path, &LoadOptions::default()) {
        Err(e @ WeightError::Unsupported { .. }) => {
            assert!(e.to_string().contains("SDXL refiner"), "{e}")
        }
        other => panic!("expected unsupported, got {other:?}"),
    }
    // a diffusers component file is not a single-file checkpoint
    let unet_file = fixtures().join("sd1-tiny/unet/diffusion_pytorch_model.safetensors");
    assert!(matches!(
        open_single_file(unet_file, &LoadOptions::default()),
        Err(WeightError::Config { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

fn copy_dir(from: &Path, to: &Path, rename_weights: impl Fn(&str) -> Option<String>) {
    for sub in ["unet", "vae", "text_encoder"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for e in std::fs::read_dir(from.join(sub)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let target = if name.ends_with(".safetensors") {
                rename_weights(&name)
            } else {
                Some(name.clone())
            };
            if let Some(t) = target {
                std::fs::copy(from.join(sub).join(&name), to.join(sub).join(t)).unwrap();
            }
        }
    }
}

#[test]
fn folder_variants_pickles_and_missing_parts() {
    let src = fixtures().join("sd1-tiny");
    let opts = |variant| LoadOptions {
        variant,
        ..Default::default()
    };

    // only fp16-variant files: Auto falls back to them, Plain refuses with a hint
    let fp16 = scratch_dir("fp16");
    copy_dir(&src, &fp16, |n| {
        Some(n.replace(".safetensors", ".fp16.safetensors"))
    });
    let w = open_diffusers_folder(&fp16, &opts(Variant::Auto)).unwrap();
    assert!(w.unet.weights.files()[0]
        .path()
        .ends_with("unet/diffusion_pytorch_model.fp16.safetensors"));
    open_diffusers_folder(&fp16, &opts(Variant::Fp16)).unwrap();
    match open_diffusers_folder(&fp16, &opts(Variant::Plain)) {
        Err(e @ WeightError::NotFound { .. }) => assert!(e.hint().unwrap().contains("fp16"), "{e}"),
        other => panic!("expected not found, got {other:?}"),
    }

    // both present: Auto prefers the plain file
    let both = scratch_dir("both");
    copy_dir(&src, &both, |n| Some(n.to_string()));
    copy_dir(&src, &both, |n| {
        Some(n.replace(".safetensors", ".fp16.safetensors"))
    });
    let w = open_diffusers_folder(&both, &opts(Variant::Auto)).unwrap();
    assert!(w.vae.weights.files()[0]
        .path()
        .ends_with("vae/diffusion_pytorch_model.safetensors"));
    let w = open_diffusers_folder(&both, &opts(Variant::Fp16)).unwrap();
    assert!(w.vae.weights.files()[0]
        .path()
        .ends_with("vae/diffusion_pytorch_model.fp16.safetensors"));

    // sharded: an index.json naming two shard files
    let sharded = scratch_dir("sharded");
    copy_dir(&src, &sharded, |n| Some(n.to_string()));
    let unet_dir = sharded.join("unet");
    let whole =
        SafetensorsFile::open(unet_dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let names: Vec<String> = whole.names().map(String::from).collect();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let tensors: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|n| {
                let t = whole.tensor(n).unwrap();
                (n.as_str(), "F32", t.shape.clone(), t.bytes.to_vec())
            })
            .collect();
        write_safetensors(&unet_dir.join(&file), &tensors);
        for n in chunk {
            weight_map.insert(n.clone(), json!(file));
        }
    }
    std::fs::remove_file(unet_dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(
        unet_dir.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::to_string(&json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    let w = open_diffusers_folder(&sharded, &opts(Variant::Auto)).unwrap();
    assert_eq!(w.unet.weights.files().len(), 2);
    assert_eq!(w.unet.weights.len(), names.len());
    let reference = open_diffusers_folder(&src, &opts(Variant::Auto)).unwrap();
    for k in &names {
        assert_eq!(
            w.unet.weights.get_any(k).unwrap().to_f32_vec(),
            reference.unet.weights.get_any(k).unwrap().to_f32_vec()
        );
    }

    // pickles only
    let pickles = scratch_dir("pickles");
    copy_dir(&src, &pickles, |n| {
        if n.starts_with("model") {
            Some("pytorch_model.bin".into())
        } else {
            Some(n.into())
        }
    });
    match open_diffusers_folder(&pickles, &opts(Variant::Auto)) {
        Err(e @ WeightError::Unsupported { .. }) => {
            assert!(e.to_string().contains("pytorch_model.bin"), "{e}");
            assert!(e.hint().unwrap().contains("safetensors"), "{e}");
        }
        other => panic!("expected unsupported, got {other:?}"),
    }

    // a missing component folder
    let partial = scratch_dir("partial");
    copy_dir(&src, &partial, |n| Some(n.to_string()));
    std::fs::remove_dir_all(partial.join("vae")).unwrap();
    match open_diffusers_folder(&partial, &opts(Variant::Auto)) {
        Err(e @ WeightError::NotFound { .. }) => assert!(e.to_string().contains("vae"), "{e}"),
        other => panic!("expected not found, got {other:?}"),
    }

    // no config.json: inferred from the shapes
    let noconf = scratch_dir("noconf");
    copy_dir(&src, &noconf, |n| Some(n.to_string()));
    std::fs::remove_file(noconf.join("vae/config.json")).unwrap();
    let w = open_diffusers_folder(&noconf, &opts(Variant::Auto)).unwrap();
    assert!(w.vae.config_inferred);
    assert_keys_equal(
        "vae without config.json",
        &w.vae.config,
        &reference.vae.config,
        VAE_KEYS,
    );

    for d in [fp16, both, sharded, pickles, partial, noconf] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn text_encoder_keys_have_text_model_prefix_in_both_layouts() {
    let (folder, single) = open_pair("sd1-tiny");
    for c in [&folder.text_encoder, &single.text_encoder].map(|c| c.as_ref().unwrap()) {
        assert!(c.weights.keys().all(|k| k.starts_with("text_model.")));
        assert!(c.weights.contains("text_model.final_layer_norm.weight"));
        assert!(!c.weights.keys().any(|k| k.ends_with("position_ids")));
    }
}
