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

/// "plan": `variants` (each serving its capitalised name), the rule for `plan: pro` serving
/// `pros_get`, everyone else "free".
fn plan_flag(variants: &[&str], pros_get: &str) -> Value {
    let values: serde_json::Map<String, Value> = variants
        .iter()
        .map(|v| {
            (
                v.to_string(),
                json!(format!("{}{}", v[..1].to_uppercase(), &v[1..])),
            )
        })
        .collect();
    json!({"on": true, "variants": values, "off_variant": "free",
           "rules": [{"id": "pros", "clauses": [{"attribute": "plan", "op": "in", "values": ["pro"]}],
                      "serve": {"variant": pros_get}}],
           "fallthrough": {"variant": "free"}})
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
        .put_flag("prod", "plan", plan_flag(&["pro", "free"], "pro"))
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
    server.put_flag("prod", "split", fifty_fifty()).await;
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

/// An SSE stream read event by event.
struct Events {
    response: reqwest::Response,
    buf: String,
}

#[derive(Debug)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: Value,
}

impl Events {
    async fn open(o: &Ofrep, request_uri: &str, last_event_id: Option<&str>) -> Events {
        let mut req = o.http.get(o.url(request_uri));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let response = req.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Events {
            response,
            buf: String::new(),
        }
    }

    /// The next event (comments skipped); `None` when the stream ends.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    let data = serde_json::from_str(&data).expect("data is JSON");
                    return Some(SseEvent { id, event, data });
                }
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("an event in time")
                .ok()??;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// The `sseEventData` of a refetch, checked against the schema; its ETag.
