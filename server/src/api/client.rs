//! The one client of the admin API (and of the operations endpoints beside it): the CLI, the
//! end-to-end tests and `vane-load` all use it, so no caller spells a URL or parses an answer by
//! hand.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vane_server::api::client::AdminError> {
//! use vane_server::api::client::AdminClient;
//!
//! let admin = AdminClient::new("http://127.0.0.1:7480", "vane_adm_…");
//! let written = admin.toggle("prod", "new-checkout", false).await?;
//! println!("committed as version {}", written.at.version);
//! # Ok(()) }
//! ```

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use vane_core::model::{Flag, Segment};

use super::{
    ADMIN_PREFIX, AuditPage, CloneEnv, CreateEnv, CreateKey, CreateToken, EnvInfo, EnvList,
    ErrorBody, ErrorCode, EvaluateRequest, Explanation, FlagList, JobInfo, KeyInfo, KeyList,
    NewKeyInfo, NewTokenInfo, Propagation, Retention, SegmentList, Toggle, TokenInfo, TokenList,
    Written, route, routes,
};
use crate::keys::KeyKind;

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The server could not be reached, or the connection failed mid-answer.
    #[error("cannot reach {base}: {message}")]
    Unreachable {
        /// The server's base URL.
        base: String,
        /// What failed.
        message: String,
    },
    /// The server answered with an error.
    #[error("{}: {message}", code.as_str())]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The stable code.
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// The server answered something that is not the API's JSON.
    #[error("unexpected answer ({status}): {body}")]
    BadAnswer {
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
}

impl AdminError {
    /// The stable code of a refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AdminError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// An answer as it came, for callers that look at refusals themselves.
#[derive(Debug, Clone, PartialEq)]
pub struct RawAnswer {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body (`null` when empty).
    pub body: serde_json::Value,
}

/// An authenticated client of the admin API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:7480`) with an admin token.
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> AdminClient {
        AdminClient::with_http(reqwest::Client::new(), base, token)
    }

