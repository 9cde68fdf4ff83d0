//! One attempt of one job on this worker: inputs materialised under the job's directory, the
//! image made ready, the container started (or found again after a restart), its output
//! streamed in batches, its deadline enforced, its outputs uploaded, and the result reported.
//!
//! Everything the task says goes through one ordered channel to the controller, ending with
//! [`Out::Done`], so a job's last log lines always precede its finish.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bollard::Docker;
use futures_util::StreamExt;
use protocol::definition::{DataRef, JobDefinition, validate_relative_path};
use protocol::job::OutputFile;
use protocol::messages::{ExitStatus, WorkerToBroker};
use protocol::{JobId, LogLine, Phase, Stream as LogStream};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::blobs::{BlobClient, Digested};
use crate::docker::{self, ContainerSpec, ImageProgress, JobError};

/// Logs are sent at least this often while a container prints.
pub const LOG_FLUSH: Duration = Duration::from_millis(100);
/// The live log stream of an exited container that delivers nothing for this long is taken as
/// stalled; the rest is read from what the engine stored.
const LOG_STALL: Duration = Duration::from_secs(3);
/// How long the live log stream of an exited container may go on delivering, and how long
/// reading the stored rest may take.
const LOG_DRAIN: Duration = Duration::from_secs(60);
/// Most lines in one logs message.
const LOG_BATCH_LINES: usize = 500;
/// Most bytes in one logs message, counted as encoded JSON (a control character takes six):
/// the broker refuses websocket messages over 1 MiB.
const LOG_BATCH_BYTES: usize = 256 << 10;
/// Longest piece of a log line in one log entry; longer lines are split into pieces this long
/// (nothing is dropped), so one line cannot outgrow a batch.
const MAX_LINE: usize = 64 << 10;
/// Most output files a job keeps unless the worker says otherwise.
pub const DEFAULT_MAX_OUTPUT_FILES: usize = 1000;
/// Most output bytes (all files together) a job keeps unless the worker says otherwise.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 10 << 30;
/// Most bytes a job's directory (its inputs and outputs) may hold unless the worker says
/// otherwise.
pub const DEFAULT_MAX_JOB_DISK: u64 = 50 << 30;
/// How often the size of a running job's directory is measured against its ceiling.
pub const JOB_DISK_CHECK: Duration = Duration::from_secs(2);
/// Most bytes the list of outputs may take in a finish message, whatever the limits: the
/// finish must fit the broker's message limit with room to spare.
const MAX_OUTPUT_LIST_BYTES: usize = 512 << 10;

/// Per-job limits on what a job may leave on the worker's disk. Outputs beyond `max_files` or
/// `max_bytes` are not uploaded; the job's log says so, and the outputs up to the limit are
/// kept. A job whose directory grows past `max_job_disk` is stopped (see [`JOB_DISK_CHECK`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    pub max_files: usize,
    pub max_bytes: u64,
    /// Most bytes of the job's directory (inputs and outputs), measured every
    /// [`JOB_DISK_CHECK`] while it runs: a job can pass it by what it writes in that time.
    /// `None`: no ceiling.
    pub max_job_disk: Option<u64>,
}

impl Default for OutputLimits {
    fn default() -> OutputLimits {
        OutputLimits {
            max_files: DEFAULT_MAX_OUTPUT_FILES,
            max_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            max_job_disk: Some(DEFAULT_MAX_JOB_DISK),
        }
    }
}

/// What a job task tells the controller.
#[derive(Debug)]
pub enum Out {
    Msg(WorkerToBroker),
    /// A batch of log lines, and where the job's log stands once it has left for the broker.
    Logs(WorkerToBroker, Option<LogCursor>),
    Done {
        job: JobId,
        attempt: u32,
        outcome: Outcome,
    },
}

/// The engine's timestamp of the last whole line of a job's log sent to the broker, kept in the
/// attempt's directory. A worker restarted after a crash re-attaches and reads the log from
/// there. The controller saves it as it sends the batch (not when the job task reads it) and
/// puts the previous one back if the send fails: lines read while no broker was connected are
/// read again after a crash, not lost, and lines the broker has are not sent twice.
#[derive(Debug, Clone)]
pub struct LogCursor {
    file: PathBuf,
    /// After this batch.
    ns: u128,
    /// Before it.
    before: u128,
}

