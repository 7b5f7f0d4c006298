// conv2d_coop: conv2d.wgsl's implicit GEMM on cooperative matrices (tensor cores):
// FRAG × FRAG × FRAG f16 × f16 → f32 fragments. f16 storage only; the same Params, bindings,
// input modes (UPSAMPLE, CONCAT), fused GroupNorm (+ SiLU) on the input (flags bits 3, 4;
// binding 8) and epilogue (bias, residual) as conv2d.wgsl, whose header has the formulas and the
// NHWC / OHWI layout argument. A normalised A chunk is computed in f32 and rounded to f16 once,
// as it is staged. As a GEMM: C[M, N] = A[M, K] · Bᵀ with
// M = B·Ho·Wo output pixels, N = Cout, K = KH·KW·Cin, A the im2col patches (addresses computed
// while staging, never materialised), B the weights viewed as [Cout, K].
//
// Variants, geometry and flow as matmul_coop.wgsl (src/shaders.rs `VARIANTS`: conv2d_coop16 as
// written, conv2d_coop8 with coop_mat8x8): 4 subgroups of SG invocations, a TM × TN = 4·FRAG ×
// 4·FRAG output tile (64 pixels × 64 channels at FRAG 16), K step TK = 2·FRAG; subgroup s owns the
// 2·FRAG × 2·FRAG quarter (s / 2, s % 2) as 2 × 2 accumulator fragments. Per K step all threads
// stage A (im2col) and B (weights) as f16 into workgroup memory, zero outside the image, past
// K, past M and past Cout, so the matrix ops never see out-of-range data; at the end the
// accumulators go through workgroup memory to a coalesced epilogue.
// TAIL, TAIL_CONCAT (overrides; bindings 9-11, params.k_main, params.tail_ca): the resnet's 1×1
// conv_shortcut as more K of the same GEMM, exactly as in conv2d.wgsl (see its header).
// Requires Cin % 4 == 0 (with CONCAT both parts' channels % 4 == 0): four consecutive k then lie
// in one filter tap and are contiguous in x, so staging loads whole vec4s. The host uses
// conv2d.wgsl otherwise (the RGB input conv).
// Dispatch: ceil(M / TM) · ceil(Cout / TN) workgroups folded over (x, y) by `grid_1d`, tile index
// m_tile · n_tiles + n_tile (params.n_tiles = ceil(Cout / TN) for this kernel).

enable wgpu_cooperative_matrix;

struct Params {
    batch: u32,
    h: u32,       // input height and width as the convolution sees them (after upsampling)
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
    n_tiles: u32, // ceil(cout / TN)
    flags: u32,   // bit 0: add bias, bit 1: add residual, bit 2: bias per (batch, channel),
                  // bit 3: GroupNorm the input through gn, bit 4: then SiLU, bit 5: write the
                  // output's GroupNorm partials, bit 6: the input's statistics from gn_in
                  // (gn then holds (gamma, beta) per input channel)
    xh: u32,      // x as stored: h, w, or h / 2, w / 2 with UPSAMPLE
    xw: u32,
    ca: u32,      // channels of x (CONCAT: of its first part; cin otherwise)
    k_chunk: u32, // conv2d_coop_l split along K: K per split (a multiple of TK); 0: no split
    bias_stride: u32, // flags bit 2: bias row stride (elements) between batch elements
    bias_offset: u32, // flags bit 2: element of bias[0, 0]
    k_main: u32,  // K of the convolution proper; k - k_main: the TAIL's channels Cs
    tail_ca: u32, // TAIL_CONCAT: channels of the tail's first part (sx); Cs otherwise
    // GroupNorm partials (see the shared section at the end of conv2d.wgsl).
    so_gw: u32,     // flags bit 5: output channels per group
    so_jmax: u32,   // flags bit 5: pieces per (tile, image) in gn_out
    si_gw: u32,     // flags bit 6: input channels per group
    si_jmax: u32,   // flags bit 6: the producer's so_jmax
    si_tm: u32,     // flags bit 6: the producer's output tile (rows, channels)
    si_tn: u32,
    si_groups: u32, // flags bit 6: groups of the input
    si_eps: f32,
    si_inv_gw: f32, // 1 / si_gw
    si_pw: u32,     // flags bit 6: the producer's so_gw (its piece groups' width)
    sb_pw: u32,     // flags bit 6 with CONCAT: the second part's producer (gn_in_b): so_gw,
    sb_jmax: u32,   // so_jmax
    sb_tm: u32,     // and output tile
    sb_tn: u32,
    _pad3: u32,
    _pad4: u32,
};

