//! The `vane` command line: `serve`, the admin commands (which talk to the HTTP API), and
//! `watch`, a live view through the Rust client.
//!
//! Exit codes, for scripts: 0 success; 1 the server refused the request (the message is on
//! stderr); 2 bad usage; 3 the server could not be reached or no admin token was found.
//! Commands print results on stdout and nothing else there; `key create` prints the secret alone.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use vane_core::client::{Client, ClientConfig, ConnectionState, TransportPreference};
use vane_core::eval::Context;
use vane_core::model::{Flag, Serve};

use crate::server::{Server, ServerConfig};

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

/// Where the admin commands send their requests.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Base URL of the server's HTTP API.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:7480",
        env = "VANE_SERVER"
    )]
    pub server: String,
    /// Admin token; default: the `admin-token` file in the data directory.
    #[arg(long, global = true, env = "VANE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the server's JSON answer instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server on the embedded store.
    Serve(ServeArgs),
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
}

/// `vane serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Protocol address: TLS on TCP and QUIC on UDP, same port.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: std::net::SocketAddr,
    /// HTTP address: admin API, health, readiness, metrics.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub http: std::net::SocketAddr,
    /// Create an environment `demo` with a few flags and print a server key for it.
    #[arg(long)]
    pub demo: bool,
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
    /// Seconds over which clients spread their reconnects after a shutdown.
    #[arg(long, default_value_t = 5)]
    pub goaway_window: u64,
}

/// `vane env …`.
#[derive(Debug, Subcommand)]
pub enum EnvCmd {
    /// Create an environment.
    Create {
        /// Its name.
        name: String,
    },
    /// List environments.
    List,
    /// Show one environment.
    Get {
        /// Its name.
        name: String,
    },
    /// Delete an environment with its flags and keys.
    Delete {
        /// Its name.
        name: String,
    },
}

/// The kind of an SDK key.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// Backend services: full rules.
    Server,
    /// Mobile apps: evaluated values only.
    Mobile,
}

/// `vane key …`.
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create an SDK key and print its secret (shown only this once).
    Create {
        /// The environment.
        env: String,
        /// What the key may do.
        #[arg(long, value_enum)]
        kind: KindArg,
    },
    /// List an environment's keys.
    List {
        /// The environment.
        env: String,
    },
    /// Revoke a key; its sessions end at once.
    Revoke {
        /// The environment.
        env: String,
        /// The key id (from `key list`).
        id: String,
    },
}

/// `vane flag …`.
#[derive(Debug, Subcommand)]
pub enum FlagCmd {
    /// Create or replace a flag.
    #[command(group = clap::ArgGroup::new("source").required(true))]
    Set {
        /// The environment.
        env: String,
        /// The flag key.
        flag: String,
        /// A boolean flag, on, serving this value (and `false` when toggled off).
        #[arg(long, group = "source")]
        bool: Option<bool>,
        /// The flag's JSON definition (see docs/FLAGS.md); `-` reads stdin.
        #[arg(long, group = "source")]
        file: Option<PathBuf>,
    },
    /// Turn a flag on or off.
    #[command(group = clap::ArgGroup::new("state").required(true))]
    Toggle {
        /// The environment.
        env: String,
        /// The flag key.
        flag: String,
        /// Turn it on.
        #[arg(long, group = "state")]
        on: bool,
        /// Turn it off.
        #[arg(long, group = "state")]
        off: bool,
    },
    /// Show one flag's definition.
    Get {
        /// The environment.
        env: String,
        /// The flag key.
        flag: String,
    },
    /// List an environment's flags with the value each serves.
    List {
        /// The environment.
        env: String,
    },
    /// Delete a flag.
    Delete {
        /// The environment.
        env: String,
        /// The flag key.
        flag: String,
    },
}

/// `vane segment …`.
#[derive(Debug, Subcommand)]
pub enum SegmentCmd {
    /// Create or replace a segment from its JSON definition (see docs/FLAGS.md).
    Set {
        /// The environment.
        env: String,
        /// The segment key.
        segment: String,
        /// The JSON file; `-` reads stdin.
        #[arg(long)]
        file: PathBuf,
    },
    /// Show one segment.
    Get {
        /// The environment.
        env: String,
        /// The segment key.
        segment: String,
    },
    /// List an environment's segments.
    List {
        /// The environment.
        env: String,
    },
    /// Delete a segment no flag uses.
    Delete {
        /// The environment.
        env: String,
        /// The segment key.
        segment: String,
    },
}

