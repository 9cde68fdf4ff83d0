//! `evolve`: the only code that changes durable state, for live events and replay alike.

use super::*;

impl Core {
    pub(super) fn emit(&mut self, event: Event) {
        self.evolve(&event);
        self.events.push(event);
    }

    pub(super) fn evolve(&mut self, event: &Event) {
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
                    waiting: None,
                    not_before: 0,
                    retry_reason: None,
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
                    // Watchers of its queues see the worker's `busy` change.
                    self.busy_workers.extend(w.queues.iter().cloned());
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
                    self.busy_workers.extend(w.queues.iter().cloned());
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
                let queue = self.jobs.get(&id).map(|j| j.queue.clone());
                self.unindex(id);
                self.jobs.remove(&id);
                self.dirty.push(id);
                if let Some(q) = queue {
                    self.drop_queue_if_unused(&q);
                }
            }
        }
    }

    /// Removes a job from its queue's indexes, the retention index and the namespace index.
    pub(super) fn unindex(&mut self, id: JobId) {
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
    pub(super) fn queue_name(&mut self, name: Option<&str>) -> Arc<str> {
        let name = name.unwrap_or("");
        match self.queues.get_key_value(name) {
            Some((k, _)) => k.clone(),
            None => Arc::from(name),
        }
    }
}
