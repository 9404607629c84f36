//! The embedded store: one SQLite file in the data directory, nothing to install.
//!
//! One connection, behind a mutex, on the blocking pool: SQLite serialises writers anyway, and
//! the mutex makes each method one transaction with nothing interleaved. `synchronous=FULL` in
//! WAL mode, so an acknowledged change survives a power cut.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use vane_core::history::{Change, Item, ItemKind, Logged, Write};
use vane_core::protocol::Selector;

use super::{
    Committed, Expect, Loaded, LoadedEnv, LogTail, Store, StoreError, unix_now, unix_now_ns,
};
use crate::keys::{KeyKind, KeyRecord, SecretHash};

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
    created_at INTEGER NOT NULL
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
";

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Backend {
        backend: "sqlite",
        message: e.to_string(),
    }
}

// SQLite integers are signed; epochs and versions are u64 stored bit for bit.
fn to_sql(v: u64) -> i64 {
    v as i64
}
fn from_sql(v: i64) -> u64 {
    v as u64
}

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
        // Databases from before segments: their change log has no `kind` column.
        let has_kind: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('changes') WHERE name = 'kind'",
                [],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )
            .map_err(db)?;
        if !has_kind {
            conn.execute_batch("ALTER TABLE changes ADD COLUMN kind TEXT NOT NULL DEFAULT 'flag';")
                .map_err(db)?;
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
        let hash = hex::decode(&hash)
            .ok()
            .and_then(|h| SecretHash::try_from(h).ok())
            .ok_or_else(|| StoreError::Corrupt(format!("key {id}: unreadable hash")))?;
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

fn commit(
    conn: &mut Connection,
    env: &str,
    write: Write,
    expect: Expect,
) -> Result<Committed, StoreError> {
    let tx = conn.transaction().map_err(db)?;
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
    tx.execute(
        "UPDATE environments SET version = ?2 WHERE name = ?1",
        params![env, to_sql(version)],
    )
    .map_err(db)?;
    tx.commit().map_err(db)?;
    Ok(Committed {
        epoch: current.epoch,
        change,
        at_unix_ns: unix_now_ns(),
    })
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn load(&self, window: usize) -> Result<Loaded, StoreError> {
        self.run(move |conn| {
            let names: Vec<(String, i64, i64)> = {
                let mut stmt = conn
                    .prepare("SELECT name, epoch, version FROM environments ORDER BY name")
                    .map_err(db)?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .map_err(db)?;
                rows.collect::<Result<_, _>>().map_err(db)?
            };
            let mut envs = Vec::with_capacity(names.len());
            for (name, epoch, version) in names {
                let mut items_ = items(conn, &name, ItemKind::Segment)?;
                items_.extend(items(conn, &name, ItemKind::Flag)?);
                let window = i64::try_from(window).unwrap_or(i64::MAX);
                let changes = logged(conn, RECENT, params![name, window])?;
                envs.push(LoadedEnv {
                    name,
                    selector: Selector {
                        epoch: from_sql(epoch),
                        version: from_sql(version),
                    },
                    items: items_,
                    changes,
                });
            }
            let keys = query_keys(conn, "WHERE revoked_at IS NULL", [])?;
            Ok(Loaded { envs, keys })
        })
        .await
    }

    async fn create_env(&self, name: &str) -> Result<Selector, StoreError> {
        let name = name.to_owned();
        self.run(move |conn| {
            let selector = Selector {
                epoch: rand::random(),
                version: 0,
            };
            let inserted = conn
                .execute(
                    "INSERT INTO environments (name, epoch, version, created_at) VALUES (?1, ?2, 0, ?3)
                     ON CONFLICT (name) DO NOTHING",
                    params![name, to_sql(selector.epoch), unix_now()],
                )
                .map_err(db)?;
            if inserted == 0 {
                return Err(StoreError::EnvExists(name));
            }
            Ok(selector)
        })
        .await
    }

    async fn delete_env(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.run(move |conn| {
            match conn
                .execute("DELETE FROM environments WHERE name = ?1", [&name])
                .map_err(db)?
            {
                0 => Err(StoreError::EnvNotFound(name)),
                _ => Ok(()),
            }
        })
        .await
    }

    async fn commit(
        &self,
        env: &str,
        write: Write,
        expect: Expect,
    ) -> Result<Committed, StoreError> {
        let env = env.to_owned();
        self.run(move |conn| commit(conn, &env, write, expect))
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

    async fn create_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let key = key.clone();
        self.run(move |conn| {
            env_selector(conn, &key.env)?;
            conn.execute(
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
            Ok(())
        })
        .await
    }

    async fn revoke_key(&self, env: &str, id: &str) -> Result<KeyRecord, StoreError> {
        let (env, id) = (env.to_owned(), id.to_owned());
        self.run(move |conn| {
            env_selector(conn, &env)?;
            conn.execute(
                "UPDATE sdk_keys SET revoked_at = COALESCE(revoked_at, ?3) WHERE env = ?1 AND id = ?2",
                params![env, id, unix_now()],
            )
            .map_err(db)?;
            query_keys(conn, "WHERE env = ?1 AND id = ?2", [&env, &id])?
                .pop()
                .ok_or(StoreError::KeyNotFound(id))
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
mod tests {
    use super::*;
    use vane_core::model::Flag;

    fn put(key: &str) -> Write {
        Write::flag(Flag::boolean(key, true, true)).unwrap()
    }

    #[tokio::test]
    async fn versions_and_history_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vane.db");
        let epoch = {
            let s = SqliteStore::open(&path).unwrap();
            let sel = s.create_env("prod").await.unwrap();
            s.commit("prod", put("a"), Expect::Nothing).await.unwrap();
            s.commit("prod", put("b"), Expect::Nothing).await.unwrap();
            let delete = Write::Delete(ItemKind::Flag, "a".into());
            let last = s.commit("prod", delete, Expect::Nothing).await.unwrap();
            assert_eq!(
                last.selector(),
                Selector {
                    epoch: sel.epoch,
                    version: 3
                }
            );
            let missing = Write::Delete(ItemKind::Flag, "zz".into());
            assert!(matches!(
                s.commit("prod", missing, Expect::Nothing).await,
                Err(StoreError::FlagNotFound(_))
            ));
            assert!(matches!(
                s.create_env("prod").await,
                Err(StoreError::EnvExists(_))
            ));
            s.close().await.unwrap();
            sel.epoch
        };
        let s = SqliteStore::open(&path).unwrap();
        let loaded = s.load(2).await.unwrap();
        assert_eq!(loaded.envs.len(), 1);
        let env = &loaded.envs[0];
        assert_eq!(env.selector, Selector { epoch, version: 3 });
        assert_eq!(env.items.len(), 1);
        let Item::Flag(b) = &env.items[0] else {
            panic!("a flag")
        };
        assert_eq!(b.compiled.flag().version, 2);
        let versions: Vec<u64> = env.changes.iter().map(|c| c.version).collect();
        assert_eq!(
            versions,
            vec![2, 3],
            "the newest `window` changes, oldest first"
        );
        assert!(
            env.changes[1].wire.is_none(),
            "a delete is logged without a body"
        );

        let tail = s.changes_since("prod", 1, 10).await.unwrap();
        assert_eq!(tail.epoch, epoch);
        let versions: Vec<u64> = tail.changes.iter().map(|c| c.version).collect();
        assert_eq!(versions, [2, 3]);
        assert_eq!(
            s.changes_since("prod", 2, 1).await.unwrap().changes.len(),
            1
        );
        assert!(
            s.changes_since("prod", 3, 10)
                .await
                .unwrap()
                .changes
                .is_empty()
        );
    }

    #[tokio::test]
    async fn preconditions_are_checked_in_the_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("vane.db")).unwrap();
        s.create_env("e").await.unwrap();
        s.commit("e", put("a"), Expect::EnvAt(0)).await.unwrap();
        // Validated against version 0, but version 1 committed first.
        let stale = s.commit("e", put("b"), Expect::EnvAt(0)).await;
        assert!(
            matches!(stale, Err(StoreError::Conflict { version: 1, .. })),
            "{stale:?}"
        );
        // A read-modify-write of `a` as it was at version 1 goes through once, not twice.
        s.commit("e", put("a"), Expect::ItemAt(1)).await.unwrap();
        let again = s.commit("e", put("a"), Expect::ItemAt(1)).await;
        assert!(
            matches!(again, Err(StoreError::Conflict { version: 2, .. })),
            "{again:?}"
        );
        let absent = s.commit("e", put("zz"), Expect::ItemAt(1)).await;
        assert!(
            matches!(absent, Err(StoreError::FlagNotFound(_))),
            "{absent:?}"
        );
        // Nothing refused was written.
        let loaded = s.load(10).await.unwrap();
        assert_eq!(loaded.envs[0].selector.version, 2);
        assert_eq!(loaded.envs[0].items.len(), 1);
    }

    #[tokio::test]
    async fn deleting_an_environment_takes_its_keys_and_a_new_one_gets_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("vane.db")).unwrap();
        let first = s.create_env("e").await.unwrap();
        let key = crate::keys::mint("e", KeyKind::Server, 0);
        s.create_key(&key.record).await.unwrap();
        assert_eq!(s.keys("e").await.unwrap(), vec![key.record.clone()]);
        let revoked = s.revoke_key("e", &key.record.id).await.unwrap();
        assert!(revoked.revoked_at.is_some());
        assert!(
            s.load(1).await.unwrap().keys.is_empty(),
            "revoked keys are not loaded"
        );
        s.delete_env("e").await.unwrap();
        assert!(matches!(s.keys("e").await, Err(StoreError::EnvNotFound(_))));
        let second = s.create_env("e").await.unwrap();
        assert_ne!(first.epoch, second.epoch);
        assert!(s.keys("e").await.unwrap().is_empty());
    }
}
