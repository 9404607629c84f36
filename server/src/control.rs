//! The write path behind the admin API: validate an edit against the hub's state, commit it
//! through the store (which assigns the version inside its transaction and checks that what
//! the edit was validated against still holds), then apply the committed log entry to the hub
//! — the same entry another node reads from the log.
//!
//! Consistency is the store's, not a lock's: an edit that depends on the state it read (a
//! toggle, a segment reference, an unused segment) commits with a precondition, and a
//! concurrent change makes it re-read and try again. The hub applies entries in version order
//! however they arrive, and a writer whose entry is stuck behind a gap reads the log back.
//!
//! Every write names its actor (the admin token's name), which the store records in the audit
//! log in the write's own transaction.
//!
//! Cloning an environment is a job: the target exists at once, `creating` (not served, not
//! editable), and a task copies the source's flags and segments as they were when the clone
//! was asked for, in batches (each one transaction, with the job's progress), off the request
//! path. The last step makes it `ready` in one transaction; a failure makes it `failed`. A
//! server stopped mid-clone resumes the job at its next start if the source is unchanged, and
//! fails it cleanly if not: a half-copied environment is never served.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use vane_core::history::{EnvHistory, Item, ItemKind, Write};
use vane_core::model::{Flag, Segment, ValidationError, check_segment_graph, validate_name};
use vane_core::protocol::Selector;

use crate::hub::{Applied, EnvHub, Hub, Lifecycle};
use crate::keys::{self, KeyKind, KeyRecord, NewKey};
use crate::store::{
    Audit, AuditEntry, Committed, EnvState, Expect, JobRecord, JobState, NodeAcks, Retention,
    Store, StoreError, TokenRecord, Wake, unix_now,
};

/// How often a node with a shared store reports its sessions' acks.
const ACK_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Reports older than this are dropped from the store (nodes that died without withdrawing).
const STALE_ACKS_MS: i64 = 60_000;

/// Unix milliseconds now.
fn unix_now_ms() -> i64 {
    i64::try_from(crate::store::unix_now_ns() / 1_000_000).unwrap_or(i64::MAX)
}

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
    /// The environment is being created (or its clone failed): it takes no edits.
    #[error("{0}")]
    NotReady(String),
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

/// The lifecycle of a clone's target while it is being filled.
fn creating(job: &JobRecord) -> Lifecycle {
    Lifecycle {
        state: EnvState::Creating,
        job: Some(job.id.clone()),
        copied: job.copied,
        total: job.total,
        error: None,
    }
}

impl Edit {
    /// What the audit log calls it.
    fn action(&self) -> &'static str {
        match self {
            Edit::PutFlag(_) => "flag.put",
            Edit::DeleteFlag(_) => "flag.delete",
            Edit::Toggle { .. } => "flag.toggle",
            Edit::PutSegment(_) => "segment.put",
            Edit::DeleteSegment(_) => "segment.delete",
        }
    }

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

/// How the write path runs its background work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlConfig {
    /// Items a clone copies per transaction.
    pub clone_batch: usize,
    /// How long a clone waits between batches (0: it only yields), to leave the store to other
    /// writes on a busy server.
    pub clone_pause: Duration,
    /// Environments whose source has at most this many items are cloned synchronously when
    /// the request does not say.
    pub sync_clone_max: u64,
    /// The change log kept when an environment sets no retention of its own.
    pub retention: Retention,
    /// With a store other nodes share: how often the whole state is compared with the store,
    /// whatever the store announced (the most a lost announcement delays a change).
    pub follow_interval: Duration,
}

impl Default for ControlConfig {
    fn default() -> ControlConfig {
        ControlConfig {
            clone_batch: 100,
            clone_pause: Duration::ZERO,
            sync_clone_max: 1_000,
            retention: Retention {
                max_changes: Some(100_000),
                max_age_days: Some(90),
            },
            follow_interval: Duration::from_secs(2),
        }
    }
}

/// The store and the hub it feeds.
#[derive(Debug)]
pub struct Control {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    /// Orders environment and key lifecycle changes, so the hub sees them as the store did.
    lifecycle: Mutex<()>,
    config: ControlConfig,
    /// Clone jobs in progress.
    jobs: TaskTracker,
    /// Stops them (at shutdown; they resume at the next start).
    stop: CancellationToken,
    /// This node's id in a store several nodes share, drawn at start.
    node: String,
    /// Tells the follower to compare with the store now (a client showed an unknown key).
    poke: Arc<tokio::sync::Notify>,
}