@group(0) @binding(0) var<storage, read> x4: array<elem4>;
@group(0) @binding(1) var<storage, read> xb4: array<elem4>;
@group(0) @binding(2) var<storage, read> w4: array<elem4>;
@group(0) @binding(3) var<storage, read> bias: array<elem>;
@group(0) @binding(4) var<storage, read> residual: array<elem>;
@group(0) @binding(5) var<storage, read_write> out: array<elem>;
@group(0) @binding(6) var<uniform> params: Params;
@group(0) @binding(8) var<storage, read> gn: array<vec2<f32>>;
@group(0) @binding(9) var<storage, read> sx4: array<elem4>;
@group(0) @binding(10) var<storage, read> sxb4: array<elem4>;
@group(0) @binding(11) var<storage, read> sw4: array<elem4>;

// The fused GroupNorm (+ SiLU) of input channel ci of batch item b (see conv2d.wgsl).
fn gn_one(b: u32, ci: u32, v: f32) -> f32 {
    var t: vec2<f32>;
    if ((params.flags & 64u) != 0u) {
        t = gn_merged_affine(b, ci);
    } else {
        t = gn[b * params.cin + ci];
    }
    let y = fma(v, t.x, t.y);
    if ((params.flags & 16u) != 0u) {
        return y / (1.0 + exp(-y));
    }
    return y;
}

// A chunk of channels ci .. ci + 4 of batch item b as staged: normalised in f32 where flags
// bit 3 says so, else as stored.
fn gn_chunk(b: u32, ci: u32, v: vec4<f16>) -> vec4<f16> {
    if ((params.flags & 8u) == 0u) {
        return v;
    }
    let f = vec4<f32>(v);
    return vec4<f16>(vec4<f32>(gn_one(b, ci, f.x), gn_one(b, ci + 1u, f.y), gn_one(b, ci + 2u, f.z),
                               gn_one(b, ci + 3u, f.w)));
}

// The bias of output pixel m, channel n (see conv2d.wgsl's bias_at): flags bit 2 reads a
// [B, Cout] block of a wider table.
fn bias_at(m: u32, n: u32) -> f32 {
    if ((params.flags & 4u) != 0u) {
        let b = m / (params.ho * params.wo);
        return f32(bias[params.bias_offset + b * params.bias_stride + n]);
    }
    return f32(bias[n]);
}
// conv2d_coop_l with SPLIT and conv2d_split_reduce: the f32 partial sums of every K split,
// partial[(split · M + m) · Cout + n]. (conv2d_coop_l declares it either way: the host binds a
// small scratch buffer when it does not split.)
@group(0) @binding(7) var<storage, read_write> partial: array<f32>;

// Fragment side: the `conv2d_coop8` variant replaces this 16 by 8 along with the matrix types.
const FRAG: u32 = 16u;
const TM: u32 = 4u * FRAG;
const TN: u32 = 4u * FRAG;
const TK: u32 = 2u * FRAG;
// Subgroup width (32 on NVIDIA, 8 on lavapipe): the workgroup is exactly 4 subgroups.
override SG: u32 = 32u;
override NT: u32 = 4u * SG;
// The input is x upsampled 2× (nearest) / the channel concatenation of x and xb (see conv2d.wgsl).
override UPSAMPLE: bool = false;
override CONCAT: bool = false;
// A 1×1 convolution of sx (and sxb) follows as K tail (see conv2d.wgsl).
override TAIL: bool = false;
override TAIL_CONCAT: bool = false;
// Row stride of the staged tiles in halves (a multiple of 8: fragment rows stay 16-byte aligned).
const AS: u32 = TK + 8u;

var<workgroup> a_sh: array<f16, TM * AS>;   // a_sh[r * AS + k] = A[m0 + r, k0 + k]
var<workgroup> b_sh: array<f16, TN * AS>;   // b_sh[r * AS + k] = w[n0 + r, k0 + k] (Bᵀ)
var<workgroup> c_sh: array<f32, TM * TN>;   // accumulators for the epilogue

// The GroupNorm producer's view of the output tile (flags bit 5; see the shared section at the
// end of conv2d.wgsl): the epilogues leave each rounded output in c_sh where its accumulator
// was. view 0: row-major TM × TN (conv2d_coop, conv2d_split_reduce); 1: conv2d_coop_l's
// slots, one pass of its epilogue (rows rb·FR_ROWS·FRAG + i·FRAG .. of the tile, for every
// subgroup row rb).
fn gn_tile_value(view: u32, rt: u32, ct: u32, m: u32, n: u32) -> f32 {
    if (view == 0u) {
        return c_sh[rt * TN + ct];
    }
    let s = (rt / (FR_ROWS * FRAG)) * SG_COLS + ct / SLOT_W;
    return c_sh[s * SLOT + (rt % FRAG) * SLOT_W + ct % SLOT_W];
}

