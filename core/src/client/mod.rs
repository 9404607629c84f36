//! The Rust client: a tokio task drives the [`crate::sync::SyncMachine`] over QUIC or TCP+TLS,
//! and the [`Client`] handle reads flags from memory without touching the network.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vane_core::client::ClientError> {
//! use std::time::Duration;
//! use vane_core::client::{Client, ClientConfig};
//!
//! let ca = std::fs::read("vane-data/tls/ca.pem").expect("CA file");
//! let client = Client::start(ClientConfig::new("127.0.0.1:7443", "vane_srv_…", ca))?;
//! client.wait_for_initialization(Duration::from_secs(5)).await?;
//! if client.bool_value("new-checkout", false) {
//!     // …
//! }
//! let mut updates = client.subscribe();
//! while let Ok(update) = updates.recv().await {
//!     println!("{:?} changed {:?}", update.kind, update.changed);
//! }
//! # Ok(()) }
//! ```

mod connect;
mod driver;
mod poll;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vane_proto::v1::{DeliveryMode, PushMode};

use crate::eval::{Context, ErrorCode, Evaluation, Reason};
use crate::model::{FlagValue, ValueType};
use crate::protocol::{Selector, Transport};
use crate::state::FlagSet;
use crate::summary::EvaluationCounts;
pub use crate::sync::Mirrored;
use crate::sync::{Fatal, SyncConfig, SyncMachine, Update};

pub use connect::{Duplex, tls_config};

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportPreference {
    /// QUIC first, TCP+TLS raced after a head start; the winner is kept.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TCP+TLS only.
    Tcp,
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    /// Dialling or handshaking.
    Connecting,
    /// A session is live.
    Connected,
    /// Waiting to reconnect.
    Disconnected,
    /// Not connecting: the application is in the background or has no network.
    Suspended,
    /// Stopped: closed by the application, or rejected by the server (see [`Status::fatal`]).
    Stopped,
}

/// A snapshot of the client's state, as published to [`Client::status`] watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The connection state.
    pub state: ConnectionState,
    /// The transport of the live session, if any.
    pub transport: Option<Transport>,
    /// Where the flags stand.
    pub selector: Option<Selector>,
    /// Whether flags have been received at least once.
    pub initialized: bool,
    /// Why the most recent connection ended or attempt failed; kept after a reconnect, so it
    /// reads as history, not as the current state (that is `state`).
    pub last_error: Option<String>,
    /// Why the client stopped, if the server rejected it.
    pub fatal: Option<Fatal>,
    /// Whether the flags come from polling the server's HTTP listener, because no streaming
    /// transport got through (`transport` is then `None`).
    pub polling: bool,
    /// Evaluated mode: the context (as JSON text) the values held were evaluated for — after
    /// [`Client::identify`], the previous one until the server's answer arrives.
    pub values_for: Option<Arc<str>>,
}

/// Errors from the client API.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The configuration cannot work (bad endpoint, CA PEM, server name).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The server rejected the client; it will not retry.
    #[error("rejected by the server: {0}")]
    Rejected(#[from] Fatal),
    /// No flags arrived in time; the client keeps trying in the background.
    #[error("not initialized within {waited:?}{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout {
        /// How long the caller waited.
        waited: Duration,
        /// Why the last connection attempt failed, if one did.
        last_error: Option<String>,
    },
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
}

/// Everything [`Client::start`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `HOST:PORT` of the server's protocol listener (QUIC and TCP share the port).
    pub endpoint: String,
    /// PEM of the certificate(s) to trust (the server's `tls/ca.pem`), and nothing else; empty:
    /// the platform's trust store (see [`tls_config`]).
    pub ca_pem: Vec<u8>,
    /// The name to verify the server's certificate against; defaults to the endpoint's host.
    pub server_name: Option<String>,
    /// QUIC, TCP, or both raced.
    pub transport: TransportPreference,
    /// How long QUIC runs alone before TCP joins the race.
    pub quic_head_start: Duration,
    /// How long a network where TCP beat QUIC goes straight to TCP.
    pub quic_retry_after: Duration,
    /// Limit for one transport's handshake.
    pub connect_timeout: Duration,
    /// Key, SDK identity, push mode and backoff.
    pub sync: SyncConfig,
    /// Where to persist the last applied state, so a cold start has flags without a network.
    pub cache_dir: Option<std::path::PathBuf>,
    /// The server's HTTP listener (`http://HOST:PORT`, or `https://` with `--http-tls`): when
    /// neither QUIC nor TCP+TLS has got through `poll_after_failures` times in a row, the
    /// client polls `/sdk/v1/snapshot` there, once after each failed streaming attempt (so as
    /// often as the reconnect backoff, at most `backoff_max` apart), and goes back to
    /// streaming as soon as an attempt succeeds. `None`: no polling.
    pub http_endpoint: Option<String>,
    /// Failed streaming attempts in a row before polling starts.
    pub poll_after_failures: u32,
    /// A relay's sink (see [`ClientConfig::relay`]); `None` for an ordinary client.
    pub mirror: Option<Arc<dyn Mirror>>,
}

