//! One client session, as a state machine without I/O: Hello → Welcome → catch-up, then pushes,
//! pings and the client's Acks, Fetches and Identifies, until one side leaves.
//!
//! Like quinn-proto's `Connection`, the [`Session`] is handed everything that happens — bytes
//! from the client, a change the environment published, a deadline passing, shutdown, the key
//! being revoked, the client not reading — always with `now`, and hands out the bytes to send
//! ([`Session::poll_transmit`]), when to call back ([`Session::poll_timeout`]) and, once it is
//! over, why ([`Session::end`]). It reads the hub (in-memory state) but does no I/O and reads
//! no clock, so the deterministic tests in `tests.rs` run it against the client's real sync
//! machine with a fake clock. [`driver`] is the thin tokio task around it for real streams;
//! `evaluated.rs` holds what evaluated mode remembers per session.

pub mod driver;
mod evaluated;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::sync::watch;
use vane_core::convert::reason_from_wire;
use vane_core::eval::{Context, ErrorCode as EvalErrorCode};
use vane_core::protocol::{MISSED_HEARTBEATS, Selector, millis};
use vane_core::summary::MAX_SUMMARY_COUNTS;
use vane_core::sync::MIN_SUMMARY_INTERVAL;
use vane_proto::codec::{self, DecodeError};
use vane_proto::v1::{self as pb, ErrorCode, frame::Kind};

use crate::events::{Events, SummaryCount, event_reason};
use crate::hub::{EnvHub, Grant, Hub, KeyMiss, Published, SessionMeta};

/// Characters of a client's platform and SDK name the server keeps for the live view.
const MAX_META_CHARS: usize = 64;
use evaluated::Evaluated;

/// Per-session settings, from the server configuration.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Interval between Pings; a client silent for three of them is dropped.
    pub heartbeat: Duration,
    /// How long a new connection has to send Hello.
    pub hello_timeout: Duration,
    /// How long one write may block before the session is dropped as not reading.
    pub write_timeout: Duration,
    /// Clients reconnect at a random moment within this window after a GoAway.
    pub goaway_window: Duration,
    /// Largest frame body accepted from a client.
    pub max_client_frame_len: usize,
    /// Where the evaluation counts clients report go; while it is disabled clients are not
    /// asked for them.
    pub events: Events,
    /// How often clients report evaluation counts, at most (Welcome's
    /// `evaluation_summary_interval_ms`, when events are on).
    pub summary_interval: Duration,
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        SessionConfig {
            heartbeat: Duration::from_secs(15),
            hello_timeout: vane_core::protocol::HELLO_WITHIN,
            write_timeout: Duration::from_secs(10),
            goaway_window: Duration::from_secs(5),
            max_client_frame_len: codec::DEFAULT_MAX_CLIENT_FRAME_LEN,
            events: Events::disabled(),
            summary_interval: Duration::from_secs(30),
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The client closed the stream.
    ClientClosed,
    /// The transport failed.
    Transport(String),
    /// The session was refused or ended with this `Error` frame (sent to the client).
    Error(ErrorCode, String),
    /// The server is shutting down; `GoAway` was sent.
    Shutdown,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed the stream"),
            End::Transport(e) => write!(f, "transport: {e}"),
            End::Error(code, message) => write!(f, "{}: {message}", code.as_str_name()),
            End::Shutdown => f.write_str("server shutdown"),
        }
    }
}

/// A connection refused before its session starts (a TLS connection without ALPN `vane/1`, a
/// source over its connection rate): it is sent this `Error` and closed.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    /// The error code.
    pub code: ErrorCode,
    /// Why.
    pub message: &'static str,
    /// When the client may try again, in milliseconds (`retry_after_ms`); 0: the code says.
    pub retry_after_ms: u32,
}

/// What a live session's driver waits on besides the stream: the environment's published
/// changes, and the end of the key's grant. Handed out once, when the session goes live.
#[derive(Debug)]
pub struct Subscription {
    /// Changes the environment publishes; on each, call [`Session::handle_change`].
    pub changes: watch::Receiver<Published>,
    /// The key's grant; when it ends, call [`Session::handle_revoked`].
    pub grant: Arc<Grant>,
}

