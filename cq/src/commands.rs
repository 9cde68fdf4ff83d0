//! The CLI commands: each turns parsed arguments into calls on the broker library or the API
//! client, and prints what a person wants to see.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use broker::auth::Tokens;
use broker::core::CoreConfig;
use broker::runtime::{FsyncMode, StoreConfig};
use protocol::definition::{DurationSpec, JobDefinition, parse_json};
use protocol::{FinishReason, JobId, JobState, JobView, LogLine, Stream};
use serde_json::{Value, json};

use crate::client::Client;
use crate::{BrokerArgs, CancelArgs, DevArgs, Fsync, LogsArgs, Output, StatusArgs, SubmitArgs, WorkerArgs};

pub async fn dev(args: DevArgs) -> Result<ExitCode> {
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => {
            dirs::data_local_dir().map(|d| d.join("cq").join("dev")).unwrap_or_else(|| PathBuf::from("cq-dev-data"))
        }
    };
    // Bad flags are refused before anything starts.
    let output_limits = args.outputs.config()?;
    if !args.listen.ip().is_loopback() {
        if !args.access.insecure_no_auth {
            bail!(
                "cq dev has no tokens, so it listens on loopback only; {} is reachable from elsewhere. \
                 Use `cq broker` with --client-token-file and --worker-token-file, or pass --insecure-no-auth",
                args.listen
            );
        }
        tracing::warn!(listen = %args.listen, "--insecure-no-auth: anyone who can reach this address can run jobs");
    }
    let config = broker::Config {
        store: StoreConfig {
            data_dir: data_dir.clone(),
            fsync: FsyncMode::Always,
            core: CoreConfig::default(),
            nats: None,
        },
        tokens: Tokens::default(),
        max_body: broker::http::DEFAULT_MAX_BODY,
        blobs: broker::blob::BlobConfig::default(),
        access: args.access.config(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    outln!("listening on http://{addr}");
    eprintln!("cq dev: broker on http://{addr} (data in {})", data_dir.display());
    eprintln!(
        "cq dev: open http://{addr}/ in a browser; submit with `cq submit --url http://{addr} --image IMAGE --wait -- COMMAND`"
    );
    // The worker stops first and hands back what it holds; then the broker.
    let (broker_stop_tx, broker_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (worker_stop_tx, worker_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let broker_stop = async move {
        let _ = broker_stop_rx.await;
    };
    let mut broker = tokio::spawn(broker::run(listener, config, broker_stop));
    let worker = if args.no_worker {
        None
    } else {
        let mut config = worker_config(vec![format!("http://{addr}")], data_dir.join("worker"), None, args.slots)?;
        // On Ctrl-C, running jobs get a few seconds, then go back to the queue.
        config.drain_timeout = std::time::Duration::from_secs(10);
        config.output_limits = output_limits;
        eprintln!("cq dev: local worker {} on queue `local` with {} slots", config.worker_id, config.slots);
        Some(tokio::spawn(async move {
            let drained = async move {
                let _ = worker_stop_rx.await;
            };
            if let Err(e) = worker::run(config, drained).await {
                eprintln!("cq dev: the local worker stopped: {e:#}. Jobs wait until a worker connects (`cq worker`).");
            }
        }))
    };
    tokio::select! {
        _ = shutdown_signal() => {}
        r = &mut broker => {
            r??;
            return Ok(ExitCode::SUCCESS);
        }
    }
    eprintln!("cq dev: stopping (running jobs get up to 10 s, then go back to the queue)");
    let _ = worker_stop_tx.send(());
    if let Some(w) = worker {
        let _ = w.await;
    }
    let _ = broker_stop_tx.send(());
    broker.await??;
    Ok(ExitCode::SUCCESS)
}

/// A worker's settings for the broker at `urls` (one, or several of one cluster): its id (given, or generated once and kept in
/// `data_dir`), its slots (given, or one per CPU), and defaults for the rest.
fn worker_config(
    urls: Vec<String>,
    data_dir: PathBuf,
    worker_id: Option<String>,
    slots: Option<u32>,
) -> Result<worker::Config> {
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    // Job directories are bind-mounted, and Docker takes only absolute host paths.
    let data_dir = std::path::absolute(&data_dir).with_context(|| format!("resolving {}", data_dir.display()))?;
    let worker_id = match worker_id {
        Some(id) => id,
        None => {
            let file = data_dir.join("worker-id");
            match std::fs::read_to_string(&file) {
                Ok(id) => id.trim().to_string(),
                Err(_) => {
                    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
                    let host: String =
                        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect();
                    use std::hash::{BuildHasher, Hasher};
                    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                    h.write_u64(std::process::id() as u64);
                    let id =
                        format!("{}-{:06x}", if host.is_empty() { "worker" } else { &host }, h.finish() & 0xff_ffff);
                    std::fs::write(&file, &id).with_context(|| format!("writing {}", file.display()))?;
                    id
                }
            }
        }
    };
    protocol::id::validate_name("worker id", &worker_id, false).map_err(|e| anyhow::anyhow!(e))?;
    let worker_id = protocol::WorkerId(worker_id);
    let slots = slots.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1));
    if slots == 0 {
        bail!("--slots must be at least 1");
    }
    Ok(worker::Config {
        broker_urls: urls,
        token: None,
        worker_id,
        queues: vec!["local".into()],
        slots,
        gpus: Vec::new(),
        tags: Vec::new(),
        max_duration: None,
        data_dir,
        stop_grace: std::time::Duration::from_secs(10),
        drain_timeout: std::time::Duration::from_secs(300),
        pids_limit: worker::docker::DEFAULT_PIDS_LIMIT,
        output_limits: Default::default(),
        limits: worker::limits::Limits::default(),
    })
}

/// `--gpus 2` → devices 0 and 1; `--gpus 0,2` or UUIDs → those devices; `--gpus 0` → none.
fn parse_gpus(text: &str) -> Result<Vec<String>> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u32>()
        && !text.contains(',')
    {
        return Ok((0..n).map(|i| i.to_string()).collect());
    }
    let list: Vec<String> = text.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if list.is_empty() {
        bail!("--gpus wants a count or a device list, got `{text}`");
    }
    Ok(list)
}

