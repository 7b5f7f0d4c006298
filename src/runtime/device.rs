//! Adapter choice and feature/limit negotiation, done once when the engine starts.
//!
//! We ask for the adapter's own limits (not WebGPU's minimums) because SD tensors easily exceed
//! the default 128 MiB binding / 256 MiB buffer, and for every optional feature the kernels can use.

use crate::error::{Error, Result};
use crate::runtime::tensor::DType;

/// What the engine will do on the chosen adapter, decided once.
#[derive(Clone, Debug)]
pub struct Caps {
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    pub timestamps_inside_passes: bool,
    pub pipeline_cache: bool,
    /// Cooperative-matrix configurations the adapter offers (tensor cores on NVIDIA Vulkan).
    pub coop_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    /// Side of the largest square f16 × f16 → f32 configuration offered (16 on NVIDIA, 8 on
    /// lavapipe): the fragment our tensor-core kernels use. None: no such configuration.
    pub coop_f16_frag: Option<u32>,
    pub max_storage_binding: u64,
    pub max_buffer: u64,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    pub max_workgroups_per_dim: u32,
    pub min_uniform_offset_alignment: u32,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
}

impl Caps {
    /// The storage dtype for model activations and weights: f16 when the shader can use it.
    pub fn preferred_dtype(&self) -> DType {
        if self.shader_f16 {
            DType::F16
        } else {
            DType::F32
        }
    }
}

/// A short, printable description of one adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

impl AdapterSummary {
    pub fn from_info(index: usize, info: &wgpu::AdapterInfo) -> Self {
        AdapterSummary {
            index,
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
        }
    }
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] {} ({}, {}, {})",
            self.index, self.name, self.backend, self.device_type, self.driver
        )
    }
}

fn instance_for(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// Vulkan, Metal and DX12 adapters; GL only as a last resort when none of those exists (and only
/// then, because initialising GL needs a display server on Linux and prints errors without one).
/// `forced` (e.g. from `WGPU_BACKEND`) looks only there.
pub fn enumerate(forced: Option<wgpu::Backends>) -> Vec<wgpu::Adapter> {
    if let Some(backends) = forced {
        return pollster::block_on(instance_for(backends).enumerate_adapters(backends));
    }
    let primary = instance_for(wgpu::Backends::PRIMARY);
    let adapters = pollster::block_on(primary.enumerate_adapters(wgpu::Backends::all()));
    if !adapters.is_empty() {
        return adapters;
    }
    let gl = instance_for(wgpu::Backends::GL);
    pollster::block_on(gl.enumerate_adapters(wgpu::Backends::all()))
}

/// Lower is better: discrete, then integrated, then virtual, then CPU; GL after everything else.
fn rank_adapter(info: &wgpu::AdapterInfo) -> u32 {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let gl_penalty = if info.backend == wgpu::Backend::Gl {
        10
    } else {
        0
    };
    kind + gl_penalty
}

/// Pick an adapter: `requested` (name substring or index) wins, else the best-ranked one.
pub fn choose_adapter(
    adapters: Vec<wgpu::Adapter>,
    requested: Option<&str>,
) -> Result<wgpu::Adapter> {
    if adapters.is_empty() {
        return Err(Error::NoAdapter);
    }
    let summaries: Vec<String> = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| AdapterSummary::from_info(i, &a.get_info()).to_string())
        .collect();
    if let Some(req) = requested.map(str::trim).filter(|r| !r.is_empty()) {
        let pick = if let Ok(index) = req.parse::<usize>() {
            adapters.into_iter().nth(index)
        } else {
            let needle = req.to_lowercase();
            adapters
                .into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&needle))
        };
        return pick.ok_or(Error::AdapterNotFound {
            requested: req.to_string(),
            available: summaries,
        });
    }
    let mut adapters = adapters;
    adapters.sort_by_key(|a| rank_adapter(&a.get_info()));
    Ok(adapters.remove(0))
}

/// The optional features we request when offered; none is required.
pub fn wanted_features() -> wgpu::Features {
    wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
        | wgpu::Features::TIMESTAMP_QUERY
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
        | wgpu::Features::PIPELINE_CACHE
        | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
}

pub fn caps_for(adapter: &wgpu::Adapter, features: wgpu::Features, limits: &wgpu::Limits) -> Caps {
    let coop_matrix = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        adapter.cooperative_matrix_properties()
    } else {
        Vec::new()
    };
    let coop_f16_frag = coop_matrix
        .iter()
        .filter(|p| {
            p.m_size == p.n_size
                && p.n_size == p.k_size
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
        .map(|p| p.m_size)
        .max();
    Caps {
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
        subgroups: features.contains(wgpu::Features::SUBGROUP),
        timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        timestamps_inside_passes: features.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
        pipeline_cache: features.contains(wgpu::Features::PIPELINE_CACHE),
        coop_matrix,
        coop_f16_frag,
        max_storage_binding: limits.max_storage_buffer_binding_size,
        max_buffer: limits.max_buffer_size,
        max_workgroup_storage: limits.max_compute_workgroup_storage_size,
        max_invocations: limits.max_compute_invocations_per_workgroup,
        max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
        min_uniform_offset_alignment: limits.min_uniform_buffer_offset_alignment,
        subgroup_min_size: adapter.get_info().subgroup_min_size,
        subgroup_max_size: adapter.get_info().subgroup_max_size,
    }
}
