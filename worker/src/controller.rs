//! The worker's controller: one websocket to the broker, kept up with capped, jittered
//! exponential backoff; assignments accepted into free slots and run as job tasks; finishes kept
//! until the broker acknowledges them (and sent again after a reconnect); containers of a
//! previous run found by label and picked up again; a graceful drain on shutdown.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures_util::{SinkExt, StreamExt};
use protocol::messages::{BrokerToWorker, ExitStatus, HeldJob, WorkerToBroker};
use protocol::{JobId, WorkerId};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tracing::Instrument;

use crate::blobs::BlobClient;
use crate::docker;
use crate::job::{self, Assignment, JobEnv, Out, Outcome, Stop, sleep_until};

/// First wait before reconnecting; doubles up to [`BACKOFF_MAX`], with jitter.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// For the first [`OUTAGE_EARLY`] of an outage the wait stays under this, so a worker finds a
/// broker that comes back (a restart, a standby taking over) within seconds of it serving.
pub const BACKOFF_MAX_EARLY: Duration = Duration::from_secs(3);
pub const OUTAGE_EARLY: Duration = Duration::from_secs(60);
/// Between a failed connection attempt and one to the next broker given (of several): short,
/// as that broker is likely up; the backoff applies once every broker has failed.
const NEXT_BROKER_WAIT: Duration = Duration::from_millis(100);

/// After a broker closes the connection with "going away" (it is stopping, or handing its log
/// to another broker), attempts come every [`NEXT_BROKER_WAIT`] for this long instead of after
/// the backoff, skipping that broker when others are given: the new owner serves within a
/// fraction of a second of a handover, and behind one address a load balancer picks another.
const HANDOVER_WINDOW: Duration = Duration::from_secs(5);

/// A connection that lasted this long was healthy: the next reconnect starts the backoff over.
/// Shorter ones (a broker that closes at once, say for a message it refused) keep doubling it.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// `http(s)://host:port` of the broker, or of several brokers of one cluster: each
    /// connection attempt that fails moves on to the next, and blob transfers and jobs' URLs
    /// follow the one connected to. At least one.
    pub broker_urls: Vec<String>,
    pub token: Option<String>,
    pub worker_id: WorkerId,
    pub queues: Vec<String>,
    pub slots: u32,
    /// GPU device ids this worker hands out, one per GPU a job asks for.
    pub gpus: Vec<String>,
    pub tags: Vec<String>,
    /// Longest any job may run here (a job's own `maxDuration` may be shorter).
    pub max_duration: Option<Duration>,
    pub data_dir: PathBuf,
    /// Between SIGTERM and SIGKILL when a job runs out of time.
    pub stop_grace: Duration,
    /// How long running jobs may go on after a shutdown signal before they are handed back.
    pub drain_timeout: Duration,
    pub pids_limit: i64,
    /// What a job may leave in its outputs.
    pub output_limits: job::OutputLimits,
    /// Ceilings, network and input policy for jobs.
    pub limits: crate::limits::Limits,
}

/// A job task the controller tracks (by job and attempt: a cancelled attempt may still be
/// stopping when the next one of the same job arrives).
struct Running {
    stop: watch::Sender<Stop>,
    gpus: Vec<String>,
}

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    /// When the first wait of this streak was asked for.
    since: Option<Instant>,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN, since: None }
    }
    fn reset(&mut self) {
        *self = Backoff::new();
    }
    fn wait(&mut self) -> Duration {
        let early = self.since.get_or_insert_with(Instant::now).elapsed() < OUTAGE_EARLY;
        let cap = if early { self.next.min(BACKOFF_MAX_EARLY) } else { self.next };
        self.next = (self.next * 2).min(BACKOFF_MAX);
        // A fresh RandomState is seeded from the OS: good enough to spread reconnects.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(cap.as_nanos() as u64);
        let jitter = h.finish() % (cap.as_millis() as u64 / 2 + 1);
        Duration::from_millis(cap.as_millis() as u64 / 2 + jitter)
    }
}

