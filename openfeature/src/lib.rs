//! An OpenFeature provider over the Vane Rust client, for services that use OpenFeature's API:
//! every resolution reads the client's memory (rules mode evaluates locally; evaluated mode
//! reads the values the server pushed), so it never waits on the network, and the push
//! protocol keeps it current.
//!
//! ```no_run
//! # async fn demo(client: vane_core::client::Client) {
//! use open_feature::{EvaluationContext, OpenFeature};
//! use vane_openfeature::VaneProvider;
//!
//! let provider = VaneProvider::new(client);
//! let mut changes = provider.changes(); // Vane's updates: the keys each change touched
//! let mut api = OpenFeature::singleton_mut().await;
//! api.set_provider(provider).await;
//! let flags = api.create_client();
//! let ctx = EvaluationContext::default().with_targeting_key("user-1");
//! let on = flags.get_bool_value("new-checkout", Some(&ctx), None).await.unwrap_or(false);
//! # }
//! ```
//!
//! Change events: the `open-feature` crate (0.3) has no provider-event API yet, so the
//! provider hands out the client's own update stream ([`VaneProvider::changes`]), whose
//! updates name the flags each change touched.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use open_feature::provider::{
    FeatureProvider, ProviderMetadata, ProviderStatus, ResolutionDetails,
};
use open_feature::{
    EvaluationContext, EvaluationContextFieldValue, EvaluationError, EvaluationErrorCode,
    EvaluationReason, EvaluationResult, FlagMetadata, StructValue, Value,
};
use serde_json::{Map, Value as Json};
use tokio::sync::broadcast;
use vane_core::client::{Client, Details};
use vane_core::eval::{Context, ErrorCode, Reason};
use vane_core::model::FlagValue;
use vane_core::sync::Update;

/// How long [`FeatureProvider::initialize`] waits for the client's first flags.
const INITIALIZE_WITHIN: Duration = Duration::from_secs(10);

/// The provider. Cheap to clone: it shares the client.
#[derive(Debug, Clone)]
pub struct VaneProvider {
    client: Arc<Client>,
    metadata: ProviderMetadata,
}

impl VaneProvider {
    /// A provider over `client` (started with [`Client::start`]).
    pub fn new(client: Client) -> VaneProvider {
        VaneProvider {
            client: Arc::new(client),
            metadata: ProviderMetadata::new("vane"),
        }
    }

    /// The Vane client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Every update the client applies from now on, with the flag keys it changed.
    pub fn changes(&self) -> broadcast::Receiver<Update> {
        self.client.subscribe()
    }

    fn details(
        &self,
        key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<(FlagValue, Details)> {
        let details = self.client.details_for(key, &context(ctx)?);
        match (&details.value, details.error_code) {
            (Some(value), None) => Ok((value.clone(), details)),
            (_, code) => Err(error(code.unwrap_or(ErrorCode::General), key)),
        }
    }
}

/// Vane's context from OpenFeature's: the targeting key is the context's key, the fields are
/// its attributes (a date-time as RFC 3339 text; a structure if it is a `serde_json::Value`).
pub fn context(ctx: &EvaluationContext) -> EvaluationResult<Context> {
    let mut json = Map::new();
    for (name, field) in &ctx.custom_fields {
        let value = match field {
            EvaluationContextFieldValue::Bool(b) => Json::Bool(*b),
            EvaluationContextFieldValue::Int(i) => Json::from(*i),
            EvaluationContextFieldValue::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number)
            }
            EvaluationContextFieldValue::String(s) => Json::String(s.clone()),
            EvaluationContextFieldValue::DateTime(t) => t
                .format(&time::format_description::well_known::Rfc3339)
                .map(Json::String)
                .map_err(|e| invalid(&format!("{name}: {e}")))?,
            EvaluationContextFieldValue::Struct(any) => match any.downcast_ref::<Json>() {
                Some(v) => v.clone(),
                None => {
                    return Err(invalid(&format!(
                        "{name}: a structure other than serde_json::Value"
                    )));
                }
            },
        };
        json.insert(name.clone(), value);
    }
    match &ctx.targeting_key {
        Some(key) => {
            json.insert("key".into(), Json::String(key.clone()));
        }
        None => {
            json.remove("key");
        }
    }
    Context::new(Json::Object(json)).map_err(|e| invalid(&e.to_string()))
}

fn invalid(message: &str) -> EvaluationError {
    EvaluationError {
        code: EvaluationErrorCode::InvalidContext,
        message: Some(message.to_owned()),
    }
}

