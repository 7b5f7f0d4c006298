//! The C API of ldm-wgpu (`include/ldm.h`, generated from this file by cbindgen).
//!
//! Every function returns an [`ldm_status`] and writes its results through out-parameters; the
//! message of a failure is [`ldm_last_error`] on the calling thread. No panic crosses the
//! boundary: each entry point runs under `catch_unwind` and a panic becomes `LDM_ERR_PANIC`.
//!
//! Handles are tokens, never dereferenced: each kind has a table from token to the object
//! (`Handles`), so a null, stale, freed or foreign handle is an `LDM_ERR_INVALID_HANDLE`, not a
//! crash, and a handle freed on one thread while another uses it stays alive until that use
//! ends (the user holds its own reference). The tables only map tokens; all state lives in the
//! objects, so engines and models are independent of one another.

#![allow(non_camel_case_types)]
// Every pointer argument is checked for null and its contract is in the header; the functions are
// `extern "C"` entry points, not Rust API.
#![allow(clippy::missing_safety_doc)]

mod handles;
mod job;
mod request;

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};

use ldm_wgpu::pipeline::{ModelOptions, StableDiffusion};
use ldm_wgpu::{Error, Gpu, GpuOptions};

use handles::Handles;
use job::Job;
pub use job::{ldm_cancel, ldm_generate_async, ldm_job, ldm_job_free, ldm_job_poll, ldm_job_wait};
pub use request::{
    ldm_generate, ldm_image, ldm_lora, ldm_progress, ldm_progress_fn, ldm_request,
    ldm_request_default,
};

/// The ABI version of this header. It changes whenever a struct layout or a function signature
/// changes; compare it with `ldm_abi_version()` at run time.
pub const LDM_ABI_VERSION: u32 = 3;

/// The result of every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ldm_status {
    LDM_OK = 0,
    /// `ldm_job_poll`: the job is still running.
    LDM_PENDING = 1,
    /// A null pointer where a value is required, a string that is not UTF-8, a value out of
    /// range (size, steps, strength, an unknown sampler name, ...).
    LDM_ERR_INVALID_ARGUMENT = -1,
    /// A handle that is null, already freed, or of another kind.
    LDM_ERR_INVALID_HANDLE = -2,
    /// The generation was cancelled (`ldm_cancel`, or the progress callback returned 0).
    LDM_ERR_CANCELLED = -3,
    /// The model was unloaded (`ldm_model_unload`); `ldm_model_reload` brings it back.
    LDM_ERR_UNLOADED = -4,
    /// No GPU adapter, the named adapter is missing, or it lacks a needed feature.
    LDM_ERR_ADAPTER = -5,
    /// The model files are missing, malformed or of an unsupported kind.
    LDM_ERR_MODEL = -6,
    /// Over the engine's memory budget, over a device limit, or out of GPU memory.
    LDM_ERR_MEMORY = -7,
    /// The GPU or driver failed (lost device, shader, non-finite output).
    LDM_ERR_DEVICE = -8,
    /// A file could not be read or written.
    LDM_ERR_IO = -9,
    /// A configuration this engine cannot run.
    LDM_ERR_UNSUPPORTED = -10,
    /// A bug: the library panicked (caught; the handles stay usable).
    LDM_ERR_PANIC = -11,
}

use ldm_status::*;

/// A failed call: its status and the message `ldm_last_error` returns.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub(crate) status: ldm_status,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(status: ldm_status, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(LDM_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let status = match &e {
            Error::NoAdapter | Error::AdapterNotFound { .. } | Error::MissingFeature { .. } => {
                LDM_ERR_ADAPTER
            }
            Error::LimitExceeded { .. } | Error::OutOfMemory { .. } => LDM_ERR_MEMORY,
            Error::Shape { .. }
            | Error::Shader { .. }
            | Error::Device(_)
            | Error::NonFinite { .. } => LDM_ERR_DEVICE,
            Error::Io { .. } => LDM_ERR_IO,
            Error::Weights(_) => LDM_ERR_MODEL,
            Error::Unsupported(_) => LDM_ERR_UNSUPPORTED,
            Error::InvalidInput(_) => LDM_ERR_INVALID_ARGUMENT,
        };
        let message = match e.hint() {
            Some(hint) => format!("{e}\nhint: {hint}"),
            None => e.to_string(),
        };
        Failure { status, message }
    }
}

