//! The Vane server. How the pieces meet:
//!
//! - [`store`]: the durable state behind one trait (SQLite embedded); a write commits with its
//!   version assigned in its transaction, and returns the committed change-log entry.
//! - [`control`]: the write path: validate an edit, commit it with a precondition, and apply
//!   that log entry to the [`hub`], the in-memory state every session reads and is woken by.
//! - [`session`]: the protocol session as a state machine without I/O, and the thin tokio
//!   driver that runs it over a QUIC stream (one driver task for the whole endpoint, on
//!   quinn-proto) or a TLS connection; [`server`] binds and runs the listeners.
//! - [`http`]: the admin API, SDK endpoints and operations, behind shared layers, speaking the
//!   typed [`api`] that the CLI, the tests and `vane-load` use too; [`keys`]: SDK keys and the
//!   admin token; [`limits`]: what one source address may ask of the listeners and the admin API;
//!   [`events`]: evaluation events, queued without waiting and exported off the request path.
//! - [`cli`]: the `vane` binary.
//!
//! Tests and embedders start it the way the binary does:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use vane_server::server::{Server, ServerConfig};
//!
//! let mut config = ServerConfig::new("/tmp/vane-data");
//! config.listen = "127.0.0.1:0".parse()?;
//! config.http = "127.0.0.1:0".parse()?;
//! let server = Server::bind(config).await?;
//! println!("protocol on {}, HTTP on {}", server.protocol_addr(), server.http_addr());
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod api;
pub mod cli;
pub mod control;
mod demo;
pub mod events;
pub mod http;
pub mod hub;
pub mod keys;
pub mod limits;
mod quic;
pub mod relay;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
mod tls_stream;
