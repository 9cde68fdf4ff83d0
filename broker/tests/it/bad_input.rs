//! Bad input gets a clear error and loses nothing: malformed and oversized messages, unknown
//! types and fields, worker messages on a client socket, and wrong tokens.

use broker::auth::Tokens;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{TestBroker, Ws, config};

#[tokio::test]
async fn bad_websocket_messages_are_answered_and_the_socket_keeps_working() {
    let b = TestBroker::start();
    let mut c = Ws::client(b.addr).await;
    c.send_raw(Message::text("{not json")).await;
    assert_eq!(c.recv_type("error").await["data"]["code"], "badMessage");
    c.send(json!({"type": "explode", "data": {}})).await;
    let e = c.recv_type("error").await;
    assert!(e["data"]["message"].as_str().unwrap().contains("unknown variant `explode`"), "{e}");
    // A worker message on a client socket is not a client message.
    c.send(json!({"type": "finish", "data": {"jobId": "a".repeat(64), "attempt": 1, "status": {"kind": "exited", "exitCode": 0}}})).await;
    assert_eq!(c.recv_type("error").await["data"]["code"], "badMessage");
    // An unknown definition field names itself.
    c.send(json!({"type": "submit", "data": {"request": 7, "queue": "q", "definition": {"image": "busybox", "colour": "red"}}})).await;
    let e = c.recv_type("error").await;
    assert_eq!(e["data"]["code"], "invalidDefinition", "{e}");
    assert!(e["data"]["message"].as_str().unwrap().contains("colour"), "{e}");
    // A valid submission on the same socket still works and is acknowledged with its request.
    c.send(json!({"type": "submit", "data": {"request": 8, "queue": "q", "definition": {"image": "busybox", "command": "true"}}})).await;
    let ok = c.recv_type("submitted").await;
    assert_eq!(ok["data"]["request"], 8);
    assert_eq!(ok["data"]["outcome"], "created");
    let e = {
        c.send(json!({"type": "submit", "data": {"request": 9, "queue": "q", "definition": {"image": "Not Valid"}}}))
            .await;
        c.recv_type("error").await
    };
    assert_eq!((e["data"]["code"].as_str(), e["data"]["request"].as_u64()), (Some("invalidDefinition"), Some(9)));
}

#[tokio::test]
async fn an_oversized_frame_closes_the_socket_with_1009_and_loses_nothing() {
    let b = TestBroker::start();
    let (_, body) = b.submit("q", "echo kept", json!({})).await;
    let mut c = Ws::client(b.addr).await;
    // A submission acknowledged on the same socket just before the oversized frame.
    c.send(json!({"type": "submit", "data": {"request": 1, "queue": "q", "definition": {"image": "busybox", "command": "echo acked"}}})).await;
    let acked = c.recv_type("submitted").await["data"]["job"]["id"].as_str().unwrap().to_string();
    let huge = "x".repeat(protocol::MAX_WS_MESSAGE + 1);
    c.send_raw(Message::text(format!("{{\"type\":\"watchQueue\",\"data\":{{\"queue\":\"{huge}\"}}}}"))).await;
    // The broker reads the rest of the frame before it hangs up, so the sender sees the close
    // frame (not a reset) and its code.
    assert_eq!(c.closed().await, 1009);
    for id in [body["jobId"].as_str().unwrap(), &acked] {
        let (status, job) = b.get(&format!("/j/{id}")).await;
        assert_eq!((status, job["state"].as_str()), (200, Some("queued")), "{id}");
    }
}

#[tokio::test]
async fn a_socket_must_start_with_a_hello_of_the_right_version() {
    let b = TestBroker::start();
    let mut c = Ws::connect(b.addr, "/ws/client", None).await;
    c.send(json!({"type": "watchQueue", "data": {"queue": "q"}})).await;
    assert_eq!(c.recv_type("error").await["data"]["code"], "badMessage");
    assert_eq!(c.closed().await, protocol::close::BAD_HELLO);
    let mut w = Ws::connect(b.addr, "/ws/worker", None).await;
    w.send(json!({"type": "hello", "data": {"protocol": 99, "workerId": "w", "queues": ["q"], "slots": 1}})).await;
    assert_eq!(w.recv_type("error").await["data"]["code"], "versionMismatch");
    assert_eq!(w.closed().await, protocol::close::VERSION_MISMATCH);
}

#[tokio::test]
async fn bad_http_requests_get_json_errors_with_the_right_status() {
    let b = TestBroker::start();
    let http = reqwest::Client::new();
    let post =
        |body: &'static str| http.post(b.url("/q/q/j")).header("content-type", "application/json").body(body).send();
    let r = post("{\"definition\":").await.unwrap();
    assert_eq!(r.status(), 400);
    let r = post(r#"{"definition":{"image":"busybox","memory":"1g"}}"#).await.unwrap();
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalidDefinition");
    assert!(body["error"]["message"].as_str().unwrap().contains("definition.memory"), "{body}");
    let r = post(r#"{"definition":{"image":"busybox"},"extra":1}"#).await.unwrap();
    assert_eq!(r.status(), 422);
    let big = format!(r#"{{"definition":{{"image":"busybox","env":{{"A":"{}"}}}}}}"#, "x".repeat(70_000));
    let r = http.post(b.url("/q/q/j")).body(big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(b.get("/j/not-an-id").await.0, 400);
    assert_eq!(b.get(&format!("/j/{}", "b".repeat(64))).await.0, 404);
    assert_eq!(b.get("/nowhere").await.0, 404);
    let r = http.post(b.url("/q/bad%20queue/j")).body(r#"{"definition":{"image":"busybox"}}"#).send().await.unwrap();
    assert_eq!(r.status(), 422);
    // Nothing of the above was stored.
    assert_eq!(b.get("/q/q").await.1["queued"], 0);
}

#[tokio::test]
async fn tokens_are_enforced_per_role() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.tokens = Tokens { client: Some("client-secret".into()), worker: Some("worker-secret".into()) };
    let b = TestBroker::start_with(cfg);
    let http = reqwest::Client::new();
    let body = json!({"definition": {"image": "busybox"}});
    let r = http.post(b.url("/q/q/j")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.post(b.url("/q/q/j")).bearer_auth("wrong").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http.post(b.url("/q/q/j")).bearer_auth("worker-secret").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 403, "a worker token is not a client token");
    let r = http.post(b.url("/q/q/j")).bearer_auth("client-secret").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(b.get("/healthz").await.0, 200);
    // Websockets: a wrong token is refused with 4001; the right one in the hello works.
    let mut w = Ws::connect(b.addr, "/ws/worker", None).await;
    w.send(json!({"type": "hello", "data": {"protocol": 1, "token": "client-secret", "workerId": "w", "queues": ["q"], "slots": 1}})).await;
    assert_eq!(w.recv_type("error").await["data"]["code"], "forbidden");
    assert_eq!(w.closed().await, protocol::close::UNAUTHORIZED);
    let mut w = Ws::connect(b.addr, "/ws/worker", Some("worker-secret")).await;
    w.send(json!({"type": "hello", "data": {"protocol": 1, "workerId": "w", "queues": ["q"], "slots": 1}})).await;
    assert_eq!(w.recv().await["type"], "welcome");
    assert_eq!(w.recv_type("assign").await["data"]["attempt"], 1);
    let mut c = Ws::connect(b.addr, "/ws/client", None).await;
    c.send(json!({"type": "hello", "data": {"protocol": 1}})).await;
    assert_eq!(c.recv_type("error").await["data"]["code"], "unauthorized");
    assert_eq!(c.closed().await, protocol::close::UNAUTHORIZED);
}
