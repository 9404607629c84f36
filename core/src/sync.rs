//! The client's sync state machine, without I/O.
//!
//! The driver (see [`crate::client`]) owns the sockets and the clock. It tells the machine what
//! happened — a transport came up ([`SyncMachine::on_connected`]), a frame arrived
//! ([`SyncMachine::on_frame`]), the transport went away ([`SyncMachine::on_disconnected`]), a
//! deadline passed ([`SyncMachine::on_timeout`]) — always with `now`, and then drains
//! [`SyncMachine::poll_output`] for frames to send, events to publish, and requests to close.
//! [`SyncMachine::poll_timeout`] says when to call back. Everything here is deterministic for a
//! given RNG seed: `vane-server`'s protocol tests (`server/src/session/tests.rs`) run it against
//! the real server session machine with a fake clock and no sleeps, and the tests below drive it
//! alone, frame by frame.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vane_proto::v1::{self as pb, ErrorCode, frame::Kind};

use crate::eval::Context;
use crate::protocol::Selector;
use crate::state::FlagSet;
use crate::summary::Window;

/// Settings of the sync machine.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// The SDK key sent in Hello.
    pub sdk_key: String,
    /// SDK identification sent in Hello.
    pub sdk_name: String,
    /// SDK version sent in Hello.
    pub sdk_version: String,
    /// Platform sent in Hello (e.g. `linux-x86_64`, `android`).
    pub platform: String,
    /// Rules (the client evaluates) or evaluated (the server evaluates for `context`).
    pub mode: pb::DeliveryMode,
    /// The evaluation context: sent to the server in evaluated mode.
    pub context: Context,
    /// Push deltas, or notices followed by Fetch.
    pub push: pb::PushMode,
    /// First reconnect delay cap; doubles per failure up to `backoff_max`. Full jitter.
    pub backoff_initial: Duration,
    /// Largest reconnect delay cap.
    pub backoff_max: Duration,
    /// How long after the transport is up the server has to send Welcome.
    pub handshake_timeout: Duration,
    /// Largest frame body accepted from the server, announced in Hello; the server never
    /// sends a larger one (it ends the session with `FRAME_TOO_LARGE` instead).
    pub max_frame_len: usize,
    /// How long past a heartbeat interval the client waits for any frame before it probes the
    /// path with a `Fetch` (at most a fifth of the interval). The server pings every interval,
    /// so a healthy connection is never probed and this costs no traffic.
    pub probe_grace: Duration,
    /// How long the server has to answer that probe (every server answers a Fetch at once)
    /// before the path is called dead. A silent path is noticed within the heartbeat interval
    /// plus `probe_grace` plus this: 15 + 2 + 3 = 20 s with the defaults.
    pub probe_timeout: Duration,
    /// Whether to report evaluation counts when the server asks for them (its Welcome says how
    /// often; docs/PROTOCOL.md 4.8). Only counts per flag, variant and reason are sent, never a
    /// context.
    pub evaluation_summaries: bool,
    /// Ask, as a relay, for the environment's SDK keys too (Hello's `relay`; server keys in
    /// rules mode), and hand on everything applied as [`Output::Mirror`]. Ignored without the
    /// `rules` feature.
    pub relay: bool,
}

impl SyncConfig {
    /// Defaults for everything but the key.
    pub fn new(sdk_key: impl Into<String>) -> Self {
        SyncConfig {
            sdk_key: sdk_key.into(),
            sdk_name: "vane-rust".into(),
            sdk_version: env!("CARGO_PKG_VERSION").into(),
            platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
            mode: pb::DeliveryMode::Rules,
            context: Context::default(),
            push: pb::PushMode::Delta,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_frame_len: vane_proto::codec::DEFAULT_MAX_FRAME_LEN,
            probe_grace: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(3),
            evaluation_summaries: true,
            relay: false,
        }
    }
}

/// How the client was brought current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateKind {
    /// A whole snapshot replaced the client's state.
    Snapshot,
    /// A delta was applied.
    Delta,
    /// The server confirmed the client's state is current.
    UpToDate,
}

