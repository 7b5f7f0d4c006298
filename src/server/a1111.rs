//! The AUTOMATIC1111 web UI API's request and response bodies (`modules/api/models.py`,
//! `StableDiffusionTxt2ImgProcessingAPI` / `...Img2ImgProcessingAPI`), and their translation to
//! and from the engine's `GenerateRequest`. Fields we do not use are accepted and ignored, as
//! A1111's own extensions send many.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::queue::{GenJob, JobOutput};
use crate::image::Image;
use crate::pipeline::{GenerateRequest, SeedMode};
use crate::sched::SamplerKind;

/// One txt2img or img2img request, with A1111's defaults. Serialized back, it is the response's
/// `parameters` (the request with its defaults filled in).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationRequest {
    /// Required here (A1111 defaults it to ""; a request without one is more likely a mistake).
    pub prompt: Option<String>,
    pub negative_prompt: String,
    pub styles: Vec<String>,
    /// -1: a random seed.
    pub seed: i64,
    /// Accepted and ignored (variation seeds are not implemented).
    pub subseed: i64,
    pub subseed_strength: f64,
    pub sampler_name: Option<String>,
    /// A1111's older name for `sampler_name`.
    pub sampler_index: Option<String>,
    pub scheduler: Option<String>,
    pub batch_size: usize,
    pub n_iter: usize,
    pub steps: usize,
    pub cfg_scale: f64,
    /// Default: the init image's size, else the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub eta: Option<f64>,
    pub denoising_strength: Option<f64>,
    pub override_settings: Map<String, Value>,
    pub send_images: bool,
    pub save_images: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_images: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_blur: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inpainting_fill: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inpainting_mask_invert: Option<u32>,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        GenerationRequest {
            prompt: None,
            negative_prompt: String::new(),
            styles: Vec::new(),
            seed: -1,
            subseed: -1,
            subseed_strength: 0.0,
            sampler_name: None,
            sampler_index: None,
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            steps: 20,
            cfg_scale: 7.0,
            width: None,
            height: None,
            eta: None,
            denoising_strength: None,
            override_settings: Map::new(),
            send_images: true,
            save_images: false,
            init_images: None,
            mask: None,
            mask_blur: None,
            inpainting_fill: None,
            inpainting_mask_invert: None,
        }
    }
}

/// The server's limits on one request (`--max-pixels`, `--max-steps`, `--max-batch`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_pixels: u64,
    pub max_steps: usize,
    pub max_batch: usize,
}

/// A rejected request: the message and the field it is about (FastAPI's `loc`).
#[derive(Debug)]
pub struct Invalid {
    pub field: Option<String>,
    pub message: String,
}

impl Invalid {
    pub fn field(field: &str, message: impl Into<String>) -> Invalid {
        Invalid {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn general(message: impl Into<String>) -> Invalid {
        Invalid {
            field: None,
            message: message.into(),
        }
    }

    /// FastAPI's validation error body: `{"detail": [{"loc", "msg", "type"}]}`.
    pub fn body(&self) -> Value {
        let mut loc = vec![json!("body")];
        if let Some(f) = &self.field {
            loc.extend(f.split('.').map(|p| json!(p)));
        }
        json!({"detail": [{"loc": loc, "msg": self.message, "type": "value_error"}]})
    }
}

/// Parse a JSON body into `T`, naming the field a wrong type is in.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Invalid> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = (path != "." && path != "?").then_some(path);
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("malformed JSON: {inner}")
        } else {
            inner.to_string()
        };
        Invalid { field, message }
    })
}

/// A base64 image field (with or without a `data:image/png;base64,` prefix) as an image.
pub fn decode_image(field: &str, text: &str) -> Result<Image, Invalid> {
    let bytes = decode_base64(field, text)?;
    Image::from_png_bytes(&bytes, field)
        .map_err(|e| Invalid::field(field, format!("not a PNG image: {e}")))
}

pub fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, Invalid> {
    let data = match text.split_once(";base64,") {
        Some((head, data)) if head.starts_with("data:") => data,
        _ => text,
    };
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| Invalid::field(field, format!("not base64: {e}")))
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The engine's sampler for A1111's `sampler_name` (or `sampler_index`) and `scheduler`.
fn sampler(r: &GenerationRequest) -> Result<Option<SamplerKind>, Invalid> {
    let name = r.sampler_name.as_deref().or(r.sampler_index.as_deref());
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    SamplerKind::from_a1111(name, r.scheduler.as_deref())
        .map(Some)
        .map_err(|e| Invalid::field("sampler_name", e.to_string()))
}

/// The init image and the mask (inverted where asked), decoded from base64.
fn input_images(r: &GenerationRequest) -> Result<(Option<Image>, Option<Image>), Invalid> {
    let init_image = match r.init_images.as_deref() {
        Some([]) => return Err(Invalid::field("init_images", "give at least one image")),
        Some([first, ..]) => Some(decode_image("init_images", first)?),
        None => None,
    };
    let mask = match &r.mask {
        Some(_) if init_image.is_none() => {
            return Err(Invalid::field("mask", "a mask needs init_images"))
        }
        Some(m) => {
            let mut mask = decode_image("mask", m)?;
            if r.inpainting_mask_invert.unwrap_or(0) != 0 {
                mask.rgb.iter_mut().for_each(|v| *v = 255 - *v);
            }
            Some(mask)
        }
        None => None,
    };
    Ok((init_image, mask))
}

