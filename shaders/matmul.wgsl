// matmul: tiled GEMM with the weight transposed ("NT"), and the epilogues of a linear layer.
//
//   linear_*:  out[b, m, n] = act(sum_k x[b, m, k] * w[b, n, k] + bias[n]) + residual[b, m, n]
//   geglu_*:   h = x·w[n]ᵀ + bias[n], g = x·w[N + n]ᵀ + bias[N + n]  (w has 2N rows)
//              out[m, n] = h * gelu(g)           (diffusers GEGLU; the [M, 2N] projection is
//                                                 never written: both halves live in registers)
//
// Layouts (row-major, counts and strides in elements):
//   x   [B, M, K]   (a linear layer's leading dims flattened into M, B = 1)
//   w   [B, N, K]   PyTorch Linear layout (stride_b = 0 for a linear layer: one weight for all)
//   out [B, M, N]   (geglu: [M, N] with w [2N, K])
// Both operands are K-contiguous, so both tiles are loaded along K (vec4 when K % 4 == 0) and
// written transposed into workgroup memory, k-major, so the inner loop reads vec4s along M and N.
//
// Bindings: 0 x (elem4, read), 1 w (elem4, read), 2 bias (read; any tensor when bias_mode = 0),
//           3 residual (read; any tensor when residual_mode != 1), 4 out (read_write), 5 params,
//           6 / 7 LayerNorm weight / bias [K] (vec4 entries only; any tensor when norm_mode = 0).
//   norm_mode 1 (linear / geglu *_vec4): x's rows are LayerNorm'd as they are staged,
//   a = ((x - pivot) - mean) · rstd · ln_w[k] + ln_b[k], with each row's statistics computed by
//   the workgroup itself before its K loop (`row_norm_prologue`): the normalised tensor is never
//   written and the LayerNorm needs no dispatch of its own. The prologue reads the workgroup's
//   TM rows once more (from L2: the K loop reads them anyway).
//   The *_vec4 entries load whole vec4s along K (K % 4 == 0), the *_scalar entries one element.
//   residual_mode 2 reads the residual from `out` itself (in-place `x = x + f(x)`): wgpu forbids
//   binding one buffer both read-only and read-write in a dispatch.
//
// Geometry: workgroup WG_X × WG_Y threads, each owning an 8 × 8 register tile, so the workgroup
// computes a TM × TN = 8·WG_Y × 8·WG_X output tile (default 128 × 128), stepping K by TK.
// Grid: (ceil(N / TN), ceil(M / TM), B); geglu: (ceil(N / (TN/2)), ceil(M / TM), 1).
// A thread's rows are {4·ty + i, TM/2 + 4·ty + i} and its columns {4·tx + j, TN/2 + 4·tx + j}
// (i, j < 4): the two halves make every workgroup-memory read a conflict-free (broadcast) vec4.
// In geglu the B tile's first TN/2 rows are hidden rows and the last TN/2 the matching gate rows,
// so each thread holds hidden and gate of the same 4 output columns.
// Edges: out-of-range rows/columns/k are loaded as zeros, so the hot loop has no bounds checks;
// only the loads and the final stores test bounds.

struct Params {
    m: u32,
    n: u32,              // output columns (geglu: half the weight rows)
    k: u32,
    act: u32,            // 0 none, 1 gelu (erf), 2 silu, 3 quick_gelu
    bias_mode: u32,      // 0 no bias, 1 bias
    residual_mode: u32,  // 0 none, 1 residual binding, 2 residual read from out (in place)
    stride_a: u32,       // batch strides in elements
    stride_b: u32,
    stride_c: u32,
    norm_mode: u32,      // 0 none, 1 LayerNorm of x's rows applied on load (vec4 entries)
    norm_eps: f32,
    _pad2: u32,
};

