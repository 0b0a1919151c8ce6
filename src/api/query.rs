//! Query parameters, blocking queries and the metadata headers every read returns
//! (`X-Consul-Index`, `X-Consul-KnownLeader`, `X-Consul-LastContact`).

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use std::collections::HashMap;
use std::sync::Arc;

use super::{ApiError, Ctx};
use crate::state::{RaftIndex, StateData, Table, WatchKey};

/// Consul's default and longest blocking-query waits.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Up to wait/16 extra, so that many watchers started together do not return together.
const JITTER_FRACTION: u32 = 16;

/// Query-string pairs in order; flags like `?recurse` have an empty value.
#[derive(Debug, Default, Clone)]
pub struct Params(pub(crate) Vec<(String, String)>);

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Params {
    pub fn parse(q: Option<&str>) -> Params {
        let pairs = q
            .unwrap_or("")
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (percent_decode(k), percent_decode(v)),
                None => (percent_decode(kv), String::new()),
            })
            .collect();
        Params(pairs)
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }
    pub fn has(&self, k: &str) -> bool {
        self.0.iter().any(|(key, _)| key == k)
    }
    /// A flag is set when present, unless its value says false (`?stale=false`).
    pub fn flag(&self, k: &str) -> bool {
        self.get(k).is_some_and(|v| v != "false" && v != "0")
    }
    pub fn all(&self, k: &str) -> Vec<&str> {
        self.0.iter().filter(|(key, _)| key == k).map(|(_, v)| v.as_str()).collect()
    }
    pub fn u64(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| ApiError::BadRequest(format!("Invalid {k} parameter: {v:?} is not a non-negative integer"))),
        }
    }
    /// `node-meta=key:value` pairs.
    pub fn node_meta(&self) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
        self.all("node-meta")
            .into_iter()
            .map(|kv| match kv.split_once(':') {
                Some((k, v)) => Ok((k.to_string(), v.to_string())),
                None => Err(ApiError::BadRequest(format!("Invalid node-meta {kv:?}: expected key:value"))),
            })
            .collect()
    }
    pub fn filter(&self) -> Option<&str> {
        self.get("filter").filter(|f| !f.trim().is_empty())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Params::parse(parts.uri.query()))
    }
}

/// What a read reports about itself in its headers.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub index: RaftIndex,
    pub known_leader: bool,
    pub last_contact_ms: u64,
    pub consistency: &'static str,
}

impl Meta {
    pub fn of(ctx: &Ctx, index: RaftIndex, p: &Params) -> Meta {
        let consistency = if p.flag("stale") {
            "stale"
        } else if p.flag("consistent") {
            "consistent"
        } else {
            "leader"
        };
        // One look at Raft's metrics for both: a woken watcher pays this once per answer.
        let (known_leader, last_contact_ms) = match &ctx.node {
            None => (true, 0),
            Some(n) => {
                let (leader, me) = (n.raft.metrics().borrow().current_leader, n.id);
                let contact = if leader == Some(me) { Some(std::time::Duration::ZERO) } else { n.contacts.since_leader() };
                (leader.is_some(), contact.map(|d| d.as_millis() as u64).unwrap_or(0))
            }
        };
        Meta { index: index.max(1), known_leader, last_contact_ms, consistency }
    }

    pub fn apply(&self, resp: &mut Response) {
        use axum::http::HeaderValue;
        let h = resp.headers_mut();
        h.insert("x-consul-index", HeaderValue::from(self.index));
        h.insert("x-consul-knownleader", HeaderValue::from_static(if self.known_leader { "true" } else { "false" }));
        h.insert("x-consul-lastcontact", HeaderValue::from(self.last_contact_ms));
        h.insert("x-consul-effective-consistency", HeaderValue::from_static(self.consistency));
    }
}

/// A JSON body with the read's headers.
pub fn reply<T: Serialize>(meta: &Meta, body: &T) -> Response {
    let mut resp = axum::Json(body).into_response();
    meta.apply(&mut resp);
    resp
}

