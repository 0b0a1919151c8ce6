//! `/v1/agent/*`: this agent's own view, answered locally by servers and client agents alike.
//!
//! The endpoints are thin: they parse the request and call `AgentOps`, the narrow interface the
//! agent layer implements over its local services and checks, gossip and (on servers) Raft.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::query::Params;
use super::{ApiError, Ctx, metrics, version};

/// What the agent endpoints need from the agent. Bodies are passed as raw JSON: the agent
/// layer owns the service and check definitions.
pub trait AgentOps: Send + Sync + 'static {
    /// Gossip members as Consul's `/v1/agent/members` shows them.
    fn members(&self, wan: bool) -> Vec<Value>;
    /// This agent's own member entry.
    fn member_self(&self) -> Value;
    /// RPC addresses of the servers of this datacenter (a client forwards to them).
    fn servers(&self) -> Vec<std::net::SocketAddr>;
    /// Changes whenever the local services or checks do.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Local services keyed by ID, and local checks keyed by ID.
    fn services(&self) -> Value;
    fn checks(&self) -> Value;
    /// A local service with its aggregated status ("passing", "warning", "critical").
    fn service_health(&self, id: &str) -> Option<(String, Value)>;
    /// Every local instance of a service name with its aggregated status.
    fn service_health_by_name(&self, name: &str) -> Vec<(String, Value)>;
    /// `peer` is the address the request came from (`None` when unknown): script checks from
    /// another host run only with `enable_script_checks`.
    fn register_service(&self, body: Bytes, replace_existing_checks: bool, peer: Option<std::net::IpAddr>) -> BoxFuture<'_, Result<(), ApiError>>;
    fn deregister_service(&self, id: String) -> BoxFuture<'_, Result<(), ApiError>>;
    fn register_check(&self, body: Bytes, peer: Option<std::net::IpAddr>) -> BoxFuture<'_, Result<(), ApiError>>;
    fn deregister_check(&self, id: String) -> BoxFuture<'_, Result<(), ApiError>>;
    /// Set a TTL check's status ("passing", "warning", "critical") and output.
    fn update_ttl(&self, id: &str, status: &str, output: String) -> Result<(), ApiError>;
    fn service_maintenance(&self, id: &str, enable: bool, reason: String) -> Result<(), ApiError>;
    fn node_maintenance(&self, enable: bool, reason: String) -> Result<(), ApiError>;
    fn join(&self, addr: String, wan: bool) -> BoxFuture<'_, Result<(), ApiError>>;
    fn leave(&self) -> BoxFuture<'_, Result<(), ApiError>>;
    fn force_leave(&self, node: &str) -> Result<(), ApiError>;
    fn reload(&self) -> Result<(), ApiError>;
    /// Extra `Stats` sections for `/v1/agent/self` (raft, serf, ...).
    fn stats(&self) -> Value;
    /// Broadcast a user event; returns it as Consul's API shows it.
    fn fire_event(&self, name: String, payload: Vec<u8>, node: String, service: String, tag: String) -> Result<Value, ApiError>;
    /// Recent events this agent accepted, oldest first, with the index of the newest.
    fn events(&self) -> (Vec<Value>, u64);
    /// Changes whenever an event is accepted (its value is the new index).
    fn event_changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Gossip keys as Consul's `GET /v1/operator/keyring` lists them.
    fn keyring_list(&self) -> Result<Value, ApiError>;
    /// "install", "use" or "remove" a gossip key on every member.
    fn keyring_change(&self, op: KeyringOp, key: String) -> BoxFuture<'_, Result<(), ApiError>>;
    /// The leaf certificate of `service` (Consul's `IssuedCert` JSON) and its index; with
    /// `min_index`, the first one newer than it, or the current one at `deadline`.
    fn leaf(&self, service: String, min_index: Option<u64>, deadline: tokio::time::Instant) -> BoxFuture<'_, Result<(Value, u64), ApiError>>;
}

