//! `PNDMScheduler` with `skip_prk_steps = true` (diffusers `scheduling_pndm.py` `step_plms`):
//! pseudo linear multistep (PLMS, Liu et al. 2022), SD 1.x's default sampler. N steps take N + 1
//! model calls: call 1 re-evaluates the first step's target and averages the two outputs
//! (a Heun-like start), after which Adams-Bashforth combinations of up to 4 stored outputs are used.

use super::ddim::AlphaTable;
use super::ZeroSnr;
use super::{
    spaced_timesteps, Buf, Lin, NoiseMix, Prediction, Sampler, SchedulerConfig, Spacing, StepPlan,
};
use crate::error::{Error, Result};

pub struct Pndm {
    name: String,
    alphas: AlphaTable,
    /// plms_timesteps: [t0, t1, t1, t2, ...]; one U-Net call each.
    timesteps: Vec<f64>,
    step_ratio: i64,
    prediction: Prediction,
    begin: usize,
    /// `len(self.ets)`: stored model outputs, in History(0..) most recent first (at most 3 kept
    /// across steps: the 4th is the current output).
    ets: usize,
}

impl Pndm {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        if !cfg.skip_prk_steps.unwrap_or(false) {
            // The PRK warm-up (4 model calls per step for the first 3 steps) is not ported.
            return Err(Error::Unsupported(
                "PNDM with skip_prk_steps = false (PRK warm-up); SD configs set it to true".into(),
            ));
        }
        let alphas = AlphaTable::new(cfg, "linear", false, ZeroSnr::Ignored)?;
        let num_train = cfg.train_timesteps();
        let spacing = cfg.spacing("leading")?;
        let offset = cfg.offset();
        // Ascending `_timesteps`.
        let mut base = match spacing {
            Spacing::Linspace => super::np_linspace(0.0, (num_train - 1) as f64, steps)
                .iter()
                .map(|v| v.round_ties_even())
                .collect(),
            _ => {
                let mut t = spaced_timesteps(spacing, num_train, steps, offset, true)?;
                t.reverse();
                t
            }
        };
        // concatenate([_t[:-1], _t[-2:-1], _t[-1:]])[::-1]
        // For one step `_t[-2:-1]` is empty: the schedule is the single timestep.
        let n = base.len();
        if n >= 2 {
            base.insert(n - 1, base[n - 2]);
        }
        base.reverse();
        Ok(Pndm {
            name,
            alphas,
            timesteps: base,
            step_ratio: (num_train / steps) as i64,
            prediction: cfg.prediction()?,
            begin: 0,
            ets: 0,
        })
    }

    /// `_get_prev_sample` (formula (9) of the PNDM paper), linear in sample and model output.
    fn prev_sample(&self, sample: Lin, model_output: Lin, t: i64, prev_t: i64) -> Lin {
        let (alpha_prod_t, alpha_prod_prev) =
            (self.alphas.at(t as f64), self.alphas.at(prev_t as f64));
        let (beta_prod_t, beta_prod_prev) = (1.0 - alpha_prod_t, 1.0 - alpha_prod_prev);
        let model_output = match self.prediction {
            Prediction::VPrediction => {
                model_output * alpha_prod_t.sqrt() + sample.clone() * beta_prod_t.sqrt()
            }
            _ => model_output,
        };
        let sample_coeff = (alpha_prod_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_prev).sqrt();
        sample * sample_coeff - model_output * ((alpha_prod_prev - alpha_prod_t) / denom)
    }
}

impl Sampler for Pndm {
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
        let counter = call;
        let mut t = self.timesteps()[call] as i64;
        let mut prev_t = t - self.step_ratio;
        if counter == 1 {
            prev_t = t;
            t += self.step_ratio;
        }
        let x = Lin::buf(Buf::Latents);
        let eps = Lin::model();
        let h = |k: u8| Lin::buf(Buf::History(k));
        // Store the new output as History(0), shifting older ones: write History(3), rotate.
        let rotate = vec![
            (Buf::History(3), Buf::History(2)),
            (Buf::History(2), Buf::History(1)),
            (Buf::History(1), Buf::History(0)),
        ];
        if counter == 1 {
            // model_output = (e1 + e0) / 2, from the saved sample; e1 is not kept.
            let prev = self.prev_sample(Lin::buf(Buf::Saved), (eps + h(0)) / 2.0, t, prev_t);
            return StepPlan::update_latents(&prev);
        }
        self.ets = (self.ets + 1).min(4);
        let (combined, mut swaps) = match self.ets {
            1 => (eps.clone(), vec![]),
            2 => ((eps.clone() * 3.0 - h(0)) / 2.0, vec![]),
            3 => (
                (eps.clone() * 23.0 - h(0) * 16.0 + h(1) * 5.0) / 12.0,
                vec![],
            ),
            _ => (
                (eps.clone() * 55.0 - h(0) * 59.0 + h(1) * 37.0 - h(2) * 9.0) * (1.0 / 24.0),
                vec![],
            ),
        };
        let prev = self.prev_sample(x, combined, t, prev_t);
        let op = super::LinearStep::new(Buf::Next, &prev, Some((Buf::History(3), &eps)));
        swaps.extend(rotate);
        if counter == 0 {
            // cur_sample = sample: keep the current latents as Saved for call 1.
            swaps.push((Buf::Saved, Buf::Latents));
        }
        swaps.push((Buf::Latents, Buf::Next));
        StepPlan {
            ops: vec![op],
            swaps,
            needs_noise: false,
        }
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        self.alphas.add_noise(self.timesteps()[call])
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}
