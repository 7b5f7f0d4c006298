//! The `ldm` command line.

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use ldm_wgpu::sched::SamplerKind;
use ldm_wgpu::{Error, GpuOptions};

/// ldm — latent diffusion (Stable Diffusion 1.x / 2.x) on wgpu
#[derive(Parser, Debug)]
#[command(
    name = "ldm",
    version,
    about = "ldm — latent diffusion (Stable Diffusion 1.x / 2.x) on wgpu",
    after_help = "Run `ldm generate --help` for the generation options.",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// text-to-image, img2img (--init-image), inpainting (--mask)
    #[command(visible_aliases = ["gen", "txt2img"], args_override_self = true)]
    Generate(Box<GenerateArgs>),
    /// adapters, features, limits and compute paths
    #[command(args_override_self = true)]
    Info {
        /// choose the GPU (also LDM_ADAPTER)
        #[arg(long, value_name = "NAME|INDEX")]
        adapter: Option<String>,
    },
    /// what a model file or folder is (family, prediction type, components, dtypes, parameter
    /// counts), from its headers and configs alone: nothing is loaded onto the GPU
    #[command(args_override_self = true)]
    Inspect {
        /// diffusers folder or single-file .safetensors checkpoint
        #[arg(value_name = "PATH")]
        path: PathBuf,
        /// machine-readable output (one JSON document on stdout)
        #[arg(long)]
        json: bool,
    },
    /// list the samplers
    Samplers,
    /// an HTTP server speaking the AUTOMATIC1111 web UI API (and OpenAI's images endpoint),
    /// the model loaded once per GPU
    #[cfg(feature = "server")]
    #[command(args_override_self = true)]
    Serve(Box<ServeArgs>),
    /// benchmark this GPU: measured peaks and every kernel at SD 1.5 (or --shapes sdxl: SDXL)
    /// shapes, or with --model a
    /// whole pipeline (cold/warm start, it/s, s/image, peak memory, per-kernel table)
    #[command(args_override_self = true)]
    Bench(BenchArgs),
    /// print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The options of `ldm bench`.
#[derive(Args, Debug)]
struct BenchArgs {
    /// only the kernel cases whose name contains one of these (comma list: attn,resnet)
    #[arg(long, value_name = "A,B,..", value_delimiter = ',')]
    filter: Vec<String>,
    /// whose shapes the kernel cases take: sd15 (SD 1.5 at 512², the default) or sdxl (SDXL
    /// base at 1024²)
    #[arg(long, value_name = "sd15|sdxl")]
    shapes: Option<String>,
    /// machine-readable output (one JSON document on stdout)
    #[arg(long)]
    json: bool,
    /// f16 or f32 (default: f16 when the adapter supports it)
    #[arg(long, value_name = "f16|f32")]
    dtype: Option<String>,
    /// timed repetitions per kernel case (default 10, 3 with --quick)
    #[arg(long, value_name = "N")]
    reps: Option<usize>,
    /// short peak runs and only the cheaper kernel cases (default on CPU adapters)
    #[arg(long)]
    quick: bool,
    /// end-to-end instead: this diffusers folder or single file
    #[arg(short = 'm', long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// end-to-end: image side in pixels (default: the model's native size)
    #[arg(long, value_name = "N")]
    size: Option<usize>,
    /// end-to-end: denoising steps
    #[arg(short = 's', long, value_name = "N", default_value_t = 25)]
    steps: usize,
    /// end-to-end: sampler
    #[arg(long, value_name = "NAME", default_value = "dpmpp_2m")]
    sampler: String,
    /// end-to-end: timed images (medians reported)
    #[arg(long, value_name = "N", default_value_t = 3)]
    images: usize,
    /// end-to-end: kernels listed from the profiled image (0: all)
    #[arg(long, value_name = "N", default_value_t = 15)]
    top: usize,
    /// choose the GPU (also LDM_ADAPTER)
    #[arg(long, value_name = "NAME|INDEX")]
    adapter: Option<String>,
}

/// `ldm bench`: the kernel table or, with --model, the end-to-end benchmark.
fn bench(args: BenchArgs) -> Result<(), Error> {
    use ldm_wgpu::bench::{self, pipeline};
    let mut gpu_options = GpuOptions::from_env()?;
    if args.adapter.is_some() {
        gpu_options.adapter = args.adapter.clone();
    }
    let dtype: Option<ldm_wgpu::DType> = args
        .dtype
        .as_deref()
        .map(|d| d.parse().map_err(Error::InvalidInput))
        .transpose()?;
    if let Some(model) = args.model {
        let sampler: SamplerKind = args.sampler.parse()?;
        if args.steps == 0 || args.images == 0 {
            return Err(Error::InvalidInput(
                "--steps and --images must be at least 1".into(),
            ));
        }
        let cache_dir = std::env::temp_dir().join(format!("ldm-bench-{}", std::process::id()));
        // Before the first device opens: a cold start finds the driver's shader cache empty.
        pipeline::point_driver_caches_at(&cache_dir)?;
        let options = pipeline::PipelineBenchOptions {
            model,
            size: args.size,
            steps: args.steps,
            sampler,
            dtype,
            images: args.images,
            gpu: gpu_options,
            cache_dir: cache_dir.clone(),
        };
        let quiet = args.json;
        let report = pipeline::run_pipeline(&options, &mut |stage| {
            if !quiet {
                eprintln!("bench: {stage}...");
            }
        });
        let _ = std::fs::remove_dir_all(&cache_dir);
        let report = report?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("serialisable")
            );
        } else {
            print!("{}", report.text(args.top));
        }
        return Ok(());
    }
    gpu_options.profile = true;
    let gpu = ldm_wgpu::Gpu::new(&gpu_options)?;
    let quick = args.quick || gpu.adapter.device_type == "Cpu";
    let options = bench::KernelBenchOptions {
        shapes: match &args.shapes {
            Some(v) => v.parse()?,
            None => bench::Shapes::default(),
        },
        dtype: dtype.unwrap_or(gpu.compute_dtype()),
        reps: args.reps.unwrap_or(if quick { 3 } else { 10 }),
        filter: args.filter,
        quick,
    };
    let text = !args.json;
    if text {
        println!(
            "device: {} ({} {}), {} shapes, dtype {}, {} reps{}",
            gpu.adapter.name,
            gpu.adapter.backend,
            gpu.adapter.driver,
            options.shapes,
            options.dtype.name(),
            options.reps,
            if quick { ", quick" } else { "" }
        );
    }
    let (peaks, rows) = bench::run_kernels(
        &gpu,
        &options,
        &mut |p| {
            if text {
                print_peaks(p);
            }
        },
        &mut |row| {
            if text {
                println!("{}", row.text());
            }
        },
    )?;
    if args.json {
        let doc = serde_json::json!({
            "device": gpu.adapter.name,
            "backend": gpu.adapter.backend,
            "driver": gpu.adapter.driver,
            "shapes": options.shapes.to_string(),
            "dtype": options.dtype.name(),
            "reps": options.reps,
            "quick": quick,
            "peaks": peaks,
            "kernels": rows,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("serialisable")
        );
    } else {
        println!("(* = the path the default kernel policy takes for that shape)");
    }
    Ok(())
}

