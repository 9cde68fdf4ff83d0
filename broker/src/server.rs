//! The broker as a server: `run(listener, config, shutdown)` wires the store, the core task, the
//! blob store and the HTTP and websocket layers. It never binds its own port, so tests run many
//! brokers on `127.0.0.1:0` side by side.
//!
//! Connections are served by hyper: the file endpoints ([`crate::files`]) stream their bodies
//! directly, every other request goes to the warp routes ([`crate::http`]). Before either, every
//! request passes the origin policy of [`crate::access`], and every connection its per-address
//! cap and timeouts.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use protocol::close;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::access::{self, AccessConfig, ConnectionCounter, Policy, TimedBody, Verdict};
use crate::auth::Role;
use crate::auth::Tokens;
use crate::blob::{BlobConfig, BlobStore};
use crate::edge;
use crate::files::{self, BoxError};
use crate::http;
use crate::lease::Standby;
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
    /// Origins, framing, timeouts and connection caps.
    pub access: AccessConfig,
}

/// Why the broker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Blobs(#[from] crate::blob::BlobError),
    #[error("{0}")]
    Access(String),
    #[error("cannot read or create the link-signing key: {0}")]
    LinkKey(std::io::Error),
}

/// Serves on `listener` until `shutdown` resolves, then closes every socket with "going away",
/// writes a final snapshot and returns. Returns early with an error if the log cannot be written.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let policy = Arc::new(Policy::new(&config.access, config.tokens.is_open()).map_err(ServeError::Access)?);
    let links = Arc::new(match &config.store.nats {
        // Every broker of a cluster signs and checks links with the same key.
        Some(nats) => crate::link::LinkKey::from_bytes(crate::lease::shared_link_key(nats).await?),
        None => crate::link::LinkKey::load_or_create(&config.store.data_dir).map_err(ServeError::LinkKey)?,
    });
    if config.tokens.is_open() {
        tracing::warn!(
            "no tokens: anyone who can reach this broker can run jobs and read every job (browsers only from allowed origins)"
        );
    } else {
        for role in [Role::Client, Role::Worker] {
            if config.tokens.is_closed(role) {
                tracing::info!(
                    "no {} token is set, so that role is closed",
                    if role == Role::Client { "client" } else { "worker" }
                );
            }
        }
    }
    let blobs = Arc::new(BlobStore::open(&config.blobs, &config.store.data_dir)?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let node = config.store.nats.as_ref().map(|n| n.node.clone()).unwrap_or_default();
    let (handle, core) = runtime::start(config.store, stop_rx.clone());
    let outbox = handle.outbox.clone();
    let ctx = Arc::new(Context {
        handle,
        tokens: config.tokens,
        blobs,
        shutdown: stop_rx.clone(),
        policy,
        links,
        access: config.access.clone(),
        node,
    });
    let counter = ConnectionCounter::new(config.access.max_connections_per_address);
    let header_read_timeout = config.access.header_read_timeout;
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
                    Ok((stream, peer)) => match counter.admit(peer.ip()) {
                        Some(counted) => (stream, counted),
                        None => {
                            tracing::debug!(%peer, "refusing a connection: this address holds too many");
                            continue;
                        }
                    },
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = runtime::stopped(&mut stopping) => break,
            };
            let (stream, counted) = stream;
            // Small messages (an assignment, an acknowledgement) must leave at once: without
            // TCP_NODELAY, Nagle's algorithm holds them until the peer's delayed ACK.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let ctx = accept_ctx.clone();
            let warp = warp.clone();
            // Shared with the request handlers, so a websocket keeps its connection counted
            // after the HTTP connection has handed it over.
            let counted = Arc::new(counted);
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let ctx = ctx.clone();
                let warp = warp.clone();
                let counted = counted.clone();
                async move {
                    // The page's description is public, for any metapage to read before it frames
                    // the page (its route answers `access-control-allow-origin: *`).
                    let public = matches!(req.uri().path(), "/metaframe.json" | "/ui/metaframe.json")
                        && matches!(*req.method(), ::http::Method::GET | ::http::Method::HEAD);
                    let verdict = if public {
                        Verdict::SameOrigin
                    } else if access::is_read_link(req.method(), req.uri()) {
                        ctx.policy.check_read_link(req.headers())
                    } else {
                        ctx.policy.check(req.method(), req.headers())
                    };
                    let read_link = verdict == Verdict::Public;
                    let cors = match verdict {
                        Verdict::SameOrigin | Verdict::Public => None,
                        Verdict::Cors(origin) => Some(origin),
                        Verdict::Preflight(origin) => {
                            let mut resp = hyper::Response::new(files::empty());
                            *resp.status_mut() = ::http::StatusCode::NO_CONTENT;
                            access::preflight_headers(resp.headers_mut(), origin);
                            return Ok(resp);
                        }
                        Verdict::Refused(r) => {
                            tracing::debug!(origin = ?req.headers().get(::http::header::ORIGIN), path = req.uri().path(), "refused by the origin policy");
                            let body =
                                protocol::messages::ErrorBody::new(protocol::messages::ErrorCode::Forbidden, r.message);
                            return Ok(files::error(body));
                        }
                    };
                    let ui = req.uri().path() == "/" || req.uri().path().starts_with("/ui/");
                    let timeout = ctx.access.body_read_timeout;
                    let mut req = req.map(|body| TimedBody::new(body, timeout));
                    req.extensions_mut().insert(counted.clone());
                    let mut resp = match route(req, ctx.clone()).await {
                        Ok(resp) => resp,
                        Err(req) => {
                            let resp = match hyper::service::Service::call(&warp, req).await {
                                Ok(resp) => resp,
                                Err(never) => match never {},
                            };
                            resp.map(|body| body.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
                        }
                    };
                    if let Some(origin) = cors {
                        access::add_cors(resp.headers_mut(), origin);
                    }
                    if read_link {
                        access::add_public_cors(resp.headers_mut());
                    }
                    if ui {
                        resp.headers_mut()
                            .insert(::http::header::CONTENT_SECURITY_POLICY, ctx.policy.frame_ancestors().clone());
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                // hyper-util sniffs the HTTP version from the first bytes with no timeout of its
                // own, so a silent peer is dropped here; hyper's header timeout covers the rest.
                let mut first = [0u8; 1];
                if !matches!(tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await, Ok(Ok(1..))) {
                    return;
                }
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
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

/// Serves a request that passed the origin policy if it is for the file streams or a websocket;
/// gives it back for the warp routes otherwise.
async fn route(
    req: hyper::Request<TimedBody>,
    ctx: Arc<Context>,
) -> Result<hyper::Response<files::Body>, hyper::Request<TimedBody>> {
    // A standby holds no queue: it relays requests to the owner, redirects workers there, or
    // answers "come back later" at once while it cannot (its core would otherwise hold the
    // request until this broker takes the log over). Its health and metrics are its own.
    let local = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
    if let Some(standby) = ctx.handle.standby_for().filter(|_| !local) {
        let owner = match standby {
            Standby::Owner(owner) => owner,
            Standby::Unknown => {
                return Ok(edge::unavailable(
                    "this broker is a standby and does not yet know which broker owns the log; try again".into(),
                ));
            }
        };
        return Ok(match edge::route(req.uri().path(), req.headers(), &owner) {
            edge::Route::Relay => edge::relay(req, &ctx.node, &owner, ctx.handle.watch_standby()).await,
            edge::Route::Redirect(location) => edge::redirect(&location),
            edge::Route::Refuse(message) => edge::unavailable(message),
        });
    }
    if files::claims(req.uri().path()) {
        return Ok(files::handle(ctx, req).await);
    }
    let role = match req.uri().path() {
        "/ws/client" => Some(Role::Client),
        "/ws/worker" => Some(Role::Worker),
        _ => None,
    };
    match role {
        Some(role) => Ok(match ws::upgrade(req, role, ctx) {
            Ok(resp) => resp.map(|()| files::empty()),
            Err((status, message)) => files::plain(status, message),
        }),
        None => Err(req),
    }
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
