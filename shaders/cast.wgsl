// cast: storage dtype conversion, out[i] = T(a[i]) (the VAE may run in f32 while the U-Net runs in
// f16). Registered for the f16 prelude only: it names f16 and f32 explicitly and needs SHADER_F16.
// f32 -> f16 rounds as the GPU's OpFConvert does (round to nearest even on the drivers we test);
// values beyond the f16 range become +-inf as in torch's `.half()` on the GPUs we know, but WGSL
// leaves that case to the implementation.
//
// Bindings: 0 src (vec4 of the source type, read), 1 dst (vec4 of the target type, read_write),
//           2 params. The two entries view bindings 0 and 1 with different types.
// Dispatch: one vec4 per thread over ceil(n / 4) vectors (every buffer is a multiple of 256 bytes,
//           so the last vector stays inside the buffer), 256 per workgroup, folded by `grid_1d`.

struct Params {
    n: u32,   // vec4s to convert
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<storage, read> src32: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst16: array<vec4<f16>>;
@group(0) @binding(0) var<storage, read> src16: array<vec4<f16>>;
@group(0) @binding(1) var<storage, read_write> dst32: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> params: Params;

@compute @workgroup_size(256)
fn f32_to_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i < params.n) {
        dst16[i] = vec4<f16>(src32[i]);
    }
}

@compute @workgroup_size(256)
fn f16_to_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i < params.n) {
        dst32[i] = vec4<f32>(src16[i]);
    }
}
