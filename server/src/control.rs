//! The write path behind the admin API: validate an edit against the hub's state, commit it
//! through the store (which assigns the version inside its transaction and checks that what
//! the edit was validated against still holds), then apply the committed log entry to the hub
//! — the same entry another node reads from the log.
//!
//! Consistency is the store's, not a lock's: an edit that depends on the state it read (a
//! toggle, a segment reference, an unused segment) commits with a precondition, and a
//! concurrent change makes it re-read and try again. The hub applies entries in version order
//! however they arrive, and a writer whose entry is stuck behind a gap reads the log back.

use std::sync::Arc;

use tokio::sync::Mutex;
use vane_core::history::{EnvHistory, ItemKind, Write};
use vane_core::model::{Flag, Segment, ValidationError, check_segment_graph, validate_name};
use vane_core::protocol::Selector;

use crate::hub::{Applied, EnvHub, Hub};
use crate::keys::{self, KeyKind, KeyRecord, NewKey};
use crate::store::{Committed, Expect, Store, StoreError, unix_now};

/// Attempts at an edit whose precondition a concurrent change broke.
const MAX_ATTEMPTS: usize = 16;
/// Log entries read back per request while catching up.
const CATCH_UP_BATCH: usize = 1000;

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The request is invalid; names the field.
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// A segment cannot be deleted while flags or segments use it.
    #[error("segment {segment:?} is used by {users}")]
    InUse {
        /// The segment.
        segment: String,
        /// Who uses it, e.g. `flag "a", segment "b"`.
        users: String,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A task of the write path panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A change to an environment's flags or segments.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Create or replace a flag. Its segment references must name existing segments.
    PutFlag(Flag),
    /// Delete a flag.
    DeleteFlag(String),
    /// Turn a flag on or off. Toggling to the state it has still commits a version, so the
    /// caller always gets the version at which the flag has the asked state.
    Toggle {
        /// The flag.
        key: String,
        /// On or off.
        on: bool,
    },
    /// Create or replace a segment. Its references must exist and must not lead back to it.
    PutSegment(Segment),
    /// Delete a segment that no flag or other segment uses.
    DeleteSegment(String),
}

/// The references a segment makes, for [`check_segment_graph`].
fn segment_refs_in(history: &EnvHistory, key: &str) -> Option<Vec<String>> {
    history.segment_entry(key).map(|s| {
        s.compiled
            .segment()
            .segment_refs()
            .map(str::to_owned)
            .collect()
    })
}

impl Edit {
    /// Validates the edit against `h` and makes the write, with the precondition under which
    /// that validation still holds at commit.
    fn prepare(self, h: &EnvHistory) -> Result<(Write, Expect), ControlError> {
        let at = Expect::EnvAt(h.selector().version);
        Ok(match self {
            Edit::PutFlag(flag) => {
                let refs = flag.segment_refs().count();
                check_segment_graph(None, flag.segment_refs(), &|k| segment_refs_in(h, k))?;
                let expect = if refs > 0 { at } else { Expect::Nothing };
                let previous = h.flag(&flag.key).cloned();
                (Write::flag_after(flag, previous.as_deref())?, expect)
            }
            Edit::DeleteFlag(key) => (Write::Delete(ItemKind::Flag, key), Expect::Nothing),
            Edit::Toggle { key, on } => {
                let entry = h
                    .flag(&key)
                    .ok_or_else(|| StoreError::FlagNotFound(key.clone()))?;
                let mut flag = entry.compiled.flag().clone();
                flag.on = on;
                let version = entry.wire.version;
                (
                    Write::flag_after(flag, Some(entry))?,
                    Expect::ItemAt(version),
                )
            }
            Edit::PutSegment(segment) => {
                let refs = segment.segment_refs().count();
                check_segment_graph(Some(&segment.key), segment.segment_refs(), &|k| {
                    segment_refs_in(h, k)
                })?;
                let expect = if refs > 0 { at } else { Expect::Nothing };
                let previous = h.segment_entry(&segment.key).cloned();
                (Write::segment_after(segment, previous.as_deref())?, expect)
            }
            Edit::DeleteSegment(key) => {
                let flags = h
                    .flags()
                    .filter(|f| f.compiled.flag().segment_refs().any(|r| r == key))
                    .map(|f| format!("flag {:?}", f.compiled.flag().key));
                let segments = h
                    .segments()
                    .filter(|s| {
                        s.compiled.segment().key != key
                            && s.compiled.segment().segment_refs().any(|r| r == key)
                    })
                    .map(|s| format!("segment {:?}", s.compiled.segment().key));
                let users: Vec<String> = flags.chain(segments).collect();
                if !users.is_empty() {
                    return Err(ControlError::InUse {
                        segment: key,
                        users: users.join(", "),
                    });
                }
                (Write::Delete(ItemKind::Segment, key), at)
            }
        })
    }
}

