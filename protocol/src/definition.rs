//! Job definitions: what a user submits, how it is validated and normalised, and how the job id
//! is derived from the normalised form (see `docs/protocol.md`, "Job id").

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::{JobId, parse_sha256, validate_name};

/// Most inputs a job may declare.
pub const MAX_INPUTS: usize = 1000;
/// Most environment variables a job may set.
pub const MAX_ENV: usize = 1000;
/// Most tags a job may require.
pub const MAX_TAGS: usize = 64;
/// Most arguments in `command` or `entrypoint`.
pub const MAX_ARGS: usize = 4096;
/// Longest `maxDuration` a job may ask for: 30 days.
pub const MAX_DURATION_SECS: u64 = 30 * 24 * 3600;
/// Environment variables the worker sets itself; a job may not set them.
pub const RESERVED_ENV: [&str; 7] = [
    "JOB_ID",
    "JOB_INPUTS",
    "JOB_OUTPUTS",
    "JOB_CACHE",
    "JOB_URL_PREFIX",
    "JOB_INPUTS_URL_PREFIX",
    "JOB_OUTPUTS_URL_PREFIX",
];

/// What to run: an image (or a build recipe), a command, its inputs and its limits.
/// Field names are camelCase on the wire; unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobDefinition {
    /// Docker image reference, e.g. `busybox:1.36` or `ghcr.io/org/tool@sha256:...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Build the image instead of pulling one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildSpec>,
    /// The command: a string split like a POSIX shell would (no expansion), or an argument list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandLine>,
    /// Overrides the image's entrypoint; same forms as `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<CommandLine>,
    /// Absolute working directory inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Files placed under `/inputs`, by relative path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, DataRef>,
    /// Longest the container may run: seconds, or a duration such as `"90s"`, `"20m"`, `"1h"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<DurationSpec>,
    /// CPU, memory, GPU and shared-memory needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// A worker must carry every one of these tags to take the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A command line: `"sh -c 'echo hi'"` or `["sh", "-c", "echo hi"]`. Normalised to the list form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    Args(Vec<String>),
    Shell(String),
}

/// A duration: seconds, or text such as `"1h 30m"`. Normalised to seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DurationSpec {
    Seconds(u64),
    Text(String),
}

/// A size in bytes, or text such as `"512m"`, `"2GiB"`. Normalised to bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

/// Resource needs, enforced by the worker as container limits.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<ByteSize>,
}

/// How to build the job's image: from a git repository, a tarball, or an inline Dockerfile.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BuildSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
    /// URL of a `.tar`, `.tar.gz` or `.tgz` build context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tarball: Option<String>,
    /// Inline Dockerfile text; with a context it replaces the context's Dockerfile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// Dockerfile path inside the context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
    /// e.g. `linux/amd64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

/// A git repository used as a build context.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitSource {
    pub url: String,
    /// Branch, tag or commit; the default branch when absent.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Subdirectory of the repository to use as the build context; the root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

/// Where an input's bytes come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum DataRef {
    /// UTF-8 text, stored as is.
    Text { value: String },
    /// Bytes, base64-encoded (standard alphabet, padded).
    Base64 { value: String },
    /// A JSON value, stored as its canonical serialisation.
    Json { value: serde_json::Value },
    /// Bytes in the blob store, named by their SHA-256.
    Blob { sha256: String, size: u64 },
    /// Bytes at an external http(s) URL; with `sha256` they are verified after download.
    Url {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
    },
}

/// A definition was malformed or invalid. `field` is a dotted path such as `resources.memory`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("`{field}`: ") })]
pub struct DefinitionError {
    pub field: String,
    pub message: String,
    /// True when the input was not even well-formed JSON (as opposed to an invalid definition).
    pub malformed: bool,
}

impl DefinitionError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        DefinitionError { field: field.into(), message: message.into(), malformed: false }
    }
}

/// Parses any JSON document into `T`, reporting the path of the offending field.
pub fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DefinitionError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(de).map_err(path_error)?;
    Ok(value)
}

/// Converts a JSON value into `T`, reporting the path of the offending field.
pub fn from_value<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, DefinitionError> {
    serde_path_to_error::deserialize(value).map_err(path_error)
}

fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> DefinitionError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let malformed = matches!(inner.classify(), serde_json::error::Category::Syntax | serde_json::error::Category::Eof);
    let mut message = inner.to_string();
    if !malformed {
        // Where a value sits in the text differs between a body and a websocket message; the
        // path names it the same way in both.
        let at = format!(" at line {} column {}", inner.line(), inner.column());
        if let Some(m) = message.strip_suffix(&at) {
            message = m.to_string();
        }
    }
    if message.starts_with("data did not match any variant of untagged enum") {
        message = "has the wrong type".into();
    }
    DefinitionError { field: if path == "." { String::new() } else { path }, message, malformed }
}

impl JobDefinition {
    /// Checks every field and returns the normalised definition: commands as argument lists,
    /// durations in seconds, sizes in bytes, tags sorted and deduplicated.
    pub fn normalize(mut self) -> Result<JobDefinition, DefinitionError> {
        match (&self.image, &self.build) {
            (Some(_), Some(_)) => return Err(DefinitionError::new("", "give either `image` or `build`, not both")),
            (None, None) => return Err(DefinitionError::new("", "one of `image` or `build` is required")),
            (Some(image), None) => validate_image(image).map_err(|m| DefinitionError::new("image", m))?,
            (None, Some(build)) => validate_build(build)?,
        }
        self.command = self.command.map(|c| normalize_command("command", c)).transpose()?;
        self.entrypoint = self.entrypoint.map(|c| normalize_command("entrypoint", c)).transpose()?;
        if let Some(dir) = &self.workdir
            && (!dir.starts_with('/') || dir.contains('\0'))
        {
            return Err(DefinitionError::new("workdir", "must be an absolute path"));
        }
        if self.env.len() > MAX_ENV {
            return Err(DefinitionError::new("env", format!("at most {MAX_ENV} variables")));
        }
        for (key, value) in &self.env {
            let field = format!("env.{key}");
            validate_env_key(key).map_err(|m| DefinitionError::new(&field, m))?;
            if RESERVED_ENV.contains(&key.as_str()) {
                return Err(DefinitionError::new(field, "is set by the worker and cannot be overridden"));
            }
            if value.contains('\0') {
                return Err(DefinitionError::new(field, "must not contain NUL"));
            }
        }
        if self.inputs.len() > MAX_INPUTS {
            return Err(DefinitionError::new("inputs", format!("at most {MAX_INPUTS} inputs")));
        }
        for (path, data) in &self.inputs {
            let field = format!("inputs.{path}");
            validate_relative_path(path).map_err(|m| DefinitionError::new(&field, m))?;
            data.identity().map_err(|m| DefinitionError::new(&field, m))?;
        }
        if let Some(d) = self.max_duration.take() {
            let secs = match d {
                DurationSpec::Seconds(s) => s,
                DurationSpec::Text(t) => humantime::parse_duration(t.trim())
                    .map_err(|e| {
                        DefinitionError::new(
                            "maxDuration",
                            format!("`{t}` is not a duration ({e}); try \"90s\", \"20m\" or \"1h\""),
                        )
                    })?
                    .as_secs(),
            };
            if secs == 0 || secs > MAX_DURATION_SECS {
                return Err(DefinitionError::new(
                    "maxDuration",
                    format!("must be between 1 second and {MAX_DURATION_SECS} seconds"),
                ));
            }
            self.max_duration = Some(DurationSpec::Seconds(secs));
        }
        if let Some(r) = &mut self.resources {
            if let Some(cpus) = r.cpus {
                // Below a hundredth of a CPU, Docker sets no quota at all.
                if !(cpus.is_finite() && (MIN_CPUS..=1024.0).contains(&cpus)) {
                    return Err(DefinitionError::new("resources.cpus", "must be a number from 0.01 to 1024"));
                }
            }
            r.memory = r.memory.take().map(|m| normalize_size("resources.memory", m, 4 << 20)).transpose()?;
            r.shm_size = r.shm_size.take().map(|m| normalize_size("resources.shmSize", m, 1)).transpose()?;
            if r.gpus.is_some_and(|g| g > 64) {
                return Err(DefinitionError::new("resources.gpus", "at most 64"));
            }
            if r.gpus == Some(0) {
                r.gpus = None;
            }
            if *r == Resources::default() {
                self.resources = None;
            }
        }
        if self.tags.len() > MAX_TAGS {
            return Err(DefinitionError::new("tags", format!("at most {MAX_TAGS} tags")));
        }
        for tag in &self.tags {
            validate_name("tag", tag, true).map_err(|m| DefinitionError::new("tags", m))?;
        }
        self.tags.sort();
        self.tags.dedup();
        Ok(self)
    }

