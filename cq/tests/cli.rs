//! Tests of the `cq` binary itself: `kill -9` of a broker loses no acknowledged submission,
//! `cq dev` serves and accepts jobs, and the client commands talk to a real broker.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

fn cq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cq"))
}

/// A `cq` process that is killed when dropped, so that a failing test leaves no broker behind
/// (holding the test's output pipe open).
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cq <args>` and returns it with the URL it printed.
fn spawn(args: &[&str]) -> (Proc, String) {
    let mut child =
        cq().args(args).env("CQ_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").expect("the first line names the address").to_string();
    (Proc(child), url)
}

fn broker(dir: &std::path::Path) -> (Proc, String) {
    spawn(&["broker", "--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()])
}

#[tokio::test]
async fn kill_9_loses_no_acknowledged_submission() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = broker(dir.path());
    let http = reqwest::Client::new();
    // Four submitters keep going until the broker dies under them.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..5000 {
                let body = json!({"definition": {"image": "busybox", "command": ["echo", format!("{t}-{i}")]}});
                match http.post(format!("{url}/q/q/j")).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {
                        let v: Value = r.json().await.unwrap();
                        acked.push(v["jobId"].as_str().unwrap().to_string());
                    }
                    // The broker died: this request was never acknowledged.
                    _ => break,
                }
            }
            acked
        }));
    }
    // Kill while submissions are in flight, once enough have been acknowledged.
    loop {
        let s = http.get(format!("{url}/q/q")).send().await.unwrap().json::<Value>().await.unwrap();
        if s["queued"].as_u64().unwrap_or(0) >= 300 {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    // The broker counted 300 applied submissions; at most one per submitter can have been
    // applied without its acknowledgement having arrived yet.
    assert!(acked.len() >= 296, "only {} acknowledged", acked.len());
    let (mut child, url) = broker(dir.path());
    let queued =
        http.get(format!("{url}/q/q")).send().await.unwrap().json::<Value>().await.unwrap()["queued"].as_u64().unwrap();
    assert!(queued as usize >= acked.len(), "{queued} queued after restart, {} were acknowledged", acked.len());
    for id in &acked {
        let r = http.get(format!("{url}/j/{id}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "acknowledged job {id} was lost");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    eprintln!("{} acknowledged submissions survived kill -9", acked.len());
}

#[tokio::test]
async fn cq_dev_serves_and_accepts_a_job_and_the_cli_talks_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) =
        spawn(&["dev", "--no-worker", "--listen", "127.0.0.1:0", "--data-dir", dir.path().to_str().unwrap()]);
    let health = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let page = reqwest::get(format!("{url}/")).await.unwrap().text().await.unwrap();
    assert!(page.contains("<title>cq</title>"));
    let out = cq().args(["submit", "--url", &url, "--image", "busybox", "--", "echo", "hi"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(id.len(), 64);
    let out = cq().args(["status", "--url", &url, &id, "--json"]).output().unwrap();
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(view["state"], "queued");
    assert_eq!(view["queue"], "local");
    let out = cq().args(["status", "--url", &url, "--queue", "local"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("local") && text.contains(&id[..12]), "{text}");
    let out = cq().args(["cancel", "--url", &url, &id]).output().unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().contains("cancelled"));
    // Mistakes are reported before anything is sent, with the field named.
    let out = cq().args(["submit", "--url", &url, "--image", "Not An Image", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`image`"));
    let out = cq().args(["submit", "--url", &url, "--image", "busybox", "--max-duration", "soon"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("maxDuration"));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The promise of the README: `cq dev`, then `cq submit --wait` prints the job's output live
/// and exits 0, and `cq outputs` fetches what it wrote. Real Docker, the local test image.
#[tokio::test]
async fn cq_dev_runs_a_container_and_cq_outputs_fetches_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = spawn(&["dev", "--listen", "127.0.0.1:0", "--data-dir", dir.path().to_str().unwrap()]);
    let out = cq()
        .args(["submit", "--url", &url, "--wait", "--image", "cq-test/busybox", "--"])
        .args(["sh", "-c", "echo hi; echo out > /outputs/a"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    let id = stderr.split_whitespace().find(|w| w.len() == 64).expect("the job id is printed").to_string();
    let results = dir.path().join("results");
    let out = cq().args(["outputs", "--url", &url, &id, "-o", results.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(results.join("a")).unwrap(), "out\n");
    // An exit code comes back as cq's own.
    let out = cq()
        .args(["submit", "--url", &url, "--wait", "--image", "cq-test/busybox", "--", "sh", "-c", "exit 4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn help_names_every_command_and_env_var() {
    let out = cq().arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in ["dev", "broker", "worker", "submit", "status", "logs", "cancel", "outputs"] {
        assert!(text.contains(cmd), "{text}");
    }
    let out = cq().args(["broker", "--help"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for env in ["CQ_LISTEN", "CQ_DATA_DIR", "CQ_FSYNC", "CQ_CLIENT_TOKEN", "CQ_WORKER_TOKEN", "CQ_RETENTION"] {
        assert!(text.contains(env), "{env} missing from:\n{text}");
    }
}

/// `cq submit --wait` prints the job's output live and exits with its exit code; a fake worker
/// over the real worker protocol plays the container.
#[tokio::test]
async fn submit_wait_follows_logs_and_exits_with_the_job_s_code() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let (mut broker, url) = broker(dir.path());
    let ws_url = format!("ws{}/ws/worker", url.strip_prefix("http").unwrap());
    let (mut worker, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let hello = json!({"type": "hello", "data": {"protocol": 1, "workerId": "fake", "queues": ["local"], "slots": 1}});
    worker.send(Message::text(hello.to_string())).await.unwrap();
    let mut submit = tokio::process::Command::new(env!("CARGO_BIN_EXE_cq"))
        .args([
            "submit",
            "--url",
            &url,
            "--image",
            "busybox",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let assign = loop {
        let Message::Text(t) = worker.next().await.unwrap().unwrap() else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "assign" {
            break v;
        }
    };
    let (job, attempt) = (assign["data"]["jobId"].clone(), assign["data"]["attempt"].clone());
    let send = |v: Value| Message::text(v.to_string());
    worker.send(send(json!({"type": "accept", "data": {"jobId": job, "attempt": attempt}}))).await.unwrap();
    let lines =
        json!([{"stream": "stdout", "time": 1, "text": "out\n"}, {"stream": "stderr", "time": 2, "text": "err\n"}]);
    worker
        .send(send(json!({"type": "logs", "data": {"jobId": job, "attempt": attempt, "lines": lines}})))
        .await
        .unwrap();
    let status = json!({"kind": "exited", "exitCode": 3});
    worker
        .send(send(json!({"type": "finish", "data": {"jobId": job, "attempt": attempt, "status": status}})))
        .await
        .unwrap();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut stdout = String::new();
        let mut stderr = String::new();
        use tokio::io::AsyncReadExt;
        submit.stdout.take().unwrap().read_to_string(&mut stdout).await.unwrap();
        submit.stderr.take().unwrap().read_to_string(&mut stderr).await.unwrap();
        (submit.wait().await.unwrap(), stdout, stderr)
    })
    .await
    .expect("cq submit --wait did not end");
    let (code, stdout, stderr) = out;
    assert_eq!(code.code(), Some(3), "{stderr}");
    assert_eq!(stdout, "out\n");
    assert!(stderr.contains("err\n") && stderr.contains("failed"), "{stderr}");
    // Following a job that has already finished still prints its whole log: the broker sends
    // the finished view first, then the lines.
    let (code, out, err) = run(&url, &["logs", "-f", job.as_str().unwrap()]);
    assert_eq!((code, out.as_str()), (Some(3), "out\n"), "{err}");
    broker.kill().unwrap();
    broker.wait().unwrap();
}

/// `cq submit --input NAME=@PATH` uploads the file and references it by hash; `cq outputs`
/// downloads what the job stored. A fake worker fetches the input and stores an output over
/// the file endpoints, as the real worker does.
#[tokio::test]
async fn inputs_upload_and_outputs_download_through_the_cli() {
    use futures_util::{SinkExt, StreamExt};
    use sha2::Digest;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let (mut broker, url) = broker(&dir.path().join("data"));
    let ws_url = format!("ws{}/ws/worker", url.strip_prefix("http").unwrap());
    let (mut worker, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let hello = json!({"type": "hello", "data": {"protocol": 1, "workerId": "fake", "queues": ["local"], "slots": 1}});
    worker.send(Message::text(hello.to_string())).await.unwrap();

    let input: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let input_path = dir.path().join("input.bin");
    std::fs::write(&input_path, &input).unwrap();
    let out = cq()
        .args(["submit", "--url", &url, "--image", "busybox", "--input"])
        .arg(format!("data/in.bin=@{}", input_path.display()))
        .args(["--input", "note.txt=hello", "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let assign = loop {
        let Message::Text(t) = worker.next().await.unwrap().unwrap() else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "assign" {
            break v;
        }
    };
    let inputs = &assign["data"]["definition"]["inputs"];
    let sha_in = hex::encode(sha2::Sha256::digest(&input));
    assert_eq!(inputs["data/in.bin"], json!({"type": "blob", "sha256": sha_in, "size": input.len()}));
    assert_eq!(inputs["note.txt"], json!({"type": "text", "value": "hello"}));
    let http = reqwest::Client::new();
    let fetched = http.get(format!("{url}/f/{sha_in}")).send().await.unwrap().bytes().await.unwrap();
    assert!(fetched.as_ref() == input.as_slice(), "the input arrives byte-identical");

    let output = b"42 lines\n".to_vec();
    let sha_out = hex::encode(sha2::Sha256::digest(&output));
    let put = http.put(format!("{url}/f/{sha_out}")).body(output.clone()).send().await.unwrap();
    assert_eq!(put.status(), 201);
    let send = |v: Value| Message::text(v.to_string());
    worker.send(send(json!({"type": "accept", "data": {"jobId": id, "attempt": 1}}))).await.unwrap();
    let outputs = json!([{"path": "counts/a.txt", "size": output.len(), "sha256": sha_out}]);
    let status = json!({"kind": "exited", "exitCode": 0});
    worker
        .send(send(
            json!({"type": "finish", "data": {"jobId": id, "attempt": 1, "status": status, "outputs": outputs}}),
        ))
        .await
        .unwrap();
    loop {
        let Message::Text(t) = worker.next().await.unwrap().unwrap() else { continue };
        if serde_json::from_str::<Value>(&t).unwrap()["type"] == "finishAck" {
            break;
        }
    }

    let results = dir.path().join("results");
    let out = cq().args(["outputs", "--url", &url, &id, "-o", results.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(results.join("counts/a.txt")).unwrap(), output);
    // Again: the file is up to date, nothing to do.
    let out = cq().args(["outputs", "--url", &url, &id, "-o", results.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("up to date"));
    broker.kill().unwrap();
    broker.wait().unwrap();
}

/// The benchmark harness still runs (a few hundred jobs, a short fan-out, a few sockets); its
/// numbers are not checked here, only that each scenario completes and reports.
#[test]
fn the_benchmark_harness_runs_every_scenario() {
    for args in [
        vec!["bench", "--jobs", "300", "--workers", "2", "--fsync", "never"],
        vec![
            "bench",
            "--scenario",
            "fanout",
            "--watchers",
            "3",
            "--slow-watchers",
            "1",
            "--seconds",
            "1",
            "--log-rate",
            "200000",
        ],
        vec!["bench", "--scenario", "connections", "--connections", "50"],
    ] {
        let out = cq().args(&args).env("CQ_LOG", "warn").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("| measure | value |"), "{args:?} printed:\n{stdout}");
    }
}

/// Runs `cq <args>` against `url` and returns (exit code, stdout, stderr).
fn run(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = cq().args(args).env("CQ_URL", url).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Two `echo N` jobs whose ids share their first 6 hex digits, found by counting up (the
/// birthday bound makes that a few thousand hashes).
fn two_jobs_sharing_a_prefix() -> (String, String) {
    use protocol::definition::{JobDefinition, parse_json};
    let id = |n: u32| {
        let json = format!(r#"{{"image":"busybox","command":["echo","{n}"]}}"#);
        parse_json::<JobDefinition>(json.as_bytes()).unwrap().normalize().unwrap().job_id().to_string()
    };
    let mut seen = std::collections::HashMap::new();
    for n in 0.. {
        let this = id(n);
        if let Some(other) = seen.insert(this[..6].to_string(), n) {
            return (other.to_string(), n.to_string());
        }
    }
    unreachable!()
}

#[tokio::test]
async fn short_ids_work_everywhere_and_ambiguous_ones_are_refused_with_the_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, url) = broker(dir.path());
    let (a, b) = two_jobs_sharing_a_prefix();
    let mut ids = Vec::new();
    for n in [&a, &b] {
        let (code, out, err) = run(&url, &["submit", "--image", "busybox", "--", "echo", n]);
        assert_eq!(code, Some(0), "{err}");
        ids.push(out.trim().to_string());
    }
    assert_eq!(ids[0][..6], ids[1][..6]);
    // The 12 digits the tables print name one job, for every command that takes an id.
    let short = &ids[0][..12];
    let (code, out, err) = run(&url, &["status", short]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&ids[0]), "{out}");
    let (code, _, err) = run(&url, &["logs", short]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run(&url, &["outputs", short, "-o", dir.path().join("out").to_str().unwrap()]);
    assert!(code == Some(0) && err.contains("no outputs yet: it is queued; follow it with `cq logs -f"), "{err}");
    // Six shared digits are ambiguous: refused, with both candidates.
    for cmd in ["status", "logs", "cancel", "outputs"] {
        let (code, _, err) = run(&url, &[cmd, &ids[0][..6]]);
        assert_eq!(code, Some(125), "{cmd}: {err}");
        assert!(err.contains("ambiguous") && err.contains(&ids[0]) && err.contains(&ids[1]), "{cmd}: {err}");
    }
    let (code, _, err) = run(&url, &["status", &ids[0][..5]]);
    assert!(code == Some(125) && err.contains("at least 6"), "{err}");
    let (code, _, err) = run(&url, &["status", "0123456789ab"]);
    assert!(code == Some(125) && err.contains("no job"), "{err}");
    let (code, out, err) = run(&url, &["cancel", &ids[1][..12].to_uppercase()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("cancelled"), "{out}");
    let (code, _, err) = run(&url, &["outputs", &ids[1][..12], "-o", dir.path().join("out").to_str().unwrap()]);
    assert!(code == Some(0) && err.contains("no outputs: job") && err.contains("cancelled"), "{err}");
    broker.kill().unwrap();
    broker.wait().unwrap();
}

