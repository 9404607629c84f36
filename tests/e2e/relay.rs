//! Relays: `vane relay` nodes mirroring an origin (and each other, chained) through the Rust
//! client, serving clients of their own in every mode, with the origin's keys, versions and
//! epochs; serving their last state when the upstream is lost, and saying so.

use std::net::SocketAddr;
use std::time::Duration;

use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vane_core::client::{ClientConfig, ConnectionState, TransportPreference};
use vane_core::eval::Context;
use vane_core::sync::{Fatal, UpdateKind};
use vane_server::api::RelayStatus;
use vane_server::api::client::AdminClient;
use vane_server::keys::KeyKind;
use vane_server::relay::{Relay, RelayConfig};

use crate::harness::*;

/// A running relay with its own data directory (and the origin's certificate, so clients trust
/// the origin and its relays alike, as behind one name).
struct TestRelay {
    _dir: TempDir,
    protocol: SocketAddr,
    /// For `/readyz` and `/metrics`.
    ops: AdminClient,
    http: SocketAddr,
    ca: Vec<u8>,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestRelay {
    /// A relay of `upstream` (trusted with `origin`'s CA) mirroring the environments of `keys`.
    async fn start(
        upstream: SocketAddr,
        origin: &TestServer,
        keys: &[&str],
        transport: TransportPreference,
    ) -> TestRelay {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        for file in std::fs::read_dir(origin.dir.path().join("tls")).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), tls.join(file.file_name())).unwrap();
        }
        let keys = keys.iter().map(|k| (*k).to_owned()).collect();
        let mut config = RelayConfig::new(dir.path(), upstream.to_string(), keys);
        config.upstream_ca = origin.ca.clone();
        config.upstream_transport = transport;
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.http = "127.0.0.1:0".parse().unwrap();
        config.session.goaway_window = Duration::from_millis(200);
        config.drain_timeout = Duration::from_secs(5);
        let relay = Relay::bind(config).await.expect("relay binds");
        let (protocol, http) = (relay.protocol_addr(), relay.http_addr());
        let ca = std::fs::read(relay.ca_path()).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(relay.run(stop.clone().cancelled_owned()));
        TestRelay {
            _dir: dir,
            protocol,
            ops: AdminClient::new(format!("http://{http}"), ""),
            http,
            ca,
            stop,
            task: Some(task),
        }
    }

    async fn until_ready(&self) {
        tokio::time::timeout(PATIENCE, async {
            while !self.ops.ready().await.unwrap_or(false) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("relay became ready");
    }

    /// `/readyz`: status and body.
    async fn readyz(&self) -> (u16, String) {
        let r = reqwest::get(format!("http://{}/readyz", self.http))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn status(&self) -> RelayStatus {
        reqwest::get(format!("http://{}/status", self.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until `/status` satisfies `done`.
    async fn status_until(&self, done: impl Fn(&RelayStatus) -> bool) -> RelayStatus {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let status = self.status().await;
                if done(&status) {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the relay reached the expected status in time")
    }

    fn client_config(&self, key: &str, transport: TransportPreference) -> ClientConfig {
        let mut config = ClientConfig::new(self.protocol.to_string(), key, self.ca.clone());
        config.transport = transport;
        config.sync.backoff_initial = Duration::from_millis(50);
        config.sync.backoff_max = Duration::from_millis(500);
        config
    }

    async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("relay stopped in time")
                .expect("relay task")
                .expect("relay ran cleanly");
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn a_chain_of_two_relays_serves_every_mode_with_the_origins_keys_and_versions() {
    let origin = TestServer::start().await;
    let relay_key = origin.env_with_key("prod", KeyKind::Server).await;
    origin.put_bool("prod", "checkout", false).await;
    let near = TestRelay::start(
        origin.protocol,
        &origin,
        &[&relay_key],
        TransportPreference::Auto,
    )
    .await;
    let far = TestRelay::start(
        near.protocol,
        &origin,
        &[&relay_key],
        TransportPreference::Auto,
    )
    .await;
    far.until_ready().await;

    // Clients of the far relay, with keys of their own made at the origin: rules, notify and
    // evaluated mode.
    let server_key = origin.key("prod", KeyKind::Server).await;
    let mobile_key = origin.key("prod", KeyKind::Mobile).await;
    let (rules, mut rules_rx) =
        start_client(far.client_config(&server_key, TransportPreference::Quic)).await;
    let (notify, mut notify_rx) = start_client(
        far.client_config(&server_key, TransportPreference::Tcp)
            .notify_mode(),
    )
    .await;
    let context = Context::parse(r#"{"key": "user-1"}"#).unwrap();
    let (mobile, mut mobile_rx) = start_client(
        far.client_config(&mobile_key, TransportPreference::Tcp)
            .evaluated(context),
    )
    .await;
    assert!(!rules.bool_value("checkout", true));
    assert!(!mobile.bool_value("checkout", true));

    // A change at the origin reaches all three through both relays, at the origin's version.
    let v = origin.put_bool("prod", "checkout", true).await;
    let epoch = origin.admin.env("prod").await.unwrap().at.epoch;
    for rx in [&mut rules_rx, &mut notify_rx, &mut mobile_rx] {
        let u = update_at(rx, v).await;
        assert_eq!((u.selector.epoch, u.selector.version), (epoch, v));
    }
    assert!(rules.bool_value("checkout", false));
    assert!(notify.bool_value("checkout", false));
    assert!(mobile.bool_value("checkout", false));
    let status = far.status().await;
    let env = &status.environments[0];
    assert_eq!(env.env.as_deref(), Some("prod"));
    assert_eq!((env.upstream.as_str(), env.version), ("connected", Some(v)));
    assert!(env.serving && env.stale_since_ms.is_none() && status.ready);
    assert_eq!(env.sessions, 3);

    // A key made at the origin now works at the far relay as soon as it is heard of there.
    let fresh = origin.key("prod", KeyKind::Mobile).await;
    let (late, _) = start_client(
        far.client_config(&fresh, TransportPreference::Tcp)
            .evaluated(Context::default()),
    )
    .await;
    assert!(late.bool_value("checkout", false));

    // Revoked at the origin: the far relay's client stops, as it would at the origin.
    let id = origin
        .admin
        .keys("prod")
        .await
        .unwrap()
        .keys
        .into_iter()
        .find(|k| fresh.starts_with(&k.prefix))
        .unwrap()
        .id;
    origin.admin.revoke_key("prod", &id).await.unwrap();
    let mut late_status = late.watch_status();
    let stopped = status_until(&mut late_status, |s| s.fatal.is_some()).await;
    assert!(matches!(stopped.fatal, Some(Fatal::Unauthenticated(_))));

    // Unknown keys are refused at a relay as at the origin.
    let (stranger, _) = vane_core::client::Client::start_with_updates(far.client_config(
        "vane_srv_0000000000000000000000000000dead",
        TransportPreference::Tcp,
    ))
    .unwrap();
    let mut stranger_status = stranger.watch_status();
    let refused = status_until(&mut stranger_status, |s| s.fatal.is_some()).await;
    assert!(matches!(refused.fatal, Some(Fatal::Unauthenticated(_))));
    rules.close().await;
}

#[tokio::test]
async fn a_client_moves_between_a_relay_and_the_origin_and_resumes_by_delta() {
    let origin = TestServer::start().await;
    let key = origin.env_with_key("prod", KeyKind::Server).await;
    origin.put_bool("prod", "a", false).await;
    let relay =
        TestRelay::start(origin.protocol, &origin, &[&key], TransportPreference::Auto).await;
    relay.until_ready().await;
    // Behind one address (a proxy, as a load balancer would be), first sent to the relay.
    let proxy = Proxy::start(relay.protocol).await;
    let mut config = ClientConfig::new(proxy.addr.to_string(), &key, origin.ca.clone());
    config.transport = TransportPreference::Tcp;
    config.sync.backoff_initial = Duration::from_millis(50);
    config.sync.backoff_max = Duration::from_millis(200);
    let (client, mut rx) = start_client(config).await;

    for (to, flag) in [
        (origin.protocol, "b"),
        (relay.protocol, "c"),
        (origin.protocol, "d"),
    ] {
        // The client moves while a change is made: it comes back with its selector and is
        // brought current with a delta, not a snapshot, wherever it lands.
        proxy.retarget(to);
        proxy.cut();
        let v = origin.put_bool("prod", flag, true).await;
        proxy.restore();
        let u = update_at(&mut rx, v).await;
        assert_ne!(u.kind, UpdateKind::Snapshot, "moved to {to}: {u:?}");
        assert!(client.bool_value(flag, false));
    }
    client.close().await;
}

#[tokio::test]
async fn a_relay_that_loses_its_upstream_serves_its_last_state_and_says_so() {
    let origin = TestServer::start().await;
    let key = origin.env_with_key("prod", KeyKind::Server).await;
    let v1 = origin.put_bool("prod", "a", true).await;
    // The upstream through a proxy that can be cut (TCP: the proxy carries no UDP).
    let link = Proxy::start(origin.protocol).await;
    let relay = TestRelay::start(link.addr, &origin, &[&key], TransportPreference::Tcp).await;
    relay.until_ready().await;
    let (client, mut rx) = start_client(relay.client_config(&key, TransportPreference::Tcp)).await;
    assert!(client.bool_value("a", false));

    link.cut();
    let status = relay
        .status_until(|s| s.environments[0].stale_since_ms.is_some())
        .await;
    let env = &status.environments[0];
    assert_ne!(env.upstream, "connected");
    assert_eq!(env.version, Some(v1));
    assert!(env.serving && status.ready);
    let (code, body) = relay.readyz().await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("served from its last state") && body.contains("prod"),
        "{body}"
    );
    let metrics = relay.ops.metrics().await.unwrap();
    let connected = format!(
        "vane_relay_upstream_connected{{env=\"prod\",key=\"{}\"}}",
        &key[..14]
    );
    assert_eq!(series(&metrics, &connected), Some(0), "{metrics}");
    // Clients still connect, and get the last state.
    let (second, _) = start_client(relay.client_config(&key, TransportPreference::Quic)).await;
    assert!(second.bool_value("a", false));
    assert_eq!(second.status().selector.map(|s| s.version), Some(v1));

    // Changes made meanwhile arrive once the upstream is back, and the status says current.
    let v2 = origin.toggle("prod", "a", false).await;
    link.restore();
    assert_eq!(update_at(&mut rx, v2).await.kind, UpdateKind::Delta);
    assert!(!client.bool_value("a", true));
    relay
        .status_until(|s| {
            s.environments[0].stale_since_ms.is_none() && s.environments[0].upstream == "connected"
        })
        .await;
    assert_eq!(relay.readyz().await, (200, "ready\n".to_owned()));
    client.close().await;
    second.close().await;
}

#[tokio::test]
async fn a_relay_is_not_ready_until_its_first_snapshot_and_a_refused_key_is_said() {
    let origin = TestServer::start().await;
    let key = origin.env_with_key("prod", KeyKind::Server).await;
    origin.put_bool("prod", "a", true).await;
    let link = Proxy::start(origin.protocol).await;
    link.cut();
    let unknown = "vane_srv_00000000000000000000000000000000";
    let second = origin.key("prod", KeyKind::Server).await; // the same environment again
    let mut relay = TestRelay::start(
        link.addr,
        &origin,
        &[&key, unknown, &second],
        TransportPreference::Tcp,
    )
    .await;

    // Nothing from the upstream yet: not ready, and clients are told to retry.
    let (code, body) = relay.readyz().await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting for the first snapshot"), "{body}");
    let (waiting, _) = vane_core::client::Client::start_with_updates(
        relay.client_config(&key, TransportPreference::Tcp),
    )
    .unwrap();
    let mut waiting_status = waiting.watch_status();
    let told = status_until(&mut waiting_status, |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("INITIALIZING"))
    })
    .await;
    assert!(!told.initialized);

    // The upstream reachable: the environment arrives; the unknown key is refused for good,
    // and so is whichever of the two keys of one environment came second, which the relay
    // says without holding the rest back.
    link.restore();
    relay.until_ready().await;
    status_until(&mut waiting_status, |s| {
        s.initialized && s.state == ConnectionState::Connected
    })
    .await;
    assert!(waiting.bool_value("a", false));
    let status = relay
        .status_until(|s| {
            s.environments
                .iter()
                .filter(|e| e.refused.is_some())
                .count()
                == 2
        })
        .await;
    let envs = &status.environments;
    assert!(!envs[1].serving);
    assert!(
        envs[1].refused.as_deref().unwrap().contains("unknown"),
        "{envs:?}"
    );
    let (first, again) = if envs[0].serving {
        (&envs[0], &envs[2])
    } else {
        (&envs[2], &envs[0])
    };
    assert!(first.serving && !again.serving);
    assert!(
        again
            .refused
            .as_deref()
            .unwrap()
            .contains("already mirrored"),
        "{envs:?}"
    );
    let (code, body) = relay.readyz().await;
    assert_eq!(code, 200);
    assert!(body.contains("refused"), "{body}");
    waiting.close().await;
    relay.stop().await;
}