/// The transport `watch` uses.

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TransportArg {
    /// QUIC first, TCP raced after a head start.
    Auto,
    /// QUIC only.
    Quic,
    /// TCP+TLS only.
    Tcp,
}

/// `vane watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The server's protocol address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub endpoint: String,
    /// The SDK key.
    #[arg(long, env = "VANE_SDK_KEY", hide_env_values = true)]
    pub sdk_key: String,
    /// PEM of the CA to trust; default: `tls/ca.pem` in the data directory.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Name to verify the certificate against; default: the endpoint's host.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Transport.
    #[arg(long, value_enum, default_value = "auto")]
    pub transport: TransportArg,
    /// Ask for notices and fetch, instead of pushed deltas.
    #[arg(long)]
    pub notify: bool,
    /// One JSON object per line for every applied update.
    #[arg(long)]
    pub json: bool,
    /// Evaluated mode, as a mobile SDK: the server evaluates for this context (a JSON object,
    /// e.g. '{"key": "user-1", "country": "de"}') and sends only values.
    #[arg(long)]
    pub context: Option<String>,
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
    let result = match cli.command {
        Command::Serve(args) => serve(&cli.data, args).await,
        Command::Env { admin, cmd } => admin_cmd(&cli.data, &admin, |a| env_cmd(a, cmd)).await,
        Command::Key { admin, cmd } => admin_cmd(&cli.data, &admin, |a| key_cmd(a, cmd)).await,
        Command::Flag { admin, cmd } => admin_cmd(&cli.data, &admin, |a| flag_cmd(a, cmd)).await,
        Command::Segment { admin, cmd } => {
            admin_cmd(&cli.data, &admin, |a| segment_cmd(a, cmd)).await
        }
        Command::Eval {
            admin,
            env,
            flag,
            context,
        } => admin_cmd(&cli.data, &admin, |a| eval_cmd(a, env, flag, context)).await,
        Command::Watch(args) => watch(&cli.data, args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn serve(data: &Path, args: ServeArgs) -> Result<(), Failure> {
    let mut config = ServerConfig::new(data);
    config.listen = args.listen;
    config.http = args.http;
    config.quic = !args.no_quic;
    config.demo = args.demo;
    config.history_window = args.history.max(1);
    config.max_connections = args.max_connections.max(1);
    config.session.heartbeat = Duration::from_secs(args.heartbeat.max(1));
    config.session.goaway_window = Duration::from_secs(args.goaway_window);
    let stop = shutdown_signal()?;
    let server = Server::bind(config).await?;
    println!(
        "vane {} serving: protocol {} ({}), HTTP http://{}",
        env!("CARGO_PKG_VERSION"),
        server.protocol_addr(),
        if args.no_quic {
            "TCP+TLS"
        } else {
            "QUIC and TCP+TLS"
        },
        server.http_addr()
    );
    println!("clients trust {}", server.ca_path().display());
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

/// An authenticated client of the admin API.
struct Admin {
    http: reqwest::Client,
    base: String,
    token: String,
    json: bool,
}

impl Admin {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let url = format!("{}/api/v1{path}", self.base.trim_end_matches('/'));
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::unreachable(format!("cannot reach {}: {e}", self.base)))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            Failure::unreachable(format!("reading the answer from {}: {e}", self.base))
        })?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .map_err(|_| Failure::refused(format!("{status}: {text}")))?
        };
        if status.is_success() {
            return Ok(value);
        }
        let code = value["error"]["code"].as_str().unwrap_or("error");
        let message = value["error"]["message"].as_str().unwrap_or(text.as_str());
        Err(Failure::refused(format!("{code}: {message}")))
    }

    /// Prints the JSON answer with `--json`, else the summary.
    fn print(&self, value: &Value, summary: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", summary());
        }
    }
}

async fn admin_cmd<F, Fut>(data: &Path, args: &AdminArgs, f: F) -> Result<(), Failure>
where
    F: FnOnce(Admin) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let path = data.join("admin-token");
            std::fs::read_to_string(&path)
                .map(|t| t.trim().to_owned())
                .map_err(|e| {
                    Failure::unreachable(format!(
                        "no admin token: pass --token, set VANE_ADMIN_TOKEN, or point --data at the server's directory ({}: {e})",
                        path.display()
                    ))
                })?
        }
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Failure::unreachable(e.to_string()))?;
    f(Admin {
        http,
        base: args.server.clone(),
        token,
        json: args.json,
    })
    .await
}

