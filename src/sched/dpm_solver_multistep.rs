//! `DPMSolverMultistepScheduler` (diffusers `scheduling_dpmsolver_multistep.py`; Lu et al. 2022,
//! DPM-Solver++), algorithm_type dpmsolver++ (A1111's "DPM++ 2M") or sde-dpmsolver++
//! ("DPM++ 2M SDE"), solver_order 1 or 2, midpoint or heun, optional Karras sigmas.
//! The x0 prediction of each step is kept in History(0) for the next.

use super::{
    interp_index, karras_sigmas, log_sigmas_f32, sigma_to_t, spaced_timesteps, train_sigmas, Buf,
    Lin, LinearStep, NoiseMix, Prediction, Sampler, SchedulerConfig, Spacing, StepPlan,
};
use crate::error::{Error, Result};

/// The `timestep_spacing` block of the multistep solvers' `set_timesteps` (DPMSolverMultistep,
/// UniPCMultistep and DEISMultistep share it): `steps + 1` points with the last dropped, so the
/// schedule stops short of timestep 0; the values numpy computes before the int64 cast.
pub(crate) fn multistep_timesteps(
    cfg: &SchedulerConfig,
    num_train: usize,
    steps: usize,
) -> Result<Vec<f64>> {
    let spacing = cfg.spacing("linspace")?;
    let offset = cfg.offset();
    Ok(match spacing {
        Spacing::Linspace => {
            let mut t = super::np_linspace(0.0, (num_train - 1) as f64, steps + 1);
            t.reverse();
            t.pop();
            t.iter().map(|v| v.round_ties_even()).collect()
        }
        Spacing::Leading => {
            let ratio = num_train / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| (i * ratio + offset) as f64)
                .collect()
        }
        Spacing::Trailing => spaced_timesteps(spacing, num_train, steps, offset, true)?,
    })
}

pub struct DpmSolverMultistep {
    name: String,
    timesteps: Vec<f64>,
    /// len(timesteps) + 1, f32 like diffusers.
    sigmas: Vec<f32>,
    prediction: Prediction,
    sde: bool,
    heun: bool,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    lower_order_nums: usize,
    begin: usize,
}

impl DpmSolverMultistep {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        let acp = super::class_alphas_cumprod(cfg, "linear", super::ZeroSnr::Clamped)?;
        let num_train = cfg.train_timesteps();
        let sde = match cfg.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            "dpmsolver++" => false,
            "sde-dpmsolver++" => true,
            other => {
                return Err(Error::Unsupported(format!(
                    "DPM-Solver algorithm_type `{other}`"
                )))
            }
        };
        let heun = match cfg.solver_type.as_deref().unwrap_or("midpoint") {
            "midpoint" => false,
            "heun" => true,
            other => {
                return Err(Error::Unsupported(format!(
                    "DPM-Solver solver_type `{other}`"
                )))
            }
        };
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=2).contains(&solver_order) {
            return Err(Error::Unsupported(format!(
                "DPM-Solver solver_order {solver_order}"
            )));
        }
        if cfg.thresholding.unwrap_or(false) {
            return Err(Error::Unsupported(
                "DPM-Solver thresholding (not linear)".into(),
            ));
        }
        if cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY) != f64::NEG_INFINITY {
            return Err(Error::Unsupported("DPM-Solver lambda_min_clipped".into()));
        }
        if let Some(key) = SchedulerConfig::first_set(&[
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
            ("use_lu_lambdas", cfg.use_lu_lambdas),
            ("use_flow_sigmas", cfg.use_flow_sigmas),
        ]) {
            return Err(Error::Unsupported(format!("DPM-Solver `{key}`")));
        }
        if cfg.variance_type.is_some() {
            return Err(Error::Unsupported(
                "DPM-Solver variance_type (learned variance)".into(),
            ));
        }
        // lambda_min_clipped = -inf: last_timestep = num_train_timesteps.
        let mut timesteps = multistep_timesteps(cfg, num_train, steps)?;
        let train = train_sigmas(&acp);
        let mut sigmas: Vec<f64> = if cfg.use_karras_sigmas.unwrap_or(false) {
            let log_sigmas = log_sigmas_f32(&train);
            let sigma_min = cfg.sigma_min.unwrap_or(train[0] as f64);
            let sigma_max = cfg.sigma_max.unwrap_or(*train.last().unwrap() as f64);
            let sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            let round = cfg.beta_schedule.as_deref().unwrap_or("linear") != "squaredcos_cap_v2";
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    if round {
                        t.round_ties_even()
                    } else {
                        t
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| interp_index(t, &train)).collect()
        };
        // Timesteps are int64 in diffusers.
        let timesteps: Vec<f64> = timesteps.iter().map(|t| t.trunc()).collect();
        let final_sigmas_type = cfg.final_sigmas_type.as_deref().unwrap_or("zero");
        sigmas.push(match final_sigmas_type {
            "zero" => 0.0,
            "sigma_min" => train[0] as f64,
            other => return Err(Error::Unsupported(format!("final_sigmas_type `{other}`"))),
        });
        Ok(DpmSolverMultistep {
            name,
            timesteps,
            sigmas: sigmas.iter().map(|&s| s as f32).collect(),
            prediction: cfg.prediction()?,
            sde,
            heun,
            solver_order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            final_sigma_zero: final_sigmas_type == "zero",
            lower_order_nums: 0,
            begin: 0,
        })
    }

    /// `_sigma_to_alpha_sigma_t`: (alpha_t, sigma_t) of the VP process at Karras sigma.
    fn alpha_sigma(&self, index: usize) -> (f64, f64) {
        let sigma = self.sigmas[index] as f64;
        let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha_t, sigma * alpha_t)
    }

    fn lambda(alpha_sigma: (f64, f64)) -> f64 {
        alpha_sigma.0.ln() - alpha_sigma.1.ln()
    }
}

