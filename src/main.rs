//! The `ldm` command line.

use std::process::ExitCode;

use ldm_wgpu::{Error, GpuOptions};

const USAGE: &str = "\
ldm — latent diffusion (Stable Diffusion 1.x / 2.x) on wgpu

USAGE:
    ldm generate -p PROMPT [options]    text-to-image, img2img (--init-image), inpainting (--mask)
    ldm info [--adapter NAME|INDEX]     adapters, features, limits and compute paths
    ldm samplers                        list the samplers

Run `ldm generate --help` for the generation options.
";

const GENERATE_USAGE: &str = "\
ldm generate -p PROMPT [options]

MODEL
    -m, --model PATH          diffusers folder or single-file .safetensors checkpoint
                              (default: the small model shipped in weights/tiny-shapes)
    --dtype f16|f32           storage dtype (default: f16 when the adapter supports it)
    --vae-f32                 keep the VAE in f32 (default: the VAE config's force_upcast)
    --vae-tiling auto|on|off  tiled VAE decode/encode (default auto: only when it would not fit)
    --prediction-type epsilon|v_prediction   for single files (SD 2.x 768 models are v)
PROMPT
    -p, --prompt TEXT         the prompt
    -n, --negative-prompt TEXT
    --clip-skip N             use the hidden state N layers before the last (diffusers clip_skip)
    --long-prompts            encode prompts over 75 tokens in chunks instead of truncating
IMAGE
    -W, --width N  -H, --height N   multiples of 8 (default: the model's native size)
    -s, --steps N             denoising steps (default 25)
    -g, --guidance F          classifier-free guidance scale (default 7.5; <= 1 disables CFG)
    --sampler NAME            ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lms, heun, ddpm, ...
                              (default: the model's scheduler_config.json)
    --eta F                   DDIM eta
    --seed N                  (default 0)
    --rng cpu|cpu-scalar|philox   noise as torch's CPU randn (diffusers, default) or CUDA Philox (A1111)
    -b, --batch-size N        images per batch
    --batch-count N           batches (seed advances by batch size each time)
    --seed-mode batch|per-image   one generator for the batch (diffusers) or seed+i per image (A1111)
    --init-image PNG          img2img source   --strength F (default 0.8)
    --mask PNG                inpainting mask (white = repaint), with --init-image
OUTPUT
    -o, --output PATH         PNG path (default ldm-out.png; batches get -N suffixes)
    --profile                 per-kernel GPU time table (needs TIMESTAMP_QUERY)
    --no-pipeline-cache       do not read/write the compiled-pipeline cache (~/.cache/ldm-wgpu)
    --adapter NAME|INDEX      choose the GPU (also LDM_ADAPTER)
    --preview PNG             write a cheap latent preview of image 1 after every step
    -q, --quiet               no progress output
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(h) = e.hint() {
                eprintln!("hint: {h}");
            }
            ExitCode::from(1)
        }
    }
}

fn run(args: &[String]) -> Result<(), Error> {
    let Some(command) = args.first() else {
        print!("{USAGE}");
        return Ok(());
    };
    let rest = &args[1..];
    match command.as_str() {
        "info" => {
            let mut options = GpuOptions::default();
            let mut it = rest.iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--adapter" => options.adapter = Some(value(&mut it, a)?),
                    _ => return Err(Error::InvalidInput(format!("unknown option `{a}` for `ldm info`"))),
                }
            }
            print!("{}", ldm_wgpu::info::report(&options)?);
            Ok(())
        }
        "generate" | "gen" | "txt2img" => generate(rest),
        "samplers" => {
            for (name, what) in ldm_wgpu::sched::SAMPLER_NAMES {
                println!("{name:<18} {what}");
            }
            Ok(())
        }
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(Error::InvalidInput(format!("unknown command `{other}`; try `ldm --help`"))),
    }
}

fn value<'a>(it: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<String, Error> {
    it.next().cloned().ok_or_else(|| Error::InvalidInput(format!("{flag} needs a value")))
}

fn parse<T: std::str::FromStr>(v: &str, flag: &str) -> Result<T, Error> {
    v.parse().map_err(|_| Error::InvalidInput(format!("{flag}: cannot parse `{v}`")))
}

