//! Watchers of queues and jobs: snapshots on subscribe, and the deltas sent after each command.

use super::*;

impl Core {
    pub(super) fn watch_queue(&mut self, conn: ConnId, queue: String) -> Reply {
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

    pub(super) fn unwatch_queue(&mut self, conn: ConnId, queue: &str) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.queues.retain(|q| &**q != queue);
        }
        if let Some(name) = self.queues.get_key_value(queue).map(|(k, _)| k.clone()) {
            if let Some(q) = self.queues.get_mut(&name) {
                q.watchers.retain(|w| *w != conn);
            }
            self.drop_queue_if_unused(&name);
        }
    }

    pub(super) fn watch_job(&mut self, conn: ConnId, job: JobId, since: u64, follow: bool) -> Reply {
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

    pub(super) fn unwatch_job(&mut self, conn: ConnId, job: JobId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.jobs.retain(|j| *j != job);
        }
        self.remove_job_watcher(conn, job);
    }

    pub(super) fn remove_job_watcher(&mut self, conn: ConnId, job: JobId) {
        if let Some(w) = self.job_watchers.get_mut(&job) {
            w.retain(|c| *c != conn);
            if w.is_empty() {
                self.job_watchers.remove(&job);
            }
        }
    }

    pub(super) fn notify_job_watchers(&mut self, job: JobId) {
        if let (Some(w), Some(j)) = (self.job_watchers.get(&job), self.jobs.get(&job)) {
            self.effects.push(Effect::Client { to: w.clone(), msg: Arc::new(BrokerToClient::Job { job: j.view() }) });
        }
    }

    /// Tells watchers about every job and worker list changed by the last command.
    pub(super) fn flush_notifications(&mut self) {
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
        let mut changed = std::mem::take(&mut self.dirty_workers);
        changed.append(&mut self.busy_workers);
        for queue in changed {
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

    pub(super) fn close_followers(&mut self, watchers: &[ConnId], job: JobId) {
        for conn in watchers {
            if self.conns.get(conn).is_some_and(|c| c.follow) {
                self.effects.push(Effect::Close { conn: *conn, code: close::DONE, reason: "job finished" });
                self.unwatch_job(*conn, job);
            }
        }
    }
}
