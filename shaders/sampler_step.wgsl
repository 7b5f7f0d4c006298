// sampler_step: the scheduler's whole per-step update in one pass over the latents.
//
//   eps   = guided ? u + g * (c - u) : m     model_out = [u; c] ([2B, ...], uncond first) when
//                                            guided, m = model_out ([B, ...]) otherwise
//   out_a = sum_k a[k] * slot_k + a_model * eps
//   out_b = sum_k b[k] * slot_k + b_model * eps            (entry instantiated with HAS_B = true)
// Slots are up to 5 tensors shaped like out_a (latents, previous model outputs, noise, ...); a
// slot whose bit in `mask` is clear is not read (its binding holds a small dummy tensor). The mask
// and the coefficients are uniform, so the branches cost nothing. Arithmetic in f32.
//
// Bindings: 0 model_out, 1-5 slots (read), 6 out_a, 7 out_b (read_write), 8 params.
//           step4 views them as vec4 (used when 4 | n, so the cond half starts on a vector), step1
//           as scalars. out_a / out_b must be buffers of their own: binding a buffer read-only and
//           read-write in one dispatch is a wgpu validation error, so samplers ping-pong.
// Dispatch: one vec4 (or element) per thread, 256 per workgroup, folded over (x, y) by `grid_1d`.

struct Params {
    n: u32,          // vec4s (step4) or elements (step1) of out_a
    cond_offset: u32, // where the cond half starts in model_out (same unit); 0 when unguided
    mask: u32,       // bit k set: slot k is bound and read
    guided: u32,
    guidance: f32,
    a_model: f32,
    b_model: f32,
    _pad: f32,
    a: array<vec4<f32>, 2>, // a[0..5] in a[0].xyzw, a[1].x
    b: array<vec4<f32>, 2>,
};

override HAS_B: bool = false;

@group(0) @binding(0) var<storage, read> model4: array<elem4>;
@group(0) @binding(1) var<storage, read> s0_4: array<elem4>;
@group(0) @binding(2) var<storage, read> s1_4: array<elem4>;
@group(0) @binding(3) var<storage, read> s2_4: array<elem4>;
@group(0) @binding(4) var<storage, read> s3_4: array<elem4>;
@group(0) @binding(5) var<storage, read> s4_4: array<elem4>;
@group(0) @binding(6) var<storage, read_write> out_a4: array<elem4>;
@group(0) @binding(7) var<storage, read_write> out_b4: array<elem4>;

@group(0) @binding(0) var<storage, read> model1: array<elem>;
@group(0) @binding(1) var<storage, read> s0_1: array<elem>;
@group(0) @binding(2) var<storage, read> s1_1: array<elem>;
@group(0) @binding(3) var<storage, read> s2_1: array<elem>;
@group(0) @binding(4) var<storage, read> s3_1: array<elem>;
@group(0) @binding(5) var<storage, read> s4_1: array<elem>;
@group(0) @binding(6) var<storage, read_write> out_a1: array<elem>;
@group(0) @binding(7) var<storage, read_write> out_b1: array<elem>;

@group(0) @binding(8) var<uniform> params: Params;

fn coef_a(k: u32) -> f32 {
    return params.a[k / 4u][k % 4u];
}

fn coef_b(k: u32) -> f32 {
    return params.b[k / 4u][k % 4u];
}

fn has(k: u32) -> bool {
    return (params.mask & (1u << k)) != 0u;
}

@compute @workgroup_size(256)
fn step4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= params.n) {
        return;
    }
    var eps = vec4<f32>(model4[i]);
    if (params.guided != 0u) {
        eps += params.guidance * (vec4<f32>(model4[params.cond_offset + i]) - eps);
    }
    var acc_a = params.a_model * eps;
    var acc_b = params.b_model * eps;
    // Unrolled over the five slots: each is a separate binding.
    if (has(0u)) {
        let v = vec4<f32>(s0_4[i]);
        acc_a += coef_a(0u) * v;
        acc_b += coef_b(0u) * v;
    }
    if (has(1u)) {
        let v = vec4<f32>(s1_4[i]);
        acc_a += coef_a(1u) * v;
        acc_b += coef_b(1u) * v;
    }
    if (has(2u)) {
        let v = vec4<f32>(s2_4[i]);
        acc_a += coef_a(2u) * v;
        acc_b += coef_b(2u) * v;
    }
    if (has(3u)) {
        let v = vec4<f32>(s3_4[i]);
        acc_a += coef_a(3u) * v;
        acc_b += coef_b(3u) * v;
    }
    if (has(4u)) {
        let v = vec4<f32>(s4_4[i]);
        acc_a += coef_a(4u) * v;
        acc_b += coef_b(4u) * v;
    }
    out_a4[i] = elem4(acc_a);
    if (HAS_B) {
        out_b4[i] = elem4(acc_b);
    }
}

@compute @workgroup_size(256)
fn step1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= params.n) {
        return;
    }
    var eps = f32(model1[i]);
    if (params.guided != 0u) {
        eps += params.guidance * (f32(model1[params.cond_offset + i]) - eps);
    }
    var acc_a = params.a_model * eps;
    var acc_b = params.b_model * eps;
    if (has(0u)) {
        let v = f32(s0_1[i]);
        acc_a += coef_a(0u) * v;
        acc_b += coef_b(0u) * v;
    }
    if (has(1u)) {
        let v = f32(s1_1[i]);
        acc_a += coef_a(1u) * v;
        acc_b += coef_b(1u) * v;
    }
    if (has(2u)) {
        let v = f32(s2_1[i]);
        acc_a += coef_a(2u) * v;
        acc_b += coef_b(2u) * v;
    }
    if (has(3u)) {
        let v = f32(s3_1[i]);
        acc_a += coef_a(3u) * v;
        acc_b += coef_b(3u) * v;
    }
    if (has(4u)) {
        let v = f32(s4_1[i]);
        acc_a += coef_a(4u) * v;
        acc_b += coef_b(4u) * v;
    }
    out_a1[i] = elem(acc_a);
    if (HAS_B) {
        out_b1[i] = elem(acc_b);
    }
}
