//! The edge of a cluster: a standby serves every request by passing it to the broker that owns
//! the log (the URL its lease advertises), so clients may talk to any broker. Plain requests and
//! event streams are relayed with their bodies streamed both ways; a websocket upgrade is relayed
//! as the owner answers it, then the socket is tunnelled byte for byte (pings, close codes and
//! all). Workers are not relayed but redirected (`307` to the owner's `/ws/worker`), so that
//! their sockets, which carry every assignment, hold no extra hop.
//!
//! The owner checks the relayed request as if it came straight from the client (origin, token,
//! limits): the edge passes the headers on unchanged, less the hop-by-hop ones.
//!
//! A relay lasts only while the broker it goes to owns the log, as this standby knows it: once the
//! standby takes the log over or learns of another owner, a request still waiting for its answer
//! gets `503` (retried by cq's clients, now to the new owner), and a relayed event stream or socket
//! ends, so its client connects again. Without that, a relay to an owner that froze (SIGSTOP, a
//! stalled VM) would hang for as long as the owner stays frozen.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper_util::rt::TokioIo;
use protocol::messages::{ErrorBody, ErrorCode};
use tokio::sync::watch;

use crate::access::TimedBody;
use crate::files::{self, BoxError};
use crate::lease::{Holder, Standby};

/// Header of a relayed request, naming the broker that relayed it. A broker that gets a relayed
/// request it cannot serve answers it rather than relaying it again, so two brokers that each
/// believe the other owns the log (or one advertising another's address) cannot loop.
pub const RELAYED_BY: &str = "cq-relayed-by";
/// Longest wait for the connection to the owner.
const CONNECT_WITHIN: Duration = Duration::from_secs(3);

/// Headers that belong to one connection (RFC 9110 §7.6.1), not passed on by a relay.
const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What a standby does with a request while `owner` holds the log.
#[derive(Debug)]
pub enum Route {
    /// Relay it ([`relay`]).
    Relay,
    /// Send the worker to the owner: `307` with this `Location`.
    Redirect(String),
    /// Answer `503` with this message (no address to relay to, or relayed already).
    Refuse(String),
}

/// Decides how a standby serves `target` (a path and query) while `owner` holds the log.
pub fn route(target: &str, headers: &HeaderMap, owner: &Holder) -> Route {
    let path = target.split('?').next().unwrap_or(target);
    let Some(url) = owner.advertise_url.as_deref() else {
        return Route::Refuse(format!(
            "this broker is a standby: {} owns the log and advertises no URL to relay to (--advertise-url); \
             try again, or send this there",
            owner.node
        ));
    };
    if let Some(by) = headers.get(RELAYED_BY) {
        return Route::Refuse(format!(
            "this broker is a standby and the request was relayed to it by {}: {} ({url}) owns the log; \
             check each broker's --advertise-url",
            String::from_utf8_lossy(by.as_bytes()),
            owner.node
        ));
    }
    if !url.starts_with("http://") {
        return Route::Refuse(format!(
            "this broker is a standby: {} owns the log at {url}, which it cannot relay to (only http:// \
             addresses); send this there",
            owner.node
        ));
    }
    if path == "/ws/worker" {
        // The query names the worker's queues, which the owner routes by too.
        return Route::Redirect(format!("{}{target}", url.trim_end_matches('/')));
    }
    Route::Relay
}

/// A `503` naming why, with `Retry-After`.
pub fn unavailable(message: String) -> Response<files::Body> {
    files::error(ErrorBody::new(ErrorCode::Unavailable, message))
}

/// A `307` to `location`, for a worker's socket.
pub fn redirect(location: &str) -> Response<files::Body> {
    let mut resp = Response::new(files::empty());
    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    if let Ok(value) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, value);
    }
    resp
}

/// Resolves once this standby no longer takes `owner` for the owner of the log (`standby` says
/// who is): it took the log over, or another broker did. Never resolves while the broker is
/// going away (the note is gone), so that what is relayed then ends on its own.
pub async fn owner_leaves(mut standby: watch::Receiver<Option<Standby>>, owner: Holder) {
    let still = |now: &Option<Standby>| matches!(now, Some(Standby::Owner(h)) if *h == owner);
    if standby.wait_for(|now| !still(now)).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Relays `req` to the owner `owner` (whose URL [`route`] checked), as broker `me`, for as long
/// as `standby` still names `owner` as the owner.
pub async fn relay(
    mut req: Request<TimedBody>,
    me: &str,
    owner: &Holder,
    standby: watch::Receiver<Option<Standby>>,
) -> Response<files::Body> {
    let url = owner.advertise_url.as_deref().unwrap_or_default();
    let unreachable = |what: String| {
        unavailable(format!(
            "this broker relays this request and cannot reach {} ({url}), which owns its shard's log: {what}; \
             the log may be moving to another broker, try again",
            owner.node
        ))
    };
    let Some(address) = address_of(url) else {
        return unreachable(format!("`{url}` is not a URL"));
    };
    let stream = match tokio::time::timeout(CONNECT_WITHIN, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return unreachable(e.to_string()),
        Err(_) => return unreachable(format!("no connection within {CONNECT_WITHIN:?}")),
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => return unreachable(e.to_string()),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "a relayed connection ended with an error");
        }
    });

    let upgrade = is_upgrade(req.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // The client's connection stays counted (its per-address cap) while its socket is relayed.
    let held = std::mem::take(&mut parts.extensions);
    parts.uri = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").parse().unwrap_or_default();
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Ok(me) = HeaderValue::from_str(me) {
        parts.headers.insert(RELAYED_BY, me);
    }
    let leaves = || owner_leaves(standby.clone(), owner.clone());
    let mut resp = tokio::select! {
        sent = sender.send_request(Request::from_parts(parts, body)) => match sent {
            Ok(resp) => resp,
            Err(e) => return unreachable(e.to_string()),
        },
        () = leaves() => {
            return unavailable(format!(
                "this broker is a standby and relayed this request to {} ({url}), which stopped owning the log \
                 before it answered; it may have been recorded, and sending it again is safe: try again",
                owner.node
            ));
        }
    };
    if let (StatusCode::SWITCHING_PROTOCOLS, Some(client_side)) = (resp.status(), client_side) {
        let owner_side = hyper::upgrade::on(&mut resp);
        let leaves = leaves();
        tokio::spawn(async move {
            let _held = held;
            let (client, owner) = tokio::join!(client_side, owner_side);
            let (Ok(client), Ok(owner)) = (client, owner) else {
                return;
            };
            let (mut client, mut owner) = (TokioIo::new(client), TokioIo::new(owner));
            // Ends when either side closes (the other then sees its connection close), or when
            // the owner is an owner no more: the client then connects again, to the new one.
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut client, &mut owner) => if let Err(e) = copied {
                    tracing::debug!(error = %e, "a relayed socket ended with an error");
                },
                () = leaves => tracing::debug!("a relayed socket closed: its broker no longer owns the log"),
            }
        });
        return resp.map(|body| body.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    // An event stream (or any long answer) ends when the owner is an owner no more.
    let leaves = leaves();
    resp.map(|body| {
        let frames = TryStreamExt::map_err(BodyStream::new(body), |e| Box::new(e) as BoxError);
        StreamBody::new(frames.take_until(leaves)).boxed_unsync()
    })
}

