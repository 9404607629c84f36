//! Evaluation: which variant a flag serves to a context, and why.
//!
//! A [`Flag`] is compiled once per change into a [`CompiledFlag`]: variant names become indexes,
//! regular expressions are compiled (size-limited), versions, times and numbers are parsed, and
//! long operand lists become hash sets. Evaluating then allocates nothing: it borrows from the
//! compiled flag and the [`Context`]. The server (for evaluated mode and `vane eval`), the Rust
//! client (rules mode) and the mobile SDKs all evaluate here, and the shared vectors in
//! `core/testdata/evaluation/` pin the results.
//!
//! Rollout bucketing is specified so other implementations can reproduce it bit for bit:
//! `bucket = fmix64(fnv1a64(salt ‖ ":" ‖ value)) mod 100000`, where fnv1a64 is 64-bit FNV-1a
//! over the UTF-8 bytes, fmix64 is MurmurHash3's 64-bit finaliser, `salt` is the rollout's salt
//! or else the flag key, and `value` is the bucketing attribute (a string, or an integer in
//! decimal). Variants own consecutive ranges of buckets in their listed order.

mod clause;
mod context;
mod regex;
mod rollout;
mod segment;

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

use serde::Serialize;

use crate::model::{Flag, FlagValue, Serve, ValidationError};

use clause::{CompiledClause, all_hold, compile_clauses};
pub use context::{Context, ContextError};
use regex::Budget;
pub use regex::{MAX_REGEX_LEN, REGEX_BUDGET, REGEX_SIZE_LIMIT};
pub use rollout::bucket;
use rollout::{CompiledRollout, compile_rollout};
pub use segment::CompiledSegment;

/// How deep segments may refer to segments (validation forbids cycles; this bounds evaluation).
pub const MAX_SEGMENT_DEPTH: usize = 16;

/// Why a value was served (OpenFeature's resolution reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum Reason {
    /// The flag is on, has no rules, and serves one variant to everyone.
    Static,
    /// A targeting rule matched.
    TargetingMatch,
    /// A percentage rollout chose the variant.
    Split,
    /// No rule matched and the fallthrough variant was served, or the caller's default was.
    Default,
    /// The flag is off.
    Disabled,
    /// Evaluation failed; see the error code. The caller's default is served.
    Error,
    /// The value came from the client's offline cache, not from a live connection.
    Cached,
}

/// Why an evaluation fell back to the caller's default (OpenFeature's error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum ErrorCode {
    /// No flag with that key.
    FlagNotFound,
    /// The flag's type is not the one asked for.
    TypeMismatch,
    /// A context or value could not be parsed.
    ParseError,
    /// A rollout buckets by the targeting key and the context has none.
    TargetingKeyMissing,
    /// The client holds no flags yet.
    ProviderNotReady,
    /// Anything else (a rollout attribute missing, a segment chain too deep).
    General,
}

impl ErrorCode {
    /// The OpenFeature name, e.g. `TARGETING_KEY_MISSING`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::TypeMismatch => "TYPE_MISMATCH",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::TargetingKeyMissing => "TARGETING_KEY_MISSING",
            ErrorCode::ProviderNotReady => "PROVIDER_NOT_READY",
            ErrorCode::General => "GENERAL",
        }
    }

    /// Parses an OpenFeature name; unknown names are `General`.
    pub fn parse(s: &str) -> ErrorCode {
        [
            ErrorCode::FlagNotFound,
            ErrorCode::TypeMismatch,
            ErrorCode::ParseError,
            ErrorCode::TargetingKeyMissing,
            ErrorCode::ProviderNotReady,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
        .unwrap_or(ErrorCode::General)
    }
}

/// Where evaluation finds segments by key.
pub trait SegmentSource {
    /// The compiled segment with this key.
    fn segment(&self, key: &str) -> Option<&CompiledSegment>;
}

/// No segments at all.
#[derive(Debug, Clone, Copy)]
pub struct NoSegments;

impl SegmentSource for NoSegments {
    fn segment(&self, _: &str) -> Option<&CompiledSegment> {
        None
    }
}

impl<S: BuildHasher> SegmentSource for HashMap<String, Arc<CompiledSegment>, S> {
    fn segment(&self, key: &str) -> Option<&CompiledSegment> {
        self.get(key).map(|s| &**s)
    }
}

