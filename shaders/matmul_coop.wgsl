// matmul_coop: the matmul.wgsl kernels (linear, geglu, batched A·Bᵀ) on cooperative matrices
// (tensor cores): FRAG × FRAG × FRAG f16 × f16 → f32 fragments. f16 storage only; same Params,
// bindings, epilogues and results as matmul.wgsl (see its header for the formulas and layouts).
//
// Two variants are compiled from this file (src/shaders.rs `VARIANTS`): `matmul_coop16` as written
// (coop_mat16x16, FRAG = 16: NVIDIA's 16×16×16 f16→f32 tensor-core shape) and `matmul_coop8`
// (every `coop_mat16x16` renamed `coop_mat8x8`, FRAG = 8: the shape Mesa's lavapipe offers, so
// the CPU test machines execute the same code path). The host picks the largest square f16→f32
// configuration the adapter reports, and only on adapters with one fixed subgroup width SG.
//
// Bindings: 0 x (elem4, read), 1 w (elem4, read), 2 bias, 3 residual, 4 out (read_write),
//           5 params, 6 / 7 LayerNorm weight / bias, 8 partial (f32, the large tile's split
//           sums) — as matmul.wgsl otherwise, LayerNorm on load
//           (norm_mode 1) included: the statistics prologue runs before the first staging
//           load, and `fetch` normalises the x chunks in f32 before they are rounded to f16.
// K % 4 == 0 is required (vec4 staging loads); the host uses matmul.wgsl otherwise.
//
// Two tile sizes, each with a linear and a geglu entry point; the host picks by the number of
// workgroups (src/kernels/matmul.rs `CoopTile`). Both share the flow (K step TK = 2·FRAG),
// software-pipelined as conv2d_coop.wgsl's large tile:
// - Fixed staging slots. A K step stages ROWS × TK halves of x and of w (ROWS = the tile side),
//   as vec4 chunks, CHUNKS = TK / 4 per row. With 4·SG (or 8·SG) invocations an invocation
//   always owns chunk column c = lid % CHUNKS of the same SLOTS rows lid / CHUNKS + j·RPP,
//   RPP = invocations / CHUNKS, SLOTS = FRAG² / (2·SG) for either tile: 4 for 16 × 16 on
//   32-wide subgroups and for 8 × 8 on 8-wide ones. The host runs this file only where SLOTS
//   is 1, 2 or 4 (`CoopPlan::matmul_staging_fits`). Its global vec4 indices (`Staging`) are
//   computed once, before the K loop, and advance by CHUNKS per step: no divisions, no
//   re-decoding of the geglu row map in the loop.
// - Register prefetch. Per step: store the chunks held in registers (`Chunks`) to workgroup
//   memory, barrier, issue the next step's global loads into registers, multiply-accumulate
//   the stored tile, barrier (not after the last step). The loads' latency overlaps the matrix
//   work; the two barriers are the ones a single staging buffer needs (reads after stores,
//   stores after reads), and double buffering does not fit beside the large tile's epilogue
//   slots in 48 KiB.
// Chunks past M, N or K are zeros (never loaded), so the matrix ops never see out-of-range
// data; the f32 accumulators reach the fused epilogue (bias, activation, residual / GELU gate)
// through workgroup memory, whose stores are coalesced along rows. Grid: (ceil(N / outputs per
// tile row), ceil(M / tile rows), batch).
//
// `linear_coop` / `geglu_coop`: 4 subgroups; output tile TM × TN = 4·FRAG × 4·FRAG (64 × 64 at
// FRAG 16; geglu: TM rows × TN/2 outputs, i.e. TN/2 hidden + TN/2 gate weight rows). Subgroup s
// owns the 2·FRAG × 2·FRAG quarter (s / 2, s % 2) as 2 × 2 accumulator fragments; per FRAG of K
// it loads 2 + 2 fragments for 4 multiply-adds. The whole f32 tile goes to workgroup memory for
// the epilogue. Workgroup memory 2·TM·AS f16 + TM·TN f32: 26 KiB at FRAG 16, 7 KiB at FRAG 8.
//
// `linear_coop_l` / `geglu_coop_l` (the large tile): 8 subgroups arranged 2 (rows) × 4
// (columns); output tile TL × TL = 8·FRAG × 8·FRAG (128 × 128 at FRAG 16). Subgroup s owns the
// 4·FRAG × 2·FRAG block (s / 4, s % 4) as 4 × 2 accumulator fragments c00 .. c31; per FRAG of K
// it loads 4 A + 2 B fragments for 8 multiply-adds. Why: per K step the workgroup reads
// 2 · TL · TK f16 from L2 for 2 · TL² · TK FLOP, i.e. TL / 2 FLOP per byte — 64 at TL = 128,
// twice the 64 tile's 32, which cannot feed an H100's tensor cores from its L2 — and a
// subgroup loads 0.75 fragments from workgroup memory per multiply-add instead of 1.
// Why 4 × 2 fragments per subgroup (not 2 × 4): the same loads per multiply-add either way, but
// a subgroup's two column fragments are then one GEGLU pair: for geglu the staged w rows of
// column block j are FRAG hidden rows followed by the FRAG gate rows of the same outputs
// (`b_row_l`), so each output's hidden and gate accumulators sit in one subgroup, side by side.
// The 64 KiB f32 tile does not fit beside the staging, so the epilogue runs in 4 passes: in
// pass i every subgroup stores its fragment row i (ci0 | ci1, FRAG × 2·FRAG f32, a whole GEGLU
// pair) into its own slot of c_shl, and after a barrier all threads finish the 8 slots
// (linear: 2·FRAG outputs per slot row; geglu: FRAG hidden · gelu(gate) outputs).
// Split K (override SPLIT; single GEMMs whose large-tile grid is small, src/kernels/coop.rs
// `gemm_tile_and_split`: SD's 8×8 and 16×16 projections and feed-forwards, M = 128-512, 10-40
// tiles of 128): workgroup z runs K range [z·k_chunk, (z + 1)·k_chunk) and stores its raw f32
// sums in `partial` (geglu: the hidden and gate sums apart); linear_split_reduce /
// geglu_split_reduce add the splits in order and run the epilogue, rounding once. The
// LayerNorm-on-load prologue still takes each row's statistics over all of K.
// Workgroup memory 2·TL·AS f16 + 8·FRAG·2·FRAG f32: 20 + 16 = 36 KiB at FRAG 16 (NVIDIA allows
// 48), 6 + 4 = 10 KiB at FRAG 8 (lavapipe allows 32). The host checks the same formula
// (`CoopTile::workgroup_bytes`) and keeps the 64 tile where it does not fit.
// Global loads are whole vec4<f16>s (8 bytes; 16-byte loads would need K % 8 == 0 and 16-byte
// bindings, which the awkward shapes this file serves do not have). Staging stays scalar f16
// stores to workgroup memory: coopLoad would accept a vec4<f16> array in naga, but then SPIR-V
// measures the stride in vec4s while naga's MSL wrapper takes a `half*`, so the same WGSL would
// not mean the same on every back end.

