//! `shaders/matmul.wgsl`: the linear layer (GEMM with the weight in PyTorch `[N, K]` layout, with
//! bias, activation and residual fused into the store), the fused GEGLU of diffusers'
//! `FeedForward`, and a batched `A·Bᵀ`.
//!
//! One kernel family: 128 × 128 (or 64 × 64 for small problems) output tiles in workgroup memory,
//! 8 × 8 outputs per thread, vec4 loads along K when K % 4 == 0 and a scalar-load entry otherwise.
//! Accumulation is f32 whatever the storage dtype.
//!
//! The tensor-core path (`shaders/matmul_coop.wgsl`, [`coop_plan`]) runs the same three
//! operations on f16 cooperative matrices in two tiles ([`CoopTile`]: 4·frag or 8·frag square,
//! chosen by the number of workgroups; `LDM_COOP_TILE=64|128` forces one for benchmarking),
//! wherever its fixed staging slots fit the adapter's fragments and subgroup width
//! ([`CoopPlan::matmul_staging_fits`](crate::kernels::coop::CoopPlan::matmul_staging_fits)).

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::kernels::coop::{coop_plan, forced_coop_tile, gemm_tile_and_split, CoopTile};
use crate::kernels::norm::layer_norm;
use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::DType;
use crate::{Error, Result};

/// Activation applied after the bias, before the residual add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    /// `0.5 x (1 + erf(x / √2))`, as `torch.nn.functional.gelu` (approximate="none").
    Gelu,
    /// `x · sigmoid(x)`.
    Silu,
    /// `x · sigmoid(1.702 x)`, CLIP's `quick_gelu`.
    QuickGelu,
}

impl Activation {
    fn code(self) -> u32 {
        match self {
            Activation::None => 0,
            Activation::Gelu => 1,
            Activation::Silu => 2,
            Activation::QuickGelu => 3,
        }
    }

    /// The activation in f64 (the reference's definition).
    pub fn apply(self, v: f64) -> f64 {
        match self {
            Activation::None => v,
            Activation::Gelu => gelu_f64(v),
            Activation::Silu => v / (1.0 + (-v).exp()),
            Activation::QuickGelu => v / (1.0 + (-1.702 * v).exp()),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    act: u32,
    bias_mode: u32,
    residual_mode: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    norm_mode: u32,
    norm_eps: f32,
    /// Tensor-core large tile with split K: K per split (0: unsplit).
    k_chunk: u32,
}

/// A LayerNorm over x's last dimension (K) that the matmul applies to x's rows as it stages
/// them (`norm_mode` 1): `((x − mean) / √(var + eps)) · weight + bias`, with each row's statistics
/// computed by the workgroup before its K loop. The normalised tensor is never written and the
/// norm needs no dispatch of its own. Needs K % 4 == 0 (vec4 staging); otherwise the separate
/// [`layer_norm`](crate::kernels::norm::layer_norm) runs first.
#[derive(Clone, Copy, Debug)]
pub struct RowLayerNorm<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub eps: f32,
}

/// Workgroup shape: WG_X × WG_Y threads of 8 × 8 outputs, K step TK (the shader's overrides).
#[derive(Clone, Copy, Debug)]
struct Tiles {
    wg_x: u32,
    wg_y: u32,
    tk: u32,
}

impl Tiles {
    const LARGE: Tiles = Tiles {
        wg_x: 16,
        wg_y: 16,
        tk: 16,
    };
    const SMALL: Tiles = Tiles {
        wg_x: 8,
        wg_y: 8,
        tk: 16,
    };

