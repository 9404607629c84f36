//! The protocol's hot paths: encoding and decoding frames at realistic sizes, merging logged
//! changes into one catch-up delta, and fanning one change out to N sessions through the hub.
//!
//! `cargo bench -p vane-benches --bench protocol`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use prost::Message;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use vane_core::history::{EnvHistory, Item, Write};
use vane_core::model::Flag;
use vane_core::protocol::Selector;
use vane_proto::codec;
use vane_proto::v1 as pb;
use vane_server::hub::Hub;
use vane_server::store::{Loaded, LoadedEnv};

/// A realistic flag: two string variants, one rule.
fn flag(i: usize, on: bool) -> Flag {
    serde_json::from_value(json!({
        "key": format!("flag-{i:04}"), "on": on,
        "variants": {"new": "new-experience", "old": "old-experience"}, "off_variant": "old",
        "rules": [{"clauses": [{"attribute": "country", "op": "in", "values": ["de", "fr"]}], "serve": {"variant": "new"}}],
        "fallthrough": {"variant": "old"}, "description": "a flag of the benchmark environment"
    }))
    .expect("flag JSON")
}

fn history(flags: usize, window: usize) -> EnvHistory {
    let mut h = EnvHistory::new(
        Selector {
            epoch: 1,
            version: 0,
        },
        [],
        [],
        window,
    );
    for i in 0..flags {
        put(&mut h, flag(i, true));
    }
    h
}

fn put(h: &mut EnvHistory, f: Flag) -> pb::Delta {
    let change = Write::flag(f).expect("valid").into_change(h.next_version());
    h.apply(change)
}

fn codec_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    let mut one = history(1, 10);
    let delta: pb::Frame = put(&mut one, Flag::boolean("new-checkout", false, true)).into();
    let snapshot: pb::Frame = history(1000, 10)
        .snapshot(pb::SnapshotReason::NoSelector)
        .into();
    for (name, frame) in [("one-flag delta", &delta), ("1k-flag snapshot", &snapshot)] {
        let bytes = codec::encode(frame);
        println!("{name}: {} bytes on the wire", bytes.len());
        group.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| codec::encode(black_box(frame)))
        });
        group.bench_function(BenchmarkId::new("decode", name), |b| {
            b.iter(|| {
                let mut buf = BytesMut::from(&bytes[..]);
                black_box(codec::decode(&mut buf, codec::DEFAULT_MAX_FRAME_LEN).expect("valid"))
            })
        });
    }
    group.finish();
    black_box(snapshot.encoded_len());
}

fn merge_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("merge");
    for changes in [10usize, 100, 1000] {
        // 100 flags, then `changes` changes spread over them: a client that missed them all.
        let mut h = history(100, 2000);
        let from = h.selector().version;
        for i in 0..changes {
            put(&mut h, flag(i % 100, i % 2 == 0));
        }
        group.bench_with_input(
            BenchmarkId::new("catch-up delta over N changes", changes),
            &from,
            |b, from| b.iter(|| black_box(h.delta_since(*from).expect("in the window"))),
        );
    }
    group.finish();
}

/// One change, N sessions: every session task is woken, takes the shared encoded delta and
/// writes it to its (sink) transport. Measures from the commit reaching the hub to the last write.
fn fanout_benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("fan-out");
    group.sample_size(20);
    for sessions in [1_000usize, 10_000] {
        let hub = Hub::new(100);
        let env = history(100, 100);
        let selector = env.selector();
        let items: Vec<Item> = env.flags().map(|e| Item::Flag(e.clone())).collect();
        hub.load(Loaded {
            envs: vec![LoadedEnv {
                name: "bench".into(),
                selector,
                items,
                changes: Vec::new(),
                state: vane_server::store::EnvState::Ready,
                retention: vane_server::store::Retention::default(),
            }],
            ..Loaded::default()
        });
        let env_hub = hub.env("bench").expect("loaded");
        let done = Arc::new(tokio::sync::Semaphore::new(0));
        let _tasks: Vec<_> = (0..sessions)
            .map(|_| {
                let mut rx = env_hub.subscribe();
                let done = done.clone();
                runtime.spawn(async move {
                    let mut sink = tokio::io::sink();
                    while rx.changed().await.is_ok() {
                        let bytes = rx.borrow_and_update().delta.clone();
                        let _ = sink.write_all(&bytes).await;
                        done.add_permits(1);
                    }
                })
            })
            .collect();
        group.bench_function(
            BenchmarkId::new("one change to N sessions", sessions),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let version = env_hub.selector().version + 1;
                        let f = flag(0, version.is_multiple_of(2));
                        let change = Write::flag(f).expect("valid").into_change(version);
                        let start = Instant::now();
                        env_hub.apply(selector.epoch, change);
                        runtime.block_on(async {
                            let all = done.acquire_many(sessions as u32).await.expect("open");
                            all.forget();
                        });
                        total += start.elapsed();
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, codec_benches, merge_benches, fanout_benches);
criterion_main!(benches);
