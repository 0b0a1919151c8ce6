//! Trellis's own sidecar proxy: mutual TLS with SPIFFE identities, intentions enforced on every
//! new connection and re-checked on established ones, healthy upstream instances followed with
//! blocking queries, connect retries across instances and outlier ejection.
//!
//! One [`Proxy`] serves one `connect-proxy` registration:
//! - the public listener (the sidecar's address and port) accepts only TLS with a client
//!   certificate chaining to a current mesh root, authorises the caller's service against the
//!   destination's intentions, then splices bytes to the local app;
//! - each upstream listens on `LocalBindAddress:LocalBindPort` (127.0.0.1 by default), dials a
//!   healthy instance of the destination with our leaf, checks the server's identity, and
//!   splices.
//!
//! Everything it knows comes from the agent's HTTP API ([`source`]), so the proxy in the
//! agent's process and `trellis connect proxy --sidecar-for <id>` are the same code.
//! Leaves, roots, intentions and endpoints update without dropping established connections;
//! a deny intention closes the established connections it now forbids.

pub mod balance;
pub mod chain;
pub mod http;
pub mod source;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::connect::intention::{self, Intention};
use balance::Balancer;
use source::{AgentApi, ApiResponse, enc, follow};
use tls::MeshTls;

/// How long a peer has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Consul's defaults: 5 s to connect to an upstream instance or to the local app.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Instances tried for one upstream connection before it is given up.
const CONNECT_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("service {0:?} is not registered on this agent")]
    NotRegistered(String),
    #[error("service {0:?} is not a connect proxy")]
    NotAProxy(String),
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("{0}")]
    Config(String),
}

/// An upstream as the proxy serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamDef {
    pub name: String,
    /// Empty: this datacenter.
    pub datacenter: String,
    pub bind: SocketAddr,
    pub connect_timeout: Duration,
    /// `MeshGateway.Mode` of the upstream, else of the proxy ("" when neither sets one: config
    /// entries decide, else "none").
    pub mesh_gateway: String,
}

/// The proxy's registration, as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyDef {
    pub id: String,
    pub destination: String,
    pub public: SocketAddr,
    pub local_app: SocketAddr,
    pub local_connect_timeout: Duration,
    pub upstreams: Vec<UpstreamDef>,
}

fn ms(v: &Value, key: &str) -> Option<Duration> {
    v.get(key).and_then(|x| x.as_u64().or_else(|| x.as_str().and_then(|s| s.parse().ok()))).map(Duration::from_millis)
}

