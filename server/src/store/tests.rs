//! What every store must do, run against each backend: the embedded SQLite file and a real
//! PostgreSQL (the private cluster `scripts/test-all` starts; its URL, without a database, in
//! `VANE_TEST_POSTGRES`). Each PostgreSQL test gets a database of its own, which the store
//! creates at its first connection as it would for an operator.

use std::sync::Arc;

use vane_core::history::{Item, ItemKind, Write};
use vane_core::model::Flag;
use vane_core::protocol::Selector;

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{Audit, Expect, Store, StoreError};
use crate::keys::KeyKind;

/// Where a test's store lives; [`Fixture::open`] opens it again as a restarted node would.
enum Fixture {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

/// The test cluster's URL, without a database.
fn postgres_server() -> String {
    std::env::var("VANE_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "needs PostgreSQL: VANE_TEST_POSTGRES=postgres://USER@HOST:PORT (scripts/test-all \
             starts a private cluster; or `scripts/postgres start DIR`)"
        )
    })
}

impl Fixture {
    fn sqlite() -> Fixture {
        Fixture::Sqlite(tempfile::tempdir().unwrap())
    }

    /// A database of its own on the test cluster: a new name, which the store creates.
    fn postgres() -> Fixture {
        let name = hex::encode(rand::random::<[u8; 8]>());
        Fixture::Postgres(format!("{}/vane_{name}", postgres_server()))
    }

    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Fixture::Sqlite(dir) => {
                Arc::new(SqliteStore::open(&dir.path().join("vane.db")).unwrap())
            }
            Fixture::Postgres(url) => Arc::new(PostgresStore::connect(url).await.unwrap()),
        }
    }
}

fn a() -> Audit {
    Audit::new("test", "test")
}

fn put(key: &str) -> Write {
    Write::flag(Flag::boolean(key, true, true)).unwrap()
}

/// Each scenario, once per backend.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Fixture::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Fixture::postgres()).await;
                }
            )*
        }
    };
}

on_every_store!(
    versions_and_history_survive_reopen,
    preconditions_are_checked_in_the_transaction,
    deleting_an_environment_takes_its_keys_and_a_new_one_gets_a_new_epoch,
    concurrent_writers_take_every_version_once,
    tokens_jobs_and_the_audit_log,
);

async fn versions_and_history_survive_reopen(f: Fixture) {
    let epoch = {
        let s = f.open().await;
        let sel = s.create_env("prod", &a()).await.unwrap();
        s.commit("prod", put("a"), Expect::Nothing, &a())
            .await
            .unwrap();
        s.commit("prod", put("b"), Expect::Nothing, &a())
            .await
            .unwrap();
        let delete = Write::Delete(ItemKind::Flag, "a".into());
        let last = s
            .commit("prod", delete, Expect::Nothing, &a())
            .await
            .unwrap();
        assert_eq!(
            last.selector(),
            Selector {
                epoch: sel.epoch,
                version: 3
            }
        );
        let missing = Write::Delete(ItemKind::Flag, "zz".into());
        assert!(matches!(
            s.commit("prod", missing, Expect::Nothing, &a()).await,
            Err(StoreError::FlagNotFound(_))
        ));
        assert!(matches!(
            s.create_env("prod", &a()).await,
            Err(StoreError::EnvExists(_))
        ));
        s.close().await.unwrap();
        sel.epoch
    };
    let s = f.open().await;
    let loaded = s.load(2).await.unwrap();
    assert_eq!(loaded.envs.len(), 1);
    let env = &loaded.envs[0];
    env.check().unwrap();
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
    assert!(matches!(
        s.changes_since("nope", 0, 10).await,
        Err(StoreError::EnvNotFound(_))
    ));
}

async fn preconditions_are_checked_in_the_transaction(f: Fixture) {
    let s = f.open().await;
    s.create_env("e", &a()).await.unwrap();
    s.commit("e", put("a"), Expect::EnvAt(0), &a())
        .await
        .unwrap();
    // Validated against version 0, but version 1 committed first.
    let stale = s.commit("e", put("b"), Expect::EnvAt(0), &a()).await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { version: 1, .. })),
        "{stale:?}"
    );
    // A read-modify-write of `a` as it was at version 1 goes through once, not twice.
    s.commit("e", put("a"), Expect::ItemAt(1), &a())
        .await
        .unwrap();
    let again = s.commit("e", put("a"), Expect::ItemAt(1), &a()).await;
    assert!(
        matches!(again, Err(StoreError::Conflict { version: 2, .. })),
        "{again:?}"
    );
    let absent = s.commit("e", put("zz"), Expect::ItemAt(1), &a()).await;
    assert!(
        matches!(absent, Err(StoreError::FlagNotFound(_))),
        "{absent:?}"
    );
    // Nothing refused was written.
    let loaded = s.load(10).await.unwrap();
    assert_eq!(loaded.envs[0].selector.version, 2);
    assert_eq!(loaded.envs[0].items.len(), 1);
    assert_eq!(loaded.envs[0].changes.len(), 2);
}

