//! The file endpoints: `PUT`/`GET`/`HEAD /f/{sha256}`, `POST /f/{sha256}/upload`, `POST /f/gc`, `GET /f/refs`
//! and `GET /j/{id}/outputs/{path}`. They stream bodies in both directions, so they are served
//! by hyper directly rather than through warp (whose replies are whole buffers); the server
//! sends every other request on to warp. Documented in `docs/http-api.md`, "Files".

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::Frame;
use object_store::GetRange;
use protocol::JobId;
use protocol::messages::{ErrorBody, ErrorCode};
use serde_json::json;

use crate::auth::{Role, bearer};
use crate::blob::{self, BlobError, GcStats, Held};
use crate::core::{Command, Reply};
use crate::http::status_of;
use crate::ws::Context;

/// Errors inside a response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response the server writes.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The body of a request, with its read timeout.
pub type ReqBody = crate::access::TimedBody;

/// Largest body of `POST /f/{sha256}/upload`.
const PLAN_BODY_MAX: usize = 4 << 10;

/// True for the paths this module serves.
pub fn claims(path: &str) -> bool {
    path.starts_with("/f/") || (path.starts_with("/j/") && path.split('/').nth(3) == Some("outputs"))
}

/// Serves one request on a file endpoint.
pub async fn handle(ctx: Arc<Context>, req: Request<ReqBody>) -> Response<Body> {
    let mut resp = match route(&ctx, req).await {
        Ok(resp) => resp,
        Err(e) => error(e),
    };
    let headers = resp.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Job outputs are arbitrary files: never let one run script in the broker's origin.
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'"));
    resp
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A plain-text response, for the few answers outside the JSON API (a failed upgrade).
pub fn plain(status: StatusCode, message: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{message}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// The JSON error response of `body`.
pub fn error(body: ErrorBody) -> Response<Body> {
    let status = status_of(body.code);
    let mut resp = json_response(status, &json!({ "error": body }));
    if body.code == ErrorCode::Unauthorized {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if body.code == ErrorCode::Unavailable {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn redirect(url: &str) -> Result<Response<Body>, ErrorBody> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    let location = HeaderValue::from_str(url).map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
    resp.headers_mut().insert(header::LOCATION, location);
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn route(ctx: &Context, req: Request<ReqBody>) -> Result<Response<Body>, ErrorBody> {
    authorize(ctx, &req)?;
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match segments.as_slice() {
        ["f", "refs"] if method == Method::GET => {
            let blobs = local_refs(ctx).await?;
            Ok(json_response(StatusCode::OK, &json!({ "blobs": blobs })))
        }
        ["f", "gc"] if method == Method::POST => collect(ctx).await.map(|stats| {
            json_response(
                StatusCode::OK,
                &json!({ "kept": stats.kept, "deleted": stats.deleted, "freedBytes": stats.freed_bytes }),
            )
        }),
        ["f", name] if method == Method::GET || method == Method::HEAD => {
            let sha = blob::parse_name(name).map_err(|e| e.body())?;
            serve_blob(ctx, &sha, &req, None).await
        }
        ["f", name] if method == Method::PUT => put_blob(ctx, name, req).await,
        ["f", name, "upload"] if method == Method::POST => upload_plan(ctx, name, req).await,
        ["j", id, "outputs", rest @ ..] if !rest.is_empty() && (method == Method::GET || method == Method::HEAD) => {
            let job: JobId =
                id.parse().map_err(|e| ErrorBody::new(ErrorCode::BadMessage, format!("bad job id: {e}")))?;
            let mut parts = Vec::with_capacity(rest.len());
            for p in rest {
                let decoded = percent_encoding::percent_decode_str(p)
                    .decode_utf8()
                    .map_err(|_| ErrorBody::new(ErrorCode::BadMessage, "the output path is not UTF-8"))?;
                parts.push(decoded.into_owned());
            }
            output(ctx, job, &parts.join("/"), &req).await
        }
        ["f", ..] | ["j", ..] => Err(ErrorBody::new(
            ErrorCode::BadMessage,
            format!("{method} is not allowed on {path}; see docs/http-api.md"),
        )),
        _ => Err(ErrorBody::new(ErrorCode::NotFound, "no such endpoint; see docs/http-api.md")),
    }
}

/// Either role's token opens the file endpoints: clients upload inputs and fetch outputs,
/// workers do the reverse.
fn authorize(ctx: &Context, req: &Request<ReqBody>) -> Result<(), ErrorBody> {
    // A read link opens the outputs of its one job, and nothing else.
    let link = crate::link::LinkParams::from_query(req.uri().query());
    if link.present() {
        let mut parts = req.uri().path().trim_start_matches('/').split('/');
        let readable = (req.method() == Method::GET || req.method() == Method::HEAD)
            && parts.next() == Some("j")
            && parts.nth(1) == Some("outputs");
        let job = req.uri().path().split('/').nth(2).and_then(|id| id.parse::<JobId>().ok());
        return match job {
            Some(job) if readable => ctx
                .links
                .verify(&job, &link, crate::link::unix_now())
                .map_err(|why| ErrorBody::new(ErrorCode::Forbidden, why)),
            _ => Err(ErrorBody::new(ErrorCode::Forbidden, "a read link opens only its job's outputs, logs and view")),
        };
    }
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let query_token = req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned())
    });
    let given = bearer(header).map(str::to_string).or(query_token);
    let client = ctx.tokens.check(Role::Client, given.as_deref());
    let worker = ctx.tokens.check(Role::Worker, given.as_deref());
    match (client, worker) {
        (Ok(()), _) | (_, Ok(())) => Ok(()),
        (Err(ErrorCode::Unauthorized), _) | (_, Err(ErrorCode::Unauthorized)) => Err(ErrorBody::new(
            ErrorCode::Unauthorized,
            "this broker requires a token: send `Authorization: Bearer <token>`",
        )),
        _ => Err(ErrorBody::new(ErrorCode::Forbidden, "wrong token")),
    }
}

fn content_length(req: &Request<ReqBody>) -> Result<Option<u64>, ErrorBody> {
    match req.headers().get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| ErrorBody::new(ErrorCode::BadMessage, "bad Content-Length")),
    }
}

