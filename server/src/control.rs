//! The write path behind the admin API: validate, commit to the store, then apply to the hub.
//!
//! The store sits behind one mutex, and the hub is updated before that mutex is released, so
//! the hub (and so every session) sees versions in exactly the order they were committed, and a
//! read-modify-write such as a toggle cannot lose a concurrent change. SQLite calls run on the
//! blocking pool.

use std::sync::Arc;

use parking_lot::Mutex;
use vane_core::model::{Flag, ValidationError, validate_name};
use vane_core::state::Selector;

use crate::hub::{Hub, hash_secret};
use crate::store::{KeyKind, KeyRecord, Store, StoreError, unix_now};

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The request is invalid; names the field.
    #[error("{0}")]
    Invalid(#[from] ValidationError),
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

/// Store and hub, written together.
#[derive(Debug)]
pub struct Control {
    store: Mutex<Store>,
    hub: Arc<Hub>,
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

    /// Deletes an environment, its flags and keys; its sessions end.
    pub async fn delete_env(self: &Arc<Self>, name: String) -> Result<(), ControlError> {
        self.blocking(move |store, hub| {
            store.delete_env(&name)?;
            hub.remove_env(&name);
            Ok(())
        })
        .await
    }

    /// Creates or replaces a flag. The key in the body, if any, must match `key`.
    pub async fn put_flag(
        self: &Arc<Self>,
        env: String,
        mut flag: Flag,
    ) -> Result<Selector, ControlError> {
        flag.version = 0;
        flag.validate()?;
        self.commit(env, flag.key.clone(), Some(flag)).await
    }

    /// Deletes a flag.
    pub async fn delete_flag(
        self: &Arc<Self>,
        env: String,
        key: String,
    ) -> Result<Selector, ControlError> {
        self.commit(env, key, None).await
    }

    /// Turns a flag on or off. Toggling to the state it already has still commits a version,
    /// so the caller always gets the version at which the flag has the asked state.
    pub async fn toggle(
        self: &Arc<Self>,
        env: String,
        key: String,
        on: bool,
    ) -> Result<Selector, ControlError> {
        self.blocking(move |store, hub| {
            let env_hub = hub
                .env(&env)
                .ok_or_else(|| StoreError::EnvNotFound(env.clone()))?;
            let mut flag = env_hub
                .with_history(|h| h.get(&key).map(|e| e.flag.clone()))
                .ok_or_else(|| StoreError::FlagNotFound(key.clone()))?;
            flag.on = on;
            let selector = store.commit_flag(&env, &key, Some(&flag))?;
            env_hub.apply(key, Some(flag), selector);
            Ok(selector)
        })
        .await
    }

    async fn commit(
        self: &Arc<Self>,
        env: String,
        key: String,
        flag: Option<Flag>,
    ) -> Result<Selector, ControlError> {
        self.blocking(move |store, hub| {
            let selector = store.commit_flag(&env, &key, flag.as_ref())?;
            if let Some(env_hub) = hub.env(&env) {
                env_hub.apply(key, flag, selector);
            }
            Ok(selector)
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