enable wgpu_cooperative_matrix;

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
    k_chunk: u32, // SPLIT: K per split (a multiple of TK); the large tile's z is the split
};

@group(0) @binding(0) var<storage, read> x4: array<elem4>;
@group(0) @binding(1) var<storage, read> w4: array<elem4>;
@group(0) @binding(2) var<storage, read> bias: array<elem>;
@group(0) @binding(3) var<storage, read> residual: array<elem>;
@group(0) @binding(4) var<storage, read_write> out: array<elem>;
@group(0) @binding(5) var<uniform> params: Params;
@group(0) @binding(6) var<storage, read> ln_w4: array<elem4>;
@group(0) @binding(7) var<storage, read> ln_b4: array<elem4>;
// The large tile with SPLIT and the split reduces: the f32 partial sums of every K split,
// partial[(split · M + m) · W + col], W = N (linear) or 2N (geglu: hidden columns, then gate).
// (linear_coop_l / geglu_coop_l declare it either way: the host binds a small scratch buffer
// when it does not split.)
@group(0) @binding(8) var<storage, read_write> partial: array<f32>;

// Fragment side: the `matmul_coop8` variant replaces this 16 by 8 along with the matrix types.
const FRAG: u32 = 16u;
const TM: u32 = 4u * FRAG;
const TN: u32 = 4u * FRAG;
const TK: u32 = 2u * FRAG;
// Subgroup width (32 on NVIDIA, 8 on lavapipe): the workgroup is exactly 4 subgroups (NT), or
// 8 for the large tile (NT_L). Overrides come before the arrays: naga 30 can panic evaluating
// overrides declared after an override-sized array.
override SG: u32 = 32u;
override NT: u32 = 4u * SG;
override NT_L: u32 = 8u * SG;
// Staging (see the header): vec4 chunks per staged row, and staged rows per invocation in
// either tile (1, 2 or 4 where the host runs this file).
const CHUNKS: u32 = TK / 4u;
override SLOTS: u32 = FRAG * FRAG / (2u * SG);
// Split K (the large tile, batch 1): workgroup z takes K range [z·k_chunk, (z + 1)·k_chunk)
// and leaves its raw f32 sums in `partial`; linear_split_reduce / geglu_split_reduce then add
// the splits in order and run the epilogue.
override SPLIT: bool = false;
// Row stride of the staged tiles in halves: TK + 8 keeps every fragment's rows 16-byte aligned
// (TK + 8 halves is a multiple of 8) and staggers rows across banks.
const AS: u32 = TK + 8u;

