//! `shaders/peak.wgsl`: the device's measured FMA throughput and copy bandwidth, the
//! denominators of every "% of peak" the benchmarks print.

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::{DType, Error, Result};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n4: u32,
    iterations: u32,
    _pad: [u32; 2],
}

/// FLOPs one `fma_peak` dispatch performs.
pub fn fma_flops(workgroups: u32, iterations: u32) -> f64 {
    workgroups as f64 * 256.0 * iterations as f64 * 8.0 * 4.0 * 2.0
}

/// Record an FMA-throughput run of `workgroups` × 256 invocations.
pub fn fma_peak(gpu: &Gpu, scratch: &Tensor, workgroups: u32, iterations: u32) -> Result<()> {
    let n4 = (scratch.numel() / 4) as u32;
    if n4 == 0 {
        return Err(Error::shape(
            "fma_peak",
            "scratch tensor needs at least 4 elements",
        ));
    }
    let params = Params {
        n4,
        iterations,
        _pad: [0; 2],
    };
    gpu.dispatch(&Dispatch {
        shader: ShaderId::Peak,
        entry: "fma_peak",
        dtype: scratch.dtype(),
        overrides: &[],
        tensors: &[scratch, scratch],
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d(workgroups as u64),
        label: if scratch.dtype() == DType::F16 {
            "fma_peak_f16"
        } else {
            "fma_peak_f32"
        },
        work: Work {
            flops: fma_flops(workgroups, iterations),
            bytes: 0.0,
        },
    })
}

/// Record dst = src (same shape and dtype, element count a multiple of 4).
pub fn copy(gpu: &Gpu, src: &Tensor, dst: &Tensor) -> Result<()> {
    if src.numel() != dst.numel() || src.dtype() != dst.dtype() || !src.numel().is_multiple_of(4) {
        return Err(Error::shape(
            "copy",
            format!("{src:?} -> {dst:?} (equal, multiple of 4)"),
        ));
    }
    let n4 = (src.numel() / 4) as u32;
    let params = Params {
        n4,
        iterations: 0,
        _pad: [0; 2],
    };
    gpu.dispatch(&Dispatch {
        shader: ShaderId::Peak,
        entry: "copy",
        dtype: src.dtype(),
        overrides: &[],
        tensors: &[src, dst],
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d((n4 as u64).div_ceil(256)),
        label: "copy",
        work: Work {
            flops: 0.0,
            bytes: 2.0 * src.size_bytes() as f64,
        },
    })
}

/// FLOPs one `coop_peak` dispatch performs (4 subgroups × 4 chains of FRAG³ multiply-adds).
pub fn coop_flops(plan: crate::kernels::coop::CoopPlan, workgroups: u32, iterations: u32) -> f64 {
    let f = plan.frag as f64;
    workgroups as f64 * 4.0 * iterations as f64 * 4.0 * 2.0 * f * f * f
}

/// Record a tensor-core throughput run (`shaders/peak_coop.wgsl`) of `workgroups` workgroups of
/// 4 subgroups; `scratch` is any f32 tensor of at least 1 element (written only in theory).
pub fn coop_peak(
    gpu: &Gpu,
    plan: crate::kernels::coop::CoopPlan,
    scratch: &Tensor,
    workgroups: u32,
    iterations: u32,
) -> Result<()> {
    if scratch.dtype() != DType::F32 || scratch.numel() == 0 {
        return Err(Error::shape(
            "coop_peak",
            "scratch must be a non-empty f32 tensor",
        ));
    }
    let params = Params {
        n4: scratch.numel() as u32,
        iterations,
        _pad: [0; 2],
    };
    gpu.dispatch(&Dispatch {
        shader: plan.shader(ShaderId::PeakCoop),
        entry: "coop_peak",
        dtype: DType::F16,
        overrides: &[("SG", plan.subgroup as f64)],
        tensors: &[scratch, scratch],
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d(workgroups as u64),
        label: "coop_peak",
        work: Work {
            flops: coop_flops(plan, workgroups, iterations),
            bytes: 0.0,
        },
    })
}
