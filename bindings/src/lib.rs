//! `vane-ffi`: the UniFFI layer that gives Kotlin and Swift the same client core as Rust services.
//!
//! Thin on purpose: each exported object wraps an `Arc` of a `vane-core` type and delegates in a
//! line; a flag's value crosses as one `FlagDetails` record with a `VaneValue` enum, and each
//! change once, as a `FlagUpdate` carrying the changed values, from which the Kotlin and Swift
//! layers keep the snapshot their typed getters read (a crossing costs microseconds of JNA, a
//! snapshot read nanoseconds); records mirror core types through `From`; errors cross as one small enum converted in
//! one place ([`VaneError`]); listeners are foreign traits, and registering one hands back a
//! handle that unregisters on `cancel()` (not when dropped: an app that drops it keeps its
//! listener, until the client shuts down). Behaviour is tested in Rust, in
//! `vane-core` and the end-to-end tests; the Kotlin and Swift tests check that calls, errors and
//! callbacks cross the boundary intact.
//!
//! # Threading
//!
//! - The SDK runs its connection on one background thread of its own (`vane-sdk`), shared by
//!   every client in the process; the app needs no async runtime.
//! - Reads (`details`, `allDetails`, `allFlags`, `status`) never block on the network: they read
//!   memory under a short lock. Call them from any thread, the UI thread included.
//! - `initialize`, `waitForInitialization` and `shutdown` block the calling thread (up to the
//!   timeout, or until the connection is shut): the Kotlin and Swift layers call them off it.
//! - Listener callbacks arrive on the `vane-sdk` thread, one at a time; the Kotlin and Swift
//!   layers patch their snapshot there and hand the app's callbacks to the app's executor or
//!   queue, so a slow app callback delays nothing of the SDK's.

#[cfg(target_os = "android")]
mod android;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::runtime::Runtime;
use tokio::sync::broadcast::error::RecvError;
use vane_core::client::{self, Client, ClientConfig, ClientError, Details};
use vane_core::eval::{self, Context};
use vane_core::model::FlagValue;
use vane_core::protocol;
use vane_core::sync::Fatal;

uniffi::setup_scaffolding!();

/// Errors that cross to Kotlin (`VaneException`) and Swift (`VaneError`).
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum VaneError {
    /// The server could not be reached, or not in time.
    #[error("network: {reason}")]
    Network {
        /// What happened.
        reason: String,
    },
    /// The server rejected the key (unknown, revoked, or not allowed this mode).
    #[error("auth: {reason}")]
    Auth {
        /// What the server said.
        reason: String,
    },
    /// The server and SDK disagree about the protocol, or the context was refused.
    #[error("protocol: {reason}")]
    Protocol {
        /// What happened.
        reason: String,
    },
    /// The configuration cannot work (endpoint, CA, context JSON).
    #[error("config: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// The client was closed: every call after `close()` says so.
    #[error("closed: {reason}")]
    Closed {
        /// What was called.
        reason: String,
    },
    /// Anything else.
    #[error("{reason}")]
    Other {
        /// What happened.
        reason: String,
    },
}

impl From<ClientError> for VaneError {
    fn from(e: ClientError) -> Self {
        let reason = e.to_string();
        match e {
            ClientError::Config(_) => VaneError::Config { reason },
            ClientError::Rejected(Fatal::Unauthenticated(_) | Fatal::PermissionDenied(_)) => {
                VaneError::Auth { reason }
            }
            ClientError::Rejected(_) => VaneError::Protocol { reason },
            ClientError::Timeout { .. } => VaneError::Network { reason },
            ClientError::Closed => VaneError::Closed { reason },
            _ => VaneError::Other { reason },
        }
    }
}

fn config_error(reason: impl ToString) -> VaneError {
    VaneError::Config {
        reason: reason.to_string(),
    }
}

/// The one runtime every client of the process runs on: a single background thread.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("vane-sdk")
            .enable_all()
            .build()
            .expect("the SDK's runtime thread can start")
    })
}

