//! Tests of cluster mode (one shard): against a real 3-node NATS JetStream cluster on loopback
//! (`sync_interval: always`, as docs/operations.md requires), a `kill -9` of the broker or of the
//! NATS server leading the lease bucket (and maybe the log) loses no acknowledged submission and,
//! for the latter, deposes nobody, a writer whose view of the stream is stale
//! is refused and stops, snapshots go to the object store with the stream purged below them, a
//! standby takes over from a killed or stopped owner, and an owner paused past its lease wakes
//! deposed.
//!
//! They need `nats-server` 2.11 or later: `CQ_NATS_SERVER` names it (scripts/test.sh sets it
//! from scripts/nats-server.sh), else `.cache/venv/bin/nats-server` in the workspace is used.
//! Without either they say so and pass without running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

mod support;
use support::{Killed, cq_listening, cq_listening_logged};

/// Longest a test waits for any one condition.
const WAIT: Duration = Duration::from_secs(60);

fn nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CQ_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/venv/bin/nats-server");
    if local.exists() {
        return Some(local);
    }
    eprintln!("skipped: no nats-server (run scripts/nats-server.sh, or set CQ_NATS_SERVER)");
    None
}

/// A free port for a nats-server, below Linux's ephemeral range (32768 and up): a port the OS
/// picked for `bind(0)` and freed again could be handed to another test's broker, which binds
/// port 0, before this nats-server binds it.
fn free_port() -> u16 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let seed = NEXT.fetch_add(1, Ordering::Relaxed)
            ^ u64::from(std::process::id()) << 20
            ^ u64::from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos());
        let mixed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
        let port = 20_000 + (mixed % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Three nats-server processes forming one JetStream cluster on 127.0.0.1.
struct Nats {
    servers: Vec<Killed>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Nats {
    async fn start(bin: &Path) -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect::<Vec<_>>().join(", ");
        // A name of its own: should a port still be shared with another test's cluster, their
        // servers refuse each other's routes instead of merging into one cluster.
        let name = format!("cqtest{}", routes[0]);
        let mut servers = Vec::new();
        for i in 0..3 {
            let store = dir.path().join(format!("n{i}"));
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nmax_payload: 8MB\n\
                 jetstream {{ store_dir: \"{}\", sync_interval: always }}\n\
                 cluster {{ name: {name}, listen: 127.0.0.1:{}, routes: [{route_list}] }}\n",
                clients[i],
                store.display(),
                routes[i]
            );
            let path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&path, conf).unwrap();
            let log = std::fs::File::create(dir.path().join(format!("n{i}.log"))).unwrap();
            let child = Command::new(bin)
                .arg("-c")
                .arg(&path)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting nats-server");
            servers.push(Killed(child));
        }
        let urls: Vec<String> = clients.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
        let nats = Nats { servers, urls, _dir: dir };
        nats.wait_ready().await;
        nats
    }

    /// Waits until the cluster places and answers a replicated stream (its meta leader is
    /// elected and every server has joined).
    async fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let attempt = async {
                let client = async_nats::connect(self.urls.clone()).await.map_err(|e| e.to_string())?;
                let js = async_nats::jetstream::new(client);
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: "READY".into(),
                    subjects: vec!["ready".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
                js.delete_stream("READY").await.map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) if Instant::now() > deadline => panic!("the NATS cluster did not form: {e}"),
                Err(_) if Instant::now() > deadline => panic!("the NATS cluster did not form in time"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    fn url_list(&self) -> String {
        self.urls.join(",")
    }

    async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(async_nats::connect(self.urls.clone()).await.unwrap())
    }
}

/// `cq broker --nats …` on a fresh port with `cluster` as its cluster name; returns it and its URL.
fn cq_broker(nats: &Nats, data_dir: &Path, cluster: &str) -> (Killed, String) {
    cq_broker_with(nats, data_dir, cluster, &[])
}

/// [`cq_broker`] with `extra` arguments.
fn cq_broker_with(nats: &Nats, data_dir: &Path, cluster: &str, extra: &[&str]) -> (Killed, String) {
    cq_broker_logged(nats, data_dir, cluster, extra, None)
}

/// [`cq_broker_with`], its log at info level going to `log` if given.
fn cq_broker_logged(
    nats: &Nats,
    data_dir: &Path,
    cluster: &str,
    extra: &[&str],
    log: Option<&Path>,
) -> (Killed, String) {
    let args = broker_args(nats, data_dir, cluster, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match log {
        Some(log) => cq_listening_logged(&args, log),
        None => cq_listening(&args),
    }
}

/// The arguments of `cq broker` on a fresh port in `cluster`, with `extra` ones.
fn broker_args(nats: &Nats, data_dir: &Path, cluster: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["broker", "--listen", "127.0.0.1:0", "--shared-blob-dir", "--nats-cluster", cluster]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(["--nats".to_string(), nats.url_list(), "--data-dir".into(), data_dir.to_str().unwrap().into()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Waits until the broker at `url` has recovered its log.
async fn wait_ready(url: &str) {
    let deadline = Instant::now() + WAIT;
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "the broker at {url} did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn job(tag: &str) -> Value {
    json!({"definition": {"image": "busybox", "command": ["echo", tag]}})
}

async fn submit(http: &reqwest::Client, url: &str, tag: &str) -> Option<String> {
    match http.post(format!("{url}/q/q/j")).json(&job(tag)).send().await {
        Ok(r) if r.status().is_success() => Some(r.json::<Value>().await.ok()?["jobId"].as_str()?.to_string()),
        _ => None,
    }
}

async fn queued(http: &reqwest::Client, url: &str) -> u64 {
    let s: Value = http.get(format!("{url}/q/q")).send().await.unwrap().json().await.unwrap();
    s["queued"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_broker_on_jetstream_loses_no_acknowledged_submission() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = cq_broker(&nats, dir.path(), "durable");
    wait_ready(&url).await;
    let http = reqwest::Client::new();
    // Four submitters keep going until the broker dies under them.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..5000 {
                match submit(&http, &url, &format!("{t}-{i}")).await {
                    Some(id) => acked.push(id),
                    // The broker died: this request was never acknowledged.
                    None => break,
                }
            }
            acked
        }));
    }
    let deadline = Instant::now() + WAIT;
    while queued(&http, &url).await < 200 {
        assert!(Instant::now() < deadline, "submissions did not get through");
    }
    child.0.kill().unwrap(); // SIGKILL, mid-submission
    child.0.wait().unwrap();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(acked.len() >= 196, "only {} acknowledged", acked.len());

    let (_child, url) = cq_broker(&nats, dir.path(), "durable");
    wait_ready(&url).await;
    let queued = queued(&http, &url).await;
    assert!(queued as usize >= acked.len(), "{queued} queued after restart, {} were acknowledged", acked.len());
    for id in &acked {
        let r = http.get(format!("{url}/j/{id}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "acknowledged job {id} was lost");
    }
    eprintln!("{} acknowledged submissions survived kill -9 of a broker on a 3-node JetStream", acked.len());
}

/// An in-process broker on the JetStream log without a lease, as a task whose result is the
/// broker's.
fn in_process(
    nats: &Nats,
    cluster: &str,
    data_dir: &Path,
) -> (String, tokio::task::JoinHandle<Result<(), broker::server::ServeError>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = broker::Config {
        store: broker::runtime::StoreConfig {
            data_dir: data_dir.to_path_buf(),
            fsync: broker::runtime::FsyncMode::Always,
            core: broker::core::CoreConfig::default(),
            // No lease: each of these brokers takes the log over at once, as a broker whose
            // lease went wrong would, so that only the log's fence stands between them.
            nats: Some(broker::jetstream::NatsConfig {
                cluster: cluster.into(),
                lease: None,
                ..broker::jetstream::NatsConfig::new(nats.urls.clone())
            }),
        },
        tokens: Default::default(),
        max_body: 64 << 10,
        blobs: broker::blob::BlobConfig { gc_interval: None, ..Default::default() },
        access: Default::default(),
    };
    let task = tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        broker::run(listener, config, std::future::pending()).await
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_with_a_stale_view_of_the_stream_is_refused_and_steps_down() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // A writes; then B takes the log over (its owner marker moves the stream past A's view).
    let (a, a_task) = in_process(&nats, "fence", dir_a.path());
    wait_ready(&a).await;
    let before = submit(&http, &a, "before").await.expect("A owns the log and acknowledges");
    let (b, b_task) = in_process(&nats, "fence", dir_b.path());
    wait_ready(&b).await;
    assert_eq!(http.get(format!("{b}/j/{before}")).send().await.unwrap().status(), 200, "B replayed A's job");

    // A's next append expects the sequence it last saw: refused, so nothing is acknowledged.
    let r = http.post(format!("{a}/q/q/j")).json(&job("stale")).send().await.unwrap();
    assert_eq!(r.status(), 503, "a deposed writer must not acknowledge");
    let stale: Value = r.json().await.unwrap();
    assert_eq!(stale["error"]["code"], "unavailable", "{stale}");
    // ...and it steps down: the broker stops with the fencing error.
    let stopped = tokio::time::timeout(WAIT, a_task).await.expect("A stops").unwrap();
    match stopped {
        Err(broker::server::ServeError::Log(broker::log::LogError::Fenced { .. })) => {}
        other => panic!("A stopped with {other:?}, not the fencing error"),
    }

    // B goes on; the stale submission exists nowhere.
    let after = submit(&http, &b, "after").await.expect("B owns the log");
    let stale_id = {
        // The same definition submitted to B now is new to the log (A's attempt never landed).
        let r: Value = http.post(format!("{b}/q/q/j")).json(&job("stale")).send().await.unwrap().json().await.unwrap();
        r["outcome"].clone()
    };
    assert_eq!(stale_id, "created", "the refused submission must not be in the log");
    assert_eq!(http.get(format!("{b}/j/{after}")).send().await.unwrap().status(), 200);
    b_task.abort();
}

/// The objects in a snapshot bucket that holds at least one. Listing is a consumer of the
/// bucket's metadata, which on a loaded machine now and then ends before its first message:
/// an empty answer is asked again.
async fn snapshot_names(store: &async_nats::jetstream::object_store::ObjectStore) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let names: Vec<String> = store.list().await.unwrap().map(|o| o.unwrap().name).collect().await;
        if !names.is_empty() || Instant::now() > deadline {
            return names;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_go_to_the_object_store_and_recovery_is_snapshot_plus_replay() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let js = nats.jetstream().await;
    let http = reqwest::Client::new();
    let dir = tempfile::tempdir().unwrap();

    // First life: 5 jobs, then a graceful stop writes the final snapshot.
    let (child, url) = cq_broker(&nats, dir.path(), "snap");
    wait_ready(&url).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit(&http, &url, &format!("first-{i}")).await.expect("acknowledged"));
    }
    let term = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(term.success());
    let mut child = child;
    assert!(child.0.wait().unwrap().success(), "a graceful stop exits 0");

    // The snapshot is one object in the bucket, and the stream below it is purged.
    let mut stream = js.get_stream("SNAP_LOG_0").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    assert!(state.first_sequence > 1, "the stream was not purged below the snapshot: {state:?}");
    assert_eq!(state.messages, 1, "only the snapshot marker is left: {state:?}");
    let store = js.get_object_store("snap_snapshots").await.unwrap();
    let names = snapshot_names(&store).await;
    assert_eq!(names.len(), 1, "{names:?}");
    let snapshot_seq: u64 = names[0].strip_prefix("shard-0-").unwrap().parse().unwrap();
    assert_eq!(snapshot_seq, state.first_sequence - 1, "the purge keeps what follows the snapshot");

    // Second life: 5 more jobs, then kill -9 (no snapshot: they exist only in the stream).
    let (mut child, url) = cq_broker(&nats, dir.path(), "snap");
    wait_ready(&url).await;
    for i in 0..5 {
        ids.push(submit(&http, &url, &format!("second-{i}")).await.expect("acknowledged"));
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let names = snapshot_names(&store).await;
    assert_eq!(names, vec![format!("shard-0-{snapshot_seq:020}")], "no new snapshot was taken");

    // Third life: the first 5 come from the snapshot (purged from the stream), the last 5 from
    // replaying the stream after it.
    let (_child, url) = cq_broker(&nats, dir.path(), "snap");
    wait_ready(&url).await;
    for id in &ids {
        assert_eq!(http.get(format!("{url}/j/{id}")).send().await.unwrap().status(), 200, "job {id} was lost");
    }
    assert_eq!(queued(&http, &url).await, 10);
    // Having replayed a tail, recovery folded it into a new snapshot and dropped the old one.
    let deadline = Instant::now() + WAIT;
    loop {
        let names = snapshot_names(&store).await;
        if names.len() == 1 && names[0] != format!("shard-0-{snapshot_seq:020}") {
            break;
        }
        assert!(Instant::now() < deadline, "no newer snapshot replaced the old one: {names:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn cluster_mode_refuses_a_blob_directory_not_said_to_be_shared() {
    let dir = tempfile::tempdir().unwrap();
    // Refused before anything connects: no NATS server is needed to see it.
    let out = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["broker", "--listen", "127.0.0.1:0", "--nats", "nats://127.0.0.1:9"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--shared-blob-dir") && stderr.contains("--s3-bucket"), "{stderr}");
    assert!(out.stdout.is_empty(), "it must not start listening");
}

/// What `/readyz` of the broker at `url` says (empty if it does not answer).
async fn readyz(http: &reqwest::Client, url: &str) -> String {
    match http.get(format!("{url}/readyz")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the broker at `url` says it is a standby and names the owner; returns what its
/// `/readyz` says.
async fn wait_standby(http: &reqwest::Client, url: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let said = readyz(http, url).await;
        if said.starts_with("standby\n") && !said.contains("another broker") {
            return said;
        }
        assert!(Instant::now() < deadline, "the broker at {url} did not become a standby: {said:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `cq broker` named `node` in `cluster`, with a 2 s lease.
fn leased_broker(nats: &Nats, dir: &Path, cluster: &str, node: &str) -> (Killed, String) {
    cq_broker_with(nats, dir, cluster, &["--node-id", node, "--lease-ttl", "2s"])
}

/// Broker `a`, which takes the lease, and broker `b`, its standby.
async fn owner_and_standby(
    nats: &Nats,
    http: &reqwest::Client,
    cluster: &str,
    dirs: &(tempfile::TempDir, tempfile::TempDir),
) -> ((Killed, String), (Killed, String)) {
    let a = leased_broker(nats, dirs.0.path(), cluster, "a");
    wait_ready(&a.1).await;
    let b = leased_broker(nats, dirs.1.path(), cluster, "b");
    wait_standby(http, &b.1).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_killed_owner_and_a_stopped_one_hands_over() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, a_url) = leased_broker(&nats, dirs.0.path(), "lease", "a");
    wait_ready(&a_url).await;
    // B advertises an address where nothing listens, so that once it owns the log a standby
    // cannot relay to it (as while an owner is unreachable) and cq's clients must wait.
    let (b, b_url) = cq_broker_with(
        &nats,
        dirs.1.path(),
        "lease",
        &["--node-id", "b", "--lease-ttl", "2s", "--advertise-url", "http://127.0.0.1:9"],
    );
    // The standby says who owns the log, at the address it listens on.
    assert_eq!(wait_standby(&http, &b_url).await, format!("standby\nowner: a ({a_url})\n"));

    // Submissions to the owner until it is killed.
    let mut acked = Vec::new();
    for i in 0..50 {
        // Half of them through the standby, which relays them.
        let via = if i % 2 == 0 { &a_url } else { &b_url };
        acked.push(submit(&http, via, &format!("a-{i}")).await.expect("the owner acknowledges"));
    }
    let link: Value = http.post(format!("{a_url}/j/{}/link", acked[0])).send().await.unwrap().json().await.unwrap();
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let killed = Instant::now();
    wait_ready(&b_url).await;
    eprintln!("the standby served {} ms after the owner's kill -9 (lease 2 s)", killed.elapsed().as_millis());
    for id in &acked {
        assert_eq!(http.get(format!("{b_url}/j/{id}")).send().await.unwrap().status(), 200, "job {id} lost");
    }
    let after = submit(&http, &b_url, "b-0").await.expect("the new owner acknowledges");
    // A read link A made before it died is honoured by B: the brokers share the signing key.
    let r = http.get(format!("{b_url}{}", link["job"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(r.status(), 200, "a read link made by the former owner");

    // A comes back as a standby; B stops gracefully and hands the lease over at once.
    let (_a, a_url) = leased_broker(&nats, dirs.0.path(), "lease", "a");
    assert_eq!(wait_standby(&http, &a_url).await, "standby\nowner: b (http://127.0.0.1:9)\n");
    // A user submits to the standby meanwhile, which cannot reach the owner: cq waits for it to
    // serve instead of failing.
    let mut waiting = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["submit", "--url", &a_url, "--image", "busybox", "--", "echo", "waited"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(waiting.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.contains("not serving yet") && line.contains("retrying"), "{line}");
    let mut b = b;
    let stopping = Instant::now();
    nix_signal(b.id(), "TERM");
    let status = b.0.wait().unwrap();
    assert!(status.success(), "a graceful stop of the owner exits 0: {status}");
    wait_ready(&a_url).await;
    eprintln!("handover on SIGTERM: {} ms from the signal to the standby serving", stopping.elapsed().as_millis());
    for id in acked.iter().chain([&after]) {
        assert_eq!(http.get(format!("{a_url}/j/{id}")).send().await.unwrap().status(), 200, "job {id} lost");
    }
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success(), "the waiting submission went through after the handover");
    let id = String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string();
    assert_eq!(http.get(format!("{a_url}/j/{id}")).send().await.unwrap().status(), 200, "{id} is on the new owner");
}

/// What a standby logs when it takes the lease of an owner that died before the lease ran out.
const TAKEN_EARLY: &str = "taking the lease over before it runs out";

/// An owner killed with -9 (a crash, the OOM killer) is replaced before its lease (the default,
/// 15 s) runs out: its key goes unrenewed and nothing listens at its address any more. A frozen
/// owner is not (a_paused_owner_wakes_deposed_and_acknowledges_nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owner_is_replaced_before_its_lease_runs_out() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, a_url) = cq_broker_with(&nats, dirs.0.path(), "dead", &["--node-id", "a"]);
    wait_ready(&a_url).await;
    let b_log = dirs.0.path().join("b.log");
    let (_b, b_url) = cq_broker_logged(&nats, dirs.1.path(), "dead", &["--node-id", "b"], Some(&b_log));
    wait_standby(&http, &b_url).await;
    let before = submit(&http, &a_url, "before").await.expect("the owner acknowledges");
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let killed = Instant::now();
    wait_ready(&b_url).await;
    eprintln!("the standby served {} ms after the owner's kill -9 (lease 15 s)", killed.elapsed().as_millis());
    let said = std::fs::read_to_string(&b_log).unwrap();
    assert!(said.contains(TAKEN_EARLY) && said.contains("owner=a"), "{said}");
    assert_eq!(http.get(format!("{b_url}/j/{before}")).send().await.unwrap().status(), 200, "job {before} lost");
    submit(&http, &b_url, "after").await.expect("the new owner acknowledges");
}

/// What the broker at `url` says in metric `name` for shard 0.
async fn shard_metric(http: &reqwest::Client, url: &str, name: &str) -> String {
    let text = http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    let prefix = format!("{name}{{shard=\"0\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {prefix} in {text}")).to_string()
}

/// `cq submit --wait` of `echo said` to the broker at `url`; returns the job's id and what it
/// printed (its log).
fn submit_and_wait(url: &str, said: &str) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["submit", "--url", url, "--queue", "q", "--wait", "--image", "cq-test/busybox", "--", "echo", said])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    // `cq: job <id> (created) on queue q` comes first on stderr.
    let id = stderr.split_whitespace().nth(2).unwrap_or_default().to_string();
    (id, stdout.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_relays_clients_redirects_workers_and_serves_them_after_a_takeover() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((mut a, a_url), (_b, b_url)) = owner_and_standby(&nats, &http, "edge", &dirs).await;

    // A worker told to use the standby is sent to the owner; it shows on the owner's queue,
    // read through the standby.
    let worker_dir = tempfile::tempdir().unwrap();
    let _worker = support::cq_worker(&b_url, worker_dir.path(), &["--queue", "q", "--slots", "1"]);
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http.get(format!("{b_url}/q/q")).send().await.unwrap();
        assert_eq!(r.status(), 200, "the standby relays reads");
        let q: Value = r.json().await.unwrap();
        if q["slots"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker did not reach the owner: {q}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let direct: Value = http.get(format!("{a_url}/q/q")).send().await.unwrap().json().await.unwrap();
    assert_eq!(direct["slots"], 1, "the worker is attached to the owner itself: {direct}");

    // A job submitted to the standby runs; `--wait` follows its log over a relayed websocket.
    let (id, stdout) = submit_and_wait(&b_url, "relayed");
    assert!(stdout.contains("relayed"), "{stdout}");
    let job: Value = http.get(format!("{b_url}/j/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(job["state"], "finished", "{job}");
    let on_owner: Value = http.get(format!("{a_url}/j/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(on_owner, job, "the standby relayed the owner's record");
    // Each broker's metrics are its own.
    assert_eq!(shard_metric(&http, &a_url, "cq_shard_owned").await, "1");
    assert_eq!(shard_metric(&http, &b_url, "cq_shard_owned").await, "0");
    assert_ne!(shard_metric(&http, &a_url, "cq_shard_epoch").await, "0");

    // The owner dies: the standby takes over, and the worker (whose URL is the standby's)
    // comes back to it.
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    wait_ready(&b_url).await;
    assert_eq!(shard_metric(&http, &b_url, "cq_shard_owned").await, "1");
    assert_eq!(shard_metric(&http, &b_url, "cq_shard_takeovers_total").await, "1");
    let (_, stdout) = submit_and_wait(&b_url, "after the takeover");
    assert!(stdout.contains("after the takeover"), "{stdout}");
    let r: Value = http.get(format!("{b_url}/j/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["state"], "finished", "the first job survived the takeover: {r}");
}

/// `cq submit --wait` of a job writing `said` to the output file `said.txt`, through the brokers
/// `urls` (comma-separated), then `cq outputs` of it through them; returns what the file holds.
fn run_with_output(urls: &str, said: &str, dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["submit", "--url", urls, "--queue", "q", "--wait", "--image", "cq-test/busybox", "--"])
        .args(["sh", "-c", &format!("echo {said} > /outputs/said.txt")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let id = stderr.split_whitespace().nth(2).unwrap_or_default().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["outputs", "--url", urls, &id, "--overwrite", "-o"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(dir.join("said.txt")).unwrap()
}

/// A worker and the CLI given both brokers' addresses use the owner's first, and the other's
/// once the owner is gone: the worker reconnects there (without the list it would wait for the
/// dead one) and uploads its outputs there; the CLI's requests that cannot reach the first go to
/// the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_the_cli_given_several_brokers_move_to_the_next_when_one_is_gone() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((mut a, a_url), (_b, b_url)) = owner_and_standby(&nats, &http, "urls", &dirs).await;
    let both = format!("{a_url},{b_url}");
    let worker_dir = tempfile::tempdir().unwrap();
    let _worker = support::cq_worker(&both, worker_dir.path(), &["--queue", "q", "--slots", "1"]);
    let results = tempfile::tempdir().unwrap();
    assert_eq!(run_with_output(&both, "first", results.path()), "first\n");

    a.0.kill().unwrap();
    a.0.wait().unwrap();
    wait_ready(&b_url).await;
    assert_eq!(run_with_output(&both, "second", results.path()), "second\n");
    let q: Value = http.get(format!("{b_url}/q/q")).send().await.unwrap().json().await.unwrap();
    assert_eq!(q["slots"], 1, "the worker is attached to the new owner: {q}");
}

/// `cq cluster import`: the jobs of a broker that ran on its own, queued and cancelled, are the
/// cluster's once its first broker starts; importing into a cluster that has a log is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_data_directory_is_imported_into_a_new_cluster() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let local = tempfile::tempdir().unwrap();
    let (mut alone, url) =
        cq_listening(&["broker", "--listen", "127.0.0.1:0", "--data-dir", local.path().to_str().unwrap()]);
    let mut ids = Vec::new();
    for tag in ["one", "two", "three"] {
        ids.push(submit(&http, &url, tag).await.expect("acknowledged"));
    }
    let r = http.post(format!("{url}/j/{}/cancel", ids[2])).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    alone.0.kill().unwrap();
    alone.0.wait().unwrap();

    let import = || {
        Command::new(env!("CARGO_BIN_EXE_cq"))
            .args(["cluster", "import", "--nats", &nats.url_list(), "--nats-cluster", "imported", "--data-dir"])
            .arg(local.path())
            .output()
            .unwrap()
    };
    let out = import();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("imported 3 jobs"), "{said}");

    let dir = tempfile::tempdir().unwrap();
    let (_broker, url) = cq_broker(&nats, dir.path(), "imported");
    wait_ready(&url).await;
    for (id, state) in ids.iter().zip(["queued", "queued", "finished"]) {
        let job: Value = http.get(format!("{url}/j/{id}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(job["state"], state, "{job}");
    }
    assert_eq!(queued(&http, &url).await, 2);

    let out = import();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{said}");
    assert!(said.contains("already holds a log"), "{said}");
}

/// A `cq worker` of `url` (one broker or a list) on `queue` whose JSON log (for
/// `cq check-history`) goes to `log`.
fn logged_worker(url: &str, queue: &str, dir: &Path, log: &Path) -> support::KilledWorker {
    let child = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["worker", "--url", url, "--queue", queue, "--slots", "2", "--log-format", "json", "--log", "info"])
        .arg("--data-dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    support::KilledWorker::new(child, dir, None)
}

/// Runs `cq check-history` against the broker at `url` for the jobs `acked` (written into
/// `dir`) and the worker logs `logs`; asserts it finds no violation and that every job ran
/// exactly one attempt.
fn assert_history_clean(url: &str, acked: &[String], logs: &[PathBuf], dir: &Path) {
    let acked_file = dir.join("acknowledged");
    std::fs::write(&acked_file, acked.join("\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["check-history", "--url", url, "--acknowledged"])
        .arg(&acked_file)
        .args(logs.iter().flat_map(|l| [std::ffi::OsStr::new("--worker-log"), l.as_os_str()]))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    eprintln!("{said}");
    assert!(
        out.status.success() && said.ends_with(": 0 violations\n"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = acked.len();
    assert!(said.starts_with(&format!("{n} acknowledged, {n} records, {n} finished, {n} attempts started")), "{said}");
}

/// Submits job `i` of a run to `queue` through `url` (`sleep`, write an output file, then exit
/// `i % 3`) until it is acknowledged; returns its id. A standby without an owner to relay to
/// answers 503 meanwhile.
async fn submit_until_acknowledged(http: &reqwest::Client, url: &str, queue: &str, i: usize) -> String {
    let body = json!({"definition": {"image": "cq-test/busybox",
        "command": ["sh", "-c", format!("sleep 0.5; echo job {i} | tee /outputs/said; exit {}", i % 3)]}});
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = http.post(format!("{url}/q/{queue}/j")).json(&body).send().await
            && r.status().is_success()
        {
            return r.json::<Value>().await.unwrap()["jobId"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "submission {i} was never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_mid_run_loses_nothing_and_starts_no_job_twice() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ((mut a, a_url), (_b, b_url)) = owner_and_standby(&nats, &http, "midrun", &dirs).await;
    let c_dir = tempfile::tempdir().unwrap();
    let (_c, c_url) = leased_broker(&nats, c_dir.path(), "midrun", "c");
    wait_standby(&http, &c_url).await;
    // Three brokers, two queues with a worker each. The workers are given every broker's
    // address (they start on the owner's and move on when it is gone); submissions go through
    // each broker in turn, the standbys relaying them to the owner.
    let all = format!("{a_url},{b_url},{c_url}");
    let queues = ["q", "r"];
    let run = tempfile::tempdir().unwrap();
    let logs = [run.path().join("w1.log"), run.path().join("w2.log")];
    let _workers: Vec<support::KilledWorker> = logs
        .iter()
        .enumerate()
        .map(|(n, log)| logged_worker(&all, queues[n], &run.path().join(format!("w{n}")), log))
        .collect();
    let mut acked = Vec::new();
    for i in 0..16 {
        let via = [&a_url, &b_url, &c_url][i % 3];
        acked.push(submit_until_acknowledged(&http, via, queues[i % 2], i).await);
    }
    // Kill -9 of the owner while jobs run on both workers.
    let deadline = Instant::now() + WAIT;
    for queue in queues {
        loop {
            let q: Value = http.get(format!("{b_url}/q/{queue}")).send().await.unwrap().json().await.unwrap();
            if q["running"].as_u64().unwrap_or(0) >= 1 {
                break;
            }
            assert!(Instant::now() < deadline, "no jobs ran on {queue}: {q}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    for i in 16..32 {
        let via = [&b_url, &c_url][i % 2];
        acked.push(submit_until_acknowledged(&http, via, queues[(i / 2) % 2], i).await);
    }
    // Every acknowledged job ends.
    let deadline = Instant::now() + WAIT * 2;
    for id in &acked {
        loop {
            let job: Value = http.get(format!("{b_url}/j/{id}")).send().await.unwrap().json().await.unwrap();
            if job["state"] == "finished" {
                break;
            }
            assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    assert_eq!(acked.len(), 32);
    assert_history_clean(&b_url, &acked, &logs, run.path());
}

/// Kills `broker` with `kill -9`, then submits to `submit_url` every 20 ms until a submission is
/// acknowledged; returns how long that took from the kill.
async fn kill_until_acknowledged(http: &reqwest::Client, broker: Killed, submit_url: &str, kill: u64) -> Duration {
    let mut broker = broker;
    broker.0.kill().unwrap();
    let killed = Instant::now();
    broker.0.wait().unwrap();
    let body = job(&format!("after kill {kill}"));
    loop {
        if let Ok(r) = http.post(submit_url).json(&body).send().await
            && r.status().is_success()
        {
            return killed.elapsed();
        }
        assert!(killed.elapsed() < WAIT, "no submission was acknowledged after kill {kill}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Benchmark (ignored by default): failover time of a cluster of 3 brokers and 4 shards over 10
/// kills, from `kill -9` of the broker serving the most shards to the first acknowledged
/// submission to a queue of a shard it served, sent through another broker; the killed broker
/// is started again each time and is handed its share back before the next kill. Lease as in
/// `CQ_BENCH_LEASE` (default 15s). Prints each time and p50/p99.
/// `cargo test -p cq --test cluster failover_time_of_shards -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
async fn failover_time_of_shards_over_ten_kills() {
    let Some(bin) = nats_server() else { return };
    let lease = std::env::var("CQ_BENCH_LEASE").unwrap_or_else(|_| "15s".into());
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = |i: usize| {
        let node = ["a", "b", "c"][i];
        let args = ["--node-id", node, "--lease-ttl", &lease, "--shards", "4"];
        let args = broker_args(&nats, dirs[i].path(), "shardfail", &args);
        cq_listening(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let mut brokers: Vec<Option<(Killed, String)>> = (0..3).map(|i| Some(start(i))).collect();
    let queues: Vec<String> = (0..4u32)
        .map(|s| (0..).map(|i| format!("q{i}")).find(|q| broker::shards::shard_of(q, 4) == s).unwrap())
        .collect();
    let mut times = Vec::new();
    for kill in 0..10 {
        let urls: Vec<String> = brokers.iter().map(|b| b.as_ref().unwrap().1.clone()).collect();
        let deadline = Instant::now() + WAIT * 2;
        let owned = loop {
            let owned = wait_all_served(&http, &urls, 4).await;
            if owned.iter().all(|n| *n <= 2) {
                break owned;
            }
            assert!(Instant::now() < deadline, "the shards were not shared again: {owned:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::time::sleep(Duration::from_millis(500 + (kill * 347) % 1500)).await;
        let victim = (0..3).max_by_key(|&n| owned[n]).unwrap();
        let text = http.get(format!("{}/metrics", urls[victim])).send().await.unwrap().text().await.unwrap();
        let moved = queues
            .iter()
            .find(|q| text.contains(&format!("cq_shard_owned{{shard=\"{}\"}} 1", broker::shards::shard_of(q, 4))))
            .unwrap()
            .clone();
        let via = urls[(victim + 1) % 3].clone();
        let (child, _) = brokers[victim].take().unwrap();
        let took = kill_until_acknowledged(&http, child, &format!("{via}/q/{moved}/j"), kill).await;
        eprintln!("kill {kill} (broker {victim}, {} shards): {} ms", owned[victim], took.as_millis());
        times.push(took);
        brokers[victim] = Some(start(victim));
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1].as_millis();
    eprintln!(
        "failover of shards with --lease-ttl {lease} over {} kills: p50 {} ms, p99 {} ms",
        times.len(),
        at(0.5),
        at(0.99)
    );
}

/// Benchmark (ignored by default): failover time over 10 kills, from `kill -9` of the owner to
/// the first acknowledged submission through the other broker, at the lease in
/// `CQ_BENCH_LEASE` (default 15s, the broker's). Prints each time and p50/p99.
/// `cargo test -p cq --test cluster failover_time -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
async fn failover_time_over_ten_kills() {
    let Some(bin) = nats_server() else { return };
    let lease = std::env::var("CQ_BENCH_LEASE").unwrap_or_else(|_| "15s".into());
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let start = |i: usize| {
        let node = ["a", "b"][i];
        cq_broker_with(&nats, dirs[i].path(), "failover", &["--node-id", node, "--lease-ttl", &lease])
    };
    let mut brokers = [Some(start(0)), None];
    wait_ready(&brokers[0].as_ref().unwrap().1).await;
    brokers[1] = Some(start(1));
    wait_standby(&http, &brokers[1].as_ref().unwrap().1).await;
    let mut owner = 0;
    let mut times = Vec::new();
    for kill in 0..10 {
        // Killed at a different point of the owner's renewal cycle (1.5 s by default) each time,
        // and not just as the standby first looked at the key.
        tokio::time::sleep(Duration::from_millis(500 + (kill * 347) % 1500)).await;
        let (child, _) = brokers[owner].take().unwrap();
        let other = brokers[1 - owner].as_ref().unwrap().1.clone();
        let took = kill_until_acknowledged(&http, child, &format!("{other}/q/q/j"), kill).await;
        eprintln!("kill {kill}: {} ms", took.as_millis());
        times.push(took);
        // The killed broker comes back as the standby.
        brokers[owner] = Some(start(owner));
        wait_standby(&http, &brokers[owner].as_ref().unwrap().1).await;
        owner = 1 - owner;
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1].as_millis();
    eprintln!("failover with --lease-ttl {lease} over {} kills: p50 {} ms, p99 {} ms", times.len(), at(0.5), at(0.99));
}

/// Benchmark (ignored by default): graceful handover over 10 stops. Two brokers on fixed ports
/// and a worker given both; the owner gets SIGTERM, and the time is taken from the signal to the
/// first acknowledged submission through the other broker, and to that job's start on the worker
/// (which must have found the new owner). The stopped broker comes back as the standby. Prints
/// each time and p50/p99 of both.
/// `cargo test -p cq --test cluster handover_time -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
async fn handover_time_over_ten_stops() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let listen = [free_port(), free_port()].map(|p| format!("127.0.0.1:{p}"));
    let urls = listen.clone().map(|l| format!("http://{l}"));
    let nats_urls = nats.url_list();
    let start = |i: usize| {
        let dir = dirs[i].path().to_str().unwrap();
        let node = ["a", "b"][i];
        support::cq_listening(&[
            "broker",
            "--listen",
            &listen[i],
            "--shared-blob-dir",
            "--nats-cluster",
            "handover",
            "--nats",
            &nats_urls,
            "--data-dir",
            dir,
            "--node-id",
            node,
        ])
        .0
    };
    let mut brokers = [Some(start(0)), None];
    wait_ready(&urls[0]).await;
    brokers[1] = Some(start(1));
    wait_standby(&http, &urls[1]).await;
    let run = tempfile::tempdir().unwrap();
    let _worker = logged_worker(&urls.join(","), "q", &run.path().join("w"), &run.path().join("w.log"));
    let body = |n: usize| json!({"definition": {"image": "cq-test/busybox", "command": ["echo", n.to_string()]}});
    let started = |id: String, via: String| {
        let http = http.clone();
        async move {
            loop {
                if let Ok(r) = http.get(format!("{via}/j/{id}")).send().await
                    && let Ok(job) = r.json::<Value>().await
                    && (job["state"] == "running" || job["state"] == "finished")
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // The worker is connected and runs jobs before the first stop.
    let first = submit_until_acknowledged(&http, &urls[0], "q", 0).await;
    tokio::time::timeout(WAIT, started(first, urls[0].clone())).await.expect("the first job ran");
    let mut owner = 0;
    let (mut acked, mut ran) = (Vec::new(), Vec::new());
    for stop in 0..10 {
        let child = brokers[owner].take().unwrap();
        let other = urls[1 - owner].clone();
        nix_signal(child.0.id(), "TERM");
        let signalled = Instant::now();
        let id = loop {
            if let Ok(r) = http.post(format!("{other}/q/q/j")).json(&body(stop)).send().await
                && r.status().is_success()
            {
                break r.json::<Value>().await.unwrap()["jobId"].as_str().unwrap().to_string();
            }
            assert!(signalled.elapsed() < WAIT, "no submission was acknowledged after stop {stop}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        acked.push(signalled.elapsed());
        tokio::time::timeout(WAIT, started(id, other)).await.expect("the job started after the handover");
        ran.push(signalled.elapsed());
        eprintln!(
            "stop {stop}: acknowledged after {} ms, started after {} ms",
            acked[stop].as_millis(),
            ran[stop].as_millis()
        );
        drop(child);
        brokers[owner] = Some(start(owner));
        wait_standby(&http, &urls[owner]).await;
        owner = 1 - owner;
    }
    for (what, times) in [("first acknowledgement", &mut acked), ("first job started", &mut ran)] {
        times.sort();
        let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1].as_millis();
        eprintln!("handover on SIGTERM, {what}: p50 {} ms, p99 {} ms", at(0.5), at(0.99));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_started_while_nats_has_no_quorum_waits_for_it() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dir = tempfile::tempdir().unwrap();
    // Two of the three servers freeze: the third has no quorum, so creating the cluster's
    // buckets is answered late or "temporarily unavailable" (as while NATS elects a leader on
    // a busy machine). Longer than a JetStream request's timeout (5 s).
    for server in &nats.servers[1..] {
        nix_signal(server.id(), "STOP");
    }
    // Given only the server left running, the broker's requests reach it at once.
    let (mut broker, url) = cq_listening(&[
        "broker",
        "--listen",
        "127.0.0.1:0",
        "--shared-blob-dir",
        "--nats-cluster",
        "quorum",
        "--nats",
        &nats.urls[0],
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(broker.0.try_wait().unwrap().is_none(), "the broker gave up instead of waiting for NATS");
    for server in &nats.servers[1..] {
        nix_signal(server.id(), "CONT");
    }
    wait_ready(&url).await;
    assert!(broker.0.try_wait().unwrap().is_none(), "the broker gave up instead of waiting for NATS");
    submit(&http, &url, "after the quorum came back").await.expect("acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_wakes_deposed_and_acknowledges_nothing() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // An 8 s lease: long enough for B to look at A for dead (3 s unrenewed) before it runs out.
    let (mut a, a_url) = cq_broker_with(&nats, dirs.0.path(), "zombie", &["--node-id", "a", "--lease-ttl", "8s"]);
    wait_ready(&a_url).await;
    let b_log = dirs.0.path().join("b.log");
    let (_b, b_url) =
        cq_broker_logged(&nats, dirs.1.path(), "zombie", &["--node-id", "b", "--lease-ttl", "8s"], Some(&b_log));
    wait_standby(&http, &b_url).await;
    let before = submit(&http, &a_url, "before").await.expect("the owner acknowledges");
    // A watcher of the job through the standby: its event stream is relayed to A.
    let mut events = http.get(format!("{b_url}/j/{before}/events")).send().await.unwrap();
    assert_eq!(events.status(), 200);

    // A freezes (a SIGSTOP: a long GC pause, a frozen VM) past its lease; B takes over.
    nix_signal(a.id(), "STOP");
    // A request to B now is relayed to the frozen A (its lease has time left): B gives it up once
    // it takes over, rather than wait for A to wake.
    let relayed = {
        let (http, b_url) = (http.clone(), b_url.clone());
        tokio::spawn(async move {
            let r = http.get(format!("{b_url}/q/q")).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        })
    };
    wait_ready(&b_url).await;
    let (status, said) = tokio::time::timeout(WAIT, relayed)
        .await
        .expect("a request relayed to the frozen owner still waits after the takeover")
        .unwrap();
    assert!(
        status == 200 || (status == 503 && said.contains("stopped owning the log")),
        "the relayed request: {status} {said}"
    );
    eprintln!("a request relayed to the frozen owner was answered {status} after the takeover");
    // The relayed event stream ends too, so its watcher connects again, to B.
    let ended = tokio::time::timeout(WAIT, async { while let Ok(Some(_)) = events.chunk().await {} }).await;
    assert!(ended.is_ok(), "an event stream relayed to the frozen owner is still open after the takeover");
    // B waited for A's lease to run out: a frozen process still accepts connections, so it is
    // not taken for dead (a_dead_owner_is_replaced_before_its_lease_runs_out).
    let said = std::fs::read_to_string(&b_log).unwrap();
    assert!(said.contains("took the lease") && !said.contains(TAKEN_EARLY), "{said}");
    let during = submit(&http, &b_url, "during").await.expect("the new owner acknowledges");
    // A request for A while it is frozen: A finds it when it wakes (or a moment later).
    let stale = {
        let (http, a_url) = (http.clone(), a_url.clone());
        tokio::spawn(async move { http.post(format!("{a_url}/q/q/j")).json(&job("stale")).send().await })
    };
    nix_signal(a.id(), "CONT");
    // No answer at all (A stopped first) is no acknowledgement either.
    if let Ok(r) = stale.await.unwrap() {
        assert!(!r.status().is_success(), "a deposed owner acknowledged a submission: {}", r.status());
    }
    // A steps down: it exits with an error on its own.
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = a.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the deposed owner did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "stepping down is an error exit: {status}");

    // B has everything acknowledged, and nothing of A's stale attempt.
    for id in [&before, &during] {
        assert_eq!(http.get(format!("{b_url}/j/{id}")).send().await.unwrap().status(), 200, "job {id} lost");
    }
    let again: Value =
        http.post(format!("{b_url}/q/q/j")).json(&job("stale")).send().await.unwrap().json().await.unwrap();
    assert_eq!(again["outcome"], "created", "the deposed owner's submission must not be in the log");
}

/// Sends `SIGNAL` (TERM, STOP, CONT) to `pid`.
fn nix_signal(pid: u32, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Submits `tag-0`, `tag-1`, … to `url` until `stop` is set; returns the acknowledged ids. A
/// refused or failed submission is not acknowledged, and the next one is tried.
async fn submit_until(http: reqwest::Client, url: String, tag: String, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut acked = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Some(id) = submit(&http, &url, &format!("{tag}-{i}")).await {
            acked.push(id);
        }
        i += 1;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_leading_nats_server_mid_run_deposes_nobody_and_loses_nothing() {
    let Some(bin) = nats_server() else { return };
    let mut nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dir = tempfile::tempdir().unwrap();
    let (_broker, url) = cq_broker(&nats, dir.path(), "leader");
    wait_ready(&url).await;
    let stop = Arc::new(AtomicBool::new(false));
    let submitters: Vec<_> =
        (0..3).map(|t| tokio::spawn(submit_until(http.clone(), url.clone(), format!("s{t}"), stop.clone()))).collect();
    let deadline = Instant::now() + WAIT;
    while queued(&http, &url).await < 100 {
        assert!(Instant::now() < deadline, "submissions did not get through");
    }
    // kill -9, mid-run, the server leading the lease bucket (the lease store is then away until
    // NATS elects another leader, 4 to 9 s), which may lead the log's stream too.
    let js = nats.jetstream().await;
    let leader_of = |stream: &'static str| {
        let js = js.clone();
        async move {
            let info = js.get_stream(stream).await.unwrap().info().await.unwrap().clone();
            info.cluster.and_then(|c| c.leader).expect("the stream has a leader")
        }
    };
    let leader = leader_of("KV_leader_owners").await;
    let log_leader = leader_of("LEADER_LOG_0").await;
    eprintln!(
        "killing {leader}, which leads the lease bucket{}",
        if leader == log_leader { " and the log" } else { "" }
    );
    let index: usize = leader.strip_prefix('n').unwrap().parse().unwrap();
    let before = queued(&http, &url).await;
    nats.servers[index].0.kill().unwrap();
    nats.servers[index].0.wait().unwrap();
    let killed = Instant::now();
    // The remaining two elect a new leader; the broker's publishes get through again.
    while queued(&http, &url).await < before + 100 {
        assert!(Instant::now() < deadline, "no submission got through after {leader} died");
    }
    eprintln!("100 more submissions acknowledged {} ms after the kill -9 of {leader}", killed.elapsed().as_millis());
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for s in submitters {
        acked.extend(s.await.unwrap());
    }
    assert_eq!(readyz(&http, &url).await, "ready\n", "the broker kept serving");
    for id in &acked {
        assert_eq!(http.get(format!("{url}/j/{id}")).send().await.unwrap().status(), 200, "acknowledged {id} lost");
    }
    // And they are in the stream, not only in the broker's memory: a restart replays them.
    drop(_broker);
    let (_broker, url) = cq_broker(&nats, dir.path(), "leader");
    wait_ready(&url).await;
    for id in &acked {
        assert_eq!(http.get(format!("{url}/j/{id}")).send().await.unwrap().status(), 200, "{id} not in the log");
    }
    eprintln!("{} acknowledged submissions survived the kill -9 of {leader}", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_that_cannot_hold_the_log_is_refused_at_start_with_what_to_change() {
    let Some(bin) = nats_server() else { return };
    // One server with JetStream and the default max_payload (1 MB).
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("single.conf");
    let store = dir.path().join("js");
    std::fs::write(&conf, format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n", store.display()))
        .unwrap();
    let quiet = || std::process::Stdio::null();
    let _server = Killed(Command::new(bin).arg("-c").arg(&conf).stdout(quiet()).stderr(quiet()).spawn().unwrap());
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + WAIT;
    while async_nats::connect(&url).await.is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let broker = |extra: &[&str]| {
        let data = tempfile::tempdir().unwrap();
        let mut args = vec!["broker", "--listen", "127.0.0.1:0", "--shared-blob-dir", "--nats", &url];
        args.extend_from_slice(extra);
        let out =
            Command::new(env!("CARGO_BIN_EXE_cq")).args(&args).arg("--data-dir").arg(data.path()).output().unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8(out.stderr).unwrap()
    };
    // A 4 MiB submission (the default --max-body) does not fit a 1 MB message.
    let said = broker(&["--nats-replicas", "1"]);
    assert!(said.contains("max_payload is 1048576 bytes") && said.contains("lower --max-body"), "{said}");
    // Three replicas on one server.
    let said = broker(&["--max-body", "65536"]);
    assert!(said.contains("pass --nats-replicas 1"), "{said}");
}

/// How many shards each broker at `urls` serves (`cq_shard_owned` of its `/metrics`).
async fn shards_owned(http: &reqwest::Client, urls: &[String]) -> Vec<usize> {
    let mut owned = Vec::new();
    for url in urls {
        let text = http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
        owned.push(text.lines().filter(|l| l.starts_with("cq_shard_owned{") && l.ends_with(" 1")).count());
    }
    owned
}

/// Waits until every shard of the brokers at `urls` is served: each broker's `/readyz` says
/// ready, and their owned shards add up to `shards`.
async fn wait_all_served(http: &reqwest::Client, urls: &[String], shards: usize) -> Vec<usize> {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut ready = true;
        for url in urls {
            ready &= readyz(http, url).await.starts_with("ready\n");
        }
        let owned = shards_owned(http, urls).await;
        if ready && owned.iter().sum::<usize>() == shards {
            return owned;
        }
        assert!(Instant::now() < deadline, "the shards were not all served: {owned:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_broker_owning_the_most_shards_mid_run_loses_nothing_and_starts_no_job_twice() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    const SHARDS: u32 = 4;
    // Three brokers started together share the four shards.
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut brokers: Vec<(Killed, String)> = ["a", "b", "c"]
        .iter()
        .zip(&dirs)
        .map(|(node, dir)| {
            cq_broker_with(&nats, dir.path(), "spread", &["--node-id", node, "--lease-ttl", "2s", "--shards", "4"])
        })
        .collect();
    let urls: Vec<String> = brokers.iter().map(|b| b.1.clone()).collect();
    // They end within one shard of each other: 2, 1 and 1 (at once when they see each other
    // start, or after one hands a shard over).
    let deadline = Instant::now() + WAIT;
    let owned = loop {
        let owned = wait_all_served(&http, &urls, SHARDS as usize).await;
        if owned.iter().max().unwrap() - owned.iter().min().unwrap() <= 1 {
            break owned;
        }
        assert!(Instant::now() < deadline, "the shards were not shared fairly: {owned:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("shards owned by a, b, c: {owned:?}");

    // The number of shards is the cluster's: a broker asking for another is refused.
    let other = tempfile::tempdir().unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["broker", "--listen", "127.0.0.1:0", "--shared-blob-dir", "--nats-cluster", "spread"])
        .args(["--nats", &nats.url_list(), "--shards", "2", "--data-dir"])
        .arg(other.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("created with 4 shards"), "{said}");
    // So is a second live broker under a name another one has.
    let refused = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["broker", "--listen", "127.0.0.1:0", "--shared-blob-dir", "--nats-cluster", "spread"])
        .args(["--nats", &nats.url_list(), "--node-id", "a", "--lease-ttl", "2s", "--data-dir"])
        .arg(other.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("announces itself as `a` already"), "{said}");

    // One queue per shard, a worker each, given every broker's address.
    let queues: Vec<String> = (0..SHARDS)
        .map(|s| (0..).map(|i| format!("q{i}")).find(|q| broker::shards::shard_of(q, SHARDS) == s).unwrap())
        .collect();
    let all = urls.join(",");
    let run = tempfile::tempdir().unwrap();
    let logs: Vec<PathBuf> = (0..queues.len()).map(|n| run.path().join(format!("w{n}.log"))).collect();
    let _workers: Vec<support::KilledWorker> = logs
        .iter()
        .enumerate()
        .map(|(n, log)| logged_worker(&all, &queues[n], &run.path().join(format!("w{n}")), log))
        .collect();
    // Submissions through every broker in turn: most go to a shard another broker owns.
    let mut acked = Vec::new();
    for i in 0..24 {
        acked.push(submit_until_acknowledged(&http, &urls[i % 3], &queues[i % queues.len()], i).await);
    }
    // Every queue is listed by every broker, whichever shard it is on.
    for url in &urls {
        let listed: Value = http.get(format!("{url}/q")).send().await.unwrap().json().await.unwrap();
        let names: Vec<&str> =
            listed["queues"].as_array().unwrap().iter().filter_map(|q| q["queue"].as_str()).collect();
        for q in &queues {
            assert!(names.contains(&q.as_str()), "{url}/q lacks {q}: {listed}");
        }
    }

    // What differs across shards (docs/operations.md, "Several shards"). A definition live in
    // one queue is refused in another queue of its shard, and is a job of its own on another
    // shard, with the same id; either broker finds it by id or prefix.
    let idle: Vec<String> = (0..SHARDS)
        .map(|s| (0..).map(|i| format!("idle{i}")).find(|q| broker::shards::shard_of(q, SHARDS) == s).unwrap())
        .collect();
    let same = json!({"definition": {"image": "cq-test/busybox", "command": ["echo", "twice"]}});
    let post = |url: &String, queue: &str| http.post(format!("{url}/q/{queue}/j")).json(&same).send();
    let first: Value = post(&urls[0], &idle[0]).await.unwrap().json().await.unwrap();
    let id = first["jobId"].as_str().unwrap().to_string();
    let neighbour = format!("{}:x", idle[0]);
    assert_eq!(post(&urls[1], &neighbour).await.unwrap().status(), 409, "the same shard sees the live job");
    let elsewhere = post(&urls[2], &idle[1]).await.unwrap();
    assert_eq!(elsewhere.status(), 201, "another shard does not");
    assert_eq!(elsewhere.json::<Value>().await.unwrap()["jobId"], id.as_str());
    for url in &urls {
        let job: Value = http.get(format!("{url}/j/{id}")).send().await.unwrap().json().await.unwrap();
        assert!(job["queue"] == idle[0].as_str() || job["queue"] == idle[1].as_str(), "{job}");
        let found: Value =
            http.get(format!("{url}/j?prefix={}", &id[..12])).send().await.unwrap().json().await.unwrap();
        assert_eq!(found["jobs"].as_array().unwrap().len(), 2, "{found}");
        // Each one by its queue.
        for queue in [&idle[0], &idle[1]] {
            let job: Value =
                http.get(format!("{url}/j/{id}?queue={queue}")).send().await.unwrap().json().await.unwrap();
            assert_eq!(job["queue"], queue.as_str(), "{job}");
        }
    }
    // A worker's queues must share a shard; the refusal says how.
    let refused = http.get(format!("{}/ws/worker?queues={},{}", urls[0], queues[0], queues[1])).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let said = refused.text().await.unwrap();
    assert!(said.contains("different shards") && said.contains("before `:`"), "{said}");
    // A worker started so stops at once, saying why, rather than trying for ever.
    let wdir = tempfile::tempdir().unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["worker", "--url", &urls[1], "--queue", &queues[0], "--queue", &queues[1], "--data-dir"])
        .arg(wdir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "a worker whose queues span shards kept trying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut said = String::new();
    std::io::Read::read_to_string(&mut worker.stderr.take().unwrap(), &mut said).unwrap();
    assert!(!status.success() && said.contains("different shards"), "{said}");

    // Kill -9 of the broker owning the most shards while jobs run on one of its queues.
    let owned = shards_owned(&http, &urls).await;
    let victim = (0..3).max_by_key(|&n| owned[n]).unwrap();
    let survivors: Vec<String> = (0..3).filter(|&n| n != victim).map(|n| urls[n].clone()).collect();
    let text = http.get(format!("{}/metrics", urls[victim])).send().await.unwrap().text().await.unwrap();
    let its_queues: Vec<&String> = queues
        .iter()
        .filter(|q| text.contains(&format!("cq_shard_owned{{shard=\"{}\"}} 1", broker::shards::shard_of(q, SHARDS))))
        .collect();
    assert!(!its_queues.is_empty(), "broker {victim} owns {} shards", owned[victim]);
    let deadline = Instant::now() + WAIT;
    'running: loop {
        for q in &its_queues {
            let s: Value = http.get(format!("{}/q/{q}", survivors[0])).send().await.unwrap().json().await.unwrap();
            if s["running"].as_u64().unwrap_or(0) >= 1 {
                break 'running;
            }
        }
        assert!(Instant::now() < deadline, "no job ran on the queues of the broker to kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    brokers[victim].0.0.kill().unwrap();
    brokers[victim].0.0.wait().unwrap();
    for i in 24..40 {
        acked.push(submit_until_acknowledged(&http, &survivors[i % 2], &queues[i % queues.len()], i).await);
    }
    // The survivors serve every shard between them.
    let owned = wait_all_served(&http, &survivors, SHARDS as usize).await;
    eprintln!("after the kill, shards owned by the survivors: {owned:?}");

    // Every acknowledged job ends, asked of either survivor (found on whichever owns it).
    let deadline = Instant::now() + WAIT * 2;
    for (n, id) in acked.iter().enumerate() {
        loop {
            let job: Value =
                http.get(format!("{}/j/{id}", survivors[n % 2])).send().await.unwrap().json().await.unwrap();
            if job["state"] == "finished" {
                break;
            }
            assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(acked.len(), 40);
    assert_history_clean(&survivors[0], &acked, &logs, run.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_joins_later_is_handed_its_share_while_jobs_run() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = |node: &str, dir: &Path| {
        cq_broker_with(&nats, dir, "joined", &["--node-id", node, "--lease-ttl", "2s", "--shards", "4"])
    };
    // Alone, the first broker serves every shard.
    let a = start("a", dirs[0].path());
    let mut urls = vec![a.1.clone()];
    assert_eq!(wait_all_served(&http, &urls, 4).await, [4]);

    // Jobs that run for a while on two queues of different shards.
    let queues: Vec<String> = (0..4u32)
        .map(|s| (0..).map(|i| format!("q{i}")).find(|q| broker::shards::shard_of(q, 4) == s).unwrap())
        .collect();
    let (q1, q2) = (&queues[1], &queues[3]);
    let b_dir = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let logs = [run.path().join("w1.log"), run.path().join("w2.log")];
    let _workers: Vec<support::KilledWorker> = [q1, q2]
        .iter()
        .enumerate()
        .map(|(n, q)| logged_worker(&urls[0], q, &run.path().join(format!("w{n}")), &logs[n]))
        .collect();
    let long = |i: usize| {
        json!({"definition": {"image": "cq-test/busybox",
        "command": ["sh", "-c", format!("sleep 3; echo long {i} | tee /outputs/said")]}})
    };
    let mut acked = Vec::new();
    for i in 0..8 {
        let queue = if i % 2 == 0 { q1 } else { q2 };
        let r: Value =
            http.post(format!("{}/q/{queue}/j", urls[0])).json(&long(i)).send().await.unwrap().json().await.unwrap();
        acked.push(r["jobId"].as_str().unwrap().to_string());
    }

    // A second broker joins: the first hands it half of the shards, one at a time, while the
    // jobs run; their workers follow their shards' new owner without restarting anything.
    let b = start("b", b_dir.path());
    urls.push(b.1.clone());
    // Serving no shard yet (or one just handed over), it answers for a job nobody has at once.
    wait_all_served(&http, &urls, 4).await;
    let nobody = "0".repeat(64);
    let asked = http.get(format!("{}/j/{nobody}", urls[1])).timeout(Duration::from_secs(10)).send().await.unwrap();
    assert_eq!(asked.status(), 404, "{}", asked.text().await.unwrap());
    let deadline = Instant::now() + WAIT;
    loop {
        let owned = shards_owned(&http, &urls).await;
        if owned == [2, 2] && readyz(&http, &urls[1]).await.starts_with("ready\n") {
            break;
        }
        assert!(Instant::now() < deadline, "the shards were not shared: {owned:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The first broker gave up its highest-numbered shards: q2's among them, while its jobs ran.
    let text = http.get(format!("{}/metrics", urls[1])).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("cq_shard_owned{shard=\"3\"} 1"), "{text}");
    for i in 8..12 {
        acked.push(submit_until_acknowledged(&http, &urls[i % 2], &queues[i % 4], i).await);
    }
    // Queues 0 and 2 have no worker: only the jobs of q1 and q2 must finish.
    let deadline = Instant::now() + WAIT * 2;
    let mut finished = Vec::new();
    for id in &acked {
        loop {
            let job: Value = http.get(format!("{}/j/{id}", urls[1])).send().await.unwrap().json().await.unwrap();
            if job["queue"] == queues[0].as_str() || job["queue"] == queues[2].as_str() {
                assert_eq!(job["state"], "queued", "{job}");
                break;
            }
            if job["state"] == "finished" {
                finished.push(id.clone());
                break;
            }
            assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_history_clean(&urls[1], &finished, &logs, run.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_collection_keeps_what_another_broker_s_shard_references() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin).await;
    let http = reqwest::Client::new();
    let blobs = tempfile::tempdir().unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let blob_dir = blobs.path().to_str().unwrap().to_string();
    let brokers: Vec<(Killed, String)> = ["a", "b"]
        .iter()
        .zip(&dirs)
        .map(|(node, dir)| {
            let args = ["--node-id", node, "--lease-ttl", "2s", "--shards", "4", "--blob-dir", &blob_dir];
            cq_broker_with(&nats, dir.path(), "gc", &[&args[..], &["--blob-gc-grace", "0s"]].concat())
        })
        .collect();
    let urls: Vec<String> = brokers.iter().map(|b| b.1.clone()).collect();
    let deadline = Instant::now() + WAIT;
    while wait_all_served(&http, &urls, 4).await != [2, 2] {
        assert!(Instant::now() < deadline, "the shards were not shared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A job on a queue of a shard b serves references one blob; another blob is referenced by
    // nothing. Both are uploaded through a.
    let text = http.get(format!("{}/metrics", urls[1])).send().await.unwrap().text().await.unwrap();
    let queue = (0..)
        .map(|i| format!("q{i}"))
        .find(|q| text.contains(&format!("cq_shard_owned{{shard=\"{}\"}} 1", broker::shards::shard_of(q, 4))))
        .unwrap();
    let mut names = Vec::new();
    for body in ["referenced on b's shard", "referenced by nothing"] {
        let name = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()));
        let put = http.put(format!("{}/f/{name}", urls[0])).body(body).send().await.unwrap();
        assert!(put.status().is_success(), "{}", put.text().await.unwrap());
        names.push(name);
    }
    let definition = json!({"image": "cq-test/busybox",
        "inputs": {"a": {"type": "blob", "sha256": names[0], "size": 23}}});
    // Through a, which relays it to b (a 503 while a learns that a shard just moved, retried).
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http.post(format!("{}/q/{queue}/j", urls[0])).json(&json!({ "definition": definition })).send().await;
        let r = r.unwrap();
        if r.status() == 201 {
            break;
        }
        assert!(r.status() == 503 && Instant::now() < deadline, "{}", r.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Collected from each broker in turn: the blob b's shard references stays.
    for url in &urls {
        let stats: Value =
            http.post(format!("{url}/f/gc")).json(&json!({})).send().await.unwrap().json().await.unwrap();
        assert_eq!(stats["kept"], 1, "{url}: {stats}");
        let head = |name: &String| http.head(format!("{url}/f/{name}")).send();
        assert_eq!(head(&names[0]).await.unwrap().status(), 200);
        assert_eq!(head(&names[1]).await.unwrap().status(), 404);
    }
}
