//! The blob store through the real broker, on both backends: a local directory and a real
//! S3-protocol server (s3s-fs on 127.0.0.1). Every test in `both!` runs once per backend;
//! uploads and downloads use a plain HTTP client, following presigned URLs where S3 hands them
//! out.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{S3Server, TestBroker, Ws};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Local,
    S3,
}

/// A broker on one backend (and the S3 server behind it).
struct Env {
    b: TestBroker,
    backend: Backend,
    s3: Option<S3Server>,
}

impl Env {
    fn start(backend: Backend) -> Env {
        Env::start_with(backend, |_| {})
    }

    fn start_with(backend: Backend, tweak: impl FnOnce(&mut broker::blob::BlobConfig)) -> Env {
        let s3 = (backend == Backend::S3).then(S3Server::start);
        let mut blobs = match &s3 {
            Some(s3) => s3.blob_config(),
            None => broker::blob::BlobConfig { gc_interval: None, ..Default::default() },
        };
        tweak(&mut blobs);
        Env { b: TestBroker::with_blobs(blobs), backend, s3 }
    }
}

macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn local() {
                super::$name(super::Backend::Local).await
            }
            #[tokio::test]
            async fn s3() {
                super::$name(super::Backend::S3).await
            }
        }
    };
}

both!(a_job_s_input_and_output_round_trip_verified_by_hash);
both!(content_that_does_not_match_its_name_is_never_stored);
both!(range_requests_and_head);
both!(names_and_paths_are_checked);
both!(the_size_limit_gives_413);
both!(large_inline_inputs_become_blobs_with_the_same_job_id);
both!(collection_keeps_referenced_blobs_and_deletes_the_rest);
both!(bytes_swapped_in_the_store_never_count_as_the_blob);

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic bytes that do not compress to nothing.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// Asks where to upload; `None` when the store has the bytes.
async fn plan(env: &Env, name: &str, size: u64) -> (u16, Value) {
    let r = http().post(env.b.url(&format!("/f/{name}/upload"))).json(&json!({ "size": size })).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Uploads `body` under `name` following the broker's plan; returns the final status.
async fn put_as(env: &Env, name: &str, body: Vec<u8>) -> u16 {
    let (status, plan) = plan(env, name, body.len() as u64).await;
    assert_eq!(status, 200, "{plan}");
    if plan["exists"] == true {
        return 200;
    }
    let url = plan["url"].as_str().unwrap();
    match env.backend {
        Backend::Local => assert_eq!(url, format!("/f/{name}")),
        Backend::S3 => assert!(url.starts_with(&env.s3.as_ref().unwrap().endpoint), "{url}"),
    }
    let url = if url.starts_with('/') { env.b.url(url) } else { url.to_string() };
    let mut req = http().put(url).body(body);
    for (k, v) in plan["headers"].as_object().unwrap() {
        req = req.header(k, v.as_str().unwrap());
    }
    req.send().await.unwrap().status().as_u16()
}

async fn upload(env: &Env, body: &[u8]) -> String {
    let name = sha(body);
    let status = put_as(env, &name, body.to_vec()).await;
    assert!(status == 200 || status == 201, "upload answered {status}");
    name
}

async fn get_bytes(url: &str) -> (u16, Vec<u8>) {
    let r = http().get(url).send().await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

async fn a_job_s_input_and_output_round_trip_verified_by_hash(backend: Backend) {
    let env = Env::start(backend);
    let b = &env.b;
    let mut w = Ws::worker(b.addr, "w1", 1, json!([])).await;
    let input = noise(3 << 20, 7);
    let sha_in = upload(&env, &input).await;
    // A second upload of the same bytes is skipped.
    assert_eq!(plan(&env, &sha_in, input.len() as u64).await.1, json!({ "exists": true }));

    let definition = json!({ "image": "busybox", "command": "true", "inputs": {
        "data/in.bin": { "type": "blob", "sha256": sha_in, "size": input.len() } } });
    let (status, body) = b.post("/q/q/j", json!({ "definition": definition })).await;
    assert_eq!(status, 201, "{body}");
    let id = body["jobId"].as_str().unwrap().to_string();
    let assign = w.recv_type("assign").await;
    assert_eq!(assign["data"]["definition"]["inputs"]["data/in.bin"]["sha256"], sha_in.as_str());

    // The worker fetches the input (S3: through a redirect to a presigned URL) ...
    let (status, fetched) = get_bytes(&b.url(&format!("/f/{sha_in}"))).await;
    assert_eq!(status, 200);
    assert_eq!(sha(&fetched), sha_in);
    // ... and stores an output.
    let output = b"result line\n".repeat(1000);
    let sha_out = upload(&env, &output).await;
    w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    w.send(json!({"type": "finish", "data": {"jobId": id, "attempt": 1, "status": {"kind": "exited", "exitCode": 0},
    "outputs": [
        { "path": "out/result.txt", "size": output.len(), "sha256": sha_out },
        { "path": "../escape.txt", "size": output.len(), "sha256": sha_out },
        { "path": "/etc/passwd", "size": output.len(), "sha256": sha_out },
    ]}}))
    .await;
    w.recv_type("finishAck").await;

    let (_, job) = b.get(&format!("/j/{id}")).await;
    assert_eq!(job["state"], "finished");
    assert_eq!(
        job["outputs"],
        json!([{ "path": "out/result.txt", "size": output.len(), "sha256": sha_out }]),
        "outputs with unsafe names are dropped"
    );
    let r = http().get(b.url(&format!("/j/{id}/outputs/out/result.txt"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    if backend == Backend::Local {
        assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    }
    assert_eq!(r.bytes().await.unwrap().as_ref(), output.as_slice());
    let (status, body) = b.get(&format!("/j/{id}/outputs/out/missing.txt")).await;
    assert_eq!(status, 404);
    assert!(body["error"]["message"].as_str().unwrap().contains("it has: out/result.txt"), "{body}");
}

async fn content_that_does_not_match_its_name_is_never_stored(backend: Backend) {
    let env = Env::start(backend);
    let b = &env.b;
    let good = b"the right bytes".to_vec();
    let name = sha(&good);
    // Wrong bytes under the name: the broker (local) or S3 (signed checksum) refuses them.
    let status = put_as(&env, &name, b"some other bytes".to_vec()).await;
    match backend {
        Backend::Local => assert_eq!(status, 422),
        Backend::S3 => assert_eq!(status, 400, "S3 answers BadDigest"),
    }
    if backend == Backend::Local {
        let head = http().head(b.url(&format!("/f/{name}"))).send().await.unwrap();
        assert_eq!(head.status(), 404, "nothing was stored");
    }
    // No job may reference it. (s3s-fs, unlike AWS S3, keeps the object it refused with
    // BadDigest; the broker then finds the mismatch itself and deletes the object.)
    let definition =
        json!({ "image": "busybox", "inputs": { "a": { "type": "blob", "sha256": name, "size": good.len() } } });
    let (status, body) = b.post("/q/q/j", json!({ "definition": definition.clone() })).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("not in the store") || message.contains("does not match"), "{body}");
    let head = http().head(b.url(&format!("/f/{name}"))).send().await.unwrap();
    assert_eq!(head.status(), 404, "nothing is left under the name");

    // `PUT /f/{name}` streams through the broker on both backends (S3 included: a plain client
    // cannot send the checksum header a presigned upload needs), and the broker checks it.
    let no_follow = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = no_follow.put(b.url(&format!("/f/{name}"))).body("wrong").send().await.unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "hashMismatch");
    let r = no_follow.put(b.url(&format!("/f/{name}"))).body(good.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201, "no redirect to an unbound presigned URL");
    if backend == Backend::S3 {
        // The presigned download URL works with a plain client.
        let r = no_follow.get(b.url(&format!("/f/{name}"))).send().await.unwrap();
        assert_eq!(r.status(), 307);
        let location = r.headers()["location"].to_str().unwrap().to_string();
        assert!(location.contains("X-Amz-Signature="), "{location}");
        assert_eq!(get_bytes(&location).await, (200, good.clone()));
    }
    // Once the right bytes are stored, the job is accepted.
    assert!(matches!(put_as(&env, &name, good.clone()).await, 200 | 201));
    let (status, body) = b.post("/q/q/j", json!({ "definition": definition })).await;
    assert_eq!(status, 201, "{body}");
}

async fn range_requests_and_head(backend: Backend) {
    let env = Env::start(backend);
    let b = &env.b;
    let data = noise(100_000, 3);
    let name = upload(&env, &data).await;
    let url = b.url(&format!("/f/{name}"));
    let head = http().head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "100000");
    for (range, expected) in [
        ("bytes=10-19", &data[10..20]),
        ("bytes=99990-", &data[99_990..]),
        ("bytes=-5", &data[99_995..]),
        ("bytes=0-0", &data[..1]),
    ] {
        let r = http().get(&url).header("range", range).send().await.unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(r.bytes().await.unwrap().as_ref(), expected, "{range}");
    }
    let r = http().get(&url).header("range", "bytes=200000-").send().await.unwrap();
    assert_eq!(r.status(), 416);
    let missing = sha(b"never uploaded");
    assert_eq!(http().head(b.url(&format!("/f/{missing}"))).send().await.unwrap().status(), 404);
    if backend == Backend::Local {
        let (status, body) = b.get(&format!("/f/{missing}")).await;
        assert_eq!(status, 404);
        assert!(body["error"]["message"].as_str().unwrap().contains("upload it first"), "{body}");
    }
}

async fn names_and_paths_are_checked(backend: Backend) {
    let env = Env::start(backend);
    let b = &env.b;
    let upper = sha(b"x").to_uppercase();
    for bad in ["xyz", "0123", upper.as_str(), &"g".repeat(64), &"a".repeat(65)] {
        let (status, body) = b.get(&format!("/f/{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("not a blob name"), "{body}");
        let r = http().put(b.url(&format!("/f/{bad}"))).body("x").send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(plan(&env, bad, 1).await.0, 400, "{bad}");
    }
    for path in ["../up", "/abs", "a/../../b", "nul\u{0}byte", "a//b", ""] {
        let definition = json!({ "image": "busybox", "inputs": { path: { "type": "text", "value": "x" } } });
        let (status, body) = b.post("/q/q/j", json!({ "definition": definition })).await;
        assert_eq!(status, 422, "{path:?}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("inputs."), "{body}");
    }
    let (status, _) = b.get(&format!("/j/{}/outputs/a.txt", sha(b"no such job"))).await;
    assert_eq!(status, 404);
    let (status, _) = b.get("/j/not-an-id/outputs/a.txt").await;
    assert_eq!(status, 400);
}

async fn the_size_limit_gives_413(backend: Backend) {
    let env = Env::start_with(backend, |c| c.max_blob = 1000);
    let b = &env.b;
    let big = noise(2000, 5);
    let name = sha(&big);
    let (status, body) = plan(&env, &name, 2000).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("1000 bytes"), "{body}");
    let r = http().put(b.url(&format!("/f/{name}"))).body(big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let small = noise(1000, 5);
    upload(&env, &small).await;
}

async fn large_inline_inputs_become_blobs_with_the_same_job_id(backend: Backend) {
    let env = Env::start(backend);
    let b = &env.b;
    let text = "a line of input text\n".repeat(2000);
    let inline = json!({ "image": "busybox", "inputs": { "in.txt": { "type": "text", "value": text } } });
    let (status, body) = b.post("/q/q/j", json!({ "definition": inline })).await;
    assert_eq!(status, 201, "{body}");
    let id = body["jobId"].as_str().unwrap().to_string();
    let (_, stored) = b.get(&format!("/j/{id}/definition")).await;
    let name = sha(text.as_bytes());
    assert_eq!(stored["inputs"]["in.txt"], json!({ "type": "blob", "sha256": name, "size": text.len() }));
    let (status, fetched) = get_bytes(&b.url(&format!("/f/{name}"))).await;
    assert_eq!((status, fetched), (200, text.clone().into_bytes()));
    // The same bytes sent as a blob ref (or as base64) name the same job.
    let as_blob =
        json!({ "image": "busybox", "inputs": { "in.txt": { "type": "blob", "sha256": name, "size": text.len() } } });
    let (status, body) = b.post("/q/q/j", json!({ "definition": as_blob })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["jobId"], id.as_str());
    assert_eq!(body["outcome"], "joined");
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
    let as_base64 = json!({ "image": "busybox", "inputs": { "in.txt": { "type": "base64", "value": encoded } } });
    let (_, body) = b.post("/q/q/j", json!({ "definition": as_base64 })).await;
    assert_eq!(body["jobId"], id.as_str());
    // Small inline inputs stay inline.
    let small = json!({ "image": "busybox", "inputs": { "s.txt": { "type": "text", "value": "tiny" } } });
    let (_, body) = b.post("/q/q/j", json!({ "definition": small })).await;
    let (_, stored) = b.get(&format!("/j/{}/definition", body["jobId"].as_str().unwrap())).await;
    assert_eq!(stored["inputs"]["s.txt"], json!({ "type": "text", "value": "tiny" }));
}

async fn collection_keeps_referenced_blobs_and_deletes_the_rest(backend: Backend) {
    let env = Env::start_with(backend, |c| c.gc_grace = std::time::Duration::ZERO);
    let b = &env.b;
    let kept = b"referenced by a queued job".to_vec();
    let dropped = b"referenced by nothing".to_vec();
    let kept_name = upload(&env, &kept).await;
    let dropped_name = upload(&env, &dropped).await;
    let definition =
        json!({ "image": "busybox", "inputs": { "a": { "type": "blob", "sha256": kept_name, "size": kept.len() } } });
    let (status, body) = b.post("/q/q/j", json!({ "definition": definition })).await;
    assert_eq!(status, 201, "{body}");
    let (status, stats) = b.post("/f/gc", json!({})).await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["deleted"], 1, "{stats}");
    assert_eq!(stats["kept"], 1, "{stats}");
    let head = |name: String| async move { http().head(b.url(&format!("/f/{name}"))).send().await.unwrap().status() };
    assert_eq!(head(kept_name).await, 200);
    assert_eq!(head(dropped_name).await, 404);
}

#[tokio::test]
async fn a_truncated_upload_stores_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::start(Backend::Local);
    let body = noise(100, 9);
    let name = sha(&body);
    let mut socket = tokio::net::TcpStream::connect(env.b.addr).await.unwrap();
    let head = format!("PUT /f/{name} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\nconnection: close\r\n\r\n");
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body[..50]).await.unwrap();
    socket.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer}");
    let status = http().head(env.b.url(&format!("/f/{name}"))).send().await.unwrap().status();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn an_unreachable_s3_is_a_clear_503_and_acknowledges_nothing() {
    // A port with nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let blobs = broker::blob::BlobConfig {
        backend: broker::blob::BlobBackend::S3(broker::blob::S3Config {
            bucket: "b".into(),
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            retries: Some(0),
            ..Default::default()
        }),
        gc_interval: None,
        ..Default::default()
    };
    let b = TestBroker::with_blobs(blobs);
    let name = sha(b"x");
    let r = http().post(b.url(&format!("/f/{name}/upload"))).json(&json!({"size": 1})).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("blob store is unavailable"), "{body}");
    let definition = json!({ "image": "busybox", "inputs": { "a": { "type": "blob", "sha256": name, "size": 1 } } });
    let (status, body) = b.post("/q/q/j", json!({ "definition": definition })).await;
    assert_eq!(status, 503, "{body}");
    let (_, jobs) = b.get("/q/q/j").await;
    assert_eq!(jobs["jobs"], json!([]), "nothing was acknowledged");
}

