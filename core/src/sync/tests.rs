//! Deterministic tests of the sync machine: a client machine wired to an in-memory server (the
//! same `EnvHistory` catch-up rules the real server uses) through queues, with a fake clock and a
//! knob that loses server→client frames. No sockets, no sleeps.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use vane_proto::v1::{self as pb, frame::Kind};

use super::*;
use crate::history::{EnvHistory, Write};
use crate::model::Flag;

const HEARTBEAT: Duration = Duration::from_secs(10);

struct Link {
    to_client: VecDeque<pb::Frame>,
    to_server: VecDeque<pb::Frame>,
}

/// A client machine and a server environment joined by an in-memory link.
struct Pair {
    now: Instant,
    client: SyncMachine,
    server: EnvHistory,
    link: Option<Link>,
    /// Every event the client emitted.
    events: Vec<Event>,
    /// Kinds of the frames the server received, in order.
    server_saw: Vec<&'static str>,
    /// Kinds of the frames delivered to the client, in order.
    client_saw: Vec<&'static str>,
    /// When set, the server answers Hello with this error instead of Welcome.
    reject_with: Option<pb::Error>,
    /// When set, server→client frames are lost.
    lossy: bool,
    connects: u32,
}

impl Pair {
    fn new(flags: &[Flag]) -> Pair {
        Pair::with(flags, 1000, SyncConfig::new("srv_test"))
    }

    fn with(flags: &[Flag], window: usize, config: SyncConfig) -> Pair {
        let mut server = EnvHistory::new(
            Selector {
                epoch: 0xe1,
                version: 0,
            },
            [],
            [],
            window,
        );
        for f in flags {
            put(&mut server, f.clone());
        }
        Pair {
            now: Instant::now(),
            client: SyncMachine::new(config, FlagSet::default(), None, 7),
            server,
            link: None,
            events: Vec::new(),
            server_saw: Vec::new(),
            client_saw: Vec::new(),
            reject_with: None,
            lossy: false,
            connects: 0,
        }
    }

    fn connect(&mut self) {
        assert!(
            self.client.wants_connect(self.now),
            "client does not want to connect yet"
        );
        self.link = Some(Link {
            to_client: VecDeque::new(),
            to_server: VecDeque::new(),
        });
        self.connects += 1;
        self.client.on_connected(self.now);
        self.run();
    }

    /// Steps both sides until neither has anything left to do.
    fn run(&mut self) {
        for _ in 0..1000 {
            if !self.step() {
                return;
            }
        }
        panic!("pair did not settle");
    }

    fn step(&mut self) -> bool {
        let mut busy = false;
        while let Some(out) = self.client.poll_output() {
            busy = true;
            match out {
                Output::Transmit(f) => {
                    if let Some(link) = &mut self.link {
                        link.to_server.push_back(f);
                    }
                }
                Output::Event(e) => self.events.push(e),
                Output::Close => self.link = None,
            }
        }
        let Some(link) = &mut self.link else {
            return busy;
        };
        while let Some(frame) = link.to_server.pop_front() {
            busy = true;
            self.server_saw.push(frame.kind_name());
            let replies: Vec<pb::Frame> = match frame.kind {
                Some(Kind::Hello(h)) => match self.reject_with.clone() {
                    Some(e) => vec![e.into()],
                    None => vec![
                        pb::Welcome {
                            session_id: "s".into(),
                            heartbeat_interval_ms: HEARTBEAT.as_millis() as u32,
                            environment: "test".into(),
                            ..Default::default()
                        }
                        .into(),
                        self.server.catch_up(h.selector.map(Selector::from)),
                    ],
                },
                Some(Kind::Fetch(f)) => vec![self.server.catch_up(f.selector.map(Selector::from))],
                _ => vec![],
            };
            link.to_client.extend(replies);
        }
        while let Some(frame) = link.to_client.pop_front() {
            busy = true;
            if !self.lossy {
                self.client_saw.push(frame.kind_name());
                self.client.on_frame(self.now, frame);
            }
        }
        busy
    }

    /// A change committed on the server, pushed to the connected client (unless lost).
    fn change(&mut self, flag: Flag) {
        let delta = put(&mut self.server, flag);
        self.push(delta.into());
    }

    fn push(&mut self, frame: pb::Frame) {
        if let Some(link) = &mut self.link {
            link.to_client.push_back(frame);
        }
        self.run();
    }

