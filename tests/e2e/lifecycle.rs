//! Environment lifecycle through a real server: clones that are `creating` then `ready`,
//! refused sessions and SDK requests meanwhile, failure and retry, deletion mid-clone, a
//! restart mid-clone, named admin tokens and the audit log, and change-log retention.

use std::time::Duration;

use serde_json::{Value, json};
use vane_core::client::TransportPreference;
use vane_server::api::client::AdminClient;
use vane_server::api::{EnvState, ErrorCode, JobInfo, JobState, Retention};
use vane_server::keys::KeyKind;
use vane_server::store::Store;
use vane_server::store::sqlite::SqliteStore;

use crate::harness::*;

/// Flags in the source environment (and one segment).
const FLAGS: usize = 60;

/// A server whose clones copy 5 items per batch with a pause, so a test sees them `creating`.
async fn slow_cloning() -> TestServer {
    TestServer::start_with(|c| {
        c.control.clone_batch = 5;
        c.control.clone_pause = Duration::from_millis(100);
    })
    .await
}

/// A slowly cloning server with `prod` seeded, and the job of its clone into `staging`, just
/// started.
async fn cloning() -> (TestServer, JobInfo) {
    let server = slow_cloning().await;
    seed(&server).await;
    let job = server
        .admin
        .clone_env("prod", "staging", Some(true))
        .await
        .unwrap();
    (server, job)
}

/// `prod` with a segment and [`FLAGS`] flags, the first of which uses the segment.
async fn seed(server: &TestServer) {
    server.admin.create_env("prod").await.unwrap();
    server
        .put_segment("prod", "staff", json!({"included": ["u-boss"]}))
        .await;
    server
        .put_flag(
            "prod",
            "f00",
            json!({"on": true, "variants": {"a": 1, "b": 2}, "off_variant": "a",
                   "rules": [{"clauses": [{"op": "in_segment", "values": ["staff"]}], "serve": {"variant": "b"}}],
                   "fallthrough": {"variant": "a"}}),
        )
        .await;
    for i in 1..FLAGS {
        server
            .put_bool("prod", &format!("f{i:02}"), i % 2 == 0)
            .await;
    }
}

/// An edit of `env`: a flag `x` put.
async fn put_x(
    server: &TestServer,
    env: &str,
) -> Result<vane_server::api::Written, vane_server::api::client::AdminError> {
    let flag = vane_core::model::Flag::boolean("x", true, true);
    server.admin.put_flag(env, "x", &flag).await
}

