//! Answers the cluster protocol (`Service::Cluster`, defined with its sender rules in
//! `crate::cluster`): introductions for bootstrap and join, adding a server to Raft, applying
//! forwarded writes, reads for client agents and other datacenters, probes, keyring changes,
//! and taking over leadership. Every request is checked against its sender rule first.

use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use openraft::ChangeMembers;
use tracing::info;

use crate::cluster::{ClusterReply, ClusterRpc, HelloInfo, RaftNode, WriteError};
use crate::rpc::Role;
use crate::rpc::{self, ErrorCode, Handler, Peer, RpcError};

/// How long a server asked to take over leadership keeps calling elections.
const ELECT_DEADLINE: Duration = Duration::from_secs(8);
const ELECT_RETRY: Duration = Duration::from_millis(50);

pub struct ClusterHandler {
    pub node: RaftNode,
    pub datacenter: String,
    pub federation: crate::federation::Router,
    pub lan: super::coordinates::LanCoordinate,
    /// Keyring changes go through the agent's gossip pools.
    pub agent: std::sync::Arc<super::ops::AgentHandle>,
    /// Leaf and intermediate signing, and the mesh state secondaries replicate.
    pub signer: std::sync::Arc<super::mesh::Signer>,
    /// Whether this is the primary datacenter (the one that signs intermediates).
    pub primary: bool,
}

pub fn hello(node: &RaftNode, datacenter: &str) -> HelloInfo {
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    HelloInfo {
        id: node.id,
        node: node.me.clone(),
        datacenter: datacenter.to_string(),
        initialized: m.membership_config.log_id().is_some() || m.last_log_index.is_some(),
        leader: node.leader(),
        voters: membership.voter_ids().collect(),
    }
}

/// Add a server as a voter: first as a learner that catches up, then promoted.
pub async fn add_voter(node: &RaftNode, id: u64, server: crate::consensus::ServerNode) -> Result<(), RpcError> {
    let err = |e: String| RpcError::new(ErrorCode::Internal, e);
    if !node.is_leader() {
        return Err(RpcError::new(ErrorCode::NoLeader, "not the leader"));
    }
    let members = node.members();
    if members.iter().any(|(mid, _, voter)| *mid == id && *voter) {
        return Ok(());
    }
    info!(server = %server, "adding server to the raft configuration");
    node.raft.add_learner(id, server, true).await.map_err(|e| err(e.to_string()))?;
    node.raft.change_membership(ChangeMembers::AddVoterIds([id].into()), false).await.map_err(|e| err(e.to_string()))?;
    Ok(())
}

impl Handler for ClusterHandler {
    fn handle(&self, peer: Peer, body: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
        let node = self.node.clone();
        let dc = self.datacenter.clone();
        let federation = self.federation.clone();
        let lan = self.lan.clone();
        let agent = self.agent.clone();
        let signer = self.signer.clone();
        let primary = self.primary;
        async move {
            let req: ClusterRpc = rpc::decode(&body)?;
            req.authorize(&peer)?;
            let reply = match req {
                ClusterRpc::Hello => ClusterReply::Hello(hello(&node, &dc)),
                ClusterRpc::Apply { req, hops } => {
                    let (outcome, index) = node.write_hops(*req, hops).await.map_err(|e| match e {
                        WriteError::NoLeader => RpcError::new(ErrorCode::NoLeader, "No cluster leader"),
                        other => RpcError::new(ErrorCode::Internal, other.to_string()),
                    })?;
                    ClusterReply::Applied { outcome, index }
                }
                ClusterRpc::Read { dc: Some(remote), query } if !federation.is_local(&remote) => {
                    ClusterReply::Read(Box::new(federation.read(&remote, query).await?))
                }
                ClusterRpc::Read { query, .. } => ClusterReply::Read(Box::new(node.store.read().data().answer(&query))),
                ClusterRpc::Datacenters => ClusterReply::Datacenters(federation.datacenters()),
                ClusterRpc::Ping => federation.pong(),
                ClusterRpc::LanPing => ClusterReply::Pong { node: node.me.name.clone(), datacenter: dc.clone(), coord: lan.get() },
                ClusterRpc::NodeState { node: name } => ClusterReply::NodeState(Box::new(node.node_state(&name))),
                ClusterRpc::SignLeaf { csr } => ClusterReply::Leaf(Box::new(signer.sign_leaf(&csr).await?)),
                ClusterRpc::CaRoots => {
                    ClusterReply::CaRoots(node.store.read().data().connect_ca.as_ref().map(|c| Box::new(super::mesh::public_ca(c))))
                }
                ClusterRpc::SignIntermediate { datacenter, csr } => {
                    if !primary {
                        return Err(RpcError::new(
                            ErrorCode::BadRequest,
                            format!("datacenter {dc} is not the primary: intermediates are signed there"),
                        ));
                    }
                    ClusterReply::Intermediate { cert_pem: signer.sign_intermediate(&datacenter, &csr)? }
                }
                ClusterRpc::MeshState { min_index } => ClusterReply::MeshState(Box::new(signer.mesh_state(min_index).await)),
                ClusterRpc::FederationStateSet { state } => {
                    if !primary {
                        return Err(RpcError::new(
                            ErrorCode::BadRequest,
                            format!("datacenter {dc} is not the primary: federation states are stored there"),
                        ));
                    }
                    let (outcome, index) = node.write(crate::state::Command::FederationStateSet { state }).await.map_err(|e| match e {
                        WriteError::NoLeader => RpcError::new(ErrorCode::NoLeader, "No cluster leader"),
                        other => RpcError::new(ErrorCode::Internal, other.to_string()),
                    })?;
                    ClusterReply::Applied { outcome, index }
                }
                ClusterRpc::Keyring { op, key } => {
                    // A change another datacenter's server passes on stays in this datacenter.
                    let fan_out = !matches!(peer.role, Role::RemoteServer(_));
                    let failed = agent.keyring_in_cluster(op, key, fan_out).await.map_err(|e| RpcError::new(ErrorCode::BadRequest, e))?;
                    ClusterReply::Keyring { failed }
                }
                ClusterRpc::Join { id, node: server } => {
                    add_voter(&node, id, server).await?;
                    ClusterReply::Joined
                }
                ClusterRpc::Elect => {
                    let start = Instant::now();
                    while !node.is_leader() {
                        if start.elapsed() > ELECT_DEADLINE {
                            return Err(RpcError::new(ErrorCode::Timeout, "did not win the election in time"));
                        }
                        let _ = node.raft.trigger().elect().await;
                        let mut m = node.raft.metrics();
                        let _ = tokio::time::timeout(ELECT_RETRY, m.changed()).await;
                    }
                    ClusterReply::Elected
                }
            };
            rpc::encode(&reply)
        }
        .boxed()
    }
}
