//! Clauses: each operator compiled once (operand lists hashed, regular expressions built under
//! a size limit, versions and times parsed), then matched against a context without allocating.

use std::collections::HashSet;

use regex_lite::Regex;
use serde_json::Value as Json;

use super::context::{Context, Path};
use super::regex::{self, Budget};
use super::{ErrorCode, SegmentSource};
use crate::model::{Clause, Operator, ValidationError};

#[derive(Debug)]
pub(super) struct CompiledClause {
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
pub(super) enum StrSet {
    Few(Vec<String>),
    Many(HashSet<String>),
}

impl StrSet {
    pub(super) fn new(items: Vec<String>) -> StrSet {
        if items.len() <= 8 {
            StrSet::Few(items)
        } else {
            StrSet::Many(items.into_iter().collect())
        }
    }

    pub(super) fn contains(&self, s: &str) -> bool {
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

fn compile_clause(
    field: &str,
    clause: &Clause,
    budget: &mut Budget,
) -> Result<CompiledClause, ValidationError> {
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
                regexes.push(regex::compile(&pattern, budget).map_err(|e| err(i, e))?);
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

pub(super) fn compile_clauses(
    field: &str,
    clauses: &[Clause],
    budget: &mut Budget,
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
        .map(|(i, c)| compile_clause(&format!("{field}[{i}]"), c, budget))
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

pub(super) fn all_hold(
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
