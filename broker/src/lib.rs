//! The cq broker: holds every queue in memory, makes changes durable in a snapshot log, pushes
//! jobs to workers over websockets and streams state and logs to watchers.
//!
//! A request flows through the modules in this order: [`http`] or [`ws`] (parse, authenticate,
//! [`submission`] normalises definitions) → [`runtime`] (the core task and the log writer) →
//! [`core`] (the state machine) → [`event`] records written through [`backend`] to [`log`] (or,
//! in cluster mode, [`jetstream`]) → [`outbox`] (delivery to connections). File bytes go through [`files`] to the [`blob`] store.
//! In cluster mode a standby (waiting in [`lease`]) passes requests to the owner through [`edge`].

pub mod access;
pub mod auth;
pub mod backend;
pub mod blob;
pub mod core;
pub mod edge;
pub mod event;
pub mod files;
pub mod http;
pub mod import;
pub mod jetstream;
pub mod lease;
pub mod link;
pub mod log;
pub mod metrics;
pub mod outbox;
pub mod ownership;
pub mod router;
pub mod runtime;
pub mod server;
pub mod shards;
pub mod submission;
pub mod ui;
pub mod ws;

pub use server::{Config, run};

/// How the broker names itself in welcomes.
pub const BROKER_AGENT: &str = concat!("cq/", env!("CARGO_PKG_VERSION"));
