//! The job queue and its workers: one FIFO queue, one worker thread per GPU adapter, each owning
//! its own `StableDiffusion` (loaded once, kept resident, reloaded only when the checkpoint is
//! switched through `/sdapi/v1/options`). HTTP handlers submit jobs and await a one-shot reply;
//! a handler dropped (its client went away) cancels its job through the job's flags, which the
//! worker reads before it starts the job and after every model call.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::oneshot;

use crate::error::Error;
use crate::pipeline::{GenerateRequest, ModelOptions, Progress, SeedMode, StableDiffusion};
use crate::GpuOptions;

/// Lock a mutex, ignoring poisoning: the state behind each lock stays consistent between
/// statements, and a panicking worker must not take the whole server down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One generation: the engine's request plus what the A1111 API adds around it.
pub struct GenJob {
    /// `prompt` still holds its `<lora:…>` tags; the worker resolves them.
    pub req: GenerateRequest,
    /// A1111's `n_iter`: batches run one after the other, the seed advancing by the batch size.
    pub n_iter: usize,
}

/// Why a job ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Its client disconnected, or the server is shutting down.
    Cancelled,
    /// `/sdapi/v1/interrupt`: stop, keep the finished batches.
    Interrupted,
}

/// One image of a finished job: PNG bytes (with the `parameters` text chunk), its seed and that
/// text (A1111's infotext).
pub struct OutImage {
    pub png: Vec<u8>,
    pub seed: u64,
    pub infotext: String,
}

pub struct JobOutput {
    pub images: Vec<OutImage>,
    pub model_name: String,
    pub interrupted: bool,
}

pub type JobResult = Result<JobOutput, Error>;

pub struct Job {
    pub work: GenJob,
    cancel: AtomicBool,
    interrupt: AtomicBool,
    skip: AtomicBool,
    reply: Mutex<Option<oneshot::Sender<JobResult>>>,
}

impl Job {
    pub fn new(work: GenJob) -> (Arc<Job>, oneshot::Receiver<JobResult>) {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            work,
            cancel: AtomicBool::new(false),
            interrupt: AtomicBool::new(false),
            skip: AtomicBool::new(false),
            reply: Mutex::new(Some(tx)),
        };
        (Arc::new(job), rx)
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// `/sdapi/v1/interrupt` reached it.
    pub fn interrupting(&self) -> bool {
        self.interrupt.load(Ordering::Relaxed)
    }

    /// `/sdapi/v1/skip` reached its current batch.
    pub fn skipping(&self) -> bool {
        self.skip.load(Ordering::Relaxed)
    }

    fn stop(&self) -> Option<Stop> {
        if self.cancel.load(Ordering::Relaxed) {
            Some(Stop::Cancelled)
        } else if self.interrupt.load(Ordering::Relaxed) {
            Some(Stop::Interrupted)
        } else {
            None
        }
    }

    fn answer(&self, result: JobResult) {
        if let Some(tx) = lock(&self.reply).take() {
            // The receiver is gone when the client disconnected: nothing to tell.
            let _ = tx.send(result);
        }
    }
}

/// Cancels its job when dropped, unless disarmed: held by the handler awaiting the job, so a
/// client that disconnects (axum drops the handler's future) cancels it.
pub struct CancelOnDrop(pub Option<Arc<Job>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(job) = self.0.take() {
            job.cancel();
        }
    }
}

/// What `/sdapi/v1/progress` reports about a worker's running job.
#[derive(Clone)]
pub struct Running {
    pub job: Arc<Job>,
    pub started: Instant,
    pub job_timestamp: String,
    pub job_no: usize,
    pub job_count: usize,
    pub sampling_step: usize,
    pub sampling_steps: usize,
    /// The latest preview (base64 PNG), made after a step when a client asked for one.
    pub current_image: Option<String>,
    pub textinfo: String,
}

/// The model a worker holds.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub generation: u64,
    pub path: PathBuf,
    pub native_size: usize,
    pub embeddings: Option<crate::pipeline::EmbeddingsReport>,
}

#[derive(Default)]
pub struct WorkerSlot {
    pub running: Mutex<Option<Running>>,
    pub loaded: Mutex<Option<Loaded>>,
    pub load_error: Mutex<Option<String>>,
    /// GPU memory held by the worker's tensor pool, bytes (live + free), after its last job.
    pub pool_bytes: AtomicU64,
}

