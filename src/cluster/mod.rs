//! The application protocol between agents (`Service::Cluster`): every request kind, what it
//! answers, and who may send it. Raft's own messages (`consensus/`) and forwarded HTTP requests
//! (`api::forward`) are the other two services; their rules live beside them.
//!
//! Who may send what, by the peer's role (decided by `rpc::Identify` from the issuing CA and
//! the certificate's name, never the name alone):
//!
//! | request | server of this DC | client agent | server of another DC |
//! |---|---|---|---|
//! | `Hello` | yes | no | yes (to learn it dialled the wrong datacenter) |
//! | `Join`, `Elect` | yes | no | no |
//! | `Apply` | any command | `Register`, `Deregister`, `CoordinateBatch` | no |
//! | `Read`, `Datacenters`, `LanPing`, `NodeState` | yes | yes | `Read` only |
//! | `Ping` | yes | no | yes |
//! | `Keyring` | yes | yes | yes (this datacenter's pool only) |
//! | `SignLeaf` | yes | yes | no |
//! | `CaRoots` | yes | yes | yes |
//! | `SignIntermediate`, `MeshState` | yes | no | yes (a secondary's leader) |
//! | `FederationStateSet` | yes | no | yes (its own datacenter's state only) |
//!
//! Anonymous peers (auto-encrypt) and certificates naming no agent of this cluster get nothing.
//!
//! Depends on `consensus` (Raft types), `state` (commands and reads) and `rpc`; the handler that
//! answers these requests is wired in `agent/`, which knows every part it needs.

pub mod batch;
pub mod node;
pub mod sessions;

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

pub use node::{RaftNode, WriteError, now_ms};

use crate::consensus::{NodeId, ServerNode};
use crate::rpc::{Peer, Role, RpcError};
use crate::state::{Command, Outcome, Request};

