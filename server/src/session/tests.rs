//! Deterministic protocol tests: the real server [`Session`] against the client's real
//! [`SyncMachine`], joined by an in-memory link with a fake clock and knobs for delay, frame
//! loss and a dead path. The server side runs on a real [`Hub`], fed committed log entries as
//! the store feeds it. No sockets, no sleeps: time moves only when a test moves it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vane_core::eval::Context;
use vane_core::history::{ItemKind, Write};
use vane_core::model::{Flag, FlagValue, Segment};
use vane_core::protocol::{MISSED_HEARTBEATS, Selector};
use vane_core::state::FlagSet;
use vane_core::summary::{EvaluationCounts, MAX_SUMMARY_COUNTS};
use vane_core::sync::{
    DisconnectReason, Event, Fatal, Output, SyncConfig, SyncMachine, Update, UpdateKind,
};
use vane_proto::codec;
use vane_proto::v1::{self as pb, ErrorCode, frame::Kind};

use super::*;
use crate::hub::Hub;
use crate::keys::{self, KeyKind, NewKey};
use crate::store::{Loaded, LoadedEnv};

const HEARTBEAT: Duration = Duration::from_secs(10);
const EPOCH: u64 = 0xe1;
const ENV: &str = "test";

/// What one direction of the link carries, each item due at an instant.
type Queue<T> = VecDeque<(Instant, T)>;

/// One connection: the server's session and what is in flight both ways.
struct Link {
    session: Session,
    subscription: Option<Subscription>,
    to_server: Queue<Bytes>,
    to_client: Queue<pb::Frame>,
    /// The server closed its end once everything before this instant has arrived.
    server_closed: Option<Instant>,
}

/// A client machine and a server (hub and sessions) joined by an in-memory link.
struct Pair {
    now: Instant,
    hub: Arc<Hub>,
    config: Arc<SessionConfig>,
    client: SyncMachine,
    link: Option<Link>,
    server_key: NewKey,
    mobile_key: NewKey,
    /// One-way latency of the link.
    delay: Duration,
    /// Probability that a server→client frame is lost (a faulty path; TLS and QUIC never do
    /// this, but the client must not be wrong when it happens).
    loss: f64,
    /// Server→client frames still to lose, whatever `loss` says.
    lose_next: usize,
    /// Both directions silently drop everything: a path that died without a word.
    blackhole: bool,
    /// Client→server frames are dropped (the client hears the server, not the other way).
    mute_client: bool,
    rng: StdRng,
    next_session: u64,
    /// Every event the client emitted.
    events: Vec<Event>,
    /// Kinds of the frames the server received, in order.
    server_saw: Vec<&'static str>,
    /// Kinds of the frames delivered to the client, in order.
    client_saw: Vec<&'static str>,
    /// How every server session ended.
    ends: Vec<End>,
    connects: u32,
    /// The client's evaluation counts, kept as its driver keeps them.
    counts: EvaluationCounts,
    /// When the pair was made (the client's wall clock starts at 1_700_000_000_000 ms then).
    started: Instant,
    /// A relay's client: where what it applies goes.
    mirror: Option<Arc<dyn vane_core::client::Mirror>>,
}

fn flag(key: &str, on: bool) -> Flag {
    Flag::boolean(key, on, true)
}

fn hub(window: usize, ready: bool, keys: &[&NewKey]) -> Arc<Hub> {
    let hub = Arc::new(Hub::new(window));
    if ready {
        hub.load(Loaded {
            envs: vec![LoadedEnv {
                name: ENV.into(),
                selector: Selector {
                    epoch: EPOCH,
                    version: 0,
                },
                items: Vec::new(),
                changes: Vec::new(),
                state: crate::store::EnvState::Ready,
                retention: crate::store::Retention::default(),
            }],
            keys: keys.iter().map(|k| k.record.clone()).collect(),
            ..Loaded::default()
        });
    }
    hub
}

impl Pair {
    fn new(flags: &[Flag]) -> Pair {
        Pair::with(flags, 1000, |_| {})
    }

    /// A pair whose environment keeps `window` changes, with the client's settings tweaked.
    fn with(flags: &[Flag], window: usize, tweak: impl FnOnce(&mut SyncConfig)) -> Pair {
        let server_key = keys::mint(ENV, KeyKind::Server, 0);
        let mobile_key = keys::mint(ENV, KeyKind::Mobile, 0);
        let mut sync = SyncConfig::new(server_key.secret.clone());
        tweak(&mut sync);
        let config = SessionConfig {
            heartbeat: HEARTBEAT,
            ..SessionConfig::default()
        };
        let now = Instant::now();
        let mut pair = Pair {
            now,
            counts: EvaluationCounts::default(),
            started: now,
            hub: hub(window, true, &[&server_key, &mobile_key]),
            config: Arc::new(config),
            client: SyncMachine::new(sync, FlagSet::default(), None, 7),
            link: None,
            server_key,
            mobile_key,
            delay: Duration::ZERO,
            loss: 0.0,
            lose_next: 0,
            blackhole: false,
            mute_client: false,
            rng: StdRng::seed_from_u64(11),
            next_session: 1,
            events: Vec::new(),
            server_saw: Vec::new(),
            client_saw: Vec::new(),
            ends: Vec::new(),
            connects: 0,
            mirror: None,
        };
        for f in flags {
            pair.commit(Write::flag(f.clone()).unwrap());
        }
        pair
    }

    /// A client in evaluated mode with the mobile key, for `context`.
    fn evaluated(flags: &[Flag], segments: &[Segment], context: &str) -> Pair {
        let mut p = Pair::with(&[], 1000, |_| {});
        let mut sync = SyncConfig::new(p.mobile_key.secret.clone());
        sync.mode = pb::DeliveryMode::Evaluated;
        sync.context = Context::parse(context).unwrap();
        p.client = SyncMachine::new(sync, FlagSet::default(), None, 7);
        for s in segments {
            p.commit(Write::segment(s.clone()).unwrap());
        }
        for f in flags {
            p.commit(Write::flag(f.clone()).unwrap());
        }
        p
    }

    fn env(&self) -> Arc<crate::hub::EnvHub> {
        self.hub.env(ENV).expect("the environment is loaded")
    }

    /// Commits a change as the store would, and lets both sides react.
    fn commit(&mut self, write: Write) -> u64 {
        let env = self.env();
        let version = env.selector().version + 1;
        let epoch = env.selector().epoch;
        env.apply(epoch, write.into_change(version));
        self.run();
        version
    }

    fn change(&mut self, f: Flag) -> u64 {
        self.commit(Write::flag(f).unwrap())
    }

    /// Opens a connection: a new server session, and the client's Hello.
    fn connect(&mut self) {
        assert!(
            self.client.wants_connect(self.now),
            "client does not want to connect yet"
        );
        let session = Session::new(self.next_session, self.config.clone(), self.now);
        self.next_session += 1;
        self.link = Some(Link {
            session,
            subscription: None,
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            server_closed: None,
        });
        self.connects += 1;
        self.client.on_connected(self.now);
        self.run();
    }

