#![no_main]
//! cargo fuzz run rpc_frame: see trellis::fuzz::rpc_frame.
libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis::fuzz::rpc_frame(data));
