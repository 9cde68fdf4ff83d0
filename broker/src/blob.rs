//! The blob store: job inputs and outputs named by the SHA-256 of their bytes, kept in a local
//! directory (the default) or an S3-compatible bucket, behind one interface (`object_store`).
//!
//! Invariant: a blob counts as present only when its content is known to hash to its name.
//! Uploads through the broker are hashed while they stream and only committed (multipart
//! complete, or the single put) once the hash and size match. Uploads that go straight to S3
//! with a presigned URL carry a signed `x-amz-checksum-sha256`, so S3 itself refuses a
//! mismatch, and are only handed out for names the store does not hold. Whatever the broker
//! did not write or check itself (or that changed since: another size, ETag or modification
//! time) is read and hashed before it counts as present, and deleted if it does not match.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::{Stream, StreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::{
    ClientOptions, GetOptions, GetRange, GetResult, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use protocol::messages::{ErrorBody, ErrorCode};
use sha2::{Digest, Sha256};

/// Largest blob accepted by default: 10 GiB.
pub const DEFAULT_MAX_BLOB: u64 = 10 << 30;
/// Inline inputs larger than this are moved to the blob store when a job is submitted, so job
/// records (and the log) stay small.
pub const INLINE_MAX: usize = 16 << 10;
/// How long a presigned URL stays valid.
pub const PRESIGN_TTL: Duration = Duration::from_secs(15 * 60);
/// Default grace period: a blob younger than this, or used this recently, is never collected.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(24 * 3600);
/// How long a request to S3 is retried (refused connections, timeouts, `5xx`, `429`) before
/// the store reports itself unavailable.
pub const S3_RETRY_WINDOW: Duration = Duration::from_secs(30);
/// The first pause between two attempts; later ones grow (with jitter) up to [`S3_MAX_BACKOFF`].
const S3_FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between two attempts, so the last retry falls near the window's end.
const S3_MAX_BACKOFF: Duration = Duration::from_secs(4);
/// How long one connection attempt to S3 may take.
const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Uploads up to this size are written with one request; larger ones in parts of this size.
const PART_SIZE: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PART_CONCURRENCY: usize = 4;
/// Where blobs live inside the store.
const KEY_PREFIX: &str = "sha256";

/// Where the blobs are kept.
#[derive(Debug, Clone, Default)]
pub enum BlobBackend {
    /// `blobs/` inside the broker's data directory.
    #[default]
    DataDir,
    /// A local directory.
    Local(PathBuf),
    /// An S3-compatible bucket.
    S3(S3Config),
}

/// An S3-compatible bucket. Credentials not given here come from the usual `AWS_*` variables.
#[derive(Clone, Default)]
pub struct S3Config {
    pub bucket: String,
    /// e.g. `http://127.0.0.1:9000` for MinIO; AWS when absent.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Key prefix inside the bucket, e.g. `cq/`.
    pub prefix: String,
    /// Bucket as a host name (`bucket.endpoint`) instead of a path (`endpoint/bucket`).
    pub virtual_hosted: bool,
    /// Most retries of a failed request (with exponential backoff) before the store reports
    /// itself unavailable; `None` retries for [`S3_RETRY_WINDOW`], however many attempts that
    /// takes.
    pub retries: Option<usize>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<set>"))
            .field("prefix", &self.prefix)
            .field("virtual_hosted", &self.virtual_hosted)
            .field("retries", &self.retries)
            .finish()
    }
}

/// Blob store settings.
#[derive(Debug, Clone)]
pub struct BlobConfig {
    pub backend: BlobBackend,
    /// Largest blob, in bytes.
    pub max_blob: u64,
    /// See [`DEFAULT_GC_GRACE`].
    pub gc_grace: Duration,
    /// How often unreferenced blobs are collected; `None` turns collection off.
    pub gc_interval: Option<Duration>,
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            backend: BlobBackend::DataDir,
            max_blob: DEFAULT_MAX_BLOB,
            gc_grace: DEFAULT_GC_GRACE,
            gc_interval: Some(Duration::from_secs(3600)),
        }
    }
}

