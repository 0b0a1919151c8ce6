#![no_main]
//! cargo fuzz run state_apply: see trellis::fuzz::state_apply.
libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis::fuzz::state_apply(data));
