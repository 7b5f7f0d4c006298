//! Generation requests: the C struct, its copy into a `GenerateRequest` (nothing of the
//! caller's memory is kept), the run with progress and cancellation, and the result.

use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ldm_wgpu::image::Image;
use ldm_wgpu::lora::PromptLoras;
use ldm_wgpu::pipeline::{GenerateRequest, Progress, SeedMode, StableDiffusion};

use crate::{
    guard, ldm_model, ldm_result, ldm_status, opt_str, out, AppliedKey, Failure, Model, Outcome,
    MODELS, RESULTS,
};
use ldm_status::*;

/// An RGB8 image: `rgb` points to width × height × 3 bytes, rows top to bottom, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ldm_image {
    pub width: u32,
    pub height: u32,
    pub rgb: *const u8,
}

/// A LoRA file to apply for a request, with its weight (A1111's one number for the U-Net and the
/// text encoders; negative weights are allowed).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ldm_lora {
    /// Path of a LoRA `.safetensors` file (kohya/A1111, LyCORIS LoCon, PEFT or diffusers names).
    pub path: *const c_char,
    pub weight: f32,
}

/// What the progress callback receives after each denoising step. Valid during the call only.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ldm_progress {
    /// Steps done, 1 to `total`.
    pub step: u32,
    /// Model calls in this generation (steps, less those img2img strength skips).
    pub total: u32,
    /// Seconds since the generation began.
    pub elapsed_seconds: f64,
    /// With `ldm_request.preview` set: a cheap preview of the first image (the latents mapped
    /// to RGB, upscaled to the image size), `preview.rgb` valid during the call only; otherwise
    /// all zero.
    pub preview: ldm_image,
}

/// Called on the generating thread after each step; return nonzero to go on, 0 to cancel
/// (the generation then ends with LDM_ERR_CANCELLED). Must not call `ldm_job_wait` on its own
/// job.
pub type ldm_progress_fn =
    Option<unsafe extern "C" fn(progress: *const ldm_progress, user_data: *mut c_void) -> i32>;

/// One generation. Fill with `ldm_request_default` first, then set at least `prompt`. Every
/// string is UTF-8; the library copies what it needs before `ldm_generate` /
/// `ldm_generate_async` return, so the request and its buffers may be freed right after.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ldm_request {
    /// The prompt (required; "" is allowed). A1111 emphasis syntax is understood.
    pub prompt: *const c_char,
    /// NULL or the negative prompt.
    pub negative_prompt: *const c_char,
    /// SDXL: NULL (the prompt) or the prompt for the second text encoder (diffusers'
    /// `prompt_2`); other models ignore it.
    pub prompt_2: *const c_char,
    /// SDXL: NULL (the negative prompt) or the second encoder's negative prompt
    /// (`negative_prompt_2`); other models ignore it.
    pub negative_prompt_2: *const c_char,
    /// Image size, multiples of 8; 0: the init image's size, else the model's native size.
    pub width: u32,
    pub height: u32,
    /// Denoising steps (default 25).
    pub steps: u32,
    /// Classifier-free guidance scale (default 7.5; at most 1 turns guidance off).
    pub guidance: f64,
    /// NULL (the model's scheduler) or a sampler name: "euler_a", "dpmpp_2m_karras", an A1111
    /// name such as "DPM++ 2M Karras", or a diffusers class name (`ldm samplers` lists them).
    pub sampler: *const c_char,
    /// The seed; image i of a batch uses `seed` (one generator, as diffusers) unless
    /// `seed_per_image` is set (seed + i, as A1111).
    pub seed: u64,
    pub seed_per_image: i32,
    /// Images in the batch (default 1).
    pub batch: u32,
    /// NULL, or the img2img / inpainting source (needs a model loaded with the encoder).
    pub init_image: *const ldm_image,
    /// How much of the init image to repaint, 0 to 1 (default 0.8).
    pub strength: f64,
    /// NULL, or the inpainting mask (white = repaint), the init image's size.
    pub mask: *const ldm_image,
    /// NULL, or a folder of textual-inversion embeddings (.safetensors): a prompt word equal to
    /// a file's name stands for its vectors.
    pub embeddings_dir: *const c_char,
    /// NULL, or `lora_count` LoRA files to apply for this request (merged into the model's
    /// weights before it runs, removed exactly when a later request asks for others).
    pub loras: *const ldm_lora,
    pub lora_count: u32,
    /// NULL, or where the prompt's `<lora:NAME:WEIGHT>` tags find NAME.safetensors (default:
    /// `loras/` beside the model if it exists, else the current directory). The tags leave the
    /// prompt the text encoder reads and stay in the recorded `parameters` text.
    pub lora_dir: *const c_char,
    /// NULL, or called after each step with `user_data`.
    pub progress: ldm_progress_fn,
    pub user_data: *mut c_void,
    /// Nonzero: pass a preview image to the progress callback (costs a small GPU pass per step).
    pub preview: i32,
}