var<workgroup> a_sh: array<f16, TM * AS>;   // a_sh[r * AS + k] = x[m0 + r, k0 + k]
var<workgroup> b_sh: array<f16, TN * AS>;   // b_sh[r * AS + k] = w[row(r), k0 + k] (Bᵀ)
var<workgroup> c_sh: array<f32, TM * TN>;   // accumulators for the epilogue
// norm_mode 1: (pivot, mean, rstd, -) of x's row m0 + r, for either tile (TL rows at most).
var<workgroup> row_stats: array<vec4<f32>, TL>;

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

// matmul.wgsl's `row_norm_prologue` for a tile of `rows` rows and `nt` invocations: every row's
// pivot (first value), mean and rstd of (x - pivot), one pass of Chan-merged 4-element chunks,
// max(nt / rows, 1) invocations per row merged in barrier-separated turns.
fn row_norm_prologue(lid: u32, nt: u32, rows: u32, m0: u32, a_base: u32) {
    let tpr = max(nt / rows, 1u);
    let rows_per_pass = nt / tpr;
    let kq = params.k >> 2u;
    for (var rb = 0u; rb < rows; rb += rows_per_pass) {
        let r = rb + lid / tpr;
        let part = lid % tpr;
        let m = m0 + r;
        var pivot = 0.0;
        var cnt = 0.0;
        var mean = 0.0;
        var m2 = 0.0;
        if (r < rows && m < params.m) {
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
            if (part == p && r < rows) {
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
        if (part == 0u && r < rows) {
            let o = row_stats[r];
            row_stats[r] = vec4<f32>(o.x, o.y, inverseSqrt(o.z / max(o.w, 1.0) + params.norm_eps), 0.0);
        }
    }
    workgroupBarrier();
}

// One staged x chunk (row slot `r`, vec4 `kq` along K) LayerNorm'd in f32, then rounded.
fn normed_chunk(q: u32, r: u32, kq: u32) -> vec4<f16> {
    let st = row_stats[r];
    let v = ((vec4<f32>(x4[q]) - vec4<f32>(st.x)) - vec4<f32>(st.y)) * st.z;
    return vec4<f16>(v * vec4<f32>(ln_w4[kq]) + vec4<f32>(ln_b4[kq]));
}

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

// ------------------------------------------------------------------ staging (both tiles)

// One invocation's staging slots: chunk column `c` of the tile's rows `r` (slot j: r[j]), and
// at the current K step the vec4 indices of those chunks in x (`qa`) and w (`qb`), whether
// each slot's row exists (`ok_*`: m < M, weight row < N, j < SLOTS), and the chunk's position
// along K in vec4s (`kq` = (k0 + 4c) / 4; the chunk exists while kq < kq_end, the end of this
// workgroup's K range in vec4s).
struct Staging {
    r: vec4<u32>,
    c: u32,
    kq: u32,
    kq_end: u32,
    qa: vec4<u32>,
    qb: vec4<u32>,
    ok_a: vec4<bool>,
    ok_b: vec4<bool>,
};

// The registers one K step's chunks wait in between their global load and their store.
struct Chunks {
    a0: vec4<f16>,
    a1: vec4<f16>,
    a2: vec4<f16>,
    a3: vec4<f16>,
    b0: vec4<f16>,
    b1: vec4<f16>,
    b2: vec4<f16>,
    b3: vec4<f16>,
};

// The staged w row of B column rr of either tile (`b_row` / `b_row_l`) and whether it exists.
fn w_row(rr: u32, n0: u32, geglu: bool, large: bool) -> vec2<u32> {
    if (large) {
        return b_row_l(rr, n0, geglu);
    }
    return b_row(rr, n0, geglu);
}

// The staging of invocation `lid` of a tile with `rpp` rows per pass (NT or NT_L over CHUNKS)
// at m0, n0 for the K range [k_begin, k_end) (k_begin a multiple of TK): every index the K loop
// needs, decoded once.
fn staging_begin(lid: u32, rpp: u32, m0: u32, n0: u32, a_base: u32, b_base: u32, geglu: bool,
                 large: bool, k_begin: u32, k_end: u32) -> Staging {
    let slot = vec4<u32>(0u, 1u, 2u, 3u);
    let live = slot < vec4<u32>(SLOTS);
    let kq = params.k >> 2u;
    var s: Staging;
    s.c = lid % CHUNKS;
    s.kq = s.c + (k_begin >> 2u);
    s.kq_end = k_end >> 2u;
    s.r = vec4<u32>(lid / CHUNKS) + slot * rpp;
    let m = vec4<u32>(m0) + s.r;
    s.ok_a = live & (m < vec4<u32>(params.m));
    // Batch offsets are multiples of 4 (K % 4 == 0), so rows start on whole vec4s.
    s.qa = vec4<u32>((a_base >> 2u) + s.kq) + m * kq;
    let w0 = w_row(s.r.x, n0, geglu, large);
    let w1 = w_row(s.r.y, n0, geglu, large);
    let w2 = w_row(s.r.z, n0, geglu, large);
    let w3 = w_row(s.r.w, n0, geglu, large);
    s.ok_b = live & (vec4<u32>(w0.y, w1.y, w2.y, w3.y) != vec4<u32>(0u));
    s.qb = vec4<u32>((b_base >> 2u) + s.kq) + vec4<u32>(w0.x, w1.x, w2.x, w3.x) * kq;
    return s;
}

// The staging one K step (TK) further on.
fn staging_next(s: Staging) -> Staging {
    var t = s;
    t.kq += CHUNKS;
    t.qa += vec4<u32>(CHUNKS);
    t.qb += vec4<u32>(CHUNKS);
    return t;
}

// This invocation's chunks at step `s`, one vec4 load each; zeros where the row or K is out of
// range (nothing is loaded there).
fn fetch(s: Staging) -> Chunks {
    var v: Chunks;
    if (s.kq < s.kq_end) {
        if (params.norm_mode != 0u) {
            if (s.ok_a.x) { v.a0 = normed_chunk(s.qa.x, s.r.x, s.kq); }
            if (s.ok_a.y) { v.a1 = normed_chunk(s.qa.y, s.r.y, s.kq); }
            if (s.ok_a.z) { v.a2 = normed_chunk(s.qa.z, s.r.z, s.kq); }
            if (s.ok_a.w) { v.a3 = normed_chunk(s.qa.w, s.r.w, s.kq); }
        } else {
            if (s.ok_a.x) { v.a0 = vec4<f16>(x4[s.qa.x]); }
            if (s.ok_a.y) { v.a1 = vec4<f16>(x4[s.qa.y]); }
            if (s.ok_a.z) { v.a2 = vec4<f16>(x4[s.qa.z]); }
            if (s.ok_a.w) { v.a3 = vec4<f16>(x4[s.qa.w]); }
        }
        if (s.ok_b.x) { v.b0 = vec4<f16>(w4[s.qb.x]); }
        if (s.ok_b.y) { v.b1 = vec4<f16>(w4[s.qb.y]); }
        if (s.ok_b.z) { v.b2 = vec4<f16>(w4[s.qb.z]); }
        if (s.ok_b.w) { v.b3 = vec4<f16>(w4[s.qb.w]); }
    }
    return v;
}

fn put_a(o: u32, v: vec4<f16>) {
    a_sh[o] = v.x;
    a_sh[o + 1u] = v.y;
    a_sh[o + 2u] = v.z;
    a_sh[o + 3u] = v.w;
}

fn put_b(o: u32, v: vec4<f16>) {
    b_sh[o] = v.x;
    b_sh[o + 1u] = v.y;
    b_sh[o + 2u] = v.z;
    b_sh[o + 3u] = v.w;
}

// The 64 tile's store of one step's chunks (slots past SLOTS do not exist: SLOTS is a
// pipeline constant, so these branches fold away).
fn store_chunks(s: Staging, v: Chunks) {
    let o = s.r * AS + vec4<u32>(4u * s.c);
    put_a(o.x, v.a0);
    put_b(o.x, v.b0);
    if (SLOTS > 1u) {
        put_a(o.y, v.a1);
        put_b(o.y, v.b1);
    }
    if (SLOTS > 2u) {
        put_a(o.z, v.a2);
        put_b(o.z, v.b2);
        put_a(o.w, v.a3);
        put_b(o.w, v.b3);
    }
}

// The product tile c_sh = x_tile · w_tileᵀ over all of K.
fn product_tile(lid: u32, sg: u32, m0: u32, n0: u32, a_base: u32, b_base: u32, geglu: bool) {
    let wm = (sg >> 1u) * 2u * FRAG;   // this subgroup's quarter of the tile
    let wn = (sg & 1u) * 2u * FRAG;
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    if (params.norm_mode != 0u) {
        row_norm_prologue(lid, NT, TM, m0, a_base);
    }
    var st = staging_begin(lid, NT / CHUNKS, m0, n0, a_base, b_base, geglu, false, 0u, params.k);
    var chunks = fetch(st);
    for (var k0 = 0u; k0 < params.k; k0 += TK) {
        store_chunks(st, chunks);
        workgroupBarrier();
        // The next step's loads go out before this step's matrix products.
        st = staging_next(st);
        chunks = fetch(st);
        for (var kb = 0u; kb < TK; kb += FRAG) {
            // A blocks are row-major (m, k); B = Wᵀ is column-major: column n is w's row n.
            let ia0 = wm * AS + kb;
            let ia1 = (wm + FRAG) * AS + kb;
            let ib0 = wn * AS + kb;
            let ib1 = (wn + FRAG) * AS + kb;
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&a_sh[ia0], AS);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&a_sh[ia1], AS);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&b_sh[ib0], AS);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&b_sh[ib1], AS);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
        // The next store overwrites what every subgroup has just read; after the last step
        // nothing does (the accumulators go to c_sh), so no barrier there.
        if (k0 + TK >= params.k) {
            break;
        }
        workgroupBarrier();
    }
    // naga 30 can panic on compound pointer indices in coopStore: bind them to lets.
    let i00 = wm * TN + wn;
    let i01 = wm * TN + wn + FRAG;
    let i10 = (wm + FRAG) * TN + wn;
    let i11 = (wm + FRAG) * TN + wn + FRAG;
    let stride = TN;
    coopStoreT(c00, &c_sh[i00], stride);
    coopStoreT(c01, &c_sh[i01], stride);
    coopStoreT(c10, &c_sh[i10], stride);
    coopStoreT(c11, &c_sh[i11], stride);
    workgroupBarrier();
}

