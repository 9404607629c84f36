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

/// A position in an environment's history (see `Selector` in the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Selector {
    /// Changes when history is discontinuous.
    pub epoch: u64,
    /// Rises by one with every committed change.
    pub version: u64,
}

impl Selector {
    /// The epoch as 16 hex digits, as shown in logs and JSON.
    pub fn epoch_hex(&self) -> String {
        format!("{:016x}", self.epoch)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}:{}", self.epoch, self.version)
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
