//! `HeunDiscreteScheduler` (diffusers `scheduling_heun_discrete.py`; k-diffusion's `sample_heun`,
//! Karras et al. 2022 Algorithm 1 with s_churn = 0): each step is an Euler predictor and a
//! trapezoidal corrector, 2 model calls, except the last step (to sigma = 0), which is plain Euler.
//! Call pattern over the interleaved schedule [s0, s1, s1, s2, s2, ..., 0]: even step indices are
//! first-order (predictor) calls, odd ones correctors.

use super::euler::SigmaSchedule;
use super::ZeroSnr;
use super::{
    max_f32, sigma_x0, Buf, Lin, LinearStep, NoiseMix, Prediction, Sampler, SchedulerConfig,
    StepPlan,
};
use crate::error::Result;

pub struct Heun {
    name: String,
    /// [t0, t1, t1, ..., t_{n-1}, t_{n-1}]: 2n - 1 calls.
    timesteps: Vec<f64>,
    /// [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0].
    sigmas: Vec<f32>,
    leading: bool,
    prediction: Prediction,
    begin: usize,
    /// `self.dt` of the predictor whose corrector comes next (None: first-order state).
    dt: Option<f64>,
}

impl Heun {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        cfg.reject_nonlinear(false)?;
        let schedule = SigmaSchedule::new(cfg, steps, true, false, ZeroSnr::Ignored)?;
        let n = schedule.timesteps.len();
        let mut sigmas = vec![schedule.sigmas[0]];
        for &s in &schedule.sigmas[1..n] {
            sigmas.extend([s, s]);
        }
        sigmas.push(schedule.sigmas[n]);
        let mut timesteps = vec![schedule.timesteps[0]];
        for &t in &schedule.timesteps[1..] {
            timesteps.extend([t, t]);
        }
        Ok(Heun {
            name,
            timesteps,
            sigmas,
            leading: schedule.spacing == super::Spacing::Leading,
            prediction: cfg.prediction()?,
            begin: 0,
            dt: None,
        })
    }
}

impl Sampler for Heun {
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
        let max = max_f32(&self.sigmas);
        if self.leading {
            (max * max + 1.0).sqrt()
        } else {
            max
        }
    }
    fn model_input_scale(&self, call: usize) -> f64 {
        let s = self.sigmas[self.begin + call] as f64;
        1.0 / (s * s + 1.0).sqrt()
    }
    fn order(&self) -> usize {
        2
    }
    fn step(&mut self, call: usize) -> StepPlan {
        let i = self.begin + call;
        let x = Lin::buf(Buf::Latents);
        match self.dt.take() {
            None => {
                // Predictor: Euler from sigma to sigma_next; remember derivative, dt and sample.
                let (sigma, sigma_next) = (self.sigmas[i] as f64, self.sigmas[i + 1] as f64);
                let x0 = sigma_x0(self.prediction, &x, &Lin::model(), sigma);
                let derivative = (x.clone() - x0) / sigma;
                let dt = sigma_next - sigma;
                self.dt = Some(dt);
                let prev = x + derivative.clone() * dt;
                StepPlan {
                    ops: vec![LinearStep::new(
                        Buf::Next,
                        &prev,
                        Some((Buf::History(0), &derivative)),
                    )],
                    swaps: vec![(Buf::Saved, Buf::Latents), (Buf::Latents, Buf::Next)],
                    needs_noise: false,
                }
            }
            Some(dt) => {
                // Corrector: average the derivatives at both ends, step from the saved sample.
                let sigma_next = self.sigmas[i] as f64;
                let x0 = sigma_x0(self.prediction, &x, &Lin::model(), sigma_next);
                let derivative = (x - x0) / sigma_next;
                let derivative = (Lin::buf(Buf::History(0)) + derivative) / 2.0;
                StepPlan::update_latents(&(Lin::buf(Buf::Saved) + derivative * dt))
            }
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