// ------------------------------------------------------------------ epilogue (as matmul.wgsl)

fn erf1(a: f32) -> f32 {
    let x = clamp(a, -4.0, 4.0);
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

fn gelu1(v: f32) -> f32 {
    return 0.5 * v * (1.0 + erf1(v * 0.70710678118654752));
}

fn activate(v: f32) -> f32 {
    switch (params.act) {
        case 1u: { return gelu1(v); }
        case 2u: { return v / (1.0 + exp(-v)); }
        case 3u: { return v / (1.0 + exp(-1.702 * v)); }
        default: { return v; }
    }
}

@compute @workgroup_size(NT)
fn linear_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
               @builtin(subgroup_id) sg: u32) {
    let m0 = wid.y * TM;
    let n0 = wid.x * TN;
    product_tile(lid, sg, m0, n0, wid.z * params.stride_a, wid.z * params.stride_b, false);
    let c_base = wid.z * params.stride_c;
    for (var i = lid; i < TM * TN; i += NT) {
        let r = i / TN;
        let c = i - r * TN;
        let m = m0 + r;
        let n = n0 + c;
        if (m < params.m && n < params.n) {
            var v = c_sh[i];
            if (params.bias_mode != 0u) {
                v += f32(bias[n]);
            }
            v = activate(v);
            let o = c_base + m * params.n + n;
            if (params.residual_mode == 1u) {
                v += f32(residual[o]);
            } else if (params.residual_mode == 2u) {
                v += f32(out[o]);
            }
            out[o] = elem(v);
        }
    }
}

