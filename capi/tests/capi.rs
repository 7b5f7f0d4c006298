//! The C API through its `extern "C"` functions, as a C program calls them, on the shipped tiny
//! model: concurrent generations on two handles, cancellation during the first step and during
//! the decode, unload/reload returning the pool to its baseline, and every null or invalid
//! argument giving an error status (never a crash).

use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU32, Ordering};

use ldm::ldm_status::*;
use ldm::*;

fn model_path() -> CString {
    let dir = ldm_wgpu::pipeline::default_model_dir();
    CString::new(dir.to_str().unwrap()).unwrap()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(ldm_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[track_caller]
fn ok(status: ldm_status) {
    assert_eq!(status, LDM_OK, "{}", last_error());
}

fn engine() -> *mut ldm_engine {
    let mut options = unsafe { std::mem::zeroed::<ldm_engine_options>() };
    unsafe {
        ok(ldm_engine_options_default(&mut options));
        // The tests honour LDM_ADAPTER and the kernel switches as the other suites do.
        options.use_env = 1;
        let mut e = null_mut();
        ok(ldm_engine_new(&options, &mut e));
        e
    }
}

fn load(engine: *mut ldm_engine) -> *mut ldm_model {
    let path = model_path();
    let mut m = null_mut();
    unsafe { ok(ldm_model_load(engine, path.as_ptr(), null(), &mut m)) };
    m
}

struct Prompt(CString);

impl Prompt {
    fn new(text: &str) -> Prompt {
        Prompt(CString::new(text).unwrap())
    }
    /// A small request: 4 steps at the model's native 64×64.
    fn request(&self, seed: u64) -> ldm_request {
        let mut r = unsafe { std::mem::zeroed::<ldm_request>() };
        unsafe { ok(ldm_request_default(&mut r)) };
        r.prompt = self.0.as_ptr();
        r.steps = 4;
        r.seed = seed;
        r
    }
}

fn pixels(result: *mut ldm_result) -> Vec<u8> {
    let mut image = ldm_image {
        width: 0,
        height: 0,
        rgb: null(),
    };
    unsafe { ok(ldm_result_image(result, 0, &mut image)) };
    let n = (image.width * image.height * 3) as usize;
    unsafe { std::slice::from_raw_parts(image.rgb, n) }.to_vec()
}

fn generate(model: *mut ldm_model, req: &ldm_request) -> Vec<u8> {
    let mut result = null_mut();
    unsafe { ok(ldm_generate(model, req, &mut result)) };
    let px = pixels(result);
    ok(ldm_result_free(result));
    px
}

#[test]
fn same_image_as_the_rust_api_and_metadata() {
    let e = engine();
    let m = load(e);
    let p = Prompt::new("a blue circle on a yellow background");
    let req = p.request(42);
    let mut result = null_mut();
    unsafe { ok(ldm_generate(m, &req, &mut result)) };
    let mut count = 0;
    unsafe { ok(ldm_result_count(result, &mut count)) };
    assert_eq!(count, 1);
    let mut seed = 0;
    let mut text = null();
    unsafe { ok(ldm_result_info(result, 0, &mut seed, &mut text)) };
    let text = unsafe { CStr::from_ptr(text) }
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(seed, 42);
    assert!(
        text.starts_with("a blue circle on a yellow background\nSteps: 4, Sampler: DDIM"),
        "{text}"
    );
    assert!(
        text.contains("Seed: 42, Size: 64x64, Model: tiny-shapes"),
        "{text}"
    );

    // The Rust API with the same settings on its own engine gives the same pixels.
    let gpu = ldm_wgpu::Gpu::new(&ldm_wgpu::GpuOptions::from_env().unwrap()).unwrap();
    let sd = ldm_wgpu::pipeline::StableDiffusion::load(
        gpu,
        &ldm_wgpu::pipeline::default_model_dir(),
        &ldm_wgpu::pipeline::ModelOptions {
            with_encoder: true,
            ..Default::default()
        },
    )
    .unwrap();
    let rust_req = ldm_wgpu::pipeline::GenerateRequest {
        prompt: "a blue circle on a yellow background".into(),
        width: 64,
        height: 64,
        steps: 4,
        seed: 42,
        ..Default::default()
    };
    let out = sd.generate(&rust_req, &mut |_| true).unwrap();
    assert_eq!(pixels(result), out.images[0].rgb);

    // The PNG helper writes the pixels and the parameters text.
    let dir = std::env::temp_dir().join(format!("ldm-capi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("out.png");
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    unsafe { ok(ldm_result_save_png(result, 0, cpath.as_ptr())) };
    let back = ldm_wgpu::image::Image::load_png(&path).unwrap();
    assert_eq!(back.rgb, out.images[0].rgb);
    let bytes = std::fs::read(&path).unwrap();
    let needle = b"parameters";
    assert!(bytes.windows(needle.len()).any(|w| w == needle));
    std::fs::remove_dir_all(&dir).ok();

    // Inpainting (the init image, a mask over its left half, strength 0.5) with a sampler by
    // A1111 name, a negative prompt and a batch of two: the same pixels as the Rust API again.
    let init = out.images[0].clone();
    let mask_rgb: Vec<u8> = (0..64 * 64)
        .flat_map(|i| if i % 64 < 32 { [255u8; 3] } else { [0u8; 3] })
        .collect();
    let as_c = |rgb: &[u8]| ldm_image {
        width: 64,
        height: 64,
        rgb: rgb.as_ptr(),
    };
    let (c_init, c_mask) = (as_c(&init.rgb), as_c(&mask_rgb));
    let negative = CString::new("red").unwrap();
    let mut req = p.request(7);
    req.init_image = &c_init;
    req.mask = &c_mask;
    req.strength = 0.5;
    req.sampler = c"Euler a".as_ptr();
    req.negative_prompt = negative.as_ptr();
    req.batch = 2;
    let mut inpainted = null_mut();
    unsafe { ok(ldm_generate(m, &req, &mut inpainted)) };
    let rust_req = ldm_wgpu::pipeline::GenerateRequest {
        negative_prompt: "red".into(),
        seed: 7,
        init_image: Some(init),
        mask: Some(ldm_wgpu::image::Image {
            width: 64,
            height: 64,
            rgb: mask_rgb.clone(),
        }),
        strength: 0.5,
        sampler: Some("euler_a".parse().unwrap()),
        batch_size: 2,
        ..rust_req
    };
    let expected = sd.generate(&rust_req, &mut |_| true).unwrap();
    let mut count = 0;
    unsafe { ok(ldm_result_count(inpainted, &mut count)) };
    assert_eq!(count, 2);
    for i in 0..2 {
        let mut image = ldm_image {
            width: 0,
            height: 0,
            rgb: null(),
        };
        unsafe { ok(ldm_result_image(inpainted, i, &mut image)) };
        let got = unsafe { std::slice::from_raw_parts(image.rgb, 64 * 64 * 3) };
        assert_eq!(got, &expected.images[i as usize].rgb[..], "image {i}");
    }
    let mut text = null();
    unsafe { ok(ldm_result_info(inpainted, 1, null_mut(), &mut text)) };
    let text = unsafe { CStr::from_ptr(text) }.to_str().unwrap();
    assert!(
        text.contains("Negative prompt: red\nSteps: 4, Sampler: Euler a"),
        "{text}"
    );
    assert!(text.contains("Batch size: 2, Batch pos: 1"), "{text}");
    assert!(text.contains("Denoising strength: 0.5"), "{text}");
    ok(ldm_result_free(inpainted));

    ok(ldm_result_free(result));
    ok(ldm_model_free(m));
    ok(ldm_engine_free(e));
}

#[test]
fn concurrent_generations_on_two_models() {
    let e = engine();
    let (a, b) = (load(e), load(e));
    let p = Prompt::new("a red square on the left on a white background");
    let q = Prompt::new("a small green triangle at the top");
    // One after another first, then both at once from two threads: the same images.
    let (seq_a, seq_b) = (generate(a, &p.request(1)), generate(b, &q.request(2)));
    let (ra, rb) = (p.request(1), q.request(2));
    let (a_addr, b_addr) = (a as usize, b as usize);
    let (ra_addr, rb_addr) = (&ra as *const ldm_request as usize, &rb as *const _ as usize);
    let (par_a, par_b) = std::thread::scope(|s| {
        let ta = s.spawn(move || {
            generate(a_addr as *mut ldm_model, unsafe {
                &*(ra_addr as *const ldm_request)
            })
        });
        let tb = s.spawn(move || {
            generate(b_addr as *mut ldm_model, unsafe {
                &*(rb_addr as *const ldm_request)
            })
        });
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(par_a, seq_a);
    assert_eq!(par_b, seq_b);
    assert_ne!(seq_a, seq_b);

    // Two async jobs at once on the two models.
    let (mut ja, mut jb) = (null_mut(), null_mut());
    unsafe {
        ok(ldm_generate_async(a, &ra, &mut ja));
        ok(ldm_generate_async(b, &rb, &mut jb));
        let (mut xa, mut xb) = (null_mut(), null_mut());
        ok(ldm_job_wait(ja, &mut xa));
        ok(ldm_job_wait(jb, &mut xb));
        assert_eq!(ldm_job_poll(ja), LDM_OK);
        assert_eq!(pixels(xa), seq_a);
        assert_eq!(pixels(xb), seq_b);
        // The images were handed out once.
        let mut again = null_mut();
        assert_eq!(ldm_job_wait(ja, &mut again), LDM_ERR_INVALID_ARGUMENT);
        assert!(again.is_null());
        for r in [xa, xb] {
            ok(ldm_result_free(r));
        }
    }
    for j in [ja, jb] {
        ok(ldm_job_free(j));
    }
    for m in [a, b] {
        ok(ldm_model_free(m));
    }
    ok(ldm_engine_free(e));
}

/// Cancels its own job (the `ldm_job` token in user data) when the step it is told is reached.
struct CancelAt {
    job: AtomicU32,
    at_step: u32,
    steps_seen: AtomicU32,
    job_token: std::sync::atomic::AtomicUsize,
}

unsafe extern "C" fn cancel_at(p: *const ldm_progress, user: *mut c_void) -> i32 {
    let c = &*(user as *const CancelAt);
    let p = &*p;
    c.steps_seen.store(p.step, Ordering::SeqCst);
    if p.step == c.at_step {
        // The job's token is stored once ldm_generate_async has returned it.
        while c.job_token.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // As a UI thread would: through ldm_cancel on the job (safe from any thread).
        let job = c.job_token.load(Ordering::SeqCst) as *mut ldm_job;
        c.job.store(ldm_cancel(job) as i32 as u32, Ordering::SeqCst);
    }
    1
}

#[test]
fn cancel_before_the_first_step_ends_and_during_the_decode() {
    let e = engine();
    let m = load(e);
    let p = Prompt::new("a purple circle");
    // Cancelled at once: the job stops by the end of the first step at the latest.
    let state = CancelAt {
        job: AtomicU32::new(0),
        at_step: u32::MAX,
        steps_seen: AtomicU32::new(0),
        job_token: Default::default(),
    };
    let mut req = p.request(5);
    req.steps = 20;
    req.progress = Some(cancel_at);
    req.user_data = &state as *const CancelAt as *mut c_void;
    let mut job = null_mut();
    unsafe {
        ok(ldm_generate_async(m, &req, &mut job));
        ok(ldm_cancel(job));
        let mut result = null_mut();
        assert_eq!(ldm_job_wait(job, &mut result), LDM_ERR_CANCELLED);
        assert!(result.is_null());
        assert!(last_error().contains("cancelled"), "{}", last_error());
        assert_eq!(ldm_job_poll(job), LDM_ERR_CANCELLED);
        ok(ldm_cancel(job)); // after the end: harmless
    }
    assert!(state.steps_seen.load(Ordering::SeqCst) <= 1);
    ok(ldm_job_free(job));

    // Cancelled from the callback of the last step: the call comes while the images decode
    // (the job checked the flag before calling back); they are discarded.
    let state = CancelAt {
        job: AtomicU32::new(1),
        at_step: 4,
        steps_seen: AtomicU32::new(0),
        job_token: Default::default(),
    };
    let mut req = p.request(5);
    req.progress = Some(cancel_at);
    req.user_data = &state as *const CancelAt as *mut c_void;
    let mut job = null_mut();
    unsafe {
        ok(ldm_generate_async(m, &req, &mut job));
        state.job_token.store(job as usize, Ordering::SeqCst);
        let mut result = null_mut();
        assert_eq!(ldm_job_wait(job, &mut result), LDM_ERR_CANCELLED);
        assert!(result.is_null());
    }
    assert_eq!(state.steps_seen.load(Ordering::SeqCst), 4);
    assert_eq!(state.job.load(Ordering::SeqCst), LDM_OK as i32 as u32);
    ok(ldm_job_free(job));

    // A callback returning 0 cancels too, after its step.
    unsafe extern "C" fn stop(_: *const ldm_progress, user: *mut c_void) -> i32 {
        (*(user as *const AtomicU32)).fetch_add(1, Ordering::SeqCst);
        0
    }
    let calls = AtomicU32::new(0);
    let mut req = p.request(5);
    req.progress = Some(stop);
    req.user_data = &calls as *const AtomicU32 as *mut c_void;
    let mut result = null_mut();
    unsafe { assert_eq!(ldm_generate(m, &req, &mut result), LDM_ERR_CANCELLED) };
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The model still works after cancellations.
    generate(m, &p.request(5));
    ok(ldm_model_free(m));
    ok(ldm_engine_free(e));
}

#[test]
fn unload_and_reload_give_the_memory_back() {
    let e = engine();
    let m = load(e);
    let mem = |m| {
        let mut x = ldm_memory::default();
        unsafe { ok(ldm_model_memory(m, &mut x)) };
        x
    };
    let weights = mem(m);
    assert!(weights.live_bytes > 0);
    let p = Prompt::new("an orange circle");
    let first = generate(m, &p.request(3));
    ok(ldm_model_trim(m));
    // After a generation and a trim the pool holds the weights again, nothing more.
    assert_eq!(mem(m).live_bytes, weights.live_bytes);
    assert_eq!(mem(m).pooled_bytes, 0);
    for _ in 0..3 {
        ok(ldm_model_unload(m));
        ok(ldm_model_unload(m)); // twice: nothing to do
        assert_eq!(mem(m), ldm_memory::default());
        let mut engine_mem = ldm_memory::default();
        unsafe { ok(ldm_engine_memory(e, &mut engine_mem)) };
        assert_eq!(engine_mem.live_bytes + engine_mem.pooled_bytes, 0);
        let mut result = null_mut();
        unsafe {
            assert_eq!(
                ldm_generate(m, &p.request(3), &mut result),
                LDM_ERR_UNLOADED
            )
        };
        assert!(last_error().contains("unloaded"));
        ok(ldm_model_reload(m));
        assert_eq!(mem(m).live_bytes, weights.live_bytes);
        assert_eq!(generate(m, &p.request(3)), first);
        ok(ldm_model_trim(m));
        assert_eq!(mem(m).live_bytes, weights.live_bytes);
        assert_eq!(mem(m).pooled_bytes, 0);
    }
    ok(ldm_model_free(m));
    ok(ldm_engine_free(e));
}

fn budget_engine(budget: u64) -> *mut ldm_engine {
    let mut options = unsafe { std::mem::zeroed::<ldm_engine_options>() };
    unsafe { ok(ldm_engine_options_default(&mut options)) };
    options.use_env = 1;
    options.memory_budget = budget;
    let mut e = null_mut();
    unsafe { ok(ldm_engine_new(&options, &mut e)) };
    e
}

#[test]
fn memory_budget_refuses_loads_and_requests_that_cannot_fit() {
    let path = model_path();
    // Far less than the tiny model's weights: the load is refused.
    let e = budget_engine(64 * 1024);
    let mut m = null_mut();
    let status = unsafe { ldm_model_load(e, path.as_ptr(), null(), &mut m) };
    assert_eq!(status, LDM_ERR_MEMORY, "{}", last_error());
    assert!(m.is_null());
    assert!(last_error().contains("budget"), "{}", last_error());
    ok(ldm_engine_free(e));

    // What loading takes, measured without a budget; a budget of that plus 16 KiB lets the
    // model load, but not generate (the VAE decode alone needs more), nor a second model load.
    let free = engine();
    let probe = load(free);
    let mut loaded = ldm_memory::default();
    unsafe { ok(ldm_model_memory(probe, &mut loaded)) };
    ok(ldm_model_free(probe));
    ok(ldm_engine_free(free));
    let e = budget_engine(loaded.peak_bytes + 16 * 1024);
    let m = load(e);
    let p = Prompt::new("a green square");
    let mut result = null_mut();
    let status = unsafe { ldm_generate(m, &p.request(1), &mut result) };
    assert_eq!(status, LDM_ERR_MEMORY, "{}", last_error());
    assert!(result.is_null());
    assert!(last_error().contains("hint:"), "{}", last_error());
    let mut second = null_mut();
    let status = unsafe { ldm_model_load(e, path.as_ptr(), null(), &mut second) };
    assert_eq!(status, LDM_ERR_MEMORY, "{}", last_error());
    let mut mem = ldm_memory::default();
    unsafe { ok(ldm_engine_memory(e, &mut mem)) };
    assert!(
        mem.live_bytes + mem.pooled_bytes <= mem.budget_bytes,
        "{mem:?}"
    );
    // Unloading the first makes room for the second.
    ok(ldm_model_unload(m));
    unsafe { ok(ldm_model_load(e, path.as_ptr(), null(), &mut second)) };
    for h in [m, second] {
        ok(ldm_model_free(h));
    }
    ok(ldm_engine_free(e));
}

/// One way to spoil a good request.
type RequestChange = Box<dyn Fn(&mut ldm_request)>;

/// A C string that is not UTF-8.
const NOT_UTF8: &[u8] = b"\xff\xfe\0";

#[test]
fn null_and_invalid_arguments_are_errors() {
    unsafe {
        assert!(!CStr::from_ptr(ldm_version()).to_str().unwrap().is_empty());
        assert_eq!(ldm_abi_version(), LDM_ABI_VERSION);
        let bogus_engine = 0xdead_bee0usize as *mut ldm_engine;
        let bogus_model = 0xdead_bee0usize as *mut ldm_model;
        let bogus_job = 0xdead_bee0usize as *mut ldm_job;
        let bogus_result = 0xdead_bee0usize as *mut ldm_result;
        let mut m = null_mut();
        let mut j = null_mut();
        let mut r = null_mut();
        let mut mem = ldm_memory::default();
        let path = model_path();

        assert_eq!(
            ldm_engine_options_default(null_mut()),
            LDM_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            ldm_model_options_default(null_mut()),
            LDM_ERR_INVALID_ARGUMENT
        );
        assert_eq!(ldm_request_default(null_mut()), LDM_ERR_INVALID_ARGUMENT);
        assert_eq!(ldm_engine_new(null(), null_mut()), LDM_ERR_INVALID_ARGUMENT);
        assert_eq!(ldm_engine_free(null_mut()), LDM_ERR_INVALID_HANDLE);
        assert_eq!(ldm_engine_free(bogus_engine), LDM_ERR_INVALID_HANDLE);
        assert!(last_error().contains("not a live engine handle"));
        assert_eq!(
            ldm_engine_memory(bogus_engine, &mut mem),
            LDM_ERR_INVALID_HANDLE
        );
        let mut name = null();
        assert_eq!(
            ldm_engine_adapter(null_mut(), &mut name),
            LDM_ERR_INVALID_HANDLE
        );
        let mut bad_adapter = std::mem::zeroed::<ldm_engine_options>();
        ok(ldm_engine_options_default(&mut bad_adapter));
        let nope = CString::new("no such adapter 12345").unwrap();
        bad_adapter.adapter = nope.as_ptr();
        let mut e = null_mut();
        assert_eq!(ldm_engine_new(&bad_adapter, &mut e), LDM_ERR_ADAPTER);
        assert!(e.is_null());
        assert!(last_error().contains("hint:"), "{}", last_error());

        assert_eq!(
            ldm_model_load(bogus_engine, path.as_ptr(), null(), &mut m),
            LDM_ERR_INVALID_HANDLE
        );
        let e = engine();
        let mut name = null();
        ok(ldm_engine_adapter(e, &mut name));
        assert!(!CStr::from_ptr(name).to_str().unwrap().is_empty());
        assert_eq!(ldm_engine_adapter(e, null_mut()), LDM_ERR_INVALID_ARGUMENT);
        assert_eq!(
            ldm_model_load(e, null(), null(), &mut m),
            LDM_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            ldm_model_load(e, path.as_ptr(), null(), null_mut()),
            LDM_ERR_INVALID_ARGUMENT
        );
        let missing = CString::new("/nonexistent/model").unwrap();
        assert_eq!(
            ldm_model_load(e, missing.as_ptr(), null(), &mut m),
            LDM_ERR_MODEL
        );
        assert!(m.is_null());
        assert!(
            last_error().contains("/nonexistent/model"),
            "{}",
            last_error()
        );
        assert_eq!(
            ldm_model_load(e, NOT_UTF8.as_ptr().cast(), null(), &mut m),
            LDM_ERR_INVALID_ARGUMENT
        );
        let mut mo = std::mem::zeroed::<ldm_model_options>();
        ok(ldm_model_options_default(&mut mo));
        mo.dtype_bits = 8;
        assert_eq!(
            ldm_model_load(e, path.as_ptr(), &mo, &mut m),
            LDM_ERR_INVALID_ARGUMENT
        );
        // A model handle is not an engine handle.
        let model = load(e);
        assert_eq!(
            ldm_engine_free(model as *mut ldm_engine),
            LDM_ERR_INVALID_HANDLE
        );

        for f in [
            ldm_model_unload,
            ldm_model_reload,
            ldm_model_trim,
            ldm_model_free,
        ] {
            assert_eq!(f(null_mut()), LDM_ERR_INVALID_HANDLE);
            assert_eq!(f(bogus_model), LDM_ERR_INVALID_HANDLE);
        }
        assert_eq!(
            ldm_model_memory(model, null_mut()),
            LDM_ERR_INVALID_ARGUMENT
        );
        let (mut w, mut h) = (0, 0);
        ok(ldm_model_native_size(model, &mut w, &mut h));
        assert_eq!((w, h), (64, 64));
        assert_eq!(
            ldm_model_native_size(model, null_mut(), &mut h),
            LDM_ERR_INVALID_ARGUMENT
        );

        // Requests.
        let p = Prompt::new("a white circle");
        let good = p.request(0);
        assert_eq!(
            ldm_generate(model, null(), &mut r),
            LDM_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            ldm_generate(model, &good, null_mut()),
            LDM_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            ldm_generate(null_mut(), &good, &mut r),
            LDM_ERR_INVALID_HANDLE
        );
        assert_eq!(
            ldm_generate_async(bogus_model, &good, &mut j),
            LDM_ERR_INVALID_HANDLE
        );
        assert_eq!(
            ldm_generate_async(model, &good, null_mut()),
            LDM_ERR_INVALID_ARGUMENT
        );
        let bad_requests: Vec<(&str, RequestChange)> = vec![
            ("no prompt", Box::new(|q| q.prompt = null())),
            ("width 7", Box::new(|q| q.width = 7)),
            ("0 steps", Box::new(|q| q.steps = 0)),
            ("0 images", Box::new(|q| q.batch = 0)),
            ("strength 2", Box::new(|q| q.strength = 2.0)),
            ("NaN guidance", Box::new(|q| q.guidance = f64::NAN)),
            (
                "sampler",
                Box::new(|q| q.sampler = c"no-such-sampler".as_ptr()),
            ),
            (
                "embeddings",
                Box::new(|q| q.embeddings_dir = c"/dev/null/embeddings".as_ptr()),
            ),
            (
                "prompt not UTF-8",
                Box::new(|q| q.prompt = NOT_UTF8.as_ptr().cast()),
            ),
        ];
        let no_pixels = ldm_image {
            width: 64,
            height: 64,
            rgb: null(),
        };
        let small = [0u8; 8 * 8 * 3];
        let small_img = ldm_image {
            width: 8,
            height: 8,
            rgb: small.as_ptr(),
        };
        for (what, change) in &bad_requests {
            let mut q = p.request(0);
            change(&mut q);
            let status = ldm_generate(model, &q, &mut r);
            let s2 = ldm_generate_async(model, &q, &mut j);
            assert!(
                status == LDM_ERR_INVALID_ARGUMENT && s2 == LDM_ERR_INVALID_ARGUMENT,
                "{what}: {status:?} {s2:?}: {}",
                last_error()
            );
            assert!(r.is_null() && j.is_null(), "{what}");
        }
        let mut q = p.request(0);
        q.init_image = &no_pixels;
        assert_eq!(ldm_generate(model, &q, &mut r), LDM_ERR_INVALID_ARGUMENT);
        q.init_image = &small_img;
        q.width = 64; // the image is 8×8
        assert_eq!(ldm_generate(model, &q, &mut r), LDM_ERR_INVALID_ARGUMENT);
        q.init_image = null();
        q.mask = &small_img;
        assert_eq!(ldm_generate(model, &q, &mut r), LDM_ERR_INVALID_ARGUMENT);

        // Jobs and results.
        for f in [ldm_cancel, ldm_job_poll, ldm_job_free] {
            assert_eq!(f(null_mut()), LDM_ERR_INVALID_HANDLE);
            assert_eq!(f(bogus_job), LDM_ERR_INVALID_HANDLE);
        }
        assert_eq!(ldm_job_wait(bogus_job, &mut r), LDM_ERR_INVALID_HANDLE);
        let mut count = 0;
        let mut img = ldm_image {
            width: 0,
            height: 0,
            rgb: null(),
        };
        assert_eq!(
            ldm_result_count(bogus_result, &mut count),
            LDM_ERR_INVALID_HANDLE
        );
        assert_eq!(
            ldm_result_image(null_mut(), 0, &mut img),
            LDM_ERR_INVALID_HANDLE
        );
        assert_eq!(ldm_result_free(bogus_result), LDM_ERR_INVALID_HANDLE);
        ok(ldm_generate(model, &good, &mut r));
        assert_eq!(ldm_result_count(r, null_mut()), LDM_ERR_INVALID_ARGUMENT);
        assert_eq!(ldm_result_image(r, 1, &mut img), LDM_ERR_INVALID_ARGUMENT);
        assert_eq!(ldm_result_image(r, 0, null_mut()), LDM_ERR_INVALID_ARGUMENT);
        assert_eq!(
            ldm_result_info(r, 7, null_mut(), null_mut()),
            LDM_ERR_INVALID_ARGUMENT
        );
        ok(ldm_result_info(r, 0, null_mut(), null_mut()));
        assert_eq!(ldm_result_save_png(r, 0, null()), LDM_ERR_INVALID_ARGUMENT);
        // Under a file, so no directory can be made for it.
        let unwritable = CString::new("/dev/null/out.png").unwrap();
        assert_eq!(ldm_result_save_png(r, 0, unwritable.as_ptr()), LDM_ERR_IO);
        // A result handle is not a job handle.
        assert_eq!(ldm_cancel(r as *mut ldm_job), LDM_ERR_INVALID_HANDLE);
        ok(ldm_result_free(r));
        assert_eq!(ldm_result_free(r), LDM_ERR_INVALID_HANDLE); // double free: an error
        assert_eq!(ldm_result_count(r, &mut count), LDM_ERR_INVALID_HANDLE);

        // Freeing the engine first leaves its model working.
        ok(ldm_engine_free(e));
        assert_eq!(ldm_engine_free(e), LDM_ERR_INVALID_HANDLE);
        ok(ldm_generate(model, &good, &mut r));
        ok(ldm_result_free(r));
        ok(ldm_model_free(model));
        assert_eq!(ldm_model_free(model), LDM_ERR_INVALID_HANDLE);
        assert_eq!(ldm_generate(model, &good, &mut r), LDM_ERR_INVALID_HANDLE);
    }
}

/// A kohya LoRA for the shipped model (a U-Net attention projection, a resnet conv as LoCon, a
/// text-encoder projection) with deterministic values, written to `dir/style.safetensors`.
fn write_lora(dir: &std::path::Path) -> std::path::PathBuf {
    use safetensors::tensor::{Dtype, TensorView};
    let tensors: [(&str, Vec<usize>); 9] = [
        (
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
            vec![4, 128],
        ),
        (
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
            vec![128, 4],
        ),
        (
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
            vec![],
        ),
        (
            "lora_unet_mid_block_resnets_0_conv1.lora_down.weight",
            vec![4, 128, 3, 3],
        ),
        (
            "lora_unet_mid_block_resnets_0_conv1.lora_up.weight",
            vec![128, 4, 1, 1],
        ),
        ("lora_unet_mid_block_resnets_0_conv1.alpha", vec![]),
        (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            vec![4, 128],
        ),
        (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
            vec![128, 4],
        ),
        (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
            vec![],
        ),
    ];
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            let mut state = k
                .bytes()
                .fold(0x9e37_79b9u32, |h, b| h.wrapping_mul(31) ^ b as u32);
            let bytes = if k.ends_with(".alpha") {
                4.0f32.to_le_bytes().to_vec()
            } else {
                (0..n)
                    .flat_map(|_| {
                        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5).to_le_bytes()
                    })
                    .collect()
            };
            (k.to_string(), shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let path = dir.join("style.safetensors");
    safetensors::tensor::serialize_to_file(views, None, &path).unwrap();
    path
}

/// LoRAs through the request: a file with a weight gives the Rust API's pixels with the same
/// LoRA, a `<lora:style:0.8>` tag found in `lora_dir` the same as the file at 0.8, the
/// `parameters` text records the tag and the hash, and a request without LoRAs gives the base
/// model's pixels again (the merge is undone exactly). Missing files and bad weights are errors.
#[test]
fn loras_in_the_request() {
    let dir = std::env::temp_dir().join(format!("ldm-capi-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = write_lora(&dir);
    let c_file = CString::new(file.to_str().unwrap()).unwrap();
    let c_dir = CString::new(dir.to_str().unwrap()).unwrap();
    let e = engine();
    let m = load(e);
    let p = Prompt::new("a red square on a blue background");
    let base = generate(m, &p.request(3));

    let lora = ldm_lora {
        path: c_file.as_ptr(),
        weight: 0.8,
    };
    let mut req = p.request(3);
    req.loras = &lora;
    req.lora_count = 1;
    let mut result = null_mut();
    unsafe { ok(ldm_generate(m, &req, &mut result)) };
    let with_file = pixels(result);
    let mut text = null();
    unsafe { ok(ldm_result_info(result, 0, null_mut(), &mut text)) };
    let text = unsafe { CStr::from_ptr(text) }
        .to_str()
        .unwrap()
        .to_string();
    ok(ldm_result_free(result));
    assert_ne!(with_file, base, "the LoRA changed nothing");
    assert!(
        text.starts_with("a red square on a blue background <lora:style:0.8>\n"),
        "{text}"
    );
    assert!(text.contains("Lora hashes: \"style: "), "{text}");

    // The Rust API with the same LoRA on its own engine.
    let gpu = ldm_wgpu::Gpu::new(&ldm_wgpu::GpuOptions::from_env().unwrap()).unwrap();
    let sd = ldm_wgpu::pipeline::StableDiffusion::load(
        gpu,
        &ldm_wgpu::pipeline::default_model_dir(),
        &Default::default(),
    )
    .unwrap();
    let spec = ldm_wgpu::lora::LoraSpec::new(sd.open_lora(&file).unwrap(), 0.8);
    sd.set_loras(&[spec]).unwrap();
    let rust_req = ldm_wgpu::pipeline::GenerateRequest {
        prompt: "a red square on a blue background".into(),
        width: 64,
        height: 64,
        steps: 4,
        seed: 3,
        ..Default::default()
    };
    let out = sd.generate(&rust_req, &mut |_| true).unwrap();
    assert_eq!(with_file, out.images[0].rgb);

    // The same LoRA as a prompt tag.
    let tagged = Prompt::new("a red square on a blue background <lora:style:0.8>");
    let mut req = tagged.request(3);
    req.lora_dir = c_dir.as_ptr();
    assert_eq!(generate(m, &req), with_file);

    // No LoRA: the base model, bit for bit.
    assert_eq!(generate(m, &p.request(3)), base);

    // Errors: a missing file, a weight that is not finite, a tag whose file is not there.
    let missing = CString::new(dir.join("nope.safetensors").to_str().unwrap()).unwrap();
    for (path, weight, want) in [
        (missing.as_ptr(), 1.0, "no file"),
        (c_file.as_ptr(), f32::NAN, "not a finite number"),
    ] {
        let bad = ldm_lora { path, weight };
        let mut req = p.request(3);
        req.loras = &bad;
        req.lora_count = 1;
        let mut result = null_mut();
        assert_eq!(
            unsafe { ldm_generate(m, &req, &mut result) },
            LDM_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains(want), "{}", last_error());
    }
    let untagged = Prompt::new("x <lora:absent:1>");
    let mut req = untagged.request(3);
    req.lora_dir = c_dir.as_ptr();
    let mut result = null_mut();
    assert_ne!(unsafe { ldm_generate(m, &req, &mut result) }, LDM_OK);
    assert!(last_error().contains("absent"), "{}", last_error());
    let mut req = p.request(3);
    req.lora_count = 2;
    assert_eq!(
        unsafe { ldm_generate(m, &req, &mut result) },
        LDM_ERR_INVALID_ARGUMENT
    );

    ok(ldm_model_free(m));
    ok(ldm_engine_free(e));
    std::fs::remove_dir_all(&dir).ok();
}

/// `prompt_2` / `negative_prompt_2` (ABI 3) reach SDXL's second text encoder: the tiny SDXL
/// fixture folder through the C API gives the Rust pipeline's image for the same request, and
/// the fields make a difference.
#[test]
fn sdxl_second_prompts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sdxl/model");
    let path = CString::new(dir.to_str().unwrap()).unwrap();
    let e = engine();
    let mut options = unsafe { std::mem::zeroed::<ldm_model_options>() };
    let mut m = null_mut();
    unsafe {
        ok(ldm_model_options_default(&mut options));
        options.dtype_bits = 32;
        ok(ldm_model_load(e, path.as_ptr(), &options, &mut m));
    }
    let prompt = Prompt::new("a red circle");
    let (negative, prompt_2, negative_2) = (
        CString::new("blurry").unwrap(),
        CString::new("a green square").unwrap(),
        CString::new("ugly").unwrap(),
    );
    let mut req = prompt.request(42);
    req.steps = 6;
    req.guidance = 5.0;
    req.sampler = c"euler".as_ptr();
    req.negative_prompt = negative.as_ptr();
    let plain = generate(m, &req);
    req.prompt_2 = prompt_2.as_ptr();
    req.negative_prompt_2 = negative_2.as_ptr();
    let second = generate(m, &req);
    assert_ne!(
        plain, second,
        "prompt_2 / negative_prompt_2 changed nothing"
    );

    let gpu = ldm_wgpu::Gpu::new(&ldm_wgpu::GpuOptions::from_env().unwrap()).unwrap();
    let opts = ldm_wgpu::pipeline::ModelOptions {
        dtype: Some(ldm_wgpu::DType::F32),
        ..Default::default()
    };
    let sd = ldm_wgpu::pipeline::StableDiffusion::load(gpu, &dir, &opts).unwrap();
    let rust_req = ldm_wgpu::pipeline::GenerateRequest {
        prompt: "a red circle".into(),
        negative_prompt: "blurry".into(),
        prompt_2: Some("a green square".into()),
        negative_prompt_2: Some("ugly".into()),
        width: 64,
        height: 64,
        steps: 6,
        guidance_scale: 5.0,
        seed: 42,
        sampler: Some("euler".parse().unwrap()),
        ..Default::default()
    };
    let expected = sd.generate(&rust_req, &mut |_| true).unwrap();
    assert_eq!(second, expected.images[0].rgb);
    ok(ldm_model_unload(m));
    ok(ldm_engine_free(e));
}
