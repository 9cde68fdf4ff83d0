//! What operators and autoscalers read: every metric family the broker serves is documented in
//! `docs/operations.md` and every documented one is served; the scaling endpoint counts what
//! an autoscaler needs.

use serde_json::{Value, json};

use crate::common::{TestBroker, Ws};

/// The metric names listed in the "Metrics" table of docs/operations.md.
fn documented() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
    let section = doc.split("\n## Metrics").nth(1).expect("a Metrics section").split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `cq_"))
        .map(|l| format!("cq_{}", l.split('`').next().unwrap()))
        .collect()
}

#[tokio::test]
async fn served_metrics_are_the_documented_ones() {
    let b = TestBroker::start();
    let mut w = Ws::worker(b.addr, "w1", 2, json!([])).await;
    let (_, body) = b.submit("q", "echo hi", json!({})).await;
    let id = body["jobId"].as_str().unwrap().to_string();
    w.recv_type("assign").await;
    w.send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}})).await;
    let lines = json!([{"stream": "stdout", "time": 1, "text": "hello\n"}]);
    w.send(json!({"type": "logs", "data": {"jobId": id, "attempt": 1, "lines": lines}})).await;
    w.send(json!({"type": "finish", "data": {"jobId": id, "attempt": 1, "status": {"kind": "exited", "exitCode": 0}}}))
        .await;
    w.recv_type("finishAck").await;
    let r = reqwest::get(b.url("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let served: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    let mut documented = documented();
    documented.sort();
    let mut served_sorted = served.clone();
    served_sorted.sort();
    assert_eq!(served_sorted, documented, "docs/operations.md lists exactly the served families");
    for sample in [
        "cq_jobs{queue=\"q\",state=\"finished\"} 1",
        "cq_jobs_finished_total{queue=\"q\",reason=\"succeeded\"} 1",
        "cq_workers{queue=\"q\"} 1",
        "cq_slots{queue=\"q\"} 2",
        "cq_free_slots{queue=\"q\"} 2",
        "cq_dispatched_total 1",
        "cq_dispatch_latency_seconds_count 1",
        "cq_connections{role=\"worker\"} 1",
        "cq_job_log_bytes_total 6",
        "cq_log_fsync_seconds_count",
    ] {
        assert!(text.contains(sample), "missing `{sample}` in:\n{text}");
    }
}

#[tokio::test]
async fn the_scale_endpoint_counts_the_workers_a_queue_needs() {
    let b = TestBroker::start();
    let scale = |q: &'static str| {
        let url = b.url(q);
        async move { reqwest::get(url).await.unwrap().json::<Value>().await.unwrap() }
    };
    let empty = scale("/q/q/scale?slotsPerWorker=2").await;
    assert_eq!(empty["desiredWorkers"], 0, "an unknown or empty queue needs no worker: {empty}");
    assert_eq!(scale("/q/q/scale?slotsPerWorker=2&min=1").await["desiredWorkers"], 1);
    for i in 0..5 {
        let (status, _) = b.submit("q", &format!("echo {i}"), json!({})).await;
        assert_eq!(status, 201);
    }
    let five = scale("/q/q/scale?slotsPerWorker=2").await;
    assert_eq!(five["queued"], 5);
    assert_eq!(five["demandSlots"], 5);
    assert_eq!(five["desiredWorkers"], 3, "{five}");
    assert_eq!(scale("/q/q/scale?slotsPerWorker=2&max=2").await["desiredWorkers"], 2);
    // A worker taking two of them: still 5 jobs wanting slots (queued + assigned + running).
    let _w = Ws::worker(b.addr, "w1", 2, json!([])).await;
    let with_worker = scale("/q/q/scale?slotsPerWorker=2").await;
    assert_eq!(with_worker["workers"], 1);
    assert_eq!(with_worker["assigned"], 2, "{with_worker}");
    assert_eq!(with_worker["desiredWorkers"], 3);
    let r = reqwest::get(b.url("/q/q/scale?slotsPerWorker=0")).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = reqwest::get(b.url("/q/q/scale?slots=2")).await.unwrap();
    assert_eq!(r.status(), 400, "unknown parameters are refused");
}
