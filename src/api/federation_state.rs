//! Federation states (Consul's internal endpoints): each datacenter's mesh gateways as the
//! primary stores them and every secondary replicates them.

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use serde_json::Value;

use super::query::{Params, blocking, reply};
use super::{ApiError, Ctx};
use crate::state::Table;

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/internal/federation-states", get(list))
        .route("/v1/internal/federation-states/mesh-gateways", get(mesh_gateways))
        .route("/v1/internal/federation-state/", get(|| async { ApiError::BadRequest("Missing datacenter name".into()) }))
        .route("/v1/internal/federation-state/{dc}", get(one))
}

async fn list(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let (list, meta) = blocking(&ctx, &p, &[Table::FederationStates], |d| {
        let list: Vec<Value> = d.federation_states.values().map(|s| s.json()).collect();
        Ok((list, d.index_of(&[Table::FederationStates])))
    })
    .await?;
    Ok(reply(&meta, &list))
}

async fn mesh_gateways(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let (map, meta) = blocking(&ctx, &p, &[Table::FederationStates], |d| {
        let map: serde_json::Map<String, Value> = d
            .federation_states
            .values()
            .filter_map(|s| {
                let gws = s.gateways();
                (!gws.is_empty()).then(|| (s.datacenter.clone(), Value::Array(gws)))
            })
            .collect();
        Ok((Value::Object(map), d.index_of(&[Table::FederationStates])))
    })
    .await?;
    Ok(reply(&meta, &map))
}

async fn one(State(ctx): State<Ctx>, Path(dc): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (found, meta) = blocking(&ctx, &p, &[Table::FederationStates], |d| {
        Ok((d.federation_states.get(&dc.to_ascii_lowercase()).map(|s| s.json()), d.index_of(&[Table::FederationStates])))
    })
    .await?;
    match found {
        Some(state) => Ok(reply(
            &meta,
            &serde_json::json!({ "State": state, "Index": meta.index, "LastContact": 0, "KnownLeader": true, "ConsistencyLevel": "",
                "NotModified": false, "Backend": 0, "ResultsFilteredByACLs": false }),
        )),
        None => {
            let mut resp = axum::response::IntoResponse::into_response((axum::http::StatusCode::NOT_FOUND, ""));
            meta.apply(&mut resp);
            Ok(resp)
        }
    }
}
