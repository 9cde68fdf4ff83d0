//! The Docker side of the worker (bollard): images (present, pulled with progress, or built and
//! cached by the hash of their recipe), hardened containers labelled with the worker and job,
//! live logs, waiting with a deadline, and finding this worker's containers again after a
//! restart. A worker only ever lists, stops or removes containers carrying its own worker label.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountType, NetworkCreateRequest};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, CreateImageOptions, InspectContainerOptions, KillContainerOptions,
    ListContainersOptions, LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use futures_util::{Stream, StreamExt};
use protocol::definition::{BuildSpec, JobDefinition, write_canonical};
use protocol::{JobId, LogLine, Stream as LogStream};
use sha2::{Digest, Sha256};

/// Label naming the worker that owns a container.
pub const LABEL_WORKER: &str = "cq.worker";
/// Label naming the job a container runs.
pub const LABEL_JOB: &str = "cq.job";
/// Label naming the attempt a container runs.
pub const LABEL_ATTEMPT: &str = "cq.attempt";
/// The bridge network job containers join: outbound traffic allowed, no traffic between
/// containers.
pub const NETWORK: &str = "cq-jobs";
/// The host interface of [`NETWORK`].
pub const BRIDGE: &str = "cq-jobs0";
/// Processes a job may start unless the worker says otherwise.
pub const DEFAULT_PIDS_LIMIT: i64 = 4096;
/// Largest build context (`build.tarball`) the worker downloads.
pub const MAX_BUILD_CONTEXT: u64 = 512 << 20;

/// A failure to run a job, as the user should read it; `retryable` when another attempt (on
/// this or another worker) could succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub message: String,
    pub retryable: bool,
}

impl JobError {
    pub fn user(message: impl Into<String>) -> JobError {
        JobError { message: message.into(), retryable: false }
    }
    pub fn infra(message: impl Into<String>) -> JobError {
        JobError { message: message.into(), retryable: true }
    }
}

/// Connects to the Docker engine (DOCKER_HOST or the local socket) and checks it answers.
pub async fn connect() -> Result<Docker, JobError> {
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| JobError::infra(format!("cannot connect to Docker: {e}. Is Docker running?")))?;
    docker.ping().await.map_err(|e| JobError::infra(format!("Docker does not answer: {e}. Is Docker running?")))?;
    Ok(docker)
}

/// Makes sure the jobs' network exists.
pub async fn ensure_network(docker: &Docker) -> Result<(), JobError> {
    ensure_bridge(docker, NETWORK, BRIDGE).await
}

/// Makes sure the isolated bridge network `name` (Linux bridge `bridge`) exists. Several workers
/// starting at once on one host race to create it: Docker refuses all but one (409 for the name,
/// or 403 for the bridge name, depending on how far the others got), so a refused create that
/// leaves the network in place is success.
pub async fn ensure_bridge(docker: &Docker, name: &str, bridge: &str) -> Result<(), JobError> {
    if docker.inspect_network(name, None).await.is_ok() {
        return Ok(());
    }
    let options = HashMap::from([
        ("com.docker.network.bridge.enable_icc".to_string(), "false".to_string()),
        ("com.docker.network.bridge.name".to_string(), bridge.to_string()),
    ]);
    let request = NetworkCreateRequest {
        name: name.into(),
        driver: Some("bridge".into()),
        options: Some(options),
        labels: Some(HashMap::from([("cq.network".to_string(), "jobs".to_string())])),
        ..Default::default()
    };
    match docker.create_network(request).await {
        Ok(_) => Ok(()),
        Err(e) => {
            // Another worker on this host created it first.
            if docker.inspect_network(name, None).await.is_ok() {
                return Ok(());
            }
            Err(JobError::infra(format!("cannot create the `{name}` network: {e}")))
        }
    }
}