/// The client's state changed (or was confirmed current).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Snapshot, delta or up-to-date.
    pub kind: UpdateKind,
    /// Where the client now stands.
    pub selector: Selector,
    /// Keys added, removed or changed, sorted.
    pub changed: Vec<String>,
}

/// Errors after which the client stops: retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Fatal {
    /// The SDK key is unknown or revoked.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    /// The key may not do what was asked.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The server does not speak this protocol version.
    #[error("unsupported protocol version: {0}")]
    UnsupportedVersion(String),
    /// The server refused the evaluation context.
    #[error("invalid context: {0}")]
    InvalidContext(String),
}

/// Why a connection ended; the machine then waits `reconnect_in` before asking for a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The transport failed or could not be established.
    Transport(String),
    /// No Welcome within the handshake timeout.
    HandshakeTimeout,
    /// Nothing heard for a heartbeat interval and its grace, and no answer to the probe sent
    /// then ([`SyncConfig::probe_timeout`]): the path is dead, or the server is gone.
    HeartbeatTimeout,
    /// The server is going away.
    GoAway(String),
    /// The server sent a retryable Error.
    Server {
        /// The protocol error code.
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// The server broke the protocol (bad frame, frame out of place).
    Protocol(String),
    /// The application suspended the client (background, or no network).
    Suspended,
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisconnectReason::Transport(e) => write!(f, "transport: {e}"),
            DisconnectReason::HandshakeTimeout => f.write_str("no Welcome from the server in time"),
            DisconnectReason::HeartbeatTimeout => {
                f.write_str("no heartbeat from the server, and no answer to a probe")
            }
            DisconnectReason::GoAway(m) => write!(f, "server going away: {m}"),
            DisconnectReason::Server { code, message } => {
                write!(f, "server error {}: {message}", code.as_str_name())
            }
            DisconnectReason::Protocol(e) => write!(f, "protocol error: {e}"),
            DisconnectReason::Suspended => f.write_str("suspended by the application"),
        }
    }
}

/// Something the driver should publish.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The server accepted the session.
    Welcomed {
        /// The server's id for this session, for correlating logs.
        session_id: String,
        /// The environment the key belongs to.
        environment: String,
        /// How often the server will ping.
        heartbeat: Duration,
        /// How often the client reports evaluation counts; `None`: it does not (the server
        /// did not ask, or the client is configured not to).
        summaries: Option<Duration>,
    },
    /// Flags were applied (or confirmed current).
    Updated(Update),
    /// The connection ended; a new one will be attempted after `reconnect_in`.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
        /// The delay before the next attempt.
        reconnect_in: Duration,
    },
    /// The client stopped for good.
    Stopped(Fatal),
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this frame on the current connection.
    Transmit(pb::Frame),
    /// Publish this event.
    Event(Event),
    /// Close the current connection (the machine has already scheduled what comes next).
    Close,
    /// An evaluation summary is due: take the counts and hand them to
    /// [`SyncMachine::send_summary`].
    Summarize,
    /// A relay's machine ([`SyncConfig::relay`]): what it just applied or was told, in order,
    /// for the relay to apply to its own state.
    Mirror(Mirrored),
}

/// What a relay's machine hands on ([`Output::Mirror`]), as the upstream sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum Mirrored {
    /// The session was accepted, for this environment.
    Welcome {
        /// The environment the key belongs to.
        environment: String,
    },
    /// A snapshot, applied: it replaces everything.
    Snapshot(pb::Snapshot),
    /// A delta, applied: it follows the previous state (its `from_version` is the version
    /// the machine held; one version, or a merged span of them).
    Delta(pb::Delta),
    /// The environment's SDK keys in force, replacing those handed on before.
    Keys(pb::Keys),
}

/// The shortest summary interval a client keeps to, whatever a server asks.
pub const MIN_SUMMARY_INTERVAL: Duration = Duration::from_secs(1);

