//! The snapshot log: an append-only file of checksummed event records plus periodic snapshots
//! that bound it, like Redis' AOF with RDB. Files live in the data directory:
//!
//! - `snapshot-NNNNNNNNNNNNNNNNNNNN.bin`: the durable state when generation N began;
//! - `log-NNNNNNNNNNNNNNNNNNNN.bin`: every event after that snapshot.
//!
//! Both start with an 8-byte magic and a little-endian `u32` format version (see
//! [`FORMAT_VERSION`]). A log record is `[len: u32][crc32(payload): u32][payload]`, the payload
//! a bincode-encoded [`Event`]. Recovery restores the newest snapshot and replays its log
//! through the core; a torn or corrupt tail is cut off with a warning.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::core::Core;
use crate::event::{Event, SnapshotV1};

/// Version of the on-disk format written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// First bytes of a log file.
pub const LOG_MAGIC: &[u8; 8] = b"CQLOG\0\0\0";
/// First bytes of a snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"CQSNAP\0\0";
/// Largest record accepted on recovery; anything claiming to be larger is a corrupt tail.
pub const MAX_RECORD_BYTES: usize = 256 << 20;
/// Bytes of log after which a new snapshot is taken.
pub const SNAPSHOT_AFTER_BYTES: u64 = 256 << 20;

const HEADER_LEN: u64 = 12;

/// Failures of the durable store. Every one of them stops the broker: it cannot promise
/// durability any more.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{path}: not a cq {what} file (bad magic)")]
    BadMagic { path: PathBuf, what: &'static str },
    #[error("{path}: written by format version {found}, this cq reads version {FORMAT_VERSION} and older; upgrade cq")]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("{path}: snapshot is corrupt ({why}); restore the data directory from a backup")]
    CorruptSnapshot { path: PathBuf, why: String },
    #[error(
        "data directory {dir} is in use by another cq broker (it holds {dir}/lock); stop it or use another --data-dir"
    )]
    InUse { dir: PathBuf },
    /// The replicated log (NATS JetStream) cannot be reached or refused a request.
    #[error("{context}: {message}")]
    Nats { context: String, message: String },
    /// Another writer appended to the log since this one read it: this broker is no longer the
    /// log's owner and must not acknowledge anything more.
    #[error(
        "stream {stream}: another writer appended after sequence {expected}; this broker is no longer the log's owner and steps down"
    )]
    Fenced { stream: String, expected: u64 },
    /// The NATS servers cannot take a record this broker may write.
    #[error(
        "the NATS server's max_payload is {max_payload} bytes, but one log record can take {needed} (a submission of --max-body and its framing): set max_payload to at least that in the NATS server configuration (docs/operations.md), or lower --max-body"
    )]
    PayloadTooSmall { max_payload: usize, needed: usize },
    /// The lease of the log was not renewed in time or was taken ([`crate::lease`]).
    #[error("lost the lease of shard {shard}'s log; this broker is no longer its owner and steps down")]
    LeaseLost { shard: u32 },
    /// The replicated log holds something replay cannot accept (a gap, a bad record).
    #[error("stream {stream}, sequence {seq}: {why}; the log is damaged, restore it from a backup")]
    CorruptStream { stream: String, seq: u64, why: String },
    /// `cq cluster import` from a directory without a local log.
    #[error("{dir} holds no cq log (no snapshot-*.bin or log-*.bin); give the --data-dir the broker used")]
    NoLog { dir: PathBuf },
    /// `cq cluster import` into a log that has been written already.
    #[error(
        "stream {stream} already holds a log (up to sequence {last}), from an earlier import or a broker of the cluster: import only into a new cluster, before any of its brokers first starts (give another --nats-cluster name, or delete the cluster's streams and buckets to start over)"
    )]
    NotNew { stream: String, last: u64 },
    /// A record does not fit one message of the replicated log.
    #[error("a log record of {len} bytes exceeds the NATS server's max_payload of {max} bytes; raise max_payload")]
    RecordTooLarge { len: usize, max: usize },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LogError {
    let context = context.into();
    move |source| LogError::Io { context, source }
}

