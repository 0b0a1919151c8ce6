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
/// openraft's own snapshot trigger is off too: `drive_snapshots` asks for them.
pub fn raft_config(t: &RaftTimings) -> Result<openraft::Config, openraft::ConfigError> {
    let lease = election::lease(t).as_millis() as u64;
    openraft::Config {
        cluster_name: "trellis".into(),
        heartbeat_interval: t.heartbeat_ms,
        election_timeout_min: lease.saturating_sub(1).max(t.heartbeat_ms + 1),
        election_timeout_max: lease.max(t.heartbeat_ms + 2),
        enable_elect: false,
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: t.trailing_logs,
        ..Default::default()
    }
    .validate()
}

/// Ask for snapshots, as Consul's servers take them:
///
/// - by count: every `snapshot_interval` plus up to as much again at random, snapshot if
///   `snapshot_threshold` entries have been applied since the last one. The interval keeps a
///   large state from being rewritten every few seconds under heavy writes (at a million keys a
///   snapshot is about 200 MB), and the randomness, with limits that differ per server
///   (up to half as much again, by Raft ID), keeps the servers of a cluster from all
///   snapshotting at once, with none left to make the quorum that commits writes meanwhile;
/// - by size: whenever the log outgrows `snapshot_log_bytes` and the latest snapshot, however
///   few entries it holds (with group commit one entry can carry hundreds of writes, so an
///   entry count alone bounds nothing), at most every 10 s. Never before the log is as big as
///   the snapshot, so that a large state is not rewritten for a small log (the disk then holds
///   at most about twice the state).
///
/// Runs until Raft stops.
pub async fn drive_snapshots(raft: Raft, storage: storage::Storage, t: RaftTimings, id: NodeId) {
    use rand::RngExt;
    use std::time::{Duration, Instant};
    // At most one size-triggered request per this long: a snapshot under way, or a log that
    // stays large because its kept trailing entries are large, must not bring a storm of them.
    const SIZE_EVERY: Duration = Duration::from_secs(10);
    // Each server's limits are its own, up to half as much again by Raft ID: servers that
    // applied the same log would otherwise reach them together.
    let stagger = |limit: u64| limit.saturating_add((limit / 2) * (id % 1024) / 1024);
    let threshold = stagger(t.snapshot_threshold);
    let next_check = || Instant::now() + t.snapshot_interval.mul_f64(1.0 + rand::rng().random_range(0.0..1.0));
    let mut check_count_at = next_check();
    let mut tick = tokio::time::interval((t.snapshot_interval / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked_by_size: Option<Instant> = None;
    loop {
        tick.tick().await;
        let (since_last, state) = {
            let m = raft.metrics();
            let m = m.borrow();
            let applied = m.last_applied.map_or(0, |l| l.index);
            (applied.saturating_sub(m.snapshot.map_or(0, |l| l.index)), m.state)
        };
        if state == openraft::ServerState::Shutdown {
            return;
        }
        let count_due = Instant::now() >= check_count_at;
        if count_due {
            check_count_at = next_check();
        }
        let by_count = count_due && since_last >= threshold;
        let by_size = storage.log_bytes() > stagger(t.snapshot_log_bytes.max(storage.snapshot_len()))
            && asked_by_size.is_none_or(|a| a.elapsed() >= SIZE_EVERY);
        if by_size {
            asked_by_size = Some(Instant::now());
        }
        if by_count || by_size {
            tracing::debug!(entries = since_last, log_bytes = storage.log_bytes(), by_count, by_size, "asking for a snapshot");
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

pub(crate) fn io_err<E: std::error::Error + 'static>(e: &E) -> openraft::AnyError {
    openraft::AnyError::new(e)
}