    fn tm(self) -> usize {
        8 * self.wg_y as usize
    }
    fn tn(self) -> usize {
        8 * self.wg_x as usize
    }
    /// 128 × 128 tiles where they still give a few waves of workgroups; 64 × 64 below, so that
    /// e.g. the 8 × 8 mid block (M = 128) or CLIP (M = 154) keep more than a handful of SMs busy.
    fn choose(batch: usize, m: usize, n_tile_cols: usize) -> Tiles {
        let l = Tiles::LARGE;
        let groups = batch * m.div_ceil(l.tm()) * n_tile_cols.div_ceil(l.tn());
        if groups >= 256 {
            l
        } else {
            Tiles::SMALL
        }
    }
    fn overrides(self) -> [(&'static str, f64); 3] {
        [
            ("WG_X", self.wg_x as f64),
            ("WG_Y", self.wg_y as f64),
            ("TK", self.tk as f64),
        ]
    }
}

/// The `shaders/matmul_coop.wgsl` entry point of a tile.
fn coop_entry(tile: CoopTile, geglu: bool) -> &'static str {
    match (tile, geglu) {
        (CoopTile::T64, false) => "linear_coop",
        (CoopTile::T64, true) => "geglu_coop",
        (CoopTile::T128, false) => "linear_coop_l",
        (CoopTile::T128, true) => "geglu_coop_l",
    }
}

fn check_dtypes(op: &str, first: &Tensor, others: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in others {
        if t.dtype() != first.dtype() {
            return Err(Error::shape(
                op,
                format!(
                    "{name} is {} but x is {} (all operands share the storage dtype)",
                    t.dtype().name(),
                    first.dtype().name()
                ),
            ));
        }
    }
    Ok(())
}

fn fits_u32(op: &str, t: &Tensor) -> Result<()> {
    if t.numel() > u32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("{t:?} has more than 2^32 elements"),
        ));
    }
    Ok(())
}

/// Everything one GEMM dispatch needs, after validation.
struct Gemm<'a> {
    op: &'static str,
    geglu: bool,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    strides: [usize; 3],
    x: &'a Tensor,
    w: &'a Tensor,
    bias: Option<&'a Tensor>,
    residual: Option<&'a Tensor>,
    act: Activation,
    out: &'a Tensor,
    norm: Option<RowLayerNorm<'a>>,
}