// x and w are seen as vec4s in every entry (one declaration per binding keeps every back end
// happy); the scalar path picks a component. Tensor buffers are padded to 256 bytes, so the
// vec4 holding the last element is in bounds.
@group(0) @binding(0) var<storage, read> x4: array<elem4>;
@group(0) @binding(1) var<storage, read> w4: array<elem4>;
@group(0) @binding(2) var<storage, read> bias: array<elem>;
@group(0) @binding(3) var<storage, read> residual: array<elem>;
@group(0) @binding(4) var<storage, read_write> out: array<elem>;
@group(0) @binding(5) var<uniform> params: Params;
@group(0) @binding(6) var<storage, read> ln_w4: array<elem4>;
@group(0) @binding(7) var<storage, read> ln_b4: array<elem4>;

override WG_X: u32 = 16u;   // threads along N
override WG_Y: u32 = 16u;   // threads along M
override TK: u32 = 16u;     // K step, a multiple of 4
override TM: u32 = WG_Y * 8u;
override TN: u32 = WG_X * 8u;
override TM4: u32 = WG_Y * 2u;  // TM / 4: vec4s per k-row of the A tile
override TN4: u32 = WG_X * 2u;
override A_TILE: u32 = TK * WG_Y * 2u;  // vec4s in the A tile (TK × TM floats)
override B_TILE: u32 = TK * WG_X * 2u;

// Tiles in f32 whatever the storage type: converted once on load, not in the inner loop.
// a_tile[k * TM4 + r / 4][r % 4] = x[m0 + r, k0 + k]; b_tile likewise with w.
var<workgroup> a_tile: array<vec4<f32>, A_TILE>;
var<workgroup> b_tile: array<vec4<f32>, B_TILE>;
// norm_mode 1: row_stats[r] = (pivot, mean, rstd, -) of x's row m0 + r (`row_norm_prologue`).
var<workgroup> row_stats: array<vec4<f32>, TM>;

// ------------------------------------------------------------------ LayerNorm prologue

// Chan's merge of the 4-element chunk v into the running (count, mean, M2).
fn merge_chunk(cnt: ptr<function, f32>, mean: ptr<function, f32>, m2: ptr<function, f32>,
               v: vec4<f32>) {
    let cm = (v.x + v.y + v.z + v.w) * 0.25;
    let d = v - vec4<f32>(cm);
    let n2 = *cnt + 4.0;
    let delta = cm - *mean;
    *mean += delta * (4.0 / n2);
    *m2 += dot(d, d) + delta * delta * (*cnt * 4.0 / n2);
    *cnt = n2;
}

// Every row m0 + r (r < TM) of x: pivot = its first value, mean and rstd = 1 / sqrt(var + eps)
// of (x - pivot), as layer_norm in norm.wgsl (the pivot keeps a large common offset exact).
// TPR = max(threads / TM, 1) invocations share a row, each summing a strided set of vec4s
// (Chan's merge of 4-element chunks: one pass over the row, no cancellation); the parts are
// merged in TPR barrier-separated turns. Every invocation must call it (barriers).
fn row_norm_prologue(lid: u32, m0: u32, a_base: u32) {
    let nt = WG_X * WG_Y;
    let tpr = max(nt / TM, 1u);
    let rows_per_pass = nt / tpr;
    let kq = params.k >> 2u;
    for (var rb = 0u; rb < TM; rb += rows_per_pass) {
        let r = rb + lid / tpr;
        let part = lid % tpr;
        let m = m0 + r;
        var pivot = 0.0;
        var cnt = 0.0;
        var mean = 0.0;
        var m2 = 0.0;
        if (r < TM && m < params.m) {
            let base = (a_base >> 2u) + m * kq;
            pivot = f32(x4[base].x);
            // Four independent loads in flight per iteration (the merge is a dependent chain;
            // the loads should not be), then the tail one at a time.
            var c = part;
            for (; c + 3u * tpr < kq; c += 4u * tpr) {
                let v0 = vec4<f32>(x4[base + c]);
                let v1 = vec4<f32>(x4[base + c + tpr]);
                let v2 = vec4<f32>(x4[base + c + 2u * tpr]);
                let v3 = vec4<f32>(x4[base + c + 3u * tpr]);
                merge_chunk(&cnt, &mean, &m2, v0 - vec4<f32>(pivot));
                merge_chunk(&cnt, &mean, &m2, v1 - vec4<f32>(pivot));
                merge_chunk(&cnt, &mean, &m2, v2 - vec4<f32>(pivot));
                merge_chunk(&cnt, &mean, &m2, v3 - vec4<f32>(pivot));
            }
            for (; c < kq; c += tpr) {
                merge_chunk(&cnt, &mean, &m2, vec4<f32>(x4[base + c]) - vec4<f32>(pivot));
            }
        }
        for (var p = 0u; p < tpr; p++) {
            if (part == p && r < TM) {
                if (p == 0u) {
                    row_stats[r] = vec4<f32>(pivot, mean, m2, cnt);
                } else if (cnt > 0.0) {
                    let o = row_stats[r];
                    let n2 = o.w + cnt;
                    let delta = mean - o.y;
                    row_stats[r] = vec4<f32>(pivot, o.y + delta * (cnt / n2),
                                             o.z + m2 + delta * delta * (o.w * cnt / n2), n2);
                }
            }
            workgroupBarrier();
        }
        if (part == 0u && r < TM) {
            let o = row_stats[r];
            row_stats[r] = vec4<f32>(o.x, o.y, inverseSqrt(o.z / max(o.w, 1.0) + params.norm_eps), 0.0);
        }
    }
    workgroupBarrier();
}

