//! `cq bench`: drives a broker over real loopback websockets with simulated clients and workers
//! (which finish every job at once) and prints what it measured.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use broker::auth::Tokens;
use broker::core::CoreConfig;
use broker::runtime::{FsyncMode, StoreConfig};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::client::websocket_url;
use crate::{BenchArgs, Fsync};

/// Submissions a simulated client keeps in flight.
const WINDOW: usize = 512;

pub async fn bench(args: BenchArgs) -> Result<std::process::ExitCode> {
    match args.scenario {
        crate::Scenario::Fanout => return crate::bench_more::fanout(args).await,
        crate::Scenario::Connections => return crate::bench_more::connections(args).await,
        crate::Scenario::Lifecycle => {}
    }
    if args.queues > args.clients || (args.workers > 0 && args.queues > args.workers) {
        bail!("--queues {} needs at least as many --clients and --workers, each taking one queue", args.queues);
    }
    let tmp;
    // Further brokers of a cluster, given after the first in --url.
    let mut others: Vec<String> = Vec::new();
    let (url, server) = match &args.url {
        Some(u) => {
            let mut all = u.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty());
            let first = all.next().context("--url is empty")?;
            others.extend(all);
            (first, None)
        }
        None => {
            tmp = tempfile::tempdir().context("creating a temporary data directory")?;
            let fsync = match args.fsync {
                Fsync::Always => FsyncMode::Always,
                Fsync::Never => FsyncMode::Never,
            };
            let config = broker::Config {
                store: StoreConfig {
                    data_dir: tmp.path().to_path_buf(),
                    fsync,
                    core: CoreConfig::default(),
                    nats: None,
                },
                tokens: Tokens::default(),
                max_body: broker::http::DEFAULT_MAX_BODY,
                blobs: broker::blob::BlobConfig::default(),
                // Thousands of simulated peers share one address: no per-address cap.
                access: broker::access::AccessConfig { max_connections_per_address: 0, ..Default::default() },
            };
            let (url, server) = start_broker(config).await?;
            (url, Some(server))
        }
    };
    // Clients and workers take the brokers given in turn.
    let sockets: Vec<String> = std::iter::once(&url).chain(&others).map(|u| websocket_url(u)).collect();
    let ws = |n: usize| sockets[n % sockets.len()].clone();
    // With several queues (--queues), each worker and client takes one in turn: a cluster of
    // several shards serves them from different brokers.
    let queues: Vec<String> = (0..args.queues.max(1)).map(|k| format!("bench-{}-{k}", std::process::id())).collect();
    let queue_of = |n: usize| queues[n % queues.len()].clone();
    let run_tag = Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id());

    // One clock for the whole run: submissions carry their send time, workers read it on push.
    let t0 = Instant::now();
    let pushes: Arc<Mutex<Vec<Duration>>> = Arc::default();
    // Workers first, so every job is pushed the moment it is enqueued.
    let mut workers = Vec::new();
    for w in 0..args.workers {
        let (ws, queue) = (ws(w), queue_of(w));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = worker(ws, queue, format!("bench-w{w}"), args.slots, ready_tx, t0, pushes.clone());
        workers.push((tokio::spawn(task), ready_rx));
    }
    let mut worker_tasks = Vec::new();
    for (task, ready) in workers {
        ready.await.context("a simulated worker failed to connect")?;
        worker_tasks.push(task);
    }

    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..args.clients {
        let n = args.jobs / args.clients + usize::from(c < args.jobs % args.clients);
        // Each client paces itself to its share of --rate (0: as fast as the window allows).
        let every = (args.rate > 0).then(|| Duration::from_secs_f64(args.clients as f64 / args.rate as f64));
        clients.push(tokio::spawn(client(ws(c), queue_of(c), c, n, run_tag, t0, every)));
    }
    let mut latencies = Vec::with_capacity(args.jobs);
    for c in clients {
        latencies.extend(c.await??);
    }
    let submitted = started.elapsed();
    // Wait until every job has been finished by some worker (with workers at all).
    let lifecycle = if args.workers > 0 {
        let mut done = 0;
        for (k, queue) in queues.iter().enumerate() {
            // Each queue gets the jobs of the clients that submit to it.
            let share: usize = (0..args.clients)
                .filter(|c| c % queues.len() == k)
                .map(|c| args.jobs / args.clients + usize::from(c < args.jobs % args.clients))
                .sum();
            done += wait_finished(&url, queue, share).await?;
        }
        Some((done, started.elapsed()))
    } else {
        None
    };
    for t in worker_tasks {
        t.abort();
    }
    if let Some((stop, task)) = server {
        let _ = stop.send(());
        let _ = task.await;
    }
    latencies.sort();
    let mut pushes = std::mem::take(&mut *pushes.lock().expect("push latencies"));
    pushes.sort();
    let push_pct = |p: f64| {
        pushes
            .get(((pushes.len() as f64 * p) as usize).min(pushes.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    outln!(
        "cq bench: {} jobs, {} clients, {} workers x {} slots, {}",
        args.jobs,
        args.clients,
        args.workers,
        args.slots,
        match &args.url {
            None => format!("an in-process broker with fsync {:?}", args.fsync),
            Some(_) =>
                format!("brokers {}", std::iter::once(&url).chain(&others).cloned().collect::<Vec<_>>().join(", ")),
        }
    );
    outln!("| measure | value |");
    outln!("|---|---|");
    outln!("| durable submissions/s (acknowledged) | {:.0} |", args.jobs as f64 / submitted.as_secs_f64());
    if let Some((done, elapsed)) = lifecycle {
        let rate = done as f64 / elapsed.as_secs_f64();
        outln!("| full lifecycle jobs/s (submit → push → accept → finish, durable) | {rate:.0} |");
    }
    if !pushes.is_empty() {
        outln!(
            "| submit-to-worker-push latency p50 / p99 / p999 (ms) | {:.2} / {:.2} / {:.2} |",
            ms(push_pct(0.5)),
            ms(push_pct(0.99)),
            ms(push_pct(0.999))
        );
    }
    let load = if args.rate > 0 { format!("{} jobs/s", args.rate) } else { format!("window {WINDOW} per client") };
    outln!(
        "| submit-ack latency p50 / p99 / p999 (ms, {load}) | {:.2} / {:.2} / {:.2} |",
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(pct(0.999))
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// A running in-process broker: the sender that stops it, and its task.
pub(crate) type Server =
    (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), broker::server::ServeError>>);

/// Starts a broker in this process on a free loopback port; returns its URL.
pub(crate) async fn start_broker(config: broker::Config) -> Result<(String, Server)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(broker::run(listener, config, async {
        let _ = stopped.await;
    }));
    Ok((format!("http://{addr}"), (stop, task)))
}

/// Opens a websocket and sends `hello`; follows one redirect, as a cluster's standby sends
/// workers to the broker that owns their queues.
pub(crate) async fn connect(
    url: &str,
    hello: Value,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    let (mut socket, _) = match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) if resp.status().is_redirection() => {
            let to = resp.headers().get("location").and_then(|l| l.to_str().ok()).unwrap_or_default();
            let to = websocket_url(to);
            tokio_tungstenite::connect_async(&to).await.with_context(|| format!("connecting to {to}, sent by {url}"))?
        }
        other => other.with_context(|| format!("connecting to {url}"))?,
    };
    socket.send(Message::text(hello.to_string())).await?;
    Ok(socket)
}