fn error(code: ErrorCode, key: &str) -> EvaluationError {
    let code = match code {
        ErrorCode::FlagNotFound => EvaluationErrorCode::FlagNotFound,
        ErrorCode::TypeMismatch => EvaluationErrorCode::TypeMismatch,
        ErrorCode::ParseError => EvaluationErrorCode::ParseError,
        ErrorCode::TargetingKeyMissing => EvaluationErrorCode::TargetingKeyMissing,
        ErrorCode::ProviderNotReady => EvaluationErrorCode::ProviderNotReady,
        _ => EvaluationErrorCode::General("evaluation failed".into()),
    };
    EvaluationError {
        message: Some(format!("flag {key:?}: {code}")),
        code,
    }
}

fn mismatch(key: &str, want: &str) -> EvaluationError {
    EvaluationError {
        code: EvaluationErrorCode::TypeMismatch,
        message: Some(format!("flag {key:?} is not {want}")),
    }
}

fn reason(r: Reason) -> EvaluationReason {
    match r {
        Reason::Static => EvaluationReason::Static,
        Reason::TargetingMatch => EvaluationReason::TargetingMatch,
        Reason::Split => EvaluationReason::Split,
        Reason::Default => EvaluationReason::Default,
        Reason::Disabled => EvaluationReason::Disabled,
        Reason::Cached => EvaluationReason::Cached,
        Reason::Error => EvaluationReason::Error,
        _ => EvaluationReason::Unknown,
    }
}

fn resolved<T>(value: T, details: Details) -> ResolutionDetails<T> {
    ResolutionDetails {
        value,
        variant: details.variant,
        reason: Some(reason(details.reason)),
        flag_metadata: Some(FlagMetadata {
            values: HashMap::from([("provider".to_owned(), "vane".to_owned().into())]),
        }),
    }
}

/// An OpenFeature value from JSON.
fn of_value(json: &Json) -> Value {
    match json {
        Json::Null => Value::String(String::new()),
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or_default()),
        },
        Json::String(s) => Value::String(s.clone()),
        Json::Array(items) => Value::Array(items.iter().map(of_value).collect()),
        Json::Object(fields) => Value::Struct(StructValue {
            fields: fields
                .iter()
                .map(|(k, v)| (k.clone(), of_value(v)))
                .collect(),
        }),
    }
}

#[async_trait::async_trait]
impl FeatureProvider for VaneProvider {
    async fn initialize(&mut self, _context: &EvaluationContext) {
        // Not initialized in time: resolutions answer PROVIDER_NOT_READY (the caller's default)
        // until the first flags arrive; the client keeps trying.
        let _ = self.client.wait_for_initialization(INITIALIZE_WITHIN).await;
    }

    fn status(&self) -> ProviderStatus {
        if self.client.status().initialized {
            ProviderStatus::Ready
        } else {
            ProviderStatus::NotReady
        }
    }

    fn metadata(&self) -> &ProviderMetadata {
        &self.metadata
    }

    async fn resolve_bool_value(
        &self,
        key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<bool>> {
        match self.details(key, ctx)? {
            (FlagValue::Bool(b), d) => Ok(resolved(b, d)),
            _ => Err(mismatch(key, "a boolean")),
        }
    }

    async fn resolve_int_value(
        &self,
        key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<i64>> {
        match self.details(key, ctx)? {
            (FlagValue::Number(n), d) if n.fract() == 0.0 && n.abs() < 9.2e18 => {
                Ok(resolved(n as i64, d))
            }
            _ => Err(mismatch(key, "an integer")),
        }
    }

    async fn resolve_float_value(
        &self,
        key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<f64>> {
        match self.details(key, ctx)? {
            (FlagValue::Number(n), d) => Ok(resolved(n, d)),
            _ => Err(mismatch(key, "a number")),
        }
    }

    async fn resolve_string_value(
        &self,
        key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<String>> {
        match self.details(key, ctx)? {
            (FlagValue::String(s), d) => Ok(resolved(s, d)),
            _ => Err(mismatch(key, "a string")),
        }
    }

    async fn resolve_struct_value(
        &self,
        key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<StructValue>> {
        match self.details(key, ctx)? {
            (FlagValue::Json(json @ Json::Object(_)), d) => match of_value(&json) {
                Value::Struct(s) => Ok(resolved(s, d)),
                _ => Err(mismatch(key, "an object")),
            },
            _ => Err(mismatch(key, "an object")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targeting_key_is_the_context_key_and_fields_are_attributes() {
        let ctx = EvaluationContext::default()
            .with_targeting_key("u-1")
            .with_custom_field("plan", "pro")
            .with_custom_field("age", 30)
            .with_custom_field("beta", true)
            .with_custom_field("key", "not the key");
        let c = context(&ctx).unwrap();
        assert_eq!(c.key(), Some("u-1"));
        assert_eq!(c.get("plan"), Some(&Json::String("pro".into())));
        assert_eq!(c.get("age"), Some(&Json::from(30)));
        assert_eq!(c.get("beta"), Some(&Json::Bool(true)));
        let anonymous = EvaluationContext::default().with_custom_field("key", "sneaky");
        assert_eq!(context(&anonymous).unwrap().key(), None);
    }
}
