// attention_coop: attention.wgsl's fused multi-head attention with both products on cooperative
// matrices (tensor cores): FRAG × FRAG × FRAG f16 × f16 → f32 fragments. f16 storage only; same
// formula, Params, bindings, views, causal mask and output layout as attention.wgsl (see its
// header):
//
//   out[b, i, h, :] = Σ_j softmax_j(scale · q[b, i, h, :] · k[b, j, h, :]) · v[b, j, h, :]
//
// Variants (src/shaders.rs `VARIANTS`): `attention_coop16` as written (coop_mat16x16, FRAG = 16,
// NVIDIA's tensor-core shape) and `attention_coop8` (coop_mat8x8, FRAG = 8, what Mesa's lavapipe
// offers, so CPU test machines execute this very code with smaller fragments).
//
// Bindings: 0 q, 1 k, 2 v (elem4, read, addressed by element; one buffer may be bound at all
//           three), 3 out (elem, read_write), 4 params (uniform) — attention.wgsl's, read as vec4s.
// Dispatch: (ceil(Nq / BM), B·heads, 1) workgroups of NT = 4·SG invocations (4 subgroups).
//
// Flow (FlashAttention-2: a workgroup owns BM query rows of one (batch, head) and streams the
// keys in tiles of BN). DP = HEAD_DIM rounded up to FRAG; every staged tile is zero past
// HEAD_DIM, past Nq and past Nk, so the matrix ops never see out-of-range data and padded
// columns of O stay 0.
// Staging goes in 4-element chunks of d: one vec4 load where every view row is 4-aligned and
// HEAD_DIM % 4 == 0 (override VEC4, SD's shapes), four element loads otherwise.
//   once:      Q block → q_sh (f16, unscaled: the inputs stay exact), o_sh = 0.
//   per tile:  K tile → kv_sh;                                                      barrier
//              S = Q·Kᵀ → s_sh (f32): A = Q row-major (coopLoadT), B[d][key] = K[key][d], i.e.
//                K's rows are B's columns (coopLoad, column-major);                  barrier
//              V tile → kv_sh (K is dead) while each row's T lanes run the online softmax in
//                f32: s·scale·log2(e), masks, tile max (subgroupShuffleXor over the lanes),
//                m_new, α = exp2(m − m_new), P = exp2(s − m_new) → p_sh as f16, l = l·α + ΣP
//                (of the f16-rounded P, so that the weights P·V uses sum to exactly l), and the
//                row of o_sh rescaled by α (skipped where the max did not move);     barrier
//              O += P·V: C = o_sh (f32, coopLoadT), A = P row-major, B = V row-major (coopLoadT),
//                stored back to o_sh.
//   at the end: out = o_sh / l (f16), each row by its T lanes.
// Fragments are handed to subgroups round-robin (fragment f = sg, sg + 4, ...) over the BM/FRAG ×
// BN/FRAG score fragments and the BM/FRAG × DP/FRAG output fragments, so any BM, BN, DP work.
// The softmax lanes are numbered t = subgroup_id·SG + subgroup_invocation_id, row t / T, lane
// t % T with T = NT / BM: the T lanes of a row are always in one subgroup, so the row max and sum
// need shuffles, not a barrier.
//
// Why the accumulator lives in workgroup memory: the online softmax rescales each row of O by its
// own α every tile, and WGSL cannot touch the elements of a cooperative matrix, so O goes through
// o_sh (a C load and store per fragment per tile) and the row owners rescale it there, as does S.
// Why K and V share kv_sh: it halves the staging memory, which buys twice the keys per tile
// within NVIDIA's 48 KiB at SD's larger head dims (BM × BN = 32 × 64 instead of 32 × 32 at d 80,
// 16 × 64 instead of 16 × 32 at d 160), and costs no extra barrier (V is staged in the softmax
// phase, which needs a barrier after S anyway). The price: V's loads no longer overlap S.
//
// Workgroup memory (mirrored by `CoopConfig::workgroup_bytes` in src/kernels/attention.rs):
//   q_sh BM·(DP + 8) f16, kv_sh BN·(DP + 8) f16, s_sh BM·(BN + 4) f32, p_sh BM·(BN + 8) f16,
//   o_sh BM·(DP + 4) f32. Row strides: f16 ones a multiple of 8 halves and f32 ones of 4 floats,
//   and fragments start at multiples of FRAG columns, because Vulkan wants the pointer and stride
//   of cooperative loads and stores aligned to 16 bytes (or a whole fragment row if shorter); the
//   +8 / +4 padding also keeps consecutive rows out of the same banks.
//   The wrapper picks BM, BN (multiples of FRAG, BM dividing NT) per head dim to fit.
//
// Softmax numerics as attention.wgsl: f32 throughout, log2 units, masked scores MASKED = −3e38,
// running max starting at M_INIT = −1e38: no infinities, so fully masked tiles give P = 0 and
// never NaN. Every row has key 0 allowed, so l ≥ 1 at the end.