impl LogCursor {
    /// Saves the cursor past the batch (a job's directory removed meanwhile is not created
    /// again).
    pub async fn save(&self) {
        let _ = tokio::fs::write(&self.file, self.ns.to_string()).await;
    }

    /// Puts the cursor back to before the batch, which did not reach the broker.
    pub async fn restore(&self) {
        let _ = tokio::fs::write(&self.file, self.before.to_string()).await;
    }
}

/// How a job task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Report this finish (kept until the broker acknowledges it). A cancelled attempt ends
    /// with a `cancelled` finish too: that is how the broker learns its slot is free.
    Finished(WorkerToBroker),
    /// The worker is stopping: hand the job back unfinished.
    HandedBack,
}

/// Why the controller wants a job to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    No,
    Cancel,
    HandBack,
}

/// What every job task shares.
#[derive(Debug)]
pub struct JobEnv {
    pub docker: Docker,
    pub blobs: BlobClient,
    pub http: reqwest::Client,
    pub worker_id: String,
    pub data_dir: PathBuf,
    /// The worker's limit on any job's run time.
    pub max_duration: Option<Duration>,
    /// Between SIGTERM and SIGKILL when a job runs out of time.
    pub stop_grace: Duration,
    pub pids_limit: i64,
    pub output_limits: OutputLimits,
    pub limits: crate::limits::Limits,
    /// The Docker network containers join.
    pub network: String,
}

/// An assignment as the task runs it.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub job: JobId,
    pub attempt: u32,
    pub definition: JobDefinition,
    pub gpus: Vec<String>,
    /// The queue it came from, which scopes its `/cache`.
    pub queue: String,
}

/// What is kept on disk about a running attempt, to pick it up after a worker restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub job: JobId,
    pub attempt: u32,
    pub definition: JobDefinition,
    /// Unix milliseconds after which the container is stopped.
    pub deadline_ms: Option<u64>,
    pub gpus: Vec<String>,
}

impl JobEnv {
    pub fn job_dir(&self, job: JobId, attempt: u32) -> PathBuf {
        self.data_dir.join("jobs").join(format!("{job}-{attempt}"))
    }

    fn blob_cache(&self) -> PathBuf {
        self.data_dir.join("cache").join("blobs")
    }

    /// The `/cache` of a job from `queue`: one per queue unless the worker shares one wider.
    fn shared_cache(&self, queue: &str) -> PathBuf {
        match self.limits.cache {
            crate::limits::CacheScope::Queue => self.data_dir.join("cache").join("queues").join(queue),
            crate::limits::CacheScope::Worker => self.data_dir.join("cache").join("shared"),
        }
    }
}

/// The channel and stop signal of one task.
struct Ctx {
    env: Arc<JobEnv>,
    job: JobId,
    attempt: u32,
    tx: mpsc::Sender<Out>,
    stop: watch::Receiver<Stop>,
}

impl Ctx {
    async fn send(&self, msg: WorkerToBroker) {
        let _ = self.tx.send(Out::Msg(msg)).await;
    }

    fn progress(&self, phase: Phase, p: Option<ImageProgress>) {
        let (message, current, total) = match p {
            Some(p) => (Some(p.message), p.current, p.total),
            None => (None, None, None),
        };
        let msg = WorkerToBroker::Progress { job_id: self.job, attempt: self.attempt, phase, message, current, total };
        // Progress is advisory: drop it rather than wait when the channel is full.
        let _ = self.tx.try_send(Out::Msg(msg));
    }

    fn system_line(&self, text: String) -> WorkerToBroker {
        let line = LogLine { stream: LogStream::System, time: (docker::now_ns() / 1_000_000) as u64, text };
        WorkerToBroker::Logs { job_id: self.job, attempt: self.attempt, lines: vec![line] }
    }

    fn stop_requested(&self) -> Stop {
        *self.stop.borrow()
    }
}

