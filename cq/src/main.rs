//! The `cq` command: argument parsing, logging setup, signals and wiring. The work is done by
//! the broker and worker libraries and by [`client`].

/// `println!` that ends the program quietly when stdout is gone (piped into `head`, say)
/// instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// Where client commands find the broker without `--url` or `CQ_URL`.
const DEFAULT_URL: &str = "http://127.0.0.1:8000";

mod bench;
mod bench_more;
mod client;
mod commands;
mod files;
mod history;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// cq: run containerised jobs on remote computers, reliably, and watch them live.
///
/// Start everything on this machine with `cq dev`, then submit a job with
/// `cq submit --image cq-test/busybox --wait -- echo hello` (`scripts/test-image.sh` builds that
/// image; any image from a registry works too). Jobs are named by their id or its first 6+ hex
/// digits.
#[derive(Debug, Parser)]
#[command(name = "cq", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How the broker and worker log (the commands that run them have these flags; client commands
/// log only warnings, or what `CQ_LOG` asks for).
#[derive(Debug, Args)]
#[command(next_help_heading = "Logging")]
struct LogArgs {
    /// Log format.
    #[arg(long, env = "CQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, e.g. `info`, `debug`, `broker=debug`.
    #[arg(long, env = "CQ_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a broker on this machine with embedded defaults (loopback, no tokens).
    Dev(DevArgs),
    /// Run a broker: queues in memory, durable in a snapshot log, websockets and HTTP.
    Broker(BrokerArgs),
    /// Run a worker: take jobs from a broker's queues and run them as Docker containers.
    Worker(WorkerArgs),
    /// Put a job on a queue; print its id, or follow it with --wait.
    Submit(SubmitArgs),
    /// Show a job, a queue, or all queues.
    Status(StatusArgs),
    /// Print a job's logs; follow them with -f.
    Logs(LogsArgs),
    /// Cancel a queued or running job.
    Cancel(CancelArgs),
    /// Download a job's output files.
    Outputs(OutputsArgs),
    /// Measure a broker: durable submissions and full job lifecycles per second over loopback.
    Bench(BenchArgs),
    /// Check a run's history against the broker's records: no acknowledged job lost, no job
    /// started twice, every recorded result the one its worker reported (for fault tests).
    CheckHistory(CheckHistoryArgs),
    /// Cluster mode's tools: `cq cluster import` moves a broker's data directory into a new
    /// cluster's log.
    Cluster(ClusterCommandArgs),
}

#[derive(Debug, Args)]
struct ClusterCommandArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Copy the jobs of a broker's data directory (the broker stopped) into the log of a new
    /// cluster, before any of its brokers first starts. Blobs are not copied: put DATA_DIR/blobs
    /// into the cluster's blob store (the S3 bucket or shared directory) as they are.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// The data directory of the broker that ran without --nats.
    #[arg(long, env = "CQ_DATA_DIR", value_name = "DIR")]
    data_dir: PathBuf,
    /// The cluster's NATS servers (nats://host:port, comma-separated), as its brokers get them.
    #[arg(long, env = "CQ_NATS", value_delimiter = ',', value_name = "URL", required = true)]
    nats: Vec<String>,
    /// How many shards the new cluster has (its brokers then start with the same --shards, or
    /// none) [default: 1]
    #[arg(long, env = "CQ_SHARDS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    shards: Option<u32>,
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, env = "CQ_NATS_CREDS", value_name = "FILE")]
    nats_creds: Option<PathBuf>,
    /// Name of the cq cluster in NATS, as its brokers get it.
    #[arg(long, env = "CQ_NATS_CLUSTER", default_value = "cq", value_name = "NAME")]
    nats_cluster: String,
    /// Replicas of the log stream and the snapshot bucket, as its brokers get it.
    #[arg(long, env = "CQ_NATS_REPLICAS", default_value_t = 3)]
    nats_replicas: usize,
}

