//! The log writer's interface: the core task hands it the encoded records of each group commit,
//! and nothing of the group is acknowledged or pushed before [`LogBackend::commit`] returns.
//!
//! Two implementations exist: [`LocalLog`], the snapshot log in the data directory with fsync
//! ([`crate::log`]), and [`crate::jetstream::JetStreamLog`], a NATS JetStream stream whose
//! replicated, fenced publish takes the place of the fsync. Both store the same bytes: the
//! record framing of [`crate::log::encode_event`] and the snapshot encoding of
//! [`crate::log::encode_snapshot`].
//!
//! The writer runs on a thread of its own, so the methods block; the JetStream backend blocks
//! on its network round trips there, without touching the core task.

use crate::event::SnapshotV1;
use crate::log::{Log, LogError};
use crate::runtime::FsyncMode;

/// Where the records of a core go, in order.
pub trait LogBackend: Send + std::fmt::Debug {
    /// Adds encoded records to the log; not yet durable.
    fn append(&mut self, bytes: &[u8]) -> Result<(), LogError>;
    /// Makes everything appended so far durable (as durable as the backend promises). Returns
    /// whether it waited for storage, for the commit latency metric.
    fn commit(&mut self) -> Result<bool, LogError>;
    /// Stores `snapshot`, the state after everything appended so far, and lets the log drop
    /// what came before it.
    fn snapshot(&mut self, snapshot: &SnapshotV1) -> Result<(), LogError>;
    /// Bytes of log written since the last snapshot.
    fn bytes_since_snapshot(&self) -> u64;
}

/// The local snapshot log with its fsync policy.
#[derive(Debug)]
pub struct LocalLog {
    pub log: Log,
    pub fsync: FsyncMode,
}

impl LogBackend for LocalLog {
    fn append(&mut self, bytes: &[u8]) -> Result<(), LogError> {
        self.log.append(bytes)
    }

    fn commit(&mut self) -> Result<bool, LogError> {
        match self.fsync {
            FsyncMode::Always => self.log.sync().map(|_| true),
            FsyncMode::Never => Ok(false),
        }
    }

    fn snapshot(&mut self, snapshot: &SnapshotV1) -> Result<(), LogError> {
        self.log.rotate(snapshot)
    }

    fn bytes_since_snapshot(&self) -> u64 {
        self.log.bytes_since_snapshot
    }
}
