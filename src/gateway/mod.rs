//! The mesh gateway: routes connections by the server name of their TLS ClientHello, without
//! decrypting them.
//!
//! - `<svc>.<ns>.<dc>.internal.<trust-domain>` (and `<subset>.<svc>...`): a healthy instance of
//!   the service's mesh endpoints (its sidecars) in this datacenter, or, for another
//!   datacenter, that datacenter's gateways (from federation states);
//! - `<node>.server.<dc>.<domain>` and `server.<dc>.<domain>`: that server, or any server, of
//!   this datacenter, or the gateways of the named one (server RPC between datacenters
//!   federated through gateways alone);
//! - anything else is refused, never forwarded.
//!
//! Connections from this datacenter (the LAN address) may go anywhere; connections arriving
//! from other gateways (the WAN address, TCP or the QUIC tunnel) only to this datacenter, so a
//! gateway is never an open relay between two others. What the gateway knows comes from its
//! agent's HTTP API with blocking queries (the same source as sidecars).

pub mod sni;
pub mod tunnel;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::proxy::balance::Balancer;
use crate::proxy::follow_health;
use crate::proxy::source::{AgentApi, enc, follow};
use crate::proxy::tls::MeshTls;
use sni::Target;
use tunnel::{Io, Transport, Tunnel};

/// How long a peer has to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const LOCAL_CONNECT: Duration = Duration::from_secs(5);
/// Instances (or gateways) tried for one connection.
const ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("registering the gateway with the agent failed: {0}")]
    Register(String),
}

/// Where a gateway listens and what it registers as.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This datacenter's services and servers reach the gateway here.
    pub lan: SocketAddr,
    /// Other datacenters' gateways reach it here (TCP, and UDP for QUIC): what it advertises.
    pub wan: SocketAddr,
    /// Where it listens for them, when that differs from `wan` (behind NAT or a load
    /// balancer). `None`: `wan` if it is an address of this host, else the LAN listener
    /// serves both sides.
    pub wan_bind: Option<SocketAddr>,
    /// QUIC between gateways when UDP gets through (the default); false: TCP only.
    pub quic: bool,
    /// Its service name and ID (`mesh-gateway` by default).
    pub service: String,
    /// Deregister the service on a clean stop (a gateway registered through another agent).
    pub deregister_on_stop: bool,
}

/// Whether a followed endpoint set has had its first answer.
type Followed = tokio::sync::watch::Receiver<bool>;

/// What the gateway knows, kept current by blocking queries.
struct Routes {
    datacenter: String,
    domain: String,
    trust_domain: RwLock<String>,
    /// Other datacenters' gateways (WAN addresses), from federation states.
    remote: RwLock<HashMap<String, Vec<SocketAddr>>>,
    /// This datacenter's servers: (node, RPC address).
    servers: RwLock<Vec<(String, SocketAddr)>>,
    /// Mesh endpoints of local services, followed once asked for.
    services: Mutex<HashMap<String, (Arc<Balancer>, Followed)>>,
    /// Remote gateways that just failed, tried last for a while.
    failed: Mutex<HashMap<SocketAddr, std::time::Instant>>,
}

