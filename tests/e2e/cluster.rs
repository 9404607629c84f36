//! Several nodes on one PostgreSQL database (the test cluster scripts/test-all starts): writes
//! through any node reach the clients of every node in order, key revocation and environment
//! deletion end sessions on every node, and a client that moves to another node resumes by
//! delta because epochs and versions are the same everywhere.

use std::time::Duration;

use vane_core::client::{Client, ConnectionState, TransportPreference};
use vane_core::sync::{Update, UpdateKind};
use vane_server::keys::KeyKind;

use crate::harness::{
    PATIENCE, Proxy, TestServer, next_update, postgres_database, start_client, status_until,
    update_at,
};

/// A TCP client of `node` with `key`, initialized. A key made through another node may not
/// have reached this one yet: the node then tells the client to retry shortly (INITIALIZING),
/// which it does.
async fn client_of(
    node: &TestServer,
    key: &str,
) -> (Client, tokio::sync::broadcast::Receiver<Update>) {
    start_client(node.client_config(key, TransportPreference::Tcp)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_node_reach_the_clients_of_every_node_in_order() {
    let store = postgres_database();
    let a = TestServer::node(&store, None).await;
    let b = TestServer::node(&store, Some(&a)).await;
    let c = TestServer::node(&store, Some(&a)).await;
    let nodes = [&a, &b, &c];
    let key = b.env_with_key("prod", KeyKind::Server).await;
    let mut clients = Vec::new();
    for node in nodes {
        clients.push(client_of(node, &key).await);
    }

    // Thirty writes, each through the next node, to five flags.
    let mut last = 0;
    for i in 0..30 {
        let version = nodes[i % 3]
            .put_bool("prod", &format!("f{}", i % 5), i % 2 == 0)
            .await;
        assert!(version > last, "versions rise whichever node writes");
        last = version;
    }
    for (n, (client, mut updates)) in clients.into_iter().enumerate() {
        let mut seen = Vec::new();
        while seen.last().is_none_or(|v| *v < last) {
            let update = next_update(&mut updates).await;
            seen.push(update.selector.version);
        }
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "node {n}'s client saw versions in order: {seen:?}"
        );
        // The last write to f{k} was i = 25 + k.
        for k in 0..5 {
            let want = (25 + k) % 2 == 0;
            assert_eq!(
                client.bool_value(&format!("f{k}"), !want),
                want,
                "node {n}, f{k}"
            );
        }
        client.close().await;
    }
    // Every node holds the same epoch and version.
    let infos = [
        a.admin.env("prod").await.unwrap(),
        b.admin.env("prod").await.unwrap(),
        c.admin.env("prod").await.unwrap(),
    ];
    assert!(infos.iter().all(|i| i == &infos[0]), "{infos:?}");
}

/// A key made through one node, used at once on another, end to end. Whether the other node has
/// heard of it by then is a race (usually it has, through NOTIFY); when it has not, it answers
/// INITIALIZING and the client retries — that rule itself is checked deterministically by the
/// session test `a_key_unknown_to_a_following_node_is_retried_within_the_grace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_on_one_node_works_at_once_on_another() {
    let store = postgres_database();
    let a = TestServer::node(&store, None).await;
    let b = TestServer::node(&store, Some(&a)).await;
    for env in ["one", "two", "three"] {
        let key = a.env_with_key(env, KeyKind::Server).await;
        let (client, _) = client_of(&b, &key).await;
        assert!(client.status().fatal.is_none());
        client.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_deletion_end_sessions_on_every_node() {
    let store = postgres_database();
    let a = TestServer::node(&store, None).await;
    let b = TestServer::node(&store, Some(&a)).await;

    let key = a.env_with_key("prod", KeyKind::Server).await;
    let (client, _updates) = client_of(&b, &key).await;
    let id = a.admin.keys("prod").await.unwrap().keys[0].id.clone();
    a.admin.revoke_key("prod", &id).await.unwrap();
    let mut status = client.watch_status();
    let stopped = status_until(&mut status, |s| s.state == ConnectionState::Stopped).await;
    assert!(stopped.fatal.is_some(), "{stopped:?}");
    client.close().await;

    let key = b.env_with_key("staging", KeyKind::Server).await;
    let (client, _updates) = client_of(&a, &key).await;
    b.admin.delete_env("staging").await.unwrap();
    let mut status = client.watch_status();
    let stopped = status_until(&mut status, |s| s.state == ConnectionState::Stopped).await;
    assert!(stopped.fatal.is_some(), "{stopped:?}");
    client.close().await;
    // Gone on both nodes.
    assert!(a.admin.env("staging").await.is_err());
    assert!(b.admin.env("staging").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_counts_the_sessions_of_every_node() {
    let store = postgres_database();
    let a = TestServer::node(&store, None).await;
    let b = TestServer::node(&store, Some(&a)).await;
    let key = a.env_with_key("prod", KeyKind::Server).await;
    let (on_a, _ua) = client_of(&a, &key).await;
    let (on_b, _ub) = client_of(&b, &key).await;
    let version = b.put_bool("prod", "f", true).await;
    // Asked on a: a's session and b's, once b has reported (every second).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let report = loop {
        let report = a.admin.propagation("prod").await.unwrap();
        if report.current == 2 {
            break report;
        }
        assert!(tokio::time::Instant::now() < deadline, "{report:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (report.version, report.sessions),
        (version, 2),
        "{report:?}"
    );
    assert_eq!(report.nodes.len(), 2, "{report:?}");
    assert_eq!(
        report.nodes[0].reported_ms_ago, 0,
        "the node asked comes first"
    );
    assert!(
        report
            .nodes
            .iter()
            .all(|n| n.sessions == 1 && n.current == 1),
        "{report:?}"
    );
    on_a.close().await;
    on_b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moved_to_another_node_resumes_by_delta() {
    let store = postgres_database();
    let a = TestServer::node(&store, None).await;
    let b = TestServer::node(&store, Some(&a)).await;
    let key = a.env_with_key("prod", KeyKind::Server).await;
    a.put_bool("prod", "f", true).await;
    // The key works on b before the client is moved there.
    let (probe, _) = client_of(&b, &key).await;
    probe.close().await;

    let proxy = Proxy::start(a.protocol).await;
    let mut config = a.client_config(&key, TransportPreference::Tcp);
    config.endpoint = proxy.addr.to_string();
    let (client, mut updates) = start_client(config).await;
    let version = a.put_bool("prod", "f", false).await;
    assert_eq!(
        update_at(&mut updates, version).await.kind,
        UpdateKind::Delta
    );

    // The load balancer moves the client: node a's connection is cut, the next one goes to b.
    proxy.cut();
    let mut status = client.watch_status();
    status_until(&mut status, |s| s.state != ConnectionState::Connected).await;
    proxy.retarget(b.protocol);
    let version = b.put_bool("prod", "g", true).await;
    proxy.restore();
    let update = update_at(&mut updates, version).await;
    assert_eq!(
        update.kind,
        UpdateKind::Delta,
        "resumed on b by delta: {update:?}"
    );
    assert!(client.bool_value("g", false));
    assert!(!client.bool_value("f", true));
    client.close().await;
}