enable wgpu_cooperative_matrix;

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

// q, k, v are read four elements at a time (buffers are allocated in 256-byte granules, so the
// vec4 holding a view's last element is always in bounds).
@group(0) @binding(0) var<storage, read> q4: array<elem4>;
@group(0) @binding(1) var<storage, read> k4: array<elem4>;
@group(0) @binding(2) var<storage, read> v4: array<elem4>;
@group(0) @binding(3) var<storage, read_write> out: array<elem>;
@group(0) @binding(4) var<uniform> params: Params;

// Fragment side: the `attention_coop8` variant replaces this 16 by 8 along with the matrix types.
const FRAG: u32 = 16u;
const MASKED: f32 = -3.0e38;
const M_INIT: f32 = -1.0e38;

// Subgroup width (32 on NVIDIA, 8 on lavapipe): the workgroup is exactly 4 subgroups.
override SG: u32 = 32u;
override NT: u32 = 4u * SG;
override HEAD_DIM: u32 = 64u;
// Every view row starts at a multiple of 4 elements and HEAD_DIM % 4 == 0 (set by the host), so
// each 4-element chunk of a row is one aligned vec4 load.
override VEC4: bool = false;
// Query rows per workgroup and keys per tile: multiples of FRAG; BM divides NT.
override BM: u32 = 4u * FRAG;
override BN: u32 = 4u * FRAG;
override DP: u32 = (HEAD_DIM + FRAG - 1u) / FRAG * FRAG;
override DC: u32 = DP / 4u;    // 4-element chunks per staged row
// Softmax lanes per row.
override T: u32 = NT / BM;
// Row strides: halves of q_sh / kv_sh, floats of s_sh, halves of p_sh, floats of o_sh.
override HS: u32 = DP + 8u;
override SS: u32 = BN + 4u;
override PS: u32 = BN + 8u;
override OS: u32 = DP + 4u;
// `attention_coop_rows` (the last section): RSG subgroups of SG invocations, each owning FRAG
// query rows (the host sets BM = RSG·FRAG); T_R softmax lanes per row. Declared here: naga 30 can panic evaluating overrides
// declared after an override-sized array.
override RSG: u32 = 2u;
override NT_R: u32 = RSG * SG;
override T_R: u32 = SG / FRAG;
// `attention_coop_rows`' register prefetch: the 4-element K (and V) chunks each invocation
// stages per tile, and whether they fit the registers set aside for them (KV_REGS_MAX each).
override KV_REGS: u32 = (BN * DC + NT_R - 1u) / NT_R;
override KV_PREFETCH: bool = KV_REGS <= KV_REGS_MAX;

var<workgroup> q_sh: array<f16, BM * HS>;   // q_sh[r * HS + d] = q[row0 + r, d]
var<workgroup> kv_sh: array<f16, BN * HS>;  // kv_sh[j * HS + d] = k (then v) [key0 + j, d]
var<workgroup> s_sh: array<f32, BM * SS>;   // raw scores q·k of the tile
var<workgroup> p_sh: array<f16, BM * PS>;   // softmax numerators of the tile
var<workgroup> o_sh: array<f32, BM * OS>;   // unnormalised output rows

