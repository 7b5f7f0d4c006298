//! `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler` (diffusers
//! `scheduling_k_dpm_2_discrete.py`, `scheduling_k_dpm_2_ancestral_discrete.py`; k-diffusion's
//! `sample_dpm_2` and `sample_dpm_2_ancestral`, A1111's "DPM2" and "DPM2 a"): DPM-Solver-2, an
//! Euler half-step to the log-midpoint sigma, a model call there, and the full step from the
//! saved sample with that midpoint derivative. 2 model calls per step except the last, whose
//! midpoint is sigma 0 (so it ends on the x0 prediction). The ancestral one steps down to
//! sigma_down and adds fresh noise of scale sigma_up after each midpoint call.
//!
//! Calls alternate over the interleaved tables [s0, s1, s1, s2, s2, ..., 0, 0, 0]: even step
//! indices are first-order calls (Saved <- the sample), odd ones the second-order completions.

use super::{
    interp_index, karras_sigmas, log_sigmas_f32, max_f32, sigma_to_t, sigma_x0, spaced_timesteps,
    train_sigmas, Buf, Lin, LinearStep, NoiseMix, Prediction, Sampler, SchedulerConfig, Spacing,
    StepPlan,
};
use crate::error::{Error, Result};

/// The part of `set_timesteps` both classes share, before interleaving: `steps` timesteps,
/// `steps + 1` sigmas (f32, the last 0), and the log training sigmas for `_sigma_to_t`.
struct BaseSchedule {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    log_sigmas: Vec<f32>,
    spacing: Spacing,
    prediction: Prediction,
}

impl BaseSchedule {
    fn new(cfg: &SchedulerConfig, steps: usize, what: &str) -> Result<Self> {
        // Neither class takes rescale_betas_zero_snr: a config's is ignored.
        let acp = super::class_alphas_cumprod(cfg, "linear", super::ZeroSnr::Ignored)?;
        let num_train = cfg.train_timesteps();
        if let Some(key) = SchedulerConfig::first_set(&[
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
        ]) {
            return Err(Error::Unsupported(format!("{what} `{key}`")));
        }
        let prediction = match cfg.prediction()? {
            Prediction::Sample => {
                return Err(Error::Unsupported(format!(
                    "{what} prediction_type `sample` (not implemented in diffusers)"
                )))
            }
            p => p,
        };
        let spacing = cfg.spacing("linspace")?;
        let offset = cfg.offset();
        let mut timesteps = spaced_timesteps(spacing, num_train, steps, offset, false)?;
        let train = train_sigmas(&acp);
        let log_sigmas = log_sigmas_f32(&train);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp_index(t, &train)).collect();
        if cfg.use_karras_sigmas.unwrap_or(false) {
            // `_convert_to_karras` over the spaced sigmas (these classes have no sigma_min /
            // sigma_max setting), timesteps rounded.
            sigmas = karras_sigmas(*sigmas.last().unwrap(), sigmas[0], steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even())
                .collect();
        }
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        Ok(BaseSchedule {
            // float32 (linspace) or float64 (Karras) in diffusers; both hold these exactly.
            timesteps: timesteps.iter().map(|&t| t as f32 as f64).collect(),
            sigmas,
            log_sigmas,
            spacing,
            prediction,
        })
    }

    /// `sigmas.log().lerp(other.log(), 0.5).exp()`, the log-midpoint of each pair, in float32
    /// as torch computes it (its lerp takes the `end - (end - start) * (1 - weight)` form at
    /// weight 0.5, so a -inf start gives -inf, not NaN).
    fn log_midpoints(&self, other: impl Fn(usize) -> f32) -> Vec<f32> {
        (0..self.sigmas.len())
            .map(|k| {
                let (start, end) = (self.sigmas[k].ln(), other(k).ln());
                (end - (end - start) * 0.5).exp()
            })
            .collect()
    }

    /// `torch.cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])`.
    fn interleave<T: Copy>(v: &[T]) -> Vec<T> {
        let mut out = vec![v[0]];
        for &x in &v[1..] {
            out.extend([x, x]);
        }
        out.push(v[v.len() - 1]);
        out
    }

    /// `_sigma_to_t` of each midpoint sigma, a float32 torch scalar there, so every operation
    /// is float32 (near a training timestep, w is a difference of nearly equal f32 logarithms,
    /// and its rounding moves t by up to ~3e-5).
    fn midpoint_timesteps(&self, sigmas_interpol: &[f32]) -> Vec<f64> {
        let log_sigmas = &self.log_sigmas;
        sigmas_interpol
            .iter()
            .map(|&sigma| {
                if log_sigmas.len() < 2 {
                    return 0.0; // as `sigma_to_t`: one training timestep
                }
                let log_sigma = sigma.max(1e-10).ln();
                let count = log_sigmas
                    .iter()
                    .filter(|&&ls| log_sigma - ls >= 0.0)
                    .count();
                let low_idx = count.saturating_sub(1).min(log_sigmas.len() - 2);
                let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
                let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
                ((1.0 - w) * low_idx as f32 + w * (low_idx + 1) as f32) as f64
            })
            .collect()
    }

    /// `init_noise_sigma` over the (interleaved) sigmas.
    fn init_noise_sigma(sigmas: &[f32], spacing: Spacing) -> f64 {
        let max = max_f32(sigmas);
        match spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        }
    }
}

