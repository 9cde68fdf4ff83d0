//! Moving files to and from the broker's blob store over HTTP: hashing, uploading (skipped when
//! the store already has the bytes; straight to S3 when the broker hands out a presigned URL),
//! and downloading with the hash checked before the file appears under its final name. Used by
//! the worker for inputs and outputs and by the CLI for `--input name=@path` and `cq outputs`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::StreamExt;
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Read size when hashing and uploading files.
const CHUNK: usize = 256 << 10;

/// An HTTP client for the broker's file endpoints.
#[derive(Debug, Clone)]
pub struct BlobClient {
    http: reqwest::Client,
    /// How long a transfer is tried again while the broker (or the store) is unavailable.
    retry_for: Duration,
    /// Shared by clones: a worker given several brokers points every job's client at the one it
    /// is connected to, and a transfer waiting to be tried again goes at once when that changes.
    base: Arc<tokio::sync::watch::Sender<String>>,
    token: Option<String>,
}

/// The name and size of some bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digested {
    pub sha256: String,
    pub size: u64,
}

impl BlobClient {
    /// A client for the broker at `base` (`http://host:port`).
    pub fn new(base: &str, token: Option<String>) -> Result<BlobClient> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        let base = Arc::new(tokio::sync::watch::Sender::new(base.trim_end_matches('/').to_string()));
        Ok(BlobClient { http, retry_for: RETRY_FOR, base, token })
    }

    /// This client, trying transfers again for `retry_for` (instead of [`RETRY_FOR`]) while the
    /// broker is unavailable; zero tries once.
    pub fn retrying_for(mut self, retry_for: Duration) -> BlobClient {
        self.retry_for = retry_for;
        self
    }

    /// Runs `op` until it succeeds, fails for a reason other than [`Unavailable`], or
    /// `retry_for` has passed: every transfer is idempotent (blobs are named by their content),
    /// so one cut short by a broker's restart or a standby's takeover is simply done again,
    /// through [`BlobClient::base`] as it is then (a worker's moves with its connection).
    async fn retrying<T, Fut: Future<Output = Result<T>>>(&self, what: &str, mut op: impl FnMut() -> Fut) -> Result<T> {
        let give_up = tokio::time::Instant::now() + self.retry_for;
        let mut backoff = Duration::from_millis(250);
        let mut told = false;
        let mut moved = self.base.subscribe();
        loop {
            moved.mark_unchanged();
            let err = match op().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let Some(unavailable) = err.chain().find_map(|c| c.downcast_ref::<Unavailable>()) else {
                return Err(err);
            };
            let wait = unavailable.retry_after.unwrap_or(backoff);
            if tokio::time::Instant::now() + wait >= give_up {
                return Err(err);
            }
            if !told {
                tracing::warn!(error = %format!("{err:#}"), retry_for_s = self.retry_for.as_secs(), "{what}: the broker is unavailable; trying again");
                told = true;
            }
            // The worker connected to another broker (a takeover, say): try there now.
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = moved.changed() => tracing::debug!(base = %self.base(), "{what}: trying the broker now connected to"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// The broker's base URL.
    pub fn base(&self) -> String {
        self.base.borrow().clone()
    }

    /// Points this client and its clones at another broker (of the same cluster).
    pub fn set_base(&self, base: &str) {
        let base = base.trim_end_matches('/');
        self.base.send_if_modified(|now| {
            let changed = now != base;
            if changed {
                *now = base.to_string();
            }
            changed
        });
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Uploads a file unless the store already has it; returns its name and size.
    pub async fn upload_file(&self, path: &Path, progress: Option<ProgressBar>) -> Result<Digested> {
        let digested = hash_file(path).await?;
        let what = format!("uploading {}", path.display());
        self.retrying(&what, || self.upload_file_once(path, &digested, progress.clone())).await
    }

    async fn upload_file_once(
        &self,
        path: &Path,
        digested: &Digested,
        progress: Option<ProgressBar>,
    ) -> Result<Digested> {
        let digested = digested.clone();
        if let Some(p) = &progress {
            p.set_position(0);
        }
        let Some(plan) = self.plan(&digested).await? else {
            if let Some(p) = &progress {
                p.finish_with_message("already stored");
            }
            return Ok(digested);
        };
        let file = tokio::fs::File::open(path).await.with_context(|| format!("opening {}", path.display()))?;
        let bar = progress.clone();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, CHUNK).map(move |chunk| {
            if let (Ok(c), Some(p)) = (&chunk, &bar) {
                p.inc(c.len() as u64);
            }
            chunk
        });
        self.put(&digested, &plan, reqwest::Body::wrap_stream(stream)).await?;
        if let Some(p) = &progress {
            p.finish();
        }
        Ok(digested)
    }

    /// Uploads bytes unless the store already has them; returns their name and size.
    pub async fn upload_bytes(&self, bytes: Vec<u8>) -> Result<Digested> {
        let digested = Digested { sha256: hex::encode(Sha256::digest(&bytes)), size: bytes.len() as u64 };
        let bytes = bytes::Bytes::from(bytes);
        self.retrying(&format!("uploading blob {}", digested.sha256), || async {
            if let Some(plan) = self.plan(&digested).await? {
                self.put(&digested, &plan, reqwest::Body::from(bytes.clone())).await?;
            }
            Ok(digested.clone())
        })
        .await
    }

    /// Asks the broker where to upload (`POST /f/{sha}/upload`); `None` when it has the bytes.
    async fn plan(&self, d: &Digested) -> Result<Option<serde_json::Value>> {
        let resp = self
            .authorized(self.http.post(format!("{}/f/{}/upload", self.base(), d.sha256)))
            .json(&serde_json::json!({ "size": d.size }))
            .send()
            .await
            .map_err(|e| unavailable(e, format!("cannot reach the broker at {}", self.base())))?;
        let plan = api_json(resp).await?;
        Ok((plan["exists"] != true).then_some(plan))
    }

    async fn put(&self, d: &Digested, plan: &serde_json::Value, body: reqwest::Body) -> Result<()> {
        let url = plan["url"].as_str().ok_or_else(|| anyhow!("the broker's upload plan has no url"))?;
        // The broker's own endpoint wants the token; a presigned URL carries its own signature.
        let mut req = if url.starts_with('/') {
            self.authorized(self.http.put(format!("{}{url}", self.base())))
        } else {
            self.http.put(url)
        };
        if let Some(headers) = plan["headers"].as_object() {
            for (k, v) in headers {
                req = req.header(k, v.as_str().unwrap_or_default());
            }
        }
        let resp = req
            .header(reqwest::header::CONTENT_LENGTH, d.size)
            .body(body)
            .send()
            .await
            // A presigned URL's signature is a credential for 15 minutes: never in a message
            // (`unavailable` drops the URL).
            .map_err(|e| unavailable(e, format!("uploading blob {}", d.sha256)))?;
        // S3 answers in XML, the broker in JSON: either way the error says what went wrong.
        api_json(resp).await.with_context(|| format!("uploading blob {}", d.sha256))?;
        Ok(())
    }

    /// Downloads `path` (e.g. `/f/{sha}` or `/j/{id}/outputs/a.txt`) to `dest`, checking the
    /// content against `expected` when given. The file appears under `dest` only when complete
    /// and correct.
    pub async fn download(
        &self,
        path: &str,
        dest: &Path,
        expected: Option<&Digested>,
        progress: Option<ProgressBar>,
    ) -> Result<Digested> {
        self.retrying(&format!("downloading {path}"), || self.download_once(path, dest, expected, progress.clone()))
            .await
    }

    async fn download_once(
        &self,
        path: &str,
        dest: &Path,
        expected: Option<&Digested>,
        progress: Option<ProgressBar>,
    ) -> Result<Digested> {
        if let Some(p) = &progress {
            p.set_position(0);
        }
        let url = format!("{}{path}", self.base());
        let resp = self
            .authorized(self.http.get(&url))
            .send()
            .await
            // The broker may redirect to a presigned URL, whose signature stays out of messages.
            .map_err(|e| unavailable(e, format!("cannot reach the broker at {}", self.base())))?;
        if !resp.status().is_success() {
            api_json(resp).await?;
            bail!("downloading {path} failed");
        }
        if let (Some(p), Some(len)) = (&progress, resp.content_length()) {
            p.set_length(len);
        }
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await.with_context(|| format!("creating {}", parent.display()))?;
        }
        let partial = partial_name(dest);
        let mut file =
            tokio::fs::File::create(&partial).await.with_context(|| format!("creating {}", partial.display()))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = resp.bytes_stream();
        let result: Result<()> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| unavailable(e, format!("downloading {path}")))?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).await.with_context(|| format!("writing {}", partial.display()))?;
                if let Some(p) = &progress {
                    p.inc(chunk.len() as u64);
                }
            }
            file.flush().await?;
            Ok(())
        }
        .await;
        drop(file);
        let got = Digested { sha256: hex::encode(hasher.finalize()), size };
        let verdict = result.and_then(|()| match expected {
            Some(e) if *e != got => Err(anyhow!(
                "{path} arrived corrupt: expected sha256 {} ({} bytes), got {} ({} bytes)",
                e.sha256,
                e.size,
                got.sha256,
                got.size
            )),
            _ => Ok(()),
        });
        if let Err(e) = verdict {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        tokio::fs::rename(&partial, dest).await.with_context(|| format!("moving into {}", dest.display()))?;
        if let Some(p) = &progress {
            p.finish();
        }
        Ok(got)
    }
}

