//! `vane-load`: N sessions against a running server, M changes, commit-to-applied latency.
//!
//! ```text
//! vane-load --data ./vane-data --transport tcp --clients 1000 --changes 20 --json out.json --plot cdf.svg
//! ```
//! All traffic goes to the given server (loopback in every documented run); every phase is
//! bounded by `--timeout-s`, and the tool exits by itself.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use vane_benches::load::{self, LoadConfig, LoadTransport};

/// Measure propagation from the admin API to N connected sessions.
#[derive(Debug, Parser)]
#[command(name = "vane-load")]
struct Args {
    /// The server's data directory (for the admin token and CA); or give --token and --ca.
    #[arg(long, default_value = "./vane-data")]
    data: PathBuf,
    /// Protocol address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    endpoint: std::net::SocketAddr,
    /// HTTP base URL.
    #[arg(long, default_value = "http://127.0.0.1:7480")]
    http: String,
    /// Admin token (default: DATA/admin-token).
    #[arg(long)]
    token: Option<String>,
    /// CA PEM (default: DATA/tls/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "tcp")]
    transport: TransportArg,
    /// Sessions to open (this process; about 20,000 file descriptors at most for TCP).
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Changes to make.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Milliseconds between changes.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// Bound on each phase, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// The server's pid, for RSS per connection and CPU seconds.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency CDF as SVG here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    Quic,
    Tcp,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()));
    let token = match args
        .token
        .clone()
        .map(Ok)
        .unwrap_or_else(|| read(args.data.join("admin-token")))
    {
        Ok(t) => t.trim().to_owned(),
        Err(e) => return fail(&e),
    };
    let ca = match read(
        args.ca
            .clone()
            .unwrap_or_else(|| args.data.join("tls/ca.pem")),
    ) {
        Ok(c) => c.into_bytes(),
        Err(e) => return fail(&e),
    };
    let config = LoadConfig {
        endpoint: args.endpoint,
        http: args.http.clone(),
        token,
        ca_pem: ca,
        transport: match args.transport {
            TransportArg::Quic => LoadTransport::Quic,
            TransportArg::Tcp => LoadTransport::Tcp,
        },
        clients: args.clients,
        changes: args.changes,
        interval: Duration::from_millis(args.interval_ms),
        timeout: Duration::from_secs(args.timeout_s),
        server_pid: args.server_pid,
    };
    let progress = |line: String| eprint!("\r\x1b[2K{line}");
    let report = match load::run(config, &progress).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    eprintln!();
    println!(
        "{} {:?} clients, {} changes: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; missing {}; {:.1} bytes/change/client; RSS/conn {}; CPU {}; UDP rcvbuf errors {}",
        report.clients,
        report.transport,
        report.changes,
        report.p50_ms,
        report.p90_ms,
        report.p99_ms,
        report.max_ms,
        report.missing,
        report.bytes_per_change,
        report
            .rss_per_conn_bytes
            .map_or("-".into(), |b| format!("{b} B")),
        report.cpu_s.map_or("-".into(), |s| format!("{s:.2} s")),
        report.udp_rcvbuf_errors,
    );
    if let Some(path) = &args.json
        && let Err(e) = std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        )
    {
        return fail(&format!("{}: {e}", path.display()));
    }
    if let Some(path) = &args.plot
        && let Err(e) = std::fs::write(path, load::cdf_svg(&report))
    {
        return fail(&format!("{}: {e}", path.display()));
    }
    if report.missing > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}
