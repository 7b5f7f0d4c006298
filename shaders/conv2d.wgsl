// conv2d: 2-D convolution as an implicit GEMM, bias and residual fused into the store.
//
//   out[b, oy, ox, co] = sum_{ky, kx, ci} x[b, oy*s - top + ky, ox*s - left + kx, ci] * w[co, ky, kx, ci]
//                        + bias[co] + residual[b, oy, ox, co]          (x is zero outside the image)
//        (flags bit 2: bias[off + b·stride + co] instead, a [B, Cout] block of a wider table)
//        (flags bit 3: x[.., ci] is read as fma(x, scale[b, ci], shift[b, ci]) from the GroupNorm
//         table gn [B, Cin, 2] (norm.wgsl's gn_stats), bit 4: then SiLU; padding taps stay 0)
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
// Bindings: 0 x4 (elem4, [B, XH, XW, Ca], read as vec4 even when a channel count is not a multiple
//           of 4: the scalar path picks a component), 1 xb4 (elem4, [B, XH, XW, Cin - Ca], read
//           only with CONCAT), 2 w4 (elem4, [Cout, KH, KW, Cin]), 3 bias (elem, [Cout]),
//           4 residual (elem, [B, Ho, Wo, Cout]), 5 out (elem, [B, Ho, Wo, Cout], read_write),
//           6 params, 8 gn (vec2<f32> [B, Cin]: GroupNorm scale, shift; with flags bit 6
//           [Cin]: gamma, beta), 9-11 the TAIL's sx4, sxb4, sw4, 12 gn_out, 13 gn_in and 14
//           gn_in_b (the GroupNorm partials, vec4<f32>; see the section at the end). xb4 / bias /
//           residual / gn / 9-14 are read only when CONCAT / TAIL / flags say so; the host binds x there as
//           a placeholder (read-only twice is allowed; read-only and read-write is not), and out
//           at 12.
//
// Fused GroupNorm (flags bit 3; + SiLU with bit 4): the conv's input is silu(GroupNorm(x)), the
//           diffusers ResnetBlock2D's `conv1(silu(norm1(x)))`. The statistics pass writes a
//           per-(batch, channel) affine table, and every A element is normalised as it is loaded
//           (after the concat / upsample index maps pick it, so both sources and upsampled pixels
//           are covered), in f32 before the f16 staging of the tensor-core kernel. The padding
//           is applied after normalisation, as torch pads silu(norm(x)): a padding tap is 0,
//           never `shift`. This saves the separate normalise pass, a full write and read of the
//           activation, per GroupNorm.
//
// Three entry points, one per output tile; the host picks one by shape (src/kernels/conv2d.rs):
//
// conv2d_64: 64 pixels × 64 channels, 256 threads, each a 4 × 4 register tile: pixels ty·4 + i
//           (i < 4) × channels tx + 16·j (j < 4), (tx, ty) = (lid % 16, lid / 16). Per 4 k: 4 + 4
//           vec4 workgroup-memory reads for 64 FMA (8 FMA per read). K step BK (override, 32; 16
//           on adapters with less than 18 KiB of workgroup memory).
// conv2d_128: 128 pixels × 128 channels, 256 threads, each 8 × 8: pixels ty + 16·i × channels
//           tx + 16·j (i, j < 8). Per 4 k: 8 + 8 reads for 256 FMA (16 FMA per read), and every
//           A and B element staged in workgroup memory feeds 128 outputs instead of 64, so global
//           / L2 traffic and loader instructions per FLOP halve. Costs: 64 accumulators per thread
//           (fewer resident workgroups) and 4× fewer workgroups, so the host uses it only when
//           there are enough tiles to fill a large GPU. K step 16: 1,024 FMA per thread between
//           barriers already, and BK = 32 would need 36 KiB (over lavapipe's and Apple's 32 KiB).
// conv2d_small: 64 pixels × NC = 4·NQ channels (NQ override, 1..4), 64 threads, one pixel × NC
//           channels each. For Cout ≤ 16: the conv_out layers (U-Net 320 → 4, VAE 128 → 3) would
//           waste 94-95% of a 64-wide N tile. Roofline: VAE conv_out at 512² does 1.8 GFLOP on
//           134 MB of f32 input (13.5 FLOP/byte, below an H100's ~20: memory-bound if no FMA is
//           wasted); through the 64 tile it executes 21× its FLOPs and becomes compute-bound many
//           times over. Here it executes 4/3× (Cout = 3 padded to 4). Operand reuse is bounded by
//           Cout (each A element meets only NC weights), so no tile reaches the GEMM tiles' FMA per
//           read; what matters is not computing padding. The U-Net's conv_out (M = 8192, K = 2,880)
//           has too few outputs to fill a GPU and is latency-bound: here each thread's chain is
//           4 outputs × 2,880 k instead of 16 × 2,880, and 64-pixel tiles keep 128 workgroups
//           (about one per SM of a large GPU) where 128-pixel tiles would leave half the SMs idle.
//           Weights go through workgroup memory as [NC rows][k]: every thread reads the same
//           w[n, k] at once, a broadcast. A also goes through workgroup memory: with one pixel per
//           lane, direct global loads would touch 32 different lines per warp (pixels are Cin
//           elements apart); the staged loads read 64 contiguous bytes per pixel. K step 16.
//
// Dispatch (all): one workgroup per output tile; ceil(M/BM)·ceil(N/BN) workgroups folded over
//           (x, y) by `grid_1d`, linear index tile = m_tile · n_tiles + n_tile (consecutive
//           workgroups share the same pixels, so the im2col reads of x, each pixel read KH·KW times,
//           hit L2).
// Per workgroup: K is walked in steps of BK. Each step, every thread loads its share of the A
//           and B tiles (4 consecutive k of one pixel / one weight row per vec4, 4 lanes per row so
//           a warp reads contiguous runs) from global memory into registers (prefetched during the
//           previous step's arithmetic), stores them into workgroup memory, and then accumulates its
//           register tile. Out-of-range pixels, channels, k and padding taps are loaded as zeros,
//           so the arithmetic has no bounds checks; only the final stores test bounds. The
//           arithmetic over one K step is unrolled by hand (naga emits every loop as
//           `loop { if !cond { break } }`, which drivers unroll poorly).
// Workgroup tiles are [row][k] in vec4 of 4 consecutive k, with each row padded by one vec4: 8
//           lanes reading 8 different rows at the same k then hit 8 different bank groups (rows
//           are 5 or 9 vec4 apart), and the loaders' vec4 stores along k are conflict-free at
//           BK = 32 (at most 2-way at 16). Bytes of workgroup memory:
//             conv2d_64:    2 · 64 · (BK/4 + 1) · 16  = 18,432 at BK = 32, 10,240 at BK = 16
//             conv2d_128:   2 · 128 · (16/4 + 1) · 16 = 20,480
//             conv2d_small: 64 · 5 · 16 + 16 · 4 · 16   = 6,144 (the w tile sized for NC = 16)
//           each plus 4,096 for the GroupNorm partials' gn_sh (the section at the end).
// VEC4_K (override): Cin % 4 == 0 (and, with CONCAT, Ca % 4 == 0), so 4 consecutive k share one
//           tap and one source, and are contiguous in x and w. Otherwise (RGB input conv, Cin = 3;
//           generic) every component is addressed on its own.
// UPSAMPLE (override): the convolution's input is the nearest-neighbour 2× upsampling of x
//           (diffusers Upsample2D: interpolate(scale_factor=2, mode="nearest") then a 3×3 conv).
//           params.h / params.w are the upsampled (logical) size, params.xh / params.xw the size of
//           x as stored, and logical (iy, ix) reads x at (iy >> 1, ix >> 1): the 4×-sized tensor
//           is never written. The A loads are the only thing that changes; the cost is a shift.
// CONCAT (override): the input is the channel concatenation [x | xb] (the U-Net decoder's
//           torch.cat([h, skip], dim=1)): channels ci < params.ca are read from x, the others from
//           xb at ci - ca, so the concatenated tensor is never written.
// TAIL (override): a 1×1 convolution of a second input s [B, Ho, Wo, Cs] (the resnet's
//           conv_shortcut) is added to the output as more K of the same GEMM:
//             A = [im2col(x) | s],  B = [w | ws],  K = KH·KW·Cin + Cs = params.k,
//           with k < params.k_main (= KH·KW·Cin) the convolution above and k >= k_main channel
//           k - k_main of s at the output pixel itself (no padding, no norm). s is sx
//           (binding 9; with TAIL_CONCAT its first params.tail_ca channels, the rest in sxb,
//           binding 10), its weight ws [Cout, Cs] (binding 11). The shortcut's output, a full
//           [B, Ho, Wo, Cout] write and read, and its dispatch are saved; the caller adds the
//           shortcut's bias to `bias`. Without TAIL, k_main = k.