/// Why a blob operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("`{0}` is not a blob name: use the 64 lowercase hex digits of the content's SHA-256")]
    BadName(String),
    #[error("blob {0} is not in the store; upload it first (PUT /f/{0})")]
    NotFound(String),
    #[error(
        "the content does not match its name: expected sha256 {expected} ({expected_size} bytes), got {actual} ({size} bytes); nothing was stored"
    )]
    Mismatch { expected: String, expected_size: String, actual: String, size: u64 },
    #[error("blob {sha} has {size} bytes, not {claimed}")]
    WrongSize { sha: String, size: u64, claimed: u64 },
    #[error("the blob is larger than this broker's limit of {max} bytes")]
    TooLarge { max: u64 },
    #[error("the upload ended after {got} of {expected} bytes; nothing was stored")]
    Truncated { got: u64, expected: u64 },
    #[error("reading the upload failed: {0}; nothing was stored")]
    Body(String),
    #[error("the blob store is unavailable: {0}")]
    Unavailable(String),
}

impl BlobError {
    /// The error as an API error body.
    pub fn body(&self) -> ErrorBody {
        let code = match self {
            BlobError::BadName(_) | BlobError::Truncated { .. } | BlobError::Body(_) => ErrorCode::BadMessage,
            BlobError::NotFound(_) => ErrorCode::NotFound,
            BlobError::Mismatch { .. } => ErrorCode::HashMismatch,
            BlobError::WrongSize { .. } => ErrorCode::InvalidDefinition,
            BlobError::TooLarge { .. } => ErrorCode::TooLarge,
            BlobError::Unavailable(_) => ErrorCode::Unavailable,
        };
        ErrorBody::new(code, self.to_string())
    }

    fn from_store(sha: &str, e: object_store::Error) -> BlobError {
        match e {
            object_store::Error::NotFound { .. } => BlobError::NotFound(sha.to_string()),
            other => BlobError::Unavailable(other.to_string()),
        }
    }
}

/// Checks a blob name: 64 lowercase hex digits, as in job definitions.
pub fn parse_name(name: &str) -> Result<String, BlobError> {
    if protocol::id::parse_sha256(name).is_ok() {
        Ok(name.to_string())
    } else {
        Err(BlobError::BadName(name.chars().take(80).collect()))
    }
}

/// What a collection pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    pub kept: u64,
    pub deleted: u64,
    pub freed_bytes: u64,
}

/// What identifies one version of a stored object, as far as the store tells: a blob whose
/// stamp is unchanged since it was hashed still holds the bytes that were hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    size: u64,
    e_tag: Option<String>,
    version: Option<String>,
    modified: SystemTime,
}

impl Stamp {
    fn of(meta: &object_store::ObjectMeta) -> Stamp {
        Stamp {
            size: meta.size,
            e_tag: meta.e_tag.clone(),
            version: meta.version.clone(),
            modified: meta.last_modified.into(),
        }
    }
}

/// What the store holds under a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Nothing.
    Absent,
    /// Bytes that hash to the name; their size.
    Verified(u64),
    /// Bytes that do not hash to the name (they have been deleted).
    Corrupt { actual: String, size: u64 },
}

/// The blob store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// Set for S3: signs URLs so bytes go straight between the bucket and its users.
    signer: Option<Arc<AmazonS3>>,
    prefix: String,
    max_blob: u64,
    grace: Duration,
    /// Blobs known to match their names (written or checked by this process), with the stamp the
    /// stored object had then; an object whose stamp changed is checked again.
    verified: DashMap<String, Stamp>,
    /// When each blob was last referenced by a submission; the collector spares recent ones.
    touched: DashMap<String, Instant>,
    /// Submissions hold it shared while they check their blobs; the collector's deletions hold it
    /// exclusively, so a blob found present is not deleted before the job that needs it is
    /// recorded (its `touched` time then protects it).
    gc_lock: tokio::sync::RwLock<()>,
}

