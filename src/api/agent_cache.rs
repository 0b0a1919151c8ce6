//! The client agent's cache (Consul's agent cache): every distinct read that a client agent's
//! local callers block on (`?index`) or ask for `?cached` is fetched from the servers by one
//! background blocking query, whatever the number of local callers. 1,000 sidecars behind 100
//! client agents cost the servers 100 watches, not 1,000.
//!
//! Each entry keeps the latest answer and its index; local blocking readers wait on the entry
//! with Consul's semantics (an answer before `wait` ends carries a new index, one at the end of
//! `wait` carries the same), and `?cached` readers get the entry as it is, with `X-Cache:
//! HIT|MISS` and `Age`. An entry nobody has read for [`IDLE_EXPIRY`] stops its upstream query
//! and is dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::forward::{ForwardedRequest, ForwardedResponse};
use super::query::Params;
use super::{ApiError, Ctx};
use crate::rpc::Service;

/// How long an upstream blocking query waits at the server before it is renewed.
const UPSTREAM_WAIT: &str = "5m";
/// RPC timeout of one upstream query: its wait plus Consul's jitter and some slack.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5 * 60 + 5 * 60 / 16 + 30);
/// An entry unread for this long is dropped (its upstream query stops).
const IDLE_EXPIRY: Duration = Duration::from_secs(10 * 60);
/// Retry delays after an upstream error.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Responses whose index says nothing useful are not worth a watch.
const CACHEABLE: &[&str] = &[
    "/v1/health/",
    "/v1/catalog/",
    "/v1/kv/",
    "/v1/query/",
    "/v1/coordinate/",
    "/v1/internal/ui/",
    "/v1/connect/ca/roots",
    "/v1/connect/intentions/match",
    "/v1/config/",
    "/v1/discovery-chain/",
];

/// What one upstream fetch returned.
#[derive(Clone)]
pub struct Fetched {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: axum::body::Bytes,
    index: u64,
    at: Instant,
}

struct Entry {
    latest: watch::Sender<Option<Arc<Fetched>>>,
    /// Seconds since the cache was made, when a local reader last used the entry.
    used: AtomicU64,
    stop: CancellationToken,
}

/// The agent's cache of upstream reads.
pub struct AgentCache {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    born: Instant,
    /// Upstream blocking queries running now (for tests and metrics).
    pub upstream_watches: AtomicU64,
    shutdown: CancellationToken,
}

impl AgentCache {
    pub fn new(shutdown: CancellationToken) -> AgentCache {
        AgentCache { entries: Mutex::new(HashMap::new()), born: Instant::now(), upstream_watches: AtomicU64::new(0), shutdown }
    }

    fn now(&self) -> u64 {
        self.born.elapsed().as_secs()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a client agent answers this read from its cache: a GET of the datacenter's data
/// that blocks or asks for `?cached`, read the default way or `?stale` (a `?consistent` read
/// must reach the leader each time), and not sorted by the caller's own address.
pub fn applies(method: &axum::http::Method, path: &str, p: &Params) -> bool {
    method == axum::http::Method::GET
        && (p.has("index") || p.has("cached"))
        && !p.flag("consistent")
        && p.get("near") != Some("_ip")
        && CACHEABLE.iter().any(|c| path.starts_with(c))
}

/// The upstream request of a cached read: the path and every parameter but the blocking and
/// cache ones, in a stable order.
fn upstream_uri(path: &str, p: &Params) -> String {
    let mut parts: Vec<String> =
        p.0.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "index" | "wait" | "cached"))
            .map(|(k, v)| if v.is_empty() { pct(k) } else { format!("{}={}", pct(k), pct(v)) })
            .collect();
    parts.sort();
    if parts.is_empty() { path.to_string() } else { format!("{path}?{}", parts.join("&")) }
}

