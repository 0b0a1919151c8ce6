//! The commands that Raft replicates and the outcomes that applying them produces.

use serde::{Deserialize, Serialize};

use super::types::{AgentCa, AutopilotConfig, HealthCheck, KvEntry, Node, Service, Session};

/// One replicated write: the command plus the proposer's wall clock, so that everything
/// time-dependent (lock delays) is decided once, by the leader, and replayed identically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub now_ms: u64,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Catalog register: a node with optional service and checks (Consul's `RegisterRequest`).
    Register(Registration),
    /// Catalog deregister: the whole node, or one of its services, or one of its checks.
    Deregister {
        node: String,
        service_id: Option<String>,
        check_id: Option<String>,
    },
    /// KV operations, applied atomically; a single-key write is a transaction of one op.
    Txn(Vec<TxnOp>),
    SessionCreate(Session),
    SessionDestroy {
        id: String,
    },
    AutopilotSetConfig {
        config: AutopilotConfig,
        cas: Option<u64>,
    },
    /// Network coordinates reported by agents: (node, coordinate).
    CoordinateBatch(Vec<(String, crate::coordinate::Coordinate)>),
    /// Create a prepared query (or replace one with the same ID).
    QuerySet(super::query::PreparedQuery),
    /// Replace an existing prepared query; rejected when it no longer exists.
    QueryUpdate(super::query::PreparedQuery),
    QueryDelete {
        id: String,
    },
    /// Forget KV tombstones at or below `up_to` (the leader's tombstone GC, once they are older
    /// than the tombstone TTL: blocking readers of a deleted key have had their chance).
    KvReap {
        up_to: u64,
    },
    /// Install the Connect CA state, over the version `expect` (0: only if none exists).
    CaSet {
        ca: Box<super::mesh::ConnectCa>,
        expect: u64,
    },
    /// Write a config entry (with `cas`: only over that modify index, 0 for "only if absent").
    ConfigSet {
        entry: super::mesh::ConfigEntry,
        cas: Option<u64>,
    },
    ConfigDelete {
        kind: String,
        name: String,
        cas: Option<u64>,
    },
    /// A secondary's copy of the primary's config entries: the whole set.
    ConfigReplicate {
        entries: Vec<super::mesh::ConfigEntry>,
    },
    /// A datacenter's mesh gateways (the primary's own, or a secondary's via the primary).
    FederationStateSet {
        state: super::federation::FederationState,
    },
    FederationStateDelete {
        datacenter: String,
    },
    /// A secondary's copy of the primary's federation states: the whole set.
    FederationReplicate {
        states: Vec<super::federation::FederationState>,
    },
    /// Create the auto-encrypt CA unless one exists.
    AgentCaInit(AgentCa),
    /// One piece of a snapshot being restored (the postcard encoding of a `StateData`, split so
    /// that no log entry outgrows an RPC frame). `seq` 0 starts a new restore.
    RestoreChunk {
        id: String,
        seq: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Replace the whole state with the restore `id` staged so far, whose bytes must hash to
    /// `sha256`.
    RestoreCommit {
        id: String,
        sha256: Vec<u8>,
    },
    /// Many client writes in one log entry (group commit, `cluster::batch`): applied in order,
    /// each with its own clock and outcome, all at the entry's index. Never nested, and never
    /// holding restore chunks (those are sized to one entry each).
    Batch(Vec<Request>),
}

