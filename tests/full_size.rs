//! Full-size parity: the real SD 1.5 and SD 2.1 architectures (the 860M/866M-parameter U-Nets,
//! the 83.7M VAE, the 123M/340M CLIP text towers), randomly initialised, against diffusers /
//! transformers at a reduced resolution (32×32 latents, 256×256 pixels); plus the GPU-memory
//! report of SD 1.5 in f16 at 512×512.
//!
//! Opt-in: too slow for every CI run (on lavapipe one batch-2 U-Net call at 32×32 takes
//! ~40-90 s, the memory test several minutes). Every test passes at once, printing
//! "skipped: set LDM_FULL_SIZE=1", unless LDM_FULL_SIZE=1. Then the models and fixtures are read
//! from LDM_FULL_SIZE_DIR (default /tmp/ldm-full-size); they are generated, not committed (the
//! weights are ~4.5 GB), and the tests do not shell out to make them. Python is needed in this
//! mode only:
//!
//!   D=/tmp/ldm-full-size
//!   for a in sd15 sd21; do
//!     HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_random_sd.py --arch $a --dtype fp16 --out $D/$a
//!     HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_full_size_fixture.py --arch $a \
//!         --model $D/$a --out $D/$a-fixture
//!   done
//!   LDM_FULL_SIZE=1 cargo test --test full_size -- --nocapture --test-threads 1
//!
//! (about 2 minutes of Python for both archs; see each tool's header.) The tests hold one lock,
//! so they run one at a time whatever --test-threads says: each holds a model of up to 3.5 GB in
//! (lavapipe's host) memory.
//!
//! Tolerances (relative L2 over the whole output, against float32 on the CPU):
//! - f32 ≤ 1e-4, as tests/models.rs (tightened from the 1e-3 first planned, as measured ~3e-6):
//!   what is left is summation order (~1e-6 per kernel) growing with depth; the full-size
//!   networks are deeper and wider than the tiny fixtures (12/23 CLIP layers, 16 transformer
//!   blocks, 1280-wide convs with 11 520-long reductions) but their activations stay O(1).
//! - f16 ≤ 2e-2: weights are stored in f16 by the tools script, so both sides use the same
//!   values; every activation is rounded to 11 bits (~3e-4) and those errors add up over the
//!   chain. Measured ~1e-3 everywhere, so 2e-2 leaves room for other adapters' f16 rounding.
//!
//! Measured on lavapipe (llvmpipe, Mesa 22.3, 2 shared CPU cores), forward seconds of our engine
//! for one call (timings vary ×2-3 with the machine's load):
//!
//!   component          | f32 rel. L2 | f16 rel. L2 | f32 s | f16 s
//!   sd15 text encoder  |   (refused) |     1.0e-3  |   -   |    6
//!   sd15 U-Net 2×32×32 |     2.9e-6  |     1.1e-3  |  122  |   95
//!   sd15 VAE dec. 256² |     3.6e-6  |     1.4e-3  |  136  |  133
//!   sd21 text encoder  |   (refused) |     1.3e-3  |   -   |   10
//!   sd21 U-Net 2×32×32 |     3.1e-6  |     1.1e-3  |   42  |   40
//!   sd21 VAE dec. 256² |     3.6e-6  |     1.4e-3  |   70  |   67
//!
//! "Refused": the f32 token-embedding table (49408×768 / ×1024 floats, 145 / 193 MiB) is over
//! lavapipe's 128 MiB max_storage_buffer_binding_size, which the engine refuses rather than
//! splits, so the f32 text-encoder tests fail there until src/models/clip.rs splits or
//! host-gathers the table; adapters with larger bindings run them.
//!
//! Memory, SD 1.5 f16 (VAE f32 by force_upcast), txt2img 512×512, 1 guided step + decode:
//! pool peak 2620 MiB (weights 2063 MiB after load; 2282 MiB after the U-Net step), limit 3 GiB;
//! 13 minutes on lavapipe (text encoder 3 s; the rest the 64×64 U-Net call and the f32 decode).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use ldm_wgpu::models::clip::{ClipConfig, ClipTextModel};
use ldm_wgpu::models::unet::{UNet2DConditionModel, UNetConfig};
use ldm_wgpu::models::vae::{AutoencoderKL, VaeConfig};
use ldm_wgpu::pipeline::{GenerateRequest, ModelOptions, StableDiffusion};
use ldm_wgpu::tokenizer::ClipTokenizer;
use ldm_wgpu::weights::{open_component, Component, ComponentKind, LoadOptions, SafetensorsFile};
use ldm_wgpu::{DType, Gpu, GpuOptions, Tensor};
use serde_json::Value;