/// Read a proxy registration (Consul's `AgentService` JSON).
pub fn parse_def(svc: &Value, node_address: IpAddr) -> Result<ProxyDef, ProxyError> {
    let id = svc["ID"].as_str().unwrap_or_default().to_string();
    if svc["Kind"].as_str() != Some("connect-proxy") {
        return Err(ProxyError::NotAProxy(id));
    }
    let p = &svc["Proxy"];
    let bad = |m: String| ProxyError::Config(format!("service {id:?}: {m}"));
    let destination = p["DestinationServiceName"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("Proxy.DestinationServiceName is empty".into()))?
        .to_string();
    let ip = |s: Option<&str>, default: IpAddr| -> Result<IpAddr, ProxyError> {
        match s.filter(|s| !s.is_empty()) {
            None => Ok(default),
            Some(a) => a.parse().map_err(|_| bad(format!("{a:?} is not an IP address"))),
        }
    };
    let config = &p["Config"];
    let bind_ip = ip(config["bind_address"].as_str().or(svc["Address"].as_str()), node_address)?;
    let port =
        config["bind_port"].as_u64().or(svc["Port"].as_u64()).filter(|p| *p > 0 && *p <= 65535).ok_or_else(|| bad("no public port".into()))? as u16;
    let local_ip = ip(p["LocalServiceAddress"].as_str(), IpAddr::from([127, 0, 0, 1]))?;
    let local_port =
        p["LocalServicePort"].as_u64().filter(|p| *p > 0 && *p <= 65535).ok_or_else(|| bad("Proxy.LocalServicePort is not set".into()))? as u16;
    let proxy_mode = p["MeshGateway"]["Mode"].as_str().unwrap_or_default().to_ascii_lowercase();
    let mut upstreams = Vec::new();
    for u in p["Upstreams"].as_array().into_iter().flatten() {
        let name = u["DestinationName"].as_str().unwrap_or_default().to_string();
        if u["DestinationType"].as_str().is_some_and(|t| t == "prepared_query") {
            return Err(bad(format!("upstream {name:?}: prepared-query upstreams are not supported by this proxy; use a service upstream")));
        }
        let bind_port =
            u["LocalBindPort"].as_u64().filter(|p| *p > 0 && *p <= 65535).ok_or_else(|| bad(format!("upstream {name:?} has no LocalBindPort")))?
                as u16;
        let bind_ip = ip(u["LocalBindAddress"].as_str(), IpAddr::from([127, 0, 0, 1]))?;
        upstreams.push(UpstreamDef {
            name,
            datacenter: u["Datacenter"].as_str().unwrap_or_default().to_string(),
            bind: SocketAddr::new(bind_ip, bind_port),
            connect_timeout: ms(&u["Config"], "connect_timeout_ms").unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            mesh_gateway: u["MeshGateway"]["Mode"]
                .as_str()
                .filter(|m| !m.is_empty())
                .map(str::to_ascii_lowercase)
                .unwrap_or_else(|| proxy_mode.clone()),
        });
    }
    Ok(ProxyDef {
        id,
        destination,
        public: SocketAddr::new(bind_ip, port),
        local_app: SocketAddr::new(local_ip, local_port),
        local_connect_timeout: ms(config, "local_connect_timeout_ms").unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        upstreams,
    })
}

/// What the proxy needs to know besides its registration.
#[derive(Clone)]
pub struct ProxySettings {
    /// Where the public listener binds when the registration has no address.
    pub node_address: IpAddr,
    /// This agent's datacenter (the default for upstreams).
    pub datacenter: String,
    /// `connect.default_intention_policy`: Some(allow) when configured, else allow with
    /// Consul's "Default behavior configured by ACLs".
    pub default_intention_policy: Option<bool>,
}

/// Established inbound connections, re-checked when intentions change.
#[derive(Default)]
struct Tracker {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (String, CancellationToken)>>,
}