/// When this connection reports evaluation counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Summaries {
    interval: Duration,
    /// The next summary goes with the first Ack from then on.
    due: Instant,
    /// The server's `max_client_frame_len`.
    max_frame_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Ready to connect now.
    Idle,
    /// Waiting before the next connection attempt.
    Backoff { until: Instant },
    /// Transport up, Hello sent, waiting for Welcome.
    Handshaking { deadline: Instant },
    /// Welcomed; `last_heard` is when any frame last arrived, `probed` when the liveness probe
    /// now unanswered was sent.
    Live {
        last_heard: Instant,
        heartbeat: Duration,
        probed: Option<Instant>,
    },
    /// Suspended by the application: no connection, no attempts, until resumed.
    Suspended,
    /// Stopped for good.
    Stopped,
}

/// The client sync state machine. See the module docs.
#[derive(Debug)]
pub struct SyncMachine {
    config: SyncConfig,
    phase: Phase,
    flags: Arc<FlagSet>,
    /// When the Fetch outstanding on this connection was sent: no other is sent while it is
    /// answered in time (within a heartbeat interval).
    fetching: Option<Instant>,
    /// Consecutive failed connections, for backoff; reset once a session syncs.
    failures: u32,
    rng: StdRng,
    out: VecDeque<Output>,
    /// Evaluated mode: the context (as JSON text) the held values were computed for.
    values_for: Option<String>,
    /// Evaluated mode: the context the server is using for frames it sends now.
    server_context: Option<String>,
    /// Identify frames sent on this connection and not yet answered: (seq, context JSON).
    identifies: VecDeque<(u32, String)>,
    next_identify: u32,
    /// Evaluation summaries on this connection, when the server asked for them.
    summaries: Option<Summaries>,
}

