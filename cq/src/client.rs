//! A small client of the broker's HTTP and websocket APIs, used by the CLI commands.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use protocol::messages::{BrokerToClient, ClientHello, ClientToBroker};
use protocol::{JobId, JobState, JobView, LogLine, PROTOCOL_VERSION};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Reconnects tried while following a job before giving up.
const FOLLOW_RECONNECTS: u32 = 10;

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Result<Client> {
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--url must start with http:// or https://, got `{url}`");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Client { http, base, token })
    }

    /// Sends a request and returns its JSON body; API errors become readable errors.
    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.with_context(|| {
            format!("cannot reach the broker at {} (is it running? start one with `cq dev`)", self.base)
        })?;
        let status = resp.status();
        let text = resp.text().await.context("reading the broker's answer")?;
        if status.is_success() {
            if text.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text)
                .with_context(|| format!("the broker answered with something that is not JSON: {text}"));
        }
        Err(anyhow!("{} (HTTP {status})", worker::blobs::error_message(&text)))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    fn ws_url(&self, path: &str) -> String {
        let rest = self.base.strip_prefix("http").unwrap_or(&self.base);
        format!("ws{rest}{path}")
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
        let mut failures = 0;
        loop {
            match self.follow_once(job, &mut since, &mut on_log, &mut on_update).await {
                Ok(Some(view)) => return Ok(view),
                Ok(None) => {}
                Err(e) if failures < FOLLOW_RECONNECTS => tracing::debug!(error = %e, "following failed; reconnecting"),
                Err(e) => return Err(e),
            }
            failures += 1;
            if failures > FOLLOW_RECONNECTS {
                bail!("lost the connection to the broker {FOLLOW_RECONNECTS} times; giving up");
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(failures).min(25))).await;
        }
    }

    async fn follow_once(
        &self,
        job: JobId,
        since: &mut u64,
        on_log: &mut impl FnMut(&LogLine),
        on_update: &mut impl FnMut(&JobView),
    ) -> Result<Option<JobView>> {
        let mut request = self.ws_url("/ws/client").into_client_request().context("building the websocket request")?;
        if let Some(t) = &self.token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().context("token is not a valid header value")?);
        }
        let (mut socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .with_context(|| format!("cannot open a websocket to {}", self.base))?;
        let hello = ClientToBroker::Hello(ClientHello {
            protocol: PROTOCOL_VERSION,
            token: None,
            agent: Some(concat!("cq-cli/", env!("CARGO_PKG_VERSION")).into()),
        });
        socket.send(Message::text(serde_json::to_string(&hello)?)).await?;
        socket
            .send(Message::text(serde_json::to_string(&ClientToBroker::WatchJob { job_id: job, since: *since })?))
            .await?;
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
                    // Log lines are sent before the update that finishes the job.
                    if job.state == JobState::Finished {
                        return Ok(Some(job));
                    }
                }
                BrokerToClient::Error(e) => bail!("{}", e.message),
                _ => {}
            }
        }
        Ok(None)
    }
}
