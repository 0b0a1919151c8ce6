//! The HTTP-aware side of the sidecar, for services whose protocol is `http`, `http2` or
//! `grpc`:
//!
//! - outbound (an upstream's listener): each request from the app is routed by the upstream's
//!   discovery chain (router, splitter, resolver with failover targets), sent over a pooled
//!   HTTP/2 connection with mesh mTLS to a healthy instance of the chosen target, retried as the
//!   route allows (connect failures and status codes, within a retry budget so that retries
//!   cannot multiply an outage), bounded by the route's timeout, and counted per upstream;
//! - inbound (the public listener): requests arrive over mesh mTLS (HTTP/2 or HTTP/1.1 by
//!   ALPN), each one is authorised by intentions including their L7 permissions (403, or
//!   gRPC status 7), and is forwarded to the local app over pooled connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::{Mutex, RwLock};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::balance::{Balancer, Endpoint, HashOn, LoadBalancing, hash64};
use super::chain::{Chain, Routed, url_pairs};
use super::source::{AgentApi, enc, follow};
use super::{EndpointSpec, Shared, UpstreamDef, follow_endpoint_spec, tls};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Request bodies up to this size are kept so that a retry can resend them.
const RETRY_BODY_MAX: u64 = 64 * 1024;
/// Connect attempts across endpoints (and targets) for one request.
const CONNECT_ATTEMPTS: usize = 3;

