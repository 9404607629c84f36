//! The flag model: what the admin API accepts as JSON, what the store keeps, and what travels in
//! `vane.v1.Flag` for rules-mode clients.
//!
//! A flag has typed variants (all of one type), the variant served while it is off, and what it
//! serves while on (`fallthrough`). Targeting rules and rollouts extend `Serve` and add a `rules`
//! list; the evaluation issue adds them without changing what is here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vane_proto::v1 as pb;

/// Longest flag key, environment name or variant name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// Most variants a flag may have.
pub const MAX_VARIANTS: usize = 64;

/// Largest JSON variant value, in bytes of compact JSON text, and largest string value.
pub const MAX_JSON_VALUE_LEN: usize = 32 * 1024;

/// A variant's value. In JSON it is written as itself: `true`, `"text"`, `3.5`, `{"a": 1}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FlagValue {
    /// A boolean.
    Bool(bool),
    /// A number (IEEE 754 double, like JSON).
    Number(f64),
    /// A string.
    String(String),
    /// A JSON object or array.
    Json(serde_json::Value),
}

/// The type shared by all of a flag's variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// `true`/`false`.
    Bool,
    /// A number.
    Number,
    /// A string.
    String,
    /// A JSON object or array.
    Json,
}

impl FlagValue {
    /// This value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            FlagValue::Bool(_) => ValueType::Bool,
            FlagValue::Number(_) => ValueType::Number,
            FlagValue::String(_) => ValueType::String,
            FlagValue::Json(_) => ValueType::Json,
        }
    }
}

/// What a flag serves while it is on. Rollouts join this enum with the evaluation issue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Serve {
    /// Always this variant.
    Variant(String),
}

/// A feature flag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flag {
    /// Unique within an environment: letters, digits, `.`, `_`, `-`.
    pub key: String,
    /// Off: serves `off_variant`; on: serves `fallthrough`.
    pub on: bool,
    /// Variant name → value; all values of one type.
    pub variants: BTreeMap<String, FlagValue>,
    /// The variant served while the flag is off.
    pub off_variant: String,
    /// What the flag serves while it is on.
    pub fallthrough: Serve,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The environment version at which this flag last changed. Set by the server; ignored on input.
    #[serde(default)]
    pub version: u64,
}

/// A flag definition that cannot be stored, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The JSON path of the offending field, e.g. `variants.on` or `off_variant`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Checks a flag key, environment name or other identifier: 1 to 128 of `[A-Za-z0-9._-]`.
pub fn validate_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ValidationError::new(
            field,
            format!("character {c:?} is not allowed (use letters, digits, '.', '_' and '-')"),
        ));
    }
    Ok(())
}

impl Flag {
    /// A boolean flag with variants `true` and `false`, serving `value` while on and `false` while off.
    pub fn boolean(key: impl Into<String>, on: bool, value: bool) -> Flag {
        Flag {
            key: key.into(),
            on,
            variants: BTreeMap::from([
                ("true".to_owned(), FlagValue::Bool(true)),
                ("false".to_owned(), FlagValue::Bool(false)),
            ]),
            off_variant: "false".into(),
            fallthrough: Serve::Variant(value.to_string()),
            description: String::new(),
            version: 0,
        }
    }

    /// The type of this flag's values (of its off variant, which validation ties to all others).
    pub fn value_type(&self) -> Option<ValueType> {
        self.variants.values().next().map(FlagValue::value_type)
    }