// Elements e .. e + 3 of q, k or v; components at or past n (1..=4) are 0. With VEC4, e is a
// multiple of 4 and n is 4.
fn q_chunk(e: u32, n: u32) -> vec4<f16> {
    if (VEC4) {
        return q4[e >> 2u];
    }
    var r = vec4<f16>(q4[e >> 2u][e & 3u], 0.0, 0.0, 0.0);
    if (n > 1u) { r.y = q4[(e + 1u) >> 2u][(e + 1u) & 3u]; }
    if (n > 2u) { r.z = q4[(e + 2u) >> 2u][(e + 2u) & 3u]; }
    if (n > 3u) { r.w = q4[(e + 3u) >> 2u][(e + 3u) & 3u]; }
    return r;
}
fn k_chunk(e: u32, n: u32) -> vec4<f16> {
    if (VEC4) {
        return k4[e >> 2u];
    }
    var r = vec4<f16>(k4[e >> 2u][e & 3u], 0.0, 0.0, 0.0);
    if (n > 1u) { r.y = k4[(e + 1u) >> 2u][(e + 1u) & 3u]; }
    if (n > 2u) { r.z = k4[(e + 2u) >> 2u][(e + 2u) & 3u]; }
    if (n > 3u) { r.w = k4[(e + 3u) >> 2u][(e + 3u) & 3u]; }
    return r;
}
fn v_chunk(e: u32, n: u32) -> vec4<f16> {
    if (VEC4) {
        return v4[e >> 2u];
    }
    var r = vec4<f16>(v4[e >> 2u][e & 3u], 0.0, 0.0, 0.0);
    if (n > 1u) { r.y = v4[(e + 1u) >> 2u][(e + 1u) & 3u]; }
    if (n > 2u) { r.z = v4[(e + 2u) >> 2u][(e + 2u) & 3u]; }
    if (n > 3u) { r.w = v4[(e + 3u) >> 2u][(e + 3u) & 3u]; }
    return r;
}

fn put_kv(o: u32, x: vec4<f16>) {
    kv_sh[o] = x.x;
    kv_sh[o + 1u] = x.y;
    kv_sh[o + 2u] = x.z;
    kv_sh[o + 3u] = x.w;
}

// Rows key0 .. key0 + BN of k (or v) → kv_sh, zero past nk and past HEAD_DIM; one 4-element
// chunk per invocation and step (DP is a multiple of FRAG, hence of 4).
fn stage_k(lid: u32, base: u32, key0: u32) {
    for (var i = lid; i < BN * DC; i += NT) {
        let j = i / DC;
        let d = 4u * (i - j * DC);
        var x = vec4<f16>(0.0);
        if (key0 + j < params.nk && d < HEAD_DIM) {
            x = k_chunk(base + (key0 + j) * params.k_stride + d, min(4u, HEAD_DIM - d));
        }
        put_kv(j * HS + d, x);
    }
}
fn stage_v(lid: u32, base: u32, key0: u32) {
    for (var i = lid; i < BN * DC; i += NT) {
        let j = i / DC;
        let d = 4u * (i - j * DC);
        var x = vec4<f16>(0.0);
        if (key0 + j < params.nk && d < HEAD_DIM) {
            x = v_chunk(base + (key0 + j) * params.v_stride + d, min(4u, HEAD_DIM - d));
        }
        put_kv(j * HS + d, x);
    }
}

