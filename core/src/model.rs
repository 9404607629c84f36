//! The flag model: what the admin API accepts as JSON, what the store keeps, and what travels in
//! `vane.v1.Flag` for rules-mode clients.
//!
//! A flag has typed variants (all of one type), the variant served while it is off, targeting
//! rules tried in order, and what it serves when no rule matches (`fallthrough`): a variant or a
//! percentage rollout. Segments are reusable sets of contexts that rules refer to by key.
//! docs/FLAGS.md is the reference for this JSON; the `eval` module compiles and evaluates it
//! (this module depends on nothing else in the crate).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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

/// Total of a rollout's weights: weights are in thousandths of a percent.
pub const TOTAL_WEIGHT: u32 = 100_000;

/// Most rules per flag or segment, clauses per rule, and values per clause.
pub const MAX_RULES: usize = 1_000;
/// See [`MAX_RULES`].
pub const MAX_CLAUSES: usize = 100;
/// Values per clause, and keys per segment list.
pub const MAX_VALUES: usize = 100_000;

/// What a rule or the fallthrough serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Serve {
    /// Always this variant: `{"variant": "on"}`.
    Variant(String),
    /// A percentage rollout: `{"rollout": {...}}`.
    Rollout(Rollout),
}

/// A percentage rollout: contexts are bucketed by a stable hash of one attribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// The context attribute hashed (dotted path); default `key`, the targeting key.
    #[serde(default = "default_bucket_by")]
    pub bucket_by: String,
    /// Hashed before the attribute; default: the flag key. Share a salt between flags to give
    /// a context the same bucket in each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// Variants in bucket order, with weights summing to [`TOTAL_WEIGHT`].
    pub variants: Vec<Weighted>,
}

fn default_bucket_by() -> String {
    "key".into()
}

/// One variant's share of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weighted {
    /// The variant name.
    pub variant: String,
    /// Thousandths of a percent: 30% is 30000.
    pub weight: u32,
}

/// A clause operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    /// The attribute equals one of the values (type and value).
    #[serde(alias = "equals")]
    In,
    /// A string attribute starts with one of the values.
    StartsWith,
    /// A string attribute ends with one of the values.
    EndsWith,
    /// A string attribute contains one of the values.
    Contains,
    /// A string attribute matches one of the regular expressions.
    Matches,
    /// A number attribute is less than one of the values.
    Lt,
    /// Less than or equal.
    Lte,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Gte,
    /// A semantic version attribute equals one of the values.
    SemverEq,
    /// Is lower than one of the values.
    SemverLt,
    /// Is greater than one of the values.
    SemverGt,
    /// A time attribute (RFC 3339 text, or Unix milliseconds) is before one of the values.
    Before,
    /// Is after one of the values.
    After,
    /// The context is in one of the segments named by the values.
    InSegment,
}

/// One condition on a context attribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clause {
    /// Dotted path into the context; `key` is the targeting key. Ignored by `in_segment`.
    #[serde(default)]
    pub attribute: String,
    /// The operator.
    pub op: Operator,
    /// The operands: strings, numbers or booleans.
    pub values: Vec<serde_json::Value>,
    /// Inverts the result (a missing attribute still does not match).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub negate: bool,
}

/// A targeting rule: all clauses hold → serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// An optional id, shown by `vane eval` and in evaluation details.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// All must hold.
    pub clauses: Vec<Clause>,
    /// What the rule serves.
    pub serve: Serve,
}

/// A reusable set of contexts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// Unique within an environment.
    pub key: String,
    /// Targeting keys always in the segment (checked first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub included: Vec<String>,
    /// Targeting keys never in it (unless included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
    /// A context matching any rule is in the segment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<SegmentRule>,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The environment version at which it last changed. Set by the server.
    #[serde(default)]
    pub version: u64,
}