    /// Checks everything the store relies on; the error names the field.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("key", &self.key)?;
        if self.variants.is_empty() {
            return Err(ValidationError::new(
                "variants",
                "at least one variant is required",
            ));
        }
        if self.variants.len() > MAX_VARIANTS {
            return Err(ValidationError::new(
                "variants",
                format!("at most {MAX_VARIANTS} variants are allowed"),
            ));
        }
        let mut expected: Option<ValueType> = None;
        for (name, value) in &self.variants {
            let field = format!("variants.{name}");
            validate_name(&field, name)?;
            match value {
                FlagValue::Number(n) if !n.is_finite() => {
                    return Err(ValidationError::new(field, "must be a finite number"));
                }
                FlagValue::Json(v) if !(v.is_object() || v.is_array()) => {
                    return Err(ValidationError::new(
                        field,
                        "must be a boolean, number, string, object or array (not null)",
                    ));
                }
                FlagValue::Json(v) if v.to_string().len() > MAX_JSON_VALUE_LEN => {
                    return Err(ValidationError::new(
                        field,
                        format!("JSON value is larger than {MAX_JSON_VALUE_LEN} bytes"),
                    ));
                }
                FlagValue::String(v) if v.len() > MAX_JSON_VALUE_LEN => {
                    return Err(ValidationError::new(
                        field,
                        format!("string value is longer than {MAX_JSON_VALUE_LEN} bytes"),
                    ));
                }
                _ => {}
            }
            let ty = value.value_type();
            match expected {
                None => expected = Some(ty),
                Some(e) if e != ty => {
                    return Err(ValidationError::new(
                        field,
                        format!(
                            "is {ty:?} but other variants are {e:?}; all variants share one type"
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        self.check_variant("off_variant", &self.off_variant)?;
        match &self.fallthrough {
            Serve::Variant(v) => self.check_variant("fallthrough.variant", v)?,
        }
        Ok(())
    }

    fn check_variant(&self, field: &str, name: &str) -> Result<(), ValidationError> {
        if self.variants.contains_key(name) {
            Ok(())
        } else {
            let known: Vec<&str> = self.variants.keys().map(String::as_str).collect();
            Err(ValidationError::new(
                field,
                format!("unknown variant {name:?} (variants: {})", known.join(", ")),
            ))
        }
    }
}

/// Why a protobuf `Flag` could not be turned into a [`Flag`].
#[derive(Debug, thiserror::Error)]
#[error("flag {key:?}: {message}")]
pub struct WireFlagError {
    key: String,
    message: String,
}

impl From<&Flag> for pb::Flag {
    fn from(flag: &Flag) -> pb::Flag {
        pb::Flag {
            key: flag.key.clone(),
            on: flag.on,
            variants: flag
                .variants
                .iter()
                .map(|(name, value)| pb::Variant {
                    name: name.clone(),
                    value: Some(value.into()),
                })
                .collect(),
            off_variant: flag.off_variant.clone(),
            fallthrough_variant: match &flag.fallthrough {
                Serve::Variant(v) => v.clone(),
            },
            version: flag.version,
            description: flag.description.clone(),
        }
    }
}

impl From<&FlagValue> for pb::Value {
    fn from(value: &FlagValue) -> pb::Value {
        use pb::value::Kind;
        let kind = match value {
            FlagValue::Bool(b) => Kind::Bool(*b),
            FlagValue::Number(n) => Kind::Number(*n),
            FlagValue::String(s) => Kind::String(s.clone()),
            FlagValue::Json(j) => Kind::Json(j.to_string()),
        };
        pb::Value { kind: Some(kind) }
    }
}

impl TryFrom<pb::Flag> for Flag {
    type Error = WireFlagError;

    fn try_from(wire: pb::Flag) -> Result<Flag, WireFlagError> {
        use pb::value::Kind;
        let err = |message: String| WireFlagError {
            key: wire.key.clone(),
            message,
        };
        let mut variants = BTreeMap::new();
        for v in &wire.variants {
            let value = match v.value.as_ref().and_then(|v| v.kind.as_ref()) {
                Some(Kind::Bool(b)) => FlagValue::Bool(*b),
                Some(Kind::Number(n)) => FlagValue::Number(*n),
                Some(Kind::String(s)) => FlagValue::String(s.clone()),
                Some(Kind::Json(text)) => FlagValue::Json(
                    serde_json::from_str(text)
                        .map_err(|e| err(format!("variant {:?}: bad JSON: {e}", v.name)))?,
                ),
                None => return Err(err(format!("variant {:?} has no value", v.name))),
            };
            variants.insert(v.name.clone(), value);
        }
        let flag = Flag {
            key: wire.key.clone(),
            on: wire.on,
            variants,
            off_variant: wire.off_variant,
            fallthrough: Serve::Variant(wire.fallthrough_variant),
            description: wire.description,
            version: wire.version,
        };
        flag.validate().map_err(|e| err(e.to_string()))?;
        Ok(flag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_round_trips() {
        let text = r#"{"key":"banner","on":true,"variants":{"a":"hello","b":"bye"},
            "off_variant":"b","fallthrough":{"variant":"a"},"description":"top"}"#;
        let flag: Flag = serde_json::from_str(text).unwrap();
        flag.validate().unwrap();
        assert_eq!(flag.variants["a"], FlagValue::String("hello".into()));
        let back: Flag = serde_json::from_str(&serde_json::to_string(&flag).unwrap()).unwrap();
        assert_eq!(back, flag);
    }

    #[test]
    fn wire_round_trip_keeps_every_type() {
        let mut flag = Flag::boolean("x", true, true);
        flag.version = 9;
        let wire = pb::Flag::from(&flag);
        assert_eq!(Flag::try_from(wire).unwrap(), flag);
        let json = Flag {
            key: "cfg".into(),
            on: false,
            variants: BTreeMap::from([(
                "v".into(),
                FlagValue::Json(serde_json::json!({"limit": 3, "tags": ["a"]})),
            )]),
            off_variant: "v".into(),
            fallthrough: Serve::Variant("v".into()),
            description: "d".into(),
            version: 2,
        };
        assert_eq!(Flag::try_from(pb::Flag::from(&json)).unwrap(), json);
    }

    #[test]
    fn validation_names_the_field() {
        let mut flag = Flag::boolean("ok", true, true);
        flag.off_variant = "nope".into();
        assert_eq!(flag.validate().unwrap_err().field, "off_variant");

        let mut mixed = Flag::boolean("ok", true, true);
        mixed
            .variants
            .insert("zzz".into(), FlagValue::String("s".into()));
        assert_eq!(mixed.validate().unwrap_err().field, "variants.zzz");

        let mut long = Flag::boolean("ok", true, true);
        long.variants = BTreeMap::from([(
            "s".into(),
            FlagValue::String("x".repeat(MAX_JSON_VALUE_LEN + 1)),
        )]);
        long.off_variant = "s".into();
        long.fallthrough = Serve::Variant("s".into());
        assert_eq!(long.validate().unwrap_err().field, "variants.s");

        let bad_key = Flag::boolean("has space", true, true);
        assert_eq!(bad_key.validate().unwrap_err().field, "key");

        let mut null = Flag::boolean("ok", true, true);
        null.variants
            .insert("n".into(), FlagValue::Json(serde_json::Value::Null));
        assert_eq!(null.validate().unwrap_err().field, "variants.n");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let text = r#"{"key":"k","on":true,"variants":{"a":1},"off_variant":"a",
            "fallthrough":{"variant":"a"},"colour":"red"}"#;
        let err = serde_json::from_str::<Flag>(text).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
