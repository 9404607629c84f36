//! The embedded store: one SQLite file in the data directory.
//!
//! Every write is one transaction that bumps the environment's version, writes the flag and
//! appends to the change log; it returns only after the commit, with `synchronous=FULL` so an
//! acknowledged change survives a power cut. The store is synchronous: callers run it on the
//! blocking pool (see [`crate::control`]).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use vane_core::history::{Change, Item, ItemKind};
use vane_core::model::{Flag, Segment};
use vane_core::state::Selector;

/// Errors at the store's boundary.
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
    /// A stored row cannot be read back (corruption or a newer schema).
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// An SDK key's kind: what it may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Backend services: rules mode (or evaluated).
    Server,
    /// Mobile apps: evaluated mode only.
    Mobile,
}

impl KeyKind {
    fn as_str(self) -> &'static str {
        match self {
            KeyKind::Server => "server",
            KeyKind::Mobile => "mobile",
        }
    }

    fn parse(s: &str) -> Result<KeyKind, StoreError> {
        match s {
            "server" => Ok(KeyKind::Server),
            "mobile" => Ok(KeyKind::Mobile),
            other => Err(StoreError::Corrupt(format!("key kind {other:?}"))),
        }
    }
}

/// An SDK key as stored: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyRecord {
    /// Public id, used to revoke.
    pub id: String,
    /// The environment it belongs to.
    pub env: String,
    /// Server or mobile.
    pub kind: KeyKind,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    /// SHA-256 of the secret, hex.
    #[serde(skip)]
    pub hash: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `None` while valid.
    pub revoked_at: Option<i64>,
}

/// An environment with its flags and recent change log, as loaded at start.
#[derive(Debug)]
pub struct LoadedEnv {
    /// The name.
    pub name: String,
    /// Epoch and current version.
    pub selector: Selector,
    /// Current flags and segments, compiled.
    pub items: Vec<Item>,
    /// The newest changes, oldest first.
    pub changes: Vec<Change>,
}

/// The SQLite store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
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

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

// SQLite integers are signed; epochs and versions are u64 stored bit for bit.
fn to_sql(v: u64) -> i64 {
    v as i64
}
fn from_sql(v: i64) -> u64 {
    v as u64
}

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

fn kind_str(kind: ItemKind) -> &'static str {
    match kind {
        ItemKind::Flag => "flag",
        ItemKind::Segment => "segment",
    }
}

fn table(kind: ItemKind) -> &'static str {
    match kind {
        ItemKind::Flag => "flags",
        ItemKind::Segment => "segments",
    }
}