/// How long transfers are tried again by default while the broker is unavailable: longer than a
/// takeover after a lost machine (the lease, 15 s by default) with a NATS election on top.
pub const RETRY_FOR: Duration = Duration::from_secs(120);

/// A failure that may pass: the broker or store could not be reached, the connection broke, or
/// it answered 502, 503 or 504. [`BlobClient`] tries such transfers again.
#[derive(Debug)]
pub struct Unavailable {
    message: String,
    /// What the answer's `Retry-After` asked for.
    retry_after: Option<Duration>,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Unavailable {}

/// A transport error as [`Unavailable`], its URL left out (a presigned one is a credential).
fn unavailable(e: reqwest::Error, context: String) -> anyhow::Error {
    let e = e.without_url();
    let mut message = format!("{context}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    Unavailable { message, retry_after: None }.into()
}

fn partial_name(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    dest.with_file_name(name)
}

/// The wait an answer asks for before a retry (`Retry-After` in seconds), kept within 100 ms to
/// 10 s; `None` when it asks for none.
pub fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let secs = resp.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(secs).clamp(Duration::from_millis(100), Duration::from_secs(10)))
}

/// The body of a successful answer as JSON (empty → null); an API error as a readable error.
async fn api_json(resp: reqwest::Response) -> Result<serde_json::Value> {
    let status = resp.status();
    let retry_after = retry_after(&resp);
    let text = resp.text().await.map_err(|e| unavailable(e, "reading the answer".into()))?;
    // A standby taking over, a broker recovering its log, a gateway in between, S3's SlowDown.
    if matches!(status.as_u16(), 502..=504) {
        return Err(Unavailable { message: format!("{status}: {}", error_message(&text)), retry_after }.into());
    }
    if status.is_success() {
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        // Presigned S3 uploads answer with an empty or XML body.
        return Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null));
    }
    bail!("{status}: {}", error_message(&text))
}

