//! Evaluation: which variant a flag serves. Today a flag is either off (its off variant) or on
//! (its fallthrough); targeting rules, segments and rollouts slot into [`evaluate`] with the
//! evaluation issue, and the reasons already follow OpenFeature's names.

use serde::Serialize;

use crate::model::{Flag, FlagValue, Serve};

/// Why a value was served (OpenFeature's resolution reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum Reason {
    /// The flag is on and serves one variant to everyone.
    Static,
    /// A targeting rule matched.
    TargetingMatch,
    /// A percentage rollout chose the variant.
    Split,
    /// The caller's default was returned (e.g. the flag does not exist).
    Default,
    /// The flag is off.
    Disabled,
    /// Evaluation failed; see the error code.
    Error,
}

/// Why an evaluation fell back to the caller's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum ErrorCode {
    /// No flag with that key.
    FlagNotFound,
    /// The flag's type is not the one asked for.
    TypeMismatch,
    /// The client holds no flags yet.
    ProviderNotReady,
}

/// The outcome of evaluating one flag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation<'a> {
    /// The value served.
    pub value: &'a FlagValue,
    /// The name of the variant served.
    pub variant: &'a str,
    /// Why.
    pub reason: Reason,
}

/// Evaluates `flag`. Allocation-free: the result borrows from the flag.
pub fn evaluate(flag: &Flag) -> Option<Evaluation<'_>> {
    let (variant, reason) = if flag.on {
        match &flag.fallthrough {
            Serve::Variant(v) => (v.as_str(), Reason::Static),
        }
    } else {
        (flag.off_variant.as_str(), Reason::Disabled)
    };
    // Validation guarantees the variant exists; a flag that somehow breaks that yields None and
    // the caller's default.
    let (variant, value) = flag.variants.get_key_value(variant)?;
    Some(Evaluation {
        value,
        variant,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_serves_fallthrough_off_serves_off_variant() {
        let mut flag = Flag::boolean("f", true, true);
        let e = evaluate(&flag).unwrap();
        assert_eq!(
            (e.value, e.variant, e.reason),
            (&FlagValue::Bool(true), "true", Reason::Static)
        );
        flag.on = false;
        let e = evaluate(&flag).unwrap();
        assert_eq!(
            (e.value, e.variant, e.reason),
            (&FlagValue::Bool(false), "false", Reason::Disabled)
        );
    }
}