/// Runs the worker until `shutdown` resolves and the drain completes. Every log line it writes
/// carries the worker id (and, for a job, the job id and attempt).
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let span = tracing::info_span!("worker", worker = %config.worker_id);
    let served = serve(config, shutdown).instrument(span.clone()).await;
    if served.is_ok() {
        span.in_scope(|| tracing::info!("the worker stopped"));
    }
    served
}

async fn serve(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let docker = docker::connect().await.map_err(|e| anyhow::anyhow!(e.message))?;
    let network =
        docker::prepare_network(&docker, &config.limits.network).await.map_err(|e| anyhow::anyhow!(e.message))?;
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let env = Arc::new(JobEnv {
        docker: docker.clone(),
        blobs: BlobClient::new(config.broker_urls.first().context("no broker URL given")?, config.token.clone())?,
        http: reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?,
        worker_id: config.worker_id.to_string(),
        data_dir: config.data_dir.clone(),
        max_duration: config.max_duration,
        stop_grace: config.stop_grace,
        pids_limit: config.pids_limit,
        output_limits: config.output_limits,
        limits: config.limits.clone(),
        network,
    });
    let (tx, mut rx) = mpsc::channel::<Out>(4096);
    let mut jobs: HashMap<(JobId, u32), Running> = HashMap::new();
    let mut free_gpus: BTreeSet<String> = config.gpus.iter().cloned().collect();

    // Containers of a previous run of this worker: pick up those we have a record of.
    for owned in docker::owned(&docker, &env.worker_id).await.map_err(|e| anyhow::anyhow!(e.message))? {
        let record = job::read_record(&env, owned.job, owned.attempt).await;
        match record {
            Some(record) if !jobs.keys().any(|(j, _)| *j == owned.job) => {
                tracing::info!(job = %owned.job, attempt = owned.attempt, container = %owned.id, "re-attaching to a container of a previous run");
                for g in &record.gpus {
                    free_gpus.remove(g);
                }
                let (stop_tx, stop_rx) = watch::channel(Stop::No);
                jobs.insert((owned.job, owned.attempt), Running { stop: stop_tx, gpus: record.gpus.clone() });
                let span = tracing::info_span!("job", job = %owned.job, attempt = owned.attempt);
                let task = job::resume(env.clone(), record, owned.id, owned.never_started, stop_rx, tx.clone());
                spawn_job(env.clone(), owned.job, owned.attempt, tx.clone(), task.instrument(span));
            }
            _ => {
                tracing::info!(job = %owned.job, container = %owned.id, "removing a container of a previous run that cannot be resumed");
                let _ = docker::remove(&docker, &owned.id).await;
            }
        }
    }

    let mut shutdown = std::pin::pin!(shutdown);
    let mut draining = false;
    let mut drain_deadline: Option<Instant> = None;
    let mut unacked: HashMap<JobId, WorkerToBroker> = HashMap::new();
    // A message that could not be sent, sent first on the next connection; for a batch of log
    // lines, its job's log cursor (saved as it is sent, put back if the send fails).
    let mut pending: Option<(WorkerToBroker, Option<job::LogCursor>)> = None;
    let mut backoff = Backoff::new();
    let mut failures = 0u32;
    // When the last connection was made; `None` before the first attempt.
    let mut connected_at: Option<Option<Instant>> = None;
    // The broker URL tried next (an index into `broker_urls`), and how many have failed in a row
    // since the last backoff: the others given are tried at once, the backoff comes between
    // rounds of all of them.
    let mut at = 0usize;
    let mut failed_in_round = 0usize;
    let mut connected_before = false;
    // The broker (an index into `broker_urls`) that last said "going away", and until when its
    // handover is awaited (see HANDOVER_WINDOW).
    let mut handover: Option<(usize, Instant)> = None;

    'connection: loop {
        if draining && jobs.is_empty() && unacked.is_empty() {
            return Ok(());
        }
        // Every path back here waits with the jittered backoff first, so a broker that closes
        // each connection at once is not hammered.
        if let Some(last) = connected_at {
            if last.is_some_and(|t| t.elapsed() >= HEALTHY_SESSION) {
                backoff.reset();
            }
            let leaving = handover.filter(|(_, until)| Instant::now() < *until).map(|(i, _)| i);
            let wait = if let Some(leaving) = leaving {
                if at == leaving && config.broker_urls.len() > 1 {
                    at = (at + 1) % config.broker_urls.len();
                }
                failed_in_round = 0;
                NEXT_BROKER_WAIT
            } else if failed_in_round > 0 && failed_in_round < config.broker_urls.len() {
                NEXT_BROKER_WAIT
            } else {
                failed_in_round = 0;
                backoff.wait()
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut shutdown, if !draining => {
                    draining = true;
                    drain_deadline = Some(Instant::now() + config.drain_timeout);
                }
                _ = sleep_until(drain_deadline), if draining => {
                    // No broker to hand jobs back to: stop them; the broker requeues them
                    // when the lease runs out.
                    for r in jobs.values() {
                        let _ = r.stop.send(Stop::HandBack);
                    }
                    if jobs.is_empty() {
                        return Ok(());
                    }
                    drain_deadline = None;
                }
                Some(out) = rx.recv(), if draining && drain_deadline.is_none() => {
                    if let Out::Done { job, attempt, .. } = out {
                        jobs.remove(&(job, attempt));
                    }
                    if jobs.is_empty() {
                        return Ok(());
                    }
                }
            }
            if draining && jobs.is_empty() && unacked.is_empty() {
                return Ok(());
            }
        }
        connected_at = Some(None);
        let held: Vec<HeldJob> = jobs
            .keys()
            .map(|(j, a)| HeldJob { job_id: *j, attempt: *a })
            .chain(unacked.values().filter_map(|m| match m {
                WorkerToBroker::Finish { job_id, attempt, .. } => Some(HeldJob { job_id: *job_id, attempt: *attempt }),
                _ => None,
            }))
            .collect();
        let url = &config.broker_urls[at % config.broker_urls.len()];
        let mut socket = match connect(&config, url, held).await {
            Ok((socket, heartbeat, base)) => {
                if connected_before {
                    tracing::info!(broker = %base, "connected to the broker again");
                } else {
                    tracing::info!(broker = %base, "connected to the broker");
                }
                connected_before = true;
                // Files go to the broker the socket reached: the one owning the queues.
                env.blobs.set_base(&base);
                handover = None;
                failures = 0;
                failed_in_round = 0;
                connected_at = Some(Some(Instant::now()));
                (socket, heartbeat)
            }
            Err(e) if e.downcast_ref::<Refused>().is_some() => {
                return Err(e.context("the broker refused this worker's settings"));
            }
            Err(e) => {
                failures += 1;
                // Said at the first failure of a streak and every tenth after: during a
                // takeover each broker given is tried every few hundred milliseconds.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(error = %format!("{e:#}"), failures, "cannot reach the broker");
                } else {
                    tracing::debug!(error = %format!("{e:#}"), failures, "cannot reach the broker");
                }
                // The next attempt goes to the next broker given.
                at = (at + 1) % config.broker_urls.len();
                failed_in_round += 1;
                continue;
            }
        };
        let (ref mut ws, heartbeat) = socket;
        let mut tick = tokio::time::interval(heartbeat);
        tick.reset();
        let mut outbox: Vec<WorkerToBroker> = Vec::new();
        if draining {
            outbox.push(WorkerToBroker::Drain);
        }
        outbox.extend(unacked.values().cloned());
        for msg in outbox {
            // Kept in `unacked` (or, for a drain, by `draining`): sent again next time.
            if let Err(e) = send(ws, &msg).await {
                tracing::warn!(error = %e, "lost the broker while catching up");
                continue 'connection;
            }
        }
        if let Some((msg, cursor)) = pending.take()
            && let Err(e) = send_with_cursor(ws, &msg, cursor.as_ref()).await
        {
            tracing::warn!(error = %e, "lost the broker while catching up");
            pending = Some((msg, cursor));
            continue 'connection;
        }
        loop {
            if draining && jobs.is_empty() && unacked.is_empty() {
                // Complete the closing handshake: once the broker answers, it has read (and
                // queued for its core) everything sent before, such as the last releases.
                let _ = ws.close(None).await;
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), async { while ws.next().await.is_some() {} }).await;
                return Ok(());
            }
            tokio::select! {
                inbound = ws.next() => {
                    let text = match inbound {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(frame))) => {
                            let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or_default();
                            // Going away: a broker stopping (or handing its queues over) says so.
                            if code == protocol::close::GOING_AWAY {
                                tracing::info!(code, reason, "the broker closed the connection; reconnecting");
                                handover = Some((at, Instant::now() + HANDOVER_WINDOW));
                            } else {
                                tracing::warn!(code, reason, "the broker closed the connection");
                            }
                            continue 'connection;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "the connection to the broker failed");
                            continue 'connection;
                        }
                        None => continue 'connection,
                    };
                    let msg: BrokerToWorker = match serde_json::from_str(&text) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "unreadable message from the broker");
                            continue;
                        }
                    };
                    let reply = handle(msg, &config, &env, &tx, &mut jobs, &mut free_gpus, &mut unacked, draining);
                    for m in reply {
                        if send(ws, &m).await.is_err() {
                            pending = Some((m, None));
                            continue 'connection;
                        }
                    }
                }
                Some(out) = rx.recv() => {
                    let mut cursor = None;
                    let msg = match out {
                        Out::Msg(m) => Some(m),
                        Out::Logs(m, c) => {
                            cursor = c;
                            Some(m)
                        }
                        Out::Done { job, attempt, outcome } => {
                            if let Some(r) = jobs.remove(&(job, attempt)) {
                                free_gpus.extend(r.gpus);
                            }
                            match outcome {
                                Outcome::Finished(m) => {
                                    log_finish(&m);
                                    unacked.insert(job, m.clone());
                                    Some(m)
                                }
                                Outcome::HandedBack => Some(WorkerToBroker::Release {
                                    job_id: job,
                                    attempt,
                                    reason: Some("the worker is shutting down".into()),
                                }),
                            }
                        }
                    };
                    if let Some(m) = msg
                        && let Err(e) = send_with_cursor(ws, &m, cursor.as_ref()).await
                    {
                        tracing::warn!(error = %e, "the connection to the broker failed");
                        pending = Some((m, cursor));
                        continue 'connection;
                    }
                }
                _ = tick.tick() => {
                    if send(ws, &WorkerToBroker::Heartbeat).await.is_err() {
                        continue 'connection;
                    }
                }
                _ = &mut shutdown, if !draining => {
                    draining = true;
                    drain_deadline = Some(Instant::now() + config.drain_timeout);
                    tracing::info!(running = jobs.len(), deadline = ?config.drain_timeout, "draining: no new jobs; running ones may finish");
                    if send(ws, &WorkerToBroker::Drain).await.is_err() {
                        continue 'connection;
                    }
                }
                _ = sleep_until(drain_deadline), if draining => {
                    tracing::info!(running = jobs.len(), "drain deadline reached: handing running jobs back");
                    for r in jobs.values() {
                        let _ = r.stop.send(Stop::HandBack);
                    }
                    drain_deadline = None;
                }
            }
        }
    }
}

