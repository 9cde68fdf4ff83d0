//! Tests of the `cq` binary itself: `kill -9` of a broker loses no acknowledged submission,
//! `cq dev` serves and accepts jobs, and the client commands talk to a real broker.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

fn cq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cq"))
}

/// Starts `cq <args>` and returns it with the URL it printed.
fn spawn(args: &[&str]) -> (Child, String) {
    let mut child =
        cq().args(args).env("CQ_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").expect("the first line names the address").to_string();
    (child, url)
}

fn broker(dir: &std::path::Path) -> (Child, String) {
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
