//! `/v1/agent/*`: this agent's own view (self, members, metrics), answered locally.

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::query::Params;
use super::{Ctx, metrics, version};
use crate::consensus::ServerNode;
use crate::state::CheckStatus;

/// Serf's member status codes, which Consul's API reports as numbers.
const MEMBER_ALIVE: u8 = 1;
const MEMBER_FAILED: u8 = 4;
/// LAN gossip port members advertise (Consul's default).
const SERF_LAN_PORT: u16 = 8301;

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/members", get(members))
        .route("/v1/agent/metrics", get(metrics_handler))
}

/// A server's liveness as the leader last recorded it in the catalog (`serfHealth`).
fn member_status(ctx: &Ctx, name: &str) -> u8 {
    if name == ctx.info.node_name {
        return MEMBER_ALIVE;
    }
    let store = ctx.node.store.read().expect("state lock");
    match store
        .data()
        .checks
        .get(&(name.to_string(), "serfHealth".to_string()))
    {
        Some(c) if c.status == CheckStatus::Critical => MEMBER_FAILED,
        _ => MEMBER_ALIVE,
    }
}

fn member_json(ctx: &Ctx, n: &ServerNode) -> Value {
    let (addr, port) = n
        .socket_addr()
        .map(|a| (a.ip().to_string(), a.port()))
        .unwrap_or_default();
    json!({
        "Name": n.name, "Addr": addr, "Port": SERF_LAN_PORT,
        "Tags": {
            "role": "consul", "dc": ctx.info.datacenter, "port": port.to_string(), "id": n.id,
            "build": version(), "vsn": "2", "vsn_min": "2", "vsn_max": "3", "raft_vsn": "3",
            "expect": ctx.info.bootstrap_expect.to_string(),
        },
        "Status": member_status(ctx, &n.name),
        "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2, "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
    })
}

async fn agent_self(State(ctx): State<Ctx>) -> Response {
    let m = ctx.node.raft.metrics().borrow().clone();
    let leader = ctx.node.leader();
    let info = &ctx.info;
    let body = json!({
        "Config": {
            "Datacenter": info.datacenter, "PrimaryDatacenter": info.primary_datacenter,
            "NodeName": info.node_name, "NodeID": info.node_id, "Server": info.server,
            "Revision": "", "Version": version(), "BuildDate": "",
        },
        "DebugConfig": {
            "Datacenter": info.datacenter, "PrimaryDatacenter": info.primary_datacenter, "NodeName": info.node_name,
            "DataDir": info.data_dir, "ServerMode": info.server, "BootstrapExpect": info.bootstrap_expect,
            "DNSDomain": format!("{}.", info.domain), "LogLevel": info.log_level.to_uppercase(),
            "HTTPAddrs": [format!("tcp://{}", info.http_addr)], "RPCBindAddr": format!("tcp://{}", info.bind_addr),
            "DNSPort": info.dns_port.map(i64::from).unwrap_or(-1),
        },
        "Coord": null,
        "Member": member_json(&ctx, &ctx.node.me),
        "Stats": {
            "agent": { "checks": "0", "services": "0" },
            "consul": {
                "server": info.server.to_string(),
                "leader": (leader.as_ref().map(|l| l.0) == Some(ctx.node.id)).to_string(),
                "leader_addr": leader.as_ref().map(|l| l.1.rpc_addr.clone()).unwrap_or_default(),
                "bootstrap": (info.bootstrap_expect == 1).to_string(),
                "known_datacenters": "1",
            },
            "raft": {
                "state": format!("{:?}", m.state),
                "term": m.current_term.to_string(),
                "last_log_index": m.last_log_index.unwrap_or(0).to_string(),
                "applied_index": m.last_applied.map(|l| l.index).unwrap_or(0).to_string(),
                "last_snapshot_index": m.snapshot.map(|l| l.index).unwrap_or(0).to_string(),
                "num_peers": m.membership_config.membership().voter_ids().filter(|id| *id != ctx.node.id).count().to_string(),
            },
            "build": { "version": version(), "prerelease": "", "revision": "" },
        },
        "Meta": {},
    });
    axum::Json(body).into_response()
}

async fn members(State(ctx): State<Ctx>, p: Params) -> Response {
    if p.flag("wan") {
        // Federation arrives with WAN gossip; until then the WAN pool is this datacenter's
        // servers, named `node.dc` as Consul shows them.
        let list: Vec<Value> = ctx
            .node
            .members()
            .iter()
            .map(|(_, n, _)| {
                let mut m = member_json(&ctx, n);
                m["Name"] = json!(format!("{}.{}", n.name, ctx.info.datacenter));
                m
            })
            .collect();
        return axum::Json(list).into_response();
    }
    let list: Vec<Value> = ctx
        .node
        .members()
        .iter()
        .map(|(_, n, _)| member_json(&ctx, n))
        .collect();
    axum::Json(list).into_response()
}

async fn metrics_handler(State(ctx): State<Ctx>, p: Params) -> Response {
    if p.get("format") == Some("prometheus") {
        return (
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            metrics::render_prometheus(&ctx),
        )
            .into_response();
    }
    axum::Json(metrics::render_json(&ctx)).into_response()
}
