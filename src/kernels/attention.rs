//! `shaders/attention.wgsl`: fused multi-head attention (FlashAttention-2 style, online softmax in
//! f32, the score matrix never materialised) for self-attention, cross-attention and the causal
//! CLIP text encoder.
//!
//! Ports the attention core of diffusers' `AttnProcessor2_0` (`F.scaled_dot_product_attention`
//! between `head_to_batch_dim` and `batch_to_head_dim`): q, k and v are read straight out of the
//! projection outputs through [`HeadsView`]s and the output comes back as `[B, Nq, heads·d]`.

use bytemuck::{Pod, Zeroable};

use crate::runtime::{Dispatch, Gpu, Tensor, Work};
use crate::{DType, Error, Result};

/// A `[B, N, row_stride]` tensor seen as heads: element (b, n, h, d) at
/// `b*N*row_stride + n*row_stride + offset + h*head_dim + d`.
/// This lets q, k, v come straight out of one fused QKV linear (`[B, N, 3C]` with offsets 0, C,
/// 2C) or separate tensors (`[B, N, C]`, offset 0).
#[derive(Clone, Copy)]
pub struct HeadsView<'a> {
    pub tensor: &'a Tensor,
    pub tokens: usize,
    pub row_stride: usize,
    pub offset: usize,
}

impl<'a> HeadsView<'a> {
    /// A contiguous `[B, N, C]` tensor (offset 0, row stride C = its last dimension).
    pub fn contiguous(tensor: &'a Tensor) -> Self {
        let shape = tensor.shape();
        let tokens = if shape.len() >= 2 {
            shape[shape.len() - 2]
        } else {
            1
        };
        HeadsView {
            tensor,
            tokens,
            row_stride: *shape.last().unwrap_or(&1),
            offset: 0,
        }
    }
}

/// SD 1.5 at 512×512 (64×64 latents) with classifier-free guidance (batch 2): every attention
/// call of one U-Net step, as (name, batch, heads, Nq, Nk, head_dim). Self-attention at 64², 32²,
/// 16² and the 8² mid block; cross-attention against the 77 CLIP tokens.
pub const SD15_SHAPES: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("self 64x64", 2, 8, 4096, 4096, 40),
    ("cross 64x64", 2, 8, 4096, 77, 40),
    ("self 32x32", 2, 8, 1024, 1024, 80),
    ("cross 32x32", 2, 8, 1024, 77, 80),
    ("self 16x16", 2, 8, 256, 256, 160),
    ("cross 16x16", 2, 8, 256, 77, 160),
    ("self 8x8 (mid)", 2, 8, 64, 64, 160),
    ("cross 8x8 (mid)", 2, 8, 64, 77, 160),
];

/// Largest head dimension the kernel takes.
pub const MAX_HEAD_DIM: usize = 256;

/// Invocations per workgroup (fixed in the shader).
const THREADS: u32 = 128;
/// o registers per row per invocation, in vec4s (`OV_MAX` in the shader).
const OV_MAX: u32 = 16;
/// NVIDIA's Vulkan driver caps workgroup memory at 48 KiB even where more is reported.
const SMEM_CAP: u64 = 48 * 1024;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    nq: u32,
    nk: u32,
    heads: u32,
    causal: u32,
    q_stride: u32,
    q_off: u32,
    k_stride: u32,
    k_off: u32,
    v_stride: u32,
    v_off: u32,
    scale_log2e: f32,
    _pad: u32,
}

/// How the 128 invocations of a workgroup split the work (override constants of the shader).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// Invocations sharing a row pair that split each key tile (tile = 8·key_lanes keys).
    pub key_lanes: u32,
    /// Invocations sharing a (row pair, key lane) that split the o accumulator along d (each
    /// computes the same scores).
    pub d_split: u32,
}

