//! Forwarding to the leader: requests that need the leader are relayed over internal RPC when
//! this server is not it. Forwarded requests carry a marker header and are never forwarded
//! again, so a leadership change mid-flight costs an error, never a loop.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

use super::query::{MAX_WAIT, Params};
use super::{ApiError, Ctx, MAX_BODY_BYTES};
use crate::rpc::{self, ErrorCode, Handler, Peer, Role, RpcError, Service};

pub const FORWARDED_HEADER: &str = "x-trellis-forwarded";
/// Time a forwarded request may take on top of its own blocking wait.
const FORWARD_SLACK: Duration = Duration::from_secs(30);
/// How long a server holds a request that needs the leader while none can be reached.
const LEADER_HOLD: Duration = Duration::from_secs(7);
/// How soon an unreachable leader is tried again while holding.
const LEADER_RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardedRequest {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, Vec<u8>)>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardedResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Paths answered by whichever agent receives them. Servers also answer `/v1/status/*` from
/// their own Raft view and list the datacenters from their WAN pool; client agents forward
/// those. Every agent lists and changes the gossip keyring itself (a change reaches the other
/// datacenters through a server, `ClusterRpc::Keyring`).
fn is_local(path: &str, server: bool) -> bool {
    !path.starts_with("/v1/")
        || path.starts_with("/v1/agent/")
        || path.starts_with("/v1/event/")
        || path == "/v1/operator/keyring"
        || (server && path.starts_with("/v1/status/"))
        || (server && path == "/v1/catalog/datacenters")
}

/// The datacenter's data that client agents and other datacenters relay requests for (config
/// entries and intentions included: a secondary passes their writes to the primary).
const SHARED_DATA: &[&str] = &[
    "/v1/catalog/",
    "/v1/health/",
    "/v1/kv/",
    "/v1/session/",
    "/v1/txn",
    "/v1/query",
    "/v1/event/",
    "/v1/coordinate/",
    "/v1/status/",
    "/v1/internal/ui/",
    "/v1/config",
    "/v1/connect/intentions",
    "/v1/connect/ca/roots",
    "/v1/discovery-chain/",
    "/v1/internal/federation-state",
];

/// Operator state a client agent may read on its users' behalf (never change).
const OPERATOR_READS: &[&str] = &["/v1/operator/raft/configuration", "/v1/operator/autopilot/", "/v1/connect/ca/configuration"];

/// Whether a peer in `role` may have this server run an HTTP request for it
/// (`Service::Http`):
/// - a server of this datacenter forwards whatever needs the leader: anything but the
///   agent's own endpoints;
/// - a client agent relays its users' reads and writes of the datacenter's data, and reads of
///   operator state;
/// - another datacenter's server relays `?dc=` requests for the datacenter's data.
///
/// Nobody relays `/v1/agent/*` (another agent's leave, reload, checks), snapshots, keyring
/// changes or operator writes.
pub fn relay_allowed(role: &Role, method: &str, path: &str) -> bool {
    if path.starts_with("/v1/agent/") || !path.starts_with("/v1/") {
        return false;
    }
    let under = |prefixes: &[&str]| prefixes.iter().any(|p| path.starts_with(p) || path == p.trim_end_matches('/'));
    let read = method == "GET" || method == "HEAD";
    match role {
        Role::Server => true,
        Role::Client => under(SHARED_DATA) || (read && under(OPERATOR_READS)),
        Role::RemoteServer(_) => under(SHARED_DATA),
        Role::Anonymous | Role::Other => false,
    }
}

/// The refusal for a request `role` may not relay.
fn relay_refused(role: &Role, method: &str, path: &str) -> String {
    format!("{method} {path} is not relayed for {role}: call a server's HTTP API in that datacenter directly")
}

/// The datacenter `?dc=` names when it is another one, on a path that honours it (the agent's
/// own endpoints and the UI ignore it; the UI reads it in the browser).
fn remote_dc<'p>(ctx: &Ctx, path: &str, params: &'p Params) -> Option<&'p str> {
    params
        .get("dc")
        .filter(|dc| !dc.is_empty() && !dc.eq_ignore_ascii_case(&ctx.info.datacenter) && path.starts_with("/v1/") && !path.starts_with("/v1/agent/"))
}

/// Whether a server answers `req` from its own state: its own endpoints, `?stale` reads, a
/// request another server forwarded to it, or any request while it leads.
fn server_answers(node: &crate::cluster::RaftNode, req: &Request, path: &str, params: &Params) -> bool {
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    is_local(path, true) || (read && params.flag("stale")) || req.headers().contains_key(FORWARDED_HEADER) || node.is_leader()
}

/// Whether this agent answers `req` itself, neither relaying it to another datacenter or a
/// server nor forwarding it to the leader. Decided up front, keeping nothing: a request
/// answered here (a parked blocking query among them) then carries no state of this layer
/// while it waits.
fn answered_here(ctx: &Ctx, req: &Request) -> bool {
    let path = req.uri().path();
    let params = Params::parse(req.uri().query());
    if remote_dc(ctx, path, &params).is_some() {
        return false;
    }
    match &ctx.node {
        // A client agent answers only its own endpoints.
        None => is_local(path, false),
        Some(node) => server_answers(node, req, path, &params),
    }
}