/// `PUT /f/{sha256}`: stores the body if it hashes to the name. On either backend the bytes
/// stream through the broker, which hashes them before committing: a plain client cannot send
/// the checksum header a presigned S3 upload needs, so it gets no presigned URL.
async fn put_blob(ctx: &Context, name: &str, req: Request<ReqBody>) -> Result<Response<Body>, ErrorBody> {
    let sha = blob::parse_name(name).map_err(|e| e.body())?;
    let length = content_length(&req)?;
    if length.is_some_and(|l| l > ctx.blobs.max_blob()) {
        return Err(BlobError::TooLarge { max: ctx.blobs.max_blob() }.body());
    }
    let body = BodyStream::new(req.into_body()).try_filter_map(|frame| async move { Ok(frame.into_data().ok()) });
    let size = ctx.blobs.put_stream(&sha, length, body).await.map_err(|e| e.body())?;
    Ok(json_response(StatusCode::CREATED, &json!({ "sha256": sha, "size": size })))
}

/// `POST /f/{sha256}/upload` with `{"size": N}`: says whether the blob is already stored, and
/// if not, where and how to upload it.
async fn upload_plan(ctx: &Context, name: &str, req: Request<ReqBody>) -> Result<Response<Body>, ErrorBody> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Plan {
        size: u64,
    }
    let sha = blob::parse_name(name).map_err(|e| e.body())?;
    let limited = http_body_util::Limited::new(req.into_body(), PLAN_BODY_MAX);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| ErrorBody::new(ErrorCode::BadMessage, format!("reading the body: {e}")))?
        .to_bytes();
    let plan: Plan = protocol::definition::parse_json(&bytes)
        .map_err(|e| ErrorBody::new(ErrorCode::BadMessage, format!("expected {{\"size\": N}}: {e}")))?;
    if plan.size > ctx.blobs.max_blob() {
        return Err(BlobError::TooLarge { max: ctx.blobs.max_blob() }.body());
    }
    // Only verified content counts: wrong bytes of the right size are deleted here and uploaded
    // again, and a name the store holds never gets an upload URL.
    match ctx.blobs.held(&sha).await.map_err(|e| e.body())? {
        Held::Verified(size) if size == plan.size => {
            return Ok(json_response(StatusCode::OK, &json!({ "exists": true })));
        }
        Held::Verified(size) => {
            return Err(BlobError::WrongSize { sha, size, claimed: plan.size }.body());
        }
        Held::Absent | Held::Corrupt { .. } => {}
    }
    let (url, headers) = match ctx.blobs.presign_put(&sha).await.map_err(|e| e.body())? {
        Some((url, headers)) => (url.to_string(), headers),
        None => (format!("/f/{sha}"), Vec::new()),
    };
    let headers: serde_json::Map<String, serde_json::Value> =
        headers.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
    Ok(json_response(StatusCode::OK, &json!({ "exists": false, "method": "PUT", "url": url, "headers": headers })))
}