pub use crate::cluster::KeyringOp;

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/members", get(members))
        .route("/v1/agent/metrics", get(metrics_handler))
        .route("/v1/agent/services", get(services))
        .route("/v1/agent/service/{id}", get(service))
        .route("/v1/agent/checks", get(checks))
        .route("/v1/agent/service/register", put(register_service))
        .route("/v1/agent/service/deregister/{id}", put(deregister_service))
        .route("/v1/agent/check/register", put(register_check))
        .route("/v1/agent/check/deregister/{id}", put(deregister_check))
        .route("/v1/agent/check/pass/{id}", put(|c: State<Ctx>, p: Path<String>, q: Params| ttl(c, p, q, "passing")))
        .route("/v1/agent/check/warn/{id}", put(|c: State<Ctx>, p: Path<String>, q: Params| ttl(c, p, q, "warning")))
        .route("/v1/agent/check/fail/{id}", put(|c: State<Ctx>, p: Path<String>, q: Params| ttl(c, p, q, "critical")))
        .route("/v1/agent/check/update/{id}", put(ttl_update))
        .route("/v1/agent/service/maintenance/{id}", put(service_maintenance))
        .route("/v1/agent/maintenance", put(node_maintenance))
        .route("/v1/agent/health/service/id/{id}", get(health_by_id))
        .route("/v1/agent/health/service/name/{name}", get(health_by_name))
        .route("/v1/agent/join/{addr}", put(join))
        .route("/v1/agent/leave", put(leave))
        .route("/v1/agent/force-leave/{node}", put(force_leave))
        .route("/v1/agent/reload", put(reload))
        .route("/v1/agent/monitor", get(monitor))
        // Trellis has no ACL system yet: every token and ACL endpoint answers as Consul's
        // does with ACLs disabled.
        .route("/v1/agent/token/{kind}", put(|| async { ApiError::AclDisabled }))
        .route("/v1/acl/{*rest}", axum::routing::any(|| async { ApiError::AclDisabled }))
        .route(
            "/v1/operator/keyring",
            get(keyring_list)
                .post(|c: State<Ctx>, b: Bytes| keyring(c, b, KeyringOp::Install))
                .put(|c: State<Ctx>, b: Bytes| keyring(c, b, KeyringOp::Use))
                .delete(|c: State<Ctx>, b: Bytes| keyring(c, b, KeyringOp::Remove)),
        )
}

/// Stream this agent's log lines at `?loglevel` (default info) until the client goes away;
/// `?logjson` sends them as JSON objects, one per line.
async fn monitor(p: Params) -> Result<Response, ApiError> {
    let raw = p.get("loglevel").unwrap_or("info");
    let level = crate::logging::parse_level(raw).ok_or_else(|| ApiError::BadRequest(format!("Unknown log level: {raw}")))?;
    let json = p.flag("logjson");
    let feed = crate::logging::Monitor::attach(level);
    let stream = futures::stream::unfold(feed, move |mut feed| async move {
        let line = match feed.next().await? {
            Ok(line) => format!("{}\n", if json { &line.json } else { &line.text }),
            Err(n) => format!("[trellis] this monitor fell behind: {n} log lines were dropped\n"),
        };
        Some((Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(line)), feed))
    });
    Ok(Response::new(axum::body::Body::from_stream(stream)))
}

async fn agent_self(State(ctx): State<Ctx>) -> Response {
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
            "BindAddr": info.bind_addr.ip().to_string(),
            "ConnectEnabled": info.connect_enabled,
            "DefaultIntentionPolicy": match info.default_intention_policy { Some(true) => "allow", Some(false) => "deny", None => "" },
        },
        "Coord": null,
        "Member": ctx.agent.member_self(),
        "Stats": ctx.agent.stats(),
        "Meta": {},
        // Consul reports its Envoy xDS server here; Trellis has no Envoy (its sidecars are
        // built in), so there is no xDS port to offer.
        "xDS": { "SupportedProxies": { "envoy": [] }, "Port": -1, "Ports": { "Plaintext": -1, "TLS": -1 } },
    });
    axum::Json(body).into_response()
}