@compute @workgroup_size(NT)
fn geglu_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
              @builtin(subgroup_id) sg: u32) {
    let m0 = wid.y * TM;
    let n0 = wid.x * (TN / 2u);
    product_tile(lid, sg, m0, n0, 0u, 0u, true);
    let half = TN / 2u;
    for (var i = lid; i < TM * half; i += NT) {
        let r = i / half;
        let c = i - r * half;
        let m = m0 + r;
        let n = n0 + c;
        if (m < params.m && n < params.n) {
            var h = c_sh[r * TN + c];
            var g = c_sh[r * TN + half + c];
            if (params.bias_mode != 0u) {
                h += f32(bias[n]);
                g += f32(bias[params.n + n]);
            }
            out[m * params.n + n] = elem(h * gelu1(g));
        }
    }
}

// ------------------------------------------------------------------ large tile (8 subgroups)

const TL: u32 = 8u * FRAG;
// Each subgroup's epilogue slot: one of its fragment rows, FRAG × 2·FRAG f32, row-major.
const SLOT_W: u32 = 2u * FRAG;
const SLOT: u32 = FRAG * SLOT_W;

var<workgroup> a_shl: array<f16, TL * AS>;    // a_shl[r * AS + k] = x[m0 + r, k0 + k]
var<workgroup> b_shl: array<f16, TL * AS>;    // b_shl[r * AS + k] = w[b_row_l(r), k0 + k] (Bᵀ)
var<workgroup> c_shl: array<f32, 8u * SLOT>;  // slot s: c_shl[s * SLOT + r * SLOT_W + c]

