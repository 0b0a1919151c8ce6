//! Scenarios against real `trellis` processes. Each module is one area; each test starts its
//! own servers on its own loopback subnet and cleans them up.

mod agents;
mod api;
mod blocking;
mod cli;
mod cluster;
mod dns;
mod federation;
mod gateways;
mod harness;
mod l7;
mod l7_config;
mod limits;
mod mesh;
mod netns;
mod snapshot;
mod trust;
// The benchmarks' simulated WAN, checked here so that `cargo test` runs its self-test.
#[path = "../../benches/lib/wan_relay.rs"]
mod wan_relay;
