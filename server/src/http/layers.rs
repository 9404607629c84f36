//! The gates in front of the HTTP modules, as axum middleware: the admin token, the readiness
//! gate, and SDK-key authentication (which hands the handler the key's [`Grant`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::api::ErrorCode;
use crate::hub::Grant;
use crate::keys;

/// Seconds a client is told to wait while the server loads its state.
const RETRY_WHILE_LOADING_S: u32 = 1;

/// The SDK-key header for clients that cannot set `Authorization` (OFREP's convention).
const API_KEY_HEADER: &str = "x-api-key";

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn unauthorized(message: &str) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message).into_response()
}

/// Lets the request through only with `Authorization: Bearer <admin token>`.
pub async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match bearer(req.headers()) {
        None => unauthorized("missing 'Authorization: Bearer <admin token>' header"),
        Some(token) if !keys::secret_matches(token, &state.admin_token) => {
            unauthorized("wrong admin token")
        }
        Some(_) => next.run(req).await,
    }
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
/// its [`Grant`] in the request's extensions.
pub async fn require_sdk_key(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
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
    req.extensions_mut().insert::<Arc<Grant>>(grant);
    next.run(req).await
}
