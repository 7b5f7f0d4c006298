// conv2d: 2-D convolution as an implicit GEMM, bias and residual fused into the store.
//
//   out[b, oy, ox, co] = sum_{ky, kx, ci} x[b, oy*s - top + ky, ox*s - left + kx, ci] * w[co, ky, kx, ci]
//                        + bias[co] + residual[b, oy, ox, co]          (x is zero outside the image)
//
// As a GEMM: C[M, N] = A[M, K] · Bᵀ with M = B·Ho·Wo output pixels, N = Cout, K = KH·KW·Cin,
// A[m, k] = the im2col patch element (never materialised: addresses are computed while the A tile
// is loaded), B = w viewed as [Cout, K] (the same layout as a Linear weight), C = out viewed as [M, N].
//
// Layout decision: activations are NHWC and weights [Cout, KH, KW, Cin] (OHWI, reordered on the host).
// With channels innermost, the k index of one filter tap runs over Cin contiguous values, so A and B
// rows load as vec4 (and 32 k of one pixel are a 128-byte line), and C's rows are exactly the NHWC
// output, so no transpose or im2col buffer is ever needed (im2col of the VAE's 512×512×128 3×3 convs
// would take 1.2 GB in f32). NCHW would make every A load a strided gather.
//
// Bindings: 0 x4 (elem4, [B, H, W, Cin], read as vec4 even when Cin % 4 != 0: the scalar path picks
//           a component), 1 w4 (elem4, [Cout, KH, KW, Cin]), 2 bias (elem, [Cout]), 3 residual
//           (elem, [B, Ho, Wo, Cout]), 4 out (elem, [B, Ho, Wo, Cout], read_write), 5 params.
//           bias/residual are read only when flags say so; the host binds x there as a placeholder.
// Dispatch: one workgroup of 256 threads per 64 × 64 output tile (64 pixels × 64 out channels);
//           ceil(M/64)·ceil(N/64) workgroups folded over (x, y) by `grid_1d`, linear index
//           tile = m_tile · n_tiles + n_tile (consecutive workgroups share the same pixels, so the
//           im2col reads of x, each pixel read KH·KW times, hit L2).
// Per workgroup: K is walked in steps of BK (override, 16 or 32). Each step, every thread loads BK/16
//           vec4 of A and of B from global memory into registers (prefetched during the previous
//           step's arithmetic), stores them into workgroup memory, and then each thread accumulates a
//           4 × 4 register tile: pixels ty·4 + i (i < 4) × channels tx + 16·j (j < 4), with
//           (tx, ty) = (lid % 16, lid / 16). Out-of-range pixels, channels, k and padding taps are
//           loaded as zeros, so the arithmetic loop has no bounds checks.
// Workgroup tiles are [row][k] in vec4 of 4 consecutive k, with each row padded by one vec4: a
//           quarter-warp (8 lanes, consecutive tx) then reads 8 different rows from 8 different
//           bank groups, and the loaders' vec4 stores along k are conflict-free as well.
//           Bytes: 2 · 64 · (BK/4 + 1) · 16 = 18,432 at BK = 32, 10,240 at BK = 16.
// VEC4_K (override): Cin % 4 == 0, so 4 consecutive k share one tap and are contiguous in x and w.
//           Otherwise (RGB input conv, Cin = 3; generic) every component is addressed on its own.

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
    m: u32,       // batch · ho · wo
    k: u32,       // kh · kw · cin
    n_tiles: u32, // ceil(cout / 64)
    flags: u32,   // bit 0: add bias, bit 1: add residual
};

@group(0) @binding(0) var<storage, read> x4: array<elem4>;
@group(0) @binding(1) var<storage, read> w4: array<elem4>;
@group(0) @binding(2) var<storage, read> bias: array<elem>;
@group(0) @binding(3) var<storage, read> residual: array<elem>;
@group(0) @binding(4) var<storage, read_write> out: array<elem>;
@group(0) @binding(5) var<uniform> params: Params;

const BM: u32 = 64u; // output pixels per workgroup tile
const BN: u32 = 64u; // output channels per workgroup tile
const WG: u32 = 256u;

// K-step of the tiles: 16 or 32 (the loaders keep BK/16 vec4 per operand in registers).
override BK: u32 = 32u;
// Cin % 4 == 0: load A and B as whole vec4 (see header).
override VEC4_K: bool = true;

