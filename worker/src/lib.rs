//! The cq worker: keeps one websocket to the broker ([`controller`]), runs the jobs it is
//! pushed as Docker containers ([`job`], [`docker`]), and streams their logs and outputs back
//! through the blob store ([`blobs`]). What a job may use and reach is the worker owner's call
//! ([`limits`], [`fetch`], [`firewall`]).

pub mod blobs;
pub mod controller;
pub mod docker;
pub mod fetch;
pub mod firewall;
pub mod job;
pub mod limits;

pub use controller::{Config, run};

use protocol::messages::{HeldJob, WorkerHello};
use protocol::{PROTOCOL_VERSION, WorkerId};

/// Jobs a worker runs at once unless told otherwise.
pub const DEFAULT_SLOTS: u32 = 1;

/// The hello a worker with these settings sends first.
pub fn hello(worker_id: WorkerId, queues: Vec<String>, slots: u32, held: Vec<HeldJob>) -> WorkerHello {
    WorkerHello {
        protocol: PROTOCOL_VERSION,
        token: None,
        worker_id,
        queues,
        slots,
        gpus: 0,
        tags: Vec::new(),
        held,
        agent: Some(concat!("cq-worker/", env!("CARGO_PKG_VERSION")).into()),
    }
}
