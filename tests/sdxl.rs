//! SDXL parity with diffusers on a tiny random model with the real structure (two text
//! encoders of different widths, text_time added conditioning, transformer depth (1, 2), a
//! DownBlock2D first level, linear projections): the text encoders and the U-Net with its added
//! embedding at two timesteps.
//!
//! Fixtures: tests/fixtures/sdxl, made by tools/make_sdxl_fixtures.py (see its header).
//!
//! Bounds, as in tests/models.rs and tests/pipeline.rs (see their headers for the reasons):
//! - models: relative L2 ≤ 1e-4 in f32, ≤ 1e-2 in f16 against diffusers' f32 outputs.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use ldm_wgpu::models::clip::{ClipConfig, ClipTextModel, ClipTextModelWithProjection};
use ldm_wgpu::models::unet::{UNet2DConditionModel, UNetConfig};
use ldm_wgpu::weights::{open_component, ComponentKind, LoadOptions, SafetensorsFile};
use ldm_wgpu::{DType, Tensor};

const F32_TOL: f64 = 1e-4;
const F16_TOL: f64 = 1e-2;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdxl")
}

fn model_dir() -> PathBuf {
    fixture_dir().join("model")
}

struct Io(SafetensorsFile);

impl Io {
    fn new(name: &str) -> Self {
        Io(SafetensorsFile::open(fixture_dir().join(name)).unwrap())
    }
    fn get(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = self.0.tensor(name).unwrap();
        (t.to_f32_vec(), t.shape.clone())
    }
    fn ids(&self, name: &str, row: usize) -> Vec<u32> {
        let (v, s) = self.get(name);
        v[row * s[1]..(row + 1) * s[1]]
            .iter()
            .map(|&x| x as u32)
            .collect()
    }
}

fn nchw_to_nhwc(v: &[f32], [b, c, h, w]: [usize; 4]) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for bi in 0..b {
        for ci in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[((bi * h + y) * w + x) * c + ci] = v[((bi * c + ci) * h + y) * w + x];
                }
            }
        }
    }
    out
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn check(what: &str, dtype: DType, got: &Tensor, want: &[f32]) {
    let got = gpu().download(got).unwrap();
    let e = rel_l2(&got, &as_f64(want));
    let tol = tol(dtype, F32_TOL, F16_TOL);
    eprintln!(
        "{what} {}: relative L2 {e:.2e} (tolerance {tol:.0e})",
        dtype.name()
    );
    assert!(
        e <= tol,
        "{what} {}: relative L2 error {e:.3e} > tolerance {tol:.1e}",
        dtype.name()
    );
}

/// Both encoders' `hidden_states[-2]` (SDXL's choice: no final layer norm), `hidden_states[-3]`
/// (clip_skip 1) and encoder 2's pooled, projected output against transformers.
#[test]
fn text_encoders_match_transformers() {
    let gpu = gpu();
    let io = Io::new("text_encoders.safetensors");
    let (ids_1, ids_2) = (io.ids("input_ids", 0), io.ids("input_ids", 1));
    for dtype in dtypes() {
        let comp = open_component(
            model_dir().join("text_encoder"),
            ComponentKind::TextEncoder,
            &LoadOptions::default(),
        )
        .unwrap();
        let cfg = ClipConfig::from_json(&comp.config).unwrap();
        let te1 = ClipTextModel::load(gpu, &comp.weights.root(), cfg, dtype).unwrap();
        let out = te1.penultimate(gpu, &ids_1, 1, None).unwrap();
        check(
            "text_encoder hidden_states[-2]",
            dtype,
            &out,
            &io.get("te1_penultimate").0,
        );
        let out = te1.penultimate(gpu, &ids_1, 1, Some(1)).unwrap();
        check(
            "text_encoder hidden_states[-3]",
            dtype,
            &out,
            &io.get("te1_skip1").0,
        );

        let comp = open_component(
            model_dir().join("text_encoder_2"),
            ComponentKind::TextEncoder2,
            &LoadOptions::default(),
        )
        .unwrap();
        let cfg = ClipConfig::from_json(&comp.config).unwrap();
        let te2 = ClipTextModelWithProjection::load(gpu, &comp.weights.root(), cfg, dtype).unwrap();
        comp.weights.check_all_used().unwrap();
        let (hidden, pooled) = te2.forward_sdxl(gpu, &ids_2, 1, None).unwrap();
        check(
            "text_encoder_2 hidden_states[-2]",
            dtype,
            &hidden,
            &io.get("te2_penultimate").0,
        );
        check(
            "text_encoder_2 text_embeds",
            dtype,
            &pooled,
            &io.get("te2_text_embeds").0,
        );
        let (hidden, pooled) = te2.forward_sdxl(gpu, &ids_2, 1, Some(1)).unwrap();
        check(
            "text_encoder_2 hidden_states[-3]",
            dtype,
            &hidden,
            &io.get("te2_skip1").0,
        );
        check(
            "text_encoder_2 text_embeds (clip_skip 1)",
            dtype,
            &pooled,
            &io.get("te2_text_embeds").0,
        );
    }
}

