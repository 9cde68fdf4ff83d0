//! The websocket layer: `/ws/client` for browsers and CLIs, `/ws/worker` for workers. Each
//! socket starts with a versioned hello, then carries JSON messages both ways. Inbound messages
//! become core commands; outbound ones come from the connection's bounded queue in the outbox.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use protocol::definition::parse_json;
use protocol::messages::{BrokerToClient, BrokerToWorker, ClientToBroker, ErrorBody, ErrorCode, WorkerToBroker};
use protocol::{MAX_WS_MESSAGE, PROTOCOL_VERSION, close};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tracing::Instrument;

use crate::auth::{Role, Tokens};
use crate::blob::BlobStore;
use crate::core::{Command, ConnId, Reply};
use crate::outbox::Registration;
use crate::runtime::{Handle, ReplyTo};
use crate::submission;

/// How long a new socket may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the broker pings each socket.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// A socket silent for this long is closed as dead.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the broker waits for the peer's half of the closing handshake before dropping the
/// connection. Closing without reading it can reset the connection and lose the close frame.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// After a protocol error the broker reads and discards what the peer still sends until it has
/// been quiet this long (or [`CLOSE_LINGER`] has passed): the rest of an oversized message.
const LINGER_QUIET: Duration = Duration::from_millis(250);
/// Most queued outbound messages written before one flush.
const WRITE_BATCH: usize = 64;

/// What every socket task needs.
#[derive(Debug, Clone)]
pub struct Context {
    /// The core of the shard this context serves ([`Context::shard`]).
    pub handle: Handle,
    /// Which shard of [`Context::all`] this context serves (0 without a cluster of several).
    pub shard: u32,
    /// Every shard's core on this broker, its own and the ones it is a standby for.
    pub all: Arc<[Handle]>,
    pub tokens: Tokens,
    pub blobs: Arc<BlobStore>,
    pub shutdown: watch::Receiver<bool>,
    pub policy: Arc<crate::access::Policy>,
    pub links: Arc<crate::link::LinkKey>,
    pub access: crate::access::AccessConfig,
    /// This broker's name in its cluster (empty without one).
    pub node: String,
}

/// A server-side websocket over an upgraded HTTP connection.
pub type WebSocket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;
type Sink = futures_util::stream::SplitSink<WebSocket, Message>;
type Stream = futures_util::stream::SplitStream<WebSocket>;

/// Initial size of a socket's read buffer. tungstenite's default (128 KiB, allocated up front)
/// would dominate the memory of an idle connection; the buffer grows for larger messages.
const READ_BUFFER: usize = 4 << 10;

/// Socket settings: the size limits, and a small initial read buffer.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE))
}

/// Answers a websocket upgrade request on `/ws/client` or `/ws/worker` (RFC 6455 handshake) and
/// serves the socket once hyper hands over the connection.
pub fn upgrade(
    req: hyper::Request<crate::access::TimedBody>,
    role: Role,
    ctx: Arc<Context>,
) -> Result<hyper::Response<()>, (http::StatusCode, &'static str)> {
    use http::header;
    let has = |name: header::HeaderName, want: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
    };
    if req.method() != http::Method::GET || !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return Err((http::StatusCode::UPGRADE_REQUIRED, "this endpoint speaks websocket only"));
    }
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err((http::StatusCode::BAD_REQUEST, "unsupported websocket version (13 is)"));
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return Err((http::StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let token =
        crate::auth::bearer(req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())).map(str::to_string);
    // The socket stays counted against its peer's address for as long as it lives.
    let counted = req.extensions().get::<Arc<crate::access::Counted>>().cloned();
    tokio::spawn(async move {
        let _counted = counted;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let io = TokioIo::new(upgraded);
                let socket = WebSocketStream::from_raw_socket(
                    io,
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    Some(config()),
                )
                .await;
                serve(socket, role, (*ctx).clone(), token).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut resp = hyper::Response::new(());
    *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, http::HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, http::HeaderValue::from_str(&accept).expect("base64 is a header value"));
    Ok(resp)
}

/// Serves one socket of `role`. `header_token` is the bearer token of the upgrade request.
pub async fn serve(socket: WebSocket, role: Role, ctx: Context, header_token: Option<String>) {
    let (mut sink, mut stream) = socket.split();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, next_text(&mut stream)).await {
        Err(_) => return close_with(&mut sink, close::HELLO_TIMEOUT, "no hello within 10 seconds").await,
        Ok(Err(code)) => return close_and_linger(sink, stream, code, "socket error before hello").await,
        Ok(Ok(None)) => return,
        Ok(Ok(Some(text))) => text,
    };
    match role {
        Role::Client => client_session(sink, stream, ctx, header_token, hello).await,
        Role::Worker => worker_session(sink, stream, ctx, header_token, hello).await,
    }
}

