//! `/v1/health/*`: checks by node, service and state, and service instances with their health.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use serde_json::{Value, json};

use super::catalog::{node_json, service_json, service_query};
use super::query::{Params, blocking, blocking_on, filtered, reply};
use super::{ApiError, Ctx};
use crate::state::catalog::ServiceInstance;
use crate::state::{CheckStatus, Table, WatchKey};

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/health/node/{node}", get(node))
        .route("/v1/health/checks/{service}", get(checks))
        .route("/v1/health/service/{service}", get(service))
        .route("/v1/health/state/{state}", get(state))
        .route("/v1/health/ingress/{service}", get(ingress))
}

async fn node(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (checks, meta) = blocking(&ctx, &p, &[Table::Checks], |d| Ok(d.node_checks(&name))).await?;
    Ok(reply(&meta, &filtered(&p, &checks)?))
}

async fn checks(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params) -> Result<Response, ApiError> {
    let key = WatchKey::Service(name.clone());
    let (checks, meta) = blocking_on(&ctx, &p, &[key], |d| Ok(d.service_checks(&name))).await?;
    Ok(reply(&meta, &filtered(&p, &checks)?))
}

async fn service(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params, headers: HeaderMap) -> Result<Response, ApiError> {
    let mut q = service_query(&p)?;
    q.passing_only = p.flag("passing");
    super::catalog::service_view(&ctx, "health", name, q, p, headers, health_entry_json).await
}

pub fn health_entry_json(i: &ServiceInstance, dc: &str) -> Value {
    json!({ "Node": node_json(&i.node, dc), "Service": service_json(&i.service), "Checks": i.checks })
}

/// Instances of the ingress gateways that route to a service: Trellis has no ingress gateways,
/// so none (with the service's index, and `?filter` accepted, as Consul answers).
async fn ingress(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (none, meta) =
        blocking(&ctx, &p, &[Table::Services, Table::Nodes, Table::Checks], |d| Ok((Vec::<Value>::new(), d.service_view_index(&name)))).await?;
    Ok(reply(&meta, &filtered(&p, &none)?))
}

async fn state(State(ctx): State<Ctx>, Path(state): Path<String>, p: Params) -> Result<Response, ApiError> {
    let want = match state.as_str() {
        "any" => None,
        s => Some(
            CheckStatus::parse(s).filter(|s| *s != CheckStatus::Maintenance).ok_or_else(|| ApiError::BadRequest(format!("Invalid state: {s}")))?,
        ),
    };
    let (checks, meta) = blocking(&ctx, &p, &[Table::Checks], |d| Ok(d.checks_in_state(want))).await?;
    Ok(reply(&meta, &filtered(&p, &checks)?))
}