/// The server's limits (size, steps, images per request) and the seed's range; `r`'s size is
/// filled in already. Sizes are multiplied in u128: 65536² must be refused, not wrap.
fn check_limits(r: &GenerationRequest, limits: &Limits) -> Result<(), Invalid> {
    let (width, height) = (r.width.unwrap_or(0), r.height.unwrap_or(0));
    if (width as u128) * (height as u128) > limits.max_pixels as u128 {
        return Err(Invalid::field(
            "width",
            format!(
                "{width}×{height} is over this server's limit of {} pixels (--max-pixels)",
                limits.max_pixels
            ),
        ));
    }
    if r.steps == 0 || r.steps > limits.max_steps {
        return Err(Invalid::field(
            "steps",
            format!("steps must be in 1..={} (--max-steps)", limits.max_steps),
        ));
    }
    let images = r.batch_size.saturating_mul(r.n_iter);
    if r.batch_size == 0 || r.n_iter == 0 || images > limits.max_batch {
        return Err(Invalid::field(
            "batch_size",
            format!(
                "batch_size × n_iter must be in 1..={} (--max-batch)",
                limits.max_batch
            ),
        ));
    }
    if r.seed < -1 {
        return Err(Invalid::field(
            "seed",
            "seed must be -1 (random) or a non-negative integer",
        ));
    }
    Ok(())
}

/// Fill the defaults (size, seed) into `r` and build the engine's job, checking everything that
/// needs no model: the engine's own `validate` and the server's limits.
pub fn to_job(
    r: &mut GenerationRequest,
    native_size: usize,
    limits: &Limits,
) -> Result<GenJob, Invalid> {
    let Some(prompt) = r.prompt.clone() else {
        return Err(Invalid::field("prompt", "field required"));
    };
    let (init_image, mask) = input_images(r)?;
    let init_size = init_image.as_ref().map(|i| (i.width, i.height));
    let width = r.width.or(init_size.map(|s| s.0)).unwrap_or(native_size);
    let height = r.height.or(init_size.map(|s| s.1)).unwrap_or(native_size);
    r.width = Some(width);
    r.height = Some(height);
    check_limits(r, limits)?;
    if r.seed == -1 {
        r.seed = crate::rng::random_seed() as i64;
    }
    let mut req = GenerateRequest {
        prompt,
        negative_prompt: r.negative_prompt.clone(),
        width,
        height,
        steps: r.steps,
        guidance_scale: r.cfg_scale,
        seed: r.seed as u64,
        batch_size: r.batch_size,
        sampler: sampler(r)?,
        eta: r.eta,
        // A1111 gives image i of a batch the seed + i.
        seed_mode: SeedMode::PerImage,
        init_image,
        mask,
        ..GenerateRequest::default()
    };
    if req.init_image.is_some() {
        req.strength = r.denoising_strength.unwrap_or(0.75);
        r.denoising_strength = Some(req.strength);
    }
    // A1111's "Clip skip" counts the last layer as 1; the engine's clip_skip=1 is A1111's 2.
    if let Some(v) = r.override_settings.get("CLIP_stop_at_last_layers") {
        match v.as_u64() {
            Some(n) if n >= 2 => req.clip_skip = Some(n as usize - 1),
            Some(_) => {}
            None => {
                return Err(Invalid::field(
                    "override_settings.CLIP_stop_at_last_layers",
                    "an integer",
                ))
            }
        }
    }
    req.validate()
        .map_err(|e| Invalid::general(e.to_string()))?;
    Ok(GenJob {
        req,
        n_iter: r.n_iter,
    })
}

/// A1111's `job_timestamp` (`%Y%m%d%H%M%S`, UTC here).
pub fn job_timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The txt2img/img2img response: `{images, parameters, info}` (`info` a JSON string).
pub fn response(r: &GenerationRequest, job: &GenJob, out: &JobOutput) -> Value {
    let req = &job.req;
    let n = out.images.len();
    // Without one in the request, the model's scheduler config chose it: the infotext names it.
    let sampler_name = match (req.sampler, out.images.first()) {
        (Some(kind), _) => json!(kind.a1111_name()),
        (None, Some(image)) => parse_infotext(&image.infotext)
            .remove("Sampler")
            .unwrap_or(Value::Null),
        (None, None) => Value::Null,
    };
    let seeds: Vec<u64> = out.images.iter().map(|i| i.seed).collect();
    let prompt = r.prompt.clone().unwrap_or_default();
    let info = json!({
        "prompt": prompt,
        "all_prompts": vec![&prompt; n],
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": vec![&req.negative_prompt; n],
        "seed": req.seed,
        "all_seeds": seeds,
        "subseed": r.subseed,
        "all_subseeds": vec![r.subseed; n],
        "subseed_strength": r.subseed_strength,
        "width": req.width,
        "height": req.height,
        "sampler_name": sampler_name,
        "scheduler": r.scheduler,
        "cfg_scale": req.guidance_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": false,
        "sd_model_name": out.model_name,
        "sd_model_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": r.denoising_strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": out.images.iter().map(|i| &i.infotext).collect::<Vec<_>>(),
        "styles": r.styles,
        "job_timestamp": job_timestamp(),
        "clip_skip": req.clip_skip.map_or(1, |k| k + 1),
        "is_using_inpainting_conditioning": false,
        "interrupted": out.interrupted,
        "version": concat!("ldm-wgpu ", env!("CARGO_PKG_VERSION")),
    });
    let images: Vec<String> = if r.send_images {
        out.images.iter().map(|i| b64(&i.png)).collect()
    } else {
        Vec::new()
    };
    json!({
        "images": images,
        "parameters": r,
        "info": info.to_string(),
    })
}

