//! The HTTP layer (warp): the JSON API under `/q` and `/j`, server-sent events, health and
//! metrics, the websocket upgrades and the embedded UI. Documented in `docs/http-api.md`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use protocol::JobId;
use protocol::definition::parse_json;
use protocol::id::IdPrefix;
use protocol::job::JobState;
use protocol::messages::{ErrorBody, ErrorCode, SubmitBody, SubmitOutcome};
use serde::Deserialize;
use serde_json::json;
use warp::http::{HeaderMap, StatusCode};
use warp::{Filter, Rejection, Reply};

use crate::auth::{Role, bearer};
use crate::core::{Command, Reply as CoreReply};
use crate::runtime::ReplyTo;
use crate::ws::Context;
use crate::{submission, ui};

/// Largest request body accepted by default (a submission with inline inputs).
pub const DEFAULT_MAX_BODY: u64 = 4 << 20;
/// Default and largest number of jobs `GET /j?prefix=` lists.
pub const FIND_LIMIT: usize = 10;
/// Default and largest page of log lines.
pub const LOG_PAGE: usize = 10_000;

/// An API error on its way to becoming a JSON response.
#[derive(Debug)]
struct ApiError(ErrorBody);

impl warp::reject::Reject for ApiError {}

fn reject(code: ErrorCode, message: impl Into<String>) -> Rejection {
    warp::reject::custom(ApiError(ErrorBody::new(code, message)))
}

/// HTTP status of each error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadMessage | ErrorCode::VersionMismatch => StatusCode::BAD_REQUEST,
        ErrorCode::InvalidDefinition | ErrorCode::HashMismatch => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict | ErrorCode::StaleAttempt => StatusCode::CONFLICT,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_reply(body: ErrorBody) -> warp::reply::Response {
    let status = status_of(body.code);
    let mut resp = warp::reply::with_status(warp::reply::json(&json!({ "error": body })), status).into_response();
    if body.code == ErrorCode::Unauthorized {
        resp.headers_mut().insert("www-authenticate", warp::http::HeaderValue::from_static("Bearer"));
    }
    if body.code == ErrorCode::Unavailable {
        resp.headers_mut().insert("retry-after", warp::http::HeaderValue::from_static("1"));
    }
    resp
}

fn json_reply<T: serde::Serialize>(status: StatusCode, value: &T) -> warp::reply::Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}

/// Turns a core reply into a response; `ok` renders the success case.
fn respond(reply: CoreReply, ok: impl FnOnce(CoreReply) -> warp::reply::Response) -> warp::reply::Response {
    match reply {
        CoreReply::Error(e) => error_reply(e),
        other => ok(other),
    }
}

