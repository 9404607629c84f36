//! The in-memory hub: every environment's current state and recent history, the SDK keys, and
//! the fan-out of changes to sessions.
//!
//! The hub advances only by committed log entries ([`EnvHub::apply`]), in version order,
//! whoever delivers them: the node's own writes, or (for a node that missed some) the log read
//! back from the store. Each change is encoded once per environment, as one `Delta` frame and
//! one `Notice` frame, and published through a `watch` channel: a session that is keeping up
//! writes those shared bytes as they are; a session that missed some (because it was slow to
//! write) sees only the latest and is brought current with one merged delta from the history.
//! Nothing queues per session, so a peer that does not read cannot grow the server's memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use vane_core::history::{Change, EnvHistory, Item, ItemKind};
use vane_core::protocol::{Selector, Transport};
use vane_proto::codec;
use vane_proto::v1 as pb;

use crate::keys::{self, KeyKind, KeyRecord, SecretHash};
use crate::store::{EnvState, JobRecord, Loaded, LoadedEnv, Retention, TokenRecord};

/// Entries ahead of a gap that an environment keeps while it waits for the missing ones.
const MAX_PARKED: usize = 1024;

/// The latest change of an environment, encoded once for every session.
#[derive(Debug, Clone)]
pub struct Published {
    /// The environment's selector after the change.
    pub selector: Selector,
    /// `Delta` from `selector.version - 1`, length-prefixed; empty before the first change.
    pub delta: Bytes,
    /// `Notice` at `selector`, length-prefixed.
    pub notice: Bytes,
    /// The environment's SDK keys in force, as the `Keys` frame relays are sent,
    /// length-prefixed.
    pub keys: Bytes,
    /// Rises by one whenever `keys` changes.
    pub keys_generation: u64,
}

/// What [`EnvHub::apply`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied (with any entries it was the gap before).
    Now,
    /// The hub already holds it.
    Already,
    /// Ahead of a gap: kept until the entries before it arrive. The hub is at `at`.
    Parked {
        /// The version the hub holds.
        at: u64,
    },
    /// It belongs to another incarnation of the environment (deleted and created again).
    OtherEpoch,
}

/// One environment in memory.
#[derive(Debug)]
pub struct EnvHub {
    name: String,
    data: RwLock<EnvData>,
    published: watch::Sender<Published>,
    propagation: Mutex<Propagation>,
    /// See [`EnvHub::activity`].
    activity: AtomicU64,
    lifecycle: RwLock<Lifecycle>,
    retention: Mutex<Retention>,
}

/// Where an environment is in its life, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    /// Ready, creating or failed.
    pub state: EnvState,
    /// The clone filling it (while creating, or the one that failed).
    pub job: Option<String>,
    /// Items copied so far, of `total`.
    pub copied: u64,
    /// Items to copy.
    pub total: u64,
    /// Why its clone failed.
    pub error: Option<String>,
}

impl Lifecycle {
    /// A ready environment.
    pub fn ready() -> Lifecycle {
        Lifecycle {
            state: EnvState::Ready,
            job: None,
            copied: 0,
            total: 0,
            error: None,
        }
    }

    /// An environment in `state`, with the newest of `jobs` that fills `env` (while creating,
    /// or the one that failed).
    pub fn of(state: EnvState, env: &str, jobs: &[JobRecord]) -> Lifecycle {
        let job = (state != EnvState::Ready)
            .then(|| jobs.iter().rev().find(|j| j.target == env))
            .flatten();
        Lifecycle {
            state,
            job: job.map(|j| j.id.clone()),
            copied: job.map_or(0, |j| j.copied),
            total: job.map_or(0, |j| j.total),
            error: job.and_then(|j| j.error.clone()),
        }
    }

    /// Why sessions and SDK requests are refused, or `None` when it is served.
    pub fn not_serving(&self, env: &str) -> Option<String> {
        match self.state {
            EnvState::Ready => None,
            EnvState::Creating => Some(format!(
                "environment {env:?} is being created ({} of {} items copied); retry shortly",
                self.copied, self.total
            )),
            EnvState::Failed => Some(format!(
                "environment {env:?} failed to be created ({}); retry its clone or delete it",
                self.error.as_deref().unwrap_or("no reason recorded")
            )),
        }
    }
}