/// Logs a finish with its job, attempt and exit code (`cq check-history` reads these lines).
fn log_finish(m: &WorkerToBroker) {
    if let WorkerToBroker::Finish { job_id, attempt, status, outputs } = m {
        match status {
            ExitStatus::Error { message, .. } => {
                tracing::warn!(job = %job_id, attempt, error = %message, "job failed to run")
            }
            other => {
                let exit_code = match other {
                    ExitStatus::Exited { exit_code } => Some(*exit_code),
                    ExitStatus::TimedOut { exit_code } => *exit_code,
                    _ => None,
                };
                tracing::info!(job = %job_id, attempt, exit_code, status = ?other, outputs = outputs.len(), "job finished")
            }
        }
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `msg`; for a batch of log lines, its job's log cursor is saved as it goes and put back
/// if the send fails.
async fn send_with_cursor(ws: &mut Socket, msg: &WorkerToBroker, cursor: Option<&job::LogCursor>) -> Result<()> {
    if let Some(cursor) = cursor {
        cursor.save().await;
    }
    let sent = send(ws, msg).await;
    if sent.is_err()
        && let Some(cursor) = cursor
    {
        cursor.restore().await;
    }
    sent
}

async fn send(ws: &mut Socket, msg: &WorkerToBroker) -> Result<()> {
    let text = fit(msg)?;
    ws.send(Message::text(text)).await?;
    Ok(())
}

/// The message as JSON, within the broker's limit. Job tasks build their messages to fit
/// (logs in bounded batches, outputs capped); should one still be too large, a finish is sent
/// as an error without its outputs rather than resent unchanged to a broker that will close
/// the socket again.
fn fit(msg: &WorkerToBroker) -> Result<String> {
    let text = serde_json::to_string(msg)?;
    if text.len() <= protocol::MAX_WS_MESSAGE {
        return Ok(text);
    }
    match msg {
        WorkerToBroker::Finish { job_id, attempt, outputs, .. } => {
            tracing::error!(job = %job_id, bytes = text.len(), "a finish is too large for the broker; reporting an error instead");
            let status = ExitStatus::Error {
                message: format!(
                    "the result ({} outputs, {} bytes) is too large to report; no outputs were kept",
                    outputs.len(),
                    text.len()
                ),
                retryable: false,
            };
            Ok(serde_json::to_string(&WorkerToBroker::Finish {
                job_id: *job_id,
                attempt: *attempt,
                status,
                outputs: Vec::new(),
            })?)
        }
        other => {
            tracing::error!(bytes = text.len(), "a message is too large for the broker; sending a heartbeat instead");
            let _ = other;
            Ok(serde_json::to_string(&WorkerToBroker::Heartbeat)?)
        }
    }
}

/// Runs a job task and makes sure it ends with [`Out::Done`] even if it panics: the panic
/// becomes an `error` finish with its message, and the attempt's container and directory are
/// removed, so the slot is freed on both sides.
fn spawn_job(
    env: Arc<JobEnv>,
    job: JobId,
    attempt: u32,
    tx: mpsc::Sender<Out>,
    task: impl Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        let Err(e) = tokio::spawn(task).await else { return };
        let message = match e.try_into_panic() {
            Ok(p) => p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into()),
            Err(e) => e.to_string(),
        };
        tracing::error!(%job, attempt, error = %message, "a job task failed");
        job::clean_up_attempt(&env, job, attempt).await;
        let status = ExitStatus::Error {
            message: format!("the worker failed while running the job: {message}"),
            retryable: false,
        };
        let finish = WorkerToBroker::Finish { job_id: job, attempt, status, outputs: Vec::new() };
        let _ = tx.send(Out::Done { job, attempt, outcome: Outcome::Finished(finish) }).await;
    });
}