struct Params {
    batch: u32,
    h: u32,       // input height and width as the convolution sees them (after upsampling)
    w: u32,
    cin: u32,     // input channels as the convolution sees them (CONCAT: Ca + Cb)
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
    n_tiles: u32, // ceil(cout / BN) for the entry point's BN
    flags: u32,   // bit 0: add bias, bit 1: add residual, bit 2: bias per (batch, channel),
                  // bit 3: GroupNorm the input through gn, bit 4: then SiLU, bit 5: write the
                  // output's GroupNorm partials, bit 6: the input's statistics from gn_in
                  // (gn then holds (gamma, beta) per input channel)
    xh: u32,      // x as stored: h, w, or h / 2, w / 2 with UPSAMPLE
    xw: u32,
    ca: u32,      // channels of x (CONCAT: of its first part; cin otherwise)
    _pad: u32,
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

// Cin % 4 == 0: load A and B as whole vec4 (see header).
override VEC4_K: bool = true;
// The input is x upsampled 2× (nearest), read through the index map (see header).
override UPSAMPLE: bool = false;
// The input is the channel concatenation of x (params.ca channels) and xb (see header).
override CONCAT: bool = false;
// A 1×1 convolution of sx (and sxb) follows as K tail (see header).
override TAIL: bool = false;
override TAIL_CONCAT: bool = false;
// K step of conv2d_64: 16 or 32 (each thread keeps BK/16 vec4 per operand in registers).
override BK: u32 = 32u;
// conv2d_small's channel quads per thread: its tile is 64 pixels × 4·NQ channels (host: NQ =
// ceil(Cout / 4), at most 4; wider Cout takes several N tiles).
override NQ: u32 = 1u;
// Every named override must be declared above the first override-sized array: naga 30's
// whole-module override processing (process_overrides without an entry point, as the naga test
// runs it) panics on a named override declared after the anonymous one an array size creates.

// ------------------------------------------------------------------ loads (shared)

// One output pixel as the A loader sees it: where its batch image starts in x (in stored
// pixels), and the logical input coordinates of its top-left filter tap (may be negative: padding).
struct Pixel {
    img: u32,
    iy0: i32,
    ix0: i32,
    valid: bool,
    b: u32,
    m: u32,
};

fn pixel(m: u32) -> Pixel {
    var p: Pixel;
    let hw = params.ho * params.wo;
    let b = m / hw;
    let rem = m - b * hw;
    let oy = rem / params.wo;
    let ox = rem - oy * params.wo;
    p.img = b * params.xh * params.xw;
    p.iy0 = i32(oy * params.stride) - i32(params.pad_top);
    p.ix0 = i32(ox * params.stride) - i32(params.pad_left);
    p.valid = m < params.m;
    p.b = b;
    p.m = m;
    return p;
}

// The fused GroupNorm (+ SiLU) of input channel ci of batch item b (flags bits 3, 4).
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

// Channels ci .. ci + 4 of batch item b normalised where flags bit 3 says so.
fn gn_vec4(b: u32, ci: u32, v: vec4<f32>) -> vec4<f32> {
    if ((params.flags & 8u) == 0u) {
        return v;
    }
    return vec4<f32>(gn_one(b, ci, v.x), gn_one(b, ci + 1u, v.y), gn_one(b, ci + 2u, v.z),
                     gn_one(b, ci + 3u, v.w));
}

// Stored pixel index (b·xh·xw + y·xw + x) of logical input pixel (iy, ix), which must be inside
// the image: with UPSAMPLE, logical pixel (iy, ix) is stored pixel (iy / 2, ix / 2).
fn x_pixel(p: Pixel, iy: u32, ix: u32) -> u32 {
    var y = iy;
    var x = ix;
    if (UPSAMPLE) {
        y = iy >> 1u;
        x = ix >> 1u;
    }
    return p.img + y * params.xw + x;
}

// Input channel ci of stored pixel pix: channels [0, ca) live in x, with CONCAT the rest in xb.
fn x_scalar(pix: u32, ci: u32) -> f32 {
    if (CONCAT && ci >= params.ca) {
        let i = pix * (params.cin - params.ca) + ci - params.ca;
        return f32(xb4[i >> 2u][i & 3u]);
    }
    let i = pix * params.ca + ci;
    return f32(x4[i >> 2u][i & 3u]);
}

// Channels ci .. ci+4 of stored pixel pix (vec4 path: ci % 4 == 0 and, with CONCAT, ca % 4 == 0,
// so the 4 channels lie in one source and one aligned vec4).
fn x_vec4(pix: u32, ci: u32) -> vec4<f32> {
    if (CONCAT && ci >= params.ca) {
        let i = pix * (params.cin - params.ca) + ci - params.ca;
        return vec4<f32>(xb4[i >> 2u]);
    }
    let i = pix * params.ca + ci;
    return vec4<f32>(x4[i >> 2u]);
}

// Channel c of the TAIL input at output pixel m (scalar path).
fn tail_scalar(m: u32, c: u32) -> f32 {
    let cs = params.k - params.k_main;
    if (TAIL_CONCAT && c >= params.tail_ca) {
        let i = m * (cs - params.tail_ca) + c - params.tail_ca;
        return f32(sxb4[i >> 2u][i & 3u]);
    }
    let i = m * params.tail_ca + c;
    return f32(sx4[i >> 2u][i & 3u]);
}

// Channels c .. c + 4 of the TAIL input at output pixel m (vec4 path: Cs and tail_ca % 4 == 0).
fn tail_vec4(m: u32, c: u32) -> vec4<f32> {
    let cs = params.k - params.k_main;
    if (TAIL_CONCAT && c >= params.tail_ca) {
        return vec4<f32>(sxb4[(m * (cs - params.tail_ca) + c - params.tail_ca) >> 2u]);
    }
    return vec4<f32>(sx4[(m * params.tail_ca + c) >> 2u]);
}

// One element of x by im2col coordinate k (scalar path), 0 outside the image or past K.
fn x_at(p: Pixel, k: u32) -> f32 {
    if (!p.valid || k >= params.k) {
        return 0.0;
    }
    if (TAIL && k >= params.k_main) {
        return tail_scalar(p.m, k - params.k_main);
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
    let v = x_scalar(x_pixel(p, u32(iy), u32(ix)), ci);
    if ((params.flags & 8u) != 0u) {
        return gn_one(p.b, ci, v);
    }
    return v;
}

// A[m, k .. k+4] for the vec4 path: k % 4 == 0, (ci, kx, ky) is k's decomposition.
fn a_vec4(p: Pixel, k: u32, ci: u32, kx: u32, ky: u32) -> vec4<f32> {
    if (TAIL && k >= params.k_main) {
        if (!p.valid || k >= params.k) {
            return vec4<f32>(0.0);
        }
        return tail_vec4(p.m, k - params.k_main);
    }
    let iy = p.iy0 + i32(ky);
    let ix = p.ix0 + i32(kx);
    if (!p.valid || k >= params.k || u32(iy) >= params.h || u32(ix) >= params.w) {
        return vec4<f32>(0.0);
    }
    return gn_vec4(p.b, ci, x_vec4(x_pixel(p, u32(iy), u32(ix)), ci));
}

fn a_scalar(p: Pixel, k: u32) -> vec4<f32> {
    return vec4<f32>(x_at(p, k), x_at(p, k + 1u), x_at(p, k + 2u), x_at(p, k + 3u));
}

fn w_at(n: u32, k: u32) -> f32 {
    if (k >= params.k) {
        return 0.0;
    }
    if (TAIL && k >= params.k_main) {
        let i = n * (params.k - params.k_main) + k - params.k_main;
        return f32(sw4[i >> 2u][i & 3u]);
    }
    let i = n * params.k_main + k;
    return f32(w4[i >> 2u][i & 3u]);
}

// B[n, k .. k+4] (a row of w viewed as [Cout, K]), zeros past Cout or K.
fn b_load(n: u32, k: u32) -> vec4<f32> {
    if (n >= params.cout || k >= params.k) {
        return vec4<f32>(0.0);
    }
    if (VEC4_K) {
        if (TAIL && k >= params.k_main) {
            return vec4<f32>(sw4[(n * (params.k - params.k_main) + k - params.k_main) >> 2u]);
        }
        return vec4<f32>(w4[(n * params.k_main + k) >> 2u]);
    }
    return vec4<f32>(w_at(n, k), w_at(n, k + 1u), w_at(n, k + 2u), w_at(n, k + 3u));
}

fn fma4(acc: f32, a: vec4<f32>, b: vec4<f32>) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, acc))));
}

