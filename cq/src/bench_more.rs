//! `cq bench --scenario fanout|connections`: one job's log streamed to many watchers (delivered
//! rate, lag, memory with slow watchers), and many idle websockets held by a broker process
//! (its memory per connection).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use broker::auth::Tokens;
use broker::core::CoreConfig;
use broker::runtime::{FsyncMode, StoreConfig};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};

use tokio_tungstenite::tungstenite::Message;

use crate::BenchArgs;
use crate::bench::{connect, start_broker};

/// Bytes per simulated log line (newline included).
const LINE: usize = 100;
/// Lines per logs message.
const LINES_PER_MESSAGE: usize = 100;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Resident memory of a process, in bytes (Linux).
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0)
}

pub async fn fanout(args: BenchArgs) -> Result<std::process::ExitCode> {
    let tmp = tempfile::tempdir().context("creating a temporary data directory")?;
    let total = args.log_rate * args.seconds;
    let config = broker::Config {
        store: StoreConfig {
            data_dir: tmp.path().to_path_buf(),
            fsync: FsyncMode::Never,
            // Keep the whole stream: the point is delivery, not the per-job cap.
            core: CoreConfig { max_log_bytes: (total as usize) * 2 + (64 << 20), ..CoreConfig::default() },
            nats: None,
        },
        tokens: Tokens::default(),
        max_body: broker::http::DEFAULT_MAX_BODY,
        blobs: broker::blob::BlobConfig { gc_interval: None, ..Default::default() },
        // Thousands of simulated peers share one address: no per-address cap.
        access: broker::access::AccessConfig { max_connections_per_address: 0, ..Default::default() },
    };
    let (url, (stop, server)) = start_broker(config).await?;
    let ws = crate::client::websocket_url(&url);
    let queue = "fanout";

    // The worker, and the job it runs.
    let hello =
        json!({"type": "hello", "data": {"protocol": 1, "workerId": "fanout-w", "queues": [queue], "slots": 1}});
    let mut worker = connect(&format!("{ws}/ws/worker"), hello).await?;
    let _welcome = worker.next().await;
    let job: Value = reqwest::Client::new()
        .post(format!("{url}/q/{queue}/j"))
        .json(&json!({"definition": {"image": "busybox", "command": "fanout"}}))
        .send()
        .await?
        .json()
        .await?;
    let job_id = job["jobId"].as_str().context("no job id")?.to_string();
    loop {
        let Some(Ok(Message::Text(t))) = worker.next().await else { bail!("the worker lost its socket") };
        if serde_json::from_str::<Value>(&t)?["type"] == "assign" {
            break;
        }
    }
    worker.send(Message::text(json!({"type": "accept", "data": {"jobId": job_id, "attempt": 1}}).to_string())).await?;

    // Watchers: fast ones count bytes and lag; slow ones subscribe and never read again.
    let received = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let lags: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let mut fast = Vec::new();
    let mut slow = Vec::new();
    for i in 0..args.watchers + args.slow_watchers {
        let mut socket = connect(&format!("{ws}/ws/client"), json!({"type": "hello", "data": {"protocol": 1}})).await?;
        let _welcome = socket.next().await;
        socket
            .send(Message::text(json!({"type": "watchJob", "data": {"jobId": job_id, "since": 0}}).to_string()))
            .await?;
        if i >= args.watchers {
            slow.push(socket);
            continue;
        }
        let (received, dropped, lags) = (received.clone(), dropped.clone(), lags.clone());
        fast.push(tokio::spawn(async move {
            let mut mine = 0u64;
            while let Some(m) = socket.next().await {
                match m {
                    Ok(Message::Text(t)) => {
                        // Cheap on purpose: the watchers share the broker's two cores, so they
                        // count the frame and read one timestamp instead of parsing the JSON.
                        if !t.starts_with("{\"type\":\"logs\"") {
                            continue;
                        }
                        let bytes = (t.matches("\"text\":").count() * LINE) as u64;
                        if let Some(i) = t.find("\"time\":") {
                            let digits: String = t[i + 7..].chars().take_while(char::is_ascii_digit).collect();
                            if let Ok(sent) = digits.parse::<u64>() {
                                lags.lock().expect("lags").push(now_ms().saturating_sub(sent));
                            }
                        }
                        mine += bytes;
                        received.fetch_add(bytes, Ordering::Relaxed);
                        if mine + bytes >= total {
                            return;
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(_) => {}
                }
            }
        }));
    }

    // The worker streams `log_rate` bytes per second, in messages of LINES_PER_MESSAGE lines.
    let pid = std::process::id();
    let rss_before = rss(pid).unwrap_or(0);
    let mut rss_peak = rss_before;
    let message_bytes = (LINE * LINES_PER_MESSAGE) as u64;
    let messages = total / message_bytes;
    let every = Duration::from_secs_f64(message_bytes as f64 / args.log_rate as f64);
    let text = format!("{}\n", "x".repeat(LINE - 1));
    let started = Instant::now();
    for m in 0..messages {
        let target = started + every.mul_f64(m as f64);
        if let Some(wait) = target.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let time = now_ms();
        let lines: Vec<Value> =
            (0..LINES_PER_MESSAGE).map(|_| json!({"stream": "stdout", "time": time, "text": text})).collect();
        let msg = json!({"type": "logs", "data": {"jobId": job_id, "attempt": 1, "lines": lines}});
        worker.send(Message::text(msg.to_string())).await?;
        if m % 100 == 0 {
            rss_peak = rss_peak.max(rss(pid).unwrap_or(0));
        }
    }
    let sent_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    for t in fast {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, t).await;
    }
    let delivered_in = started.elapsed();
    rss_peak = rss_peak.max(rss(pid).unwrap_or(0));
    drop(slow);
    let _ = stop.send(());
    let _ = server.await;

    let mut lags = std::mem::take(&mut *lags.lock().expect("lags"));
    lags.sort_unstable();
    let got = received.load(Ordering::Relaxed);
    let per_watcher = got as f64 / args.watchers.max(1) as f64;
    outln!(
        "cq bench --scenario fanout: {} MB/s for {} s to {} watchers (+{} that never read)",
        args.log_rate as f64 / 1e6,
        args.seconds,
        args.watchers,
        args.slow_watchers
    );
    outln!("| measure | value |");
    outln!("|---|---|");
    outln!("| sent by the worker | {:.1} MB in {:.2} s |", total as f64 / 1e6, sent_in.as_secs_f64());
    outln!(
        "| delivered per watcher | {:.1} MB, {:.1} MB/s |",
        per_watcher / 1e6,
        per_watcher / 1e6 / delivered_in.as_secs_f64()
    );
    outln!("| delivered in all | {:.1} MB/s |", got as f64 / 1e6 / delivered_in.as_secs_f64());
    outln!(
        "| lag worker → watcher p50 / p99 / max (ms) | {} / {} / {} |",
        pct(&lags, 0.5),
        pct(&lags, 0.99),
        pct(&lags, 1.0)
    );
    outln!("| fast watchers dropped | {} |", dropped.load(Ordering::Relaxed));
    outln!(
        "| process RSS before / peak (broker + all clients) | {:.0} / {:.0} MiB |",
        rss_before as f64 / 1048576.0,
        rss_peak as f64 / 1048576.0
    );
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn connections(args: BenchArgs) -> Result<std::process::ExitCode> {
    let tmp = tempfile::tempdir().context("creating a temporary data directory")?;
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["broker", "--log", "warn", "--listen", "127.0.0.1:0", "--fsync", "never", "--data-dir"])
        .arg(tmp.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting a broker process")?;
    let pid = child.id().context("the broker has no pid")?;
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().context("stdout")?));
    let first = lines.next_line().await?.context("the broker printed nothing")?;
    let url = first.strip_prefix("listening on ").context("unexpected first line")?.to_string();
    let ws = crate::client::websocket_url(&format!("{url}/ws/client"));
    // Warm up: one connection, so lazily allocated pools exist before the baseline.
    let mut warm = connect(&ws, json!({"type": "hello", "data": {"protocol": 1}})).await?;
    let _ = warm.next().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(pid).context("reading the broker's RSS")?;
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(args.connections);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for _ in 0..args.connections {
        let ws = ws.clone();
        pending.push(async move {
            let mut s = connect(&ws, json!({"type": "hello", "data": {"protocol": 1}})).await?;
            match s.next().await {
                Some(Ok(Message::Text(_))) => Ok::<_, anyhow::Error>(s),
                other => bail!("no welcome: {other:?}"),
            }
        });
        if pending.len() >= 256
            && let Some(s) = pending.next().await
        {
            sockets.push(s?);
        }
    }
    while let Some(s) = pending.next().await {
        sockets.push(s?);
    }
    let opened = started.elapsed();
    // Let the broker settle (heartbeats run every 5 s; stay idle through one).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = rss(pid).context("reading the broker's RSS")?;
    let per = (after.saturating_sub(before)) as f64 / args.connections as f64;
    outln!("cq bench --scenario connections: {} idle client websockets to a broker process", args.connections);
    outln!("| measure | value |");
    outln!("|---|---|");
    outln!("| opened (hello + welcome) in | {:.2} s |", opened.as_secs_f64());
    outln!("| broker RSS before / after | {:.1} / {:.1} MiB |", before as f64 / 1048576.0, after as f64 / 1048576.0);
    outln!("| broker memory per idle connection | {:.1} KB |", per / 1000.0);
    drop(sockets);
    let _ = child.kill().await;
    Ok(std::process::ExitCode::SUCCESS)
}
