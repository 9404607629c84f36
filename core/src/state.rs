//! The client's copy of an environment: in rules mode the compiled flags and segments it
//! evaluates itself, in evaluated mode the values the server computed for its context; and the
//! selector they are at. Applying a snapshot or delta reports which flag keys changed (including
//! flags whose result may change because a segment they use changed): that is what listeners get.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use vane_proto::v1 as pb;

use crate::convert::{flag_value, reason_from_wire};
use crate::eval::{CompiledFlag, CompiledSegment, Context, ErrorCode, Evaluation, Reason};
use crate::model::{Flag, FlagValue, Segment};
use crate::protocol::Selector;

/// A flag as the server evaluated it for this client's context (evaluated mode).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvaluatedValue {
    /// The value; `None` if evaluation failed (serve the caller's default).
    pub value: Option<FlagValue>,
    /// The variant's name (empty when evaluation failed).
    pub variant: String,
    /// Why.
    pub reason: Reason,
    /// What went wrong, with reason `Error`.
    pub error: Option<ErrorCode>,
}

impl EvaluatedValue {
    fn from_wire(v: &pb::EvaluatedFlag) -> Result<EvaluatedValue, String> {
        let value = match &v.value {
            Some(_) => Some(
                flag_value(v.value.as_ref()).map_err(|e| format!("value of {:?}: {e}", v.key))?,
            ),
            None => None,
        };
        Ok(EvaluatedValue {
            value,
            variant: v.variant.clone(),
            reason: reason_from_wire(v.reason),
            error: (!v.error_code.is_empty()).then(|| ErrorCode::parse(&v.error_code)),
        })
    }

    /// This value as an evaluation result.
    pub fn as_evaluation(&self) -> Evaluation<'_> {
        Evaluation {
            value: self.value.as_ref(),
            variant: (!self.variant.is_empty()).then_some(self.variant.as_str()),
            reason: self.reason,
            error: self.error,
            rule: None,
            bucket: None,
        }
    }
}

/// The flags a client holds, at a selector. Cheap to clone: entries are shared.
#[derive(Debug, Clone, Default)]
pub struct FlagSet {
    selector: Option<Selector>,
    flags: HashMap<String, Arc<CompiledFlag>>,
    segments: HashMap<String, Arc<CompiledSegment>>,
    values: HashMap<String, Arc<EvaluatedValue>>,
    /// Flags whose definition this client refused to compile (over the limits every Vane
    /// build enforces; a server that sent one is not a Vane server of this version), and why.
    /// They evaluate to the caller's default with `PARSE_ERROR`.
    refused: HashMap<String, String>,
    /// Loaded from the offline cache and not yet confirmed by a live connection: evaluations
    /// report reason `CACHED`.
    cached: bool,
}

impl FlagSet {
    /// An evaluated-mode set at `selector` holding `values` (for example, loaded from a cache).
    pub fn from_values(
        selector: Option<Selector>,
        values: impl IntoIterator<Item = (String, EvaluatedValue)>,
    ) -> FlagSet {
        FlagSet {
            selector,
            values: values.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            ..FlagSet::default()
        }
    }

    /// The definitions as stored in the offline cache (rules mode).
    #[cfg(feature = "rules")]
    pub(crate) fn cached_definitions(&self) -> (Vec<Flag>, Vec<Segment>) {
        (
            self.flags.values().map(|f| f.flag().clone()).collect(),
            self.segments
                .values()
                .map(|s| s.segment().clone())
                .collect(),
        )
    }

    /// The values as stored in the offline cache (evaluated mode).
    pub(crate) fn cached_values(&self) -> BTreeMap<String, EvaluatedValue> {
        self.values
            .iter()
            .map(|(k, v)| (k.clone(), (**v).clone()))
            .collect()
    }