fn record(gpu: &Gpu, g: &Gemm<'_>) -> Result<()> {
    for t in [Some(g.x), Some(g.w), g.bias, g.residual, Some(g.out)]
        .into_iter()
        .flatten()
    {
        fits_u32(g.op, t)?;
    }
    if g.out.buffer_id() == g.x.buffer_id() || g.out.buffer_id() == g.w.buffer_id() {
        return Err(Error::shape(
            g.op,
            "out must not share a buffer with x or w",
        ));
    }
    if g.bias.is_some_and(|b| b.buffer_id() == g.out.buffer_id()) {
        return Err(Error::shape(g.op, "out must not share a buffer with bias"));
    }
    // A residual in out's own buffer is read through the out binding (residual_mode 2).
    let residual_mode = match g.residual {
        None => 0,
        Some(r) if r.buffer_id() == g.out.buffer_id() => 2,
        Some(_) => 1,
    };
    let residual = match g.residual {
        Some(r) if residual_mode == 1 => r,
        _ => g.x, // placeholder: the entry point declares the binding even when unused
    };
    let n_tile_cols = if g.geglu { 2 * g.n } else { g.n };
    let vec4 = g.k.is_multiple_of(4);
    if let Some(norm) = g.norm {
        for (name, t) in [("norm weight", norm.weight), ("norm bias", norm.bias)] {
            if t.shape() != [g.k] {
                return Err(Error::shape(
                    g.op,
                    format!("{name} {t:?} must be [{}]", g.k),
                ));
            }
        }
        check_dtypes(
            g.op,
            g.x,
            &[("norm weight", norm.weight), ("norm bias", norm.bias)],
        )?;
        if !vec4 {
            // The on-load norm stages whole vec4s along K: run the separate LayerNorm first.
            let normed = layer_norm(gpu, g.x, norm.weight, norm.bias, norm.eps)?;
            let plain = Gemm {
                x: &normed,
                norm: None,
                ..*g
            };
            return record(gpu, &plain);
        }
    }
    let tiles = Tiles::choose(g.batch, g.m, n_tile_cols);
    let coop = if vec4 {
        coop_plan(gpu, g.out.dtype()).filter(|p| p.matmul_staging_fits())
    } else {
        None
    };
    let coop_overrides;
    let mut k_chunk = None;
    let (shader, entry, overrides, tm, tn): (_, _, &[(&str, f64)], _, _) = if let Some(plan) = coop
    {
        let (tile, chunk) = gemm_tile_and_split(
            plan,
            &gpu.caps,
            [g.batch, g.m, n_tile_cols, g.k],
            forced_coop_tile(gpu),
        );
        k_chunk = chunk;
        coop_overrides = [
            ("SG", plan.subgroup as f64),
            ("SPLIT", f64::from(u8::from(chunk.is_some()))),
        ];
        (
            plan.shader(ShaderId::MatmulCoop),
            coop_entry(tile, g.geglu),
            &coop_overrides,
            tile.side(plan),
            tile.side(plan),
        )
    } else {
        let entry = match (g.geglu, vec4) {
            (false, true) => "linear_vec4",
            (false, false) => "linear_scalar",
            (true, true) => "geglu_vec4",
            (true, false) => "geglu_scalar",
        };
        (
            ShaderId::Matmul,
            entry,
            &tiles.overrides(),
            tiles.tm(),
            tiles.tn(),
        )
    };
    let cols_per_group = if g.geglu { tn / 2 } else { tn };
    let params = Params {
        m: g.m as u32,
        n: g.n as u32,
        k: g.k as u32,
        act: g.act.code(),
        bias_mode: g.bias.is_some() as u32,
        residual_mode,
        stride_a: g.strides[0] as u32,
        stride_b: g.strides[1] as u32,
        stride_c: g.strides[2] as u32,
        norm_mode: g.norm.is_some() as u32,
        norm_eps: g.norm.map_or(0.0, |n| n.eps),
        k_chunk: k_chunk.unwrap_or(0) as u32,
    };
    let bytes: f64 = [Some(g.x), Some(g.w), g.bias, g.residual, Some(g.out)]
        .into_iter()
        .flatten()
        .map(|t| t.size_bytes() as f64)
        .sum();
    let macs = (g.batch * g.m * n_tile_cols * g.k) as f64;
    let splits = k_chunk.map_or(1, |c| g.k.div_ceil(c));
    // Binding 8 (the tensor-core large tile's): the split partial sums, or a small stand-in.
    let partial = match entry {
        "linear_coop_l" | "geglu_coop_l" => Some(gpu.empty(
            &[if splits > 1 {
                splits * g.m * n_tile_cols
            } else {
                1
            }],
            DType::F32,
        )?),
        _ => None,
    };
    // Binding 5 is the uniform; 6 and 7 (the vec4 and coop entries) the norm's affine.
    let tensors = [
        g.x,
        g.w,
        g.bias.unwrap_or(g.x),
        residual,
        g.out,
        g.x,
        g.norm.map_or(g.x, |n| n.weight),
        g.norm.map_or(g.x, |n| n.bias),
        partial.as_ref().unwrap_or(g.out),
    ];
    let partial_bytes = if splits > 1 {
        partial.as_ref().map_or(0.0, |p| p.size_bytes() as f64)
    } else {
        0.0
    };
    gpu.dispatch(&Dispatch {
        shader,
        entry,
        dtype: g.out.dtype(),
        overrides,
        tensors: &tensors,
        params: bytemuck::bytes_of(&params),
        workgroups: [
            g.n.div_ceil(cols_per_group) as u32,
            g.m.div_ceil(tm) as u32,
            if splits > 1 { splits } else { g.batch } as u32,
        ],
        label: g.op,
        work: Work {
            flops: 2.0 * macs,
            bytes: bytes + partial_bytes,
        },
    })?;
    if splits == 1 {
        return Ok(());
    }
    // The splits' sums in order, then the epilogue: one invocation per output.
    let entry = if g.geglu {
        "geglu_split_reduce"
    } else {
        "linear_split_reduce"
    };
    gpu.dispatch(&Dispatch {
        shader,
        entry,
        dtype: g.out.dtype(),
        overrides: &[],
        tensors: &tensors,
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d((g.m * g.n).div_ceil(256) as u64),
        label: entry,
        work: Work {
            flops: (splits * g.m * n_tile_cols) as f64,
            bytes: partial_bytes + g.out.size_bytes() as f64,
        },
    })
}