// ------------------------------------------------------------------ tile loads

// Weight row for B-tile row `rr`: (global row, in range). geglu: rows [0, TN/2) are hidden rows
// n0 + rr, rows [TN/2, TN) the gate rows N + n0 + rr - TN/2.
fn b_row(rr: u32, n0: u32, geglu: bool) -> vec2<u32> {
    if (geglu) {
        let half = TN / 2u;
        let hi = rr / half;
        let n = n0 + rr - hi * half;
        return vec2<u32>(n + hi * params.n, u32(n < params.n));
    }
    let n = n0 + rr;
    return vec2<u32>(n, u32(n < params.n));
}

fn put_a(k: u32, r: u32, v: f32) {
    a_tile[k * TM4 + (r >> 2u)][r & 3u] = v;
}

fn put_b(k: u32, r: u32, v: f32) {
    b_tile[k * TN4 + (r >> 2u)][r & 3u] = v;
}

// One vec4 along K per iteration; K % 4 == 0 so a chunk is wholly inside or outside.
fn load_tiles_vec4(lid: u32, m0: u32, n0: u32, k0: u32, a_base: u32, b_base: u32, geglu: bool) {
    let nt = WG_X * WG_Y;
    let chunks = TK / 4u;
    let kk = params.k;
    for (var i = lid; i < TM * chunks; i += nt) {
        let r = i / chunks;
        let c = i - r * chunks;
        let m = m0 + r;
        let k = k0 + 4u * c;
        var v = vec4<f32>(0.0);
        if (m < params.m && k < kk) {
            v = vec4<f32>(x4[(a_base + m * kk + k) >> 2u]);
            if (params.norm_mode != 0u) {
                let st = row_stats[r];
                v = ((v - vec4<f32>(st.x)) - vec4<f32>(st.y)) * st.z * vec4<f32>(ln_w4[k >> 2u])
                    + vec4<f32>(ln_b4[k >> 2u]);
            }
        }
        put_a(4u * c, r, v.x);
        put_a(4u * c + 1u, r, v.y);
        put_a(4u * c + 2u, r, v.z);
        put_a(4u * c + 3u, r, v.w);
    }
    for (var i = lid; i < TN * chunks; i += nt) {
        let r = i / chunks;
        let c = i - r * chunks;
        let row = b_row(r, n0, geglu);
        let k = k0 + 4u * c;
        var v = vec4<f32>(0.0);
        if (row.y != 0u && k < kk) {
            v = vec4<f32>(w4[(b_base + row.x * kk + k) >> 2u]);
        }
        put_b(4u * c, r, v.x);
        put_b(4u * c + 1u, r, v.y);
        put_b(4u * c + 2u, r, v.z);
        put_b(4u * c + 3u, r, v.w);
    }
}