// The w row staged as B column rr of the large tile, and whether it exists. geglu: column block
// j (2·FRAG wide, subgroup column j's) is FRAG hidden rows then the FRAG gate rows of the same
// outputs n0 + j·FRAG .. n0 + j·FRAG + FRAG, so a subgroup's two column fragments pair up.
fn b_row_l(rr: u32, n0: u32, geglu: bool) -> vec2<u32> {
    if (geglu) {
        let pair = rr / (2u * FRAG);
        let within = rr - pair * 2u * FRAG;
        let hi = within / FRAG;
        let n = n0 + pair * FRAG + within - hi * FRAG;
        return vec2<u32>(n + hi * params.n, u32(n < params.n));
    }
    let n = n0 + rr;
    return vec2<u32>(n, u32(n < params.n));
}

fn put_a_l(o: u32, v: vec4<f16>) {
    a_shl[o] = v.x;
    a_shl[o + 1u] = v.y;
    a_shl[o + 2u] = v.z;
    a_shl[o + 3u] = v.w;
}

fn put_b_l(o: u32, v: vec4<f16>) {
    b_shl[o] = v.x;
    b_shl[o + 1u] = v.y;
    b_shl[o + 2u] = v.z;
    b_shl[o + 3u] = v.w;
}

// `store_chunks` for the large tile's arrays.
fn store_chunks_l(s: Staging, v: Chunks) {
    let o = s.r * AS + vec4<u32>(4u * s.c);
    put_a_l(o.x, v.a0);
    put_b_l(o.x, v.b0);
    if (SLOTS > 1u) {
        put_a_l(o.y, v.a1);
        put_b_l(o.y, v.b1);
    }
    if (SLOTS > 2u) {
        put_a_l(o.z, v.a2);
        put_b_l(o.z, v.b2);
        put_a_l(o.w, v.a3);
        put_b_l(o.w, v.b3);
    }
}