async fn members(State(ctx): State<Ctx>, p: Params) -> Response {
    axum::Json(ctx.agent.members(p.flag("wan"))).into_response()
}

async fn metrics_handler(State(ctx): State<Ctx>, p: Params) -> Response {
    if p.get("format") == Some("prometheus") {
        return ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], metrics::render_prometheus(&ctx)).into_response();
    }
    axum::Json(metrics::render_json(&ctx)).into_response()
}

/// Keep the entries of an ID-keyed map that `?filter=` selects.
fn filter_map(all: Value, p: &Params) -> Result<Response, ApiError> {
    let Some(expr) = p.filter() else { return Ok(axum::Json(all).into_response()) };
    let filter = super::filter::Filter::parse(expr)?;
    let mut kept = serde_json::Map::new();
    for (id, item) in all.as_object().cloned().unwrap_or_default() {
        if filter.matches(&item)? {
            kept.insert(id, item);
        }
    }
    Ok(axum::Json(Value::Object(kept)).into_response())
}

async fn services(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    filter_map(ctx.agent.services(), &p)
}

/// One local service. `?hash=<ContentHash>&wait=` blocks until its definition differs from
/// that hash (Consul's hash-based blocking), which is how proxies follow their registration.
async fn service(State(ctx): State<Ctx>, Path(id): Path<String>, p: Params) -> Result<Response, ApiError> {
    let mut changes = ctx.agent.changes();
    let wait = match p.get("wait") {
        None | Some("") => super::query::DEFAULT_WAIT,
        Some(w) => crate::duration::parse(w).ok_or_else(|| ApiError::BadRequest("Invalid wait time".into()))?.min(super::query::MAX_WAIT),
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let svc = ctx.agent.services().get(&id).cloned().ok_or_else(|| ApiError::NotFound(format!("unknown service ID: {id}")))?;
        let hash = svc["ContentHash"].as_str().unwrap_or_default().to_string();
        let wanted = p.get("hash").filter(|h| !h.is_empty());
        if wanted.is_none_or(|h| h != hash) || tokio::time::Instant::now() >= deadline {
            let mut resp = axum::Json(svc).into_response();
            if let Ok(v) = axum::http::HeaderValue::from_str(&hash) {
                resp.headers_mut().insert("x-consul-contenthash", v);
            }
            return Ok(resp);
        }
        if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
            continue;
        }
    }
}

async fn checks(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    filter_map(ctx.agent.checks(), &p)
}

/// The address of the HTTP client that sent a request (absent for requests that did not come
/// through this agent's own listener).
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip())))
    }
}

async fn register_service(State(ctx): State<Ctx>, ClientAddr(peer): ClientAddr, p: Params, body: Bytes) -> Result<Response, ApiError> {
    ctx.agent.register_service(body, p.flag("replace-existing-checks"), peer).await?;
    Ok(().into_response())
}

async fn deregister_service(State(ctx): State<Ctx>, Path(id): Path<String>) -> Result<Response, ApiError> {
    ctx.agent.deregister_service(id).await?;
    Ok(().into_response())
}

async fn register_check(State(ctx): State<Ctx>, ClientAddr(peer): ClientAddr, body: Bytes) -> Result<Response, ApiError> {
    ctx.agent.register_check(body, peer).await?;
    Ok(().into_response())
}

async fn deregister_check(State(ctx): State<Ctx>, Path(id): Path<String>) -> Result<Response, ApiError> {
    ctx.agent.deregister_check(id).await?;
    Ok(().into_response())
}