var<workgroup> a_tile: array<vec4<f32>, BM * (BK / 4u + 1u)>;
var<workgroup> b_tile: array<vec4<f32>, BN * (BK / 4u + 1u)>;

// One output pixel as the A loader sees it: where its batch image starts in x, and the input
// coordinates of its top-left filter tap (may be negative: padding).
struct Pixel {
    base: u32,
    iy0: i32,
    ix0: i32,
    valid: bool,
};

fn pixel(m: u32) -> Pixel {
    var p: Pixel;
    let hw = params.ho * params.wo;
    let b = m / hw;
    let rem = m - b * hw;
    let oy = rem / params.wo;
    let ox = rem - oy * params.wo;
    p.base = b * params.h * params.w * params.cin;
    p.iy0 = i32(oy * params.stride) - i32(params.pad_top);
    p.ix0 = i32(ox * params.stride) - i32(params.pad_left);
    p.valid = m < params.m;
    return p;
}

// One element of x by im2col coordinate k (scalar path), 0 outside the image or past K.
fn x_at(p: Pixel, k: u32) -> f32 {
    if (!p.valid || k >= params.k) {
        return 0.0;
    }
    let tap = k / params.cin;
    let ci = k - tap * params.cin;
    let ky = tap / params.kw;
    let kx = tap - ky * params.kw;
    let iy = p.iy0 + i32(ky);
    let ix = p.ix0 + i32(kx);
    // Negative coordinates wrap to huge u32 and fail the same test as the far edge.
    if (u32(iy) >= params.h || u32(ix) >= params.w) {
        return 0.0;
    }
    let i = p.base + (u32(iy) * params.w + u32(ix)) * params.cin + ci;
    return f32(x4[i >> 2u][i & 3u]);
}

// A[m, k .. k+4] for the vec4 path: k % 4 == 0, (ci, kx, ky) is k's decomposition.
fn a_vec4(p: Pixel, k: u32, ci: u32, kx: u32, ky: u32) -> vec4<f32> {
    let iy = p.iy0 + i32(ky);
    let ix = p.ix0 + i32(kx);
    if (!p.valid || k >= params.k || u32(iy) >= params.h || u32(ix) >= params.w) {
        return vec4<f32>(0.0);
    }
    let i = p.base + (u32(iy) * params.w + u32(ix)) * params.cin + ci;
    return vec4<f32>(x4[i >> 2u]);
}

fn a_scalar(p: Pixel, k: u32) -> vec4<f32> {
    return vec4<f32>(x_at(p, k), x_at(p, k + 1u), x_at(p, k + 2u), x_at(p, k + 3u));
}

fn w_at(n: u32, k: u32) -> f32 {
    if (k >= params.k) {
        return 0.0;
    }
    let i = n * params.k + k;
    return f32(w4[i >> 2u][i & 3u]);
}

// B[n, k .. k+4] (a row of w viewed as [Cout, K]), zeros past Cout or K.
fn b_load(n: u32, k: u32) -> vec4<f32> {
    if (n >= params.cout || k >= params.k) {
        return vec4<f32>(0.0);
    }
    if (VEC4_K) {
        return vec4<f32>(w4[(n * params.k + k) >> 2u]);
    }
    return vec4<f32>(w_at(n, k), w_at(n, k + 1u), w_at(n, k + 2u), w_at(n, k + 3u));
}

fn fma4(acc: f32, a: vec4<f32>, b: vec4<f32>) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, acc))));
}

// Add bias / residual, round to the storage type, write the 4 channels of one output pixel.
fn store_row(m: u32, n0: u32, acc: vec4<f32>) {
    if (m >= params.m) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let n = n0 + j * 16u;
        if (n < params.cout) {
            let o = m * params.cout + n;
            var v = acc[j];
            if ((params.flags & 1u) != 0u) {
                v += f32(bias[n]);
            }
            if ((params.flags & 2u) != 0u) {
                v += f32(residual[o]);
            }
            out[o] = elem(v);
        }
    }
}