// The query block (rows row0 .. row0 + BM; rows past nq are zeros: harmless scores, never
// stored) → q_sh, and O cleared, by the workgroup's `nt` invocations (both entry points).
fn stage_q_clear_o(lid: u32, nt: u32, q_base: u32, row0: u32) {
    for (var i = lid; i < BM * DC; i += nt) {
        let r = i / DC;
        let d = 4u * (i - r * DC);
        var x = vec4<f16>(0.0);
        if (row0 + r < params.nq && d < HEAD_DIM) {
            x = q_chunk(q_base + (row0 + r) * params.q_stride + d, min(4u, HEAD_DIM - d));
        }
        let o = r * HS + d;
        q_sh[o] = x.x;
        q_sh[o + 1u] = x.y;
        q_sh[o + 2u] = x.z;
        q_sh[o + 3u] = x.w;
    }
    for (var i = lid; i < BM * OS; i += nt) {
        o_sh[i] = 0.0;
    }
}

// The score of key column j of block row r in log2 units, MASKED where the key is not allowed.
fn score(r: u32, j: u32, key: u32, limit: u32) -> f32 {
    return select(MASKED, s_sh[r * SS + j] * params.scale_log2e, key < limit);
}

@compute @workgroup_size(NT)
fn attention_coop(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32,
                  @builtin(subgroup_id) sg: u32,
                  @builtin(subgroup_invocation_id) sg_lane: u32) {
    let nq = params.nq;
    let nk = params.nk;
    let heads = params.heads;
    let b = wid.y / heads;
    let h = wid.y % heads;
    let row0 = wid.x * BM;
    let causal = params.causal != 0u;

    let q_base = b * nq * params.q_stride + params.q_off + h * HEAD_DIM;
    stage_q_clear_o(lid, NT, q_base, row0);

    // This invocation's softmax row and lane.
    let t = sg * SG + sg_lane;
    let r = t / T;
    let lane = t - r * T;
    let row = row0 + r;
    let limit = select(nk, min(nk, row + 1u), causal);
    // Under the causal mask no row of this block sees keys past its last row.
    var kend = nk;
    if (causal) {
        kend = min(nk, row0 + BM);
    }
    let tiles = (kend + BN - 1u) / BN;
    let k_base = b * nk * params.k_stride + params.k_off + h * HEAD_DIM;
    let v_base = b * nk * params.v_stride + params.v_off + h * HEAD_DIM;
    let nb_s = BN / FRAG;          // score fragments per block row
    let nb_o = DP / FRAG;          // output fragments per block row
    let nf_s = (BM / FRAG) * nb_s;
    let nf_o = (BM / FRAG) * nb_o;
    // naga 30 can panic on compound pointer indices or strides in coop loads/stores: lets only.
    let hs = HS;
    let ss = SS;
    let ps = PS;
    let os = OS;

    var m = M_INIT;
    var l = 0.0;
    for (var tile = 0u; tile < tiles; tile++) {
        let key0 = tile * BN;
        // The previous tile's P·V is done with kv_sh (first tile: q_sh and o_sh are written).
        workgroupBarrier();
        stage_k(lid, k_base, key0);
        workgroupBarrier();

        // S = Q·Kᵀ, one FRAG × FRAG fragment at a time, round-robin over the subgroups.
        for (var f = sg; f < nf_s; f += 4u) {
            let rb = f / nb_s;
            let nb = f - rb * nb_s;
            var acc = coop_mat16x16<f32, C>();
            for (var kb = 0u; kb < DP; kb += FRAG) {
                let ia = rb * FRAG * HS + kb;
                let ib = nb * FRAG * HS + kb;
                let a = coopLoadT<coop_mat16x16<f16, A>>(&q_sh[ia], hs);
                let bk = coopLoad<coop_mat16x16<f16, B>>(&kv_sh[ib], hs);
                acc = coopMultiplyAdd(a, bk, acc);
            }
            let is = rb * FRAG * SS + nb * FRAG;
            coopStoreT(acc, &s_sh[is], ss);
        }
        workgroupBarrier();

        stage_v(lid, v_base, key0);

        // Online softmax of row r over this tile; this lane takes keys lane, lane + T, ...
        var mt = M_INIT;
        for (var j = lane; j < BN; j += T) {
            mt = max(mt, score(r, j, key0 + j, limit));
        }
        for (var x = 1u; x < T; x <<= 1u) {
            mt = max(mt, subgroupShuffleXor(mt, x));
        }
        let m_new = max(m, mt);
        let alpha = exp2(m - m_new);
        var sum = 0.0;
        for (var j = lane; j < BN; j += T) {
            let p = f16(exp2(score(r, j, key0 + j, limit) - m_new));
            p_sh[r * PS + j] = p;
            sum += f32(p);
        }
        // l is per lane (its keys' share); the lanes' shares are added at the end.
        l = l * alpha + sum;
        m = m_new;
        if (alpha != 1.0) {
            for (var d = lane; d < DP; d += T) {
                o_sh[r * OS + d] *= alpha;
            }
        }
        workgroupBarrier();

        // O += P·V, round-robin over the output fragments.
        for (var f = sg; f < nf_o; f += 4u) {
            let rb = f / nb_o;
            let cb = f - rb * nb_o;
            let io = rb * FRAG * OS + cb * FRAG;
            var acc = coopLoadT<coop_mat16x16<f32, C>>(&o_sh[io], os);
            for (var kb = 0u; kb < BN; kb += FRAG) {
                let ip = rb * FRAG * PS + kb;
                let iv = kb * HS + cb * FRAG;
                let a = coopLoadT<coop_mat16x16<f16, A>>(&p_sh[ip], ps);
                let bv = coopLoadT<coop_mat16x16<f16, B>>(&kv_sh[iv], hs);
                acc = coopMultiplyAdd(a, bv, acc);
            }
            coopStoreT(acc, &o_sh[io], os);
        }
    }
    workgroupBarrier();

    for (var x = 1u; x < T; x <<= 1u) {
        l += subgroupShuffleXor(l, x);
    }
    let inv = 1.0 / l;
    if (row < nq) {
        let o_base = ((b * nq + row) * heads + h) * HEAD_DIM;
        for (var d = lane; d < HEAD_DIM; d += T) {
            out[o_base + d] = elem(o_sh[r * OS + d] * inv);
        }
    }
}

