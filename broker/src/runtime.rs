//! Runs the core. One task owns the [`Core`] and applies commands in batches; a writer thread
//! appends each batch's events to the log and commits once for every group of batches waiting
//! (group commit: one fsync of the local log, or one fenced publish to a JetStream stream), and
//! only then delivers the batch's messages and replies. So nothing is acknowledged, and no
//! worker or watcher hears of a change, before it is durable. The log is a
//! [`LogBackend`](crate::backend::LogBackend) chosen by [`StoreConfig::nats`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocol::close;
use protocol::messages::{BrokerToClient, BrokerToWorker, ErrorBody, ErrorCode};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::backend::{LocalLog, LogBackend};
use crate::core::{Command, ConnId, Core, CoreConfig, Effect, Reply};
use crate::event::SnapshotV1;
use crate::jetstream::{JetStreamLog, NatsConfig};
use crate::lease::{Holder, Lease, StandbyNote};
use crate::log::{Log, LogError, SNAPSHOT_AFTER_BYTES, encode_event};
use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// Commands waiting for the core task before senders wait.
pub const COMMAND_QUEUE: usize = 8192;
/// Most commands the core applies before handing a batch to the writer.
pub const MAX_BATCH: usize = 1024;
/// Batches waiting for the writer before the core task waits.
pub const WRITER_QUEUE: usize = 64;

/// When the log is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// Before every acknowledgement (batched by group commit). Survives power loss.
    Always,
    /// Never explicitly: data reaches the OS before acknowledgements, so it survives the broker
    /// being killed, but a machine crash can lose the last seconds.
    Never,
}

/// Where the answer to a command goes.
#[derive(Debug)]
pub enum ReplyTo {
    None,
    /// A caller waiting on the reply (HTTP).
    Call(oneshot::Sender<Reply>),
    /// A client socket: the reply becomes a message, tagged with the client's request number.
    Client {
        conn: ConnId,
        request: Option<u64>,
    },
    /// A worker socket: errors become messages.
    Worker {
        conn: ConnId,
    },
}

#[derive(Debug)]
struct Request {
    cmd: Command,
    reply: ReplyTo,
}

/// A cheap, cloneable handle to the running core.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
    pub outbox: Arc<Outbox>,
    pub metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    standby: Arc<StandbyNote>,
}

impl Handle {
    /// Applies `cmd` and waits for the reply; for changes, until they are durable.
    pub async fn call(&self, cmd: Command) -> Reply {
        // A standby's core holds no queue and takes no command until it owns the log: waiting
        // for it would wait for a takeover that may never come.
        if !self.is_ready() && self.standby_for().is_some() {
            return Reply::Error(ErrorBody::new(
                ErrorCode::Unavailable,
                "this broker is a standby for this shard and cannot answer it; try again",
            ));
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request { cmd, reply: ReplyTo::Call(tx) }).await.is_err() {
            return unavailable();
        }
        rx.await.unwrap_or_else(|_| unavailable())
    }

    /// Queues `cmd`; its reply, if any, goes where `reply` says. Returns false if the core has
    /// stopped.
    pub async fn send(&self, cmd: Command, reply: ReplyTo) -> bool {
        self.tx.send(Request { cmd, reply }).await.is_ok()
    }

    /// True once recovery has finished and commands are being applied.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// While the broker waits for the lease of a log another broker owns (cluster mode), who
    /// owns it.
    pub fn standby_for(&self) -> Option<crate::lease::Standby> {
        self.standby.borrow().clone()
    }

    /// Follows who owns the log while this broker is a standby ([`Handle::standby_for`]).
    pub fn watch_standby(&self) -> watch::Receiver<Option<crate::lease::Standby>> {
        self.standby.subscribe()
    }
}

fn unavailable() -> Reply {
    Reply::Error(ErrorBody::new(ErrorCode::Unavailable, "the broker is shutting down or cannot write its log"))
}

/// Wall-clock milliseconds derived from tokio's clock, so that a paused test clock drives the
/// core's notion of time too.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall0: u64,
    t0: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        let wall0 = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Clock { wall0, t0: Instant::now() }
    }

    pub fn now(&self) -> u64 {
        self.wall0 + self.t0.elapsed().as_millis() as u64
    }

    fn instant(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms.saturating_sub(self.wall0))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

#[derive(Debug)]
enum Delivery {
    Effect(Effect),
    Reply(oneshot::Sender<Reply>, Box<Reply>),
}

