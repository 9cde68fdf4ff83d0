//! The log of one shard in a NATS JetStream stream, for cluster mode (experimental; each shard
//! owned by one broker at a time under a lease, [`crate::lease`]).
//!
//! - **Stream** `<CLUSTER>_LOG_<shard>` on subject `<cluster>.log.<shard>`, file storage,
//!   replicated (3 by default). One commit of the writer (one group of batches) is one message
//!   whose body is the records exactly as the local log frames them; a group larger than the
//!   server's `max_payload` is cut between records into several messages.
//! - **Fence.** Every publish carries `Nats-Expected-Last-Sequence` = the last sequence this
//!   writer knows. If anyone else appended since, the server refuses it and this writer stops
//!   ([`LogError::Fenced`]) before acknowledging anything of the group. On start, after replay,
//!   the writer appends an owner marker (empty body, header `Cq-Owner`), which fences every
//!   earlier writer. A publish whose answer is lost is retried with the same `Nats-Msg-Id`, so
//!   the stream's duplicate window turns a retry of a stored message into its original ack.
//! - **Snapshots** go to the object store bucket `<cluster>_snapshots` as
//!   `shard-<shard>-<seq>` (the encoding of the local snapshot file), where `seq` is the last
//!   stream sequence the snapshot covers. Then a fenced marker (header `Cq-Snapshot`) is
//!   appended, and only if it is accepted is the stream purged below `seq + 1` and older
//!   snapshots deleted; a deposed writer therefore never purges.
//! - **Recovery** restores the newest snapshot, replays the stream from `seq + 1` to its last
//!   sequence through an ordered consumer, and checks that sequences are contiguous and every
//!   record's checksum holds: unlike a local file's torn tail, nothing here is skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, object_store, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::runtime::Handle as Runtime;

use crate::backend::LogBackend;
use crate::core::Core;
use crate::event::SnapshotV1;
use crate::log::{LogError, RecoveryReport, decode_snapshot, encode_snapshot, replay_records, split_records};

/// Header of the marker a writer appends when it takes the log over.
pub const OWNER_HEADER: &str = "Cq-Owner";
/// Header of the marker that follows a stored snapshot.
pub const SNAPSHOT_HEADER: &str = "Cq-Snapshot";
/// How long a publish whose outcome is unknown (timeout, no responders) is retried before the
/// writer gives up and the broker stops.
pub const COMMIT_RETRY_FOR: Duration = Duration::from_secs(30);
/// Room left in a message for the headers.
const HEADER_ROOM: usize = 4096;
/// The largest record of a broker with the default `--max-body` (4 MiB), with room for framing.
pub const DEFAULT_MAX_RECORD: usize = (4 << 20) + (64 << 10);

/// Where the log of a shard lives in NATS.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`); the client fails over between them.
    pub urls: Vec<String>,
    /// A NATS credentials file (JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// Name of the cq cluster; prefixes the stream, its subject and the snapshot bucket, so
    /// several cq clusters can share one NATS.
    pub cluster: String,
    /// Replicas of the stream and the snapshot bucket (3 in production; at most the number of
    /// NATS servers).
    pub replicas: usize,
    /// The shard this log belongs to.
    pub shard: u32,
    /// How many shards the cluster has, as this broker asks (`None`: as the cluster has, or 1
    /// for a new one). Checked against the cluster's settings at start ([`crate::lease::settings`]).
    pub shards: Option<u32>,
    /// This broker's share of the shards, when it runs several ([`crate::shards::Placement`]).
    pub placement: Option<std::sync::Arc<crate::shards::Placement>>,
    /// This broker's name in the lease and the log's owner markers.
    pub node: String,
    /// Where other brokers and clients reach this broker, kept in its lease.
    pub advertise_url: Option<String>,
    /// Take the log only while holding its lease ([`crate::lease`]); `None` takes it over at
    /// once, fenced by the log alone (tests of the fence use that).
    pub lease: Option<crate::ownership::LeaseTimes>,
    /// The largest log record this broker can write (a submission of `--max-body` and its
    /// framing): the NATS servers' `max_payload` must take it, or the broker refuses to start.
    pub max_record: usize,
}