    /// A set loaded from the offline cache: served with reason `CACHED` until confirmed live.
    pub(crate) fn from_cached(
        selector: Option<Selector>,
        flags: Vec<Flag>,
        segments: Vec<Segment>,
        values: BTreeMap<String, EvaluatedValue>,
    ) -> Result<FlagSet, String> {
        let mut set = FlagSet {
            selector,
            cached: true,
            ..FlagSet::default()
        };
        #[cfg(feature = "rules")]
        {
            for seg in segments {
                let key = seg.key.clone();
                let seg = CompiledSegment::new(seg).map_err(|e| format!("segment {key:?}: {e}"))?;
                set.segments.insert(key, Arc::new(seg));
            }
            for flag in flags {
                let key = flag.key.clone();
                let flag = CompiledFlag::new(flag).map_err(|e| format!("flag {key:?}: {e}"))?;
                set.flags.insert(key, Arc::new(flag));
            }
        }
        #[cfg(not(feature = "rules"))]
        if !flags.is_empty() || !segments.is_empty() {
            return Err(
                "the cache holds flag definitions, and this build evaluates no rules".into(),
            );
        }
        set.values = values.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        Ok(set)
    }

    /// Where this set stands; `None` before the first snapshot.
    pub fn selector(&self) -> Option<Selector> {
        self.selector
    }

