// attention: fused multi-head attention, FlashAttention-2 style.
//
//   out[b, i, h, :] = Σ_j softmax_j(scale · q[b, i, h, :] · k[b, j, h, :]) · v[b, j, h, :]
//
// with an optional causal mask (key j allowed iff j ≤ i, top-left aligned as torch's
// `is_causal`). The Nq × Nk score matrix is never materialised: a workgroup owns BM query rows of
// one (batch, head), streams the keys/values in tiles of BN through workgroup memory, and keeps
// an online softmax (running max m, running sum l, unnormalised output o) in f32 registers.
//
// Layouts (counts and strides in elements):
//   q, k, v: "heads views" of [B, N, row_stride] tensors: element (b, n, h, d) lives at
//            b·N·row_stride + n·row_stride + offset + h·HEAD_DIM + d. One fused QKV projection
//            ([B, N, 3C], offsets 0, C, 2C) or separate [B, N, C] tensors both fit.
//   out:     [B, Nq, heads·HEAD_DIM], contiguous (token-major, then head, then d: what diffusers'
//            `batch_to_head_dim` produces, ready for the output projection).
//
// Bindings: 0 q, 1 k, 2 v (elem, read; the same buffer may be bound at all three), 3 out (elem,
//           read_write), 4 params (uniform).
// Dispatch: (ceil(Nq / BM), B·heads, 1) workgroups of 128 invocations.
//
// Work split inside a workgroup (why it is shaped this way):
//   invocation t = (row group rg, d-split part ds, key lane c), c fastest. Each invocation owns
//   TWO query rows (2·rg, 2·rg + 1), so every K and V value read from workgroup memory feeds two
//   rows' FMAs. The KEY_LANES invocations of a row pair split each key tile between them (lane c
//   takes keys c, c + KEY_LANES, ..., 8 keys each) and each runs its OWN online softmax over its
//   keys: no cross-invocation max/sum exchange per tile (only two barriers per tile, for the
//   K/V load). The lanes' partial (m, l, o) are merged once at the end, like split-K flash
//   decoding. The o accumulator of a row is HEAD_DIM wide; when that is too many registers
//   (HEAD_DIM > 64) the D_SPLIT invocations of a (row pair, lane) each keep a slice of d and all
//   compute the same scores (redundant QKᵀ work, which costs less than a score exchange).
//   Per d-chunk of 4 the QKᵀ loop does 2 + 8 vec4 loads for 64 FMAs; the PV loop 1 vec4 load for
//   8 FMAs. Tiles: BM = 256 / (KEY_LANES·D_SPLIT) query rows, BN = 8·KEY_LANES keys; workgroup
//   memory (mirrored by `Config::workgroup_bytes` in src/kernels/attention.rs) is the Q tile plus
//   the K and V tiles, all f32 vec4 rows of odd stride (bank-conflict free for the 8 lanes).
//   The o registers are arrays touched only with constant indices (the `if (ov > i)` ladders,
//   dead past OV once overrides are applied), so drivers keep them in registers rather than
//   local memory. Splits are chosen by `config()` in the wrapper; they are not yet tuned on a
//   real GPU.
//
// Softmax numerics: q is prescaled by scale·log2(e) as it is staged, so scores are in log2 units
// and p = exp2(s − m). Everything (scores, max, sums, o) is f32 whatever the storage dtype, so
// SD 2.x's fp16 overflow (diffusers' `upcast_attention`) cannot happen here. Masked scores are
// MASKED = −3e38 while the running max starts at M_INIT = −1e38: a lane that has seen only masked
// keys gets p = exp2(−2e38) = 0, and a real score later rescales its (zero) state by
// exp2(−1e38 − s) = 0. No infinities anywhere, so no NaN from (−inf) − (−inf).
//
// Override constants: HEAD_DIM (any 1..=256), KEY_LANES (1, 2, 4, 8), D_SPLIT (1, 2, 4, 8, with
// ceil(ceil(HEAD_DIM / 4) / D_SPLIT) ≤ 16). The wrapper picks them to fit workgroup memory.

