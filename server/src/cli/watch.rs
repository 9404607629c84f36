//! `vane watch`: connects like an SDK (QUIC first, TCP+TLS raced; rules mode, or evaluated mode
//! with `--context`) and prints every update as it is applied.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use vane_core::client::{Client, ClientConfig, ConnectionState, TransportPreference};
use vane_core::eval::Context;

use super::{Failure, shutdown_signal};

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

pub(super) async fn watch(data: &Path, args: WatchArgs) -> Result<(), Failure> {
    let ca_path = args.ca.unwrap_or_else(|| crate::tls::ca_path(data));
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
