//! `EulerAncestralDiscreteScheduler` (diffusers `scheduling_euler_ancestral_discrete.py`;
//! k-diffusion's `sample_euler_ancestral` with eta = 1): an Euler step down to sigma_down, then
//! fresh noise of scale sigma_up.

use super::euler::SigmaSchedule;
use super::ZeroSnr;
use super::{sigma_x0, Buf, Lin, NoiseMix, Prediction, Sampler, SchedulerConfig, StepPlan};
use crate::error::Result;

pub struct EulerAncestral {
    name: String,
    schedule: SigmaSchedule,
    prediction: Prediction,
    begin: usize,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        Ok(EulerAncestral {
            name,
            schedule: SigmaSchedule::new(cfg, steps, false, false, ZeroSnr::Clamped)?,
            prediction: cfg.prediction()?,
            begin: 0,
        })
    }
}

impl Sampler for EulerAncestral {
    fn name(&self) -> &str {
        &self.name
    }
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps[self.begin..]
    }
    fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma()
    }
    fn model_input_scale(&self, call: usize) -> f64 {
        self.schedule.input_scale(self.begin + call)
    }
    fn step(&mut self, call: usize) -> StepPlan {
        let i = self.begin + call;
        let (sigma_from, sigma_to) = (
            self.schedule.sigmas[i] as f64,
            self.schedule.sigmas[i + 1] as f64,
        );
        let sigma_up = (sigma_to.powi(2) * (sigma_from.powi(2) - sigma_to.powi(2))
            / sigma_from.powi(2))
        .sqrt();
        let sigma_down = (sigma_to.powi(2) - sigma_up.powi(2)).sqrt();
        let x = Lin::buf(Buf::Latents);
        let x0 = sigma_x0(self.prediction, &x, &Lin::model(), sigma_from);
        let derivative = (x.clone() - x0) / sigma_from;
        let prev = x + derivative * (sigma_down - sigma_from) + Lin::buf(Buf::Noise) * sigma_up;
        let mut plan = StepPlan::update_latents(&prev);
        // diffusers draws the noise on every step, the last one (sigma_up = 0) included.
        plan.needs_noise = true;
        plan
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        self.schedule.add_noise(self.begin + call)
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}
