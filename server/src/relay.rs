//! `vane relay`: a node without a store that mirrors environments from an upstream (a
//! `vane serve` node, or another relay) and serves sessions of its own, near the apps.
//!
//! Each environment is mirrored through the Rust client, with a server key of that environment,
//! in rules mode and as a relay (`Hello.relay`): the upstream sends the environment's SDK keys
//! too, by hash. What the client applies is handed to this relay's [`Hub`] as it is applied
//! ([`vane_core::client::Mirror`]): snapshots replace the environment, deltas are applied at
//! the upstream's versions (one change at a time while the relay keeps up; a merged span after
//! a gap), and the key set replaces the one held. Epochs and versions are the upstream's, so a
//! client moves between a relay and its origin and resumes by delta, and downstream clients use
//! the keys they use at the origin (a key revoked there ends their sessions here too).
//!
//! The relay is ready once every environment has had its first snapshot and keys. When its
//! upstream is out of reach it keeps serving the last state it received and says so: in
//! `/status`, in `/readyz`'s answer (still 200: the state is served), in the metrics and in its
//! log. When the upstream refuses it for good (its key revoked there, the environment deleted),
//! the environment is no longer served and its sessions end with `UNAUTHENTICATED`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use vane_core::client::{
    Client, ClientConfig, ConnectionState, Mirror, Mirrored, TransportPreference,
};
use vane_core::history::Item;
use vane_core::model::{Flag, Segment};
use vane_proto::v1 as pb;

use crate::api::{ErrorCode, RelayEnvStatus, RelayStatus};
use crate::http::ops::{HubMetrics, LimitMetrics};
use crate::http::{ApiError, HttpLimits};
use crate::hub::{Hub, Revoked};
use crate::keys::{KeyKind, KeyRecord};
use crate::limits::LimitsConfig;
use crate::server::{Ctx, Listeners, Protocol, default_backlog};
use crate::session::SessionConfig;
use crate::store::{EnvState, LoadedEnv, Retention};
use crate::tls;

/// Everything `vane relay` can be told.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Holds the relay's `tls/` (its certificate for downstream clients) and lasting secret.
    pub data_dir: PathBuf,
    /// The upstream's protocol address, `HOST:PORT`.
    pub upstream: String,
    /// PEM of the CA to trust for the upstream; empty: the platform's trust store.
    pub upstream_ca: Vec<u8>,
    /// The name the upstream's certificate is checked against; default: the host dialled.
    pub upstream_name: Option<String>,
    /// How to reach the upstream.
    pub upstream_transport: TransportPreference,
    /// A server key (`vane_srv_…`) of each environment to mirror, one per environment.
    pub sdk_keys: Vec<String>,
    /// The protocol address: TLS on TCP and QUIC on UDP, same port.
    pub listen: SocketAddr,
    /// The HTTP address (`/healthz`, `/readyz`, `/status`, `/metrics`).
    pub http: SocketAddr,
    /// Whether to serve QUIC as well as TCP+TLS.
    pub quic: bool,
    /// Changes kept per environment for resumption by delta.
    pub history_window: usize,
    /// Most concurrent downstream connections.
    pub max_connections: usize,
    /// TCP connections the kernel queues before they are accepted.
    pub listen_backlog: u32,
    /// How long shutdown waits for sessions to leave after GoAway.
    pub drain_timeout: Duration,
    /// Limits of the HTTP listener.
    pub http_limits: HttpLimits,
    /// What one source address may ask.
    pub limits: LimitsConfig,
    /// Per-session settings.
    pub session: SessionConfig,
}

