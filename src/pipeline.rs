//! Stable Diffusion pipelines on the engine: txt2img, img2img and inpainting, mirroring
//! diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline` (+ the legacy latent-blending inpaint for 4-channel U-Nets),
//! and their SDXL counterparts (`StableDiffusionXLPipeline`, `...Img2ImgPipeline` with the base +
//! refiner handoff through `denoising_end` / `denoising_start`, `...InpaintPipeline`), with
//! seeds drawn exactly as `torch.Generator('cpu').manual_seed(seed)` draws them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::embeddings::Embedding;
use crate::image::Image;
use crate::kernels::{elementwise, emphasis, fill, sampler_step};
use crate::lora::{
    lora_targets, AppliedLora, LoraBackup, LoraSpec, LoraState, ModelSites, PromptLoras,
};
use crate::models::clip::{ClipConfig, ClipTextModel, ClipTextModelWithProjection};
use crate::models::unet::{ImageConditioning, UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig, VaeTiling};
use crate::prompt::{encode_weighted, tokenize_weighted, Chunking, WeightedChunk, WeightedPrompt};
use crate::rng::{PhiloxRng, RandnVariant, TorchCpuRng};
use crate::sched::{
    build_sampler, calls_before_denoising_end, execute_on_gpu, Buf, GpuBuffers, Sampler,
    SamplerKind, SchedulerConfig,
};
use crate::tokenizer::ClipTokenizer;
use crate::weights::lora::{open_lora, Lora, LoraTarget, LoraTargets};
use crate::weights::{self, LoadOptions, ModelFamily};
use crate::{DType, Error, Gpu, Result, Tensor};

/// How the noise is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RngKind {
    /// torch CPU `randn`, AVX2 math (what diffusers gives on x86 machines; the default).
    TorchCpu,
    /// torch CPU `randn`, scalar libm math (non-AVX2 builds).
    TorchCpuScalar,
    /// torch CUDA-style Philox noise, as the A1111 web UI draws it on NVIDIA GPUs.
    Philox,
}

impl std::str::FromStr for RngKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" | "torch" | "torch-cpu" => Ok(RngKind::TorchCpu),
            "cpu-scalar" | "torch-cpu-scalar" => Ok(RngKind::TorchCpuScalar),
            "philox" | "gpu" | "cuda" => Ok(RngKind::Philox),
            _ => Err(Error::InvalidInput(format!(
                "unknown --rng `{s}` (cpu, cpu-scalar, philox)"
            ))),
        }
    }
}

/// How seeds apply to a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedMode {
    /// diffusers: one generator seeded once draws the whole batch.
    Batch,
    /// A1111: image i of the batch uses its own generator seeded with seed + i.
    PerImage,
}

enum Noise {
    Torch(TorchCpuRng),
    Philox(PhiloxRng),
}

impl Noise {
    fn new(kind: RngKind, seed: u64) -> Self {
        match kind {
            RngKind::TorchCpu => Noise::Torch(TorchCpuRng::with_variant(seed, RandnVariant::Avx2)),
            RngKind::TorchCpuScalar => {
                Noise::Torch(TorchCpuRng::with_variant(seed, RandnVariant::Scalar))
            }
            RngKind::Philox => Noise::Philox(PhiloxRng::new(seed)),
        }
    }
    fn randn(&mut self, n: usize) -> Vec<f32> {
        match self {
            Noise::Torch(r) => r.randn(n),
            Noise::Philox(r) => r.randn(n),
        }
    }
}

/// The generators of one batch: draws NCHW noise for the whole batch in the order diffusers
/// (one generator) or A1111 (one per image) would.
struct BatchNoise {
    gens: Vec<Noise>,
}

impl BatchNoise {
    fn new(kind: RngKind, seed: u64, batch: usize, mode: SeedMode) -> Self {
        let gens = match mode {
            SeedMode::Batch => vec![Noise::new(kind, seed)],
            SeedMode::PerImage => (0..batch as u64)
                .map(|i| Noise::new(kind, seed.wrapping_add(i)))
                .collect(),
        };
        BatchNoise { gens }
    }
    /// `batch × per_image` values in NCHW order.
    fn draw(&mut self, batch: usize, per_image: usize) -> Vec<f32> {
        if self.gens.len() == 1 {
            self.gens[0].randn(batch * per_image)
        } else {
            self.gens
                .iter_mut()
                .flat_map(|g| g.randn(per_image))
                .collect()
        }
    }
    /// Noise for one image's worth of VAE posterior sampling, repeated over the batch in NCHW
    /// order: diffusers encodes the single init image once (`vae.encode(image).latent_dist
    /// .sample(generator)` draws `per_image` values) and repeats the latents over the batch;
    /// with one generator per image, each image samples its own.
    fn draw_shared(&mut self, batch: usize, per_image: usize) -> Vec<f32> {
        if self.gens.len() == 1 {
            self.gens[0].randn(per_image).repeat(batch)
        } else {
            self.draw(batch, per_image)
        }
    }
}

/// The result of a model-loading thread (a panic there becomes an error, not a crash).
fn join_loader<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(Error::Device("a model-loading thread panicked".into())))
}

/// NCHW host data -> NHWC host data (the RNG draws in torch's NCHW order; our tensors are NHWC).
fn nchw_to_nhwc_host(x: &[f32], b: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for ci in 0..c {
            for yi in 0..h {
                for xi in 0..w {
                    out[((bi * h + yi) * w + xi) * c + ci] = x[((bi * c + ci) * h + yi) * w + xi];
                }
            }
        }
    }
    out
}

/// One generation request (the CLI's flags).
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The prompt, encoded as given: A1111's `<lora:NAME:w>` tags are not read here (resolve
    /// them with [`crate::lora::prompt_loras`] and [`StableDiffusion::set_loras`], as the CLI
    /// does, and pass the text without them).
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    pub batch_size: usize,
    pub sampler: Option<SamplerKind>,
    pub clip_skip: Option<usize>,
    pub rng: RngKind,
    pub seed_mode: SeedMode,
    /// Split prompts longer than 75 tokens into chunks encoded separately (A1111 style)
    /// instead of truncating (diffusers style).
    pub long_prompts: bool,
    /// A1111 prompt emphasis: `(word)`, `[word]`, `(word:1.3)`, `BREAK` (on by default, as in
    /// A1111; off, brackets are plain text as in diffusers). Prompts without that syntax are
    /// encoded exactly as diffusers encodes them either way.
    pub prompt_weighting: bool,
    pub eta: Option<f64>,
    /// img2img / inpainting source image and how much of it to repaint (diffusers `strength`).
    pub init_image: Option<Image>,
    pub strength: f64,
    /// Inpainting mask (white = repaint), same size as the image.
    pub mask: Option<Image>,
    /// Tiled VAE decode/encode: automatic (when the activations would not fit), on or off.
    pub vae_tiling: VaeTiling,
    /// SDXL: the prompt for the second text encoder (diffusers' `prompt_2`; None or empty: the
    /// prompt), and likewise the negative prompt's (`negative_prompt_2`).
    pub prompt_2: Option<String>,
    pub negative_prompt_2: Option<String>,
    /// SDXL with `force_zeros_for_empty_prompt` (model_index.json): an empty `negative_prompt`
    /// stands for none given, which diffusers turns into zero embeddings (pooled included);
    /// set this for diffusers' explicit `negative_prompt=""`, which is encoded instead.
    pub encode_empty_negative: bool,
    /// SDXL micro-conditioning, as (width, height) and (x, y) here (diffusers' tuples are
    /// (height, width) and (top, left)): the size the image claims to come from (default: the
    /// requested size), the crop's top-left corner (default (0, 0)) and the target size
    /// (default: the requested size). The negative pass gets the same ids.
    pub original_size: Option<(usize, usize)>,
    pub crop_top_left: (usize, usize),
    pub target_size: Option<(usize, usize)>,
    /// SDXL models whose folder sets `requires_aesthetics_score` (the refiner's conditioning):
    /// the score in the prompt's time ids (in place of the target size) and the negative
    /// pass's (diffusers' defaults 6.0 and 2.5).
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
    /// Stop the denoising early, as diffusers' `denoising_end` (the SDXL base of a base +
    /// refiner pair): only the timesteps at or above `(1 - denoising_end) · num_train_timesteps`
    /// run, and the latents come out still noisy. In (0, 1).
    pub denoising_end: Option<f64>,
    /// Start the denoising late, as diffusers' `denoising_start` (the SDXL refiner after a base
    /// run): only the timesteps below `(1 - denoising_start) · num_train_timesteps` run (one
    /// more for second-order samplers where the count is even), `strength` is ignored and no
    /// noise is added to the starting latents (`init_latents`, or the init image's). In (0, 1).
    pub denoising_start: Option<f64>,
    /// img2img from latents instead of an image: NHWC `[batch, height/f, width/f, channels]`
    /// f32, scaled as the U-Net sees them (what [`Generated::latents`] holds, e.g. a base run's
    /// with `denoising_end` and `latents_only`), used as diffusers uses a 4-channel `image`: no
    /// VAE encode.
    pub init_latents: Option<Vec<f32>>,
    /// Return the final latents without decoding them (diffusers' `output_type="latent"`):
    /// [`Generated::images`] is then empty.
    pub latents_only: bool,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            steps: 25,
            guidance_scale: 7.5,
            seed: 0,
            batch_size: 1,
            sampler: None,
            clip_skip: None,
            rng: RngKind::TorchCpu,
            seed_mode: SeedMode::Batch,
            long_prompts: false,
            prompt_weighting: true,
            eta: None,
            init_image: None,
            strength: 0.8,
            mask: None,
            vae_tiling: VaeTiling::Auto,
            prompt_2: None,
            negative_prompt_2: None,
            encode_empty_negative: false,
            original_size: None,
            crop_top_left: (0, 0),
            target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
            denoising_end: None,
            denoising_start: None,
            init_latents: None,
            latents_only: false,
        }
    }
}

