//! `shaders/norm.wgsl`: GroupNorm (+ fused SiLU) and LayerNorm on channels-last tensors.
//!
//! GroupNorm is split in two dispatches so that a few (batch, group) pairs still fill the GPU:
//! partial statistics per (batch, group, chunk of rows) into a small f32 scratch tensor, then
//! merge-and-normalise with the same many workgroups. See the shader header for the numerics.
//! [`group_norm_concat`] normalises the channel concatenation of two tensors without building it.

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::{DType, Error, Result};

/// Values one group-norm workgroup (256 threads) reduces at least: 8 per thread keeps the grid in
/// the thousands of workgroups for U-Net shapes (2×64×64×320, G=32: 1280 workgroups).
const GN_MIN_VALUES_PER_WORKGROUP: usize = 2048;
/// Beyond ~4096 workgroups (the VAE's 512×512×128: 33M values) each one takes more values instead,
/// so that the per-workgroup merge of every chunk's partial stays a few % of its own traffic.
const GN_TARGET_WORKGROUPS: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    channels: u32,
    groups: u32,
    cpg: u32,
    rows_per_chunk: u32,
    chunks: u32,
    silu: u32,
    eps: f32,
    ca: u32,
    cb: u32,
}

fn check_affine(op: &str, x: &Tensor, c: usize, gamma: &Tensor, beta: &Tensor) -> Result<()> {
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if t.numel() != c || t.dtype() != x.dtype() {
            return Err(Error::shape(
                op,
                format!(
                    "{name} {t:?} must have {c} elements (the channel count of {x:?}) and dtype {}",
                    x.dtype().name()
                ),
            ));
        }
    }
    Ok(())
}

fn check_out(op: &str, x: &Tensor, out: &Tensor) -> Result<()> {
    if out.shape() != x.shape() || out.dtype() != x.dtype() {
        return Err(Error::shape(
            op,
            format!("output {out:?} must match input {x:?}"),
        ));
    }
    if out.buffer_id() == x.buffer_id() {
        return Err(Error::shape(
            op,
            "output must not alias the input (use a separate tensor)",
        ));
    }
    Ok(())
}

fn u32_of(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::shape(op, format!("{what} = {v} does not fit in u32")))
}

/// One torch GroupNorm (+ optional fused SiLU) with its affine parameters: groups of C/G
/// consecutive channels, f32 statistics over (spatial × C/G) per (batch, group), biased variance,
/// `y = (x-mean)/sqrt(var+eps)*gamma[c]+beta[c]`, then SiLU if `silu`. `gamma`/`beta` are [C] in
/// the input's dtype.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormOp<'a> {
    pub groups: usize,
    pub eps: f32,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub silu: bool,
}