#[derive(Debug, Args)]
struct CheckHistoryArgs {
    #[command(flatten)]
    conn: Connection,
    /// File of the job ids whose submission was acknowledged, one per line.
    #[arg(long, value_name = "FILE")]
    acknowledged: PathBuf,
    /// A worker's log, written with `--log-format json --log info` (repeat for each worker).
    #[arg(long = "worker-log", value_name = "FILE")]
    worker_logs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Benchmark the broker at this URL instead of one started in-process; several brokers of
    /// one cluster comma-separated spread the simulated clients and workers over them
    /// (lifecycle).
    #[arg(long, env = "CQ_URL")]
    url: Option<String>,
    /// Jobs to run.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Simulated clients submitting concurrently over websockets.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Simulated workers, which finish every job at once; 0 measures submissions only.
    #[arg(long, default_value_t = 10)]
    workers: usize,
    /// Slots per simulated worker.
    #[arg(long, default_value_t = 64)]
    slots: u32,
    /// lifecycle: queues the clients and workers take in turn (a cluster of several shards
    /// spreads them over its brokers); at most --clients and --workers.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Submit at this steady rate in jobs/s (0: as fast as possible, 512 in flight per client).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// fsync mode of the in-process broker.
    #[arg(long, value_enum, default_value_t = Fsync::Always)]
    fsync: Fsync,
    /// What to measure: job lifecycles, one job's log fanned out to watchers, or idle sockets.
    #[arg(long, value_enum, default_value_t = Scenario::Lifecycle)]
    scenario: Scenario,
    /// fanout: watchers of the job's log.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// fanout: watchers that never read (they must be dropped, not buffered for).
    #[arg(long, default_value_t = 0)]
    slow_watchers: usize,
    /// fanout: log bytes per second the simulated worker sends.
    #[arg(long, default_value_t = 10_000_000)]
    log_rate: u64,
    /// fanout: how long the worker sends, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// connections: idle client sockets to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    // Last: a flattened group's help heading carries over to the fields after it.
    #[command(flatten)]
    logging: LogArgs,
}

/// How client commands print their result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document on stdout, for scripts.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Lifecycle,
    Fanout,
    Connections,
}