/// Fills `out` with the defaults (those of the `ldm` CLI): no prompt, native size, 25 steps,
/// guidance 7.5, the model's sampler, seed 0, one image, strength 0.8, no callback.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn ldm_request_default(out: *mut ldm_request) -> ldm_status {
    guard(|| {
        let d = GenerateRequest::default();
        *self::out(out, "out")? = ldm_request {
            prompt: std::ptr::null(),
            negative_prompt: std::ptr::null(),
            prompt_2: std::ptr::null(),
            negative_prompt_2: std::ptr::null(),
            width: 0,
            height: 0,
            steps: d.steps as u32,
            guidance: d.guidance_scale,
            sampler: std::ptr::null(),
            seed: 0,
            seed_per_image: 0,
            batch: 1,
            init_image: std::ptr::null(),
            strength: d.strength,
            mask: std::ptr::null(),
            embeddings_dir: std::ptr::null(),
            loras: std::ptr::null(),
            lora_count: 0,
            lora_dir: std::ptr::null(),
            progress: None,
            user_data: std::ptr::null_mut(),
            preview: 0,
        };
        Ok(())
    })
}

/// The callback and its user data, carried to the generating thread. The caller promises that
/// the callback may be called from another thread (header: ldm_generate_async).
#[derive(Clone, Copy)]
pub(crate) struct Callback {
    f: ldm_progress_fn,
    user_data: *mut c_void,
    preview: bool,
}

// SAFETY: the pointer is only handed back to the caller's own callback (see above).
unsafe impl Send for Callback {}

/// A request copied out of the caller's memory.
pub(crate) struct OwnedRequest {
    req: GenerateRequest,
    /// Sizes the caller left to the model (0): filled when the model is known.
    width: Option<usize>,
    height: Option<usize>,
    embeddings_dir: Option<PathBuf>,
    /// `request.loras` (path, weight), then the prompt's `<lora:…>` tags.
    lora_files: Vec<(PathBuf, f32)>,
    tagged: PromptLoras,
    /// The prompt as typed with a tag per `request.loras` file: what `parameters` records.
    recorded_prompt: String,
    callback: Callback,
}

fn copy_image(ptr: *const ldm_image, what: &str) -> Outcome<Option<Image>> {
    // SAFETY: null or pointing to an `ldm_image` (header).
    let Some(img) = (unsafe { ptr.as_ref() }) else {
        return Ok(None);
    };
    let (w, h) = (img.width as usize, img.height as usize);
    if w == 0 || h == 0 || img.rgb.is_null() {
        return Err(Failure::invalid(format!(
            "{what}: {w}×{h} with pixels at {:p} (give a size and the pixels)",
            img.rgb
        )));
    }
    let bytes = w
        .checked_mul(h)
        .and_then(|n| n.checked_mul(3))
        .filter(|&n| n as u64 <= ldm_wgpu::image::MAX_IMAGE_PIXELS * 3)
        .ok_or_else(|| Failure::invalid(format!("{what}: {w}×{h} is too large")))?;
    // SAFETY: the caller promises width × height × 3 readable bytes (header).
    let rgb = unsafe { std::slice::from_raw_parts(img.rgb, bytes) }.to_vec();
    Ok(Some(Image {
        width: w,
        height: h,
        rgb,
    }))
}

fn copy_loras(ptr: *const ldm_lora, count: u32) -> Outcome<Vec<(PathBuf, f32)>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(Failure::invalid(format!(
            "request.loras is NULL with request.lora_count {count}"
        )));
    }
    // SAFETY: the caller promises `count` readable `ldm_lora`s (header).
    let loras = unsafe { std::slice::from_raw_parts(ptr, count as usize) };
    loras
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let path = PathBuf::from(crate::req_str(l.path, &format!("request.loras[{i}].path"))?);
            if !l.weight.is_finite() {
                return Err(Failure::invalid(format!(
                    "request.loras[{i}].weight {} is not a finite number",
                    l.weight
                )));
            }
            if !path.is_file() {
                return Err(Failure::invalid(format!(
                    "request.loras[{i}].path: no file {}",
                    path.display()
                )));
            }
            Ok((path, l.weight))
        })
        .collect()
}