/// One session. See the module docs.
#[derive(Debug)]
pub struct Session {
    id: u64,
    config: Arc<SessionConfig>,
    state: State,
    /// The start of a frame whose end has not arrived; empty (and unallocated) between frames.
    partial: BytesMut,
    /// Encoded frames to send, in order.
    out: Outbox,
    /// When a complete frame last arrived.
    last_heard: Instant,
    /// The environment's changes, until [`Session::take_subscription`] hands them to the driver.
    changes: Option<watch::Receiver<Published>>,
    end: Option<End>,
    /// `quic` or `tcp`, for the console's live view (see [`Session::set_transport`]).
    transport: &'static str,
}

#[derive(Debug)]
enum State {
    /// Waiting for Hello until `deadline`.
    Opening { deadline: Instant },
    /// Past Hello.
    Live(Live),
    /// Over: see [`Session::end`].
    Ended,
}

/// A session past its Hello.
#[derive(Debug)]
struct Live {
    env: Arc<EnvHub>,
    grant: Arc<Grant>,
    delivery: Delivery,
    push: pb::PushMode,
    /// What this client has been brought to (evaluated mode: the version at which its values
    /// were last brought current; a change that alters none of them does not advance it).
    sent: Selector,
    /// Notify mode: the selector last announced.
    announced: Selector,
    next_ping: Instant,
    /// Largest frame body the client accepts (its `Hello.max_frame_len`, at most the server's).
    max_send: usize,
    /// What the client may still report in evaluation counts, when it was asked to.
    summaries: Option<SummaryBudget>,
    /// A relay's session: the generation of the `Keys` frame it was last sent.
    relay: Option<u64>,
}

/// A session's allowance of reported evaluation counts: [`MAX_SUMMARY_COUNTS`] per summary
/// interval (less a tenth, for timer jitter); counts over it are dropped and counted.
#[derive(Debug, Clone, Copy)]
struct SummaryBudget {
    interval: Duration,
    left: usize,
    refill_at: Instant,
}

impl SummaryBudget {
    fn new(interval: Duration, now: Instant) -> SummaryBudget {
        SummaryBudget {
            interval,
            left: MAX_SUMMARY_COUNTS,
            refill_at: now + interval * 9 / 10,
        }
    }

    /// Takes up to `want` counts at `now`; returns how many may be recorded.
    fn take(&mut self, now: Instant, want: usize) -> usize {
        if now >= self.refill_at {
            *self = SummaryBudget::new(self.interval, now);
        }
        let granted = want.min(self.left);
        self.left -= granted;
        granted
    }
}

/// What a session delivers.
#[derive(Debug)]
enum Delivery {
    /// Flag definitions; the client evaluates.
    Rules,
    /// Values evaluated here for the client's context.
    Evaluated(Evaluated),
}

/// Frames waiting to be written. The usual push is one frame, kept inline; only a burst (the
/// opening, a ping after a lag, pipelined Fetches) spills into a queue, which is freed once it
/// empties, so an idle session holds nothing here.
#[derive(Debug, Default)]
struct Outbox {
    next: Option<Bytes>,
    more: VecDeque<Bytes>,
}

impl Outbox {
    fn push(&mut self, bytes: Bytes) {
        if self.next.is_none() {
            self.next = Some(bytes);
        } else {
            self.more.push_back(bytes);
        }
    }

    fn pop(&mut self) -> Option<Bytes> {
        let next = self.next.take()?;
        self.next = self.more.pop_front();
        if self.more.is_empty() && self.more.capacity() > 0 {
            self.more = VecDeque::new();
        }
        Some(next)
    }

    fn clear(&mut self) {
        *self = Outbox::default();
    }
}

/// Seconds a refused client is told to wait when the server, or its environment, is not ready.
const RETRY_WHEN_NOT_READY: Duration = Duration::from_secs(1);
/// What a client whose key this node has not heard of yet is told to wait (with other nodes on
/// the store, the key may have been made on one of them a moment ago).
const RETRY_UNKNOWN_KEY: Duration = Duration::from_millis(500);
/// What a client of an environment whose clone failed is told to wait: until someone retries or
/// deletes it, which takes a person.
const RETRY_WHEN_FAILED: Duration = Duration::from_secs(30);

