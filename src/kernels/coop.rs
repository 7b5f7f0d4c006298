//! Tensor-core (cooperative-matrix) planning shared by the matmul, conv2d and attention
//! kernels: whether the path runs on this adapter and with which fragments ([`coop_plan`],
//! [`CoopPlan`]), the two output tiles and how one is chosen ([`CoopTile`]), and the overrides
//! tests and benchmarks use (`LDM_COOP_MATMUL`, `LDM_COOP_TILE`, [`override_coop`],
//! [`force_coop_tile`]). The kernels themselves stay in their own files.

use crate::runtime::Gpu;
use crate::shaders::ShaderId;
use crate::{Error, Result};

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
    /// Workgroup memory the shader declares: two 4f × (2f + 8) f16 tiles and a 4f × 4f f32 tile.
    fn workgroup_bytes(self) -> u32 {
        CoopTile::T64.workgroup_bytes(self)
    }
}

/// The output tile of the tensor-core matmul and convolution, named by its side at 16 × 16
/// fragments (NVIDIA);
/// with 8 × 8 fragments (lavapipe) the same kernels have tiles of 32 and 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoopTile {
    /// `linear_coop` / `geglu_coop`: 4·frag square, 4 subgroups of 2 × 2 fragments.
    T64,
    /// `linear_coop_l` / `geglu_coop_l`: 8·frag square, 8 subgroups of 4 × 2 fragments. Half the
    /// L2 traffic per FLOP of [`CoopTile::T64`] and 0.75 fragment loads per multiply-add
    /// instead of 1; the epilogue runs in 4 passes through a small f32 slot per subgroup.
    T128,
}

impl CoopTile {
    /// The `LDM_COOP_TILE` spelling.
    pub fn parse(s: &str) -> Option<CoopTile> {
        match s.trim() {
            "64" => Some(CoopTile::T64),
            "128" => Some(CoopTile::T128),
            _ => None,
        }
    }
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
    /// Workgroup memory the entry points declare, from the shader's own formulas (AS = 2f + 8
    /// halves per staged row): T64 `a_sh`, `b_sh` (4f × AS f16 each) and `c_sh` (4f × 4f f32):
    /// 26 KiB at f = 16, 7 KiB at f = 8; T128 `a_shl`, `b_shl` (8f × AS f16 each) and `c_shl`
    /// (8 subgroup slots of f × 2f f32): 36 KiB at f = 16, 10 KiB at f = 8.
    pub fn workgroup_bytes(self, plan: CoopPlan) -> u32 {
        let f = plan.frag as u32;
        let staged_row = 2 * f + 8;
        match self {
            CoopTile::T64 => 2 * (4 * f) * staged_row * 2 + (4 * f) * (4 * f) * 4,
            CoopTile::T128 => 2 * (8 * f) * staged_row * 2 + 8 * f * (2 * f) * 4,
        }
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

/// Workgroups of the 128 tile from which it beats the 64 tile. Measured on an NVIDIA H200
/// (132 SMs, 2026-12-04, `benches/RESULTS.md`): the 128 tile won every SD 1.5 shape with 40 or
/// more of its workgroups (8192×320×320: 53 against 73 µs; 512×1280×1280, 40 groups: 70
/// against 83 µs) and lost every shape with 12 or fewer (128×1280×1280: 72 against 46 µs).
/// The 1.6-2.2× rate of its 8 subgroups per tile outweighs an unfilled last wave long before
/// every SM has two workgroups.
pub const COOP_LARGE_TILE_MIN_GROUPS: usize = 32;

std::thread_local! {
    static COOP_TILE_OVERRIDE: std::cell::Cell<Option<CoopTile>> =
        const { std::cell::Cell::new(None) };
}

/// Force the tensor-core tile for the matmuls and convolutions recorded on this thread (`None`: back to
/// `LDM_COOP_TILE` / the shape heuristic). Thread-local, unlike [`override_coop`], because the
/// tests of one binary run concurrently and each forces the tile for its own calls only. For
/// tests and benchmarks; a tile the adapter cannot hold still falls back to T64.
pub fn force_coop_tile(tile: Option<CoopTile>) {
    COOP_TILE_OVERRIDE.with(|t| t.set(tile));
}

/// The forced tile: this thread's [`force_coop_tile`], else `LDM_COOP_TILE` (read once).
pub(crate) fn forced_coop_tile() -> Result<Option<CoopTile>> {
    if let Some(t) = COOP_TILE_OVERRIDE.with(|t| t.get()) {
        return Ok(Some(t));
    }
    static FROM_ENV: std::sync::OnceLock<std::result::Result<Option<CoopTile>, String>> =
        std::sync::OnceLock::new();
    FROM_ENV
        .get_or_init(|| match std::env::var("LDM_COOP_TILE") {
            Ok(v) if !v.trim().is_empty() => CoopTile::parse(&v).map(Some).ok_or(v),
            _ => Ok(None),
        })
        .clone()
        .map_err(|v| {
            Error::InvalidInput(format!(
                "LDM_COOP_TILE={v:?}: expected 64 or 128 (HINT: unset it to let the tensor-core \
                 matmul pick its tile by shape)"
            ))
        })
}

/// Process-wide override of `LDM_COOP_MATMUL` (0 none, 1 off, 2 on), for benchmarks that time
/// both paths in one run.
static COOP_OVERRIDE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Turn the tensor-core path off (`Some(false)`), on where it can run (`Some(true)`), or back to
/// `LDM_COOP_MATMUL` / the default (`None`) for every engine in this process. For benchmarks.
pub fn override_coop(choice: Option<bool>) {
    let v = match choice {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    };
    COOP_OVERRIDE.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the tensor-core path runs, and how. Needs f16 storage, a square f16 × f16 → f32
/// configuration of side 8 or 16, one fixed subgroup width (the work split assigns fragments by
/// subgroup id, so the workgroup must be exactly 4 subgroups) and enough workgroup memory for
/// the 64 tile; the large tile is used only where it fits too ([`CoopTile::choose`]).
/// `LDM_COOP_MATMUL=0` turns it off, `=1` forces it on wherever it can run; by default it runs on
/// GPUs that offer 16×16 fragments and not on CPU adapters (lavapipe emulates the matrix ops:
/// correct, but slower than the FMA kernel there — the test suite forces it on to check it).
pub fn coop_plan(gpu: &Gpu, dtype: crate::DType) -> Option<CoopPlan> {
    static CHOICE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let from_env = *CHOICE.get_or_init(|| match std::env::var("LDM_COOP_MATMUL").as_deref() {
        Ok("1") => Some(true),
        Ok("0") => Some(false),
        _ => None,
    });
    let choice = match COOP_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Some(false),
        2 => Some(true),
        _ => from_env,
    };
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