/// Send `req` where it must be answered: here, to another datacenter (`?dc=`), from a client
/// agent to a server (or its shared watch), or from a follower to the leader.
pub async fn forward_to_leader(ctx: &Ctx, req: Request, next: Next) -> Response {
    if answered_here(ctx, &req) {
        return next.run(req).await;
    }
    // Boxed: the relaying paths' state is large, and the path above should not carry it.
    Box::pin(relay(ctx.clone(), req, next)).await
}

async fn relay(ctx: Ctx, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let params = Params::parse(req.uri().query());
    // `?dc=` naming another datacenter: a server sends the request to a server there, which
    // answers it as its own (forwarding to its leader as needed); a client agent relays it to
    // one of its servers.
    if let Some(dc) = remote_dc(&ctx, &path, &params).map(str::to_string) {
        let result = match &ctx.federation {
            Some(router) => relay_to_dc(router, &dc, req, &params).await,
            None => relay_any(&ctx, req, &params).await,
        };
        return result.unwrap_or_else(IntoResponse::into_response);
    }
    let Some(node) = &ctx.node else {
        // A client agent: everything but its own endpoints (answered before this) goes to a
        // server, which forwards to the leader when the request needs it.
        if !relay_allowed(&Role::Client, req.method().as_str(), &path) {
            return ApiError::Forbidden(relay_refused(&Role::Client, req.method().as_str(), &path)).into_response();
        }
        // Blocking and `?cached` reads share one upstream watch per distinct query.
        if super::agent_cache::applies(req.method(), &path, &params) {
            return super::agent_cache::read(&ctx, &path, &params).await.unwrap_or_else(IntoResponse::into_response);
        }
        return match relay_any(&ctx, req, &params).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    };
    // Leadership may have come to this server since `answered_here` looked.
    if server_answers(node, &req, &path, &params) {
        return next.run(req).await;
    }
    let fwd = match forwarded(req).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    // While there is no reachable leader (an election in progress, the leader just died), hold
    // the request for up to LEADER_HOLD and send it to the new leader, as Consul's
    // rpc_hold_timeout does, instead of failing at once.
    let deadline = Instant::now() + LEADER_HOLD;
    let mut metrics = node.raft.metrics();
    let mut last_try: Option<(std::net::SocketAddr, Instant)> = None;
    loop {
        if node.is_leader() {
            return match to_request(&fwd) {
                Ok(req) => next.run(req).await,
                Err(e) => e.into_response(),
            };
        }
        if let Some(leader) = node.leader_addr()
            && last_try.is_none_or(|(addr, at)| addr != leader || at.elapsed() >= LEADER_RETRY)
        {
            match send(&ctx, leader, &fwd, &params).await {
                Err(ApiError::Unreachable(_)) => last_try = Some((leader, Instant::now())),
                other => return other.unwrap_or_else(IntoResponse::into_response),
            }
        }
        if Instant::now() >= deadline {
            return ApiError::NoLeader.into_response();
        }
        let wake = deadline.min(Instant::now() + LEADER_RETRY);
        if let Ok(Err(_)) = tokio::time::timeout_at(wake.into(), metrics.changed()).await {
            // Raft is shutting down: no leader is coming.
            return ApiError::NoLeader.into_response();
        }
    }
}

/// An HTTP request rebuilt from its forwarded form.
fn to_request(fwd: &ForwardedRequest) -> Result<Request, ApiError> {
    let mut builder = axum::http::Request::builder().method(fwd.method.as_str()).uri(fwd.uri.as_str());
    for (k, v) in &fwd.headers {
        builder = builder.header(k.as_str(), v.as_slice());
    }
    builder.body(Body::from(fwd.body.clone())).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Relay to the first server that answers, starting at a random one.
async fn relay_any(ctx: &Ctx, req: Request, params: &Params) -> Result<Response, ApiError> {
    let mut servers = ctx.agent.servers();
    if servers.is_empty() {
        return Err(ApiError::Internal("No known Consul servers".into()));
    }
    use rand::RngExt;
    let start = rand::rng().random_range(0..servers.len());
    servers.rotate_left(start);
    let fwd = forwarded(req).await?;
    let mut last = ApiError::Internal("No known Consul servers".into());
    for s in servers {
        match send(ctx, s, &fwd, params).await {
            Err(e @ ApiError::Unreachable(_)) => last = e,
            other => return other,
        }
    }
    Err(last)
}

/// Send a request to a server of another datacenter (the federation router picks one and
/// moves on while servers are unreachable).
async fn relay_to_dc(router: &crate::federation::Router, dc: &str, req: Request, params: &Params) -> Result<Response, ApiError> {
    let fwd = forwarded(req).await?;
    match call_dc(router, dc, &fwd, relay_timeout(params)).await {
        Ok(r) => response(r),
        Err(e) if e.code == ErrorCode::Unreachable => {
            tracing::debug!(%dc, error = %e, "no path to datacenter");
            Err(ApiError::NoPathToDatacenter)
        }
        Err(e) if e.code == ErrorCode::Forbidden => Err(ApiError::Forbidden(e.message)),
        Err(e) => Err(ApiError::Internal(format!("rpc error forwarding to datacenter {dc}: {e}"))),
    }
}

/// Have a server of `dc` answer an HTTP request as its own.
pub async fn call_dc(router: &crate::federation::Router, dc: &str, fwd: &ForwardedRequest, timeout: Duration) -> Result<ForwardedResponse, RpcError> {
    let bytes = router.call(dc, Service::Http, rpc::encode(fwd)?, timeout).await?;
    rpc::decode(&bytes)
}

async fn forwarded(req: Request) -> Result<ForwardedRequest, ApiError> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|e| ApiError::TooLarge(format!("Request body too large: {e}")))?;
    Ok(ForwardedRequest {
        method: parts.method.to_string(),
        uri: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        headers: parts.headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
        body: body.to_vec(),
    })
}

