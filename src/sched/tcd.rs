//! `TCDScheduler` (diffusers `scheduling_tcd.py`, Zheng et al. 2024, Trajectory Consistency
//! Distillation): LCM's schedule with a strategic stochastic step whose stochasticity is `gamma`
//! (the pipeline's `eta`; 0, the pipelines' default, is deterministic; 0.3 is TCD's suggestion).

use super::lcm::consistency_timesteps;
use super::ZeroSnr;
use super::{
    alpha_x0_eps, ddim::AlphaTable, Buf, Lin, NoiseMix, Prediction, Sampler, SchedulerConfig,
    StepPlan,
};
use crate::error::Result;

pub struct Tcd {
    name: String,
    alphas: AlphaTable,
    timesteps: Vec<f64>,
    prediction: Prediction,
    gamma: f64,
    begin: usize,
}

impl Tcd {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        cfg.reject_nonlinear(false)?;
        Ok(Tcd {
            name,
            alphas: AlphaTable::new(cfg, "scaled_linear", true, ZeroSnr::Exact)?,
            timesteps: consistency_timesteps(cfg, steps, "TCD")?,
            prediction: cfg.prediction()?,
            gamma: 0.0,
            begin: 0,
        })
    }
}

impl Sampler for Tcd {
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
        let prev_t = if last { 0.0 } else { self.timesteps[index + 1] };
        // torch: floor((1 - eta) * prev_timestep) on a float32 tensor.
        let s = ((1.0 - self.gamma) as f32 * prev_t as f32).floor() as f64;
        let (alpha_t, alpha_prev, alpha_s) =
            (self.alphas.at(t), self.alphas.at(prev_t), self.alphas.at(s));
        let x = Lin::buf(Buf::Latents);
        let (x0, eps) = alpha_x0_eps(self.prediction, &x, &Lin::model(), alpha_t);
        let noised = x0 * alpha_s.sqrt() + eps * (1.0 - alpha_s).sqrt();
        let prev = if self.gamma > 0.0 && !last {
            let ratio = alpha_prev / alpha_s;
            noised * ratio.sqrt() + Lin::buf(Buf::Noise) * (1.0 - ratio).sqrt()
        } else {
            noised
        };
        StepPlan::update_latents(&prev)
    }
    fn set_eta(&mut self, eta: f64) -> bool {
        self.gamma = eta;
        true
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        self.alphas.add_noise(self.timesteps()[call])
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}