impl Tracker {
    fn add(&self, source: String, cancel: CancellationToken) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().insert(id, (source, cancel));
        id
    }

    fn remove(&self, id: u64) {
        self.conns.lock().remove(&id);
    }

    /// Close the connections whose source `allowed` no longer admits; returns how many.
    fn enforce(&self, allowed: impl Fn(&str) -> bool) -> usize {
        let conns = self.conns.lock();
        let mut closed = 0;
        for (source, cancel) in conns.values() {
            if !allowed(source) && !cancel.is_cancelled() {
                cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// Shared state of one proxy.
struct Shared {
    tls: Arc<MeshTls>,
    settings: ProxySettings,
    destination: Mutex<String>,
    intentions: Mutex<Arc<Vec<Intention>>>,
    tracker: Tracker,
    /// The destination's protocol (`tcp`, `http`, `http2`, `grpc`), from config entries.
    protocol: Mutex<String>,
    /// The local app as the HTTP side reaches it, per protocol.
    local_app: Mutex<Option<(String, Arc<http::LocalApp>)>>,
}

impl Shared {
    /// One HTTP request's decision: intentions with their L7 permissions.
    fn decide_request(&self, source: &str, method: &str, path: &str, headers: &::http::HeaderMap) -> intention::Decision {
        let (allow, from_config) = match self.settings.default_intention_policy {
            Some(a) => (a, true),
            None => (true, false),
        };
        let dest = self.destination.lock().clone();
        let req = intention::RequestFacts { method, path, headers };
        intention::decide_request(&self.intentions.lock(), source, &dest, &req, allow, from_config)
    }

    fn local_app(&self, addr: SocketAddr, protocol: &str, connect_timeout: Duration) -> Arc<http::LocalApp> {
        let mut l = self.local_app.lock();
        if let Some((p, a)) = l.as_ref()
            && p == protocol
        {
            return a.clone();
        }
        let a = Arc::new(http::LocalApp::new(addr, protocol, connect_timeout));
        *l = Some((protocol.to_string(), a.clone()));
        a
    }

    fn decide(&self, source: &str) -> intention::Decision {
        let (allow, from_config) = match self.settings.default_intention_policy {
            Some(a) => (a, true),
            None => (true, false),
        };
        let dest = self.destination.lock().clone();
        intention::decide(&self.intentions.lock(), source, &dest, allow, from_config)
    }
}

/// One sidecar proxy.
pub struct Proxy {
    pub api: Arc<dyn AgentApi>,
    pub service_id: String,
    pub settings: ProxySettings,
}

impl Proxy {
    /// Serve until `stop`. Returns an error when the registration cannot be served at all.
    pub async fn run(self, stop: CancellationToken) -> Result<(), ProxyError> {
        let stop = stop.child_token();
        let _guard = stop.clone().drop_guard();
        let mut def_rx = follow(self.api.clone(), format!("/v1/agent/service/{}", enc(&self.service_id)), true, stop.clone());
        let first = loop {
            if let Some(r) = def_rx.borrow_and_update().clone() {
                break r;
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = def_rx.changed() => if r.is_err() { return Ok(()) },
            }
        };
        if first.status == 404 {
            return Err(ProxyError::NotRegistered(self.service_id.clone()));
        }
        let mut def = parse_def(&first.json().map_err(ProxyError::Config)?, self.settings.node_address)?;
        let shared = Arc::new(Shared {
            tls: MeshTls::new(),
            settings: self.settings.clone(),
            destination: Mutex::new(def.destination.clone()),
            intentions: Mutex::new(Arc::new(Vec::new())),
            tracker: Tracker::default(),
            protocol: Mutex::new("tcp".into()),
            local_app: Mutex::new(None),
        });
        let identity_stop = stop.child_token();
        self.follow_identity(&shared, &def.destination, identity_stop.clone()).await;
        let mut listeners = Listeners::default();
        listeners.reconcile(&self, &shared, &def, &stop).await?;
        info!(proxy = %def.id, destination = %def.destination, public = %def.public, upstreams = def.upstreams.len(), "sidecar proxy serving");
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                r = def_rx.changed() => if r.is_err() { break },
            }
            let Some(latest) = def_rx.borrow_and_update().clone() else { continue };
            if latest.status == 404 {
                info!(proxy = %def.id, "proxy registration removed; stopping");
                break;
            }
            let next = match latest.json().map_err(ProxyError::Config).and_then(|v| parse_def(&v, self.settings.node_address)) {
                Ok(d) => d,
                Err(e) => {
                    warn!(proxy = %def.id, error = %e, "ignoring an unusable proxy registration; keeping the running one");
                    continue;
                }
            };
            if next.destination != def.destination {
                identity_stop.cancel();
                *shared.destination.lock() = next.destination.clone();
                self.follow_identity(&shared, &next.destination, stop.child_token()).await;
            }
            if let Err(e) = listeners.reconcile(&self, &shared, &next, &stop).await {
                warn!(proxy = %next.id, error = %e, "applying the new proxy registration failed");
            }
            def = next;
        }
        listeners.stop_all();
        Ok(())
    }

    /// Follow the destination's leaf, the roots and the destination's intentions; returns
    /// once the proxy has an identity and trust to serve with.
    async fn follow_identity(&self, shared: &Arc<Shared>, destination: &str, stop: CancellationToken) {
        let mut roots = follow(self.api.clone(), "/v1/agent/connect/ca/roots".into(), false, stop.clone());
        let mut leaf = follow(self.api.clone(), format!("/v1/agent/connect/ca/leaf/{}", enc(destination)), false, stop.clone());
        let mut ints =
            follow(self.api.clone(), format!("/v1/connect/intentions/match?by=destination&name={}", enc(destination)), false, stop.clone());
        // The destination's protocol, by Consul's rule: its service-defaults, else
        // proxy-defaults' `Config.protocol`, else tcp.
        {
            let mut sd = follow(self.api.clone(), format!("/v1/config/service-defaults/{}", enc(destination)), false, stop.clone());
            let mut pd = follow(self.api.clone(), "/v1/config/proxy-defaults/global".into(), false, stop.clone());
            let (shared, stop) = (shared.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let found = |rx: &Followed| rx.borrow().clone().filter(|r| r.status == 200).and_then(|r| r.json().ok());
                    let protocol = match (found(&sd), found(&pd)) {
                        (Some(e), _) => e["Protocol"].as_str().filter(|p| !p.is_empty()).unwrap_or("tcp").to_ascii_lowercase(),
                        (None, Some(p)) => p["Config"]["protocol"].as_str().filter(|p| !p.is_empty()).unwrap_or("tcp").to_ascii_lowercase(),
                        (None, None) => "tcp".into(),
                    };
                    *shared.protocol.lock() = protocol;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = sd.changed() => if r.is_err() { return },
                        r = pd.changed() => if r.is_err() { return },
                    }
                }
            });
        }
        let apply_roots = |shared: &Shared, r: &ApiResponse| {
            let Ok(v) = r.json() else { return };
            // Intermediates are presented by peers; only the roots are trust anchors.
            let roots_only: Vec<String> =
                v["Roots"].as_array().into_iter().flatten().filter_map(|r| r["RootCert"].as_str().map(str::to_string)).collect();
            if let Err(e) = shared.tls.set_roots(&roots_only, v["TrustDomain"].as_str().unwrap_or_default()) {
                warn!(error = %e, "cannot use the mesh roots");
            }
        };
        let apply_leaf = |shared: &Shared, r: &ApiResponse| {
            let Ok(v) = r.json() else { return };
            if let (Some(c), Some(k)) = (v["CertPEM"].as_str(), v["PrivateKeyPEM"].as_str())
                && let Err(e) = shared.tls.set_leaf(c, k)
            {
                warn!(error = %e, "cannot use the new leaf certificate");
            }
        };
        let dest = destination.to_string();
        let apply_intentions = move |shared: &Shared, r: &ApiResponse| {
            let Ok(v) = r.json() else { return };
            let list: Vec<Intention> = v[&dest].as_array().into_iter().flatten().filter_map(Intention::from_json).collect();
            *shared.intentions.lock() = Arc::new(list);
            // Established connections that the new intentions forbid are closed now.
            let closed = shared.tracker.enforce(|source| shared.decide(source).allowed);
            if closed > 0 {
                info!(destination = %dest, closed, "closed connections that intentions now deny");
            }
        };
        // Wait for the first of each before serving (a proxy without identity refuses all).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for (rx, what) in [(&mut roots, "roots"), (&mut leaf, "leaf"), (&mut ints, "intentions")] {
            while rx.borrow().is_none() && tokio::time::Instant::now() < deadline {
                if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                    warn!(what, "the proxy has no {what} yet; serving will start when they arrive");
                    break;
                }
            }
        }
        if let Some(r) = roots.borrow_and_update().clone() {
            apply_roots(shared, &r);
        }
        if let Some(r) = leaf.borrow_and_update().clone() {
            apply_leaf(shared, &r);
        }
        if let Some(r) = ints.borrow_and_update().clone() {
            apply_intentions(shared, &r);
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = roots.changed() => {
                        if r.is_err() { return }
                        if let Some(x) = roots.borrow_and_update().clone() { apply_roots(&shared, &x) }
                    }
                    r = leaf.changed() => {
                        if r.is_err() { return }
                        if let Some(x) = leaf.borrow_and_update().clone() { apply_leaf(&shared, &x) }
                    }
                    r = ints.changed() => {
                        if r.is_err() { return }
                        if let Some(x) = ints.borrow_and_update().clone() { apply_intentions(&shared, &x) }
                    }
                }
            }
        });
    }
}

