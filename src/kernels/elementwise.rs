//! `shaders/elementwise.wgsl`: the memory-bound glue of the models. Every op has an allocating
//! form (`add`) and an `_into` form writing a caller-provided output (`add_into`), which must not
//! share a buffer with any input. All tensors are NHWC / token-major and of one dtype (except
//! [`cast`]). Each `reference_*` function is the op's specification, in f64.

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::{DType, Error, Result};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n: u32,
    op: u32,
    d: [u32; 5],
    s: f32,
}

const UNARY_COPY: u32 = 0;
const UNARY_SCALE: u32 = 1;
const UNARY_SILU: u32 = 2;
const UNARY_GELU: u32 = 3;
const UNARY_QUICK_GELU: u32 = 4;
const UNARY_RELU: u32 = 5;
const UNARY_TANH_CLAMP: u32 = 6;
const UNARY_AFFINE: u32 = 7;
const BINARY_ADD: u32 = 0;
const BINARY_MUL: u32 = 1;

fn u32_of(op: &str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| Error::shape(op, format!("{v} elements do not fit 32-bit indexing")))
}

fn same_dtype(op: &str, ts: &[&Tensor]) -> Result<()> {
    if ts.iter().any(|t| t.dtype() != ts[0].dtype()) {
        return Err(Error::shape(
            op,
            format!("all tensors must have one dtype: {ts:?}"),
        ));
    }
    Ok(())
}

/// `out` must have `shape`, `dtype`, and a buffer of its own.
fn check_out(
    op: &str,
    out: &Tensor,
    shape: &[usize],
    dtype: DType,
    inputs: &[&Tensor],
) -> Result<()> {
    if out.shape() != shape || out.dtype() != dtype {
        return Err(Error::shape(
            op,
            format!("output {out:?} must be {shape:?} {}", dtype.name()),
        ));
    }
    if inputs.iter().any(|t| t.buffer_id() == out.buffer_id()) {
        return Err(Error::shape(
            op,
            "the output shares a buffer with an input (a wgpu validation error: write into another tensor)",
        ));
    }
    Ok(())
}

/// Record one 256-thread-per-workgroup 1-D launch over `items` outputs.
fn launch(
    gpu: &Gpu,
    entry: &'static str,
    label: &'static str,
    tensors: &[&Tensor],
    params: Params,
    items: usize,
    work: Work,
) -> Result<()> {
    if items == 0 {
        return Ok(());
    }
    gpu.dispatch(&Dispatch {
        shader: ShaderId::Elementwise,
        entry,
        dtype: tensors[2].dtype(),
        overrides: &[],
        tensors,
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d((items as u64).div_ceil(256)),
        label,
        work,
    })
}

fn bytes(ts: &[&Tensor]) -> f64 {
    ts.iter().map(|t| t.size_bytes() as f64).sum()
}

/// Upload host u32 values as a tensor (stored in an f32-typed buffer of the same size; the
/// shader reads it as `array<u32>`).
fn upload_u32(gpu: &Gpu, data: &[u32]) -> Result<Tensor> {
    let t = gpu.empty(&[data.len().max(1)], DType::F32)?;
    let mut v = data.to_vec();
    v.resize(data.len().max(1), 0);
    gpu.write_bytes(&t, bytemuck::cast_slice(&v))?;
    Ok(t)
}

// ------------------------------------------------------------------------------ unary / binary

/// One op of the `unary4` entry: its selector, scalars, name and FLOPs per element.
struct Unary {
    op: u32,
    s: f32,
    /// The affine op's offset (travels as f32 bits in `d0`; the other ops ignore it).
    t: f32,
    name: &'static str,
    flops: f64,
}

impl Unary {
    const fn new(op: u32, name: &'static str, flops: f64) -> Unary {
        Unary {
            op,
            s: 0.0,
            t: 0.0,
            name,
            flops,
        }
    }
}

fn unary_into(gpu: &Gpu, x: &Tensor, out: &Tensor, unary: Unary) -> Result<()> {
    let Unary {
        op,
        s,
        t,
        name,
        flops,
    } = unary;
    check_out(name, out, x.shape(), x.dtype(), &[x])?;
    let vecs = x.numel().div_ceil(4);
    let params = Params {
        n: u32_of(name, vecs)?,
        op,
        s,
        d: [t.to_bits(), 0, 0, 0, 0],
    };
    let work = Work {
        flops: flops * x.numel() as f64,
        bytes: bytes(&[x, out]),
    };
    launch(gpu, "unary4", name, &[x, x, out], params, vecs, work)
}

fn binary_into(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
    op: u32,
    name: &'static str,
) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(name, format!("shapes differ: {a:?} vs {b:?}")));
    }
    same_dtype(name, &[a, b])?;
    check_out(name, out, a.shape(), a.dtype(), &[a, b])?;
    let vecs = a.numel().div_ceil(4);
    let params = Params {
        n: u32_of(name, vecs)?,
        op,
        ..Default::default()
    };
    let work = Work {
        flops: a.numel() as f64,
        bytes: bytes(&[a, b, out]),
    };
    launch(gpu, "binary4", name, &[a, b, out], params, vecs, work)
}

