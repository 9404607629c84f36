//! Percentage rollouts and the specified bucketing hash (see the module docs of [`super`]).

use serde_json::Value as Json;

use super::ErrorCode;
use super::context::{Context, Path};
use crate::model::{Rollout, TOTAL_WEIGHT, ValidationError};

#[derive(Debug)]
pub(super) struct CompiledRollout {
    bucket_by: Path,
    /// The hash state after `salt ‖ ":"` (the salt defaults to the flag key, known at compile
    /// time): only the attribute's bytes are hashed per evaluation.
    salted: u64,
    /// (exclusive upper bound of the bucket range, variant index), in order.
    pub(super) ranges: Vec<(u32, usize)>,
}

pub(super) fn compile_rollout(
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
    pub(super) fn bucket_for(&self, ctx: &Context) -> Result<u32, ErrorCode> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_formatted_without_allocating() {
        let mut buf = [0u8; 20];
        assert_eq!(format_int(0, false, &mut buf), "0");
        assert_eq!(format_int(12345, false, &mut buf), "12345");
        assert_eq!(format_int(5, true, &mut buf), "-5");
        assert_eq!(
            format_int(u64::MAX, false, &mut buf),
            "18446744073709551615"
        );
    }
}