/// Runs a new assignment to its end.
pub async fn run(env: Arc<JobEnv>, a: Assignment, stop: watch::Receiver<Stop>, tx: mpsc::Sender<Out>) {
    let ctx = Ctx { env, job: a.job, attempt: a.attempt, tx, stop };
    let outcome = match prepare_and_start(&ctx, &a).await {
        Ok(Prepared::Started(container, record)) => supervise(&ctx, &container, &record, 0).await,
        Ok(Prepared::Stopped) => {
            cleanup_dir(&ctx).await;
            stopped_outcome(&ctx)
        }
        Ok(Prepared::TimedOut(limit)) => {
            cleanup_dir(&ctx).await;
            let text = format!(
                "cq: the job reached its maximum duration of {}s before its container started\n",
                limit.as_secs()
            );
            ctx.send(ctx.system_line(text)).await;
            finish(&ctx, ExitStatus::TimedOut { exit_code: None }, Vec::new())
        }
        Err(e) => {
            cleanup_dir(&ctx).await;
            finish(&ctx, ExitStatus::Error { message: e.message, retryable: e.retryable }, Vec::new())
        }
    };
    done(&ctx, outcome).await;
}

/// Picks up an attempt whose container outlived a worker restart. One the worker created but
/// stopped before starting (`never_started`) is started now: waiting on it would report an exit
/// code 0 from a job that never ran.
pub async fn resume(
    env: Arc<JobEnv>,
    mut record: Record,
    container: String,
    never_started: bool,
    stop: watch::Receiver<Stop>,
    tx: mpsc::Sender<Out>,
) {
    let ctx = Ctx { env, job: record.job, attempt: record.attempt, tx, stop };
    if never_started {
        ctx.send(
            ctx.system_line("cq: the worker restarted before this job's container started; starting it now\n".into()),
        )
        .await;
        if let Err(e) = start_unstarted(&ctx, &container, &mut record).await {
            cleanup_dir(&ctx).await;
            let outcome = finish(&ctx, ExitStatus::Error { message: e.message, retryable: e.retryable }, Vec::new());
            return done(&ctx, outcome).await;
        }
        ctx.progress(Phase::Running, None);
        let outcome = supervise(&ctx, &container, &record, 0).await;
        return done(&ctx, outcome).await;
    }
    let cursor = read_cursor(&ctx).await;
    ctx.send(ctx.system_line("cq: the worker restarted and re-attached to this container\n".into())).await;
    let outcome = supervise(&ctx, &container, &record, cursor).await;
    done(&ctx, outcome).await;
}

/// Starts the container of a resumed attempt that never started, its time limit counted from
/// now (the preparation before the restart is not known).
async fn start_unstarted(ctx: &Ctx, container: &str, record: &mut Record) -> Result<(), JobError> {
    let limit = [record.definition.max_duration_secs().map(Duration::from_secs), ctx.env.max_duration]
        .into_iter()
        .flatten()
        .min();
    if let Some(limit) = limit {
        record.deadline_ms = Some((docker::now_ns() / 1_000_000) as u64 + limit.as_millis() as u64);
        write_record(&ctx.env.job_dir(ctx.job, ctx.attempt), record).await?;
    }
    docker::start_created(&ctx.env.docker, container).await
}

async fn done(ctx: &Ctx, outcome: Outcome) {
    let _ = ctx.tx.send(Out::Done { job: ctx.job, attempt: ctx.attempt, outcome }).await;
}

fn stopped_outcome(ctx: &Ctx) -> Outcome {
    match ctx.stop_requested() {
        Stop::HandBack => Outcome::HandedBack,
        _ => finish(ctx, ExitStatus::Cancelled, Vec::new()),
    }
}

/// Removes whatever an attempt left behind (its containers and its directory), for a task that
/// could not clean up after itself.
pub async fn clean_up_attempt(env: &JobEnv, job: JobId, attempt: u32) {
    if let Ok(owned) = docker::owned(&env.docker, &env.worker_id).await {
        for c in owned.into_iter().filter(|c| c.job == job && c.attempt == attempt) {
            if let Err(e) = docker::remove(&env.docker, &c.id).await {
                tracing::warn!(container = c.id, error = %e, "cannot remove the container of a failed job task");
            }
        }
    }
    remove_dir(&env.job_dir(job, attempt)).await;
}

fn finish(ctx: &Ctx, status: ExitStatus, outputs: Vec<OutputFile>) -> Outcome {
    Outcome::Finished(WorkerToBroker::Finish { job_id: ctx.job, attempt: ctx.attempt, status, outputs })
}

/// How preparing an attempt ended.
enum Prepared {
    /// The container runs.
    Started(String, Box<Record>),
    /// Told to stop on the way; nothing is left running.
    Stopped,
    /// The job's time (which includes fetching inputs, pulling and building) ran out first.
    TimedOut(Duration),
}

