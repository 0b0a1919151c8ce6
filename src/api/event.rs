//! `/v1/event/fire/{name}` and `/v1/event/list`: user events delivered by gossip. The agent
//! keeps the most recent events it received that pass its node, service and tag filters.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};

use super::query::{MAX_WAIT, Params};
use super::{ApiError, Ctx};

/// Consul's limit on an event payload.
const MAX_PAYLOAD: usize = 100 * 1024;

pub fn routes() -> Router<Ctx> {
    Router::new().route("/v1/event/fire/{name}", put(fire)).route("/v1/event/list", get(list))
}

async fn fire(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params, body: Bytes) -> Result<Response, ApiError> {
    if body.len() > MAX_PAYLOAD {
        return Err(ApiError::TooLarge(format!("User event payload exceeds {MAX_PAYLOAD} bytes")));
    }
    for key in ["node", "service", "tag"] {
        if let Some(re) = p.get(key).filter(|s| !s.is_empty()) {
            regex::Regex::new(re).map_err(|e| ApiError::BadRequest(format!("Invalid {key} filter {re:?}: {e}")))?;
        }
    }
    if p.get("tag").is_some_and(|t| !t.is_empty()) && p.get("service").is_none_or(str::is_empty) {
        return Err(ApiError::BadRequest("Cannot provide tag filter without service filter.".into()));
    }
    let ev = ctx.agent.fire_event(
        name,
        body.to_vec(),
        p.get("node").unwrap_or("").to_string(),
        p.get("service").unwrap_or("").to_string(),
        p.get("tag").unwrap_or("").to_string(),
    )?;
    Ok(axum::Json(ev).into_response())
}

/// Events received, oldest first; `?name=` filters; `?index=` blocks until a newer event.
async fn list(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let mut changes = ctx.agent.event_changes();
    if let Some(min) = p.u64("index")?.filter(|i| *i > 0) {
        let wait = p.get("wait").and_then(crate::duration::parse).unwrap_or(super::query::DEFAULT_WAIT).min(MAX_WAIT);
        let _ = tokio::time::timeout(wait, changes.wait_for(|i| *i != min)).await;
    }
    let (events, index) = ctx.agent.events();
    let name = p.get("name").filter(|n| !n.is_empty());
    let events: Vec<serde_json::Value> = events.into_iter().filter(|e| name.is_none_or(|n| e["Name"] == n)).collect();
    let mut resp = axum::Json(events).into_response();
    if let Ok(v) = index.to_string().parse() {
        resp.headers_mut().insert("x-consul-index", v);
    }
    Ok(resp)
}
