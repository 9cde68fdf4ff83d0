//! Prometheus metrics (prometheus-client): histograms and counters that the runtime and the
//! socket layers update as things happen, and per-queue gauges read from the core at each
//! scrape. Names and meanings are documented in `docs/operations.md`, "Metrics".

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::core::Overview;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueStateLabels {
    queue: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    queue: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabels {
    shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: String,
}

/// The metrics that live as long as the broker.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Seconds from a job entering its queue to its assignment to a worker.
    pub dispatch_latency: Histogram,
    /// Seconds per fsync of the snapshot log.
    pub fsync: Histogram,
    /// Bytes in the current log file since the last snapshot.
    pub log_file_bytes: Gauge,
    /// Bytes of job output received from workers.
    pub log_bytes: Counter,
    connections: Family<RoleLabels, Gauge>,
    shard_owned: Family<ShardLabels, Gauge>,
    shard_epoch: Family<ShardLabels, Gauge>,
    takeovers: Family<ShardLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            // 0.1 ms to ~100 s.
            dispatch_latency: Histogram::new(exponential_buckets(0.0001, 4.0, 11)),
            // 10 µs to ~2.6 s.
            fsync: Histogram::new(exponential_buckets(0.00001, 4.0, 10)),
            log_file_bytes: Gauge::default(),
            log_bytes: Counter::default(),
            connections: Family::default(),
            shard_owned: Family::default(),
            shard_epoch: Family::default(),
            takeovers: Family::default(),
        }
    }
}

/// Counts a connection of a role while it lives.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Counts an open connection of `role` (`client`, `worker` or `events`) until the guard drops.
    pub fn connection(&self, role: &str) -> ConnectionGuard {
        let gauge = self.connections.get_or_create(&RoleLabels { role: role.to_string() }).clone();
        gauge.inc();
        ConnectionGuard(gauge)
    }

    /// Notes that this broker serves `shard` from now on, under the lease taken at `epoch` (0
    /// without a lease: a broker with a local log owns its only shard).
    pub fn shard_serving(&self, shard: u32, epoch: Option<u64>) {
        let label = ShardLabels { shard: shard.to_string() };
        self.shard_owned.get_or_create(&label).set(1);
        self.shard_epoch.get_or_create(&label).set(epoch.unwrap_or(0) as i64);
        let takeovers = self.takeovers.get_or_create(&label);
        if epoch.is_some() {
            takeovers.inc();
        }
    }

    /// Notes that this broker no longer serves `shard` (it stopped, or lost the lease), or does
    /// not yet (a standby).
    pub fn shard_not_serving(&self, shard: u32) {
        let label = ShardLabels { shard: shard.to_string() };
        self.shard_owned.get_or_create(&label).set(0);
        // Present from the start, so a standby that never served says 0 rather than nothing.
        let _ = self.shard_epoch.get_or_create(&label);
        let _ = self.takeovers.get_or_create(&label);
    }

    /// The text exposition of every metric, with the per-queue ones taken from `o`.
    pub fn render(&self, o: &Overview) -> String {
        let mut r = Registry::default();
        let jobs = Family::<QueueStateLabels, Gauge>::default();
        let oldest = Family::<QueueLabels, Gauge<f64, AtomicU64>>::default();
        let workers = Family::<QueueLabels, Gauge>::default();
        let slots = Family::<QueueLabels, Gauge>::default();
        let free = Family::<QueueLabels, Gauge>::default();
        for q in &o.queues {
            let queue = QueueLabels { queue: q.queue.clone() };
            for (state, n) in
                [("queued", q.queued), ("assigned", q.assigned), ("running", q.running), ("finished", q.finished)]
            {
                jobs.get_or_create(&QueueStateLabels { queue: q.queue.clone(), state: state.into() }).set(n as i64);
            }
            oldest.get_or_create(&queue).set(q.oldest_queued_ms.unwrap_or(0) as f64 / 1000.0);
            workers.get_or_create(&queue).set(i64::from(q.workers));
            slots.get_or_create(&queue).set(i64::from(q.slots));
            free.get_or_create(&queue).set(i64::from(q.free_slots));
        }
        let finished = Family::<FinishedLabels, Counter>::default();
        for (queue, reason, n) in &o.finished {
            finished.get_or_create(&FinishedLabels { queue: queue.clone(), reason: reason.as_str().into() }).inc_by(*n);
        }
        let dispatched = Counter::<u64>::default();
        dispatched.inc_by(o.dispatched);
        r.register("cq_jobs", "Jobs held by the broker, by queue and state (queued = not yet assigned)", jobs);
        r.register("cq_oldest_queued_seconds", "Age of the oldest job still waiting in the queue", oldest);
        r.register("cq_workers", "Connected workers serving the queue", workers);
        r.register("cq_slots", "Job slots of the connected workers serving the queue", slots);
        r.register("cq_free_slots", "Free job slots of connected, non-draining workers", free);
        r.register("cq_jobs_finished", "Jobs finished since the broker started, by queue and reason", finished);
        r.register("cq_dispatched", "Assignments pushed to workers since the broker started", dispatched);
        r.register(
            "cq_dispatch_latency_seconds",
            "Time from a job entering its queue to its assignment to a worker",
            self.dispatch_latency.clone(),
        );
        r.register("cq_connections", "Open websocket and event-stream connections, by role", self.connections.clone());
        r.register("cq_job_log_bytes", "Bytes of job output received from workers", self.log_bytes.clone());
        r.register("cq_log_fsync_seconds", "Duration of each fsync of the snapshot log", self.fsync.clone());
        r.register(
            "cq_log_file_bytes",
            "Bytes in the current snapshot log file since the last snapshot",
            self.log_file_bytes.clone(),
        );
        r.register(
            "cq_shard_owned",
            "1 while this broker serves the shard (owns its log), else 0",
            self.shard_owned.clone(),
        );
        r.register(
            "cq_shard_epoch",
            "Epoch (lease revision) under which this broker last took the shard's log; 0 without a lease",
            self.shard_epoch.clone(),
        );
        r.register(
            "cq_shard_takeovers",
            "Times this broker took the shard's lease and served it",
            self.takeovers.clone(),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).expect("writing to a String cannot fail");
        text
    }
}