/// The running listeners of a proxy, by what they serve.
#[derive(Default)]
struct Listeners {
    public: Option<(SocketAddr, SocketAddr, Duration, CancellationToken)>,
    upstreams: HashMap<SocketAddr, (UpstreamDef, CancellationToken)>,
}

impl Listeners {
    async fn reconcile(&mut self, proxy: &Proxy, shared: &Arc<Shared>, def: &ProxyDef, stop: &CancellationToken) -> Result<(), ProxyError> {
        let want_public = (def.public, def.local_app, def.local_connect_timeout);
        if self.public.as_ref().map(|(a, b, c, _)| (*a, *b, *c)) != Some(want_public) {
            if let Some((_, _, _, t)) = self.public.take() {
                t.cancel();
            }
            let l = bind(def.public).await?;
            let t = stop.child_token();
            tokio::spawn(inbound(l, def.local_app, def.local_connect_timeout, shared.clone(), t.clone()));
            self.public = Some((def.public, def.local_app, def.local_connect_timeout, t));
        }
        let wanted: HashMap<SocketAddr, &UpstreamDef> = def.upstreams.iter().map(|u| (u.bind, u)).collect();
        self.upstreams.retain(|addr, (u, t)| {
            let keep = wanted.get(addr).is_some_and(|w| *w == u);
            if !keep {
                t.cancel();
            }
            keep
        });
        for (addr, u) in wanted {
            if self.upstreams.contains_key(&addr) {
                continue;
            }
            let l = bind(addr).await?;
            let t = stop.child_token();
            let dc = if u.datacenter.is_empty() { shared.settings.datacenter.clone() } else { u.datacenter.clone() };
            tokio::spawn(outbound(l, def.id.clone(), u.clone(), dc, proxy.api.clone(), shared.clone(), t.clone()));
            self.upstreams.insert(addr, (u.clone(), t));
        }
        Ok(())
    }