impl Sampler for DpmSolverMultistep {
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
        1.0
    }
    fn model_input_scale(&self, _call: usize) -> f64 {
        1.0
    }
    fn step(&mut self, call: usize) -> StepPlan {
        let i = self.begin + call;
        let n = self.timesteps.len();
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        // (lower_order_second only matters for solver_order 3, which we do not run.)

        // convert_model_output (dpmsolver++): the data prediction x0.
        let x = Lin::buf(Buf::Latents);
        let model = Lin::model();
        let (alpha_s0, sigma_s0) = self.alpha_sigma(i);
        let x0 = match self.prediction {
            Prediction::Epsilon => (x.clone() - model * sigma_s0) / alpha_s0,
            Prediction::Sample => model,
            Prediction::VPrediction => x.clone() * alpha_s0 - model * sigma_s0,
        };
        let (alpha_t, sigma_t) = self.alpha_sigma(i + 1);
        let lambda_t = Self::lambda((alpha_t, sigma_t));
        let lambda_s0 = Self::lambda((alpha_s0, sigma_s0));
        let h = lambda_t - lambda_s0;
        let noise = Lin::buf(Buf::Noise);

        let first_order = self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev = if first_order {
            if self.sde {
                x * (sigma_t / sigma_s0 * (-h).exp())
                    + x0.clone() * (alpha_t * (1.0 - (-2.0 * h).exp()))
                    + noise * (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())
            } else {
                x * (sigma_t / sigma_s0) - x0.clone() * (alpha_t * ((-h).exp() - 1.0))
            }
        } else {
            let (alpha_s1, sigma_s1) = self.alpha_sigma(i - 1);
            let lambda_s1 = Self::lambda((alpha_s1, sigma_s1));
            let h_0 = lambda_s0 - lambda_s1;
            let r0 = h_0 / h;
            let m1 = Lin::buf(Buf::History(0));
            let d0 = x0.clone();
            let d1 = (x0.clone() - m1) * (1.0 / r0);
            match (self.sde, self.heun) {
                (false, false) => {
                    x * (sigma_t / sigma_s0)
                        - d0 * (alpha_t * ((-h).exp() - 1.0))
                        - d1 * (0.5 * (alpha_t * ((-h).exp() - 1.0)))
                }
                (false, true) => {
                    x * (sigma_t / sigma_s0) - d0 * (alpha_t * ((-h).exp() - 1.0))
                        + d1 * (alpha_t * (((-h).exp() - 1.0) / h + 1.0))
                }
                (true, false) => {
                    x * (sigma_t / sigma_s0 * (-h).exp())
                        + d0 * (alpha_t * (1.0 - (-2.0 * h).exp()))
                        + d1 * (0.5 * (alpha_t * (1.0 - (-2.0 * h).exp())))
                        + noise * (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())
                }
                (true, true) => {
                    x * (sigma_t / sigma_s0 * (-h).exp())
                        + d0 * (alpha_t * (1.0 - (-2.0 * h).exp()))
                        + d1 * (alpha_t * ((1.0 - (-2.0 * h).exp()) / (-2.0 * h) + 1.0))
                        + noise * (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())
                }
            }
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        // Latents <- prev, History(0) <- x0 (written to History(1), then swapped in).
        StepPlan {
            ops: vec![LinearStep::new(
                Buf::Next,
                &prev,
                Some((Buf::History(1), &x0)),
            )],
            swaps: vec![
                (Buf::Latents, Buf::Next),
                (Buf::History(0), Buf::History(1)),
            ],
            // diffusers draws SDE noise on every step, the last included.
            needs_noise: self.sde,
        }
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        let (alpha_t, sigma_t) = self.alpha_sigma(self.begin + call);
        NoiseMix {
            original: alpha_t,
            noise: sigma_t,
        }
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
    fn state_buffers(&self) -> &'static [Buf] {
        // Next and History(0) live from the first step on, History(1) (the swap scratch) from
        // the second.
        &[Buf::Next, Buf::History(0), Buf::History(1)]
    }
}