impl NatsConfig {
    /// Settings for `urls` with the defaults: cluster `cq`, 3 replicas, shard 0, node `broker`,
    /// the default lease.
    pub fn new(urls: Vec<String>) -> NatsConfig {
        NatsConfig {
            urls,
            creds_file: None,
            cluster: "cq".into(),
            replicas: 3,
            shard: 0,
            shards: None,
            placement: None,
            node: "broker".into(),
            advertise_url: None,
            lease: Some(crate::ownership::LeaseTimes::default()),
            max_record: DEFAULT_MAX_RECORD,
        }
    }

    pub fn stream_name(&self) -> String {
        format!("{}_LOG_{}", self.cluster.to_uppercase(), self.shard)
    }

    pub fn subject(&self) -> String {
        format!("{}.log.{}", self.cluster, self.shard)
    }

    pub fn bucket(&self) -> String {
        format!("{}_snapshots", self.cluster)
    }

    fn snapshot_prefix(&self) -> String {
        format!("shard-{}-", self.shard)
    }

    /// Checks the names NATS will see, before anything connects.
    pub fn validate(&self) -> Result<(), String> {
        let ok = !self.cluster.is_empty()
            && self.cluster.len() <= 32
            && self.cluster.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(format!("cluster name {:?} must be 1 to 32 letters, digits, '-' or '_'", self.cluster));
        }
        if self.urls.is_empty() {
            return Err("no NATS server URL".into());
        }
        if self.replicas == 0 || self.replicas > 5 {
            return Err(format!("{} replicas: JetStream allows 1 to 5", self.replicas));
        }
        Ok(())
    }
}

