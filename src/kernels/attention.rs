//! `shaders/attention.wgsl` and `shaders/attention_coop.wgsl`: fused multi-head attention
//! (FlashAttention-2 style, online softmax in f32, the score matrix never materialised) for
//! self-attention, cross-attention and the causal CLIP text encoder.
//!
//! Ports the attention core of diffusers' `AttnProcessor2_0` (`F.scaled_dot_product_attention`
//! between `head_to_batch_dim` and `batch_to_head_dim`): q, k and v are read straight out of the
//! projection outputs through [`HeadsView`]s and the output comes back as `[B, Nq, heads·d]`.
//!
//! Two kernels, one contract: where the tensor-core matmul runs ([`coop::coop_plan`], f16
//! storage), `shaders/attention_coop.wgsl` computes Q·Kᵀ and P·V on cooperative matrices with the
//! tile shape [`coop_config`] picks for the head dim; elsewhere, and where no tile shape fits the
//! adapter's workgroup memory, the FMA kernel `shaders/attention.wgsl` with the split [`config`]
//! picks. Both follow [`reference`].

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::kernels::coop::{self, CoopPlan};
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

/// Tile shape of the tensor-core kernel (`shaders/attention_coop.wgsl`): BM query rows per
/// workgroup and BN keys per tile, both in fragments of the adapter's [`CoopPlan`] side, and
/// which of the shader's two entry points runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopConfig {
    /// Query rows per workgroup, in fragments (with `subgroup_rows`: subgroups per workgroup).
    pub row_frags: u32,
    /// Keys per K/V tile, in fragments.
    pub key_frags: u32,
    /// `attention_coop_rows`: each of the row_frags subgroups owns one fragment of query rows
    /// through both products, K and V are staged together. Otherwise `attention_coop`: 4
    /// subgroups share the block's fragments round-robin, K and V take turns in one array.
    pub subgroup_rows: bool,
}

const fn block_config(row_frags: u32, key_frags: u32) -> CoopConfig {
    CoopConfig {
        row_frags,
        key_frags,
        subgroup_rows: false,
    }
}

const fn rows_config(row_frags: u32, key_frags: u32) -> CoopConfig {
    CoopConfig {
        row_frags,
        key_frags,
        subgroup_rows: true,
    }
}

impl CoopConfig {
    /// The block kernel's shapes [`coop_config`] tries, best first (untuned on real GPUs): the
    /// largest BM·BN tile, then the most keys per tile (each tile costs four barriers and a load
    /// and store of the f32 O accumulator, so keys per tile amortise that), then more rows (each
    /// staged K/V tile serves more queries). 1 × 1 always fits where anything does.
    pub const CANDIDATES: [CoopConfig; 9] = [
        block_config(4, 4),
        block_config(2, 4),
        block_config(4, 2),
        block_config(2, 2),
        block_config(1, 4),
        block_config(1, 2),
        block_config(2, 1),
        block_config(4, 1),
        block_config(1, 1),
    ];

    /// The subgroup-owned-rows kernel's shapes, tried before [`CoopConfig::CANDIDATES`] (issue
    /// 21 item 5; predicted, not yet measured): the same order (largest BM·BN, then more keys),
    /// with 8-fragment key tiles for one-subgroup workgroups, whose staging then still serves
    /// a whole 128-key tile per barrier pair. At 16 × 16 fragments in 48 KiB: head dim 40 and
    /// 64 get 2 subgroups × 64 keys (37 and 45 KiB), 80 one subgroup × 64 keys, 160 one × 32.
    pub const ROWS_CANDIDATES: [CoopConfig; 8] = [
        rows_config(4, 4),
        rows_config(2, 4),
        rows_config(4, 2),
        rows_config(1, 8),
        rows_config(1, 4),
        rows_config(2, 2),
        rows_config(1, 2),
        rows_config(1, 1),
    ];

