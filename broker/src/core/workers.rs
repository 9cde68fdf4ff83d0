//! Workers and their leases: hello and reconciliation of held attempts, a worker's messages
//! (accept, release, progress, logs, finish), requeue and retry budgets, disconnects and the
//! grace period.

use protocol::job::Stream;

use super::*;

impl Core {
    pub(super) fn worker_hello(&mut self, conn: ConnId, hello: WorkerHello) -> Reply {
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
        // Each queue costs memory and a line per metric: a worker names a bounded number.
        if hello.queues.len() > MAX_HELLO_QUEUES {
            return Reply::Error(ErrorBody::new(
                ErrorCode::BadMessage,
                format!("a worker serves at most {MAX_HELLO_QUEUES} queues; this one named {}", hello.queues.len()),
            ));
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
            self.drop_queue_if_unused(q);
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
                if self.jobs.get(job).is_none_or(|j| !j.is_out(held.attempt)) {
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
            let current = self.jobs.get(job).filter(|j| j.is_out(held.attempt) && j.worker.as_ref() == Some(&id));
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

    pub(super) fn worker_message(&mut self, conn: ConnId, msg: WorkerToBroker) -> Reply {
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
                    let mut lines = lines;
                    name_worker_notes(&worker, &mut lines);
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

    pub(super) fn worker_finished(&mut self, job: JobId, status: ExitStatus, outputs: Vec<OutputFile>) {
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
            // The broker did not cancel this attempt, yet the worker stopped it: run it again.
            ExitStatus::Cancelled => {
                self.requeue(job, Loss::Error, "the worker stopped the attempt");
                return;
            }
        };
        let outputs = outputs.iter().map(OutputV1::from).collect();
        self.emit(Event::Finished { job: job.0, reason: reason.into(), exit_code, message, outputs, at: self.now });
    }

    /// Puts a live job back in its queue, or ends it as `workerLost` (or with the error that
    /// made the attempt fail) once a lost attempt would exceed its retry budget.
    pub(super) fn requeue(&mut self, job: JobId, loss: Loss, why: &str) {
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
        if j.state == JobState::Running {
            // The log goes on with the next attempt's lines: say where this one ended.
            let text = format!("cq: attempt {} did not finish ({why}); the job is queued again\n", j.attempt);
            self.append_logs(job, vec![LogLine { stream: Stream::System, time: self.now, text }]);
        }
        self.emit(Event::Requeued { job: job.0, lost: reason.is_some() });
        if loss == Loss::Error {
            // A transient error: try again after a backoff, and say why the job waits.
            let now = self.now;
            let j = self.jobs.get_mut(&job).expect("requeued jobs exist");
            let wait =
                RETRY_BACKOFF_MS.saturating_mul(1 << j.losses.saturating_sub(1).min(16)).min(RETRY_BACKOFF_MAX_MS);
            j.not_before = now + wait;
            j.retry_reason = Some(format!(
                "attempt {} failed: {why}; retry {} of {} in {} s",
                j.attempt,
                j.losses,
                j.retries,
                wait.div_ceil(1000)
            ));
            self.retries_due.insert((now + wait, job));
            return;
        }
        let queue = self.jobs[&job].queue.clone();
        self.dispatch(&queue);
    }

    pub(super) fn append_logs(&mut self, job: JobId, lines: Vec<LogLine>) {
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

    pub(super) fn holds(&self, worker: &WorkerId, job: JobId, attempt: u32) -> bool {
        self.workers.get(worker).and_then(|w| w.held.get(&job)).is_some_and(|h| h.attempt == attempt)
    }

    /// Whether `attempt` is the job's attempt out on a worker now: late reports of an attempt
    /// that is over must not end or requeue a rerun of the job.
    pub(super) fn is_current(&self, job: JobId, attempt: u32) -> bool {
        self.jobs.get(&job).is_some_and(|j| j.is_out(attempt))
    }

    pub(super) fn stale(&mut self, worker: &WorkerId, job_id: JobId, attempt: u32) -> Reply {
        let mut e = ErrorBody::new(
            ErrorCode::StaleAttempt,
            format!("attempt {attempt} of job {job_id} is not assigned to this worker"),
        );
        e.job_id = Some(job_id);
        self.send_worker(worker, BrokerToWorker::Error(e));
        self.send_worker(worker, BrokerToWorker::Cancel { job_id, attempt, reason: "stale attempt".into() });
        Reply::Done
    }

    pub(super) fn release_held(&mut self, worker: &WorkerId, job: JobId) {
        if let Some(w) = self.workers.get_mut(worker)
            && w.held.remove(&job).is_some()
        {
            // Watchers of its queues see the worker's `busy` change.
            self.busy_workers.extend(w.queues.iter().cloned());
        }
    }

    pub(super) fn dispatch_worker_queues(&mut self, worker: &WorkerId) {
        let queues = self.workers.get(worker).map(|w| w.queues.clone()).unwrap_or_default();
        for q in &queues {
            self.dispatch(q);
        }
    }

    pub(super) fn send_worker(&mut self, worker: &WorkerId, msg: BrokerToWorker) {
        if let Some(conn) = self.workers.get(worker).and_then(|w| w.conn) {
            self.effects.push(Effect::Worker { to: conn, msg });
        }
    }

    pub(super) fn disconnected(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        for q in c.queues {
            if let Some(queue) = self.queues.get_mut(&q) {
                queue.watchers.retain(|w| *w != conn);
            }
            self.drop_queue_if_unused(&q);
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

    pub(super) fn remove_worker(&mut self, id: &WorkerId) {
        if let Some(w) = self.workers.remove(id) {
            for q in &w.queues {
                if let Some(queue) = self.queues.get_mut(q) {
                    queue.workers.remove(id);
                }
                self.dirty_workers.insert(q.clone());
                self.drop_queue_if_unused(q);
            }
        }
    }

    pub(super) fn tick(&mut self) {
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
                if self.jobs.get(&job).is_some_and(|j| j.is_out(h.attempt) && j.worker.as_ref() == Some(&id)) {
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
        let mut due = BTreeSet::new();
        while let Some(&(at, job)) = self.retries_due.first() {
            if at > self.now {
                break;
            }
            self.retries_due.remove(&(at, job));
            if let Some(j) = self.jobs.get_mut(&job).filter(|j| j.state == JobState::Queued && j.not_before == at) {
                j.retry_reason = None;
                self.dirty.push(job);
                due.insert(j.queue.clone());
            }
        }
        for q in &due {
            self.dispatch(q);
        }
        let retention = self.config.retention_ms;
        while let Some(&(at, job)) = self.retained.first() {
            if at + retention > self.now {
                break;
            }
            self.emit(Event::Forgotten { job: job.0 });
        }
    }
}

impl Worker {
    pub(super) fn ghost(id: WorkerId, disconnected_at: u64) -> Worker {
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

    pub(super) fn free_slots(&self) -> u32 {
        self.slots.saturating_sub(self.held.len() as u32)
    }

    pub(super) fn free_gpus(&self) -> u32 {
        if self.gpus == 0 {
            return 0;
        }
        self.gpus.saturating_sub(self.held.values().fold(0u32, |sum, h| sum.saturating_add(h.gpus)))
    }

    pub(super) fn can_take_any(&self) -> bool {
        self.conn.is_some() && !self.draining && self.free_slots() > 0
    }

    pub(super) fn view(&self) -> WorkerView {
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

/// The `system` stream is cq's own voice. The broker's notes read `cq: …`; a worker's notes keep
/// the stream but name the worker (`cq worker w1: …`, on every line of the text), so no worker
/// can pass a line of its own off as the broker's.
fn name_worker_notes(worker: &WorkerId, lines: &mut [LogLine]) {
    for line in lines.iter_mut().filter(|l| l.stream == Stream::System) {
        let prefix = format!("cq worker {}: ", worker.0);
        let mut text = String::with_capacity(line.text.len() + prefix.len());
        for piece in line.text.split_inclusive('\n') {
            text.push_str(&prefix);
            text.push_str(piece.strip_prefix("cq: ").unwrap_or(piece));
        }
        line.text = text;
    }
}
