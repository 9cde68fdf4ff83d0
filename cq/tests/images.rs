//! The container images, built and run: `docker/broker.Dockerfile` and `docker/worker.Dockerfile`
//! on a Debian base that `scripts/base-image.sh` makes without a registry, with the `cq` binary
//! this test suite built. The broker's container serves `/readyz`, keeps an acknowledged job across
//! a restart, and a worker's container on the same Docker network runs that job to its output.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs a command and returns its stdout; panics with its stderr when it fails.
fn output(cmd: &mut Command) -> String {
    let out = cmd.stderr(Stdio::piped()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{stderr}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

fn docker(args: &[&str]) -> String {
    output(Command::new("docker").args(args))
}

/// The tokens the broker's container is started with: without them, a broker listening on every
/// interface refuses to start.
const CLIENT_TOKEN: &str = "images-test-client-token";
const WORKER_TOKEN: &str = "images-test-worker-token";

fn cq(url: &str, args: &[&str]) -> String {
    output(Command::new(env!("CARGO_BIN_EXE_cq")).args(args).env("CQ_URL", url).env("CQ_TOKEN", CLIENT_TOKEN))
}

/// What the test made in Docker, removed when dropped (also when the test fails).
#[derive(Default)]
struct Made {
    containers: Vec<String>,
    network: Option<String>,
    images: Vec<String>,
}

impl Drop for Made {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("docker").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        for c in &self.containers {
            // -v: the anonymous volume behind the image's VOLUME goes with it.
            quiet(&["rm", "-f", "-v", c]);
        }
        if let Some(n) = &self.network {
            quiet(&["network", "rm", n]);
        }
        for i in &self.images {
            quiet(&["rmi", "-f", i]);
        }
    }
}

/// Builds `docker/<name>.Dockerfile` from the prebuilt binary in `context`, on `base`. The build
/// stage is built and tagged first (the whole build then reuses it), so that removing both tags
/// leaves no untagged stage image behind.
fn build(made: &mut Made, name: &str, context: &Path, base: &str) -> String {
    let dockerfile = repo().join(format!("docker/{name}.Dockerfile"));
    let [rust, base, prebuilt] = [format!("RUST_IMAGE={base}"), format!("BASE_IMAGE={base}"), "CQ_PREBUILT=cq".into()];
    let args = ["build", "--quiet", "--file", dockerfile.to_str().unwrap()];
    let args = [&args[..], &["--build-arg", &rust, "--build-arg", &base, "--build-arg", &prebuilt]].concat();
    let stage = format!("cq-test/{name}-build-stage:{}", std::process::id());
    made.images.push(stage.clone());
    docker(&[&args[..], &["--target", "build", "--tag", &stage, context.to_str().unwrap()]].concat());
    let tag = format!("cq-test/{name}:{}", std::process::id());
    made.images.push(tag.clone());
    docker(&[&args[..], &["--tag", &tag, context.to_str().unwrap()]].concat());
    tag
}

/// Follows a container's log until `count` lines contain `listening on` (a restarted container's
/// log still holds the lines of its earlier starts), then returns the host address its port 8000
/// is published on. Panics with the log when the container stops first.
fn wait_listening(container: &str, count: usize) -> String {
    use std::io::{BufRead, BufReader};
    let mut logs = support::Killed(
        Command::new("docker")
            .args(["logs", "--follow", container])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut seen = 0;
    for line in BufReader::new(logs.0.stdout.take().unwrap()).lines() {
        seen += usize::from(line.unwrap().starts_with("listening on "));
        if seen == count {
            let port = docker(&["port", container, "8000/tcp"]);
            // One line per address family; the test publishes on 127.0.0.1 only.
            return format!("http://{}", port.lines().next().unwrap().trim());
        }
    }
    let all = Command::new("docker").args(["logs", container]).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&all.stdout), String::from_utf8_lossy(&all.stderr));
    panic!("{container} stopped before it listened; its output:\n{out}\n{err}");
}

/// The base image, made on first use (debootstrap, about a minute; then cached by Docker).
fn base_image() -> String {
    let out = output(Command::new(repo().join("scripts/base-image.sh")).stdout(Stdio::piped()));
    out.lines().last().expect("base-image.sh prints the image's name").to_string()
}

