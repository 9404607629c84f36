//! libFuzzer entry point; the harness is [`vane_fuzz::server_session`].
#![no_main]
#![allow(unsafe_code)] // `fuzz_target!` exports the C symbol libFuzzer calls.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vane_fuzz::server_session(data));
