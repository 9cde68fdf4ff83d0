//! Which shard serves a request, and where: this broker (the shard's owner), or the owner
//! another broker is, through [`crate::edge`].
//!
//! - `/q/{queue}…` goes to the queue's shard ([`crate::shards::shard_of`]).
//! - `/ws/client?queue=Q` to `Q`'s shard, `/ws/worker?queues=A,B` to the one shard of its queues
//!   (refused if they span several); without the parameter, to shard 0.
//! - `/j/{id}…` to the shard holding the job: this broker's shards are asked first, then each
//!   other owner with `GET /j/{id}` ([`probe`]); a request relayed here is answered from this
//!   broker's shards alone, so two brokers never ask each other in turn. With `?queue=Q`, to
//!   `Q`'s shard.
//! - `GET /q` and `GET /j?prefix=` gather every shard's answer ([`gather`]), in the handlers.
//! - Health, readiness, metrics, the page and blobs are served here whatever shard they touch.
//!
//! With one shard every request goes to shard 0, served here by its
//! owner, relayed or redirected by its standbys.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use protocol::JobId;
use protocol::messages::{ErrorBody, ErrorCode};

use crate::access::TimedBody;
use crate::core::{Command, Reply};
use crate::edge::{self, RELAYED_BY};
use crate::files;
use crate::lease::{Holder, Standby};
use crate::shards::{shard_of, shard_of_all};
use crate::ws::Context;

/// Longest wait for another broker's answer to a probe or a gathered list.
const ASK_WITHIN: Duration = Duration::from_secs(10);

/// What to do with a request.
#[derive(Debug)]
pub enum Routed {
    /// Answered already (relayed, redirected, refused).
    Answered(Response<files::Body>),
    /// Serve it here, with the context of this shard.
    Here(Request<TimedBody>, usize),
}

/// Decides where `req` is served; `ctxs` holds one context per shard.
pub async fn route(ctxs: &[Arc<Context>], req: Request<TimedBody>) -> Routed {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let shards = ctxs.len() as u32;
    if matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics") {
        return Routed::Here(req, 0);
    }
    if shards == 1 {
        return to_shard(ctxs, 0, req).await;
    }
    let mut segments = path.trim_start_matches('/').split('/');
    match (segments.next(), segments.next()) {
        (Some("q"), Some(queue)) if !queue.is_empty() => {
            let queue = percent_encoding::percent_decode_str(queue).decode_utf8_lossy();
            let s = shard_of(&queue, shards) as usize;
            to_shard(ctxs, s, req).await
        }
        (Some("q"), None) | (Some("j"), None) => Routed::Here(req, serving(ctxs)),
        // `?queue=` names the shard outright: the one way to reach each of two jobs with one id
        // in queues of different shards.
        (Some("j"), Some(id)) => match (id.parse::<JobId>(), param(&query, "queue")) {
            (Ok(_), Some(queue)) => to_shard(ctxs, shard_of(&queue, shards) as usize, req).await,
            (Ok(job), None) => locate(ctxs, job, req).await,
            (Err(_), _) => Routed::Here(req, serving(ctxs)),
        },
        (Some("ws"), Some("client")) => {
            let queue = param(&query, "queue");
            let s = queue.map(|q| shard_of(&q, shards)).unwrap_or(0) as usize;
            to_shard(ctxs, s, req).await
        }
        (Some("ws"), Some("worker")) => {
            let queues = param(&query, "queues").unwrap_or_default();
            match shard_of_all(queues.split(',').filter(|q| !q.is_empty()), shards) {
                Ok(s) => to_shard(ctxs, s.unwrap_or(0) as usize, req).await,
                Err(m) => Routed::Answered(files::error(ErrorBody::new(ErrorCode::BadMessage, m))),
            }
        }
        // The page, blobs, the reference translator: no shard's state.
        _ => Routed::Here(req, serving(ctxs)),
    }
}

/// A shard this broker serves, to answer what needs none in particular (0 if it serves none:
/// its context still has the blob store and the page).
fn serving(ctxs: &[Arc<Context>]) -> usize {
    ctxs.iter().position(|c| c.handle.is_ready()).unwrap_or(0)
}

/// The value of `name` in a query string.
fn param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// Serves `req` with shard `s`: here if this broker owns it (or is recovering it), else relayed
/// to its owner (workers redirected there), or `503` while nobody is known to own it.
async fn to_shard(ctxs: &[Arc<Context>], s: usize, req: Request<TimedBody>) -> Routed {
    let ctx = &ctxs[s];
    let owner = match ctx.handle.standby_for() {
        None => return Routed::Here(req, s),
        Some(Standby::Owner(owner)) => owner,
        Some(Standby::Unknown) => {
            let which = if ctxs.len() > 1 { format!("shard {s}") } else { "the log".into() };
            return Routed::Answered(edge::unavailable(format!(
                "this broker is a standby and does not yet know which broker owns {which}; try again"
            )));
        }
    };
    let target = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    Routed::Answered(match edge::route(&target, req.headers(), &owner) {
        edge::Route::Relay => edge::relay(req, &ctx.node, &owner, ctx.handle.watch_standby()).await,
        edge::Route::Redirect(location) => edge::redirect(&location),
        edge::Route::Refuse(message) => edge::unavailable(message),
    })
}

