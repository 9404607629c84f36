//! One client session, on any byte stream (a QUIC bidirectional stream or a TLS connection):
//! Hello → Welcome → catch-up, then pushes, pings and the client's Acks and Fetches until one
//! side leaves.
//!
//! Every way a session ends is logged with its reason, and every error the client caused is
//! answered with an `Error` frame first. Writes are bounded by a timeout: a client that stops
//! reading is dropped instead of holding memory.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, MissedTickBehavior, interval_at, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use vane_core::eval::Context;
use vane_core::history::EnvHistory;
use vane_core::protocol::Selector;
use vane_core::protocol::Transport;
use vane_core::wire::{FrameReader, ReadError, write_encoded};
use vane_proto::codec::{self, DecodeError};
use vane_proto::v1::{self as pb, ErrorCode, frame::Kind};

use crate::hub::{EnvHub, Grant, Hub, Published};

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
    /// Largest frame accepted from a client.
    pub max_client_frame_len: usize,
}

/// How a session ended, for the log.
#[derive(Debug)]
enum End {
    /// The client closed the stream.
    ClientClosed,
    /// The transport failed.
    Transport(String),
    /// The session was refused or ended with this error frame, sent to the client.
    Error(ErrorCode, String),
    /// The server is shutting down; GoAway was sent.
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

fn frame_error(code: ErrorCode, message: impl Into<String>, retry_after: Duration) -> pb::Frame {
    pb::Error {
        code: code.into(),
        message: message.into(),
        retry_after_ms: ms(retry_after),
    }
    .into()
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Runs a session to its end. The caller closes the transport afterwards.
pub async fn run<S>(
    stream: &mut S,
    transport: Transport,
    hub: &Hub,
    config: &SessionConfig,
    shutdown: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let id = hub.next_session_id();
    let _counted = hub.count_session(transport);
    let (rd, wr) = tokio::io::split(stream);
    let mut s = Session {
        id,
        rd,
        wr,
        reader: FrameReader::new(config.max_client_frame_len),
        config,
        env: None,
    };
    let end = s.serve(hub, shutdown).await;
    if let Some(env) = &s.env {
        env.session_ended(id);
    }
    match &end {
        // Clients come and go all the time (mobile networks especially): not worth an info line.
        End::ClientClosed | End::Shutdown | End::Transport(_) => {
            debug!(session = id, %transport, reason = %end, "session ended")
        }
        End::Error(..) => {
            warn!(session = id, %transport, reason = %end, "session ended with an error")
        }
    }
    if let End::Error(code, message) = end {
        let frame = frame_error(code, message, retry_after_for(code));
        let _ = timeout(
            config.write_timeout,
            write_encoded(&mut s.wr, &codec::encode(&frame)),
        )
        .await;
    }
    let _ = timeout(config.write_timeout, s.wr.shutdown()).await;
}

fn retry_after_for(code: ErrorCode) -> Duration {
    match code {
        ErrorCode::Initializing | ErrorCode::EnvironmentNotReady => Duration::from_secs(1),
        _ => Duration::ZERO,
    }
}

/// A session past its opening.
struct Live {
    grant: Arc<Grant>,
    env: Arc<EnvHub>,
    mode: Mode,
    push: pb::PushMode,
    changes: tokio::sync::watch::Receiver<Published>,
    /// What this client has been brought to (evaluated mode: the version at which its values
    /// were last brought current; changes that alter none of its values do not advance it).
    sent: Selector,
}

struct Session<'a, R, W> {
    id: u64,
    rd: R,
    wr: W,
    reader: FrameReader,
    config: &'a SessionConfig,
    env: Option<Arc<EnvHub>>,
}

impl<R, W> Session<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn serve(&mut self, hub: &Hub, shutdown: &CancellationToken) -> End {
        // Two steps, so that what the opening needs (the Hello, the Welcome) is not kept in
        // the session's memory while it streams, for hours.
        let mut live = match self.open(hub, shutdown).await {
            Ok(live) => live,
            Err(end) => return end,
        };
        self.stream(&mut live, shutdown).await
    }

