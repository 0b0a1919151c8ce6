//! Cross-datacenter routing: which servers each datacenter has; how far each datacenter is;
//! and the one call every cross-datacenter request goes through ([`Router::call`]: "any
//! healthy server of dc2").
//!
//! Two ways to reach another datacenter, chosen by configuration:
//! - **WAN federation** (traditional): the WAN gossip pool of servers lists every server of every
//!   datacenter, and calls dial them directly;
//! - **through mesh gateways** ([`Gateways`]): servers see no other datacenter's servers. A call
//!   dials a gateway instead (this datacenter's own, else the target datacenter's gateways from
//!   its federation state, else for the primary the `primary_gateways` fallback) with the very
//!   same TLS, SNI `server.<dc>.<domain>`; the gateways route by that name and the TLS session
//!   stays end to end between the two servers. Addresses that just failed for a datacenter are
//!   tried last for a while, so a dead gateway is skipped.
//!
//! Distances: every [`PROBE_INTERVAL`] this server pings every other server of the WAN pool
//! (`ClusterRpc::Ping`, whose answer carries the other's network coordinate) and feeds the
//! round trips into its own Vivaldi coordinate ([`crate::coordinate`]). Datacenters are ordered by the
//! median estimated round trip to their servers' coordinates, as Consul orders them (a
//! datacenter not probed yet comes last).

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::cluster::{ClusterReply, ClusterRpc};
pub use crate::coordinate::Coordinate;
use crate::membership::{Gossip, MemberStatus};
use crate::rpc::{self, ErrorCode, RpcClient, RpcError, Service};
use crate::state::catalog::{CatalogAnswer, CatalogQuery};

pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    local_dc: String,
    domain: String,
    /// The WAN pool; `None` on a server with WAN gossip disabled (it knows only itself).
    wan: Option<Gossip>,
    tls: Arc<rustls::ClientConfig>,
    /// One RPC client per remote datacenter: each verifies `server.<dc>.<domain>`.
    clients: Mutex<HashMap<String, RpcClient>>,
    /// Our name in the WAN pool (`<node>.<dc>`).
    wan_name: String,
    coord: Mutex<crate::coordinate::Client>,
    /// The last coordinate each other server reported: WAN name -> (datacenter, coordinate).
    known: Mutex<HashMap<String, (String, Coordinate)>>,
    /// Set when datacenters federate through mesh gateways.
    gateways: std::sync::OnceLock<Gateways>,
}

/// How long an address that failed for a datacenter goes to the end of the list.
const FAILED_FOR: Duration = Duration::from_secs(30);

/// What this datacenter knows about gateways: its own (LAN addresses) and every other
/// datacenter's (WAN addresses, from federation states).
#[derive(Debug, Clone, Default)]
pub struct GatewayView {
    pub local: Vec<SocketAddr>,
    pub remote: HashMap<String, Vec<SocketAddr>>,
}

/// Federation through mesh gateways.
#[derive(Clone)]
pub struct Gateways {
    pub primary: String,
    /// Reads the replicated state: this datacenter's gateways and the federation states.
    pub view: Arc<dyn Fn() -> GatewayView + Send + Sync>,
    /// `primary_gateways` as configured (`host:port`, names allowed).
    pub fallback: Vec<String>,
    pub fallback_interval: Duration,
    resolved: Arc<Mutex<Vec<SocketAddr>>>,
    failed: Arc<Mutex<HashMap<(String, SocketAddr), Instant>>>,
}

impl Gateways {
    pub fn new(primary: String, view: Arc<dyn Fn() -> GatewayView + Send + Sync>, fallback: Vec<String>, fallback_interval: Duration) -> Gateways {
        Gateways { primary, view, fallback, fallback_interval, resolved: Arc::default(), failed: Arc::default() }
    }

