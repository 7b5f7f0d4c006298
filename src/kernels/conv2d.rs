//! `shaders/conv2d.wgsl`: 2-D convolution as an implicit GEMM on NHWC activations, with bias and
//! residual add fused into the store. Covers every (kh, kw, stride, padding) including the
//! asymmetric padding of the VAE encoder's Downsample2D (`F.pad(x, (0, 1, 0, 1))`, then stride 2).
//!
//! Weights are reordered once on the host from PyTorch's [Cout, Cin, KH, KW] to
//! [Cout, KH, KW, Cin] ([`weight_oihw_to_ohwi`]) so that the GEMM's K index is contiguous in both
//! operands.

use bytemuck::{Pod, Zeroable};

use crate::runtime::{grid_1d, Dispatch, Gpu, Tensor, Work};
use crate::{Error, Result};

/// Output tile of one workgroup (pixels × output channels), fixed by the shader's thread layout.
const TILE_M: usize = 64;
const TILE_N: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    batch: u32,
    h: u32,
    w: u32,
    cin: u32,
    ho: u32,
    wo: u32,
    cout: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    m: u32,
    k: u32,
    n_tiles: u32,
    flags: u32,
}

/// One convolution of Stable Diffusion 1.5 at 512×512 (64×64 latents):
/// (name, batch, height, width, cin, cout, kernel size, stride). Padding is `k / 2` on every side
/// (diffusers' `Conv2d(..., padding=1)` for 3×3, 0 for 1×1). U-Net rows use batch 2
/// (classifier-free guidance); VAE decoder rows batch 1. Each distinct shape is listed once (e.g.
/// "unet.res 320 64x64" stands for down-block 0's four resnet convs and up-block 3's conv2s).
#[rustfmt::skip]
/// (name, batch, height, width, c_in, c_out, kernel, stride)
pub type ConvCase = (&'static str, usize, usize, usize, usize, usize, usize, usize);

pub const SD15_SHAPES: &[ConvCase] = &[
    // U-Net (diffusers UNet2DConditionModel, stable-diffusion-v1-5/unet/config.json)
    ("unet.conv_in", 2, 64, 64, 4, 320, 3, 1),
    ("unet.res 320 64x64", 2, 64, 64, 320, 320, 3, 1),
    ("unet.proj_in/out 320 64x64", 2, 64, 64, 320, 320, 1, 1),
    ("unet.down0.downsample", 2, 64, 64, 320, 320, 3, 2),
    ("unet.down1.res0.conv1", 2, 32, 32, 320, 640, 3, 1),
    ("unet.down1.res0.shortcut", 2, 32, 32, 320, 640, 1, 1),
    ("unet.res 640 32x32", 2, 32, 32, 640, 640, 3, 1),
    ("unet.proj_in/out 640 32x32", 2, 32, 32, 640, 640, 1, 1),
    ("unet.down1.downsample", 2, 32, 32, 640, 640, 3, 2),
    ("unet.down2.res0.conv1", 2, 16, 16, 640, 1280, 3, 1),
    ("unet.down2.res0.shortcut", 2, 16, 16, 640, 1280, 1, 1),
    ("unet.res 1280 16x16", 2, 16, 16, 1280, 1280, 3, 1),
    ("unet.proj_in/out 1280 16x16", 2, 16, 16, 1280, 1280, 1, 1),
    ("unet.down2.downsample", 2, 16, 16, 1280, 1280, 3, 2),
    ("unet.res 1280 8x8", 2, 8, 8, 1280, 1280, 3, 1),
    ("unet.mid.proj_in/out 1280 8x8", 2, 8, 8, 1280, 1280, 1, 1),
    ("unet.up0.res.conv1 2560 8x8", 2, 8, 8, 2560, 1280, 3, 1),
    ("unet.up0.res.shortcut 2560 8x8", 2, 8, 8, 2560, 1280, 1, 1),
    ("unet.up0.upsample 16x16", 2, 16, 16, 1280, 1280, 3, 1),
    ("unet.up1.res.conv1 2560 16x16", 2, 16, 16, 2560, 1280, 3, 1),
    (
        "unet.up1.res.shortcut 2560 16x16",
        2,
        16,
        16,
        2560,
        1280,
        1,
        1,
    ),
    (
        "unet.up1.res2.conv1 1920 16x16",
        2,
        16,
        16,
        1920,
        1280,
        3,
        1,
    ),
    (
        "unet.up1.res2.shortcut 1920 16x16",
        2,
        16,
        16,
        1920,
        1280,
        1,
        1,
    ),
    ("unet.up1.upsample 32x32", 2, 32, 32, 1280, 1280, 3, 1),
    ("unet.up2.res0.conv1 1920 32x32", 2, 32, 32, 1920, 640, 3, 1),
    (
        "unet.up2.res0.shortcut 1920 32x32",
        2,
        32,
        32,
        1920,
        640,
        1,
        1,
    ),
    ("unet.up2.res1.conv1 1280 32x32", 2, 32, 32, 1280, 640, 3, 1),
    (
        "unet.up2.res1.shortcut 1280 32x32",
        2,
        32,
        32,
        1280,
        640,
        1,
        1,
    ),
    ("unet.up2.res2.conv1 960 32x32", 2, 32, 32, 960, 640, 3, 1),
    (
        "unet.up2.res2.shortcut 960 32x32",
        2,
        32,
        32,
        960,
        640,
        1,
        1,
    ),
    ("unet.up2.upsample 64x64", 2, 64, 64, 640, 640, 3, 1),
    ("unet.up3.res0.conv1 960 64x64", 2, 64, 64, 960, 320, 3, 1),
    (
        "unet.up3.res0.shortcut 960 64x64",
        2,
        64,
        64,
        960,
        320,
        1,
        1,
    ),
    ("unet.up3.res.conv1 640 64x64", 2, 64, 64, 640, 320, 3, 1),
    ("unet.up3.res.shortcut 640 64x64", 2, 64, 64, 640, 320, 1, 1),
    ("unet.conv_out", 2, 64, 64, 320, 4, 3, 1),
    // VAE decoder (diffusers AutoencoderKL, stable-diffusion-v1-5/vae/config.json)
    ("vae.post_quant_conv", 1, 64, 64, 4, 4, 1, 1),
    ("vae.dec.conv_in", 1, 64, 64, 4, 512, 3, 1),
    ("vae.dec.res 512 64x64", 1, 64, 64, 512, 512, 3, 1),
    ("vae.dec.up0.upsample 128x128", 1, 128, 128, 512, 512, 3, 1),
    ("vae.dec.res 512 128x128", 1, 128, 128, 512, 512, 3, 1),
    ("vae.dec.up1.upsample 256x256", 1, 256, 256, 512, 512, 3, 1),
    (
        "vae.dec.up2.res0.conv1 512->256",
        1,
        256,
        256,
        512,
        256,
        3,
        1,
    ),
    (
        "vae.dec.up2.res0.shortcut 512->256",
        1,
        256,
        256,
        512,
        256,
        1,
        1,
    ),
    ("vae.dec.res 256 256x256", 1, 256, 256, 256, 256, 3, 1),
    ("vae.dec.up2.upsample 512x512", 1, 512, 512, 256, 256, 3, 1),
    (
        "vae.dec.up3.res0.conv1 256->128",
        1,
        512,
        512,
        256,
        128,
        3,
        1,
    ),
    (
        "vae.dec.up3.res0.shortcut 256->128",
        1,
        512,
        512,
        256,
        128,
        1,
        1,
    ),
    ("vae.dec.res 128 512x512", 1, 512, 512, 128, 128, 3, 1),
    ("vae.dec.conv_out", 1, 512, 512, 128, 3, 3, 1),
];

/// Output spatial size for one axis, `None` if the padded input is smaller than the kernel.
fn out_size(n: usize, pad_a: usize, pad_b: usize, k: usize, stride: usize) -> Option<usize> {
    let padded = n + pad_a + pad_b;
    if stride == 0 || k == 0 || padded < k {
        return None;
    }
    Some((padded - k) / stride + 1)
}

/// Output shape [B, Ho, Wo, Cout] of a convolution, checking x / w against each other.
fn output_shape(x: &Tensor, w: &Tensor, stride: usize, pads: [usize; 4]) -> Result<[usize; 4]> {
    let op = "conv2d";
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() != 4 {
        return Err(Error::shape(
            op,
            format!("x must be NHWC [B, H, W, Cin], got {:?}", xs),
        ));
    }
    if ws.len() != 4 {
        return Err(Error::shape(
            op,
            format!("w must be [Cout, KH, KW, Cin] (reorder PyTorch weights with weight_oihw_to_ohwi), got {:?}", ws),
        ));
    }
    if ws[3] != xs[3] {
        return Err(Error::shape(
            op,
            format!(
                "w {:?} has Cin = {} but x {:?} has {} channels",
                ws, ws[3], xs, xs[3]
            ),
        ));
    }
    if xs.contains(&0) || ws.contains(&0) {
        return Err(Error::shape(
            op,
            format!("empty tensor: x {:?}, w {:?}", xs, ws),
        ));
    }
    if stride == 0 {
        return Err(Error::shape(op, "stride must be at least 1"));
    }
    let ho = out_size(xs[1], pads[0], pads[1], ws[1], stride);
    let wo = out_size(xs[2], pads[2], pads[3], ws[2], stride);
    match (ho, wo) {
        (Some(ho), Some(wo)) => Ok([xs[0], ho, wo, ws[0]]),
        _ => Err(Error::shape(
            op,
            format!(
                "kernel {}x{} larger than the padded input {:?} (pads [t, b, l, r] = {:?})",
                ws[1], ws[2], xs, pads
            ),
        )),
    }
}

/// 2-D convolution: `x` [B, H, W, Cin] NHWC, `w` [Cout, KH, KW, Cin], `bias` [Cout],
/// `residual` [B, Ho, Wo, Cout] added after the bias. `pads = [top, bottom, left, right]`;
/// Ho = (H + top + bottom - KH) / stride + 1, likewise Wo. Returns [B, Ho, Wo, Cout].
pub fn conv2d(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    stride: usize,
    pads: [usize; 4],
) -> Result<Tensor> {
    let shape = output_shape(x, w, stride, pads)?;
    let out = gpu.empty(&shape, x.dtype())?;
    conv2d_into(gpu, x, w, bias, residual, stride, pads, &out)?;
    Ok(out)
}

/// [`conv2d`] into a given output tensor (which must not share a buffer with any input).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_into(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    stride: usize,
    pads: [usize; 4],
    out: &Tensor,
) -> Result<()> {
    let op = "conv2d";
    let [b, ho, wo, cout] = output_shape(x, w, stride, pads)?;
    let dtype = x.dtype();
    let mut inputs = vec![("x", x), ("w", w)];
    if let Some(t) = bias {
        if t.shape() != [cout] {
            return Err(Error::shape(
                op,
                format!("bias must be [{cout}], got {:?}", t.shape()),
            ));
        }
        inputs.push(("bias", t));
    }
    if let Some(t) = residual {
        if t.shape() != [b, ho, wo, cout] {
            return Err(Error::shape(
                op,
                format!(
                    "residual must be {:?}, got {:?}",
                    [b, ho, wo, cout],
                    t.shape()
                ),
            ));
        }
        inputs.push(("residual", t));
    }
    if out.shape() != [b, ho, wo, cout] {
        return Err(Error::shape(
            op,
            format!("out must be {:?}, got {:?}", [b, ho, wo, cout], out.shape()),
        ));
    }
    for (name, t) in inputs.iter().chain([("out", out)].iter()) {
        if t.dtype() != dtype {
            return Err(Error::shape(
                op,
                format!("{name} is {} but x is {}", t.dtype().name(), dtype.name()),
            ));
        }
    }
    for (name, t) in &inputs {
        if t.buffer_id() == out.buffer_id() {
            return Err(Error::shape(
                op,
                format!("out shares its buffer with {name}: convolution cannot run in place"),
            ));
        }
    }
    let [_, h, wi, cin] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let [kh, kw] = [w.shape()[1], w.shape()[2]];
    let m = b * ho * wo;
    let k = kh * kw * cin;
    // The shader indexes in u32 elements; the binding limits keep tensors far below this, but a
    // pathological shape on a huge-binding adapter must not wrap silently.
    let too_big = [x.numel(), w.numel(), out.numel(), m, k]
        .iter()
        .any(|&v| v >= u32::MAX as usize / 2)
        || [h, wi, stride, pads[0], pads[2]]
            .iter()
            .any(|&v| v >= i32::MAX as usize / 4);
    if too_big {
        return Err(Error::shape(
            op,
            format!(
                "shapes too large for 32-bit indexing: x {:?}, w {:?}",
                x.shape(),
                w.shape()
            ),
        ));
    }

    let n_tiles = cout.div_ceil(TILE_N);
    let m_tiles = m.div_ceil(TILE_M);
    let flags = bias.is_some() as u32 | (residual.is_some() as u32) << 1;
    let params = Params {
        batch: b as u32,
        h: h as u32,
        w: wi as u32,
        cin: cin as u32,
        ho: ho as u32,
        wo: wo as u32,
        cout: cout as u32,
        kh: kh as u32,
        kw: kw as u32,
        stride: stride as u32,
        pad_top: pads[0] as u32,
        pad_left: pads[2] as u32,
        m: m as u32,
        k: k as u32,
        n_tiles: n_tiles as u32,
        flags,
    };
    // BK = 32 halves the barriers per FLOP; its tiles need 18 KiB of workgroup memory, 2 KiB over
    // WebGPU's minimum, so fall back to 16 on adapters that only offer the minimum.
    let bk = if gpu.caps.max_workgroup_storage >= 18_432 {
        32.0
    } else {
        16.0
    };
    let vec4_k = if cin % 4 == 0 { 1.0 } else { 0.0 };
    // Unused bias / residual bindings get x (read-only like them) as a placeholder.
    let tensors = [x, w, bias.unwrap_or(x), residual.unwrap_or(x), out];
    let bytes = (x.size_bytes()
        + w.size_bytes()
        + out.size_bytes()
        + bias.map_or(0, |t| t.size_bytes())
        + residual.map_or(0, |t| t.size_bytes())) as f64;
    gpu.dispatch(&Dispatch {
        shader: "conv2d",
        entry: "conv2d",
        dtype,
        overrides: &[("BK", bk), ("VEC4_K", vec4_k)],
        tensors: &tensors,
        params: bytemuck::bytes_of(&params),
        workgroups: grid_1d((m_tiles * n_tiles) as u64),
        label: "conv2d",
        work: Work {
            flops: 2.0 * (m * cout * k) as f64,
            bytes,
        },
    })
}

