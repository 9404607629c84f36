//! The model ↔ protobuf conversions: what travels in `vane.v1.Flag` and `vane.v1.Segment` for
//! rules-mode clients, and evaluation reasons. Converting from the wire only maps fields;
//! compiling ([`crate::eval::CompiledFlag::new`]) is what checks them, once.

use serde_json::Value as Json;
use vane_proto::v1 as pb;

use crate::eval::Reason;
use crate::model::{
    Clause, Flag, FlagValue, Operator, Rollout, Rule, Segment, SegmentRule, Serve, Weighted,
};

const REASONS: [(Reason, pb::Reason); 7] = [
    (Reason::Static, pb::Reason::Static),
    (Reason::TargetingMatch, pb::Reason::TargetingMatch),
    (Reason::Split, pb::Reason::Split),
    (Reason::Default, pb::Reason::Default),
    (Reason::Disabled, pb::Reason::Disabled),
    (Reason::Error, pb::Reason::Error),
    (Reason::Cached, pb::Reason::Cached),
];

/// A reason on the wire. `Cached` is a client-side reason: servers never send it, and clients
/// send it only in evaluation counts.
pub fn reason_to_wire(r: Reason) -> pb::Reason {
    REASONS
        .iter()
        .find(|(m, _)| *m == r)
        .map_or(pb::Reason::Default, |(_, w)| *w)
}

/// A reason from the wire; unknown values (a newer server) read as `Default`.
pub fn reason_from_wire(r: i32) -> Reason {
    REASONS
        .iter()
        .find(|(_, w)| *w as i32 == r)
        .map_or(Reason::Default, |(m, _)| *m)
}

