//! The Vane client core: the flag [`model`], [`eval`]uation, the environment [`history`] with its
//! catch-up rules (shared with the server), the [`protocol`] terms both ends use, the sans-IO
//! client [`sync`] state machine, the evaluation counts it reports ([`summary`]), and the tokio [`client`] that drives it over QUIC or TCP+TLS.
//!
//! The server and the Rust client evaluate with this crate, so a flag gives the same answer
//! everywhere. Evaluating definitions on the client (rules mode) is the `rules` feature, on by
//! default; the mobile SDKs (through `vane-ffi`) leave it out, since a mobile key is sent values
//! the server evaluated, and a client without it refuses definitions.

pub mod eval;
pub mod history;
pub mod model;
pub mod protocol;
pub mod state;
pub mod summary;
pub mod sync;
pub mod wire;

pub mod cache;
pub mod client;
pub mod convert;
