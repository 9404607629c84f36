//! The server's durable state behind one trait: environments (with their lifecycle state and
//! retention), their flags and segments, the change log, SDK keys and named admin tokens (both
//! hashed), clone jobs, and the audit log.
//!
//! Every admin write records who made it in the audit log inside its own transaction: an
//! acknowledged write always has its audit entry, and an entry always describes a write that
//! committed.
//!
//! A write is one transaction that checks its precondition, takes the environment's next
//! version, writes the item and appends the committed change to the log; [`Store::commit`]
//! returns only after the commit, with that log entry. The entry is the one thing that advances
//! the in-memory hub (see [`crate::control`]), so a node fed from the log by
//! [`Store::changes_since`] is fed exactly like the node that wrote.
//!
//! Each backend is one module implementing [`Store`] with the backend-neutral [`StoreError`]:
//! [`sqlite`] is the embedded default, [`postgres`] the one several nodes share. Both pass the
//! same tests (`tests.rs`).

pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod tests;

use std::fmt;

use vane_core::history::{Change, Item, ItemKind, Logged, Write};
use vane_core::protocol::Selector;

use crate::keys::KeyRecord;

/// Errors at the store's boundary, the same for every backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No environment with that name.
    #[error("environment {0:?} not found")]
    EnvNotFound(String),
    /// The environment already exists.
    #[error("environment {0:?} already exists")]
    EnvExists(String),
    /// No flag with that key.
    #[error("flag {0:?} not found")]
    FlagNotFound(String),
    /// No segment with that key.
    #[error("segment {0:?} not found")]
    SegmentNotFound(String),
    /// No SDK key with that id.
    #[error("SDK key {0:?} not found")]
    KeyNotFound(String),
    /// No admin token with that name.
    #[error("admin token {0:?} not found")]
    TokenNotFound(String),
    /// An admin token with that name exists.
    #[error("admin token {0:?} already exists")]
    TokenExists(String),
    /// No job with that id.
    #[error("job {0:?} not found")]
    JobNotFound(String),
    /// The job is not in a state that allows this (only a running clone takes batches, only
    /// a failed one can be retried).
    #[error("job {id:?} is {}", state.as_str())]
    JobState {
        /// The job.
        id: String,
        /// Its state.
        state: JobState,
    },
    /// The write's precondition no longer holds: what it was checked against changed first.
    /// The caller re-reads (the environment is at least at `version`) and tries again.
    #[error("environment {env:?} changed concurrently (now at version {version})")]
    Conflict {
        /// The environment.
        env: String,
        /// Its version when the write was refused.
        version: u64,
    },
    /// A stored row cannot be read back (corruption, or a schema from a newer server).
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// The backend failed: the database, its files or its connection.
    #[error("{backend}: {message}")]
    Backend {
        /// Which backend, e.g. `sqlite`.
        backend: &'static str,
        /// What it said.
        message: String,
    },
}

/// What must still hold when a write commits, checked inside its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: the write stands on its own (a flag without segment references, a deletion).
    Nothing,
    /// The environment is still at this version: the write was validated against that state
    /// (segment references exist, no cycle, a segment is unused).
    EnvAt(u64),
    /// The item written exists and still has this version: a read-modify-write (a toggle).
    ItemAt(u64),
}

/// Who made an admin change, and what it was, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// The admin token's name (`admin` for the data directory's token, `vane` for the server
    /// itself, as when `--demo` seeds).
    pub actor: String,
    /// What was done, e.g. `flag.put`, `flag.toggle`, `key.revoke`.
    pub action: &'static str,
}

impl Audit {
    /// `actor` did `action`.
    pub fn new(actor: &str, action: &'static str) -> Audit {
        Audit {
            actor: actor.to_owned(),
            action,
        }
    }
}

/// One entry of the audit log. `before` and `after` are the item as stored (a flag or segment
/// definition, a key's public fields, an environment's name and position), never a secret.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuditEntry {
    /// Rises with every entry; page with it.
    pub id: u64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// The admin token's name.
    pub actor: String,
    /// What was done.
    pub action: String,
    /// The environment.
    pub env: Option<String>,
    /// The flag, segment, key or token.
    pub target: Option<String>,
    /// Before the change; `null` for a creation.
    pub before: Option<serde_json::Value>,
    /// After it; `null` for a deletion.
    pub after: Option<serde_json::Value>,
}

/// Where an environment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvState {
    /// Served.
    Ready,
    /// Being filled by a clone: not served, not editable.
    Creating,
    /// Its clone failed: not served; delete it or retry the clone.
    Failed,
}

impl EnvState {
    /// The stored and JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            EnvState::Ready => "ready",
            EnvState::Creating => "creating",
            EnvState::Failed => "failed",
        }
    }

    /// Reads [`EnvState::as_str`].
    pub fn parse(s: &str) -> Option<EnvState> {
        [EnvState::Ready, EnvState::Creating, EnvState::Failed]
            .into_iter()
            .find(|e| e.as_str() == s)
    }
}

