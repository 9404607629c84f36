//! `vane-load`: N sessions against a server, M changes, commit-to-applied latency; with
//! `--scenario storm`, a restart with every session connected.
//!
//! ```text
//! vane-load --data ./vane-data --transport tcp --clients 1000 --changes 20 --json out.json --plot cdf.svg
//! vane-load --spawn target/release/vane --data /tmp/d --scenario storm --clients 10000
//! ```
//! All traffic goes to the given server (loopback in every documented run); every phase is
//! bounded by `--timeout-s`, and the tool exits by itself.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use tokio::process::{Child, Command};
use vane_benches::load::{self, LoadConfig, LoadTransport, Restart, Scenario};
use vane_server::api::client::AdminClient;

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
    #[arg(long, value_enum, default_value = "propagation")]
    scenario: ScenarioArg,
    /// Sessions to open.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Processes to spread the sessions over (one process holds about 20,000 file descriptors
    /// here, so TCP runs beyond ~19,000 sessions need two or more).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Start the server from this `vane` binary (on --data, --endpoint and --http) instead of
    /// using a running one; the storm scenario needs this to restart it.
    #[arg(long)]
    spawn: Option<PathBuf>,
    /// An extra argument for the spawned `vane serve` (repeat for several), e.g.
    /// `--server-arg=--goaway-window --server-arg=2`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Internal: run one worker's sessions, driven over stdin and stdout.
    #[arg(long, hide = true)]
    worker: bool,
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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScenarioArg {
    /// Connect, make the changes, measure.
    Propagation,
    /// The same, then restart the server and measure the resumption (needs --spawn).
    Storm,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.worker {
        return match load::worker::serve(tokio::io::stdin(), tokio::io::stdout()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("worker: {e}")),
        };
    }
    let mut server = match &args.spawn {
        Some(exe) => match Spawned::start(exe.clone(), &args).await {
            Ok(s) => Some(s),
            Err(e) => return fail(&e),
        },
        None => None,
    };
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
        scenario: match args.scenario {
            ScenarioArg::Propagation => Scenario::Propagation,
            ScenarioArg::Storm => Scenario::Storm,
        },
        clients: args.clients,
        changes: args.changes,
        interval: Duration::from_millis(args.interval_ms),
        timeout: Duration::from_secs(args.timeout_s),
        server_pid: args
            .server_pid
            .or_else(|| server.as_ref().and_then(|s| s.child.id())),
        workers: match args.workers {
            0 | 1 => None,
            n => match std::env::current_exe() {
                Ok(exe) => Some((n, exe)),
                Err(e) => return fail(&format!("finding this program for its workers: {e}")),
            },
        },
    };
    let progress = |line: String| eprint!("\r\x1b[2K{line}");
    let restart = match (&mut server, args.scenario) {
        (Some(s), ScenarioArg::Storm) => Some(s as &mut dyn Restart),
        (None, ScenarioArg::Storm) => {
            return fail("the storm scenario restarts the server: start it with --spawn");
        }
        _ => None,
    };
    let result = load::run(config, restart, &progress).await;
    eprintln!();
    if let Some(s) = &mut server {
        s.stop().await;
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
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
    if report.processes > 1 {
        println!("sessions ran in {} worker processes", report.processes);
    }
    if let Some(st) = &report.storm {
        println!(
            "storm: restart took {:.2} s; all {} of {} sessions resumed {:.2} s after the server was ready ({} by delta, {} up to date, {} by snapshot: {:.1}% without a snapshot; {} connection attempts); the change after the restart {}",
            st.restart_s,
            st.resumed,
            report.clients,
            st.all_resumed_s,
            st.by_delta,
            st.by_up_to_date,
            st.by_snapshot,
            st.without_snapshot_pct,
            st.attempts,
            if st.change_after_restart_delivered {
                "reached every session"
            } else {
                "did NOT reach every session"
            },
        );
    }
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
    let storm_incomplete = report
        .storm
        .as_ref()
        .is_some_and(|st| !st.change_after_restart_delivered || st.resumed < report.clients);
    if report.missing > 0 || storm_incomplete {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

/// A server this tool started, so it can restart it for the storm.
struct Spawned {
    exe: PathBuf,
    args: Vec<String>,
    /// Its HTTP API (only the unauthenticated readiness endpoint is used).
    ops: AdminClient,
    log: PathBuf,
    child: Child,
}

impl Spawned {
    async fn start(exe: PathBuf, args: &Args) -> Result<Spawned, String> {
        let http = args
            .http
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        std::fs::create_dir_all(&args.data).map_err(|e| format!("{}: {e}", args.data.display()))?;
        let mut serve = vec![
            "--data".into(),
            args.data.display().to_string(),
            "serve".into(),
            "--listen".into(),
            args.endpoint.to_string(),
            "--http".into(),
            http,
        ];
        serve.extend(args.server_args.iter().cloned());
        let ops = AdminClient::new(&args.http, "");
        if ops.ready().await.is_ok() {
            return Err(format!(
                "a server already answers at {}; stop it or choose other ports",
                args.http
            ));
        }
        let log = args.data.join("vane-load-server.log");
        let child = launch(&exe, &serve, &log)?;
        let mut server = Spawned {
            exe,
            args: serve,
            ops,
            log,
            child,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the server exited ({status}); see {}",
                    self.log.display()
                ));
            }
            if self.ops.ready().await.unwrap_or(false) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "the server was not ready within 30 s; see {}",
            self.log.display()
        ))
    }

    /// SIGTERM (the server sends GoAway and drains), then wait for it to exit.
    async fn stop(&mut self) {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

impl Restart for Spawned {
    fn restart(&mut self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            self.stop().await;
            self.child = launch(&self.exe, &self.args, &self.log)?;
            self.wait_ready().await
        })
    }
}

fn launch(exe: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))
}