fn error_frame(code: ErrorCode, message: &str, retry_after: Option<Duration>) -> Bytes {
    let retry_after = retry_after.unwrap_or(match code {
        ErrorCode::Initializing | ErrorCode::EnvironmentNotReady => RETRY_WHEN_NOT_READY,
        _ => Duration::ZERO,
    });
    codec::encode(
        &pb::Error {
            code: code.into(),
            message: message.to_owned(),
            retry_after_ms: millis(retry_after),
        }
        .into(),
    )
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> End {
    End::Error(code, message.into())
}

impl Session {
    /// A session on a transport that came up at `now`; the client has until the configured
    /// Hello timeout to speak.
    pub fn new(id: u64, config: Arc<SessionConfig>, now: Instant) -> Session {
        let deadline = now + config.hello_timeout;
        Session {
            id,
            config,
            state: State::Opening { deadline },
            partial: BytesMut::new(),
            out: Outbox::default(),
            last_heard: now,
            changes: None,
            end: None,
            transport: "unknown",
        }
    }

    /// Names the transport the session runs on (the live view shows sessions by transport).
    pub fn set_transport(&mut self, transport: vane_core::protocol::Transport) {
        self.transport = match transport {
            vane_core::protocol::Transport::Quic => "quic",
            vane_core::protocol::Transport::Tcp => "tcp",
        };
    }

    /// A session that is over before it starts: it sends the refusal's `Error` and ends.
    pub fn refused(id: u64, config: Arc<SessionConfig>, now: Instant, refusal: Refusal) -> Session {
        let mut session = Session::new(id, config, now);
        session.finish_with(
            refuse(refusal.code, refusal.message),
            (refusal.retry_after_ms > 0)
                .then(|| Duration::from_millis(u64::from(refusal.retry_after_ms))),
        );
        session
    }

    /// The session's id (in Welcome, and in logs).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Why the session ended, once it has. The driver sends what [`Session::poll_transmit`]
    /// still holds (the `Error` or `GoAway`, if any) and closes the stream.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// The next bytes to write.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop()
    }

    /// When [`Session::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Opening { deadline } => Some(*deadline),
            State::Live(live) => Some(live.next_ping.min(self.silence_deadline())),
            State::Ended => None,
        }
    }

    /// What a live session's driver waits on; `Some` once, when the session goes live.
    pub fn take_subscription(&mut self) -> Option<Subscription> {
        let State::Live(live) = &self.state else {
            return None;
        };
        let changes = self.changes.take()?;
        Some(Subscription {
            changes,
            grant: live.grant.clone(),
        })
    }

    fn silence_deadline(&self) -> Instant {
        self.last_heard + self.config.heartbeat * MISSED_HEARTBEATS
    }

    /// Bytes arrived from the client.
    pub fn handle_input(&mut self, now: Instant, data: &[u8], hub: &Hub) {
        if self.end.is_some() {
            return;
        }
        // Whole frames are decoded where they arrived; only the start of an unfinished one is
        // kept, and an idle session holds no buffer.
        let mut rest = data;
        if !self.partial.is_empty() {
            self.partial.extend_from_slice(data);
            rest = &[];
        }
        while self.end.is_none() {
            let buffered = !self.partial.is_empty();
            let input: &[u8] = if buffered { &self.partial } else { rest };
            match codec::decode_slice(input, self.config.max_client_frame_len) {
                Ok(Some((frame, used))) => {
                    if buffered {
                        self.partial.advance(used);
                    } else {
                        rest = &rest[used..];
                    }
                    self.last_heard = now;
                    self.handle_frame(now, frame, hub);
                }
                Ok(None) => {
                    if !buffered && !rest.is_empty() {
                        self.partial.extend_from_slice(rest);
                    }
                    break;
                }
                Err(DecodeError::TooLarge { len, max }) => self.finish(refuse(
                    ErrorCode::FrameTooLarge,
                    format!("frame of {len} bytes exceeds the limit of {max} bytes"),
                )),
                Err(e) => self.finish(refuse(ErrorCode::MalformedFrame, e.to_string())),
            }
        }
        if self.partial.is_empty() && self.partial.capacity() > 0 {
            self.partial = BytesMut::new();
        }
    }

    /// The client closed its side of the stream.
    pub fn handle_eof(&mut self, _now: Instant) {
        if self.end.is_some() {
            return;
        }
        if self.partial.is_empty() {
            self.finish(End::ClientClosed);
        } else {
            let buffered = self.partial.len();
            self.finish(End::Transport(format!(
                "stream ended inside a frame ({buffered} bytes buffered)"
            )));
        }
    }

    /// The transport failed.
    pub fn handle_transport_error(&mut self, _now: Instant, error: String) {
        if self.end.is_none() {
            self.finish(End::Transport(error));
        }
    }

    /// A write blocked for the configured write timeout: the client is not reading.
    pub fn handle_stalled(&mut self, _now: Instant) {
        if self.end.is_none() {
            // What is queued would block the same way; the Error frame gets the one attempt.
            self.out.clear();
            let waited = self.config.write_timeout;
            self.finish(refuse(
                ErrorCode::Timeout,
                format!("client did not read for {waited:?}; dropped"),
            ));
        }
    }

    /// The server is shutting down: `GoAway`, then the end.
    pub fn handle_shutdown(&mut self, _now: Instant) {
        if self.end.is_none() {
            self.finish(End::Shutdown);
        }
    }

    /// The key's grant ended (revoked, or its environment deleted).
    pub fn handle_revoked(&mut self, _now: Instant) {
        let State::Live(live) = &self.state else {
            return;
        };
        let why = live
            .grant
            .revoked()
            .map_or_else(|| "SDK key revoked".to_owned(), |why| why.to_string());
        self.finish(refuse(ErrorCode::Unauthenticated, why));
    }

    /// The environment published `published` (the subscription woke; the driver hands over
    /// what it read from it, so the shared value is read once per change).
    pub fn handle_change(&mut self, _now: Instant, published: &Published) {
        let State::Live(live) = &mut self.state else {
            return;
        };
        let keys = live.keys_bytes(published);
        if let Some(bytes) = live.push_bytes(published) {
            self.send(bytes);
        }
        if let Some(bytes) = keys {
            self.send(bytes);
        }
    }

    /// A deadline from [`Session::poll_timeout`] may have passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let heartbeat = self.config.heartbeat;
        let silent = now >= self.silence_deadline();
        match &mut self.state {
            State::Opening { deadline } if now >= *deadline => {
                self.finish(refuse(ErrorCode::Timeout, "no Hello in time"));
            }
            State::Live(_) if silent => {
                let limit = heartbeat * MISSED_HEARTBEATS;
                self.finish(refuse(
                    ErrorCode::Timeout,
                    format!("no frame from the client in {limit:?}"),
                ));
            }
            State::Live(live) if now >= live.next_ping => {
                live.next_ping = now + heartbeat;
                // A session that fell behind is brought current first, so the Ping never
                // announces a version whose frame is still to come on this stream.
                let published = live.env.published();
                let behind = live.push_bytes(&published);
                let keys = live.keys_bytes(&published);
                let at = match live.push {
                    pb::PushMode::Notify => live.announced,
                    pb::PushMode::Delta => live.sent,
                };
                let ping = codec::encode(
                    &pb::Ping {
                        selector: Some(at.into()),
                    }
                    .into(),
                );
                if let Some(bytes) = behind {
                    self.send(bytes);
                }
                if let Some(bytes) = keys {
                    self.send(bytes);
                }
                self.send(ping);
            }
            _ => {}
        }
    }

    fn handle_frame(&mut self, now: Instant, frame: pb::Frame, hub: &Hub) {
        let Some(kind) = frame.kind else {
            return; // a frame kind from a newer protocol: skipped (PROTOCOL.md section 2)
        };
        let answer = match &mut self.state {
            State::Opening { .. } => match kind {
                Kind::Hello(hello) => self.greet(now, hello, hub).map(|()| None),
                other => Err(violation(&other, "Hello")),
            },
            State::Live(live) => live.answer(self.id, now, kind, &self.config.events),
            State::Ended => Ok(None),
        };
        match answer {
            Ok(Some(bytes)) => self.send(bytes),
            Ok(None) => {}
            Err(end) => self.finish(end),
        }
    }

    /// Answers a Hello: checks readiness, version, key and mode, then Welcome and catch-up.
    fn greet(&mut self, now: Instant, hello: pb::Hello, hub: &Hub) -> Result<(), End> {
        if !hub.is_ready() {
            return Err(refuse(
                ErrorCode::Initializing,
                "server is loading its state",
            ));
        }
        if hello.protocol_version != vane_proto::PROTOCOL_VERSION {
            return Err(refuse(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported (this server speaks {})",
                    hello.protocol_version,
                    vane_proto::PROTOCOL_VERSION
                ),
            ));
        }
        let grant = match hub.authenticate_at(&hello.sdk_key, now) {
            Ok(grant) => grant,
            Err(KeyMiss::Unknown) => {
                return Err(refuse(
                    ErrorCode::Unauthenticated,
                    "unknown or revoked SDK key",
                ));
            }
            Err(KeyMiss::NotYet) => {
                // Perhaps made on another node a moment ago: this one is about to hear of it.
                let why = "this node does not know the SDK key yet; retry shortly";
                self.finish_with(
                    refuse(ErrorCode::Initializing, why),
                    Some(RETRY_UNKNOWN_KEY),
                );
                return Ok(());
            }
        };
        grant
            .kind
            .allows(hello.mode())
            .map_err(|denied| refuse(ErrorCode::PermissionDenied, denied.to_string()))?;
        let env = hub.env(&grant.env).ok_or_else(|| {
            refuse(
                ErrorCode::EnvironmentNotReady,
                format!("environment {:?} is not loaded", grant.env),
            )
        })?;
        let lifecycle = env.lifecycle();
        if let Some(why) = lifecycle.not_serving(env.name()) {
            // A failed clone is not going to be ready in a second: its clients wait longer.
            let retry =
                (lifecycle.state == crate::store::EnvState::Failed).then_some(RETRY_WHEN_FAILED);
            self.finish_with(refuse(ErrorCode::EnvironmentNotReady, why), retry);
            return Ok(());
        }
        if hello.relay && hello.mode() == pb::DeliveryMode::Evaluated {
            return Err(refuse(
                ErrorCode::ProtocolViolation,
                "a relay mirrors rules: relay in evaluated mode",
            ));
        }
        let delivery = match hello.mode() {
            pb::DeliveryMode::Evaluated => match Context::parse(&hello.context) {
                Ok(ctx) => Delivery::Evaluated(Evaluated::new(ctx)),
                Err(e) => return Err(refuse(ErrorCode::InvalidContext, e.to_string())),
            },
            _ => Delivery::Rules,
        };
        let max_send = match usize::try_from(hello.max_frame_len) {
            Ok(0) | Err(_) => codec::DEFAULT_MAX_FRAME_LEN,
            Ok(n) => n.min(codec::DEFAULT_MAX_FRAME_LEN),
        };
        tracing::debug!(session = self.id, env = env.name(), sdk = %hello.sdk_name, version = %hello.sdk_version, "hello");

        // Subscribe before catching up: a change committed in between is then either in the
        // catch-up or seen as a change, never lost.
        let changes = env.subscribe();
        let short = |s: &str| s.chars().take(MAX_META_CHARS).collect::<String>();
        env.session_started(
            self.id,
            SessionMeta {
                transport: self.transport,
                platform: short(&hello.platform),
                sdk: short(&format!("{} {}", hello.sdk_name, hello.sdk_version)),
            },
        );
        let summaries = self.config.events.enabled().then(|| {
            let interval = self.config.summary_interval.max(MIN_SUMMARY_INTERVAL);
            SummaryBudget::new(interval, now)
        });
        let welcome = codec::encode(
            &pb::Welcome {
                session_id: format!("{:x}", self.id),
                heartbeat_interval_ms: millis(self.config.heartbeat),
                max_client_frame_len: u32::try_from(self.config.max_client_frame_len)
                    .unwrap_or(u32::MAX),
                max_server_frame_len: u32::try_from(max_send).unwrap_or(u32::MAX),
                server_version: env!("CARGO_PKG_VERSION").into(),
                environment: env.name().to_owned(),
                evaluation_summary_interval_ms: summaries.map_or(0, |s| millis(s.interval)),
            }
            .into(),
        );
        let published = env.published();
        let at = published.selector;
        let mut live = Live {
            env,
            grant,
            delivery,
            push: hello.push(),
            sent: at,
            announced: at,
            next_ping: now + self.config.heartbeat,
            max_send,
            summaries,
            relay: hello.relay.then_some(published.keys_generation),
        };
        let catch_up = live.catch_up(hello.selector.map(Selector::from));
        self.state = State::Live(live);
        self.changes = Some(changes);
        self.send(welcome);
        self.send(catch_up);
        if hello.relay {
            self.send(published.keys);
        }
        Ok(())
    }

    /// Queues an encoded frame, unless it is larger than the client accepts.
    fn send(&mut self, bytes: Bytes) {
        let max = match &self.state {
            State::Live(live) => live.max_send,
            _ => codec::DEFAULT_MAX_FRAME_LEN,
        };
        let len = bytes.len().saturating_sub(codec::PREFIX_LEN);
        if len > max {
            return self.finish(refuse(
                ErrorCode::FrameTooLarge,
                format!(
                    "the next frame is {len} bytes, larger than this client's max_frame_len of {max}"
                ),
            ));
        }
        self.out.push(bytes);
    }

    /// Ends the session: the end's own frame (`Error`, `GoAway`) goes after what is queued;
    /// after a transport failure nothing more can be sent.
    fn finish(&mut self, end: End) {
        self.finish_with(end, None);
    }

    /// [`Session::finish`], with the `retry_after` of its Error frame when the code alone does
    /// not say it.
    fn finish_with(&mut self, end: End, retry_after: Option<Duration>) {
        if self.end.is_some() {
            return;
        }
        if matches!(end, End::Transport(_)) {
            self.out.clear();
        }
        if let State::Live(live) = &self.state {
            live.env.session_ended(self.id);
        }
        self.state = State::Ended;
        self.changes = None;
        self.partial = BytesMut::new();
        match &end {
            End::Error(code, message) => self.out.push(error_frame(*code, message, retry_after)),
            End::Shutdown => self.out.push(codec::encode(
                &pb::GoAway {
                    reason: pb::GoAwayReason::Shutdown.into(),
                    reconnect_within_ms: millis(self.config.goaway_window),
                    message: "server shutting down".into(),
                }
                .into(),
            )),
            End::ClientClosed | End::Transport(_) => {}
        }
        self.end = Some(end);
    }
}

