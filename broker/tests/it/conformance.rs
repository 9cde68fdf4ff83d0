//! The documentation, run: every ```` ```json ```` block of `docs/protocol.md` and
//! `docs/http-api.md` is a transcript that is replayed against a real broker, so the documents
//! cannot drift from what the broker does. The convention is written at the top of each
//! document; in short:
//!
//! - `→ client {…}` / `→ worker {…}` sends a message on that websocket (`/ws/client` or
//!   `/ws/worker`, opened at first use; `client2`, `worker-b`… open more sockets).
//! - `← client {…}` waits for a message on that socket that matches the example, among those
//!   not matched yet; an `error` arriving while the example expects something else fails.
//! - `→ GET /path` (or any method, then an optional JSON body) sends an HTTP request;
//!   `← 201 {…}` is its answer (status, then an optional JSON body). A request with no answer
//!   line must succeed.
//! - A JSON value may continue over the following lines.
//!
//! Matching: an object must have exactly the example's keys unless it has a key `"…"`; a string
//! with `…` in it matches any text in its place; a number matches any number; an array matches
//! element by element as far as the example goes; everything else must be equal.
//! Each block runs against a fresh broker.

use std::collections::HashMap;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::{TestBroker, WAIT};

/// The documents whose examples are run, relative to the workspace root.
const DOCS: &[&str] = &["docs/protocol.md", "docs/http-api.md"];

/// The ellipsis that stands for "anything" in an example.
const ANY: char = '…';

#[derive(Debug)]
enum Step {
    Send { socket: String, msg: Value },
    Expect { socket: String, msg: Value },
    Request { method: reqwest::Method, path: String, body: Option<Value> },
    Answer { status: u16, body: Option<Value> },
}

#[derive(Debug)]
struct Block {
    /// `docs/file.md:line` of the opening fence, for failure messages.
    at: String,
    steps: Vec<(usize, Step)>,
}

#[tokio::test]
async fn every_example_in_the_protocol_and_http_docs_runs_against_the_broker() {
    let mut ran = 0;
    for doc in DOCS {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/..").to_string() + "/" + doc;
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {doc}: {e}"));
        let blocks = parse_doc(doc, &text);
        assert!(blocks.len() >= 3, "{doc} has only {} examples; the extraction is broken", blocks.len());
        for block in &blocks {
            run(block).await;
            ran += 1;
        }
    }
    eprintln!("{ran} documented examples replayed");
}

/// Every fenced block whose info string starts with `json`, parsed into steps.
fn parse_doc(doc: &str, text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else { continue };
        let is_json = info.split_whitespace().next() == Some("json");
        let mut body = Vec::new();
        for (m, l) in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            body.push((m + 1, l));
        }
        if is_json {
            let at = format!("{doc}:{}", n + 1);
            blocks.push(Block { steps: parse_block(&at, &body), at });
        }
    }
    blocks
}

fn parse_block(at: &str, body: &[(usize, &str)]) -> Vec<(usize, Step)> {
    // Statements start with an arrow; other lines continue the JSON of the one before.
    let mut statements: Vec<(usize, String)> = Vec::new();
    for (n, line) in body {
        let trimmed = line.trim();
        if trimmed.starts_with('→') || trimmed.starts_with('←') {
            statements.push((*n, trimmed.to_string()));
        } else if let Some(last) = statements.last_mut() {
            last.1.push('\n');
            last.1.push_str(line);
        } else if !trimmed.is_empty() {
            panic!(
                "{at}: a ```json block in this document is a transcript: every statement starts with → or ← \
                 (see the top of the document); line {n} does not"
            );
        }
    }
    assert!(!statements.is_empty(), "{at}: empty example");
    statements.into_iter().map(|(n, s)| (n, parse_statement(at, n, &s))).collect()
}

fn parse_statement(at: &str, n: usize, s: &str) -> Step {
    let json = |rest: &str| -> Option<Value> {
        let rest = rest.trim();
        (!rest.is_empty())
            .then(|| serde_json::from_str(rest).unwrap_or_else(|e| panic!("{at}, line {n}: not JSON ({e}):\n{rest}")))
    };
    let (arrow, rest) = s.split_at(s.char_indices().nth(1).map(|(i, _)| i).unwrap_or(s.len()));
    let rest = rest.trim_start();
    let (word, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    match arrow {
        "→" => match word.parse::<reqwest::Method>() {
            Ok(method) if word.chars().all(|c| c.is_ascii_uppercase()) => {
                let tail = tail.trim_start();
                let (path, body) = tail.split_once(char::is_whitespace).unwrap_or((tail, ""));
                assert!(path.starts_with('/'), "{at}, line {n}: `{word}` wants a path");
                Step::Request { method, path: path.to_string(), body: json(body) }
            }
            _ => Step::Send {
                socket: word.to_string(),
                msg: json(tail).unwrap_or_else(|| panic!("{at}, line {n}: a message to send")),
            },
        },
        _ => match word.parse::<u16>() {
            Ok(status) => Step::Answer { status, body: json(tail) },
            Err(_) => Step::Expect {
                socket: word.to_string(),
                msg: json(tail).unwrap_or_else(|| panic!("{at}, line {n}: a message to expect")),
            },
        },
    }
}

/// A websocket of the transcript and the messages received on it but not matched yet.
struct Socket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    backlog: Vec<Value>,
}