/// The store and the hub it feeds.
#[derive(Debug)]
pub struct Control {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    /// Orders environment and key lifecycle changes, so the hub sees them as the store did.
    lifecycle: Mutex<()>,
}

fn internal(e: tokio::task::JoinError) -> ControlError {
    ControlError::Internal(e.to_string())
}

impl Control {
    /// Joins a store and the hub it feeds.
    pub fn new(store: Arc<dyn Store>, hub: Arc<Hub>) -> Arc<Control> {
        Arc::new(Control {
            store,
            hub,
            lifecycle: Mutex::new(()),
        })
    }

    /// The hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Loads the store into the hub and marks it ready.
    pub async fn load(&self) -> Result<(), ControlError> {
        let loaded = self.store.load(self.hub.window()).await?;
        for env in &loaded.envs {
            env.check()?;
        }
        self.hub.load(loaded);
        Ok(())
    }

    fn env(&self, env: &str) -> Result<Arc<EnvHub>, ControlError> {
        self.hub
            .env(env)
            .ok_or_else(|| StoreError::EnvNotFound(env.to_owned()).into())
    }

    /// Creates an environment.
    pub async fn create_env(&self, name: &str) -> Result<Selector, ControlError> {
        validate_name("name", name)?;
        let _order = self.lifecycle.lock().await;
        let selector = self.store.create_env(name).await?;
        self.hub.add_env(name, selector);
        Ok(selector)
    }

    /// Deletes an environment, its flags, segments and keys; its sessions end.
    pub async fn delete_env(&self, name: &str) -> Result<(), ControlError> {
        let _order = self.lifecycle.lock().await;
        self.store.delete_env(name).await?;
        self.hub.remove_env(name);
        Ok(())
    }

    /// Validates and commits an edit of `env`, and returns once the hub holds it.
    pub async fn edit(self: &Arc<Self>, env: &str, edit: Edit) -> Result<Committed, ControlError> {
        let mut attempt = 1;
        loop {
            let env_hub = self.env(env)?;
            let (this, hub_env, edit_) = (self.clone(), env_hub.clone(), edit.clone());
            // A task of its own, so that a caller that goes away (an HTTP client hanging up)
            // cannot leave a committed change unapplied; compiling (regular expressions) runs
            // on the blocking pool.
            let task = tokio::spawn(async move {
                let hist = hub_env.clone();
                let (write, expect) =
                    tokio::task::spawn_blocking(move || hist.with_history(|h| edit_.prepare(h)))
                        .await
                        .map_err(internal)??;
                let committed = this.store.commit(hub_env.name(), write, expect).await?;
                this.deliver(&hub_env, &committed).await?;
                Ok::<_, ControlError>(committed)
            });
            match task.await.map_err(internal)? {
                Err(ControlError::Store(StoreError::Conflict { version, .. }))
                    if attempt < MAX_ATTEMPTS =>
                {
                    // Validate again against the state that won, once the hub has it.
                    attempt += 1;
                    if env_hub.selector().version < version {
                        self.catch_up(&env_hub).await?;
                    }
                }
                result => return result,
            }
        }
    }

    /// Applies a committed entry to the hub, and returns once the hub holds it.
    async fn deliver(&self, env: &EnvHub, committed: &Committed) -> Result<(), ControlError> {
        match env.apply(committed.epoch, committed.change.clone()) {
            Applied::Now | Applied::Already | Applied::OtherEpoch => Ok(()),
            // An earlier entry has not reached the hub (another writer is about to deliver
            // it, or this node missed it): read it from the log rather than wait.
            Applied::Parked { .. } => self.catch_up(env).await,
        }
    }

    /// Applies the log from the hub's version on.
    async fn catch_up(&self, env: &EnvHub) -> Result<(), ControlError> {
        loop {
            let at = env.selector().version;
            let tail = self
                .store
                .changes_since(env.name(), at, CATCH_UP_BATCH)
                .await?;
            if tail.changes.is_empty() {
                return Ok(());
            }
            for change in tail.changes {
                if env.apply(tail.epoch, change) == Applied::OtherEpoch {
                    return Ok(()); // the environment was deleted and created again
                }
            }
        }
    }

    /// Creates an SDK key; the secret is returned once and stored only as a hash.
    pub async fn create_key(&self, env: &str, kind: KeyKind) -> Result<NewKey, ControlError> {
        let key = keys::mint(env, kind, unix_now());
        let _order = self.lifecycle.lock().await;
        self.store.create_key(&key.record).await?;
        self.hub.add_key(&key.record);
        Ok(key)
    }

    /// Revokes a key; its sessions end.
    pub async fn revoke_key(&self, env: &str, id: &str) -> Result<KeyRecord, ControlError> {
        let _order = self.lifecycle.lock().await;
        let record = self.store.revoke_key(env, id).await?;
        self.hub.revoke_key(id);
        Ok(record)
    }