/// Polls the job until it is no longer running.
async fn finished(admin: &AdminClient, id: &str) -> JobInfo {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let job = admin.job(id).await.unwrap();
            if job.state != JobState::Running {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the job ended in time")
}

/// Polls until the job has copied at least `n` items.
async fn copied_at_least(admin: &AdminClient, id: &str, n: u64) -> JobInfo {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let job = admin.job(id).await.unwrap();
            if job.copied >= n || job.state != JobState::Running {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the job made progress in time")
}

/// The flags of an environment as JSON, without their versions (which differ between copies).
async fn definitions(admin: &AdminClient, env: &str) -> Vec<Value> {
    let list = admin.flags(env).await.unwrap();
    list.flags
        .iter()
        .map(|f| {
            let mut v = serde_json::to_value(f).unwrap();
            v.as_object_mut().unwrap().remove("version");
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_is_creating_until_ready_and_waiting_clients_then_get_a_full_snapshot() {
    let (server, job) = cloning().await;
    assert_eq!(
        (job.state, job.total, job.target.as_str()),
        (JobState::Running, FLAGS as u64 + 1, "staging")
    );

    // While creating: listed with progress, keys can be made, but nothing is served or edited.
    let env = server.admin.env("staging").await.unwrap();
    assert_eq!(env.state, EnvState::Creating);
    assert_eq!(env.job.as_deref(), Some(job.id.as_str()));
    assert_eq!(env.progress.unwrap().total, FLAGS as u64 + 1);
    let key = server.key("staging", KeyKind::Server).await;
    let (status, _, message) = refusal(put_x(&server, "staging").await);
    assert_eq!(status, 409);
    assert!(message.contains("being created"), "{message}");
    let ofrep = reqwest::Client::new()
        .post(format!(
            "http://{}/ofrep/v1/evaluate/flags/f01",
            server.http
        ))
        .header("x-api-key", &key)
        .json(&json!({"context": {"targetingKey": "u-1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(ofrep.status(), 503);
    assert!(ofrep.headers().contains_key("retry-after"));
    let body: Value = ofrep.json().await.unwrap();
    assert_eq!(body["error"]["code"], "environment_not_ready");

    // A client started now is refused with ENVIRONMENT_NOT_READY, retries, and is admitted.
    let config = server.client_config(&key, TransportPreference::Tcp);
    let (client, _updates) = vane_core::client::Client::start_with_updates(config).unwrap();
    let mut status = client.watch_status();
    let refused = status_until(&mut status, |s| s.last_error.is_some() || s.initialized).await;
    assert!(
        refused
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("ENVIRONMENT_NOT_READY")),
        "{refused:?}"
    );
    let done = finished(&server.admin, &job.id).await;
    assert_eq!(
        (done.state, done.copied),
        (JobState::Done, FLAGS as u64 + 1)
    );
    client.wait_for_initialization(PATIENCE).await.unwrap();
    assert_eq!(client.flags().keys().len(), FLAGS, "every flag, at once");
    assert_eq!(
        client
            .details_for(
                "f00",
                &vane_core::eval::Context::parse(r#"{"key":"u-boss"}"#).unwrap()
            )
            .variant
            .as_deref(),
        Some("b"),
        "the segment came along"
    );

    // Ready: same definitions, its own epoch, only its own key, and editable.
    let (prod, staging) = (
        server.admin.env("prod").await.unwrap(),
        server.admin.env("staging").await.unwrap(),
    );
    assert_eq!(staging.state, EnvState::Ready);
    assert_eq!(staging.at.version, FLAGS as u64 + 1);
    assert_ne!(staging.at.epoch, prod.at.epoch);
    assert_eq!(
        definitions(&server.admin, "staging").await,
        definitions(&server.admin, "prod").await
    );
    assert_eq!(server.admin.keys("staging").await.unwrap().keys.len(), 1);
    server.put_bool("staging", "x", true).await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_clone_answers_when_done_and_a_clone_needs_a_new_name() {
    let server = TestServer::start().await;
    seed(&server).await;
    let job = server.admin.clone_env("prod", "dev", None).await.unwrap();
    assert_eq!(
        (job.state, job.copied),
        (JobState::Done, FLAGS as u64 + 1),
        "synchronous by size"
    );
    assert_eq!(
        server.admin.env("dev").await.unwrap().state,
        EnvState::Ready
    );
    let (status, code, _) = refusal(server.admin.clone_env("prod", "dev", None).await);
    assert_eq!((status, code), (409, ErrorCode::EnvironmentExists));
    let (status, code, _) = refusal(server.admin.clone_env("nope", "dev2", None).await);
    assert_eq!((status, code), (404, ErrorCode::EnvironmentNotFound));
    let (status, code, _) = refusal(server.admin.clone_env("prod", "bad name", None).await);
    assert_eq!((status, code), (422, ErrorCode::Invalid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_environment_while_it_is_created_fails_its_job() {
    let (server, job) = cloning().await;
    copied_at_least(&server.admin, &job.id, 5).await;
    server.admin.delete_env("staging").await.unwrap();
    let failed = finished(&server.admin, &job.id).await;
    assert_eq!(failed.state, JobState::Failed);
    assert!(
        failed.error.as_deref().unwrap().contains("deleted"),
        "{failed:?}"
    );
    let (status, code, _) = refusal(server.admin.env("staging").await);
    assert_eq!((status, code), (404, ErrorCode::EnvironmentNotFound));
    // Nothing of it is left: the name can be cloned into again, whole.
    let again = server
        .admin
        .clone_env("prod", "staging", Some(false))
        .await
        .unwrap();
    assert_eq!(again.state, JobState::Done);
    assert_eq!(
        server.admin.flags("staging").await.unwrap().flags.len(),
        FLAGS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_clone_resumes_it_when_the_source_is_unchanged() {
    let (mut server, job) = cloning().await;
    let before = copied_at_least(&server.admin, &job.id, 10).await;
    assert_eq!(before.state, JobState::Running);
    server.restart().await;
    let env = server.admin.env("staging").await.unwrap();
    assert_ne!(
        env.state,
        EnvState::Ready,
        "a half-copied environment is never served as ready"
    );
    let done = finished(&server.admin, &job.id).await;
    assert_eq!(
        (done.state, done.copied),
        (JobState::Done, FLAGS as u64 + 1)
    );
    let staging = server.admin.env("staging").await.unwrap();
    assert_eq!(staging.state, EnvState::Ready);
    assert_eq!(
        staging.at.version,
        FLAGS as u64 + 1,
        "each item copied once"
    );
    assert_eq!(
        definitions(&server.admin, "staging").await,
        definitions(&server.admin, "prod").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_interrupted_after_its_source_changed_fails_cleanly_and_can_be_retried() {
    let (mut server, job) = cloning().await;
    copied_at_least(&server.admin, &job.id, 10).await;
    // The source takes edits while it is copied (the copy is of the version asked for)...
    server.toggle("prod", "f01", false).await;
    // ...and the server stops before the copy ends: it cannot be resumed from that version.
    server.restart().await;
    let failed = finished(&server.admin, &job.id).await;
    assert_eq!(failed.state, JobState::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .unwrap()
            .contains("source has changed"),
        "{failed:?}"
    );
    let env = server.admin.env("staging").await.unwrap();
    assert_eq!(env.state, EnvState::Failed);
    assert!(env.error.is_some());
    // Another restart: still failed, and still says which job and why.
    server.restart().await;
    let env = server.admin.env("staging").await.unwrap();
    assert_eq!(env.state, EnvState::Failed);
    assert_eq!(env.job.as_deref(), Some(job.id.as_str()));
    assert_eq!(env.error, failed.error);
    let key = server.key("staging", KeyKind::Server).await;
    let snapshot = reqwest::Client::new()
        .get(format!("http://{}/sdk/v1/snapshot", server.http))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(snapshot.status(), 503, "a failed environment is not served");
    let (status, code, _) = refusal(put_x(&server, "staging").await);
    assert_eq!((status, code), (409, ErrorCode::EnvironmentNotReady));

    // Retried: copied again from the source as it is now.
    let retried = server.admin.retry_job(&job.id).await.unwrap();
    assert_eq!(retried.state, JobState::Running);
    let (status, code, _) = refusal(server.admin.retry_job(&job.id).await);
    assert_eq!(
        (status, code),
        (409, ErrorCode::JobState),
        "only a failed clone is retried"
    );
    let done = finished(&server.admin, &job.id).await;
    assert_eq!(done.state, JobState::Done);
    assert_eq!(
        definitions(&server.admin, "staging").await,
        definitions(&server.admin, "prod").await
    );
    let f01 = server.admin.flag("staging", "f01").await.unwrap();
    assert!(
        !f01.on,
        "the copy has the edit made during the first attempt"
    );
    let (client, _updates) = server.client(&key, TransportPreference::Auto).await;
    assert_eq!(client.flags().keys().len(), FLAGS);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tokens_are_recorded_in_the_audit_log_with_before_and_after_and_no_secret() {
    let server = TestServer::start().await;
    server.admin.create_env("prod").await.unwrap();
    let alice = server.admin.create_token("alice").await.unwrap();
    assert!(alice.secret.starts_with("vane_adm_"));
    let (status, code, _) = refusal(server.admin.create_token("alice").await);
    assert_eq!((status, code), (409, ErrorCode::TokenExists));
    let (status, code, _) = refusal(server.admin.create_token("admin").await);
    assert_eq!(
        (status, code),
        (422, ErrorCode::Invalid),
        "the root token's name is reserved"
    );
    let as_alice = server.admin.with_token(&alice.secret);
    as_alice
        .put_flag(
            "prod",
            "f",
            &vane_core::model::Flag::boolean("f", true, true),
        )
        .await
        .unwrap();
    as_alice.toggle("prod", "f", false).await.unwrap();
    let key = as_alice.create_key("prod", KeyKind::Mobile).await.unwrap();
    server.admin.revoke_key("prod", &key.key.id).await.unwrap();

    let page = server.admin.audit("prod", 50, None).await.unwrap();
    let actions: Vec<(&str, &str)> = page
        .entries
        .iter()
        .map(|e| (e.actor.as_str(), e.action.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("admin", "key.revoke"),
            ("alice", "key.create"),
            ("alice", "flag.toggle"),
            ("alice", "flag.put"),
            ("admin", "env.create"),
        ]
    );
    let toggle = &page.entries[2];
    assert_eq!(toggle.target.as_deref(), Some("f"));
    assert_eq!(toggle.before.as_ref().unwrap()["on"], true);
    assert_eq!(toggle.after.as_ref().unwrap()["on"], false);
    assert!(page.entries[3].before.is_none(), "a creation has no before");
    let text = serde_json::to_string(&page).unwrap();
    assert!(!text.contains(&key.secret), "no secret in the audit log");
    assert!(!text.contains("hash"), "no hash either: {text}");
    // Pages, newest first.
    let first = server.admin.audit("prod", 2, None).await.unwrap();
    assert_eq!(first.entries.len(), 2);
    let second = server
        .admin
        .audit("prod", 2, first.next_before)
        .await
        .unwrap();
    assert_eq!(second.entries[0].id, page.entries[2].id);

    // Revoked: refused at once; the list says so.
    server.admin.revoke_token("alice").await.unwrap();
    let (status, code, _) = refusal(as_alice.envs().await);
    assert_eq!((status, code), (401, ErrorCode::Unauthorized));
    let tokens = server.admin.tokens().await.unwrap();
    assert!(tokens.tokens[0].revoked_at.is_some());
    // The audit log outlives its environment.
    server.admin.delete_env("prod").await.unwrap();
    let page = server.admin.audit("prod", 1, None).await.unwrap();
    assert_eq!(page.entries[0].action, "env.delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_log_is_pruned_to_its_retention_but_never_below_the_window() {
    let server = TestServer::start_with(|c| {
        c.history_window = 5;
        c.control.retention = Retention {
            max_changes: Some(12),
            max_age_days: None,
        };
        c.prune_interval = Duration::from_millis(100);
    })
    .await;
    server.admin.create_env("prod").await.unwrap();
    server.admin.create_env("dev").await.unwrap();
    for i in 0..30 {
        server
            .put_bool("prod", &format!("f{}", i % 3), i % 2 == 0)
            .await;
        server
            .put_bool("dev", &format!("f{}", i % 3), i % 2 == 0)
            .await;
    }
    // dev keeps less than the server's default, but not less than the window.
    let dev = server
        .admin
        .set_retention(
            "dev",
            Retention {
                max_changes: Some(2),
                max_age_days: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(dev.retention.max_changes, Some(2));
    let store = SqliteStore::open(&server.dir.path().join("vane.db")).unwrap();
    let kept = |env: &'static str| {
        let store = store.clone();
        async move {
            store
                .changes_since(env, 0, 1_000)
                .await
                .unwrap()
                .changes
                .len()
        }
    };
    tokio::time::timeout(PATIENCE, async {
        while kept("prod").await != 12 || kept("dev").await != 5 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both logs pruned");
    let oldest = store.changes_since("prod", 0, 1).await.unwrap().changes[0].version;
    assert_eq!(oldest, 19, "the newest 12 of 30 are kept");
    // A client resuming within what is kept still resumes by delta (the hub's window).
    let page = server.admin.audit("dev", 1, None).await.unwrap();
    assert_eq!(page.entries[0].action, "env.retention");
}