    fn stop_all(&mut self) {
        if let Some((_, _, _, t)) = self.public.take() {
            t.cancel();
        }
        for (_, (_, t)) in self.upstreams.drain() {
            t.cancel();
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    // A listener restarted at the same address (a changed registration) may find the old
    // socket still closing: retry briefly.
    let mut last = None;
    for _ in 0..20 {
        let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
            .map_err(|error| ProxyError::Bind { addr, error })?;
        let _ = s.set_reuseaddr(true);
        match s.bind(addr).and_then(|_| s.listen(1024)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(ProxyError::Bind { addr, error: last.unwrap_or_else(|| std::io::Error::other("bind failed")) })
}

/// Accept mesh connections: TLS with a client certificate from the mesh, the caller's service
/// authorised by intentions, then spliced to the local app.
async fn inbound(listener: TcpListener, app: SocketAddr, connect_timeout: Duration, shared: Arc<Shared>, stop: CancellationToken) {
    let acceptor = match shared.tls.server_config(vec![b"h2".to_vec(), b"http/1.1".to_vec()]) {
        Ok(c) => tokio_rustls::TlsAcceptor::from(c),
        Err(e) => return warn!(error = %e, "the public listener has no TLS configuration"),
    };
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { debug!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(20)).await; continue; }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, shared, stop) = (acceptor.clone(), shared.clone(), stop.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return debug!(%peer, error = %e, "mesh handshake refused"),
                Err(_) => return debug!(%peer, "mesh handshake timed out"),
            };
            let Some(id) = tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
                return debug!(%peer, "the peer presented no service identity");
            };
            let protocol = shared.protocol.lock().clone();
            if http::is_http(&protocol) {
                // Every request is authorised on its own (L7 intentions).
                let app = shared.local_app(app, &protocol, connect_timeout);
                let cancel = stop.child_token();
                let conn = shared.tracker.add(id.service.clone(), cancel.clone());
                http::serve_inbound(tls, id.service.clone(), shared.clone(), app, protocol, cancel).await;
                shared.tracker.remove(conn);
                return;
            }
            let d = shared.decide(&id.service);
            if !d.allowed {
                info!(%peer, source = %id.service, reason = %d.reason, "connection denied by intentions");
                let mut tls = tls;
                let _ = tls.shutdown().await;
                return;
            }
            let local = match tokio::time::timeout(connect_timeout, TcpStream::connect(app)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return warn!(%app, error = %e, "the local app refused a mesh connection"),
                Err(_) => return warn!(%app, "connecting to the local app timed out"),
            };
            let _ = local.set_nodelay(true);
            let cancel = stop.child_token();
            let conn = shared.tracker.add(id.service.clone(), cancel.clone());
            splice(tls, local, &cancel).await;
            shared.tracker.remove(conn);
        });
    }
}