/// A new tensor shaped like `x` (the output of a same-shape op).
fn like(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    gpu.empty(x.shape(), x.dtype())
}

/// `a + b` (same shapes).
pub fn add(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = like(gpu, a)?;
    add_into(gpu, a, b, &out)?;
    Ok(out)
}

/// `a * b` (same shapes).
pub fn mul(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = like(gpu, a)?;
    mul_into(gpu, a, b, &out)?;
    Ok(out)
}

/// `a * s`.
pub fn scale(gpu: &Gpu, a: &Tensor, s: f32) -> Result<Tensor> {
    let out = like(gpu, a)?;
    scale_into(gpu, a, s, &out)?;
    Ok(out)
}

/// `x * sigmoid(x)`.
pub fn silu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let out = like(gpu, x)?;
    silu_into(gpu, x, &out)?;
    Ok(out)
}

/// `x * Phi(x)` (torch's default erf GELU, erf to ~1e-7 relative).
pub fn gelu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let out = like(gpu, x)?;
    gelu_into(gpu, x, &out)?;
    Ok(out)
}

/// `x * sigmoid(1.702 x)` (CLIP's activation).
pub fn quick_gelu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let out = like(gpu, x)?;
    quick_gelu_into(gpu, x, &out)?;
    Ok(out)
}

/// A copy into a new buffer.
pub fn copy(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let out = like(gpu, x)?;
    copy_into(gpu, x, &out)?;
    Ok(out)
}

pub fn add_into(gpu: &Gpu, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    binary_into(gpu, a, b, out, BINARY_ADD, "add")
}

pub fn mul_into(gpu: &Gpu, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    binary_into(gpu, a, b, out, BINARY_MUL, "mul")
}

pub fn scale_into(gpu: &Gpu, a: &Tensor, s: f32, out: &Tensor) -> Result<()> {
    unary_into(
        gpu,
        a,
        out,
        Unary {
            s,
            ..Unary::new(UNARY_SCALE, "scale", 1.0)
        },
    )
}

pub fn silu_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    unary_into(gpu, x, out, Unary::new(UNARY_SILU, "silu", 4.0))
}

pub fn gelu_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    unary_into(gpu, x, out, Unary::new(UNARY_GELU, "gelu", 30.0))
}

pub fn quick_gelu_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    unary_into(gpu, x, out, Unary::new(UNARY_QUICK_GELU, "quick_gelu", 5.0))
}

pub fn copy_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    unary_into(gpu, x, out, Unary::new(UNARY_COPY, "copy", 0.0))
}

/// `max(x, 0)`.
pub fn relu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let out = like(gpu, x)?;
    relu_into(gpu, x, &out)?;
    Ok(out)
}
pub fn relu_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    unary_into(gpu, x, out, Unary::new(UNARY_RELU, "relu", 1.0))
}

/// `m · tanh(x / m)`: a soft clamp to (-m, m) (TAESD's decoder input, m = 3).
pub fn tanh_clamp(gpu: &Gpu, x: &Tensor, m: f32) -> Result<Tensor> {
    let out = like(gpu, x)?;
    tanh_clamp_into(gpu, x, m, &out)?;
    Ok(out)
}
pub fn tanh_clamp_into(gpu: &Gpu, x: &Tensor, m: f32, out: &Tensor) -> Result<()> {
    let op = Unary {
        s: m,
        ..Unary::new(UNARY_TANH_CLAMP, "tanh_clamp", 20.0)
    };
    unary_into(gpu, x, out, op)
}

/// `x · s + t` (range changes such as [-1, 1] ↔ [0, 1]).
pub fn affine(gpu: &Gpu, x: &Tensor, s: f32, t: f32) -> Result<Tensor> {
    let out = like(gpu, x)?;
    affine_into(gpu, x, s, t, &out)?;
    Ok(out)
}
pub fn affine_into(gpu: &Gpu, x: &Tensor, s: f32, t: f32, out: &Tensor) -> Result<()> {
    let op = Unary {
        s,
        t,
        ..Unary::new(UNARY_AFFINE, "affine", 2.0)
    };
    unary_into(gpu, x, out, op)
}

// ------------------------------------------------------------------------------ broadcast / layout

/// `x [B, ..., C] + v [B, C]` broadcast over the middle dims (ResnetBlock2D adds the projected
/// time embedding per channel).
pub fn add_channel_bias(gpu: &Gpu, x: &Tensor, v: &Tensor) -> Result<Tensor> {
    let out = like(gpu, x)?;
    add_channel_bias_into(gpu, x, v, &out)?;
    Ok(out)
}

pub fn add_channel_bias_into(gpu: &Gpu, x: &Tensor, v: &Tensor, out: &Tensor) -> Result<()> {
    let s = x.shape();
    if s.len() < 2
        || v.shape().len() < 2
        || v.dim(0) != s[0]
        || v.dim(-1) != s[s.len() - 1]
        || v.numel() != s[0] * s[s.len() - 1]
    {
        return Err(Error::shape(
            "add_channel_bias",
            format!("x {x:?} must be [B, ..., C] and v {v:?} [B, C]"),
        ));
    }
    let v = v.reshape(&[s[0], s[s.len() - 1]])?; // [B, C]
    let view = ChannelBiasView {
        table: &v,
        row: 0,
        col: 0,
    };
    add_channel_bias_view_into(gpu, x, view, out)
}

