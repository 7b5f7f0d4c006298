//! Tensor-core (cooperative-matrix) planning shared by the matmul, conv2d and attention
//! kernels: whether the path runs on this adapter and with which fragments ([`coop_plan`],
//! [`CoopPlan`]), the two output tiles and how one is chosen ([`CoopTile`]); what is forced comes
//! from the engine's [`KernelPolicy`](crate::runtime::KernelPolicy). The kernels themselves stay
//! in their own files.

use crate::runtime::Gpu;
use crate::shaders::ShaderId;

/// How the tensor-core path runs on this adapter: `shaders/matmul_coop.wgsl` compiled for
/// `frag` × `frag` fragments (the `matmul_coop{frag}` variant) with subgroups of `subgroup`
/// invocations: 4 per workgroup and a 4·frag square output tile ([`CoopTile::T64`]), or 8 and
/// an 8·frag square tile ([`CoopTile::T128`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopPlan {
    pub frag: usize,
    pub subgroup: u32,
}

impl CoopPlan {
    /// Side of the 4-subgroup tile (64 at frag 16), which conv2d_coop shares.
    pub fn tile(self) -> usize {
        4 * self.frag
    }
    /// The variant of tensor-core shader `base` ([`ShaderId::MatmulCoop`], `Conv2dCoop`,
    /// `AttentionCoop`, `PeakCoop`) compiled for this fragment size. Passing another shader is a
    /// bug in this crate, not in the input.
    pub fn shader(self, base: ShaderId) -> ShaderId {
        base.coop_variant(self.frag)
            .unwrap_or_else(|| panic!("{base} has no tensor-core variants"))
    }
    /// Staged rows per invocation in `shaders/matmul_coop.wgsl` (either tile): the tile's
    /// side × 2f halves per K step in vec4 chunks, over 4 (or 8) subgroups, i.e. f² / (2 ·
    /// subgroup); `None` where that is not a whole number.
    pub fn matmul_staging_slots(self) -> Option<u32> {
        let chunks = (self.frag * self.frag) as u32;
        let per_pass = 2 * self.subgroup;
        (per_pass != 0 && chunks.is_multiple_of(per_pass)).then(|| chunks / per_pass)
    }
    /// Whether `shaders/matmul_coop.wgsl` can stage its tiles with this plan: its invocations
    /// own fixed staging slots (registers), 1, 2 or 4 rows each (16 × 16 fragments on 32- or
    /// 64-wide subgroups, 8 × 8 on 8-, 16- or 32-wide). Elsewhere the matmul runs the
    /// FMA kernel rather than a kernel that would stage only part of its tile.
    pub fn matmul_staging_fits(self) -> bool {
        matches!(self.matmul_staging_slots(), Some(1 | 2 | 4))
    }
    /// Workgroup memory the shader declares: two 4f × (2f + 8) f16 tiles and a 4f × 4f f32 tile.
    fn workgroup_bytes(self) -> u32 {
        CoopTile::T64.workgroup_bytes(self)
    }
}

pub use crate::runtime::policy::CoopTile;