impl GroupNormOp<'_> {
    /// On NHWC `x` [B, ..spatial.., C] (spatial dims flattened; also [B, N, C] token tensors).
    pub fn run(self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let out = gpu.empty(x.shape(), x.dtype())?;
        self.run_into(gpu, x, &out)?;
        Ok(out)
    }

    /// [`GroupNormOp::run`] into a caller-provided `out` (same shape and dtype as `x`, not
    /// aliasing it).
    pub fn run_into(self, gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
        const OP: &str = "group_norm";
        let shape = x.shape();
        if shape.len() < 2 {
            return Err(Error::shape(OP, format!("input {x:?} must be [B, ..., C]")));
        }
        let c = shape[shape.len() - 1];
        check_groups(OP, x, c, self.groups)?;
        check_affine(OP, x, c, self.gamma, self.beta)?;
        check_out(OP, x, out)?;
        record_group_norm(gpu, OP, &self, (x, None), out)
    }

    /// Of the channel concatenation `cat([a, b], dim=C)` without materialising it: `a` is
    /// [B, ..spatial.., Ca], `b` [B, ..spatial.., Cb] (same leading dims and dtype), the result
    /// [B, ..spatial.., Ca + Cb] equals [`GroupNormOp::run`] of the concatenation, groups of
    /// (Ca + Cb) / G channels included when they straddle the a/b boundary; `gamma`/`beta` are
    /// [Ca + Cb]. This is the first op of a diffusers up-block ResnetBlock2D, whose input is
    /// `torch.cat([h, skip], 1)`.
    pub fn run_concat(self, gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut shape = a.shape().to_vec();
        if let (Some(c), Some(&cb)) = (shape.last_mut(), b.shape().last()) {
            *c += cb;
        }
        let out = gpu.empty(&shape, a.dtype())?;
        self.run_concat_into(gpu, a, b, &out)?;
        Ok(out)
    }

    /// [`GroupNormOp::run_concat`] into a caller-provided `out` ([B, ..., Ca + Cb], aliasing
    /// neither input).
    pub fn run_concat_into(self, gpu: &Gpu, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
        const OP: &str = "group_norm_concat";
        let (sa, sb) = (a.shape(), b.shape());
        if sa.len() < 2 || sa.len() != sb.len() || sa[..sa.len() - 1] != sb[..sb.len() - 1] {
            return Err(Error::shape(
                OP,
                format!("inputs {a:?} and {b:?} must be [B, ..., Ca] and [B, ..., Cb]"),
            ));
        }
        if a.dtype() != b.dtype() {
            return Err(Error::shape(
                OP,
                format!("inputs {a:?} and {b:?} must share a dtype"),
            ));
        }
        let c = sa[sa.len() - 1] + sb[sb.len() - 1];
        let mut shape = sa.to_vec();
        *shape.last_mut().expect("rank checked") = c;
        check_groups(OP, a, c, self.groups)?;
        check_affine(OP, a, c, self.gamma, self.beta)?;
        if out.shape() != shape.as_slice() || out.dtype() != a.dtype() {
            return Err(Error::shape(
                OP,
                format!(
                    "output {out:?} must be {shape:?} {} (the concatenation of {a:?} and {b:?})",
                    a.dtype().name()
                ),
            ));
        }
        if out.buffer_id() == a.buffer_id() || out.buffer_id() == b.buffer_id() {
            return Err(Error::shape(
                OP,
                "output must not alias an input (use a separate tensor)",
            ));
        }
        record_group_norm(gpu, OP, &self, (a, Some(b)), out)
    }
}

/// Values per (batch, group) up to which `gn_stats` reduces a whole group in one workgroup (one
/// dispatch); larger groups (the VAE's at 256² and 512²) take the split path, `gn_partial` over
/// chunks then `gn_affine` (two dispatches), so that one workgroup does not serialise a group of
/// millions of values. SD 1.5's largest U-Net group is 64·64·30 = 122,880 values.
pub const GN_STATS_ONE_PASS_MAX: usize = 1 << 17;