    fn ping(&mut self) {
        let selector = Some(self.server.selector().into());
        self.push(pb::Ping { selector }.into());
    }

    /// The transport breaks under both sides.
    fn cut(&mut self) {
        self.link = None;
        self.client
            .on_disconnected(self.now, DisconnectReason::Transport("reset".into()));
        self.run();
    }

    /// Moves the clock to the client's next deadline and lets it act.
    fn fire_timer(&mut self) {
        let at = self.client.poll_timeout().expect("client has a deadline");
        self.now = self.now.max(at);
        self.client.on_timeout(self.now);
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

    fn last_reconnect_delay(&self) -> Duration {
        self.events
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::Disconnected { reconnect_in, .. } => Some(*reconnect_in),
                _ => None,
            })
            .expect("a disconnect")
    }

    fn client_value(&self, key: &str) -> Option<bool> {
        let flags = self.client.flags();
        match flags
            .evaluate(key, &crate::eval::Context::default())
            .value?
        {
            crate::model::FlagValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// Commits a flag to the in-memory server; returns the single-change delta.
fn put(server: &mut EnvHistory, flag: Flag) -> pb::Delta {
    let change = Write::flag(flag)
        .unwrap()
        .into_change(server.next_version());
    server.apply(change)
}

fn flag(key: &str, on: bool) -> Flag {
    Flag::boolean(key, on, true)
}

#[test]
fn first_connect_gets_a_snapshot() {
    let mut p = Pair::new(&[flag("a", true), flag("b", false)]);
    p.connect();
    let u = p.last_update();
    assert_eq!(u.kind, UpdateKind::Snapshot);
    assert_eq!(u.selector.version, 2);
    assert_eq!(u.changed, vec!["a", "b"]);
    assert_eq!(p.client_value("a"), Some(true));
    assert_eq!(p.client_value("b"), Some(false));
    assert_eq!(p.server_saw, vec!["Hello", "Ack"]);
}

#[test]
fn pushed_delta_is_applied_and_acked() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.change(flag("a", false));
    let u = p.last_update();
    assert_eq!((u.kind, u.selector.version), (UpdateKind::Delta, 2));
    assert_eq!(u.changed, vec!["a"]);
    assert_eq!(p.client_value("a"), Some(false));
    assert_eq!(p.server_saw.last(), Some(&"Ack"));
}

#[test]
fn reconnect_resumes_by_delta() {
    let mut p = Pair::new(&[flag("a", true), flag("b", true)]);
    p.connect();
    p.cut();
    p.change(flag("a", false)); // committed while the client is away
    p.fire_timer(); // backoff over
    p.connect();
    let u = p.last_update();
    assert_eq!(u.kind, UpdateKind::Delta);
    assert_eq!(u.changed, vec!["a"]);
    assert_eq!(
        p.client_saw,
        vec!["Welcome", "Snapshot", "Welcome", "Delta"]
    );
    assert_eq!(p.client_value("a"), Some(false));
}

#[test]
fn reconnect_without_changes_is_up_to_date() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.cut();
    p.fire_timer();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::UpToDate);
}

#[test]
fn unknown_epoch_gets_a_snapshot() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.cut();
    // The environment was recreated: new epoch, different flags.
    p.server = EnvHistory::new(
        Selector {
            epoch: 0xe2,
            version: 0,
        },
        [],
        [],
        100,
    );
    put(&mut p.server, flag("z", true));
    p.fire_timer();
    p.connect();
    let u = p.last_update();
    assert_eq!(u.kind, UpdateKind::Snapshot);
    assert_eq!(u.selector.epoch, 0xe2);
    assert_eq!(u.changed, vec!["a", "z"], "a removed, z added");
    assert_eq!(p.client_value("a"), None);
}

#[test]
fn history_gone_gets_a_snapshot() {
    let mut p = Pair::with(&[flag("a", true)], 2, SyncConfig::new("k"));
    p.connect();
    p.cut();
    for i in 0..4 {
        p.change(flag("a", i % 2 == 0));
    }
    p.fire_timer();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::Snapshot);
    assert_eq!(p.last_update().selector.version, 5);
}

