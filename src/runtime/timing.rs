//! GPU timing with timestamp queries: one begin/end pair per dispatch, resolved at each flush,
//! summed per kernel label into the table `ldm --profile` prints.

use std::collections::BTreeMap;

/// Per-kernel totals.
#[derive(Clone, Debug, Default)]
pub struct KernelTime {
    pub calls: u64,
    pub total_ns: f64,
    pub flops: f64,
    pub bytes: f64,
}

/// The work one dispatch does, for GFLOP/s and GB/s columns.
#[derive(Clone, Copy, Debug, Default)]
pub struct Work {
    pub flops: f64,
    pub bytes: f64,
}

pub(crate) const MAX_QUERIES: u32 = 4096;

pub(crate) struct Profiler {
    pub(crate) query_set: wgpu::QuerySet,
    pub(crate) resolve: wgpu::Buffer,
    pub(crate) readback: wgpu::Buffer,
    /// Label and work of each pending begin/end pair, in query order.
    pub(crate) pending: Vec<(String, Work)>,
    pub(crate) table: BTreeMap<String, KernelTime>,
    /// Every measured dispatch (label, ns) since the last `take_samples`, for medians.
    pub(crate) samples: Vec<(String, f64)>,
    pub(crate) period_ns: f64,
}

impl Profiler {
    pub(crate) fn new(device: &wgpu::Device, period_ns: f32) -> Self {
        let bytes = MAX_QUERIES as u64 * 8;
        Profiler {
            query_set: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profiler"),
                ty: wgpu::QueryType::Timestamp,
                count: MAX_QUERIES,
            }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profiler resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profiler readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            pending: Vec::new(),
            table: BTreeMap::new(),
            samples: Vec::new(),
            period_ns: period_ns as f64,
        }
    }

    pub(crate) fn is_full(&self) -> bool {
        (self.pending.len() as u32 + 1) * 2 > MAX_QUERIES
    }

    pub(crate) fn accumulate(&mut self, ticks: &[u64]) {
        for (i, (label, work)) in self.pending.drain(..).enumerate() {
            let (begin, end) = (ticks[2 * i], ticks[2 * i + 1]);
            let ns = end.saturating_sub(begin) as f64 * self.period_ns;
            if self.samples.len() < 1 << 20 {
                self.samples.push((label.clone(), ns));
            }
            let e = self.table.entry(label).or_default();
            e.calls += 1;
            e.total_ns += ns;
            e.flops += work.flops;
            e.bytes += work.bytes;
        }
    }
}

/// Format the per-kernel table, slowest first.
pub fn format_table(table: &BTreeMap<String, KernelTime>) -> String {
    let mut rows: Vec<_> = table.iter().collect();
    rows.sort_by(|a, b| b.1.total_ns.total_cmp(&a.1.total_ns));
    let total: f64 = rows.iter().map(|r| r.1.total_ns).sum();
    let mut out = format!(
        "{:<28} {:>7} {:>11} {:>10} {:>6} {:>10} {:>9}\n",
        "kernel", "calls", "total ms", "mean µs", "%", "GFLOP/s", "GB/s"
    );
    for (name, t) in rows {
        let secs = t.total_ns * 1e-9;
        let rate = |x: f64| {
            if x > 0.0 && secs > 0.0 {
                format!("{:.1}", x / secs * 1e-9)
            } else {
                "-".into()
            }
        };
        out += &format!(
            "{:<28} {:>7} {:>11.3} {:>10.1} {:>6.1} {:>10} {:>9}\n",
            name,
            t.calls,
            t.total_ns * 1e-6,
            t.total_ns * 1e-3 / t.calls.max(1) as f64,
            100.0 * t.total_ns / total.max(1e-9),
            rate(t.flops),
            rate(t.bytes)
        );
    }
    out += &format!("{:<28} {:>7} {:>11.3}\n", "total", "", total * 1e-6);
    out
}