// 4 dot products: acc[j] + a · b_j (4 consecutive k of one pixel against 4 weight rows).
fn dot4x4(acc: vec4<f32>, a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(fma4(acc.x, a, b0), fma4(acc.y, a, b1), fma4(acc.z, a, b2), fma4(acc.w, a, b3));
}

// Where the loaders are along K: k, and for the vec4 path its decomposition into (ci, kx, ky).
struct KPos {
    k: u32,
    ci: u32,
    kx: u32,
    ky: u32,
};

fn k_pos(k: u32) -> KPos {
    var s: KPos;
    s.k = k;
    let tap = k / params.cin;
    s.ci = k - tap * params.cin;
    s.ky = tap / params.kw;
    s.kx = tap - s.ky * params.kw;
    return s;
}

// k + step, the decomposition advanced without a division (several taps when Cin < step).
fn k_advance(s: KPos, step: u32) -> KPos {
    var r = s;
    r.k += step;
    if (VEC4_K) {
        r.ci += step;
        while (r.ci >= params.cin) {
            r.ci -= params.cin;
            r.kx += 1u;
            if (r.kx == params.kw) {
                r.kx = 0u;
                r.ky += 1u;
            }
        }
    }
    return r;
}

// A[m, k .. k+4] of pixel p.
fn a_load(p: Pixel, s: KPos) -> vec4<f32> {
    if (VEC4_K) {
        return a_vec4(p, s.k, s.ci, s.kx, s.ky);
    }
    return a_scalar(p, s.k);
}