pub(crate) type Outcome<T> = Result<T, Failure>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // An interior NUL cannot go through a C string: cut the message there.
    let text = message.split('\0').next().unwrap_or_default();
    let c = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error (a panic, caught at the API boundary): {what}\nhint: this is a bug in ldm-wgpu; please report it")
}

/// Runs one entry point: a panic becomes `LDM_ERR_PANIC`, a failure sets the thread's last
/// error. `AssertUnwindSafe`: what a panic could leave half-updated is behind mutexes that the
/// library recovers from poisoning (and the handle tables are updated in single steps).
pub(crate) fn guard(f: impl FnOnce() -> Outcome<()>) -> ldm_status {
    let failure = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return LDM_OK,
        Ok(Err(failure)) => failure,
        Err(payload) => Failure::new(LDM_ERR_PANIC, panic_message(payload.as_ref())),
    };
    set_last_error(&failure.message);
    failure.status
}

/// `catch_unwind` for work running on a job's own thread.
pub(crate) fn catch<T>(f: impl FnOnce() -> Outcome<T>) -> Outcome<T> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(Failure::new(LDM_ERR_PANIC, panic_message(payload.as_ref()))))
}

/// Writes `value` through an out-parameter that was checked for null.
pub(crate) fn out<T>(ptr: *mut T, what: &str) -> Outcome<&'static mut T> {
    // SAFETY: non-null was checked; the caller promises it points to a writable `T` (header).
    unsafe { ptr.as_mut() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// A C string argument: NULL is `None`, otherwise it must be UTF-8.
pub(crate) fn opt_str(ptr: *const c_char, what: &str) -> Outcome<Option<String>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null; the caller promises a NUL-terminated string (header).
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| Failure::invalid(format!("{what} is not valid UTF-8")))
}

pub(crate) fn req_str(ptr: *const c_char, what: &str) -> Outcome<String> {
    opt_str(ptr, what)?.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

// ------------------------------------------------------------------------------------ version

/// The library's version, e.g. "0.1.0" (a static string: do not free).
/// Thread-safe.
#[no_mangle]
pub extern "C" fn ldm_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The `LDM_ABI_VERSION` the library was built with; an application built against another
/// header must not use it. Thread-safe.
#[no_mangle]
pub extern "C" fn ldm_abi_version() -> u32 {
    LDM_ABI_VERSION
}

/// The message of the last failed call on this thread (what failed, then a line "hint: ..."
/// when there is advice), or "" when none has failed. Owned by the library: valid until the
/// next failing call on the same thread; copy it to keep it. Thread-local, so thread-safe.
#[no_mangle]
pub extern "C" fn ldm_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

// ------------------------------------------------------------------------------------- engine

/// Options of an engine: one GPU adapter with its kernel policy, pipeline cache and budget.
/// Fill with `ldm_engine_options_default` first, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ldm_engine_options {
    /// Adapter name substring or index as text ("0", "llvmpipe", "NVIDIA"); NULL: the best one.
    pub adapter: *const c_char,
    /// Directory for the driver's compiled-pipeline cache (created if missing; one file per
    /// adapter); NULL: no cache on disk.
    pub pipeline_cache_dir: *const c_char,
    /// The most bytes of GPU tensors the engine's models may hold together; 0: no budget. A load
    /// or a request that would pass it fails with LDM_ERR_MEMORY before allocating.
    pub memory_budget: u64,
    /// Nonzero: read `LDM_ADAPTER`, `WGPU_BACKEND` and the `LDM_*` kernel switches (README) from
    /// the environment, as the `ldm` CLI does; explicit fields above still win. 0: defaults.
    pub use_env: i32,
}

/// Options of a model load. Fill with `ldm_model_options_default` first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ldm_model_options {
    /// Storage precision: 0 automatic (f16 where the adapter has it), 16 or 32.
    pub dtype_bits: u32,
    /// Nonzero: load the VAE encoder, needed for init images and masks (img2img, inpainting).
    pub with_encoder: i32,
}

/// GPU memory held by tensors, in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ldm_memory {
    /// Held by live tensors (weights, and activations while a generation runs).
    pub live_bytes: u64,
    /// Held in the buffer pool for reuse (`ldm_model_trim` returns it to the driver).
    pub pooled_bytes: u64,
    /// The most held at once (live + pooled) since the model loaded or its last generation
    /// began; for an engine, the sum over its models.
    pub peak_bytes: u64,
    /// The engine's budget (0: none).
    pub budget_bytes: u64,
}