// Epilogue pass `i`: every subgroup s has stored its fragment row i (block (s / 4, s % 4),
// rows 4·FRAG·(s / 4) + i·FRAG ..) in slot s; all threads write those 8 · SLOT results (SPLIT:
// store them raw as split z's partial sums).
fn epilogue_pass_l(lid: u32, i: u32, m0: u32, n0: u32, c_base: u32, geglu: bool, z: u32) {
    if (geglu) {
        // Slot row: FRAG hidden then FRAG gate accumulators of outputs n0 + (s % 4)·FRAG + c.
        for (var e = lid; e < 8u * FRAG * FRAG; e += NT_L) {
            let s = e / (FRAG * FRAG);
            let rc = e - s * FRAG * FRAG;
            let r = rc / FRAG;
            let c = rc - r * FRAG;
            let m = m0 + (s >> 2u) * 4u * FRAG + i * FRAG + r;
            let n = n0 + (s & 3u) * FRAG + c;
            if (m < params.m && n < params.n) {
                let o = s * SLOT + r * SLOT_W + c;
                var h = c_shl[o];
                var g = c_shl[o + FRAG];
                if (SPLIT) {
                    let p = (z * params.m + m) * 2u * params.n + n;
                    partial[p] = h;
                    partial[p + params.n] = g;
                    continue;
                }
                if (params.bias_mode != 0u) {
                    h += f32(bias[n]);
                    g += f32(bias[params.n + n]);
                }
                out[m * params.n + n] = elem(h * gelu1(g));
            }
        }
        return;
    }
    for (var e = lid; e < 8u * SLOT; e += NT_L) {
        let s = e / SLOT;
        let rc = e - s * SLOT;
        let r = rc / SLOT_W;
        let c = rc - r * SLOT_W;
        let m = m0 + (s >> 2u) * 4u * FRAG + i * FRAG + r;
        let n = n0 + (s & 3u) * SLOT_W + c;
        if (m < params.m && n < params.n) {
            var v = c_shl[e];
            if (SPLIT) {
                partial[(z * params.m + m) * params.n + n] = v;
                continue;
            }
            if (params.bias_mode != 0u) {
                v += f32(bias[n]);
            }
            v = activate(v);
            let o = c_base + m * params.n + n;
            if (params.residual_mode == 1u) {
                v += f32(residual[o]);
            } else if (params.residual_mode == 2u) {
                v += f32(out[o]);
            }
            out[o] = elem(v);
        }
    }
}

// The large tile at (m0, n0): x_tile · w_tileᵀ over all of K, then the epilogue in 4 passes.
// The accumulators are named variables, not an array: naga 30 validates arrays of cooperative
// matrices but gives them an ArrayStride (their layout is opaque in SPIR-V), and a dynamically
// indexed array of fragments would live in local memory anyway.
fn tile_l(lid: u32, sg: u32, m0: u32, n0: u32, a_base: u32, b_base: u32, c_base: u32,
          geglu: bool, z: u32) {
    // This workgroup's K range: all of K, or (SPLIT) split z's.
    var k_begin = 0u;
    var k_end = params.k;
    if (SPLIT) {
        k_begin = z * params.k_chunk;
        k_end = min(params.k, k_begin + params.k_chunk);
    }
    let wm = (sg >> 2u) * 4u * FRAG;   // this subgroup's 4·FRAG × 2·FRAG block of the tile
    let wn = (sg & 3u) * 2u * FRAG;
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var c20 = coop_mat16x16<f32, C>();
    var c21 = coop_mat16x16<f32, C>();
    var c30 = coop_mat16x16<f32, C>();
    var c31 = coop_mat16x16<f32, C>();
    if (params.norm_mode != 0u) {
        row_norm_prologue(lid, NT_L, TL, m0, a_base);
    }
    var st = staging_begin(lid, NT_L / CHUNKS, m0, n0, a_base, b_base, geglu, true, k_begin, k_end);
    var chunks = fetch(st);
    for (var k0 = k_begin; k0 < k_end; k0 += TK) {
        store_chunks_l(st, chunks);
        workgroupBarrier();
        // The next step's loads go out before this step's matrix products.
        st = staging_next(st);
        chunks = fetch(st);
        for (var kb = 0u; kb < TK; kb += FRAG) {
            // A blocks are row-major (m, k); B = Wᵀ is column-major: column n is w's row n.
            let ia0 = wm * AS + kb;
            let ia1 = (wm + FRAG) * AS + kb;
            let ia2 = (wm + 2u * FRAG) * AS + kb;
            let ia3 = (wm + 3u * FRAG) * AS + kb;
            let ib0 = wn * AS + kb;
            let ib1 = (wn + FRAG) * AS + kb;
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&a_shl[ia0], AS);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&a_shl[ia1], AS);
            let a2 = coopLoadT<coop_mat16x16<f16, A>>(&a_shl[ia2], AS);
            let a3 = coopLoadT<coop_mat16x16<f16, A>>(&a_shl[ia3], AS);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&b_shl[ib0], AS);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&b_shl[ib1], AS);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
        }
        // As in `product_tile`: the last step's reads need no barrier (c_shl is apart).
        if (k0 + TK >= k_end) {
            break;
        }
        workgroupBarrier();
    }
    // naga 30 can panic on compound pointer indices in coopStore: bind them to lets. The slot is
    // reused by every pass, so a barrier separates each pass's reads from the next pass's stores.
    let s0 = sg * SLOT;
    let s1 = sg * SLOT + FRAG;
    let stride = SLOT_W;
    coopStoreT(c00, &c_shl[s0], stride);
    coopStoreT(c01, &c_shl[s1], stride);
    workgroupBarrier();
    epilogue_pass_l(lid, 0u, m0, n0, c_base, geglu, z);
    workgroupBarrier();
    coopStoreT(c10, &c_shl[s0], stride);
    coopStoreT(c11, &c_shl[s1], stride);
    workgroupBarrier();
    epilogue_pass_l(lid, 1u, m0, n0, c_base, geglu, z);
    workgroupBarrier();
    coopStoreT(c20, &c_shl[s0], stride);
    coopStoreT(c21, &c_shl[s1], stride);
    workgroupBarrier();
    epilogue_pass_l(lid, 2u, m0, n0, c_base, geglu, z);
    workgroupBarrier();
    coopStoreT(c30, &c_shl[s0], stride);
    coopStoreT(c31, &c_shl[s1], stride);
    workgroupBarrier();
    epilogue_pass_l(lid, 3u, m0, n0, c_base, geglu, z);
}

