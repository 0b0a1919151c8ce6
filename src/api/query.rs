//! Query parameters, blocking queries and the metadata headers every read returns
//! (`X-Consul-Index`, `X-Consul-KnownLeader`, `X-Consul-LastContact`).

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{ApiError, Ctx};
use crate::state::{RaftIndex, StateData, Table};

/// Consul's default and longest blocking-query waits.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Up to wait/16 extra, so that many watchers started together do not return together.
const JITTER_FRACTION: u32 = 16;

/// Query-string pairs in order; flags like `?recurse` have an empty value.
#[derive(Debug, Default, Clone)]
pub struct Params(Vec<(String, String)>);

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
        Meta {
            index: index.max(1),
            known_leader: ctx.node.as_ref().is_none_or(|n| n.leader().is_some()),
            last_contact_ms: ctx.node.as_ref().and_then(|n| n.last_contact()).map(|d| d.as_millis() as u64).unwrap_or(0),
            consistency,
        }
    }

    pub fn apply(&self, resp: &mut Response) {
        let h = resp.headers_mut();
        let put = |h: &mut axum::http::HeaderMap, k: &'static str, v: String| {
            if let Ok(v) = v.parse() {
                h.insert(k, v);
            }
        };
        put(h, "x-consul-index", self.index.to_string());
        put(h, "x-consul-knownleader", self.known_leader.to_string());
        put(h, "x-consul-lastcontact", self.last_contact_ms.to_string());
        put(h, "x-consul-effective-consistency", self.consistency.to_string());
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
/// N. Receivers are taken before each read so that no change between read and wait is missed.
pub async fn blocking<T, F>(ctx: &Ctx, p: &Params, tables: &[Table], read: F) -> Result<(T, Meta), ApiError>
where
    F: Fn(&StateData) -> Result<(T, RaftIndex), ApiError>,
{
    if p.flag("consistent") && !p.flag("stale") {
        ctx.raft()?.verify_leader().await?;
    }
    let min_index = p.u64("index")?.filter(|i| *i > 0);
    let wait = wait_of(p)?;
    // Only a query that may park takes a slot; it is held until the answer is ready.
    let _slot = match min_index {
        Some(_) => Some(ctx.blocking_slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::TooMany(format!(
                "Too many concurrent blocking queries on this agent (limits.http_max_blocking_queries = {}); retry later",
                ctx.limits.http_max_blocking_queries
            ))
        })?),
        None => None,
    };
    let deadline = tokio::time::Instant::now() + wait + jitter(wait);
    loop {
        let (mut watches, result) = {
            let store = ctx.raft()?.store.read();
            let watches: Vec<_> = tables.iter().map(|t| store.watch(*t)).collect();
            (watches, read(store.data())?)
        };
        let (value, index) = result;
        // Compare what the client was told: an empty table reports index 1, not 0.
        let index = index.max(1);
        let done = match min_index {
            None => true,
            // An index below the one asked for means the state was reset (snapshot restore):
            // answer at once rather than wait for a number that may never come.
            Some(min) => index != min,
        };
        if done || tokio::time::Instant::now() >= deadline {
            return Ok((value, Meta::of(ctx, index, p)));
        }
        let changed = futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            let store = ctx.raft()?.store.read();
            let (value, index) = read(store.data())?;
            return Ok((value, Meta::of(ctx, index, p)));
        }
    }
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