// ------------------------------------------------------------------ subgroup-owned query rows
//
// `attention_coop_rows`: the same attention, each subgroup owning FRAG query rows through both
// products. The workgroup is RSG subgroups (NT_R = RSG·SG invocations), BM = RSG·FRAG rows;
// subgroup s owns block rows s·FRAG .. s·FRAG + FRAG: it computes their S fragments (all BN/FRAG
// of them), runs their online softmax with its own SG lanes (T_R = SG / FRAG per row, a power of
// two: the host requires SG % FRAG == 0), and computes their O fragments (all DP/FRAG). So every
// subgroup does the same number of multiply-adds in both products (the block kernel above hands
// BM/FRAG × BN/FRAG and BM/FRAG × DP/FRAG fragments round-robin to 4 subgroups, which leaves
// some idle, e.g. 3 output fragments on 4 subgroups at head dim 40).
// K and V have their own staging arrays and are staged together, so one barrier pair per key
// tile stages both (from registers loaded during the previous tile: KV_PREFETCH, below); the barriers after S and after the softmax only order each subgroup's own
// rows (WGSL has no subgroup-scope barrier for workgroup memory, so they are workgroup
// barriers; every subgroup does the same work, so none waits long, and at RSG = 1 they are one
// subgroup's).
// Workgroup memory (`CoopConfig::workgroup_bytes` with `subgroup_rows`): the block kernel's
// arrays with BM = RSG·FRAG (q_sh, s_sh, p_sh, o_sh; kv_sh holds K only) plus vr_sh for V.

var<workgroup> vr_sh: array<f16, BN * HS>;