impl OwnedRequest {
    /// Copies `r` for the model at `model_path` (where `<lora:…>` tags look by default).
    pub(crate) fn from_c(r: *const ldm_request, model_path: &Path) -> Outcome<OwnedRequest> {
        // SAFETY: null or pointing to an `ldm_request` (header).
        let r = unsafe { r.as_ref() }.ok_or_else(|| Failure::invalid("request is NULL"))?;
        let mut req = GenerateRequest {
            prompt: crate::req_str(r.prompt, "request.prompt")?,
            negative_prompt: opt_str(r.negative_prompt, "request.negative_prompt")?
                .unwrap_or_default(),
            prompt_2: opt_str(r.prompt_2, "request.prompt_2")?,
            negative_prompt_2: opt_str(r.negative_prompt_2, "request.negative_prompt_2")?,
            steps: r.steps as usize,
            guidance_scale: r.guidance,
            seed: r.seed,
            batch_size: r.batch as usize,
            strength: r.strength,
            init_image: copy_image(r.init_image, "request.init_image")?,
            mask: copy_image(r.mask, "request.mask")?,
            ..Default::default()
        };
        if let Some(name) = opt_str(r.sampler, "request.sampler")? {
            req.sampler = Some(name.parse().map_err(Failure::from)?);
        }
        if r.seed_per_image != 0 {
            req.seed_mode = SeedMode::PerImage;
        }
        let size = |v: u32, from_init: Option<usize>| match v {
            0 => from_init,
            v => Some(v as usize),
        };
        let init_w = req.init_image.as_ref().map(|i| i.width);
        let init_h = req.init_image.as_ref().map(|i| i.height);
        let (width, height) = (size(r.width, init_w), size(r.height, init_h));
        // Checks that need no model, before anything runs (sizes stand in as 8 until known).
        req.width = width.unwrap_or(8);
        req.height = height.unwrap_or(8);
        req.validate()?;
        let embeddings_dir =
            opt_str(r.embeddings_dir, "request.embeddings_dir")?.map(PathBuf::from);
        if let Some(dir) = &embeddings_dir {
            if !dir.is_dir() {
                return Err(Failure::invalid(format!(
                    "request.embeddings_dir {}: not a directory",
                    dir.display()
                )));
            }
        }
        let lora_files = copy_loras(r.loras, r.lora_count)?;
        let lora_dir = match opt_str(r.lora_dir, "request.lora_dir")? {
            Some(dir) => PathBuf::from(dir),
            None => ldm_wgpu::lora::default_lora_dir(model_path),
        };
        let tagged = ldm_wgpu::lora::prompt_loras(&req.prompt, &lora_dir)?;
        let recorded_prompt = ldm_wgpu::lora::prompt_with_lora_tags(&req.prompt, &lora_files);
        req.prompt = tagged.text.clone();
        Ok(OwnedRequest {
            req,
            width,
            height,
            embeddings_dir,
            lora_files,
            tagged,
            recorded_prompt,
            callback: Callback {
                f: r.progress,
                user_data: r.user_data,
                preview: r.preview != 0,
            },
        })
    }
}

/// A finished generation's images with their seeds and `parameters` texts.
pub(crate) struct Output {
    pub(crate) images: Vec<Image>,
    pub(crate) seeds: Vec<u64>,
    pub(crate) parameters: Vec<CString>,
}

impl Output {
    pub(crate) fn image(&self, index: u32) -> Outcome<&Image> {
        self.images.get(index as usize).ok_or_else(|| {
            Failure::invalid(format!(
                "image index {index} (the result has {})",
                self.images.len()
            ))
        })
    }
}

fn cancelled() -> Failure {
    Failure::new(LDM_ERR_CANCELLED, "the generation was cancelled")
}

/// Uses the request's embeddings folder (loading it when it is not the one in use).
fn use_embeddings(
    model: &Model,
    dir: &Option<PathBuf>,
    in_use: &mut Option<PathBuf>,
) -> Outcome<()> {
    if dir == in_use {
        return Ok(());
    }
    let mut sd = model.sd.write().unwrap_or_else(|p| p.into_inner());
    let sd = sd
        .as_mut()
        .ok_or_else(|| Failure::new(LDM_ERR_UNLOADED, "the model is unloaded"))?;
    let found = match dir {
        Some(dir) => ldm_wgpu::embeddings::load_dir(dir)?.0,
        None => Vec::new(),
    };
    sd.set_embeddings(&found)?;
    *in_use = dir.clone();
    Ok(())
}

/// Applies the request's LoRAs (when they are not the set applied now: merging is skipped for
/// a repeated set) and returns A1111's `Lora hashes` entries for its `parameters` text.
fn use_loras(
    sd: &StableDiffusion,
    request: &OwnedRequest,
    in_use: &mut Vec<AppliedKey>,
) -> Outcome<Vec<String>> {
    let specs = sd.open_lora_specs(&request.lora_files, &request.tagged)?;
    let wanted: Vec<AppliedKey> = request
        .lora_files
        .iter()
        .map(|(p, w)| (p.clone(), *w, *w))
        .chain(request.tagged.loras.iter().map(|(p, tag)| {
            let (te, unet) = (tag.text_encoder_weight as f32, tag.unet_weight as f32);
            (p.clone(), te, unet)
        }))
        .collect();
    if wanted != *in_use {
        // On an error the model may be left without LoRAs: forget the set in use first.
        in_use.clear();
        sd.set_loras(&specs)?;
        *in_use = wanted;
    }
    Ok(ldm_wgpu::lora::a1111_lora_hashes(&specs))
}