/// `GET /j/{id}/outputs/{path}`: one output file of a job.
async fn output(ctx: &Context, job: JobId, path: &str, req: &Request<ReqBody>) -> Result<Response<Body>, ErrorBody> {
    let view = match ctx.handle.call(Command::GetJob { job }).await {
        Reply::Job(view) => view,
        Reply::Error(e) => return Err(e),
        other => return Err(ErrorBody::new(ErrorCode::Internal, format!("unexpected reply {other:?}"))),
    };
    let Some(file) = view.outputs.iter().find(|o| o.path == path) else {
        let names: Vec<&str> = view.outputs.iter().map(|o| o.path.as_str()).take(20).collect();
        let have = if names.is_empty() { "it has none".to_string() } else { format!("it has: {}", names.join(", ")) };
        return Err(ErrorBody::new(ErrorCode::NotFound, format!("job {job} has no output `{path}`; {have}")));
    };
    let sha = blob::parse_name(&file.sha256).map_err(|e| e.body())?;
    serve_blob(ctx, &sha, req, Some(path)).await
}

/// Serves a blob (whole or a range), or redirects to a presigned URL for it.
async fn serve_blob(
    ctx: &Context,
    sha: &str,
    req: &Request<ReqBody>,
    filename: Option<&str>,
) -> Result<Response<Body>, ErrorBody> {
    let head = req.method() == Method::HEAD;
    let content_type = filename
        .and_then(|f| mime_guess::from_path(f).first_raw())
        .map(|t| if t.starts_with("text/") { format!("{t}; charset=utf-8") } else { t.to_string() })
        .unwrap_or_else(|| "application/octet-stream".into());
    let disposition = filename.map(|name| {
        let base = name.rsplit('/').next().unwrap_or(name);
        let encoded = percent_encoding::utf8_percent_encode(base, percent_encoding::NON_ALPHANUMERIC);
        format!("inline; filename*=UTF-8''{encoded}")
    });
    let size = if ctx.blobs.presigns() {
        // Bytes that reach a browser straight from S3 pass no check on the way, so they are
        // checked here: only content that hashes to its name is handed out.
        match ctx.blobs.held(sha).await.map_err(|e| e.body())? {
            Held::Verified(size) => size,
            Held::Absent | Held::Corrupt { .. } => return Err(BlobError::NotFound(sha.into()).body()),
        }
    } else {
        ctx.blobs.size(sha).await.map_err(|e| e.body())?.ok_or_else(|| BlobError::NotFound(sha.into()).body())?
    };
    // A type a browser would run script in keeps streaming through the broker, where it gets
    // `Content-Security-Policy: sandbox`, which S3 cannot be asked to send.
    if ctx.blobs.presigns() && !head && !active_content(&content_type) {
        let mut overrides = vec![
            ("response-content-type", content_type.clone()),
            ("response-cache-control", CACHE_CONTROL.to_string()),
        ];
        if let Some(d) = &disposition {
            overrides.push(("response-content-disposition", d.clone()));
        }
        let url = ctx.blobs.presign_get(sha, &overrides).await.map_err(|e| e.body())?.expect("presigns");
        return redirect(url.as_str());
    }
    let range = match req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(spec) => match parse_range(spec, size) {
            RangeSpec::Ignore => None,
            RangeSpec::Unsatisfiable => {
                let mut resp = error(ErrorBody::new(
                    ErrorCode::BadMessage,
                    format!("the range `{spec}` is outside the blob's {size} bytes"),
                ));
                *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                resp.headers_mut().insert(header::CONTENT_RANGE, header_value(&format!("bytes */{size}")));
                return Ok(resp);
            }
            RangeSpec::Bytes(start, end) => Some((start, end)),
        },
    };
    let (status, len) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, end - start),
        None => (StatusCode::OK, size),
    };
    let body = if head || len == 0 {
        empty()
    } else {
        let get_range = range.map(|(start, end)| GetRange::Bounded(start..end));
        let result = ctx.blobs.get(sha, get_range).await.map_err(|e| e.body())?;
        match result.payload {
            // A local file: read it in large chunks (object_store's own stream reads 8 KiB at a
            // time, one blocking task each).
            object_store::GetResultPayload::File(file, _) => {
                use tokio::io::{AsyncReadExt, AsyncSeekExt};
                let mut file = tokio::fs::File::from_std(file);
                file.seek(std::io::SeekFrom::Start(result.range.start))
                    .await
                    .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("reading blob {sha}: {e}")))?;
                let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), FILE_CHUNK)
                    .map_ok(Frame::data)
                    .map_err(|e| Box::new(e) as BoxError);
                StreamBody::new(stream).boxed_unsync()
            }
            object_store::GetResultPayload::Stream(stream) => {
                StreamBody::new(stream.map_ok(Frame::data).map_err(|e| Box::new(e) as BoxError)).boxed_unsync()
            }
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, header_value(&content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::ETAG, header_value(&format!("\"{sha}\"")));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL));
    if let Some((start, end)) = range {
        headers.insert(header::CONTENT_RANGE, header_value(&format!("bytes {start}-{}/{size}", end - 1)));
    }
    if let Some(d) = &disposition {
        headers.insert(header::CONTENT_DISPOSITION, header_value(d));
    }
    Ok(resp)
}