/// (f32, f16) relative-L2 bounds; see the module doc for why.
const TOLERANCES: (f64, f64) = (1e-4, 2e-2);

/// Peak of our buffer pool (weights + activations) for SD 1.5 in f16 at 512×512.
const MEMORY_LIMIT: u64 = 3 << 30;

// ------------------------------------------------------------------------------------ plumbing

/// True when the opt-in is set; otherwise prints the skip line (the test then passes).
fn enabled() -> bool {
    if std::env::var("LDM_FULL_SIZE").as_deref() == Ok("1") {
        true
    } else {
        eprintln!("skipped: set LDM_FULL_SIZE=1 (see tests/full_size.rs for the setup)");
        false
    }
}

/// One full-size test at a time: each holds a GPU model of up to 3.5 GB (host memory on
/// lavapipe), and the CPU cores are better spent on one than shared by several.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn root() -> PathBuf {
    std::env::var_os("LDM_FULL_SIZE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/ldm-full-size"))
}

fn gpu() -> Gpu {
    let gpu = Gpu::new(&GpuOptions::from_env().unwrap())
        .expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)");
    eprintln!("full-size tests run on: {}", gpu.adapter);
    gpu
}

fn dtypes(gpu: &Gpu) -> Vec<DType> {
    if gpu.caps.shader_f16 {
        vec![DType::F32, DType::F16]
    } else {
        eprintln!("no SHADER_F16 on this adapter: f32 only");
        vec![DType::F32]
    }
}

fn setup_hint(arch: &str) -> String {
    let d = root();
    format!(
        "HINT: make them with\n  \
         HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_random_sd.py --arch {arch} --dtype fp16 --out {m}\n  \
         HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_full_size_fixture.py --arch {arch} --model {m} --out {f}\n\
         (or point LDM_FULL_SIZE_DIR at a folder holding {arch}/ and {arch}-fixture/)",
        m = d.join(arch).display(),
        f = d.join(format!("{arch}-fixture")).display(),
    )
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A random full-size model folder and its diffusers reference outputs.
struct Case {
    model: PathBuf,
    io: SafetensorsFile,
    meta: Value,
}

impl Case {
    /// Opens `<root>/<arch>` and `<root>/<arch>-fixture`, or fails saying what to run.
    fn open(arch: &'static str) -> Case {
        let model = root().join(arch);
        let fixture = root().join(format!("{arch}-fixture"));
        for needed in [
            model.join("random_sd.json"),
            fixture.join("meta.json"),
            fixture.join("io.safetensors"),
        ] {
            assert!(
                needed.is_file(),
                "full-size {arch}: {} is missing\n{}",
                needed.display(),
                setup_hint(arch)
            );
        }
        let meta = read_json(&fixture.join("meta.json"));
        // The fixture belongs to the weights it was computed from: same arch, seed, dtype and
        // library versions give byte-identical weights (see tools/make_random_sd.py).
        let random_sd = read_json(&model.join("random_sd.json"));
        assert_eq!(
            meta["random_sd"],
            random_sd,
            "full-size {arch}: {} was made from another model folder than {}\n{}",
            fixture.display(),
            model.display(),
            setup_hint(arch)
        );
        let io = SafetensorsFile::open(fixture.join("io.safetensors")).unwrap();
        Case { model, io, meta }
    }

    fn component(&self, kind: ComponentKind) -> Component {
        open_component(
            self.model.join(kind.subfolder()),
            kind,
            &LoadOptions::default(),
        )
        .unwrap()
    }

    fn get(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = self.io.tensor(name).unwrap();
        (t.to_f32_vec(), t.shape.clone())
    }

    /// An NCHW tensor of the fixture as NHWC data and shape.
    fn nhwc(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let (v, s) = self.get(name);
        let [b, c, h, w] = s[..] else {
            panic!("{name}: {s:?} is not NCHW")
        };
        let mut out = vec![0.0; v.len()];
        for bi in 0..b {
            for ci in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        out[((bi * h + y) * w + x) * c + ci] = v[((bi * c + ci) * h + y) * w + x];
                    }
                }
            }
        }
        (out, vec![b, h, w, c])
    }
}