impl GroupNormOp<'_> {
    /// The statistics of this GroupNorm over `x` [B, ..spatial.., Ca] — or over the channel
    /// concatenation `cat([x, x_b], dim=C)` when `x_b` [B, ..spatial.., Cb] is given — as the
    /// per-(batch, channel) affine table a consumer applies while it loads x (conv2d's
    /// [`FusedNorm`](crate::kernels::conv2d::FusedNorm)): `table` [B, C, 2] f32 holds
    /// (scale, shift) = (gamma·rstd, beta − mean·gamma·rstd), so that norm(x) = x·scale + shift.
    /// `silu` is the consumer's to apply. f32 statistics, the numerics of [`GroupNormOp::run`]
    /// (see the shader header); [`reference_group_norm_table`] is the specification.
    pub fn stats_into(
        self,
        gpu: &Gpu,
        x: &Tensor,
        x_b: Option<&Tensor>,
        table: &Tensor,
    ) -> Result<()> {
        const OP: &str = "group_norm_stats";
        let shape = stats_shape(OP, x, x_b)?;
        let (b, c) = (shape[0], shape[shape.len() - 1]);
        check_groups(OP, x, c, self.groups)?;
        check_affine(OP, x, c, self.gamma, self.beta)?;
        if table.shape() != [b, c, 2] || table.dtype() != DType::F32 {
            return Err(Error::shape(
                OP,
                format!("table {table:?} must be [{b}, {c}, 2] f32"),
            ));
        }
        let numel: usize = shape.iter().product();
        if numel == 0 {
            return Ok(());
        }
        let ca = x.shape()[x.shape().len() - 1];
        let (params, grid) = gn_params(gpu, OP, &self, &shape, ca)?;
        let group_values = numel / (b * self.groups);
        let concat = [("CONCAT", if x_b.is_some() { 1.0 } else { 0.0 })];
        let x_bytes = x.size_bytes() as f64 + x_b.map_or(0.0, |t| t.size_bytes() as f64);
        // Bindings 3 (y) and 4 (partial) are not read by gn_stats; x fills their slots.
        let stats_grid = [grid[0], 1, grid[2]];
        if group_values <= GN_STATS_ONE_PASS_MAX {
            let tensors = [x, self.gamma, self.beta, x, x, x_b.unwrap_or(x), x, table];
            return gpu.dispatch(&Dispatch {
                shader: ShaderId::Norm,
                entry: "gn_stats",
                dtype: x.dtype(),
                overrides: &concat,
                tensors: &tensors,
                params: bytemuck::bytes_of(&params),
                workgroups: stats_grid,
                label: "group_norm_table",
                work: Work {
                    flops: 5.0 * numel as f64,
                    bytes: 2.0 * x_bytes + table.size_bytes() as f64,
                },
            });
        }
        let chunks = params.chunks as usize;
        let partial = gpu.empty(&[b * self.groups * chunks * 2], DType::F32)?;
        let tensors = [
            x,
            self.gamma,
            self.beta,
            x,
            &partial,
            x_b.unwrap_or(x),
            x,
            table,
        ];
        gpu.dispatch(&Dispatch {
            shader: ShaderId::Norm,
            entry: "gn_partial",
            dtype: x.dtype(),
            overrides: &concat,
            tensors: &tensors,
            params: bytemuck::bytes_of(&params),
            workgroups: grid,
            label: "group_norm_table_partial",
            work: Work {
                flops: 3.0 * numel as f64,
                bytes: x_bytes + partial.size_bytes() as f64,
            },
        })?;
        gpu.dispatch(&Dispatch {
            shader: ShaderId::Norm,
            entry: "gn_affine",
            dtype: x.dtype(),
            overrides: &concat,
            tensors: &tensors,
            params: bytemuck::bytes_of(&params),
            workgroups: stats_grid,
            label: "group_norm_table",
            work: Work {
                flops: 8.0 * (b * self.groups * chunks) as f64,
                bytes: partial.size_bytes() as f64 + table.size_bytes() as f64,
            },
        })
    }

    /// [`GroupNormOp::stats_into`] into a new [B, C, 2] f32 table.
    pub fn stats(self, gpu: &Gpu, x: &Tensor, x_b: Option<&Tensor>) -> Result<Tensor> {
        let shape = stats_shape("group_norm_stats", x, x_b)?;
        let table = gpu.empty(&[shape[0], shape[shape.len() - 1], 2], DType::F32)?;
        self.stats_into(gpu, x, x_b, &table)?;
        Ok(table)
    }
}