struct Params {
    nq: u32,          // query tokens
    nk: u32,          // key / value tokens
    heads: u32,
    causal: u32,      // 1: key j allowed only for query rows i ≥ j
    q_stride: u32,    // row_stride of the q view
    q_off: u32,       // offset of the q view inside a row
    k_stride: u32,
    k_off: u32,
    v_stride: u32,
    v_off: u32,
    scale_log2e: f32, // softmax scale · log2(e)
    _pad: u32,
};

@group(0) @binding(0) var<storage, read> q: array<elem>;
@group(0) @binding(1) var<storage, read> k: array<elem>;
@group(0) @binding(2) var<storage, read> v: array<elem>;
@group(0) @binding(3) var<storage, read_write> out: array<elem>;
@group(0) @binding(4) var<uniform> params: Params;

override HEAD_DIM: u32 = 64u;
override KEY_LANES: u32 = 8u;
override D_SPLIT: u32 = 1u;

const THREADS: u32 = 128u;
// Keys per lane per tile (the score loop below is unrolled for exactly 8).
const KP: u32 = 8u;
// Register budget for one row's o slice, in vec4s.
const OV_MAX: u32 = 16u;
const MASKED: f32 = -3.0e38;
const M_INIT: f32 = -1.0e38;

// d in chunks of 4 (the tail chunk zero-padded in q and k, so dot products are unaffected).
override DV4: u32 = (HEAD_DIM + 3u) / 4u;
// o slice of one invocation, in vec4s.
override OV: u32 = (DV4 + D_SPLIT - 1u) / D_SPLIT;
override ROW_GROUPS: u32 = THREADS / (KEY_LANES * D_SPLIT);
override BM: u32 = 2u * ROW_GROUPS;
override BN: u32 = KP * KEY_LANES;
// Row strides of the tiles in vec4s, made odd so that the 8 lanes reading 8 different rows at
// the same d hit 8 different bank groups.
override QS: u32 = DV4 | 1u;
override KVS: u32 = max(DV4, D_SPLIT * OV) | 1u;
// k_tile doubles as the exchange buffer of the final merge (2 vec4 per invocation).
override K_TILE_LEN: u32 = max(BN * KVS, 2u * THREADS);

var<workgroup> q_tile: array<vec4<f32>, BM * QS>;
var<workgroup> k_tile: array<vec4<f32>, K_TILE_LEN>;
var<workgroup> v_tile: array<vec4<f32>, BN * KVS>;

// Four consecutive d of one row (d0 a multiple of 4 below HEAD_DIM); components past HEAD_DIM are 0.
fn load_q4(base: u32, d0: u32) -> vec4<f32> {
    var r = vec4<f32>(f32(q[base + d0]), 0.0, 0.0, 0.0);
    if (d0 + 1u < HEAD_DIM) { r.y = f32(q[base + d0 + 1u]); }
    if (d0 + 2u < HEAD_DIM) { r.z = f32(q[base + d0 + 2u]); }
    if (d0 + 3u < HEAD_DIM) { r.w = f32(q[base + d0 + 3u]); }
    return r;
}
fn load_k4(base: u32, d0: u32) -> vec4<f32> {
    var r = vec4<f32>(f32(k[base + d0]), 0.0, 0.0, 0.0);
    if (d0 + 1u < HEAD_DIM) { r.y = f32(k[base + d0 + 1u]); }
    if (d0 + 2u < HEAD_DIM) { r.z = f32(k[base + d0 + 2u]); }
    if (d0 + 3u < HEAD_DIM) { r.w = f32(k[base + d0 + 3u]); }
    return r;
}
fn load_v4(base: u32, d0: u32) -> vec4<f32> {
    var r = vec4<f32>(f32(v[base + d0]), 0.0, 0.0, 0.0);
    if (d0 + 1u < HEAD_DIM) { r.y = f32(v[base + d0 + 1u]); }
    if (d0 + 2u < HEAD_DIM) { r.z = f32(v[base + d0 + 2u]); }
    if (d0 + 3u < HEAD_DIM) { r.w = f32(v[base + d0 + 3u]); }
    return r;
}