impl SyncMachine {
    /// A machine ready to connect, starting from `flags` (empty, or loaded from a cache, in
    /// which case `flags_context` names the context, as JSON text, they were evaluated for).
    pub fn new(
        config: SyncConfig,
        flags: FlagSet,
        flags_context: Option<String>,
        seed: u64,
    ) -> Self {
        SyncMachine {
            config,
            phase: Phase::Idle,
            flags: Arc::new(flags),
            fetching: None,
            failures: 0,
            rng: StdRng::seed_from_u64(seed),
            out: VecDeque::new(),
            values_for: flags_context,
            server_context: None,
            identifies: VecDeque::new(),
            next_identify: 1,
            summaries: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &SyncConfig {
        &self.config
    }

    /// The context in use.
    pub fn context(&self) -> &Context {
        &self.config.context
    }

    /// Evaluated mode: the context (JSON text) the held values were computed for.
    pub fn values_context(&self) -> Option<&str> {
        self.values_for.as_deref()
    }

    fn evaluated(&self) -> bool {
        self.config.mode == pb::DeliveryMode::Evaluated
    }

    /// Switches to another context. In evaluated mode a live session sends `Identify` and the
    /// server answers with the values that differ; otherwise the next connection starts fresh.
    pub fn identify(&mut self, context: Context) {
        self.config.context = context;
        if !self.evaluated() {
            return;
        }
        let json = self.config.context.to_json().to_string();
        if matches!(self.phase, Phase::Live { .. }) {
            let seq = self.next_identify;
            self.next_identify = self.next_identify.wrapping_add(1).max(1);
            self.identifies.push_back((seq, json.clone()));
            self.transmit(pb::Identify { context: json, seq });
        }
    }

    /// The flags held now. Cloning the `Arc` is how the driver publishes them to readers.
    pub fn flags(&self) -> &Arc<FlagSet> {
        &self.flags
    }

    /// Whether the machine wants a new connection now.
    pub fn wants_connect(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Idle => true,
            Phase::Backoff { until } => now >= until,
            _ => false,
        }
    }

    /// Whether a connection is up (handshaking or live).
    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Handshaking { .. } | Phase::Live { .. })
    }

    /// Whether the machine has stopped for good.
    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// When [`SyncMachine::on_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Backoff { until } => Some(until),
            Phase::Handshaking { deadline } => Some(deadline),
            Phase::Live {
                last_heard,
                heartbeat,
                probed,
            } => Some(match probed {
                Some(sent) => sent + self.config.probe_timeout,
                None => last_heard + heartbeat + self.probe_grace(heartbeat),
            }),
            Phase::Idle | Phase::Suspended | Phase::Stopped => None,
        }
    }

    /// The application went to the background or lost the network: close the connection and
    /// make no attempts until [`SyncMachine::resume`].
    pub fn suspend(&mut self, now: Instant) {
        match self.phase {
            Phase::Stopped | Phase::Suspended => {}
            Phase::Handshaking { .. } | Phase::Live { .. } => {
                self.disconnect(now, DisconnectReason::Suspended, Some(Duration::ZERO));
                self.out.push_back(Output::Close);
                self.phase = Phase::Suspended;
            }
            Phase::Idle | Phase::Backoff { .. } => self.phase = Phase::Suspended,
        }
    }

    /// The application is back in the foreground with a network: connect now (skipping any
    /// backoff; the selector makes it a small delta).
    pub fn resume(&mut self) {
        if matches!(self.phase, Phase::Suspended | Phase::Backoff { .. }) {
            self.phase = Phase::Idle;
            self.failures = 0;
        }
    }

    /// Whether the application has suspended the machine.
    pub fn is_suspended(&self) -> bool {
        self.phase == Phase::Suspended
    }

    /// Whether this machine is a relay's, handing on what it applies ([`SyncConfig::relay`]).
    /// Only with the `rules` feature: a relay mirrors rules, and a build without them (the
    /// mobile library) leaves the mirroring out.
    fn mirrors(&self) -> bool {
        cfg!(feature = "rules") && self.config.relay
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// A transport is up: send Hello.
    pub fn on_connected(&mut self, now: Instant) {
        if !self.wants_connect(now) {
            return;
        }
        self.phase = Phase::Handshaking {
            deadline: now + self.config.handshake_timeout,
        };
        self.fetching = None;
        self.identifies.clear();
        let (context, selector) = if self.evaluated() {
            let json = self.config.context.to_json().to_string();
            // Values computed for another context cannot be resumed: ask for a snapshot.
            let selector = self
                .flags
                .selector()
                .filter(|_| self.values_for.as_deref() == Some(json.as_str()));
            self.server_context = Some(json.clone());
            (json, selector)
        } else {
            (String::new(), self.flags.selector())
        };
        let hello = pb::Hello {
            protocol_version: vane_proto::PROTOCOL_VERSION,
            sdk_key: self.config.sdk_key.clone(),
            sdk_name: self.config.sdk_name.clone(),
            sdk_version: self.config.sdk_version.clone(),
            platform: self.config.platform.clone(),
            mode: self.config.mode.into(),
            push: self.config.push.into(),
            selector: selector.map(Into::into),
            max_frame_len: u32::try_from(self.config.max_frame_len).unwrap_or(u32::MAX),
            context,
            relay: self.mirrors(),
        };
        self.transmit(hello);
    }

    /// Connection attempts that failed in a row (reset once a session brings the client
    /// current); the driver polls over HTTP once there have been enough.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A snapshot read over HTTP (polling, when no streaming transport gets through) is applied
    /// as a streamed one would be: the same checks, an update event, and the selector it is at,
    /// from which the next streaming session resumes by delta. It does not count as a session:
    /// the backoff of streaming attempts goes on.
    pub fn on_polled(&mut self, snapshot: pb::Snapshot) -> Result<(), String> {
        let selector = snapshot.selector.map(Selector::from);
        let changed = Arc::make_mut(&mut self.flags).replace(snapshot)?;
        self.values_for = match self.config.mode {
            pb::DeliveryMode::Evaluated => Some(self.config.context.to_json().to_string()),
            _ => None,
        };
        if let Some(selector) = selector {
            self.emit(Event::Updated(Update {
                kind: UpdateKind::Snapshot,
                selector,
                changed,
            }));
        }
        Ok(())
    }

    /// A connection attempt failed before any transport came up.
    pub fn on_connect_failed(&mut self, now: Instant, reason: String) {
        if self.wants_connect(now) {
            self.disconnect(now, DisconnectReason::Transport(reason), None);
        }
    }

    /// The transport closed or failed. Idempotent: ignored if the machine already closed it.
    pub fn on_disconnected(&mut self, now: Instant, reason: DisconnectReason) {
        if self.is_connected() {
            self.disconnect(now, reason, None);
        }
    }

    /// A deadline from [`SyncMachine::poll_timeout`] may have passed.
    pub fn on_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Backoff { until } if now >= until => self.phase = Phase::Idle,
            Phase::Handshaking { deadline } if now >= deadline => {
                self.close(now, DisconnectReason::HandshakeTimeout, None);
            }
            Phase::Live {
                probed: Some(sent), ..
            } if now >= sent + self.config.probe_timeout => {
                self.close(now, DisconnectReason::HeartbeatTimeout, None);
            }
            Phase::Live {
                last_heard,
                heartbeat,
                probed: None,
            } if now >= last_heard + heartbeat + self.probe_grace(heartbeat) => {
                // A Ping is overdue. Every server answers a Fetch at once (UpToDate when
                // current); a server restarted under this QUIC connection answers the packet
                // with a stateless reset, which ends it at once.
                self.phase = Phase::Live {
                    last_heard,
                    heartbeat,
                    probed: Some(now),
                };
                self.fetching = Some(now);
                self.transmit(pb::Fetch {
                    selector: self.flags.selector().map(Into::into),
                });
            }
            _ => {}
        }
    }

    /// A frame arrived on the current connection.
    pub fn on_frame(&mut self, now: Instant, frame: pb::Frame) {
        let heartbeat = match self.phase {
            Phase::Handshaking { .. } => None,
            Phase::Live { heartbeat, .. } => Some(heartbeat),
            // A frame after we closed: the driver will drop the connection; ignore it.
            Phase::Idle | Phase::Backoff { .. } | Phase::Suspended | Phase::Stopped => return,
        };
        if let Some(heartbeat) = heartbeat {
            self.phase = Phase::Live {
                last_heard: now,
                heartbeat,
                probed: None,
            };
        }
        let Some(kind) = frame.kind else {
            return; // A frame kind from a newer protocol: skip it.
        };
        match (kind, heartbeat) {
            (Kind::Error(e), _) => self.on_error(now, e),
            (Kind::GoAway(g), _) => {
                let window = Duration::from_millis(u64::from(g.reconnect_within_ms));
                let delay = self.rng.random_range(Duration::ZERO..=window);
                self.close(now, DisconnectReason::GoAway(g.message), Some(delay));
            }
            (Kind::Welcome(w), None) => {
                let heartbeat = Duration::from_millis(u64::from(w.heartbeat_interval_ms.max(100)));
                self.phase = Phase::Live {
                    last_heard: now,
                    heartbeat,
                    probed: None,
                };
                let interval = Duration::from_millis(u64::from(w.evaluation_summary_interval_ms));
                self.summaries =
                    (self.config.evaluation_summaries && !interval.is_zero()).then(|| {
                        let interval = interval.max(MIN_SUMMARY_INTERVAL);
                        Summaries {
                            interval,
                            due: now + interval,
                            max_frame_len: match usize::try_from(w.max_client_frame_len) {
                                Ok(0) | Err(_) => vane_proto::codec::DEFAULT_MAX_CLIENT_FRAME_LEN,
                                Ok(n) => n,
                            },
                        }
                    });
                if self.mirrors() {
                    self.out.push_back(Output::Mirror(Mirrored::Welcome {
                        environment: w.environment.clone(),
                    }));
                }
                self.emit(Event::Welcomed {
                    session_id: w.session_id,
                    environment: w.environment,
                    heartbeat,
                    summaries: self.summaries.map(|s| s.interval),
                });
            }
            (Kind::Snapshot(s), Some(_)) => {
                self.fetching = None;
                let selector = s.selector.map(Selector::from);
                let mirror = self.mirrors().then(|| s.clone());
                match Arc::make_mut(&mut self.flags).replace(s) {
                    Ok(changed) => {
                        if let Some(s) = mirror {
                            self.out.push_back(Output::Mirror(Mirrored::Snapshot(s)));
                        }
                        self.values_for = self.server_context.clone();
                        self.applied(now, UpdateKind::Snapshot, selector, changed);
                    }
                    Err(e) => self.protocol_error(now, e),
                }
            }
            (Kind::Delta(d), Some(_)) => self.on_delta(now, d),
            (Kind::UpToDate(u), Some(_)) => {
                self.fetching = None;
                let selector = u.selector.map(Selector::from);
                if selector.is_some() && selector == self.flags.selector() {
                    if self.flags.is_cached() {
                        Arc::make_mut(&mut self.flags).confirm_live();
                    }
                    self.applied(now, UpdateKind::UpToDate, selector, Vec::new());
                } else {
                    self.fetch(now);
                }
            }
            (Kind::Notice(n), Some(_)) => self.fetch_unless_at(now, n.selector),
            (Kind::Ping(p), Some(_)) => {
                self.fetch_unless_at(now, p.selector);
                self.ack(now);
            }
            (Kind::Keys(k), Some(_)) if self.mirrors() => {
                self.out.push_back(Output::Mirror(Mirrored::Keys(k)));
            }
            (other, _) => {
                let name = pb::Frame { kind: Some(other) }.kind_name();
                self.protocol_error(now, format!("unexpected {name} frame"));
            }
        }
    }

    /// The driver could not decode a frame from the server.
    pub fn on_malformed(&mut self, now: Instant, reason: String) {
        self.protocol_error(now, reason);
    }

    fn on_delta(&mut self, now: Instant, delta: pb::Delta) {
        let ours = self.flags.selector();
        let same_epoch = ours.is_some_and(|s| s.epoch == delta.epoch);
        match ours {
            Some(s) if same_epoch && delta.from_version == s.version => {
                self.fetching = None;
                let to = Selector {
                    epoch: delta.epoch,
                    version: delta.to_version,
                };
                let answers = delta.identify_seq;
                let mirror = self.mirrors().then(|| delta.clone());
                match Arc::make_mut(&mut self.flags).apply(delta) {
                    Ok(changed) => {
                        if let Some(d) = mirror {
                            self.out.push_back(Output::Mirror(Mirrored::Delta(d)));
                        }
                        if answers != 0 {
                            // Identifies are answered in order; drop any the server skipped.
                            while let Some((seq, json)) = self.identifies.pop_front() {
                                if seq == answers {
                                    self.server_context = Some(json);
                                    break;
                                }
                            }
                        }
                        self.values_for = self.server_context.clone();
                        self.applied(now, UpdateKind::Delta, Some(to), changed);
                    }
                    Err(e) => self.protocol_error(now, e),
                }
            }
            // Already applied (a Fetch answer that crossed a push): nothing to do.
            Some(s) if same_epoch && delta.to_version <= s.version => {}
            // A gap or another epoch: never apply it; ask to be brought current instead.
            _ => self.fetch(now),
        }
    }

    fn on_error(&mut self, now: Instant, e: pb::Error) {
        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
        let fatal = match code {
            ErrorCode::Unauthenticated => Some(Fatal::Unauthenticated(e.message.clone())),
            ErrorCode::PermissionDenied => Some(Fatal::PermissionDenied(e.message.clone())),
            ErrorCode::UnsupportedVersion => Some(Fatal::UnsupportedVersion(e.message.clone())),
            ErrorCode::InvalidContext => Some(Fatal::InvalidContext(e.message.clone())),
            _ => None,
        };
        if let Some(fatal) = fatal {
            self.phase = Phase::Stopped;
            self.emit(Event::Stopped(fatal));
            self.out.push_back(Output::Close);
            return;
        }
        let retry_after = (e.retry_after_ms > 0).then(|| {
            // Spread clients told the same thing over a fifth more, so they don't return in lockstep.
            let base = Duration::from_millis(u64::from(e.retry_after_ms));
            base + self.rng.random_range(Duration::ZERO..=base / 5)
        });
        let reason = DisconnectReason::Server {
            code,
            message: e.message,
        };
        self.close(now, reason, retry_after);
    }

    fn applied(
        &mut self,
        now: Instant,
        kind: UpdateKind,
        selector: Option<Selector>,
        changed: Vec<String>,
    ) {
        self.failures = 0;
        let Some(selector) = selector else { return };
        self.emit(Event::Updated(Update {
            kind,
            selector,
            changed,
        }));
        self.ack(now);
    }

    fn fetch_unless_at(&mut self, now: Instant, server: Option<pb::Selector>) {
        if server.map(Selector::from) != self.flags.selector() {
            self.fetch(now);
        }
    }

    /// Asks to be brought current, unless a Fetch is outstanding. One unanswered for a whole
    /// heartbeat interval is asked again: a duplicate answer is ignored, a lost one is not
    /// waited for forever.
    fn fetch(&mut self, now: Instant) {
        let patience = match self.phase {
            Phase::Live { heartbeat, .. } => heartbeat,
            _ => self.config.handshake_timeout,
        };
        if self.fetching.is_none_or(|sent| now >= sent + patience) {
            self.fetching = Some(now);
            self.transmit(pb::Fetch {
                selector: self.flags.selector().map(Into::into),
            });
        }
    }

    /// How long past a heartbeat interval the machine waits before it probes.
    fn probe_grace(&self, heartbeat: Duration) -> Duration {
        self.config.probe_grace.min(heartbeat / 5)
    }

    /// Acks the selector held; a summary that is due goes with it, so reporting counts never
    /// wakes a mobile radio that the Ping has not woken already.
    fn ack(&mut self, now: Instant) {
        if let Some(selector) = self.flags.selector() {
            self.transmit(pb::Ack {
                selector: Some(selector.into()),
            });
        }
        if let Some(s) = &mut self.summaries
            && now >= s.due
        {
            s.due = now + s.interval;
            self.out.push_back(Output::Summarize);
        }
    }

    /// Sends the counts the driver took after [`Output::Summarize`], in as many frames as the
    /// server's frame limit needs (none for an empty window). A window that cannot go (the
    /// connection ended meanwhile, or the server no longer asks) is handed back, for the driver
    /// to put back into the counts.
    pub fn send_summary(&mut self, window: Window) -> Result<(), Window> {
        let Some(s) = self.summaries else {
            return Err(window);
        };
        if !matches!(self.phase, Phase::Live { .. }) {
            return Err(window);
        }
        for frame in window.frames(s.max_frame_len) {
            self.transmit(frame);
        }
        Ok(())
    }

    /// Whether this connection reports evaluation counts.
    pub fn reports_summaries(&self) -> bool {
        self.summaries.is_some() && matches!(self.phase, Phase::Live { .. })
    }

    fn protocol_error(&mut self, now: Instant, reason: String) {
        self.close(now, DisconnectReason::Protocol(reason), None);
    }

    /// The machine ends the connection itself.
    fn close(&mut self, now: Instant, reason: DisconnectReason, delay: Option<Duration>) {
        self.disconnect(now, reason, delay);
        self.out.push_back(Output::Close);
    }

    fn disconnect(&mut self, now: Instant, reason: DisconnectReason, delay: Option<Duration>) {
        let delay = delay.unwrap_or_else(|| self.backoff_delay());
        self.failures = self.failures.saturating_add(1);
        self.phase = Phase::Backoff { until: now + delay };
        self.fetching = None;
        self.summaries = None;
        self.emit(Event::Disconnected {
            reason,
            reconnect_in: delay,
        });
    }

    /// Full jitter: uniform in [0, min(max, initial × 2^failures)].
    fn backoff_delay(&mut self) -> Duration {
        let cap = self
            .config
            .backoff_initial
            .saturating_mul(1 << self.failures.min(20))
            .min(self.config.backoff_max);
        self.rng.random_range(Duration::ZERO..=cap)
    }

    fn transmit(&mut self, frame: impl Into<pb::Frame>) {
        self.out.push_back(Output::Transmit(frame.into()));
    }

    fn emit(&mut self, event: Event) {
        self.out.push_back(Output::Event(event));
    }
}

#[cfg(test)]
mod tests;
