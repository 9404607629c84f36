//! Fuzz harnesses, one function per target: each takes the fuzzer's bytes, drives real code with
//! them and panics only when an invariant breaks (a crash the fuzzer reports). The libFuzzer
//! binaries in `fuzz_targets/` call these; the tests at the end run them over the kept corpus in
//! `fuzz/corpus/`, so every input the fuzzer ever found interesting is replayed by `cargo test`.
//!
//! - [`frame_decoder`]: the length-prefixed frame codec, both decoders, and re-encoding.
//! - [`server_session`]: a server [`Session`] on a real [`Hub`], fed byte chunks, well-formed
//!   frames, changes, revocations, timeouts and transport events in the order the input says.
//! - [`definition_json`]: flag and segment JSON as the admin API parses it, validation and
//!   compilation, and the wire form a client gets back.
//! - [`evaluate`]: evaluation of a fuzzed (or a fixed) flag for a fuzzed context.
//! - [`client_sync`]: the client's [`SyncMachine`] fed frames, timeouts and disconnects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prost::Message;
use vane_core::eval::{CompiledFlag, CompiledSegment, Context, Evaluation};
use vane_core::history::{Item, ItemKind, Write};
use vane_core::model::{Flag, Segment};
use vane_core::protocol::Selector;
use vane_core::state::FlagSet;
use vane_core::summary::EvaluationCounts;
use vane_core::sync::{DisconnectReason, Event, Output, SyncConfig, SyncMachine};
use vane_proto::codec;
use vane_proto::v1::{self as pb, frame::Kind};
use vane_server::events::Events;
use vane_server::hub::Hub;
use vane_server::keys::{self, KeyKind, KeyRecord};
use vane_server::session::{Session, SessionConfig, Subscription};
use vane_server::store::{Loaded, LoadedEnv};

/// A harness: the fuzzer's bytes in, a panic out if an invariant broke.
pub type Harness = fn(&[u8]);

/// The targets, by name: the names of the binaries and of the corpus folders.
pub const TARGETS: [(&str, Harness); 5] = [
    ("frame_decoder", frame_decoder),
    ("server_session", server_session),
    ("definition_json", definition_json),
    ("evaluate", evaluate),
    ("client_sync", client_sync),
];

/// The fixed secrets of the fuzzed environment's keys, so inputs can say Hello with them.
pub const SERVER_SECRET: &str = "vane_srv_fuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzz";
/// See [`SERVER_SECRET`].
pub const MOBILE_SECRET: &str = "vane_mob_fuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzz";
const ENV: &str = "fuzz";
const EPOCH: u64 = 0xf022;

/// Reads the input as a sequence of small instructions.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// A chunk whose length is the next byte (so one input can hold many of them).
    fn chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte().unwrap_or(0)).min(self.0.len());
        let (chunk, rest) = self.0.split_at(n);
        self.0 = rest;
        chunk
    }
}

// ---------------------------------------------------------------------------------------------
// Frame decoder