#[test]
fn a_delta_with_a_gap_is_not_applied_and_triggers_fetch() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.lossy = true;
    p.change(flag("a", false)); // v2, lost
    p.lossy = false;
    let gap = put(&mut p.server, flag("b", true)); // v3: from 2, client is at 1
    p.push(gap.into());
    let u = p.last_update();
    assert_eq!((u.kind, u.selector.version), (UpdateKind::Delta, 3));
    assert_eq!(
        u.changed,
        vec!["a", "b"],
        "one merged delta from the client's own version"
    );
    assert!(p.server_saw.contains(&"Fetch"));
    assert_eq!(p.client_value("a"), Some(false));
}

#[test]
fn missed_update_seen_in_ping_triggers_fetch() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.lossy = true;
    p.change(flag("a", false));
    p.lossy = false;
    assert_eq!(p.client_value("a"), Some(true));
    p.ping();
    assert_eq!(p.client_value("a"), Some(false));
    let fetches = p.server_saw.iter().filter(|k| **k == "Fetch").count();
    assert_eq!(fetches, 1);
}

#[test]
fn ping_at_current_version_is_just_acked() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.ping();
    assert_eq!(p.server_saw, vec!["Hello", "Ack", "Ack"]);
}

#[test]
fn silence_for_three_heartbeats_reconnects() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    let deadline = p.client.poll_timeout().unwrap();
    assert_eq!(deadline, p.now + HEARTBEAT * MISSED_HEARTBEATS);
    p.fire_timer();
    assert!(p.link.is_none(), "the client closed the dead connection");
    assert!(p.events.iter().any(|e| matches!(
        e,
        Event::Disconnected {
            reason: DisconnectReason::HeartbeatTimeout,
            ..
        }
    )));
    p.fire_timer();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::UpToDate);
    assert_eq!(p.connects, 2);
}

#[test]
fn every_frame_pushes_the_heartbeat_deadline() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.now += HEARTBEAT * 2;
    p.ping();
    assert_eq!(
        p.client.poll_timeout(),
        Some(p.now + HEARTBEAT * MISSED_HEARTBEATS)
    );
}

#[test]
fn no_welcome_in_time_is_a_handshake_timeout() {
    let mut p = Pair::new(&[]);
    p.link = Some(Link {
        to_client: VecDeque::new(),
        to_server: VecDeque::new(),
    });
    p.client.on_connected(p.now);
    // The server never answers: drop what the client sent.
    p.lossy = true;
    p.run();
    p.fire_timer();
    assert!(p.events.iter().any(|e| matches!(
        e,
        Event::Disconnected {
            reason: DisconnectReason::HandshakeTimeout,
            ..
        }
    )));
}

#[test]
fn backoff_is_full_jitter_under_a_doubling_cap() {
    let mut config = SyncConfig::new("k");
    config.backoff_initial = Duration::from_millis(100);
    config.backoff_max = Duration::from_secs(2);
    let mut p = Pair::with(&[], 10, config);
    let mut delays = Vec::new();
    for attempt in 0..12u32 {
        assert!(p.client.wants_connect(p.now));
        p.client.on_connect_failed(p.now, "refused".into());
        p.run();
        let delay = p.last_reconnect_delay();
        let cap = (Duration::from_millis(100) * 2u32.pow(attempt)).min(Duration::from_secs(2));
        assert!(delay <= cap, "attempt {attempt}: {delay:?} > cap {cap:?}");
        assert!(!p.client.wants_connect(p.now) || delay.is_zero());
        delays.push(delay);
        p.fire_timer();
    }
    assert!(
        delays.iter().any(|d| *d > Duration::from_millis(400)),
        "caps grow: {delays:?}"
    );
    let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
    assert!(distinct.len() > 6, "delays are jittered: {delays:?}");
}

#[test]
fn successful_sync_resets_the_backoff() {
    let mut config = SyncConfig::new("k");
    config.backoff_initial = Duration::from_millis(100);
    let mut p = Pair::with(&[flag("a", true)], 10, config);
    for _ in 0..8 {
        p.client.on_connect_failed(p.now, "refused".into());
        p.run();
        p.fire_timer();
    }
    p.connect();
    p.cut();
    assert!(p.last_reconnect_delay() <= Duration::from_millis(100));
}