// acc[i] += dot(x, key_i) for four keys, as 16 FMAs (no horizontal adds).
fn qk4(x: vec4<f32>, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>, acc: vec4<f32>) -> vec4<f32> {
    var s = fma(vec4<f32>(x.x), vec4<f32>(a.x, b.x, c.x, d.x), acc);
    s = fma(vec4<f32>(x.y), vec4<f32>(a.y, b.y, c.y, d.y), s);
    s = fma(vec4<f32>(x.z), vec4<f32>(a.z, b.z, c.z, d.z), s);
    s = fma(vec4<f32>(x.w), vec4<f32>(a.w, b.w, c.w, d.w), s);
    return s;
}

// Scores of keys (first, first + step, first + 2·step, first + 3·step) set to MASKED where the key
// is past `limit` (nk, or row + 1 under the causal mask).
fn mask4(s: vec4<f32>, first: u32, step: u32, limit: u32) -> vec4<f32> {
    let keys = vec4<u32>(first, first + step, first + 2u * step, first + 3u * step);
    return select(vec4<f32>(MASKED), s, keys < vec4<u32>(limit));
}

fn max4(x: vec4<f32>) -> f32 {
    return max(max(x.x, x.y), max(x.z, x.w));
}
fn sum4(x: vec4<f32>) -> f32 {
    return (x.x + x.y) + (x.z + x.w);
}

// o += P·V for one vec4 of d (chunk index vb of lane's key 0): 8 keys × 2 rows = 64 FMAs for
// 8 vec4 loads. `alpha` rescales the old o to the new running max first.
// (Values in and out rather than pointers: naga 30's SPIR-V writer panics on `&o_a[i]` arguments.)
struct Pair {
    a: vec4<f32>,
    b: vec4<f32>,
};

fn pv(vb: u32, step: u32, oa: vec4<f32>, ob: vec4<f32>,
      alpha_a: f32, alpha_b: f32, pa_a: vec4<f32>, pb_a: vec4<f32>, pa_b: vec4<f32>, pb_b: vec4<f32>) -> Pair {
    let v0 = v_tile[vb];
    let v1 = v_tile[vb + step];
    let v2 = v_tile[vb + 2u * step];
    let v3 = v_tile[vb + 3u * step];
    let v4 = v_tile[vb + 4u * step];
    let v5 = v_tile[vb + 5u * step];
    let v6 = v_tile[vb + 6u * step];
    let v7 = v_tile[vb + 7u * step];
    var x = oa * alpha_a;
    x = fma(vec4<f32>(pa_a.x), v0, x);
    x = fma(vec4<f32>(pa_a.y), v1, x);
    x = fma(vec4<f32>(pa_a.z), v2, x);
    x = fma(vec4<f32>(pa_a.w), v3, x);
    x = fma(vec4<f32>(pb_a.x), v4, x);
    x = fma(vec4<f32>(pb_a.y), v5, x);
    x = fma(vec4<f32>(pb_a.z), v6, x);
    x = fma(vec4<f32>(pb_a.w), v7, x);
    var y = ob * alpha_b;
    y = fma(vec4<f32>(pa_b.x), v0, y);
    y = fma(vec4<f32>(pa_b.y), v1, y);
    y = fma(vec4<f32>(pa_b.z), v2, y);
    y = fma(vec4<f32>(pa_b.w), v3, y);
    y = fma(vec4<f32>(pb_b.x), v4, y);
    y = fma(vec4<f32>(pb_b.y), v5, y);
    y = fma(vec4<f32>(pb_b.z), v6, y);
    y = fma(vec4<f32>(pb_b.w), v7, y);
    return Pair(x, y);
}