impl Config {
    /// Query rows per workgroup.
    pub fn block_rows(self) -> u32 {
        2 * THREADS / (self.key_lanes * self.d_split)
    }
    /// Whether the shader supports this split for `head_dim` (powers of two, at least two row
    /// groups, the o slice within the register budget).
    pub fn valid_for(self, head_dim: usize) -> bool {
        let pow2 = |x: u32| x.is_power_of_two();
        pow2(self.key_lanes)
            && self.key_lanes <= 8
            && pow2(self.d_split)
            && self.key_lanes * self.d_split <= THREADS / 2
            && (head_dim as u32).div_ceil(4).div_ceil(self.d_split) <= OV_MAX
    }
    /// Override constants for the shader.
    pub fn overrides(self, head_dim: usize) -> [(&'static str, f64); 3] {
        [
            ("HEAD_DIM", head_dim as f64),
            ("KEY_LANES", self.key_lanes as f64),
            ("D_SPLIT", self.d_split as f64),
        ]
    }
    /// Workgroup memory the shader declares for this head dimension, in bytes (mirrors the
    /// shader's override expressions).
    pub fn workgroup_bytes(self, head_dim: usize) -> u64 {
        let dv4 = (head_dim as u64).div_ceil(4);
        let ds = self.d_split as u64;
        let ov = dv4.div_ceil(ds);
        let bm = self.block_rows() as u64;
        let bn = 8 * self.key_lanes as u64;
        let qs = dv4 | 1;
        let kvs = dv4.max(ds * ov) | 1;
        let k_len = (bn * kvs).max(2 * THREADS as u64);
        (bm * qs + k_len + bn * kvs) * 16
    }
}

/// The split for a head dimension within `max_workgroup_bytes` of workgroup memory: the fewest
/// d parts whose o slice fits in registers (each extra part recomputes the scores); among those,
/// the most key lanes that stay within 32 KiB (more key lanes: fewer query rows per workgroup, a
/// smaller Q tile and more workgroups), else the one using the least memory (occupancy).
/// Untuned on real GPUs: the benches can try others through [`attention_into_with`].
pub fn config(head_dim: usize, max_workgroup_bytes: u64) -> Option<Config> {
    let limit = max_workgroup_bytes.min(SMEM_CAP);
    for d_split in [1u32, 2, 4, 8, 16, 32] {
        let fits: Vec<Config> = [8u32, 4, 2, 1]
            .into_iter()
            .map(|key_lanes| Config { key_lanes, d_split })
            .filter(|c| c.valid_for(head_dim) && c.workgroup_bytes(head_dim) <= limit)
            .collect();
        if let Some(c) = fits
            .iter()
            .find(|c| c.workgroup_bytes(head_dim) <= 32 * 1024)
        {
            return Some(*c);
        }
        if let Some(c) = fits.iter().min_by_key(|c| c.workgroup_bytes(head_dim)) {
            return Some(*c);
        }
    }
    None
}

fn check_view(
    op: &str,
    name: &str,
    view: &HeadsView,
    batch: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    if view.tokens == 0 {
        return Err(Error::shape(op, format!("{name} has 0 tokens")));
    }
    if view.offset + heads * head_dim > view.row_stride {
        return Err(Error::shape(
            op,
            format!(
                "{name}: offset {} + {heads} heads × {head_dim} exceeds the row stride {}",
                view.offset, view.row_stride
            ),
        ));
    }
    let needed = batch * view.tokens * view.row_stride;
    if view.tensor.numel() < needed {
        return Err(Error::shape(
            op,
            format!(
                "{name}: {:?} holds {} elements, the view [B={batch}, N={}, row_stride={}] needs {needed}",
                view.tensor,
                view.tensor.numel(),
                view.tokens,
                view.row_stride
            ),
        ));
    }
    if needed > u32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("{name}: {needed} elements exceed the shader's u32 indexing"),
        ));
    }
    Ok(())
}