pub struct Gateway {
    pub api: Arc<dyn AgentApi>,
    pub config: GatewayConfig,
    pub metrics: Arc<tunnel::Metrics>,
    /// Called once the gateway listens and is registered (readiness).
    pub on_ready: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Gateway {
    pub fn new(api: Arc<dyn AgentApi>, config: GatewayConfig) -> Gateway {
        Gateway { api, config, metrics: Arc::default(), on_ready: None }
    }

    /// The registration Consul's `-gateway=mesh -register -expose-servers` makes.
    pub fn registration(&self) -> Value {
        let c = &self.config;
        json!({
            "Kind": "mesh-gateway",
            "ID": c.service,
            "Name": c.service,
            "Address": c.lan.ip().to_string(),
            "Port": c.lan.port(),
            "Meta": { "consul-wan-federation": "1" },
            "TaggedAddresses": {
                "lan": { "Address": c.lan.ip().to_string(), "Port": c.lan.port() },
                "wan": { "Address": c.wan.ip().to_string(), "Port": c.wan.port() },
            },
            "Check": { "Name": "mesh-gateway listening", "TCP": c.lan.to_string(), "Interval": "10s", "DeregisterCriticalServiceAfter": "6h" },
        })
    }

    /// Listen, register, route until `stop`.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), GatewayError> {
        let c = self.config.clone();
        let lan = TcpListener::bind(c.lan).await.map_err(|error| GatewayError::Bind { addr: c.lan, error })?;
        let wan_bind = c.wan_bind.unwrap_or(c.wan);
        let wan = if wan_bind == c.lan {
            None
        } else {
            match TcpListener::bind(wan_bind).await {
                Ok(l) => Some(l),
                // A load balancer's address: its traffic arrives at the LAN listener.
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable && c.wan_bind.is_none() => {
                    info!(wan = %c.wan, "the WAN address is not on this host (a load balancer's?); other gateways arrive at the LAN listener");
                    None
                }
                Err(error) => return Err(GatewayError::Bind { addr: wan_bind, error }),
            }
        };
        let udp = if wan.is_some() { wan_bind } else { c.lan };
        // Identity (for QUIC between gateways) and trust.
        let tls = MeshTls::new();
        let tunnel =
            Arc::new(if c.quic { Tunnel::new(udp, &tls, &c.service, self.metrics.clone()) } else { Tunnel::tcp_only(&tls, self.metrics.clone()) });

        let me = self.self_info(&stop).await;
        let Some((datacenter, domain)) = me else { return Ok(()) };
        let routes = Arc::new(Routes {
            datacenter,
            domain,
            trust_domain: RwLock::new(String::new()),
            remote: RwLock::default(),
            servers: RwLock::default(),
            services: Mutex::default(),
            failed: Mutex::default(),
        });
        self.register(&stop).await?;
        self.follow_everything(&routes, &tls, &stop);
        if let Some(ready) = self.on_ready.take() {
            ready();
        }

        let shared = Arc::new(Shared { api: self.api.clone(), routes: routes.clone(), tunnel: tunnel.clone(), metrics: self.metrics.clone() });
        tokio::spawn(accept_tcp(lan, false, shared.clone(), stop.clone()));
        if let Some(wan) = wan {
            tokio::spawn(accept_tcp(wan, true, shared.clone(), stop.clone()));
        }
        if let Some(ep) = tunnel.endpoint().cloned() {
            tokio::spawn(accept_quic(ep, shared.clone(), stop.clone()));
        }
        info!(lan = %c.lan, wan = %c.wan, datacenter = %routes.datacenter, "mesh gateway routing (TCP, and QUIC on UDP {udp})");
        stop.cancelled().await;
        if let Some(ep) = tunnel.endpoint() {
            ep.close(quinn::VarInt::from_u32(0), b"gateway stopping");
        }
        if c.deregister_on_stop {
            let _ = self.api.request("PUT", format!("/v1/agent/service/deregister/{}", enc(&c.service)), Vec::new()).await;
        }
        Ok(())
    }