#[derive(Debug)]
struct EnvData {
    history: EnvHistory,
    /// Entries that arrived ahead of a gap, by version.
    parked: BTreeMap<u64, Change>,
    /// The `Keys` frame of the environment's keys in force, and how often it changed.
    keys: (Bytes, u64),
}

impl EnvData {
    /// What sessions are handed now, with `delta` the one from the version before (`None`:
    /// sessions bring themselves current from the history).
    fn publish(&self, delta: Option<pb::Delta>) -> Published {
        let selector = self.history.selector();
        Published {
            selector,
            delta: delta.map(|d| codec::encode(&d.into())).unwrap_or_default(),
            notice: codec::encode(
                &pb::Notice {
                    selector: Some(selector.into()),
                }
                .into(),
            ),
            keys: self.keys.0.clone(),
            keys_generation: self.keys.1,
        }
    }
}

/// How far an environment's versions have reached, from the sessions' acks; and who the
/// sessions are, and how each recent change spread through them (the console's live view).
#[derive(Debug, Default)]
struct Propagation {
    /// Session id → the version it last acked.
    acked: HashMap<u64, u64>,
    /// Session id → what it said in Hello, and when, from Hello until it ends.
    sessions: HashMap<u64, (Arc<SessionMeta>, Instant)>,
    /// The newest changes, oldest first, with the acks each has had.
    changes: VecDeque<ChangeTrack>,
}

/// Changes whose spread the live view shows.
const TRACKED_CHANGES: usize = 20;

/// Who a session is, as its Hello and transport say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMeta {
    /// `quic` or `tcp`.
    pub transport: &'static str,
    /// The platform it named, e.g. `linux-x86_64`, `android`.
    pub platform: String,
    /// SDK name and version, e.g. `vane-rust 0.1.0`.
    pub sdk: String,
}

/// One recent change and the sessions that have acknowledged it.
#[derive(Debug)]
struct ChangeTrack {
    version: u64,
    at: Instant,
    unix_ms: u64,
    /// Sessions live when it was applied.
    sessions: usize,
    /// Milliseconds after the change at which each ack holding it arrived, in order, from the
    /// sessions live when it was applied (a session that came later got it in its catch-up:
    /// that is not the change spreading).
    acks: Vec<u32>,
}

/// The live view of an environment: its sessions, and how its recent changes spread.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LiveReport {
    /// The environment's version.
    pub version: u64,
    /// Live sessions.
    pub sessions: usize,
    /// Sessions by transport.
    pub by_transport: BTreeMap<String, usize>,
    /// Sessions by platform.
    pub by_platform: BTreeMap<String, usize>,
    /// Sessions by SDK and version.
    pub by_sdk: BTreeMap<String, usize>,
    /// The newest changes, oldest first.
    pub changes: Vec<ChangeSpread>,
    /// Up to 20 sessions that hold an older version than the environment's.
    pub behind: Vec<Behind>,
}

/// How one change spread: `acked` is the curve, (ms after the change, sessions acked by then).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChangeSpread {
    /// The version the change made.
    pub version: u64,
    /// When it was applied here, Unix milliseconds.
    pub committed_at_ms: u64,
    /// Sessions live then.
    pub sessions: usize,
    /// Sessions that have acknowledged it.
    pub current: usize,
    /// (ms after the change, sessions acked by then), at most 64 points.
    pub acked: Vec<(u32, usize)>,
}

/// A session behind the environment's version.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Behind {
    /// Its id (as in the server's logs).
    pub session: String,
    /// `quic` or `tcp`.
    pub transport: &'static str,
    /// Its platform.
    pub platform: String,
    /// Its SDK.
    pub sdk: String,
    /// The version it last acked, if any.
    pub acked: Option<u64>,
}