impl GenerateRequest {
    /// The checks that need no model: sizes, counts, ranges, finite numbers, and that the
    /// images match the requested size. `generate` runs them first; a caller can run them
    /// before loading anything (the CLI does), so a bad request fails in milliseconds.
    pub fn validate(&self) -> Result<()> {
        if self.prompt_weighting {
            let empty = String::new();
            for (what, text) in [
                ("prompt", &self.prompt),
                ("negative prompt", &self.negative_prompt),
                ("prompt 2", self.prompt_2.as_ref().unwrap_or(&empty)),
                (
                    "negative prompt 2",
                    self.negative_prompt_2.as_ref().unwrap_or(&empty),
                ),
            ] {
                crate::prompt::check_weights(text)
                    .map_err(|m| Error::InvalidInput(format!("{what}: {m}")))?;
            }
        }
        if self.width == 0
            || self.height == 0
            || !self.width.is_multiple_of(8)
            || !self.height.is_multiple_of(8)
        {
            return Err(Error::InvalidInput(format!(
                "width and height must be positive multiples of 8 (got {}×{})",
                self.width, self.height
            )));
        }
        if self.batch_size == 0 || self.steps == 0 {
            return Err(Error::InvalidInput(
                "batch size and steps must be at least 1".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.strength) {
            return Err(Error::InvalidInput(format!(
                "strength must be in [0, 1] (got {})",
                self.strength
            )));
        }
        // NaN compares false with everything, so a NaN guidance scale would silently switch
        // classifier-free guidance off (`guidance_scale > 1` is false) instead of failing.
        if !self.guidance_scale.is_finite() {
            return Err(Error::InvalidInput(format!(
                "guidance scale must be a finite number (got {})",
                self.guidance_scale
            )));
        }
        if let Some(eta) = self.eta {
            if !eta.is_finite() || eta < 0.0 {
                return Err(Error::InvalidInput(format!(
                    "eta must be a finite number ≥ 0 (got {eta})"
                )));
            }
        }
        for (what, size) in [
            ("original size", self.original_size),
            ("target size", self.target_size),
        ] {
            if let Some((w, h)) = size {
                if w == 0 || h == 0 || w > 1 << 16 || h > 1 << 16 {
                    return Err(Error::InvalidInput(format!(
                        "{what} must be positive and at most 65536 (got {w}×{h})"
                    )));
                }
            }
        }
        for (what, v) in [
            ("aesthetic score", self.aesthetic_score),
            ("negative aesthetic score", self.negative_aesthetic_score),
        ] {
            if !v.is_finite() {
                return Err(Error::InvalidInput(format!(
                    "{what} must be a finite number (got {v})"
                )));
            }
        }
        if self.crop_top_left.0 > 1 << 16 || self.crop_top_left.1 > 1 << 16 {
            return Err(Error::InvalidInput(format!(
                "crop top-left must be at most 65536 (got {:?})",
                self.crop_top_left
            )));
        }
        if self.mask.is_some() && self.init_image.is_none() {
            return Err(Error::InvalidInput("a mask needs an init image".into()));
        }
        self.validate_handoff()?;
        for (what, img) in [("init image", &self.init_image), ("mask", &self.mask)] {
            if let Some(img) = img {
                if img.width != self.width || img.height != self.height {
                    return Err(Error::InvalidInput(format!(
                        "{what} is {}×{}, but the requested size is {}×{}",
                        img.width, img.height, self.width, self.height
                    )));
                }
            }
        }
        Ok(())
    }
}

impl GenerateRequest {
    /// `denoising_end`, `denoising_start` and `init_latents` (a base + refiner handoff): values
    /// in (0, 1) — diffusers silently ignores others, we refuse them —, a start before the end,
    /// and a start only where there is something to start from.
    fn validate_handoff(&self) -> Result<()> {
        for (what, v) in [
            ("denoising end", self.denoising_end),
            ("denoising start", self.denoising_start),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v < 1.0) {
                    return Err(Error::InvalidInput(format!(
                        "{what} must be between 0 and 1, both excluded (got {v})"
                    )));
                }
            }
        }
        if let (Some(start), Some(end)) = (self.denoising_start, self.denoising_end) {
            if start >= end {
                return Err(Error::InvalidInput(format!(
                    "denoising start {start} must be before denoising end {end}"
                )));
            }
        }
        if self.init_latents.is_some() && self.init_image.is_some() {
            return Err(Error::InvalidInput(
                "give init latents or an init image, not both".into(),
            ));
        }
        if self.denoising_start.is_some()
            && self.init_latents.is_none()
            && self.init_image.is_none()
        {
            return Err(Error::InvalidInput(
                "a denoising start needs latents (or an image) to start from".into(),
            ));
        }
        if self.mask.is_some() && (self.denoising_start.is_some() || self.init_latents.is_some()) {
            return Err(Error::Unsupported(
                "inpainting from latents or with a denoising start (a refiner over an \
                 inpainting run)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Reported after each model call; return `false` from the callback to cancel.
pub struct Progress<'a> {
    pub call: usize,
    pub calls: usize,
    pub timestep: f64,
    pub elapsed: Duration,
    /// The current latents, NHWC [B, h, w, 4] (download only if you need a preview).
    pub latents: &'a Tensor,
    /// What the U-Net's input scaling does to these latents (1 for the DDPM family, 1/√(σ²+1)
    /// for the sigma-based samplers, 1 after the last step): multiplied in, they are in the
    /// range a decoder expects (for previews).
    pub preview_scale: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub load: Duration,
    pub text_encode: Duration,
    pub steps: Vec<Duration>,
    pub decode: Duration,
    pub total: Duration,
}

pub struct Generated {
    /// The decoded images (none with [`GenerateRequest::latents_only`]).
    pub images: Vec<Image>,
    pub timings: Timings,
    /// Final latents NHWC [B, h, w, C] before the VAE (for parity checks).
    pub latents: Vec<f32>,
    pub truncated_prompt: bool,
}

// `StableDiffusion` is shared across threads by apps (load once, generate from anywhere);
// concurrent `generate` calls are serialised.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<StableDiffusion>();
};

/// SDXL's second text encoder and what goes with it.
pub struct SdxlEncoder {
    /// `tokenizer_2` (pads with "!").
    pub tokenizer: ClipTokenizer,
    /// `text_encoder_2` (OpenCLIP ViT-bigG in SDXL base).
    pub text_encoder: ClipTextModelWithProjection,
    /// model_index.json's `force_zeros_for_empty_prompt`.
    pub force_zeros_for_empty_prompt: bool,
    /// model_index.json's `requires_aesthetics_score`: time ids end with an aesthetic score
    /// instead of the target size.
    pub requires_aesthetics_score: bool,
}

/// The text conditioning of one generation.
struct PromptEmbeds {
    /// [2B or B, 77·chunks, C] (uncond first when guided).
    context: Tensor,
    /// SDXL: the U-Net's added embedding per row ([2B or B, 4·C0], from the pooled embeddings
    /// and the time ids).
    added: Option<Tensor>,
    truncated: bool,
}

/// A loaded Stable Diffusion 1.x / 2.x or SDXL model.
pub struct StableDiffusion {
    pub gpu: Gpu,
    /// The first text encoder's tokenizer (a folder without that encoder, the SDXL refiner:
    /// `tokenizer_2`'s, so that prompt checks and `embeddings_in` still read words).
    pub tokenizer: ClipTokenizer,
    /// The first text encoder (CLIP ViT-L for SD 1.x and SDXL base; OpenCLIP for SD 2.x). None
    /// only for an SDXL folder without one (the refiner: `text_encoder_2` alone).
    pub text_encoder: Option<ClipTextModel>,
    /// SDXL's second encoder (None for SD 1.x/2.x).
    pub sdxl: Option<SdxlEncoder>,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub family: ModelFamily,
    pub dtype: DType,
    pub vae_dtype: DType,
    pub load_time: Duration,
    /// Held for the duration of a `generate`, so calls from several threads run one after
    /// another (they share one device queue and command recorder anyway).
    generation: std::sync::Mutex<()>,
    /// Peak activation bytes per pixel of work, measured on the runs so far (for refusing
    /// requests over a memory budget up front).
    bytes_per_pixel: std::sync::Mutex<Option<f64>>,
    /// Decode final images with this tiny autoencoder (TAESD) instead of the VAE: much faster,
    /// a little less detailed (`--vae-decoder`); set with [`StableDiffusion::set_tiny_decoder`].
    tiny_decoder: Option<crate::models::taesd::AutoencoderTiny>,
    /// The LoRAs merged into the U-Net's and text encoder's weights, and the originals of the
    /// weights they changed ([`StableDiffusion::set_loras`]).
    loras: std::sync::Mutex<LoraState>,
    /// Textual-inversion embeddings in use: (name, the token ids standing for its vectors).
    embeddings: Vec<(String, Vec<u32>)>,
}

/// What [`StableDiffusion::set_embeddings`] did with each embedding.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EmbeddingsReport {
    /// Usable with this model: (name, number of vectors).
    pub loaded: Vec<(String, usize)>,
    /// Not usable with this model, with the reason (e.g. SDXL vectors for an SD 1.x encoder).
    pub skipped: Vec<(String, String)>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Options for loading a model.
#[derive(Clone, Debug, Default)]
pub struct ModelOptions {
    /// Storage dtype (default: f16 where the adapter has SHADER_F16).
    pub dtype: Option<DType>,
    /// Keep the VAE in f32 even when the rest runs in f16 (default: the config's force_upcast).
    pub vae_f32: Option<bool>,
    /// Load the VAE encoder (needed for img2img and inpainting).
    pub with_encoder: bool,
    pub load: LoadOptions,
    /// Tokenizer folder for single-file checkpoints (default: the one shipped in weights/).
    pub tokenizer_dir: Option<PathBuf>,
    /// A stand-alone AutoencoderKL folder used instead of the model's VAE (diffusers layout, as
    /// `AutoencoderKL.from_pretrained` reads it: e.g. sd-vae-ft-mse, or sdxl-vae-fp16-fix, which
    /// runs in f16 where the original overflows).
    pub vae_dir: Option<PathBuf>,
    /// Where [`StableDiffusion::set_loras`] keeps the original values of the weights it changes.
    pub lora_backup: LoraBackup,
}

/// The model shipped in `weights/` (used when no `--model` is given).
pub fn default_model_dir() -> PathBuf {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("weights")
        .join("tiny-shapes");
    if shipped.is_dir() {
        return shipped;
    }
    PathBuf::from("weights").join("tiny-shapes")
}

impl StableDiffusion {
    pub fn load(gpu: Gpu, model: &Path, opts: &ModelOptions) -> Result<Self> {
        let start = Instant::now();
        let dtype = opts.dtype.unwrap_or(gpu.compute_dtype());
        gpu.require_dtype(dtype)?;
        let mut w = weights::open_model(model, &opts.load)?;
        if let Some(dir) = &opts.vae_dir {
            w.vae = weights::open_component(dir, weights::ComponentKind::Vae, &opts.load)?;
        }
        let tokenizer_dir = match &opts.tokenizer_dir {
            Some(d) => d.clone(),
            None if model.join("tokenizer").is_dir() => model.join("tokenizer"),
            None if w.text_encoder.is_none() && model.join("tokenizer_2").is_dir() => {
                model.join("tokenizer_2")
            }
            None => default_model_dir().join("tokenizer"),
        };
        let mut tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
        if w.family == ModelFamily::Sd2
            && !model.join("tokenizer").is_dir()
            && opts.tokenizer_dir.is_none()
        {
            // SD 2.x (OpenCLIP) pads with id 0 ("!"); single files carry no tokenizer.
            tokenizer.set_pad_id(0);
        }
        let vae_config = VaeConfig::from_json(&w.vae.config)?;
        let vae_dtype = match (dtype, opts.vae_f32.unwrap_or(vae_config.force_upcast)) {
            (DType::F16, true) => DType::F32,
            (d, _) => d,
        };
        let clip_config = match &w.text_encoder {
            Some(c) => Some(ClipConfig::from_json(&c.config)?),
            None => None,
        };
        let unet_config = UNetConfig::from_json(&w.unet.config)?;
        let clip_2_config = match &w.text_encoder_2 {
            Some(c) => Some(ClipConfig::from_json(&c.config)?),
            None => None,
        };
        let time_ids = if w.requires_aesthetics_score { 5 } else { 6 };
        check_sdxl_widths(
            clip_config.as_ref(),
            clip_2_config.as_ref(),
            &unet_config,
            time_ids,
        )?;
        let tokenizer_2 = match &w.text_encoder_2 {
            Some(_) if model.join("tokenizer_2").is_dir() => {
                Some(ClipTokenizer::from_dir(&model.join("tokenizer_2"))?)
            }
            Some(_) => {
                // SDXL's tokenizer_2 is CLIP's vocabulary padding with "!" (id 0).
                let mut t = ClipTokenizer::from_dir(&tokenizer_dir)?;
                t.set_pad_id(0);
                Some(t)
            }
            None => None,
        };
        if vae_config.latent_channels != unet_config.out_channels {
            return Err(Error::InvalidInput(format!(
                "the VAE has {} latent channels, the U-Net works on {}: they are not from one \
                 model family",
                vae_config.latent_channels, unet_config.out_channels
            )));
        }
        // The three models load on their own threads: reading, converting and reordering the
        // U-Net's ~1.7 GB dominates, and the text encoder and VAE overlap with it (wgpu's device
        // and queue are thread-safe; uploads are copied into staging memory as they come).
        let (text_encoder, text_encoder_2, unet, vae) = std::thread::scope(|s| {
            let gpu = &gpu;
            let text_encoder = s.spawn(|| match (&w.text_encoder, clip_config) {
                (Some(c), Some(config)) => {
                    ClipTextModel::load(gpu, &c.weights.root(), config, dtype).map(Some)
                }
                _ => Ok(None),
            });
            let text_encoder_2 = s.spawn(|| match (&w.text_encoder_2, clip_2_config) {
                (Some(c), Some(config)) => {
                    ClipTextModelWithProjection::load(gpu, &c.weights.root(), config, dtype)
                        .map(Some)
                }
                _ => Ok(None),
            });
            let vae = s.spawn(|| {
                AutoencoderKL::load(
                    gpu,
                    &w.vae.weights.root(),
                    vae_config,
                    vae_dtype,
                    opts.with_encoder,
                )
            });
            let unet = UNet2DConditionModel::load(gpu, &w.unet.weights.root(), unet_config, dtype);
            (
                join_loader(text_encoder),
                join_loader(text_encoder_2),
                unet,
                join_loader(vae),
            )
        });
        let (text_encoder, unet, vae) = (text_encoder?, unet?, vae?);
        let sdxl = match (text_encoder_2?, tokenizer_2) {
            (Some(text_encoder), Some(tokenizer)) => Some(SdxlEncoder {
                tokenizer,
                text_encoder,
                force_zeros_for_empty_prompt: w.force_zeros_for_empty_prompt,
                requires_aesthetics_score: w.requires_aesthetics_score,
            }),
            _ => None,
        };
        let scheduler_config = SchedulerConfig::from_value(&w.scheduler_config)?;
        gpu.flush()?;
        Ok(StableDiffusion {
            gpu,
            tokenizer,
            text_encoder,
            sdxl,
            unet,
            vae,
            scheduler_config,
            family: w.family,
            dtype,
            vae_dtype,
            load_time: start.elapsed(),
            generation: std::sync::Mutex::new(()),
            bytes_per_pixel: std::sync::Mutex::new(None),
            tiny_decoder: None,
            embeddings: Vec::new(),
            loras: std::sync::Mutex::new(LoraState::new(opts.lora_backup)),
        })
    }

    /// Textual-inversion embeddings for the following generations: an embedding's name, as a
    /// word of the prompt or the negative prompt, stands for its vectors (diffusers'
    /// `load_textual_inversion`, A1111's embeddings folder). Replaces any earlier set; an empty
    /// slice removes them. Embeddings without vectors for this text encoder's width are skipped
    /// and reported. SDXL needs vectors for both encoders (`clip_l` for text_encoder, `clip_g`
    /// for text_encoder_2, told apart by their widths), the same number of each; each encoder
    /// gets its own rows and each tokenizer the same words (diffusers: `load_textual_inversion`
    /// once per encoder and tokenizer).
    pub fn set_embeddings(&mut self, embeddings: &[Embedding]) -> Result<EmbeddingsReport> {
        let Some(text_encoder) = self.text_encoder.as_ref() else {
            let why = "textual inversion on a model without a first text encoder (the SDXL \
                       refiner) is not supported yet";
            let skipped = embeddings
                .iter()
                .map(|e| (e.name.clone(), why.to_string()))
                .collect();
            return Ok(EmbeddingsReport {
                loaded: Vec::new(),
                skipped,
            });
        };
        let width = text_encoder.config.hidden_size;
        let width_2 = self
            .sdxl
            .as_ref()
            .map(|xl| xl.text_encoder.text_model.config.hidden_size);
        let first = text_encoder.config.vocab_size as u32;
        let first_2 = self
            .sdxl
            .as_ref()
            .map_or(0, |xl| xl.text_encoder.text_model.config.vocab_size as u32);
        let mut report = EmbeddingsReport::default();
        let (mut rows, mut words) = (Vec::<f32>::new(), Vec::<(String, Vec<u32>)>::new());
        let (mut rows_2, mut words_2) = (Vec::<f32>::new(), Vec::<(String, Vec<u32>)>::new());
        for e in embeddings {
            let usable = match (e.vectors(width), width_2.map(|w| e.vectors(w))) {
                (Some(v), None) => Ok((v, None)),
                (Some(v), Some(Some(v2))) if v.0 == v2.0 => Ok((v, Some(v2))),
                (Some(v), Some(Some(v2))) => Err(format!(
                    "has {} vectors for text_encoder and {} for text_encoder_2",
                    v.0, v2.0
                )),
                (_, Some(_)) => Err(format!(
                    "has vectors of width {:?}; this SDXL model needs both {width} (clip_l) and \
                     {} (clip_g)",
                    e.widths(),
                    width_2.unwrap_or(0)
                )),
                (None, None) => Err(format!(
                    "has vectors of width {:?}, this text encoder is {width} wide",
                    e.widths()
                )),
            };
            let ((count, values), second) = match usable {
                Ok(v) => v,
                Err(why) => {
                    report.skipped.push((e.name.clone(), why));
                    continue;
                }
            };
            if words
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case(&e.name))
            {
                report
                    .skipped
                    .push((e.name.clone(), "another embedding has this name".into()));
                continue;
            }
            let start = first + (rows.len() / width) as u32;
            words.push((e.name.clone(), (start..start + count as u32).collect()));
            rows.extend_from_slice(values);
            if let (Some((_, values_2)), Some(w2)) = (second, width_2) {
                let start = first_2 + (rows_2.len() / w2) as u32;
                words_2.push((e.name.clone(), (start..start + count as u32).collect()));
                rows_2.extend_from_slice(values_2);
            }
            report.loaded.push((e.name.clone(), count));
        }
        if let Some(text_encoder) = self.text_encoder.as_mut() {
            text_encoder.set_extra_tokens(&self.gpu, &rows, rows.len() / width)?;
        }
        self.tokenizer.set_embedding_tokens(&words);
        if let (Some(xl), Some(w2)) = (self.sdxl.as_mut(), width_2) {
            xl.text_encoder
                .text_model
                .set_extra_tokens(&self.gpu, &rows_2, rows_2.len() / w2)?;
            xl.tokenizer.set_embedding_tokens(&words_2);
        }
        self.embeddings = words;
        Ok(report)
    }

    /// The embeddings `prompt` uses (by name, in order of first use).
    pub fn embeddings_in(&self, prompt: &str) -> Vec<String> {
        let ids = self.tokenizer.tokenize(prompt);
        let mut used: Vec<(usize, String)> = self
            .embeddings
            .iter()
            .filter_map(|(name, vectors)| {
                ids.iter()
                    .position(|id| vectors.contains(id))
                    .map(|at| (at, name.clone()))
            })
            .collect();
        used.sort();
        used.into_iter().map(|(_, name)| name).collect()
    }

    /// The weights of this model a LoRA may change, by model (U-Net, text encoder when there
    /// is one, SDXL's second text encoder).
    fn lora_sites(&self) -> Vec<ModelSites<'_>> {
        let mut models = vec![ModelSites {
            target: LoraTarget::Unet,
            sites: &self.unet.lora_sites,
        }];
        if let Some(te) = &self.text_encoder {
            models.push(ModelSites {
                target: LoraTarget::TextEncoder,
                sites: &te.lora_sites,
            });
        }
        if let Some(xl) = &self.sdxl {
            models.push(ModelSites {
                target: LoraTarget::TextEncoder2,
                sites: &xl.text_encoder.text_model.lora_sites,
            });
        }
        models
    }

    /// The weights of this model a LoRA file may name (to open one with
    /// [`crate::weights::lora::open_lora`]).
    pub fn lora_targets(&self) -> LoraTargets {
        lora_targets(&self.lora_sites())
    }

    /// Open a LoRA file for this model: every layer in it matched to one of its weights (else an
    /// error listing those that match nothing).
    pub fn open_lora(&self, path: &Path) -> Result<Lora> {
        Ok(open_lora(path, &self.lora_targets())?)
    }

    /// Open the LoRAs of a request for this model: `files` (path, weight: A1111's one number
    /// for the U-Net and the text encoders), then the prompt's `<lora:…>` tags.
    pub fn open_lora_specs(
        &self,
        files: &[(PathBuf, f32)],
        tagged: &PromptLoras,
    ) -> Result<Vec<LoraSpec>> {
        let mut specs = Vec::new();
        for (path, weight) in files {
            specs.push(LoraSpec::new(self.open_lora(path)?, *weight));
        }
        for (path, tag) in &tagged.loras {
            specs.push(LoraSpec {
                lora: self.open_lora(path)?,
                text_encoder_weight: tag.text_encoder_weight as f32,
                unet_weight: tag.unet_weight as f32,
            });
        }
        Ok(specs)
    }

    /// Make `loras` the LoRAs applied to this model, replacing the ones applied before (an
    /// empty list restores the base model, bit for bit). Each weight they change is merged on
    /// the GPU from its original values, which are kept while it is changed (where
    /// [`ModelOptions::lora_backup`] says: host memory by default). Waits
    /// for a running `generate` to finish. On an error the model is left as it was (if the
    /// LoRAs could not be matched) or without LoRAs (if merging failed).
    pub fn set_loras(&self, loras: &[LoraSpec]) -> Result<Vec<AppliedLora>> {
        let _no_generation = lock(&self.generation);
        let applied = lock(&self.loras).set(&self.gpu, &self.lora_sites(), loras);
        // The U-Net's folded projections are products of weights a LoRA may have changed (or,
        // after an error, restored): recompute them either way.
        self.unet.refold(&self.gpu)?;
        self.gpu.flush()?;
        applied
    }

    /// Remove every LoRA: the base model's weights, bit for bit.
    pub fn clear_loras(&self) -> Result<()> {
        self.set_loras(&[]).map(|_| ())
    }

    /// Where the originals of LoRA'd weights are kept ([`ModelOptions::lora_backup`]).
    pub fn lora_backup(&self) -> LoraBackup {
        lock(&self.loras).backup()
    }

    /// The LoRAs applied now.
    pub fn loras(&self) -> Vec<AppliedLora> {
        lock(&self.loras).applied().to_vec()
    }

    /// Bytes held (in host or GPU memory, [`ModelOptions::lora_backup`]) to restore the weights
    /// the applied LoRAs changed.
    pub fn lora_saved_bytes(&self) -> u64 {
        lock(&self.loras).saved_bytes()
    }

    /// Token ids (and emphasis weights) for one prompt: one 77-token window, or several when
    /// chunking long prompts; true when tokens were dropped to fit one window.
    fn prompt_windows(&self, prompt: &str, req: &GenerateRequest) -> (WeightedPrompt, bool) {
        let pieces = crate::prompt::parse_attention(prompt);
        let plain = pieces == [crate::prompt::Piece::Text(prompt.to_string(), 1.0)];
        if req.prompt_weighting && !plain {
            let chunking = if req.long_prompts {
                Chunking::Chunks
            } else {
                Chunking::Truncate
            };
            let w = tokenize_weighted(&self.tokenizer, &pieces, chunking);
            let truncated = w.truncated;
            return (w, truncated);
        }
        // No emphasis syntax (or weighting off): the tokenizer exactly as diffusers calls it.
        let (rows, truncated) = if req.long_prompts {
            (self.tokenizer.encode_chunked(prompt), false)
        } else {
            let e = self.tokenizer.encode_padded(prompt);
            (vec![e.ids], e.truncated)
        };
        let chunks = rows
            .into_iter()
            .map(|ids| WeightedChunk {
                weights: vec![1.0; ids.len()],
                ids,
            })
            .collect();
        (WeightedPrompt { chunks, truncated }, truncated)
    }

    /// Text embeddings [B, 77·chunks, C] for `prompt` repeated `batch` times, and the matching
    /// negative embeddings when guided (diffusers' `encode_prompt`; A1111's emphasis where the
    /// prompt uses it).
    fn encode_prompt(&self, req: &GenerateRequest, guided: bool) -> Result<(Tensor, bool)> {
        // Only SDXL folders load without it (and they encode in `encode_prompt_sdxl`).
        let text_encoder = self
            .text_encoder
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("this model has no text encoder".into()))?;
        let (mut pos, truncated) = self.prompt_windows(&req.prompt, req);
        let (mut neg, _) = self.prompt_windows(&req.negative_prompt, req);
        // Chunked prompt and negative prompt must have the same length (A1111 pads the shorter
        // with empty chunks).
        let chunks = pos.chunks.len().max(neg.chunks.len());
        let empty = self.prompt_windows("", req).0.chunks.remove(0);
        pos.chunks.resize(chunks, empty.clone());
        neg.chunks.resize(chunks, empty);
        let encode = |p: &WeightedPrompt, clip_skip: Option<usize>| {
            // Each chunk is encoded on its own (positions restart), then concatenated along
            // the sequence: [chunks, 77, C] -> [1, chunks·77, C].
            encode_weighted(&self.gpu, text_encoder, p, clip_skip)
        };
        let cond = encode(&pos, req.clip_skip)?;
        let b = req.batch_size;
        let mut parts = Vec::new();
        if guided {
            // diffusers' encode_prompt applies clip_skip to the prompt only: the negative
            // prompt always takes the last layer (tests/pipeline.rs checks this against it).
            let uncond = encode(&neg, None)?;
            for _ in 0..b {
                parts.push(uncond.clone());
            }
        }
        for _ in 0..b {
            parts.push(cond.clone());
        }
        let mut ctx = parts[0].clone();
        for p in &parts[1..] {
            ctx = elementwise::concat_batch(&self.gpu, &ctx, p)?;
        }
        Ok((ctx, truncated))
    }