    /// Hello → Welcome → catch-up.
    async fn open(&mut self, hub: &Hub, shutdown: &CancellationToken) -> Result<Live, End> {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Err(self.go_away().await),
            r = timeout(self.config.hello_timeout, self.reader.read(&mut self.rd)) => r,
        };
        let hello = match first {
            Err(_) => return Err(End::Error(ErrorCode::Timeout, "no Hello in time".into())),
            Ok(r) => match self.frame(r)? {
                Some(Kind::Hello(h)) => h,
                other => return Err(violation(other.as_ref(), "Hello")),
            },
        };
        let (live, welcome, catch_up) = self.greet(hub, hello)?;
        self.send(&welcome).await?;
        self.send(&catch_up).await?;
        Ok(live)
    }

    /// Answers a Hello: the session's state, the Welcome and the catch-up to send.
    fn greet(&mut self, hub: &Hub, hello: pb::Hello) -> Result<(Live, Bytes, Bytes), End> {
        let (grant, env) = authorize(hub, &hello)?;
        self.env = Some(env.clone());
        let push = hello.push();
        let mut mode = match hello.mode() {
            pb::DeliveryMode::Evaluated => match Context::parse(&hello.context) {
                Ok(ctx) => Mode::Evaluated(Evaluated::new(ctx)),
                Err(e) => return Err(End::Error(ErrorCode::InvalidContext, e.to_string())),
            },
            _ => Mode::Rules,
        };
        debug!(session = self.id, env = env.name(), sdk = %hello.sdk_name, version = %hello.sdk_version, "hello");

        // Subscribe before catching up: a change committed in between is then either in the
        // catch-up or seen as a change, never lost.
        let changes = env.subscribe();
        let welcome = codec::encode(
            &pb::Welcome {
                session_id: format!("{:x}", self.id),
                heartbeat_interval_ms: ms(self.config.heartbeat),
                max_client_frame_len: u32::try_from(self.config.max_client_frame_len)
                    .unwrap_or(u32::MAX),
                max_server_frame_len: u32::try_from(codec::DEFAULT_MAX_FRAME_LEN)
                    .unwrap_or(u32::MAX),
                server_version: env!("CARGO_PKG_VERSION").into(),
                environment: env.name().to_owned(),
            }
            .into(),
        );
        let (catch_up, sent) = catch_up(&env, &mut mode, hello.selector.map(Selector::from));
        let live = Live {
            grant,
            env,
            mode,
            push,
            changes,
            sent,
        };
        Ok((live, welcome, catch_up))
    }

    /// Pushes, pings, and the client's frames, until one side leaves.
    ///
    /// Every branch only works out what to send; the one write after it keeps the session's
    /// future (its memory for as long as the client stays) small.
    async fn stream(&mut self, live: &mut Live, shutdown: &CancellationToken) -> End {
        let Live {
            grant,
            env,
            mode,
            changes,
            ..
        } = live;
        let (push, mut sent) = (live.push, live.sent);
        let mut announced = sent;

        let start = Instant::now() + self.config.heartbeat;
        let mut ping = interval_at(start, self.config.heartbeat);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let silence_limit = self.config.heartbeat * vane_core::protocol::MISSED_HEARTBEATS;

        // Made once: recreated on every pass they would re-register with tokens that every
        // session of the server (or of the environment) waits on, at each push.
        let mut stopping = std::pin::pin!(shutdown.cancelled());
        let mut revoked = std::pin::pin!(grant.ended());
        loop {
            let out: Result<Option<Bytes>, End> = tokio::select! {
                biased;
                _ = &mut stopping => return self.go_away().await,
                _ = &mut revoked => Err(End::Error(
                    ErrorCode::Unauthenticated,
                    grant.revoked().map_or_else(|| "SDK key revoked".into(), |why| why.to_string()),
                )),
                r = changes.changed() => match r {
                    Err(_) => Err(End::Error(ErrorCode::Internal, "environment closed".into())),
                    Ok(()) => {
                        let published = changes.borrow_and_update().clone();
                        let next = match (&mut *mode, push) {
                            (Mode::Evaluated(ev), pb::PushMode::Delta) => env
                                .with_history(|h| ev.push(h, sent))
                                .map(|(frame, to)| (codec::encode(&frame), to)),
                            (Mode::Rules, pb::PushMode::Delta) => rules_push(env, &published, sent),
                            (_, pb::PushMode::Notify) if published.selector != announced => {
                                announced = published.selector;
                                Some((published.notice, sent))
                            }
                            (_, pb::PushMode::Notify) => None,
                        };
                        Ok(next.map(|(bytes, to)| {
                            sent = to;
                            bytes
                        }))
                    }
                },
                _ = ping.tick() => {
                    self.reader.shrink_if_idle();
                    if last_heard.elapsed() > silence_limit {
                        Err(End::Error(ErrorCode::Timeout, format!("no frame from the client in {silence_limit:?}")))
                    } else {
                        // Bring a lagging rules-mode session current first, so the Ping never
                        // announces a version whose delta is still to come on this stream.
                        let mut lag = None;
                        if matches!(mode, Mode::Rules) && push == pb::PushMode::Delta && env.selector() != sent {
                            let published = changes.borrow_and_update().clone();
                            if let Some((bytes, to)) = rules_push(env, &published, sent) {
                                sent = to;
                                lag = Some(bytes);
                            }
                        }
                        let at = match (&*mode, push) {
                            (Mode::Evaluated(_), pb::PushMode::Delta) => sent,
                            _ => env.selector(),
                        };
                        let ping = codec::encode(&pb::Ping { selector: Some(at.into()) }.into());
                        Ok(Some(match lag {
                            Some(lag) => [lag, ping].concat().into(),
                            None => ping,
                        }))
                    }
                }
                r = self.reader.read(&mut self.rd) => {
                    last_heard = Instant::now();
                    match self.frame(r) {
                        Ok(Some(Kind::Ack(a))) => {
                            if let Some(sel) = a.selector {
                                env.ack(self.id, sel.version);
                            }
                            Ok(None)
                        }
                        Ok(Some(Kind::Fetch(f))) => {
                            let (bytes, to) = catch_up(env, mode, f.selector.map(Selector::from));
                            sent = to;
                            announced = to;
                            Ok(Some(bytes))
                        }
                        Ok(Some(Kind::Identify(i))) => match (&mut *mode, Context::parse(&i.context)) {
                            (Mode::Rules, _) => Err(End::Error(ErrorCode::ProtocolViolation, "Identify in rules mode".into())),
                            (_, Err(e)) => Err(End::Error(ErrorCode::InvalidContext, e.to_string())),
                            (Mode::Evaluated(ev), Ok(ctx)) => {
                                let (frame, to) = env.with_history(|h| ev.identify(h, ctx, sent, i.seq));
                                sent = to;
                                announced = to;
                                Ok(Some(codec::encode(&frame)))
                            }
                        },
                        Ok(None) => Ok(None), // a frame kind from a newer protocol: skipped
                        Ok(other) => Err(violation(other.as_ref(), "Ack, Fetch or Identify")),
                        Err(end) => Err(end),
                    }
                }
            };
            match out {
                Ok(Some(bytes)) => {
                    if let Err(end) = self.send(&bytes).await {
                        return end;
                    }
                }
                Ok(None) => {}
                Err(end) => return end,
            }
        }
    }

    /// Tells the client the server is leaving and when to come back.
    async fn go_away(&mut self) -> End {
        let go_away = codec::encode(
            &pb::GoAway {
                reason: pb::GoAwayReason::Shutdown.into(),
                reconnect_within_ms: ms(self.config.goaway_window),
                message: "server shutting down".into(),
            }
            .into(),
        );
        let _ = self.send(&go_away).await;
        End::Shutdown
    }

    /// Interprets a read: `Ok(None)` is a frame of a kind this version does not know.
    fn frame(&self, r: Result<Option<pb::Frame>, ReadError>) -> Result<Option<Kind>, End> {
        match r {
            Ok(Some(frame)) => Ok(frame.kind),
            Ok(None) => Err(End::ClientClosed),
            Err(ReadError::Decode(DecodeError::TooLarge { len, max })) => Err(End::Error(
                ErrorCode::FrameTooLarge,
                format!("frame of {len} bytes exceeds the limit of {max} bytes"),
            )),
            Err(ReadError::Decode(e)) => Err(End::Error(ErrorCode::MalformedFrame, e.to_string())),
            Err(ReadError::Io(e)) => Err(End::Transport(e.to_string())),
            Err(e) => Err(End::Transport(e.to_string())),
        }
    }

    async fn send(&mut self, bytes: &Bytes) -> Result<(), End> {
        match timeout(
            self.config.write_timeout,
            write_encoded(&mut self.wr, bytes),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Transport(e.to_string())),
            // Logged at warn, and the client is told (if it ever reads again): the operator
            // should see sessions dropped for not reading.
            Err(_) => Err(End::Error(
                ErrorCode::Timeout,
                format!(
                    "client did not read for {:?}; dropped",
                    self.config.write_timeout
                ),
            )),
        }
    }
}

