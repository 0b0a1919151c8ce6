//! The HTTP API: Consul-compatible `/v1` handlers, blocking queries, request forwarding to the
//! leader, and the embedded UI.
//!
//! Reads come from the local `state::Store`; writes go through `consensus::RaftNode`. A server
//! that is not the leader forwards requests that need the leader (writes, default and
//! `?consistent` reads) over internal RPC and relays the answer; `?stale` reads and the agent's
//! own endpoints are always answered locally. Handlers live in one module per endpoint family.

pub mod agent;
pub mod agent_cache;
pub mod catalog;
pub mod config;
pub mod connect;
pub mod coordinate;
pub mod discovery_chain;
pub mod error;
pub mod event;
pub mod federation_state;
pub mod filter;
pub mod forward;
pub mod health;
pub mod kv;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod operator;
pub mod prepared_query;
pub mod query;
pub mod session;
pub mod snapshot;
pub mod status;
pub mod txn;
pub mod ui;

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;

use crate::cluster::RaftNode;
pub use error::ApiError;

/// The largest request body accepted at all (a snapshot); `limits` sets each endpoint's own.
pub const MAX_BODY_BYTES: usize = limits::SNAPSHOT_BODY_LIMIT;

/// Facts about this agent that `/v1/agent/self` and friends report.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub node_name: String,
    pub node_id: String,
    pub datacenter: String,
    pub primary_datacenter: String,
    pub domain: String,
    pub server: bool,
    pub bootstrap_expect: usize,
    pub bind_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub dns_port: Option<u16>,
    pub log_level: String,
    pub data_dir: String,
    /// `connect.enabled`.
    pub connect_enabled: bool,
    /// `connect.default_intention_policy`: `Some(allow)` when configured.
    pub default_intention_policy: Option<bool>,
}

pub struct ApiContext {
    pub info: AgentInfo,
    /// The Raft handle on servers; `None` on client agents, which forward to servers.
    pub node: Option<RaftNode>,
    /// RPC to other agents (forwarding).
    pub rpc: crate::rpc::RpcClient,
    /// Routes to other datacenters (servers only; client agents relay `?dc=` to a server).
    pub federation: Option<crate::federation::Router>,
    pub agent: Arc<dyn agent::AgentOps>,
    pub sessions: crate::cluster::sessions::SessionTimers,
    pub autopilot: Arc<Mutex<operator::AutopilotHealth>>,
    pub metrics: metrics::Registry,
    /// Body and connection limits.
    pub limits: crate::config::Limits,
    /// One permit per blocking query parked at a time (`limits.http_max_blocking_queries`).
    pub blocking_slots: Arc<tokio::sync::Semaphore>,
    /// Shared answers of the hottest reads (`query::shared_read`).
    pub results: query::ResultCache,
    /// Client agents: one upstream watch per distinct blocking read (`agent_cache`).
    pub agent_cache: Option<agent_cache::AgentCache>,
    pub started: Instant,
}

pub type Ctx = Arc<ApiContext>;

impl ApiContext {
    /// The Raft handle; only servers have one, and only server-side handlers ask for it (a
    /// client agent forwards those requests before they get here).
    pub fn raft(&self) -> Result<&RaftNode, ApiError> {
        self.node.as_ref().ok_or_else(|| ApiError::Internal("this endpoint is answered by servers".into()))
    }
}

pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

pub fn router(ctx: Ctx) -> Router {
    Router::new()
        .merge(status::routes())
        .merge(catalog::routes())
        .merge(config::routes())
        .merge(discovery_chain::routes())
        .merge(federation_state::routes())
        .merge(connect::routes())
        .merge(health::routes())
        .merge(kv::routes())
        .merge(session::routes())
        .merge(prepared_query::routes())
        .merge(coordinate::routes())
        .merge(txn::routes())
        .merge(agent::routes())
        .merge(event::routes())
        .merge(operator::routes())
        .merge(snapshot::routes())
        .merge(ui::routes())
        .fallback(|| async { ApiError::NotFound("404 page not found".into()) })
        .method_not_allowed_fallback(|m: axum::http::Method| async move { ApiError::MethodNotAllowed(m.to_string()) })
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), front))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ctx)
}

/// The one middleware in front of every handler: the body limit, the request metrics, and
/// relaying to the leader, a server or another datacenter. One layer rather than three: each
/// layer's future is an allocation of its own that a parked blocking query carries while it
/// waits, and a step more for every answer.
async fn front(
    axum::extract::State(ctx): axum::extract::State<Ctx>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let req = match limits::limit_body(&ctx, req) {
        Ok(req) => req,
        Err(refused) => return axum::response::IntoResponse::into_response(refused),
    };
    let method = metrics::method_slot(req.method());
    let start = Instant::now();
    let resp = forward::forward_to_leader(&ctx, req, next).await;
    ctx.metrics.record(method, resp.status().as_u16(), start.elapsed().as_secs_f64() * 1000.0);
    resp
}
