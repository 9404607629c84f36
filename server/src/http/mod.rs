//! The HTTP side: one module per concern, behind shared layers.
//!
//! - [`admin`]: the admin API under `/api/v1`, behind the admin token and the readiness gate.
//! - [`sdk`]: what SDKs call over HTTP, behind the readiness gate and SDK-key authentication.
//! - [`ofrep`]: OpenFeature's Remote Evaluation Protocol, behind the same gates.
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics`, for operators; no credentials.
//! - [`console`]: the web console's files at `/` (its data comes through the admin API).
//! - [`layers`]: those gates, as middleware any new module (OFREP, the console) reuses.
//!
//! Requests and responses are the types of [`crate::api`]. Every error is
//! `{"error": {"code": …, "message": …}}` with a precise status, but OFREP's answers, which are
//! OFREP's own (`{"key", "errorCode", "errorDetails"}`).

pub mod admin;
pub mod console;
pub mod layers;
pub mod ofrep;
pub mod ops;
pub mod sdk;
pub mod serve;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutError};

use crate::api::{ADMIN_PREFIX, ErrorBody, ErrorCode, ErrorDetail};
use crate::control::{Control, ControlError};
use crate::events::Events;
use crate::keys::{self, SecretHash};
use crate::limits::Limits;
use crate::store::StoreError;

/// Who is making an admin request: the name of the admin token it presented (`admin` for the
/// data directory's token). Put in the request's extensions by [`layers::require_admin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

/// Shared by every handler and layer.
#[derive(Debug, Clone)]
pub struct AppState {
    control: Arc<Control>,
    /// SHA-256 of the admin token.
    admin_token: SecretHash,
    /// Per-source limits (wrong admin tokens), shared with the protocol listeners.
    limits: Arc<Limits>,
    /// Signs the tokens of OFREP event streams.
    stream_key: ring::hmac::Key,
    /// Where OFREP evaluations hand their events.
    events: Events,
}

impl AppState {
    fn hub(&self) -> &crate::hub::Hub {
        self.control.hub()
    }

    fn hub_arc(&self) -> Arc<crate::hub::Hub> {
        self.control.hub().clone()
    }
}

/// How long a client may take to send a request, so a slow one is closed instead of held.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// To send the headers, from its first byte.
    pub header_read_timeout: Duration,
    /// To send the body.
    pub body_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// The whole HTTP router.
