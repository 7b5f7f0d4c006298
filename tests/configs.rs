//! Configs from strangers: every value a table, a loop or an allocation is sized from is checked
//! before use, and a bad one is an error naming the field, never an abort or a panic. The cases
//! are the ones found by trying corrupted model folders.

use ldm_wgpu::models::clip::ClipConfig;
use ldm_wgpu::models::unet::UNetConfig;
use ldm_wgpu::models::vae::VaeConfig;
use ldm_wgpu::pipeline::{default_model_dir, ModelOptions, StableDiffusion};
use ldm_wgpu::sched::{build_sampler, SamplerKind, SchedulerConfig};
use ldm_wgpu::{Gpu, GpuOptions};
use serde_json::{json, Value};

fn shipped(part: &str) -> Value {
    let path = default_model_dir().join(part).join(if part == "scheduler" {
        "scheduler_config.json"
    } else {
        "config.json"
    });
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

fn err_text<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn absurd_sizes_are_errors_before_any_allocation() {
    let text = shipped("text_encoder");
    assert!(ClipConfig::from_json(&text).is_ok());
    let e = err_text(ClipConfig::from_json(&with(
        text,
        "num_hidden_layers",
        json!(1_000_000_000_000u64),
    )));
    assert!(e.contains("num_hidden_layers"), "{e}");

    let unet = shipped("unet");
    assert!(UNetConfig::from_json(&unet).is_ok());
    let e = err_text(UNetConfig::from_json(&with(
        unet.clone(),
        "block_out_channels",
        json!([64, 1u64 << 40, 128]),
    )));
    assert!(e.contains("block_out_channels"), "{e}");
    let e = err_text(UNetConfig::from_json(&with(
        unet,
        "layers_per_block",
        json!(1u64 << 50),
    )));
    assert!(e.contains("layers_per_block"), "{e}");

    let sched = shipped("scheduler");
    assert!(SchedulerConfig::from_value(&sched).is_ok());
    let e = err_text(SchedulerConfig::from_value(&with(
        sched,
        "num_train_timesteps",
        json!(1_000_000_000_000u64),
    )));
    assert!(e.contains("num_train_timesteps"), "{e}");
}

#[test]
fn scheduler_offsets_and_betas_out_of_range() {
    let sched = shipped("scheduler");
    let e = err_text(SchedulerConfig::from_value(&with(
        sched.clone(),
        "steps_offset",
        json!(5000),
    )));
    assert!(e.contains("steps_offset"), "{e}");
    // An offset inside the schedule that still pushes the last leading timestep past it (with
    // as many steps as training timesteps): diffusers raises IndexError, we say why.
    let leading = with(sched.clone(), "timestep_spacing", json!("leading"));
    let cfg = SchedulerConfig::from_value(&with(leading, "steps_offset", json!(1))).unwrap();
    let e = err_text(build_sampler(&cfg, Some(SamplerKind::Ddim), 1000));
    assert!(e.contains("steps_offset"), "{e}");
    assert!(build_sampler(&cfg, Some(SamplerKind::Ddim), 50).is_ok());

    let e = err_text(SchedulerConfig::from_value(&with(
        sched.clone(),
        "trained_betas",
        json!([0.001, 0.002]),
    )));
    assert!(e.contains("trained_betas has 2 values"), "{e}");
    let mut betas = vec![json!(0.01); 1000];
    betas[10] = json!(1.5);
    let e = err_text(SchedulerConfig::from_value(&with(
        sched.clone(),
        "trained_betas",
        Value::Array(betas),
    )));
    assert!(e.contains("(0, 1)"), "{e}");
    let e = err_text(SchedulerConfig::from_value(&with(
        sched,
        "beta_end",
        json!(-3.0),
    )));
    assert!(e.contains("beta_end"), "{e}");
}

#[test]
fn vae_scaling_factor_must_be_a_real_number() {
    let vae = shipped("vae");
    assert!(VaeConfig::from_json(&vae).is_ok());
    for bad in [Value::Null, json!(1e308), json!(0.0), json!(-0.18215)] {
        let e = err_text(VaeConfig::from_json(&with(
            vae.clone(),
            "scaling_factor",
            bad.clone(),
        )));
        assert!(e.contains("scaling_factor"), "{bad}: {e}");
    }
}

/// The whole loader on a model folder whose text encoder declares 10^12 layers: an error, and
/// the process goes on (this once aborted on a failed allocation).
#[test]
fn a_corrupted_model_folder_fails_to_load_cleanly() {
    let dir = std::env::temp_dir().join(format!("ldm-bad-config-{}", std::process::id()));
    let src = default_model_dir();
    for part in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.join(part)).unwrap();
        for entry in std::fs::read_dir(src.join(part)).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, dir.join(part).join(p.file_name().unwrap())).unwrap();
        }
    }
    for f in ["model_index.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
    }
    let text = with(
        shipped("text_encoder"),
        "num_hidden_layers",
        json!(1_000_000_000_000u64),
    );
    std::fs::write(dir.join("text_encoder/config.json"), text.to_string()).unwrap();
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
    let e = err_text(StableDiffusion::load(gpu, &dir, &ModelOptions::default()));
    assert!(e.contains("num_hidden_layers"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A value of the wrong type is an error naming the config and the key path, whatever the key.
#[test]
fn wrong_types_name_their_key() {
    let e = err_text(UNetConfig::from_json(&with(
        shipped("unet"),
        "block_out_channels",
        json!([32, "64"]),
    )));
    assert!(e.contains("block_out_channels[1]"), "{e}");
    let e = err_text(ClipConfig::from_json(&with(
        shipped("text_encoder"),
        "hidden_act",
        json!(7),
    )));
    assert!(e.contains("hidden_act"), "{e}");
    let e = err_text(SchedulerConfig::from_value(&with(
        shipped("scheduler"),
        "use_karras_sigmas",
        json!("yes"),
    )));
    assert!(e.contains("use_karras_sigmas"), "{e}");
    let e = err_text(UNetConfig::from_json(&with(
        shipped("unet"),
        "layers_per_block",
        json!([1, 2, 3, 4, 5]),
    )));
    assert!(
        e.contains("layers_per_block") && e.contains("one per block"),
        "{e}"
    );
}

/// diffusers writes DPMSolverMultistepScheduler's default `lambda_min_clipped` (-inf) with
/// Python's json module, as the bare token `-Infinity`; such a config must load and mean -inf.
#[test]
fn python_json_infinity_reads_as_the_class_default() {
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "lambda_min_clipped": -Infinity,
        "note": "a string with -Infinity and NaN inside stays as it is", "steps_offset": 1}"#;
    assert!(
        serde_json::from_str::<Value>(text).is_err(),
        "strict JSON accepted it"
    );
    let cfg = SchedulerConfig::from_json_str(text).unwrap();
    assert_eq!(cfg.lambda_min_clipped, None);
    assert_eq!(cfg.class_name(), Some("DPMSolverMultistepScheduler"));
    assert!(build_sampler(&cfg, None, 20).is_ok());
    let value = ldm_wgpu::models::config::parse_python_json(text).unwrap();
    assert_eq!(
        value["note"],
        json!("a string with -Infinity and NaN inside stays as it is")
    );
    // Garbage stays an error (with strict JSON's message).
    assert!(SchedulerConfig::from_json_str("{\"a\": Infinit}").is_err());
}

/// `model_index.json`: the shipped model's passes; a pipeline with a component we would
/// silently ignore (SD3's third text encoder) and component classes we do not implement are
/// refused by name, before any weight is opened. An SDXL index (two encoders, both tokenizers)
/// passes now that SDXL runs; a two-encoder index of another pipeline does not.
#[test]
fn model_index_refuses_pipelines_we_would_misread() {
    use ldm_wgpu::weights::diffusers::ModelIndex;
    use ldm_wgpu::weights::{open_diffusers_folder, LoadOptions};
    let shipped_index = default_model_dir().join("model_index.json");
    let index = ModelIndex::load(&shipped_index).unwrap();
    assert_eq!(index.pipeline.as_deref(), Some("StableDiffusionPipeline"));
    assert_eq!(index.component_class("unet"), Some("UNet2DConditionModel"));
    assert_eq!(index.component_class("safety_checker"), None);

    let base: Value = serde_json::from_slice(&std::fs::read(&shipped_index).unwrap()).unwrap();
    let sdxl = with(
        with(
            with(
                base.clone(),
                "_class_name",
                json!("StableDiffusionXLPipeline"),
            ),
            "text_encoder_2",
            json!(["transformers", "CLIPTextModelWithProjection"]),
        ),
        "tokenizer_2",
        json!(["transformers", "CLIPTokenizer"]),
    );
    let parse = |v: &Value| serde_json::from_value::<ModelIndex>(v.clone()).unwrap();
    parse(&sdxl).validate().unwrap();
    assert!(parse(&sdxl).is_sdxl());
    let sd3 = with(
        with(
            sdxl.clone(),
            "_class_name",
            json!("StableDiffusion3Pipeline"),
        ),
        "text_encoder_3",
        json!(["transformers", "T5EncoderModel"]),
    );
    let other_two_encoders = with(sdxl.clone(), "_class_name", json!("KolorsPipeline"));
    let aesthetics = with(sdxl.clone(), "requires_aesthetics_score", json!(true));
    parse(&aesthetics).validate().unwrap();
    assert!(parse(&aesthetics).requires_aesthetics_score());
    // The refiner's index (stabilityai/stable-diffusion-xl-refiner-1.0): text_encoder_2 alone.
    let refiner = with(
        with(
            with(
                aesthetics.clone(),
                "_class_name",
                json!("StableDiffusionXLImg2ImgPipeline"),
            ),
            "text_encoder",
            json!([null, null]),
        ),
        "tokenizer",
        json!([null, null]),
    );
    parse(&refiner).validate().unwrap();
    assert!(parse(&refiner).is_sdxl());
    assert_eq!(parse(&refiner).component_class("text_encoder"), None);
    let no_tokenizer_2 = with(sdxl, "tokenizer_2", json!([null, null]));
    let asymmetric = with(base, "vae", json!(["diffusers", "AsymmetricAutoencoderKL"]));
    for (case, index, needle) in [
        ("sd3", sd3, "text_encoder_3"),
        ("kolors", other_two_encoders, "KolorsPipeline"),
        ("sdxl-no-tokenizer-2", no_tokenizer_2, "tokenizer_2"),
        ("vae", asymmetric, "AsymmetricAutoencoderKL"),
    ] {
        let dir = std::env::temp_dir().join(format!("ldm-index-{case}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model_index.json"), index.to_string()).unwrap();
        // No unet/ at all: the index is what must be reported.
        let e = err_text(open_diffusers_folder(&dir, &LoadOptions::default()));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.contains("unsupported") && e.contains(needle),
            "{case}: {e}"
        );
    }
}

/// A replacement VAE (`ModelOptions::vae_dir`, the CLI's `--vae`) from another model family (a
/// different latent channel count) is refused by name before any weight is uploaded.
#[test]
fn a_vae_from_another_family_is_refused() {
    let dir = std::env::temp_dir().join(format!("ldm-other-vae-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = default_model_dir().join("vae");
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let vae = with(shipped("vae"), "latent_channels", json!(16));
    std::fs::write(dir.join("config.json"), vae.to_string()).unwrap();
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap()).expect("adapter");
    let options = ModelOptions {
        vae_dir: Some(dir.clone()),
        ..Default::default()
    };
    let e = err_text(StableDiffusion::load(gpu, &default_model_dir(), &options));
    std::fs::remove_dir_all(&dir).ok();
    assert!(e.contains("16 latent channels"), "{e}");
}
