//! The queue state machine. It does no IO and never reads the clock: every call to
//! [`Core::apply`] gets the time as an argument, and its results are durable [`Event`]s plus
//! [`Effect`]s (messages to connections) that the runtime delivers once the events are on disk.
//! Replay of the snapshot log goes through [`Core::replay`], which runs the same `evolve` code
//! that live commands use to change the state.

mod dispatch;
mod evolve;
mod reads;
mod recovery;
mod submission;
mod types;
mod watchers;
mod workers;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use protocol::id::validate_name;
use protocol::job::{FinishReason, JobState, JobView, LogLine, OutputFile, Progress, QueueSummary, WorkerView};
use protocol::messages::{
    BrokerToClient, BrokerToWorker, ErrorBody, ErrorCode, ExitStatus, SubmitOutcome, WorkerHello, WorkerToBroker,
};
use protocol::{JobId, MAX_HELLO_QUEUES, PROTOCOL_VERSION, WorkerId, close};
use serde_json::value::RawValue;

use crate::event::{Event, JobRecordV1, LogLineV1, OutputV1, ReasonV1, SnapshotV1, StateV1};
pub use types::*;

/// Most pending jobs one dispatch pass looks at when the head of the queue fits no worker
/// (e.g. GPU jobs waiting behind CPU-only workers). Bounds the cost of a dispatch.
pub const DISPATCH_SCAN_LIMIT: usize = 4096;
/// Queued jobs looked at per step of that scan.
const DISPATCH_CHUNK: usize = 32;
/// Most jobs a queue snapshot sent to a watcher lists (live ones first, then recent finished).
pub const SNAPSHOT_JOBS_LIMIT: usize = 1000;
/// Most finished jobs a queue snapshot lists.
pub const SNAPSHOT_FINISHED_LIMIT: usize = 200;
/// Most log lines in one `logs` message to a watcher.
pub const LOG_CHUNK_LINES: usize = 1000;
/// Most jobs one list request returns.
pub const LIST_LIMIT: usize = 1000;
/// Wait before the first retry of an attempt that failed with a transient error; doubles with
/// each further failure up to [`RETRY_BACKOFF_MAX_MS`], so a broken engine is not hammered.
pub const RETRY_BACKOFF_MS: u64 = 1_000;
/// Longest wait between retries.
pub const RETRY_BACKOFF_MAX_MS: u64 = 60_000;

/// The queue state: jobs, queues, namespaces (durable) and workers, connections and watchers
/// (volatile: rebuilt as peers reconnect).
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    now: u64,
    seq: u64,
    jobs: HashMap<JobId, Job>,
    queues: HashMap<Arc<str>, Queue>,
    namespaces: HashMap<(Arc<str>, String), JobId>,
    /// Finished jobs by the time they finished, for retention.
    retained: BTreeSet<(u64, JobId)>,
    /// Assignments not yet accepted, by the time they were made.
    unaccepted: BTreeSet<(u64, JobId)>,
    /// Queued jobs waiting out a retry backoff, by the time they may run again.
    retries_due: BTreeSet<(u64, JobId)>,
    workers: BTreeMap<WorkerId, Worker>,
    conns: HashMap<ConnId, Conn>,
    job_watchers: HashMap<JobId, Vec<ConnId>>,
    stats: Stats,
    events: Vec<Event>,
    effects: Vec<Effect>,
    dirty: Vec<JobId>,
    dirty_workers: BTreeSet<Arc<str>>,
    /// Queues with a worker whose slots in use changed: their watchers hear of it, but the
    /// reasons queued jobs wait (which depend on what workers can take, not on how busy they
    /// are) need no refresh.
    busy_workers: BTreeSet<Arc<str>>,
    /// Milliseconds each job waited in its queue before being assigned, since the last take.
    dispatch_latencies: Vec<u64>,
}

