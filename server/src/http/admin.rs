//! The admin API (`/api/v1`, admin token): environments (with clones, retention and the audit
//! log), flags, segments, SDK keys, named admin tokens, evaluation with its explanation, and
//! propagation. Every write answers once its change is committed and in the hub, with the
//! version it committed as, and is recorded in the audit log under the token's name.

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::Value;
use vane_core::client::Details;
use vane_core::eval::Context;
use vane_core::model::{Flag, Segment};

use super::{Actor, ApiError, ApiResult, AppState, Body, bad_json, parse};
use crate::api::{
    At, AuditPage, CloneEnv, CreateEnv, CreateKey, CreateToken, EnvInfo, EnvList, ErrorCode,
    EvaluateRequest, Explanation, FlagList, JobInfo, JobState, KeyInfo, KeyList, NewKeyInfo,
    NewTokenInfo, NodePropagation, Progress, Propagation, Retention, RuleRef, SegmentList, Toggle,
    TokenInfo, TokenList, Written, routes,
};
use crate::control::Edit;
use crate::hub::EnvHub;
use crate::store::{Committed, EnvState};

/// The admin routes, relative to [`crate::api::ADMIN_PREFIX`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(routes::ENVS, get(list_envs).post(create_env))
        .route(routes::ENV, get(get_env).delete(delete_env))
        .route(routes::FLAGS, get(list_flags))
        .route(
            routes::FLAG,
            put(put_flag).get(get_flag).delete(delete_flag),
        )
        .route(routes::TOGGLE, post(toggle_flag))
        .route(routes::EVALUATE, post(evaluate_flag))
        .route(routes::SEGMENTS, get(list_segments))
        .route(
            routes::SEGMENT,
            put(put_segment).get(get_segment).delete(delete_segment),
        )
        .route(routes::KEYS, get(list_keys).post(create_key))
        .route(routes::KEY, delete(revoke_key))
        .route(routes::PROPAGATION, get(propagation))
        .route(routes::CLONE, post(clone_env))
        .route(routes::RETENTION, put(set_retention))
        .route(routes::AUDIT, get(audit))
        .route(routes::JOB, get(get_job))
        .route(routes::JOB_RETRY, post(retry_job))
        .route(routes::TOKENS, get(list_tokens).post(create_token))
        .route(routes::TOKEN, delete(revoke_token))
        .route(routes::LIVE, get(super::console::live))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such endpoint",
            )
        })
}

fn env_hub(state: &AppState, env: &str) -> ApiResult<Arc<EnvHub>> {
    state
        .hub()
        .env(env)
        .ok_or_else(|| ApiError::env_not_found(env))
}

fn written(c: &Committed) -> Json<Written> {
    Json(Written {
        at: c.selector().into(),
        committed_at_ns: c.at_unix_ns,
    })
}

fn env_info(state: &AppState, env: &EnvHub) -> EnvInfo {
    let (at, flags) = env.with_history(|h| (h.selector().into(), h.flags().count()));
    let lifecycle = env.lifecycle();
    EnvInfo {
        name: env.name().to_owned(),
        at,
        flags,
        state: lifecycle.state,
        job: lifecycle.job,
        progress: (lifecycle.state == EnvState::Creating).then_some(Progress {
            copied: lifecycle.copied,
            total: lifecycle.total,
        }),
        error: lifecycle.error,
        retention: state.control.retention_of(env),
    }
}

async fn edit(state: &AppState, env: &str, edit: Edit, actor: &Actor) -> ApiResult<Json<Written>> {
    let committed = state.control.edit(env, edit, &actor.0).await?;
    Ok(written(&committed))
}

async fn list_envs(State(state): State<AppState>) -> Json<EnvList> {
    let environments = state
        .hub()
        .envs()
        .iter()
        .map(|e| env_info(&state, e))
        .collect();
    Json(EnvList { environments })
}

async fn create_env(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    body: Body,
) -> ApiResult<(StatusCode, Json<EnvInfo>)> {
    let req: CreateEnv = parse(&body)?;
    state.control.create_env(&req.name, &actor.0).await?;
    let info = env_info(&state, &*env_hub(&state, &req.name)?);
    Ok((StatusCode::CREATED, Json(info)))
}