pub fn is_http(protocol: &str) -> bool {
    matches!(protocol, "http" | "http2" | "grpc")
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn status(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{msg}\n")));
    *r.status_mut() = code;
    r.headers_mut().insert("content-type", HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn grpc_status(code: u32, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(msg) {
        h.insert("grpc-message", v);
    }
    r
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), which HTTP/2 forbids.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|x| x.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"] {
        if n == "te" && h.get("te").is_some_and(|v| v == "trailers") {
            continue;
        }
        h.remove(n);
    }
}

// ---------------------------------------------------------------------------------------
// Metrics

/// Latency buckets (milliseconds) of the per-upstream histogram.
pub const BUCKETS_MS: [f64; 14] = [0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// One upstream's request counts by status class and its latency histogram.
#[derive(Default)]
pub struct UpstreamStats {
    /// 1xx..5xx, then requests that got no response (connect failure, timeout).
    by_class: [AtomicU64; 6],
    buckets: [AtomicU64; BUCKETS_MS.len()],
    sum_us: AtomicU64,
    count: AtomicU64,
    pub retries: AtomicU64,
}

impl UpstreamStats {
    fn record(&self, code: Option<StatusCode>, took: Duration) {
        let class = code.map_or(5, |c| (c.as_u16() / 100).clamp(1, 5) as usize - 1);
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let ms = took.as_secs_f64() * 1000.0;
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Every HTTP upstream of every sidecar in this process, by (proxy, upstream).
#[derive(Default)]
pub struct HttpMetrics {
    upstreams: Mutex<HashMap<(String, String), Arc<UpstreamStats>>>,
}

pub static METRICS: std::sync::LazyLock<HttpMetrics> = std::sync::LazyLock::new(HttpMetrics::default);

impl HttpMetrics {
    pub fn upstream(&self, proxy: &str, upstream: &str) -> Arc<UpstreamStats> {
        self.upstreams.lock().entry((proxy.to_string(), upstream.to_string())).or_default().clone()
    }

    /// Counters for `/v1/agent/metrics`: requests by status class, retries.
    pub fn counters(&self) -> Vec<(&'static str, crate::api::metrics::Labels, u64)> {
        let mut out = Vec::new();
        for ((proxy, up), s) in self.upstreams.lock().iter() {
            for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx", "error"].iter().enumerate() {
                let n = s.by_class[i].load(Ordering::Relaxed);
                if n > 0 {
                    out.push((
                        "trellis.proxy.upstream_requests",
                        vec![("proxy", proxy.clone()), ("upstream", up.clone()), ("status", class.to_string())],
                        n,
                    ));
                }
            }
            out.push(("trellis.proxy.upstream_retries", vec![("proxy", proxy.clone()), ("upstream", up.clone())], s.retries.load(Ordering::Relaxed)));
        }
        out
    }

    /// The latency histograms.
    pub fn histograms(&self) -> Vec<crate::api::metrics::Histogram> {
        self.upstreams
            .lock()
            .iter()
            .map(|((proxy, up), s)| crate::api::metrics::Histogram {
                name: "trellis.proxy.upstream_request_duration_ms",
                labels: vec![("proxy", proxy.clone()), ("upstream", up.clone())],
                buckets: BUCKETS_MS.iter().zip(&s.buckets).map(|(le, n)| (*le, n.load(Ordering::Relaxed))).collect(),
                sum: s.sum_us.load(Ordering::Relaxed) as f64 / 1000.0,
                count: s.count.load(Ordering::Relaxed),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Retry budget

/// Retries may add at most 20 % to the requests of the last 10 s, plus 3 per second, so that a
/// failing upstream gets little more load than it had.
struct RetryBudget {
    /// (window start, requests, retries).
    window: Mutex<(Instant, u64, u64)>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget { window: Mutex::new((Instant::now(), 0, 0)) }
    }
}

impl RetryBudget {
    const WINDOW: Duration = Duration::from_secs(10);

    fn request(&self) {
        let mut w = self.window.lock();
        Self::roll(&mut w);
        w.1 += 1;
    }

    fn try_retry(&self) -> bool {
        let mut w = self.window.lock();
        Self::roll(&mut w);
        let allowed = w.1 / 5 + 3 * Self::WINDOW.as_secs();
        if w.2 < allowed {
            w.2 += 1;
            true
        } else {
            false
        }
    }

    fn roll(w: &mut (Instant, u64, u64)) {
        if w.0.elapsed() > Self::WINDOW || w.1 == 0 && w.2 == 0 {
            *w = (Instant::now(), 0, 0);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Outbound

/// The instances of one chain target and the HTTP/2 connections to them.
struct TargetPool {
    balancer: Arc<Balancer>,
    connector: tokio_rustls::TlsConnector,
    sni: String,
    conns: Mutex<HashMap<SocketAddr, hyper::client::conn::http2::SendRequest<Body>>>,
    connect_timeout: Duration,
    /// After every instance failed, the target is passed over (for its failover targets)
    /// until then, and tried again after.
    down_until: Mutex<Option<Instant>>,
    _stop: tokio_util::sync::DropGuard,
}

/// How long a target whose instances all failed is passed over before it is tried again.
const TARGET_DOWN: Duration = Duration::from_secs(2);

/// An HTTP upstream: its chain and target pools.
pub(super) struct HttpUpstream {
    up: UpstreamDef,
    local_dc: String,
    api: Arc<dyn AgentApi>,
    shared: Arc<Shared>,
    pub(super) chain: RwLock<Option<Arc<Chain>>>,
    pools: Mutex<HashMap<String, Arc<TargetPool>>>,
    budget: RetryBudget,
    stats: Arc<UpstreamStats>,
    stop: CancellationToken,
}

impl HttpUpstream {
    pub(super) fn new(proxy_id: &str, up: &UpstreamDef, api: Arc<dyn AgentApi>, shared: Arc<Shared>, stop: CancellationToken) -> Arc<HttpUpstream> {
        let u = Arc::new(HttpUpstream {
            up: up.clone(),
            local_dc: shared.settings.datacenter.clone(),
            api: api.clone(),
            shared,
            chain: RwLock::new(None),
            pools: Mutex::default(),
            budget: RetryBudget::default(),
            stats: METRICS.upstream(proxy_id, &up.name),
            stop: stop.clone(),
        });
        // Follow the upstream's discovery chain, compiled for its datacenter.
        let dc = if up.datacenter.is_empty() { u.local_dc.clone() } else { up.datacenter.clone() };
        let mut rx = follow(api, format!("/v1/discovery-chain/{}?compile-dc={}", enc(&up.name), enc(&dc)), false, stop.clone());
        let me = u.clone();
        tokio::spawn(async move {
            loop {
                if let Some(r) = rx.borrow_and_update().clone() {
                    match r.json().and_then(|v| Chain::parse(&v)) {
                        Ok(c) if r.status == 200 => {
                            // Targets no longer in the chain stop being followed.
                            me.pools.lock().retain(|id, pool| {
                                pool.balancer.set_policy(c.load_balancing(id).policy.clone());
                                c.targets.contains_key(id)
                            });
                            *me.chain.write() = Some(Arc::new(c));
                        }
                        Ok(_) => {}
                        Err(e) => warn!(upstream = %me.up.name, error = %e, "unusable discovery chain; keeping the previous one"),
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                }
            }
        });
        u
    }

    pub(super) fn protocol(&self) -> Option<String> {
        self.chain.read().as_ref().map(|c| c.protocol.clone())
    }

    fn pool(&self, chain: &Chain, id: &str) -> Option<Arc<TargetPool>> {
        if let Some(p) = self.pools.lock().get(id) {
            return Some(p.clone());
        }
        let t = chain.targets.get(id)?;
        let local = t.datacenter.eq_ignore_ascii_case(&self.local_dc) || t.datacenter.is_empty();
        let spec = EndpointSpec {
            service: t.service.clone(),
            datacenter: if local { String::new() } else { t.datacenter.clone() },
            filter: t.filter.clone(),
            mode: if self.up.mesh_gateway.is_empty() { t.mesh_gateway.clone() } else { self.up.mesh_gateway.clone() },
        };
        let balancer = Arc::new(Balancer::default());
        balancer.set_policy(chain.load_balancing(id).policy.clone());
        let stop = self.stop.child_token();
        let dc = if local { self.local_dc.clone() } else { t.datacenter.clone() };
        tokio::spawn(follow_endpoint_spec(self.api.clone(), spec, dc.clone(), !local, balancer.clone(), stop.clone()));
        let expected = tls::Expected { service: t.service.clone(), datacenter: if local { String::new() } else { dc } };
        let cfg = self.shared.tls.client_config(expected, vec![b"h2".to_vec()]).ok()?;
        let pool = Arc::new(TargetPool {
            balancer,
            connector: tokio_rustls::TlsConnector::from(cfg),
            sni: t.sni.clone(),
            conns: Mutex::default(),
            connect_timeout: t.connect_timeout,
            down_until: Mutex::new(None),
            _stop: stop.drop_guard(),
        });
        self.pools.lock().insert(id.to_string(), pool.clone());
        Some(pool)
    }

    /// Wait briefly for the first endpoints of a new pool (a first request should not fail
    /// only because the catalog answer is still on its way).
    async fn endpoints(pool: &TargetPool, hash: Option<u64>) -> Vec<Endpoint> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let e = pool.balancer.pick_for(CONNECT_ATTEMPTS, hash);
            if !e.is_empty() || Instant::now() > deadline {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn connection(&self, pool: &TargetPool, e: &Endpoint) -> Result<hyper::client::conn::http2::SendRequest<Body>, String> {
        if let Some(c) = pool.conns.lock().get(&e.addr).filter(|c| !c.is_closed()).cloned() {
            return Ok(c);
        }
        let connect = async {
            let tcp = TcpStream::connect(e.addr).await.map_err(|x| x.to_string())?;
            let _ = tcp.set_nodelay(true);
            let sni =
                if pool.sni.is_empty() { tls::service_sni(&e.service, &e.datacenter, &self.shared.tls.trust_domain()) } else { pool.sni.clone() };
            let name = rustls::pki_types::ServerName::try_from(sni).map_err(|x| x.to_string())?;
            let stream = pool.connector.connect(name, tcp).await.map_err(|x| x.to_string())?;
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(10))
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|x| x.to_string())?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            Ok::<_, String>(send)
        };
        let send = tokio::time::timeout(pool.connect_timeout, connect).await.map_err(|_| format!("{}: connect timed out", e.addr))??;
        pool.conns.lock().insert(e.addr, send.clone());
        Ok(send)
    }

    /// Serve the app's HTTP on one accepted connection.
    pub(super) async fn serve(self: Arc<Self>, tcp: TcpStream) {
        let me = self.clone();
        let peer = tcp.peer_addr().ok().map(|a| a.ip());
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let me = me.clone();
            async move { Ok::<_, std::convert::Infallible>(me.handle(req, peer).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder.serve_connection(TokioIo::new(tcp), svc).await {
            debug!(error = %e, "upstream listener connection ended");
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: Option<std::net::IpAddr>) -> Response<Body> {
        let started = Instant::now();
        let Some(chain) = self.chain.read().clone() else {
            return status(StatusCode::SERVICE_UNAVAILABLE, "no discovery chain for this upstream yet");
        };
        let grpc = chain.protocol == "grpc";
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or_default().to_string();
        let Some(routed) = chain.route(parts.method.as_str(), &path, &query, &parts.headers, rand::random::<f64>() * 100.0) else {
            self.stats.record(Some(StatusCode::NOT_FOUND), started.elapsed());
            return status(StatusCode::NOT_FOUND, "no route matches this request");
        };
        self.budget.request();
        // The request's hash for the first target's hash policies (ring hash, maglev).
        let lb = routed.targets.first().map(|t| chain.load_balancing(t)).unwrap_or_default();
        let (hash, set_cookie) = request_hash(&lb, &parts.headers, &query, peer);
        // Path rewrite, hop-by-hop headers, route headers.
        let new_path = match &routed.prefix_rewrite {
            Some((prefix, to)) if path.starts_with(prefix.as_str()) => {
                let rest = &path[prefix.len()..];
                let joined = if to.ends_with('/') && rest.starts_with('/') { format!("{to}{}", &rest[1..]) } else { format!("{to}{rest}") };
                if joined.is_empty() { "/".to_string() } else { joined }
            }
            _ => path.clone(),
        };
        let pq = if query.is_empty() { new_path } else { format!("{new_path}?{query}") };
        let authority = parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(&self.up.name).to_string();
        parts.uri = match http::Uri::builder().scheme("http").authority(authority.as_str()).path_and_query(pq.as_str()).build() {
            Ok(u) => u,
            Err(e) => return status(StatusCode::BAD_REQUEST, &format!("bad request target: {e}")),
        };
        parts.version = http::Version::HTTP_2;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(http::header::HOST);
        routed.request_headers.apply(&mut parts.headers);
        // A small body is kept so that a retry can resend it.
        let retryable = routed.num_retries > 0 || routed.targets.len() > 1;
        let small = http_body::Body::size_hint(&body).upper().is_some_and(|u| u <= RETRY_BODY_MAX);
        let mut once: Option<Body> = None;
        let kept: Option<Bytes> = if retryable && small {
            match body.collect().await {
                Ok(b) => Some(b.to_bytes()),
                Err(e) => return status(StatusCode::BAD_REQUEST, &format!("reading the request body: {e}")),
            }
        } else {
            once = Some(body.map_err(|e| Box::new(e) as BoxError).boxed());
            None
        };
        let attempt_body = |once: &mut Option<Body>| -> Option<Body> {
            match &kept {
                Some(b) => Some(full(b.clone())),
                None => once.take(),
            }
        };
        let send = async {
            let mut retries_left = routed.num_retries;
            let mut last: Option<Response<Body>> = None;
            loop {
                let Some(body) = attempt_body(&mut once) else {
                    return last.unwrap_or_else(|| status(StatusCode::BAD_GATEWAY, "the request body cannot be resent"));
                };
                let mut req = Request::from_parts(parts.clone(), body);
                *req.version_mut() = http::Version::HTTP_2;
                match self.send_once(&chain, &routed, req, hash).await {
                    Ok(resp) => {
                        let code = resp.status().as_u16();
                        if retries_left > 0 && routed.retry_on_status_codes.contains(&code) && kept.is_some() && self.budget.try_retry() {
                            retries_left -= 1;
                            self.stats.retries.fetch_add(1, Ordering::Relaxed);
                            last = Some(resp);
                            continue;
                        }
                        return resp;
                    }
                    Err(e) => {
                        if retries_left > 0 && routed.retry_on_connect_failure && kept.is_some() && self.budget.try_retry() {
                            retries_left -= 1;
                            self.stats.retries.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        return if grpc { grpc_status(14, &e) } else { status(StatusCode::SERVICE_UNAVAILABLE, &e) };
                    }
                }
            }
        };
        let mut resp = match routed.request_timeout {
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(r) => r,
                Err(_) => {
                    if grpc {
                        grpc_status(4, "upstream request timeout")
                    } else {
                        status(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
                    }
                }
            },
            None => send.await,
        };
        routed.response_headers.apply(resp.headers_mut());
        if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().append(http::header::SET_COOKIE, c);
        }
        let code = resp.status();
        self.stats.record(Some(code), started.elapsed());
        resp
    }

    /// Send one request to the first target (in failover order) that has a reachable
    /// instance; an error when none does.
    async fn send_once(&self, chain: &Chain, routed: &Routed, req: Request<Body>, hash: Option<u64>) -> Result<Response<Body>, String> {
        let mut errors = Vec::new();
        let mut req = Some(req);
        let last = routed.targets.len().saturating_sub(1);
        for (n, id) in routed.targets.iter().enumerate() {
            let Some(pool) = self.pool(chain, id) else {
                errors.push(format!("{id}: unknown target"));
                continue;
            };
            // A target that just failed is skipped while it has failover targets left.
            if n < last && pool.down_until.lock().is_some_and(|t| t > Instant::now()) {
                errors.push(format!("{id}: down"));
                continue;
            }
            let endpoints = Self::endpoints(&pool, hash).await;
            if endpoints.is_empty() {
                errors.push(format!("{id}: no healthy instance"));
                continue;
            }
            for e in endpoints {
                let mut conn = match self.connection(&pool, &e).await {
                    Ok(c) => c,
                    Err(err) => {
                        pool.balancer.failure(&e);
                        pool.conns.lock().remove(&e.addr);
                        errors.push(format!("{id} at {}: {err}", e.addr));
                        continue;
                    }
                };
                if conn.ready().await.is_err() {
                    pool.conns.lock().remove(&e.addr);
                    errors.push(format!("{id} at {}: connection closed", e.addr));
                    continue;
                }
                let r = req.take().expect("one request per send");
                // In flight (for least request) until the response body is done with.
                let active = pool.balancer.active(&e);
                match conn.send_request(r).await {
                    Ok(resp) => {
                        pool.balancer.success(&e);
                        return Ok(resp.map(|b| {
                            b.map_err(move |e| {
                                let _in_flight = &active;
                                Box::new(e) as BoxError
                            })
                            .boxed()
                        }));
                    }
                    // The request is gone with the connection: the caller may retry.
                    Err(err) => {
                        pool.conns.lock().remove(&e.addr);
                        return Err(format!("{id} at {}: {err}", e.addr));
                    }
                }
            }
            if req.is_some() {
                *pool.down_until.lock() = Some(Instant::now() + TARGET_DOWN);
            }
        }
        Err(format!("no healthy upstream: {}", errors.join("; ")))
    }
}

/// The hash of one request under `lb`'s hash policies (Envoy's way: each policy that finds its
/// value is folded in, and a terminal one that did ends the list), and a `Set-Cookie` value
/// when a cookie policy generates the cookie the request lacked.
fn request_hash(lb: &LoadBalancing, headers: &HeaderMap, query: &str, peer: Option<std::net::IpAddr>) -> (Option<u64>, Option<String>) {
    let mut hash: Option<u64> = None;
    let mut set_cookie = None;
    for (on, terminal) in &lb.hash {
        let h = match on {
            HashOn::Header(name) => {
                let values: Vec<&[u8]> = headers.get_all(name.as_str()).iter().map(|v| v.as_bytes()).collect();
                (!values.is_empty()).then(|| hash64(&values))
            }
            HashOn::Query(name) => url_pairs(query).into_iter().find(|(k, _)| k == name).map(|(_, v)| hash64(&[v.as_bytes()])),
            HashOn::SourceIp => peer.map(|ip| hash64(&[ip.to_string().as_bytes()])),
            HashOn::Cookie { name, generate } => match cookie(headers, name) {
                Some(v) => Some(hash64(&[v.as_bytes()])),
                None => generate.as_ref().map(|spec| {
                    let v = format!("{:016x}", rand::random::<u64>());
                    let mut c = format!("{name}={v}");
                    if let Some(ttl) = spec.ttl {
                        c.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
                    }
                    if !spec.path.is_empty() {
                        c.push_str(&format!("; Path={}", spec.path));
                    }
                    c.push_str("; HttpOnly");
                    set_cookie = Some(c);
                    hash64(&[v.as_bytes()])
                }),
            },
        };
        if let Some(h) = h {
            hash = Some(hash.map_or(h, |acc| acc.rotate_left(1) ^ h));
            if *terminal {
                break;
            }
        }
    }
    (hash, set_cookie)
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
}

// ---------------------------------------------------------------------------------------
// Inbound

/// Forwarding to the local app: pooled HTTP/1.1, or HTTP/2 without TLS for http2/grpc.
pub(super) struct LocalApp {
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
    addr: SocketAddr,
    http2: bool,
}

impl LocalApp {
    pub(super) fn new(addr: SocketAddr, protocol: &str, connect_timeout: Duration) -> LocalApp {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let mut b = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(Duration::from_secs(60));
        if protocol != "http" {
            b.http2_only(true);
        }
        LocalApp { client: b.build(connector), addr, http2: protocol != "http" }
    }
}

/// Serve one mesh connection whose destination speaks HTTP: every request authorised, then
/// forwarded to the app. `source` is the caller's service (from its certificate).
pub(super) async fn serve_inbound<S>(stream: S, source: String, shared: Arc<Shared>, app: Arc<LocalApp>, protocol: String, cancel: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let grpc = protocol == "grpc";
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (shared, app, source) = (shared.clone(), app.clone(), source.clone());
        async move {
            let d = shared.decide_request(&source, req.method().as_str(), req.uri().path(), req.headers());
            if !d.allowed {
                debug!(%source, path = %req.uri().path(), reason = %d.reason, "request denied by intentions");
                return Ok::<_, std::convert::Infallible>(if grpc {
                    grpc_status(7, "permission denied by intentions")
                } else {
                    status(StatusCode::FORBIDDEN, "RBAC: access denied")
                });
            }
            let (mut parts, body) = req.into_parts();
            let pq = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
            parts.uri = match format!("http://{}{pq}", app.addr).parse() {
                Ok(u) => u,
                Err(_) => return Ok(status(StatusCode::BAD_REQUEST, "bad request target")),
            };
            strip_hop_by_hop(&mut parts.headers);
            parts.version = if app.http2 { http::Version::HTTP_2 } else { http::Version::HTTP_11 };
            let req = Request::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed());
            Ok(match app.client.request(req).await {
                Ok(resp) => {
                    let (mut p, b) = resp.into_parts();
                    strip_hop_by_hop(&mut p.headers);
                    Response::from_parts(p, b.map_err(|e| Box::new(e) as BoxError).boxed())
                }
                Err(e) => {
                    warn!(app = %app.addr, error = %e, "the local app failed a request");
                    if grpc {
                        grpc_status(14, "the local app is unavailable")
                    } else {
                        status(StatusCode::BAD_GATEWAY, "the local app is unavailable")
                    }
                }
            })
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        r = conn => if let Err(e) = r { debug!(error = %e, "mesh HTTP connection ended") },
        _ = cancel.cancelled() => {}
    }
}
