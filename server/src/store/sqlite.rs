//! The embedded store: one SQLite file in the data directory, nothing to install.
//!
//! One connection, behind a mutex, on the blocking pool: SQLite serialises writers anyway, and
//! the mutex makes each method one transaction with nothing interleaved. Transactions take the
//! write lock when they begin (`IMMEDIATE`), so another connection to the file waits its turn
//! (`busy_timeout`) instead of failing on a lock upgrade. `synchronous=FULL` in
//! WAL mode, so an acknowledged change survives a power cut.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use vane_core::history::{Change, Item, ItemKind, Logged, Write};
use vane_core::protocol::Selector;

use super::{
    Audit, AuditEntry, Committed, EnvMeta, EnvState, Expect, JobRecord, JobState, Loaded,
    LoadedEnv, LogTail, Meta, Retention, Store, StoreError, TokenRecord, env_json, from_sql,
    job_json, key_json, not_found, parse_item, secret_hash, table, to_sql, token_json, unix_now,
    unix_now_ns,
};
use crate::keys::{KeyKind, KeyRecord};

/// The SQLite store. Clones share the connection.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// This open made the schema: the file was new, empty, or held no Vane tables.
    created: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS environments (
    name TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'ready',
    retain_changes INTEGER,
    retain_days INTEGER
);
CREATE TABLE IF NOT EXISTS flags (
    env TEXT NOT NULL REFERENCES environments(name) ON DELETE CASCADE,
    key TEXT NOT NULL,
    body TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (env, key)
);
CREATE TABLE IF NOT EXISTS segments (
    env TEXT NOT NULL REFERENCES environments(name) ON DELETE CASCADE,
    key TEXT NOT NULL,
    body TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (env, key)
);
CREATE TABLE IF NOT EXISTS changes (
    env TEXT NOT NULL REFERENCES environments(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL DEFAULT 'flag',
    key TEXT NOT NULL,
    body TEXT,
    committed_at INTEGER NOT NULL,
    PRIMARY KEY (env, version)
);
CREATE TABLE IF NOT EXISTS sdk_keys (
    id TEXT PRIMARY KEY,
    env TEXT NOT NULL REFERENCES environments(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    copied INTEGER NOT NULL,
    total INTEGER NOT NULL,
    error TEXT,
    source_epoch INTEGER NOT NULL,
    source_version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE TABLE IF NOT EXISTS admin_tokens (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
-- No foreign key: the audit log of an environment outlives it.
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    env TEXT,
    target TEXT,
    before TEXT,
    after TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_env ON audit (env, id);
";

/// The schema version this build writes (`PRAGMA user_version`). 2: environment state and
/// retention, jobs, admin tokens, the audit log.
const SCHEMA_VERSION: i64 = 2;

/// Columns later schemas added to existing tables: (table, column, declaration).
const ADDED_COLUMNS: [(&str, &str, &str); 4] = [
    ("changes", "kind", "TEXT NOT NULL DEFAULT 'flag'"),
    ("environments", "state", "TEXT NOT NULL DEFAULT 'ready'"),
    ("environments", "retain_changes", "INTEGER"),
    ("environments", "retain_days", "INTEGER"),
];

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Backend {
        backend: "sqlite",
        message: e.to_string(),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "database schema {version} is newer than this server ({SCHEMA_VERSION}); upgrade vane"
            )));
        }
        let created: bool = conn
            .query_row(
                "SELECT COUNT(*) = 0 FROM sqlite_master WHERE type = 'table' AND name = 'environments'",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        // Databases from older schemas: the columns added since.
        for (table, column, decl) in ADDED_COLUMNS {
            let has: bool = conn
                .query_row(
                    &format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
                    [column],
                    |r| r.get::<_, i64>(0).map(|n| n > 0),
                )
                .map_err(db)?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl};"))
                    .map_err(db)?;
            }
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(db)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            created,
        })
    }

    /// Whether this open created the schema (a new or empty file).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Runs `f` on the connection, on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock()))
            .await
            .map_err(|e| StoreError::Backend {
                backend: "sqlite",
                message: format!("the store task failed: {e}"),
            })?
    }
}

fn env_selector(conn: &Connection, env: &str) -> Result<Selector, StoreError> {
    conn.query_row(
        "SELECT epoch, version FROM environments WHERE name = ?1",
        [env],
        |r| {
            Ok(Selector {
                epoch: from_sql(r.get(0)?),
                version: from_sql(r.get(1)?),
            })
        },
    )
    .optional()
    .map_err(db)?
    .ok_or_else(|| StoreError::EnvNotFound(env.to_owned()))
}

