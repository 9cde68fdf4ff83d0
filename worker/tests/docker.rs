//! The worker against the real Docker engine and a real broker on 127.0.0.1: jobs run as
//! containers from the local test image (`scripts/test-image.sh` builds it), with logs, outputs,
//! exit codes, timeouts, cancels, memory limits, image builds, lost and restarted workers, two
//! workers on one host, and a graceful drain.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_echoes_writes_an_output_and_exit_codes_are_reported() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let w = start_worker(config(&b.url, &unique("echo"), dir.path(), 2));
    let ok = b
        .submit(json!({ "image": IMAGE, "command": sh("echo hi; echo oops >&2; echo \"$JOB_ID\" > /outputs/id; mkdir -p /outputs/d; cat /inputs/in.txt > /outputs/d/copy"),
            "inputs": { "in.txt": { "type": "text", "value": "input bytes" } } }))
        .await;
    let failed = b.submit(json!({ "image": IMAGE, "command": sh("echo partial > /outputs/p; exit 3") })).await;
    let job = b.finished(&ok).await;
    assert_eq!(job["reason"], "succeeded", "{job}");
    assert_eq!(job["exitCode"], 0);
    let logs = b.log_text(&ok).await;
    assert!(logs.contains("hi\n") && logs.contains("oops\n"), "{logs}");
    let paths: Vec<&str> = job["outputs"].as_array().unwrap().iter().map(|o| o["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["d/copy", "id"]);
    let id_file = reqwest::get(format!("{}/j/{ok}/outputs/id", b.url)).await.unwrap().text().await.unwrap();
    assert_eq!(id_file.trim(), ok, "JOB_ID is the job's id");
    let copy = reqwest::get(format!("{}/j/{ok}/outputs/d/copy", b.url)).await.unwrap().text().await.unwrap();
    assert_eq!(copy, "input bytes");

    let job = b.finished(&failed).await;
    assert_eq!(job["reason"], "failed", "{job}");
    assert_eq!(job["exitCode"], 3);
    assert_eq!(job["outputs"][0]["path"], "p", "outputs of failed jobs are kept too");
    // Removal follows the finish (the result does not wait for it).
    tokio::time::timeout(WAIT, all_removed(&w.id)).await.expect("finished containers are removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_cancels_and_memory_limits() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let w = start_worker(config(&b.url, &unique("limits"), dir.path(), 3));
    // maxDuration counts from the start of the attempt, container creation included: 8 s leave
    // a loaded machine time to start the container and write the output before the timeout.
    let slow =
        b.submit(json!({ "image": IMAGE, "command": sh("echo begin > /outputs/o; sleep 60"), "maxDuration": 8 })).await;
    let cancelled = b.submit(json!({ "image": IMAGE, "command": sh("echo started; sleep 60") })).await;
    let hungry = b
        .submit(json!({ "image": IMAGE, "resources": { "memory": "8m" },
            "command": sh("x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived") }))
        .await;

    b.follow_until(&cancelled, |v| logged(v, "started")).await;
    let r = reqwest::Client::new().post(format!("{}/j/{cancelled}/cancel", b.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let job = b.finished(&cancelled).await;
    assert_eq!(job["reason"], "cancelled");

    let job = b.finished(&slow).await;
    assert_eq!(job["reason"], "timedOut", "{job}");
    assert_eq!(job["outputs"][0]["path"], "o", "outputs of timed-out jobs are kept");
    assert!(b.log_text(&slow).await.contains("maximum duration"));

    let job = b.finished(&hungry).await;
    assert_eq!(job["reason"], "failed", "{job}");
    assert_eq!(job["exitCode"], 137);
    let logs = b.log_text(&hungry).await;
    assert!(logs.contains("memory limit") && !logs.contains("survived"), "{logs}");

    // The cancelled container is gone (cancel kills at once; removal follows).
    tokio::time::timeout(WAIT, all_removed(&w.id)).await.expect("containers removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_arrive_while_the_job_runs() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let _w = start_worker(config(&b.url, &unique("live"), dir.path(), 1));
    // The job waits for its own first line to reach the broker before it ends.
    let probe = b.submit(json!({ "image": IMAGE, "command": sh("echo first; sleep 2; echo second") })).await;
    let events = b.follow_until(&probe, |v| logged(v, "first")).await;
    assert!(!events.iter().any(is_finished), "the first line arrived before the job finished");
    let now = b.job(&probe).await;
    assert_eq!(now["state"], "running", "{now}");
    let job = b.finished(&probe).await;
    assert_eq!(job["reason"], "succeeded");
    assert_eq!(b.log_text(&probe).await, "first\nsecond\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_dockerfile_is_built_with_its_build_arg_and_cached() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let _w = start_worker(config(&b.url, &unique("build"), dir.path(), 1));
    let greeting = format!("hello-{}", unique("g"));
    let build = json!({ "dockerfile": format!("FROM {IMAGE}\nARG GREETING\nRUN echo $GREETING > /greeting\n"),
        "buildArgs": { "GREETING": greeting } });
    let id = b.submit(json!({ "build": build, "command": ["cat", "/greeting"] })).await;
    let job = b.finished(&id).await;
    assert_eq!(job["reason"], "succeeded", "{job} {}", b.log_text(&id).await);
    assert!(b.log_text(&id).await.contains(&greeting));
    let tag = worker::docker::build_tag(&serde_json::from_value(build.clone()).unwrap());
    assert!(docker().await.inspect_image(&tag).await.is_ok(), "built image cached as {tag}");

    let broken = b.submit(json!({ "build": { "dockerfile": format!("FROM {IMAGE}\nRUN exit 7\n") } })).await;
    let job = b.finished(&broken).await;
    assert_eq!(job["reason"], "error", "{job}");
    assert!(job["message"].as_str().unwrap().contains("build"), "{job}");
    let _ = docker().await.remove_image(&tag, None::<bollard::query_parameters::RemoveImageOptions>, None).await;

    let missing = b.submit(json!({ "image": "cq-test/no-such-image:1", "command": ["true"] })).await;
    let job = b.finished(&missing).await;
    assert_eq!(job["reason"], "error", "{job}");
    assert!(job["message"].as_str().unwrap().contains("cq-test/no-such-image"), "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_job_is_finished_by_another_worker() {
    docker().await;
    let b = Broker::start(0);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = start_killable_worker(config(&b.url, &unique("lost-a"), dir_a.path(), 1));
    let id = b.submit(json!({ "image": IMAGE, "command": sh("echo started; sleep 2; echo done") })).await;
    b.follow_until(&id, |v| logged(v, "started")).await;
    assert_eq!(b.job(&id).await["worker"], a.id.as_str());
    // Kill: the worker's connection drops without a goodbye.
    tokio::task::block_in_place(|| a.kill());
    let w2 = start_worker(config(&b.url, &unique("lost-b"), dir_b.path(), 1));
    let job = b.finished(&id).await;
    assert_eq!(job["reason"], "succeeded", "{job}");
    assert_eq!(job["worker"], w2.id.as_str());
    assert_eq!(job["attempt"], 2);
    remove_containers_of(&a.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_reattaches_to_its_running_container() {
    docker().await;
    let b = Broker::start(60_000);
    let dir = tempfile::tempdir().unwrap();
    let id_name = unique("restart");
    let mut first = start_killable_worker(config(&b.url, &id_name, dir.path(), 1));
    let id =
        b.submit(json!({ "image": IMAGE, "command": sh("echo one; sleep 3; echo two; echo r > /outputs/r") })).await;
    b.follow_until(&id, |v| logged(v, "one")).await;
    tokio::task::block_in_place(|| first.kill());
    let containers = containers_of(&id_name).await;
    assert_eq!(containers.len(), 1, "the container outlives its worker");
    let _again = start_worker(config(&b.url, &id_name, dir.path(), 1));
    let job = b.finished(&id).await;
    assert_eq!(job["reason"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 1, "the same attempt, not a rerun");
    assert_eq!(job["outputs"][0]["path"], "r");
    let logs = b.log_text(&id).await;
    assert_eq!(logs.matches("one\n").count(), 1, "no line twice: {logs}");
    assert!(logs.contains("two\n") && logs.contains("re-attached"), "{logs}");
}

/// A worker stopped between creating a job's container and starting it leaves a container that
/// never ran. Restarted, it starts that container: Docker's wait would answer at once with exit
/// code 0 for a job that never ran. The window is made here by replacing the running container of
/// a killed worker with an unstarted copy (same name, labels, command and mounts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_starts_a_container_it_created_but_never_started() {
    let d = docker().await;
    let b = Broker::start(60_000);
    let dir = tempfile::tempdir().unwrap();
    let id_name = unique("unstarted");
    let mut first = start_killable_worker(config(&b.url, &id_name, dir.path(), 1));
    let id = b.submit(json!({ "image": IMAGE, "command": sh("echo ran; sleep 2; echo r > /outputs/r") })).await;
    b.follow_until(&id, |v| logged(v, "ran")).await;
    tokio::task::block_in_place(|| first.kill());
    let [container] = containers_of(&id_name).await.try_into().expect("one container");
    let seen = d.inspect_container(&container, None).await.unwrap();
    let made = seen.config.unwrap();
    worker::docker::remove(&d, &container).await.unwrap();
    let copy = bollard::models::ContainerCreateBody {
        image: made.image,
        cmd: made.cmd,
        entrypoint: made.entrypoint,
        env: made.env,
        labels: made.labels,
        host_config: seen.host_config,
        ..Default::default()
    };
    let name = seen.name.unwrap_or_default().trim_start_matches('/').to_string();
    let options = bollard::query_parameters::CreateContainerOptions { name: Some(name), ..Default::default() };
    let copied = d.create_container(Some(options), copy).await.unwrap().id;
    let _again = start_worker(config(&b.url, &id_name, dir.path(), 1));
    let job = b.finished(&id).await;
    assert_eq!(job["reason"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 1, "the same attempt, not a rerun");
    assert_eq!(job["outputs"][0]["path"], "r", "the container ran to its end: {job}");
    let logs = b.log_text(&id).await;
    assert!(logs.contains("starting it now"), "{logs}");
    tokio::time::timeout(WAIT, all_removed(&id_name)).await.expect("the finished container is removed");
    assert!(d.inspect_container(&copied, None).await.is_err());
}

/// Lines a job prints while its worker has no broker are not lost when that worker is killed
/// then: the restarted worker reads the log again from the last line it sent, not the last it
/// read. The job waits for files the test creates in its outputs directory; while the broker is
/// away it prints 20,000 lines, which the worker has read (most of them, at least) by the time
/// Docker has the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_printed_while_the_broker_was_away_survive_a_killed_worker() {
    let d = docker().await;
    let mut b = Broker::start(60_000);
    let dir = tempfile::tempdir().unwrap();
    let id_name = unique("gap");
    let mut first = start_killable_worker(config(&b.url, &id_name, dir.path(), 1));
    let script = "echo one; until [ -e /outputs/two ]; do sleep 0.1; done; echo two; seq 1 20000; \
                  echo away; until [ -e /outputs/three ]; do sleep 0.1; done; echo three";
    let id = b.submit(json!({ "image": IMAGE, "command": sh(script) })).await;
    b.follow_until(&id, |v| logged(v, "one")).await;
    b.stop();
    let outputs = dir.path().join("jobs").join(format!("{id}-1")).join("outputs");
    std::fs::write(outputs.join("two"), "").unwrap();
    let [container] = containers_of(&id_name).await.try_into().expect("one container");
    let printed = worker::docker::logs(&d, &container, 0).any(|(_, line)| std::future::ready(line.text == "away\n"));
    assert!(tokio::time::timeout(WAIT, printed).await.unwrap(), "the job printed its lines");
    tokio::task::block_in_place(|| first.kill());
    b.restart();
    let _again = start_worker(config(&b.url, &id_name, dir.path(), 1));
    std::fs::write(outputs.join("three"), "").unwrap();
    let job = b.finished(&id).await;
    assert_eq!(job["reason"], "succeeded", "{job}");
    let logs = b.log_text(&id).await;
    for line in ["one", "two", "away", "three"] {
        assert_eq!(logs.lines().filter(|l| *l == line).count(), 1, "{line:?} once");
    }
    let numbers: Vec<u32> = logs.lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(numbers, (1..=20000).collect::<Vec<u32>>(), "every line printed while the broker was away, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_one_host_leave_each_other_s_containers_alone() {
    docker().await;
    let b = Broker::start(60_000);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_worker(config(&b.url, &unique("pair-a"), dir_a.path(), 1));
    let id = b.submit(json!({ "image": IMAGE, "command": sh("echo running; sleep 60") })).await;
    b.follow_until(&id, |v| logged(v, "running")).await;
    let mine = containers_of(&a.id).await;
    assert_eq!(mine.len(), 1);
    // B starts on the same Docker host: its start-up clean-up must not touch A's container.
    let b_worker = start_worker(config(&b.url, &unique("pair-b"), dir_b.path(), 1));
    let other = b.submit(json!({ "image": IMAGE, "command": ["true"] })).await;
    let job = b.finished(&other).await;
    assert_eq!(job["worker"], b_worker.id.as_str());
    assert_eq!(containers_of(&a.id).await, mine, "A's container is untouched");
    assert!(worker::docker::is_running(&docker().await, &mine[0]).await);
    reqwest::Client::new().post(format!("{}/j/{id}/cancel", b.url)).send().await.unwrap();
    b.finished(&id).await;
    // The test's runtime ends with it: remove what A would have cleaned up a moment later.
    remove_containers_of(&a.id).await;
}

/// Workers started together on a fresh host race to create the jobs' network; every one of them
/// must come up (a network of this test's own, so running jobs keep theirs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_starting_together_share_the_network_one_of_them_creates() {
    let d = docker().await;
    let name = unique("net");
    let bridge = format!("cqt{:x}", std::process::id() & 0xfffff);
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let (d, name, bridge) = (d.clone(), name.clone(), bridge.clone());
            tokio::spawn(async move { worker::docker::ensure_bridge(&d, &name, &bridge).await })
        })
        .collect();
    let mut results = Vec::new();
    for r in racers {
        results.push(r.await.unwrap());
    }
    let networks = d
        .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
            filters: Some(std::collections::HashMap::from([("name".to_string(), vec![name.clone()])])),
        }))
        .await
        .unwrap();
    d.remove_network(&name).await.unwrap();
    for r in results {
        r.unwrap_or_else(|e| panic!("a racing worker could not start: {e:?}"));
    }
    assert_eq!(networks.len(), 1, "one network, not one per worker: {networks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_hands_back_what_it_cannot_finish() {
    docker().await;
    let b = Broker::start(60_000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&b.url, &unique("drain"), dir.path(), 2);
    cfg.drain_timeout = Duration::from_millis(300);
    let mut w = start_worker(cfg);
    let quick = b.submit(json!({ "image": IMAGE, "command": sh("echo quick") })).await;
    b.finished(&quick).await;
    let long = b.submit(json!({ "image": IMAGE, "command": sh("echo long; sleep 60") })).await;
    b.follow_until(&long, |v| logged(v, "long")).await;
    let _ = w.stop.take().unwrap().send(());
    tokio::time::timeout(WAIT, w.task).await.expect("the worker stops after its drain").unwrap().unwrap();
    let job = b.job(&long).await;
    assert_eq!(job["state"], "queued", "handed back at once, not after the lease: {job}");
    tokio::time::timeout(WAIT, all_removed(&w.id)).await.expect("the drained worker's containers are removed");
    let summary: Value = reqwest::get(format!("{}/q/local", b.url)).await.unwrap().json().await.unwrap();
    assert_eq!(summary["queued"], 1, "{summary}");
}

/// A worker stopped mid-queue: what it runs is handed back when its drain deadline passes, what
/// waits in the queue stays there, and a second worker runs every job exactly once to success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_queue_loses_and_duplicates_nothing() {
    docker().await;
    let b = Broker::start(60_000);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = config(&b.url, &unique("midq-a"), dir_a.path(), 2);
    cfg.drain_timeout = Duration::from_millis(200);
    let mut a = start_worker(cfg);
    let mut ids = Vec::new();
    for i in 0..4 {
        // Long enough that the first worker cannot finish it before it is stopped and drained,
        // even on a loaded machine where seeing both jobs start can take seconds.
        let script = format!("echo start {i}; sleep 5; echo done {i}");
        ids.push(b.submit(json!({ "image": IMAGE, "command": sh(&script) })).await);
    }
    for id in &ids[..2] {
        b.follow_until(id, |v| logged(v, "start")).await;
    }
    let _ = a.stop.take().unwrap().send(());
    tokio::time::timeout(WAIT, a.task).await.expect("drained").unwrap().unwrap();
    let summary: Value = reqwest::get(format!("{}/q/local", b.url)).await.unwrap().json().await.unwrap();
    assert_eq!(summary["queued"], 4, "everything is back in the queue: {summary}");
    let w2 = start_worker(config(&b.url, &unique("midq-b"), dir_b.path(), 4));
    for (i, id) in ids.iter().enumerate() {
        let job = b.finished(id).await;
        assert_eq!(job["reason"], "succeeded", "{job}");
        assert_eq!(job["worker"], w2.id.as_str());
        let logs = b.log_text(id).await;
        assert_eq!(logs.matches(&format!("done {i}")).count(), 1, "ran to the end once: {logs}");
    }
    let summary: Value = reqwest::get(format!("{}/q/local", b.url)).await.unwrap().json().await.unwrap();
    assert_eq!(summary["finished"], 4, "{summary}");
    tokio::time::timeout(WAIT, all_removed(&a.id)).await.expect("the stopped worker left nothing behind");
}

// ---- regressions: every way an attempt ends frees its slot and says what happened ----

/// Reproduction 1: a cancelled job, and a job superseded through its namespace, give their slot
/// back at once, so a one-slot worker runs the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repro_1_cancel_and_supersede_free_the_slot() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let w = start_worker(config(&b.url, &unique("cancel"), dir.path(), 1));
    let long = b.submit(json!({ "image": IMAGE, "command": sh("echo started; sleep 30") })).await;
    b.follow_until(&long, |v| logged(v, "started")).await;
    b.cancel(&long).await;
    let next = b.submit(json!({ "image": IMAGE, "command": sh("echo next") })).await;
    assert_eq!(b.finished(&next).await["reason"], "succeeded");
    assert_eq!(b.job(&long).await["reason"], "cancelled");

    let first = b
        .submit_body(
            json!({ "definition": { "image": IMAGE, "command": sh("echo one; sleep 30") }, "namespace": "edit" }),
        )
        .await;
    b.follow_until(&first, |v| logged(v, "one")).await;
    let second = b
        .submit_body(json!({ "definition": { "image": IMAGE, "command": sh("echo two") }, "namespace": "edit" }))
        .await;
    assert_eq!(b.finished(&second).await["reason"], "succeeded");
    assert_eq!(b.job(&first).await["reason"], "superseded");

    let s = b.summary().await;
    assert_eq!(
        (s["slots"].as_u64(), s["freeSlots"].as_u64(), s["running"].as_u64()),
        (Some(1), Some(1), Some(0)),
        "{s}"
    );
    tokio::time::timeout(WAIT, all_removed(&w.id)).await.expect("containers removed");
}

/// Reproduction 2: a build from a tarball URL works (the worker fetches the context), and a
/// context that cannot be fetched ends the job with a clear error instead of a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repro_2_remote_build_from_a_tarball() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let w = start_worker(config(&b.url, &unique("remote"), dir.path(), 1));
    let marker = unique("built");
    let dockerfile = format!("FROM {IMAGE}\nCOPY marker /marker\n");
    let mut tar = tar::Builder::new(Vec::new());
    for (name, text) in [("Dockerfile", dockerfile.as_str()), ("marker", marker.as_str())] {
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, text.as_bytes()).unwrap();
    }
    let url = serve_once_per_request(tar.into_inner().unwrap(), "200 OK").await;
    let build = json!({ "tarball": url });
    let id = b.submit(json!({ "build": build, "command": ["cat", "/marker"] })).await;
    let job = b.finished(&id).await;
    assert_eq!(job["reason"], "succeeded", "{job} {}", b.log_text(&id).await);
    assert!(b.log_text(&id).await.contains(&marker));
    let tag = worker::docker::build_tag(&serde_json::from_value(build).unwrap());
    let _ = docker().await.remove_image(&tag, None::<bollard::query_parameters::RemoveImageOptions>, None).await;

    let missing = serve_once_per_request(Vec::new(), "404 Not Found").await;
    let id = b.submit(json!({ "build": { "tarball": missing }, "command": ["true"] })).await;
    let job = b.finished(&id).await;
    assert_eq!(job["reason"], "error", "{job}");
    assert!(job["message"].as_str().unwrap().contains("404"), "{job}");
    let s = b.summary().await;
    assert_eq!(s["freeSlots"], s["slots"], "{s}");
    tokio::time::timeout(WAIT, all_removed(&w.id)).await.expect("containers removed");
}

/// Reproduction 3: 20,000 output files with long names no longer make a finish the broker
/// refuses: the first 1000 are kept, the log says so, and the worker goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repro_3_twenty_thousand_outputs_are_capped() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let _w = start_worker(config(&b.url, &unique("outputs"), dir.path(), 1));
    let many = b
        .submit(json!({ "image": IMAGE,
            "command": sh("cd /outputs && awk 'BEGIN{for(i=1;i<=20000;i++) printf \"%0100d\\n\", i}' | xargs touch") }))
        .await;
    let job = b.finished(&many).await;
    assert_eq!(job["reason"], "succeeded", "{job}");
    assert_eq!(job["outputs"].as_array().unwrap().len(), 1000);
    let logs = b.log_text(&many).await;
    assert!(logs.contains("output limit of 1000 files reached: kept 1000 of 20000"), "{logs}");
    let next = b.submit(json!({ "image": IMAGE, "command": sh("echo after") })).await;
    assert_eq!(b.finished(&next).await["reason"], "succeeded");
}

