//! Prometheus text exposition for `/metrics`: requests by endpoint and status (the metric
//! `tools/serve_cluster.sh` reads), queue length, generation time, iterations/s and GPU memory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::queue::{lock, Queue};

/// Upper bounds of the generation-time histogram, seconds.
const BUCKETS: [f64; 10] = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Metrics {
    /// Count one answered request. `endpoint` is the route's pattern (bounded label values).
    pub fn record(&self, endpoint: &str, status: u16) {
        *lock(&self.requests)
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
    }

    pub fn render(&self, queue: &Queue) -> String {
        let mut out = String::new();
        out += "# HELP ldm_http_requests_total HTTP requests answered, by endpoint and status.\n";
        out += "# TYPE ldm_http_requests_total counter\n";
        for ((endpoint, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "ldm_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        out +=
            "# HELP ldm_queue_length Jobs waiting for a worker.\n# TYPE ldm_queue_length gauge\n";
        let _ = writeln!(out, "ldm_queue_length {}", queue.len());
        out += "# HELP ldm_jobs_running Jobs being generated.\n# TYPE ldm_jobs_running gauge\n";
        let _ = writeln!(out, "ldm_jobs_running {}", queue.running().len());
        out += "# HELP ldm_generation_seconds Time to run one job.\n";
        out += "# TYPE ldm_generation_seconds histogram\n";
        let times = lock(&queue.stats.generation_seconds).clone();
        for le in BUCKETS {
            let n = times.iter().filter(|&&t| t <= le).count();
            let _ = writeln!(out, "ldm_generation_seconds_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "ldm_generation_seconds_bucket{{le=\"+Inf\"}} {}",
            times.len()
        );
        let _ = writeln!(
            out,
            "ldm_generation_seconds_sum {}",
            times.iter().sum::<f64>()
        );
        let _ = writeln!(out, "ldm_generation_seconds_count {}", times.len());
        out += "# HELP ldm_iterations_per_second Model calls per second of the last job.\n";
        out += "# TYPE ldm_iterations_per_second gauge\n";
        let its = f64::from_bits(queue.stats.last_its.load(Ordering::Relaxed));
        let _ = writeln!(out, "ldm_iterations_per_second {its}");
        out += "# HELP ldm_gpu_pool_bytes GPU memory held by a worker's tensor pool.\n";
        out += "# TYPE ldm_gpu_pool_bytes gauge\n";
        for (i, slot) in queue.slots.iter().enumerate() {
            let bytes = slot.pool_bytes.load(Ordering::Relaxed);
            let _ = writeln!(out, "ldm_gpu_pool_bytes{{worker=\"{i}\"}} {bytes}");
        }
        out
    }
}