/// ||got - want|| / ||want|| in f64; infinity if anything is not finite.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "output sizes differ");
    if got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den).sqrt()
}

/// Runs every dtype of one component and collects what went wrong, so that one failure (say an
/// f32 tensor over this adapter's binding limit) does not hide the other dtype's measurement.
#[derive(Default)]
struct Outcome(Vec<String>);

impl Outcome {
    /// `run` loads the component and records its forward: Ok((output, load seconds)).
    /// Flushes, times the forward to completion, compares and prints one report line.
    fn compare(
        &mut self,
        gpu: &Gpu,
        what: &str,
        dtype: DType,
        want: &[f32],
        run: impl FnOnce() -> ldm_wgpu::Result<(Tensor, f64)>,
    ) {
        let dt = dtype.name();
        let t = Instant::now();
        let result = run().and_then(|(out, load_s)| {
            gpu.flush()?;
            gpu.wait()?;
            let forward_s = t.elapsed().as_secs_f64() - load_s;
            Ok((gpu.download(&out)?, load_s, forward_s))
        });
        gpu.trim_pool();
        let (got, load_s, forward_s) = match result {
            Ok(r) => r,
            Err(e) => {
                let hint = match e {
                    ldm_wgpu::Error::LimitExceeded { .. } => {
                        "\nHINT: the engine refuses tensors over the adapter's \
                         max_storage_buffer_binding_size (128 MiB on lavapipe); e.g. the full-size CLIP \
                         token embedding in f32 is 49408×768×4 B = 145 MiB (SD 2.x: 193 MiB), so the \
                         table has to be split or gathered on the host in src/models/clip.rs"
                    }
                    _ => "",
                };
                eprintln!("MEASURED {what} {dt}: FAILED: {e}{hint}");
                self.0.push(format!("{what} {dt}: {e}{hint}"));
                return;
            }
        };
        let e = rel_l2(&got, want);
        let tol = match dtype {
            DType::F32 => TOLERANCES.0,
            DType::F16 => TOLERANCES.1,
        };
        eprintln!(
            "MEASURED {what} {dt}: relative L2 {e:.2e} (tolerance {tol:.0e}); load {load_s:.1} s, \
             forward {forward_s:.1} s"
        );
        if e.is_nan() || e > tol {
            self.0.push(format!(
                "{what} {dt}: relative L2 error {e:.3e} > tolerance {tol:.1e}"
            ));
        }
    }

    fn finish(self) {
        assert!(self.0.is_empty(), "{}", self.0.join("\n"));
    }
}

/// Seconds since `t`, after the queued uploads have landed.
fn loaded(gpu: &Gpu, t: Instant) -> ldm_wgpu::Result<f64> {
    gpu.flush()?;
    gpu.wait()?;
    Ok(t.elapsed().as_secs_f64())
}

// ------------------------------------------------------------------------------------- parity

