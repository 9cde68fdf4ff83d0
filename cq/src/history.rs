//! `cq check-history`: checks the history of a run (the submissions a client saw acknowledged,
//! what workers ran and reported) against a broker's final records, and prints every violation
//! of cq's promises: an acknowledged job is never lost, a running job is not started again when
//! a broker fails over, and the recorded result is the one its worker reported. Made for fault
//! tests of cluster mode (kill the owner mid-run, then check), usable after any run.
//!
//! Inputs: a file of acknowledged job ids (one per line), and the workers' logs written with
//! `--log-format json --log info` (their `running job` and `job finished` lines).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use protocol::JobId;
use protocol::job::{JobState, JobView};

use crate::client::Client;

/// What the workers did with one job.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ran {
    /// Attempts a worker started (each started one container).
    pub started: Vec<u32>,
    /// Attempts a worker reported finished, with the container's exit code (None: it did not
    /// exit by itself, or failed to start).
    pub finished: Vec<(u32, Option<i64>)>,
    /// Attempts a restarted worker re-attached to: the worker had stopped meanwhile.
    pub resumed: Vec<u32>,
}

/// A run's history.
#[derive(Debug, Default)]
pub struct History {
    /// Submissions the client saw acknowledged.
    pub acknowledged: BTreeSet<JobId>,
    /// What the workers logged, by job.
    pub ran: BTreeMap<JobId, Ran>,
}

impl History {
    /// Reads the acknowledged ids from `acked` and the workers' JSON logs.
    pub fn read(acked: &Path, worker_logs: &[PathBuf]) -> Result<History> {
        let mut h = History::default();
        let text = std::fs::read_to_string(acked).with_context(|| format!("reading {}", acked.display()))?;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let id = line.trim().parse().map_err(|e| anyhow::anyhow!("{}:{}: {e}", acked.display(), n + 1))?;
            h.acknowledged.insert(id);
        }
        for path in worker_logs {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            for line in text.lines() {
                // Other lines (a panic message, say) are not events.
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    h.note(&v["fields"]);
                }
            }
        }
        Ok(h)
    }

    /// Notes one worker log event (`fields` of a tracing JSON line).
    fn note(&mut self, fields: &serde_json::Value) {
        let (Some(job), Some(attempt)) =
            (fields["job"].as_str().and_then(|j| j.parse().ok()), fields["attempt"].as_u64())
        else {
            return;
        };
        let ran = self.ran.entry(job).or_default();
        match fields["message"].as_str() {
            Some("running job") => ran.started.push(attempt as u32),
            Some("job finished" | "job failed to run") => {
                ran.finished.push((attempt as u32, fields["exit_code"].as_i64()))
            }
            Some("re-attaching to a container of a previous run") => ran.resumed.push(attempt as u32),
            _ => {}
        }
    }

    /// Every violation, given the broker's record of each job (`None`: it has none).
    pub fn check(&self, records: &BTreeMap<JobId, Option<JobView>>) -> Vec<String> {
        let mut violations = Vec::new();
        for id in &self.acknowledged {
            if !matches!(records.get(id), Some(Some(_))) {
                violations.push(format!("lost: {id} was acknowledged, and the broker has no record of it"));
            }
        }
        for (id, record) in records {
            let Some(record) = record else { continue };
            let ran = self.ran.get(id).cloned().unwrap_or_default();
            let started: BTreeSet<u32> = ran.started.iter().copied().collect();
            if started.len() > 1 && lost_attempts(&ran, &started).is_none() {
                violations.push(format!("started again: {id} ran as attempts {started:?}, so a container ran twice"));
            }
            if ran.started.len() > started.len() {
                violations.push(format!("started twice: {id} had one attempt started {} times", ran.started.len()));
            }
            if record.state != JobState::Finished {
                if let Some((attempt, _)) = ran.finished.last() {
                    violations.push(format!(
                        "finish lost: a worker reported {id} attempt {attempt} finished, and the record says {:?}",
                        record.state
                    ));
                }
                continue;
            }
            let shown = |code: Option<i64>| code.map_or("no exit code".to_string(), |c| format!("exit code {c}"));
            match ran.finished.iter().find(|(a, _)| *a == record.attempt) {
                None if record.exit_code.is_some() => violations.push(format!(
                    "made up: {id} is recorded finished by attempt {} with {}, which no worker reported",
                    record.attempt,
                    shown(record.exit_code)
                )),
                Some((_, code)) if code.is_some() && *code != record.exit_code => violations.push(format!(
                    "wrong result: {id} attempt {} ended with {} on its worker and is recorded with {}",
                    record.attempt,
                    shown(*code),
                    shown(record.exit_code)
                )),
                _ => {}
            }
        }
        violations
    }

    /// Jobs run again after their earlier attempts' workers stopped reporting (killed, say, and
    /// not back within the broker's `--lease-grace`): the retry cq promises, not a violation,
    /// though those containers may have run beside the retry.
    pub fn retried(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for (id, ran) in &self.ran {
            let started: BTreeSet<u32> = ran.started.iter().copied().collect();
            if let Some(lost) = lost_attempts(ran, &started) {
                notes.push(format!(
                    "retried: {id} ran as attempts {started:?}; attempts {lost:?} never reported finishing (their \
                     worker stopped or was lost past the broker's --lease-grace), so their containers may have run \
                     beside the retry"
                ));
            }
        }
        notes
    }
}

