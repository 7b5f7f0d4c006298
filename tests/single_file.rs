//! A single-file LDM checkpoint runs exactly like the diffusers folder it was converted from.
//!
//! Fixtures: tests/fixtures/weights/{sd1-tiny,sd2-tiny} (diffusers folders, f32) and
//! `<name>.ckpt.safetensors` (the same weights under LDM keys, stored in f16), made by
//! tools/make_weight_fixtures.py with every value exactly representable in f16. tests/weights.rs
//! checks that the two layouts give the same tensors under the same names; this file checks the
//! rest of the path: configs inferred from tensor shapes (plus the overrides the shapes cannot
//! give) and the models built from them. Each model runs on the same random inputs from both
//! layouts, and the outputs must be bit-identical: same values, same config, same kernels on the
//! same adapter. A difference would mean a config key inferred differently, a transform (the
//! VAE attention's 1x1 convs presented as linears) not applied, or a tensor bound to the wrong
//! layer.

mod common;

use common::*;
use ldm_wgpu::models::clip::{ClipConfig, ClipTextModel};
use ldm_wgpu::models::unet::{UNet2DConditionModel, UNetConfig};
use ldm_wgpu::models::vae::{AutoencoderKL, VaeConfig};
use ldm_wgpu::weights::{open_model, LoadOptions, PipelineWeights, SourceLayout};
use ldm_wgpu::{DType, Tensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights")
}

/// What the tiny single files' shapes cannot say, as a user would pass it: the head counts
/// (diffusers' `attention_head_dim`, which holds head counts), the group-norm group count (8
/// here, 32 in every real SD) and the training resolution (16 px, a latent of 8 through the
/// tiny VAEs' factor 2). Real checkpoints need none of these.
fn single_file_options(unet_heads: Value) -> LoadOptions {
    let mut opts = LoadOptions {
        image_size: Some(16),
        ..LoadOptions::default()
    };
    opts.unet_overrides
        .insert("attention_head_dim".into(), unet_heads);
    opts.unet_overrides
        .insert("norm_num_groups".into(), json!(8));
    // src/weights/rename.rs infers the U-Net's sample_size as image_size / 8 (right for every
    // real SD VAE); diffusers divides by the VAE's own factor, 2 for these two-level tiny VAEs.
    opts.unet_overrides.insert("sample_size".into(), json!(8));
    opts.vae_overrides
        .insert("norm_num_groups".into(), json!(8));
    opts.text_encoder_overrides
        .insert("num_attention_heads".into(), json!(2));
    // unused by CLIPTextModel (only SDXL's second encoder projects); the folders' value, so that
    // the configs compare equal
    opts.text_encoder_overrides
        .insert("projection_dim".into(), json!(32));
    opts
}

/// (diffusers folder, single file) for one tiny model.
fn open_both(name: &str, unet_heads: Value) -> (PipelineWeights, PipelineWeights) {
    let folder = open_model(fixtures().join(name), &LoadOptions::default()).unwrap();
    let single = open_model(
        fixtures().join(format!("{name}.ckpt.safetensors")),
        &single_file_options(unet_heads),
    )
    .unwrap();
    assert_eq!(folder.layout, SourceLayout::DiffusersFolder);
    assert_eq!(single.layout, SourceLayout::SingleFile);
    assert!(single.unet.config_inferred && !folder.unet.config_inferred);
    (folder, single)
}

/// The parsed configs must agree field by field (the configs have no PartialEq; Debug shows
/// every field).
fn assert_same_config<T: std::fmt::Debug>(what: &str, folder: &T, single: &T) {
    let (f, s) = (format!("{folder:#?}"), format!("{single:#?}"));
    assert!(
        f == s,
        "{what}: configs differ\nfolder: {f}\nsingle file: {s}"
    );
}

/// Downloads both and asserts equal bit patterns (so -0.0 vs 0.0 or NaN would show too).
fn assert_bit_identical(what: &str, dtype: DType, folder: &Tensor, single: &Tensor) {
    let (f, s) = (
        gpu().download(folder).unwrap(),
        gpu().download(single).unwrap(),
    );
    assert_eq!(folder.shape(), single.shape(), "{what}");
    assert!(f.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    let differ = f
        .iter()
        .zip(&s)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let max_abs = f
        .iter()
        .zip(&s)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "{what} {}: {} values, {differ} differ (max |diff| {max_abs:.1e})",
        dtype.name(),
        f.len()
    );
    assert!(
        differ == 0,
        "{what} {}: {differ} of {} values differ between folder and single file (max |diff| {max_abs:.3e})",
        dtype.name(),
        f.len()
    );
}