fn print_peaks(p: &ldm_wgpu::bench::Peaks) {
    println!(
        "measured peaks: FMA {:.1} GFLOP/s, copy {:.1} GB/s",
        p.fma_gflops, p.copy_gbs
    );
    if let Some(t) = p.tensor_core_gflops {
        println!("measured tensor-core peak: {t:.1} GFLOP/s (f16, f32 accumulators; the [coop] lines' %)");
    }
}

/// The options of `ldm serve`.
#[cfg(feature = "server")]
#[derive(Args, Debug)]
struct ServeArgs {
    /// the address to listen on (0.0.0.0 exposes the server to the network: use --api-auth)
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// the model to load first (default: the small model shipped in weights/tiny-shapes)
    #[arg(short = 'm', long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// checkpoints `/sdapi/v1/options` may switch to: this folder's model folders and
    /// .safetensors files (requests name them, never give paths)
    #[arg(long, value_name = "DIR")]
    models_dir: Option<PathBuf>,
    /// one worker per GPU: `all`, or adapter indices or names (0,1); default: the best one
    /// (also LDM_ADAPTER)
    #[arg(long, value_name = "all|I,J")]
    adapter: Option<String>,
    /// HTTP basic credentials, as A1111's flag
    #[arg(long, value_name = "USER:PASS[,USER:PASS]")]
    api_auth: Option<String>,
    /// API keys accepted as `Authorization: Bearer KEY` or `X-API-Key: KEY` (repeatable)
    #[arg(long, value_name = "KEY")]
    api_key: Vec<String>,
    /// allow these origins (comma list, or *) to call the API from browsers (default: no CORS)
    #[arg(long, value_name = "ORIGINS", value_delimiter = ',')]
    cors_allow_origins: Vec<String>,
    /// jobs that may wait for a worker; more are refused with 503
    #[arg(long, value_name = "N", default_value_t = 16)]
    queue_size: usize,
    /// the largest request body, MiB (413 beyond)
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    max_body_mb: usize,
    /// the most pixels (width × height) a request may ask for
    #[arg(long, value_name = "N", default_value_t = 1536 * 1536)]
    max_pixels: u64,
    /// the most denoising steps a request may ask for
    #[arg(long, value_name = "N", default_value_t = 150)]
    max_steps: usize,
    /// the most images (batch_size × n_iter) one request may ask for
    #[arg(long, value_name = "N", default_value_t = 8)]
    max_batch: usize,
    /// where `<lora:NAME:w>` tags find NAME.safetensors (default: loras/ beside the model)
    #[arg(long, value_name = "DIR")]
    lora_dir: Option<PathBuf>,
    /// textual-inversion embeddings to load (default: ./embeddings when it exists)
    #[arg(long, value_name = "DIR")]
    embeddings: Option<PathBuf>,
    /// do not read/write the compiled-pipeline cache (~/.cache/ldm-wgpu)
    #[arg(long)]
    no_pipeline_cache: bool,
}