/// `KDPM2DiscreteScheduler`.
pub struct Kdpm2 {
    name: String,
    /// [t0, ti1, t1, ti2, t2, ..., ti_{n-1}, t_{n-1}]: 2n - 1 calls.
    timesteps: Vec<f64>,
    /// Interleaved [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0, 0, 0].
    sigmas: Vec<f32>,
    /// Interleaved midpoints: si_k = sqrt(s_k s_{k-1}), si_n = 0 (f32 like diffusers).
    sigmas_interpol: Vec<f32>,
    spacing: Spacing,
    prediction: Prediction,
    begin: usize,
}

impl Kdpm2 {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        let base = BaseSchedule::new(cfg, steps, "KDPM2")?;
        let n = base.timesteps.len();
        // sigmas.roll(1): the previous sigma, the last (0) before the first.
        let sigmas_interpol = base.log_midpoints(|k| base.sigmas[(k + n) % (n + 1)]);
        let ti = base.midpoint_timesteps(&sigmas_interpol);
        // [t0] + stack(timesteps_interpol[1:-1], timesteps[1:]).flatten()
        let mut timesteps = vec![base.timesteps[0]];
        for (&midpoint, &t) in ti[1..n].iter().zip(&base.timesteps[1..]) {
            timesteps.extend([midpoint, t]);
        }
        Ok(Kdpm2 {
            name,
            timesteps,
            sigmas: BaseSchedule::interleave(&base.sigmas),
            sigmas_interpol: BaseSchedule::interleave(&sigmas_interpol),
            spacing: base.spacing,
            prediction: base.prediction,
            begin: 0,
        })
    }
}

impl Sampler for Kdpm2 {
    fn name(&self) -> &str {
        &self.name
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps[self.begin..]
    }
    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
    fn init_noise_sigma(&self) -> f64 {
        BaseSchedule::init_noise_sigma(&self.sigmas, self.spacing)
    }
    /// `scale_model_input`: the sigma, or the midpoint sigma on a second-order call.
    fn model_input_scale(&self, call: usize) -> f64 {
        let k = self.begin + call;
        let sigma = if k.is_multiple_of(2) {
            self.sigmas[k]
        } else {
            self.sigmas_interpol[k]
        } as f64;
        1.0 / (sigma * sigma + 1.0).sqrt()
    }
    fn order(&self) -> usize {
        2
    }
    /// `step`.
    fn step(&mut self, call: usize) -> StepPlan {
        let k = self.begin + call;
        let x = Lin::buf(Buf::Latents);
        if k.is_multiple_of(2) {
            // First order: Euler to the midpoint; remember the sample.
            let (sigma, sigma_interpol) =
                (self.sigmas[k] as f64, self.sigmas_interpol[k + 1] as f64);
            let x0 = sigma_x0(self.prediction, &x, &Lin::model(), sigma);
            let derivative = (x.clone() - x0) / sigma;
            let prev = x + derivative * (sigma_interpol - sigma);
            StepPlan {
                ops: vec![LinearStep::new(Buf::Next, &prev, None)],
                swaps: vec![(Buf::Saved, Buf::Latents), (Buf::Latents, Buf::Next)],
                needs_noise: false,
            }
        } else {
            // DPM-Solver-2: the midpoint derivative over the whole step, from the saved sample.
            let (sigma, sigma_interpol, sigma_next) = (
                self.sigmas[k - 1] as f64,
                self.sigmas_interpol[k] as f64,
                self.sigmas[k] as f64,
            );
            let x0 = sigma_x0(self.prediction, &x, &Lin::model(), sigma_interpol);
            let derivative = (x - x0) / sigma_interpol;
            StepPlan::update_latents(&(Lin::buf(Buf::Saved) + derivative * (sigma_next - sigma)))
        }
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        NoiseMix {
            original: 1.0,
            noise: self.sigmas[self.begin + call] as f64,
        }
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}

/// `KDPM2AncestralDiscreteScheduler`.
pub struct Kdpm2Ancestral {
    name: String,
    /// [t0, ti0, t1, ti1, ..., ti_{n-2}, t_{n-1}]: 2n - 1 calls.
    timesteps: Vec<f64>,
    /// Interleaved [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0, 0, 0].
    sigmas: Vec<f32>,
    /// Interleaved midpoints: si_k = sqrt(s_k down_k), the last two 0; with sigma_up and
    /// sigma_down, f32 tables as diffusers computes them.
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    spacing: Spacing,
    prediction: Prediction,
    begin: usize,
}

impl Kdpm2Ancestral {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        let base = BaseSchedule::new(cfg, steps, "KDPM2 ancestral")?;
        let n = base.timesteps.len();
        let s = |k: usize| base.sigmas[k];
        // sigmas_next = sigmas.roll(-1) with its last 0; up and down as in Euler a, in f32 (the
        // subtractions cancel: the midpoint timesteps depend on their rounding).
        let next = |k: usize| if k < n { s(k + 1) } else { 0.0 };
        let sq = |v: f32| v * v; // torch's `** 2`
        let sigmas_up: Vec<f32> = (0..=n)
            .map(|k| (sq(next(k)) * (sq(s(k)) - sq(next(k))) / sq(s(k))).sqrt())
            .collect();
        let sigmas_down: Vec<f32> = (0..=n)
            .map(|k| {
                if k == n {
                    0.0
                } else {
                    (sq(next(k)) - sq(sigmas_up[k])).sqrt()
                }
            })
            .collect();
        let mut sigmas_interpol = base.log_midpoints(|k| sigmas_down[k]);
        sigmas_interpol[n - 1] = 0.0; // sigmas_interpol[-2:] = 0
        sigmas_interpol[n] = 0.0;
        let ti = base.midpoint_timesteps(&sigmas_interpol);
        // [t0] + stack(timesteps_interpol[:-2], timesteps[1:]).flatten()
        let mut timesteps = vec![base.timesteps[0]];
        for (&midpoint, &t) in ti[..n - 1].iter().zip(&base.timesteps[1..]) {
            timesteps.extend([midpoint, t]);
        }
        Ok(Kdpm2Ancestral {
            name,
            timesteps,
            sigmas: BaseSchedule::interleave(&base.sigmas),
            sigmas_interpol: BaseSchedule::interleave(&sigmas_interpol),
            sigmas_up: BaseSchedule::interleave(&sigmas_up),
            sigmas_down: BaseSchedule::interleave(&sigmas_down),
            spacing: base.spacing,
            prediction: base.prediction,
            begin: 0,
        })
    }
}