    /// The block shape small head dims try first among [`CoopConfig::CANDIDATES`]
    /// ([`coop_config`]): 1 × 2 fragments.
    pub const SMALL_HEAD: CoopConfig = block_config(1, 2);

    /// BM: query rows per workgroup.
    pub fn block_rows(self, plan: CoopPlan) -> u32 {
        self.row_frags * plan.frag as u32
    }
    /// BN: keys per tile.
    pub fn block_keys(self, plan: CoopPlan) -> u32 {
        self.key_frags * plan.frag as u32
    }
    /// Invocations per workgroup: 4 subgroups, or one per row fragment with `subgroup_rows`.
    pub fn invocations(self, plan: CoopPlan) -> u32 {
        if self.subgroup_rows {
            self.row_frags * plan.subgroup
        } else {
            4 * plan.subgroup
        }
    }
    /// Whether the shader supports this shape with this plan. Block kernel: the 4·SG
    /// invocations split into whole rows of T = 4·SG / BM softmax lanes, a power of two dividing
    /// SG so that a row's lanes are in one subgroup (they exchange max and sum with xor
    /// shuffles). Subgroup rows: a subgroup's SG lanes split into its FRAG rows (SG a multiple
    /// of FRAG, SG / FRAG a power of two), at most 4 subgroups.
    pub fn valid_for(self, plan: CoopPlan) -> bool {
        if self.row_frags == 0 || self.key_frags == 0 {
            return false;
        }
        if self.subgroup_rows {
            let (sg, frag) = (plan.subgroup, plan.frag as u32);
            return self.row_frags <= 4 && sg.is_multiple_of(frag) && (sg / frag).is_power_of_two();
        }
        let (bm, nt) = (self.block_rows(plan), 4 * plan.subgroup);
        nt % bm == 0 && (nt / bm).is_power_of_two() && plan.subgroup.is_multiple_of(nt / bm)
    }
    /// The entry point that runs this shape.
    pub fn entry(self) -> &'static str {
        if self.subgroup_rows {
            "attention_coop_rows"
        } else {
            "attention_coop"
        }
    }
    /// Override constants for the shader. `vec4`: every view row starts at a multiple of 4
    /// elements and head_dim % 4 == 0, so staging loads whole vec4s.
    pub fn overrides(
        self,
        plan: CoopPlan,
        head_dim: usize,
        vec4: bool,
    ) -> [(&'static str, f64); 6] {
        // RSG (subgroups per workgroup) is read by the rows entry point only.
        [
            ("SG", plan.subgroup as f64),
            ("HEAD_DIM", head_dim as f64),
            ("VEC4", vec4 as u8 as f64),
            ("BM", self.block_rows(plan) as f64),
            ("BN", self.block_keys(plan) as f64),
            ("RSG", self.row_frags as f64),
        ]
    }
    /// Workgroup memory the shader declares, in bytes (mirrors its override expressions), with
    /// DP = head_dim rounded up to the fragment side. Block kernel: q_sh BM·(DP+8) and kv_sh
    /// BN·(DP+8) halves, s_sh BM·(BN+4) floats, p_sh BM·(BN+8) halves, o_sh BM·(DP+4) floats.
    /// Subgroup rows: the same with separate K and V arrays (2·BN·(DP+8) halves).
    pub fn workgroup_bytes(self, frag: usize, head_dim: usize) -> u64 {
        let f = frag as u64;
        let dp = (head_dim as u64).div_ceil(f) * f;
        let (bm, bn) = (self.row_frags as u64 * f, self.key_frags as u64 * f);
        let kv_arrays = if self.subgroup_rows { 2 } else { 1 };
        let halves = bm * (dp + 8) + kv_arrays * bn * (dp + 8) + bm * (bn + 8);
        let floats = bm * (bn + 4) + bm * (dp + 4);
        2 * halves + 4 * floats
    }
}