impl CoopTile {
    /// Side of the square output tile in elements.
    pub fn side(self, plan: CoopPlan) -> usize {
        match self {
            CoopTile::T64 => 4 * plan.frag,
            CoopTile::T128 => 8 * plan.frag,
        }
    }
    /// Invocations per workgroup: 4 or 8 subgroups.
    pub fn invocations(self, plan: CoopPlan) -> u32 {
        match self {
            CoopTile::T64 => 4 * plan.subgroup,
            CoopTile::T128 => 8 * plan.subgroup,
        }
    }
    /// Workgroup memory of the tile's staging and accumulators, from the shader's own formulas
    /// (AS = 2f + 8 halves per staged row): T64 `a_sh`, `b_sh` (4f × AS f16 each) and `c_sh`
    /// (4f × 4f f32): 26 KiB at f = 16, 7 KiB at f = 8; T128 `a_shl`, `b_shl` (8f × AS f16
    /// each) and `c_shl` (8 subgroup slots of f × 2f f32): 36 KiB at f = 16, 10 KiB at f = 8.
    /// conv2d_coop declares the same arrays as the 64 tile.
    pub fn tile_bytes(self, plan: CoopPlan) -> u32 {
        let f = plan.frag as u32;
        let staged_row = 2 * f + 8;
        match self {
            CoopTile::T64 => 2 * (4 * f) * staged_row * 2 + (4 * f) * (4 * f) * 4,
            CoopTile::T128 => 2 * (8 * f) * staged_row * 2 + 8 * f * (2 * f) * 4,
        }
    }
    /// Workgroup memory matmul_coop's entry points declare: [`CoopTile::tile_bytes`] plus the
    /// LayerNorm-on-load row statistics both tiles share (`row_stats`, 8f vec4<f32>: 2 KiB at
    /// f = 16, 1 KiB at f = 8).
    pub fn workgroup_bytes(self, plan: CoopPlan) -> u32 {
        self.tile_bytes(plan) + 8 * plan.frag as u32 * 16
    }
    /// Whether this adapter can run the tile's workgroup (memory and invocations).
    pub fn fits(self, plan: CoopPlan, caps: &crate::runtime::Caps) -> bool {
        self.workgroup_bytes(plan) <= caps.max_workgroup_storage
            && self.invocations(plan) <= caps.max_invocations
    }
    /// The tile for `batch` GEMMs of `m` rows and `n_tile_cols` weight rows (2N for GEGLU):
    /// `forced` if given, else the large tile where it launches at least
    /// [`COOP_LARGE_TILE_MIN_GROUPS`] workgroups; below that the 64 tile's 4× more workgroups
    /// fill the GPU better. A tile the adapter cannot hold falls back to T64 (which
    /// [`coop_plan`] has checked).
    pub fn choose(
        plan: CoopPlan,
        caps: &crate::runtime::Caps,
        batch: usize,
        m: usize,
        n_tile_cols: usize,
        forced: Option<CoopTile>,
    ) -> CoopTile {
        let side = CoopTile::T128.side(plan);
        let groups = batch * m.div_ceil(side) * n_tile_cols.div_ceil(side);
        let tile = forced.unwrap_or(if groups >= COOP_LARGE_TILE_MIN_GROUPS {
            CoopTile::T128
        } else {
            CoopTile::T64
        });
        if tile.fits(plan, caps) {
            tile
        } else {
            CoopTile::T64
        }
    }
}

/// Workgroups below which the large tensor-core tile (conv2d_coop_l, linear_coop_l /
/// geglu_coop_l) splits K: about two per SM on an
/// H200's 132, enough that the last wave does not leave most of the GPU idle.
pub const SPLIT_K_TARGET_GROUPS: usize = 256;
/// The fewest K steps (2 · frag each) a split gets, so that its partial sums (4 bytes per
/// output per split, written and read once) stay small against its matrix work.
pub const SPLIT_K_MIN_STEPS: usize = 8;

/// K per split for a large-tile conv or linear of `tiles` workgroups and reduction length `k`, or None
/// to run unsplit: enough splits to reach [`SPLIT_K_TARGET_GROUPS`] workgroups, each at least
/// [`SPLIT_K_MIN_STEPS`] K steps long. SD 1.5 convs at 512²: the 8×8 level's 10 tiles × 26 splits,
/// the 16×16 level's 40 × 7, the 32×32 level's 80 × 4; the 64×64 level (192 tiles) unsplit.
pub fn split_k(plan: CoopPlan, tiles: usize, k: usize) -> Option<usize> {
    let step = 2 * plan.frag;
    let steps = k.div_ceil(step);
    if tiles >= SPLIT_K_TARGET_GROUPS / 2 {
        return None;
    }
    let splits = SPLIT_K_TARGET_GROUPS
        .div_ceil(tiles.max(1))
        .min(steps / SPLIT_K_MIN_STEPS);
    if splits < 2 {
        return None;
    }
    let chunk = steps.div_ceil(splits) * step;
    (k.div_ceil(chunk) > 1).then_some(chunk)
}