fn nats_err(context: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> LogError {
    let context = context.into();
    move |e| LogError::Nats { context, message: e.to_string() }
}

/// Like `nats_err`, for creating a stream or bucket: says what to do about a replica count one
/// NATS server cannot hold.
pub(crate) fn create_err(context: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> LogError {
    let context = context.into();
    move |e| {
        let mut message = e.to_string();
        if message.contains("replicas > 1 not supported") {
            message.push_str("; with a single NATS server, pass --nats-replicas 1");
        }
        LogError::Nats { context, message }
    }
}

/// Connects to NATS with the settings' credentials.
pub async fn connect(config: &NatsConfig) -> Result<async_nats::Client, LogError> {
    let mut options = async_nats::ConnectOptions::new().name("cq-broker");
    if let Some(path) = &config.creds_file {
        options = options.credentials_file(path).await.map_err(|e| LogError::Io {
            context: format!("reading the NATS credentials file {}", path.display()),
            source: e,
        })?;
    }
    let client = options
        .connect(config.urls.clone())
        .await
        .map_err(|e| nats_err(format!("connecting to NATS at {}", config.urls.join(",")))(&e))?;
    let max_payload = client.server_info().max_payload;
    if max_payload < config.max_record + HEADER_ROOM {
        return Err(LogError::PayloadTooSmall { max_payload, needed: config.max_record + HEADER_ROOM });
    }
    Ok(client)
}

/// The JetStream log of one shard, positioned after its last message.
pub struct JetStreamLog {
    runtime: Runtime,
    js: jetstream::Context,
    stream: stream::Stream,
    store: object_store::ObjectStore,
    config: NatsConfig,
    stream_name: String,
    subject: String,
    /// Identifies this writer in message ids (`<writer>-<seq>`) and its owner marker.
    writer: String,
    /// The last sequence of the stream as this writer knows it: the fence of its next publish.
    last_seq: u64,
    pending: Vec<u8>,
    max_message: usize,
    bytes_since_snapshot: u64,
}

impl std::fmt::Debug for JetStreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamLog")
            .field("stream", &self.stream_name)
            .field("writer", &self.writer)
            .field("last_seq", &self.last_seq)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl JetStreamLog {
    /// Connects, creates the stream and bucket if missing, restores the newest snapshot into
    /// `core`, replays the stream after it and appends this writer's owner marker.
    /// `owner` names the writer in its marker (`<node>/<epoch>` under a lease); `None` picks a
    /// random name.
    pub async fn recover(
        config: &NatsConfig,
        core: &mut Core,
        owner: Option<String>,
    ) -> Result<(JetStreamLog, RecoveryReport), LogError> {
        config.validate().map_err(|m| LogError::Nats { context: "cluster settings".into(), message: m })?;
        let client = connect(config).await?;
        let max_payload = client.server_info().max_payload;
        let js = jetstream::new(client);
        let stream_name = config.stream_name();
        let subject = config.subject();
        let mut stream = js
            .get_or_create_stream(stream::Config {
                name: stream_name.clone(),
                subjects: vec![subject.clone()],
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                description: Some(format!("cq log of shard {} of cluster {}", config.shard, config.cluster)),
                ..Default::default()
            })
            .await
            .map_err(|e| create_err(format!("creating or opening stream {stream_name}"))(&e))?;
        // An existing stream keeps the replicas it was made with (by another broker's or an
        // import's --nats-replicas): say so rather than run with less replication than asked.
        let replicas = stream.cached_info().config.num_replicas;
        if replicas != config.replicas {
            tracing::warn!(
                stream = %stream_name,
                replicas,
                asked = config.replicas,
                "the log stream has another number of replicas than --nats-replicas asks; it keeps its own (change it with `nats stream edit {stream_name} --replicas {}`)",
                config.replicas
            );
        }
        let bucket = config.bucket();
        let store = match js.get_object_store(&bucket).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: bucket.clone(),
                    description: Some(format!("cq snapshots of cluster {}", config.cluster)),
                    storage: stream::StorageType::File,
                    num_replicas: config.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| create_err(format!("creating object store {bucket}"))(&e))?,
        };
        let state =
            stream.info().await.map_err(|e| nats_err(format!("reading stream {stream_name}"))(&e))?.state.clone();
        let (first, last) = (state.first_sequence, state.last_sequence);

        let mut report = RecoveryReport::default();
        let mut snapshots = list_snapshots(&store, &config.snapshot_prefix()).await?;
        // A purged stream has a snapshot below it. The list is a consumer of the bucket's
        // metadata, which ends at once when the server it asks says nothing is pending (a
        // replica behind, on a loaded machine): asked again for a while before the stream is
        // called corrupt.
        let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
        while snapshots.is_empty() && first > 1 && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(200)).await;
            snapshots = list_snapshots(&store, &config.snapshot_prefix()).await?;
        }
        let snapshot_seq = match snapshots.iter().map(|(seq, _)| *seq).max() {
            Some(seq) => {
                if seq > last {
                    return Err(LogError::CorruptStream {
                        stream: stream_name,
                        seq,
                        why: format!("a snapshot covers sequence {seq} but the stream ends at {last}"),
                    });
                }
                let name = snapshot_name(config, seq);
                let mut object =
                    store.get(&name).await.map_err(|e| nats_err(format!("reading snapshot {name}"))(&e))?;
                let mut bytes = Vec::new();
                object.read_to_end(&mut bytes).await.map_err(|e| nats_err(format!("reading snapshot {name}"))(&e))?;
                let snapshot = decode_snapshot(Path::new(&format!("{bucket}/{name}")), &bytes)?;
                report.snapshot_jobs = snapshot.jobs.len();
                core.restore(snapshot);
                seq
            }
            None => 0,
        };
        report.generation = snapshot_seq;
        let from = snapshot_seq + 1;
        let mut replayed_bytes = 0;
        if last >= from {
            if first > from {
                return Err(LogError::CorruptStream {
                    stream: stream_name,
                    seq: from,
                    why: format!("the stream starts at {first}, after the newest snapshot ({snapshot_seq})"),
                });
            }
            let (events, bytes) = replay(&stream, &stream_name, from, last, core).await?;
            report.replayed_events = events;
            replayed_bytes = bytes;
        }

        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| nats_err("choosing a writer id")(&e))?;
        let writer = owner.unwrap_or_else(|| hex::encode(random));
        let mut log = JetStreamLog {
            runtime: Runtime::current(),
            js,
            stream,
            store,
            config: config.clone(),
            stream_name,
            subject,
            writer,
            last_seq: last,
            pending: Vec::new(),
            max_message: max_payload.saturating_sub(HEADER_ROOM).max(1024),
            bytes_since_snapshot: replayed_bytes,
        };
        if log.last_seq == 0 {
            // An empty stream: a fixed message id makes concurrent first writers agree on one
            // first message (the duplicate window answers the others with its sequence), so the
            // owner markers below are fenced against each other.
            let id = format!("{}-genesis", log.stream_name);
            log.last_seq = log.publish(Bytes::new(), OWNER_HEADER, id, None).await?;
        }
        let owner = log.writer.clone();
        log.publish_fenced(Bytes::new(), (OWNER_HEADER, owner)).await?;
        tracing::info!(stream = %log.stream_name, seq = log.last_seq, writer = %log.writer, "took over the log");
        Ok((log, report))
    }

    /// The last sequence this writer appended or saw.
    pub fn last_sequence(&self) -> u64 {
        self.last_seq
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// Appends `payload` with `Nats-Expected-Last-Sequence` = the last known sequence.
    async fn publish_fenced(&mut self, payload: Bytes, header: (&str, String)) -> Result<(), LogError> {
        let expected = self.last_seq;
        let id = format!("{}-{}", self.writer, expected + 1);
        let seq = self.publish(payload, header.0, header.1.clone(), Some((expected, id))).await?;
        if seq != expected + 1 {
            return Err(LogError::Fenced { stream: self.stream_name.clone(), expected });
        }
        self.last_seq = seq;
        Ok(())
    }

    /// Publishes one message and waits for its ack, retrying an unknown outcome with the same
    /// message id for [`COMMIT_RETRY_FOR`]. `fence` is `(expected last sequence, message id)`;
    /// without it `value` doubles as the message id. Returns the stored sequence.
    async fn publish(
        &self,
        payload: Bytes,
        header: &str,
        value: String,
        fence: Option<(u64, String)>,
    ) -> Result<u64, LogError> {
        let give_up = tokio::time::Instant::now() + COMMIT_RETRY_FOR;
        let mut wait = Duration::from_millis(50);
        loop {
            let mut msg =
                jetstream::message::PublishMessage::build().payload(payload.clone()).header(header, value.as_str());
            msg = match &fence {
                Some((expected, id)) => msg.expected_last_sequence(*expected).message_id(id),
                None => msg.message_id(&value),
            };
            let result = match self.js.send_publish(self.subject.clone(), msg).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            let e = match result {
                Ok(ack) => return Ok(ack.sequence),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    let expected = fence.as_ref().map(|f| f.0).unwrap_or(0);
                    return Err(LogError::Fenced { stream: self.stream_name.clone(), expected });
                }
                Err(e) => e,
            };
            if tokio::time::Instant::now() + wait > give_up {
                return Err(nats_err(format!("appending to stream {}", self.stream_name))(&e));
            }
            tracing::warn!(stream = %self.stream_name, error = %e, "append not confirmed; retrying it");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    async fn commit_async(&mut self) -> Result<bool, LogError> {
        if self.pending.is_empty() {
            return Ok(false);
        }
        let pending = std::mem::take(&mut self.pending);
        let pieces = split_records(&pending, self.max_message)
            .map_err(|len| LogError::RecordTooLarge { len, max: self.max_message })?;
        for piece in pieces {
            let header = (OWNER_HEADER, self.writer.clone());
            self.publish_fenced(Bytes::copy_from_slice(piece), header).await?;
        }
        Ok(true)
    }

    pub(crate) async fn snapshot_async(&mut self, snapshot: &SnapshotV1) -> Result<(), LogError> {
        self.commit_async().await?;
        let seq = self.last_seq;
        let name = snapshot_name(&self.config, seq);
        let bytes = encode_snapshot(snapshot);
        let meta = object_store::ObjectMetadata {
            name: name.clone(),
            description: Some(format!("cq snapshot of {} up to sequence {seq}", self.stream_name)),
            ..Default::default()
        };
        // A bucket whose replicas are still electing a leader (just created, or a NATS server
        // restarting) answers "no stream found" for a while: retried like a publish.
        let give_up = tokio::time::Instant::now() + COMMIT_RETRY_FOR;
        let mut wait = Duration::from_millis(50);
        loop {
            match self.store.put(meta.clone(), &mut bytes.as_slice()).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() + wait < give_up => {
                    tracing::warn!(snapshot = %name, error = %e, "could not store the snapshot; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(nats_err(format!("storing snapshot {name}"))(&e)),
            }
        }
        // Only the log's owner may drop what the snapshot covers: the fenced marker proves it.
        self.publish_fenced(Bytes::new(), (SNAPSHOT_HEADER, seq.to_string())).await?;
        self.bytes_since_snapshot = 0;
        if let Err(e) = self.stream.purge().sequence(seq + 1).await {
            tracing::warn!(stream = %self.stream_name, error = %e, "could not purge the log below the snapshot");
        }
        match list_snapshots(&self.store, &self.config.snapshot_prefix()).await {
            Ok(older) => {
                for (old, name) in older.into_iter().filter(|(s, _)| *s < seq) {
                    if let Err(e) = self.store.delete(&name).await {
                        tracing::warn!(snapshot = %name, seq = old, error = %e, "could not delete an older snapshot");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list older snapshots"),
        }
        Ok(())
    }
}

impl LogBackend for JetStreamLog {
    fn append(&mut self, bytes: &[u8]) -> Result<(), LogError> {
        self.pending.extend_from_slice(bytes);
        self.bytes_since_snapshot += bytes.len() as u64;
        Ok(())
    }

    fn commit(&mut self) -> Result<bool, LogError> {
        let runtime = self.runtime.clone();
        runtime.block_on(self.commit_async())
    }

    fn snapshot(&mut self, snapshot: &SnapshotV1) -> Result<(), LogError> {
        let runtime = self.runtime.clone();
        runtime.block_on(self.snapshot_async(snapshot))
    }

    fn bytes_since_snapshot(&self) -> u64 {
        self.bytes_since_snapshot
    }
}

fn snapshot_name(config: &NatsConfig, seq: u64) -> String {
    format!("{}{seq:020}", config.snapshot_prefix())
}

/// The snapshots of a shard in the bucket, as `(sequence, name)`.
async fn list_snapshots(store: &object_store::ObjectStore, prefix: &str) -> Result<Vec<(u64, String)>, LogError> {
    let mut list = store.list().await.map_err(|e| nats_err("listing snapshots")(&e))?;
    let mut found = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| nats_err("listing snapshots")(&e))?;
        if info.deleted {
            continue;
        }
        if let Some(seq) = info.name.strip_prefix(prefix).and_then(|s| s.parse().ok()) {
            found.push((seq, info.name));
        }
    }
    Ok(found)
}

/// Replays messages `from..=last` into `core`; returns the events and bytes replayed.
async fn replay(
    stream: &stream::Stream,
    stream_name: &str,
    from: u64,
    last: u64,
    core: &mut Core,
) -> Result<(u64, u64), LogError> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err(format!("reading stream {stream_name}"))(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| nats_err(format!("reading stream {stream_name}"))(&e))?;
    let (mut events, mut bytes, mut expect) = (0, 0, from);
    while expect <= last {
        let next = tokio::time::timeout(Duration::from_secs(30), messages.next()).await;
        let msg = match next {
            Ok(Some(Ok(msg))) => msg,
            Ok(Some(Err(e))) => return Err(nats_err(format!("reading stream {stream_name}"))(&e)),
            Ok(None) | Err(_) => {
                return Err(LogError::Nats {
                    context: format!("reading stream {stream_name}"),
                    message: format!("message {expect} of {last} did not arrive"),
                });
            }
        };
        let seq = msg.info().map_err(|e| nats_err(format!("reading stream {stream_name}"))(&*e))?.stream_sequence;
        if seq != expect {
            return Err(LogError::CorruptStream {
                stream: stream_name.into(),
                seq: expect,
                why: format!("message {expect} is missing (the next one is {seq})"),
            });
        }
        events += replay_records(&msg.payload, core).map_err(|(offset, why)| LogError::CorruptStream {
            stream: stream_name.into(),
            seq,
            why: format!("{why} at byte {offset}"),
        })?;
        bytes += msg.payload.len() as u64;
        expect += 1;
    }
    Ok((events, bytes))
}