/// The broker refused this worker's settings (its queues span a cluster's shards, say):
/// trying again cannot help, so the worker stops.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// Opens the socket, says hello and waits for the welcome; returns the socket, the heartbeat
/// interval and the base URL of the broker it ended at (after a standby's redirect, the owner).
async fn connect(config: &Config, broker_url: &str, held: Vec<HeldJob>) -> Result<(Socket, Duration, String)> {
    // The queues name the shard a broker of a cluster serves this worker from.
    let queues = url::form_urlencoded::byte_serialize(config.queues.join(",").as_bytes()).collect::<String>();
    let mut ws_url = match broker_url.split_once("://") {
        Some(("https", rest)) => format!("wss://{}/ws/worker?queues={queues}", rest.trim_end_matches('/')),
        Some(("http", rest)) => format!("ws://{}/ws/worker?queues={queues}", rest.trim_end_matches('/')),
        _ => bail!("the broker URL must start with http:// or https://, got `{broker_url}`"),
    };
    // A standby of a cluster redirects workers to the broker that owns the queues (once; a
    // second redirect means the brokers disagree, and the next attempt starts over).
    let mut redirected = false;
    let mut ws = loop {
        let mut request = ws_url.as_str().into_client_request()?;
        if let Some(t) = &config.token {
            request.headers_mut().insert("authorization", format!("Bearer {t}").parse()?);
        }
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_with_config(request, None, true),
        )
        .await
        .with_context(|| format!("timed out connecting to {ws_url}"))?;
        match connected {
            Ok((ws, _)) => break ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp))
                if resp.status().is_redirection() && !redirected && resp.headers().contains_key("location") =>
            {
                let location = resp.headers()["location"].to_str().unwrap_or_default();
                let to = match location.split_once("://") {
                    Some(("http", rest)) => format!("ws://{rest}"),
                    Some(("https", rest)) => format!("wss://{rest}"),
                    Some(("ws" | "wss", _)) => location.to_string(),
                    _ => bail!("{ws_url} redirected to `{location}`, which is not a broker URL"),
                };
                tracing::info!(from = %ws_url, to = %to, "redirected to the broker that owns the queues");
                ws_url = to;
                redirected = true;
            }
            // Say why: a standby's 503 names the owner, a 401 the token.
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let said = resp
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string));
                let said = format!(
                    "{ws_url} answered {}{}",
                    resp.status(),
                    said.map(|m| format!(": {m}")).unwrap_or_default()
                );
                if resp.status().as_u16() == 400 {
                    return Err(Refused(said).into());
                }
                bail!(said)
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("connecting to {ws_url}"))),
        }
    };
    let mut hello = crate::hello(config.worker_id.clone(), config.queues.clone(), config.slots, held);
    hello.gpus = config.gpus.len() as u32;
    hello.tags = config.tags.clone();
    send(&mut ws, &WorkerToBroker::Hello(hello)).await?;
    let welcome = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = ws.next().await {
            match m? {
                Message::Text(t) => return Ok::<_, anyhow::Error>(serde_json::from_str::<BrokerToWorker>(&t)?),
                Message::Close(frame) => bail!("the broker refused the connection: {frame:?}"),
                _ => {}
            }
        }
        bail!("the broker closed the connection")
    })
    .await
    .context("no welcome from the broker")??;
    match welcome {
        BrokerToWorker::Welcome { heartbeat_ms, .. } => {
            let without_query = ws_url.split('?').next().unwrap_or(&ws_url);
            let rest = without_query.strip_prefix("ws").unwrap_or(without_query);
            let base = format!("http{}", rest.strip_suffix("/ws/worker").unwrap_or(rest));
            Ok((ws, Duration::from_millis(heartbeat_ms.max(100)), base))
        }
        BrokerToWorker::Error(e) => bail!("the broker refused the worker: {}", e.message),
        other => bail!("expected a welcome, got {other:?}"),
    }
}

