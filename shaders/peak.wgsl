// peak: microbenchmarks that measure this device's arithmetic and memory peaks in the same run
// as the kernels, so benchmark lines can say "% of peak" honestly.
//
// fma_peak: every invocation runs `params.iterations` rounds of 8 independent vec4 FMA chains
//   (8 chains hide FMA latency; vec4 keeps the compiler from merging them). FLOPs counted:
//   invocations × iterations × 8 chains × 4 lanes × 2.
// copy: out[i] = in[i] over vec4 elements — achieved bandwidth = 2 × bytes / time.
//
// Bindings: 0 src (read), 1 dst (read_write), 2 params (uniform).
// Dispatch: fma_peak — any grid of 256-wide workgroups; copy — ceil(n4 / 256) folded by grid_1d.

struct Params {
    n4: u32,          // vec4 elements to copy
    iterations: u32,  // FMA rounds per invocation
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<storage, read> src: array<elem4>;
@group(0) @binding(1) var<storage, read_write> dst: array<elem4>;
@group(0) @binding(2) var<uniform> params: Params;

@compute @workgroup_size(256)
fn fma_peak(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let seed = f32(gid.x & 255u) * 1e-3;
    let m = elem4(elem(0.999), elem(0.998), elem(0.997), elem(0.996));
    let c = elem4(elem(1e-3));
    var a0 = elem4(elem(seed)); var a1 = a0 + elem4(elem(0.1)); var a2 = a0 + elem4(elem(0.2)); var a3 = a0 + elem4(elem(0.3));
    var a4 = a0 + elem4(elem(0.4)); var a5 = a0 + elem4(elem(0.5)); var a6 = a0 + elem4(elem(0.6)); var a7 = a0 + elem4(elem(0.7));
    for (var i = 0u; i < params.iterations; i++) {
        a0 = fma(a0, m, c); a1 = fma(a1, m, c); a2 = fma(a2, m, c); a3 = fma(a3, m, c);
        a4 = fma(a4, m, c); a5 = fma(a5, m, c); a6 = fma(a6, m, c); a7 = fma(a7, m, c);
    }
    let s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    // Written only when impossible in practice, so the store does not cost bandwidth but the
    // compiler cannot drop the chains.
    if (s.x == elem(-12345.0)) {
        dst[gid.x % params.n4] = s;
    }
}

@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i < params.n4) {
        dst[i] = src[i];
    }
}
