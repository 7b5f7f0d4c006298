//! The tensor runtime: one `Gpu` owns the device, the buffer pool, the pipeline cache and the
//! command recorder. Kernels record dispatches; nothing is submitted until a download or an
//! explicit `flush()`, so a whole denoising step is one submit.

pub mod device;
mod disk_cache;
mod faults;
pub mod pipeline;
pub mod policy;
pub mod tensor;
pub mod timing;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

pub use device::{AdapterSummary, Caps};
pub use pipeline::PipelineKey;
pub use tensor::{DType, PoolStats, Tensor};
pub use timing::{KernelTime, Work};

use crate::error::{Error, Result};
use crate::shaders::BindingKind;
use pipeline::PipelineCache;
pub use policy::{ConvTile, CoopTile, KernelPolicy};

use crate::shaders::ShaderId;
use tensor::{bucket_size, BufferPool, PooledBuffer};
use timing::Profiler;

/// Bytes of uniform parameters one dispatch may use (one slot of the ring).
pub const PARAMS_SLOT: u64 = 256;
/// Dispatches recorded between forced flushes (the uniform ring holds this many slots).
const RING_SLOTS: u64 = 4096;
/// Bind groups kept per generation of the cache (two generations): more than the dispatches of
/// one SD 1.5 denoising step (~1000), so a whole step stays cached.
const BIND_GROUP_GENERATION: usize = 4096;

/// How to open the engine.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Adapter name substring or index (the CLI fills it from `--adapter` or `LDM_ADAPTER`).
    pub adapter: Option<String>,
    /// Graphics APIs to look for adapters on; `None`: Vulkan, Metal and DX12, then GL if none of
    /// those has an adapter (the CLI fills it from `WGPU_BACKEND`).
    pub backends: Option<wgpu::Backends>,
    /// Record per-dispatch GPU time with timestamp queries.
    pub profile: bool,
    /// Where to persist the driver's pipeline cache (Vulkan `PIPELINE_CACHE`).
    pub pipeline_cache_path: Option<PathBuf>,
    /// Which kernels run (tensor cores, tiles, VAE attention path, bounds checks); the CLI fills
    /// it from the `LDM_*` variables with [`KernelPolicy::from_env`].
    pub policy: KernelPolicy,
    /// The most bytes of tensors this engine may hold on the GPU (live plus pooled), or `None`
    /// for whatever the driver grants. A request that would pass it fails with an error naming
    /// the numbers, before the allocation, and the engine stays usable: for sharing a GPU with
    /// other programs, and for testing out-of-memory handling on any device.
    pub memory_budget: Option<u64>,
}

impl GpuOptions {
    /// What the environment asks of an engine: `LDM_ADAPTER`, `WGPU_BACKEND` and the kernel
    /// policy variables ([`KernelPolicy::from_env`]). For the CLI, the benches and the tests: the
    /// library never calls it itself.
    pub fn from_env() -> Result<GpuOptions> {
        Ok(GpuOptions {
            adapter: std::env::var("LDM_ADAPTER").ok().filter(|a| !a.is_empty()),
            backends: std::env::var("WGPU_BACKEND")
                .ok()
                .map(|_| wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)),
            policy: KernelPolicy::from_env()?,
            ..GpuOptions::default()
        })
    }
}

/// Counters for tests and the profile report.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecorderStats {
    pub dispatches: u64,
    pub submits: u64,
    pub pipelines_compiled: u64,
    /// Bind groups made with `create_bind_group` (a cache miss).
    pub bind_groups_created: u64,
    /// Dispatches that found their bind group in the cache.
    pub bind_groups_reused: u64,
    /// Bind groups held by the cache now.
    pub bind_groups_cached: u64,
}

/// One kernel launch: which pipeline, which tensors (indexed by binding number), the uniform
/// parameters and the grid.
pub struct Dispatch<'a> {
    pub shader: ShaderId,
    pub entry: &'static str,
    pub dtype: DType,
    pub overrides: &'a [(&'static str, f64)],
    /// `tensors[b]` is bound at storage binding `b`; the uniform binding receives `params`.
    pub tensors: &'a [&'a Tensor],
    pub params: &'a [u8],
    pub workgroups: [u32; 3],
    /// Name in the profile table (defaults to the entry point).
    pub label: &'a str,
    pub work: Work,
}

struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    params: Vec<u8>,
    ring: wgpu::Buffer,
    profiler: Option<Profiler>,
    stats: RecorderStats,
    bind_groups: BindGroupCache,
    /// Dry runs only: dispatches per profile label, for the dispatch-count breakdown.
    dry_labels: std::collections::BTreeMap<String, u64>,
}

/// Everything a bind group binds: the pipeline (its layout), the pool buffer at each storage
/// binding in binding order (`Tensor::buffer_id`, stable while the pool recycles the buffer) and
/// the uniform ring offset. A steady denoising loop repeats the same dispatches in the same ring
/// slots (the ring restarts at every flush) on the same pool buffers, so every step after the
/// first finds its bind groups here.
#[derive(Clone, PartialEq, Eq, Hash)]
struct BindGroupKey {
    /// `Arc::as_ptr` of the pipeline; the entry holds the `Arc`, so the address cannot be reused.
    pipeline: usize,
    ring_offset: u64,
    buffers: Vec<u64>,
}

struct CachedBindGroup {
    group: wgpu::BindGroup,
    _pipeline: Arc<pipeline::Pipeline>,
}

/// Bind groups by what they bind, bounded by two generations: a hit in `old` moves the entry to
/// `current`; when `current` is full it becomes `old` and the previous `old` is dropped. What a
/// loop uses every step survives; one-off dispatches (a decode at another size) age out. A
/// cached bind group keeps its buffers alive in the driver, so `trim_pool` evicts the entries of
/// the buffers it frees.
#[derive(Default)]
struct BindGroupCache {
    current: HashMap<BindGroupKey, CachedBindGroup>,
    old: HashMap<BindGroupKey, CachedBindGroup>,
}