    /// The text conditioning `generate` would give the U-Net for `req`: the context
    /// [rows, 77·chunks, C] (uncond rows first when `guided`) and, for SDXL, the added
    /// embedding [rows, 4·C0]. For tests and tools that check the prompt path alone.
    pub fn text_conditioning(
        &self,
        req: &GenerateRequest,
        guided: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let e = self.prompt_embeds(req, guided)?;
        Ok((e.context, e.added))
    }

    /// The text conditioning of `req`: SD 1.x/2.x's [`Self::encode_prompt`] or SDXL's
    /// [`Self::encode_prompt_sdxl`].
    fn prompt_embeds(&self, req: &GenerateRequest, guided: bool) -> Result<PromptEmbeds> {
        match &self.sdxl {
            Some(xl) => self.encode_prompt_sdxl(xl, req, guided),
            None => {
                let (context, truncated) = self.encode_prompt(req, guided)?;
                Ok(PromptEmbeds {
                    context,
                    added: None,
                    truncated,
                })
            }
        }
    }

    /// One prompt through both SDXL encoders, as diffusers' `StableDiffusionXLPipeline
    /// .encode_prompt` does per prompt: each tokenizer pads to 77 (tokenizer_2 with "!"), each
    /// encoder's `hidden_states[-(clip_skip + 2)]` (no final layer norm), concatenated on
    /// channels ([1, 77, C1 + C2]), and encoder 2's pooled, projected output [1, P]. True when
    /// either tokenizer truncated. A prompt with A1111's emphasis syntax (when `weighting`) is
    /// weighted as A1111's SDXL conditioner does it: each embedder
    /// (`FrozenCLIPEmbedderWithCustomWordsBase`) tokenizes the pieces and weights its own
    /// output's rows, restoring that output's mean, before the two are concatenated; the pooled
    /// output is the unweighted one.
    /// Without a first encoder (the refiner) encoder 2 alone reads `prompt` — not `prompt_2`:
    /// diffusers zips `[prompt, prompt_2]` with the one encoder it has — giving [1, 77, C2].
    ///
    /// With `long` (`--long-prompts`), A1111's SDXL conditioner: each tokenizer cuts the prompt
    /// into 75-token chunks as the SD 1.x path does ([`ClipTokenizer::encode_chunked`], or
    /// `tokenize_weighted`'s chunks with emphasis), padded with empty-prompt chunks to
    /// `min_chunks` (and to each other); every chunk goes through both encoders on its own and
    /// the contexts are concatenated along the sequence ([1, 77·chunks, C1 + C2]); the pooled
    /// output is the first chunk's.
    fn encode_pair_sdxl(
        &self,
        xl: &SdxlEncoder,
        prompts: [&str; 2],
        clip_skip: Option<usize>,
        weighting: bool,
        long: bool,
        min_chunks: usize,
    ) -> Result<(Tensor, Tensor, bool)> {
        let gpu = &self.gpu;
        let weigh = |h: Tensor, w: &WeightedChunk| match w.is_weighted() {
            true => emphasis::emphasis(gpu, &h, &w.weights), // [1, 77, C]
            false => Ok(h),
        };
        let (w1, mut w2) = match &self.text_encoder {
            Some(_) => (
                Some(sdxl_windows(&self.tokenizer, prompts[0], weighting, long)),
                sdxl_windows(&xl.tokenizer, prompts[1], weighting, long),
            ),
            None => (
                None,
                sdxl_windows(&xl.tokenizer, prompts[0], weighting, long),
            ),
        };
        let mut w1 = w1;
        let chunks = min_chunks
            .max(w2.chunks.len())
            .max(w1.as_ref().map_or(0, |w| w.chunks.len()));
        let pad = |w: &mut SdxlWindows, tokenizer: &ClipTokenizer| {
            let empty = sdxl_windows(tokenizer, "", weighting, false)
                .chunks
                .remove(0);
            w.chunks.resize(chunks, empty);
        };
        pad(&mut w2, &xl.tokenizer);
        if let Some(w1) = &mut w1 {
            pad(w1, &self.tokenizer);
        }
        let truncated = w2.truncated || w1.as_ref().is_some_and(|w| w.truncated);
        let mut context: Option<Tensor> = None;
        let mut first_pooled: Option<Tensor> = None;
        for i in 0..chunks {
            let c2 = &w2.chunks[i];
            let (h2, pooled) = xl.text_encoder.forward_sdxl(gpu, &c2.ids, 1, clip_skip)?; // [1, 77, C2], [1, P]
            let h2 = weigh(h2, c2)?;
            let part = match (&self.text_encoder, &w1) {
                (Some(text_encoder), Some(w1)) => {
                    let c1 = &w1.chunks[i];
                    let h1 = text_encoder.penultimate(gpu, &c1.ids, 1, clip_skip)?; // [1, 77, C1]
                    let h1 = weigh(h1, c1)?;
                    elementwise::concat_channels(gpu, &h1, &h2)? // [1, 77, C1 + C2]
                }
                _ => h2,
            };
            context = Some(match context {
                None => part,
                Some(ctx) => {
                    // [1, 77·i, C] ++ [1, 77, C] along the sequence, through the batch axis.
                    let [_, n, c] = [ctx.dim(0), ctx.dim(1), ctx.dim(2)];
                    let flat = elementwise::concat_batch(
                        gpu,
                        &ctx.reshape(&[n, c])?,
                        &part.reshape(&[part.dim(1), c])?,
                    )?; // [77·(i+1), C]
                    flat.reshape(&[1, n + part.dim(1), c])?
                }
            });
            if first_pooled.is_none() {
                first_pooled = Some(pooled);
            }
        }
        let context = context.expect("at least one chunk");
        Ok((context, first_pooled.expect("one chunk"), truncated))
    }