/// Where an environment's versions have reached, from the acks of the live sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    fn new(
        name: String,
        history: EnvHistory,
        lifecycle: Lifecycle,
        retention: Retention,
    ) -> Arc<EnvHub> {
        let data = EnvData {
            history,
            parked: BTreeMap::new(),
            keys: (codec::encode(&pb::Keys::default().into()), 0),
        };
        let published = data.publish(None);
        Arc::new(EnvHub {
            lifecycle: RwLock::new(lifecycle),
            retention: Mutex::new(retention),
            name,
            data: RwLock::new(data),
            published: watch::channel(published).0,
            propagation: Mutex::new(Propagation::default()),
            activity: AtomicU64::new(0),
        })
    }

    /// The environment's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it is in its life.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle.read().clone()
    }

    /// Whether sessions and SDK requests are served (it is ready).
    pub fn is_serving(&self) -> bool {
        self.lifecycle.read().state == EnvState::Ready
    }

    /// Changes where it is in its life.
    pub fn set_lifecycle(&self, change: impl FnOnce(&mut Lifecycle)) {
        change(&mut self.lifecycle.write());
    }

    /// Its own retention.
    pub fn retention(&self) -> Retention {
        *self.retention.lock()
    }

    /// Sets its own retention.
    pub fn set_retention(&self, retention: Retention) {
        *self.retention.lock() = retention;
    }

    /// The current selector.
    pub fn selector(&self) -> Selector {
        self.data.read().history.selector()
    }

    /// Reads the state under the lock.
    pub fn with_history<T>(&self, f: impl FnOnce(&EnvHistory) -> T) -> T {
        f(&self.data.read().history)
    }

    /// The latest published change.
    pub fn published(&self) -> Published {
        self.published.borrow().clone()
    }

    /// Subscribes to published changes; the current one counts as seen.
    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.published.subscribe()
    }

    /// Applies a committed log entry of the incarnation `epoch`. Entries apply in version
    /// order whatever order they arrive in: one the hub holds is ignored, one ahead of a gap
    /// waits for the entries before it (see [`Applied`]).
    pub fn apply(&self, epoch: u64, change: Change) -> Applied {
        let mut state = self.data.write();
        let at = state.history.selector();
        if epoch != at.epoch {
            return Applied::OtherEpoch;
        }
        if change.version <= at.version {
            return Applied::Already;
        }
        if change.version > at.version + 1 {
            if state.parked.len() < MAX_PARKED {
                state.parked.insert(change.version, change);
            } else {
                warn!(env = %self.name, at = at.version, "too many log entries ahead of a gap; dropping one (it is read back from the store)");
            }
            return Applied::Parked { at: at.version };
        }
        let mut next = Some(change);
        while let Some(change) = next {
            let version = change.version;
            let delta = state.history.apply(change);
            self.track(version);
            // Published under the lock, so sessions never see versions out of order.
            self.published.send_replace(state.publish(Some(delta)));
            let want = state.history.next_version();
            next = state.parked.remove(&want);
        }
        // What is left parked (if anything) is ahead of a new gap; older entries are stale.
        let version = state.history.selector().version;
        state.parked.retain(|v, _| *v > version);
        Applied::Now
    }

    /// Replaces the state with `loaded` (same epoch, newer version): for a node that fell so
    /// far behind that the log no longer reaches back to it. Sessions catch up from the new
    /// state as from any push (a snapshot, when their version is older than the history
    /// window).
    pub fn reset(&self, loaded: LoadedEnv, window: usize) {
        let mut state = self.data.write();
        state.history = EnvHistory::new(loaded.selector, loaded.items, loaded.changes, window);
        state.parked.clear();
        self.published.send_replace(state.publish(None));
    }

    /// A relay's copy of an upstream environment: applies a delta its client applied, which
    /// follows the version held here. One change goes through [`EnvHub::apply`] (sessions right
    /// behind get the shared bytes); a merged span of versions is recorded as one
    /// ([`EnvHistory::apply_merged`]), and sessions bring themselves current from it.
    pub fn mirror(&self, delta: pb::Delta) -> Result<(), String> {
        let at = self.selector();
        if delta.epoch != at.epoch || delta.from_version != at.version {
            return Err(format!(
                "a delta from {:016x}/{} does not follow {:016x}/{}",
                delta.epoch, delta.from_version, at.epoch, at.version
            ));
        }
        if delta.to_version <= at.version {
            return Ok(());
        }
        let mut items = Vec::new();
        for flag in delta.upserts {
            let key = flag.key.clone();
            let flag = vane_core::model::Flag::try_from(flag).map_err(|e| e.to_string())?;
            items.push((
                ItemKind::Flag,
                key,
                Some(Item::flag(flag).map_err(|e| e.to_string())?),
            ));
        }
        for segment in delta.segment_upserts {
            let key = segment.key.clone();
            let segment = vane_core::model::Segment::from(segment);
            let item = Item::segment(segment).map_err(|e| e.to_string())?;
            items.push((ItemKind::Segment, key, Some(item)));
        }
        items.extend(delta.deletes.into_iter().map(|k| (ItemKind::Flag, k, None)));
        items.extend(
            delta
                .segment_deletes
                .into_iter()
                .map(|k| (ItemKind::Segment, k, None)),
        );
        if delta.to_version == at.version + 1 && items.len() == 1 {
            let (kind, key, item) = items.pop().expect("one item");
            let change = Change {
                version: delta.to_version,
                kind,
                key,
                item,
            };
            self.apply(at.epoch, change);
            return Ok(());
        }
        let mut state = self.data.write();
        state.history.apply_merged(delta.to_version, items);
        self.track(delta.to_version);
        self.published.send_replace(state.publish(None));
        Ok(())
    }

    /// Replaces the `Keys` frame relays are sent (nothing happens if it is the same).
    fn set_keys(&self, frame: Bytes) {
        let mut state = self.data.write();
        if state.keys.0 == frame {
            return;
        }
        state.keys = (frame, state.keys.1 + 1);
        self.published.send_replace(state.publish(None));
    }

    /// Records that `session` acked `version` (and, for the live view, which of the recent
    /// changes this ack is the first to hold).
    pub fn ack(&self, session: u64, version: u64) {
        let mut p = self.propagation.lock();
        let before = p.acked.insert(session, version).unwrap_or(0);
        let joined = p.sessions.get(&session).map(|(_, at)| *at);
        if let Some(joined) = joined
            && version > before
        {
            let now = Instant::now();
            for c in p.changes.iter_mut().rev() {
                if c.version <= before || c.at < joined {
                    break;
                }
                if c.version <= version {
                    let ms = now.saturating_duration_since(c.at).as_millis();
                    c.acks.push(u32::try_from(ms).unwrap_or(u32::MAX));
                }
            }
        }
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    /// A session said Hello.
    pub fn session_started(&self, session: u64, meta: SessionMeta) {
        self.propagation
            .lock()
            .sessions
            .insert(session, (Arc::new(meta), Instant::now()));
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets a session that ended.
    pub fn session_ended(&self, session: u64) {
        let mut p = self.propagation.lock();
        p.acked.remove(&session);
        p.sessions.remove(&session);
        drop(p);
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    /// Live sessions of this environment.
    pub fn session_count(&self) -> usize {
        self.propagation.lock().sessions.len()
    }

    /// Rises whenever something the live view shows changes (a session, an ack, a change).
    pub fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    /// Remembers a change just applied, for the live view.
    fn track(&self, version: u64) {
        let mut p = self.propagation.lock();
        let sessions = p.sessions.len();
        if p.changes.len() == TRACKED_CHANGES {
            p.changes.pop_front();
        }
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        p.changes.push_back(ChangeTrack {
            version,
            at: Instant::now(),
            unix_ms,
            sessions,
            acks: Vec::new(),
        });
        drop(p);
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    /// The live view: who is connected, and how the recent changes spread.
    pub fn live(&self) -> LiveReport {
        let version = self.selector().version;
        let p = self.propagation.lock();
        let (mut by_transport, mut by_platform, mut by_sdk) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for (meta, _) in p.sessions.values() {
            *by_transport.entry(meta.transport.to_owned()).or_insert(0) += 1;
            *by_platform.entry(meta.platform.clone()).or_insert(0) += 1;
            *by_sdk.entry(meta.sdk.clone()).or_insert(0) += 1;
        }
        let changes = p
            .changes
            .iter()
            .map(|c| {
                // The curve, thinned to at most 64 points (the last one always kept).
                let step = c.acks.len().div_ceil(64).max(1);
                let mut acked: Vec<(u32, usize)> = c
                    .acks
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (i + 1) % step == 0)
                    .map(|(i, ms)| (*ms, i + 1))
                    .collect();
                if let Some(last) = c.acks.last()
                    && acked.last().map(|(_, n)| *n) != Some(c.acks.len())
                {
                    acked.push((*last, c.acks.len()));
                }
                ChangeSpread {
                    version: c.version,
                    committed_at_ms: c.unix_ms,
                    sessions: c.sessions,
                    current: c.acks.len(),
                    acked,
                }
            })
            .collect();
        let mut behind: Vec<Behind> = p
            .sessions
            .iter()
            .filter_map(|(id, (meta, _))| {
                let acked = p.acked.get(id).copied();
                (acked.unwrap_or(0) < version).then(|| Behind {
                    session: format!("{id:x}"),
                    transport: meta.transport,
                    platform: meta.platform.clone(),
                    sdk: meta.sdk.clone(),
                    acked,
                })
            })
            .collect();
        behind.sort_by_key(|b| b.acked);
        behind.truncate(20);
        LiveReport {
            version,
            sessions: p.sessions.len(),
            by_transport,
            by_platform,
            by_sdk,
            changes,
            behind,
        }
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

/// Why a grant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// The key was revoked.
    Key,
    /// Its environment was deleted.
    Environment,
    /// A relay's upstream stopped serving the environment to the relay (its key there was
    /// revoked, or the environment deleted).
    Upstream,
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Revoked::Key => "SDK key revoked",
            Revoked::Environment => "environment deleted",
            Revoked::Upstream => "the relay's upstream no longer serves this environment",
        })
    }
}