#[derive(Debug, Default)]
struct Batch {
    bytes: Vec<u8>,
    deliveries: Vec<Delivery>,
    snapshot: Option<SnapshotV1>,
}

/// Settings of the store and core.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub fsync: FsyncMode,
    pub core: CoreConfig,
    /// Keep the log in a NATS JetStream stream instead of `data_dir` (cluster mode,
    /// experimental); `fsync` then does not apply: the stream's servers decide durability.
    pub nats: Option<NatsConfig>,
}

/// Starts the core task (which first recovers the log). The returned future ends with the
/// core: after `shutdown` flips to true, or on a storage failure.
pub fn start(
    config: StoreConfig,
    shutdown: watch::Receiver<bool>,
) -> (Handle, tokio::task::JoinHandle<Result<(), LogError>>) {
    start_with(config, shutdown, Arc::new(Metrics::default()))
}

/// [`start`], counting into `metrics` (shared by the shards of one broker).
pub fn start_with(
    config: StoreConfig,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> (Handle, tokio::task::JoinHandle<Result<(), LogError>>) {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let outbox = Arc::new(Outbox::default());
    let ready = Arc::new(AtomicBool::new(false));
    let standby = Arc::new(StandbyNote::new(None));
    if let Some(nats) = &config.nats {
        metrics.shard_not_serving(nats.shard);
    }
    let handle =
        Handle { tx, outbox: outbox.clone(), metrics: metrics.clone(), ready: ready.clone(), standby: standby.clone() };
    let task = tokio::spawn(core_task(config, rx, outbox, metrics, Flags { ready, standby }, shutdown));
    (handle, task)
}

/// What the core task tells the handles about itself.
struct Flags {
    ready: Arc<AtomicBool>,
    standby: Arc<StandbyNote>,
}

/// A recovered cluster log: the core, its log, the report, the lease it is held under, and when
/// recovery began (after the lease was taken).
type Recovered = (Core, JetStreamLog, crate::log::RecoveryReport, Option<Lease>, std::time::Instant);

/// Recovers the JetStream log, under its lease when the settings ask for one. Returns `None`
/// if `shutdown` came first.
async fn recover_cluster(
    nats: &NatsConfig,
    core_config: &CoreConfig,
    standby: &StandbyNote,
    shutdown: &mut watch::Receiver<bool>,
    refusing: Option<&mut mpsc::Receiver<Request>>,
) -> Result<Option<Recovered>, LogError> {
    let mut lease = match nats.lease {
        Some(times) => {
            let holder =
                Holder { node: nats.node.clone(), advertise_url: nats.advertise_url.clone(), nonce: String::new() };
            tokio::select! {
                lease = crate::lease::acquire(nats, times, holder, standby) => Some(lease?),
                _ = stopped(shutdown) => return Ok(None),
                () = refuse_meanwhile(refusing, nats.shard) => unreachable!("never resolves"),
            }
        }
        None => None,
    };
    let started = std::time::Instant::now();
    let owner = lease.as_ref().map(Lease::owner_name);
    let (mut fenced, mut wait) = (0, Duration::from_millis(200));
    loop {
        let mut core = Core::new(core_config.clone());
        let error = tokio::select! {
            recovered = JetStreamLog::recover(nats, &mut core, owner.clone()) => match recovered {
                Ok((log, report)) => return Ok(Some((core, log, report, lease, started))),
                Err(e) => e,
            },
            _ = lease_lost(&mut lease) => return Err(LogError::LeaseLost { shard: nats.shard }),
            _ = stopped(shutdown) => break,
        };
        match error {
            // The former owner, paused past its lease, appended while this one replayed: its
            // append is in the log (and may have been acknowledged), so replay again.
            LogError::Fenced { .. } if lease.is_some() && fenced < 5 => {
                fenced += 1;
                tracing::warn!("the former owner appended while this broker recovered; recovering again");
            }
            // NATS answering "temporarily unavailable" (a quorum coming back, say): the lease is
            // held and renewed meanwhile, so try again rather than leave the shard to nobody.
            e @ LogError::Nats { .. } if lease.is_some() => {
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot recover the log yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = lease_lost(&mut lease) => return Err(LogError::LeaseLost { shard: nats.shard }),
                    _ = stopped(shutdown) => break,
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            e => return Err(e),
        }
    }
    // Stopped while recovering: hand the lease on rather than let it run out.
    if let Some(lease) = lease {
        lease.release().await;
    }
    Ok(None)
}

/// Resolves when a held lease is lost; never without one.
async fn lease_lost(lease: &mut Option<Lease>) {
    match lease {
        Some(lease) => lease.lost().await,
        None => std::future::pending().await,
    }
}

async fn core_task(
    config: StoreConfig,
    mut rx: mpsc::Receiver<Request>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    flags: Flags,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LogError> {
    let mut gave_up = false;
    loop {
        let served = serve(&config, &mut rx, &outbox, &metrics, &flags, &mut shutdown, gave_up).await;
        let shard = config.nats.as_ref().map_or(0, |n| n.shard);
        if let Some(placement) = config.nats.as_ref().and_then(|n| n.placement.as_ref()) {
            placement.set_serving(shard, false);
        }
        match served? {
            Served::Stopped => return Ok(()),
            // Handed over to another broker of the cluster: a standby for it again.
            Served::GaveUp => gave_up = true,
        }
    }
}

/// How [`serve`] ended without an error.
enum Served {
    /// The broker stops.
    Stopped,
    /// This broker gave the shard up to the others ([`crate::shards::Placement::give_up`]).
    GaveUp,
}

/// Takes the log (in cluster mode: waits for its lease), recovers it and serves it until the
/// broker stops or, in a cluster of several shards, this broker gives the shard up. After
/// giving it up once (`gave_up`), commands that still reach the core while it waits for the
/// lease again are refused as unavailable rather than held.
async fn serve(
    config: &StoreConfig,
    rx: &mut mpsc::Receiver<Request>,
    outbox: &Arc<Outbox>,
    metrics: &Arc<Metrics>,
    flags: &Flags,
    shutdown: &mut watch::Receiver<bool>,
    gave_up: bool,
) -> Result<Served, LogError> {
    let Flags { ready, standby } = flags;
    let StoreConfig { data_dir, fsync, core: core_config, nats } = config.clone();
    let shard = nats.as_ref().map(|n| n.shard).unwrap_or(0);
    let placement = nats.as_ref().and_then(|n| n.placement.clone());
    let (mut core, log, report, mut lease, started): (Core, Box<dyn LogBackend>, _, _, _) = match nats {
        None => tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let mut core = Core::new(core_config);
            let (log, report) = Log::recover(&data_dir, &mut core)?;
            Ok::<_, LogError>((core, Box::new(LocalLog { log, fsync }) as Box<dyn LogBackend>, report, None, started))
        })
        .await
        .expect("recovery does not panic")?,
        Some(nats) => {
            let refusing = gave_up.then_some(&mut *rx);
            match recover_cluster(&nats, &core_config, standby, shutdown, refusing).await? {
                Some((core, log, report, lease, started)) => (core, Box::new(log), report, lease, started),
                None => return Ok(Served::Stopped),
            }
        }
    };
    let clock = Clock::new();
    core.finish_recovery(clock.now());
    tracing::info!(
        jobs = core.job_count(),
        snapshot_jobs = report.snapshot_jobs,
        replayed_events = report.replayed_events,
        truncated_bytes = report.truncated_bytes,
        generation = report.generation,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered"
    );
    let mut log_bytes = log.bytes_since_snapshot();
    let (wtx, wrx) = mpsc::channel::<Batch>(WRITER_QUEUE);
    let writer_outbox = outbox.clone();
    let writer_metrics = metrics.clone();
    let thread = std::thread::Builder::new()
        .name("cq-log-writer".into())
        .spawn(move || writer_loop(log, wrx, writer_outbox, writer_metrics))
        .expect("spawning the log writer");
    let mut writer = Writer { tx: Some(wtx), thread: Some(thread) };
    if report.replayed_events > 0 {
        // Fold the replayed tail into a fresh snapshot so the next start is fast.
        writer.send(Batch { snapshot: Some(core.snapshot()), ..Default::default() }).await;
        log_bytes = 0;
    }
    metrics.shard_serving(shard, lease.as_ref().map(Lease::epoch));
    if let Some(placement) = &placement {
        placement.set_serving(shard, true);
    }
    ready.store(true, Ordering::Release);
    let mut deposed = false;
    let mut giving_up = false;

    loop {
        let deadline = core.next_deadline().map(|d| clock.instant(d));
        let first = tokio::select! {
            biased;
            _ = stopped(shutdown) => break,
            r = rx.recv() => match r {
                Some(r) => Some(r),
                // Every handle is gone without a shutdown: the broker itself was dropped (its
                // runtime is going away). Write nothing more, no final snapshot: what is in the
                // log is recovered on the next start, as after a crash.
                None => return Ok(Served::Stopped),
            },
            _ = sleep_until(deadline) => None,
            // The writer stopped on a storage failure (or, on JetStream, because another writer
            // took the log over): stop now rather than at the next command.
            _ = writer.stopped() => break,
            // Another broker may take the log over now: stop at once, writing nothing more (a
            // final snapshot could race the new owner's recovery).
            _ = lease_lost(&mut lease) => {
                deposed = true;
                break;
            }
            // Serving more than a fair share: hand this shard over, as a stop would.
            _ = asked_to_give_up(&placement, shard) => {
                giving_up = true;
                break;
            }
        };
        let mut batch = Batch::default();
        match first {
            Some(req) => apply(&mut core, &clock, req, &mut batch),
            None => apply(&mut core, &clock, Request { cmd: Command::Tick, reply: ReplyTo::None }, &mut batch),
        }
        for _ in 1..MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => apply(&mut core, &clock, req, &mut batch),
                Err(_) => break,
            }
        }
        for waited_ms in core.take_dispatch_latencies() {
            metrics.dispatch_latency.observe(waited_ms as f64 / 1000.0);
        }
        if batch.bytes.is_empty() && batch.deliveries.is_empty() {
            continue;
        }
        log_bytes += batch.bytes.len() as u64;
        if log_bytes >= SNAPSHOT_AFTER_BYTES {
            batch.snapshot = Some(core.snapshot());
            log_bytes = 0;
        }
        if !writer.send(batch).await {
            break;
        }
    }
    // Stopping with the others (one shard's lease was lost, say) while this one's is lost too:
    // deposed all the same, so no final snapshot.
    deposed |= lease.as_ref().is_some_and(Lease::is_lost);
    ready.store(false, Ordering::Release);
    metrics.shard_not_serving(shard);
    if giving_up && !deposed {
        // From now on requests for the shard are answered "moving" (then relayed to the new
        // owner), and its sockets are closed: they reconnect, to the new owner.
        standby.send_replace(Some(crate::lease::Standby::Unknown));
        outbox.close_all(close::GOING_AWAY, "this shard is moving to another broker");
    } else {
        rx.close();
    }
    let mut final_jobs = 0;
    if !deposed {
        // Commands already queued came from peers before the shutdown (a worker's last release
        // or finish, say): apply them, so they are kept, then write the final snapshot with them.
        let mut last = Batch::default();
        while let Ok(req) = rx.try_recv() {
            apply(&mut core, &clock, req, &mut last);
        }
        let snapshot = core.snapshot();
        final_jobs = snapshot.jobs.len();
        last.snapshot = Some(snapshot);
        writer.send(last).await;
    }
    writer.tx = None;
    if deposed {
        // Not joined: the writer may be retrying a publish for a while, and nothing it does can
        // be acknowledged past the new owner's marker. It ends on its own.
        writer.thread = None;
        return Err(LogError::LeaseLost { shard });
    }
    let thread = writer.thread.take().expect("joined once");
    // A runtime shutting down cancels this join; the writer thread then ends on its own.
    let written = match tokio::task::spawn_blocking(move || thread.join().expect("the log writer does not panic")).await
    {
        Ok(written) => written,
        Err(e) => {
            tracing::warn!(error = %e, "the log writer was not joined: the runtime is shutting down");
            Ok(())
        }
    };
    if written.is_ok() {
        tracing::info!(shard, jobs = final_jobs, "final snapshot written");
    }
    // Everything is in the log: hand the lease over now rather than when it expires.
    if let Some(lease) = lease {
        lease.release().await;
    }
    if giving_up && written.is_ok() {
        if let Some(placement) = &placement {
            placement.gave_up(shard);
        }
        tracing::info!(shard, "handed this shard over to the other brokers");
        return Ok(Served::GaveUp);
    }
    written.map(|()| Served::Stopped)
}

