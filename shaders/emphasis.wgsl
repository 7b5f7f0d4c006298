// emphasis: A1111's "Original" prompt emphasis on the text encoder's output z [rows, C]:
//
//     out[r, c] = z[r, c] * w[r] * (mean(z) / mean(z * w))
//
// Each token row is multiplied by its weight (1 for BOS, EOS and padding), then the whole chunk is
// rescaled so that its mean equals the mean before weighting. The ratio of means is the ratio of
// sums (the element count cancels), accumulated in f32.
//
// Two entry points, two dispatches:
//   emphasis_sums  : G workgroups of 256 threads; workgroup g sums z and z*w over the elements
//                    g*256 + lid + k*G*256 and writes partial[2g] = Σz, partial[2g+1] = Σz·w.
//                    Dispatch: (G, 1, 1) with G = params.groups ≤ 256.
//   emphasis_apply : every workgroup first reduces the G partial pairs (cheap: ≤ 256 pairs), then
//                    scales its 256 elements. Dispatch: ceil(n / 256) workgroups folded over
//                    (x, y) by `grid_1d`.
//
// Bindings: 0 z (elem, read), 1 w (f32 per row, read), 2 out (elem, read_write),
//           3 partial (f32 [2 * G], read_write), 4 params (uniform).

struct Params {
    n: u32,        // elements of z
    row_len: u32,  // C: elements per token row
    groups: u32,   // G: workgroups of emphasis_sums (≤ 256)
    _pad: u32,
};

@group(0) @binding(0) var<storage, read> z: array<elem>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<elem>;
@group(0) @binding(3) var<storage, read_write> partial: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

var<workgroup> sum_z: array<f32, 256>;
var<workgroup> sum_zw: array<f32, 256>;

// Tree reduction of the two shared arrays into element 0.
fn reduce_shared(lid: u32) {
    for (var stride = 128u; stride > 0u; stride = stride >> 1u) {
        workgroupBarrier();
        if (lid < stride) {
            sum_z[lid] = sum_z[lid] + sum_z[lid + stride];
            sum_zw[lid] = sum_zw[lid] + sum_zw[lid + stride];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn emphasis_sums(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var s_z = 0.0;
    var s_zw = 0.0;
    let step = params.groups * 256u;
    for (var i = wid.x * 256u + lid; i < params.n; i = i + step) {
        let v = f32(z[i]);
        s_z = s_z + v;
        s_zw = s_zw + v * w[i / params.row_len];
    }
    sum_z[lid] = s_z;
    sum_zw[lid] = s_zw;
    reduce_shared(lid);
    if (lid == 0u) {
        partial[2u * wid.x] = sum_z[0];
        partial[2u * wid.x + 1u] = sum_zw[0];
    }
}

@compute @workgroup_size(256)
fn emphasis_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    var s_z = 0.0;
    var s_zw = 0.0;
    if (lid < params.groups) {
        s_z = partial[2u * lid];
        s_zw = partial[2u * lid + 1u];
    }
    sum_z[lid] = s_z;
    sum_zw[lid] = s_zw;
    reduce_shared(lid);
    let ratio = sum_z[0] / sum_zw[0];
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i < params.n) {
        out[i] = elem(f32(z[i]) * w[i / params.row_len] * ratio);
    }
}