impl BlobStore {
    /// Opens the store (creating the local directory if needed). `data_dir` is where
    /// [`BlobBackend::DataDir`] puts its blobs.
    pub fn open(config: &BlobConfig, data_dir: &std::path::Path) -> Result<BlobStore, BlobError> {
        let local = |dir: PathBuf| -> Result<Arc<dyn ObjectStore>, BlobError> {
            std::fs::create_dir_all(&dir)
                .map_err(|e| BlobError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
            let fs = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| BlobError::Unavailable(format!("cannot open {}: {e}", dir.display())))?;
            Ok(Arc::new(fs))
        };
        let (store, signer, prefix) = match &config.backend {
            BlobBackend::DataDir => (local(data_dir.join("blobs"))?, None, String::new()),
            BlobBackend::Local(dir) => (local(dir.clone())?, None, String::new()),
            BlobBackend::S3(s3) => {
                let s3store = Arc::new(build_s3(s3)?);
                let prefix = s3.prefix.trim_matches('/').to_string();
                (s3store.clone() as Arc<dyn ObjectStore>, Some(s3store), prefix)
            }
        };
        Ok(BlobStore {
            store,
            signer,
            prefix,
            max_blob: config.max_blob,
            grace: config.gc_grace,
            verified: DashMap::new(),
            touched: DashMap::new(),
            gc_lock: tokio::sync::RwLock::new(()),
        })
    }

    /// True when file bytes go to and from S3 directly, by presigned URL.
    pub fn presigns(&self) -> bool {
        self.signer.is_some()
    }

    /// Largest blob accepted, in bytes.
    pub fn max_blob(&self) -> u64 {
        self.max_blob
    }

    fn key(&self, sha: &str) -> StorePath {
        let key = format!("{KEY_PREFIX}/{}/{sha}", &sha[..2]);
        if self.prefix.is_empty() { StorePath::from(key) } else { StorePath::from(format!("{}/{key}", self.prefix)) }
    }

    fn listing_prefix(&self) -> StorePath {
        if self.prefix.is_empty() {
            StorePath::from(KEY_PREFIX)
        } else {
            StorePath::from(format!("{}/{KEY_PREFIX}", self.prefix))
        }
    }

    /// The size of a stored blob, or `None` when it is absent. Says nothing about its content:
    /// see [`BlobStore::held`].
    pub async fn size(&self, sha: &str) -> Result<Option<u64>, BlobError> {
        Ok(self.head(sha).await?.map(|meta| meta.size))
    }