/// Decodes the input as a stream of frames with both decoders, which must agree; every frame
/// decoded must encode and decode back to itself.
pub fn frame_decoder(data: &[u8]) {
    let max = 1 << 16;
    let mut buf = BytesMut::from(data);
    let mut rest = data;
    loop {
        let slice = codec::decode_slice(rest, max);
        let checked = codec::check(rest, max);
        let stream = codec::decode(&mut buf, max);
        match (slice, stream) {
            (Ok(Some((a, used))), Ok(Some(b))) => {
                // Compared as bytes: a NaN number is a valid value that is not equal to itself.
                let again = codec::encode(&a);
                assert_eq!(again, codec::encode(&b), "the two decoders disagree");
                assert!(
                    matches!(checked, Ok(Some(n)) if n + 4 == used),
                    "check disagrees"
                );
                rest = &rest[used..];
                assert_eq!(rest, &buf[..], "the decoders consumed different lengths");
                let (back, n) = codec::decode_slice(&again, usize::MAX)
                    .expect("an encoded frame decodes")
                    .expect("an encoded frame is whole");
                assert_eq!(n, again.len());
                assert_eq!(
                    codec::encode(&back),
                    again,
                    "a frame did not survive re-encoding"
                );
            }
            (Ok(None), Ok(None)) => {
                assert!(matches!(checked, Ok(None)));
                assert!(codec::wanted(rest) > 0, "a whole frame left undecoded");
                return;
            }
            (Err(_), Err(_)) => return,
            (a, b) => panic!("the decoders disagree: {a:?} against {b:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server session

fn key(secret: &str, kind: KeyKind) -> KeyRecord {
    KeyRecord {
        id: format!("key_{}", &secret[5..8]),
        env: ENV.to_owned(),
        kind,
        prefix: secret[..14].to_owned(),
        hash: keys::hash_secret(secret),
        created_at: 0,
        revoked_at: None,
    }
}

/// The flags and segments every fuzzed environment starts with: one of each kind of rule.
pub fn fixture_flags() -> Vec<Flag> {
    let texts = [
        r#"{"key":"banner","on":true,"variants":{"on":true,"off":false},"off_variant":"off","fallthrough":{"variant":"on"}}"#,
        r#"{"key":"checkout","on":true,"variants":{"new":"new-flow","old":"legacy"},"off_variant":"old",
            "rules":[{"id":"staff","clauses":[{"op":"in_segment","values":["staff"]}],"serve":{"variant":"new"}},
                     {"id":"de","clauses":[{"attribute":"country","op":"in","values":["de","at"]},
                                            {"attribute":"app.version","op":"semver_gt","values":["2.1.0"]}],
                      "serve":{"rollout":{"variants":[{"variant":"new","weight":30000},{"variant":"old","weight":70000}]}}},
                     {"id":"mail","clauses":[{"attribute":"email","op":"matches","values":["^[a-z]+@(vane|example)\\.dev$"]}],
                      "serve":{"variant":"new"}},
                     {"id":"age","clauses":[{"attribute":"age","op":"gte","values":[18]},
                                             {"attribute":"signup","op":"before","values":["2026-01-01T00:00:00Z"]}],
                      "serve":{"variant":"old"}}],
            "fallthrough":{"rollout":{"bucket_by":"org","salt":"s","variants":[{"variant":"new","weight":50000},{"variant":"old","weight":50000}]}}}"#,
        r#"{"key":"limits","on":true,"variants":{"low":10,"high":1000.5},"off_variant":"low",
            "rules":[{"id":"plan","clauses":[{"attribute":"plan","op":"starts_with","values":["ent"],"negate":true},
                                             {"attribute":"name","op":"contains","values":["x"]}],"serve":{"variant":"high"}}],
            "fallthrough":{"variant":"low"}}"#,
        r#"{"key":"theme","on":false,"variants":{"a":{"color":"red"},"b":[1,2]},"off_variant":"b","fallthrough":{"variant":"a"}}"#,
    ];
    texts
        .iter()
        .map(|t| serde_json::from_str(t).expect("the fixture flags parse"))
        .collect()
}

/// See [`fixture_flags`].
pub fn fixture_segments() -> Vec<Segment> {
    let text = r#"{"key":"staff","included":["u-boss"],"excluded":["u-temp"],
        "rules":[{"clauses":[{"attribute":"email","op":"ends_with","values":["@vane.dev"]}]}]}"#;
    vec![serde_json::from_str(text).expect("the fixture segment parses")]
}

/// A hub with the fuzzed environment loaded, its two keys, and the fixture items committed.
fn fixture_hub() -> Arc<Hub> {
    let hub = Arc::new(Hub::new(64));
    hub.load(Loaded {
        envs: vec![LoadedEnv {
            name: ENV.into(),
            selector: Selector {
                epoch: EPOCH,
                version: 0,
            },
            items: Vec::new(),
            changes: Vec::new(),
            state: vane_server::store::EnvState::Ready,
            retention: vane_server::store::Retention::default(),
        }],
        keys: vec![
            key(SERVER_SECRET, KeyKind::Server),
            key(MOBILE_SECRET, KeyKind::Mobile),
        ],
        ..Loaded::default()
    });
    let env = hub.env(ENV).expect("loaded");
    let writes = fixture_segments()
        .into_iter()
        .map(|s| Write::segment(s).expect("valid"))
        .chain(
            fixture_flags()
                .into_iter()
                .map(|f| Write::flag(f).expect("valid")),
        );
    for (i, w) in writes.enumerate() {
        env.apply(EPOCH, w.into_change(i as u64 + 1));
    }
    hub
}

/// A well-formed frame a client might send: `pick` chooses the kind (low three bits), the
/// context (bits 3 to 5) and the selector (bits 6 and 7); `arg` the Hello's key (bits 0 and 1),
/// mode (2, 3), push mode (4), protocol version (5) and frame limit (6), or the version acked.
/// The fuzzer reaches a live session through these instead of having to guess a key.
fn client_frame(pick: u8, arg: u8) -> pb::Frame {
    let selector = (pick & 0x40 != 0).then_some(pb::Selector {
        epoch: if pick & 0x80 != 0 { EPOCH + 1 } else { EPOCH },
        version: u64::from(arg % 8),
    });
    let context = match (pick >> 3) % 8 {
        0 => String::new(),
        1 => r#"{"key":"u-1","country":"de","app":{"version":"3.0.0"}}"#.into(),
        2 => r#"{"key":"u-boss"}"#.into(),
        3 => r#"{"email":"a@vane.dev"}"#.into(),
        4 => r#"{"key":"u-2","age":[1,{"a":null}]}"#.into(),
        _ => "not json".into(),
    };
    let kind = match pick % 8 {
        0 | 1 => Kind::Hello(pb::Hello {
            protocol_version: if arg & 0x20 != 0 { 2 } else { 1 },
            sdk_key: match arg % 4 {
                1 => MOBILE_SECRET.into(),
                2 => "vane_srv_wrong".into(),
                _ => SERVER_SECRET.into(),
            },
            sdk_name: "fuzz".into(),
            sdk_version: "0".into(),
            platform: "fuzz".into(),
            mode: i32::from((arg >> 2) % 4 % 3),
            push: i32::from((arg >> 4) % 2),
            selector,
            max_frame_len: if arg & 0x40 != 0 { 64 } else { 0 },
            context,
            relay: arg & 0x80 != 0,
        }),
        2 => Kind::Ack(pb::Ack { selector }),
        3 => Kind::Ping(pb::Ping { selector }),
        4 => Kind::Fetch(pb::Fetch { selector }),
        5 => Kind::Identify(pb::Identify {
            context,
            seq: u32::from(arg),
        }),
        6 => Kind::Error(pb::Error {
            code: i32::from(arg),
            message: "fuzz".into(),
            retry_after_ms: 0,
        }),
        _ if arg & 1 == 0 => Kind::GoAway(pb::GoAway {
            reason: i32::from(arg % 4),
            reconnect_within_ms: u32::from(arg),
            message: "fuzz".into(),
        }),
        // Counts of known and unknown flags and variants, some of them too many.
        _ => Kind::EvaluationSummary(pb::EvaluationSummary {
            start_ms: u64::from(arg),
            end_ms: u64::from(pick),
            counts: (0..usize::from(arg >> 1) * 40)
                .map(|i| pb::EvaluationCount {
                    flag: ["banner", "checkout", "limits", "nope"][i % 4].into(),
                    variant: ["on", "new", "high", "", "x"][i % 5].into(),
                    reason: (i % 9) as i32,
                    error_code: if i % 3 == 0 {
                        "FLAG_NOT_FOUND".into()
                    } else {
                        String::new()
                    },
                    count: i as u64,
                })
                .collect(),
        }),
    };
    pb::Frame { kind: Some(kind) }
}

/// A change to commit, chosen by `pick`.
fn change(pick: u8) -> Write {
    let mut flags = fixture_flags();
    let i = usize::from(pick) % flags.len();
    match pick % 4 {
        0 => Write::Delete(ItemKind::Flag, flags.swap_remove(i).key),
        1 => {
            let mut s = fixture_segments().swap_remove(0);
            s.included.push(format!("u-{pick}"));
            Write::segment(s).expect("valid")
        }
        _ => {
            let mut f = flags.swap_remove(i);
            f.on = !f.on || pick & 0x80 != 0;
            f.description = format!("change {pick}");
            Write::flag(f).expect("valid")
        }
    }
}

/// Checks that what the session wrote is whole, well-formed frames; returns their kinds.
fn drain(session: &mut Session, sent: &mut Vec<&'static str>) {
    while let Some(bytes) = session.poll_transmit() {
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            match codec::decode_slice(rest, usize::MAX) {
                Ok(Some((frame, used))) => {
                    sent.push(frame.kind_name());
                    rest = &rest[used..];
                }
                other => panic!("the session wrote something that is not a frame: {other:?}"),
            }
        }
    }
}

