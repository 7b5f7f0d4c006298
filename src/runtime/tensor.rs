//! Tensors: a pooled GPU buffer + shape + dtype, and the buffer pool that makes a steady loop
//! (one denoising step after another) allocate nothing after warm-up.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Storage type of a tensor on the GPU. Arithmetic in kernels is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
            _ => Err(format!("unknown dtype `{s}` (expected f32 or f16)")),
        }
    }
}

/// Buffers are bucketed by size rounded up to this many bytes, so that vec4 loads of the last
/// elements stay in bounds and near-equal sizes share buffers.
pub const BUFFER_GRANULE: u64 = 256;

pub fn bucket_size(bytes: u64) -> u64 {
    bytes.max(1).div_ceil(BUFFER_GRANULE) * BUFFER_GRANULE
}

/// Live and lifetime counters of the pool, for tests and `--profile`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes held by live tensors.
    pub live_bytes: u64,
    /// Number of live tensors' buffers.
    pub live_buffers: u64,
    /// Bytes held in the free lists, ready for reuse.
    pub free_bytes: u64,
    /// Buffers ever created with `create_buffer` (a steady loop must not grow this).
    pub created: u64,
    /// Allocations served from the free lists.
    pub reused: u64,
    /// Highest `live_bytes + free_bytes` seen: the pool's GPU memory footprint.
    pub peak_bytes: u64,
    /// Highest `live_bytes` seen: what the tensors themselves needed at once.
    pub peak_live_bytes: u64,
    /// The largest buffer created: it had to fit one storage binding.
    pub largest_buffer: u64,
}

/// Free buffers by bucket size, then by id. Each buffer keeps the id it was given at creation for
/// its whole life, across any number of tensors: bind groups are cached by these ids.
///
/// `take` hands out the free buffer with the smallest id, so which buffer a tensor gets depends
/// only on which buffers are free, not on the order they were freed in. A steady loop frees its
/// temporaries in another order than it allocates them; with a last-in-first-out free list every
/// step would see its buffers permuted (and miss its cached bind groups), with this rule every
/// step that starts with the same live buffers gets the same ones.
#[derive(Default)]
pub(crate) struct BufferPool {
    free: HashMap<u64, BTreeMap<u64, wgpu::Buffer>>,
    pub(crate) stats: PoolStats,
}

impl BufferPool {
    /// A free buffer of exactly `size` bytes, with its id.
    pub(crate) fn take(&mut self, size: u64) -> Option<(u64, wgpu::Buffer)> {
        let entry = self.free.get_mut(&size)?.pop_first()?;
        self.stats.free_bytes -= size;
        self.stats.reused += 1;
        self.stats.live_bytes += size;
        self.stats.live_buffers += 1;
        self.stats.peak_live_bytes = self.stats.peak_live_bytes.max(self.stats.live_bytes);
        Some(entry)
    }
    /// Count a freshly created buffer as live; returns its id (never 0, never reused).
    pub(crate) fn note_created(&mut self, size: u64) -> u64 {
        self.stats.created += 1;
        self.stats.largest_buffer = self.stats.largest_buffer.max(size);
        self.stats.live_bytes += size;
        self.stats.live_buffers += 1;
        let total = self.stats.live_bytes + self.stats.free_bytes;
        self.stats.peak_bytes = self.stats.peak_bytes.max(total);
        self.stats.peak_live_bytes = self.stats.peak_live_bytes.max(self.stats.live_bytes);
        // Unique across every pool of the process: a dry run's tensors (another pool) meet the
        // real engine's weights in the same kernel calls, whose aliasing checks compare ids.
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
    /// A dry run's tensor (no buffer behind it) goes away: only the counters change.
    fn release_virtual(&mut self, size: u64) {
        self.stats.live_bytes -= size;
        self.stats.live_buffers -= 1;
    }
    fn give_back(&mut self, id: u64, buffer: wgpu::Buffer) {
        let size = buffer.size();
        self.stats.live_bytes -= size;
        self.stats.live_buffers -= 1;
        self.stats.free_bytes += size;
        self.free.entry(size).or_default().insert(id, buffer);
    }
    /// Drop every free buffer (e.g. between models, to return memory to the driver). Returns the
    /// ids of the dropped buffers, so that whatever still refers to them (cached bind groups) can
    /// let go too.
    pub(crate) fn trim(&mut self) -> Vec<u64> {
        let ids = self
            .free
            .values()
            .flat_map(|bucket| bucket.keys().copied())
            .collect();
        self.free.clear();
        self.stats.free_bytes = 0;
        ids
    }
}

/// A buffer owned by one or more tensors; returns itself to the pool when the last owner drops.
/// In a dry run (`Gpu::dry_run`) the buffer is absent: the tensor has a size and an id but no
/// memory, and only a dry-run engine, which never binds or copies, sees it.
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    size: u64,
    pool: Arc<Mutex<BufferPool>>,
    id: u64,
}

impl PooledBuffer {
    pub(crate) fn new(buffer: wgpu::Buffer, pool: Arc<Mutex<BufferPool>>, id: u64) -> Self {
        PooledBuffer {
            size: buffer.size(),
            buffer: Some(buffer),
            pool,
            id,
        }
    }
    /// A dry run's buffer: counted by the pool, never created.
    pub(crate) fn virtual_buffer(size: u64, pool: Arc<Mutex<BufferPool>>, id: u64) -> Self {
        PooledBuffer {
            buffer: None,
            size,
            pool,
            id,
        }
    }
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer
            .as_ref()
            .expect("a dry run's tensor was given to an engine that runs kernels")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Ok(mut pool) = self.pool.lock() {
            match self.buffer.take() {
                Some(buffer) => pool.give_back(self.id, buffer),
                None => pool.release_virtual(self.size),
            }
        }
    }
}

/// A GPU tensor: contiguous, row-major, `shape` in elements. Cloning shares the buffer.
///
/// Activations are NHWC (`[batch, height, width, channels]`) throughout the models: see
/// ARCHITECTURE.md for why.
#[derive(Clone)]
pub struct Tensor {
    pub(crate) storage: Arc<PooledBuffer>,
    shape: Vec<usize>,
    dtype: DType,
}

impl Tensor {
    pub(crate) fn from_parts(storage: Arc<PooledBuffer>, shape: Vec<usize>, dtype: DType) -> Self {
        Tensor {
            storage,
            shape,
            dtype,
        }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn size_bytes(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.storage.buffer()
    }
    /// The identity of the underlying pool buffer: given when the buffer is created and kept
    /// while the pool recycles it, so tensors that share it (clones, reshapes) or that get it
    /// later from the pool have the same id. Two live tensors with the same id alias. Bind
    /// groups are cached by it.
    pub fn buffer_id(&self) -> u64 {
        self.storage.id
    }
    /// The same data seen with another shape of the same element count (no copy).
    pub fn reshape(&self, shape: &[usize]) -> crate::Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(crate::Error::shape(
                "reshape",
                format!(
                    "cannot view {:?} ({} elements) as {:?} ({} elements)",
                    self.shape,
                    self.numel(),
                    shape,
                    n
                ),
            ));
        }
        Ok(Tensor {
            storage: self.storage.clone(),
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }
    /// Dimension `i`, counting negative indices from the end as in PyTorch.
    pub fn dim(&self, i: isize) -> usize {
        let r = self.shape.len() as isize;
        self.shape[if i < 0 { (r + i) as usize } else { i as usize }]
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype.name())
    }
}