/// An engine: adapter choice, kernel policy, pipeline cache directory and memory budget, shared
/// by the models loaded on it.
pub struct ldm_engine {
    _opaque: [u8; 0],
}

/// A loaded pipeline on an engine.
pub struct ldm_model {
    _opaque: [u8; 0],
}

/// The images of a finished generation.
pub struct ldm_result {
    _opaque: [u8; 0],
}

pub(crate) struct Engine {
    options: GpuOptions,
    budget: Option<u64>,
    adapter_name: CString,
    models: Mutex<Vec<Weak<Model>>>,
}

impl Engine {
    fn live_models(&self) -> Vec<Arc<Model>> {
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        models.retain(|m| m.strong_count() > 0);
        models.iter().filter_map(Weak::upgrade).collect()
    }

    /// What the engine's models hold now (skipping `except`).
    fn held_bytes(&self, except: Option<&Model>) -> u64 {
        self.live_models()
            .iter()
            .filter(|m| except.is_none_or(|e| !std::ptr::eq(Arc::as_ptr(m), e)))
            .map(|m| {
                let mem = m.memory();
                mem.live_bytes + mem.pooled_bytes
            })
            .sum()
    }

    /// GPU options for a new model: this engine's, with the part of the budget the other
    /// models leave (each model has its own device queue on the engine's adapter, so two models
    /// run side by side).
    fn options_for_model(&self, model: Option<&Model>) -> Outcome<GpuOptions> {
        let mut options = self.options.clone();
        if let Some(budget) = self.budget {
            let held = self.held_bytes(model);
            if held >= budget {
                return Err(Failure::new(
                    LDM_ERR_MEMORY,
                    format!(
                        "the engine's memory budget of {budget} bytes is taken: its other models \
                         hold {held} bytes\nhint: unload a model (ldm_model_unload) or open the \
                         engine with a larger budget"
                    ),
                ));
            }
            options.memory_budget = Some(budget - held);
        }
        Ok(options)
    }
}

/// A LoRA applied to a model: its file and its text-encoder and U-Net weights.
pub(crate) type AppliedKey = (PathBuf, f32, f32);

/// What a model's requests have set on it: the embeddings folder and the LoRAs in use.
#[derive(Default)]
pub(crate) struct InUse {
    pub(crate) embeddings: Option<PathBuf>,
    pub(crate) loras: Vec<AppliedKey>,
}

pub(crate) struct Model {
    pub(crate) engine: Arc<Engine>,
    pub(crate) path: PathBuf,
    pub(crate) name: String,
    options: ModelOptions,
    /// `None` once unloaded. Generations hold the read lock; unload and embedding changes the
    /// write lock (an unload waits for the generation running on the model).
    pub(crate) sd: RwLock<Option<StableDiffusion>>,
    /// Held from setting a request's embeddings and LoRAs to the end of its generation, so
    /// requests with different ones do not mix; remembers those in use.
    pub(crate) requests: Mutex<InUse>,
}

impl Model {
    fn load(engine: Arc<Engine>, path: PathBuf, options: ModelOptions) -> Outcome<Model> {
        let gpu = Gpu::new(&engine.options_for_model(None)?)?;
        let sd = StableDiffusion::load(gpu, &path, &options)?;
        Ok(Model {
            engine,
            name: ldm_wgpu::parameters::model_name(&path),
            path,
            options,
            sd: RwLock::new(Some(sd)),
            requests: Mutex::new(InUse::default()),
        })
    }

    pub(crate) fn memory(&self) -> ldm_memory {
        let sd = self.sd.read().unwrap_or_else(|p| p.into_inner());
        let stats = sd
            .as_ref()
            .map(|sd| sd.gpu.pool_stats())
            .unwrap_or_default();
        ldm_memory {
            live_bytes: stats.live_bytes,
            pooled_bytes: stats.free_bytes,
            peak_bytes: stats.peak_bytes,
            budget_bytes: self.engine.budget.unwrap_or(0),
        }
    }
}

pub(crate) static ENGINES: Handles<ldm_engine, Engine> = Handles::new("engine");
pub(crate) static MODELS: Handles<ldm_model, Model> = Handles::new("model");
pub(crate) static RESULTS: Handles<ldm_result, request::Output> = Handles::new("result");
pub(crate) static JOBS: Handles<ldm_job, Job> = Handles::new("job");