/// What went wrong, from an error answer: the broker's `{"error": {"message"}}`, S3's
/// `<Code>` and `<Message>`, or the start of whatever else came back, with anything that looks
/// like a signature or credential taken out (S3 error bodies can echo the request's).
pub fn error_message(body: &str) -> String {
    if let Some(message) = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
    {
        return redact(&message);
    }
    let element = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))?;
        Some(body[start..start + end].trim().to_string())
    };
    if let Some(code) = element("Code") {
        return redact(&match element("Message") {
            Some(message) => format!("{code}: {message}"),
            None => code,
        });
    }
    redact(&body.chars().take(500).collect::<String>())
}

/// `text` with the values of signing parameters (`X-Amz-Signature=`, `X-Amz-Credential=`,
/// `X-Amz-Security-Token=`, `Signature=`, ...) and S3's `<SignatureProvided>` replaced by `…`.
pub fn redact(text: &str) -> String {
    const SECRET_KEYS: [&str; 4] = ["signature=", "credential=", "security-token=", "token="];
    let mut out = String::with_capacity(text.len());
    let lower = text.to_ascii_lowercase();
    let mut i = 0;
    while i < text.len() {
        let rest = &lower[i..];
        if let Some(key) = SECRET_KEYS.iter().find(|k| rest.starts_with(**k)) {
            out.push_str(&text[i..i + key.len()]);
            i += key.len();
            let value_len = text[i..]
                .find(|c: char| c == '&' || c == '"' || c == '\'' || c == '<' || c == ')' || c.is_whitespace())
                .unwrap_or(text.len() - i);
            if value_len > 0 {
                out.push('…');
            }
            i += value_len;
        } else if rest.starts_with("<signatureprovided>") {
            let close = rest.find("</signatureprovided>").map_or(text.len(), |e| i + e);
            out.push_str("<SignatureProvided>…");
            i = close;
        } else {
            let c = text[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Hashes a file on a blocking thread.
pub async fn hash_file(path: &Path) -> Result<Digested> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok(Digested { sha256: hex::encode(hasher.finalize()), size })
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNED: &str = "http://127.0.0.1:9/cq/blobs/x?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20260101&X-Amz-Expires=900&X-Amz-Signature=0123456789abcdef&x-id=PutObject";

    #[test]
    fn signatures_and_credentials_are_redacted() {
        let r = redact(&format!("error sending request for url ({SIGNED})"));
        assert!(!r.contains("0123456789abcdef") && !r.contains("AKID"), "{r}");
        assert!(r.contains("X-Amz-Signature=…&x-id=PutObject") && r.contains("X-Amz-Expires=900"), "{r}");
        assert_eq!(redact("?token=s3cret done"), "?token=… done");
        assert_eq!(redact("no secrets here: ünïcode"), "no secrets here: ünïcode");
    }

    #[test]
    fn s3_error_bodies_give_code_and_message_only() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature \
                   we calculated does not match</Message><SignatureProvided>0123456789abcdef</SignatureProvided>\
                   <StringToSign>AWS4-HMAC-SHA256</StringToSign></Error>";
        assert_eq!(error_message(xml), "SignatureDoesNotMatch: The request signature we calculated does not match");
        let json = r#"{"error": {"code": "badMessage", "message": "see ?X-Amz-Signature=abc"}}"#;
        assert_eq!(error_message(json), "see ?X-Amz-Signature=…");
    }

    /// Accepts one connection on `listener`, reads a plan request (headers and a JSON body) and
    /// answers it with `status` (asking for no wait before a retry) and `body`.
    async fn answer_a_plan_request(listener: &tokio::net::TcpListener, status: &str, body: &str) {
        answer_a_plan_request_after(listener, status, body, 0).await
    }

    /// [`answer_a_plan_request`], asking for a wait of `retry_after` seconds before a retry.
    async fn answer_a_plan_request_after(
        listener: &tokio::net::TcpListener,
        status: &str,
        body: &str,
        retry_after: u32,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"}") {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before sending its plan request");
            got.extend_from_slice(&buf[..n]);
        }
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: {retry_after}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(answer.as_bytes()).await.unwrap();
    }

    /// An upload whose presigned URL cannot be reached fails with a message that names the blob
    /// and keeps the URL's signature out. The broker is a one-request server on 127.0.0.1 that
    /// answers the upload plan the way an S3-backed broker does; the URL's port has no listener.
    #[tokio::test]
    async fn a_failed_upload_does_not_print_the_presigned_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = SIGNED.replace(":9/", &format!(":{closed}/"));
        let plan = serde_json::json!({ "exists": false, "method": "PUT", "url": url,
            "headers": { "x-amz-checksum-sha256": "AAAA" } })
        .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let broker = tokio::spawn(async move { answer_a_plan_request(&listener, "200 OK", &plan).await });
        // Tried once: an unreachable store is otherwise tried again for minutes.
        let client = BlobClient::new(&base, None).unwrap().retrying_for(Duration::ZERO);
        let err = client.upload_bytes(b"some output".to_vec()).await.unwrap_err();
        broker.await.unwrap();
        let message = format!("{err:#}");
        assert!(message.contains("uploading blob"), "{message}");
        assert!(!message.contains("0123456789abcdef") && !message.contains("X-Amz-Credential"), "{message}");
    }

    /// A broker that cannot serve for a moment (a standby taking over answers 503) does not fail
    /// an upload: it is asked again after its Retry-After. The broker is a server on 127.0.0.1
    /// that answers the first plan request 503 and the second "already stored".
    #[tokio::test]
    async fn an_upload_answered_unavailable_is_tried_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let broker = tokio::spawn(async move {
            let standby = r#"{"error": {"code": "unavailable", "message": "this broker is a standby"}}"#;
            answer_a_plan_request(&listener, "503 Service Unavailable", standby).await;
            answer_a_plan_request(&listener, "200 OK", r#"{"exists": true}"#).await;
        });
        let client = BlobClient::new(&base, None).unwrap();
        let stored = client.upload_bytes(b"an output".to_vec()).await.unwrap();
        assert_eq!(stored.size, 9);
        broker.await.unwrap();
        // A broker that cannot be reached is unavailable too (tried once here).
        let refused = BlobClient::new("http://127.0.0.1:1", None).unwrap().retrying_for(Duration::ZERO);
        let err = refused.upload_bytes(b"x".to_vec()).await.unwrap_err();
        assert!(err.chain().any(|c| c.is::<Unavailable>()), "{err:#}");
    }

    /// A transfer waiting to be tried again goes at once to the broker the worker connects to
    /// next (after a takeover), not after the wait the old one asked for. The old broker answers
    /// 503 asking for 100 s; the new one, "already stored".
    #[tokio::test]
    async fn a_retry_waiting_on_one_broker_goes_at_once_to_the_next_one_connected_to() {
        let old = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let new = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let new_base = format!("http://{}", new.local_addr().unwrap());
        let client = BlobClient::new(&format!("http://{}", old.local_addr().unwrap()), None).unwrap();
        let upload = tokio::spawn({
            let client = client.clone();
            async move { client.upload_bytes(b"an output".to_vec()).await }
        });
        let moving = r#"{"error": {"code": "unavailable", "message": "the log is moving"}}"#;
        answer_a_plan_request_after(&old, "503 Service Unavailable", moving, 100).await;
        client.set_base(&new_base);
        answer_a_plan_request(&new, "200 OK", r#"{"exists": true}"#).await;
        let stored = tokio::time::timeout(Duration::from_secs(20), upload).await.expect("tried at once").unwrap();
        assert_eq!(stored.unwrap().size, 9);
    }
}
