//! The lease of a shard's log in a NATS KV bucket: [`acquire`] waits (as a standby) until this
//! broker holds it, then a task renews it as [`crate::ownership::Ownership`] says, and reports
//! its loss; [`Lease::release`] hands it over on a graceful stop.
//!
//! - **Bucket** `<cluster>_owners`, one key per shard (`shard.<s>`), history 1, replicated like
//!   the log. The bucket's `max_age` is the lease's time to live: every write (a take or a
//!   renewal) lives that long on the servers' clock, so the key of a dead owner vanishes on its
//!   own and a standby's `create` then succeeds.
//! - **Value**: `{"node", "advertiseUrl", "nonce"}`. The nonce is this process's, so a renewal
//!   whose answer was lost is recognised when the key is read back.
//! - **Epoch**: the revision of the write that took the lease; it names the owner in the log's
//!   owner marker (`<node>/<epoch>`).
//! - **Release** deletes the key at the held revision; standbys watch the key and try at once.
//! - **A dead owner** is replaced before its key runs out: a standby that sees the key unrenewed
//!   for two renewal intervals (at least 3 s), and the owner's advertised address refusing
//!   connections (nothing listens there: the process is gone; a frozen one still accepts),
//!   writes its own value at the revision it saw ([`take_from_dead`]). A renewal landing
//!   meanwhile wins. Refused alone is not enough (a wrong `--advertise-url`), nor unrenewed
//!   alone (NATS electing a leader).
//!
//! [`settings`] keeps what every broker of a cluster must agree on (the read-link signing key,
//! the number of shards) in the bucket `<cluster>_config`. [`announce`] keeps a key per live
//! broker (`node.<name>`) in the lease bucket, so brokers running several shards take a fair
//! share each ([`crate::shards::Placement`]).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::jetstream::{NatsConfig, connect};
use crate::log::LogError;
use crate::ownership::{Created, LeaseTimes, Ownership, Renewed, Step};

/// How long a broker of several shards waits after it first announced itself before it takes
/// any, so that brokers started together see each other and share.
const SETTLE_FOR: Duration = Duration::from_secs(1);
/// Longest wait for one answer of the lease store before it counts as unknown.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// Shortest time an owner's key must go unrenewed (and at least two renewal intervals) before a
/// standby may take the owner for dead; a renewal that a loaded machine delays is not a death.
const DEAD_AFTER: Duration = Duration::from_secs(3);

/// What the key of a held lease says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_url: Option<String>,
    #[serde(default)]
    pub nonce: String,
}

/// A held lease, renewed by a task of its own until it is released or lost.
#[derive(Debug)]
pub struct Lease {
    epoch: u64,
    node: String,
    lost: watch::Receiver<bool>,
    release: Option<oneshot::Sender<oneshot::Sender<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// The revision that took the lease.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How the owner signs its marker in the log.
    pub fn owner_name(&self) -> String {
        format!("{}/{}", self.node, self.epoch)
    }