#[test]
fn retry_after_is_honoured() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.reject_with = Some(pb::Error {
        code: pb::ErrorCode::Initializing.into(),
        message: "loading".into(),
        retry_after_ms: 500,
    });
    p.connect();
    let delay = p.last_reconnect_delay();
    assert!(
        (Duration::from_millis(500)..=Duration::from_millis(600)).contains(&delay),
        "{delay:?}"
    );
    p.now += Duration::from_millis(499);
    p.client.on_timeout(p.now);
    assert!(!p.client.wants_connect(p.now));
    p.reject_with = None;
    p.fire_timer();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::Snapshot);
}

#[test]
fn auth_failure_stops_for_good() {
    let mut p = Pair::new(&[]);
    p.reject_with = Some(pb::Error {
        code: pb::ErrorCode::Unauthenticated.into(),
        message: "unknown SDK key".into(),
        retry_after_ms: 0,
    });
    p.connect();
    assert!(p.client.is_stopped());
    assert!(matches!(
        p.events.last(),
        Some(Event::Stopped(Fatal::Unauthenticated(_)))
    ));
    assert_eq!(p.client.poll_timeout(), None);
    p.now += Duration::from_secs(3600);
    assert!(!p.client.wants_connect(p.now));
}

#[test]
fn go_away_reconnects_within_the_window() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.push(
        pb::GoAway {
            reason: pb::GoAwayReason::Shutdown.into(),
            reconnect_within_ms: 3000,
            message: "bye".into(),
        }
        .into(),
    );
    assert!(p.link.is_none());
    assert!(p.last_reconnect_delay() <= Duration::from_secs(3));
    p.fire_timer();
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::UpToDate);
}

#[test]
fn notify_mode_fetches_after_a_notice() {
    let mut config = SyncConfig::new("k");
    config.push = pb::PushMode::Notify;
    let mut p = Pair::with(&[flag("a", true)], 10, config);
    p.connect();
    put(&mut p.server, flag("a", false));
    let selector = Some(p.server.selector().into());
    p.push(pb::Notice { selector }.into());
    assert_eq!(p.last_update().kind, UpdateKind::Delta);
    assert_eq!(p.client_value("a"), Some(false));
    assert!(p.server_saw.contains(&"Fetch"));
}

#[test]
fn a_frame_out_of_place_is_a_protocol_error() {
    let mut p = Pair::new(&[]);
    p.connect();
    p.push(pb::Hello::default().into());
    assert!(p.link.is_none());
    assert!(p.events.iter().any(|e| matches!(
        e,
        Event::Disconnected {
            reason: DisconnectReason::Protocol(_),
            ..
        }
    )));
}

#[test]
fn unknown_frame_kinds_are_skipped() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.push(pb::Frame { kind: None });
    assert!(p.link.is_some());
}

#[test]
fn suspend_closes_and_waits_and_resume_reconnects_at_once() {
    let mut p = Pair::new(&[flag("a", true)]);
    p.connect();
    p.client.suspend(p.now);
    p.run();
    assert!(p.link.is_none(), "the connection was closed");
    assert!(p.client.is_suspended());
    assert_eq!(p.client.poll_timeout(), None, "no timers while suspended");
    p.now += Duration::from_secs(3600);
    assert!(!p.client.wants_connect(p.now));
    p.change(flag("a", false));
    p.client.resume();
    assert!(p.client.wants_connect(p.now), "no backoff after a resume");
    p.connect();
    assert_eq!(p.last_update().kind, UpdateKind::Delta);
    assert_eq!(p.client_value("a"), Some(false));
}

/// Evaluated mode, driven frame by frame: the bookkeeping that decides whether the held values
/// may be resumed, and which delta answers an Identify.
mod evaluated {
    use super::*;
    use crate::eval::Context;

    fn machine(ctx: &str) -> SyncMachine {
        let mut config = SyncConfig::new("vane_mob_k");
        config.mode = pb::DeliveryMode::Evaluated;
        config.context = Context::parse(ctx).unwrap();
        SyncMachine::new(config, FlagSet::default(), None, 3)
    }

    fn sent(m: &mut SyncMachine) -> Vec<pb::Frame> {
        let mut frames = Vec::new();
        while let Some(out) = m.poll_output() {
            if let Output::Transmit(f) = out {
                frames.push(f);
            }
        }
        frames
    }

    fn hello_of(frames: &[pb::Frame]) -> pb::Hello {
        frames
            .iter()
            .find_map(|f| match &f.kind {
                Some(Kind::Hello(h)) => Some(h.clone()),
                _ => None,
            })
            .expect("a Hello")
    }

