//! Agent configuration: HCL or JSON files with Consul's key names, then command-line flags, then
//! validation into a typed `Config`. Every problem is reported at once, each naming its key.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod dns;

/// Raft timings, in milliseconds. A follower that has heard no leader for `election_min_ms`
/// (the leader lease) plus a random part of `election_max_ms - election_min_ms` asks for a
/// pre-vote, then an election. The defaults suit a LAN: a dead leader is replaced within about
/// 1.2 s (seven missed heartbeats, then at most 0.4 s of jitter), while a live one, however
/// busy, is never deposed by a follower that froze or restarted.
///
/// Also how much log a server keeps: every `snapshot_interval` (plus up to as much again, at
/// random) a server snapshots if `snapshot_threshold` entries have been applied since the last
/// one, and `trailing_logs` entries are kept behind it so that a follower a little behind
/// catches up from the log rather than from a whole snapshot.
#[derive(Debug, Clone)]
pub struct RaftTimings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    pub snapshot_threshold: u64,
    /// How often the entry count is checked (Consul's `raft_snapshot_interval`).
    pub snapshot_interval: std::time::Duration,
    pub trailing_logs: u64,
    /// Snapshot once the log holds this many bytes, however few entries.
    pub snapshot_log_bytes: u64,
}

pub const DEFAULT_RAFT_TIMINGS: RaftTimings = RaftTimings {
    heartbeat_ms: 100,
    election_min_ms: 700,
    election_max_ms: 1100,
    snapshot_threshold: 8192,
    snapshot_interval: std::time::Duration::from_secs(30),
    trailing_logs: 1000,
    snapshot_log_bytes: 64 << 20,
};

/// Bounds of `raft_snapshot_log_bytes`: 1 MiB to 64 GiB.
const RAFT_LOG_BYTES_LIMITS: std::ops::RangeInclusive<u64> = (1 << 20)..=(64 << 30);

/// Bounds of `raft_snapshot_threshold` and `raft_trailing_logs`.
const RAFT_LOG_LIMITS: std::ops::RangeInclusive<u64> = 16..=10_000_000;

/// Autopilot settings the first leader stores (Consul's `autopilot` block and defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutopilotSettings {
    pub cleanup_dead_servers: bool,
    /// Go duration string.
    pub last_contact_threshold: String,
    pub max_trailing_logs: u64,
    pub min_quorum: u64,
    /// Go duration string.
    pub server_stabilization_time: String,
}

impl Default for AutopilotSettings {
    fn default() -> Self {
        AutopilotSettings {
            cleanup_dead_servers: true,
            last_contact_threshold: "200ms".into(),
            max_trailing_logs: 250,
            min_quorum: 0,
            server_stabilization_time: "10s".into(),
        }
    }
}

/// Consul's default ports, so that existing firewall rules and tools fit.
pub const DEFAULT_HTTP_PORT: u16 = 8500;
pub const DEFAULT_DNS_PORT: u16 = 8600;
pub const DEFAULT_SERVER_PORT: u16 = 8300;
pub const DEFAULT_SERF_LAN_PORT: u16 = 8301;
pub const DEFAULT_SERF_WAN_PORT: u16 = 8302;
/// Consul's tombstone TTL: long enough for any blocking reader to see a deletion.
pub const DEFAULT_TOMBSTONE_TTL: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// Consul's anti-entropy period for clusters up to 128 nodes.
pub const DEFAULT_AE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// Consul's default for how long failed members are kept before they are reaped.
pub const DEFAULT_RECONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(72 * 3600);
pub const DEFAULT_DATACENTER: &str = "dc1";
pub const DEFAULT_DOMAIN: &str = "consul";
/// Consul's largest accepted `raft_multiplier`; 1 is tuned for a LAN.
const MAX_RAFT_MULTIPLIER: u64 = 10;

