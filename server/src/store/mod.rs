//! The server's durable state behind one trait: environments, their flags and segments, the
//! change log, and SDK keys (hashed).
//!
//! A write is one transaction that checks its precondition, takes the environment's next
//! version, writes the item and appends the committed change to the log; [`Store::commit`]
//! returns only after the commit, with that log entry. The entry is the one thing that advances
//! the in-memory hub (see [`crate::control`]), so a node fed from the log by
//! [`Store::changes_since`] is fed exactly like the node that wrote.
//!
//! Each backend is one module implementing [`Store`] with the backend-neutral [`StoreError`]:
//! [`sqlite`] is the embedded default.

pub mod sqlite;

use std::fmt;

use vane_core::history::{Change, Item, Logged, Write};
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
}

/// The store: every method is one transaction, and returns after it committed.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Every environment with its items and its newest `window` changes, and every active key.
    async fn load(&self, window: usize) -> Result<Loaded, StoreError>;

    /// Creates an environment at version 0 with a fresh random epoch.
    async fn create_env(&self, name: &str) -> Result<Selector, StoreError>;

    /// Deletes an environment with its items, log and keys.
    async fn delete_env(&self, name: &str) -> Result<(), StoreError>;

    /// Commits `write` to `env` as its next version, if `expect` holds; returns the log entry.
    /// Deleting an item that does not exist is a not-found error and changes nothing.
    async fn commit(
        &self,
        env: &str,
        write: Write,
        expect: Expect,
    ) -> Result<Committed, StoreError>;

    /// The log of `env` after version `after`, oldest first, at most `limit` entries: how a
    /// hub that missed entries catches up.
    async fn changes_since(
        &self,
        env: &str,
        after: u64,
        limit: usize,
    ) -> Result<LogTail, StoreError>;

    /// Stores a new SDK key (its hash; the secret is never stored).
    async fn create_key(&self, key: &KeyRecord) -> Result<(), StoreError>;

    /// Marks a key revoked and returns it. Revoking twice keeps the first time.
    async fn revoke_key(&self, env: &str, id: &str) -> Result<KeyRecord, StoreError>;

    /// Every key of `env`, revoked ones included, oldest first.
    async fn keys(&self, env: &str) -> Result<Vec<KeyRecord>, StoreError>;

    /// Flushes what the backend buffers, for a clean shutdown.
    async fn close(&self) -> Result<(), StoreError>;
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