/// How much of an environment's change log is kept (beyond the in-memory window, which is
/// always kept). `None`: the server's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep at most this many of the newest changes.
    pub max_changes: Option<u64>,
    /// Drop changes older than this many days.
    pub max_age_days: Option<u64>,
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Copying.
    Running,
    /// Finished; the environment is ready.
    Done,
    /// Stopped; `error` says why.
    Failed,
}

impl JobState {
    /// The stored and JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    /// Reads [`JobState::as_str`].
    pub fn parse(s: &str) -> Option<JobState> {
        [JobState::Running, JobState::Done, JobState::Failed]
            .into_iter()
            .find(|e| e.as_str() == s)
    }
}

/// A clone job: `source` copied into `target`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobRecord {
    /// Its id.
    pub id: String,
    /// `clone`.
    pub kind: String,
    /// The environment copied from.
    pub source: String,
    /// The environment copied into.
    pub target: String,
    /// Running, done or failed.
    pub state: JobState,
    /// Items (flags and segments) copied so far.
    pub copied: u64,
    /// Items to copy.
    pub total: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// The source's version the copy is of.
    pub source_version: u64,
    /// The source's epoch then.
    #[serde(with = "crate::api::epoch_hex")]
    pub source_epoch: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, once done or failed.
    pub finished_at: Option<i64>,
}

/// A named admin token (its hash; the secret is shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Its name, recorded as the actor of what it does.
    pub name: String,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    /// SHA-256 of the secret.
    pub hash: crate::keys::SecretHash,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `None` while valid.
    pub revoked_at: Option<i64>,
}

/// A committed change, as the store logged it.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The environment's epoch: the change belongs to this incarnation of it.
    pub epoch: u64,
    /// The log entry.
    pub change: Change,
    /// When the transaction committed (Unix nanoseconds, taken after the commit returned).
    pub at_unix_ns: u128,
}

impl Committed {
    /// The environment's selector after the change.
    pub fn selector(&self) -> Selector {
        Selector {
            epoch: self.epoch,
            version: self.change.version,
        }
    }
}

/// An environment as loaded at start: its flags and segments, and the newest changes.
#[derive(Debug)]
pub struct LoadedEnv {
    /// The name.
    pub name: String,
    /// Epoch and current version.
    pub selector: Selector,
    /// Current flags and segments, compiled.
    pub items: Vec<Item>,
    /// The newest changes, oldest first, as the history window keeps them (not compiled).
    pub changes: Vec<Logged>,
    /// Ready, or still being (or failed to be) filled by a clone.
    pub state: EnvState,
    /// Its own retention, where it has one.
    pub retention: Retention,
}

/// Entries read from an environment's log.
#[derive(Debug, Clone)]
pub struct LogTail {
    /// The environment's epoch: the entries belong to this incarnation of it.
    pub epoch: u64,
    /// The entries, oldest first.
    pub changes: Vec<Change>,
}

impl LoadedEnv {
    /// Checks that what was loaded holds together: the newest logged change is the
    /// environment's version, the log is contiguous, and no item is newer than the environment.
    /// A store only gets here by being changed outside Vane (or damaged): the server refuses to
    /// serve it rather than fail every later write.
    pub fn check(&self) -> Result<(), StoreError> {
        let at = self.selector.version;
        let corrupt = |what: String| {
            StoreError::Corrupt(format!(
                "environment {:?} is at version {at}, but {what}; the store was changed outside vane \
                 or damaged: restore it from a backup",
                self.name
            ))
        };
        if let Some(last) = self.changes.last()
            && last.version != at
        {
            return Err(corrupt(format!(
                "its change log ends at version {}",
                last.version
            )));
        }
        if let Some(pair) = self
            .changes
            .windows(2)
            .find(|w| w[1].version != w[0].version + 1)
        {
            return Err(corrupt(format!(
                "its change log skips from version {} to {}",
                pair[0].version, pair[1].version
            )));
        }
        if let Some(item) = self.items.iter().find(|i| i.version() > at) {
            return Err(corrupt(format!(
                "an item was written at version {}",
                item.version()
            )));
        }
        Ok(())
    }
}

/// Everything the hub is built from.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every environment, by name.
    pub envs: Vec<LoadedEnv>,
    /// Every SDK key that is not revoked.
    pub keys: Vec<KeyRecord>,
    /// Every admin token that is not revoked.
    pub tokens: Vec<TokenRecord>,
    /// Clone jobs still running (interrupted by the stop), and the failed ones of environments
    /// that are failed; oldest first.
    pub jobs: Vec<JobRecord>,
}

