// tiling: the tensor work of diffusers' tiled VAE (AutoencoderKL.tiled_decode / _tiled_encode):
// cut an overlapping window out of the input, and blend each processed tile against its already
// blended neighbours (blend_v with the tile above, then blend_h with the tile to the left) before
// writing its `row_limit` window into the assembled output. Arithmetic in f32. NHWC throughout.
//
// Entry points:
//   crop_window   dst[b, y, x, c] = src[b, y0 + y, x0 + x, c]         dst [B, h, w, C]
//   blend_tile    for each element of tile [B, h, w, C], in place:
//                   v = tile[b, y, x, c]
//                   if y < ev: v = above[b, src_h - ev + y, x, c] * (1 - y/ev) + v * (y/ev)
//                   if x < eh: v = left[b, y, src_w - eh + x, c] * (1 - x/eh) + v * (x/eh)
//                   tile[b, y, x, c] = v
//                   if y < keep_h and x < keep_w: out[b, y0 + y, x0 + x, c] = v
//                 above [B, src_h, w, C] and left [B, h, src_w, C] are the neighbours *after* their
//                 own blending (diffusers blends in place, so later tiles see blended values); the
//                 vertical blend comes first, so the corner mixes the v-blended value with `left`.
//                 ev = 0 (eh = 0) turns a blend off. The tile keeps its blended values: it is the
//                 `above` of the next row and the `left` of the next column.
//
// Bindings: 0 src / above (elem, read), 1 left (elem, read), 2 dst / tile (elem, read_write),
//           3 out (elem, read_write), 4 params. crop_window uses 0 and 2 only.
// Dispatch: 256 threads per workgroup, one element per thread, ceil(n / 256) workgroups folded
//           over (x, y) by `grid_1d`.

struct Params {
    n: u32,       // elements of dst / tile
    c: u32,       // channels
    h: u32,       // rows of dst / tile
    w: u32,       // columns of dst / tile
    src_h: u32,   // crop: rows of src; blend: rows of `above`
    src_w: u32,   // crop: columns of src; blend: columns of `left`
    y0: u32,      // crop: window origin in src; blend: where the kept window lands in `out`
    x0: u32,
    ev: u32,      // blend: vertical blend extent (rows), 0 = no tile above
    eh: u32,      // blend: horizontal blend extent (columns), 0 = no tile to the left
    out_h: u32,   // blend: rows of `out`
    out_w: u32,   // blend: columns of `out`
    keep_h: u32,  // blend: rows of the tile written to `out` (diffusers row_limit, clipped)
    keep_w: u32,  // blend: columns written to `out`
};

@group(0) @binding(0) var<storage, read> src: array<elem>;
@group(0) @binding(1) var<storage, read> left: array<elem>;
@group(0) @binding(2) var<storage, read_write> dst: array<elem>;
@group(0) @binding(3) var<storage, read_write> out: array<elem>;
@group(0) @binding(4) var<uniform> params: Params;

const WG: u32 = 256u;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@compute @workgroup_size(256)
fn crop_window(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let c = params.c;
    let ch = i % c;
    let p = i / c;
    let x = p % params.w;
    let q = p / params.w;
    let y = q % params.h;
    let b = q / params.h;
    dst[i] = src[((b * params.src_h + params.y0 + y) * params.src_w + params.x0 + x) * c + ch];
}

@compute @workgroup_size(256)
fn blend_tile(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wid, nwg, lid);
    if (i >= params.n) {
        return;
    }
    let c = params.c;
    let ch = i % c;
    let p = i / c;
    let x = p % params.w;
    let q = p / params.w;
    let y = q % params.h;
    let b = q / params.h;
    var v = f32(dst[i]);
    if (y < params.ev) {
        let t = f32(y) / f32(params.ev);
        let a = f32(src[((b * params.src_h + params.src_h - params.ev + y) * params.w + x) * c + ch]);
        v = a * (1.0 - t) + v * t;
    }
    if (x < params.eh) {
        let t = f32(x) / f32(params.eh);
        let a = f32(left[((b * params.h + y) * params.src_w + params.src_w - params.eh + x) * c + ch]);
        v = a * (1.0 - t) + v * t;
    }
    dst[i] = elem(v);
    if (y < params.keep_h && x < params.keep_w) {
        out[((b * params.out_h + params.y0 + y) * params.out_w + params.x0 + x) * c + ch] = elem(v);
    }
}