impl RelayConfig {
    /// The defaults of `vane relay`, mirroring `sdk_keys` from `upstream`.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        upstream: impl Into<String>,
        sdk_keys: Vec<String>,
    ) -> RelayConfig {
        RelayConfig {
            data_dir: data_dir.into(),
            upstream: upstream.into(),
            upstream_ca: Vec::new(),
            upstream_name: None,
            upstream_transport: TransportPreference::Auto,
            sdk_keys,
            listen: SocketAddr::from(([127, 0, 0, 1], 7444)),
            http: SocketAddr::from(([127, 0, 0, 1], 7481)),
            quic: true,
            history_window: 1000,
            max_connections: 100_000,
            listen_backlog: default_backlog(),
            drain_timeout: Duration::from_secs(10),
            http_limits: HttpLimits::default(),
            limits: LimitsConfig::default(),
            session: SessionConfig::default(),
        }
    }
}

/// A bound relay, ready to [`Relay::run`].
#[derive(Debug)]
pub struct Relay {
    config: RelayConfig,
    tls: Arc<rustls::ServerConfig>,
    protocol: Protocol,
    http: TcpListener,
}

/// Characters of a key that name it in logs and status (`vane_srv_` and five more).
const KEY_PREFIX_CHARS: usize = 14;

impl Relay {
    /// Checks the configuration, prepares the data directory (TLS material) and binds every
    /// socket.
    pub async fn bind(config: RelayConfig) -> anyhow::Result<Relay> {
        if config.sdk_keys.is_empty() {
            anyhow::bail!(
                "a relay needs at least one --sdk-key (a server key of each environment to mirror)"
            );
        }
        for key in &config.sdk_keys {
            if !key.starts_with("vane_srv_") {
                anyhow::bail!(
                    "{}…: a relay mirrors flag rules, which only server keys (vane_srv_…) receive",
                    prefix(key)
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = config.sdk_keys.iter().find(|k| !seen.insert(*k)) {
            anyhow::bail!("the key {}… is given twice", prefix(twice));
        }
        let Listeners {
            tls,
            protocol,
            http,
            ..
        } = Listeners::bind(
            &config.data_dir,
            config.listen,
            config.listen_backlog,
            config.quic,
            &config.session,
            config.http,
        )
        .await?;
        Ok(Relay {
            config,
            tls,
            protocol,
            http,
        })
    }

    /// The protocol address downstream clients connect to.
    pub fn protocol_addr(&self) -> SocketAddr {
        self.protocol.addr()
    }

    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The PEM downstream clients trust (unless the operator put their own certificate in
    /// `tls/`).
    pub fn ca_path(&self) -> PathBuf {
        tls::ca_path(&self.config.data_dir)
    }

    /// Mirrors and serves until `shutdown` resolves; then every downstream session gets
    /// GoAway and the upstream connections close.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Relay {
            config,
            tls,
            protocol,
            http,
        } = self;
        let hub = Arc::new(Hub::new(config.history_window));
        // A key made at the origin a moment ago reaches this relay in its next Keys frame:
        // until then (a little while) a client showing it is told to retry, not refused.
        hub.follow_with(KEY_GRACE, None);
        let cancel = CancellationToken::new();
        let ctx = Ctx::new(
            hub.clone(),
            config.session.clone(),
            cancel.clone(),
            config.max_connections,
            config.limits,
        );
        let per_source = ctx.limits().clone();
        let serving = protocol.serve(tls, ctx);

        let mut upstreams = Vec::new();
        let claimed = Arc::new(Mutex::new(std::collections::HashSet::new()));
        for key in &config.sdk_keys {
            let mirror = Arc::new(EnvMirror::new(hub.clone(), key, claimed.clone()));
            let mut client_config = ClientConfig::new(
                config.upstream.clone(),
                key.clone(),
                config.upstream_ca.clone(),
            )
            .relay(mirror.clone());
            client_config.server_name = config.upstream_name.clone();
            client_config.transport = config.upstream_transport;
            client_config.sync.sdk_name = "vane-relay".into();
            client_config.sync.evaluation_summaries = false;
            let client = Client::start(client_config).with_context(|| {
                format!(
                    "configuring the upstream connection for {}…",
                    mirror.key_prefix
                )
            })?;
            upstreams.push(Upstream { mirror, client });
        }
        let state = Arc::new(RelayState {
            hub: hub.clone(),
            upstream: config.upstream.clone(),
            upstreams,
        });
        let watchers: Vec<_> = (0..state.upstreams.len())
            .map(|i| tokio::spawn(watch_upstream(state.clone(), i, cancel.clone())))
            .collect();

        let app = routes(state.clone(), per_source);
        let http_task = tokio::spawn(crate::http::serve::serve(
            http,
            app,
            config.http_limits,
            None,
            cancel.clone().cancelled_owned(),
        ));
        info!(
            protocol = %config.listen,
            upstream = %config.upstream,
            environments = config.sdk_keys.len(),
            "relay started; waiting for the first snapshots"
        );

        shutdown.await;
        info!("shutting down: sending GoAway to every session");
        cancel.cancel();
        serving.drain(config.drain_timeout).await;
        for upstream in &state.upstreams {
            upstream.client.close().await;
        }
        for watcher in watchers {
            let _ = watcher.await;
        }
        if let Err(e) = http_task.await {
            warn!(error = %e, "HTTP server task failed");
        }
        info!("stopped");
        Ok(())
    }
}

/// How long a key the relay has not heard of is answered "retry shortly" rather than refused.
const KEY_GRACE: Duration = Duration::from_secs(2);

fn prefix(key: &str) -> String {
    key.chars().take(KEY_PREFIX_CHARS).collect()
}

/// What the relay's HTTP side and its upstream watchers share.
#[derive(Debug)]
struct RelayState {
    hub: Arc<Hub>,
    upstream: String,
    upstreams: Vec<Upstream>,
}

/// One mirrored environment: its client and what that client hands on.
#[derive(Debug)]
struct Upstream {
    mirror: Arc<EnvMirror>,
    client: Client,
}

impl RelayState {
    /// Whether sessions are served: every environment has arrived or was refused, and at
    /// least one has arrived. Once true it stays true (the last state is served whatever the
    /// upstream does), so it is recorded in the hub.
    fn check_ready(&self) -> bool {
        if self.hub.is_ready() {
            return true;
        }
        let states: Vec<_> = self.upstreams.iter().map(|u| u.mirror.state()).collect();
        let ready = states.iter().all(|s| s.serving() || s.refused.is_some())
            && states.iter().any(MirrorState::serving);
        if ready {
            self.hub.set_ready();
            info!("ready: every environment has arrived from the upstream");
        }
        ready
    }

    fn status(&self) -> RelayStatus {
        let environments = self
            .upstreams
            .iter()
            .map(|u| {
                let state = u.mirror.state();
                let status = u.client.status();
                let env = state.env.as_deref().and_then(|e| self.hub.env(e));
                let selector = env.as_ref().map(|e| e.selector());
                RelayEnvStatus {
                    env: state.env.clone(),
                    key_prefix: u.mirror.key_prefix.clone(),
                    upstream: match status.state {
                        ConnectionState::Connecting => "connecting",
                        ConnectionState::Connected => "connected",
                        ConnectionState::Disconnected | ConnectionState::Suspended => {
                            "disconnected"
                        }
                        ConnectionState::Stopped => "stopped",
                    }
                    .to_owned(),
                    transport: status.transport.map(|t| t.to_string()),
                    version: selector.map(|s| s.version),
                    epoch: selector.map(|s| format!("{:016x}", s.epoch)),
                    serving: state.serving(),
                    stale_since_ms: state.stale_since.map(unix_ms),
                    last_error: status.last_error.clone(),
                    refused: state.refused.clone(),
                    sessions: env.map_or(0, |e| e.session_count()),
                }
            })
            .collect();
        RelayStatus {
            ready: self.hub.is_ready(),
            upstream: self.upstream.clone(),
            environments,
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Follows one upstream connection's status: logs when the upstream is lost and back, marks
/// the state served as stale meanwhile, and drops the environment when the upstream refuses
/// the relay for good.
async fn watch_upstream(state: Arc<RelayState>, index: usize, stop: CancellationToken) {
    let upstream = &state.upstreams[index];
    let mirror = &upstream.mirror;
    let mut status = upstream.client.watch_status();
    let mut connected = false;
    loop {
        let now = status.borrow_and_update().clone();
        let is_connected = now.state == ConnectionState::Connected;
        if is_connected != connected {
            connected = is_connected;
            let env = mirror.state().env.unwrap_or_default();
            if connected {
                if mirror.set_stale(false) {
                    info!(env, upstream = %state.upstream, "upstream back; mirroring again");
                }
            } else if mirror.state().serving() && mirror.set_stale(true) {
                warn!(
                    env,
                    upstream = %state.upstream,
                    error = now.last_error.as_deref().unwrap_or("unknown"),
                    "upstream lost; serving the last state received until it is back"
                );
            }
        }
        if let Some(fatal) = &now.fatal {
            mirror.refuse(&fatal.to_string());
            state.check_ready();
            return;
        }
        state.check_ready();
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            // A snapshot or key set applied: readiness may have changed.
            _ = mirror.applied.notified() => {}
            _ = stop.cancelled() => return,
        }
        if mirror.refused.load(Ordering::Acquire) {
            // Refused here (its environment is mirrored with another key): the connection has
            // nothing more to bring.
            upstream.client.close().await;
            state.check_ready();
            return;
        }
    }
}

/// What the client hands on for one environment, applied to the relay's hub.
#[derive(Debug)]
pub(crate) struct EnvMirror {
    hub: Arc<Hub>,
    key_prefix: String,
    state: Mutex<MirrorState>,
    /// Set once the upstream refused: nothing more is applied.
    refused: AtomicBool,
    /// The environments the relay's mirrors have claimed (each is mirrored once).
    claimed: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Notified when a snapshot or key set was applied.
    applied: tokio::sync::Notify,
}

#[derive(Debug, Clone, Default)]
struct MirrorState {
    /// The environment, from the upstream's Welcome.
    env: Option<String>,
    /// Whether a snapshot has arrived.
    snapshot: bool,
    /// Whether the key set has arrived.
    keys: bool,
    /// Since when the state served is the last one received (the upstream out of reach).
    stale_since: Option<SystemTime>,
    /// Why the upstream refused, for good.
    refused: Option<String>,
}

impl MirrorState {
    fn serving(&self) -> bool {
        self.snapshot && self.keys && self.refused.is_none()
    }
}

impl EnvMirror {
    /// The mirror of the environment `key` belongs to, into `hub`; `claimed` is shared by
    /// every mirror of one relay.
    pub(crate) fn new(
        hub: Arc<Hub>,
        key: &str,
        claimed: Arc<Mutex<std::collections::HashSet<String>>>,
    ) -> EnvMirror {
        EnvMirror {
            hub,
            key_prefix: prefix(key),
            state: Mutex::new(MirrorState::default()),
            refused: AtomicBool::new(false),
            claimed,
            applied: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> MirrorState {
        self.state.lock().clone()
    }

    /// Marks the state served as stale (or current again); whether that changed anything.
    fn set_stale(&self, stale: bool) -> bool {
        let mut state = self.state.lock();
        if state.stale_since.is_some() == stale {
            return false;
        }
        state.stale_since = stale.then(SystemTime::now);
        true
    }

    /// The environment is not served by this mirror for good: the upstream refused the relay,
    /// or (`why` says) the relay cannot mirror it with this key.
    fn refuse(&self, why: &str) {
        self.refused.store(true, Ordering::Release);
        let mut state = self.state.lock();
        if state.refused.is_some() {
            return;
        }
        state.refused = Some(why.to_owned());
        match state.env.clone() {
            Some(env) => {
                // Only this mirror installed it (an environment is mirrored once).
                error!(env, key = %self.key_prefix, error = why, "no longer serving the environment");
                drop(state);
                self.hub.remove_env_because(&env, Revoked::Upstream);
            }
            None => {
                error!(key = %self.key_prefix, error = why, "not mirroring with this key")
            }
        }
    }

    fn env(&self) -> Option<String> {
        self.state.lock().env.clone()
    }

    fn welcome(&self, environment: String) {
        let mut state = self.state.lock();
        match &state.env {
            Some(env) if *env == environment => {}
            Some(env) => {
                // A key belongs to one environment for its life; this cannot happen.
                let why =
                    format!("the upstream now says this key is of {environment:?}, not {env:?}");
                drop(state);
                self.refuse(&why);
            }
            None => {
                if !self.claimed.lock().insert(environment.clone()) {
                    drop(state);
                    self.refuse(&format!(
                        "environment {environment:?} is already mirrored with another key"
                    ));
                    return;
                }
                info!(env = environment, key = %self.key_prefix, "mirroring");
                state.env = Some(environment);
            }
        }
    }

    fn snapshot(&self, env: &str, snapshot: pb::Snapshot) -> Result<(), String> {
        let selector = snapshot
            .selector
            .ok_or("a snapshot without a selector")?
            .into();
        let mut items = Vec::with_capacity(snapshot.flags.len() + snapshot.segments.len());
        for flag in snapshot.flags {
            let flag = Flag::try_from(flag).map_err(|e| e.to_string())?;
            items.push(Item::flag(flag).map_err(|e| e.to_string())?);
        }
        for segment in snapshot.segments {
            items.push(Item::segment(Segment::from(segment)).map_err(|e| e.to_string())?);
        }
        let loaded = LoadedEnv {
            name: env.to_owned(),
            selector,
            items,
            changes: Vec::new(),
            state: EnvState::Ready,
            retention: Retention::default(),
        };
        match self.hub.env(env) {
            Some(hub) => hub.reset(loaded, self.hub.window()),
            None => self.hub.install(loaded, &[]),
        }
        self.state.lock().snapshot = true;
        Ok(())
    }

    fn keys(&self, env: &str, keys: pb::Keys) {
        let records: Vec<KeyRecord> = keys
            .keys
            .into_iter()
            .filter_map(|k| {
                let hash = <[u8; 32]>::try_from(k.sha256.as_slice()).ok()?;
                let kind = match pb::KeyKind::try_from(k.kind) {
                    Ok(pb::KeyKind::Server) => KeyKind::Server,
                    Ok(pb::KeyKind::Mobile) => KeyKind::Mobile,
                    // A kind from a newer upstream: not accepted here until this relay knows it.
                    _ => return None,
                };
                Some(KeyRecord {
                    id: k.id,
                    env: env.to_owned(),
                    kind,
                    prefix: String::new(),
                    hash,
                    created_at: 0,
                    revoked_at: None,
                })
            })
            .collect();
        self.hub.sync_env_keys(env, &records);
        self.state.lock().keys = true;
    }
}

impl Mirror for EnvMirror {
    fn mirrored(&self, what: Mirrored) {
        if self.refused.load(Ordering::Acquire) {
            return;
        }
        if let Mirrored::Welcome { environment } = what {
            self.welcome(environment);
            return self.applied.notify_one();
        }
        let Some(env) = self.env() else {
            return warn!(key = %self.key_prefix, "the upstream sent state before Welcome; ignored");
        };
        let applied = match what {
            Mirrored::Welcome { .. } => Ok(()),
            Mirrored::Snapshot(snapshot) => self.snapshot(&env, snapshot),
            Mirrored::Delta(delta) => match self.hub.env(&env) {
                Some(hub) => hub.mirror(delta),
                None => Err("a delta before the first snapshot".to_owned()),
            },
            Mirrored::Keys(keys) => {
                self.keys(&env, keys);
                Ok(())
            }
        };
        self.applied.notify_one();
        if let Err(e) = applied {
            // The client applied what this could not: the two copies differ from here on.
            // Served as it is (the last good state), and said loudly; a restart resyncs it.
            error!(env, error = %e, "could not mirror what the upstream sent");
        }
    }
}

/// The relay's HTTP side: health, readiness with what it waits for or serves stale, status,
/// metrics.
fn routes(state: Arc<RelayState>, limits: Arc<crate::limits::Limits>) -> Router {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HubMetrics(state.hub.clone())));
    registry.register_collector(Box::new(LimitMetrics(limits)));
    registry.register_collector(Box::new(RelayMetrics(state.clone())));
    let registry = Arc::new(registry);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route(
            "/metrics",
            get(move || crate::http::ops::metrics(registry.clone())),
        )
        .with_state(state)
        .layer(axum::middleware::map_response(
            crate::http::layers::json_errors,
        ))
}

async fn status(State(state): State<Arc<RelayState>>) -> Response {
    axum::Json(state.status()).into_response()
}

async fn readyz(State(state): State<Arc<RelayState>>) -> Response {
    let status = state.status();
    let name = |e: &RelayEnvStatus| {
        e.env
            .clone()
            .unwrap_or_else(|| format!("the environment of {}…", e.key_prefix))
    };
    if !state.check_ready() {
        let waiting: Vec<String> = status
            .environments
            .iter()
            .filter(|e| !e.serving)
            .map(|e| match (&e.refused, &e.last_error) {
                (Some(why), _) => format!("{} (refused: {why})", name(e)),
                (None, Some(error)) => format!("{} ({}: {error})", name(e), e.upstream),
                (None, None) => format!("{} ({})", name(e), e.upstream),
            })
            .collect();
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Initializing,
            format!(
                "waiting for the first snapshot from {}: {}",
                status.upstream,
                waiting.join("; ")
            ),
        )
        .into_response();
    }
    let notes: Vec<String> = status
        .environments
        .iter()
        .filter_map(|e| {
            if let Some(why) = &e.refused {
                Some(format!("{} is not served (refused: {why})", name(e)))
            } else {
                e.stale_since_ms.map(|since| {
                    let ago = unix_ms(SystemTime::now()).saturating_sub(since) / 1000;
                    format!(
                        "{} is served from its last state (version {}): upstream lost {ago} s ago ({})",
                        name(e),
                        e.version.unwrap_or(0),
                        e.last_error.as_deref().unwrap_or("unknown")
                    )
                })
            }
        })
        .collect();
    if notes.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::OK, format!("ready; {}\n", notes.join("; "))).into_response()
    }
}

/// The upstream connections, read at each scrape.
#[derive(Debug)]
struct RelayMetrics(Arc<RelayState>);

impl Collector for RelayMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let envs = self.0.status().environments;
        let now = unix_ms(SystemTime::now());
        gauge(
            &mut encoder,
            "vane_relay_upstream_connected",
            "1 while the upstream connection of an environment is up.",
            &envs,
            |e| i64::from(e.upstream == "connected"),
        )?;
        gauge(
            &mut encoder,
            "vane_relay_stale_seconds",
            "How long an environment has been served from its last state, its upstream out of \
             reach (0 while it is current).",
            &envs,
            |e| {
                let secs = e.stale_since_ms.map_or(0, |s| now.saturating_sub(s) / 1000);
                i64::try_from(secs).unwrap_or(i64::MAX)
            },
        )?;
        gauge(
            &mut encoder,
            "vane_relay_serving",
            "1 while an environment is served (arrived, and not refused by the upstream).",
            &envs,
            |e| i64::from(e.serving),
        )
    }
}

/// One gauge with a series per mirrored environment (labelled by environment and key).
fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    envs: &[RelayEnvStatus],
    value: impl Fn(&RelayEnvStatus) -> i64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for e in envs {
        let labels = [
            ("env", e.env.clone().unwrap_or_default()),
            ("key", e.key_prefix.clone()),
        ];
        ConstGauge::new(value(e)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
