//! The shader registry: every `shaders/*.wgsl` file embedded at build time, specialised per
//! storage dtype by a one-line prelude, validated and reflected with naga.
//!
//! Specialisation: WGSL has no generics, so each kernel writes its storage type as `elem`
//! (and `elem4` for vec4 loads) and accumulates in `f32`; the prelude binds `elem` to f32 or f16.

use crate::runtime::tensor::DType;

/// (name, source, dtypes it is used with). The naga test walks this table, and checks that every
/// file in `shaders/` appears in it.
pub const SHADERS: &[(&str, &str, &[DType])] = &[
    (
        "fill",
        include_str!("../shaders/fill.wgsl"),
        &[DType::F32, DType::F16],
    ),
    (
        "peak",
        include_str!("../shaders/peak.wgsl"),
        &[DType::F32, DType::F16],
    ),
    (
        "matmul",
        include_str!("../shaders/matmul.wgsl"),
        &[DType::F32, DType::F16],
    ),
    (
        "matmul_coop",
        include_str!("../shaders/matmul_coop.wgsl"),
        &[DType::F16],
    ),
    (
        "conv2d",
        include_str!("../shaders/conv2d.wgsl"),
        &[DType::F32, DType::F16],
    ),
    (
        "norm",
        include_str!("../shaders/norm.wgsl"),
        &[DType::F32, DType::F16],
    ),
    (
        "attention",
        include_str!("../shaders/attention.wgsl"),
        &[DType::F32, DType::F16],
    ),
    (
        "elementwise",
        include_str!("../shaders/elementwise.wgsl"),
        &[DType::F32, DType::F16],
    ),
    (
        "sampler_step",
        include_str!("../shaders/sampler_step.wgsl"),
        &[DType::F32, DType::F16],
    ),
    ("cast", include_str!("../shaders/cast.wgsl"), &[DType::F16]),
    (
        "tiling",
        include_str!("../shaders/tiling.wgsl"),
        &[DType::F32, DType::F16],
    ),
];

/// Whether a shader may be compiled without naga's runtime checks: every global access in it is
/// guarded by the shader itself and the test suite shows it gives the same bits with and without
/// the checks (tests/shader_checks.rs). The cooperative-matrix matmul is not: it has never run
/// on an adapter that offers cooperative matrices, so it keeps the checks until it has.
pub fn indexing_proven(name: &str) -> bool {
    name != "matmul_coop"
}

pub fn prelude(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "alias elem = f32;\nalias elem4 = vec4<f32>;\n",
        DType::F16 => "enable f16;\nalias elem = f16;\nalias elem4 = vec4<f16>;\n",
    }
}

pub fn source(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|s| s.0 == name).map(|s| s.1)
}

pub fn specialised_source(name: &str, dtype: DType) -> Option<String> {
    let body = source(name)?;
    // `enable` directives must come first in WGSL: hoist the shader's own ones above the prelude.
    let (enables, rest): (Vec<&str>, Vec<&str>) = body
        .lines()
        .partition(|l| l.trim_start().starts_with("enable "));
    let mut out = String::new();
    let mut prelude = prelude(dtype).to_string();
    for e in enables {
        if !prelude.contains(e.trim()) {
            out += e.trim();
            out += "\n";
        }
    }
    if let Some(stripped) = prelude.strip_prefix("enable f16;\n") {
        out.insert_str(0, "enable f16;\n");
        prelude = stripped.to_string();
    }
    out += &prelude;
    out += &rest.join("\n");
    Some(out)
}

/// naga's validator with every capability our kernels may use; the device decides at run time.
pub fn validator() -> naga::valid::Validator {
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
}

/// Parse and validate; the error text is naga's, with source locations.
pub fn validate(source: &str) -> Result<(naga::Module, naga::valid::ModuleInfo), String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    let info = validator()
        .validate(&module)
        .map_err(|e| e.emit_to_string(source))?;
    Ok((module, info))
}

/// How an entry point uses one binding of group 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindingKind {
    StorageRead,
    StorageReadWrite,
    Uniform,
}

/// Bindings of group 0 that `entry` actually uses, sorted by binding number. We build explicit
/// bind-group layouts from this so an entry point may ignore some of its file's bindings.
pub fn reflect(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
) -> Option<Vec<(u32, BindingKind)>> {
    let index = module.entry_points.iter().position(|e| e.name == entry)?;
    let fi = info.get_entry_point(index);
    let mut out = Vec::new();
    for (handle, var) in module.global_variables.iter() {
        let Some(binding) = &var.binding else {
            continue;
        };
        if binding.group != 0 || fi[handle].is_empty() {
            continue;
        }
        let kind = match var.space {
            naga::AddressSpace::Uniform => BindingKind::Uniform,
            naga::AddressSpace::Storage { access } => {
                if access.contains(naga::StorageAccess::STORE) {
                    BindingKind::StorageReadWrite
                } else {
                    BindingKind::StorageRead
                }
            }
            _ => continue,
        };
        out.push((binding.binding, kind));
    }
    out.sort_by_key(|b| b.0);
    Some(out)
}
