//! Samplers (diffusers' "schedulers"), ported from diffusers 0.42 `src/diffusers/schedulers/`.
//!
//! Every coefficient is computed here in f64 on the CPU; the GPU only ever runs one fused
//! element-wise kernel (`shaders/sampler_step.wgsl`):
//!
//! ```text
//! eps   = uncond + g * (cond - uncond)        (guided: model_out = [uncond; cond], 2B batch)
//!       = model_out                           (unguided)
//! out_a = sum_i a[i] * slot[i] + a_model * eps
//! out_b = sum_i b[i] * slot[i] + b_model * eps   (optional)
//! ```
//!
//! A sampler turns each model call into a [`StepPlan`]: one or more [`LinearStep`]s over
//! sampler-owned latent-sized buffers ([`Buf`]), followed by buffer swaps (pointer swaps: a
//! kernel never writes a buffer it reads, which wgpu forbids within one dispatch anyway).
//! [`execute_on_cpu`] is the specification of what the GPU does with a plan; [`execute_on_gpu`]
//! (gpu.rs) does it.
//!
//! Samplers are written like the diffusers code they port, but over [`Lin`], a symbolic linear
//! combination of buffers and the model output, so `x0 = (x - sigma * eps)` reads as in Python.
//!
//! Pipeline loop (txt2img), mirroring `StableDiffusionPipeline.__call__`:
//! ```text
//! let mut s = build_sampler(&config, Some(SamplerKind::EulerA), steps)?;
//! latents = rng.randn(n) * s.init_noise_sigma()
//! for call in 0..s.timesteps().len():
//!     unet_in = latents * s.model_input_scale(call)       (duplicated to 2B when guided)
//!     model_out = unet(unet_in, s.timesteps()[call], text)
//!     plan = s.step(call)
//!     if plan.needs_noise { Noise <- rng.randn(n) }     (same generator as the latents)
//!     run plan (execute_on_gpu, or execute_on_cpu)
//! ```
//! img2img / inpainting: call [`Sampler::truncate_for_strength`] right after building, then
//! `latents = c.original * init_latents + c.noise * noise` with `c = s.add_noise(0)`; inpainting
//! with a 4-channel U-Net re-noises the original with `s.add_noise(call + 1)` after each step.

mod ddim;
mod ddpm;
mod deis;
mod dpm_solver_multistep;
mod euler;
mod euler_ancestral;
mod gpu;
mod heun;
mod kdpm2;
mod kind;
mod lcm;
mod lms;
mod pndm;
mod tcd;
mod unipc;

pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use deis::Deis;
pub use dpm_solver_multistep::DpmSolverMultistep;
pub use euler::Euler;
pub use euler_ancestral::EulerAncestral;
pub use gpu::{execute_on_gpu, GpuBuffers};
pub use heun::Heun;
pub use kdpm2::{Kdpm2, Kdpm2Ancestral};
pub use kind::{SamplerKind, SchedulerClass};
pub use lcm::Lcm;
pub use lms::Lms;
pub use pndm::Pndm;
pub use tcd::Tcd;
pub use unipc::UniPc;

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::ops::{Add, Div, Mul, Neg, Sub};

// ------------------------------------------------------------------------------------------------
// Plans: what the GPU kernel executes
// ------------------------------------------------------------------------------------------------

/// A latent-sized f32 buffer owned by the sampler loop (same shape as the latents, batch B).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Buf {
    /// The current latents x_t: the U-Net input (after `model_input_scale`).
    Latents,
    /// Output scratch; plans swap it into `Latents`.
    Next,
    /// Multistep memory, most recent first: DPM-Solver x0 predictions, PNDM eps, LMS derivatives,
    /// Heun's first derivative. One index past the live ones is used as scratch.
    History(u8),
    /// The sample at the start of a two-call step (Heun, PNDM's first step).
    Saved,
    /// Fresh standard-normal noise, filled by the pipeline when [`StepPlan::needs_noise`].
    Noise,
}

/// The optional second output of a [`LinearStep`].
#[derive(Clone, Debug, PartialEq)]
pub struct SecondOutput {
    pub b: [f64; 5],
    pub b_model: f64,
    pub out: Buf,
}

/// One dispatch of the fused kernel: `out_a = sum a[i]*inputs[i] + a_model*eps`, and optionally
/// `out_b = sum b[i]*inputs[i] + b_model*eps`. Outputs never alias inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearStep {
    pub inputs: [Option<Buf>; 5],
    pub a: [f64; 5],
    pub a_model: f64,
    pub out_a: Buf,
    pub b: Option<SecondOutput>,
}