/// The logical input shape of [`GroupNormOp::stats_into`]: x's, or that of cat([x, x_b], dim=C).
fn stats_shape(op: &str, x: &Tensor, x_b: Option<&Tensor>) -> Result<Vec<usize>> {
    let sa = x.shape();
    if sa.len() < 2 {
        return Err(Error::shape(op, format!("input {x:?} must be [B, ..., C]")));
    }
    let mut shape = sa.to_vec();
    if let Some(b) = x_b {
        let sb = b.shape();
        if sa.len() != sb.len()
            || sa[..sa.len() - 1] != sb[..sb.len() - 1]
            || x.dtype() != b.dtype()
        {
            return Err(Error::shape(
                op,
                format!(
                    "inputs {x:?} and {b:?} must be [B, ..., Ca] and [B, ..., Cb] of one dtype"
                ),
            ));
        }
        *shape.last_mut().expect("rank checked") += sb[sb.len() - 1];
    }
    Ok(shape)
}

/// The specification of [`GroupNormOp::stats_into`]: f64 two-pass statistics per (batch, group)
/// of `x` [B, ..., C] (`shape`), as [B, C, 2] (scale, shift) = (gamma·rstd, beta − mean·scale).
pub fn reference_group_norm_table(
    x: &[f32],
    shape: &[usize],
    groups: usize,
    eps: f32,
    gamma: &[f32],
    beta: &[f32],
) -> Vec<f64> {
    let (b, c) = (shape[0], shape[shape.len() - 1]);
    let rows = x.len() / (b * c);
    let cpg = c / groups;
    let mut table = vec![0.0f64; b * c * 2];
    for bi in 0..b {
        for g in 0..groups {
            let values = || {
                (0..rows).flat_map(move |r| {
                    (0..cpg).map(move |j| x[(bi * rows + r) * c + g * cpg + j] as f64)
                })
            };
            let n = (rows * cpg) as f64;
            let mean = values().sum::<f64>() / n;
            let var = values().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for j in 0..cpg {
                let ch = g * cpg + j;
                let scale = gamma[ch] as f64 * rstd;
                table[(bi * c + ch) * 2] = scale;
                table[(bi * c + ch) * 2 + 1] = beta[ch] as f64 - mean * scale;
            }
        }
    }
    table
}

/// [`GroupNormOp::run`] as a function.
pub fn group_norm(
    gpu: &Gpu,
    x: &Tensor,
    groups: usize,
    eps: f32,
    gamma: &Tensor,
    beta: &Tensor,
    silu: bool,
) -> Result<Tensor> {
    GroupNormOp {
        groups,
        eps,
        gamma,
        beta,
        silu,
    }
    .run(gpu, x)
}

fn check_groups(op: &str, x: &Tensor, c: usize, groups: usize) -> Result<()> {
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(Error::shape(
            op,
            format!("{c} channels of {x:?} are not divisible into {groups} groups"),
        ));
    }
    Ok(())
}

/// The uniform parameters of group norm over a logical [B, R, C] (`shape`) whose first `ca`
/// channels come from the first source, and the grid (G, chunks, B) of the chunked kernels.
fn gn_params(
    gpu: &Gpu,
    op: &str,
    norm: &GroupNormOp<'_>,
    shape: &[usize],
    ca: usize,
) -> Result<(Params, [u32; 3])> {
    let numel: usize = shape.iter().product();
    let groups = norm.groups;
    let (b, c) = (shape[0], shape[shape.len() - 1]);
    let rows = numel / (b * c);
    let cpg = c / groups;
    let per_workgroup = GN_MIN_VALUES_PER_WORKGROUP.max(numel.div_ceil(GN_TARGET_WORKGROUPS));
    let rows_per_chunk = per_workgroup.div_ceil(cpg).min(rows);
    let chunks = rows.div_ceil(rows_per_chunk);
    let max_dim = gpu.caps.max_workgroups_per_dim as usize;
    if groups > max_dim || chunks > max_dim || b > max_dim {
        return Err(Error::shape(
            op,
            format!("grid ({groups}, {chunks}, {b}) exceeds {max_dim} workgroups per dimension"),
        ));
    }
    u32_of(op, "elements", numel)?;
    let params = Params {
        rows: rows as u32,
        channels: c as u32,
        groups: groups as u32,
        cpg: cpg as u32,
        rows_per_chunk: rows_per_chunk as u32,
        chunks: chunks as u32,
        silu: norm.silu as u32,
        eps: norm.eps,
        ca: ca as u32,
        cb: (c - ca) as u32,
    };
    Ok((params, [groups as u32, chunks as u32, b as u32]))
}