/// `x [.., K]` → (M, K): leading dims flattened.
fn rows_of(op: &str, x: &Tensor) -> Result<(usize, usize)> {
    let Some(&k) = x.shape().last() else {
        return Err(Error::shape(
            op,
            format!("x {x:?} must have at least one dimension"),
        ));
    };
    Ok((x.shape()[..x.shape().len() - 1].iter().product(), k))
}

fn linear_gemm<'a>(
    x: &'a Tensor,
    w: &'a Tensor,
    bias: Option<&'a Tensor>,
    residual: Option<&'a Tensor>,
    act: Activation,
    out: &'a Tensor,
) -> Result<Gemm<'a>> {
    let op = "linear";
    let (m, k) = rows_of(op, x)?;
    if w.shape().len() != 2 || w.shape()[1] != k {
        return Err(Error::shape(
            op,
            format!("w {w:?} must be [N, K] with K = {k} (x {x:?})"),
        ));
    }
    let n = w.shape()[0];
    if let Some(b) = bias {
        if b.shape() != [n] {
            return Err(Error::shape(op, format!("bias {b:?} must be [{n}]")));
        }
        check_dtypes(op, x, &[("bias", b)])?;
    }
    let mut y_shape = x.shape().to_vec();
    *y_shape.last_mut().expect("rank checked") = n;
    if out.shape() != y_shape.as_slice() {
        return Err(Error::shape(op, format!("out {out:?} must be {y_shape:?}")));
    }
    if let Some(r) = residual {
        if r.shape() != y_shape.as_slice() {
            return Err(Error::shape(
                op,
                format!("residual {r:?} must be {y_shape:?}"),
            ));
        }
        check_dtypes(op, x, &[("residual", r)])?;
    }
    check_dtypes(op, x, &[("w", w), ("out", out)])?;
    Ok(Gemm {
        op,
        geglu: false,
        batch: 1,
        m,
        n,
        k,
        strides: [0; 3],
        x,
        w,
        bias,
        residual,
        act,
        out,
        norm: None,
    })
}

/// `y[.., n] = act(Σ_k x[.., k] · w[n, k] + bias[n]) + residual[.., n]` into a new tensor.
/// x: `[.., K]` (leading dims flattened to M rows), w: `[N, K]`, bias: `[N]`, residual: y's shape.
pub fn linear(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    if let (Some(last), Some(&n)) = (shape.last_mut(), w.shape().first()) {
        *last = n;
    }
    let out = gpu.empty(&shape, x.dtype())?;
    linear_into(gpu, x, w, bias, residual, act, &out)?;
    Ok(out)
}

/// [`linear`] into `out`. `residual` may be `out` itself (in-place residual add).
pub fn linear_into(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Activation,
    out: &Tensor,
) -> Result<()> {
    let g = linear_gemm(x, w, bias, residual, act, out)?;
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    record(gpu, &g)
}

/// `act(layer_norm(x)·Wᵀ + b) + residual` without the normalised tensor: the matmul LayerNorms
/// x's rows as it stages them ([`RowLayerNorm`]), so the norm costs no dispatch and no pass over
/// memory. Where K % 4 != 0 the separate LayerNorm runs first (same result).
pub fn linear_norm(
    gpu: &Gpu,
    x: &Tensor,
    norm: RowLayerNorm<'_>,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    if let (Some(last), Some(&n)) = (shape.last_mut(), w.shape().first()) {
        *last = n;
    }
    let out = gpu.empty(&shape, x.dtype())?;
    linear_norm_into(gpu, x, norm, w, (bias, residual), act, &out)?;
    Ok(out)
}

/// [`linear_norm`] into `out` (`epilogue` = (bias, residual); the residual may be `out` itself).
pub fn linear_norm_into(
    gpu: &Gpu,
    x: &Tensor,
    norm: RowLayerNorm<'_>,
    w: &Tensor,
    (bias, residual): (Option<&Tensor>, Option<&Tensor>),
    act: Activation,
    out: &Tensor,
) -> Result<()> {
    let mut g = linear_gemm(x, w, bias, residual, act, out)?;
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    g.norm = Some(norm);
    record(gpu, &g)
}

