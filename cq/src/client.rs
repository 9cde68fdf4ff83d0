//! A small client of the broker's HTTP and websocket APIs, used by the CLI commands.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use protocol::id::IdPrefix;
use protocol::messages::{BrokerToClient, ClientHello, ClientToBroker};
use protocol::{JobId, JobState, JobView, LogLine, PROTOCOL_VERSION};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// How long following a job keeps reconnecting to a broker that is away (restarting, or a
/// standby taking over) before it gives up.
const FOLLOW_RECONNECT_FOR: Duration = Duration::from_secs(60);
/// How long a request answered "unavailable" (503) is tried again: a standby taking over, a
/// broker recovering its log.
pub const UNAVAILABLE_RETRY_FOR: Duration = Duration::from_secs(30);

/// The wait a 503 answer asks for (`Retry-After`), 1 to 10 s.
fn retry_after(resp: &reqwest::Response) -> Duration {
    let one = Duration::from_secs(1);
    worker::blobs::retry_after(resp).unwrap_or(one).max(one)
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The brokers `--url` names (one, or several of one cluster), without trailing slashes.
    bases: Vec<String>,
    /// The one in use: the first, until it cannot be reached (shared by clones).
    current: Arc<AtomicUsize>,
    token: Option<String>,
}

/// Longest wait for a broker's answer to a request (or to a websocket handshake) once it has
/// taken the connection.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(30);