    /// The number of 75-token chunks `prompts` take in SDXL's encoders (1 without `long`).
    fn sdxl_chunk_count(&self, xl: &SdxlEncoder, prompts: [&str; 2], weighting: bool) -> usize {
        let n2 = |p| sdxl_windows(&xl.tokenizer, p, weighting, true).chunks.len();
        match &self.text_encoder {
            Some(_) => sdxl_windows(&self.tokenizer, prompts[0], weighting, true)
                .chunks
                .len()
                .max(n2(prompts[1])),
            None => n2(prompts[0]),
        }
    }

    /// SDXL's `encode_prompt` and `_get_add_time_ids`: the context [2B or B, 77, C1 + C2]
    /// (uncond rows first when guided) and the U-Net's added embedding per row, from the pooled
    /// embeddings and the micro-conditioning ids (the same for both passes). Without a negative
    /// prompt and with `force_zeros_for_empty_prompt`, the uncond rows are zeros (pooled
    /// included); the negative prompt ignores `clip_skip`, as in diffusers.
    fn encode_prompt_sdxl(
        &self,
        xl: &SdxlEncoder,
        req: &GenerateRequest,
        guided: bool,
    ) -> Result<PromptEmbeds> {
        let gpu = &self.gpu;
        // diffusers: `prompt_2 = prompt_2 or prompt`, `negative_prompt_2 = negative_prompt_2 or
        // negative_prompt` (an empty string counts as none).
        let or_first = |second: &Option<String>, first: &str| -> String {
            match second.as_deref() {
                Some(p) if !p.is_empty() => p.to_string(),
                _ => first.to_string(),
            }
        };
        let prompt_2 = or_first(&req.prompt_2, &req.prompt);
        let weighting = req.prompt_weighting;
        let zero_negative = xl.force_zeros_for_empty_prompt
            && req.negative_prompt.is_empty()
            && !req.encode_empty_negative;
        let negative_2 = or_first(&req.negative_prompt_2, &req.negative_prompt);
        let negatives = [req.negative_prompt.as_str(), &negative_2];
        let long = req.long_prompts;
        // A1111 pads the shorter of prompt and negative with empty chunks.
        let chunks = match long && guided && !zero_negative {
            true => self.sdxl_chunk_count(xl, negatives, weighting),
            false => 1,
        };
        let prompts = [req.prompt.as_str(), &prompt_2];
        let (cond, cond_pooled, truncated) =
            self.encode_pair_sdxl(xl, prompts, req.clip_skip, weighting, long, chunks)?;
        let uncond = match (guided, zero_negative) {
            (false, _) => None,
            (true, true) => {
                let context = gpu.empty(cond.shape(), cond.dtype())?; // [1, 77·chunks, C]
                fill::fill(gpu, &context, 0.0)?;
                let pooled = gpu.empty(cond_pooled.shape(), cond_pooled.dtype())?; // [1, P]
                fill::fill(gpu, &pooled, 0.0)?;
                Some((context, pooled))
            }
            (true, false) => {
                let chunks = cond.dim(1) / 77;
                let (context, pooled, _) =
                    self.encode_pair_sdxl(xl, negatives, None, weighting, long, chunks)?;
                Some((context, pooled))
            }
        };
        // Rows: [uncond × B; cond × B] (or cond × B), each with its time ids.
        let b = req.batch_size;
        let aesthetics = xl.requires_aesthetics_score;
        let mut rows: Vec<(&Tensor, &Tensor, Vec<f32>)> = Vec::with_capacity(2 * b);
        if let Some((context, pooled)) = &uncond {
            let ids = add_time_ids(req, aesthetics, true);
            rows.extend(std::iter::repeat_n((context, pooled, ids), b));
        }
        let ids = add_time_ids(req, aesthetics, false);
        rows.extend(std::iter::repeat_n((&cond, &cond_pooled, ids), b));
        let (mut context, mut pooled) = (rows[0].0.clone(), rows[0].1.clone());
        for (c, p, _) in &rows[1..] {
            context = elementwise::concat_batch(gpu, &context, c)?; // [rows, 77, C]
            pooled = elementwise::concat_batch(gpu, &pooled, p)?; // [rows, P]
        }
        let time_ids: Vec<f32> = rows.iter().flat_map(|(_, _, ids)| ids.clone()).collect();
        let added = self.unet.added_embedding(gpu, &pooled, &time_ids)?; // [rows, 4C0]
        Ok(PromptEmbeds {
            context,
            added: Some(added),
            truncated,
        })
    }