    /// The job id of this (normalised) definition.
    pub fn job_id(&self) -> JobId {
        JobId::of_canonical(&self.canonical_identity())
    }

    /// The canonical JSON the job id is the hash of: the definition with every input replaced by
    /// its content identity, object keys sorted, no white space.
    pub fn canonical_identity(&self) -> Vec<u8> {
        let mut value = serde_json::to_value(self).expect("definitions serialise");
        if let Some(inputs) = value.get_mut("inputs").and_then(|v| v.as_object_mut()) {
            for (path, data) in &self.inputs {
                // Validation already proved every identity computable.
                inputs.insert(path.clone(), data.identity().unwrap_or_default());
            }
        }
        let mut out = Vec::with_capacity(256);
        write_canonical(&value, &mut out);
        out
    }

    /// GPUs this job needs.
    pub fn gpus(&self) -> u32 {
        self.resources.as_ref().and_then(|r| r.gpus).unwrap_or(0)
    }

    /// `maxDuration` in seconds, once normalised.
    pub fn max_duration_secs(&self) -> Option<u64> {
        match self.max_duration {
            Some(DurationSpec::Seconds(s)) => Some(s),
            _ => None,
        }
    }
}

impl CommandLine {
    /// The argument list, once normalised.
    pub fn args(&self) -> &[String] {
        match self {
            CommandLine::Args(a) => a,
            CommandLine::Shell(_) => &[],
        }
    }
}

impl ByteSize {
    /// The size in bytes, once normalised.
    pub fn bytes(&self) -> Option<u64> {
        match self {
            ByteSize::Bytes(b) => Some(*b),
            ByteSize::Text(_) => None,
        }
    }
}

impl DataRef {
    /// The content identity used for hashing: `{"sha256","size"}` of the bytes for inline data
    /// and blobs, and the URL (or its declared digest) for external data.
    pub fn identity(&self) -> Result<serde_json::Value, String> {
        let digest =
            |bytes: &[u8]| serde_json::json!({"sha256": hex::encode(Sha256::digest(bytes)), "size": bytes.len()});
        Ok(match self {
            DataRef::Text { value } => digest(value.as_bytes()),
            DataRef::Base64 { value } => digest(&decode_base64(value)?),
            DataRef::Json { value } => {
                let mut bytes = Vec::new();
                write_canonical(value, &mut bytes);
                digest(&bytes)
            }
            DataRef::Blob { sha256, size } => {
                parse_sha256(sha256).map_err(|e| e.to_string())?;
                serde_json::json!({"sha256": sha256, "size": size})
            }
            DataRef::Url { url, sha256, size } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 4096 {
                    return Err(format!("`{url}` is not an http(s) URL"));
                }
                if url_has_credentials(url) {
                    return Err(format!("the URL {NO_CREDENTIALS}"));
                }
                match (sha256, size) {
                    (Some(s), Some(n)) => {
                        parse_sha256(s).map_err(|e| e.to_string())?;
                        serde_json::json!({"sha256": s, "size": n})
                    }
                    (Some(s), None) => {
                        parse_sha256(s).map_err(|e| e.to_string())?;
                        serde_json::json!({"sha256": s})
                    }
                    _ => serde_json::json!({"url": url}),
                }
            }
        })
    }

    /// The bytes of an inline ref (`None` for blobs and URLs).
    pub fn inline_bytes(&self) -> Option<Vec<u8>> {
        match self {
            DataRef::Text { value } => Some(value.clone().into_bytes()),
            DataRef::Base64 { value } => decode_base64(value).ok(),
            DataRef::Json { value } => {
                let mut bytes = Vec::new();
                write_canonical(value, &mut bytes);
                Some(bytes)
            }
            DataRef::Blob { .. } | DataRef::Url { .. } => None,
        }
    }
}

fn decode_base64(value: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD.decode(value).map_err(|e| format!("is not valid base64 ({e})"))
}