impl Client {
    /// A client of the broker at `url`, or of the brokers of one cluster it lists
    /// comma-separated: a request that cannot reach one goes to the next.
    pub fn new(url: &str, token: Option<String>) -> Result<Client> {
        let mut bases = Vec::new();
        for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let base = one.trim_end_matches('/').to_string();
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                bail!("--url must start with http:// or https://, got `{one}`");
            }
            if let Err(e) = reqwest::Url::parse(&format!("{base}/")) {
                bail!("--url `{one}` is not a URL ({e}); give a broker's address, like http://127.0.0.1:8000");
            }
            bases.push(base);
        }
        if bases.is_empty() {
            bail!("--url is empty; give a broker's address, like http://127.0.0.1:8000");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(ANSWER_WITHIN)
            .build()
            .context("building the HTTP client")?;
        Ok(Client { http, bases, current: Arc::new(AtomicUsize::new(0)), token })
    }

    /// The broker in use.
    pub fn base(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// Moves on to the next broker given (with one, stays on it).
    fn next_base(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }

    /// ` --url URL` for a command the user is told to run next, when the broker is not the one
    /// `cq` reaches without it (the default, or `CQ_URL`); else nothing.
    pub fn url_flag(&self) -> String {
        let implied = std::env::var("CQ_URL").unwrap_or_else(|_| crate::DEFAULT_URL.to_string());
        let implied: Vec<&str> = implied.split(',').map(|u| u.trim().trim_end_matches('/')).collect();
        if implied == self.bases { String::new() } else { format!(" --url {}", self.bases.join(",")) }
    }

    /// Sends the request `build` makes for a broker's base URL, to the broker in use or, when it
    /// cannot be reached (no connection made, so nothing was sent), to each other one given in
    /// turn. Returns the answer and the base URL that gave it.
    async fn send(&self, build: impl Fn(&str) -> reqwest::RequestBuilder) -> Result<(reqwest::Response, String)> {
        let mut tried = 0;
        loop {
            let base = self.base().to_string();
            let req = build(&base);
            match req.send().await {
                Ok(resp) => return Ok((resp, base)),
                // A broker that took the connection and never answers (stopped, say) is passed
                // over like one that refuses it: every request is safe to send again
                // (submissions are named by their content).
                Err(e) if (e.is_connect() || e.is_timeout()) && tried + 1 < self.bases.len() => {
                    tracing::debug!(error = %e, broker = %base, "cannot reach this broker; trying the next");
                    self.next_base();
                    tried += 1;
                }
                Err(e) if self.bases.len() > 1 && e.is_connect() => {
                    let (what, cause, hint) = describe(&e);
                    let hint = if what == REFUSED {
                        "are they running? Check each address in --url (or CQ_URL)"
                    } else {
                        hint
                    };
                    bail!(
                        "none of the brokers given answers ({}); the last one tried, {base}: {what} ({cause}); {hint}",
                        self.bases.join(", ")
                    );
                }
                Err(e) if e.is_timeout() && !e.is_connect() => bail!(
                    "the broker at {base} took the connection and did not answer within {} s; is it stopped or \
                     overloaded? Try again, or give the other brokers of its cluster in --url",
                    ANSWER_WITHIN.as_secs()
                ),
                Err(e) => return Err(connection_error(&base, &e)),
            }
        }
    }

    /// A broker of those given that answers (its base URL), for transfers that go around
    /// [`Client::request`] (blob uploads and downloads).
    pub async fn reachable(&self) -> Result<String> {
        let (_, base) = self.send(|base| self.http.get(format!("{base}/healthz"))).await?;
        Ok(base)
    }

    /// Sends a request and returns its JSON body; API errors become readable errors.
    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let post = method == reqwest::Method::POST;
        let build = |base: &str| {
            let mut req = self.http.request(method.clone(), format!("{base}{path}"));
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            req
        };
        if let Err(e) = build(self.base()).build() {
            bail!("cannot send a request to {}{path}: {e}", self.base());
        }
        let give_up = tokio::time::Instant::now() + UNAVAILABLE_RETRY_FOR;
        let mut told = false;
        let (status, text, url, base) = loop {
            let (resp, base) = self.send(build).await?;
            let url = format!("{base}{path}");
            let status = resp.status();
            let wait = retry_after(&resp);
            let text = resp.text().await.context("reading the broker's answer")?;
            // A standby, or a broker still recovering its log: it serves in a moment. Every
            // request of the CLI may be sent twice (a submission is found by its content).
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && tokio::time::Instant::now() + wait < give_up {
                if !told {
                    eprintln!(
                        "cq: {base} is not serving yet ({}); retrying for up to {} s",
                        worker::blobs::error_message(&text),
                        UNAVAILABLE_RETRY_FOR.as_secs()
                    );
                    told = true;
                }
                tokio::time::sleep(wait).await;
                continue;
            }
            break (status, text, url, base);
        };
        if status.is_success() {
            if text.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).with_context(|| {
                format!("{url} answered with something that is not JSON; is --url the broker's address? {text:.200}")
            });
        }
        if status == reqwest::StatusCode::NOT_FOUND && !is_api_error(&text, "notFound") {
            return Err(no_such_endpoint(&url, &base));
        }
        let mut message = format!("{} (HTTP {status})", worker::blobs::error_message(&text));
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && post {
            // The broker may have stored it and failed to say so (its log unreachable, say).
            message.push_str(
                "; it may have been recorded all the same: sending it again is safe (a job is found by its content)",
            );
        }
        Err(anyhow!(message))
    }

    /// The job a full id or an abbreviated one (6 or more of its first hex digits) names;
    /// an ambiguous prefix is refused with the jobs it could mean.
    pub async fn resolve(&self, given: &str) -> Result<JobId> {
        let lower = given.trim().to_ascii_lowercase();
        if let Ok(id) = lower.parse::<JobId>() {
            return Ok(id);
        }
        let prefix: IdPrefix = lower.parse().map_err(|m: String| anyhow!(m))?;
        let found = self.get(&format!("/j?prefix={prefix}")).await?;
        let jobs: Vec<JobView> =
            serde_json::from_value(found["jobs"].clone()).context("the broker's list of jobs is malformed")?;
        match jobs.as_slice() {
            [] => bail!("no job's id starts with `{prefix}` (finished jobs are kept for the broker's --retention)"),
            [one] => Ok(one.id),
            // One id in several queues of a cluster's different shards: one job id all the same.
            [first, rest @ ..] if rest.iter().all(|j| j.id == first.id) => Ok(first.id),
            many => {
                let lines: Vec<String> = many
                    .iter()
                    .map(|j| format!("  {}  {:<9} queue {}", j.id, crate::commands::state_word(j.state), j.queue))
                    .collect();
                bail!(
                    "`{prefix}` is ambiguous; it starts the ids of{}:\n{}\ngive more digits",
                    if many.len() >= broker::http::FIND_LIMIT { " (at least)" } else { "" },
                    lines.join("\n")
                )
            }
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    fn ws_url(&self, path: &str) -> String {
        websocket_url(&format!("{}{path}", self.base()))
    }

    /// Follows `job` from log line `since` until it finishes, reconnecting if the socket drops;
    /// calls `on_log` for every line exactly once and returns the final view.
    pub async fn follow(
        &self,
        job: JobId,
        mut since: u64,
        mut on_log: impl FnMut(&LogLine),
        mut on_update: impl FnMut(&JobView),
    ) -> Result<JobView> {
        let mut failures = 0u64;
        // Connections made so far, and since when none has been (a broker restarting, a standby
        // taking over).
        let mut connects = 0u64;
        let mut down_since: Option<tokio::time::Instant> = None;
        // Brokers given that could not be reached before any connection was made.
        let mut unreached = 0;
        // The job's queue, which names the shard a cluster's broker serves the socket from.
        let queue = match self.get(&format!("/j/{job}")).await {
            Ok(v) => v["queue"].as_str().map(str::to_string),
            // No such job: the socket would say the same.
            Err(e) if e.to_string().contains("(HTTP 404") => return Err(e),
            Err(_) => None,
        };
        let path = match &queue {
            Some(q) => {
                format!(
                    "/ws/client?queue={}",
                    percent_encoding::utf8_percent_encode(q, percent_encoding::NON_ALPHANUMERIC)
                )
            }
            None => "/ws/client".to_string(),
        };
        loop {
            let before = connects;
            let result = self.follow_once(job, &path, &mut since, &mut connects, &mut on_log, &mut on_update).await;
            match result {
                Ok(Some(view)) => return Ok(view),
                Ok(None) => {}
                // When no broker given was ever reached, that is reported at once; a dropped
                // connection is retried, on the next broker given if there are several.
                Err(e) if connects == 0 => {
                    if unreached + 1 < self.bases.len() {
                        self.next_base();
                        unreached += 1;
                        continue;
                    }
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "following failed; reconnecting");
                    self.next_base();
                }
            }
            if connects > before {
                (failures, down_since) = (0, None);
            }
            let down = *down_since.get_or_insert_with(tokio::time::Instant::now);
            if down.elapsed() >= FOLLOW_RECONNECT_FOR {
                let url = self.url_flag();
                bail!(
                    "lost the connection to the broker at {} for {} s; the job is not cancelled and may still run: follow it again with `cq logs -f{url} {job}`, or see `cq status{url} {job}` (with a cluster, give every broker's address in --url to ride out the loss of one)",
                    self.bases.join(", "),
                    FOLLOW_RECONNECT_FOR.as_secs(),
                );
            }
            failures += 1;
            tokio::time::sleep(Duration::from_millis(200 * failures.min(10))).await;
        }
    }

    async fn follow_once(
        &self,
        job: JobId,
        path: &str,
        since: &mut u64,
        connects: &mut u64,
        on_log: &mut impl FnMut(&LogLine),
        on_update: &mut impl FnMut(&JobView),
    ) -> Result<Option<JobView>> {
        let mut request = self.ws_url(path).into_client_request().context("building the websocket request")?;
        if let Some(t) = &self.token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().context("token is not a valid header value")?);
        }
        let url = self.ws_url(path);
        let mut upgrade_status = None;
        let Ok(connected) = tokio::time::timeout(ANSWER_WITHIN, tokio_tungstenite::connect_async(request)).await else {
            bail!(
                "the broker at {} took the connection and did not answer within {} s; is it stopped or overloaded?",
                self.base(),
                ANSWER_WITHIN.as_secs()
            );
        };
        let socket = connected.map_err(|e| match &e {
            tokio_tungstenite::tungstenite::Error::Http(resp) if resp.status() == 503 => {
                upgrade_status = Some(503);
                anyhow!("{url}: the broker is not serving yet")
            }
            tokio_tungstenite::tungstenite::Error::Http(resp) if resp.status() == 404 => {
                no_such_endpoint(&url, self.base())
            }
            _ => connection_error(self.base(), &e),
        });
        let mut socket = match socket {
            Ok((socket, _)) => socket,
            // Not serving yet (a standby taking over): like a dropped connection, tried again.
            Err(_) if matches!(&upgrade_status, Some(503)) => {
                tracing::debug!("the broker is not serving yet; retrying");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        *connects += 1;
        let hello = ClientToBroker::Hello(ClientHello {
            protocol: PROTOCOL_VERSION,
            token: None,
            agent: Some(concat!("cq-cli/", env!("CARGO_PKG_VERSION")).into()),
        });
        socket.send(Message::text(serde_json::to_string(&hello)?)).await?;
        socket
            .send(Message::text(serde_json::to_string(&ClientToBroker::WatchJob { job_id: job, since: *since })?))
            .await?;
        let mut finished: Option<JobView> = None;
        while let Some(msg) = socket.next().await {
            let text = match msg? {
                Message::Text(t) => t,
                Message::Close(_) => return Ok(None),
                _ => continue,
            };
            match serde_json::from_str::<BrokerToClient>(&text)
                .with_context(|| format!("unexpected message from the broker: {text}"))?
            {
                BrokerToClient::Logs { offset, lines, .. } => {
                    for (i, line) in lines.iter().enumerate() {
                        let n = offset + i as u64;
                        if n >= *since {
                            on_log(line);
                            *since = n + 1;
                        }
                    }
                }
                BrokerToClient::Job { job } => {
                    on_update(&job);
                    if job.state == JobState::Finished {
                        finished = Some(job);
                    }
                }
                // A refusal (unknown job, wrong token) will not change on a retry.
                BrokerToClient::Error(e) => {
                    *connects = 0;
                    bail!("{}", e.message)
                }
                _ => {}
            }
            // Live, log lines come before the update that finishes the job; but a job that had
            // finished before the watch began is sent as its view first, then its log.
            if let Some(job) = finished.take_if(|job| *since >= job.log_lines) {
                return Ok(Some(job));
            }
        }
        Ok(None)
    }
}

