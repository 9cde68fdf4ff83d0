//! Wire types shared by the cq broker, worker and CLI: job definitions, ids, job views and every
//! websocket message. This crate does no IO and knows nothing of tokio or warp.

pub mod definition;
pub mod id;
pub mod job;
pub mod messages;
pub mod reference;

pub use definition::{DataRef, DefinitionError, JobDefinition};
pub use id::{JobId, WorkerId};
pub use job::{FinishReason, JobState, JobView, LogLine, Phase, Stream};

/// Version of the websocket protocol. Every socket starts with a hello carrying it; a peer that
/// speaks another version is refused with [`close::VERSION_MISMATCH`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest websocket message either side accepts, in bytes.
pub const MAX_WS_MESSAGE: usize = 1024 * 1024;
/// Most queues one worker hello may name; the broker refuses a hello naming more.
pub const MAX_HELLO_QUEUES: usize = 64;

/// Websocket close codes used by the broker. Codes 4000-4999 are reserved for applications.
pub mod close {
    /// The broker is shutting down; reconnect later (standard code).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the websocket protocol (standard code).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A message was larger than [`crate::MAX_WS_MESSAGE`] (standard code).
    pub const TOO_BIG: u16 = 1009;
    /// The token was missing or wrong.
    pub const UNAUTHORIZED: u16 = 4001;
    /// No hello arrived in time.
    pub const HELLO_TIMEOUT: u16 = 4002;
    /// The first message was not a hello, or the hello was malformed.
    pub const BAD_HELLO: u16 = 4003;
    /// The peer stopped reading and its outbound queue filled up; it was dropped, not buffered for.
    pub const LAGGING: u16 = 4008;
    /// The peer speaks another protocol version.
    pub const VERSION_MISMATCH: u16 = 4009;
    /// Another connection took over this worker id.
    pub const REPLACED: u16 = 4010;
    /// Nothing was heard from the peer within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4011;
    /// A server-sent-event or watch stream reached its natural end (the job finished).
    pub const DONE: u16 = 1000;
}