/// Records both group-norm dispatches over `out` [B, R, C] once the shapes are checked: the input
/// is `x`, or `cat(x, x_b)` along channels when `x_b` is given.
fn record_group_norm(
    gpu: &Gpu,
    op: &str,
    norm: &GroupNormOp<'_>,
    (x, x_b): (&Tensor, Option<&Tensor>),
    out: &Tensor,
) -> Result<()> {
    let GroupNormOp {
        groups,
        gamma,
        beta,
        silu,
        ..
    } = *norm;
    if out.numel() == 0 {
        return Ok(());
    }
    let shape = out.shape();
    let b = shape[0];
    let ca = x.shape()[x.shape().len() - 1];
    let (params, workgroups) = gn_params(gpu, op, norm, shape, ca)?;
    let chunks = params.chunks as usize;
    // Scratch: (mean, M2) per (b, g, chunk). Dropping it after recording is safe: the pool may hand
    // the buffer to a later tensor, whose commands are recorded (and so run) after these.
    let partial = gpu.empty(&[b * groups * chunks * 2], DType::F32)?;
    // Single-source mode binds x again as the unused second source (two read-only bindings of one
    // buffer are legal; read-only + read-write would not be).
    let tensors = [x, gamma, beta, out, &partial, x_b.unwrap_or(x)];
    let concat = [("CONCAT", if x_b.is_some() { 1.0 } else { 0.0 })];
    let bytes = out.size_bytes() as f64;
    gpu.dispatch(&Dispatch {
        shader: ShaderId::Norm,
        entry: "gn_partial",
        dtype: x.dtype(),
        overrides: &concat,
        tensors: &tensors,
        params: bytemuck::bytes_of(&params),
        workgroups,
        label: if x_b.is_some() {
            "group_norm_concat_stats"
        } else {
            "group_norm_stats"
        },
        work: Work {
            flops: 3.0 * out.numel() as f64,
            bytes: bytes + partial.size_bytes() as f64,
        },
    })?;
    gpu.dispatch(&Dispatch {
        shader: ShaderId::Norm,
        entry: "gn_normalize",
        dtype: x.dtype(),
        overrides: &concat,
        tensors: &tensors,
        params: bytemuck::bytes_of(&params),
        workgroups,
        label: match (x_b.is_some(), silu) {
            (false, false) => "group_norm",
            (false, true) => "group_norm_silu",
            (true, false) => "group_norm_concat",
            (true, true) => "group_norm_concat_silu",
        },
        work: Work {
            flops: (if silu { 8.0 } else { 4.0 }) * out.numel() as f64,
            bytes: 2.0 * bytes + (b * groups * chunks) as f64 * 8.0 * (chunks as f64),
        },
    })
}

/// torch LayerNorm over the last dim (biased variance); `gamma`/`beta` are [C] in x's dtype.
pub fn layer_norm(
    gpu: &Gpu,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let out = gpu.empty(x.shape(), x.dtype())?;
    layer_norm_into(gpu, x, gamma, beta, eps, &out)?;
    Ok(out)
}