/// Inputs, image, container. The job's `maxDuration` (or the worker's) counts from here, so a
/// slow pull or build is bounded too, and a stop request ends any step at once.
async fn prepare_and_start(ctx: &Ctx, a: &Assignment) -> Result<Prepared, JobError> {
    let limit =
        [a.definition.max_duration_secs().map(Duration::from_secs), ctx.env.max_duration].into_iter().flatten().min();
    let started_ms = (docker::now_ns() / 1_000_000) as u64;
    let deadline = limit.map(|l| tokio::time::Instant::now() + l);
    let timed_out = || Prepared::TimedOut(limit.unwrap_or_default());
    let dir = ctx.env.job_dir(a.job, a.attempt);
    let inputs = dir.join("inputs");
    let outputs = dir.join("outputs");
    ctx.progress(Phase::Preparing, None);
    // Refused before anything is fetched: the worker's ceilings, not the job, decide.
    let granted = ctx.env.limits.grant(&a.definition)?;
    let cache = ctx.env.shared_cache(&a.queue);
    for d in [&inputs, &outputs, &ctx.env.blob_cache(), &cache] {
        tokio::fs::create_dir_all(d).await.map_err(|e| JobError::infra(format!("creating {}: {e}", d.display())))?;
    }
    // Containers may run as any user: let them write their outputs and cache.
    set_mode(&outputs, 0o777).await;
    set_mode(&cache, 0o777).await;
    let mut stop = ctx.stop.clone();
    tokio::select! {
        r = materialise_inputs(ctx, &a.definition, &inputs) => r?,
        _ = stop_requested(&mut stop) => return Ok(Prepared::Stopped),
        _ = sleep_until(deadline) => return Ok(timed_out()),
    }
    let image = {
        let progress_ctx = &ctx;
        let on_progress = |p: ImageProgress| {
            let phase = if a.definition.build.is_some() { Phase::Building } else { Phase::Pulling };
            progress_ctx.progress(phase, Some(p));
        };
        let on_log = |text: String| {
            let _ = ctx.tx.try_send(Out::Msg(ctx.system_line(text)));
        };
        tokio::select! {
            r = docker::ensure_image(&ctx.env.docker, &ctx.env.http, &a.definition, &on_progress, &on_log) => r?,
            _ = stop_requested(&mut stop) => return Ok(Prepared::Stopped),
            _ = sleep_until(deadline) => return Ok(timed_out()),
        }
    };
    let mut record = Record {
        job: a.job,
        attempt: a.attempt,
        definition: a.definition.clone(),
        deadline_ms: None,
        gpus: a.gpus.clone(),
    };
    // The record exists before the container, so a restarted worker can always pick it up.
    write_record(&dir, &record).await?;
    let spec = ContainerSpec {
        name: format!("cq-{}-{}-{}", ctx.env.worker_id, &a.job.to_string()[..16], a.attempt),
        image,
        worker: ctx.env.worker_id.clone(),
        job: a.job,
        attempt: a.attempt,
        inputs_dir: path_str(&inputs),
        outputs_dir: path_str(&outputs),
        cache_dir: path_str(&cache),
        gpu_devices: a.gpus.clone(),
        pids_limit: ctx.env.pids_limit,
        // The broker connected to now, for the `JOB_*_URL_PREFIX` variables that jobs written
        // for the reference system read.
        url_prefix: format!("{}/j/{}", ctx.env.blobs.base(), a.job),
        granted,
        network: ctx.env.network.clone(),
    };
    if ctx.stop_requested() != Stop::No {
        return Ok(Prepared::Stopped);
    }
    let container = docker::start_container(&ctx.env.docker, &a.definition, &spec).await?;
    // maxDuration counts from the start of the attempt, preparation included.
    if let Some(limit) = limit {
        record.deadline_ms = Some(started_ms + limit.as_millis() as u64);
        write_record(&dir, &record).await?;
    }
    ctx.progress(Phase::Running, None);
    Ok(Prepared::Started(container, Box::new(record)))
}

async fn write_record(dir: &Path, record: &Record) -> Result<(), JobError> {
    let json = serde_json::to_vec(record).map_err(|e| JobError::infra(e.to_string()))?;
    tokio::fs::write(dir.join("job.json"), json).await.map_err(|e| JobError::infra(format!("writing job.json: {e}")))
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

async fn set_mode(path: &Path, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).await;
    }
}

