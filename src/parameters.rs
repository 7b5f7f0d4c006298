//! The A1111 web UI's `parameters` text, which image browsers and other SD tools read from a
//! PNG's tEXt chunk. One definition for every front end (the CLI, the C API), so an image made
//! through any of them carries the same text for the same settings.

use crate::pipeline::{GenerateRequest, RngKind, StableDiffusion};
use crate::sched::{SamplerKind, SchedulerClass};

/// The sampler the model's own scheduler config gives, when it is one we run.
pub fn config_sampler(sd: &StableDiffusion) -> Option<SamplerKind> {
    let class = sd.scheduler_config.class_name()?;
    SchedulerClass::from_diffusers_name(class).map(SchedulerClass::default_kind)
}

/// The model name A1111 writes: the file or folder name without its extension.
pub fn model_name(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// What the PNG records beyond the request: the prompt as typed (LoRA tags kept), the model's
/// name, A1111's `Lora hashes` entries (`name: short hash`), and the SDXL refiner's name and
/// switch point when one finished the image.
#[derive(Clone, Copy, Debug)]
pub struct Recorded<'a> {
    pub prompt: &'a str,
    pub model: &'a str,
    pub lora_hashes: &'a [String],
    pub refiner: Option<(&'a str, f64)>,
}

/// The `parameters` text of image `index` of a batch made by `r` on `sd` (`seed`: the seed that
/// image was drawn with).
pub fn a1111_parameters(
    r: &GenerateRequest,
    recorded: &Recorded<'_>,
    sd: &StableDiffusion,
    seed: u64,
    index: usize,
) -> String {
    let Recorded {
        prompt,
        model,
        lora_hashes,
        refiner,
    } = *recorded;
    let name = match r.sampler.or_else(|| config_sampler(sd)) {
        Some(kind) => kind.a1111_name(),
        None => sd.scheduler_config.class_name().unwrap_or(""),
    };
    let mut out = prompt.to_string();
    if !r.negative_prompt.is_empty() {
        out += &format!("\nNegative prompt: {}", r.negative_prompt);
    }
    out += &format!(
        "\nSteps: {}, Sampler: {name}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {model}",
        r.steps, r.guidance_scale, r.width, r.height
    );
    if r.batch_size > 1 {
        out += &format!(", Batch size: {}, Batch pos: {index}", r.batch_size);
    }
    if let Some(k) = r.clip_skip {
        // A1111 counts the last layer as 1; diffusers' clip_skip=1 is A1111's "Clip skip: 2".
        out += &format!(", Clip skip: {}", k + 1);
    }
    if r.init_image.is_some() {
        out += &format!(", Denoising strength: {}", r.strength);
    }
    if let Some((name, switch)) = refiner {
        out += &format!(", Refiner: {name}, Refiner switch at: {switch}");
    }
    if !lora_hashes.is_empty() {
        // A1111 quotes a value holding `:` or `,` as a JSON string.
        let value = serde_json::Value::String(lora_hashes.join(", "));
        out += &format!(", Lora hashes: {value}");
    }
    let rng = match r.rng {
        RngKind::Philox => "NV",
        _ => "CPU",
    };
    out += &format!(
        ", RNG: {rng}, Version: ldm-wgpu {}",
        env!("CARGO_PKG_VERSION")
    );
    out
}