/// Resolves once this broker is asked to give `shard` up; never without a placement.
async fn asked_to_give_up(placement: &Option<Arc<crate::shards::Placement>>, shard: u32) {
    match placement {
        Some(placement) => placement.asked_to_give_up(shard).await,
        None => std::future::pending().await,
    }
}

/// Answers every command that reaches a core waiting for a lease it gave up: the shard is
/// served elsewhere now. Never resolves.
async fn refuse_meanwhile(rx: Option<&mut mpsc::Receiver<Request>>, shard: u32) {
    let Some(rx) = rx else { return std::future::pending().await };
    while let Some(req) = rx.recv().await {
        if let ReplyTo::Call(tx) = req.reply {
            let _ = tx.send(Reply::Error(ErrorBody::new(
                ErrorCode::Unavailable,
                format!("shard {shard} moved to another broker; try again"),
            )));
        }
    }
    std::future::pending().await
}

/// The log writer thread and the channel to it. If the core task is dropped before it ends
/// (e.g. its runtime shut down), dropping this closes the channel and joins the thread, so no
/// write to the log outlives the broker.
struct Writer {
    tx: Option<mpsc::Sender<Batch>>,
    thread: Option<std::thread::JoinHandle<Result<(), LogError>>>,
}

impl Writer {
    /// Hands a batch to the writer; false if it has stopped.
    async fn send(&self, batch: Batch) -> bool {
        match &self.tx {
            Some(tx) => tx.send(batch).await.is_ok(),
            None => false,
        }
    }