use reqwest::Method;

fn version_line(v: &Value) -> String {
    format!("version {}", v["version"])
}

async fn env_cmd(a: Admin, cmd: EnvCmd) -> Result<(), Failure> {
    match cmd {
        EnvCmd::Create { name } => {
            let v = a
                .call(Method::POST, "/environments", Some(json!({ "name": name })))
                .await?;
            a.print(&v, || {
                format!(
                    "created {name} (epoch {})",
                    v["epoch"].as_str().unwrap_or("?")
                )
            });
        }
        EnvCmd::List => {
            let v = a.call(Method::GET, "/environments", None).await?;
            a.print(&v, || {
                let mut out = format!(
                    "{:<24} {:>8} {:>6}  {}",
                    "NAME", "VERSION", "FLAGS", "EPOCH"
                );
                for e in v["environments"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n{:<24} {:>8} {:>6}  {}",
                        e["name"].as_str().unwrap_or(""),
                        e["version"],
                        e["flags"],
                        e["epoch"].as_str().unwrap_or("")
                    ));
                }
                out
            });
        }
        EnvCmd::Get { name } => {
            let v = a
                .call(Method::GET, &format!("/environments/{name}"), None)
                .await?;
            a.print(&v, || {
                format!(
                    "{name}: version {}, {} flags, epoch {}",
                    v["version"],
                    v["flags"],
                    v["epoch"].as_str().unwrap_or("")
                )
            });
        }
        EnvCmd::Delete { name } => {
            let v = a
                .call(Method::DELETE, &format!("/environments/{name}"), None)
                .await?;
            a.print(&v, || format!("deleted {name}"));
        }
    }
    Ok(())
}

async fn key_cmd(a: Admin, cmd: KeyCmd) -> Result<(), Failure> {
    match cmd {
        KeyCmd::Create { env, kind } => {
            let kind = match kind {
                KindArg::Server => "server",
                KindArg::Mobile => "mobile",
            };
            let v = a
                .call(
                    Method::POST,
                    &format!("/environments/{env}/keys"),
                    Some(json!({ "kind": kind })),
                )
                .await?;
            a.print(&v, || v["secret"].as_str().unwrap_or("").to_owned());
        }
        KeyCmd::List { env } => {
            let v = a
                .call(Method::GET, &format!("/environments/{env}/keys"), None)
                .await?;
            a.print(&v, || {
                let mut out = format!("{:<18} {:<7} {:<16} {}", "ID", "KIND", "PREFIX", "STATE");
                for k in v["keys"].as_array().into_iter().flatten() {
                    let state = if k["revoked_at"].is_null() {
                        "active"
                    } else {
                        "revoked"
                    };
                    out.push_str(&format!(
                        "\n{:<18} {:<7} {:<16} {state}",
                        k["id"].as_str().unwrap_or(""),
                        k["kind"].as_str().unwrap_or(""),
                        k["prefix"].as_str().unwrap_or(""),
                    ));
                }
                out
            });
        }
        KeyCmd::Revoke { env, id } => {
            let v = a
                .call(
                    Method::DELETE,
                    &format!("/environments/{env}/keys/{id}"),
                    None,
                )
                .await?;
            a.print(&v, || format!("revoked {id}"));
        }
    }
    Ok(())
}