/// The host and port an `http://` URL names (port 80 if none), to connect to.
pub fn address_of(url: &str) -> Option<(String, u16)> {
    let authority = url.parse::<Uri>().ok()?.authority()?.clone();
    Some((authority.host().trim_matches(['[', ']']).to_string(), authority.port_u16().unwrap_or(80)))
}

/// True for a request asking to switch protocols (a websocket handshake).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// True for a header that belongs to one connection and is not passed on.
pub fn is_hop_by_hop(name: &header::HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == "keep-alive" || name == "proxy-connection"
}

/// Removes the hop-by-hop headers and those `Connection` names; an upgrade keeps its
/// `Connection: upgrade` and `Upgrade`, which the handshake needs at every hop.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if let (true, Some(to)) = (upgrade, upgrade_to) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(url: Option<&str>) -> Holder {
        Holder { node: "a".into(), advertise_url: url.map(Into::into), nonce: String::new() }
    }

    #[test]
    fn workers_are_redirected_clients_relayed_and_a_relayed_request_is_not_relayed_again() {
        let none = HeaderMap::new();
        let a = owner(Some("http://10.0.0.1:8000/"));
        assert!(matches!(route("/ws/worker", &none, &a), Route::Redirect(l) if l == "http://10.0.0.1:8000/ws/worker"));
        assert!(
            matches!(route("/ws/worker?queues=a,b", &none, &a), Route::Redirect(l) if l == "http://10.0.0.1:8000/ws/worker?queues=a,b")
        );
        assert!(matches!(route("/ws/client", &none, &a), Route::Relay));
        assert!(matches!(route("/q/x/j", &none, &a), Route::Relay));
        let mut relayed = HeaderMap::new();
        relayed.insert(RELAYED_BY, HeaderValue::from_static("b"));
        assert!(matches!(route("/q/x/j", &relayed, &a), Route::Refuse(m) if m.contains("relayed to it by b")));
        assert!(matches!(route("/q/x/j", &none, &owner(None)), Route::Refuse(m) if m.contains("--advertise-url")));
        assert!(
            matches!(route("/q/x/j", &none, &owner(Some("https://a"))), Route::Refuse(m) if m.contains("only http://"))
        );
    }

    #[test]
    fn hop_by_hop_headers_stay_behind_except_an_upgrade_s_own() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private, Upgrade"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        assert!(is_upgrade(&h));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1, "{plain:?}");
        assert!(plain.contains_key(header::AUTHORIZATION));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert!(!h.contains_key("x-private") && h.contains_key(header::AUTHORIZATION));
    }

    /// True if `leaves` has resolved (polled once, no waiting).
    fn resolved(leaves: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>) -> bool {
        futures_util::FutureExt::now_or_never(leaves.as_mut()).is_some()
    }

    #[test]
    fn a_relay_ends_when_its_owner_is_the_owner_no_more() {
        let a = owner(Some("http://a"));
        let b = Holder { node: "b".into(), ..a.clone() };
        let note = watch::channel(Some(Standby::Owner(a.clone()))).0;
        // The owner renewing (the same holder) changes nothing.
        let mut leaves = Box::pin(owner_leaves(note.subscribe(), a.clone()));
        assert!(!resolved(&mut leaves));
        note.send_replace(Some(Standby::Owner(a.clone())));
        assert!(!resolved(&mut leaves));
        // Another broker took over.
        note.send_replace(Some(Standby::Owner(b.clone())));
        assert!(resolved(&mut leaves));
        // This broker took over.
        let mut leaves = Box::pin(owner_leaves(note.subscribe(), b.clone()));
        assert!(!resolved(&mut leaves));
        note.send_replace(None);
        assert!(resolved(&mut leaves));
        // Asked about an owner the standby has already left behind: at once.
        assert!(resolved(&mut Box::pin(owner_leaves(note.subscribe(), a.clone()))));
        // The broker going away ends no relay by itself.
        note.send_replace(Some(Standby::Owner(a.clone())));
        let mut leaves = Box::pin(owner_leaves(note.subscribe(), a));
        drop(note);
        assert!(!resolved(&mut leaves));
    }
}