fn check_text_encoder(name: &str, folder: &PipelineWeights, single: &PipelineWeights) {
    let gpu = gpu();
    let mut cf = ClipConfig::from_json(&folder.text_encoder.as_ref().unwrap().config).unwrap();
    let mut cs = ClipConfig::from_json(&single.text_encoder.as_ref().unwrap().config).unwrap();
    // `projection_dim` belongs to CLIPTextModelWithProjection (SDXL's second encoder); a
    // CLIPTextModel has no projection to use it. The tiny folders' config.json says 32 (what
    // transformers wrote), single-file inference the real models' value (768 / 512).
    (cf.projection_dim, cs.projection_dim) = (None, None);
    assert_same_config(&format!("{name} text_encoder"), &cf, &cs);
    let mut rng = Rng::new(1);
    let ids: Vec<u32> = (0..2 * 77)
        .map(|_| (rng.next_u64() % cf.vocab_size as u64) as u32)
        .collect();
    for dtype in dtypes() {
        let mf = ClipTextModel::load(
            gpu,
            &folder.text_encoder.as_ref().unwrap().weights.root(),
            cf.clone(),
            dtype,
        )
        .unwrap();
        let ms = ClipTextModel::load(
            gpu,
            &single.text_encoder.as_ref().unwrap().weights.root(),
            cs.clone(),
            dtype,
        )
        .unwrap();
        for clip_skip in [None, Some(1)] {
            let of = mf.forward(gpu, &ids, 2, clip_skip).unwrap(); // [2, 77, 32]
            let os = ms.forward(gpu, &ids, 2, clip_skip).unwrap();
            let what = format!("{name} text_encoder clip_skip={clip_skip:?}");
            assert_bit_identical(&what, dtype, &of, &os);
        }
    }
}

fn check_vae(name: &str, folder: &PipelineWeights, single: &PipelineWeights) {
    let gpu = gpu();
    let cf = VaeConfig::from_json(&folder.vae.config).unwrap();
    let cs = VaeConfig::from_json(&single.vae.config).unwrap();
    assert_same_config(&format!("{name} vae"), &cf, &cs);
    let mut rng = Rng::new(2);
    let image: Vec<f32> = (0..16 * 16 * 3)
        .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
        .collect();
    let latents = rng.normals(8 * 8 * 4, 1.0);
    for dtype in dtypes() {
        let vf =
            AutoencoderKL::load(gpu, &folder.vae.weights.root(), cf.clone(), dtype, true).unwrap();
        let vs =
            AutoencoderKL::load(gpu, &single.vae.weights.root(), cs.clone(), dtype, true).unwrap();
        let x = gpu.upload(&image, &[1, 16, 16, 3], dtype).unwrap();
        let (mf, ms) = (
            vf.encode_moments(gpu, &x).unwrap(), // [1, 8, 8, 8]: mean then logvar
            vs.encode_moments(gpu, &x).unwrap(),
        );
        assert_bit_identical(&format!("{name} vae encode"), dtype, &mf, &ms);
        let z = gpu.upload(&latents, &[1, 8, 8, 4], dtype).unwrap();
        let (df, ds) = (vf.decode(gpu, &z).unwrap(), vs.decode(gpu, &z).unwrap()); // [1, 16, 16, 3]
        assert_bit_identical(&format!("{name} vae decode"), dtype, &df, &ds);
    }
}

fn check_unet(name: &str, folder: &PipelineWeights, single: &PipelineWeights) {
    let gpu = gpu();
    let cf = UNetConfig::from_json(&folder.unet.config).unwrap();
    let cs = UNetConfig::from_json(&single.unet.config).unwrap();
    assert_same_config(&format!("{name} unet"), &cf, &cs);
    let mut rng = Rng::new(3);
    let sample = rng.normals(2 * 8 * 8 * cf.in_channels, 1.0);
    let context = rng.normals(2 * 77 * cf.cross_attention_dim, 1.0);
    // f32 only: these fixtures' weights are N(0, 0.5²) with no fan-in scaling (they test
    // loading, not numerics), so the U-Net's activations reach ~3e5 in up_blocks (measured in
    // diffusers) and overflow f16's 65504 in both layouts alike. The text encoder and VAE stay
    // finite and run in f16 too.
    for dtype in [DType::F32] {
        let uf = UNet2DConditionModel::load(gpu, &folder.unet.weights.root(), cf.clone(), dtype)
            .unwrap();
        let us = UNet2DConditionModel::load(gpu, &single.unet.weights.root(), cs.clone(), dtype)
            .unwrap();
        let x = gpu
            .upload(&sample, &[2, 8, 8, cf.in_channels], dtype)
            .unwrap();
        let ctx = gpu
            .upload(&context, &[2, 77, cf.cross_attention_dim], dtype)
            .unwrap();
        for t in [981.0, 333.25] {
            let (of, os) = (
                uf.forward(gpu, &x, t, &ctx).unwrap(), // [2, 8, 8, 4]
                us.forward(gpu, &x, t, &ctx).unwrap(),
            );
            assert_bit_identical(&format!("{name} unet t={t}"), dtype, &of, &os);
        }
    }
}

fn check(name: &str, unet_heads: Value) {
    let (folder, single) = open_both(name, unet_heads);
    check_text_encoder(name, &folder, &single);
    check_vae(name, &folder, &single);
    check_unet(name, &folder, &single);
    for (what, f, s) in [
        ("unet", &folder.unet, &single.unet),
        ("vae", &folder.vae, &single.vae),
        (
            "text_encoder",
            folder.text_encoder.as_ref().unwrap(),
            single.text_encoder.as_ref().unwrap(),
        ),
    ] {
        // The single file's models bound every tensor it has (and the folder's too).
        s.weights
            .check_all_used()
            .unwrap_or_else(|e| panic!("{name} {what} single file: {e}"));
        f.weights
            .check_all_used()
            .unwrap_or_else(|e| panic!("{name} {what} folder: {e}"));
    }
}

#[test]
fn sd1_single_file_runs_like_the_folder() {
    check("sd1-tiny", json!(2));
}

#[test]
fn sd2_single_file_runs_like_the_folder() {
    check("sd2-tiny", json!([2, 4]));
}
