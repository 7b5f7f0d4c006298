// elementwise: memory-bound glue of the models (residual adds, activations, time-embedding bias,
// skip concats, upsampling, layout changes, embeddings, softmax). All tensors are contiguous
// row-major; activations NHWC [B, H, W, C], tokens [B, N, C]. Arithmetic in f32.
//
// Entry points ("4" = one vec4 per thread, "1" = one element per thread). The vec4 entries run
// over ceil(n / 4) vectors even when n % 4 != 0: every buffer is a multiple of 256 bytes
// (BUFFER_GRANULE in runtime/tensor.rs), so the last vector's loads and stores stay inside the
// buffer and only touch its padding.
//   unary4              out = f(a): op 0 copy, 1 a*s, 2 silu, 3 gelu (erf), 4 quick_gelu,
//                       5 relu, 6 s*tanh(a/s) (TAESD's soft clamp), 7 a*s + t (t: d0's f32 bits)
//   binary4             out = a op b: op 0 add, 1 mul                   (same shapes)
//   channel_bias4/1     out[b, m, c] = a[b, m, c] + v[off + b·stride + c]   a [B, M, C]; v a
//                       [B, C] block of a wider table (stride ≥ C, offset off: d2, d3)
//   concat_channels4/1  out[p, :] = [a[p, 0..C1], b[p, 0..C2]]          pixels p = 0..B*H*W
//   upsample2x4/1       out[b, y, x, c] = a[b, y/2, x/2, c]             out [B, 2H, 2W, C]
//   concat_batch4/1     out = [a; b] along the outermost dim
//   timestep_embedding  out[b, j] = sin/cos(t[b] * freq[j mod half]), zero column if dim is odd
//   softmax_rows        out[r, :] = softmax(a[r, :]) over rows of C (one 64-wide workgroup per row)
//   embed_tokens        out[b, n, c] = a[ids[b, n], c] + b[n, c]        (CLIP token + position;
//                       the table may be bound in row slices, see the entry)
//   gather_rows         out[b, c] = a[b, idx[b], c]                      a [B, N, C]
//   nchw_to_nhwc        out[b, h, w, c] = a[b, c, h, w]
//   nhwc_to_nchw        out[b, c, h, w] = a[b, h, w, c]
//   unet_input          the U-Net's input built from the sampler's f32 latents in one pass:
//                       out[r, p, c] = s * lat[r % B, p, c]            c < L
//                                    = mask[r % B, p]                  c = L      (9-channel
//                                    = masked[r % B, p, c - L - 1]     c > L       inpainting)
//                       i.e. scale_model_input, the inpainting channel concat, the CFG batch
//                       duplication and the cast to the model's dtype, none of them a copy of
//                       its own. lat, mask, masked are f32 (bindings 0, 1, 4), out is elem.
//
// Bindings: 0 a (elem or elem4, read), 1 b (elem or elem4, read), 2 out (elem or elem4,
//           read_write), 3 idx (u32, read), 4 aux (f32, read: timesteps then frequencies),
//           5 params. Each entry uses the subset it needs; the vec4 and scalar views of a binding
//           are separate variables that no entry point uses together.
// Dispatch: 256 threads per workgroup, one output element (or vec4) per thread, ceil(n / 256)
//           workgroups folded over (x, y) by `grid_1d`; softmax_rows one workgroup per row.

struct Params {
    n: u32,    // outputs (elements or vec4s) to write
    op: u32,   // operation selector (uniform: no divergence)
    d0: u32,   // entry-specific sizes, see each entry
    d1: u32,
    d2: u32,
    d3: u32,
    d4: u32,
    s: f32,    // scale factor
};

@group(0) @binding(0) var<storage, read> a4: array<elem4>;
@group(0) @binding(1) var<storage, read> b4: array<elem4>;
@group(0) @binding(2) var<storage, read_write> out4: array<elem4>;
@group(0) @binding(0) var<storage, read> a1: array<elem>;
@group(0) @binding(1) var<storage, read> b1: array<elem>;
@group(0) @binding(2) var<storage, read_write> out1: array<elem>;
@group(0) @binding(0) var<storage, read> lat_f32: array<f32>;
@group(0) @binding(1) var<storage, read> mask_f32: array<f32>;
@group(0) @binding(3) var<storage, read> idx: array<u32>;
@group(0) @binding(4) var<storage, read> aux: array<f32>;
@group(0) @binding(5) var<uniform> params: Params;

const WG: u32 = 256u;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

fn sigmoid4(v: vec4<f32>) -> vec4<f32> {
    return 1.0 / (1.0 + exp(-v));
}

