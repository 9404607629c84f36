//! Smoke test of the load tool's engine: 200 sessions per transport, 3 changes, against the real
//! server. It checks that every session received every change, not how fast (timing lives in
//! docs/BENCHMARKS.md).

use std::time::Duration;

use vane_benches::load::{self, LoadConfig, LoadTransport};

use crate::harness::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_receives_every_change_on_both_transports() {
    let server = TestServer::start().await;
    for transport in [LoadTransport::Tcp, LoadTransport::Quic] {
        let config = LoadConfig {
            endpoint: server.protocol,
            http: format!("http://{}", server.http),
            token: server.token.clone(),
            ca_pem: server.ca.clone(),
            transport,
            clients: 200,
            changes: 3,
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(60),
            server_pid: Some(std::process::id()),
        };
        let report = load::run(config, &|_| {})
            .await
            .unwrap_or_else(|e| panic!("{transport:?}: {e}"));
        assert_eq!(report.missing, 0, "{transport:?}: {report:?}");
        assert_eq!(report.latencies_ms.len(), 600, "{transport:?}");
        assert!(report.bytes_per_change > 0.0);
        assert!(
            report.cpu_s.is_some() && report.rss_per_conn_bytes.is_some(),
            "read from /proc"
        );
    }
}