#[tokio::test]
async fn connection_problems_name_the_url_and_a_hint_that_fits_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, url) = broker(dir.path());
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let id = "f06afc56184bc2785a079b04f7e0a57404feda5d041435445b2e9842242a8827";
    let tls = url.replace("http://", "https://");
    let cases = [
        (closed.clone(), "nothing listens there", "cq dev"),
        (tls.clone(), "TLS handshake failed", "http://"),
        ("http://cq-nowhere.invalid:8000".to_string(), "cannot resolve the host name", "check the host"),
    ];
    for (target, what, hint) in &cases {
        for args in [vec!["status", id], vec!["logs", "-f", id], vec!["submit", "--image", "busybox", "--", "true"]] {
            let (code, _, err) = run(target, &args);
            assert_eq!(code, Some(125), "{args:?}: {err}");
            assert!(err.contains(&format!("cannot reach the broker at {target}")), "{args:?}: {err}");
            assert!(err.contains(what) && err.contains(hint), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "one line, the cause said once: {err}");
            assert!(err.matches("onnection refused").count() <= 1, "{err}");
        }
    }
    // A URL with a path reaches some server but no broker endpoint: the URL tried is named.
    let with_path = format!("{url}/ui");
    for args in [vec!["status", id], vec!["logs", "-f", id]] {
        let (code, _, err) = run(&with_path, &args);
        assert_eq!(code, Some(125), "{err}");
        // The URL tried (HTTP or websocket) and the base it came from.
        assert!(err.contains("/ui/") && err.contains(&format!("is {with_path} the broker's address")), "{err}");
        assert!(err.contains("is not a broker endpoint"), "{err}");
        assert!(err.contains("takes no path"), "{err}");
    }
    // Something that is not a URL (a space in it) is said to be so, not a crash.
    for args in [vec!["status", id], vec!["logs", "-f", id], vec!["submit", "--image", "busybox", "--", "true"]] {
        let (code, _, err) = run("http://bad host", &args);
        assert_eq!(code, Some(125), "{args:?}: {err}");
        assert!(err.contains("is not a URL") && !err.contains("panicked"), "{args:?}: {err}");
    }
    // A list of brokers: what cannot reach the first goes to the next; when none answers, the
    // error names them all, and why the last one tried failed.
    let list = format!("{closed},{url}");
    for args in [vec!["status", id], vec!["logs", "-f", id]] {
        let (code, _, err) = run(&list, &args);
        assert!(code == Some(125) && err.contains(&format!("no job {id}")), "{args:?}: {err}");
    }
    let (code, out, err) = run(&list, &["submit", "--image", "busybox", "--", "true"]);
    assert!(code == Some(0) && out.trim().len() == 64, "{err}");
    let (code, _, err) = run(&format!("{url},{closed}").replace(&url, &tls), &["status", id]);
    assert_eq!(code, Some(125), "{err}");
    let tried = format!("none of the brokers given answers ({tls}, {closed}); the last one tried, {closed}");
    assert!(err.contains(&format!("{tried}: nothing listens there")), "{err}");
    assert!(err.contains("are they running?") && !err.contains("cq dev"), "{err}");
    // A job the broker does not know is not mistaken for a wrong URL.
    let (code, _, err) = run(&url, &["status", id]);
    assert!(code == Some(125) && err.contains(&format!("no job {id}")) && !err.contains("endpoint"), "{err}");
    broker.kill().unwrap();
    broker.wait().unwrap();
}