/// `url` with its http(s) scheme turned into ws(s); a ws(s) URL as it is.
pub fn websocket_url(url: &str) -> String {
    url.strip_prefix("http").map(|rest| format!("ws{rest}")).unwrap_or_else(|| url.to_string())
}

/// One message for every way of failing to reach the broker: the URL tried, what went wrong
/// (once, not repeated by each layer of the error chain) and a hint that fits the cause.
pub fn connection_error(base: &str, e: &(dyn std::error::Error + 'static)) -> anyhow::Error {
    let (what, cause, hint) = describe(e);
    anyhow!("cannot reach the broker at {base}: {what} ({cause}); {hint}")
}

/// What [`connection_error`] says of a refused connection.
const REFUSED: &str = "nothing listens there";

/// A failure to reach a broker as what went wrong, its innermost cause, and a hint.
fn describe(e: &(dyn std::error::Error + 'static)) -> (&'static str, String, &'static str) {
    let mut chain: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        chain.push(err.to_string());
        next = err.source();
    }
    let all = chain.join(": ").to_lowercase();
    // The innermost error is the cause; outer layers mostly repeat it with their own prefix.
    let cause = chain.last().cloned().unwrap_or_default();
    let (what, hint) = if all.contains("dns error") || all.contains("failed to lookup address") {
        ("cannot resolve the host name", "check the host in --url (or CQ_URL)")
    } else if all.contains("connection refused") {
        (REFUSED, "is the broker running? Start one with `cq dev`, or point --url (or CQ_URL) at it")
    } else if all.contains("tls")
        || all.contains("certificate")
        || all.contains("corrupt message")
        || all.contains("handshake")
    {
        (
            "the TLS handshake failed",
            "if the broker serves plain HTTP, use an http:// URL; if its certificate comes from a private CA, \
             add that CA to the system's trust store",
        )
    } else if all.contains("timed out") {
        ("the connection timed out", "check the address and any firewall between here and the broker")
    } else if all.contains("connection reset") || all.contains("connection closed") || all.contains("invalid http") {
        (
            "the connection failed",
            "is --url the broker's address, and does its scheme (http or https) match the broker's?",
        )
    } else {
        ("the connection failed", "check --url (or CQ_URL)")
    };
    (what, cause, hint)
}

/// Whether `text` is the broker's JSON error with `code` (as opposed to some other server's 404).
fn is_api_error(text: &str, code: &str) -> bool {
    let v: Value = serde_json::from_str(text).unwrap_or_default();
    v["error"]["code"] == code && !v["error"]["message"].as_str().unwrap_or("").starts_with("no such endpoint")
}

fn no_such_endpoint(url: &str, base: &str) -> anyhow::Error {
    anyhow!(
        "{url} is not a broker endpoint (HTTP 404); is {base} the broker's address? It takes no path, e.g. \
         --url http://127.0.0.1:8000"
    )
}