/// The Docker engine's socket, to mount into the worker's container.
fn docker_socket() -> String {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => host
            .strip_prefix("unix://")
            .unwrap_or_else(|| {
                panic!("the worker image test mounts the engine's socket; DOCKER_HOST={host} is not one")
            })
            .to_string(),
        _ => "/var/run/docker.sock".to_string(),
    }
}

// The test's steps are blocking commands (docker, cq); its runtime serves one request.
#[tokio::test]
async fn the_broker_and_worker_images_build_and_run_a_job() {
    let base = base_image();
    output(&mut Command::new(repo().join("scripts/test-image.sh")));
    let tmp = tempfile::tempdir().unwrap();
    let context = tmp.path().join("context");
    std::fs::create_dir(&context).unwrap();
    // The debug binary without its debug info (a tenth of the size); a plain copy where `strip`
    // is missing.
    let binary = context.join("cq");
    let stripped = Command::new("strip")
        .args(["--strip-debug", "-o", binary.to_str().unwrap(), env!("CARGO_BIN_EXE_cq")])
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(env!("CARGO_BIN_EXE_cq"), &binary).unwrap();
    }

    let mut made = Made::default();
    let broker_image = build(&mut made, "broker", &context, &base);
    let worker_image = build(&mut made, "worker", &context, &base);
    // The broker runs as its own unprivileged user.
    let user = docker(&["image", "inspect", "--format", "{{.Config.User}}", &broker_image]);
    assert_eq!(user.trim(), "10001:10001");

    let id = std::process::id();
    let network = format!("cq-test-images-{id}");
    docker(&["network", "create", &network]);
    made.network = Some(network.clone());
    let broker = format!("cq-test-broker-{id}");
    made.containers.push(broker.clone());
    let tokens = [format!("CQ_CLIENT_TOKEN={CLIENT_TOKEN}"), format!("CQ_WORKER_TOKEN={WORKER_TOKEN}")];
    let publish = ["--publish", "127.0.0.1::8000"];
    let env = ["--env", &tokens[0], "--env", &tokens[1]];
    docker(
        &[&["run", "--detach", "--name", &broker, "--network", &network][..], &publish, &env, &[&broker_image]]
            .concat(),
    );
    let url = wait_listening(&broker, 1);
    let ready = reqwest::get(format!("{url}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.text().await.unwrap(), "ready\n");

    // A job acknowledged before any worker exists, then the broker's container restarted: the job
    // is still queued (its log is on the image's /data volume, writable by the broker's user).
    let submitted = cq(
        &url,
        &[
            "submit",
            "--queue",
            "images",
            "--image",
            "cq-test/busybox",
            "--",
            "sh",
            "-c",
            "echo built > /outputs/made.txt",
        ],
    );
    let job = submitted.split_whitespace().find(|w| w.len() == 64).expect("submit prints the job id").to_string();
    docker(&["restart", &broker]);
    let url = wait_listening(&broker, 2);
    let status = cq(&url, &["status", "--output", "json", &job]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["state"], "queued", "{status}");

    // The worker's container drives the host's engine through its socket; job mounts are host
    // paths, so its data directory is mounted at the same path inside and out.
    let data = tmp.path().join("worker");
    std::fs::create_dir(&data).unwrap();
    let data = data.to_str().unwrap();
    let socket = docker_socket();
    let worker = format!("cq-test-worker-{id}");
    made.containers.push(worker.clone());
    docker(&[
        "run",
        "--detach",
        "--name",
        &worker,
        "--network",
        &network,
        "--volume",
        &format!("{socket}:/var/run/docker.sock"),
        "--volume",
        &format!("{data}:{data}"),
        "--env",
        &tokens[1],
        &worker_image,
        "worker",
        "--url",
        &format!("http://{broker}:8000"),
        "--queue",
        "images",
        "--data-dir",
        data,
        "--job-network",
        "none",
    ]);
    // Follows the job to its end (the worker's container takes it at once).
    cq(&url, &["logs", "--follow", &job]);
    let status: serde_json::Value = serde_json::from_str(&cq(&url, &["status", "--output", "json", &job])).unwrap();
    assert_eq!(status["state"], "finished", "{status}\nworker log:\n{}", docker(&["logs", &worker]));
    let results = tmp.path().join("results");
    cq(&url, &["outputs", &job, "--output-dir", results.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(results.join("made.txt")).unwrap(), "built\n");
}
