//! Who may reach the broker before any token is looked at: the browser origin policy (which web
//! pages may call it, with the CORS answers that go with it), the `Host` check that keeps a
//! tokenless broker out of reach of DNS rebinding, the framing policy of the page, the
//! per-address connection cap and the HTTP timeouts.
//!
//! A browser names the page that makes a request in the `Origin` header (always on websockets
//! and on cross-origin or state-changing requests). A request without one comes from a program
//! (the CLI, a worker, curl), which tokens govern alone.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// How long a peer may take to send a request's headers, counted from the connection's start
/// or from the end of the previous response (so it is also the idle keep-alive timeout).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may leave a request body without sending a byte.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections (HTTP and websockets) one client address may hold at once.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 1024;
/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: &str = "600";

/// The access settings of a broker.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// Origins besides the broker's own whose pages may call it, e.g. `https://app.example.com`.
    pub allow_origins: Vec<String>,
    /// The `frame-ancestors` source list of the page: who may embed it in a frame.
    pub frame_ancestors: String,
    /// The operator started a tokenless broker beyond loopback on purpose; `/healthz` says so.
    pub insecure_no_auth: bool,
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`BODY_READ_TIMEOUT`].
    pub body_read_timeout: Duration,
    /// See [`MAX_CONNECTIONS_PER_ADDRESS`]; 0 means no cap.
    pub max_connections_per_address: usize,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            allow_origins: Vec::new(),
            frame_ancestors: "*".into(),
            insecure_no_auth: false,
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_read_timeout: BODY_READ_TIMEOUT,
            max_connections_per_address: MAX_CONNECTIONS_PER_ADDRESS,
        }
    }
}

/// Why a request was turned away before reaching an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

/// What the origin policy says about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No `Origin`, or the broker's own: serve it, no CORS headers needed.
    SameOrigin,
    /// An allowed foreign origin: serve it and add CORS headers naming it.
    Cors(HeaderValue),
    /// A CORS preflight from an allowed origin: answer it here.
    Preflight(HeaderValue),
    /// A read through a read link (a bearer capability for one job): serve it to any origin
    /// with `Access-Control-Allow-Origin: *`; the link itself is checked by the endpoint.
    Public,
    Refused(Refusal),
}

/// The origin policy, with the allowed origins normalised once.
#[derive(Debug)]
pub struct Policy {
    allowed: Vec<String>,
    /// A tokenless broker checks `Host` (see [`Policy::check`]).
    tokenless: bool,
    frame_ancestors: HeaderValue,
}

impl Policy {
    /// The policy of `config`; `tokenless` is true when no role needs a token.
    pub fn new(config: &AccessConfig, tokenless: bool) -> Result<Policy, String> {
        let mut allowed = Vec::new();
        for o in &config.allow_origins {
            allowed.push(normalise_origin(o).ok_or_else(|| {
                format!("`{o}` is not an origin: write scheme://host[:port], e.g. https://app.example.com")
            })?);
        }
        let frame_ancestors = HeaderValue::from_str(&format!("frame-ancestors {}", config.frame_ancestors))
            .map_err(|_| format!("`{}` cannot go into a header", config.frame_ancestors))?;
        Ok(Policy { allowed, tokenless, frame_ancestors })
    }

    /// The allowed origins besides the broker's own, normalised.
    pub fn allowed_origins(&self) -> &[String] {
        &self.allowed
    }

    /// The `Content-Security-Policy` of the page: who may frame it.
    pub fn frame_ancestors(&self) -> &HeaderValue {
        &self.frame_ancestors
    }

