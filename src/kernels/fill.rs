//! `shaders/fill.wgsl`: set every element of a tensor to one value (NaN poisoning, zeroing).

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    bits: u32,
    _pad: [u32; 2],
}

/// Record `out[..] = value`.
pub fn fill(gpu: &Gpu, out: &Tensor, value: f32) -> Result<()> {
    let n = out.numel() as u32;
    let params = Params {
        n,
        bits: value.to_bits(),
        _pad: [0; 2],
    };
    gpu.dispatch(&Dispatch {
        shader: ShaderId::Fill,
        entry: "fill",
        dtype: out.dtype(),
        overrides: &[],
        tensors: &[out],
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d((n as u64).div_ceil(256)),
        label: "fill",
        work: Work {
            flops: 0.0,
            bytes: out.size_bytes() as f64,
        },
    })
}

/// A new tensor filled with NaN: tests poison outputs so unwritten elements fail.
pub fn poisoned(gpu: &Gpu, shape: &[usize], dtype: crate::DType) -> Result<Tensor> {
    let t = gpu.empty(shape, dtype)?;
    fill(gpu, &t, f32::NAN)?;
    Ok(t)
}