async fn client_session(mut sink: Sink, stream: Stream, ctx: Context, header_token: Option<String>, hello: String) {
    let hello = match parse_json::<ClientToBroker>(hello.as_bytes()) {
        Ok(ClientToBroker::Hello(h)) => Ok(h),
        Ok(_) => Err("the first message must be a hello".to_string()),
        Err(e) => Err(format!("malformed hello: {e}")),
    };
    let admitted = match &hello {
        Ok(h) => admit(&mut sink, &ctx, Role::Client, h.protocol, header_token.as_deref().or(h.token.as_deref())).await,
        Err(m) => refuse(&mut sink, Role::Client, ErrorCode::BadMessage, close::BAD_HELLO, m.clone()).await,
    };
    let (true, Ok(hello)) = (admitted, hello) else { return };
    let reg = ctx.handle.outbox.register();
    let welcome = BrokerToClient::Welcome { protocol: PROTOCOL_VERSION, broker: crate::BROKER_AGENT.into() };
    if sink.send(Message::text(serde_json::to_string(&welcome).expect("serialises"))).await.is_err() {
        ctx.handle.outbox.unregister(reg.conn);
        return;
    }
    tracing::debug!(conn = reg.conn, agent = hello.agent.as_deref().unwrap_or(""), "client connected");
    let _counted = ctx.handle.metrics.connection("client");
    session_loop(sink, stream, reg, &ctx, Role::Client).await;
}

async fn worker_session(mut sink: Sink, stream: Stream, ctx: Context, header_token: Option<String>, hello: String) {
    let hello = match parse_json::<WorkerToBroker>(hello.as_bytes()) {
        Ok(WorkerToBroker::Hello(h)) => Ok(h),
        Ok(_) => Err("the first message must be a hello".to_string()),
        Err(e) => Err(format!("malformed hello: {e}")),
    };
    let admitted = match &hello {
        Ok(h) => admit(&mut sink, &ctx, Role::Worker, h.protocol, header_token.as_deref().or(h.token.as_deref())).await,
        Err(m) => refuse(&mut sink, Role::Worker, ErrorCode::BadMessage, close::BAD_HELLO, m.clone()).await,
    };
    let (true, Ok(hello)) = (admitted, hello) else { return };
    let shards = ctx.all.len() as u32;
    match crate::shards::shard_of_all(hello.queues.iter().map(String::as_str), shards) {
        Ok(None) => {}
        Ok(Some(s)) if s == ctx.shard => {}
        Ok(Some(s)) => {
            let m = format!(
                "the queues of this worker live on shard {s}, and this socket reached shard {}: connect with \
                 ?queues= naming them in the URL (cq's worker does)",
                ctx.shard
            );
            refuse(&mut sink, Role::Worker, ErrorCode::BadMessage, close::BAD_HELLO, m).await;
            return;
        }
        Err(m) => {
            refuse(&mut sink, Role::Worker, ErrorCode::BadMessage, close::BAD_HELLO, m).await;
            return;
        }
    }
    let reg = ctx.handle.outbox.register();
    let worker_id = hello.worker_id.clone();
    if let Reply::Error(e) = ctx.handle.call(Command::WorkerHello { conn: reg.conn, hello }).await {
        ctx.handle.outbox.unregister(reg.conn);
        ctx.handle.send(Command::Disconnected { conn: reg.conn }, ReplyTo::None).await;
        refuse(&mut sink, Role::Worker, e.code, close::BAD_HELLO, e.message).await;
        return;
    }
    tracing::info!(conn = reg.conn, worker = %worker_id, "worker connected");
    let _counted = ctx.handle.metrics.connection("worker");
    let span = tracing::info_span!("worker", worker = %worker_id);
    session_loop(sink, stream, reg, &ctx, Role::Worker).instrument(span).await;
    tracing::info!(worker = %worker_id, "worker disconnected");
}