/// Runs a request on a model. `cancel` is read after every step (and before starting); a cancel
/// that arrives during the final decode discards its images.
pub(crate) fn run(model: &Model, request: OwnedRequest, cancel: &AtomicBool) -> Outcome<Output> {
    let mut in_use = model.requests.lock().unwrap_or_else(|p| p.into_inner());
    if cancel.load(Ordering::SeqCst) {
        return Err(cancelled());
    }
    use_embeddings(model, &request.embeddings_dir, &mut in_use.embeddings)?;
    let sd = model.sd.read().unwrap_or_else(|p| p.into_inner());
    let sd = sd
        .as_ref()
        .ok_or_else(|| Failure::new(LDM_ERR_UNLOADED, "the model is unloaded"))?;
    let lora_hashes = use_loras(sd, &request, &mut in_use.loras)?;
    let mut req = request.req.clone();
    let native = sd.unet.config.sample_size * sd.vae.config.downscale();
    req.width = request.width.unwrap_or(native);
    req.height = request.height.unwrap_or(native);
    let callback = request.callback;
    let mut on_step = |p: &Progress<'_>| -> bool {
        if cancel.load(Ordering::SeqCst) {
            return false;
        }
        let Some(f) = callback.f else {
            return true;
        };
        let preview = callback.preview.then(|| preview_image(sd, p)).flatten();
        let c = ldm_progress {
            step: (p.call + 1) as u32,
            total: p.calls as u32,
            elapsed_seconds: p.elapsed.as_secs_f64(),
            preview: preview.as_ref().map_or(
                ldm_image {
                    width: 0,
                    height: 0,
                    rgb: std::ptr::null(),
                },
                |img| ldm_image {
                    width: img.width as u32,
                    height: img.height as u32,
                    rgb: img.rgb.as_ptr(),
                },
            ),
        };
        // SAFETY: the caller's callback with its own user data (header).
        unsafe { f(&c, callback.user_data) != 0 }
    };
    let out = match sd.generate(&req, &mut on_step) {
        Err(_) if cancel.load(Ordering::SeqCst) => return Err(cancelled()),
        Err(ldm_wgpu::Error::InvalidInput(m)) if m == "cancelled" => return Err(cancelled()),
        other => other?,
    };
    // A cancel that came while the last step's images were decoded: the caller asked for
    // nothing, so nothing is returned.
    if cancel.load(Ordering::SeqCst) {
        return Err(cancelled());
    }
    let mut seeds = Vec::new();
    let mut parameters = Vec::new();
    for i in 0..out.images.len() {
        let seed = match req.seed_mode {
            SeedMode::Batch => req.seed,
            SeedMode::PerImage => req.seed.wrapping_add(i as u64),
        };
        let text = ldm_wgpu::parameters::a1111_parameters(
            &req,
            &ldm_wgpu::parameters::Recorded {
                prompt: &request.recorded_prompt,
                model: &model.name,
                lora_hashes: &lora_hashes,
                refiner: None,
            },
            sd,
            seed,
            i,
        );
        seeds.push(seed);
        parameters.push(CString::new(text.replace('\0', "")).unwrap_or_default());
    }
    Ok(Output {
        images: out.images,
        seeds,
        parameters,
    })
}

/// The cheap latent preview of the first image at image size (the CLI's `--preview`).
fn preview_image(sd: &StableDiffusion, p: &Progress<'_>) -> Option<Image> {
    let img = ldm_wgpu::preview::latent_preview(&sd.gpu, p.latents, 0).ok()?;
    Some(ldm_wgpu::preview::upscale(&img, sd.vae.config.downscale()))
}

/// Generates on the calling thread. `request->progress` (if any) is called on this thread. On
/// success `*result` is a new result handle (free it with `ldm_result_free`); on failure NULL.
/// Thread-safe: generations on different models run in parallel; on one model they run one
/// after another. To cancel from another thread, use `ldm_generate_async` and `ldm_cancel`.
#[no_mangle]
pub unsafe extern "C" fn ldm_generate(
    model: *mut ldm_model,
    request: *const ldm_request,
    result: *mut *mut ldm_result,
) -> ldm_status {
    guard(|| {
        let slot = out(result, "result")?;
        *slot = std::ptr::null_mut();
        let m = MODELS.get(model)?;
        let request = OwnedRequest::from_c(request, &m.path)?;
        let output = run(&m, request, &AtomicBool::new(false))?;
        *slot = RESULTS.insert(output);
        Ok(())
    })
}
