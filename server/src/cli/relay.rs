//! `vane relay`: mirror environments from an upstream node and serve them, until SIGTERM or
//! SIGINT.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use vane_core::client::TransportPreference;

use super::{Failure, ProtocolArgs, ProtocolConfig, print_listening, shutdown_signal};
use crate::relay::{Relay, RelayConfig};

/// How the relay reaches its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UpstreamTransport {
    /// QUIC first, TCP+TLS raced after a head start.
    Auto,
    /// QUIC only.
    Quic,
    /// TCP+TLS only.
    Tcp,
}

/// `vane relay`.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The upstream's protocol address, `HOST:PORT`: a `vane serve` node (or a load balancer
    /// in front of several), or another relay.
    #[arg(long, env = "VANE_UPSTREAM", value_name = "HOST:PORT")]
    pub upstream: String,
    /// A server key (`vane_srv_…`) of an environment to mirror; repeat it, one per
    /// environment. Downstream clients use their own keys of that environment, as at the
    /// origin. Better given in the environment, comma-separated, than on the command line.
    #[arg(
        long = "sdk-key",
        env = "VANE_SDK_KEYS",
        value_delimiter = ',',
        required = true,
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub sdk_keys: Vec<String>,
    /// PEM file of the CA to trust for the upstream (a node's `DATA/tls/ca.pem`); default:
    /// the system's trust store.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// The name the upstream's certificate must carry; default: the upstream's host.
    #[arg(long, value_name = "NAME")]
    pub upstream_name: Option<String>,
    /// How to reach the upstream.
    #[arg(long, value_enum, default_value_t = UpstreamTransport::Auto)]
    pub upstream_transport: UpstreamTransport,
    /// Protocol address for downstream clients: TLS on TCP and QUIC on UDP, same port.
    #[arg(long, default_value = "127.0.0.1:7444")]
    pub listen: std::net::SocketAddr,
    /// HTTP address: health, readiness, status, metrics.
    #[arg(long, default_value = "127.0.0.1:7481")]
    pub http: std::net::SocketAddr,
    #[command(flatten)]
    pub protocol: ProtocolArgs,
}

pub(super) async fn relay(data: &Path, args: RelayArgs) -> Result<(), Failure> {
    let mut config = RelayConfig::new(data, args.upstream, args.sdk_keys);
    if let Some(path) = &args.upstream_ca {
        config.upstream_ca = std::fs::read(path).map_err(|e| {
            Failure::usage(format!("reading --upstream-ca {}: {e}", path.display()))
        })?;
    }
    config.upstream_name = args.upstream_name;
    config.upstream_transport = match args.upstream_transport {
        UpstreamTransport::Auto => TransportPreference::Auto,
        UpstreamTransport::Quic => TransportPreference::Quic,
        UpstreamTransport::Tcp => TransportPreference::Tcp,
    };
    config.listen = args.listen;
    config.http = args.http;
    args.protocol.apply(ProtocolConfig {
        quic: &mut config.quic,
        history_window: &mut config.history_window,
        max_connections: &mut config.max_connections,
        listen_backlog: &mut config.listen_backlog,
        session: &mut config.session,
        limits: &mut config.limits,
    });
    let stop = shutdown_signal()?;
    let relay = Relay::bind(config).await?;
    print_listening(
        "relay",
        relay.protocol_addr(),
        !args.protocol.no_quic,
        relay.http_addr(),
        &relay.ca_path(),
    );
    relay.run(stop).await?;
    Ok(())
}
