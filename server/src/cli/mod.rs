//! The `vane` command line: [`serve`] runs the server, [`relay`] a relay, the [`admin`] commands talk to its HTTP
//! API through [`crate::api::client::AdminClient`], and [`watch`] is a live view through the Rust
//! client.
//!
//! Exit codes, for scripts: 0 success; 1 the server refused the request (the message is on
//! stderr); 2 bad usage; 3 the server could not be reached or no admin token was found.
//! Commands print results on stdout and nothing else there; `key create` prints the secret alone.

pub mod admin;
pub mod relay;
pub mod serve;
pub mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use admin::{AdminArgs, EnvCmd, FlagCmd, JobCmd, KeyCmd, SegmentCmd, TokenCmd};
use relay::RelayArgs;
use serve::ServeArgs;
use watch::WatchArgs;

/// Real-time feature flags: server, admin commands and a live watcher.
#[derive(Debug, Parser)]
#[command(name = "vane", version)]
pub struct Cli {
    /// Data directory of the server (database, TLS material, admin token).
    #[arg(long, global = true, default_value = "./vane-data", env = "VANE_DATA")]
    pub data: PathBuf,
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `vane_server=debug`.
    #[arg(long, global = true, default_value = "info", env = "VANE_LOG")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server on the embedded store.
    Serve(ServeArgs),
    /// Mirror environments from an upstream node (or relay) and serve them to clients nearby.
    Relay(RelayArgs),
    /// Manage environments.
    Env {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: EnvCmd,
    },
    /// Manage SDK keys.
    Key {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Manage flags.
    Flag {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: FlagCmd,
    },
    /// Manage segments.
    Segment {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: SegmentCmd,
    },
    /// Evaluate a flag for a context on the server, and say which rule or bucket decided.
    Eval {
        #[command(flatten)]
        admin: AdminArgs,
        /// The environment.
        env: String,
        /// The flag key.
        flag: String,
        /// The context, a JSON object, e.g. '{"key": "user-1", "country": "de"}'.
        #[arg(long)]
        context: String,
    },
    /// Connect like an SDK and print every update as it is applied.
    Watch(WatchArgs),
    /// Manage named admin tokens (recorded in the audit log as the actor of their writes).
    Token {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Show or retry a job (a clone).
    Job {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: JobCmd,
    },
    /// Page through an environment's audit log, newest first.
    Audit {
        #[command(flatten)]
        admin: AdminArgs,
        /// The environment (its log outlives it).
        env: String,
        /// Entries per page.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Entries older than this id (the `next` a previous page printed).
        #[arg(long)]
        before: Option<u64>,
    },
}

/// A failed command and its exit code.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn refused(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }

    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }

    fn unreachable(message: impl Into<String>) -> Failure {
        Failure {
            code: 3,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::refused(format!("{e:#}"))
    }
}

/// Runs the parsed command line; prints errors to stderr and returns the exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let data = &cli.data;
    let result = match cli.command {
        Command::Serve(args) => serve::serve(data, args).await,
        Command::Relay(args) => relay::relay(data, args).await,
        Command::Env { admin, cmd } => admin::env(data, &admin, cmd).await,
        Command::Key { admin, cmd } => admin::key(data, &admin, cmd).await,
        Command::Flag { admin, cmd } => admin::flag(data, &admin, cmd).await,
        Command::Segment { admin, cmd } => admin::segment(data, &admin, cmd).await,
        Command::Eval {
            admin,
            env,
            flag,
            context,
        } => admin::eval(data, &admin, &env, &flag, &context).await,
        Command::Watch(args) => watch::watch(data, args).await,
        Command::Token { admin, cmd } => admin::token(data, &admin, cmd).await,
        Command::Job { admin, cmd } => admin::job(data, &admin, cmd).await,
        Command::Audit {
            admin,
            env,
            limit,
            before,
        } => admin::audit(data, &admin, &env, limit, before).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// The first lines `serve` and `relay` print (tests and scripts read the addresses from them):
/// `vane X WHAT: protocol ADDR (TRANSPORTS), HTTP http://ADDR`, then the CA clients trust.
fn print_listening(
    what: &str,
    protocol: std::net::SocketAddr,
    quic: bool,
    http: std::net::SocketAddr,
    ca: &std::path::Path,
) {
    let transports = if quic { "QUIC and TCP+TLS" } else { "TCP+TLS" };
    println!(
        "vane {} {what}: protocol {protocol} ({transports}), HTTP http://{http}",
        env!("CARGO_PKG_VERSION")
    );
    println!("clients trust {}", ca.display());
}

/// The protocol listener's settings, alike for `serve` and `relay`.
#[derive(Debug, clap::Args)]
pub struct ProtocolArgs {
    /// Serve TCP+TLS only.
    #[arg(long)]
    pub no_quic: bool,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 15)]
    pub heartbeat: u64,
    /// Changes kept per environment for resumption by delta.
    #[arg(long, default_value_t = 1000)]
    pub history: usize,
    /// Most concurrent protocol connections.
    #[arg(long, default_value_t = 100_000)]
    pub max_connections: usize,
    /// TCP connections the kernel may queue before they are accepted (default: the kernel's
    /// maximum, net.core.somaxconn).
    #[arg(long)]
    pub listen_backlog: Option<u32>,
    /// Seconds over which clients spread their reconnects after a shutdown.
    #[arg(long, default_value_t = 5)]
    pub goaway_window: u64,
    /// Protocol connections one source address may open per second, after its burst; more
    /// are answered RATE_LIMITED with when to retry. 0: no limit (for a server whose clients
    /// all arrive through one proxy).
    #[arg(long, default_value_t = 200.0)]
    pub connect_rate: f64,
    /// Protocol connections one source address may open at once before the rate applies.
    #[arg(long, default_value_t = 2000)]
    pub connect_burst: u32,
}

/// The fields of a node's configuration that [`ProtocolArgs`] set.
pub(crate) struct ProtocolConfig<'a> {
    pub quic: &'a mut bool,
    pub history_window: &'a mut usize,
    pub max_connections: &'a mut usize,
    pub listen_backlog: &'a mut u32,
    pub session: &'a mut crate::session::SessionConfig,
    pub limits: &'a mut crate::limits::LimitsConfig,
}

impl ProtocolArgs {
    /// Sets what these arguments say in `config`.
    pub(crate) fn apply(&self, config: ProtocolConfig<'_>) {
        *config.quic = !self.no_quic;
        *config.history_window = self.history.max(1);
        *config.max_connections = self.max_connections.max(1);
        if let Some(backlog) = self.listen_backlog {
            *config.listen_backlog = backlog.max(1);
        }
        config.session.heartbeat = std::time::Duration::from_secs(self.heartbeat.max(1));
        config.session.goaway_window = std::time::Duration::from_secs(self.goaway_window);
        config.limits.connects = crate::limits::Rate {
            per_second: self.connect_rate.max(0.0),
            burst: f64::from(self.connect_burst),
        };
    }
}

/// Registers for SIGINT and SIGTERM now, and returns a future that resolves on either.
/// Registering eagerly matters: a signal that arrives before the future is first polled is
/// still caught, instead of killing the process with the default action.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Failure> {
    use tokio::signal::unix::{SignalKind, signal};
    let register = |kind| {
        signal(kind).map_err(|e| Failure::refused(format!("installing signal handlers: {e}")))
    };
    let mut term = register(SignalKind::terminate())?;
    let mut int = register(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
