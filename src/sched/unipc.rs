//! `UniPCMultistepScheduler` (diffusers `scheduling_unipc_multistep.py`; Zhao et al. 2023,
//! UniPC): a multistep predictor (UniP) plus, from the second call on, a corrector (UniC) that
//! refines the previous step's result with the model output just computed there, so order p
//! costs one model call per step. B(h) = e^h - 1 (bh2, the default) or h (bh1); data prediction
//! (`predict_x0`), solver orders 1 to 3 (order 3 needs all 5 kernel inputs).
//!
//! Buffers: History(0..order) the converted model outputs (x0 predictions), most recent first
//! (diffusers' `model_outputs` reversed), History(order) scratch; Saved the predictor's result
//! before its correction (`last_sample`).

use super::dpm_solver_multistep::multistep_timesteps;
use super::{
    interp_index, karras_sigmas, log_sigmas_f32, sigma_to_t, train_sigmas, Buf, Lin, LinearStep,
    NoiseMix, Prediction, Sampler, SchedulerConfig, StepPlan,
};
use crate::error::{Error, Result};

/// `solver_type`: the B(h) of the UniPC update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SolverType {
    /// B(h) = h.
    Bh1,
    /// B(h) = e^h - 1.
    Bh2,
}

pub struct UniPc {
    name: String,
    timesteps: Vec<f64>,
    /// len(timesteps) + 1, f32 like diffusers.
    sigmas: Vec<f32>,
    prediction: Prediction,
    solver_type: SolverType,
    solver_order: usize,
    lower_order_final: bool,
    /// Step indices whose following step skips the corrector.
    disable_corrector: Vec<usize>,
    lower_order_nums: usize,
    /// `self.this_order` of the last predictor; None before the first step (no `last_sample`).
    last_order: Option<usize>,
    begin: usize,
}

/// What `multistep_uni_p_bh_update` and `multistep_uni_c_bh_update` both compute from h and the
/// ratios `rks` (the last one 1): h·phi_1(h), B(h), and the system `R rho = b`.
struct BhCoefficients {
    h_phi_1: f64,
    b_h: f64,
    r: Vec<Vec<f64>>,
    b: Vec<f64>,
}

