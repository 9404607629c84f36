//! The gates in front of the HTTP modules, as axum middleware: the admin token, the readiness
//! gate, SDK-key authentication (which hands the handler the key's [`Grant`]), and the last
//! word on every answer: an error is the API's JSON error, whoever made it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Actor, ApiError, AppState};
use crate::api::ErrorCode;
use crate::control::ROOT_ACTOR;
use crate::hub::Grant;
use crate::keys;
use crate::limits::{self, Refused, Source};

/// Seconds a client is told to wait while the server loads its state.
const RETRY_WHILE_LOADING_S: u32 = 1;
/// Seconds an SDK request to an environment that is being created is told to wait.
const RETRY_WHILE_CREATING_S: u32 = 2;

/// The SDK-key header for clients that cannot set `Authorization` (OFREP's convention).
const API_KEY_HEADER: &str = "x-api-key";

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Who is asking (the listener puts it in every request; a router served otherwise has none,
/// and then no per-source limit applies).
fn peer(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// `429 rate_limited` with `Retry-After` for `peer`, over the limit `why` by `wait`; counted.
fn too_many(
    state: &AppState,
    why: Refused,
    peer: SocketAddr,
    wait: std::time::Duration,
    message: &str,
) -> Response {
    state.limits.refused(why, peer);
    let secs = limits::retry_after(wait).as_secs_f64().ceil() as u32;
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RateLimited,
        message,
    )
    .retry_after(secs.max(1))
    .into_response()
}

fn unauthorized(message: &str) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message).into_response()
}

/// Lets the request through only with `Authorization: Bearer <admin token>`: the data
/// directory's token (actor `admin`) or a named one (actor: its name), put in the request's
/// extensions as an [`Actor`] for the audit log. A source that
/// has presented too many wrong tokens ([`crate::limits::LimitsConfig::admin_failures`]) is
/// answered `429` with `Retry-After` until its allowance refills, before its token is looked
/// at, so guessing gets no answers.
pub async fn require_admin(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = peer(&req);
    let source = peer.map(|p| Source::of(p.ip()));
    let failures = &state.limits.admin_failures;
    if let Some(peer) = peer
        && let Err(wait) = failures.check(Source::of(peer.ip()), Instant::now())
    {
        return too_many(
            &state,
            Refused::AdminFailures,
            peer,
            wait,
            "too many wrong admin tokens from this address; retry after Retry-After",
        );
    }
    let actor = match bearer(req.headers()) {
        None => Err("missing 'Authorization: Bearer <admin token>' header"),
        Some(token) if keys::secret_matches(token, &state.admin_token) => Ok(ROOT_ACTOR.to_owned()),
        Some(token) => state.hub().admin_token(token).ok_or("wrong admin token"),
    };
    let refusal = match actor {
        Ok(name) => {
            req.extensions_mut().insert(Actor(name));
            return next.run(req).await;
        }
        Err(refusal) => refusal,
    };
    if let Some(source) = source {
        // The failure spends one of the source's allowance (none left is checked above).
        let _ = failures.take(source, Instant::now());
    }
    unauthorized(refusal)
}

/// Answers 503 with `Retry-After` until the store is loaded: before that the hub is
/// incomplete, so reads would be wrong, writes would race the load, and keys are unknown.
pub async fn require_ready(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.hub().is_ready() {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Initializing,
        "server is loading its state; retry shortly",
    )
    .retry_after(RETRY_WHILE_LOADING_S)
    .into_response()
}

/// Authenticates an SDK key from `Authorization: Bearer <key>` or `X-API-Key: <key>` and puts
/// its [`Grant`] in the request's extensions; first, a source over its SDK request rate
/// ([`crate::limits::LimitsConfig::sdk_requests`], off by default) is answered `429`.
pub async fn require_sdk_key(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    if let Some(peer) = peer(&req)
        && let Err(wait) = state
            .limits
            .sdk_requests
            .take(Source::of(peer.ip()), Instant::now())
    {
        return too_many(
            &state,
            Refused::SdkRequests,
            peer,
            wait,
            "too many SDK requests from this address; retry after Retry-After",
        );
    }
    let headers = req.headers();
    let presented = bearer(headers).or_else(|| {
        headers
            .get(API_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    });
    let Some(secret) = presented else {
        return unauthorized(
            "missing SDK key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        );
    };
    let Some(grant) = state.hub().authenticate(secret) else {
        return unauthorized("unknown or revoked SDK key");
    };
    // An environment a clone is still filling is not served: 503 until it is ready.
    let not_serving = state
        .hub()
        .env(&grant.env)
        .and_then(|env| env.lifecycle().not_serving(&grant.env));
    if let Some(why) = not_serving {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::EnvironmentNotReady,
            why,
        )
        .retry_after(RETRY_WHILE_CREATING_S)
        .into_response();
    }
    req.extensions_mut().insert::<Arc<Grant>>(grant);
    next.run(req).await
}

/// Rewrites an error answer that is not the API's JSON (axum's own: 405 with an empty body,
/// 413 and body errors as plain text) into `{"error": {…}}` with the same status, keeping its
/// headers (`Allow`, `Retry-After`).
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let json = HeaderValue::from_static("application/json");
    if !(status.is_client_error() || status.is_server_error())
        || response.headers().get(header::CONTENT_TYPE) == Some(&json)
    {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::Timeout,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::BadJson,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Unavailable,
        s if s.is_client_error() => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut answer = ApiError::new(status, code, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}