/// A server session on a real hub, driven by the input: raw byte chunks, well-formed client
/// frames, time passing, committed changes, revocation, and the transport's events.
pub fn server_session(data: &[u8]) {
    run_session(data);
}

/// [`server_session`], returning the kinds of the frames the session sent.
fn run_session(data: &[u8]) -> Vec<&'static str> {
    let mut sent = Vec::new();
    let hub = fixture_hub();
    // Events on, into a queue nobody drains: reported counts are checked, and some dropped.
    let (events, _queue) = Events::with_queue(1024);
    let config = Arc::new(SessionConfig {
        max_client_frame_len: 4096,
        events,
        ..SessionConfig::default()
    });
    let start = Instant::now();
    let mut now = start;
    let mut session = Session::new(1, config, now);
    let mut sub: Option<Subscription> = None;
    let mut version = hub.env(ENV).expect("loaded").selector().version;
    let mut input = Input(data);
    while let Some(op) = input.byte() {
        match op % 10 {
            0..=2 => {
                let chunk = input.chunk();
                session.handle_input(now, chunk, &hub);
            }
            3 | 4 => {
                let frame = client_frame(input.byte().unwrap_or(0), input.byte().unwrap_or(0));
                session.handle_input(now, &codec::encode(&frame), &hub);
            }
            5 => {
                now += Duration::from_millis(u64::from(input.byte().unwrap_or(0)) * 400);
                if session.poll_timeout().is_some_and(|at| at <= now) {
                    session.handle_timeout(now);
                }
            }
            6 => {
                let env = hub.env(ENV).expect("the environment is never removed");
                version += 1;
                env.apply(
                    EPOCH,
                    change(input.byte().unwrap_or(0)).into_change(version),
                );
            }
            7 => match input.byte().unwrap_or(0) % 4 {
                0 => hub.revoke_key(&key(SERVER_SECRET, KeyKind::Server).id),
                1 => hub.revoke_key(&key(MOBILE_SECRET, KeyKind::Mobile).id),
                2 => session.handle_stalled(now),
                _ => session.handle_transport_error(now, "fuzz".into()),
            },
            8 => session.handle_eof(now),
            _ => session.handle_shutdown(now),
        }
        if let Some(s) = session.take_subscription() {
            assert!(sub.is_none(), "a second subscription for one session");
            sub = Some(s);
        }
        if let Some(s) = sub.as_mut() {
            if s.changes.has_changed().unwrap_or(false) {
                let published = s.changes.borrow_and_update().clone();
                session.handle_change(now, &published);
            }
            if s.grant.revoked().is_some() {
                session.handle_revoked(now);
            }
        }
        drain(&mut session, &mut sent);
        if let Some(at) = session.poll_timeout() {
            assert!(at > start, "a deadline before the session began");
        }
    }
    sent
}