/// A [B, C] block of a 2-D table [R, W]: rows `row .. row + B`, columns `col .. col + C`. The
/// U-Net's time-embedding projections of a whole schedule live in one such table per resnet
/// (rows: calls × batch), and each call reads its rows in place.
#[derive(Clone, Copy, Debug)]
pub struct ChannelBiasView<'a> {
    pub table: &'a Tensor,
    pub row: usize,
    pub col: usize,
}

/// `x [B, ..., C] + v [B, C]` with `v` a block of a wider table (see [`ChannelBiasView`]).
pub fn add_channel_bias_view(gpu: &Gpu, x: &Tensor, v: ChannelBiasView<'_>) -> Result<Tensor> {
    let out = like(gpu, x)?;
    add_channel_bias_view_into(gpu, x, v, &out)?;
    Ok(out)
}

pub fn add_channel_bias_view_into(
    gpu: &Gpu,
    x: &Tensor,
    v: ChannelBiasView<'_>,
    out: &Tensor,
) -> Result<()> {
    const OP: &str = "add_channel_bias";
    let s = x.shape();
    let t = v.table;
    let fits = s.len() >= 2
        && t.shape().len() == 2
        && v.row + s[0] <= t.dim(0)
        && v.col + s[s.len() - 1] <= t.dim(1);
    if !fits {
        return Err(Error::shape(
            OP,
            format!(
                "x {x:?} must be [B, ..., C] and rows {}.. columns {}.. of {t:?} a [B, C] block",
                v.row, v.col
            ),
        ));
    }
    same_dtype(OP, &[x, t])?;
    check_out(OP, out, s, x.dtype(), &[x, t])?;
    let c = s[s.len() - 1];
    let (stride, offset) = (t.dim(1), v.row * t.dim(1) + v.col);
    let per_batch = x.numel() / s[0];
    let (entry, w) = if c.is_multiple_of(4) && stride.is_multiple_of(4) && offset.is_multiple_of(4)
    {
        ("channel_bias4", 4)
    } else {
        ("channel_bias1", 1)
    };
    let items = x.numel() / w;
    let params = Params {
        n: u32_of(OP, items)?,
        d: [
            (c / w) as u32,
            (per_batch / w) as u32,
            u32_of(OP, stride / w)?,
            u32_of(OP, offset / w)?,
            0,
        ],
        ..Default::default()
    };
    let work = Work {
        flops: x.numel() as f64,
        bytes: bytes(&[x, out]) + (s[0] * c * x.dtype().size()) as f64,
    };
    launch(gpu, entry, OP, &[x, t, out], params, items, work)
}

/// Channel concat `[B, H, W, C1] ++ [B, H, W, C2] -> [B, H, W, C1 + C2]`, `a` first (the U-Net
/// skip connection: `torch.cat([h, skip], dim=1)` in NCHW). Any rank ≥ 1 with equal leading dims.
pub fn concat_channels(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut shape = a.shape().to_vec();
    if let (Some(l), Some(&c2)) = (shape.last_mut(), b.shape().last()) {
        *l += c2;
    }
    let out = gpu.empty(&shape, a.dtype())?;
    concat_channels_into(gpu, a, b, &out)?;
    Ok(out)
}

pub fn concat_channels_into(gpu: &Gpu, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "concat_channels";
    let (sa, sb) = (a.shape(), b.shape());
    if sa.is_empty() || sa.len() != sb.len() || sa[..sa.len() - 1] != sb[..sb.len() - 1] {
        return Err(Error::shape(
            OP,
            format!("{a:?} and {b:?} must agree in every dim but the last"),
        ));
    }
    same_dtype(OP, &[a, b])?;
    let (c1, c2) = (sa[sa.len() - 1], sb[sb.len() - 1]);
    let mut shape = sa.to_vec();
    *shape.last_mut().expect("rank checked") = c1 + c2;
    check_out(OP, out, &shape, a.dtype(), &[a, b])?;
    let (entry, w) = if c1.is_multiple_of(4) && c2.is_multiple_of(4) {
        ("concat_channels4", 4)
    } else {
        ("concat_channels1", 1)
    };
    let items = out.numel() / w;
    let params = Params {
        n: u32_of(OP, items)?,
        d: [(c1 / w) as u32, (c2 / w) as u32, 0, 0, 0],
        ..Default::default()
    };
    let work = Work {
        flops: 0.0,
        bytes: bytes(&[a, b, out]),
    };
    launch(gpu, entry, OP, &[a, b, out], params, items, work)
}