#[test]
fn a_command_not_after_double_dash_gets_a_tip() {
    let out = cq().args(["submit", "--image", "busybox", "echo", "hello"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("unexpected argument 'echo'") && err.contains("tip:"), "{err}");
    assert!(err.contains("-- echo"), "{err}");
    // A mistyped flag is not the command: no tip about `--`.
    let out = cq().args(["submit", "--imgae", "busybox"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("tip: the job's command"));
}

#[tokio::test]
async fn cancel_says_when_there_was_nothing_to_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, url) = broker(dir.path());
    let (_, id, _) = run(&url, &["submit", "--image", "busybox", "--", "echo", "cancel me"]);
    let id = id.trim();
    let (code, out, err) = run(&url, &["cancel", id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("cancelled"), "{out}");
    let (code, out, err) = run(&url, &["cancel", id]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("nothing to cancel") && err.contains("cancelled"), "{err}");
    broker.kill().unwrap();
    broker.wait().unwrap();
}

/// Ctrl-C while `submit --wait` follows a job: the job goes on and the user is told how to get
/// back to it; with `--cancel-on-interrupt` the job is cancelled.
#[tokio::test]
async fn ctrl_c_during_wait_leaves_the_job_unless_asked_to_cancel_it() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, url) = broker(dir.path());
    for (extra, state) in [(None, "queued"), (Some("--cancel-on-interrupt"), "finished")] {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cq"))
            .env_remove("CQ_URL")
            .args(["submit", "--url", &url, "--wait", "--image", "busybox"])
            .args(extra)
            .args(["--", "echo", state])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
        // cq listens for Ctrl-C before it announces the job.
        let mut line = String::new();
        stderr.read_line(&mut line).await.unwrap();
        let id = line.split_whitespace().find(|w| w.len() == 64).expect("the job id is announced").to_string();
        let kill = Command::new("kill").args(["-INT", &child.id().unwrap().to_string()]).status().unwrap();
        assert!(kill.success());
        let mut rest = String::new();
        let status = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            stderr.read_to_string(&mut rest).await.unwrap();
            child.wait().await.unwrap()
        })
        .await
        .expect("cq exits on Ctrl-C");
        assert_eq!(status.code(), Some(130), "{rest}");
        let job: Value = reqwest::get(format!("{url}/j/{id}")).await.unwrap().json().await.unwrap();
        assert_eq!(job["state"], state, "{job}");
        let short = &id[..12];
        if extra.is_none() {
            assert!(rest.contains("is not cancelled"), "{rest}");
            assert!(
                // The broker is not the default one, so the commands name it.
                rest.contains(&format!("cq logs -f --url {url} {short}"))
                    && rest.contains(&format!("cq cancel --url {url} {short}")),
                "{rest}"
            );
        } else {
            assert_eq!(job["reason"], "cancelled");
            assert!(rest.contains("cancelled"), "{rest}");
        }
    }
    broker.kill().unwrap();
    broker.wait().unwrap();
}