async fn run(block: &Block) {
    let broker = TestBroker::start();
    let http = reqwest::Client::new();
    // Until the (empty) log is recovered, `/readyz` and `/metrics` answer 503; examples show a
    // broker that is up.
    let started = std::time::Instant::now();
    while http.get(broker.url("/readyz")).send().await.unwrap().status() != 200 {
        assert!(started.elapsed() < WAIT, "{}: the broker never became ready", block.at);
        tokio::task::yield_now().await;
    }
    let mut sockets: HashMap<String, Socket> = HashMap::new();
    let mut steps = block.steps.iter().peekable();
    while let Some((n, step)) = steps.next() {
        let at = format!("{}, line {n}", block.at);
        match step {
            Step::Send { socket, msg } => {
                let ws = open(&mut sockets, &broker, socket, &at).await;
                ws.ws.send(Message::text(msg.to_string())).await.unwrap_or_else(|e| panic!("{at}: sending: {e}"));
            }
            Step::Expect { socket, msg } => {
                let ws = open(&mut sockets, &broker, socket, &at).await;
                expect(ws, msg, &at).await;
            }
            Step::Request { method, path, body } => {
                let mut req = http.request(method.clone(), broker.url(path));
                if let Some(b) = body {
                    req = req.json(b);
                }
                let resp = req.send().await.unwrap_or_else(|e| panic!("{at}: {method} {path}: {e}"));
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                match steps.peek() {
                    Some((_, Step::Answer { status: want, body })) => {
                        steps.next();
                        assert_eq!(status, *want, "{at}: {method} {path} answered:\n{text}");
                        if let Some(want) = body {
                            let got: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
                                panic!("{at}: {method} {path}: the answer is not JSON ({e}):\n{text}")
                            });
                            if let Err(e) = fits(want, &got, "") {
                                panic!("{at}: {method} {path}: {e}\nanswer:\n{got:#}");
                            }
                        }
                    }
                    _ => assert!(status < 400, "{at}: {method} {path} answered {status}:\n{text}"),
                }
            }
            Step::Answer { .. } => panic!("{at}: an answer line must follow a request"),
        }
    }
}

/// The socket called `name`, opened on first use: `client…` names open `/ws/client`,
/// `worker…` names `/ws/worker`.
async fn open<'a>(
    sockets: &'a mut HashMap<String, Socket>,
    broker: &TestBroker,
    name: &str,
    at: &str,
) -> &'a mut Socket {
    if !sockets.contains_key(name) {
        let path = if name.starts_with("client") {
            "/ws/client"
        } else if name.starts_with("worker") {
            "/ws/worker"
        } else {
            panic!("{at}: `{name}` is neither a method nor a socket (client…, worker…)")
        };
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}{path}", broker.addr))
            .await
            .unwrap_or_else(|e| panic!("{at}: connecting to {path}: {e}"));
        sockets.insert(name.to_string(), Socket { ws, backlog: Vec::new() });
    }
    sockets.get_mut(name).unwrap()
}

/// Waits for a message matching `want`: first among those received earlier and not matched
/// yet (messages of different sockets and kinds interleave), then among new ones. An `error`
/// arriving while the example expects something else fails at once.
async fn expect(socket: &mut Socket, want: &Value, at: &str) {
    if let Some(i) = socket.backlog.iter().position(|got| fits(want, got, "").is_ok()) {
        socket.backlog.remove(i);
        return;
    }
    let Socket { ws, backlog } = socket;
    let wait = async {
        loop {
            let msg = match ws.next().await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(c))) => panic!("{at}: the socket closed ({c:?}) while waiting for:\n{want:#}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("{at}: socket error while waiting: {e}"),
                None => panic!("{at}: the socket ended while waiting for:\n{want:#}"),
            };
            let got: Value = serde_json::from_str(&msg).unwrap_or_else(|e| panic!("{at}: not JSON ({e}): {msg}"));
            if fits(want, &got, "").is_ok() {
                return;
            }
            if got["type"] == "error" && want["type"] != "error" {
                panic!("{at}: the broker answered an error while waiting for:\n{want:#}\nerror: {got}")
            }
            backlog.push(got);
        }
    };
    if tokio::time::timeout(WAIT, wait).await.is_err() {
        let near_misses: Vec<String> = backlog
            .iter()
            .filter(|got| got["type"] == want["type"])
            .map(|got| format!("{}\n  in {got}", fits(want, got, "").unwrap_err()))
            .collect();
        panic!(
            "{at}: no message matched within {WAIT:?}:\n{want:#}\nmessages of that type that did not:\n{}",
            near_misses.join("\n")
        );
    }
}

