//! The job lifecycle through the real broker: push on enqueue, live logs, cancel, requeue after
//! a lost worker with attempt fencing, dedup and cache, namespaces, server-sent events.

use serde_json::{Value, json};

use crate::common::{TestBroker, Ws};

fn job_id(v: &Value) -> String {
    v["jobId"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_job_is_pushed_to_an_idle_worker_on_enqueue_and_finishes() {
    let b = TestBroker::start();
    let mut w = Ws::worker(b.addr, "w1", 1, json!([])).await;
    let (status, body) = b.submit("q", "echo hi", json!({})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["outcome"], "created");
    let id = job_id(&body);
    let assign = w.recv_type("assign").await;
    assert_eq!(assign["data"]["jobId"], id.as_str());
    assert_eq!(assign["data"]["attempt"], 1);
    assert_eq!(assign["data"]["definition"]["command"], json!(["echo", "hi"]));
    w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    w.send(json!({"type": "finish", "data": {"jobId": id, "attempt": 1, "status": {"kind": "exited", "exitCode": 0}}}))
        .await;
    let ack = w.recv_type("finishAck").await;
    assert_eq!(ack["data"]["jobId"], id.as_str());
    let (_, job) = b.get(&format!("/j/{id}")).await;
    assert_eq!(job["state"], "finished");
    assert_eq!(job["reason"], "succeeded");
    let (status, definition) = b.get(&format!("/j/{id}/definition")).await;
    assert_eq!(status, 200);
    assert_eq!(definition, json!({"image": "busybox", "command": ["echo", "hi"]}));
    assert_eq!(job["exitCode"], 0);
    assert_eq!(job["worker"], "w1");
}

#[tokio::test]
async fn logs_reach_a_watcher_while_the_job_runs() {
    let b = TestBroker::start();
    let mut w = Ws::worker(b.addr, "w1", 1, json!([])).await;
    let id = job_id(&b.submit("q", "echo hi", json!({})).await.1);
    w.recv_type("assign").await;
    let mut c = Ws::client(b.addr).await;
    c.send(json!({"type": "watchJob", "data": {"jobId": id}})).await;
    let first = c.recv_type("job").await;
    assert_eq!(first["data"]["job"]["state"], "assigned");
    // The accept travels on another socket: wait for the watcher to see its effect.
    w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    assert_eq!(c.recv_type("job").await["data"]["job"]["state"], "running");
    let line = |t: &str| json!({"stream": "stdout", "time": 1, "text": t});
    w.send(json!({"type": "logs", "data": {"jobId": id, "attempt": 1, "lines": [line("one\n"), line("two\n")]}})).await;
    let logs = c.recv_type("logs").await;
    assert_eq!(logs["data"]["offset"], 0);
    assert_eq!(logs["data"]["lines"][1]["text"], "two\n");
    // The job is still running when the lines arrive.
    let (_, job) = b.get(&format!("/j/{id}")).await;
    assert_eq!(job["state"], "running");
    w.send(json!({"type": "logs", "data": {"jobId": id, "attempt": 1, "lines": [line("three\n")]}})).await;
    assert_eq!(c.recv_type("logs").await["data"]["offset"], 2);
    let (_, page) = b.get(&format!("/j/{id}/logs?since=1")).await;
    assert_eq!(page["offset"], 1);
    assert_eq!(page["lines"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], 3);
}

#[tokio::test]
async fn cancelling_a_running_job_reaches_its_worker() {
    let b = TestBroker::start();
    let mut w = Ws::worker(b.addr, "w1", 1, json!([])).await;
    let id = job_id(&b.submit("q", "sleep 100", json!({})).await.1);
    w.recv_type("assign").await;
    w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    let (status, job) = b.post(&format!("/j/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(job["reason"], "cancelled");
    let cancel = w.recv_type("cancel").await;
    assert_eq!(cancel["data"]["jobId"], id.as_str());
    assert_eq!(cancel["data"]["attempt"], 1);
    // The worker reports the killed container; the slot frees and the result stays cancelled.
    w.send(
        json!({"type": "finish", "data": {"jobId": id, "attempt": 1, "status": {"kind": "exited", "exitCode": 137}}}),
    )
    .await;
    w.recv_type("finishAck").await;
    assert_eq!(b.get(&format!("/j/{id}")).await.1["reason"], "cancelled");
}

#[tokio::test]
async fn a_lost_worker_s_job_is_requeued_and_its_stale_finish_is_refused() {
    let b = TestBroker::start();
    let mut w1 = Ws::worker(b.addr, "w1", 1, json!([])).await;
    let id = job_id(&b.submit("q", "echo hi", json!({})).await.1);
    w1.recv_type("assign").await;
    w1.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    drop(w1);
    // The test broker's grace period is zero: the job goes back to the queue at once.
    let mut w2 = Ws::worker(b.addr, "w2", 1, json!([])).await;
    let assign = w2.recv_type("assign").await;
    assert_eq!(assign["data"]["attempt"], 2);
    // w1 comes back claiming attempt 1: it is told to drop it, and its finish is refused.
    let mut w1 = Ws::worker(b.addr, "w1", 1, json!([{"jobId": id, "attempt": 1}])).await;
    assert_eq!(w1.recv_type("cancel").await["data"]["attempt"], 1);
    w1.send(
        json!({"type": "finish", "data": {"jobId": id, "attempt": 1, "status": {"kind": "exited", "exitCode": 0}}}),
    )
    .await;
    let err = w1.recv_type("error").await;
    assert_eq!(err["data"]["code"], "staleAttempt");
    w2.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 2}})).await;
    w2.send(
        json!({"type": "finish", "data": {"jobId": id, "attempt": 2, "status": {"kind": "exited", "exitCode": 3}}}),
    )
    .await;
    w2.recv_type("finishAck").await;
    let (_, job) = b.get(&format!("/j/{id}")).await;
    assert_eq!(
        (job["reason"].as_str(), job["exitCode"].as_i64(), job["attempt"].as_u64()),
        (Some("failed"), Some(3), Some(2))
    );
}