/// The earlier attempts of a job started more than once, if each of them lost its worker: none
/// reported finished, or re-attached by a restarted worker (which then finishes it, cancelled,
/// when the broker has moved on). `None` if a worker that never stopped reported one finished
/// (the broker started the job again while its worker still ran it), or if it started once.
fn lost_attempts(ran: &Ran, started: &BTreeSet<u32>) -> Option<Vec<u32>> {
    let last = *started.last()?;
    let earlier: Vec<u32> = started.iter().copied().filter(|a| *a != last).collect();
    let lost = |a: &u32| ran.resumed.contains(a) || !ran.finished.iter().any(|(f, _)| f == a);
    (!earlier.is_empty() && earlier.iter().all(lost)).then_some(earlier)
}

/// `cq check-history`: reads the history, fetches each job's record from the broker, prints
/// every violation and a summary; exits 1 when there is any violation.
pub async fn check_history(client: &Client, acked: &Path, worker_logs: &[PathBuf]) -> Result<ExitCode> {
    let history = History::read(acked, worker_logs)?;
    if worker_logs.is_empty() {
        eprintln!(
            "cq: no --worker-log given: every finished job will read as a result no worker reported; pass each \
             worker's log (written with --log-format json --log info)"
        );
    }
    let ids: BTreeSet<JobId> = history.acknowledged.iter().chain(history.ran.keys()).copied().collect();
    let mut records = BTreeMap::new();
    for id in ids {
        let record = match client.get(&format!("/j/{id}")).await {
            Ok(v) => Some(serde_json::from_value::<JobView>(v).with_context(|| format!("the record of {id}"))?),
            // `notFound`: the broker has no such job.
            Err(e) if format!("{e}").contains("(HTTP 404") => None,
            Err(e) => return Err(e.context(format!("reading the record of {id}"))),
        };
        records.insert(id, record);
    }
    let violations = history.check(&records);
    let retried = history.retried();
    for line in violations.iter().chain(&retried) {
        println!("{line}");
    }
    let finished = records.values().flatten().filter(|r| r.state == JobState::Finished).count();
    let started: usize = history.ran.values().map(|r| r.started.len()).sum();
    println!(
        "{} acknowledged, {} records, {finished} finished, {started} attempts started by workers{}: {} violations",
        history.acknowledged.len(),
        records.values().flatten().count(),
        if retried.is_empty() { String::new() } else { format!(", {} retried after a lost worker", retried.len()) },
        violations.len()
    );
    Ok(if violations.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> JobId {
        format!("{n:02x}").repeat(32).parse().unwrap()
    }

    fn record(n: u8, state: JobState, attempt: u32, exit_code: Option<i64>) -> Option<JobView> {
        let mut v: JobView = serde_json::from_value(serde_json::json!({
            "id": id(n).to_string(), "queue": "q", "state": "queued", "attempt": attempt, "priority": 0,
            "submittedAt": 0, "logLines": 0, "version": 1,
        }))
        .unwrap();
        v.state = state;
        v.exit_code = exit_code;
        Some(v)
    }

    fn event(h: &mut History, n: u8, message: &str, attempt: u32, exit_code: Option<i64>) {
        h.note(&serde_json::json!({"message": message, "job": id(n).to_string(), "attempt": attempt, "exit_code": exit_code}));
    }

    #[test]
    fn a_clean_history_has_no_violations_and_each_kind_of_fault_is_named() {
        let mut h = History::default();
        h.acknowledged.extend([id(1), id(2)]);
        event(&mut h, 1, "running job", 1, None);
        event(&mut h, 1, "job finished", 1, Some(3));
        let mut records = BTreeMap::from([
            (id(1), record(1, JobState::Finished, 1, Some(3))),
            (id(2), record(2, JobState::Queued, 0, None)),
        ]);
        assert_eq!(h.check(&records), Vec::<String>::new());

        // Job 2 lost; job 1 recorded with another exit code; job 3 run twice and recorded with
        // a result nobody reported; job 4's reported finish not recorded.
        records.insert(id(2), None);
        records.insert(id(1), record(1, JobState::Finished, 1, Some(0)));
        event(&mut h, 3, "running job", 1, None);
        event(&mut h, 3, "job finished", 1, None);
        event(&mut h, 3, "running job", 2, None);
        records.insert(id(3), record(3, JobState::Finished, 2, Some(0)));
        event(&mut h, 4, "running job", 1, None);
        event(&mut h, 4, "job finished", 1, Some(0));
        records.insert(id(4), record(4, JobState::Running, 1, None));
        let found = h.check(&records);
        let kinds: Vec<&str> = found.iter().map(|v| v.split(':').next().unwrap()).collect();
        assert_eq!(kinds, ["lost", "wrong result", "started again", "made up", "finish lost"], "{found:#?}");
        assert!(h.retried().is_empty());

        // Job 5's first attempt never reported finishing (its worker was killed), and the
        // broker ran it again: a retry, said apart from the violations.
        event(&mut h, 5, "running job", 1, None);
        event(&mut h, 5, "running job", 2, None);
        event(&mut h, 5, "job finished", 2, Some(0));
        records.insert(id(5), record(5, JobState::Finished, 2, Some(0)));
        assert_eq!(h.check(&records).len(), found.len());
        // The killed worker, restarted, re-attaches to attempt 1 and reports it cancelled once
        // the broker has moved on: still a retry.
        event(&mut h, 5, "re-attaching to a container of a previous run", 1, None);
        event(&mut h, 5, "job finished", 1, None);
        assert_eq!(h.check(&records).len(), found.len());
        let retried = h.retried();
        assert!(
            retried.len() == 1
                && retried[0].starts_with(&format!("retried: {} ran as attempts {{1, 2}}; attempts [1]", id(5))),
            "{retried:?}"
        );
    }
}