/// The actor of what the server does by itself (seeding the demo).
pub const SYSTEM_ACTOR: &str = "vane";
/// The actor of the data directory's admin token.
pub const ROOT_ACTOR: &str = "admin";

/// The source's items as they are now, segments first, each kind by key: what a clone copies.
fn items_of(h: &EnvHistory) -> (Selector, Vec<Item>) {
    let mut items: Vec<Item> = h.segments().map(|s| Item::Segment(s.clone())).collect();
    items.sort_by(|a, b| item_key(a).cmp(item_key(b)));
    let mut flags: Vec<Item> = h.flags().map(|f| Item::Flag(f.clone())).collect();
    flags.sort_by(|a, b| item_key(a).cmp(item_key(b)));
    items.extend(flags);
    (h.selector(), items)
}

fn item_key(item: &Item) -> &str {
    match item {
        Item::Flag(f) => &f.wire.key,
        Item::Segment(s) => &s.wire.key,
    }
}

/// The write that copies `item` (its compiled rules shared, not compiled again).
fn copy_of(item: &Item) -> Result<Write, ValidationError> {
    match item {
        Item::Flag(f) => Write::flag_after(f.compiled.flag().clone(), Some(f)),
        Item::Segment(s) => Write::segment_after(s.compiled.segment().clone(), Some(s)),
    }
}

fn internal(e: tokio::task::JoinError) -> ControlError {
    ControlError::Internal(e.to_string())
}

impl Control {
    /// Joins a store and the hub it feeds, with the default settings.
    pub fn new(store: Arc<dyn Store>, hub: Arc<Hub>) -> Arc<Control> {
        Control::with_config(store, hub, ControlConfig::default())
    }

    /// Joins a store and the hub it feeds.
    pub fn with_config(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        config: ControlConfig,
    ) -> Arc<Control> {
        Arc::new(Control {
            store,
            hub,
            lifecycle: Mutex::new(()),
            config,
            jobs: TaskTracker::new(),
            stop: CancellationToken::new(),
            node: format!("node-{}", hex::encode(rand::random::<[u8; 4]>())),
            poke: Arc::default(),
        })
    }

