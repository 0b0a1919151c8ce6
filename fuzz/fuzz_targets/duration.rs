#![no_main]
//! cargo fuzz run duration: see trellis::fuzz::duration.
libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis::fuzz::duration(data));