/// softmax(q·kᵀ·scale [+ causal mask]) · v per (batch, head), into a new `[B, Nq, heads·head_dim]`
/// tensor. `scale` defaults to 1/sqrt(head_dim).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    q: HeadsView,
    k: HeadsView,
    v: HeadsView,
    batch: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
    scale: Option<f32>,
) -> Result<Tensor> {
    let out = gpu.empty(&[batch, q.tokens, heads * head_dim], q.tensor.dtype())?;
    attention_into(gpu, q, k, v, batch, heads, head_dim, causal, scale, &out)?;
    Ok(out)
}

/// [`attention`] into an existing `[B, Nq, heads·head_dim]` tensor (which must not be q, k or v).
#[allow(clippy::too_many_arguments)]
pub fn attention_into(
    gpu: &Gpu,
    q: HeadsView,
    k: HeadsView,
    v: HeadsView,
    batch: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
    scale: Option<f32>,
    out: &Tensor,
) -> Result<()> {
    let cfg = config(head_dim, gpu.caps.max_workgroup_storage as u64).ok_or_else(|| {
        Error::LimitExceeded {
            what: format!("attention workgroup memory for head_dim {head_dim}"),
            requested: Config {
                key_lanes: 1,
                d_split: 32,
            }
            .workgroup_bytes(head_dim),
            limit: gpu.caps.max_workgroup_storage as u64,
            hint: "this adapter has too little workgroup memory for the attention kernel".into(),
        }
    })?;
    attention_into_with(
        gpu, q, k, v, batch, heads, head_dim, causal, scale, out, cfg,
    )
}

/// [`attention_into`] with an explicit work split (for tests of every split, and tuning).
#[allow(clippy::too_many_arguments)]
pub fn attention_into_with(
    gpu: &Gpu,
    q: HeadsView,
    k: HeadsView,
    v: HeadsView,
    batch: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
    scale: Option<f32>,
    out: &Tensor,
    cfg: Config,
) -> Result<()> {
    const OP: &str = "attention";
    if batch == 0 || heads == 0 {
        return Err(Error::shape(
            OP,
            format!("batch {batch} and heads {heads} must be at least 1"),
        ));
    }
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(Error::shape(
            OP,
            format!("head_dim {head_dim} is outside 1..={MAX_HEAD_DIM}"),
        ));
    }
    check_view(OP, "q", &q, batch, heads, head_dim)?;
    check_view(OP, "k", &k, batch, heads, head_dim)?;
    check_view(OP, "v", &v, batch, heads, head_dim)?;
    if k.tokens != v.tokens {
        return Err(Error::shape(
            OP,
            format!("k has {} tokens but v has {}", k.tokens, v.tokens),
        ));
    }
    let dtype: DType = q.tensor.dtype();
    for (name, t) in [("k", k.tensor), ("v", v.tensor), ("out", out)] {
        if t.dtype() != dtype {
            return Err(Error::shape(
                OP,
                format!("{name} is {} but q is {}", t.dtype().name(), dtype.name()),
            ));
        }
    }
    let (nq, nk) = (q.tokens, k.tokens);
    let out_shape = [batch, nq, heads * head_dim];
    if out.numel() != batch * nq * heads * head_dim {
        return Err(Error::shape(
            OP,
            format!("out is {:?}, expected {:?}", out, out_shape),
        ));
    }
    if [q.tensor, k.tensor, v.tensor]
        .iter()
        .any(|t| t.buffer_id() == out.buffer_id())
    {
        return Err(Error::shape(OP, "out must not share its buffer with q, k or v (read-only and read-write bindings of one buffer)".to_string()));
    }
    let scale = scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !scale.is_finite() {
        return Err(Error::shape(OP, format!("scale {scale} is not finite")));
    }
    if !cfg.valid_for(head_dim) {
        return Err(Error::shape(
            OP,
            format!("{cfg:?} is not a valid split for head_dim {head_dim}"),
        ));
    }
    if cfg.workgroup_bytes(head_dim) > gpu.caps.max_workgroup_storage as u64 {
        return Err(Error::LimitExceeded {
            what: format!("attention {cfg:?} workgroup memory for head_dim {head_dim}"),
            requested: cfg.workgroup_bytes(head_dim),
            limit: gpu.caps.max_workgroup_storage as u64,
            hint: "use `config()` to pick a split that fits this adapter".into(),
        });
    }
    let block_rows = cfg.block_rows() as usize;
    let row_blocks = nq.div_ceil(block_rows);
    if row_blocks > u32::MAX as usize || batch * heads > gpu.caps.max_workgroups_per_dim as usize {
        return Err(Error::shape(
            OP,
            format!("{batch} × {heads} (batch × heads) exceeds the grid limit"),
        ));
    }
    let params = Params {
        nq: nq as u32,
        nk: nk as u32,
        heads: heads as u32,
        causal: causal as u32,
        q_stride: q.row_stride as u32,
        q_off: q.offset as u32,
        k_stride: k.row_stride as u32,
        k_off: k.offset as u32,
        v_stride: v.row_stride as u32,
        v_off: v.offset as u32,
        scale_log2e: scale * std::f32::consts::LOG2_E,
        _pad: 0,
    };
    // Causal: about half the score matrix is skipped.
    let pairs = (batch * heads) as f64 * nq as f64 * nk as f64 * if causal { 0.5 } else { 1.0 };
    let elem = dtype.size() as f64;
    let bytes = elem * (batch * (nq + 2 * nk) * heads * head_dim) as f64 + out.size_bytes() as f64;
    gpu.dispatch(&Dispatch {
        shader: "attention",
        entry: "attention",
        dtype,
        overrides: &cfg.overrides(head_dim),
        tensors: &[q.tensor, k.tensor, v.tensor, out],
        params: bytemuck::bytes_of(&params),
        workgroups: [row_blocks as u32, (batch * heads) as u32, 1],
        label: "attention",
        work: Work {
            flops: 4.0 * pairs * head_dim as f64,
            bytes,
        },
    })
}

