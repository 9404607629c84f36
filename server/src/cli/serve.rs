//! `vane serve`: the server on the embedded store (or PostgreSQL), until SIGTERM or SIGINT.

use std::path::Path;
use std::time::Duration;

use clap::Args;

use super::{Failure, ProtocolArgs, ProtocolConfig, print_listening, shutdown_signal};
use crate::limits::Rate;
use crate::server::{Server, ServerConfig};
use crate::store::Retention;

/// `vane serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Keep the state in PostgreSQL (`postgres://user@host:port/db`), shared by every node
    /// given the same URL, instead of the embedded SQLite file in the data directory.
    #[arg(long, env = "VANE_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// Protocol address: TLS on TCP and QUIC on UDP, same port.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: std::net::SocketAddr,
    /// HTTP address: admin API, SDK endpoints, health, readiness, metrics.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub http: std::net::SocketAddr,
    #[command(flatten)]
    pub protocol: ProtocolArgs,
    /// Create an environment `demo` with a few flags and print a server key for it.
    #[arg(long)]
    pub demo: bool,
    /// Serve the HTTP listener over TLS (HTTPS, TLS 1.3), with the server's certificate.
    #[arg(long)]
    pub http_tls: bool,
    /// SDK requests over HTTP (OFREP, snapshot polling) one source address may make per
    /// second, with a burst of ten seconds' worth; more are answered 429 with Retry-After.
    /// 0 (the default): no limit.
    #[arg(long, default_value_t = 0.0)]
    pub sdk_request_rate: f64,
    /// Record evaluations as events: OFREP evaluations, and the evaluation counts SDKs report
    /// over the protocol; counts per flag, variant and reason in /metrics, and the exporters
    /// below. An evaluation never waits for its event.
    #[arg(long)]
    pub events: bool,
    /// Append events as JSON lines to this file (rotated at 64 MiB, 5 kept); implies --events.
    #[arg(long)]
    pub events_file: Option<std::path::PathBuf>,
    /// POST batches of events (`{"events": [...]}`) to this URL, retrying with backoff;
    /// implies --events.
    #[arg(long)]
    pub events_webhook: Option<String>,
    /// With events on, SDKs report their evaluation counts at most this often, in seconds
    /// (at least 1); each report goes with an Ack, so it adds no wake-ups of its own.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub events_summary_interval: u64,
    /// Flags and segments a clone copies per transaction (smaller batches hold the store for
    /// less time between other writes; docs/BENCHMARKS.md measures 100 against 500).
    #[arg(long, default_value_t = 100)]
    pub clone_batch: usize,
    /// Milliseconds a clone waits between batches, to leave the store to other writes.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub clone_pause_ms: u64,
    /// With `--store postgres://…`: milliseconds between the reads of the whole state that
    /// follow the other nodes whatever PostgreSQL announced (the most a lost announcement
    /// delays a change made elsewhere).
    #[arg(long, default_value_t = 2000)]
    pub follow_interval_ms: u64,
    /// Change-log entries kept per environment (unless it sets its own; never fewer than
    /// --history); 0: no limit by count.
    #[arg(long, default_value_t = 100_000)]
    pub retain_changes: u64,
    /// Days of change log kept per environment (unless it sets its own; the newest --history
    /// entries are kept whatever their age); 0: no limit by age.
    #[arg(long, default_value_t = 90)]
    pub retain_days: u64,
}

pub(super) async fn serve(data: &Path, args: ServeArgs) -> Result<(), Failure> {
    let mut config = ServerConfig::new(data);
    config.store_url = args.store;
    config.listen = args.listen;
    config.http = args.http;
    config.http_tls = args.http_tls;
    config.demo = args.demo;
    args.protocol.apply(ProtocolConfig {
        quic: &mut config.quic,
        history_window: &mut config.history_window,
        max_connections: &mut config.max_connections,
        listen_backlog: &mut config.listen_backlog,
        session: &mut config.session,
        limits: &mut config.limits,
    });
    config.events.enabled =
        args.events || args.events_file.is_some() || args.events_webhook.is_some();
    config.events.file = args.events_file;
    config.events.webhook = args.events_webhook;
    config.events.summary_interval = Duration::from_secs(args.events_summary_interval.max(1));
    config.control.clone_batch = args.clone_batch.max(1);
    config.control.clone_pause = Duration::from_millis(args.clone_pause_ms);
    config.control.follow_interval = Duration::from_millis(args.follow_interval_ms.max(10));
    config.control.retention = Retention {
        max_changes: (args.retain_changes > 0).then_some(args.retain_changes),
        max_age_days: (args.retain_days > 0).then_some(args.retain_days),
    };
    config.limits.sdk_requests = Rate {
        per_second: args.sdk_request_rate.max(0.0),
        burst: args.sdk_request_rate.max(0.0) * 10.0,
    };
    let stop = shutdown_signal()?;
    let server = Server::bind(config).await?;
    print_listening(
        "serving",
        server.protocol_addr(),
        !args.protocol.no_quic,
        server.http_addr(),
        &server.ca_path(),
    );
    if server.created_token() {
        println!(
            "admin token (shown once; also in {}):\n  {}",
            data.join("admin-token").display(),
            server.admin_token()
        );
    }
    server.run(stop).await?;
    Ok(())
}