impl BindGroupCache {
    fn get(&mut self, key: &BindGroupKey) -> Option<wgpu::BindGroup> {
        if let Some(e) = self.current.get(key) {
            return Some(e.group.clone());
        }
        let e = self.old.remove(key)?;
        let group = e.group.clone();
        self.insert(key.clone(), e);
        Some(group)
    }
    fn insert(&mut self, key: BindGroupKey, entry: CachedBindGroup) {
        if self.current.len() >= BIND_GROUP_GENERATION {
            self.old = std::mem::take(&mut self.current);
        }
        self.current.insert(key, entry);
    }
    fn evict_buffers(&mut self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        let gone: std::collections::HashSet<u64> = ids.iter().copied().collect();
        for map in [&mut self.current, &mut self.old] {
            map.retain(|k, _| !k.buffers.iter().any(|id| gone.contains(id)));
        }
    }
    fn len(&self) -> usize {
        self.current.len() + self.old.len()
    }
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterSummary,
    pub caps: Caps,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    pool: Arc<Mutex<BufferPool>>,
    /// Behind a lock so that one engine can switch paths between dispatches (the benches time
    /// both kernels of a shape on one device); `shader_checks` is fixed when the engine opens.
    policy: Mutex<KernelPolicy>,
    memory_budget: Option<u64>,
    pipelines: Mutex<PipelineCache>,
    driver_cache: Option<(wgpu::PipelineCache, PathBuf)>,
    recorder: Mutex<Recorder>,
    faults: Arc<faults::Faults>,
    /// A dry-run engine (see [`Gpu::dry_run`]): allocations are counted, nothing is created,
    /// recorded or submitted.
    dry_run: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Gpu {
    /// Open the best adapter (or the one requested) with its own limits and every optional
    /// feature we can use.
    pub fn new(options: &GpuOptions) -> Result<Gpu> {
        let requested = options.adapter.clone();
        let all = device::enumerate(options.backends);
        let infos: Vec<wgpu::AdapterInfo> = all.iter().map(|a| a.get_info()).collect();
        let adapter = device::choose_adapter(all, requested.as_deref())?;
        let index = infos
            .iter()
            .position(|i| *i == adapter.get_info())
            .unwrap_or(0);
        let summary = AdapterSummary::from_info(index, &adapter.get_info());
        let features = adapter.features() & device::wanted_features();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("ldm-wgpu"),
            required_features: features,
            required_limits: limits.clone(),
            // SAFETY: cooperative matrices are experimental in wgpu; we only use configurations
            // the adapter reports, and the coop path has to pass the same tests as the scalar one.
            experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Device(format!("request_device on {}: {e}", summary.name)))?;
        let caps = device::caps_for(&adapter, features, &limits);
        let faults = faults::Faults::install(&device);

        let driver_cache = match (&options.pipeline_cache_path, caps.pipeline_cache) {
            (Some(path), true) => {
                let file = std::fs::read(path).ok();
                // A damaged file is ignored (and rewritten on save), never handed to the driver.
                let data = file.as_deref().and_then(|f| disk_cache::unseal(f).ok());
                // SAFETY: `data` passed our checksum, so it is exactly what `save_pipeline_cache`
                // wrote; wgpu then checks its header against this adapter and driver version and
                // falls back to an empty cache on any mismatch.
                let cache = unsafe {
                    device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                        label: Some("ldm pipeline cache"),
                        data,
                        fallback: true,
                    })
                };
                Some((cache, path.clone()))
            }
            _ => None,
        };

        let ring = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params ring"),
            size: PARAMS_SLOT * RING_SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let profiler = (options.profile && caps.timestamps)
            .then(|| Profiler::new(&device, queue.get_timestamp_period()));
        Ok(Gpu {
            device,
            queue,
            adapter: summary,
            caps,
            features,
            limits,
            pool: Arc::new(Mutex::new(BufferPool::default())),
            memory_budget: options.memory_budget,
            pipelines: Mutex::new(PipelineCache::new(options.policy.shader_checks)),
            policy: Mutex::new(options.policy),
            driver_cache,
            recorder: Mutex::new(Recorder {
                encoder: None,
                pass: None,
                params: Vec::new(),
                ring,
                profiler,
                stats: RecorderStats::default(),
                bind_groups: BindGroupCache::default(),
                dry_labels: Default::default(),
            }),
            faults,
            dry_run: false,
        })
    }

    /// A dry-run twin of this engine, for measuring what a forward pass allocates without
    /// running it: the same device, capabilities and kernel policy, so every kernel wrapper
    /// takes the same decisions and allocates the same tensors, but `empty` creates no buffer
    /// (the twin's own pool counts the bytes: `pool_stats().peak_live_bytes` is the most alive
    /// at once, `largest_buffer` the largest), dispatches and copies are checked and dropped, and
    /// nothing is submitted. Weights of models loaded on the real engine may be passed in (they
    /// are never bound); reading a tensor back is an error. Memory budgets do not apply, since
    /// measuring is how the planner finds out whether something fits.
    pub fn dry_run(&self) -> Result<Gpu> {
        self.faults.check()?;
        let ring = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dry-run params"),
            size: PARAMS_SLOT,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Gpu {
            device: self.device.clone(),
            queue: self.queue.clone(),
            adapter: self.adapter.clone(),
            caps: self.caps.clone(),
            features: self.features,
            limits: self.limits.clone(),
            pool: Arc::new(Mutex::new(BufferPool::default())),
            memory_budget: None,
            pipelines: Mutex::new(PipelineCache::new(self.shader_checks_everywhere())),
            policy: Mutex::new(self.policy()),
            driver_cache: None,
            recorder: Mutex::new(Recorder {
                encoder: None,
                pass: None,
                params: Vec::new(),
                ring,
                profiler: None,
                stats: RecorderStats::default(),
                bind_groups: BindGroupCache::default(),
                dry_labels: Default::default(),
            }),
            faults: self.faults.clone(),
            dry_run: true,
        })
    }

    /// Whether this is a dry-run engine ([`Gpu::dry_run`]).
    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }

    /// Whether the device has been lost (a driver reset, the GPU removed): every later call
    /// returns an error, and a new `Gpu` is needed.
    pub fn is_lost(&self) -> bool {
        self.faults.is_lost()
    }

    /// Destroy the device as a driver reset would, to test recovery from device loss.
    #[doc(hidden)]
    pub fn simulate_device_loss(&self) {
        self.device.destroy();
    }

    /// Whether naga's runtime checks are compiled into every shader (see [`KernelPolicy`]).
    pub fn shader_checks_everywhere(&self) -> bool {
        lock(&self.pipelines).all_checks
    }

    /// The kernel policy in force.
    pub fn policy(&self) -> KernelPolicy {
        *lock(&self.policy)
    }

    /// Change the kernel policy for the dispatches recorded from now on (pipelines already
    /// compiled stay cached). Bounds checks are fixed when the engine opens: `shader_checks`
    /// here is ignored (see [`Gpu::shader_checks_everywhere`]).
    pub fn set_policy(&self, policy: KernelPolicy) {
        let checks = lock(&self.policy).shader_checks;
        *lock(&self.policy) = KernelPolicy {
            shader_checks: checks,
            ..policy
        };
    }

    /// Storage dtype the models use on this device.
    pub fn compute_dtype(&self) -> DType {
        self.caps.preferred_dtype()
    }

    /// Check that `dtype` can be used here.
    pub fn require_dtype(&self, dtype: DType) -> Result<()> {
        if dtype == DType::F16 && !self.caps.shader_f16 {
            return Err(Error::MissingFeature {
                feature: "SHADER_F16".into(),
                adapter: self.adapter.name.clone(),
            });
        }
        Ok(())
    }

    // ---------------------------------------------------------------- allocation

    /// An uninitialised tensor from the pool. Refuses tensors that could not be bound as one
    /// storage buffer (the kernels bind whole tensors).
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.require_dtype(dtype)?;
        self.faults.check()?;
        let bytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
        // The granule rounding must not push a tensor that fits over the binding limit (NVIDIA
        // reports 2^31 - 4 bytes, which no multiple of the granule equals): at the limit the
        // buffer is exactly the limit.
        let binding_limit = self.caps.max_storage_binding & !3;
        let size = bucket_size(bytes).min(binding_limit.max(bytes));
        if self.dry_run {
            // Counted even beyond the device's limits: the measurement says how far beyond.
            let id = lock(&self.pool).note_created(size);
            let storage = Arc::new(PooledBuffer::virtual_buffer(size, self.pool.clone(), id));
            return Ok(Tensor::from_parts(storage, shape.to_vec(), dtype));
        }
        if bytes > self.caps.max_storage_binding {
            return Err(Error::LimitExceeded {
                what: format!("tensor {:?} {} ({} bytes) as one storage binding", shape, dtype.name(), bytes),
                requested: bytes,
                limit: self.caps.max_storage_binding,
                hint:
                    "this adapter's max_storage_buffer_binding_size is too small for the tensor: use a smaller image \
                       size or batch, or tiled VAE decode (--vae-tiling)"
                        .into(),
            });
        }
        if size > self.caps.max_buffer {
            return Err(Error::LimitExceeded {
                what: format!("buffer for tensor {:?}", shape),
                requested: size,
                limit: self.caps.max_buffer,
                hint: "use a smaller image size or batch".into(),
            });
        }
        let reused = lock(&self.pool).take(size);
        let (id, buffer) = match reused {
            Some(entry) => entry,
            None => {
                self.check_budget(shape, size)?;
                let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                if pollster::block_on(scope.pop()).is_some() {
                    return Err(Error::OutOfMemory { requested: size });
                }
                (lock(&self.pool).note_created(size), b)
            }
        };
        let storage = Arc::new(PooledBuffer::new(buffer, self.pool.clone(), id));
        Ok(Tensor::from_parts(storage, shape.to_vec(), dtype))
    }

    /// Before creating a buffer of `size` bytes: within the memory budget, if one is set? Free
    /// pooled buffers are released first, since only live tensors really need the memory.
    fn check_budget(&self, shape: &[usize], size: u64) -> Result<()> {
        let Some(budget) = self.memory_budget else {
            return Ok(());
        };
        let held = |s: PoolStats| s.live_bytes + s.free_bytes;
        if held(self.pool_stats()) + size > budget {
            self.trim_pool();
        }
        let stats = self.pool_stats();
        if held(stats) + size > budget {
            const MIB: f64 = 1024.0 * 1024.0;
            return Err(Error::LimitExceeded {
                what: format!(
                    "GPU memory budget: tensor {shape:?} needs {:.1} MiB with {:.1} MiB in use",
                    size as f64 / MIB,
                    stats.live_bytes as f64 / MIB
                ),
                requested: stats.live_bytes + size,
                limit: budget,
                hint: "use a smaller image size or batch, tiled VAE decode (--vae-tiling) or f16, \
                       or raise the budget"
                    .into(),
            });
        }
        Ok(())
    }

    /// The memory budget this engine was opened with.
    pub fn memory_budget(&self) -> Option<u64> {
        self.memory_budget
    }

    /// Start measuring a new peak: the pool's peaks are reset to what it holds now and the
    /// largest buffer to none; returns the live bytes (the baseline a request's activations
    /// come on top of).
    pub fn begin_peak_window(&self) -> u64 {
        let mut pool = lock(&self.pool);
        pool.stats.peak_bytes = pool.stats.live_bytes + pool.stats.free_bytes;
        pool.stats.peak_live_bytes = pool.stats.live_bytes;
        pool.stats.largest_buffer = 0;
        pool.stats.live_bytes
    }

    pub fn pool_stats(&self) -> PoolStats {
        lock(&self.pool).stats
    }

    /// Release the pool's free buffers back to the driver (and the cached bind groups that
    /// would keep them alive).
    pub fn trim_pool(&self) {
        let freed = lock(&self.pool).trim();
        lock(&self.recorder).bind_groups.evict_buffers(&freed);
    }

    // ---------------------------------------------------------------- transfers

    /// Upload host f32 values, converted to `dtype`.
    pub fn upload(&self, data: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "upload",
                format!("{} values for shape {:?}", data.len(), shape),
            ));
        }
        let t = self.empty(shape, dtype)?;
        match dtype {
            DType::F32 => self.write_bytes(&t, bytemuck::cast_slice(data))?,
            DType::F16 => {
                let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                self.write_bytes(&t, bytemuck::cast_slice(&h))?
            }
        }
        Ok(t)
    }

    /// Upload f16 values as they are (no rounding) or widened to f32.
    pub fn upload_f16(&self, data: &[half::f16], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "upload",
                format!("{} values for shape {:?}", data.len(), shape),
            ));
        }
        let t = self.empty(shape, dtype)?;
        match dtype {
            DType::F16 => self.write_bytes(&t, bytemuck::cast_slice(data))?,
            DType::F32 => {
                let f: Vec<f32> = data.iter().map(|x| x.to_f32()).collect();
                self.write_bytes(&t, bytemuck::cast_slice(&f))?
            }
        }
        Ok(t)
    }

    /// Overwrite a tensor's contents from host bytes (already in its dtype).
    pub fn write_bytes(&self, t: &Tensor, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 != t.size_bytes() {
            return Err(Error::shape(
                "write",
                format!("{} bytes for {:?}", bytes.len(), t),
            ));
        }
        if self.dry_run {
            return Ok(());
        }
        // `write_buffer` lands before the commands still being recorded; the buffer may have been
        // recycled from a tensor those commands read, so submit them first.
        self.flush()?;
        let padded = bytes.len().div_ceil(4) * 4;
        if padded == bytes.len() {
            self.queue.write_buffer(t.buffer(), 0, bytes);
        } else {
            let mut v = bytes.to_vec();
            v.resize(padded, 0);
            self.queue.write_buffer(t.buffer(), 0, &v);
        }
        Ok(())
    }

    /// Record a copy of `bytes` bytes from `src` (at byte `src_offset`) into `dst` (at byte
    /// `dst_offset`) in the current encoder, in order with the dispatches: nothing is submitted.
    /// Offsets and size must be multiples of 4 and `src`, `dst` different buffers (wgpu's rules).
    pub fn copy_bytes(
        &self,
        src: &Tensor,
        src_offset: u64,
        dst: &Tensor,
        dst_offset: u64,
        bytes: u64,
    ) -> Result<()> {
        let align = wgpu::COPY_BUFFER_ALIGNMENT;
        if !src_offset.is_multiple_of(align)
            || !dst_offset.is_multiple_of(align)
            || !bytes.is_multiple_of(align)
        {
            return Err(Error::shape(
                "copy_bytes",
                format!("offsets {src_offset}, {dst_offset} and size {bytes} must be multiples of {align}"),
            ));
        }
        if src_offset + bytes > src.size_bytes() || dst_offset + bytes > dst.size_bytes() {
            return Err(Error::shape(
                "copy_bytes",
                format!("{bytes} bytes from {src:?} at {src_offset} into {dst:?} at {dst_offset} overrun a tensor"),
            ));
        }
        if src.buffer_id() == dst.buffer_id() {
            return Err(Error::shape(
                "copy_bytes",
                format!("{src:?} and {dst:?} share a buffer"),
            ));
        }
        if bytes == 0 || self.dry_run {
            return Ok(());
        }
        let mut rec = lock(&self.recorder);
        self.end_pass(&mut rec);
        self.encoder(&mut rec).copy_buffer_to_buffer(
            src.buffer(),
            src_offset,
            dst.buffer(),
            dst_offset,
            bytes,
        );
        Ok(())
    }

    /// Copy a tensor back to the host as f32 (f16 widened). Flushes and waits.
    pub fn download(&self, t: &Tensor) -> Result<Vec<f32>> {
        let bytes = self.download_bytes(t)?;
        Ok(match t.dtype() {
            DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes),
            DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes)
                .iter()
                .map(|h| h.to_f32())
                .collect(),
        })
    }

    pub fn download_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        if self.dry_run {
            return Err(Error::InvalidInput(
                "a dry run computes nothing, so nothing can be read back".into(),
            ));
        }
        let n = t.size_bytes();
        let size = n.div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: size.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut rec = lock(&self.recorder);
            self.end_pass(&mut rec);
            let enc = self.encoder(&mut rec);
            enc.copy_buffer_to_buffer(t.buffer(), 0, &staging, 0, size);
        }
        self.flush()?;
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.poll_idle()?;
        rx.recv()
            .map_err(|e| Error::Device(format!("readback: {e}")))?
            .map_err(|e| Error::Device(format!("readback map: {e}")))?;
        let data = slice
            .get_mapped_range()
            .map_err(|e| Error::Device(format!("readback range: {e:?}")))?;
        let out = data[..n as usize].to_vec();
        drop(data);
        staging.unmap();
        Ok(out)
    }

    /// Submit what is recorded and block until the GPU has finished it (and all earlier work).
    /// Recorded dispatches are otherwise submitted only at a step's end or a download, so a
    /// wait that did not flush could time nothing.
    pub fn wait(&self) -> Result<()> {
        self.flush()?;
        self.poll_idle()
    }

    /// Block until the GPU is idle (what is submitted; the recorder is not touched, so this may
    /// run while it is locked).
    fn poll_idle(&self) -> Result<()> {
        self.faults.check()?;
        if self.dry_run {
            return Ok(());
        }
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("poll: {e}")))?;
        self.faults.check()
    }

    // ---------------------------------------------------------------- recording

    fn encoder<'r>(&self, rec: &'r mut Recorder) -> &'r mut wgpu::CommandEncoder {
        rec.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("ldm step"),
                })
        })
    }

    fn end_pass(&self, rec: &mut Recorder) {
        rec.pass = None;
    }

    /// Get (compiling once) the pipeline for a key.
    pub fn pipeline(&self, key: &PipelineKey) -> Result<Arc<pipeline::Pipeline>> {
        lock(&self.pipelines).get(&self.device, self.driver_cache.as_ref().map(|c| &c.0), key)
    }

    /// Record one dispatch into the current encoder.
    pub fn dispatch(&self, d: &Dispatch<'_>) -> Result<()> {
        self.require_dtype(d.dtype)?;
        for (axis, &n) in d.workgroups.iter().enumerate() {
            if n > self.caps.max_workgroups_per_dim {
                return Err(Error::LimitExceeded {
                    what: format!("{}: workgroups along axis {axis}", d.entry),
                    requested: n as u64,
                    limit: self.caps.max_workgroups_per_dim as u64,
                    hint: "this is a bug: large 1-D grids must be folded with grid_1d".into(),
                });
            }
        }
        if d.params.len() as u64 > PARAMS_SLOT {
            return Err(Error::shape(
                d.entry,
                format!("params of {} bytes exceed {PARAMS_SLOT}", d.params.len()),
            ));
        }
        if self.dry_run {
            let mut rec = lock(&self.recorder);
            rec.stats.dispatches += 1;
            let label = if d.label.is_empty() { d.entry } else { d.label };
            *rec.dry_labels.entry(label.to_string()).or_default() += 1;
            return Ok(());
        }
        let key = PipelineKey {
            shader: d.shader,
            entry: d.entry,
            dtype: d.dtype,
            overrides: d.overrides.iter().map(|(n, v)| (*n, v.to_bits())).collect(),
        };
        let pipe = self.pipeline(&key)?;
        if d.workgroups.contains(&0) {
            return Ok(());
        }

        let mut rec = lock(&self.recorder);
        if rec.params.len() as u64 >= PARAMS_SLOT * RING_SLOTS
            || rec.profiler.as_ref().is_some_and(|p| p.is_full())
        {
            drop(rec);
            self.flush()?;
            rec = lock(&self.recorder);
        }
        let offset = rec.params.len() as u64;
        rec.params.extend_from_slice(d.params);
        rec.params.resize((offset + PARAMS_SLOT) as usize, 0);

        let tensor_at = |binding: u32| {
            d.tensors.get(binding as usize).ok_or_else(|| {
                Error::shape(
                    d.entry,
                    format!("no tensor given for storage binding {binding}"),
                )
            })
        };
        let mut buffers = Vec::with_capacity(pipe.bindings.len());
        for &(binding, kind) in &pipe.bindings {
            if kind != BindingKind::Uniform {
                buffers.push(tensor_at(binding)?.buffer_id());
            }
        }
        let key = BindGroupKey {
            pipeline: Arc::as_ptr(&pipe) as usize,
            ring_offset: offset,
            buffers,
        };
        let bind_group = match rec.bind_groups.get(&key) {
            Some(group) => {
                rec.stats.bind_groups_reused += 1;
                group
            }
            None => {
                let mut entries = Vec::with_capacity(pipe.bindings.len());
                for &(binding, kind) in &pipe.bindings {
                    let resource = match kind {
                        BindingKind::Uniform => {
                            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: &rec.ring,
                                offset,
                                size: wgpu::BufferSize::new(PARAMS_SLOT),
                            })
                        }
                        _ => tensor_at(binding)?.buffer().as_entire_binding(),
                    };
                    entries.push(wgpu::BindGroupEntry { binding, resource });
                }
                let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &pipe.layout,
                    entries: &entries,
                });
                rec.stats.bind_groups_created += 1;
                rec.bind_groups.insert(
                    key,
                    CachedBindGroup {
                        group: group.clone(),
                        _pipeline: pipe.clone(),
                    },
                );
                group
            }
        };

        let label = if d.label.is_empty() { d.entry } else { d.label };
        if rec.profiler.is_some() {
            // One pass per dispatch, with begin/end timestamps (needs only TIMESTAMP_QUERY).
            self.end_pass(&mut rec);
            let prof = rec.profiler.as_mut().expect("checked");
            let q = prof.pending.len() as u32 * 2;
            prof.pending.push((label.to_string(), d.work));
            let query_set = prof.query_set.clone();
            let enc = self.encoder(&mut rec);
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(label),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &query_set,
                    beginning_of_pass_write_index: Some(q),
                    end_of_pass_write_index: Some(q + 1),
                }),
            });
            pass.set_pipeline(&pipe.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
        } else {
            if rec.pass.is_none() {
                let enc = self.encoder(&mut rec);
                let pass = enc
                    .begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("ldm"),
                        timestamp_writes: None,
                    })
                    .forget_lifetime();
                rec.pass = Some(pass);
            }
            let pass = rec.pass.as_mut().expect("just created");
            pass.set_pipeline(&pipe.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
        }
        rec.stats.dispatches += 1;
        Ok(())
    }

    /// Submit everything recorded so far (one command buffer). Does not wait, except when
    /// profiling, where the timestamps are read back.
    pub fn flush(&self) -> Result<()> {
        self.faults.check()?;
        let mut rec = lock(&self.recorder);
        self.end_pass(&mut rec);
        let Some(mut encoder) = rec.encoder.take() else {
            return Ok(());
        };
        if !rec.params.is_empty() {
            self.queue.write_buffer(&rec.ring, 0, &rec.params);
            rec.params.clear();
        }
        let mut profiled = 0;
        if let Some(prof) = rec.profiler.as_ref() {
            profiled = prof.pending.len() as u32 * 2;
            if profiled > 0 {
                encoder.resolve_query_set(&prof.query_set, 0..profiled, &prof.resolve, 0);
                encoder.copy_buffer_to_buffer(
                    &prof.resolve,
                    0,
                    &prof.readback,
                    0,
                    profiled as u64 * 8,
                );
            }
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        self.queue.submit([encoder.finish()]);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Device(e.to_string()));
        }
        rec.stats.submits += 1;
        if profiled > 0 {
            let prof = rec.profiler.as_mut().expect("checked");
            let slice = prof.readback.slice(0..profiled as u64 * 8);
            slice.map_async(wgpu::MapMode::Read, |_| {});
            self.poll_idle()?;
            let ticks: Vec<u64> = {
                let data = slice
                    .get_mapped_range()
                    .map_err(|e| Error::Device(format!("timestamps: {e:?}")))?;
                bytemuck::pod_collect_to_vec(&data)
            };
            prof.readback.unmap();
            prof.accumulate(&ticks);
        }
        Ok(())
    }

    /// The (shader, entry point) of every pipeline compiled so far: which code paths ran.
    pub fn compiled_pipelines(&self) -> Vec<(ShaderId, &'static str)> {
        let mut keys: Vec<_> = lock(&self.pipelines)
            .pipelines
            .keys()
            .map(|k| (k.shader, k.entry))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// A dry run's dispatches so far, by profile label (empty on a real engine).
    pub fn dry_run_dispatches_by_label(&self) -> Vec<(String, u64)> {
        let rec = lock(&self.recorder);
        rec.dry_labels
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    pub fn stats(&self) -> RecorderStats {
        let rec = lock(&self.recorder);
        let mut s = rec.stats;
        s.bind_groups_cached = rec.bind_groups.len() as u64;
        drop(rec);
        s.pipelines_compiled = lock(&self.pipelines).compiled;
        s
    }

    /// True when timestamps are being recorded.
    pub fn profiling(&self) -> bool {
        lock(&self.recorder).profiler.is_some()
    }

    /// Turn timestamp profiling on or off from here on (flushes first). Profiling puts every
    /// dispatch in its own timestamped pass, which costs wall time, so benchmarks time steady
    /// state with it off and switch it on for the per-kernel table. Returns whether it is on
    /// (false when the adapter has no timestamp queries).
    pub fn set_profiling(&self, on: bool) -> Result<bool> {
        self.flush()?;
        let mut rec = lock(&self.recorder);
        if on && rec.profiler.is_none() && self.caps.timestamps {
            rec.profiler = Some(Profiler::new(
                &self.device,
                self.queue.get_timestamp_period(),
            ));
        } else if !on {
            rec.profiler = None;
        }
        Ok(rec.profiler.is_some())
    }

    /// Per-kernel GPU times gathered so far (flushes first).
    pub fn profile(&self) -> Result<BTreeMap<String, KernelTime>> {
        self.flush()?;
        Ok(lock(&self.recorder)
            .profiler
            .as_ref()
            .map(|p| p.table.clone())
            .unwrap_or_default())
    }

    pub fn reset_profile(&self) {
        if let Some(p) = lock(&self.recorder).profiler.as_mut() {
            p.table.clear();
            p.samples.clear();
        }
    }

    /// GPU time of every dispatch measured since the last call, as (label, nanoseconds).
    pub fn take_samples(&self) -> Result<Vec<(String, f64)>> {
        self.flush()?;
        Ok(lock(&self.recorder)
            .profiler
            .as_mut()
            .map(|p| std::mem::take(&mut p.samples))
            .unwrap_or_default())
    }

    /// Persist the driver's pipeline cache so the next start skips shader compilation.
    pub fn save_pipeline_cache(&self) -> Result<()> {
        if let Some((cache, path)) = &self.driver_cache {
            if let Some(data) = cache.get_data() {
                crate::util::write_atomic(path, &disk_cache::seal(&data))?;
            }
        }
        Ok(())
    }
}

/// Fold a 1-D count of workgroups into an (x, y) grid within 65,535 per dimension. Shaders
/// recover the linear index as `wid.x + wid.y * nwg.x` and skip indices past the end.
pub fn grid_1d(workgroups: u64) -> [u32; 3] {
    const MAX: u64 = 65_535;
    if workgroups <= MAX {
        return [workgroups as u32, 1, 1];
    }
    let y = workgroups.div_ceil(MAX);
    let x = workgroups.div_ceil(y);
    [x as u32, y as u32, 1]
}