/// A reported count as an event's: the reason as the events name it.
fn summary_count(c: &pb::EvaluationCount) -> SummaryCount<'_> {
    let reason = match pb::Reason::try_from(c.reason) {
        Ok(pb::Reason::Unspecified) | Err(_) => "UNKNOWN",
        Ok(pb::Reason::Error) => EvalErrorCode::parse(&c.error_code).as_str(),
        Ok(r) => event_reason(reason_from_wire(r as i32), None),
    };
    SummaryCount {
        flag: &c.flag,
        variant: (!c.variant.is_empty()).then_some(c.variant.as_str()),
        reason,
        count: c.count,
    }
}

fn violation(got: &Kind, expected: &str) -> End {
    let name = pb::Frame {
        kind: Some(got.clone()),
    }
    .kind_name();
    refuse(
        ErrorCode::ProtocolViolation,
        format!("expected {expected}, got {name}"),
    )
}

impl Live {
    /// What answers a client frame on a live session: bytes to send, or the end.
    fn answer(
        &mut self,
        id: u64,
        now: Instant,
        kind: Kind,
        events: &Events,
    ) -> Result<Option<Bytes>, End> {
        match kind {
            Kind::Ack(ack) => {
                if let Some(s) = ack.selector {
                    self.env.ack(id, s.version);
                }
                Ok(None)
            }
            Kind::Fetch(fetch) => Ok(Some(self.catch_up(fetch.selector.map(Selector::from)))),
            Kind::Identify(identify) => {
                let Delivery::Evaluated(ev) = &mut self.delivery else {
                    return Err(refuse(
                        ErrorCode::ProtocolViolation,
                        "Identify in rules mode",
                    ));
                };
                let ctx = Context::parse(&identify.context)
                    .map_err(|e| refuse(ErrorCode::InvalidContext, e.to_string()))?;
                let sent = self.sent;
                let (frame, to) = self
                    .env
                    .with_history(|h| ev.identify(h, ctx, sent, identify.seq));
                self.sent = to;
                self.announced = to;
                Ok(Some(codec::encode(&frame)))
            }
            Kind::EvaluationSummary(summary) => {
                self.record_summary(now, summary, events);
                Ok(None)
            }
            other => Err(violation(
                &other,
                "Ack, Fetch, Identify or EvaluationSummary",
            )),
        }
    }