    fn value(key: &str, variant: &str) -> pb::EvaluatedFlag {
        pb::EvaluatedFlag {
            key: key.into(),
            value: Some(pb::Value {
                kind: Some(pb::value::Kind::String(variant.into())),
            }),
            variant: variant.into(),
            reason: pb::Reason::TargetingMatch.into(),
            ..Default::default()
        }
    }

    fn welcome_and_snapshot(m: &mut SyncMachine, now: Instant) {
        m.on_frame(
            now,
            pb::Welcome {
                heartbeat_interval_ms: 10_000,
                ..Default::default()
            }
            .into(),
        );
        m.on_frame(
            now,
            pb::Snapshot {
                selector: Some(pb::Selector {
                    epoch: 1,
                    version: 5,
                }),
                values: vec![value("f", "a")],
                ..Default::default()
            }
            .into(),
        );
    }

    fn reconnect(m: &mut SyncMachine, now: &mut Instant) -> pb::Hello {
        m.on_disconnected(*now, DisconnectReason::Transport("cut".into()));
        *now = m.poll_timeout().unwrap();
        m.on_timeout(*now);
        m.on_connected(*now);
        hello_of(&sent(m))
    }

    #[test]
    fn the_selector_is_sent_only_for_values_of_the_same_context() {
        let mut now = Instant::now();
        let mut m = machine(r#"{"key": "u1"}"#);
        m.on_connected(now);
        let hello = hello_of(&sent(&mut m));
        assert_eq!(hello.mode(), pb::DeliveryMode::Evaluated);
        assert_eq!(hello.context, r#"{"key":"u1"}"#);
        assert!(hello.selector.is_none(), "nothing held yet");
        welcome_and_snapshot(&mut m, now);
        assert_eq!(m.values_context(), Some(r#"{"key":"u1"}"#));

        let hello = reconnect(&mut m, &mut now);
        assert_eq!(
            hello.selector.map(|s| s.version),
            Some(5),
            "same context: resume"
        );

        // Switched while offline: the held values are for u1, so no selector for u2.
        m.identify(Context::parse(r#"{"key": "u2"}"#).unwrap());
        assert!(sent(&mut m).is_empty(), "nothing to send while offline");
        let hello = reconnect(&mut m, &mut now);
        assert_eq!(hello.context, r#"{"key":"u2"}"#);
        assert!(
            hello.selector.is_none(),
            "values for another context are not resumed"
        );
    }

    #[test]
    fn only_the_answering_delta_moves_the_values_to_the_new_context() {
        let now = Instant::now();
        let mut m = machine(r#"{"key": "u1"}"#);
        m.on_connected(now);
        sent(&mut m);
        welcome_and_snapshot(&mut m, now);
        sent(&mut m);

        m.identify(Context::parse(r#"{"key": "u2"}"#).unwrap());
        let frames = sent(&mut m);
        let Some(Kind::Identify(i)) = &frames[0].kind else {
            panic!("an Identify")
        };
        assert_eq!(i.context, r#"{"key":"u2"}"#);

        // A push computed for u1 crosses the Identify: the values are still u1's.
        let push = pb::Delta {
            epoch: 1,
            from_version: 5,
            to_version: 6,
            values: vec![value("f", "b")],
            ..Default::default()
        };
        m.on_frame(now, push.into());
        assert_eq!(m.values_context(), Some(r#"{"key":"u1"}"#));
        // The answer.
        let answer = pb::Delta {
            epoch: 1,
            from_version: 6,
            to_version: 6,
            values: vec![value("f", "c")],
            identify_seq: i.seq,
            ..Default::default()
        };
        m.on_frame(now, answer.into());
        assert_eq!(m.values_context(), Some(r#"{"key":"u2"}"#));
        let f = m.flags().value("f").unwrap();
        assert_eq!(f.variant, "c");
    }

    #[test]
    fn an_invalid_context_stops_the_client() {
        let now = Instant::now();
        let mut m = machine(r#"{"key": "u1"}"#);
        m.on_connected(now);
        m.on_frame(
            now,
            pb::Error {
                code: pb::ErrorCode::InvalidContext.into(),
                message: "bad".into(),
                retry_after_ms: 0,
            }
            .into(),
        );
        assert!(m.is_stopped());
    }
}
