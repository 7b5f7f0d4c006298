//! `shaders/sampler_step.wgsl`: a sampler's whole per-step latent update as one dispatch —
//! classifier-free guidance fused with any linear combination of up to five same-shaped tensors.
//!
//! Every scheduler we port (DDIM, Euler, Euler a, Heun, DPM++ 2M, LMS, PNDM, DDPM) updates the
//! latents as `sum_i a_i * slot_i + a_model * eps`, with coefficients from the schedule (computed on
//! the CPU in f64) — and some need a second output (e.g. the denoised x0 or a derivative to keep),
//! given by the `b` coefficients.
//!
//! The same file holds the one other per-latent update a pipeline needs: [`posterior_sample`],
//! the img2img / inpainting initial latents from the VAE encoder's moments; and [`lincomb`], the
//! step kernel as a plain linear combination.

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::{DType, Error, Result};

/// Coefficients of one step: `out_a = sum_i a[i] * slot[i] + a_model * eps`,
/// `out_b = sum_i b[i] * slot[i] + b_model * eps`. Passed to the GPU as f32.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepCoefs {
    pub a: [f32; 5],
    pub a_model: f32,
    pub b: [f32; 5],
    pub b_model: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    cond_offset: u32,
    mask: u32,
    guided: u32,
    guidance: f32,
    a_model: f32,
    b_model: f32,
    _pad: f32,
    a: [f32; 8],
    b: [f32; 8],
}

/// Fused guidance + update:
///
/// `eps = guided ? uncond + g * (cond - uncond) : model_out`, where `model_out` is `[2B, ...]` =
/// `[uncond; cond]` along the batch when `guidance` is `Some(g)`, and `[B, ...]` otherwise;
/// `out_a = sum_i coefs.a[i] * slot[i] + coefs.a_model * eps`; if `out_b` is given,
/// `out_b = sum_i coefs.b[i] * slot[i] + coefs.b_model * eps`.
///
/// All slots, `out_a` and `out_b` are `[B, ...]` with model_out's dtype; a `None` slot contributes
/// nothing and its coefficients must be 0.
///
/// **Outputs must not share a buffer with any input** (nor with each other): binding one buffer
/// read-only and read-write in the same dispatch is a wgpu validation error. Samplers therefore
/// ping-pong: write the new latents into a second tensor and swap (e.g. keep two latent tensors and
/// alternate, or take a fresh one from `gpu.empty`, which the pool recycles). Aliasing returns an
/// `Error::Shape` naming the slot.
pub fn sampler_step(
    gpu: &Gpu,
    model_out: &Tensor,
    guidance: Option<f32>,
    slots: [Option<&Tensor>; 5],
    coefs: &StepCoefs,
    out_a: &Tensor,
    out_b: Option<&Tensor>,
) -> Result<()> {
    const OP: &str = "sampler_step";
    let shape = out_a.shape();
    let dtype = out_a.dtype();
    let n = out_a.numel();
    if shape.is_empty() {
        return Err(Error::shape(
            OP,
            format!("out_a {out_a:?} must be [B, ...]"),
        ));
    }
    // model_out: [B, ...] or [2B, ...] when guided.
    let mut model_shape = shape.to_vec();
    if guidance.is_some() {
        model_shape[0] *= 2;
    }
    if model_out.shape() != model_shape.as_slice() || model_out.dtype() != dtype {
        return Err(Error::shape(
            OP,
            format!(
                "model_out {model_out:?} must be {model_shape:?} {} ({}) for out_a {out_a:?}",
                dtype.name(),
                if guidance.is_some() {
                    "[uncond; cond] along the batch, guided"
                } else {
                    "unguided"
                }
            ),
        ));
    }
    let mut mask = 0u32;
    for (k, slot) in slots.iter().enumerate() {
        match slot {
            Some(t) => {
                if t.shape() != shape || t.dtype() != dtype {
                    return Err(Error::shape(
                        OP,
                        format!("slot {k} {t:?} must match out_a {out_a:?}"),
                    ));
                }
                mask |= 1 << k;
            }
            None if coefs.a[k] != 0.0 || coefs.b[k] != 0.0 => {
                return Err(Error::shape(
                    OP,
                    format!(
                        "slot {k} is None but has coefficients a = {}, b = {}",
                        coefs.a[k], coefs.b[k]
                    ),
                ));
            }
            None => {}
        }
    }
    let outputs: Vec<(&str, &Tensor)> = std::iter::once(("out_a", out_a))
        .chain(out_b.map(|t| ("out_b", t)))
        .collect();
    if let Some(b) = out_b {
        if b.shape() != shape || b.dtype() != dtype {
            return Err(Error::shape(
                OP,
                format!("out_b {b:?} must match out_a {out_a:?}"),
            ));
        }
        if b.buffer_id() == out_a.buffer_id() {
            return Err(Error::shape(OP, "out_a and out_b are the same buffer"));
        }
    }
    for (name, out) in &outputs {
        let inputs = std::iter::once(("model_out".to_string(), model_out)).chain(
            slots
                .iter()
                .enumerate()
                .filter_map(|(k, s)| s.map(|t| (format!("slot {k}"), t))),
        );
        for (what, t) in inputs {
            if t.buffer_id() == out.buffer_id() {
                return Err(Error::shape(
                    OP,
                    format!(
                        "{name} shares its buffer with {what}: binding one buffer read-only and read-write in one \
                         dispatch is a wgpu validation error; ping-pong between two latent tensors instead"
                    ),
                ));
            }
        }
    }
    if n == 0 {
        return Ok(());
    }

    let (entry, w) = if n.is_multiple_of(4) {
        ("step4", 4)
    } else {
        ("step1", 1)
    };
    let items = n / w;
    let items_u32 =
        u32::try_from(items).map_err(|_| Error::shape(OP, format!("{out_a:?} is too large")))?;
    let mut a = [0.0f32; 8];
    let mut b = [0.0f32; 8];
    a[..5].copy_from_slice(&coefs.a);
    b[..5].copy_from_slice(&coefs.b);
    let params = Params {
        n: items_u32,
        cond_offset: if guidance.is_some() { items_u32 } else { 0 },
        mask,
        guided: guidance.is_some() as u32,
        guidance: guidance.unwrap_or(0.0),
        a_model: coefs.a_model,
        b_model: coefs.b_model,
        _pad: 0.0,
        a,
        b,
    };
    // Unused bindings get small dummies: one read-only for absent slots, one read-write for an
    // absent out_b (never written: HAS_B is false then). Distinct buffers, so no read/write clash.
    let dummy_in = gpu.empty(&[4], dtype)?;
    let dummy_out;
    let out_b_t = match out_b {
        Some(t) => t,
        None => {
            dummy_out = gpu.empty(&[4], dtype)?;
            &dummy_out
        }
    };
    let slot_t: Vec<&Tensor> = slots.iter().map(|s| s.unwrap_or(&dummy_in)).collect();
    let tensors = [
        model_out, slot_t[0], slot_t[1], slot_t[2], slot_t[3], slot_t[4], out_a, out_b_t,
    ];
    let reads =
        model_out.size_bytes() + slots.iter().flatten().map(|t| t.size_bytes()).sum::<u64>();
    let writes = out_a.size_bytes() * outputs.len() as u64;
    let terms = mask.count_ones() as f64 + 1.0;
    gpu.dispatch(&Dispatch {
        shader: ShaderId::SamplerStep,
        entry,
        dtype,
        overrides: &[("HAS_B", if out_b.is_some() { 1.0 } else { 0.0 })],
        tensors: &tensors,
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d((items as u64).div_ceil(256)),
        label: OP,
        work: Work {
            flops: n as f64 * (3.0 + 2.0 * terms * outputs.len() as f64),
            bytes: (reads + writes) as f64,
        },
    })
}

