//! OpenFeature's Remote Evaluation Protocol (OFREP 0.3.0, `service/openapi.yaml` of
//! open-feature/protocol), behind the readiness gate and SDK-key authentication
//! (`Authorization: Bearer <key>` or `X-API-Key: <key>`):
//!
//! - `POST /ofrep/v1/evaluate/flags/{key}`: one flag for the request's context.
//! - `POST /ofrep/v1/evaluate/flags`: every flag of the key's environment, with an `ETag` that
//!   names the values (not the version: a change that leaves this context's values as they were
//!   leaves the tag too); `If-None-Match` with it answers `304`. The answer advertises an event
//!   stream (ADR-0008).
//! - `GET /ofrep/v1/events?token=…`: that stream, Server-Sent Events. It sends
//!   `refetchEvaluation` with the new ETag when a change alters what the bulk answer for its
//!   key and context would be, and nothing for changes that do not; the token in the URL
//!   (browsers' `EventSource` sends no headers) is signed by the server and names the key and
//!   the context, so a revoked key's streams end and cannot be reopened.
//!
//! Both kinds of key may ask: OFREP only ever answers values, never rules, which is all a
//! mobile key may have. `context.targetingKey` is the context's key; its other properties are
//! attributes (a property named `key` gives way to `targetingKey`). Evaluation reads the same
//! compiled flags the socket sessions read, under no lock but the history's read of one
//! environment, and does no I/O.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::Stream;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use vane_core::eval::{Context, ErrorCode as EvalError, Evaluation, Reason};
use vane_core::history::EnvHistory;
use vane_core::history::evaluation_hash;
use vane_core::model::FlagValue;
use vane_core::protocol::Selector;

use super::AppState;
use super::sdk::not_modified;
use crate::events::{EvalEvent, event_reason};
use crate::hub::{EnvHub, Grant};

/// `POST`: one flag.
pub const EVALUATE_FLAG: &str = "/ofrep/v1/evaluate/flags/{key}";
/// `POST`: every flag (bulk).
pub const EVALUATE_FLAGS: &str = "/ofrep/v1/evaluate/flags";
/// `GET ?token=…`: the change events of a bulk answer (SSE).
pub const EVENTS: &str = "/ofrep/v1/events";

/// Seconds an inactive provider keeps its stream open (ADR-0008's `inactivityDelaySec`).
const INACTIVITY_DELAY_S: u32 = 120;
/// Between comments on a quiet stream, so proxies do not close it.
const STREAM_HEARTBEAT: Duration = Duration::from_secs(15);
/// The largest context (as JSON) a stream token carries; a bulk answer for a larger one
/// advertises no stream, and the provider polls.
const MAX_STREAM_CONTEXT: usize = 2048;

/// The OFREP routes that take an SDK key in a header.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(EVALUATE_FLAG, post(evaluate_one))
        .route(EVALUATE_FLAGS, post(evaluate_all))
}

/// The event stream, which authenticates by its signed token (behind the readiness gate only).
pub fn stream_routes() -> Router<AppState> {
    Router::new().route(EVENTS, get(events))
}

/// A successful evaluation (`evaluationSuccess`); `value` is absent when the flag defers to
/// the caller's default (`codeDefaultFlag`).
#[derive(Debug, Serialize)]
struct Success<'a> {
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Value>,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<FlagMetadata>,
}

/// A failed evaluation (`evaluationFailure`, `flagNotFound`, or the bulk request's own).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Failure<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    error_code: &'static str,
    error_details: String,
}

/// What a single answer says of its flag: the version it was written at. (A bulk answer says
/// nothing per flag: its ETag names the values, and a version would change where they did not.)
#[derive(Debug, Serialize)]
struct FlagMetadata {
    version: u64,
}

/// One item of a bulk answer.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Item<'a> {
    Success(Success<'a>),
    Failure(Failure<'a>),
}

/// `bulkEvaluationSuccess`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Bulk<'a> {
    flags: Vec<Item<'a>>,
    metadata: BulkMetadata<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    event_streams: Vec<EventStream>,
}

#[derive(Debug, Serialize)]
struct BulkMetadata<'a> {
    environment: &'a str,
}

/// `eventStream`: where to hear of changes; the origin is the provider's own.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EventStream {
    #[serde(rename = "type")]
    kind: &'static str,
    endpoint: StreamEndpoint,
    inactivity_delay_sec: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StreamEndpoint {
    request_uri: String,
}