#[test]
fn client_commands_show_only_client_flags_and_describe_every_argument() {
    for cmd in ["submit", "status", "logs", "cancel", "outputs"] {
        let out = cq().args([cmd, "--help"]).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains("--log"), "{cmd} --help shows the broker's logging flags:\n{text}");
        assert!(text.contains("--url"), "{text}");
        // Every positional argument has a description, after its name or (in clap's long
        // layout) on the next, further indented line.
        let args = text.split("Arguments:").nth(1).map(|a| a.split("Options:").next().unwrap()).unwrap_or("");
        let lines: Vec<&str> = args.lines().collect();
        let indent = |l: &str| l.len() - l.trim_start().len();
        for (i, line) in lines.iter().enumerate().filter(|(_, l)| l.trim_start().starts_with(['<', '['])) {
            let same_line = line.trim().split_once(char::is_whitespace).is_some_and(|(_, d)| !d.trim().is_empty());
            let next_line = lines.get(i + 1).is_some_and(|n| !n.trim().is_empty() && indent(n) > indent(line));
            assert!(same_line || next_line, "{cmd}: `{}` has no description:\n{text}", line.trim());
        }
    }
    for cmd in ["dev", "broker", "worker"] {
        let out = cq().args([cmd, "--help"]).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        // Under its own heading, which holds nothing else (a heading runs to the next line that
        // is not indented).
        let logging = text.split("\nLogging:\n").nth(1).unwrap_or_else(|| panic!("{cmd}: no Logging heading:\n{text}"));
        let section = logging.lines().take_while(|l| l.is_empty() || l.starts_with(' '));
        let flags: Vec<&str> = section.filter_map(|l| l.trim_start().strip_prefix("--")).collect();
        assert_eq!(flags.len(), 2, "{cmd}: the Logging heading holds other flags:\n{text}");
        assert!(flags.iter().all(|f| f.starts_with("log")), "{cmd}: {flags:?}");
    }
}