/// Fills `out` with the defaults: best adapter, default kernel policy, no pipeline cache, no
/// budget, environment ignored. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn ldm_engine_options_default(out: *mut ldm_engine_options) -> ldm_status {
    guard(|| {
        *self::out(out, "out")? = ldm_engine_options {
            adapter: std::ptr::null(),
            pipeline_cache_dir: std::ptr::null(),
            memory_budget: 0,
            use_env: 0,
        };
        Ok(())
    })
}

fn engine_options(o: &ldm_engine_options) -> Outcome<GpuOptions> {
    let mut options = if o.use_env != 0 {
        GpuOptions::from_env()?
    } else {
        GpuOptions::default()
    };
    if let Some(adapter) = opt_str(o.adapter, "options.adapter")? {
        options.adapter = Some(adapter);
    }
    if let Some(dir) = opt_str(o.pipeline_cache_dir, "options.pipeline_cache_dir")? {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).map_err(|e| Failure::from(Error::io(&dir, e)))?;
        // One file per adapter request, as the CLI names it (a driver's cache is only valid for
        // the device that wrote it).
        let tag = options.adapter.clone().unwrap_or_else(|| "default".into());
        let safe: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        options.pipeline_cache_path = Some(dir.join(format!("pipelines-{safe}.bin")));
    }
    options.memory_budget = (o.memory_budget > 0).then_some(o.memory_budget);
    Ok(options)
}

/// Opens an engine on one GPU adapter. `options` may be NULL (the defaults). On success
/// `*engine` is a new handle, to be freed with `ldm_engine_free`; on failure it is set to NULL.
/// Thread-safe; any number of engines may be open.
#[no_mangle]
pub unsafe extern "C" fn ldm_engine_new(
    options: *const ldm_engine_options,
    engine: *mut *mut ldm_engine,
) -> ldm_status {
    guard(|| {
        let slot = out(engine, "engine")?;
        *slot = std::ptr::null_mut();
        // SAFETY: null or pointing to an `ldm_engine_options` (header).
        let gpu_options = match unsafe { options.as_ref() } {
            Some(o) => engine_options(o)?,
            None => GpuOptions::default(),
        };
        // Open the adapter once now, so a missing driver or adapter fails here, by name.
        let probe = Gpu::new(&GpuOptions {
            pipeline_cache_path: None,
            ..gpu_options.clone()
        })?;
        let adapter_name = CString::new(probe.adapter.name.replace('\0', "")).unwrap_or_default();
        drop(probe);
        *slot = ENGINES.insert(Engine {
            budget: gpu_options.memory_budget,
            options: gpu_options,
            adapter_name,
            models: Mutex::new(Vec::new()),
        });
        Ok(())
    })
}

/// The name of the engine's adapter (owned by the engine: valid until `ldm_engine_free`).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn ldm_engine_adapter(
    engine: *mut ldm_engine,
    name: *mut *const c_char,
) -> ldm_status {
    guard(|| {
        let slot = out(name, "name")?;
        let e = ENGINES.get(engine)?;
        *slot = e.adapter_name.as_ptr();
        // The string lives as long as the engine; the table keeps it until ldm_engine_free.
        Ok(())
    })
}

/// Frees an engine handle. Models loaded on it keep working (each holds the engine) until they
/// are freed. Freeing NULL or an already freed handle is LDM_ERR_INVALID_HANDLE (and harmless).
/// Thread-safe.
#[no_mangle]
pub extern "C" fn ldm_engine_free(engine: *mut ldm_engine) -> ldm_status {
    guard(|| ENGINES.remove(engine).map(drop))
}

/// The GPU memory the engine's models hold (sums over its loaded models). Thread-safe, also
/// while generations run.
#[no_mangle]
pub unsafe extern "C" fn ldm_engine_memory(
    engine: *mut ldm_engine,
    memory: *mut ldm_memory,
) -> ldm_status {
    guard(|| {
        let slot = out(memory, "memory")?;
        let e = ENGINES.get(engine)?;
        let mut total = ldm_memory {
            budget_bytes: e.budget.unwrap_or(0),
            ..Default::default()
        };
        for m in e.live_models() {
            let mem = m.memory();
            total.live_bytes += mem.live_bytes;
            total.pooled_bytes += mem.pooled_bytes;
            total.peak_bytes += mem.peak_bytes;
        }
        *slot = total;
        Ok(())
    })
}