/// Which transport to use.
#[derive(Debug, Clone, Copy, uniffi::Enum)]
pub enum TransportPreference {
    /// QUIC first, TCP+TLS raced after a short head start (the default).
    Auto,
    /// QUIC only.
    Quic,
    /// TCP+TLS only.
    Tcp,
}

/// The transport of the live connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// TLS over TCP.
    Tcp,
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ConnectionState {
    /// Dialling or handshaking.
    Connecting,
    /// Live.
    Connected,
    /// Waiting to reconnect.
    Disconnected,
    /// In the background or without network: not connecting.
    Suspended,
    /// Closed, or rejected by the server.
    Stopped,
}

/// Why a value was served (OpenFeature's reasons, plus `Cached`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Reason {
    /// On, no rules.
    Static,
    /// A rule matched.
    TargetingMatch,
    /// A percentage rollout chose.
    Split,
    /// No rule matched: the fallthrough.
    Default,
    /// The flag is off.
    Disabled,
    /// Evaluation failed; the caller's default was returned (see `errorCode`).
    Error,
    /// From the offline cache; no live connection has confirmed it yet.
    Cached,
}

impl From<eval::Reason> for Reason {
    fn from(r: eval::Reason) -> Self {
        match r {
            eval::Reason::Static => Reason::Static,
            eval::Reason::TargetingMatch => Reason::TargetingMatch,
            eval::Reason::Split => Reason::Split,
            eval::Reason::Default => Reason::Default,
            eval::Reason::Disabled => Reason::Disabled,
            eval::Reason::Cached => Reason::Cached,
            _ => Reason::Error,
        }
    }
}

impl From<client::ConnectionState> for ConnectionState {
    fn from(s: client::ConnectionState) -> Self {
        match s {
            client::ConnectionState::Connecting => ConnectionState::Connecting,
            client::ConnectionState::Connected => ConnectionState::Connected,
            client::ConnectionState::Disconnected => ConnectionState::Disconnected,
            client::ConnectionState::Suspended => ConnectionState::Suspended,
            client::ConnectionState::Stopped => ConnectionState::Stopped,
        }
    }
}

impl From<protocol::Transport> for Transport {
    fn from(t: protocol::Transport) -> Self {
        match t {
            protocol::Transport::Quic => Transport::Quic,
            protocol::Transport::Tcp => Transport::Tcp,
        }
    }
}

/// How initialization ended: none of these is an error; an app offline at start is served from
/// its cache, or its defaults, and goes live when the network returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum InitStatus {
    /// Live values arrived from the server.
    Ready,
    /// No live connection in time, but the offline cache's values are being served.
    ServingCache,
    /// Neither in time: the getters answer the caller's defaults until values arrive.
    TimedOut,
}

/// The prefix of server SDK keys, which carry every flag's rules.
const SERVER_KEY_PREFIX: &str = "vane_srv_";

/// How to build a client.
#[derive(Debug, Clone, uniffi::Record)]
pub struct VaneConfig {
    /// `host:port` of the server's protocol port.
    pub endpoint: String,
    /// A mobile (or server) SDK key.
    pub sdk_key: String,
    /// PEM of a private CA to trust instead of the platform's trust store (such as the
    /// server's own `tls/ca.pem`); `null` verifies the server against the platform's roots.
    #[uniffi(default = None)]
    pub ca_pem: Option<String>,
    /// The evaluation context, a JSON object: `{"key": "user-1", "country": "de"}`.
    pub context_json: String,
    /// A directory for the offline cache; `null` for none.
    #[uniffi(default = None)]
    pub cache_dir: Option<String>,
    /// `null` means `Auto`.
    #[uniffi(default = None)]
    pub transport: Option<TransportPreference>,
    /// The name to verify the certificate against; default: the endpoint's host.
    #[uniffi(default = None)]
    pub server_name: Option<String>,
    /// The server's HTTP listener (`https://host:port`, or `http://`): where neither QUIC nor
    /// TCP+TLS gets through (networks that pass only HTTP(S)), the SDK polls the snapshot there
    /// and streams again as soon as it can. `null`: no polling.
    #[uniffi(default = None)]
    pub http_endpoint: Option<String>,
}

