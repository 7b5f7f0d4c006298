//! `LCMScheduler` (diffusers `scheduling_lcm.py`, Luo et al. 2023): latent consistency models and
//! LCM-LoRA, 2-8 steps. Each step predicts the clean sample with the consistency boundary
//! scalings and re-noises it to the next timestep with fresh noise (none after the last step).

use super::ZeroSnr;
use super::{
    alpha_x0_eps, ddim::AlphaTable, Buf, Lin, NoiseMix, Prediction, Sampler, SchedulerConfig,
    StepPlan,
};
use crate::error::{Error, Result};

pub struct Lcm {
    name: String,
    alphas: AlphaTable,
    timesteps: Vec<f64>,
    prediction: Prediction,
    timestep_scaling: f64,
    begin: usize,
}

/// The `original_inference_steps`-point schedule both LCM and TCD take their timesteps from:
/// `k·i - 1` for i = 1..=original, reversed, then `steps` of them at evenly spaced indices
/// (`np.floor(np.linspace(0, len, steps, endpoint=False))`).
pub(crate) fn consistency_timesteps(
    cfg: &SchedulerConfig,
    steps: usize,
    what: &str,
) -> Result<Vec<f64>> {
    let train = cfg.train_timesteps();
    let original = cfg.original_inference_steps.unwrap_or(50);
    if original == 0 || original > train {
        return Err(Error::InvalidInput(format!(
            "{what}: original_inference_steps {original} must be 1..={train} (num_train_timesteps)"
        )));
    }
    if steps > original {
        return Err(Error::InvalidInput(format!(
            "{what} takes at most original_inference_steps = {original} steps (asked for {steps})"
        )));
    }
    let k = train / original;
    let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
    Ok((0..steps)
        .map(|i| {
            let index = (i as f64 * origin.len() as f64 / steps as f64).floor() as usize;
            origin[index] as f64
        })
        .collect())
}

impl Lcm {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        cfg.reject_nonlinear(false)?;
        Ok(Lcm {
            name,
            alphas: AlphaTable::new(cfg, "scaled_linear", true, ZeroSnr::Exact)?,
            timesteps: consistency_timesteps(cfg, steps, "LCM")?,
            prediction: cfg.prediction()?,
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0),
            begin: 0,
        })
    }

    /// `get_scalings_for_boundary_condition_discrete`: (c_skip, c_out), sigma_data = 0.5.
    fn boundary_scalings(&self, t: f64) -> (f64, f64) {
        let sigma_data2 = 0.25;
        let scaled = t * self.timestep_scaling;
        let c_skip = sigma_data2 / (scaled * scaled + sigma_data2);
        let c_out = scaled / (scaled * scaled + sigma_data2).sqrt();
        (c_skip, c_out)
    }
}

impl Sampler for Lcm {
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
        let index = self.begin + call;
        let t = self.timesteps[index];
        let last = index + 1 == self.timesteps.len();
        let prev_t = if last { t } else { self.timesteps[index + 1] };
        let (alpha_t, alpha_prev) = (self.alphas.at(t), self.alphas.at(prev_t));
        let (c_skip, c_out) = self.boundary_scalings(t);
        let x = Lin::buf(Buf::Latents);
        let (x0, _) = alpha_x0_eps(self.prediction, &x, &Lin::model(), alpha_t);
        let denoised = x0 * c_out + x * c_skip;
        let prev = if last {
            denoised
        } else {
            denoised * alpha_prev.sqrt() + Lin::buf(Buf::Noise) * (1.0 - alpha_prev).sqrt()
        };
        StepPlan::update_latents(&prev)
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        self.alphas.add_noise(self.timesteps()[call])
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}
