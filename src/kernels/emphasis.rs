//! `shaders/emphasis.wgsl`: A1111's "Original" prompt emphasis on the text encoder's output:
//! weight each token row, then restore the chunk's mean (`modules/sd_emphasis.py`,
//! `EmphasisOriginal.after_transformers`).

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::error::Error;
use crate::runtime::{grid_1d, DType, Dispatch, Gpu, Tensor, Work};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    row_len: u32,
    groups: u32,
    _pad: u32,
}

/// Most workgroups of the summing pass (the apply pass reduces their partial sums in one
/// workgroup of 256 threads).
const MAX_GROUPS: usize = 256;

/// `z * w[row] * (mean(z) / mean(z * w))` for `z` of shape [.., rows, C] and `weights` one f32 per
/// row (all rows of all leading dimensions, in order): one chunk of one prompt, or a batch whose
/// mean is taken together, as A1111 does.
pub fn emphasis(gpu: &Gpu, z: &Tensor, weights: &[f32]) -> Result<Tensor> {
    let out = gpu.empty(z.shape(), z.dtype())?;
    emphasis_into(gpu, z, weights, &out)?;
    Ok(out)
}

/// [`emphasis`] into an existing tensor of `z`'s shape and dtype.
pub fn emphasis_into(gpu: &Gpu, z: &Tensor, weights: &[f32], out: &Tensor) -> Result<()> {
    let shape = z.shape();
    if out.shape() != shape || out.dtype() != z.dtype() || out.buffer_id() == z.buffer_id() {
        return Err(Error::shape(
            "emphasis",
            format!("output {out:?} for z {z:?}: same shape and dtype, another buffer"),
        ));
    }
    let row_len = *shape.last().unwrap_or(&0);
    let n = z.numel();
    if row_len == 0 || n / row_len != weights.len() || !n.is_multiple_of(row_len) {
        return Err(Error::shape(
            "emphasis",
            format!(
                "{} weights for z of shape {shape:?} (one per row of the last dimension)",
                weights.len()
            ),
        ));
    }
    if n > u32::MAX as usize {
        return Err(Error::shape(
            "emphasis",
            format!("{n} elements exceed u32 indexing"),
        ));
    }
    let w = gpu.upload(weights, &[weights.len()], DType::F32)?;
    let groups = n.div_ceil(256).clamp(1, MAX_GROUPS);
    let partial = gpu.empty(&[2 * groups], DType::F32)?;
    let params = Params {
        n: n as u32,
        row_len: row_len as u32,
        groups: groups as u32,
        _pad: 0,
    };
    let tensors = [z, &w, out, &partial];
    let (z_bytes, out_bytes) = (z.size_bytes() as f64, out.size_bytes() as f64);
    let passes = [
        ("emphasis_sums", [groups as u32, 1, 1], 3.0, z_bytes),
        (
            "emphasis_apply",
            grid_1d(n.div_ceil(256) as u64),
            2.0,
            z_bytes + out_bytes,
        ),
    ];
    for (entry, workgroups, flops_per_element, bytes) in passes {
        gpu.dispatch(&Dispatch {
            shader: ShaderId::Emphasis,
            entry,
            dtype: z.dtype(),
            overrides: &[],
            tensors: &tensors,
            params: bytemuck::bytes_of(&params),
            workgroups,
            label: entry,
            work: Work {
                flops: flops_per_element * n as f64,
                bytes,
            },
        })?;
    }
    Ok(())
}

/// The specification, in f64: `z` flattened, one weight per row of `row_len` elements.
pub fn reference(z: &[f32], weights: &[f32], row_len: usize) -> Vec<f64> {
    let weighted = |i: usize| z[i] as f64 * weights[i / row_len] as f64;
    let before: f64 = z.iter().map(|&v| v as f64).sum();
    let after: f64 = (0..z.len()).map(weighted).sum();
    (0..z.len())
        .map(|i| weighted(i) * (before / after))
        .collect()
}
