//! Scoped read links: a signed, expiring capability to read one job — its view, its log and its
//! output files — without a token, for URLs handed to a browser, another origin or a person.
//!
//! A link is the query `expires=<unix seconds>&sig=<signature>` appended to a job's read URLs.
//! The signature is HMAC-SHA256 over the job id and the expiry, under a key the broker generates
//! once and keeps in its data directory (so links survive a restart; deleting the file revokes
//! every link), or, in cluster mode, in NATS for every broker of the cluster
//! ([`crate::lease::settings`]).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use protocol::JobId;
use sha2::Sha256;

/// How long a link lives unless its maker asks otherwise.
pub const DEFAULT_LINK_TTL: Duration = Duration::from_secs(3600);
/// The longest life a link may be given.
pub const MAX_LINK_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The file in the data directory holding the signing key.
pub const KEY_FILE: &str = "link-key";
/// Length of the signing key in bytes.
const KEY_LEN: usize = 32;
/// What a signature covers, so a signature made for something else never passes as a link.
const SCOPE: &str = "cq read link v1";

/// The broker's link-signing key.
pub struct LinkKey([u8; KEY_LEN]);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(<secret>)")
    }
}

/// A link's query parameters as they arrived.
#[derive(Debug, Default, Clone)]
pub struct LinkParams {
    pub expires: Option<String>,
    pub sig: Option<String>,
}

impl LinkParams {
    /// `expires` and `sig` from a query string.
    pub fn from_query(query: Option<&str>) -> LinkParams {
        let mut p = LinkParams::default();
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "expires" => p.expires = Some(v.into_owned()),
                "sig" => p.sig = Some(v.into_owned()),
                _ => {}
            }
        }
        p
    }

    /// Whether the request carries a link at all.
    pub fn present(&self) -> bool {
        self.sig.is_some()
    }
}

impl LinkKey {
    /// Reads the key from `dir`, or makes one and writes it there (readable by its owner only).
    pub fn load_or_create(dir: &Path) -> std::io::Result<LinkKey> {
        let path = dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == KEY_LEN => {
                let mut key = [0; KEY_LEN];
                key.copy_from_slice(&bytes);
                return Ok(LinkKey(key));
            }
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a {KEY_LEN}-byte key; delete it to make a new one (every link made so far stops working)",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut key = [0; KEY_LEN];
        getrandom::fill(&mut key).map_err(|e| std::io::Error::other(format!("no randomness for the link key: {e}")))?;
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("{KEY_FILE}.tmp"));
        {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut f = options.open(&tmp)?;
            f.write_all(&key)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok(LinkKey(key))
    }

    /// A key from bytes kept elsewhere (cluster mode keeps it in NATS; tests).
    pub fn from_bytes(key: [u8; KEY_LEN]) -> LinkKey {
        LinkKey(key)
    }

    /// The query of a link to `job` valid until `expires` (unix seconds).
    pub fn sign(&self, job: &JobId, expires: u64) -> String {
        let sig = URL_SAFE_NO_PAD.encode(self.mac(job, expires).finalize().into_bytes());
        format!("expires={expires}&sig={sig}")
    }

    /// Whether `params` are a link to `job` that has not expired at `now` (unix seconds).
    pub fn verify(&self, job: &JobId, params: &LinkParams, now: u64) -> Result<(), &'static str> {
        let (Some(expires), Some(sig)) = (&params.expires, &params.sig) else {
            return Err("a read link needs both `expires` and `sig`");
        };
        let expires: u64 = expires.parse().map_err(|_| "the link's `expires` is not a number")?;
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| "the link's signature is malformed")?;
        self.mac(job, expires).verify_slice(&sig).map_err(|_| "the link's signature does not match this job")?;
        if now >= expires {
            return Err("the link has expired; ask for a new one");
        }
        Ok(())
    }

    fn mac(&self, job: &JobId, expires: u64) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(format!("{SCOPE}\n{job}\n{expires}").as_bytes());
        mac
    }
}

/// The current time in unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_bound_to_a_job_and_expire() {
        let key = LinkKey::from_bytes([7; KEY_LEN]);
        let a: JobId = "a".repeat(64).parse().unwrap();
        let b: JobId = "b".repeat(64).parse().unwrap();
        let query = key.sign(&a, 1000);
        let params = LinkParams::from_query(Some(&query));
        assert_eq!(key.verify(&a, &params, 999), Ok(()));
        assert!(key.verify(&a, &params, 1000).is_err(), "expired");
        assert!(key.verify(&b, &params, 999).is_err(), "another job");
        let longer = LinkParams { expires: Some("2000".into()), ..params.clone() };
        assert!(key.verify(&a, &longer, 999).is_err(), "a changed expiry breaks the signature");
        let other = LinkKey::from_bytes([8; KEY_LEN]);
        assert!(other.verify(&a, &params, 999).is_err(), "another broker's key");
        assert!(key.verify(&a, &LinkParams::default(), 0).is_err());
    }

    #[test]
    fn the_key_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a: JobId = "a".repeat(64).parse().unwrap();
        let first = LinkKey::load_or_create(dir.path()).unwrap().sign(&a, 5);
        let again = LinkKey::load_or_create(dir.path()).unwrap().sign(&a, 5);
        assert_eq!(first, again);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