/// What a valid SDK key grants, until it is revoked.
#[derive(Debug)]
pub struct Grant {
    /// The key's public id.
    pub id: String,
    /// Its environment.
    pub env: String,
    /// Server or mobile.
    pub kind: KeyKind,
    ended: CancellationToken,
    why: OnceLock<Revoked>,
}

impl Grant {
    fn new(record: &KeyRecord) -> Grant {
        Grant {
            id: record.id.clone(),
            env: record.env.clone(),
            kind: record.kind,
            ended: CancellationToken::new(),
            why: OnceLock::new(),
        }
    }

    /// Resolves when the grant ends: its sessions end with it.
    pub async fn ended(&self) {
        self.ended.cancelled().await
    }

    /// Why it ended, once it has.
    pub fn revoked(&self) -> Option<Revoked> {
        self.why.get().copied()
    }

    fn end(&self, why: Revoked) {
        let _ = self.why.set(why);
        self.ended.cancel();
    }
}

/// All environments and keys in memory.
#[derive(Debug)]
pub struct Hub {
    envs: RwLock<HashMap<String, Arc<EnvHub>>>,
    /// SHA-256 of the secret → grant.
    keys: RwLock<HashMap<SecretHash, Arc<Grant>>>,
    /// SHA-256 of a named admin token → its name.
    tokens: RwLock<HashMap<SecretHash, String>>,
    ready: AtomicBool,
    next_session: AtomicU64,
    /// Live sessions: QUIC, TCP.
    sessions: [AtomicUsize; 2],
    window: usize,
    /// With a store other nodes share: keys this node did not know when a client presented
    /// them, and when it first did (see [`Hub::authenticate_at`]).
    following: OnceLock<Following>,
}