/// A flag's value, typed.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum VaneValue {
    /// A boolean.
    Bool {
        /// The value.
        value: bool,
    },
    /// A number (a double; integral ones read as `Int` too).
    Number {
        /// The value.
        value: f64,
    },
    /// A string.
    Text {
        /// The value.
        value: String,
    },
    /// A JSON document (a flag of type `json`).
    Json {
        /// The document, typed.
        value: JsonValue,
    },
}

/// A JSON value, typed: what a `json` flag serves, read without a JSON parser on the app's side.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum JsonValue {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool {
        /// The value.
        value: bool,
    },
    /// A number, as a double.
    Number {
        /// The value.
        value: f64,
    },
    /// A string.
    Text {
        /// The value.
        value: String,
    },
    /// An array.
    Array {
        /// The elements, in order.
        items: Vec<JsonValue>,
    },
    /// An object.
    Object {
        /// The members.
        entries: HashMap<String, JsonValue>,
    },
}

impl From<&serde_json::Value> for JsonValue {
    fn from(v: &serde_json::Value) -> Self {
        use serde_json::Value as V;
        match v {
            V::Null => JsonValue::Null,
            V::Bool(value) => JsonValue::Bool { value: *value },
            // Every JSON number fits a double, though integers above 2^53 lose precision (as
            // they do in JavaScript).
            V::Number(n) => JsonValue::Number {
                value: n.as_f64().unwrap_or(f64::NAN),
            },
            V::String(s) => JsonValue::Text { value: s.clone() },
            V::Array(items) => JsonValue::Array {
                items: items.iter().map(Into::into).collect(),
            },
            V::Object(map) => JsonValue::Object {
                entries: map.iter().map(|(k, v)| (k.clone(), v.into())).collect(),
            },
        }
    }
}

/// A flag's current value with how it was decided: what the SDK layers keep in their snapshot
/// and answer their typed getters from, without crossing the FFI.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct FlagDetails {
    /// The flag key.
    pub key: String,
    /// The value; `null` when evaluation failed (the caller's default applies; see `error_code`).
    pub value: Option<VaneValue>,
    /// The variant served.
    pub variant: Option<String>,
    /// Why.
    pub reason: Reason,
    /// OpenFeature error code when `reason` is `ERROR`.
    pub error_code: Option<String>,
}

impl FlagDetails {
    fn new(key: &str, d: Details) -> FlagDetails {
        FlagDetails {
            key: key.to_owned(),
            value: d.value.map(|v| match v {
                FlagValue::Bool(value) => VaneValue::Bool { value },
                FlagValue::Number(value) => VaneValue::Number { value },
                FlagValue::String(value) => VaneValue::Text { value },
                FlagValue::Json(j) => VaneValue::Json { value: (&j).into() },
            }),
            variant: d.variant,
            reason: d.reason.into(),
            error_code: d.error_code.map(|c| c.as_str().to_owned()),
        }
    }
}

/// What one change did to the values: handed across the FFI once, so a snapshot kept from it is
/// current without reading anything back.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct FlagUpdate {
    /// The flags whose value, variant or reason changed (or appeared), with their new details.
    pub changed: Vec<FlagDetails>,
    /// The flags that no longer exist.
    pub removed: Vec<String>,
    /// `changed` is every flag: replace the whole snapshot (after the listener fell behind).
    pub complete: bool,
}

/// What the client is doing, in a word: what a status line in an app shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum StatusCause {
    /// Dialling the server for the first time.
    Connecting,
    /// Live (see `transport`), or polling over HTTP where streaming does not get through.
    Connected,
    /// The server cannot be reached just now (`last_error` says why: refused, timed out, TLS);
    /// the client keeps trying, and serves what it has.
    Offline,
    /// The app suspended it (background, or no network).
    Suspended,
    /// The server refused the key (unknown, revoked, or a server key): it will not retry.
    /// Values already held go on being served.
    Unauthorized,
    /// Stopped: closed by the app, or the server refused the protocol or the context.
    Stopped,
}