/// The naive softmax(q·kᵀ·scale)·v in f64 — the specification. `q`, `k` and `v` are the whole
/// host tensors seen through the same (tokens, row_stride, offset) views as [`HeadsView`];
/// returns `[B, nq, heads·head_dim]`. The causal mask allows key j for query i iff j ≤ i.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    heads: usize,
    head_dim: usize,
    nq: usize,
    q_stride: usize,
    q_offset: usize,
    nk: usize,
    k_stride: usize,
    k_offset: usize,
    v_stride: usize,
    v_offset: usize,
    causal: bool,
    scale: Option<f32>,
) -> Vec<f64> {
    let scale = scale
        .map(f64::from)
        .unwrap_or(1.0 / (head_dim as f64).sqrt());
    let width = heads * head_dim;
    let mut out = vec![0.0f64; batch * nq * width];
    let mut scores = vec![0.0f64; nk];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..nq {
                let qi = b * nq * q_stride + i * q_stride + q_offset + h * head_dim;
                let allowed = if causal { nk.min(i + 1) } else { nk };
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate().take(allowed) {
                    let kj = b * nk * k_stride + j * k_stride + k_offset + h * head_dim;
                    let dot: f64 = (0..head_dim)
                        .map(|d| q[qi + d] as f64 * k[kj + d] as f64)
                        .sum();
                    *s = dot * scale;
                    max = max.max(*s);
                }
                let mut sum = 0.0;
                for s in scores.iter_mut().take(allowed) {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out[(b * nq + i) * width + h * head_dim..][..head_dim];
                for (j, p) in scores.iter().enumerate().take(allowed) {
                    let vj = b * nk * v_stride + j * v_stride + v_offset + h * head_dim;
                    for d in 0..head_dim {
                        o[d] += p / sum * v[vj + d] as f64;
                    }
                }
            }
        }
    }
    out
}