// Scalar fallback for K % 4 != 0 (rare: e.g. tiny test shapes; every SD layer has K % 4 == 0).
fn load_tiles_scalar(lid: u32, m0: u32, n0: u32, k0: u32, a_base: u32, b_base: u32, geglu: bool) {
    let nt = WG_X * WG_Y;
    let kk = params.k;
    for (var i = lid; i < TM * TK; i += nt) {
        let r = i / TK;
        let c = i - r * TK;
        let m = m0 + r;
        let k = k0 + c;
        var v = 0.0;
        if (m < params.m && k < kk) {
            let e = a_base + m * kk + k;
            v = f32(x4[e >> 2u][e & 3u]);
        }
        put_a(c, r, v);
    }
    for (var i = lid; i < TN * TK; i += nt) {
        let r = i / TK;
        let c = i - r * TK;
        let row = b_row(r, n0, geglu);
        let k = k0 + c;
        var v = 0.0;
        if (row.y != 0u && k < kk) {
            let e = b_base + row.x * kk + k;
            v = f32(w4[e >> 2u][e & 3u]);
        }
        put_b(c, r, v);
    }
}

// ------------------------------------------------------------------ inner product

// acc[2i + h]: row i of the thread (i < 4: 4·ty + i, else TM/2 + 4·ty + i - 4), column half h.
// One k step: 2 + 2 vec4 reads from workgroup memory for 64 FMAs. Unrolled by hand (naga's
// loops are `loop { if !cond { break } }`, which drivers unroll poorly).
fn mac(acc: ptr<function, array<vec4<f32>, 16>>, k: u32, tx: u32, ty: u32) {
    let a0 = a_tile[k * TM4 + ty];
    let a1 = a_tile[k * TM4 + ty + WG_Y];
    let b0 = b_tile[k * TN4 + tx];
    let b1 = b_tile[k * TN4 + tx + WG_X];
    (*acc)[0] += a0.x * b0;
    (*acc)[1] += a0.x * b1;
    (*acc)[2] += a0.y * b0;
    (*acc)[3] += a0.y * b1;
    (*acc)[4] += a0.z * b0;
    (*acc)[5] += a0.z * b1;
    (*acc)[6] += a0.w * b0;
    (*acc)[7] += a0.w * b1;
    (*acc)[8] += a1.x * b0;
    (*acc)[9] += a1.x * b1;
    (*acc)[10] += a1.y * b0;
    (*acc)[11] += a1.y * b1;
    (*acc)[12] += a1.z * b0;
    (*acc)[13] += a1.z * b1;
    (*acc)[14] += a1.w * b0;
    (*acc)[15] += a1.w * b1;
}

fn compute_tile(acc: ptr<function, array<vec4<f32>, 16>>, tx: u32, ty: u32) {
    for (var k = 0u; k < TK; k += 4u) {
        mac(acc, k, tx, ty);
        mac(acc, k + 1u, tx, ty);
        mac(acc, k + 2u, tx, ty);
        mac(acc, k + 3u, tx, ty);
    }
}

// ------------------------------------------------------------------ epilogue

// erf in f32 (no erf in WGSL): the rational approximation of Eigen / XLA (`generic_fast_erf_float`),
// about 1e-7 relative error on [-4, 4]; beyond, erf = ±1 in f32.
fn erf4(a: vec4<f32>) -> vec4<f32> {
    let x = clamp(a, vec4<f32>(-4.0), vec4<f32>(4.0));
    let x2 = x * x;
    var p = x2 * -2.72614225801306e-10 + 2.77068142495902e-08;
    p = x2 * p + -2.10102402082508e-06;
    p = x2 * p + -5.69250639462346e-05;
    p = x2 * p + -7.34990630326855e-04;
    p = x2 * p + -2.95459980854025e-03;
    p = x2 * p + -1.60960333262415e-02;
    p = x * p;
    var q = x2 * -1.45660718464996e-05 + -2.13374055278905e-04;
    q = x2 * q + -1.68282697438203e-03;
    q = x2 * q + -7.37332916720468e-03;
    q = x2 * q + -1.42647390514189e-02;
    return p / q;
}