/// Why a protobuf flag could not be turned into the model.
#[derive(Debug, Clone, thiserror::Error)]
#[error("flag {key:?}: {message}")]
pub struct WireError {
    key: String,
    message: String,
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

/// A flag value from the wire; `None` if absent or not valid JSON.
pub fn flag_value(value: Option<&pb::Value>) -> Result<FlagValue, String> {
    use pb::value::Kind;
    match value.and_then(|v| v.kind.as_ref()) {
        Some(Kind::Bool(b)) => Ok(FlagValue::Bool(*b)),
        Some(Kind::Number(n)) => Ok(FlagValue::Number(*n)),
        Some(Kind::String(s)) => Ok(FlagValue::String(s.clone())),
        Some(Kind::Json(text)) => serde_json::from_str(text)
            .map(FlagValue::Json)
            .map_err(|e| format!("bad JSON: {e}")),
        None => Err("no value".into()),
    }
}

fn operand_to_wire(v: &Json) -> pb::Value {
    use pb::value::Kind;
    let kind = match v {
        Json::Bool(b) => Kind::Bool(*b),
        Json::Number(n) => Kind::Number(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::String(s.clone()),
        other => Kind::Json(other.to_string()),
    };
    pb::Value { kind: Some(kind) }
}

fn operand_from_wire(v: &pb::Value) -> Json {
    use pb::value::Kind;
    match &v.kind {
        Some(Kind::Bool(b)) => Json::Bool(*b),
        // Operands travel as doubles; integral ones come back as integers, as they were written.
        Some(Kind::Number(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => Json::from(*n as i64),
        Some(Kind::Number(n)) => serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Some(Kind::String(s)) => Json::String(s.clone()),
        Some(Kind::Json(t)) => serde_json::from_str(t).unwrap_or(Json::Null),
        None => Json::Null,
    }
}

const OPERATORS: [(Operator, pb::Operator); 15] = [
    (Operator::In, pb::Operator::In),
    (Operator::StartsWith, pb::Operator::StartsWith),
    (Operator::EndsWith, pb::Operator::EndsWith),
    (Operator::Contains, pb::Operator::Contains),
    (Operator::Matches, pb::Operator::Matches),
    (Operator::Lt, pb::Operator::Lt),
    (Operator::Lte, pb::Operator::Lte),
    (Operator::Gt, pb::Operator::Gt),
    (Operator::Gte, pb::Operator::Gte),
    (Operator::SemverEq, pb::Operator::SemverEq),
    (Operator::SemverLt, pb::Operator::SemverLt),
    (Operator::SemverGt, pb::Operator::SemverGt),
    (Operator::Before, pb::Operator::Before),
    (Operator::After, pb::Operator::After),
    (Operator::InSegment, pb::Operator::InSegment),
];

fn clause_to_wire(c: &Clause) -> pb::Clause {
    let op = OPERATORS
        .iter()
        .find(|(m, _)| *m == c.op)
        .map_or(pb::Operator::Unspecified, |(_, w)| *w);
    pb::Clause {
        attribute: c.attribute.clone(),
        op: op.into(),
        values: c.values.iter().map(operand_to_wire).collect(),
        negate: c.negate,
    }
}

/// An operator this client does not know (from a newer server) becomes a clause that never
/// matches, as the protocol specifies: `in` with no operands, not negated.
fn clause_from_wire(c: &pb::Clause) -> Clause {
    match OPERATORS.iter().find(|(_, w)| *w as i32 == c.op) {
        Some((op, _)) => Clause {
            attribute: c.attribute.clone(),
            op: *op,
            values: c.values.iter().map(operand_from_wire).collect(),
            negate: c.negate,
        },
        None => Clause {
            attribute: c.attribute.clone(),
            op: Operator::In,
            values: Vec::new(),
            negate: false,
        },
    }
}

fn rollout_to_wire(r: &Rollout) -> pb::Rollout {
    pb::Rollout {
        bucket_by: r.bucket_by.clone(),
        salt: r.salt.clone().unwrap_or_default(),
        variants: r
            .variants
            .iter()
            .map(|w| pb::WeightedVariant {
                variant: w.variant.clone(),
                weight: w.weight,
            })
            .collect(),
    }
}

fn rollout_from_wire(r: &pb::Rollout) -> Rollout {
    Rollout {
        bucket_by: if r.bucket_by.is_empty() {
            "key".into()
        } else {
            r.bucket_by.clone()
        },
        salt: (!r.salt.is_empty()).then(|| r.salt.clone()),
        variants: r
            .variants
            .iter()
            .map(|w| Weighted {
                variant: w.variant.clone(),
                weight: w.weight,
            })
            .collect(),
    }
}

impl From<&Flag> for pb::Flag {
    fn from(flag: &Flag) -> pb::Flag {
        use pb::flag::Fallthrough;
        use pb::rule::Serve as WireServe;
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
            fallthrough: Some(match &flag.fallthrough {
                Serve::Variant(v) => Fallthrough::FallthroughVariant(v.clone()),
                Serve::Rollout(r) => Fallthrough::FallthroughRollout(rollout_to_wire(r)),
            }),
            version: flag.version,
            description: flag.description.clone(),
            rules: flag
                .rules
                .iter()
                .map(|r| pb::Rule {
                    id: r.id.clone(),
                    clauses: r.clauses.iter().map(clause_to_wire).collect(),
                    serve: Some(match &r.serve {
                        Serve::Variant(v) => WireServe::Variant(v.clone()),
                        Serve::Rollout(ro) => WireServe::Rollout(rollout_to_wire(ro)),
                    }),
                    description: r.description.clone(),
                })
                .collect(),
            tags: flag.tags.clone(),
        }
    }
}

impl TryFrom<pb::Flag> for Flag {
    type Error = WireError;

    fn try_from(wire: pb::Flag) -> Result<Flag, WireError> {
        use pb::flag::Fallthrough;
        use pb::rule::Serve as WireServe;
        let err = |message: String| WireError {
            key: wire.key.clone(),
            message,
        };
        let mut variants = std::collections::BTreeMap::new();
        for v in &wire.variants {
            let value = flag_value(v.value.as_ref())
                .map_err(|e| err(format!("variant {:?}: {e}", v.name)))?;
            variants.insert(v.name.clone(), value);
        }
        let fallthrough = match &wire.fallthrough {
            Some(Fallthrough::FallthroughVariant(v)) => Serve::Variant(v.clone()),
            Some(Fallthrough::FallthroughRollout(r)) => Serve::Rollout(rollout_from_wire(r)),
            None => return Err(err("no fallthrough".into())),
        };
        let mut rules = Vec::with_capacity(wire.rules.len());
        for (i, r) in wire.rules.iter().enumerate() {
            let serve = match &r.serve {
                Some(WireServe::Variant(v)) => Serve::Variant(v.clone()),
                Some(WireServe::Rollout(ro)) => Serve::Rollout(rollout_from_wire(ro)),
                None => return Err(err(format!("rule {i} serves nothing"))),
            };
            let clauses = r.clauses.iter().map(clause_from_wire).collect();
            rules.push(Rule {
                id: r.id.clone(),
                description: r.description.clone(),
                clauses,
                serve,
            });
        }
        let flag = Flag {
            key: wire.key.clone(),
            on: wire.on,
            variants,
            off_variant: wire.off_variant.clone(),
            rules,
            fallthrough,
            description: wire.description.clone(),
            tags: wire.tags.clone(),
            version: wire.version,
        };
        Ok(flag)
    }
}

impl From<&Segment> for pb::Segment {
    fn from(s: &Segment) -> pb::Segment {
        pb::Segment {
            key: s.key.clone(),
            included: s.included.clone(),
            excluded: s.excluded.clone(),
            rules: s
                .rules
                .iter()
                .map(|r| pb::SegmentRule {
                    clauses: r.clauses.iter().map(clause_to_wire).collect(),
                })
                .collect(),
            version: s.version,
            description: s.description.clone(),
        }
    }
}

impl From<pb::Segment> for Segment {
    fn from(wire: pb::Segment) -> Segment {
        Segment {
            key: wire.key,
            included: wire.included,
            excluded: wire.excluded,
            rules: wire
                .rules
                .iter()
                .map(|r| SegmentRule {
                    clauses: r.clauses.iter().map(clause_from_wire).collect(),
                })
                .collect(),
            description: wire.description,
            version: wire.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_with_rules_and_rollouts_round_trip() {
        let flag: Flag = serde_json::from_value(json!({
            "key": "checkout",
            "on": true,
            "variants": {"a": "A", "b": "B"},
            "off_variant": "b",
            "rules": [
                {"id": "beta", "clauses": [{"attribute": "groups", "op": "in", "values": ["beta", 3, true]}], "serve": {"variant": "a"}},
                {"clauses": [{"op": "in_segment", "values": ["staff"], "negate": true}],
                 "serve": {"rollout": {"bucket_by": "org.id", "salt": "s", "variants": [{"variant": "a", "weight": 25000}, {"variant": "b", "weight": 75000}]}}}
            ],
            "fallthrough": {"rollout": {"variants": [{"variant": "a", "weight": 50000}, {"variant": "b", "weight": 50000}]}},
            "tags": ["web"],
            "version": 4
        }))
        .unwrap();
        assert_eq!(Flag::try_from(pb::Flag::from(&flag)).unwrap(), flag);
    }

    #[test]
    fn plain_values_round_trip() {
        let mut flag = Flag::boolean("x", true, true);
        flag.version = 9;
        assert_eq!(Flag::try_from(pb::Flag::from(&flag)).unwrap(), flag);
        let json: Flag = serde_json::from_value(json!({
            "key": "cfg", "on": false, "variants": {"v": {"limit": 3, "tags": ["a"]}},
            "off_variant": "v", "fallthrough": {"variant": "v"}, "description": "d", "version": 2
        }))
        .unwrap();
        assert_eq!(Flag::try_from(pb::Flag::from(&json)).unwrap(), json);
    }

    #[test]
    fn segments_round_trip() {
        let seg: Segment = serde_json::from_value(json!({
            "key": "staff", "included": ["u1"], "excluded": ["u2"],
            "rules": [{"clauses": [{"attribute": "email", "op": "ends_with", "values": ["@vane.dev"]}]}],
            "version": 3
        }))
        .unwrap();
        assert_eq!(Segment::from(pb::Segment::from(&seg)), seg);
    }

    #[test]
    fn an_unknown_operator_from_a_newer_server_never_matches() {
        let mut wire = pb::Flag::from(&Flag::boolean("x", true, false));
        wire.rules.push(pb::Rule {
            clauses: vec![pb::Clause {
                attribute: "a".into(),
                op: 99,
                values: vec![],
                negate: true,
            }],
            serve: Some(pb::rule::Serve::Variant("true".into())),
            ..Default::default()
        });
        let flag = crate::eval::CompiledFlag::new(Flag::try_from(wire).unwrap()).unwrap();
        let ctx = crate::eval::Context::parse(r#"{"key": "k", "a": 1}"#).unwrap();
        let e = flag.evaluate(&ctx, &crate::eval::NoSegments);
        assert_eq!(
            e.variant,
            Some("false"),
            "the unknown clause did not match, even negated"
        );
    }
}