/// Whether `got` fits the example `want` (the rules are at the top of this file).
fn fits(want: &Value, got: &Value, path: &str) -> Result<(), String> {
    let here = if path.is_empty() { "the message" } else { path };
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            let open = w.contains_key(&ANY.to_string());
            for (k, wv) in w.iter().filter(|(k, _)| k.as_str() != ANY.to_string()) {
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                let gv = g.get(k).ok_or_else(|| format!("`{sub}` is documented but missing"))?;
                fits(wv, gv, &sub)?;
            }
            if !open && let Some(k) = g.keys().find(|k| !w.contains_key(*k)) {
                return Err(format!("`{here}` has `{k}`, which the example does not show"));
            }
            Ok(())
        }
        (Value::Array(w), Value::Array(g)) => {
            if g.len() < w.len() {
                return Err(format!("`{here}` has {} elements, the example {}", g.len(), w.len()));
            }
            w.iter().zip(g).enumerate().try_for_each(|(i, (w, g))| fits(w, g, &format!("{path}[{i}]")))
        }
        (Value::String(w), Value::String(g)) if w.contains(ANY) => {
            glob(w, g).then_some(()).ok_or_else(|| format!("`{here}` is {g:?}, the example {w:?}"))
        }
        (Value::Number(_), Value::Number(_)) => Ok(()),
        (w, g) if w == g => Ok(()),
        (w, g) => Err(format!("`{here}` is {g}, the example {w}")),
    }
}

/// `…` in `pattern` stands for any text.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split(ANY).collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

#[test]
fn the_matching_rules_do_what_the_documents_say() {
    use serde_json::json;
    assert!(glob("f06a…", "f06afc"));
    assert!(glob("`definition.colour`: …", "`definition.colour`: unknown field"));
    assert!(!glob("f06a…", "e06a"));
    assert!(glob("a…b…c", "a-b-c") && !glob("a…b…c", "a-c"));
    assert!(fits(&json!({"a": 1, "b": "x…"}), &json!({"a": 7, "b": "xyz"}), "").is_ok());
    assert!(fits(&json!({"a": 1}), &json!({"a": 1, "extra": 2}), "").unwrap_err().contains("extra"));
    assert!(fits(&json!({"a": 1, "…": "…"}), &json!({"a": 1, "extra": 2}), "").is_ok());
    assert!(fits(&json!({"a": 1, "b": []}), &json!({"a": 1}), "").unwrap_err().contains("`b`"));
    assert!(fits(&json!({"s": "queued"}), &json!({"s": "running"}), "").is_err());
    assert!(fits(&json!([{"a": 1}]), &json!([]), "").is_err());
    let blocks = parse_doc(
        "t.md",
        "x\n```json\n→ POST /q/q/j {\"a\":\n  1}\n← 201\n→ client {\"type\": \"hello\"}\n```\n```sh\nnot checked\n```\n",
    );
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].at, "t.md:2");
    assert!(matches!(&blocks[0].steps[0].1, Step::Request { body: Some(b), .. } if b["a"] == 1));
    assert!(matches!(&blocks[0].steps[1].1, Step::Answer { status: 201, body: None }));
    assert!(matches!(&blocks[0].steps[2].1, Step::Send { socket, .. } if socket == "client"));
}