/// Finds the shard holding `job` and serves `req` there.
async fn locate(ctxs: &[Arc<Context>], job: JobId, req: Request<TimedBody>) -> Routed {
    for (s, ctx) in ctxs.iter().enumerate() {
        if ctx.handle.is_ready() && matches!(ctx.handle.call(Command::GetJob { job }).await, Reply::Job(_)) {
            return Routed::Here(req, s);
        }
    }
    let relayed = req.headers().contains_key(RELAYED_BY);
    let mut moving = false;
    let mut asked: Vec<Holder> = Vec::new();
    for (s, ctx) in ctxs.iter().enumerate() {
        match ctx.handle.standby_for() {
            None if !ctx.handle.is_ready() => moving = true,
            None => {}
            Some(Standby::Unknown) => moving = true,
            Some(Standby::Owner(owner)) if !relayed && !asked.iter().any(|a| same_broker(a, &owner)) => {
                asked.push(owner.clone());
                match probe(&owner, &job, req.uri().query(), req.headers(), &ctx.node).await {
                    Some(StatusCode::NOT_FOUND) => {}
                    Some(_) => return to_shard(ctxs, s, req).await,
                    None => moving = true,
                }
            }
            Some(Standby::Owner(_)) => {}
        }
    }
    if moving && !relayed {
        return Routed::Answered(edge::unavailable(format!(
            "job {job} is not on the shards that are served now, and a shard is moving between brokers; try again"
        )));
    }
    // Nowhere: a shard served here answers "no job" (or what it answers a bad request); a
    // broker serving none says so itself.
    if ctxs.iter().any(|c| c.handle.is_ready()) {
        return Routed::Here(req, serving(ctxs));
    }
    let mut body = ErrorBody::new(ErrorCode::NotFound, format!("no job {job}"));
    body.job_id = Some(job);
    Routed::Answered(files::error(body))
}

/// The other brokers that own shards, once each, with the first shard each owns: whom to ask
/// for what every shard contributes. An error (`503`) while a shard is still recovering here or
/// has no known owner, as an answer without it would read as complete.
pub(crate) fn other_owners(all: &[crate::runtime::Handle]) -> Result<Vec<(usize, Holder)>, ErrorBody> {
    let mut owners: Vec<(usize, Holder)> = Vec::new();
    for (s, handle) in all.iter().enumerate() {
        match handle.standby_for() {
            None if handle.is_ready() => {}
            None => {
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("shard {s} is still recovering here; try again"),
                ));
            }
            Some(Standby::Unknown) => {
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("shard {s} is moving between brokers; try again"),
                ));
            }
            Some(Standby::Owner(owner)) => {
                if !owners.iter().any(|(_, o)| same_broker(o, &owner)) {
                    owners.push((s, owner));
                }
            }
        }
    }
    Ok(owners)
}

/// True if two leases are held by one broker (each lease has a nonce of its own).
fn same_broker(a: &Holder, b: &Holder) -> bool {
    a.node == b.node && a.advertise_url == b.advertise_url
}

/// Asks `owner` whether it holds `job` (`GET /j/{id}` with the client's headers, as relayed);
/// its status, or `None` if it does not answer.
async fn probe(owner: &Holder, job: &JobId, query: Option<&str>, headers: &HeaderMap, me: &str) -> Option<StatusCode> {
    let target = match query {
        Some(q) => format!("/j/{job}?{q}"),
        None => format!("/j/{job}"),
    };
    let (status, _) = ask(owner, &target, headers, me).await?;
    Some(status)
}

/// A `GET` of `target` at `owner`, relayed as broker `me` with the client's end-to-end headers;
/// the status and body, or `None` if it does not answer in time.
pub(crate) async fn ask(
    owner: &Holder,
    target: &str,
    headers: &HeaderMap,
    me: &str,
) -> Option<(StatusCode, bytes::Bytes)> {
    let url = owner.advertise_url.as_deref()?;
    let address = edge::address_of(url)?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(conn);
        let mut req = Request::get(target).body(Empty::<bytes::Bytes>::new()).ok()?;
        for (name, value) in headers {
            if !edge::is_hop_by_hop(name) && name != http::header::CONTENT_LENGTH && name != http::header::CONTENT_TYPE
            {
                req.headers_mut().append(name, value.clone());
            }
        }
        if let Ok(me) = HeaderValue::from_str(me) {
            req.headers_mut().insert(RELAYED_BY, me);
        }
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    tokio::time::timeout(ASK_WITHIN, exchange).await.ok().flatten()
}

/// The lists the other owners answer for `target` (`GET /q` or `GET /j?prefix=`): each one's
/// `field` array, gathered. A request relayed here asks nobody (the broker that relayed it asks
/// every owner). An owner that fails, or a shard nobody is known to own, makes it an error: a
/// list silently missing a shard's part would read as complete.
pub async fn gather(
    ctx: &Context,
    target: &str,
    headers: &HeaderMap,
    field: &str,
) -> Result<Vec<serde_json::Value>, ErrorBody> {
    let mut items = Vec::new();
    if headers.contains_key(RELAYED_BY) || ctx.all.len() <= 1 {
        return Ok(items);
    }
    for (s, owner) in other_owners(&ctx.all)? {
        let said = Standby::Owner(owner.clone());
        let Some((status, body)) = ask(&owner, target, headers, &ctx.node).await else {
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!("{said} (which owns shard {s}) did not answer; try again"),
            ));
        };
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if !status.is_success() {
            let message = value["error"]["message"].as_str().unwrap_or("").to_string();
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!("{said} (which owns shard {s}) answered {status}: {message}"),
            ));
        }
        if let Some(list) = value[field].as_array() {
            items.extend(list.iter().cloned());
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_parameter_is_read_decoded() {
        assert_eq!(param("queue=gpu%3Aa&x=1", "queue").as_deref(), Some("gpu:a"));
        assert_eq!(param("queues=a,b", "queues").as_deref(), Some("a,b"));
        assert_eq!(param("", "queue"), None);
    }
}