/// Appends one event record to `buf`.
pub fn encode_event(event: &Event, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    bincode::serde::encode_into_std_write(event, buf, bincode::config::standard())
        .expect("writing to a Vec cannot fail");
    let len = (buf.len() - start - 8) as u32;
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The open log, positioned at its end.
#[derive(Debug)]
pub struct Log {
    /// The exclusive lock on `DATA_DIR/lock`, held while this log exists: two brokers writing
    /// one data directory would remove each other's files.
    _lock: File,
    dir: PathBuf,
    generation: u64,
    file: File,
    /// Bytes appended since the last snapshot.
    pub bytes_since_snapshot: u64,
}

/// What recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub generation: u64,
    pub snapshot_jobs: usize,
    pub replayed_events: u64,
    /// Bytes cut off a torn or corrupt tail.
    pub truncated_bytes: u64,
}

impl Log {
    /// Opens (or creates) the store in `dir`, restoring its state into `core`.
    pub fn recover(dir: &Path, core: &mut Core) -> Result<(Log, RecoveryReport), LogError> {
        fs::create_dir_all(dir).map_err(io_err(format!("creating data directory {}", dir.display())))?;
        let lock = lock_dir(dir)?;
        let mut generations: Vec<(u64, bool)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let name = entry.map_err(io_err("reading the data directory"))?.file_name();
            let name = name.to_string_lossy();
            if let Some(g) =
                name.strip_prefix("snapshot-").and_then(|r| r.strip_suffix(".bin")).and_then(|g| g.parse().ok())
            {
                generations.push((g, true));
            } else if let Some(g) =
                name.strip_prefix("log-").and_then(|r| r.strip_suffix(".bin")).and_then(|g| g.parse().ok())
            {
                generations.push((g, false));
            }
        }
        let snapshot_gen = generations.iter().filter(|(_, s)| *s).map(|(g, _)| *g).max();
        let log_gen = generations.iter().filter(|(_, s)| !*s).map(|(g, _)| *g).max();
        let mut report = RecoveryReport::default();
        let generation = match (snapshot_gen, log_gen) {
            (Some(s), _) => {
                let snapshot = read_snapshot(&snapshot_path(dir, s))?;
                report.snapshot_jobs = snapshot.jobs.len();
                core.restore(snapshot);
                s
            }
            (None, Some(l)) => l,
            (None, None) => 0,
        };
        report.generation = generation;
        let path = log_path(dir, generation);
        let file = if path.exists() {
            let (file, replayed, truncated) = replay_log(&path, core)?;
            report.replayed_events = replayed;
            report.truncated_bytes = truncated;
            file
        } else {
            create_log(dir, generation)?
        };
        let size = file.metadata().map_err(io_err(format!("reading {}", path.display())))?.len();
        let log = Log {
            _lock: lock,
            dir: dir.to_path_buf(),
            generation,
            file,
            bytes_since_snapshot: size.saturating_sub(HEADER_LEN),
        };
        log.remove_older(generation);
        Ok((log, report))
    }

    /// Appends encoded records (not yet durable).
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), LogError> {
        self.file.write_all(bytes).map_err(io_err("appending to the log"))?;
        self.bytes_since_snapshot += bytes.len() as u64;
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.file.sync_data().map_err(io_err("fsync of the log"))
    }

    /// Writes `snapshot` (the state after everything appended so far) as the next generation
    /// and starts an empty log for it; older files are then removed.
    pub fn rotate(&mut self, snapshot: &SnapshotV1) -> Result<(), LogError> {
        self.sync()?;
        let next = self.generation + 1;
        let path = snapshot_path(&self.dir, next);
        let tmp = path.with_extension("tmp");
        let bytes = encode_snapshot(snapshot);
        let mut f = File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(io_err(format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, &path).map_err(io_err(format!("renaming {}", tmp.display())))?;
        let file = create_log(&self.dir, next)?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.generation = next;
        self.bytes_since_snapshot = 0;
        self.remove_older(next);
        Ok(())
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn remove_older(&self, generation: u64) {
        for g in 0..generation {
            for path in [snapshot_path(&self.dir, g), log_path(&self.dir, g)] {
                if path.exists()
                    && let Err(e) = fs::remove_file(&path)
                {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove an old log file");
                }
            }
        }
    }
}

fn snapshot_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("snapshot-{generation:020}.bin"))
}

