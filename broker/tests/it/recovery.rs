//! Durability: acknowledged work survives the broker being dropped without a shutdown, a torn
//! log tail is cut off without losing acknowledged records, and logs written by format
//! version 1 stay readable.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common::{TestBroker, Ws};

fn newest_log(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("log-"))
        .collect();
    logs.sort();
    logs.pop().expect("a log file")
}

/// Submits 50 jobs, runs two of them to an end, crashes, and checks every acknowledged job.
async fn busy_then_crash() -> (tempfile::TempDir, Vec<String>) {
    let b = TestBroker::start();
    let mut ids = Vec::new();
    for i in 0..50 {
        let (status, body) = b.submit("q", &format!("echo {i}"), json!({})).await;
        assert_eq!(status, 201);
        ids.push(body["jobId"].as_str().unwrap().to_string());
    }
    let mut w = Ws::worker(b.addr, "w1", 2, json!([])).await;
    let a = w.recv_type("assign").await["data"]["jobId"].as_str().unwrap().to_string();
    let c = w.recv_type("assign").await["data"]["jobId"].as_str().unwrap().to_string();
    assert_eq!((a.as_str(), c.as_str()), (ids[0].as_str(), ids[1].as_str()));
    w.send(json!({"type": "accept", "data": {"jobId": a, "attempt": 1}})).await;
    w.send(json!({"type": "logs", "data": {"jobId": a, "attempt": 1, "lines": [{"stream": "stdout", "time": 1, "text": "kept"}]}})).await;
    w.send(json!({"type": "finish", "data": {"jobId": a, "attempt": 1, "status": {"kind": "exited", "exitCode": 0}}}))
        .await;
    w.recv_type("finishAck").await;
    let (status, _) = b.post(&format!("/j/{}/cancel", ids[2]), json!({})).await;
    assert_eq!(status, 200);
    (b.crash(), ids)
}

async fn check_after_restart(b: &TestBroker, ids: &[String]) {
    let (_, first) = b.get(&format!("/j/{}", ids[0])).await;
    assert_eq!(first["reason"], "succeeded", "{first}");
    let (_, logs) = b.get(&format!("/j/{}/logs", ids[0])).await;
    assert_eq!(logs["lines"][0]["text"], "kept");
    assert_eq!(b.get(&format!("/j/{}", ids[2])).await.1["reason"], "cancelled");
    // The job that was assigned to the vanished worker is queued again, with a higher attempt
    // waiting for it.
    let (_, second) = b.get(&format!("/j/{}", ids[1])).await;
    assert_eq!(second["state"], "queued", "{second}");
    assert_eq!(second["attempt"], 1);
    for id in &ids[3..] {
        let (status, job) = b.get(&format!("/j/{id}")).await;
        assert_eq!((status, job["state"].as_str()), (200, Some("queued")), "{id}");
    }
    let mut w = Ws::worker(b.addr, "w2", 1, json!([])).await;
    let assign = w.recv_type("assign").await;
    assert_eq!(assign["data"]["jobId"], ids[1].as_str());
    assert_eq!(assign["data"]["attempt"], 2);
}