    /// True once the lease is known lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves once the lease is lost (not renewed in time, or taken): the broker must stop
    /// acting as the owner.
    pub async fn lost(&mut self) {
        while !*self.lost.borrow_and_update() {
            if self.lost.changed().await.is_err() {
                // The renewing task ended without a loss: it was released.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Gives the lease up, deleting the key if it is still held, so a standby takes over at once.
    pub async fn release(mut self) {
        if let Some(release) = self.release.take() {
            let (done_tx, done) = oneshot::channel();
            if release.send(done_tx).is_ok() {
                let _ = tokio::time::timeout(ANSWER_WITHIN * 2, done).await;
            }
        }
        self.task.abort();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn kv_err(context: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> LogError {
    let context = context.into();
    move |e| LogError::Nats { context, message: e.to_string() }
}

/// The bucket of leases of `config`'s cluster, created if missing.
async fn bucket(js: &jetstream::Context, config: &NatsConfig, times: &LeaseTimes) -> Result<kv::Store, LogError> {
    let name = format!("{}_owners", config.cluster);
    let bucket = kv::Config {
        bucket: name.clone(),
        description: format!("owners of the shards of cq cluster {}", config.cluster),
        history: 1,
        max_age: times.ttl,
        storage: jetstream::stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    };
    open_bucket(js, bucket, format!("creating the lease bucket {name}")).await
}

/// Opens the key-value bucket `bucket` names, creating it if missing. JetStream answering late
/// or "temporarily unavailable" (a cluster just formed, its servers electing a leader or
/// catching up, a busy machine) is waited out for up to 30 s, like a commit; a refusal (a single
/// server asked for replicas, say) is not.
async fn open_bucket(js: &jetstream::Context, bucket: kv::Config, what: String) -> Result<kv::Store, LogError> {
    let give_up = Instant::now() + crate::jetstream::COMMIT_RETRY_FOR;
    loop {
        if let Ok(store) = js.get_key_value(&bucket.bucket).await {
            return Ok(store);
        }
        match js.create_key_value(bucket.clone()).await {
            Ok(store) => return Ok(store),
            Err(e)
                if Instant::now() < give_up
                    && (e.kind() == jetstream::context::CreateKeyValueErrorKind::TimedOut
                        || ["timed out", "temporarily unavailable", "no suitable peers"]
                            .iter()
                            .any(|m| e.to_string().contains(m))) =>
            {
                tracing::debug!(error = %e, "{what}: JetStream did not answer in time; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(crate::jetstream::create_err(what)(&e)),
        }
    }
}

/// Who owns the log, as a standby knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standby {
    /// Another broker holds the lease, or will: not known yet which.
    Unknown,
    /// What the owner's key says.
    Owner(Holder),
}

impl std::fmt::Display for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Standby::Unknown => f.write_str("another broker"),
            Standby::Owner(Holder { node, advertise_url: Some(url), .. }) => write!(f, "{node} ({url})"),
            Standby::Owner(Holder { node, .. }) => f.write_str(node),
        }
    }
}

/// Where a standby says who owns the log: `Some` while it waits, `None` once this broker holds
/// the lease. A watch, so that a request relayed to an owner that has since lost the log (frozen,
/// say, so it never answers) is given up as soon as the standby learns of it.
pub type StandbyNote = tokio::sync::watch::Sender<Option<Standby>>;

/// Waits until this broker holds the lease of `config`'s shard, saying who holds it meanwhile
/// (in the log once per owner, and in `standby`).
pub async fn acquire(
    config: &NatsConfig,
    times: LeaseTimes,
    holder: Holder,
    standby: &StandbyNote,
) -> Result<Lease, LogError> {
    times.validate().map_err(|m| LogError::Nats { context: "lease settings".into(), message: m })?;
    let client = connect(config).await?;
    let js = jetstream::new(client);
    let store = bucket(&js, config, &times).await?;
    let key = format!("shard.{}", config.shard);
    let mut holder = holder;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| kv_err("choosing a lease nonce")(&e))?;
    holder.nonce = hex::encode(nonce);
    let value = Bytes::from(serde_json::to_vec(&holder).expect("a holder serialises"));
    // The watch only hastens a take when the owner releases; without one (NATS electing a
    // leader, say) the standby tries on its timer and watches again at its next wait.
    let mut look = Lookout { watch: watch_key(&store, &key).await, told: None };
    let mut ownership = Ownership::new(times, Instant::now());
    let mut failing = false;
    let mut seen: Option<Seen> = None;
    // Whether this broker's placement counts the shard held (from the wait before a create).
    let mut counted = false;
    set_note(standby, Some(Standby::Unknown));
    let epoch = loop {
        if let Some(epoch) = ownership.owner_epoch(Instant::now()) {
            break epoch;
        }
        // A broker running several shards lets the brokers before it in this shard's order try
        // first, and over its fair share gives them a head start more, then takes the shard
        // anyway if nobody did. Waited before the create is sent, so the lease counts from it.
        if let Some(placement) = &config.placement
            && !counted
            && ownership.create_due(Instant::now())
        {
            // Meanwhile the key is watched, so that a new owner is known (and relayed to) at once.
            placement.settled().await;
            let turn = placement.left_until(config.shard).unwrap_or_else(Instant::now) + placement.turn(config.shard);
            look.until(turn, &store, &key, &holder.nonce, config.shard, standby).await;
            if !placement.try_take() {
                // The further over its share, the longer a broker lets the others go first.
                let over = placement.held().saturating_sub(placement.share()) + 1;
                let head_start = Instant::now() + crate::shards::HEAD_START * over;
                look.until(head_start, &store, &key, &holder.nonce, config.shard, standby).await;
                placement.take();
            }
            counted = true;
        }
        match ownership.poll(Instant::now()) {
            Step::Create => {
                let (mut answer, refused) =
                    match tokio::time::timeout(ANSWER_WITHIN, store.create(&key, value.clone())).await {
                        Ok(Ok(revision)) => (Created::Yes(revision), None),
                        Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => (Created::Taken, None),
                        Ok(Err(e)) => (Created::Unknown, Some(e)),
                        Err(_) => (Created::Unknown, None),
                    };
                // Whoever holds the key now. A refused create with a holder is a lost race, not
                // a NATS problem: another broker's create landed first on a key released before
                // (NATS then refuses ours for the revision both expected, not as existing).
                let held = match (&answer, &refused) {
                    (Created::Taken, _) | (_, Some(_)) => current_holder(&store, &key).await,
                    _ => None,
                };
                if refused.as_ref().is_some_and(|e| held.is_some() || another_wrote_first(e)) {
                    answer = Created::Taken;
                }
                // Said once per streak of failures: NATS without a quorum fails every second.
                if let Some(e) = refused
                    && answer == Created::Unknown
                    && !failing
                {
                    tracing::warn!(key = %key, error = %e, "could not take the lease (is NATS up, with a quorum?); retrying every second");
                }
                failing = answer == Created::Unknown;
                if answer == Created::Taken
                    && let Some((owner, revision)) = held
                {
                    tell(config.shard, standby, owner.clone(), &mut look.told);
                    let now = Instant::now();
                    let unrenewed = match &seen {
                        Some(s) if s.revision == revision => now.saturating_duration_since(s.since),
                        _ => {
                            seen = Some(Seen { revision, since: now });
                            Duration::ZERO
                        }
                    };
                    if owner.nonce != holder.nonce
                        && unrenewed >= (times.renew_every * 2).max(DEAD_AFTER)
                        && let Some(taken) = take_from_dead(&store, &key, &value, &owner, revision, unrenewed).await
                    {
                        answer = Created::Yes(taken);
                    }
                }
                if !matches!(answer, Created::Yes(_))
                    && counted
                    && let Some(placement) = &config.placement
                {
                    placement.give_back();
                }
                counted = false;
                ownership.created(answer, Instant::now());
            }
            Step::Wait(until) => {
                if look.until(until, &store, &key, &holder.nonce, config.shard, standby).await {
                    ownership.key_freed(Instant::now());
                }
            }
            // Taken, but the answer came so late that this broker's share of the lease has
            // already run out: start over as a standby (the key expires on its own).
            Step::StepDown => {
                tracing::warn!(shard = config.shard, "took the lease too late to use it; trying again");
                if let Some(placement) = &config.placement {
                    placement.give_back();
                }
                ownership = Ownership::new(times, Instant::now() + times.retry_every);
            }
            Step::Renew { .. } => unreachable!("a standby does not renew"),
        }
    };
    set_note(standby, None);
    tracing::info!(shard = config.shard, epoch, node = %holder.node, "took the lease of this shard's log");
    let (lost_tx, lost) = watch::channel(false);
    let (release_tx, release_rx) = oneshot::channel();
    let task = tokio::spawn(keep(store, key, value, ownership, lost_tx, release_rx));
    Ok(Lease { epoch, node: holder.node, lost, release: Some(release_tx), task })
}

/// What a standby watches of the lease key: the watch (made again when it fails), and the
/// owner it last told of.
struct Lookout {
    watch: Option<kv::Watch>,
    told: Option<Holder>,
}

impl Lookout {
    /// Waits until `until`, noting in `standby` which broker takes the key meanwhile; returns
    /// early, with true, when the key is freed (released by its owner).
    async fn until(
        &mut self,
        until: Instant,
        store: &kv::Store,
        key: &str,
        nonce: &str,
        shard: u32,
        standby: &StandbyNote,
    ) -> bool {
        loop {
            if Instant::now() >= until {
                return false;
            }
            if self.watch.is_none() {
                self.watch = watch_key(store, key).await;
            }
            let Some(watching) = self.watch.as_mut() else {
                tokio::time::sleep_until(until).await;
                return false;
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return false,
                entry = watching.next() => match entry {
                    Some(Ok(e)) if matches!(e.operation, kv::Operation::Delete | kv::Operation::Purge) => return true,
                    // Another standby took over: forward to it from now on.
                    Some(Ok(e)) => {
                        if let Ok(owner) = serde_json::from_slice::<Holder>(&e.value)
                            && owner.nonce != nonce
                        {
                            tell(shard, standby, owner, &mut self.told);
                        }
                    }
                    // A failing or ended watch (a reconnect) is made again at the next wait,
                    // rather than polled in a loop until the timer.
                    Some(Err(_)) | None => {
                        self.watch = None;
                        tokio::time::sleep_until(until).await;
                        return false;
                    }
                },
            }
        }
    }
}

/// A watch of `key`, or `None` (said in the log) if NATS does not grant one now.
async fn watch_key(store: &kv::Store, key: &str) -> Option<kv::Watch> {
    match store.watch(key).await {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::debug!(key, error = %e, "cannot watch the lease now; trying on the timer");
            None
        }
    }
}

fn set_note(note: &StandbyNote, owner: Option<Standby>) {
    note.send_if_modified(|now| {
        let changed = *now != owner;
        *now = owner;
        changed
    });
}

/// Notes `owner` as the owner, logging it once per owner.
fn tell(shard: u32, standby: &StandbyNote, owner: Holder, told: &mut Option<Holder>) {
    if told.as_ref() == Some(&owner) {
        return;
    }
    let said = Standby::Owner(owner.clone());
    tracing::info!(shard, owner = %said, "another broker owns this shard: relaying to it, and taking over if it dies or stops");
    set_note(standby, Some(said));
    *told = Some(owner);
}

/// Who holds `key`, if anyone, and the revision of their last write.
async fn current_holder(store: &kv::Store, key: &str) -> Option<(Holder, u64)> {
    let entry = tokio::time::timeout(ANSWER_WITHIN, store.entry(key)).await.ok()?.ok()??;
    if entry.operation != kv::Operation::Put {
        return None;
    }
    Some((serde_json::from_slice(&entry.value).ok()?, entry.revision))
}

/// The owner's last write as a standby saw it: its revision, and since when it is unchanged.
struct Seen {
    revision: u64,
    since: Instant,
}

/// Takes the key from `owner`, whose write at `revision` has not been renewed for `unrenewed`,
/// if its advertised address refuses connections: the process is gone. Returns the revision
/// of the take, the new owner's epoch. The write expects `revision`, so it fails if the owner
/// renewed meanwhile or another standby took the key first.
async fn take_from_dead(
    store: &kv::Store,
    key: &str,
    value: &Bytes,
    owner: &Holder,
    revision: u64,
    unrenewed: Duration,
) -> Option<u64> {
    let url = owner.advertise_url.as_deref()?;
    if !refuses_connections(url).await {
        return None;
    }
    let taken = tokio::time::timeout(ANSWER_WITHIN, store.update(key, value.clone(), revision)).await.ok()?.ok()?;
    tracing::warn!(
        key,
        owner = %owner.node,
        url,
        unrenewed_ms = unrenewed.as_millis() as u64,
        "the owner stopped renewing its lease and nothing listens at its address: taking the lease over before it runs out"
    );
    Some(taken)
}

/// True if a connection to `url`'s host and port is refused: the host is up and nothing listens
/// there. A timeout, an unreachable host or a name that does not resolve prove nothing.
async fn refuses_connections(url: &str) -> bool {
    let Some(address) = crate::edge::address_of(url) else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(address)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Renews the lease until it is released or lost.
async fn keep(
    store: kv::Store,
    key: String,
    value: Bytes,
    mut ownership: Ownership,
    lost: watch::Sender<bool>,
    mut release: oneshot::Receiver<oneshot::Sender<()>>,
) {
    let mut failing = false;
    loop {
        match ownership.poll(Instant::now()) {
            Step::Renew { revision } => {
                let answer = match tokio::time::timeout(ANSWER_WITHIN, store.update(&key, value.clone(), revision))
                    .await
                {
                    Ok(Ok(revision)) => Renewed::Yes(revision),
                    Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        // Ours at another revision (an earlier renewal landed unanswered), or lost.
                        match store.entry(&key).await {
                            Ok(Some(entry)) if entry.operation == kv::Operation::Put && entry.value == value => {
                                Renewed::Behind(entry.revision)
                            }
                            Ok(_) => Renewed::Lost,
                            Err(_) => Renewed::Unknown,
                        }
                    }
                    Ok(Err(e)) => {
                        if !failing {
                            tracing::warn!(key = %key, error = %e, "could not renew the lease (is NATS up, with a quorum?); retrying until it ends");
                        }
                        Renewed::Unknown
                    }
                    Err(_) => Renewed::Unknown,
                };
                if failing && matches!(answer, Renewed::Yes(_) | Renewed::Behind(_)) {
                    tracing::info!(key = %key, "renewed the lease again");
                }
                failing = answer == Renewed::Unknown;
                ownership.renewed(answer, Instant::now());
            }
            Step::Wait(until) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    done = &mut release => {
                        if let Some(revision) = ownership.release(Instant::now()) {
                            match store.delete_expect_revision(&key, Some(revision)).await {
                                Ok(()) => tracing::info!(key = %key, "released the lease"),
                                Err(e) => tracing::warn!(key = %key, error = %e, "could not release the lease; it ends on its own"),
                            }
                        }
                        if let Ok(done) = done {
                            let _ = done.send(());
                        }
                        return;
                    }
                }
            }
            Step::StepDown => {
                tracing::error!(key = %key, "lost the lease of this shard's log: stepping down");
                let _ = lost.send(true);
                return;
            }
            Step::Create => unreachable!("an owner does not create"),
        }
    }
}

