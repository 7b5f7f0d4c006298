// norm: GroupNorm (+ optional SiLU) and LayerNorm on channels-last tensors.
//
// GroupNorm (torch.nn.GroupNorm, then optionally F.silu), x viewed as [B, R, C] (R = H*W or tokens):
//   group g holds channels [g*cpg, (g+1)*cpg), cpg = C / G; statistics over R x cpg values per (b, g);
//   mean, biased var; y = (x - mean) * inverseSqrt(var + eps) * gamma[c] + beta[c]; y = y * sigmoid(y).
// Two dispatches, both over the grid (G, chunks, B) where a chunk is `rows_per_chunk` rows of one group:
//   gn_partial    one workgroup per (b, g, chunk) reduces its R_chunk x cpg values and stores the
//                 chunk's (mean, M2) in `partial` (f32). 32 groups x batch 2 = 64 workgroups would
//                 leave most of a large GPU idle; the chunks give ~1,000-4,000 on the big SD shapes.
//                 Numerics: the sums are of (x - pivot), pivot = the chunk's first value, so
//                 |mean| >> std does not cancel (a pivot drawn from the data is within a few std of
//                 the mean). Means are kept relative to the group's first value x[b, 0, g*cpg] and
//                 the normalisation computes (x - group_pivot) - mean: x - pivot is exact for nearby
//                 values, where an absolute f32 mean would already be off by ulp(mean) / 2.
//   gn_normalize  the same workgroups first merge all chunks of their (b, g) with Chan's parallel
//                 formula (cheap: `chunks` loads), then normalise their own chunk. Merging per workgroup
//                 instead of in a third "finalize" dispatch costs ~chunks loads per 2048+ values
//                 (the Rust side grows the chunks so the grid stays near 4096 workgroups).
//   g varies fastest across workgroups, so workgroups running together read neighbouring channel runs
//   of the same rows and share the 32-byte sectors in L2 (a group's run is only cpg values, e.g. 10).
// Two-source mode (override CONCAT = true): the input is the channel concatenation cat(a, b) of
//   a [B, R, Ca] and b [B, R, Cb] (diffusers' `torch.cat([h, skip], dim=1)` ahead of an up-block
//   ResnetBlock2D) and y is [B, R, Ca + Cb]; channel c < Ca reads a, the rest read b at c - Ca. The
//   U-Net decoder's concats (e.g. 1280 + 640 = 1920 in 32 groups of 60) put a group across the
//   boundary, so the choice is made per value, not per group: only the workgroups of a straddling
//   group diverge, and both sides are one load. Reading the two sources in place saves writing and
//   re-reading the concatenated tensor. With CONCAT false the branch folds away (x_b is bound to x
//   and never read), so the one-source kernel is what it was.
//
// GroupNorm as a table for a fused consumer (conv2d's normalised input, flags bit 3): the same
// statistics, written as table[b·C + c] = (scale, shift) = (gamma[c]·rstd, beta[c] − mean·scale)
// (vec2<f32>, i.e. [B, C, 2] f32), so the consumer computes fma(x, scale, shift) (then SiLU) while
// it loads x, and the normalised activation is never written. Its cost: x·scale + shift cancels
// |mean|·scale, so the result carries ~|mean| / std · 2⁻²⁴ relative error (the two-dispatch kernel
// above keeps x − pivot exact); U-Net activations have |mean| / std of a few.
//   gn_stats      one workgroup per (b, g), grid (G, 1, B): two passes over the group from the
//                 group's first value as pivot (the mean of x − pivot, then the centred sum of
//                 squares of (x − pivot) − mean, the second pass from cache), tree-reduced in f32.
//                 For groups up to 2^17 values (SD 1.5's largest U-Net group: 64·64·30 = 122,880):
//                 one dispatch where normalising costs two.
//   gn_affine     beyond that (the VAE's 512² groups: 1M values) one workgroup per group would
//                 serialise it, so gn_partial first reduces chunks over the usual (G, chunks, B)
//                 grid and gn_affine, grid (G, 1, B), merges them (Chan, as gn_normalize) into
//                 the table.
//
// LayerNorm (torch.nn.LayerNorm over the last dim C, biased var): x viewed as [rows, C]; one
// workgroup of 64 per row (grid folded by grid_1d): mean, then the centred sum of squares (two
// passes over the row, the second from cache), then the write; all relative to the row's first
// value so |mean| >> std costs no precision.
//
// Bindings: 0 x (elem, read; a in two-source mode), 1 gamma [C] (elem), 2 beta [C] (elem), 3 y (elem,
//           read_write, [B, R, C]), 4 partial (vec2<f32> [B, G, chunks]: chunk mean, chunk M2),
//           5 x_b (elem, read; b in two-source mode, x again otherwise), 6 params,
//           7 table (vec2<f32> [B, C]: scale, shift; read_write).
//           gn_partial uses 0, 4, 5; gn_normalize 0-5; gn_stats 0-2, 5, 7; gn_affine 0-2, 4, 5, 7;
//           layer_norm 0-3.