fn log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("log-{generation:020}.bin"))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(format!("fsync of {}", dir.display())))
}

/// Takes the data directory's advisory lock (released by the kernel when the process dies, so a
/// crashed broker never leaves a stale lock behind).
fn lock_dir(dir: &Path) -> Result<File, LogError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(LogError::InUse { dir: dir.to_path_buf() }),
        Err(e) => Err(io_err(format!("locking {}", path.display()))(e.into())),
    }
}

fn create_log(dir: &Path, generation: u64) -> Result<File, LogError> {
    let path = log_path(dir, generation);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("creating {}", path.display())))?;
    f.write_all(LOG_MAGIC)
        .and_then(|_| f.write_all(&FORMAT_VERSION.to_le_bytes()))
        .and_then(|_| f.sync_all())
        .map_err(io_err(format!("writing {}", path.display())))?;
    sync_dir(dir)?;
    Ok(f)
}

fn check_header(path: &Path, header: &[u8], magic: &[u8; 8], what: &'static str) -> Result<(), LogError> {
    if header.len() < 12 || &header[..8] != magic {
        return Err(LogError::BadMagic { path: path.to_path_buf(), what });
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version > FORMAT_VERSION || version == 0 {
        return Err(LogError::NewerFormat { path: path.to_path_buf(), found: version });
    }
    Ok(())
}

fn read_snapshot(path: &Path) -> Result<SnapshotV1, LogError> {
    let bytes = fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
    decode_snapshot(path, &bytes)
}

/// A snapshot as stored: magic, format version, payload length (`u64`), crc32 of the payload
/// (`u32`), then the bincode-encoded payload. The same bytes go to a file or to an object store.
pub fn encode_snapshot(snapshot: &SnapshotV1) -> Vec<u8> {
    let payload = bincode::serde::encode_to_vec(snapshot, bincode::config::standard()).expect("snapshots encode");
    let mut bytes = Vec::with_capacity(24 + payload.len());
    bytes.extend_from_slice(SNAPSHOT_MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    bytes
}

/// Decodes the bytes [`encode_snapshot`] wrote; `path` names where they came from in errors.
pub fn decode_snapshot(path: &Path, bytes: &[u8]) -> Result<SnapshotV1, LogError> {
    check_header(path, bytes, SNAPSHOT_MAGIC, "snapshot")?;
    let corrupt = |why: &str| LogError::CorruptSnapshot { path: path.to_path_buf(), why: why.into() };
    if bytes.len() < 24 {
        return Err(corrupt("too short"));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    let payload = bytes.get(24..24 + len).ok_or_else(|| corrupt("shorter than its header says"))?;
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    // Version 1 is the only version so far; a later version decodes older ones here.
    let (snapshot, _) =
        bincode::serde::decode_from_slice(payload, bincode::config::standard()).map_err(|e| corrupt(&e.to_string()))?;
    Ok(snapshot)
}

/// Replays every intact record of the log at `path` into `core`, truncates a torn or corrupt
/// tail, and returns the file opened for appending.
fn replay_log(path: &Path, core: &mut Core) -> Result<(File, u64, u64), LogError> {
    let mut file =
        OpenOptions::new().read(true).write(true).open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let file_len = file.metadata().map_err(io_err(format!("reading {}", path.display())))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, &mut file);
    let mut header = [0u8; HEADER_LEN as usize];
    let mut good = HEADER_LEN;
    let mut replayed = 0;
    if file_len < HEADER_LEN {
        // A crash while creating the file: start it again.
        tracing::warn!(path = %path.display(), "log header is torn; starting the log afresh");
        drop(reader);
        file.set_len(0).map_err(io_err("truncating the log"))?;
        file.write_all(LOG_MAGIC)
            .and_then(|_| file.write_all(&FORMAT_VERSION.to_le_bytes()))
            .and_then(|_| file.sync_all())
            .map_err(io_err("rewriting the log header"))?;
        return Ok((file, 0, file_len));
    }
    reader.read_exact(&mut header).map_err(io_err(format!("reading {}", path.display())))?;
    check_header(path, &header, LOG_MAGIC, "log")?;
    let mut payload = Vec::new();
    let problem = loop {
        let mut rec = [0u8; 8];
        match read_full(&mut reader, &mut rec) {
            Ok(0) => break None,
            Ok(8) => {}
            Ok(_) => break Some("torn record header"),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        }
        let len = u32::from_le_bytes(rec[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rec[4..].try_into().expect("4 bytes"));
        if len > MAX_RECORD_BYTES {
            break Some("record length out of range");
        }
        payload.resize(len, 0);
        match read_full(&mut reader, &mut payload) {
            Ok(n) if n == len => {}
            Ok(_) => break Some("torn record"),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        }
        if crc32fast::hash(&payload) != crc {
            break Some("checksum mismatch");
        }
        let event: Event = match bincode::serde::decode_from_slice(&payload, bincode::config::standard()) {
            Ok((e, _)) => e,
            Err(_) => break Some("undecodable record"),
        };
        core.replay(&event);
        replayed += 1;
        good += 8 + len as u64;
    };
    drop(reader);
    let truncated = file_len - good;
    if let Some(why) = problem {
        tracing::warn!(path = %path.display(), offset = good, bytes = truncated, why, "cutting a torn or corrupt tail off the log");
        file.set_len(good).map_err(io_err("truncating the log"))?;
        file.sync_all().map_err(io_err("fsync of the log"))?;
    }
    file.seek(SeekFrom::Start(good)).map_err(io_err("seeking in the log"))?;
    Ok((file, replayed, truncated))
}

/// Replays every record of `bytes` (whole records, as [`encode_event`] wrote them) into `core`.
/// Unlike a file's tail, these bytes were acknowledged by a replicated store, so any torn or
/// corrupt record is an error (returned with its offset), never silently skipped.
pub fn replay_records(bytes: &[u8], core: &mut Core) -> Result<u64, (usize, &'static str)> {
    let mut at = 0;
    let mut replayed = 0;
    while at < bytes.len() {
        let Some(rec) = bytes.get(at..at + 8) else { return Err((at, "torn record header")) };
        let len = u32::from_le_bytes(rec[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rec[4..].try_into().expect("4 bytes"));
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else { return Err((at, "torn record")) };
        if crc32fast::hash(payload) != crc {
            return Err((at, "checksum mismatch"));
        }
        let event: Event = match bincode::serde::decode_from_slice(payload, bincode::config::standard()) {
            Ok((e, _)) => e,
            Err(_) => return Err((at, "undecodable record")),
        };
        core.replay(&event);
        replayed += 1;
        at += 8 + len;
    }
    Ok(replayed)
}

/// Splits `bytes` (whole records) into pieces of at most `max` bytes, cutting only between
/// records. Returns the length of the first record larger than `max` if there is one.
pub fn split_records(bytes: &[u8], max: usize) -> Result<Vec<&[u8]>, usize> {
    let mut pieces = Vec::new();
    let (mut start, mut at) = (0, 0);
    while at + 8 <= bytes.len() {
        let len = 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len > max {
            return Err(len);
        }
        if at + len - start > max {
            pieces.push(&bytes[start..at]);
            start = at;
        }
        at += len;
    }
    if start < bytes.len() {
        pieces.push(&bytes[start..]);
    }
    Ok(pieces)
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