/// The U-Net's input for one denoising call, from the sampler's f32 latents `[B, h, w, L]` in one
/// dispatch: `scale` × latents (the sampler's `scale_model_input`), then for 9-channel
/// inpainting `inpaint = (mask [B, h, w, 1], masked_image_latents [B, h, w, L])` appended along
/// channels, the whole repeated `repeat` times along the batch (2 for classifier-free guidance:
/// `[x; x]`), cast to `dtype`. Returns `[repeat·B, h, w, L or 2L + 1]`.
pub fn unet_input(
    gpu: &Gpu,
    latents: &Tensor,
    scale: f32,
    inpaint: Option<(&Tensor, &Tensor)>,
    repeat: usize,
    dtype: DType,
) -> Result<Tensor> {
    let [b, h, w, l] = check_rank4("unet_input", latents)?;
    let c = if inpaint.is_some() { 2 * l + 1 } else { l };
    let out = gpu.empty(&[repeat.max(1) * b, h, w, c], dtype)?;
    unet_input_into(gpu, latents, scale, inpaint, repeat, &out)?;
    Ok(out)
}

/// [`unet_input`] into `out` (`[repeat·B, h, w, C]`, the U-Net's dtype).
pub fn unet_input_into(
    gpu: &Gpu,
    latents: &Tensor,
    scale: f32,
    inpaint: Option<(&Tensor, &Tensor)>,
    repeat: usize,
    out: &Tensor,
) -> Result<()> {
    const OP: &str = "unet_input";
    let [b, h, w, l] = check_rank4(OP, latents)?;
    let mut inputs = vec![latents];
    if let Some((mask, masked)) = inpaint {
        if mask.shape() != [b, h, w, 1] || masked.shape() != latents.shape() {
            return Err(Error::shape(
                OP,
                format!(
                    "mask {mask:?} must be [{b}, {h}, {w}, 1] and masked latents {masked:?} like the latents {latents:?}"
                ),
            ));
        }
        inputs.extend([mask, masked]);
    }
    if inputs.iter().any(|t| t.dtype() != DType::F32) || repeat == 0 {
        return Err(Error::shape(
            OP,
            format!("latents, mask and masked latents must be f32 and repeat ≥ 1: {inputs:?}, repeat {repeat}"),
        ));
    }
    let c = if inpaint.is_some() { 2 * l + 1 } else { l };
    check_out(OP, out, &[repeat * b, h, w, c], out.dtype(), &inputs)?;
    let items = out.numel();
    let params = Params {
        n: u32_of(OP, items)?,
        d: [b as u32, (h * w) as u32, l as u32, c as u32, 0],
        s: scale,
        ..Default::default()
    };
    let work = Work {
        flops: 0.0,
        bytes: bytes(&inputs) + out.size_bytes() as f64,
    };
    // Bindings: 0 latents, 1 mask, 2 out, 4 masked (unused ones get the latents).
    let (mask, masked) = inpaint.unwrap_or((latents, latents));
    let tensors = [latents, mask, out, latents, masked];
    launch(gpu, "unet_input", OP, &tensors, params, items, work)
}

/// Nearest-neighbour 2× upsampling `[B, H, W, C] -> [B, 2H, 2W, C]` (diffusers Upsample2D).
pub fn upsample_nearest2x(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    if s.len() != 4 {
        return Err(Error::shape(
            "upsample_nearest2x",
            format!("input {x:?} must be [B, H, W, C]"),
        ));
    }
    let out = gpu.empty(&[s[0], 2 * s[1], 2 * s[2], s[3]], x.dtype())?;
    upsample_nearest2x_into(gpu, x, &out)?;
    Ok(out)
}

pub fn upsample_nearest2x_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "upsample_nearest2x";
    let s = x.shape();
    if s.len() != 4 {
        return Err(Error::shape(
            OP,
            format!("input {x:?} must be [B, H, W, C]"),
        ));
    }
    let (h, w, c) = (s[1], s[2], s[3]);
    check_out(OP, out, &[s[0], 2 * h, 2 * w, c], x.dtype(), &[x])?;
    let (entry, vw) = if c.is_multiple_of(4) {
        ("upsample2x4", 4)
    } else {
        ("upsample2x1", 1)
    };
    let items = out.numel() / vw;
    let params = Params {
        n: u32_of(OP, items)?,
        d: [(c / vw) as u32, w as u32, h as u32, 0, 0],
        ..Default::default()
    };
    let work = Work {
        flops: 0.0,
        bytes: bytes(&[x, out]),
    };
    launch(gpu, entry, OP, &[x, x, out], params, items, work)
}

/// `[a; b]` along the outermost dim (the CFG batch of uncond/cond inputs; `concat_batch(x, x)`
/// repeats x).
pub fn concat_batch(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut shape = a.shape().to_vec();
    if let (Some(f), Some(&b0)) = (shape.first_mut(), b.shape().first()) {
        *f += b0;
    }
    let out = gpu.empty(&shape, a.dtype())?;
    concat_batch_into(gpu, a, b, &out)?;
    Ok(out)
}

