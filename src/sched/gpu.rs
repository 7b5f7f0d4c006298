//! The GPU interpreter of a [`StepPlan`]: the sampler's buffers as f32 tensors, each
//! [`LinearStep`] one dispatch of the fused kernel ([`sampler_step::sampler_step`]), the swaps
//! as handle swaps. [`execute_on_cpu`](super::execute_on_cpu) is its specification.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use super::{apply_swaps, Buf, LinearStep, StepPlan};
use crate::kernels::sampler_step::{self, StepCoefs};
use crate::runtime::{Gpu, Tensor};
use crate::{DType, Error, Result};

/// Latent-sized f32 tensors owned by the sampler loop, for [`execute_on_gpu`] (the GPU twin of
/// [`CpuBuffers`](super::CpuBuffers)).
pub struct GpuBuffers {
    bufs: HashMap<Buf, Tensor>,
    /// The sampler's state buffers ([`GpuBuffers::reserve`]): allocated once, then written in
    /// place, so the loop takes nothing from the pool and returns nothing to it.
    reserved: Vec<Buf>,
}

impl GpuBuffers {
    /// Starts a loop from the (already `init_noise_sigma`-scaled or add_noise'd) latents,
    /// [B, h, w, L] f32.
    pub fn new(latents: Tensor) -> Self {
        let mut bufs = HashMap::new();
        bufs.insert(Buf::Latents, latents);
        GpuBuffers {
            bufs,
            reserved: Vec::new(),
        }
    }
    /// Allocates each of `state` not yet present (contents undefined: a plan writes a buffer
    /// before it reads it), so the loop's live buffers do not change from call to call. See
    /// [`Sampler::state_buffers`](super::Sampler::state_buffers).
    pub fn reserve(&mut self, gpu: &Gpu, state: &[Buf]) -> Result<()> {
        let shape = self.latents().shape().to_vec(); // [B, h, w, L]
        for &buf in state {
            if let Entry::Vacant(slot) = self.bufs.entry(buf) {
                slot.insert(gpu.empty(&shape, DType::F32)?);
            }
            if !self.reserved.contains(&buf) {
                self.reserved.push(buf);
            }
        }
        Ok(())
    }
    /// Removes `buf` to be overwritten when it is reserved and not among `inputs` (a plan's
    /// swaps keep every reserved buffer in the map: they exchange names, never drop).
    fn take_reserved(&mut self, buf: Buf, inputs: &[Option<Buf>]) -> Option<Tensor> {
        if !self.reserved.contains(&buf) || inputs.contains(&Some(buf)) {
            return None;
        }
        self.bufs.remove(&buf)
    }
    pub fn get(&self, buf: Buf) -> Option<&Tensor> {
        self.bufs.get(&buf)
    }
    pub fn latents(&self) -> &Tensor {
        &self.bufs[&Buf::Latents]
    }
    pub fn set(&mut self, buf: Buf, tensor: Tensor) {
        self.bufs.insert(buf, tensor);
    }
    /// Removes the latents (the loop's result); the other buffers stay.
    pub fn take_latents(&mut self) -> Tensor {
        self.bufs.remove(&Buf::Latents).expect("latents present")
    }
}

/// Runs `plan` on the GPU: records one fused dispatch per op (no submit), then swaps handles.
/// `model_out` is [B, h, w, L] f32, or [2B, h, w, L] (`[uncond; cond]`) with
/// `guidance = Some(g)`. Each op writes fresh tensors from the pool, or a reserved buffer it does
/// not read, so no output aliases an input.
pub fn execute_on_gpu(
    gpu: &Gpu,
    plan: &StepPlan,
    model_out: &Tensor,
    guidance: Option<f64>,
    bufs: &mut GpuBuffers,
) -> Result<()> {
    let shape = bufs.latents().shape().to_vec(); // [B, h, w, L]
    let guidance = guidance.map(|g| g as f32);
    for op in &plan.ops {
        // Outputs first: a reserved buffer the op does not read is overwritten in place.
        let out_a = match bufs.take_reserved(op.out_a, &op.inputs) {
            Some(t) => t,
            None => gpu.empty(&shape, DType::F32)?,
        };
        let out_b = match &op.b {
            Some(second) => Some(match bufs.take_reserved(second.out, &op.inputs) {
                Some(t) => t,
                None => gpu.empty(&shape, DType::F32)?,
            }),
            None => None,
        };
        let mut slots: [Option<&Tensor>; 5] = [None; 5];
        for (slot, buf) in slots.iter_mut().zip(&op.inputs) {
            if let Some(buf) = buf {
                *slot = Some(bufs.get(*buf).ok_or_else(|| {
                    Error::Device(format!("sampler read {:?} before writing it", Some(buf)))
                })?);
            }
        }
        sampler_step::sampler_step(
            gpu,
            model_out,
            guidance,
            slots,
            &step_coefs(op),
            &out_a,
            out_b.as_ref(),
        )?;
        bufs.set(op.out_a, out_a);
        if let (Some(second), Some(t)) = (&op.b, out_b) {
            bufs.set(second.out, t);
        }
    }
    apply_swaps(&mut bufs.bufs, &plan.swaps);
    Ok(())
}

/// The kernel's f32 coefficients of one op (the plan computes them in f64).
fn step_coefs(op: &LinearStep) -> StepCoefs {
    StepCoefs {
        a: op.a.map(|c| c as f32),
        a_model: op.a_model as f32,
        b: op
            .b
            .as_ref()
            .map(|s| s.b.map(|c| c as f32))
            .unwrap_or([0.0; 5]),
        b_model: op.b.as_ref().map(|s| s.b_model as f32).unwrap_or(0.0),
    }
}