    /// The metadata of a stored blob, or `None` when it is absent.
    async fn head(&self, sha: &str) -> Result<Option<object_store::ObjectMeta>, BlobError> {
        match self.store.head(&self.key(sha)).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(BlobError::Unavailable(e.to_string())),
        }
    }

    /// What the store holds under `sha`. A blob this process did not write or check, or whose
    /// stamp changed since, is read and hashed first; one that does not match its name is
    /// deleted and reported as [`Held::Corrupt`].
    pub async fn held(&self, sha: &str) -> Result<Held, BlobError> {
        let Some(meta) = self.head(sha).await? else { return Ok(Held::Absent) };
        let stamp = Stamp::of(&meta);
        if self.verified.get(sha).is_some_and(|known| *known == stamp) {
            return Ok(Held::Verified(stamp.size));
        }
        let result = match self.get(sha, None).await {
            Ok(result) => result,
            Err(BlobError::NotFound(_)) => return Ok(Held::Absent),
            Err(e) => return Err(e),
        };
        // The stamp of the version actually read, which may be newer than the one seen above.
        let stamp = Stamp::of(&result.meta);
        let mut stream = result.into_stream();
        let mut hasher = Sha256::new();
        while let Some(chunk) = stream.next().await {
            hasher.update(chunk.map_err(|e| BlobError::from_store(sha, e))?);
        }
        let actual = hex::encode(hasher.finalize());
        if actual == sha {
            let size = stamp.size;
            self.verified.insert(sha.to_string(), stamp);
            return Ok(Held::Verified(size));
        }
        tracing::warn!(blob = sha, actual, "a stored blob does not match its name; deleting it");
        self.verified.remove(sha);
        if let Err(e) = self.store.delete(&self.key(sha)).await {
            tracing::warn!(blob = sha, error = %e, "cannot delete a corrupt blob");
        }
        Ok(Held::Corrupt { actual, size: stamp.size })
    }

    /// Records the stamp of a blob this process just wrote from bytes it hashed, if the store
    /// still shows the version it wrote (same ETag); otherwise the next [`BlobStore::held`]
    /// checks the content.
    async fn wrote(&self, sha: &str, written: &object_store::PutResult) {
        if let Ok(Some(meta)) = self.head(sha).await
            && written.e_tag.is_some()
            && meta.e_tag == written.e_tag
        {
            self.verified.insert(sha.to_string(), Stamp::of(&meta));
        }
    }

    /// Stores a stream of bytes as blob `sha`, checking the hash (and `size`, when known) before
    /// anything becomes visible. Returns the size.
    pub async fn put_stream<S, E>(&self, sha: &str, size: Option<u64>, body: S) -> Result<u64, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        if let Some(size) = size
            && size > self.max_blob
        {
            return Err(BlobError::TooLarge { max: self.max_blob });
        }
        let mut body = std::pin::pin!(body);
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mut first: Vec<Bytes> = Vec::new();
        let mut buffered = 0usize;
        let mut upload: Option<WriteMultipart> = None;
        let result: Result<(), BlobError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
                total += chunk.len() as u64;
                if total > self.max_blob {
                    return Err(BlobError::TooLarge { max: self.max_blob });
                }
                if size.is_some_and(|s| total > s) {
                    return Err(BlobError::Body(format!("more bytes than the {} announced", size.unwrap_or(0))));
                }
                hasher.update(&chunk);
                match &mut upload {
                    Some(up) => {
                        up.wait_for_capacity(PART_CONCURRENCY)
                            .await
                            .map_err(|e| BlobError::Unavailable(e.to_string()))?;
                        up.put(chunk);
                    }
                    None => {
                        buffered += chunk.len();
                        first.push(chunk);
                        if buffered > PART_SIZE {
                            let multipart = self
                                .store
                                .put_multipart(&self.key(sha))
                                .await
                                .map_err(|e| BlobError::Unavailable(e.to_string()))?;
                            let mut up = WriteMultipart::new_with_chunk_size(multipart, PART_SIZE);
                            for c in first.drain(..) {
                                up.put(c);
                            }
                            upload = Some(up);
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        let verdict = result.and_then(|()| {
            if let Some(expected) = size
                && total < expected
            {
                return Err(BlobError::Truncated { got: total, expected });
            }
            let actual = hex::encode(hasher.finalize());
            if actual != sha {
                return Err(BlobError::Mismatch {
                    expected: sha.to_string(),
                    expected_size: size.map_or("any".into(), |s| s.to_string()),
                    actual,
                    size: total,
                });
            }
            Ok(())
        });
        match (verdict, upload) {
            (Err(e), Some(up)) => {
                if let Err(abort) = up.abort().await {
                    tracing::warn!(blob = sha, error = %abort, "cannot abort a failed upload");
                }
                Err(e)
            }
            (Err(e), None) => Err(e),
            (Ok(()), Some(up)) => {
                let written = up.finish().await.map_err(|e| BlobError::Unavailable(e.to_string()))?;
                self.wrote(sha, &written).await;
                Ok(total)
            }
            (Ok(()), None) => {
                let payload: PutPayload = first.into_iter().collect();
                let written =
                    self.store.put(&self.key(sha), payload).await.map_err(|e| BlobError::Unavailable(e.to_string()))?;
                self.wrote(sha, &written).await;
                Ok(total)
            }
        }
    }

    /// Stores `bytes` and returns their name.
    pub async fn put_bytes(&self, bytes: Bytes) -> Result<String, BlobError> {
        let sha = hex::encode(Sha256::digest(&bytes));
        if self.held(&sha).await? == Held::Verified(bytes.len() as u64) {
            self.touch(&sha);
            return Ok(sha);
        }
        let size = bytes.len() as u64;
        self.put_stream(&sha, Some(size), futures_util::stream::iter([Ok::<_, std::convert::Infallible>(bytes)]))
            .await?;
        self.touch(&sha);
        Ok(sha)
    }

    /// Reads a blob, or part of it.
    pub async fn get(&self, sha: &str, range: Option<GetRange>) -> Result<GetResult, BlobError> {
        let options = GetOptions { range, ..GetOptions::default() };
        self.store.get_opts(&self.key(sha), options).await.map_err(|e| BlobError::from_store(sha, e))
    }

    /// Reads a whole blob into memory (for small ones).
    pub async fn read(&self, sha: &str) -> Result<Bytes, BlobError> {
        self.get(sha, None).await?.bytes().await.map_err(|e| BlobError::from_store(sha, e))
    }

    /// A presigned `PUT` URL for blob `sha` and the headers the uploader must send with it, or
    /// `None` when the store cannot presign (a local directory). The URL binds the content's
    /// SHA-256: the signed `x-amz-checksum-sha256` header must be sent as given, and S3 refuses
    /// bytes that do not match it. Callers hand one out only for a name the store does not hold.
    pub async fn presign_put(&self, sha: &str) -> Result<Option<(url::Url, Vec<(String, String)>)>, BlobError> {
        let Some(signer) = &self.signer else { return Ok(None) };
        let digest = hex::decode(sha).map_err(|_| BlobError::BadName(sha.to_string()))?;
        use base64::Engine as _;
        let value = base64::engine::general_purpose::STANDARD.encode(digest);
        let options = SignedUrlOptions::default().with_signed_header(
            http::HeaderName::from_static("x-amz-checksum-sha256"),
            http::HeaderValue::from_str(&value).map_err(|e| BlobError::Unavailable(e.to_string()))?,
        );
        let url = signer
            .signed_url_opts(http::Method::PUT, &self.key(sha), PRESIGN_TTL, &options)
            .await
            .map_err(|e| BlobError::Unavailable(e.to_string()))?;
        Ok(Some((url, vec![("x-amz-checksum-sha256".to_string(), value)])))
    }

    /// A presigned `GET` URL for blob `sha`, or `None` when the store cannot presign. `response`
    /// holds S3's response overrides (`response-content-type`, `response-content-disposition`,
    /// `response-cache-control`), signed with the URL so S3 answers with those headers.
    pub async fn presign_get(&self, sha: &str, response: &[(&str, String)]) -> Result<Option<url::Url>, BlobError> {
        let Some(signer) = &self.signer else { return Ok(None) };
        let options = SignedUrlOptions::default().with_query(response.iter().map(|(k, v)| (*k, v.as_str())));
        let url = signer
            .signed_url_opts(http::Method::GET, &self.key(sha), PRESIGN_TTL, &options)
            .await
            .map_err(|e| BlobError::Unavailable(e.to_string()))?;
        Ok(Some(url))
    }

    /// Records that a submission just referenced `sha`.
    pub fn touch(&self, sha: &str) {
        self.touched.insert(sha.to_string(), Instant::now());
    }

    /// Makes sure a job may reference blob `sha` of `size` bytes: it is present, matches its
    /// name (see [`BlobStore::held`]), and has that size.
    pub async fn ensure(&self, sha: &str, size: u64) -> Result<(), BlobError> {
        let _shared = self.gc_lock.read().await;
        self.touch(sha);
        match self.held(sha).await? {
            Held::Absent => Err(BlobError::NotFound(sha.to_string())),
            Held::Corrupt { actual, size: stored } => Err(BlobError::Mismatch {
                expected: sha.to_string(),
                expected_size: size.to_string(),
                actual,
                size: stored,
            }),
            Held::Verified(stored) if stored != size => {
                Err(BlobError::WrongSize { sha: sha.to_string(), size: stored, claimed: size })
            }
            Held::Verified(_) => Ok(()),
        }
    }

    /// Deletes every blob older than the grace period that is not in `referenced` and was not
    /// referenced by a submission within the grace period.
    pub async fn collect(&self, referenced: &HashSet<String>) -> Result<GcStats, BlobError> {
        let now = SystemTime::now();
        let mut candidates = Vec::new();
        let mut stats = GcStats::default();
        let mut listing = self.store.list(Some(&self.listing_prefix()));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| BlobError::Unavailable(e.to_string()))?;
            let Some(name) = meta.location.filename().map(str::to_string) else { continue };
            if parse_name(&name).is_err() {
                continue;
            }
            let age = now.duration_since(meta.last_modified.into()).unwrap_or_default();
            if referenced.contains(&name) || age < self.grace {
                stats.kept += 1;
            } else {
                candidates.push((name, meta.location, meta.size));
            }
        }
        let _exclusive = self.gc_lock.write().await;
        self.touched.retain(|_, at| at.elapsed() < self.grace);
        for (name, location, size) in candidates {
            if self.touched.contains_key(&name) {
                stats.kept += 1;
                continue;
            }
            match self.store.delete(&location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                    self.verified.remove(&name);
                    stats.deleted += 1;
                    stats.freed_bytes += size;
                }
                Err(e) => return Err(BlobError::Unavailable(e.to_string())),
            }
        }
        Ok(stats)
    }
}

