//! Smoke tests of the load tool's engine against the real server: every session receives every
//! change on both transports, and after a restart every session resumes without a snapshot.
//! They check behaviour, not speed (timing lives in docs/BENCHMARKS.md).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use vane_benches::load::{self, LoadConfig, LoadTransport, Restart, Scenario};

use crate::harness::TestServer;

fn config(server: &TestServer, transport: LoadTransport, scenario: Scenario) -> LoadConfig {
    LoadConfig {
        endpoint: server.protocol,
        http: format!("http://{}", server.http),
        token: server.token.clone(),
        ca_pem: server.ca.clone(),
        transport,
        scenario,
        clients: 200,
        changes: 3,
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(60),
        server_pid: Some(std::process::id()),
        workers: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_receives_every_change_on_both_transports() {
    let server = TestServer::start().await;
    for transport in [LoadTransport::Tcp, LoadTransport::Quic] {
        let report = load::run(
            config(&server, transport, Scenario::Propagation),
            None,
            &|_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("{transport:?}: {e}"));
        assert_eq!(report.missing, 0, "{transport:?}: {report:?}");
        assert_eq!(report.latencies_ms.len(), 600, "{transport:?}");
        assert!(report.bytes_per_change > 0.0);
        assert!(
            report.cpu_s.is_some() && report.rss_per_conn_bytes.is_some(),
            "read from /proc"
        );
        assert!(report.storm.is_none());
    }
}

/// The in-process server, restarted the way SIGTERM and a new start do it.
struct Restarts<'a>(&'a mut TestServer);

impl Restart for Restarts<'_> {
    fn restart(&mut self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            self.0.restart().await;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_every_session_resumes_from_its_selector() {
    let mut server = TestServer::start().await;
    let cfg = config(&server, LoadTransport::Tcp, Scenario::Storm);
    let report = load::run(cfg, Some(&mut Restarts(&mut server)), &|_| {})
        .await
        .expect("storm runs");
    assert_eq!(report.missing, 0, "{report:?}");
    let storm = report.storm.expect("a storm report");
    assert_eq!(storm.resumed, 200, "{storm:?}");
    assert_eq!(
        storm.by_snapshot, 0,
        "history survives the restart: {storm:?}"
    );
    assert_eq!(storm.by_delta + storm.by_up_to_date, 200);
    assert!(storm.change_after_restart_delivered, "{storm:?}");
    assert!(
        storm.attempts >= 200,
        "every session reconnected: {storm:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storm_scenario_needs_a_way_to_restart() {
    let server = TestServer::start().await;
    let cfg = config(&server, LoadTransport::Tcp, Scenario::Storm);
    let err = load::run(cfg, None, &|_| {}).await.unwrap_err();
    assert!(err.contains("restart"), "{err}");
}