    /// The hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Loads the store into the hub and marks it ready; clone jobs a stop interrupted are
    /// resumed (or failed, if their source changed meanwhile).
    pub async fn load(self: &Arc<Self>) -> Result<(), ControlError> {
        let loaded = self.store.load(self.hub.window()).await?;
        for env in &loaded.envs {
            env.check()?;
        }
        let running: Vec<JobRecord> = loaded
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Running)
            .cloned()
            .collect();
        self.hub.load(loaded);
        for job in running {
            self.resume(job).await?;
        }
        Ok(())
    }

    /// Resumes a clone job found running at the start.
    async fn resume(self: &Arc<Self>, job: JobRecord) -> Result<(), ControlError> {
        let wanted = Selector {
            epoch: job.source_epoch,
            version: job.source_version,
        };
        let source = self.hub.env(&job.source).filter(|e| e.is_serving());
        let snapshot = source.map(|e| e.with_history(items_of));
        match snapshot {
            Some((at, items)) if at == wanted => {
                let done: HashSet<(ItemKind, String)> = self
                    .store
                    .item_keys(&job.target)
                    .await?
                    .into_iter()
                    .collect();
                info!(job = %job.id, source = %job.source, target = %job.target, copied = done.len(), "resuming a clone");
                let rest = items
                    .into_iter()
                    .filter(|i| !done.contains(&(i.kind(), item_key(i).to_owned())))
                    .collect();
                drop(self.spawn_clone(job, rest));
            }
            _ => {
                let why = "the server stopped during the clone, and its source has changed (or \
                           gone) since the clone began; retry the clone";
                warn!(job = %job.id, target = %job.target, "{why}");
                self.fail(&job, why.to_owned()).await?;
            }
        }
        Ok(())
    }

    fn env(&self, env: &str) -> Result<Arc<EnvHub>, ControlError> {
        self.hub
            .env(env)
            .ok_or_else(|| StoreError::EnvNotFound(env.to_owned()).into())
    }

    /// The environment, if it takes edits.
    fn editable(&self, env: &str) -> Result<Arc<EnvHub>, ControlError> {
        let hub = self.env(env)?;
        match hub.lifecycle().not_serving(env) {
            None => Ok(hub),
            Some(why) => Err(ControlError::NotReady(why)),
        }
    }

    /// Creates an environment.
    pub async fn create_env(&self, name: &str, actor: &str) -> Result<Selector, ControlError> {
        validate_name("name", name)?;
        let _order = self.lifecycle.lock().await;
        let selector = self
            .store
            .create_env(name, &Audit::new(actor, "env.create"))
            .await?;
        self.hub.add_env(name, selector, Lifecycle::ready());
        Ok(selector)
    }

    /// Deletes an environment, its flags, segments and keys; its sessions end, and a clone
    /// filling it stops (failed).
    pub async fn delete_env(&self, name: &str, actor: &str) -> Result<(), ControlError> {
        let _order = self.lifecycle.lock().await;
        self.store
            .delete_env(name, &Audit::new(actor, "env.delete"))
            .await?;
        self.hub.remove_env(name);
        Ok(())
    }

    /// Starts cloning `source` into a new environment `target`: it exists at once, in state
    /// `creating`; the copy runs as a job, whose handle says how it ended.
    pub async fn clone_env(
        self: &Arc<Self>,
        source: &str,
        target: &str,
        actor: &str,
    ) -> Result<(JobRecord, JoinHandle<JobRecord>), ControlError> {
        validate_name("name", target)?;
        let (at, items) = self.editable(source)?.with_history(items_of);
        let _order = self.lifecycle.lock().await;
        let audit = Audit::new(actor, "env.clone");
        let (selector, job) = self
            .store
            .begin_clone(source, at, target, items.len() as u64, &audit)
            .await?;
        self.hub.add_env(target, selector, creating(&job));
        info!(job = %job.id, %source, %target, items = items.len(), "clone started");
        let handle = self.spawn_clone(job.clone(), items);
        Ok((job, handle))
    }

    /// Starts a failed clone again, from its source as it is now.
    pub async fn retry_clone(
        self: &Arc<Self>,
        id: &str,
        actor: &str,
    ) -> Result<(JobRecord, JoinHandle<JobRecord>), ControlError> {
        let job = self.store.job(id).await?;
        let (at, items) = self.editable(&job.source)?.with_history(items_of);
        let _order = self.lifecycle.lock().await;
        let audit = Audit::new(actor, "env.clone.retry");
        let (selector, job) = self
            .store
            .restart_clone(id, at, items.len() as u64, &audit)
            .await?;
        self.hub.add_env(&job.target, selector, creating(&job));
        info!(job = %job.id, source = %job.source, target = %job.target, "clone retried");
        let handle = self.spawn_clone(job.clone(), items);
        Ok((job, handle))
    }

    /// Sources of at most this many items are cloned synchronously when the request does not
    /// say.
    pub fn sync_clone_max(&self) -> u64 {
        self.config.sync_clone_max
    }

    /// One job, with its progress.
    pub async fn job(&self, id: &str) -> Result<JobRecord, ControlError> {
        Ok(self.store.job(id).await?)
    }

    fn spawn_clone(self: &Arc<Self>, job: JobRecord, items: Vec<Item>) -> JoinHandle<JobRecord> {
        let this = self.clone();
        let task = self.jobs.track_future(async move {
            let id = job.id.clone();
            match this.copy(&job, items).await {
                Ok(Some(done)) => done,
                // Stopped by the shutdown: the job stays running, to resume at the next start.
                Ok(None) => job,
                // Its target was deleted meanwhile (which ended the job).
                Err(ControlError::Store(StoreError::JobState { .. })) => {
                    info!(job = %id, target = %job.target, "clone stopped: its environment was deleted");
                    this.store.job(&id).await.unwrap_or(job)
                }
                Err(e) => {
                    warn!(job = %id, error = %e, "clone failed");
                    match this.fail(&job, e.to_string()).await {
                        Ok(failed) => failed,
                        Err(_) => this.store.job(&id).await.unwrap_or(job),
                    }
                }
            }
        });
        tokio::spawn(task)
    }

    /// Copies `items` into the job's target in batches, then makes it ready. `None`: stopped
    /// by the shutdown.
    async fn copy(
        &self,
        job: &JobRecord,
        items: Vec<Item>,
    ) -> Result<Option<JobRecord>, ControlError> {
        let target = self.env(&job.target)?;
        let batch = self.config.clone_batch.max(1);
        for chunk in items.chunks(batch) {
            if self.stop.is_cancelled() {
                return Ok(None);
            }
            let writes = chunk.iter().map(copy_of).collect::<Result<Vec<_>, _>>()?;
            let n = writes.len() as u64;
            for committed in self.store.clone_batch(&job.id, writes).await? {
                self.deliver(&target, &committed).await?;
            }
            target.set_lifecycle(|l| l.copied += n);
            if self.config.clone_pause.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(self.config.clone_pause) => {}
                    _ = self.stop.cancelled() => return Ok(None),
                }
            }
        }
        let _order = self.lifecycle.lock().await;
        let done = self.store.end_clone(&job.id, None).await?;
        target.set_lifecycle(|l| {
            l.state = EnvState::Ready;
            l.copied = done.copied;
        });
        info!(job = %job.id, target = %job.target, items = done.copied, "clone done: the environment is ready");
        Ok(Some(done))
    }

    /// Marks a job failed (and its target, if it still exists).
    async fn fail(&self, job: &JobRecord, why: String) -> Result<JobRecord, ControlError> {
        let _order = self.lifecycle.lock().await;
        let failed = match self.store.end_clone(&job.id, Some(why.clone())).await {
            Ok(failed) => failed,
            // Already ended: deleted with its target meanwhile.
            Err(StoreError::JobState { .. }) => self.store.job(&job.id).await?,
            Err(e) => return Err(e.into()),
        };
        // Only the environment this job fills: one of the same name made after a deletion is
        // another environment.
        if let Some(target) = self.hub.env(&job.target)
            && target.lifecycle().job.as_deref() == Some(job.id.as_str())
        {
            target.set_lifecycle(|l| {
                l.state = EnvState::Failed;
                l.error = failed.error.clone();
            });
        }
        Ok(failed)
    }

    /// Stops the clone jobs (they resume at the next start) and waits for them.
    pub async fn stop_jobs(&self) {
        self.stop.cancel();
        self.jobs.close();
        self.jobs.wait().await;
    }

    /// Sets an environment's retention.
    pub async fn set_retention(
        &self,
        env: &str,
        retention: Retention,
        actor: &str,
    ) -> Result<(), ControlError> {
        let hub = self.env(env)?;
        self.store
            .set_retention(env, retention, &Audit::new(actor, "env.retention"))
            .await?;
        hub.set_retention(retention);
        Ok(())
    }

    /// The retention that applies to `env`: its own, else the server's.
    pub fn retention_of(&self, env: &EnvHub) -> Retention {
        let own = env.retention();
        Retention {
            max_changes: own.max_changes.or(self.config.retention.max_changes),
            max_age_days: own.max_age_days.or(self.config.retention.max_age_days),
        }
    }

    /// Prunes every environment's change log to its retention, never below the in-memory
    /// window (a client within it resumes by delta; an older one gets a snapshot, as it would
    /// anyway). Returns the entries dropped.
    pub async fn prune(&self) -> Result<u64, ControlError> {
        let window = self.hub.window() as u64;
        let mut dropped = 0;
        for env in self.hub.envs() {
            let retention = self.retention_of(&env);
            let version = env.selector().version;
            let at_most = version.saturating_sub(window);
            let by_count = retention
                .max_changes
                .map_or(0, |n| version.saturating_sub(n));
            let older_than = retention.max_age_days.map_or(i64::MIN, |days| {
                unix_now().saturating_sub(i64::try_from(days * 86_400).unwrap_or(i64::MAX))
            });
            if at_most == 0 {
                continue;
            }
            match self
                .store
                .prune(env.name(), at_most, by_count, older_than)
                .await
            {
                Ok(n) => dropped += n,
                Err(StoreError::EnvNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(dropped)
    }

    /// Creates a named admin token; the secret is returned once and stored only as a hash.
    pub async fn create_token(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<(TokenRecord, String), ControlError> {
        validate_name("name", name)?;
        if name == ROOT_ACTOR || name == SYSTEM_ACTOR {
            return Err(ValidationError::new(
                "name",
                format!("{name:?} is reserved (the data directory's token, and the server itself)"),
            )
            .into());
        }
        let secret = keys::mint_admin_token();
        let record = TokenRecord {
            name: name.to_owned(),
            prefix: secret[..keys::PREFIX_LEN].to_owned(),
            hash: keys::hash_secret(&secret),
            created_at: unix_now(),
            revoked_at: None,
        };
        let _order = self.lifecycle.lock().await;
        self.store
            .create_token(&record, &Audit::new(actor, "token.create"))
            .await?;
        self.hub.add_token(&record);
        Ok((record, secret))
    }

    /// Revokes a named admin token: it is refused from now on.
    pub async fn revoke_token(&self, name: &str, actor: &str) -> Result<TokenRecord, ControlError> {
        let _order = self.lifecycle.lock().await;
        let record = self
            .store
            .revoke_token(name, &Audit::new(actor, "token.revoke"))
            .await?;
        self.hub.revoke_token(name);
        Ok(record)
    }

    /// Every named admin token.
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, ControlError> {
        Ok(self.store.tokens().await?)
    }

    /// A page of an environment's audit log, newest first (it outlives the environment).
    pub async fn audit(
        &self,
        env: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, ControlError> {
        Ok(self.store.audit(env, before, limit).await?)
    }

    /// Validates and commits an edit of `env`, and returns once the hub holds it.
    pub async fn edit(
        self: &Arc<Self>,
        env: &str,
        edit: Edit,
        actor: &str,
    ) -> Result<Committed, ControlError> {
        let mut attempt = 1;
        let audit = Audit::new(actor, edit.action());
        loop {
            let env_hub = self.editable(env)?;
            let (this, hub_env, edit_) = (self.clone(), env_hub.clone(), edit.clone());
            let audit = audit.clone();
            // A task of its own, so that a caller that goes away (an HTTP client hanging up)
            // cannot leave a committed change unapplied; compiling (regular expressions) runs
            // on the blocking pool.
            let task = tokio::spawn(async move {
                let hist = hub_env.clone();
                let (write, expect) =
                    tokio::task::spawn_blocking(move || hist.with_history(|h| edit_.prepare(h)))
                        .await
                        .map_err(internal)??;
                let committed = this
                    .store
                    .commit(hub_env.name(), write, expect, &audit)
                    .await?;
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

    /// Applies the log from the hub's version on. If the log no longer reaches back that far
    /// (pruned while this node was behind), the environment is loaded again instead.
    async fn catch_up(&self, env: &EnvHub) -> Result<(), ControlError> {
        loop {
            let at = env.selector();
            let tail = self
                .store
                .changes_since(env.name(), at.version, CATCH_UP_BATCH)
                .await?;
            if tail.epoch != at.epoch {
                return Ok(()); // the environment was deleted and created again
            }
            let Some(first) = tail.changes.first() else {
                return Ok(());
            };
            if first.version != at.version + 1 {
                warn!(env = %env.name(), at = at.version, log_starts = first.version, "the change log no longer reaches back to this node's version; loading the environment again");
                let loaded = self.store.load_env(env.name(), self.hub.window()).await?;
                if loaded.selector.epoch == at.epoch && loaded.selector.version > at.version {
                    env.reset(loaded, self.hub.window());
                }
                return Ok(());
            }
            for change in tail.changes {
                if env.apply(tail.epoch, change) == Applied::OtherEpoch {
                    return Ok(());
                }
            }
        }
    }

    /// With a store other nodes share, starts following them ([`Control::follow`]) until
    /// `stop`; `None` for a store only this node writes.
    pub async fn follow_others(
        self: &Arc<Self>,
        stop: CancellationToken,
    ) -> Result<Option<JoinHandle<()>>, ControlError> {
        let Some(wakes) = self.store.listen().await? else {
            return Ok(None);
        };
        let interval = self.config.follow_interval;
        // A key a client shows that this node does not know may be one another node made a
        // moment ago: for two intervals it is "not yet" (retry), and the follower looks now.
        self.hub.follow_with(2 * interval, Some(self.poke.clone()));
        let (this, report) = (self.clone(), self.clone().report_acks(stop.clone()));
        Ok(Some(tokio::spawn(async move {
            tokio::join!(this.follow(wakes, interval, stop), report);
        })))
    }

    /// This node's id among the nodes sharing its store.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Every [`ACK_REPORT_INTERVAL`], tells the shared store what this node's sessions have
    /// acknowledged, so any node can answer for the fleet ([`Control::fleet_acks`]); at `stop`,
    /// withdraws the report.
    async fn report_acks(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(ACK_REPORT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = unix_now_ms();
            let acks = self
                .hub
                .envs()
                .iter()
                .filter_map(|env| {
                    let p = env.propagation();
                    (p.sessions > 0).then(|| NodeAcks {
                        node: self.node.clone(),
                        env: env.name().to_owned(),
                        version: p.version,
                        sessions: p.sessions as u64,
                        by_version: p
                            .by_version
                            .into_iter()
                            .map(|(v, n)| (v, n as u64))
                            .collect(),
                        at_ms: now,
                    })
                })
                .collect();
            // A failure is the store's (the follower says so); the next tick tries again.
            let _ = self
                .store
                .report_acks(&self.node, acks, now - STALE_ACKS_MS)
                .await;
        }
        let _ = self
            .store
            .report_acks(&self.node, Vec::new(), unix_now_ms() - STALE_ACKS_MS)
            .await;
    }

    /// What the other nodes sharing the store last reported of `env`'s sessions (reports older
    /// than a few intervals are of nodes that stopped, and left out).
    pub async fn fleet_acks(&self, env: &str) -> Result<Vec<NodeAcks>, ControlError> {
        let since = unix_now_ms() - 5 * ACK_REPORT_INTERVAL.as_millis() as i64;
        let mut acks = self.store.fleet_acks(env, since).await?;
        acks.retain(|a| a.node != self.node);
        Ok(acks)
    }

    /// Keeps this node's hub current with what the other nodes sharing its store commit, until
    /// `stop`: a wake-up for an environment's log catches that environment up, and every
    /// `interval` (and after any other wake-up) the whole state is compared with the store.
    /// The store is the truth and the wake-ups only make it sooner, so a lost one, a dropped
    /// listening connection or a node paused for a while costs at most one interval.
    pub async fn follow(
        self: Arc<Self>,
        mut wakes: tokio::sync::mpsc::UnboundedReceiver<Wake>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut listening = true;
        let mut last_poke = tokio::time::Instant::now();
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return,
                wake = wakes.recv(), if listening => match wake {
                    Some(Wake::Changes(env)) => match self.hub.env(&env) {
                        Some(env) => self.catch_up(&env).await,
                        None => self.reconcile().await,
                    },
                    Some(Wake::Meta | Wake::Resync) => self.reconcile().await,
                    None => {
                        listening = false;
                        Ok(())
                    }
                },
                _ = tick.tick() => self.reconcile().await,
                () = self.poke.notified() => {
                    // Clients showing unknown keys (made up, or just made elsewhere) make this
                    // node look at the store at most ten times a second.
                    tokio::time::sleep_until(last_poke + Duration::from_millis(100)).await;
                    last_poke = tokio::time::Instant::now();
                    self.reconcile().await
                }
            };
            match result {
                Err(e) if !failing => {
                    warn!(error = %e, "cannot read the store to follow the other nodes; serving the last state and trying again");
                    failing = true;
                }
                Ok(()) if failing => {
                    info!("following the other nodes again");
                    failing = false;
                }
                _ => {}
            }
        }
    }

    /// Brings the hub to the store's state of environments, keys and tokens, and each
    /// environment to the store's version.
    async fn reconcile(&self) -> Result<(), ControlError> {
        // Under the lifecycle lock, so a change this node makes meanwhile is either in what is
        // read or applied after it, never undone by it.
        let _order = self.lifecycle.lock().await;
        let meta = self.store.meta().await?;
        let mut behind = Vec::new();
        for env in &meta.envs {
            match self.hub.env(&env.name) {
                Some(hub) if hub.selector().epoch == env.selector.epoch => {
                    let lifecycle = Lifecycle::of(env.state, &env.name, &meta.jobs);
                    let now = hub.lifecycle();
                    if now.state != lifecycle.state || now.job != lifecycle.job {
                        hub.set_lifecycle(|l| *l = lifecycle);
                    } else if lifecycle.copied > now.copied {
                        hub.set_lifecycle(|l| l.copied = lifecycle.copied);
                    }
                    if hub.retention() != env.retention {
                        hub.set_retention(env.retention);
                    }
                    if hub.selector().version < env.selector.version {
                        behind.push(hub);
                    }
                }
                existing => {
                    // New here, or deleted and created again elsewhere (its sessions end).
                    if existing.is_some() {
                        info!(env = %env.name, "environment re-created on another node");
                        self.hub.remove_env(&env.name);
                    } else {
                        info!(env = %env.name, "environment created on another node");
                    }
                    match self.store.load_env(&env.name, self.hub.window()).await {
                        Ok(loaded) => self.hub.install(loaded, &meta.jobs),
                        Err(StoreError::EnvNotFound(_)) => {} // deleted since: the next pass
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        let names: HashSet<&str> = meta.envs.iter().map(|e| e.name.as_str()).collect();
        for hub in self.hub.envs() {
            if !names.contains(hub.name()) {
                info!(env = %hub.name(), "environment deleted on another node; ending its sessions");
                self.hub.remove_env(hub.name());
            }
        }
        self.hub.sync_keys(&meta.keys);
        self.hub.sync_tokens(&meta.tokens);
        drop(_order);
        for hub in behind {
            self.catch_up(&hub).await?;
        }
        Ok(())
    }

    /// Creates an SDK key; the secret is returned once and stored only as a hash. An
    /// environment that is being created takes keys, so apps can be set up before it is ready.
    pub async fn create_key(
        &self,
        env: &str,
        kind: KeyKind,
        actor: &str,
    ) -> Result<NewKey, ControlError> {
        let key = keys::mint(env, kind, unix_now());
        let _order = self.lifecycle.lock().await;
        self.store
            .create_key(&key.record, &Audit::new(actor, "key.create"))
            .await?;
        self.hub.add_key(&key.record);
        Ok(key)
    }

    /// Revokes a key; its sessions end.
    pub async fn revoke_key(
        &self,
        env: &str,
        id: &str,
        actor: &str,
    ) -> Result<KeyRecord, ControlError> {
        let _order = self.lifecycle.lock().await;
        let record = self
            .store
            .revoke_key(env, id, &Audit::new(actor, "key.revoke"))
            .await?;
        self.hub.revoke_key(id);
        Ok(record)
    }

    /// Every key of an environment.
    pub async fn keys(&self, env: &str) -> Result<Vec<KeyRecord>, ControlError> {
        Ok(self.store.keys(env).await?)
    }

    /// Stops the clone jobs and flushes the store, for a clean shutdown.
    pub async fn close(&self) -> Result<(), ControlError> {
        self.stop_jobs().await;
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
        control.create_env("e", "test").await.unwrap();
        (control, dir)
    }

    fn flag(key: &str) -> Edit {
        Edit::PutFlag(Flag::boolean(key, true, true))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_edits_all_land_once_each_in_consecutive_versions() {
        let (control, _dir) = control().await;
        control.edit("e", flag("f"), "test").await.unwrap();
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
                    c.edit("e", edit, "test").await.unwrap().change.version
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
        control
            .edit("e", Edit::PutFlag(flag), "test")
            .await
            .unwrap();
        let env = control.hub().env("e").unwrap();
        let before = env.with_history(|h| h.flag("f").unwrap().clone());
        let toggle = Edit::Toggle {
            key: "f".into(),
            on: false,
        };
        control.edit("e", toggle, "test").await.unwrap();
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
        let missing = control.edit("e", Edit::PutFlag(uses.clone()), "test").await;
        assert!(
            matches!(missing, Err(ControlError::Invalid(_))),
            "{missing:?}"
        );
        control
            .edit("e", Edit::PutSegment(seg), "test")
            .await
            .unwrap();
        control
            .edit("e", Edit::PutFlag(uses), "test")
            .await
            .unwrap();
        let in_use = control
            .edit("e", Edit::DeleteSegment("s".into()), "test")
            .await;
        assert!(
            matches!(in_use, Err(ControlError::InUse { .. })),
            "{in_use:?}"
        );
        control
            .edit("e", Edit::DeleteFlag("f".into()), "test")
            .await
            .unwrap();
        control
            .edit("e", Edit::DeleteSegment("s".into()), "test")
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
            control
                .edit("e", flag(&format!("f{i}")), "test")
                .await
                .unwrap();
        }
        let env = other.hub().env("e").unwrap();
        assert_eq!(env.selector().version, 0);
        // Its own write lands after the three it never saw: it reads them back first.
        let committed = other.edit("e", flag("mine"), "test").await.unwrap();
        assert_eq!(committed.change.version, 4);
        assert_eq!(env.selector().version, 4);
        assert_eq!(env.with_history(|h| h.flags().count()), 4);
    }
}
