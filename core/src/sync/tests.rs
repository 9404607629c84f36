//! Tests of the client machine alone, frame by frame: backoff, what it does with frames the
//! server would never send, the order of its delta checks, and evaluated mode's bookkeeping.
//! Everything with a server on the other end — resume, notify/fetch, identify, pings, timeouts,
//! GoAway — runs against the real server session machine in `vane-server`'s
//! `session/tests.rs`.

use std::time::{Duration, Instant};

use vane_proto::v1::{self as pb, frame::Kind};

use super::*;

const HEARTBEAT: Duration = Duration::from_secs(10);

fn transmitted(m: &mut SyncMachine) -> Vec<pb::Frame> {
    let mut frames = Vec::new();
    while let Some(out) = m.poll_output() {
        if let Output::Transmit(f) = out {
            frames.push(f);
        }
    }
    frames
}

fn events(m: &mut SyncMachine) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(out) = m.poll_output() {
        if let Output::Event(e) = out {
            events.push(e);
        }
    }
    events
}

fn selector(version: u64) -> Option<pb::Selector> {
    Some(pb::Selector { epoch: 1, version })
}

/// A rules-mode machine, connected and holding one flag `a` at version 5.
fn live(now: Instant) -> SyncMachine {
    let mut m = SyncMachine::new(SyncConfig::new("k"), FlagSet::default(), None, 7);
    m.on_connected(now);
    m.on_frame(
        now,
        pb::Welcome {
            heartbeat_interval_ms: HEARTBEAT.as_millis() as u32,
            ..Default::default()
        }
        .into(),
    );
    let flag = pb::Flag::from(&crate::model::Flag::boolean("a", true, true));
    m.on_frame(
        now,
        pb::Snapshot {
            selector: selector(5),
            flags: vec![flag],
            ..Default::default()
        }
        .into(),
    );
    transmitted(&mut m);
    m
}

#[test]
fn backoff_is_full_jitter_under_a_doubling_cap() {
    let mut config = SyncConfig::new("k");
    config.backoff_initial = Duration::from_millis(100);
    config.backoff_max = Duration::from_secs(2);
    let mut m = SyncMachine::new(config, FlagSet::default(), None, 7);
    let mut now = Instant::now();
    let mut delays = Vec::new();
    for attempt in 0..12u32 {
        assert!(m.wants_connect(now));
        m.on_connect_failed(now, "refused".into());
        let delay = events(&mut m)
            .into_iter()
            .find_map(|e| match e {
                Event::Disconnected { reconnect_in, .. } => Some(reconnect_in),
                _ => None,
            })
            .expect("a disconnect");
        let cap = (Duration::from_millis(100) * 2u32.pow(attempt)).min(Duration::from_secs(2));
        assert!(delay <= cap, "attempt {attempt}: {delay:?} > cap {cap:?}");
        assert!(!m.wants_connect(now) || delay.is_zero());
        delays.push(delay);
        now = m.poll_timeout().expect("a backoff deadline");
        m.on_timeout(now);
    }
    assert!(
        delays.iter().any(|d| *d > Duration::from_millis(400)),
        "caps grow: {delays:?}"
    );
    let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
    assert!(distinct.len() > 6, "delays are jittered: {delays:?}");
}

#[test]
fn a_frame_out_of_place_is_a_protocol_error() {
    let now = Instant::now();
    let mut m = live(now);
    m.on_frame(now, pb::Hello::default().into());
    let out: Vec<Output> = std::iter::from_fn(|| m.poll_output()).collect();
    assert!(out.contains(&Output::Close));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Event(Event::Disconnected {
            reason: DisconnectReason::Protocol(_),
            ..
        })
    )));
}

#[test]
fn unknown_frame_kinds_are_skipped() {
    let now = Instant::now();
    let mut m = live(now);
    m.on_frame(now, pb::Frame { kind: None });
    assert!(m.is_connected());
    assert!(m.poll_output().is_none());
}

/// The grace after a heartbeat interval before the client probes (2 s, under a fifth of 10 s).
const GRACE: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[test]
fn every_frame_pushes_the_probe_deadline() {
    let start = Instant::now();
    let mut m = live(start);
    assert_eq!(m.poll_timeout(), Some(start + HEARTBEAT + GRACE));
    let later = start + HEARTBEAT;
    m.on_frame(
        later,
        pb::Ping {
            selector: selector(5),
        }
        .into(),
    );
    assert_eq!(m.poll_timeout(), Some(later + HEARTBEAT + GRACE));
}