/// Where the client stands, and why.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct VaneStatus {
    /// The connection state.
    pub state: ConnectionState,
    /// Why, in a word.
    pub cause: StatusCause,
    /// The transport of the live session, if any.
    pub transport: Option<Transport>,
    /// Whether values arrived from the server at least once.
    pub initialized: bool,
    /// Whether the values served now are the offline cache's, not yet confirmed live.
    pub serving_cache: bool,
    /// Whether the values come from polling the HTTP listener.
    pub polling: bool,
    /// The last error: why the last connection ended or attempt failed, or why the server
    /// refused the client.
    pub last_error: Option<String>,
}

fn vane_status(s: &client::Status, serving_cache: bool) -> VaneStatus {
    let cause = match s.state {
        client::ConnectionState::Connected => StatusCause::Connected,
        client::ConnectionState::Suspended => StatusCause::Suspended,
        client::ConnectionState::Stopped => match &s.fatal {
            Some(Fatal::Unauthenticated(_) | Fatal::PermissionDenied(_)) => {
                StatusCause::Unauthorized
            }
            _ => StatusCause::Stopped,
        },
        _ if s.polling => StatusCause::Connected,
        client::ConnectionState::Connecting if s.last_error.is_none() => StatusCause::Connecting,
        _ => StatusCause::Offline,
    };
    VaneStatus {
        state: s.state.into(),
        cause,
        transport: s.transport.map(Into::into),
        initialized: s.initialized,
        serving_cache,
        polling: s.polling,
        last_error: s.last_error.clone(),
    }
}

/// Receives the client's status, at once and on every change.
#[uniffi::export(foreign)]
pub trait StatusListener: Send + Sync {
    /// Called on the SDK's thread with the new status.
    fn on_status(&self, status: VaneStatus);
}

/// Receives what each change did to the values.
#[uniffi::export(foreign)]
pub trait FlagListener: Send + Sync {
    /// Called on the SDK's thread after the flags changed, with the new values.
    fn on_flags_changed(&self, update: FlagUpdate);
}

/// A registered listener. It stays registered until `cancel()` or the client's `shutdown()`:
/// releasing the handle (a garbage collection of the Kotlin object, the last Swift reference
/// going away) does not unregister it, so an app that drops the handle keeps its listener.
#[derive(Debug, uniffi::Object)]
pub struct ListenerHandle {
    task: tokio::task::AbortHandle,
}

#[uniffi::export]
impl ListenerHandle {
    /// Stops the callbacks. Idempotent.
    pub fn cancel(&self) {
        self.task.abort();
    }
}

/// A client: a live connection to Vane for one context.
#[derive(Debug, uniffi::Object)]
pub struct VaneClient {
    inner: Arc<Client>,
    /// The listener tasks, stopped by `shutdown()`. They hold the client weakly, so one that is
    /// dropped without `shutdown()` still goes away.
    listeners: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Where the anonymous key is kept, for `identify` with a context without a key.
    cache_dir: Option<String>,
}