pub fn pct(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.~/:".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// Answer a local read from the cache, starting the entry's upstream watch if it is new.
pub async fn read(ctx: &Ctx, path: &str, p: &Params) -> Result<Response, ApiError> {
    let Some(cache) = ctx.agent_cache.as_ref() else { return Err(ApiError::Internal("no agent cache on this agent".into())) };
    let uri = upstream_uri(path, p);
    let (entry, fresh) = {
        let mut entries = cache.entries.lock();
        match entries.get(&uri) {
            Some(e) => (e.clone(), false),
            None => {
                let e = Arc::new(Entry { latest: watch::channel(None).0, used: AtomicU64::new(cache.now()), stop: cache.shutdown.child_token() });
                entries.insert(uri.clone(), e.clone());
                (e, true)
            }
        }
    };
    entry.used.store(cache.now(), Ordering::Relaxed);
    if fresh {
        tokio::spawn(fetch_loop(ctx.clone(), uri.clone(), entry.clone()));
    }
    let b = super::query::Blocking::start_local(ctx, p)?;
    let mut rx = entry.latest.subscribe();
    loop {
        let current = rx.borrow_and_update().clone();
        if let Some(f) = &current
            && (b.min_index.is_none() || b.answer_now(f.index))
        {
            return Ok(respond(f, !fresh));
        }
        match tokio::time::timeout_at(b.deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return Err(ApiError::Internal("the agent cache entry was dropped".into())),
            Err(_) => {
                // The wait is over: the latest answer (the same index), or the first fetch's
                // failure to arrive in time.
                let latest = entry.latest.borrow().clone();
                return match latest {
                    Some(f) => Ok(respond(&f, true)),
                    None => Err(ApiError::Unreachable("no answer from the servers yet".into())),
                };
            }
        }
    }
}

fn respond(f: &Fetched, hit: bool) -> Response {
    let mut resp = Response::new(Body::from(f.body.clone()));
    *resp.status_mut() = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in &f.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_bytes(v)) {
            resp.headers_mut().insert(k, v);
        }
    }
    let h = resp.headers_mut();
    h.insert("x-cache", HeaderValue::from_static(if hit { "HIT" } else { "MISS" }));
    if let Ok(v) = HeaderValue::from_str(&f.at.elapsed().as_secs().to_string()) {
        h.insert("age", v);
    }
    resp
}

/// Keep one entry fresh with blocking queries to the servers while local readers use it.
async fn fetch_loop(ctx: Ctx, uri: String, entry: Arc<Entry>) {
    let Some(cache) = ctx.agent_cache.as_ref() else { return };
    cache.upstream_watches.fetch_add(1, Ordering::Relaxed);
    let mut index = 0u64;
    let mut backoff = RETRY_MIN;
    loop {
        if cache.now().saturating_sub(entry.used.load(Ordering::Relaxed)) >= IDLE_EXPIRY.as_secs() {
            break;
        }
        let sep = if uri.contains('?') { '&' } else { '?' };
        let target = if index > 0 { format!("{uri}{sep}index={index}&wait={UPSTREAM_WAIT}") } else { uri.clone() };
        let fetched = tokio::select! {
            _ = entry.stop.cancelled() => break,
            r = fetch(&ctx, &target) => r,
        };
        match fetched {
            Ok(f) if f.status < 500 => {
                backoff = RETRY_MIN;
                // An index that went back means the servers' state was reset: start over.
                let changed = entry.latest.borrow().as_ref().is_none_or(|old| old.index != f.index || old.status != f.status);
                index = f.index;
                if changed {
                    entry.latest.send_replace(Some(Arc::new(f)));
                }
            }
            other => {
                if let Ok(f) = other {
                    // A server error is an answer too (readers see it), but worth a pause.
                    entry.latest.send_replace(Some(Arc::new(f)));
                }
                tokio::select! {
                    _ = entry.stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                index = 0;
            }
        }
    }
    cache.upstream_watches.fetch_sub(1, Ordering::Relaxed);
    let mut entries = cache.entries.lock();
    if entries.get(&uri).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
        entries.remove(&uri);
    }
}

/// One upstream read, from the first server that answers.
async fn fetch(ctx: &Ctx, uri: &str) -> Result<Fetched, ApiError> {
    let mut servers: Vec<SocketAddr> = ctx.agent.servers();
    if servers.is_empty() {
        return Err(ApiError::Internal("No known Consul servers".into()));
    }
    use rand::RngExt;
    let start = rand::rng().random_range(0..servers.len());
    servers.rotate_left(start);
    let fwd = ForwardedRequest {
        method: "GET".into(),
        uri: uri.to_string(),
        headers: vec![(super::prepared_query::ORIGIN_NODE_HEADER.into(), ctx.info.node_name.as_bytes().to_vec())],
        body: Vec::new(),
    };
    let mut last = ApiError::Internal("No known Consul servers".into());
    for s in servers {
        match ctx.rpc.call_typed::<ForwardedRequest, ForwardedResponse>(s, Service::Http, &fwd, UPSTREAM_TIMEOUT).await {
            Ok(r) => {
                let index = r
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("x-consul-index"))
                    .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
                    .unwrap_or(0);
                return Ok(Fetched { status: r.status, headers: r.headers, body: r.body.into(), index, at: Instant::now() });
            }
            Err(e) => last = ApiError::Unreachable(format!("{s}: {e}")),
        }
    }
    Err(last)
}
