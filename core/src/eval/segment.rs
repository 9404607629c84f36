//! Segments: explicit targeting keys, then rules, compiled like a flag's clauses.

use std::sync::Arc;

use super::clause::{CompiledClause, StrSet, all_hold, compile_clauses};
use super::regex::Budget;
use super::{Context, ErrorCode, MAX_SEGMENT_DEPTH, SegmentSource};
use crate::model::{Segment, ValidationError};

/// A segment compiled for evaluation.
#[derive(Debug)]
pub struct CompiledSegment {
    segment: Segment,
    included: StrSet,
    excluded: StrSet,
    /// Shared between versions whose rules are the same.
    rules: Arc<[Vec<CompiledClause>]>,
}

impl CompiledSegment {
    /// Checks and compiles a segment (all but its references to other segments).
    pub fn new(segment: Segment) -> Result<CompiledSegment, ValidationError> {
        CompiledSegment::after(segment, None)
    }

    /// Checks and compiles a segment that replaces `previous`, sharing its compiled rules if
    /// they did not change (adding keys to a segment compiles nothing again).
    pub fn after(
        segment: Segment,
        previous: Option<&CompiledSegment>,
    ) -> Result<CompiledSegment, ValidationError> {
        segment.check_structure()?;
        let rules = match previous.filter(|p| p.segment.rules == segment.rules) {
            Some(p) => p.rules.clone(),
            None => {
                let mut rules = Vec::with_capacity(segment.rules.len());
                let mut budget = Budget::new();
                for (i, rule) in segment.rules.iter().enumerate() {
                    rules.push(compile_clauses(
                        &format!("rules[{i}].clauses"),
                        &rule.clauses,
                        &mut budget,
                    )?);
                }
                rules.into()
            }
        };
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

    /// Records the environment version the segment was committed at.
    pub(crate) fn set_version(&mut self, version: u64) {
        self.segment.version = version;
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
        for rule in self.rules.iter() {
            if all_hold(rule, ctx, segments, depth)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
