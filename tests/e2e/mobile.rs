//! What a mobile app needs from the client core: a cold start from the offline cache with the
//! server unreachable, and background/foreground without losing updates.

use serde_json::json;
use vane_core::client::{Client, ConnectionState, TransportPreference};
use vane_core::eval::{Context, Reason};
use vane_core::model::FlagValue;
use vane_core::sync::UpdateKind;

use vane_server::keys::KeyKind;

use crate::harness::{PATIENCE, TestServer, next_update, start_client, status_until, update_at};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_without_the_server_serves_cached_values() {
    let mut server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Mobile).await;
    server.put_bool("prod", "f", true).await;
    let cache = tempfile::tempdir().unwrap();
    let mut template = server
        .client_config(&key, TransportPreference::Tcp)
        .evaluated(Context::new(json!({"key": "u1"})).unwrap());
    template.cache_dir = Some(cache.path().to_owned());
    let config = || template.clone();
    let (client, _updates) = start_client(config()).await;
    assert_eq!(client.details("f").reason, Reason::Static);
    client.close().await; // the cache is written before close returns

    server.stop().await;
    let offline = Client::start(config()).unwrap();
    let d = offline.details("f");
    assert_eq!(
        d.value,
        Some(FlagValue::Bool(true)),
        "served from the cache, with no server"
    );
    assert_eq!(d.reason, Reason::Cached);
    assert!(
        !offline.status().initialized,
        "cached values are not live values"
    );

    // When the server is back, the cached state is resumed and confirmed live.
    let mut updates = offline.subscribe();
    server.restart().await;
    let update = next_update(&mut updates).await;
    assert_eq!(
        update.kind,
        UpdateKind::UpToDate,
        "resumed from the cached selector"
    );
    assert_eq!(offline.details("f").reason, Reason::Static);
    offline.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_closes_the_connection_and_foreground_resumes_by_delta() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Mobile).await;
    server.put_bool("prod", "f", true).await;
    let config = server
        .client_config(&key, TransportPreference::Quic)
        .evaluated(Context::new(json!({"key": "u1"})).unwrap());
    let (client, mut updates) = start_client(config).await;
    next_update(&mut updates).await;
    let mut status = client.watch_status();

    client.set_foreground(false);
    status_until(&mut status, |s| s.state == ConnectionState::Suspended).await;
    tokio::time::timeout(PATIENCE, async {
        while server.sessions("quic").await != 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server saw the session end");

    let version = server.toggle("prod", "f", false).await;
    assert_eq!(
        client.status().state,
        ConnectionState::Suspended,
        "no reconnect in the background"
    );
    assert!(client.bool_value("f", false), "still the last value");

    client.set_foreground(true);
    let update = update_at(&mut updates, version).await;
    assert_eq!(update.kind, UpdateKind::Delta, "resumed by delta");
    assert!(!client.bool_value("f", true));

    // No network: the same, without the app going anywhere.
    client.set_network_available(false);
    status_until(&mut status, |s| s.state == ConnectionState::Suspended).await;
    client.set_network_available(true);
    status_until(&mut status, |s| s.state == ConnectionState::Connected).await;
    client.close().await;
}

/// Without a CA of its own the client verifies against the system's trust store (here Debian's
/// CA bundle), which does not hold the test server's freshly generated CA: refused, and the
/// status says it was the certificate. With that CA it connects (every other test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_the_system_trust_store_decides() {
    let server = TestServer::start().await;
    let key = server.env_with_key("prod", KeyKind::Mobile).await;
    let mut config = server
        .client_config(&key, TransportPreference::Tcp)
        .evaluated(Context::new(json!({"key": "u1"})).unwrap());
    config.ca_pem = Vec::new();
    let client = Client::start(config).unwrap();
    let mut status = client.watch_status();
    let refused = status_until(&mut status, |s| s.last_error.is_some()).await;
    let error = refused.last_error.unwrap();
    assert!(
        error.contains("certificate") && error.contains("UnknownIssuer"),
        "{error}"
    );
    assert!(!refused.initialized);
    client.close().await;
}
