//! Vane wire protocol v1.
//!
//! The `.proto` schema lives in `proto/vane/v1/vane.proto`; [`v1`] holds the types generated from
//! it and [`codec`] the length-prefixed framing. This crate does no I/O: the server and the
//! client drive it from their own tasks. `docs/PROTOCOL.md` is the contract in prose, and
//! `proto/testdata/` pins the encoding of every frame kind.
//!
//! ```
//! use vane_proto::{codec, v1::{Ack, Frame, Selector}};
//!
//! let frame: Frame = Ack { selector: Some(Selector { epoch: 1, version: 2 }) }.into();
//! let mut wire = bytes::BytesMut::from(&codec::encode(&frame)[..]);
//! assert_eq!(codec::decode(&mut wire, codec::DEFAULT_MAX_FRAME_LEN).unwrap(), Some(frame));
//! ```

pub mod codec;

/// Types generated from `vane/v1/vane.proto`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/vane.v1.rs"));
}

/// The ALPN protocol id both transports negotiate.
pub const ALPN: &[u8] = b"vane/1";

/// The protocol version a client puts in `Hello.protocol_version`.
pub const PROTOCOL_VERSION: u32 = 1;

macro_rules! frame_from {
    ($($msg:ident => $kind:ident),* $(,)?) => {
        $(impl From<v1::$msg> for v1::Frame {
            fn from(m: v1::$msg) -> Self {
                v1::Frame { kind: Some(v1::frame::Kind::$kind(m)) }
            }
        })*
    };
}

frame_from! {
    Hello => Hello, Welcome => Welcome, Snapshot => Snapshot, Delta => Delta, Notice => Notice,
    Fetch => Fetch, UpToDate => UpToDate, Ping => Ping, Ack => Ack, GoAway => GoAway, Error => Error,
    Identify => Identify, EvaluationSummary => EvaluationSummary, Keys => Keys,
}

impl v1::Frame {
    /// The frame kind's name, for logs and errors (`"unknown"` for a case from a newer protocol).
    pub fn kind_name(&self) -> &'static str {
        use v1::frame::Kind;
        match &self.kind {
            Some(Kind::Hello(_)) => "Hello",
            Some(Kind::Welcome(_)) => "Welcome",
            Some(Kind::Snapshot(_)) => "Snapshot",
            Some(Kind::Delta(_)) => "Delta",
            Some(Kind::Notice(_)) => "Notice",
            Some(Kind::Fetch(_)) => "Fetch",
            Some(Kind::UpToDate(_)) => "UpToDate",
            Some(Kind::Ping(_)) => "Ping",
            Some(Kind::Ack(_)) => "Ack",
            Some(Kind::GoAway(_)) => "GoAway",
            Some(Kind::Error(_)) => "Error",
            Some(Kind::Identify(_)) => "Identify",
            Some(Kind::EvaluationSummary(_)) => "EvaluationSummary",
            Some(Kind::Keys(_)) => "Keys",
            None => "unknown",
        }
    }
}