/// Calls between agents (`Service::Cluster`).
#[derive(Debug, Serialize, Deserialize)]
pub enum ClusterRpc {
    /// Who are you, and what do you know of the cluster?
    Hello,
    /// Add the caller to the Raft configuration as a voter (sent to the leader).
    Join { id: NodeId, node: ServerNode },
    /// Apply a write: the leader applies it, a follower passes it on (at most `MAX_HOPS` times).
    Apply { req: Box<Request>, hops: u8 },
    /// A catalog read for a client agent (DNS), or from another datacenter's server. With
    /// `dc` naming another datacenter, the receiving server passes it on there.
    Read { dc: Option<String>, query: crate::state::catalog::CatalogQuery },
    /// The datacenters this server knows, nearest first (for client agents' DNS failover).
    Datacenters,
    /// A WAN probe: the answer carries the server's network coordinate in the WAN pool.
    Ping,
    /// A probe within the datacenter: the answer carries the server's coordinate there.
    LanPing,
    /// A node's catalog entries, for a client agent's anti-entropy (read from the receiving
    /// server's state).
    NodeState { node: String },
    /// Become leader: sent by the current leader to the chosen successor.
    Elect,
    /// Install, use or remove a gossip key in the receiving server's datacenter (and, unless
    /// the sender is another datacenter's server, in every other datacenter too).
    Keyring { op: KeyringOp, key: String },
    /// Sign a service's leaf certificate request (an agent's own leaf cache).
    SignLeaf {
        #[serde(with = "serde_bytes")]
        csr: Vec<u8>,
    },
    /// This datacenter's CA roots as agents see them (no signing material).
    CaRoots,
    /// A secondary datacenter's intermediate CA, signed by the primary's active root.
    SignIntermediate {
        datacenter: String,
        #[serde(with = "serde_bytes")]
        csr: Vec<u8>,
    },
    /// The primary's CA (roots and configuration, no keys) and its config entries, for a
    /// secondary's replication; `min_index` blocks until the primary has newer.
    MeshState { min_index: u64 },
    /// A datacenter's mesh gateways, sent by its leader to the primary (which stores them).
    FederationStateSet { state: crate::state::federation::FederationState },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyringOp {
    Install,
    Use,
    Remove,
}

impl ClusterRpc {
    /// The request's name in errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ClusterRpc::Hello => "Hello",
            ClusterRpc::Join { .. } => "Join",
            ClusterRpc::Apply { .. } => "Apply",
            ClusterRpc::Read { .. } => "Read",
            ClusterRpc::Datacenters => "Datacenters",
            ClusterRpc::Ping => "Ping",
            ClusterRpc::LanPing => "LanPing",
            ClusterRpc::NodeState { .. } => "NodeState",
            ClusterRpc::Elect => "Elect",
            ClusterRpc::Keyring { .. } => "Keyring",
            ClusterRpc::SignLeaf { .. } => "SignLeaf",
            ClusterRpc::CaRoots => "CaRoots",
            ClusterRpc::SignIntermediate { .. } => "SignIntermediate",
            ClusterRpc::MeshState { .. } => "MeshState",
            ClusterRpc::FederationStateSet { .. } => "FederationStateSet",
        }
    }

    /// Whether a peer in `role` may send this request (the table in the module docs).
    pub fn allowed_from(&self, role: &Role) -> bool {
        use ClusterRpc::*;
        match role {
            Role::Server => true,
            Role::Client => match self {
                Apply { req, .. } => client_may_apply(&req.command),
                Read { .. } | Datacenters | LanPing | NodeState { .. } | Keyring { .. } | SignLeaf { .. } | CaRoots => true,
                Hello | Join { .. } | Ping | Elect | SignIntermediate { .. } | MeshState { .. } | FederationStateSet { .. } => false,
            },
            // Another datacenter may read, probe, pass on keyring changes, and (a secondary's
            // leader) have its intermediate signed and replicate the mesh's state.
            Role::RemoteServer(dc) => match self {
                Hello | Read { .. } | Ping | Keyring { .. } | SignIntermediate { .. } | MeshState { .. } | CaRoots => true,
                // A datacenter publishes its own gateways, nobody else's.
                FederationStateSet { state } => state.datacenter.eq_ignore_ascii_case(dc),
                _ => false,
            },
            Role::Anonymous | Role::Other => false,
        }
    }

    /// `Ok` when `peer` may send this request, else the refusal to send back.
    pub fn authorize(&self, peer: &Peer) -> Result<(), RpcError> {
        if self.allowed_from(&peer.role) {
            return Ok(());
        }
        let what = match self {
            ClusterRpc::Apply { req, .. } => format!("Apply of {}", req.command.name()),
            other => other.name().to_string(),
        };
        Err(crate::rpc::forbidden(what, peer))
    }
}

/// The writes a client agent makes itself: its node's catalog entries (anti-entropy) and its
/// network coordinate. Everything else reaches the servers as an HTTP request they validate.
fn client_may_apply(c: &Command) -> bool {
    // Everything else (KvReap, AgentCaInit, RestoreChunk, ...) is a server's own business.
    matches!(c, Command::Register(_) | Command::Deregister { .. } | Command::CoordinateBatch(_))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HelloInfo {
    pub id: NodeId,
    pub node: ServerNode,
    pub datacenter: String,
    pub initialized: bool,
    pub leader: Option<(NodeId, ServerNode)>,
    pub voters: BTreeSet<NodeId>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ClusterReply {
    Hello(HelloInfo),
    Joined,
    Applied {
        outcome: Outcome,
        index: u64,
    },
    NodeState(Box<NodeState>),
    Read(Box<crate::state::catalog::CatalogAnswer>),
    Datacenters(Vec<String>),
    Pong {
        node: String,
        datacenter: String,
        coord: crate::coordinate::Coordinate,
    },
    Elected,
    /// A keyring change was made; `failed` lists the datacenters where it was not.
    Keyring {
        failed: Vec<String>,
    },
    Leaf(Box<SignedLeaf>),
    /// The CA with its signing material removed.
    CaRoots(Option<Box<crate::state::mesh::ConnectCa>>),
    Intermediate {
        cert_pem: String,
    },
    MeshState(Box<MeshState>),
}

/// A signed leaf, as a server returns it to an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedLeaf {
    pub cert_pem: String,
    pub serial: String,
    pub service_uri: String,
    pub valid_after_ms: u64,
    pub valid_before_ms: u64,
}

/// What a secondary replicates from the primary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshState {
    /// The primary's CA, keys removed.
    pub ca: Option<crate::state::mesh::ConnectCa>,
    pub entries: Vec<crate::state::mesh::ConfigEntry>,
    /// Every datacenter's federation state.
    #[serde(default)]
    pub federation_states: Vec<crate::state::federation::FederationState>,
    /// The primary's index of these tables.
    pub index: u64,
}

