//! The HTTP side: the admin API under `/api/v1` (bearer admin token), `/healthz`, `/readyz` and
//! `/metrics`. Every error is JSON: `{"error": {"code": "...", "message": "..."}}` with a
//! precise status; every write answers with the environment's version after its commit.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use vane_core::eval::Context;
use vane_core::model::{Flag, Segment};

use crate::control::{Committed, Control, ControlError};
use crate::hub::EnvHub;
use crate::store::{KeyKind, StoreError};

/// Shared by every handler.
#[derive(Debug, Clone)]
struct AppState {
    control: Arc<Control>,
    /// SHA-256 of the admin token; compared in constant time.
    token_hash: [u8; 32],
}

/// The HTTP router.
pub fn router(control: Arc<Control>, admin_token: String) -> Router {
    let state = AppState {
        control,
        token_hash: Sha256::digest(admin_token.as_bytes()).into(),
    };
    let api = Router::new()
        .route("/environments", get(list_envs).post(create_env))
        .route("/environments/{env}", get(get_env).delete(delete_env))
        .route("/environments/{env}/flags", get(list_flags))
        .route(
            "/environments/{env}/flags/{flag}",
            put(put_flag).get(get_flag).delete(delete_flag),
        )
        .route("/environments/{env}/flags/{flag}/toggle", post(toggle_flag))
        .route(
            "/environments/{env}/flags/{flag}/evaluate",
            post(evaluate_flag),
        )
        .route("/environments/{env}/segments", get(list_segments))
        .route(
            "/environments/{env}/segments/{segment}",
            put(put_segment).get(get_segment).delete(delete_segment),
        )
        .route("/environments/{env}/keys", get(list_keys).post(create_key))
        .route(
            "/environments/{env}/keys/{id}",
            axum::routing::delete(revoke_key),
        )
        .route("/environments/{env}/propagation", get(propagation))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .with_state(state)
}

/// A JSON error response.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let message = e.to_string();
        let (status, code) = match &e {
            ControlError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ControlError::Store(StoreError::EnvNotFound(_)) => {
                (StatusCode::NOT_FOUND, "environment_not_found")
            }
            ControlError::Store(StoreError::FlagNotFound(_)) => {
                (StatusCode::NOT_FOUND, "flag_not_found")
            }
            ControlError::Store(StoreError::KeyNotFound(_)) => {
                (StatusCode::NOT_FOUND, "key_not_found")
            }
            ControlError::Store(StoreError::SegmentNotFound(_)) => {
                (StatusCode::NOT_FOUND, "segment_not_found")
            }
            ControlError::Store(StoreError::EnvExists(_)) => {
                (StatusCode::CONFLICT, "environment_exists")
            }
            ControlError::InUse { .. } => (StatusCode::CONFLICT, "segment_in_use"),
            _ => {
                tracing::error!(error = %e, "admin operation failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(status: StatusCode, body: Value) -> ApiResult {
    Ok((status, Json(body)).into_response())
}

/// Parses a JSON body, answering 400 with serde's line/column message when it is not valid.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("request body: {e}"),
        )
    })
}

async fn require_admin(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing 'Authorization: Bearer <admin token>' header",
        )
        .into_response();
    };
    let hash: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
    // Compare digests without an early exit, so timing says nothing about the token.
    let diff = hash
        .iter()
        .zip(state.token_hash.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong admin token",
        )
        .into_response();
    }
    // Until the store is loaded the hub is incomplete: reads would be wrong and writes would
    // race the load.
    if !state.control.hub().is_ready() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "initializing",
            "server is loading its state; retry shortly",
        )
        .into_response();
    }
    next.run(req).await
}

fn env_hub(state: &AppState, env: &str) -> Result<Arc<EnvHub>, ApiError> {
    state.control.hub().env(env).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "environment_not_found",
            format!("environment {env:?} not found"),
        )
    })
}

fn version_json(c: Committed) -> Value {
    let s = c.selector;
    json!({"version": s.version, "epoch": s.epoch_hex(), "committed_at_ns": c.at_unix_ns.to_string()})
}