/// Serialise `items` and keep the ones `?filter=` selects.
pub fn filtered<T: Serialize>(p: &Params, items: &[T]) -> Result<serde_json::Value, ApiError> {
    let values: Vec<serde_json::Value> = items.iter().map(|i| serde_json::to_value(i).unwrap_or(serde_json::Value::Null)).collect();
    Ok(serde_json::Value::Array(match p.filter() {
        Some(expr) => super::filter::apply(expr, values)?,
        None => values,
    }))
}

fn wait_of(p: &Params) -> Result<Duration, ApiError> {
    let wait = match p.get("wait") {
        None | Some("") => DEFAULT_WAIT,
        Some(w) => crate::duration::parse(w).ok_or_else(|| ApiError::BadRequest(format!("Invalid wait time: {w:?}")))?,
    };
    Ok(wait.min(MAX_WAIT))
}

/// Run `read` against the state; with `?index=N`, wait (up to `?wait`) until its index passes
/// N, waking on changes to any of `tables`.
pub async fn blocking<T, F>(ctx: &Ctx, p: &Params, tables: &[Table], read: F) -> Result<(T, Meta), ApiError>
where
    F: Fn(&StateData) -> Result<(T, RaftIndex), ApiError>,
{
    let keys: Vec<WatchKey> = tables.iter().map(|t| WatchKey::Table(*t)).collect();
    blocking_on(ctx, p, &keys, read).await
}