/// How long a browser may keep a file: forever, since a name never changes its content.
const CACHE_CONTROL: &str = "private, max-age=31536000, immutable";

/// True for content types a browser renders as a document that can run script (HTML, SVG,
/// XML): those are never handed out as a presigned link, so the sandbox CSP always applies.
fn active_content(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "text/html" || essence.ends_with("+xml") || essence.ends_with("/xml") || essence == "application/pdf"
}

/// Read size when serving a local file.
const FILE_CHUNK: usize = 256 << 10;

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A parsed `Range` header.
#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// Not a single byte range we serve: answer with the whole blob, as HTTP allows.
    Ignore,
    Unsatisfiable,
    /// Half-open `[start, end)`.
    Bytes(u64, u64),
}

fn parse_range(spec: &str, size: u64) -> RangeSpec {
    let Some(ranges) = spec.trim().strip_prefix("bytes=") else { return RangeSpec::Ignore };
    if ranges.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((first, last)) = ranges.trim().split_once('-') else { return RangeSpec::Ignore };
    let (first, last) = (first.trim(), last.trim());
    match (first.is_empty(), last.is_empty()) {
        (true, true) => RangeSpec::Ignore,
        (true, false) => match last.parse::<u64>() {
            Ok(0) => RangeSpec::Unsatisfiable,
            Ok(_) if size == 0 => RangeSpec::Unsatisfiable,
            Ok(n) => RangeSpec::Bytes(size.saturating_sub(n), size),
            Err(_) => RangeSpec::Ignore,
        },
        (false, _) => {
            let Ok(start) = first.parse::<u64>() else { return RangeSpec::Ignore };
            let end = if last.is_empty() {
                size
            } else {
                match last.parse::<u64>() {
                    Ok(l) if l >= start => (l + 1).min(size),
                    _ => return RangeSpec::Ignore,
                }
            };
            if start >= size { RangeSpec::Unsatisfiable } else { RangeSpec::Bytes(start, end) }
        }
    }
}