// ---------------------------------------------------------------------------------------------
// Flag and segment JSON

/// The input as a flag, then as a segment, as the admin API reads a body: whatever validates
/// must compile, survive the store's JSON and the wire, and be accepted by a client.
pub fn definition_json(data: &[u8]) {
    if let Ok(flag) = serde_json::from_slice::<Flag>(data)
        && let Ok(write) = Write::flag(flag.clone())
    {
        // The store's JSON reads back to the same flag.
        let stored = serde_json::to_string(&flag).expect("a flag serializes");
        let back: Flag = serde_json::from_str(&stored).expect("stored JSON reads back");
        assert_eq!(back, flag, "the stored JSON changed the flag");
        // A client compiles what the server accepted.
        let Some(Item::Flag(entry)) = write.into_change(1).item else {
            panic!("a flag write became something else");
        };
        let wire = entry.wire.as_ref().clone();
        let client = Flag::try_from(wire).expect("a client reads what the server sent");
        CompiledFlag::new(client).expect("a client compiles what the server accepted");
    }
    if let Ok(segment) = serde_json::from_slice::<Segment>(data)
        && Write::segment(segment.clone()).is_ok()
    {
        let wire = pb::Segment::from(&segment);
        let client = Segment::from(wire);
        CompiledSegment::new(client).expect("a client compiles what the server accepted");
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation

fn check_evaluation(flag: &Flag, e: &Evaluation<'_>) {
    match (e.value, e.error) {
        (Some(value), None) => {
            let variant = e.variant.expect("a value comes with its variant");
            assert_eq!(
                flag.variants.get(variant),
                Some(value),
                "value of another variant"
            );
        }
        (None, Some(_)) => {}
        other => panic!("a value and an error together, or neither: {other:?}"),
    }
    if let Some(rule) = e.rule {
        assert!(rule < flag.rules.len(), "rule index out of range");
    }
    if let Some(bucket) = e.bucket {
        assert!(bucket < 100_000, "bucket out of range");
    }
}

/// The input is a context, or a flag and a context separated by a zero byte. The fixture flags
/// (and the fuzzed one, if it validates) are evaluated for it: each result is one of the flag's
/// variants or an error, and the same twice.
pub fn evaluate(data: &[u8]) {
    let (flag_text, context_text) = match data.iter().position(|&b| b == 0) {
        Some(i) => (Some(&data[..i]), &data[i + 1..]),
        None => (None, data),
    };
    let Ok(text) = std::str::from_utf8(context_text) else {
        return;
    };
    let Ok(ctx) = Context::parse(text) else {
        return;
    };
    let segments: std::collections::BTreeMap<String, Arc<CompiledSegment>> = fixture_segments()
        .into_iter()
        .map(|s| {
            (
                s.key.clone(),
                Arc::new(CompiledSegment::new(s).expect("valid")),
            )
        })
        .collect();
    let mut flags: Vec<CompiledFlag> = fixture_flags()
        .into_iter()
        .map(|f| CompiledFlag::new(f).expect("valid"))
        .collect();
    if let Some(text) = flag_text
        && let Ok(flag) = serde_json::from_slice::<Flag>(text)
        && let Ok(compiled) = CompiledFlag::new(flag)
    {
        flags.push(compiled);
    }
    for flag in &flags {
        let first = flag.evaluate(&ctx, &segments);
        check_evaluation(flag.flag(), &first);
        assert_eq!(first, flag.evaluate(&ctx, &segments), "not deterministic");
    }
}

// ---------------------------------------------------------------------------------------------
// Client sync machine

/// A frame the server might send, chosen by `pick`, so the fuzzer reaches a live client.
fn server_frame(pick: u8, arg: u8) -> pb::Frame {
    let epoch = if arg & 0x80 != 0 { EPOCH + 1 } else { EPOCH };
    let version = u64::from(arg % 16);
    let flags: Vec<pb::Flag> = fixture_flags().iter().map(pb::Flag::from).collect();
    let segments: Vec<pb::Segment> = fixture_segments().iter().map(pb::Segment::from).collect();
    let kind = match pick % 8 {
        0 => Kind::Welcome(pb::Welcome {
            session_id: "s".into(),
            heartbeat_interval_ms: u32::from(arg) * 100,
            max_client_frame_len: 1 << 16,
            max_server_frame_len: 1 << 20,
            server_version: "fuzz".into(),
            environment: ENV.into(),
            evaluation_summary_interval_ms: u32::from(arg & 1) * 5_000,
        }),
        1 => Kind::Snapshot(pb::Snapshot {
            selector: Some(pb::Selector { epoch, version }),
            flags: flags.into_iter().take(usize::from(arg % 5)).collect(),
            reason: i32::from(arg % 5),
            segments,
            values: Vec::new(),
        }),
        2 => Kind::Delta(pb::Delta {
            epoch,
            from_version: version,
            to_version: version + u64::from(pick >> 4),
            upserts: flags
                .into_iter()
                .skip(usize::from(arg % 4))
                .take(1)
                .collect(),
            deletes: if arg & 0x40 != 0 {
                vec!["banner".into()]
            } else {
                Vec::new()
            },
            segment_upserts: Vec::new(),
            segment_deletes: Vec::new(),
            values: Vec::new(),
            identify_seq: u32::from(arg % 3),
        }),
        3 => Kind::Ping(pb::Ping {
            selector: Some(pb::Selector { epoch, version }),
        }),
        4 => Kind::UpToDate(pb::UpToDate {
            selector: Some(pb::Selector { epoch, version }),
        }),
        5 => Kind::Notice(pb::Notice {
            selector: Some(pb::Selector { epoch, version }),
        }),
        6 => Kind::Error(pb::Error {
            code: i32::from(arg % 16),
            message: "fuzz".into(),
            retry_after_ms: u32::from(arg) * 10,
        }),
        _ => Kind::GoAway(pb::GoAway {
            reason: i32::from(arg % 4),
            reconnect_within_ms: u32::from(arg) * 10,
            message: "fuzz".into(),
        }),
    };
    pb::Frame { kind: Some(kind) }
}

/// The client's sync machine fed arbitrary and well-formed frames, time, and disconnects. It
/// must never panic and only ever send well-formed frames.
pub fn client_sync(data: &[u8]) {
    run_client(data);
}

/// [`client_sync`], returning how many updates the machine applied and how many evaluation
/// summary frames it sent.
fn run_client(data: &[u8]) -> (usize, usize) {
    let (mut updates, mut summaries) = (0, 0);
    let mut input = Input(data);
    let evaluated = input.byte().unwrap_or(0) % 2 == 1;
    let mut config = SyncConfig::new(if evaluated {
        MOBILE_SECRET
    } else {
        SERVER_SECRET
    });
    if evaluated {
        config.mode = pb::DeliveryMode::Evaluated;
        config.context = Context::parse(r#"{"key":"u-1"}"#).expect("valid");
    }
    let mut now = Instant::now();
    let mut machine = SyncMachine::new(config, FlagSet::default(), None, 7);
    // The getters' counts, as the driver keeps them, counted for whatever the machine holds.
    let counts = EvaluationCounts::default();
    counts.set_on(true, 1);
    while let Some(op) = input.byte() {
        match op % 8 {
            0 | 1 => {
                if let Ok(frame) = pb::Frame::decode(input.chunk()) {
                    machine.on_frame(now, frame);
                }
            }
            2..=4 => {
                let frame = server_frame(input.byte().unwrap_or(0), input.byte().unwrap_or(0));
                machine.on_frame(now, frame);
            }
            5 => {
                now += Duration::from_millis(u64::from(input.byte().unwrap_or(0)) * 250);
                machine.on_timeout(now);
            }
            6 => {
                if machine.wants_connect(now) {
                    machine.on_connected(now);
                }
            }
            _ => match input.byte().unwrap_or(0) % 3 {
                0 => machine.on_disconnected(now, DisconnectReason::Transport("fuzz".into())),
                1 => machine.on_malformed(now, "fuzz".into()),
                _ => machine
                    .identify(Context::parse(r#"{"key":"u-2","country":"de"}"#).expect("valid")),
            },
        }
        while let Some(out) = machine.poll_output() {
            match out {
                Output::Transmit(frame) => {
                    let bytes = codec::encode(&frame);
                    assert!(codec::decode_slice(&bytes, usize::MAX).is_ok_and(|f| f.is_some()));
                    // What the client sends fits the server's limit (the Welcome's 64 KiB).
                    assert!(
                        bytes.len() - codec::PREFIX_LEN <= 1 << 16,
                        "frame over the limit"
                    );
                    if matches!(frame.kind, Some(Kind::EvaluationSummary(_))) {
                        summaries += 1;
                    }
                }
                Output::Event(Event::Updated(_)) => updates += 1,
                Output::Summarize => {
                    let context = machine.context().clone();
                    for key in ["banner", "checkout", "limits", "nope"] {
                        counts.count(key, &machine.flags().evaluate(key, &context));
                    }
                    if let Err(window) = machine.send_summary(counts.take(2)) {
                        counts.restore(window);
                    }
                }
                _ => {}
            }
        }
    }
    (updates, summaries)
}

// ---------------------------------------------------------------------------------------------
// Seeds

/// Hand-made starting inputs for each target (written into the corpus by `fuzz/run`), so the
/// fuzzer begins from live sessions and valid definitions instead of having to find them.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let frames = |picks: &[(u8, u8)], make: fn(u8, u8) -> pb::Frame| -> Vec<u8> {
        picks
            .iter()
            .flat_map(|&(p, a)| codec::encode(&make(p, a)).to_vec())
            .collect()
    };
    match target {
        "frame_decoder" => (0..8)
            .map(|p| frames(&[(p, 1), (p | 0x40, 7)], client_frame))
            .chain((0..8).map(|p| frames(&[(p, 4), (p | 0x10, 0x83)], server_frame)))
            .collect(),
        "server_session" => {
            let hello = codec::encode(&client_frame(0, 4));
            let mut raw = vec![0, u8::try_from(hello.len()).expect("a small frame")];
            raw.extend_from_slice(&hello);
            raw.extend([6, 2, 5, 50, 3, 0x42, 3, 8, 4, 5, 255, 5, 255, 5, 255]);
            vec![
                // Rules mode over the server key, a change, time, an Ack, a Fetch, silence.
                vec![3, 0, 4, 6, 2, 5, 40, 3, 0x42, 2, 3, 0x44, 1, 5, 255, 5, 255],
                // Evaluated (delta) over the mobile key with a context, then an Identify.
                vec![3, 8, 9, 6, 3, 3, 21, 3, 6, 6, 5, 200, 7, 1],
                // Evaluated in notify mode without a context: refused.
                vec![3, 0, 25, 5, 10],
                // Notify mode over the server key, changes, a Fetch, shutdown.
                vec![3, 0x40, 20, 6, 0, 6, 5, 3, 0x44, 0, 9],
                // A wrong key, a second Hello, a stall.
                vec![3, 0, 2, 3, 0, 4, 7, 2],
                raw,
                // Rules mode, evaluation summaries of known and unknown flags, time, another.
                vec![3, 0, 4, 3, 7, 3, 3, 7, 5, 5, 60, 3, 7, 3],
            ]
        }
        "definition_json" => fixture_flags()
            .iter()
            .map(|f| serde_json::to_vec(f).expect("serializes"))
            .chain(
                fixture_segments()
                    .iter()
                    .map(|s| serde_json::to_vec(s).expect("serializes")),
            )
            .collect(),
        "evaluate" => {
            let contexts = [
                r#"{"key":"u-1","country":"de","app":{"version":"3.0.0"},"org":"o-1"}"#,
                r#"{"key":"u-boss","email":"x@vane.dev","age":30,"signup":"2025-05-01T00:00:00Z"}"#,
                r#"{"key":"u-2","plan":"free","name":"xavier","age":17.5}"#,
                r#"{"email":"a@example.dev"}"#,
            ];
            let flag = serde_json::to_vec(&fixture_flags()[1]).expect("serializes");
            contexts
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .chain(contexts.iter().map(|c| {
                    let mut v = flag.clone();
                    v.push(0);
                    v.extend_from_slice(c.as_bytes());
                    v
                }))
                .collect()
        }
        "client_sync" => vec![
            // Rules: connect, Welcome, Snapshot, Delta, Ping, time, a cut, reconnect.
            vec![
                0, 6, 2, 0, 150, 2, 1, 4, 2, 0x12, 4, 3, 3, 4, 5, 100, 7, 0, 5, 255, 6,
            ],
            // Evaluated: connect, Welcome, an Identify, a Snapshot, UpToDate, Notice, GoAway.
            vec![1, 6, 2, 0, 100, 7, 2, 2, 1, 0, 2, 4, 0, 2, 5, 9, 2, 7, 20],
            // Errors and a silent server.
            vec![0, 6, 2, 0, 10, 2, 6, 4, 5, 255, 5, 255, 6, 2, 6, 7],
            // A Welcome asking for summaries, a Snapshot, time, a Ping: the Ack takes a summary.
            vec![0, 6, 2, 0, 101, 2, 1, 4, 5, 40, 2, 3, 4, 5, 40, 2, 3, 4],
        ],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Every input in the kept corpus runs clean: what the fuzzer found once stays fixed.
    #[test]
    fn the_corpus_runs_clean() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for (name, run) in TARGETS {
            let dir = root.join(name);
            let mut n = 0;
            for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
                let path = entry.expect("readable").path();
                let data = std::fs::read(&path).expect("readable");
                run(&data);
                n += 1;
            }
            assert!(n > 0, "no corpus for {name} in {dir:?}");
        }
    }

    #[test]
    fn the_session_seeds_reach_live_sessions() {
        let seeds = seeds("server_session");
        let rules = run_session(&seeds[0]);
        assert_eq!(&rules[..2], ["Welcome", "Snapshot"], "{rules:?}");
        assert!(
            rules.contains(&"Delta") && rules.contains(&"Ping"),
            "{rules:?}"
        );
        let evaluated = run_session(&seeds[1]);
        assert_eq!(&evaluated[..2], ["Welcome", "Snapshot"], "{evaluated:?}");
        let raw = run_session(&seeds[5]);
        assert_eq!(&raw[..2], ["Welcome", "Snapshot"], "{raw:?}");
    }

    #[test]
    fn the_client_seeds_apply_updates() {
        let seeds = seeds("client_sync");
        assert!(run_client(&seeds[0]).0 >= 2);
        assert!(run_client(&seeds[1]).0 >= 1);
        assert!(
            run_client(&seeds[3]).1 >= 1,
            "the summary seed sends a summary"
        );
    }

    #[test]
    fn the_seeds_are_kept_in_the_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for (name, _) in TARGETS {
            for (i, seed) in seeds(name).iter().enumerate() {
                let path = root.join(name).join(format!("seed-{i}"));
                assert!(
                    std::fs::read(&path).is_ok_and(|kept| kept == *seed),
                    "{path:?} is not the current seed: run `cargo run -p vane-fuzz --bin seed_corpus`"
                );
            }
        }
    }

    #[test]
    fn the_seeds_run_clean() {
        for (name, run) in TARGETS {
            let seeds = seeds(name);
            assert!(!seeds.is_empty(), "no seeds for {name}");
            for seed in seeds {
                run(&seed);
            }
        }
    }
}
