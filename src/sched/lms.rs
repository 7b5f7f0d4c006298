//! `LMSDiscreteScheduler` (diffusers `scheduling_lms_discrete.py`; k-diffusion's `sample_lms`):
//! linear multistep of order 4 over the last derivatives (History(0..3), most recent first).

use super::euler::SigmaSchedule;
use super::ZeroSnr;
use super::{
    sigma_x0, Buf, Lin, LinearStep, NoiseMix, Prediction, Sampler, SchedulerConfig, StepPlan,
};
use crate::error::Result;

const ORDER: usize = 4;

pub struct Lms {
    name: String,
    schedule: SigmaSchedule,
    prediction: Prediction,
    begin: usize,
    /// `len(self.derivatives)`.
    derivatives: usize,
}

impl Lms {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        Ok(Lms {
            name,
            schedule: SigmaSchedule::new(cfg, steps, true, false, ZeroSnr::Ignored)?,
            prediction: cfg.prediction()?,
            begin: 0,
            derivatives: 0,
        })
    }

    /// `get_lms_coefficient`: the integral from sigma[t] to sigma[t+1] of the Lagrange basis
    /// polynomial of node `current` over nodes sigma[t], sigma[t-1], ... sigma[t-order+1].
    /// diffusers integrates with scipy's `quad` (21-point Gauss-Kronrod, exact for these
    /// polynomials of degree <= 3 up to rounding); 4-point Gauss-Legendre is exact to degree 7.
    fn lms_coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = |i: usize| self.schedule.sigmas[i] as f64;
        let basis = |tau: f64| -> f64 {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(t - k)) / (s(t - current) - s(t - k)))
                .product()
        };
        gauss_legendre_4(basis, s(t), s(t + 1))
    }
}

/// 4-point Gauss-Legendre quadrature on [a, b] (exact for polynomials of degree <= 7).
fn gauss_legendre_4(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const NODES: [(f64, f64); 4] = [
        (-0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
        (-0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
        (0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
        (0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
    ];
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    half * NODES
        .iter()
        .map(|&(x, w)| w * f(mid + half * x))
        .sum::<f64>()
}

impl Sampler for Lms {
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
        let sigma = self.schedule.sigmas[i] as f64;
        let x = Lin::buf(Buf::Latents);
        let x0 = sigma_x0(self.prediction, &x, &Lin::model(), sigma);
        let derivative = (x.clone() - x0) / sigma;
        self.derivatives = (self.derivatives + 1).min(ORDER);
        let order = (i + 1).min(ORDER);
        // zip(lms_coeffs, reversed(self.derivatives)): newest first, as many as both have.
        let mut prev = x;
        for k in 0..order.min(self.derivatives) {
            let d = if k == 0 {
                derivative.clone()
            } else {
                Lin::buf(Buf::History(k as u8 - 1))
            };
            prev = prev + d * self.lms_coefficient(order, i, k);
        }
        StepPlan {
            ops: vec![LinearStep::new(
                Buf::Next,
                &prev,
                Some((Buf::History(3), &derivative)),
            )],
            swaps: vec![
                (Buf::History(3), Buf::History(2)),
                (Buf::History(2), Buf::History(1)),
                (Buf::History(1), Buf::History(0)),
                (Buf::Latents, Buf::Next),
            ],
            needs_noise: false,
        }
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        self.schedule.add_noise(self.begin + call)
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}
