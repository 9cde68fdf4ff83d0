//! `cq cluster import`: a local data directory's state becomes the first snapshot of a new
//! cluster's log, so a broker that ran on its own can move to cluster mode with its jobs.
//!
//! The directory is recovered as a broker would (snapshot, replay, torn tail cut) while its lock
//! is held, so no broker can use it meanwhile. Its jobs are split by shard (each on its queue's,
//! [`crate::shards::shard_of`]). Every shard's stream must be new (no message yet): the import opens it as a writer with an owner marker of its own, stores the state as a
//! snapshot and appends the fenced snapshot marker, exactly as an owner does. A broker of the
//! cluster started meanwhile is fenced against it either way: if the broker's marker lands
//! first, the import's publish is refused and nothing is stored; if the import's lands first,
//! the broker recovers again and finds the snapshot.

use std::path::Path;

use crate::core::{Core, CoreConfig};
use crate::event::SnapshotV1;
use crate::jetstream::{JetStreamLog, NatsConfig, connect};
use crate::log::{Log, LogError};
use crate::shards::shard_of;

/// What an import stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Jobs in the snapshots (every state, finished ones within their retention).
    pub jobs: usize,
    /// Per shard: its stream, its jobs, and the stream sequence its snapshot covers.
    pub shards: Vec<(String, usize, u64)>,
}

/// Stores the state of the local data directory `dir` as the first snapshot of the log of each
/// shard of the cluster `config` names (each job on its queue's shard); no shard's log may have
/// been written yet. A new cluster gets `config.shards` shards (1 if not given).
pub async fn import(config: &NatsConfig, dir: &Path) -> Result<ImportReport, LogError> {
    config.validate().map_err(|m| LogError::Nats { context: "cluster settings".into(), message: m })?;
    if !holds_a_log(dir) {
        return Err(LogError::NoLog { dir: dir.to_path_buf() });
    }
    let shards = crate::lease::settings(config).await?.shards;
    // Every stream must be new: merging two histories is not something an import can do.
    let js = async_nats::jetstream::new(connect(config).await?);
    let configs: Vec<NatsConfig> = (0..shards).map(|shard| NatsConfig { shard, ..config.clone() }).collect();
    for config in &configs {
        let stream = config.stream_name();
        if let Ok(mut existing) = js.get_stream(&stream).await {
            let state = existing
                .info()
                .await
                .map_err(|e| LogError::Nats { context: format!("reading stream {stream}"), message: e.to_string() })?
                .state
                .clone();
            if state.last_sequence > 0 {
                return Err(LogError::NotNew { stream, last: state.last_sequence });
            }
        }
    }

    let dir = dir.to_path_buf();
    let (snapshot, local) = tokio::task::spawn_blocking(move || {
        let mut core = Core::new(CoreConfig::default());
        let (log, _) = Log::recover(&dir, &mut core)?;
        Ok::<_, LogError>((core.snapshot(), log))
    })
    .await
    .expect("recovery does not panic")?;
    let jobs = snapshot.jobs.len();

    let mut report = ImportReport { jobs, shards: Vec::new() };
    for config in &configs {
        let part = part_of(&snapshot, config.shard, shards);
        let mut empty = Core::new(CoreConfig::default());
        let (mut log, _) = JetStreamLog::recover(config, &mut empty, Some(format!("import/{}", config.node))).await?;
        // Fenced like every owner's snapshot: refused if a broker took the log meanwhile.
        log.snapshot_async(&part).await?;
        report.shards.push((config.stream_name(), part.jobs.len(), log.last_sequence()));
    }
    // Held until here, so no broker started on the directory while it was copied.
    drop(local);
    Ok(report)
}

/// The part of `snapshot` that shard `shard` of `shards` holds: the jobs (and namespace
/// heads) of its queues. The submission sequence is kept whole, so order stays as it was.
fn part_of(snapshot: &SnapshotV1, shard: u32, shards: u32) -> SnapshotV1 {
    let here = |queue: &str| shard_of(queue, shards) == shard;
    SnapshotV1 {
        seq: snapshot.seq,
        jobs: snapshot.jobs.iter().filter(|j| here(&j.queue)).cloned().collect(),
        namespaces: snapshot.namespaces.iter().filter(|(queue, _, _)| here(queue)).cloned().collect(),
    }
}

/// Whether `dir` holds a snapshot or a log segment of the local log.
fn holds_a_log(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.filter_map(Result::ok).any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        (name.starts_with("snapshot-") || name.starts_with("log-")) && name.ends_with(".bin")
    })
}
