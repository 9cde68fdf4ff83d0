//! Test helpers: a real broker on 127.0.0.1:0 in its own runtime (so a test can drop it
//! abruptly, like a crash), and websocket clients that speak the protocol.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use broker::auth::Tokens;
use broker::core::CoreConfig;
use broker::runtime::{FsyncMode, StoreConfig};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest a test waits for any one expected message.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestBroker {
    pub addr: SocketAddr,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn config(dir: &Path) -> broker::Config {
    broker::Config {
        store: StoreConfig {
            data_dir: dir.to_path_buf(),
            fsync: FsyncMode::Always,
            core: CoreConfig { lease_grace_ms: 0, ..CoreConfig::default() },
            nats: None,
        },
        tokens: Tokens::default(),
        max_body: 64 << 10,
        blobs: broker::blob::BlobConfig { gc_interval: None, ..Default::default() },
        access: broker::access::AccessConfig::default(),
    }
}

impl TestBroker {
    pub fn start() -> TestBroker {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = TestBroker::start_with(config(tmp.path()));
        b._tmp = Some(tmp);
        b
    }

    /// A broker with these blob settings, on a fresh data directory.
    pub fn with_blobs(blobs: broker::blob::BlobConfig) -> TestBroker {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = TestBroker::start_with(broker::Config { blobs, ..config(tmp.path()) });
        b._tmp = Some(tmp);
        b
    }

    pub fn start_with(config: broker::Config) -> TestBroker {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    r = broker::run(listener, config, async { let _ = stop_rx.await; }) => r.unwrap(),
                    _ = kill_rx => {}
                }
            });
            // Dropping the runtime abandons every task mid-flight, like a crash would. Waiting
            // for its threads to end makes sure nothing of this broker still touches the data
            // directory when the next one starts on it (the log writer thread ends once the
            // core task is dropped).
            rt.shutdown_timeout(std::time::Duration::from_secs(30));
        });
        TestBroker { addr, _tmp: None, stop: Some(stop_tx), kill: Some(kill_tx), thread: Some(thread) }
    }

    /// Removes `dir` when the broker is dropped.
    pub fn keep(&mut self, dir: tempfile::TempDir) {
        self._tmp = Some(dir);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The data directory of a broker started on a temporary one.
    pub fn data_dir(&self) -> &Path {
        self._tmp.as_ref().expect("a temporary data directory").path()
    }

    /// Stops the broker without a graceful shutdown and returns its data directory.
    pub fn crash(mut self) -> tempfile::TempDir {
        let _ = self.kill.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
        self._tmp.take().unwrap()
    }

    /// Stops the broker gracefully (it writes a final snapshot) and returns its data directory.
    pub fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
        self._tmp.take().unwrap()
    }

    /// Starts a broker again on the data directory of a crashed one.
    pub fn restart(dir: tempfile::TempDir) -> TestBroker {
        let mut b = TestBroker::start_with(config(dir.path()));
        b._tmp = Some(dir);
        b
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = reqwest::Client::new().post(self.url(path)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::get(self.url(path)).await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Submits `command` on busybox to `queue`; returns (status, body).
    pub async fn submit(&self, queue: &str, command: &str, extra: Value) -> (u16, Value) {
        let mut body = json!({ "definition": { "image": "busybox", "command": command } });
        if let Value::Object(m) = extra {
            for (k, v) in m {
                body[k] = v;
            }
        }
        self.post(&format!("/q/{queue}/j"), body).await
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A websocket peer of the broker.
pub struct Ws {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn connect(addr: SocketAddr, path: &str, token: Option<&str>) -> Ws {
        let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
        if let Some(t) = token {
            request.headers_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        Ws { socket }
    }

    /// A client that has said hello.
    pub async fn client(addr: SocketAddr) -> Ws {
        let mut ws = Ws::connect(addr, "/ws/client", None).await;
        ws.send(json!({"type": "hello", "data": {"protocol": 1}})).await;
        assert_eq!(ws.recv().await["type"], "welcome");
        ws
    }

    /// A worker that has said hello on queue `q`.
    pub async fn worker(addr: SocketAddr, id: &str, slots: u32, held: Value) -> Ws {
        let mut ws = Ws::connect(addr, "/ws/worker", None).await;
        ws.send(json!({"type": "hello", "data": {"protocol": 1, "workerId": id, "queues": ["q"], "slots": slots, "held": held}})).await;
        assert_eq!(ws.recv().await["type"], "welcome");
        ws
    }

    pub async fn send(&mut self, v: Value) {
        self.socket.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.socket.send(m).await.unwrap();
    }

    /// The next JSON message (pings are skipped); panics after [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("timed out waiting for a message")
                .expect("socket closed")
                .unwrap();
            match m {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(c) => panic!("socket closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// The next message of type `kind`, skipping others.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let m = self.recv().await;
            if m["type"] == kind {
                return m;
            }
        }
    }

    /// Waits for the close frame and returns its code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(WAIT, self.socket.next()).await.expect("timed out waiting for close") {
                Some(Ok(Message::Close(Some(frame)))) => return frame.code.into(),
                Some(Ok(Message::Close(None))) | None => return 1005,
                Some(Err(e)) => {
                    eprintln!("socket error while waiting for close: {e}");
                    return 1006;
                }
                Some(Ok(_)) => {}
            }
        }
    }
}

/// A real S3-protocol server (s3s-fs) on 127.0.0.1:0 with one bucket, in its own runtime.
pub struct S3Server {
    pub endpoint: String,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub const S3_BUCKET: &str = "cq-test";
pub const S3_KEY: &str = "AKIDTESTKEY";
pub const S3_SECRET: &str = "test-secret-key";

impl S3Server {
    pub fn start() -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(S3_BUCKET)).unwrap();
        let fs = s3s_fs::FileSystem::new(dir.path()).unwrap();
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(S3_KEY, S3_SECRET));
        let service = builder.build();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                loop {
                    let socket = tokio::select! {
                        r = listener.accept() => r.unwrap().0,
                        _ = &mut stop_rx => break,
                    };
                    let conn =
                        http.serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone()).into_owned();
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
            });
            rt.shutdown_background();
        });
        S3Server { endpoint, _dir: dir, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// Blob settings pointing a broker at this server.
    pub fn blob_config(&self) -> broker::blob::BlobConfig {
        broker::blob::BlobConfig {
            backend: broker::blob::BlobBackend::S3(broker::blob::S3Config {
                bucket: S3_BUCKET.into(),
                endpoint: Some(self.endpoint.clone()),
                region: Some("us-east-1".into()),
                access_key_id: Some(S3_KEY.into()),
                secret_access_key: Some(S3_SECRET.into()),
                prefix: "blobs".into(),
                ..Default::default()
            }),
            gc_interval: None,
            ..Default::default()
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