/// The name of the Docker network jobs join under `choice`, made ready: the isolated bridge is
/// created if needed and fenced off from the host where the worker may install the rule; a
/// named network must exist. Says at start what jobs can and cannot reach.
pub async fn prepare_network(docker: &Docker, choice: &crate::limits::JobNetwork) -> Result<String, JobError> {
    use crate::limits::JobNetwork;
    match choice {
        JobNetwork::None => {
            tracing::info!("jobs run without a network");
            Ok("none".into())
        }
        JobNetwork::Named(name) => {
            docker.inspect_network(name, None).await.map_err(|e| {
                JobError::infra(format!("the job network `{name}` does not exist ({e}); create it or pick another"))
            })?;
            tracing::info!(network = %name, "jobs join the network the worker's owner chose; its rules decide what they reach");
            Ok(name.clone())
        }
        JobNetwork::Isolated => {
            ensure_network(docker).await?;
            let isolation = tokio::task::spawn_blocking(|| crate::firewall::isolate_host(BRIDGE))
                .await
                .unwrap_or_else(|e| crate::firewall::HostIsolation::Missing(e.to_string()));
            match isolation {
                crate::firewall::HostIsolation::Enforced => {
                    tracing::info!(network = NETWORK, "jobs reach the internet but not this host nor each other");
                }
                crate::firewall::HostIsolation::Missing(why) => {
                    let gateway = gateway(docker).await.unwrap_or_else(|| "its gateway".into());
                    tracing::warn!(
                        network = NETWORK,
                        "jobs CAN reach services listening on this host (at {gateway} and its other addresses): \
                         the firewall rule that blocks them could not be installed ({why}). Run the worker with \
                         the privilege to change iptables, or choose --job-network none or a network of your own"
                    );
                }
            }
            Ok(NETWORK.into())
        }
    }
}

/// The gateway address of the jobs' network: the host as jobs see it.
pub async fn gateway(docker: &Docker) -> Option<String> {
    let net = docker.inspect_network(NETWORK, None).await.ok()?;
    net.ipam?.config?.into_iter().find_map(|c| c.gateway)
}

/// Progress of an image pull or build, for watchers.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProgress {
    pub message: String,
    pub current: Option<u64>,
    pub total: Option<u64>,
}

/// The image to run for `definition`: present locally, pulled, or built (and cached under a tag
/// derived from the build recipe). `progress` hears about pulls and builds; build output lines
/// go to `log`.
pub async fn ensure_image(
    docker: &Docker,
    http: &reqwest::Client,
    definition: &JobDefinition,
    progress: &(dyn Fn(ImageProgress) + Send + Sync),
    log: &(dyn Fn(String) + Send + Sync),
) -> Result<String, JobError> {
    if let Some(image) = &definition.image {
        if docker.inspect_image(image).await.is_ok() {
            return Ok(image.clone());
        }
        pull(docker, image, progress).await?;
        return Ok(image.clone());
    }
    let build = definition.build.as_ref().ok_or_else(|| JobError::user("the job has neither image nor build"))?;
    let tag = build_tag(build);
    if docker.inspect_image(&tag).await.is_ok() {
        return Ok(tag);
    }
    build_image(docker, http, build, &tag, progress, log).await?;
    Ok(tag)
}

async fn pull(docker: &Docker, image: &str, progress: &(dyn Fn(ImageProgress) + Send + Sync)) -> Result<(), JobError> {
    let (name, tag) = split_tag(image);
    let options =
        CreateImageOptions { from_image: Some(name.to_string()), tag: tag.map(str::to_string), ..Default::default() };
    let mut stream = docker.create_image(Some(options), None, None);
    // Bytes per layer, to report one total.
    let mut layers: HashMap<String, (u64, u64)> = HashMap::new();
    let mut last = std::time::Instant::now() - Duration::from_secs(1);
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let (Some(id), Some(detail)) = (&info.id, &info.progress_detail)
                    && let (Some(cur), Some(total)) = (detail.current, detail.total)
                {
                    layers.insert(id.clone(), (cur.max(0) as u64, total.max(0) as u64));
                }
                if last.elapsed() >= Duration::from_millis(250) {
                    last = std::time::Instant::now();
                    let (cur, total) = layers.values().fold((0, 0), |(c, t), (lc, lt)| (c + lc, t + lt));
                    progress(ImageProgress {
                        message: format!("pulling {image}: {}", info.status.unwrap_or_default()),
                        current: (total > 0).then_some(cur),
                        total: (total > 0).then_some(total),
                    });
                }
            }
            Err(e) => return Err(pull_error(image, e)),
        }
    }
    Ok(())
}

fn pull_error(image: &str, e: bollard::errors::Error) -> JobError {
    classify_pull_failure(image, &e.to_string())
}

