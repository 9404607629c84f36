//! The HTTP API's request and response types and its routes, defined once: the server's
//! handlers produce them, and [`client::AdminClient`] (used by the CLI, the end-to-end tests and
//! `vane-load`) sends and parses them. Flags and segments travel as the model's JSON
//! (docs/FLAGS.md).

pub mod client;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vane_core::client::Details;
use vane_core::model::{Flag, Segment};
use vane_core::protocol::Selector;

use crate::keys::{KeyKind, KeyRecord};
pub use crate::store::{
    AuditEntry, EnvState, JobRecord as JobInfo, JobState, Retention, TokenRecord,
};

/// Where the admin API is mounted.
pub const ADMIN_PREFIX: &str = "/api/v1";

/// The admin API's routes, in axum's pattern syntax (relative to [`ADMIN_PREFIX`]); the client
/// fills them with [`route`].
pub mod routes {
    /// `GET` list, `POST` create.
    pub const ENVS: &str = "/environments";
    /// `GET` show, `DELETE`.
    pub const ENV: &str = "/environments/{env}";
    /// `GET` every flag.
    pub const FLAGS: &str = "/environments/{env}/flags";
    /// `GET`, `PUT`, `DELETE` one flag.
    pub const FLAG: &str = "/environments/{env}/flags/{flag}";
    /// `POST` on or off.
    pub const TOGGLE: &str = "/environments/{env}/flags/{flag}/toggle";
    /// `POST` a context: the value and why.
    pub const EVALUATE: &str = "/environments/{env}/flags/{flag}/evaluate";
    /// `GET` every segment.
    pub const SEGMENTS: &str = "/environments/{env}/segments";
    /// `GET`, `PUT`, `DELETE` one segment.
    pub const SEGMENT: &str = "/environments/{env}/segments/{segment}";
    /// `GET` list, `POST` create.
    pub const KEYS: &str = "/environments/{env}/keys";
    /// `DELETE`: revoke.
    pub const KEY: &str = "/environments/{env}/keys/{id}";
    /// `GET` how far the versions have reached.
    pub const PROPAGATION: &str = "/environments/{env}/propagation";
    /// `POST` a clone of this environment: `{"name": …, "async": …}`.
    pub const CLONE: &str = "/environments/{env}/clone";
    /// `PUT` the environment's retention of its change log.
    pub const RETENTION: &str = "/environments/{env}/retention";
    /// `GET` a page of the environment's audit log (`?limit=&before=`).
    pub const AUDIT: &str = "/environments/{env}/audit";
    /// `GET` one job (a clone), with its progress.
    pub const JOB: &str = "/jobs/{id}";
    /// `POST`: start a failed clone again.
    pub const JOB_RETRY: &str = "/jobs/{id}/retry";
    /// `GET` list, `POST` create named admin tokens.
    pub const TOKENS: &str = "/tokens";
    /// `DELETE`: revoke a named admin token.
    pub const TOKEN: &str = "/tokens/{name}";
    /// `GET`: the live view's server-sent events (sessions, and how each change spread).
    pub const LIVE: &str = "/environments/{env}/live";
    /// SDK endpoint (not under the admin prefix): the environment of the presenting key.
    pub const SDK_SNAPSHOT: &str = "/sdk/v1/snapshot";
}