/// An answer that is not a success: OFREP's failure body with its status.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    details: String,
    key: Option<String>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, details: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            details: details.into(),
            key: None,
        }
    }

    fn for_key(mut self, key: &str) -> Refusal {
        self.key = Some(key.to_owned());
        self
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = Failure {
            key: self.key.as_deref(),
            error_code: self.code,
            error_details: self.details,
        };
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            // `generalErrorResponse`: details only.
            let details = serde_json::json!({ "errorDetails": body.error_details });
            return (self.status, Json(details)).into_response();
        }
        (self.status, Json(body)).into_response()
    }
}

/// The request's context as Vane's: `{"context": {"targetingKey": …, …}}`.
fn context(body: &Bytes) -> Result<Context, Refusal> {
    let bad = |details: String| Refusal::new(StatusCode::BAD_REQUEST, "INVALID_CONTEXT", details);
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "PARSE_ERROR",
            format!("request body: {e}"),
        )
    })?;
    let Value::Object(mut request) = value else {
        return Err(bad("request body: expected {\"context\": {…}}".into()));
    };
    let attributes = match request.remove("context") {
        Some(Value::Object(attributes)) => attributes,
        Some(_) => return Err(bad("context: expected a JSON object".into())),
        None => return Err(bad("request body: missing \"context\"".into())),
    };
    let mut ctx: Map<String, Value> = attributes;
    match ctx.remove("targetingKey") {
        Some(Value::String(key)) => {
            ctx.insert("key".into(), Value::String(key));
        }
        Some(other) => return Err(bad(format!("targetingKey: expected a string, got {other}"))),
        // Without a targeting key a flag that needs one answers TARGETING_KEY_MISSING.
        None => {
            ctx.remove("key");
        }
    }
    Context::new(Value::Object(ctx)).map_err(|e| bad(e.to_string()))
}

/// OpenFeature's reason for Vane's.
fn reason(r: Reason) -> &'static str {
    event_reason(r, None)
}

/// A value as JSON; whole numbers without a fraction, so that OFREP's `integerFlag` reads them.
fn value(v: &FlagValue) -> Value {
    match v {
        FlagValue::Bool(b) => Value::Bool(*b),
        FlagValue::Number(n) if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 => {
            Value::from(*n as i64)
        }
        FlagValue::Number(n) => serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number),
        FlagValue::String(s) => Value::String(s.clone()),
        FlagValue::Json(j) => j.clone(),
    }
}

/// An evaluation as OFREP answers it, or the failure with its status.
fn answer<'a>(
    key: &'a str,
    version: Option<u64>,
    e: &Evaluation<'a>,
) -> Result<Success<'a>, Refusal> {
    match e.error {
        None => Ok(Success {
            key,
            value: e.value.map(value),
            reason: reason(e.reason),
            variant: e.variant,
            metadata: version.map(|version| FlagMetadata { version }),
        }),
        Some(code) => {
            let (status, name) = match code {
                EvalError::TargetingKeyMissing => {
                    (StatusCode::BAD_REQUEST, "TARGETING_KEY_MISSING")
                }
                EvalError::ParseError => (StatusCode::BAD_REQUEST, "PARSE_ERROR"),
                EvalError::FlagNotFound => (StatusCode::NOT_FOUND, "FLAG_NOT_FOUND"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "GENERAL"),
            };
            let details = match code {
                EvalError::TargetingKeyMissing => {
                    format!("flag {key:?} splits by targetingKey, and the context has none")
                }
                _ => e.explanation(),
            };
            Err(Refusal::new(status, name, details).for_key(key))
        }
    }
}

impl AppState {
    /// Hands the evaluation's event to the queue (never waits; nothing when events are off).
    fn record(&self, grant: &Grant, key: &str, e: &Evaluation<'_>) {
        if self.events.enabled() {
            self.events.record(EvalEvent::now(
                grant.env.as_str().into(),
                key,
                e.variant,
                event_reason(e.reason, e.error),
            ));
        }
    }
}

fn history_of<T>(
    state: &AppState,
    grant: &Grant,
    f: impl FnOnce(&str, &EnvHistory) -> T,
) -> Result<T, Refusal> {
    let env = state.hub().env(&grant.env).ok_or_else(|| {
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "GENERAL",
            format!("environment {:?} is not loaded", grant.env),
        )
    })?;
    Ok(env.with_history(|h| f(env.name(), h)))
}