#[uniffi::export]
impl VaneClient {
    /// Starts connecting in the background. With a cache directory, the last known values are
    /// available at once, with reason `CACHED`.
    #[uniffi::constructor]
    pub fn new(config: VaneConfig) -> Result<Arc<Self>, VaneError> {
        if config.sdk_key.starts_with(SERVER_KEY_PREFIX) {
            return Err(config_error(
                "this is a server SDK key: it can download every flag's rules, and an app can be \
                 taken apart. Mobile SDKs take a mobile key, which gets evaluated values only: \
                 `vane key create ENV --kind mobile`",
            ));
        }
        if config
            .ca_pem
            .as_deref()
            .is_some_and(|pem| pem.trim().is_empty())
        {
            return Err(config_error(
                "the CA PEM is empty: pass the PEM of the CA to trust, or none for the \
                 platform's trust store",
            ));
        }
        let context = Context::parse(&config.context_json).map_err(config_error)?;
        let context = with_key(context, config.cache_dir.as_deref());
        let ca_pem = config.ca_pem.unwrap_or_default().into_bytes();
        let mut core =
            ClientConfig::new(config.endpoint, config.sdk_key, ca_pem).evaluated(context);
        core.cache_dir = config.cache_dir.map(Into::into);
        core.server_name = config.server_name;
        core.http_endpoint = config.http_endpoint;
        core.transport = match config.transport.unwrap_or(TransportPreference::Auto) {
            TransportPreference::Auto => client::TransportPreference::Auto,
            TransportPreference::Quic => client::TransportPreference::Quic,
            TransportPreference::Tcp => client::TransportPreference::Tcp,
        };
        core.sync.sdk_name = "vane-mobile".into();
        let _entered = runtime().enter();
        Ok(Arc::new(VaneClient {
            cache_dir: core.cache_dir.as_ref().map(|d| d.display().to_string()),
            inner: Arc::new(Client::start(core)?),
            listeners: Mutex::new(Vec::new()),
        }))
    }

