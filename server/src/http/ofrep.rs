//! OpenFeature's Remote Evaluation Protocol (OFREP 0.3.0, `service/openapi.yaml` of
//! open-feature/protocol), behind the readiness gate and SDK-key authentication
//! (`Authorization: Bearer <key>` or `X-API-Key: <key>`):
//!
//! - `POST /ofrep/v1/evaluate/flags/{key}`: one flag for the request's context.
//! - `POST /ofrep/v1/evaluate/flags`: every flag of the key's environment, with an `ETag` (the
//!   environment's selector and the context); `If-None-Match` with it answers `304`.
//!
//! Both kinds of key may ask: OFREP only ever answers values, never rules, which is all a
//! mobile key may have. `context.targetingKey` is the context's key; its other properties are
//! attributes (a property named `key` gives way to `targetingKey`). Evaluation reads the same
//! compiled flags the socket sessions read, under no lock but the history's read of one
//! environment, and does no I/O.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde::Serialize;
use serde_json::{Map, Value};
use vane_core::eval::{Context, ErrorCode as EvalError, Evaluation, Reason};
use vane_core::history::EnvHistory;
use vane_core::model::FlagValue;

use super::AppState;
use super::sdk::{etag, not_modified};
use crate::hub::Grant;

/// `POST`: one flag.
pub const EVALUATE_FLAG: &str = "/ofrep/v1/evaluate/flags/{key}";
/// `POST`: every flag (bulk).
pub const EVALUATE_FLAGS: &str = "/ofrep/v1/evaluate/flags";

/// The OFREP routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(EVALUATE_FLAG, post(evaluate_one))
        .route(EVALUATE_FLAGS, post(evaluate_all))
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
    metadata: FlagMetadata,
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

/// What every answer says of its flag: the version it was written at.
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
struct Bulk<'a> {
    flags: Vec<Item<'a>>,
    metadata: BulkMetadata<'a>,
}

#[derive(Debug, Serialize)]
struct BulkMetadata<'a> {
    environment: &'a str,
    version: u64,
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

/// OpenFeature's reason for Vane's. `DEFAULT` (no rule matched, the fallthrough was served)
/// is OpenFeature's name; OFREP 0.3.0's schema enumerates the others only, while its ADR-0006
/// answers `DEFAULT` itself.
fn reason(r: Reason) -> &'static str {
    match r {
        Reason::Static => "STATIC",
        Reason::TargetingMatch => "TARGETING_MATCH",
        Reason::Split => "SPLIT",
        Reason::Default => "DEFAULT",
        Reason::Disabled => "DISABLED",
        _ => "UNKNOWN",
    }
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
fn answer<'a>(key: &'a str, version: u64, e: &Evaluation<'a>) -> Result<Success<'a>, Refusal> {
    match e.error {
        None => Ok(Success {
            key,
            value: e.value.map(value),
            reason: reason(e.reason),
            variant: e.variant,
            metadata: FlagMetadata { version },
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
            answer(&key, entry.wire.version, &e).map(|s| Json(s).into_response())
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
        let tag = etag(h.selector(), Some(&ctx));
        if not_modified(&headers, &tag) {
            return (tag, None);
        }
        let flags = h
            .flags()
            .map(|entry| {
                let key = entry.wire.key.as_str();
                let e = entry.compiled.evaluate(&ctx, h);
                match answer(key, entry.wire.version, &e) {
                    Ok(success) => Item::Success(success),
                    Err(refusal) => Item::Failure(Failure {
                        key: Some(key),
                        error_code: refusal.code,
                        error_details: refusal.details,
                    }),
                }
            })
            .collect();
        let bulk = Bulk {
            flags,
            metadata: BulkMetadata {
                environment,
                version: h.selector().version,
            },
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
    fn whole_numbers_are_integers() {
        assert_eq!(value(&FlagValue::Number(10.0)).to_string(), "10");
        assert_eq!(value(&FlagValue::Number(-2.5)).to_string(), "-2.5");
        assert_eq!(value(&FlagValue::Number(1e300)).to_string(), "1e+300");
    }
}
