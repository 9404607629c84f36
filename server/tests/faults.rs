//! Faults to the whole process, as operators meet them: `kill -9` in the middle of concurrent
//! writes, a restart under QUIC clients, and clients that never read. The server is the real
//! `vane` binary; clients are the Rust client, over real QUIC and TCP+TLS on loopback. Each test
//! prints what it measured (`cargo nextest run -p vane-server --test faults --no-capture`), the
//! figures docs/RELIABILITY.md records; the assertions are about behaviour only.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    PATIENCE, Served, Writers, admin, client_config, env_with_key, serve, serve_loopback,
    serve_with, vane, watch,
};
use vane_core::client::TransportPreference;
use vane_core::model::Flag;
use vane_core::protocol::Selector;
use vane_core::protocol::Transport;
use vane_core::sync::UpdateKind;
use vane_server::api::client::AdminClient;

async fn selector(admin: &AdminClient, env: &str) -> Selector {
    let info = admin.env(env).await.unwrap();
    Selector {
        epoch: info.at.epoch,
        version: info.at.version,
    }
}

/// Restarts the server on the same data directory and ports.
fn restart(data: &Path, served: &Served, extra: &[&str]) -> Served {
    let http = served.http.trim_start_matches("http://");
    let mut args = vec!["--listen", &served.protocol, "--http", http];
    args.extend_from_slice(extra);
    serve_with(vane(data), &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_concurrent_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut served = serve_loopback(data, &["--heartbeat", "2"]);
    let admin = admin(data, &served);
    let key = env_with_key(&admin, "prod").await;
    let mut clients = Vec::new();
    for transport in [TransportPreference::Quic, TransportPreference::Tcp] {
        for _ in 0..2 {
            clients.push((
                transport,
                watch(client_config(data, &served.protocol, &key, transport)).await,
            ));
        }
    }

    // Four writers, each putting new flags until the server is gone; killed in the middle of
    // the writes: once hundreds are acknowledged, with more in flight.
    let mut writers = Writers::start(&admin);
    writers.wait_for(400).await;
    let killed_at = Instant::now();
    served.process.kill9();
    let (acked, in_doubt) = writers.finish().await;
    assert!(acked.len() >= 400, "the writers got going: {}", acked.len());

    let served = restart(data, &served, &["--heartbeat", "2"]);
    let restarted_at = Instant::now();
    let flags = admin.flags("prod").await.unwrap();
    let present: BTreeMap<&str, u64> = flags
        .flags
        .iter()
        .map(|f| (f.key.as_str(), f.version))
        .collect();
    let lost: Vec<&String> = acked
        .keys()
        .filter(|k| !present.contains_key(k.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    for (k, v) in &acked {
        assert_eq!(
            present[k.as_str()],
            *v,
            "{k} is at the version its write was acknowledged with"
        );
    }
    let committed_in_doubt = in_doubt
        .iter()
        .filter(|k| present.contains_key(k.as_str()))
        .count();
    assert_eq!(
        present.len(),
        acked.len() + committed_in_doubt,
        "nothing else was written"
    );

    // Every client comes back by itself and converges by delta; one more change reaches all.
    let last = selector(&admin, "prod").await;
    for (_, c) in &clients {
        c.reach(last).await;
    }
    let after = admin
        .put_flag("prod", "after", &Flag::boolean("after", true, true))
        .await
        .unwrap();
    let mut converged = Vec::new();
    for (transport, c) in &clients {
        let at = Selector {
            epoch: last.epoch,
            version: after.at.version,
        };
        let got = c.reach(at).await;
        converged.push((*transport, got.saturating_duration_since(restarted_at)));
        let kinds = c.kinds_after(killed_at);
        assert!(
            !kinds.contains(&UpdateKind::Snapshot),
            "resumed by delta, not a snapshot: {kinds:?}"
        );
        assert!(c.client.bool_value("after", false));
    }
    eprintln!(
        "kill -9 during writes: {} acknowledged, 0 lost, {} in doubt ({} of them committed); \
         a change after the restart reached the clients after {converged:?} (from the restart)",
        acked.len(),
        in_doubt.len(),
        committed_in_doubt
    );
    drop(served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_clients_of_a_killed_server_are_reset_by_its_successor_at_their_first_probe() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // With a 5 s heartbeat a client probes 6 s after the last Ping it heard and gives up on a
    // silent path 3 s later; a reset ends the connection at the probe.
    let args = ["--heartbeat", "5"];
    let mut served = serve_loopback(data, &args);
    let admin = admin(data, &served);
    let key = env_with_key(&admin, "prod").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            watch(client_config(
                data,
                &served.protocol,
                &key,
                TransportPreference::Quic,
            ))
            .await,
        );
    }
    served.process.kill9();
    let served = restart(data, &served, &args);
    let restarted_at = Instant::now();
    let written = admin
        .put_flag("prod", "after", &Flag::boolean("after", true, true))
        .await
        .unwrap();
    let at = Selector {
        epoch: written.at.epoch,
        version: written.at.version,
    };
    let mut took = Vec::new();
    for c in &clients {
        let got = c.reach(at).await;
        took.push(got.saturating_duration_since(restarted_at));
        let status = c.client.status();
        assert_eq!(status.transport, Some(Transport::Quic));
        let why = status.last_error.unwrap_or_default();
        assert!(
            why.contains("reset"),
            "the old connection ended with a stateless reset from the new process, not by \
             waiting out a probe: {why}"
        );
        assert!(
            c.kinds_after(restarted_at)
                .iter()
                .all(|k| *k != UpdateKind::Snapshot)
        );
    }
    eprintln!(
        "QUIC clients after kill -9 and restart (heartbeat 5 s): change received after {took:?}"
    );
    drop(served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reset_key_survives_restarts_and_a_damaged_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut served = serve(data);
    let key = std::fs::read_to_string(data.join("quic-reset-key")).unwrap();
    assert_eq!(key.trim().len(), 64);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("quic-reset-key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
    served.process.terminate();
    let mut served = serve(data);
    assert_eq!(
        std::fs::read_to_string(data.join("quic-reset-key")).unwrap(),
        key
    );
    served.process.terminate();

    std::fs::write(data.join("quic-reset-key"), "not hex\n").unwrap();
    let out = vane(data)
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("quic-reset-key is damaged"), "{err}");
}

async fn sessions(admin: &AdminClient, transport: &str) -> u64 {
    let text = admin.metrics().await.unwrap();
    let prefix = format!("vane_sessions{{transport=\"{transport}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|n| n.parse().ok())
        .expect("session gauge")
}

/// A TLS connection that has said Hello (rules mode) with `key` and reads nothing yet.
async fn raw_session(
    data: &Path,
    protocol: &str,
    key: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let ca = std::fs::read(data.join("tls/ca.pem")).unwrap();
    let config = vane_core::client::tls_config(&ca).unwrap();
    // A small receive buffer, as a phone's would be: the kernel's autotuning would otherwise
    // let 200 stalled loopback connections hold gigabytes on this side, and its global TCP
    // memory limit would then starve every connection on the machine.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let tcp = socket.connect(protocol.parse().unwrap()).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let hello: vane_proto::v1::Frame = vane_proto::v1::Hello {
        protocol_version: vane_proto::PROTOCOL_VERSION,
        sdk_key: key.into(),
        mode: vane_proto::v1::DeliveryMode::Rules.into(),
        ..Default::default()
    }
    .into();
    tls.write_all(&vane_proto::codec::encode(&hello))
        .await
        .unwrap();
    tls.flush().await.unwrap();
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stall_are_dropped_and_memory_stays_bounded() {
    const NEVER: usize = 200;
    const SLOW: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let served = serve(data);
    let admin = admin(data, &served);
    let key = env_with_key(&admin, "prod").await;
    let good = watch(client_config(
        data,
        &served.protocol,
        &key,
        TransportPreference::Quic,
    ))
    .await;

    let mut never = Vec::new();
    for _ in 0..NEVER {
        never.push(raw_session(data, &served.protocol, &key).await);
    }
    // Slow readers: 4 KiB every 100 ms, 40 KiB/s, slower than the changes come.
    let mut slow = Vec::new();
    let slow_read = Arc::new(AtomicUsize::new(0));
    for _ in 0..SLOW {
        let slow_read = slow_read.clone();
        let mut s = raw_session(data, &served.protocol, &key).await;
        slow.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                slow_read.fetch_add(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    let deadline = Instant::now() + PATIENCE;
    while sessions(&admin, "tcp").await != (NEVER + SLOW) as u64 {
        assert!(Instant::now() < deadline, "the raw sessions came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = served.process.rss_kib();

    // 30 KB changes until the server has given up on every reader that never reads (it
    // does so after one write has blocked for 10 s): bounded by count and by time.
    let mut peak = before;
    let mut last = 0;
    let started = Instant::now();
    for i in 0..2_000 {
        let text = format!("{i:0>30000}");
        let flag = serde_json::json!({
            "on": true,
            "variants": {"big": text, "small": ""},
            "off_variant": "small",
            "fallthrough": {"variant": "big"},
        });
        last = admin
            .put_flag("prod", "big", &flag)
            .await
            .unwrap()
            .at
            .version;
        peak = peak.max(served.process.rss_kib());
        if i % 10 == 9 && sessions(&admin, "tcp").await <= SLOW as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the stalled readers were dropped in time"
        );
    }
    let dropped_after = started.elapsed();
    let tcp = sessions(&admin, "tcp").await;
    assert_eq!(
        tcp, SLOW as u64,
        "every reader that never reads was dropped, the slow ones kept"
    );
    let at = Selector {
        epoch: selector(&admin, "prod").await.epoch,
        version: last,
    };
    good.reach(at).await;
    let after = served.process.rss_kib();
    assert!(
        peak - before < 256 * 1024,
        "memory bounded: {before} KiB before, peak {peak} KiB"
    );
    eprintln!(
        "{NEVER} readers that never read and {SLOW} that read 40 KiB/s, 30 KB changes every \
         ~20 ms: the {NEVER} dropped after {dropped_after:?}, the {SLOW} kept (they read {} MB \
         meanwhile); server RSS {before} KiB before, peak {peak} KiB, {after} KiB after",
        slow_read.load(Ordering::Relaxed) / 1_000_000
    );
    drop(never);
    for s in slow {
        s.abort();
    }
}