/// What every broker of a cluster must agree on, kept in the bucket `<cluster>_config`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The read-link signing key (`link-key`): the first broker to start makes it, every other
    /// one reads it, so a link made by one broker is honoured by any other (after a takeover, say).
    pub link_key: [u8; 32],
    /// How many shards the cluster has (`shards`): set by the first broker, from its `--shards`
    /// (1 if not given); a broker asking for another number is refused.
    pub shards: u32,
}

/// Reads the cluster's [`Settings`], making those not yet set.
pub async fn settings(config: &NatsConfig) -> Result<Settings, LogError> {
    let client = connect(config).await?;
    let js = jetstream::new(client);
    let name = format!("{}_config", config.cluster);
    let bucket = kv::Config {
        bucket: name.clone(),
        description: format!("settings every broker of cq cluster {} shares", config.cluster),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    };
    let store = open_bucket(&js, bucket, format!("creating the settings bucket {name}")).await?;
    let mut fresh = [0u8; 32];
    getrandom::fill(&mut fresh).map_err(|e| kv_err("making the link key")(&e))?;
    let stored = create_or_read(&store, &name, "link-key", Bytes::copy_from_slice(&fresh)).await?;
    let mut link_key = [0u8; 32];
    if stored.len() != link_key.len() {
        return Err(LogError::Nats {
            context: format!("reading the link key from {name}"),
            message:
                "`link-key` is not a 32-byte key; delete it to make a new one (every link made so far stops working)"
                    .into(),
        });
    }
    link_key.copy_from_slice(&stored);
    let asked = config.shards.unwrap_or(1);
    let stored = create_or_read(&store, &name, "shards", Bytes::from(asked.to_string())).await?;
    let shards = std::str::from_utf8(&stored).ok().and_then(|s| s.parse::<u32>().ok()).filter(|n| *n >= 1);
    let Some(shards) = shards else {
        return Err(LogError::Nats {
            context: format!("reading the number of shards from {name}"),
            message: format!("`shards` holds {stored:?}, not a number of shards"),
        });
    };
    if config.shards.is_some_and(|asked| asked != shards) {
        return Err(LogError::Nats {
            context: "--shards".into(),
            message: format!(
                "cluster {} was created with {shards} shard{}, and this broker asks for {asked}; the number is fixed \
                 when a cluster is created: start it with --shards {shards} (or without --shards)",
                config.cluster,
                if shards == 1 { "" } else { "s" }
            ),
        });
    }
    Ok(Settings { link_key, shards })
}

