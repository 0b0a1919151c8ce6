//! The DNS interface: Consul's DNS semantics served over UDP and TCP with hickory-server.
//!
//! The module is self-contained: it answers from a narrow [`DnsCatalog`] trait that the agent
//! implements (servers from their local state, clients over RPC), so nothing here knows about
//! Raft, RPC or the state store.
//!
//! # Names answered (Consul's forms, all case-insensitive, `<domain>` or `<alt_domain>`)
//!
//! | name | answer |
//! | --- | --- |
//! | `[<tag>.]<svc>.service[.<dc>[.dc]].<domain>` | A/AAAA (or CNAME) of the healthy instances; SRV with the address in the additional section |
//! | `_<svc>._<tag or tcp>[.service][.<dc>[.dc]].<domain>` | RFC 2782 form of the same (`_tcp` means "no tag filter") |
//! | `<node>.node[.<dc>[.dc]].<domain>` | A/AAAA (or CNAME) of the node, TXT from its metadata |
//! | `<hex>.addr[.<dc>].<domain>` | A for 8 hex digits, AAAA for 32 |
//! | `<name or id>.query[.<dc>].<domain>` | a prepared query, answered like a service |
//! | `<domain>` | SOA and NS |
//! | `*.in-addr.arpa`, `*.ip6.arpa` | PTR to the node (or service) name of a catalog address |
//! | anything else | forwarded to the recursors, or REFUSED when there are none |
//!
//! # On the wire
//!
//! Every local answer is authoritative. A name under the domain that does not exist gets
//! NXDOMAIN, a name that exists without records of the asked type gets NOERROR with no answers
//! (NODATA); both carry the domain's SOA in the authority section (RFC 2308). Answers are
//! shuffled for load spreading. A UDP answer is cut to the client's buffer (512 bytes, or its
//! EDNS0 size) and a TCP answer to 64 KiB; when answer records are dropped to fit, the TC bit is
//! set, so the client can retry over TCP (Consul drops them silently unless `enable_truncate`).
//! Two Consul policies still trim on purpose, and set TC only with `enable_truncate`, as in
//! Consul: `udp_answer_limit` (non-EDNS UDP answers only) and `a_record_limit`.
//!
//! Where this deliberately differs from Consul 1.x: SOA and NS are answered at the domain apex
//! only (Consul answers them for every name in the domain, with the apex as owner); the apex and
//! known names with an unsupported type answer NODATA with SOA instead of NXDOMAIN or a bare
//! NOERROR; unparseable questions (no question, several questions) answer FORMERR; zone
//! transfers answer NOTIMP everywhere.
//!
//! hickory-server logs every request at `info`; the agent's log filter should carry
//! `hickory_server=warn` (see [`LOG_FILTER_DIRECTIVES`]).

mod handler;
mod names;
mod records;
mod recursor;
mod udp;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;

pub use crate::config::dns::{DnsConfig, SoaConfig};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use tokio_util::sync::CancellationToken;

use handler::Handler;

/// Log filter directives the agent should add so hickory's per-request `info` lines stay out of
/// the log (they cost more than answering a cached query).
pub const LOG_FILTER_DIRECTIVES: &str = "hickory_server=warn,hickory_net=warn,hickory_proto=warn";

/// How long a TCP connection may stay idle between queries before the server closes it.
/// RFC 7766 §6.2.3 asks for "on the order of seconds"; this keeps idle clients from pinning
/// connection tasks while allowing a resolver to reuse its connection for a burst.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Outgoing messages buffered per TCP connection before the writer applies back-pressure.
const TCP_RESPONSE_BUFFER: usize = 32;

/// What DNS needs from the catalog; the agent implements it (servers from local state, clients
/// over RPC).
///
/// Names arrive lowercased (DNS is case-insensitive), so implementations must match service,
/// tag, node, datacenter and query names case-insensitively, as Consul's catalog does.
#[async_trait::async_trait]
pub trait DnsCatalog: Send + Sync + 'static {
    /// Instances of `service` in `dc` (None = the agent's own dc) with their worst check status,
    /// optionally only with `tag`.
    async fn service_instances(&self, dc: Option<&str>, service: &str, tag: Option<&str>) -> Result<Vec<Instance>, LookupError>;
    /// The instances that accept a service's mesh connections: its sidecar proxies and its
    /// connect-native instances (`<service>.connect.<domain>`). None by default.
    async fn connect_instances(&self, _dc: Option<&str>, _service: &str) -> Result<Vec<Instance>, LookupError> {
        Ok(Vec::new())
    }
    /// The node `name` in `dc` (None = the agent's own dc), `Ok(None)` when there is no such node.
    async fn node(&self, dc: Option<&str>, name: &str) -> Result<Option<NodeInfo>, LookupError>;
    /// Nodes and service instances whose address is `ip` (for PTR), in the agent's own dc.
    async fn by_address(&self, ip: IpAddr) -> Result<Vec<PtrTarget>, LookupError>;
    /// Execute a prepared query by name or ID (`Ok(None)` if there is no such query); `source`
    /// is the asking client's address, for `Near = "_ip"`.
    async fn prepared_query(&self, dc: Option<&str>, name: &str, source: Option<IpAddr>) -> Result<Option<QueryResult>, LookupError>;
    /// The agent's own datacenter.
    fn datacenter(&self) -> String;
    /// A number that changes whenever any answer could (the catalog's Raft index), when this
    /// catalog has one that is cheap to read: encoded answers are cached per generation. `None`
    /// turns the answer cache off.
    fn generation(&self) -> Option<u64> {
        None
    }
}

