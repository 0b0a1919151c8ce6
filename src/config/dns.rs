//! DNS settings: the domain, recursors and Consul's `dns_config` block, as the DNS server
//! (`crate::dns`) uses them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// SOA timers of the domain, in seconds on the wire (Consul's `dns_config.soa`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoaConfig {
    /// Consul default 86400 s.
    pub expire: Duration,
    /// Also the SOA record's own TTL and the negative-caching TTL (RFC 2308). Consul default 0.
    pub min_ttl: Duration,
    /// Consul default 3600 s.
    pub refresh: Duration,
    /// Consul default 600 s.
    pub retry: Duration,
}

impl Default for SoaConfig {
    fn default() -> Self {
        Self { expire: Duration::from_secs(86_400), min_ttl: Duration::ZERO, refresh: Duration::from_secs(3_600), retry: Duration::from_secs(600) }
    }
}

/// DNS configuration; field names follow Consul's `domain`, `alt_domain`, `recursors`,
/// `recursor_timeout` and `dns_config { ... }` keys. Defaults are Consul's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// The domain answered authoritatively, e.g. `"consul."` (a trailing dot is optional).
    pub domain: String,
    /// A second domain answered like `domain`; answers use the name that was asked.
    pub alt_domain: Option<String>,
    /// TTL of node, addr and NS answers. Consul default 0.
    pub node_ttl: Duration,
    /// TTL of service answers by service name; `"*"` is the default and `"prefix*"` matches by
    /// prefix (longest prefix wins, an exact name beats any prefix). Unlisted services get 0.
    pub service_ttl: BTreeMap<String, Duration>,
    /// Answer only instances whose checks all pass (warning ones are dropped too).
    pub only_passing: bool,
    /// At most this many A/AAAA answers per service lookup; 0 = unlimited.
    pub a_record_limit: usize,
    /// Upstream resolvers for names outside the domain, tried in order.
    pub recursors: Vec<SocketAddr>,
    /// How long one recursor gets to answer (UDP plus the TCP retry). Consul default 2 s.
    pub recursor_timeout: Duration,
    pub soa: SoaConfig,
    /// At most this many answers in a UDP response to a client without EDNS0 (capped at 8, as
    /// in Consul); 0 = only the 512-byte size limit applies. Consul default 3.
    pub udp_answer_limit: usize,
    /// Set TC also when `udp_answer_limit` or `a_record_limit` trimmed the answer (Consul's
    /// meaning). Answers cut to fit the message size always set TC.
    pub enable_truncate: bool,
    /// Add a node's metadata as TXT records to the additional section of A/AAAA/SRV answers
    /// (Consul's `enable_additional_node_meta_txt`, default true).
    pub node_meta_txt: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            domain: "consul.".to_string(),
            alt_domain: None,
            node_ttl: Duration::ZERO,
            service_ttl: BTreeMap::new(),
            only_passing: false,
            a_record_limit: 0,
            recursors: Vec::new(),
            recursor_timeout: Duration::from_secs(2),
            soa: SoaConfig::default(),
            udp_answer_limit: 3,
            enable_truncate: false,
            node_meta_txt: true,
        }
    }
}