/// Parses and compiles a stored body.
fn parse_item(kind: ItemKind, body: &str) -> Result<Item, StoreError> {
    let corrupt = |e: String| StoreError::Corrupt(format!("{} JSON: {e}", kind_str(kind)));
    match kind {
        ItemKind::Flag => {
            let flag: Flag = serde_json::from_str(body).map_err(|e| corrupt(e.to_string()))?;
            Item::flag(flag).map_err(|e| corrupt(e.to_string()))
        }
        ItemKind::Segment => {
            let seg: Segment = serde_json::from_str(body).map_err(|e| corrupt(e.to_string()))?;
            Item::segment(seg).map_err(|e| corrupt(e.to_string()))
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "database schema {version} is newer than this server ({SCHEMA_VERSION}); upgrade vane"
            )));
        }
        conn.execute_batch(SCHEMA)?;
        // Databases from before segments: their change log has no `kind` column.
        let has_kind: bool = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('changes') WHERE name = 'kind'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_kind {
            conn.execute_batch(
                "ALTER TABLE changes ADD COLUMN kind TEXT NOT NULL DEFAULT 'flag';",
            )?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Store { conn })
    }

    /// Every environment with its flags and its newest `window` changes.
    pub fn load(&self, window: usize) -> Result<Vec<LoadedEnv>, StoreError> {
        let mut envs = Vec::new();
        let mut stmt = self
            .conn
            .prepare("SELECT name, epoch, version FROM environments ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (name, epoch, version) = row?;
            let mut items = self.items(&name, ItemKind::Segment)?;
            items.extend(self.items(&name, ItemKind::Flag)?);
            let changes = self.recent_changes(&name, window)?;
            envs.push(LoadedEnv {
                name,
                selector: Selector {
                    epoch: from_sql(epoch),
                    version: from_sql(version),
                },
                items,
                changes,
            });
        }
        Ok(envs)
    }

    fn items(&self, env: &str, kind: ItemKind) -> Result<Vec<Item>, StoreError> {
        let sql = format!(
            "SELECT body FROM {} WHERE env = ?1 ORDER BY key",
            table(kind)
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let bodies = stmt.query_map([env], |r| r.get::<_, String>(0))?;
        bodies.map(|b| parse_item(kind, &b?)).collect()
    }

    fn recent_changes(&self, env: &str, window: usize) -> Result<Vec<Change>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT version, kind, key, body FROM changes WHERE env = ?1 ORDER BY version DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![env, window as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        let mut changes = Vec::new();
        for row in rows {
            let (version, kind, key, body) = row?;
            let kind = match kind.as_str() {
                "flag" => ItemKind::Flag,
                "segment" => ItemKind::Segment,
                other => return Err(StoreError::Corrupt(format!("change kind {other:?}"))),
            };
            let item = body.map(|b| parse_item(kind, &b)).transpose()?;
            changes.push(Change {
                version: from_sql(version),
                kind,
                key,
                item,
            });
        }
        changes.reverse();
        Ok(changes)
    }

    /// Every SDK key that is not revoked.
    pub fn active_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.query_keys("WHERE revoked_at IS NULL", [])
    }

    /// Every key of `env`, revoked ones included.
    pub fn keys(&self, env: &str) -> Result<Vec<KeyRecord>, StoreError> {
        self.env_selector(env)?;
        self.query_keys("WHERE env = ?1", [env])
    }

    fn query_keys<P: rusqlite::Params>(
        &self,
        filter: &str,
        p: P,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let sql = format!(
            "SELECT id, env, kind, prefix, hash, created_at, revoked_at FROM sdk_keys {filter} ORDER BY created_at, id"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
            ))
        })?;
        rows.map(|row| {
            let (id, env, kind, prefix, hash, created_at, revoked_at) = row?;
            Ok(KeyRecord {
                id,
                env,
                kind: KeyKind::parse(&kind)?,
                prefix,
                hash,
                created_at,
                revoked_at,
            })
        })
        .collect()
    }

    fn env_selector(&self, env: &str) -> Result<Selector, StoreError> {
        self.conn
            .query_row(
                "SELECT epoch, version FROM environments WHERE name = ?1",
                [env],
                |r| {
                    Ok(Selector {
                        epoch: from_sql(r.get(0)?),
                        version: from_sql(r.get(1)?),
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::EnvNotFound(env.to_owned()))
    }

    /// Creates an environment at version 0 with a fresh random epoch.
    pub fn create_env(&mut self, name: &str) -> Result<Selector, StoreError> {
        let selector = Selector {
            epoch: rand::random(),
            version: 0,
        };
        let inserted = self.conn.execute(
            "INSERT INTO environments (name, epoch, version, created_at) VALUES (?1, ?2, 0, ?3)
             ON CONFLICT (name) DO NOTHING",
            params![name, to_sql(selector.epoch), now_secs()],
        )?;
        if inserted == 0 {
            return Err(StoreError::EnvExists(name.to_owned()));
        }
        Ok(selector)
    }

    /// Deletes an environment with its flags, history and keys.
    pub fn delete_env(&mut self, name: &str) -> Result<(), StoreError> {
        match self
            .conn
            .execute("DELETE FROM environments WHERE name = ?1", [name])?
        {
            0 => Err(StoreError::EnvNotFound(name.to_owned())),
            _ => Ok(()),
        }
    }

    /// Commits one change to the `kind` item `key` in `env` as the next version: `body` is its
    /// JSON (the store sets `version` in it), `None` deletes it. Deleting an item that does not
    /// exist is a not-found error and changes nothing.
    pub fn commit_item(
        &mut self,
        env: &str,
        kind: ItemKind,
        key: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Selector, StoreError> {
        let tx = self.conn.transaction()?;
        let (epoch, current) = tx
            .query_row(
                "SELECT epoch, version FROM environments WHERE name = ?1",
                [env],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::EnvNotFound(env.to_owned()))?;
        let version = from_sql(current) + 1;
        let stored = match body {
            Some(mut body) => {
                if let Some(obj) = body.as_object_mut() {
                    obj.insert("version".into(), version.into());
                }
                let text = body.to_string();
                let sql = format!(
                    "INSERT INTO {} (env, key, body, version) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (env, key) DO UPDATE SET body = excluded.body, version = excluded.version",
                    table(kind)
                );
                tx.execute(&sql, params![env, key, text, to_sql(version)])?;
                Some(text)
            }
            None => {
                let sql = format!("DELETE FROM {} WHERE env = ?1 AND key = ?2", table(kind));
                if tx.execute(&sql, [env, key])? == 0 {
                    return Err(match kind {
                        ItemKind::Flag => StoreError::FlagNotFound(key.to_owned()),
                        ItemKind::Segment => StoreError::SegmentNotFound(key.to_owned()),
                    });
                }
                None
            }
        };
        tx.execute(
            "INSERT INTO changes (env, version, kind, key, body, committed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![env, to_sql(version), kind_str(kind), key, stored, now_secs()],
        )?;
        tx.execute(
            "UPDATE environments SET version = ?2 WHERE name = ?1",
            params![env, to_sql(version)],
        )?;
        tx.commit()?;
        Ok(Selector {
            epoch: from_sql(epoch),
            version,
        })
    }

    /// Commits a flag (or its deletion); see [`Store::commit_item`].
    pub fn commit_flag(
        &mut self,
        env: &str,
        key: &str,
        flag: Option<&Flag>,
    ) -> Result<Selector, StoreError> {
        let body = flag
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.commit_item(env, ItemKind::Flag, key, body)
    }

    /// Stores a new SDK key (its hash; the secret is never stored).
    pub fn create_key(&mut self, record: &KeyRecord) -> Result<(), StoreError> {
        self.env_selector(&record.env)?;
        self.conn.execute(
            "INSERT INTO sdk_keys (id, env, kind, hash, prefix, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                record.id,
                record.env,
                record.kind.as_str(),
                record.hash,
                record.prefix,
                record.created_at
            ],
        )?;
        Ok(())
    }

    /// Marks a key revoked; returns it. Revoking twice keeps the first time.
    pub fn revoke_key(&mut self, env: &str, id: &str) -> Result<KeyRecord, StoreError> {
        self.conn.execute(
            "UPDATE sdk_keys SET revoked_at = COALESCE(revoked_at, ?3) WHERE env = ?1 AND id = ?2",
            params![env, id, now_secs()],
        )?;
        self.query_keys("WHERE env = ?1 AND id = ?2", [env, id])?
            .pop()
            .ok_or_else(|| StoreError::KeyNotFound(id.to_owned()))
    }

    /// Flushes the write-ahead log into the database file, for a clean close.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    }
}

/// Unix seconds now, for records made outside the store.
pub fn unix_now() -> i64 {
    now_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_history_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vane.db");
        let epoch = {
            let mut s = Store::open(&path).unwrap();
            let sel = s.create_env("prod").unwrap();
            s.commit_flag("prod", "a", Some(&Flag::boolean("a", true, true)))
                .unwrap();
            s.commit_flag("prod", "b", Some(&Flag::boolean("b", true, true)))
                .unwrap();
            let last = s.commit_flag("prod", "a", None).unwrap();
            assert_eq!(last.version, 3);
            assert!(matches!(
                s.commit_flag("prod", "zz", None),
                Err(StoreError::FlagNotFound(_))
            ));
            assert!(matches!(
                s.create_env("prod"),
                Err(StoreError::EnvExists(_))
            ));
            sel.epoch
        };
        let s = Store::open(&path).unwrap();
        let envs = s.load(2).unwrap();
        assert_eq!(envs.len(), 1);
        let env = &envs[0];
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
            env.changes[1].item.is_none(),
            "a delete is logged without a body"
        );
    }

    #[test]
    fn deleting_an_environment_takes_its_keys_and_a_new_one_gets_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("vane.db")).unwrap();
        let first = s.create_env("e").unwrap();
        s.create_key(&KeyRecord {
            id: "k1".into(),
            env: "e".into(),
            kind: KeyKind::Server,
            prefix: "p".into(),
            hash: "h".into(),
            created_at: 0,
            revoked_at: None,
        })
        .unwrap();
        s.delete_env("e").unwrap();
        assert!(s.active_keys().unwrap().is_empty());
        let second = s.create_env("e").unwrap();
        assert_ne!(first.epoch, second.epoch);
    }
}
