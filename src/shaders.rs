//! The shader registry ([`ShaderId`]): every `shaders/*.wgsl` file embedded at build time, specialised per
//! storage dtype by a one-line prelude, validated and reflected with naga.
//!
//! Specialisation: WGSL has no generics, so each kernel writes its storage type as `elem`
//! (and `elem4` for vec4 loads) and accumulates in `f32`; the prelude binds `elem` to f32 or f16.

use crate::runtime::tensor::DType;

/// Every shader we compile: the files in `shaders/` and the variants compiled from another file's
/// text with renamings. A typo in a shader name is a compile error, and the naga test walks
/// [`ShaderId::ALL`] (and checks that every file in `shaders/` is one of [`ShaderId::FILES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShaderId {
    Fill,
    Peak,
    PeakCoop,
    Matmul,
    MatmulCoop,
    Conv2d,
    Conv2dCoop,
    Norm,
    Attention,
    AttentionCoop,
    Elementwise,
    SamplerStep,
    Cast,
    Tiling,
    Emphasis,
    // Variants: WGSL has no generics over cooperative-matrix shapes, so the 8×8 fragment
    // variant of each tensor-core kernel (what lavapipe offers, so CPU test machines run this
    // path) is the 16×16 file with its types and fragment constant renamed.
    PeakCoop16,
    PeakCoop8,
    MatmulCoop16,
    MatmulCoop8,
    Conv2dCoop16,
    Conv2dCoop8,
    AttentionCoop16,
    AttentionCoop8,
}

/// The renaming that turns a 16×16-fragment kernel into its 8×8 variant.
const COOP_8X8: &[(&str, &str)] = &[
    ("coop_mat16x16", "coop_mat8x8"),
    ("const FRAG: u32 = 16u;", "const FRAG: u32 = 8u;"),
];

const BOTH: &[DType] = &[DType::F32, DType::F16];
const F16_ONLY: &[DType] = &[DType::F16];

impl ShaderId {
    /// The shader files, one per kernel family.
    pub const FILES: [ShaderId; 15] = [
        ShaderId::Fill,
        ShaderId::Peak,
        ShaderId::PeakCoop,
        ShaderId::Matmul,
        ShaderId::MatmulCoop,
        ShaderId::Conv2d,
        ShaderId::Conv2dCoop,
        ShaderId::Norm,
        ShaderId::Attention,
        ShaderId::AttentionCoop,
        ShaderId::Elementwise,
        ShaderId::SamplerStep,
        ShaderId::Cast,
        ShaderId::Tiling,
        ShaderId::Emphasis,
    ];
    /// The variants compiled from a file's text with renamings.
    pub const VARIANTS: [ShaderId; 8] = [
        ShaderId::PeakCoop16,
        ShaderId::PeakCoop8,
        ShaderId::MatmulCoop16,
        ShaderId::MatmulCoop8,
        ShaderId::Conv2dCoop16,
        ShaderId::Conv2dCoop8,
        ShaderId::AttentionCoop16,
        ShaderId::AttentionCoop8,
    ];
    /// Files, then variants.
    pub const ALL: [ShaderId; 23] = {
        let mut all = [ShaderId::Fill; 23];
        let mut i = 0;
        while i < 15 {
            all[i] = Self::FILES[i];
            i += 1;
        }
        while i < 23 {
            all[i] = Self::VARIANTS[i - 15];
            i += 1;
        }
        all
    };