fn gelu4(v: vec4<f32>) -> vec4<f32> {
    return 0.5 * v * (1.0 + erf4(v * 0.70710678118654752));
}

// x * sigmoid(s x); exp overflow for very negative x gives x * 0 = -0, not NaN.
fn swish4(v: vec4<f32>, s: f32) -> vec4<f32> {
    return v / (1.0 + exp(-s * v));
}

fn activate(v: vec4<f32>) -> vec4<f32> {
    switch (params.act) {
        case 1u: { return gelu4(v); }
        case 2u: { return swish4(v, 1.0); }
        case 3u: { return swish4(v, 1.702); }
        default: { return v; }
    }
}

// Four consecutive bias values from column n (zeros past N or without bias).
fn bias4(n: u32) -> vec4<f32> {
    var b = vec4<f32>(0.0);
    if (params.bias_mode == 0u) {
        return b;
    }
    for (var j = 0u; j < 4u; j++) {
        if (n + j < params.n) {
            b[j] = f32(bias[n + j]);
        }
    }
    return b;
}

// Store act(v + bias) + residual at row m, columns n..n+3 (within N).
fn store4(m: u32, n: u32, v: vec4<f32>, c_base: u32) {
    if (m >= params.m) {
        return;
    }
    let y = activate(v + bias4(n));
    let row = c_base + m * params.n;
    for (var j = 0u; j < 4u; j++) {
        if (n + j < params.n) {
            var r = 0.0;
            if (params.residual_mode == 1u) {
                r = f32(residual[row + n + j]);
            } else if (params.residual_mode == 2u) {
                r = f32(out[row + n + j]);
            }
            out[row + n + j] = elem(y[j] + r);
        }
    }
}

fn epilogue_linear(acc: ptr<function, array<vec4<f32>, 16>>, m0: u32, n0: u32, tx: u32, ty: u32, c_base: u32) {
    let ma = m0 + 4u * ty;
    let mb = m0 + TM / 2u + 4u * ty;
    let na = n0 + 4u * tx;
    let nb = n0 + TN / 2u + 4u * tx;
    store4(ma, na, (*acc)[0], c_base);
    store4(ma, nb, (*acc)[1], c_base);
    store4(ma + 1u, na, (*acc)[2], c_base);
    store4(ma + 1u, nb, (*acc)[3], c_base);
    store4(ma + 2u, na, (*acc)[4], c_base);
    store4(ma + 2u, nb, (*acc)[5], c_base);
    store4(ma + 3u, na, (*acc)[6], c_base);
    store4(ma + 3u, nb, (*acc)[7], c_base);
    store4(mb, na, (*acc)[8], c_base);
    store4(mb, nb, (*acc)[9], c_base);
    store4(mb + 1u, na, (*acc)[10], c_base);
    store4(mb + 1u, nb, (*acc)[11], c_base);
    store4(mb + 2u, na, (*acc)[12], c_base);
    store4(mb + 2u, nb, (*acc)[13], c_base);
    store4(mb + 3u, na, (*acc)[14], c_base);
    store4(mb + 3u, nb, (*acc)[15], c_base);
}

// out[m, n..n+3] = (h + bias[n]) * gelu(g + bias[N + n]).
fn store_geglu(m: u32, n: u32, h: vec4<f32>, g: vec4<f32>) {
    if (m >= params.m) {
        return;
    }
    var bh = vec4<f32>(0.0);
    var bg = vec4<f32>(0.0);
    if (params.bias_mode != 0u) {
        for (var j = 0u; j < 4u; j++) {
            if (n + j < params.n) {
                bh[j] = f32(bias[n + j]);
                bg[j] = f32(bias[params.n + n + j]);
            }
        }
    }
    let y = (h + bh) * gelu4(g + bg);
    let row = m * params.n;
    for (var j = 0u; j < 4u; j++) {
        if (n + j < params.n) {
            out[row + n + j] = elem(y[j]);
        }
    }
}