/// The blobs the retained jobs of this broker's shards reference (inputs of their definitions,
/// recorded outputs); every shard it holds must be served (not still recovering).
async fn local_refs(ctx: &Context) -> Result<HashSet<String>, ErrorBody> {
    let (mut definitions, mut outputs) = (Vec::new(), Vec::new());
    for (shard, handle) in ctx.all.iter().enumerate() {
        if handle.standby_for().is_some() {
            continue;
        }
        if !handle.is_ready() {
            return Err(ErrorBody::new(ErrorCode::Unavailable, format!("shard {shard} is still recovering here")));
        }
        match handle.call(Command::BlobRefs).await {
            Reply::BlobRefs { definitions: d, outputs: o } => {
                definitions.extend(d);
                outputs.extend(o);
            }
            Reply::Error(e) => return Err(e),
            other => return Err(ErrorBody::new(ErrorCode::Internal, format!("unexpected reply {other:?}"))),
        }
    }
    tokio::task::spawn_blocking(move || {
        let mut set: HashSet<String> = outputs.into_iter().collect();
        for d in &definitions {
            set.extend(blob::input_blobs(d));
        }
        set
    })
    .await
    .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))
}

/// One collection pass: gathers the blobs every shard references (this broker's shards, then
/// each other owner's over `GET /f/refs`), then deletes the rest that are past the grace
/// period. A shard with no known owner, or an owner that does not answer, skips the pass: a
/// blob only it references would look unreferenced.
pub async fn collect(ctx: &Context) -> Result<GcStats, ErrorBody> {
    let mut referenced = local_refs(ctx).await?;
    let mut headers = http::HeaderMap::new();
    if let Some(token) = ctx.tokens.client.as_ref().or(ctx.tokens.worker.as_ref())
        && let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}"))
    {
        headers.insert(header::AUTHORIZATION, value);
    }
    for (shard, owner) in crate::router::other_owners(&ctx.all)? {
        let unanswered = || {
            ErrorBody::new(
                ErrorCode::Unavailable,
                format!("{} (which owns shard {shard}) did not give its blob references; try again", owner.node),
            )
        };
        let (status, body) = crate::router::ask(&owner, "/f/refs", &headers, &ctx.node).await.ok_or_else(unanswered)?;
        let blobs: Vec<String> = match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) if status.is_success() => serde_json::from_value(v["blobs"].clone()).map_err(|_| unanswered())?,
            _ => return Err(unanswered()),
        };
        referenced.extend(blobs);
    }
    let stats = ctx.blobs.collect(&referenced).await.map_err(|e| e.body())?;
    tracing::info!(kept = stats.kept, deleted = stats.deleted, freed_bytes = stats.freed_bytes, "blob collection");
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeSpec::Bytes(0, 10));
        assert_eq!(parse_range("bytes=90-", 100), RangeSpec::Bytes(90, 100));
        assert_eq!(parse_range("bytes=-10", 100), RangeSpec::Bytes(90, 100));
        assert_eq!(parse_range("bytes=-1000", 100), RangeSpec::Bytes(0, 100));
        assert_eq!(parse_range("bytes=50-1000", 100), RangeSpec::Bytes(50, 100));
        assert_eq!(parse_range("bytes=100-", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("bytes=9-3", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("items=0-1", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("bytes=x-", 100), RangeSpec::Ignore);
    }

    #[test]
    fn documents_that_can_run_script_are_active() {
        for t in ["text/html; charset=utf-8", "image/svg+xml", "application/xhtml+xml", "text/xml", "application/pdf"] {
            assert!(active_content(t), "{t}");
        }
        for t in ["text/plain; charset=utf-8", "image/png", "application/json", "application/octet-stream"] {
            assert!(!active_content(t), "{t}");
        }
    }

    #[test]
    fn claimed_paths() {
        assert!(claims("/f/abc"));
        assert!(claims("/j/abc/outputs/a.txt"));
        assert!(!claims("/j/abc/logs"));
        assert!(!claims("/q/x/j"));
    }
}