/// One configuration file as written (HCL or JSON). Unknown keys are errors.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Datacenter this agent belongs to (default "dc1").
    pub datacenter: Option<String>,
    /// The datacenter that owns ACLs, intentions, config entries and the CA root.
    pub primary_datacenter: Option<String>,
    /// This node's name (default: the host name).
    pub node_name: Option<String>,
    /// Directory for Raft's log, snapshots and the node identity.
    pub data_dir: Option<String>,
    /// Run as a server (Raft voter of its datacenter).
    pub server: Option<bool>,
    /// Number of servers to wait for before bootstrapping the cluster.
    pub bootstrap_expect: Option<usize>,
    /// Bootstrap a single-server cluster right away.
    pub bootstrap: Option<bool>,
    /// Servers to join at start, retried until one answers (address or address:port).
    pub retry_join: Option<Vec<String>>,
    /// Servers of other datacenters to join in the WAN pool (servers only).
    pub retry_join_wan: Option<Vec<String>>,
    /// Address for cluster communication (RPC).
    pub bind_addr: Option<String>,
    /// Address the HTTP API and DNS listen on.
    pub client_addr: Option<String>,
    /// Listener ports.
    pub ports: Option<RawPorts>,
    /// DNS domain (default "consul"); also names server certificates.
    pub domain: Option<String>,
    /// trace, debug, info, warn or error.
    pub log_level: Option<String>,
    /// Legacy top-level TLS files (Consul before 1.12).
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// TLS settings (Consul 1.12+ layout).
    pub tls: Option<RawTls>,
    /// Raft timing scale.
    pub performance: Option<RawPerformance>,
    /// Log entries applied since the last snapshot that trigger a new one (default 8192).
    pub raft_snapshot_threshold: Option<u64>,
    /// How often a server checks `raft_snapshot_threshold` (Go duration, default "30s").
    pub raft_snapshot_interval: Option<String>,
    /// Log entries kept behind a snapshot, for followers slightly behind (default 1000).
    pub raft_trailing_logs: Option<u64>,
    /// Trellis's own: snapshot once the Raft log holds this many bytes (default 64 MiB).
    pub raft_snapshot_log_bytes: Option<u64>,
    /// A second DNS domain answered like `domain`.
    pub alt_domain: Option<String>,
    /// Upstream resolvers for names outside the domain (address or address:port).
    pub recursors: Option<Vec<String>>,
    /// How long to wait for a recursor (default 2s).
    pub recursor_timeout: Option<String>,
    /// DNS answer settings (Consul's `dns_config` block).
    pub dns_config: Option<RawDnsConfig>,
    /// Gossip encryption key (base64, 16/24/32 bytes; `trellis keygen` makes one).
    pub encrypt: Option<String>,
    /// Allow script checks (`Args`) from anywhere, the HTTP API of any host included. Kept for
    /// compatibility; prefer `enable_local_script_checks`.
    pub enable_script_checks: Option<bool>,
    /// Allow script checks only from config files and the HTTP API on a loopback address (what
    /// Consul's docs recommend).
    pub enable_local_script_checks: Option<bool>,
    /// Services to register at start (Consul's `service` blocks / `services` list).
    pub service: Option<OneOrMany>,
    pub services: Option<OneOrMany>,
    /// Node-level checks to register at start (`check` blocks / `checks` list).
    pub check: Option<OneOrMany>,
    pub checks: Option<OneOrMany>,
    /// Anti-entropy period before cluster-size scaling (Consul's internal `ae_interval`, 1m).
    pub ae_interval: Option<String>,
    /// How long failed members stay listed before they are reaped (default 72h).
    pub reconnect_timeout: Option<String>,
    /// Autopilot settings the first leader stores, unless the cluster already has some (after
    /// that, `PUT /v1/operator/autopilot/configuration` changes them).
    pub autopilot: Option<RawAutopilot>,
    /// Client agents getting their RPC certificate from the servers (Consul's `auto_encrypt`).
    pub auto_encrypt: Option<RawAutoEncrypt>,
    /// Resource limits of the HTTP API (Consul's `limits` block).
    pub limits: Option<RawLimits>,
    /// How long deleted KV keys are remembered, so that blocking prefix reads see deletions,
    /// before the leader reaps them (default 15m, Consul's).
    pub tombstone_ttl: Option<String>,
    /// The service mesh (Consul's `connect` block).
    pub connect: Option<RawConnect>,
    /// Consul's top-level spelling of `connect.default_intention_policy`.
    pub default_intention_policy: Option<String>,
    /// Secondaries federating through mesh gateways: the primary's gateways (`host:port`;
    /// names are re-resolved), used until federation states list them and whenever all of
    /// those fail.
    pub primary_gateways: Option<Vec<String>>,
    /// How often `primary_gateways` names are re-resolved (default 30s).
    pub primary_gateways_interval: Option<String>,
    /// `trellis gateway mesh`: where the gateway listens.
    pub gateway: Option<RawGateway>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// `ip:port` the datacenter's services and servers reach the gateway at (default port 8443).
    pub address: Option<String>,
    /// `ip:port` other datacenters' gateways reach it at (TCP, and UDP for QUIC).
    pub wan_address: Option<String>,
    /// `ip:port` it listens on for them when that is not `wan_address` (NAT, load balancer).
    pub wan_bind: Option<String>,
    /// The gateway's service name (default "mesh-gateway").
    pub service: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawConnect {
    /// The mesh: CA, leaf certificates, intentions, sidecars (default true).
    pub enabled: Option<bool>,
    /// Only "consul", the built-in CA.
    pub ca_provider: Option<String>,
    /// The CA's settings at first start (later: `PUT /v1/connect/ca/configuration`).
    pub ca_config: Option<RawCaConfig>,
    /// Federate datacenters through mesh gateways (needs `enabled`).
    pub enable_mesh_gateway_wan_federation: Option<bool>,
    /// "allow" or "deny": the decision when no intention matches (default allow, as Consul's
    /// without ACLs).
    pub default_intention_policy: Option<String>,
    /// Run the sidecar of every service registered here inside the agent (default true);
    /// false leaves it to `trellis connect proxy --sidecar-for <id>`.
    pub run_sidecars: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawCaConfig {
    pub leaf_cert_ttl: Option<String>,
    pub intermediate_cert_ttl: Option<String>,
    pub root_cert_ttl: Option<String>,
    pub private_key_type: Option<String>,
    pub private_key_bits: Option<u32>,
    pub csr_max_per_second: Option<f64>,
    pub csr_max_concurrent: Option<u64>,
    /// Accepted for compatibility; not used by current Consul either.
    pub rotation_period: Option<String>,
}

/// The mesh settings an agent runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectSettings {
    pub enabled: bool,
    /// The CA's settings at first start: (key, value) pairs of `ca_config` that were set.
    pub leaf_cert_ttl: Option<String>,
    pub intermediate_cert_ttl: Option<String>,
    pub root_cert_ttl: Option<String>,
    pub private_key_type: Option<String>,
    pub private_key_bits: Option<u32>,
    pub csr_max_per_second: Option<f64>,
    pub csr_max_concurrent: Option<u64>,
    /// `None`: no policy configured (allow, reason "Default behavior configured by ACLs").
    pub default_intention_policy: Option<bool>,
    pub run_sidecars: bool,
    pub mesh_gateway_wan_federation: bool,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Concurrent HTTP connections one client IP may hold (default 200; 0 for no limit). More
    /// are answered 429 and closed.
    pub http_max_conns_per_client: Option<u64>,
    /// Largest KV value accepted, in bytes (default 512 KiB).
    pub kv_max_value_size: Option<u64>,
    /// Largest `/v1/txn` request body, in bytes (default 512 KiB).
    pub txn_max_req_len: Option<u64>,
    /// Blocking queries the agent holds at once (default 65536); past it they are answered
    /// 429 until some return.
    pub http_max_blocking_queries: Option<u64>,
    /// How long a client has to send a request's headers, and how long an idle keep-alive
    /// connection stays open (default 30s).
    pub http_read_header_timeout: Option<String>,
    /// Accepted for compatibility with Consul configs; RPC limits are fixed.
    pub rpc_max_conns_per_client: Option<u64>,
    pub rpc_handshake_timeout: Option<String>,
    pub https_handshake_timeout: Option<String>,
    pub rpc_rate: Option<f64>,
    pub rpc_max_burst: Option<u64>,
}

/// Resource limits of the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// 0: no limit.
    pub http_max_conns_per_client: usize,
    pub kv_max_value_size: usize,
    pub txn_max_req_len: usize,
    pub http_max_blocking_queries: usize,
    pub http_read_header_timeout: std::time::Duration,
}

/// Consul's defaults (and ours for the limits Consul does not have).
pub const DEFAULT_LIMITS: Limits = Limits {
    http_max_conns_per_client: 200,
    kv_max_value_size: 512 * 1024,
    txn_max_req_len: 512 * 1024,
    // A parked watcher costs a few KiB; this bounds them near a few hundred MiB.
    http_max_blocking_queries: 65_536,
    http_read_header_timeout: std::time::Duration::from_secs(30),
};

/// The largest body limit that can be configured (RPC frames carry bodies whole).
pub const MAX_BODY_LIMIT: usize = 32 << 20;