    /// diffusers' `check_inputs`: sizes, counts and the images a request needs.
    fn check_inputs(&self, req: &GenerateRequest) -> Result<()> {
        req.validate()?;
        if self.sdxl.is_some() {
            Self::check_sdxl_request(req)?;
        }
        let f = 1 << (self.vae.config.block_out_channels.len() - 1);
        let m = f * self.unet.config.latent_multiple();
        if !req.width.is_multiple_of(m) || !req.height.is_multiple_of(m) {
            return Err(Error::InvalidInput(format!(
                "this model needs width and height that are multiples of {m} (got {}×{})",
                req.width, req.height
            )));
        }
        if let Some(latents) = &req.init_latents {
            let channels = self.vae.config.latent_channels;
            let want = req.batch_size * (req.height / f) * (req.width / f) * channels;
            if latents.len() != want {
                return Err(Error::InvalidInput(format!(
                    "init latents hold {} values; {} × {}×{} × {channels} channels ([batch, \
                     height/{f}, width/{f}, channels], NHWC) are {want}",
                    latents.len(),
                    req.batch_size,
                    req.height / f,
                    req.width / f
                )));
            }
            if latents.iter().any(|v| !v.is_finite()) {
                return Err(Error::InvalidInput(
                    "init latents are not all finite".into(),
                ));
            }
        }
        if self.unet.config.in_channels == 9 && req.mask.is_none() {
            return Err(Error::InvalidInput(
                "this is an inpainting model: give --init-image and --mask".into(),
            ));
        }
        if ![4, 9].contains(&self.unet.config.in_channels) {
            return Err(Error::Unsupported(format!(
                "U-Net with {} input channels",
                self.unet.config.in_channels
            )));
        }
        Ok(())
    }

    /// What the SDXL pipeline does not run yet is refused, not approximated.
    fn check_sdxl_request(_req: &GenerateRequest) -> Result<()> {
        Ok(())
    }