@compute @workgroup_size(256)
fn conv2d(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    let m_tiles = (params.m + BM - 1u) / BM;
    if (tile >= m_tiles * params.n_tiles) {
        return;
    }
    let m0 = (tile / params.n_tiles) * BM;
    let n0 = (tile % params.n_tiles) * BN;

    // Loader geometry: kv vec4 per tile row; this thread loads the vec4 at k offset lk of rows
    // lr and (when BK = 32) lr + 32, of both A and B.
    let kv = BK / 4u;
    let rs = kv + 1u; // padded row stride of the tiles, in vec4
    let lk = (lid % kv) * 4u;
    let lr = lid / kv;
    let rstep = WG / kv;
    let two = BK == 32u;
    let p0 = pixel(m0 + lr);
    let p1 = pixel(m0 + lr + rstep);
    let n_a = n0 + lr;
    let n_b = n0 + lr + rstep;
    let s0 = lr * rs + lk / 4u;
    let s1 = (lr + rstep) * rs + lk / 4u;

    // k of this thread's loads and, for the vec4 path, its (ci, kx, ky) decomposition, advanced
    // incrementally (no division per step).
    var k = lk;
    let tap = k / params.cin;
    var ci = k - tap * params.cin;
    var ky = tap / params.kw;
    var kx = tap - ky * params.kw;

    var ra0: vec4<f32>;
    var ra1 = vec4<f32>(0.0);
    var rb0 = b_load(n_a, k);
    var rb1 = vec4<f32>(0.0);
    if (VEC4_K) {
        ra0 = a_vec4(p0, k, ci, kx, ky);
        if (two) {
            ra1 = a_vec4(p1, k, ci, kx, ky);
        }
    } else {
        ra0 = a_scalar(p0, k);
        if (two) {
            ra1 = a_scalar(p1, k);
        }
    }
    if (two) {
        rb1 = b_load(n_b, k);
    }

    let tx = lid % 16u;
    let ty = lid / 16u;
    let ar = ty * 4u * rs;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    let k_tiles = (params.k + BK - 1u) / BK;
    for (var t = 0u; t < k_tiles; t++) {
        a_tile[s0] = ra0;
        b_tile[s0] = rb0;
        if (two) {
            a_tile[s1] = ra1;
            b_tile[s1] = rb1;
        }
        workgroupBarrier();

        // Prefetch the next step while this one is multiplied.
        if (t + 1u < k_tiles) {
            k += BK;
            rb0 = b_load(n_a, k);
            if (two) {
                rb1 = b_load(n_b, k);
            }
            if (VEC4_K) {
                ci += BK;
                while (ci >= params.cin) {
                    ci -= params.cin;
                    kx += 1u;
                    if (kx == params.kw) {
                        kx = 0u;
                        ky += 1u;
                    }
                }
                ra0 = a_vec4(p0, k, ci, kx, ky);
                if (two) {
                    ra1 = a_vec4(p1, k, ci, kx, ky);
                }
            } else {
                ra0 = a_scalar(p0, k);
                if (two) {
                    ra1 = a_scalar(p1, k);
                }
            }
        }

        for (var kk = 0u; kk < kv; kk++) {
            let a0 = a_tile[ar + kk];
            let a1 = a_tile[ar + rs + kk];
            let a2 = a_tile[ar + 2u * rs + kk];
            let a3 = a_tile[ar + 3u * rs + kk];
            let b0 = b_tile[tx * rs + kk];
            let b1 = b_tile[(tx + 16u) * rs + kk];
            let b2 = b_tile[(tx + 32u) * rs + kk];
            let b3 = b_tile[(tx + 48u) * rs + kk];
            acc0 = vec4<f32>(fma4(acc0.x, a0, b0), fma4(acc0.y, a0, b1), fma4(acc0.z, a0, b2), fma4(acc0.w, a0, b3));
            acc1 = vec4<f32>(fma4(acc1.x, a1, b0), fma4(acc1.y, a1, b1), fma4(acc1.z, a1, b2), fma4(acc1.w, a1, b3));
            acc2 = vec4<f32>(fma4(acc2.x, a2, b0), fma4(acc2.y, a2, b1), fma4(acc2.z, a2, b2), fma4(acc2.w, a2, b3));
            acc3 = vec4<f32>(fma4(acc3.x, a3, b0), fma4(acc3.y, a3, b1), fma4(acc3.z, a3, b2), fma4(acc3.w, a3, b3));
        }
        workgroupBarrier();
    }

    let m = m0 + ty * 4u;
    let n = n0 + tx;
    store_row(m, n, acc0);
    store_row(m + 1u, n, acc1);
    store_row(m + 2u, n, acc2);
    store_row(m + 3u, n, acc3);
}