/// Where the broker is and how to authenticate to it.
#[derive(Debug, Args, Clone)]
struct Connection {
    /// Broker URL; several brokers of one cluster comma-separated, tried in turn when one cannot
    /// be reached.
    #[arg(long, env = "CQ_URL", default_value = DEFAULT_URL)]
    url: String,
    /// Client token, if the broker requires one.
    #[arg(long, env = "CQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Args)]
struct DevArgs {
    /// Address to listen on.
    #[arg(long, env = "CQ_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Where the broker keeps its log (default: the user's data directory).
    #[arg(long, env = "CQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Jobs the local worker runs at once [default: the number of CPUs].
    #[arg(long, env = "CQ_SLOTS")]
    slots: Option<u32>,
    /// Run only the broker, no local worker.
    #[arg(long)]
    no_worker: bool,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    outputs: OutputArgs,
    // Last: a flattened group's help heading carries over to the fields after it.
    #[command(flatten)]
    logging: LogArgs,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Broker URL; several brokers of one cluster comma-separated, tried in turn when one cannot
    /// be reached.
    #[arg(long, env = "CQ_URL", value_delimiter = ',', default_value = "http://127.0.0.1:8000")]
    pub url: Vec<String>,
    /// Worker token, if the broker requires one (prefer CQ_WORKER_TOKEN or --token-file: a
    /// flag's value shows in `ps`).
    #[arg(long, env = "CQ_WORKER_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the worker token.
    #[arg(long, env = "CQ_WORKER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Queue to take jobs from; repeatable (or comma-separated in CQ_QUEUES).
    #[arg(long = "queue", short, env = "CQ_QUEUES", value_delimiter = ',', default_value = "local")]
    pub queues: Vec<String>,
    /// Jobs run at once [default: the number of CPUs].
    #[arg(long, env = "CQ_SLOTS")]
    pub slots: Option<u32>,
    /// GPUs to hand out: a count (`2` = devices 0 and 1) or a device list (`0,2` or UUIDs).
    #[arg(long, env = "CQ_GPUS", default_value = "0")]
    pub gpus: String,
    /// Tag this worker carries (jobs may require tags); repeatable (comma-separated in CQ_TAGS).
    #[arg(long = "tag", env = "CQ_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,
    /// Longest any job may run here, e.g. 1h; a job's own maxDuration may be shorter.
    #[arg(long, env = "CQ_MAX_DURATION", value_parser = humantime::parse_duration)]
    pub max_duration: Option<std::time::Duration>,
    /// Where the worker keeps job directories and its input cache [default: the user's data directory].
    #[arg(long, env = "CQ_WORKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Stable id of this worker [default: generated once and kept in the data directory].
    #[arg(long, env = "CQ_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Between SIGTERM and SIGKILL when a job runs out of time.
    #[arg(long, env = "CQ_STOP_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_grace: std::time::Duration,
    /// After SIGTERM, how long running jobs may go on before they are handed back to the broker.
    #[arg(long, env = "CQ_DRAIN_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Most processes in one job's container.
    #[arg(long, env = "CQ_PIDS_LIMIT", default_value_t = worker::docker::DEFAULT_PIDS_LIMIT)]
    pub pids_limit: i64,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub outputs: OutputArgs,
    // Last: a flattened group's help heading carries over to the fields after it.
    #[command(flatten)]
    logging: LogArgs,
}

/// What a job may leave on this worker's disk.
#[derive(Debug, Args)]
#[command(next_help_heading = "Job outputs")]
pub struct OutputArgs {
    /// Most output files a job keeps; the rest are not uploaded and the job's log says so.
    #[arg(long, env = "CQ_MAX_OUTPUT_FILES", default_value_t = worker::job::DEFAULT_MAX_OUTPUT_FILES)]
    pub max_output_files: usize,
    /// Most bytes of output (all files together) a job keeps, e.g. 10g.
    #[arg(long, env = "CQ_MAX_OUTPUT_BYTES", default_value = "10g")]
    pub max_output_bytes: String,
    /// Most bytes a job's directory (inputs and outputs) may hold while the job runs, e.g. 50g,
    /// or `none`. Measured every few seconds; a job past it is stopped with an error.
    #[arg(long, env = "CQ_MAX_JOB_DISK", default_value = "50g")]
    pub max_job_disk: String,
}

impl OutputArgs {
    /// The worker's output limits.
    pub fn config(&self) -> anyhow::Result<worker::job::OutputLimits> {
        let size = |flag: &str, text: &str| {
            protocol::definition::parse_size(text)
                .ok_or_else(|| anyhow::anyhow!("--{flag} wants a size such as 512m or 2g, got `{text}`"))
        };
        Ok(worker::job::OutputLimits {
            max_files: self.max_output_files,
            max_bytes: size("max-output-bytes", &self.max_output_bytes)?,
            max_job_disk: match self.max_job_disk.as_str() {
                "none" => None,
                text => Some(size("max-job-disk", text)?),
            },
        })
    }
}

/// What jobs may use and reach on this worker, whatever they ask for.
#[derive(Debug, Args)]
#[command(next_help_heading = "Job limits")]
pub struct LimitArgs {
    /// Memory of a job that does not ask for any, e.g. 2g; `none` for no limit.
    #[arg(long, env = "CQ_DEFAULT_MEMORY", default_value = "2g")]
    pub default_memory: String,
    /// Most memory a job may ask for [default: this host's memory].
    #[arg(long, env = "CQ_MAX_MEMORY")]
    pub max_memory: Option<String>,
    /// Most CPUs a job may ask for [default: this host's CPUs].
    #[arg(long, env = "CQ_MAX_CPUS")]
    pub max_cpus: Option<f64>,
    /// Largest /dev/shm a job may ask for.
    #[arg(long, env = "CQ_MAX_SHM", default_value = "2g")]
    pub max_shm: String,
    /// Network jobs join: `isolated` (the cq-jobs bridge: internet yes, this host and other
    /// jobs no), `none`, or the name of a Docker network of yours.
    #[arg(long, env = "CQ_JOB_NETWORK", default_value = "isolated")]
    pub job_network: String,
    /// Host (as written in URLs) that URL inputs may fetch from though it resolves to a
    /// loopback, private or link-local address; repeatable (comma-separated in CQ_ALLOW_INPUT_HOSTS).
    #[arg(long = "allow-input-host", env = "CQ_ALLOW_INPUT_HOSTS", value_delimiter = ',', value_name = "HOST")]
    pub allow_input_hosts: Vec<String>,
    /// Largest URL input, e.g. 10g.
    #[arg(long, env = "CQ_MAX_INPUT_BYTES", default_value = "10g")]
    pub max_input_bytes: String,
    /// Who shares a /cache directory: jobs of the same `queue`, or every job of this `worker`.
    #[arg(long, env = "CQ_CACHE_SCOPE", value_enum, default_value_t = CacheScope::Queue)]
    pub cache_scope: CacheScope,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CacheScope {
    Queue,
    Worker,
}

impl LimitArgs {
    /// The worker's limits.
    pub fn config(&self) -> anyhow::Result<worker::limits::Limits> {
        let size = |flag: &str, text: &str| {
            protocol::definition::parse_size(text)
                .ok_or_else(|| anyhow::anyhow!("--{flag} wants a size such as 512m or 2g, got `{text}`"))
        };
        let default_memory = match self.default_memory.as_str() {
            "none" | "" => None,
            text => Some(size("default-memory", text)?),
        };
        Ok(worker::limits::Limits {
            default_memory,
            max_memory: self.max_memory.as_deref().map(|m| size("max-memory", m)).transpose()?,
            max_cpus: self.max_cpus,
            max_shm: size("max-shm", &self.max_shm)?,
            network: worker::limits::JobNetwork::parse(&self.job_network),
            cache: match self.cache_scope {
                CacheScope::Queue => worker::limits::CacheScope::Queue,
                CacheScope::Worker => worker::limits::CacheScope::Worker,
            },
            fetch: worker::fetch::FetchPolicy {
                allow_hosts: self.allow_input_hosts.clone(),
                max_bytes: size("max-input-bytes", &self.max_input_bytes)?,
                ..Default::default()
            },
        })
    }
}

#[derive(Debug, Args)]
struct BrokerArgs {
    /// Address to listen on.
    #[arg(long, env = "CQ_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Directory for the snapshot log.
    #[arg(long, env = "CQ_DATA_DIR", default_value = "cq-data")]
    data_dir: PathBuf,
    /// `always`: fsync before acknowledging (default, survives power loss). `never`: leave it to
    /// the OS (survives the broker being killed, not the machine crashing).
    #[arg(long, env = "CQ_FSYNC", value_enum, default_value_t = Fsync::Always)]
    fsync: Fsync,
    /// Token clients must present (prefer CQ_CLIENT_TOKEN or --client-token-file: a flag's value
    /// shows in `ps`).
    #[arg(long, env = "CQ_CLIENT_TOKEN", hide_env_values = true, conflicts_with = "client_token_file")]
    client_token: Option<String>,
    /// File holding the client token.
    #[arg(long, env = "CQ_CLIENT_TOKEN_FILE")]
    client_token_file: Option<PathBuf>,
    /// Token workers must present (prefer CQ_WORKER_TOKEN or --worker-token-file).
    #[arg(long, env = "CQ_WORKER_TOKEN", hide_env_values = true, conflicts_with = "worker_token_file")]
    worker_token: Option<String>,
    /// File holding the worker token.
    #[arg(long, env = "CQ_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,
    /// How long finished jobs and their logs are kept.
    #[arg(long, env = "CQ_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    retention: std::time::Duration,
    /// How long a disconnected worker keeps its jobs before they are queued again.
    #[arg(long, env = "CQ_LEASE_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    lease_grace: std::time::Duration,
    /// How long a connected worker may take to accept an assignment before it is taken back.
    #[arg(long, env = "CQ_ACCEPT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    accept_timeout: std::time::Duration,
    /// Lost attempts a job survives unless its submission says otherwise.
    #[arg(long, env = "CQ_RETRIES", default_value_t = 3)]
    retries: u32,
    /// Largest log kept per job, in bytes.
    #[arg(long, env = "CQ_MAX_LOG_BYTES", default_value_t = 16 << 20)]
    max_log_bytes: usize,
    /// Largest HTTP request body, in bytes.
    #[arg(long, env = "CQ_MAX_BODY", default_value_t = broker::http::DEFAULT_MAX_BODY)]
    max_body: u64,
    #[command(flatten)]
    blobs: BlobArgs,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    // Last: a flattened group's help heading carries over to the fields after it.
    #[command(flatten)]
    logging: LogArgs,
}

/// Cluster mode: the log in NATS JetStream instead of the data directory.
#[derive(Debug, Args)]
#[command(next_help_heading = "Cluster (experimental)")]
pub struct ClusterArgs {
    /// Keep the log in NATS JetStream streams on these servers (nats://host:port, comma-separated)
    /// instead of the data directory. Experimental. Each shard is owned under a lease by one
    /// broker at a time; the other brokers relay its requests to the owner and take it over when
    /// the owner dies or stops. See docs/operations.md for the NATS settings this needs (3
    /// servers, sync_interval: always, max_payload).
    #[arg(long, env = "CQ_NATS", value_delimiter = ',', value_name = "URL")]
    pub nats: Vec<String>,
    /// How many shards the cluster spreads its queues over, fixed when the cluster is created: the
    /// first broker's number is kept, and a broker asking for another is refused. Each broker
    /// serves a fair share of them [default: the cluster's; 1 for a new cluster]
    #[arg(long, env = "CQ_SHARDS", value_name = "N", requires = "nats",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub shards: Option<u32>,
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, env = "CQ_NATS_CREDS", value_name = "FILE", requires = "nats")]
    pub nats_creds: Option<PathBuf>,
    /// Name of the cq cluster in NATS: prefixes the streams (`<NAME>_LOG_<shard>`), their subjects
    /// (`<name>.log.<shard>`) and the buckets (`<name>_snapshots`, `<name>_owners`, `<name>_config`).
    #[arg(long, env = "CQ_NATS_CLUSTER", default_value = "cq", value_name = "NAME", requires = "nats")]
    pub nats_cluster: String,
    /// Replicas of the log streams and of the snapshot, lease and settings buckets.
    #[arg(long, env = "CQ_NATS_REPLICAS", default_value_t = 3, requires = "nats")]
    pub nats_replicas: usize,
    /// This broker's name in its lease and the log's owner markers [default: the host name]
    #[arg(long, env = "CQ_NODE_ID", value_name = "NAME", requires = "nats")]
    pub node_id: Option<String>,
    /// The URL other brokers reach this broker at (http:// only), kept in its lease: standbys
    /// relay clients' requests there and redirect workers there [default: http://LISTEN when
    /// --listen names one address]
    #[arg(long, env = "CQ_ADVERTISE_URL", value_name = "URL", requires = "nats")]
    pub advertise_url: Option<String>,
    /// How long the lease of a shard's log outlives its owner's last renewal (renewed every tenth
    /// of it): a dead owner is replaced after about this long. Keep it well above NATS's leader
    /// election (4 to 9 s), or a NATS server's restart deposes the owner.
    #[arg(long, env = "CQ_LEASE_TTL", default_value = "15s", value_parser = humantime::parse_duration, requires = "nats")]
    pub lease_ttl: std::time::Duration,
    /// The blob directory (--blob-dir or DATA_DIR/blobs) is storage every broker of the cluster
    /// shares (e.g. a network file system); without it cluster mode needs --s3-bucket.
    #[arg(long, env = "CQ_SHARED_BLOB_DIR", requires = "nats")]
    pub shared_blob_dir: bool,
}

