//! OFREP 0.3.0 against a real server: every answer checked field by field against the spec's
//! schemas (`evaluationSuccess`, `evaluationFailure`, `flagNotFound`, `bulkEvaluationSuccess`,
//! `bulkEvaluationFailure`), the status of each failure, SDK keys in both headers, and the bulk
//! answer's ETag and 304.

use serde_json::{Value, json};
use vane_server::keys::KeyKind;

use crate::harness::*;

const REASONS: [&str; 6] = [
    "STATIC",
    "TARGETING_MATCH",
    "SPLIT",
    "DISABLED",
    "UNKNOWN",
    // OpenFeature's reason for a fallthrough; OFREP's ADR-0006 answers it, its enum omits it.
    "DEFAULT",
];
const FAILURES: [&str; 4] = [
    "PARSE_ERROR",
    "TARGETING_KEY_MISSING",
    "INVALID_CONTEXT",
    "GENERAL",
];

/// `metadata`: an object of booleans, strings and numbers.
fn check_metadata(v: &Value) {
    let m = v.as_object().expect("metadata is an object");
    for (k, x) in m {
        assert!(
            x.is_boolean() || x.is_string() || x.is_number(),
            "metadata {k} = {x}"
        );
    }
}

/// `evaluationSuccess`: key and reason required, variant a string, value of one of the flag
/// types (or absent: `codeDefaultFlag`), nothing else.
fn check_success(v: &Value) {
    let o = v.as_object().expect("an object");
    for k in o.keys() {
        assert!(
            ["key", "value", "reason", "variant", "metadata"].contains(&k.as_str()),
            "unexpected field {k} in {v}"
        );
    }
    assert!(o["key"].is_string(), "{v}");
    let reason = o["reason"].as_str().expect("reason is a string");
    assert!(REASONS.contains(&reason), "reason {reason}");
    if let Some(variant) = o.get("variant") {
        assert!(variant.is_string(), "{v}");
    }
    if let Some(value) = o.get("value") {
        assert!(
            value.is_boolean() || value.is_string() || value.is_number() || value.is_object(),
            "value {value}"
        );
    }
    if let Some(m) = o.get("metadata") {
        check_metadata(m);
    }
}

/// `evaluationFailure` (or `flagNotFound` with `FLAG_NOT_FOUND`): key and errorCode required.
fn check_failure(v: &Value, codes: &[&str]) {
    let o = v.as_object().expect("an object");
    for k in o.keys() {
        assert!(
            ["key", "errorCode", "errorDetails", "metadata"].contains(&k.as_str()),
            "unexpected field {k} in {v}"
        );
    }
    assert!(o["key"].is_string(), "{v}");
    let code = o["errorCode"].as_str().expect("errorCode is a string");
    assert!(codes.contains(&code), "errorCode {code}");
    if let Some(d) = o.get("errorDetails") {
        assert!(d.is_string());
    }
}

struct Ofrep {
    server: TestServer,
    server_key: String,
    mobile_key: String,
    http: reqwest::Client,
}

async fn setup() -> Ofrep {
    let server = TestServer::start().await;
    let server_key = server.env_with_key("prod", KeyKind::Server).await;
    let mobile_key = server.key("prod", KeyKind::Mobile).await;
    server
        .put_flag(
            "prod",
            "banner",
            json!({"on": true, "variants": {"on": true, "off": false},
                   "off_variant": "off", "fallthrough": {"variant": "on"}}),
        )
        .await;
    server
        .put_flag(
            "prod",
            "plan",
            json!({"on": true, "variants": {"pro": "Pro", "free": "Free"}, "off_variant": "free",
                   "rules": [{"id": "pros", "clauses": [{"attribute": "plan", "op": "in", "values": ["pro"]}],
                              "serve": {"variant": "pro"}}],
                   "fallthrough": {"variant": "free"}}),
        )
        .await;
    server
        .put_flag(
            "prod",
            "limit",
            json!({"on": true, "variants": {"low": 10, "odd": 2.5}, "off_variant": "low",
                   "fallthrough": {"variant": "low"}}),
        )
        .await;
    server
        .put_flag(
            "prod",
            "theme",
            json!({"on": false, "variants": {"dark": {"bg": "#000"}, "light": {"bg": "#fff"}},
                   "off_variant": "light", "fallthrough": {"variant": "dark"}}),
        )
        .await;
    server
        .put_flag(
            "prod",
            "split",
            json!({"on": true, "variants": {"a": "A", "b": "B"}, "off_variant": "a",
                   "fallthrough": {"rollout": {"variants": [{"variant": "a", "weight": 50000},
                                                             {"variant": "b", "weight": 50000}]}}}),
        )
        .await;
    Ofrep {
        server,
        server_key,
        mobile_key,
        http: reqwest::Client::new(),
    }
}

