//! Golden byte vectors: one file per frame kind in `proto/testdata/`, holding the hex of the whole
//! length-prefixed frame in canonical form (every message's fields in field-number order, as
//! `protoc`-generated encoders write them). The test decodes each file back to its sample frame,
//! and re-encodes the sample canonically to the same bytes; `proto/tools/check-golden.py` does the
//! same with Python's `protobuf`. `VANE_BLESS=1 cargo test -p vane-proto` rewrites the files after
//! a deliberate change to the encoding (which, for protocol v1, should never happen).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::{BufMut, BytesMut};
use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};
use vane_proto::codec;
use vane_proto::v1::*;

fn sel(epoch: u64, version: u64) -> Option<Selector> {
    Some(Selector { epoch, version })
}

fn bool_flag(key: &str, on: bool, version: u64) -> Flag {
    let variant = |name: &str, b: bool| Variant {
        name: name.into(),
        value: Some(Value {
            kind: Some(value::Kind::Bool(b)),
        }),
    };
    Flag {
        key: key.into(),
        on,
        variants: vec![variant("on", true), variant("off", false)],
        off_variant: "off".into(),
        fallthrough: Some(flag::Fallthrough::FallthroughVariant("on".into())),
        version,
        description: String::new(),
        ..Default::default()
    }
}