fn check_text_encoder(arch: &'static str) {
    let case = Case::open(arch);
    let gpu = gpu();
    // Our tokenizer must give transformers' ids for [negative, prompt] (pads differ: SD 2.x "!").
    let tokenizer = ClipTokenizer::from_dir(&case.model.join("tokenizer")).unwrap();
    let (want_ids, ids_shape) = case.get("input_ids");
    let want_ids: Vec<u32> = want_ids.iter().map(|&x| x as u32).collect();
    let prompts = [&case.meta["negative_prompt"], &case.meta["prompt"]]
        .map(|p| p.as_str().unwrap().to_string());
    let ids: Vec<u32> = prompts
        .iter()
        .flat_map(|p| tokenizer.encode_padded(p).ids)
        .collect();
    assert_eq!(
        ids, want_ids,
        "{arch}: token ids differ from CLIPTokenizer's"
    );
    let (want, _) = case.get("text_hidden"); // [2, 77, C]
    let mut outcome = Outcome::default();
    for dtype in dtypes(&gpu) {
        outcome.compare(&gpu, &format!("{arch} text encoder"), dtype, &want, || {
            let t = Instant::now();
            let comp = case.component(ComponentKind::TextEncoder);
            let cfg = ClipConfig::from_json(&comp.config)?;
            let model = ClipTextModel::load(&gpu, &comp.weights.root(), cfg, dtype)?;
            comp.weights.check_all_used()?;
            let load_s = loaded(&gpu, t)?;
            let out = model.forward(&gpu, &ids, ids_shape[0], None)?; // [2, 77, C]
            gpu.flush()?; // submitted while the model's buffers are alive
            Ok((out, load_s))
        });
    }
    outcome.finish();
}

fn check_unet(arch: &'static str) {
    let case = Case::open(arch);
    let gpu = gpu();
    let (sample, sample_shape) = case.nhwc("unet_sample"); // [2, 32, 32, 4]
    let (timestep, _) = case.get("unet_timestep");
    let (context, context_shape) = case.get("text_hidden"); // [2, 77, C]: [uncond; cond]
    let (want, _) = case.nhwc("unet_out"); // [2, 32, 32, 4]
    let mut outcome = Outcome::default();
    for dtype in dtypes(&gpu) {
        outcome.compare(&gpu, &format!("{arch} U-Net"), dtype, &want, || {
            let t = Instant::now();
            let comp = case.component(ComponentKind::Unet);
            let cfg = UNetConfig::from_json(&comp.config)?;
            let unet = UNet2DConditionModel::load(&gpu, &comp.weights.root(), cfg, dtype)?;
            comp.weights.check_all_used()?;
            let x = gpu.upload(&sample, &sample_shape, dtype)?;
            let ctx = gpu.upload(&context, &context_shape, dtype)?;
            let load_s = loaded(&gpu, t)?;
            let out = unet.forward(&gpu, &x, timestep[0] as f64, &ctx)?; // [2, 32, 32, 4]
            gpu.flush()?; // submitted while the model's buffers are alive
            Ok((out, load_s))
        });
    }
    outcome.finish();
}

fn check_vae_decoder(arch: &'static str) {
    let case = Case::open(arch);
    let gpu = gpu();
    let (latents, latents_shape) = case.nhwc("vae_latents"); // [1, 32, 32, 4], already / scaling_factor
    let (want, _) = case.nhwc("vae_out"); // [1, 256, 256, 3]
    let mut outcome = Outcome::default();
    for dtype in dtypes(&gpu) {
        outcome.compare(&gpu, &format!("{arch} VAE decoder"), dtype, &want, || {
            let t = Instant::now();
            let comp = case.component(ComponentKind::Vae);
            let cfg = VaeConfig::from_json(&comp.config)?;
            // Decoder only (the pipeline's txt2img load), so the encoder's tensors stay unused.
            let vae = AutoencoderKL::load(&gpu, &comp.weights.root(), cfg, dtype, false)?;
            let z = gpu.upload(&latents, &latents_shape, dtype)?;
            let load_s = loaded(&gpu, t)?;
            let out = vae.decode(&gpu, &z)?; // [1, 256, 256, 3]
            gpu.flush()?; // submitted while the model's buffers are alive
            Ok((out, load_s))
        });
    }
    outcome.finish();
}

#[test]
fn sd15_text_encoder_matches_transformers() {
    if enabled() {
        let _serial = serial();
        check_text_encoder("sd15");
    }
}

#[test]
fn sd15_unet_matches_diffusers() {
    if enabled() {
        let _serial = serial();
        check_unet("sd15");
    }
}