/// Clones an environment: 202 with the job at once, or (synchronous) 201 with the job once
/// the new environment is ready.
async fn clone_env(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(env): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    let req: CloneEnv = parse(&body)?;
    let (job, done) = state.control.clone_env(&env, &req.name, &actor.0).await?;
    let asynchronous = req
        .asynchronous
        .unwrap_or(job.total > state.control.sync_clone_max());
    if asynchronous {
        return Ok((StatusCode::ACCEPTED, Json(job)));
    }
    let job = done.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("the clone task failed: {e}"),
        )
    })?;
    match job.state {
        JobState::Done => Ok((StatusCode::CREATED, Json(job))),
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::CloneFailed,
            format!(
                "clone {} failed: {}",
                job.id,
                job.error.as_deref().unwrap_or("the server stopped")
            ),
        )),
    }
}

async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobInfo>> {
    Ok(Json(state.control.job(&id).await?))
}

async fn retry_job(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    let (job, _done) = state.control.retry_clone(&id, &actor.0).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

async fn set_retention(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(env): Path<String>,
    body: Body,
) -> ApiResult<Json<EnvInfo>> {
    let retention: Retention = parse(&body)?;
    state
        .control
        .set_retention(&env, retention, &actor.0)
        .await?;
    Ok(Json(env_info(&state, &*env_hub(&state, &env)?)))
}

/// `?limit=` (1 to 1,000, default 50) and `?before=` (an entry id) of `GET …/audit`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
    before: Option<u64>,
}

async fn audit(
    State(state): State<AppState>,
    Path(env): Path<String>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
    let limit = q.limit.unwrap_or(50).clamp(1, 1_000);
    let entries = state.control.audit(&env, q.before, limit).await?;
    let next_before = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditPage {
        entries,
        next_before,
    }))
}

async fn list_tokens(State(state): State<AppState>) -> ApiResult<Json<TokenList>> {
    let tokens = state.control.tokens().await?;
    Ok(Json(TokenList {
        tokens: tokens.iter().map(TokenInfo::from).collect(),
    }))
}

async fn create_token(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    body: Body,
) -> ApiResult<(StatusCode, Json<NewTokenInfo>)> {
    let CreateToken { name } = parse(&body)?;
    let (record, secret) = state.control.create_token(&name, &actor.0).await?;
    let info = NewTokenInfo {
        token: TokenInfo::from(&record),
        secret,
    };
    Ok((StatusCode::CREATED, Json(info)))
}

async fn revoke_token(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
) -> ApiResult<Json<TokenInfo>> {
    let record = state.control.revoke_token(&name, &actor.0).await?;
    Ok(Json(TokenInfo::from(&record)))
}

async fn get_env(
    State(state): State<AppState>,
    Path(env): Path<String>,
) -> ApiResult<Json<EnvInfo>> {
    Ok(Json(env_info(&state, &*env_hub(&state, &env)?)))
}

async fn delete_env(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(env): Path<String>,
) -> ApiResult<StatusCode> {
    state.control.delete_env(&env, &actor.0).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_flags(
    State(state): State<AppState>,
    Path(env): Path<String>,
) -> ApiResult<Json<FlagList>> {
    let list = env_hub(&state, &env)?.with_history(|h| FlagList {
        at: At::from(h.selector()),
        flags: h.flags().map(|e| e.compiled.flag().clone()).collect(),
    });
    Ok(Json(list))
}

fn flag_not_found(key: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::FlagNotFound,
        format!("flag {key:?} not found"),
    )
}

async fn get_flag(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
) -> ApiResult<Json<Flag>> {
    env_hub(&state, &env)?
        .with_history(|h| h.flag(&key).map(|e| e.compiled.flag().clone()))
        .map(Json)
        .ok_or_else(|| flag_not_found(&key))
}

/// Parses a flag or segment body; its `key`, if present, must match the path.
fn keyed_body<T: DeserializeOwned>(body: &Body, key: &str) -> ApiResult<T> {
    let mut value: Value = parse(body)?;
    let Some(object) = value.as_object_mut() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadJson,
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
                ErrorCode::Invalid,
                format!("key: {other} does not match the path ({key:?})"),
            ));
        }
    }
    serde_json::from_value(value).map_err(bad_json)
}