/// All routes, with errors rendered as JSON.
pub fn routes(
    ctx: Arc<Context>,
    max_body: u64,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    let with_ctx = {
        let ctx = ctx.clone();
        warp::any().map(move || ctx.clone())
    };
    let client = with_ctx.clone().and(client_auth(ctx.clone()));
    // The job's read endpoints also open to a read link for that job (`crate::link`).
    let reader = with_ctx.clone().and(read_auth(ctx.clone()));

    let healthz = warp::path!("healthz").and(warp::get()).and(with_ctx.clone()).map(|ctx: Arc<Context>| {
        // A broker opened to everyone on purpose says so wherever its health is looked at.
        let text = if ctx.tokens.is_open() && ctx.access.insecure_no_auth {
            "ok\ninsecure: no tokens, anyone who can reach this broker can run jobs (--insecure-no-auth)\n"
        } else {
            "ok\n"
        };
        warp::reply::with_status(text, StatusCode::OK).into_response()
    });
    let readyz = warp::path!("readyz").and(warp::get()).and(with_ctx.clone()).map(|ctx: Arc<Context>| {
        if ctx.all.len() > 1 {
            return shards_ready(&ctx);
        }
        if ctx.handle.is_ready() {
            warp::reply::with_status("ready\n", StatusCode::OK).into_response()
        } else if let Some(owner) = ctx.handle.standby_for() {
            let text = format!("standby\nowner: {owner}\n");
            warp::reply::with_status(text, StatusCode::SERVICE_UNAVAILABLE).into_response()
        } else {
            warp::reply::with_status("recovering\n", StatusCode::SERVICE_UNAVAILABLE).into_response()
        }
    });
    // A standby answers too (its shards' gauges say it owns none), so it can be scraped and
    // alerted on like any broker.
    let metrics = warp::path!("metrics").and(warp::get()).and(with_ctx.clone()).then(metrics);

    let submit =
        warp::path!("q" / String / "j").and(warp::post()).and(client.clone()).and(body_limited(max_body)).and_then(
            |queue: String, ctx: Arc<Context>, body: Bytes| async move {
                let parsed = parse_json::<SubmitBody>(&body).map_err(|e| {
                    let code = if e.malformed { ErrorCode::BadMessage } else { ErrorCode::InvalidDefinition };
                    reject(code, e.to_string())
                })?;
                let submit = submission::prepare(
                    &queue,
                    parsed.definition,
                    parsed.namespace,
                    parsed.priority,
                    parsed.force,
                    parsed.retries,
                    &ctx.blobs,
                )
                .await
                .map_err(|e| warp::reject::custom(ApiError(e)))?;
                let reply = ctx.handle.call(Command::Submit(submit)).await;
                Ok::<_, Rejection>(respond(reply, |r| match r {
                    CoreReply::Submitted { outcome, job } => {
                        let status = if matches!(outcome, SubmitOutcome::Created | SubmitOutcome::Rerun) {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        };
                        json_reply(status, &json!({ "jobId": job.id, "outcome": outcome, "job": job }))
                    }
                    other => unexpected(other),
                }))
            },
        );

    // The reference system's submit endpoint, for its clients: `{definition, control?}` in its
    // format, translated by `protocol::reference`.
    let submit_reference = warp::path!("q" / String)
        .and(warp::post())
        .and(client.clone())
        .and(body_limited(max_body))
        .and_then(submit_reference);
    let translate_reference = warp::path!("reference" / "translate")
        .and(warp::post())
        .and(client.clone())
        .and(body_limited(max_body))
        .and_then(translate_reference);

    let list =
        warp::path!("q" / String / "j").and(warp::get()).and(client.clone()).and(warp::query::<ListQuery>()).and_then(
            |queue: String, ctx: Arc<Context>, q: ListQuery| async move {
                let state = match q.state.as_deref() {
                    None => None,
                    Some(s) => Some(serde_json::from_value::<JobState>(json!(s)).map_err(|_| {
                        reject(
                            ErrorCode::BadMessage,
                            format!("unknown state `{s}`; use queued, assigned, running or finished"),
                        )
                    })?),
                };
                let reply = ctx.handle.call(Command::ListJobs { queue, state, limit: q.limit.unwrap_or(100) }).await;
                Ok::<_, Rejection>(respond(reply, |r| match r {
                    CoreReply::Jobs(jobs) => json_reply(StatusCode::OK, &json!({ "jobs": jobs })),
                    other => unexpected(other),
                }))
            },
        );

    let summary = warp::path!("q" / String).and(warp::get()).and(client.clone()).then(
        |queue: String, ctx: Arc<Context>| async move {
            respond(ctx.handle.call(Command::Summary { queue: Some(queue) }).await, |r| match r {
                CoreReply::Summary(mut s) if !s.is_empty() => json_reply(StatusCode::OK, &s.remove(0)),
                other => unexpected(other),
            })
        },
    );
    let scale = warp::path!("q" / String / "scale")
        .and(warp::get())
        .and(client.clone())
        .and(warp::query::<ScaleQuery>())
        .and_then(|queue: String, ctx: Arc<Context>, q: ScaleQuery| async move {
            let per = q.slots_per_worker.unwrap_or(1);
            if per == 0 {
                return Err(reject(ErrorCode::BadMessage, "`slotsPerWorker` must be at least 1"));
            }
            let reply = ctx.handle.call(Command::Summary { queue: Some(queue.clone()) }).await;
            Ok::<_, Rejection>(respond(reply, |r| match r {
                CoreReply::Summary(s) => {
                    let s = s
                        .into_iter()
                        .next()
                        .unwrap_or_else(|| protocol::job::QueueSummary { queue: queue.clone(), ..Default::default() });
                    json_reply(StatusCode::OK, &scale_answer(&s, per, q.min.unwrap_or(0), q.max))
                }
                other => unexpected(other),
            }))
        });
    let queues = warp::path!("q").and(warp::get()).and(client.clone()).and(asked()).then(
        |ctx: Arc<Context>, (target, headers): (String, HeaderMap)| async move {
            let mut queues = Vec::new();
            for handle in ctx.all.iter().filter(|h| h.is_ready()) {
                match handle.call(Command::Summary { queue: None }).await {
                    CoreReply::Summary(s) => queues.extend(s.into_iter().map(|q| json!(q))),
                    CoreReply::Error(e) => return error_reply(e),
                    other => return unexpected(other),
                }
            }
            match crate::router::gather(&ctx, &target, &headers, "queues").await {
                Ok(more) => queues.extend(more),
                Err(e) => return error_reply(e),
            }
            queues.sort_by(|a, b| a["queue"].as_str().cmp(&b["queue"].as_str()));
            json_reply(StatusCode::OK, &json!({ "queues": queues }))
        },
    );

    let job = warp::path!("j" / String).and(warp::get()).and(reader.clone()).and_then(
        |id: String, ctx: Arc<Context>| async move {
            let job = parse_id(&id)?;
            Ok::<_, Rejection>(respond(ctx.handle.call(Command::GetJob { job }).await, |r| match r {
                CoreReply::Job(view) => json_reply(StatusCode::OK, &view),
                other => unexpected(other),
            }))
        },
    );

    let find =
        warp::path!("j").and(warp::get()).and(client.clone()).and(warp::query::<FindQuery>()).and(asked()).and_then(
            |ctx: Arc<Context>, q: FindQuery, (target, headers): (String, HeaderMap)| async move {
                let prefix: IdPrefix = q
                    .prefix
                    .as_deref()
                    .ok_or_else(|| reject(ErrorCode::BadMessage, "give `prefix`, the first hex digits of a job id"))?
                    .parse()
                    .map_err(|m: String| reject(ErrorCode::BadMessage, format!("`prefix`: {m}")))?;
                let limit = q.limit.unwrap_or(FIND_LIMIT).clamp(1, FIND_LIMIT);
                let mut jobs = Vec::new();
                for handle in ctx.all.iter().filter(|h| h.is_ready()) {
                    match handle.call(Command::FindJobs { prefix: prefix.clone(), limit }).await {
                        CoreReply::Jobs(found) => jobs.extend(found.into_iter().map(|j| json!(j))),
                        CoreReply::Error(e) => return Ok(error_reply(e)),
                        other => return Ok(unexpected(other)),
                    }
                }
                match crate::router::gather(&ctx, &target, &headers, "jobs").await {
                    Ok(more) => jobs.extend(more),
                    Err(e) => return Ok(error_reply(e)),
                }
                jobs.truncate(limit);
                Ok::<_, Rejection>(json_reply(StatusCode::OK, &json!({ "jobs": jobs })))
            },
        );

    let definition = warp::path!("j" / String / "definition").and(warp::get()).and(client.clone()).and_then(
        |id: String, ctx: Arc<Context>| async move {
            let job = parse_id(&id)?;
            Ok::<_, Rejection>(respond(ctx.handle.call(Command::GetDefinition { job }).await, |r| match r {
                CoreReply::Definition(json) => {
                    warp::reply::with_header(json.to_string(), "content-type", "application/json").into_response()
                }
                other => unexpected(other),
            }))
        },
    );

    let logs = warp::path!("j" / String / "logs")
        .and(warp::get())
        .and(reader.clone())
        .and(warp::query::<LogsQuery>())
        .and_then(|id: String, ctx: Arc<Context>, q: LogsQuery| async move {
            let job = parse_id(&id)?;
            let limit = q.limit.unwrap_or(LOG_PAGE).min(LOG_PAGE);
            Ok::<_, Rejection>(respond(ctx.handle.call(Command::GetLogs { job, since: q.since.unwrap_or(0), limit }).await, |r| match r {
                CoreReply::Logs { offset, lines, total, finished } => {
                    let next = offset + lines.len() as u64;
                    json_reply(StatusCode::OK, &json!({ "jobId": job, "offset": offset, "next": next, "total": total, "finished": finished, "lines": lines }))
                }
                other => unexpected(other),
            }))
        });

    let events = warp::path!("j" / String / "events")
        .and(warp::get())
        .and(reader.clone())
        .and(warp::query::<LogsQuery>())
        .and_then(|id: String, ctx: Arc<Context>, q: LogsQuery| async move {
            let job = parse_id(&id)?;
            let stream = follow_job(ctx, job, q.since.unwrap_or(0)).await;
            Ok::<_, Rejection>(warp::sse::reply(warp::sse::keep_alive().stream(stream)).into_response())
        });

    let cancel = warp::path!("j" / String / "cancel")
        .and(warp::post())
        .and(client.clone())
        .and(warp::query::<CancelQuery>())
        .and(body_limited(64 << 10))
        .and_then(|id: String, ctx: Arc<Context>, q: CancelQuery, body: Bytes| async move {
            let job = parse_id(&id)?;
            let from_body = if body.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                parse_json::<CancelBody>(&body).map_err(|e| reject(ErrorCode::BadMessage, e.to_string()))?.namespace
            };
            let namespace = from_body.or(q.namespace);
            Ok::<_, Rejection>(respond(ctx.handle.call(Command::Cancel { job, namespace }).await, |r| match r {
                CoreReply::Cancelled(view) => json_reply(StatusCode::OK, &view),
                other => unexpected(other),
            }))
        });

    let forget = warp::path!("j" / String).and(warp::delete()).and(client.clone()).and_then(
        |id: String, ctx: Arc<Context>| async move {
            let job = parse_id(&id)?;
            Ok::<_, Rejection>(respond(ctx.handle.call(Command::Forget { job }).await, |_| {
                StatusCode::NO_CONTENT.into_response()
            }))
        },
    );

    let link = warp::path!("j" / String / "link")
        .and(warp::post())
        .and(client.clone())
        .and(warp::query::<LinkQuery>())
        .and_then(|id: String, ctx: Arc<Context>, q: LinkQuery| async move {
            let job = parse_id(&id)?;
            let ttl = q.ttl.map_or(crate::link::DEFAULT_LINK_TTL, std::time::Duration::from_secs);
            if ttl.is_zero() || ttl > crate::link::MAX_LINK_TTL {
                let max = crate::link::MAX_LINK_TTL.as_secs();
                return Err(reject(ErrorCode::BadMessage, format!("`ttl` must be between 1 and {max} seconds")));
            }
            Ok::<_, Rejection>(respond(ctx.handle.call(Command::GetJob { job }).await, |r| match r {
                CoreReply::Job(view) => {
                    let expires = crate::link::unix_now() + ttl.as_secs();
                    let query = ctx.links.sign(&job, expires);
                    let outputs: serde_json::Map<String, serde_json::Value> = view
                        .outputs
                        .iter()
                        .map(|o| (o.path.clone(), json!(format!("/j/{job}/outputs/{}?{query}", encode_path(&o.path)))))
                        .collect();
                    json_reply(
                        StatusCode::OK,
                        &json!({
                            "jobId": job,
                            "expires": expires,
                            "query": query,
                            "job": format!("/j/{job}?{query}"),
                            "logs": format!("/j/{job}/logs?{query}"),
                            "events": format!("/j/{job}/events?{query}"),
                            "outputs": outputs,
                        }),
                    )
                }
                other => unexpected(other),
            }))
        });

    // Boxing the groups keeps the filter types shallow enough to compile quickly.
    // What the page needs to know of the broker's settings: whose messages it may take.
    let ui_config = warp::path!("ui" / "config.json")
        .and(warp::get())
        .and(with_ctx.clone())
        .map(|ctx: Arc<Context>| json_reply(StatusCode::OK, &json!({ "allowOrigins": ctx.policy.allowed_origins() })));
    let ops = healthz.or(readyz).unify().or(metrics).unify().or(ui_config).unify().boxed();
    let queue_routes = submit
        .or(submit_reference)
        .unify()
        .or(translate_reference)
        .unify()
        .or(list)
        .unify()
        .or(scale)
        .unify()
        .or(summary)
        .unify()
        .or(queues)
        .unify()
        .boxed();
    let job_routes = logs
        .or(events)
        .unify()
        .or(cancel)
        .unify()
        .or(job)
        .unify()
        .or(forget)
        .unify()
        .or(definition)
        .unify()
        .or(find)
        .unify()
        .or(link)
        .unify()
        .boxed();
    let api = ops.or(queue_routes).unify().or(job_routes).unify().or(ui::routes()).unify();
    api.recover(recover)
        .unify()
        .with(warp::reply::with::header("x-content-type-options", "nosniff"))
        .map(Reply::into_response)
}

