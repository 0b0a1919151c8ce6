#![no_main]
//! cargo fuzz run gossip: see trellis::fuzz::gossip.
libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis::fuzz::gossip(data));
