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
use crate::files::{self, BoxError};
use crate::http;
use crate::log::LogError;
use crate::router;
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
    // What every broker of a cluster agrees on: the link key and the number of shards.
    let settings = match &config.store.nats {
        Some(nats) => Some(crate::lease::settings(nats).await?),
        None => None,
    };
    let links = Arc::new(match &settings {
        Some(settings) => crate::link::LinkKey::from_bytes(settings.link_key),
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
    let stop_tx = Arc::new(stop_tx);
    let node = config.store.nats.as_ref().map(|n| n.node.clone()).unwrap_or_default();
    // One core per shard: served here while this broker owns it, a standby otherwise.
    let shards = settings.as_ref().map_or(1, |s| s.shards);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let placement = (shards > 1).then(|| Arc::new(crate::shards::Placement::new(shards)));
    if let (Some(_), Some(nats)) = (&placement, &config.store.nats) {
        crate::lease::ensure_node_unique(nats, nats.lease.unwrap_or_default()).await?;
    }
    let mut handles = Vec::new();
    let mut cores = futures_util::stream::FuturesUnordered::new();
    for shard in 0..shards {
        let mut store = config.store.clone();
        if let Some(nats) = store.nats.as_mut() {
            nats.shard = shard;
            nats.placement = placement.clone();
        }
        let (handle, core) = runtime::start_with(store, stop_rx.clone(), metrics.clone());
        handles.push(handle);
        cores.push(core);
    }
    if let (Some(placement), Some(nats)) = (&placement, &config.store.nats) {
        tracing::info!(shards, "this cluster has several shards: taking a fair share of them");
        let times = nats.lease.unwrap_or_default();
        tokio::spawn(crate::lease::announce(nats.clone(), times, placement.clone(), stop_rx.clone()));
    }
    let all: Arc<[runtime::Handle]> = handles.into();
    let ctxs: Arc<Vec<Arc<Context>>> = Arc::new(
        (0..shards)
            .map(|shard| {
                Arc::new(Context {
                    handle: all[shard as usize].clone(),
                    shard,
                    all: all.clone(),
                    tokens: config.tokens.clone(),
                    blobs: blobs.clone(),
                    shutdown: stop_rx.clone(),
                    policy: policy.clone(),
                    links: links.clone(),
                    access: config.access.clone(),
                    node: node.clone(),
                })
            })
            .collect(),
    );
    let ctx = ctxs[0].clone();
    let counter = ConnectionCounter::new(config.access.max_connections_per_address);
    let header_read_timeout = config.access.header_read_timeout;
    let services: Arc<Vec<_>> = Arc::new(
        ctxs.iter()
            .map(|ctx| TowerToHyperService::new(warp::service(http::routes(ctx.clone(), config.max_body))))
            .collect(),
    );
    let gc = config.blobs.gc_interval.map(|every| tokio::spawn(collect_blobs(ctx.clone(), every)));

    let mut stopping = stop_rx.clone();
    let accept_ctxs = ctxs.clone();
    let mut server = tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
            let ctxs = accept_ctxs.clone();
            let services = services.clone();
            // Shared with the request handlers, so a websocket keeps its connection counted
            // after the HTTP connection has handed it over.
            let counted = Arc::new(counted);
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let ctxs = ctxs.clone();
                let ctx = ctxs[0].clone();
                let services = services.clone();
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
                    let mut resp = match route(req, &ctxs).await {
                        Ok(resp) => resp,
                        Err((req, shard)) => {
                            let resp = match hyper::service::Service::call(&services[shard], req).await {
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
    let stopping_all = {
        let stop_tx = stop_tx.clone();
        let all = all.clone();
        move || {
            let _ = stop_tx.send(true);
            for handle in all.iter() {
                handle.outbox.close_all(close::GOING_AWAY, "broker shutting down");
            }
        }
    };
    let stop = {
        let stopping_all = stopping_all.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            stopping_all();
        })
    };
    // The broker stops when asked, or when a shard's core stops on its own (a storage failure,
    // a lost lease): the other shards then stop gracefully too, handing their leases over.
    let mut result = Ok(());
    tokio::select! {
        Some(ended) = futures_util::StreamExt::next(&mut cores) => {
            result = ended.unwrap_or(Ok(()));
            stopping_all();
        }
        _ = &mut server => {}
    }
    while let Some(ended) = futures_util::StreamExt::next(&mut cores).await {
        if result.is_ok() {
            result = ended.unwrap_or(Ok(()));
        }
    }
    server.abort();
    stop.abort();
    if let Some(gc) = gc {
        gc.abort();
    }
    Ok(result?)
}

/// Serves a request that passed the origin policy if it is for the file streams or a websocket,
/// or for a shard another broker owns; gives it back, with the shard to serve it, for the warp
/// routes otherwise.
async fn route(
    req: hyper::Request<TimedBody>,
    ctxs: &[Arc<Context>],
) -> Result<hyper::Response<files::Body>, (hyper::Request<TimedBody>, usize)> {
    // A standby of a shard holds none of its queues: it relays requests to the owner, redirects
    // workers there, or answers "come back later" at once while it cannot (its core would
    // otherwise hold the request until this broker takes the shard over). Its health and metrics
    // are its own.
    let (req, shard) = match router::route(ctxs, req).await {
        router::Routed::Answered(resp) => return Ok(resp),
        router::Routed::Here(req, shard) => (req, shard),
    };
    let ctx = ctxs[shard].clone();
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
        None => Err((req, shard)),
    }
}

/// Collects unreferenced blobs every `every`, starting one period after start.
async fn collect_blobs(ctx: Arc<Context>, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // One broker of a cluster collects: the one serving shard 0. It gathers the other
        // shards' references from their owners (see `files::collect`).
        if !ctx.all[0].is_ready() {
            continue;
        }
        if let Err(e) = files::collect(&ctx).await {
            tracing::warn!(error = %e.message, "blob collection failed; will retry");
        }
    }
}