// Register prefetch (KV_PREFETCH): the next tile's K and V chunks are loaded into registers
// right after this tile is staged, so their global-memory latency overlaps this tile's two
// products and softmax; the top of the next tile only stores them to workgroup memory. Chunk t
// of an invocation is chunk lid + t·NT_R of the tile (as `stage_kv_rows` walks it). Where more
// than KV_REGS_MAX chunks fall to an invocation (large head dims on few subgroups) the kernel
// stages from memory as before, rather than spill registers.
const KV_REGS_MAX: u32 = 16u;
struct KvChunks {
    k: array<vec4<f16>, KV_REGS_MAX>,
    v: array<vec4<f16>, KV_REGS_MAX>,
};

fn load_kv_chunks(lid: u32, k_base: u32, v_base: u32, key0: u32) -> KvChunks {
    var c: KvChunks;
    for (var t = 0u; t < KV_REGS; t++) {
        let i = lid + t * NT_R;
        let j = i / DC;
        let d = 4u * (i - j * DC);
        var xk = vec4<f16>(0.0);
        var xv = vec4<f16>(0.0);
        if (i < BN * DC && key0 + j < params.nk && d < HEAD_DIM) {
            let n = min(4u, HEAD_DIM - d);
            xk = k_chunk(k_base + (key0 + j) * params.k_stride + d, n);
            xv = v_chunk(v_base + (key0 + j) * params.v_stride + d, n);
        }
        c.k[t] = xk;
        c.v[t] = xv;
    }
    return c;
}

fn store_kv_chunks(lid: u32, c: KvChunks) {
    for (var t = 0u; t < KV_REGS; t++) {
        let i = lid + t * NT_R;
        if (i < BN * DC) {
            let j = i / DC;
            let o = j * HS + 4u * (i - j * DC);
            put_kv(o, c.k[t]);
            vr_sh[o] = c.v[t].x;
            vr_sh[o + 1u] = c.v[t].y;
            vr_sh[o + 2u] = c.v[t].z;
            vr_sh[o + 3u] = c.v[t].w;
        }
    }
}

// Keys key0 .. key0 + BN of k and of v → kv_sh and vr_sh, zero past nk and past HEAD_DIM.
fn stage_kv_rows(lid: u32, k_base: u32, v_base: u32, key0: u32) {
    for (var i = lid; i < BN * DC; i += NT_R) {
        let j = i / DC;
        let d = 4u * (i - j * DC);
        var xk = vec4<f16>(0.0);
        var xv = vec4<f16>(0.0);
        if (key0 + j < params.nk && d < HEAD_DIM) {
            let n = min(4u, HEAD_DIM - d);
            xk = k_chunk(k_base + (key0 + j) * params.k_stride + d, n);
            xv = v_chunk(v_base + (key0 + j) * params.v_stride + d, n);
        }
        let o = j * HS + d;
        put_kv(o, xk);
        vr_sh[o] = xv.x;
        vr_sh[o + 1u] = xv.y;
        vr_sh[o + 2u] = xv.z;
        vr_sh[o + 3u] = xv.w;
    }
}