/// Writes `bytes` under blob `name` straight into the store, past the broker: someone with write
/// access to the bucket or directory, or an S3 that keeps what it refused.
async fn swap(env: &Env, name: &str, bytes: Vec<u8>) {
    use object_store::ObjectStoreExt as _;
    let key = object_store::path::Path::from(format!("blobs/sha256/{}/{name}", &name[..2]));
    match &env.s3 {
        Some(s3) => {
            let store = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(crate::common::S3_BUCKET)
                .with_endpoint(&s3.endpoint)
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id(crate::common::S3_KEY)
                .with_secret_access_key(crate::common::S3_SECRET)
                .build()
                .unwrap();
            store.put(&key, bytes.into()).await.unwrap();
        }
        None => {
            let path = env.b.data_dir().join(format!("blobs/sha256/{}/{name}", &name[..2]));
            std::fs::write(path, bytes).unwrap();
        }
    }
}

async fn bytes_swapped_in_the_store_never_count_as_the_blob(backend: Backend) {
    let env = Env::start(backend);
    let b = &env.b;
    let good = noise(4096, 11);
    let name = upload(&env, &good).await;
    assert_eq!(plan(&env, &name, good.len() as u64).await.1, json!({ "exists": true }));
    let definition =
        json!({ "image": "busybox", "inputs": { "a": { "type": "blob", "sha256": name, "size": good.len() } } });
    let (status, body) = b.post("/q/q/j", json!({ "definition": definition.clone() })).await;
    assert_eq!(status, 201, "{body}");

    // Other bytes of the same size appear under the name, after the broker checked it.
    swap(&env, &name, noise(4096, 12)).await;
    let another =
        json!({ "image": "busybox", "inputs": { "b": { "type": "blob", "sha256": name, "size": good.len() } } });
    let (status, body) = b.post("/q/q/j", json!({ "definition": another })).await;
    assert_eq!(status, 422, "a submission is not accepted on the size alone: {body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("does not match"), "{body}");
    let head = http().head(b.url(&format!("/f/{name}"))).send().await.unwrap();
    assert_eq!(head.status(), 404, "the wrong bytes were deleted");

    // Again, and this time the upload plan is the first to look: it does not answer `exists`.
    swap(&env, &name, noise(4096, 13)).await;
    let (status, body) = plan(&env, &name, good.len() as u64).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["exists"], false, "{body}");
    if backend == Backend::S3 {
        assert_eq!(body["headers"]["x-amz-checksum-sha256"].as_str().map(str::len), Some(44), "{body}");
    }
    assert_eq!(put_as(&env, &name, good.clone()).await / 100, 2);
    assert_eq!(plan(&env, &name, good.len() as u64).await.1, json!({ "exists": true }));

    // And once more with a download as the first to look: bytes that reach a browser straight
    // from S3 pass no check on the way, so the broker checks before it hands out a URL. (The
    // local directory belongs to the broker alone; it streams what the broker wrote.)
    if backend == Backend::S3 {
        swap(&env, &name, noise(4096, 14)).await;
        let (status, _) = get_bytes(&b.url(&format!("/f/{name}"))).await;
        assert_eq!(status, 404, "no presigned URL to bytes that do not match their name");
    }
}

