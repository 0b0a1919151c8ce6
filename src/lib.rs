//! Trellis: one binary that runs a whole multi-datacenter service mesh, speaking Consul's HTTP API.
//! See DESIGN.md for the map of layers; each module below is one of them.

pub mod agent;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod connect;
pub mod consensus;
pub mod coordinate;
pub mod dns;
pub mod duration;
pub mod federation;
pub mod fuzz;
pub mod gateway;
pub mod logging;
pub mod membership;
pub mod proxy;
pub mod rpc;
pub mod state;
pub mod tls;