/// What the catalog holds for one node.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct NodeState {
    pub node: Option<std::sync::Arc<crate::state::Node>>,
    pub services: Vec<std::sync::Arc<crate::state::Service>>,
    pub checks: Vec<std::sync::Arc<crate::state::HealthCheck>>,
}

/// How many times a write may be passed between servers before it is refused, so that
/// servers with momentarily different views of the leader cannot bounce it forever.
pub const MAX_HOPS: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AgentCa, Registration};

    fn every_request() -> Vec<ClusterRpc> {
        let apply = |command| ClusterRpc::Apply { req: Box::new(Request { now_ms: 0, command }), hops: 0 };
        vec![
            ClusterRpc::Hello,
            ClusterRpc::Join { id: 1, node: ServerNode::default() },
            apply(Command::Register(Registration::default())),
            apply(Command::RestoreCommit { id: "r".into(), sha256: Vec::new() }),
            apply(Command::AgentCaInit(AgentCa { cert_pem: String::new(), key_pem: String::new() })),
            apply(Command::Txn(Vec::new())),
            ClusterRpc::Read { dc: None, query: crate::state::catalog::CatalogQuery::Node { name: "n".into() } },
            ClusterRpc::Datacenters,
            ClusterRpc::Ping,
            ClusterRpc::LanPing,
            ClusterRpc::NodeState { node: "n".into() },
            ClusterRpc::Elect,
            ClusterRpc::Keyring { op: KeyringOp::Use, key: String::new() },
            ClusterRpc::SignLeaf { csr: Vec::new() },
            ClusterRpc::SignIntermediate { datacenter: "dc2".into(), csr: Vec::new() },
            ClusterRpc::MeshState { min_index: 0 },
            ClusterRpc::CaRoots,
            ClusterRpc::FederationStateSet { state: crate::state::federation::FederationState { datacenter: "dc2".into(), ..Default::default() } },
        ]
    }

    #[test]
    fn only_servers_of_this_datacenter_may_send_everything() {
        for r in every_request() {
            assert!(r.allowed_from(&Role::Server), "{}", r.name());
            assert!(!r.allowed_from(&Role::Anonymous), "{}", r.name());
            assert!(!r.allowed_from(&Role::Other), "{}", r.name());
        }
    }

    #[test]
    fn client_agents_may_not_restore_join_or_initialise_the_ca() {
        let allowed: Vec<String> = every_request()
            .iter()
            .filter(|r| r.allowed_from(&Role::Client))
            .map(|r| match r {
                ClusterRpc::Apply { req, .. } => format!("Apply {}", req.command.name()),
                r => r.name().to_string(),
            })
            .collect();
        assert_eq!(allowed, ["Apply Register", "Read", "Datacenters", "LanPing", "NodeState", "Keyring", "SignLeaf", "CaRoots"]);
    }

    #[test]
    fn other_datacenters_may_only_read_probe_and_change_keys() {
        let remote = Role::RemoteServer("dc2".into());
        let allowed: Vec<&str> = every_request().iter().filter(|r| r.allowed_from(&remote)).map(|r| r.name()).collect();
        assert_eq!(allowed, ["Hello", "Read", "Ping", "Keyring", "SignIntermediate", "MeshState", "CaRoots", "FederationStateSet"]);
        // Another datacenter's state is not dc2's to publish.
        let forged =
            ClusterRpc::FederationStateSet { state: crate::state::federation::FederationState { datacenter: "dc3".into(), ..Default::default() } };
        assert!(!forged.allowed_from(&remote));
    }
}
