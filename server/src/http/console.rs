//! The web console: its files are compiled into the binary (plain ES modules, no build step, no
//! CDN), served at `/` and `/console/…` without credentials; the app then signs in with an admin
//! token and talks to the admin API like any client. The live view's stream is an admin route
//! ([`live`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;

use super::{ApiError, ApiResult, AppState};
use crate::api::ErrorCode;
use crate::hub::{EnvHub, Hub};

/// The console's files: path under `/console/`, content type, contents.
const FILES: [(&str, &str, &str); 5] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../console/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/api.js"),
    ),
    (
        "flag-editor.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/flag-editor.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../console/style.css"),
    ),
];

/// Only the server's own files, scripts and connections: nothing inline, nothing from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `/` and `/console/{file}`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { file("index.html") }))
        .route(
            "/console/{file}",
            get(|Path(name): Path<String>| async move { file(&name) }),
        )
}

fn file(name: &str) -> Response {
    let Some((_, kind, body)) = FILES.iter().find(|(n, ..)| *n == name) else {
        return ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such file")
            .into_response();
    };
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    // The files change with the binary: always revalidate, so an upgrade is seen at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// How often a live stream looks for news; it sends only when there is some.
const LIVE_TICK: Duration = Duration::from_millis(100);
/// A comment this often keeps proxies from closing an idle stream.
const LIVE_HEARTBEAT: Duration = Duration::from_secs(15);

/// `GET /api/v1/environments/{env}/live` (admin token): server-sent `fleet` events, each the
/// whole [`crate::hub::LiveReport`] — at once, then whenever a session comes or goes, acks, or a
/// change is applied (at most ten a second), until the environment is deleted.
pub async fn live(State(state): State<AppState>, Path(env): Path<String>) -> ApiResult<Response> {
    let hub = state.hub_arc();
    let env_hub = hub.env(&env).ok_or_else(|| ApiError::env_not_found(&env))?;
    Ok(Sse::new(fleet_events(hub, env_hub))
        .keep_alive(KeepAlive::new().interval(LIVE_HEARTBEAT))
        .into_response())
}

fn fleet_events(hub: Arc<Hub>, env: Arc<EnvHub>) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold((hub, env, None::<u64>), |(hub, env, sent)| async move {
        loop {
            // The same environment, not one of the same name created since.
            let current = hub.env(env.name())?;
            if !Arc::ptr_eq(&current, &env) {
                return None;
            }
            let activity = env.activity();
            if sent != Some(activity) {
                let data = serde_json::to_string(&env.live()).unwrap_or_default();
                let event = Event::default().event("fleet").data(data);
                return Some((Ok(event), (hub, env, Some(activity))));
            }
            tokio::time::sleep(LIVE_TICK).await;
        }
    })
}
