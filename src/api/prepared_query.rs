//! `/v1/query`: prepared queries (create, list, read, update, delete, execute, explain).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use serde_json::{Value, json};

use super::catalog::{accepted, node_json, service_json};
use super::error::decode;
use super::query::{Meta, Params, blocking, reply};
use super::{ApiError, Ctx};
use crate::federation::fail_over;
use crate::state::catalog::ServiceInstance;
use crate::state::query::PreparedQuery;
use crate::state::{Command, Outcome, StateData, Table};
use rand::seq::SliceRandom;

/// Set on every request by the agent that first receives it (and stripped from what users
/// send), so that `near=_agent` and `near=_ip` mean that agent and that client even after the
/// request is relayed to a server.
pub const ORIGIN_NODE_HEADER: &str = "x-trellis-origin-node";
pub const ORIGIN_IP_HEADER: &str = "x-trellis-origin-ip";

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/query", get(list).post(create))
        .route("/v1/query/{id}", get(read).put(update).delete(delete))
        .route("/v1/query/{id}/execute", get(execute))
        .route("/v1/query/{id}/explain", get(explain))
}

use crate::state::query::NOT_FOUND;

fn body_query(body: &[u8]) -> Result<PreparedQuery, ApiError> {
    let q: PreparedQuery = decode(body)?;
    q.validate().map_err(ApiError::BadRequest)?;
    Ok(q)
}

fn query_json(q: &PreparedQuery) -> Value {
    serde_json::to_value(q).unwrap_or(Value::Null)
}

async fn create(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ApiError> {
    let mut q = body_query(&body)?;
    q.id = uuid::Uuid::new_v4().to_string();
    let id = q.id.clone();
    let (outcome, index) = ctx.raft()?.write(Command::QuerySet(q)).await?;
    accepted(outcome)?;
    Ok(reply(&Meta::of(&ctx, index, &Params::default()), &json!({ "ID": id })))
}

async fn update(State(ctx): State<Ctx>, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let mut q = body_query(&body)?;
    q.id = id;
    let (outcome, index) = ctx.raft()?.write(Command::QueryUpdate(q)).await?;
    if outcome == Outcome::Rejected(NOT_FOUND.into()) {
        return Err(ApiError::NotFound(NOT_FOUND.into()));
    }
    accepted(outcome)?;
    Ok(reply(&Meta::of(&ctx, index, &Params::default()), &Value::Null))
}

async fn delete(State(ctx): State<Ctx>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let (outcome, index) = ctx.raft()?.write(Command::QueryDelete { id }).await?;
    if outcome == Outcome::Applied(false) {
        return Err(ApiError::NotFound(NOT_FOUND.into()));
    }
    Ok(reply(&Meta::of(&ctx, index, &Params::default()), &Value::Null))
}

async fn list(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let (list, meta) = blocking(&ctx, &p, &[Table::PreparedQueries], |d| {
        Ok((d.prepared_queries.values().map(query_json).collect::<Vec<_>>(), d.index_of(&[Table::PreparedQueries])))
    })
    .await?;
    Ok(reply(&meta, &list))
}

async fn read(State(ctx): State<Ctx>, Path(id): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (found, meta) =
        blocking(&ctx, &p, &[Table::PreparedQueries], |d| Ok((d.prepared_queries.get(&id).map(query_json), d.index_of(&[Table::PreparedQueries]))))
            .await?;
    let q = found.ok_or_else(|| ApiError::NotFound(NOT_FOUND.into()))?;
    Ok(reply(&meta, &[q]))
}

fn resolve(d: &StateData, id_or_name: &str) -> Result<PreparedQuery, ApiError> {
    d.resolve_query(id_or_name).map_err(ApiError::BadRequest)?.ok_or_else(|| ApiError::NotFound(NOT_FOUND.into()))
}

async fn explain(State(ctx): State<Ctx>, Path(id): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (q, meta) = blocking(&ctx, &p, &[Table::PreparedQueries], |d| Ok((resolve(d, &id)?, d.index_of(&[Table::PreparedQueries])))).await?;
    Ok(reply(&meta, &json!({ "Query": query_json(&q) })))
}

/// The node `near` names: `_agent` is the agent the request came in through, `_ip` the node
/// at the client's address (X-Forwarded-For first).
pub(crate) fn near_node(d: &StateData, near: &str, ctx: &Ctx, headers: &HeaderMap) -> Option<String> {
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).map(str::to_string);
    let agent = header(ORIGIN_NODE_HEADER).unwrap_or_else(|| ctx.info.node_name.clone());
    let client_ip = header("x-forwarded-for").and_then(|v| v.split(',').next().map(|s| s.trim().to_string())).or_else(|| header(ORIGIN_IP_HEADER));
    d.near_node(near, &agent, client_ip.as_deref())
}

async fn execute(State(ctx): State<Ctx>, Path(id): Path<String>, p: Params, headers: HeaderMap) -> Result<Response, ApiError> {
    let limit = p.u64("limit")?.unwrap_or(0) as usize;
    let dc = ctx.info.datacenter.clone();
    let tables = [Table::PreparedQueries, Table::Services, Table::Nodes, Table::Checks];
    let ((q, mut instances), meta) = blocking(&ctx, &p, &tables, |d| {
        let q = resolve(d, &id)?;
        let near = p.get("near").filter(|n| !n.is_empty()).unwrap_or(&q.service.near).to_string();
        let mut found = d.execute_query(&q);
        match near_node(d, &near, &ctx, &headers) {
            Some(near) => d.sort_near(&mut found, |i| i.node.node.as_str(), &near),
            None => found.shuffle(&mut rand::rng()),
        }
        Ok(((q.clone(), found), d.index_of(&tables)))
    })
    .await?;
    // Nothing healthy here: try the failover datacenters in order, with the same definition.
    let (mut dc, mut failovers) = (dc, 0);
    if instances.is_empty()
        && let Some(router) = &ctx.federation
    {
        let read = |dc: String, query| async move { router.read(&dc, query).await.map_err(|e| e.to_string()) };
        let (found, asked) = fail_over(&q, &router.datacenters(), &dc, read).await;
        failovers = asked;
        if let Some((remote_dc, answer)) = found {
            instances = answer.instances.into_iter().map(|(node, service, checks)| ServiceInstance { node, service, checks }).collect();
            instances.shuffle(&mut rand::rng());
            dc = remote_dc;
        }
    }
    if limit > 0 {
        instances.truncate(limit);
    }
    let nodes: Vec<Value> =
        instances.iter().map(|i| json!({ "Node": node_json(&i.node, &dc), "Service": service_json(&i.service), "Checks": i.checks })).collect();
    let body = json!({
        "Service": q.service.service,
        "Nodes": nodes,
        "DNS": { "TTL": q.dns.ttl },
        "Datacenter": dc,
        "Failovers": failovers,
    });
    Ok(reply(&meta, &body))
}