async fn evaluate_one(
    State(state): State<AppState>,
    Extension(grant): Extension<Arc<Grant>>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    let ctx = match context(&body) {
        Ok(ctx) => ctx,
        Err(refusal) => return refusal.for_key(&key).into_response(),
    };
    let answered = history_of(&state, &grant, |_, h| match h.flag(&key) {
        None => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "FLAG_NOT_FOUND",
            format!("flag {key:?} was not found"),
        )
        .for_key(&key)),
        Some(entry) => {
            let e = entry.compiled.evaluate(&ctx, h);
            state.record(&grant, &key, &e);
            answer(&key, Some(entry.wire.version), &e).map(|s| Json(s).into_response())
        }
    });
    match answered {
        Ok(Ok(response)) => response,
        Ok(Err(refusal)) | Err(refusal) => refusal.into_response(),
    }
}

async fn evaluate_all(
    State(state): State<AppState>,
    Extension(grant): Extension<Arc<Grant>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ctx = match context(&body) {
        Ok(ctx) => ctx,
        Err(refusal) => return refusal.into_response(),
    };
    let answered = history_of(&state, &grant, |environment, h| {
        // Each flag is evaluated once: for the ETag, and then (if it does not match) the body.
        let evaluated = evaluate_every_flag(h, &ctx);
        let tag = values_etag(evaluated.iter().map(|(k, e)| (*k, evaluation_hash(e))));
        if not_modified(&headers, &tag) {
            return (tag, None);
        }
        let flags = evaluated
            .iter()
            .map(|(key, e)| {
                let key = *key;
                state.record(&grant, key, e);
                match answer(key, None, e) {
                    Ok(success) => Item::Success(success),
                    Err(refusal) => Item::Failure(Failure {
                        key: Some(key),
                        error_code: refusal.code,
                        error_details: refusal.details,
                    }),
                }
            })
            .collect();
        let stream = stream_token(&state.stream_key, &grant.id, &ctx).map(|token| EventStream {
            kind: "sse",
            endpoint: StreamEndpoint {
                request_uri: format!("{EVENTS}?token={token}"),
            },
            inactivity_delay_sec: INACTIVITY_DELAY_S,
        });
        let bulk = Bulk {
            flags,
            metadata: BulkMetadata { environment },
            event_streams: stream.into_iter().collect(),
        };
        // Encoded here, while the history is read: the items borrow from it.
        (tag, Some(serde_json::to_vec(&bulk)))
    });
    let (tag, body) = match answered {
        Ok(answered) => answered,
        Err(refusal) => return refusal.into_response(),
    };
    let Ok(tag) = HeaderValue::from_str(&tag) else {
        return Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "GENERAL", "bad ETag")
            .into_response();
    };
    let headers = [
        (header::ETAG, tag),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    match body {
        None => (StatusCode::NOT_MODIFIED, headers).into_response(),
        Some(Ok(json)) => (
            headers,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json,
        )
            .into_response(),
        Some(Err(e)) => Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "GENERAL", e.to_string())
            .into_response(),
    }
}

/// Every flag of the environment evaluated for `ctx`, by key.
fn evaluate_every_flag<'h>(h: &'h EnvHistory, ctx: &Context) -> Vec<(&'h str, Evaluation<'h>)> {
    h.flags()
        .map(|entry| (entry.wire.key.as_str(), entry.compiled.evaluate(ctx, h)))
        .collect()
}

/// The bulk answer's ETag from each flag's key and evaluation hash, in key order: it changes
/// exactly when the answer's values do.
fn values_etag<'a>(hashes: impl Iterator<Item = (&'a str, u64)>) -> String {
    let mut digest = Sha256::new();
    for (key, hash) in hashes {
        digest.update(key.as_bytes());
        digest.update([0]);
        digest.update(hash.to_le_bytes());
    }
    format!("\"{}\"", hex::encode(&digest.finalize()[..12]))
}

/// What an event stream remembers of its context's values: each flag's evaluation hash, and
/// the version they stand at, so a change re-evaluates only the flags it can have altered
/// (those it wrote, and those using a segment it wrote), not every flag for every stream.
#[derive(Debug)]
struct Watched {
    ctx: Context,
    hashes: BTreeMap<String, u64>,
    at: Selector,
}

impl Watched {
    fn new(h: &EnvHistory, ctx: Context) -> Watched {
        let mut w = Watched {
            ctx,
            hashes: BTreeMap::new(),
            at: h.selector(),
        };
        w.evaluate_all(h);
        w
    }