/// The tensor-core tile shape for `head_dim` within `max_workgroup_bytes` (capped at NVIDIA's
/// 48 KiB): the first of [`CoopConfig::ROWS_CANDIDATES`] (the subgroup-owned-rows kernel) that
/// the plan supports and that fits; else the block kernel's, as before it existed: the first of
/// [`CoopConfig::CANDIDATES`] that fits. None: use the FMA kernel.
///
/// Why the rows kernel first (predicted from the H200 profile in benches/RESULTS.md, not yet
/// measured): the block kernel's 64×64-level self-attention ran at 19 TFLOP/s with four
/// workgroup barriers per 32-key tile and, at head dim 40, 2 score fragments and 3 output
/// fragments shared by 4 subgroups (a quarter to a half of them idle in each product). The rows
/// kernel gives every subgroup the same fragments (its own rows' 4 score and 3 output fragments
/// at 64 keys), stages K and V with one barrier pair per 64-key tile instead of two per 32, and
/// serves 32 query rows per staged tile instead of 16 (half the K/V traffic from L2). Expected:
/// ~1.5–2× on attention, 13.3 → ~7–9 ms per guided step.
///
/// For the block kernel, head dims of at most 3 fragments (SD 1.5's 40 at 16 × 16 fragments)
/// try [`CoopConfig::SMALL_HEAD`] first: measured on an NVIDIA H200 (2026-12-04,
/// benches/RESULTS.md), 16 rows × 32 keys ran the 64×64 level's self-attention in 2.14 ms
/// against 3.08 for the 32 × 64 the order picks, and its cross-attention in 0.095 against 0.181
/// ms; at 80 and 160 the order's pick was the fastest self-attention shape.
pub fn coop_config(
    plan: CoopPlan,
    head_dim: usize,
    max_workgroup_bytes: u64,
) -> Option<CoopConfig> {
    let limit = max_workgroup_bytes.min(SMEM_CAP);
    let small_head = head_dim.div_ceil(plan.frag) <= 3;
    let first = small_head.then_some(CoopConfig::SMALL_HEAD);
    let fits =
        |c: &CoopConfig| c.valid_for(plan) && c.workgroup_bytes(plan.frag, head_dim) <= limit;
    CoopConfig::ROWS_CANDIDATES
        .into_iter()
        .find(fits)
        .or_else(|| first.into_iter().chain(CoopConfig::CANDIDATES).find(fits))
}

/// The tensor-core kernel's plan and tile shape where it will run for this dtype and head dim
/// (f16 storage, [`coop::coop_plan`] on, a tile shape that fits); None where the FMA kernel
/// runs.
pub fn coop_choice(gpu: &Gpu, dtype: DType, head_dim: usize) -> Option<(CoopPlan, CoopConfig)> {
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return None;
    }
    let plan = coop::coop_plan(gpu, dtype)?;
    let cfg = coop_config(plan, head_dim, gpu.caps.max_workgroup_storage as u64)?;
    Some((plan, cfg))
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

/// One scaled-dot-product attention problem: softmax(q·kᵀ·scale [+ causal mask]) · v per
/// (batch, head), with q, k and v seen through views ([`HeadsView`] on the GPU, [`HostHeads`]
/// for the f64 [`Sdpa::reference`]). `scale` defaults to 1/sqrt(head_dim); the causal mask lets
/// query i see keys 0..=i.
#[derive(Clone, Copy, Debug)]
pub struct Sdpa<V> {
    pub q: V,
    pub k: V,
    pub v: V,
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: Option<f32>,
}

impl<'a> Sdpa<HeadsView<'a>> {
    /// Into a new `[B, Nq, heads·head_dim]` tensor.
    pub fn run(self, gpu: &Gpu) -> Result<Tensor> {
        let out = gpu.empty(
            &[self.batch, self.q.tokens, self.heads * self.head_dim],
            self.q.tensor.dtype(),
        )?;
        self.run_into(gpu, &out)?;
        Ok(out)
    }