async fn flag_cmd(a: Admin, cmd: FlagCmd) -> Result<(), Failure> {
    match cmd {
        FlagCmd::Set {
            env,
            flag,
            bool,
            file,
        } => {
            let body = match (bool, file) {
                (Some(b), _) => {
                    serde_json::to_value(vane_core::model::Flag::boolean(flag.clone(), true, b))
                        .map_err(|e| Failure::refused(e.to_string()))?
                }
                (None, Some(path)) => read_json(&path)?,
                (None, None) => unreachable!("clap requires one source"),
            };
            let v = a
                .call(
                    Method::PUT,
                    &format!("/environments/{env}/flags/{flag}"),
                    Some(body),
                )
                .await?;
            a.print(&v, || version_line(&v));
        }
        FlagCmd::Toggle { env, flag, on, off } => {
            debug_assert!(on != off, "clap makes them exclusive and requires one");
            let v = a
                .call(
                    Method::POST,
                    &format!("/environments/{env}/flags/{flag}/toggle"),
                    Some(json!({ "on": on })),
                )
                .await?;
            a.print(&v, || version_line(&v));
        }
        FlagCmd::Get { env, flag } => {
            let v = a
                .call(
                    Method::GET,
                    &format!("/environments/{env}/flags/{flag}"),
                    None,
                )
                .await?;
            a.print(&v, || serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        FlagCmd::List { env } => {
            let v = a
                .call(Method::GET, &format!("/environments/{env}/flags"), None)
                .await?;
            a.print(&v, || {
                let mut out = format!("{:<28} {:<4} {:<40} {}", "KEY", "ON", "SERVES", "VERSION");
                let flags: Vec<Flag> =
                    serde_json::from_value(v["flags"].clone()).unwrap_or_default();
                for f in &flags {
                    out.push_str(&format!(
                        "\n{:<28} {:<4} {:<40} {}",
                        f.key,
                        if f.on { "on" } else { "off" },
                        serving(f),
                        f.version
                    ));
                }
                out
            });
        }
        FlagCmd::Delete { env, flag } => {
            let v = a
                .call(
                    Method::DELETE,
                    &format!("/environments/{env}/flags/{flag}"),
                    None,
                )
                .await?;
            a.print(&v, || version_line(&v));
        }
    }
    Ok(())
}

async fn watch(data: &Path, args: WatchArgs) -> Result<(), Failure> {
    let ca_path = args.ca.unwrap_or_else(|| data.join("tls").join("ca.pem"));
    let ca = std::fs::read(&ca_path)
        .map_err(|e| Failure::refused(format!("{}: {e}", ca_path.display())))?;
    let mut config = ClientConfig::new(args.endpoint, args.sdk_key, ca);
    config.server_name = args.server_name;
    config.transport = match args.transport {
        TransportArg::Auto => TransportPreference::Auto,
        TransportArg::Quic => TransportPreference::Quic,
        TransportArg::Tcp => TransportPreference::Tcp,
    };
    if args.notify {
        config = config.notify_mode();
    }
    if let Some(text) = &args.context {
        let context =
            Context::parse(text).map_err(|e| Failure::usage(format!("--context: {e}")))?;
        config = config.evaluated(context);
    }
    let stop = shutdown_signal()?;
    tokio::pin!(stop);
    let (client, mut updates) =
        Client::start_with_updates(config).map_err(|e| Failure::refused(e.to_string()))?;
    let mut status = client.watch_status();
    let mut last_state = None;
    loop {
        tokio::select! {
            u = updates.recv() => match u {
                Ok(update) => {
                    let transport = client.status().transport;
                    // The client's own answer: evaluated locally in rules mode, the server's in
                    // evaluated mode. A deleted flag has no value.
                    let value = |k: &str| client.details(k).value.map(|v| json!(v));
                    if args.json {
                        let values: serde_json::Map<String, Value> = update
                            .changed
                            .iter()
                            .map(|k| (k.clone(), value(k).unwrap_or(Value::Null)))
                            .collect();
                        println!("{}", json!({
                            "version": update.selector.version,
                            "epoch": update.selector.epoch_hex(),
                            "transport": transport,
                            "kind": update.kind,
                            "changed": update.changed,
                            "values": values,
                        }));
                    } else {
                        let shown: Vec<String> = update
                            .changed
                            .iter()
                            .map(|k| match value(k) {
                                Some(v) => format!("{k}={v}"),
                                None => format!("{k} (deleted)"),
                            })
                            .collect();
                        println!(
                            "[{}] v{} {:?}: {}",
                            transport.map_or("-".to_owned(), |t| t.to_string()),
                            update.selector.version,
                            update.kind,
                            if shown.is_empty() { "no changes".to_owned() } else { shown.join(", ") }
                        );
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("warning: skipped {n} updates (printing too slowly)");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            r = status.changed() => {
                if r.is_err() {
                    break;
                }
                let s = status.borrow_and_update().clone();
                if let Some(fatal) = s.fatal {
                    return Err(Failure::refused(fatal.to_string()));
                }
                if last_state != Some(s.state) && !args.json {
                    match s.state {
                        ConnectionState::Connected => eprintln!("connected over {}", s.transport.map_or("?".into(), |t| t.to_string())),
                        ConnectionState::Disconnected => eprintln!("disconnected: {}", s.last_error.as_deref().unwrap_or("")),
                        _ => {}
                    }
                }
                last_state = Some(s.state);
            }
            _ = &mut stop => break,
        }
    }
    client.close().await;
    Ok(())
}

/// What a flag serves, in a few words: its value if it is off or has no rules, else its rules
/// and fallthrough.
fn serving(f: &Flag) -> String {
    let value = |variant: &str| {
        f.variants.get(variant).map_or_else(
            || "?".to_owned(),
            |v| serde_json::to_string(v).unwrap_or_default(),
        )
    };
    let fallthrough = match &f.fallthrough {
        Serve::Variant(v) => value(v),
        Serve::Rollout(r) => {
            let parts: Vec<String> = r
                .variants
                .iter()
                .map(|w| format!("{} {}%", w.variant, f64::from(w.weight) / 1000.0))
                .collect();
            format!("rollout {}", parts.join(" / "))
        }
    };
    if !f.on {
        value(&f.off_variant)
    } else if f.rules.is_empty() {
        fallthrough
    } else {
        format!("{} rule(s), else {fallthrough}", f.rules.len())
    }
}

/// Reads a JSON document from a file, or stdin for `-`.
fn read_json(path: &Path) -> Result<Value, Failure> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    }
    .map_err(|e| Failure::refused(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Failure::refused(format!("{}: {e}", path.display())))
}

async fn segment_cmd(a: Admin, cmd: SegmentCmd) -> Result<(), Failure> {
    match cmd {
        SegmentCmd::Set { env, segment, file } => {
            let body = read_json(&file)?;
            let v = a
                .call(
                    Method::PUT,
                    &format!("/environments/{env}/segments/{segment}"),
                    Some(body),
                )
                .await?;
            a.print(&v, || version_line(&v));
        }
        SegmentCmd::Get { env, segment } => {
            let v = a
                .call(
                    Method::GET,
                    &format!("/environments/{env}/segments/{segment}"),
                    None,
                )
                .await?;
            a.print(&v, || serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        SegmentCmd::List { env } => {
            let v = a
                .call(Method::GET, &format!("/environments/{env}/segments"), None)
                .await?;
            a.print(&v, || {
                let mut out = format!(
                    "{:<28} {:>8} {:>8} {:>6} {}",
                    "KEY", "INCLUDED", "EXCLUDED", "RULES", "VERSION"
                );
                for s in v["segments"].as_array().into_iter().flatten() {
                    let count = |f: &str| s[f].as_array().map_or(0, Vec::len);
                    out.push_str(&format!(
                        "\n{:<28} {:>8} {:>8} {:>6} {}",
                        s["key"].as_str().unwrap_or(""),
                        count("included"),
                        count("excluded"),
                        count("rules"),
                        s["version"]
                    ));
                }
                out
            });
        }
        SegmentCmd::Delete { env, segment } => {
            let v = a
                .call(
                    Method::DELETE,
                    &format!("/environments/{env}/segments/{segment}"),
                    None,
                )
                .await?;
            a.print(&v, || version_line(&v));
        }
    }
    Ok(())
}

async fn eval_cmd(a: Admin, env: String, flag: String, context: String) -> Result<(), Failure> {
    let context: Value = serde_json::from_str(&context)
        .map_err(|e| Failure::usage(format!("--context is not JSON: {e}")))?;
    let v = a
        .call(
            Method::POST,
            &format!("/environments/{env}/flags/{flag}/evaluate"),
            Some(json!({ "context": context })),
        )
        .await?;
    a.print(&v, || {
        let mut out = format!(
            "value:   {}\nvariant: {}\nreason:  {}",
            v["value"],
            v["variant"].as_str().unwrap_or("-"),
            v["reason"].as_str().unwrap_or("?")
        );
        if let Some(code) = v["error_code"].as_str() {
            out.push_str(&format!("\nerror:   {code}"));
        }
        if let Some(i) = v["rule"]["index"].as_u64() {
            let id = v["rule"]["id"]
                .as_str()
                .map(|id| format!(" ({id})"))
                .unwrap_or_default();
            out.push_str(&format!("\nrule:    {i}{id}"));
        }
        if let Some(b) = v["bucket"].as_u64() {
            out.push_str(&format!("\nbucket:  {b} of 100000"));
        }
        out.push_str(&format!(
            "\nwhy:     {}",
            v["explanation"].as_str().unwrap_or("")
        ));
        out
    });
    Ok(())
}
