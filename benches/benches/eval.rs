//! Evaluation speed, and proof that the hot path does not allocate.
//!
//! `cargo bench -p vane-benches --bench eval`. Before measuring, each case is evaluated 10,000
//! times under a counting global allocator and the number of allocations is printed (and must be
//! zero, or the bench stops). The `count` group measures what a getter adds for the evaluation
//! summaries (docs/PROTOCOL.md 4.8): off (the server did not ask), on, and on while another
//! thread counts the same flag.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use vane_benches::{
    CountingAllocator, big_segment, bool_flag, one_rule_rollout_flag, ten_rules_flag,
};
use vane_core::eval::{CompiledFlag, CompiledSegment, Context, NoSegments, SegmentSource};
use vane_core::summary::EvaluationCounts;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

fn compile(flag: serde_json::Value) -> CompiledFlag {
    CompiledFlag::new(serde_json::from_value(flag).expect("flag JSON")).expect("valid flag")
}

/// Evaluates 10,000 times and returns the allocations made.
fn allocations(flag: &CompiledFlag, ctx: &Context, segments: &dyn SegmentSource) -> u64 {
    let before = ALLOC.count();
    for _ in 0..10_000 {
        black_box(flag.evaluate(black_box(ctx), segments));
    }
    ALLOC.count() - before
}

fn bench(c: &mut Criterion) {
    let plain = compile(bool_flag());
    let rollout = compile(one_rule_rollout_flag());
    let big = compile(ten_rules_flag());
    let segment =
        CompiledSegment::new(serde_json::from_value(big_segment(10_000)).expect("segment JSON"))
            .expect("valid segment");
    let segments: HashMap<String, Arc<CompiledSegment>> =
        HashMap::from([("beta".to_owned(), Arc::new(segment))]);
    let ctx = Context::new(
        json!({"key": "user-4711", "country": "de", "plan": "free", "app": {"version": "2.3.1"}}),
    )
    .expect("context");

    for (name, flag, segs) in [
        ("bool, no rules", &plain, &NoSegments as &dyn SegmentSource),
        ("1 rule + rollout", &rollout, &NoSegments),
        ("10 rules + 10k-key segment", &big, &segments),
    ] {
        let n = allocations(flag, &ctx, segs);
        println!("allocations in 10,000 evaluations of {name}: {n}");
        assert_eq!(n, 0, "{name}: the hot path allocated");
    }
    assert_eq!(
        big.evaluate(&ctx, &segments).variant,
        Some("b"),
        "the segment rule decides"
    );
    assert!(
        rollout.evaluate(&ctx, &NoSegments).bucket.is_some(),
        "the rollout decides"
    );

    let mut group = c.benchmark_group("evaluate");
    group.bench_function("bool, no rules", |b| {
        b.iter(|| black_box(plain.evaluate(black_box(&ctx), &NoSegments)))
    });
    group.bench_function("1 rule + rollout", |b| {
        b.iter(|| black_box(rollout.evaluate(black_box(&ctx), &NoSegments)))
    });
    group.bench_function("10 rules + 10k-key segment", |b| {
        b.iter(|| black_box(big.evaluate(black_box(&ctx), &segments)))
    });
    group.finish();
    count_bench(c, &plain, &ctx);
}

/// What counting one evaluation costs the getter.
fn count_bench(c: &mut Criterion, flag: &CompiledFlag, ctx: &Context) {
    let e = flag.evaluate(ctx, &NoSegments);
    let counts = Arc::new(EvaluationCounts::default());
    counts.set_on(true, 1);
    counts.count("flag-7", &e); // the first count of a key allocates it
    let before = ALLOC.count();
    for _ in 0..10_000 {
        counts.count(black_box("flag-7"), black_box(&e));
    }
    let n = ALLOC.count() - before;
    println!("allocations in 10,000 counts of a counted flag: {n}");
    assert_eq!(n, 0, "counting a flag already in the window allocated");

    let mut group = c.benchmark_group("count");
    let off = EvaluationCounts::default();
    group.bench_function("off", |b| {
        b.iter(|| off.count(black_box("flag-7"), black_box(&e)))
    });
    group.bench_function("on", |b| {
        b.iter(|| counts.count(black_box("flag-7"), black_box(&e)))
    });
    // Another thread counting the same flag all along: it keeps to its own shard.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (counts, stop, e) = (counts.clone(), stop.clone(), e.variant.map(str::to_owned));
        std::thread::spawn(move || {
            let e = vane_core::eval::Evaluation {
                variant: e.as_deref(),
                ..vane_core::eval::Evaluation::failed(vane_core::eval::ErrorCode::General)
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                counts.count("flag-7", &e);
            }
        })
    };
    group.bench_function("on, another thread counting", |b| {
        b.iter(|| counts.count(black_box("flag-7"), black_box(&e)))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = other.join();
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