// Channels c .. c + 4 of the TAIL input at output pixel m (Cs and tail_ca % 4 == 0).
fn tail_chunk(m: u32, c: u32) -> vec4<f16> {
    let cs = params.k - params.k_main;
    if (TAIL_CONCAT && c >= params.tail_ca) {
        return vec4<f16>(sxb4[(m * (cs - params.tail_ca) + c - params.tail_ca) >> 2u]);
    }
    return vec4<f16>(sx4[(m * params.tail_ca + c) >> 2u]);
}

// B[n, k .. k + 4] (n < Cout, k < K checked by the caller): w's row n, or in the TAIL ws's.
fn w_chunk(n: u32, k: u32) -> vec4<f16> {
    if (TAIL && k >= params.k_main) {
        return vec4<f16>(sw4[(n * (params.k - params.k_main) + k - params.k_main) >> 2u]);
    }
    return vec4<f16>(w4[(n * params.k_main + k) >> 2u]);
}

// A[m, k .. k + 4]: output pixel m's filter tap holding k (k % 4 == 0, Cin % 4 == 0), zero in
// the padding. m < M and k < K are checked by the caller.
fn a_load(m: u32, k: u32) -> vec4<f16> {
    if (TAIL && k >= params.k_main) {
        return tail_chunk(m, k - params.k_main);
    }
    let hw = params.ho * params.wo;
    let b = m / hw;
    let rem = m - b * hw;
    let oy = rem / params.wo;
    let ox = rem - oy * params.wo;
    let tap = k / params.cin;
    let ci = k - tap * params.cin;
    let ky = tap / params.kw;
    let kx = tap - ky * params.kw;
    let iy = i32(oy * params.stride) - i32(params.pad_top) + i32(ky);
    let ix = i32(ox * params.stride) - i32(params.pad_left) + i32(kx);
    // Negative coordinates wrap to huge u32 and fail the same test as the far edge.
    if (u32(iy) >= params.h || u32(ix) >= params.w) {
        return vec4<f16>(0.0);
    }
    var y = u32(iy);
    var x = u32(ix);
    if (UPSAMPLE) {
        y = y >> 1u;
        x = x >> 1u;
    }
    let pixel = (b * params.xh + y) * params.xw + x;
    if (CONCAT && ci >= params.ca) {
        let cb = params.cin - params.ca;
        return gn_chunk(b, ci, vec4<f16>(xb4[(pixel * cb + ci - params.ca) >> 2u]));
    }
    return gn_chunk(b, ci, vec4<f16>(x4[(pixel * params.ca + ci) >> 2u]));
}

fn stage_tiles(lid: u32, m0: u32, n0: u32, k0: u32) {
    let chunks = TK / 4u;
    for (var i = lid; i < TM * chunks; i += NT) {
        let r = i / chunks;
        let c = i - r * chunks;
        let m = m0 + r;
        let k = k0 + 4u * c;
        var v = vec4<f16>(0.0);
        if (m < params.m && k < params.k) {
            v = a_load(m, k);
        }
        let o = r * AS + 4u * c;
        a_sh[o] = v.x;
        a_sh[o + 1u] = v.y;
        a_sh[o + 2u] = v.z;
        a_sh[o + 3u] = v.w;
    }
    for (var i = lid; i < TN * chunks; i += NT) {
        let r = i / chunks;
        let c = i - r * chunks;
        let n = n0 + r;
        let k = k0 + 4u * c;
        var v = vec4<f16>(0.0);
        if (n < params.cout && k < params.k) {
            v = w_chunk(n, k);
        }
        let o = r * AS + 4u * c;
        b_sh[o] = v.x;
        b_sh[o + 1u] = v.y;
        b_sh[o + 2u] = v.z;
        b_sh[o + 3u] = v.w;
    }
}