    /// Resolve `primary_gateways` (names may move) now.
    pub async fn resolve_fallback(&self) {
        let mut out = Vec::new();
        for g in &self.fallback {
            let target = if g.contains(':') { g.clone() } else { format!("{g}:{}", crate::config::DEFAULT_GATEWAY_PORT) };
            match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(target.clone())).await {
                Ok(Ok(addrs)) => out.extend(addrs),
                Ok(Err(e)) => debug!(gateway = %g, error = %e, "cannot resolve a primary gateway"),
                Err(_) => debug!(gateway = %g, "resolving a primary gateway timed out"),
            }
        }
        out.sort();
        out.dedup();
        let mut r = self.resolved.lock();
        if *r != out {
            tracing::info!(gateways = ?out, "updated the fallback list of primary mesh gateways");
            *r = out;
        }
    }

    /// Addresses to dial for `dc`, best first: this datacenter's gateways, then `dc`'s own, then
    /// (for the primary) the configured fallback; each group shuffled, recent failures last.
    fn addresses(&self, dc: &str) -> Vec<SocketAddr> {
        let view = (self.view)();
        let mut rng = rand::rng();
        let mut out: Vec<SocketAddr> = Vec::new();
        let mut push_group = |mut group: Vec<SocketAddr>, out: &mut Vec<SocketAddr>| {
            group.shuffle(&mut rng);
            for a in group {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        };
        push_group(view.local.clone(), &mut out);
        let remote = view.remote.iter().find(|(d, _)| d.eq_ignore_ascii_case(dc)).map(|(_, a)| a.clone()).unwrap_or_default();
        push_group(remote, &mut out);
        if dc.eq_ignore_ascii_case(&self.primary) {
            push_group(self.resolved.lock().clone(), &mut out);
        }
        let failed = self.failed.lock();
        let key = dc.to_ascii_lowercase();
        out.sort_by_key(|a| failed.get(&(key.clone(), *a)).is_some_and(|t| t.elapsed() < FAILED_FOR));
        out
    }

    fn failed(&self, dc: &str, addr: SocketAddr) {
        self.failed.lock().insert((dc.to_ascii_lowercase(), addr), Instant::now());
    }

    fn succeeded(&self, dc: &str, addr: SocketAddr) {
        self.failed.lock().remove(&(dc.to_ascii_lowercase(), addr));
    }

    fn datacenters(&self) -> Vec<String> {
        let mut v: Vec<String> = (self.view)().remote.keys().cloned().collect();
        v.push(self.primary.clone());
        v
    }
}