    /// Judges a request by its method and headers.
    ///
    /// - A tokenless broker answers only to a `Host` that cannot be rebound to it by a web page:
    ///   an IP address, `localhost`, or the host of an allowed origin. Otherwise a page on
    ///   `evil.example`, its name re-pointed at 127.0.0.1, would be "same origin" with the broker.
    /// - A request with an `Origin` is served only if that is the broker's own origin (the
    ///   scheme and the `Host` it was sent to) or an allowed one; `Origin: null` (sandboxed
    ///   frames, files) never is.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Verdict {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_ascii_lowercase);
        if self.tokenless
            && let Some(host) = &host
            && !self.host_is_safe(host)
        {
            return refused(format!(
                "this broker has no tokens, so it answers only to an IP address or localhost, not `{host}`; \
                 list the origin with --allow-origin or set tokens"
            ));
        }
        let Some(origin) = headers.get(header::ORIGIN) else { return Verdict::SameOrigin };
        let Some(given) = origin.to_str().ok().and_then(normalise_origin) else {
            return refused(format!("requests from the origin {origin:?} are not accepted"));
        };
        // The page's own origin: its scheme, and the host the request was sent to.
        let own = host
            .as_deref()
            .and_then(|h| normalise_origin(&format!("{}://{h}", given.split_once("://")?.0)))
            .is_some_and(|o| o == given);
        let listed = self.allowed.contains(&given);
        if !own && !listed {
            return refused(format!(
                "requests from pages on {given} are not accepted; the broker's operator can allow them with --allow-origin {given}"
            ));
        }
        if method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
            return Verdict::Preflight(origin.clone());
        }
        if own { Verdict::SameOrigin } else { Verdict::Cors(origin.clone()) }
    }

    /// Judges a `GET`/`HEAD` that carries a read link ([`is_read_link`]): any page may read
    /// it, as anyone holding the URL can, but a tokenless broker still checks `Host`.
    pub fn check_read_link(&self, headers: &HeaderMap) -> Verdict {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_ascii_lowercase);
        if let Some(host) = host.filter(|h| self.tokenless && !self.host_is_safe(h)) {
            return refused(format!(
                "this broker has no tokens, so it answers only to an IP address or localhost, not `{host}`; \
                 list the origin with --allow-origin or set tokens"
            ));
        }
        Verdict::Public
    }

    fn host_is_safe(&self, host: &str) -> bool {
        let name = host_name(host);
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok() {
            return true;
        }
        self.allowed.iter().any(|a| a.split_once("://").is_some_and(|(_, rest)| host_name(rest) == name))
    }
}

fn refused(message: String) -> Verdict {
    Verdict::Refused(Refusal { status: StatusCode::FORBIDDEN, message })
}

/// `host[:port]` without the port (IPv6 literals keep their brackets).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// `scheme://host[:port]`, lower-cased, without a trailing slash or a default port; `None` for
/// anything that is not an http(s) origin (`null`, a path, other schemes).
pub fn normalise_origin(text: &str) -> Option<String> {
    let url = url::Url::parse(text.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https") || !matches!(url.path(), "" | "/") || url.query().is_some() {
        return None;
    }
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    })
}

/// Whether a request reads one job through a read link: `GET` or `HEAD` of `/j/{id}`,
/// `/j/{id}/logs`, `/j/{id}/events` or `/j/{id}/outputs/…` with a `sig` in its query. Such URLs
/// are handed to other origins (a downstream metaframe, a person), so they are readable from any.
pub fn is_read_link(method: &Method, uri: &http::Uri) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    let signed = uri.query().is_some_and(|q| url::form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "sig"));
    let mut parts = uri.path().trim_start_matches('/').split('/');
    let job = parts.next() == Some("j") && parts.next().is_some_and(|id| id.len() == 64);
    let readable = matches!(
        (parts.next(), parts.next()),
        (None, _) | (Some("logs" | "events"), None) | (Some("outputs"), Some(_))
    );
    signed && job && readable
}

/// Adds `Access-Control-Allow-Origin: *` (and the exposed headers) to a public answer.
pub fn add_public_cors(headers: &mut HeaderMap) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("content-length, content-range, content-disposition, etag"),
    );
}

/// Adds the CORS headers of an allowed foreign origin to a response.
pub fn add_cors(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("content-length, content-range, content-disposition, etag, www-authenticate"),
    );
}

/// The answer to an allowed preflight: any method the API has, the headers it reads.
pub fn preflight_headers(headers: &mut HeaderMap, origin: HeaderValue) {
    add_cors(headers, origin);
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE"));
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, range, x-amz-checksum-sha256"),
    );
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(PREFLIGHT_MAX_AGE));
}