@compute @workgroup_size(NT)
fn conv2d_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32) {
    let tile = wid.x + wid.y * nwg.x;
    let m_tiles = (params.m + TM - 1u) / TM;
    // Whole workgroups leave together (the grid is folded to a rectangle), so the barriers
    // below stay in uniform control flow.
    if (tile >= m_tiles * params.n_tiles) {
        return;
    }
    let m0 = (tile / params.n_tiles) * TM;
    let n0 = (tile % params.n_tiles) * TN;
    if ((params.flags & 64u) != 0u) {
        gn_merge_input(lid, NT, m0);
    }

    let wm = (sg >> 1u) * 2u * FRAG;   // this subgroup's quarter of the tile
    let wn = (sg & 1u) * 2u * FRAG;
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    for (var k0 = 0u; k0 < params.k; k0 += TK) {
        stage_tiles(lid, m0, n0, k0);
        workgroupBarrier();
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

    // Epilogue: bias and residual, rounded once to f16; consecutive threads write consecutive
    // channels of one pixel (NHWC rows of C are contiguous).
    for (var i = lid; i < TM * TN; i += NT) {
        let r = i / TN;
        let c = i - r * TN;
        let m = m0 + r;
        let n = n0 + c;
        if (m < params.m && n < params.cout) {
            var v = c_sh[i];
            if ((params.flags & 1u) != 0u) {
                v += bias_at(m, n);
            }
            let o = m * params.cout + n;
            if ((params.flags & 2u) != 0u) {
                v += f32(residual[o]);
            }
            let rounded = elem(v);
            out[o] = rounded;
            c_sh[i] = f32(rounded);
        }
    }
    if ((params.flags & 32u) != 0u) {
        workgroupBarrier();
        gn_tile_rows(lid, NT, tile, m0, n0, TM, TN, 0u, TM, 0u, true);
    }
}

// ------------------------------------------------------------------ large tile (8 subgroups)
//
// `conv2d_coop_l`: matmul_coop.wgsl's large tile for the convolution. 8 subgroups arranged
// 2 (rows) × 4 (columns), output tile TL × TL = 8·FRAG pixels × 8·FRAG channels (128 × 128 at
// FRAG 16), subgroup s owns the 4·FRAG × 2·FRAG block (s / 4, s % 4) as 4 × 2 accumulator
// fragments; the epilogue runs in 4 passes through one FRAG × 2·FRAG slot per subgroup. Twice
// the FLOP per staged byte of the 64 tile (see matmul_coop.wgsl), and two changes to staging:
// - No divisions in the K loop. With NT_L = 8·SG invocations and TK / 4 vec4 chunks per staged
//   row, an invocation always stages the same chunk column c = lid % (TK / 4) of the same 4 rows
//   lid / (TK / 4) + j·ROWS_PER_PASS (j = 0..3; the host runs this tile only where
//   TL · TK / 4 = 4 · NT_L, i.e. FRAG² = 8·SG: 16 × 16 with 32-wide subgroups, 8 × 8 with
//   8-wide). So each invocation decodes its 4 output pixels once, and walks its filter tap
//   (ky, kx, ci) forward by TK per step with additions.
// - The next K step's 8 vec4 loads are issued into registers before the current step's
//   matrix products, so global-memory latency overlaps the tensor-core work.
// - Split K (override SPLIT) for the shapes whose tile grid cannot fill the GPU (SD's 16×16 and
//   8×8 levels: 10-40 tiles of 128 against a K of 5-23 thousand): workgroup z takes K range
//   [z·k_chunk, (z + 1)·k_chunk) and stores its raw f32 sums in `partial`; conv2d_split_reduce
//   then adds the splits in order, the bias and the residual, and rounds once.
// - Narrow variant (override TLN = 4·FRAG: 128 pixels × 64 channels at FRAG 16): the same 8
//   subgroups arranged 4 × 2, each owning 2·FRAG × 2·FRAG as 2 × 2 fragments (c00 .. c11),
//   stage half the weight rows and finish in 2 epilogue passes. For Cout not a multiple of
//   8·FRAG but of 4·FRAG (SD's 320-channel level: 3 tiles of 128 hold 384 channels, 17% of
//   the matrix work on zeros; 5 tiles of 64 hold 320) and for grids that leave SMs idle
//   (192 tiles of 128 × 128 at 64² against 320 of 128 × 64). The cost: a fragment load per
//   multiply-add instead of 0.75, and the pixels' im2col rows staged once per 64 channels
//   instead of per 128. Which wins is the GPU's to say (`ldm bench`, LDM_COOP_CONV_N).
// Workgroup memory as matmul_coop's large tile: 36 KiB at FRAG 16, 10 KiB at FRAG 8 (the
// narrow variant declares the same arrays and uses half of b_shl).

const TL: u32 = 8u * FRAG;
const SLOT_W: u32 = 2u * FRAG;
const SLOT: u32 = FRAG * SLOT_W;
const CHUNKS: u32 = TK / 4u;                 // vec4 chunks per staged row
override NT_L: u32 = 8u * SG;
override ROWS_PER_PASS: u32 = NT_L / CHUNKS; // staged rows covered by one pass of all invocations
override SPLIT: bool = false;
// Channels per tile: TL, or TL / 2 for the narrow variant. The 8 subgroups form SG_ROWS ×
// SG_COLS blocks of FR_ROWS × 2 fragments: 2 × 4 blocks of 4 × 2, or 4 × 2 blocks of 2 × 2.
override TLN: u32 = TL;
override SG_COLS: u32 = TLN / SLOT_W;
override SG_ROWS: u32 = 8u / SG_COLS;
override FR_ROWS: u32 = TL / (SG_ROWS * FRAG);

var<workgroup> a_shl: array<f16, TL * AS>;    // a_shl[r * AS + k] = A[m0 + r, k0 + k]
var<workgroup> b_shl: array<f16, TL * AS>;    // b_shl[r * AS + k] = w[n0 + r, k0 + k] (Bᵀ)
// The large tile's epilogue staging reuses c_sh (8 · SLOT = TM · TN): slot s is
// c_sh[s * SLOT + r * SLOT_W + c].

// One output pixel's place in the input, decoded once: the top-left input coordinate its
// filter window starts at (may be negative: padding), the first row of its image in x, and
// whether the pixel exists (m < M).
struct Pixel {
    iy0: i32,
    ix0: i32,
    row0: u32,
    valid: bool,
    b: u32,
    m: u32,
};

fn pixel_of(m: u32) -> Pixel {
    let hw = params.ho * params.wo;
    let b = m / hw;
    let rem = m - b * hw;
    let oy = rem / params.wo;
    let ox = rem - oy * params.wo;
    return Pixel(i32(oy * params.stride) - i32(params.pad_top),
                 i32(ox * params.stride) - i32(params.pad_left), b * params.xh, m < params.m, b,
                 m);
}

// A[pixel, k .. k + 4] for the filter tap (ky, kx) and channel ci that k stands for (k < K
// checked by the caller): zero in the padding, x or xb by channel with CONCAT.
fn a_chunk(p: Pixel, ky: u32, kx: u32, ci: u32) -> vec4<f16> {
    let iy = p.iy0 + i32(ky);
    let ix = p.ix0 + i32(kx);
    // Negative coordinates wrap to huge u32 and fail the same test as the far edge.
    if (!p.valid || u32(iy) >= params.h || u32(ix) >= params.w) {
        return vec4<f16>(0.0);
    }
    var y = u32(iy);
    var x = u32(ix);
    if (UPSAMPLE) {
        y = y >> 1u;
        x = x >> 1u;
    }
    let pixel = (p.row0 + y) * params.xw + x;
    if (CONCAT && ci >= params.ca) {
        let cb = params.cin - params.ca;
        return gn_chunk(p.b, ci, vec4<f16>(xb4[(pixel * cb + ci - params.ca) >> 2u]));
    }
    return gn_chunk(p.b, ci, vec4<f16>(x4[(pixel * params.ca + ci) >> 2u]));
}

// A[pixel, k .. k + 4] as staged: the filter tap (ky, kx, ci) that k stands for, or in the
// TAIL the shortcut input at the pixel itself (k < K checked by the caller).
fn a_staged(p: Pixel, k: u32, ky: u32, kx: u32, ci: u32) -> vec4<f16> {
    if (TAIL && k >= params.k_main) {
        if (!p.valid) {
            return vec4<f16>(0.0);
        }
        return tail_chunk(p.m, k - params.k_main);
    }
    return a_chunk(p, ky, kx, ci);
}

// B[k .. k + 4] of weight row n (row index n·K_main/4 + k/4 precomputed as `at`), zero past
// Cout and past the end of this workgroup's K range; in the TAIL, ws's row n.
fn b_chunk(n: u32, at: u32, k: u32, k_end: u32) -> vec4<f16> {
    if (n >= params.cout || k >= k_end) {
        return vec4<f16>(0.0);
    }
    if (TAIL && k >= params.k_main) {
        return w_chunk(n, k);
    }
    return vec4<f16>(w4[at]);
}

fn store_a(r: u32, c: u32, v: vec4<f16>) {
    let o = r * AS + 4u * c;
    a_shl[o] = v.x;
    a_shl[o + 1u] = v.y;
    a_shl[o + 2u] = v.z;
    a_shl[o + 3u] = v.w;
}

fn store_b(r: u32, c: u32, v: vec4<f16>) {
    let o = r * AS + 4u * c;
    b_shl[o] = v.x;
    b_shl[o + 1u] = v.y;
    b_shl[o + 2u] = v.z;
    b_shl[o + 3u] = v.w;
}

// Epilogue pass `i`: every subgroup s has stored its fragment row i (block (s / SG_COLS,
// s % SG_COLS), rows FR_ROWS·FRAG·(s / SG_COLS) + i·FRAG ..) in slot s; all invocations finish
// those 8 · SLOT outputs (SPLIT: store them raw as split z's partial sums).
fn epilogue_pass_l(lid: u32, i: u32, m0: u32, n0: u32, z: u32) {
    for (var e = lid; e < 8u * SLOT; e += NT_L) {
        let s = e / SLOT;
        let rc = e - s * SLOT;
        let r = rc / SLOT_W;
        let c = rc - r * SLOT_W;
        let m = m0 + (s / SG_COLS) * FR_ROWS * FRAG + i * FRAG + r;
        let n = n0 + (s % SG_COLS) * SLOT_W + c;
        if (m < params.m && n < params.cout) {
            var v = c_sh[e];
            let o = m * params.cout + n;
            if (SPLIT) {
                partial[z * params.m * params.cout + o] = v;
                continue;
            }
            if ((params.flags & 1u) != 0u) {
                v += bias_at(m, n);
            }
            if ((params.flags & 2u) != 0u) {
                v += f32(residual[o]);
            }
            let rounded = elem(v);
            out[o] = rounded;
            c_sh[e] = f32(rounded);
        }
    }
}

// After epilogue pass i (and a barrier): its rows' GroupNorm pieces (flags bit 5, no SPLIT).
fn gn_pass_l(lid: u32, i: u32, tile: u32, m0: u32, n0: u32) {
    if (!SPLIT && (params.flags & 32u) != 0u) {
        for (var rb = 0u; rb < SG_ROWS; rb++) {
            let ra = rb * FR_ROWS * FRAG + i * FRAG;
            gn_tile_rows(lid, NT_L, tile, m0, n0, TL, TLN, ra, ra + FRAG, 1u, i == 0u && rb == 0u);
        }
    }
}

// Dispatch: ceil(M / TL) · ceil(Cout / TLN) workgroups folded over (x, y) by `grid_1d`, tile
// index m_tile · n_tiles + n_tile (params.n_tiles = ceil(Cout / TLN)); z: the K splits (1
// without SPLIT).
@compute @workgroup_size(NT_L)
fn conv2d_coop_l(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32) {
    let tile = wid.x + wid.y * nwg.x;
    let m_tiles = (params.m + TL - 1u) / TL;
    // Whole workgroups leave together, so the barriers below stay in uniform control flow.
    if (tile >= m_tiles * params.n_tiles) {
        return;
    }
    let m0 = (tile / params.n_tiles) * TL;
    let n0 = (tile % params.n_tiles) * TLN;
    if ((params.flags & 64u) != 0u) {
        gn_merge_input(lid, NT_L, m0);
    }

    // This invocation's staging slots: chunk column c of rows r0 + j·ROWS_PER_PASS.
    let c = lid % CHUNKS;
    let r0 = lid / CHUNKS;
    let r1 = r0 + ROWS_PER_PASS;
    let r2 = r0 + 2u * ROWS_PER_PASS;
    let r3 = r0 + 3u * ROWS_PER_PASS;
    let p0 = pixel_of(m0 + r0);
    let p1 = pixel_of(m0 + r1);
    let p2 = pixel_of(m0 + r2);
    let p3 = pixel_of(m0 + r3);
    // This workgroup's K range (all of K without SPLIT; k_chunk is a multiple of TK).
    var k_begin = 0u;
    var k_end = params.k;
    if (SPLIT) {
        k_begin = wid.z * params.k_chunk;
        k_end = min(params.k, k_begin + params.k_chunk);
    }
    // Weight rows as vec4 indices at k = k_begin + 4c; each step adds TK / 4.
    let kq = params.k_main >> 2u;
    let c0 = (k_begin >> 2u) + c;
    var wq0 = (n0 + r0) * kq + c0;
    var wq1 = (n0 + r1) * kq + c0;
    var wq2 = (n0 + r2) * kq + c0;
    var wq3 = (n0 + r3) * kq + c0;
    // The filter tap of k = k_begin + 4c, decoded once (the only divisions outside the pixel
    // decode).
    var k = k_begin + 4u * c;
    let tap = k / params.cin;
    var ci = k - tap * params.cin;
    var ky = tap / params.kw;
    var kx = tap - ky * params.kw;

    // The first step's chunks, then per step: store, barrier, fetch the next step's chunks,
    // multiply the stored ones, barrier.
    var a0 = vec4<f16>(0.0);
    var a1 = vec4<f16>(0.0);
    var a2 = vec4<f16>(0.0);
    var a3 = vec4<f16>(0.0);
    if (k < k_end) {
        a0 = a_staged(p0, k, ky, kx, ci);
        a1 = a_staged(p1, k, ky, kx, ci);
        a2 = a_staged(p2, k, ky, kx, ci);
        a3 = a_staged(p3, k, ky, kx, ci);
    }
    // Weight rows r2, r3 lie past the narrow tile's TLN rows: never loaded or stored there.
    let wide = TLN == TL;
    var b0 = b_chunk(n0 + r0, wq0, k, k_end);
    var b1 = b_chunk(n0 + r1, wq1, k, k_end);
    var b2 = vec4<f16>(0.0);
    var b3 = vec4<f16>(0.0);
    if (wide) {
        b2 = b_chunk(n0 + r2, wq2, k, k_end);
        b3 = b_chunk(n0 + r3, wq3, k, k_end);
    }

    // This subgroup's FR_ROWS·FRAG × 2·FRAG block of the tile.
    let wm = (sg / SG_COLS) * FR_ROWS * FRAG;
    let wn = (sg % SG_COLS) * 2u * FRAG;
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var c20 = coop_mat16x16<f32, C>();
    var c21 = coop_mat16x16<f32, C>();
    var c30 = coop_mat16x16<f32, C>();
    var c31 = coop_mat16x16<f32, C>();
    for (var k0 = k_begin; k0 < k_end; k0 += TK) {
        store_a(r0, c, a0);
        store_a(r1, c, a1);
        store_a(r2, c, a2);
        store_a(r3, c, a3);
        store_b(r0, c, b0);
        store_b(r1, c, b1);
        if (wide) {
            store_b(r2, c, b2);
            store_b(r3, c, b3);
        }
        workgroupBarrier();

        // Advance this invocation's k by TK: the channel, then the tap (a step of TK may cross
        // several taps when Cin < TK, e.g. the 4-channel conv_in).
        k += TK;
        ci += TK;
        while (ci >= params.cin) {
            ci -= params.cin;
            kx += 1u;
            if (kx == params.kw) {
                kx = 0u;
                ky += 1u;
            }
        }
        wq0 += CHUNKS;
        wq1 += CHUNKS;
        wq2 += CHUNKS;
        wq3 += CHUNKS;
        a0 = vec4<f16>(0.0);
        a1 = vec4<f16>(0.0);
        a2 = vec4<f16>(0.0);
        a3 = vec4<f16>(0.0);
        if (k < k_end) {
            a0 = a_staged(p0, k, ky, kx, ci);
            a1 = a_staged(p1, k, ky, kx, ci);
            a2 = a_staged(p2, k, ky, kx, ci);
            a3 = a_staged(p3, k, ky, kx, ci);
        }
        b0 = b_chunk(n0 + r0, wq0, k, k_end);
        b1 = b_chunk(n0 + r1, wq1, k, k_end);
        if (wide) {
            b2 = b_chunk(n0 + r2, wq2, k, k_end);
            b3 = b_chunk(n0 + r3, wq3, k, k_end);
        }

        for (var kb = 0u; kb < TK; kb += FRAG) {
            // A blocks are row-major (m, k); B = Wᵀ is column-major: column n is w's row n.
            let ia0 = wm * AS + kb;
            let ia1 = (wm + FRAG) * AS + kb;
            let ib0 = wn * AS + kb;
            let ib1 = (wn + FRAG) * AS + kb;
            let fa0 = coopLoadT<coop_mat16x16<f16, A>>(&a_shl[ia0], AS);
            let fa1 = coopLoadT<coop_mat16x16<f16, A>>(&a_shl[ia1], AS);
            let fb0 = coopLoad<coop_mat16x16<f16, B>>(&b_shl[ib0], AS);
            let fb1 = coopLoad<coop_mat16x16<f16, B>>(&b_shl[ib1], AS);
            c00 = coopMultiplyAdd(fa0, fb0, c00);
            c01 = coopMultiplyAdd(fa0, fb1, c01);
            c10 = coopMultiplyAdd(fa1, fb0, c10);
            c11 = coopMultiplyAdd(fa1, fb1, c11);
            // (FR_ROWS is an override: the branch is uniform, and gone after specialisation.)
            if (FR_ROWS == 4u) {
                let ia2 = (wm + 2u * FRAG) * AS + kb;
                let ia3 = (wm + 3u * FRAG) * AS + kb;
                let fa2 = coopLoadT<coop_mat16x16<f16, A>>(&a_shl[ia2], AS);
                let fa3 = coopLoadT<coop_mat16x16<f16, A>>(&a_shl[ia3], AS);
                c20 = coopMultiplyAdd(fa2, fb0, c20);
                c21 = coopMultiplyAdd(fa2, fb1, c21);
                c30 = coopMultiplyAdd(fa3, fb0, c30);
                c31 = coopMultiplyAdd(fa3, fb1, c31);
            }
        }
        workgroupBarrier();
    }
    // naga 30 can panic on compound pointer indices in coopStore: bind them to lets. The slot is
    // reused by every pass, so a barrier separates each pass's reads from the next pass's stores.
    let s0 = sg * SLOT;
    let s1 = sg * SLOT + FRAG;
    let stride = SLOT_W;
    coopStoreT(c00, &c_sh[s0], stride);
    coopStoreT(c01, &c_sh[s1], stride);
    workgroupBarrier();
    epilogue_pass_l(lid, 0u, m0, n0, wid.z);
    workgroupBarrier();
    gn_pass_l(lid, 0u, tile, m0, n0);
    coopStoreT(c10, &c_sh[s0], stride);
    coopStoreT(c11, &c_sh[s1], stride);
    workgroupBarrier();
    epilogue_pass_l(lid, 1u, m0, n0, wid.z);
    if (FR_ROWS == 4u) {
        workgroupBarrier();
        gn_pass_l(lid, 1u, tile, m0, n0);
        coopStoreT(c20, &c_sh[s0], stride);
        coopStoreT(c21, &c_sh[s1], stride);
        workgroupBarrier();
        epilogue_pass_l(lid, 2u, m0, n0, wid.z);
        workgroupBarrier();
        gn_pass_l(lid, 2u, tile, m0, n0);
        coopStoreT(c30, &c_sh[s0], stride);
        coopStoreT(c31, &c_sh[s1], stride);
        workgroupBarrier();
        epilogue_pass_l(lid, 3u, m0, n0, wid.z);
    }
    // (Split: the reduce writes the output, and its partials.)
    if (!SPLIT && (params.flags & 32u) != 0u) {
        workgroupBarrier();
        gn_pass_l(lid, FR_ROWS - 1u, tile, m0, n0);
    }
}

// The K splits of conv2d_coop_l summed in split order, plus bias and residual, rounded once,
// over TM × TN output tiles (so that flags bit 5 can take the tile's GroupNorm partials from
// c_sh, as conv2d_coop does): 256 invocations, element i = lid + 256·j of the tile row-major,
// ceil(M / TM) · ceil(Cout / TN) workgroups folded by `grid_1d`, tile = m_tile · ceil(Cout /
// TN) + n_tile. The number of splits is ceil(K / k_chunk).
@compute @workgroup_size(256)
fn conv2d_split_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    let n_tiles = (params.cout + TN - 1u) / TN;
    let m_tiles = (params.m + TM - 1u) / TM;
    if (tile >= m_tiles * n_tiles) {
        return;
    }
    let m0 = (tile / n_tiles) * TM;
    let n0 = (tile % n_tiles) * TN;
    let total = params.m * params.cout;
    let splits = (params.k + params.k_chunk - 1u) / params.k_chunk;
    for (var i = lid; i < TM * TN; i += 256u) {
        let r = i / TN;
        let m = m0 + r;
        let n = n0 + i - r * TN;
        if (m < params.m && n < params.cout) {
            let o = m * params.cout + n;
            var v = 0.0;
            for (var z = 0u; z < splits; z++) {
                v += partial[z * total + o];
            }
            if ((params.flags & 1u) != 0u) {
                v += bias_at(m, n);
            }
            if ((params.flags & 2u) != 0u) {
                v += f32(residual[o]);
            }
            let rounded = elem(v);
            out[o] = rounded;
            c_sh[i] = f32(rounded);
        }
    }
    if ((params.flags & 32u) != 0u) {
        workgroupBarrier();
        gn_tile_rows(lid, 256u, tile, m0, n0, TM, TN, 0u, TM, 0u, true);
    }
}