    /// Records the counts of a summary the client reported, within its budget, and only for
    /// flags and variants the environment has (a client cannot add names to the metrics). A
    /// summary nobody asked for is ignored: the frame is optional, and harmless.
    fn record_summary(&mut self, now: Instant, summary: pb::EvaluationSummary, events: &Events) {
        let Some(budget) = &mut self.summaries else {
            return;
        };
        let stats = events.stats();
        let granted = budget.take(now, summary.counts.len());
        let over = summary.counts.len() - granted;
        if over > 0 {
            stats.dropped_rate.fetch_add(over as u64, Ordering::Relaxed);
        }
        let window = (summary.start_ms, summary.end_ms);
        let mut unknown = 0u64;
        self.env.with_history(|h| {
            let known = summary.counts[..granted].iter().filter(|c| {
                let exists = h.flag(&c.flag).is_some_and(|f| {
                    c.variant.is_empty() || f.wire.variants.iter().any(|v| v.name == c.variant)
                });
                unknown += u64::from(!exists);
                exists && c.count > 0
            });
            events.record_summary(self.env.name(), window, known.map(summary_count));
        });
        if unknown > 0 {
            stats.dropped_unknown.fetch_add(unknown, Ordering::Relaxed);
        }
    }

    /// The cheapest frame that brings a client at `client` current (encoded); the session is
    /// then at the environment's selector.
    fn catch_up(&mut self, client: Option<Selector>) -> Bytes {
        let (frame, to) = match &mut self.delivery {
            Delivery::Rules => self
                .env
                .with_history(|h| (h.catch_up(client), h.selector())),
            Delivery::Evaluated(ev) => self.env.with_history(|h| ev.catch_up(h, client)),
        };
        self.sent = to;
        self.announced = to;
        codec::encode(&frame)
    }