/// Writes `value` as canonical JSON: object keys sorted by their UTF-8 bytes, no white space,
/// strings and numbers as serde_json writes them.
pub fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("writing to a Vec cannot fail");
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("writing to a Vec cannot fail"),
    }
}

fn normalize_command(field: &str, c: CommandLine) -> Result<CommandLine, DefinitionError> {
    let args = match c {
        CommandLine::Args(a) => a,
        CommandLine::Shell(s) => shell_words::split(&s).map_err(|e| {
            DefinitionError::new(field, format!("cannot split `{s}` into arguments ({e}); check the quotes"))
        })?,
    };
    if args.is_empty() {
        return Err(DefinitionError::new(field, "must not be empty"));
    }
    if args.len() > MAX_ARGS {
        return Err(DefinitionError::new(field, format!("at most {MAX_ARGS} arguments")));
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(DefinitionError::new(field, "arguments must not contain NUL"));
    }
    Ok(CommandLine::Args(args))
}

/// The smallest CPU share a job may ask for.
const MIN_CPUS: f64 = 0.01;
/// The largest memory or shared-memory size a job may ask for: more than any machine has, and
/// far below the 2^63 where Docker's signed sizes overflow.
const MAX_SIZE: u64 = 1 << 50;

fn normalize_size(field: &str, size: ByteSize, min: u64) -> Result<ByteSize, DefinitionError> {
    let bytes = match size {
        ByteSize::Bytes(b) => b,
        ByteSize::Text(t) => parse_size(&t)
            .ok_or_else(|| DefinitionError::new(field, format!("`{t}` is not a size; try 512m, 2g or 1073741824")))?,
    };
    if bytes < min {
        return Err(DefinitionError::new(field, format!("must be at least {min} bytes")));
    }
    if bytes > MAX_SIZE {
        return Err(DefinitionError::new(field, format!("must be at most {MAX_SIZE} bytes (1 PiB)")));
    }
    Ok(ByteSize::Bytes(bytes))
}

/// Parses Docker-style sizes: `1024`, `512k`, `512m`, `2g`, `1t`, with an optional `b`/`ib`/`B`
/// suffix (`512MiB`, `2GB`). All units are binary (k = 1024), as in Docker.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num.parse().ok()?;
    let unit = unit.trim();
    let unit = unit.strip_suffix("ib").or_else(|| unit.strip_suffix('b')).unwrap_or(unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Checks a relative path used for inputs and outputs: no absolute paths, no `.` or `..`
/// segments, no empty segments, no NUL or backslash, at most 1024 bytes.
pub fn validate_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 1024 {
        return Err("a path must be 1 to 1024 bytes long".into());
    }
    if path.starts_with('/') {
        return Err("must be a relative path".into());
    }
    if path.contains('\0') || path.contains('\\') {
        return Err("must not contain NUL or backslash".into());
    }
    if path.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err("must not contain empty, `.` or `..` segments".into());
    }
    Ok(())
}

fn validate_env_key(key: &str) -> Result<(), String> {
    let mut chars = key.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') || key.len() > 256 {
        return Err("names must match [A-Za-z_][A-Za-z0-9_]*".into());
    }
    Ok(())
}

/// Checks a Docker image reference: `[host[:port]/]path[:tag][@sha256:digest]`, path components
/// lowercase letters and digits separated by `.`, `_`, `__` or `-`.
pub fn validate_image(image: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("`{}` is not a valid image reference: {why}", image.escape_debug()));
    if image.is_empty() || image.len() > 512 {
        return bad("it must be 1 to 512 characters long");
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let Some((algo, hex)) = d.split_once(':') else { return bad("the digest must look like sha256:<hex>") };
        if algo.is_empty() || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("the digest must look like sha256:<hex>");
        }
    }
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let ok = !tag.is_empty()
            && tag.len() <= 128
            && tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return bad("the tag may hold letters, digits, `_`, `.` and `-`");
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost") {
        let host = parts.remove(0);
        if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':')) {
            return bad("the registry host is malformed");
        }
    }
    for part in parts {
        let ok = !part.is_empty()
            && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return bad("repository names use lowercase letters, digits and `.`, `_`, `-` between them");
        }
    }
    Ok(())
}

