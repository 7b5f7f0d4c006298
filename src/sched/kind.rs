//! The closed set of samplers as a type: every name the CLI, the library, PNG metadata and
//! (later) the server use for a sampler comes from here, so the tables cannot drift apart.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The diffusers scheduler class a sampler is (`_class_name` in scheduler_config.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerClass {
    Ddim,
    Pndm,
    EulerDiscrete,
    EulerAncestralDiscrete,
    DpmSolverMultistep,
    LmsDiscrete,
    HeunDiscrete,
    Ddpm,
    Lcm,
    Tcd,
    UniPcMultistep,
    DeisMultistep,
    Kdpm2Discrete,
    Kdpm2AncestralDiscrete,
}

impl SchedulerClass {
    pub const ALL: [SchedulerClass; 14] = [
        SchedulerClass::Ddim,
        SchedulerClass::Pndm,
        SchedulerClass::EulerDiscrete,
        SchedulerClass::EulerAncestralDiscrete,
        SchedulerClass::DpmSolverMultistep,
        SchedulerClass::LmsDiscrete,
        SchedulerClass::HeunDiscrete,
        SchedulerClass::Ddpm,
        SchedulerClass::Lcm,
        SchedulerClass::Tcd,
        SchedulerClass::UniPcMultistep,
        SchedulerClass::DeisMultistep,
        SchedulerClass::Kdpm2Discrete,
        SchedulerClass::Kdpm2AncestralDiscrete,
    ];

    /// diffusers' class name.
    pub fn diffusers_name(self) -> &'static str {
        match self {
            SchedulerClass::Ddim => "DDIMScheduler",
            SchedulerClass::Pndm => "PNDMScheduler",
            SchedulerClass::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerClass::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            SchedulerClass::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerClass::LmsDiscrete => "LMSDiscreteScheduler",
            SchedulerClass::HeunDiscrete => "HeunDiscreteScheduler",
            SchedulerClass::Ddpm => "DDPMScheduler",
            SchedulerClass::Lcm => "LCMScheduler",
            SchedulerClass::Tcd => "TCDScheduler",
            SchedulerClass::UniPcMultistep => "UniPCMultistepScheduler",
            SchedulerClass::DeisMultistep => "DEISMultistepScheduler",
            SchedulerClass::Kdpm2Discrete => "KDPM2DiscreteScheduler",
            SchedulerClass::Kdpm2AncestralDiscrete => "KDPM2AncestralDiscreteScheduler",
        }
    }

    /// The class named by a config's `_class_name`, if we implement it.
    pub fn from_diffusers_name(name: &str) -> Option<SchedulerClass> {
        Self::ALL.into_iter().find(|c| c.diffusers_name() == name)
    }

    /// The sampler a config of this class gives when none is asked for (its own settings kept:
    /// a PNDMScheduler config keeps its `skip_prk_steps`, a DPMSolver config its algorithm).
    pub fn default_kind(self) -> SamplerKind {
        match self {
            SchedulerClass::Ddim => SamplerKind::Ddim,
            SchedulerClass::Pndm => SamplerKind::Pndm,
            SchedulerClass::EulerDiscrete => SamplerKind::Euler,
            SchedulerClass::EulerAncestralDiscrete => SamplerKind::EulerA,
            SchedulerClass::DpmSolverMultistep => SamplerKind::DpmPP2M,
            SchedulerClass::LmsDiscrete => SamplerKind::Lms,
            SchedulerClass::HeunDiscrete => SamplerKind::Heun,
            SchedulerClass::Ddpm => SamplerKind::Ddpm,
            SchedulerClass::Lcm => SamplerKind::Lcm,
            SchedulerClass::Tcd => SamplerKind::Tcd,
            SchedulerClass::UniPcMultistep => SamplerKind::UniPc,
            SchedulerClass::DeisMultistep => SamplerKind::Deis,
            SchedulerClass::Kdpm2Discrete => SamplerKind::Kdpm2,
            SchedulerClass::Kdpm2AncestralDiscrete => SamplerKind::Kdpm2A,
        }
    }
}

/// A sampler the engine runs: a diffusers scheduler class plus the config overrides the name
/// implies (Karras sigmas, the SDE algorithm, PLMS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Ddim,
    Pndm,
    Euler,
    EulerA,
    DpmPP2M,
    DpmPP2MKarras,
    DpmPP2MSde,
    DpmPP2MSdeKarras,
    Lms,
    LmsKarras,
    EulerKarras,
    Heun,
    Ddpm,
    Lcm,
    Tcd,
    UniPc,
    UniPcBh1,
    UniPcKarras,
    Deis,
    Kdpm2,
    Kdpm2Karras,
    Kdpm2A,
    Kdpm2AKarras,
}

