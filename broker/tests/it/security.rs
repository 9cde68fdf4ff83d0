//! Who may reach the broker: the origin policy for browsers (HTTP and both websockets), closed
//! roles, scoped read links, the HTTP timeouts and the per-address connection cap.

use std::time::Duration;

use broker::access::AccessConfig;
use broker::auth::Tokens;
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::{TestBroker, Ws, config};

const EVIL: &str = "http://evil.example";
const APP: &str = "https://app.example.com";

fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

fn with_access(access: AccessConfig, tokens: Tokens) -> TestBroker {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.access = access;
    cfg.tokens = tokens;
    let mut b = TestBroker::start_with(cfg);
    b.keep(tmp);
    b
}

/// Opens a websocket with these extra headers; the HTTP status of a refused handshake.
async fn ws_status(b: &TestBroker, path: &str, headers: &[(&'static str, String)]) -> Result<(), u16> {
    let mut request = format!("ws://{}{path}", b.addr).into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected websocket error: {e}"),
    }
}

async fn job_count(b: &TestBroker) -> usize {
    let (status, body) = b.get("/q/local/j").await;
    assert_eq!(status, 200, "{body}");
    body["jobs"].as_array().unwrap().len()
}

#[tokio::test]
async fn a_foreign_page_cannot_drive_a_tokenless_broker() {
    let b = with_access(AccessConfig { allow_origins: vec![APP.into()], ..Default::default() }, Tokens::default());
    let job = json!({ "definition": { "image": "busybox", "command": "echo hi" } }).to_string();

    // A "simple" cross-origin request (no preflight in a browser) is refused, and nothing runs.
    let r = http()
        .post(b.url("/q/local/j"))
        .header("origin", EVIL)
        .header("content-type", "text/plain")
        .body(job.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--allow-origin"), "{body}");
    assert_eq!(job_count(&b).await, 0, "the refused request enqueued nothing");
    // Reads too: a page elsewhere learns nothing.
    let r = http().get(b.url("/q/local/j")).header("origin", EVIL).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // Its preflight gets no CORS answer.
    let r = http()
        .request(reqwest::Method::OPTIONS, b.url("/q/local/j"))
        .header("origin", EVIL)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // Both websockets refuse the handshake; `Origin: null` (a sandboxed frame) too.
    for path in ["/ws/client", "/ws/worker"] {
        assert_eq!(ws_status(&b, path, &[("origin", EVIL.into())]).await, Err(403), "{path}");
        assert_eq!(ws_status(&b, path, &[("origin", "null".into())]).await, Err(403), "{path}");
    }
    // DNS rebinding: a page whose name points at the broker is not its own origin.
    let r =
        http().get(b.url("/q/local/j")).header("host", format!("evil.example:{}", b.addr.port())).send().await.unwrap();
    assert_eq!(r.status(), 403);

    // The broker's own page works: same origin, HTTP and websocket.
    let own = format!("http://{}", b.addr);
    let r = http()
        .post(b.url("/q/local/j"))
        .header("origin", &own)
        .header("content-type", "application/json")
        .body(job.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("access-control-allow-origin").is_none(), "same origin needs no CORS");
    assert_eq!(ws_status(&b, "/ws/client", &[("origin", own.clone())]).await, Ok(()));
    // So does a program, which sends no Origin.
    assert_eq!(ws_status(&b, "/ws/worker", &[]).await, Ok(()));

    // An allowed origin gets a proper CORS answer, preflight included.
    let r = http()
        .request(reqwest::Method::OPTIONS, b.url("/q/local/j"))
        .header("origin", APP)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type, authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], APP);
    assert!(r.headers()["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    assert!(r.headers()["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
    let r = http()
        .post(b.url("/q/local/j"))
        .header("origin", APP)
        .header("content-type", "application/json")
        .body(json!({ "definition": { "image": "busybox", "command": "echo allowed" } }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["access-control-allow-origin"], APP);
    assert_eq!(ws_status(&b, "/ws/client", &[("origin", APP.into())]).await, Ok(()));
    assert_eq!(job_count(&b).await, 2);

    // The page tells itself whose messages to take, and may be framed anywhere by default.
    let (status, cfg) = b.get("/ui/config.json").await;
    assert_eq!(status, 200);
    assert_eq!(cfg, json!({ "allowOrigins": [APP] }));
    let r = http().get(b.url("/")).send().await.unwrap();
    assert_eq!(r.headers()["content-security-policy"], "frame-ancestors *");
}

#[tokio::test]
async fn a_role_without_a_token_is_closed_when_another_has_one() {
    let tokens = Tokens { client: Some("client-secret".into()), worker: None };
    let b = with_access(AccessConfig::default(), tokens);
    // No worker may connect, with no token or with the client's.
    for token in [None, Some("client-secret")] {
        let mut w = Ws::connect(b.addr, "/ws/worker", token).await;
        w.send(json!({"type": "hello", "data": {"protocol": 1, "workerId": "w1", "queues": ["q"], "slots": 1}})).await;
        let m = w.recv().await;
        assert_eq!(m["type"], "error", "{m}");
        assert!(m["data"]["message"].as_str().unwrap().contains("no worker token"), "{m}");
        assert_eq!(w.closed().await, protocol::close::UNAUTHORIZED);
    }
    // The file API wants a token: none gets 401, the client's works.
    let body = b"secret bytes".to_vec();
    let name = hex::encode(sha2::Sha256::digest(&body));
    let r = http().put(b.url(&format!("/f/{name}"))).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http().get(b.url(&format!("/f/{name}"))).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http().post(b.url("/f/gc")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http().put(b.url(&format!("/f/{name}"))).bearer_auth("client-secret").body(body).send().await.unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn read_links_open_one_job_for_a_while() {
    let tokens = Tokens { client: Some("c".into()), worker: Some("w".into()) };
    let b = with_access(AccessConfig::default(), tokens);
    let mut w = Ws::connect(b.addr, "/ws/worker", Some("w")).await;
    w.send(json!({"type": "hello", "data": {"protocol": 1, "workerId": "w1", "queues": ["q"], "slots": 2}})).await;
    assert_eq!(w.recv().await["type"], "welcome");
    let output = b"the result\n".to_vec();
    let sha = hex::encode(sha2::Sha256::digest(&output));
    let r = http().put(b.url(&format!("/f/{sha}"))).bearer_auth("w").body(output.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let mut ids = Vec::new();
    for n in 0..2 {
        let r = http()
            .post(b.url("/q/q/j"))
            .bearer_auth("c")
            .json(&json!({ "definition": { "image": "busybox", "command": format!("echo {n}") } }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let id = r.json::<Value>().await.unwrap()["jobId"].as_str().unwrap().to_string();
        let assign = w.recv_type("assign").await;
        let attempt = &assign["data"]["attempt"];
        w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": attempt}})).await;
        w.send(json!({"type": "logs", "data": {"jobId": id, "attempt": attempt, "lines": [{"stream": "stdout", "time": 1, "text": "hello\n"}]}})).await;
        w.send(json!({"type": "finish", "data": {"jobId": id, "attempt": attempt, "status": {"kind": "exited", "exitCode": 0},
            "outputs": [{ "path": "out/result.txt", "size": output.len(), "sha256": sha }]}}))
        .await;
        w.recv_type("finishAck").await;
        ids.push(id);
    }
    let (a, other) = (&ids[0], &ids[1]);

    // Without a token, nothing.
    for path in [format!("/j/{a}"), format!("/j/{a}/logs"), format!("/j/{a}/outputs/out/result.txt")] {
        assert_eq!(http().get(b.url(&path)).send().await.unwrap().status(), 401, "{path}");
    }
    // Making a link needs the client token.
    assert_eq!(http().post(b.url(&format!("/j/{a}/link"))).send().await.unwrap().status(), 401);
    let r = http().post(b.url(&format!("/j/{a}/link?ttl=600"))).bearer_auth("c").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let link: Value = r.json().await.unwrap();
    let query = link["query"].as_str().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let expires = link["expires"].as_u64().unwrap();
    assert!((now + 590..=now + 601).contains(&expires), "{link}");
    assert!(!query.contains("token"), "{query}");

    // The link reads that job: its view, its log and its outputs.
    let (status, view) = get(&b, link["job"].as_str().unwrap()).await;
    assert_eq!((status, view["id"].as_str()), (200, Some(a.as_str())));
    let (status, logs) = get(&b, link["logs"].as_str().unwrap()).await;
    assert_eq!((status, logs["lines"][0]["text"].as_str()), (200, Some("hello\n")));
    let out = link["outputs"]["out/result.txt"].as_str().unwrap();
    let r = http().get(b.url(out)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), output.as_slice());

    // A read link is a bearer capability handed to other origins (a downstream metaframe):
    // any page may read through it, while the same endpoints without it stay closed to them.
    for path in [link["job"].as_str().unwrap(), link["logs"].as_str().unwrap(), out] {
        let r = http().get(b.url(path)).header("origin", EVIL).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["access-control-allow-origin"], "*", "{path}");
    }
    let r = http().get(b.url(&format!("/j/{a}/logs"))).header("origin", EVIL).bearer_auth("c").send().await.unwrap();
    assert_eq!(r.status(), 403, "without a link the origin policy holds");
    let r = http().get(b.url(&format!("/j/{other}/logs?{query}"))).header("origin", EVIL).send().await.unwrap();
    assert_eq!(r.status(), 403, "a link for another job reads nothing, from any origin");

    // Not another job, not another endpoint, not with a changed expiry, not as a token.
    for path in [
        format!("/j/{other}?{query}"),
        format!("/j/{other}/logs?{query}"),
        format!("/j/{other}/outputs/out/result.txt?{query}"),
        format!("/f/{sha}?{query}"),
        format!("/j/{a}/logs?{}", query.replace(&expires.to_string(), &(expires + 3600).to_string())),
    ] {
        assert_eq!(http().get(b.url(&path)).send().await.unwrap().status(), 403, "{path}");
    }
    for path in [format!("/j/{a}/definition?{query}"), "/q/q/j".to_string()] {
        let status = http().get(b.url(&path)).send().await.unwrap().status();
        assert!(status == 401 || status == 400, "{path}: {status}");
    }
    assert_eq!(http().post(b.url(&format!("/j/{a}/cancel?{query}"))).send().await.unwrap().status(), 401);
    // A link's life is bounded.
    let r = http().post(b.url(&format!("/j/{a}/link?ttl=99999999"))).bearer_auth("c").send().await.unwrap();
    assert_eq!(r.status(), 400);
}

async fn get(b: &TestBroker, path: &str) -> (u16, Value) {
    let r = http().get(b.url(path)).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Reads until the broker closes the connection; returns what it sent.
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The broker in this test's runtime, so its timers run on the test's paused clock.
async fn paused_broker(access: AccessConfig) -> (std::net::SocketAddr, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.access = access;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(broker::run(listener, cfg, std::future::pending()));
    (addr, tmp)
}

#[tokio::test(start_paused = true)]
async fn stalled_requests_are_closed_within_the_timeouts() {
    let access = AccessConfig::default();
    let (header_timeout, body_timeout) = (access.header_read_timeout, access.body_read_timeout);
    let (addr, _tmp) = paused_broker(access).await;
    let slack = Duration::from_secs(1);

    // Silent, and half-sent headers: closed at the header timeout.
    for sent in ["", "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t0 = tokio::time::Instant::now();
        s.write_all(sent.as_bytes()).await.unwrap();
        assert_eq!(read_to_close(&mut s).await, "", "{sent:?}");
        let took = t0.elapsed();
        assert!(took >= header_timeout && took <= header_timeout + slack, "{sent:?}: closed after {took:?}");
    }

    // Idle after a complete request: kept alive only as long as the header timeout.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let t0 = tokio::time::Instant::now();
    let answer = read_to_close(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let took = t0.elapsed();
    assert!(took >= header_timeout && took <= header_timeout + slack, "idle keep-alive closed after {took:?}");

    // A body that stops half way: answered with an error at the body timeout, then closed.
    for path in ["/q/local/j", &format!("/f/{}", "0".repeat(64))] {
        let method = if path.starts_with("/f/") { "PUT" } else { "POST" };
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{{\"defin");
        s.write_all(head.as_bytes()).await.unwrap();
        let t0 = tokio::time::Instant::now();
        let answer = read_to_close(&mut s).await;
        let took = t0.elapsed();
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("no part of the request body arrived"), "{path}: {answer}");
        assert!(took >= body_timeout && took <= body_timeout + slack, "{path}: closed after {took:?}");
    }
}

#[tokio::test]
async fn one_address_may_hold_only_so_many_connections() {
    let b = with_access(AccessConfig { max_connections_per_address: 2, ..Default::default() }, Tokens::default());
    let mut first = Ws::client(b.addr).await;
    let _second = Ws::client(b.addr).await;
    // The third is closed at once, before a byte is read.
    let mut third = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    assert_eq!(tokio::time::timeout(crate::common::WAIT, read_to_close(&mut third)).await.unwrap(), "");
    // A closed socket frees its place.
    first.send_raw(tokio_tungstenite::tungstenite::Message::Close(None)).await;
    first.closed().await;
    let r = crate::common::WAIT;
    let admitted = tokio::time::timeout(r, async {
        loop {
            let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.unwrap();
            if read_to_close(&mut s).await.starts_with("HTTP/1.1 200") {
                return;
            }
        }
    })
    .await;
    assert!(admitted.is_ok(), "the freed place was never given again");
}

#[tokio::test]
async fn healthz_says_when_a_broker_runs_open_on_purpose() {
    let b = with_access(AccessConfig { insecure_no_auth: true, ..Default::default() }, Tokens::default());
    let text = reqwest::get(b.url("/healthz")).await.unwrap().text().await.unwrap();
    assert!(text.starts_with("ok\n") && text.contains("insecure"), "{text}");
    let b = with_access(AccessConfig::default(), Tokens { client: Some("c".into()), worker: Some("w".into()) });
    assert_eq!(reqwest::get(b.url("/healthz")).await.unwrap().text().await.unwrap(), "ok\n");
}