impl Ofrep {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.http)
    }

    async fn one(&self, key: &str, body: Value, api_key: &str) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(&format!("/ofrep/v1/evaluate/flags/{key}")))
            .header("x-api-key", api_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn bulk(&self, body: Value, etag: Option<&str>) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.url("/ofrep/v1/evaluate/flags"))
            .bearer_auth(&self.server_key)
            .json(&body);
        if let Some(tag) = etag {
            req = req.header("if-none-match", tag);
        }
        req.send().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_evaluations_follow_the_schema() {
    let o = setup().await;
    let pro = json!({"context": {"targetingKey": "u-1", "plan": "pro"}});
    for (key, value, reason, variant) in [
        ("banner", json!(true), "STATIC", "on"),
        ("plan", json!("Pro"), "TARGETING_MATCH", "pro"),
        ("limit", json!(10), "STATIC", "low"),
        ("theme", json!({"bg": "#fff"}), "DISABLED", "light"),
    ] {
        for api_key in [&o.server_key, &o.mobile_key] {
            let (status, body) = o.one(key, pro.clone(), api_key).await;
            assert_eq!(status, 200, "{key}: {body}");
            check_success(&body);
            assert_eq!(body["key"], key);
            assert_eq!(body["value"], value, "{key}");
            assert_eq!(body["reason"], reason, "{key}");
            assert_eq!(body["variant"], variant, "{key}");
            assert!(body["metadata"]["version"].as_u64().unwrap() > 0);
        }
    }
    let (_, free) = o
        .one(
            "plan",
            json!({"context": {"targetingKey": "u-2"}}),
            &o.server_key,
        )
        .await;
    assert_eq!(
        (&free["value"], &free["reason"]),
        (&json!("Free"), &json!("DEFAULT"))
    );
    let (_, split) = o.one("split", pro.clone(), &o.server_key).await;
    check_success(&split);
    assert_eq!(split["reason"], "SPLIT");
    // The Bearer header works as X-API-Key does.
    let response = o
        .http
        .post(o.url("/ofrep/v1/evaluate/flags/banner"))
        .bearer_auth(&o.mobile_key)
        .json(&pro)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_have_the_spec_codes_and_statuses() {
    let o = setup().await;
    let ctx = json!({"context": {"targetingKey": "u-1"}});
    let (status, body) = o.one("nope", ctx.clone(), &o.server_key).await;
    assert_eq!(status, 404);
    check_failure(&body, &["FLAG_NOT_FOUND"]);
    assert_eq!(
        (&body["key"], &body["errorCode"]),
        (&json!("nope"), &json!("FLAG_NOT_FOUND"))
    );

    let (status, body) = o
        .one("split", json!({"context": {"plan": "pro"}}), &o.server_key)
        .await;
    assert_eq!(status, 400);
    check_failure(&body, &FAILURES);
    assert_eq!(body["errorCode"], "TARGETING_KEY_MISSING");
    // A flag that needs no key answers without one.
    let (status, _) = o.one("banner", json!({"context": {}}), &o.server_key).await;
    assert_eq!(status, 200);

    for (body, code) in [
        (json!({}), "INVALID_CONTEXT"),
        (json!({"context": "u-1"}), "INVALID_CONTEXT"),
        (json!({"context": {"targetingKey": 5}}), "INVALID_CONTEXT"),
    ] {
        let (status, answer) = o.one("banner", body, &o.server_key).await;
        assert_eq!(status, 400);
        check_failure(&answer, &FAILURES);
        assert_eq!(answer["errorCode"], code);
    }
    let raw = o
        .http
        .post(o.url("/ofrep/v1/evaluate/flags/banner"))
        .header("x-api-key", &o.server_key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let answer: Value = raw.json().await.unwrap();
    check_failure(&answer, &FAILURES);
    assert_eq!(answer["errorCode"], "PARSE_ERROR");

    // No key, a wrong key.
    let none = o
        .http
        .post(o.url("/ofrep/v1/evaluate/flags/banner"))
        .json(&ctx)
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    let (status, _) = o.one("banner", ctx, "vane_srv_wrong").await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_evaluation_has_an_etag_and_answers_304_until_a_change() {
    let o = setup().await;
    let ctx = json!({"context": {"targetingKey": "u-1", "plan": "pro"}});
    let first = o.bulk(ctx.clone(), None).await;
    assert_eq!(first.status(), 200);
    let tag = first.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = first.json().await.unwrap();
    let o_body = body.as_object().unwrap();
    for k in o_body.keys() {
        assert!(
            ["flags", "metadata", "eventStreams"].contains(&k.as_str()),
            "{k}"
        );
    }
    check_metadata(&body["metadata"]);
    let flags = body["flags"].as_array().unwrap();
    assert_eq!(flags.len(), 5);
    for f in flags {
        check_success(f);
    }
    let keys: Vec<&str> = flags.iter().map(|f| f["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["banner", "limit", "plan", "split", "theme"]);

    // Unchanged: 304, no body.
    let again = o.bulk(ctx.clone(), Some(&tag)).await;
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"].to_str().unwrap(), tag);
    assert!(again.bytes().await.unwrap().is_empty());
    // Another context is another tag.
    let other = o
        .bulk(json!({"context": {"targetingKey": "u-2"}}), Some(&tag))
        .await;
    assert_eq!(other.status(), 200);

    // A context without a key: the flags that need one fail alone, inside a 200.
    let keyless = o.bulk(json!({"context": {}}), None).await;
    assert_eq!(keyless.status(), 200);
    let body: Value = keyless.json().await.unwrap();
    let split = body["flags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "split")
        .unwrap()
        .clone();
    check_failure(&split, &FAILURES);
    assert_eq!(split["errorCode"], "TARGETING_KEY_MISSING");

    // A change: a new tag and the new value.
    o.server.toggle("prod", "banner", false).await;
    let changed = o.bulk(ctx.clone(), Some(&tag)).await;
    assert_eq!(changed.status(), 200);
    assert_ne!(changed.headers()["etag"].to_str().unwrap(), tag);
    let body: Value = changed.json().await.unwrap();
    assert_eq!(body["flags"][0]["reason"], "DISABLED");

    // The whole request failing: `bulkEvaluationFailure`.
    let bad = o.bulk(json!({"context": 1}), None).await;
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["errorCode"], "INVALID_CONTEXT");
    assert!(body.get("key").is_none(), "{body}");
}