#[tokio::test]
async fn dedup_cache_hit_and_force() {
    let b = TestBroker::start();
    let (s1, first) = b.submit("q", "echo same", json!({})).await;
    let (s2, second) = b.submit("q", "echo  same", json!({})).await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(second["outcome"], "joined");
    assert_eq!(job_id(&first), job_id(&second));
    let id = job_id(&first);
    let mut w = Ws::worker(b.addr, "w1", 1, json!([])).await;
    w.recv_type("assign").await;
    w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    w.send(json!({"type": "finish", "data": {"jobId": id, "attempt": 1, "status": {"kind": "exited", "exitCode": 0}}}))
        .await;
    w.recv_type("finishAck").await;
    let (status, cached) = b.submit("q", "echo same", json!({})).await;
    assert_eq!((status, cached["outcome"].as_str()), (200, Some("cached")));
    assert_eq!(cached["job"]["reason"], "succeeded");
    let (status, forced) = b.submit("q", "echo same", json!({"force": true})).await;
    assert_eq!((status, forced["outcome"].as_str()), (201, Some("rerun")));
    assert_eq!(w.recv_type("assign").await["data"]["attempt"], 2);
    // Deleting the result makes the next submission run again, too.
    w.send(json!({"type": "finish", "data": {"jobId": id, "attempt": 2, "status": {"kind": "exited", "exitCode": 0}}}))
        .await;
    w.recv_type("finishAck").await;
    let r = reqwest::Client::new().delete(b.url(&format!("/j/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(b.get(&format!("/j/{id}")).await.0, 404);
    assert_eq!(b.submit("q", "echo same", json!({})).await.1["outcome"], "created");
}

#[tokio::test]
async fn a_newer_submission_in_a_namespace_supersedes_the_older_job() {
    let b = TestBroker::start();
    let mut w = Ws::worker(b.addr, "w1", 1, json!([])).await;
    let old = job_id(&b.submit("q", "echo v1", json!({"namespace": "doc-1"})).await.1);
    w.recv_type("assign").await;
    w.send(json!({"type": "accept", "data": {"jobId": old, "attempt": 1}})).await;
    let mut watcher = Ws::client(b.addr).await;
    watcher.send(json!({"type": "watchQueue", "data": {"queue": "q"}})).await;
    let snapshot = watcher.recv_type("queueSnapshot").await;
    let seq0 = snapshot["data"]["seq"].as_u64().unwrap();
    let new = job_id(&b.submit("q", "echo v2", json!({"namespace": "doc-1"})).await.1);
    let cancel = w.recv_type("cancel").await;
    assert_eq!(cancel["data"]["jobId"], old.as_str());
    let (_, job) = b.get(&format!("/j/{old}")).await;
    assert_eq!(job["reason"], "superseded");
    // The watcher sees numbered updates after its snapshot.
    let update = watcher.recv_type("queueJob").await;
    assert!(update["data"]["seq"].as_u64().unwrap() > seq0);
    assert_ne!(old, new);
}

#[tokio::test]
async fn server_sent_events_follow_a_job_to_its_end() {
    let b = TestBroker::start();
    let mut w = Ws::worker(b.addr, "w1", 1, json!([])).await;
    let id = job_id(&b.submit("q", "echo hi", json!({})).await.1);
    w.recv_type("assign").await;
    let events = reqwest::get(b.url(&format!("/j/{id}/events"))).await.unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    w.send(json!({"type": "logs", "data": {"jobId": id, "attempt": 1, "lines": [{"stream": "stdout", "time": 1, "text": "hello"}]}})).await;
    w.send(json!({"type": "finish", "data": {"jobId": id, "attempt": 1, "status": {"kind": "exited", "exitCode": 0}}}))
        .await;
    // The stream ends by itself once the job has finished.
    let body = tokio::time::timeout(crate::common::WAIT, events.text()).await.unwrap().unwrap();
    let kinds: Vec<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str::<Value>(d.trim()).unwrap()["type"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.contains(&"logs".to_string()), "{body}");
    assert_eq!(kinds.last().map(String::as_str), Some("job"), "{body}");
    assert!(body.contains("\"succeeded\""), "{body}");
}

#[tokio::test]
async fn queue_summary_and_listing() {
    let b = TestBroker::start();
    for i in 0..3 {
        b.submit("q", &format!("echo {i}"), json!({})).await;
    }
    let mut w = Ws::worker(b.addr, "w1", 2, json!([])).await;
    w.recv_type("assign").await;
    w.recv_type("assign").await;
    let (_, s) = b.get("/q/q").await;
    assert_eq!(
        (s["queued"].as_u64(), s["assigned"].as_u64(), s["workers"].as_u64(), s["freeSlots"].as_u64()),
        (Some(1), Some(2), Some(1), Some(0))
    );
    let (_, list) = b.get("/q/q/j?state=queued").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    let (_, metrics) = (200, reqwest::get(b.url("/metrics")).await.unwrap().text().await.unwrap());
    assert!(metrics.contains("cq_jobs{queue=\"q\",state=\"queued\"} 1"), "{metrics}");
}

/// A watcher that stops reading is dropped with close code 4008 once its bounded queue fills;
/// the broker neither buffers for it without limit nor slows the job down.
#[tokio::test]
async fn a_watcher_that_stops_reading_is_dropped_not_buffered_for() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = crate::common::config(tmp.path());
    cfg.store.core.max_log_bytes = 1 << 30;
    let b = TestBroker::start_with(cfg);
    let mut w = Ws::worker(b.addr, "w1", 1, json!([])).await;
    let id = job_id(&b.submit("q", "yes", json!({})).await.1);
    w.recv_type("assign").await;
    w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    let mut slow = Ws::client(b.addr).await;
    slow.send(json!({"type": "watchJob", "data": {"jobId": id}})).await;
    let mut fast = Ws::client(b.addr).await;
    fast.send(json!({"type": "watchJob", "data": {"jobId": id}})).await;
    fast.recv_type("job").await;
    // Enough output to fill the socket buffers and the 1024-message outbound queue, sent
    // without waiting; the reading watcher keeps up in its own task.
    let batches = 4000u64;
    let reader = tokio::spawn(async move {
        let mut lines = 0;
        while lines < batches {
            lines += fast.recv_type("logs").await["data"]["lines"].as_array().unwrap().len() as u64;
        }
        lines
    });
    let chunk = "y\n".repeat(4096);
    for _ in 0..batches {
        w.send(json!({"type": "logs", "data": {"jobId": id, "attempt": 1, "lines": [{"stream": "stdout", "time": 1, "text": chunk}]}})).await;
    }
    assert_eq!(reader.await.unwrap(), batches);
    assert_eq!(slow.closed().await, protocol::close::LAGGING);
    let (_, job) = b.get(&format!("/j/{id}")).await;
    assert_eq!(job["logLines"].as_u64(), Some(batches));
}