/// Where a relay's client hands what it applies (see [`ClientConfig::relay`]).
pub trait Mirror: Send + Sync + std::fmt::Debug {
    /// Called on the client's task, in the order the upstream sent them, right after the
    /// client applied each (snapshots and deltas from streaming sessions; polled snapshots are
    /// not handed on). It should return quickly: the next frame waits for it.
    fn mirrored(&self, what: Mirrored);
}

impl ClientConfig {
    /// Defaults for everything but the endpoint, key and trusted CA.
    pub fn new(
        endpoint: impl Into<String>,
        sdk_key: impl Into<String>,
        ca_pem: impl Into<Vec<u8>>,
    ) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            ca_pem: ca_pem.into(),
            server_name: None,
            transport: TransportPreference::Auto,
            quic_head_start: Duration::from_millis(250),
            quic_retry_after: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            sync: SyncConfig::new(sdk_key),
            cache_dir: None,
            http_endpoint: None,
            poll_after_failures: 3,
            mirror: None,
        }
    }

    /// A relay's client: rules mode, asking for the environment's SDK keys as well
    /// (`Hello.relay`), and handing every snapshot, delta and key set it applies to `sink`, so
    /// the relay keeps its own copy of the environment's history.
    pub fn relay(mut self, sink: Arc<dyn Mirror>) -> Self {
        self.sync.mode = DeliveryMode::Rules;
        self.sync.relay = true;
        self.mirror = Some(sink);
        self
    }

    /// Ask for Notice frames instead of pushed deltas; the client fetches after each.
    pub fn notify_mode(mut self) -> Self {
        self.sync.push = PushMode::Notify;
        self
    }

    /// Evaluated mode: the server evaluates every flag for `context` and sends only values
    /// (no rules leave the server). Required for mobile keys.
    pub fn evaluated(mut self, context: Context) -> Self {
        self.sync.mode = DeliveryMode::Evaluated;
        self.sync.context = context;
        self
    }

    /// Rules mode: the context the getters evaluate for (default: empty).
    pub fn context(mut self, context: Context) -> Self {
        self.sync.context = context;
        self
    }
}

/// Requests from the handle to the driver task.
#[derive(Debug)]
enum Command {
    Identify(Context),
    /// Connect (true) or stay disconnected (false).
    SetActive(bool),
}

/// A flag's value with the variant and reason that produced it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Details {
    /// The value served; `None` when the caller's default applies (see `error_code`).
    pub value: Option<FlagValue>,
    /// The variant's name.
    pub variant: Option<String>,
    /// Why it was served.
    pub reason: Reason,
    /// What went wrong, with reason `ERROR`.
    pub error_code: Option<ErrorCode>,
}

impl From<Evaluation<'_>> for Details {
    fn from(e: Evaluation<'_>) -> Details {
        Details {
            value: e.value.cloned(),
            variant: e.variant.map(str::to_owned),
            reason: e.reason,
            error_code: e.error,
        }
    }
}

/// State shared between the handle and the driver task.
#[derive(Debug)]
struct Shared {
    flags: RwLock<Arc<FlagSet>>,
    /// The context getters evaluate for in rules mode.
    context: RwLock<Arc<Context>>,
    status: watch::Sender<Status>,
    updates: broadcast::Sender<Update>,
    /// What the getters evaluated, for the summaries the server asks for.
    counts: EvaluationCounts,
    /// A relay's sink.
    mirror: Option<Arc<dyn Mirror>>,
}

#[derive(Debug, Clone, Copy)]
struct Lifecycle {
    network: bool,
    foreground: bool,
}

/// A connected client. Cheap reads; the connection lives in a background task that stops when
/// the client is closed or dropped.
#[derive(Debug)]
pub struct Client {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    commands: mpsc::UnboundedSender<Command>,
    /// Lifecycle inputs; the client connects only while both hold.
    lifecycle: Mutex<Lifecycle>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Evaluated mode (the server evaluates) rather than rules mode.
    evaluated: bool,
}