impl Core {
    pub fn new(config: CoreConfig) -> Core {
        Core {
            config,
            now: 0,
            seq: 0,
            jobs: HashMap::new(),
            queues: HashMap::new(),
            namespaces: HashMap::new(),
            retained: BTreeSet::new(),
            unaccepted: BTreeSet::new(),
            retries_due: BTreeSet::new(),
            workers: BTreeMap::new(),
            conns: HashMap::new(),
            job_watchers: HashMap::new(),
            stats: Stats::default(),
            events: Vec::new(),
            effects: Vec::new(),
            dirty: Vec::new(),
            dirty_workers: BTreeSet::new(),
            busy_workers: BTreeSet::new(),
            dispatch_latencies: Vec::new(),
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Forgets a queue that has no jobs, no workers and no watchers: queues are made on
    /// demand (by a submission, a worker hello, a watcher) and must not outlive their use.
    fn drop_queue_if_unused(&mut self, name: &Arc<str>) {
        if self.queues.get(name).is_some_and(|q| q.by_seq.is_empty() && q.workers.is_empty() && q.watchers.is_empty()) {
            self.queues.remove(name);
        }
    }

    /// Applies one command at time `now`. Events and effects accumulate until
    /// [`Core::take_output`]; the reply is for the caller, to be sent once they are durable.
    pub fn apply(&mut self, now: u64, command: Command) -> Reply {
        self.now = self.now.max(now);
        let reply = match command {
            Command::Submit(s) => self.submit(s),
            Command::Cancel { job, namespace } => self.cancel(job, namespace),
            Command::Forget { job } => self.forget(job),
            Command::WorkerHello { conn, hello } => self.worker_hello(conn, hello),
            Command::Worker { conn, msg } => self.worker_message(conn, msg),
            Command::WatchQueue { conn, queue } => self.watch_queue(conn, queue),
            Command::UnwatchQueue { conn, queue } => {
                self.unwatch_queue(conn, &queue);
                Reply::Done
            }
            Command::WatchJob { conn, job, since, follow } => self.watch_job(conn, job, since, follow),
            Command::UnwatchJob { conn, job } => {
                self.unwatch_job(conn, job);
                Reply::Done
            }
            Command::Disconnected { conn } => {
                self.disconnected(conn);
                Reply::Done
            }
            Command::Tick => {
                self.tick();
                Reply::Done
            }
            Command::GetJob { job } => match self.jobs.get(&job) {
                Some(j) => Reply::Job(j.view()),
                None => not_found(job),
            },
            Command::ListJobs { queue, state, limit } => Reply::Jobs(self.list(&queue, state, limit)),
            Command::Summary { queue } => Reply::Summary(self.summary(&queue)),
            Command::FindJobs { prefix, limit } => {
                // A scan of every retained job: prefixes are typed by people, a few at a time.
                let mut found: Vec<&Job> = self.jobs.values().filter(|j| prefix.matches(&j.id)).collect();
                found.sort_by_key(|j| std::cmp::Reverse(j.submitted_at));
                Reply::Jobs(found.into_iter().take(limit).map(Job::view).collect())
            }
            Command::GetLogs { job, since, limit } => match self.jobs.get(&job) {
                Some(j) => {
                    let start = (since as usize).min(j.logs.len());
                    let end = start.saturating_add(limit.max(1)).min(j.logs.len());
                    Reply::Logs {
                        offset: start as u64,
                        lines: j.logs[start..end].to_vec(),
                        total: j.logs.len() as u64,
                        finished: j.state == JobState::Finished,
                    }
                }
                None => not_found(job),
            },
            Command::GetDefinition { job } => match self.jobs.get(&job) {
                Some(j) => Reply::Definition(j.definition.clone()),
                None => not_found(job),
            },
            Command::Overview => Reply::Overview(self.overview()),
            Command::BlobRefs => Reply::BlobRefs {
                definitions: self.jobs.values().map(|j| j.definition.clone()).collect(),
                outputs: self.jobs.values().flat_map(|j| j.outputs.iter().map(|o| o.sha256.clone())).collect(),
            },
        };
        self.refresh_waiting();
        self.flush_notifications();
        #[cfg(debug_assertions)]
        self.check_slots();
        reply
    }

    /// The broker's half of the slot invariant (ARCHITECTURE.md), checked after every command in
    /// debug builds: an attempt a worker holds is the job's current attempt on that worker, or
    /// an attempt that is over and not yet reported (a cancel, a rerun elsewhere), never two of
    /// one job. Costs a walk over the held attempts, which the workers' slots bound. (A worker
    /// may hold more attempts than slots: one restarted with fewer slots keeps what it runs.)
    #[cfg(debug_assertions)]
    fn check_slots(&self) {
        for (wid, w) in &self.workers {
            for (job, h) in &w.held {
                let Some(j) = self.jobs.get(job) else { continue };
                if matches!(j.state, JobState::Assigned | JobState::Running) {
                    if j.worker.as_ref() == Some(wid) {
                        assert_eq!(j.attempt, h.attempt, "worker {wid} holds attempt {} of {job}", h.attempt);
                    } else {
                        assert!(
                            h.attempt < j.attempt,
                            "worker {wid} holds attempt {} of {job}, out elsewhere",
                            h.attempt
                        );
                    }
                }
            }
        }
    }

    /// How long (ms) each job assigned since the last call had waited in its queue.
    pub fn take_dispatch_latencies(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dispatch_latencies)
    }

    /// Events and effects produced since the last call.
    pub fn take_output(&mut self) -> (Vec<Event>, Vec<Effect>) {
        (std::mem::take(&mut self.events), std::mem::take(&mut self.effects))
    }

    /// Whether any events are waiting in the output.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next time [`Command::Tick`] has work to do: a worker's grace period ending, or a
    /// finished job's retention running out.
    pub fn next_deadline(&self) -> Option<u64> {
        let grace =
            self.workers.values().filter_map(|w| w.disconnected_at).min().map(|t| t + self.config.lease_grace_ms);
        let retention = self.retained.first().map(|(t, _)| t + self.config.retention_ms);
        let accept = self.unaccepted.first().map(|(t, _)| t + self.config.accept_timeout_ms);
        let retry = self.retries_due.first().map(|(t, _)| *t);
        [grace, retention, accept, retry].into_iter().flatten().min()
    }
}

fn not_found(job: JobId) -> Reply {
    let mut e = ErrorBody::new(ErrorCode::NotFound, format!("no job {job}"));
    e.job_id = Some(job);
    Reply::Error(e)
}

fn state_index(s: JobState) -> usize {
    match s {
        JobState::Queued => 0,
        JobState::Assigned => 1,
        JobState::Running => 2,
        JobState::Finished => 3,
    }
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Assigned => "assigned",
        JobState::Running => "running",
        JobState::Finished => "finished",
    }
}

impl Job {
    fn is_live(&self) -> bool {
        self.state != JobState::Finished
    }

    /// Whether `attempt` is out on a worker now. A job queued again (a rerun after a cancel)
    /// keeps the number of its last attempt until it is assigned, but that attempt is over.
    fn is_out(&self, attempt: u32) -> bool {
        matches!(self.state, JobState::Assigned | JobState::Running) && self.attempt == attempt
    }

    pub(crate) fn view(&self) -> JobView {
        JobView {
            id: self.id,
            queue: self.queue.to_string(),
            state: self.state,
            reason: self.reason,
            exit_code: self.exit_code,
            message: self.message.clone(),
            attempt: self.attempt,
            worker: self.worker.clone(),
            namespaces: self.namespaces.iter().cloned().collect(),
            priority: self.priority,
            submitted_at: self.submitted_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            progress: self.progress.clone(),
            log_lines: self.logs.len() as u64,
            log_truncated: self.log_full,
            waiting: self.waiting.clone(),
            outputs: self.outputs.clone(),
            version: self.version,
        }
    }
}

#[cfg(test)]
mod tests;
