//! Every websocket message, by direction. Each travels as one JSON text frame
//! `{"type": "...", "data": {...}}`; the first frame of every socket is a hello.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::definition::{DefinitionError, JobDefinition};
use crate::id::{JobId, WorkerId};
use crate::job::{JobView, LogLine, OutputFile, Phase, QueueSummary, WorkerView};

/// A client (browser, CLI) to the broker, on `/ws/client`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "camelCase", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum ClientToBroker {
    Hello(ClientHello),
    Submit(Box<SubmitMessage>),
    Cancel {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<u64>,
        job_id: JobId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
    },
    WatchQueue {
        queue: String,
    },
    UnwatchQueue {
        queue: String,
    },
    /// Follow one job: its state now and on every change, and its log from line `since`.
    WatchJob {
        job_id: JobId,
        #[serde(default)]
        since: u64,
    },
    UnwatchJob {
        job_id: JobId,
    },
}

/// The first message on a client socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientHello {
    pub protocol: u32,
    /// The client token, when the broker requires one and no `Authorization` header was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Free text naming the client, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// Put a job on a queue. `request` is echoed in the reply so a client can match them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubmitMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<u64>,
    pub queue: String,
    pub definition: JobDefinition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// The body of `POST /q/{queue}/j`: the same options as [`SubmitMessage`], the queue from the path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubmitBody {
    pub definition: JobDefinition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// What a submission did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SubmitOutcome {
    /// A new job was queued.
    Created,
    /// The same definition was already queued or running; the submission joined it.
    Joined,
    /// The same definition already finished with a deterministic outcome; that result is returned.
    Cached,
    /// A finished job was queued again (`force`, or its last outcome was not deterministic).
    Rerun,
}

/// The broker to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum BrokerToClient {
    Welcome {
        protocol: u32,
        broker: String,
    },
    Submitted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<u64>,
        outcome: SubmitOutcome,
        job: JobView,
    },
    Cancelled {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<u64>,
        job: JobView,
    },
    Error(ErrorBody),
    /// The state of a watched queue; `seq` numbers this and the following updates.
    QueueSnapshot {
        queue: String,
        seq: u64,
        summary: QueueSummary,
        jobs: Vec<JobView>,
        workers: Vec<WorkerView>,
    },
    /// A job of a watched queue changed.
    QueueJob {
        queue: String,
        seq: u64,
        job: JobView,
    },
    /// The workers of a watched queue changed.
    QueueWorkers {
        queue: String,
        seq: u64,
        workers: Vec<WorkerView>,
    },
    /// A watched job, now (the first after `watchJob`) and after every change.
    Job {
        job: JobView,
    },
    /// Log lines of a watched job; `offset` is the index of the first line.
    Logs {
        job_id: JobId,
        offset: u64,
        lines: Vec<LogLine>,
    },
}

/// An error answer: a stable code and a sentence for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The `request` of the message that failed, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
}

/// Stable error codes, shared by the websocket and HTTP APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorCode {
    /// Not JSON, or not a message this socket accepts.
    BadMessage,
    /// The job definition or an option is invalid; the message names the field.
    InvalidDefinition,
    TooLarge,
    Unauthorized,
    Forbidden,
    NotFound,
    /// The request contradicts the job's state (e.g. the job is live in another queue).
    Conflict,
    /// A worker spoke for an attempt that is no longer current.
    StaleAttempt,
    VersionMismatch,
    /// Bytes do not match the SHA-256 they were named by.
    HashMismatch,
    /// The broker cannot make the change durable right now, or the blob store is unreachable.
    Unavailable,
    Internal,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody { code, message: message.into(), request: None, job_id: None }
    }

    pub fn invalid(e: &DefinitionError) -> Self {
        let code = if e.malformed { ErrorCode::BadMessage } else { ErrorCode::InvalidDefinition };
        ErrorBody::new(code, e.to_string())
    }
}

/// A worker to the broker, on `/ws/worker`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "camelCase", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum WorkerToBroker {
    Hello(WorkerHello),
    /// The worker took responsibility for the assignment.
    Accept {
        job_id: JobId,
        attempt: u32,
    },
    /// Hand an assignment back unrun (e.g. while draining); it is queued again.
    Release {
        job_id: JobId,
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Progress {
        job_id: JobId,
        attempt: u32,
        phase: Phase,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        current: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total: Option<u64>,
    },
    Logs {
        job_id: JobId,
        attempt: u32,
        lines: Vec<LogLine>,
    },
    /// The attempt ended. The broker answers `finishAck` once the result is durable.
    Finish {
        job_id: JobId,
        attempt: u32,
        status: ExitStatus,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        outputs: Vec<OutputFile>,
    },
    Heartbeat,
    /// Stop sending assignments to this worker; it is shutting down.
    Drain,
}

/// The first message on a worker socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerHello {
    pub protocol: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub worker_id: WorkerId,
    pub queues: Vec<String>,
    /// Jobs it runs at once.
    pub slots: u32,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Assignments it still holds from before a reconnect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldJob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// An assignment a reconnecting worker still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeldJob {
    pub job_id: JobId,
    pub attempt: u32,
}

/// How an attempt ended, as the worker saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum ExitStatus {
    /// The container exited by itself.
    Exited { exit_code: i64 },
    /// The container was stopped for running past its limit.
    TimedOut {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i64>,
    },
    /// Something other than the job failed. With `retryable`, the broker queues the job again
    /// while its retry budget lasts.
    Error {
        message: String,
        #[serde(default)]
        retryable: bool,
    },
    /// The worker stopped the attempt because the broker cancelled it (or it was no longer
    /// assigned); its container is gone. This is the acknowledgement of a `cancel`: the broker
    /// frees the attempt's slot when it reads it.
    Cancelled,
}

/// The broker to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum BrokerToWorker {
    Welcome {
        protocol: u32,
        broker: String,
        heartbeat_ms: u64,
        lease_grace_ms: u64,
    },
    /// Run this job. `attempt` fences: messages about older attempts are refused.
    Assign {
        job_id: JobId,
        attempt: u32,
        queue: String,
        definition: Box<RawValue>,
    },
    /// Stop this attempt now (cancelled, superseded, or no longer yours).
    Cancel {
        job_id: JobId,
        attempt: u32,
        reason: String,
    },
    /// The finish of this attempt is durable; the worker may forget it.
    FinishAck {
        job_id: JobId,
        attempt: u32,
    },
    Error(ErrorBody),
}

impl BrokerToWorker {
    /// Parses the definition of an `assign`.
    pub fn assigned_definition(definition: &RawValue) -> Result<JobDefinition, DefinitionError> {
        crate::definition::parse_json(definition.get().as_bytes())
    }
}