struct Params {
    rows: u32,            // R: rows per batch item (group norm), or total rows (layer norm)
    channels: u32,        // C
    groups: u32,          // G
    cpg: u32,             // C / G
    rows_per_chunk: u32,  // group norm: rows reduced by one workgroup
    chunks: u32,          // ceil(R / rows_per_chunk)
    silu: u32,            // 1: apply SiLU after the affine
    eps: f32,
    ca: u32,              // two-source mode: channels of a (the first Ca of C); else C
    cb: u32,              // two-source mode: channels of b (C - Ca); else 0
};

override CONCAT: bool = false;

@group(0) @binding(0) var<storage, read> x: array<elem>;
@group(0) @binding(1) var<storage, read> gamma: array<elem>;
@group(0) @binding(2) var<storage, read> beta: array<elem>;
@group(0) @binding(3) var<storage, read_write> y: array<elem>;
@group(0) @binding(4) var<storage, read_write> partial: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read> x_b: array<elem>;
@group(0) @binding(6) var<uniform> params: Params;
@group(0) @binding(7) var<storage, read_write> table: array<vec2<f32>>;

const GN_WG: u32 = 256u;
const LN_WG: u32 = 64u;

var<workgroup> red_n: array<f32, 256>;
var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;

// Chan et al.: merge (n, mean, M2) of two disjoint sets.
fn chan(n_a: f32, mean_a: f32, m2_a: f32, n_b: f32, mean_b: f32, m2_b: f32) -> vec3<f32> {
    let n = n_a + n_b;
    if (n == 0.0) {
        return vec3<f32>(0.0, 0.0, 0.0);
    }
    let delta = mean_b - mean_a;
    let w = n_b / n;
    return vec3<f32>(n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w);
}

fn silu_f(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}

// Rows [r0, r1) of batch item b form a chunk; with a group's cpg channels that makes one
// workgroup's values. Returns (the chunk's first row over the whole batch, b * R + r0; the count of
// values per group, (r1 - r0) * cpg).
fn gn_chunk(chunk: u32, b: u32) -> vec2<u32> {
    let r0 = chunk * params.rows_per_chunk;
    let r1 = min(r0 + params.rows_per_chunk, params.rows);
    return vec2<u32>(b * params.rows + r0, (r1 - r0) * params.cpg);
}

// Input value at (row, channel) of [B * R, C]: x, or cat(a, b) in two-source mode.
fn gn_load(row: u32, ch: u32) -> f32 {
    if (CONCAT) {
        if (ch < params.ca) {
            return f32(x[row * params.ca + ch]);
        }
        return f32(x_b[row * params.cb + (ch - params.ca)]);
    }
    return f32(x[row * params.channels + ch]);
}

