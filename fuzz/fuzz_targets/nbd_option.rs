//! `cargo fuzz run nbd_option` (see fuzz/README.md). The body lives in `src/lib.rs`, shared
//! with `tests/fuzz_smoke.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sealdisk_fuzz::nbd_option(data));