/// TLS material files for the HTTPS API.
#[derive(Debug, Clone)]
pub struct HttpsConfig {
    pub port: u16,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// With `verify_incoming`: the CA whose certificates clients must present.
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawAutoEncrypt {
    /// On a client: ask the servers for a certificate instead of reading `cert_file`/`key_file`.
    pub tls: Option<bool>,
    /// On a server: sign certificates for clients that ask.
    pub allow_tls: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawDnsConfig {
    /// Accepted for compatibility: DNS reads are always served from the agent's view.
    pub allow_stale: Option<bool>,
    pub max_stale: Option<String>,
    /// TTL of node lookups (default 0).
    pub node_ttl: Option<String>,
    /// TTL per service name; "*" is the default and "prefix*" a wildcard.
    pub service_ttl: Option<BTreeMap<String, String>>,
    /// Leave out instances whose checks are warning, not only critical ones.
    pub only_passing: Option<bool>,
    /// At most this many A/AAAA records per answer (0: no limit).
    pub a_record_limit: Option<usize>,
    /// Set TC when `udp_answer_limit` or `a_record_limit` cut an answer.
    pub enable_truncate: Option<bool>,
    /// Answers to classic (non-EDNS) UDP clients carry at most this many records (default 3).
    pub udp_answer_limit: Option<usize>,
    /// Node meta as TXT records in node lookups (default true).
    pub enable_additional_node_meta_txt: Option<bool>,
    pub soa: Option<RawSoa>,
    /// Accepted for compatibility; not used.
    pub use_cache: Option<bool>,
    pub cache_max_age: Option<String>,
    pub recursor_strategy: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawSoa {
    /// Seconds.
    pub expire: Option<u64>,
    pub min_ttl: Option<u64>,
    pub refresh: Option<u64>,
    pub retry: Option<u64>,
}

/// A block given once or as a list.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    Many(Vec<serde_json::Value>),
    One(serde_json::Value),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<serde_json::Value> {
        match self {
            OneOrMany::Many(v) => v,
            OneOrMany::One(v) => vec![v],
        }
    }
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawPorts {
    /// HTTP API and UI (default 8500).
    pub http: Option<i64>,
    /// DNS (default 8600; -1 disables).
    pub dns: Option<i64>,
    /// Server RPC (default 8300).
    pub server: Option<i64>,
    /// LAN gossip (default 8301).
    pub serf_lan: Option<i64>,
    /// WAN gossip. Accepted and range-checked; not used until WAN federation exists.
    pub serf_wan: Option<i64>,
    /// HTTPS API (default -1, off); needs a certificate in `tls.https` or `tls.defaults`.
    pub https: Option<i64>,
    /// gRPC. Accepted and range-checked; not used yet.
    pub grpc: Option<i64>,
    /// The lowest and highest port given to sidecars automatically (default 21000-21255;
    /// both 0 turns automatic sidecar ports off).
    pub sidecar_min_port: Option<i64>,
    pub sidecar_max_port: Option<i64>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub defaults: Option<RawTlsFiles>,
    pub internal_rpc: Option<RawTlsFiles>,
    /// The HTTPS API (`ports.https`): its certificate, and with `verify_incoming` the CA
    /// HTTPS clients must present a certificate from.
    pub https: Option<RawTlsFiles>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawTlsFiles {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// For HTTPS: require clients to present a certificate from `ca_file`. Internal RPC always
    /// verifies both ends, whatever this says.
    pub verify_incoming: Option<bool>,
    pub verify_outgoing: Option<bool>,
    pub verify_server_hostname: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawPerformance {
    /// Scales Raft's heartbeat and election timeouts (1 = LAN-tuned, up to 10).
    pub raft_multiplier: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawAutopilot {
    pub cleanup_dead_servers: Option<bool>,
    pub last_contact_threshold: Option<String>,
    pub max_trailing_logs: Option<u64>,
    pub min_quorum: Option<u64>,
    pub server_stabilization_time: Option<String>,
}

/// Where an agent's RPC certificate comes from.
#[derive(Debug, Clone)]
pub enum RpcTls {
    /// Dev mode makes its own CA and certificate.
    Dev,
    Files(TlsFiles),
    /// A client agent with only the CA: it asks the servers for a certificate (auto-encrypt).
    AutoEncrypt {
        ca_file: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The validated configuration an agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub datacenter: String,
    pub primary_datacenter: String,
    pub node_name: String,
    pub data_dir: PathBuf,
    pub server: bool,
    pub dev: bool,
    pub bootstrap_expect: usize,
    pub retry_join: Vec<String>,
    pub retry_join_wan: Vec<String>,
    pub bind_addr: IpAddr,
    pub client_addr: IpAddr,
    pub http_port: u16,
    /// `None` when DNS is disabled.
    pub dns_port: Option<u16>,
    pub server_port: u16,
    pub serf_lan_port: u16,
    /// WAN gossip port of a server; `None` on client agents, or disabled with -1.
    pub serf_wan_port: Option<u16>,
    pub domain: String,
    /// Gossip encryption key, validated base64.
    pub encrypt: Option<String>,
    /// DNS answer settings (domain, recursors, TTLs, limits).
    pub dns: dns::DnsConfig,
    pub enable_script_checks: bool,
    pub enable_local_script_checks: bool,
    /// Service and check definitions from the config files (Consul's JSON shapes).
    pub services: Vec<serde_json::Value>,
    pub checks: Vec<serde_json::Value>,
    pub ae_interval: std::time::Duration,
    pub reconnect_timeout: std::time::Duration,
    pub log_level: String,
    pub tls: RpcTls,
    /// A server signs client agents' certificates (`auto_encrypt.allow_tls`).
    pub auto_encrypt_allow_tls: bool,
    pub raft: RaftTimings,
    pub autopilot: AutopilotSettings,
    pub limits: Limits,
    pub tombstone_ttl: std::time::Duration,
    pub connect: ConnectSettings,
    /// `ports.sidecar_min_port`..=`sidecar_max_port`.
    pub sidecar_ports: (u16, u16),
    /// The HTTPS API, when `ports.https` is set.
    pub https: Option<HttpsConfig>,
    /// `primary_gateways` (secondaries federating through gateways).
    pub primary_gateways: Vec<String>,
    pub primary_gateways_interval: std::time::Duration,
    /// The `gateway` block (only `trellis gateway mesh` uses it).
    pub gateway: GatewaySettings,
}

/// Where a mesh gateway listens; unset addresses come from flags or defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewaySettings {
    pub address: Option<SocketAddr>,
    pub wan_address: Option<SocketAddr>,
    pub service: String,
}

/// The mesh gateway's default port (Consul's).
pub const DEFAULT_GATEWAY_PORT: u16 = 8443;

/// `ip:port`, or a bare IP with the gateway's default port.
pub fn gateway_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, DEFAULT_GATEWAY_PORT)).map_err(|_| format!("{s:?} is not an ip:port address"))
}

impl Config {
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.client_addr, self.http_port)
    }
    pub fn rpc_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind_addr, self.server_port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

/// Parse configuration text in Consul's JSON or HCL form.
pub fn parse_str(text: &str, json: bool) -> Result<RawConfig, String> {
    if json { serde_json::from_str(text).map_err(|e| e.to_string()) } else { hcl::from_str(text).map_err(|e| e.to_string()) }
}

/// Parse one file by its extension: `.json` or `.hcl` (Consul's two formats).
pub fn parse_file(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File { path: path.into(), message: e.to_string() })?;
    let err = |message: String| ConfigError::File { path: path.into(), message };
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text).map_err(|e| err(e.to_string())),
        Some("hcl") => hcl::from_str(&text).map_err(|e| err(e.to_string())),
        _ => Err(err("unknown config format: use a .hcl or .json file".into())),
    }
}

/// Files given with `--config-file`, then every `.hcl`/`.json` in each `--config-dir` in name
/// order; later files override earlier ones key by key.
pub fn load_files(files: &[PathBuf], dirs: &[PathBuf]) -> Result<RawConfig, ConfigError> {
    let mut paths: Vec<PathBuf> = files.to_vec();
    for d in dirs {
        let rd = std::fs::read_dir(d).map_err(|e| ConfigError::File { path: d.clone(), message: e.to_string() })?;
        let mut found: Vec<PathBuf> =
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("hcl" | "json"))).collect();
        found.sort();
        paths.extend(found);
    }
    let mut merged = RawConfig::default();
    for p in paths {
        merged.merge(parse_file(&p)?);
    }
    Ok(merged)
}

