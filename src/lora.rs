//! Applying a LoRA layer to a loaded weight, on the GPU: `W' = W + scale · up · [mid] · down`
//! with our own matmul kernel, in the layout our kernels keep weights in ([out, in] for linears,
//! [out, kh, kw, in] for convs).
//!
//! The host only converts the file's tensors to f32 and reorders them (transposes and the
//! OIHW → OHWI permutation the conv loader also does): data layout, no arithmetic. The products
//! and the sum with `W` run in the matmul kernel (f32 accumulation, one rounding to the weight's
//! dtype, the sum fused as its residual epilogue).
//!
//! Tucker-decomposed convs (`lora_mid`): `ΔW[o,i,h,w] = Σ_ab up[o,a]·mid[a,b,h,w]·down[b,i]`,
//! as two products: `T[o,(h,w,b)] = up · mid'` with mid reordered to [a, h, w, b], which read as
//! [(o,h,w), b] is exactly the left operand of `T · down`, whose result is [(o,h,w), i]: our conv
//! layout, with no reordering on the GPU.

use crate::kernels::matmul::{self, Activation};
use crate::weights::lora::{Lora, LoraLayer};
use crate::{Error, Gpu, Result, Tensor};

/// The file's tensor as f32, with its shape.
fn host(lora: &Lora, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let t = lora.tensor(name)?;
    Ok((t.to_f32_vec(), t.shape.clone()))
}

/// `m` [rows, cols] row-major → [cols, rows].
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = m[r * cols + c];
        }
    }
    out
}

/// [a, b, h, w] → [a, h, w, b] (the last of the first two axes moved innermost).
fn move_axis1_last(t: &[f32], a: usize, b: usize, hw: usize) -> Vec<f32> {
    let mut out = vec![0.0; t.len()];
    for i in 0..a {
        for j in 0..b {
            for s in 0..hw {
                out[(i * hw + s) * b + j] = t[(i * b + j) * hw + s];
            }
        }
    }
    out
}

/// `base + scale · ΔW` for one layer, as a new tensor of `base`'s shape and dtype (`base` in our
/// layout: [out, in] or [out, kh, kw, in]).
pub fn merged_weight(
    gpu: &Gpu,
    lora: &Lora,
    layer: &LoraLayer,
    base: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let dtype = base.dtype();
    let ws = &layer.weight_shape; // torch layout: [out, in(, kh, kw)]
    let (out, cin) = (ws[0], ws[1]);
    let spatial: usize = ws[2..].iter().product();
    let ours: Vec<usize> = match ws.len() {
        2 => vec![out, cin],
        _ => vec![out, ws[2], ws[3], cin],
    };
    if base.shape() != ours.as_slice() {
        return Err(Error::shape(
            "lora",
            format!(
                "{}: weight {:?}, LoRA made for {ws:?}",
                layer.key,
                base.shape()
            ),
        ));
    }
    let r = layer.rank;
    let (up, _) = host(lora, &layer.up)?;
    // The user's weight and alpha/rank scale the up matrix (on the GPU).
    let up = crate::kernels::elementwise::scale(gpu, &gpu.upload(&up, &[out, r], dtype)?, scale)?;
    let (down, dshape) = host(lora, &layer.down)?;
    let flat_base = base.reshape(&[out, cin * spatial])?;
    let merged = match &layer.mid {
        None => {
            // down [r, in(, kh, kw)] → [r, kh, kw, in] → transposed [(kh, kw, in), r].
            let k_hw: usize = dshape[2..].iter().product();
            let down = move_axis1_last(&down, r, cin, k_hw);
            let down_t = gpu.upload(&transpose(&down, r, cin * k_hw), &[cin * k_hw, r], dtype)?;
            matmul::linear(gpu, &up, &down_t, None, Some(&flat_base), Activation::None)?
        }
        Some(mid) => {
            let (mid, _) = host(lora, mid)?;
            // mid [a, b, h, w] → [a, h, w, b] → transposed [(h, w, b), a].
            let mid = move_axis1_last(&mid, r, r, spatial);
            let mid_t = gpu.upload(&transpose(&mid, r, spatial * r), &[spatial * r, r], dtype)?;
            let t = matmul::linear(gpu, &up, &mid_t, None, None, Activation::None)?; // [o, (h w b)]
            let t = t.reshape(&[out * spatial, r])?;
            let down_t = gpu.upload(&transpose(&down, r, cin), &[cin, r], dtype)?; // [in, b]
            let base_rows = base.reshape(&[out * spatial, cin])?;
            matmul::linear(gpu, &t, &down_t, None, Some(&base_rows), Activation::None)?
        }
    };
    merged.reshape(base.shape())
}

/// The specification in f64: `base + scale · ΔW` in our layout, from the file's tensors.
pub fn reference_merged(
    lora: &Lora,
    layer: &LoraLayer,
    base: &[f32],
    scale: f32,
) -> Result<Vec<f64>> {
    let ws = &layer.weight_shape;
    let (out, cin) = (ws[0], ws[1]);
    let (kh, kw) = if ws.len() == 4 {
        (ws[2], ws[3])
    } else {
        (1, 1)
    };
    let r = layer.rank;
    let (up, _) = host(lora, &layer.up)?;
    let (down, dshape) = host(lora, &layer.down)?;
    let down_hw = dshape[2..].iter().product::<usize>();
    let mid = layer.mid.as_ref().map(|m| host(lora, m)).transpose()?;
    let mut result = vec![0.0f64; out * kh * kw * cin];
    for o in 0..out {
        for h in 0..kh {
            for w in 0..kw {
                for i in 0..cin {
                    let mut delta = 0.0f64;
                    for a in 0..r {
                        let u = up[o * r + a] as f64;
                        match &mid {
                            None => {
                                let d = if down_hw == 1 {
                                    down[a * cin + i]
                                } else {
                                    down[((a * cin + i) * kh + h) * kw + w]
                                };
                                delta += u * d as f64;
                            }
                            Some((m, _)) => {
                                for b in 0..r {
                                    let mv = m[((a * r + b) * kh + h) * kw + w] as f64;
                                    delta += u * mv * down[b * cin + i] as f64;
                                }
                            }
                        }
                    }
                    let at = ((o * kh + h) * kw + w) * cin + i;
                    result[at] = base[at] as f64 + scale as f64 * delta;
                }
            }
        }
    }
    Ok(result)
}
