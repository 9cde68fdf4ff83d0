//! Dispatch: pushing queued jobs to the connected workers whose slots, GPUs and tags fit.

use super::*;

impl Core {
    /// Pushes queued jobs of `queue` to workers: FIFO within priority, each job to the
    /// least-loaded connected worker whose free slots, GPUs and tags fit.
    pub(super) fn dispatch(&mut self, queue: &Arc<str>) {
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
                if job.not_before > self.now {
                    continue;
                }
                let mut best: Option<(&Worker, u32)> = None;
                let mut any_free = false;
                for wid in &q.workers {
                    let Some(w) = self.workers.get(wid) else { continue };
                    if !w.can_take_any() {
                        continue;
                    }
                    any_free = true;
                    // A worker still stopping an older attempt of this job (cancelled, then
                    // submitted again) holds that attempt's slot: one attempt of a job per
                    // worker, so its end report frees exactly that slot.
                    if w.held.contains_key(&job_id) {
                        continue;
                    }
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

    /// Recomputes why queued jobs wait: for the jobs the last command changed, and for the
    /// queued jobs (up to [`DISPATCH_SCAN_LIMIT`] per queue) of queues whose workers changed.
    /// A changed reason is a change of the job, so watchers hear of it.
    pub(super) fn refresh_waiting(&mut self) {
        let mut ids: Vec<JobId> = self.dirty.clone();
        for q in &self.dirty_workers {
            if let Some(queue) = self.queues.get(q) {
                ids.extend(queue.pending.iter().take(DISPATCH_SCAN_LIMIT).map(|(_, seq)| queue.by_seq[seq]));
            }
        }
        for id in ids {
            let Some(j) = self.jobs.get(&id) else { continue };
            let waiting = if j.state == JobState::Queued { self.waiting_reason(j) } else { None };
            let j = self.jobs.get_mut(&id).expect("looked up above");
            if j.waiting != waiting {
                j.waiting = waiting;
                j.version += 1;
                self.dirty.push(id);
            }
        }
    }

    /// Why a queued job does not run, if it is not only waiting for a busy worker: a retry
    /// backoff, or no connected worker that could ever take it.
    fn waiting_reason(&self, j: &Job) -> Option<String> {
        if j.not_before > self.now {
            return j.retry_reason.clone();
        }
        let workers: Vec<&Worker> = self
            .queues
            .get(&j.queue)
            .map(|q| q.workers.iter().filter_map(|w| self.workers.get(w)).filter(|w| w.conn.is_some() && !w.draining))
            .into_iter()
            .flatten()
            .collect();
        if workers.is_empty() {
            return Some(format!("no connected worker serves queue `{}`", j.queue));
        }
        let tagged: Vec<&Worker> = workers.into_iter().filter(|w| j.tags.iter().all(|t| w.tags.contains(t))).collect();
        if tagged.is_empty() {
            return Some(format!("no connected worker of queue `{}` has the tags {}", j.queue, j.tags.join(", ")));
        }
        let most = tagged.iter().map(|w| w.gpus).max().unwrap_or(0);
        if j.gpus > most {
            return Some(format!("the job needs {} GPUs; the connected workers that fit have at most {most}", j.gpus));
        }
        if tagged.iter().all(|w| w.slots == 0) {
            return Some("the connected workers that fit have no slots".into());
        }
        None
    }
}