/// Fills a route's `{placeholders}` in order with `values`, each percent-encoded as one path
/// segment.
pub fn route(pattern: &str, values: &[&str]) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut values = values.iter();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c + 1);
        if let Some(v) = values.next() {
            encode_segment(v, &mut out);
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

fn encode_segment(value: &str, out: &mut String) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// What every error answer carries: `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// One error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable code, for programs.
    pub code: ErrorCode,
    /// What happened, naming the field at fault where there is one; for people.
    pub message: String,
    /// For an invalid flag or segment (422 `invalid`): the JSON path of the field at fault,
    /// e.g. `rules[0].clauses[1].values[0]` (the message starts with it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The stable error codes. Callers match on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// 400: the body is not the JSON the endpoint takes.
    BadJson,
    /// 400: a request HTTP itself refuses (a query that does not parse, a body that broke off).
    BadRequest,
    /// 401: no credentials, or wrong ones.
    Unauthorized,
    /// 403: the SDK key may not have what it asked for.
    Forbidden,
    /// 404: no such endpoint.
    NotFound,
    /// 405: the endpoint does not take this method (`Allow` says which it takes).
    MethodNotAllowed,
    /// 408: the request (its body) did not arrive in time.
    Timeout,
    /// 413: the body is over the limit (2 MB).
    PayloadTooLarge,
    /// 404.
    EnvironmentNotFound,
    /// 404.
    FlagNotFound,
    /// 404.
    SegmentNotFound,
    /// 404.
    KeyNotFound,
    /// 409.
    EnvironmentExists,
    /// 409 for an admin write, 503 for an SDK request: the environment is being created by a
    /// clone (or its clone failed).
    EnvironmentNotReady,
    /// 404.
    JobNotFound,
    /// 409: the job is not in a state that allows this (only a failed clone can be retried).
    JobState,
    /// 500: a synchronous clone failed; the message says why.
    CloneFailed,
    /// 404.
    TokenNotFound,
    /// 409.
    TokenExists,
    /// 409: a segment that flags or segments use cannot be deleted.
    SegmentInUse,
    /// 409: the edit kept meeting concurrent changes; retry.
    Conflict,
    /// 422: a flag or segment that cannot be stored; the message names the field.
    Invalid,
    /// 422: the evaluation context is not a JSON object with a string `key` (if any).
    InvalidContext,
    /// 503: the server is loading its state; retry after `Retry-After`.
    Initializing,
    /// 500.
    Internal,
    /// 503: not serving now (other than while loading), or the store is unreachable (an admin
    /// write to PostgreSQL while it is down: it was not acknowledged; retry).
    Unavailable,
    /// 429: too many failed attempts from this address; retry after `Retry-After`.
    RateLimited,
    /// A code this client does not know (from a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::EnvironmentNotFound => "environment_not_found",
            ErrorCode::FlagNotFound => "flag_not_found",
            ErrorCode::SegmentNotFound => "segment_not_found",
            ErrorCode::KeyNotFound => "key_not_found",
            ErrorCode::EnvironmentExists => "environment_exists",
            ErrorCode::EnvironmentNotReady => "environment_not_ready",
            ErrorCode::JobNotFound => "job_not_found",
            ErrorCode::JobState => "job_state",
            ErrorCode::CloneFailed => "clone_failed",
            ErrorCode::TokenNotFound => "token_not_found",
            ErrorCode::TokenExists => "token_exists",
            ErrorCode::SegmentInUse => "segment_in_use",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Invalid => "invalid",
            ErrorCode::InvalidContext => "invalid_context",
            ErrorCode::Initializing => "initializing",
            ErrorCode::Internal => "internal",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unknown => "unknown",
        }
    }
}

/// An epoch in JSON: 16 lowercase hex digits (a `u64` does not survive JavaScript's numbers).
pub mod epoch_hex {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use vane_core::protocol;

    /// Writes the hex form.
    pub fn serialize<S: Serializer>(epoch: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&protocol::epoch_hex(*epoch))
    }

    /// Reads the hex form.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        protocol::parse_epoch_hex(&text)
            .ok_or_else(|| D::Error::custom(format!("epoch {text:?} is not 16 hex digits")))
    }
}

/// An environment's position: its version and the epoch it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct At {
    /// Rises by one with every committed change.
    pub version: u64,
    /// Changes when history is discontinuous.
    #[serde(with = "epoch_hex")]
    pub epoch: u64,
}

impl From<Selector> for At {
    fn from(s: Selector) -> At {
        At {
            version: s.version,
            epoch: s.epoch,
        }
    }
}

impl From<At> for Selector {
    fn from(a: At) -> Selector {
        Selector {
            epoch: a.epoch,
            version: a.version,
        }
    }
}

/// The answer to every write: where the environment stands once the change is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// The version and epoch the change committed as.
    #[serde(flatten)]
    pub at: At,
    /// When it committed, Unix nanoseconds as a string (what `vane-load` measures from).
    #[serde(with = "ns_string")]
    pub committed_at_ns: u128,
}

mod ns_string {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(ns: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&ns.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// `POST /environments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnv {
    /// Letters, digits, `.`, `_`, `-`.
    pub name: String,
}

/// One environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvInfo {
    /// Its name.
    pub name: String,
    /// Where it stands.
    #[serde(flatten)]
    pub at: At,
    /// How many flags it has.
    pub flags: usize,
    /// `ready`, `creating` (a clone is filling it) or `failed` (its clone failed).
    pub state: EnvState,
    /// The clone job filling it (or that failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// While creating: items copied of the total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Why its clone failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How much of its change log is kept (its own setting, else the server's).
    pub retention: Retention,
}