/// Counts open connections per client address, refusing one beyond the cap.
#[derive(Debug, Clone)]
pub struct ConnectionCounter {
    cap: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct Counted {
    addr: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl ConnectionCounter {
    /// A counter allowing `cap` connections per address (0: no cap).
    pub fn new(cap: usize) -> ConnectionCounter {
        ConnectionCounter { cap, open: Arc::default() }
    }

    /// Counts a new connection from `addr`, or `None` if that address is at the cap.
    pub fn admit(&self, addr: IpAddr) -> Option<Counted> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(addr).or_insert(0);
        if self.cap != 0 && *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(Counted { addr, open: self.open.clone() })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

/// A request body that fails when the peer sends nothing for `timeout` while it is being read,
/// so a client that stops mid-body cannot hold a connection and a handler forever.
#[derive(Debug)]
pub struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    /// Armed when a read finds nothing to take, disarmed by each frame.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The peer stopped sending a request body.
#[derive(Debug, thiserror::Error)]
#[error("no part of the request body arrived within {0:?}")]
pub struct BodyTimeout(pub Duration);

impl TimedBody {
    pub fn new(inner: Incoming, timeout: Duration) -> TimedBody {
        TimedBody { inner, timeout, idle: None }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.idle = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match idle.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn policy(allow: &[&str], tokenless: bool) -> Policy {
        let config =
            AccessConfig { allow_origins: allow.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        Policy::new(&config, tokenless).unwrap()
    }

    #[test]
    fn origins() {
        let p = policy(&["https://app.example.com/"], true);
        let get = Method::GET;
        assert_eq!(p.check(&get, &headers(&[("host", "127.0.0.1:8000")])), Verdict::SameOrigin);
        let own = headers(&[("host", "127.0.0.1:8000"), ("origin", "http://127.0.0.1:8000")]);
        assert_eq!(p.check(&get, &own), Verdict::SameOrigin);
        let listed = headers(&[("host", "127.0.0.1:8000"), ("origin", "https://app.example.com")]);
        assert!(matches!(p.check(&get, &listed), Verdict::Cors(_)));
        let mut pre = listed.clone();
        pre.insert("access-control-request-method", HeaderValue::from_static("POST"));
        assert!(matches!(p.check(&Method::OPTIONS, &pre), Verdict::Preflight(_)));
        for bad in ["http://evil.example", "null", "http://127.0.0.1:8001", "https://app.example.com.evil"] {
            let h = headers(&[("host", "127.0.0.1:8000"), ("origin", bad)]);
            assert!(matches!(p.check(&get, &h), Verdict::Refused(_)), "{bad}");
        }
        // DNS rebinding: a tokenless broker does not answer to a name that is not its own.
        let rebound = headers(&[("host", "evil.example:8000"), ("origin", "http://evil.example:8000")]);
        assert!(matches!(p.check(&get, &rebound), Verdict::Refused(_)));
        assert!(matches!(p.check(&get, &headers(&[("host", "evil.example:8000")])), Verdict::Refused(_)));
        assert_eq!(p.check(&get, &headers(&[("host", "localhost:8000")])), Verdict::SameOrigin);
        assert_eq!(p.check(&get, &headers(&[("host", "[::1]:8000")])), Verdict::SameOrigin);
        // With tokens, any name serves (a broker behind a domain), the origin policy still holds.
        let p = policy(&[], false);
        let named = headers(&[("host", "cq.example.com"), ("origin", "https://cq.example.com")]);
        assert_eq!(p.check(&get, &named), Verdict::SameOrigin);
        let named = headers(&[("host", "cq.example.com:443"), ("origin", "https://cq.example.com")]);
        assert_eq!(p.check(&get, &named), Verdict::SameOrigin);
        assert!(Policy::new(&AccessConfig { allow_origins: vec!["*".into()], ..Default::default() }, true).is_err());
    }

    #[test]
    fn connection_cap() {
        let c = ConnectionCounter::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let first = c.admit(a).unwrap();
        let _second = c.admit(a).unwrap();
        assert!(c.admit(a).is_none());
        assert!(c.admit("10.0.0.2".parse().unwrap()).is_some());
        drop(first);
        assert!(c.admit(a).is_some());
    }
}
