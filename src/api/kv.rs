//! `/v1/kv/*`: reads (single, `recurse`, `keys` with `separator`, `raw`) and writes (`flags`,
//! `cas`, `acquire`, `release`, delete with `recurse`/`cas`). Every write is a one-op
//! transaction of the state machine.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use super::catalog::write_reply;
use super::query::{Params, blocking_on, reply};
use super::{ApiError, Ctx};
use crate::state::{Command, KvEntry, KvVerb, Outcome, TxnOp, WatchKey};

pub fn routes() -> Router<Ctx> {
    Router::new().route("/v1/kv", any(root)).route("/v1/kv/", any(root)).route("/v1/kv/{*key}", any(keyed))
}

async fn root(ctx: State<Ctx>, method: Method, p: Params, body: Bytes) -> Result<Response, ApiError> {
    handle(ctx, method, String::new(), p, body).await
}

async fn keyed(ctx: State<Ctx>, method: Method, Path(key): Path<String>, p: Params, body: Bytes) -> Result<Response, ApiError> {
    handle(ctx, method, key, p, body).await
}

async fn handle(State(ctx): State<Ctx>, method: Method, key: String, p: Params, body: Bytes) -> Result<Response, ApiError> {
    match method {
        Method::GET => get(ctx, key, p).await,
        Method::PUT | Method::POST => put(ctx, key, p, body).await,
        Method::DELETE => delete(ctx, key, p).await,
        m => Err(ApiError::MethodNotAllowed(m.to_string())),
    }
}

async fn get(ctx: Ctx, key: String, p: Params) -> Result<Response, ApiError> {
    if p.has("keys") {
        let sep = p.get("separator").unwrap_or("").to_string();
        let (keys, meta) = blocking_on(&ctx, &p, &[WatchKey::KvPrefix(key.clone())], |d| Ok(d.kv_keys(&key, &sep))).await?;
        return Ok(found_or_404(&meta, keys.is_empty(), &keys));
    }
    if p.has("recurse") {
        let (entries, meta) = blocking_on(&ctx, &p, &[WatchKey::KvPrefix(key.clone())], |d| Ok(d.kv_list(&key))).await?;
        return Ok(found_or_404(&meta, entries.is_empty(), &entries));
    }
    if key.is_empty() {
        return Err(ApiError::BadRequest("Missing key name".into()));
    }
    let (entry, meta) = blocking_on(&ctx, &p, &[WatchKey::KvKey(key.clone())], |d| Ok(d.kv_get(&key))).await?;
    let Some(entry) = entry else {
        return Ok(found_or_404(&meta, true, &()));
    };
    if p.has("raw") {
        let mut resp = (StatusCode::OK, [("content-type", "application/octet-stream")], entry.value.unwrap_or_default()).into_response();
        meta.apply(&mut resp);
        return Ok(resp);
    }
    Ok(reply(&meta, &[entry]))
}

/// Consul answers a read that found nothing with a bare 404 that still carries the index, so
/// that a blocking watcher can wait for the key to appear.
fn found_or_404<T: serde::Serialize>(meta: &super::query::Meta, empty: bool, body: &T) -> Response {
    if empty {
        let mut resp = StatusCode::NOT_FOUND.into_response();
        meta.apply(&mut resp);
        return resp;
    }
    reply(meta, body)
}

fn op(verb: KvVerb, key: &str) -> TxnOp {
    TxnOp { verb, key: key.to_string(), value: None, flags: 0, index: 0, session: String::new() }
}

/// Run a one-op transaction: a failed condition is `false`, an invalid request an error.
async fn one(ctx: &Ctx, op: TxnOp) -> Result<Response, ApiError> {
    let (outcome, index) = ctx.raft()?.write(Command::Txn(vec![op])).await?;
    match outcome {
        Outcome::Txn(Ok(_)) => Ok(write_reply(ctx, index, true)),
        Outcome::Txn(Err(errs)) if errs.iter().all(|e| e.conflict) => Ok(write_reply(ctx, index, false)),
        Outcome::Txn(Err(errs)) => Err(ApiError::BadRequest(errs.into_iter().map(|e| e.what).collect::<Vec<_>>().join("; "))),
        Outcome::Rejected(m) => Err(ApiError::BadRequest(m)),
        other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

async fn put(ctx: Ctx, key: String, p: Params, body: Bytes) -> Result<Response, ApiError> {
    if key.is_empty() {
        return Err(ApiError::BadRequest("Missing key name".into()));
    }
    let acquire = p.get("acquire").filter(|s| !s.is_empty());
    let release = p.get("release").filter(|s| !s.is_empty());
    let cas = p.u64("cas")?;
    let (verb, session) = match (acquire, release, cas) {
        (Some(_), Some(_), _) => {
            return Err(ApiError::BadRequest("Conflicting flags: acquire and release".into()));
        }
        (Some(s), None, _) => (KvVerb::Lock, s.to_string()),
        (None, Some(s), _) => (KvVerb::Unlock, s.to_string()),
        (None, None, Some(_)) => (KvVerb::Cas, String::new()),
        (None, None, None) => (KvVerb::Set, String::new()),
    };
    let mut o = op(verb, &key);
    o.value = Some(body.to_vec());
    o.flags = p.u64("flags")?.unwrap_or(0);
    o.index = cas.unwrap_or(0);
    o.session = session;
    one(&ctx, o).await
}

async fn delete(ctx: Ctx, key: String, p: Params) -> Result<Response, ApiError> {
    let recurse = p.has("recurse");
    if key.is_empty() && !recurse {
        return Err(ApiError::BadRequest("Missing key name".into()));
    }
    let mut o = match (recurse, p.u64("cas")?) {
        (true, Some(_)) => {
            return Err(ApiError::BadRequest("Conflicting flags: cas and recurse".into()));
        }
        (true, None) => op(KvVerb::DeleteTree, &key),
        (false, Some(i)) => {
            let mut o = op(KvVerb::DeleteCas, &key);
            o.index = i;
            o
        }
        (false, None) => op(KvVerb::Delete, &key),
    };
    o.value = None;
    one(&ctx, o).await
}

/// The JSON form of a KV entry in txn results (value present only for reads).
pub fn entry_json(e: &KvEntry) -> serde_json::Value {
    serde_json::to_value(e).unwrap_or(serde_json::Value::Null)
}