fn build_s3(config: &S3Config) -> Result<AmazonS3, BlobError> {
    if config.bucket.is_empty() {
        return Err(BlobError::Unavailable("an S3 blob store needs a bucket name".into()));
    }
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&config.bucket)
        .with_virtual_hosted_style_request(config.virtual_hosted)
        .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
        .with_retry(retry_config(config))
        .with_client_options(ClientOptions::new().with_connect_timeout(S3_CONNECT_TIMEOUT));
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
    }
    builder = builder.with_region(config.region.clone().unwrap_or_else(|| "us-east-1".into()));
    if let Some(key) = &config.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &config.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    builder.build().map_err(|e| BlobError::Unavailable(format!("S3 configuration: {e}")))
}

/// How requests to S3 are retried: for [`S3_RETRY_WINDOW`] unless a number of retries is set.
/// object_store stops at whichever of its two bounds comes first, so without a number the bound
/// on attempts is set out of reach and the window decides.
fn retry_config(config: &S3Config) -> RetryConfig {
    RetryConfig {
        backoff: object_store::BackoffConfig { init_backoff: S3_FIRST_BACKOFF, max_backoff: S3_MAX_BACKOFF, base: 2.0 },
        max_retries: config.retries.unwrap_or(usize::MAX),
        retry_timeout: S3_RETRY_WINDOW,
    }
}

/// The blob names a job definition (normalised JSON) references among its inputs.
pub fn input_blobs(definition: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Inputs {
        #[serde(default)]
        inputs: std::collections::BTreeMap<String, serde_json::Value>,
    }
    let Ok(parsed) = serde_json::from_str::<Inputs>(definition) else { return Vec::new() };
    parsed
        .inputs
        .values()
        .filter(|v| v["type"] == "blob")
        .filter_map(|v| v["sha256"].as_str().map(str::to_string))
        .collect()
}
