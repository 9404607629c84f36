//! The evaluation context: a JSON object whose `key` is the targeting key, and attribute paths
//! split once when a flag is compiled.

use serde_json::Value as Json;

/// The attributes a flag is evaluated for: a JSON object. `key` is the targeting key.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Context {
    value: serde_json::Map<String, Json>,
}

/// Why a context was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid context: {0}")]
pub struct ContextError(String);

impl Context {
    /// A context from a JSON value, which must be an object whose `key`, if present, is a string.
    pub fn new(value: Json) -> Result<Context, ContextError> {
        let Json::Object(map) = value else {
            return Err(ContextError("must be a JSON object".into()));
        };
        if map.get("key").is_some_and(|k| !k.is_string()) {
            return Err(ContextError(
                "\"key\" (the targeting key) must be a string".into(),
            ));
        }
        Ok(Context { value: map })
    }

    /// Parses a context from JSON text.
    pub fn parse(text: &str) -> Result<Context, ContextError> {
        let value = serde_json::from_str(text).map_err(|e| ContextError(e.to_string()))?;
        Context::new(value)
    }

    /// A context with only a targeting key.
    pub fn with_key(key: impl Into<String>) -> Context {
        let mut value = serde_json::Map::new();
        value.insert("key".into(), Json::String(key.into()));
        Context { value }
    }

    /// The targeting key.
    pub fn key(&self) -> Option<&str> {
        self.value.get("key").and_then(Json::as_str)
    }

    /// The attribute at a dotted path (`app.version`), without allocating.
    pub fn get(&self, path: &str) -> Option<&Json> {
        let mut parts = path.split('.');
        let mut current = self.value.get(parts.next()?)?;
        for part in parts {
            current = current.as_object()?.get(part)?;
        }
        Some(current)
    }

    /// The context as JSON.
    pub fn to_json(&self) -> Json {
        Json::Object(self.value.clone())
    }

    /// The attribute at a path already split into its parts (see [`Path`]).
    pub(super) fn get_path(&self, path: &Path) -> Option<&Json> {
        let (first, rest) = path.0.split_first()?;
        let mut current = self.value.get(first)?;
        for part in rest {
            current = current.as_object()?.get(part)?;
        }
        Some(current)
    }
}

/// A dotted attribute path, split once when a flag is compiled.
#[derive(Debug, Clone)]
pub(super) struct Path(Box<[String]>);

impl Path {
    pub(super) fn new(dotted: &str) -> Path {
        Path(dotted.split('.').map(str::to_owned).collect())
    }

    pub(super) fn is_targeting_key(&self) -> bool {
        self.0.len() == 1 && self.0[0] == "key"
    }
}
