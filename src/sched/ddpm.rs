//! `DDPMScheduler` (diffusers `scheduling_ddpm.py`, Ho et al. 2020), variance_type fixed_small.

use super::ddim::alpha_add_noise;
use super::{
    alpha_x0_eps, spaced_timesteps, Buf, Lin, NoiseMix, Prediction, Sampler, SchedulerConfig,
    StepPlan,
};
use crate::error::{Error, Result};

pub struct Ddpm {
    name: String,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    prediction: Prediction,
    begin: usize,
}

impl Ddpm {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        cfg.reject_nonlinear(true)?;
        let variance_type = cfg.variance_type.as_deref().unwrap_or("fixed_small");
        if variance_type != "fixed_small" {
            return Err(Error::Unsupported(format!(
                "DDPM variance_type `{variance_type}`"
            )));
        }
        let alphas_cumprod = super::class_alphas_cumprod(cfg, "linear", super::ZeroSnr::Exact)?;
        let num_train = cfg.train_timesteps();
        let timesteps = spaced_timesteps(
            cfg.spacing("leading")?,
            num_train,
            steps,
            cfg.offset(),
            true,
        )?;
        Ok(Ddpm {
            name,
            alphas_cumprod,
            timesteps,
            prediction: cfg.prediction()?,
            begin: 0,
        })
    }
}

impl Sampler for Ddpm {
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
        // previous_timestep: the next entry of the full schedule, -1 after the last.
        let index = self.begin + call;
        let t = self.timesteps[index];
        let alpha_prod_t = self.alphas_cumprod[t as usize] as f64;
        let alpha_prod_prev = match self.timesteps.get(index + 1) {
            Some(&prev_t) => self.alphas_cumprod[prev_t as usize] as f64,
            None => 1.0,
        };
        let (beta_prod_t, beta_prod_prev) = (1.0 - alpha_prod_t, 1.0 - alpha_prod_prev);
        let current_alpha_t = alpha_prod_t / alpha_prod_prev;
        let current_beta_t = 1.0 - current_alpha_t;
        let x = Lin::buf(Buf::Latents);
        let (x0, _) = alpha_x0_eps(self.prediction, &x, &Lin::model(), alpha_prod_t);
        let x0_coeff = alpha_prod_prev.sqrt() * current_beta_t / beta_prod_t;
        let sample_coeff = current_alpha_t.sqrt() * beta_prod_prev / beta_prod_t;
        let mut prev = x0 * x0_coeff + x * sample_coeff;
        if t > 0.0 {
            let variance = (beta_prod_prev / beta_prod_t * current_beta_t).max(1e-20);
            prev = prev + Lin::buf(Buf::Noise) * variance.sqrt();
        }
        StepPlan::update_latents(&prev)
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        alpha_add_noise(&self.alphas_cumprod, self.timesteps()[call])
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}