/// Reproduction 4: the last line without a newline reaches the log, and 1 MiB of control
/// characters (6 MiB as JSON) followed by a 1 MiB line without a newline no longer disconnect
/// the worker: the job succeeds, untruncated, and what arrives is the job's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repro_4_logs_keep_partial_lines_and_control_characters() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let _w = start_worker(config(&b.url, &unique("logs"), dir.path(), 1));
    let tail = b.submit(json!({ "image": IMAGE, "command": sh("printf no-newline-at-end") })).await;
    assert_eq!(b.finished(&tail).await["reason"], "succeeded");
    assert_eq!(b.log_text(&tail).await, "no-newline-at-end");

    let control = b.submit(json!({ "image": IMAGE, "command": sh(BULK) })).await;
    let job = b.finished(&control).await;
    assert_eq!(job["reason"], "succeeded", "{job}");
    assert!(job.get("logTruncated").is_none(), "{job}");
    let text: String = b.job_lines(&control).await.iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert!(!text.is_empty() && text.bytes().all(|c| c == 1 || c == b'x'), "only the job's bytes arrive");
}

/// 1 MiB of a control character, then a 1 MiB line without a newline.
const BULK: &str = "head -c 1048576 /dev/zero | tr '\\0' '\\1'; head -c 1048576 /dev/zero | tr '\\0' x";

