//! Raft's network over internal RPC: the client side (`RaftNetworkFactory`) and the handler
//! that feeds incoming Raft messages to the local `Raft`.

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use openraft::error::{InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use serde::{Deserialize, Serialize};

use super::{NodeId, Raft, ServerNode, TypeConfig};
use crate::rpc::{self, ErrorCode, Handler, Peer, RpcClient, RpcError, Service};

#[derive(Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// Asked before an election (see `election`); never changes the receiver's state.
    PreVote(super::election::PreVote),
}

#[derive(Serialize, Deserialize)]
pub enum RaftReply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    PreVote(bool),
}

/// Last time each peer answered us, which autopilot reads to judge server health.
#[derive(Clone)]
pub struct ContactLog {
    inner: Arc<Mutex<std::collections::HashMap<NodeId, Instant>>>,
    /// When this node last heard from a leader (for `X-Consul-LastContact` on followers).
    leader: Arc<Mutex<Option<Instant>>>,
    started: Instant,
}

impl Default for ContactLog {
    fn default() -> ContactLog {
        ContactLog { inner: Default::default(), leader: Default::default(), started: Instant::now() }
    }
}

impl ContactLog {
    pub fn record(&self, id: NodeId) {
        self.inner.lock().insert(id, Instant::now());
    }
    pub fn since(&self, id: NodeId) -> Option<Duration> {
        self.inner.lock().get(&id).map(|t| t.elapsed())
    }
    pub fn heard_from_leader(&self) {
        *self.leader.lock() = Some(Instant::now());
    }
    pub fn since_leader(&self) -> Option<Duration> {
        self.leader.lock().map(|t| t.elapsed())
    }
    /// How long this node has gone without a leader: since the last one was heard, or since
    /// start when none has been yet.
    pub fn quiet_for(&self) -> Duration {
        self.since_leader().unwrap_or_else(|| self.started.elapsed())
    }
}

#[derive(Clone)]
pub struct Network {
    pub client: RpcClient,
    pub contacts: ContactLog,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &ServerNode) -> Self::Network {
        PeerConnection { target, addr: node.socket_addr(), net: self.clone() }
    }
}

pub struct PeerConnection {
    target: NodeId,
    addr: Option<SocketAddr>,
    net: Network,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, ServerNode, E>>;

/// The most entry bytes one append carries (a lone bigger entry goes alone). openraft 0.9 gives
/// an append one heartbeat interval to complete, the follower's fsync included, and heartbeats
/// and votes share the connection: big enough to batch thousands of small writes, small
/// enough to stay well inside that.
const APPEND_FRAME_BUDGET: usize = 1 << 20;

impl PeerConnection {
    async fn send<E: std::error::Error>(&self, req: RaftRpc, timeout: Duration) -> RpcResult<RaftReply, E> {
        let body = rpc::encode(&req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.send_encoded(body, timeout).await
    }

    async fn send_encoded<E: std::error::Error>(&self, body: Vec<u8>, timeout: Duration) -> RpcResult<RaftReply, E> {
        let Some(addr) = self.addr else {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "peer has no valid rpc address");
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let reply = self.net.client.call(addr, Service::Raft, body, timeout).await.and_then(|b| rpc::decode::<RaftReply>(&b));
        match reply {
            Ok(r) => {
                self.net.contacts.record(self.target);
                Ok(r)
            }
            Err(e) if e.code == ErrorCode::Unreachable => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

fn unexpected<E: std::error::Error>() -> RPCError<NodeId, ServerNode, E> {
    RPCError::Network(NetworkError::new(&RpcError::new(ErrorCode::Internal, "mismatched raft reply")))
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        let entries = rpc.entries.len();
        let body = rpc::encode(&RaftRpc::Append(rpc)).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if body.len() > APPEND_FRAME_BUDGET && entries > 1 {
            // Too many (large) entries for one message: ask openraft to send fewer, in proportion.
            let fits = (entries as u128 * APPEND_FRAME_BUDGET as u128 / body.len() as u128).max(1) as u64;
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fits)));
        }
        match self.send_encoded(body, option.hard_ttl()).await? {
            RaftReply::Append(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        match self.send(RaftRpc::Snapshot(rpc), option.hard_ttl()).await? {
            RaftReply::Snapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(unexpected()),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>, RaftError<NodeId>> {
        match self.send(RaftRpc::Vote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(unexpected()),
        }
    }
}

/// Serves `Service::Raft` for the local Raft node; only servers of our datacenter may call it.
pub struct RaftHandler {
    pub raft: Raft,
    pub contacts: ContactLog,
    /// The leader lease: pre-votes are granted only after this long without a leader.
    pub lease: Duration,
}

impl Handler for RaftHandler {
    fn handle(&self, peer: Peer, body: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
        let raft = self.raft.clone();
        let contacts = self.contacts.clone();
        let lease = self.lease;
        async move {
            if !peer.is_server() {
                return Err(RpcError::new(ErrorCode::Forbidden, "raft messages are accepted only from servers of this datacenter"));
            }
            let reply = match rpc::decode::<RaftRpc>(&body)? {
                RaftRpc::Append(r) => {
                    let res = raft.append_entries(r).await;
                    if res.is_ok() {
                        contacts.heard_from_leader();
                    }
                    RaftReply::Append(res)
                }
                RaftRpc::Vote(r) => RaftReply::Vote(raft.vote(r).await),
                RaftRpc::Snapshot(r) => RaftReply::Snapshot(raft.install_snapshot(r).await),
                RaftRpc::PreVote(r) => RaftReply::PreVote(super::election::answer(&raft, &contacts, lease, &r)),
            };
            rpc::encode(&reply)
        }
        .boxed()
    }
}