// ------------------------------------------------------------------ stores (shared)

// The bias of output pixel m, channel n: bias[n], or with flags bit 2 a [B, Cout] block of a
// wider table (the U-Net's conv1 + time embedding bias): bias[off + (m / (Ho·Wo))·stride + n].
fn bias_at(m: u32, n: u32) -> f32 {
    if ((params.flags & 4u) != 0u) {
        let b = m / (params.ho * params.wo);
        return f32(bias[params.bias_offset + b * params.bias_stride + n]);
    }
    return f32(bias[n]);
}

// Add bias / residual to one output, round to the storage type, write it (inside C only).
fn store_one(m: u32, n: u32, v: f32) {
    if (n >= params.cout) {
        return;
    }
    let o = m * params.cout + n;
    var r = v;
    if ((params.flags & 1u) != 0u) {
        r += bias_at(m, n);
    }
    if ((params.flags & 2u) != 0u) {
        r += f32(residual[o]);
    }
    out[o] = elem(r);
}

// Outputs of pixel m at channels n, n + dn, n + 2·dn, n + 3·dn.
fn store4(m: u32, n: u32, dn: u32, v: vec4<f32>) {
    if (m >= params.m) {
        return;
    }
    store_one(m, n, v.x);
    store_one(m, n + dn, v.y);
    store_one(m, n + 2u * dn, v.z);
    store_one(m, n + 3u * dn, v.w);
}

// ------------------------------------------------------------------ conv2d_64

const WG: u32 = 256u; // threads of conv2d_64 and conv2d_128

var<workgroup> a_tile: array<vec4<f32>, 64u * (BK / 4u + 1u)>;
var<workgroup> b_tile: array<vec4<f32>, 64u * (BK / 4u + 1u)>;

// 4 k (vec4 kk of the step) into the 4 × 4 register tile. ar / br: the thread's first A / B row
// offsets; rs: the padded row stride.
fn mac64(acc: ptr<function, array<vec4<f32>, 4>>, ar: u32, br: u32, rs: u32, kk: u32) {
    let a0 = a_tile[ar + kk];
    let a1 = a_tile[ar + rs + kk];
    let a2 = a_tile[ar + 2u * rs + kk];
    let a3 = a_tile[ar + 3u * rs + kk];
    let b0 = b_tile[br + kk];
    let b1 = b_tile[br + 16u * rs + kk];
    let b2 = b_tile[br + 32u * rs + kk];
    let b3 = b_tile[br + 48u * rs + kk];
    (*acc)[0] = dot4x4((*acc)[0], a0, b0, b1, b2, b3);
    (*acc)[1] = dot4x4((*acc)[1], a1, b0, b1, b2, b3);
    (*acc)[2] = dot4x4((*acc)[2], a2, b0, b1, b2, b3);
    (*acc)[3] = dot4x4((*acc)[3], a3, b0, b1, b2, b3);
}

