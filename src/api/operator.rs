//! `/v1/operator/*`: the Raft configuration, peer removal, leadership transfer and autopilot.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::catalog::write_reply;
use super::error::decode;
use super::query::{Params, blocking, reply};
use super::{ApiError, Ctx};
use crate::cluster::{ClusterReply, ClusterRpc};
use crate::rpc::Service;
use crate::state::{AutopilotConfig, Command, Outcome, Table};

/// How long a leadership transfer may take before it is reported as failed.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/operator/raft/configuration", get(configuration))
        .route("/v1/operator/raft/peer", delete(remove_peer))
        .route("/v1/operator/raft/transfer-leader", post(transfer_leader))
        .route("/v1/operator/autopilot/configuration", get(autopilot_get).put(autopilot_put))
        .route("/v1/operator/autopilot/health", get(autopilot_health))
        .route("/v1/operator/usage", get(usage))
}

/// Server health as the leader's autopilot loop last computed it.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AutopilotHealth {
    pub healthy: bool,
    pub failure_tolerance: usize,
    pub servers: Vec<ServerHealth>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServerHealth {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub address: String,
    pub serf_status: String,
    pub version: String,
    pub leader: bool,
    pub last_contact: String,
    pub last_term: u64,
    pub last_index: u64,
    pub healthy: bool,
    pub voter: bool,
    pub stable_since: String,
}

async fn configuration(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    if p.flag("consistent") || !p.flag("stale") {
        ctx.raft()?.verify_leader().await?;
    }
    let leader = ctx.raft()?.leader().map(|l| l.0);
    let m = ctx.raft()?.raft.metrics().borrow().clone();
    let index = m.membership_config.log_id().map(|l| l.index).unwrap_or(0);
    let servers: Vec<_> = ctx
        .raft()?
        .members()
        .into_iter()
        .map(|(id, n, voter)| {
            json!({ "ID": n.id, "Node": n.name, "Address": n.rpc_addr, "Leader": Some(id) == leader, "ProtocolVersion": "3", "Voter": voter })
        })
        .collect();
    Ok(axum::Json(json!({ "Servers": servers, "Index": index })).into_response())
}

async fn remove_peer(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let (by, want) = match (p.get("id").filter(|s| !s.is_empty()), p.get("address").filter(|s| !s.is_empty())) {
        (Some(id), None) => ("id", id.to_string()),
        (None, Some(a)) => ("address", a.to_string()),
        _ => return Err(ApiError::BadRequest("Must specify either ?id with the server's ID or ?address with IP:port of peer to remove".into())),
    };
    let target = ctx
        .raft()?
        .members()
        .into_iter()
        .find(|(_, n, _)| if by == "id" { n.id == want } else { n.rpc_addr == want })
        .ok_or_else(|| ApiError::BadRequest(format!("{by} {want:?} was not found in the Raft configuration")))?;
    if target.0 == ctx.raft()?.id && ctx.raft()?.members().len() == 1 {
        return Err(ApiError::BadRequest("cannot remove the only server".into()));
    }
    ctx.raft()?
        .raft
        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([target.0])), false)
        .await
        .map_err(|e| ApiError::Internal(format!("removing peer: {e}")))?;
    Ok(().into_response())
}

async fn transfer_leader(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let leader = ctx.raft()?.leader().ok_or(ApiError::NoLeader)?;
    let members = ctx.raft()?.members();
    let target = match p.get("id").filter(|s| !s.is_empty()) {
        Some(id) => members.iter().find(|(_, n, v)| *v && n.id == id).ok_or_else(|| ApiError::BadRequest(format!("id {id:?} is not a voter")))?,
        None => members
            .iter()
            .find(|(id, _, v)| *v && *id != leader.0)
            .ok_or_else(|| ApiError::BadRequest("no other voter to transfer leadership to".into()))?,
    };
    if target.0 == leader.0 {
        return Err(ApiError::BadRequest("that server is already the leader".into()));
    }
    let addr = target.1.socket_addr().ok_or_else(|| ApiError::Internal("target has no RPC address".into()))?;
    // openraft 0.9 has no transfer primitive: the leader stops heartbeating so that the
    // followers' leader lease lapses, and the target calls an election meanwhile.
    ctx.raft()?.raft.runtime_config().heartbeat(false);
    let res = ctx.raft()?.rpc.call_typed::<ClusterRpc, ClusterReply>(addr, Service::Cluster, &ClusterRpc::Elect, TRANSFER_TIMEOUT).await;
    ctx.raft()?.raft.runtime_config().heartbeat(true);
    match res {
        Ok(ClusterReply::Elected) => Ok(axum::Json(json!({ "Success": true })).into_response()),
        Ok(_) => Err(ApiError::Internal("unexpected reply to elect".into())),
        Err(e) => Err(ApiError::Internal(format!("leadership transfer failed: {e}"))),
    }
}

