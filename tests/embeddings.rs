//! Textual-inversion embeddings on the shipped model against diffusers' `load_textual_inversion`
//! (tools/make_embedding_fixtures.py): the formats (A1111 `emb_params`, diffusers' one-token
//! file, SDXL `clip_l`/`clip_g`), pickles refused unopened, the token ids of prompts using them,
//! the text encoder's output (relative L2, f32, the text encoder's bound in tests/emphasis.rs)
//! and a whole pipeline with an embedding in the prompt and another in the negative prompt
//! (PSNR ≥ 40 dB and latents rel-L2 ≤ 1e-3, the pipeline parity bounds).

mod common;

use std::path::{Path, PathBuf};

use ldm_wgpu::embeddings::{load_dir, Embedding};
use ldm_wgpu::image::Image;
use ldm_wgpu::pipeline::{default_model_dir, GenerateRequest, ModelOptions, StableDiffusion};
use ldm_wgpu::prompt::{parse_attention, tokenize_weighted, Chunking};
use ldm_wgpu::weights::SafetensorsFile;
use ldm_wgpu::{DType, Error, Gpu, GpuOptions};
use serde_json::Value;

const TOL: f64 = 2e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embeddings")
}

fn load_model() -> StableDiffusion {
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
    let options = ModelOptions {
        dtype: Some(DType::F32),
        vae_f32: Some(true),
        ..Default::default()
    };
    StableDiffusion::load(gpu, &default_model_dir(), &options).unwrap()
}

fn with_embeddings() -> StableDiffusion {
    let mut sd = load_model();
    let (found, unreadable) = load_dir(&fixtures().join("lib")).unwrap();
    assert_eq!(unreadable.len(), 1, "{unreadable:?}");
    assert!(unreadable[0].1.contains("pickle"), "{unreadable:?}");
    let report = sd.set_embeddings(&found).unwrap();
    assert_eq!(
        report.loaded,
        [("dotted".to_string(), 1), ("shapestyle".to_string(), 2)]
    );
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].0, "xl_style");
    sd
}

#[test]
fn formats_are_read_and_pickles_refused() {
    let lib = fixtures().join("lib");
    let style = Embedding::open(&lib.join("shapestyle.safetensors")).unwrap();
    assert_eq!(style.name, "shapestyle");
    assert_eq!(style.widths(), [128]);
    assert_eq!(style.vectors(128).unwrap().0, 2);
    let dotted = Embedding::open(&lib.join("dotted.safetensors")).unwrap();
    assert_eq!(dotted.vectors(128).unwrap().0, 1);
    let xl = Embedding::open(&lib.join("xl_style.safetensors")).unwrap();
    assert_eq!(xl.widths(), [768, 1280]);
    assert!(xl.vectors(128).is_none());
    match Embedding::open(&lib.join("pickled.pt")) {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("pickle"), "{msg}"),
        other => panic!("a pickle was not refused: {other:?}"),
    }

    // Files that hold no usable embedding are errors naming what is wrong.
    let dir = std::env::temp_dir().join(format!("ldm-embeddings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, tensors: Vec<(&str, Vec<usize>, Vec<f32>)>| {
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .map(|(k, shape, v)| (k.to_string(), shape, bytemuck::cast_slice(&v).to_vec()))
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(k, shape, bytes)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )
                .unwrap();
                (k.clone(), view)
            })
            .collect();
        let path = dir.join(name);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    };
    let nan = write(
        "nan.safetensors",
        vec![("emb_params", vec![1, 4], vec![0.0, f32::NAN, 0.0, 0.0])],
    );
    let two = write(
        "two.safetensors",
        vec![("a", vec![4], vec![0.0; 4]), ("b", vec![4], vec![0.0; 4])],
    );
    let cube = write(
        "cube.safetensors",
        vec![("emb_params", vec![1, 2, 2], vec![0.0; 4])],
    );
    for (path, needle) in [(nan, "NaN"), (two, "no embedding tensor"), (cube, "shape")] {
        match Embedding::open(&path) {
            Err(e) => assert!(e.to_string().contains(needle), "{}: {e}", path.display()),
            Ok(_) => panic!("{} was accepted", path.display()),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Our token ids for every case equal diffusers' (after `maybe_convert_prompt`), up to the
/// numbering of the new ids (diffusers adds them in its load order, we in file-name order), and
/// the text encoder's output matches.
#[test]
fn prompts_using_embeddings_match_diffusers() {
    let sd = with_embeddings();
    let meta: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("cases.json")).unwrap()).unwrap();
    let vocab = meta["model_vocab"].as_u64().unwrap() as u32;
    // diffusers' new ids in its load order: shapestyle (2 vectors), then dotted (1).
    let ours_style = sd.tokenizer.tokenize("shapestyle");
    let ours_dotted = sd.tokenizer.tokenize("dotted");
    assert_eq!(ours_style.len(), 2);
    assert!(ours_style.iter().chain(&ours_dotted).all(|&id| id >= vocab));
    let renumber = |id: u32| match id.checked_sub(vocab) {
        Some(0) => ours_style[0],
        Some(1) => ours_style[1],
        Some(2) => ours_dotted[0],
        _ => id,
    };
    let tensors = SafetensorsFile::open(fixtures().join("embeds.safetensors")).unwrap();
    for (i, case) in meta["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| renumber(v.as_u64().unwrap() as u32))
            .collect();
        let got = sd.tokenizer.encode_padded(prompt).ids;
        assert_eq!(got, want, "{prompt:?}");

        let out = sd
            .text_encoder
            .as_ref()
            .unwrap()
            .forward(&sd.gpu, &got, 1, None)
            .unwrap();
        let out = sd.gpu.download(&out).unwrap();
        let want = tensors
            .tensor(&format!("case_{i:02}"))
            .unwrap()
            .to_f32_vec();
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let err = common::rel_l2(&out, &want);
        eprintln!("{prompt:?}: relative L2 {err:.2e}");
        assert!(err <= TOL, "{prompt:?}: relative L2 {err:.2e}");
    }
}