/// Parses and translates a reference-system submission.
fn parse_reference(body: &[u8]) -> Result<protocol::reference::Translated, Rejection> {
    parse_json::<protocol::reference::Submission>(body).and_then(protocol::reference::translate_submission).map_err(
        |e| reject(if e.malformed { ErrorCode::BadMessage } else { ErrorCode::InvalidDefinition }, e.to_string()),
    )
}

/// `POST /q/{queue}`: submits a reference-format job; answers in the reference's shape
/// (`success`, `jobId`) plus cq's `outcome` and job view.
async fn submit_reference(queue: String, ctx: Arc<Context>, body: Bytes) -> Result<warp::reply::Response, Rejection> {
    let translated = parse_reference(&body)?;
    let submit =
        submission::prepare(&queue, translated.definition, translated.namespace, None, false, None, &ctx.blobs)
            .await
            .map_err(|e| warp::reject::custom(ApiError(e)))?;
    let reply = ctx.handle.call(Command::Submit(submit)).await;
    Ok(respond(reply, |r| match r {
        CoreReply::Submitted { outcome, job } => {
            let status = if matches!(outcome, SubmitOutcome::Created | SubmitOutcome::Rerun) {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json_reply(status, &json!({ "success": true, "jobId": job.id, "outcome": outcome, "job": job }))
        }
        other => unexpected(other),
    }))
}

/// `POST /reference/translate`: the cq definition, namespace and job id a reference-format
/// submission becomes, without submitting it. The page uses it for definitions from its URL
/// hash and from metaframe inputs.
async fn translate_reference(_ctx: Arc<Context>, body: Bytes) -> Result<warp::reply::Response, Rejection> {
    let t = parse_reference(&body)?;
    Ok(json_reply(
        StatusCode::OK,
        &json!({ "definition": t.definition, "namespace": t.namespace, "jobId": t.definition.job_id() }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<usize>,
    #[allow(dead_code)]
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaleQuery {
    slots_per_worker: Option<u32>,
    min: Option<u64>,
    max: Option<u64>,
    #[allow(dead_code)]
    token: Option<String>,
}

/// What an autoscaler needs for one queue: the raw counts and the workers wanted, i.e. enough
/// slots for every job queued, assigned or running, `slots_per_worker` slots each, within
/// `[min, max]`.
pub fn scale_answer(
    s: &protocol::job::QueueSummary,
    slots_per_worker: u32,
    min: u64,
    max: Option<u64>,
) -> serde_json::Value {
    let demand = s.queued + s.assigned + s.running;
    let mut desired = demand.div_ceil(u64::from(slots_per_worker)).max(min);
    if let Some(max) = max {
        desired = desired.min(max.max(min));
    }
    json!({
        "queue": s.queue,
        "queued": s.queued,
        "assigned": s.assigned,
        "running": s.running,
        "workers": s.workers,
        "slots": s.slots,
        "freeSlots": s.free_slots,
        "oldestQueuedSeconds": s.oldest_queued_ms.unwrap_or(0) as f64 / 1000.0,
        "demandSlots": demand,
        "slotsPerWorker": slots_per_worker,
        "desiredWorkers": desired,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FindQuery {
    prefix: Option<String>,
    limit: Option<usize>,
    #[allow(dead_code)]
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    since: Option<u64>,
    limit: Option<usize>,
    #[allow(dead_code)]
    token: Option<String>,
    #[allow(dead_code)]
    expires: Option<String>,
    #[allow(dead_code)]
    sig: Option<String>,
    /// Names the job's shard in a cluster (the router reads it).
    #[allow(dead_code)]
    queue: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkQuery {
    /// Seconds the link lives.
    ttl: Option<u64>,
    #[allow(dead_code)]
    token: Option<String>,
    /// Names the job's shard in a cluster (the router reads it).
    #[allow(dead_code)]
    queue: Option<String>,
}

/// An output path as URL path segments, each percent-encoded.
fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|p| percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelQuery {
    namespace: Option<String>,
    #[allow(dead_code)]
    token: Option<String>,
    /// Names the job's shard in a cluster (the router reads it).
    #[allow(dead_code)]
    queue: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    namespace: Option<String>,
}

fn unexpected(reply: CoreReply) -> warp::reply::Response {
    tracing::error!(?reply, "unexpected reply from the core");
    error_reply(ErrorBody::new(ErrorCode::Internal, "unexpected reply"))
}

/// A job id in a path. A few hex digits are what the CLI and the page show, so a prefix is told
/// where prefixes are looked up.
fn parse_id(id: &str) -> Result<JobId, Rejection> {
    id.parse().map_err(|e: protocol::id::BadDigest| {
        let hint = match id.parse::<IdPrefix>() {
            Ok(prefix) => format!(
                "; the HTTP API takes whole ids, and `GET /j?prefix={prefix}` finds the jobs whose id starts \
                 with it (the CLI does that for you)"
            ),
            Err(_) => String::new(),
        };
        reject(ErrorCode::BadMessage, format!("bad job id: {e}{hint}"))
    })
}

/// Requires the client token, from `Authorization: Bearer` or a `token` query parameter (for
/// `EventSource`, which cannot set headers).
fn client_auth(ctx: Arc<Context>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::query::<HashMap<String, String>>().or(warp::any().map(HashMap::new)).unify())
        .and_then(move |header: Option<String>, query: HashMap<String, String>| {
            let ctx = ctx.clone();
            async move {
                let given = bearer(header.as_deref()).or(query.get("token").map(String::as_str));
                ctx.tokens
                    .check(Role::Client, given)
                    .map_err(|code| reject(code, ctx.tokens.refusal(Role::Client, code)))
            }
        })
        .untuple_one()
}

/// Requires the client token, or a read link (`expires` and `sig`) for the job the path names.
fn read_auth(ctx: Arc<Context>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and_then(move |header: Option<String>, path: warp::path::FullPath, query: String| {
            let ctx = ctx.clone();
            async move {
                let link = crate::link::LinkParams::from_query(Some(&query));
                if link.present() {
                    let job = path.as_str().split('/').nth(2).unwrap_or("");
                    let job = parse_id(job)?;
                    return ctx
                        .links
                        .verify(&job, &link, crate::link::unix_now())
                        .map_err(|why| reject(ErrorCode::Forbidden, why));
                }
                let token = url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "token").map(|(_, v)| v);
                let given = bearer(header.as_deref()).or(token.as_deref());
                ctx.tokens
                    .check(Role::Client, given)
                    .map_err(|code| reject(code, ctx.tokens.refusal(Role::Client, code)))
            }
        })
        .untuple_one()
}

/// The request body, refused with 413 beyond `max` bytes (with or without a Content-Length).
fn body_limited(max: u64) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .and_then(move |len, stream| collect_limited(len, stream, max))
}

async fn collect_limited<S, B>(len: Option<u64>, stream: S, max: u64) -> Result<Bytes, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let too_large = || reject(ErrorCode::TooLarge, format!("the request body is larger than {max} bytes"));
    if len.is_some_and(|l| l > max) {
        return Err(too_large());
    }
    let mut stream = std::pin::pin!(stream);
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|e| reject(ErrorCode::BadMessage, format!("reading the body: {e}")))?;
        if buf.len() as u64 + chunk.remaining() as u64 > max {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// Follows a job as server-sent events: its state now and on each change, and its log from
/// `since`; the stream ends when the job finishes.
async fn follow_job(
    ctx: Arc<Context>,
    job: JobId,
    since: u64,
) -> impl Stream<Item = Result<warp::sse::Event, Infallible>> {
    let reg = ctx.handle.outbox.register();
    let conn = reg.conn;
    ctx.handle.send(Command::WatchJob { conn, job, since, follow: true }, ReplyTo::None).await;
    let guard = Unwatch { ctx: ctx.clone(), conn, _counted: ctx.handle.metrics.connection("events") };
    futures_util::stream::unfold((reg, guard), |(mut reg, guard)| async move {
        let text = reg.recv().await?;
        Some((Ok(warp::sse::Event::default().data(text.to_string())), (reg, guard)))
    })
}

/// Tells the core that an event stream ended, however it ended.
struct Unwatch {
    ctx: Arc<Context>,
    conn: u64,
    _counted: crate::metrics::ConnectionGuard,
}

impl Drop for Unwatch {
    fn drop(&mut self) {
        let ctx = self.ctx.clone();
        let conn = self.conn;
        ctx.handle.outbox.unregister(conn);
        tokio::spawn(async move {
            ctx.handle.send(Command::Disconnected { conn }, ReplyTo::None).await;
        });
    }
}

async fn metrics(ctx: Arc<Context>) -> warp::reply::Response {
    // The shards this broker serves, summed; those it is a standby for add nothing.
    let mut o = crate::core::Overview::default();
    for handle in ctx.all.iter() {
        if handle.is_ready() {
            match handle.call(Command::Overview).await {
                CoreReply::Overview(shard) => o.add(shard),
                _ => return error_reply(ErrorBody::new(ErrorCode::Unavailable, "no metrics")),
            }
        } else if handle.standby_for().is_none() {
            return error_reply(ErrorBody::new(ErrorCode::Unavailable, "the broker is still recovering its log"));
        }
    }
    let text = ctx.handle.metrics.render(&o);
    warp::reply::with_header(text, "content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
        .into_response()
}

/// `/readyz` of a broker of a cluster with several shards: ready once it has recovered what it
/// took and knows who serves at least one shard (so it takes requests: a shard moving between
/// brokers, whose requests get `503` for a moment, does not take the whole broker out of a
/// load balancer); each shard's state follows.
fn shards_ready(ctx: &Context) -> warp::reply::Response {
    let (mut recovering, mut known) = (false, false);
    let mut lines = String::new();
    for (s, handle) in ctx.all.iter().enumerate() {
        let state = match handle.standby_for() {
            None if handle.is_ready() => {
                known = true;
                "served here".to_string()
            }
            None => {
                recovering = true;
                "recovering here".to_string()
            }
            Some(owner @ crate::lease::Standby::Owner(_)) => {
                known = true;
                format!("owner: {owner}")
            }
            Some(crate::lease::Standby::Unknown) => "owner not known yet (moving)".to_string(),
        };
        lines.push_str(&format!("shard {s}: {state}\n"));
    }
    let ready = known && !recovering;
    let (status, head) = if ready { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") };
    warp::reply::with_status(format!("{head}\n{lines}"), status).into_response()
}

/// The path and query of a request and its headers, to ask the other owners the same
/// ([`crate::router::gather`]).
fn asked() -> impl Filter<Extract = ((String, HeaderMap),), Error = Infallible> + Clone {
    warp::path::full()
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .map(|path: warp::path::FullPath, query: String, headers: HeaderMap| {
            let target =
                if query.is_empty() { path.as_str().to_string() } else { format!("{}?{query}", path.as_str()) };
            (target, headers)
        })
}

async fn recover(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    let body = if let Some(ApiError(body)) = rejection.find::<ApiError>() {
        body.clone()
    } else if rejection.is_not_found() {
        ErrorBody::new(ErrorCode::NotFound, "no such endpoint; see docs/http-api.md")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        return Ok(json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "error": ErrorBody::new(ErrorCode::BadMessage, "method not allowed on this endpoint") }),
        ));
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ErrorBody::new(ErrorCode::TooLarge, "the request body is too large")
    } else if let Some(e) = rejection.find::<warp::reject::InvalidQuery>() {
        ErrorBody::new(ErrorCode::BadMessage, format!("bad query string: {e}"))
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        ErrorBody::new(ErrorCode::BadMessage, format!("bad header: {e}"))
    } else {
        ErrorBody::new(ErrorCode::BadMessage, format!("bad request: {rejection:?}"))
    };
    Ok(error_reply(body))
}
