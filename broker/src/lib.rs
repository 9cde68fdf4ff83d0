//! The cq broker: holds every queue in memory, makes changes durable in a snapshot log, pushes
//! jobs to workers over websockets and streams state and logs to watchers.

pub mod core;
pub mod event;

/// How the broker names itself in welcomes.
pub const BROKER_AGENT: &str = concat!("cq/", env!("CARGO_PKG_VERSION"));