#[tokio::test]
async fn s3_binds_each_presigned_upload_to_its_checksum() {
    let env = Env::start(Backend::S3);
    let good = b"bound to its checksum".to_vec();
    let name = sha(&good);
    let (_, answer) = plan(&env, &name, good.len() as u64).await;
    let url = answer["url"].as_str().unwrap().to_string();
    let checksum = answer["headers"]["x-amz-checksum-sha256"].as_str().unwrap().to_string();
    assert!(url.contains("x-amz-checksum-sha256"), "the header is among the signed ones: {url}");
    // Without the header the signature does not verify; with it, other bytes are refused.
    let r = http().put(&url).body(good.clone()).send().await.unwrap();
    assert_eq!(r.status(), 403, "{}", r.text().await.unwrap());
    let r = http().put(&url).header("x-amz-checksum-sha256", &checksum).body(b"other bytes, same url".to_vec());
    assert_eq!(r.send().await.unwrap().status(), 400);
    let (_, again) = plan(&env, &name, good.len() as u64).await;
    assert_eq!(again["exists"], false, "{again}");
    let r = http().put(&url).header("x-amz-checksum-sha256", &checksum).body(good.clone());
    assert_eq!(r.send().await.unwrap().status(), 200);
    assert_eq!(plan(&env, &name, good.len() as u64).await.1, json!({ "exists": true }));
}

