#![no_main]
//! cargo fuzz run config: see trellis::fuzz::config.
libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis::fuzz::config(data));
