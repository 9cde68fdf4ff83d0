//! The core's inputs (commands), outputs (replies and effects) and in-memory records.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use protocol::job::{FinishReason, JobState, LogLine, OutputFile, Progress, QueueSummary};
use protocol::messages::{BrokerToClient, BrokerToWorker, ErrorBody, SubmitOutcome, WorkerHello, WorkerToBroker};
use protocol::{JobId, JobView, WorkerId};

/// Identifies one connection (websocket or event stream) for the life of the broker process.
pub type ConnId = u64;

/// Settings of the queue core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// How long a disconnected worker keeps its jobs before they are queued again.
    pub lease_grace_ms: u64,
    /// How long finished jobs (and their logs) are kept.
    pub retention_ms: u64,
    /// How many lost attempts a job survives unless its submission says otherwise.
    pub default_retries: u32,
    /// Largest log kept per job; later output is dropped with a notice.
    pub max_log_bytes: usize,
    /// How often workers should send a heartbeat (told to them in the welcome).
    pub heartbeat_ms: u64,
    /// How long a connected worker may take to accept an assignment before it is taken back
    /// and queued again (without counting as a loss).
    pub accept_timeout_ms: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            lease_grace_ms: 30_000,
            retention_ms: 7 * 24 * 3600 * 1000,
            default_retries: 3,
            max_log_bytes: 16 << 20,
            heartbeat_ms: 5_000,
            accept_timeout_ms: 30_000,
        }
    }
}

/// Everything that can change or read the queue state.
#[derive(Debug)]
pub enum Command {
    Submit(Submit),
    Cancel {
        job: JobId,
        namespace: Option<String>,
    },
    /// Delete a finished job's result so the next submission runs it again.
    Forget {
        job: JobId,
    },
    WorkerHello {
        conn: ConnId,
        hello: WorkerHello,
    },
    Worker {
        conn: ConnId,
        msg: WorkerToBroker,
    },
    WatchQueue {
        conn: ConnId,
        queue: String,
    },
    UnwatchQueue {
        conn: ConnId,
        queue: String,
    },
    /// Watch a job; with `follow` the connection is closed once the job has finished.
    WatchJob {
        conn: ConnId,
        job: JobId,
        since: u64,
        follow: bool,
    },
    UnwatchJob {
        conn: ConnId,
        job: JobId,
    },
    Disconnected {
        conn: ConnId,
    },
    /// Time passed: expire grace periods and retention.
    Tick,
    GetJob {
        job: JobId,
    },
    ListJobs {
        queue: String,
        state: Option<JobState>,
        limit: usize,
    },
    Summary {
        queue: Option<String>,
    },
    /// Jobs whose id starts with `prefix`, newest first, at most `limit`.
    FindJobs {
        prefix: protocol::id::IdPrefix,
        limit: usize,
    },
    GetLogs {
        job: JobId,
        since: u64,
        limit: usize,
    },
    /// The normalised definition of a job, as JSON.
    GetDefinition {
        job: JobId,
    },
    Overview,
    /// Everything that references blobs, for the blob collector: the definition of every
    /// retained job (inputs) and the sha256 of every recorded output.
    BlobRefs,
}

impl Command {
    /// Reads change nothing, so their replies need not wait for the log.
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Command::GetDefinition { .. }
                | Command::GetJob { .. }
                | Command::ListJobs { .. }
                | Command::Summary { .. }
                | Command::FindJobs { .. }
                | Command::GetLogs { .. }
                | Command::Overview
                | Command::BlobRefs
        )
    }
}