fn env_json(env: &EnvHub) -> Value {
    let s = env.selector();
    let flags = env.with_history(|h| h.flags().count());
    json!({"name": env.name(), "version": s.version, "epoch": s.epoch_hex(), "flags": flags})
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.control.hub().is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "initializing\n").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let hub = state.control.hub();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP vane_ready 1 once the state is loaded.\n# TYPE vane_ready gauge"
    );
    let _ = writeln!(out, "vane_ready {}", u8::from(hub.is_ready()));
    let _ = writeln!(
        out,
        "# HELP vane_sessions Live protocol sessions.\n# TYPE vane_sessions gauge"
    );
    for (transport, n) in hub.session_counts() {
        let _ = writeln!(out, "vane_sessions{{transport=\"{transport}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP vane_environment_version Current version.\n# TYPE vane_environment_version gauge"
    );
    let envs = hub.envs();
    for env in &envs {
        let _ = writeln!(
            out,
            "vane_environment_version{{env=\"{}\"}} {}",
            env.name(),
            env.selector().version
        );
    }
    let _ = writeln!(
        out,
        "# HELP vane_environment_sessions_current Sessions whose last ack is the current version.\n# TYPE vane_environment_sessions_current gauge"
    );
    for env in &envs {
        let p = env.propagation();
        let _ = writeln!(
            out,
            "vane_environment_sessions_current{{env=\"{}\"}} {}",
            env.name(),
            p.current
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn list_envs(State(state): State<AppState>) -> ApiResult {
    let envs: Vec<Value> = state
        .control
        .hub()
        .envs()
        .iter()
        .map(|e| env_json(e))
        .collect();
    ok(StatusCode::OK, json!({ "environments": envs }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateEnv {
    name: String,
}

async fn create_env(State(state): State<AppState>, body: Bytes) -> ApiResult {
    let req: CreateEnv = parse(&body)?;
    let s = state.control.create_env(req.name.clone()).await?;
    ok(
        StatusCode::CREATED,
        json!({"name": req.name, "version": s.version, "epoch": s.epoch_hex(), "flags": 0}),
    )
}

async fn get_env(State(state): State<AppState>, Path(env): Path<String>) -> ApiResult {
    ok(StatusCode::OK, env_json(&*env_hub(&state, &env)?))
}

async fn delete_env(State(state): State<AppState>, Path(env): Path<String>) -> ApiResult {
    state.control.delete_env(env).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_flags(State(state): State<AppState>, Path(env): Path<String>) -> ApiResult {
    let env = env_hub(&state, &env)?;
    let (flags, s) = env.with_history(|h| {
        (
            h.flags()
                .map(|e| e.compiled.flag().clone())
                .collect::<Vec<_>>(),
            h.selector(),
        )
    });
    ok(
        StatusCode::OK,
        json!({"version": s.version, "epoch": s.epoch_hex(), "flags": flags}),
    )
}

async fn get_flag(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
) -> ApiResult {
    let flag = env_hub(&state, &env)?
        .with_history(|h| h.flag(&key).map(|e| e.compiled.flag().clone()))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "flag_not_found",
                format!("flag {key:?} not found"),
            )
        })?;
    ok(StatusCode::OK, json!(flag))
}

/// Parses a flag or segment body; its `key`, if present, must match the path.
fn keyed_body<T: DeserializeOwned>(body: &Bytes, key: &str) -> Result<T, ApiError> {
    let mut value: Value = parse(body)?;
    let Some(object) = value.as_object_mut() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "request body: expected a JSON object",
        ));
    };
    match object.get("key") {
        None => {
            object.insert("key".into(), Value::String(key.to_owned()));
        }
        Some(Value::String(k)) if k == key => {}
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("key: {other} does not match the path ({key:?})"),
            ));
        }
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("request body: {e}"),
        )
    })
}

async fn put_flag(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let flag: Flag = keyed_body(&body, &key)?;
    let s = state.control.put_flag(env, flag).await?;
    ok(StatusCode::OK, version_json(s))
}

