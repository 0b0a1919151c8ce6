#![no_main]
//! cargo fuzz run filter: see trellis::fuzz::filter.
libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis::fuzz::filter(data));
