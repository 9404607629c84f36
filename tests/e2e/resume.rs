//! Disconnects, restarts and shutdowns: clients resume from their selector with a small delta.

use vane_core::client::{ConnectionState, TransportPreference};
use vane_core::history::Write;
use vane_core::model::Flag;
use vane_core::sync::UpdateKind;
use vane_server::store::sqlite::SqliteStore;
use vane_server::store::{Audit, Expect, Store};

use tokio::io::AsyncWriteExt;
use vane_proto::codec;
use vane_proto::v1::{self as pb, frame::Kind};

use vane_server::keys::KeyKind;

use crate::harness::{
    Proxy, TestServer, hello, next_update, raw_tls, read_to_end, start_client, status_until,
    update_at,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_by_delta() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "a", true).await;
    server.put_bool("prod", "b", true).await;
    let proxy = Proxy::start(server.protocol).await;
    let mut config = server.client_config(&key, TransportPreference::Tcp);
    config.endpoint = proxy.addr.to_string();
    let (client, mut updates) = start_client(config).await;
    assert_eq!(next_update(&mut updates).await.kind, UpdateKind::Snapshot);

    let mut status = client.watch_status();
    proxy.cut();
    status_until(&mut status, |s| s.state != ConnectionState::Connected).await;
    // Committed while the client is away (the proxy refuses its reconnects until restored).
    let version = server.toggle("prod", "a", false).await;
    proxy.restore();

    let update = update_at(&mut updates, version).await;
    assert_eq!(
        update.kind,
        UpdateKind::Delta,
        "resumed by delta, not snapshot"
    );
    assert_eq!(update.changed, vec!["a"]);
    assert!(!client.bool_value("a", true));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_epoch_and_versions_and_clients_resume_by_delta() {
    let mut server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "a", true).await;
    let (client, mut updates) = server.client(&key, TransportPreference::Quic).await;
    let first = next_update(&mut updates).await;
    assert_eq!(first.kind, UpdateKind::Snapshot);

    server.stop().await;
    let status = client.status();
    assert_ne!(status.state, ConnectionState::Connected);
    // A change committed to the store while no server runs (as another node would).
    let committed = {
        let store = SqliteStore::open(&server.dir.path().join("vane.db")).unwrap();
        let write = Write::flag(Flag::boolean("a", false, true)).unwrap();
        store
            .commit(
                "prod",
                write,
                Expect::Nothing,
                &Audit::new("test", "flag.put"),
            )
            .await
            .unwrap()
            .selector()
    };
    assert_eq!(committed.epoch, first.selector.epoch);
    server.restart().await;

    let update = update_at(&mut updates, committed.version).await;
    assert_eq!(
        update.kind,
        UpdateKind::Delta,
        "resumed by delta after the restart"
    );
    assert_eq!(update.selector, committed);
    assert_eq!(update.changed, vec!["a"]);
    assert!(!client.bool_value("a", true));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_go_away_and_clients_come_back() {
    let mut server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "a", true).await;
    let (client, mut updates) = server.client(&key, TransportPreference::Tcp).await;
    next_update(&mut updates).await;
    // A raw session sees exactly what the server says on the way out.
    let mut raw = raw_tls(&server).await;
    raw.write_all(&codec::encode(&hello(&key))).await.unwrap();
    raw.flush().await.unwrap();

    let mut reader = vane_core::wire::FrameReader::new(codec::DEFAULT_MAX_FRAME_LEN);
    for expected in ["Welcome", "Snapshot"] {
        let frame = reader.read(&mut raw).await.unwrap().unwrap();
        assert_eq!(frame.kind_name(), expected);
    }

    server.stop().await;
    let frames = read_to_end(&mut raw).await;
    let kinds: Vec<_> = frames.iter().map(|f| f.kind_name()).collect();
    assert_eq!(kinds, ["GoAway"], "GoAway is the last word");
    let Some(Kind::GoAway(go_away)) = &frames[0].kind else {
        unreachable!()
    };
    assert_eq!(go_away.reason(), pb::GoAwayReason::Shutdown);
    assert_eq!(
        u64::from(go_away.reconnect_within_ms),
        200,
        "the configured window"
    );

    // The real client comes back within the window and is current without a download.
    server.restart().await;
    let update = next_update(&mut updates).await;
    assert_eq!(update.kind, UpdateKind::UpToDate);
    let version = server.toggle("prod", "a", false).await;
    assert_eq!(
        update_at(&mut updates, version).await.kind,
        UpdateKind::Delta
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_environment_stops_its_clients() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "a", true).await;
    let (client, mut updates) = server.client(&key, TransportPreference::Tcp).await;
    next_update(&mut updates).await;

    // Deleting the environment takes its keys with it; the client stops, rejected. (A client
    // of a recreated environment would get a snapshot for the new epoch; the sync and history
    // unit tests cover that, since a key cannot outlive its environment.)
    server.admin.delete_env("prod").await.unwrap();
    let mut status = client.watch_status();
    let stopped = status_until(&mut status, |s| s.state == ConnectionState::Stopped).await;
    assert!(stopped.fatal.is_some(), "{stopped:?}");
}