/// Pooling rules: eos_token_id 2 (SDXL's configs) pools at the largest id, a newer config
/// (49407) at the first EOS; on a row without EOS they differ (0 against the largest id's 7).
#[test]
fn pooled_output_follows_the_configs_eos_rule() {
    let gpu = gpu();
    let io = Io::new("text_encoders.safetensors");
    let ids = io.ids("ids_eos", 0);
    let comp = open_component(
        model_dir().join("text_encoder_2"),
        ComponentKind::TextEncoder2,
        &LoadOptions::default(),
    )
    .unwrap();
    let legacy = ClipConfig::from_json(&comp.config).unwrap();
    assert_eq!(
        legacy.eos_token_id, 2,
        "the fixture keeps SDXL's legacy eos_token_id"
    );
    let mut newer = legacy.clone();
    newer.eos_token_id = 49407;
    for (config, at, want) in [
        (legacy, 7, "te2_text_embeds_legacy"),
        (newer, 0, "te2_text_embeds_eos"),
    ] {
        let te2 = ClipTextModelWithProjection::load(gpu, &comp.weights.root(), config, DType::F32)
            .unwrap();
        assert_eq!(te2.text_model.pooled_positions(&ids, 1), vec![at]);
        let (_, pooled) = te2.forward_sdxl(gpu, &ids, 1, None).unwrap();
        check(
            &format!("text_embeds pooled at {at}"),
            DType::F32,
            &pooled,
            &io.get(want).0,
        );
    }
}

/// The U-Net with text_time conditioning (different ids and pooled embeddings per row) at two
/// timesteps, against diffusers.
#[test]
fn unet_with_added_conditioning_matches_diffusers() {
    let gpu = gpu();
    let io = Io::new("unet_io.safetensors");
    let (sample, s) = io.get("sample");
    let sample = nchw_to_nhwc(&sample, [s[0], s[1], s[2], s[3]]);
    let sample_shape = [s[0], s[2], s[3], s[1]];
    let (ctx, ctx_shape) = io.get("encoder_hidden_states");
    let (text_embeds, te_shape) = io.get("text_embeds");
    let (time_ids, _) = io.get("time_ids");
    for dtype in dtypes() {
        let comp = open_component(
            model_dir().join("unet"),
            ComponentKind::Unet,
            &LoadOptions::default(),
        )
        .unwrap();
        let cfg = UNetConfig::from_json(&comp.config).unwrap();
        assert!(cfg.text_time.is_some());
        let unet = UNet2DConditionModel::load(gpu, &comp.weights.root(), cfg, dtype).unwrap();
        comp.weights.check_all_used().unwrap();
        let x = gpu.upload(&sample, &sample_shape, dtype).unwrap();
        let c = gpu.upload(&ctx, &ctx_shape, dtype).unwrap();
        let pooled = gpu.upload(&text_embeds, &te_shape, dtype).unwrap();
        let added = unet.added_embedding(gpu, &pooled, &time_ids).unwrap();
        for t in [999, 421] {
            let out = unet.forward_added(gpu, &x, t as f64, &c, &added).unwrap();
            let (want, ws) = io.get(&format!("out_t{t}"));
            let want = nchw_to_nhwc(&want, [ws[0], ws[1], ws[2], ws[3]]);
            check(&format!("sdxl unet t={t}"), dtype, &out, &want);
        }
        // Without its added conditioning the U-Net refuses to run rather than guess.
        assert!(unet.forward(gpu, &x, 999.0, &c).is_err());
    }
}
