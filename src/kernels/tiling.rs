//! `shaders/tiling.wgsl`: the tensor work of the tiled VAE (a port of diffusers
//! `AutoencoderKL.tiled_decode` / `_tiled_encode`, `blend_v`, `blend_h`): cropping an overlapping
//! window out of an NHWC tensor, and blending a processed tile against its neighbours before
//! writing its `row_limit` window into the assembled output. The `reference_*` functions are the
//! specification, in f64.

use crate::shaders::ShaderId;
use bytemuck::{Pod, Zeroable};

use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::{Error, Result};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    src_h: u32,
    src_w: u32,
    y0: u32,
    x0: u32,
    ev: u32,
    eh: u32,
    out_h: u32,
    out_w: u32,
    keep_h: u32,
    keep_w: u32,
}

fn u32_of(op: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::shape(op, format!("{v} does not fit 32-bit indexing")))
}

fn rank4(op: &str, t: &Tensor) -> Result<[usize; 4]> {
    match *t.shape() {
        [b, h, w, c] => Ok([b, h, w, c]),
        _ => Err(Error::shape(op, format!("{t:?} must be [B, H, W, C]"))),
    }
}

fn launch(
    gpu: &Gpu,
    entry: &'static str,
    tensors: &[&Tensor],
    params: Params,
    bytes: f64,
) -> Result<()> {
    if params.n == 0 {
        return Ok(());
    }
    gpu.dispatch(&Dispatch {
        shader: ShaderId::Tiling,
        entry,
        dtype: tensors[2].dtype(),
        overrides: &[],
        tensors,
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d((params.n as u64).div_ceil(256)),
        label: entry,
        work: Work { flops: 0.0, bytes },
    })
}

// ------------------------------------------------------------------------------------ crop

/// `x[:, y0 .. y0 + h, x0 .. x0 + w, :]` of an NHWC tensor, as a new tensor [B, h, w, C] (torch's
/// `z[:, :, i : i + tile, j : j + tile]` in NCHW; the caller clips the window to the input, as
/// Python slicing does).
pub fn crop(gpu: &Gpu, x: &Tensor, y0: usize, x0: usize, h: usize, w: usize) -> Result<Tensor> {
    let [b, _, _, c] = rank4("crop", x)?;
    let out = gpu.empty(&[b, h, w, c], x.dtype())?;
    crop_into(gpu, x, y0, x0, &out)?;
    Ok(out)
}

/// Crop the window of `out`'s size at (y0, x0) into `out`.
pub fn crop_into(gpu: &Gpu, x: &Tensor, y0: usize, x0: usize, out: &Tensor) -> Result<()> {
    const OP: &str = "crop";
    let [b, sh, sw, c] = rank4(OP, x)?;
    let [ob, h, w, oc] = rank4(OP, out)?;
    if ob != b || oc != c || out.dtype() != x.dtype() || y0 + h > sh || x0 + w > sw {
        return Err(Error::shape(
            OP,
            format!("window {h}×{w} at ({y0}, {x0}) into {out:?} does not fit in {x:?}"),
        ));
    }
    if out.buffer_id() == x.buffer_id() {
        return Err(Error::shape(
            OP,
            "the output shares a buffer with the input",
        ));
    }
    let params = Params {
        n: u32_of(OP, out.numel())?,
        c: c as u32,
        h: h as u32,
        w: w as u32,
        src_h: sh as u32,
        src_w: sw as u32,
        y0: y0 as u32,
        x0: x0 as u32,
        ..Default::default()
    };
    launch(
        gpu,
        "crop_window",
        &[x, x, out],
        params,
        2.0 * out.size_bytes() as f64,
    )
}

/// Specification of [`crop`]: `x` is [B, H, W, C].
pub fn reference_crop(
    x: &[f32],
    shape: [usize; 4],
    y0: usize,
    x0: usize,
    h: usize,
    w: usize,
) -> Vec<f64> {
    let [b, sh, sw, c] = shape;
    let mut out = Vec::with_capacity(b * h * w * c);
    for bi in 0..b {
        for y in 0..h {
            for xi in 0..w {
                let base = ((bi * sh + y0 + y) * sw + x0 + xi) * c;
                out.extend(x[base..base + c].iter().map(|&v| v as f64));
            }
        }
    }
    out
}

// ------------------------------------------------------------------------------------ blend

/// How one processed tile joins the assembled output (diffusers' per-tile loop body).
#[derive(Clone, Copy)]
pub struct TileBlend<'a> {
    /// The tile above, already blended: [B, Ha, w, C] (same width as the tile).
    pub above: Option<&'a Tensor>,
    /// The tile to the left, already blended: [B, h, Wl, C] (same height as the tile).
    pub left: Option<&'a Tensor>,
    /// diffusers' `blend_extent`; each blend clamps it to both tiles' sizes, as `blend_v` does.
    pub blend_extent: usize,
    /// diffusers' `row_limit`: the tile's `[:row_limit, :row_limit]` window goes to the output.
    pub row_limit: usize,
    /// (row, column) of that window in the output.
    pub origin: [usize; 2],
}

