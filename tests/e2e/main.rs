//! End-to-end tests: the real server on loopback with generated certificates, talked to by the
//! real Rust client, the admin API, and raw TLS sockets. One binary, one module per theme.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod admin;
mod backpressure;
mod cluster;
mod damaged;
mod delivery;
mod faults;
mod harness;
mod hostile_http;
mod lifecycle;
mod limits;
mod load;
mod mobile;
mod ofrep;
mod openfeature;
mod relay;
mod resume;
mod summaries;
mod targeting;