/// Checks the protocol version and the token of a well-formed hello; refuses the socket (and
/// returns false) if either is wrong.
async fn admit(sink: &mut Sink, ctx: &Context, role: Role, protocol: u32, token: Option<&str>) -> bool {
    if protocol != PROTOCOL_VERSION {
        let peer = if role == Role::Client { "client" } else { "worker" };
        let m = format!("this broker speaks protocol {PROTOCOL_VERSION}, the {peer} {protocol}");
        return refuse(sink, role, ErrorCode::VersionMismatch, close::VERSION_MISMATCH, m).await;
    }
    if let Err(code) = ctx.tokens.check(role, token) {
        return refuse(sink, role, code, close::UNAUTHORIZED, ctx.tokens.refusal(role, code)).await;
    }
    true
}

/// Answers with an error message, then closes. Returns false, for `admit`.
async fn refuse(sink: &mut Sink, role: Role, code: ErrorCode, close_code: u16, message: String) -> bool {
    let body = ErrorBody::new(code, message);
    let text = match role {
        Role::Client => serde_json::to_string(&BrokerToClient::Error(body)),
        Role::Worker => serde_json::to_string(&BrokerToWorker::Error(body)),
    }
    .expect("serialises");
    let _ = sink.send(Message::text(text)).await;
    close_with(sink, close_code, "refused").await;
    false
}

async fn close_with(sink: &mut Sink, code: u16, reason: &'static str) {
    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
    let _ = sink.send(Message::Close(Some(frame))).await;
    let _ = sink.close().await;
}

/// Sends the close frame, then keeps reading until the peer answers it, hangs up or
/// [`CLOSE_LINGER`] passes. Dropping a socket with unread data resets the connection, and the
/// peer would lose the close frame (and its code). After a protocol error — an oversized frame
/// whose payload is still arriving — tungstenite cannot parse what follows, so those bytes are
/// read raw and discarded until the peer is quiet for [`LINGER_QUIET`].
async fn close_and_linger(mut sink: Sink, mut stream: Stream, code: u16, reason: &'static str) {
    close_with(&mut sink, code, reason).await;
    let protocol_error = code == close::TOO_BIG || code == close::PROTOCOL_ERROR;
    let _ = tokio::time::timeout(CLOSE_LINGER, async move {
        if !protocol_error {
            loop {
                match stream.next().await {
                    None => return,
                    Some(Ok(m)) if m.is_close() => return,
                    Some(Ok(_)) => {}
                    Some(Err(_)) => break,
                }
            }
        }
        let Ok(mut socket) = sink.reunite(stream) else { return };
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(Ok(n)) = tokio::time::timeout(LINGER_QUIET, socket.get_mut().read(&mut buf)).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// The next text message; `Ok(None)` when the peer closed, `Err(code)` on a protocol error.
async fn next_text(stream: &mut Stream) -> Result<Option<String>, u16> {
    loop {
        match stream.next().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(error_code(&e)),
            Some(Ok(m)) if m.is_close() => return Ok(None),
            Some(Ok(m)) if m.is_text() => return Ok(Some(m.to_text().unwrap_or_default().to_string())),
            Some(Ok(m)) if m.is_binary() => return Ok(Some(String::new())),
            Some(Ok(_)) => {}
        }
    }
}

/// The close code for a socket error: 1009 for a message or frame over the limit.
fn error_code(e: &tokio_tungstenite::tungstenite::Error) -> u16 {
    match e {
        tokio_tungstenite::tungstenite::Error::Capacity(_) => close::TOO_BIG,
        _ => close::PROTOCOL_ERROR,
    }
}

async fn session_loop(mut sink: Sink, mut stream: Stream, mut reg: Registration, ctx: &Context, role: Role) {
    let conn = reg.conn;
    let mut shutdown = ctx.shutdown.clone();
    let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT_INTERVAL, HEARTBEAT_INTERVAL);
    let mut last_heard = Instant::now();
    let close_signal = reg.close.clone();
    let close: Option<(u16, &'static str)> = loop {
        tokio::select! {
            inbound = stream.next() => match inbound {
                None => break None,
                Some(Err(e)) => break Some((error_code(&e), "websocket error")),
                Some(Ok(m)) => {
                    last_heard = Instant::now();
                    if m.is_close() {
                        break None;
                    }
                    if m.is_text() {
                        let text = m.to_text().unwrap_or_default();
                        if let Some(reply) = inbound_message(text, conn, role, ctx).await
                            && sink.send(Message::text(reply)).await.is_err()
                        {
                            break None;
                        }
                    } else if m.is_binary() {
                        let e = ErrorBody::new(ErrorCode::BadMessage, "binary frames are not accepted; send JSON text");
                        if sink.send(Message::text(error_text(role, e))).await.is_err() {
                            break None;
                        }
                    }
                }
            },
            out = reg.recv() => match out {
                Some(text) => {
                    if sink.feed(Message::Text(text)).await.is_err() {
                        break None;
                    }
                    let mut n = 1;
                    while n < WRITE_BATCH {
                        let Some(text) = reg.try_recv() else { break };
                        if sink.feed(Message::Text(text)).await.is_err() {
                            break;
                        }
                        n += 1;
                    }
                    if sink.flush().await.is_err() {
                        break None;
                    }
                }
                // The outbox dropped us: the close signal says why.
                None => break Some(close_signal.get().unwrap_or((close::LAGGING, "dropped"))),
            },
            _ = close_signal.wait() => break close_signal.get(),
            _ = heartbeat.tick() => {
                // A peer the outbox dropped is closed for that reason, even when the tick is
                // picked first: a reader that stopped reading is usually silent too.
                if let Some(reason) = close_signal.get() {
                    break Some(reason);
                }
                if last_heard.elapsed() > HEARTBEAT_TIMEOUT {
                    break Some((close::HEARTBEAT_TIMEOUT, "nothing heard within the heartbeat timeout"));
                }
                if sink.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    break None;
                }
            }
            _ = crate::runtime::stopped(&mut shutdown) => break Some((close::GOING_AWAY, "broker shutting down")),
        }
    };
    ctx.handle.outbox.unregister(conn);
    if let Some((code, reason)) = close {
        // A normal end still delivers what is queued (the update that finished a followed job);
        // a peer dropped for lagging gets nothing more.
        if code == close::DONE {
            while let Some(text) = reg.try_recv() {
                let _ = sink.feed(Message::Text(text)).await;
            }
        }
        close_and_linger(sink, stream, code, reason).await;
    }
    ctx.handle.send(Command::Disconnected { conn }, ReplyTo::None).await;
}