/// Who may reach the broker, and how long a peer may stall.
#[derive(Debug, Args)]
#[command(next_help_heading = "Access")]
pub struct AccessArgs {
    /// Origin (scheme://host[:port]) whose web pages may call the broker besides its own;
    /// repeatable (comma-separated in CQ_ALLOW_ORIGINS).
    #[arg(long = "allow-origin", env = "CQ_ALLOW_ORIGINS", value_delimiter = ',', value_name = "ORIGIN")]
    pub allow_origins: Vec<String>,
    /// Who may embed the page in a frame: a CSP frame-ancestors source list, e.g. `'self'` or
    /// `https://app.example.com`.
    #[arg(long, env = "CQ_FRAME_ANCESTORS", default_value = "*")]
    pub frame_ancestors: String,
    /// Run without tokens on an address beyond loopback: anyone who can reach it can run jobs.
    #[arg(long, env = "CQ_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// How long a peer may take to send a request's headers (and how long an idle keep-alive
    /// connection stays open).
    #[arg(long, env = "CQ_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: std::time::Duration,
    /// How long a request body may go without a byte arriving.
    #[arg(long, env = "CQ_BODY_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_read_timeout: std::time::Duration,
    /// Open connections one client address may hold; 0 means no cap.
    #[arg(long, env = "CQ_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = broker::access::MAX_CONNECTIONS_PER_ADDRESS)]
    pub max_connections_per_address: usize,
}