fn items(conn: &Connection, env: &str, kind: ItemKind) -> Result<Vec<Item>, StoreError> {
    let sql = format!(
        "SELECT body FROM {} WHERE env = ?1 ORDER BY key",
        table(kind)
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(db)?;
    let bodies = stmt
        .query_map([env], |r| r.get::<_, String>(0))
        .map_err(db)?;
    bodies.map(|b| parse_item(kind, &b.map_err(db)?)).collect()
}

/// The newest `window` log entries of an environment.
const RECENT: &str =
    "SELECT version, kind, key, body FROM changes WHERE env = ?1 ORDER BY version DESC LIMIT ?2";
/// At most ?3 log entries after version ?2.
const AFTER: &str = "SELECT version, kind, key, body FROM changes WHERE env = ?1 AND version > ?2 ORDER BY version LIMIT ?3";

/// A row of the change log: version, kind, key, body (none for a deletion).
type LogRow = (u64, ItemKind, String, Option<String>);

/// The log rows `sql` selects, oldest first.
fn log_rows<P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    p: P,
) -> Result<Vec<LogRow>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db)?;
    let rows = stmt
        .query_map(p, |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })
        .map_err(db)?;
    let mut out = Vec::new();
    for row in rows {
        let (version, kind, key, body) = row.map_err(db)?;
        let kind = ItemKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("change kind {kind:?}")))?;
        out.push((from_sql(version), kind, key, body));
    }
    out.sort_by_key(|(version, ..)| *version);
    Ok(out)
}

/// Log entries to apply to a hub: compiled.
fn log<P: rusqlite::Params>(conn: &Connection, sql: &str, p: P) -> Result<Vec<Change>, StoreError> {
    log_rows(conn, sql, p)?
        .into_iter()
        .map(|(version, kind, key, body)| {
            let item = body.map(|b| parse_item(kind, &b)).transpose()?;
            Ok(Change {
                version,
                kind,
                key,
                item,
            })
        })
        .collect()
}

/// Log entries for the history window: parsed, not compiled.
fn logged<P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    p: P,
) -> Result<Vec<Logged>, StoreError> {
    log_rows(conn, sql, p)?
        .into_iter()
        .map(|(version, kind, key, body)| {
            Logged::parse(version, kind, key, body.as_deref()).map_err(StoreError::Corrupt)
        })
        .collect()
}

fn query_keys<P: rusqlite::Params>(
    conn: &Connection,
    filter: &str,
    p: P,
) -> Result<Vec<KeyRecord>, StoreError> {
    let sql = format!(
        "SELECT id, env, kind, prefix, hash, created_at, revoked_at FROM sdk_keys {filter} ORDER BY created_at, id"
    );
    let mut stmt = conn.prepare(&sql).map_err(db)?;
    let rows = stmt
        .query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
            ))
        })
        .map_err(db)?;
    rows.map(|row| {
        let (id, env, kind, prefix, hash, created_at, revoked_at) = row.map_err(db)?;
        let kind = KeyKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("key {id}: kind {kind:?}")))?;
        let hash = secret_hash(&hash, || format!("key {id}"))?;
        Ok(KeyRecord {
            id,
            env,
            kind,
            prefix,
            hash,
            created_at,
            revoked_at,
        })
    })
    .collect()
}

/// The version of the item `key` as stored, if it exists.
fn item_version(
    tx: &Transaction<'_>,
    env: &str,
    kind: ItemKind,
    key: &str,
) -> Result<Option<u64>, StoreError> {
    let sql = format!(
        "SELECT version FROM {} WHERE env = ?1 AND key = ?2",
        table(kind)
    );
    tx.query_row(&sql, [env, key], |r| r.get::<_, i64>(0))
        .optional()
        .map(|v| v.map(from_sql))
        .map_err(db)
}

/// Appends an audit entry, inside the caller's transaction.
fn record(
    tx: &Transaction<'_>,
    audit: &Audit,
    env: Option<&str>,
    target: Option<&str>,
    before: Option<String>,
    after: Option<String>,
) -> Result<(), StoreError> {
    let at_ms = i64::try_from(unix_now_ns() / 1_000_000).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO audit (at_ms, actor, action, env, target, before, after) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![at_ms, audit.actor, audit.action, env, target, before, after],
    )
    .map_err(db)?;
    Ok(())
}