/// `heartbeat` and `drain` carry no payload; `data` may be absent, `null` or `{}`, and a worker
/// that drains with `{}` is drained (its queue's watchers see it).
#[tokio::test]
async fn unit_messages_accept_data_absent_null_or_empty() {
    use serde_json::json;
    let b = TestBroker::start();
    let mut c = crate::common::Ws::client(b.addr).await;
    c.send(json!({"type": "watchQueue", "data": {"queue": "q"}})).await;
    c.recv_type("queueSnapshot").await;
    let mut w = crate::common::Ws::worker(b.addr, "w", 1, json!([])).await;
    w.send(json!({"type": "heartbeat"})).await;
    w.send(json!({"type": "heartbeat", "data": null})).await;
    w.send(json!({"type": "heartbeat", "data": {}})).await;
    w.send(json!({"type": "drain", "data": {}})).await;
    // Replies to inbound messages keep their order: if any of the above had been refused, its
    // error would arrive before this one.
    w.send(json!({"type": "marker", "data": {}})).await;
    let e = w.recv_type("error").await;
    assert!(e["data"]["message"].as_str().unwrap().contains("unknown variant `marker`"), "{e}");
    loop {
        let u = c.recv_type("queueWorkers").await;
        if u["data"]["workers"][0]["draining"] == true {
            break;
        }
    }
    // Drained: a new job is not assigned to it but stays queued.
    let (_, body) = b.submit("q", "echo after drain", json!({})).await;
    assert_eq!(body["job"]["state"], "queued");
}

/// `request` is an unsigned integer; every error about a message that has one echoes it, and a
/// `request` of the wrong type is named in the error.
#[tokio::test]
async fn errors_echo_the_request_whenever_it_could_be_read() {
    use serde_json::json;
    let b = TestBroker::start();
    let mut c = crate::common::Ws::client(b.addr).await;
    c.send(json!({"type": "cancel", "data": {"request": 5, "jobId": "not-an-id"}})).await;
    let e = c.recv_type("error").await;
    assert_eq!((e["data"]["code"].as_str(), e["data"]["request"].as_u64()), (Some("badMessage"), Some(5)), "{e}");
    c.send(json!({"type": "cancel", "data": {"request": 6, "jobId": "b".repeat(64)}})).await;
    let e = c.recv_type("error").await;
    assert_eq!((e["data"]["code"].as_str(), e["data"]["request"].as_u64()), (Some("notFound"), Some(6)), "{e}");
    c.send(json!({"type": "submit", "data": {"request": 7, "queue": "bad queue", "definition": {"image": "busybox"}}}))
        .await;
    let e = c.recv_type("error").await;
    assert_eq!(e["data"]["request"], 7, "{e}");
    c.send(json!({"type": "submit", "data": {"request": "a", "queue": "q", "definition": {"image": "busybox"}}})).await;
    let e = c.recv_type("error").await;
    assert!(e["data"]["message"].as_str().unwrap().starts_with("`request`:"), "{e}");
    assert!(e["data"].get("request").is_none(), "{e}");
}

/// The same mistake gets the same error over HTTP and websocket, with paths from the
/// submission's root (`definition.…`).
#[tokio::test]
async fn http_and_websocket_report_the_same_mistake_in_the_same_words() {
    use serde_json::json;
    let b = TestBroker::start();
    let mut c = crate::common::Ws::client(b.addr).await;
    let missing_blob = json!({"type": "blob", "sha256": "c".repeat(64), "size": 3});
    for definition in [
        json!({"image": "busybox", "colour": "red"}),
        json!({"image": "Not Valid"}),
        json!({"image": "busybox", "resources": {"memory": "lots"}}),
        json!({"image": "busybox", "inputs": {"a.txt": missing_blob}}),
        json!({"image": "busybox", "build": {"dockerfile": "FROM scratch"}}),
    ] {
        let (status, http) = b.post("/q/q/j", json!({ "definition": definition })).await;
        c.send(json!({"type": "submit", "data": {"queue": "q", "definition": definition}})).await;
        let ws = c.recv_type("error").await;
        assert_eq!(status, 422, "{http}");
        assert_eq!(http["error"]["code"], ws["data"]["code"], "{definition}");
        assert_eq!(http["error"]["message"], ws["data"]["message"], "{definition}");
        assert!(http["error"]["message"].as_str().unwrap().starts_with("`definition"), "{http}");
    }
}

/// Fields the documents list without `?` are present even when empty.
#[tokio::test]
async fn documented_fields_are_present_when_empty() {
    use serde_json::json;
    let b = TestBroker::start();
    let (_, body) = b.submit("q", "echo fields", json!({})).await;
    for field in ["namespaces", "outputs"] {
        assert_eq!(body["job"][field], json!([]), "{body}");
    }
    let mut c = crate::common::Ws::client(b.addr).await;
    let _w = crate::common::Ws::worker(b.addr, "w", 1, json!([])).await;
    c.send(json!({"type": "watchQueue", "data": {"queue": "q"}})).await;
    let snapshot = c.recv_type("queueSnapshot").await;
    assert_eq!(snapshot["data"]["workers"][0]["tags"], json!([]), "{snapshot}");
}