impl Command {
    /// The command's name in errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Register(_) => "Register",
            Command::Deregister { .. } => "Deregister",
            Command::Txn(_) => "Txn",
            Command::SessionCreate(_) => "SessionCreate",
            Command::SessionDestroy { .. } => "SessionDestroy",
            Command::AutopilotSetConfig { .. } => "AutopilotSetConfig",
            Command::CoordinateBatch(_) => "CoordinateBatch",
            Command::QuerySet(_) => "QuerySet",
            Command::QueryUpdate(_) => "QueryUpdate",
            Command::QueryDelete { .. } => "QueryDelete",
            Command::KvReap { .. } => "KvReap",
            Command::CaSet { .. } => "CaSet",
            Command::ConfigSet { .. } => "ConfigSet",
            Command::ConfigDelete { .. } => "ConfigDelete",
            Command::ConfigReplicate { .. } => "ConfigReplicate",
            Command::FederationStateSet { .. } => "FederationStateSet",
            Command::FederationStateDelete { .. } => "FederationStateDelete",
            Command::FederationReplicate { .. } => "FederationReplicate",
            Command::AgentCaInit(_) => "AgentCaInit",
            Command::RestoreChunk { .. } => "RestoreChunk",
            Command::RestoreCommit { .. } => "RestoreCommit",
            Command::Batch(_) => "Batch",
        }
    }

    /// Whether this command may share a log entry with others.
    pub fn batchable(&self) -> bool {
        !matches!(self, Command::RestoreChunk { .. } | Command::RestoreCommit { .. } | Command::Batch(_))
    }

    /// Roughly how many bytes the command takes in a log entry: its payloads (values, chunks,
    /// definitions) plus a fixed allowance. Enough to keep a batch's entry within bounds.
    pub fn approx_bytes(&self) -> usize {
        const BASE: usize = 256;
        match self {
            Command::Txn(ops) => ops.iter().map(|o| BASE + o.key.len() + o.value.as_ref().map_or(0, Vec::len)).sum(),
            Command::Register(r) => BASE * (2 + r.checks.len()),
            Command::RestoreChunk { bytes, .. } => BASE + bytes.len(),
            Command::Batch(reqs) => reqs.iter().map(|r| r.command.approx_bytes()).sum(),
            Command::CoordinateBatch(c) => BASE * (1 + c.len()),
            Command::ConfigReplicate { entries } => BASE * (1 + entries.len()) * 4,
            Command::FederationReplicate { states } => BASE * (1 + states.len()) * 4,
            _ => BASE * 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Registration {
    pub node: Node,
    pub service: Option<Service>,
    pub checks: Vec<HealthCheck>,
    /// Leave the node row alone if it exists (agents registering services use this).
    pub skip_node_update: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvVerb {
    Set,
    Cas,
    Lock,
    Unlock,
    Get,
    GetTree,
    CheckIndex,
    CheckSession,
    CheckNotExists,
    Delete,
    DeleteTree,
    DeleteCas,
}

impl KvVerb {
    pub fn parse(s: &str) -> Option<KvVerb> {
        Some(match s {
            "set" => KvVerb::Set,
            "cas" => KvVerb::Cas,
            "lock" => KvVerb::Lock,
            "unlock" => KvVerb::Unlock,
            "get" => KvVerb::Get,
            "get-tree" => KvVerb::GetTree,
            "check-index" => KvVerb::CheckIndex,
            "check-session" => KvVerb::CheckSession,
            "check-not-exists" => KvVerb::CheckNotExists,
            "delete" => KvVerb::Delete,
            "delete-tree" => KvVerb::DeleteTree,
            "delete-cas" => KvVerb::DeleteCas,
            _ => return None,
        })
    }

    pub fn is_write(self) -> bool {
        !matches!(self, KvVerb::Get | KvVerb::GetTree | KvVerb::CheckIndex | KvVerb::CheckSession | KvVerb::CheckNotExists)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOp {
    pub verb: KvVerb,
    pub key: String,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    pub flags: u64,
    /// The index for `cas`, `check-index` and `delete-cas`.
    pub index: u64,
    pub session: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnError {
    pub op_index: usize,
    pub what: String,
    /// A failed condition (stale CAS, held lock) rather than an invalid request: a single-key
    /// write reports it as `false`, not as an error.
    pub conflict: bool,
}

/// What applying a command produced; errors here are deterministic refusals, not failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub enum Outcome {
    #[default]
    Done,
    /// A conditional write: whether it took effect (CAS, acquire, release).
    Applied(bool),
    /// A transaction: the entries read or written, or the ops that failed.
    Txn(Result<Vec<KvEntry>, Vec<TxnError>>),
    /// A refused command, with the reason users see.
    Rejected(String),
    /// A `Command::Batch`: each request's outcome, in order.
    Batch(Vec<Outcome>),
}