    /// Steps both sides until neither has anything left to do now.
    fn run(&mut self) {
        for _ in 0..10_000 {
            if !self.step() {
                return;
            }
        }
        panic!("pair did not settle");
    }

    fn step(&mut self) -> bool {
        let now = self.now;
        let mut busy = false;
        while let Some(out) = self.client.poll_output() {
            busy = true;
            match out {
                Output::Transmit(frame) => {
                    if let Some(link) = &mut self.link
                        && !self.blackhole
                        && !self.mute_client
                    {
                        link.to_server
                            .push_back((now + self.delay, codec::encode(&frame)));
                    }
                }
                Output::Event(e) => {
                    if let Event::Welcomed { summaries, .. } = &e {
                        self.counts.set_on(summaries.is_some(), self.wall_ms());
                    }
                    self.events.push(e);
                }
                Output::Mirror(what) => {
                    if let Some(mirror) = &self.mirror {
                        mirror.mirrored(what);
                    }
                }
                // The client closed: the server reads the end of the stream.
                Output::Close => self.close_link(|s| s.handle_eof(now)),
                Output::Summarize => {
                    let window = self.counts.take(self.wall_ms());
                    if let Err(window) = self.client.send_summary(window) {
                        self.counts.restore(window);
                    }
                }
            }
        }
        let Some(link) = &mut self.link else {
            return busy;
        };
        while link.to_server.front().is_some_and(|(at, _)| *at <= now) {
            busy = true;
            let (_, bytes) = link.to_server.pop_front().expect("checked");
            let mut copy = BytesMut::from(&bytes[..]);
            while let Ok(Some(frame)) = codec::decode(&mut copy, usize::MAX) {
                self.server_saw.push(frame.kind_name());
            }
            link.session.handle_input(now, &bytes, &self.hub);
        }
        if let Some(sub) = link.subscription.as_mut() {
            if sub.changes.has_changed().unwrap_or(false) {
                busy = true;
                let published = sub.changes.borrow_and_update().clone();
                link.session.handle_change(now, &published);
            }
            if sub.grant.revoked().is_some() && link.session.end().is_none() {
                busy = true;
                link.session.handle_revoked(now);
            }
        }
        if let Some(sub) = link.session.take_subscription() {
            busy = true;
            link.subscription = Some(sub);
        }
        while let Some(bytes) = link.session.poll_transmit() {
            busy = true;
            let mut buf = BytesMut::from(&bytes[..]);
            while let Some(frame) =
                codec::decode(&mut buf, usize::MAX).expect("server frames decode")
            {
                let lost = self.lose_next > 0 || self.rng.random_bool(self.loss);
                self.lose_next = self.lose_next.saturating_sub(1);
                if !lost && !self.blackhole {
                    link.to_client.push_back((now + self.delay, frame));
                }
            }
        }
        if link.session.end().is_some() && link.server_closed.is_none() {
            busy = true;
            link.server_closed = Some(now + self.delay);
            self.ends.extend(link.session.end().cloned());
        }
        while link.to_client.front().is_some_and(|(at, _)| *at <= now) {
            busy = true;
            let (_, frame) = link.to_client.pop_front().expect("checked");
            self.client_saw.push(frame.kind_name());
            self.client.on_frame(now, frame);
        }
        if link.to_client.is_empty() && link.server_closed.is_some_and(|at| at <= now) {
            // Everything the server sent has arrived; then the stream ends.
            self.link = None;
            self.client.on_disconnected(
                now,
                DisconnectReason::Transport("server closed the connection".into()),
            );
            busy = true;
        }
        busy
    }

    /// The client's wall clock, in Unix milliseconds.
    fn wall_ms(&self) -> u64 {
        1_700_000_000_000 + (self.now - self.started).as_millis() as u64
    }

    /// The client's getter evaluating `key` `times` times, counted as the client counts.
    fn evaluate(&self, key: &str, times: usize) {
        let ctx = self.client.context().clone();
        for _ in 0..times {
            self.counts
                .count(key, &self.client.flags().evaluate(key, &ctx));
        }
    }

    /// Drops the connection after telling the server's session how it ended.
    fn close_link(&mut self, tell: impl FnOnce(&mut Session)) {
        if let Some(mut link) = self.link.take() {
            tell(&mut link.session);
            if let Some(end) = link.session.end()
                && link.server_closed.is_none()
            {
                self.ends.push(end.clone());
            }
        }
    }

    /// The transport breaks under both sides.
    fn cut(&mut self) {
        let now = self.now;
        self.close_link(|s| s.handle_transport_error(now, "reset".into()));
        self.client
            .on_disconnected(now, DisconnectReason::Transport("reset".into()));
        self.run();
    }

    /// The next instant something is due: a timer of either side, or a frame in flight.
    fn next_due(&self) -> Option<Instant> {
        let link = self.link.as_ref();
        [
            self.client.poll_timeout(),
            link.and_then(|l| l.session.poll_timeout()),
            link.and_then(|l| l.to_server.front().map(|(at, _)| *at)),
            link.and_then(|l| l.to_client.front().map(|(at, _)| *at)),
            link.and_then(|l| l.server_closed),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Lets `d` pass, firing every timer and delivering every frame due on the way.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(at) = self.next_due().filter(|at| *at <= end) {
            self.now = self.now.max(at);
            self.fire_due();
        }
        self.now = end;
        self.fire_due();
    }

    /// Moves the clock to the client's next deadline (firing what comes before it).
    fn until_client_deadline(&mut self) {
        let at = self.client.poll_timeout().expect("client has a deadline");
        let d = at.saturating_duration_since(self.now);
        self.advance(d);
    }

    fn fire_due(&mut self) {
        let now = self.now;
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.on_timeout(now);
        }
        if let Some(link) = &mut self.link
            && link.session.poll_timeout().is_some_and(|t| t <= now)
        {
            link.session.handle_timeout(now);
        }
        self.run();
    }

    fn updates(&self) -> Vec<&Update> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Updated(u) => Some(u),
                _ => None,
            })
            .collect()
    }

    fn last_update(&self) -> &Update {
        self.updates().pop().expect("an update")
    }

    fn last_disconnect(&self) -> (&DisconnectReason, Duration) {
        self.events
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::Disconnected {
                    reason,
                    reconnect_in,
                } => Some((reason, *reconnect_in)),
                _ => None,
            })
            .expect("a disconnect")
    }

    fn client_value(&self, key: &str) -> Option<FlagValue> {
        let flags = self.client.flags();
        flags.evaluate(key, &Context::default()).value.cloned()
    }

    fn client_bool(&self, key: &str) -> Option<bool> {
        match self.client_value(key)? {
            FlagValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn count(seen: &[&str], kind: &str) -> usize {
        seen.iter().filter(|k| **k == kind).count()
    }
}

#[test]
fn first_connect_gets_a_snapshot() {
    let mut p = Pair::new(&[flag("a", true), flag("b", false)]);
    p.connect();
    let u = p.last_update();
    assert_eq!(u.kind, UpdateKind::Snapshot);
    assert_eq!(
        u.selector,
        Selector {
            epoch: EPOCH,
            version: 2
        }
    );
    assert_eq!(u.changed, vec!["a", "b"]);
    assert_eq!(p.client_bool("a"), Some(true));
    assert_eq!(p.client_bool("b"), Some(false));
    assert_eq!(p.server_saw, vec!["Hello", "Ack"]);
    assert_eq!(p.client_saw, vec!["Welcome", "Snapshot"]);
    assert_eq!(p.env().propagation().current, 1, "the ack reached the hub");
}

#[test]
fn a_pushed_delta_is_applied_and_acked() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.change(flag("a", false));
    let u = p.last_update();
    assert_eq!((u.kind, u.selector.version), (UpdateKind::Delta, 2));
    assert_eq!(u.changed, vec!["a"]);
    assert_eq!(p.client_bool("a"), Some(false));
    assert_eq!(p.server_saw.last(), Some(&"Ack"));
    assert_eq!(p.env().propagation().by_version.get(&2), Some(&1));
}