fn samples() -> Vec<(&'static str, Frame)> {
    const EPOCH: u64 = 0x5eed_0000_0000_0001;
    vec![
        (
            "hello",
            Hello {
                protocol_version: 1,
                sdk_key: "srv_0123456789abcdef".into(),
                sdk_name: "vane-rust".into(),
                sdk_version: "0.1.0".into(),
                platform: "linux-x86_64".into(),
                mode: DeliveryMode::Rules.into(),
                push: PushMode::Delta.into(),
                selector: sel(EPOCH, 41),
                max_frame_len: 0,
                context: String::new(),
                relay: false,
            }
            .into(),
        ),
        (
            "welcome",
            Welcome {
                session_id: "s-1".into(),
                heartbeat_interval_ms: 15_000,
                max_client_frame_len: 65_536,
                max_server_frame_len: 16_777_216,
                server_version: "0.1.0".into(),
                environment: "prod".into(),
                evaluation_summary_interval_ms: 0,
            }
            .into(),
        ),
        (
            "welcome_summaries",
            Welcome {
                session_id: "s-2".into(),
                heartbeat_interval_ms: 15_000,
                max_client_frame_len: 65_536,
                max_server_frame_len: 16_777_216,
                server_version: "0.1.0".into(),
                environment: "prod".into(),
                evaluation_summary_interval_ms: 30_000,
            }
            .into(),
        ),
        (
            "snapshot",
            Snapshot {
                selector: sel(EPOCH, 42),
                flags: vec![
                    bool_flag("new-checkout", true, 42),
                    Flag {
                        key: "banner".into(),
                        on: false,
                        variants: vec![Variant {
                            name: "text".into(),
                            value: Some(Value {
                                kind: Some(value::Kind::String("hello".into())),
                            }),
                        }],
                        off_variant: "text".into(),
                        fallthrough: Some(flag::Fallthrough::FallthroughVariant("text".into())),
                        version: 3,
                        description: "top banner".into(),
                        ..Default::default()
                    },
                ],
                reason: SnapshotReason::NoSelector.into(),
                ..Default::default()
            }
            .into(),
        ),
        (
            "delta",
            Delta {
                epoch: EPOCH,
                from_version: 41,
                to_version: 42,
                upserts: vec![bool_flag("new-checkout", false, 42)],
                deletes: vec!["old-flag".into()],
                ..Default::default()
            }
            .into(),
        ),
        (
            "notice",
            Notice {
                selector: sel(EPOCH, 42),
            }
            .into(),
        ),
        (
            "fetch",
            Fetch {
                selector: sel(EPOCH, 41),
            }
            .into(),
        ),
        (
            "up_to_date",
            UpToDate {
                selector: sel(EPOCH, 42),
            }
            .into(),
        ),
        (
            "ping",
            Ping {
                selector: sel(EPOCH, 42),
            }
            .into(),
        ),
        (
            "ack",
            Ack {
                selector: sel(EPOCH, 42),
            }
            .into(),
        ),
        (
            "go_away",
            GoAway {
                reason: GoAwayReason::Shutdown.into(),
                reconnect_within_ms: 5_000,
                message: "server shutting down".into(),
            }
            .into(),
        ),
        (
            "identify",
            Identify {
                context: r#"{"key":"user-1","country":"de"}"#.into(),
                seq: 1,
            }
            .into(),
        ),
        (
            "snapshot_rules",
            Snapshot {
                selector: sel(EPOCH, 7),
                flags: vec![Flag {
                    key: "checkout".into(),
                    on: true,
                    variants: vec![
                        Variant {
                            name: "a".into(),
                            value: Some(Value {
                                kind: Some(value::Kind::String("A".into())),
                            }),
                        },
                        Variant {
                            name: "b".into(),
                            value: Some(Value {
                                kind: Some(value::Kind::String("B".into())),
                            }),
                        },
                    ],
                    off_variant: "b".into(),
                    fallthrough: Some(flag::Fallthrough::FallthroughRollout(Rollout {
                        bucket_by: "key".into(),
                        salt: String::new(),
                        variants: vec![
                            WeightedVariant {
                                variant: "a".into(),
                                weight: 30_000,
                            },
                            WeightedVariant {
                                variant: "b".into(),
                                weight: 70_000,
                            },
                        ],
                    })),
                    version: 7,
                    description: String::new(),
                    rules: vec![Rule {
                        id: "staff".into(),
                        clauses: vec![Clause {
                            attribute: String::new(),
                            op: Operator::InSegment.into(),
                            values: vec![Value {
                                kind: Some(value::Kind::String("staff".into())),
                            }],
                            negate: false,
                        }],
                        serve: Some(rule::Serve::Variant("a".into())),
                        description: String::new(),
                    }],
                    tags: vec!["web".into()],
                }],
                segments: vec![Segment {
                    key: "staff".into(),
                    included: vec!["u-boss".into()],
                    excluded: vec![],
                    rules: vec![SegmentRule {
                        clauses: vec![Clause {
                            attribute: "email".into(),
                            op: Operator::EndsWith.into(),
                            values: vec![Value {
                                kind: Some(value::Kind::String("@vane.dev".into())),
                            }],
                            negate: false,
                        }],
                    }],
                    version: 6,
                    description: String::new(),
                }],
                reason: SnapshotReason::NoSelector.into(),
                values: vec![],
            }
            .into(),
        ),
        (
            "delta_evaluated",
            Delta {
                epoch: EPOCH,
                from_version: 41,
                to_version: 42,
                values: vec![EvaluatedFlag {
                    key: "new-checkout".into(),
                    value: Some(Value {
                        kind: Some(value::Kind::Bool(false)),
                    }),
                    variant: "off".into(),
                    reason: Reason::Disabled.into(),
                    error_code: String::new(),
                    version: 42,
                }],
                identify_seq: 0,
                ..Default::default()
            }
            .into(),
        ),
        (
            "evaluation_summary",
            EvaluationSummary {
                start_ms: 1_780_000_000_000,
                end_ms: 1_780_000_030_000,
                counts: vec![
                    EvaluationCount {
                        flag: "new-checkout".into(),
                        variant: "on".into(),
                        reason: Reason::TargetingMatch.into(),
                        error_code: String::new(),
                        count: 1_204,
                    },
                    EvaluationCount {
                        flag: "banner".into(),
                        variant: String::new(),
                        reason: Reason::Error.into(),
                        error_code: "TYPE_MISMATCH".into(),
                        count: 3,
                    },
                ],
            }
            .into(),
        ),
        (
            "hello_relay",
            Hello {
                protocol_version: 1,
                sdk_key: "srv_0123456789abcdef".into(),
                sdk_name: "vane-relay".into(),
                sdk_version: "0.1.0".into(),
                platform: "linux-x86_64".into(),
                mode: DeliveryMode::Rules.into(),
                push: PushMode::Delta.into(),
                selector: sel(EPOCH, 41),
                max_frame_len: 0,
                context: String::new(),
                relay: true,
            }
            .into(),
        ),
        (
            "keys",
            Keys {
                keys: vec![
                    SdkKey {
                        id: "key_5f0c1d2e3a4b".into(),
                        kind: KeyKind::Server.into(),
                        sha256: (0u8..32).collect(),
                    },
                    SdkKey {
                        id: "key_00aa11bb22cc".into(),
                        kind: KeyKind::Mobile.into(),
                        sha256: (0u8..32).map(|b| b.wrapping_mul(7)).collect(),
                    },
                ],
            }
            .into(),
        ),
        (
            "error",
            Error {
                code: ErrorCode::Initializing.into(),
                message: "server is loading its state".into(),
                retry_after_ms: 500,
            }
            .into(),
        ),
    ]
}

/// The schema's messages by full name (`.vane.v1.Frame`), from the `.proto` itself.
struct Schema(HashMap<String, DescriptorProto>);

impl Schema {
    fn load() -> Schema {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let set: FileDescriptorSet =
            protox::compile([root.join("vane/v1/vane.proto")], [&root]).unwrap();
        let mut messages = HashMap::new();
        for file in set.file {
            let package = file.package.clone().unwrap_or_default();
            for m in file.message_type {
                messages.insert(format!(".{package}.{}", m.name()), m);
            }
        }
        Schema(messages)
    }