pub fn concat_batch_into(gpu: &Gpu, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "concat_batch";
    let (sa, sb) = (a.shape(), b.shape());
    if sa.is_empty() || sa.len() != sb.len() || sa[1..] != sb[1..] {
        return Err(Error::shape(
            OP,
            format!("{a:?} and {b:?} must agree in every dim but the first"),
        ));
    }
    same_dtype(OP, &[a, b])?;
    let mut shape = sa.to_vec();
    shape[0] += sb[0];
    // The same buffer may be both inputs (a repeat); only the output must be separate.
    check_out(OP, out, &shape, a.dtype(), &[a, b])?;
    let na = a.numel();
    let (entry, w) = if na.is_multiple_of(4) {
        ("concat_batch4", 4)
    } else {
        ("concat_batch1", 1)
    };
    let items = out.numel().div_ceil(w);
    let params = Params {
        n: u32_of(OP, items)?,
        d: [(na / w) as u32, 0, 0, 0, 0],
        ..Default::default()
    };
    let work = Work {
        flops: 0.0,
        bytes: bytes(&[a, b, out]),
    };
    launch(gpu, entry, OP, &[a, b, out], params, items, work)
}

fn check_rank4(op: &str, x: &Tensor) -> Result<[usize; 4]> {
    match *x.shape() {
        [a, b, c, d] => Ok([a, b, c, d]),
        _ => Err(Error::shape(op, format!("input {x:?} must have 4 dims"))),
    }
}

/// `[B, C, H, W] -> [B, H, W, C]` (at the model boundary: latents and images arrive NCHW).
pub fn nchw_to_nhwc(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let [b, c, h, w] = check_rank4("nchw_to_nhwc", x)?;
    let out = gpu.empty(&[b, h, w, c], x.dtype())?;
    nchw_to_nhwc_into(gpu, x, &out)?;
    Ok(out)
}

pub fn nchw_to_nhwc_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "nchw_to_nhwc";
    let [b, c, h, w] = check_rank4(OP, x)?;
    check_out(OP, out, &[b, h, w, c], x.dtype(), &[x])?;
    let params = Params {
        n: u32_of(OP, x.numel())?,
        d: [c as u32, h as u32, w as u32, 0, 0],
        ..Default::default()
    };
    let work = Work {
        flops: 0.0,
        bytes: bytes(&[x, out]),
    };
    launch(gpu, OP, OP, &[x, x, out], params, x.numel(), work)
}

/// `[B, H, W, C] -> [B, C, H, W]`.
pub fn nhwc_to_nchw(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let [b, h, w, c] = check_rank4("nhwc_to_nchw", x)?;
    let out = gpu.empty(&[b, c, h, w], x.dtype())?;
    nhwc_to_nchw_into(gpu, x, &out)?;
    Ok(out)
}

pub fn nhwc_to_nchw_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "nhwc_to_nchw";
    let [b, h, w, c] = check_rank4(OP, x)?;
    check_out(OP, out, &[b, c, h, w], x.dtype(), &[x])?;
    let params = Params {
        n: u32_of(OP, x.numel())?,
        d: [c as u32, h as u32, w as u32, 0, 0],
        ..Default::default()
    };
    let work = Work {
        flops: 0.0,
        bytes: bytes(&[x, out]),
    };
    launch(gpu, OP, OP, &[x, x, out], params, x.numel(), work)
}

// ------------------------------------------------------------------------------ embeddings

/// Frequencies `exp(-ln(10000) * j / (half - shift))`, j < half, rounded to f32 the way diffusers
/// computes them in f32 (`-math.log(10000) * arange(half, float32) / (half - shift)`, `torch.exp`).
pub fn timestep_frequencies(dim: usize, freq_shift: f32) -> Vec<f32> {
    let half = dim / 2;
    let c = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift as f64) as f32;
    (0..half)
        .map(|j| ((c * j as f32 / denom) as f64).exp() as f32)
        .collect()
}

/// diffusers `get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift,
/// scale=1, max_period=10000)`: `emb = t[:, None] * freq[None]`, `cat(sin, cos)` (or `cos, sin`
/// when flipped), a zero column if `dim` is odd. Timesteps in f32 as diffusers uses them.
pub fn timestep_embedding(
    gpu: &Gpu,
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
    dtype: DType,
) -> Result<Tensor> {
    let out = gpu.empty(&[timesteps.len(), dim], dtype)?;
    timestep_embedding_into(gpu, timesteps, dim, flip_sin_to_cos, freq_shift, &out)?;
    Ok(out)
}

pub fn timestep_embedding_into(
    gpu: &Gpu,
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
    out: &Tensor,
) -> Result<()> {
    const OP: &str = "timestep_embedding";
    if timesteps.is_empty() || dim == 0 {
        return Err(Error::shape(
            OP,
            format!(
                "need at least one timestep and dim > 0 (got {} and {dim})",
                timesteps.len()
            ),
        ));
    }
    check_out(OP, out, &[timesteps.len(), dim], out.dtype(), &[])?;
    let mut aux = timesteps.to_vec();
    aux.extend(timestep_frequencies(dim, freq_shift));
    let aux = gpu.upload(&aux, &[aux.len()], DType::F32)?;
    let n = out.numel();
    let params = Params {
        n: u32_of(OP, n)?,
        op: flip_sin_to_cos as u32,
        d: [dim as u32, (dim / 2) as u32, timesteps.len() as u32, 0, 0],
        ..Default::default()
    };
    let work = Work {
        flops: 20.0 * n as f64,
        bytes: out.size_bytes() as f64,
    };
    launch(gpu, OP, OP, &[out, out, out, out, &aux], params, n, work)
}