#[test]
fn a_reconnect_resumes_by_delta() {
    let mut p = Pair::new(&[flag("a", true), flag("b", true)]);
    p.connect();
    p.cut();
    p.change(flag("a", false)); // committed while the client is away
    p.until_client_deadline(); // backoff over
    p.connect();
    let u = p.last_update();
    assert_eq!(u.kind, UpdateKind::Delta);
    assert_eq!(u.changed, vec!["a"]);
    assert_eq!(
        p.client_saw,
        vec!["Welcome", "Snapshot", "Welcome", "Delta"]
    );
    assert_eq!(p.client_bool("a"), Some(false));
    assert!(matches!(p.ends[0], End::Transport(_)), "{:?}", p.ends);
}

#[test]
fn a_reconnect_without_changes_is_up_to_date() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.cut();
    p.until_client_deadline();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::UpToDate);
}

#[test]
fn a_restored_store_with_another_epoch_gets_a_snapshot() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.cut();
    // The server comes back on a store restored from elsewhere: same key, new epoch.
    let hub = Arc::new(Hub::new(100));
    hub.load(Loaded {
        envs: vec![LoadedEnv {
            name: ENV.into(),
            selector: Selector {
                epoch: 0xe2,
                version: 0,
            },
            items: Vec::new(),
            changes: Vec::new(),
            state: crate::store::EnvState::Ready,
            retention: crate::store::Retention::default(),
        }],
        keys: vec![p.server_key.record.clone()],
        ..Loaded::default()
    });
    p.hub = hub;
    p.change(flag("z", true));
    p.until_client_deadline();
    p.connect();
    let u = p.last_update();
    assert_eq!(u.kind, UpdateKind::Snapshot);
    assert_eq!(u.selector.epoch, 0xe2);
    assert_eq!(u.changed, vec!["a", "z"], "a removed, z added");
    assert_eq!(p.client_bool("a"), None);
}

#[test]
fn history_gone_gets_a_snapshot() {
    let mut p = Pair::with(&[flag("a", true)], 2, |_| {});
    p.connect();
    p.cut();
    for i in 0..4 {
        p.change(flag("a", i % 2 == 0));
    }
    p.until_client_deadline();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::Snapshot);
    assert_eq!(p.last_update().selector.version, 5);
}

#[test]
fn a_lost_push_makes_the_next_one_a_gap_that_the_client_fetches_across() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.lose_next = 1;
    p.change(flag("a", false)); // v2, lost on the way
    p.change(flag("b", true)); // v3: a delta from 2, but the client is at 1
    let u = p.last_update();
    assert_eq!((u.kind, u.selector.version), (UpdateKind::Delta, 3));
    assert_eq!(
        u.changed,
        vec!["a", "b"],
        "one merged delta from the client's own version"
    );
    assert_eq!(Pair::count(&p.server_saw, "Fetch"), 1);
    assert_eq!(p.client_bool("a"), Some(false));
}

#[test]
fn a_ping_reveals_a_lost_push_and_the_client_fetches() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.lose_next = 1;
    p.change(flag("a", false));
    assert_eq!(p.client_bool("a"), Some(true));
    p.advance(HEARTBEAT);
    assert_eq!(p.client_bool("a"), Some(false));
    assert_eq!(Pair::count(&p.server_saw, "Fetch"), 1);
}

#[test]
fn a_ping_at_the_current_version_is_just_acked() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.advance(HEARTBEAT);
    assert_eq!(p.client_saw, vec!["Welcome", "Snapshot", "Ping"]);
    assert_eq!(p.server_saw, vec!["Hello", "Ack", "Ack"]);
    // Pings keep both sides alive for as long as the path works.
    p.advance(HEARTBEAT * 20);
    assert_eq!(Pair::count(&p.client_saw, "Ping"), 21);
    assert!(p.link.is_some(), "the session is still up");
    assert_eq!(p.connects, 1);
}

#[test]
fn a_session_that_fell_behind_is_brought_current_before_its_ping() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    // Two changes the session has not been woken for (its writes were blocked, say).
    let env = p.env();
    for (version, on) in [(2, false), (3, true)] {
        env.apply(
            EPOCH,
            Write::flag(flag("a", on)).unwrap().into_change(version),
        );
    }
    if let Some(sub) = p.link.as_mut().and_then(|l| l.subscription.as_mut()) {
        sub.changes.borrow_and_update(); // the wake-up is lost; the ping must still be right
    }
    p.advance(HEARTBEAT);
    assert_eq!(
        &p.client_saw[2..],
        ["Delta", "Ping"],
        "one merged delta, then the ping"
    );
    let u = p.last_update();
    assert_eq!((u.kind, u.selector.version), (UpdateKind::Delta, 3));
    assert_eq!(Pair::count(&p.server_saw, "Fetch"), 0, "the ping matched");
}

/// The client's bound on a silent path: a heartbeat interval, the grace (2 s, a fifth of the
/// interval at most), then the probe's timeout (3 s). (The server's side, three heartbeats of
/// silence, is `a_client_silent_towards_the_server_is_dropped_with_timeout`.)
const SILENT_PATH_BOUND: Duration = Duration::from_secs(10 + 2 + 3);

#[test]
fn a_dead_path_is_noticed_by_the_client_within_its_bound() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    let connected_at = p.now;
    p.blackhole = true;
    // One probe, a Fetch, when the Ping is overdue; no answer: the connection is dead.
    p.until_client_deadline();
    assert_eq!(p.now, connected_at + HEARTBEAT + Duration::from_secs(2));
    p.until_client_deadline();
    assert_eq!(p.now, connected_at + SILENT_PATH_BOUND);
    assert!(matches!(
        p.last_disconnect().0,
        DisconnectReason::HeartbeatTimeout
    ));
    p.blackhole = false;
    p.until_client_deadline();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::UpToDate);
    assert_eq!(p.connects, 2);
}

#[test]
fn a_lost_ping_is_probed_and_the_answer_keeps_the_session() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.lose_next = 1;
    p.advance(HEARTBEAT * 3);
    assert_eq!(p.connects, 1, "the connection stayed up: {:?}", p.events);
    assert_eq!(Pair::count(&p.server_saw, "Fetch"), 1, "one probe");
    assert_eq!(Pair::count(&p.client_saw, "UpToDate"), 1, "the answer");
}