fn geglu_gemm<'a>(
    x: &'a Tensor,
    w: &'a Tensor,
    bias: Option<&'a Tensor>,
    out: &'a Tensor,
) -> Result<Gemm<'a>> {
    let op = "linear_geglu";
    let (m, k) = rows_of(op, x)?;
    if w.shape().len() != 2 || w.shape()[1] != k || !w.shape()[0].is_multiple_of(2) {
        return Err(Error::shape(
            op,
            format!("w {w:?} must be [2N, K] with K = {k} (x {x:?})"),
        ));
    }
    let n = w.shape()[0] / 2;
    if let Some(b) = bias {
        if b.shape() != [2 * n] {
            return Err(Error::shape(op, format!("bias {b:?} must be [{}]", 2 * n)));
        }
        check_dtypes(op, x, &[("bias", b)])?;
    }
    let mut y_shape = x.shape().to_vec();
    *y_shape.last_mut().expect("rank checked") = n;
    if out.shape() != y_shape.as_slice() {
        return Err(Error::shape(op, format!("out {out:?} must be {y_shape:?}")));
    }
    check_dtypes(op, x, &[("w", w), ("out", out)])?;
    Ok(Gemm {
        op,
        geglu: true,
        batch: 1,
        m,
        n,
        k,
        strides: [0; 3],
        x,
        w,
        bias,
        residual: None,
        act: Activation::None,
        out,
        norm: None,
    })
}

/// diffusers `GEGLU`: `proj = x·Wᵀ + b` with W `[2N, K]`; `hidden, gate = proj.chunk(2, -1)`;
/// `y = hidden * gelu(gate)` → `[.., N]`. One kernel; the `[.., 2N]` projection is never written.
pub fn linear_geglu(gpu: &Gpu, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    if let (Some(last), Some(&n2)) = (shape.last_mut(), w.shape().first()) {
        *last = n2 / 2;
    }
    let out = gpu.empty(&shape, x.dtype())?;
    linear_geglu_into(gpu, x, w, bias, &out)?;
    Ok(out)
}

/// [`linear_geglu`] into `out`.
pub fn linear_geglu_into(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    let g = geglu_gemm(x, w, bias, out)?;
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    record(gpu, &g)
}

/// [`linear_geglu`] of `layer_norm(x)`, the norm applied as the matmul stages x's rows
/// ([`RowLayerNorm`]; the separate LayerNorm first where K % 4 != 0).
pub fn linear_geglu_norm(
    gpu: &Gpu,
    x: &Tensor,
    norm: RowLayerNorm<'_>,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    if let (Some(last), Some(&n2)) = (shape.last_mut(), w.shape().first()) {
        *last = n2 / 2;
    }
    let out = gpu.empty(&shape, x.dtype())?;
    linear_geglu_norm_into(gpu, x, norm, w, bias, &out)?;
    Ok(out)
}

/// [`linear_geglu_norm`] into `out`.
pub fn linear_geglu_norm_into(
    gpu: &Gpu,
    x: &Tensor,
    norm: RowLayerNorm<'_>,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    let mut g = geglu_gemm(x, w, bias, out)?;
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    g.norm = Some(norm);
    record(gpu, &g)
}

fn batched_gemm<'a>(a: &'a Tensor, bt: &'a Tensor, out: &'a Tensor) -> Result<Gemm<'a>> {
    let op = "batched_matmul_bt";
    let (&[b, m, k], &[b2, n, k2]) = (a.shape(), bt.shape()) else {
        return Err(Error::shape(
            op,
            format!("a {a:?} must be [B, M, K] and bt {bt:?} [B, N, K]"),
        ));
    };
    if b != b2 || k != k2 {
        return Err(Error::shape(
            op,
            format!("a {a:?} and bt {bt:?} disagree on B or K"),
        ));
    }
    if out.shape() != [b, m, n] {
        return Err(Error::shape(
            op,
            format!("out {out:?} must be [{b}, {m}, {n}]"),
        ));
    }
    check_dtypes(op, a, &[("bt", bt), ("out", out)])?;
    Ok(Gemm {
        op,
        geglu: false,
        batch: b,
        m,
        n,
        k,
        strides: [m * k, n * k, m * n],
        x: a,
        w: bt,
        bias: None,
        residual: None,
        act: Activation::None,
        out,
        norm: None,
    })
}