@compute @workgroup_size(256)
fn conv2d_64(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    let m_tiles = (params.m + 63u) / 64u;
    if (tile >= m_tiles * params.n_tiles) {
        return;
    }
    let m0 = (tile / params.n_tiles) * 64u;
    let n0 = (tile % params.n_tiles) * 64u;
    if ((params.flags & 64u) != 0u) {
        gn_merge_input(lid, WG, m0);
    }

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

    var kp = k_pos(lk);
    var ra0 = a_load(p0, kp);
    var rb0 = b_load(n_a, kp.k);
    var ra1 = vec4<f32>(0.0);
    var rb1 = vec4<f32>(0.0);
    if (two) {
        ra1 = a_load(p1, kp);
        rb1 = b_load(n_b, kp.k);
    }

    let tx = lid % 16u;
    let ty = lid / 16u;
    let ar = ty * 4u * rs;
    let br = tx * rs;
    var acc: array<vec4<f32>, 4>;

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
            kp = k_advance(kp, BK);
            ra0 = a_load(p0, kp);
            rb0 = b_load(n_a, kp.k);
            if (two) {
                ra1 = a_load(p1, kp);
                rb1 = b_load(n_b, kp.k);
            }
        }

        // BK is a pipeline constant: the `if` folds away.
        mac64(&acc, ar, br, rs, 0u);
        mac64(&acc, ar, br, rs, 1u);
        mac64(&acc, ar, br, rs, 2u);
        mac64(&acc, ar, br, rs, 3u);
        if (BK == 32u) {
            mac64(&acc, ar, br, rs, 4u);
            mac64(&acc, ar, br, rs, 5u);
            mac64(&acc, ar, br, rs, 6u);
            mac64(&acc, ar, br, rs, 7u);
        }
        workgroupBarrier();
    }

    let m = m0 + ty * 4u;
    let n = n0 + tx;
    store4(m, n, 16u, acc[0]);
    store4(m + 1u, n, 16u, acc[1]);
    store4(m + 2u, n, 16u, acc[2]);
    store4(m + 3u, n, 16u, acc[3]);
    if ((params.flags & 32u) != 0u) {
        gn_tile_partials(lid, WG, tile, m0, n0, 64u, 64u);
    }
}

// ------------------------------------------------------------------ conv2d_128

const RS_L: u32 = 5u; // padded row stride of conv2d_128's tiles (K step 16 = 4 vec4, + 1)

var<workgroup> a_tile_l: array<vec4<f32>, 128u * RS_L>;
var<workgroup> b_tile_l: array<vec4<f32>, 128u * RS_L>;

// 4 k (vec4 kk) into the 8 × 8 register tile: acc[2i] holds pixel ty + 16i × channels tx + 16j
// (j < 4), acc[2i + 1] the same pixel × channels tx + 64 + 16j. The 8 B vec4 stay in registers
// while the 8 A vec4 stream through.
fn mac128(acc: ptr<function, array<vec4<f32>, 16>>, tx: u32, ty: u32, kk: u32) {
    let br = tx * RS_L + kk;
    let b0 = b_tile_l[br];
    let b1 = b_tile_l[br + 16u * RS_L];
    let b2 = b_tile_l[br + 32u * RS_L];
    let b3 = b_tile_l[br + 48u * RS_L];
    let b4 = b_tile_l[br + 64u * RS_L];
    let b5 = b_tile_l[br + 80u * RS_L];
    let b6 = b_tile_l[br + 96u * RS_L];
    let b7 = b_tile_l[br + 112u * RS_L];
    let ar = ty * RS_L + kk;
    var a = a_tile_l[ar];
    (*acc)[0] = dot4x4((*acc)[0], a, b0, b1, b2, b3);
    (*acc)[1] = dot4x4((*acc)[1], a, b4, b5, b6, b7);
    a = a_tile_l[ar + 16u * RS_L];
    (*acc)[2] = dot4x4((*acc)[2], a, b0, b1, b2, b3);
    (*acc)[3] = dot4x4((*acc)[3], a, b4, b5, b6, b7);
    a = a_tile_l[ar + 32u * RS_L];
    (*acc)[4] = dot4x4((*acc)[4], a, b0, b1, b2, b3);
    (*acc)[5] = dot4x4((*acc)[5], a, b4, b5, b6, b7);
    a = a_tile_l[ar + 48u * RS_L];
    (*acc)[6] = dot4x4((*acc)[6], a, b0, b1, b2, b3);
    (*acc)[7] = dot4x4((*acc)[7], a, b4, b5, b6, b7);
    a = a_tile_l[ar + 64u * RS_L];
    (*acc)[8] = dot4x4((*acc)[8], a, b0, b1, b2, b3);
    (*acc)[9] = dot4x4((*acc)[9], a, b4, b5, b6, b7);
    a = a_tile_l[ar + 80u * RS_L];
    (*acc)[10] = dot4x4((*acc)[10], a, b0, b1, b2, b3);
    (*acc)[11] = dot4x4((*acc)[11], a, b4, b5, b6, b7);
    a = a_tile_l[ar + 96u * RS_L];
    (*acc)[12] = dot4x4((*acc)[12], a, b0, b1, b2, b3);
    (*acc)[13] = dot4x4((*acc)[13], a, b4, b5, b6, b7);
    a = a_tile_l[ar + 112u * RS_L];
    (*acc)[14] = dot4x4((*acc)[14], a, b0, b1, b2, b3);
    (*acc)[15] = dot4x4((*acc)[15], a, b4, b5, b6, b7);
}

