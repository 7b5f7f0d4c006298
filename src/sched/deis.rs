//! `DEISMultistepScheduler` (diffusers `scheduling_deis_multistep.py`; Zhang & Chen 2022,
//! Diffusion Exponential Integrator Sampler), algorithm `deis` with the log-rho polynomial
//! extrapolation of the noise prediction, solver orders 1 to 3 (2 by default, as for SD).
//!
//! Buffers: History(0..order - 1) the previous converted outputs (noise predictions), most
//! recent first (diffusers' `model_outputs[-2]`, `[-3]`), History(order - 1) scratch.

use super::dpm_solver_multistep::multistep_timesteps;
use super::{
    interp_index, karras_sigmas, log_sigmas_f32, sigma_to_t, train_sigmas, Buf, Lin, LinearStep,
    NoiseMix, Prediction, Sampler, SchedulerConfig, StepPlan,
};
use crate::error::{Error, Result};

pub struct Deis {
    name: String,
    timesteps: Vec<f64>,
    /// len(timesteps) + 1, f32 like diffusers; the last is never 0.
    sigmas: Vec<f32>,
    prediction: Prediction,
    solver_order: usize,
    lower_order_final: bool,
    lower_order_nums: usize,
    begin: usize,
}

impl Deis {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        let acp = super::class_alphas_cumprod(cfg, "linear", super::ZeroSnr::Ignored)?;
        let num_train = cfg.train_timesteps();
        // diffusers registers the DPM-Solver and UniPC names as deis / logrho.
        match cfg.algorithm_type.as_deref().unwrap_or("deis") {
            "deis" | "dpmsolver" | "dpmsolver++" => {}
            other => return Err(Error::Unsupported(format!("DEIS algorithm_type `{other}`"))),
        }
        match cfg.solver_type.as_deref().unwrap_or("logrho") {
            "logrho" | "midpoint" | "heun" | "bh1" | "bh2" => {}
            other => return Err(Error::Unsupported(format!("DEIS solver_type `{other}`"))),
        }
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(Error::Unsupported(format!(
                "DEIS solver_order {solver_order} (diffusers has 1 to 3)"
            )));
        }
        cfg.reject_nonlinear(false)?;
        if let Some(key) = SchedulerConfig::first_set(&[
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
            ("use_flow_sigmas", cfg.use_flow_sigmas),
            ("use_dynamic_shifting", cfg.use_dynamic_shifting),
        ]) {
            return Err(Error::Unsupported(format!("DEIS `{key}`")));
        }

        // set_timesteps
        let mut timesteps = multistep_timesteps(cfg, num_train, steps)?;
        let train = train_sigmas(&acp);
        let sigmas = if cfg.use_karras_sigmas.unwrap_or(false) {
            // DEIS has no sigma_min / sigma_max setting: the training range.
            let log_sigmas = log_sigmas_f32(&train);
            let sigmas = karras_sigmas(train[0] as f64, *train.last().unwrap() as f64, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even())
                .collect();
            let last = *sigmas.last().unwrap();
            [sigmas, vec![last]].concat()
        } else {
            let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp_index(t, &train)).collect();
            sigmas.push(train[0] as f64);
            sigmas
        };
        Ok(Deis {
            name,
            // Timesteps are int64 in diffusers.
            timesteps: timesteps.iter().map(|t| t.trunc()).collect(),
            sigmas: sigmas.iter().map(|&s| s as f32).collect(),
            prediction: cfg.prediction()?,
            solver_order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            lower_order_nums: 0,
            begin: 0,
        })
    }

    /// `_sigma_to_alpha_sigma_t` at `sigmas[index]`.
    fn alpha_sigma(&self, index: usize) -> (f64, f64) {
        let sigma = self.sigmas[index] as f64;
        let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha_t, sigma * alpha_t)
    }

    /// rho = sigma_t / alpha_t at `sigmas[index]`.
    fn rho(&self, index: usize) -> f64 {
        let (alpha, sigma) = self.alpha_sigma(index);
        sigma / alpha
    }

    /// `convert_model_output`: the x0 prediction turned back into a noise prediction.
    fn convert_model_output(&self, index: usize) -> Lin {
        let (alpha_t, sigma_t) = self.alpha_sigma(index);
        let (x, model) = (Lin::buf(Buf::Latents), Lin::model());
        let x0 = match self.prediction {
            Prediction::Epsilon => (x.clone() - model * sigma_t) / alpha_t,
            Prediction::Sample => model,
            Prediction::VPrediction => x.clone() * alpha_t - model * sigma_t,
        };
        (x - x0 * alpha_t) / sigma_t
    }

    /// `deis_first_order_update` (DDIM).
    fn first_order(&self, i: usize, m0: Lin) -> Lin {
        let (alpha_t, sigma_t) = self.alpha_sigma(i + 1);
        let (alpha_s, sigma_s) = self.alpha_sigma(i);
        let h = (alpha_t.ln() - sigma_t.ln()) - (alpha_s.ln() - sigma_s.ln());
        Lin::buf(Buf::Latents) * (alpha_t / alpha_s) - m0 * (sigma_t * (h.exp() - 1.0))
    }

    /// `multistep_deis_second_order_update`.
    fn second_order(&self, i: usize, m0: Lin) -> Lin {
        let (rho_t, rho_s0, rho_s1) = (self.rho(i + 1), self.rho(i), self.rho(i - 1));
        // Integrate[(log(t) - log(c)) / (log(b) - log(c)), {t}]
        let ind_fn = |t: f64, b: f64, c: f64| t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln());
        let coef1 = ind_fn(rho_t, rho_s0, rho_s1) - ind_fn(rho_s0, rho_s0, rho_s1);
        let coef2 = ind_fn(rho_t, rho_s1, rho_s0) - ind_fn(rho_s0, rho_s1, rho_s0);
        let (alpha_t, _) = self.alpha_sigma(i + 1);
        let (alpha_s0, _) = self.alpha_sigma(i);
        let m1 = Lin::buf(Buf::History(0));
        (Lin::buf(Buf::Latents) / alpha_s0 + m0 * coef1 + m1 * coef2) * alpha_t
    }

    /// `multistep_deis_third_order_update`.
    fn third_order(&self, i: usize, m0: Lin) -> Lin {
        let (rho_t, rho_s0, rho_s1, rho_s2) = (
            self.rho(i + 1),
            self.rho(i),
            self.rho(i - 1),
            self.rho(i - 2),
        );
        // Integrate[(log(t) - log(c))(log(t) - log(d)) / (log(b) - log(c))(log(b) - log(d)), {t}]
        let ind_fn = |t: f64, b: f64, c: f64, d: f64| {
            let (lt, lb, lc, ld) = (t.ln(), b.ln(), c.ln(), d.ln());
            let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt.powi(2) - 2.0 * lt + 2.0);
            numerator / ((lb - lc) * (lb - ld))
        };
        let coef1 = ind_fn(rho_t, rho_s0, rho_s1, rho_s2) - ind_fn(rho_s0, rho_s0, rho_s1, rho_s2);
        let coef2 = ind_fn(rho_t, rho_s1, rho_s2, rho_s0) - ind_fn(rho_s0, rho_s1, rho_s2, rho_s0);
        let coef3 = ind_fn(rho_t, rho_s2, rho_s0, rho_s1) - ind_fn(rho_s0, rho_s2, rho_s0, rho_s1);
        let (alpha_t, _) = self.alpha_sigma(i + 1);
        let (alpha_s0, _) = self.alpha_sigma(i);
        let (m1, m2) = (Lin::buf(Buf::History(0)), Lin::buf(Buf::History(1)));
        (Lin::buf(Buf::Latents) / alpha_s0 + m0 * coef1 + m1 * coef2 + m2 * coef3) * alpha_t
    }
}

impl Sampler for Deis {
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
    /// `step`.
    fn step(&mut self, call: usize) -> StepPlan {
        let i = self.begin + call;
        let n = self.timesteps.len();
        let lower = self.lower_order_final && n < 15;
        let lower_order_final = i == n - 1 && lower;
        let lower_order_second = i + 2 == n && lower;
        let m0 = self.convert_model_output(i);
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, m0.clone())
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, m0.clone())
        } else {
            self.third_order(i, m0.clone())
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        // Latents <- prev; the new output goes to the scratch slot and shifts in as History(0).
        let scratch = Buf::History(self.solver_order as u8 - 1);
        let mut swaps = vec![(Buf::Latents, Buf::Next)];
        for k in (1..self.solver_order as u8).rev() {
            swaps.push((Buf::History(k), Buf::History(k - 1)));
        }
        StepPlan {
            ops: vec![LinearStep::new(Buf::Next, &prev, Some((scratch, &m0)))],
            swaps,
            needs_noise: false,
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
}
