//! The broker as a server: `run(listener, config, shutdown)` wires the store, the core task, the
//! blob store and the HTTP and websocket layers. It never binds its own port, so tests run many
//! brokers on `127.0.0.1:0` side by side.
//!
//! Connections are served by hyper: the file endpoints ([`crate::files`]) stream their bodies
//! directly, every other request goes to the warp routes ([`crate::http`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use protocol::close;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Role;
use crate::auth::Tokens;
use crate::blob::{BlobConfig, BlobStore};
use crate::files::{self, BoxError};
use crate::http;
use crate::log::LogError;
use crate::runtime::{self, StoreConfig};
use crate::ws::{self, Context};

/// Everything the broker needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreConfig,
    pub tokens: Tokens,
    /// Largest HTTP request body, in bytes (file uploads have their own limit, `blobs.max_blob`).
    pub max_body: u64,
    pub blobs: BlobConfig,
}

/// Why the broker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Blobs(#[from] crate::blob::BlobError),
}

/// Serves on `listener` until `shutdown` resolves, then closes every socket with "going away",
/// writes a final snapshot and returns. Returns early with an error if the log cannot be written.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let blobs = Arc::new(BlobStore::open(&config.blobs, &config.store.data_dir)?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle, core) = runtime::start(config.store, stop_rx.clone());
    let outbox = handle.outbox.clone();
    let ctx = Arc::new(Context { handle, tokens: config.tokens, blobs, shutdown: stop_rx.clone() });
    let routes = http::routes(ctx.clone(), config.max_body);
    let gc = config.blobs.gc_interval.map(|every| tokio::spawn(collect_blobs(ctx.clone(), every)));

    let mut stopping = stop_rx.clone();
    let accept_ctx = ctx.clone();
    let mut server = tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let warp = TowerToHyperService::new(warp::service(routes));
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = runtime::stopped(&mut stopping) => break,
            };
            // Small messages (an assignment, an acknowledgement) must leave at once: without
            // TCP_NODELAY, Nagle's algorithm holds them until the peer's delayed ACK.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let ctx = accept_ctx.clone();
            let warp = warp.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let ctx = ctx.clone();
                let warp = warp.clone();
                async move {
                    if files::claims(req.uri().path()) {
                        return Ok::<_, std::convert::Infallible>(files::handle(ctx, req).await);
                    }
                    let role = match req.uri().path() {
                        "/ws/client" => Some(Role::Client),
                        "/ws/worker" => Some(Role::Worker),
                        _ => None,
                    };
                    if let Some(role) = role {
                        let resp = match ws::upgrade(req, role, ctx) {
                            Ok(resp) => resp.map(|()| files::empty()),
                            Err((status, message)) => files::plain(status, message),
                        };
                        return Ok(resp);
                    }
                    let resp = match hyper::service::Service::call(&warp, req).await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    };
                    Ok(resp.map(|body| body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
                }
            });
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        graceful.shutdown().await;
    });
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        outbox.close_all(close::GOING_AWAY, "broker shutting down");
    };
    let stop = tokio::spawn(stop);
    let mut core = core;
    let result = tokio::select! {
        result = &mut core => {
            server.abort();
            result.unwrap_or(Ok(()))
        }
        _ = &mut server => core.await.unwrap_or(Ok(())),
    };
    stop.abort();
    if let Some(gc) = gc {
        gc.abort();
    }
    Ok(result?)
}

/// Collects unreferenced blobs every `every`, starting one period after start.
async fn collect_blobs(ctx: Arc<Context>, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !ctx.handle.is_ready() {
            continue;
        }
        if let Err(e) = files::collect(&ctx).await {
            tracing::warn!(error = %e.message, "blob collection failed; will retry");
        }
    }
}
