//! `DDIMScheduler` (diffusers `scheduling_ddim.py`, Song et al. 2020), deterministic for eta = 0.

use super::ZeroSnr;
use super::{
    alpha_x0_eps, spaced_timesteps, Buf, Lin, NoiseMix, Prediction, Sampler, SchedulerConfig,
    StepPlan,
};
use crate::error::Result;

pub struct Ddim {
    name: String,
    alphas: AlphaTable,
    timesteps: Vec<f64>,
    /// `num_train_timesteps // num_inference_steps`: DDIM's previous timestep is t - step_ratio.
    step_ratio: i64,
    prediction: Prediction,
    /// The pipeline's `eta` (0 in every SD pipeline by default); > 0 adds noise each step.
    eta: f64,
    begin: usize,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        cfg.reject_nonlinear(true)?;
        let alphas = AlphaTable::new(cfg, "linear", true, ZeroSnr::Exact)?;
        let num_train = cfg.train_timesteps();
        let timesteps = spaced_timesteps(
            cfg.spacing("leading")?,
            num_train,
            steps,
            cfg.offset(),
            true,
        )?;
        Ok(Ddim {
            name,
            alphas,
            timesteps,
            step_ratio: (num_train / steps) as i64,
            prediction: cfg.prediction()?,
            eta: 0.0,
            begin: 0,
        })
    }
}

impl Sampler for Ddim {
    fn name(&self) -> &str {
        &self.name
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps[self.begin..]
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn model_input_scale(&self, _call: usize) -> f64 {
        1.0
    }
    fn step(&mut self, call: usize) -> StepPlan {
        let t = self.timesteps()[call] as i64;
        let prev_t = t - self.step_ratio;
        let (alpha_prod_t, alpha_prod_prev) =
            (self.alphas.at(t as f64), self.alphas.at(prev_t as f64));
        let x = Lin::buf(Buf::Latents);
        let (x0, eps) = alpha_x0_eps(self.prediction, &x, &Lin::model(), alpha_prod_t);
        // _get_variance
        let beta_prod_t = 1.0 - alpha_prod_t;
        let variance =
            (1.0 - alpha_prod_prev) / beta_prod_t * (1.0 - alpha_prod_t / alpha_prod_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let direction = eps * (1.0 - alpha_prod_prev - std_dev_t * std_dev_t).sqrt();
        let mut prev = x0 * alpha_prod_prev.sqrt() + direction;
        if self.eta > 0.0 {
            prev = prev + Lin::buf(Buf::Noise) * std_dev_t;
        }
        StepPlan::update_latents(&prev)
    }
    fn set_eta(&mut self, eta: f64) -> bool {
        self.eta = eta;
        true
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        self.alphas.add_noise(self.timesteps()[call])
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}

/// `alphas_cumprod` with its value "before timestep 0" (`final_alpha_cumprod`: 1 with
/// `set_alpha_to_one`, else `alphas_cumprod[0]`): the `alpha_prod_t` lookup of DDIM, PNDM, LCM
/// and TCD, where a previous timestep below 0 means the end of the schedule.
pub(crate) struct AlphaTable {
    pub(crate) alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
}

impl AlphaTable {
    /// From the config's beta schedule (`default_schedule` where it names none) and its
    /// `set_alpha_to_one` (the class's `set_alpha_to_one_default` where absent).
    pub(crate) fn new(
        cfg: &SchedulerConfig,
        default_schedule: &str,
        set_alpha_to_one_default: bool,
        zero_snr: ZeroSnr,
    ) -> Result<Self> {
        let alphas_cumprod = super::class_alphas_cumprod(cfg, default_schedule, zero_snr)?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(set_alpha_to_one_default) {
            1.0
        } else {
            alphas_cumprod[0] as f64
        };
        Ok(AlphaTable {
            alphas_cumprod,
            final_alpha_cumprod,
        })
    }

    /// `alpha_prod_t`: `alphas_cumprod[t]`, or the final value for t < 0.
    pub(crate) fn at(&self, t: f64) -> f64 {
        if t >= 0.0 {
            self.alphas_cumprod[t as usize] as f64
        } else {
            self.final_alpha_cumprod
        }
    }

    /// `scheduler.add_noise` at timestep `t`.
    pub(crate) fn add_noise(&self, t: f64) -> NoiseMix {
        alpha_add_noise(&self.alphas_cumprod, t)
    }
}

/// DDPM-family `add_noise`: `sqrt(acp[t]) * original + sqrt(1 - acp[t]) * noise`.
pub(crate) fn alpha_add_noise(alphas_cumprod: &[f32], t: f64) -> NoiseMix {
    let a = alphas_cumprod[t as usize] as f64;
    NoiseMix {
        original: a.sqrt(),
        noise: (1.0 - a).sqrt(),
    }
}