/// Accept local connections for an upstream and carry each to a healthy instance over mesh
/// TLS, trying further instances when a connect fails.
async fn outbound(
    listener: TcpListener,
    proxy_id: String,
    up: UpstreamDef,
    datacenter: String,
    api: Arc<dyn AgentApi>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let balancer = Arc::new(Balancer::default());
    let expected = tls::Expected { service: up.name.clone(), datacenter: if up.datacenter.is_empty() { String::new() } else { datacenter.clone() } };
    let connector = match shared.tls.client_config(expected, Vec::new()) {
        Ok(c) => tokio_rustls::TlsConnector::from(c),
        Err(e) => return warn!(error = %e, "the upstream has no TLS configuration"),
    };
    let remote = !datacenter.eq_ignore_ascii_case(&shared.settings.datacenter);
    tokio::spawn(follow_endpoints(api.clone(), up.clone(), datacenter.clone(), remote, balancer.clone(), stop.clone()));
    // The upstream's discovery chain decides whether it speaks HTTP (routed per request) or
    // TCP (spliced).
    let http_up = http::HttpUpstream::new(&proxy_id, &up, api, shared.clone(), stop.clone());
    loop {
        let (local, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { debug!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(20)).await; continue; }
            },
        };
        let _ = local.set_nodelay(true);
        if http_up.protocol().is_some_and(|p| http::is_http(&p)) {
            tokio::spawn(http_up.clone().serve(local));
            continue;
        }
        let (balancer, connector, shared, stop, up, dc) =
            (balancer.clone(), connector.clone(), shared.clone(), stop.clone(), up.clone(), datacenter.clone());
        tokio::spawn(async move {
            let Some(remote) = dial(&balancer, &connector, &shared, &up, &dc).await else {
                let mut local = local;
                let _ = local.shutdown().await;
                return;
            };
            splice(remote, local, &stop).await;
        });
    }
}

/// How an upstream in another datacenter is reached (Consul's `MeshGateway.Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayMode {
    /// Straight to the remote instances.
    None,
    /// Through this datacenter's mesh gateways.
    Local,
    /// Through the remote datacenter's mesh gateways.
    Remote,
}

impl GatewayMode {
    fn parse(s: &str) -> Option<GatewayMode> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Some(GatewayMode::None),
            "local" => Some(GatewayMode::Local),
            "remote" => Some(GatewayMode::Remote),
            _ => None,
        }
    }
}

/// Consul's precedence: the upstream, the proxy, the destination's `service-defaults`,
/// `proxy-defaults`, else none.
pub fn gateway_mode(up_or_proxy: &str, service_defaults: &Value, proxy_defaults: &Value) -> GatewayMode {
    [
        up_or_proxy,
        service_defaults["MeshGateway"]["Mode"].as_str().unwrap_or_default(),
        proxy_defaults["MeshGateway"]["Mode"].as_str().unwrap_or_default(),
    ]
    .into_iter()
    .find_map(GatewayMode::parse)
    .unwrap_or(GatewayMode::None)
}

type Followed = tokio::sync::watch::Receiver<Option<Arc<ApiResponse>>>;

/// Keep `balancer` on the endpoints of an upstream: the destination's instances, or for
/// another datacenter with a gateway mode, the gateways to go through (each carrying the
/// destination's name, so the SNI and the identity check stay the destination's).
async fn follow_endpoints(api: Arc<dyn AgentApi>, up: UpstreamDef, dc: String, remote: bool, balancer: Arc<Balancer>, stop: CancellationToken) {
    let spec = EndpointSpec { service: up.name.clone(), datacenter: up.datacenter.clone(), filter: None, mode: up.mesh_gateway.clone() };
    follow_endpoint_spec(api, spec, dc, remote, balancer, stop).await
}