/// [`layer_norm`] into a caller-provided `out` (same shape and dtype as `x`, not aliasing it).
pub fn layer_norm_into(
    gpu: &Gpu,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    out: &Tensor,
) -> Result<()> {
    const OP: &str = "layer_norm";
    let Some(&c) = x.shape().last() else {
        return Err(Error::shape(
            OP,
            format!("input {x:?} has no last dimension"),
        ));
    };
    check_affine(OP, x, c, gamma, beta)?;
    check_out(OP, x, out)?;
    if x.numel() == 0 {
        return Ok(());
    }
    u32_of(OP, "elements", x.numel())?;
    let rows = x.numel() / c;
    let params = Params {
        rows: rows as u32,
        channels: c as u32,
        groups: 1,
        cpg: c as u32,
        rows_per_chunk: 1,
        chunks: 1,
        silu: 0,
        eps,
        ca: c as u32,
        cb: 0,
    };
    gpu.dispatch(&Dispatch {
        shader: ShaderId::Norm,
        entry: "layer_norm",
        dtype: x.dtype(),
        overrides: &[],
        tensors: &[x, gamma, beta, out],
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d(rows as u64),
        label: "layer_norm",
        work: Work {
            flops: 7.0 * x.numel() as f64,
            bytes: 2.0 * x.size_bytes() as f64,
        },
    })
}

/// The specification of [`group_norm`]: `x` is [B, ..., C] row-major with `shape`; f64 two-pass
/// statistics per (batch, group).
pub fn reference_group_norm(
    x: &[f32],
    shape: &[usize],
    groups: usize,
    eps: f32,
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
) -> Vec<f64> {
    let (b, c) = (shape[0], shape[shape.len() - 1]);
    let rows = x.len() / (b * c);
    let cpg = c / groups;
    let mut y = vec![0.0f64; x.len()];
    for bi in 0..b {
        for g in 0..groups {
            let idx = |r: usize, j: usize| (bi * rows + r) * c + g * cpg + j;
            let n = (rows * cpg) as f64;
            let mut sum = 0.0;
            for r in 0..rows {
                for j in 0..cpg {
                    sum += x[idx(r, j)] as f64;
                }
            }
            let mean = sum / n;
            let mut sq = 0.0;
            for r in 0..rows {
                for j in 0..cpg {
                    let d = x[idx(r, j)] as f64 - mean;
                    sq += d * d;
                }
            }
            let rstd = 1.0 / (sq / n + eps as f64).sqrt();
            for r in 0..rows {
                for j in 0..cpg {
                    let ch = g * cpg + j;
                    let v =
                        (x[idx(r, j)] as f64 - mean) * rstd * gamma[ch] as f64 + beta[ch] as f64;
                    y[idx(r, j)] = if silu { v / (1.0 + (-v).exp()) } else { v };
                }
            }
        }
    }
    y
}

/// Host-side group-norm parameters for the references.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormHost<'a> {
    pub groups: usize,
    pub eps: f32,
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub silu: bool,
}

/// The specification of [`GroupNormOp::run_concat`]: [`reference_group_norm`] of the
/// concatenation, built on the host. `shape` is the output's [B, ..., Ca + Cb]; `a` holds the
/// rows of `ca` channels, `b` the rows of the remaining ones.
pub fn reference_group_norm_concat(
    (a, b): (&[f32], &[f32]),
    shape: &[usize],
    ca: usize,
    p: &GroupNormHost<'_>,
) -> Vec<f64> {
    let GroupNormHost {
        groups,
        eps,
        gamma,
        beta,
        silu,
    } = *p;
    let c = shape[shape.len() - 1];
    let cb = c - ca;
    let rows = shape.iter().product::<usize>() / c.max(1);
    let mut cat = Vec::with_capacity(rows * c);
    for r in 0..rows {
        cat.extend_from_slice(&a[r * ca..(r + 1) * ca]);
        cat.extend_from_slice(&b[r * cb..(r + 1) * cb]);
    }
    reference_group_norm(&cat, shape, groups, eps, gamma, beta, silu)
}

/// The specification of [`layer_norm`]: `x` is rows of `c` values.
pub fn reference_layer_norm(
    x: &[f32],
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(c) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (j, &v) in row.iter().enumerate() {
            y.push((v as f64 - mean) * rstd * gamma[j] as f64 + beta[j] as f64);
        }
    }
    y
}