/// Every byte of bulk output arrives, also when the engine rotates the container's log file in
/// the middle of it (json-file with `max-size`; 10m on the test machine, where 3 MiB of a
/// control character are 18 MiB of JSON). Open: across a rotation the engine's live stream
/// stalls, or repeats pieces, and every 16 KiB piece of one unterminated line carries the same
/// timestamp, so the stored log cannot be resumed in the middle of the line. Reading the
/// container's output by attaching to it, not from the log files, would avoid both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "open: the engine's live log stream stalls or repeats pieces across a log rotation"]
async fn repro_4_bulk_output_arrives_whole() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let _w = start_worker(config(&b.url, &unique("bulk"), dir.path(), 1));
    let script = "head -c 3145728 /dev/zero | tr '\\0' '\\1'; head -c 1048576 /dev/zero | tr '\\0' x";
    let id = b.submit(json!({ "image": IMAGE, "command": sh(script) })).await;
    assert_eq!(b.finished(&id).await["reason"], "succeeded");
    let text: String = b.job_lines(&id).await.iter().map(|l| l["text"].as_str().unwrap()).collect();
    let (ones, xs) = (text.bytes().filter(|c| *c == 1).count(), text.bytes().filter(|c| *c == b'x').count());
    assert_eq!((ones, xs, text.len()), (3 << 20, 1 << 20, 4 << 20));
}

