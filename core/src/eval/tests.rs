//! The shared vectors in `core/testdata/evaluation/`, and properties of the engine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value as Json, json};

use super::*;
use crate::model::{Segment, ValueType};

fn compile_segments(list: &Json) -> HashMap<String, Arc<CompiledSegment>> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let seg: Segment = serde_json::from_value(s.clone()).unwrap();
            CompiledSegment::new(seg.clone()).unwrap();
            (
                seg.key.clone(),
                Arc::new(CompiledSegment::new(seg).unwrap()),
            )
        })
        .collect()
}

#[test]
fn shared_vectors() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/evaluation");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "vectors found in {}", dir.display());
    let mut checked = 0;
    for file in files {
        let doc: Json = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let segments = compile_segments(&doc["segments"]);
        let flags: HashMap<String, CompiledFlag> = doc["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let flag: Flag = serde_json::from_value(f.clone()).unwrap();
                let key = flag.key.clone();
                let compiled = CompiledFlag::new(flag)
                    .unwrap_or_else(|e| panic!("{}: {key}: {e}", file.display()));
                (key, compiled)
            })
            .collect();
        for case in doc["cases"].as_array().unwrap() {
            let name = format!(
                "{}: {}",
                file.file_name().unwrap().to_string_lossy(),
                case["name"]
            );
            let ctx = Context::new(case["context"].clone()).unwrap();
            let mut e = match flags.get(case["flag"].as_str().unwrap()) {
                Some(f) => f.evaluate(&ctx, &segments),
                None => Evaluation::not_found(),
            };
            if let Some(t) = case["type"].as_str() {
                e = e.typed(serde_json::from_value(json!(t)).unwrap());
            }
            let expect = &case["expect"];
            let value = e.value.map(|v| serde_json::to_value(v).unwrap());
            assert_eq!(value.as_ref(), expect.get("value"), "{name}: value");
            assert_eq!(e.variant, expect["variant"].as_str(), "{name}: variant");
            assert_eq!(json!(e.reason), expect["reason"], "{name}: reason");
            assert_eq!(
                e.error.map(ErrorCode::as_str),
                expect["error_code"].as_str(),
                "{name}: error code"
            );
            if let Some(rule) = expect.get("rule") {
                assert_eq!(e.rule.map(|r| r as u64), rule.as_u64(), "{name}: rule");
            }
            if let Some(bucket) = expect.get("bucket") {
                assert_eq!(e.bucket.map(u64::from), bucket.as_u64(), "{name}: bucket");
            }
            checked += 1;
        }
    }
    assert!(checked >= 50, "only {checked} cases");
}

#[test]
fn a_30_70_split_over_100k_keys_lands_within_one_percent() {
    let flag: Flag = serde_json::from_value(json!({
        "key": "split", "on": true, "variants": {"a": 1, "b": 2}, "off_variant": "a",
        "fallthrough": {"rollout": {"variants": [{"variant": "a", "weight": 30000}, {"variant": "b", "weight": 70000}]}}
    }))
    .unwrap();
    let flag = CompiledFlag::new(flag).unwrap();
    let n = 100_000;
    let a = (0..n)
        .filter(|i| {
            let ctx = Context::with_key(format!("user-{i}"));
            flag.evaluate(&ctx, &NoSegments).variant == Some("a")
        })
        .count();
    let share = a as f64 / n as f64;
    assert!((0.29..=0.31).contains(&share), "share of a: {share}");
}

#[test]
fn buckets_are_stable_and_uniform_enough() {
    assert_eq!(bucket("checkout", "user-1"), 21999);
    let mut deciles = [0u32; 10];
    for i in 0..100_000 {
        deciles[(bucket("f", &i.to_string()) / 10_000) as usize] += 1;
    }
    for d in deciles {
        assert!((9_500..=10_500).contains(&d), "{deciles:?}");
    }
}

fn field_of(flag: Json) -> String {
    let flag: Flag = serde_json::from_value(flag).unwrap();
    CompiledFlag::new(flag).unwrap_err().to_string()
}