#[test]
fn a_client_silent_towards_the_server_is_dropped_with_timeout() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    // The client still hears pings, but its acks never arrive.
    p.mute_client = true;
    p.advance(HEARTBEAT * MISSED_HEARTBEATS);
    assert_eq!(
        Pair::count(&p.client_saw, "Ping"),
        2,
        "the client heard the pings"
    );
    assert!(
        p.ends
            .iter()
            .any(|e| matches!(e, End::Error(ErrorCode::Timeout, _))),
        "{:?}",
        p.ends
    );
    assert!(matches!(
        p.last_disconnect().0,
        DisconnectReason::Server {
            code: ErrorCode::Timeout,
            ..
        }
    ));
}

#[test]
fn no_welcome_in_time_is_a_handshake_timeout_and_no_hello_in_time_is_refused() {
    let mut p = Pair::new(&[]);
    p.blackhole = true;
    p.connect();
    p.until_client_deadline();
    assert!(matches!(
        p.last_disconnect().0,
        DisconnectReason::HandshakeTimeout
    ));
    assert_eq!(
        p.ends,
        vec![End::Error(ErrorCode::Timeout, "no Hello in time".into())],
        "the server gave up at the same moment (both wait 10 s)"
    );
}

#[test]
fn frames_of_unknown_kinds_are_skipped_before_and_after_hello() {
    let mut p = Pair::new(&[flag("a", true)]);
    let now = p.now;
    let mut session = Session::new(99, p.config.clone(), now);
    let unknown = [0, 0, 0, 3, 0x9a, 0x06, 0x00]; // field 99: a kind from the future
    session.handle_input(now, &unknown, &p.hub);
    assert!(session.end().is_none());
    let hello: pb::Frame = pb::Hello {
        protocol_version: 1,
        sdk_key: p.server_key.secret.clone(),
        mode: pb::DeliveryMode::Rules.into(),
        ..Default::default()
    }
    .into();
    session.handle_input(now, &codec::encode(&hello), &p.hub);
    session.handle_input(now, &unknown, &p.hub);
    assert!(session.end().is_none());
    let kinds: Vec<_> = std::iter::from_fn(|| session.poll_transmit())
        .map(|b| {
            codec::decode(&mut BytesMut::from(&b[..]), usize::MAX)
                .unwrap()
                .unwrap()
                .kind_name()
        })
        .collect();
    assert_eq!(kinds, ["Welcome", "Snapshot"]);
    // And the client side skips them too.
    p.connect();
    if let Some(link) = &mut p.link {
        link.to_client.push_back((p.now, pb::Frame { kind: None }));
    }
    p.run();
    assert!(p.link.is_some());
}

#[test]
fn a_frame_split_across_reads_is_put_back_together() {
    let p = Pair::new(&[flag("a", true)]);
    let now = p.now;
    let mut session = Session::new(1, p.config.clone(), now);
    let hello: pb::Frame = pb::Hello {
        protocol_version: 1,
        sdk_key: p.server_key.secret.clone(),
        ..Default::default()
    }
    .into();
    let bytes = codec::encode(&hello);
    for b in bytes.iter() {
        assert!(session.poll_transmit().is_none());
        session.handle_input(now, &[*b], &p.hub);
    }
    assert!(
        session.poll_transmit().is_some(),
        "Welcome once the last byte arrived"
    );
    while session.poll_transmit().is_some() {}

    // Two whole frames and the start of a third in one read, the rest of it in the next.
    let ack = codec::encode(
        &pb::Ack {
            selector: Some(
                Selector {
                    epoch: EPOCH,
                    version: 1,
                }
                .into(),
            ),
        }
        .into(),
    );
    let fetch = codec::encode(&pb::Fetch::default().into());
    let mut read = [&ack[..], &ack[..], &fetch[..2]].concat();
    session.handle_input(now, &read, &p.hub);
    assert!(
        session.poll_transmit().is_none(),
        "acks are not answered; the fetch is unfinished"
    );
    assert_eq!(
        p.env().propagation().by_version.get(&1),
        Some(&1),
        "the acks were read"
    );
    read = fetch[2..].to_vec();
    session.handle_input(now, &read, &p.hub);
    assert!(
        session.poll_transmit().is_some(),
        "the fetch, put together, is answered"
    );
    assert!(session.end().is_none());

    session.handle_input(now, &bytes[..3], &p.hub);
    session.handle_eof(now);
    assert!(matches!(session.end(), Some(End::Transport(m)) if m.contains("inside a frame")));
}

#[test]
fn oversized_and_malformed_frames_end_the_session_with_their_codes() {
    let p = Pair::new(&[]);
    let now = p.now;
    let mut too_large = Session::new(1, p.config.clone(), now);
    too_large.handle_input(now, &[0xff, 0xff, 0xff, 0xff], &p.hub);
    assert!(matches!(
        too_large.end(),
        Some(End::Error(ErrorCode::FrameTooLarge, _))
    ));
    let mut malformed = Session::new(2, p.config.clone(), now);
    malformed.handle_input(now, &[0, 0, 0, 3, 0xff, 0xff, 0xff], &p.hub);
    assert!(matches!(
        malformed.end(),
        Some(End::Error(ErrorCode::MalformedFrame, _))
    ));
    let mut out_of_place = Session::new(3, p.config.clone(), now);
    out_of_place.handle_input(now, &codec::encode(&pb::Ack::default().into()), &p.hub);
    assert!(
        matches!(out_of_place.end(), Some(End::Error(ErrorCode::ProtocolViolation, m)) if m.contains("expected Hello"))
    );
    // Each says so in its last frame.
    let last = std::iter::from_fn(|| out_of_place.poll_transmit())
        .last()
        .unwrap();
    let frame = codec::decode(&mut BytesMut::from(&last[..]), usize::MAX)
        .unwrap()
        .unwrap();
    assert!(matches!(frame.kind, Some(Kind::Error(e)) if e.code() == ErrorCode::ProtocolViolation));
}

#[test]
fn the_server_honours_the_clients_frame_limit() {
    let big = Flag {
        description: "x".repeat(2000),
        ..flag("big", true)
    };
    let mut p = Pair::with(&[big], 1000, |c| c.max_frame_len = 1024);
    p.connect();
    assert_eq!(
        p.client_saw,
        vec!["Welcome", "Error"],
        "no frame over the limit is sent"
    );
    assert!(matches!(
        p.ends.last(),
        Some(End::Error(ErrorCode::FrameTooLarge, m)) if m.contains("max_frame_len of 1024")
    ));
    assert!(p.client.flags().selector().is_none(), "nothing was applied");

    // A limit the snapshot fits.
    let mut p = Pair::with(&[flag("a", true)], 1000, |c| c.max_frame_len = 4096);
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::Snapshot);

    // The Welcome says what the server keeps to: the client's limit, at most its own.
    for (asked, kept) in [
        (4096, 4096),
        (0, codec::DEFAULT_MAX_FRAME_LEN),
        (u32::MAX, codec::DEFAULT_MAX_FRAME_LEN),
    ] {
        let mut session = Session::new(1, p.config.clone(), p.now);
        let hello: pb::Frame = pb::Hello {
            protocol_version: 1,
            sdk_key: p.server_key.secret.clone(),
            max_frame_len: asked,
            ..Default::default()
        }
        .into();
        session.handle_input(p.now, &codec::encode(&hello), &p.hub);
        let welcome = session.poll_transmit().unwrap();
        let frame = codec::decode(&mut BytesMut::from(&welcome[..]), usize::MAX)
            .unwrap()
            .unwrap();
        let Some(Kind::Welcome(w)) = frame.kind else {
            panic!("a Welcome")
        };
        assert_eq!(w.max_server_frame_len as usize, kept, "asked for {asked}");
    }
}