fn error_text(role: Role, e: ErrorBody) -> String {
    match role {
        Role::Client => serde_json::to_string(&BrokerToClient::Error(e)),
        Role::Worker => serde_json::to_string(&BrokerToWorker::Error(e)),
    }
    .expect("serialises")
}

/// Turns one inbound text message into a command. Returns an error message to send back at
/// once if the message is not acceptable.
async fn inbound_message(text: &str, conn: ConnId, role: Role, ctx: &Context) -> Option<String> {
    match role {
        Role::Worker => {
            let msg = match parse_message::<WorkerToBroker>(text) {
                Ok(m) => m,
                Err(e) => {
                    return Some(error_text(
                        role,
                        ErrorBody::new(ErrorCode::BadMessage, format!("not a worker message: {e}")),
                    ));
                }
            };
            if let WorkerToBroker::Logs { lines, .. } = &msg {
                ctx.handle.metrics.log_bytes.inc_by(lines.iter().map(|l| l.text.len() as u64).sum());
            }
            let msg = checked_outputs(msg);
            ctx.handle.send(Command::Worker { conn, msg }, ReplyTo::Worker { conn }).await;
            None
        }
        Role::Client => {
            let msg = match parse_message::<ClientToBroker>(text) {
                Ok(m) => m,
                Err(e) => return Some(error_text(role, explain_client_error(text, e))),
            };
            let (cmd, request) = match msg {
                ClientToBroker::Hello(_) => {
                    return Some(error_text(
                        role,
                        ErrorBody::new(ErrorCode::BadMessage, "hello was already sent on this socket"),
                    ));
                }
                ClientToBroker::Submit(m) => {
                    let m = *m;
                    if let Some(mut e) = elsewhere(ctx, &m.queue) {
                        e.request = m.request;
                        return Some(error_text(role, e));
                    }
                    let prepared = submission::prepare(
                        &m.queue,
                        m.definition,
                        m.namespace,
                        m.priority,
                        m.force,
                        m.retries,
                        &ctx.blobs,
                    )
                    .await;
                    match prepared {
                        Ok(s) => (Command::Submit(s), m.request),
                        Err(mut e) => {
                            e.request = m.request;
                            return Some(error_text(role, e));
                        }
                    }
                }
                ClientToBroker::Cancel { request, job_id, namespace } => {
                    (Command::Cancel { job: job_id, namespace }, request)
                }
                ClientToBroker::WatchQueue { queue } => match elsewhere(ctx, &queue) {
                    Some(e) => return Some(error_text(role, e)),
                    None => (Command::WatchQueue { conn, queue }, None),
                },
                ClientToBroker::UnwatchQueue { queue } => (Command::UnwatchQueue { conn, queue }, None),
                ClientToBroker::WatchJob { job_id, since } => {
                    (Command::WatchJob { conn, job: job_id, since, follow: false }, None)
                }
                ClientToBroker::UnwatchJob { job_id } => (Command::UnwatchJob { conn, job: job_id }, None),
            };
            ctx.handle.send(cmd, ReplyTo::Client { conn, request }).await;
            None
        }
    }
}