impl LinearStep {
    /// Packs one or two linear combinations into kernel slots (at most 5 distinct buffers).
    pub fn new(out_a: Buf, a: &Lin, b: Option<(Buf, &Lin)>) -> Self {
        let mut inputs: [Option<Buf>; 5] = [None; 5];
        let mut used = 0;
        let mut slot_of = |buf: Buf| -> usize {
            if let Some(i) = inputs[..used].iter().position(|s| *s == Some(buf)) {
                return i;
            }
            assert!(used < 5, "sampler step needs more than 5 input buffers");
            inputs[used] = Some(buf);
            used += 1;
            used - 1
        };
        let mut pack = |lin: &Lin| {
            let mut coeffs = [0.0; 5];
            for &(buf, c) in &lin.terms {
                coeffs[slot_of(buf)] += c;
            }
            coeffs
        };
        let a_coeffs = pack(a);
        let b = b.map(|(out, lin)| SecondOutput {
            b: pack(lin),
            b_model: lin.model,
            out,
        });
        let step = LinearStep {
            inputs,
            a: a_coeffs,
            a_model: a.model,
            out_a,
            b,
        };
        for out in std::iter::once(out_a).chain(step.b.as_ref().map(|b| b.out)) {
            assert!(
                !step.inputs.contains(&Some(out)),
                "{out:?} is both input and output"
            );
        }
        step
    }
}

/// Everything to do after one model call.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct StepPlan {
    /// Kernel dispatches, in order.
    pub ops: Vec<LinearStep>,
    /// Buffer swaps applied after the ops, in order (swap the handles, not the data).
    pub swaps: Vec<(Buf, Buf)>,
    /// The pipeline must fill [`Buf::Noise`] with `randn` from the image's generator first.
    pub needs_noise: bool,
}

impl StepPlan {
    /// The common case: `Next = update`, then `Latents <-> Next`.
    fn update_latents(update: &Lin) -> Self {
        StepPlan {
            ops: vec![LinearStep::new(Buf::Next, update, None)],
            swaps: vec![(Buf::Latents, Buf::Next)],
            needs_noise: update.uses(Buf::Noise),
        }
    }
}

/// A symbolic linear combination of buffers plus `model` times the (guided) model output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lin {
    pub terms: Vec<(Buf, f64)>,
    pub model: f64,
}

impl Lin {
    pub fn buf(buf: Buf) -> Self {
        Lin {
            terms: vec![(buf, 1.0)],
            model: 0.0,
        }
    }
    /// The model output (eps, v or x0 depending on the prediction type), after guidance.
    pub fn model() -> Self {
        Lin {
            terms: vec![],
            model: 1.0,
        }
    }
    pub fn uses(&self, buf: Buf) -> bool {
        self.terms.iter().any(|&(b, c)| b == buf && c != 0.0)
    }
    fn add_term(mut self, buf: Buf, c: f64) -> Self {
        match self.terms.iter_mut().find(|(b, _)| *b == buf) {
            Some(term) => term.1 += c,
            None => self.terms.push((buf, c)),
        }
        self
    }
}

impl Add for Lin {
    type Output = Lin;
    fn add(self, rhs: Lin) -> Lin {
        let model = self.model + rhs.model;
        let mut out = Lin { model, ..self };
        for (b, c) in rhs.terms {
            out = out.add_term(b, c);
        }
        out
    }
}
impl Neg for Lin {
    type Output = Lin;
    fn neg(self) -> Lin {
        self * -1.0
    }
}
impl Sub for Lin {
    type Output = Lin;
    fn sub(self, rhs: Lin) -> Lin {
        self + (-rhs)
    }
}
impl Mul<f64> for Lin {
    type Output = Lin;
    fn mul(mut self, k: f64) -> Lin {
        self.terms.iter_mut().for_each(|t| t.1 *= k);
        self.model *= k;
        self
    }
}
impl Mul<Lin> for f64 {
    type Output = Lin;
    fn mul(self, lin: Lin) -> Lin {
        lin * self
    }
}
impl Div<f64> for Lin {
    type Output = Lin;
    fn div(self, k: f64) -> Lin {
        // Multiplying by 1/k would round differently from diffusers' division; divide each term.
        let mut out = self;
        out.terms.iter_mut().for_each(|t| t.1 /= k);
        out.model /= k;
        out
    }
}