pub async fn worker(args: WorkerArgs) -> Result<ExitCode> {
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => dirs::data_local_dir()
            .map(|d| d.join("cq").join("worker"))
            .unwrap_or_else(|| PathBuf::from("cq-worker-data")),
    };
    let token = match (args.token, args.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => Some(
            std::fs::read_to_string(&f)
                .with_context(|| format!("reading the worker token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    for url in &args.url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--url must be http:// or https:// URLs, comma-separated; got `{url}`");
        }
    }
    let config = worker::Config {
        token,
        queues: args.queues,
        gpus: parse_gpus(&args.gpus)?,
        tags: args.tags,
        max_duration: args.max_duration,
        stop_grace: args.stop_grace,
        drain_timeout: args.drain_timeout,
        pids_limit: args.pids_limit,
        limits: args.limits.config()?,
        output_limits: args.outputs.config()?,
        ..worker_config(args.url, data_dir, args.worker_id, args.slots)?
    };
    tracing::info!(worker = %config.worker_id, queues = ?config.queues, slots = config.slots, brokers = ?config.broker_urls, "worker starting");
    worker::run(config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn broker(args: BrokerArgs) -> Result<ExitCode> {
    let read_token = |value: Option<String>, file: Option<PathBuf>, what: &str| -> Result<Option<String>> {
        let token = match (value, file) {
            (Some(v), _) => Some(v),
            (None, Some(f)) => Some(
                std::fs::read_to_string(&f)
                    .with_context(|| format!("reading the {what} token file {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if token.as_deref() == Some("") {
            bail!("the {what} token is empty");
        }
        Ok(token)
    };
    let tokens = Tokens {
        client: read_token(args.client_token, args.client_token_file, "client")?,
        worker: read_token(args.worker_token, args.worker_token_file, "worker")?,
    };
    // Beyond loopback, every role needs a token unless the operator opens the broker on purpose.
    if !args.listen.ip().is_loopback() && (tokens.client.is_none() || tokens.worker.is_none()) {
        if !args.access.insecure_no_auth {
            bail!(
                "{} is reachable from other machines, so the broker needs a token for every role: \
                 set --client-token-file and --worker-token-file (or CQ_CLIENT_TOKEN and CQ_WORKER_TOKEN), \
                 or pass --insecure-no-auth to run it open to anyone who can reach it",
                args.listen
            );
        }
        if tokens.is_open() {
            tracing::warn!(listen = %args.listen, "--insecure-no-auth: no tokens, anyone who can reach this address can run jobs and read every job");
        }
    }
    let core = CoreConfig {
        lease_grace_ms: args.lease_grace.as_millis() as u64,
        retention_ms: args.retention.as_millis() as u64,
        default_retries: args.retries,
        accept_timeout_ms: args.accept_timeout.as_millis() as u64,
        max_log_bytes: args.max_log_bytes,
        ..CoreConfig::default()
    };
    let fsync = match args.fsync {
        Fsync::Always => FsyncMode::Always,
        Fsync::Never => FsyncMode::Never,
    };
    let nats = if args.cluster.nats.is_empty() {
        None
    } else {
        if args.blobs.s3_bucket.is_none() && !args.cluster.shared_blob_dir {
            bail!(
                "cluster mode (--nats) needs blob storage every broker shares: set --s3-bucket, or pass \
                 --shared-blob-dir if the blob directory is shared storage"
            );
        }
        let ttl = args.cluster.lease_ttl;
        let times = broker::ownership::LeaseTimes::for_ttl(ttl);
        times.validate().map_err(|e| anyhow::anyhow!("--lease-ttl: {e}"))?;
        let node = args.cluster.node_id.or_else(host_name).unwrap_or_else(|| "broker".into());
        if let Some(url) = &args.cluster.advertise_url
            && url.strip_prefix("http://").is_none_or(|rest| rest.is_empty() || rest.starts_with('/'))
        {
            bail!(
                "--advertise-url must be an http:// URL with a host, like http://10.0.0.5:8000 (the address \
                 this broker listens on, as other brokers reach it), got `{url}`"
            );
        }
        let nats = broker::jetstream::NatsConfig {
            creds_file: args.cluster.nats_creds,
            cluster: args.cluster.nats_cluster,
            replicas: args.cluster.nats_replicas,
            shards: args.cluster.shards,
            node,
            advertise_url: args.cluster.advertise_url,
            lease: Some(times),
            max_record: args.max_body as usize + (64 << 10),
            ..broker::jetstream::NatsConfig::new(args.cluster.nats)
        };
        nats.validate().map_err(|e| anyhow::anyhow!("--nats: {e}"))?;
        tracing::warn!(
            cluster = %nats.cluster,
            node = %nats.node,
            "cluster mode is experimental: each shard's log is in NATS JetStream, owned by one broker at a time"
        );
        Some(nats)
    };
    let config = broker::Config {
        store: StoreConfig { data_dir: args.data_dir, fsync, core, nats },
        tokens,
        max_body: args.max_body,
        blobs: args.blobs.config(),
        access: args.access.config(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let mut config = config;
    if let Some(nats) = config.store.nats.as_mut() {
        // Listening on one address (not all of them): that is where other brokers reach this one.
        if nats.advertise_url.is_none() && !addr.ip().is_unspecified() {
            nats.advertise_url = Some(format!("http://{addr}"));
        }
        if nats.advertise_url.is_none() {
            tracing::warn!(
                "no --advertise-url: while this broker is a standby it cannot relay requests to the owner, and the \
                 owner's standbys cannot relay to it"
            );
        }
    }
    tracing::info!(%addr, "broker listening");
    // The first line on stdout names the address, for scripts that listen on port 0.
    outln!("listening on http://{addr}");
    broker::run(listener, config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub async fn submit(args: SubmitArgs) -> Result<ExitCode> {
    let client = Client::new(&args.conn.url, args.conn.token.clone())?;
    let mut definition = match &args.file {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            parse_json::<JobDefinition>(&bytes)
                .with_context(|| format!("{} is not a valid job definition", path.display()))?
        }
        None => JobDefinition::default(),
    };
    if let Some(image) = args.image {
        definition.image = Some(image);
        definition.build = None;
    }
    if !args.command.is_empty() {
        definition.command = Some(protocol::definition::CommandLine::Args(args.command));
    }
    for kv in &args.env {
        let (k, v) = kv.split_once('=').with_context(|| format!("--env wants KEY=VALUE, got `{kv}`"))?;
        definition.env.insert(k.to_string(), v.to_string());
    }
    if let Some(d) = args.max_duration {
        definition.max_duration = Some(DurationSpec::Text(d));
    }
    definition.tags.extend(args.tag);
    if definition.image.is_none() && definition.build.is_none() {
        bail!("say what to run: --image IMAGE (or --file job.json with an image or build)");
    }
    crate::files::add_inputs(&mut definition, &args.input, &client, args.conn.token.clone()).await?;
    // Validate here too, so mistakes are reported before anything is sent.
    definition.clone().normalize().context("invalid job")?;
    let mut body = json!({ "definition": definition });
    if let Some(ns) = args.namespace {
        body["namespace"] = json!(ns);
    }
    if let Some(p) = args.priority {
        body["priority"] = json!(p);
    }
    if args.force {
        body["force"] = json!(true);
    }
    if let Some(r) = args.retries {
        body["retries"] = json!(r);
    }
    let answer = client.post(&format!("/q/{}/j", args.queue), &body).await?;
    let id: JobId =
        answer["jobId"].as_str().unwrap_or_default().parse().context("the broker's answer has no job id")?;
    let outcome = answer["outcome"].as_str().unwrap_or("");
    let json = args.output == Output::Json;
    if !args.wait {
        if json {
            outln!("{}", serde_json::to_string_pretty(&answer)?);
        } else {
            outln!("{id}");
        }
        let short = id.short();
        let url = client.url_flag();
        if outcome == "cached" {
            eprintln!("cq: a cached result (--force runs it again); see it with `cq status{url} {short}`");
        } else {
            eprintln!(
                "cq: job {outcome} on queue `{}`; follow it with `cq logs -f{url} {short}`, or `cq status{url} {short}`",
                args.queue
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Listen for Ctrl-C before saying anything, so that an interrupt from the moment the job is
    // announced is caught.
    let mut interrupt = interrupt_signal()?;
    eprintln!("cq: job {id} ({outcome}) on queue {}", args.queue);
    let following = follow(&client, id, 0, json);
    let view = tokio::select! {
        view = following => view?,
        _ = interrupt.recv() => return interrupted(&client, id, args.cancel_on_interrupt, json).await,
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&view)?);
    }
    Ok(exit_code(&view))
}

/// A stream of SIGINTs (Ctrl-C), listening from the moment it is made.
fn interrupt_signal() -> Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("listening for Ctrl-C")
}

/// Ctrl-C while following: by default the job keeps running, and the user is told so and how
/// to get back to it; with `--cancel-on-interrupt` it is cancelled (like `docker run`'s
/// attached mode, where Ctrl-C stops the container).
async fn interrupted(client: &Client, id: JobId, cancel: bool, json: bool) -> Result<ExitCode> {
    let short = id.short();
    let url = client.url_flag();
    if cancel {
        let v: JobView = serde_json::from_value(client.post(&format!("/j/{id}/cancel"), &json!({})).await?)?;
        eprintln!("\ncq: interrupted; {}", describe_end(&v));
        if json {
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
    } else {
        eprintln!(
            "\ncq: stopped following; job {short} is not cancelled: it stays on the broker and runs to its end.\n    \
             follow it again: cq logs -f{url} {short}\n    cancel it:       cq cancel{url} {short}\n    \
             (--cancel-on-interrupt cancels on Ctrl-C instead)"
        );
    }
    Ok(ExitCode::from(130))
}

/// Follows a job, printing its logs (all of them to stderr with `logs_to_stderr`), and returns
/// its final state.
async fn follow(client: &Client, id: JobId, since: u64, logs_to_stderr: bool) -> Result<JobView> {
    let mut last_state = None;
    let on_log = |line: &LogLine| {
        if logs_to_stderr {
            let newline = if line.text.ends_with('\n') { "" } else { "\n" };
            eprint!("{}{newline}", line.text);
        } else {
            print_line(line);
        }
    };
    let view = client
        .follow(id, since, on_log, |job| {
            // A change of the waiting reason (no worker could take the job, a retry's backoff)
            // is news too: without it a job nobody can run would wait in silence.
            let state = (job.state, job.progress.as_ref().map(|p| p.phase), job.waiting.clone());
            if last_state.as_ref() != Some(&state) && job.state != JobState::Finished {
                let worker = job.worker.as_ref().map(|w| format!(" on {w}")).unwrap_or_default();
                let phase = job
                    .progress
                    .as_ref()
                    .map(|p| format!(" ({})", serde_json::to_value(p.phase).unwrap_or_default().as_str().unwrap_or("")))
                    .unwrap_or_default();
                let waiting = job.waiting.as_ref().map(|w| format!(": {w}")).unwrap_or_default();
                eprintln!("cq: {}{worker}{phase}{waiting}", state_word(job.state));
                last_state = Some(state);
            }
        })
        .await?;
    eprintln!("cq: {}", describe_end(&view));
    Ok(view)
}

fn print_line(line: &LogLine) {
    let text = &line.text;
    let newline = if text.ends_with('\n') { "" } else { "\n" };
    match line.stream {
        Stream::Stdout => {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{text}{newline}");
            let _ = out.flush();
        }
        Stream::Stderr | Stream::System => eprint!("{text}{newline}"),
    }
}

pub(crate) fn state_word(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Assigned => "assigned",
        JobState::Running => "running",
        JobState::Finished => "finished",
    }
}

pub(crate) fn describe_end(v: &JobView) -> String {
    let reason = v.reason.map(FinishReason::as_str).unwrap_or("finished");
    let duration = match (v.started_at, v.finished_at) {
        (Some(s), Some(f)) => format!(" in {:.1}s", f.saturating_sub(s) as f64 / 1000.0),
        _ => String::new(),
    };
    let code = v.exit_code.map(|c| format!(", exit code {c}")).unwrap_or_default();
    let message = v
        .message
        .as_ref()
        .filter(|_| v.reason != Some(FinishReason::Failed))
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    let hint = v.message.as_deref().and_then(pull_hint).map(|h| format!("\ncq: {h}")).unwrap_or_default();
    format!("job {} {reason}{duration}{code}{message}{hint}", v.id.short())
}

/// What to try when the worker could not pull the job's image, most often because it has no
/// registry access: an image that is already there, or one built from a recipe.
fn pull_hint(message: &str) -> Option<&'static str> {
    // The worker's words for a failed pull, this version's and the previous one's.
    const PULL_FAILED: [&str; 4] =
        ["pulling it failed", "cannot be pulled", "pulling image", "not found (or access denied)"];
    PULL_FAILED.iter().any(|p| message.contains(p)).then_some(
        "the worker could not pull the image. Without registry access, run an image its Docker already has \
         (`docker images`; scripts/test-image.sh builds cq-test/busybox), or give a `build` recipe \
         (an inline Dockerfile, a git or tarball URL) in a --file definition",
    )
}

/// The process exit code for a finished job: the container's own code, 124 when it timed
/// out, 130 when cancelled or superseded, 125 when cq itself failed to run it.
fn exit_code(v: &JobView) -> ExitCode {
    match v.reason {
        Some(FinishReason::Succeeded) => ExitCode::SUCCESS,
        Some(FinishReason::Failed) => {
            let code = v.exit_code.unwrap_or(1).rem_euclid(256) as u8;
            ExitCode::from(if code == 0 { 1 } else { code })
        }
        Some(FinishReason::TimedOut) => ExitCode::from(124),
        Some(FinishReason::Cancelled | FinishReason::Superseded) => ExitCode::from(130),
        _ => ExitCode::from(125),
    }
}

pub async fn status(args: StatusArgs) -> Result<ExitCode> {
    let client = Client::new(&args.conn.url, args.conn.token)?;
    let json = args.json || args.output == Output::Json;
    if let Some(job) = args.job {
        let id = client.resolve(&job).await?;
        // Typed, so `status --output json` prints the job's fields in the same order as
        // `submit --wait --output json` and `cancel --output json`.
        let view: JobView = serde_json::from_value(client.get(&format!("/j/{id}")).await?)?;
        if json {
            outln!("{}", serde_json::to_string_pretty(&view)?);
        } else {
            print_job(&view);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let summaries: Vec<Value> = match &args.queue {
        Some(q) => vec![client.get(&format!("/q/{q}")).await?],
        None => client.get("/q").await?["queues"].as_array().cloned().unwrap_or_default(),
    };
    let jobs = match &args.queue {
        Some(q) => client.get(&format!("/q/{q}/j?limit=20")).await?["jobs"].as_array().cloned().unwrap_or_default(),
        None => Vec::new(),
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&json!({ "queues": summaries, "jobs": jobs }))?);
        return Ok(ExitCode::SUCCESS);
    }
    if summaries.is_empty() {
        outln!("no queues yet");
    } else {
        outln!(
            "{:<24} {:>7} {:>8} {:>7} {:>8} {:>7} {:>10}",
            "QUEUE",
            "QUEUED",
            "ASSIGNED",
            "RUNNING",
            "FINISHED",
            "WORKERS",
            "FREE SLOTS"
        );
    }
    for s in &summaries {
        outln!(
            "{:<24} {:>7} {:>8} {:>7} {:>8} {:>7} {:>10}",
            s["queue"].as_str().unwrap_or(""),
            s["queued"].as_u64().unwrap_or(0),
            s["assigned"].as_u64().unwrap_or(0),
            s["running"].as_u64().unwrap_or(0),
            s["finished"].as_u64().unwrap_or(0),
            s["workers"].as_u64().unwrap_or(0),
            s["freeSlots"].as_u64().unwrap_or(0)
        );
    }
    if !jobs.is_empty() {
        outln!("\n{:<12} {:<9} {:<11} {:>7} {:<20}", "JOB", "STATE", "REASON", "ATTEMPT", "WORKER");
        for j in jobs {
            let v: JobView = serde_json::from_value(j)?;
            outln!(
                "{:<12} {:<9} {:<11} {:>7} {:<20}",
                v.id.short(),
                state_word(v.state),
                v.reason.map(FinishReason::as_str).unwrap_or("-"),
                v.attempt,
                v.worker.map(|w| w.0).unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_job(v: &JobView) {
    outln!("job       {}", v.id);
    outln!("queue     {}", v.queue);
    outln!("state     {}{}", state_word(v.state), v.reason.map(|r| format!(" ({})", r.as_str())).unwrap_or_default());
    if let Some(c) = v.exit_code {
        outln!("exit code {c}");
    }
    if let Some(m) = &v.message {
        outln!("message   {m}");
        if let Some(hint) = pull_hint(m) {
            outln!("hint      {hint}");
        }
    }
    outln!("attempt   {}", v.attempt);
    if let Some(w) = &v.worker {
        outln!("worker    {w}");
    }
    if !v.namespaces.is_empty() {
        outln!("namespace {}", v.namespaces.join(", "));
    }
    outln!("log lines {}", v.log_lines);
    for o in &v.outputs {
        outln!("output    {} ({} bytes)", o.path, o.size);
    }
}

pub async fn logs(args: LogsArgs) -> Result<ExitCode> {
    let client = Client::new(&args.conn.url, args.conn.token)?;
    let id = client.resolve(&args.job).await?;
    if args.follow {
        let view = follow(&client, id, args.since, false).await?;
        return Ok(exit_code(&view));
    }
    let mut since = args.since;
    loop {
        let page = client.get(&format!("/j/{id}/logs?since={since}")).await?;
        let lines: Vec<LogLine> = serde_json::from_value(page["lines"].clone())?;
        for line in &lines {
            print_line(line);
        }
        let next = page["next"].as_u64().unwrap_or(since);
        if lines.is_empty() || next >= page["total"].as_u64().unwrap_or(0) {
            break;
        }
        since = next;
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit code of `cq cancel` when there was nothing to cancel: the job had already finished.
const NOTHING_CANCELLED: u8 = 1;

pub async fn cancel(args: CancelArgs) -> Result<ExitCode> {
    let client = Client::new(&args.conn.url, args.conn.token)?;
    let id = client.resolve(&args.job).await?;
    // The broker answers a cancel of a finished job with its view, unchanged; asking first tells
    // "cancelled now" from "had already finished".
    let before: JobView = serde_json::from_value(client.get(&format!("/j/{id}")).await?)?;
    if before.state == JobState::Finished {
        eprintln!("cq: nothing to cancel: {}", describe_end(&before));
        return Ok(ExitCode::from(NOTHING_CANCELLED));
    }
    let body = match args.namespace {
        Some(ns) => json!({ "namespace": ns }),
        None => json!({}),
    };
    let v: JobView = serde_json::from_value(client.post(&format!("/j/{id}/cancel"), &body).await?)?;
    match (v.state, v.reason) {
        (JobState::Finished, Some(FinishReason::Cancelled)) => outln!("{}", describe_end(&v)),
        (JobState::Finished, _) => {
            eprintln!("cq: nothing to cancel: it finished first; {}", describe_end(&v));
            return Ok(ExitCode::from(NOTHING_CANCELLED));
        }
        _ => outln!("job {} is {} (other namespaces still want it)", v.id.short(), state_word(v.state)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `cq cluster import`: the data directory's jobs as the first snapshot of a new cluster's log.
pub async fn cluster_import(args: crate::ImportArgs) -> Result<ExitCode> {
    let config = broker::jetstream::NatsConfig {
        creds_file: args.nats_creds,
        cluster: args.nats_cluster,
        replicas: args.nats_replicas,
        shards: args.shards,
        node: host_name().unwrap_or_else(|| "cq".into()),
        ..broker::jetstream::NatsConfig::new(args.nats)
    };
    let report = broker::import::import(&config, &args.data_dir).await?;
    let streams: Vec<String> = report
        .shards
        .iter()
        .map(|(stream, jobs, seq)| format!("{stream} ({jobs} jobs, a snapshot at sequence {seq})"))
        .collect();
    eprintln!(
        "cq: imported {} jobs from {} into {}; start the cluster's brokers now. Copy the blobs as well: {} into \
         the cluster's blob store. Read links made before stop working.",
        report.jobs,
        args.data_dir.display(),
        streams.join(", "),
        args.data_dir.join("blobs").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// This machine's host name, if it has one (a broker's default node id).
fn host_name() -> Option<String> {
    let host = std::fs::read_to_string("/etc/hostname").ok()?;
    Some(host.trim().to_string()).filter(|h| !h.is_empty())
}