/// The value of `key` in `store` (the bucket `name`), made `value` if the key is missing. A
/// bucket just created (or whose servers are electing a leader) answers "no stream found" for a
/// moment: tried again for up to 30 s.
async fn create_or_read(store: &kv::Store, name: &str, key: &str, value: Bytes) -> Result<Bytes, LogError> {
    let give_up = Instant::now() + crate::jetstream::COMMIT_RETRY_FOR;
    loop {
        match store.create(key, value.clone()).await {
            Ok(_) => return Ok(value),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => break,
            Err(e) if Instant::now() < give_up => {
                tracing::debug!(error = %e, key, "could not store a cluster setting yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(kv_err(format!("storing `{key}` in {name}"))(&e)),
        }
    }
    match store.get(key).await.map_err(|e| kv_err(format!("reading `{key}` from {name}"))(&e))? {
        Some(bytes) => Ok(bytes),
        None => Err(LogError::Nats {
            context: format!("reading `{key}` from {name}"),
            message: "the key exists but reads as deleted; try again".into(),
        }),
    }
}

/// Announces this broker in the lease bucket (`node.<name>`, rewritten every renewal interval,
/// so it vanishes a lease after the broker dies) and counts the brokers announced, for
/// `placement`'s fair share, until `shutdown`; then removes the announcement. The placement is
/// settled after the second count and at least [`SETTLE_FOR`] after this broker first announced
/// itself. A broker serving two or more shards more than another for longer than a lease gives
/// a shard up.
pub async fn announce(
    config: NatsConfig,
    times: LeaseTimes,
    placement: std::sync::Arc<crate::shards::Placement>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = presence_name(&config.node);
    let key = format!("node.{name}");
    let mut store = None;
    let mut rounds = 0u32;
    // Rounds in a row this broker served two or more shards more than another. A shard is given
    // up only after a lease's worth of them, so a dead broker's key (which outlives it by a
    // lease) does not make the survivors give up the shards they just took from it.
    let mut over = 0u32;
    let over_for = (times.ttl.as_millis() / times.renew_every.as_millis().max(1)) as u32 + 2;
    let started = Instant::now();
    loop {
        if store.is_none() {
            store = match connect(&config).await {
                Ok(client) => bucket(&jetstream::new(client), &config, &times).await.ok(),
                Err(_) => None,
            };
        }
        if let Some(store) = &store {
            let value = Bytes::from(presence_value(&config, placement.serving()));
            let put = tokio::time::timeout(ANSWER_WITHIN, store.put(&key, value)).await;
            // A list without this broker's own key, just written, is a listing that ended early
            // (a replica behind): the last good one is kept.
            if let Ok(Ok(_)) = put
                && let Some(nodes) = live_nodes(store).await
                && nodes.iter().any(|(n, _)| *n == name)
            {
                placement.set_nodes(nodes, &name);
            }
        }
        rounds += 1;
        if rounds >= 2 && started.elapsed() >= SETTLE_FOR {
            placement.set_settled();
        }
        match placement.to_hand_over() {
            Some(shard) => {
                over += 1;
                if over >= over_for {
                    tracing::info!(
                        shard,
                        serving = placement.serving(),
                        share = placement.share(),
                        "serving two or more shards more than another broker: handing one over"
                    );
                    placement.give_up(shard);
                    over = 0;
                }
            }
            None => over = 0,
        }
        tokio::select! {
            _ = tokio::time::sleep(times.renew_every) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    if let Some(store) = store {
        let _ = tokio::time::timeout(ANSWER_WITHIN, store.delete(&key)).await;
    }
}

/// A broker's name as its presence key holds it (`node.<name>`): what a key may not hold
/// becomes `_`.
fn presence_name(node: &str) -> String {
    node.chars().map(|c| if c.is_ascii_alphanumeric() || "-_=".contains(c) { c } else { '_' }).collect()
}

/// Refuses to start a broker whose `--node-id` a live broker of the cluster announces already
/// (at another address): the two would count as one when the shards are shared out. A key left
/// by a broker that died (or by this one's previous run) is not renewed, so it is told apart by
/// watching it for two renewal intervals.
pub async fn ensure_node_unique(config: &NatsConfig, times: LeaseTimes) -> Result<(), LogError> {
    let client = connect(config).await?;
    let store = bucket(&jetstream::new(client), config, &times).await?;
    let key = format!("node.{}", presence_name(&config.node));
    let ours = config.advertise_url.clone().unwrap_or_default();
    let read = || async {
        match tokio::time::timeout(ANSWER_WITHIN, store.entry(&key)).await {
            Ok(Ok(Some(e))) if e.operation == kv::Operation::Put => Some(e),
            _ => None,
        }
    };
    let Some(first) = read().await else { return Ok(()) };
    if presence_url(&first.value) == ours {
        return Ok(());
    }
    tokio::time::sleep(times.renew_every * 2 + Duration::from_millis(200)).await;
    match read().await {
        Some(now) if now.revision != first.revision && presence_url(&now.value) != ours => Err(LogError::Nats {
            context: "--node-id".into(),
            message: format!(
                "a live broker of cluster {} announces itself as `{}` already (at {}); give each broker its own \
                 --node-id",
                config.cluster,
                config.node,
                presence_url(&now.value)
            ),
        }),
        _ => Ok(()),
    }
}

/// What a broker's presence key holds: where it is reached, and how many shards it serves.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Presence {
    #[serde(default)]
    url: String,
    #[serde(default)]
    serving: u32,
}

fn presence_value(config: &NatsConfig, serving: usize) -> Vec<u8> {
    let presence = Presence { url: config.advertise_url.clone().unwrap_or_default(), serving: serving as u32 };
    serde_json::to_vec(&presence).expect("a presence serialises")
}

/// The address a presence key's value names.
fn presence_url(value: &[u8]) -> String {
    serde_json::from_slice::<Presence>(value).map(|p| p.url).unwrap_or_else(|_| String::from_utf8_lossy(value).into())
}

/// The brokers announced in the lease bucket and how many shards each serves, if NATS answers
/// in time.
async fn live_nodes(store: &kv::Store) -> Option<Vec<(String, u32)>> {
    let nodes = async {
        let mut keys = store.keys().await.ok()?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            if let Some(name) = key.ok()?.strip_prefix("node.") {
                names.push(name.to_string());
            }
        }
        let mut nodes = Vec::with_capacity(names.len());
        for name in names {
            let serving = match store.get(format!("node.{name}")).await.ok()? {
                Some(value) => serde_json::from_slice::<Presence>(&value).map(|p| p.serving).unwrap_or(0),
                // Gone between the listing and the read: that broker stopped.
                None => continue,
            };
            nodes.push((name, serving));
        }
        Some(nodes)
    };
    tokio::time::timeout(ANSWER_WITHIN, nodes).await.ok().flatten()
}

/// True if NATS refused a write because the key was not at the revision expected: another
/// broker wrote it first, so NATS answered and the race was lost. The read that follows may
/// still show the key released (a replica behind the write), so the error decides. NATS says
/// so with either of its two "wrong last sequence" codes (the second for a key with a TTL).
fn another_wrote_first(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(api) = e.downcast_ref::<jetstream::Error>()
            && matches!(
                api.error_code(),
                jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                    | jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            )
        {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A create refused as the client library builds it: the API error NATS answered, in a
    /// publish error, in an update error, in a create error.
    fn refused_create(code: u64) -> kv::CreateError {
        let api: jetstream::Error = serde_json::from_value(
            serde_json::json!({ "code": 400, "err_code": code, "description": "wrong last sequence" }),
        )
        .unwrap();
        let publish = jetstream::context::PublishError::with_source(jetstream::context::PublishErrorKind::Other, api);
        let update = kv::UpdateError::with_source(kv::UpdateErrorKind::Other, publish);
        kv::CreateError::with_source(kv::CreateErrorKind::Other, update)
    }

    #[test]
    fn a_create_refused_for_its_revision_is_a_race_lost_not_nats_failing() {
        assert!(another_wrote_first(&refused_create(10071)));
        assert!(another_wrote_first(&refused_create(10164)));
        // Any other answer (here: no quorum, 10008 "JetStream system temporarily unavailable").
        assert!(!another_wrote_first(&refused_create(10008)));
        assert!(!another_wrote_first(&kv::CreateError::new(kv::CreateErrorKind::Publish)));
    }
}
