//! A change made through the admin API reaches clients, on each transport.

use std::time::Duration;

use vane_core::client::{ConnectionState, TransportPreference};
use vane_core::protocol::Transport;
use vane_core::sync::UpdateKind;

use vane_server::keys::KeyKind;

use crate::harness::{TestServer, next_update, start_client, update_at};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_client_gets_snapshot_then_a_toggle_as_delta() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "new-checkout", true).await;

    let (client, mut updates) = server.client(&key, TransportPreference::Quic).await;
    let first = next_update(&mut updates).await;
    assert_eq!(first.kind, UpdateKind::Snapshot);
    assert_eq!(first.changed, vec!["new-checkout"]);
    assert!(client.bool_value("new-checkout", false));
    let status = client.status();
    assert_eq!(
        (status.state, status.transport),
        (ConnectionState::Connected, Some(Transport::Quic))
    );

    let version = server.toggle("prod", "new-checkout", false).await;
    let update = update_at(&mut updates, version).await;
    assert_eq!(update.kind, UpdateKind::Delta);
    assert_eq!(update.changed, vec!["new-checkout"]);
    assert_eq!(update.selector.version, version);
    assert!(!client.bool_value("new-checkout", true));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tcp_works_the_same() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "f", true).await;

    let (client, mut updates) = server.client(&key, TransportPreference::Tcp).await;
    assert_eq!(next_update(&mut updates).await.kind, UpdateKind::Snapshot);
    assert_eq!(client.status().transport, Some(Transport::Tcp));

    let version = server.toggle("prod", "f", false).await;
    let update = update_at(&mut updates, version).await;
    assert_eq!(update.kind, UpdateKind::Delta);
    assert!(!client.bool_value("f", true));
    // A new flag arrives too, and a deleted one goes.
    let version = server.put_bool("prod", "g", true).await;
    assert_eq!(update_at(&mut updates, version).await.changed, vec!["g"]);
    assert!(client.bool_value("g", false));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_whose_udp_is_blackholed_ends_up_on_tcp() {
    // The server serves TCP only, and a socket on its UDP port swallows every datagram: to the
    // client this looks exactly like a network that drops UDP.
    let (blackhole, port) = udp_blackhole_with_free_tcp_port();
    let server = TestServer::start_with(|c| {
        c.quic = false;
        c.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    })
    .await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "f", true).await;

    let mut config = server.client_config(&key, TransportPreference::Auto);
    config.quic_head_start = Duration::from_millis(100);
    let (client, mut updates) = start_client(config).await;
    assert_eq!(next_update(&mut updates).await.kind, UpdateKind::Snapshot);
    assert_eq!(client.status().transport, Some(Transport::Tcp));
    let mut buf = [0u8; 2048];
    blackhole.set_nonblocking(true).unwrap();
    assert!(
        blackhole.recv(&mut buf).is_ok(),
        "the client did try QUIC first"
    );

    let version = server.toggle("prod", "f", false).await;
    assert_eq!(
        update_at(&mut updates, version).await.kind,
        UpdateKind::Delta
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_mode_gets_notices_and_fetches() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "f", true).await;
    let config = server
        .client_config(&key, TransportPreference::Tcp)
        .notify_mode();
    let (client, mut updates) = start_client(config).await;
    assert_eq!(next_update(&mut updates).await.kind, UpdateKind::Snapshot);
    let version = server.toggle("prod", "f", false).await;
    let update = update_at(&mut updates, version).await;
    assert_eq!(update.kind, UpdateKind::Delta);
    assert!(!client.bool_value("f", true));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_on_both_transports_all_receive_a_change() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "f", true).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let transport = if i % 2 == 0 {
            TransportPreference::Quic
        } else {
            TransportPreference::Tcp
        };
        clients.push(server.client(&key, transport).await);
    }
    let version = server.toggle("prod", "f", false).await;
    for (client, updates) in &mut clients {
        assert_eq!(update_at(updates, version).await.kind, UpdateKind::Delta);
        assert!(!client.bool_value("f", true));
    }
    let report = server.admin.propagation("prod").await.unwrap();
    assert_eq!(report.version, version);
    // Acks race the admin call's answer; all 20 sessions are known, most already current.
    assert_eq!(report.sessions, 20, "{report:?}");
}

/// A UDP socket on a port whose TCP twin is free (checked, then released for the server).
fn udp_blackhole_with_free_tcp_port() -> (std::net::UdpSocket, u16) {
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return (udp, port);
        }
    }
    panic!("no port free on both UDP and TCP");
}