    /// Run the pipeline. `progress` is called after each model call; returning false cancels.
    ///
    /// The phases of diffusers' `StableDiffusionPipeline.__call__`, in its order: check the
    /// inputs, encode the prompt, prepare the timesteps and the latents, denoise, decode.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(&Progress<'_>) -> bool,
    ) -> Result<Generated> {
        let _one_at_a_time = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.generate_locked(req, progress);
        // The fused GroupNorms' statistics tables are the request's, finished or failed.
        self.unet.release_norm_tables();
        result
    }

    fn generate_locked(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(&Progress<'_>) -> bool,
    ) -> Result<Generated> {
        self.check_inputs(req)?;
        self.check_memory(req)?;
        let baseline = self.gpu.begin_peak_window();
        let job = self.job(req);
        let mut timings = Timings {
            load: self.load_time,
            ..Default::default()
        };

        let embeds = self.prompt_embeds(req, job.guided)?;
        let truncated = embeds.truncated;
        self.gpu.flush()?;
        timings.text_encode = job.start.elapsed();

        let (mut sampler, calls) = self.prepare_timesteps(req)?;
        let mut noise = BatchNoise::new(req.rng, req.seed, job.batch, req.seed_mode);
        let (latents, init) = self.prepare_latents(&job, sampler.as_ref(), &mut noise)?;
        let mut bufs = GpuBuffers::new(latents);
        bufs.reserve(&self.gpu, sampler.state_buffers())?;
        let inputs = self.loop_inputs(&job, &sampler.timesteps()[..calls], embeds, init)?;

        timings.steps = self.denoise(
            &job,
            (sampler.as_mut(), calls),
            &mut noise,
            &inputs,
            &mut bufs,
            progress,
        )?;

        let decode_start = Instant::now();
        let (images, latents) = self.decode(&job, bufs.take_latents())?;
        timings.decode = decode_start.elapsed();
        timings.total = job.start.elapsed();
        self.record_memory(req, baseline);
        Ok(Generated {
            images,
            timings,
            latents,
            truncated_prompt: truncated,
        })
    }

    /// Pixels of work in a request, the unit the activation memory grows with.
    fn request_pixels(req: &GenerateRequest) -> f64 {
        (req.batch_size * req.width * req.height) as f64
    }

    /// Under a memory budget, refuse a request the last run's measurement says cannot fit,
    /// before anything is allocated for it (without a measurement yet, the allocation-time check
    /// of the budget still refuses it cleanly).
    fn check_memory(&self, req: &GenerateRequest) -> Result<()> {
        let (Some(budget), Some(per_pixel)) =
            (self.gpu.memory_budget(), *lock(&self.bytes_per_pixel))
        else {
            return Ok(());
        };
        let held = self.gpu.pool_stats().live_bytes as f64;
        let estimate = held + per_pixel * Self::request_pixels(req);
        if estimate > budget as f64 {
            const MIB: f64 = 1024.0 * 1024.0;
            return Err(Error::LimitExceeded {
                what: format!(
                    "GPU memory budget: {}×{} × {} needs about {:.0} MiB ({:.0} MiB of weights \
                     plus activations measured on the last run)",
                    req.width,
                    req.height,
                    req.batch_size,
                    estimate / MIB,
                    held / MIB
                ),
                requested: estimate as u64,
                limit: budget,
                hint: "use a smaller image size or batch, tiled VAE decode (--vae-tiling) or f16"
                    .into(),
            });
        }
        Ok(())
    }

    /// Remember how many bytes per pixel of work this run held at its peak (the largest ratio
    /// seen, so the estimate errs on the side of refusing).
    fn record_memory(&self, req: &GenerateRequest, baseline: u64) {
        let peak = self.gpu.pool_stats().peak_bytes.saturating_sub(baseline) as f64;
        let per_pixel = peak / Self::request_pixels(req).max(1.0);
        let mut slot = lock(&self.bytes_per_pixel);
        *slot = Some(slot.map_or(per_pixel, |old: f64| old.max(per_pixel)));
    }

    /// Decode final images with `tiny` (TAESD, loaded in `self.dtype`) instead of the VAE, or
    /// with the VAE again (`None`). Refused when its latent space does not fit this model's
    /// (channels, or the pixels per latent).
    pub fn set_tiny_decoder(
        &mut self,
        tiny: Option<crate::models::taesd::AutoencoderTiny>,
    ) -> Result<()> {
        if let Some(t) = &tiny {
            let vae = &self.vae.config;
            let factor = 1usize << (vae.block_out_channels.len() - 1);
            if t.decoder.is_none()
                || t.config.latent_channels != vae.latent_channels
                || t.config.factor() != factor
            {
                return Err(Error::InvalidInput(format!(
                    "this tiny autoencoder ({} latent channels, {}× upscale{}) does not fit the \
                     model's VAE ({} channels, {factor}×)",
                    t.config.latent_channels,
                    t.config.factor(),
                    if t.decoder.is_none() {
                        ", no decoder"
                    } else {
                        ""
                    },
                    vae.latent_channels
                )));
            }
        }
        self.tiny_decoder = tiny;
        Ok(())
    }

    /// The values `generate` derives from `req` once; the clock starts here.
    fn job<'r>(&self, req: &'r GenerateRequest) -> Job<'r> {
        let vae = &self.vae.config;
        let f = 1 << (vae.block_out_channels.len() - 1);
        Job {
            req,
            start: Instant::now(),
            guided: req.guidance_scale > 1.0,
            batch: req.batch_size,
            h: req.height / f,
            w: req.width / f,
            channels: vae.latent_channels,
            vae_scale: f,
            inpaint9: self.unet.config.in_channels == 9,
            scaling_factor: vae.scaling_factor,
            shift_factor: vae.shift_factor.unwrap_or(0.0),
        }
    }

    /// The sampler for `req.steps` (diffusers' "prepare timesteps") and how many of its model
    /// calls run: img2img and inpainting keep the last `strength` of the schedule, or with a
    /// `denoising_start` the timesteps below its cutoff (SDXL img2img's `get_timesteps`); a
    /// `denoising_end` then stops at its cutoff (the SDXL pipelines' "apply denoising_end").
    fn prepare_timesteps(&self, req: &GenerateRequest) -> Result<(Box<dyn Sampler>, usize)> {
        let mut sampler = build_sampler(&self.scheduler_config, req.sampler, req.steps)?;
        if let Some(eta) = req.eta {
            sampler.set_eta(eta);
        }
        let train = self.scheduler_config.train_timesteps();
        if let Some(start) = req.denoising_start {
            sampler.truncate_for_denoising_start(train, start);
        } else if req.init_image.is_some() || req.init_latents.is_some() {
            sampler.truncate_for_strength(req.steps, req.strength);
        }
        let calls = match req.denoising_end {
            Some(end) => calls_before_denoising_end(sampler.timesteps(), train, end),
            None => sampler.timesteps().len(),
        };
        if calls == 0 {
            return Err(Error::InvalidInput(format!(
                "{} steps with strength {}{}{} leave no denoising step",
                req.steps,
                req.strength,
                req.denoising_start
                    .map_or(String::new(), |v| format!(", denoising start {v}")),
                req.denoising_end
                    .map_or(String::new(), |v| format!(", denoising end {v}")),
            )));
        }
        Ok((sampler, calls))
    }

    /// The initial latents [B, h, w, L] (f32) and what inpainting keeps for the loop, drawing from
    /// the generator in diffusers' order (one function per kind of request below says which).
    fn prepare_latents(
        &self,
        job: &Job<'_>,
        sampler: &dyn Sampler,
        noise: &mut BatchNoise,
    ) -> Result<(Tensor, InitImage)> {
        if let Some(latents) = &job.req.init_latents {
            return self.img2img_from_latents(job, latents, sampler, noise);
        }
        match (&job.req.init_image, &job.req.mask) {
            (None, _) => Ok((
                self.txt2img_latents(job, sampler, noise)?,
                InitImage::default(),
            )),
            (Some(init), None) => self.img2img_latents(job, init, sampler, noise),
            (Some(init), Some(mask)) if job.inpaint9 => {
                self.inpaint9_latents(job, init, mask, sampler, noise)
            }
            (Some(init), Some(mask)) => self.inpaint_blend_latents(job, init, mask, sampler, noise),
        }
    }

    /// txt2img (StableDiffusionPipeline.prepare_latents): the noise, times init_noise_sigma.
    fn txt2img_latents(
        &self,
        job: &Job<'_>,
        sampler: &dyn Sampler,
        noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let raw = noise.draw(job.batch, job.per_image());
        self.pure_noise_latents(job, sampler, &raw)
    }

    /// img2img (StableDiffusionImg2ImgPipeline.prepare_latents): the posterior sample of the init
    /// image, then the noise; latents = add_noise(image_latents, noise, t_start).
    fn img2img_latents(
        &self,
        job: &Job<'_>,
        init: &Image,
        sampler: &dyn Sampler,
        noise: &mut BatchNoise,
    ) -> Result<(Tensor, InitImage)> {
        let clean = self.encode_image(job, init.to_model_input(), noise)?;
        self.noised_init_latents(job, clean, sampler, noise)
    }

    /// img2img from latents (StableDiffusionXLImg2ImgPipeline.prepare_latents with a 4-channel
    /// `image`): the latents as given, no VAE encode and no draw for it, then as from an image.
    fn img2img_from_latents(
        &self,
        job: &Job<'_>,
        latents: &[f32],
        sampler: &dyn Sampler,
        noise: &mut BatchNoise,
    ) -> Result<(Tensor, InitImage)> {
        let clean = self.gpu.upload(latents, &job.latent_shape(), DType::F32)?; // [B, h, w, L]
        self.noised_init_latents(job, clean, sampler, noise)
    }

    /// The clean init latents [B, h, w, L] noised to the first timestep with a fresh draw, or
    /// with a `denoising_start` taken as they are (SDXL img2img's `add_noise=False`: they
    /// already carry the noise of the run that made them, and nothing is drawn).
    fn noised_init_latents(
        &self,
        job: &Job<'_>,
        clean: Tensor,
        sampler: &dyn Sampler,
        noise: &mut BatchNoise,
    ) -> Result<(Tensor, InitImage)> {
        if job.req.denoising_start.is_some() {
            return Ok((clean, InitImage::default()));
        }
        let eps = job.upload_nchw(&self.gpu, &noise.draw(job.batch, job.per_image()))?;
        let latents = self.add_noise(job, sampler, &clean, &eps)?;
        let kept = InitImage {
            image_latents: Some(clean),
            noise: Some(eps),
            ..Default::default()
        };
        Ok((latents, kept))
    }

    /// Inpainting with a 9-channel U-Net (StableDiffusionInpaintPipeline): the posterior sample of
    /// the init image (skipped at strength 1, diffusers' is_strength_max, where the latents are
    /// pure noise * init_noise_sigma), the noise, then in prepare_mask_latents the posterior
    /// sample of the masked image, which the U-Net sees with the mask at every call.
    fn inpaint9_latents(
        &self,
        job: &Job<'_>,
        init: &Image,
        mask: &Image,
        sampler: &dyn Sampler,
        noise: &mut BatchNoise,
    ) -> Result<(Tensor, InitImage)> {
        let clean = if job.req.strength == 1.0 {
            None
        } else {
            Some(self.encode_image(job, init.to_model_input(), noise)?)
        };
        let raw = noise.draw(job.batch, job.per_image());
        let eps = job.upload_nchw(&self.gpu, &raw)?;
        let latents = match &clean {
            Some(clean) => self.add_noise(job, sampler, clean, &eps)?,
            None => self.pure_noise_latents(job, sampler, &raw)?,
        };
        let mask_latents = self.mask_latents(job, mask)?;
        let masked_image = self.encode_image(job, masked_image_pixels(init, mask), noise)?;
        let kept = InitImage {
            image_latents: clean,
            noise: Some(eps),
            mask: Some(mask_latents),
            masked_image_latents: Some(masked_image),
        };
        Ok((latents, kept))
    }

    /// Inpainting with an ordinary 4-channel U-Net (the 4-channel branch of
    /// StableDiffusionInpaintPipeline, as StableDiffusionInpaintPipelineLegacy): the posterior
    /// sample of the init image, the noise (at strength 1 the latents are pure noise *
    /// init_noise_sigma), then the posterior sample of the masked image in prepare_mask_latents.
    /// The loop blends the unmasked region back after each step ([`Self::blend_unmasked`]).
    fn inpaint_blend_latents(
        &self,
        job: &Job<'_>,
        init: &Image,
        mask: &Image,
        sampler: &dyn Sampler,
        noise: &mut BatchNoise,
    ) -> Result<(Tensor, InitImage)> {
        let clean = self.encode_image(job, init.to_model_input(), noise)?;
        let raw = noise.draw(job.batch, job.per_image());
        let eps = job.upload_nchw(&self.gpu, &raw)?;
        let latents = if job.req.strength == 1.0 {
            self.pure_noise_latents(job, sampler, &raw)?
        } else {
            self.add_noise(job, sampler, &clean, &eps)?
        };
        let mask_latents = self.mask_latents(job, mask)?;
        // This path never uses the masked image's latents, only its draw: it still moves the
        // generator that ancestral samplers use later.
        noise.draw_shared(job.batch, job.per_image());
        let kept = InitImage {
            image_latents: Some(clean),
            noise: Some(eps),
            mask: Some(mask_latents),
            masked_image_latents: None,
        };
        Ok((latents, kept))
    }

    /// `raw` (generator draws, NCHW) * init_noise_sigma, as latents [B, h, w, L] f32.
    fn pure_noise_latents(
        &self,
        job: &Job<'_>,
        sampler: &dyn Sampler,
        raw: &[f32],
    ) -> Result<Tensor> {
        let s = sampler.init_noise_sigma() as f32;
        job.upload_nchw(&self.gpu, &raw.iter().map(|v| v * s).collect::<Vec<f32>>())
    }

    /// `scheduler.add_noise(image_latents, noise, timesteps[0])`: [B, h, w, L] f32.
    fn add_noise(
        &self,
        job: &Job<'_>,
        sampler: &dyn Sampler,
        clean: &Tensor,
        eps: &Tensor,
    ) -> Result<Tensor> {
        let mix = sampler.add_noise(0);
        let x = self.gpu.empty(&job.latent_shape(), DType::F32)?; // [B, h, w, L]
        let terms = [(mix.original as f32, clean), (mix.noise as f32, eps)];
        sampler_step::lincomb(&self.gpu, eps, &terms, &x)?;
        Ok(x)
    }

    /// VAE encode, then the posterior sample on the GPU: diffusers'
    /// `vae.encode(image).latent_dist.sample(generator) * scaling_factor` (less the shift_factor
    /// first, for VAEs that have one). Only the generator's draws come from the host: they are
    /// data, reordered NCHW -> NHWC (layout only). `pixels` is model input [H, W, 3]; returns the
    /// scaled latents [B, h, w, L] (f32).
    fn encode_image(
        &self,
        job: &Job<'_>,
        pixels: Vec<f32>,
        noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let gpu = &self.gpu;
        let req = job.req;
        let image_shape = [1, req.height, req.width, 3];
        let img = gpu.upload(&pixels, &image_shape, self.vae_dtype)?; // [1, H, W, 3]
        let moments = self.vae.encode_moments_with(gpu, &img, req.vae_tiling)?; // [1, h, w, 2L]
        let eps = job.upload_nchw(gpu, &noise.draw_shared(job.batch, job.per_image()))?; // [B, h, w, L]
        let lat = gpu.empty(&job.latent_shape(), DType::F32)?; // [B, h, w, L]
        let (scale, shift) = (job.scaling_factor as f32, job.shift_factor as f32);
        sampler_step::posterior_sample(gpu, &moments, &eps, scale, shift, &lat)?;
        Ok(lat)
    }

    /// prepare_mask_latents: the mask at latent resolution, repeated over the batch.
    fn mask_latents(&self, job: &Job<'_>, mask: &Image) -> Result<Tensor> {
        let (req, b, h, w) = (job.req, job.batch, job.h, job.w);
        // F.interpolate(mask, size=(h, w)), mode "nearest".
        let m = downsample_mask_nearest(&mask.to_mask(), req.width, req.height, job.vae_scale);
        // [B, h, w, 1] for the 9-channel U-Net input; the legacy blend multiplies it elementwise
        // with [B, h, w, L] latents, so it is widened on the host there.
        let channels = if job.inpaint9 { 1 } else { job.channels };
        let mut mb = Vec::with_capacity(b * h * w * channels);
        for _ in 0..b {
            for &v in &m {
                mb.extend(std::iter::repeat_n(v, channels));
            }
        }
        self.gpu.upload(&mb, &[b, h, w, channels], DType::F32)
    }

    /// What every model call reads: the text embeddings and the whole schedule's time embeddings
    /// (made before the loop: a step then uploads nothing but its noise, first, before recording
    /// anything, so that each step is one submit), and what img2img and inpainting kept.
    fn loop_inputs(
        &self,
        job: &Job<'_>,
        timesteps: &[f64],
        embeds: PromptEmbeds,
        init: InitImage,
    ) -> Result<LoopInputs> {
        let unet_batch = if job.guided { 2 * job.batch } else { job.batch };
        let time_table = self.unet.schedule_time_embeddings_with(
            &self.gpu,
            timesteps,
            unet_batch,
            embeds.added.as_ref(),
        )?; // [calls·2B, 4C0]
            // Every resnet's time projection for all calls and every cross-attention's K/V of the
            // context, once for the whole loop.
        let conditioning = self
            .unet
            .prepare_image(&self.gpu, time_table, &embeds.context)?;
        Ok(LoopInputs { init, conditioning })
    }

    /// The denoising loop (diffusers' `for i, t in enumerate(timesteps)`) over the sampler's
    /// first `calls` model calls (fewer than its timesteps with a `denoising_end`): per model
    /// call, the U-Net, the sampler's plan on the GPU and (legacy inpainting) the blend, as one
    /// submit. Returns each call's time.
    fn denoise(
        &self,
        job: &Job<'_>,
        (sampler, calls): (&mut dyn Sampler, usize),
        noise: &mut BatchNoise,
        inputs: &LoopInputs,
        bufs: &mut GpuBuffers,
        progress: &mut dyn FnMut(&Progress<'_>) -> bool,
    ) -> Result<Vec<Duration>> {
        let gpu = &self.gpu;
        let mut steps = Vec::with_capacity(calls);
        for call in 0..calls {
            let step_start = Instant::now();
            let t = sampler.timesteps()[call];
            let x = bufs.latents().clone();
            let scale = sampler.model_input_scale(call);
            // The plan does not depend on the model output (the GPU applies it), so it is made
            // before the U-Net is recorded: an upload submits what has been recorded, and here
            // nothing has been yet. The generator draws in the same order as diffusers' loop.
            let plan = sampler.step(call);
            if plan.needs_noise {
                let v = noise.draw(job.batch, job.per_image());
                bufs.set(Buf::Noise, job.upload_nchw(gpu, &v)?);
            }
            let unet_in = self.unet_input(job, &x, scale, &inputs.init)?; // [2B, h, w, C]
            let mut model_out =
                self.unet
                    .forward_prepared(gpu, &unet_in, &inputs.conditioning, call)?;
            if model_out.dtype() != DType::F32 {
                model_out = elementwise::cast(gpu, &model_out, DType::F32)?;
            }
            let guidance = job.guided.then_some(job.req.guidance_scale);
            execute_on_gpu(gpu, &plan, &model_out, guidance, bufs)?;
            if let Some(blend) = inputs.init.legacy_blend(job.inpaint9) {
                self.blend_unmasked(job, (sampler, calls), call, blend, bufs)?;
            }
            // One submit per model call: what the step recorded (the progress callback gets the
            // latents of a finished step).
            gpu.flush()?;
            steps.push(step_start.elapsed());
            // After a `denoising_end` the latents are still noisy: their scale is the next call's.
            let preview_scale = if call + 1 < sampler.timesteps().len() {
                sampler.model_input_scale(call + 1)
            } else {
                1.0
            };
            let keep_going = progress(&Progress {
                call,
                calls,
                timestep: t,
                elapsed: job.start.elapsed(),
                latents: bufs.latents(),
                preview_scale,
            });
            if !keep_going {
                return Err(Error::InvalidInput("cancelled".into()));
            }
        }
        Ok(steps)
    }

    /// scale_model_input, the 9-channel inpainting concat, the CFG duplication and the cast to
    /// the U-Net's dtype, as one pass (or none when there is nothing to do): [2B, h, w, C].
    fn unet_input(
        &self,
        job: &Job<'_>,
        x: &Tensor,
        scale: f64,
        init: &InitImage,
    ) -> Result<Tensor> {
        let inpaint = init.unet_inpaint(job.inpaint9)?;
        let repeat = if job.guided { 2 } else { 1 };
        if scale == 1.0 && inpaint.is_none() && !job.guided && self.dtype == DType::F32 {
            Ok(x.clone())
        } else {
            elementwise::unet_input(&self.gpu, x, scale as f32, inpaint, repeat, self.dtype)
        }
    }

    /// Legacy inpainting with an ordinary U-Net: keep the unmasked region on the original image's
    /// noise trajectory (diffusers' StableDiffusionInpaintPipelineLegacy / the 4-channel branch
    /// of StableDiffusionInpaintPipeline): `proper` is the init image noised to the next call's
    /// timestep (clean after the last call that runs), and `latents = proper + mask * (latents -
    /// proper)`.
    fn blend_unmasked(
        &self,
        job: &Job<'_>,
        (sampler, calls): (&dyn Sampler, usize),
        call: usize,
        (mask, clean, eps): (&Tensor, &Tensor, &Tensor),
        bufs: &mut GpuBuffers,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let (orig_c, noise_c) = if call + 1 < calls {
            let mix = sampler.add_noise(call + 1);
            (mix.original, mix.noise)
        } else {
            (1.0, 0.0)
        };
        let x = bufs.latents().clone();
        let proper = gpu.empty(&job.latent_shape(), DType::F32)?; // [B, h, w, L]
        let terms = [(orig_c as f32, clean), (noise_c as f32, eps)];
        sampler_step::lincomb(gpu, eps, &terms, &proper)?;
        let diff = gpu.empty(&job.latent_shape(), DType::F32)?; // [B, h, w, L]
        sampler_step::lincomb(gpu, eps, &[(1.0, &x), (-1.0, &proper)], &diff)?;
        let masked = elementwise::mul(gpu, &diff, mask)?;
        bufs.set(Buf::Latents, elementwise::add(gpu, &proper, &masked)?);
        Ok(())
    }

    /// Decode: latents / scaling_factor + shift_factor, VAE decoder, postprocess. Returns the
    /// images and the final latents NHWC [B, h, w, L] as downloaded.
    fn decode(&self, job: &Job<'_>, latents: Tensor) -> Result<(Vec<Image>, Vec<f32>)> {
        let gpu = &self.gpu;
        let final_latents = gpu.download(&latents)?;
        if final_latents.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "the denoising loop (latents)".into(),
            });
        }
        drop(latents);
        if job.req.latents_only {
            return Ok((Vec::new(), final_latents));
        }
        if job.shift_factor != 0.0 {
            return Err(Error::Unsupported(
                "VAE shift_factor (SD3-style VAEs)".into(),
            ));
        }
        let (req, per_image) = (job.req, job.per_image());
        let mut images = Vec::with_capacity(job.batch);
        // One image at a time keeps the decoder's largest activation within binding limits
        // (the last block of the SD VAE at 512×512 in f32 is exactly 128 MiB per image). The
        // latents are tiny, so each image's slice is re-uploaded from the host copy.
        for bi in 0..job.batch {
            let slice = &final_latents[bi * per_image..(bi + 1) * per_image];
            let zi = gpu.upload(slice, &[1, job.h, job.w, job.channels], DType::F32)?;
            if let Some(tiny) = &self.tiny_decoder {
                // TAESD reads the latents as the U-Net sees them (its own scaling factor is 1).
                let img = tiny.decode(gpu, &zi)?; // [1, H, W, 3] in [-1, 1]
                let pixels = gpu.download(&img)?;
                images.push(Image::from_model_output(&pixels, req.width, req.height)?);
                continue;
            }
            let mut z = elementwise::scale(gpu, &zi, (1.0 / job.scaling_factor) as f32)?; // [1, h, w, L]
            if self.vae_dtype != DType::F32 {
                z = elementwise::cast(gpu, &z, self.vae_dtype)?;
            }
            let img = self.vae.decode_with(gpu, &z, req.vae_tiling)?; // [1, H, W, 3]
            let pixels = gpu.download(&img)?;
            images.push(Image::from_model_output(&pixels, req.width, req.height)?);
        }
        Ok((images, final_latents))
    }
}