    /// The name: the file stem for files (`matmul`), `{base}16` / `{base}8` for variants.
    pub fn name(self) -> &'static str {
        match self {
            ShaderId::Fill => "fill",
            ShaderId::Peak => "peak",
            ShaderId::PeakCoop => "peak_coop",
            ShaderId::Matmul => "matmul",
            ShaderId::MatmulCoop => "matmul_coop",
            ShaderId::Conv2d => "conv2d",
            ShaderId::Conv2dCoop => "conv2d_coop",
            ShaderId::Norm => "norm",
            ShaderId::Attention => "attention",
            ShaderId::AttentionCoop => "attention_coop",
            ShaderId::Elementwise => "elementwise",
            ShaderId::SamplerStep => "sampler_step",
            ShaderId::Cast => "cast",
            ShaderId::Tiling => "tiling",
            ShaderId::Emphasis => "emphasis",
            ShaderId::PeakCoop16 => "peak_coop16",
            ShaderId::PeakCoop8 => "peak_coop8",
            ShaderId::MatmulCoop16 => "matmul_coop16",
            ShaderId::MatmulCoop8 => "matmul_coop8",
            ShaderId::Conv2dCoop16 => "conv2d_coop16",
            ShaderId::Conv2dCoop8 => "conv2d_coop8",
            ShaderId::AttentionCoop16 => "attention_coop16",
            ShaderId::AttentionCoop8 => "attention_coop8",
        }
    }

    /// The shader of this name, if any.
    pub fn from_name(name: &str) -> Option<ShaderId> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// For a variant: the file it is compiled from and the renamings applied to that file's text.
    pub fn variant_of(self) -> Option<(ShaderId, &'static [(&'static str, &'static str)])> {
        match self {
            ShaderId::PeakCoop16 => Some((ShaderId::PeakCoop, &[])),
            ShaderId::PeakCoop8 => Some((ShaderId::PeakCoop, COOP_8X8)),
            ShaderId::MatmulCoop16 => Some((ShaderId::MatmulCoop, &[])),
            ShaderId::MatmulCoop8 => Some((ShaderId::MatmulCoop, COOP_8X8)),
            ShaderId::Conv2dCoop16 => Some((ShaderId::Conv2dCoop, &[])),
            ShaderId::Conv2dCoop8 => Some((ShaderId::Conv2dCoop, COOP_8X8)),
            ShaderId::AttentionCoop16 => Some((ShaderId::AttentionCoop, &[])),
            ShaderId::AttentionCoop8 => Some((ShaderId::AttentionCoop, COOP_8X8)),
            _ => None,
        }
    }

    /// The variant of a tensor-core file for `frag` × `frag` fragments (16 or 8).
    pub fn coop_variant(self, frag: usize) -> Option<ShaderId> {
        let sixteen = frag == 16;
        Some(match (self, sixteen) {
            (ShaderId::PeakCoop, true) => ShaderId::PeakCoop16,
            (ShaderId::PeakCoop, false) => ShaderId::PeakCoop8,
            (ShaderId::MatmulCoop, true) => ShaderId::MatmulCoop16,
            (ShaderId::MatmulCoop, false) => ShaderId::MatmulCoop8,
            (ShaderId::Conv2dCoop, true) => ShaderId::Conv2dCoop16,
            (ShaderId::Conv2dCoop, false) => ShaderId::Conv2dCoop8,
            (ShaderId::AttentionCoop, true) => ShaderId::AttentionCoop16,
            (ShaderId::AttentionCoop, false) => ShaderId::AttentionCoop8,
            _ => return None,
        })
    }

    /// The file's text (a variant's: its base file's, before renaming).
    pub fn file_source(self) -> &'static str {
        match self.variant_of().map_or(self, |v| v.0) {
            ShaderId::Fill => include_str!("../shaders/fill.wgsl"),
            ShaderId::Peak => include_str!("../shaders/peak.wgsl"),
            ShaderId::PeakCoop => include_str!("../shaders/peak_coop.wgsl"),
            ShaderId::Matmul => include_str!("../shaders/matmul.wgsl"),
            ShaderId::MatmulCoop => include_str!("../shaders/matmul_coop.wgsl"),
            ShaderId::Conv2d => include_str!("../shaders/conv2d.wgsl"),
            ShaderId::Conv2dCoop => include_str!("../shaders/conv2d_coop.wgsl"),
            ShaderId::Norm => include_str!("../shaders/norm.wgsl"),
            ShaderId::Attention => include_str!("../shaders/attention.wgsl"),
            ShaderId::AttentionCoop => include_str!("../shaders/attention_coop.wgsl"),
            ShaderId::Elementwise => include_str!("../shaders/elementwise.wgsl"),
            ShaderId::SamplerStep => include_str!("../shaders/sampler_step.wgsl"),
            ShaderId::Cast => include_str!("../shaders/cast.wgsl"),
            ShaderId::Tiling => include_str!("../shaders/tiling.wgsl"),
            ShaderId::Emphasis => include_str!("../shaders/emphasis.wgsl"),
            variant => unreachable!("{variant:?} is a variant"),
        }
    }

    /// The dtypes it is used with (the tensor-core kernels take f16 only, `cast` converts to
    /// and from f16).
    pub fn dtypes(self) -> &'static [DType] {
        match self.variant_of().map_or(self, |v| v.0) {
            ShaderId::PeakCoop
            | ShaderId::MatmulCoop
            | ShaderId::Conv2dCoop
            | ShaderId::AttentionCoop
            | ShaderId::Cast => F16_ONLY,
            _ => BOTH,
        }
    }
}

impl std::fmt::Display for ShaderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a shader may be compiled without naga's runtime checks: every global access in it is
/// guarded by the shader itself and the test suite shows it gives the same bits with and without
/// the checks (tests/shader_checks.rs; the tensor-core matmul there too, where CI runs the suite
/// on a lavapipe that offers cooperative matrices). Every kernel qualifies today; a new kernel
/// starts out listed here until its tests have run both ways.
pub fn indexing_proven(shader: ShaderId) -> bool {
    const UNPROVEN: &[ShaderId] = &[];
    !UNPROVEN.contains(&shader)
}

pub fn prelude(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "alias elem = f32;\nalias elem4 = vec4<f32>;\n",
        DType::F16 => "enable f16;\nalias elem = f16;\nalias elem4 = vec4<f16>;\n",
    }
}

/// The shader text for a file or a variant (renamings applied).
/// The section of `conv2d.wgsl` that `conv2d_coop.wgsl` shares: the GroupNorm partials
/// (producer epilogue, consumer prologue), one text for both convolution kernels.
fn conv2d_shared_section() -> &'static str {
    const START: &str = "// ------------------------------------------------------------------ GroupNorm partials (shared)";
    const END: &str = "// ------------------------------------------------------------------ end GroupNorm partials";
    let text = ShaderId::Conv2d.file_source();
    let start = text
        .find(START)
        .expect("conv2d.wgsl has its shared section");
    let end = text[start..]
        .find(END)
        .expect("conv2d.wgsl ends its shared section")
        + start;
    &text[start..end + END.len()]
}

fn variant_source(shader: ShaderId) -> String {
    let mut body = shader.file_source().to_string();
    if shader.variant_of().map_or(shader, |v| v.0) == ShaderId::Conv2dCoop {
        body.push('\n');
        body.push_str(conv2d_shared_section());
        body.push('\n');
    }
    if let Some((base, renames)) = shader.variant_of() {
        for (from, to) in renames {
            debug_assert!(
                body.contains(from),
                "variant {shader}: `{from}` not in {base}"
            );
            body = body.replace(from, to);
        }
    }
    body
}

pub fn specialised_source(shader: ShaderId, dtype: DType) -> String {
    let body = variant_source(shader);
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
    out
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