/// The aggregated health of one service instance: the worst of its node's and its own checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Passing,
    Warning,
    /// Also what maintenance mode maps to: never answered.
    Critical,
}

/// One instance of a service, as DNS needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub node: String,
    /// The node's address: an IP, or a hostname (answered as a CNAME).
    pub node_address: String,
    /// The service's own address; empty means "use the node address".
    pub service_address: String,
    pub port: u16,
    pub status: Health,
    pub node_meta: BTreeMap<String, String>,
    /// Datacenter of the instance (used in SRV target names); empty means the agent's own.
    pub datacenter: String,
}

/// A node, as DNS needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// An IP, or a hostname (answered as a CNAME).
    pub address: String,
    pub meta: BTreeMap<String, String>,
    /// Empty means the agent's own datacenter.
    pub datacenter: String,
}

/// Something whose address matched a PTR question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtrTarget {
    /// Answered as `<name>.node.<dc>.<domain>`.
    Node { name: String, dc: String },
    /// Answered as `<service>.service.<dc>.<domain>` (only when no node matched, as in Consul).
    Service { service: String, node: String, dc: String },
}

/// The outcome of executing a prepared query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryResult {
    /// The instances the query selected (critical ones are dropped here anyway).
    pub instances: Vec<Instance>,
    /// The query's own `DNS.TTL`; when `None` the agent's `service_ttl` for `service` applies.
    pub ttl: Option<Duration>,
    /// The query's `OnlyPassing`: drop instances whose status is warning.
    pub only_passing: bool,
    /// The service the query resolved (for the `service_ttl` fallback, as in Consul).
    pub service: String,
    /// The instances are already in answer order (the query sorts `Near` a node): keep it
    /// instead of shuffling.
    pub ordered: bool,
}

/// Why the catalog could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The datacenter in the name is not known: NXDOMAIN, as Consul answers "no path to dc".
    #[error("unknown datacenter")]
    UnknownDatacenter,
    /// The catalog could not be reached or failed: SERVFAIL.
    #[error("catalog unavailable: {0}")]
    Unavailable(String),
}

/// The DNS server: owns the config and the catalog, serves one UDP socket and one TCP listener.
pub struct DnsServer {
    handler: Handler,
    catalog: Arc<dyn DnsCatalog>,
}

impl DnsServer {
    /// `node_name` is the agent's own node, used for the NS record when no server instances
    /// of the `consul` service are registered.
    pub fn new(cfg: DnsConfig, catalog: Arc<dyn DnsCatalog>, node_name: String) -> Self {
        Self { handler: Handler::new(cfg, catalog.clone(), node_name), catalog }
    }

    /// Answer one UDP datagram as the server would (for fuzzing and tests): `None` when it is
    /// dropped.
    pub async fn answer_datagram(&self, bytes: Vec<u8>, src: std::net::SocketAddr) -> Option<Vec<u8>> {
        udp::respond(&self.handler, bytes, src, hickory_server::net::xfer::Protocol::Udp).await
    }

    /// Serve queries on the bound `udp` socket and `tcp` listener until `shutdown` is
    /// cancelled. Returns an error only if a socket fails for good.
    pub async fn run(self, udp: tokio::net::UdpSocket, tcp: tokio::net::TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
        // UDP runs our own loop with the answer cache; TCP is hickory's server.
        let udp_task = tokio::spawn(udp::serve(udp, self.handler.clone(), self.catalog, shutdown.clone()));
        let mut server = Server::new(self.handler);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        let server_token = server.shutdown_token().clone();
        let relay = tokio::spawn(async move {
            shutdown.cancelled().await;
            server_token.cancel();
        });
        let result = server.block_until_done().await;
        relay.abort();
        let _ = udp_task.await;
        result.map_err(|e| std::io::Error::other(e.to_string()))
    }
}