macro_rules! take {
    ($self:ident, $other:ident, $($f:ident),*) => { $( if $other.$f.is_some() { $self.$f = $other.$f; } )* };
}

impl RawConfig {
    /// Overlay `other` on `self`: every key `other` sets wins.
    pub fn merge(&mut self, other: RawConfig) {
        take!(
            self,
            other,
            datacenter,
            primary_datacenter,
            node_name,
            data_dir,
            server,
            bootstrap_expect,
            bootstrap,
            retry_join,
            retry_join_wan,
            bind_addr,
            client_addr
        );
        take!(
            self,
            other,
            domain,
            log_level,
            ca_file,
            cert_file,
            key_file,
            performance,
            autopilot,
            auto_encrypt,
            limits,
            connect,
            default_intention_policy,
            primary_gateways,
            primary_gateways_interval,
            gateway
        );
        take!(
            self,
            other,
            encrypt,
            tombstone_ttl,
            raft_snapshot_threshold,
            raft_snapshot_interval,
            raft_trailing_logs,
            raft_snapshot_log_bytes,
            enable_script_checks,
            enable_local_script_checks,
            ae_interval,
            reconnect_timeout,
            alt_domain,
            recursors,
            recursor_timeout,
            dns_config
        );
        // Definitions accumulate across files, as Consul's do.
        for (mine, theirs) in [
            (&mut self.service, other.service),
            (&mut self.services, other.services),
            (&mut self.check, other.check),
            (&mut self.checks, other.checks),
        ] {
            if let Some(t) = theirs {
                let mut v = mine.take().map(OneOrMany::into_vec).unwrap_or_default();
                v.extend(t.into_vec());
                *mine = Some(OneOrMany::Many(v));
            }
        }
        if let Some(t) = other.tls {
            let mine = self.tls.get_or_insert_with(Default::default);
            for (mine, theirs) in [(&mut mine.defaults, t.defaults), (&mut mine.internal_rpc, t.internal_rpc), (&mut mine.https, t.https)] {
                if let Some(theirs) = theirs {
                    let m = mine.get_or_insert_with(Default::default);
                    take!(m, theirs, ca_file, cert_file, key_file, verify_incoming, verify_outgoing, verify_server_hostname);
                }
            }
        }
        if let Some(p) = other.ports {
            let mine = self.ports.get_or_insert_with(Default::default);
            take!(mine, p, http, dns, server, serf_lan, serf_wan, https, grpc, sidecar_min_port, sidecar_max_port);
        }
    }

