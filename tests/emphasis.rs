//! A1111 prompt emphasis end to end on the shipped model's text encoder, against the reference in
//! tools/make_emphasis_fixtures.py (our Python port of A1111's documented behaviour, run with
//! transformers on CPU in f32): the parsed pieces, the token ids and weights of every chunk
//! (exactly), and the weighted embeddings (relative L2).

mod common;

use ldm_wgpu::pipeline::{default_model_dir, ModelOptions, StableDiffusion};
use ldm_wgpu::prompt::{encode_weighted, parse_attention, tokenize_weighted, Chunking, Piece};
use ldm_wgpu::weights::SafetensorsFile;
use ldm_wgpu::{DType, Gpu, GpuOptions};
use serde_json::Value;

/// f32 text encoder vs torch (~1e-6, see tests/models.rs) plus the emphasis kernel's sums.
const TOL: f64 = 2e-5;

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/emphasis")
}

#[test]
fn weighted_prompts_match_the_reference() {
    let doc: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("cases.json")).unwrap()).unwrap();
    let embeddings = SafetensorsFile::open(fixtures().join("embeddings.safetensors")).unwrap();
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
    let options = ModelOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    let sd = StableDiffusion::load(gpu, &default_model_dir(), &options).unwrap();
    for (n, case) in doc["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        let pieces = parse_attention(prompt);
        let want_pieces: Vec<Piece> = case["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let (text, w) = (p[0].as_str().unwrap(), p[1].as_f64().unwrap());
                if text == "BREAK" && w == -1.0 {
                    Piece::Break
                } else {
                    Piece::Text(text.into(), w)
                }
            })
            .collect();
        // serde_json's default float parsing may be 1 ulp off Python's repr: compare to 1e-12.
        let same = pieces.len() == want_pieces.len()
            && pieces.iter().zip(&want_pieces).all(|(a, b)| match (a, b) {
                (Piece::Text(s, w), Piece::Text(s2, w2)) => s == s2 && (w - w2).abs() <= 1e-12,
                (Piece::Break, Piece::Break) => true,
                _ => false,
            });
        assert!(
            same,
            "case {n}: {prompt:?}\n got {pieces:?}\nwant {want_pieces:?}"
        );

        let weighted = tokenize_weighted(&sd.tokenizer, &pieces, Chunking::Chunks);
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(case["ids"].clone()).unwrap();
        let want_weights: Vec<Vec<f32>> = serde_json::from_value(case["weights"].clone()).unwrap();
        let ids: Vec<Vec<u32>> = weighted.chunks.iter().map(|c| c.ids.clone()).collect();
        let weights: Vec<Vec<f32>> = weighted.chunks.iter().map(|c| c.weights.clone()).collect();
        assert_eq!(ids, want_ids, "case {n}: token ids of {prompt:?}");
        assert_eq!(weights, want_weights, "case {n}: weights of {prompt:?}");

        let z =
            encode_weighted(&sd.gpu, sd.text_encoder.as_ref().unwrap(), &weighted, None).unwrap();
        let got = sd.gpu.download(&z).unwrap();
        let want = embeddings.tensor(&format!("case_{n:02}")).unwrap();
        assert_eq!(z.numel(), want.numel(), "case {n}");
        let want64: Vec<f64> = want.to_f32_vec().iter().map(|&v| v as f64).collect();
        let conditions: Vec<f64> = serde_json::from_value(case["scale_condition"].clone()).unwrap();
        assert_eq!(conditions.len(), ids.len(), "case {n}");
        // Per chunk: the weighted embedding's direction tightly, and the mean-restoring factor
        // (one scalar per chunk) to what its conditioning allows in f32. The factor is
        // mean(z) / mean(w z), each mean a sum of nearly cancelling terms: with a text encoder
        // whose outputs average ~2e-5 against values of ~0.4, and a negative weight, its
        // condition number reaches ~1e5, and no f32 sum gets it to 2e-5.
        let per_chunk = want64.len() / ids.len();
        for (k, condition) in conditions.iter().enumerate() {
            let (g, w) = (
                &got[k * per_chunk..(k + 1) * per_chunk],
                &want64[k * per_chunk..(k + 1) * per_chunk],
            );
            let dot: f64 = g.iter().zip(w).map(|(&a, &b)| a as f64 * b).sum();
            let scale = dot / w.iter().map(|b| b * b).sum::<f64>();
            let unscaled: Vec<f32> = g.iter().map(|&a| (a as f64 / scale) as f32).collect();
            let shape_err = common::rel_l2(&unscaled, w);
            let scale_err = (scale - 1.0).abs();
            let scale_tol = TOL.max(4.0 * f64::from(f32::EPSILON) * condition);
            eprintln!(
                "case {n} chunk {k}: rel-L2 {:.2e} (shape {shape_err:.2e}, scale {scale_err:.2e} \
                 of {scale_tol:.1e} at condition {condition:.1e})  {prompt:?}",
                common::rel_l2(g, w)
            );
            assert!(
                shape_err <= TOL,
                "case {n} chunk {k}: weighted embeddings differ by {shape_err:.2e} for {prompt:?}"
            );
            assert!(
                scale_err <= scale_tol,
                "case {n} chunk {k}: mean-restoring scale off by {scale_err:.2e} (allowed \
                 {scale_tol:.1e}) for {prompt:?}"
            );
        }
    }
}