/// Token + position embedding for CLIP: `ids` (host, [batch, N]) pick rows of `tokens` [V, C], plus
/// rows 0..N of `positions` [P, C]. Returns [batch, N, C].
pub fn embed_tokens(
    gpu: &Gpu,
    ids: &[u32],
    batch: usize,
    tokens: &Tensor,
    positions: &Tensor,
) -> Result<Tensor> {
    if batch == 0 || !ids.len().is_multiple_of(batch) || tokens.shape().len() != 2 {
        return Err(Error::shape(
            "embed_tokens",
            format!("{} ids for batch {batch}, table {tokens:?}", ids.len()),
        ));
    }
    let out = gpu.empty(&[batch, ids.len() / batch, tokens.dim(1)], tokens.dtype())?;
    embed_tokens_into(gpu, ids, batch, tokens, positions, &out)?;
    Ok(out)
}

pub fn embed_tokens_into(
    gpu: &Gpu,
    ids: &[u32],
    batch: usize,
    tokens: &Tensor,
    positions: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let vocab = tokens.shape().first().copied().unwrap_or(0);
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::shape(
            "embed_tokens",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    embed_tokens_slice_into(gpu, ids, batch, tokens, 0, positions, out)
}

/// Like [`embed_tokens_into`] for a table bound in row slices: `tokens` holds the rows of ids
/// `first_id..first_id + rows`; only tokens with those ids are written. Calling it once per
/// slice writes every row (a table larger than one storage binding is split this way).
pub fn embed_tokens_slice_into(
    gpu: &Gpu,
    ids: &[u32],
    batch: usize,
    tokens: &Tensor,
    first_id: usize,
    positions: &Tensor,
    out: &Tensor,
) -> Result<()> {
    const OP: &str = "embed_tokens";
    if batch == 0 || !ids.len().is_multiple_of(batch) {
        return Err(Error::shape(
            OP,
            format!("{} ids do not split into batch {batch}", ids.len()),
        ));
    }
    let n = ids.len() / batch;
    let (ts, ps) = (tokens.shape(), positions.shape());
    if ts.len() != 2 || ps.len() != 2 || ts[1] != ps[1] || ps[0] < n {
        return Err(Error::shape(
            OP,
            format!("tokens {tokens:?} [V, C] and positions {positions:?} [P >= {n}, C]"),
        ));
    }
    same_dtype(OP, &[tokens, positions])?;
    let c = ts[1];
    check_out(
        OP,
        out,
        &[batch, n, c],
        tokens.dtype(),
        &[tokens, positions],
    )?;
    let ids_t = upload_u32(gpu, ids)?;
    let items = out.numel();
    let params = Params {
        n: u32_of(OP, items)?,
        d: [
            c as u32,
            n as u32,
            u32_of(OP, first_id)?,
            u32_of(OP, first_id + ts[0])?,
            0,
        ],
        ..Default::default()
    };
    let work = Work {
        flops: items as f64,
        bytes: 3.0 * out.size_bytes() as f64,
    };
    launch(
        gpu,
        OP,
        OP,
        &[tokens, positions, out, &ids_t],
        params,
        items,
        work,
    )
}

/// `out[b, :] = x[b, idx[b], :]` for x [B, N, C] (CLIP's pooled output at the EOS token).
pub fn gather_rows(gpu: &Gpu, x: &Tensor, idx: &[u32]) -> Result<Tensor> {
    if x.shape().len() != 3 {
        return Err(Error::shape(
            "gather_rows",
            format!("input {x:?} must be [B, N, C]"),
        ));
    }
    let out = gpu.empty(&[x.dim(0), x.dim(2)], x.dtype())?;
    gather_rows_into(gpu, x, idx, &out)?;
    Ok(out)
}

pub fn gather_rows_into(gpu: &Gpu, x: &Tensor, idx: &[u32], out: &Tensor) -> Result<()> {
    const OP: &str = "gather_rows";
    let [b, n, c] = match *x.shape() {
        [b, n, c] => [b, n, c],
        _ => return Err(Error::shape(OP, format!("input {x:?} must be [B, N, C]"))),
    };
    if idx.len() != b {
        return Err(Error::shape(
            OP,
            format!("{} indices for batch {b}", idx.len()),
        ));
    }
    if let Some(&bad) = idx.iter().find(|&&i| i as usize >= n) {
        return Err(Error::shape(
            OP,
            format!("row {bad} is outside the {n} rows of {x:?}"),
        ));
    }
    check_out(OP, out, &[b, c], x.dtype(), &[x])?;
    let idx_t = upload_u32(gpu, idx)?;
    let items = out.numel();
    let params = Params {
        n: u32_of(OP, items)?,
        d: [c as u32, n as u32, 0, 0, 0],
        ..Default::default()
    };
    let work = Work {
        flops: 0.0,
        bytes: 2.0 * out.size_bytes() as f64,
    };
    launch(gpu, OP, OP, &[x, x, out, &idx_t], params, items, work)
}

// ------------------------------------------------------------------------------ softmax, cast

/// Softmax over the last dim, in f32.
pub fn softmax_last_dim(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let out = like(gpu, x)?;
    softmax_last_dim_into(gpu, x, &out)?;
    Ok(out)
}

pub fn softmax_last_dim_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "softmax_last_dim";
    let Some(&c) = x.shape().last() else {
        return Err(Error::shape(OP, format!("input {x:?} has no last dim")));
    };
    check_out(OP, out, x.shape(), x.dtype(), &[x])?;
    if x.numel() == 0 {
        return Ok(());
    }
    let rows = x.numel() / c;
    let params = Params {
        n: u32_of(OP, rows)?,
        d: [c as u32, 0, 0, 0, 0],
        ..Default::default()
    };
    gpu.dispatch(&Dispatch {
        shader: ShaderId::Elementwise,
        entry: "softmax_rows",
        dtype: x.dtype(),
        overrides: &[],
        tensors: &[x, x, out],
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d(rows as u64),
        label: OP,
        work: Work {
            flops: 5.0 * x.numel() as f64,
            bytes: bytes(&[x, out]),
        },
    })
}