/// What a node that follows others keeps about SDK keys it was shown but does not know.
#[derive(Debug)]
struct Following {
    /// How long a key unknown here may still be one just made on another node.
    grace: std::time::Duration,
    misses: Mutex<HashMap<SecretHash, Instant>>,
    /// Asks the follower to compare with the store now (a node on a shared store; a relay
    /// has nothing to ask: its keys arrive as its upstream sends them).
    wake: Option<Arc<tokio::sync::Notify>>,
}

/// At most this many unknown keys are remembered (more: the oldest memory is dropped, so a
/// flood of made-up keys costs bounded memory and at most one more grace each).
const MAX_KEY_MISSES: usize = 10_000;

/// Why [`Hub::authenticate_at`] did not grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMiss {
    /// Unknown or revoked.
    Unknown,
    /// Unknown here, but other nodes share the store and it may have been made on one of them
    /// a moment ago: retry shortly.
    NotYet,
}

/// Counts a live session until dropped.
#[derive(Debug)]
pub struct SessionCount<'a>(&'a AtomicUsize);

impl Drop for SessionCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hub {
    /// An empty hub that is not ready; each environment keeps `window` changes for resumption.
    pub fn new(window: usize) -> Hub {
        Hub {
            envs: RwLock::default(),
            keys: RwLock::default(),
            tokens: RwLock::default(),
            ready: AtomicBool::new(false),
            next_session: AtomicU64::new(1),
            sessions: Default::default(),
            window,
            following: OnceLock::new(),
        }
    }