async fn autopilot_get(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let (cfg, meta) = blocking(&ctx, &p, &[Table::Autopilot], |d| Ok((d.autopilot.clone(), d.autopilot.modify_index))).await?;
    Ok(reply(&meta, &autopilot_json(&cfg)))
}

fn autopilot_json(c: &AutopilotConfig) -> serde_json::Value {
    json!({
        "CleanupDeadServers": c.cleanup_dead_servers, "LastContactThreshold": c.last_contact_threshold,
        "MaxTrailingLogs": c.max_trailing_logs, "MinQuorum": c.min_quorum,
        "ServerStabilizationTime": c.server_stabilization_time, "RedundancyZoneTag": "",
        "DisableUpgradeMigration": false, "UpgradeVersionTag": "",
        "CreateIndex": c.create_index, "ModifyIndex": c.modify_index,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct AutopilotBody {
    cleanup_dead_servers: Option<bool>,
    last_contact_threshold: Option<String>,
    max_trailing_logs: Option<u64>,
    min_quorum: Option<u64>,
    server_stabilization_time: Option<String>,
}

async fn autopilot_put(State(ctx): State<Ctx>, p: Params, body: Bytes) -> Result<Response, ApiError> {
    let b: AutopilotBody = decode(&body)?;
    let mut c = ctx.raft()?.store.read().data().autopilot.clone();
    for (key, v) in [("LastContactThreshold", &b.last_contact_threshold), ("ServerStabilizationTime", &b.server_stabilization_time)] {
        if let Some(v) = v
            && crate::duration::parse(v).is_none()
        {
            return Err(ApiError::BadRequest(format!("Request decode failed: {key}: invalid duration {v:?}")));
        }
    }
    c.cleanup_dead_servers = b.cleanup_dead_servers.unwrap_or(c.cleanup_dead_servers);
    c.last_contact_threshold = b.last_contact_threshold.unwrap_or(c.last_contact_threshold);
    c.max_trailing_logs = b.max_trailing_logs.unwrap_or(c.max_trailing_logs);
    c.min_quorum = b.min_quorum.unwrap_or(c.min_quorum);
    c.server_stabilization_time = b.server_stabilization_time.unwrap_or(c.server_stabilization_time);
    let (outcome, index) = ctx.raft()?.write(Command::AutopilotSetConfig { config: c, cas: p.u64("cas")? }).await?;
    Ok(write_reply(&ctx, index, outcome == Outcome::Applied(true)))
}

/// Service and node counts of this datacenter, in Consul's shape: the counts under the
/// datacenter's name, then the query metadata in the body itself.
async fn usage(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let dc = ctx.info.datacenter.clone();
    let (counts, meta) = blocking(&ctx, &p, &[Table::Services, Table::Nodes], |d| {
        let names: BTreeSet<&str> = d.services.values().map(|s| s.service.as_str()).collect();
        let kind_count = |k: &str| d.services.values().filter(|s| s.kind == k).count();
        let billable = d.services.values().filter(|s| s.kind.is_empty() && s.service != "consul").count();
        let v = json!({
            "Services": names.len(),
            "ServiceInstances": d.services.len(),
            "ConnectServiceInstances": {
                "api-gateway": kind_count("api-gateway"), "connect-native": 0, "connect-proxy": kind_count("connect-proxy"),
                "ingress-gateway": kind_count("ingress-gateway"), "mesh-gateway": kind_count("mesh-gateway"),
                "terminating-gateway": kind_count("terminating-gateway"),
            },
            "BillableServiceInstances": billable,
            "Nodes": d.nodes.len(),
        });
        Ok((v, d.index_of(&[Table::Services, Table::Nodes])))
    })
    .await?;
    let body = json!({
        "Usage": { dc: counts },
        "Index": meta.index, "LastContact": meta.last_contact_ms, "KnownLeader": meta.known_leader,
        "ConsistencyLevel": meta.consistency, "NotModified": false, "Backend": 0, "ResultsFilteredByACLs": false,
    });
    Ok(reply(&meta, &body))
}

async fn autopilot_health(State(ctx): State<Ctx>) -> Response {
    let h = ctx.autopilot.lock().clone();
    let status = if h.healthy { axum::http::StatusCode::OK } else { axum::http::StatusCode::TOO_MANY_REQUESTS };
    (status, axum::Json(h)).into_response()
}