impl AccessArgs {
    /// The broker's access settings.
    pub fn config(&self) -> broker::access::AccessConfig {
        broker::access::AccessConfig {
            allow_origins: self.allow_origins.clone(),
            frame_ancestors: self.frame_ancestors.clone(),
            insecure_no_auth: self.insecure_no_auth,
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            max_connections_per_address: self.max_connections_per_address,
        }
    }
}

/// Where job inputs and outputs are kept.
#[derive(Debug, Args)]
#[command(next_help_heading = "Blob store")]
pub struct BlobArgs {
    /// Directory for blobs when no S3 bucket is given [default: DATA_DIR/blobs].
    #[arg(long, env = "CQ_BLOB_DIR", conflicts_with = "s3_bucket")]
    pub blob_dir: Option<PathBuf>,
    /// Keep blobs in this S3 bucket; clients and workers then move file bytes straight to and from
    /// it by presigned URL. Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = "CQ_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// S3 endpoint for S3-compatible servers, e.g. http://127.0.0.1:9000 [default: AWS].
    #[arg(long, env = "CQ_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "CQ_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// Key prefix inside the bucket, e.g. `cq/`.
    #[arg(long, env = "CQ_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,
    /// Address the bucket as a host name (bucket.endpoint) rather than a path (endpoint/bucket).
    #[arg(long, env = "CQ_S3_VIRTUAL_HOSTED")]
    pub s3_virtual_hosted: bool,
    /// Largest blob, in bytes.
    #[arg(long, env = "CQ_MAX_BLOB", default_value_t = broker::blob::DEFAULT_MAX_BLOB)]
    pub max_blob: u64,
    /// Unreferenced blobs younger than this, or referenced by a submission this recently, are kept.
    #[arg(long, env = "CQ_BLOB_GC_GRACE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub blob_gc_grace: std::time::Duration,
    /// How often unreferenced blobs are collected; 0 turns collection off.
    #[arg(long, env = "CQ_BLOB_GC_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub blob_gc_interval: std::time::Duration,
}

