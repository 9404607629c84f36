//! Credentials: SDK keys (their kinds, what each kind may ask for, minting a secret, and the
//! hash that is all the store keeps of it) and the admin token.
//!
//! A secret carries 128 random bits (an admin token 192), so one SHA-256 is enough to store it:
//! there is nothing to brute-force. Hashes are compared without an early exit.

use sha2::{Digest, Sha256};
use vane_proto::v1::DeliveryMode;

/// SHA-256 of a secret: what the store and the in-memory key table hold.
pub type SecretHash = [u8; 32];

/// An SDK key's kind: what it may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Backend services: rules mode (or evaluated).
    Server,
    /// Mobile apps: evaluated mode only; no targeting rule ever reaches the device.
    Mobile,
}

/// Why a key may not have what it asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a mobile key may not receive flag rules; use evaluated mode")]
pub struct RulesDenied;

impl KeyKind {
    /// `"server"` or `"mobile"`, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Server => "server",
            KeyKind::Mobile => "mobile",
        }
    }

    /// Parses [`KeyKind::as_str`].
    pub fn parse(s: &str) -> Option<KeyKind> {
        match s {
            "server" => Some(KeyKind::Server),
            "mobile" => Some(KeyKind::Mobile),
            _ => None,
        }
    }

    /// Whether this kind may be served in `mode` (docs/PROTOCOL.md 4.1): rules, and the
    /// unspecified mode that means rules, are for server keys; evaluated mode is for any key.
    pub fn allows(self, mode: DeliveryMode) -> Result<(), RulesDenied> {
        match (self, mode) {
            (KeyKind::Mobile, DeliveryMode::Rules | DeliveryMode::Unspecified) => Err(RulesDenied),
            _ => Ok(()),
        }
    }

    /// The tag in the secret (`vane_srv_…`, `vane_mob_…`), so a leaked key says what it is.
    fn tag(self) -> &'static str {
        match self {
            KeyKind::Server => "srv",
            KeyKind::Mobile => "mob",
        }
    }
}

/// An SDK key as stored: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public id, used to revoke.
    pub id: String,
    /// The environment it belongs to.
    pub env: String,
    /// Server or mobile.
    pub kind: KeyKind,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    /// SHA-256 of the secret.
    pub hash: SecretHash,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `None` while valid.
    pub revoked_at: Option<i64>,
}

/// A key just minted: the record to store, and the secret, which is shown once and never kept.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// What the store keeps.
    pub record: KeyRecord,
    /// The secret to configure the SDK with.
    pub secret: String,
}

/// Characters of the secret kept as its recognisable prefix (`vane_srv_1a2b3`).
pub const PREFIX_LEN: usize = 14;

/// Mints a key of `kind` for `env`, created at `now` (Unix seconds).
pub fn mint(env: &str, kind: KeyKind, now: i64) -> NewKey {
    let secret = format!(
        "vane_{}_{}",
        kind.tag(),
        hex::encode(rand::random::<[u8; 16]>())
    );
    let record = KeyRecord {
        id: format!("key_{}", hex::encode(rand::random::<[u8; 6]>())),
        env: env.to_owned(),
        kind,
        prefix: secret[..PREFIX_LEN].to_owned(),
        hash: hash_secret(&secret),
        created_at: now,
        revoked_at: None,
    };
    NewKey { record, secret }
}

/// A fresh admin token (`vane_adm_…`).
pub fn mint_admin_token() -> String {
    format!("vane_adm_{}", hex::encode(rand::random::<[u8; 24]>()))
}

/// SHA-256 of a secret.
pub fn hash_secret(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `secret` hashes to `expected`, compared without an early exit so the time taken says
/// nothing about how much of it matched.
pub fn secret_matches(secret: &str, expected: &SecretHash) -> bool {
    let hash = hash_secret(secret);
    hash.iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_say_their_kind_and_store_only_a_hash() {
        let key = mint("prod", KeyKind::Mobile, 5);
        assert!(key.secret.starts_with("vane_mob_"), "{}", key.secret);
        assert_eq!(key.secret.len(), "vane_mob_".len() + 32);
        assert!(key.secret.starts_with(&key.record.prefix));
        assert_eq!(key.record.hash, hash_secret(&key.secret));
        assert!(secret_matches(&key.secret, &key.record.hash));
        assert!(!secret_matches("vane_mob_other", &key.record.hash));
        assert_ne!(mint("prod", KeyKind::Mobile, 5).secret, key.secret);
        assert!(mint_admin_token().starts_with("vane_adm_"));
    }

    #[test]
    fn mobile_keys_get_evaluated_mode_only() {
        use DeliveryMode::*;
        for mode in [Rules, Unspecified, Evaluated] {
            assert!(KeyKind::Server.allows(mode).is_ok());
        }
        assert_eq!(KeyKind::Mobile.allows(Rules), Err(RulesDenied));
        assert_eq!(KeyKind::Mobile.allows(Unspecified), Err(RulesDenied));
        assert!(KeyKind::Mobile.allows(Evaluated).is_ok());
        for kind in [KeyKind::Server, KeyKind::Mobile] {
            assert_eq!(KeyKind::parse(kind.as_str()), Some(kind));
        }
    }
}
