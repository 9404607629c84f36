//! The Vane client core: the flag [`model`], [`eval`]uation, the environment [`history`] with its
//! catch-up rules (shared with the server), the [`protocol`] terms both ends use, the sans-IO
//! client [`sync`] state machine, the evaluation counts it reports ([`summary`]), and the tokio [`client`] that drives it over QUIC or TCP+TLS.
//!
//! The server, the Rust client and the mobile SDKs (through `vane-ffi`) all evaluate with this
//! crate, so a flag gives the same answer everywhere.

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
