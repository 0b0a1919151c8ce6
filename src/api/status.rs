//! `/v1/status/leader` and `/v1/status/peers`: the Raft leader and voters, by RPC address.

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;

use super::query::{Meta, Params, reply};
use super::{ApiError, Ctx};

pub fn routes() -> Router<Ctx> {
    Router::new().route("/v1/status/leader", get(leader)).route("/v1/status/peers", get(peers))
}

async fn leader(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let node = ctx.raft()?;
    let addr = node.leader().map(|(_, n)| n.rpc_addr).unwrap_or_default();
    Ok(reply(&Meta::of(&ctx, node.applied_index(), &p), &addr))
}

async fn peers(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let node = ctx.raft()?;
    let voters: Vec<String> = node.members().into_iter().filter(|(_, _, voter)| *voter).map(|(_, n, _)| n.rpc_addr).collect();
    Ok(reply(&Meta::of(&ctx, node.applied_index(), &p), &voters))
}