/// How far a clone has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Flags and segments copied.
    pub copied: u64,
    /// Flags and segments to copy.
    pub total: u64,
}

/// `POST …/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneEnv {
    /// The new environment's name.
    pub name: String,
    /// `true`: answer 202 at once with the job; `false`: answer when done. Absent: synchronous
    /// for small sources (at most 1,000 items), asynchronous otherwise.
    #[serde(default, rename = "async", skip_serializing_if = "Option::is_none")]
    pub asynchronous: Option<bool>,
}

/// `POST /tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Letters, digits, `.`, `_`, `-`; recorded as the actor of what the token does.
    pub name: String,
}

/// A named admin token as the API shows it: never the secret or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Its name.
    pub name: String,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `null` while valid.
    pub revoked_at: Option<i64>,
}

impl From<&TokenRecord> for TokenInfo {
    fn from(t: &TokenRecord) -> TokenInfo {
        TokenInfo {
            name: t.name.clone(),
            prefix: t.prefix.clone(),
            created_at: t.created_at,
            revoked_at: t.revoked_at,
        }
    }
}

/// The answer to `POST /tokens`: the token, and its secret, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTokenInfo {
    /// The token.
    #[serde(flatten)]
    pub token: TokenInfo,
    /// The secret, for `Authorization: Bearer`; the server keeps only its hash.
    pub secret: String,
}

/// `GET /tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    /// Oldest first, revoked ones included.
    pub tokens: Vec<TokenInfo>,
}

/// `GET …/audit`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditPage {
    /// The entries.
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for the next (older) page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
}

/// `GET /environments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvList {
    /// By name.
    pub environments: Vec<EnvInfo>,
}

/// `GET …/flags`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlagList {
    /// The version the list is at.
    #[serde(flatten)]
    pub at: At,
    /// By key.
    pub flags: Vec<Flag>,
}

/// `GET …/segments`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentList {
    /// The version the list is at.
    #[serde(flatten)]
    pub at: At,
    /// By key.
    pub segments: Vec<Segment>,
}

/// `POST …/toggle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toggle {
    /// On or off.
    pub on: bool,
}

/// `POST …/keys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// What the key may ask for.
    pub kind: KeyKind,
}

/// An SDK key as the API shows it: never the secret or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Public id, used to revoke.
    pub id: String,
    /// The environment it belongs to.
    pub env: String,
    /// Server or mobile.
    pub kind: KeyKind,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `null` while valid.
    pub revoked_at: Option<i64>,
}

impl From<&KeyRecord> for KeyInfo {
    fn from(k: &KeyRecord) -> KeyInfo {
        KeyInfo {
            id: k.id.clone(),
            env: k.env.clone(),
            kind: k.kind,
            prefix: k.prefix.clone(),
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// The answer to `POST …/keys`: the key, and its secret, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewKeyInfo {
    /// The key.
    #[serde(flatten)]
    pub key: KeyInfo,
    /// The secret to configure the SDK with; the server keeps only its hash.
    pub secret: String,
}

/// `GET …/keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyList {
    /// Oldest first, revoked ones included.
    pub keys: Vec<KeyInfo>,
}

/// `POST …/evaluate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateRequest {
    /// The context, a JSON object.
    pub context: serde_json::Value,
}

/// The rule that decided an evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// Its position in the flag's rules, from 0.
    pub index: usize,
    /// Its id, if it has one.
    pub id: Option<String>,
    /// Its description, if it has one.
    pub description: Option<String>,
}

/// "Why does this user get B?": the answer to `POST …/evaluate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// The flag.
    pub flag: String,
    /// The value, variant and reason (`value`, `variant`, `reason`, `error_code` in JSON).
    #[serde(flatten)]
    pub served: Details,
    /// The rule that decided, if one did.
    pub rule: Option<RuleRef>,
    /// The rollout bucket (0 to 99 999), if a rollout decided.
    pub bucket: Option<u32>,
    /// The same, in a sentence.
    pub explanation: String,
    /// The environment version evaluated at.
    pub version: u64,
}