impl SegmentSource for BTreeMap<String, Arc<CompiledSegment>> {
    fn segment(&self, key: &str) -> Option<&CompiledSegment> {
        self.get(key).map(|s| &**s)
    }
}

/// The outcome of evaluating one flag for one context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation<'a> {
    /// The value served; `None` when evaluation failed (serve the caller's default).
    pub value: Option<&'a FlagValue>,
    /// The variant's name.
    pub variant: Option<&'a str>,
    /// Why.
    pub reason: Reason,
    /// What went wrong, with reason `Error`.
    pub error: Option<ErrorCode>,
    /// The index of the rule that decided, if one did.
    pub rule: Option<usize>,
    /// The rollout bucket (0 to 99 999), if a rollout decided.
    pub bucket: Option<u32>,
}

impl<'a> Evaluation<'a> {
    /// The result for a flag that does not exist.
    pub fn not_found() -> Evaluation<'static> {
        Evaluation::error(ErrorCode::FlagNotFound, None)
    }

    /// The result for a flag that cannot be evaluated: the caller's default, with `code`.
    pub fn failed(code: ErrorCode) -> Evaluation<'static> {
        Evaluation::error(code, None)
    }

    /// This result as seen by a typed getter: a value of another type becomes `TYPE_MISMATCH`.
    pub fn typed(self, want: crate::model::ValueType) -> Evaluation<'a> {
        match self.value {
            Some(v) if v.value_type() != want => {
                Evaluation::error(ErrorCode::TypeMismatch, self.rule)
            }
            _ => self,
        }
    }

    /// Why this result, in a sentence for people ("why does this user get B?"): the rule that
    /// matched, the rollout bucket, or why neither decided.
    pub fn explanation(&self) -> String {
        match (self.error, self.rule, self.bucket) {
            (Some(code), _, _) => format!(
                "evaluation failed ({}); the caller's default is served",
                code.as_str()
            ),
            _ if self.reason == Reason::Disabled => {
                "the flag is off, so it serves its off variant".to_owned()
            }
            (None, Some(i), Some(b)) => {
                format!("rule {i} matched, and its rollout put the context in bucket {b} of 100000")
            }
            (None, Some(i), None) => format!("rule {i} matched"),
            (None, None, Some(b)) => format!(
                "no rule matched; the fallthrough rollout put the context in bucket {b} of 100000"
            ),
            _ if self.reason == Reason::Static => {
                "the flag has no rules: everyone gets the fallthrough variant".to_owned()
            }
            _ => "no rule matched, so the fallthrough variant is served".to_owned(),
        }
    }

    fn error(code: ErrorCode, rule: Option<usize>) -> Evaluation<'static> {
        Evaluation {
            value: None,
            variant: None,
            reason: Reason::Error,
            error: Some(code),
            rule,
            bucket: None,
        }
    }
}

/// A flag compiled for evaluation. Built once per change; evaluating borrows from it.
#[derive(Debug)]
pub struct CompiledFlag {
    flag: Flag,
    variants: Vec<(String, FlagValue)>,
    off: usize,
    /// Shared between versions of the flag whose rules are the same (see [`CompiledFlag::after`]).
    rules: Arc<[CompiledRule]>,
    fallthrough: CompiledServe,
}

#[derive(Debug)]
struct CompiledRule {
    clauses: Vec<CompiledClause>,
    serve: CompiledServe,
}

#[derive(Debug)]
enum CompiledServe {
    Variant(usize),
    Rollout(CompiledRollout),
}

impl CompiledFlag {
    /// Checks and compiles a flag. Errors name the field.
    pub fn new(flag: Flag) -> Result<CompiledFlag, ValidationError> {
        CompiledFlag::after(flag, None)
    }

    /// Checks and compiles a flag that replaces `previous`. Rules it left as they were (a
    /// toggle, a new description, a changed fallthrough) are shared with `previous` rather
    /// than compiled again, so versions of a flag with costly rules share one copy of them.
    pub fn after(
        flag: Flag,
        previous: Option<&CompiledFlag>,
    ) -> Result<CompiledFlag, ValidationError> {
        flag.check_structure()?;
        let reusable = previous
            .filter(|p| {
                p.flag.key == flag.key
                    && p.flag.rules == flag.rules
                    && p.flag.variants.keys().eq(flag.variants.keys())
            })
            .map(|p| p.rules.clone());
        CompiledFlag::compile(flag, reusable)
    }