/// Latent-sized buffers on the CPU, for [`execute_on_cpu`].
#[derive(Clone, Debug, Default)]
pub struct CpuBuffers {
    bufs: HashMap<Buf, Vec<f32>>,
}

impl CpuBuffers {
    /// Starts a loop from the (already `init_noise_sigma`-scaled or add_noise'd) latents.
    pub fn new(latents: Vec<f32>) -> Self {
        let mut bufs = HashMap::new();
        bufs.insert(Buf::Latents, latents);
        CpuBuffers { bufs }
    }
    pub fn get(&self, buf: Buf) -> Option<&[f32]> {
        self.bufs.get(&buf).map(|v| v.as_slice())
    }
    pub fn latents(&self) -> &[f32] {
        &self.bufs[&Buf::Latents]
    }
    pub fn set(&mut self, buf: Buf, data: Vec<f32>) {
        self.bufs.insert(buf, data);
    }
}

/// The specification of the GPU step: runs `plan` on f32 buffers, accumulating in f64.
/// `model_out` has the latents' length, or twice that with `guidance = Some(g)` (`[uncond; cond]`).
pub fn execute_on_cpu(
    plan: &StepPlan,
    model_out: &[f32],
    guidance: Option<f64>,
    bufs: &mut CpuBuffers,
) -> Result<()> {
    let n = bufs.latents().len();
    let expected = if guidance.is_some() { 2 * n } else { n };
    if model_out.len() != expected {
        return Err(Error::Shape {
            op: "sampler_step".into(),
            detail: format!(
                "model output has {} values, expected {expected}",
                model_out.len()
            ),
        });
    }
    let eps = |i: usize| -> f64 {
        match guidance {
            Some(g) => {
                let (u, c) = (model_out[i] as f64, model_out[n + i] as f64);
                u + g * (c - u)
            }
            None => model_out[i] as f64,
        }
    };
    for op in &plan.ops {
        let mut inputs: Vec<(usize, &[f32])> = Vec::new();
        for (slot, buf) in op.inputs.iter().enumerate() {
            if let Some(buf) = buf {
                let data = bufs.get(*buf).ok_or_else(|| Error::Shape {
                    op: "sampler_step".into(),
                    detail: format!("{buf:?} read before it was written"),
                })?;
                inputs.push((slot, data));
            }
        }
        let combine = |coeffs: &[f64; 5], model: f64, i: usize| -> f32 {
            let mut acc = model * eps(i);
            for &(slot, data) in &inputs {
                acc += coeffs[slot] * data[i] as f64;
            }
            acc as f32
        };
        let out_a: Vec<f32> = (0..n).map(|i| combine(&op.a, op.a_model, i)).collect();
        let out_b = op.b.as_ref().map(|b| {
            (
                b.out,
                (0..n)
                    .map(|i| combine(&b.b, b.b_model, i))
                    .collect::<Vec<f32>>(),
            )
        });
        bufs.set(op.out_a, out_a);
        if let Some((buf, data)) = out_b {
            bufs.set(buf, data);
        }
    }
    apply_swaps(&mut bufs.bufs, &plan.swaps);
    Ok(())
}