impl Sampler for Kdpm2Ancestral {
    fn name(&self) -> &str {
        &self.name
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps[self.begin..]
    }
    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
    fn init_noise_sigma(&self) -> f64 {
        BaseSchedule::init_noise_sigma(&self.sigmas, self.spacing)
    }
    /// `scale_model_input`: the sigma, or the previous midpoint sigma on a second-order call.
    fn model_input_scale(&self, call: usize) -> f64 {
        let k = self.begin + call;
        let sigma = if k.is_multiple_of(2) {
            self.sigmas[k]
        } else {
            self.sigmas_interpol[k - 1]
        } as f64;
        1.0 / (sigma * sigma + 1.0).sqrt()
    }
    fn order(&self) -> usize {
        2
    }
    /// `step`.
    fn step(&mut self, call: usize) -> StepPlan {
        let k = self.begin + call;
        let x = Lin::buf(Buf::Latents);
        if k.is_multiple_of(2) {
            // First order: Euler to the midpoint; remember the sample.
            let (sigma, sigma_interpol) = (self.sigmas[k] as f64, self.sigmas_interpol[k] as f64);
            let x0 = sigma_x0(self.prediction, &x, &Lin::model(), sigma);
            let derivative = (x.clone() - x0) / sigma;
            let prev = x + derivative * (sigma_interpol - sigma);
            StepPlan {
                ops: vec![LinearStep::new(Buf::Next, &prev, None)],
                swaps: vec![(Buf::Saved, Buf::Latents), (Buf::Latents, Buf::Next)],
                needs_noise: false,
            }
        } else {
            // DPM-Solver-2 down to sigma_down from the saved sample, then noise of sigma_up.
            let (sigma, sigma_interpol, sigma_up, sigma_down) = (
                self.sigmas[k - 1] as f64,
                self.sigmas_interpol[k - 1] as f64,
                self.sigmas_up[k - 1] as f64,
                self.sigmas_down[k - 1] as f64,
            );
            let x0 = sigma_x0(self.prediction, &x, &Lin::model(), sigma_interpol);
            let derivative = (x - x0) / sigma_interpol;
            let prev = Lin::buf(Buf::Saved)
                + derivative * (sigma_down - sigma)
                + Lin::buf(Buf::Noise) * sigma_up;
            let mut plan = StepPlan::update_latents(&prev);
            // diffusers draws the noise on every second-order call.
            plan.needs_noise = true;
            plan
        }
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        NoiseMix {
            original: 1.0,
            noise: self.sigmas[self.begin + call] as f64,
        }
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}