/// The cheapest frame that brings a client at `client` current, encoded, and where it brings it.
fn catch_up(env: &EnvHub, mode: &mut Mode, client: Option<Selector>) -> (Bytes, Selector) {
    let (frame, selector) = match mode {
        Mode::Rules => env.with_history(|h| (h.catch_up(client), h.selector())),
        Mode::Evaluated(ev) => env.with_history(|h| ev.catch_up(h, client)),
    };
    (codec::encode(&frame), selector)
}

/// What delivers a published change to a rules-mode session at `sent`, and where it brings
/// it: the shared bytes if the session is right behind the change, one merged delta if it fell
/// further behind; nothing if it has the change.
fn rules_push(env: &EnvHub, published: &Published, sent: Selector) -> Option<(Bytes, Selector)> {
    let next = published.selector;
    if next == sent {
        return None;
    }
    if next.epoch == sent.epoch && next.version == sent.version + 1 && !published.delta.is_empty() {
        return Some((published.delta.clone(), next));
    }
    Some(catch_up(env, &mut Mode::Rules, Some(sent)))
}

fn violation(got: Option<&Kind>, expected: &str) -> End {
    let name = pb::Frame { kind: got.cloned() }.kind_name();
    End::Error(
        ErrorCode::ProtocolViolation,
        format!("expected {expected}, got {name}"),
    )
}