    fn evaluate_all(&mut self, h: &EnvHistory) {
        self.hashes = h
            .flags()
            .map(|e| {
                let hash = evaluation_hash(&e.compiled.evaluate(&self.ctx, h));
                (e.wire.key.clone(), hash)
            })
            .collect();
    }

    /// Brings the hashes to `h`'s version; the ETag they make.
    fn update(&mut self, h: &EnvHistory) -> String {
        let now = h.selector();
        let affected = (now.epoch == self.at.epoch)
            .then(|| h.changed_since(self.at.version))
            .flatten()
            .map(|changed| h.affected_flags(&changed));
        match affected {
            // A new epoch, or changes older than the window: everything again.
            None => self.evaluate_all(h),
            Some(keys) => {
                for key in keys {
                    match h.flag(&key) {
                        Some(e) => {
                            let hash = evaluation_hash(&e.compiled.evaluate(&self.ctx, h));
                            self.hashes.insert(key, hash);
                        }
                        None => {
                            self.hashes.remove(&key);
                        }
                    }
                }
            }
        }
        self.at = now;
        self.etag()
    }

    fn etag(&self) -> String {
        values_etag(self.hashes.iter().map(|(k, h)| (k.as_str(), *h)))
    }
}

/// A token naming `key_id` and `ctx`, signed with the server's stream key; `None` when the
/// context is too large to carry in a URL.
fn stream_token(key: &ring::hmac::Key, key_id: &str, ctx: &Context) -> Option<String> {
    let payload = format!("{key_id}\n{}", ctx.to_json());
    if payload.len() > MAX_STREAM_CONTEXT {
        return None;
    }
    let tag = ring::hmac::sign(key, payload.as_bytes());
    Some(format!("{}.{}", hex::encode(payload), hex::encode(tag)))
}

/// The key id and context of a token this server signed.
fn read_token(key: &ring::hmac::Key, token: &str) -> Option<(String, Context)> {
    let (payload, tag) = token.split_once('.')?;
    let payload = hex::decode(payload).ok()?;
    ring::hmac::verify(key, &payload, &hex::decode(tag).ok()?).ok()?;
    let text = String::from_utf8(payload).ok()?;
    let (id, ctx) = text.split_once('\n')?;
    Some((id.to_owned(), Context::parse(ctx).ok()?))
}

#[derive(Debug, serde::Deserialize)]
struct EventsQuery {
    token: String,
}

/// `refetchEvaluation` with `etag`, its id the tag (so `Last-Event-ID` says what the provider
/// last heard of).
fn refetch(etag: &str) -> Event {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let data = serde_json::json!({"type": "refetchEvaluation", "etag": etag, "lastModified": now});
    Event::default()
        .event("message")
        .id(etag.trim_matches('"'))
        .data(data.to_string())
}

async fn events(
    State(state): State<AppState>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let unauthorized = |details: &str| {
        Refusal::new(StatusCode::UNAUTHORIZED, "GENERAL", details.to_owned()).into_response()
    };
    let Some((id, ctx)) = query
        .ok()
        .and_then(|Query(q)| read_token(&state.stream_key, &q.token))
    else {
        return unauthorized("the event stream's token is missing or not this server's");
    };
    let Some(grant) = state.hub().grant(&id) else {
        return unauthorized("the SDK key of this event stream was revoked");
    };
    let Some(env) = state.hub().env(&grant.env) else {
        return unauthorized("the environment of this event stream was deleted");
    };
    let heard = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|id| format!("\"{id}\""));
    Sse::new(change_events(env, grant, ctx, heard))
        .keep_alive(KeepAlive::new().interval(STREAM_HEARTBEAT))
        .into_response()
}

/// The events of one stream: at once, the current ETag unless `heard` is it (so a change
/// between the bulk answer and the stream's start is not missed); then one per change that
/// alters the values, until the key's grant ends.
fn change_events(
    env: Arc<EnvHub>,
    grant: Arc<Grant>,
    ctx: Context,
    heard: Option<String>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let watched = env.with_history(|h| Watched::new(h, ctx));
    let stream = EventStreamState {
        changes: env.subscribe(),
        pending: Some(watched.etag()),
        env,
        grant,
        watched,
        sent: heard,
    };
    futures_util::stream::unfold(stream, |mut st| async move {
        loop {
            if let Some(tag) = st.pending.take()
                && st.sent.as_ref() != Some(&tag)
            {
                let event = refetch(&tag);
                st.sent = Some(tag);
                return Some((Ok(event), st));
            }
            tokio::select! {
                _ = st.grant.ended() => return None,
                changed = st.changes.changed() => {
                    changed.ok()?;
                    st.changes.borrow_and_update();
                    let watched = &mut st.watched;
                    st.pending = Some(st.env.with_history(|h| watched.update(h)));
                }
            }
        }
    })
}