#[test]
fn retry_after_is_honoured_while_the_server_loads() {
    let mut p = Pair::new(&[]);
    let keys = [&p.server_key, &p.mobile_key];
    let loading = hub(1000, false, &keys);
    let loaded = std::mem::replace(&mut p.hub, loading);
    p.connect();
    let (reason, delay) = p.last_disconnect();
    assert!(
        matches!(
            reason,
            DisconnectReason::Server {
                code: ErrorCode::Initializing,
                ..
            }
        ),
        "{reason:?}"
    );
    assert!(
        (Duration::from_millis(1000)..=Duration::from_millis(1200)).contains(&delay),
        "{delay:?}"
    );
    p.advance(Duration::from_millis(999));
    assert!(!p.client.wants_connect(p.now));
    p.hub = loaded;
    p.until_client_deadline();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::Snapshot);
}

#[test]
fn a_wrong_key_stops_the_client_for_good() {
    let mut p = Pair::with(&[], 1000, |c| c.sdk_key = "vane_srv_nope".into());
    p.connect();
    assert!(p.client.is_stopped());
    assert!(matches!(
        p.events.last(),
        Some(Event::Stopped(Fatal::Unauthenticated(_)))
    ));
    assert_eq!(p.client.poll_timeout(), None);
    p.advance(Duration::from_secs(3600));
    assert!(!p.client.wants_connect(p.now));
}

/// With other nodes on the store, a key this node does not know may be one another node made a
/// moment ago: the client is told to retry shortly, and once it is known it gets in; a key
/// still unknown after the grace is refused for good.
#[test]
fn a_key_unknown_to_a_following_node_is_retried_within_the_grace() {
    let mut p = Pair::new(&[flag("a", true)]);
    let wake = Arc::new(tokio::sync::Notify::new());
    p.hub.follow_with(Duration::from_secs(4), Some(wake));
    let key = keys::mint(ENV, KeyKind::Server, 0);
    p.client = SyncMachine::new(
        SyncConfig::new(key.secret.clone()),
        FlagSet::default(),
        None,
        1,
    );
    p.connect();
    let (reason, delay) = p.last_disconnect();
    assert!(
        matches!(
            reason,
            DisconnectReason::Server {
                code: ErrorCode::Initializing,
                ..
            }
        ),
        "{reason:?}"
    );
    assert!(delay >= Duration::from_millis(500), "{delay:?}");
    // The follower hears of the key; the next attempt gets in.
    p.hub.add_key(&key.record);
    p.until_client_deadline();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::Snapshot);

    // A key nobody made: retried within the grace, then refused for good.
    let made_up = keys::mint(ENV, KeyKind::Server, 0);
    p.client = SyncMachine::new(
        SyncConfig::new(made_up.secret.clone()),
        FlagSet::default(),
        None,
        2,
    );
    p.connect();
    assert!(!p.client.is_stopped(), "within the grace: retry");
    p.advance(Duration::from_secs(5));
    p.connect();
    assert!(matches!(
        p.events.last(),
        Some(Event::Stopped(Fatal::Unauthenticated(_)))
    ));
}

#[test]
fn a_mobile_key_may_not_have_rules() {
    let mut p = Pair::new(&[]);
    let mut sync = SyncConfig::new(p.mobile_key.secret.clone());
    sync.mode = pb::DeliveryMode::Rules;
    p.client = SyncMachine::new(sync, FlagSet::default(), None, 1);
    p.connect();
    assert!(matches!(
        p.events.last(),
        Some(Event::Stopped(Fatal::PermissionDenied(_)))
    ));
}

#[test]
fn revoking_the_key_ends_the_session_and_stops_the_client() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.hub.revoke_key(&p.server_key.record.id);
    p.run();
    assert!(matches!(
        p.ends.last(),
        Some(End::Error(ErrorCode::Unauthenticated, m)) if m == "SDK key revoked"
    ));
    assert!(matches!(
        p.events.last(),
        Some(Event::Stopped(Fatal::Unauthenticated(_)))
    ));
    assert_eq!(
        p.env().propagation().sessions,
        0,
        "the session's ack is forgotten"
    );
}

#[test]
fn go_away_spreads_the_reconnect_over_its_window() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    let now = p.now;
    if let Some(link) = &mut p.link {
        link.session.handle_shutdown(now);
    }
    p.run();
    assert_eq!(p.ends.last(), Some(&End::Shutdown));
    let (reason, delay) = p.last_disconnect();
    assert!(matches!(reason, DisconnectReason::GoAway(_)), "{reason:?}");
    assert!(delay <= p.config.goaway_window);
    p.change(flag("a", false)); // while away
    p.until_client_deadline();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::Delta);
}

#[test]
fn notify_mode_announces_and_the_client_fetches() {
    let mut p = Pair::with(&[flag("a", true)], 1000, |c| c.push = pb::PushMode::Notify);
    p.connect();
    p.change(flag("a", false));
    assert_eq!(p.last_update().kind, UpdateKind::Delta);
    assert_eq!(p.client_bool("a"), Some(false));
    assert_eq!(&p.client_saw[2..], ["Notice", "Delta"]);
    assert_eq!(Pair::count(&p.server_saw, "Fetch"), 1);
    // The Ping carries what was announced; a current client only acks it.
    p.advance(HEARTBEAT);
    assert_eq!(p.client_saw.last(), Some(&"Ping"));
    assert_eq!(Pair::count(&p.server_saw, "Fetch"), 1);
}

#[test]
fn suspend_closes_and_resume_reconnects_at_once_by_delta() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.client.suspend(p.now);
    p.run();
    assert!(p.link.is_none(), "the connection was closed");
    assert_eq!(p.ends.last(), Some(&End::ClientClosed));
    assert_eq!(p.client.poll_timeout(), None, "no timers while suspended");
    p.advance(Duration::from_secs(3600));
    assert!(!p.client.wants_connect(p.now));
    p.change(flag("a", false));
    p.client.resume();
    assert!(p.client.wants_connect(p.now), "no backoff after a resume");
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::Delta);
    assert_eq!(p.client_bool("a"), Some(false));
}

#[test]
fn a_successful_sync_resets_the_backoff() {
    let mut p = Pair::with(&[flag("a", true)], 10, |c| {
        c.backoff_initial = Duration::from_millis(100)
    });
    for _ in 0..8 {
        p.client.on_connect_failed(p.now, "refused".into());
        p.run();
        p.until_client_deadline();
    }
    p.connect();
    p.cut();
    assert!(p.last_disconnect().1 <= Duration::from_millis(100));
}

