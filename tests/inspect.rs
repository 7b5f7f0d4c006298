//! `ldm inspect`: what a model is, from headers and configs alone (no GPU needed).
//!
//! Parameter counts are checked against diffusers' own (`sum(p.numel() for p in
//! model.parameters())` on the tiny SDXL folder, printed by tools/make_sdxl_fixtures.py) and,
//! for the real SDXL base 1.0, against its published sizes, through a sparse single file with
//! sd_xl_base_1.0.safetensors' real header (tests/fixtures/sdxl/single_file/
//! sdxl-base-real.shapes.json) and no data: only the header is ever read.

use std::path::{Path, PathBuf};

mod common;

use ldm_wgpu::inspect::{inspect, ModelKind};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn sdxl() -> PathBuf {
    root().join("sdxl")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ldm-inspect-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn copy_folder(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.path().is_dir() {
            copy_folder(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

fn params(report: &ldm_wgpu::inspect::ModelReport) -> Vec<(String, u64)> {
    report
        .components
        .iter()
        .map(|c| (c.name.clone(), c.parameters))
        .collect()
}

fn owned(v: &[(&str, u64)]) -> Vec<(String, u64)> {
    v.iter().map(|(n, p)| (n.to_string(), *p)).collect()
}

#[test]
fn tiny_sdxl_folder() {
    let r = inspect(&sdxl().join("model")).unwrap();
    assert_eq!(r.kind, ModelKind::SdxlBase);
    assert_eq!(r.layout, "folder");
    assert!(!r.turbo && !r.inpainting);
    assert_eq!(r.pipeline.as_deref(), Some("StableDiffusionXLPipeline"));
    assert_eq!(r.prediction_type, "epsilon");
    assert_eq!(r.scheduler.as_deref(), Some("EulerDiscreteScheduler"));
    assert_eq!(r.timestep_spacing.as_deref(), Some("leading"));
    assert_eq!(r.tokenizers, ["tokenizer", "tokenizer_2"]);
    // diffusers' counts for the same folder.
    let want = [
        ("unet", 1_343_332),
        ("vae", 261_079),
        ("text_encoder", 798_464),
        ("text_encoder_2", 1_609_984),
    ];
    assert_eq!(params(&r), owned(&want));
    for c in &r.components {
        assert_eq!(c.dtypes.keys().collect::<Vec<_>>(), ["F16"], "{}", c.name);
        assert!(!c.config_inferred);
    }
    let text = r.to_text();
    assert!(
        text.contains("SDXL base") && text.contains("1,343,332"),
        "{text}"
    );
}

/// Turbo is told by the scheduler config alone (stabilityai/sdxl-turbo's: Euler a, trailing);
/// the refiner by its layout; a 9-channel U-Net by its config.
#[test]
fn turbo_refiner_and_inpainting_folders() {
    let turbo = scratch("turbo");
    copy_folder(&sdxl().join("model"), &turbo);
    std::fs::copy(
        sdxl().join("turbo/scheduler_config.json"),
        turbo.join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    let r = inspect(&turbo).unwrap();
    assert!(r.turbo);
    assert_eq!(r.description(), "SDXL Turbo");

    std::fs::copy(
        sdxl().join("unet_inpaint/config.json"),
        turbo.join("unet/config.json"),
    )
    .unwrap();
    let r = inspect(&turbo).unwrap();
    assert!(r.inpainting);
    assert!(
        r.description().contains("inpainting"),
        "{}",
        r.description()
    );
    std::fs::remove_dir_all(&turbo).unwrap();

    let refiner = scratch("refiner");
    copy_folder(&sdxl().join("refiner"), &refiner);
    for shared in ["text_encoder_2", "tokenizer_2", "vae"] {
        copy_folder(&sdxl().join("model").join(shared), &refiner.join(shared));
    }
    let r = inspect(&refiner).unwrap();
    std::fs::remove_dir_all(&refiner).unwrap();
    assert_eq!(r.kind, ModelKind::SdxlRefiner);
    let names: Vec<String> = params(&r).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["unet", "vae", "text_encoder_2"]);
    assert_eq!(r.tokenizers, ["tokenizer_2"]);
}

#[test]
fn sd2_single_file() {
    let r = inspect(&root().join("weights/sd2-tiny.ckpt.safetensors")).unwrap();
    assert_eq!(r.kind, ModelKind::Sd2);
    assert_eq!(r.layout, "single_file");
    assert_eq!(r.prediction_type, "v_prediction");
    assert!(r.tokenizers.is_empty());
    assert!(r.components.iter().all(|c| c.config_inferred));
    let text = r.to_text();
    assert!(text.contains("sd2-tiny.ckpt.safetensors"), "{text}");
}

/// sd_xl_base_1.0.safetensors' header (2,513 tensors, stored as f16) over no data: a sparse file
/// of the real size. The counts are SDXL base 1.0's (diffusers: U-Net 2,567,463,684, VAE
/// 83,653,863, CLIP ViT-L 123,060,480, OpenCLIP bigG with projection 694,659,840).
#[test]
fn real_sdxl_base_header() {
    let dir = scratch("real-sdxl");
    let path = common::sparse_sdxl_base(&dir);

    let r = inspect(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(r.kind, ModelKind::SdxlBase);
    assert_eq!(r.unrecognized_tensors, 0);
    let want = [
        ("unet", 2_567_463_684),
        ("vae", 83_653_863),
        ("text_encoder", 123_060_480),
        ("text_encoder_2", 694_659_840),
    ];
    assert_eq!(params(&r), owned(&want));
    eprintln!("{}", r.to_text());
}

fn ldm(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .output()
        .expect("run ldm")
}

#[test]
fn cli_text_json_and_bad_paths() {
    let model = sdxl().join("model");
    let o = ldm(&["inspect", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("SDXL base") && text.contains("text_encoder_2"),
        "{text}"
    );

    let o = ldm(&["inspect", "--json", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "sdxl_base");
    assert_eq!(v["components"][0]["parameters"], 1_343_332);

    let o = ldm(&["inspect", "/no/such/model"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not found") && err.contains("hint"), "{err}");

    // A file that is not a safetensors checkpoint.
    let o = ldm(&["inspect", sdxl().join("cases.json").to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.is_empty() && !err.contains("panicked"), "{err}");
    eprintln!("cases.json: {err}");
}