/// Writes every input under `dir`: inline data as is, blobs from the local cache or the broker,
/// URLs downloaded (and checked when the job gave their hash).
async fn materialise_inputs(ctx: &Ctx, def: &JobDefinition, dir: &Path) -> Result<(), JobError> {
    for (path, data) in &def.inputs {
        validate_relative_path(path).map_err(|e| JobError::user(format!("input `{path}`: {e}")))?;
        let dest = dir.join(path);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(|e| JobError::infra(format!("creating {path}: {e}")))?;
        }
        match data {
            DataRef::Blob { sha256, size } => {
                let cached = ctx.env.blob_cache().join(sha256);
                let expected = Digested { sha256: sha256.clone(), size: *size };
                let present = tokio::fs::metadata(&cached).await.map(|m| m.len() == *size).unwrap_or(false);
                if !present {
                    ctx.env.blobs.download(&format!("/f/{sha256}"), &cached, Some(&expected), None).await.map_err(
                        |e| {
                            let text = format!("{e:#}");
                            let message = format!("downloading input `{path}` failed: {text}");
                            if text.contains("404") { JobError::user(message) } else { JobError::infra(message) }
                        },
                    )?;
                }
                // A hard link shares the cached bytes; the mount is read-only for the job.
                if tokio::fs::hard_link(&cached, &dest).await.is_err() {
                    tokio::fs::copy(&cached, &dest)
                        .await
                        .map_err(|e| JobError::infra(format!("placing input `{path}`: {e}")))?;
                }
            }
            DataRef::Url { url, sha256, size } => {
                // Fetched only from addresses the job itself could reach (see `fetch`).
                let fetched =
                    crate::fetch::fetch(&ctx.env.limits.fetch, url, &dest, &format!("input `{path}`")).await?;
                if let Some(expected) = sha256 {
                    let actual = fetched.sha256;
                    if &actual != expected || size.is_some_and(|s| s != fetched.size) {
                        return Err(JobError::user(format!(
                            "input `{path}` from {} does not match its sha256 (got {actual})",
                            docker::redact(url)
                        )));
                    }
                }
            }
            inline => {
                let bytes =
                    inline.inline_bytes().ok_or_else(|| JobError::user(format!("input `{path}` is invalid")))?;
                tokio::fs::write(&dest, bytes).await.map_err(|e| JobError::infra(format!("writing {path}: {e}")))?;
            }
        }
    }
    Ok(())
}