/// An environment's row: what a node compares its hub with to follow the other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvMeta {
    /// The name.
    pub name: String,
    /// Epoch and current version.
    pub selector: Selector,
    /// Ready, creating or failed.
    pub state: EnvState,
    /// Its own retention.
    pub retention: Retention,
}

/// Everything but the flags, segments and logs, as of one moment: how a node learns what other
/// nodes did to environments, keys and tokens (see [`crate::control::Control::follow`]).
#[derive(Debug, Default)]
pub struct Meta {
    /// Every environment, by name.
    pub envs: Vec<EnvMeta>,
    /// Every SDK key that is not revoked.
    pub keys: Vec<KeyRecord>,
    /// Every admin token that is not revoked.
    pub tokens: Vec<TokenRecord>,
    /// The jobs [`Loaded::jobs`] holds.
    pub jobs: Vec<JobRecord>,
}

/// The keys and tokens in force and the jobs a start resumes or reports, as each backend reads
/// them for [`Loaded`] and [`Meta`].
type Active = (Vec<KeyRecord>, Vec<TokenRecord>, Vec<JobRecord>);

/// What woke a follower: a shared store's announcement that something was committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// New entries in this environment's change log.
    Changes(String),
    /// Environments, keys, tokens or jobs changed.
    Meta,
    /// Announcements may have been missed (the listening connection was re-made): compare
    /// everything.
    Resync,
}

/// What one node's sessions of an environment have acknowledged, as the node last reported it
/// to a store the nodes share (every second): how `GET …/propagation` counts the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAcks {
    /// The reporting node (an id it drew at start).
    pub node: String,
    /// The environment.
    pub env: String,
    /// The environment's version at that node.
    pub version: u64,
    /// Its live sessions that have acked at least once.
    pub sessions: u64,
    /// Acked version → how many of its sessions hold it.
    pub by_version: std::collections::BTreeMap<u64, u64>,
    /// When it reported, Unix milliseconds.
    pub at_ms: i64,
}