/// `cq dev`'s own log, written to a pipe or a file, carries no colour codes.
#[test]
fn logs_not_written_to_a_terminal_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = cq()
        .args(["dev", "--no-worker", "--listen", "127.0.0.1:0", "--data-dir", dir.path().to_str().unwrap()])
        .env("CQ_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        // The broker's first log line, written once its log is recovered.
        if line.contains("recovered") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(seen.contains("INFO"), "{seen}");
    assert!(!seen.contains('\u{1b}'), "colour codes in a redirected log:\n{seen:?}");
}

/// Without `--wait`, `cq submit` says how to follow the job; `--output json` gives scripts one
/// JSON document from `submit` and `status`.
#[tokio::test]
async fn submit_says_how_to_follow_and_json_output_is_one_document() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, url) = broker(dir.path());
    let (code, out, err) = run(&url, &["submit", "--image", "busybox", "--", "echo", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let short = &out.trim()[..12];
    // CQ_URL names the broker, so the commands need no --url; given --url, they repeat it.
    assert!(err.contains(&format!("cq logs -f {short}")), "{err}");
    let (_, out, _) = run(&url, &["submit", "--image", "busybox", "--output", "json", "--", "echo", "json"]);
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["outcome"], "joined");
    assert_eq!(answer["job"]["state"], "queued");
    let id = answer["jobId"].as_str().unwrap();
    let (_, out, _) = run(&url, &["status", short, "-o", "json"]);
    let view: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["id"], id);
    // The job prints its fields in one order wherever it appears: `id` first, as in the
    // submit answer's `job`, not sorted alphabetically.
    assert!(out.trim_start().starts_with("{\n  \"id\""), "{out}");
    let (_, out, _) = run(&url, &["status", "--queue", "local", "--output", "json"]);
    let queue: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(queue["queues"][0]["queued"], 1);
    assert_eq!(queue["jobs"][0]["id"], id);
    let named = cq()
        .env_remove("CQ_URL")
        .args(["submit", "--url", &url, "--image", "busybox", "--", "echo", "named"])
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&named.stdout), String::from_utf8_lossy(&named.stderr));
    let short = &out.trim()[..12];
    assert!(err.contains(&format!("`cq logs -f --url {url} {short}`, or `cq status --url {url} {short}`")), "{err}");
    broker.kill().unwrap();
    broker.wait().unwrap();
}

