//! `/v1/session/*`. TTL timers are the leader's (`cluster::sessions`): renewals here reset
//! them; an expired session is destroyed through Raft, which releases or deletes its locks.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, put};
use serde::Deserialize;
use serde_json::{Value, json};

use super::catalog::{accepted, write_reply};
use super::error::decode;
use super::query::{Meta, Params, blocking, reply};
use super::{ApiError, Ctx};
use crate::state::{Command, ServiceCheckRef, Session, SessionBehavior, Table};

/// Consul's bounds and defaults for sessions.
const MIN_TTL: Duration = Duration::from_secs(10);
const MAX_TTL: Duration = Duration::from_secs(86_400);
const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// Numeric lock delays below this are seconds, above it nanoseconds (Consul's rule).
const LOCK_DELAY_SECONDS_BELOW: u64 = 1000;

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/session/create", put(create))
        .route("/v1/session/destroy/{id}", put(destroy))
        .route("/v1/session/renew/{id}", put(renew))
        .route("/v1/session/info/{id}", get(info))
        .route("/v1/session/node/{node}", get(node))
        .route("/v1/session/list", get(list))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct CreateBody {
    name: String,
    node: String,
    checks: Option<Vec<String>>,
    node_checks: Option<Vec<String>>,
    service_checks: Option<Vec<ServiceCheckBody>>,
    lock_delay: Option<Value>,
    behavior: String,
    #[serde(rename = "TTL")]
    ttl: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct ServiceCheckBody {
    #[serde(rename = "ID")]
    id: String,
    namespace: String,
}

fn lock_delay(v: Option<Value>) -> Result<Duration, ApiError> {
    let d = match v {
        None | Some(Value::Null) => DEFAULT_LOCK_DELAY,
        Some(Value::Number(n)) => {
            let n = n.as_u64().ok_or_else(|| ApiError::BadRequest(format!("Invalid LockDelay: {n}")))?;
            if n < LOCK_DELAY_SECONDS_BELOW { Duration::from_secs(n) } else { Duration::from_nanos(n) }
        }
        Some(Value::String(s)) => crate::duration::parse(&s).ok_or_else(|| ApiError::BadRequest(format!("Invalid LockDelay: {s:?}")))?,
        Some(other) => return Err(ApiError::BadRequest(format!("Invalid LockDelay: {other}"))),
    };
    if d > MAX_LOCK_DELAY {
        return Err(ApiError::BadRequest(format!(
            "Invalid LockDelay: {} exceeds {}",
            crate::duration::format(d),
            crate::duration::format(MAX_LOCK_DELAY)
        )));
    }
    Ok(d)
}

pub fn parse_ttl(ttl: &str) -> Result<Option<Duration>, ApiError> {
    if ttl.is_empty() {
        return Ok(None);
    }
    let d = crate::duration::parse(ttl).ok_or_else(|| ApiError::BadRequest(format!("Request decode failed: invalid TTL {ttl:?}")))?;
    if d != Duration::ZERO && !(MIN_TTL..=MAX_TTL).contains(&d) {
        return Err(ApiError::BadRequest(format!("Invalid Session TTL '{ttl}', must be between [10s=24h0m0s]")));
    }
    Ok(Some(d).filter(|d| !d.is_zero()))
}

async fn create(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ApiError> {
    // An empty body is a session with every default, as Consul allows.
    let b: CreateBody = if body.iter().all(u8::is_ascii_whitespace) { CreateBody::default() } else { decode(&body)? };
    let behavior = match b.behavior.as_str() {
        "" | "release" => SessionBehavior::Release,
        "delete" => SessionBehavior::Delete,
        other => {
            return Err(ApiError::BadRequest(format!("Invalid Behavior setting '{other}'")));
        }
    };
    let ttl = parse_ttl(&b.ttl)?;
    let node_checks = match (b.checks, b.node_checks, &b.service_checks) {
        (None, None, None) => vec!["serfHealth".to_string()],
        (legacy, node, _) => legacy.into_iter().chain(node).flatten().collect(),
    };
    let s = Session {
        id: uuid::Uuid::new_v4().to_string(),
        name: b.name,
        node: if b.node.is_empty() { ctx.info.node_name.clone() } else { b.node },
        node_checks,
        service_checks: b.service_checks.unwrap_or_default().into_iter().map(|c| ServiceCheckRef { id: c.id, namespace: c.namespace }).collect(),
        lock_delay: lock_delay(b.lock_delay)?.as_nanos() as u64,
        behavior,
        ttl: ttl.map(crate::duration::format).unwrap_or_default(),
        namespace: String::new(),
        create_index: 0,
        modify_index: 0,
    };
    let id = s.id.clone();
    let (outcome, index) = ctx.raft()?.write(Command::SessionCreate(s)).await?;
    accepted(outcome)?;
    if let Some(ttl) = ttl {
        ctx.sessions.renew(&id, ttl);
    }
    Ok(reply(&Meta::of(&ctx, index, &Params::default()), &json!({ "ID": id })))
}

async fn destroy(State(ctx): State<Ctx>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let (_, index) = ctx.raft()?.write(Command::SessionDestroy { id }).await?;
    Ok(write_reply(&ctx, index, true))
}

async fn renew(State(ctx): State<Ctx>, Path(id): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (found, meta) = blocking(&ctx, &Params::default(), &[Table::Sessions], |d| Ok(d.session_get(&id))).await?;
    let Some(s) = found else {
        return Err(ApiError::NotFound(format!("Session id '{id}' not found")));
    };
    if let Some(ttl) = parse_ttl(&s.ttl)? {
        ctx.sessions.renew(&id, ttl);
    }
    let _ = p;
    Ok(reply(&meta, &[s]))
}

async fn info(State(ctx): State<Ctx>, Path(id): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (found, meta) = blocking(&ctx, &p, &[Table::Sessions], |d| Ok(d.session_get(&id))).await?;
    Ok(reply(&meta, &found.into_iter().collect::<Vec<_>>()))
}

async fn node(State(ctx): State<Ctx>, Path(node): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (list, meta) = blocking(&ctx, &p, &[Table::Sessions], |d| Ok(d.session_list(Some(&node)))).await?;
    Ok(reply(&meta, &list))
}

async fn list(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let (list, meta) = blocking(&ctx, &p, &[Table::Sessions], |d| Ok(d.session_list(None))).await?;
    Ok(reply(&meta, &super::query::filtered(&p, &list)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_outside_consul_bounds_is_rejected() {
        assert!(parse_ttl("5s").is_err());
        assert!(parse_ttl("25h").is_err());
        assert_eq!(parse_ttl("10s").unwrap(), Some(Duration::from_secs(10)));
        assert_eq!(parse_ttl("").unwrap(), None);
    }

    #[test]
    fn small_numeric_lock_delays_are_seconds() {
        assert_eq!(lock_delay(Some(json!(15))).unwrap(), Duration::from_secs(15));
        assert_eq!(lock_delay(Some(json!(2_000_000_000u64))).unwrap(), Duration::from_secs(2));
        assert!(lock_delay(Some(json!("2m"))).is_err());
    }
}