/// Acts on one broker message; returns messages to send back.
#[allow(clippy::too_many_arguments)]
fn handle(
    msg: BrokerToWorker,
    config: &Config,
    env: &Arc<JobEnv>,
    tx: &mpsc::Sender<Out>,
    jobs: &mut HashMap<(JobId, u32), Running>,
    free_gpus: &mut BTreeSet<String>,
    unacked: &mut HashMap<JobId, WorkerToBroker>,
    draining: bool,
) -> Vec<WorkerToBroker> {
    match msg {
        BrokerToWorker::Assign { job_id, attempt, queue, definition } => {
            if jobs.contains_key(&(job_id, attempt)) {
                return vec![WorkerToBroker::Accept { job_id, attempt }];
            }
            // An older attempt of the same job is no longer assigned here: stop it. It keeps its
            // slot until its container is gone.
            for ((_, _), r) in jobs.iter().filter(|((j, _), _)| *j == job_id) {
                let _ = r.stop.send(Stop::Cancel);
            }
            let release =
                |reason: &str| vec![WorkerToBroker::Release { job_id, attempt, reason: Some(reason.to_string()) }];
            if draining {
                return release("the worker is shutting down");
            }
            if jobs.len() >= config.slots as usize {
                return release("no free slot");
            }
            let definition = match BrokerToWorker::assigned_definition(&definition).and_then(|d| d.normalize()) {
                Ok(d) => d,
                Err(e) => {
                    let status = ExitStatus::Error { message: format!("unreadable definition: {e}"), retryable: false };
                    let finish = WorkerToBroker::Finish { job_id, attempt, status, outputs: Vec::new() };
                    unacked.insert(job_id, finish.clone());
                    return vec![WorkerToBroker::Accept { job_id, attempt }, finish];
                }
            };
            let wanted = definition.gpus() as usize;
            if wanted > free_gpus.len() {
                return release("not enough free GPUs");
            }
            let gpus: Vec<String> = free_gpus.iter().take(wanted).cloned().collect();
            for g in &gpus {
                free_gpus.remove(g);
            }
            tracing::info!(job = %job_id, attempt, queue, "running job");
            let (stop_tx, stop_rx) = watch::channel(Stop::No);
            jobs.insert((job_id, attempt), Running { stop: stop_tx, gpus: gpus.clone() });
            let assignment = Assignment { job: job_id, attempt, definition, gpus, queue: queue.clone() };
            let span = tracing::info_span!("job", job = %job_id, attempt);
            let task = job::run(env.clone(), assignment, stop_rx, tx.clone()).instrument(span);
            spawn_job(env.clone(), job_id, attempt, tx.clone(), task);
            vec![WorkerToBroker::Accept { job_id, attempt }]
        }
        BrokerToWorker::Cancel { job_id, attempt, reason } => {
            // The task answers with a `cancelled` finish once its container is gone; a finish
            // already waiting for its ack is kept, and the broker acknowledges it all the same.
            if let Some(r) = jobs.get(&(job_id, attempt)) {
                // Said once: every message about a stale attempt (its log batches still on the
                // way, say) brings the broker's cancel again.
                if *r.stop.borrow() == Stop::No {
                    tracing::info!(job = %job_id, attempt, reason, "cancelling job");
                }
                let _ = r.stop.send(Stop::Cancel);
            }
            Vec::new()
        }
        BrokerToWorker::FinishAck { job_id, attempt } => {
            if unacked
                .get(&job_id)
                .is_some_and(|m| matches!(m, WorkerToBroker::Finish { attempt: a, .. } if *a == attempt))
            {
                unacked.remove(&job_id);
            }
            Vec::new()
        }
        BrokerToWorker::Error(e) => {
            // A stale attempt's messages are refused one by one while it stops: said once.
            let stopping =
                e.job_id.is_some_and(|j| jobs.iter().any(|((job, _), r)| *job == j && *r.stop.borrow() != Stop::No));
            if e.code == protocol::messages::ErrorCode::StaleAttempt && stopping {
                tracing::debug!(message = %e.message, job = e.job_id.map(|j| j.to_string()), "the broker refused a message of an attempt being stopped");
            } else {
                tracing::warn!(code = ?e.code, message = %e.message, job = e.job_id.map(|j| j.to_string()), "the broker reported an error");
            }
            // A finish the broker will never take (the attempt is no longer current).
            if e.code == protocol::messages::ErrorCode::StaleAttempt
                && let Some(job) = e.job_id
            {
                unacked.remove(&job);
            }
            Vec::new()
        }
        BrokerToWorker::Welcome { .. } => Vec::new(),
    }
}
