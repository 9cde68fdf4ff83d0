//! What the broker tells clients about a job: its state, finish reason, view and log lines.

use serde::{Deserialize, Serialize};

use crate::id::{JobId, WorkerId};

/// Where a job is in its life: `queued → assigned → running → finished`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobState {
    /// Waiting for a worker with a free slot.
    Queued,
    /// Pushed to a worker that has not accepted it yet.
    Assigned,
    /// Accepted by a worker: pulling, building, running or uploading (see [`Phase`]).
    Running,
    /// Done; see [`FinishReason`].
    Finished,
}

/// Why a job finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FinishReason {
    /// The container exited with code 0.
    Succeeded,
    /// The container exited with a non-zero code.
    Failed,
    /// The container ran past `maxDuration` and was stopped.
    TimedOut,
    /// A client cancelled it.
    Cancelled,
    /// A newer submission in the same namespace replaced it.
    Superseded,
    /// Infrastructure failed (image pull, build, input download, ...); see the message.
    Error,
    /// Its workers kept disappearing until the retry budget was spent.
    WorkerLost,
}

impl FinishReason {
    /// Deterministic outcomes are cached: resubmitting the same definition returns them.
    pub fn is_deterministic(self) -> bool {
        matches!(self, FinishReason::Succeeded | FinishReason::Failed | FinishReason::TimedOut)
    }

    pub const ALL: [FinishReason; 7] = [
        FinishReason::Succeeded,
        FinishReason::Failed,
        FinishReason::TimedOut,
        FinishReason::Cancelled,
        FinishReason::Superseded,
        FinishReason::Error,
        FinishReason::WorkerLost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Succeeded => "succeeded",
            FinishReason::Failed => "failed",
            FinishReason::TimedOut => "timedOut",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Superseded => "superseded",
            FinishReason::Error => "error",
            FinishReason::WorkerLost => "workerLost",
        }
    }
}

/// What a running job's worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    Pulling,
    Building,
    Preparing,
    Running,
    Uploading,
}

/// Progress of the current phase, e.g. bytes pulled of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// Which stream a log line came from. `system` lines are written by cq itself (pull progress,
/// truncation notices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Stream {
    Stdout,
    Stderr,
    System,
}

/// One line (or chunk) of a job's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogLine {
    pub stream: Stream,
    /// Milliseconds since the Unix epoch, as seen by the worker.
    pub time: u64,
    pub text: String,
}

/// An output file collected from `/outputs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// A job as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub id: JobId,
    pub queue: String,
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<FinishReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Number of the current (or last) assignment; 0 before the first.
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerId>,
    /// Always present (empty when none), as the protocol documents.
    #[serde(default)]
    pub namespaces: Vec<String>,
    pub priority: i32,
    /// Times in milliseconds since the Unix epoch.
    pub submitted_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Log lines stored so far; the next line has this offset.
    pub log_lines: u64,
    /// The log reached the broker's per-job cap: later output was dropped (the log says so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log_truncated: bool,
    /// Why a queued job is not running: no connected worker could take it, or it waits to be
    /// tried again after a transient error. Absent when it only waits for a free slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    #[serde(default)]
    pub outputs: Vec<OutputFile>,
    /// Increases with every change, so a client can drop stale updates.
    pub version: u64,
}

/// A connected worker as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerView {
    pub id: WorkerId,
    pub queues: Vec<String>,
    pub slots: u32,
    pub busy: u32,
    pub gpus: u32,
    #[serde(default)]
    pub tags: Vec<String>,
    pub connected: bool,
    pub draining: bool,
}

/// Counts for one queue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueSummary {
    pub queue: String,
    pub queued: u64,
    pub assigned: u64,
    pub running: u64,
    pub finished: u64,
    /// Age in milliseconds of the oldest queued job; absent when nothing is queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_queued_ms: Option<u64>,
    pub workers: u32,
    pub slots: u32,
    pub free_slots: u32,
}
