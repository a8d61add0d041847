//! `cargo fuzz run vhost_chain` (see fuzz/README.md). The body lives in `src/lib.rs`, shared
//! with `tests/fuzz_smoke.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sealdisk_fuzz::vhost_chain(data));
