#![no_main]
//! cargo fuzz run dns: see trellis::fuzz::dns.
libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis::fuzz::dns(data));