/// One `generate` call: the request and the values derived from it once (diffusers works them
/// out at the top of `__call__`).
struct Job<'r> {
    req: &'r GenerateRequest,
    start: Instant,
    /// Classifier-free guidance (guidance_scale > 1): the U-Net runs on [uncond; cond], 2B.
    guided: bool,
    batch: usize,
    /// The latents are [B, h, w, L]: h, w, L = `channels`.
    h: usize,
    w: usize,
    channels: usize,
    /// The VAE's downsampling factor (image size / latent size).
    vae_scale: usize,
    /// The U-Net takes 9 channels: latents, mask and masked-image latents (inpainting models).
    inpaint9: bool,
    scaling_factor: f64,
    shift_factor: f64,
}

impl Job<'_> {
    fn per_image(&self) -> usize {
        self.channels * self.h * self.w
    }
    fn latent_shape(&self) -> [usize; 4] {
        [self.batch, self.h, self.w, self.channels]
    }
    /// Generator draws (NCHW, torch's order) as latents [B, h, w, L] f32 (our tensors are NHWC).
    fn upload_nchw(&self, gpu: &Gpu, nchw: &[f32]) -> Result<Tensor> {
        let (b, h, w, c) = (self.batch, self.h, self.w, self.channels);
        gpu.upload(
            &nchw_to_nhwc_host(nchw, b, c, h, w),
            &self.latent_shape(),
            DType::F32,
        )
    }
}