@compute @workgroup_size(256)
fn gn_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wid.x;
    let chunk = wid.y;
    let b = wid.z;
    let cpg = params.cpg;
    let c0 = g * cpg;
    let bc = gn_chunk(chunk, b);
    let row0 = bc.x;
    let count = bc.y;
    // Local pivot for this chunk's sums; the stored mean is relative to the group's pivot.
    let pivot = gn_load(row0, c0);
    let group_pivot = gn_load(b * params.rows, c0);

    // Walk i = lid, lid + 256, ... as (row, col) = divmod(i, cpg), advanced without a division.
    let d_row = GN_WG / cpg;
    let d_col = GN_WG % cpg;
    var row = row0 + lid / cpg;
    var col = lid % cpg;
    var s1 = 0.0;
    var s2 = 0.0;
    for (var i = lid; i < count; i += GN_WG) {
        let v = gn_load(row, c0 + col) - pivot;
        s1 += v;
        s2 += v * v;
        col += d_col;
        row += d_row;
        if (col >= cpg) {
            col -= cpg;
            row += 1u;
        }
    }
    red_a[lid] = s1;
    red_b[lid] = s2;
    workgroupBarrier();
    for (var s = GN_WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_a[lid] += red_a[lid + s];
            red_b[lid] += red_b[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let n = f32(count);
        let shift = red_a[0] / n;
        // M2 = sum (v - mean_v)^2 = sum v^2 - n * mean_v^2, all relative to the pivot.
        let m2 = max(red_b[0] - red_a[0] * shift, 0.0);
        partial[(b * params.groups + g) * params.chunks + chunk] = vec2<f32>((pivot - group_pivot) + shift, m2);
    }
}

// Every chunk's (mean, M2) of (b, g) merged: a strided share per thread, then a tree over the
// workgroup. Returns (the mean relative to the group's first value, rstd). Every thread must
// call it (barriers).
fn gn_merge(b: u32, g: u32, lid: u32) -> vec2<f32> {
    let pbase = (b * params.groups + g) * params.chunks;
    var acc = vec3<f32>(0.0, 0.0, 0.0);
    for (var k = lid; k < params.chunks; k += GN_WG) {
        let p = partial[pbase + k];
        let r0 = k * params.rows_per_chunk;
        let nk = f32((min(r0 + params.rows_per_chunk, params.rows) - r0) * params.cpg);
        acc = chan(acc.x, acc.y, acc.z, nk, p.x, p.y);
    }
    red_n[lid] = acc.x;
    red_a[lid] = acc.y;
    red_b[lid] = acc.z;
    workgroupBarrier();
    for (var s = GN_WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let m = chan(red_n[lid], red_a[lid], red_b[lid], red_n[lid + s], red_a[lid + s], red_b[lid + s]);
            red_n[lid] = m.x;
            red_a[lid] = m.y;
            red_b[lid] = m.z;
        }
        workgroupBarrier();
    }
    return vec2<f32>(red_a[0], inverseSqrt(red_b[0] / red_n[0] + params.eps));
}

// Channels c0 .. c0 + cpg of batch item b into the table: scale = gamma·rstd, shift =
// beta − mean·scale (mean absolute).
fn gn_write_table(b: u32, c0: u32, lid: u32, mean: f32, rstd: f32) {
    for (var j = lid; j < params.cpg; j += GN_WG) {
        let ch = c0 + j;
        let scale = rstd * f32(gamma[ch]);
        table[b * params.channels + ch] = vec2<f32>(scale, f32(beta[ch]) - mean * scale);
    }
}

// Sum of v over the workgroup (every thread must call it: barriers).
fn gn_sum(lid: u32, v: f32) -> f32 {
    workgroupBarrier(); // previous readers of red_a[0] are done
    red_a[lid] = v;
    workgroupBarrier();
    for (var s = GN_WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_a[lid] += red_a[lid + s];
        }
        workgroupBarrier();
    }
    return red_a[0];
}