/// A plan's swaps, in order, on either side's buffers (handles move; a missing one stays missing).
fn apply_swaps<T>(bufs: &mut HashMap<Buf, T>, swaps: &[(Buf, Buf)]) {
    for &(x, y) in swaps {
        let bx = bufs.remove(&x);
        let by = bufs.remove(&y);
        if let Some(v) = bx {
            bufs.insert(y, v);
        }
        if let Some(v) = by {
            bufs.insert(x, v);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The sampler interface
// ------------------------------------------------------------------------------------------------

/// `noisy = original * original_coeff + noise * noise_coeff` (diffusers' `scheduler.add_noise`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseMix {
    pub original: f64,
    pub noise: f64,
}

/// A configured sampler for a fixed number of steps. Calls are numbered 0.. over
/// [`Sampler::timesteps`] (after any truncation) and [`Sampler::step`] must be called in order.
pub trait Sampler: Send {
    /// The `--sampler` name, e.g. `dpmpp_2m_karras`.
    fn name(&self) -> &str;
    /// The U-Net timestep of each model call (integer-valued except Euler-family Karras/linspace).
    fn timesteps(&self) -> &[f64];
    /// The sigma schedule of the k-diffusion-style samplers (diffusers' `scheduler.sigmas`, all
    /// steps, before truncation); empty for DDIM, PNDM and DDPM.
    fn sigmas(&self) -> &[f32] {
        &[]
    }
    /// Multiplier on `randn` latents before the first call (txt2img).
    fn init_noise_sigma(&self) -> f64;
    /// `scale_model_input` as a multiplier: the U-Net sees `latents * scale`.
    fn model_input_scale(&self, call: usize) -> f64;
    /// The update after model call `call`.
    fn step(&mut self, call: usize) -> StepPlan;
    /// `scheduler.add_noise` at `timesteps()[call]`, with the step index diffusers' img2img and
    /// inpainting pipelines use (`set_begin_index`); `call == timesteps().len()` is invalid.
    fn add_noise(&self, call: usize) -> NoiseMix;
    /// Sets DDIM's `eta` (the pipelines' `eta` argument); returns false, changing nothing, for
    /// samplers without one (diffusers then drops the argument).
    fn set_eta(&mut self, _eta: f64) -> bool {
        false
    }
    /// Model calls per denoising step (diffusers' `scheduler.order`): 2 for Heun, else 1.
    fn order(&self) -> usize {
        1
    }
    /// Drops the first `calls` model calls (img2img's `get_timesteps`). Call before any step.
    fn skip_calls(&mut self, calls: usize);
    /// The buffers besides [`Buf::Latents`] that the steps keep alive, allocated by the pipeline
    /// before the first call ([`GpuBuffers::reserve`]) so the loop's set of live latent-sized
    /// buffers is the same on every call: a history buffer first written mid-loop would shift
    /// the buffer pool's reuse (and so the bind-group cache's hits) a call or two later.
    fn state_buffers(&self) -> &'static [Buf] {
        &[]
    }

    /// diffusers' `get_timesteps(num_inference_steps, strength)`: keeps the last
    /// `int(steps * strength)` steps; returns the number of denoising steps left.
    fn truncate_for_strength(&mut self, num_inference_steps: usize, strength: f64) -> usize {
        let init_timestep =
            ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
        let t_start = num_inference_steps - init_timestep;
        // A second-order sampler has 2·steps − 1 calls, so t_start · order can pass the end
        // (Heun, 6 steps, strength 0.1: 12 of 11): diffusers' `timesteps[t_start * order:]` is
        // then empty, and so is ours; the caller reports "no denoising step". (On a fresh
        // sampler, as the pipeline calls it: `timesteps()` is then the whole schedule.)
        let calls = self.timesteps().len();
        self.skip_calls((t_start * self.order()).min(calls));
        num_inference_steps - t_start
    }

    /// SDXL img2img's `get_timesteps` with `denoising_start` (the refiner's start): keeps the
    /// timesteps below `round(T - denoising_start · T)` (T = `num_train_timesteps`), plus one
    /// for a second-order sampler where that count is even (so the cut falls between two steps,
    /// not inside one); returns the number of model calls kept. On a fresh sampler.
    fn truncate_for_denoising_start(&mut self, num_train_timesteps: usize, start: f64) -> usize {
        let cutoff = discrete_timestep_cutoff(num_train_timesteps, start);
        let all = self.timesteps().len();
        let mut keep = self.timesteps().iter().filter(|&&t| t < cutoff).count();
        if self.order() == 2 && keep % 2 == 0 {
            keep += 1;
        }
        let keep = keep.min(all);
        self.skip_calls(all - keep);
        keep
    }
}

/// diffusers' `discrete_timestep_cutoff` for `denoising_start` / `denoising_end`:
/// `int(round(T - value · T))`, Python's `round` rounding halves to even.
pub fn discrete_timestep_cutoff(num_train_timesteps: usize, value: f64) -> f64 {
    let t = num_train_timesteps as f64;
    (t - value * t).round_ties_even()
}

/// The SDXL pipelines' "apply denoising_end": of `timesteps` (the calls left to run), those at
/// or above the cutoff run — the first ones, as timesteps fall.
pub fn calls_before_denoising_end(
    timesteps: &[f64],
    num_train_timesteps: usize,
    end: f64,
) -> usize {
    let cutoff = discrete_timestep_cutoff(num_train_timesteps, end);
    timesteps.iter().filter(|&&t| t >= cutoff).count()
}

/// What the model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

// ------------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------------

/// A diffusers `scheduler_config.json`: the keys any of our samplers reads, typed. Keys that are
/// absent or `null` are `None` and take the default of the class being built, as
/// `X.from_config(pipe.scheduler.config)` does; other keys are ignored, as diffusers ignores keys
/// a class does not declare.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub set_alpha_to_one: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub clip_sample: Option<bool>,
    pub thresholding: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub predict_x0: Option<bool>,
    /// UniPC: step indices whose corrector is skipped.
    pub disable_corrector: Option<Vec<usize>>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: Option<String>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub solver_order: Option<usize>,
    pub lambda_min_clipped: Option<f64>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub variance_type: Option<String>,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
}