/// A job whose image cannot be pulled (no registry here) ends with a hint on what to run
/// instead. Real Docker: the local worker of `cq dev` tries the pull.
#[tokio::test]
async fn a_failed_pull_says_what_to_try() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = spawn(&["dev", "--listen", "127.0.0.1:0", "--data-dir", dir.path().to_str().unwrap()]);
    let (code, _, err) = run(&url, &["submit", "--wait", "--image", "cq-test/never-built:1", "--", "true"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("cq-test/never-built") && err.contains("scripts/test-image.sh"), "{err}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_broker_beyond_loopback_without_tokens_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for args in [
        vec!["broker", "--listen", "0.0.0.0:0", "--data-dir", data],
        vec!["broker", "--listen", "0.0.0.0:0", "--data-dir", data, "--client-token", "c"],
        vec!["dev", "--no-worker", "--listen", "0.0.0.0:0", "--data-dir", data],
    ] {
        let out = cq().args(&args).env_remove("CQ_CLIENT_TOKEN").env_remove("CQ_WORKER_TOKEN").output().unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--insecure-no-auth"), "{args:?}: {err}");
        if args[0] == "broker" {
            assert!(err.contains("--client-token-file") && err.contains("--worker-token-file"), "{err}");
        }
        assert!(out.stdout.is_empty(), "it never listened: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[tokio::test]
async fn an_insecure_broker_says_so_in_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) =
        spawn(&["broker", "--listen", "0.0.0.0:0", "--insecure-no-auth", "--data-dir", dir.path().to_str().unwrap()]);
    let url = url.replace("0.0.0.0", "127.0.0.1");
    let health = reqwest::get(format!("{url}/healthz")).await.unwrap().text().await.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(health.starts_with("ok\n") && health.contains("insecure"), "{health}");
}

/// A broker and a worker that read their tokens from files (nothing secret on a command line)
/// run a job end to end; a worker whose file holds another token is refused.
#[tokio::test]
async fn a_worker_authenticates_with_a_token_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let client_file = write("client-token", "client-secret\n");
    let worker_file = write("worker-token", "worker-secret\n");
    let wrong_file = write("wrong-token", "not-the-worker-secret\n");
    let data = dir.path().join("broker");
    let (_broker, url) = spawn(&[
        "broker",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--client-token-file",
        &client_file,
        "--worker-token-file",
        &worker_file,
    ]);
    let start_worker = |file: &str, id: &str| {
        let worker_dir = dir.path().join(id);
        let child = cq()
            .args(["worker", "--url", &url, "--queue", "files", "--slots", "1", "--token-file", file])
            .args(["--worker-id", id, "--data-dir", worker_dir.to_str().unwrap()])
            .env("CQ_LOG", "warn")
            .env_remove("CQ_WORKER_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Proc(child)
    };

    // The wrong token: the broker refuses the worker, which says why (read on a thread, so
    // the test's deadline bounds the wait).
    let mut wrong = start_worker(&wrong_file, "token-file-wrong");
    let stderr = wrong.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("token") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let refused = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the worker says why it is refused");
    assert!(refused.contains("wrong worker token"), "{refused}");
    drop(wrong);

    let _worker = start_worker(&worker_file, "token-file-right");
    let out = cq()
        .args(["submit", "--url", &url, "--queue", "files", "--wait", "--image", "cq-test/busybox", "--"])
        .args(["sh", "-c", "echo ran with a token from a file"])
        .env("CQ_TOKEN", "client-secret")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ran with a token from a file\n");
}
