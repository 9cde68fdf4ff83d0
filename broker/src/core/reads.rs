//! Reads: job lists, queue summaries, worker views and the overview for metrics.

use super::*;

impl Core {
    pub(super) fn list(&self, queue: &str, state: Option<JobState>, limit: usize) -> Vec<JobView> {
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

    pub(super) fn summary(&self, queue: &Option<String>) -> Vec<QueueSummary> {
        let mut names: Vec<&Arc<str>> = match queue {
            Some(q) => self.queues.get_key_value(q.as_str()).map(|(k, _)| k).into_iter().collect(),
            None => self.queues.keys().collect(),
        };
        names.sort();
        let mut out: Vec<QueueSummary> = names.into_iter().map(|q| self.summary_of(q)).collect();
        if out.is_empty()
            && let Some(q) = queue
        {
            out.push(QueueSummary { queue: q.clone(), ..Default::default() });
        }
        out
    }

    pub(super) fn summary_of(&self, queue: &Arc<str>) -> QueueSummary {
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
            // Sums saturate: a worker may claim any number of slots.
            s.slots = s.slots.saturating_add(w.slots);
            if !w.draining {
                s.free_slots = s.free_slots.saturating_add(w.free_slots());
            }
        }
        s
    }

    pub(super) fn worker_views(&self, queue: &Arc<str>) -> Vec<WorkerView> {
        let Some(q) = self.queues.get(queue) else { return Vec::new() };
        q.workers.iter().filter_map(|w| self.workers.get(w)).map(Worker::view).collect()
    }

    pub(super) fn overview(&self) -> Overview {
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
}