/// Which endpoints to follow: a service's mesh endpoints (in `datacenter`, empty for this
/// one; only those passing `filter`, Consul's filter language), through gateways as `mode`
/// (or config entries) say for another datacenter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub service: String,
    pub datacenter: String,
    pub filter: Option<String>,
    pub mode: String,
}

/// Keep `balancer` set from the answers of a `/v1/health/connect/...` blocking query until
/// `stop`; `answered`, when given, turns true at the first answer.
pub(crate) async fn follow_health(
    api: Arc<dyn AgentApi>,
    path: String,
    balancer: Arc<Balancer>,
    answered: Option<tokio::sync::watch::Sender<bool>>,
    stop: CancellationToken,
) {
    let mut rx = follow(api, path, false, stop.clone());
    loop {
        if let Some(Ok(v)) = rx.borrow_and_update().clone().filter(|r| r.status == 200).map(|r| r.json()) {
            balancer.set(balance::endpoints_from_health(&v));
            if let Some(a) = &answered {
                a.send_replace(true);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

pub(crate) async fn follow_endpoint_spec(
    api: Arc<dyn AgentApi>,
    spec: EndpointSpec,
    dc: String,
    remote: bool,
    balancer: Arc<Balancer>,
    stop: CancellationToken,
) {
    let up = UpstreamDef {
        name: spec.service.clone(),
        datacenter: spec.datacenter.clone(),
        bind: SocketAddr::from(([0, 0, 0, 0], 0)),
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        mesh_gateway: spec.mode.clone(),
    };
    let dc_q = if up.datacenter.is_empty() { String::new() } else { format!("&dc={}", enc(&up.datacenter)) };
    let filter_q = spec.filter.as_ref().map(|f| format!("&filter={}", enc(f))).unwrap_or_default();
    let instances_path = format!("/v1/health/connect/{}?passing{dc_q}{filter_q}", enc(&up.name));
    if !remote {
        return follow_health(api, instances_path, balancer, None, stop).await;
    }
    let mut pd = follow(api.clone(), "/v1/config/proxy-defaults/global".into(), false, stop.clone());
    let mut sd = follow(api.clone(), format!("/v1/config/service-defaults/{}", enc(&up.name)), false, stop.clone());
    let json_of = |rx: &Followed| rx.borrow().clone().filter(|r| r.status == 200).and_then(|r| r.json().ok()).unwrap_or(Value::Null);
    let mut current: Option<(GatewayMode, Followed, CancellationToken)> = None;
    loop {
        let want = gateway_mode(&up.mesh_gateway, &json_of(&sd), &json_of(&pd));
        if current.as_ref().is_none_or(|(m, _, _)| *m != want) {
            if let Some((_, _, t)) = current.take() {
                t.cancel();
            }
            let t = stop.child_token();
            let path = match want {
                GatewayMode::None => instances_path.clone(),
                GatewayMode::Local => "/v1/health/service/mesh-gateway?passing".to_string(),
                GatewayMode::Remote => format!("/v1/health/service/mesh-gateway?passing&dc={}", enc(&dc)),
            };
            info!(upstream = %up.name, datacenter = %dc, mode = ?want, "upstream endpoints");
            current = Some((want, follow(api.clone(), path, false, t.clone()), t));
        }
        let Some((mode, rx, _)) = current.as_mut() else { return };
        if let Some(Ok(v)) = rx.borrow_and_update().clone().map(|r| r.json()) {
            let list = match mode {
                GatewayMode::None => balance::endpoints_from_health(&v),
                GatewayMode::Local | GatewayMode::Remote => v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|g| g["Service"]["Kind"] == "mesh-gateway")
                    .filter_map(|g| {
                        Some(balance::Endpoint {
                            addr: crate::federation::gateway_address(g, *mode == GatewayMode::Remote)?,
                            service: up.name.clone(),
                            datacenter: dc.clone(),
                            node: g["Node"]["Node"].as_str().unwrap_or_default().to_string(),
                        })
                    })
                    .collect(),
            };
            balancer.set(list);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
            r = pd.changed() => if r.is_err() { return },
            r = sd.changed() => if r.is_err() { return },
        }
    }
}

/// Connect to an instance of the upstream: up to [`CONNECT_ATTEMPTS`] instances, each failure
/// counted towards its ejection.
async fn dial(
    balancer: &Balancer,
    connector: &tokio_rustls::TlsConnector,
    shared: &Shared,
    up: &UpstreamDef,
    dc: &str,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let candidates = balancer.pick(CONNECT_ATTEMPTS);
    if candidates.is_empty() {
        warn!(upstream = %up.name, "no healthy instance of the upstream");
        return None;
    }
    let td = shared.tls.trust_domain();
    for e in candidates {
        let edc = if e.datacenter.is_empty() { dc } else { &e.datacenter };
        let sni = tls::service_sni(&e.service, edc, &td);
        let Ok(name) = rustls::pki_types::ServerName::try_from(sni) else { continue };
        let attempt = async {
            let tcp = TcpStream::connect(e.addr).await?;
            let _ = tcp.set_nodelay(true);
            connector.connect(name, tcp).await
        };
        match tokio::time::timeout(up.connect_timeout, attempt).await {
            Ok(Ok(s)) => {
                balancer.success(&e);
                return Some(s);
            }
            Ok(Err(err)) => {
                let ejected = balancer.failure(&e);
                debug!(upstream = %up.name, endpoint = %e.addr, node = %e.node, error = %err, ejected, "upstream connect failed; trying another instance");
            }
            Err(_) => {
                let ejected = balancer.failure(&e);
                debug!(upstream = %up.name, endpoint = %e.addr, ejected, "upstream connect timed out; trying another instance");
            }
        }
    }
    warn!(upstream = %up.name, "every instance tried failed");
    None
}

/// Copy both ways until both sides are done, or `cancel` (an intention now denies it).
async fn splice<A, B>(mut a: A, mut b: B, cancel: &CancellationToken)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
        _ = cancel.cancelled() => {}
    }
    let _ = a.shutdown().await;
    let _ = b.shutdown().await;
}

/// Run the proxy of every `connect-proxy` service registered on this agent (in its process),
/// starting and stopping them with their registrations.
pub struct SidecarManager {
    pub api: Arc<dyn AgentApi>,
    pub settings: ProxySettings,
    /// The agent's local services (Consul's `/v1/agent/services` JSON) and their changes.
    pub services: Arc<dyn Fn() -> Value + Send + Sync>,
    pub changes: tokio::sync::watch::Receiver<u64>,
}

impl SidecarManager {
    pub async fn run(mut self, stop: CancellationToken) {
        let mut running: HashMap<String, CancellationToken> = HashMap::new();
        loop {
            let services = (self.services)();
            let proxies: Vec<String> =
                services.as_object().into_iter().flatten().filter(|(_, s)| s["Kind"] == "connect-proxy").map(|(id, _)| id.clone()).collect();
            running.retain(|id, t| {
                let keep = proxies.contains(id) && !t.is_cancelled();
                if !keep {
                    t.cancel();
                }
                keep
            });
            for id in proxies {
                if running.contains_key(&id) {
                    continue;
                }
                let t = stop.child_token();
                let p_id = id.clone();
                let p = Proxy { api: self.api.clone(), service_id: id.clone(), settings: self.settings.clone() };
                let done = t.clone();
                tokio::spawn(async move {
                    if let Err(e) = p.run(done.clone()).await {
                        warn!(proxy = %id, error = %e, "sidecar proxy failed");
                    }
                    done.cancel();
                });
                running.insert(p_id, t);
            }
            // A proxy that failed (its port taken, say) is retried on the next change or tick.
            tokio::select! {
                _ = stop.cancelled() => return,
                r = self.changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }
}