#[test]
fn a_slow_link_changes_nothing_but_timing() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.delay = Duration::from_millis(300);
    p.connect();
    p.advance(Duration::from_secs(1));
    assert_eq!(p.last_update().kind, UpdateKind::Snapshot);
    for i in 0..5 {
        p.change(flag("a", i % 2 == 0));
    }
    p.advance(Duration::from_secs(2));
    assert_eq!(p.last_update().selector.version, 6);
    assert_eq!(p.client_bool("a"), Some(true));
    assert_eq!(
        Pair::count(&p.server_saw, "Fetch"),
        0,
        "pushes arrive in order"
    );
}

#[test]
fn a_lossy_path_never_leaves_the_client_wrong() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.loss = 0.3;
    for i in 0..40u64 {
        p.change(flag(&format!("f{}", i % 7), i % 3 == 0));
        p.advance(Duration::from_secs(1));
    }
    p.loss = 0.0;
    p.advance(HEARTBEAT * 2);
    if p.link.is_none() {
        p.until_client_deadline();
        p.connect();
    }
    let current = p.env().selector();
    assert_eq!(p.client.flags().selector(), Some(current));
    for i in 0..7 {
        let key = format!("f{i}");
        let expected = p
            .env()
            .with_history(|h| h.flag(&key).map(|e| e.compiled.flag().on));
        assert_eq!(p.client_bool(&key), expected, "{key}");
    }
}

/// Evaluated mode: values for the session's context, pushed only when they change.
mod evaluated {
    use super::*;