    /// The agent's datacenter and DNS domain, retried until the agent answers.
    async fn self_info(&self, stop: &CancellationToken) -> Option<(String, String)> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.api.get("/v1/agent/self".into()).await.and_then(|r| r.json()) {
                Ok(v) if v["Config"]["Datacenter"].is_string() => {
                    let dc = v["Config"]["Datacenter"].as_str().unwrap_or_default().to_string();
                    let domain = v["DebugConfig"]["DNSDomain"].as_str().unwrap_or("consul.").trim_end_matches('.').to_string();
                    return Some((dc, domain));
                }
                other => debug!(answer = ?other.err(), "waiting for the agent"),
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn register(&self, stop: &CancellationToken) -> Result<(), GatewayError> {
        let body = serde_json::to_vec(&self.registration()).map_err(|e| GatewayError::Register(e.to_string()))?;
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.api.request("PUT", "/v1/agent/service/register".into(), body.clone()).await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) if (400..500).contains(&r.status) => return Err(GatewayError::Register(String::from_utf8_lossy(&r.body).into_owned())),
                other => debug!(answer = ?other.map(|r| r.status), "registering the gateway; retrying"),
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Roots and the gateway's leaf (QUIC identity), other datacenters' gateways, this
    /// datacenter's servers.
    fn follow_everything(&self, routes: &Arc<Routes>, tls: &Arc<MeshTls>, stop: &CancellationToken) {
        let mut roots = follow(self.api.clone(), "/v1/agent/connect/ca/roots".into(), false, stop.clone());
        let mut leaf = follow(self.api.clone(), format!("/v1/agent/connect/ca/leaf/{}", enc(&self.config.service)), false, stop.clone());
        let mut fed = follow(self.api.clone(), "/v1/internal/federation-states/mesh-gateways".into(), false, stop.clone());
        let mut servers = follow(self.api.clone(), "/v1/health/service/consul?passing".into(), false, stop.clone());
        let (routes, tls, stop) = (routes.clone(), tls.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = roots.changed() => {
                        if r.is_err() { return }
                        if let Some(Ok(v)) = roots.borrow_and_update().clone().map(|r| r.json()) {
                            let pems: Vec<String> = v["Roots"].as_array().into_iter().flatten().filter_map(|r| r["RootCert"].as_str().map(str::to_string)).collect();
                            let td = v["TrustDomain"].as_str().unwrap_or_default().to_string();
                            if let Err(e) = tls.set_roots(&pems, &td) {
                                debug!(error = %e, "no usable mesh roots yet");
                            }
                            *routes.trust_domain.write() = td.to_ascii_lowercase();
                        }
                    }
                    r = leaf.changed() => {
                        if r.is_err() { return }
                        if let Some(Ok(v)) = leaf.borrow_and_update().clone().map(|r| r.json())
                            && let (Some(c), Some(k)) = (v["CertPEM"].as_str(), v["PrivateKeyPEM"].as_str())
                            && let Err(e) = tls.set_leaf(c, k)
                        {
                            warn!(error = %e, "cannot use the gateway's leaf certificate");
                        }
                    }
                    r = fed.changed() => {
                        if r.is_err() { return }
                        if let Some(Ok(v)) = fed.borrow_and_update().clone().map(|r| r.json()) {
                            let map: HashMap<String, Vec<SocketAddr>> = v
                                .as_object()
                                .into_iter()
                                .flatten()
                                .map(|(dc, list)| (dc.to_ascii_lowercase(), crate::federation::gateway_addresses(list.as_array().map(Vec::as_slice).unwrap_or_default(), true)))
                                .collect();
                            debug!(gateways = ?map, "other datacenters' gateways");
                            *routes.remote.write() = map;
                        }
                    }
                    r = servers.changed() => {
                        if r.is_err() { return }
                        if let Some(Ok(v)) = servers.borrow_and_update().clone().map(|r| r.json()) {
                            let list: Vec<(String, SocketAddr)> = v
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|e| {
                                    let node = e["Node"]["Node"].as_str()?.to_ascii_lowercase();
                                    let addr = crate::federation::gateway_address(e, false)?;
                                    Some((node, addr))
                                })
                                .collect();
                            *routes.servers.write() = list;
                        }
                    }
                }
            }
        });
    }
}

struct Shared {
    api: Arc<dyn AgentApi>,
    routes: Arc<Routes>,
    tunnel: Arc<Tunnel>,
    metrics: Arc<tunnel::Metrics>,
}

async fn accept_tcp(listener: TcpListener, from_wan: bool, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { debug!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(20)).await; continue; }
            },
        };
        let _ = tcp.set_nodelay(true);
        if from_wan {
            shared.metrics.in_tcp.fetch_add(1, Ordering::Relaxed);
        }
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let transport = from_wan.then_some(Transport::Tcp);
            route(Box::new(tcp), peer.to_string(), transport, &shared, &stop).await;
        });
    }
}

async fn accept_quic(endpoint: quinn::Endpoint, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            i = endpoint.accept() => match i { Some(i) => i, None => return },
        };
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => return debug!(%peer, error = %e, "QUIC handshake from a gateway failed"),
            };
            loop {
                let (send, recv) = tokio::select! {
                    _ = stop.cancelled() => return,
                    s = conn.accept_bi() => match s { Ok(s) => s, Err(_) => return },
                };
                shared.metrics.in_quic.fetch_add(1, Ordering::Relaxed);
                let (shared, stop) = (shared.clone(), stop.clone());
                tokio::spawn(async move {
                    route(Box::new(tokio::io::join(recv, send)), peer.to_string(), Some(Transport::Quic), &shared, &stop).await;
                });
            }
        });
    }
}