/// What the engine's answer to a failed pull means for the job. A registry that answers that
/// the image does not exist, or refuses access, is final: the job ends at once. Anything else
/// (no registry reachable, DNS, a timeout, a registry error) may pass, so the attempt fails as
/// retryable and the broker tries again within the job's retry budget, with a backoff, then
/// ends the job as `error` with this message.
pub fn classify_pull_failure(image: &str, text: &str) -> JobError {
    const FINAL: [&str; 9] = [
        "not found",
        "manifest unknown",
        "does not exist",
        "denied",
        "unauthorized",
        "authentication required",
        "invalid reference format",
        "must be lowercase",
        "no matching manifest",
    ];
    let lower = text.to_lowercase();
    if FINAL.iter().any(|f| lower.contains(f)) {
        JobError::user(format!("image `{image}` cannot be pulled (not found, or access denied): {text}"))
    } else {
        JobError::infra(format!("image `{image}` is not on this worker and pulling it failed: {text}"))
    }
}

/// `name[:tag]` → (name, tag); a digest reference keeps its digest in the name.
fn split_tag(image: &str) -> (&str, Option<&str>) {
    if image.contains('@') {
        return (image, None);
    }
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (image, Some("latest")),
    }
}

/// The tag a build recipe's image is cached under: the hash of its canonical JSON.
pub fn build_tag(build: &BuildSpec) -> String {
    let mut canonical = Vec::new();
    write_canonical(&serde_json::to_value(build).unwrap_or_default(), &mut canonical);
    let hash = hex::encode(Sha256::digest(&canonical));
    format!("cq-build/{}:latest", &hash[..24])
}

/// The URL with any `user:secret@` removed, for messages and logs.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}{path}"),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// Builds the image. A tarball context is downloaded by the worker and sent as the build's
/// body, so it works wherever the worker can reach the URL (the engine may live in another
/// network namespace) and counts against the job's time like any other step. A git context is
/// fetched by the engine itself (`remote`), which needs git on the engine's host.
async fn build_image(
    docker: &Docker,
    http: &reqwest::Client,
    build: &BuildSpec,
    tag: &str,
    progress: &(dyn Fn(ImageProgress) + Send + Sync),
    log: &(dyn Fn(String) + Send + Sync),
) -> Result<(), JobError> {
    if build.dockerfile.is_some() && (build.git.is_some() || build.tarball.is_some()) {
        return Err(JobError::user(
            "an inline `dockerfile` with a git or tarball context is not supported; put the Dockerfile in the context and name it with `filename`",
        ));
    }
    let (source, remote, context) = match (&build.git, &build.tarball, &build.dockerfile) {
        (Some(git), _, _) => {
            // Docker's git context syntax: `url#ref:dir`, either part optional.
            let url = match (&git.git_ref, &git.dir) {
                (Some(r), Some(d)) => format!("{}#{r}:{d}", git.url),
                (None, Some(d)) => format!("{}#:{d}", git.url),
                (Some(r), None) => format!("{}#{r}", git.url),
                (None, None) => git.url.clone(),
            };
            (redact(&url), Some(url), Vec::new())
        }
        (None, Some(url), _) => {
            progress(ImageProgress {
                message: format!("downloading the build context from {}", redact(url)),
                current: None,
                total: None,
            });
            (redact(url), None, download_context(http, url).await?)
        }
        (None, None, Some(text)) => ("inline Dockerfile".to_string(), None, dockerfile_tar(text)?),
        (None, None, None) => return Err(JobError::user("the build names no context and no Dockerfile")),
    };
    // The engine API always wants a body: an empty one when the engine fetches the context.
    let body = Some(bollard::body_full(context.into()));
    progress(ImageProgress { message: format!("building from {source}"), current: None, total: None });
    let options = BuildImageOptions {
        dockerfile: build.filename.clone().unwrap_or_else(|| "Dockerfile".into()),
        t: Some(tag.to_string()),
        remote,
        rm: true,
        forcerm: true,
        buildargs: (!build.build_args.is_empty())
            .then(|| build.build_args.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        platform: build.platform.clone().unwrap_or_default(),
        target: build.target.clone().unwrap_or_default(),
        labels: Some(HashMap::from([("cq.build".to_string(), "true".to_string())])),
        ..Default::default()
    };
    let mut stream = docker.build_image(options, None, body);
    let mut tail: Vec<String> = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(text) = info.stream {
                    for line in text.lines().filter(|l| !l.trim().is_empty()) {
                        log(format!("{line}\n"));
                        tail.push(line.to_string());
                        if tail.len() > 20 {
                            tail.remove(0);
                        }
                    }
                }
                if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                    return Err(build_failed(&source, &detail, &tail));
                }
            }
            Err(e) => return Err(build_failed(&source, &e.to_string(), &tail)),
        }
    }
    if docker.inspect_image(tag).await.is_err() {
        return Err(build_failed(&source, "the build produced no image", &tail));
    }
    Ok(())
}