impl UniPc {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        let acp = super::class_alphas_cumprod(cfg, "linear", super::ZeroSnr::Clamped)?;
        let num_train = cfg.train_timesteps();
        let solver_type = match cfg.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => SolverType::Bh1,
            // diffusers registers the DPM-Solver / DEIS names as bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => SolverType::Bh2,
            other => return Err(Error::Unsupported(format!("UniPC solver_type `{other}`"))),
        };
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(Error::Unsupported(format!(
                "UniPC solver_order {solver_order} (1 to 3 run here)"
            )));
        }
        cfg.reject_nonlinear(false)?;
        if !cfg.predict_x0.unwrap_or(true) {
            return Err(Error::Unsupported(
                "UniPC predict_x0 = false (diffusers' own loop gives NaN at the final sigma 0)"
                    .into(),
            ));
        }
        if let Some(key) = SchedulerConfig::first_set(&[
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
            ("use_flow_sigmas", cfg.use_flow_sigmas),
            ("use_dynamic_shifting", cfg.use_dynamic_shifting),
        ]) {
            return Err(Error::Unsupported(format!("UniPC `{key}`")));
        }
        let disable_corrector = cfg.disable_corrector.clone().unwrap_or_default();

        // set_timesteps
        let mut timesteps = multistep_timesteps(cfg, num_train, steps)?;
        let train = train_sigmas(&acp);
        let final_sigma_zero = match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => true,
            "sigma_min" => false,
            other => return Err(Error::Unsupported(format!("final_sigmas_type `{other}`"))),
        };
        let karras = cfg.use_karras_sigmas.unwrap_or(false);
        let mut sigmas: Vec<f64> = if karras {
            let log_sigmas = log_sigmas_f32(&train);
            let sigma_min = cfg.sigma_min.unwrap_or(train[0] as f64);
            let sigma_max = cfg.sigma_max.unwrap_or(*train.last().unwrap() as f64);
            let sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even())
                .collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| interp_index(t, &train)).collect()
        };
        // sigma_last: the Karras branch repeats its last sigma, the others take the first
        // training sigma.
        let sigma_last = match (final_sigma_zero, karras) {
            (true, _) => 0.0,
            (false, true) => *sigmas.last().unwrap(),
            (false, false) => train[0] as f64,
        };
        sigmas.push(sigma_last);
        Ok(UniPc {
            name,
            // Timesteps are int64 in diffusers.
            timesteps: timesteps.iter().map(|t| t.trunc()).collect(),
            sigmas: sigmas.iter().map(|&s| s as f32).collect(),
            prediction: cfg.prediction()?,
            solver_type,
            solver_order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            disable_corrector,
            lower_order_nums: 0,
            last_order: None,
            begin: 0,
        })
    }

    /// `_sigma_to_alpha_sigma_t` at `sigmas[index]`, with lambda = log(alpha_t) - log(sigma_t).
    fn vp(&self, index: usize) -> (f64, f64, f64) {
        let sigma = self.sigmas[index] as f64;
        let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma_t = sigma * alpha_t;
        (alpha_t, sigma_t, alpha_t.ln() - sigma_t.ln())
    }

    /// `convert_model_output` (predict_x0): the data prediction at `sigmas[index]`.
    fn convert_model_output(&self, index: usize) -> Lin {
        let (alpha_t, sigma_t, _) = self.vp(index);
        let (x, model) = (Lin::buf(Buf::Latents), Lin::model());
        match self.prediction {
            Prediction::Epsilon => (x - model * sigma_t) / alpha_t,
            Prediction::Sample => model,
            Prediction::VPrediction => x * alpha_t - model * sigma_t,
        }
    }

    /// The shared middle of both updates (predict_x0, so hh = -h).
    fn bh_coefficients(&self, h: f64, rks: &[f64]) -> BhCoefficients {
        let hh = -h;
        let h_phi_1 = hh.exp_m1(); // h·phi_1(h) = e^h - 1
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i = 1.0;
        let b_h = match self.solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => hh.exp_m1(),
        };
        let (mut r, mut b) = (Vec::new(), Vec::new());
        for i in 1..=rks.len() {
            r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial_i / b_h);
            factorial_i *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial_i;
        }
        BhCoefficients { h_phi_1, b_h, r, b }
    }

    /// `multistep_uni_p_bh_update`: from `x` at step `i` to `sigmas[i + 1]`, with `m0` this step's
    /// converted output and History(k - 1) the one k steps back.
    fn uni_p(&self, i: usize, order: usize, x: Lin, m0: &Lin) -> Lin {
        let (alpha_t, sigma_t, lambda_t) = self.vp(i + 1);
        let (_, sigma_s0, lambda_s0) = self.vp(i);
        let h = lambda_t - lambda_s0;
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let (_, _, lambda_si) = self.vp(i - k);
            let rk = (lambda_si - lambda_s0) / h;
            rks.push(rk);
            d1s.push((Lin::buf(Buf::History(k as u8 - 1)) - m0.clone()) / rk);
        }
        rks.push(1.0);
        let bh = self.bh_coefficients(h, &rks);
        let x_t_ = x * (sigma_t / sigma_s0) - m0.clone() * (alpha_t * bh.h_phi_1);
        if d1s.is_empty() {
            // diffusers' `pred_res = 0`: no term (its -inf·0 under bh1 at sigma 0 is a NaN).
            return x_t_;
        }
        let rhos_p = if order == 2 {
            vec![0.5] // "for order 2, we use a simplified version"
        } else {
            let n = order - 1;
            let r: Vec<Vec<f64>> = bh.r[..n].iter().map(|row| row[..n].to_vec()).collect();
            solve(r, bh.b[..n].to_vec())
        };
        let pred_res = weighted_sum(&rhos_p, d1s);
        x_t_ - pred_res * (alpha_t * bh.b_h)
    }

    /// `multistep_uni_c_bh_update`: corrects this step's input (the last predictor's output,
    /// which went from Saved at `sigmas[i - 1]`) with `model_t`, this step's converted output;
    /// History(0) is the previous step's, History(k) the one k + 1 steps back.
    fn uni_c(&self, i: usize, order: usize, model_t: Lin) -> Lin {
        let (alpha_t, sigma_t, lambda_t) = self.vp(i);
        let (_, sigma_s0, lambda_s0) = self.vp(i - 1);
        let h = lambda_t - lambda_s0;
        let m0 = Lin::buf(Buf::History(0));
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let (_, _, lambda_si) = self.vp(i - (k + 1));
            let rk = (lambda_si - lambda_s0) / h;
            rks.push(rk);
            d1s.push((Lin::buf(Buf::History(k as u8)) - m0.clone()) / rk);
        }
        rks.push(1.0);
        let bh = self.bh_coefficients(h, &rks);
        let rhos_c = if order == 1 {
            vec![0.5] // "for order 1, we use a simplified version"
        } else {
            solve(bh.r, bh.b)
        };
        let x_t_ =
            Lin::buf(Buf::Saved) * (sigma_t / sigma_s0) - m0.clone() * (alpha_t * bh.h_phi_1);
        let corr_res = weighted_sum(&rhos_c[..order - 1], d1s);
        let d1_t = model_t - m0;
        x_t_ - (corr_res + d1_t * rhos_c[order - 1]) * (alpha_t * bh.b_h)
    }
}