// -------------------------------------------------------------------------------------- model

/// Fills `out` with the defaults: automatic precision, with the VAE encoder. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn ldm_model_options_default(out: *mut ldm_model_options) -> ldm_status {
    guard(|| {
        *self::out(out, "out")? = ldm_model_options {
            dtype_bits: 0,
            with_encoder: 1,
        };
        Ok(())
    })
}

/// Loads a model (a diffusers folder or a single `.safetensors` checkpoint, UTF-8 path) on an
/// engine. `options` may be NULL (the defaults). On success `*model` is a new handle, to be freed
/// with `ldm_model_free`; on failure it is NULL. Thread-safe: any number of models may be loaded
/// on one engine, from any thread, and each runs its generations independently of the others.
#[no_mangle]
pub unsafe extern "C" fn ldm_model_load(
    engine: *mut ldm_engine,
    path: *const c_char,
    options: *const ldm_model_options,
    model: *mut *mut ldm_model,
) -> ldm_status {
    guard(|| {
        let slot = out(model, "model")?;
        *slot = std::ptr::null_mut();
        let e = ENGINES.get(engine)?;
        let path = PathBuf::from(req_str(path, "path")?);
        // SAFETY: null or pointing to an `ldm_model_options` (header).
        let o = unsafe { options.as_ref() }
            .copied()
            .unwrap_or(ldm_model_options {
                dtype_bits: 0,
                with_encoder: 1,
            });
        let dtype = match o.dtype_bits {
            0 => None,
            16 => Some(ldm_wgpu::DType::F16),
            32 => Some(ldm_wgpu::DType::F32),
            other => {
                return Err(Failure::invalid(format!(
                    "options.dtype_bits is {other} (0, 16 or 32)"
                )))
            }
        };
        let model_options = ModelOptions {
            dtype,
            with_encoder: o.with_encoder != 0,
            ..Default::default()
        };
        let loaded = Arc::new(Model::load(e.clone(), path, model_options)?);
        e.models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&loaded));
        *slot = MODELS.insert_arc(loaded);
        Ok(())
    })
}

/// Gives the model's GPU memory back (its weights and pools, and its device queue); the handle
/// stays valid and `ldm_model_reload` loads the same files again. Waits for a generation running
/// on the model to end (cancel it first for a prompt return). Generating on an unloaded model is
/// LDM_ERR_UNLOADED. Unloading twice is LDM_OK. Thread-safe.
#[no_mangle]
pub extern "C" fn ldm_model_unload(model: *mut ldm_model) -> ldm_status {
    guard(|| {
        let m = MODELS.get(model)?;
        // The same lock order as a generation (requests, then the pipeline), so this waits for
        // the one running.
        let mut in_use = m.requests.lock().unwrap_or_else(|p| p.into_inner());
        let old = m.sd.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(old);
        *in_use = InUse::default();
        Ok(())
    })
}

/// Loads an unloaded model again from the same files, with the same options (LDM_OK and nothing
/// done when it is loaded). Thread-safe.
#[no_mangle]
pub extern "C" fn ldm_model_reload(model: *mut ldm_model) -> ldm_status {
    guard(|| {
        let m = MODELS.get(model)?;
        // The requests lock keeps other reloads, unloads and generations of this model out; the
        // pipeline's own lock is not held while the engine reads what its other models hold
        // (they may be reloading too, reading this one).
        let _in_use = m.requests.lock().unwrap_or_else(|p| p.into_inner());
        if m.sd.read().unwrap_or_else(|p| p.into_inner()).is_some() {
            return Ok(());
        }
        let gpu = Gpu::new(&m.engine.options_for_model(Some(&*m))?)?;
        let sd = StableDiffusion::load(gpu, &m.path, &m.options)?;
        *m.sd.write().unwrap_or_else(|p| p.into_inner()) = Some(sd);
        Ok(())
    })
}

/// Frees a model handle. A generation still running on it (an async job) keeps the model alive
/// until it ends; its memory is then given back. Thread-safe.
#[no_mangle]
pub extern "C" fn ldm_model_free(model: *mut ldm_model) -> ldm_status {
    guard(|| MODELS.remove(model).map(drop))
}

