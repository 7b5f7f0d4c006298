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
//
// posterior_sample: the initial latents of img2img / inpainting from the VAE encoder's moments,
// diffusers' `DiagonalGaussianDistribution(moments).sample(generator)` followed by the pipeline's
// `(z - shift_factor) * scaling_factor` (shift 0 for SD 1.x / 2.x):
//   mean = moments[.., :L], logvar = clamp(moments[.., L:], -30, 20)   (chunk along channels)
//   out  = (mean + exp(0.5 * logvar) * eps - shift) * scale
// moments [Bm, h, w, 2L] in the VAE's dtype (`elem`); eps and out [B, h, w, L] in f32 whatever the
// dtype, because the sampler keeps its latents in f32 (and the noise is drawn in f32). B is a
// multiple of Bm: item b reads moments item b % Bm, which is torch.cat([latents] * k) — diffusers
// encodes one init image and repeats it over the batch, each copy with its own noise.
// Bindings: 0 moments (read), 1 eps (read), 2 out (read_write), 8 post (PosteriorParams). These
//           alias the step bindings above; each entry point binds only what it uses.
// Dispatch: one element per thread (the latents are ~16K values per image: not worth vec4 paths),
//           256 per workgroup, folded by `grid_1d`.

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

struct PosteriorParams {
    n: u32,              // elements of out (B * h * w * L)
    latent_channels: u32, // L
    moment_pixels: u32,  // Bm * h * w
    _pad: u32,
    scale: f32,          // the VAE's scaling_factor
    shift: f32,          // the VAE's shift_factor (0 when absent)
};

@group(0) @binding(0) var<storage, read> post_moments: array<elem>;
@group(0) @binding(1) var<storage, read> post_eps: array<f32>;
@group(0) @binding(2) var<storage, read_write> post_out: array<f32>;
@group(0) @binding(8) var<uniform> post: PosteriorParams;

@compute @workgroup_size(256)
fn posterior_sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= post.n) {
        return;
    }
    let l = post.latent_channels;
    let pixel = i / l; // b * h * w + y * w + x
    let c = i - pixel * l;
    // (b * hw + p) % (Bm * hw) = (b % Bm) * hw + p: the batch repetition in one modulo.
    let m = (pixel % post.moment_pixels) * 2u * l + c;
    let mean = f32(post_moments[m]);
    // The clamp keeps exp finite for a degenerate encoder output, as diffusers does.
    let logvar = clamp(f32(post_moments[m + l]), -30.0, 20.0);
    let z = mean + exp(0.5 * logvar) * post_eps[i];
    post_out[i] = (z - post.shift) * post.scale;
}
