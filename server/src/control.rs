//! The write path behind the admin API: validate, commit to the store, then apply to the hub.
//!
//! The store sits behind one mutex, and the hub is updated before that mutex is released, so
//! the hub (and so every session) sees versions in exactly the order they were committed, and a
//! read-modify-write such as a toggle, or a check that a segment is unused, cannot race another
//! change. Each flag or segment is compiled once per change, with its new version. SQLite calls
//! run on the blocking pool.

use std::sync::Arc;

use parking_lot::Mutex;
use vane_core::history::{EnvHistory, Item, ItemKind};
use vane_core::model::{Flag, Segment, ValidationError, check_segment_graph, validate_name};
use vane_core::state::Selector;

use crate::hub::{EnvHub, Hub, hash_secret};
use crate::store::{KeyKind, KeyRecord, Store, StoreError, unix_now};

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
    /// A blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A newly created SDK key: the record, and the secret, which is never shown again.
#[derive(Debug, serde::Serialize)]
pub struct NewKey {
    /// The stored record.
    #[serde(flatten)]
    pub record: KeyRecord,
    /// The secret to configure the SDK with.
    pub secret: String,
}

/// A committed change: where it put the environment, and when (Unix nanoseconds, taken after
/// the store committed and before any session could see it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The environment's selector after the change.
    pub selector: Selector,
    /// When the store committed it.
    pub at_unix_ns: u128,
}

/// Store and hub, written together.
#[derive(Debug)]
pub struct Control {
    store: Mutex<Store>,
    hub: Arc<Hub>,
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

impl Control {
    /// Joins a store and the hub it feeds.
    pub fn new(store: Store, hub: Arc<Hub>) -> Arc<Control> {
        Arc::new(Control {
            store: Mutex::new(store),
            hub,
        })
    }

    /// The hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Store, &Hub) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = this.store.lock();
            f(&mut store, &this.hub)
        })
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))?
    }

    /// Loads the store into the hub and marks it ready.
    pub async fn load(self: &Arc<Self>) -> Result<(), ControlError> {
        let window = self.hub.window();
        self.blocking(move |store, hub| {
            let envs = store.load(window)?;
            let keys = store.active_keys()?;
            hub.load(envs, keys);
            Ok(())
        })
        .await
    }

    /// Creates an environment.
    pub async fn create_env(self: &Arc<Self>, name: String) -> Result<Selector, ControlError> {
        validate_name("name", &name)?;
        self.blocking(move |store, hub| {
            let selector = store.create_env(&name)?;
            hub.add_env(&name, selector);
            Ok(selector)
        })
        .await
    }

    /// Deletes an environment, its flags, segments and keys; its sessions end.
    pub async fn delete_env(self: &Arc<Self>, name: String) -> Result<(), ControlError> {
        self.blocking(move |store, hub| {
            store.delete_env(&name)?;
            hub.remove_env(&name);
            Ok(())
        })
        .await
    }

    /// Creates or replaces a flag. Its segment references must name existing segments.
    pub async fn put_flag(
        self: &Arc<Self>,
        env: String,
        flag: Flag,
    ) -> Result<Committed, ControlError> {
        self.blocking(move |store, hub| {
            let env_hub = env_of(hub, &env)?;
            env_hub.with_history(|h| {
                check_segment_graph(None, flag.segment_refs(), &|k| segment_refs_in(h, k))
            })?;
            commit(store, &env_hub, Change::Flag(flag))
        })
        .await
    }

    /// Deletes a flag.
    pub async fn delete_flag(
        self: &Arc<Self>,
        env: String,
        key: String,
    ) -> Result<Committed, ControlError> {
        self.blocking(move |store, hub| {
            commit(
                store,
                &*env_of(hub, &env)?,
                Change::Delete(ItemKind::Flag, key),
            )
        })
        .await
    }

    /// Turns a flag on or off. Toggling to the state it already has still commits a version,
    /// so the caller always gets the version at which the flag has the asked state.
    pub async fn toggle(
        self: &Arc<Self>,
        env: String,
        key: String,
        on: bool,
    ) -> Result<Committed, ControlError> {
        self.blocking(move |store, hub| {
            let env_hub = env_of(hub, &env)?;
            let mut flag = env_hub
                .with_history(|h| h.flag(&key).map(|e| e.compiled.flag().clone()))
                .ok_or_else(|| StoreError::FlagNotFound(key.clone()))?;
            flag.on = on;
            commit(store, &env_hub, Change::Flag(flag))
        })
        .await
    }

    /// Creates or replaces a segment. Its references must exist and must not lead back to it.
    pub async fn put_segment(
        self: &Arc<Self>,
        env: String,
        segment: Segment,
    ) -> Result<Committed, ControlError> {
        self.blocking(move |store, hub| {
            let env_hub = env_of(hub, &env)?;
            env_hub.with_history(|h| {
                check_segment_graph(Some(&segment.key), segment.segment_refs(), &|k| {
                    segment_refs_in(h, k)
                })
            })?;
            commit(store, &env_hub, Change::Segment(segment))
        })
        .await
    }

    /// Deletes a segment that no flag or other segment uses.
    pub async fn delete_segment(
        self: &Arc<Self>,
        env: String,
        key: String,
    ) -> Result<Committed, ControlError> {
        self.blocking(move |store, hub| {
            let env_hub = env_of(hub, &env)?;
            let users = env_hub.with_history(|h| {
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
                flags.chain(segments).collect::<Vec<_>>()
            });
            if !users.is_empty() {
                return Err(ControlError::InUse {
                    segment: key,
                    users: users.join(", "),
                });
            }
            commit(store, &env_hub, Change::Delete(ItemKind::Segment, key))
        })
        .await
    }

    /// Creates an SDK key; the secret is returned once and stored only as a hash.
    pub async fn create_key(
        self: &Arc<Self>,
        env: String,
        kind: KeyKind,
    ) -> Result<NewKey, ControlError> {
        let tag = match kind {
            KeyKind::Server => "srv",
            KeyKind::Mobile => "mob",
        };
        let secret = format!("vane_{tag}_{}", hex::encode(rand::random::<[u8; 16]>()));
        let record = KeyRecord {
            id: format!("key_{}", hex::encode(rand::random::<[u8; 6]>())),
            env,
            kind,
            prefix: secret[..14].to_owned(),
            hash: hex::encode(hash_secret(&secret)),
            created_at: unix_now(),
            revoked_at: None,
        };
        self.blocking(move |store, hub| {
            store.create_key(&record)?;
            hub.add_key(&record);
            Ok(NewKey { record, secret })
        })
        .await
    }

    /// Revokes a key; its sessions end.
    pub async fn revoke_key(
        self: &Arc<Self>,
        env: String,
        id: String,
    ) -> Result<KeyRecord, ControlError> {
        self.blocking(move |store, hub| {
            let record = store.revoke_key(&env, &id)?;
            hub.revoke_key(&id);
            Ok(record)
        })
        .await
    }

    /// Every key of an environment.
    pub async fn keys(self: &Arc<Self>, env: String) -> Result<Vec<KeyRecord>, ControlError> {
        self.blocking(move |store, _| Ok(store.keys(&env)?)).await
    }

    /// Flushes the store for a clean shutdown.
    pub async fn close(self: &Arc<Self>) -> Result<(), ControlError> {
        self.blocking(|store, _| Ok(store.checkpoint()?)).await
    }
}