impl BlobArgs {
    /// The broker's blob settings.
    pub fn config(&self) -> broker::blob::BlobConfig {
        use broker::blob::{BlobBackend, BlobConfig, S3Config};
        let backend = match (&self.s3_bucket, &self.blob_dir) {
            (Some(bucket), _) => BlobBackend::S3(S3Config {
                bucket: bucket.clone(),
                endpoint: self.s3_endpoint.clone(),
                region: Some(self.s3_region.clone()),
                prefix: self.s3_prefix.clone(),
                virtual_hosted: self.s3_virtual_hosted,
                ..S3Config::default()
            }),
            (None, Some(dir)) => BlobBackend::Local(dir.clone()),
            (None, None) => BlobBackend::DataDir,
        };
        BlobConfig {
            backend,
            max_blob: self.max_blob,
            gc_grace: self.blob_gc_grace,
            gc_interval: (!self.blob_gc_interval.is_zero()).then_some(self.blob_gc_interval),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Fsync {
    Always,
    Never,
}

#[derive(Debug, Args)]
struct SubmitArgs {
    #[command(flatten)]
    conn: Connection,
    /// Queue to put the job on.
    #[arg(long, short, env = "CQ_QUEUE", default_value = "local")]
    queue: String,
    /// Docker image to run.
    #[arg(long, short)]
    image: Option<String>,
    /// A job definition in JSON (see docs/protocol.md); flags override its fields.
    #[arg(long, short)]
    file: Option<PathBuf>,
    /// Environment variable for the job, KEY=VALUE; repeatable.
    #[arg(long, short, value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Longest the job may run, e.g. 90s, 20m, 1h.
    #[arg(long)]
    max_duration: Option<String>,
    /// Tag a worker must carry; repeatable.
    #[arg(long)]
    tag: Vec<String>,
    /// An input file under /inputs: NAME=@PATH uploads a local file (skipped if the broker has
    /// it), NAME=TEXT passes the text itself; repeatable.
    #[arg(long, short = 'I', value_name = "NAME=@PATH|NAME=TEXT")]
    input: Vec<String>,
    /// Namespace: a newer job in the same namespace supersedes this one.
    #[arg(long, env = "CQ_NAMESPACE")]
    namespace: Option<String>,
    /// Higher runs first.
    #[arg(long)]
    priority: Option<i32>,
    /// Run again even if a finished result is cached.
    #[arg(long)]
    force: bool,
    /// Lost attempts the job survives.
    #[arg(long)]
    retries: Option<u32>,
    /// Follow the job: print its logs live and exit with its exit code.
    #[arg(long, short)]
    wait: bool,
    /// With --wait: Ctrl-C cancels the job instead of leaving it running.
    #[arg(long, requires = "wait")]
    cancel_on_interrupt: bool,
    /// `json` prints the broker's answer (with --wait: the finished job, its log going to stderr).
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// The command to run in the container, after `--` (e.g. `-- sh -c 'echo hi'`).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    conn: Connection,
    /// A job id, or at least 6 of its first hex digits; without it, show the queue (or every queue).
    job: Option<String>,
    /// Queue to show.
    #[arg(long, short, env = "CQ_QUEUE")]
    queue: Option<String>,
    /// `json` prints what the broker answered.
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Same as `--output json`.
    #[arg(long, hide = true)]
    json: bool,
}

#[derive(Debug, Args)]
struct LogsArgs {
    #[command(flatten)]
    conn: Connection,
    /// The job's id, or at least 6 of its first hex digits (as `cq status` prints them).
    job: String,
    /// Keep following until the job finishes.
    #[arg(long, short)]
    follow: bool,
    /// Start at this line.
    #[arg(long, default_value_t = 0)]
    since: u64,
}

#[derive(Debug, Args)]
struct OutputsArgs {
    #[command(flatten)]
    conn: Connection,
    /// The job's id, or at least 6 of its first hex digits (as `cq status` prints them).
    job: String,
    /// Directory to write the outputs into (created if needed).
    #[arg(long, short, default_value = ".")]
    output_dir: PathBuf,
    /// Only this output (a path as listed by `cq status JOB`); repeatable.
    #[arg(long)]
    only: Vec<String>,
    /// Replace files that already exist.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Debug, Args)]
struct CancelArgs {
    #[command(flatten)]
    conn: Connection,
    /// The job's id, or at least 6 of its first hex digits (as `cq status` prints them).
    job: String,
    /// Only withdraw this namespace's interest; the job stops when no one wants it.
    #[arg(long)]
    namespace: Option<String>,
}

fn main() -> ExitCode {
    // Two rustls crypto providers are in the build (ring and aws-lc-rs); name one so a TLS client
    // that asks for the process default finds it. Fails only when one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match &cli.command {
        Command::Dev(DevArgs { logging, .. })
        | Command::Broker(BrokerArgs { logging, .. })
        | Command::Worker(WorkerArgs { logging, .. })
        | Command::Bench(BenchArgs { logging, .. }) => init_tracing(&logging.log, logging.log_format),
        _ => init_tracing(&std::env::var("CQ_LOG").unwrap_or_else(|_| "warn".into()), LogFormat::Text),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cq: cannot start the async runtime: {e}");
            return ExitCode::from(125);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Dev(a) => commands::dev(a).await,
            Command::Broker(a) => commands::broker(a).await,
            Command::Worker(a) => commands::worker(a).await,
            Command::Submit(a) => commands::submit(a).await,
            Command::Status(a) => commands::status(a).await,
            Command::Logs(a) => commands::logs(a).await,
            Command::Cancel(a) => commands::cancel(a).await,
            Command::Outputs(a) => files::outputs(a).await,
            Command::Bench(a) => bench::bench(a).await,
            Command::CheckHistory(a) => {
                let client = client::Client::new(&a.conn.url, a.conn.token.clone())?;
                history::check_history(&client, &a.acknowledged, &a.worker_logs).await
            }
            Command::Cluster(ClusterCommandArgs { command: ClusterCommand::Import(a) }) => {
                commands::cluster_import(a).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cq: {e:#}");
            ExitCode::from(125)
        }
    }
}

/// Prints a usage error; a word where `cq submit` wants flags is most often the job's command
/// without the `--` before it, so that gets a tip.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let _ = e.print();
    if e.kind() == ErrorKind::UnknownArgument {
        let arg = match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(a)) => a.clone(),
            _ => String::new(),
        };
        let submitting = std::env::args().nth(1).as_deref() == Some("submit");
        if submitting && !arg.starts_with('-') {
            eprintln!(
                "\ntip: the job's command goes after `--`, so that its own flags are not taken for cq's:\n  \
                 cq submit --image IMAGE -- {arg} ..."
            );
        }
    }
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

fn init_tracing(filter: &str, format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: a log redirected to a file stays plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