async fn worker(
    ws: String,
    queue: String,
    id: String,
    slots: u32,
    ready: tokio::sync::oneshot::Sender<()>,
    t0: Instant,
    pushes: Arc<Mutex<Vec<Duration>>>,
) -> Result<()> {
    let hello = json!({"type": "hello", "data": {"protocol": 1, "workerId": id, "queues": [queue], "slots": slots}});
    let mut socket = connect(&format!("{ws}/ws/worker?queues={queue}"), hello).await?;
    let mut ready = Some(ready);
    while let Some(msg) = socket.next().await {
        let Message::Text(text) = msg? else { continue };
        let v: Value = serde_json::from_str(&text)?;
        match v["type"].as_str() {
            Some("welcome") => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Some("assign") => {
                if let Some(sent_us) =
                    v["data"]["definition"]["command"][2].as_str().and_then(|t| t.parse::<u64>().ok())
                {
                    let latency = t0.elapsed().saturating_sub(Duration::from_micros(sent_us));
                    pushes.lock().expect("push latencies").push(latency);
                }
                let (job, attempt) = (&v["data"]["jobId"], &v["data"]["attempt"]);
                socket
                    .feed(Message::text(
                        json!({"type": "accept", "data": {"jobId": job, "attempt": attempt}}).to_string(),
                    ))
                    .await?;
                let finish = json!({"type": "finish", "data": {"jobId": job, "attempt": attempt, "status": {"kind": "exited", "exitCode": 0}}});
                socket.send(Message::text(finish.to_string())).await?;
            }
            Some("error") => bail!("worker got an error: {text}"),
            _ => {}
        }
    }
    Ok(())
}

