//! The broker as a server: `run(listener, config, shutdown)` wires the store, the core task and
//! the HTTP and websocket layers. It never binds its own port, so tests run many brokers on
//! `127.0.0.1:0` side by side.

use std::future::Future;
use std::sync::Arc;

use protocol::close;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Tokens;
use crate::http;
use crate::log::LogError;
use crate::runtime::{self, StoreConfig};
use crate::ws::Context;

/// Everything the broker needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreConfig,
    pub tokens: Tokens,
    /// Largest HTTP request body, in bytes.
    pub max_body: u64,
}

/// Serves on `listener` until `shutdown` resolves, then closes every socket with "going away",
/// writes a final snapshot and returns. Returns early with an error if the log cannot be written.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), LogError> {
    // Small messages (an assignment, an acknowledgement) must leave at once: without
    // TCP_NODELAY, Nagle's algorithm holds them until the peer's delayed ACK, tens of
    // milliseconds. Linux passes the option on to every accepted socket.
    if let Err(e) = socket2::SockRef::from(&listener).set_tcp_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY; small messages may be delayed");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, core) = runtime::start(config.store, stop_rx.clone());
    let outbox = handle.outbox.clone();
    let ctx = Arc::new(Context { handle, tokens: config.tokens, shutdown: stop_rx });
    let routes = http::routes(ctx, config.max_body);
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        outbox.close_all(close::GOING_AWAY, "broker shutting down");
    };
    let mut server = tokio::spawn(warp::serve(routes).incoming(listener).graceful(stop).run());
    let mut core = core;
    tokio::select! {
        result = &mut core => {
            server.abort();
            return result.unwrap_or(Ok(()));
        }
        _ = &mut server => {}
    }
    core.await.unwrap_or(Ok(()))
}
