//! Which kernels run: one value, carried by [`GpuOptions`](super::GpuOptions) into each
//! [`Gpu`](super::Gpu), so two engines in one process can differ and nothing hides in globals.
//! The library never reads the environment; `main.rs`, the benches and the tests call
//! [`KernelPolicy::from_env`] to honour the `LDM_*` variables.
//!
//! The tile enums live here (their geometry and choice rules are in `kernels/coop.rs` and
//! `kernels/conv2d.rs`) so that the policy can name them without the runtime importing kernels.

use crate::error::{Error, Result};

/// The tensor-core (cooperative-matrix) matmul/conv output tile, named by its side at 16 × 16
/// fragments (NVIDIA); with 8 × 8 fragments (lavapipe) the same kernels have tiles of 32 and 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoopTile {
    /// `linear_coop` / `geglu_coop`: 4·frag square, 4 subgroups of 2 × 2 fragments.
    T64,
    /// `linear_coop_l` / `geglu_coop_l`: 8·frag square, 8 subgroups of 4 × 2 fragments. Half the
    /// L2 traffic per FLOP of [`CoopTile::T64`] and 0.75 fragment loads per multiply-add
    /// instead of 1; the epilogue runs in 4 passes through a small f32 slot per subgroup.
    T128,
}

impl CoopTile {
    /// The `LDM_COOP_TILE` spelling.
    pub fn parse(s: &str) -> Option<CoopTile> {
        match s.trim() {
            "64" => Some(CoopTile::T64),
            "128" => Some(CoopTile::T128),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            CoopTile::T64 => "64",
            CoopTile::T128 => "128",
        }
    }
}

/// Output tile of a convolution kernel variant: one entry point of `shaders/conv2d.wgsl` each
/// (its header has the geometry and the reasoning), or the tensor-core kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvTile {
    /// `conv2d_64`: 64 pixels × 64 channels, 4 × 4 outputs per thread.
    T64,
    /// `conv2d_128`: 128 pixels × 128 channels, 8 × 8 outputs per thread (twice the FMAs per
    /// workgroup-memory read); for shapes with enough tiles to fill a large GPU.
    T128,
    /// `conv2d_small`: 64 pixels × 4·⌈Cout/4⌉ channels (at most 16), one pixel per thread; for
    /// the conv_out layers (Cout = 3 or 4), which waste 94-95% of a 64-wide tile.
    Small,
    /// `shaders/conv2d_coop.wgsl`: the same implicit GEMM on cooperative matrices (tensor cores),
    /// 4·frag × 4·frag tiles; f16 only, where the tensor-core plan allows it and the channels
    /// (of each concatenated part) are a multiple of 4.
    Coop,
}

impl ConvTile {
    /// The `LDM_CONV_TILE` spelling: `64`, `128`, `small` or `coop`.
    pub fn parse(s: &str) -> Option<ConvTile> {
        match s.trim() {
            "64" => Some(ConvTile::T64),
            "128" => Some(ConvTile::T128),
            "small" => Some(ConvTile::Small),
            "coop" => Some(ConvTile::Coop),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ConvTile::T64 => "64",
            ConvTile::T128 => "128",
            ConvTile::Small => "small",
            ConvTile::Coop => "coop",
        }
    }
}

/// How the kernels are chosen. The default is what every adapter gets unless told otherwise:
/// tensor cores where the GPU offers 16 × 16 f16 fragments, tiles by shape, the fused VAE
/// attention where it fits, bounds checks only in shaders whose indexing is unproven.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelPolicy {
    /// Tensor cores: `None` by adapter (on for 16 × 16 fragments on GPUs), `Some(true)` wherever
    /// the adapter can run them (e.g. lavapipe's 8 × 8), `Some(false)` never.
    /// (`LDM_COOP_MATMUL=1|0`)
    pub tensor_cores: Option<bool>,
    /// Force the tensor-core matmul/conv tile (a tile the adapter cannot hold still falls back
    /// to the 64 tile). (`LDM_COOP_TILE=64|128`)
    pub coop_tile: Option<CoopTile>,
    /// Force the convolution kernel (one that cannot run a shape falls back by the usual rule).
    /// (`LDM_CONV_TILE=64|128|small|coop`)
    pub conv_tile: Option<ConvTile>,
    /// The large tensor-core conv tile's narrow variant (128 pixels × 64 channels at 16 × 16
    /// fragments) instead of 128 × 128, wherever the large tile runs; for measuring it against
    /// the default on a GPU. (`LDM_COOP_CONV_N=64|128`)
    pub coop_conv_narrow: bool,
    /// The VAE's single-head attention through the unfused path (scores materialised) even
    /// where the flash kernel fits. (`LDM_VAE_ATTENTION=unfused`)
    pub vae_attention_unfused: bool,
    /// naga's runtime bounds checks in every shader, not only in those with unproven indexing.
    /// (`LDM_SHADER_CHECKS=1`)
    pub shader_checks: bool,
}

