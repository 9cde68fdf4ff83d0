//! What the worker's Docker test binaries share: a broker in its own runtime on 127.0.0.1:0,
//! workers in the test's runtime, the local test image, and Docker queries by worker label.
// Each test binary uses a part of this.
#![allow(dead_code)]

use std::time::Duration;

use bollard::query_parameters::ListContainersOptions;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The image every test runs; built from Debian's busybox-static, never pulled.
pub const IMAGE: &str = "cq-test/busybox:latest";
/// Longest any test waits for one expected event.
pub const WAIT: Duration = Duration::from_secs(60);

/// A broker in its own runtime on 127.0.0.1:0.
pub struct Broker {
    pub url: String,
    dir: tempfile::TempDir,
    lease_grace_ms: u64,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Broker {
    pub fn start(lease_grace_ms: u64) -> Broker {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut b = Broker { url, dir: tempfile::tempdir().unwrap(), lease_grace_ms, stop: None, thread: None };
        b.serve(listener);
        b
    }

    /// Stops the broker (gracefully: every socket is told "going away"); [`Broker::restart`]
    /// starts it again.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Starts the stopped broker again, on the same port and with the same data.
    pub fn restart(&mut self) {
        let address = self.url.strip_prefix("http://").unwrap().to_string();
        let listener = std::net::TcpListener::bind(&address).unwrap();
        self.serve(listener);
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        let config = broker::Config {
            store: broker::runtime::StoreConfig {
                data_dir: self.dir.path().to_path_buf(),
                fsync: broker::runtime::FsyncMode::Never,
                core: broker::core::CoreConfig { lease_grace_ms: self.lease_grace_ms, ..Default::default() },
                nats: None,
            },
            tokens: Default::default(),
            max_body: broker::http::DEFAULT_MAX_BODY,
            blobs: broker::blob::BlobConfig { gc_interval: None, ..Default::default() },
            access: broker::access::AccessConfig::default(),
        };
        listener.set_nonblocking(true).unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                broker::run(listener, config, async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        self.stop = Some(stop_tx);
        self.thread = Some(thread);
    }

    pub async fn submit(&self, definition: Value) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/q/local/j", self.url))
            .json(&json!({ "definition": definition }))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert!(status.is_success(), "{body}");
        body["jobId"].as_str().unwrap().to_string()
    }

    pub async fn job(&self, id: &str) -> Value {
        reqwest::get(format!("{}/j/{id}", self.url)).await.unwrap().json().await.unwrap()
    }

    /// The job's whole log, every page of it.
    pub async fn log_text(&self, id: &str) -> String {
        let mut text = String::new();
        let mut since = 0;
        loop {
            let url = format!("{}/j/{id}/logs?since={since}", self.url);
            let v: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            let lines = v["lines"].as_array().unwrap();
            text.extend(lines.iter().map(|l| l["text"].as_str().unwrap().to_string()));
            since = v["next"].as_u64().unwrap();
            if lines.is_empty() || since >= v["total"].as_u64().unwrap() {
                return text;
            }
        }
    }

    /// Follows the job's events until `until` holds for one of them; returns them all.
    pub async fn follow_until(&self, id: &str, until: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.follow_until_within(id, WAIT, until).await
    }

    /// [`Broker::follow_until`] with its own bound.
    pub async fn follow_until_within(&self, id: &str, wait: Duration, until: impl Fn(&Value) -> bool) -> Vec<Value> {
        follow(&self.url, id, wait, until).await
    }

    pub async fn finished(&self, id: &str) -> Value {
        self.follow_until(id, is_finished).await;
        self.job(id).await
    }
}

/// Follows job `id` on the broker at `url` (its server-sent events) until `until` holds for
/// one event, at most `wait`; returns the events seen.
pub async fn follow(url: &str, id: &str, wait: Duration, until: impl Fn(&Value) -> bool) -> Vec<Value> {
    let resp = reqwest::get(format!("{}/j/{id}/events", url)).await.unwrap();
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut seen = Vec::new();
    tokio::time::timeout(wait, async {
        while let Some(chunk) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf[..end].to_string();
                buf.drain(..end + 2);
                for line in event.lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        let v: Value = serde_json::from_str(data.trim()).unwrap();
                        let done = until(&v);
                        seen.push(v);
                        if done {
                            return;
                        }
                    }
                }
            }
        }
        panic!("the event stream ended first: {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("timed out following job {id}"));
    seen
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn is_finished(v: &Value) -> bool {
    v["type"] == "job" && v["data"]["job"]["state"] == "finished"
}

pub fn logged(v: &Value, text: &str) -> bool {
    v["type"] == "logs"
        && v["data"]["lines"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l["text"].as_str().unwrap_or("").contains(text)))
}

