//! The in-memory hub: every environment's current state and recent history, the SDK keys, and
//! the fan-out of changes to sessions.
//!
//! Each change is encoded once per environment, as one `Delta` frame and one `Notice` frame,
//! and published through a `watch` channel: a session that is keeping up writes those shared
//! bytes as they are; a session that missed some (because it was slow to write) sees only the
//! latest and is brought current with one merged delta from the history. Nothing queues per
//! session, so a peer that does not read cannot grow the server's memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vane_core::client::Transport;
use vane_core::history::{EnvHistory, Item, ItemKind};
use vane_core::state::Selector;
use vane_proto::codec;
use vane_proto::v1 as pb;

use crate::store::{KeyKind, KeyRecord, LoadedEnv};

/// The latest change of an environment, encoded once for every session.
#[derive(Debug, Clone)]
pub struct Published {
    /// The environment's selector after the change.
    pub selector: Selector,
    /// `Delta` from `selector.version - 1`, length-prefixed; empty before the first change.
    pub delta: Bytes,
    /// `Notice` at `selector`, length-prefixed.
    pub notice: Bytes,
}

/// One environment in memory.
#[derive(Debug)]
pub struct EnvHub {
    name: String,
    history: RwLock<EnvHistory>,
    published: watch::Sender<Published>,
    /// Cancelled when the environment is deleted: its sessions end.
    deleted: CancellationToken,
    propagation: Mutex<Propagation>,
}

/// How far an environment's versions have reached, from the sessions' acks.
#[derive(Debug, Default)]
struct Propagation {
    /// Session id → the version it last acked.
    acked: HashMap<u64, u64>,
}

/// What `/api/v1/environments/{env}/propagation` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PropagationReport {
    /// The environment's version.
    pub version: u64,
    /// Live sessions that have acked at least once.
    pub sessions: usize,
    /// Of those, how many hold the current version.
    pub current: usize,
    /// Acked version → how many sessions hold it.
    pub by_version: BTreeMap<u64, usize>,
}

impl EnvHub {
    fn new(name: String, history: EnvHistory) -> Arc<EnvHub> {
        let published = publish(&history, None);
        Arc::new(EnvHub {
            name,
            history: RwLock::new(history),
            published: watch::channel(published).0,
            deleted: CancellationToken::new(),
            propagation: Mutex::new(Propagation::default()),
        })
    }

    /// The environment's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current selector.
    pub fn selector(&self) -> Selector {
        self.history.read().selector()
    }

    /// Reads the state under the lock.
    pub fn with_history<T>(&self, f: impl FnOnce(&EnvHistory) -> T) -> T {
        f(&self.history.read())
    }

    /// The frame that brings a client at `client` current, and the selector it brings it to.
    pub fn catch_up(&self, client: Option<Selector>) -> (pb::Frame, Selector) {
        let history = self.history.read();
        (history.catch_up(client), history.selector())
    }

    /// Subscribes to published changes; the current one counts as seen.
    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.published.subscribe()
    }

    /// Resolves when the environment is deleted.
    pub fn deleted(&self) -> &CancellationToken {
        &self.deleted
    }

    /// Applies a committed change (the store has already made it `version`) and publishes it.
    pub fn apply(&self, kind: ItemKind, key: String, item: Option<Item>, committed: Selector) {
        let mut history = self.history.write();
        let delta = history.apply(kind, key, item);
        debug_assert_eq!(
            history.selector(),
            committed,
            "hub and store disagree on versions"
        );
        let published = publish(&history, Some(delta));
        // Publish under the lock so sessions never see versions out of order.
        self.published.send_replace(published);
    }

    /// Records that `session` acked `version`.
    pub fn ack(&self, session: u64, version: u64) {
        self.propagation.lock().acked.insert(session, version);
    }

    /// Forgets a session that ended.
    pub fn session_ended(&self, session: u64) {
        self.propagation.lock().acked.remove(&session);
    }

    /// Where the environment's versions have reached.
    pub fn propagation(&self) -> PropagationReport {
        let version = self.selector().version;
        let p = self.propagation.lock();
        let mut by_version = BTreeMap::new();
        for v in p.acked.values() {
            *by_version.entry(*v).or_insert(0) += 1;
        }
        PropagationReport {
            version,
            sessions: p.acked.len(),
            current: by_version.get(&version).copied().unwrap_or(0),
            by_version,
        }
    }
}

fn publish(history: &EnvHistory, delta: Option<pb::Delta>) -> Published {
    let selector = history.selector();
    Published {
        selector,
        delta: delta.map(|d| codec::encode(&d.into())).unwrap_or_default(),
        notice: codec::encode(
            &pb::Notice {
                selector: Some(selector.into()),
            }
            .into(),
        ),
    }
}

