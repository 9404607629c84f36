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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

use regex_lite::Regex;
use serde::Serialize;
use serde_json::Value as Json;

use crate::model::{
    Clause, Flag, FlagValue, Operator, Rollout, Segment, Serve, TOTAL_WEIGHT, ValidationError,
};

/// Longest regular expression accepted, in characters.
pub const MAX_REGEX_LEN: usize = 1024;
/// Most memory one compiled regular expression may use.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
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
    fn get_path(&self, path: &Path) -> Option<&Json> {
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
struct Path(Box<[String]>);

impl Path {
    fn new(dotted: &str) -> Path {
        Path(dotted.split('.').map(str::to_owned).collect())
    }

    fn is_targeting_key(&self) -> bool {
        self.0.len() == 1 && self.0[0] == "key"
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

    /// This result as seen by a typed getter: a value of another type becomes `TYPE_MISMATCH`.
    pub fn typed(self, want: crate::model::ValueType) -> Evaluation<'a> {
        match self.value {
            Some(v) if v.value_type() != want => {
                Evaluation::error(ErrorCode::TypeMismatch, self.rule)
            }
            _ => self,
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
    rules: Vec<CompiledRule>,
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

#[derive(Debug)]
struct CompiledRollout {
    bucket_by: Path,
    /// The hash state after `salt ‖ ":"` (the salt defaults to the flag key, known at compile
    /// time): only the attribute's bytes are hashed per evaluation.
    salted: u64,
    /// (exclusive upper bound of the bucket range, variant index), in order.
    ranges: Vec<(u32, usize)>,
}

#[derive(Debug)]
struct CompiledClause {
    attribute: Path,
    negate: bool,
    op: Op,
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Lt,
    Lte,
    Gt,
    Gte,
    Eq,
}

impl Cmp {
    fn holds(self, ord: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Cmp::Lt => ord == Less,
            Cmp::Lte => ord != Greater,
            Cmp::Gt => ord == Greater,
            Cmp::Gte => ord != Less,
            Cmp::Eq => ord == Equal,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum StrOp {
    StartsWith,
    EndsWith,
    Contains,
}

/// A set of strings: a short list is scanned, a long one hashed.
#[derive(Debug)]
enum StrSet {
    Few(Vec<String>),
    Many(HashSet<String>),
}

impl StrSet {
    fn new(items: Vec<String>) -> StrSet {
        if items.len() <= 8 {
            StrSet::Few(items)
        } else {
            StrSet::Many(items.into_iter().collect())
        }
    }

    fn contains(&self, s: &str) -> bool {
        match self {
            StrSet::Few(v) => v.iter().any(|x| x == s),
            StrSet::Many(h) => h.contains(s),
        }
    }
}

#[derive(Debug)]
enum Op {
    In {
        strings: StrSet,
        numbers: Vec<f64>,
        bools: Vec<bool>,
    },
    Str(StrOp, Vec<String>),
    Matches(Vec<Regex>),
    Number(Cmp, Vec<f64>),
    Semver(Cmp, Vec<semver::Version>),
    Time(Cmp, Vec<i128>),
    Segment(Vec<String>),
}

fn compile_clause(field: &str, clause: &Clause) -> Result<CompiledClause, ValidationError> {
    let err = |i: usize, msg: String| ValidationError::new(format!("{field}.values[{i}]"), msg);
    if clause.values.len() > crate::model::MAX_VALUES {
        return Err(ValidationError::new(
            format!("{field}.values"),
            format!("at most {} values are allowed", crate::model::MAX_VALUES),
        ));
    }
    if clause.op != Operator::InSegment && clause.attribute.is_empty() {
        return Err(ValidationError::new(
            format!("{field}.attribute"),
            "must name a context attribute",
        ));
    }
    let strings = || -> Result<Vec<String>, ValidationError> {
        clause
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| err(i, "must be a string".into()))
            })
            .collect()
    };
    let numbers = || -> Result<Vec<f64>, ValidationError> {
        clause
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_f64().ok_or_else(|| err(i, "must be a number".into())))
            .collect()
    };
    let op = match clause.op {
        Operator::In => {
            let (mut strings, mut numbers, mut bools) = (Vec::new(), Vec::new(), Vec::new());
            for (i, v) in clause.values.iter().enumerate() {
                match v {
                    Json::String(s) => strings.push(s.clone()),
                    Json::Number(n) => numbers.push(n.as_f64().unwrap_or(f64::NAN)),
                    Json::Bool(b) => bools.push(*b),
                    _ => return Err(err(i, "must be a string, number or boolean".into())),
                }
            }
            Op::In {
                strings: StrSet::new(strings),
                numbers,
                bools,
            }
        }
        Operator::StartsWith => Op::Str(StrOp::StartsWith, strings()?),
        Operator::EndsWith => Op::Str(StrOp::EndsWith, strings()?),
        Operator::Contains => Op::Str(StrOp::Contains, strings()?),
        Operator::Matches => {
            let mut regexes = Vec::new();
            for (i, pattern) in strings()?.into_iter().enumerate() {
                if pattern.chars().count() > MAX_REGEX_LEN {
                    return Err(err(
                        i,
                        format!("regular expression longer than {MAX_REGEX_LEN} characters"),
                    ));
                }
                let re = regex_lite::RegexBuilder::new(&pattern)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| err(i, format!("invalid regular expression: {e}")))?;
                regexes.push(re);
            }
            Op::Matches(regexes)
        }
        Operator::Lt => Op::Number(Cmp::Lt, numbers()?),
        Operator::Lte => Op::Number(Cmp::Lte, numbers()?),
        Operator::Gt => Op::Number(Cmp::Gt, numbers()?),
        Operator::Gte => Op::Number(Cmp::Gte, numbers()?),
        Operator::SemverEq | Operator::SemverLt | Operator::SemverGt => {
            let cmp = match clause.op {
                Operator::SemverEq => Cmp::Eq,
                Operator::SemverLt => Cmp::Lt,
                _ => Cmp::Gt,
            };
            let mut versions = Vec::new();
            for (i, s) in strings()?.iter().enumerate() {
                versions.push(
                    parse_semver(s)
                        .ok_or_else(|| err(i, format!("{s:?} is not a semantic version")))?,
                );
            }
            Op::Semver(cmp, versions)
        }
        Operator::Before | Operator::After => {
            let cmp = if clause.op == Operator::Before {
                Cmp::Lt
            } else {
                Cmp::Gt
            };
            let mut times = Vec::new();
            for (i, v) in clause.values.iter().enumerate() {
                times.push(time_millis(v).ok_or_else(|| {
                    err(
                        i,
                        "must be an RFC 3339 time (\"2026-01-31T12:00:00Z\") or Unix milliseconds"
                            .into(),
                    )
                })?);
            }
            Op::Time(cmp, times)
        }
        Operator::InSegment => Op::Segment(strings()?),
    };
    Ok(CompiledClause {
        attribute: Path::new(&clause.attribute),
        negate: clause.negate,
        op,
    })
}

fn compile_clauses(
    field: &str,
    clauses: &[Clause],
) -> Result<Vec<CompiledClause>, ValidationError> {
    if clauses.len() > crate::model::MAX_CLAUSES {
        return Err(ValidationError::new(
            field,
            format!("at most {} clauses are allowed", crate::model::MAX_CLAUSES),
        ));
    }
    clauses
        .iter()
        .enumerate()
        .map(|(i, c)| compile_clause(&format!("{field}[{i}]"), c))
        .collect()
}

/// Parses `1.2.3`, `v1.2.3`, `1.2.3-beta.1`, and the shorthands `1` and `1.2` (missing parts are 0).
fn parse_semver(s: &str) -> Option<semver::Version> {
    let s = s.strip_prefix('v').unwrap_or(s);
    if let Ok(v) = semver::Version::parse(s) {
        return Some(v);
    }
    let mut parts = s.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = match parts.next() {
        Some(p) => p.parse().ok()?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(semver::Version::new(major, minor, 0))
}

/// Unix milliseconds from RFC 3339 text or a number of milliseconds.
fn time_millis(v: &Json) -> Option<i128> {
    match v {
        Json::Number(n) => n.as_f64().filter(|f| f.is_finite()).map(|f| f as i128),
        Json::String(s) => {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .ok()
                .map(|t| t.unix_timestamp_nanos() / 1_000_000)
        }
        _ => None,
    }
}

impl CompiledFlag {
    /// Checks and compiles a flag. Errors name the field.
    pub fn new(flag: Flag) -> Result<CompiledFlag, ValidationError> {
        flag.check_structure()?;
        CompiledFlag::compile(flag)
    }

    fn compile(flag: Flag) -> Result<CompiledFlag, ValidationError> {
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
        let mut rules = Vec::with_capacity(flag.rules.len());
        for (i, rule) in flag.rules.iter().enumerate() {
            rules.push(CompiledRule {
                clauses: compile_clauses(&format!("rules[{i}].clauses"), &rule.clauses)?,
                serve: serve(&format!("rules[{i}].serve"), &rule.serve)?,
            });
        }
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

fn compile_rollout(
    field: &str,
    r: &Rollout,
    flag_key: &str,
    index: &dyn Fn(&str, &str) -> Result<usize, ValidationError>,
) -> Result<CompiledRollout, ValidationError> {
    let mut ranges = Vec::with_capacity(r.variants.len());
    let mut upper: u32 = 0;
    for (i, w) in r.variants.iter().enumerate() {
        upper = upper.saturating_add(w.weight);
        ranges.push((
            upper,
            index(&format!("{field}.variants[{i}].variant"), &w.variant)?,
        ));
    }
    if upper != TOTAL_WEIGHT {
        return Err(ValidationError::new(
            format!("{field}.variants"),
            format!("weights sum to {upper}, not {TOTAL_WEIGHT}"),
        ));
    }
    let salt = r.salt.as_deref().unwrap_or(flag_key);
    Ok(CompiledRollout {
        bucket_by: Path::new(&r.bucket_by),
        salted: fnv1a(fnv1a(FNV_OFFSET, salt.as_bytes()), b":"),
        ranges,
    })
}

impl CompiledRollout {
    fn bucket_for(&self, ctx: &Context) -> Result<u32, ErrorCode> {
        let missing = || {
            if self.bucket_by.is_targeting_key() {
                ErrorCode::TargetingKeyMissing
            } else {
                ErrorCode::General
            }
        };
        match ctx.get_path(&self.bucket_by) {
            Some(Json::String(s)) => Ok(finish(fnv1a(self.salted, s.as_bytes()))),
            Some(Json::Number(n)) => {
                let mut buf = [0u8; 20];
                let digits = if let Some(i) = n.as_i64() {
                    format_int(i.unsigned_abs(), i < 0, &mut buf)
                } else if let Some(u) = n.as_u64() {
                    format_int(u, false, &mut buf)
                } else {
                    return Err(missing());
                };
                Ok(finish(fnv1a(self.salted, digits.as_bytes())))
            }
            _ => Err(missing()),
        }
    }
}

/// Writes an integer in decimal into `buf` without allocating; returns the text.
fn format_int(mut n: u64, negative: bool, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if negative && i > 0 {
        i -= 1;
        buf[i] = b'-';
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("")
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Continues a 64-bit FNV-1a hash over `bytes`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// MurmurHash3's fmix64 (FNV-1a alone mixes its last bytes poorly into the low digits), then
/// the bucket.
fn finish(mut h: u64) -> u32 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h % u64::from(TOTAL_WEIGHT)) as u32
}

/// The rollout bucket (0 to 99 999) of `value` under `salt`. See the module docs.
pub fn bucket(salt: &str, value: &str) -> u32 {
    finish(fnv1a(
        fnv1a(fnv1a(FNV_OFFSET, salt.as_bytes()), b":"),
        value.as_bytes(),
    ))
}

fn all_hold(
    clauses: &[CompiledClause],
    ctx: &Context,
    segments: &dyn SegmentSource,
    depth: usize,
) -> Result<bool, ErrorCode> {
    for clause in clauses {
        if !clause_holds(clause, ctx, segments, depth)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn clause_holds(
    clause: &CompiledClause,
    ctx: &Context,
    segments: &dyn SegmentSource,
    depth: usize,
) -> Result<bool, ErrorCode> {
    if let Op::Segment(keys) = &clause.op {
        let mut member = false;
        for key in keys {
            let segment = segments.segment(key).ok_or(ErrorCode::General)?;
            if segment.contains(ctx, segments, depth + 1)? {
                member = true;
                break;
            }
        }
        return Ok(member != clause.negate);
    }
    // A missing attribute never matches, negated or not.
    let Some(value) = ctx.get_path(&clause.attribute) else {
        return Ok(false);
    };
    let matched = match value {
        // An array attribute matches if any element does.
        Json::Array(items) => items.iter().any(|v| op_matches(&clause.op, v)),
        v => op_matches(&clause.op, v),
    };
    Ok(matched != clause.negate)
}

fn op_matches(op: &Op, v: &Json) -> bool {
    match op {
        Op::In {
            strings,
            numbers,
            bools,
        } => match v {
            Json::String(s) => strings.contains(s),
            Json::Number(n) => n.as_f64().is_some_and(|n| numbers.contains(&n)),
            Json::Bool(b) => bools.contains(b),
            _ => false,
        },
        Op::Str(kind, operands) => v.as_str().is_some_and(|s| {
            operands.iter().any(|o| match kind {
                StrOp::StartsWith => s.starts_with(o.as_str()),
                StrOp::EndsWith => s.ends_with(o.as_str()),
                StrOp::Contains => s.contains(o.as_str()),
            })
        }),
        Op::Matches(regexes) => v
            .as_str()
            .is_some_and(|s| regexes.iter().any(|r| r.is_match(s))),
        Op::Number(cmp, operands) => v.as_f64().is_some_and(|n| {
            operands
                .iter()
                .any(|o| n.partial_cmp(o).is_some_and(|ord| cmp.holds(ord)))
        }),
        Op::Semver(cmp, operands) => v
            .as_str()
            .and_then(parse_semver)
            .is_some_and(|ver| operands.iter().any(|o| cmp.holds(ver.cmp_precedence(o)))),
        Op::Time(cmp, operands) => {
            time_millis(v).is_some_and(|t| operands.iter().any(|o| cmp.holds(t.cmp(o))))
        }
        Op::Segment(_) => false,
    }
}

/// A segment compiled for evaluation.
#[derive(Debug)]
pub struct CompiledSegment {
    segment: Segment,
    included: StrSet,
    excluded: StrSet,
    rules: Vec<Vec<CompiledClause>>,
}

impl CompiledSegment {
    /// Checks and compiles a segment (all but its references to other segments).
    pub fn new(segment: Segment) -> Result<CompiledSegment, ValidationError> {
        segment.check_structure()?;
        CompiledSegment::compile(segment)
    }

    fn compile(segment: Segment) -> Result<CompiledSegment, ValidationError> {
        let mut rules = Vec::with_capacity(segment.rules.len());
        for (i, rule) in segment.rules.iter().enumerate() {
            rules.push(compile_clauses(
                &format!("rules[{i}].clauses"),
                &rule.clauses,
            )?);
        }
        Ok(CompiledSegment {
            included: StrSet::new(segment.included.clone()),
            excluded: StrSet::new(segment.excluded.clone()),
            rules,
            segment,
        })
    }

    /// The segment as written.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    /// Whether `ctx` is in the segment: included keys first, then excluded keys, then rules.
    pub fn contains(
        &self,
        ctx: &Context,
        segments: &dyn SegmentSource,
        depth: usize,
    ) -> Result<bool, ErrorCode> {
        if depth > MAX_SEGMENT_DEPTH {
            return Err(ErrorCode::General);
        }
        if let Some(key) = ctx.key() {
            if self.included.contains(key) {
                return Ok(true);
            }
            if self.excluded.contains(key) {
                return Ok(false);
            }
        }
        for rule in &self.rules {
            if all_hold(rule, ctx, segments, depth)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests;