/// A running worker; dropping `stop` starts its drain.
pub struct Worker {
    pub id: String,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub fn config(url: &str, id: &str, dir: &std::path::Path, slots: u32) -> worker::Config {
    worker::Config {
        broker_urls: vec![url.to_string()],
        token: None,
        worker_id: protocol::WorkerId(id.to_string()),
        queues: vec!["local".into()],
        slots,
        gpus: Vec::new(),
        tags: Vec::new(),
        max_duration: None,
        data_dir: dir.to_path_buf(),
        stop_grace: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(60),
        pids_limit: 512,
        output_limits: Default::default(),
        limits: worker::limits::Limits::default(),
    }
}

pub fn start_worker(config: worker::Config) -> Worker {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let id = config.worker_id.to_string();
    let task = tokio::spawn(worker::run(config, async {
        let _ = stop_rx.await;
    }));
    Worker { id, stop: Some(stop_tx), task }
}

/// A worker on a runtime of its own, so that [`Killable::kill`] ends all of its tasks at once,
/// as the end of its process would: aborting a worker's task alone leaves its job tasks running,
/// and they would still finish and clean up the attempt a restarted worker re-attaches to.
pub struct Killable {
    pub id: String,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn start_killable_worker(config: worker::Config) -> Killable {
    let id = config.worker_id.to_string();
    let (kill, killed) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.spawn(worker::run(config, std::future::pending()));
        let _ = runtime.block_on(killed);
        // Every task of the worker is dropped here, its job tasks too.
        drop(runtime);
    });
    Killable { id, kill: Some(kill), thread: Some(thread) }
}

impl Killable {
    /// Ends the worker without a goodbye and returns once none of its tasks runs.
    pub fn kill(&mut self) {
        drop(self.kill.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A worker id no other test (or earlier run) uses.
pub fn unique(name: &str) -> String {
    format!(
        "t-{name}-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
    )
}

pub async fn docker() -> bollard::Docker {
    let d = bollard::Docker::connect_with_local_defaults().expect("Docker");
    d.inspect_image(IMAGE).await.unwrap_or_else(|_| panic!("{IMAGE} is missing: run scripts/test-image.sh"));
    d
}

/// Containers carrying the worker label `id`.
pub async fn containers_of(id: &str) -> Vec<String> {
    let filters = std::collections::HashMap::from([("label".to_string(), vec![format!("cq.worker={id}")])]);
    let list = docker()
        .await
        .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
        .await
        .unwrap();
    list.into_iter().filter_map(|c| c.id).collect()
}

/// Waits for Docker's `destroy` events until no container of worker `id` is left.
pub async fn all_removed(id: &str) {
    let filters = std::collections::HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        ("event".to_string(), vec!["destroy".to_string()]),
        ("label".to_string(), vec![format!("cq.worker={id}")]),
    ]);
    let d = docker().await;
    // Docker is asked for the events only when the stream is first polled, after the first look
    // below: events since a second before that look replay a removal that falls in between.
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap() - Duration::from_secs(1);
    let since = Some(format!("{}.{:09}", before.as_secs(), before.subsec_nanos()));
    let mut events = d.events(Some(bollard::query_parameters::EventsOptions {
        filters: Some(filters),
        since,
        ..Default::default()
    }));
    while !containers_of(id).await.is_empty() {
        events.next().await.expect("Docker's event stream ended").unwrap();
    }
}

pub async fn remove_containers_of(id: &str) {
    let d = docker().await;
    for c in containers_of(id).await {
        let _ = worker::docker::remove(&d, &c).await;
    }
}

pub fn sh(script: &str) -> Value {
    json!(["sh", "-c", script])
}

impl Broker {
    pub async fn submit_body(&self, body: Value) -> String {
        let r = reqwest::Client::new().post(format!("{}/q/local/j", self.url)).json(&body).send().await.unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert!(status.is_success(), "{body}");
        body["jobId"].as_str().unwrap().to_string()
    }

    pub async fn cancel(&self, id: &str) {
        let r = reqwest::Client::new().post(format!("{}/j/{id}/cancel", self.url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    pub async fn summary(&self) -> Value {
        reqwest::get(format!("{}/q/local", self.url)).await.unwrap().json().await.unwrap()
    }

    /// The job's log lines from the container (not the worker's own notes).
    pub async fn job_lines(&self, id: &str) -> Vec<Value> {
        let v: Value =
            reqwest::get(format!("{}/j/{id}/logs?limit=100000", self.url)).await.unwrap().json().await.unwrap();
        v["lines"].as_array().unwrap().iter().filter(|l| l["stream"] != "system").cloned().collect()
    }
}

/// Serves `body` to every request on 127.0.0.1 (with `status`); returns the URL.
pub async fn serve_once_per_request(body: Vec<u8>, status: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/context.tar", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    url
}