/// Downloads a build context, at most [`MAX_BUILD_CONTEXT`] bytes. A refusal by the server
/// (4xx) is the job's error; a network failure or a server error may pass.
async fn download_context(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, JobError> {
    let shown = redact(url);
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| JobError::infra(format!("downloading the build context from {shown} failed: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let message = format!("downloading the build context from {shown} failed: {status}");
        return Err(if status.is_client_error() { JobError::user(message) } else { JobError::infra(message) });
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| JobError::infra(format!("downloading the build context from {shown} failed: {e}")))?;
        if body.len() as u64 + chunk.len() as u64 > MAX_BUILD_CONTEXT {
            return Err(JobError::user(format!(
                "the build context at {shown} is larger than {} MiB",
                MAX_BUILD_CONTEXT >> 20
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn build_failed(source: &str, error: &str, tail: &[String]) -> JobError {
    let log =
        if tail.is_empty() { String::new() } else { format!("\nlast lines of the build log:\n{}", tail.join("\n")) };
    JobError::user(format!("building the image from {source} failed: {error}{log}"))
}

/// A tar archive holding only `Dockerfile`.
fn dockerfile_tar(text: &str) -> Result<Vec<u8>, JobError> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(text.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder
        .append_data(&mut header, "Dockerfile", text.as_bytes())
        .map_err(|e| JobError::infra(format!("packing the Dockerfile: {e}")))?;
    builder.into_inner().map_err(|e| JobError::infra(format!("packing the Dockerfile: {e}")))
}

/// Everything a container needs besides the image.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub worker: String,
    pub job: JobId,
    pub attempt: u32,
    /// Host directories mounted at `/inputs` (read-only), `/outputs` and `/cache` (also at
    /// `/job-cache`).
    pub inputs_dir: String,
    pub outputs_dir: String,
    pub cache_dir: String,
    pub gpu_devices: Vec<String>,
    pub pids_limit: i64,
    /// `<broker>/j/<job id>`: the job's URL, without a trailing slash.
    pub url_prefix: String,
    /// Memory, CPUs and shm as the worker's ceilings allow them.
    pub granted: crate::limits::Granted,
    /// The Docker network to join (or `none`).
    pub network: String,
}

/// A bind mount of the host directory `source` (which exists) at `target`.
fn bind(source: &str, target: &str, read_only: bool) -> Mount {
    Mount {
        source: Some(source.to_string()),
        target: Some(target.to_string()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Default::default()
    }
}

/// Creates and starts a job's container; returns its id.
pub async fn start_container(docker: &Docker, def: &JobDefinition, spec: &ContainerSpec) -> Result<String, JobError> {
    let mut env: Vec<String> = def.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("JOB_ID={}", spec.job));
    env.push("JOB_INPUTS=/inputs".into());
    env.push("JOB_OUTPUTS=/outputs".into());
    env.push("JOB_CACHE=/cache".into());
    // What containers written for the reference system expect.
    env.push(format!("JOB_URL_PREFIX={}", spec.url_prefix));
    env.push(format!("JOB_INPUTS_URL_PREFIX={}/inputs/", spec.url_prefix));
    env.push(format!("JOB_OUTPUTS_URL_PREFIX={}/outputs/", spec.url_prefix));
    let memory = spec.granted.memory.map(|m| m as i64);
    let host = HostConfig {
        // Mounts rather than `host:container` binds, which a `:` in a host path (a queue named
        // `gpu:a` names its cache directory) would cut in the wrong place.
        mounts: Some(vec![
            bind(&spec.inputs_dir, "/inputs", true),
            bind(&spec.outputs_dir, "/outputs", false),
            bind(&spec.cache_dir, "/cache", false),
            // The reference mounts its shared cache at /job-cache; the same directory serves both.
            bind(&spec.cache_dir, "/job-cache", false),
        ]),
        network_mode: Some(spec.network.clone()),
        privileged: Some(false),
        security_opt: Some(vec!["no-new-privileges".into()]),
        cap_drop: Some(vec!["ALL".into()]),
        pids_limit: Some(spec.pids_limit),
        memory,
        // No swap beyond the memory limit.
        memory_swap: memory,
        nano_cpus: spec.granted.cpus.map(|c| (c * 1e9) as i64),
        shm_size: spec.granted.shm.map(|s| s as i64),
        device_requests: (!spec.gpu_devices.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                device_ids: Some(spec.gpu_devices.clone()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]
        }),
        init: Some(true),
        ..Default::default()
    };
    let labels = HashMap::from([
        (LABEL_WORKER.to_string(), spec.worker.clone()),
        (LABEL_JOB.to_string(), spec.job.to_string()),
        (LABEL_ATTEMPT.to_string(), spec.attempt.to_string()),
    ]);
    let config = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: def.command.as_ref().map(|c| c.args().to_vec()),
        entrypoint: def.entrypoint.as_ref().map(|c| c.args().to_vec()),
        working_dir: def.workdir.clone(),
        env: Some(env),
        labels: Some(labels),
        host_config: Some(host),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        ..Default::default()
    };
    let options = CreateContainerOptions { name: Some(spec.name.clone()), ..Default::default() };
    let created = docker.create_container(Some(options), config).await.map_err(|e| create_error(&spec.image, e))?;
    start_created(docker, &created.id).await?;
    Ok(created.id)
}

/// Starts a container that was created; if it cannot start, removes it.
pub async fn start_created(docker: &Docker, id: &str) -> Result<(), JobError> {
    if let Err(e) = docker.start_container(id, None).await {
        let _ = remove(docker, id).await;
        return Err(start_error(e));
    }
    Ok(())
}

fn create_error(image: &str, e: bollard::errors::Error) -> JobError {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code: 404, message } => {
            JobError::user(format!("image `{image}` not found: {message}"))
        }
        bollard::errors::Error::DockerResponseServerError { status_code: 400, message } => {
            JobError::user(format!("Docker refused the container: {message}"))
        }
        other => JobError::infra(format!("creating the container failed: {other}")),
    }
}

fn start_error(e: bollard::errors::Error) -> JobError {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code: 400 | 404 | 500, message }
            if message.contains("executable file not found")
                || message.contains("no such file or directory")
                || message.contains("permission denied") =>
        {
            JobError::user(format!("the command cannot be started: {message}"))
        }
        other => JobError::infra(format!("starting the container failed: {other}")),
    }
}