// erfc(z) for z >= 0 (Numerical Recipes `erfcc`, Chebyshev fit): fractional error < 1.2e-7 for
// every z, including the tail, so gelu keeps its relative accuracy for negative inputs too.
// In f32 the exponent -z^2 + poly carries ~ulp(z^2) of rounding and GPU exp of a large argument
// a few ulp of it, so the relative error grows like z^2 * 1e-7 in the far tail (measured on
// lavapipe: <= 1e-6 for |x| <= 4, ~1e-5 at x = -12 where gelu(x) ~ 1e-32). Splitting z^2 exactly
// was tried and did not help: the exp itself dominates.
fn erfc_pos(z: vec4<f32>) -> vec4<f32> {
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = t * (-0.82215223 + t * 0.17087277);
    let q = t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + p)));
    let r = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + q))));
    return t * exp(r);
}

// gelu(x) = x * Phi(x), Phi(x) = 1 - erfc(x / sqrt 2) / 2 for x >= 0 and erfc(-x / sqrt 2) / 2
// below: never 1 - (something close to 1), so no cancellation in the left tail.
fn gelu4(v: vec4<f32>) -> vec4<f32> {
    let h = 0.5 * erfc_pos(abs(v) * 0.70710678118654752);
    return v * select(1.0 - h, h, v < vec4<f32>(0.0));
}

@compute @workgroup_size(256)
fn unary4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let v = vec4<f32>(a4[i]);
    var r: vec4<f32>;
    switch (params.op) {
        case 1u: { r = v * params.s; }
        case 2u: { r = v * sigmoid4(v); }
        case 3u: { r = gelu4(v); }
        case 4u: { r = v * sigmoid4(1.702 * v); }
        case 5u: { r = max(v, vec4<f32>(0.0)); }
        case 6u: { r = params.s * tanh(v / params.s); }
        case 7u: { r = v * params.s + bitcast<f32>(params.d0); }
        default: { r = v; }
    }
    out4[i] = elem4(r);
}

@compute @workgroup_size(256)
fn binary4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let x = vec4<f32>(a4[i]);
    let y = vec4<f32>(b4[i]);
    if (params.op == 1u) {
        out4[i] = elem4(x * y);
    } else {
        out4[i] = elem4(x + y);
    }
}

// d0 = C (in vec4s for the vec4 entry), d1 = M * C (values per batch item, same unit).
@compute @workgroup_size(256)
fn channel_bias4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let v = params.d3 + (i / params.d1) * params.d2 + i % params.d0;
    out4[i] = elem4(vec4<f32>(a4[i]) + vec4<f32>(b4[v]));
}

@compute @workgroup_size(256)
fn channel_bias1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let v = params.d3 + (i / params.d1) * params.d2 + i % params.d0;
    out1[i] = elem(f32(a1[i]) + f32(b1[v]));
}

// d0 = C1, d1 = C2 (in vec4s for the vec4 entry).
@compute @workgroup_size(256)
fn concat_channels4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let c1 = params.d0;
    let c2 = params.d1;
    let p = i / (c1 + c2);
    let j = i % (c1 + c2);
    if (j < c1) {
        out4[i] = a4[p * c1 + j];
    } else {
        out4[i] = b4[p * c2 + (j - c1)];
    }
}

@compute @workgroup_size(256)
fn concat_channels1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let c1 = params.d0;
    let c2 = params.d1;
    let p = i / (c1 + c2);
    let j = i % (c1 + c2);
    if (j < c1) {
        out1[i] = a1[p * c1 + j];
    } else {
        out1[i] = b1[p * c2 + (j - c1)];
    }
}

// Source index of output element/vector i of the 2x nearest upsample: d0 = C (vec4s or
// elements), d1 = W, d2 = H (input sizes).
fn upsample_src(i: u32) -> u32 {
    let c = params.d0;
    let w = params.d1;
    let h = params.d2;
    let j = i % c;
    let t = i / c;
    let ox = t % (2u * w);
    let t2 = t / (2u * w);
    let oy = t2 % (2u * h);
    let b = t2 / (2u * h);
    return ((b * h + oy / 2u) * w + ox / 2u) * c + j;
}

@compute @workgroup_size(256)
fn upsample2x4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    out4[i] = a4[upsample_src(i)];
}

@compute @workgroup_size(256)
fn upsample2x1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    out1[i] = a1[upsample_src(i)];
}

// d0 = elements (vec4s) of a.
@compute @workgroup_size(256)
fn concat_batch4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    if (i < params.d0) {
        out4[i] = a4[i];
    } else {
        out4[i] = b4[i - params.d0];
    }
}

@compute @workgroup_size(256)
fn concat_batch1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    if (i < params.d0) {
        out1[i] = a1[i];
    } else {
        out1[i] = b1[i - params.d0];
    }
}