    /// Resolves once the writer has stopped taking batches.
    async fn stopped(&self) {
        match &self.tx {
            Some(tx) => tx.closed().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Resolves once the shutdown flag is set (never, if its sender is gone without setting it).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Applies one request and records its events, effects and reply in the batch, in order.
fn apply(core: &mut Core, clock: &Clock, req: Request, batch: &mut Batch) {
    let is_read = req.cmd.is_read();
    let reply = core.apply(clock.now(), req.cmd);
    let (events, effects) = core.take_output();
    for e in &events {
        encode_event(e, &mut batch.bytes);
    }
    batch.deliveries.extend(effects.into_iter().map(Delivery::Effect));
    match req.reply {
        ReplyTo::None => {}
        ReplyTo::Call(tx) if is_read => {
            let _ = tx.send(reply);
        }
        ReplyTo::Call(tx) => batch.deliveries.push(Delivery::Reply(tx, Box::new(reply))),
        ReplyTo::Client { conn, request } => {
            let msg = match reply {
                Reply::Submitted { outcome, job } => Some(BrokerToClient::Submitted { request, outcome, job }),
                Reply::Cancelled(job) => Some(BrokerToClient::Cancelled { request, job }),
                Reply::Error(mut e) => {
                    e.request = request;
                    Some(BrokerToClient::Error(e))
                }
                _ => None,
            };
            if let Some(msg) = msg {
                batch.deliveries.push(Delivery::Effect(Effect::Client { to: vec![conn], msg: Arc::new(msg) }));
            }
        }
        ReplyTo::Worker { conn } => {
            if let Reply::Error(e) = reply {
                batch.deliveries.push(Delivery::Effect(Effect::Worker { to: conn, msg: BrokerToWorker::Error(e) }));
            }
        }
    }
}

/// Most batches written with one fsync.
const MAX_GROUP: usize = 256;

fn writer_loop(
    mut log: Box<dyn LogBackend>,
    mut rx: mpsc::Receiver<Batch>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
) -> Result<(), LogError> {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        let written = write_group(log.as_mut(), &group, &metrics);
        metrics.log_file_bytes.set(log.bytes_since_snapshot() as i64);
        if let Err(e) = written {
            tracing::error!(error = %e, "the log cannot be written; stopping so that nothing unsaved is acknowledged");
            for b in group {
                for d in b.deliveries {
                    if let Delivery::Reply(tx, _) = d {
                        let _ = tx.send(unavailable());
                    }
                }
            }
            outbox.close_all(close::GOING_AWAY, "broker storage failure");
            return Err(e);
        }
        for b in group {
            for d in b.deliveries {
                match d {
                    Delivery::Effect(e) => outbox.deliver(e),
                    Delivery::Reply(tx, r) => {
                        let _ = tx.send(*r);
                    }
                }
            }
        }
    }
    Ok(())
}

fn write_group(log: &mut dyn LogBackend, group: &[Batch], metrics: &Metrics) -> Result<(), LogError> {
    let mut uncommitted = false;
    for b in group {
        if !b.bytes.is_empty() {
            log.append(&b.bytes)?;
            uncommitted = true;
        }
        if let Some(s) = &b.snapshot {
            log.snapshot(s)?;
            uncommitted = false;
        }
    }
    if uncommitted {
        let started = std::time::Instant::now();
        if log.commit()? {
            metrics.fsync.observe(started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}
