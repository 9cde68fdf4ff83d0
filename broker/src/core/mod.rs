//! The queue state machine. It does no IO and never reads the clock: every call to
//! [`Core::apply`] gets the time as an argument, and its results are durable [`Event`]s plus
//! [`Effect`]s (messages to connections) that the runtime delivers once the events are on disk.
//! Replay of the snapshot log goes through [`Core::replay`], which runs the same `evolve` code
//! that live commands use to change the state.

mod types;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use protocol::id::validate_name;
use protocol::job::{FinishReason, JobState, JobView, LogLine, OutputFile, Progress, QueueSummary, WorkerView};
use protocol::messages::{
    BrokerToClient, BrokerToWorker, ErrorBody, ErrorCode, ExitStatus, SubmitOutcome, WorkerHello, WorkerToBroker,
};
use protocol::{JobId, PROTOCOL_VERSION, WorkerId, close};
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
    workers: BTreeMap<WorkerId, Worker>,
    conns: HashMap<ConnId, Conn>,
    job_watchers: HashMap<JobId, Vec<ConnId>>,
    stats: Stats,
    events: Vec<Event>,
    effects: Vec<Effect>,
    dirty: Vec<JobId>,
    dirty_workers: BTreeSet<Arc<str>>,
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
            workers: BTreeMap::new(),
            conns: HashMap::new(),
            job_watchers: HashMap::new(),
            stats: Stats::default(),
            events: Vec::new(),
            effects: Vec::new(),
            dirty: Vec::new(),
            dirty_workers: BTreeSet::new(),
            dispatch_latencies: Vec::new(),
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
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
        self.flush_notifications();
        reply
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
        [grace, retention, accept].into_iter().flatten().min()
    }

    // ---- recovery ----

    /// Applies a recorded event during recovery: the same `evolve` as live traffic, no effects.
    pub fn replay(&mut self, event: &Event) {
        self.evolve(event);
        self.dirty.clear();
    }

    /// Ends recovery at time `now`: workers that held jobs are treated as disconnected now, so
    /// they have the full grace period to come back for them.
    pub fn finish_recovery(&mut self, now: u64) {
        self.now = self.now.max(now);
        let held: Vec<(JobId, WorkerId, u32, u32)> = self
            .jobs
            .values()
            .filter(|j| matches!(j.state, JobState::Assigned | JobState::Running))
            .filter_map(|j| j.worker.clone().map(|w| (j.id, w, j.attempt, j.gpus)))
            .collect();
        for (job, worker, attempt, gpus) in held {
            let w = self.workers.entry(worker.clone()).or_insert_with(|| Worker::ghost(worker, now));
            w.held.insert(job, Held { attempt, gpus });
        }
        self.stats = Stats::default();
        // After a restart the workers' grace period governs their assignments instead.
        self.unaccepted.clear();
        self.dirty.clear();
        self.events.clear();
        self.effects.clear();
    }

    /// The durable state, for a snapshot.
    pub fn snapshot(&self) -> SnapshotV1 {
        let mut jobs: Vec<&Job> = self.jobs.values().collect();
        jobs.sort_by_key(|j| j.seq);
        SnapshotV1 {
            seq: self.seq,
            jobs: jobs.into_iter().map(Job::record).collect(),
            namespaces: self.namespaces.iter().map(|((q, ns), id)| (q.to_string(), ns.clone(), id.0)).collect(),
        }
    }

    /// Restores the durable state from a snapshot (before replaying the log tail).
    pub fn restore(&mut self, snapshot: SnapshotV1) {
        self.seq = snapshot.seq;
        for r in snapshot.jobs {
            let job = Job::from_record(r);
            let queue = self.queue_name(Some(&job.queue));
            let q = self.queues.entry(queue).or_default();
            q.by_seq.insert(job.seq, job.id);
            q.counts[state_index(job.state)] += 1;
            if job.state == JobState::Queued {
                q.pending.insert((Reverse(job.priority), job.seq));
            }
            if let Some(at) = job.finished_at.filter(|_| job.state == JobState::Finished) {
                self.retained.insert((at, job.id));
            }
            self.jobs.insert(job.id, job);
        }
        for (queue, ns, id) in snapshot.namespaces {
            let queue = self.queue_name(Some(&queue));
            self.namespaces.insert((queue, ns), JobId(id));
        }
    }

    /// Number of jobs held, for logs and metrics.
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    // ---- commands ----

    fn submit(&mut self, s: Submit) -> Reply {
        if let Err(m) = validate_name("queue", &s.queue, false) {
            return Reply::Error(ErrorBody::new(ErrorCode::InvalidDefinition, m));
        }
        if let Some(ns) = &s.namespace {
            if let Err(m) = validate_name("namespace", ns, true) {
                return Reply::Error(ErrorBody::new(ErrorCode::InvalidDefinition, m));
            }
        }
        let queue = self.queue_name(Some(&s.queue));
        let outcome = match self.jobs.get(&s.job) {
            Some(j) if j.is_live() && j.queue != queue => {
                let mut e = ErrorBody::new(
                    ErrorCode::Conflict,
                    format!(
                        "job {} is already {} in queue `{}`; watch it there or cancel it first",
                        s.job,
                        state_name(j.state),
                        j.queue
                    ),
                );
                e.job_id = Some(s.job);
                return Reply::Error(e);
            }
            Some(j) if j.is_live() => SubmitOutcome::Joined,
            Some(j) if j.queue == queue && !s.force && j.reason.is_some_and(FinishReason::is_deterministic) => {
                SubmitOutcome::Cached
            }
            Some(_) => SubmitOutcome::Rerun,
            None => SubmitOutcome::Created,
        };
        if let Some(ns) = &s.namespace {
            self.supersede(&queue, ns, s.job);
        }
        match outcome {
            SubmitOutcome::Joined | SubmitOutcome::Cached => {
                let j = &self.jobs[&s.job];
                let news = match &s.namespace {
                    Some(ns) => {
                        !j.namespaces.contains(ns) || self.namespaces.get(&(queue.clone(), ns.clone())) != Some(&s.job)
                    }
                    None => !j.anonymous,
                };
                if news {
                    self.emit(Event::Joined { job: s.job.0, namespace: s.namespace });
                }
            }
            SubmitOutcome::Created | SubmitOutcome::Rerun => {
                self.emit(Event::Submitted {
                    job: s.job.0,
                    queue: queue.clone(),
                    definition: s.definition,
                    gpus: s.gpus,
                    tags: s.tags,
                    namespace: s.namespace,
                    priority: s.priority,
                    retries: s.retries.unwrap_or(self.config.default_retries),
                    at: self.now,
                });
                self.dispatch(&queue);
            }
        }
        Reply::Submitted { outcome, job: self.jobs[&s.job].view() }
    }

    /// A new submission in `namespace` replaces the namespace's older live job; that job ends as
    /// `superseded` unless another namespace (or a submitter without one) still wants it.
    fn supersede(&mut self, queue: &Arc<str>, namespace: &str, newer: JobId) {
        let Some(&older) = self.namespaces.get(&(queue.clone(), namespace.to_string())) else { return };
        if older == newer {
            return;
        }
        let Some(j) = self.jobs.get(&older) else { return };
        if !j.is_live() || !j.namespaces.contains(namespace) {
            return;
        }
        self.emit(Event::NamespaceLeft { job: older.0, namespace: namespace.to_string() });
        let j = &self.jobs[&older];
        if j.namespaces.is_empty() && !j.anonymous {
            self.stop(older, FinishReason::Superseded, format!("superseded by job {newer} in namespace `{namespace}`"));
        }
    }

    fn cancel(&mut self, job: JobId, namespace: Option<String>) -> Reply {
        let Some(j) = self.jobs.get(&job) else { return not_found(job) };
        if !j.is_live() {
            return Reply::Cancelled(j.view());
        }
        match namespace {
            Some(ns) => {
                if !j.namespaces.contains(&ns) {
                    let mut e =
                        ErrorBody::new(ErrorCode::NotFound, format!("job {job} does not belong to namespace `{ns}`"));
                    e.job_id = Some(job);
                    return Reply::Error(e);
                }
                self.emit(Event::NamespaceLeft { job: job.0, namespace: ns.clone() });
                let j = &self.jobs[&job];
                if j.namespaces.is_empty() && !j.anonymous {
                    self.stop(job, FinishReason::Cancelled, format!("cancelled by namespace `{ns}`"));
                }
            }
            None => self.stop(job, FinishReason::Cancelled, "cancelled by a client".into()),
        }
        Reply::Cancelled(self.jobs[&job].view())
    }

    fn forget(&mut self, job: JobId) -> Reply {
        let Some(j) = self.jobs.get(&job) else { return not_found(job) };
        if j.is_live() {
            let mut e = ErrorBody::new(
                ErrorCode::Conflict,
                format!("job {job} is {}; cancel it before deleting its result", state_name(j.state)),
            );
            e.job_id = Some(job);
            return Reply::Error(e);
        }
        self.emit(Event::Forgotten { job: job.0 });
        Reply::Done
    }

    /// Ends a live job from the broker's side and tells its worker, if any, to stop it.
    fn stop(&mut self, job: JobId, reason: FinishReason, message: String) {
        let j = &self.jobs[&job];
        let running_on = match j.state {
            JobState::Assigned | JobState::Running => j.worker.clone().map(|w| (w, j.attempt)),
            _ => None,
        };
        self.emit(Event::Finished {
            job: job.0,
            reason: reason.into(),
            exit_code: None,
            message: Some(message.clone()),
            outputs: vec![],
            at: self.now,
        });
        if let Some((worker, attempt)) = running_on {
            // The worker keeps the slot until it reports the attempt ended.
            self.send_worker(&worker, BrokerToWorker::Cancel { job_id: job, attempt, reason: message });
        }
    }

    // ---- workers ----

    fn worker_hello(&mut self, conn: ConnId, hello: WorkerHello) -> Reply {
        for q in &hello.queues {
            if let Err(m) = validate_name("queue", q, false) {
                return Reply::Error(ErrorBody::new(ErrorCode::BadMessage, m));
            }
        }
        for t in &hello.tags {
            if let Err(m) = validate_name("tag", t, true) {
                return Reply::Error(ErrorBody::new(ErrorCode::BadMessage, m));
            }
        }
        if let Err(m) = validate_name("worker id", &hello.worker_id.0, true) {
            return Reply::Error(ErrorBody::new(ErrorCode::BadMessage, m));
        }
        if hello.queues.is_empty() {
            return Reply::Error(ErrorBody::new(ErrorCode::BadMessage, "a worker must serve at least one queue"));
        }
        let id = hello.worker_id.clone();
        if let Some(old) = self.workers.get(&id).and_then(|w| w.conn).filter(|c| *c != conn) {
            self.effects.push(Effect::Close {
                conn: old,
                code: close::REPLACED,
                reason: "another connection took over this worker id",
            });
            if let Some(c) = self.conns.get_mut(&old) {
                c.worker = None;
            }
        }
        let queues: Vec<Arc<str>> = hello.queues.iter().map(|q| self.queue_name(Some(q))).collect();
        let worker = self.workers.entry(id.clone()).or_insert_with(|| Worker::ghost(id.clone(), 0));
        let old_queues = std::mem::replace(&mut worker.queues, queues.clone());
        worker.conn = Some(conn);
        worker.slots = hello.slots;
        worker.gpus = hello.gpus;
        worker.tags = hello.tags.into_iter().collect();
        worker.draining = false;
        worker.disconnected_at = None;
        for q in old_queues.iter().filter(|q| !queues.contains(q)) {
            if let Some(queue) = self.queues.get_mut(q) {
                queue.workers.remove(&id);
            }
            self.dirty_workers.insert(q.clone());
        }
        for q in &queues {
            self.queues.entry(q.clone()).or_default().workers.insert(id.clone());
            self.dirty_workers.insert(q.clone());
        }
        self.conns.entry(conn).or_default().worker = Some(id.clone());
        self.effects.push(Effect::Worker {
            to: conn,
            msg: BrokerToWorker::Welcome {
                protocol: PROTOCOL_VERSION,
                broker: crate::BROKER_AGENT.into(),
                heartbeat_ms: self.config.heartbeat_ms,
                lease_grace_ms: self.config.lease_grace_ms,
            },
        });

        // Reconcile what the worker says it holds with what the broker assigned to it.
        let claimed: HashMap<JobId, u32> = hello.held.iter().map(|h| (h.job_id, h.attempt)).collect();
        let ours: Vec<(JobId, Held)> = self.workers[&id].held.iter().map(|(j, h)| (*j, *h)).collect();
        for (job, held) in &ours {
            if claimed.get(job) == Some(&held.attempt) {
                if self.jobs.get(job).is_none_or(|j| !j.is_live() || j.attempt != held.attempt) {
                    self.send_worker(
                        &id,
                        BrokerToWorker::Cancel {
                            job_id: *job,
                            attempt: held.attempt,
                            reason: "the job ended while the worker was away".into(),
                        },
                    );
                }
                continue;
            }
            self.release_held(&id, *job);
            let current = self
                .jobs
                .get(job)
                .filter(|j| j.is_live() && j.attempt == held.attempt && j.worker.as_ref() == Some(&id));
            if let Some(j) = current {
                let loss = if j.state == JobState::Running { Loss::WorkerLost } else { Loss::None };
                self.requeue(*job, loss, "the worker came back without it");
            }
        }
        for (job, attempt) in claimed {
            if !self.workers[&id].held.contains_key(&job) {
                self.send_worker(
                    &id,
                    BrokerToWorker::Cancel {
                        job_id: job,
                        attempt,
                        reason: "this attempt is no longer assigned to this worker".into(),
                    },
                );
            }
        }
        for q in &queues {
            self.dispatch(q);
        }
        Reply::Done
    }

    fn worker_message(&mut self, conn: ConnId, msg: WorkerToBroker) -> Reply {
        let Some(worker) = self.conns.get(&conn).and_then(|c| c.worker.clone()) else {
            return Reply::Error(ErrorBody::new(ErrorCode::BadMessage, "send a hello first"));
        };
        match msg {
            WorkerToBroker::Hello(_) => {
                Reply::Error(ErrorBody::new(ErrorCode::BadMessage, "hello was already sent on this socket"))
            }
            WorkerToBroker::Heartbeat => Reply::Done,
            WorkerToBroker::Drain => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.draining = true;
                    for q in w.queues.clone() {
                        self.dirty_workers.insert(q);
                    }
                }
                Reply::Done
            }
            WorkerToBroker::Accept { job_id, attempt } => {
                if !self.holds(&worker, job_id, attempt) {
                    return self.stale(&worker, job_id, attempt);
                }
                match self.jobs.get(&job_id).map(|j| (j.state, j.attempt)) {
                    Some((JobState::Assigned, a)) if a == attempt => {
                        self.emit(Event::Started { job: job_id.0, attempt, at: self.now })
                    }
                    Some((JobState::Running, a)) if a == attempt => {}
                    _ => self.send_worker(
                        &worker,
                        BrokerToWorker::Cancel { job_id, attempt, reason: "the job has ended".into() },
                    ),
                }
                Reply::Done
            }
            WorkerToBroker::Release { job_id, attempt, .. } => {
                if !self.holds(&worker, job_id, attempt) {
                    return self.stale(&worker, job_id, attempt);
                }
                self.release_held(&worker, job_id);
                if self.is_current(job_id, attempt) {
                    self.requeue(job_id, Loss::None, "released by its worker");
                }
                self.dispatch_worker_queues(&worker);
                Reply::Done
            }
            WorkerToBroker::Progress { job_id, attempt, phase, message, current, total } => {
                if !self.holds(&worker, job_id, attempt) {
                    return self.stale(&worker, job_id, attempt);
                }
                if self.is_current(job_id, attempt) {
                    let j = self.jobs.get_mut(&job_id).expect("current jobs exist");
                    j.progress = Some(Progress { phase, message, current, total });
                    j.version += 1;
                    self.notify_job_watchers(job_id);
                }
                Reply::Done
            }
            WorkerToBroker::Logs { job_id, attempt, lines } => {
                if !self.holds(&worker, job_id, attempt) {
                    return self.stale(&worker, job_id, attempt);
                }
                if self.is_current(job_id, attempt) {
                    self.append_logs(job_id, lines);
                }
                Reply::Done
            }
            WorkerToBroker::Finish { job_id, attempt, status, outputs } => {
                if !self.holds(&worker, job_id, attempt) {
                    if self.jobs.get(&job_id).is_some_and(|j| {
                        j.attempt == attempt && j.state == JobState::Finished && j.worker.as_ref() == Some(&worker)
                    }) {
                        // A repeat after a reconnect: the result is already durable.
                        self.send_worker(&worker, BrokerToWorker::FinishAck { job_id, attempt });
                        return Reply::Done;
                    }
                    return self.stale(&worker, job_id, attempt);
                }
                self.release_held(&worker, job_id);
                if self.is_current(job_id, attempt) {
                    self.worker_finished(job_id, status, outputs);
                }
                self.send_worker(&worker, BrokerToWorker::FinishAck { job_id, attempt });
                self.dispatch_worker_queues(&worker);
                Reply::Done
            }
        }
    }

    fn worker_finished(&mut self, job: JobId, status: ExitStatus, outputs: Vec<OutputFile>) {
        let (reason, exit_code, message) = match status {
            ExitStatus::Exited { exit_code: 0 } => (FinishReason::Succeeded, Some(0), None),
            ExitStatus::Exited { exit_code } => {
                (FinishReason::Failed, Some(exit_code), Some(format!("exited with code {exit_code}")))
            }
            ExitStatus::TimedOut { exit_code } => {
                (FinishReason::TimedOut, exit_code, Some("stopped after reaching maxDuration".into()))
            }
            ExitStatus::Error { message, retryable: true } => {
                self.requeue(job, Loss::Error, &message);
                return;
            }
            ExitStatus::Error { message, retryable: false } => (FinishReason::Error, None, Some(message)),
        };
        let outputs = outputs.iter().map(OutputV1::from).collect();
        self.emit(Event::Finished { job: job.0, reason: reason.into(), exit_code, message, outputs, at: self.now });
    }

    /// Puts a live job back in its queue, or ends it as `workerLost` (or with the error that
    /// made the attempt fail) once a lost attempt would exceed its retry budget.
    fn requeue(&mut self, job: JobId, loss: Loss, why: &str) {
        let j = &self.jobs[&job];
        let reason = match loss {
            Loss::None => None,
            Loss::WorkerLost => Some(FinishReason::WorkerLost),
            Loss::Error => Some(FinishReason::Error),
        };
        if let Some(reason) = reason.filter(|_| j.losses + 1 > j.retries) {
            let message = format!("{why}; retry budget of {} spent", j.retries);
            self.emit(Event::Finished {
                job: job.0,
                reason: reason.into(),
                exit_code: None,
                message: Some(message),
                outputs: vec![],
                at: self.now,
            });
            return;
        }
        self.emit(Event::Requeued { job: job.0, lost: reason.is_some() });
        let queue = self.jobs[&job].queue.clone();
        self.dispatch(&queue);
    }

    fn append_logs(&mut self, job: JobId, lines: Vec<LogLine>) {
        let limit = self.config.max_log_bytes;
        let j = &self.jobs[&job];
        if j.log_full || lines.is_empty() {
            return;
        }
        let mut budget = limit.saturating_sub(j.log_bytes);
        let mut kept = Vec::with_capacity(lines.len());
        let mut truncated = false;
        for line in &lines {
            if line.text.len() > budget {
                truncated = true;
                break;
            }
            budget -= line.text.len();
            kept.push(LogLineV1::from(line));
        }
        if truncated {
            kept.push(LogLineV1 {
                stream: 2,
                time: self.now,
                text: format!("cq: log truncated at {limit} bytes; further output is dropped\n"),
            });
        }
        let offset = j.logs.len() as u64;
        let sent: Vec<LogLine> = kept.iter().map(LogLine::from).collect();
        self.emit(Event::Logged { job: job.0, lines: kept, truncated });
        if let Some(watchers) = self.job_watchers.get(&job).filter(|w| !w.is_empty()) {
            let msg = Arc::new(BrokerToClient::Logs { job_id: job, offset, lines: sent });
            self.effects.push(Effect::Client { to: watchers.clone(), msg });
        }
    }

    fn holds(&self, worker: &WorkerId, job: JobId, attempt: u32) -> bool {
        self.workers.get(worker).and_then(|w| w.held.get(&job)).is_some_and(|h| h.attempt == attempt)
    }

    fn is_current(&self, job: JobId, attempt: u32) -> bool {
        self.jobs.get(&job).is_some_and(|j| j.is_live() && j.attempt == attempt)
    }

    fn stale(&mut self, worker: &WorkerId, job_id: JobId, attempt: u32) -> Reply {
        let mut e = ErrorBody::new(
            ErrorCode::StaleAttempt,
            format!("attempt {attempt} of job {job_id} is not assigned to this worker"),
        );
        e.job_id = Some(job_id);
        self.send_worker(worker, BrokerToWorker::Error(e));
        self.send_worker(worker, BrokerToWorker::Cancel { job_id, attempt, reason: "stale attempt".into() });
        Reply::Done
    }

    fn release_held(&mut self, worker: &WorkerId, job: JobId) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.held.remove(&job);
        }
    }

    fn dispatch_worker_queues(&mut self, worker: &WorkerId) {
        let queues = self.workers.get(worker).map(|w| w.queues.clone()).unwrap_or_default();
        for q in &queues {
            self.dispatch(q);
        }
    }

    fn send_worker(&mut self, worker: &WorkerId, msg: BrokerToWorker) {
        if let Some(conn) = self.workers.get(worker).and_then(|w| w.conn) {
            self.effects.push(Effect::Worker { to: conn, msg });
        }
    }

    /// Pushes queued jobs of `queue` to workers: FIFO within priority, each job to the
    /// least-loaded connected worker whose free slots, GPUs and tags fit.
    fn dispatch(&mut self, queue: &Arc<str>) {
        let Some(q) = self.queues.get(queue) else { return };
        if q.pending.is_empty() || !q.workers.iter().any(|w| self.workers.get(w).is_some_and(Worker::can_take_any)) {
            return;
        }
        // Scan the queue in small chunks: usually the first jobs fill the free slots, and a
        // finish (one free slot) must not cost a walk over thousands of queued jobs.
        let mut scanned = 0;
        let mut after: Option<(Reverse<i32>, u64)> = None;
        'scan: while scanned < DISPATCH_SCAN_LIMIT {
            let q = &self.queues[queue];
            let chunk: Vec<(Reverse<i32>, u64)> = match after {
                None => q.pending.iter().take(DISPATCH_CHUNK).copied().collect(),
                Some(k) => {
                    q.pending.range((Bound::Excluded(k), Bound::Unbounded)).take(DISPATCH_CHUNK).copied().collect()
                }
            };
            let Some(last) = chunk.last().copied() else { break };
            after = Some(last);
            for (_, seq) in chunk {
                scanned += 1;
                let q = &self.queues[queue];
                let job_id = q.by_seq[&seq];
                let job = &self.jobs[&job_id];
                let mut best: Option<(&Worker, u32)> = None;
                let mut any_free = false;
                for wid in &q.workers {
                    let Some(w) = self.workers.get(wid) else { continue };
                    if !w.can_take_any() {
                        continue;
                    }
                    any_free = true;
                    // Most jobs want no GPU: skip summing the worker's held GPUs for them.
                    if (job.gpus > 0 && w.free_gpus() < job.gpus) || !job.tags.iter().all(|t| w.tags.contains(t)) {
                        continue;
                    }
                    let free = w.free_slots();
                    if best.is_none_or(|(_, f)| free > f) {
                        best = Some((w, free));
                    }
                }
                if !any_free {
                    break 'scan;
                }
                let Some((w, _)) = best else { continue };
                let (worker, conn) = (w.id.clone(), w.conn.expect("connected"));
                let attempt = job.attempt + 1;
                let definition =
                    RawValue::from_string(job.definition.to_string()).expect("stored definitions are JSON");
                let waited = self.now.saturating_sub(job.queued_at);
                self.emit(Event::Assigned { job: job_id.0, worker: worker.0.clone(), attempt, at: self.now });
                self.stats.dispatched += 1;
                self.dispatch_latencies.push(waited);
                self.effects.push(Effect::Worker {
                    to: conn,
                    msg: BrokerToWorker::Assign { job_id, attempt, queue: queue.to_string(), definition },
                });
            }
        }
    }

    fn disconnected(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        for q in c.queues {
            if let Some(queue) = self.queues.get_mut(&q) {
                queue.watchers.retain(|w| *w != conn);
            }
        }
        for job in c.jobs {
            self.remove_job_watcher(conn, job);
        }
        if let Some(id) = c.worker {
            let Some(w) = self.workers.get_mut(&id) else { return };
            if w.conn != Some(conn) {
                return;
            }
            w.conn = None;
            for q in w.queues.clone() {
                self.dirty_workers.insert(q);
            }
            if w.held.is_empty() {
                self.remove_worker(&id);
            } else {
                w.disconnected_at = Some(self.now);
            }
        }
    }

    fn remove_worker(&mut self, id: &WorkerId) {
        if let Some(w) = self.workers.remove(id) {
            for q in &w.queues {
                if let Some(queue) = self.queues.get_mut(q) {
                    queue.workers.remove(id);
                }
                self.dirty_workers.insert(q.clone());
            }
        }
    }

    fn tick(&mut self) {
        let grace = self.config.lease_grace_ms;
        let expired: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.disconnected_at.is_some_and(|t| t + grace <= self.now))
            .map(|w| w.id.clone())
            .collect();
        for id in expired {
            let held: Vec<(JobId, Held)> = self.workers[&id].held.iter().map(|(j, h)| (*j, *h)).collect();
            self.remove_worker(&id);
            for (job, h) in held {
                if self
                    .jobs
                    .get(&job)
                    .is_some_and(|j| j.is_live() && j.attempt == h.attempt && j.worker.as_ref() == Some(&id))
                {
                    self.requeue(
                        job,
                        Loss::WorkerLost,
                        &format!("worker gone: {id} did not come back within {grace} ms"),
                    );
                }
            }
        }
        let timeout = self.config.accept_timeout_ms;
        while let Some(&(at, job)) = self.unaccepted.first() {
            if at + timeout > self.now {
                break;
            }
            self.unaccepted.remove(&(at, job));
            // Entries are removed lazily: skip those of assignments already accepted or replaced.
            let Some(j) = self.jobs.get(&job).filter(|j| j.state == JobState::Assigned && j.assigned_at == Some(at))
            else {
                continue;
            };
            let (attempt, worker) = (j.attempt, j.worker.clone());
            if let Some(worker) = worker {
                let reason = format!("not accepted within {timeout} ms");
                self.send_worker(&worker, BrokerToWorker::Cancel { job_id: job, attempt, reason: reason.clone() });
                self.release_held(&worker, job);
                self.requeue(job, Loss::None, &reason);
            }
        }
        let retention = self.config.retention_ms;
        while let Some(&(at, job)) = self.retained.first() {
            if at + retention > self.now {
                break;
            }
            self.emit(Event::Forgotten { job: job.0 });
        }
    }

    // ---- watchers ----

    fn watch_queue(&mut self, conn: ConnId, queue: String) -> Reply {
        if let Err(m) = validate_name("queue", &queue, false) {
            return Reply::Error(ErrorBody::new(ErrorCode::BadMessage, m));
        }
        let name = self.queue_name(Some(&queue));
        let c = self.conns.entry(conn).or_default();
        if !c.queues.contains(&name) {
            c.queues.push(name.clone());
            self.queues.entry(name.clone()).or_default().watchers.push(conn);
        }
        let q = &self.queues[&name];
        let mut jobs = Vec::new();
        let mut finished = 0;
        for id in q.by_seq.values().rev() {
            let j = &self.jobs[id];
            if j.state == JobState::Finished {
                if finished >= SNAPSHOT_FINISHED_LIMIT {
                    continue;
                }
                finished += 1;
            }
            jobs.push(j.view());
            if jobs.len() >= SNAPSHOT_JOBS_LIMIT {
                break;
            }
        }
        let msg = BrokerToClient::QueueSnapshot {
            queue: queue.clone(),
            seq: q.delta_seq,
            summary: self.summary_of(&name),
            jobs,
            workers: self.worker_views(&name),
        };
        self.effects.push(Effect::Client { to: vec![conn], msg: Arc::new(msg) });
        Reply::Done
    }

    fn unwatch_queue(&mut self, conn: ConnId, queue: &str) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.queues.retain(|q| &**q != queue);
        }
        if let Some(q) = self.queues.get_mut(queue) {
            q.watchers.retain(|w| *w != conn);
        }
    }

    fn watch_job(&mut self, conn: ConnId, job: JobId, since: u64, follow: bool) -> Reply {
        let Some(j) = self.jobs.get(&job) else {
            let mut e = ErrorBody::new(ErrorCode::NotFound, format!("no job {job}"));
            e.job_id = Some(job);
            self.effects.push(Effect::Client { to: vec![conn], msg: Arc::new(BrokerToClient::Error(e)) });
            if follow {
                self.effects.push(Effect::Close { conn, code: close::DONE, reason: "no such job" });
            }
            return Reply::Done;
        };
        let mut msgs = vec![BrokerToClient::Job { job: j.view() }];
        let start = (since as usize).min(j.logs.len());
        for (i, chunk) in j.logs[start..].chunks(LOG_CHUNK_LINES).enumerate() {
            msgs.push(BrokerToClient::Logs {
                job_id: job,
                offset: (start + i * LOG_CHUNK_LINES) as u64,
                lines: chunk.to_vec(),
            });
        }
        let done = j.state == JobState::Finished;
        for msg in msgs {
            self.effects.push(Effect::Client { to: vec![conn], msg: Arc::new(msg) });
        }
        if follow && done {
            self.effects.push(Effect::Close { conn, code: close::DONE, reason: "job finished" });
            return Reply::Done;
        }
        let c = self.conns.entry(conn).or_default();
        if !c.jobs.contains(&job) {
            c.jobs.push(job);
            if follow {
                c.follow = true;
            }
            self.job_watchers.entry(job).or_default().push(conn);
        }
        Reply::Done
    }

    fn unwatch_job(&mut self, conn: ConnId, job: JobId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.jobs.retain(|j| *j != job);
        }
        self.remove_job_watcher(conn, job);
    }

    fn remove_job_watcher(&mut self, conn: ConnId, job: JobId) {
        if let Some(w) = self.job_watchers.get_mut(&job) {
            w.retain(|c| *c != conn);
            if w.is_empty() {
                self.job_watchers.remove(&job);
            }
        }
    }

    fn notify_job_watchers(&mut self, job: JobId) {
        if let (Some(w), Some(j)) = (self.job_watchers.get(&job), self.jobs.get(&job)) {
            self.effects.push(Effect::Client { to: w.clone(), msg: Arc::new(BrokerToClient::Job { job: j.view() }) });
        }
    }

    /// Tells watchers about every job and worker list changed by the last command.
    fn flush_notifications(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty {
            let watchers = self.job_watchers.get(&id).cloned().unwrap_or_default();
            let Some(j) = self.jobs.get(&id) else {
                if !watchers.is_empty() {
                    let mut e = ErrorBody::new(ErrorCode::NotFound, format!("job {id} was deleted"));
                    e.job_id = Some(id);
                    self.effects.push(Effect::Client { to: watchers.clone(), msg: Arc::new(BrokerToClient::Error(e)) });
                    self.close_followers(&watchers, id);
                }
                continue;
            };
            let queue_watchers = self.queues.get(&j.queue).map(|q| !q.watchers.is_empty()).unwrap_or(false);
            if watchers.is_empty() && !queue_watchers {
                continue;
            }
            let view = j.view();
            let finished = j.state == JobState::Finished;
            if queue_watchers {
                let q = self.queues.get_mut(&j.queue).expect("checked above");
                q.delta_seq += 1;
                let msg = BrokerToClient::QueueJob { queue: j.queue.to_string(), seq: q.delta_seq, job: view.clone() };
                self.effects.push(Effect::Client { to: q.watchers.clone(), msg: Arc::new(msg) });
            }
            if !watchers.is_empty() {
                self.effects
                    .push(Effect::Client { to: watchers.clone(), msg: Arc::new(BrokerToClient::Job { job: view }) });
                if finished {
                    self.close_followers(&watchers, id);
                }
            }
        }
        for queue in std::mem::take(&mut self.dirty_workers) {
            let Some(q) = self.queues.get(&queue) else { continue };
            if q.watchers.is_empty() {
                continue;
            }
            let workers = self.worker_views(&queue);
            let q = self.queues.get_mut(&queue).expect("checked above");
            q.delta_seq += 1;
            let msg = BrokerToClient::QueueWorkers { queue: queue.to_string(), seq: q.delta_seq, workers };
            self.effects.push(Effect::Client { to: q.watchers.clone(), msg: Arc::new(msg) });
        }
    }

    fn close_followers(&mut self, watchers: &[ConnId], job: JobId) {
        for conn in watchers {
            if self.conns.get(conn).is_some_and(|c| c.follow) {
                self.effects.push(Effect::Close { conn: *conn, code: close::DONE, reason: "job finished" });
                self.unwatch_job(*conn, job);
            }
        }
    }

    // ---- reads ----

    fn list(&self, queue: &str, state: Option<JobState>, limit: usize) -> Vec<JobView> {
        let Some(q) = self.queues.get(queue) else { return Vec::new() };
        q.by_seq
            .values()
            .rev()
            .map(|id| &self.jobs[id])
            .filter(|j| state.is_none_or(|s| j.state == s))
            .take(limit.min(LIST_LIMIT))
            .map(Job::view)
            .collect()
    }

    fn summary(&self, queue: &Option<String>) -> Vec<QueueSummary> {
        let mut names: Vec<&Arc<str>> = match queue {
            Some(q) => self.queues.get_key_value(q.as_str()).map(|(k, _)| k).into_iter().collect(),
            None => self.queues.keys().collect(),
        };
        names.sort();
        let mut out: Vec<QueueSummary> = names.into_iter().map(|q| self.summary_of(q)).collect();
        if out.is_empty() {
            if let Some(q) = queue {
                out.push(QueueSummary { queue: q.clone(), ..Default::default() });
            }
        }
        out
    }

    fn summary_of(&self, queue: &Arc<str>) -> QueueSummary {
        let Some(q) = self.queues.get(queue) else {
            return QueueSummary { queue: queue.to_string(), ..Default::default() };
        };
        let oldest = q.pending.iter().map(|(_, seq)| self.jobs[&q.by_seq[seq]].submitted_at).min();
        let mut s = QueueSummary {
            queue: queue.to_string(),
            queued: q.counts[0],
            assigned: q.counts[1],
            running: q.counts[2],
            finished: q.counts[3],
            oldest_queued_ms: oldest.map(|t| self.now.saturating_sub(t)),
            ..Default::default()
        };
        for w in q.workers.iter().filter_map(|w| self.workers.get(w)).filter(|w| w.conn.is_some()) {
            s.workers += 1;
            s.slots += w.slots;
            if !w.draining {
                s.free_slots += w.free_slots();
            }
        }
        s
    }

    fn worker_views(&self, queue: &Arc<str>) -> Vec<WorkerView> {
        let Some(q) = self.queues.get(queue) else { return Vec::new() };
        q.workers.iter().filter_map(|w| self.workers.get(w)).map(Worker::view).collect()
    }

    fn overview(&self) -> Overview {
        let mut names: Vec<&Arc<str>> = self.queues.keys().collect();
        names.sort();
        Overview {
            queues: names.into_iter().map(|q| self.summary_of(q)).collect(),
            finished: self.stats.finished.iter().map(|(k, v)| (k.0.to_string(), k.1, *v)).collect(),
            dispatched: self.stats.dispatched,
            jobs: self.jobs.len() as u64,
            workers: self.workers.values().filter(|w| w.conn.is_some()).count() as u64,
            connections: self.conns.len() as u64,
        }
    }

    // ---- evolve: the only code that changes durable state ----

    fn emit(&mut self, event: Event) {
        self.evolve(&event);
        self.events.push(event);
    }

    fn evolve(&mut self, event: &Event) {
        match event {
            Event::Submitted { job, queue, definition, gpus, tags, namespace, priority, retries, at } => {
                let id = JobId(*job);
                let (attempt, version) = match self.jobs.get(&id) {
                    Some(old) => (old.attempt, old.version),
                    None => (0, 0),
                };
                self.unindex(id);
                let queue = self.queue_name(Some(queue));
                let seq = self.seq;
                self.seq += 1;
                let job = Job {
                    id,
                    queue: queue.clone(),
                    definition: definition.clone(),
                    gpus: *gpus,
                    tags: tags.clone(),
                    namespaces: namespace.iter().cloned().collect(),
                    anonymous: namespace.is_none(),
                    priority: *priority,
                    retries: *retries,
                    attempt,
                    losses: 0,
                    seq,
                    state: JobState::Queued,
                    worker: None,
                    reason: None,
                    exit_code: None,
                    message: None,
                    outputs: Vec::new(),
                    submitted_at: *at,
                    started_at: None,
                    finished_at: None,
                    logs: Vec::new(),
                    log_bytes: 0,
                    log_full: false,
                    assigned_at: None,
                    queued_at: *at,
                    progress: None,
                    version: version + 1,
                };
                let q = self.queues.entry(queue.clone()).or_default();
                q.by_seq.insert(seq, id);
                q.pending.insert((Reverse(job.priority), seq));
                q.counts[0] += 1;
                if let Some(ns) = namespace {
                    self.namespaces.insert((queue, ns.clone()), id);
                }
                self.jobs.insert(id, job);
                self.dirty.push(id);
            }
            Event::Joined { job, namespace } => {
                let id = JobId(*job);
                let Some(j) = self.jobs.get_mut(&id) else { return };
                match namespace {
                    Some(ns) => {
                        j.namespaces.insert(ns.clone());
                        self.namespaces.insert((j.queue.clone(), ns.clone()), id);
                    }
                    None => j.anonymous = true,
                }
                j.version += 1;
                self.dirty.push(id);
            }
            Event::NamespaceLeft { job, namespace } => {
                let id = JobId(*job);
                let Some(j) = self.jobs.get_mut(&id) else { return };
                j.namespaces.remove(namespace);
                j.version += 1;
                let key = (j.queue.clone(), namespace.clone());
                if self.namespaces.get(&key) == Some(&id) {
                    self.namespaces.remove(&key);
                }
                self.dirty.push(id);
            }
            Event::Assigned { job, worker, attempt, at } => {
                let id = JobId(*job);
                self.unaccepted.insert((*at, id));
                let Some(j) = self.jobs.get_mut(&id) else { return };
                let q = self.queues.get_mut(&j.queue).expect("jobs have queues");
                q.pending.remove(&(Reverse(j.priority), j.seq));
                q.counts[state_index(j.state)] -= 1;
                q.counts[1] += 1;
                let wid = WorkerId(worker.clone());
                j.state = JobState::Assigned;
                j.assigned_at = Some(*at);
                j.attempt = *attempt;
                j.worker = Some(wid.clone());
                j.progress = None;
                j.version += 1;
                let gpus = j.gpus;
                if let Some(w) = self.workers.get_mut(&wid) {
                    w.held.insert(id, Held { attempt: *attempt, gpus });
                }
                self.dirty.push(id);
            }
            Event::Started { job, attempt: _, at } => {
                let id = JobId(*job);
                let Some(j) = self.jobs.get_mut(&id) else { return };
                let q = self.queues.get_mut(&j.queue).expect("jobs have queues");
                q.counts[state_index(j.state)] -= 1;
                q.counts[2] += 1;
                j.state = JobState::Running;
                j.started_at = Some(*at);
                j.version += 1;
                self.dirty.push(id);
            }
            Event::Logged { job, lines, truncated } => {
                let Some(j) = self.jobs.get_mut(&JobId(*job)) else { return };
                for l in lines {
                    j.log_bytes += l.text.len();
                    j.logs.push(LogLine::from(l));
                }
                j.log_full |= *truncated;
            }
            Event::Requeued { job, lost } => {
                let id = JobId(*job);
                let Some(j) = self.jobs.get_mut(&id) else { return };
                let q = self.queues.get_mut(&j.queue).expect("jobs have queues");
                q.counts[state_index(j.state)] -= 1;
                q.counts[0] += 1;
                q.pending.insert((Reverse(j.priority), j.seq));
                if let Some(w) = j.worker.take().and_then(|w| self.workers.get_mut(&w)) {
                    w.held.remove(&id);
                }
                j.state = JobState::Queued;
                j.queued_at = self.now;
                j.losses += u32::from(*lost);
                j.progress = None;
                j.version += 1;
                self.dirty.push(id);
            }
            Event::Finished { job, reason, exit_code, message, outputs, at } => {
                let id = JobId(*job);
                let Some(j) = self.jobs.get_mut(&id) else { return };
                let q = self.queues.get_mut(&j.queue).expect("jobs have queues");
                q.counts[state_index(j.state)] -= 1;
                q.counts[3] += 1;
                if j.state == JobState::Queued {
                    q.pending.remove(&(Reverse(j.priority), j.seq));
                }
                let reason = FinishReason::from(*reason);
                j.state = JobState::Finished;
                j.reason = Some(reason);
                j.exit_code = *exit_code;
                j.message = message.clone();
                j.outputs = outputs.iter().map(OutputFile::from).collect();
                j.finished_at = Some(*at);
                j.progress = None;
                j.version += 1;
                *self.stats.finished.entry((j.queue.clone(), reason)).or_default() += 1;
                self.retained.insert((*at, id));
                self.dirty.push(id);
            }
            Event::Forgotten { job } => {
                let id = JobId(*job);
                self.unindex(id);
                self.jobs.remove(&id);
                self.dirty.push(id);
            }
        }
    }

    /// Removes a job from its queue's indexes, the retention index and the namespace index.
    fn unindex(&mut self, id: JobId) {
        let Some(j) = self.jobs.get(&id) else { return };
        if let Some(q) = self.queues.get_mut(&j.queue) {
            q.by_seq.remove(&j.seq);
            q.pending.remove(&(Reverse(j.priority), j.seq));
            q.counts[state_index(j.state)] -= 1;
        }
        if let Some(at) = j.finished_at.filter(|_| j.state == JobState::Finished) {
            self.retained.remove(&(at, id));
        }
        for ns in &j.namespaces {
            let key = (j.queue.clone(), ns.clone());
            if self.namespaces.get(&key) == Some(&id) {
                self.namespaces.remove(&key);
            }
        }
    }

    /// Interns a queue name so jobs share one allocation per queue.
    fn queue_name(&mut self, name: Option<&str>) -> Arc<str> {
        let name = name.unwrap_or("");
        match self.queues.get_key_value(name) {
            Some((k, _)) => k.clone(),
            None => Arc::from(name),
        }
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
            outputs: self.outputs.clone(),
            version: self.version,
        }
    }

    fn record(&self) -> JobRecordV1 {
        JobRecordV1 {
            id: self.id.0,
            queue: self.queue.to_string(),
            definition: self.definition.to_string(),
            gpus: self.gpus,
            tags: self.tags.clone(),
            namespaces: self.namespaces.iter().cloned().collect(),
            anonymous: self.anonymous,
            priority: self.priority,
            retries: self.retries,
            attempt: self.attempt,
            losses: self.losses,
            seq: self.seq,
            state: match self.state {
                JobState::Queued => StateV1::Queued,
                JobState::Assigned => StateV1::Assigned,
                JobState::Running => StateV1::Running,
                JobState::Finished => StateV1::Finished,
            },
            worker: self.worker.as_ref().map(|w| w.0.clone()),
            reason: self.reason.map(ReasonV1::from),
            exit_code: self.exit_code,
            message: self.message.clone(),
            outputs: self.outputs.iter().map(OutputV1::from).collect(),
            submitted_at: self.submitted_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            logs: self.logs.iter().map(LogLineV1::from).collect(),
            log_full: self.log_full,
            version: self.version,
        }
    }

    fn from_record(r: JobRecordV1) -> Job {
        let logs: Vec<LogLine> = r.logs.iter().map(LogLine::from).collect();
        Job {
            id: JobId(r.id),
            queue: Arc::from(r.queue),
            definition: Arc::from(r.definition),
            gpus: r.gpus,
            tags: r.tags,
            namespaces: r.namespaces.into_iter().collect(),
            anonymous: r.anonymous,
            priority: r.priority,
            retries: r.retries,
            attempt: r.attempt,
            losses: r.losses,
            seq: r.seq,
            state: match r.state {
                StateV1::Queued => JobState::Queued,
                StateV1::Assigned => JobState::Assigned,
                StateV1::Running => JobState::Running,
                StateV1::Finished => JobState::Finished,
            },
            worker: r.worker.map(WorkerId),
            reason: r.reason.map(FinishReason::from),
            exit_code: r.exit_code,
            message: r.message,
            outputs: r.outputs.iter().map(OutputFile::from).collect(),
            submitted_at: r.submitted_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            log_bytes: logs.iter().map(|l| l.text.len()).sum(),
            logs,
            log_full: r.log_full,
            assigned_at: None,
            queued_at: r.submitted_at,
            progress: None,
            version: r.version,
        }
    }
}

impl Worker {
    fn ghost(id: WorkerId, disconnected_at: u64) -> Worker {
        Worker {
            id,
            conn: None,
            queues: Vec::new(),
            slots: 0,
            gpus: 0,
            tags: BTreeSet::new(),
            held: BTreeMap::new(),
            draining: false,
            disconnected_at: Some(disconnected_at),
        }
    }

    fn free_slots(&self) -> u32 {
        self.slots.saturating_sub(self.held.len() as u32)
    }

    fn free_gpus(&self) -> u32 {
        if self.gpus == 0 {
            return 0;
        }
        self.gpus.saturating_sub(self.held.values().map(|h| h.gpus).sum())
    }

    fn can_take_any(&self) -> bool {
        self.conn.is_some() && !self.draining && self.free_slots() > 0
    }

    fn view(&self) -> WorkerView {
        WorkerView {
            id: self.id.clone(),
            queues: self.queues.iter().map(|q| q.to_string()).collect(),
            slots: self.slots,
            busy: self.held.len() as u32,
            gpus: self.gpus,
            tags: self.tags.iter().cloned().collect(),
            connected: self.conn.is_some(),
            draining: self.draining,
        }
    }
}

#[cfg(test)]
mod tests;