#[tokio::test]
async fn acknowledged_jobs_survive_a_crash() {
    let (dir, ids) = busy_then_crash().await;
    let b = TestBroker::restart(dir);
    check_after_restart(&b, &ids).await;
    // And once more, now from the snapshot taken after the first recovery.
    let dir = b.crash();
    let b = TestBroker::restart(dir);
    assert_eq!(b.get(&format!("/j/{}", ids[0])).await.1["reason"], "succeeded");
    assert_eq!(
        b.get("/q/q").await.1["queued"].as_u64().unwrap() + b.get("/q/q").await.1["assigned"].as_u64().unwrap(),
        48
    );
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_and_nothing_acknowledged_is_lost() {
    for garbage in [
        // A record header promising more bytes than follow.
        vec![200, 0, 0, 0, 1, 2, 3, 4, 9, 9],
        // A complete record whose checksum is wrong.
        vec![3, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3],
        // Half a record header.
        vec![7, 0],
    ] {
        let (dir, ids) = busy_then_crash().await;
        let log = newest_log(dir.path());
        let len = std::fs::metadata(&log).unwrap().len();
        std::fs::OpenOptions::new().append(true).open(&log).unwrap().write_all(&garbage).unwrap();
        let b = TestBroker::restart(dir);
        check_after_restart(&b, &ids).await;
        let dir = b.crash();
        // The garbage is gone: the log was truncated and then folded into a snapshot.
        let restarted = newest_log(dir.path());
        assert!(restarted != log || std::fs::metadata(&restarted).unwrap().len() <= len);
    }
}

/// A data directory written by format version 1 (see `tests/fixtures/v1/README.md`) must stay
/// readable by every later version. Regenerate only when the fixture itself must change:
/// `CQ_WRITE_FIXTURES=1 cargo test -p cq-broker --test it v1_`.
#[tokio::test]
async fn v1_data_directory_is_readable() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    if std::env::var_os("CQ_WRITE_FIXTURES").is_some() {
        write_v1_fixture(&fixture).await;
    }
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "bin") {
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let b = TestBroker::restart(tmp);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap()).unwrap();
    for (id, want) in expected.as_object().unwrap() {
        let (status, job) = b.get(&format!("/j/{id}")).await;
        assert_eq!(status, 200, "{id}");
        for key in ["state", "reason", "exitCode", "namespaces", "logLines", "priority"] {
            assert_eq!(job[key], want[key], "{id} {key}");
        }
    }
}

async fn write_v1_fixture(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let b = TestBroker::restart(tempfile::tempdir().unwrap());
    let mut ids = Vec::new();
    let (_, done) = b.submit("q", "echo finished", json!({"namespace": "doc"})).await;
    ids.push(done["jobId"].as_str().unwrap().to_string());
    let mut w = Ws::worker(b.addr, "w1", 1, json!([])).await;
    let id = &ids[0];
    w.recv_type("assign").await;
    w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    w.send(json!({"type": "logs", "data": {"jobId": id, "attempt": 1, "lines": [{"stream": "stderr", "time": 1, "text": "warning"}]}})).await;
    w.send(json!({"type": "finish", "data": {"jobId": id, "attempt": 1, "status": {"kind": "exited", "exitCode": 4}, "outputs": [{"path": "out.txt", "size": 2, "sha256": "a".repeat(64)}]}})).await;
    w.recv_type("finishAck").await;
    drop(w);
    let b = TestBroker::restart(b.stop()); // The graceful stop wrote snapshot generation 1.
    for (cmd, extra) in [("echo queued", json!({"priority": 7})), ("echo cancelled", json!({}))] {
        let (_, body) = b.submit("q", cmd, extra).await;
        ids.push(body["jobId"].as_str().unwrap().to_string());
    }
    b.post(&format!("/j/{}/cancel", ids[2]), json!({})).await;
    let mut expected = serde_json::Map::new();
    for id in &ids {
        expected.insert(id.clone(), b.get(&format!("/j/{id}")).await.1);
    }
    let data = b.crash(); // Leaves the events since the snapshot in the log.
    for entry in std::fs::read_dir(data.path()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.join("expected.json"), serde_json::to_string_pretty(&Value::Object(expected)).unwrap()).unwrap();
    std::fs::write(
        dir.join("README.md"),
        "A data directory written by cq's on-disk format version 1: a snapshot with one finished job\n\
         and a log tail with a queued and a cancelled job. `expected.json` holds the jobs as the API\n\
         showed them. Tests read it to prove later versions still recover it; do not edit by hand.\n",
    )
    .unwrap();
}

/// Two brokers on one data directory would remove each other's files; the second refuses to
/// start and names the directory, and a crashed broker leaves no stale lock behind.
#[tokio::test]
async fn a_second_broker_on_the_same_data_directory_refuses_to_start() {
    let (dir, ids) = busy_then_crash().await;
    let first = TestBroker::restart(dir);
    let (status, _) = first.get(&format!("/j/{}", ids[0])).await;
    assert_eq!(status, 200);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let data_dir = first.data_dir().to_path_buf();
    let second = broker::run(listener, crate::common::config(&data_dir), std::future::pending()).await;
    let message = second.expect_err("a second broker on the same directory").to_string();
    assert!(message.contains("in use by another cq broker"), "{message}");
    // The first broker is untouched.
    check_after_restart(&first, &ids).await;
}