// Sum vec4 column i of the final (already rescaled and normalised) o over the key lanes of each
// row pair and store it. Called from uniform control flow: it holds two barriers.
fn merge_store(i: u32, xa: vec4<f32>, xb: vec4<f32>, t: u32, lane: u32, ds: u32, row_a: u32, nq: u32,
               out_a: u32, out_b: u32) {
    k_tile[2u * t] = xa;
    k_tile[2u * t + 1u] = xb;
    workgroupBarrier();
    if (lane == 0u) {
        var acc_a = vec4<f32>(0.0);
        var acc_b = vec4<f32>(0.0);
        for (var c = 0u; c < KEY_LANES; c++) {
            acc_a += k_tile[2u * (t + c)];
            acc_b += k_tile[2u * (t + c) + 1u];
        }
        let d0 = 4u * (ds * OV + i);
        for (var e = 0u; e < 4u; e++) {
            if (d0 + e < HEAD_DIM) {
                if (row_a < nq) { out[out_a + d0 + e] = elem(acc_a[e]); }
                if (row_a + 1u < nq) { out[out_b + d0 + e] = elem(acc_b[e]); }
            }
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(128)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let lane = t % KEY_LANES;
    let ds = (t / KEY_LANES) % D_SPLIT;
    let rg = t / (KEY_LANES * D_SPLIT);
    let nq = params.nq;
    let nk = params.nk;
    let heads = params.heads;
    let b = wid.y / heads;
    let h = wid.y % heads;
    let row0 = wid.x * BM;
    let causal = params.causal != 0u;

    // Stage the query block, prescaled into log2 units; rows past nq are zeros (harmless scores,
    // never stored).
    let q_base = b * nq * params.q_stride + params.q_off + h * HEAD_DIM;
    for (var i = t; i < BM * DV4; i += THREADS) {
        let r = i / DV4;
        let c4 = i % DV4;
        var x = vec4<f32>(0.0);
        if (row0 + r < nq) {
            x = load_q4(q_base + (row0 + r) * params.q_stride, 4u * c4) * params.scale_log2e;
        }
        q_tile[r * QS + c4] = x;
    }

    let r0 = 2u * rg;
    let r1 = r0 + 1u;
    let row_a = row0 + r0;
    let row_b = row0 + r1;
    // Under the causal mask no row of this block sees keys past its last row.
    var kend = nk;
    if (causal) {
        kend = min(nk, row0 + BM);
    }
    let limit_a = select(nk, min(nk, row_a + 1u), causal);
    let limit_b = select(nk, min(nk, row_b + 1u), causal);
    let tiles = (kend + BN - 1u) / BN;
    let k_base = b * nk * params.k_stride + params.k_off + h * HEAD_DIM;
    let v_base = b * nk * params.v_stride + params.v_off + h * HEAD_DIM;
    let vw = D_SPLIT * OV; // vec4 chunks of a v_tile row that the PV loop reads

    var m_a = M_INIT;
    var m_b = M_INIT;
    var l_a = 0.0;
    var l_b = 0.0;
    // o of both rows, this invocation's d slice. Indexed only by constants (the `if (ov > i)`
    // ladders below), so drivers keep them in registers instead of spilling to local memory.
    // `ov` is OV through a variable: naga 30's SPIR-V writer panics ("expression not cached") on
    // an `if` whose condition is a pure override expression. Drivers fold it back to a constant.
    var ov = OV;
    var o_a = array<vec4<f32>, OV_MAX>();
    var o_b = array<vec4<f32>, OV_MAX>();

    for (var tile = 0u; tile < tiles; tile++) {
        let key0 = tile * BN;
        // The previous tile's readers are done (and, on the first tile, q_tile is written).
        workgroupBarrier();
        // Stage K and V; keys past nk and d past HEAD_DIM are zeros (0 · garbage could be NaN).
        for (var i = t; i < BN * DV4; i += THREADS) {
            let kk = i / DV4;
            let c4 = i % DV4;
            var x = vec4<f32>(0.0);
            if (key0 + kk < nk) {
                x = load_k4(k_base + (key0 + kk) * params.k_stride, 4u * c4);
            }
            k_tile[kk * KVS + c4] = x;
        }
        for (var i = t; i < BN * vw; i += THREADS) {
            let kk = i / vw;
            let c4 = i % vw;
            var x = vec4<f32>(0.0);
            if (key0 + kk < nk && c4 < DV4) {
                x = load_v4(v_base + (key0 + kk) * params.v_stride, 4u * c4);
            }
            v_tile[kk * KVS + c4] = x;
        }
        workgroupBarrier();

        // Scores of this lane's 8 keys (lane + KEY_LANES·j) for both rows: sa = keys j 0..3,
        // sb = keys j 4..7.
        let step = KEY_LANES * KVS;
        var sa_a = vec4<f32>(0.0);
        var sb_a = vec4<f32>(0.0);
        var sa_b = vec4<f32>(0.0);
        var sb_b = vec4<f32>(0.0);
        for (var c4 = 0u; c4 < DV4; c4++) {
            let xa = q_tile[r0 * QS + c4];
            let xb = q_tile[r1 * QS + c4];
            let kb = lane * KVS + c4;
            let k0 = k_tile[kb];
            let k1 = k_tile[kb + step];
            let k2 = k_tile[kb + 2u * step];
            let k3 = k_tile[kb + 3u * step];
            let k4 = k_tile[kb + 4u * step];
            let k5 = k_tile[kb + 5u * step];
            let k6 = k_tile[kb + 6u * step];
            let k7 = k_tile[kb + 7u * step];
            sa_a = qk4(xa, k0, k1, k2, k3, sa_a);
            sb_a = qk4(xa, k4, k5, k6, k7, sb_a);
            sa_b = qk4(xb, k0, k1, k2, k3, sa_b);
            sb_b = qk4(xb, k4, k5, k6, k7, sb_b);
        }
        // Uniform branch: only the tail tile (and diagonal tiles under the causal mask) mask.
        if (key0 + BN > nk || (causal && key0 + BN > row0 + 1u)) {
            let first = key0 + lane;
            sa_a = mask4(sa_a, first, KEY_LANES, limit_a);
            sb_a = mask4(sb_a, first + 4u * KEY_LANES, KEY_LANES, limit_a);
            sa_b = mask4(sa_b, first, KEY_LANES, limit_b);
            sb_b = mask4(sb_b, first + 4u * KEY_LANES, KEY_LANES, limit_b);
        }

        // Online softmax of this lane's keys.
        let mn_a = max(m_a, max(max4(sa_a), max4(sb_a)));
        let mn_b = max(m_b, max(max4(sa_b), max4(sb_b)));
        let alpha_a = exp2(m_a - mn_a);
        let alpha_b = exp2(m_b - mn_b);
        let pa_a = exp2(sa_a - vec4<f32>(mn_a));
        let pb_a = exp2(sb_a - vec4<f32>(mn_a));
        let pa_b = exp2(sa_b - vec4<f32>(mn_b));
        let pb_b = exp2(sb_b - vec4<f32>(mn_b));
        l_a = l_a * alpha_a + (sum4(pa_a) + sum4(pb_a));
        l_b = l_b * alpha_b + (sum4(pa_b) + sum4(pb_b));
        m_a = mn_a;
        m_b = mn_b;

        // o = o·alpha + P·V over this invocation's d slice, one vec4 of d per call.
        let vb = lane * KVS + ds * OV;
        { let r = pv(vb + 0u, step, o_a[0], o_b[0], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[0] = r.a; o_b[0] = r.b; }
        if (ov > 1u) { let r = pv(vb + 1u, step, o_a[1], o_b[1], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[1] = r.a; o_b[1] = r.b; }
        if (ov > 2u) { let r = pv(vb + 2u, step, o_a[2], o_b[2], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[2] = r.a; o_b[2] = r.b; }
        if (ov > 3u) { let r = pv(vb + 3u, step, o_a[3], o_b[3], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[3] = r.a; o_b[3] = r.b; }
        if (ov > 4u) { let r = pv(vb + 4u, step, o_a[4], o_b[4], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[4] = r.a; o_b[4] = r.b; }
        if (ov > 5u) { let r = pv(vb + 5u, step, o_a[5], o_b[5], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[5] = r.a; o_b[5] = r.b; }
        if (ov > 6u) { let r = pv(vb + 6u, step, o_a[6], o_b[6], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[6] = r.a; o_b[6] = r.b; }
        if (ov > 7u) { let r = pv(vb + 7u, step, o_a[7], o_b[7], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[7] = r.a; o_b[7] = r.b; }
        if (ov > 8u) { let r = pv(vb + 8u, step, o_a[8], o_b[8], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[8] = r.a; o_b[8] = r.b; }
        if (ov > 9u) { let r = pv(vb + 9u, step, o_a[9], o_b[9], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[9] = r.a; o_b[9] = r.b; }
        if (ov > 10u) { let r = pv(vb + 10u, step, o_a[10], o_b[10], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[10] = r.a; o_b[10] = r.b; }
        if (ov > 11u) { let r = pv(vb + 11u, step, o_a[11], o_b[11], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[11] = r.a; o_b[11] = r.b; }
        if (ov > 12u) { let r = pv(vb + 12u, step, o_a[12], o_b[12], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[12] = r.a; o_b[12] = r.b; }
        if (ov > 13u) { let r = pv(vb + 13u, step, o_a[13], o_b[13], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[13] = r.a; o_b[13] = r.b; }
        if (ov > 14u) { let r = pv(vb + 14u, step, o_a[14], o_b[14], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[14] = r.a; o_b[14] = r.b; }
        if (ov > 15u) { let r = pv(vb + 15u, step, o_a[15], o_b[15], alpha_a, alpha_b, pa_a, pb_a, pa_b, pb_b); o_a[15] = r.a; o_b[15] = r.b; }
    }

    // Merge the KEY_LANES partial softmaxes of each row: rescale every lane to the row's max,
    // then sum l and o over the lanes. Lanes of one (row group, d part) are t - lane + 0..KEY_LANES.
    // k_tile is the exchange buffer (no extra workgroup memory).
    workgroupBarrier(); // every lane is done with the last K/V tile
    k_tile[t] = vec4<f32>(m_a, m_b, l_a, l_b);
    workgroupBarrier();
    let t0 = t - lane;
    var big_a = M_INIT;
    var big_b = M_INIT;
    for (var c = 0u; c < KEY_LANES; c++) {
        let x = k_tile[t0 + c];
        big_a = max(big_a, x.x);
        big_b = max(big_b, x.y);
    }
    var sum_a = 0.0;
    var sum_b = 0.0;
    for (var c = 0u; c < KEY_LANES; c++) {
        let x = k_tile[t0 + c];
        sum_a += x.z * exp2(x.x - big_a);
        sum_b += x.w * exp2(x.y - big_b);
    }
    let f_a = exp2(m_a - big_a);
    let f_b = exp2(m_b - big_b);
    // Every row has at least one allowed key (key 0), so the sums are >= 1.
    let inv_a = 1.0 / sum_a;
    let inv_b = 1.0 / sum_b;
    workgroupBarrier(); // everyone has read the (m, l) exchange
    let width = heads * HEAD_DIM;
    let out_a = ((b * nq + row_a) * heads + h) * HEAD_DIM;
    let out_b = out_a + width;
    // One vec4 column of o at a time through k_tile (2 vec4 per invocation).
    let w_a = f_a * inv_a;
    let w_b = f_b * inv_b;
    merge_store(0u, o_a[0] * w_a, o_b[0] * w_b, t, lane, ds, row_a, nq, out_a, out_b);
    if (ov > 1u) { merge_store(1u, o_a[1] * w_a, o_b[1] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 2u) { merge_store(2u, o_a[2] * w_a, o_b[2] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 3u) { merge_store(3u, o_a[3] * w_a, o_b[3] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 4u) { merge_store(4u, o_a[4] * w_a, o_b[4] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 5u) { merge_store(5u, o_a[5] * w_a, o_b[5] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 6u) { merge_store(6u, o_a[6] * w_a, o_b[6] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 7u) { merge_store(7u, o_a[7] * w_a, o_b[7] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 8u) { merge_store(8u, o_a[8] * w_a, o_b[8] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 9u) { merge_store(9u, o_a[9] * w_a, o_b[9] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 10u) { merge_store(10u, o_a[10] * w_a, o_b[10] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 11u) { merge_store(11u, o_a[11] * w_a, o_b[11] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 12u) { merge_store(12u, o_a[12] * w_a, o_b[12] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 13u) { merge_store(13u, o_a[13] * w_a, o_b[13] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 14u) { merge_store(14u, o_a[14] * w_a, o_b[14] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
    if (ov > 15u) { merge_store(15u, o_a[15] * w_a, o_b[15] * w_b, t, lane, ds, row_a, nq, out_a, out_b); }
}