/// What img2img and inpainting keep from `prepare_latents` for the loop (all None for txt2img).
#[derive(Default)]
struct InitImage {
    /// The init image's scaled clean latents [B, h, w, L] f32 (None: 9-channel inpainting at
    /// strength 1, which does not encode it).
    image_latents: Option<Tensor>,
    /// The noise the latents started from, [B, h, w, L] f32.
    noise: Option<Tensor>,
    /// Inpainting: the mask at latent resolution, [B, h, w, 1] (9-channel) or [B, h, w, L].
    mask: Option<Tensor>,
    /// 9-channel inpainting: the masked image's latents [B, h, w, L] f32.
    masked_image_latents: Option<Tensor>,
}

impl InitImage {
    /// The mask and masked-image latents the 9-channel U-Net takes beside the latents.
    fn unet_inpaint(&self, inpaint9: bool) -> Result<Option<(&Tensor, &Tensor)>> {
        match (inpaint9, &self.mask, &self.masked_image_latents) {
            (true, Some(mask), Some(masked)) => Ok(Some((mask, masked))),
            (true, _, _) => Err(Error::Device(
                "9-channel inpainting without its mask latents".into(),
            )),
            _ => Ok(None),
        }
    }
    /// (mask, image latents, noise) when a 4-channel U-Net inpaints (the legacy blend).
    fn legacy_blend(&self, inpaint9: bool) -> Option<(&Tensor, &Tensor, &Tensor)> {
        match (inpaint9, &self.mask, &self.image_latents, &self.noise) {
            (false, Some(mask), Some(clean), Some(eps)) => Some((mask, clean, eps)),
            _ => None,
        }
    }
}

/// What every model call reads and none changes.
struct LoopInputs {
    init: InitImage,
    /// The text embeddings [2B, 77·chunks, C] (uncond first) when guided, else [B, ..], the
    /// schedule's time embeddings [calls·2B, 4C0] and their step-invariant projections.
    conditioning: ImageConditioning,
}

/// masked_image = image * (mask < 0.5), as model input [H, W, 3].
fn masked_image_pixels(init: &Image, mask: &Image) -> Vec<f32> {
    init.to_model_input()
        .chunks_exact(3)
        .zip(&mask.to_mask())
        .flat_map(|(p, &mk)| {
            let keep = if mk < 0.5 { 1.0 } else { 0.0 };
            [p[0] * keep, p[1] * keep, p[2] * keep]
        })
        .collect()
}

/// The mask at latent resolution as diffusers' `prepare_mask_latents` gets it:
/// `F.interpolate(mask, size=(h, w))` in its default "nearest" mode, which for an integer
/// factor picks the top-left pixel of each f×f block. Returns [h, w].
fn downsample_mask_nearest(mask: &[f32], width: usize, height: usize, f: usize) -> Vec<f32> {
    let (h, w) = (height / f, width / f);
    let mut out = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = mask[(y * f) * width + x * f];
        }
    }
    out
}

/// SDXL's `add_time_ids` (`_get_add_time_ids`): `original_size + crops_coords_top_left +
/// target_size`, each in diffusers' (height, width) / (top, left) order, the sizes defaulting to
/// the requested one (the negative pass gets the same); with `requires_aesthetics_score`, the
/// aesthetic score (the negative pass: the negative score) in place of the target size.
fn add_time_ids(req: &GenerateRequest, aesthetics: bool, negative: bool) -> Vec<f32> {
    let (ow, oh) = req.original_size.unwrap_or((req.width, req.height));
    let (cx, cy) = req.crop_top_left;
    let (tw, th) = req.target_size.unwrap_or((req.width, req.height));
    let mut ids: Vec<f32> = [oh, ow, cy, cx].iter().map(|&v| v as f32).collect();
    match (aesthetics, negative) {
        (false, _) => ids.extend([th as f32, tw as f32]),
        (true, false) => ids.push(req.aesthetic_score as f32),
        (true, true) => ids.push(req.negative_aesthetic_score as f32),
    }
    ids
}

/// One SDXL encoder's 77-token windows for `prompt`: one, or with `long` one per 75-token chunk.
struct SdxlWindows {
    /// Token ids (BOS, tokens, EOS, padding) and one weight per token, per window.
    chunks: Vec<WeightedChunk>,
    truncated: bool,
}

/// The ids diffusers' tokenizer call gives (`encode_padded`); where `weighting` is on and the
/// prompt uses A1111's emphasis syntax, the pieces tokenized one by one with their weights
/// (`tokenize_weighted`, cut after 75 tokens as diffusers cuts). With `long`, the SD 1.x
/// path's chunks instead (`encode_chunked`, or `tokenize_weighted`'s chunks), nothing cut.
fn sdxl_windows(
    tokenizer: &ClipTokenizer,
    prompt: &str,
    weighting: bool,
    long: bool,
) -> SdxlWindows {
    let pieces = crate::prompt::parse_attention(prompt);
    let plain = pieces == [crate::prompt::Piece::Text(prompt.to_string(), 1.0)];
    if weighting && !plain && !prompt.is_empty() {
        let chunking = if long {
            Chunking::Chunks
        } else {
            Chunking::Truncate
        };
        let w = tokenize_weighted(tokenizer, &pieces, chunking);
        let mut chunks = w.chunks;
        if !long {
            chunks.truncate(1);
        }
        return SdxlWindows {
            chunks,
            truncated: w.truncated,
        };
    }
    let (rows, truncated) = if long {
        (tokenizer.encode_chunked(prompt), false)
    } else {
        let e = tokenizer.encode_padded(prompt);
        (vec![e.ids], e.truncated)
    };
    SdxlWindows {
        chunks: rows
            .into_iter()
            .map(|ids| WeightedChunk {
                weights: vec![1.0; ids.len()],
                ids,
            })
            .collect(),
        truncated,
    }
}

/// An SDXL folder's parts must fit together: the U-Net's cross-attention takes both encoders'
/// widths (encoder 2's alone in a folder without a first encoder, the refiner), its added
/// embedding the pooled projection and `time_ids` ids (6, or 5 with an aesthetic score); an SD
/// U-Net with text_time conditioning but one encoder cannot run.
fn check_sdxl_widths(
    clip: Option<&ClipConfig>,
    clip_2: Option<&ClipConfig>,
    unet: &UNetConfig,
    time_ids: usize,
) -> Result<()> {
    match (clip_2, unet.text_time) {
        (None, None) if clip.is_some() => Ok(()),
        (None, None) => Err(Error::InvalidInput(
            "the model has no text encoder (neither text_encoder nor text_encoder_2)".into(),
        )),
        (None, Some(_)) => Err(Error::Unsupported(
            "a U-Net with SDXL's text_time conditioning without a second text encoder \
             (text_encoder_2)"
                .into(),
        )),
        (Some(_), None) => Err(Error::Unsupported(
            "two text encoders with a U-Net that has no text_time conditioning".into(),
        )),
        (Some(c2), Some(tt)) => {
            let first = clip.map_or(0, |c| c.hidden_size);
            let context = first + c2.hidden_size;
            let projection = c2.projection_dim.unwrap_or(0);
            let added = projection + time_ids * tt.time_embed_dim;
            if context != unet.cross_attention_dim || added != tt.input_dim {
                return Err(Error::InvalidInput(format!(
                    "the SDXL parts do not fit: text encoders {first} + {} wide (U-Net \
                     cross_attention_dim {}), projection {projection} + {time_ids} × {} time ids \
                     (U-Net projection_class_embeddings_input_dim {}; model_index.json's \
                     requires_aesthetics_score decides between 6 and 5 ids)",
                    c2.hidden_size, unet.cross_attention_dim, tt.time_embed_dim, tt.input_dim
                )));
            }
            Ok(())
        }
    }
}
