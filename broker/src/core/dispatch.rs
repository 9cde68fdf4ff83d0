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
}