/// Reproduction 5: an image that cannot be pulled is retried with a backoff (the job says why it
/// waits), then ends as an error with the reason; a missing command ends the job at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repro_5_errors_are_classified_and_retries_are_visible() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let _w = start_worker(config(&b.url, &unique("errors"), dir.path(), 1));
    let missing = b
        .submit_body(json!({ "definition": { "image": "cq-test/no-such-image:2", "command": ["true"] }, "retries": 1 }))
        .await;
    let seen = b.follow_until(&missing, is_finished).await;
    let waits: Vec<&str> = seen.iter().filter_map(|v| v["data"]["job"]["waiting"].as_str()).collect();
    assert!(waits.iter().any(|w| w.contains("retry 1 of 1") && w.contains("cq-test/no-such-image")), "{seen:?}");
    let job = b.job(&missing).await;
    assert_eq!(job["reason"], "error", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");

    // The container's init reports a missing command (exit 127): the job fails at once.
    let nocmd = b.submit(json!({ "image": IMAGE, "command": ["/no/such/command"] })).await;
    let job = b.finished(&nocmd).await;
    assert!(job["reason"] == "failed" || job["reason"] == "error", "{job}");
    assert_eq!(job["attempt"], 1, "a permanent error is not retried: {job}");
    assert!(
        b.log_text(&nocmd).await.contains("/no/such/command")
            || job["message"].as_str().is_some_and(|m| m.contains("/no/such/command")),
        "{job}"
    );
}