@compute @workgroup_size(NT_R)
fn attention_coop_rows(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32,
                       @builtin(subgroup_id) sg: u32,
                       @builtin(subgroup_invocation_id) sg_lane: u32) {
    let nq = params.nq;
    let nk = params.nk;
    let heads = params.heads;
    let b = wid.y / heads;
    let h = wid.y % heads;
    let row0 = wid.x * BM;
    let causal = params.causal != 0u;

    let q_base = b * nq * params.q_stride + params.q_off + h * HEAD_DIM;
    stage_q_clear_o(lid, NT_R, q_base, row0);

    // This subgroup's rows, and this lane's softmax row (T_R adjacent lanes per row, all in
    // this subgroup) and its share of the keys.
    let rb = sg * FRAG;
    let r = rb + sg_lane / T_R;
    let lane = sg_lane % T_R;
    let row = row0 + r;
    let limit = select(nk, min(nk, row + 1u), causal);
    var kend = nk;
    if (causal) {
        kend = min(nk, row0 + BM);
    }
    let tiles = (kend + BN - 1u) / BN;
    let k_base = b * nk * params.k_stride + params.k_off + h * HEAD_DIM;
    let v_base = b * nk * params.v_stride + params.v_off + h * HEAD_DIM;
    // naga 30 can panic on compound pointer indices or strides in coop loads/stores: lets only.
    let hs = HS;
    let ss = SS;
    let ps = PS;
    let os = OS;

    var m = M_INIT;
    var l = 0.0;
    var next: KvChunks;
    if (KV_PREFETCH) {
        next = load_kv_chunks(lid, k_base, v_base, 0u);
    }
    for (var tile = 0u; tile < tiles; tile++) {
        let key0 = tile * BN;
        // Every subgroup is done with the previous tile's K and V (first tile: Q and O are in).
        workgroupBarrier();
        if (KV_PREFETCH) {
            store_kv_chunks(lid, next);
        } else {
            stage_kv_rows(lid, k_base, v_base, key0);
        }
        workgroupBarrier();
        // The next tile's loads go out before this tile's products.
        if (KV_PREFETCH && tile + 1u < tiles) {
            next = load_kv_chunks(lid, k_base, v_base, key0 + BN);
        }

        // S = Q·Kᵀ for this subgroup's FRAG rows: BN / FRAG fragments.
        for (var nb = 0u; nb < BN; nb += FRAG) {
            var acc = coop_mat16x16<f32, C>();
            for (var kb = 0u; kb < DP; kb += FRAG) {
                let ia = rb * HS + kb;
                let ib = nb * HS + kb;
                let a = coopLoadT<coop_mat16x16<f16, A>>(&q_sh[ia], hs);
                let bk = coopLoad<coop_mat16x16<f16, B>>(&kv_sh[ib], hs);
                acc = coopMultiplyAdd(a, bk, acc);
            }
            let is = rb * SS + nb;
            coopStoreT(acc, &s_sh[is], ss);
        }
        workgroupBarrier();

        // Online softmax of row r over this tile (as the block kernel's).
        var mt = M_INIT;
        for (var j = lane; j < BN; j += T_R) {
            mt = max(mt, score(r, j, key0 + j, limit));
        }
        for (var x = 1u; x < T_R; x <<= 1u) {
            mt = max(mt, subgroupShuffleXor(mt, x));
        }
        let m_new = max(m, mt);
        let alpha = exp2(m - m_new);
        var sum = 0.0;
        for (var j = lane; j < BN; j += T_R) {
            let p = f16(exp2(score(r, j, key0 + j, limit) - m_new));
            p_sh[r * PS + j] = p;
            sum += f32(p);
        }
        l = l * alpha + sum;
        m = m_new;
        if (alpha != 1.0) {
            for (var d = lane; d < DP; d += T_R) {
                o_sh[r * OS + d] *= alpha;
            }
        }
        workgroupBarrier();

        // O += P·V for this subgroup's rows: DP / FRAG fragments.
        for (var cb = 0u; cb < DP; cb += FRAG) {
            let io = rb * OS + cb;
            var acc = coopLoadT<coop_mat16x16<f32, C>>(&o_sh[io], os);
            for (var kb = 0u; kb < BN; kb += FRAG) {
                let ip = rb * PS + kb;
                let iv = kb * HS + cb;
                let a = coopLoadT<coop_mat16x16<f16, A>>(&p_sh[ip], ps);
                let bv = coopLoadT<coop_mat16x16<f16, B>>(&vr_sh[iv], hs);
                acc = coopMultiplyAdd(a, bv, acc);
            }
            coopStoreT(acc, &o_sh[io], os);
        }
    }
    workgroupBarrier();

    for (var x = 1u; x < T_R; x <<= 1u) {
        l += subgroupShuffleXor(l, x);
    }
    let inv = 1.0 / l;
    if (row < nq) {
        let o_base = ((b * nq + row) * heads + h) * HEAD_DIM;
        for (var d = lane; d < HEAD_DIM; d += T_R) {
            out[o_base + d] = elem(o_sh[r * OS + d] * inv);
        }
    }
}