/// Truncation (diffusers' behaviour) keeps the first 75 tokens and no comma backtrack, and an
/// unweighted prompt tokenizes exactly as the plain tokenizer does.
#[test]
fn truncation_matches_the_plain_tokenizer() {
    let tokenizer =
        ldm_wgpu::tokenizer::ClipTokenizer::from_dir(&default_model_dir().join("tokenizer"))
            .unwrap();
    let long = (0..60)
        .map(|i| format!("word{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    for prompt in ["a blue circle on a yellow background", long.as_str(), ""] {
        let w = tokenize_weighted(&tokenizer, &parse_attention(prompt), Chunking::Truncate);
        let plain = tokenizer.encode_padded(prompt);
        assert_eq!(w.chunks.len(), 1);
        assert_eq!(w.chunks[0].ids, plain.ids, "{prompt:?}");
        assert_eq!(w.truncated, plain.truncated, "{prompt:?}");
        assert!(!w.is_weighted());
    }
}

/// Through the whole pipeline: a prompt without emphasis syntax gives the same image with
/// weighting on or off; a weighted one changes it only when weighting is on.
#[test]
fn pipeline_applies_emphasis_only_where_asked() {
    use ldm_wgpu::pipeline::GenerateRequest;
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
    let options = ModelOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    let sd = StableDiffusion::load(gpu, &default_model_dir(), &options).unwrap();
    let run = |prompt: &str, weighting: bool| {
        let req = GenerateRequest {
            prompt: prompt.into(),
            width: 64,
            height: 64,
            steps: 3,
            seed: 5,
            prompt_weighting: weighting,
            ..Default::default()
        };
        sd.generate(&req, &mut |_| true).unwrap().images
    };
    let plain = "a blue circle on a yellow background";
    assert_eq!(run(plain, true), run(plain, false));
    let weighted = "a (blue:1.6) circle on a [yellow] background";
    let (on, off) = (run(weighted, true), run(weighted, false));
    assert_ne!(on, off, "emphasis changed nothing");
    // With weighting off the brackets are text: the prompt differs from the plain one.
    assert_ne!(off, run(plain, false));
}

/// The whole pipeline against diffusers' StableDiffusionPipeline given the reference weighted
/// embeddings as `prompt_embeds` (tools/make_emphasis_fixtures.py): same image (PSNR ≥ 40 dB, the
/// pipeline parity bound) and final latents (rel-L2 ≤ 1e-3), f32.
#[test]
fn weighted_prompt_pipeline_matches_diffusers_with_prompt_embeds() {
    use ldm_wgpu::image::Image;
    use ldm_wgpu::pipeline::GenerateRequest;
    let meta: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("pipeline.json")).unwrap()).unwrap();
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
    let options = ModelOptions {
        dtype: Some(DType::F32),
        vae_f32: Some(true),
        ..Default::default()
    };
    let sd = StableDiffusion::load(gpu, &default_model_dir(), &options).unwrap();
    let req = GenerateRequest {
        prompt: meta["prompt"].as_str().unwrap().into(),
        width: 64,
        height: 64,
        steps: meta["steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
        seed: meta["seed"].as_u64().unwrap(),
        sampler: Some(meta["sampler"].as_str().unwrap().parse().unwrap()),
        ..Default::default()
    };
    let out = sd.generate(&req, &mut |_| true).unwrap();
    let want = Image::load_png(&fixtures().join("pipeline.png")).unwrap();
    let psnr = common::psnr_rgb8(&out.images[0].rgb, &want.rgb);
    let tensors = SafetensorsFile::open(fixtures().join("pipeline.safetensors")).unwrap();
    let want_latents = common::nchw_to_nhwc_f64(&tensors.tensor("latents").unwrap());
    let err = common::rel_l2(&out.latents, &want_latents);
    eprintln!(
        "weighted prompt vs diffusers(prompt_embeds): PSNR {psnr:.1} dB, latents rel-L2 {err:.2e}"
    );
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
    assert!(err <= 1e-3, "latents differ by {err:.2e}");
}