    /// Waits up to `timeout_ms` for live values and says how it went; being offline is not an
    /// error (see [`InitStatus`]). Errors only when the server rejected the client (a wrong or
    /// revoked key, a refused context) or the client is closed. Blocks: not on the UI thread.
    pub fn initialize(&self, timeout_ms: u64) -> Result<InitStatus, VaneError> {
        let inner = self.inner.clone();
        let waited = runtime().block_on(async move {
            inner
                .wait_for_initialization(Duration::from_millis(timeout_ms))
                .await
        });
        match waited {
            Ok(()) => Ok(InitStatus::Ready),
            Err(ClientError::Timeout { .. }) => Ok(if serving_cache(&self.inner) {
                InitStatus::ServingCache
            } else {
                InitStatus::TimedOut
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether live values have arrived since the client started.
    pub fn is_initialized(&self) -> bool {
        self.inner.status().initialized
    }

    /// Blocks until live flags arrived (or the server rejected the client, or the timeout
    /// passed). Not on the UI thread.
    pub fn wait_for_initialization(&self, timeout_ms: u64) -> Result<(), VaneError> {
        let inner = self.inner.clone();
        Ok(runtime().block_on(async move {
            inner
                .wait_for_initialization(Duration::from_millis(timeout_ms))
                .await
        })?)
    }

    /// One flag's details, read across the FFI (the SDK layers answer getters from their
    /// snapshot instead; this is for measurements and for callers without one).
    pub fn details(&self, key: String) -> FlagDetails {
        FlagDetails::new(&key, self.inner.details(&key))
    }

    /// Every flag's details: one crossing for a whole snapshot.
    pub fn all_details(&self) -> Vec<FlagDetails> {
        let flags = self.inner.flags();
        flags
            .keys()
            .into_iter()
            .map(|k| FlagDetails::new(k, self.inner.peek(k)))
            .collect()
    }

    /// Every flag with a value: key → the value as JSON text (`true`, `"text"`, `3`, `{…}`).
    pub fn all_flags(&self) -> HashMap<String, String> {
        let flags = self.inner.flags();
        flags
            .keys()
            .into_iter()
            .filter_map(|k| {
                Some((
                    k.to_owned(),
                    serde_json::to_string(self.inner.peek(k).value.as_ref()?).ok()?,
                ))
            })
            .collect()
    }

    /// Switches to another user or context; the values that differ arrive shortly (listeners
    /// are told).
    pub fn identify(&self, context_json: String) -> Result<(), VaneError> {
        let context = Context::parse(&context_json).map_err(config_error)?;
        self.inner
            .identify(with_key(context, self.cache_dir.as_deref()));
        Ok(())
    }

    /// Switches context and waits up to `timeout_ms` for its values: `true` once the getters
    /// answer for it, `false` if they did not arrive in time (offline: the previous context's
    /// values are served until a connection brings them). Errors for a bad context, a rejected
    /// client or a closed one. Blocks: not on the UI thread.
    pub fn identify_and_wait(
        &self,
        context_json: String,
        timeout_ms: u64,
    ) -> Result<bool, VaneError> {
        let context = Context::parse(&context_json).map_err(config_error)?;
        let context = with_key(context, self.cache_dir.as_deref());
        let inner = self.inner.clone();
        Ok(runtime().block_on(async move {
            inner
                .identify_and_wait(context, Duration::from_millis(timeout_ms))
                .await
        })?)
    }

    /// The targeting key in use: the context's own, or this device's anonymous key.
    pub fn context_key(&self) -> Option<String> {
        self.inner.context().key().map(str::to_owned)
    }

    /// Registers a listener for the changes from now on; `cancel()` the handle to unregister.
    pub fn add_listener(&self, listener: Arc<dyn FlagListener>) -> Arc<ListenerHandle> {
        let client = Arc::downgrade(&self.inner);
        let mut updates = self.inner.subscribe();
        let task = runtime().spawn(async move {
            loop {
                let update = match updates.recv().await {
                    Ok(update) if update.changed.is_empty() => continue,
                    Ok(update) => {
                        let Some(client) = client.upgrade() else {
                            break;
                        };
                        let flags = client.flags();
                        let (mut changed, mut removed) = (Vec::new(), Vec::new());
                        for key in update.changed {
                            if flags.contains(&key) {
                                changed.push(FlagDetails::new(&key, client.peek(&key)));
                            } else {
                                removed.push(key);
                            }
                        }
                        FlagUpdate {
                            changed,
                            removed,
                            complete: false,
                        }
                    }
                    // Fell behind: the whole set, to replace what the listener holds.
                    Err(RecvError::Lagged(_)) => {
                        let Some(client) = client.upgrade() else {
                            break;
                        };
                        let flags = client.flags();
                        let changed = flags
                            .keys()
                            .into_iter()
                            .map(|k| FlagDetails::new(k, client.peek(k)))
                            .collect();
                        FlagUpdate {
                            changed,
                            removed: Vec::new(),
                            complete: true,
                        }
                    }
                    Err(RecvError::Closed) => break,
                };
                listener.on_flags_changed(update);
            }
        });
        self.track(task)
    }

    /// Where the connection stands.
    pub fn connection_state(&self) -> ConnectionState {
        self.inner.status().state.into()
    }

    /// The live connection's transport, if any.
    pub fn transport(&self) -> Option<Transport> {
        self.inner.status().transport.map(Into::into)
    }

    /// Where the client stands, and why.
    pub fn status(&self) -> VaneStatus {
        vane_status(&self.inner.status(), serving_cache(&self.inner))
    }

    /// Calls `listener` with the status now, then on every change, until the handle is
    /// cancelled or the client shuts down.
    pub fn add_status_listener(&self, listener: Arc<dyn StatusListener>) -> Arc<ListenerHandle> {
        let client = Arc::downgrade(&self.inner);
        let mut status = self.inner.watch_status();
        let task = runtime().spawn(async move {
            let mut last = None;
            loop {
                let now = {
                    let Some(client) = client.upgrade() else {
                        break;
                    };
                    vane_status(&status.borrow_and_update(), serving_cache(&client))
                };
                if last.as_ref() != Some(&now) {
                    listener.on_status(now.clone());
                    last = Some(now);
                }
                if status.changed().await.is_err() {
                    break;
                }
            }
        });
        self.track(task)
    }

    /// Tell the SDK whether the device has a network (stops reconnect attempts while it has none).
    pub fn set_network_available(&self, available: bool) {
        self.inner.set_network_available(available);
    }

    /// Tell the SDK whether the app is in the foreground (background closes the connection).
    pub fn set_foreground(&self, foreground: bool) {
        self.inner.set_foreground(foreground);
    }

    /// Closes the connection; listeners stop. Blocks briefly. Not on the UI thread. (Named so
    /// as not to clash with the `close()` that releases every UniFFI object in Kotlin.)
    pub fn shutdown(&self) {
        for task in self.listeners.lock().drain(..) {
            task.abort();
        }
        let inner = self.inner.clone();
        runtime().block_on(async move { inner.close().await });
    }
}

impl VaneClient {
    /// Keeps a listener task, to stop it at `shutdown()`, and hands back its handle.
    fn track(&self, task: tokio::task::JoinHandle<()>) -> Arc<ListenerHandle> {
        let task = task.abort_handle();
        let mut listeners = self.listeners.lock();
        listeners.retain(|t| !t.is_finished());
        listeners.push(task.clone());
        Arc::new(ListenerHandle { task })
    }
}

/// Whether the values `client` serves are the offline cache's.
fn serving_cache(client: &Client) -> bool {
    let flags = client.flags();
    flags.selector().is_some() && flags.is_cached()
}

/// How much the SDK logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, uniffi::Enum)]
pub enum LogLevel {
    /// Something failed or was ignored (a corrupt cache, a server refusal).
    Warn,
    /// What the SDK does (connections, sessions).
    Info,
    /// Details, for looking into a problem.
    Debug,
}

impl LogLevel {
    fn admits(self, level: &tracing::Level) -> bool {
        let wanted = match self {
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Debug => tracing::Level::DEBUG,
        };
        *level <= wanted
    }
}

/// Receives the SDK's log lines, for the app to route to Logcat, OSLog or its own logger.
#[uniffi::export(foreign)]
pub trait LogSink: Send + Sync {
    /// One log line: its level (errors come as `Warn`), where it came from (a Rust module path,
    /// e.g. `vane_core::cache`) and the message with its fields (`ignoring corrupt flag cache
    /// path=… error=…`). Called on the thread that logged: return quickly.
    fn log(&self, level: LogLevel, target: String, message: String);
}

/// The sink the SDK's logs go to, once one is set.
static LOG_SINK: parking_lot::RwLock<Option<(Arc<dyn LogSink>, LogLevel)>> =
    parking_lot::RwLock::new(None);

/// Sends the SDK's logs at `level` and above to `sink` (replacing any earlier sink). Returns
/// false if the process already had another `tracing` subscriber, which then gets them instead.
/// Release builds for apps (`--features mobile`) contain warnings and errors only.
#[uniffi::export]
pub fn set_log_sink(sink: Arc<dyn LogSink>, level: LogLevel) -> bool {
    *LOG_SINK.write() = Some((sink, level));
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    let installed =
        *INSTALLED.get_or_init(|| tracing::subscriber::set_global_default(Forward).is_ok());
    tracing::callsite::rebuild_interest_cache();
    installed
}

/// A `tracing` subscriber that hands events to the [`LogSink`]; spans are not kept.
struct Forward;

impl tracing::Subscriber for Forward {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        LOG_SINK
            .read()
            .as_ref()
            .is_some_and(|(_, level)| metadata.is_event() && level.admits(metadata.level()))
    }

    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        // The sink and its level change at run time: ask `enabled` every time.
        tracing::subscriber::Interest::sometimes()
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let Some((sink, _)) = LOG_SINK.read().clone() else {
            return;
        };
        let mut line = Line::default();
        event.record(&mut line);
        let metadata = event.metadata();
        let level = match *metadata.level() {
            tracing::Level::ERROR | tracing::Level::WARN => LogLevel::Warn,
            tracing::Level::INFO => LogLevel::Info,
            _ => LogLevel::Debug,
        };
        sink.log(level, metadata.target().to_owned(), line.0);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// An event's message, then its other fields as `name=value`.
#[derive(Default)]
struct Line(String);

impl tracing::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if field.name() == "message" {
            let fields = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value:?}{fields}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = format!("{value}{}", self.0);
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

/// The file in the cache directory that keeps an anonymous user's key across starts.
const ANONYMOUS_KEY_FILE: &str = "vane-anonymous-key";

/// `context` with a targeting key: its own, or this device's anonymous one (kept in the cache
/// directory, so an anonymous user keeps one rollout bucket and one cache file across starts),
/// marked `"anonymous": true`.
fn with_key(context: Context, cache_dir: Option<&str>) -> Context {
    if context.key().is_some() {
        return context;
    }
    let key = anonymous_key(cache_dir);
    let mut json = context.to_json();
    if let Some(map) = json.as_object_mut() {
        map.insert("key".into(), serde_json::Value::String(key.clone()));
        map.insert("anonymous".into(), serde_json::Value::Bool(true));
    }
    Context::new(json).unwrap_or_else(|_| Context::with_key(key))
}

/// This device's anonymous key: read from the cache directory, or made and written there.
fn anonymous_key(cache_dir: Option<&str>) -> String {
    let fresh = || format!("anon-{:032x}", rand::random::<u128>());
    let Some(dir) = cache_dir else {
        tracing::warn!(
            "a context without a key and no cache directory: the anonymous key is not kept, so this user gets a new one at the next start"
        );
        return fresh();
    };
    let path = std::path::Path::new(dir).join(ANONYMOUS_KEY_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let key = text.trim();
        if !key.is_empty() && key.len() <= 128 {
            return key.to_owned();
        }
        tracing::warn!(path = %path.display(), "ignoring an unreadable anonymous key; making a new one");
    }
    let key = fresh();
    let tmp = path.with_extension("tmp");
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, format!("{key}\n")))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "could not keep the anonymous key");
    }
    key
}