/// The tensor-core tile of `batch` GEMMs of `m` rows, `n_tile_cols` weight rows (2N for
/// GEGLU) and reduction length `k`, and its K per split where the large tile splits K: a single
/// GEMM (batch 1) whose large-tile grid is small ([`split_k`]; SD 1.5's 8×8, 16×16 and 32×32
/// projections and feed-forwards, M = 128-2048) runs the large tile over K splits plus a reduce
/// pass, rather than the 64 tile's 40-160 workgroups over all of K. A forced 64 tile never
/// splits; a forced large tile splits where [`split_k`] says; the f32 partial sums must fit one
/// storage binding. Otherwise [`CoopTile::choose`].
pub fn gemm_tile_and_split(
    plan: CoopPlan,
    caps: &crate::runtime::Caps,
    [batch, m, n_tile_cols, k]: [usize; 4],
    forced: Option<CoopTile>,
) -> (CoopTile, Option<usize>) {
    let tile = CoopTile::choose(plan, caps, batch, m, n_tile_cols, forced);
    if batch != 1 || forced == Some(CoopTile::T64) || !CoopTile::T128.fits(plan, caps) {
        return (tile, None);
    }
    let side = CoopTile::T128.side(plan);
    let tiles = m.div_ceil(side) * n_tile_cols.div_ceil(side);
    let partials_fit =
        |c: usize| (k.div_ceil(c) * m * n_tile_cols * 4) as u64 <= caps.max_storage_binding;
    match split_k(plan, tiles, k).filter(|&c| partials_fit(c)) {
        Some(chunk) => (CoopTile::T128, Some(chunk)),
        None => (tile, None),
    }
}

/// Workgroups of the 128 tile from which it beats the 64 tile. Measured on an NVIDIA H200
/// (132 SMs, 2026-12-04, `benches/RESULTS.md`): the 128 tile won every SD 1.5 shape with 40 or
/// more of its workgroups (8192×320×320: 53 against 73 µs; 512×1280×1280, 40 groups: 70
/// against 83 µs) and lost every shape with 12 or fewer (128×1280×1280: 72 against 46 µs).
/// The 1.6-2.2× rate of its 8 subgroups per tile outweighs an unfilled last wave long before
/// every SM has two workgroups.
pub const COOP_LARGE_TILE_MIN_GROUPS: usize = 32;

/// The forced tensor-core tile of this engine's policy (`LDM_COOP_TILE`), if any.
pub(crate) fn forced_coop_tile(gpu: &Gpu) -> Option<CoopTile> {
    gpu.policy().coop_tile
}

/// Whether the tensor-core path runs, and how. Needs f16 storage, a square f16 × f16 → f32
/// configuration of side 8 or 16, one fixed subgroup width (the work split assigns fragments by
/// subgroup id, so the workgroup must be exactly 4 subgroups) and enough workgroup memory for
/// the 64 tile; the large tile is used only where it fits too ([`CoopTile::choose`]).
/// The engine's [`KernelPolicy::tensor_cores`](crate::runtime::KernelPolicy) turns it off or
/// forces it on wherever it can run (`LDM_COOP_MATMUL=0|1`); by default it runs on GPUs that
/// offer 16×16 fragments and not on CPU adapters (lavapipe emulates the matrix ops: correct, but
/// slower than the FMA kernel there — the test suite forces it on to check it).
pub fn coop_plan(gpu: &Gpu, dtype: crate::DType) -> Option<CoopPlan> {
    let choice = gpu.policy().tensor_cores;
    let c = &gpu.caps;
    let plan = CoopPlan {
        frag: c.coop_f16_frag? as usize,
        subgroup: c.subgroup_min_size,
    };
    // Default: tensor cores proper (16×16 fragments: NVIDIA, AMD) on GPUs. 8×8 fragments
    // (lavapipe, Apple's simdgroup matrices) run only when asked for: their 4·8 = 32-wide tiles
    // stage as many bytes per multiply-add as our FMA kernels spend, so they are no clear win
    // without a measurement, and on CPUs the matrix ops are emulated.
    let wanted = choice.unwrap_or(gpu.adapter.device_type != "Cpu" && plan.frag == 16);
    let usable = wanted
        && dtype == crate::DType::F16
        && matches!(plan.frag, 8 | 16)
        && c.subgroups
        && c.subgroup_min_size == c.subgroup_max_size
        && (1..=64).contains(&c.subgroup_min_size)
        && 4 * c.subgroup_min_size <= c.max_invocations
        && c.max_workgroup_storage >= plan.workgroup_bytes();
    usable.then_some(plan)
}
