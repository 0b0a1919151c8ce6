//! openraft wiring: the type configuration, the log store (a write-ahead log), the state machine
//! adapter over `state::Store`, and the Raft network carried by `rpc`.
//!
//! Depends on `state` (what is replicated) and `rpc` (how bytes move); nothing above.

// openraft fixes the storage and config error types (large enums) in its trait signatures;
// our helpers return the same types rather than boxing and unboxing them at every call.
#![allow(clippy::result_large_err)]

pub mod election;
pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod storage;

use std::io::Cursor;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::state::{Outcome, Request};

/// A server as Raft's membership records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerNode {
    /// The node's UUID (Consul's node ID), as shown by `operator raft list-peers`.
    pub id: String,
    pub name: String,
    pub rpc_addr: String,
}

impl std::fmt::Display for ServerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.rpc_addr)
    }
}

impl ServerNode {
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.rpc_addr.parse().ok()
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Outcome,
        NodeId = u64,
        Node = ServerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;

pub use crate::config::{DEFAULT_RAFT_TIMINGS, RaftTimings};

/// openraft's configuration. Its own election timer is off: `election::drive` holds elections,
/// after a pre-vote. openraft derives its leader lease (how long a follower refuses to vote
/// after hearing the leader) from `election_timeout_max`, so that is set to the lease.
///
/// Each server snapshots after its own number of entries, between the threshold and half as
/// many again (by its Raft ID): servers that all snapshotted at the same index would all be
/// busy at once, and none left to make the quorum that commits writes meanwhile.
pub fn raft_config(t: &RaftTimings, id: NodeId) -> Result<openraft::Config, openraft::ConfigError> {
    let lease = election::lease(t).as_millis() as u64;
    let snapshot_after = t.snapshot_threshold + (t.snapshot_threshold / 2) * (id % 1024) / 1024;
    openraft::Config {
        cluster_name: "trellis".into(),
        heartbeat_interval: t.heartbeat_ms,
        election_timeout_min: lease.saturating_sub(1).max(t.heartbeat_ms + 1),
        election_timeout_max: lease.max(t.heartbeat_ms + 2),
        enable_elect: false,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_after),
        max_in_snapshot_log_to_keep: t.trailing_logs,
        ..Default::default()
    }
    .validate()
}

/// Ask for a snapshot whenever the log outgrows `limit` bytes (`raft_snapshot_log_bytes`) and
/// the latest snapshot, however few entries it holds: with group commit one entry can carry
/// hundreds of writes, so an entry count alone bounds nothing. Never before the log is as big
/// as the snapshot, so that a large state is not rewritten for a small log (the disk then
/// holds at most about twice the state). Runs until Raft stops.
pub async fn snapshot_by_size(raft: Raft, storage: storage::Storage, limit: u64) {
    // At most one request per this long: a snapshot under way, or a log that stays large
    // because its kept trailing entries are large, must not bring a storm of them.
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut asked: Option<std::time::Instant> = None;
    loop {
        tick.tick().await;
        if raft.metrics().borrow().state == openraft::ServerState::Shutdown {
            return;
        }
        if storage.log_bytes() > limit.max(storage.snapshot_len()) && asked.is_none_or(|t| t.elapsed() >= EVERY) {
            asked = Some(std::time::Instant::now());
            tracing::debug!(bytes = storage.log_bytes(), "the Raft log passed its size limit: snapshotting");
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

pub(crate) fn io_err<E: std::error::Error + 'static>(e: &E) -> openraft::AnyError {
    openraft::AnyError::new(e)
}