fn generate(args: &[String]) -> Result<(), Error> {
    use ldm_wgpu::image::Image;
    use ldm_wgpu::pipeline::{self, GenerateRequest, ModelOptions, StableDiffusion};
    use std::path::PathBuf;

    let mut req = GenerateRequest::default();
    let (mut width, mut height) = (None::<usize>, None::<usize>);
    let mut model: Option<PathBuf> = None;
    let mut output = PathBuf::from("ldm-out.png");
    let mut gpu_options = GpuOptions::default();
    let mut model_options = ModelOptions::default();
    let mut batch_count = 1usize;
    let mut quiet = false;
    let mut use_cache = true;
    let mut preview: Option<PathBuf> = None;
    let mut prompt_given = false;
    let mut init_path = None;
    let mut mask_path = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let flag = a.as_str();
        match flag {
            "-h" | "--help" => {
                print!("{GENERATE_USAGE}");
                return Ok(());
            }
            "-p" | "--prompt" => {
                req.prompt = value(&mut it, flag)?;
                prompt_given = true;
            }
            "-n" | "--negative-prompt" => req.negative_prompt = value(&mut it, flag)?,
            "-m" | "--model" => model = Some(PathBuf::from(value(&mut it, flag)?)),
            "-o" | "--output" => output = PathBuf::from(value(&mut it, flag)?),
            "-W" | "--width" => width = Some(parse(&value(&mut it, flag)?, flag)?),
            "-H" | "--height" => height = Some(parse(&value(&mut it, flag)?, flag)?),
            "-s" | "--steps" => req.steps = parse(&value(&mut it, flag)?, flag)?,
            "-g" | "--guidance" | "--cfg-scale" => req.guidance_scale = parse(&value(&mut it, flag)?, flag)?,
            "--sampler" | "--scheduler" => req.sampler = Some(value(&mut it, flag)?),
            "--eta" => req.eta = Some(parse(&value(&mut it, flag)?, flag)?),
            "--seed" => req.seed = parse(&value(&mut it, flag)?, flag)?,
            "--rng" => req.rng = value(&mut it, flag)?.parse()?,
            "--seed-mode" => {
                req.seed_mode = match value(&mut it, flag)?.as_str() {
                    "batch" => pipeline::SeedMode::Batch,
                    "per-image" => pipeline::SeedMode::PerImage,
                    other => return Err(Error::InvalidInput(format!("--seed-mode `{other}` (batch or per-image)"))),
                }
            }
            "-b" | "--batch-size" => req.batch_size = parse(&value(&mut it, flag)?, flag)?,
            "--batch-count" => batch_count = parse(&value(&mut it, flag)?, flag)?,
            "--clip-skip" => req.clip_skip = Some(parse(&value(&mut it, flag)?, flag)?),
            "--long-prompts" => req.long_prompts = true,
            "--init-image" => init_path = Some(PathBuf::from(value(&mut it, flag)?)),
            "--mask" => mask_path = Some(PathBuf::from(value(&mut it, flag)?)),
            "--strength" => req.strength = parse(&value(&mut it, flag)?, flag)?,
            "--dtype" => model_options.dtype = Some(value(&mut it, flag)?.parse().map_err(Error::InvalidInput)?),
            "--vae-f32" => model_options.vae_f32 = Some(true),
            "--vae-tiling" => req.vae_tiling = value(&mut it, flag)?.parse()?,
            "--prediction-type" => {
                model_options.load.prediction_type = Some(match value(&mut it, flag)?.as_str() {
                    "epsilon" => ldm_wgpu::weights::PredictionType::Epsilon,
                    "v_prediction" | "v" => ldm_wgpu::weights::PredictionType::VPrediction,
                    other => return Err(Error::InvalidInput(format!("--prediction-type `{other}`"))),
                })
            }
            "--profile" => gpu_options.profile = true,
            "--adapter" => gpu_options.adapter = Some(value(&mut it, flag)?),
            "-q" | "--quiet" => quiet = true,
            "--no-pipeline-cache" => use_cache = false,
            "--preview" => preview = Some(PathBuf::from(value(&mut it, flag)?)),
            other => return Err(Error::InvalidInput(format!("unknown option `{other}`; see `ldm generate --help`"))),
        }
    }
    if !prompt_given {
        return Err(Error::InvalidInput("give a prompt with -p \"...\" (an empty one is allowed: -p \"\")".into()));
    }
    if let Some(p) = &init_path {
        req.init_image = Some(Image::load_png(p)?);
    }
    if let Some(p) = &mask_path {
        req.mask = Some(Image::load_png(p)?);
    }
    model_options.with_encoder = req.init_image.is_some();
    let model = model.unwrap_or_else(pipeline::default_model_dir);
    if use_cache {
        gpu_options.pipeline_cache_path = pipeline_cache_path(&gpu_options);
    }
    let gpu = ldm_wgpu::Gpu::new(&gpu_options)?;
    if !quiet {
        eprintln!("adapter: {}", gpu.adapter);
        eprintln!("model:   {}", model.display());
    }
    let sd = StableDiffusion::load(gpu, &model, &model_options)?;
    // Default size: the init image's, else the model's native one (sample_size × VAE factor).
    let native = sd.unet.config.sample_size * sd.vae.config.downscale();
    req.width = width.or(req.init_image.as_ref().map(|i| i.width)).unwrap_or(native);
    req.height = height.or(req.init_image.as_ref().map(|i| i.height)).unwrap_or(native);
    if !quiet {
        eprintln!(
            "loaded in {:.2}s ({} weights, VAE {}); {}x{}, {} steps",
            sd.load_time.as_secs_f64(),
            sd.dtype.name(),
            sd.vae_dtype.name(),
            req.width,
            req.height,
            req.steps
        );
    }
    let total_images = req.batch_size * batch_count;
    let mut written = 0;
    for batch in 0..batch_count {
        let mut r = req.clone();
        r.seed = req.seed.wrapping_add((batch * req.batch_size) as u64);
        let vae_factor = sd.vae.config.downscale();
        let gpu_ref = &sd.gpu;
        let mut report = |p: &pipeline::Progress<'_>| {
            if let Some(path) = &preview {
                // A cheap latent-space preview of the first image, rewritten after every step.
                match ldm_wgpu::preview::latent_preview(gpu_ref, p.latents, 0) {
                    Ok(img) => {
                        if let Err(e) = ldm_wgpu::preview::upscale(&img, vae_factor).save_png(path) {
                            eprintln!("\npreview not written: {e}");
                        }
                    }
                    Err(e) => eprintln!("\npreview failed: {e}"),
                }
            }
            if !quiet {
                eprint!("\rstep {:>3}/{} (t = {:>6.1}) {:>7.2}s", p.call + 1, p.calls, p.timestep, p.elapsed.as_secs_f64());
            }
            true
        };
        let out = sd.generate(&r, &mut report)?;
        if !quiet {
            eprintln!();
            if out.truncated_prompt {
                eprintln!("warning: the prompt is longer than 77 tokens and was truncated (use --long-prompts)");
            }
            let steps: f64 = out.timings.steps.iter().map(|d| d.as_secs_f64()).sum();
            eprintln!(
                "text encode {:.3}s, denoise {:.3}s ({:.2} it/s), decode {:.3}s, total {:.3}s",
                out.timings.text_encode.as_secs_f64(),
                steps,
                out.timings.steps.len() as f64 / steps.max(1e-9),
                out.timings.decode.as_secs_f64(),
                out.timings.total.as_secs_f64()
            );
        }
        for img in &out.images {
            let path = if total_images == 1 { output.clone() } else { numbered(&output, written) };
            img.save_png(&path)?;
            println!("{}", path.display());
            written += 1;
        }
    }
    // Keep compiled pipelines for the next start (Vulkan PIPELINE_CACHE); failure is harmless.
    if let Err(e) = sd.gpu.save_pipeline_cache() {
        if !quiet {
            eprintln!("note: pipeline cache not saved: {e}");
        }
    }
    if sd.gpu.profiling() {
        print!("{}", ldm_wgpu::runtime::timing::format_table(&sd.gpu.profile()?));
        let pool = sd.gpu.pool_stats();
        println!(
            "GPU memory held by the tensor pool: peak {:.1} MiB ({} buffers created, {} reuses)",
            pool.peak_bytes as f64 / 1048576.0,
            pool.created,
            pool.reused
        );
    }
    Ok(())
}

/// `$XDG_CACHE_HOME/ldm-wgpu` (or `~/.cache/ldm-wgpu`), one file per adapter name and
/// driver, since a driver's cache is only valid for the device and version that wrote it.
fn pipeline_cache_path(options: &GpuOptions) -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    let tag = options.adapter.clone().or_else(|| std::env::var("LDM_ADAPTER").ok()).unwrap_or_else(|| "default".into());
    let safe: String = tag.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    Some(base.join("ldm-wgpu").join(format!("pipelines-{safe}.bin")))
}

fn numbered(path: &std::path::Path, i: usize) -> std::path::PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "ldm-out".into());
    let ext = path.extension().map(|e| e.to_string_lossy().to_string()).unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{i}.{ext}"))
}