@compute @workgroup_size(256)
fn conv2d_128(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    let m_tiles = (params.m + 127u) / 128u;
    if (tile >= m_tiles * params.n_tiles) {
        return;
    }
    let m0 = (tile / params.n_tiles) * 128u;
    let n0 = (tile % params.n_tiles) * 128u;
    if ((params.flags & 64u) != 0u) {
        gn_merge_input(lid, WG, m0);
    }

    // Loader: 4 vec4 per row; this thread loads k offset lk of rows lr and lr + 64 of A and B.
    let lk = (lid % 4u) * 4u;
    let lr = lid / 4u;
    let p0 = pixel(m0 + lr);
    let p1 = pixel(m0 + lr + 64u);
    let n_a = n0 + lr;
    let n_b = n0 + lr + 64u;
    let s0 = lr * RS_L + lk / 4u;
    let s1 = s0 + 64u * RS_L;

    var kp = k_pos(lk);
    var ra0 = a_load(p0, kp);
    var ra1 = a_load(p1, kp);
    var rb0 = b_load(n_a, kp.k);
    var rb1 = b_load(n_b, kp.k);

    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<vec4<f32>, 16>;

    let k_tiles = (params.k + 15u) / 16u;
    for (var t = 0u; t < k_tiles; t++) {
        a_tile_l[s0] = ra0;
        a_tile_l[s1] = ra1;
        b_tile_l[s0] = rb0;
        b_tile_l[s1] = rb1;
        workgroupBarrier();

        if (t + 1u < k_tiles) {
            kp = k_advance(kp, 16u);
            ra0 = a_load(p0, kp);
            ra1 = a_load(p1, kp);
            rb0 = b_load(n_a, kp.k);
            rb1 = b_load(n_b, kp.k);
        }

        mac128(&acc, tx, ty, 0u);
        mac128(&acc, tx, ty, 1u);
        mac128(&acc, tx, ty, 2u);
        mac128(&acc, tx, ty, 3u);
        workgroupBarrier();
    }

    // Constant indices only: a dynamically indexed accumulator array could be put in memory.
    let m = m0 + ty;
    let na = n0 + tx;
    let nb = n0 + tx + 64u;
    store4(m, na, 16u, acc[0]);
    store4(m, nb, 16u, acc[1]);
    store4(m + 16u, na, 16u, acc[2]);
    store4(m + 16u, nb, 16u, acc[3]);
    store4(m + 32u, na, 16u, acc[4]);
    store4(m + 32u, nb, 16u, acc[5]);
    store4(m + 48u, na, 16u, acc[6]);
    store4(m + 48u, nb, 16u, acc[7]);
    store4(m + 64u, na, 16u, acc[8]);
    store4(m + 64u, nb, 16u, acc[9]);
    store4(m + 80u, na, 16u, acc[10]);
    store4(m + 80u, nb, 16u, acc[11]);
    store4(m + 96u, na, 16u, acc[12]);
    store4(m + 96u, nb, 16u, acc[13]);
    store4(m + 112u, na, 16u, acc[14]);
    store4(m + 112u, nb, 16u, acc[15]);
    if ((params.flags & 32u) != 0u) {
        gn_tile_partials(lid, WG, tile, m0, n0, 128u, 128u);
    }
}

// ------------------------------------------------------------------ conv2d_small

const RS_S: u32 = 5u; // padded row stride of the A tile (K step 16 = 4 vec4, + 1)

var<workgroup> a_tile_s: array<vec4<f32>, 64u * RS_S>;
// [n][k]: 16 weight rows (4·NQ used) of 4 vec4, unpadded: every thread reads the same element.
var<workgroup> w_tile_s: array<vec4<f32>, 64u>;

fn w_s(n: u32, kk: u32) -> vec4<f32> {
    return w_tile_s[n * 4u + kk];
}

// 4 k (vec4 kk) of this thread's pixel (A row lid) into its 4·NQ channels (NQ folds away).
fn mac_small(acc: ptr<function, array<vec4<f32>, 4>>, lid: u32, kk: u32) {
    let a = a_tile_s[lid * RS_S + kk];
    (*acc)[0] = dot4x4((*acc)[0], a, w_s(0u, kk), w_s(1u, kk), w_s(2u, kk), w_s(3u, kk));
    if (NQ > 1u) {
        (*acc)[1] = dot4x4((*acc)[1], a, w_s(4u, kk), w_s(5u, kk), w_s(6u, kk), w_s(7u, kk));
    }
    if (NQ > 2u) {
        (*acc)[2] = dot4x4((*acc)[2], a, w_s(8u, kk), w_s(9u, kk), w_s(10u, kk), w_s(11u, kk));
    }
    if (NQ > 3u) {
        (*acc)[3] = dot4x4((*acc)[3], a, w_s(12u, kk), w_s(13u, kk), w_s(14u, kk), w_s(15u, kk));
    }
}

@compute @workgroup_size(64)
fn conv2d_small(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let nc = 4u * NQ;
    let tile = wid.x + wid.y * nwg.x;
    let m_tiles = (params.m + 63u) / 64u;
    if (tile >= m_tiles * params.n_tiles) {
        return;
    }
    let m0 = (tile / params.n_tiles) * 64u;
    let n0 = (tile % params.n_tiles) * nc;
    if ((params.flags & 64u) != 0u) {
        gn_merge_input(lid, 64u, m0);
    }

    // Loader: 4 vec4 per row; this thread loads k offset lk of A rows lr + 16·j (j < 4) and, if
    // lr < nc, of weight row lr (lr < 16: every weight row has a loader).
    let lk = (lid % 4u) * 4u;
    let lr = lid / 4u;
    let p0 = pixel(m0 + lr);
    let p1 = pixel(m0 + lr + 16u);
    let p2 = pixel(m0 + lr + 32u);
    let p3 = pixel(m0 + lr + 48u);
    let s0 = lr * RS_S + lk / 4u;
    let sw = lr * 4u + lk / 4u;
    let loads_w = lr < nc;
    let n_w = n0 + lr;

    var kp = k_pos(lk);
    var ra0 = a_load(p0, kp);
    var ra1 = a_load(p1, kp);
    var ra2 = a_load(p2, kp);
    var ra3 = a_load(p3, kp);
    var rw = vec4<f32>(0.0);
    if (loads_w) {
        rw = b_load(n_w, kp.k);
    }

    var acc: array<vec4<f32>, 4>;

    let k_tiles = (params.k + 15u) / 16u;
    for (var t = 0u; t < k_tiles; t++) {
        a_tile_s[s0] = ra0;
        a_tile_s[s0 + 16u * RS_S] = ra1;
        a_tile_s[s0 + 32u * RS_S] = ra2;
        a_tile_s[s0 + 48u * RS_S] = ra3;
        if (loads_w) {
            w_tile_s[sw] = rw;
        }
        workgroupBarrier();

        if (t + 1u < k_tiles) {
            kp = k_advance(kp, 16u);
            ra0 = a_load(p0, kp);
            ra1 = a_load(p1, kp);
            ra2 = a_load(p2, kp);
            ra3 = a_load(p3, kp);
            if (loads_w) {
                rw = b_load(n_w, kp.k);
            }
        }

        mac_small(&acc, lid, 0u);
        mac_small(&acc, lid, 1u);
        mac_small(&acc, lid, 2u);
        mac_small(&acc, lid, 3u);
        workgroupBarrier();
    }

    let m = m0 + lid;
    store4(m, n0, 1u, acc[0]);
    if (NQ > 1u) {
        store4(m, n0 + 4u, 1u, acc[1]);
    }
    if (NQ > 2u) {
        store4(m, n0 + 8u, 1u, acc[2]);
    }
    if (NQ > 3u) {
        store4(m, n0 + 12u, 1u, acc[3]);
    }
    if ((params.flags & 32u) != 0u) {
        gn_tile_partials(lid, 64u, tile, m0, n0, 64u, nc);
    }
}