/// The stored body of an item, if it exists.
fn item_body(
    tx: &Transaction<'_>,
    env: &str,
    kind: ItemKind,
    key: &str,
) -> Result<Option<String>, StoreError> {
    let sql = format!(
        "SELECT body FROM {} WHERE env = ?1 AND key = ?2",
        table(kind)
    );
    tx.query_row(&sql, [env, key], |r| r.get::<_, String>(0))
        .optional()
        .map_err(db)
}

/// Writes `write` as `version` of `env` (the item and its log entry; the caller sets the
/// environment's version).
fn write_item(
    tx: &Transaction<'_>,
    env: &str,
    write: Write,
    version: u64,
) -> Result<Change, StoreError> {
    let (kind, key) = (write.kind(), write.key().to_owned());
    let change = write.into_change(version);
    let body = change.item.as_ref().map(Item::body);
    match &body {
        Some(text) => {
            let sql = format!(
                "INSERT INTO {} (env, key, body, version) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (env, key) DO UPDATE SET body = excluded.body, version = excluded.version",
                table(kind)
            );
            tx.execute(&sql, params![env, key, text, to_sql(version)])
                .map_err(db)?;
        }
        None => {
            let sql = format!("DELETE FROM {} WHERE env = ?1 AND key = ?2", table(kind));
            if tx.execute(&sql, [env, key.as_str()]).map_err(db)? == 0 {
                return Err(not_found(kind, &key));
            }
        }
    }
    tx.execute(
        "INSERT INTO changes (env, version, kind, key, body, committed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![env, to_sql(version), kind.as_str(), key, body, unix_now()],
    )
    .map_err(db)?;
    Ok(change)
}

fn set_version(tx: &Transaction<'_>, env: &str, version: u64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE environments SET version = ?2 WHERE name = ?1",
        params![env, to_sql(version)],
    )
    .map_err(db)?;
    Ok(())
}

fn env_state(conn: &Connection, env: &str) -> Result<EnvState, StoreError> {
    let state: String = conn
        .query_row(
            "SELECT state FROM environments WHERE name = ?1",
            [env],
            |r| r.get(0),
        )
        .optional()
        .map_err(db)?
        .ok_or_else(|| StoreError::EnvNotFound(env.to_owned()))?;
    EnvState::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("environment state {state:?}")))
}

fn commit(
    conn: &mut Connection,
    env: &str,
    write: Write,
    expect: Expect,
    audit: &Audit,
) -> Result<Committed, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let current = env_selector(&tx, env)?;
    let (kind, key) = (write.kind(), write.key().to_owned());
    let conflict = || StoreError::Conflict {
        env: env.to_owned(),
        version: current.version,
    };
    match expect {
        Expect::Nothing => {}
        Expect::EnvAt(v) if v == current.version => {}
        Expect::EnvAt(_) => return Err(conflict()),
        Expect::ItemAt(v) => match item_version(&tx, env, kind, &key)? {
            Some(stored) if stored == v => {}
            Some(_) => return Err(conflict()),
            None => return Err(not_found(kind, &key)),
        },
    }
    let version = current.version + 1;
    let before = item_body(&tx, env, kind, &key)?;
    let change = write_item(&tx, env, write, version)?;
    let after = change.item.as_ref().map(Item::body);
    set_version(&tx, env, version)?;
    record(&tx, audit, Some(env), Some(&key), before, after)?;
    tx.commit().map_err(db)?;
    Ok(Committed {
        epoch: current.epoch,
        change,
        at_unix_ns: unix_now_ns(),
    })
}

/// Inserts a new environment in `state` with a fresh epoch.
fn insert_env(tx: &Transaction<'_>, name: &str, state: EnvState) -> Result<Selector, StoreError> {
    let selector = Selector {
        epoch: rand::random(),
        version: 0,
    };
    let inserted = tx
        .execute(
            "INSERT INTO environments (name, epoch, version, created_at, state) VALUES (?1, ?2, 0, ?3, ?4)
             ON CONFLICT (name) DO NOTHING",
            params![name, to_sql(selector.epoch), unix_now(), state.as_str()],
        )
        .map_err(db)?;
    if inserted == 0 {
        return Err(StoreError::EnvExists(name.to_owned()));
    }
    Ok(selector)
}