    /// Marks the hub as one that learns of keys from elsewhere (one node of several on a shared
    /// store, or a relay): a key it does not know is, for `grace` after a client first shows
    /// it, answered "not yet" rather than "unknown", and `wake` (if any) is notified so the
    /// follower looks at the store at once.
    pub fn follow_with(&self, grace: std::time::Duration, wake: Option<Arc<tokio::sync::Notify>>) {
        let _ = self.following.set(Following {
            grace,
            misses: Mutex::new(HashMap::new()),
            wake,
        });
    }

    /// The grant of an SDK key secret at `now`; for a key this node does not know, whether it
    /// is unknown for good or may be one another node made a moment ago.
    pub fn authenticate_at(&self, secret: &str, now: Instant) -> Result<Arc<Grant>, KeyMiss> {
        let hash = keys::hash_secret(secret);
        if let Some(grant) = self.keys.read().get(&hash).cloned() {
            return Ok(grant);
        }
        let Some(following) = self.following.get() else {
            return Err(KeyMiss::Unknown);
        };
        let mut misses = following.misses.lock();
        if misses.len() >= MAX_KEY_MISSES {
            misses.retain(|_, first| now.saturating_duration_since(*first) < following.grace);
            if misses.len() >= MAX_KEY_MISSES {
                misses.clear();
            }
        }
        let first = *misses.entry(hash).or_insert(now);
        if now.saturating_duration_since(first) < following.grace {
            if let Some(wake) = &following.wake {
                wake.notify_one();
            }
            Err(KeyMiss::NotYet)
        } else {
            Err(KeyMiss::Unknown)
        }
    }

    /// Installs the loaded state and marks the hub ready.
    pub fn load(&self, loaded: Loaded) {
        {
            let mut map = self.envs.write();
            for env in loaded.envs {
                let hub = self.env_hub(env, &loaded.jobs);
                map.insert(hub.name.clone(), hub);
            }
        }
        {
            let mut map = self.keys.write();
            for key in loaded.keys.iter().filter(|k| k.revoked_at.is_none()) {
                map.insert(key.hash, Arc::new(Grant::new(key)));
            }
        }
        for env in self.envs() {
            self.refresh_keys(env.name());
        }
        for token in &loaded.tokens {
            self.add_token(token);
        }
        self.set_ready();
    }

    /// Marks the hub ready: sessions are served (a relay, once every environment it mirrors
    /// has arrived).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Rebuilds the `Keys` frame of `env` from the keys in force.
    fn refresh_keys(&self, env: &str) {
        let Some(hub) = self.env(env) else {
            return;
        };
        let mut keys: Vec<pb::SdkKey> = self
            .keys
            .read()
            .iter()
            .filter(|(_, g)| g.env == env)
            .map(|(hash, g)| pb::SdkKey {
                id: g.id.clone(),
                kind: match g.kind {
                    KeyKind::Server => pb::KeyKind::Server,
                    KeyKind::Mobile => pb::KeyKind::Mobile,
                }
                .into(),
                sha256: hash.to_vec(),
            })
            .collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        hub.set_keys(codec::encode(&pb::Keys { keys }.into()));
    }

    fn env_hub(&self, env: LoadedEnv, jobs: &[JobRecord]) -> Arc<EnvHub> {
        let LoadedEnv {
            name,
            selector,
            items,
            changes,
            state,
            retention,
        } = env;
        let history = EnvHistory::new(selector, items, changes, self.window);
        let lifecycle = Lifecycle::of(state, &name, jobs);
        EnvHub::new(name, history, lifecycle, retention)
    }

    /// Installs an environment another node created (or emptied under a new epoch), as loaded.
    pub fn install(&self, env: LoadedEnv, jobs: &[JobRecord]) {
        let hub = self.env_hub(env, jobs);
        let name = hub.name.clone();
        self.envs.write().insert(name.clone(), hub);
        self.refresh_keys(&name);
    }

    /// Makes the keys in force exactly `keys` (what the store holds, with what other nodes
    /// created and revoked): the grants of keys no longer among them end, new ones start.
    pub fn sync_keys(&self, keys: &[KeyRecord]) {
        self.sync_keys_where(keys, |_| true);
    }