/// The container's output from `since_ns` (nanoseconds since the epoch, exclusive) on, live
/// until it exits, as log lines with their Docker timestamps.
pub fn logs(docker: &Docker, id: &str, since_ns: u128) -> impl Stream<Item = (u128, LogLine)> + Send + 'static {
    logs_with(docker, id, since_ns, true)
}

/// What the engine has stored of the container's output after `since_ns`, without following.
pub fn logs_stored(docker: &Docker, id: &str, since_ns: u128) -> impl Stream<Item = (u128, LogLine)> + Send + 'static {
    logs_with(docker, id, since_ns, false)
}

fn logs_with(
    docker: &Docker,
    id: &str,
    since_ns: u128,
    follow: bool,
) -> impl Stream<Item = (u128, LogLine)> + Send + 'static {
    let options = LogsOptions {
        follow,
        stdout: true,
        stderr: true,
        timestamps: true,
        since: (since_ns / 1_000_000_000) as i32,
        ..Default::default()
    };
    docker.logs(id, Some(options)).filter_map(move |item| async move {
        let output = item.ok()?;
        let (stream, bytes) = match output {
            bollard::container::LogOutput::StdOut { message } => (LogStream::Stdout, message),
            bollard::container::LogOutput::StdErr { message } => (LogStream::Stderr, message),
            bollard::container::LogOutput::Console { message } => (LogStream::Stdout, message),
            bollard::container::LogOutput::StdIn { .. } => return None,
        };
        let text = String::from_utf8_lossy(&bytes);
        let (stamp, text) = text.split_once(' ').unwrap_or(("", &text));
        let ns = humantime::parse_rfc3339(stamp)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or_else(now_ns);
        if ns <= since_ns {
            return None;
        }
        Some((ns, LogLine { stream, time: (ns / 1_000_000) as u64, text: text.to_string() }))
    })
}