async fn deleting_an_environment_takes_its_keys_and_a_new_one_gets_a_new_epoch(f: Fixture) {
    let s = f.open().await;
    let first = s.create_env("e", &a()).await.unwrap();
    let key = crate::keys::mint("e", KeyKind::Server, 0);
    s.create_key(&key.record, &a()).await.unwrap();
    assert_eq!(s.keys("e").await.unwrap(), vec![key.record.clone()]);
    let revoked = s.revoke_key("e", &key.record.id, &a()).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    let again = s.revoke_key("e", &key.record.id, &a()).await.unwrap();
    assert_eq!(
        again.revoked_at, revoked.revoked_at,
        "the first revocation stands"
    );
    assert!(
        s.load(1).await.unwrap().keys.is_empty(),
        "revoked keys are not loaded"
    );
    s.commit("e", put("a"), Expect::Nothing, &a())
        .await
        .unwrap();
    s.delete_env("e", &a()).await.unwrap();
    assert!(matches!(s.keys("e").await, Err(StoreError::EnvNotFound(_))));
    assert!(matches!(
        s.commit("e", put("a"), Expect::Nothing, &a()).await,
        Err(StoreError::EnvNotFound(_))
    ));
    let second = s.create_env("e", &a()).await.unwrap();
    assert_ne!(first.epoch, second.epoch);
    assert!(s.keys("e").await.unwrap().is_empty());
    let loaded = s.load(10).await.unwrap();
    assert!(loaded.envs[0].items.is_empty() && loaded.envs[0].changes.is_empty());
}

/// Four writers, each with its own store (as four nodes would be), into one environment: every
/// version is taken exactly once and the log is contiguous. SQLite serialises them on its file
/// lock; PostgreSQL on the environment's row lock.
async fn concurrent_writers_take_every_version_once(f: Fixture) {
    f.open().await.create_env("e", &a()).await.unwrap();
    let mut writers = Vec::new();
    for w in 0..4 {
        let s = f.open().await;
        writers.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for i in 0..25 {
                let c = s
                    .commit("e", put(&format!("w{w}-{i}")), Expect::Nothing, &a())
                    .await
                    .unwrap();
                versions.push(c.change.version);
            }
            versions
        }));
    }
    let mut all = Vec::new();
    for w in writers {
        let versions = w.await.unwrap();
        assert!(
            versions.windows(2).all(|p| p[0] < p[1]),
            "a writer's versions rise"
        );
        all.extend(versions);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=100).collect::<Vec<u64>>());
    let s = f.open().await;
    let tail = s.changes_since("e", 0, 1000).await.unwrap();
    let logged: Vec<u64> = tail.changes.iter().map(|c| c.version).collect();
    assert_eq!(logged, (1..=100).collect::<Vec<u64>>());
    let loaded = s.load(1000).await.unwrap();
    loaded.envs[0].check().unwrap();
    assert_eq!(loaded.envs[0].items.len(), 100);
}

async fn tokens_jobs_and_the_audit_log(f: Fixture) {
    let s = f.open().await;
    let src = s.create_env("src", &a()).await.unwrap();
    s.commit(
        "src",
        put("a"),
        Expect::Nothing,
        &Audit::new("alice", "flag.put"),
    )
    .await
    .unwrap();
    // A clone: a job, batches as the target's versions, then ready.
    let at = Selector {
        epoch: src.epoch,
        version: 1,
    };
    let (target, job) = s.begin_clone("src", at, "copy", 1, &a()).await.unwrap();
    assert_eq!(target.version, 0);
    let committed = s.clone_batch(&job.id, vec![put("a")]).await.unwrap();
    assert_eq!(committed[0].change.version, 1);
    assert_eq!(committed[0].epoch, target.epoch);
    let done = s.end_clone(&job.id, None).await.unwrap();
    assert_eq!((done.copied, done.state), (1, super::JobState::Done));
    assert!(matches!(
        s.clone_batch(&job.id, vec![put("b")]).await,
        Err(StoreError::JobState { .. })
    ));
    assert_eq!(
        s.item_keys("copy").await.unwrap(),
        vec![(ItemKind::Flag, "a".to_owned())]
    );

    // Named tokens: hashed, unique, revocable.
    let token = super::TokenRecord {
        name: "ci".into(),
        prefix: "vane_adm_ab".into(),
        hash: [7; 32],
        created_at: 1,
        revoked_at: None,
    };
    s.create_token(&token, &a()).await.unwrap();
    assert!(matches!(
        s.create_token(&token, &a()).await,
        Err(StoreError::TokenExists(_))
    ));
    assert!(
        s.revoke_token("ci", &a())
            .await
            .unwrap()
            .revoked_at
            .is_some()
    );
    assert!(matches!(
        s.revoke_token("nope", &a()).await,
        Err(StoreError::TokenNotFound(_))
    ));

    // The audit log: who, what, before and after; newest first; paged.
    let log = s.audit("src", None, 10).await.unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(
        (log[0].actor.as_str(), log[0].action.as_str()),
        ("alice", "flag.put")
    );
    assert_eq!(log[0].target.as_deref(), Some("a"));
    assert!(log[0].before.is_none() && log[0].after.is_some());
    let older = s.audit("src", Some(log[0].id), 10).await.unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].id, log[1].id);
}