    fn compile(
        flag: Flag,
        reusable: Option<Arc<[CompiledRule]>>,
    ) -> Result<CompiledFlag, ValidationError> {
        let variants: Vec<(String, FlagValue)> = flag
            .variants
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let index = |field: &str, name: &str| {
            variants
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| ValidationError::new(field, format!("unknown variant {name:?}")))
        };
        let serve = |field: &str, s: &Serve| -> Result<CompiledServe, ValidationError> {
            Ok(match s {
                Serve::Variant(v) => CompiledServe::Variant(index(&format!("{field}.variant"), v)?),
                Serve::Rollout(r) => CompiledServe::Rollout(compile_rollout(
                    &format!("{field}.rollout"),
                    r,
                    &flag.key,
                    &index,
                )?),
            })
        };
        let off = index("off_variant", &flag.off_variant)?;
        let rules = match reusable {
            Some(rules) => rules,
            None => {
                let mut rules = Vec::with_capacity(flag.rules.len());
                let mut budget = Budget::new();
                for (i, rule) in flag.rules.iter().enumerate() {
                    rules.push(CompiledRule {
                        clauses: compile_clauses(
                            &format!("rules[{i}].clauses"),
                            &rule.clauses,
                            &mut budget,
                        )?,
                        serve: serve(&format!("rules[{i}].serve"), &rule.serve)?,
                    });
                }
                rules.into()
            }
        };
        let fallthrough = serve("fallthrough", &flag.fallthrough)?;
        Ok(CompiledFlag {
            variants,
            off,
            rules,
            fallthrough,
            flag,
        })
    }

    /// The flag as written.
    pub fn flag(&self) -> &Flag {
        &self.flag
    }

    /// Whether this flag shares its compiled rules with `other` (no second copy in memory).
    pub fn shares_rules_with(&self, other: &CompiledFlag) -> bool {
        Arc::ptr_eq(&self.rules, &other.rules)
    }

    /// Records the environment version the flag was committed at (it does not change how it
    /// evaluates).
    pub(crate) fn set_version(&mut self, version: u64) {
        self.flag.version = version;
    }

    /// Evaluates the flag for `ctx`. Allocation-free.
    pub fn evaluate<'a>(&'a self, ctx: &Context, segments: &dyn SegmentSource) -> Evaluation<'a> {
        if !self.flag.on {
            return self.served(self.off, Reason::Disabled, None, None);
        }
        for (i, rule) in self.rules.iter().enumerate() {
            match all_hold(&rule.clauses, ctx, segments, 0) {
                Ok(true) => return self.serve(&rule.serve, ctx, Some(i), Reason::TargetingMatch),
                Ok(false) => {}
                Err(code) => return Evaluation::error(code, Some(i)),
            }
        }
        let reason = if self.rules.is_empty() {
            Reason::Static
        } else {
            Reason::Default
        };
        self.serve(&self.fallthrough, ctx, None, reason)
    }

    fn serve<'a>(
        &'a self,
        serve: &CompiledServe,
        ctx: &Context,
        rule: Option<usize>,
        reason: Reason,
    ) -> Evaluation<'a> {
        match serve {
            CompiledServe::Variant(i) => self.served(*i, reason, rule, None),
            CompiledServe::Rollout(r) => match r.bucket_for(ctx) {
                Ok(bucket) => {
                    let variant = r
                        .ranges
                        .iter()
                        .find(|(upper, _)| bucket < *upper)
                        .map_or(0, |(_, v)| *v);
                    self.served(variant, Reason::Split, rule, Some(bucket))
                }
                Err(code) => Evaluation::error(code, rule),
            },
        }
    }

    fn served(
        &self,
        variant: usize,
        reason: Reason,
        rule: Option<usize>,
        bucket: Option<u32>,
    ) -> Evaluation<'_> {
        let (name, value) = &self.variants[variant];
        Evaluation {
            value: Some(value),
            variant: Some(name),
            reason,
            error: None,
            rule,
            bucket,
        }
    }
}

#[cfg(test)]
mod tests;