fn refetch_etag(e: &SseEvent) -> String {
    assert_eq!(e.event.as_deref(), Some("message"));
    assert_eq!(e.data["type"], "refetchEvaluation");
    assert!(e.data["lastModified"].as_u64().is_some());
    let etag = e.data["etag"].as_str().unwrap().to_owned();
    assert_eq!(e.id.as_deref(), Some(etag.trim_matches('"')));
    etag
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_says_refetch_only_when_this_contexts_values_change() {
    let o = setup().await;
    let ctx = json!({"context": {"targetingKey": "u-1", "plan": "free"}});
    let first = o.bulk(ctx.clone(), None).await;
    let tag = first.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = first.json().await.unwrap();
    let stream = &body["eventStreams"][0];
    assert_eq!(stream["type"], "sse");
    assert_eq!(stream["inactivityDelaySec"], 120);
    let uri = stream["endpoint"]["requestUri"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(uri.starts_with("/ofrep/v1/events?token="), "{uri}");
    assert!(
        stream.get("url").is_none(),
        "exactly one of url and endpoint"
    );

    // On connecting: where the values stand, so a change since the bulk answer is not missed.
    let mut events = Events::open(&o, &uri, None).await;
    assert_eq!(refetch_etag(&events.next().await.unwrap()), tag);

    // A change that leaves this context's values alone (the rule for "pro" serves another
    // variant to pros): no event, and the bulk ETag is the same.
    o.server
        .put_flag("prod", "plan", plan_flag(&["pro", "free", "max"], "max"))
        .await;
    let unchanged = o.bulk(ctx.clone(), Some(&tag)).await;
    assert_eq!(unchanged.status(), 304, "the values are the same");
    // A change that does alter them: the next event is this one.
    o.server.toggle("prod", "banner", false).await;
    let after = o.bulk(ctx.clone(), None).await;
    let new_tag = after.headers()["etag"].to_str().unwrap().to_owned();
    assert_ne!(new_tag, tag);
    let event = events.next().await.unwrap();
    assert_eq!(
        refetch_etag(&event),
        new_tag,
        "the unrelated change sent nothing"
    );

    // Reconnecting with Last-Event-ID of the current state: no event until the next change.
    let mut resumed = Events::open(&o, &uri, Some(new_tag.trim_matches('"'))).await;
    o.server.toggle("prod", "banner", true).await;
    let back = refetch_etag(&resumed.next().await.unwrap());
    assert_eq!(back, tag, "banner on again: the values of the first answer");

    // Another context's stream is not told of a change that only concerns pros; a pro's is.
    let pro = json!({"context": {"targetingKey": "u-2", "plan": "pro"}});
    let pro_body: Value = o.bulk(pro.clone(), None).await.json().await.unwrap();
    let pro_uri = pro_body["eventStreams"][0]["endpoint"]["requestUri"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(pro_uri, uri, "the token names the context");
    let mut pro_events = Events::open(&o, &pro_uri, None).await;
    pro_events.next().await.unwrap();
    o.server
        .put_flag("prod", "plan", plan_flag(&["pro", "free"], "pro"))
        .await;
    let pro_tag = o.bulk(pro, None).await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(refetch_etag(&pro_events.next().await.unwrap()), pro_tag);
    o.server.toggle("prod", "limit", false).await;
    let free_tag = o.bulk(ctx, None).await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        refetch_etag(&resumed.next().await.unwrap()),
        free_tag,
        "the free user heard nothing of the pros' change, then of this one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_end_with_their_key_and_need_this_servers_token() {
    let o = setup().await;
    let ctx = json!({"context": {"targetingKey": "u-1"}});
    let body: Value = o.bulk(ctx, None).await.json().await.unwrap();
    let uri = body["eventStreams"][0]["endpoint"]["requestUri"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut events = Events::open(&o, &uri, None).await;
    events.next().await.unwrap();

    // A token changed by one character is refused.
    let mut forged = uri.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let refused = o.http.get(o.url(&forged)).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let missing = o.http.get(o.url("/ofrep/v1/events")).send().await.unwrap();
    assert_eq!(missing.status(), 401);

    // Revoking the key ends its streams, and they cannot be reopened.
    let keys = o.server.admin.keys("prod").await.unwrap();
    let id = keys
        .keys
        .iter()
        .find(|k| k.kind == KeyKind::Server)
        .unwrap()
        .id
        .clone();
    o.server.admin.revoke_key("prod", &id).await.unwrap();
    assert!(events.next().await.is_none(), "the stream ended");
    let again = o.http.get(o.url(&uri)).send().await.unwrap();
    assert_eq!(again.status(), 401);
}

/// OpenFeature's own web provider (`tests/ofrep-web`, from npm; `scripts/test-all` installs it)
/// under Node: it gets a value, then a change event over the stream, and the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_web_provider_gets_a_value_and_a_change_event() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ofrep-web");
    assert!(
        dir.join("node_modules/@openfeature/ofrep-web-provider")
            .exists(),
        "run `npm ci` in {} (scripts/test-all does)",
        dir.display()
    );
    let o = setup().await;
    let mut node = tokio::process::Command::new("node")
        .arg(dir.join("check.mjs"))
        .arg(format!("http://{}", o.server.http))
        .arg(&o.mobile_key)
        .arg("banner")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node (Node.js 20) is installed");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("the provider said something in time")
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
    };
    let ready = next().await;
    assert_eq!(ready["step"], "ready", "{ready}");
    assert_eq!(
        (&ready["value"], &ready["reason"]),
        (&json!(true), &json!("STATIC"))
    );
    o.server.toggle("prod", "banner", false).await;
    let changed = next().await;
    assert_eq!(changed["step"], "changed", "{changed}");
    assert_eq!(changed["value"], false, "{changed}");
    assert_eq!(changed["reason"], "DISABLED");
    assert!(
        changed["flags"]
            .as_array()
            .unwrap()
            .contains(&json!("banner")),
        "{changed}"
    );
    let status = tokio::time::timeout(PATIENCE, node.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

/// A counter of /metrics text, 0 before anything was counted.
fn count(metrics: &str, name: &str) -> u64 {
    series(metrics, name.trim_end()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_events_reach_the_file_and_a_stalled_webhook_drops_without_blocking() {
    // A webhook that accepts connections and never answers.
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/events", stall.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = stall.accept().await {
            conns.push(c);
        }
    });
    let server = TestServer::start_with(|c| {
        c.events.enabled = true;
        c.events.file = Some(c.data_dir.join("events.jsonl"));
        c.events.webhook = Some(hook);
        c.events.webhook_batch = 10;
        c.events.webhook_interval = std::time::Duration::from_millis(20);
        c.events.webhook_buffer = 50;
    })
    .await;
    let key = server.env_with_key("prod", KeyKind::Server).await;
    server.put_bool("prod", "banner", true).await;
    let http = reqwest::Client::new();
    const N: u64 = 500;
    for i in 0..N {
        let answer = http
            .post(format!(
                "http://{}/ofrep/v1/evaluate/flags/banner",
                server.http
            ))
            .header("x-api-key", &key)
            .json(&json!({"context": {"targetingKey": format!("u-{i}")}}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            answer.status(),
            200,
            "every evaluation answered, the webhook stalled"
        );
    }
    let written = "vane_evaluation_events_total{outcome=\"written\",stage=\"file\"} ";
    let metrics = tokio::time::timeout(PATIENCE, async {
        loop {
            let m = server.admin.metrics().await.unwrap();
            if count(&m, written) == N {
                return m;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every event written to the file");
    assert_eq!(
        count(
            &metrics,
            "vane_evaluations_total{env=\"prod\",flag=\"banner\",variant=\"true\",reason=\"STATIC\",source=\"ofrep\"} "
        ),
        N,
        "{metrics}"
    );
    let dropped = "vane_evaluation_events_total{outcome=\"dropped\",stage=\"webhook\"} ";
    assert!(
        count(&metrics, dropped) >= N - 50 - 10 - 1,
        "the stalled webhook's events beyond its buffer were dropped and counted: {metrics}"
    );
    assert_eq!(
        count(
            &metrics,
            "vane_evaluation_events_total{outcome=\"dropped\",stage=\"queue\"} "
        ),
        0
    );
    let text = std::fs::read_to_string(server.dir.path().join("events.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, N);
    assert_eq!(lines[0]["env"], "prod");
    assert_eq!(lines[0]["flag"], "banner");
    assert_eq!(lines[0]["variant"], "true");
    assert_eq!(lines[0]["reason"], "STATIC");
    assert_eq!(lines[0]["source"], "ofrep");
    held.abort();
}

/// An HTTPS request to `addr` trusting `ca`; the raw answer.
async fn https_get(addr: std::net::SocketAddr, ca: &[u8], path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = (*vane_core::client::tls_config(ca).unwrap()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await?;
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_serves_https_with_the_servers_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = vane_server::server::ServerConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.http = "127.0.0.1:0".parse().unwrap();
    config.http_tls = true;
    let server = vane_server::server::Server::bind(config).await.unwrap();
    let (addr, ca) = (server.http_addr(), std::fs::read(server.ca_path()).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone().cancelled_owned()));
    let answer = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Ok(a) = https_get(addr, &ca, "/readyz").await
                && a.starts_with("HTTP/1.1 200")
            {
                return a;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("ready over HTTPS");
    assert!(answer.ends_with("ready\n"), "{answer}");
    // Plain HTTP on that port gets no answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    stop.cancel();
    task.await.unwrap().unwrap();
}