    /// Evaluates `key` for `ctx`: locally in rules mode; in evaluated mode the server's answer
    /// for the session's context is returned and `ctx` is not used.
    pub fn evaluate(&self, key: &str, ctx: &Context) -> Evaluation<'_> {
        let mut e = if let Some(e) = self.evaluate_rules(key, ctx) {
            e
        } else if let Some(value) = self.values.get(key) {
            value.as_evaluation()
        } else if self.refused.contains_key(key) {
            return Evaluation::failed(ErrorCode::ParseError);
        } else {
            return Evaluation::not_found();
        };
        if self.cached && e.value.is_some() {
            e.reason = Reason::Cached;
        }
        e
    }

    /// Rules mode: `key`'s definition evaluated for `ctx`, if this set holds it.
    #[cfg(feature = "rules")]
    fn evaluate_rules(&self, key: &str, ctx: &Context) -> Option<Evaluation<'_>> {
        self.flags.get(key).map(|f| f.evaluate(ctx, &self.segments))
    }

    /// A build without rules mode holds no definitions.
    #[cfg(not(feature = "rules"))]
    fn evaluate_rules(&self, _key: &str, _ctx: &Context) -> Option<Evaluation<'_>> {
        None
    }

    /// Whether these flags came from the offline cache and no live connection confirmed them yet.
    pub fn is_cached(&self) -> bool {
        self.cached
    }

    /// A live connection confirmed the cached state.
    pub(crate) fn confirm_live(&mut self) {
        self.cached = false;
    }

    /// Why the definition of `key` was refused, if it was (see [`FlagSet::evaluate`]).
    pub fn refused(&self, key: &str) -> Option<&str> {
        self.refused.get(key).map(String::as_str)
    }

    /// The flag definition with this key (rules mode).
    pub fn get(&self, key: &str) -> Option<&Flag> {
        self.flags.get(key).map(|f| f.flag())
    }

    /// The evaluated value with this key (evaluated mode).
    pub fn value(&self, key: &str) -> Option<&EvaluatedValue> {
        self.values.get(key).map(|v| &**v)
    }

    /// Whether a flag with this key is held (a definition, or an evaluated value).
    pub fn contains(&self, key: &str) -> bool {
        self.flags.contains_key(key) || self.values.contains_key(key)
    }

    /// Every flag key held, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self
            .flags
            .keys()
            .chain(self.values.keys())
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// Every evaluated value held (evaluated mode).
    pub fn values(&self) -> impl Iterator<Item = (&str, &EvaluatedValue)> {
        self.values.iter().map(|(k, v)| (k.as_str(), &**v))
    }

    /// How many flags.
    pub fn len(&self) -> usize {
        self.flags.len() + self.values.len()
    }

    /// No flags at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces everything with `snapshot`; returns the keys whose result may differ.
    pub(crate) fn replace(&mut self, snapshot: pb::Snapshot) -> Result<Vec<String>, String> {
        let mut next = FlagSet {
            selector: snapshot.selector.map(Selector::from),
            ..FlagSet::default()
        };
        for wire in snapshot.segments {
            let previous = self.segments.get(&wire.key).map(|s| &**s);
            if let Some(seg) = compile_segment(wire, previous) {
                next.segments
                    .insert(seg.segment().key.clone(), Arc::new(seg));
            }
        }
        for wire in snapshot.flags {
            let key = wire.key.clone();
            match compile_flag(wire, self.flags.get(&key).map(|f| &**f)) {
                Ok(flag) => drop(next.flags.insert(key, Arc::new(flag))),
                Err(reason) => drop(next.refused.insert(key, reason)),
            }
        }
        for v in &snapshot.values {
            next.values
                .insert(v.key.clone(), Arc::new(EvaluatedValue::from_wire(v)?));
        }
        let mut changed = BTreeSet::new();
        for (k, f) in &next.flags {
            if self.flags.get(k).is_none_or(|old| old.flag() != f.flag()) {
                changed.insert(k.clone());
            }
        }
        changed.extend(
            next.refused
                .iter()
                .filter(|(k, reason)| self.refused.get(*k) != Some(reason))
                .map(|(k, _)| k.clone()),
        );
        for (k, v) in &next.values {
            if self.values.get(k) != Some(v) {
                changed.insert(k.clone());
            }
        }
        changed.extend(
            self.flags
                .keys()
                .chain(self.values.keys())
                .chain(self.refused.keys())
                .filter(|k| {
                    !next.flags.contains_key(*k)
                        && !next.values.contains_key(*k)
                        && !next.refused.contains_key(*k)
                })
                .cloned(),
        );
        let changed_segments: Vec<String> = next
            .segments
            .iter()
            .filter(|(k, s)| {
                self.segments
                    .get(*k)
                    .is_none_or(|old| old.segment() != s.segment())
            })
            .map(|(k, _)| k.clone())
            .chain(
                self.segments
                    .keys()
                    .filter(|k| !next.segments.contains_key(*k))
                    .cloned(),
            )
            .collect();
        changed.extend(next.affected(Vec::new(), changed_segments));
        *self = next;
        Ok(changed.into_iter().collect())
    }

    /// Applies `delta`, which the caller has checked starts at this set's version.
    pub(crate) fn apply(&mut self, delta: pb::Delta) -> Result<Vec<String>, String> {
        // Convert everything first so a bad value leaves the set untouched. A definition over
        // the limits is refused on its own (the rest of the delta applies).
        let flags: Vec<(String, Result<CompiledFlag, String>)> = delta
            .upserts
            .into_iter()
            .map(|wire| {
                let key = wire.key.clone();
                let compiled = compile_flag(wire, self.flags.get(&key).map(|f| &**f));
                (key, compiled)
            })
            .collect();
        let segments: Vec<CompiledSegment> = delta
            .segment_upserts
            .into_iter()
            .filter_map(|wire| {
                let previous = self.segments.get(&wire.key).map(|s| &**s);
                compile_segment(wire, previous)
            })
            .collect();
        let values = delta
            .values
            .iter()
            .map(|v| Ok((v.key.clone(), EvaluatedValue::from_wire(v)?)))
            .collect::<Result<Vec<_>, String>>()?;

        let mut changed_flags: Vec<String> = Vec::new();
        let mut changed_segments: Vec<String> = Vec::new();
        for seg in segments {
            changed_segments.push(seg.segment().key.clone());
            self.segments
                .insert(seg.segment().key.clone(), Arc::new(seg));
        }
        for key in delta.segment_deletes {
            if self.segments.remove(&key).is_some() {
                changed_segments.push(key);
            }
        }
        for (key, compiled) in flags {
            changed_flags.push(key.clone());
            match compiled {
                Ok(flag) => {
                    self.refused.remove(&key);
                    self.flags.insert(key, Arc::new(flag));
                }
                Err(reason) => {
                    self.flags.remove(&key);
                    self.refused.insert(key, reason);
                }
            }
        }
        for (key, value) in values {
            changed_flags.push(key.clone());
            self.values.insert(key, Arc::new(value));
        }
        for key in delta.deletes {
            let held = self.flags.remove(&key).is_some()
                | self.values.remove(&key).is_some()
                | self.refused.remove(&key).is_some();
            if held {
                changed_flags.push(key);
            }
        }
        self.selector = Some(Selector {
            epoch: delta.epoch,
            version: delta.to_version,
        });
        self.cached = false;
        Ok(self
            .affected(changed_flags, changed_segments)
            .into_iter()
            .collect())
    }

    fn affected(&self, flags: Vec<String>, segments: Vec<String>) -> BTreeSet<String> {
        crate::model::affected_flags(
            self.flags.values().map(|f| f.flag()),
            self.segments.values().map(|s| s.segment()),
            flags,
            segments,
        )
    }
}