    /// The same, on a configured `reqwest` client (timeouts, proxies).
    pub fn with_http(
        http: reqwest::Client,
        base: impl Into<String>,
        token: impl Into<String>,
    ) -> AdminClient {
        AdminClient {
            http,
            base: base.into().trim_end_matches('/').to_owned(),
            token: token.into(),
        }
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The same server with another token (to see a refusal, say).
    pub fn with_token(&self, token: impl Into<String>) -> AdminClient {
        AdminClient {
            token: token.into(),
            ..self.clone()
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> AdminError {
        AdminError::Unreachable {
            base: self.base.clone(),
            message: e.to_string(),
        }
    }

    /// A `GET` of an operations endpoint (no token).
    async fn ops(&self, path: &str) -> Result<reqwest::Response, AdminError> {
        let url = format!("{}{path}", self.base);
        self.http
            .get(url)
            .send()
            .await
            .map_err(|e| self.unreachable(e))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Vec<u8>), AdminError> {
        let unreachable = |e| self.unreachable(e);
        let url = format!("{}{ADMIN_PREFIX}{path}", self.base);
        let mut req = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        Ok((status, bytes.to_vec()))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, AdminError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| AdminError::BadAnswer {
                status: 0,
                body: format!("the request does not serialize: {e}"),
            })?;
        let (status, bytes) = self.send(method, path, body).await?;
        let bad = || AdminError::BadAnswer {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
        };
        if !status.is_success() {
            let error: ErrorBody = serde_json::from_slice(&bytes).map_err(|_| bad())?;
            return Err(AdminError::Refused {
                status: status.as_u16(),
                code: error.error.code,
                message: error.error.message,
            });
        }
        // An empty body (204) reads as JSON `null`, which `()` accepts.
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes
        };
        serde_json::from_slice(bytes).map_err(|_| bad())
    }

    /// Sends a body as given and returns the answer as it came: for callers that test what
    /// the server refuses (bad JSON, wrong tokens), which the typed methods cannot send.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<RawAnswer, AdminError> {
        let (status, bytes) = self
            .send(method, path, body.map(String::into_bytes))
            .await?;
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| AdminError::BadAnswer {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })?
        };
        Ok(RawAnswer {
            status: status.as_u16(),
            body,
        })
    }

    /// Whether the server has loaded its state (`/readyz`; no token needed).
    pub async fn ready(&self) -> Result<bool, AdminError> {
        Ok(self.ops("/readyz").await?.status().is_success())
    }

    /// The server's metrics in the OpenMetrics text format (`/metrics`; no token needed).
    pub async fn metrics(&self) -> Result<String, AdminError> {
        let resp = self.ops("/metrics").await?;
        resp.text().await.map_err(|e| self.unreachable(e))
    }

    /// Every environment.
    pub async fn envs(&self) -> Result<EnvList, AdminError> {
        self.call(Method::GET, routes::ENVS, None::<&()>).await
    }

    /// Creates an environment.
    pub async fn create_env(&self, name: &str) -> Result<EnvInfo, AdminError> {
        let body = CreateEnv {
            name: name.to_owned(),
        };
        self.call(Method::POST, routes::ENVS, Some(&body)).await
    }

    /// One environment.
    pub async fn env(&self, name: &str) -> Result<EnvInfo, AdminError> {
        let path = route(routes::ENV, &[name]);
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Deletes an environment with its flags, segments and keys.
    pub async fn delete_env(&self, name: &str) -> Result<(), AdminError> {
        let path = route(routes::ENV, &[name]);
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    /// Every flag of `env`.
    pub async fn flags(&self, env: &str) -> Result<FlagList, AdminError> {
        let path = route(routes::FLAGS, &[env]);
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// One flag.
    pub async fn flag(&self, env: &str, key: &str) -> Result<Flag, AdminError> {
        let path = route(routes::FLAG, &[env, key]);
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Creates or replaces a flag from its definition: a [`Flag`], or a JSON document of one
    /// (docs/FLAGS.md; its `key` may be left out).
    pub async fn put_flag(
        &self,
        env: &str,
        key: &str,
        flag: &(impl Serialize + ?Sized),
    ) -> Result<Written, AdminError> {
        let path = route(routes::FLAG, &[env, key]);
        self.call(Method::PUT, &path, Some(flag)).await
    }

    /// Deletes a flag.
    pub async fn delete_flag(&self, env: &str, key: &str) -> Result<Written, AdminError> {
        let path = route(routes::FLAG, &[env, key]);
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    /// Turns a flag on or off.
    pub async fn toggle(&self, env: &str, key: &str, on: bool) -> Result<Written, AdminError> {
        let path = route(routes::TOGGLE, &[env, key]);
        self.call(Method::POST, &path, Some(&Toggle { on })).await
    }

    /// Evaluates a flag for `context` on the server, with the rule or bucket that decided.
    pub async fn evaluate(
        &self,
        env: &str,
        key: &str,
        context: serde_json::Value,
    ) -> Result<Explanation, AdminError> {
        let path = route(routes::EVALUATE, &[env, key]);
        self.call(Method::POST, &path, Some(&EvaluateRequest { context }))
            .await
    }

    /// Every segment of `env`.
    pub async fn segments(&self, env: &str) -> Result<SegmentList, AdminError> {
        let path = route(routes::SEGMENTS, &[env]);
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// One segment.
    pub async fn segment(&self, env: &str, key: &str) -> Result<Segment, AdminError> {
        let path = route(routes::SEGMENT, &[env, key]);
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Creates or replaces a segment: a [`Segment`], or a JSON document of one.
    pub async fn put_segment(
        &self,
        env: &str,
        key: &str,
        segment: &(impl Serialize + ?Sized),
    ) -> Result<Written, AdminError> {
        let path = route(routes::SEGMENT, &[env, key]);
        self.call(Method::PUT, &path, Some(segment)).await
    }

    /// Deletes a segment no flag or segment uses.
    pub async fn delete_segment(&self, env: &str, key: &str) -> Result<Written, AdminError> {
        let path = route(routes::SEGMENT, &[env, key]);
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    /// Every SDK key of `env`, revoked ones included.
    pub async fn keys(&self, env: &str) -> Result<KeyList, AdminError> {
        let path = route(routes::KEYS, &[env]);
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Creates an SDK key; its secret is in the answer and nowhere else.
    pub async fn create_key(&self, env: &str, kind: KeyKind) -> Result<NewKeyInfo, AdminError> {
        let path = route(routes::KEYS, &[env]);
        self.call(Method::POST, &path, Some(&CreateKey { kind }))
            .await
    }

    /// Revokes a key; its sessions end at once.
    pub async fn revoke_key(&self, env: &str, id: &str) -> Result<KeyInfo, AdminError> {
        let path = route(routes::KEY, &[env, id]);
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    /// How far `env`'s versions have reached.
    pub async fn propagation(&self, env: &str) -> Result<Propagation, AdminError> {
        let path = route(routes::PROPAGATION, &[env]);
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Clones `env` into a new environment `name`: `asynchronous` (`None`: the server chooses
    /// by size) answers at once with the job, else once the clone is done.
    pub async fn clone_env(
        &self,
        env: &str,
        name: &str,
        asynchronous: Option<bool>,
    ) -> Result<JobInfo, AdminError> {
        let path = route(routes::CLONE, &[env]);
        let body = CloneEnv {
            name: name.to_owned(),
            asynchronous,
        };
        self.call(Method::POST, &path, Some(&body)).await
    }

    /// One job, with its progress.
    pub async fn job(&self, id: &str) -> Result<JobInfo, AdminError> {
        let path = route(routes::JOB, &[id]);
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Starts a failed clone again.
    pub async fn retry_job(&self, id: &str) -> Result<JobInfo, AdminError> {
        let path = route(routes::JOB_RETRY, &[id]);
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// Sets how much of `env`'s change log is kept (`None` fields: the server's default).
    pub async fn set_retention(
        &self,
        env: &str,
        retention: Retention,
    ) -> Result<EnvInfo, AdminError> {
        let path = route(routes::RETENTION, &[env]);
        self.call(Method::PUT, &path, Some(&retention)).await
    }

    /// A page of `env`'s audit log, newest first: at most `limit` entries older than `before`.
    pub async fn audit(
        &self,
        env: &str,
        limit: usize,
        before: Option<u64>,
    ) -> Result<AuditPage, AdminError> {
        let mut path = format!("{}?limit={limit}", route(routes::AUDIT, &[env]));
        if let Some(before) = before {
            path.push_str(&format!("&before={before}"));
        }
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Every named admin token, revoked ones included.
    pub async fn tokens(&self) -> Result<TokenList, AdminError> {
        self.call(Method::GET, routes::TOKENS, None::<&()>).await
    }

    /// Creates a named admin token; its secret is in the answer and nowhere else.
    pub async fn create_token(&self, name: &str) -> Result<NewTokenInfo, AdminError> {
        let body = CreateToken {
            name: name.to_owned(),
        };
        self.call(Method::POST, routes::TOKENS, Some(&body)).await
    }

    /// Revokes a named admin token.
    pub async fn revoke_token(&self, name: &str) -> Result<TokenInfo, AdminError> {
        let path = route(routes::TOKEN, &[name]);
        self.call(Method::DELETE, &path, None::<&()>).await
    }
}
