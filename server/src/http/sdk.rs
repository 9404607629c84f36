//! What SDKs call over HTTP, behind the readiness gate and SDK-key authentication: the
//! snapshot an SDK polls when no protocol transport gets through.
//!
//! `GET /sdk/v1/snapshot` answers the key's environment: with a server key, every flag and
//! segment definition (rules mode); with `?context=<JSON object>` (required for a mobile key),
//! every flag's value evaluated for that context instead (evaluated mode: no rule leaves the
//! server). The `ETag` names the environment's selector (and the context), so a poller sends
//! `If-None-Match` and gets `304 Not Modified` until something changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use sha2::{Digest, Sha256};
use vane_core::eval::Context;
use vane_core::history::EnvHistory;
use vane_core::protocol::Selector;

use super::{ApiError, ApiResult, AppState};
use vane_core::client::Details;

use crate::api::{ErrorCode, SdkSnapshot, routes};
use crate::hub::Grant;

/// The SDK routes.
pub fn routes() -> Router<AppState> {
    Router::new().route(routes::SDK_SNAPSHOT, get(snapshot))
}

/// The query of `GET /sdk/v1/snapshot`.
#[derive(Debug, serde::Deserialize)]
struct SnapshotQuery {
    /// Evaluated mode: the context, a JSON object.
    context: Option<String>,
}

fn etag(selector: Selector, context: Option<&Context>) -> String {
    match context {
        None => format!("\"{}-{}\"", selector.epoch_hex(), selector.version),
        Some(ctx) => {
            let digest = Sha256::digest(ctx.to_json().to_string().as_bytes());
            let id = hex::encode(&digest[..8]);
            format!("\"{}-{}-{id}\"", selector.epoch_hex(), selector.version)
        }
    }
}

/// Whether `If-None-Match` names `tag` (or is `*`).
pub(super) fn not_modified(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t == tag || t.strip_prefix("W/") == Some(tag))
}

fn evaluated_values(h: &EnvHistory, ctx: &Context) -> BTreeMap<String, Details> {
    h.flags()
        .map(|entry| {
            let details = Details::from(entry.compiled.evaluate(ctx, h));
            (entry.wire.key.clone(), details)
        })
        .collect()
}

async fn snapshot(
    State(state): State<AppState>,
    Extension(grant): Extension<Arc<Grant>>,
    query: Result<Query<SnapshotQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadJson, e.body_text()))?;
    let context = query
        .context
        .map(|text| Context::parse(&text))
        .transpose()
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidContext,
                e.to_string(),
            )
        })?;
    let mode = if context.is_some() {
        vane_proto::v1::DeliveryMode::Evaluated
    } else {
        vane_proto::v1::DeliveryMode::Rules
    };
    grant.kind.allows(mode).map_err(|denied| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("{denied}: pass ?context=<JSON object>"),
        )
    })?;
    let env = state
        .hub()
        .env(&grant.env)
        .ok_or_else(|| ApiError::env_not_found(&grant.env))?;
    let (tag, body) = env.with_history(|h| {
        let tag = etag(h.selector(), context.as_ref());
        if not_modified(&headers, &tag) {
            return (tag, None);
        }
        let mut snapshot = SdkSnapshot {
            environment: env.name().to_owned(),
            at: h.selector().into(),
            flags: None,
            segments: None,
            values: None,
        };
        match &context {
            Some(ctx) => snapshot.values = Some(evaluated_values(h, ctx)),
            None => {
                snapshot.flags = Some(h.flags().map(|e| e.compiled.flag().clone()).collect());
                snapshot.segments =
                    Some(h.segments().map(|e| e.compiled.segment().clone()).collect());
            }
        }
        (tag, Some(snapshot))
    });
    let tag = HeaderValue::from_str(&tag).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    })?;
    let headers = [
        (header::ETAG, tag),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    Ok(match body {
        None => (StatusCode::NOT_MODIFIED, headers).into_response(),
        Some(snapshot) => (headers, Json(snapshot)).into_response(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_name_the_selector_and_the_context() {
        let at = Selector {
            epoch: 0xab,
            version: 7,
        };
        assert_eq!(etag(at, None), "\"00000000000000ab-7\"");
        let u1 = Context::with_key("u1");
        let u2 = Context::with_key("u2");
        assert_ne!(etag(at, Some(&u1)), etag(at, Some(&u2)));
        assert_eq!(
            etag(at, Some(&u1)),
            etag(at, Some(&Context::with_key("u1")))
        );

        let mut headers = HeaderMap::new();
        let tag = etag(at, None);
        assert!(!not_modified(&headers, &tag));
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", \"00000000000000ab-7\""),
        );
        assert!(not_modified(&headers, &tag));
        assert!(!not_modified(&headers, "\"00000000000000ab-8\""));
    }
}
