// peak_coop: the tensor-core throughput this device reaches from WGSL, the denominator of the
// "% of peak" of the cooperative-matrix kernels (matmul_coop, conv2d_coop, attention_coop).
//
// Every subgroup loads one A and one B fragment from workgroup memory once, then runs
// `params.iterations` rounds of 4 independent coopMultiplyAdd chains (independent so the matrix
// unit's latency is hidden), f16 × f16 → f32 as the kernels use them. FLOPs counted:
// workgroups × 4 subgroups × iterations × 4 chains × 2·FRAG³.
// Variants as matmul_coop.wgsl (src/shaders.rs VARIANTS: peak_coop16, peak_coop8).
//
// Bindings: 1 dst (f32, read_write; written only in a case that never happens, so the chains
//           cannot be dropped), 2 params. Dispatch: any grid of 4·SG-wide workgroups.

enable wgpu_cooperative_matrix;

struct Params {
    n4: u32,          // elements of dst
    iterations: u32,  // multiply-add rounds per subgroup
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;

// Fragment side: the `peak_coop8` variant replaces this 16 by 8 along with the matrix types.
const FRAG: u32 = 16u;
override SG: u32 = 32u;
override NT: u32 = 4u * SG;

var<workgroup> ab: array<f16, 2u * FRAG * FRAG>;
// 4 subgroups × 4 accumulators.
var<workgroup> acc: array<f32, 16u * FRAG * FRAG>;

@compute @workgroup_size(NT)
fn coop_peak(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32) {
    for (var i = lid; i < 2u * FRAG * FRAG; i += NT) {
        ab[i] = f16(f32(i % 7u) * 1e-3);
    }
    workgroupBarrier();
    let a_at = 0u;
    let b_at = FRAG * FRAG;
    let a = coopLoadT<coop_mat16x16<f16, A>>(&ab[a_at], FRAG);
    let b = coopLoad<coop_mat16x16<f16, B>>(&ab[b_at], FRAG);
    var c0 = coop_mat16x16<f32, C>();
    var c1 = coop_mat16x16<f32, C>();
    var c2 = coop_mat16x16<f32, C>();
    var c3 = coop_mat16x16<f32, C>();
    for (var i = 0u; i < params.iterations; i++) {
        c0 = coopMultiplyAdd(a, b, c0);
        c1 = coopMultiplyAdd(a, b, c1);
        c2 = coopMultiplyAdd(a, b, c2);
        c3 = coopMultiplyAdd(a, b, c3);
    }
    let base = sg * 4u * FRAG * FRAG;
    let i0 = base;
    let i1 = base + FRAG * FRAG;
    let i2 = base + 2u * FRAG * FRAG;
    let i3 = base + 3u * FRAG * FRAG;
    let stride = FRAG;
    coopStoreT(c0, &acc[i0], stride);
    coopStoreT(c1, &acc[i1], stride);
    coopStoreT(c2, &acc[i2], stride);
    coopStoreT(c3, &acc[i3], stride);
    workgroupBarrier();
    let s = acc[lid] + acc[lid + NT];
    if (s == -12345.0) {
        dst[lid % params.n4] = s;
    }
}