///
/// `secret` is the server's lasting secret (the data directory's, so that what is signed with
/// it, such as OFREP event-stream URLs, outlives restarts).
pub fn router(
    control: Arc<Control>,
    admin_token: &str,
    limits: HttpLimits,
    per_source: Arc<Limits>,
    secret: &[u8; 32],
    events: Events,
) -> Router {
    let master = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let stream_secret = ring::hmac::sign(&master, b"vane ofrep event stream tokens");
    let state = AppState {
        control,
        admin_token: keys::hash_secret(admin_token),
        limits: per_source,
        stream_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, stream_secret.as_ref()),
        events,
    };
    // Layers run outermost-last-added: the admin token is checked before readiness (it is
    // known before the state loads); SDK keys only after (they are part of the state).
    let admin = admin::routes()
        .layer(middleware::from_fn_with_state(
            state.clone(),
            layers::require_ready,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            layers::require_admin,
        ));
    let sdk = sdk::routes()
        .merge(ofrep::routes())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            layers::require_sdk_key,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            layers::require_ready,
        ));
    let streams = ofrep::stream_routes().layer(middleware::from_fn_with_state(
        state.clone(),
        layers::require_ready,
    ));
    Router::new()
        .merge(ops::routes(
            state.control.hub().clone(),
            state.limits.clone(),
            state.events.stats().clone(),
        ))
        .merge(streams)
        .merge(console::routes())
        .nest(ADMIN_PREFIX, admin)
        .merge(sdk)
        .with_state(state)
        // A body trickled in slower than this is cut off (a slowloris on the body; the
        // headers have their own timeout in `serve`).
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
        .layer(middleware::map_response(layers::json_errors))
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    field: Option<String>,
    retry_after_s: Option<u32>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after_s: None,
        }
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, seconds: u32) -> ApiError {
        self.retry_after_s = Some(seconds);
        self
    }

    /// 404 for a missing environment.
    pub fn env_not_found(env: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::EnvironmentNotFound,
            format!("environment {env:?} not found"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                field: self.field,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        use ErrorCode as C;
        let message = e.to_string();
        let (status, code) = match &e {
            ControlError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, C::Invalid),
            ControlError::InUse { .. } => (StatusCode::CONFLICT, C::SegmentInUse),
            ControlError::NotReady(_) => (StatusCode::CONFLICT, C::EnvironmentNotReady),
            ControlError::Store(s) => match s {
                StoreError::JobNotFound(_) => (StatusCode::NOT_FOUND, C::JobNotFound),
                StoreError::JobState { .. } => (StatusCode::CONFLICT, C::JobState),
                StoreError::TokenNotFound(_) => (StatusCode::NOT_FOUND, C::TokenNotFound),
                StoreError::TokenExists(_) => (StatusCode::CONFLICT, C::TokenExists),
                StoreError::EnvNotFound(_) => (StatusCode::NOT_FOUND, C::EnvironmentNotFound),
                StoreError::FlagNotFound(_) => (StatusCode::NOT_FOUND, C::FlagNotFound),
                StoreError::SegmentNotFound(_) => (StatusCode::NOT_FOUND, C::SegmentNotFound),
                StoreError::KeyNotFound(_) => (StatusCode::NOT_FOUND, C::KeyNotFound),
                StoreError::EnvExists(_) => (StatusCode::CONFLICT, C::EnvironmentExists),
                StoreError::Conflict { .. } => (StatusCode::CONFLICT, C::Conflict),
                // The database is unreachable (PostgreSQL down) or failing: the write is not
                // acknowledged; reads and pushes of the last state go on.
                StoreError::Backend { .. } => (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, C::Internal),
            },
            _ => (StatusCode::INTERNAL_SERVER_ERROR, C::Internal),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "admin operation failed");
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(error = %e, "admin operation refused: the store is unavailable");
        }
        let field = match &e {
            ControlError::Invalid(v) => Some(v.field.clone()),
            _ => None,
        };
        ApiError {
            field,
            ..ApiError::new(status, code, message)
        }
    }
}

/// A handler's result.
pub type ApiResult<T> = Result<T, ApiError>;

/// A request's body, read whole. Reading it can fail in three ways, each its own answer: over
/// the size limit (413), not arrived within the body timeout (408), or broken off (400).
#[derive(Debug)]
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Body, ApiError> {
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(rejection) => Err(body_error(&rejection)),
        }
    }
}

fn body_error(rejection: &BytesRejection) -> ApiError {
    let message = rejection.body_text();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(e) = cause {
        if e.is::<TimeoutError>() {
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, ErrorCode::Timeout, message);
        }
        cause = e.source();
    }
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            message,
        ),
        _ => ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message),
    }
}

/// Parses a JSON body, answering 400 with serde's line/column message when it is not valid.
fn parse<T: DeserializeOwned>(body: &Body) -> ApiResult<T> {
    serde_json::from_slice(&body.0).map_err(bad_json)
}