fn query_tokens<P: rusqlite::Params>(
    conn: &Connection,
    filter: &str,
    p: P,
) -> Result<Vec<TokenRecord>, StoreError> {
    let sql = format!(
        "SELECT name, prefix, hash, created_at, revoked_at FROM admin_tokens {filter} ORDER BY created_at, name"
    );
    let mut stmt = conn.prepare(&sql).map_err(db)?;
    let rows = stmt
        .query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        })
        .map_err(db)?;
    rows.map(|row| {
        let (name, prefix, hash, created_at, revoked_at) = row.map_err(db)?;
        let hash = secret_hash(&hash, || format!("admin token {name}"))?;
        Ok(TokenRecord {
            name,
            prefix,
            hash,
            created_at,
            revoked_at,
        })
    })
    .collect()
}

fn query_jobs<P: rusqlite::Params>(
    conn: &Connection,
    filter: &str,
    p: P,
) -> Result<Vec<JobRecord>, StoreError> {
    let sql = format!(
        "SELECT id, kind, source, target, state, copied, total, error, source_epoch, source_version,
                created_at, finished_at
         FROM jobs {filter} ORDER BY created_at, id"
    );
    let mut stmt = conn.prepare(&sql).map_err(db)?;
    let rows = stmt
        .query_map(p, |r| {
            Ok((
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ),
                (
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, i64>(10)?,
                    r.get::<_, Option<i64>>(11)?,
                ),
            ))
        })
        .map_err(db)?;
    rows.map(|row| {
        let (
            (id, kind, source, target, state),
            (copied, total, error, epoch, version, created_at, finished_at),
        ) = row.map_err(db)?;
        let state = JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job {id}: state {state:?}")))?;
        Ok(JobRecord {
            id,
            kind,
            source,
            target,
            state,
            copied: from_sql(copied),
            total: from_sql(total),
            error,
            source_version: from_sql(version),
            source_epoch: from_sql(epoch),
            created_at,
            finished_at,
        })
    })
    .collect()
}

fn one_job(conn: &Connection, id: &str) -> Result<JobRecord, StoreError> {
    query_jobs(conn, "WHERE id = ?1", [id])?
        .pop()
        .ok_or_else(|| StoreError::JobNotFound(id.to_owned()))
}

/// The environments `filter` selects, by name.
fn env_metas<P: rusqlite::Params>(
    conn: &Connection,
    filter: &str,
    p: P,
) -> Result<Vec<EnvMeta>, StoreError> {
    let sql = format!(
        "SELECT name, epoch, version, state, retain_changes, retain_days FROM environments \
         {filter} ORDER BY name"
    );
    let mut stmt = conn.prepare(&sql).map_err(db)?;
    let rows = stmt
        .query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<i64>>(5)?,
            ))
        })
        .map_err(db)?;
    rows.map(|row| {
        let (name, epoch, version, state, retain_changes, retain_days) = row.map_err(db)?;
        let state = EnvState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("environment {name:?}: state {state:?}")))?;
        Ok(EnvMeta {
            name,
            selector: Selector {
                epoch: from_sql(epoch),
                version: from_sql(version),
            },
            state,
            retention: Retention {
                max_changes: retain_changes.map(from_sql),
                max_age_days: retain_days.map(from_sql),
            },
        })
    })
    .collect()
}

/// An environment's items and newest `window` log entries.
fn load_one(conn: &Connection, meta: EnvMeta, window: usize) -> Result<LoadedEnv, StoreError> {
    let mut items_ = items(conn, &meta.name, ItemKind::Segment)?;
    items_.extend(items(conn, &meta.name, ItemKind::Flag)?);
    let window = i64::try_from(window).unwrap_or(i64::MAX);
    let changes = logged(conn, RECENT, params![meta.name, window])?;
    Ok(LoadedEnv {
        name: meta.name,
        selector: meta.selector,
        items: items_,
        changes,
        state: meta.state,
        retention: meta.retention,
    })
}

