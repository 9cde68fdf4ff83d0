//! Identifiers: the content-addressed job id and the worker id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// A job's id: the SHA-256 of the canonical JSON of its normalised definition, shown as 64
/// lowercase hex digits. The same definition always has the same id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub [u8; 32]);

impl JobId {
    /// The id of the given canonical bytes.
    pub fn of_canonical(bytes: &[u8]) -> JobId {
        JobId(Sha256::digest(bytes).into())
    }

    /// The first 12 hex digits, for humans.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.short())
    }
}

/// Fewest hex digits accepted as an abbreviated job id: with fewer, unrelated jobs share
/// prefixes too often for a prefix to name one.
pub const MIN_ID_PREFIX: usize = 6;

/// The leading hex digits of a job id, as people type them (`f06afc`, 6 to 64 digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPrefix(String);

impl IdPrefix {
    /// Whether `id` starts with these digits.
    pub fn matches(&self, id: &JobId) -> bool {
        // Compares nibble by nibble, so scanning every job allocates nothing.
        self.0.bytes().enumerate().all(|(i, digit)| {
            let byte = id.0[i / 2];
            let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0xf };
            b"0123456789abcdef"[nibble as usize] == digit
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for IdPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        if !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{}` is not a job id: ids are hex digits", s.chars().take(80).collect::<String>()));
        }
        if lower.len() < MIN_ID_PREFIX || lower.len() > 64 {
            return Err(format!("`{s}` is not a job id: give at least {MIN_ID_PREFIX} of its 64 hex digits"));
        }
        Ok(IdPrefix(lower))
    }
}

impl fmt::Display for IdPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string that is not 64 lowercase hex digits was given as a job id or content hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a sha256 hex digest (64 lowercase hex digits)")]
pub struct BadDigest(pub String);

/// Parses 64 lowercase hex digits.
pub fn parse_sha256(s: &str) -> Result<[u8; 32], BadDigest> {
    let bad = || BadDigest(s.chars().take(80).collect());
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
    Ok(out)
}

impl FromStr for JobId {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_sha256(s).map(JobId)
    }
}

impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A worker's self-chosen, stable id. A worker keeps it across restarts so that the broker can
/// hand it back the jobs it still holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub String);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a name used for queues, worker ids, namespaces and tags: 1 to 128 characters from
/// `A-Z a-z 0-9 . _ - : = /`... minus `/` for queues, which appear in URL paths.
pub fn validate_name(kind: &str, s: &str, allow_slash: bool) -> Result<(), String> {
    if s.is_empty() || s.len() > 128 {
        return Err(format!("{kind} must be 1 to 128 characters long"));
    }
    let ok =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '=') || (allow_slash && c == '/');
    match s.chars().find(|c| !ok(*c)) {
        Some(c) => Err(format!(
            "{kind} `{}` contains {c:?}; allowed are letters, digits and . _ - : ={}",
            s.escape_debug(),
            if allow_slash { " /" } else { "" }
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_round_trips_through_hex() {
        let id = JobId::of_canonical(b"{}");
        let text = id.to_string();
        assert_eq!(text, "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a");
        assert_eq!(text.parse::<JobId>().unwrap(), id);
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{text}\""));
    }

    #[test]
    fn bad_digests_are_rejected() {
        for bad in ["", "abc", &"A".repeat(64), &"g".repeat(64), &"a".repeat(65)] {
            assert!(bad.parse::<JobId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("queue", "my-queue_1.x", false).is_ok());
        assert!(validate_name("queue", "a/b", false).is_err());
        assert!(validate_name("tag", "gpu/a100", true).is_ok());
        assert!(validate_name("queue", "", false).is_err());
        assert!(validate_name("queue", "sp ace", false).is_err());
    }
}