impl Router {
    pub fn new(local_dc: String, domain: String, node_name: &str, wan: Option<Gossip>, tls: Arc<rustls::ClientConfig>) -> Router {
        Router {
            inner: Arc::new(Inner {
                wan_name: format!("{node_name}.{local_dc}"),
                local_dc,
                domain,
                wan,
                tls,
                clients: Mutex::default(),
                coord: Mutex::default(),
                known: Mutex::default(),
                gateways: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Federate through mesh gateways from now on (set once, at start).
    pub fn set_gateways(&self, g: Gateways) {
        let _ = self.inner.gateways.set(g);
    }

    pub fn through_gateways(&self) -> bool {
        self.inner.gateways.get().is_some()
    }

    /// Keep the `primary_gateways` fallback resolved until `shutdown`.
    pub async fn run_fallback_resolver(self, shutdown: CancellationToken) {
        // Agent tasks run until shutdown, also when there is nothing to resolve.
        let Some(g) = self.inner.gateways.get().cloned().filter(|g| !g.fallback.is_empty()) else {
            return shutdown.cancelled().await;
        };
        loop {
            g.resolve_fallback().await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(g.fallback_interval) => {}
            }
        }
    }

    /// What this server answers a `Ping` with.
    pub fn pong(&self) -> ClusterReply {
        ClusterReply::Pong { node: self.inner.wan_name.clone(), datacenter: self.inner.local_dc.clone(), coord: self.coordinate() }
    }

    pub fn coordinate(&self) -> Coordinate {
        self.inner.coord.lock().coordinate()
    }

    /// Every datacenter with the coordinates of its servers that this server knows (its own
    /// included), in `datacenters()` order.
    pub fn coordinates(&self) -> Vec<(String, Vec<(String, Coordinate)>)> {
        let known = self.inner.known.lock().clone();
        self.datacenters()
            .into_iter()
            .map(|dc| {
                let mut nodes: Vec<(String, Coordinate)> =
                    known.iter().filter(|(_, (d, _))| d.eq_ignore_ascii_case(&dc)).map(|(n, (_, c))| (n.clone(), c.clone())).collect();
                if self.is_local(&dc) {
                    nodes.push((self.inner.wan_name.clone(), self.coordinate()));
                }
                nodes.sort_by(|a, b| a.0.cmp(&b.0));
                (dc, nodes)
            })
            .collect()
    }

    /// The median estimated round trip from us to `dc`'s servers, from coordinates.
    fn estimated_rtt(&self, dc: &str, known: &HashMap<String, (String, Coordinate)>, me: &Coordinate) -> Option<Duration> {
        let mut d: Vec<Duration> = known.values().filter(|(d, _)| d.eq_ignore_ascii_case(dc)).map(|(_, c)| me.distance_to(c)).collect();
        d.sort();
        d.get(d.len() / 2).copied()
    }

    pub fn local_dc(&self) -> &str {
        &self.inner.local_dc
    }

    pub fn is_local(&self, dc: &str) -> bool {
        dc.is_empty() || dc.eq_ignore_ascii_case(&self.inner.local_dc)
    }

    /// Where to dial for `dc`: its alive servers as the WAN pool sees them, or through
    /// gateways, the gateways to try in order.
    pub fn servers(&self, dc: &str) -> Vec<SocketAddr> {
        if let Some(g) = self.inner.gateways.get() {
            return g.addresses(dc);
        }
        let Some(wan) = &self.inner.wan else { return Vec::new() };
        wan.members()
            .into_iter()
            .filter(|m| m.status == MemberStatus::Alive && m.tags.get("dc").is_some_and(|d| d.eq_ignore_ascii_case(dc)))
            .filter_map(|m| m.tags.get("port").and_then(|p| p.parse::<u16>().ok()).map(|p| SocketAddr::new(m.addr.ip(), p)))
            .collect()
    }

    /// Every datacenter the WAN pool has heard of (whatever its servers' state), this one
    /// first, then by measured round trip, unmeasured ones last, ties by name.
    pub fn datacenters(&self) -> Vec<String> {
        let mut dcs: BTreeSet<String> = BTreeSet::from([self.inner.local_dc.clone()]);
        if let Some(g) = self.inner.gateways.get() {
            dcs.extend(g.datacenters());
        }
        if let Some(wan) = &self.inner.wan {
            dcs.extend(wan.members().into_iter().filter_map(|m| m.tags.get("dc").cloned()));
        }
        let known = self.inner.known.lock().clone();
        let me = self.coordinate();
        let mut list: Vec<String> = dcs.into_iter().collect();
        list.sort_by_key(|dc| {
            let distance = self.estimated_rtt(dc, &known, &me).unwrap_or(Duration::MAX);
            (!self.is_local(dc), distance, dc.clone())
        });
        list
    }

    fn client(&self, dc: &str) -> RpcClient {
        let mut clients = self.inner.clients.lock();
        clients
            .entry(dc.to_string())
            .or_insert_with(|| RpcClient::new(self.inner.tls.clone(), crate::tls::rpc_server_name(dc, &self.inner.domain)))
            .clone()
    }

    /// Send one request to a server of `dc`: the alive ones in random order, moving on while a
    /// server cannot be reached. With none left, the error says "No path to datacenter".
    pub async fn call(&self, dc: &str, service: Service, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, RpcError> {
        let gateways = self.inner.gateways.get();
        let mut servers = self.servers(dc);
        if gateways.is_none() {
            servers.shuffle(&mut rand::rng());
        }
        let client = self.client(dc);
        let mut last = String::from(if gateways.is_some() { "no known mesh gateway" } else { "no known server" });
        for addr in servers {
            match client.call(addr, service, body.clone(), timeout).await {
                Err(e) if e.code == ErrorCode::Unreachable => {
                    debug!(%dc, %addr, error = %e, "remote server unreachable; trying another");
                    if let Some(g) = gateways {
                        g.failed(dc, addr);
                    }
                    last = e.message;
                }
                other => {
                    if let Some(g) = gateways {
                        g.succeeded(dc, addr);
                    }
                    return other;
                }
            }
        }
        Err(RpcError::new(ErrorCode::Unreachable, format!("No path to datacenter {dc} ({last})")))
    }

    /// A catalog read answered by a server of `dc`.
    pub async fn read(&self, dc: &str, query: CatalogQuery) -> Result<CatalogAnswer, RpcError> {
        let body = rpc::encode(&ClusterRpc::Read { dc: None, query })?;
        match rpc::decode::<ClusterReply>(&self.call(dc, Service::Cluster, body, READ_TIMEOUT).await?)? {
            ClusterReply::Read(a) => Ok(*a),
            other => Err(RpcError::new(ErrorCode::Internal, format!("unexpected reply {other:?}"))),
        }
    }

    /// Measure the other servers of the WAN pool until `shutdown`.
    pub async fn run_probes(self, shutdown: CancellationToken) {
        loop {
            self.probe_all().await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
        }
    }

    /// Ping every other alive server of the pool once: update our coordinate, and theirs as we
    /// know it.
    async fn probe_all(&self) {
        if self.inner.gateways.get().is_some() {
            return self.probe_through_gateways().await;
        }
        let Some(wan) = &self.inner.wan else { return };
        let body = match rpc::encode(&ClusterRpc::Ping) {
            Ok(b) => b,
            Err(_) => return,
        };
        let others: Vec<_> = wan.members().into_iter().filter(|m| m.status == MemberStatus::Alive && m.name != self.inner.wan_name).collect();
        let alive: BTreeSet<String> = others.iter().map(|m| m.name.clone()).collect();
        self.inner.known.lock().retain(|name, _| alive.contains(name));
        for m in others {
            let (Some(dc), Some(port)) = (m.tags.get("dc"), m.tags.get("port").and_then(|p| p.parse::<u16>().ok())) else { continue };
            let addr = SocketAddr::new(m.addr.ip(), port);
            let client = self.client(dc);
            let started = Instant::now();
            let reply = client.call(addr, Service::Cluster, body.clone(), PROBE_TIMEOUT).await.and_then(|b| rpc::decode::<ClusterReply>(&b));
            let rtt = started.elapsed();
            let Ok(ClusterReply::Pong { node, datacenter, coord }) = reply else {
                debug!(server = %m.name, "WAN probe failed");
                continue;
            };
            self.inner.coord.lock().update(&node, &coord, rtt);
            self.inner.known.lock().insert(node, (datacenter, coord));
        }
    }
}

impl Router {
    /// Through gateways there is no member list: ping one server of each other datacenter.
    async fn probe_through_gateways(&self) {
        let Ok(body) = rpc::encode(&ClusterRpc::Ping) else { return };
        let mut alive = BTreeSet::new();
        for dc in self.datacenters().into_iter().filter(|d| !self.is_local(d)) {
            let started = Instant::now();
            let reply = self.call(&dc, Service::Cluster, body.clone(), PROBE_TIMEOUT).await.and_then(|b| rpc::decode::<ClusterReply>(&b));
            let rtt = started.elapsed();
            let Ok(ClusterReply::Pong { node, datacenter, coord }) = reply else {
                debug!(%dc, "probe through the mesh gateways failed");
                continue;
            };
            self.inner.coord.lock().update(&node, &coord, rtt);
            alive.insert(node.clone());
            self.inner.known.lock().insert(node, (datacenter, coord));
        }
        let dcs: BTreeSet<String> = self.datacenters().into_iter().map(|d| d.to_ascii_lowercase()).collect();
        self.inner.known.lock().retain(|_, (dc, _)| dcs.contains(&dc.to_ascii_lowercase()));
    }
}

/// The addresses of the healthy gateways in a list of Consul `CheckServiceNode`s: with `wan`,
/// the `wan` tagged address (other datacenters' view), else the `lan` one; else the service's
/// address, else its node's. Gateways with a failing check are left out.
pub fn gateway_addresses(list: &[serde_json::Value], wan: bool) -> Vec<SocketAddr> {
    list.iter()
        .filter(|g| g["Checks"].as_array().is_none_or(|cs| cs.iter().all(|c| c["Status"] == "passing")))
        .filter_map(|g| gateway_address(g, wan))
        .collect()
}

/// One gateway's address as [`gateway_addresses`] picks it.
pub fn gateway_address(g: &serde_json::Value, wan: bool) -> Option<SocketAddr> {
    let svc = &g["Service"];
    let tagged = &svc["TaggedAddresses"][if wan { "wan" } else { "lan" }];
    let port = |p: &serde_json::Value| p.as_u64().filter(|p| *p > 0 && *p <= 65535).map(|p| p as u16);
    if let (Some(a), Some(p)) = (tagged["Address"].as_str().and_then(|a| a.parse().ok()), port(&tagged["Port"])) {
        return Some(SocketAddr::new(a, p));
    }
    let p = port(&svc["Port"])?;
    let a = svc["Address"].as_str().filter(|a| !a.is_empty()).or_else(|| g["Node"]["Address"].as_str())?;
    Some(SocketAddr::new(a.parse().ok()?, p))
}

/// Where a prepared query fails over to, in order: the `NearestN` nearest other datacenters of
/// `by_distance` (nearest first), then `Datacenters` as listed (or the `Targets` datacenters),
/// each at most once and never `local`.
pub fn failover_targets(f: &crate::state::query::QueryFailover, by_distance: &[String], local: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let nearest = by_distance.iter().filter(|d| !d.eq_ignore_ascii_case(local)).take(f.nearest_n.max(0) as usize);
    let listed = f.datacenters.iter().chain(f.targets.iter().map(|t| &t.datacenter)).filter(|d| !d.is_empty());
    for dc in nearest.chain(listed) {
        if !dc.eq_ignore_ascii_case(local) && !out.iter().any(|o| o.eq_ignore_ascii_case(dc)) {
            out.push(dc.clone());
        }
    }
    out
}

/// Run `query` in its failover datacenters ([`failover_targets`]) one after another, through
/// `read` (a catalog read in a datacenter), until one has instances. Returns that datacenter
/// and its answer, if any, and how many datacenters were asked.
pub async fn fail_over<F, Fut>(
    query: &crate::state::query::PreparedQuery,
    by_distance: &[String],
    local: &str,
    read: F,
) -> (Option<(String, Box<crate::state::catalog::QueryAnswer>)>, u64)
where
    F: Fn(String, CatalogQuery) -> Fut,
    Fut: std::future::Future<Output = Result<CatalogAnswer, String>>,
{
    let mut asked = 0;
    for target in failover_targets(&query.service.failover, by_distance, local) {
        asked += 1;
        match read(target.clone(), CatalogQuery::ExecuteQuery(Box::new(query.clone()))).await {
            Ok(CatalogAnswer::Query(Ok(Some(answer)))) if !answer.instances.is_empty() => return (Some((target, answer)), asked),
            Ok(_) => {}
            Err(e) => debug!(dc = %target, error = %e, "prepared query failover target failed"),
        }
    }
    (None, asked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::query::QueryFailover;

    #[test]
    fn failover_goes_to_the_nearest_then_the_listed_datacenters_once_each() {
        let by_distance: Vec<String> = ["dc1", "dc3", "dc2", "dc4"].iter().map(|s| s.to_string()).collect();
        let f = QueryFailover { nearest_n: 2, datacenters: vec!["dc4".into(), "dc3".into(), "dc1".into()], targets: vec![] };
        assert_eq!(failover_targets(&f, &by_distance, "dc1"), vec!["dc3", "dc2", "dc4"]);
        assert!(failover_targets(&QueryFailover::default(), &by_distance, "dc1").is_empty());
    }
}