impl KernelPolicy {
    /// The policy the `LDM_*` variables ask for (unset or empty: the default). For `main.rs`,
    /// the benches and the tests; the library itself never reads the environment.
    pub fn from_env() -> Result<KernelPolicy> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`KernelPolicy::from_env`] over any source of variables (a map in tests, a config file).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<KernelPolicy> {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let tensor_cores = match var("LDM_COOP_MATMUL").as_deref().map(str::trim) {
            None => None,
            Some("1") => Some(true),
            Some("0") => Some(false),
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "LDM_COOP_MATMUL={other:?}: expected 1 (tensor cores wherever they run) or 0 \
                     (never) (HINT: unset it to let the adapter decide)"
                )))
            }
        };
        let coop_tile = match var("LDM_COOP_TILE") {
            None => None,
            Some(v) => Some(CoopTile::parse(&v).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "LDM_COOP_TILE={v:?}: expected 64 or 128 (HINT: unset it to let the tensor-core \
                     matmul pick its tile by shape)"
                ))
            })?),
        };
        let conv_tile = match var("LDM_CONV_TILE") {
            None => None,
            Some(v) => Some(ConvTile::parse(&v).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "LDM_CONV_TILE={v:?}: expected 64, 128, small or coop (HINT: unset it to let \
                     the convolution pick its tile by shape)"
                ))
            })?),
        };
        let coop_conv_narrow = match var("LDM_COOP_CONV_N").as_deref().map(str::trim) {
            None | Some("128") => false,
            Some("64") => true,
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "LDM_COOP_CONV_N={other:?}: expected 64 (the large tensor-core conv tile's \
                     narrow variant) or 128 (HINT: unset it for the default, 128)"
                )))
            }
        };
        let vae_attention_unfused = match var("LDM_VAE_ATTENTION").as_deref().map(str::trim) {
            None | Some("fused") | Some("auto") => false,
            Some("unfused") => true,
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "LDM_VAE_ATTENTION={other:?}: expected unfused (or auto)"
                )))
            }
        };
        let shader_checks = var("LDM_SHADER_CHECKS").is_some_and(|v| v.trim() == "1");
        Ok(KernelPolicy {
            tensor_cores,
            coop_tile,
            conv_tile,
            coop_conv_narrow,
            vae_attention_unfused,
            shader_checks,
        })
    }

    /// One line for `ldm info`: what is forced, or "by adapter and shape".
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        match self.tensor_cores {
            Some(true) => parts.push("tensor cores forced on".to_string()),
            Some(false) => parts.push("tensor cores off".to_string()),
            None => {}
        }
        if let Some(t) = self.coop_tile {
            parts.push(format!("tensor-core tile {}", t.name()));
        }
        if let Some(t) = self.conv_tile {
            parts.push(format!("conv tile {}", t.name()));
        }
        if self.coop_conv_narrow {
            parts.push("tensor-core conv tile 128x64".into());
        }
        if self.vae_attention_unfused {
            parts.push("VAE attention unfused".into());
        }
        if self.shader_checks {
            parts.push("bounds checks in every shader".into());
        }
        if parts.is_empty() {
            "default (kernels chosen by adapter and shape)".into()
        } else {
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<KernelPolicy> {
        let map: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        KernelPolicy::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn variables_map_to_the_policy() {
        assert_eq!(with(&[]).unwrap(), KernelPolicy::default());
        let p = with(&[
            ("LDM_COOP_MATMUL", "1"),
            ("LDM_COOP_TILE", "128"),
            ("LDM_CONV_TILE", "small"),
            ("LDM_COOP_CONV_N", "64"),
            ("LDM_VAE_ATTENTION", "unfused"),
            ("LDM_SHADER_CHECKS", "1"),
        ])
        .unwrap();
        assert_eq!(p.tensor_cores, Some(true));
        assert_eq!(p.coop_tile, Some(CoopTile::T128));
        assert_eq!(p.conv_tile, Some(ConvTile::Small));
        assert!(p.vae_attention_unfused && p.shader_checks && p.coop_conv_narrow);
        assert!(p.summary().contains("conv tile small"));
        assert_eq!(
            with(&[("LDM_COOP_MATMUL", "0")]).unwrap().tensor_cores,
            Some(false)
        );
        assert_eq!(with(&[("LDM_CONV_TILE", " ")]).unwrap().conv_tile, None);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("LDM_COOP_TILE", "96"),
            ("LDM_CONV_TILE", "huge"),
            ("LDM_COOP_MATMUL", "yes"),
            ("LDM_VAE_ATTENTION", "maybe"),
            ("LDM_COOP_CONV_N", "96"),
        ] {
            let err = with(&[(k, v)]).unwrap_err().to_string();
            assert!(err.contains(k), "{err}");
        }
    }
}