fn epilogue_geglu(acc: ptr<function, array<vec4<f32>, 16>>, m0: u32, n0: u32, tx: u32, ty: u32) {
    let ma = m0 + 4u * ty;
    let mb = m0 + TM / 2u + 4u * ty;
    let n = n0 + 4u * tx;
    store_geglu(ma, n, (*acc)[0], (*acc)[1]);
    store_geglu(ma + 1u, n, (*acc)[2], (*acc)[3]);
    store_geglu(ma + 2u, n, (*acc)[4], (*acc)[5]);
    store_geglu(ma + 3u, n, (*acc)[6], (*acc)[7]);
    store_geglu(mb, n, (*acc)[8], (*acc)[9]);
    store_geglu(mb + 1u, n, (*acc)[10], (*acc)[11]);
    store_geglu(mb + 2u, n, (*acc)[12], (*acc)[13]);
    store_geglu(mb + 3u, n, (*acc)[14], (*acc)[15]);
}

// ------------------------------------------------------------------ entry points

@compute @workgroup_size(WG_X, WG_Y)
fn linear_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) tid: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    var acc: array<vec4<f32>, 16>;
    let m0 = wid.y * TM;
    let n0 = wid.x * TN;
    let a_base = wid.z * params.stride_a;
    let b_base = wid.z * params.stride_b;
    if (params.norm_mode != 0u) {
        row_norm_prologue(lid, m0, a_base);
    }
    for (var k0 = 0u; k0 < params.k; k0 += TK) {
        load_tiles_vec4(lid, m0, n0, k0, a_base, b_base, false);
        workgroupBarrier();
        compute_tile(&acc, tid.x, tid.y);
        workgroupBarrier();
    }
    epilogue_linear(&acc, m0, n0, tid.x, tid.y, wid.z * params.stride_c);
}

@compute @workgroup_size(WG_X, WG_Y)
fn linear_scalar(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) tid: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    var acc: array<vec4<f32>, 16>;
    let m0 = wid.y * TM;
    let n0 = wid.x * TN;
    let a_base = wid.z * params.stride_a;
    let b_base = wid.z * params.stride_b;
    for (var k0 = 0u; k0 < params.k; k0 += TK) {
        load_tiles_scalar(lid, m0, n0, k0, a_base, b_base, false);
        workgroupBarrier();
        compute_tile(&acc, tid.x, tid.y);
        workgroupBarrier();
    }
    epilogue_linear(&acc, m0, n0, tid.x, tid.y, wid.z * params.stride_c);
}

@compute @workgroup_size(WG_X, WG_Y)
fn geglu_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) tid: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    var acc: array<vec4<f32>, 16>;
    let m0 = wid.y * TM;
    let n0 = wid.x * (TN / 2u);
    if (params.norm_mode != 0u) {
        row_norm_prologue(lid, m0, 0u);
    }
    for (var k0 = 0u; k0 < params.k; k0 += TK) {
        load_tiles_vec4(lid, m0, n0, k0, 0u, 0u, true);
        workgroupBarrier();
        compute_tile(&acc, tid.x, tid.y);
        workgroupBarrier();
    }
    epilogue_geglu(&acc, m0, n0, tid.x, tid.y);
}

@compute @workgroup_size(WG_X, WG_Y)
fn geglu_scalar(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) tid: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    var acc: array<vec4<f32>, 16>;
    let m0 = wid.y * TM;
    let n0 = wid.x * (TN / 2u);
    for (var k0 = 0u; k0 < params.k; k0 += TK) {
        load_tiles_scalar(lid, m0, n0, k0, 0u, 0u, true);
        workgroupBarrier();
        compute_tile(&acc, tid.x, tid.y);
        workgroupBarrier();
    }
    epilogue_geglu(&acc, m0, n0, tid.x, tid.y);
}