#[test]
fn sd15_vae_decoder_matches_diffusers() {
    if enabled() {
        let _serial = serial();
        check_vae_decoder("sd15");
    }
}

#[test]
fn sd21_text_encoder_matches_transformers() {
    if enabled() {
        let _serial = serial();
        check_text_encoder("sd21");
    }
}

#[test]
fn sd21_unet_matches_diffusers() {
    if enabled() {
        let _serial = serial();
        check_unet("sd21");
    }
}

#[test]
fn sd21_vae_decoder_matches_diffusers() {
    if enabled() {
        let _serial = serial();
        check_vae_decoder("sd21");
    }
}

// ------------------------------------------------------------------------------------- memory

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// SD 1.5 in f16, txt2img 512×512, one step with guidance (a batch-2 U-Net call at 64×64
/// latents) and the decode: the pool's peak (weights + activations + free buffers kept for
/// reuse) must stay ≤ 3 GiB. The VAE runs in f32 as the pipeline loads it by default (the SD 1.5
/// VAE config has no force_upcast, and diffusers defaults it to true).
#[test]
fn sd15_f16_512_memory() {
    if !enabled() {
        return;
    }
    let _serial = serial();
    let model = root().join("sd15");
    assert!(
        model.join("random_sd.json").is_file(),
        "full-size sd15: {} is missing\n{}",
        model.display(),
        setup_hint("sd15")
    );
    let gpu = gpu();
    if !gpu.caps.shader_f16 {
        eprintln!("skipped: no SHADER_F16 on {}", gpu.adapter);
        return;
    }
    let opts = ModelOptions {
        dtype: Some(DType::F16),
        ..Default::default()
    };
    let sd = StableDiffusion::load(gpu, &model, &opts).unwrap();
    let loaded = sd.gpu.pool_stats();
    eprintln!(
        "MEMORY sd15 f16 (VAE {}): after load {:.0} MiB live in {} buffers, load {:.1} s",
        sd.vae_dtype.name(),
        mib(loaded.live_bytes),
        loaded.live_buffers,
        sd.load_time.as_secs_f64()
    );
    let req = GenerateRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        width: 512,
        height: 512,
        steps: 1,
        // DDIM, not the config's PNDM: with steps 1 our PNDM schedules two calls ([1, 1], the
        // second indexing t = 1001) where diffusers' PNDMScheduler gives one ([1]). One call
        // either way is what the memory report needs.
        sampler: Some("ddim".parse().unwrap()),
        seed: 0,
        ..Default::default()
    };
    // The pipeline's own step timing ends at the submit; waiting here makes the split between
    // the U-Net step and the decode honest (it changes no allocation).
    let mut after_step = None;
    let start = Instant::now();
    let out = sd
        .generate(&req, &mut |_| {
            sd.gpu.wait().unwrap();
            after_step = Some((sd.gpu.pool_stats(), start.elapsed().as_secs_f64()));
            true
        })
        .unwrap();
    let total_s = start.elapsed().as_secs_f64();
    let end = sd.gpu.pool_stats();
    let (step, step_done_s) = after_step.expect("one step ran");
    eprintln!(
        "MEMORY sd15 f16 512×512: peak after the U-Net step {:.0} MiB, peak after decode {:.0} MiB \
         (limit {:.0} MiB); {} buffers created",
        mib(step.peak_bytes),
        mib(end.peak_bytes),
        mib(MEMORY_LIMIT),
        end.created
    );
    eprintln!(
        "TIMING sd15 f16 512×512: text encoder {:.1} s, text + U-Net step done at {step_done_s:.1} s, \
         decode {:.1} s, total {total_s:.1} s",
        out.timings.text_encode.as_secs_f64(),
        total_s - step_done_s,
    );
    assert_eq!(out.images.len(), 1);
    assert!(
        out.latents.iter().all(|x| x.is_finite()),
        "non-finite latents"
    );
    assert!(
        end.peak_bytes <= MEMORY_LIMIT,
        "SD 1.5 f16 at 512×512 peaked at {:.0} MiB > {:.0} MiB",
        mib(end.peak_bytes),
        mib(MEMORY_LIMIT)
    );
}