/// Compiles a flag from the wire, sharing unchanged rules with the version it replaces. One
/// that is not valid, or over the limits the server enforces too, is refused here, with a
/// warning, instead of costing this process what it would take to compile.
#[cfg(feature = "rules")]
fn compile_flag(wire: pb::Flag, previous: Option<&CompiledFlag>) -> Result<CompiledFlag, String> {
    let key = wire.key.clone();
    let compiled = Flag::try_from(wire)
        .map_err(|e| e.to_string())
        .and_then(|flag| CompiledFlag::after(flag, previous).map_err(|e| e.to_string()));
    compiled.inspect_err(|reason| {
        tracing::warn!(flag = %key, %reason, "refused a flag definition; it evaluates to the caller's default");
    })
}

/// A build without rules mode refuses every definition (a server sends them only to a server
/// key, which such a build is not given).
#[cfg(not(feature = "rules"))]
fn compile_flag(wire: pb::Flag, _previous: Option<&CompiledFlag>) -> Result<CompiledFlag, String> {
    tracing::warn!(flag = %wire.key, "refused a flag definition: this build evaluates no rules");
    Err("this build evaluates no rules".into())
}

#[cfg(not(feature = "rules"))]
fn compile_segment(
    _wire: pb::Segment,
    _previous: Option<&CompiledSegment>,
) -> Option<CompiledSegment> {
    None
}

/// The same for a segment; a refused one is left out (the flags that use it then fail to
/// evaluate, as with any missing segment).
#[cfg(feature = "rules")]
fn compile_segment(
    wire: pb::Segment,
    previous: Option<&CompiledSegment>,
) -> Option<CompiledSegment> {
    let seg = Segment::from(wire);
    let key = seg.key.clone();
    CompiledSegment::after(seg, previous)
        .inspect_err(|reason| {
            tracing::warn!(segment = %key, %reason, "refused a segment definition");
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costly(key: &str, patterns: usize) -> pb::Flag {
        let heavy = "a{0,40}b{0,40}c{0,40}".repeat(8);
        let flag: Flag = serde_json::from_value(serde_json::json!({
            "key": key, "on": true, "variants": {"a": 1, "b": 2}, "off_variant": "a",
            "rules": [{"clauses": [{"attribute": "x", "op": "matches", "values": vec![heavy; patterns]}],
                       "serve": {"variant": "b"}}],
            "fallthrough": {"variant": "a"}
        }))
        .unwrap();
        pb::Flag::from(&flag)
    }

    #[test]
    fn a_definition_over_the_limits_is_refused_alone_and_reported() {
        let mut set = FlagSet::default();
        let snapshot = pb::Snapshot {
            selector: Some(pb::Selector {
                epoch: 1,
                version: 1,
            }),
            flags: vec![costly("heavy", 200), costly("fine", 1)],
            ..Default::default()
        };
        let changed = set.replace(snapshot).unwrap();
        assert_eq!(changed, ["fine", "heavy"]);
        let ctx = Context::default();
        let e = set.evaluate("heavy", &ctx);
        assert_eq!(
            (e.reason, e.error),
            (Reason::Error, Some(ErrorCode::ParseError))
        );
        assert!(
            set.refused("heavy").unwrap().contains("together"),
            "{:?}",
            set.refused("heavy")
        );
        assert_eq!(set.evaluate("fine", &ctx).variant, Some("a"));

        // A later definition within the limits replaces the refusal.
        let delta = pb::Delta {
            epoch: 1,
            from_version: 1,
            to_version: 2,
            upserts: vec![costly("heavy", 1)],
            ..Default::default()
        };
        assert_eq!(set.apply(delta).unwrap(), ["heavy"]);
        assert!(set.refused("heavy").is_none());
        assert_eq!(set.evaluate("heavy", &ctx).variant, Some("a"));
    }
}
