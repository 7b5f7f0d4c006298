//! Compiled pipelines, cached by (shader, entry point, dtype, override constants) so that
//! nothing compiles inside the denoising loop. wgpu does not deduplicate pipelines itself.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::runtime::tensor::DType;
use crate::shaders::{self, BindingKind, ShaderId};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub shader: ShaderId,
    pub entry: &'static str,
    pub dtype: DType,
    /// Override constants, as (name, value bits) so the key is hashable.
    pub overrides: Vec<(&'static str, u64)>,
}

pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    /// Group-0 bindings the entry point uses, from naga reflection.
    pub bindings: Vec<(u32, BindingKind)>,
}

#[derive(Default)]
pub(crate) struct PipelineCache {
    pub(crate) pipelines: HashMap<PipelineKey, Arc<Pipeline>>,
    modules:
        HashMap<(ShaderId, DType), (wgpu::ShaderModule, naga::Module, naga::valid::ModuleInfo)>,
    pub(crate) compiled: u64,
    /// Compile naga's runtime checks (index clamping, loop bounding) into every shader, not only
    /// into the ones whose indexing is unproven ([`crate::runtime::KernelPolicy::shader_checks`]).
    ///
    /// By default they are compiled only into shaders whose indexing the test suite has not
    /// proven ([`crate::shaders::indexing_proven`]). The checks clamp every workgroup- and
    /// local-array index and give every loop an extra counter on Vulkan; public reports measure
    /// 1.5x on a matmul and far more on loop-heavy kernels. Our kernels guard every global load
    /// and store explicitly (edges are loaded as zeros, stores test bounds), and
    /// `tests/shader_checks.rs` runs them with and without the checks on awkward sizes and
    /// demands identical bits: a kernel that relied on clamping would differ there. The switch
    /// exists to rule the checks out when chasing a suspected bug.
    pub(crate) all_checks: bool,
}

impl PipelineCache {
    pub(crate) fn new(all_checks: bool) -> Self {
        PipelineCache {
            all_checks,
            ..Default::default()
        }
    }

    pub(crate) fn get(
        &mut self,
        device: &wgpu::Device,
        cache: Option<&wgpu::PipelineCache>,
        key: &PipelineKey,
    ) -> Result<Arc<Pipeline>> {
        if let Some(p) = self.pipelines.get(key) {
            return Ok(p.clone());
        }
        let shader_err = |message: String| Error::Shader {
            name: key.shader.to_string(),
            entry: key.entry.to_string(),
            message,
        };
        if let std::collections::hash_map::Entry::Vacant(e) =
            self.modules.entry((key.shader, key.dtype))
        {
            let source = shaders::specialised_source(key.shader, key.dtype);
            // Validate with naga first: wgpu would report the same error asynchronously and
            // without the shader's name.
            let (naga_module, naga_info) = shaders::validate(&source).map_err(shader_err)?;
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some(key.shader.name()),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            };
            let module = if !self.all_checks && shaders::indexing_proven(key.shader) {
                // SAFETY: the shader guards every global access itself and its workgroup-array
                // indices are bounded by construction; tests/shader_checks.rs shows identical
                // results with and without naga's checks on awkward sizes, and the kernel tests
                // run it unchecked on NaN-poisoned outputs.
                unsafe {
                    device
                        .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
                }
            } else {
                device.create_shader_module(desc)
            };
            e.insert((module, naga_module, naga_info));
        }
        let (module, naga_module, naga_info) = &self.modules[&(key.shader, key.dtype)];
        let bindings = shaders::reflect(naga_module, naga_info, key.entry)
            .ok_or_else(|| shader_err("no such entry point".into()))?;
        let layout_entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .map(|&(binding, kind)| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match kind {
                    BindingKind::Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    BindingKind::StorageRead | BindingKind::StorageReadWrite => {
                        wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage {
                                read_only: kind == BindingKind::StorageRead,
                            },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        }
                    }
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(key.entry),
            entries: &layout_entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(key.entry),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let constants: Vec<(&str, f64)> = key
            .overrides
            .iter()
            .map(|(n, v)| (*n, f64::from_bits(*v)))
            .collect();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key.entry),
            layout: Some(&pipeline_layout),
            module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                // Our kernels write every workgroup tile before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(shader_err(e.to_string()));
        }
        let p = Arc::new(Pipeline {
            pipeline,
            layout,
            bindings,
        });
        self.compiled += 1;
        self.pipelines.insert(key.clone(), p.clone());
        Ok(p)
    }
}