    /// A relay's session: the environment's `Keys` frame, if it changed since it was last sent.
    fn keys_bytes(&mut self, published: &Published) -> Option<Bytes> {
        let sent = self.relay.as_mut()?;
        if *sent == published.keys_generation {
            return None;
        }
        *sent = published.keys_generation;
        Some(published.keys.clone())
    }

    /// The one push decision: whatever brings the client current with what the environment
    /// published, in its delivery and push mode; nothing if it is current.
    fn push_bytes(&mut self, published: &Published) -> Option<Bytes> {
        if self.push == pb::PushMode::Notify {
            if published.selector == self.announced {
                return None;
            }
            self.announced = published.selector;
            return Some(published.notice.clone());
        }
        match &mut self.delivery {
            Delivery::Evaluated(ev) => {
                let sent = self.sent;
                let (frame, to) = self.env.with_history(|h| ev.push(h, sent))?;
                self.sent = to;
                Some(codec::encode(&frame))
            }
            Delivery::Rules => {
                // The shared bytes if the session is right behind the change; one merged
                // delta if it fell further behind.
                let (next, sent) = (published.selector, self.sent);
                if next == sent {
                    None
                } else if next.epoch == sent.epoch
                    && next.version == sent.version + 1
                    && !published.delta.is_empty()
                {
                    self.sent = next;
                    Some(published.delta.clone())
                } else {
                    Some(self.catch_up(Some(sent)))
                }
            }
        }
    }
}
