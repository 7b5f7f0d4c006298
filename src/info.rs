//! `ldm info`: every adapter, the chosen one, its features and limits, and the compute paths the
//! engine will take on it.

use crate::runtime::device::{self, AdapterSummary};
use crate::{DType, Gpu, GpuOptions, Result};

pub fn report(options: &GpuOptions) -> Result<String> {
    let mut out = String::from("adapters:\n");
    for (i, a) in device::enumerate(options.backends).iter().enumerate() {
        out += &format!("  {}\n", AdapterSummary::from_info(i, &a.get_info()));
    }
    let gpu = Gpu::new(options)?;
    let c = &gpu.caps;
    out += &format!("chosen: {}\n", gpu.adapter);
    out += &format!("features: {:?}\n", gpu.features);
    out += "limits:\n";
    out += &format!("  max_buffer_size                     {}\n", c.max_buffer);
    out += &format!(
        "  max_storage_buffer_binding_size     {}\n",
        c.max_storage_binding
    );
    out += &format!(
        "  max_compute_workgroup_storage_size  {}\n",
        c.max_workgroup_storage
    );
    out += &format!(
        "  max_compute_invocations_per_workgroup {}\n",
        c.max_invocations
    );
    out += &format!(
        "  max_compute_workgroups_per_dimension {}\n",
        c.max_workgroups_per_dim
    );
    out += &format!(
        "  subgroup size                       {}..{}\n",
        c.subgroup_min_size, c.subgroup_max_size
    );
    out += "cooperative matrix configurations:\n";
    if c.coop_matrix.is_empty() {
        out += "  none\n";
    }
    for p in &c.coop_matrix {
        out += &format!(
            "  {}x{}x{} {:?} x {:?} -> {:?}{}\n",
            p.m_size,
            p.n_size,
            p.k_size,
            p.ab_type,
            p.ab_type,
            p.cr_type,
            if p.saturating_accumulation {
                " (saturating)"
            } else {
                ""
            }
        );
    }
    out += "compute paths:\n";
    out += &format!("  storage dtype      {}\n", gpu.compute_dtype().name());
    out += &format!(
        "  subgroups          {}\n",
        if c.subgroups { "yes" } else { "no" }
    );
    out += &format!(
        "  tensor cores       {}\n",
        match crate::kernels::coop::coop_plan(&gpu, DType::F16) {
            Some(p) => format!(
                "yes: matmul ({}² and {}² tiles), conv2d ({}² tile, split K on small grids) \
                 and attention on coop_mat{f}x{f}<f16>, f32 accumulators, {}-wide subgroups",
                4 * p.frag,
                8 * p.frag,
                crate::kernels::conv2d::coop_conv_tile(p, &gpu.caps, 0, 0, None).side(p),
                p.subgroup,
                f = p.frag
            ),
            None => match c.coop_f16_frag {
                Some(f) => format!(
                    "no (offers {f}x{f} f16; off here, LDM_COOP_MATMUL=1 forces it): FMA kernels"
                ),
                None => "no: tiled FMA kernels".to_string(),
            },
        }
    );
    out += &format!(
        "  GPU timestamps     {}\n",
        if c.timestamps {
            "yes (--profile)"
        } else {
            "no (--profile unavailable)"
        }
    );
    out += &format!(
        "  pipeline cache     {}\n",
        if c.pipeline_cache { "yes" } else { "no" }
    );
    out += &format!(
        "  bounds checks      {}\n",
        if gpu.shader_checks_everywhere() {
            "on in every shader (LDM_SHADER_CHECKS=1)"
        } else {
            "only in shaders with unproven indexing (LDM_SHADER_CHECKS=1: everywhere)"
        }
    );
    out += &format!("  kernel policy      {}\n", gpu.policy().summary());
    Ok(out)
}