/// The options of `ldm generate`. Values whose parsing is ours (sampler, dtype, ...) stay text
/// here and are parsed in `generate`, so their errors read as before; options left out take
/// `GenerateRequest::default()`'s values.
#[derive(Args, Debug)]
struct GenerateArgs {
    /// diffusers folder or single-file .safetensors checkpoint (default: the small model shipped
    /// in weights/tiny-shapes)
    #[arg(short = 'm', long, value_name = "PATH", help_heading = "Model")]
    model: Option<PathBuf>,
    /// storage dtype (default: f16 when the adapter supports it)
    #[arg(long, value_name = "f16|f32", help_heading = "Model")]
    dtype: Option<String>,
    /// keep the VAE in f32 (default: the VAE config's force_upcast)
    #[arg(long, help_heading = "Model")]
    vae_f32: bool,
    /// use this VAE folder instead of the model's (an AutoencoderKL such as sd-vae-ft-mse or
    /// sdxl-vae-fp16-fix; an AutoencoderTiny folder acts as --vae-decoder)
    #[arg(long, value_name = "DIR", help_heading = "Model")]
    vae: Option<PathBuf>,
    /// tiled VAE decode/encode (default auto: only when it would not fit)
    #[arg(long, value_name = "auto|on|off", help_heading = "Model")]
    vae_tiling: Option<String>,
    /// SDXL refiner folder (stabilityai/stable-diffusion-xl-refiner-1.0): the model runs the
    /// first part of the steps and hands its latents to the refiner, which runs the rest with
    /// the same prompts, steps and sampler (diffusers' base + refiner)
    #[arg(long, value_name = "DIR", help_heading = "Model")]
    refiner: Option<PathBuf>,
    /// where the refiner takes over, as a fraction of the noise schedule (diffusers'
    /// denoising_end / denoising_start; default 0.8)
    #[arg(long, value_name = "F", requires = "refiner", help_heading = "Model")]
    refiner_start: Option<f64>,
    /// for single files (SD 2.x 768 models are v)
    #[arg(long, value_name = "epsilon|v_prediction", help_heading = "Model")]
    prediction_type: Option<String>,
    /// which weight files of a diffusers folder to read: fp16 (`*.fp16.safetensors`, diffusers'
    /// variant="fp16"), plain, or auto (default: the plain files, else the fp16 ones)
    #[arg(long, value_name = "auto|plain|fp16", help_heading = "Model")]
    variant: Option<String>,
    /// apply a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) with this weight (default 1,
    /// may be negative) to the U-Net and the text encoder; repeatable
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]", help_heading = "Model")]
    loras: Vec<String>,
    /// where `<lora:NAME:WEIGHT>` in the prompt finds NAME.safetensors (default: loras/ beside
    /// the model if there is one, else the current directory)
    #[arg(long, value_name = "DIR", help_heading = "Model")]
    lora_dir: Option<PathBuf>,

    /// the prompt (an empty one is allowed: -p "")
    #[arg(
        short = 'p',
        long,
        value_name = "TEXT",
        allow_hyphen_values = true,
        help_heading = "Prompt"
    )]
    prompt: Option<String>,
    /// the negative prompt
    #[arg(
        short = 'n',
        long,
        value_name = "TEXT",
        allow_hyphen_values = true,
        help_heading = "Prompt"
    )]
    negative_prompt: Option<String>,
    /// SDXL: the prompt for the second text encoder (default: --prompt)
    #[arg(
        long,
        value_name = "TEXT",
        allow_hyphen_values = true,
        help_heading = "Prompt"
    )]
    prompt_2: Option<String>,
    /// SDXL: the negative prompt for the second text encoder (default: --negative-prompt)
    #[arg(
        long,
        value_name = "TEXT",
        allow_hyphen_values = true,
        help_heading = "Prompt"
    )]
    negative_prompt_2: Option<String>,
    /// use the hidden state N layers before the last (diffusers clip_skip)
    #[arg(long, value_name = "N", help_heading = "Prompt")]
    clip_skip: Option<usize>,
    /// encode prompts over 75 tokens in chunks instead of truncating
    #[arg(long, help_heading = "Prompt")]
    long_prompts: bool,
    /// brackets are plain text (default: A1111 emphasis, `(word:1.3)`, `[word]`, `BREAK`)
    #[arg(long, help_heading = "Prompt")]
    no_prompt_weighting: bool,
    /// textual-inversion embeddings (.safetensors): a prompt word equal to a file's name uses
    /// its vectors (default: ./embeddings when it exists)
    #[arg(long, value_name = "DIR", help_heading = "Prompt")]
    embeddings: Option<PathBuf>,

    /// image width, a multiple of 8 (default: the model's native size)
    #[arg(short = 'W', long, value_name = "N", help_heading = "Image")]
    width: Option<usize>,
    /// image height, a multiple of 8 (default: the model's native size)
    #[arg(short = 'H', long, value_name = "N", help_heading = "Image")]
    height: Option<usize>,
    /// SDXL micro-conditioning: the size the image claims to come from (default: its size)
    #[arg(long, value_name = "W,H", help_heading = "Image")]
    original_size: Option<String>,
    /// SDXL micro-conditioning: the crop's top-left corner (default 0,0)
    #[arg(long, value_name = "X,Y", help_heading = "Image")]
    crop_top_left: Option<String>,
    /// SDXL micro-conditioning: the target size (default: the image size)
    #[arg(long, value_name = "W,H", help_heading = "Image")]
    target_size: Option<String>,
    /// SDXL models with aesthetic-score conditioning (requires_aesthetics_score): the prompt's
    /// score (default 6.0)
    #[arg(
        long,
        value_name = "F",
        allow_negative_numbers = true,
        help_heading = "Image"
    )]
    aesthetic_score: Option<f64>,
    /// SDXL models with aesthetic-score conditioning: the negative pass's score (default 2.5)
    #[arg(
        long,
        value_name = "F",
        allow_negative_numbers = true,
        help_heading = "Image"
    )]
    negative_aesthetic_score: Option<f64>,
    /// denoising steps (default 25)
    #[arg(short = 's', long, value_name = "N", help_heading = "Image")]
    steps: Option<usize>,
    /// classifier-free guidance scale (default 7.5; <= 1 disables CFG)
    #[arg(
        short = 'g',
        long,
        visible_alias = "cfg-scale",
        value_name = "F",
        allow_negative_numbers = true,
        help_heading = "Image"
    )]
    guidance: Option<f64>,
    /// ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lms, heun, ddpm, ... (default: the
    /// model's scheduler_config.json; `ldm samplers` lists them)
    #[arg(
        long,
        visible_alias = "scheduler",
        value_name = "NAME",
        help_heading = "Image"
    )]
    sampler: Option<String>,
    /// Karras sigmas (euler, dpmpp_2m, lms, unipc, kdpm2, kdpm2_a)
    #[arg(long, help_heading = "Image")]
    karras: bool,
    /// override the scheduler config's timestep spacing (Turbo and zero-SNR models: trailing)
    #[arg(long, value_name = "leading|trailing|linspace", help_heading = "Image")]
    timestep_spacing: Option<String>,
    /// DDIM eta; TCD's gamma
    #[arg(long, value_name = "F", help_heading = "Image")]
    eta: Option<f64>,
    /// the seed (default: random, printed)
    #[arg(long, value_name = "N", help_heading = "Image")]
    seed: Option<u64>,
    /// noise as torch's CPU randn (diffusers, default) or CUDA Philox (A1111)
    #[arg(long, value_name = "cpu|cpu-scalar|philox", help_heading = "Image")]
    rng: Option<String>,
    /// images per batch
    #[arg(short = 'b', long, value_name = "N", help_heading = "Image")]
    batch_size: Option<usize>,
    /// batches (seed advances by batch size each time)
    #[arg(long, value_name = "N", default_value_t = 1, help_heading = "Image")]
    batch_count: usize,
    /// one generator for the batch (diffusers) or seed+i per image (A1111)
    #[arg(long, value_name = "batch|per-image", help_heading = "Image")]
    seed_mode: Option<String>,
    /// img2img source
    #[arg(short = 'i', long, value_name = "PNG", help_heading = "Image")]
    init_image: Option<PathBuf>,
    /// img2img strength (default 0.8; SDXL inpainting: 0.9999, diffusers' default)
    #[arg(long, value_name = "F", help_heading = "Image")]
    strength: Option<f64>,
    /// inpainting mask (white = repaint), with --init-image
    #[arg(long, value_name = "PNG", help_heading = "Image")]
    mask: Option<PathBuf>,

    /// PNG path; batches get -N suffixes, or use a pattern: %d = image number, {seed} = its
    /// seed. The generation parameters are stored in the PNG (A1111 `parameters` text)
    // (`{n}` works as `%d` too, but clap turns `{n}` in help text into a line break.)
    #[arg(
        short = 'o',
        long,
        value_name = "PATH",
        default_value = "ldm-out.png",
        help_heading = "Output"
    )]
    output: PathBuf,
    /// per-kernel GPU time table (needs TIMESTAMP_QUERY)
    #[arg(long, help_heading = "Output")]
    profile: bool,
    /// do not read/write the compiled-pipeline cache (~/.cache/ldm-wgpu)
    #[arg(long, help_heading = "Output")]
    no_pipeline_cache: bool,
    /// choose the GPU (also LDM_ADAPTER)
    #[arg(long, value_name = "NAME|INDEX", help_heading = "Output")]
    adapter: Option<String>,
    /// write a cheap latent preview of image 1 after every step
    #[arg(long, value_name = "PNG", help_heading = "Output")]
    preview: Option<PathBuf>,
    /// make that preview with a tiny autoencoder (TAESD: a diffusers AutoencoderTiny folder or
    /// taesd_decoder.safetensors)
    #[arg(long, value_name = "DIR", help_heading = "Output")]
    preview_vae: Option<PathBuf>,
    /// decode the final image with a tiny autoencoder (TAESD; faster, coarser)
    #[arg(long, value_name = "DIR", help_heading = "Output")]
    vae_decoder: Option<PathBuf>,
    /// no progress output
    #[arg(short = 'q', long, help_heading = "Output")]
    quiet: bool,
}