/// What a valid SDK key grants.
#[derive(Debug)]
pub struct Grant {
    /// The key's public id.
    pub id: String,
    /// Its environment.
    pub env: String,
    /// Server or mobile.
    pub kind: KeyKind,
    /// Cancelled when the key is revoked: its sessions end.
    pub revoked: CancellationToken,
}

/// All environments and keys in memory.
#[derive(Debug)]
pub struct Hub {
    envs: RwLock<HashMap<String, Arc<EnvHub>>>,
    /// SHA-256 of the secret → grant.
    keys: RwLock<HashMap<[u8; 32], Arc<Grant>>>,
    ready: AtomicBool,
    next_session: AtomicU64,
    /// Live sessions: QUIC, TCP.
    sessions: [AtomicUsize; 2],
    window: usize,
}

/// Counts a live session until dropped.
#[derive(Debug)]
pub struct SessionCount<'a>(&'a AtomicUsize);

impl Drop for SessionCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// SHA-256 of an SDK key secret. Secrets carry 128 random bits, so a fast hash is enough.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Hub {
    /// An empty hub that is not ready; each environment keeps `window` changes for resumption.
    pub fn new(window: usize) -> Hub {
        Hub {
            envs: RwLock::default(),
            keys: RwLock::default(),
            ready: AtomicBool::new(false),
            next_session: AtomicU64::new(1),
            sessions: Default::default(),
            window,
        }
    }

    /// Installs the loaded state and marks the hub ready.
    pub fn load(&self, envs: Vec<LoadedEnv>, keys: Vec<KeyRecord>) {
        {
            let mut map = self.envs.write();
            for env in envs {
                let history = EnvHistory::new(env.selector, env.items, env.changes, self.window);
                map.insert(env.name.clone(), EnvHub::new(env.name, history));
            }
        }
        for key in keys {
            self.add_key(&key);
        }
        self.ready.store(true, Ordering::Release);
    }

    /// How many changes each environment keeps for resumption.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Whether the state is loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Counts a session on `transport` while the returned guard lives.
    pub fn count_session(&self, transport: Transport) -> SessionCount<'_> {
        let counter = &self.sessions[transport as usize];
        counter.fetch_add(1, Ordering::Relaxed);
        SessionCount(counter)
    }

    /// Live sessions per transport.
    pub fn session_counts(&self) -> [(Transport, usize); 2] {
        [Transport::Quic, Transport::Tcp]
            .map(|t| (t, self.sessions[t as usize].load(Ordering::Relaxed)))
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The environment with this name.
    pub fn env(&self, name: &str) -> Option<Arc<EnvHub>> {
        self.envs.read().get(name).cloned()
    }

    /// Every environment, by name.
    pub fn envs(&self) -> Vec<Arc<EnvHub>> {
        let mut envs: Vec<_> = self.envs.read().values().cloned().collect();
        envs.sort_by(|a, b| a.name.cmp(&b.name));
        envs
    }

    /// Adds a newly created environment.
    pub fn add_env(&self, name: &str, selector: Selector) {
        let history = EnvHistory::new(selector, [], [], self.window);
        self.envs
            .write()
            .insert(name.to_owned(), EnvHub::new(name.to_owned(), history));
    }

    /// Removes an environment and ends its sessions and keys.
    pub fn remove_env(&self, name: &str) {
        if let Some(env) = self.envs.write().remove(name) {
            env.deleted.cancel();
        }
        self.keys.write().retain(|_, grant| {
            let keep = grant.env != name;
            if !keep {
                grant.revoked.cancel();
            }
            keep
        });
    }

    /// Makes a key usable.
    pub fn add_key(&self, key: &KeyRecord) {
        if key.revoked_at.is_some() {
            return;
        }
        let Some(hash) = hex::decode(&key.hash)
            .ok()
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
        else {
            tracing::warn!(id = %key.id, "ignoring SDK key with an unreadable hash");
            return;
        };
        let grant = Grant {
            id: key.id.clone(),
            env: key.env.clone(),
            kind: key.kind,
            revoked: CancellationToken::new(),
        };
        self.keys.write().insert(hash, Arc::new(grant));
    }

    /// Revokes a key and ends its sessions.
    pub fn revoke_key(&self, id: &str) {
        self.keys.write().retain(|_, grant| {
            let keep = grant.id != id;
            if !keep {
                grant.revoked.cancel();
            }
            keep
        });
    }

    /// The grant of an SDK key secret, if it is valid.
    pub fn authenticate(&self, secret: &str) -> Option<Arc<Grant>> {
        self.keys.read().get(&hash_secret(secret)).cloned()
    }
}