/// Storage dtype conversion (f32 <-> f16; same dtype is a copy).
pub fn cast(gpu: &Gpu, x: &Tensor, to: DType) -> Result<Tensor> {
    let out = gpu.empty(x.shape(), to)?;
    crate::kernels::cast::cast_into(gpu, x, &out)?;
    Ok(out)
}

/// [`cast`] into `out` (its dtype is the target).
pub fn cast_into(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<()> {
    crate::kernels::cast::cast_into(gpu, x, out)
}

// ------------------------------------------------------------------------------ references

fn f64s(x: &[f32]) -> impl Iterator<Item = f64> + '_ {
    x.iter().map(|&v| v as f64)
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// erf in f64 to ~1e-16: the series `erf z = 2/sqrt(pi) exp(-z^2) sum_n 2^n z^(2n+1) / (2n+1)!!`
/// (all terms positive, no cancellation) for |z| < 6, and ±1 beyond (erfc(6) < 3e-17).
pub fn erf(z: f64) -> f64 {
    if !z.is_finite() {
        return if z.is_nan() { z } else { z.signum() };
    }
    let a = z.abs();
    if a >= 6.0 {
        return z.signum();
    }
    let (mut term, mut sum, mut n) = (a, a, 0.0);
    while term > sum * 1e-17 {
        n += 1.0;
        term *= 2.0 * a * a / (2.0 * n + 1.0);
        sum += term;
    }
    let r = 2.0 / std::f64::consts::PI.sqrt() * (-a * a).exp() * sum;
    r.min(1.0).copysign(z)
}

/// erfc in f64 with relative accuracy in the tail: `1 - erf` below 3 (erfc(3) = 2e-5, so at most
/// ~1e-11 relative is lost), the continued fraction `e^-z^2 / sqrt(pi) / (z + (1/2) / (z + 1 / (z +
/// (3/2) / ...)))` above.
pub fn erfc(z: f64) -> f64 {
    if z < 3.0 {
        return 1.0 - erf(z);
    }
    let mut f = z;
    for k in (1..=200).rev() {
        f = z + (k as f64 / 2.0) / f;
    }
    (-z * z).exp() / (std::f64::consts::PI.sqrt() * f)
}

pub fn reference_add(a: &[f32], b: &[f32]) -> Vec<f64> {
    f64s(a).zip(f64s(b)).map(|(x, y)| x + y).collect()
}

pub fn reference_mul(a: &[f32], b: &[f32]) -> Vec<f64> {
    f64s(a).zip(f64s(b)).map(|(x, y)| x * y).collect()
}

pub fn reference_scale(a: &[f32], s: f32) -> Vec<f64> {
    f64s(a).map(|x| x * s as f64).collect()
}

pub fn reference_relu(x: &[f32]) -> Vec<f64> {
    f64s(x).map(|v| v.max(0.0)).collect()
}

pub fn reference_tanh_clamp(x: &[f32], m: f32) -> Vec<f64> {
    let m = m as f64;
    f64s(x).map(|v| m * (v / m).tanh()).collect()
}

/// `x · s + t`, with `s` and `t` as the kernel sees them (f32).
pub fn reference_affine(x: &[f32], s: f32, t: f32) -> Vec<f64> {
    f64s(x).map(|v| v * s as f64 + t as f64).collect()
}

pub fn reference_silu(x: &[f32]) -> Vec<f64> {
    f64s(x).map(|v| v * sigmoid(v)).collect()
}

pub fn reference_gelu(x: &[f32]) -> Vec<f64> {
    // x * Phi(x) with Phi from erfc on the left, so the tail keeps its relative accuracy.
    let phi = |v: f64| {
        if v < 0.0 {
            0.5 * erfc(-v / std::f64::consts::SQRT_2)
        } else {
            1.0 - 0.5 * erfc(v / std::f64::consts::SQRT_2)
        }
    };
    f64s(x).map(|v| v * phi(v)).collect()
}

pub fn reference_quick_gelu(x: &[f32]) -> Vec<f64> {
    f64s(x).map(|v| v * sigmoid(1.702 * v)).collect()
}

pub fn reference_copy(x: &[f32]) -> Vec<f64> {
    f64s(x).collect()
}

pub fn reference_cast(x: &[f32], to: DType) -> Vec<f64> {
    crate::kernels::cast::reference(x, to)
}

/// `x` [B, M, C] (flattened middle), `v` [B, C].
pub fn reference_add_channel_bias(x: &[f32], v: &[f32], batch: usize, c: usize) -> Vec<f64> {
    let per = x.len() / batch;
    x.iter()
        .enumerate()
        .map(|(i, &a)| a as f64 + v[(i / per) * c + i % c] as f64)
        .collect()
}

/// Rows of `c1` and `c2` values concatenated row by row.
pub fn reference_concat_channels(a: &[f32], b: &[f32], c1: usize, c2: usize) -> Vec<f64> {
    let rows = a
        .len()
        .checked_div(c1)
        .unwrap_or_else(|| b.len() / c2.max(1));
    let mut out = Vec::with_capacity(a.len() + b.len());
    for p in 0..rows {
        out.extend(f64s(&a[p * c1..(p + 1) * c1]));
        out.extend(f64s(&b[p * c2..(p + 1) * c2]));
    }
    out
}

/// `x` is NHWC with `shape` [B, H, W, C].
pub fn reference_upsample_nearest2x(x: &[f32], shape: [usize; 4]) -> Vec<f64> {
    let [b, h, w, c] = shape;
    let mut out = Vec::with_capacity(x.len() * 4);
    for bi in 0..b {
        for y in 0..2 * h {
            for xx in 0..2 * w {
                let src = ((bi * h + y / 2) * w + xx / 2) * c;
                out.extend(f64s(&x[src..src + c]));
            }
        }
    }
    out
}

pub fn reference_concat_batch(a: &[f32], b: &[f32]) -> Vec<f64> {
    f64s(a).chain(f64s(b)).collect()
}

/// `shape` is the input's [B, C, H, W].
pub fn reference_nchw_to_nhwc(x: &[f32], shape: [usize; 4]) -> Vec<f64> {
    let [b, c, h, w] = shape;
    let mut out = Vec::with_capacity(x.len());
    for bi in 0..b {
        for y in 0..h {
            for xx in 0..w {
                for ch in 0..c {
                    out.push(x[((bi * c + ch) * h + y) * w + xx] as f64);
                }
            }
        }
    }
    out
}

/// `shape` is the input's [B, H, W, C].
pub fn reference_nhwc_to_nchw(x: &[f32], shape: [usize; 4]) -> Vec<f64> {
    let [b, h, w, c] = shape;
    let mut out = Vec::with_capacity(x.len());
    for bi in 0..b {
        for ch in 0..c {
            for y in 0..h {
                for xx in 0..w {
                    out.push(x[((bi * h + y) * w + xx) * c + ch] as f64);
                }
            }
        }
    }
    out
}

/// diffusers `get_timestep_embedding`: the phase `t * freq` is an f32 product (as torch computes
/// it), its sine and cosine are exact (f64).
pub fn reference_timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
) -> Vec<f64> {
    let freqs = timestep_frequencies(dim, freq_shift);
    let half = dim / 2;
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f64> = freqs.iter().map(|&f| (t * f) as f64).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        out.resize(out.len() + (dim - 2 * half), 0.0);
    }
    out
}