/// Streams the container's logs, enforces its deadline, obeys stop requests, then collects the
/// outputs and reports.
async fn supervise(ctx: &Ctx, container: &str, record: &Record, since_ns: u128) -> Outcome {
    let docker = ctx.env.docker.clone();
    let sent = Arc::new(LogProgress { ns: AtomicU64::new(since_ns as u64), batches: AtomicU64::new(0) });
    let mut log_task = tokio::spawn(forward_logs(
        docker::logs(&docker, container, since_ns),
        ctx.tx.clone(),
        ctx.job,
        ctx.attempt,
        ctx.env.job_dir(ctx.job, ctx.attempt).join("log-cursor"),
        sent.clone(),
    ));
    let deadline = record.deadline_ms.map(|ms| {
        let now = (docker::now_ns() / 1_000_000) as u64;
        tokio::time::Instant::now() + Duration::from_millis(ms.saturating_sub(now))
    });
    let mut stop = ctx.stop.clone();
    let mut timed_out = false;
    let mut over_disk = None;
    let dir = ctx.env.job_dir(ctx.job, ctx.attempt);
    let exit = tokio::select! {
        exit = docker::wait(&docker, container) => exit,
        size = disk_exceeded(&dir, ctx.env.output_limits.max_job_disk) => {
            let limit = ctx.env.output_limits.max_job_disk.unwrap_or_default();
            over_disk = Some(limit);
            ctx.send(ctx.system_line(format!(
                "cq: the job's directory holds {size} bytes, over this worker's limit of {limit} bytes; stopping the job\n"
            ))).await;
            docker::kill(&docker, container).await;
            docker::wait(&docker, container).await
        }
        _ = sleep_until(deadline) => {
            timed_out = true;
            let grace = ctx.env.stop_grace;
            ctx.send(ctx.system_line(format!(
                "cq: the job reached its maximum duration; stopping it (SIGTERM, then SIGKILL after {}s)\n",
                grace.as_secs()
            ))).await;
            docker::stop(&docker, container, grace).await;
            docker::wait(&docker, container).await
        }
        _ = stop_requested(&mut stop) => {
            docker::kill(&docker, container).await;
            if tokio::time::timeout(LOG_STALL, &mut log_task).await.is_err() {
                // No line may follow the finish.
                log_task.abort();
                let _ = log_task.await;
            }
            let _ = docker::remove(&docker, container).await;
            cleanup_dir(ctx).await;
            return stopped_outcome(ctx);
        }
    };
    // The live stream ends with the container, usually with every line delivered (megabytes may
    // still be in flight on a busy host). It is not the record, though: it can end before the
    // engine has stored a last line without a newline, and it stalls where the engine rotates
    // its log file (json-file with max-size). So it may go on while it delivers, is stopped once
    // it stalls, and the rest is read from what the engine stored, after the last line
    // delivered.
    let drain_until = tokio::time::Instant::now() + LOG_DRAIN;
    loop {
        let before = sent.batches.load(Ordering::SeqCst);
        if tokio::time::timeout(LOG_STALL, &mut log_task).await.is_ok() {
            break;
        }
        if sent.batches.load(Ordering::SeqCst) == before || tokio::time::Instant::now() >= drain_until {
            log_task.abort();
            let _ = log_task.await;
            break;
        }
    }
    let since = u128::from(sent.ns.load(Ordering::SeqCst));
    let cursor = ctx.env.job_dir(ctx.job, ctx.attempt).join("log-cursor");
    let rest = docker::logs_stored(&docker, container, since);
    let reread = forward_logs(rest, ctx.tx.clone(), ctx.job, ctx.attempt, cursor, sent.clone());
    if tokio::time::timeout(LOG_DRAIN, reread).await.is_err() {
        tracing::warn!(container, "reading the stored log of an exited container took too long; the rest is dropped");
    }
    let exit = match exit {
        Ok(exit) => exit,
        Err(e) => {
            let _ = docker::remove(&docker, container).await;
            cleanup_dir(ctx).await;
            return finish(ctx, ExitStatus::Error { message: e.message, retryable: e.retryable }, Vec::new());
        }
    };
    // The engine's OOMKilled flag comes from a cgroup event that can arrive after the exit is
    // read, so a SIGKILL no stop of cq's caused (exit code 137) is named as the likely cause too.
    if exit.oom_killed || exit.code == 137 {
        let limit = record
            .definition
            .resources
            .as_ref()
            .and_then(|r| match &r.memory {
                Some(protocol::definition::ByteSize::Bytes(b)) => Some(*b),
                _ => None,
            })
            .map(|b| format!(" of {} MiB", b >> 20))
            .unwrap_or_default();
        let note = if exit.oom_killed {
            format!("cq: the container was killed for exceeding its memory limit{limit}\n")
        } else {
            format!("cq: the container was killed (SIGKILL), most likely for exceeding its memory limit{limit}\n")
        };
        ctx.send(ctx.system_line(note)).await;
    }
    ctx.progress(Phase::Uploading, None);
    let outputs = collect_outputs(ctx).await;
    // The result does not wait for the clean-up.
    let container = container.to_string();
    tokio::spawn(async move {
        if let Err(e) = docker::remove(&docker, &container).await {
            tracing::warn!(container, error = %e, "cannot remove a finished container");
        }
        remove_dir(&dir).await;
    });
    let status = match outputs {
        Err(e) => return finish(ctx, ExitStatus::Error { message: e.message, retryable: e.retryable }, Vec::new()),
        Ok(_) if over_disk.is_some() => ExitStatus::Error {
            message: format!(
                "stopped: the job's directory grew past this worker's limit of {} bytes",
                over_disk.unwrap_or_default()
            ),
            retryable: false,
        },
        Ok(_) if timed_out => ExitStatus::TimedOut { exit_code: Some(exit.code) },
        Ok(_) => ExitStatus::Exited { exit_code: exit.code },
    };
    finish(ctx, status, outputs.unwrap_or_default())
}