/// Route one connection. `from_wan` is the transport it arrived on from another gateway, or
/// `None` for this datacenter's side.
async fn route(mut inbound: Box<dyn Io>, peer: String, from_wan: Option<Transport>, shared: &Shared, stop: &CancellationToken) {
    let refuse = |why: String| {
        shared.metrics.refused.fetch_add(1, Ordering::Relaxed);
        debug!(%peer, reason = %why, "connection refused");
    };
    let (hello, name) = match sni::read_client_hello(&mut inbound, HELLO_TIMEOUT).await {
        Ok(x) => x,
        // A connect-and-close (a TCP health check) is not a refusal.
        Err(sni::HelloError::Closed) => return,
        Err(e) => return refuse(e.to_string()),
    };
    let routes = &shared.routes;
    let td = routes.trust_domain.read().clone();
    let Some(target) = sni::parse(&name, &td, &routes.domain) else {
        return refuse(format!("{name:?} is not a name this gateway routes"));
    };
    if !target.datacenter().eq_ignore_ascii_case(&routes.datacenter) {
        if from_wan.is_some() {
            return refuse(format!("{name:?} is for datacenter {}, and connections from other gateways only go to this one", target.datacenter()));
        }
        return to_remote(inbound, &hello, &target, shared, stop).await;
    }
    let mut outbound = match dial_local(&target, &hello, shared).await {
        Ok(s) => s,
        Err(e) => return refuse(e),
    };
    shared.metrics.local.fetch_add(1, Ordering::Relaxed);
    let moved = splice(&mut inbound, &mut outbound, stop).await;
    if let Some(t) = from_wan {
        shared.metrics.count_bytes(t, moved);
    }
}

/// A connection for this datacenter: the service's mesh endpoints or the servers.
async fn dial_local(target: &Target, hello: &[u8], shared: &Shared) -> Result<TcpStream, String> {
    let candidates: Vec<SocketAddr> = match target {
        Target::Server { node: Some(node), .. } => shared.routes.servers.read().iter().filter(|(n, _)| n == node).map(|(_, a)| *a).collect(),
        Target::Server { node: None, .. } => {
            let mut all: Vec<SocketAddr> = shared.routes.servers.read().iter().map(|(_, a)| *a).collect();
            all.shuffle(&mut rand::rng());
            all.truncate(ATTEMPTS);
            all
        }
        Target::Service { service, subset, .. } => {
            let balancer = service_endpoints(service, subset.as_deref(), shared).await;
            let picked = balancer.pick(ATTEMPTS);
            let mut out = Vec::new();
            for e in picked {
                match connect_with_hello(e.addr, hello).await {
                    Ok(s) => {
                        balancer.success(&e);
                        return Ok(s);
                    }
                    Err(err) => {
                        balancer.failure(&e);
                        out.push(err);
                    }
                }
            }
            return Err(if out.is_empty() { format!("no healthy instance of {service}") } else { out.join("; ") });
        }
    };
    if candidates.is_empty() {
        return Err("no such server in this datacenter".into());
    }
    let mut errs = Vec::new();
    for a in candidates {
        match connect_with_hello(a, hello).await {
            Ok(s) => return Ok(s),
            Err(e) => errs.push(e),
        }
    }
    Err(errs.join("; "))
}

async fn connect_with_hello(addr: SocketAddr, hello: &[u8]) -> Result<TcpStream, String> {
    let mut s = tokio::time::timeout(LOCAL_CONNECT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("{addr}: connect timed out"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    s.write_all(hello).await.map_err(|e| format!("{addr}: {e}"))?;
    Ok(s)
}

/// The balancer of a local service's mesh endpoints (of one subset: the service resolver's
/// filter for it), followed from the first time it is asked for (waiting a little for the
/// first answer).
async fn service_endpoints(service: &str, subset: Option<&str>, shared: &Shared) -> Arc<Balancer> {
    let key = match subset {
        Some(s) => format!("{s}.{service}"),
        None => service.to_string(),
    };
    let (balancer, mut ready) = {
        let mut services = shared.routes.services.lock();
        if let Some((b, ready)) = services.get(&key) {
            (b.clone(), ready.clone())
        } else {
            let b = Arc::new(Balancer::default());
            let (tx, ready) = tokio::sync::watch::channel(false);
            let health = format!("/v1/health/connect/{}?passing", enc(service));
            match subset {
                None => follow_endpoints(shared.api.clone(), health, b.clone(), tx, CancellationToken::new()),
                Some(subset) => {
                    tokio::spawn(follow_subset(shared.api.clone(), service.to_string(), subset.to_string(), health, b.clone(), tx));
                }
            }
            services.insert(key, (b.clone(), ready.clone()));
            (b, ready)
        }
    };
    if !*ready.borrow() {
        let _ = tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r)).await;
    }
    balancer
}

