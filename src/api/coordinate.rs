//! `/v1/coordinate/*`: network coordinates. WAN coordinates of every datacenter's servers come
//! from the federation router; each node's coordinate in this datacenter from the catalog.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::Deserialize;
use serde_json::{Value, json};

use super::catalog::write_reply;
use super::error::decode;
use super::query::{Params, blocking, reply};
use super::{ApiError, Ctx};
use crate::coordinate::Coordinate;
use crate::state::{Command, CoordinateEntry, Table};

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/coordinate/datacenters", get(datacenters))
        .route("/v1/coordinate/nodes", get(nodes))
        .route("/v1/coordinate/node/{node}", get(node))
        .route("/v1/coordinate/update", put(update))
}

/// Consul's shape: one entry per datacenter (nearest first) with its servers' coordinates as
/// this server knows them from its WAN probes.
async fn datacenters(State(ctx): State<Ctx>) -> Response {
    let Some(router) = &ctx.federation else {
        return axum::Json(Vec::<Value>::new()).into_response();
    };
    let list: Vec<Value> = router
        .coordinates()
        .into_iter()
        .map(|(dc, nodes)| {
            let coords: Vec<Value> = nodes.into_iter().map(|(node, coord)| json!({ "Node": node, "Coord": coord })).collect();
            json!({ "Datacenter": dc, "AreaID": "WAN", "Coordinates": coords })
        })
        .collect();
    axum::Json(list).into_response()
}

fn entry_json(node: &str, e: &CoordinateEntry) -> Value {
    json!({ "Node": node, "Segment": "", "Coord": e.coord, "CreateIndex": e.create_index, "ModifyIndex": e.modify_index })
}

async fn nodes(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let (list, meta) = blocking(&ctx, &p, &[Table::Coordinates], |d| {
        Ok((d.coordinates.iter().map(|(n, e)| entry_json(n, e)).collect::<Vec<_>>(), d.index_of(&[Table::Coordinates])))
    })
    .await?;
    Ok(reply(&meta, &super::query::filtered(&p, &list)?))
}

async fn node(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (found, meta) = blocking(&ctx, &p, &[Table::Coordinates], |d| {
        Ok((d.coordinates.get(&name).map(|e| entry_json(&name, e)), d.index_of(&[Table::Coordinates])))
    })
    .await?;
    // Consul answers 404 with an empty body for a node without a coordinate.
    let found = found.ok_or_else(|| ApiError::NotFound(String::new()))?;
    Ok(reply(&meta, &[found]))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdateBody {
    node: String,
    #[serde(default)]
    segment: String,
    coord: Coordinate,
}

async fn update(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ApiError> {
    let b: UpdateBody = decode(&body)?;
    if !b.segment.is_empty() {
        return Err(ApiError::BadRequest(format!("Network segments are not supported (Segment {:?})", b.segment)));
    }
    if !b.coord.is_valid() {
        return Err(ApiError::BadRequest(format!("Coord must have {} finite dimensions", crate::coordinate::DIMENSIONALITY)));
    }
    // A coordinate for a node the catalog does not hold is accepted and dropped, as Consul
    // does (the state keeps coordinates of registered nodes only).
    let (_, index) = ctx.raft()?.write(Command::CoordinateBatch(vec![(b.node, b.coord)])).await?;
    Ok(write_reply(&ctx, index, true))
}
