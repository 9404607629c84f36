//! The Vane server: the embedded [`store`], the in-memory [`hub`] that fans changes out, the
//! [`control`] write path that keeps them in step, protocol [`session`]s over QUIC (one driver task for the
//! whole endpoint, on quinn-proto) and TCP+TLS,
//! the [`http`] admin API, and the [`cli`] behind the `vane` binary.
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
pub mod http;
pub mod hub;
pub mod keys;
mod quic;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
mod tls_stream;
