//! The lifecycle chaos test: two workers with two slots each on the real Docker engine, about
//! two hundred jobs ending every way a job can end (success, exit codes, timeouts, cancels of
//! queued and running jobs, namespace supersedes while running, a failing build, a remote build,
//! 20,000 outputs, bulk unterminated output with control characters, an image that does not
//! exist). At quiescence every job ended as expected, both workers have every slot free on the
//! broker and no container left, neither lost its connection, and nothing was logged at error
//! level.
//!
//! It is a test binary of its own because it records every log event of the process (a global
//! subscriber), which other tests running beside it would muddle.

mod support;

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// Bound on the whole run: generous for a loaded 2-core machine; it takes far less.
const CHAOS_DEADLINE: Duration = Duration::from_secs(600);

/// Warnings and errors logged by the broker and the workers.
static LOGGED: Mutex<Vec<(tracing::Level, String)>> = Mutex::new(Vec::new());

/// Records every event at WARN or above, with its fields.
struct Capture;

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(format!("{}: ", event.metadata().target()));
        event.record(&mut fields);
        LOGGED.lock().unwrap().push((*event.metadata().level(), fields.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// How a job must end.
#[derive(Debug, Clone)]
enum Expect {
    /// Succeeded, and its log is exactly this.
    Succeeded(String),
    /// Succeeded (a rerun: the log may hold both attempts).
    SucceededAgain,
    Failed(i64),
    TimedOut,
    Cancelled,
    Superseded,
    /// An error whose message holds this text.
    Error(&'static str),
    /// Succeeded with the first 1000 of 20,000 outputs and a note in its log.
    ManyOutputs,
    /// Succeeded; its log holds only the job's bytes (control characters and `x`).
    Bulk,
    /// Succeeded; its log holds this text.
    Built(String),
}

/// What the test submits.
#[derive(Debug, Clone)]
enum Plan {
    /// Submit and wait for its end.
    Run(Value, Expect),
    /// Submit, then cancel at once: it waits behind everything submitted before.
    CancelQueued(Value),
    /// Submit, cancel once its first line arrives.
    CancelRunning(Value),
    /// Submit in a namespace, then submit another job there once its first line arrives.
    Supersede(Value, Value),
    /// Submit, cancel once its first line arrives, and submit it again at once: the rerun
    /// waits for the old attempt's end on its worker (or goes to the other), then succeeds.
    Rerun(Value),
}

fn check(job: &Value, (log, job_output): &(String, String), expect: &Expect) -> Result<(), String> {
    let reason = job["reason"].as_str().unwrap_or("");
    let ok = match expect {
        Expect::Succeeded(text) => reason == "succeeded" && job["exitCode"] == 0 && log == text,
        Expect::SucceededAgain => reason == "succeeded" && job["exitCode"] == 0,
        Expect::Failed(code) => reason == "failed" && job["exitCode"] == *code,
        Expect::TimedOut => reason == "timedOut" && log.contains("maximum duration"),
        Expect::Cancelled => reason == "cancelled",
        Expect::Superseded => reason == "superseded",
        Expect::Error(text) => reason == "error" && job["message"].as_str().is_some_and(|m| m.contains(text)),
        Expect::ManyOutputs => {
            reason == "succeeded"
                && job["outputs"].as_array().map(Vec::len) == Some(1000)
                && log.contains("output limit of 1000 files reached: kept 1000 of 20000")
        }
        Expect::Bulk => {
            reason == "succeeded"
                && job.get("logTruncated").is_none()
                && !job_output.is_empty()
                && job_output.bytes().all(|c| c == 1 || c == b'x')
        }
        Expect::Built(text) => reason == "succeeded" && log.contains(text.as_str()),
    };
    if ok { Ok(()) } else { Err(format!("expected {expect:?}, got {job} with log {:?}", short(log))) }
}

fn short(log: &str) -> String {
    log.chars().take(300).collect()
}

/// The job's whole log as text, and what of it came from the job (not cq's notes).
async fn full_log(b: &Broker, id: &str) -> (String, String) {
    let v: Value = reqwest::get(format!("{}/j/{id}/logs?limit=100000", b.url)).await.unwrap().json().await.unwrap();
    let lines = v["lines"].as_array().unwrap();
    let text = |l: &Value| l["text"].as_str().unwrap_or("").to_string();
    (lines.iter().map(text).collect(), lines.iter().filter(|l| l["stream"] != "system").map(text).collect())
}

/// The jobs of the run, in a fixed shuffled order.
fn plans(tarball: &str, marker: &str, salt: &str) -> Vec<Plan> {
    let mut plans = Vec::new();
    for i in 0..100 {
        let script = if i % 4 == 0 {
            format!("echo ok {i} {salt}; echo {i} > /outputs/n")
        } else {
            format!("echo ok {i} {salt}")
        };
        plans.push(Plan::Run(
            json!({ "image": IMAGE, "command": sh(&script) }),
            Expect::Succeeded(format!("ok {i} {salt}\n")),
        ));
    }
    for i in 0..24 {
        let code = 1 + i % 7;
        let def = json!({ "image": IMAGE, "command": sh(&format!("echo fail {i} {salt}; exit {code}")) });
        plans.push(Plan::Run(def, Expect::Failed(code)));
    }
    for i in 0..8 {
        let def =
            json!({ "image": IMAGE, "command": sh(&format!("echo slow {i} {salt}; sleep 30")), "maxDuration": 1 });
        plans.push(Plan::Run(def, Expect::TimedOut));
    }
    for i in 0..20 {
        plans.push(Plan::CancelQueued(
            json!({ "image": IMAGE, "command": sh(&format!("echo queued {i} {salt}; sleep 30")) }),
        ));
    }
    for i in 0..8 {
        plans.push(Plan::CancelRunning(
            json!({ "image": IMAGE, "command": sh(&format!("echo started {i} {salt}; sleep 30")) }),
        ));
    }
    for i in 0..8 {
        let first = json!({ "image": IMAGE, "command": sh(&format!("echo editing {i} {salt}; sleep 30")) });
        let second = json!({ "image": IMAGE, "command": sh(&format!("echo edited {i} {salt}")) });
        plans.push(Plan::Supersede(first, second));
    }
    for i in 0..6 {
        plans.push(Plan::Rerun(json!({ "image": IMAGE, "command": sh(&format!("echo rerun {i} {salt}; sleep 2")) })));
    }
    plans.push(Plan::Run(
        json!({ "build": { "dockerfile": format!("FROM {IMAGE}\nRUN echo {salt} && exit 7\n") }, "command": ["true"] }),
        Expect::Error("build"),
    ));
    plans.push(Plan::Run(
        json!({ "build": { "tarball": tarball }, "command": ["cat", "/marker"] }),
        Expect::Built(marker.to_string()),
    ));
    plans.push(Plan::Run(
        json!({ "image": IMAGE, "command": sh(&format!(
            "cd /outputs && awk 'BEGIN{{for(i=1;i<=20000;i++) printf \"%0100d\\n\", i}}' | xargs touch # {salt}")) }),
        Expect::ManyOutputs,
    ));
    plans.push(Plan::Run(
        json!({ "image": IMAGE, "command": sh(&format!(
            "head -c 65536 /dev/zero | tr '\\0' '\\1'; head -c 1048576 /dev/zero | tr '\\0' x # {salt}")) }),
        Expect::Bulk,
    ));
    plans.push(Plan::Run(
        json!({ "image": format!("cq-test/no-such-image:{salt}"), "command": ["true"] }),
        Expect::Error("cq-test/no-such-image"),
    ));
    // A fixed shuffle (xorshift), so categories interleave the same way every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..plans.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        plans.swap(i, (x % (i as u64 + 1)) as usize);
    }
    plans
}

/// A tarball with a Dockerfile that copies `marker` into the image.
fn context(marker: &str) -> Vec<u8> {
    let dockerfile = format!("FROM {IMAGE}\nCOPY marker /marker\n");
    let mut tar = tar::Builder::new(Vec::new());
    for (name, text) in [("Dockerfile", dockerfile.as_str()), ("marker", marker)] {
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, text.as_bytes()).unwrap();
    }
    tar.into_inner().unwrap()
}

/// Watches the queue over a client websocket; the receiver holds the latest worker entries.
async fn watch_workers(url: &str, queue: &str) -> watch::Receiver<Vec<Value>> {
    let ws_url = format!("{}/ws/client", url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let hello = json!({ "type": "hello", "data": { "protocol": 1, "agent": "chaos-test" } });
    ws.send(Message::text(hello.to_string())).await.unwrap();
    ws.send(Message::text(json!({ "type": "watchQueue", "data": { "queue": queue } }).to_string())).await.unwrap();
    let (tx, rx) = watch::channel(Vec::new());
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] == "queueSnapshot" || v["type"] == "queueWorkers" {
                let workers = v["data"]["workers"].as_array().cloned().unwrap_or_default();
                if tx.send(workers).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_chaos() {
    tracing::subscriber::set_global_default(Capture).expect("the only subscriber of this binary");
    docker().await;
    let b = Broker::start(30_000);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_worker(config(&b.url, &unique("chaos-a"), dir_a.path(), 2));
    let w2 = start_worker(config(&b.url, &unique("chaos-b"), dir_b.path(), 2));
    let mut workers_rx = watch_workers(&b.url, "local").await;
    // Both workers are connected before the first job, so the load spreads over both.
    tokio::time::timeout(WAIT, workers_rx.wait_for(|ws| ws.len() == 2)).await.expect("both workers connect").unwrap();

    let salt = unique("run");
    let marker = unique("built");
    let tarball = serve_once_per_request(context(&marker), "200 OK").await;
    let plans = plans(&tarball, &marker, &salt);
    let total = plans.len();
    let started = std::time::Instant::now();

    let (expected, failures) = tokio::time::timeout(CHAOS_DEADLINE, async {
        let b = &b;
        let mut expected: Vec<(String, Expect)> = Vec::new();
        let mut later = Vec::new();
        for (n, plan) in plans.into_iter().enumerate() {
            match plan {
                Plan::Run(def, expect) => expected.push((b.submit(def).await, expect)),
                Plan::CancelQueued(def) => {
                    let id = b.submit(def).await;
                    b.cancel(&id).await;
                    expected.push((id, Expect::Cancelled));
                }
                Plan::CancelRunning(def) => {
                    let id = b.submit(def).await;
                    expected.push((id.clone(), Expect::Cancelled));
                    later.push(tokio::spawn({
                        let url = b.url.clone();
                        async move {
                            follow(&url, &id, CHAOS_DEADLINE, |v| logged(v, "started")).await;
                            reqwest::Client::new().post(format!("{url}/j/{id}/cancel")).send().await.unwrap();
                            None
                        }
                    }));
                }
                Plan::Rerun(def) => {
                    let id = b.submit(def.clone()).await;
                    expected.push((id.clone(), Expect::SucceededAgain));
                    let url = b.url.clone();
                    later.push(tokio::spawn(async move {
                        follow(&url, &id, CHAOS_DEADLINE, |v| logged(v, "rerun")).await;
                        let http = reqwest::Client::new();
                        // The first attempt may have ended already (409): the rerun is then a
                        // cached success, which is fine too.
                        http.post(format!("{url}/j/{id}/cancel")).send().await.unwrap();
                        let r = http
                            .post(format!("{url}/q/local/j"))
                            .json(&json!({ "definition": def }))
                            .send()
                            .await
                            .unwrap();
                        assert!(r.status().is_success(), "{:?}", r.text().await);
                        None
                    }));
                }
                Plan::Supersede(first, second) => {
                    let ns = format!("edit-{n}");
                    let id = b.submit_body(json!({ "definition": first, "namespace": ns })).await;
                    expected.push((id.clone(), Expect::Superseded));
                    let url = b.url.clone();
                    later.push(tokio::spawn(async move {
                        follow(&url, &id, CHAOS_DEADLINE, |v| logged(v, "editing")).await;
                        let r = reqwest::Client::new()
                            .post(format!("{url}/q/local/j"))
                            .json(&json!({ "definition": second, "namespace": ns }))
                            .send()
                            .await
                            .unwrap();
                        let v: Value = r.json().await.unwrap();
                        let text = second["command"][2].as_str().unwrap().replace("echo ", "");
                        Some((v["jobId"].as_str().unwrap().to_string(), Expect::Succeeded(format!("{text}\n"))))
                    }));
                }
            }
        }
        for task in later {
            if let Some(e) = task.await.unwrap() {
                expected.push(e);
            }
        }
        let mut failures = Vec::new();
        for (id, expect) in &expected {
            let job = b.follow_until_within(id, CHAOS_DEADLINE, is_finished).await;
            let job = job.last().map(|v| v["data"]["job"].clone()).unwrap();
            let log = full_log(b, id).await;
            if let Err(e) = check(&job, &log, expect) {
                failures.push(e);
            }
        }
        (expected, failures)
    })
    .await
    .expect("every job finished in time");
    let elapsed = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} of {} jobs ended unexpectedly:\n{}",
        failures.len(),
        expected.len(),
        failures.join("\n")
    );
    assert_eq!(expected.len(), total + 8, "every submitted job (and each superseding one) was checked");

    // Quiescence: the broker holds no attempt for either worker, and their containers are gone.
    let idle = |ws: &Vec<Value>| {
        ws.len() == 2 && ws.iter().all(|w| w["busy"] == 0 && w["slots"] == 2 && w["connected"] == true)
    };
    tokio::time::timeout(CHAOS_DEADLINE, workers_rx.wait_for(idle)).await.expect("both workers idle").unwrap();
    let s = b.summary().await;
    assert_eq!(
        (s["workers"].as_u64(), s["slots"].as_u64(), s["freeSlots"].as_u64()),
        (Some(2), Some(4), Some(4)),
        "{s}"
    );
    assert_eq!(
        (s["queued"].as_u64(), s["assigned"].as_u64(), s["running"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{s}"
    );
    for w in [&a, &w2] {
        tokio::time::timeout(CHAOS_DEADLINE, all_removed(&w.id)).await.expect("containers removed");
        assert!(!w.task.is_finished(), "worker {} is still running", w.id);
    }
    let tag = worker::docker::build_tag(&serde_json::from_value(json!({ "tarball": tarball })).unwrap());
    let _ = docker().await.remove_image(&tag, None::<bollard::query_parameters::RemoveImageOptions>, None).await;

    // Neither worker lost its connection, and nothing went wrong beyond the jobs' own failures
    // (which the worker logs as warnings).
    let logged = LOGGED.lock().unwrap().clone();
    let errors: Vec<&String> = logged.iter().filter(|(l, _)| *l == tracing::Level::ERROR).map(|(_, m)| m).collect();
    assert!(errors.is_empty(), "logged at error level: {errors:#?}");
    let connection: Vec<&String> = logged
        .iter()
        .map(|(_, m)| m)
        .filter(|m| {
            ["broker closed", "connection to the broker", "reach the broker", "lost the broker"]
                .iter()
                .any(|t| m.contains(t))
        })
        .collect();
    assert!(connection.is_empty(), "a worker lost its connection: {connection:#?}");
    println!("lifecycle chaos: {} jobs in {:.1} s", expected.len(), elapsed.as_secs_f64());

    for mut w in [a, w2] {
        let _ = w.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, w.task).await.expect("the worker stops").unwrap().unwrap();
    }
}