    /// Into an existing `[B, Nq, heads·head_dim]` tensor (which must not be q, k or v). Runs
    /// the tensor-core kernel where [`coop_choice`] offers it, the FMA kernel otherwise.
    pub fn run_into(self, gpu: &Gpu, out: &Tensor) -> Result<()> {
        let head_dim = self.head_dim;
        if let Some((plan, cfg)) = coop_choice(gpu, self.q.tensor.dtype(), head_dim) {
            return Call::new(self, out)?.record_coop(gpu, plan, cfg);
        }
        let cfg = config(head_dim, gpu.caps.max_workgroup_storage as u64).ok_or_else(|| {
            Error::LimitExceeded {
                what: format!("attention workgroup memory for head_dim {head_dim}"),
                requested: Config {
                    key_lanes: 1,
                    d_split: 32,
                }
                .workgroup_bytes(head_dim),
                limit: gpu.caps.max_workgroup_storage as u64,
                hint: "this adapter has too little workgroup memory for the attention kernel"
                    .into(),
            }
        })?;
        self.run_into_with(gpu, out, cfg)
    }

    /// [`Sdpa::run_into`] on the FMA kernel with an explicit work split (for tests of every
    /// split, and tuning), whatever the adapter offers.
    pub fn run_into_with(self, gpu: &Gpu, out: &Tensor, cfg: Config) -> Result<()> {
        let head_dim = self.head_dim;
        let call = Call::new(self, out)?;
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
        call.record(
            gpu,
            ShaderId::Attention,
            "attention",
            &cfg.overrides(head_dim),
            cfg.block_rows() as usize,
        )
    }

    /// [`Sdpa::run_into`] on the tensor-core kernel with an explicit tile shape (for tests of
    /// every shape, and tuning). Errors where the tensor-core path is off ([`coop::coop_plan`]:
    /// f16 storage, an adapter offering square f16 fragments, the engine's policy) or the shape
    /// does not fit the adapter.
    pub fn run_coop_into_with(self, gpu: &Gpu, out: &Tensor, cfg: CoopConfig) -> Result<()> {
        let head_dim = self.head_dim;
        let call = Call::new(self, out)?;
        let Some(plan) = coop::coop_plan(gpu, call.dtype) else {
            return Err(Error::shape(
                OP,
                format!(
                    "the tensor-core kernel is not in use for {} on {} (f16 storage, cooperative \
                     matrices and the kernel policy decide)",
                    call.dtype.name(),
                    gpu.adapter
                ),
            ));
        };
        if !cfg.valid_for(plan) {
            return Err(Error::shape(
                OP,
                format!("{cfg:?} is not a valid tile shape for {plan:?}"),
            ));
        }
        let bytes = cfg.workgroup_bytes(plan.frag, head_dim);
        if bytes > gpu.caps.max_workgroup_storage as u64 {
            return Err(Error::LimitExceeded {
                what: format!("attention_coop {cfg:?} workgroup memory for head_dim {head_dim}"),
                requested: bytes,
                limit: gpu.caps.max_workgroup_storage as u64,
                hint: "use `coop_config()` to pick a tile shape that fits this adapter".into(),
            });
        }
        call.record_coop(gpu, plan, cfg)
    }
}

/// A host tensor seen as heads, like [`HeadsView`]: `data` holds `[B, tokens, row_stride]` and
/// each row's heads start at `offset`.
#[derive(Clone, Copy, Debug)]
pub struct HostHeads<'a> {
    pub data: &'a [f32],
    pub tokens: usize,
    pub row_stride: usize,
    pub offset: usize,
}

const OP: &str = "attention";

/// One validated attention call, ready to record on either kernel.
struct Call<'a> {
    q: HeadsView<'a>,
    k: HeadsView<'a>,
    v: HeadsView<'a>,
    batch: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
    out: &'a Tensor,
    dtype: DType,
}

impl<'a> Call<'a> {
    fn new(sdpa: Sdpa<HeadsView<'a>>, out: &'a Tensor) -> Result<Self> {
        let Sdpa {
            q,
            k,
            v,
            batch,
            heads,
            head_dim,
            causal,
            scale,
        } = sdpa;
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
        let nq = q.tokens;
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
        Ok(Call {
            q,
            k,
            v,
            batch,
            heads,
            head_dim,
            causal,
            scale,
            out,
            dtype,
        })
    }

