//! `RaftNode`: the cheap, clonable handle the rest of the server uses to write through Raft,
//! learn who leads, and check leadership. A write that reaches a follower (or a leader that
//! just lost office) is forwarded to the current leader (`ClusterRpc::Apply`), transparently.

use parking_lot::RwLock;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{ClusterReply, ClusterRpc, MAX_HOPS, NodeState};
use crate::consensus::network::ContactLog;
use crate::consensus::{NodeId, Raft, ServerNode};
use crate::rpc::{ErrorCode, RpcClient, RpcError, Service};
use crate::state::{Command, Outcome, Request, Store};

/// How long a forwarded write may take before the caller gets an error.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("No cluster leader")]
    NoLeader,
    #[error("forwarding to the leader failed: {0}")]
    Forward(RpcError),
    #[error("raft: {0}")]
    Raft(String),
}

#[derive(Clone)]
pub struct RaftNode {
    pub id: NodeId,
    pub me: ServerNode,
    pub raft: Raft,
    pub store: Arc<RwLock<Store>>,
    pub rpc: RpcClient,
    pub contacts: ContactLog,
    /// Group commit of this server's writes while it leads.
    pub writes: super::batch::Batcher,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl RaftNode {
    /// The current leader as this node knows it.
    pub fn leader(&self) -> Option<(NodeId, ServerNode)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id).cloned()?;
        Some((id, node))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    pub fn leader_addr(&self) -> Option<SocketAddr> {
        self.leader().and_then(|(_, n)| n.socket_addr())
    }

    /// Voters and learners of the current configuration: (id, node, is voter).
    pub fn members(&self) -> Vec<(NodeId, ServerNode, bool)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership.nodes().map(|(id, n)| (*id, n.clone(), voters.contains(id))).collect()
    }

    /// Replicate `command` and return its outcome and log index, from any server.
    pub async fn write(&self, command: Command) -> Result<(Outcome, u64), WriteError> {
        self.write_request(Request { now_ms: now_ms(), command }).await
    }

    pub async fn write_request(&self, req: Request) -> Result<(Outcome, u64), WriteError> {
        self.write_hops(req, 0).await
    }

    /// `write_request` for a write that has already been passed on `hops` times.
    pub async fn write_hops(&self, req: Request, hops: u8) -> Result<(Outcome, u64), WriteError> {
        let leader = if self.is_leader() {
            match self.writes.write(req.clone()).await {
                Ok(done) => return Ok(done),
                Err(super::batch::BatchError::NotLeader(leader)) => leader,
                Err(super::batch::BatchError::Raft(e)) => return Err(WriteError::Raft(e)),
            }
        } else {
            self.leader_addr()
        };
        let addr = leader.ok_or(WriteError::NoLeader)?;
        if hops >= MAX_HOPS {
            return Err(WriteError::NoLeader);
        }
        let call = ClusterRpc::Apply { req: Box::new(req), hops: hops + 1 };
        match self.rpc.call_typed::<ClusterRpc, ClusterReply>(addr, Service::Cluster, &call, FORWARD_TIMEOUT).await {
            Ok(ClusterReply::Applied { outcome, index }) => Ok((outcome, index)),
            Ok(_) => Err(WriteError::Forward(RpcError::new(ErrorCode::Internal, "unexpected reply to apply"))),
            Err(e) if e.code == ErrorCode::NoLeader => Err(WriteError::NoLeader),
            Err(e) => Err(WriteError::Forward(e)),
        }
    }

    /// The catalog entries of `node` in this server's state.
    pub fn node_state(&self, node: &str) -> NodeState {
        let store = self.store.read();
        let d = store.data();
        let (found, _) = d.node_services(node);
        let (checks, _) = d.node_checks(node);
        match found {
            Some((n, services)) => NodeState { node: Some(n), services, checks },
            None => NodeState { node: None, services: Vec::new(), checks },
        }
    }

    /// Confirm with a quorum that this node still leads and wait until its state machine has
    /// applied everything committed before now (Raft's read-index; `?consistent`).
    pub async fn verify_leader(&self) -> Result<(), WriteError> {
        self.raft.ensure_linearizable().await.map(|_| ()).map_err(|_| WriteError::NoLeader)
    }

    /// Time since this server last heard from a leader (zero on the leader itself).
    pub fn last_contact(&self) -> Option<Duration> {
        if self.is_leader() { Some(Duration::ZERO) } else { self.contacts.since_leader() }
    }

    /// The highest log index applied here.
    pub fn applied_index(&self) -> u64 {
        self.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0)
    }
}