/// Builds an evaluation context: a targeting key (or none, for an anonymous user: the SDK gives
/// it this device's anonymous key) and typed attributes. `build()` is the JSON the SDK takes.
#[derive(Debug, uniffi::Object)]
pub struct ContextBuilder {
    map: Mutex<serde_json::Map<String, serde_json::Value>>,
}

#[uniffi::export]
impl ContextBuilder {
    /// A context for the user `key`; `null` for an anonymous user.
    #[uniffi::constructor]
    pub fn new(key: Option<String>) -> Arc<Self> {
        let mut map = serde_json::Map::new();
        if let Some(key) = key {
            map.insert("key".into(), serde_json::Value::String(key));
        }
        Arc::new(ContextBuilder {
            map: Mutex::new(map),
        })
    }

    /// Sets a text attribute (`country`, `plan`, `email`).
    pub fn string(self: Arc<Self>, name: String, value: String) -> Arc<Self> {
        self.set(name, serde_json::Value::String(value))
    }

    /// Sets a number attribute.
    pub fn number(self: Arc<Self>, name: String, value: f64) -> Arc<Self> {
        let value = serde_json::Number::from_f64(value).map_or(serde_json::Value::Null, Into::into);
        self.set(name, value)
    }

    /// Sets a boolean attribute.
    pub fn bool(self: Arc<Self>, name: String, value: bool) -> Arc<Self> {
        self.set(name, serde_json::Value::Bool(value))
    }

    /// Sets a list-of-text attribute (an `in` clause matches any of them).
    pub fn strings(self: Arc<Self>, name: String, values: Vec<String>) -> Arc<Self> {
        self.set(
            name,
            values.into_iter().map(serde_json::Value::String).collect(),
        )
    }

    /// The context as the JSON text the SDK takes.
    pub fn build(&self) -> String {
        serde_json::Value::Object(self.map.lock().clone()).to_string()
    }
}

impl ContextBuilder {
    fn set(self: Arc<Self>, name: String, value: serde_json::Value) -> Arc<Self> {
        // The targeting key is the constructor's: an attribute cannot replace it.
        if name != "key" {
            self.map.lock().insert(name, value);
        }
        self
    }
}