/// With emphasis, an embedding inside brackets gets the weight on each of its vectors.
#[test]
fn emphasis_weights_every_vector_of_an_embedding() {
    let sd = with_embeddings();
    let w = tokenize_weighted(
        &sd.tokenizer,
        &parse_attention("a (shapestyle:1.3) square"),
        Chunking::Truncate,
    );
    let style = sd.tokenizer.tokenize("shapestyle");
    let chunk = &w.chunks[0];
    let at = chunk.ids.iter().position(|&id| id == style[0]).unwrap();
    assert_eq!(&chunk.ids[at..at + 2], style.as_slice());
    assert_eq!(&chunk.weights[at..at + 2], &[1.3f32, 1.3]);
    assert_eq!(
        sd.embeddings_in("a (shapestyle:1.3) square"),
        ["shapestyle"]
    );
    assert!(sd.embeddings_in("a plain square").is_empty());
}

fn request(meta: &Value) -> GenerateRequest {
    GenerateRequest {
        prompt: meta["prompt"].as_str().unwrap().into(),
        negative_prompt: meta["negative_prompt"].as_str().unwrap().into(),
        width: 64,
        height: 64,
        steps: meta["steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
        seed: meta["seed"].as_u64().unwrap(),
        sampler: Some(meta["sampler"].as_str().unwrap().parse().unwrap()),
        ..Default::default()
    }
}

/// The whole pipeline (embedding in the prompt, another in the negative prompt) against
/// diffusers; then the embeddings removed: the image is the one without them, bit for bit.
#[test]
fn pipeline_matches_diffusers_and_removal_restores_the_model() {
    let meta: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("pipeline.json")).unwrap()).unwrap();
    let req = request(&meta);
    let mut sd = load_model();
    let before = sd.generate(&req, &mut |_| true).unwrap();
    let (found, _) = load_dir(&fixtures().join("lib")).unwrap();
    sd.set_embeddings(&found).unwrap();
    let out = sd.generate(&req, &mut |_| true).unwrap();

    let want = Image::load_png(&fixtures().join("pipeline.png")).unwrap();
    let psnr = common::psnr_rgb8(&out.images[0].rgb, &want.rgb);
    let tensors = SafetensorsFile::open(fixtures().join("pipeline.safetensors")).unwrap();
    let want_latents = common::nchw_to_nhwc_f64(&tensors.tensor("latents").unwrap());
    let err = common::rel_l2(&out.latents, &want_latents);
    eprintln!("embeddings vs diffusers: PSNR {psnr:.1} dB, latents rel-L2 {err:.2e}");
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
    assert!(err <= 1e-3, "latents differ by {err:.2e}");
    assert_ne!(out.images, before.images, "the embeddings changed nothing");

    sd.set_embeddings(&[]).unwrap();
    let after = sd.generate(&req, &mut |_| true).unwrap();
    assert!(
        after.images == before.images,
        "removing the embeddings left a trace"
    );
    assert_eq!(sd.tokenizer.tokenize("shapestyle").len(), {
        let plain = load_model();
        plain.tokenizer.tokenize("shapestyle").len()
    });
}

/// The CLI: `--embeddings DIR` loads the folder and names the embeddings the prompts use; an
/// SDXL embedding named in the prompt is reported as unusable with this model; a missing folder
/// is an error.
#[test]
fn cli_reports_the_embeddings_it_uses() {
    let out = std::env::temp_dir().join(format!("ldm-emb-cli-{}.png", std::process::id()));
    let lib = fixtures().join("lib");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ldm"))
            .args(args)
            .env_remove("LDM_ADAPTER")
            .output()
            .expect("run ldm")
    };
    let o = run(&[
        "generate",
        "-p",
        "a red square, shapestyle, xl_style",
        "-n",
        "dotted",
        "--embeddings",
        lib.to_str().unwrap(),
        "-W",
        "64",
        "-H",
        "64",
        "-s",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("embedding: shapestyle (2 vectors)"), "{err}");
    assert!(err.contains("embedding: dotted (1 vector)"), "{err}");
    assert!(
        err.contains("warning: embedding `xl_style` not used"),
        "{err}"
    );
    assert!(
        !err.contains("pickled"),
        "an unmentioned file was reported: {err}"
    );
    let _ = std::fs::remove_file(&out);
    let o = run(&[
        "generate",
        "-p",
        "x",
        "--embeddings",
        "/no/such/dir",
        "-s",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a directory"));
}