    /// Whether every row of the three views starts at a multiple of 4 elements and head_dim is
    /// a multiple of 4 (the tensor-core kernel's VEC4 staging).
    fn vec4_aligned(&self) -> bool {
        self.head_dim.is_multiple_of(4)
            && [&self.q, &self.k, &self.v]
                .iter()
                .all(|v| v.row_stride.is_multiple_of(4) && v.offset.is_multiple_of(4))
    }

    fn record_coop(&self, gpu: &Gpu, plan: CoopPlan, cfg: CoopConfig) -> Result<()> {
        self.record(
            gpu,
            plan.shader(ShaderId::AttentionCoop),
            cfg.entry(),
            &cfg.overrides(plan, self.head_dim, self.vec4_aligned()),
            cfg.block_rows(plan) as usize,
        )
    }

    /// Record one dispatch of (ceil(Nq / block_rows), B·heads) workgroups.
    fn record(
        &self,
        gpu: &Gpu,
        shader: ShaderId,
        entry: &'static str,
        overrides: &[(&'static str, f64)],
        block_rows: usize,
    ) -> Result<()> {
        let (batch, heads, head_dim) = (self.batch, self.heads, self.head_dim);
        let (q, k, v) = (&self.q, &self.k, &self.v);
        let (nq, nk) = (q.tokens, k.tokens);
        let row_blocks = nq.div_ceil(block_rows);
        if row_blocks > u32::MAX as usize
            || batch * heads > gpu.caps.max_workgroups_per_dim as usize
        {
            return Err(Error::shape(
                OP,
                format!("{batch} × {heads} (batch × heads) exceeds the grid limit"),
            ));
        }
        let params = Params {
            nq: nq as u32,
            nk: nk as u32,
            heads: heads as u32,
            causal: self.causal as u32,
            q_stride: q.row_stride as u32,
            q_off: q.offset as u32,
            k_stride: k.row_stride as u32,
            k_off: k.offset as u32,
            v_stride: v.row_stride as u32,
            v_off: v.offset as u32,
            scale_log2e: self.scale * std::f32::consts::LOG2_E,
            _pad: 0,
        };
        // Causal: about half the score matrix is skipped.
        let pairs =
            (batch * heads) as f64 * nq as f64 * nk as f64 * if self.causal { 0.5 } else { 1.0 };
        let elem = self.dtype.size() as f64;
        let bytes =
            elem * (batch * (nq + 2 * nk) * heads * head_dim) as f64 + self.out.size_bytes() as f64;
        gpu.dispatch(&Dispatch {
            shader,
            entry,
            dtype: self.dtype,
            overrides,
            tensors: &[q.tensor, k.tensor, v.tensor, self.out],
            params: bytemuck::bytes_of(&params),
            workgroups: [row_blocks as u32, (batch * heads) as u32, 1],
            label: "attention",
            work: Work {
                flops: 4.0 * pairs * head_dim as f64,
                bytes,
            },
        })
    }
}

impl Sdpa<HostHeads<'_>> {
    /// The naive softmax(q·kᵀ·scale)·v in f64 — the specification, over the same views as the
    /// GPU kernel; returns `[B, nq, heads·head_dim]`. The causal mask allows key j for query i
    /// iff j ≤ i.
    pub fn reference(&self) -> Vec<f64> {
        let Sdpa {
            q,
            k,
            v,
            batch,
            heads,
            head_dim,
            causal,
            scale,
        } = *self;
        let (nq, q_stride, q_offset, q) = (q.tokens, q.row_stride, q.offset, q.data);
        let (nk, k_stride, k_offset, k) = (k.tokens, k.row_stride, k.offset, k.data);
        let (v_stride, v_offset, v) = (v.row_stride, v.offset, v.data);
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
}