#[test]
fn a_missed_heartbeat_is_probed_with_a_fetch_and_an_answer_keeps_the_connection() {
    let start = Instant::now();
    let mut m = live(start);
    let due = start + HEARTBEAT + GRACE;
    m.on_timeout(due - Duration::from_millis(1));
    assert!(
        transmitted(&mut m).is_empty(),
        "not before the grace ran out"
    );
    m.on_timeout(due);
    let sent = transmitted(&mut m);
    assert!(
        matches!(&sent[..], [pb::Frame { kind: Some(Kind::Fetch(f)) }] if f.selector == selector(5)),
        "{sent:?}"
    );
    assert_eq!(m.poll_timeout(), Some(due + PROBE_TIMEOUT));
    // The answer: the probe is over and the next one is a whole interval away.
    let answered = due + Duration::from_millis(40);
    m.on_frame(
        answered,
        pb::UpToDate {
            selector: selector(5),
        }
        .into(),
    );
    assert!(m.is_connected());
    assert_eq!(m.poll_timeout(), Some(answered + HEARTBEAT + GRACE));
}

#[test]
fn an_unanswered_probe_ends_the_connection_within_the_stated_bound() {
    let start = Instant::now();
    let mut m = live(start);
    m.on_timeout(start + HEARTBEAT + GRACE);
    transmitted(&mut m);
    let dead = start + HEARTBEAT + GRACE + PROBE_TIMEOUT;
    m.on_timeout(dead - Duration::from_millis(1));
    assert!(m.is_connected());
    m.on_timeout(dead);
    assert!(!m.is_connected());
    assert!(std::iter::from_fn(|| m.poll_output()).any(|o| matches!(
        o,
        Output::Event(Event::Disconnected {
            reason: DisconnectReason::HeartbeatTimeout,
            ..
        })
    )));
}

#[test]
fn a_short_heartbeat_gets_a_proportionate_grace() {
    let now = Instant::now();
    let mut m = SyncMachine::new(SyncConfig::new("k"), FlagSet::default(), None, 7);
    m.on_connected(now);
    m.on_frame(
        now,
        pb::Welcome {
            heartbeat_interval_ms: 500,
            ..Default::default()
        }
        .into(),
    );
    assert_eq!(m.poll_timeout(), Some(now + Duration::from_millis(600)));
}

/// PROTOCOL.md 4.3: first "does it start at my version" (then apply, even when it ends there
/// too, as an Identify answer does), then "is it one I have" (ignore), else Fetch.
#[test]
fn a_delta_is_checked_for_its_start_before_it_is_called_a_duplicate() {
    let now = Instant::now();
    let mut m = live(now);
    let at_5 = |from, to| pb::Delta {
        epoch: 1,
        from_version: from,
        to_version: to,
        deletes: vec!["a".into()],
        ..Default::default()
    };
    m.on_frame(now, at_5(4, 5).into());
    assert!(transmitted(&mut m).is_empty(), "a duplicate: ignored");
    assert!(m.flags().get("a").is_some());
    m.on_frame(now, at_5(5, 5).into());
    assert!(
        m.flags().get("a").is_none(),
        "from my version: applied, though it ends there"
    );
    let frames = transmitted(&mut m);
    assert!(
        matches!(
            frames[..],
            [pb::Frame {
                kind: Some(Kind::Ack(_))
            }]
        ),
        "{frames:?}"
    );
    m.on_frame(now, at_5(7, 8).into());
    let frames = transmitted(&mut m);
    assert!(
        matches!(
            frames[..],
            [pb::Frame {
                kind: Some(Kind::Fetch(_))
            }]
        ),
        "a gap: {frames:?}"
    );
}

#[test]
fn an_unanswered_fetch_is_asked_again_after_a_heartbeat() {
    let now = Instant::now();
    let mut m = live(now);
    let behind = || {
        pb::Ping {
            selector: selector(9),
        }
        .into()
    };
    m.on_frame(now, behind());
    let fetches = |frames: Vec<pb::Frame>| {
        frames
            .iter()
            .filter(|f| matches!(f.kind, Some(Kind::Fetch(_))))
            .count()
    };
    assert_eq!(fetches(transmitted(&mut m)), 1);
    m.on_frame(now + HEARTBEAT / 2, behind());
    assert_eq!(
        fetches(transmitted(&mut m)),
        0,
        "the first is still outstanding"
    );
    m.on_frame(now + HEARTBEAT, behind());
    assert_eq!(
        fetches(transmitted(&mut m)),
        1,
        "no answer in a heartbeat: asked again"
    );
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
