//! Recovery: replaying the snapshot log, restoring a snapshot, and taking one; the
//! conversion between a job in memory and its persisted record.

use super::*;

impl Core {
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
}

impl Job {
    pub(super) fn record(&self) -> JobRecordV1 {
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

    pub(super) fn from_record(r: JobRecordV1) -> Job {
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
            waiting: None,
            not_before: 0,
            retry_reason: None,
            version: r.version,
        }
    }
}