#[tokio::test]
async fn s3_output_downloads_keep_their_headers() {
    let env = Env::start(Backend::S3);
    let b = &env.b;
    let mut w = Ws::worker(b.addr, "w1", 1, json!([])).await;
    let (status, body) = b.post("/q/q/j", json!({ "definition": { "image": "busybox", "command": "true" } })).await;
    assert_eq!(status, 201, "{body}");
    let id = body["jobId"].as_str().unwrap().to_string();
    w.recv_type("assign").await;
    let text = b"a result\n".repeat(100);
    let page = b"<html><script>document.title = 'ran'</script></html>".to_vec();
    let (sha_text, sha_page) = (upload(&env, &text).await, upload(&env, &page).await);
    w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    w.send(json!({"type": "finish", "data": {"jobId": id, "attempt": 1, "status": {"kind": "exited", "exitCode": 0},
    "outputs": [
        { "path": "out/résumé.txt", "size": text.len(), "sha256": sha_text },
        { "path": "report.html", "size": page.len(), "sha256": sha_page },
    ]}}))
    .await;
    w.recv_type("finishAck").await;

    let no_follow = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = no_follow.get(b.url(&format!("/j/{id}/outputs/out/r%C3%A9sum%C3%A9.txt"))).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&env.s3.as_ref().unwrap().endpoint), "{location}");
    let r = http().get(&location).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.headers()["content-disposition"], "inline; filename*=UTF-8''r%C3%A9sum%C3%A9%2Etxt");
    assert_eq!(r.headers()["cache-control"], "private, max-age=31536000, immutable");
    assert_eq!(r.bytes().await.unwrap().as_ref(), text.as_slice());

    // An HTML output never leaves through a presigned URL: S3 cannot be asked for the sandbox
    // CSP, so the broker serves it with that header.
    let r = no_follow.get(b.url(&format!("/j/{id}/outputs/report.html"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-security-policy"], "sandbox; default-src 'none'");
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(r.bytes().await.unwrap().as_ref(), page.as_slice());
}

/// A refused connection is retried for the documented 30 s before the caller gets `503`.
/// Real time on a port with nothing listening; the deadline bounds the test.
#[tokio::test]
async fn s3_requests_are_retried_for_thirty_seconds() {
    // A port found free on a loopback address no other test listens on (they take
    // 127.0.0.1:0), so it still refuses connections 30 s later.
    let port = std::net::TcpListener::bind("127.0.0.9:0").unwrap().local_addr().unwrap().port();
    let config = broker::blob::BlobConfig {
        backend: broker::blob::BlobBackend::S3(broker::blob::S3Config {
            bucket: "b".into(),
            endpoint: Some(format!("http://127.0.0.9:{port}")),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            ..Default::default()
        }),
        gc_interval: None,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = broker::blob::BlobStore::open(&config, dir.path()).unwrap();
    let started = std::time::Instant::now();
    let held = tokio::time::timeout(std::time::Duration::from_secs(90), store.held(&sha(b"x")))
        .await
        .expect("the store gives up within the deadline");
    let elapsed = started.elapsed();
    let err = held.unwrap_err();
    assert!(matches!(err, broker::blob::BlobError::Unavailable(_)), "{err}");
    assert!(elapsed >= broker::blob::S3_RETRY_WINDOW, "gave up after {elapsed:?}: {err}");
}