/// Resolves with the size of `dir` once it holds more than `limit` bytes (measured every
/// [`JOB_DISK_CHECK`]); never without a limit.
async fn disk_exceeded(dir: &Path, limit: Option<u64>) -> u64 {
    let Some(limit) = limit else { return std::future::pending().await };
    let mut tick = tokio::time::interval(JOB_DISK_CHECK);
    loop {
        tick.tick().await;
        let size = tokio::task::spawn_blocking({
            let dir = dir.to_path_buf();
            move || disk_usage(&dir)
        })
        .await
        .unwrap_or(0);
        if size > limit {
            return size;
        }
    }
}

/// Bytes of the regular files below `dir` (symbolic links are not followed).
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
    }
    total
}

/// Resolves once the controller asks the job to stop.
async fn stop_requested(stop: &mut watch::Receiver<Stop>) {
    if stop.wait_for(|s| *s != Stop::No).await.is_err() {
        // The controller is gone: keep running to the end.
        std::future::pending::<()>().await;
    }
}

/// Sleeps until `deadline`, or forever without one (for optional branches of a `select!`).
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sends the container's lines: a line after a quiet spell at once, busier output in batches at
/// most [`LOG_FLUSH`] apart (or sooner when a batch is full). Remembers the timestamp of the last
/// line sent, in `sent` and in `cursor_file` (for a re-attach).
async fn forward_logs(
    lines: impl futures_util::Stream<Item = (u128, LogLine)> + Send + 'static,
    tx: mpsc::Sender<Out>,
    job: JobId,
    attempt: u32,
    cursor_file: PathBuf,
    sent: Arc<LogProgress>,
) {
    let mut lines = std::pin::pin!(lines);
    let mut sink = LogSink { tx, job, attempt, cursor_file, sent, batch: Vec::new(), bytes: 0 };
    // The timestamp of the last line whose every piece is in the batch or sent.
    let mut whole_ns = 0u128;
    let mut flush_at: Option<tokio::time::Instant> = None;
    let mut last_flush = tokio::time::Instant::now() - LOG_FLUSH;
    loop {
        let next = tokio::select! {
            next = lines.next() => next,
            _ = sleep_until(flush_at) => {
                sink.flush(whole_ns).await;
                last_flush = tokio::time::Instant::now();
                flush_at = None;
                continue;
            }
        };
        let Some((ns, line)) = next else { break };
        for piece in split_line(line) {
            let size = json_len(&piece.text);
            if sink.bytes + size > LOG_BATCH_BYTES {
                // Part of this line may be in the batch: the cursor stays before it.
                sink.flush(whole_ns).await;
            }
            sink.bytes += size;
            sink.batch.push(piece);
        }
        whole_ns = ns;
        // A line after a quiet spell leaves at once; lines that follow within LOG_FLUSH are
        // batched with the ones after them.
        let quiet = last_flush.elapsed() >= LOG_FLUSH;
        if quiet || sink.batch.len() >= LOG_BATCH_LINES || sink.bytes >= LOG_BATCH_BYTES {
            sink.flush(whole_ns).await;
            last_flush = tokio::time::Instant::now();
            flush_at = None;
        } else {
            flush_at.get_or_insert(last_flush + LOG_FLUSH);
        }
    }
    sink.flush(whole_ns).await;
}

/// How far [`forward_logs`] got: the engine's timestamp of the last whole line handed to the
/// controller, and how many batches it handed over.
struct LogProgress {
    ns: AtomicU64,
    batches: AtomicU64,
}

/// Where [`forward_logs`] sends its batches, and how far it got.
struct LogSink {
    tx: mpsc::Sender<Out>,
    job: JobId,
    attempt: u32,
    cursor_file: PathBuf,
    sent: Arc<LogProgress>,
    batch: Vec<LogLine>,
    /// Encoded size of `batch`.
    bytes: usize,
}

impl LogSink {
    /// Sends the batch; `whole_ns` is the timestamp of the last line it completes.
    async fn flush(&mut self, whole_ns: u128) {
        if self.batch.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.batch);
        self.bytes = 0;
        let msg = WorkerToBroker::Logs { job_id: self.job, attempt: self.attempt, lines };
        let before = u128::from(self.sent.ns.load(Ordering::SeqCst));
        let cursor = (whole_ns > 0).then(|| LogCursor { file: self.cursor_file.clone(), ns: whole_ns, before });
        let _ = self.tx.send(Out::Logs(msg, cursor)).await;
        // Nothing can stop the task between the send and these stores (no await): `sent` never
        // claims a line that was not handed over.
        self.sent.batches.fetch_add(1, Ordering::SeqCst);
        if whole_ns > 0 {
            self.sent.ns.store(whole_ns as u64, Ordering::SeqCst);
        }
    }
}