/// Checks a Hello: readiness, version, key and mode.
fn authorize(hub: &Hub, hello: &pb::Hello) -> Result<(Arc<Grant>, Arc<EnvHub>), End> {
    if !hub.is_ready() {
        return Err(End::Error(
            ErrorCode::Initializing,
            "server is loading its state".into(),
        ));
    }
    if hello.protocol_version != vane_proto::PROTOCOL_VERSION {
        return Err(End::Error(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported (this server speaks {})",
                hello.protocol_version,
                vane_proto::PROTOCOL_VERSION
            ),
        ));
    }
    let grant = hub.authenticate(&hello.sdk_key).ok_or_else(|| {
        End::Error(
            ErrorCode::Unauthenticated,
            "unknown or revoked SDK key".into(),
        )
    })?;
    grant
        .kind
        .allows(hello.mode())
        .map_err(|denied| End::Error(ErrorCode::PermissionDenied, denied.to_string()))?;
    let env = hub.env(&grant.env).ok_or_else(|| {
        End::Error(
            ErrorCode::EnvironmentNotReady,
            format!("environment {:?} is not loaded", grant.env),
        )
    })?;
    Ok((grant, env))
}

/// What a session delivers.
enum Mode {
    /// Flag definitions; the client evaluates.
    Rules,
    /// Values evaluated here for the client's context.
    Evaluated(Evaluated),
}

/// An evaluated-mode session's state: its context, and a hash of what it was told per flag,
/// so a change is pushed only to the sessions whose values it alters.
struct Evaluated {
    ctx: Context,
    told: HashMap<String, u64>,
}

impl Evaluated {
    fn new(ctx: Context) -> Evaluated {
        Evaluated {
            ctx,
            told: HashMap::new(),
        }
    }

    /// Evaluates `key` and records it as told; `None` if the flag does not exist.
    fn tell(&mut self, h: &EnvHistory, key: &str) -> Option<(pb::EvaluatedFlag, u64)> {
        let (wire, hash) = h.evaluated(h.flag(key)?, &self.ctx);
        self.told.insert(key.to_owned(), hash);
        Some((wire, hash))
    }

    /// Every flag's value, and the selector it is at.
    fn snapshot(&mut self, h: &EnvHistory, reason: pb::SnapshotReason) -> (pb::Frame, Selector) {
        self.told.clear();
        let mut values = Vec::new();
        for e in h.flags() {
            let (wire, hash) = h.evaluated(e, &self.ctx);
            self.told.insert(e.wire.key.clone(), hash);
            values.push(wire);
        }
        let snapshot = pb::Snapshot {
            selector: Some(h.selector().into()),
            reason: reason.into(),
            values,
            ..Default::default()
        };
        (snapshot.into(), h.selector())
    }