/// Keep `balancer` set from a health path's blocking queries until `stop`.
fn follow_endpoints(api: Arc<dyn AgentApi>, path: String, balancer: Arc<Balancer>, ready: tokio::sync::watch::Sender<bool>, stop: CancellationToken) {
    tokio::spawn(follow_health(api, path, balancer, Some(ready), stop));
}

/// A subset's endpoints: the service resolver's filter for `subset`, followed, and the health
/// query with that filter re-followed whenever it changes. A subset the resolver does not
/// define has no endpoints (its connections are refused, never sent to other instances).
async fn follow_subset(
    api: Arc<dyn AgentApi>,
    service: String,
    subset: String,
    health: String,
    balancer: Arc<Balancer>,
    ready: tokio::sync::watch::Sender<bool>,
) {
    let mut rx = follow(api.clone(), format!("/v1/config/service-resolver/{}", enc(&service)), false, CancellationToken::new());
    let mut current: Option<(Option<String>, CancellationToken)> = None;
    loop {
        if let Some(r) = rx.borrow_and_update().clone() {
            let entry = if r.status == 200 { r.json().ok() } else { None };
            let def = entry.as_ref().and_then(|e| e.get("Subsets")).and_then(|s| s.get(&subset)).cloned();
            let filter = def.as_ref().map(|d| d.get("Filter").and_then(|f| f.as_str()).unwrap_or_default().to_string());
            if current.as_ref().map(|(f, _)| f) != Some(&filter) {
                if let Some((_, stop)) = current.take() {
                    stop.cancel();
                }
                let stop = CancellationToken::new();
                match &filter {
                    Some(f) if !f.is_empty() => {
                        follow_endpoints(api.clone(), format!("{health}&filter={}", enc(f)), balancer.clone(), ready.clone(), stop.clone())
                    }
                    Some(_) => follow_endpoints(api.clone(), health.clone(), balancer.clone(), ready.clone(), stop.clone()),
                    None => {
                        balancer.set(Vec::new());
                        ready.send_replace(true);
                    }
                }
                current = Some((filter, stop));
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// A connection for another datacenter: through its gateways, over the tunnel.
async fn to_remote(mut inbound: Box<dyn Io>, hello: &[u8], target: &Target, shared: &Shared, stop: &CancellationToken) {
    let dc = target.datacenter().to_ascii_lowercase();
    let mut gateways = shared.routes.remote.read().get(&dc).cloned().unwrap_or_default();
    gateways.shuffle(&mut rand::rng());
    {
        let failed = shared.routes.failed.lock();
        gateways.sort_by_key(|a| failed.get(a).is_some_and(|t| t.elapsed() < Duration::from_secs(30)));
    }
    if gateways.is_empty() {
        shared.metrics.refused.fetch_add(1, Ordering::Relaxed);
        return debug!(datacenter = %dc, "no known gateway of that datacenter");
    }
    for addr in gateways.into_iter().take(ATTEMPTS) {
        match shared.tunnel.open(addr, hello).await {
            Ok((mut outbound, transport)) => {
                shared.routes.failed.lock().remove(&addr);
                let moved = splice(&mut inbound, &mut outbound, stop).await;
                shared.metrics.count_bytes(transport, moved);
                return;
            }
            Err(e) => {
                debug!(gateway = %addr, datacenter = %dc, error = %e, "remote gateway failed; trying another");
                shared.routes.failed.lock().insert(addr, std::time::Instant::now());
            }
        }
    }
    shared.metrics.refused.fetch_add(1, Ordering::Relaxed);
}

/// Copy both ways until both sides finish (or the gateway stops); returns the bytes moved.
async fn splice<A: Io + ?Sized, B: Io + ?Sized>(a: &mut A, b: &mut B, stop: &CancellationToken) -> u64 {
    tokio::select! {
        r = tokio::io::copy_bidirectional(a, b) => r.map(|(x, y)| x + y).unwrap_or(0),
        _ = stop.cancelled() => 0,
    }
}