/// The store: every method is one transaction, and returns after it committed.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Every environment with its items and its newest `window` changes, and every active key.
    async fn load(&self, window: usize) -> Result<Loaded, StoreError>;

    /// Creates an environment at version 0 with a fresh random epoch, ready.
    async fn create_env(&self, name: &str, audit: &Audit) -> Result<Selector, StoreError>;

    /// Deletes an environment with its items, log and keys (and fails its running clone).
    async fn delete_env(&self, name: &str, audit: &Audit) -> Result<(), StoreError>;

    /// Commits `write` to `env` as its next version, if `expect` holds; returns the log entry.
    /// Deleting an item that does not exist is a not-found error and changes nothing.
    async fn commit(
        &self,
        env: &str,
        write: Write,
        expect: Expect,
        audit: &Audit,
    ) -> Result<Committed, StoreError>;

    /// Starts a clone of `source` (at `source_at`, `total` items) into a new environment
    /// `target`, which exists from now on in state `creating` under a fresh epoch.
    async fn begin_clone(
        &self,
        source: &str,
        source_at: Selector,
        target: &str,
        total: u64,
        audit: &Audit,
    ) -> Result<(Selector, JobRecord), StoreError>;

    /// Starts a failed clone again: its target is emptied, gets a fresh epoch and is
    /// `creating` again; the copy is of `source_at`, `total` items.
    async fn restart_clone(
        &self,
        job: &str,
        source_at: Selector,
        total: u64,
        audit: &Audit,
    ) -> Result<(Selector, JobRecord), StoreError>;

    /// Commits one batch of a running clone: each write as the target's next version, and
    /// the job's progress. Fails with `JobNotFound` if the job is no longer running (its target
    /// was deleted).
    async fn clone_batch(
        &self,
        job: &str,
        writes: Vec<Write>,
    ) -> Result<Vec<Committed>, StoreError>;

    /// Ends a running clone: done (the target becomes ready, in the same transaction) or
    /// failed with `error` (the target becomes failed).
    async fn end_clone(&self, job: &str, error: Option<String>) -> Result<JobRecord, StoreError>;

    /// One job.
    async fn job(&self, id: &str) -> Result<JobRecord, StoreError>;

    /// The keys of the items `env` holds (for a clone that resumes).
    async fn item_keys(&self, env: &str) -> Result<Vec<(ItemKind, String)>, StoreError>;

    /// Sets an environment's retention.
    async fn set_retention(
        &self,
        env: &str,
        retention: Retention,
        audit: &Audit,
    ) -> Result<(), StoreError>;

    /// Drops log entries of `env` at or below `at_most` that are either at or below
    /// `by_count` or committed before `older_than` (Unix seconds); returns how many.
    async fn prune(
        &self,
        env: &str,
        at_most: u64,
        by_count: u64,
        older_than: i64,
    ) -> Result<u64, StoreError>;

    /// Stores a new admin token (its hash).
    async fn create_token(&self, token: &TokenRecord, audit: &Audit) -> Result<(), StoreError>;

    /// Revokes an admin token and returns it.
    async fn revoke_token(&self, name: &str, audit: &Audit) -> Result<TokenRecord, StoreError>;

    /// Every admin token, revoked ones included, oldest first.
    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// The audit log of `env`, newest first: at most `limit` entries with ids below `before`.
    async fn audit(
        &self,
        env: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError>;

    /// The log of `env` after version `after`, oldest first, at most `limit` entries: how a
    /// hub that missed entries catches up.
    async fn changes_since(
        &self,
        env: &str,
        after: u64,
        limit: usize,
    ) -> Result<LogTail, StoreError>;

    /// Stores a new SDK key (its hash; the secret is never stored).
    async fn create_key(&self, key: &KeyRecord, audit: &Audit) -> Result<(), StoreError>;

    /// Marks a key revoked and returns it. Revoking twice keeps the first time.
    async fn revoke_key(&self, env: &str, id: &str, audit: &Audit)
    -> Result<KeyRecord, StoreError>;

    /// Every key of `env`, revoked ones included, oldest first.
    async fn keys(&self, env: &str) -> Result<Vec<KeyRecord>, StoreError>;

    /// Environments, keys, tokens and jobs as of one moment, without items or logs.
    async fn meta(&self) -> Result<Meta, StoreError>;

    /// One environment as [`Store::load`] loads it.
    async fn load_env(&self, name: &str, window: usize) -> Result<LoadedEnv, StoreError>;

    /// For a store several nodes share: announcements of what any node commits, as they
    /// commit. They are wake-ups, not the data: a follower reads the store itself, so a lost
    /// one only delays it until its next periodic read. `None`: nothing else writes to this
    /// store (the embedded one).
    async fn listen(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<Wake>>, StoreError> {
        Ok(None)
    }

    /// For a store several nodes share: replaces what `node` reported of its sessions' acks
    /// (none: withdraws it), and drops reports older than `stale_before_ms`, of nodes that died.
    /// A store only one node uses keeps nothing.
    async fn report_acks(
        &self,
        _node: &str,
        _acks: Vec<NodeAcks>,
        _stale_before_ms: i64,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// The reports for `env` made since `since_ms`, of every node.
    async fn fleet_acks(&self, _env: &str, _since_ms: i64) -> Result<Vec<NodeAcks>, StoreError> {
        Ok(Vec::new())
    }

    /// Flushes what the backend buffers, for a clean shutdown.
    async fn close(&self) -> Result<(), StoreError>;
}

// What both backends store alike. Epochs and versions are `u64`, stored bit for bit in the
// databases' signed 64-bit integers.

fn to_sql(v: u64) -> i64 {
    v as i64
}

fn from_sql(v: i64) -> u64 {
    v as u64
}

/// The table of an item kind.
fn table(kind: ItemKind) -> &'static str {
    match kind {
        ItemKind::Flag => "flags",
        ItemKind::Segment => "segments",
    }
}

fn not_found(kind: ItemKind, key: &str) -> StoreError {
    match kind {
        ItemKind::Flag => StoreError::FlagNotFound(key.to_owned()),
        ItemKind::Segment => StoreError::SegmentNotFound(key.to_owned()),
    }
}

fn parse_item(kind: ItemKind, body: &str) -> Result<Item, StoreError> {
    Item::parse(kind, body).map_err(StoreError::Corrupt)
}

/// A stored secret hash (hex) read back; `what` names its owner in the error.
fn secret_hash(
    hex_text: &str,
    what: impl FnOnce() -> String,
) -> Result<crate::keys::SecretHash, StoreError> {
    hex::decode(hex_text)
        .ok()
        .and_then(|h| crate::keys::SecretHash::try_from(h).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("{}: unreadable hash", what())))
}

/// An environment as the audit log shows it.
fn env_json(name: &str, at: Selector) -> String {
    serde_json::json!({"name": name, "version": at.version, "epoch": at.epoch_hex()}).to_string()
}

/// A key as the audit log shows it: the public fields, never the hash.
fn key_json(k: &KeyRecord) -> String {
    serde_json::to_string(&crate::api::KeyInfo::from(k)).unwrap_or_default()
}

/// A token as the audit log shows it: the public fields, never the hash.
fn token_json(t: &TokenRecord) -> String {
    serde_json::json!({"name": t.name, "prefix": t.prefix, "created_at": t.created_at,
                       "revoked_at": t.revoked_at})
    .to_string()
}

fn job_json(j: &JobRecord) -> String {
    serde_json::to_string(j).unwrap_or_default()
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Unix nanoseconds now.
pub fn unix_now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
