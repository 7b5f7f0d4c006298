//! `shaders/cast.wgsl`: storage dtype conversion (f32 <-> f16). The public entry point is
//! [`crate::kernels::elementwise::cast`]; this file holds the dispatch and the reference.

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::{DType, Error, Result};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    _pad: [u32; 3],
}

/// Record `out = x` converted to `out`'s dtype. Same dtypes fall back to a copy.
pub fn cast_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    if out.shape() != x.shape() {
        return Err(Error::shape(
            "cast",
            format!("output {out:?} must have the shape of {x:?}"),
        ));
    }
    if out.buffer_id() == x.buffer_id() {
        return Err(Error::shape("cast", "output must not alias the input"));
    }
    let entry = match (x.dtype(), out.dtype()) {
        (DType::F32, DType::F16) => "f32_to_f16",
        (DType::F16, DType::F32) => "f16_to_f32",
        _ => return crate::kernels::elementwise::copy_into(gpu, x, out),
    };
    let vecs = x.numel().div_ceil(4);
    let n = u32::try_from(vecs).map_err(|_| Error::shape("cast", format!("{x:?} is too large")))?;
    let params = Params { n, _pad: [0; 3] };
    gpu.dispatch(&Dispatch {
        shader: ShaderId::Cast,
        entry,
        // The shader is registered for the f16 prelude only (it names both types).
        dtype: DType::F16,
        overrides: &[],
        tensors: &[x, out],
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d((vecs as u64).div_ceil(256)),
        label: entry,
        work: Work {
            flops: 0.0,
            bytes: (x.size_bytes() + out.size_bytes()) as f64,
        },
    })
}

/// The specification: values rounded to `to` (round to nearest even for f16, overflow to inf).
pub fn reference(x: &[f32], to: DType) -> Vec<f64> {
    match to {
        DType::F32 => x.iter().map(|&v| v as f64).collect(),
        DType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f64()).collect(),
    }
}