    /// Every key of an environment.
    pub async fn keys(&self, env: &str) -> Result<Vec<KeyRecord>, ControlError> {
        Ok(self.store.keys(env).await?)
    }

    /// Flushes the store for a clean shutdown.
    pub async fn close(&self) -> Result<(), ControlError> {
        Ok(self.store.close().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    async fn control() -> (Arc<Control>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("vane.db")).unwrap();
        let control = Control::new(Arc::new(store), Arc::new(Hub::new(100)));
        control.load().await.unwrap();
        control.create_env("e").await.unwrap();
        (control, dir)
    }

    fn flag(key: &str) -> Edit {
        Edit::PutFlag(Flag::boolean(key, true, true))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_edits_all_land_once_each_in_consecutive_versions() {
        let (control, _dir) = control().await;
        control.edit("e", flag("f")).await.unwrap();
        // Toggles are read-modify-writes of one flag: concurrent ones conflict and retry.
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let c = control.clone();
                tokio::spawn(async move {
                    let edit = if i % 3 == 0 {
                        flag(&format!("g{i}"))
                    } else {
                        Edit::Toggle {
                            key: "f".into(),
                            on: i % 2 == 0,
                        }
                    };
                    c.edit("e", edit).await.unwrap().change.version
                })
            })
            .collect();
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap());
        }
        versions.sort_unstable();
        assert_eq!(versions, (2..=13).collect::<Vec<_>>());
        let env = control.hub().env("e").unwrap();
        assert_eq!(env.selector().version, 13, "the hub holds every entry");
        assert_eq!(env.with_history(|h| h.flags().count()), 5);
    }

    #[tokio::test]
    async fn a_toggle_shares_the_compiled_rules_of_the_version_it_replaces() {
        let (control, _dir) = control().await;
        let flag: Flag = serde_json::from_str(
            r#"{"key": "f", "on": true, "variants": {"a": 1, "b": 2}, "off_variant": "a",
                "rules": [{"clauses": [{"attribute": "email", "op": "matches", "values": ["@vane[.]dev$"]}],
                           "serve": {"variant": "b"}}],
                "fallthrough": {"variant": "a"}}"#,
        )
        .unwrap();
        control.edit("e", Edit::PutFlag(flag)).await.unwrap();
        let env = control.hub().env("e").unwrap();
        let before = env.with_history(|h| h.flag("f").unwrap().clone());
        let toggle = Edit::Toggle {
            key: "f".into(),
            on: false,
        };
        control.edit("e", toggle).await.unwrap();
        let after = env.with_history(|h| h.flag("f").unwrap().clone());
        assert!(!after.compiled.flag().on);
        assert!(after.compiled.shares_rules_with(&before.compiled));
    }

    #[tokio::test]
    async fn a_segment_in_use_cannot_be_deleted_and_references_must_exist() {
        let (control, _dir) = control().await;
        let seg: Segment = serde_json::from_str(r#"{"key": "s", "included": ["u"]}"#).unwrap();
        let uses: Flag = serde_json::from_str(
            r#"{"key": "f", "on": true, "variants": {"a": 1, "b": 2}, "off_variant": "a",
                "rules": [{"clauses": [{"op": "in_segment", "values": ["s"]}], "serve": {"variant": "b"}}],
                "fallthrough": {"variant": "a"}}"#,
        )
        .unwrap();
        let missing = control.edit("e", Edit::PutFlag(uses.clone())).await;
        assert!(
            matches!(missing, Err(ControlError::Invalid(_))),
            "{missing:?}"
        );
        control.edit("e", Edit::PutSegment(seg)).await.unwrap();
        control.edit("e", Edit::PutFlag(uses)).await.unwrap();
        let in_use = control.edit("e", Edit::DeleteSegment("s".into())).await;
        assert!(
            matches!(in_use, Err(ControlError::InUse { .. })),
            "{in_use:?}"
        );
        control
            .edit("e", Edit::DeleteFlag("f".into()))
            .await
            .unwrap();
        control
            .edit("e", Edit::DeleteSegment("s".into()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_hub_that_missed_entries_reads_them_back_from_the_log() {
        let (control, dir) = control().await;
        // A second hub on the same store, which sees none of the first one's writes: as a
        // second node would, before it tails the log.
        let other = Control::new(
            Arc::new(SqliteStore::open(&dir.path().join("vane.db")).unwrap()),
            Arc::new(Hub::new(100)),
        );
        other.load().await.unwrap();
        for i in 0..3 {
            control.edit("e", flag(&format!("f{i}"))).await.unwrap();
        }
        let env = other.hub().env("e").unwrap();
        assert_eq!(env.selector().version, 0);
        // Its own write lands after the three it never saw: it reads them back first.
        let committed = other.edit("e", flag("mine")).await.unwrap();
        assert_eq!(committed.change.version, 4);
        assert_eq!(env.selector().version, 4);
        assert_eq!(env.with_history(|h| h.flags().count()), 4);
    }
}