pub fn reference_softmax_last_dim(x: &[f32], c: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(c) {
        let m = f64s(row).fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = f64s(row).map(|v| (v - m).exp()).sum();
        out.extend(f64s(row).map(|v| (v - m).exp() / s));
    }
    out
}

/// `ids` [B, N] into `tokens` [V, c] plus `positions` [P, c] rows 0..N.
pub fn reference_embed_tokens(
    ids: &[u32],
    batch: usize,
    tokens: &[f32],
    positions: &[f32],
    c: usize,
) -> Vec<f64> {
    let n = ids.len() / batch;
    let mut out = Vec::with_capacity(ids.len() * c);
    for (r, &id) in ids.iter().enumerate() {
        let p = r % n;
        for j in 0..c {
            out.push(tokens[id as usize * c + j] as f64 + positions[p * c + j] as f64);
        }
    }
    out
}

/// `x` [B, N, C] with `shape`.
pub fn reference_gather_rows(x: &[f32], shape: [usize; 3], idx: &[u32]) -> Vec<f64> {
    let [_, n, c] = shape;
    let mut out = Vec::with_capacity(idx.len() * c);
    for (b, &i) in idx.iter().enumerate() {
        let at = (b * n + i as usize) * c;
        out.extend(f64s(&x[at..at + c]));
    }
    out
}