/// The keys and tokens in force, and the jobs a start resumes or reports.
fn active(conn: &Connection) -> Result<super::Active, StoreError> {
    let keys = query_keys(conn, "WHERE revoked_at IS NULL", [])?;
    let tokens = query_tokens(conn, "WHERE revoked_at IS NULL", [])?;
    let jobs = query_jobs(
        conn,
        "WHERE state = 'running' OR (state = 'failed' AND target IN
             (SELECT name FROM environments WHERE state = 'failed'))",
        [],
    )?;
    Ok((keys, tokens, jobs))
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn load(&self, window: usize) -> Result<Loaded, StoreError> {
        self.run(move |conn| {
            let envs = env_metas(conn, "", [])?
                .into_iter()
                .map(|meta| load_one(conn, meta, window))
                .collect::<Result<_, _>>()?;
            let (keys, tokens, jobs) = active(conn)?;
            Ok(Loaded {
                envs,
                keys,
                tokens,
                jobs,
            })
        })
        .await
    }

    async fn meta(&self) -> Result<Meta, StoreError> {
        self.run(move |conn| {
            let envs = env_metas(conn, "", [])?;
            let (keys, tokens, jobs) = active(conn)?;
            Ok(Meta {
                envs,
                keys,
                tokens,
                jobs,
            })
        })
        .await
    }

    async fn load_env(&self, name: &str, window: usize) -> Result<LoadedEnv, StoreError> {
        let name = name.to_owned();
        self.run(move |conn| {
            let meta = env_metas(conn, "WHERE name = ?1", [&name])?
                .pop()
                .ok_or_else(|| StoreError::EnvNotFound(name.clone()))?;
            load_one(conn, meta, window)
        })
        .await
    }

    async fn create_env(&self, name: &str, audit: &Audit) -> Result<Selector, StoreError> {
        let (name, audit) = (name.to_owned(), audit.clone());
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let selector = insert_env(&tx, &name, EnvState::Ready)?;
            record(
                &tx,
                &audit,
                Some(&name),
                None,
                None,
                Some(env_json(&name, selector)),
            )?;
            tx.commit().map_err(db)?;
            Ok(selector)
        })
        .await
    }

    async fn delete_env(&self, name: &str, audit: &Audit) -> Result<(), StoreError> {
        let (name, audit) = (name.to_owned(), audit.clone());
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let at = env_selector(&tx, &name)?;
            tx.execute("DELETE FROM environments WHERE name = ?1", [&name])
                .map_err(db)?;
            tx.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?2,
                     error = 'the environment was deleted during the clone'
                 WHERE target = ?1 AND state = 'running'",
                params![name, unix_now()],
            )
            .map_err(db)?;
            record(
                &tx,
                &audit,
                Some(&name),
                None,
                Some(env_json(&name, at)),
                None,
            )?;
            tx.commit().map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn commit(
        &self,
        env: &str,
        write: Write,
        expect: Expect,
        audit: &Audit,
    ) -> Result<Committed, StoreError> {
        let (env, audit) = (env.to_owned(), audit.clone());
        self.run(move |conn| commit(conn, &env, write, expect, &audit))
            .await
    }

    async fn begin_clone(
        &self,
        source: &str,
        source_at: Selector,
        target: &str,
        total: u64,
        audit: &Audit,
    ) -> Result<(Selector, JobRecord), StoreError> {
        let (source, target, audit) = (source.to_owned(), target.to_owned(), audit.clone());
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            env_selector(&tx, &source)?;
            let selector = insert_env(&tx, &target, EnvState::Creating)?;
            let job = JobRecord {
                id: format!("job_{}", hex::encode(rand::random::<[u8; 8]>())),
                kind: "clone".into(),
                source,
                target: target.clone(),
                state: JobState::Running,
                copied: 0,
                total,
                error: None,
                source_version: source_at.version,
                source_epoch: source_at.epoch,
                created_at: unix_now(),
                finished_at: None,
            };
            tx.execute(
                "INSERT INTO jobs (id, kind, source, target, state, copied, total, source_epoch,
                                   source_version, created_at)
                 VALUES (?1, ?2, ?3, ?4, 'running', 0, ?5, ?6, ?7, ?8)",
                params![
                    job.id,
                    job.kind,
                    job.source,
                    job.target,
                    to_sql(total),
                    to_sql(source_at.epoch),
                    to_sql(source_at.version),
                    job.created_at
                ],
            )
            .map_err(db)?;
            record(&tx, &audit, Some(&target), None, None, Some(job_json(&job)))?;
            tx.commit().map_err(db)?;
            Ok((selector, job))
        })
        .await
    }

    async fn restart_clone(
        &self,
        job: &str,
        source_at: Selector,
        total: u64,
        audit: &Audit,
    ) -> Result<(Selector, JobRecord), StoreError> {
        let (id, audit) = (job.to_owned(), audit.clone());
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            let job = one_job(&tx, &id)?;
            if job.state != JobState::Failed {
                return Err(StoreError::JobState {
                    id,
                    state: job.state,
                });
            }
            if env_state(&tx, &job.target)? != EnvState::Failed {
                return Err(StoreError::EnvExists(job.target));
            }
            for sql in [
                "DELETE FROM flags WHERE env = ?1",
                "DELETE FROM segments WHERE env = ?1",
                "DELETE FROM changes WHERE env = ?1",
            ] {
                tx.execute(sql, [&job.target]).map_err(db)?;
            }
            let selector = Selector {
                epoch: rand::random(),
                version: 0,
            };
            tx.execute(
                "UPDATE environments SET epoch = ?2, version = 0, state = 'creating' WHERE name = ?1",
                params![job.target, to_sql(selector.epoch)],
            )
            .map_err(db)?;
            tx.execute(
                "UPDATE jobs SET state = 'running', copied = 0, total = ?2, error = NULL,
                     source_epoch = ?3, source_version = ?4, finished_at = NULL
                 WHERE id = ?1",
                params![id, to_sql(total), to_sql(source_at.epoch), to_sql(source_at.version)],
            )
            .map_err(db)?;
            let job = one_job(&tx, &id)?;
            record(&tx, &audit, Some(&job.target), None, None, Some(job_json(&job)))?;
            tx.commit().map_err(db)?;
            Ok((selector, job))
        })
        .await
    }

    async fn clone_batch(
        &self,
        job: &str,
        writes: Vec<Write>,
    ) -> Result<Vec<Committed>, StoreError> {
        let id = job.to_owned();
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let job = one_job(&tx, &id)?;
            if job.state != JobState::Running {
                return Err(StoreError::JobState {
                    id,
                    state: job.state,
                });
            }
            let at = env_selector(&tx, &job.target)?;
            let n = writes.len() as u64;
            let mut committed = Vec::with_capacity(writes.len());
            for (i, write) in writes.into_iter().enumerate() {
                let change = write_item(&tx, &job.target, write, at.version + 1 + i as u64)?;
                committed.push(change);
            }
            set_version(&tx, &job.target, at.version + n)?;
            tx.execute(
                "UPDATE jobs SET copied = copied + ?2 WHERE id = ?1",
                params![id, to_sql(n)],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            let at_unix_ns = unix_now_ns();
            Ok(committed
                .into_iter()
                .map(|change| Committed {
                    epoch: at.epoch,
                    change,
                    at_unix_ns,
                })
                .collect())
        })
        .await
    }

    async fn end_clone(&self, job: &str, error: Option<String>) -> Result<JobRecord, StoreError> {
        let id = job.to_owned();
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let job = one_job(&tx, &id)?;
            if job.state != JobState::Running {
                return Err(StoreError::JobState {
                    id,
                    state: job.state,
                });
            }
            let (env_state, job_state) = match error {
                None => (EnvState::Ready, JobState::Done),
                Some(_) => (EnvState::Failed, JobState::Failed),
            };
            tx.execute(
                "UPDATE environments SET state = ?2 WHERE name = ?1",
                params![job.target, env_state.as_str()],
            )
            .map_err(db)?;
            tx.execute(
                "UPDATE jobs SET state = ?2, error = ?3, finished_at = ?4 WHERE id = ?1",
                params![id, job_state.as_str(), error, unix_now()],
            )
            .map_err(db)?;
            let job = one_job(&tx, &id)?;
            tx.commit().map_err(db)?;
            Ok(job)
        })
        .await
    }

    async fn job(&self, id: &str) -> Result<JobRecord, StoreError> {
        let id = id.to_owned();
        self.run(move |conn| one_job(conn, &id)).await
    }

    async fn item_keys(&self, env: &str) -> Result<Vec<(ItemKind, String)>, StoreError> {
        let env = env.to_owned();
        self.run(move |conn| {
            env_selector(conn, &env)?;
            let mut out = Vec::new();
            for kind in [ItemKind::Segment, ItemKind::Flag] {
                let sql = format!("SELECT key FROM {} WHERE env = ?1", table(kind));
                let mut stmt = conn.prepare(&sql).map_err(db)?;
                let keys = stmt
                    .query_map([&env], |r| r.get::<_, String>(0))
                    .map_err(db)?;
                for key in keys {
                    out.push((kind, key.map_err(db)?));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn set_retention(
        &self,
        env: &str,
        retention: Retention,
        audit: &Audit,
    ) -> Result<(), StoreError> {
        let (env, audit) = (env.to_owned(), audit.clone());
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let before: (Option<i64>, Option<i64>) = tx
                .query_row(
                    "SELECT retain_changes, retain_days FROM environments WHERE name = ?1",
                    [&env],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db)?
                .ok_or_else(|| StoreError::EnvNotFound(env.clone()))?;
            let before = Retention {
                max_changes: before.0.map(from_sql),
                max_age_days: before.1.map(from_sql),
            };
            tx.execute(
                "UPDATE environments SET retain_changes = ?2, retain_days = ?3 WHERE name = ?1",
                params![
                    env,
                    retention.max_changes.map(to_sql),
                    retention.max_age_days.map(to_sql)
                ],
            )
            .map_err(db)?;
            let json = |r: Retention| serde_json::to_string(&r).unwrap_or_default();
            record(
                &tx,
                &audit,
                Some(&env),
                None,
                Some(json(before)),
                Some(json(retention)),
            )?;
            tx.commit().map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn prune(
        &self,
        env: &str,
        at_most: u64,
        by_count: u64,
        older_than: i64,
    ) -> Result<u64, StoreError> {
        let env = env.to_owned();
        self.run(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM changes WHERE env = ?1 AND version <= ?2
                         AND (version <= ?3 OR committed_at < ?4)",
                    params![env, to_sql(at_most), to_sql(by_count), older_than],
                )
                .map_err(db)?;
            Ok(n as u64)
        })
        .await
    }

    async fn create_token(&self, token: &TokenRecord, audit: &Audit) -> Result<(), StoreError> {
        let (token, audit) = (token.clone(), audit.clone());
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            let inserted = tx
                .execute(
                    "INSERT INTO admin_tokens (name, hash, prefix, created_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (name) DO NOTHING",
                    params![token.name, hex::encode(token.hash), token.prefix, token.created_at],
                )
                .map_err(db)?;
            if inserted == 0 {
                return Err(StoreError::TokenExists(token.name));
            }
            record(&tx, &audit, None, Some(&token.name), None, Some(token_json(&token)))?;
            tx.commit().map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn revoke_token(&self, name: &str, audit: &Audit) -> Result<TokenRecord, StoreError> {
        let (name, audit) = (name.to_owned(), audit.clone());
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let before = query_tokens(&tx, "WHERE name = ?1", [&name])?
                .pop()
                .ok_or_else(|| StoreError::TokenNotFound(name.clone()))?;
            tx.execute(
                "UPDATE admin_tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE name = ?1",
                params![name, unix_now()],
            )
            .map_err(db)?;
            let after = query_tokens(&tx, "WHERE name = ?1", [&name])?
                .pop()
                .ok_or_else(|| StoreError::TokenNotFound(name.clone()))?;
            record(
                &tx,
                &audit,
                None,
                Some(&name),
                Some(token_json(&before)),
                Some(token_json(&after)),
            )?;
            tx.commit().map_err(db)?;
            Ok(after)
        })
        .await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.run(|conn| query_tokens(conn, "", [])).await
    }

    async fn audit(
        &self,
        env: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let env = env.to_owned();
        self.run(move |conn| {
            let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, at_ms, actor, action, env, target, before, after FROM audit
                     WHERE env = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![env, before, limit], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, Option<String>>(7)?,
                    ))
                })
                .map_err(db)?;
            let json = |t: Option<String>| -> Result<Option<serde_json::Value>, StoreError> {
                t.map(|t| serde_json::from_str(&t))
                    .transpose()
                    .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))
            };
            let mut out = Vec::new();
            for row in rows {
                let (id, at_ms, actor, action, env, target, before, after) = row.map_err(db)?;
                out.push(AuditEntry {
                    id: from_sql(id),
                    at_ms,
                    actor,
                    action,
                    env,
                    target,
                    before: json(before)?,
                    after: json(after)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn changes_since(
        &self,
        env: &str,
        after: u64,
        limit: usize,
    ) -> Result<LogTail, StoreError> {
        let env = env.to_owned();
        self.run(move |conn| {
            let epoch = env_selector(conn, &env)?.epoch;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let changes = log(conn, AFTER, params![env, to_sql(after), limit])?;
            Ok(LogTail { epoch, changes })
        })
        .await
    }

    async fn create_key(&self, key: &KeyRecord, audit: &Audit) -> Result<(), StoreError> {
        let (key, audit) = (key.clone(), audit.clone());
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            env_selector(&tx, &key.env)?;
            tx.execute(
                "INSERT INTO sdk_keys (id, env, kind, hash, prefix, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    key.id,
                    key.env,
                    key.kind.as_str(),
                    hex::encode(key.hash),
                    key.prefix,
                    key.created_at
                ],
            )
            .map_err(db)?;
            record(&tx, &audit, Some(&key.env), Some(&key.id), None, Some(key_json(&key)))?;
            tx.commit().map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn revoke_key(
        &self,
        env: &str,
        id: &str,
        audit: &Audit,
    ) -> Result<KeyRecord, StoreError> {
        let (env, id, audit) = (env.to_owned(), id.to_owned(), audit.clone());
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            env_selector(&tx, &env)?;
            let before = query_keys(&tx, "WHERE env = ?1 AND id = ?2", [&env, &id])?
                .pop()
                .ok_or_else(|| StoreError::KeyNotFound(id.clone()))?;
            tx.execute(
                "UPDATE sdk_keys SET revoked_at = COALESCE(revoked_at, ?3) WHERE env = ?1 AND id = ?2",
                params![env, id, unix_now()],
            )
            .map_err(db)?;
            let after = query_keys(&tx, "WHERE env = ?1 AND id = ?2", [&env, &id])?
                .pop()
                .ok_or_else(|| StoreError::KeyNotFound(id.clone()))?;
            record(
                &tx,
                &audit,
                Some(&env),
                Some(&id),
                Some(key_json(&before)),
                Some(key_json(&after)),
            )?;
            tx.commit().map_err(db)?;
            Ok(after)
        })
        .await
    }

    async fn keys(&self, env: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let env = env.to_owned();
        self.run(move |conn| {
            env_selector(conn, &env)?;
            query_keys(conn, "WHERE env = ?1", [&env])
        })
        .await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.run(|conn| {
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .map_err(db)
        })
        .await
    }
}

