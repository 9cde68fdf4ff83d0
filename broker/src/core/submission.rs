//! Submission and its ends from the client side: submit, namespace supersede, cancel,
//! forget, and stopping a live job.

use super::*;

impl Core {
    pub(super) fn submit(&mut self, s: Submit) -> Reply {
        if let Err(m) = validate_name("queue", &s.queue, false) {
            return Reply::Error(ErrorBody::new(ErrorCode::InvalidDefinition, m));
        }
        if let Some(ns) = &s.namespace
            && let Err(m) = validate_name("namespace", ns, true)
        {
            return Reply::Error(ErrorBody::new(ErrorCode::InvalidDefinition, m));
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
    pub(super) fn supersede(&mut self, queue: &Arc<str>, namespace: &str, newer: JobId) {
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

    pub(super) fn cancel(&mut self, job: JobId, namespace: Option<String>) -> Reply {
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

    pub(super) fn forget(&mut self, job: JobId) -> Reply {
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
    pub(super) fn stop(&mut self, job: JobId, reason: FinishReason, message: String) {
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
}