/// One event stream between events.
struct EventStreamState {
    env: Arc<EnvHub>,
    grant: Arc<Grant>,
    watched: Watched,
    changes: tokio::sync::watch::Receiver<crate::hub::Published>,
    /// The ETag the provider last heard of.
    sent: Option<String>,
    /// An ETag to tell, if it differs from `sent`.
    pending: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targeting_key_is_the_context_key_and_bad_contexts_are_named() {
        let ctx = context(&Bytes::from_static(
            br#"{"context": {"targetingKey": "u1", "key": "other", "plan": "pro"}}"#,
        ))
        .unwrap();
        assert_eq!(ctx.key(), Some("u1"));
        assert_eq!(ctx.get("plan"), Some(&Value::String("pro".into())));
        let none = context(&Bytes::from_static(br#"{"context": {"key": "sneaky"}}"#)).unwrap();
        assert_eq!(none.key(), None, "only targetingKey names the context");
        for (body, code) in [
            (&b"not json"[..], "PARSE_ERROR"),
            (br#"[]"#, "INVALID_CONTEXT"),
            (br#"{}"#, "INVALID_CONTEXT"),
            (br#"{"context": 3}"#, "INVALID_CONTEXT"),
            (br#"{"context": {"targetingKey": 7}}"#, "INVALID_CONTEXT"),
        ] {
            let refusal = context(&Bytes::copy_from_slice(body)).unwrap_err();
            assert_eq!(
                (refusal.status, refusal.code),
                (StatusCode::BAD_REQUEST, code)
            );
        }
    }

    #[test]
    fn a_stream_reevaluates_only_what_a_change_can_alter_and_agrees_with_a_fresh_look() {
        use vane_core::history::Write;
        use vane_core::model::{Flag, Segment};
        let hub = crate::hub::Hub::new(100);
        let at = Selector {
            epoch: 1,
            version: 0,
        };
        hub.add_env("e", at, crate::hub::Lifecycle::ready());
        let env = hub.env("e").unwrap();
        let mut version = 0;
        let mut commit = |w: Write| {
            version += 1;
            env.apply(1, w.into_change(version));
        };
        let staff: Segment = serde_json::from_str(r#"{"key": "staff", "included": []}"#).unwrap();
        let gated: Flag = serde_json::from_str(
            r#"{"key": "g", "on": true, "variants": {"y": true, "n": false}, "off_variant": "n",
                "rules": [{"clauses": [{"op": "in_segment", "values": ["staff"]}], "serve": {"variant": "y"}}],
                "fallthrough": {"variant": "n"}}"#,
        )
        .unwrap();
        commit(Write::segment(staff.clone()).unwrap());
        commit(Write::flag(gated).unwrap());
        commit(Write::flag(Flag::boolean("other", true, true)).unwrap());
        let ctx = Context::with_key("u-1");
        let mut watched = env.with_history(|h| Watched::new(h, ctx.clone()));
        let before = watched.etag();
        let fresh =
            |env: &crate::hub::EnvHub| env.with_history(|h| Watched::new(h, ctx.clone()).etag());
        // The segment now holds u-1: the gated flag's value changes through it.
        commit(
            Write::segment(Segment {
                included: vec!["u-1".into()],
                ..staff
            })
            .unwrap(),
        );
        let after = env.with_history(|h| watched.update(h));
        assert_ne!(after, before);
        assert_eq!(after, fresh(&env));
        // A deleted flag leaves the tag as a fresh look makes it.
        commit(Write::Delete(
            vane_core::history::ItemKind::Flag,
            "other".into(),
        ));
        assert_eq!(env.with_history(|h| watched.update(h)), fresh(&env));
    }

    #[test]
    fn whole_numbers_are_integers() {
        assert_eq!(value(&FlagValue::Number(10.0)).to_string(), "10");
        assert_eq!(value(&FlagValue::Number(-2.5)).to_string(), "-2.5");
        assert_eq!(value(&FlagValue::Number(1e300)).to_string(), "1e+300");
    }
}