#[cfg(test)]
mod upgrade_tests {
    use super::*;

    /// A database as schema 1 left it: no environment state or retention, no jobs, tokens or
    /// audit log.
    const SCHEMA_1: &str = "
        CREATE TABLE environments (name TEXT PRIMARY KEY, epoch INTEGER NOT NULL,
            version INTEGER NOT NULL, created_at INTEGER NOT NULL);
        CREATE TABLE flags (env TEXT NOT NULL REFERENCES environments(name) ON DELETE CASCADE,
            key TEXT NOT NULL, body TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (env, key));
        CREATE TABLE segments (env TEXT NOT NULL REFERENCES environments(name) ON DELETE CASCADE,
            key TEXT NOT NULL, body TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (env, key));
        CREATE TABLE changes (env TEXT NOT NULL REFERENCES environments(name) ON DELETE CASCADE,
            version INTEGER NOT NULL, kind TEXT NOT NULL DEFAULT 'flag', key TEXT NOT NULL, body TEXT,
            committed_at INTEGER NOT NULL, PRIMARY KEY (env, version));
        CREATE TABLE sdk_keys (id TEXT PRIMARY KEY,
            env TEXT NOT NULL REFERENCES environments(name) ON DELETE CASCADE, kind TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, created_at INTEGER NOT NULL,
            revoked_at INTEGER);
        PRAGMA user_version = 1;
    ";