impl SamplerKind {
    /// Every sampler, in the order `ldm samplers` lists them.
    pub const ALL: [SamplerKind; 23] = [
        SamplerKind::Ddim,
        SamplerKind::Pndm,
        SamplerKind::Euler,
        SamplerKind::EulerA,
        SamplerKind::DpmPP2M,
        SamplerKind::DpmPP2MKarras,
        SamplerKind::DpmPP2MSde,
        SamplerKind::DpmPP2MSdeKarras,
        SamplerKind::Lms,
        SamplerKind::LmsKarras,
        SamplerKind::EulerKarras,
        SamplerKind::Heun,
        SamplerKind::Ddpm,
        SamplerKind::Lcm,
        SamplerKind::Tcd,
        SamplerKind::UniPc,
        SamplerKind::UniPcBh1,
        SamplerKind::UniPcKarras,
        SamplerKind::Deis,
        SamplerKind::Kdpm2,
        SamplerKind::Kdpm2Karras,
        SamplerKind::Kdpm2A,
        SamplerKind::Kdpm2AKarras,
    ];

    /// The `--sampler` name.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Pndm => "pndm",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerA => "euler_a",
            SamplerKind::DpmPP2M => "dpmpp_2m",
            SamplerKind::DpmPP2MKarras => "dpmpp_2m_karras",
            SamplerKind::DpmPP2MSde => "dpmpp_sde",
            SamplerKind::DpmPP2MSdeKarras => "dpmpp_sde_karras",
            SamplerKind::Lms => "lms",
            SamplerKind::LmsKarras => "lms_karras",
            SamplerKind::EulerKarras => "euler_karras",
            SamplerKind::Heun => "heun",
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Lcm => "lcm",
            SamplerKind::Tcd => "tcd",
            SamplerKind::UniPc => "unipc",
            SamplerKind::UniPcBh1 => "unipc_bh1",
            SamplerKind::UniPcKarras => "unipc_karras",
            SamplerKind::Deis => "deis",
            SamplerKind::Kdpm2 => "kdpm2",
            SamplerKind::Kdpm2Karras => "kdpm2_karras",
            SamplerKind::Kdpm2A => "kdpm2_a",
            SamplerKind::Kdpm2AKarras => "kdpm2_a_karras",
        }
    }

    /// What `ldm samplers` prints beside the name: the diffusers class and settings.
    pub fn description(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::Pndm => "PNDMScheduler (PLMS, skip_prk_steps)",
            SamplerKind::Euler => "EulerDiscreteScheduler",
            SamplerKind::EulerA => "EulerAncestralDiscreteScheduler",
            SamplerKind::DpmPP2M => "DPMSolverMultistepScheduler (dpmsolver++, order 2)",
            SamplerKind::DpmPP2MKarras => "DPMSolverMultistepScheduler + use_karras_sigmas",
            SamplerKind::DpmPP2MSde => "DPMSolverMultistepScheduler (sde-dpmsolver++, order 2)",
            SamplerKind::DpmPP2MSdeKarras => {
                "DPMSolverMultistepScheduler (sde-dpmsolver++) + use_karras_sigmas"
            }
            SamplerKind::Lms => "LMSDiscreteScheduler",
            SamplerKind::LmsKarras => "LMSDiscreteScheduler + use_karras_sigmas",
            SamplerKind::EulerKarras => "EulerDiscreteScheduler + use_karras_sigmas",
            SamplerKind::Heun => "HeunDiscreteScheduler",
            SamplerKind::Ddpm => "DDPMScheduler",
            SamplerKind::Lcm => "LCMScheduler (LCM models and LCM-LoRA, 2-8 steps)",
            SamplerKind::Tcd => "TCDScheduler (gamma = --eta, 0.3 suggested)",
            SamplerKind::UniPc => "UniPCMultistepScheduler (bh2, order 2)",
            SamplerKind::UniPcBh1 => "UniPCMultistepScheduler (bh1, order 2)",
            SamplerKind::UniPcKarras => "UniPCMultistepScheduler + use_karras_sigmas",
            SamplerKind::Deis => "DEISMultistepScheduler (log-rho, order 2)",
            SamplerKind::Kdpm2 => "KDPM2DiscreteScheduler",
            SamplerKind::Kdpm2Karras => "KDPM2DiscreteScheduler + use_karras_sigmas",
            SamplerKind::Kdpm2A => "KDPM2AncestralDiscreteScheduler",
            SamplerKind::Kdpm2AKarras => "KDPM2AncestralDiscreteScheduler + use_karras_sigmas",
        }
    }

    /// The name AUTOMATIC1111's web UI gives it (PNG `parameters`, the web API's sampler list).
    pub fn a1111_name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::Pndm => "PLMS",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerA => "Euler a",
            SamplerKind::DpmPP2M => "DPM++ 2M",
            SamplerKind::DpmPP2MKarras => "DPM++ 2M Karras",
            SamplerKind::DpmPP2MSde => "DPM++ 2M SDE",
            SamplerKind::DpmPP2MSdeKarras => "DPM++ 2M SDE Karras",
            SamplerKind::Lms => "LMS",
            SamplerKind::LmsKarras => "LMS Karras",
            SamplerKind::EulerKarras => "Euler Karras",
            SamplerKind::Heun => "Heun",
            SamplerKind::Ddpm => "DDPM",
            SamplerKind::Lcm => "LCM",
            SamplerKind::Tcd => "TCD",
            SamplerKind::UniPc => "UniPC",
            // A1111 picks bh1 in a setting, not by name; these two follow its naming pattern.
            SamplerKind::UniPcBh1 => "UniPC bh1",
            SamplerKind::UniPcKarras => "UniPC Karras",
            SamplerKind::Deis => "DEIS",
            SamplerKind::Kdpm2 => "DPM2",
            SamplerKind::Kdpm2Karras => "DPM2 Karras",
            SamplerKind::Kdpm2A => "DPM2 a",
            SamplerKind::Kdpm2AKarras => "DPM2 a Karras",
        }
    }

    pub fn class(self) -> SchedulerClass {
        match self {
            SamplerKind::Ddim => SchedulerClass::Ddim,
            SamplerKind::Pndm => SchedulerClass::Pndm,
            SamplerKind::Euler | SamplerKind::EulerKarras => SchedulerClass::EulerDiscrete,
            SamplerKind::EulerA => SchedulerClass::EulerAncestralDiscrete,
            SamplerKind::DpmPP2M
            | SamplerKind::DpmPP2MKarras
            | SamplerKind::DpmPP2MSde
            | SamplerKind::DpmPP2MSdeKarras => SchedulerClass::DpmSolverMultistep,
            SamplerKind::Lms | SamplerKind::LmsKarras => SchedulerClass::LmsDiscrete,
            SamplerKind::Heun => SchedulerClass::HeunDiscrete,
            SamplerKind::Ddpm => SchedulerClass::Ddpm,
            SamplerKind::Lcm => SchedulerClass::Lcm,
            SamplerKind::Tcd => SchedulerClass::Tcd,
            SamplerKind::UniPc | SamplerKind::UniPcBh1 | SamplerKind::UniPcKarras => {
                SchedulerClass::UniPcMultistep
            }
            SamplerKind::Deis => SchedulerClass::DeisMultistep,
            SamplerKind::Kdpm2 | SamplerKind::Kdpm2Karras => SchedulerClass::Kdpm2Discrete,
            SamplerKind::Kdpm2A | SamplerKind::Kdpm2AKarras => {
                SchedulerClass::Kdpm2AncestralDiscrete
            }
        }
    }

    /// The Karras-sigma variant (`--karras`), itself for one already, None where diffusers'
    /// class has no `use_karras_sigmas`.
    pub fn karras(self) -> Option<SamplerKind> {
        match self {
            SamplerKind::Euler | SamplerKind::EulerKarras => Some(SamplerKind::EulerKarras),
            SamplerKind::DpmPP2M | SamplerKind::DpmPP2MKarras => Some(SamplerKind::DpmPP2MKarras),
            SamplerKind::DpmPP2MSde | SamplerKind::DpmPP2MSdeKarras => {
                Some(SamplerKind::DpmPP2MSdeKarras)
            }
            SamplerKind::Lms | SamplerKind::LmsKarras => Some(SamplerKind::LmsKarras),
            SamplerKind::UniPc | SamplerKind::UniPcKarras => Some(SamplerKind::UniPcKarras),
            SamplerKind::Kdpm2 | SamplerKind::Kdpm2Karras => Some(SamplerKind::Kdpm2Karras),
            SamplerKind::Kdpm2A | SamplerKind::Kdpm2AKarras => Some(SamplerKind::Kdpm2AKarras),
            _ => None,
        }
    }

    /// The sampler A1111's API names with `sampler_name` and `scheduler` (A1111 1.9+ splits
    /// "DPM++ 2M Karras" into "DPM++ 2M" + "Karras"; the combined legacy names still parse).
    /// Schedulers: "Automatic" (or none) keeps the sampler's own, "Karras" asks for its Karras
    /// variant; others are not ours.
    pub fn from_a1111(sampler_name: &str, scheduler: Option<&str>) -> Result<SamplerKind, Error> {
        let base: SamplerKind = sampler_name.parse()?;
        match scheduler.map(str::trim) {
            None | Some("") => Ok(base),
            Some(s) if s.eq_ignore_ascii_case("automatic") => Ok(base),
            Some(s) if s.eq_ignore_ascii_case("karras") => base.karras().ok_or_else(|| {
                Error::InvalidInput(format!("sampler `{sampler_name}` has no Karras schedule"))
            }),
            Some(other) => Err(Error::InvalidInput(format!(
                "unknown scheduler `{other}`; choose Automatic or Karras"
            ))),
        }
    }

    /// Whether each step draws fresh noise (the same seed still gives the same image).
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            SamplerKind::EulerA
                | SamplerKind::DpmPP2MSde
                | SamplerKind::DpmPP2MSdeKarras
                | SamplerKind::Ddpm
                | SamplerKind::Lcm
                | SamplerKind::Kdpm2A
                | SamplerKind::Kdpm2AKarras
        )
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    /// A `--sampler` name, an alias (`plms`, `euler_ancestral`, `dpm++_2m`, ...), an A1111 name
    /// (`"DPM++ 2M Karras"`, `"Euler a"`) or a diffusers class name (`"DDIMScheduler"`).
    fn from_str(s: &str) -> Result<Self, Error> {
        if let Some(kind) = SamplerKind::ALL
            .into_iter()
            .find(|k| k.name() == s || k.a1111_name() == s)
        {
            return Ok(kind);
        }
        if let Some(class) = SchedulerClass::from_diffusers_name(s) {
            return Ok(class.default_kind());
        }
        let canonical = s.to_ascii_lowercase().replace(['-', ' ', '+'], "_");
        let kind = match canonical.as_str() {
            "plms" => SamplerKind::Pndm,
            "euler_ancestral" => SamplerKind::EulerA,
            "dpm__2m" => SamplerKind::DpmPP2M,
            "dpm__2m_karras" => SamplerKind::DpmPP2MKarras,
            "dpmpp_2m_sde" | "dpm__2m_sde" => SamplerKind::DpmPP2MSde,
            "dpmpp_2m_sde_karras" | "dpm__2m_sde_karras" => SamplerKind::DpmPP2MSdeKarras,
            other => {
                return SamplerKind::ALL
                    .into_iter()
                    .find(|k| {
                        k.name() == other
                            || k.a1111_name()
                                .to_ascii_lowercase()
                                .replace(['-', ' ', '+'], "_")
                                == other
                    })
                    .ok_or_else(|| {
                        let names: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.name()).collect();
                        Error::InvalidInput(format!(
                            "unknown sampler `{s}`; choose one of {}",
                            names.join(", ")
                        ))
                    })
            }
        };
        Ok(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back() {
        for kind in SamplerKind::ALL {
            assert_eq!(kind.name().parse::<SamplerKind>().unwrap(), kind);
            assert_eq!(
                kind.a1111_name().parse::<SamplerKind>().unwrap(),
                kind,
                "{}",
                kind.a1111_name()
            );
            assert_eq!(kind.to_string(), kind.name());
            if let Some(k) = kind.karras() {
                assert_eq!(k.karras(), Some(k));
                assert_eq!(k.class(), kind.class());
            }
        }
        for class in SchedulerClass::ALL {
            let kind: SamplerKind = class.diffusers_name().parse().unwrap();
            assert_eq!(kind.class(), class);
        }
    }

    #[test]
    fn aliases_and_errors() {
        for (alias, kind) in [
            ("plms", SamplerKind::Pndm),
            ("euler_ancestral", SamplerKind::EulerA),
            ("dpm++_2m", SamplerKind::DpmPP2M),
            ("DPM++ 2M Karras", SamplerKind::DpmPP2MKarras),
            ("dpmpp_2m_sde", SamplerKind::DpmPP2MSde),
            ("DPM++ 2M SDE Karras", SamplerKind::DpmPP2MSdeKarras),
            ("Euler-A", SamplerKind::EulerA),
        ] {
            assert_eq!(alias.parse::<SamplerKind>().unwrap(), kind, "{alias}");
        }
        let err = "nope".parse::<SamplerKind>().unwrap_err().to_string();
        assert!(
            err.contains("unknown sampler `nope`") && err.contains("dpmpp_2m_karras"),
            "{err}"
        );
    }
}
