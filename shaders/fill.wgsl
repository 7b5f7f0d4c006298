// fill: out[i] = value for i < n. Used to poison outputs with NaN in tests and to zero buffers.
//
// Bindings: 0 out (elem, read_write), 1 params (uniform).
// Dispatch: ceil(n / 256) workgroups folded over (x, y) by `grid_1d` (65,535 per dimension).

struct Params {
    n: u32,
    bits: u32,   // the value's f32 bit pattern (so NaN survives the uniform upload)
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<storage, read_write> out: array<elem>;
@group(0) @binding(1) var<uniform> params: Params;

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i < params.n) {
        out[i] = elem(bitcast<f32>(params.bits));
    }
}