fn bad_json(e: serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ErrorCode::BadJson,
        format!("request body: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::client::AdminClient;
    use crate::api::{SdkSnapshot, routes};
    use crate::hub::Hub;
    use crate::keys::KeyKind;
    use crate::store::sqlite::SqliteStore;

    /// A router on loopback over a store that is not loaded yet.
    async fn serve() -> (Arc<Control>, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("vane.db")).unwrap();
        let control = Control::new(Arc::new(store), Arc::new(Hub::new(10)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            axum::serve(
                listener,
                router(
                    control.clone(),
                    "t",
                    HttpLimits::default(),
                    Limits::new(Default::default()),
                    &[7; 32],
                    Events::disabled(),
                ),
            )
            .into_future(),
        );
        (control, base, dir)
    }

    async fn get(url: String, key: Option<&str>) -> reqwest::Response {
        let mut req = reqwest::Client::new().get(url);
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        req.send().await.unwrap()
    }

    #[tokio::test]
    async fn every_gate_answers_503_until_the_state_is_loaded() {
        let (control, base, _dir) = serve().await;
        let admin = AdminClient::new(&base, "t");
        assert!(!admin.ready().await.unwrap());
        let refused = admin.envs().await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::Initializing));
        let sdk = get(
            format!("{base}{}", routes::SDK_SNAPSHOT),
            Some("vane_srv_x"),
        )
        .await;
        assert_eq!(sdk.status(), 503);
        assert_eq!(sdk.headers()["retry-after"], "1");
        assert_eq!(get(format!("{base}/healthz"), None).await.status(), 200);

        control.load().await.unwrap();
        assert!(admin.ready().await.unwrap());
        assert!(admin.envs().await.unwrap().environments.is_empty());
        let refused = admin.with_token("nope").envs().await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::Unauthorized));
        let metrics = admin.metrics().await.unwrap();
        assert!(metrics.contains("vane_ready 1"), "{metrics}");
        assert!(
            metrics.contains("vane_sessions{transport=\"tcp\"} 0"),
            "{metrics}"
        );
        assert!(
            metrics.trim_end().ends_with("# EOF"),
            "OpenMetrics: {metrics}"
        );
    }

    #[tokio::test]
    async fn the_sdk_snapshot_polls_by_etag_and_keeps_rules_from_mobile_keys() {
        let (control, base, _dir) = serve().await;
        control.load().await.unwrap();
        let admin = AdminClient::new(&base, "t");
        admin.create_env("prod").await.unwrap();
        let flag = vane_core::model::Flag::boolean("a", true, true);
        admin.put_flag("prod", "a", &flag).await.unwrap();
        let server = admin
            .create_key("prod", KeyKind::Server)
            .await
            .unwrap()
            .secret;
        let mobile = admin
            .create_key("prod", KeyKind::Mobile)
            .await
            .unwrap()
            .secret;
        let url = format!("{base}{}", routes::SDK_SNAPSHOT);

        assert_eq!(get(url.clone(), None).await.status(), 401);
        assert_eq!(
            get(url.clone(), Some("vane_srv_unknown")).await.status(),
            401
        );

        let first = get(url.clone(), Some(&server)).await;
        assert_eq!(first.status(), 200);
        let etag = first.headers()["etag"].to_str().unwrap().to_owned();
        let snapshot: SdkSnapshot = first.json().await.unwrap();
        assert_eq!(snapshot.at.version, 1);
        assert_eq!(snapshot.flags.as_ref().map(Vec::len), Some(1));
        assert!(snapshot.values.is_none());

        let again = reqwest::Client::new()
            .get(&url)
            .bearer_auth(&server)
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304);
        admin.toggle("prod", "a", false).await.unwrap();
        let changed = reqwest::Client::new()
            .get(&url)
            .bearer_auth(&server)
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(changed.status(), 200);
        assert_ne!(changed.headers()["etag"].to_str().unwrap(), etag);

        // A mobile key gets values for a context, and never the rules.
        assert_eq!(get(url.clone(), Some(&mobile)).await.status(), 403);
        let evaluated = get(
            format!("{url}?context=%7B%22key%22%3A%22u1%22%7D"),
            Some(&mobile),
        )
        .await;
        assert_eq!(evaluated.status(), 200);
        let snapshot: SdkSnapshot = evaluated.json().await.unwrap();
        assert!(snapshot.flags.is_none() && snapshot.segments.is_none());
        let value = &snapshot.values.unwrap()["a"];
        assert_eq!(value.reason, vane_core::eval::Reason::Disabled);
        let bad = get(format!("{url}?context=%5B1%5D"), Some(&mobile)).await;
        assert_eq!(bad.status(), 400);
    }
}