async fn client(
    ws: String,
    queue: String,
    c: usize,
    n: usize,
    tag: u128,
    t0: Instant,
    every: Option<Duration>,
) -> Result<Vec<Duration>> {
    let mut pace = every.map(|d| {
        let mut i = tokio::time::interval(d);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let url = format!("{ws}/ws/client?queue={queue}");
    let mut socket = connect(&url, json!({"type": "hello", "data": {"protocol": 1}})).await?;
    let mut sent_at = vec![Instant::now(); n];
    let mut latencies = Vec::with_capacity(n);
    let (mut next, mut acked) = (0usize, 0usize);
    // The send time rides in the command, so a worker can tell how long the push took.
    let submit = |i: usize| {
        let sent = t0.elapsed().as_micros().to_string();
        let m = json!({"type": "submit", "data": {"request": i, "queue": queue,
            "definition": {"image": "busybox", "command": ["echo", format!("{tag}-{c}-{i}"), sent]}}});
        Message::text(m.to_string())
    };
    while acked < n {
        if pace.is_none() {
            while next < n && next - acked < WINDOW {
                sent_at[next] = Instant::now();
                socket.feed(submit(next)).await?;
                next += 1;
            }
            socket.flush().await?;
        }
        let msg = match &mut pace {
            Some(p) if next < n => tokio::select! {
                _ = p.tick() => {
                    sent_at[next] = Instant::now();
                    socket.send(submit(next)).await?;
                    next += 1;
                    continue;
                }
                m = socket.next() => m,
            },
            _ => socket.next().await,
        };
        let Some(msg) = msg else { bail!("the broker closed the client socket") };
        let Message::Text(text) = msg? else { continue };
        let v: Value = serde_json::from_str(&text)?;
        match v["type"].as_str() {
            Some("submitted") => {
                let r = v["data"]["request"].as_u64().unwrap_or(0) as usize;
                latencies.push(sent_at[r].elapsed());
                acked += 1;
            }
            Some("error") => bail!("submission refused: {text}"),
            _ => {}
        }
    }
    Ok(latencies)
}

async fn wait_finished(url: &str, queue: &str, jobs: usize) -> Result<usize> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s: Value = http.get(format!("{url}/q/{queue}")).send().await?.json().await?;
        let finished = s["finished"].as_u64().unwrap_or(0) as usize;
        if finished >= jobs {
            return Ok(finished);
        }
        if Instant::now() > deadline {
            bail!("only {finished} of {jobs} jobs finished within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
