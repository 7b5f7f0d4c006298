//! `shaders/sampler_step.wgsl`: a sampler's whole per-step latent update as one dispatch —
//! classifier-free guidance fused with any linear combination of up to five same-shaped tensors.
//!
//! Every scheduler we port (DDIM, Euler, Euler a, Heun, DPM++ 2M, LMS, PNDM, DDPM) updates the
//! latents as `sum_i a_i * slot_i + a_model * eps`, with coefficients from the schedule (computed on
//! the CPU in f64) — and some need a second output (e.g. the denoised x0 or a derivative to keep),
//! given by the `b` coefficients.

use bytemuck::{Pod, Zeroable};

use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::{Error, Result};

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
        shader: "sampler_step",
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
