//! The service mesh's logic, below the API and above the state: the built-in CA (root and
//! leaf certificates, rotation, secondary-datacenter intermediates), config entries (decoding,
//! validation and normalisation per kind), intentions (precedence, matching, per-request L7
//! decisions), the discovery chain compiler, and the proxy part of service registrations.
//!
//! Pure functions over the replicated records (`state::mesh`); the API writes what they
//! produce through Raft, and proxies read it back through the API.

pub mod ca;
pub mod chain;
pub mod chain_entry;
pub mod config_entry;
pub mod intention;
pub mod registration;
pub mod spiffe;