/// Nanoseconds since the epoch.
pub fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i64,
    pub oom_killed: bool,
}

/// Waits for the container to stop and reads how it ended.
pub async fn wait(docker: &Docker, id: &str) -> Result<Exit, JobError> {
    let mut stream = docker.wait_container(id, None::<bollard::query_parameters::WaitContainerOptions>);
    match stream.next().await {
        None | Some(Ok(_)) | Some(Err(bollard::errors::Error::DockerContainerWaitError { .. })) => {}
        Some(Err(e)) => return Err(JobError::infra(format!("waiting for the container failed: {e}"))),
    }
    let info = docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .map_err(|e| JobError::infra(format!("inspecting the container failed: {e}")))?;
    let state = info.state.unwrap_or_default();
    Ok(Exit { code: state.exit_code.unwrap_or(-1), oom_killed: state.oom_killed.unwrap_or(false) })
}

/// Whether the container is still running.
pub async fn is_running(docker: &Docker, id: &str) -> bool {
    docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .ok()
        .and_then(|i| i.state)
        .and_then(|s| s.running)
        .unwrap_or(false)
}

/// SIGTERM, then SIGKILL after `grace`.
pub async fn stop(docker: &Docker, id: &str, grace: Duration) {
    let options = StopContainerOptions { t: Some(grace.as_secs() as i32), ..Default::default() };
    if let Err(e) = docker.stop_container(id, Some(options)).await {
        tracing::debug!(container = id, error = %e, "stop");
    }
}

/// SIGKILL now.
pub async fn kill(docker: &Docker, id: &str) {
    let options = KillContainerOptions { signal: "KILL".into() };
    if let Err(e) = docker.kill_container(id, Some(options)).await {
        tracing::debug!(container = id, error = %e, "kill");
    }
}

/// Removes a container (running or not).
pub async fn remove(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
    match docker.remove_container(id, Some(options)).await {
        Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A container this worker started earlier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub id: String,
    pub job: JobId,
    pub attempt: u32,
    pub running: bool,
    /// Created but never started: the worker stopped between the two. Docker's wait answers
    /// at once for such a container, with exit code 0, so it must be started, not waited on.
    pub never_started: bool,
}

/// This worker's containers (by label), running or not.
pub async fn owned(docker: &Docker, worker: &str) -> Result<Vec<Owned>, JobError> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_WORKER}={worker}")])]);
    let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
    let list = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| JobError::infra(format!("listing containers failed: {e}")))?;
    let mut out = Vec::new();
    for c in list {
        let labels = c.labels.unwrap_or_default();
        // The filter already matched; check again rather than trust it with deletions.
        if labels.get(LABEL_WORKER).map(String::as_str) != Some(worker) {
            continue;
        }
        let job = labels.get(LABEL_JOB).and_then(|j| j.parse().ok());
        let attempt = labels.get(LABEL_ATTEMPT).and_then(|a| a.parse().ok());
        if let (Some(id), Some(job), Some(attempt)) = (c.id, job, attempt) {
            let state = c.state.map(|s| s.to_string()).unwrap_or_default();
            out.push(Owned { id, job, attempt, running: state == "running", never_started: state == "created" });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_s_refusal_is_final_and_an_unreachable_registry_is_not() {
        let final_answers = [
            "Error response from daemon: manifest for cq-test/x:1 not found: manifest unknown: manifest unknown",
            "pull access denied for cq-test/x, repository does not exist or may require 'docker login'",
            "Head \"https://registry.example/v2/x/manifests/1\": unauthorized: authentication required",
            "invalid reference format: repository name must be lowercase",
        ];
        for text in final_answers {
            let e = classify_pull_failure("cq-test/x:1", text);
            assert!(!e.retryable && e.message.contains("cq-test/x:1") && e.message.contains(text), "{e:?}");
        }
        let passing = [
            "Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io on 10.0.0.53:53: no such host",
            "Get \"https://registry-1.docker.io/v2/\": net/http: request canceled while waiting for connection",
            "received unexpected HTTP status: 503 Service Unavailable",
        ];
        for text in passing {
            let e = classify_pull_failure("cq-test/x:1", text);
            assert!(e.retryable && e.message.contains("not on this worker") && e.message.contains(text), "{e:?}");
        }
    }
}