async fn put_flag(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path((env, key)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<Written>> {
    let flag: Flag = keyed_body(&body, &key)?;
    edit(&state, &env, Edit::PutFlag(flag), &actor).await
}

async fn delete_flag(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path((env, key)): Path<(String, String)>,
) -> ApiResult<Json<Written>> {
    edit(&state, &env, Edit::DeleteFlag(key), &actor).await
}

async fn toggle_flag(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path((env, key)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<Written>> {
    let Toggle { on } = parse(&body)?;
    edit(&state, &env, Edit::Toggle { key, on }, &actor).await
}

async fn list_segments(
    State(state): State<AppState>,
    Path(env): Path<String>,
) -> ApiResult<Json<SegmentList>> {
    let list = env_hub(&state, &env)?.with_history(|h| SegmentList {
        at: At::from(h.selector()),
        segments: h.segments().map(|e| e.compiled.segment().clone()).collect(),
    });
    Ok(Json(list))
}

async fn get_segment(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
) -> ApiResult<Json<Segment>> {
    env_hub(&state, &env)?
        .with_history(|h| h.segment_entry(&key).map(|e| e.compiled.segment().clone()))
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::SegmentNotFound,
                format!("segment {key:?} not found"),
            )
        })
}

async fn put_segment(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path((env, key)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<Written>> {
    let segment: Segment = keyed_body(&body, &key)?;
    edit(&state, &env, Edit::PutSegment(segment), &actor).await
}

async fn delete_segment(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path((env, key)): Path<(String, String)>,
) -> ApiResult<Json<Written>> {
    edit(&state, &env, Edit::DeleteSegment(key), &actor).await
}

async fn list_keys(
    State(state): State<AppState>,
    Path(env): Path<String>,
) -> ApiResult<Json<KeyList>> {
    let keys = state.control.keys(&env).await?;
    Ok(Json(KeyList {
        keys: keys.iter().map(KeyInfo::from).collect(),
    }))
}

async fn create_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(env): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<NewKeyInfo>)> {
    let CreateKey { kind } = parse(&body)?;
    let key = state.control.create_key(&env, kind, &actor.0).await?;
    let info = NewKeyInfo {
        key: KeyInfo::from(&key.record),
        secret: key.secret,
    };
    Ok((StatusCode::CREATED, Json(info)))
}

async fn revoke_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path((env, id)): Path<(String, String)>,
) -> ApiResult<Json<KeyInfo>> {
    let record = state.control.revoke_key(&env, &id, &actor.0).await?;
    Ok(Json(KeyInfo::from(&record)))
}

async fn propagation(
    State(state): State<AppState>,
    Path(env): Path<String>,
) -> ApiResult<Json<Propagation>> {
    let p = env_hub(&state, &env)?.propagation();
    let others = state.control.fleet_acks(&env).await?;
    if others.is_empty() {
        return Ok(Json(Propagation {
            version: p.version,
            sessions: p.sessions,
            current: p.current,
            by_version: p.by_version,
            nodes: Vec::new(),
        }));
    }
    // The fleet: this node's sessions and what the others last reported, counted against the
    // newest version any node holds.
    let version = others.iter().map(|a| a.version).fold(p.version, u64::max);
    let now_ms = crate::store::unix_now_ns() / 1_000_000;
    let mut by_version = p.by_version.clone();
    let mut nodes = vec![NodePropagation {
        node: state.control.node().to_owned(),
        version: p.version,
        sessions: p.sessions,
        current: p.by_version.get(&version).copied().unwrap_or(0),
        reported_ms_ago: 0,
    }];
    for a in &others {
        for (v, n) in &a.by_version {
            *by_version.entry(*v).or_insert(0) += *n as usize;
        }
        nodes.push(NodePropagation {
            node: a.node.clone(),
            version: a.version,
            sessions: a.sessions as usize,
            current: a.by_version.get(&version).copied().unwrap_or(0) as usize,
            reported_ms_ago: u64::try_from(now_ms.saturating_sub(a.at_ms.max(0) as u128))
                .unwrap_or(0),
        });
    }
    Ok(Json(Propagation {
        version,
        sessions: nodes.iter().map(|n| n.sessions).sum(),
        current: by_version.get(&version).copied().unwrap_or(0),
        by_version,
        nodes,
    }))
}

/// "Why does this user get B?": the value, variant and reason, and the rule or bucket that decided.
async fn evaluate_flag(
    State(state): State<AppState>,
    Path((env, key)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<Explanation>> {
    let EvaluateRequest { context } = parse(&body)?;
    let ctx = Context::new(context).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidContext,
            e.to_string(),
        )
    })?;
    let answer = env_hub(&state, &env)?.with_history(|h| {
        let entry = h.flag(&key)?;
        let e = entry.compiled.evaluate(&ctx, h);
        let flag = entry.compiled.flag();
        let rule = e.rule.map(|index| {
            let r = &flag.rules[index];
            RuleRef {
                index,
                id: (!r.id.is_empty()).then(|| r.id.clone()),
                description: (!r.description.is_empty()).then(|| r.description.clone()),
            }
        });
        Some(Explanation {
            flag: key.clone(),
            served: Details::from(e),
            rule,
            bucket: e.bucket,
            explanation: e.explanation(),
            version: h.selector().version,
        })
    });
    answer.map(Json).ok_or_else(|| flag_not_found(&key))
}