fn env_of(hub: &Hub, env: &str) -> Result<Arc<EnvHub>, ControlError> {
    hub.env(env)
        .ok_or_else(|| StoreError::EnvNotFound(env.to_owned()).into())
}

/// One change to commit. A written flag or segment gets the new version before it is compiled.
enum Change {
    Flag(Flag),
    Segment(Segment),
    Delete(ItemKind, String),
}

/// Compiles, commits and applies one change, under the store lock.
fn commit(store: &mut Store, env_hub: &EnvHub, change: Change) -> Result<Committed, ControlError> {
    // The store and the hub advance together under this lock, so the next version is known.
    let version = env_hub.with_history(EnvHistory::next_version);
    let (kind, key, item) = match change {
        Change::Flag(mut f) => {
            f.version = version;
            (ItemKind::Flag, f.key.clone(), Some(Item::flag(f)?))
        }
        Change::Segment(mut s) => {
            s.version = version;
            (ItemKind::Segment, s.key.clone(), Some(Item::segment(s)?))
        }
        Change::Delete(kind, key) => (kind, key, None),
    };
    let body = match &item {
        Some(Item::Flag(e)) => Some(serde_json::to_value(e.compiled.flag())),
        Some(Item::Segment(e)) => Some(serde_json::to_value(e.compiled.segment())),
        None => None,
    }
    .transpose()
    .map_err(|e| ControlError::Internal(e.to_string()))?;
    let committed = store.commit_item(env_hub.name(), kind, &key, body)?;
    if committed.version != version {
        return Err(ControlError::Internal(format!(
            "store at version {} but the hub expected {version}; restart the server to reload",
            committed.version
        )));
    }
    let at_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    env_hub.apply(kind, key, item, committed);
    Ok(Committed {
        selector: committed,
        at_unix_ns,
    })
}
