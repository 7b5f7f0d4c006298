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
        "peak_coop",
        include_str!("../shaders/peak_coop.wgsl"),
        &[DType::F16],
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
        "conv2d_coop",
        include_str!("../shaders/conv2d_coop.wgsl"),
        &[DType::F16],
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
        "attention_coop",
        include_str!("../shaders/attention_coop.wgsl"),
        &[DType::F16],
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
        "emphasis",
        include_str!("../shaders/emphasis.wgsl"),
        &[DType::F32, DType::F16],
    ),
    (
        "tiling",
        include_str!("../shaders/tiling.wgsl"),
        &[DType::F32, DType::F16],
    ),
];

/// (variant name, base shader name, text renamings applied to the base).
pub type Variant = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// Shaders compiled from another file's text with renamings: (name, base shader, [(from, to)]).
/// WGSL has no generics over cooperative-matrix shapes, so the 8×8 fragment variant of the
/// tensor-core matmul (what lavapipe offers, so CPU test machines run this path) is the 16×16
/// file with its types and fragment constant renamed.
pub const VARIANTS: &[Variant] = &[
    ("matmul_coop16", "matmul_coop", &[]),
    ("matmul_coop8", "matmul_coop", COOP_8X8),
    ("peak_coop16", "peak_coop", &[]),
    ("peak_coop8", "peak_coop", COOP_8X8),
    ("conv2d_coop16", "conv2d_coop", &[]),
    ("conv2d_coop8", "conv2d_coop", COOP_8X8),
    ("attention_coop16", "attention_coop", &[]),
    ("attention_coop8", "attention_coop", COOP_8X8),
];

/// The renaming that turns a 16×16-fragment kernel into its 8×8 variant.
const COOP_8X8: &[(&str, &str)] = &[
    ("coop_mat16x16", "coop_mat8x8"),
    ("const FRAG: u32 = 16u;", "const FRAG: u32 = 8u;"),
];

/// Whether a shader may be compiled without naga's runtime checks: every global access in it is
/// guarded by the shader itself and the test suite shows it gives the same bits with and without
/// the checks (tests/shader_checks.rs; the tensor-core matmul there too, where CI runs the suite
/// on a lavapipe that offers cooperative matrices). Every kernel qualifies today; a new kernel
/// starts out listed here until its tests have run both ways.
pub fn indexing_proven(name: &str) -> bool {
    const UNPROVEN: &[&str] = &[];
    !UNPROVEN.contains(&name)
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

/// The shader text for a registered name or a [`VARIANTS`] name (renamings applied).
fn variant_source(name: &str) -> Option<String> {
    if let Some(body) = source(name) {
        return Some(body.to_string());
    }
    let (_, base, renames) = VARIANTS.iter().find(|v| v.0 == name)?;
    let mut body = source(base)?.to_string();
    for (from, to) in *renames {
        debug_assert!(
            body.contains(from),
            "variant {name}: `{from}` not in {base}"
        );
        body = body.replace(from, to);
    }
    Some(body)
}

/// The dtypes a registered shader or variant is used with.
pub fn dtypes(name: &str) -> &'static [DType] {
    let base = VARIANTS.iter().find(|v| v.0 == name).map_or(name, |v| v.1);
    SHADERS.iter().find(|s| s.0 == base).map_or(&[], |s| s.2)
}

pub fn specialised_source(name: &str, dtype: DType) -> Option<String> {
    let body = variant_source(name)?;
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