    /// Makes the keys of `env` in force exactly `keys` (a relay, from its upstream's `Keys`).
    pub fn sync_env_keys(&self, env: &str, keys: &[KeyRecord]) {
        self.sync_keys_where(keys, |grant| grant.env == env);
    }

    /// Makes the keys in force among those `mine` covers exactly `keys`, and rebuilds the
    /// `Keys` frames of the environments whose keys changed.
    fn sync_keys_where(&self, keys: &[KeyRecord], mine: impl Fn(&Grant) -> bool) {
        let wanted: std::collections::HashSet<&SecretHash> = keys
            .iter()
            .filter(|k| k.revoked_at.is_none())
            .map(|k| &k.hash)
            .collect();
        let mut changed = std::collections::BTreeSet::new();
        {
            let mut map = self.keys.write();
            map.retain(|hash, grant| {
                let keep = !mine(grant) || wanted.contains(hash);
                if !keep {
                    grant.end(Revoked::Key);
                    changed.insert(grant.env.clone());
                }
                keep
            });
            for key in keys.iter().filter(|k| k.revoked_at.is_none()) {
                map.entry(key.hash).or_insert_with(|| {
                    changed.insert(key.env.clone());
                    Arc::new(Grant::new(key))
                });
            }
        }
        for env in changed {
            self.refresh_keys(&env);
        }
    }