async fn delete_flag(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
) -> ApiResult {
    let s = state.control.delete_flag(env, key).await?;
    ok(StatusCode::OK, version_json(s))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Toggle {
    on: bool,
}

async fn toggle_flag(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let req: Toggle = parse(&body)?;
    let s = state.control.toggle(env, key, req.on).await?;
    ok(StatusCode::OK, version_json(s))
}

async fn list_keys(State(state): State<AppState>, Path(env): Path<String>) -> ApiResult {
    let keys = state.control.keys(env).await?;
    ok(StatusCode::OK, json!({ "keys": keys }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    kind: KeyKind,
}

async fn create_key(
    State(state): State<AppState>,
    Path(env): Path<String>,
    body: Bytes,
) -> ApiResult {
    let req: CreateKey = parse(&body)?;
    let key = state.control.create_key(env, req.kind).await?;
    ok(StatusCode::CREATED, json!(key))
}

async fn revoke_key(
    State(state): State<AppState>,
    Path((env, id)): Path<(String, String)>,
) -> ApiResult {
    let key = state.control.revoke_key(env, id).await?;
    ok(StatusCode::OK, json!(key))
}

async fn propagation(State(state): State<AppState>, Path(env): Path<String>) -> ApiResult {
    ok(StatusCode::OK, json!(env_hub(&state, &env)?.propagation()))
}

async fn list_segments(State(state): State<AppState>, Path(env): Path<String>) -> ApiResult {
    let env = env_hub(&state, &env)?;
    let (segments, s) = env.with_history(|h| {
        let segments: Vec<Segment> = h.segments().map(|e| e.compiled.segment().clone()).collect();
        (segments, h.selector())
    });
    ok(
        StatusCode::OK,
        json!({"version": s.version, "epoch": s.epoch_hex(), "segments": segments}),
    )
}

async fn get_segment(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
) -> ApiResult {
    let segment = env_hub(&state, &env)?
        .with_history(|h| h.segment_entry(&key).map(|e| e.compiled.segment().clone()))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "segment_not_found",
                format!("segment {key:?} not found"),
            )
        })?;
    ok(StatusCode::OK, json!(segment))
}

async fn put_segment(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let segment: Segment = keyed_body(&body, &key)?;
    let s = state.control.put_segment(env, segment).await?;
    ok(StatusCode::OK, version_json(s))
}

async fn delete_segment(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
) -> ApiResult {
    let s = state.control.delete_segment(env, key).await?;
    ok(StatusCode::OK, version_json(s))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvaluateRequest {
    context: Value,
}

/// "Why does this user get B?": the value, variant and reason, and the rule or bucket that decided.
async fn evaluate_flag(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    use vane_core::eval::Reason;
    let req: EvaluateRequest = parse(&body)?;
    let ctx = Context::new(req.context).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_context",
            e.to_string(),
        )
    })?;
    let env = env_hub(&state, &env)?;
    let answer = env.with_history(|h| {
        let entry = h.flag(&key)?;
        let e = entry.compiled.evaluate(&ctx, h);
        let flag = entry.compiled.flag();
        let rule = e.rule.map(|i| {
            let r = &flag.rules[i];
            json!({
                "index": i,
                "id": (!r.id.is_empty()).then_some(&r.id),
                "description": (!r.description.is_empty()).then_some(&r.description),
            })
        });
        let explanation = match (e.error, e.rule, e.bucket) {
            (Some(code), _, _) => format!(
                "evaluation failed ({}); the caller's default is served",
                code.as_str()
            ),
            _ if e.reason == Reason::Disabled => {
                "the flag is off, so it serves its off variant".to_owned()
            }
            (None, Some(i), Some(b)) => {
                format!("rule {i} matched, and its rollout put the context in bucket {b} of 100000")
            }
            (None, Some(i), None) => format!("rule {i} matched"),
            (None, None, Some(b)) => format!(
                "no rule matched; the fallthrough rollout put the context in bucket {b} of 100000"
            ),
            _ if e.reason == Reason::Static => {
                "the flag has no rules: everyone gets the fallthrough variant".to_owned()
            }
            _ => "no rule matched, so the fallthrough variant is served".to_owned(),
        };
        Some(json!({
            "flag": key,
            "value": e.value,
            "variant": e.variant,
            "reason": e.reason,
            "error_code": e.error.map(|c| c.as_str()),
            "rule": rule,
            "bucket": e.bucket,
            "explanation": explanation,
            "version": h.selector().version,
        }))
    });
    match answer {
        Some(v) => ok(StatusCode::OK, v),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "flag_not_found",
            format!("flag {key:?} not found"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[tokio::test]
    async fn readyz_is_503_until_the_state_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let control = Control::new(
            Store::open(&dir.path().join("vane.db")).unwrap(),
            Arc::new(crate::hub::Hub::new(10)),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, router(control.clone(), "t".into())).into_future());
        let status = |path: &'static str| async move {
            reqwest::get(format!("http://{addr}{path}"))
                .await
                .unwrap()
                .status()
                .as_u16()
        };
        assert_eq!(status("/readyz").await, 503);
        assert_eq!(status("/healthz").await, 200);
        control.load().await.unwrap();
        assert_eq!(status("/readyz").await, 200);
    }
}