    fn targeted() -> Flag {
        serde_json::from_str(
            r#"{"key": "checkout", "on": true, "variants": {"new": "new", "old": "old"},
                "off_variant": "old",
                "rules": [{"clauses": [{"op": "in_segment", "values": ["staff"]}], "serve": {"variant": "new"}},
                          {"clauses": [{"attribute": "country", "op": "in", "values": ["de"]}], "serve": {"variant": "new"}}],
                "fallthrough": {"variant": "old"}}"#,
        )
        .unwrap()
    }

    fn staff(keys: &[&str]) -> Segment {
        serde_json::from_value(serde_json::json!({"key": "staff", "included": keys})).unwrap()
    }

    fn value(p: &Pair, key: &str) -> Option<String> {
        let flags = p.client.flags();
        flags.value(key).map(|v| v.variant.clone())
    }

    #[test]
    fn only_changes_that_alter_the_contexts_values_are_pushed() {
        let mut p = Pair::evaluated(
            &[targeted(), flag("other", true)],
            &[staff(&["boss"])],
            r#"{"key": "u1", "country": "fr"}"#,
        );
        p.connect();
        assert_eq!(p.last_update().kind, UpdateKind::Snapshot);
        assert_eq!(value(&p, "checkout").as_deref(), Some("old"));
        let pushes = Pair::count(&p.client_saw, "Delta");
        // Adding someone else to the segment changes nothing for u1: no frame at all.
        p.commit(Write::segment(staff(&["boss", "u2"])).unwrap());
        assert_eq!(Pair::count(&p.client_saw, "Delta"), pushes);
        // Its Ping keeps the selector it was last told, so the client has nothing to fetch.
        p.advance(HEARTBEAT);
        assert_eq!(Pair::count(&p.server_saw, "Fetch"), 0);
        // Adding u1 does.
        p.commit(Write::segment(staff(&["boss", "u1"])).unwrap());
        let u = p.last_update();
        assert_eq!(
            (u.kind, u.changed.clone()),
            (UpdateKind::Delta, vec!["checkout".to_owned()])
        );
        assert_eq!(value(&p, "checkout").as_deref(), Some("new"));
        // Deleting a flag is a delete.
        p.commit(Write::Delete(ItemKind::Flag, "other".into()));
        assert_eq!(p.client_value("other"), None);
        assert!(p.client.flags().keys().contains(&"checkout"));
    }

    #[test]
    fn identify_answers_with_the_values_that_differ() {
        let mut p = Pair::evaluated(
            &[targeted(), flag("other", true)],
            &[staff(&["boss"])],
            r#"{"key": "u1"}"#,
        );
        p.connect();
        p.client
            .identify(Context::parse(r#"{"key": "boss"}"#).unwrap());
        p.run();
        let answer = p.last_update();
        assert_eq!(
            answer.changed,
            vec!["checkout"],
            "only the value that differs"
        );
        assert_eq!(value(&p, "checkout").as_deref(), Some("new"));
        assert_eq!(p.client.values_context(), Some(r#"{"key":"boss"}"#));
        // An answer at the session's own version (nothing committed since) still applies.
        assert_eq!(answer.selector, p.env().selector());
        // A bad context ends the session, for good.
        p.client.identify(Context::default());
        if let Some(link) = &mut p.link {
            link.to_server.push_back((
                p.now,
                codec::encode(
                    &pb::Identify {
                        context: "[1]".into(),
                        seq: 99,
                    }
                    .into(),
                ),
            ));
        }
        p.run();
        assert!(matches!(
            p.ends.last(),
            Some(End::Error(ErrorCode::InvalidContext, _))
        ));
        assert!(p.client.is_stopped());
    }

    #[test]
    fn identify_crossing_a_push_is_answered_in_order() {
        let mut p = Pair::evaluated(&[targeted()], &[staff(&["boss"])], r#"{"key": "u1"}"#);
        p.delay = Duration::from_millis(100);
        p.connect();
        p.advance(Duration::from_secs(1));
        p.client
            .identify(Context::parse(r#"{"key": "boss", "country": "de"}"#).unwrap());
        p.run();
        // A change u1 would see is pushed while the Identify is on its way.
        p.commit(
            Write::flag(Flag {
                on: false,
                ..targeted()
            })
            .unwrap(),
        );
        p.advance(Duration::from_secs(1));
        assert_eq!(
            p.client.values_context(),
            Some(r#"{"country":"de","key":"boss"}"#)
        );
        assert_eq!(p.client.flags().selector(), Some(p.env().selector()));
        assert_eq!(
            value(&p, "checkout").as_deref(),
            Some("old"),
            "the flag is off for everyone"
        );
    }

    #[test]
    fn a_reconnect_resumes_with_the_values_that_changed() {
        let mut p = Pair::evaluated(
            &[targeted(), flag("other", true)],
            &[staff(&[])],
            r#"{"key": "u1"}"#,
        );
        p.connect();
        p.cut();
        p.commit(Write::segment(staff(&["u1"])).unwrap());
        p.commit(Write::flag(flag("third", true)).unwrap());
        p.until_client_deadline();
        p.connect();
        let u = p.last_update();
        assert_eq!(u.kind, UpdateKind::Delta);
        assert_eq!(
            u.changed,
            vec!["checkout", "third"],
            "the values touched since, only"
        );
        assert_eq!(value(&p, "checkout").as_deref(), Some("new"));
    }

    #[test]
    fn identify_in_rules_mode_is_a_protocol_violation() {
        let mut p = Pair::new(&[flag("a", true)]);
        p.connect();
        if let Some(link) = &mut p.link {
            let identify = pb::Identify {
                context: r#"{"key": "u"}"#.into(),
                seq: 1,
            };
            link.to_server
                .push_back((p.now, codec::encode(&identify.into())));
        }
        p.run();
        assert!(matches!(
            p.ends.last(),
            Some(End::Error(ErrorCode::ProtocolViolation, m)) if m.contains("rules mode")
        ));
    }
}

/// A pair whose server records evaluation events into a queue the test reads.
fn with_events(
    flags: &[Flag],
    interval: Duration,
) -> (
    Pair,
    tokio::sync::mpsc::Receiver<crate::events::EvalEvent>,
    Events,
) {
    let mut p = Pair::new(flags);
    let (events, queue) = Events::with_queue(100_000);
    p.config = Arc::new(SessionConfig {
        heartbeat: HEARTBEAT,
        events: events.clone(),
        summary_interval: interval,
        ..SessionConfig::default()
    });
    (p, queue, events)
}

fn drain(
    queue: &mut tokio::sync::mpsc::Receiver<crate::events::EvalEvent>,
) -> Vec<crate::events::EvalEvent> {
    let mut got = Vec::new();
    while let Ok(e) = queue.try_recv() {
        got.push(e);
    }
    got
}

#[test]
fn evaluation_counts_go_with_an_ack_once_an_interval_and_only_known_flags_are_recorded() {
    let (mut p, mut queue, events) = with_events(&[flag("f", true)], 2 * HEARTBEAT);
    p.connect();
    let welcomed = p.events.iter().find_map(|e| match e {
        Event::Welcomed { summaries, .. } => Some(*summaries),
        _ => None,
    });
    assert_eq!(
        welcomed,
        Some(Some(2 * HEARTBEAT)),
        "the Welcome asks for counts"
    );
    p.evaluate("f", 5);
    p.evaluate("ghost", 2);
    // The first Ping (one heartbeat in) is too early; the second is an interval in.
    p.advance(HEARTBEAT);
    assert_eq!(Pair::count(&p.server_saw, "EvaluationSummary"), 0);
    p.advance(HEARTBEAT);
    assert_eq!(Pair::count(&p.server_saw, "EvaluationSummary"), 1);
    let got = drain(&mut queue);
    assert_eq!(got.len(), 1, "{got:?}");
    let e = &got[0];
    assert_eq!(
        (
            e.flag.as_str(),
            e.variant.as_deref(),
            e.reason,
            e.count,
            e.source
        ),
        ("f", Some("true"), "STATIC", 5, "sdk")
    );
    assert_eq!(e.window_start_ms, Some(1_700_000_000_000));
    assert_eq!(
        e.window_end_ms,
        Some(1_700_000_000_000 + 2 * HEARTBEAT.as_millis() as u64)
    );
    let stats = events.stats();
    assert_eq!(
        stats.dropped_unknown.load(Ordering::Relaxed),
        1,
        "the unknown flag's count"
    );
    // Nothing counted: nothing sent, however many Pings come.
    p.advance(4 * HEARTBEAT);
    assert_eq!(Pair::count(&p.server_saw, "EvaluationSummary"), 1);
    // Counted while disconnected: sent on the next connection, once an interval in.
    p.cut();
    p.evaluate("f", 3);
    p.until_client_deadline();
    p.connect();
    p.advance(2 * HEARTBEAT);
    assert_eq!(Pair::count(&p.server_saw, "EvaluationSummary"), 2);
    let got = drain(&mut queue);
    assert_eq!(got.iter().map(|e| e.count).sum::<u64>(), 3, "{got:?}");
}

#[test]
fn without_events_the_client_is_not_asked_and_sends_nothing() {
    let mut p = Pair::new(&[flag("f", true)]);
    p.connect();
    assert!(p.events.iter().any(|e| matches!(
        e,
        Event::Welcomed {
            summaries: None,
            ..
        }
    )));
    assert!(!p.counts.is_on(), "nothing is counted");
    p.evaluate("f", 5);
    p.advance(10 * HEARTBEAT);
    assert_eq!(Pair::count(&p.server_saw, "EvaluationSummary"), 0);
}

#[test]
fn a_client_that_does_not_want_to_report_is_never_asked_to() {
    let (mut p, mut queue, _events) = with_events(&[flag("f", true)], HEARTBEAT);
    let mut sync = SyncConfig::new(p.server_key.secret.clone());
    sync.evaluation_summaries = false;
    p.client = SyncMachine::new(sync, FlagSet::default(), None, 7);
    p.connect();
    p.evaluate("f", 5);
    p.advance(5 * HEARTBEAT);
    assert_eq!(Pair::count(&p.server_saw, "EvaluationSummary"), 0);
    assert!(drain(&mut queue).is_empty());
}

#[test]
fn a_session_over_its_summary_budget_has_the_rest_dropped_and_counted() {
    let (mut p, mut queue, events) = with_events(&[flag("f", true)], 2 * HEARTBEAT);
    p.connect();
    let summary = |n: usize| {
        let counts = (0..n)
            .map(|i| pb::EvaluationCount {
                flag: "f".into(),
                variant: if i % 2 == 0 {
                    "true".into()
                } else {
                    "nope".into()
                },
                reason: pb::Reason::Static.into(),
                error_code: String::new(),
                count: 1,
            })
            .collect();
        codec::encode(
            &pb::EvaluationSummary {
                start_ms: 1,
                end_ms: 2,
                counts,
            }
            .into(),
        )
    };
    let link = p.link.as_mut().unwrap();
    link.session.handle_input(p.now, &summary(3_000), &p.hub);
    link.session.handle_input(p.now, &summary(3_000), &p.hub);
    assert!(
        link.session.end().is_none(),
        "an eager client is not dropped"
    );
    let stats = events.stats().clone();
    let over = 6_000 - MAX_SUMMARY_COUNTS as u64;
    assert_eq!(stats.dropped_rate.load(Ordering::Relaxed), over);
    // Of what the budget let through, the counts naming a variant the flag lacks are dropped.
    assert_eq!(
        stats.dropped_unknown.load(Ordering::Relaxed),
        MAX_SUMMARY_COUNTS as u64 / 2
    );
    assert_eq!(drain(&mut queue).len(), MAX_SUMMARY_COUNTS / 2);
    // An interval later the budget is whole again.
    p.advance(2 * HEARTBEAT);
    let now = p.now;
    let link = p.link.as_mut().unwrap();
    link.session.handle_input(now, &summary(100), &p.hub);
    assert_eq!(drain(&mut queue).len(), 50);
    assert_eq!(stats.dropped_rate.load(Ordering::Relaxed), over);
}

#[test]
fn an_evaluation_summary_before_hello_is_a_protocol_violation() {
    let (p, _queue, _events) = with_events(&[], HEARTBEAT);
    let mut session = Session::new(1, p.config.clone(), p.now);
    let frame = codec::encode(&pb::EvaluationSummary::default().into());
    session.handle_input(p.now, &frame, &p.hub);
    assert!(
        matches!(
            session.end(),
            Some(End::Error(ErrorCode::ProtocolViolation, _))
        ),
        "{:?}",
        session.end()
    );
}

/// How long the client was told to wait by its last refusal, which must be
/// `ENVIRONMENT_NOT_READY`.
fn not_ready_wait(p: &Pair) -> Duration {
    let (reason, wait) = p.last_disconnect();
    assert!(
        matches!(
            reason,
            DisconnectReason::Server {
                code: ErrorCode::EnvironmentNotReady,
                ..
            }
        ),
        "{reason:?}"
    );
    wait
}

#[test]
fn sessions_of_an_environment_being_created_are_refused_and_a_failed_one_waits_longer() {
    use crate::store::EnvState;
    let mut p = Pair::new(&[flag("f", true)]);
    p.env().set_lifecycle(|l| l.state = EnvState::Creating);
    p.connect();
    let wait = not_ready_wait(&p);
    assert!(
        wait <= Duration::from_millis(1_200),
        "a creating one is retried soon: {wait:?}"
    );
    p.env().set_lifecycle(|l| l.state = EnvState::Failed);
    p.until_client_deadline();
    p.connect();
    let wait = not_ready_wait(&p);
    assert!(
        wait >= Duration::from_secs(30),
        "a failed one waits: {wait:?}"
    );
    // Ready again: admitted, with the whole state.
    p.env().set_lifecycle(|l| l.state = EnvState::Ready);
    p.until_client_deadline();
    p.connect();
    assert_eq!(p.client_bool("f"), Some(true));
}

mod relay {
    use super::*;
    use crate::hub::Revoked;
    use crate::relay::EnvMirror;

    /// A relay's client against the origin's session, what it applies mirrored into a second
    /// hub, as `vane relay` does.
    fn relay_pair(flags: &[Flag]) -> (Pair, Arc<Hub>) {
        let mut p = Pair::with(flags, 1000, |s| s.relay = true);
        let relay = Arc::new(Hub::new(1000));
        let mirror = EnvMirror::new(relay.clone(), &p.server_key.secret, Arc::default());
        p.mirror = Some(Arc::new(mirror));
        (p, relay)
    }

    /// What a delta says, as comparable text (upserts with their versions, deletes).
    fn said(d: &pb::Delta) -> (Vec<(String, u64, bool)>, Vec<String>) {
        let mut upserts: Vec<_> = d
            .upserts
            .iter()
            .map(|f| (f.key.clone(), f.version, f.on))
            .collect();
        upserts.sort();
        let mut deletes = d.deletes.clone();
        deletes.sort();
        (upserts, deletes)
    }

    #[test]
    fn a_relay_holds_the_upstreams_history_at_its_versions_and_its_keys() {
        let (mut p, relay) = relay_pair(&[flag("a", true)]);
        p.connect();
        assert_eq!(p.client_saw, ["Welcome", "Snapshot", "Keys"]);
        let mirrored = relay.env(ENV).expect("installed from the snapshot");
        assert_eq!(mirrored.selector(), p.env().selector());
        for key in [&p.server_key, &p.mobile_key] {
            let grant = relay.authenticate(&key.secret).expect("the origin's keys");
            assert_eq!(grant.kind, key.record.kind);
        }

        // Changes one at a time: the relay's history is the origin's.
        p.change(flag("b", true));
        p.change(flag("a", false));
        p.commit(Write::Delete(ItemKind::Flag, "b".into()));
        assert_eq!(mirrored.selector(), p.env().selector());
        for from in 1..4 {
            let origin = p.env().with_history(|h| h.delta_since(from)).unwrap();
            let copy = mirrored.with_history(|h| h.delta_since(from)).unwrap();
            assert_eq!(said(&copy), said(&origin), "from version {from}");
        }

        // Cut off while three changes are made: brought back with one merged delta, which the
        // relay keeps as a span: from before it, the same delta as the origin's; from inside
        // it, each item's latest state (a little more than needed, never wrong).
        p.cut();
        p.change(flag("c", true)); // 5
        p.change(flag("a", true)); // 6
        p.change(flag("d", true)); // 7
        p.until_client_deadline();
        p.connect();
        assert_eq!(p.last_update().kind, UpdateKind::Delta);
        assert_eq!(mirrored.selector(), p.env().selector());
        let whole = p.env().with_history(|h| h.delta_since(4)).unwrap();
        let copy = mirrored.with_history(|h| h.delta_since(4)).unwrap();
        assert_eq!(said(&copy), said(&whole));
        let inside = mirrored.with_history(|h| h.delta_since(5)).unwrap();
        assert_eq!((inside.from_version, inside.to_version), (5, 7));
        assert_eq!(said(&inside), said(&whole));
        let flags = |h: &vane_core::history::EnvHistory| {
            h.flags()
                .map(|f| (f.wire.key.clone(), f.wire.version, f.wire.on))
                .collect::<Vec<_>>()
        };
        assert_eq!(mirrored.with_history(flags), p.env().with_history(flags));

        // Keys: one revoked at the origin ends its grant at the relay; a new one is known.
        let grant = relay.authenticate(&p.mobile_key.secret).unwrap();
        p.hub.revoke_key(&p.mobile_key.record.id);
        p.run();
        assert_eq!(grant.revoked(), Some(Revoked::Key));
        assert!(relay.authenticate(&p.mobile_key.secret).is_none());
        let fresh = keys::mint(ENV, KeyKind::Mobile, 0);
        p.hub.add_key(&fresh.record);
        p.run();
        assert!(relay.authenticate(&fresh.secret).is_some());
        assert!(relay.authenticate(&p.server_key.secret).is_some());
        let keys_sent = p.client_saw.iter().filter(|k| **k == "Keys").count();
        assert_eq!(
            keys_sent, 4,
            "at each greeting, and at each change of the keys"
        );
    }

    #[test]
    fn only_a_server_key_in_rules_mode_may_relay_and_others_never_see_keys() {
        // A mobile key (rules are asked for): PERMISSION_DENIED, as for any rules request.
        let (mut p, _) = relay_pair(&[]);
        let mut sync = SyncConfig::new(p.mobile_key.secret.clone());
        sync.relay = true;
        p.client = SyncMachine::new(sync, FlagSet::default(), None, 7);
        p.connect();
        assert!(matches!(
            p.ends.last(),
            Some(End::Error(ErrorCode::PermissionDenied, _))
        ));
        // Evaluated mode cannot relay.
        let (mut p, _) = relay_pair(&[]);
        let mut sync = SyncConfig::new(p.server_key.secret.clone());
        sync.relay = true;
        sync.mode = pb::DeliveryMode::Evaluated;
        p.client = SyncMachine::new(sync, FlagSet::default(), None, 7);
        p.connect();
        assert!(matches!(
            p.ends.last(),
            Some(End::Error(ErrorCode::ProtocolViolation, _))
        ));
        // An ordinary session is never sent the keys, even when they change.
        let mut p = Pair::new(&[flag("a", true)]);
        p.connect();
        p.hub.add_key(&keys::mint(ENV, KeyKind::Server, 0).record);
        p.change(flag("a", false));
        p.advance(HEARTBEAT * 2);
        assert!(!p.client_saw.contains(&"Keys"));
        assert_eq!(p.last_update().selector.version, 2);
    }
}