// The FMA kernels' GroupNorm producer (flags bit 5, see the shared section below): the
// whole tile at once, read back from out.
fn gn_tile_partials(lid: u32, nt: u32, tile: u32, m0: u32, n0: u32, tm: u32, tn: u32) {
    storageBarrier();
    workgroupBarrier();
    gn_tile_rows(lid, nt, tile, m0, n0, tm, tn, 0u, tm, 0u, true);
}

// Output pixel m, channel n as this workgroup stored it (row rt, column ct of its tile).
fn gn_tile_value(view: u32, rt: u32, ct: u32, m: u32, n: u32) -> f32 {
    return f32(out[m * params.cout + n]);
}

// ------------------------------------------------------------------ GroupNorm partials (shared)
// (src/shaders.rs appends this section to conv2d_coop.wgsl too.)
//
// GroupNorm statistics without a statistics dispatch: the convolution that PRODUCES an
// activation (flags bit 5) also writes, per output tile, the (count, mean, M2) of every
// (image, channel group) piece of the tile to gn_out; the convolution that CONSUMES it with a
// fused GroupNorm (flags bit 6) merges those pieces (Chan's formula, in a fixed order, so every
// workgroup gets the same bits) into mean and rstd per (image, group) at workgroup start, and
// normalises each input element as it loads it with gn[c] = (gamma[c], beta[c]). WGSL has no
// float atomics and no device-scope fence, so a producer-side "last workgroup finalises" is not
// possible; the consumer-side merge is.
//
// Producer: after its epilogue has stored the tile [m0, m0 + tm) × [n0, n0 + tn) of out, the
// workgroup reduces each piece (rows of one image × channels of one group) with Welford per
// invocation, then merges the invocations' results per piece. The tile's values come from
// gn_tile_value, which each kernel file defines: the FMA kernels here read back what they
// stored in out (storageBarrier: a workgroup's own stores are visible to it); the tensor-core
// kernels read their f32 staging in workgroup memory, where the epilogue leaves each rounded
// output (a storage barrier there would be device scope, which under the Vulkan memory model
// those shaders use needs a SPIR-V capability naga does not declare). A kernel may hand its
// tile over in row ranges (the tensor-core large tile stages a quarter of it at a time): later
// ranges merge into the pieces the same invocation wrote for earlier ones (program order, no
// barrier). Pieces are indexed (tile, s, j): s = image − the tile's first image (0 or 1: the
// host runs this only where no tile spans three images), j = group − the tile's first group
// (< so_jmax); gn_out[((tile · 2) + s) · so_jmax + j] = (n, mean, M2, 0), n = 0 for a piece
// the tile does not have. tile = m_tile · ceil(Cout / tn) + n_tile.
// Consumer: one invocation per (s, g) of its own tile's (at most two) images merges the
// producer's pieces of (image, g) in (piece group, m_tile, n_tile) order; producer geometry in
// params.si_*. A producer's piece groups (width so_gw, the last one narrower where so_gw does
// not divide its channels) need only tile the consumer's groups: the host checks that si_pw
// divides si_gw. With CONCAT each part has its own producer: channels below ca merge from
// gn_in, the rest from gn_in_b (geometry params.sb_*; the host checks that sb_pw divides si_gw
// and ca, so no piece straddles a consumer group) — the U-Net decoder's [h ; skip].

@group(0) @binding(12) var<storage, read_write> gn_out: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read> gn_in: array<vec4<f32>>;
@group(0) @binding(14) var<storage, read> gn_in_b: array<vec4<f32>>;
// Producer: one (n, mean, M2) per invocation; consumer: (mean, rstd) per (s, g), s·G + g.
var<workgroup> gn_sh: array<vec4<f32>, 256>;
// Consumer: the first image of this workgroup's output tile.
var<private> gn_b_first: u32;

// Chan et al.: (n, mean, M2) of the union of two disjoint sets.
fn gn_chan(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    let n = a.x + b.x;
    if (n == 0.0) {
        return vec3<f32>(0.0);
    }
    let delta = b.y - a.y;
    let w = b.x / n;
    return vec3<f32>(n, a.y + delta * w, a.z + b.z + delta * delta * a.x * w);
}