// Grid: (ceil(N / TL), ceil(M / TL), batch), or (.., .., splits) with SPLIT (batch 1).
@compute @workgroup_size(NT_L)
fn linear_coop_l(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                 @builtin(subgroup_id) sg: u32) {
    let b = select(wid.z, 0u, SPLIT);
    tile_l(lid, sg, wid.y * TL, wid.x * TL, b * params.stride_a, b * params.stride_b,
           b * params.stride_c, false, wid.z);
}

@compute @workgroup_size(NT_L)
fn geglu_coop_l(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                @builtin(subgroup_id) sg: u32) {
    tile_l(lid, sg, wid.y * TL, wid.x * (TL / 2u), 0u, 0u, 0u, true, wid.z);
}

// ------------------------------------------------------------------ split-K reduce

// Output (m, col)'s sum over the K splits, in split order; `width` columns per partial row.
fn split_sum(m: u32, col: u32, width: u32) -> f32 {
    let splits = (params.k + params.k_chunk - 1u) / params.k_chunk;
    let plane = params.m * width;
    var v = 0.0;
    for (var z = 0u; z < splits; z++) {
        v += partial[z * plane + m * width + col];
    }
    return v;
}

// The large tile's split sums plus linear_coop_l's epilogue (bias, activation, residual),
// rounded once: one invocation per output, ceil(M · N / 256) workgroups folded by `grid_1d`.
@compute @workgroup_size(256)
fn linear_split_reduce(@builtin(global_invocation_id) gid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = gid.x + gid.y * nwg.x * 256u;
    if (o >= params.m * params.n) {
        return;
    }
    let m = o / params.n;
    let n = o - m * params.n;
    var v = split_sum(m, n, params.n);
    if (params.bias_mode != 0u) {
        v += f32(bias[n]);
    }
    v = activate(v);
    if (params.residual_mode == 1u) {
        v += f32(residual[o]);
    } else if (params.residual_mode == 2u) {
        v += f32(out[o]);
    }
    out[o] = elem(v);
}

// geglu_coop_l's split sums (hidden and gate) plus its epilogue, as linear_split_reduce.
@compute @workgroup_size(256)
fn geglu_split_reduce(@builtin(global_invocation_id) gid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = gid.x + gid.y * nwg.x * 256u;
    if (o >= params.m * params.n) {
        return;
    }
    let m = o / params.n;
    let n = o - m * params.n;
    var h = split_sum(m, n, 2u * params.n);
    var g = split_sum(m, params.n + n, 2u * params.n);
    if (params.bias_mode != 0u) {
        h += f32(bias[n]);
        g += f32(bias[params.n + n]);
    }
    out[o] = elem(h * gelu1(g));
}
