//! `/v1/coordinate/datacenters`: the WAN network coordinates of every datacenter's servers.

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::Ctx;

pub fn routes() -> Router<Ctx> {
    Router::new().route("/v1/coordinate/datacenters", get(datacenters))
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