/// PyTorch's conv weight [Cout, Cin, KH, KW] reordered to [Cout, KH, KW, Cin] (done once, at
/// weight-load time). Panics if `w.len() != cout·cin·kh·kw` (a loader bug, not user input: the
/// weight loader checks checkpoint shapes first).
pub fn weight_oihw_to_ohwi(w: &[f32], cout: usize, cin: usize, kh: usize, kw: usize) -> Vec<f32> {
    assert_eq!(
        w.len(),
        cout * cin * kh * kw,
        "weight_oihw_to_ohwi: {} values for [{cout}, {cin}, {kh}, {kw}]",
        w.len()
    );
    let mut out = vec![0.0; w.len()];
    for o in 0..cout {
        for i in 0..cin {
            for y in 0..kh {
                for x in 0..kw {
                    out[((o * kh + y) * kw + x) * cin + i] = w[((o * cin + i) * kh + y) * kw + x];
                }
            }
        }
    }
    out
}

/// The specification: direct convolution in f64 over NHWC `x`, OHWI `w_ohwi`, with zero padding
/// `pads = [top, bottom, left, right]`, then `+ bias[co] + residual[b, oy, ox, co]`.
/// Returns [B, Ho, Wo, Cout].
#[allow(clippy::too_many_arguments)]
pub fn reference(
    x: &[f32],
    w_ohwi: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    b: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pads: [usize; 4],
) -> Vec<f64> {
    let ho = out_size(h, pads[0], pads[1], kh, stride).expect("kernel larger than padded input");
    let wo = out_size(w, pads[2], pads[3], kw, stride).expect("kernel larger than padded input");
    assert_eq!(x.len(), b * h * w * cin);
    assert_eq!(w_ohwi.len(), cout * kh * kw * cin);
    let mut out = vec![0.0f64; b * ho * wo * cout];
    for bi in 0..b {
        for oy in 0..ho {
            for ox in 0..wo {
                let o = ((bi * ho + oy) * wo + ox) * cout;
                for co in 0..cout {
                    let mut acc = bias.map_or(0.0, |bs| bs[co] as f64);
                    for ky in 0..kh {
                        let iy = (oy * stride + ky) as isize - pads[0] as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..kw {
                            let ix = (ox * stride + kx) as isize - pads[2] as isize;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            let xr = &x[((bi * h + iy as usize) * w + ix as usize) * cin..][..cin];
                            let wr = &w_ohwi[((co * kh + ky) * kw + kx) * cin..][..cin];
                            acc += xr
                                .iter()
                                .zip(wr)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>();
                        }
                    }
                    if let Some(r) = residual {
                        acc += r[o + co] as f64;
                    }
                    out[o + co] = acc;
                }
            }
        }
    }
    out
}