/// A line longer than [`MAX_LINE`] as several entries of at most that many bytes (split on
/// character boundaries; only the last piece keeps the line's end).
fn split_line(line: LogLine) -> Vec<LogLine> {
    if line.text.len() <= MAX_LINE {
        return vec![line];
    }
    let mut pieces = Vec::new();
    let mut rest = line.text.as_str();
    while !rest.is_empty() {
        let mut cut = rest.len().min(MAX_LINE);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        pieces.push(LogLine { stream: line.stream, time: line.time, text: piece.to_string() });
        rest = tail;
    }
    pieces
}

/// Bytes `text` takes as a JSON string: control characters, quotes and backslashes are
/// escaped.
fn json_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'\n' | b'\r' | b'\t' | b'\x08' | b'\x0c' | b'"' | b'\\' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
        + 2
}

async fn read_cursor(ctx: &Ctx) -> u128 {
    let file = ctx.env.job_dir(ctx.job, ctx.attempt).join("log-cursor");
    tokio::fs::read_to_string(file).await.ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Uploads every regular file under the job's `outputs/` (symbolic links are not followed).
async fn collect_outputs(ctx: &Ctx) -> Result<Vec<OutputFile>, JobError> {
    let root = ctx.env.job_dir(ctx.job, ctx.attempt).join("outputs");
    let files = tokio::task::spawn_blocking({
        let root = root.clone();
        move || list_files(&root)
    })
    .await
    .map_err(|e| JobError::infra(e.to_string()))?;
    let limits = ctx.env.output_limits;
    let total = files.len();
    let (mut outputs, mut bytes, mut list_bytes) = (Vec::new(), 0u64, 0usize);
    for (rel, path) in files {
        if let Err(e) = validate_relative_path(&rel) {
            ctx.send(ctx.system_line(format!("cq: output `{rel}` skipped: {e}\n"))).await;
            continue;
        }
        let size = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
        // What this entry adds to the finish message: the path, the hash and the JSON around.
        let entry = rel.len() + 64 + 64;
        let over = if outputs.len() >= limits.max_files {
            Some(format!("{} files", limits.max_files))
        } else if bytes + size > limits.max_bytes {
            Some(format!("{} bytes", limits.max_bytes))
        } else if list_bytes + entry > MAX_OUTPUT_LIST_BYTES {
            Some(format!("{MAX_OUTPUT_LIST_BYTES} bytes of file names"))
        } else {
            None
        };
        if let Some(limit) = over {
            let text = format!(
                "cq: output limit of {limit} reached: kept {} of {total} output files ({bytes} bytes); the rest were not uploaded\n",
                outputs.len()
            );
            ctx.send(ctx.system_line(text)).await;
            break;
        }
        bytes += size;
        list_bytes += entry;
        let d = ctx
            .env
            .blobs
            .upload_file(&path, None)
            .await
            .map_err(|e| JobError::infra(format!("uploading output `{rel}` failed: {e:#}")))?;
        outputs.push(OutputFile { path: rel, size: d.size, sha256: d.sha256 });
    }
    Ok(outputs)
}

/// (relative path with `/`, full path) of every regular file below `root`, sorted.
fn list_files(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let Ok(rel) = path.strip_prefix(root) else { continue };
                let Some(rel) = rel.to_str() else { continue };
                out.push((rel.replace(std::path::MAIN_SEPARATOR, "/"), path));
            }
        }
    }
    out.sort();
    out
}

async fn cleanup_dir(ctx: &Ctx) {
    remove_dir(&ctx.env.job_dir(ctx.job, ctx.attempt)).await;
}

async fn remove_dir(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a job directory");
    }
}

/// Reads the record of an attempt from its directory.
pub async fn read_record(env: &JobEnv, job: JobId, attempt: u32) -> Option<Record> {
    let bytes = tokio::fs::read(env.job_dir(job, attempt).join("job.json")).await.ok()?;
    serde_json::from_slice(&bytes).ok()
}