impl SchedulerConfig {
    /// Reads and validates a parsed `scheduler_config.json`; a value of the wrong type is an error
    /// naming its key.
    pub fn from_value(value: &Value) -> Result<Self> {
        if !value.is_object() {
            return Err(Error::InvalidInput(
                "scheduler config is not a JSON object".into(),
            ));
        }
        let config: SchedulerConfig = crate::models::config::parse("scheduler config", value)?;
        config.validate()?;
        Ok(config)
    }

    /// What every sampler sizes its tables from must be plausible before anything is allocated
    /// or indexed: 1..=100000 training timesteps (10^12 once aborted the process), betas in
    /// (0, 1), `trained_betas` one per training timestep, a `steps_offset` inside the schedule.
    pub fn validate(&self) -> Result<()> {
        const MAX_TRAIN_TIMESTEPS: usize = 100_000;
        let n = self.train_timesteps();
        if !(1..=MAX_TRAIN_TIMESTEPS).contains(&n) {
            return Err(Error::InvalidInput(format!(
                "scheduler config: num_train_timesteps {n} is outside 1..={MAX_TRAIN_TIMESTEPS}"
            )));
        }
        let offset = self.offset();
        if offset >= n {
            return Err(Error::InvalidInput(format!(
                "scheduler config: steps_offset {offset} is not below num_train_timesteps {n}"
            )));
        }
        for (key, b) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            let b = b.unwrap_or(0.001);
            if !(b.is_finite() && b > 0.0 && b < 1.0) {
                return Err(Error::InvalidInput(format!(
                    "scheduler config: `{key}` {b} is outside (0, 1)"
                )));
            }
        }
        if let Some(trained) = &self.trained_betas {
            if trained.len() != n {
                return Err(Error::InvalidInput(format!(
                    "scheduler config: trained_betas has {} values for {n} training timesteps",
                    trained.len()
                )));
            }
            if !trained.iter().all(|&b| b > 0.0 && b < 1.0) {
                return Err(Error::InvalidInput(
                    "scheduler config: trained_betas must be numbers in (0, 1)".into(),
                ));
            }
        }
        Ok(())
    }
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value = crate::models::config::parse_python_json(text)
            .map_err(|e| Error::InvalidInput(format!("scheduler config: {e}")))?;
        Self::from_value(&value)
    }
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_json_str(&text)
    }
    /// The SD 1.x config (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json).
    pub fn sd15() -> Self {
        Self::from_json_str(
            r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
                "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
                "trained_betas": null}"#,
        )
        .expect("valid built-in config")
    }
    pub fn class_name(&self) -> Option<&str> {
        self.class_name.as_deref()
    }
    /// What `StableDiffusionPipeline.__init__` enforces on old configs: `steps_offset = 1` and
    /// `clip_sample = false`.
    pub fn apply_sd_pipeline_fixes(&mut self) {
        self.steps_offset = Some(1);
        if self.clip_sample.is_some() {
            self.clip_sample = Some(false);
        }
    }

    /// `num_train_timesteps` (every class defaults to 1000).
    pub fn train_timesteps(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }
    /// `steps_offset` (every class defaults to 0).
    pub fn offset(&self) -> usize {
        self.steps_offset.unwrap_or(0)
    }
    /// The first of `flags` that is set to true, by name: for refusing options we do not run.
    pub(crate) fn first_set<'a>(flags: &[(&'a str, Option<bool>)]) -> Option<&'a str> {
        flags
            .iter()
            .find(|(_, v)| *v == Some(true))
            .map(|(key, _)| *key)
    }

    pub(crate) fn prediction(&self) -> Result<Prediction> {
        match self.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            "sample" => Ok(Prediction::Sample),
            other => Err(Error::Unsupported(format!("prediction_type `{other}`"))),
        }
    }
    pub(crate) fn spacing(&self, default: &str) -> Result<Spacing> {
        match self.timestep_spacing.as_deref().unwrap_or(default) {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            other => Err(Error::Unsupported(format!("timestep_spacing `{other}`"))),
        }
    }
    /// Sample clipping and dynamic thresholding are not linear in the model output; SD never
    /// uses them (the SD pipelines force clip_sample off).
    pub(crate) fn reject_nonlinear(&self, clip_default: bool) -> Result<()> {
        if self.clip_sample.unwrap_or(clip_default) || self.thresholding.unwrap_or(false) {
            return Err(Error::Unsupported(
                "clip_sample / thresholding in the scheduler config (not linear; SD configs set clip_sample=false)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// Builds the sampler `kind`, or the one the config's `_class_name` names when `None`, keeping
/// the config's beta schedule (as `X.from_config(pipe.scheduler.config)` does) plus the overrides
/// the kind implies (Karras sigmas, the SDE algorithm, PLMS).
pub fn build_sampler(
    config: &SchedulerConfig,
    kind: Option<SamplerKind>,
    num_inference_steps: usize,
) -> Result<Box<dyn Sampler>> {
    if num_inference_steps == 0 {
        return Err(Error::InvalidInput(
            "num_inference_steps must be at least 1".into(),
        ));
    }
    // diffusers' set_timesteps refuses this too: the schedule has no more distinct timesteps.
    let train = config.train_timesteps();
    if num_inference_steps > train {
        return Err(Error::InvalidInput(format!(
            "{num_inference_steps} steps exceed the {train} timesteps the model was trained with"
        )));
    }
    let kind = match kind {
        Some(kind) => kind,
        None => match config.class_name() {
            None => SamplerKind::Pndm,
            Some(name) => SchedulerClass::from_diffusers_name(name)
                .map(SchedulerClass::default_kind)
                .ok_or_else(|| {
                    Error::Unsupported(format!(
                        "scheduler `{name}` from the model's scheduler_config.json; choose one with \
                         --sampler (`ldm samplers` lists them)"
                    ))
                })?,
        },
    };
    let mut cfg = config.clone();
    match kind {
        // The name asks for PLMS, which is PNDM without the PRK warm-up (a PNDMScheduler config
        // given no sampler keeps its own setting).
        SamplerKind::Pndm if cfg.skip_prk_steps.is_none() => cfg.skip_prk_steps = Some(true),
        SamplerKind::EulerKarras
        | SamplerKind::DpmPP2MKarras
        | SamplerKind::LmsKarras
        | SamplerKind::UniPcKarras
        | SamplerKind::Kdpm2Karras
        | SamplerKind::Kdpm2AKarras => cfg.use_karras_sigmas = Some(true),
        SamplerKind::UniPcBh1 => cfg.solver_type = Some("bh1".into()),
        SamplerKind::DpmPP2MSde => cfg.algorithm_type = Some("sde-dpmsolver++".into()),
        SamplerKind::DpmPP2MSdeKarras => {
            cfg.algorithm_type = Some("sde-dpmsolver++".into());
            cfg.use_karras_sigmas = Some(true);
        }
        _ => {}
    }
    let label = kind.name().to_string();
    let steps = num_inference_steps;
    let s: Box<dyn Sampler> = match kind.class() {
        SchedulerClass::Ddim => Box::new(Ddim::new(&cfg, steps, label)?),
        SchedulerClass::Pndm => Box::new(Pndm::new(&cfg, steps, label)?),
        SchedulerClass::EulerDiscrete => Box::new(Euler::new(&cfg, steps, label)?),
        SchedulerClass::EulerAncestralDiscrete => {
            Box::new(EulerAncestral::new(&cfg, steps, label)?)
        }
        SchedulerClass::DpmSolverMultistep => {
            Box::new(DpmSolverMultistep::new(&cfg, steps, label)?)
        }
        SchedulerClass::LmsDiscrete => Box::new(Lms::new(&cfg, steps, label)?),
        SchedulerClass::HeunDiscrete => Box::new(Heun::new(&cfg, steps, label)?),
        SchedulerClass::Ddpm => Box::new(Ddpm::new(&cfg, steps, label)?),
        SchedulerClass::Lcm => Box::new(Lcm::new(&cfg, steps, label)?),
        SchedulerClass::Tcd => Box::new(Tcd::new(&cfg, steps, label)?),
        SchedulerClass::UniPcMultistep => Box::new(UniPc::new(&cfg, steps, label)?),
        SchedulerClass::DeisMultistep => Box::new(Deis::new(&cfg, steps, label)?),
        SchedulerClass::Kdpm2Discrete => Box::new(Kdpm2::new(&cfg, steps, label)?),
        SchedulerClass::Kdpm2AncestralDiscrete => {
            Box::new(Kdpm2Ancestral::new(&cfg, steps, label)?)
        }
    };
    Ok(s)
}

// ------------------------------------------------------------------------------------------------
// Shared schedule math (numbers as diffusers really produces them)
// ------------------------------------------------------------------------------------------------

/// `alphas_cumprod` as the torch float32 tensor diffusers builds in every `__init__`:
/// betas from `torch.linspace(..., dtype=float32)` (squared for scaled_linear), `1 - betas` in f32,
/// and `torch.cumprod`, whose CPU kernel accumulates in double and rounds each output to f32.
pub fn alphas_cumprod(cfg: &SchedulerConfig, default_schedule: &str) -> Result<Vec<f32>> {
    let n = cfg.train_timesteps();
    let beta_start = cfg.beta_start.unwrap_or(0.0001);
    let beta_end = cfg.beta_end.unwrap_or(0.02);
    let betas: Vec<f32> = if let Some(trained) = &cfg.trained_betas {
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match cfg.beta_schedule.as_deref().unwrap_or(default_schedule) {
            "linear" => torch_linspace_f32(beta_start, beta_end, n),
            "scaled_linear" => torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            "squaredcos_cap_v2" => betas_for_alpha_bar_cosine(n),
            other => return Err(Error::Unsupported(format!("beta_schedule `{other}`"))),
        }
    };
    let betas = if cfg.rescale_betas_zero_snr.unwrap_or(false) {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    };
    let mut acc = 1.0f64;
    Ok(betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect())
}

/// What a diffusers scheduler class does with `rescale_betas_zero_snr` (arXiv 2305.08891). A
/// zero-terminal-SNR model's config carries the key, and `--sampler X` builds class X from that
/// config, so each class must treat it as its diffusers namesake does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ZeroSnr {
    /// The class has no such argument and ignores the key (PNDM, LMS, Heun, DEIS, KDPM2 (a)).
    Ignored,
    /// The rescaled table as is, `alphas_cumprod[-1] = 0` (DDIM, DDPM, LCM, TCD: they only use
    /// `sqrt(alpha_prod)` and `sqrt(1 - alpha_prod)`, both finite there).
    Exact,
    /// Rescaled, then `alphas_cumprod[-1] = 2^-24`, so the first sigma is 4096 and not infinite
    /// (the sigma-based classes: Euler, Euler a, DPM-Solver++, UniPC).
    Clamped,
}

/// `alphas_cumprod` as a given diffusers class builds it (see [`ZeroSnr`]).
pub(crate) fn class_alphas_cumprod(
    cfg: &SchedulerConfig,
    default_schedule: &str,
    zero_snr: ZeroSnr,
) -> Result<Vec<f32>> {
    let rescale = cfg.rescale_betas_zero_snr.unwrap_or(false);
    if rescale && zero_snr == ZeroSnr::Ignored {
        let mut plain = cfg.clone();
        plain.rescale_betas_zero_snr = Some(false);
        return alphas_cumprod(&plain, default_schedule);
    }
    let mut acp = alphas_cumprod(cfg, default_schedule)?;
    if rescale && zero_snr == ZeroSnr::Clamped {
        if let Some(last) = acp.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(acp)
}

/// `torch.linspace(start, end, n, dtype=float32)`'s scalar formula (from both ends toward the
/// middle). torch's vectorised path can differ in the last bit of a few values, which moves
/// alphas_cumprod by < 1e-7 relative.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (cosine, max_beta 0.999), computed in double then f32.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1), in f32 like torch.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    let mut sqrt_acp: Vec<f32> = betas
        .iter()
        .map(|&b| {
            acc *= (1.0 - b) as f64;
            (acc as f32).sqrt()
        })
        .collect();
    let (first, last) = (sqrt_acp[0], *sqrt_acp.last().unwrap());
    let scale = first / (first - last);
    for v in sqrt_acp.iter_mut() {
        *v = (*v - last) * scale;
    }
    let acp: Vec<f32> = sqrt_acp.iter().map(|v| v * v).collect();
    let mut out = vec![1.0 - acp[0]];
    out.extend(acp.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// `((1 - acp) / acp) ** 0.5` over the training timesteps, as the f32 torch tensor.
pub(crate) fn train_sigmas(acp: &[f32]) -> Vec<f32> {
    acp.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// numpy's `linspace(start, stop, num)`: `i * step + start`, last value exactly `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// numpy's `arange(start, stop, step)` for floats: `start + i * step`, ceil((stop-start)/step) values.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..len).map(|i| start + i as f64 * step).collect()
}

/// The `timestep_spacing` block shared (with small variations) by every `set_timesteps`:
/// descending timesteps as the floats numpy computes before any integer cast.
/// `linspace_round`: DDIM/DDPM/PNDM round linspace to integers; the Euler family keeps f32.
pub(crate) fn spaced_timesteps(
    spacing: Spacing,
    num_train: usize,
    steps: usize,
    steps_offset: usize,
    linspace_round: bool,
) -> Result<Vec<f64>> {
    Ok(match spacing {
        Spacing::Linspace => {
            let mut t = np_linspace(0.0, (num_train - 1) as f64, steps);
            t.reverse();
            if linspace_round {
                t.iter().map(|v| v.round_ties_even()).collect()
            } else {
                t.iter().map(|&v| v as f32 as f64).collect()
            }
        }
        Spacing::Leading => {
            let ratio = num_train / steps;
            let last = (steps - 1) * ratio + steps_offset;
            if last >= num_train {
                // diffusers indexes past alphas_cumprod here (IndexError); we say why.
                return Err(Error::InvalidInput(format!(
                    "scheduler config: steps_offset {steps_offset} with {steps} steps gives \
                     timestep {last}, past the {num_train} training timesteps (use fewer steps \
                     or a smaller steps_offset)"
                )));
            }
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            np_arange(num_train as f64, 0.0, -ratio)
                .iter()
                .map(|v| v.round_ties_even() - 1.0)
                .collect()
        }
    })
}

/// `np.interp(x, arange(len(fp)), fp)` for `x` in [0, len-1].
pub(crate) fn interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last] as f64;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    let j = x.floor() as usize;
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// `_convert_to_karras` (rho = 7) from the two ends of the sigma range.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, steps)
        .iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// `_sigma_to_t`: fractional training timestep of `sigma` by interpolating log-sigmas, with
/// `log_sigmas` the float32 `np.log` of the training sigmas (so `low - high` is an f32 difference).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    if log_sigmas.len() < 2 {
        // One training timestep: nothing to interpolate (diffusers indexes past its table).
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // low_idx = last index whose log_sigma <= log(sigma), clipped to len - 2.
    let count = log_sigmas
        .iter()
        .filter(|&&ls| log_sigma - ls as f64 >= 0.0)
        .count();
    let low_idx = if count == 0 {
        0
    } else {
        (count - 1).min(log_sigmas.len() - 2)
    };
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

pub(crate) fn log_sigmas_f32(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// Largest value, as `sigmas.max()`.
pub(crate) fn max_f32(v: &[f32]) -> f64 {
    v.iter().cloned().fold(f32::MIN, f32::max) as f64
}

/// Converts a DDPM-family model output to (x0, eps) given alpha_prod_t, as DDIM's `step` does.
pub(crate) fn alpha_x0_eps(
    prediction: Prediction,
    x: &Lin,
    model: &Lin,
    alpha_prod_t: f64,
) -> (Lin, Lin) {
    let beta_prod_t = 1.0 - alpha_prod_t;
    match prediction {
        Prediction::Epsilon => (
            (x.clone() - beta_prod_t.sqrt() * model.clone()) / alpha_prod_t.sqrt(),
            model.clone(),
        ),
        Prediction::Sample => (
            model.clone(),
            (x.clone() - alpha_prod_t.sqrt() * model.clone()) / beta_prod_t.sqrt(),
        ),
        Prediction::VPrediction => (
            alpha_prod_t.sqrt() * x.clone() - beta_prod_t.sqrt() * model.clone(),
            alpha_prod_t.sqrt() * model.clone() + beta_prod_t.sqrt() * x.clone(),
        ),
    }
}

/// x0 for the Karras-sigma family (Euler, Euler a, LMS, Heun) at noise level `sigma`.
pub(crate) fn sigma_x0(prediction: Prediction, x: &Lin, model: &Lin, sigma: f64) -> Lin {
    match prediction {
        Prediction::Epsilon => x.clone() - sigma * model.clone(),
        Prediction::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            model.clone() * (-sigma / s2.sqrt()) + x.clone() / s2
        }
        Prediction::Sample => model.clone(),
    }
}
