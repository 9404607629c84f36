//! The multi-process path of `vane-load`: sessions spread over worker processes (this package's
//! own `vane-load` binary), driven over their stdin and stdout, against a real server.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vane_benches::load::{self, LoadConfig, LoadTransport, Scenario};
use vane_server::api::client::AdminClient;
use vane_server::server::{Server, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_workers_all_receive_every_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = ServerConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.http = "127.0.0.1:0".parse().unwrap();
    let server = Server::bind(config).await.expect("server binds");
    let (endpoint, http) = (server.protocol_addr(), server.http_addr());
    let token = server.admin_token().to_owned();
    let ca_pem = std::fs::read(server.ca_path()).expect("CA written");
    let stop = CancellationToken::new();
    let running = tokio::spawn(server.run(stop.clone().cancelled_owned()));
    let ops = AdminClient::new(format!("http://{http}"), &token);
    for _ in 0..500 {
        if ops.ready().await.unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for transport in [LoadTransport::Tcp, LoadTransport::Quic] {
        let cfg = LoadConfig {
            endpoint,
            http: format!("http://{http}"),
            token: token.clone(),
            ca_pem: ca_pem.clone(),
            transport,
            scenario: Scenario::Propagation,
            clients: 101,
            changes: 2,
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(60),
            server_pid: None,
            workers: Some((3, PathBuf::from(env!("CARGO_BIN_EXE_vane-load")))),
        };
        let report = load::run(cfg, None, &|_| {})
            .await
            .unwrap_or_else(|e| panic!("{transport:?}: {e}"));
        assert_eq!(report.processes, 3);
        assert_eq!(report.missing, 0, "{transport:?}: {report:?}");
        assert_eq!(report.latencies_ms.len(), 202, "{transport:?}");
    }
    stop.cancel();
    running
        .await
        .expect("server task")
        .expect("server ran cleanly");
}