#[test]
fn validation_names_the_field_at_fault() {
    let base = |rules: Json, fallthrough: Json| json!({"key": "f", "on": true, "variants": {"a": 1, "b": 2}, "off_variant": "a", "rules": rules, "fallthrough": fallthrough});
    let v = json!({"variant": "a"});
    let e = field_of(base(
        json!([{"clauses": [{"attribute": "x", "op": "matches", "values": ["(unclosed"]}], "serve": v}]),
        v.clone(),
    ));
    assert!(
        e.starts_with("rules[0].clauses[0].values[0]: invalid regular expression"),
        "{e}"
    );
    let e = field_of(base(
        json!([]),
        json!({"rollout": {"variants": [{"variant": "a", "weight": 50}]}}),
    ));
    assert!(
        e.starts_with("fallthrough.rollout.variants: weights sum to 50"),
        "{e}"
    );
    let e = field_of(base(
        json!([{"clauses": [], "serve": {"variant": "zz"}}]),
        v.clone(),
    ));
    assert!(
        e.starts_with("rules[0].serve.variant: unknown variant"),
        "{e}"
    );
    let e = field_of(base(
        json!([{"clauses": [{"attribute": "v", "op": "semver_gt", "values": ["one"]}], "serve": v}]),
        v.clone(),
    ));
    assert!(
        e.starts_with("rules[0].clauses[0].values[0]: \"one\" is not a semantic version"),
        "{e}"
    );
    let e = field_of(base(
        json!([{"clauses": [{"attribute": "t", "op": "after", "values": ["yesterday"]}], "serve": v}]),
        v.clone(),
    ));
    assert!(
        e.starts_with("rules[0].clauses[0].values[0]: must be an RFC 3339 time"),
        "{e}"
    );
    let e = field_of(base(
        json!([{"clauses": [{"attribute": "n", "op": "gt", "values": ["3"]}], "serve": v}]),
        v.clone(),
    ));
    assert!(
        e.starts_with("rules[0].clauses[0].values[0]: must be a number"),
        "{e}"
    );
    let huge = "a".repeat(MAX_REGEX_LEN + 1);
    let e = field_of(base(
        json!([{"clauses": [{"attribute": "x", "op": "matches", "values": [huge]}], "serve": v}]),
        v.clone(),
    ));
    assert!(e.contains("longer than"), "{e}");
    // A regex that compiles to more than the size limit.
    let e = field_of(base(
        json!([{"clauses": [{"attribute": "x", "op": "matches", "values": ["(?:a{100}){100}"]}], "serve": v}]),
        v,
    ));
    assert!(e.contains("compiles to more than 256 KiB"), "{e}");
}

#[test]
fn segment_graphs_reject_unknown_references_and_cycles() {
    use crate::model::check_segment_graph;
    let graph: HashMap<&str, Vec<String>> = HashMap::from([
        ("a", vec!["b".to_owned()]),
        ("b", vec!["c".to_owned()]),
        ("c", vec![]),
    ]);
    let lookup = |k: &str| graph.get(k).cloned();
    assert!(check_segment_graph(None, ["a"].into_iter(), &lookup).is_ok());
    let e = check_segment_graph(None, ["zz"].into_iter(), &lookup).unwrap_err();
    assert!(e.message.contains("unknown segment \"zz\""), "{e}");
    // Writing c so that it refers to a closes the loop a → b → c → a.
    let e = check_segment_graph(Some("c"), ["a"].into_iter(), &lookup).unwrap_err();
    assert!(e.message.contains("cycle"), "{e}");
    let e = check_segment_graph(Some("c"), ["c"].into_iter(), &lookup).unwrap_err();
    assert!(e.message.contains("cycle"), "{e}");
}

#[test]
fn contexts_must_be_objects_with_a_string_key() {
    assert!(Context::parse("[1]").is_err());
    assert!(Context::parse(r#"{"key": 5}"#).is_err());
    assert!(Context::parse("{not json").is_err());
    let ctx = Context::parse(r#"{"key": "k", "a": {"b": {"c": 1}}}"#).unwrap();
    assert_eq!(ctx.key(), Some("k"));
    assert_eq!(ctx.get("a.b.c"), Some(&json!(1)));
    assert_eq!(ctx.get("a.x"), None);
    let _ = ValueType::Bool;
}

#[test]
fn validation_names_the_field() {
    use crate::model::{FlagValue, MAX_JSON_VALUE_LEN, Serve};
    use std::collections::BTreeMap;
    let field = |flag: Flag| CompiledFlag::new(flag).unwrap_err().field;

    let mut flag = Flag::boolean("ok", true, true);
    flag.off_variant = "nope".into();
    assert_eq!(field(flag), "off_variant");

    let mut mixed = Flag::boolean("ok", true, true);
    mixed
        .variants
        .insert("zzz".into(), FlagValue::String("s".into()));
    assert_eq!(field(mixed), "variants.zzz");

    let mut long = Flag::boolean("ok", true, true);
    long.variants = BTreeMap::from([(
        "s".into(),
        FlagValue::String("x".repeat(MAX_JSON_VALUE_LEN + 1)),
    )]);
    long.off_variant = "s".into();
    long.fallthrough = Serve::Variant("s".into());
    assert_eq!(field(long), "variants.s");

    assert_eq!(field(Flag::boolean("has space", true, true)), "key");

    let mut null = Flag::boolean("ok", true, true);
    null.variants
        .insert("n".into(), FlagValue::Json(serde_json::Value::Null));
    assert_eq!(field(null), "variants.n");
}
