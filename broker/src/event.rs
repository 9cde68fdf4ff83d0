//! The persisted records of the snapshot log, format version 1: every durable state change
//! (an [`Event`]) and the snapshot of the durable state. These types are the on-disk format;
//! they are separate from the wire types and the in-memory types on purpose. Change them only
//! by adding a new format version and a decoder for the old one.

use std::sync::Arc;

use protocol::job::{FinishReason, LogLine, OutputFile, Stream};
use serde::{Deserialize, Serialize};

/// A durable change to the queue state. The core emits events while applying commands and
/// replays the same events, through the same code, on recovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A job was queued (for the first time, or again after it finished).
    Submitted {
        job: [u8; 32],
        queue: Arc<str>,
        /// The normalised definition as JSON.
        definition: Arc<str>,
        gpus: u32,
        tags: Vec<String>,
        namespace: Option<String>,
        priority: i32,
        retries: u32,
        at: u64,
    },
    /// Another submission of a live (or cached) job: it now also belongs to `namespace`, or to
    /// a submitter without namespace when `None`.
    Joined { job: [u8; 32], namespace: Option<String> },
    /// The job no longer belongs to `namespace` (superseded there, or cancelled by it).
    NamespaceLeft { job: [u8; 32], namespace: String },
    /// The job was pushed to a worker as attempt `attempt`.
    Assigned { job: [u8; 32], worker: String, attempt: u32, at: u64 },
    /// The worker accepted the attempt.
    Started { job: [u8; 32], attempt: u32, at: u64 },
    /// Log lines were appended. `truncated` marks that the log reached its size limit.
    Logged { job: [u8; 32], lines: Vec<LogLineV1>, truncated: bool },
    /// The job went back to the queue; `lost` counts against its retry budget.
    Requeued { job: [u8; 32], lost: bool },
    Finished {
        job: [u8; 32],
        reason: ReasonV1,
        exit_code: Option<i64>,
        message: Option<String>,
        outputs: Vec<OutputV1>,
        at: u64,
    },
    /// The job and its result were removed (deleted by a client, or past retention).
    Forgotten { job: [u8; 32] },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReasonV1 {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Superseded,
    Error,
    WorkerLost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateV1 {
    Queued,
    Assigned,
    Running,
    Finished,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLineV1 {
    /// 0 stdout, 1 stderr, 2 system.
    pub stream: u8,
    pub time: u64,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputV1 {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// The durable state at one point of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotV1 {
    /// Next submission sequence number.
    pub seq: u64,
    pub jobs: Vec<JobRecordV1>,
    /// (queue, namespace, job): the newest job of each namespace.
    pub namespaces: Vec<(String, String, [u8; 32])>,
}

/// One job in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecordV1 {
    pub id: [u8; 32],
    pub queue: String,
    pub definition: String,
    pub gpus: u32,
    pub tags: Vec<String>,
    pub namespaces: Vec<String>,
    pub anonymous: bool,
    pub priority: i32,
    pub retries: u32,
    pub attempt: u32,
    pub losses: u32,
    pub seq: u64,
    pub state: StateV1,
    pub worker: Option<String>,
    pub reason: Option<ReasonV1>,
    pub exit_code: Option<i64>,
    pub message: Option<String>,
    pub outputs: Vec<OutputV1>,
    pub submitted_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub logs: Vec<LogLineV1>,
    pub log_full: bool,
    pub version: u64,
}

impl From<FinishReason> for ReasonV1 {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Succeeded => ReasonV1::Succeeded,
            FinishReason::Failed => ReasonV1::Failed,
            FinishReason::TimedOut => ReasonV1::TimedOut,
            FinishReason::Cancelled => ReasonV1::Cancelled,
            FinishReason::Superseded => ReasonV1::Superseded,
            FinishReason::Error => ReasonV1::Error,
            FinishReason::WorkerLost => ReasonV1::WorkerLost,
        }
    }
}

impl From<ReasonV1> for FinishReason {
    fn from(r: ReasonV1) -> Self {
        match r {
            ReasonV1::Succeeded => FinishReason::Succeeded,
            ReasonV1::Failed => FinishReason::Failed,
            ReasonV1::TimedOut => FinishReason::TimedOut,
            ReasonV1::Cancelled => FinishReason::Cancelled,
            ReasonV1::Superseded => FinishReason::Superseded,
            ReasonV1::Error => FinishReason::Error,
            ReasonV1::WorkerLost => FinishReason::WorkerLost,
        }
    }
}

impl From<&LogLine> for LogLineV1 {
    fn from(l: &LogLine) -> Self {
        let stream = match l.stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
            Stream::System => 2,
        };
        LogLineV1 { stream, time: l.time, text: l.text.clone() }
    }
}

impl From<&LogLineV1> for LogLine {
    fn from(l: &LogLineV1) -> Self {
        let stream = match l.stream {
            0 => Stream::Stdout,
            1 => Stream::Stderr,
            _ => Stream::System,
        };
        LogLine { stream, time: l.time, text: l.text.clone() }
    }
}

impl From<&OutputFile> for OutputV1 {
    fn from(o: &OutputFile) -> Self {
        OutputV1 { path: o.path.clone(), size: o.size, sha256: o.sha256.clone() }
    }
}

impl From<&OutputV1> for OutputFile {
    fn from(o: &OutputV1) -> Self {
        OutputFile { path: o.path.clone(), size: o.size, sha256: o.sha256.clone() }
    }
}