/// Counters the worker feeds into `/metrics`.
#[derive(Default)]
pub struct WorkStats {
    pub generation_seconds: Mutex<Vec<f64>>,
    /// Iterations per second of the last finished generation, as f64 bits.
    pub last_its: AtomicU64,
}

pub struct Queue {
    waiting: Mutex<VecDeque<Arc<Job>>>,
    ready: Condvar,
    capacity: usize,
    pub slots: Vec<WorkerSlot>,
    /// The checkpoint every worker should hold: (generation, path).
    desired: Mutex<(u64, PathBuf)>,
    pub shutting_down: AtomicBool,
    preview_wanted: AtomicBool,
    pub stats: WorkStats,
}

/// Why a job was not queued.
pub enum Refused {
    Full,
    ShuttingDown,
}

impl Queue {
    pub fn new(workers: usize, capacity: usize, model: PathBuf) -> Queue {
        Queue {
            waiting: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            capacity,
            slots: (0..workers).map(|_| WorkerSlot::default()).collect(),
            desired: Mutex::new((0, model)),
            shutting_down: AtomicBool::new(false),
            preview_wanted: AtomicBool::new(false),
            stats: WorkStats::default(),
        }
    }

    pub fn submit(&self, job: Arc<Job>) -> Result<(), Refused> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(Refused::ShuttingDown);
        }
        let mut waiting = lock(&self.waiting);
        if waiting.len() >= self.capacity {
            return Err(Refused::Full);
        }
        waiting.push_back(job);
        self.ready.notify_one();
        Ok(())
    }

    /// Jobs waiting for a worker.
    pub fn len(&self) -> usize {
        lock(&self.waiting).len()
    }

    /// The next job, or None after `wait` (so the worker can look at switches and shutdown).
    fn next(&self, wait: Duration) -> Option<Arc<Job>> {
        let waiting = lock(&self.waiting);
        let (mut waiting, _) = self
            .ready
            .wait_timeout_while(waiting, wait, |w| w.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        waiting.pop_front()
    }

    /// The running jobs, oldest first.
    pub fn running(&self) -> Vec<Running> {
        let mut all: Vec<Running> = self
            .slots
            .iter()
            .filter_map(|s| lock(&s.running).clone())
            .collect();
        all.sort_by_key(|r| r.started);
        all
    }

    /// A client asked for `current_image`: the next step of each running job makes one.
    pub fn want_preview(&self) {
        self.preview_wanted.store(true, Ordering::Relaxed);
    }

    pub fn interrupt(&self) {
        for r in self.running() {
            r.job.interrupt.store(true, Ordering::Relaxed);
        }
    }

    pub fn skip(&self) {
        for r in self.running() {
            r.job.skip.store(true, Ordering::Relaxed);
        }
    }

    /// Refuse new jobs and cancel the queued ones; the running ones finish, unless
    /// `cancel_running` (a second signal).
    pub fn shut_down(&self, cancel_running: bool) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let drained: Vec<Arc<Job>> = lock(&self.waiting).drain(..).collect();
        for job in drained {
            job.cancel();
            job.answer(Err(Error::InvalidInput(
                "the server is shutting down".into(),
            )));
        }
        if cancel_running {
            for r in self.running() {
                r.job.cancel();
            }
        }
        self.ready.notify_all();
    }

    pub fn desired(&self) -> (u64, PathBuf) {
        lock(&self.desired).clone()
    }

    /// Ask every worker to load `path` (a checkpoint found under `--models-dir`); returns the
    /// generation to wait for.
    pub fn switch_model(&self, path: PathBuf) -> u64 {
        let mut desired = lock(&self.desired);
        if desired.1 == path {
            return desired.0;
        }
        *desired = (desired.0 + 1, path);
        for slot in &self.slots {
            *lock(&slot.load_error) = None;
        }
        self.ready.notify_all();
        desired.0
    }

    /// Whether every worker holds generation `generation` (Ok(true)), or one failed to load it.
    pub fn switched(&self, generation: u64) -> Result<bool, String> {
        for slot in &self.slots {
            if let Some(e) = lock(&slot.load_error).clone() {
                return Err(e);
            }
            if lock(&slot.loaded).as_ref().map(|l| l.generation) != Some(generation) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether a model is loaded (every worker holds one).
    pub fn ready(&self) -> bool {
        self.slots.iter().all(|s| lock(&s.loaded).is_some())
    }

    /// The model the first worker holds.
    pub fn loaded(&self) -> Option<Loaded> {
        self.slots.first().and_then(|s| lock(&s.loaded).clone())
    }
}

/// What a worker needs besides its queue.
#[derive(Clone)]
pub struct WorkerConfig {
    pub index: usize,
    pub gpu: GpuOptions,
    /// Where `<lora:NAME:w>` finds NAME.safetensors (None: beside the model, as the CLI).
    pub lora_dir: Option<PathBuf>,
    pub embeddings_dir: Option<PathBuf>,
}

/// Load the model of `generation` into `sd`, recording the outcome in the worker's slot.
fn load(queue: &Queue, cfg: &WorkerConfig, generation: u64, path: &Path) -> Option<Model> {
    let slot = &queue.slots[cfg.index];
    *lock(&slot.loaded) = None;
    let started = Instant::now();
    let result = (|| {
        let gpu = crate::Gpu::new(&cfg.gpu)?;
        let adapter = gpu.adapter.to_string();
        let options = ModelOptions {
            with_encoder: true,
            ..Default::default()
        };
        let mut sd = StableDiffusion::load(gpu, path, &options)?;
        let embeddings = match &cfg.embeddings_dir {
            Some(dir) => {
                let (found, _unreadable) = crate::embeddings::load_dir(dir)?;
                Some(sd.set_embeddings(&found)?)
            }
            None => None,
        };
        Ok::<_, Error>((sd, adapter, embeddings))
    })();
    match result {
        Ok((sd, adapter, embeddings)) => {
            let native_size = sd.unet.config.sample_size * sd.vae.config.downscale();
            super::log_event(&[
                ("event", "model_loaded".into()),
                ("worker", cfg.index.into()),
                ("adapter", adapter.into()),
                ("model", path.display().to_string().into()),
                ("seconds", started.elapsed().as_secs_f64().into()),
            ]);
            *lock(&slot.load_error) = None;
            *lock(&slot.loaded) = Some(Loaded {
                generation,
                path: path.to_path_buf(),
                native_size,
                embeddings,
            });
            let lora_dir = cfg
                .lora_dir
                .clone()
                .unwrap_or_else(|| crate::lora::default_lora_dir(path));
            Some(Model {
                sd,
                name: crate::parameters::model_name(path),
                lora_dir,
            })
        }
        Err(e) => {
            let message = format!("loading {}: {e}", path.display());
            super::log_event(&[
                ("event", "model_load_failed".into()),
                ("worker", cfg.index.into()),
                ("error", message.clone().into()),
            ]);
            *lock(&slot.load_error) = Some(message);
            None
        }
    }
}

struct Model {
    sd: StableDiffusion,
    name: String,
    lora_dir: PathBuf,
}

/// A worker's life: load the model, then take jobs until shutdown; reload when the desired
/// checkpoint changes. The first load failing ends the process (the server cannot serve).
pub fn run_worker(queue: Arc<Queue>, cfg: WorkerConfig) {
    let mut model: Option<(u64, Model)> = None;
    let mut failed: Option<u64> = None;
    // Compiled pipelines are saved after the first job of each model (Vulkan PIPELINE_CACHE),
    // so the next start or switch compiles less; failure is harmless.
    let mut cache_saved = false;
    while !queue.shutting_down.load(Ordering::Relaxed) {
        let (generation, path) = queue.desired();
        let held = model.as_ref().map(|(g, _)| *g);
        if held != Some(generation) && failed != Some(generation) {
            // Free the old model's GPU memory before the new one loads.
            model = None;
            match load(&queue, &cfg, generation, &path) {
                Some(m) => {
                    model = Some((generation, m));
                    cache_saved = false;
                }
                None if generation == 0 => std::process::exit(1),
                None => failed = Some(generation),
            }
        }
        let Some(job) = queue.next(Duration::from_millis(200)) else {
            continue;
        };
        let Some((_, m)) = &model else {
            job.answer(Err(Error::InvalidInput(
                "no model is loaded (the last checkpoint switch failed)".into(),
            )));
            continue;
        };
        if job.stop().is_some() {
            job.answer(Err(Error::InvalidInput(
                "cancelled before it started".into(),
            )));
            continue;
        }
        let slot = &queue.slots[cfg.index];
        let result = run_job(&queue, slot, m, &job);
        *lock(&slot.running) = None;
        let pool = m.sd.gpu.pool_stats();
        slot.pool_bytes
            .store(pool.live_bytes + pool.free_bytes, Ordering::Relaxed);
        job.answer(result);
        if !cache_saved {
            let _ = m.sd.gpu.save_pipeline_cache();
            cache_saved = true;
        }
    }
}

fn run_job(queue: &Queue, slot: &WorkerSlot, m: &Model, job: &Arc<Job>) -> JobResult {
    let sd = &m.sd;
    let work = &job.work;
    // `<lora:NAME:w>` tags: applied for this job (none: the previous job's are removed); the
    // PNG records the prompt with its tags, as the CLI does.
    let tagged = crate::lora::prompt_loras(&work.req.prompt, &m.lora_dir)?;
    let specs = sd.open_lora_specs(&[], &tagged)?;
    let lora_hashes = crate::lora::a1111_lora_hashes(&specs);
    sd.set_loras(&specs)?;
    let mut req = work.req.clone();
    req.prompt = tagged.text.clone();
    let recorded = crate::parameters::Recorded {
        prompt: &work.req.prompt,
        model: &m.name,
        lora_hashes: &lora_hashes,
        refiner: None,
    };
    let started = Instant::now();
    *lock(&slot.running) = Some(Running {
        job: job.clone(),
        started,
        job_timestamp: super::a1111::job_timestamp(),
        job_no: 0,
        job_count: work.n_iter,
        sampling_step: 0,
        sampling_steps: req.steps,
        current_image: None,
        textinfo: String::new(),
    });
    let mut images = Vec::new();
    let mut interrupted = false;
    let mut model_calls = 0usize;
    for batch in 0..work.n_iter {
        let mut r = req.clone();
        r.seed = req.seed.wrapping_add((batch * req.batch_size) as u64);
        if let Some(running) = lock(&slot.running).as_mut() {
            running.job_no = batch;
            running.sampling_step = 0;
        }
        let mut report = |p: &Progress<'_>| on_step(queue, slot, sd, job, p);
        match sd.generate(&r, &mut report) {
            Ok(out) => {
                model_calls += out.timings.steps.len();
                for (i, img) in out.images.iter().enumerate() {
                    let seed = match r.seed_mode {
                        SeedMode::Batch => r.seed,
                        SeedMode::PerImage => r.seed.wrapping_add(i as u64),
                    };
                    let infotext = crate::parameters::a1111_parameters(&r, &recorded, sd, seed, i);
                    let png = img.encode_png("response image", &[("parameters", &infotext)])?;
                    images.push(OutImage {
                        png,
                        seed,
                        infotext,
                    });
                }
            }
            Err(e) => match job.stop() {
                Some(Stop::Cancelled) => return Err(Error::InvalidInput("cancelled".into())),
                Some(Stop::Interrupted) => {
                    interrupted = true;
                    break;
                }
                None if job.skip.swap(false, Ordering::Relaxed) => continue,
                None => return Err(e),
            },
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    lock(&queue.stats.generation_seconds).push(seconds);
    if model_calls > 0 {
        let its = model_calls as f64 / seconds.max(1e-9);
        queue.stats.last_its.store(its.to_bits(), Ordering::Relaxed);
    }
    Ok(JobOutput {
        images,
        model_name: m.name.clone(),
        interrupted,
    })
}

/// After each model call: progress for `/sdapi/v1/progress`, a preview when one was asked for,
/// and whether to go on (not cancelled, interrupted or skipped).
fn on_step(
    queue: &Queue,
    slot: &WorkerSlot,
    sd: &StableDiffusion,
    job: &Job,
    p: &Progress<'_>,
) -> bool {
    let preview = if queue.preview_wanted.swap(false, Ordering::Relaxed) {
        crate::preview::latent_preview(&sd.gpu, p.latents, 0)
            .map(|img| crate::preview::upscale(&img, sd.vae.config.downscale()))
            .and_then(|img| img.encode_png("preview", &[]))
            .ok()
            .map(|png| base64::engine::general_purpose::STANDARD.encode(png))
    } else {
        None
    };
    if let Some(running) = lock(&slot.running).as_mut() {
        running.sampling_step = p.call + 1;
        running.sampling_steps = p.calls;
        running.textinfo = format!("step {}/{}", p.call + 1, p.calls);
        if preview.is_some() {
            running.current_image = preview;
        }
    }
    job.stop().is_none() && !job.skip.load(Ordering::Relaxed)
}