/// A validated, normalised submission.
#[derive(Debug, Clone)]
pub struct Submit {
    pub queue: String,
    pub job: JobId,
    /// The normalised definition as JSON.
    pub definition: Arc<str>,
    pub gpus: u32,
    pub tags: Vec<String>,
    pub namespace: Option<String>,
    pub priority: i32,
    pub force: bool,
    pub retries: Option<u32>,
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Done,
    Submitted { outcome: SubmitOutcome, job: JobView },
    Cancelled(JobView),
    Job(JobView),
    Jobs(Vec<JobView>),
    Summary(Vec<QueueSummary>),
    Logs { offset: u64, lines: Vec<LogLine>, total: u64, finished: bool },
    Definition(Arc<str>),
    Overview(Overview),
    BlobRefs { definitions: Vec<Arc<str>>, outputs: Vec<String> },
    Error(ErrorBody),
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overview {
    pub queues: Vec<QueueSummary>,
    /// (queue, reason, count) of jobs finished since the broker started.
    pub finished: Vec<(String, FinishReason, u64)>,
    pub dispatched: u64,
    pub jobs: u64,
    pub workers: u64,
    pub connections: u64,
}

impl Overview {
    /// Adds another shard's overview to this one (their queues are distinct).
    pub fn add(&mut self, other: Overview) {
        self.queues.extend(other.queues);
        self.finished.extend(other.finished);
        self.dispatched += other.dispatched;
        self.jobs += other.jobs;
        self.workers += other.workers;
        self.connections += other.connections;
    }
}

/// A message the runtime must deliver once the events before it are durable.
#[derive(Debug, Clone)]
pub enum Effect {
    /// The same message to one or more client connections (serialised once).
    Client {
        to: Vec<ConnId>,
        msg: Arc<BrokerToClient>,
    },
    Worker {
        to: ConnId,
        msg: BrokerToWorker,
    },
    Close {
        conn: ConnId,
        code: u16,
        reason: &'static str,
    },
}

/// Whether a requeue counts against the job's retry budget, and how the job ends once the
/// budget is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loss {
    None,
    WorkerLost,
    Error,
}

#[derive(Debug)]
pub(crate) struct Job {
    pub id: JobId,
    pub queue: Arc<str>,
    pub definition: Arc<str>,
    pub gpus: u32,
    pub tags: Vec<String>,
    pub namespaces: BTreeSet<String>,
    /// Someone submitted it without a namespace; namespace changes never end it.
    pub anonymous: bool,
    pub priority: i32,
    pub retries: u32,
    pub attempt: u32,
    pub losses: u32,
    /// Submission order; FIFO within a priority.
    pub seq: u64,
    pub state: JobState,
    pub worker: Option<WorkerId>,
    pub reason: Option<FinishReason>,
    pub exit_code: Option<i64>,
    pub message: Option<String>,
    pub outputs: Vec<OutputFile>,
    pub submitted_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub logs: Vec<LogLine>,
    pub log_bytes: usize,
    pub log_full: bool,
    /// When the current assignment was made (not persisted; for the accept timeout).
    pub assigned_at: Option<u64>,
    /// When the job last entered the queue (not persisted; for the dispatch latency).
    pub queued_at: u64,
    /// Volatile: the worker's latest progress report.
    pub progress: Option<Progress>,
    /// Volatile: why a queued job does not run (see `JobView::waiting`).
    pub waiting: Option<String>,
    /// Volatile: a queued job is not dispatched before this time (a retry's backoff).
    pub not_before: u64,
    /// Volatile: the error that made the last attempt fail, while a retry waits.
    pub retry_reason: Option<String>,
    pub version: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// Queued jobs in dispatch order: priority (highest first), then submission order.
    pub pending: BTreeSet<(Reverse<i32>, u64)>,
    /// Every job of the queue by submission order.
    pub by_seq: BTreeMap<u64, JobId>,
    pub workers: BTreeSet<WorkerId>,
    pub watchers: Vec<ConnId>,
    /// Numbers the updates sent to watchers after their snapshot.
    pub delta_seq: u64,
    /// Jobs by state: queued, assigned, running, finished.
    pub counts: [u64; 4],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    pub attempt: u32,
    pub gpus: u32,
}

#[derive(Debug)]
pub(crate) struct Worker {
    pub id: WorkerId,
    pub conn: Option<ConnId>,
    pub queues: Vec<Arc<str>>,
    pub slots: u32,
    pub gpus: u32,
    pub tags: BTreeSet<String>,
    /// Attempts this worker holds a slot for.
    pub held: BTreeMap<JobId, Held>,
    pub draining: bool,
    pub disconnected_at: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Conn {
    pub queues: Vec<Arc<str>>,
    pub jobs: Vec<JobId>,
    pub worker: Option<WorkerId>,
    /// An event stream that ends when its job finishes.
    pub follow: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub finished: HashMap<(Arc<str>, FinishReason), u64>,
    pub dispatched: u64,
}