/// Blend `tile` [B, h, w, C] in place against its neighbours (`blend_v` then `blend_h`, linear
/// ramps) and write its kept window into `out` [B, H, W, C] at `origin`. `tile` keeps the blended
/// values: it is the next row's `above` and the next column's `left`.
pub fn blend_tile_into(
    gpu: &Gpu,
    tile: &Tensor,
    blend: &TileBlend<'_>,
    out: &Tensor,
) -> Result<()> {
    const OP: &str = "blend_tile";
    let [b, h, w, c] = rank4(OP, tile)?;
    let [ob, oh, ow, oc] = rank4(OP, out)?;
    let keep_h = blend.row_limit.min(h);
    let keep_w = blend.row_limit.min(w);
    let [oy, ox] = blend.origin;
    if ob != b || oc != c || out.dtype() != tile.dtype() || oy + keep_h > oh || ox + keep_w > ow {
        return Err(Error::shape(
            OP,
            format!(
                "the {keep_h}×{keep_w} window of {tile:?} at ({oy}, {ox}) does not fit in {out:?}"
            ),
        ));
    }
    let (mut src_h, mut ev, mut src_w, mut eh) = (0, 0, 0, 0);
    if let Some(a) = blend.above {
        let [ab, ah, aw, ac] = rank4(OP, a)?;
        if ab != b || aw != w || ac != c || a.dtype() != tile.dtype() {
            return Err(Error::shape(
                OP,
                format!("tile above {a:?} must be [{b}, _, {w}, {c}]"),
            ));
        }
        src_h = ah;
        ev = blend.blend_extent.min(ah).min(h);
    }
    if let Some(l) = blend.left {
        let [lb, lh, lw, lc] = rank4(OP, l)?;
        if lb != b || lh != h || lc != c || l.dtype() != tile.dtype() {
            return Err(Error::shape(
                OP,
                format!("tile to the left {l:?} must be [{b}, {h}, _, {c}]"),
            ));
        }
        src_w = lw;
        eh = blend.blend_extent.min(lw).min(w);
    }
    let ids = [Some(tile), Some(out), blend.above, blend.left].map(|t| t.map(|t| t.buffer_id()));
    for i in 0..ids.len() {
        for j in i + 1..ids.len() {
            if ids[i].is_some() && ids[i] == ids[j] {
                return Err(Error::shape(
                    OP,
                    "tile, output and neighbours must be separate tensors",
                ));
            }
        }
    }
    // Bindings 0 and 1 are read whatever the extents; a tensor of one element stands in for a
    // missing neighbour (it may not alias the read-write tile or output).
    let dummy = if blend.above.is_none() || blend.left.is_none() {
        Some(gpu.empty(&[1], tile.dtype())?)
    } else {
        None
    };
    let above = blend.above.or(dummy.as_ref()).expect("dummy exists");
    let left = blend.left.or(dummy.as_ref()).expect("dummy exists");
    let params = Params {
        n: u32_of(OP, tile.numel())?,
        c: c as u32,
        h: h as u32,
        w: w as u32,
        src_h: src_h as u32,
        src_w: src_w as u32,
        y0: oy as u32,
        x0: ox as u32,
        ev: ev as u32,
        eh: eh as u32,
        out_h: u32_of(OP, oh)?,
        out_w: u32_of(OP, ow)?,
        keep_h: keep_h as u32,
        keep_w: keep_w as u32,
    };
    u32_of(OP, out.numel())?;
    let bytes =
        2.0 * tile.size_bytes() as f64 + (b * keep_h * keep_w * c * tile.dtype().size()) as f64;
    launch(gpu, "blend_tile", &[above, left, tile, out], params, bytes)
}

/// A host tensor for the references: values and NHWC shape.
pub type HostTensor<'a> = (&'a [f32], [usize; 4]);

/// Specification of [`blend_tile_into`], written as diffusers writes it: `blend_v` with the tile
/// above, then `blend_h` with the tile to the left, on the whole tile (weights `y / extent`,
/// extents clamped to both tiles), then the `[:row_limit, :row_limit]` window copied into `out`.
/// Returns the blended tile; `out` ([B, H, W, C]) is updated in place.
pub fn reference_blend_tile(
    tile: HostTensor<'_>,
    above: Option<HostTensor<'_>>,
    left: Option<HostTensor<'_>>,
    (blend_extent, row_limit): (usize, usize),
    origin: [usize; 2],
    (out, out_shape): (&mut [f64], [usize; 4]),
) -> Vec<f64> {
    let (data, [b, h, w, c]) = tile;
    let mut t: Vec<f64> = data.iter().map(|&v| v as f64).collect();
    let at = |bi: usize, y: usize, x: usize, ch: usize, hh: usize, ww: usize| {
        ((bi * hh + y) * ww + x) * c + ch
    };
    if let Some((a, [_, ah, _, _])) = above {
        let e = blend_extent.min(ah).min(h);
        for bi in 0..b {
            for y in 0..e {
                let wgt = y as f64 / e as f64;
                for x in 0..w {
                    for ch in 0..c {
                        let i = at(bi, y, x, ch, h, w);
                        let av = a[at(bi, ah - e + y, x, ch, ah, w)] as f64;
                        t[i] = av * (1.0 - wgt) + t[i] * wgt;
                    }
                }
            }
        }
    }
    if let Some((l, [_, _, lw, _])) = left {
        let e = blend_extent.min(lw).min(w);
        for bi in 0..b {
            for y in 0..h {
                for x in 0..e {
                    let wgt = x as f64 / e as f64;
                    for ch in 0..c {
                        let i = at(bi, y, x, ch, h, w);
                        let lv = l[at(bi, y, lw - e + x, ch, h, lw)] as f64;
                        t[i] = lv * (1.0 - wgt) + t[i] * wgt;
                    }
                }
            }
        }
    }
    let [_, oh, ow, _] = out_shape;
    for bi in 0..b {
        for y in 0..row_limit.min(h) {
            for x in 0..row_limit.min(w) {
                for ch in 0..c {
                    out[at(bi, origin[0] + y, origin[1] + x, ch, oh, ow)] =
                        t[at(bi, y, x, ch, h, w)];
                }
            }
        }
    }
    t
}