    /// Validate into a `Config`. `dev` selects dev-mode defaults (a one-server cluster on
    /// loopback with its own certificates and a temporary data dir).
    pub fn validate(self, dev: bool) -> Result<Config, ConfigError> {
        let mut errs = Vec::new();
        let ip = |key: &str, v: Option<&String>, default: IpAddr, errs: &mut Vec<String>| match v {
            None => default,
            Some(s) => s.parse().unwrap_or_else(|_| {
                errs.push(format!("{key}: {s:?} is not an IP address"));
                default
            }),
        };
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let bind_addr = ip("bind_addr", self.bind_addr.as_ref(), if dev { loopback } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) }, &mut errs);
        let client_addr = ip("client_addr", self.client_addr.as_ref(), loopback, &mut errs);
        if bind_addr.is_unspecified() && !dev {
            errs.push("bind_addr: must be a specific address that other servers can reach (e.g. --bind 10.0.0.5)".into());
        }
        let ports = self.ports.unwrap_or_default();
        let port = |key: &str, v: Option<i64>, default: u16, errs: &mut Vec<String>| -> Option<u16> {
            match v {
                None => Some(default),
                Some(-1) => None,
                Some(p) if (0..=65535).contains(&p) => Some(p as u16),
                Some(p) => {
                    errs.push(format!("ports.{key}: {p} is not a port number (0-65535, or -1 to disable)"));
                    Some(default)
                }
            }
        };
        let http_port = port("http", ports.http, DEFAULT_HTTP_PORT, &mut errs).unwrap_or_else(|| {
            errs.push("ports.http: the HTTP API cannot be disabled".into());
            0
        });
        let dns_port = port("dns", ports.dns, DEFAULT_DNS_PORT, &mut errs);
        let server_port = port("server", ports.server, DEFAULT_SERVER_PORT, &mut errs).unwrap_or_else(|| {
            errs.push("ports.server: server RPC cannot be disabled".into());
            DEFAULT_SERVER_PORT
        });
        let serf_lan_port = port("serf_lan", ports.serf_lan, DEFAULT_SERF_LAN_PORT, &mut errs).unwrap_or_else(|| {
            errs.push("ports.serf_lan: LAN gossip cannot be disabled".into());
            DEFAULT_SERF_LAN_PORT
        });
        let serf_wan_port = port("serf_wan", ports.serf_wan, DEFAULT_SERF_WAN_PORT, &mut errs).filter(|_| dev || self.server.unwrap_or(false));
        let retry_join_wan = self.retry_join_wan.unwrap_or_default();
        if !retry_join_wan.is_empty() && serf_wan_port.is_none() {
            errs.push("retry_join_wan: only servers with a WAN gossip port (ports.serf_wan) join the WAN pool".into());
        }
        port("grpc", ports.grpc, 0, &mut errs);
        let https_port = port("https", ports.https.or(Some(-1)), 0, &mut errs);
        let encrypt = self.encrypt.filter(|k| !k.is_empty());
        if let Some(k) = &encrypt {
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(k) {
                Ok(b) if matches!(b.len(), 16 | 24 | 32) => {}
                _ => errs.push("encrypt: must be a base64 key of 16, 24 or 32 bytes (make one with `trellis keygen`)".into()),
            }
        }
        let duration = |key: &str, v: Option<String>, default: std::time::Duration, errs: &mut Vec<String>| match v {
            None => default,
            Some(s) => crate::duration::parse(&s).filter(|d| !d.is_zero()).unwrap_or_else(|| {
                errs.push(format!("{key}: {s:?} is not a positive duration like \"30s\""));
                default
            }),
        };
        let ae_interval = duration("ae_interval", self.ae_interval, DEFAULT_AE_INTERVAL, &mut errs);
        let snapshot_interval = duration("raft_snapshot_interval", self.raft_snapshot_interval, DEFAULT_RAFT_TIMINGS.snapshot_interval, &mut errs);
        let reconnect_timeout = duration("reconnect_timeout", self.reconnect_timeout, DEFAULT_RECONNECT_TIMEOUT, &mut errs);
        let services: Vec<serde_json::Value> = [self.service, self.services].into_iter().flatten().flat_map(OneOrMany::into_vec).collect();
        let checks: Vec<serde_json::Value> = [self.check, self.checks].into_iter().flatten().flat_map(OneOrMany::into_vec).collect();
        let domain = self.domain.clone().unwrap_or_else(|| DEFAULT_DOMAIN.into()).trim_end_matches('.').to_string();
        let mut dns = dns::DnsConfig { domain: format!("{domain}."), ..Default::default() };
        dns.alt_domain = self.alt_domain.map(|d| format!("{}.", d.trim_end_matches('.')));
        for r in self.recursors.unwrap_or_default() {
            let with_port = if r.parse::<std::net::IpAddr>().is_ok() {
                std::net::SocketAddr::new(r.parse().expect("checked"), 53).to_string()
            } else {
                r.clone()
            };
            match with_port.parse() {
                Ok(a) => dns.recursors.push(a),
                Err(_) => errs.push(format!("recursors: {r:?} is not an IP address or IP:port")),
            }
        }
        if let Some(t) = self.recursor_timeout {
            match crate::duration::parse(&t) {
                Some(d) if !d.is_zero() => dns.recursor_timeout = d,
                _ => errs.push(format!("recursor_timeout: {t:?} is not a positive duration")),
            }
        }
        if let Some(dc) = self.dns_config {
            let ttl = |key: &str, v: &str, errs: &mut Vec<String>| {
                crate::duration::parse(v).unwrap_or_else(|| {
                    errs.push(format!("dns_config.{key}: {v:?} is not a duration like \"10s\""));
                    std::time::Duration::ZERO
                })
            };
            if let Some(v) = &dc.node_ttl {
                dns.node_ttl = ttl("node_ttl", v, &mut errs);
            }
            for (k, v) in dc.service_ttl.unwrap_or_default() {
                let d = ttl(&format!("service_ttl.{k}"), &v, &mut errs);
                dns.service_ttl.insert(k, d);
            }
            dns.only_passing = dc.only_passing.unwrap_or(dns.only_passing);
            dns.a_record_limit = dc.a_record_limit.unwrap_or(dns.a_record_limit);
            dns.enable_truncate = dc.enable_truncate.unwrap_or(dns.enable_truncate);
            dns.udp_answer_limit = dc.udp_answer_limit.unwrap_or(dns.udp_answer_limit);
            dns.node_meta_txt = dc.enable_additional_node_meta_txt.unwrap_or(dns.node_meta_txt);
            if let Some(soa) = dc.soa {
                let secs = std::time::Duration::from_secs;
                dns.soa.expire = soa.expire.map(secs).unwrap_or(dns.soa.expire);
                dns.soa.min_ttl = soa.min_ttl.map(secs).unwrap_or(dns.soa.min_ttl);
                dns.soa.refresh = soa.refresh.map(secs).unwrap_or(dns.soa.refresh);
                dns.soa.retry = soa.retry.map(secs).unwrap_or(dns.soa.retry);
            }
            if dc.recursor_strategy.as_deref().is_some_and(|s| s != "sequential") {
                errs.push("dns_config.recursor_strategy: only \"sequential\" is supported".into());
            }
        }

        let datacenter = self.datacenter.unwrap_or_else(|| DEFAULT_DATACENTER.into());
        if !valid_label(&datacenter) {
            errs.push(format!("datacenter: {datacenter:?} must be letters, digits, '-' and '_' only"));
        }
        let primary_datacenter = self.primary_datacenter.unwrap_or_else(|| datacenter.clone());
        let node_name = self.node_name.unwrap_or_else(hostname);
        if node_name.is_empty() || node_name.len() > 63 || !valid_label(&node_name.replace('.', "-")) {
            errs.push(format!("node_name: {node_name:?} must be 1-63 letters, digits, '-', '_' or '.'"));
        }
        let server = dev || self.server.unwrap_or(false);
        let bootstrap = self.bootstrap.unwrap_or(false);
        let bootstrap_expect = match (dev || bootstrap, self.bootstrap_expect) {
            (true, Some(n)) if n > 1 => {
                errs.push("bootstrap_expect: cannot be combined with bootstrap or dev mode".into());
                1
            }
            (true, _) => 1,
            (false, Some(0)) => {
                errs.push("bootstrap_expect: must be at least 1".into());
                1
            }
            (false, Some(n)) => n,
            (false, None) => 0,
        };
        if !server && (bootstrap_expect > 0 || bootstrap) {
            errs.push("bootstrap_expect: only servers bootstrap a cluster (add server = true)".into());
        }
        let data_dir = match self.data_dir {
            Some(d) => PathBuf::from(d),
            None if dev => std::env::temp_dir().join(format!("trellis-dev-{}", std::process::id())),
            None => {
                errs.push("data_dir: required (e.g. --data-dir /opt/trellis)".into());
                PathBuf::new()
            }
        };
        let log_level = self.log_level.unwrap_or_else(|| "info".into()).to_lowercase();
        if !matches!(log_level.as_str(), "trace" | "debug" | "info" | "warn" | "error") {
            errs.push(format!("log_level: {log_level:?} is not one of trace, debug, info, warn, error"));
        }
        // Per key: tls.internal_rpc, then tls.defaults, then the legacy top-level keys.
        let tls_block = self.tls.unwrap_or_default();
        let (rpc, defaults) = (tls_block.internal_rpc.unwrap_or_default(), tls_block.defaults.unwrap_or_default());
        // HTTPS: tls.https, then tls.defaults, then the legacy top-level keys.
        let https = https_port.and_then(|port| {
            let h = tls_block.https.clone().unwrap_or_default();
            let cert = h.cert_file.or(defaults.cert_file.clone()).or(self.cert_file.clone());
            let key = h.key_file.or(defaults.key_file.clone()).or(self.key_file.clone());
            let verify = h.verify_incoming.or(defaults.verify_incoming).unwrap_or(false);
            let ca = h.ca_file.or(defaults.ca_file.clone()).or(self.ca_file.clone());
            match (cert, key) {
                (Some(cert), Some(key)) => {
                    if verify && ca.is_none() {
                        errs.push("tls.https.verify_incoming: needs ca_file, the CA whose certificates HTTPS clients present".into());
                    }
                    let client_ca_file = ca.filter(|_| verify).map(PathBuf::from);
                    Some(HttpsConfig { port, cert_file: cert.into(), key_file: key.into(), client_ca_file })
                }
                _ => {
                    errs.push("ports.https: needs cert_file and key_file in tls.https or tls.defaults".into());
                    None
                }
            }
        });
        let ca = rpc.ca_file.or(defaults.ca_file).or(self.ca_file);
        let cert = rpc.cert_file.or(defaults.cert_file).or(self.cert_file);
        let key = rpc.key_file.or(defaults.key_file).or(self.key_file);
        let auto_encrypt = self.auto_encrypt.unwrap_or_default();
        let (auto_tls, allow_tls) = (auto_encrypt.tls.unwrap_or(false), auto_encrypt.allow_tls.unwrap_or(false));
        if auto_tls && server {
            errs.push("auto_encrypt.tls: only client agents get their certificate from the servers (servers set auto_encrypt.allow_tls)".into());
        }
        if allow_tls && !server {
            errs.push("auto_encrypt.allow_tls: only servers sign client certificates (clients set auto_encrypt.tls)".into());
        }
        // Without ACL tokens, the gossip key is what proves a client agent may join: a server
        // with no key would sign a certificate for anyone who asks.
        if allow_tls && server && encrypt.as_deref().is_none_or(|k| k.trim().is_empty()) {
            errs.push(
                "auto_encrypt.allow_tls: requires encrypt (the gossip key), which authorises certificate requests; without it any \
                 host that reaches this server would get a client certificate (set encrypt, or turn allow_tls off)"
                    .into(),
            );
        }
        let tls = match (ca, cert, key) {
            (Some(ca), None, None) if auto_tls => RpcTls::AutoEncrypt { ca_file: ca.into() },
            (_, Some(_), _) | (_, _, Some(_)) if auto_tls => {
                errs.push("auto_encrypt.tls: the certificate comes from the servers; remove cert_file and key_file".into());
                RpcTls::Dev
            }
            (None, None, None) if auto_tls => {
                errs.push("auto_encrypt.tls: ca_file is required, to verify the servers".into());
                RpcTls::Dev
            }
            (Some(ca), Some(cert), Some(key)) => RpcTls::Files(TlsFiles { ca_file: ca.into(), cert_file: cert.into(), key_file: key.into() }),
            (None, None, None) if dev => RpcTls::Dev,
            _ => {
                errs.push("tls: ca_file, cert_file and key_file are all required: RPC is mTLS only (create them with `trellis tls ca create` and `trellis tls cert create --server`, or give a client agent only ca_file and set auto_encrypt.tls)".into());
                RpcTls::Dev
            }
        };
        let multiplier = self.performance.and_then(|p| p.raft_multiplier).unwrap_or(1);
        if !(1..=MAX_RAFT_MULTIPLIER).contains(&multiplier) {
            errs.push(format!("performance.raft_multiplier: {multiplier} must be between 1 and {MAX_RAFT_MULTIPLIER}"));
        }
        let m = multiplier.clamp(1, MAX_RAFT_MULTIPLIER);
        let raft = RaftTimings {
            heartbeat_ms: DEFAULT_RAFT_TIMINGS.heartbeat_ms * m,
            election_min_ms: DEFAULT_RAFT_TIMINGS.election_min_ms * m,
            election_max_ms: DEFAULT_RAFT_TIMINGS.election_max_ms * m,
            snapshot_threshold: self.raft_snapshot_threshold.unwrap_or(DEFAULT_RAFT_TIMINGS.snapshot_threshold),
            snapshot_interval,
            trailing_logs: self.raft_trailing_logs.unwrap_or(DEFAULT_RAFT_TIMINGS.trailing_logs),
            snapshot_log_bytes: self.raft_snapshot_log_bytes.unwrap_or(DEFAULT_RAFT_TIMINGS.snapshot_log_bytes),
        };
        if !RAFT_LOG_BYTES_LIMITS.contains(&raft.snapshot_log_bytes) {
            errs.push(format!(
                "raft_snapshot_log_bytes: {} must be between {} and {}",
                raft.snapshot_log_bytes,
                RAFT_LOG_BYTES_LIMITS.start(),
                RAFT_LOG_BYTES_LIMITS.end()
            ));
        }
        for (key, v) in [("raft_snapshot_threshold", raft.snapshot_threshold), ("raft_trailing_logs", raft.trailing_logs)] {
            if !RAFT_LOG_LIMITS.contains(&v) {
                errs.push(format!("{key}: {v} must be between {} and {}", RAFT_LOG_LIMITS.start(), RAFT_LOG_LIMITS.end()));
            }
        }
        let raw_limits = self.limits.unwrap_or_default();
        let limits = Limits {
            http_max_conns_per_client: raw_limits.http_max_conns_per_client.map_or(DEFAULT_LIMITS.http_max_conns_per_client, |n| n as usize),
            kv_max_value_size: raw_limits.kv_max_value_size.map_or(DEFAULT_LIMITS.kv_max_value_size, |n| n as usize),
            txn_max_req_len: raw_limits.txn_max_req_len.map_or(DEFAULT_LIMITS.txn_max_req_len, |n| n as usize),
            http_max_blocking_queries: raw_limits.http_max_blocking_queries.map_or(DEFAULT_LIMITS.http_max_blocking_queries, |n| n as usize),
            http_read_header_timeout: match raw_limits.http_read_header_timeout {
                None => DEFAULT_LIMITS.http_read_header_timeout,
                Some(t) => crate::duration::parse(&t).filter(|d| !d.is_zero()).unwrap_or_else(|| {
                    errs.push(format!("limits.http_read_header_timeout: {t:?} is not a positive duration like \"30s\""));
                    DEFAULT_LIMITS.http_read_header_timeout
                }),
            },
        };
        for (key, v) in [("kv_max_value_size", limits.kv_max_value_size), ("txn_max_req_len", limits.txn_max_req_len)] {
            if v == 0 || v > MAX_BODY_LIMIT {
                errs.push(format!("limits.{key}: {v} must be between 1 and {MAX_BODY_LIMIT} bytes"));
            }
        }
        let sidecar_ports = {
            let min = ports.sidecar_min_port.unwrap_or(21000);
            let max = ports.sidecar_max_port.unwrap_or(21255);
            if !(0..=65535).contains(&min) || !(0..=65535).contains(&max) {
                errs.push("ports.sidecar_min_port / sidecar_max_port: must be port numbers (0-65535)".into());
                (21000, 21255)
            } else if min > max {
                errs.push("ports.sidecar_min_port: sidecar_min_port must be less than sidecar_max_port. To disable, set both to zero.".into());
                (21000, 21255)
            } else {
                (min as u16, max as u16)
            }
        };
        let rc = self.connect.unwrap_or_default();
        let policy = rc.default_intention_policy.or(self.default_intention_policy);
        let default_intention_policy = match policy.as_deref() {
            None | Some("") => None,
            Some("allow") => Some(true),
            Some("deny") => Some(false),
            Some(other) => {
                errs.push(format!("connect.default_intention_policy: {other:?} is not \"allow\" or \"deny\""));
                None
            }
        };
        if let Some(p) = rc.ca_provider.as_deref().filter(|p| *p != "consul") {
            errs.push(format!("connect.ca_provider: {p:?} is not supported; Trellis has the built-in \"consul\" CA"));
        }
        let enabled = rc.enabled.unwrap_or(true);
        let wan_fed = rc.enable_mesh_gateway_wan_federation.unwrap_or(false);
        if wan_fed && !enabled {
            errs.push(
                "connect.enable_mesh_gateway_wan_federation: 'connect.enable_mesh_gateway_wan_federation=true' requires 'connect.enabled=true'"
                    .into(),
            );
        }
        let server = self.server.unwrap_or(false) || dev;
        if wan_fed && !retry_join_wan.is_empty() {
            errs.push("retry_join_wan: 'retry_join_wan' is incompatible with 'connect.enable_mesh_gateway_wan_federation = true'".into());
        }
        let primary_gateways = self.primary_gateways.unwrap_or_default();
        if !primary_gateways.is_empty() {
            if !server {
                errs.push("primary_gateways: 'primary_gateways' requires 'server = true'".into());
            }
            if primary_datacenter.eq_ignore_ascii_case(&datacenter) {
                errs.push("primary_gateways: 'primary_gateways' should only be configured in a secondary datacenter".into());
            }
        }
        let primary_gateways_interval =
            duration("primary_gateways_interval", self.primary_gateways_interval, std::time::Duration::from_secs(30), &mut errs);
        if primary_gateways_interval < std::time::Duration::from_secs(1) {
            errs.push("primary_gateways_interval: the minimum allowed value is 1 second".into());
        }
        let g = self.gateway.unwrap_or_default();
        let gaddr = |key: &str, v: Option<String>, errs: &mut Vec<String>| {
            v.filter(|s| !s.is_empty()).and_then(|s| gateway_addr(&s).map_err(|e| errs.push(format!("gateway.{key}: {e}"))).ok())
        };
        let gateway = GatewaySettings {
            address: gaddr("address", g.address, &mut errs),
            wan_address: gaddr("wan_address", g.wan_address, &mut errs),
            service: g.service.filter(|s| !s.is_empty()).unwrap_or_else(|| "mesh-gateway".into()),
        };
        let ca = rc.ca_config.unwrap_or_default();
        for (key, v) in
            [("leaf_cert_ttl", &ca.leaf_cert_ttl), ("intermediate_cert_ttl", &ca.intermediate_cert_ttl), ("root_cert_ttl", &ca.root_cert_ttl)]
        {
            if let Some(v) = v
                && crate::duration::parse(v).is_none()
            {
                errs.push(format!("connect.ca_config.{key}: {v:?} is not a duration like \"72h\""));
            }
        }
        let connect = ConnectSettings {
            enabled,
            leaf_cert_ttl: ca.leaf_cert_ttl,
            intermediate_cert_ttl: ca.intermediate_cert_ttl,
            root_cert_ttl: ca.root_cert_ttl,
            private_key_type: ca.private_key_type,
            private_key_bits: ca.private_key_bits,
            csr_max_per_second: ca.csr_max_per_second,
            csr_max_concurrent: ca.csr_max_concurrent,
            default_intention_policy,
            run_sidecars: rc.run_sidecars.unwrap_or(true),
            mesh_gateway_wan_federation: wan_fed,
        };
        let tombstone_ttl = match self.tombstone_ttl {
            None => DEFAULT_TOMBSTONE_TTL,
            Some(t) => crate::duration::parse(&t).filter(|d| !d.is_zero()).unwrap_or_else(|| {
                errs.push(format!("tombstone_ttl: {t:?} is not a positive duration like \"15m\""));
                DEFAULT_TOMBSTONE_TTL
            }),
        };
        let mut autopilot = AutopilotSettings::default();
        if let Some(a) = self.autopilot {
            for (key, v) in [("last_contact_threshold", &a.last_contact_threshold), ("server_stabilization_time", &a.server_stabilization_time)] {
                if let Some(v) = v
                    && crate::duration::parse(v).is_none()
                {
                    errs.push(format!("autopilot.{key}: {v:?} is not a duration like \"10s\""));
                }
            }
            autopilot.cleanup_dead_servers = a.cleanup_dead_servers.unwrap_or(autopilot.cleanup_dead_servers);
            autopilot.last_contact_threshold = a.last_contact_threshold.unwrap_or(autopilot.last_contact_threshold);
            autopilot.max_trailing_logs = a.max_trailing_logs.unwrap_or(autopilot.max_trailing_logs);
            autopilot.min_quorum = a.min_quorum.unwrap_or(autopilot.min_quorum);
            autopilot.server_stabilization_time = a.server_stabilization_time.unwrap_or(autopilot.server_stabilization_time);
        }
        if !errs.is_empty() {
            return Err(ConfigError::Invalid(errs));
        }
        Ok(Config {
            datacenter,
            primary_datacenter,
            node_name,
            data_dir,
            server,
            dev,
            bootstrap_expect,
            retry_join: self.retry_join.unwrap_or_default(),
            retry_join_wan,
            bind_addr: if dev && bind_addr.is_unspecified() { loopback } else { bind_addr },
            client_addr,
            http_port,
            dns_port,
            server_port,
            serf_lan_port,
            // Federated through gateways, servers keep no WAN gossip pool: federation states
            // say which datacenters exist and where their gateways are.
            serf_wan_port: serf_wan_port.filter(|_| !connect.mesh_gateway_wan_federation),
            encrypt,
            dns,
            enable_script_checks: self.enable_script_checks.unwrap_or(false),
            enable_local_script_checks: self.enable_local_script_checks.unwrap_or(false),
            services,
            checks,
            ae_interval,
            reconnect_timeout,
            domain: self.domain.unwrap_or_else(|| DEFAULT_DOMAIN.into()).trim_end_matches('.').to_string(),
            log_level,
            tls,
            auto_encrypt_allow_tls: allow_tls,
            raft,
            autopilot,
            limits,
            tombstone_ttl,
            connect,
            sidecar_ports,
            primary_gateways,
            primary_gateways_interval,
            gateway,
            https,
        })
    }
}