/// `out = sum_k c_k * t_k` over up to five tensors shaped like `out`: [`sampler_step`] with no
/// model term and no second output (img2img's `add_noise`, inpainting's latent blend). The kernel
/// still reads a model input: `model_out` is any finite unguided tensor shaped like `out` (its
/// coefficient is 0; an infinite one would give 0 · inf = NaN).
pub fn lincomb(
    gpu: &Gpu,
    model_out: &Tensor,
    terms: &[(f32, &Tensor)],
    out: &Tensor,
) -> Result<()> {
    if terms.len() > 5 {
        return Err(Error::shape(
            "sampler_step",
            format!(
                "lincomb of {} tensors (the kernel has 5 slots)",
                terms.len()
            ),
        ));
    }
    let mut slots: [Option<&Tensor>; 5] = [None; 5];
    let mut coefs = StepCoefs::default();
    for (k, &(c, t)) in terms.iter().enumerate() {
        slots[k] = Some(t);
        coefs.a[k] = c;
    }
    sampler_step(gpu, model_out, None, slots, &coefs, out, None)
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PosteriorParams {
    n: u32,
    latent_channels: u32,
    moment_pixels: u32,
    _pad: u32,
    scale: f32,
    shift: f32,
    _pad2: [f32; 2],
}

/// diffusers' `DiagonalGaussianDistribution(moments).sample(generator)`, then
/// `(z - shift_factor) * scaling_factor`, into `out`:
///
/// `out[b, y, x, c] = (mean + exp(0.5 * clamp(logvar, -30, 20)) * eps[b, y, x, c] - shift) * scale`
/// with `mean = moments[b % Bm, y, x, c]`, `logvar = moments[b % Bm, y, x, L + c]`.
///
/// `moments` is the VAE encoder's output [Bm, h, w, 2L] (mean channels, then logvar channels:
/// torch.chunk(moments, 2, dim=1) in NHWC) in the VAE's dtype; `eps` (the generator's draws,
/// reordered to NHWC) and `out` are [B, h, w, L] f32, the dtype the samplers keep latents in. B
/// must be a multiple of Bm: batch item b uses moments item b % Bm, i.e. one encoded init image
/// repeated over the batch (`torch.cat([latents] * k)`), each copy with its own noise.
pub fn posterior_sample(
    gpu: &Gpu,
    moments: &Tensor,
    eps: &Tensor,
    scaling_factor: f32,
    shift_factor: f32,
    out: &Tensor,
) -> Result<()> {
    const OP: &str = "posterior_sample";
    let (ms, es) = (moments.shape(), eps.shape());
    if ms.len() != 4 || ms[3] == 0 || !ms[3].is_multiple_of(2) {
        return Err(Error::shape(
            OP,
            format!("moments {moments:?} must be [B, h, w, 2·L] (L mean, then L logvar channels)"),
        ));
    }
    let l = ms[3] / 2;
    if es.len() != 4 || es[1..3] != ms[1..3] || es[3] != l || es[0] == 0 {
        return Err(Error::shape(
            OP,
            format!(
                "eps {eps:?} must be [B, {}, {}, {l}] for moments {moments:?}",
                ms[1], ms[2]
            ),
        ));
    }
    if ms[0] == 0 || !es[0].is_multiple_of(ms[0]) {
        return Err(Error::shape(
            OP,
            format!(
                "eps batch {} must be a multiple of the moments batch {} (the encoded images are \
                 repeated over the batch)",
                es[0], ms[0]
            ),
        ));
    }
    if eps.dtype() != DType::F32 || out.dtype() != DType::F32 || out.shape() != es {
        return Err(Error::shape(
            OP,
            format!("eps {eps:?} and out {out:?} must both be f32 and of the same shape"),
        ));
    }
    for (what, t) in [("moments", moments), ("eps", eps)] {
        if t.buffer_id() == out.buffer_id() {
            return Err(Error::shape(
                OP,
                format!("out shares its buffer with {what}: write the latents into a new tensor"),
            ));
        }
    }
    let n = out.numel();
    let too_large = || Error::shape(OP, format!("{out:?} is too large"));
    let params = PosteriorParams {
        n: u32::try_from(n).map_err(|_| too_large())?,
        latent_channels: l as u32,
        moment_pixels: u32::try_from(ms[0] * ms[1] * ms[2]).map_err(|_| too_large())?,
        _pad: 0,
        scale: scaling_factor,
        shift: shift_factor,
        _pad2: [0.0; 2],
    };
    gpu.dispatch(&Dispatch {
        shader: ShaderId::SamplerStep,
        entry: "posterior_sample",
        dtype: moments.dtype(),
        overrides: &[],
        tensors: &[moments, eps, out],
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d((n as u64).div_ceil(256)),
        label: "vae_posterior_sample",
        work: Work {
            flops: 6.0 * n as f64,
            bytes: (moments.size_bytes() + eps.size_bytes() + out.size_bytes()) as f64,
        },
    })
}

/// The specification of [`posterior_sample`] in f64: `moments` holds Bm items of [h, w, 2L] and
/// `eps` B items of [h, w, L] (NHWC, B a multiple of Bm); returns [B, h, w, L].
pub fn reference_posterior_sample(
    moments: &[f32],
    eps: &[f32],
    latent_channels: usize,
    scaling_factor: f32,
    shift_factor: f32,
) -> Vec<f64> {
    let l = latent_channels;
    let moment_pixels = moments.len() / (2 * l); // Bm * h * w
    eps.iter()
        .enumerate()
        .map(|(i, &e)| {
            let (pixel, c) = (i / l, i % l);
            let m = (pixel % moment_pixels) * 2 * l + c;
            let mean = moments[m] as f64;
            let logvar = (moments[m + l] as f64).clamp(-30.0, 20.0);
            let z = mean + (0.5 * logvar).exp() * e as f64;
            (z - shift_factor as f64) * scaling_factor as f64
        })
        .collect()
}

/// The specification of [`sampler_step`] in f64: `model_out` holds `2n` values `[uncond; cond]`
/// when `guidance` is given, `n` otherwise; each present slot holds `n` values. Returns
/// `(out_a, out_b)`; coefficients are used as the f32 values the GPU receives.
pub fn reference(
    model_out: &[f32],
    guidance: Option<f32>,
    slots: [Option<&[f32]>; 5],
    coefs: &StepCoefs,
) -> (Vec<f64>, Vec<f64>) {
    let n = if guidance.is_some() {
        model_out.len() / 2
    } else {
        model_out.len()
    };
    let mut out_a = Vec::with_capacity(n);
    let mut out_b = Vec::with_capacity(n);
    for i in 0..n {
        let eps = match guidance {
            Some(g) => {
                let (u, c) = (model_out[i] as f64, model_out[n + i] as f64);
                u + g as f64 * (c - u)
            }
            None => model_out[i] as f64,
        };
        let mut a = coefs.a_model as f64 * eps;
        let mut b = coefs.b_model as f64 * eps;
        for (k, slot) in slots.iter().enumerate() {
            if let Some(s) = slot {
                a += coefs.a[k] as f64 * s[i] as f64;
                b += coefs.b[k] as f64 * s[i] as f64;
            }
        }
        out_a.push(a);
        out_b.push(b);
    }
    (out_a, out_b)
}