/// Send a write that the primary datacenter owns (config entries, intentions) to a server
/// there, and relay its answer.
pub async fn to_primary(ctx: &Ctx, method: &str, path: &str, p: &Params, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let Some(router) = &ctx.federation else {
        return Err(ApiError::Internal("only servers pass writes on to the primary datacenter".into()));
    };
    let primary = ctx.info.primary_datacenter.clone();
    let query: Vec<String> =
        p.0.iter()
            .filter(|(k, _)| k != "dc")
            .map(|(k, v)| if v.is_empty() { k.clone() } else { format!("{k}={}", super::agent_cache::pct(v)) })
            .collect();
    let uri = if query.is_empty() { path.to_string() } else { format!("{path}?{}", query.join("&")) };
    let fwd = ForwardedRequest { method: method.into(), uri, headers: Vec::new(), body: body.to_vec() };
    match call_dc(router, &primary, &fwd, FORWARD_SLACK).await {
        Ok(r) => response(r),
        Err(e) if e.code == ErrorCode::Unreachable => Err(ApiError::NoPathToDatacenter),
        Err(e) if e.code == ErrorCode::Forbidden => Err(ApiError::Forbidden(e.message)),
        Err(e) => Err(ApiError::Internal(format!("rpc error forwarding to the primary datacenter {primary}: {e}"))),
    }
}

/// How long a relayed request may take: its own blocking wait plus slack.
fn relay_timeout(params: &Params) -> Duration {
    let wait = params.get("wait").and_then(crate::duration::parse).unwrap_or(super::query::DEFAULT_WAIT).min(MAX_WAIT);
    if params.has("index") { wait + wait / 16 + FORWARD_SLACK } else { FORWARD_SLACK }
}

async fn send(ctx: &Ctx, to: std::net::SocketAddr, fwd: &ForwardedRequest, params: &Params) -> Result<Response, ApiError> {
    let resp: ForwardedResponse = match ctx.rpc.call_typed(to, Service::Http, fwd, relay_timeout(params)).await {
        Ok(r) => r,
        Err(e) if e.code == ErrorCode::Unreachable => return Err(ApiError::Unreachable(e.message)),
        Err(e) if e.code == ErrorCode::Forbidden => return Err(ApiError::Forbidden(e.message)),
        Err(e) => return Err(ApiError::Internal(format!("rpc error forwarding to {to}: {e}"))),
    };
    response(resp)
}

fn response(resp: ForwardedResponse) -> Result<Response, ApiError> {
    let mut out = Response::builder().status(StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    for (k, v) in resp.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::from_bytes(&v)) {
            out = out.header(k, v);
        }
    }
    out.body(Body::from(resp.body)).map_err(|e| ApiError::Internal(e.to_string()))
}

/// Serves forwarded requests (`Service::Http`) through the local router.
pub struct HttpHandler {
    pub router: axum::Router,
}

impl Handler for HttpHandler {
    fn handle(&self, peer: Peer, body: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
        let router = self.router.clone();
        async move {
            let fwd: ForwardedRequest = rpc::decode(&body)?;
            let path = fwd.uri.split('?').next().unwrap_or_default();
            if !relay_allowed(&peer.role, &fwd.method, path) {
                return Err(RpcError::new(ErrorCode::Forbidden, relay_refused(&peer.role, &fwd.method, path)));
            }
            let mut req = to_request(&fwd).map_err(|e| RpcError::new(ErrorCode::BadRequest, e.to_string()))?;
            if peer.is_server() {
                req.headers_mut().insert(FORWARDED_HEADER, HeaderValue::from_static("1"));
            }
            let resp = router.oneshot(req).await.map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))?;
            let (parts, body) = resp.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))?;
            rpc::encode(&ForwardedResponse {
                status: parts.status.as_u16(),
                headers: parts.headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
                body: body.to_vec(),
            })
        }
        .boxed()
    }
}