fn valid_label(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "trellis".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn hcl_and_json_with_consul_keys_parse_to_the_same_config() {
        let d = tempfile::tempdir().unwrap();
        let hcl = write(
            d.path(),
            "a.hcl",
            "datacenter = \"east\"\nnode_name = \"s1\"\ndata_dir = \"/tmp/x\"\nserver = true\nbootstrap_expect = 3\nretry_join = [\"127.0.0.12\"]\nbind_addr = \"127.0.0.11\"\nports {\n  http = 9500\n}\ntls {\n  defaults {\n    ca_file = \"ca\"\n    cert_file = \"c\"\n    key_file = \"k\"\n  }\n}\n",
        );
        let json = write(
            d.path(),
            "b.json",
            r#"{"datacenter":"east","node_name":"s1","data_dir":"/tmp/x","server":true,"bootstrap_expect":3,"retry_join":["127.0.0.12"],"bind_addr":"127.0.0.11","ports":{"http":9500},"ca_file":"ca","cert_file":"c","key_file":"k"}"#,
        );
        let a = load_files(&[hcl], &[]).unwrap().validate(false).unwrap();
        let b = load_files(&[json], &[]).unwrap().validate(false).unwrap();
        for c in [&a, &b] {
            assert_eq!((c.datacenter.as_str(), c.node_name.as_str(), c.bootstrap_expect, c.http_port), ("east", "s1", 3, 9500));
            assert_eq!(c.rpc_addr().to_string(), "127.0.0.11:8300");
        }
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "bad.json", r#"{"datacentre":"x"}"#);
        let e = load_files(&[p], &[]).unwrap_err().to_string();
        assert!(e.contains("datacentre"), "{e}");
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let raw = RawConfig { bind_addr: Some("nope".into()), log_level: Some("loud".into()), ..Default::default() };
        let e = raw.validate(false).unwrap_err().to_string();
        for key in ["bind_addr", "log_level", "data_dir", "tls"] {
            assert!(e.contains(key), "{key} missing from {e}");
        }
    }

    #[test]
    fn raft_log_retention_keys_are_read_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "r.hcl", "raft_snapshot_threshold = 100\nraft_trailing_logs = 50\nraft_snapshot_interval = \"5s\"\n");
        let c = load_files(&[p], &[]).unwrap().validate(true).unwrap();
        assert_eq!((c.raft.snapshot_threshold, c.raft.trailing_logs), (100, 50));
        assert_eq!(c.raft.snapshot_interval, std::time::Duration::from_secs(5));
        let raw = RawConfig {
            raft_snapshot_threshold: Some(0),
            raft_snapshot_interval: Some("often".into()),
            raft_trailing_logs: Some(u64::MAX),
            raft_snapshot_log_bytes: Some(5),
            ..Default::default()
        };
        let e = raw.validate(true).unwrap_err().to_string();
        assert!(e.contains("raft_snapshot_log_bytes: 5 must be between 1048576"), "{e}");
        assert!(e.contains("raft_snapshot_threshold: 0 must be between 16"), "{e}");
        assert!(e.contains("raft_trailing_logs: 18446744073709551615 must be between"), "{e}");
        assert!(e.contains("raft_snapshot_interval: \"often\" is not a positive duration"), "{e}");
    }

    #[test]
    fn later_files_override_earlier_ones_key_by_key() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "1.hcl", "datacenter = \"a\"\nports { http = 1 }\n");
        write(d.path(), "2.json", r#"{"node_name":"n","ports":{"dns":-1}}"#);
        let raw = load_files(&[], &[d.path().to_path_buf()]).unwrap();
        let c = raw.validate(true).unwrap();
        assert_eq!((c.datacenter.as_str(), c.node_name.as_str(), c.http_port, c.dns_port), ("a", "n", 1, None));
    }

    #[test]
    fn tls_keys_resolve_one_by_one_across_blocks_and_layers() {
        let mut raw: RawConfig = serde_json::from_str(
            r#"{"server":true,"data_dir":"/d","bind_addr":"127.0.0.1","ca_file":"legacy-ca",
                "tls":{"defaults":{"cert_file":"d-cert","key_file":"d-key"},"internal_rpc":{"key_file":"rpc-key"}}}"#,
        )
        .unwrap();
        let flags = RawConfig {
            tls: Some(RawTls {
                defaults: None,
                https: None,
                internal_rpc: Some(RawTlsFiles { cert_file: Some("flag-cert".into()), ..Default::default() }),
            }),
            ..Default::default()
        };
        raw.merge(flags);
        let RpcTls::Files(tls) = raw.validate(false).unwrap().tls else { panic!("files expected") };
        assert_eq!((tls.ca_file.to_str(), tls.cert_file.to_str(), tls.key_file.to_str()), (Some("legacy-ca"), Some("flag-cert"), Some("rpc-key")));
    }

    #[test]
    fn auto_encrypt_needs_a_client_with_only_the_ca() {
        let parse = |extra: &str| {
            let raw: RawConfig = serde_json::from_str(&format!(r#"{{"data_dir":"/d","bind_addr":"127.0.0.1",{extra}}}"#)).unwrap();
            raw.validate(false).map(|c| c.tls).map_err(|e| e.to_string())
        };
        assert!(matches!(parse(r#""ca_file":"ca","auto_encrypt":{"tls":true}"#), Ok(RpcTls::AutoEncrypt { .. })));
        assert!(parse(r#""ca_file":"ca","cert_file":"c","key_file":"k","auto_encrypt":{"tls":true}"#).unwrap_err().contains("remove cert_file"));
        assert!(parse(r#""auto_encrypt":{"tls":true}"#).unwrap_err().contains("ca_file is required"));
        assert!(parse(r#""ca_file":"ca","auto_encrypt":{"allow_tls":true}"#).unwrap_err().contains("auto_encrypt.allow_tls"));
        assert!(parse(r#""server":true,"ca_file":"ca","auto_encrypt":{"tls":true}"#).unwrap_err().contains("only client agents"));
        assert!(parse(r#""ca_file":"ca""#).unwrap_err().contains("auto_encrypt.tls"));
    }

    #[test]
    fn servers_sign_client_certificates_only_with_a_gossip_key() {
        let parse = |extra: &str| {
            let raw: RawConfig = serde_json::from_str(&format!(
                r#"{{"data_dir":"/d","bind_addr":"127.0.0.1","server":true,"ca_file":"ca","cert_file":"c","key_file":"k",{extra}}}"#
            ))
            .unwrap();
            raw.validate(false).map(|c| c.auto_encrypt_allow_tls).map_err(|e| e.to_string())
        };
        let err = parse(r#""auto_encrypt":{"allow_tls":true}"#).unwrap_err();
        assert!(err.contains("auto_encrypt.allow_tls") && err.contains("encrypt"), "{err}");
        assert_eq!(parse(r#""auto_encrypt":{"allow_tls":true},"encrypt":"pUqJrVyVRj5jsiYEkM/tFQYfWyJIv4s3XkvDwy7Cu5s=""#), Ok(true));
    }

    #[test]
    fn service_blocks_accumulate_across_files_and_bad_keys_are_named() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "1.hcl", "service {\n  name = \"web\"\n  port = 80\n}\n");
        write(d.path(), "2.json", r#"{"services":[{"name":"db","port":5432}],"encrypt":"short"}"#);
        let raw = load_files(&[], &[d.path().to_path_buf()]).unwrap();
        let e = raw.clone().validate(true).unwrap_err().to_string();
        assert!(e.contains("encrypt"), "{e}");
        let mut raw = raw;
        raw.encrypt = None;
        let c = raw.validate(true).unwrap();
        assert_eq!(c.services.len(), 2);
    }

    #[test]
    fn dns_settings_map_onto_the_dns_config() {
        let raw: RawConfig = serde_json::from_str(
            r#"{"domain":"mesh.","alt_domain":"alt","recursors":["127.0.0.53","127.0.0.54:5353"],
                "dns_config":{"node_ttl":"10s","service_ttl":{"*":"5s","web":"30s"},"only_passing":true,"soa":{"min_ttl":60}}}"#,
        )
        .unwrap();
        let c = raw.validate(true).unwrap();
        assert_eq!((c.dns.domain.as_str(), c.dns.alt_domain.as_deref()), ("mesh.", Some("alt.")));
        assert_eq!(c.dns.recursors.len(), 2);
        assert_eq!(c.dns.recursors[0].port(), 53);
        assert_eq!(c.dns.service_ttl["web"], std::time::Duration::from_secs(30));
        assert!(c.dns.only_passing);
        let bad: RawConfig = serde_json::from_str(r#"{"dns_config":{"node_ttl":"soon"},"recursors":["nope"]}"#).unwrap();
        let e = bad.validate(true).unwrap_err().to_string();
        assert!(e.contains("dns_config.node_ttl") && e.contains("recursors"), "{e}");
    }

    #[test]
    fn shipped_example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            parse_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
        assert!(n > 0);
    }
}