impl Client {
    /// Validates `config` and starts connecting in the background. Must be called inside a tokio
    /// runtime.
    pub fn start(config: ClientConfig) -> Result<Client, ClientError> {
        Client::start_with_updates(config).map(|(client, _)| client)
    }

    /// Like [`Client::start`], with a receiver subscribed before the connection starts, so it
    /// holds every update from the first one (the initial snapshot) on.
    pub fn start_with_updates(
        config: ClientConfig,
    ) -> Result<(Client, broadcast::Receiver<Update>), ClientError> {
        let connector = connect::Connector::new(&config)?;
        let poller = match &config.http_endpoint {
            None => None,
            Some(base) => {
                let mut poller = connector
                    .poller(base, &config.sync.sdk_key)
                    .map_err(ClientError::Config)?;
                if config.sync.mode == DeliveryMode::Evaluated {
                    poller.evaluated(&config.sync.context);
                }
                Some((
                    poller,
                    config.poll_after_failures.max(1),
                    config.connect_timeout,
                ))
            }
        };
        let context = Arc::new(config.sync.context.clone());
        let evaluated = config.sync.mode == DeliveryMode::Evaluated;
        let cache = config
            .cache_dir
            .as_ref()
            .map(|dir| crate::cache::Cache::new(dir, &config.sync.sdk_key, evaluated));
        let context_key = evaluated
            .then(|| context.key().map(str::to_owned))
            .flatten();
        let (flags, flags_context) = cache
            .as_ref()
            .and_then(|c| c.load(context_key.as_deref()))
            .unwrap_or_default();
        let machine = SyncMachine::new(config.sync, flags, flags_context, rand::random());
        let (status, _) = watch::channel(Status {
            state: ConnectionState::Connecting,
            transport: None,
            selector: None,
            initialized: false,
            last_error: None,
            fatal: None,
            polling: false,
            values_for: machine.values_context().map(Into::into),
        });
        let (updates, first_updates) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            flags: RwLock::new(machine.flags().clone()),
            context: RwLock::new(context),
            status,
            updates,
            counts: EvaluationCounts::default(),
            mirror: config.mirror.clone(),
        });
        let cancel = CancellationToken::new();
        let (commands, command_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(driver::run(
            machine,
            connector,
            poller,
            shared.clone(),
            command_rx,
            cache,
            cancel.clone(),
        ));
        let client = Client {
            shared,
            cancel,
            commands,
            lifecycle: Mutex::new(Lifecycle {
                network: true,
                foreground: true,
            }),
            task: Mutex::new(Some(task)),
            evaluated,
        };
        Ok((client, first_updates))
    }

    /// Waits until flags have arrived, the server rejected the client, or `timeout` passed.
    pub async fn wait_for_initialization(&self, timeout: Duration) -> Result<(), ClientError> {
        match self.wait_status(timeout, &|s| s.initialized).await? {
            Some(s) if s.initialized => Ok(()),
            Some(s) => Err(s.fatal.map_or(ClientError::Closed, ClientError::Rejected)),
            None => Err(ClientError::Timeout {
                waited: timeout,
                last_error: self.status().last_error,
            }),
        }
    }

    /// Waits up to `timeout` for a status that `done` accepts, or the client stopping (the
    /// server rejected it); that status, or `None` if the time ran out. One function for every
    /// wait (a `dyn` predicate, so one copy of the waiting code in the mobile library).
    async fn wait_status(
        &self,
        timeout: Duration,
        done: &(dyn Fn(&Status) -> bool + Send + Sync),
    ) -> Result<Option<Status>, ClientError> {
        let mut rx = self.shared.status.subscribe();
        let done = |s: &Status| done(s) || s.state == ConnectionState::Stopped;
        match tokio::time::timeout(timeout, rx.wait_for(done)).await {
            Ok(Ok(s)) => Ok(Some(s.clone())),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Ok(None),
        }
    }

    /// The flags held now.
    pub fn flags(&self) -> Arc<FlagSet> {
        self.shared.flags.read().clone()
    }

    /// Evaluates `key` for the client's context, with the variant and reason.
    pub fn details(&self, key: &str) -> Details {
        let context = self.shared.context.read().clone();
        self.details_for(key, &context)
    }

    /// Rules mode: evaluates `key` for `context` (a backend service evaluates per request).
    /// In evaluated mode the server's answer for the session's context is returned.
    pub fn details_for(&self, key: &str, context: &Context) -> Details {
        let flags = self.shared.flags.read();
        let e = flags.evaluate(key, context);
        self.shared.counts.count(key, &e);
        e.into()
    }

    /// Like [`Client::details`], but not counted in the evaluation summaries: for SDK layers
    /// that mirror the values (a snapshot the mobile getters read) rather than evaluate for the
    /// application.
    pub fn peek(&self, key: &str) -> Details {
        let context = self.shared.context.read().clone();
        self.shared.flags.read().evaluate(key, &context).into()
    }

    /// The context: the one the getters evaluate for (rules mode), or the one last identified
    /// with (evaluated mode).
    pub fn context(&self) -> Arc<Context> {
        self.shared.context.read().clone()
    }

    /// Switches the client to another context. Rules mode: getters evaluate for it from now on.
    /// Evaluated mode: the server is told and sends the values that differ; until they arrive
    /// the getters serve the previous context's values ([`Client::identify_and_wait`] waits).
    pub fn identify(&self, context: Context) {
        *self.shared.context.write() = Arc::new(context.clone());
        let _ = self.commands.send(Command::Identify(context));
    }

    /// [`Client::identify`], then waits up to `timeout` until the getters answer for the new
    /// context: `Ok(true)` once they do (rules mode: at once), `Ok(false)` if the server's
    /// answer did not arrive in time (offline: it is sent when a connection is made, and the
    /// previous context's values are served until then). Errors only if the client stopped
    /// (the server rejected it) or closed.
    pub async fn identify_and_wait(
        &self,
        context: Context,
        timeout: Duration,
    ) -> Result<bool, ClientError> {
        let want: Arc<str> = context.to_json().to_string().into();
        self.identify(context);
        if !self.evaluated {
            return Ok(true);
        }
        let answered = |s: &Status| s.values_for.as_deref() == Some(&*want);
        match self.wait_status(timeout, &answered).await? {
            Some(s) if s.state == ConnectionState::Stopped && !answered(&s) => {
                Err(s.fatal.map_or(ClientError::Closed, ClientError::Rejected))
            }
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    /// Tells the client whether the device has a network. Without one the client stops trying
    /// to connect (saving battery); when it returns, it reconnects at once and resumes by delta.
    pub fn set_network_available(&self, available: bool) {
        self.set_lifecycle(|l| l.network = available);
    }

    /// Tells the client whether the app is in the foreground. In the background the connection
    /// is closed; back in the foreground it reconnects at once and resumes by delta.
    pub fn set_foreground(&self, foreground: bool) {
        self.set_lifecycle(|l| l.foreground = foreground);
    }

    fn set_lifecycle(&self, change: impl FnOnce(&mut Lifecycle)) {
        let mut lifecycle = self.lifecycle.lock();
        change(&mut lifecycle);
        let _ = self.commands.send(Command::SetActive(
            lifecycle.network && lifecycle.foreground,
        ));
    }

    fn typed<T>(
        &self,
        key: &str,
        want: ValueType,
        pick: impl FnOnce(&FlagValue) -> Option<T>,
    ) -> Option<T> {
        let context = self.shared.context.read().clone();
        let flags = self.shared.flags.read();
        let e = flags.evaluate(key, &context).typed(want);
        self.shared.counts.count(key, &e);
        pick(e.value?)
    }

    /// The boolean value of `key`, or `default` if it is missing or not a boolean.
    pub fn bool_value(&self, key: &str, default: bool) -> bool {
        self.typed(key, ValueType::Bool, |v| match v {
            FlagValue::Bool(b) => Some(*b),
            _ => None,
        })
        .unwrap_or(default)
    }

    /// The string value of `key`, or `default`.
    pub fn string_value(&self, key: &str, default: &str) -> String {
        self.typed(key, ValueType::String, |v| match v {
            FlagValue::String(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| default.to_owned())
    }

    /// The numeric value of `key`, or `default`.
    pub fn number_value(&self, key: &str, default: f64) -> f64 {
        self.typed(key, ValueType::Number, |v| match v {
            FlagValue::Number(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(default)
    }

    /// The JSON value of `key`, or `default`.
    pub fn json_value(&self, key: &str, default: serde_json::Value) -> serde_json::Value {
        self.typed(key, ValueType::Json, |v| match v {
            FlagValue::Json(j) => Some(j.clone()),
            _ => None,
        })
        .unwrap_or(default)
    }

    /// Updates applied from now on (see [`Client::start_with_updates`] for every update since
    /// the start). A receiver that falls more than 256 updates behind gets `Lagged` and should
    /// re-read [`Client::flags`].
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.shared.updates.subscribe()
    }

    /// The current connection state, transport and selector.
    pub fn status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// A watcher of [`Client::status`].
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Closes the connection and stops the background task.
    pub async fn close(&self) {
        self.cancel.cancel();
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