/// How a blocking read goes: checked parameters, its deadline, and the slot it parks in.
pub struct Blocking {
    /// The index the client saw (`?index`), if it asked to wait.
    pub min_index: Option<RaftIndex>,
    pub deadline: tokio::time::Instant,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Blocking {
    /// Check the read's parameters; verify leadership for `?consistent`; take a parking slot
    /// when the read may wait.
    pub async fn start(ctx: &Ctx, p: &Params) -> Result<Blocking, ApiError> {
        if p.flag("consistent") && !p.flag("stale") {
            ctx.raft()?.verify_leader().await?;
        }
        Blocking::start_local(ctx, p)
    }

    /// `start` for a read answered from this agent's own view (no leadership to verify).
    pub fn start_local(ctx: &Ctx, p: &Params) -> Result<Blocking, ApiError> {
        let min_index = p.u64("index")?.filter(|i| *i > 0);
        let wait = wait_of(p)?;
        // Only a query that may park takes a slot; it is held until the answer is ready.
        let slot = match min_index {
            Some(_) => Some(ctx.blocking_slots.clone().try_acquire_owned().map_err(|_| {
                ApiError::TooMany(format!(
                    "Too many concurrent blocking queries on this agent (limits.http_max_blocking_queries = {}); retry later",
                    ctx.limits.http_max_blocking_queries
                ))
            })?),
            None => None,
        };
        Ok(Blocking { min_index, deadline: tokio::time::Instant::now() + wait + jitter(wait), _slot: slot })
    }

    /// Whether an answer at `index` goes back now: not a blocking read, an index other than
    /// the one the client holds (a lower one means the state was reset: answer at once rather
    /// than wait for a number that may never come), or the wait is over.
    pub fn answer_now(&self, index: RaftIndex) -> bool {
        self.min_index.is_none_or(|min| index.max(1) != min) || tokio::time::Instant::now() >= self.deadline
    }

    /// Wait for any of `watches` to change, or the deadline; false when the deadline passed.
    pub async fn wait(&self, ctx: &Ctx, watches: &mut [tokio::sync::watch::Receiver<RaftIndex>]) -> bool {
        let changed = futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
        let woke = tokio::time::timeout_at(self.deadline, changed).await.is_ok();
        if woke {
            ctx.metrics.blocking_wakeups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        woke
    }
}

/// `blocking` waking on any of `keys` (a service's view, a KV key or prefix, a table).
pub async fn blocking_on<T, F>(ctx: &Ctx, p: &Params, keys: &[WatchKey], read: F) -> Result<(T, Meta), ApiError>
where
    F: Fn(&StateData) -> Result<(T, RaftIndex), ApiError>,
{
    let b = Blocking::start(ctx, p).await?;
    loop {
        let (mut watches, (value, index)) = {
            let store = ctx.raft()?.store.read();
            // Subscribe before reading, under the same lock: no change between the read and the
            // wait can be missed.
            let watches: Vec<_> = match b.min_index {
                Some(_) => keys.iter().map(|k| store.watches().subscribe(k)).collect(),
                None => Vec::new(),
            };
            (watches, read(store.data())?)
        };
        if b.answer_now(index) {
            return Ok((value, Meta::of(ctx, index, p)));
        }
        if !b.wait(ctx, &mut watches).await {
            // The wait is over with nothing changed: the same index, read afresh.
            let (value, index) = read(ctx.raft()?.store.read().data())?;
            return Ok((value, Meta::of(ctx, index, p)));
        }
    }
}

/// The answers of the hottest reads (a service's instances, catalog or health), computed and
/// encoded once per query and index, and served as the same bytes to every reader and every
/// watcher of that query. Bounded: past [`RESULT_CACHE_ENTRIES`] or [`RESULT_CACHE_BYTES`], the
/// least recently used answers are dropped (they are computed again when asked for).
#[derive(Default)]
pub struct ResultCache {
    entries: parking_lot::Mutex<HashMap<String, Arc<CacheSlot>>>,
    bytes: std::sync::atomic::AtomicUsize,
    clock: std::sync::atomic::AtomicU64,
}

const RESULT_CACHE_ENTRIES: usize = 4096;
const RESULT_CACHE_BYTES: usize = 64 << 20;

#[derive(Default)]
struct CacheSlot {
    answer: parking_lot::Mutex<Option<Answer>>,
    /// One computation at a time per query: every other reader of it waits and shares.
    flight: tokio::sync::Mutex<()>,
    used: std::sync::atomic::AtomicU64,
}

/// An encoded answer and what it is valid for.
#[derive(Clone)]
struct Answer {
    stamp: Stamp,
    index: RaftIndex,
    body: bytes::Bytes,
}

/// What an answer depends on: the index its query reports, plus anything else that changes it
/// without moving that index (network coordinates, for `?near`).
pub type Stamp = (RaftIndex, RaftIndex);

impl ResultCache {
    fn slot(&self, key: &str) -> Arc<CacheSlot> {
        let now = self.clock.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut entries = self.entries.lock();
        if let Some(s) = entries.get(key) {
            s.used.store(now, std::sync::atomic::Ordering::Relaxed);
            return s.clone();
        }
        if entries.len() >= RESULT_CACHE_ENTRIES || self.bytes.load(std::sync::atomic::Ordering::Relaxed) > RESULT_CACHE_BYTES {
            self.evict(&mut entries);
        }
        let s = Arc::new(CacheSlot::default());
        s.used.store(now, std::sync::atomic::Ordering::Relaxed);
        entries.insert(key.to_string(), s.clone());
        s
    }

    /// Drop the least recently used half.
    fn evict(&self, entries: &mut HashMap<String, Arc<CacheSlot>>) {
        let mut ages: Vec<u64> = entries.values().map(|s| s.used.load(std::sync::atomic::Ordering::Relaxed)).collect();
        ages.sort_unstable();
        let cut = ages.get(ages.len() / 2).copied().unwrap_or(0);
        entries.retain(|_, s| {
            let keep = s.used.load(std::sync::atomic::Ordering::Relaxed) > cut;
            if !keep && let Some(a) = s.answer.lock().as_ref() {
                self.bytes.fetch_sub(a.body.len(), std::sync::atomic::Ordering::Relaxed);
            }
            keep
        });
    }

    fn store(&self, slot: &CacheSlot, answer: Answer) {
        let mut a = slot.answer.lock();
        let old = a.as_ref().map_or(0, |a| a.body.len());
        self.bytes.fetch_add(answer.body.len(), std::sync::atomic::Ordering::Relaxed);
        self.bytes.fetch_sub(old, std::sync::atomic::Ordering::Relaxed);
        *a = Some(answer);
    }

    /// Answers held now.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The cache key of a read: its path and every parameter that shapes the answer (not the
/// blocking and consistency ones, which only decide when and where it is read).
pub fn cache_key(path: &str, p: &Params) -> String {
    let mut parts: Vec<&(String, String)> =
        p.0.iter().filter(|(k, _)| !matches!(k.as_str(), "index" | "wait" | "stale" | "consistent" | "cached" | "dc")).collect();
    parts.sort();
    let mut key = String::with_capacity(path.len() + 32);
    key.push_str(path);
    for (k, v) in parts {
        key.push('\u{0}');
        key.push_str(k);
        key.push('=');
        key.push_str(v);
    }
    key
}

/// A read whose answer is shared through `ctx.results`: `stamp` says cheaply what the answer
/// depends on now (read under the state lock); `compute` gathers it under the lock; `render`
/// turns it into JSON bytes outside the lock. With `?index`, waits on `key` as `blocking` does.
pub async fn shared_read<T, S, C, R>(
    ctx: &Ctx,
    p: &Params,
    cache_key: String,
    key: WatchKey,
    stamp: S,
    compute: C,
    render: R,
) -> Result<Response, ApiError>
where
    S: Fn(&StateData) -> Stamp,
    C: Fn(&StateData) -> Result<T, ApiError>,
    R: Fn(T) -> Result<bytes::Bytes, ApiError>,
{
    let b = Blocking::start(ctx, p).await?;
    let slot = ctx.results.slot(&cache_key);
    // Subscribed once, before the first look at the state, under the same lock: no change
    // between a look and the wait after it can be missed.
    let mut watch: Vec<_> = Vec::new();
    let now = loop {
        let now = {
            let store = ctx.raft()?.store.read();
            if b.min_index.is_some() && watch.is_empty() {
                watch.push(store.watches().subscribe(&key));
            }
            stamp(store.data())
        };
        if b.answer_now(now.0) || !b.wait(ctx, &mut watch).await {
            break now;
        }
    };
    drop(watch);
    // Boxed: a parked watcher should not carry the computation's state around.
    let answer = Box::pin(answer_for(ctx, &slot, now, &stamp, &compute, &render)).await?;
    let meta = Meta::of(ctx, answer.index, p);
    let mut resp = Response::new(axum::body::Body::from(answer.body));
    resp.headers_mut().insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    meta.apply(&mut resp);
    Ok(resp)
}

/// The cached answer if it is still valid, else computed once for everyone asking.
async fn answer_for<T, S, C, R>(ctx: &Ctx, slot: &CacheSlot, want: Stamp, stamp: &S, compute: &C, render: &R) -> Result<Answer, ApiError>
where
    S: Fn(&StateData) -> Stamp,
    C: Fn(&StateData) -> Result<T, ApiError>,
    R: Fn(T) -> Result<bytes::Bytes, ApiError>,
{
    if let Some(a) = slot.answer.lock().as_ref().filter(|a| a.stamp >= want) {
        return Ok(a.clone());
    }
    let _flight = slot.flight.lock().await;
    // Someone else may have computed it while this reader waited its turn.
    if let Some(a) = slot.answer.lock().as_ref().filter(|a| a.stamp >= want) {
        return Ok(a.clone());
    }
    let (value, now) = {
        let store = ctx.raft()?.store.read();
        let d = store.data();
        (compute(d)?, stamp(d))
    };
    let body = render(value)?;
    let answer = Answer { stamp: now, index: now.0.max(1), body };
    ctx.results.store(slot, answer.clone());
    Ok(answer)
}

fn jitter(wait: Duration) -> Duration {
    use rand::RngExt;
    let max = (wait / JITTER_FRACTION).as_millis() as u64;
    if max == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::rng().random_range(0..max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_decode_flags_and_percent_escapes() {
        let p = Params::parse(Some("recurse&filter=Service%20%3D%3D%20web&tag=a&tag=b+c&stale=false"));
        assert!(p.has("recurse") && p.flag("recurse"));
        assert!(!p.flag("stale"));
        assert_eq!(p.get("filter"), Some("Service == web"));
        assert_eq!(p.all("tag"), vec!["a", "b c"]);
    }

    #[test]
    fn truncated_percent_escape_is_kept_literally() {
        assert_eq!(Params::parse(Some("k=%4")).get("k"), Some("%4"));
        assert_eq!(Params::parse(Some("k=%")).get("k"), Some("%"));
    }

    #[test]
    fn bad_index_is_a_clear_error() {
        assert!(Params::parse(Some("index=abc")).u64("index").is_err());
    }
}