// d0 = dim, d1 = half = dim / 2, d2 = batch, op = 1 when flip_sin_to_cos (cos first).
// aux = [t_0 .. t_{B-1}, freq_0 .. freq_{half-1}]; the frequencies are exp(-ln(10000) * j /
// (half - shift)) rounded to f32 on the host exactly as diffusers computes them, because a GPU
// exp is only good to a few ulp and t * freq reaches ~1000 where one ulp of freq moves the phase
// by 6e-5. The product t * freq is one correctly rounded f32 multiply, as in torch; the reduction
// to [-pi, pi] uses 2pi = C1 + C2 with C1 = 6.28125 (8 significant bits, so k * C1 and
// t * f - k * C1 are exact for |k| < 2^15), then sin/cos of a small argument.
@compute @workgroup_size(256)
fn timestep_embedding(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let dim = params.d0;
    let half = params.d1;
    let b = i / dim;
    let j = i % dim;
    if (j >= 2u * half) {
        out1[i] = elem(0.0);
        return;
    }
    let first = j < half;
    let k = select(j - half, j, first);
    let arg = aux[b] * aux[params.d2 + k];
    let turns = round(arg * 0.15915494309189535);
    let r = (arg - turns * 6.28125) - turns * 0.0019353071795864769;
    // sin first, unless flipped.
    let use_cos = first == (params.op == 1u);
    out1[i] = elem(select(sin(r), cos(r), use_cos));
}

var<workgroup> red: array<f32, 64>;

// Reduce v over the 64 threads: op 0 max, op 1 sum. All threads call it (barriers).
fn reduce64(lid: u32, v: f32, is_max: bool) -> f32 {
    workgroupBarrier(); // earlier readers of red[0] are done
    red[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let o = red[lid + s];
            red[lid] = select(red[lid] + o, max(red[lid], o), is_max);
        }
        workgroupBarrier();
    }
    return red[0];
}

// d0 = C (row length), n = rows.
@compute @workgroup_size(64)
fn softmax_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= params.n) {
        return; // uniform per workgroup
    }
    let c = params.d0;
    let base = row * c;
    var m = -3.4028235e38;
    for (var i = lid; i < c; i += 64u) {
        m = max(m, f32(a1[base + i]));
    }
    m = reduce64(lid, m, true);
    var s = 0.0;
    for (var i = lid; i < c; i += 64u) {
        s += exp(f32(a1[base + i]) - m);
    }
    let inv = 1.0 / reduce64(lid, s, false);
    for (var i = lid; i < c; i += 64u) {
        out1[base + i] = elem(exp(f32(a1[base + i]) - m) * inv);
    }
}

// d0 = C, d1 = N (tokens per sequence), [d2, d3) = the token ids this table slice holds.
// a = token table rows d2..d3 [d3 - d2, C], b = positions [P, C]. A table larger than one storage
// binding (CLIP-L's in f32 is 145 MiB) is bound in slices, one dispatch each; every output row
// is written by the dispatch whose slice holds its id.
@compute @workgroup_size(256)
fn embed_tokens(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let c = params.d0;
    let r = i / c;
    let j = i % c;
    let id = idx[r];
    if (id < params.d2 || id >= params.d3) {
        return;
    }
    out1[i] = elem(f32(a1[(id - params.d2) * c + j]) + f32(b1[(r % params.d1) * c + j]));
}

// d0 = C, d1 = N.
@compute @workgroup_size(256)
fn gather_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let c = params.d0;
    let b = i / c;
    out1[i] = a1[(b * params.d1 + idx[b]) * c + i % c];
}

// d0 = C, d1 = H, d2 = W. Writes are contiguous, reads strided by H*W: these run once per image
// at the model boundary on 3- or 4-channel tensors, where a tiled transpose would not pay.
@compute @workgroup_size(256)
fn nchw_to_nhwc(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let c = params.d0;
    let h = params.d1;
    let w = params.d2;
    let ch = i % c;
    let t = i / c;
    let x = t % w;
    let t2 = t / w;
    let y = t2 % h;
    let b = t2 / h;
    out1[i] = a1[((b * c + ch) * h + y) * w + x];
}

@compute @workgroup_size(256)
fn nhwc_to_nchw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let c = params.d0;
    let h = params.d1;
    let w = params.d2;
    let x = i % w;
    let t = i / w;
    let y = t % h;
    let t2 = t / h;
    let ch = t2 % c;
    let b = t2 / c;
    out1[i] = a1[((b * h + y) * w + x) * c + ch];
}

// d0 = B (latent batch), d1 = pixels per image, d2 = L (latent channels), d3 = C (L, or 2L + 1
// with the inpainting channels), s = the sampler's input scale; n = R·pixels·C outputs.
@compute @workgroup_size(256)
fn unet_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let l = params.d2;
    let cc = params.d3;
    let c = i % cc;
    let pr = i / cc;                  // r · pixels + p
    let p = pr % params.d1;
    let src = (pr / params.d1) % params.d0 * params.d1 + p; // pixel (r mod B, p)
    var v: f32;
    if (c < l) {
        v = params.s * lat_f32[src * l + c];
    } else if (c == l) {
        v = mask_f32[src];
    } else {
        v = aux[src * l + c - l - 1u];
    }
    out1[i] = elem(v);
}

