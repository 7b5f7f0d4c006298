//! `EulerDiscreteScheduler` (diffusers `scheduling_euler_discrete.py`; k-diffusion's
//! `sample_euler` with s_churn = 0), plus the sigma schedule shared by the k-diffusion family.

use super::ZeroSnr;
use super::{
    interp_index, karras_sigmas, log_sigmas_f32, max_f32, sigma_to_t, sigma_x0, spaced_timesteps,
    train_sigmas, Buf, Lin, NoiseMix, Prediction, Sampler, SchedulerConfig, Spacing, StepPlan,
};
use crate::error::{Error, Result};

/// Timesteps and sigmas (len steps + 1, f32 like diffusers) of the Euler-family `set_timesteps`.
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub spacing: Spacing,
}

impl SigmaSchedule {
    /// `allow_karras`: the class has `use_karras_sigmas`; `final_sigma_min`: `final_sigmas_type`.
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        allow_karras: bool,
        allow_final: bool,
        zero_snr: ZeroSnr,
    ) -> Result<Self> {
        let acp = super::class_alphas_cumprod(cfg, "linear", zero_snr)?;
        let num_train = cfg.train_timesteps();
        let spacing = cfg.spacing("linspace")?;
        let offset = cfg.offset();
        if cfg.interpolation_type.as_deref().unwrap_or("linear") != "linear" {
            return Err(Error::Unsupported(
                "interpolation_type other than `linear`".into(),
            ));
        }
        if cfg.timestep_type.as_deref().unwrap_or("discrete") != "discrete" {
            return Err(Error::Unsupported(
                "timestep_type other than `discrete`".into(),
            ));
        }
        if let Some(key) = SchedulerConfig::first_set(&[
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
        ]) {
            return Err(Error::Unsupported(format!("`{key}`")));
        }
        if steps > num_train {
            return Err(Error::InvalidInput(format!(
                "{steps} steps > num_train_timesteps {num_train}"
            )));
        }
        let mut timesteps = spaced_timesteps(spacing, num_train, steps, offset, false)?;
        let train = train_sigmas(&acp);
        let log_sigmas = log_sigmas_f32(&train);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp_index(t, &train)).collect();
        if allow_karras && cfg.use_karras_sigmas.unwrap_or(false) {
            let sigma_min = cfg.sigma_min.unwrap_or(*sigmas.last().unwrap());
            let sigma_max = cfg.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let last = match if allow_final {
            cfg.final_sigmas_type.as_deref().unwrap_or("zero")
        } else {
            "zero"
        } {
            "zero" => 0.0,
            "sigma_min" => train[0],
            other => return Err(Error::Unsupported(format!("final_sigmas_type `{other}`"))),
        };
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(last);
        let timesteps = timesteps.iter().map(|&t| t as f32 as f64).collect();
        Ok(SigmaSchedule {
            timesteps,
            sigmas,
            spacing,
        })
    }

    /// `init_noise_sigma`: max sigma, or sqrt(max^2 + 1) for leading spacing.
    pub fn init_noise_sigma(&self) -> f64 {
        let max = max_f32(&self.sigmas);
        match self.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    /// `scale_model_input`: `sample / sqrt(sigma^2 + 1)`.
    pub fn input_scale(&self, step_index: usize) -> f64 {
        let s = self.sigmas[step_index] as f64;
        1.0 / (s * s + 1.0).sqrt()
    }

    /// `add_noise`: `original + noise * sigma`.
    pub fn add_noise(&self, step_index: usize) -> NoiseMix {
        NoiseMix {
            original: 1.0,
            noise: self.sigmas[step_index] as f64,
        }
    }
}

pub struct Euler {
    name: String,
    schedule: SigmaSchedule,
    prediction: Prediction,
    /// set_begin_index (img2img): the step index of call 0.
    begin: usize,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, steps: usize, name: String) -> Result<Self> {
        Ok(Euler {
            name,
            schedule: SigmaSchedule::new(cfg, steps, true, true, ZeroSnr::Clamped)?,
            prediction: cfg.prediction()?,
            begin: 0,
        })
    }
}

impl Sampler for Euler {
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
        let (sigma, sigma_next) = (
            self.schedule.sigmas[i] as f64,
            self.schedule.sigmas[i + 1] as f64,
        );
        let x = Lin::buf(Buf::Latents);
        let x0 = sigma_x0(self.prediction, &x, &Lin::model(), sigma);
        let derivative = (x.clone() - x0) / sigma;
        StepPlan::update_latents(&(x + derivative * (sigma_next - sigma)))
    }
    fn add_noise(&self, call: usize) -> NoiseMix {
        self.schedule.add_noise(self.begin + call)
    }
    fn skip_calls(&mut self, calls: usize) {
        self.begin = calls;
    }
}