    /// Re-encodes a message with its fields in field-number order (repeated fields keep their
    /// order among themselves), descending into sub-messages.
    fn canonical(&self, message: &str, mut bytes: &[u8]) -> Vec<u8> {
        let desc = &self.0[message];
        let mut fields: Vec<(u64, Vec<u8>)> = Vec::new();
        while !bytes.is_empty() {
            let start = bytes;
            let key = prost::encoding::decode_varint(&mut bytes).unwrap();
            let (number, wire_type) = (key >> 3, key & 7);
            let body: Vec<u8> = match wire_type {
                0 => {
                    prost::encoding::decode_varint(&mut bytes).unwrap();
                    let used = start.len() - bytes.len();
                    start[..used].to_vec()
                }
                1 | 5 => {
                    let n = if wire_type == 1 { 8 } else { 4 };
                    bytes = &bytes[n..];
                    start[..start.len() - bytes.len()].to_vec()
                }
                2 => {
                    let len = prost::encoding::decode_varint(&mut bytes).unwrap() as usize;
                    let (payload, rest) = bytes.split_at(len);
                    bytes = rest;
                    let field = desc.field.iter().find(|f| f.number() as u64 == number);
                    let payload = match field {
                        Some(f) if f.r#type() == Type::Message => {
                            self.canonical(f.type_name(), payload)
                        }
                        _ => payload.to_vec(),
                    };
                    let mut out = Vec::new();
                    prost::encoding::encode_varint(key, &mut out);
                    prost::encoding::encode_varint(payload.len() as u64, &mut out);
                    out.extend_from_slice(&payload);
                    out
                }
                other => panic!("{message}: wire type {other} is not used by this schema"),
            };
            fields.push((number, body));
        }
        fields.sort_by_key(|(number, _)| *number); // stable: repeated fields keep their order
        fields.into_iter().flat_map(|(_, b)| b).collect()
    }

    /// A frame, length-prefixed, in canonical form.
    fn frame(&self, frame: &Frame) -> Vec<u8> {
        let body = self.canonical(".vane.v1.Frame", &frame.encode_to_vec());
        let mut out = BytesMut::new();
        out.put_u32(body.len() as u32);
        out.extend_from_slice(&body);
        out.to_vec()
    }
}

#[test]
fn golden_vectors_are_canonical_and_decode_to_their_samples() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let bless = std::env::var_os("VANE_BLESS").is_some();
    let schema = Schema::load();
    let mut not_prosts_order = Vec::new();
    for (name, frame) in samples() {
        let path = dir.join(format!("{name}.hex"));
        let canonical = schema.frame(&frame);
        if bless {
            std::fs::write(&path, format!("{}\n", hex(&canonical))).unwrap();
        }
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with VANE_BLESS=1 once)", path.display()));
        let golden = unhex(text.trim());
        assert_eq!(hex(&canonical), hex(&golden), "{name}: encoding changed");
        let mut buf = BytesMut::from(&golden[..]);
        let decoded = codec::decode(&mut buf, codec::DEFAULT_MAX_FRAME_LEN)
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: golden vector is incomplete"));
        assert_eq!(decoded, frame, "{name}: golden vector decodes differently");
        assert!(buf.is_empty(), "{name}: trailing bytes in golden vector");
        if codec::encode(&frame)[..] != golden[..] {
            not_prosts_order.push(name);
        }
    }
    // What docs/PROTOCOL.md says: prost writes a oneof at its lowest field number, which only
    // moves a rollout fallthrough (field 9) of a Flag.
    assert_eq!(not_prosts_order, ["snapshot_rules"]);
}

#[test]
fn canonical_form_orders_fields_by_number_and_keeps_repeated_ones_in_order() {
    let schema = Schema::load();
    // Flag: key (1), then fallthrough_rollout (9) before version (6), as prost writes it.
    let flag = Flag {
        key: "k".into(),
        version: 3,
        tags: vec!["b".into(), "a".into()],
        fallthrough: Some(flag::Fallthrough::FallthroughRollout(Rollout::default())),
        ..Default::default()
    };
    let prost = flag.encode_to_vec();
    let canonical = schema.canonical(".vane.v1.Flag", &prost);
    let numbers = |mut b: &[u8]| {
        let mut out = Vec::new();
        while !b.is_empty() {
            let key = prost::encoding::decode_varint(&mut b).unwrap();
            out.push(key >> 3);
            match key & 7 {
                0 => drop(prost::encoding::decode_varint(&mut b).unwrap()),
                2 => {
                    let len = prost::encoding::decode_varint(&mut b).unwrap() as usize;
                    b = &b[len..];
                }
                _ => unreachable!(),
            }
        }
        out
    };
    assert_eq!(numbers(&prost), [1, 9, 6, 10, 10]);
    assert_eq!(numbers(&canonical), [1, 6, 9, 10, 10]);
    assert_eq!(Flag::decode(&canonical[..]).unwrap(), flag);
}

#[test]
fn every_frame_kind_has_a_vector() {
    let mut kinds: Vec<_> = samples().iter().map(|(_, f)| f.kind_name()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    // Every case of Frame's `kind`, as the schema has them.
    let cases = Schema::load().0[".vane.v1.Frame"].field.len();
    assert_eq!(kinds.len(), cases, "one sample per frame kind: {kinds:?}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex digit"))
        .collect()
}