/// A segment rule: all clauses hold → in the segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentRule {
    /// All must hold.
    pub clauses: Vec<Clause>,
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
    /// Tried in order while the flag is on; the first whose clauses all hold decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// What the flag serves while on when no rule matches.
    pub fallthrough: Serve,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Labels for people and tools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
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
    /// An error of `field`: what is wrong with it.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
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
    // Names are URL path segments, and clients collapse these two before sending.
    if name == "." || name == ".." {
        return Err(ValidationError::new(
            field,
            format!("{name:?} reads as a path, not a name"),
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
            rules: Vec::new(),
            fallthrough: Serve::Variant(value.to_string()),
            description: String::new(),
            tags: Vec::new(),
            version: 0,
        }
    }

    /// The keys of the segments this flag's rules refer to.
    pub fn segment_refs(&self) -> impl Iterator<Item = &str> {
        self.rules
            .iter()
            .flat_map(|r| clause_segment_refs(&r.clauses))
    }

    /// The type of this flag's values (of its off variant, which validation ties to all others).
    pub fn value_type(&self) -> Option<ValueType> {
        self.variants.values().next().map(FlagValue::value_type)
    }

    /// The checks that need no compiling: names, value types and sizes, weights. Compiling
    /// (`eval::CompiledFlag::new`) makes these and the rest; the error names the field.
    pub(crate) fn check_structure(&self) -> Result<(), ValidationError> {
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
        if self.rules.len() > MAX_RULES {
            return Err(ValidationError::new(
                "rules",
                format!("at most {MAX_RULES} rules are allowed"),
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            self.check_serve(&format!("rules[{i}].serve"), &rule.serve)?;
        }
        self.check_serve("fallthrough", &self.fallthrough)?;
        for (i, tag) in self.tags.iter().enumerate() {
            validate_name(&format!("tags[{i}]"), tag)?;
        }
        Ok(())
    }

    fn check_serve(&self, field: &str, serve: &Serve) -> Result<(), ValidationError> {
        match serve {
            Serve::Variant(v) => self.check_variant(&format!("{field}.variant"), v),
            Serve::Rollout(r) => {
                let field = format!("{field}.rollout");
                if r.variants.is_empty() {
                    return Err(ValidationError::new(
                        format!("{field}.variants"),
                        "at least one variant is required",
                    ));
                }
                let mut total: u64 = 0;
                for (i, w) in r.variants.iter().enumerate() {
                    self.check_variant(&format!("{field}.variants[{i}].variant"), &w.variant)?;
                    total += u64::from(w.weight);
                }
                if total != u64::from(TOTAL_WEIGHT) {
                    return Err(ValidationError::new(
                        format!("{field}.variants"),
                        format!(
                            "weights sum to {total}, not {TOTAL_WEIGHT} (weights are thousandths of a percent)"
                        ),
                    ));
                }
                if r.bucket_by.is_empty() {
                    return Err(ValidationError::new(
                        format!("{field}.bucket_by"),
                        "must name an attribute",
                    ));
                }
                Ok(())
            }
        }
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

fn clause_segment_refs(clauses: &[Clause]) -> impl Iterator<Item = &str> {
    clauses
        .iter()
        .filter(|c| c.op == Operator::InSegment)
        .flat_map(|c| c.values.iter().filter_map(|v| v.as_str()))
}

impl Segment {
    /// The keys of the segments this segment's rules refer to.
    pub fn segment_refs(&self) -> impl Iterator<Item = &str> {
        self.rules
            .iter()
            .flat_map(|r| clause_segment_refs(&r.clauses))
    }

    /// The checks that need no compiling (see `eval::CompiledSegment::new` for the rest).
    pub(crate) fn check_structure(&self) -> Result<(), ValidationError> {
        validate_name("key", &self.key)?;
        for (field, list) in [("included", &self.included), ("excluded", &self.excluded)] {
            if list.len() > MAX_VALUES {
                return Err(ValidationError::new(
                    field,
                    format!("at most {MAX_VALUES} keys are allowed"),
                ));
            }
        }
        if self.rules.len() > MAX_RULES {
            return Err(ValidationError::new(
                "rules",
                format!("at most {MAX_RULES} rules are allowed"),
            ));
        }
        Ok(())
    }
}

/// The flags whose evaluation may change when `changed_flags` and `changed_segments` change:
/// those flags, and every flag that refers to a changed segment directly or through other
/// segments.
pub fn affected_flags<'a>(
    flags: impl Iterator<Item = &'a Flag>,
    segments: impl Iterator<Item = &'a Segment> + Clone,
    changed_flags: impl IntoIterator<Item = String>,
    changed_segments: impl IntoIterator<Item = String>,
) -> std::collections::BTreeSet<String> {
    let mut affected: std::collections::BTreeSet<String> = changed_flags.into_iter().collect();
    let mut dirty: std::collections::HashSet<String> = changed_segments.into_iter().collect();
    if dirty.is_empty() {
        return affected;
    }
    // Close the set of changed segments over "refers to".
    loop {
        let before = dirty.len();
        for seg in segments.clone() {
            if !dirty.contains(&seg.key) && seg.segment_refs().any(|r| dirty.contains(r)) {
                dirty.insert(seg.key.clone());
            }
        }
        if dirty.len() == before {
            break;
        }
    }
    for flag in flags {
        if flag.segment_refs().any(|r| dirty.contains(r)) {
            affected.insert(flag.key.clone());
        }
    }
    affected
}

/// Checks that every segment reference in `refs` names a known segment, and that following
/// references from `start` never comes back to it. `lookup` gives the references of a known
/// segment (`None`: no such segment).
pub fn check_segment_graph<'a>(
    start: Option<&str>,
    refs: impl Iterator<Item = &'a str>,
    lookup: &dyn Fn(&str) -> Option<Vec<String>>,
) -> Result<(), ValidationError> {
    let mut stack: Vec<(String, Vec<String>)> = Vec::new();
    let first: Vec<String> = refs.map(str::to_owned).collect();
    for r in &first {
        if lookup(r).is_none() && Some(r.as_str()) != start {
            return Err(ValidationError::new(
                "rules",
                format!("unknown segment {r:?}"),
            ));
        }
    }
    stack.push((start.unwrap_or("").to_owned(), first));
    let mut seen = std::collections::HashSet::new();
    while let Some((from, refs)) = stack.pop() {
        for r in refs {
            if Some(r.as_str()) == start {
                return Err(ValidationError::new(
                    "rules",
                    format!("segment reference cycle: {r:?} is reached again through {from:?}"),
                ));
            }
            if seen.insert(r.clone()) {
                let next = lookup(&r).unwrap_or_default();
                stack.push((r, next));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_round_trips() {
        let text = r#"{"key":"banner","on":true,"variants":{"a":"hello","b":"bye"},
            "off_variant":"b","fallthrough":{"variant":"a"},"description":"top"}"#;
        let flag: Flag = serde_json::from_str(text).unwrap();
        flag.check_structure().unwrap();
        assert_eq!(flag.variants["a"], FlagValue::String("hello".into()));
        let back: Flag = serde_json::from_str(&serde_json::to_string(&flag).unwrap()).unwrap();
        assert_eq!(back, flag);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let text = r#"{"key":"k","on":true,"variants":{"a":1},"off_variant":"a",
            "fallthrough":{"variant":"a"},"colour":"red"}"#;
        let err = serde_json::from_str::<Flag>(text).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