/// Why a client socket bound to one shard cannot serve `queue`, if it lives on another.
fn elsewhere(ctx: &Context, queue: &str) -> Option<ErrorBody> {
    let s = crate::shards::shard_of(queue, ctx.all.len() as u32);
    (s != ctx.shard).then(|| {
        ErrorBody::new(
            ErrorCode::BadMessage,
            format!(
                "queue `{queue}` lives on shard {s} of this cluster and this socket serves shard {}: open a socket \
                 with ?queue={queue} in its URL for it",
                ctx.shard
            ),
        )
    })
}

/// Drops outputs a worker reported with a name that could escape a download directory (`..`,
/// absolute, NUL) or a hash that is not a blob name; each is logged. The job still finishes.
fn checked_outputs(msg: WorkerToBroker) -> WorkerToBroker {
    let WorkerToBroker::Finish { job_id, attempt, status, outputs } = msg else { return msg };
    let mut seen = std::collections::HashSet::new();
    let outputs = outputs
        .into_iter()
        .filter(|o| {
            let problem = protocol::definition::validate_relative_path(&o.path)
                .err()
                .or_else(|| protocol::id::parse_sha256(&o.sha256).err().map(|e| e.to_string()))
                .or_else(|| (!seen.insert(o.path.clone())).then(|| "reported twice".to_string()));
            if let Some(problem) = &problem {
                tracing::warn!(job = %job_id, path = %o.path.escape_debug(), problem, "dropping an output the worker reported");
            }
            problem.is_none()
        })
        .collect();
    WorkerToBroker::Finish { job_id, attempt, status, outputs }
}

/// Parses a message after the hello. A message without a payload (`heartbeat`, `drain`) may
/// carry `data` absent, `null` or `{}`; serde accepts the first two, so an empty object is
/// retried without it. Only the error path pays for the retry.
fn parse_message<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, protocol::DefinitionError> {
    match parse_json::<T>(text.as_bytes()) {
        Ok(m) => Ok(m),
        Err(e) => {
            let Ok(serde_json::Value::Object(mut v)) = serde_json::from_str::<serde_json::Value>(text) else {
                return Err(e);
            };
            if !v.get("data").is_some_and(|d| d.as_object().is_some_and(|d| d.is_empty())) {
                return Err(e);
            }
            v.remove("data");
            protocol::definition::from_value(serde_json::Value::Object(v)).map_err(|_| e)
        }
    }
}

/// Serde cannot say where inside an enum's payload parsing failed, so a failed `submit` is
/// parsed again on its own to name the offending field. The error carries the message's
/// `request` whenever that much of it could be read, whatever the message's type.
fn explain_client_error(text: &str, e: protocol::DefinitionError) -> ErrorBody {
    let value: Option<serde_json::Value> = serde_json::from_str(text).ok();
    let request = value.as_ref().and_then(|v| v["data"]["request"].as_u64());
    let mut body = match value.filter(|v| v["type"] == "submit") {
        Some(v) => match protocol::definition::from_value::<protocol::messages::SubmitMessage>(v["data"].clone()) {
            Err(inner) => {
                let code = if inner.field.starts_with("definition") {
                    ErrorCode::InvalidDefinition
                } else {
                    ErrorCode::BadMessage
                };
                // The same words as the HTTP API's for the same mistake.
                ErrorBody::new(code, inner.to_string())
            }
            Ok(_) => ErrorBody::new(ErrorCode::BadMessage, format!("not a client message: {e}")),
        },
        None => ErrorBody::new(ErrorCode::BadMessage, format!("not a client message: {e}")),
    };
    body.request = request;
    body
}

/// Shared by the HTTP layer: the context as an `Arc` for warp filters.
pub type SharedContext = Arc<Context>;