fn main() -> ExitCode {
    quiet_window_system_probe();
    // Usage errors, --help and --version are clap's (usage errors exit with 2).
    let cli = Cli::parse();
    // `ldm serve` handles its own signals (a graceful shutdown, exit 0).
    #[cfg(feature = "server")]
    let serving = matches!(cli.command, Some(Command::Serve(_)));
    #[cfg(not(feature = "server"))]
    let serving = false;
    if !serving {
        install_interrupt_handler();
    }
    match run(cli) {
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

/// Mesa's Vulkan drivers probe Wayland when wgpu creates an instance and print "XDG_RUNTIME_DIR
/// is invalid or not set in the environment" for each instance when the variable is missing (a
/// headless server, a container, CI). wgpu 30 has no switch to leave the window-system
/// extensions out, and a compute engine has no windows, so the CLI points the probe at a private
/// empty directory instead: it finds no display and stays silent. Runs first in `main`, while
/// the process has one thread; a set, valid XDG_RUNTIME_DIR is left alone.
fn quiet_window_system_probe() {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let valid =
            std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir());
        if valid {
            return;
        }
        let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
        let dir = std::env::temp_dir().join(format!("ldm-runtime-{user}"));
        let made = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)));
        if made.is_ok() {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Ctrl-C (SIGINT): the first asks the generation to stop after the current model
/// call (the progress callback cancels) so no half-written output is left; a second one exits at
/// once. Either way the exit status is 130, as shells expect from an interrupted command.
fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            std::process::exit(130);
        }
    });
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        None => {
            Cli::command()
                .print_help()
                .map_err(|e| Error::io("stdout", e))?;
            Ok(())
        }
        Some(Command::Info { adapter }) => {
            let mut options = GpuOptions::from_env()?;
            if adapter.is_some() {
                options.adapter = adapter;
            }
            print!("{}", ldm_wgpu::info::report(&options)?);
            Ok(())
        }
        Some(Command::Inspect { path, json }) => {
            let report = ldm_wgpu::inspect::inspect(&path)?;
            if json {
                let text = serde_json::to_string_pretty(&report)
                    .map_err(|e| Error::InvalidInput(format!("inspect: {e}")))?;
                println!("{text}");
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Some(Command::Generate(args)) => generate(*args),
        Some(Command::Bench(args)) => bench(args),
        #[cfg(feature = "server")]
        Some(Command::Serve(args)) => serve(*args),
        Some(Command::Samplers) => {
            use ldm_wgpu::sched::SamplerKind;
            // Columns as wide as their longest entry, plus one space.
            let width = |f: fn(SamplerKind) -> &'static str| {
                SamplerKind::ALL
                    .iter()
                    .map(|&k| f(k).len())
                    .max()
                    .unwrap_or(0)
            };
            let (w1, w2) = (width(SamplerKind::name), width(SamplerKind::a1111_name));
            println!("{:<w1$} {:<w2$} diffusers class", "--sampler", "A1111 name");
            for kind in SamplerKind::ALL {
                let noise = if kind.is_stochastic() {
                    ", stochastic"
                } else {
                    ""
                };
                println!(
                    "{:<w1$} {:<w2$} {}{noise}",
                    kind.name(),
                    kind.a1111_name(),
                    kind.description()
                );
            }
            Ok(())
        }
        Some(Command::Completions { shell }) => {
            clap_complete::generate(shell, &mut Cli::command(), "ldm", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// `ldm serve`: the flags turned into the server's config.
#[cfg(feature = "server")]
fn serve(args: ServeArgs) -> Result<(), Error> {
    use ldm_wgpu::server::{self, Auth, Limits, ServeConfig};
    let mut gpu = GpuOptions::from_env()?;
    if !args.no_pipeline_cache {
        gpu.pipeline_cache_path = pipeline_cache_path(&gpu);
    }
    let workers = match args.adapter.as_deref() {
        Some("all") => server::all_adapters(&gpu),
        Some(list) => list
            .split(',')
            .map(|a| GpuOptions {
                adapter: Some(a.trim().to_string()),
                ..gpu.clone()
            })
            .collect(),
        None => vec![gpu],
    };
    let basic: Vec<String> = args
        .api_auth
        .iter()
        .flat_map(|s| s.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    if let Some(bad) = basic.iter().find(|p| !p.contains(':')) {
        return Err(Error::InvalidInput(format!(
            "--api-auth `{bad}`: give USER:PASS (comma-separated for several)"
        )));
    }
    if args.queue_size == 0 || args.max_body_mb == 0 {
        return Err(Error::InvalidInput(
            "--queue-size and --max-body-mb must be at least 1".into(),
        ));
    }
    if let Some(dir) = &args.models_dir {
        if !dir.is_dir() {
            return Err(Error::InvalidInput(format!(
                "--models-dir {}: not a directory",
                dir.display()
            )));
        }
    }
    let config = ServeConfig {
        host: args.host,
        port: args.port,
        model: args
            .model
            .unwrap_or_else(ldm_wgpu::pipeline::default_model_dir),
        models_dir: args.models_dir,
        workers,
        auth: Auth {
            basic,
            keys: args.api_key,
        },
        cors_allow_origins: args.cors_allow_origins,
        queue_size: args.queue_size,
        max_body_bytes: args.max_body_mb.saturating_mul(1 << 20),
        limits: Limits {
            max_pixels: args.max_pixels,
            max_steps: args.max_steps,
            max_batch: args.max_batch,
        },
        lora_dir: args.lora_dir,
        embeddings_dir: embeddings_dir(args.embeddings)?,
    };
    server::serve(config)
}

/// `A,B` (two non-negative integers) for the SDXL micro-conditioning flags.
fn parse_pair(flag: &str, v: &str) -> Result<(usize, usize), Error> {
    let parsed = v
        .split_once(',')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
    parsed.ok_or_else(|| {
        Error::InvalidInput(format!(
            "{flag} `{v}`: give two whole numbers separated by a comma (e.g. 1024,1024)"
        ))
    })
}

/// The SDXL refiner for `--refiner`, on a device queue of its own, refused unless it is an SDXL
/// model working in the base's latent space.
fn load_refiner(
    base: &ldm_wgpu::pipeline::StableDiffusion,
    dir: &std::path::Path,
    gpu_options: &GpuOptions,
    base_options: &ldm_wgpu::pipeline::ModelOptions,
) -> Result<ldm_wgpu::pipeline::StableDiffusion, Error> {
    let options = ldm_wgpu::pipeline::ModelOptions {
        // It starts from the base's latents: nothing to encode.
        with_encoder: false,
        ..base_options.clone()
    };
    let gpu = ldm_wgpu::Gpu::new(gpu_options)?;
    let refiner = ldm_wgpu::pipeline::StableDiffusion::load(gpu, dir, &options)?;
    let (a, b) = (&base.vae.config, &refiner.vae.config);
    if refiner.sdxl.is_none()
        || a.latent_channels != b.latent_channels
        || a.scaling_factor != b.scaling_factor
        || a.downscale() != b.downscale()
    {
        return Err(Error::InvalidInput(format!(
            "--refiner {}: not an SDXL model in the base model's latent space ({} channels, \
             scaling {}, {}× against the base's {} channels, scaling {}, {}×)",
            dir.display(),
            b.latent_channels,
            b.scaling_factor,
            b.downscale(),
            a.latent_channels,
            a.scaling_factor,
            a.downscale()
        )));
    }
    Ok(refiner)
}

/// diffusers' base + refiner example: the base runs the steps above the switch point
/// (`denoising_end`) and returns its latents undecoded, the refiner runs the rest from them
/// (`denoising_start`) with the same request — prompts, steps, sampler, seed — and decodes.
/// The timings add up both runs.
fn generate_with_refiner(
    base: &ldm_wgpu::pipeline::StableDiffusion,
    refiner: &ldm_wgpu::pipeline::StableDiffusion,
    start: f64,
    req: &ldm_wgpu::pipeline::GenerateRequest,
    progress: &mut dyn FnMut(&ldm_wgpu::pipeline::Progress<'_>) -> bool,
) -> Result<ldm_wgpu::pipeline::Generated, Error> {
    use ldm_wgpu::pipeline::GenerateRequest;
    let first = base.generate(
        &GenerateRequest {
            denoising_end: Some(start),
            latents_only: true,
            ..req.clone()
        },
        progress,
    )?;
    let mut out = refiner.generate(
        &GenerateRequest {
            denoising_start: Some(start),
            init_latents: Some(first.latents),
            init_image: None,
            ..req.clone()
        },
        progress,
    )?;
    let (a, b) = (&first.timings, &mut out.timings);
    b.load += a.load;
    b.text_encode += a.text_encode;
    b.steps.splice(0..0, a.steps.iter().copied());
    b.total += a.total;
    out.truncated_prompt |= first.truncated_prompt;
    Ok(out)
}

fn generate(args: GenerateArgs) -> Result<(), Error> {
    use ldm_wgpu::image::Image;
    use ldm_wgpu::pipeline::{self, GenerateRequest, ModelOptions, StableDiffusion};

    let GenerateArgs {
        model,
        dtype,
        vae_f32,
        vae,
        vae_tiling,
        refiner,
        refiner_start,
        prediction_type,
        variant,
        loras,
        lora_dir,
        prompt,
        negative_prompt,
        prompt_2,
        negative_prompt_2,
        clip_skip,
        long_prompts,
        no_prompt_weighting,
        embeddings,
        width,
        height,
        original_size,
        crop_top_left,
        target_size,
        aesthetic_score,
        negative_aesthetic_score,
        steps,
        guidance,
        sampler,
        karras,
        timestep_spacing,
        eta,
        seed,
        rng,
        batch_size,
        batch_count,
        seed_mode,
        init_image: init_path,
        strength,
        mask: mask_path,
        output,
        profile,
        no_pipeline_cache,
        adapter,
        preview,
        preview_vae,
        vae_decoder,
        quiet,
    } = args;
    let embeddings = embeddings_dir(embeddings)?;
    if let Some(v) = &timestep_spacing {
        if !["leading", "trailing", "linspace"].contains(&v.as_str()) {
            return Err(Error::InvalidInput(format!(
                "--timestep-spacing `{v}` (leading, trailing or linspace)"
            )));
        }
    }
    let mut req = GenerateRequest::default();
    let mut gpu_options = GpuOptions::from_env()?;
    let mut model_options = ModelOptions::default();
    if let Some(v) = negative_prompt {
        // Given, even empty: SDXL then encodes it instead of using zero embeddings.
        req.encode_empty_negative = true;
        req.negative_prompt = v;
    }
    req.prompt_2 = prompt_2;
    req.negative_prompt_2 = negative_prompt_2;
    if let Some(v) = original_size {
        req.original_size = Some(parse_pair("--original-size", &v)?);
    }
    if let Some(v) = crop_top_left {
        req.crop_top_left = parse_pair("--crop-top-left", &v)?;
    }
    if let Some(v) = target_size {
        req.target_size = Some(parse_pair("--target-size", &v)?);
    }
    if let Some(v) = aesthetic_score {
        req.aesthetic_score = v;
    }
    if let Some(v) = negative_aesthetic_score {
        req.negative_aesthetic_score = v;
    }
    if let Some(v) = steps {
        req.steps = v;
    }
    if let Some(v) = guidance {
        req.guidance_scale = v;
    }
    if let Some(v) = sampler {
        req.sampler = Some(v.parse()?);
    }
    if eta.is_some() {
        req.eta = eta;
    }
    if let Some(v) = rng {
        req.rng = v.parse()?;
    }
    if let Some(v) = seed_mode {
        req.seed_mode = match v.as_str() {
            "batch" => pipeline::SeedMode::Batch,
            "per-image" => pipeline::SeedMode::PerImage,
            other => {
                return Err(Error::InvalidInput(format!(
                    "--seed-mode `{other}` (batch or per-image)"
                )))
            }
        }
    }
    if let Some(v) = batch_size {
        req.batch_size = v;
    }
    if clip_skip.is_some() {
        req.clip_skip = clip_skip;
    }
    req.prompt_weighting = !no_prompt_weighting;
    if long_prompts {
        req.long_prompts = true;
    }
    if let Some(v) = strength {
        req.strength = v;
    }
    if let Some(v) = dtype {
        model_options.dtype = Some(v.parse().map_err(Error::InvalidInput)?);
    }
    if vae_f32 {
        model_options.vae_f32 = Some(true);
    }
    let mut vae_decoder = vae_decoder;
    if let Some(dir) = vae {
        if !dir.is_dir() {
            return Err(Error::InvalidInput(format!(
                "--vae {}: not a directory (give a diffusers AutoencoderKL or AutoencoderTiny \
                 folder)",
                dir.display()
            )));
        }
        if is_tiny_autoencoder(&dir) {
            vae_decoder = Some(dir);
        } else {
            model_options.vae_dir = Some(dir);
        }
    }
    if let Some(v) = vae_tiling {
        req.vae_tiling = v.parse()?;
    }
    if let Some(v) = variant {
        model_options.load.variant = v
            .parse()
            .map_err(|e| Error::InvalidInput(format!("--variant: {e}")))?;
    }
    if let Some(v) = prediction_type {
        model_options.load.prediction_type = Some(match v.as_str() {
            "epsilon" => ldm_wgpu::weights::PredictionType::Epsilon,
            "v_prediction" | "v" => ldm_wgpu::weights::PredictionType::VPrediction,
            other => return Err(Error::InvalidInput(format!("--prediction-type `{other}`"))),
        })
    }
    if profile {
        gpu_options.profile = true;
    }
    if adapter.is_some() {
        gpu_options.adapter = adapter;
    }
    let use_cache = !no_pipeline_cache;
    let Some(prompt) = prompt else {
        return Err(Error::InvalidInput(
            "give a prompt with -p \"...\" (an empty one is allowed: -p \"\")".into(),
        ));
    };
    req.prompt = prompt;
    if req.steps == 0 {
        return Err(Error::InvalidInput("--steps must be at least 1".into()));
    }
    // No --seed: a random one, printed so the image can be reproduced.
    req.seed = seed.unwrap_or_else(ldm_wgpu::rng::random_seed);
    if let Some(p) = &init_path {
        req.init_image = Some(Image::load_png(p)?);
    }
    if let Some(p) = &mask_path {
        req.mask = Some(Image::load_png(p)?);
    }
    // Every check that needs no model, before the adapter and the weights are touched. A size
    // left to the model's default is not known yet: it stands in as 8 here (the default is
    // always valid) and is set after loading, where `generate` checks the request again.
    req.width = width
        .or(req.init_image.as_ref().map(|i| i.width))
        .unwrap_or(8);
    req.height = height
        .or(req.init_image.as_ref().map(|i| i.height))
        .unwrap_or(8);
    let model = model.unwrap_or_else(pipeline::default_model_dir);
    // LoRAs: `--lora` files and the prompt's `<lora:NAME:w>` tags, found before anything loads;
    // the tags leave the prompt the text encoder reads, and stay in the one the PNG records.
    let lora_files = loras
        .iter()
        .map(|arg| parse_lora_arg(arg))
        .collect::<Result<Vec<_>, Error>>()?;
    let lora_dir = lora_dir.unwrap_or_else(|| ldm_wgpu::lora::default_lora_dir(&model));
    let tagged = ldm_wgpu::lora::prompt_loras(&req.prompt, &lora_dir)?;
    let recorded_prompt = ldm_wgpu::lora::prompt_with_lora_tags(&req.prompt, &lora_files);
    req.prompt = tagged.text.clone();
    req.validate()?;
    // The base + refiner handoff: where the refiner takes over, checked with the request.
    let handoff = match refiner {
        Some(dir) => {
            let start = refiner_start.unwrap_or(0.8);
            if req.mask.is_some() {
                return Err(Error::Unsupported(
                    "--refiner with --mask (a refiner over an inpainting run)".into(),
                ));
            }
            GenerateRequest {
                denoising_end: Some(start),
                ..req.clone()
            }
            .validate()?;
            Some((dir, start))
        }
        None => None,
    };
    model_options.with_encoder = req.init_image.is_some();
    if use_cache {
        gpu_options.pipeline_cache_path = pipeline_cache_path(&gpu_options);
    }
    let gpu = ldm_wgpu::Gpu::new(&gpu_options)?;
    if !quiet {
        eprintln!("adapter: {}", gpu.adapter);
        eprintln!("model:   {}", model.display());
    }
    let mut sd = StableDiffusion::load(gpu, &model, &model_options)?;
    // The refiner on a device queue of its own (as the C API runs models side by side); the
    // latents cross over through the host.
    let mut refiner = match &handoff {
        Some((dir, _)) => Some(load_refiner(&sd, dir, &gpu_options, &model_options)?),
        None => None,
    };
    if strength.is_none() && req.mask.is_some() && sd.sdxl.is_some() {
        // StableDiffusionXLInpaintPipeline's default (the first step dropped, the image noised
        // to the second timestep), where SD's inpainting pipelines default to img2img's.
        req.strength = 0.9999;
    }
    let lora_hashes = apply_loras(&sd, &lora_files, &tagged, quiet)?;
    // Tiny autoencoders (TAESD): a live full-resolution preview, and/or the final decode.
    let open_tiny =
        |dir: &PathBuf| ldm_wgpu::models::taesd::AutoencoderTiny::open(&sd.gpu, dir, sd.dtype);
    let preview_tiny = preview_vae.as_ref().map(open_tiny).transpose()?;
    if let Some(dir) = &vae_decoder {
        // With a refiner, it makes the final images.
        match &mut refiner {
            Some(refiner) => {
                let tiny = ldm_wgpu::models::taesd::AutoencoderTiny::open(
                    &refiner.gpu,
                    dir,
                    refiner.dtype,
                )?;
                refiner.set_tiny_decoder(Some(tiny))?;
            }
            None => sd.set_tiny_decoder(Some(open_tiny(dir)?))?,
        }
    }
    load_embeddings(&mut sd, embeddings, &req, quiet)?;
    if let Some(v) = timestep_spacing {
        // As if the folder's scheduler_config.json said so (diffusers: `from_config(config,
        // timestep_spacing=...)`); every sampler reads it from there.
        sd.scheduler_config.timestep_spacing = Some(v);
    }
    if karras {
        // Karras sigmas exist for the sigma-based samplers; name the Karras variant.
        let base = req
            .sampler
            .or_else(|| ldm_wgpu::parameters::config_sampler(&sd));
        let with_karras = base.and_then(SamplerKind::karras).ok_or_else(|| {
            let named = base.map_or_else(
                || sd.scheduler_config.class_name().unwrap_or("?").to_string(),
                |k| k.name().to_string(),
            );
            // The samplers that have a Karras variant other than themselves.
            let with: Vec<&str> = SamplerKind::ALL
                .into_iter()
                .filter(|&k| k.karras().is_some_and(|v| v != k))
                .map(SamplerKind::name)
                .collect();
            Error::InvalidInput(format!(
                "--karras works with --sampler {} (not `{named}`)",
                with.join(", ")
            ))
        })?;
        req.sampler = Some(with_karras);
    }
    // Default size: the init image's, else the model's native one (sample_size × VAE factor).
    let native = sd.unet.config.sample_size * sd.vae.config.downscale();
    req.width = width
        .or(req.init_image.as_ref().map(|i| i.width))
        .unwrap_or(native);
    req.height = height
        .or(req.init_image.as_ref().map(|i| i.height))
        .unwrap_or(native);
    if !quiet {
        eprintln!(
            "loaded in {:.2}s ({} weights, VAE {}); {}x{}, {} steps, seed {}",
            sd.load_time.as_secs_f64(),
            sd.dtype.name(),
            sd.vae_dtype.name(),
            req.width,
            req.height,
            req.steps,
            req.seed
        );
    }
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let model_name = ldm_wgpu::parameters::model_name(&model);
    let refiner_name = handoff
        .as_ref()
        .map(|(dir, _)| ldm_wgpu::parameters::model_name(dir));
    let total_images = req.batch_size * batch_count;
    let mut written = 0;
    for batch in 0..batch_count {
        let mut r = req.clone();
        r.seed = req.seed.wrapping_add((batch * req.batch_size) as u64);
        let vae_factor = sd.vae.config.downscale();
        let gpu_ref = &sd.gpu;
        let mut report = |p: &pipeline::Progress<'_>| {
            if let Some(path) = &preview {
                // A preview of the first image, rewritten after every step: through TAESD when
                // one is given (--preview-vae), else the cheap linear latent projection.
                let img = match &preview_tiny {
                    Some(tiny) => ldm_wgpu::preview::tiny_vae_preview(
                        gpu_ref,
                        tiny,
                        p.latents,
                        0,
                        p.preview_scale,
                    ),
                    None => ldm_wgpu::preview::latent_preview(gpu_ref, p.latents, 0)
                        .map(|img| ldm_wgpu::preview::upscale(&img, vae_factor)),
                };
                match img {
                    Ok(img) => {
                        if let Err(e) = img.save_png(path) {
                            eprintln!("\npreview not written: {e}");
                        }
                    }
                    Err(e) => eprintln!("\npreview failed: {e}"),
                }
            }
            if !quiet {
                progress_line(p, terminal);
            }
            // Ctrl-C: returning false cancels after this model call.
            !interrupted()
        };
        let run = match (&refiner, &handoff) {
            (Some(refiner), Some((_, start))) => {
                generate_with_refiner(&sd, refiner, *start, &r, &mut report)
            }
            _ => sd.generate(&r, &mut report),
        };
        let out = match run {
            Err(_) if interrupted() => {
                // Whatever a batch already finished is on disk, complete; nothing else is.
                eprintln!(
                    "\ninterrupted: stopped after the current step; nothing written for this image"
                );
                std::process::exit(130);
            }
            other => other?,
        };
        if !quiet {
            if terminal {
                eprintln!();
            }
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
        for (i, img) in out.images.iter().enumerate() {
            // diffusers draws a batch from one generator (every image has the batch's seed);
            // per-image seeding gives image i the seed + i.
            let image_seed = match r.seed_mode {
                pipeline::SeedMode::Batch => r.seed,
                pipeline::SeedMode::PerImage => r.seed.wrapping_add(i as u64),
            };
            let path = output_path(&output, written, total_images, image_seed);
            let recorded = ldm_wgpu::parameters::Recorded {
                prompt: &recorded_prompt,
                model: &model_name,
                lora_hashes: &lora_hashes,
                refiner: refiner_name
                    .as_deref()
                    .zip(handoff.as_ref().map(|(_, s)| *s)),
            };
            let params = ldm_wgpu::parameters::a1111_parameters(&r, &recorded, &sd, image_seed, i);
            img.save_png_with_text(&path, &[("parameters", &params)])?;
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
        print!(
            "{}",
            ldm_wgpu::runtime::timing::format_table(&sd.gpu.profile()?)
        );
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
    let tag = options.adapter.clone().unwrap_or_else(|| "default".into());
    let safe: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Some(base.join("ldm-wgpu").join(format!("pipelines-{safe}.bin")))
}

/// `-o` may hold a pattern: `{n}` or `%d` (image number) and `{seed}`. Without one, a batch
/// gets `-N` before the extension.
fn output_path(path: &std::path::Path, n: usize, total: usize, seed: u64) -> std::path::PathBuf {
    let text = path.to_string_lossy();
    if text.contains("{n}") || text.contains("%d") || text.contains("{seed}") {
        let s = text
            .replace("{n}", &n.to_string())
            .replace("%d", &n.to_string())
            .replace("{seed}", &seed.to_string());
        return std::path::PathBuf::from(s);
    }
    if total == 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "ldm-out".into());
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_string())
        .unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{n}.{ext}"))
}

/// A progress bar with it/s and ETA on a terminal; one plain line per step otherwise.
fn progress_line(p: &ldm_wgpu::pipeline::Progress<'_>, terminal: bool) {
    let done = p.call + 1;
    let secs = p.elapsed.as_secs_f64();
    let rate = done as f64 / secs.max(1e-9);
    let eta = (p.calls - done) as f64 / rate.max(1e-9);
    if terminal {
        let width = 30;
        let filled = done * width / p.calls.max(1);
        eprint!(
            "\r[{}{}] {done}/{} {rate:.2} it/s, ETA {eta:.1}s   ",
            "#".repeat(filled),
            "-".repeat(width - filled),
            p.calls
        );
    } else {
        eprintln!(
            "step {done}/{} t={:.1} {secs:.2}s {rate:.2} it/s ETA {eta:.1}s",
            p.calls, p.timestep
        );
    }
}

/// `--lora FILE[:WEIGHT]`: the weight is what follows the last `:` when that is a number (so a
/// path may hold colons), else 1.
fn parse_lora_arg(arg: &str) -> Result<(PathBuf, f32), Error> {
    let (path, weight) = match arg.rsplit_once(':') {
        Some((path, w)) if !path.is_empty() && w.trim().parse::<f32>().is_ok() => {
            let weight: f32 = w.trim().parse().unwrap_or(1.0);
            if !weight.is_finite() {
                return Err(Error::InvalidInput(format!(
                    "--lora {arg}: the weight `{w}` is not a finite number"
                )));
            }
            (PathBuf::from(path), weight)
        }
        _ => (PathBuf::from(arg), 1.0),
    };
    if !path.is_file() {
        return Err(Error::InvalidInput(format!(
            "--lora {arg}: no file {} (give FILE or FILE:WEIGHT)",
            path.display()
        )));
    }
    Ok((path, weight))
}

/// Open the `--lora` files and the prompt's tagged LoRAs for this model, apply them, and say
/// what each changed. Returns A1111's `Lora hashes:` entries (`name: short hash`).
fn apply_loras(
    sd: &ldm_wgpu::pipeline::StableDiffusion,
    files: &[(PathBuf, f32)],
    tagged: &ldm_wgpu::lora::PromptLoras,
    quiet: bool,
) -> Result<Vec<String>, Error> {
    use ldm_wgpu::weights::lora::LoraTarget;
    if !quiet {
        for tag in &tagged.ignored {
            eprintln!(
                "warning: <{}:{}> ignored: only <lora:…> extra networks are applied",
                tag.kind,
                tag.args.join(":")
            );
        }
    }
    let specs = sd.open_lora_specs(files, tagged)?;
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let hashes = ldm_wgpu::lora::a1111_lora_hashes(&specs);
    let start = std::time::Instant::now();
    let applied = sd.set_loras(&specs)?;
    sd.gpu.wait()?;
    if !quiet {
        for a in &applied {
            let count = |t| a.modules.get(&t).copied().unwrap_or(0);
            let weight = if a.text_encoder_weight == a.unet_weight {
                format!("{}", a.unet_weight)
            } else {
                format!("te {} / unet {}", a.text_encoder_weight, a.unet_weight)
            };
            let te2 = match count(LoraTarget::TextEncoder2) {
                0 => String::new(),
                n => format!(" (+ {n} in text_encoder_2)"),
            };
            eprintln!(
                "lora:    {} weight {weight}: {} U-Net and {} text-encoder modules{te2}",
                a.name,
                count(LoraTarget::Unet),
                count(LoraTarget::TextEncoder)
            );
        }
        let kept = match sd.lora_backup() {
            ldm_wgpu::lora::LoraBackup::Host => "in host memory",
            ldm_wgpu::lora::LoraBackup::Gpu => "on the GPU",
        };
        eprintln!(
            "         merged in {:.0} ms ({:.1} MiB of original weights kept {kept})",
            start.elapsed().as_secs_f64() * 1e3,
            sd.lora_saved_bytes() as f64 / 1048576.0
        );
    }
    Ok(hashes)
}

/// Whether `dir` holds a diffusers `AutoencoderTiny` (TAESD) rather than an `AutoencoderKL`.
fn is_tiny_autoencoder(dir: &std::path::Path) -> bool {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["_class_name"] == "AutoencoderTiny")
}

/// The embeddings folder: `--embeddings DIR` (which must exist), else ./embeddings when it
/// exists. Checked before anything is loaded.
fn embeddings_dir(flag: Option<PathBuf>) -> Result<Option<PathBuf>, Error> {
    match flag {
        Some(dir) if !dir.is_dir() => Err(Error::InvalidInput(format!(
            "--embeddings {}: not a directory",
            dir.display()
        ))),
        Some(dir) => Ok(Some(dir)),
        None => Ok(Some(PathBuf::from("embeddings")).filter(|d| d.is_dir())),
    }
}

/// Textual-inversion embeddings from `--embeddings DIR` (or ./embeddings when it exists): all
/// are loaded, as in A1111; those the prompts use are printed, and files that cannot be used
/// are reported when a prompt names them.
fn load_embeddings(
    sd: &mut ldm_wgpu::pipeline::StableDiffusion,
    dir: Option<PathBuf>,
    req: &ldm_wgpu::pipeline::GenerateRequest,
    quiet: bool,
) -> Result<(), Error> {
    let Some(dir) = dir else {
        return Ok(());
    };
    let (found, unreadable) = ldm_wgpu::embeddings::load_dir(&dir)?;
    let report = sd.set_embeddings(&found)?;
    if quiet {
        return Ok(());
    }
    let text = format!("{} {}", req.prompt, req.negative_prompt).to_lowercase();
    let mentioned = |name: &str| text.contains(&name.to_lowercase());
    let skipped = unreadable.iter().map(|(path, why)| {
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        (name.to_string(), why.clone())
    });
    for (name, why) in report.skipped.iter().cloned().chain(skipped) {
        if mentioned(&name) {
            eprintln!("warning: embedding `{name}` not used: {why}");
        }
    }
    let used: Vec<String> = [&req.prompt, &req.negative_prompt]
        .iter()
        .flat_map(|p| sd.embeddings_in(p))
        .collect();
    for (name, count) in &report.loaded {
        if used.contains(name) {
            let plural = if *count == 1 { "" } else { "s" };
            eprintln!("embedding: {name} ({count} vector{plural})");
        }
    }
    Ok(())
}