    #[tokio::test]
    async fn a_schema_1_database_is_upgraded_in_place_and_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vane.db");
        let flag = Item::flag(vane_core::model::Flag::boolean("f", true, true))
            .unwrap()
            .body();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_1).unwrap();
            conn.execute("INSERT INTO environments VALUES ('prod', 7, 1, 0)", [])
                .unwrap();
            conn.execute("INSERT INTO flags VALUES ('prod', 'f', ?1, 1)", [&flag])
                .unwrap();
            conn.execute(
                "INSERT INTO changes VALUES ('prod', 1, 'flag', 'f', ?1, 0)",
                [&flag],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert!(!s.created());
        let loaded = s.load(10).await.unwrap();
        let env = &loaded.envs[0];
        assert_eq!((env.selector.epoch, env.selector.version), (7, 1));
        assert_eq!(
            env.state,
            EnvState::Ready,
            "an existing environment is ready"
        );
        assert_eq!(env.retention, Retention::default());
        assert_eq!((env.items.len(), env.changes.len()), (1, 1));
        // And the new tables work.
        let audit = Audit::new("test", "flag.put");
        let put = Write::flag(vane_core::model::Flag::boolean("g", true, true)).unwrap();
        s.commit("prod", put, Expect::Nothing, &audit)
            .await
            .unwrap();
        assert_eq!(s.audit("prod", None, 10).await.unwrap().len(), 1);
        let version: i64 = s
            .conn
            .lock()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }
}