/// `GET …/propagation`: how many live sessions have acknowledged which version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Propagation {
    /// The environment's version.
    pub version: u64,
    /// Live sessions that have acked at least once.
    pub sessions: usize,
    /// Of those, how many hold the current version.
    pub current: usize,
    /// Acked version → how many sessions hold it.
    pub by_version: BTreeMap<u64, usize>,
    /// With several nodes on one store: each node's share, the node asked first (the totals
    /// above are the fleet's). Empty for a single node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodePropagation>,
}

/// One node's sessions in [`Propagation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePropagation {
    /// The node's id (drawn at its start; in its log's first lines).
    pub node: String,
    /// The environment's version at that node.
    pub version: u64,
    /// Its live sessions that have acked at least once.
    pub sessions: usize,
    /// Of those, how many hold the fleet's current version.
    pub current: usize,
    /// How long ago it reported, in milliseconds (0 for the node asked).
    pub reported_ms_ago: u64,
}

/// `GET /sdk/v1/snapshot`: an environment as an SDK that polls over HTTP sees it. With a server
/// key, the flag and segment definitions (rules mode); with a mobile key, the values evaluated
/// for the context in the `context` query parameter (evaluated mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SdkSnapshot {
    /// The environment.
    pub environment: String,
    /// Where it stands.
    #[serde(flatten)]
    pub at: At,
    /// Rules mode: every flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<Flag>>,
    /// Rules mode: every segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<Segment>>,
    /// Evaluated mode: every flag's value for the context, by key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<BTreeMap<String, Details>>,
}

/// A relay's `GET /status`: where each environment it mirrors stands with its upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// Whether it serves sessions (every environment has had its first snapshot).
    pub ready: bool,
    /// The upstream it mirrors, `HOST:PORT`.
    pub upstream: String,
    /// One per `--sdk-key`, in the order given.
    pub environments: Vec<RelayEnvStatus>,
}

/// One mirrored environment in [`RelayStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayEnvStatus {
    /// The environment, once the upstream named it.
    pub env: Option<String>,
    /// The first characters of the key it is mirrored with.
    pub key_prefix: String,
    /// `connecting`, `connected`, `disconnected` or `stopped` (refused: see `refused`).
    pub upstream: String,
    /// `quic` or `tcp`, while connected.
    pub transport: Option<String>,
    /// The version held (and served), once the first snapshot arrived.
    pub version: Option<u64>,
    /// Its epoch, 16 hex digits.
    pub epoch: Option<String>,
    /// Whether it is served: the first snapshot and the keys have arrived, and the upstream
    /// has not refused it.
    pub serving: bool,
    /// Since when (Unix milliseconds) the upstream has been out of reach, while it is and
    /// after the first snapshot: the state served is the last one received.
    pub stale_since_ms: Option<u64>,
    /// Why the last connection to the upstream ended or failed.
    pub last_error: Option<String>,
    /// Why the upstream refused the relay, for good (the environment is then not served).
    pub refused: Option<String>,
    /// Live downstream sessions.
    pub sessions: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_fill_in_order_and_encode_each_segment() {
        assert_eq!(
            route(routes::FLAG, &["prod", "new-checkout"]),
            "/environments/prod/flags/new-checkout"
        );
        assert_eq!(
            route(routes::FLAG, &["a b", "x/y"]),
            "/environments/a%20b/flags/x%2Fy"
        );
        assert_eq!(route(routes::ENVS, &[]), "/environments");
    }

    #[test]
    fn the_json_shapes_stay_as_documented() {
        let written = Written {
            at: At {
                version: 6,
                epoch: 0xab,
            },
            committed_at_ns: 1_700_000_000_000_000_001,
        };
        let json = serde_json::to_value(written).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"version": 6, "epoch": "00000000000000ab", "committed_at_ns": "1700000000000000001"})
        );
        assert_eq!(serde_json::from_value::<Written>(json).unwrap(), written);
        let error: ErrorBody =
            serde_json::from_str(r#"{"error": {"code": "from_the_future", "message": "m"}}"#)
                .unwrap();
        assert_eq!(error.error.code, ErrorCode::Unknown);
        for code in [
            ErrorCode::BadJson,
            ErrorCode::SegmentInUse,
            ErrorCode::InvalidContext,
        ] {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, code.as_str());
        }
    }
}