    /// Makes the named admin tokens in force exactly `tokens`.
    pub fn sync_tokens(&self, tokens: &[TokenRecord]) {
        *self.tokens.write() = tokens
            .iter()
            .filter(|t| t.revoked_at.is_none())
            .map(|t| (t.hash, t.name.clone()))
            .collect();
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

    /// Adds a newly created environment (or replaces one that is not served, emptied under a
    /// new epoch, as a retried clone does).
    pub fn add_env(&self, name: &str, selector: Selector, lifecycle: Lifecycle) {
        let history = EnvHistory::new(selector, [], [], self.window);
        let env = EnvHub::new(name.to_owned(), history, lifecycle, Retention::default());
        self.envs.write().insert(name.to_owned(), env);
        self.refresh_keys(name);
    }

    /// Makes a named admin token usable (a revoked record is ignored).
    pub fn add_token(&self, token: &TokenRecord) {
        if token.revoked_at.is_none() {
            self.tokens.write().insert(token.hash, token.name.clone());
        }
    }

    /// Makes a named admin token unusable.
    pub fn revoke_token(&self, name: &str) {
        self.tokens.write().retain(|_, n| n != name);
    }

    /// The name of the admin token with this secret, if it is valid.
    pub fn admin_token(&self, secret: &str) -> Option<String> {
        self.tokens.read().get(&keys::hash_secret(secret)).cloned()
    }

    /// Removes an environment and ends its keys' sessions.
    pub fn remove_env(&self, name: &str) {
        self.remove_env_because(name, Revoked::Environment);
    }

    /// Removes an environment and ends its keys' sessions, saying `why`.
    pub fn remove_env_because(&self, name: &str, why: Revoked) {
        self.envs.write().remove(name);
        self.keys.write().retain(|_, grant| {
            let keep = grant.env != name;
            if !keep {
                grant.end(why);
            }
            keep
        });
    }

    /// Makes a key usable (a revoked record is ignored).
    pub fn add_key(&self, key: &KeyRecord) {
        if key.revoked_at.is_none() {
            self.keys
                .write()
                .insert(key.hash, Arc::new(Grant::new(key)));
            self.refresh_keys(&key.env);
        }
    }

    /// Revokes a key and ends its sessions.
    pub fn revoke_key(&self, id: &str) {
        let mut envs = Vec::new();
        self.keys.write().retain(|_, grant| {
            let keep = grant.id != id;
            if !keep {
                grant.end(Revoked::Key);
                envs.push(grant.env.clone());
            }
            keep
        });
        for env in envs {
            self.refresh_keys(&env);
        }
    }

    /// The grant of the key with public id `id`, if it is valid (for credentials that name a
    /// key rather than carry its secret, such as a signed event-stream token).
    pub fn grant(&self, id: &str) -> Option<Arc<Grant>> {
        self.keys.read().values().find(|g| g.id == id).cloned()
    }

    /// The grant of an SDK key secret, if it is valid.
    pub fn authenticate(&self, secret: &str) -> Option<Arc<Grant>> {
        self.keys.read().get(&keys::hash_secret(secret)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vane_core::history::Write;
    use vane_core::model::Flag;

    fn hub_with_env() -> Hub {
        let hub = Hub::new(10);
        let selector = Selector {
            epoch: 7,
            version: 0,
        };
        hub.add_env("e", selector, Lifecycle::ready());
        hub
    }

    fn change(version: u64, key: &str) -> Change {
        Write::flag(Flag::boolean(key, true, true))
            .unwrap()
            .into_change(version)
    }

    #[test]
    fn entries_apply_in_version_order_whatever_order_they_arrive_in() {
        let hub = hub_with_env();
        let env = hub.env("e").unwrap();
        let mut rx = env.subscribe();
        assert_eq!(env.apply(7, change(2, "b")), Applied::Parked { at: 0 });
        assert_eq!(env.apply(7, change(3, "c")), Applied::Parked { at: 0 });
        assert!(
            !rx.has_changed().unwrap(),
            "nothing is published ahead of a gap"
        );
        assert_eq!(env.apply(7, change(1, "a")), Applied::Now);
        assert_eq!(env.selector().version, 3);
        assert_eq!(rx.borrow_and_update().selector.version, 3);
        assert_eq!(env.apply(7, change(2, "b")), Applied::Already);
        assert_eq!(env.apply(8, change(4, "d")), Applied::OtherEpoch);
        let keys: Vec<String> =
            env.with_history(|h| h.flags().map(|f| f.wire.key.clone()).collect());
        assert_eq!(keys, ["a", "b", "c"]);
    }

    fn meta(transport: &'static str, platform: &str) -> SessionMeta {
        SessionMeta {
            transport,
            platform: platform.into(),
            sdk: "vane-rust 0.1.0".into(),
        }
    }

    #[test]
    fn the_live_view_counts_each_sessions_first_ack_of_a_change_and_not_late_joiners() {
        let hub = hub_with_env();
        let env = hub.env("e").unwrap();
        env.session_started(1, meta("quic", "android"));
        env.session_started(2, meta("tcp", "linux-x86_64"));
        let before = env.activity();
        env.apply(7, change(1, "a"));
        assert!(
            env.activity() > before,
            "a change is news for the live view"
        );
        // Session 3 joins after the change: its catch-up is not the change spreading.
        env.session_started(3, meta("tcp", "linux-x86_64"));
        env.ack(1, 1);
        env.ack(1, 1); // a second ack of the same version counts once
        env.ack(3, 1);
        let live = env.live();
        assert_eq!(live.sessions, 3);
        assert_eq!(live.by_transport.get("tcp"), Some(&2));
        assert_eq!(live.by_platform.get("android"), Some(&1));
        let spread = &live.changes[0];
        assert_eq!((spread.version, spread.sessions, spread.current), (1, 2, 1));
        assert_eq!(spread.acked.len(), 1);
        let behind: Vec<&str> = live.behind.iter().map(|b| b.session.as_str()).collect();
        assert_eq!(behind, ["2"], "only the one that has not acked");
        // One ack can hold several changes.
        env.apply(7, change(2, "b"));
        env.apply(7, change(3, "c"));
        env.ack(2, 3);
        let live = env.live();
        let current: Vec<usize> = live.changes.iter().map(|c| c.current).collect();
        assert_eq!(current, [2, 1, 1]);
        env.session_ended(2);
        assert_eq!(env.live().sessions, 2);
    }

    #[test]
    fn revoking_ends_the_grant_and_says_why() {
        let hub = hub_with_env();
        let a = keys::mint("e", KeyKind::Server, 0);
        let b = keys::mint("e", KeyKind::Mobile, 0);
        hub.add_key(&a.record);
        hub.add_key(&b.record);
        let grant_a = hub.authenticate(&a.secret).unwrap();
        let grant_b = hub.authenticate(&b.secret).unwrap();
        assert!(hub.authenticate("vane_srv_unknown").is_none());
        hub.revoke_key(&a.record.id);
        assert_eq!(grant_a.revoked(), Some(Revoked::Key));
        assert!(hub.authenticate(&a.secret).is_none());
        assert_eq!(grant_b.revoked(), None);
        hub.remove_env("e");
        assert_eq!(grant_b.revoked(), Some(Revoked::Environment));
        assert!(hub.env("e").is_none());
    }
}