/// The GPU memory this model holds (all zero once unloaded). Thread-safe, also while it runs.
#[no_mangle]
pub unsafe extern "C" fn ldm_model_memory(
    model: *mut ldm_model,
    memory: *mut ldm_memory,
) -> ldm_status {
    guard(|| {
        let slot = out(memory, "memory")?;
        *slot = MODELS.get(model)?.memory();
        Ok(())
    })
}

/// Returns the model's pooled (unused) GPU buffers to the driver. Thread-safe.
#[no_mangle]
pub extern "C" fn ldm_model_trim(model: *mut ldm_model) -> ldm_status {
    guard(|| {
        let m = MODELS.get(model)?;
        let sd = m.sd.read().unwrap_or_else(|p| p.into_inner());
        let sd = sd
            .as_ref()
            .ok_or_else(|| Failure::new(LDM_ERR_UNLOADED, "the model is unloaded"))?;
        sd.gpu.trim_pool();
        Ok(())
    })
}

/// The model's native image size (what width = height = 0 in a request gives). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn ldm_model_native_size(
    model: *mut ldm_model,
    width: *mut u32,
    height: *mut u32,
) -> ldm_status {
    guard(|| {
        let (w, h) = (out(width, "width")?, out(height, "height")?);
        let m = MODELS.get(model)?;
        let sd = m.sd.read().unwrap_or_else(|p| p.into_inner());
        let sd = sd
            .as_ref()
            .ok_or_else(|| Failure::new(LDM_ERR_UNLOADED, "the model is unloaded"))?;
        let native = (sd.unet.config.sample_size * sd.vae.config.downscale()) as u32;
        (*w, *h) = (native, native);
        Ok(())
    })
}

// ------------------------------------------------------------------------------------ results

/// The number of images in a result. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn ldm_result_count(result: *mut ldm_result, count: *mut u32) -> ldm_status {
    guard(|| {
        let slot = out(count, "count")?;
        *slot = RESULTS.get(result)?.images.len() as u32;
        Ok(())
    })
}

/// Image `index` of a result: `image->rgb` points to width × height × 3 bytes (RGB8, rows top to
/// bottom, no padding) owned by the result, valid until `ldm_result_free`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn ldm_result_image(
    result: *mut ldm_result,
    index: u32,
    image: *mut ldm_image,
) -> ldm_status {
    guard(|| {
        let slot = out(image, "image")?;
        let r = RESULTS.get(result)?;
        let img = r.image(index)?;
        *slot = ldm_image {
            width: img.width as u32,
            height: img.height as u32,
            rgb: img.rgb.as_ptr(),
        };
        Ok(())
    })
}

/// The seed image `index` was drawn with, and its A1111 `parameters` text (owned by the result,
/// valid until `ldm_result_free`; either out-parameter may be NULL). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn ldm_result_info(
    result: *mut ldm_result,
    index: u32,
    seed: *mut u64,
    parameters: *mut *const c_char,
) -> ldm_status {
    guard(|| {
        let r = RESULTS.get(result)?;
        r.image(index)?;
        // SAFETY: null or writable (header).
        if let Some(s) = unsafe { seed.as_mut() } {
            *s = r.seeds[index as usize];
        }
        // SAFETY: null or writable (header).
        if let Some(p) = unsafe { parameters.as_mut() } {
            *p = r.parameters[index as usize].as_ptr();
        }
        Ok(())
    })
}

/// Writes image `index` as a PNG (UTF-8 path; atomically: a temporary file, then a rename) with
/// the generation settings in its `parameters` text, as the `ldm` CLI writes them (the same
/// settings give the same file). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn ldm_result_save_png(
    result: *mut ldm_result,
    index: u32,
    path: *const c_char,
) -> ldm_status {
    guard(|| {
        let path = PathBuf::from(req_str(path, "path")?);
        let r = RESULTS.get(result)?;
        let img = r.image(index)?;
        let text = r.parameters[index as usize].to_string_lossy();
        img.save_png_with_text(&path, &[("parameters", &text)])?;
        Ok(())
    })
}

/// Frees a result and its pixels. Thread-safe.
#[no_mangle]
pub extern "C" fn ldm_result_free(result: *mut ldm_result) -> ldm_status {
    guard(|| RESULTS.remove(result).map(drop))
}