    /// Brings a client that holds values for this context at `client` current.
    fn catch_up(&mut self, h: &EnvHistory, client: Option<Selector>) -> (pb::Frame, Selector) {
        let from = match h.resumable(client) {
            Ok(from) => from,
            Err(reason) => return self.snapshot(h, reason),
        };
        let current = h.selector();
        let affected = h
            .changed_since(from)
            .map(|changed| h.affected_flags(&changed))
            .expect("resumable() checked the window");
        // Flags untouched since `from` evaluate now as they did then: what the client holds.
        // One evaluation per flag: its hash is recorded, its value sent if it may have changed.
        self.told.clear();
        let mut values = Vec::new();
        for e in h.flags() {
            let (wire, hash) = h.evaluated(e, &self.ctx);
            self.told.insert(e.wire.key.clone(), hash);
            if affected.contains(&e.wire.key) {
                values.push(wire);
            }
        }
        if from == current.version {
            return (
                pb::UpToDate {
                    selector: Some(current.into()),
                }
                .into(),
                current,
            );
        }
        let delta = pb::Delta {
            epoch: current.epoch,
            from_version: from,
            to_version: current.version,
            values,
            deletes: affected
                .into_iter()
                .filter(|k| h.flag(k).is_none())
                .collect(),
            ..Default::default()
        };
        (delta.into(), current)
    }

    /// The values that differ from what the client was told, among `keys` (all flags, and all
    /// told, when `None`), recorded as told; and the told flags that no longer exist.
    fn diff(
        &mut self,
        h: &EnvHistory,
        keys: Option<BTreeSet<String>>,
    ) -> (Vec<pb::EvaluatedFlag>, Vec<String>) {
        let keys = keys.unwrap_or_else(|| {
            h.flags()
                .map(|e| e.wire.key.clone())
                .chain(self.told.keys().cloned())
                .collect()
        });
        let (mut values, mut deletes) = (Vec::new(), Vec::new());
        for key in keys {
            let before = self.told.get(&key).copied();
            match self.tell(h, &key) {
                Some((wire, hash)) if before != Some(hash) => values.push(wire),
                Some(_) => {}
                None => {
                    if self.told.remove(&key).is_some() {
                        deletes.push(key);
                    }
                }
            }
        }
        (values, deletes)
    }

    /// After a change: the delta of this context's values since `sent`, if any differ.
    fn push(&mut self, h: &EnvHistory, sent: Selector) -> Option<(pb::Frame, Selector)> {
        let current = h.selector();
        if current == sent {
            return None;
        }
        let affected = h
            .changed_since(sent.version)
            .filter(|_| sent.epoch == current.epoch)
            .map(|c| h.affected_flags(&c));
        let (values, deletes) = self.diff(h, affected);
        if values.is_empty() && deletes.is_empty() {
            return None;
        }
        Some((delta(sent, current, values, deletes, 0), current))
    }

    /// Switches to `ctx`: the delta of values that differ, always sent, answering `seq`.
    fn identify(
        &mut self,
        h: &EnvHistory,
        ctx: Context,
        sent: Selector,
        seq: u32,
    ) -> (pb::Frame, Selector) {
        self.ctx = ctx;
        let (values, deletes) = self.diff(h, None);
        let current = h.selector();
        (delta(sent, current, values, deletes, seq), current)
    }
}

/// An evaluated-mode Delta from `sent` to `current`, answering Identify `seq` (0: none).
fn delta(
    sent: Selector,
    current: Selector,
    values: Vec<pb::EvaluatedFlag>,
    deletes: Vec<String>,
    seq: u32,
) -> pb::Frame {
    pb::Delta {
        epoch: current.epoch,
        from_version: sent.version,
        to_version: current.version,
        values,
        deletes,
        identify_seq: seq,
        ..Default::default()
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn config() -> SessionConfig {
        SessionConfig {
            heartbeat: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            goaway_window: Duration::from_secs(5),
            max_client_frame_len: codec::DEFAULT_MAX_CLIENT_FRAME_LEN,
        }
    }

    #[tokio::test]
    async fn before_the_state_is_loaded_sessions_are_told_to_retry() {
        let hub = Hub::new(10); // never loaded
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let hello: pb::Frame = pb::Hello {
            protocol_version: 1,
            sdk_key: "vane_srv_any".into(),
            ..Default::default()
        }
        .into();
        client.write_all(&codec::encode(&hello)).await.unwrap();
        let shutdown = CancellationToken::new();
        run(&mut server, Transport::Tcp, &hub, &config(), &shutdown).await;
        let frame = FrameReader::new(codec::DEFAULT_MAX_FRAME_LEN)
            .read(&mut client)
            .await
            .unwrap()
            .unwrap();
        let Some(Kind::Error(e)) = frame.kind else {
            panic!("expected an Error, got {}", frame.kind_name())
        };
        assert_eq!(e.code(), ErrorCode::Initializing);
        assert_eq!(e.retry_after_ms, 1000);
    }
}