// Producer (flags bit 5): the GroupNorm pieces of rows [ra, rb) (relative to m0) of output
// tile `tile` = [m0, m0 + tm) × [n0, n0 + tn); `first`: no earlier rows of this tile were
// handed over. `view` is passed on to gn_tile_value. Every invocation calls it (barriers);
// the values must be visible to the whole workgroup when it is called.
fn gn_tile_rows(lid: u32, nt: u32, tile: u32, m0: u32, n0: u32, tm: u32, tn: u32, ra: u32,
                rb: u32, view: u32, first: bool) {
    let hw = params.ho * params.wo;
    let gw = params.so_gw;
    let jmax = params.so_jmax;
    let m_end = min(m0 + min(rb, tm), params.m);
    let n_end = min(n0 + tn, params.cout);
    let b0 = m0 / hw;
    let g0 = n0 / gw;
    let keys = 2u * jmax;
    let lanes = max(1u, nt / keys);
    let per_round = nt / lanes;
    for (var base = 0u; base < keys; base += per_round) {
        let key = base + lid / lanes;
        let lane = lid % lanes;
        var acc = vec3<f32>(0.0);
        if (lid < per_round * lanes && key < keys) {
            let s = key / jmax;
            let g = g0 + key % jmax;
            let r0 = max(m0 + ra, (b0 + s) * hw);
            let r1 = min(m_end, (b0 + s + 1u) * hw);
            let c0 = max(n0, g * gw);
            let c1 = min(n_end, (g + 1u) * gw);
            if (r1 > r0 && c1 > c0) {
                let cols = c1 - c0;
                let count = (r1 - r0) * cols;
                // Welford over this lane's share of the piece.
                for (var e = lane; e < count; e += lanes) {
                    let r = e / cols;
                    let c = c0 + e - r * cols;
                    let x = gn_tile_value(view, r0 + r - m0, c - n0, r0 + r, c);
                    acc.x += 1.0;
                    let d = x - acc.y;
                    acc.y += d / acc.x;
                    acc.z += d * (x - acc.y);
                }
            }
        }
        gn_sh[lid] = vec4<f32>(acc, 0.0);
        workgroupBarrier();
        if (lane == 0u && lid < per_round * lanes && key < keys) {
            var m = acc;
            for (var l = 1u; l < lanes; l++) {
                m = gn_chan(m, gn_sh[lid + l].xyz);
            }
            let at = (tile * 2u + key / jmax) * jmax + key % jmax;
            if (!first) {
                m = gn_chan(gn_out[at].xyz, m);
            }
            gn_out[at] = vec4<f32>(m, 0.0);
        }
        workgroupBarrier();
    }
}

// Consumer: `acc` merged with the pieces of image b over channels [lo, hi) of one input part
// (second: CONCAT's second part, from gn_in_b; else x or the first part, from gn_in); lo and
// hi lie on the part's piece-group boundaries or its end.
fn gn_merge_part(acc_in: vec3<f32>, second: bool, b: u32, lo: u32, hi: u32) -> vec3<f32> {
    let pw = select(params.si_pw, params.sb_pw, second);
    let jmax = select(params.si_jmax, params.sb_jmax, second);
    let tm = select(params.si_tm, params.sb_tm, second);
    let tn = select(params.si_tn, params.sb_tn, second);
    let channels = select(params.ca, params.cin - params.ca, second);
    let n_tiles = (channels + tn - 1u) / tn;
    let hw_in = params.xh * params.xw;
    let r0 = b * hw_in;
    let r1 = r0 + hw_in;
    var acc = acc_in;
    for (var pg = lo / pw; pg * pw < hi; pg++) {
        let c0 = pg * pw;
        let c1 = min(c0 + pw, channels);
        for (var mt = r0 / tm; mt * tm < r1; mt++) {
            let s = b - (mt * tm) / hw_in;
            for (var ntile = c0 / tn; ntile * tn < c1; ntile++) {
                let at = ((mt * n_tiles + ntile) * 2u + s) * jmax + pg - (ntile * tn) / pw;
                if (second) {
                    acc = gn_chan(acc, gn_in_b[at].xyz);
                } else {
                    acc = gn_chan(acc, gn_in[at].xyz);
                }
            }
        }
    }
    return acc;
}

// Consumer (flags bit 6): mean and rstd of every (image, group) of this workgroup's images
// (m0 its first output pixel) into gn_sh, from the producers' pieces. Every invocation calls
// it.
fn gn_merge_input(lid: u32, nt: u32, m0: u32) {
    let groups = params.si_groups;
    let gw = params.si_gw;
    let ca = params.ca;
    gn_b_first = m0 / (params.ho * params.wo);
    for (var e = lid; e < 2u * groups; e += nt) {
        let b = gn_b_first + e / groups;
        let c0 = (e % groups) * gw;
        let c1 = c0 + gw;
        var acc = vec3<f32>(0.0);
        if (b < params.batch) {
            if (c0 < ca) {
                acc = gn_merge_part(acc, false, b, c0, min(c1, ca));
            }
            if (c1 > ca) {
                acc = gn_merge_part(acc, true, b, max(c0, ca) - ca, c1 - ca);
            }
        }
        gn_sh[e] = vec4<f32>(acc.y, inverseSqrt(acc.z / max(acc.x, 1.0) + params.si_eps), 0.0, 0.0);
    }
    workgroupBarrier();
}

// Consumer: (scale, shift) of input channel ci of image b: gamma·rstd, beta − mean·scale.
fn gn_merged_affine(b: u32, ci: u32) -> vec2<f32> {
    let g = u32((f32(ci) + 0.5) * params.si_inv_gw);
    let st = gn_sh[(b - gn_b_first) * params.si_groups + g];
    let gb = gn[ci];
    let scale = st.y * gb.x;
    return vec2<f32>(scale, gb.y - st.x * scale);
}
// ------------------------------------------------------------------ end GroupNorm partials