/// `/sdapi/v1/samplers`: every sampler by its A1111 name, with our CLI name as an alias.
pub fn samplers() -> Value {
    let list: Vec<Value> = SamplerKind::ALL
        .iter()
        .map(|k| {
            json!({
                "name": k.a1111_name(),
                "aliases": [k.name()],
                "options": {"scheduler": k.description()},
            })
        })
        .collect();
    Value::Array(list)
}

/// `/sdapi/v1/schedulers`: the ones `scheduler` accepts.
pub fn schedulers() -> Value {
    json!([
        {"name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1,
         "need_inner_model": false},
        {"name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0,
         "need_inner_model": false},
    ])
}

/// A1111's infotext (`parameters`) parsed: the prompt, the negative prompt and the last line's
/// `key: value` pairs (values may be JSON-quoted).
pub fn parse_infotext(text: &str) -> Map<String, Value> {
    let mut out = Map::new();
    let mut lines: Vec<&str> = text.lines().collect();
    let settings = match lines.last() {
        Some(l) if l.contains("Steps: ") => lines.pop().unwrap_or_default(),
        _ => "",
    };
    let mut prompt = Vec::new();
    let mut negative = Vec::new();
    let mut in_negative = false;
    for line in lines {
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative.push(rest.trim_start());
        } else if in_negative {
            negative.push(line);
        } else {
            prompt.push(line);
        }
    }
    out.insert("Prompt".into(), json!(prompt.join("\n")));
    out.insert("Negative prompt".into(), json!(negative.join("\n")));
    for (key, value) in split_settings(settings) {
        out.insert(key, json!(value));
    }
    out
}

/// `Steps: 20, Sampler: Euler a, Lora hashes: "a: 1, b: 2"` → pairs.
fn split_settings(line: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = line.trim();
    while let Some((key, after)) = rest.split_once(": ") {
        let (value, next) = if after.starts_with('"') {
            // A JSON string: up to its closing quote.
            let mut de = serde_json::Deserializer::from_str(after).into_iter::<String>();
            match de.next() {
                Some(Ok(v)) => {
                    let used = de.byte_offset();
                    (v, &after[used..])
                }
                _ => (after.to_string(), ""),
            }
        } else {
            match after.find(", ") {
                Some(i) => (after[..i].to_string(), &after[i..]),
                None => (after.to_string(), ""),
            }
        };
        pairs.push((key.trim().to_string(), value));
        rest = next.trim_start_matches(',').trim_start();
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infotext_round_trip() {
        let text = "a cat\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, CFG scale: 7, \
                    Lora hashes: \"x: 1, y: 2\", Version: ldm";
        let p = parse_infotext(text);
        assert_eq!(p["Prompt"], "a cat");
        assert_eq!(p["Negative prompt"], "blurry");
        assert_eq!(p["Steps"], "4");
        assert_eq!(p["Sampler"], "Euler a");
        assert_eq!(p["Lora hashes"], "x: 1, y: 2");
        assert_eq!(p["Version"], "ldm");
    }

    #[test]
    fn timestamp_is_a_date() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20427), (2025, 12, 5));
        assert_eq!(job_timestamp().len(), 14);
    }

    #[test]
    fn limits_are_checked_without_overflow() {
        let limits = Limits {
            max_pixels: 1 << 20,
            max_steps: 100,
            max_batch: 8,
        };
        let mut r = GenerationRequest {
            prompt: Some("x".into()),
            width: Some(65536),
            height: Some(65536),
            ..Default::default()
        };
        assert!(to_job(&mut r, 64, &limits).is_err());
        let mut r = GenerationRequest {
            prompt: Some("x".into()),
            sampler_name: Some("DPM++ 2M".into()),
            scheduler: Some("Karras".into()),
            ..Default::default()
        };
        let job = to_job(&mut r, 64, &limits).ok().unwrap();
        assert_eq!(job.req.sampler, Some(SamplerKind::DpmPP2MKarras));
        assert!(r.seed >= 0);
    }
}