async fn ttl(State(ctx): State<Ctx>, Path(id): Path<String>, p: Params, status: &str) -> Result<Response, ApiError> {
    ctx.agent.update_ttl(&id, status, p.get("note").unwrap_or("").to_string())?;
    Ok(().into_response())
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct TtlUpdate {
    status: String,
    output: String,
}

async fn ttl_update(State(ctx): State<Ctx>, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let u: TtlUpdate = super::error::decode(&body)?;
    let status = match u.status.as_str() {
        "passing" | "warning" | "critical" => u.status.as_str(),
        other => return Err(ApiError::BadRequest(format!("Invalid check status: {other:?}"))),
    };
    ctx.agent.update_ttl(&id, status, u.output)?;
    Ok(().into_response())
}

fn enable_flag(p: &Params) -> Result<bool, ApiError> {
    match p.get("enable") {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(ApiError::BadRequest(format!("Invalid value for \"enable\": {other:?}"))),
        None => Err(ApiError::BadRequest("Missing value for enable".into())),
    }
}

async fn service_maintenance(State(ctx): State<Ctx>, Path(id): Path<String>, p: Params) -> Result<Response, ApiError> {
    ctx.agent.service_maintenance(&id, enable_flag(&p)?, p.get("reason").unwrap_or("").to_string())?;
    Ok(().into_response())
}

async fn node_maintenance(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    ctx.agent.node_maintenance(enable_flag(&p)?, p.get("reason").unwrap_or("").to_string())?;
    Ok(().into_response())
}

/// Consul's agent health endpoints: 200 passing, 429 warning, 503 critical, with the status
/// as plain text or the service(s) as JSON (`?format=text`).
fn health_reply(status: &str, body: Value, text: bool) -> Response {
    let code = match status {
        "passing" => StatusCode::OK,
        "warning" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    if text {
        return (code, status.to_string()).into_response();
    }
    (code, axum::Json(body)).into_response()
}

async fn health_by_id(State(ctx): State<Ctx>, Path(id): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (status, svc) = ctx.agent.service_health(&id).ok_or_else(|| ApiError::NotFound(format!("ServiceId {id} not found")))?;
    Ok(health_reply(&status, json!({ "AggregatedStatus": status, "Service": svc, "Checks": [] }), p.get("format") == Some("text")))
}

async fn health_by_name(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params) -> Result<Response, ApiError> {
    let all = ctx.agent.service_health_by_name(&name);
    if all.is_empty() {
        return Err(ApiError::NotFound(format!("ServiceName {name} Not Found")));
    }
    let worst = ["critical", "warning", "passing"].into_iter().find(|s| all.iter().any(|(st, _)| st == s)).unwrap_or("passing");
    let body: Vec<Value> = all.into_iter().map(|(st, svc)| json!({ "AggregatedStatus": st, "Service": svc, "Checks": [] })).collect();
    Ok(health_reply(worst, Value::Array(body), p.get("format") == Some("text")))
}

async fn join(State(ctx): State<Ctx>, Path(addr): Path<String>, p: Params) -> Result<Response, ApiError> {
    ctx.agent.join(addr, p.flag("wan")).await?;
    Ok(().into_response())
}

async fn leave(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    ctx.agent.leave().await?;
    Ok(().into_response())
}

async fn force_leave(State(ctx): State<Ctx>, Path(node): Path<String>) -> Result<Response, ApiError> {
    ctx.agent.force_leave(&node)?;
    Ok(().into_response())
}

async fn reload(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    ctx.agent.reload()?;
    Ok(().into_response())
}

async fn keyring_list(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    Ok(axum::Json(ctx.agent.keyring_list()?).into_response())
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct KeyBody {
    key: String,
}

/// A keyring change applies to every member of this datacenter (a gossip broadcast) and to
/// every other datacenter too: their servers share the WAN pool's key, so a server of each is
/// asked to make the same change in its own datacenter.
async fn keyring(State(ctx): State<Ctx>, body: Bytes, op: KeyringOp) -> Result<Response, ApiError> {
    let b: KeyBody = super::error::decode(&body)?;
    if b.key.is_empty() {
        return Err(ApiError::BadRequest("Missing Key".into()));
    }
    ctx.agent.keyring_change(op, b.key).await?;
    Ok(().into_response())
}