/// Batched `c[b] = a[b] · bt[b]ᵀ` (a `[B, M, K]`, bt `[B, N, K]`) → `[B, M, N]`.
pub fn batched_matmul_bt(gpu: &Gpu, a: &Tensor, bt: &Tensor) -> Result<Tensor> {
    let (b, m, n) = match (a.shape(), bt.shape()) {
        (&[b, m, _], &[_, n, _]) => (b, m, n),
        _ => {
            return Err(Error::shape(
                "batched_matmul_bt",
                format!("a {a:?} must be [B, M, K] and bt {bt:?} [B, N, K]"),
            ))
        }
    };
    let out = gpu.empty(&[b, m, n], a.dtype())?;
    batched_matmul_bt_into(gpu, a, bt, &out)?;
    Ok(out)
}

/// [`batched_matmul_bt`] into `out` `[B, M, N]`.
pub fn batched_matmul_bt_into(gpu: &Gpu, a: &Tensor, bt: &Tensor, out: &Tensor) -> Result<()> {
    let g = batched_gemm(a, bt, out)?;
    if g.batch == 0 || g.m == 0 || g.n == 0 {
        return Ok(());
    }
    if g.batch > gpu.caps.max_workgroups_per_dim as usize {
        return Err(Error::shape(
            g.op,
            format!(
                "batch {} exceeds the device's workgroups per dimension",
                g.batch
            ),
        ));
    }
    record(gpu, &g)
}

// ---------------------------------------------------------------------- reference (the spec)

/// erf in f64: Maclaurin series for |x| < 2.5, Laplace's continued fraction for erfc beyond
/// (both to ~1e-14; std has no erf).
pub fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.5 {
        // erf(a) = 2/√π Σ (-1)^n a^(2n+1) / (n! (2n+1))
        let (mut term, mut sum, a2) = (a, a, a * a);
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(a) = exp(-a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + ...)))))
        let mut t = a;
        for i in (1..=80).rev() {
            t = a + (i as f64 / 2.0) / t;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * t)
    };
    r.copysign(x)
}

/// `0.5 x (1 + erf(x / √2))`.
pub fn gelu_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// `y[m, n] = act(Σ_k x[m, k] w[n, k] + bias[n]) + residual[m, n]` in f64. x `[M, K]`, w `[N, K]`.
pub fn reference_linear(
    x: &[f32],
    w: &[f32],
    (bias, residual): (Option<&[f32]>, Option<&[f32]>),
    act: Activation,
    [m, n, k]: [usize; 3],
) -> Vec<f64> {
    let mut y = vec![0.0f64; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let mut s: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            if let Some(b) = bias {
                s += b[j] as f64;
            }
            let mut v = act.apply(s);
            if let Some(r) = residual {
                v += r[i * n + j] as f64;
            }
            y[i * n + j] = v;
        }
    }
    y
}

/// GEGLU in f64: x `[M, K]`, w `[2N, K]`, bias `[2N]` → `[M, N]`,
/// `y = (x·w[n] + b[n]) · gelu(x·w[N + n] + b[N + n])`.
pub fn reference_geglu(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f64> {
    let proj = reference_linear(x, w, (bias, None), Activation::None, [m, 2 * n, k]);
    let mut y = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = proj[i * 2 * n + j] * gelu_f64(proj[i * 2 * n + n + j]);
        }
    }
    y
}

/// Batched `c[b] = a[b] · bt[b]ᵀ` in f64.
pub fn reference_batched_matmul_bt(
    a: &[f32],
    bt: &[f32],
    b: usize,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f64> {
    (0..b)
        .flat_map(|i| {
            reference_linear(
                &a[i * m * k..(i + 1) * m * k],
                &bt[i * n * k..(i + 1) * n * k],
                (None, None),
                Activation::None,
                [m, n, k],
            )
        })
        .collect()
}
