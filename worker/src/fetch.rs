//! Fetching a job's URL inputs as the job itself would be allowed to: the worker downloads them
//! on the host, so without care a URL could reach what the job's network cannot — the worker's
//! loopback services, the cloud metadata address, the private network. Every address a URL (and
//! each redirect) resolves to must be public unless its host is listed with
//! `--allow-input-host`; the connection goes to the address that was checked (no second DNS
//! answer), and size and time are bounded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::docker::{JobError, redact};

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 5;
/// Longest a connection to an input's server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a URL input may go without a byte arriving.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one URL input may take in all, unless the worker says otherwise.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Largest URL input, unless the worker says otherwise.
pub const DEFAULT_MAX_INPUT_BYTES: u64 = 10 << 30;

/// How URL inputs may be fetched on this worker.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Hosts (as written in URLs: a name or an address, without the port) that may resolve to
    /// non-public addresses.
    pub allow_hosts: Vec<String>,
    pub max_bytes: u64,
    pub timeout: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy { allow_hosts: Vec::new(), max_bytes: DEFAULT_MAX_INPUT_BYTES, timeout: DEFAULT_FETCH_TIMEOUT }
    }
}

/// What was written: its sha256 (hex) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub sha256: String,
    pub size: u64,
}

/// Downloads `url` into `dest` under `policy`; `what` names the input in messages.
pub async fn fetch(policy: &FetchPolicy, url: &str, dest: &Path, what: &str) -> Result<Fetched, JobError> {
    let overall = tokio::time::timeout(policy.timeout, fetch_inner(policy, url, dest, what)).await;
    overall.unwrap_or_else(|_| {
        Err(JobError::infra(format!("downloading {what} from {} took longer than {:?}", redact(url), policy.timeout)))
    })
}

async fn fetch_inner(policy: &FetchPolicy, url: &str, dest: &Path, what: &str) -> Result<Fetched, JobError> {
    let mut current =
        url::Url::parse(url).map_err(|e| JobError::user(format!("{what}: `{}` is not a URL: {e}", redact(url))))?;
    for _ in 0..=MAX_REDIRECTS {
        let shown = redact(current.as_str());
        let addrs = checked_addresses(policy, &current)
            .await
            .map_err(|why| JobError::user(format!("{what}: refusing to fetch {shown}: {why}")))?;
        let host = current.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        // Connect only to the addresses just checked, so a second DNS answer cannot differ.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .resolve_to_addrs(&host, &addrs)
            .build()
            .map_err(|e| JobError::infra(format!("{what}: {e}")))?;
        let resp = client
            .get(current.clone())
            .send()
            .await
            .map_err(|e| JobError::infra(format!("downloading {what} from {shown}: {e}")))?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| JobError::user(format!("{what}: {shown} answered {status} without a Location")))?;
            current = current
                .join(location)
                .map_err(|e| JobError::user(format!("{what}: {shown} redirects to a bad URL: {e}")))?;
            continue;
        }
        if !status.is_success() {
            let message = format!("downloading {what} from {shown}: {status}");
            return Err(if status.is_client_error() { JobError::user(message) } else { JobError::infra(message) });
        }
        if resp.content_length().is_some_and(|n| n > policy.max_bytes) {
            return Err(too_large(what, policy.max_bytes));
        }
        return write_body(resp, dest, what, policy.max_bytes).await;
    }
    Err(JobError::user(format!("{what}: more than {MAX_REDIRECTS} redirects from {}", redact(url))))
}

fn too_large(what: &str, max: u64) -> JobError {
    JobError::user(format!("{what} is larger than this worker's limit of {max} bytes for a URL input"))
}

async fn write_body(resp: reqwest::Response, dest: &Path, what: &str, max: u64) -> Result<Fetched, JobError> {
    let mut file = tokio::fs::File::create(dest).await.map_err(|e| JobError::infra(format!("writing {what}: {e}")))?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| JobError::infra(format!("downloading {what}: {e}")))?;
        size += chunk.len() as u64;
        if size > max {
            return Err(too_large(what, max));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| JobError::infra(format!("writing {what}: {e}")))?;
    }
    file.flush().await.map_err(|e| JobError::infra(format!("writing {what}: {e}")))?;
    Ok(Fetched { sha256: hex::encode(hasher.finalize()), size })
}

/// The addresses `url` may be fetched from: all of them public, or its host allowed.
async fn checked_addresses(policy: &FetchPolicy, url: &url::Url) -> Result<Vec<SocketAddr>, String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("only http and https URLs are fetched, not {}", url.scheme()));
    }
    let host = url.host_str().ok_or("the URL has no host")?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default().ok_or("the URL has no port")?;
    let allowed = policy.allow_hosts.iter().any(|h| h.eq_ignore_ascii_case(bare));
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            tokio::net::lookup_host((bare, port)).await.map_err(|e| format!("cannot resolve {bare}: {e}"))?.collect()
        }
    };
    if addrs.is_empty() {
        return Err(format!("{bare} resolves to no address"));
    }
    if !allowed && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(format!(
            "{bare} resolves to {}, a {} address the job could not reach; the worker's owner can allow it with --allow-input-host {bare}",
            bad.ip(),
            describe(bad.ip())
        ));
    }
    Ok(addrs)
}

/// Whether `ip` is an ordinary internet address: not loopback, private, link-local (cloud
/// metadata lives at 169.254.169.254), shared, multicast, reserved or otherwise special.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                return is_public_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || s[0..6] == [0; 6]) // IPv4-compatible and other reserved
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (carrier NAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

fn describe(ip: IpAddr) -> &'static str {
    match ip {
        ip if ip.is_loopback() => "loopback",
        IpAddr::V4(v4) if v4.is_link_local() => "link-local",
        IpAddr::V4(v4) if v4.is_private() => "private",
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => "link-local",
        IpAddr::V6(v6) if (v6.segments()[0] & 0xfe00) == 0xfc00 => "private",
        _ => "non-public",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses() {
        for ok in ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111", "::ffff:1.1.1.1"] {
            assert!(is_public(ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.17.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
        ] {
            assert!(!is_public(bad.parse().unwrap()), "{bad}");
        }
    }
}
