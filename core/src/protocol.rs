//! The terms of protocol v1 that both ends use: the selector, the two transports, and the
//! liveness rule (docs/PROTOCOL.md sections 1, 3 and 4.5). The client's sync machine and the
//! server's session machine both take them from here, so the two sides cannot drift apart.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use vane_proto::v1 as pb;

/// A peer that hears no frame at all for this many heartbeat intervals treats the connection
/// as dead: the client reconnects, the server drops the session with `Error(TIMEOUT)`.
pub const MISSED_HEARTBEATS: u32 = 3;

/// How long after its transport is up a client has to send Hello (section 4.1).
pub const HELLO_WITHIN: Duration = Duration::from_secs(10);

/// A duration as the protocol's `u32` milliseconds (`heartbeat_interval_ms`, `retry_after_ms`,
/// `reconnect_within_ms`), saturating.
pub fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// An epoch as tools show it: 16 lowercase hex digits (JSON, logs, the CLI, ETags).
pub fn epoch_hex(epoch: u64) -> String {
    format!("{epoch:016x}")
}

/// Parses [`epoch_hex`].
pub fn parse_epoch_hex(text: &str) -> Option<u64> {
    (text.len() == 16)
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}

/// A position in an environment's history (see `Selector` in the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Selector {
    /// Changes when history is discontinuous.
    pub epoch: u64,
    /// Rises by one with every committed change.
    pub version: u64,
}

impl Selector {
    /// The epoch as 16 hex digits, as shown in logs and JSON (see [`epoch_hex`]).
    pub fn epoch_hex(&self) -> String {
        epoch_hex(self.epoch)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch_hex(), self.version)
    }
}

impl From<pb::Selector> for Selector {
    fn from(s: pb::Selector) -> Self {
        Selector {
            epoch: s.epoch,
            version: s.version,
        }
    }
}

impl From<Selector> for pb::Selector {
    fn from(s: Selector) -> Self {
        pb::Selector {
            epoch: s.epoch,
            version: s.version,
        }
    }
}

/// The transport a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// TLS 1.3 over TCP.
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_shown_as_sixteen_hex_digits_and_read_back() {
        let s = Selector {
            epoch: 0xab,
            version: 7,
        };
        assert_eq!(s.epoch_hex(), "00000000000000ab");
        assert_eq!(s.to_string(), "00000000000000ab:7");
        assert_eq!(parse_epoch_hex(&s.epoch_hex()), Some(0xab));
        assert_eq!(parse_epoch_hex("ab"), None, "always 16 digits");
        assert_eq!(parse_epoch_hex("zzzzzzzzzzzzzzzz"), None);
        assert_eq!(millis(Duration::from_secs(u64::MAX)), u32::MAX);
    }
}