@compute @workgroup_size(256)
fn gn_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wid.x;
    let b = wid.z;
    let cpg = params.cpg;
    let c0 = g * cpg;
    let row0 = b * params.rows;
    let count = params.rows * cpg;
    let n = f32(count);
    let pivot = gn_load(row0, c0);
    let d_row = GN_WG / cpg;
    let d_col = GN_WG % cpg;

    // Pass 1: the mean of x − pivot. (row, col) = divmod(i, cpg) advanced without a division.
    var row = row0 + lid / cpg;
    var col = lid % cpg;
    var s1 = 0.0;
    for (var i = lid; i < count; i += GN_WG) {
        s1 += gn_load(row, c0 + col) - pivot;
        col += d_col;
        row += d_row;
        if (col >= cpg) {
            col -= cpg;
            row += 1u;
        }
    }
    let mean = gn_sum(lid, s1) / n; // relative to pivot

    // Pass 2: the centred sum of squares (the group is in cache by now).
    row = row0 + lid / cpg;
    col = lid % cpg;
    var s2 = 0.0;
    for (var i = lid; i < count; i += GN_WG) {
        let d = (gn_load(row, c0 + col) - pivot) - mean;
        s2 += d * d;
        col += d_col;
        row += d_row;
        if (col >= cpg) {
            col -= cpg;
            row += 1u;
        }
    }
    let rstd = inverseSqrt(gn_sum(lid, s2) / n + params.eps);
    gn_write_table(b, c0, lid, pivot + mean, rstd);
}

@compute @workgroup_size(256)
fn gn_affine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wid.x;
    let b = wid.z;
    let c0 = g * params.cpg;
    let stats = gn_merge(b, g, lid);
    let group_pivot = gn_load(b * params.rows, c0);
    gn_write_table(b, c0, lid, group_pivot + stats.x, stats.y);
}

@compute @workgroup_size(256)
fn gn_normalize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wid.x;
    let chunk = wid.y;
    let b = wid.z;
    let cpg = params.cpg;
    let c0 = g * cpg;

    let stats = gn_merge(b, g, lid);
    let group_pivot = gn_load(b * params.rows, c0);
    let mean = stats.x; // relative to group_pivot
    let rstd = stats.y;

    let bc = gn_chunk(chunk, b);
    let count = bc.y;
    let d_row = GN_WG / cpg;
    let d_col = GN_WG % cpg;
    var row = bc.x + lid / cpg;
    var col = lid % cpg;
    for (var i = lid; i < count; i += GN_WG) {
        let ch = c0 + col;
        var v = ((gn_load(row, ch) - group_pivot) - mean) * rstd * f32(gamma[ch]) + f32(beta[ch]);
        if (params.silu != 0u) {
            v = silu_f(v);
        }
        y[row * params.channels + ch] = elem(v);
        col += d_col;
        row += d_row;
        if (col >= cpg) {
            col -= cpg;
            row += 1u;
        }
    }
}

// Sum of red_a[0..LN_WG) into red_a[0]; every thread must call it (barriers).
fn ln_reduce(lid: u32, v: f32) -> f32 {
    workgroupBarrier(); // previous readers of red_a[0] are done
    red_a[lid] = v;
    workgroupBarrier();
    for (var s = LN_WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_a[lid] += red_a[lid + s];
        }
        workgroupBarrier();
    }
    return red_a[0];
}

@compute @workgroup_size(64)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    // Uniform per workgroup, so returning keeps the barriers below in uniform control flow.
    if (row >= params.rows) {
        return;
    }
    let c = params.channels;
    let base = row * c;
    // Everything relative to the row's first value: x - pivot is exact for nearby values, so a large
    // common offset costs no precision (an f32 `mean` itself would be off by ulp(mean) / 2).
    let pivot = f32(x[base]);
    var s = 0.0;
    for (var i = lid; i < c; i += LN_WG) {
        s += f32(x[base + i]) - pivot;
    }
    let mean = ln_reduce(lid, s) / f32(c);
    var q = 0.0;
    for (var i = lid; i < c; i += LN_WG) {
        let d = (f32(x[base + i]) - pivot) - mean;
        q += d * d;
    }
    let rstd = inverseSqrt(ln_reduce(lid, q) / f32(c) + params.eps);
    for (var i = lid; i < c; i += LN_WG) {
        y[base + i] = elem(((f32(x[base + i]) - pivot) - mean) * rstd * f32(gamma[i]) + f32(beta[i]));
    }
}