/// `einsum("k,bkc...->bc...", rhos, D1s)`.
fn weighted_sum(rhos: &[f64], terms: Vec<Lin>) -> Lin {
    rhos.iter()
        .zip(terms)
        .fold(Lin::default(), |acc, (&rho, d)| acc + d * rho)
}

/// `torch.linalg.solve` for the (at most 3x3) systems above: Gaussian elimination with partial
/// pivoting, in f64.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

impl Sampler for UniPc {
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
    /// `step`: correct this step's input with the new model output (UniC), then predict the
    /// next sample from the corrected one (UniP).
    fn step(&mut self, call: usize) -> StepPlan {
        let i = self.begin + call;
        let n = self.timesteps.len();
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i - 1));
        let model_t = self.convert_model_output(i);
        // The new output goes to the scratch slot past the live history, then shifts in.
        let scratch = Buf::History(self.solver_order as u8);
        let mut ops = Vec::new();
        let corrected = match self.last_order {
            Some(order) if use_corrector => {
                let x_c = self.uni_c(i, order, model_t.clone());
                ops.push(LinearStep::new(Buf::Next, &x_c, Some((scratch, &model_t))));
                Buf::Next
            }
            _ => {
                ops.push(LinearStep::new(scratch, &model_t, None));
                Buf::Latents
            }
        };
        let this_order = if self.lower_order_final {
            self.solver_order.min(n - i)
        } else {
            self.solver_order
        };
        // Warm-up: the multistep order grows with the outputs kept so far.
        let this_order = this_order.min(self.lower_order_nums + 1);
        let x_p = self.uni_p(i, this_order, Lin::buf(corrected), &Lin::buf(scratch));
        self.last_order = Some(this_order);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        // Latents <- the prediction, Saved <- the corrected sample (`last_sample`).
        let (out, mut swaps) = if corrected == Buf::Next {
            (
                Buf::Saved,
                vec![(Buf::Latents, Buf::Saved), (Buf::Saved, Buf::Next)],
            )
        } else {
            (
                Buf::Next,
                vec![(Buf::Saved, Buf::Latents), (Buf::Latents, Buf::Next)],
            )
        };
        ops.push(LinearStep::new(out, &x_p, None));
        // model_outputs shift: the scratch slot becomes History(0), the oldest becomes scratch.
        for k in (1..=self.solver_order as u8).rev() {
            swaps.push((Buf::History(k), Buf::History(k - 1)));
        }
        StepPlan {
            ops,
            swaps,
            needs_noise: false,
        }
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        let (alpha_t, sigma_t, _) = self.vp(self.begin + call);
        NoiseMix {
            original: alpha_t,
            noise: sigma_t,
        }
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}