/// True when an http(s) URL carries credentials (`https://user:secret@host/...`). Such URLs are
/// refused: a job record is stored and shown to every watcher.
pub fn url_has_credentials(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else { return false };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.contains('@')
}

const NO_CREDENTIALS: &str =
    "must not carry credentials (they would be stored in the job record); give the worker access instead";

fn validate_build(build: &BuildSpec) -> Result<(), DefinitionError> {
    let url_ok = |u: &str| (u.starts_with("https://") || u.starts_with("http://")) && !u.contains(char::is_whitespace);
    match (&build.git, &build.tarball, &build.dockerfile) {
        (None, None, None) => return Err(DefinitionError::new("build", "needs `git`, `tarball` or `dockerfile`")),
        (Some(_), Some(_), _) => return Err(DefinitionError::new("build", "give `git` or `tarball`, not both")),
        _ => {}
    }
    if let Some(git) = &build.git {
        if !url_ok(&git.url) && !git.url.starts_with("git@") {
            return Err(DefinitionError::new("build.git.url", "must be an http(s) or git@ URL"));
        }
        if url_has_credentials(&git.url) {
            return Err(DefinitionError::new("build.git.url", NO_CREDENTIALS));
        }
        if git.git_ref.as_deref().is_some_and(|r| r.is_empty() || r.contains(char::is_whitespace) || r.contains(':')) {
            return Err(DefinitionError::new("build.git.ref", "must be a branch, tag or commit"));
        }
        if let Some(dir) = &git.dir {
            validate_relative_path(dir).map_err(|m| DefinitionError::new("build.git.dir", m))?;
        }
    }
    if build.tarball.as_deref().is_some_and(|u| !url_ok(u)) {
        return Err(DefinitionError::new("build.tarball", "must be an http(s) URL"));
    }
    if build.tarball.as_deref().is_some_and(url_has_credentials) {
        return Err(DefinitionError::new("build.tarball", NO_CREDENTIALS));
    }
    if let Some(f) = &build.filename {
        validate_relative_path(f).map_err(|m| DefinitionError::new("build.filename", m))?;
    }
    for key in build.build_args.keys() {
        validate_env_key(key).map_err(|m| DefinitionError::new(format!("build.buildArgs.{key}"), m))?;
    }
    if let Some(p) = &build.platform
        && (p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-')))
    {
        return Err(DefinitionError::new("build.platform", "must look like linux/amd64"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<JobDefinition, DefinitionError> {
        parse_json::<JobDefinition>(json.as_bytes())?.normalize()
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let e = parse(r#"{"image":"busybox","resources":{"memroy":"1g"}}"#).unwrap_err();
        assert_eq!(e.field, "resources.memroy");
        assert!(e.message.contains("unknown field `memroy`"), "{e}");
        assert!(!e.malformed);
        let e = parse(r#"{"image":"busybox","colour":1}"#).unwrap_err();
        assert!(e.message.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn malformed_json_is_told_apart() {
        assert!(parse(r#"{"image":"#).unwrap_err().malformed);
        assert!(!parse(r#"{"image":3}"#).unwrap_err().malformed);
    }

    #[test]
    fn string_and_list_commands_normalise_to_the_same_id() {
        let a = parse(r#"{"image":"busybox","command":"sh -c 'echo hi'"}"#).unwrap();
        let b = parse(r#"{"image":"busybox","command":["sh","-c","echo hi"]}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.job_id(), b.job_id());
    }

    #[test]
    fn urls_with_credentials_are_refused() {
        assert!(url_has_credentials("https://user:secret@example.com/repo.git"));
        assert!(url_has_credentials("https://token@example.com/x.tar.gz"));
        assert!(!url_has_credentials("https://example.com/a@b"));
        assert!(!url_has_credentials("git@github.com:org/repo.git"));
        let def: JobDefinition = parse_json(br#"{"build":{"git":{"url":"https://u:p@example.com/r.git"}}}"#).unwrap();
        let e = def.normalize().unwrap_err();
        assert_eq!(e.field, "build.git.url");
        let def: JobDefinition =
            parse_json(br#"{"image":"busybox","inputs":{"a":{"type":"url","url":"https://u:p@h/x"}}}"#).unwrap();
        assert!(def.normalize().unwrap_err().message.contains("credentials"));
    }

    #[test]
    fn inline_and_blob_refs_of_the_same_bytes_share_an_id() {
        let sha = hex::encode(Sha256::digest(b"hello"));
        let a = parse(r#"{"image":"busybox","inputs":{"a.txt":{"type":"text","value":"hello"}}}"#).unwrap();
        let b = parse(r#"{"image":"busybox","inputs":{"a.txt":{"type":"base64","value":"aGVsbG8="}}}"#).unwrap();
        let c = parse(&format!(
            r#"{{"image":"busybox","inputs":{{"a.txt":{{"type":"blob","sha256":"{sha}","size":5}}}}}}"#
        ))
        .unwrap();
        assert_eq!(a.job_id(), b.job_id());
        assert_eq!(a.job_id(), c.job_id());
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            (r#"{}"#, "", "one of `image` or `build`"),
            (r#"{"image":"Busy Box"}"#, "image", "not a valid image"),
            (r#"{"image":"busybox","maxDuration":"soon"}"#, "maxDuration", "not a duration"),
            (r#"{"image":"busybox","maxDuration":0}"#, "maxDuration", "between"),
            (r#"{"image":"busybox","resources":{"memory":"lots"}}"#, "resources.memory", "not a size"),
            (r#"{"image":"busybox","resources":{"cpus":-1}}"#, "resources.cpus", "from 0.01"),
            (r#"{"image":"busybox","resources":{"cpus":1e-300}}"#, "resources.cpus", "from 0.01"),
            (r#"{"image":"busybox","resources":{"memory":9223372036854775808}}"#, "resources.memory", "at most"),
            (r#"{"image":"busybox","resources":{"shmSize":"9000000t"}}"#, "resources.shmSize", "at most"),
            (r#"{"image":"busybox","env":{"JOB_ID":"x"}}"#, "env.JOB_ID", "set by the worker"),
            (r#"{"image":"busybox","env":{"1A":"x"}}"#, "env.1A", "names must match"),
            (
                r#"{"image":"busybox","inputs":{"../etc/passwd":{"type":"text","value":""}}}"#,
                "inputs.../etc/passwd",
                "segments",
            ),
            (r#"{"image":"busybox","inputs":{"/abs":{"type":"text","value":""}}}"#, "inputs./abs", "relative"),
            (r#"{"image":"busybox","inputs":{"a":{"type":"base64","value":"!!"}}}"#, "inputs.a", "base64"),
            (r#"{"image":"busybox","inputs":{"a":{"type":"blob","sha256":"xyz","size":1}}}"#, "inputs.a", "sha256"),
            (r#"{"image":"busybox","command":"echo 'unbalanced"}"#, "command", "quotes"),
            (r#"{"image":"busybox","command":[]}"#, "command", "empty"),
            (r#"{"image":"busybox","workdir":"rel"}"#, "workdir", "absolute"),
            (r#"{"build":{}}"#, "build", "needs"),
            (r#"{"image":"busybox","tags":["has space"]}"#, "tags", "contains"),
        ];
        for (json, field, needle) in cases {
            let e = parse(json).expect_err(json);
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.to_string().contains(needle), "{json}: {e}");
        }
    }

    #[test]
    fn normalisation() {
        let d = parse(r#"{"image":"busybox","maxDuration":"1m 30s","resources":{"memory":"512m","shmSize":"64MiB","gpus":0},"tags":["b","a","b"]}"#).unwrap();
        assert_eq!(d.max_duration_secs(), Some(90));
        let r = d.resources.as_ref().unwrap();
        assert_eq!(r.memory, Some(ByteSize::Bytes(512 << 20)));
        assert_eq!(r.shm_size, Some(ByteSize::Bytes(64 << 20)));
        assert_eq!(r.gpus, None);
        assert_eq!(d.tags, ["a", "b"]);
    }

    #[test]
    fn image_references() {
        for ok in [
            "busybox",
            "busybox:1.36",
            "library/busybox",
            "ghcr.io/org/tool:v1.2",
            "localhost:5000/x",
            "cq-test/busybox:latest",
            "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(validate_image(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Busybox", "a b", "busybox:", "busybox:-x", "-busybox", "busybox@sha256", "a//b"] {
            assert!(validate_image(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("2 GB"), Some(2 << 30));
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_size("99999999999t"), None);
    }
}