/// A one-line HTTP server on 127.0.0.1 answering every request with `response`; returns its port
/// and a counter of the connections it accepted.
async fn tiny_server(
    addr: std::net::IpAddr,
    response: String,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind((addr, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(response.as_bytes()).await;
            });
        }
    });
    (port, hits)
}

fn ok_response(body: &str) -> String {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_inputs_are_fetched_only_from_where_the_job_could_reach() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
    let (secret, secret_hits) = tiny_server(localhost, ok_response("secret of the host\n")).await;
    let moved = format!(
        "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{secret}/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let (redirect, _) = tiny_server(localhost, moved).await;
    let mut cfg = config(&b.url, &unique("ssrf"), dir.path(), 2);
    // The owner opened `localhost` on purpose; 127.0.0.1 stays closed.
    cfg.limits.fetch.allow_hosts = vec!["localhost".into()];
    let _w = start_worker(cfg);
    let job = |url: String| json!({ "image": IMAGE, "command": sh("cat /inputs/x"), "inputs": { "x": { "type": "url", "url": url } } });

    let direct = b.submit(job(format!("http://127.0.0.1:{secret}/"))).await;
    let v = b.finished(&direct).await;
    assert_eq!(v["reason"], "error", "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("loopback") && message.contains("--allow-input-host"), "{message}");

    let hop = b.submit(job(format!("http://localhost:{redirect}/"))).await;
    let v = b.finished(&hop).await;
    assert_eq!(v["reason"], "error", "a redirect to a loopback address is refused too: {v}");
    assert!(v["message"].as_str().unwrap().contains("127.0.0.1"), "{v}");
    assert_eq!(secret_hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the loopback server was never asked");

    let allowed = b.submit(job(format!("http://localhost:{secret}/"))).await;
    let v = b.finished(&allowed).await;
    assert_eq!(v["reason"], "succeeded", "{v}");
    assert!(b.log_text(&allowed).await.contains("secret of the host"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cannot_reach_the_host_at_the_gateway_address() {
    let d = docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let w = start_worker(config(&b.url, &unique("gateway"), dir.path(), 1));
    // A job first, so the network exists and the worker has set it up.
    let warm = b.submit(json!({ "image": IMAGE, "command": sh("true") })).await;
    assert_eq!(b.finished(&warm).await["reason"], "succeeded");
    let gateway = worker::docker::gateway(&d).await.expect("the jobs' network has a gateway");
    let (port, hits) = tiny_server(gateway.parse().unwrap(), ok_response("host service\n")).await;
    let probe = b
        .submit(json!({ "image": IMAGE, "command": sh(&format!(
            "if wget -q -T 5 -O - http://{gateway}:{port}/; then echo REACHED; else echo BLOCKED; fi")) }))
        .await;
    let v = b.finished(&probe).await;
    assert_eq!(v["reason"], "succeeded", "{v}");
    let log = b.log_text(&probe).await;
    assert!(log.contains("BLOCKED") && !log.contains("host service"), "{log}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the host's listener saw no connection");
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_not_the_job_sets_the_ceilings() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&b.url, &unique("ceilings"), dir.path(), 2);
    cfg.limits.max_shm = 64 << 20;
    cfg.limits.default_memory = Some(64 << 20);
    let _w = start_worker(cfg);
    let greedy = b.submit(json!({ "image": IMAGE, "command": sh("true"), "resources": { "shmSize": "64g" } })).await;
    let v = b.finished(&greedy).await;
    assert_eq!(v["reason"], "error", "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("resources.shmSize") && message.contains("maximum of 64 MiB"), "{message}");
    // A job that asks for nothing gets the worker's default memory limit.
    let plain = b
        .submit(
            json!({ "image": IMAGE, "command": sh("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived") }),
        )
        .await;
    let v = b.finished(&plain).await;
    assert_eq!((v["reason"].as_str(), v["exitCode"].as_i64()), (Some("failed"), Some(137)), "{v}");
    let logs = b.log_text(&plain).await;
    assert!(logs.contains("memory limit") && !logs.contains("survived"), "{logs}");
}

/// A Docker network made for one test, removed when dropped (even when the test fails).
struct TestNetwork(String);

impl TestNetwork {
    async fn create(name: &str) -> TestNetwork {
        let request = bollard::models::NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            labels: Some(std::collections::HashMap::from([("cq.test".to_string(), "true".to_string())])),
            ..Default::default()
        };
        docker().await.create_network(request).await.unwrap();
        TestNetwork(name.to_string())
    }

    /// The network's IPv4 subnet as (address, prefix length).
    async fn subnet(&self) -> (std::net::Ipv4Addr, u32) {
        let net = docker().await.inspect_network(&self.0, None).await.unwrap();
        let configs = net.ipam.and_then(|i| i.config).unwrap_or_default();
        let subnet = configs.iter().filter_map(|c| c.subnet.clone()).find(|s| !s.contains(':')).unwrap();
        let (addr, len) = subnet.split_once('/').unwrap();
        (addr.parse().unwrap(), len.parse().unwrap())
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let name = self.0.clone();
        // Drop cannot await; a runtime of its own on a thread of its own removes the network.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Err(e) = docker().await.remove_network(&name).await {
                    eprintln!("cannot remove the test network {name}: {e}");
                }
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_network_none_and_a_named_network() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let show = json!({ "image": IMAGE, "command": sh("ls /sys/class/net") });

    // `none`: the container has a loopback interface and nothing else.
    let mut cfg = config(&b.url, &unique("net-none"), dir.path().join("none").as_path(), 1);
    cfg.limits.network = worker::limits::JobNetwork::None;
    let w = start_worker(cfg);
    let id = b.submit(show).await;
    let v = b.finished(&id).await;
    assert_eq!(v["reason"], "succeeded", "{v}");
    let log = b.log_text(&id).await;
    assert_eq!(log.split_whitespace().collect::<Vec<_>>(), ["lo"], "no interface but loopback: {log}");
    let none_id = w.id.clone();
    drop(w);
    all_removed(&none_id).await;

    // A named network: the job's address is in that network's subnet.
    let net = TestNetwork::create(&unique("net")).await;
    let (subnet, len) = net.subnet().await;
    let mut cfg = config(&b.url, &unique("net-named"), dir.path().join("named").as_path(), 1);
    cfg.limits.network = worker::limits::JobNetwork::Named(net.0.clone());
    let w = start_worker(cfg);
    let id = b.submit(json!({ "image": IMAGE, "command": sh("ip -4 -o addr show dev eth0") })).await;
    let v = b.finished(&id).await;
    assert_eq!(v["reason"], "succeeded", "{v}");
    let log = b.log_text(&id).await;
    let addr: std::net::Ipv4Addr = log
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address in {log:?}"));
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    assert_eq!(u32::from(addr) & mask, u32::from(subnet) & mask, "{addr} is not in {subnet}/{len}");
    let named_id = w.id.clone();
    drop(w);
    all_removed(&named_id).await;
    drop(net);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_input_over_the_worker_s_limit_ends_the_job_with_a_clear_error() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
    let (big, _) = tiny_server(localhost, ok_response(&"x".repeat(5000))).await;
    // No Content-Length: the limit must hold while the body streams, too.
    let no_length = format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{}", "y".repeat(5000));
    let (streamed, _) = tiny_server(localhost, no_length).await;
    let (small, _) = tiny_server(localhost, ok_response("small enough\n")).await;
    let mut cfg = config(&b.url, &unique("max-input"), dir.path(), 2);
    cfg.limits.fetch.allow_hosts = vec!["localhost".into()];
    cfg.limits.fetch.max_bytes = 1000;
    let _w = start_worker(cfg);
    let job = |port: u16| {
        json!({ "image": IMAGE, "command": sh("cat /inputs/x"),
        "inputs": { "x": { "type": "url", "url": format!("http://localhost:{port}/") } } })
    };
    for port in [big, streamed] {
        let id = b.submit(job(port)).await;
        let v = b.finished(&id).await;
        assert_eq!(v["reason"], "error", "{v}");
        let message = v["message"].as_str().unwrap();
        assert!(message.contains("larger than this worker's limit of 1000 bytes"), "{message}");
    }
    let id = b.submit(job(small)).await;
    assert_eq!(b.finished(&id).await["reason"], "succeeded");
    assert!(b.log_text(&id).await.contains("small enough"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_one_directory_per_queue() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&b.url, &unique("cache"), dir.path(), 1);
    // Named with a `:` (as a cluster's queues sharing a shard are): the host path of the cache
    // holds it, which a `host:container` bind would cut in the wrong place.
    cfg.queues = vec!["gpu:a".into(), "gpu:b".into()];
    let _w = start_worker(cfg);
    let submit = |queue: &'static str, script: &str| {
        let url = format!("{}/q/{queue}/j", b.url);
        let definition = json!({ "image": IMAGE, "command": sh(script) });
        async move {
            let r = reqwest::Client::new().post(url).json(&json!({ "definition": definition })).send().await.unwrap();
            let body: Value = r.json().await.unwrap();
            body["jobId"].as_str().unwrap_or_else(|| panic!("{body}")).to_string()
        }
    };
    let plant = submit("gpu:a", "echo 'echo planted' > /cache/run.sh").await;
    assert_eq!(b.finished(&plant).await["reason"], "succeeded");
    let other = submit("gpu:b", "if [ -e /cache/run.sh ]; then echo SEEN; else echo ABSENT; fi").await;
    assert_eq!(b.finished(&other).await["reason"], "succeeded");
    assert!(b.log_text(&other).await.contains("ABSENT"), "another queue's job does not see the file");
    let same = submit("gpu:a", "sh /cache/run.sh").await;
    assert_eq!(b.finished(&same).await["reason"], "succeeded");
    assert!(b.log_text(&same).await.contains("planted"), "the same queue's next job does");
}

/// The worker's output ceilings: past the file count or the byte total, the outputs up to the
/// limit are kept and the log says so; a job whose directory grows past the disk ceiling is
/// stopped with an error, keeping what it wrote within the output limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_and_disk_ceilings_set_by_the_worker() {
    docker().await;
    let b = Broker::start(30_000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&b.url, &unique("ceil-out"), dir.path(), 3);
    cfg.output_limits = worker::job::OutputLimits { max_files: 3, max_bytes: 10, max_job_disk: Some(1 << 20) };
    let w = start_worker(cfg);
    let files = b.submit(json!({ "image": IMAGE, "command": sh("cd /outputs && touch a b c d e") })).await;
    let bytes = b
        .submit(json!({ "image": IMAGE, "command": sh("cd /outputs && echo 1234 > a && echo 5678 > b && echo 9 > c") }))
        .await;
    let disk = b
        .submit(json!({ "image": IMAGE, "command": sh("echo x > /outputs/a; head -c 4194304 /dev/zero > /outputs/big; sleep 60") }))
        .await;

    let job = b.finished(&files).await;
    assert_eq!(job["reason"], "succeeded", "{job}");
    let paths: Vec<&str> = job["outputs"].as_array().unwrap().iter().map(|o| o["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["a", "b", "c"]);
    let log = b.log_text(&files).await;
    assert!(log.contains("output limit of 3 files reached: kept 3 of 5"), "{log}");

    let job = b.finished(&bytes).await;
    assert_eq!(job["reason"], "succeeded", "{job}");
    let paths: Vec<&str> = job["outputs"].as_array().unwrap().iter().map(|o| o["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["a", "b"], "5 + 5 bytes fit in 10, the third file does not");
    let log = b.log_text(&bytes).await;
    assert!(log.contains("output limit of 10 bytes reached: kept 2 of 3"), "{log}");

    let job = b.finished(&disk).await;
    assert_eq!(job["reason"], "error", "{job}");
    assert!(job["message"].as_str().unwrap().contains("limit of 1048576 bytes"), "{job}");
    assert_eq!(job["outputs"][0]["path"], "a", "the outputs within the limits are kept: {job}");
    let log = b.log_text(&disk).await;
    assert!(log.contains("over this worker's limit of 1048576 bytes"), "{log}");
    tokio::time::timeout(WAIT, all_removed(&w.id)).await.expect("containers removed");
}
