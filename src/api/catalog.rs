//! `/v1/catalog/*`: register and deregister, and the node and service listings.

use std::collections::BTreeMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, put};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::decode;
use super::prepared_query::near_node;
use super::query::{Meta, Params, blocking, blocking_on, filtered, reply};
use super::{ApiError, Ctx};
use crate::state::catalog::{ServiceInstance, ServiceQuery};
use crate::state::{CheckStatus, Command, HealthCheck, Node, Outcome, Registration, Service, ServiceAddress, StateData, Table, WatchKey, Weights};
use axum::http::HeaderMap;

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/catalog/register", put(register))
        .route("/v1/catalog/deregister", put(deregister))
        .route("/v1/catalog/datacenters", get(datacenters))
        .route("/v1/catalog/nodes", get(nodes))
        .route("/v1/catalog/services", get(services))
        .route("/v1/catalog/service/{service}", get(service))
        .route("/v1/catalog/node/{node}", get(node))
        .route("/v1/catalog/node-services/{node}", get(node_services))
        .route("/v1/catalog/gateway-services/{gateway}", get(gateway_services))
}

/// A service definition as Consul's API accepts it (catalog and agent registration).
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceBody {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub kind: String,
    pub tags: Option<Vec<String>>,
    pub address: String,
    pub tagged_addresses: Option<BTreeMap<String, ServiceAddressBody>>,
    pub meta: Option<BTreeMap<String, String>>,
    pub port: i64,
    pub weights: Option<WeightsBody>,
    pub enable_tag_override: bool,
    pub proxy: Option<crate::connect::registration::ProxyBody>,
    pub connect: Option<crate::connect::registration::ConnectBody>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceAddressBody {
    pub address: String,
    pub port: i64,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase", default)]
pub struct WeightsBody {
    pub passing: i64,
    pub warning: i64,
}

/// A health check as the catalog accepts it.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase", default)]
pub struct CheckBody {
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    pub notes: String,
    pub status: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub output: String,
    #[serde(rename = "Type")]
    pub check_type: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct RegisterBody {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    datacenter: String,
    tagged_addresses: Option<BTreeMap<String, String>>,
    node_meta: Option<BTreeMap<String, String>>,
    service: Option<ServiceBody>,
    check: Option<CheckBody>,
    checks: Option<Vec<CheckBody>>,
    skip_node_update: bool,
}

fn port(key: &str, p: i64) -> Result<u16, ApiError> {
    u16::try_from(p).map_err(|_| ApiError::BadRequest(format!("Invalid {key}: {p} is not a port number")))
}

impl ServiceBody {
    pub fn into_service(self) -> Result<Service, ApiError> {
        let tagged_addresses = self
            .tagged_addresses
            .unwrap_or_default()
            .into_iter()
            .map(|(k, a)| Ok((k.clone(), ServiceAddress { address: a.address.into(), port: port(&format!("TaggedAddresses.{k}.Port"), a.port)? })))
            .collect::<Result<_, ApiError>>()?;
        let weights = match self.weights {
            None => Weights::default(),
            Some(w) if w.passing < 1 => {
                return Err(ApiError::BadRequest("Passing must be greater than 0".into()));
            }
            Some(w) if w.warning < 0 => {
                return Err(ApiError::BadRequest("Warning must be greater or equal than 0".into()));
            }
            Some(w) => Weights { passing: w.passing, warning: w.warning },
        };
        Ok(Service {
            kind: self.kind.into(),
            id: self.id.into(),
            service: self.service.into(),
            tags: self.tags.unwrap_or_default().into_iter().map(Into::into).collect(),
            address: self.address.into(),
            tagged_addresses,
            meta: self.meta.unwrap_or_default(),
            port: port("Port", self.port)?,
            weights,
            enable_tag_override: self.enable_tag_override,
            proxy: self.proxy.map(|p| p.into_proxy().map(Box::new)).transpose()?,
            connect_native: self.connect.as_ref().is_some_and(|c| c.native),
            create_index: 0,
            modify_index: 0,
        })
    }
}

impl CheckBody {
    pub fn into_check(self) -> Result<HealthCheck, ApiError> {
        let status = match self.status.as_str() {
            "" => CheckStatus::Critical,
            s => CheckStatus::parse(s).ok_or_else(|| ApiError::BadRequest(format!("Invalid check status: {s:?}")))?,
        };
        Ok(HealthCheck {
            node: self.node.into(),
            check_id: self.check_id.into(),
            name: self.name.into(),
            status,
            notes: self.notes.into(),
            output: self.output.into(),
            service_id: self.service_id.into(),
            check_type: self.check_type.into(),
            ..Default::default()
        })
    }
}

/// Turn a state-machine refusal into the API's 400, and anything else into `Ok`.
pub fn accepted(outcome: Outcome) -> Result<Outcome, ApiError> {
    match outcome {
        Outcome::Rejected(m) => Err(ApiError::BadRequest(m)),
        o => Ok(o),
    }
}

async fn register(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ApiError> {
    let b: RegisterBody = decode(&body)?;
    if !b.datacenter.is_empty() && b.datacenter != ctx.info.datacenter {
        return Err(ApiError::NoPathToDatacenter);
    }
    let mut checks = Vec::new();
    for c in b.check.into_iter().chain(b.checks.unwrap_or_default()) {
        checks.push(c.into_check()?);
    }
    let reg = Registration {
        node: Node {
            id: b.id.into(),
            node: b.node.into(),
            address: b.address.into(),
            datacenter: ctx.info.datacenter.clone().into(),
            tagged_addresses: b.tagged_addresses.unwrap_or_default(),
            meta: b.node_meta.unwrap_or_default(),
            create_index: 0,
            modify_index: 0,
        },
        service: b.service.map(ServiceBody::into_service).transpose()?,
        checks,
        skip_node_update: b.skip_node_update,
    };
    let (outcome, index) = ctx.raft()?.write(Command::Register(reg)).await?;
    accepted(outcome)?;
    Ok(write_reply(&ctx, index, true))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct DeregisterBody {
    node: String,
    datacenter: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    #[serde(rename = "CheckID")]
    check_id: String,
}

async fn deregister(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ApiError> {
    let b: DeregisterBody = decode(&body)?;
    if b.node.is_empty() {
        return Err(ApiError::BadRequest("Must provide node".into()));
    }
    if !b.datacenter.is_empty() && b.datacenter != ctx.info.datacenter {
        return Err(ApiError::NoPathToDatacenter);
    }
    let some = |s: String| if s.is_empty() { None } else { Some(s) };
    let (outcome, index) =
        ctx.raft()?.write(Command::Deregister { node: b.node, service_id: some(b.service_id), check_id: some(b.check_id) }).await?;
    accepted(outcome)?;
    Ok(write_reply(&ctx, index, true))
}

/// The reply to a write: `true` (or `false`), with the index it landed at.
pub fn write_reply(ctx: &Ctx, index: u64, value: bool) -> Response {
    reply(&Meta::of(ctx, index, &Params::default()), &value)
}

/// Every known datacenter, this one first, then nearest first (measured round trips).
async fn datacenters(State(ctx): State<Ctx>) -> Response {
    let list = ctx.federation.as_ref().map(|f| f.datacenters()).unwrap_or_else(|| vec![ctx.info.datacenter.clone()]);
    axum::response::IntoResponse::into_response(axum::Json(list))
}

pub fn node_json(n: &Node, dc: &str) -> Value {
    json!({
        "ID": n.id, "Node": n.node, "Address": n.address, "Datacenter": dc,
        "TaggedAddresses": n.tagged_addresses, "Meta": n.meta,
        "CreateIndex": n.create_index, "ModifyIndex": n.modify_index,
    })
}

async fn nodes(State(ctx): State<Ctx>, p: Params, headers: HeaderMap) -> Result<Response, ApiError> {
    let meta_filter = p.node_meta()?;
    let dc = ctx.info.datacenter.clone();
    let (list, meta) = blocking(&ctx, &p, &[Table::Nodes], |d| {
        let (mut nodes, idx) = d.node_list(&meta_filter);
        if let Some(near) = p.get("near").and_then(|n| near_node(d, n, &ctx, &headers)) {
            d.sort_near(&mut nodes, |n| n.node.as_str(), &near);
        }
        Ok((nodes.iter().map(|n| node_json(n, &dc)).collect::<Vec<_>>(), idx))
    })
    .await?;
    Ok(reply(&meta, &filtered(&p, &list)?))
}

async fn services(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    let meta_filter = p.node_meta()?;
    if unknown_peer(&p) {
        let (_, meta) = blocking(&ctx, &p, &[Table::Services], |d| Ok(((), d.index_of(&[Table::Services])))).await?;
        return Ok(reply(&meta, &serde_json::Map::new()));
    }
    let Some(expr) = p.filter() else {
        let (map, meta) = blocking(&ctx, &p, &[Table::Services, Table::Nodes], |d| Ok(d.service_list(&meta_filter))).await?;
        return Ok(reply(&meta, &map));
    };
    // `?filter` selects service instances (the fields of /v1/catalog/service entries); the
    // answer lists the services, and the tags, of the instances it kept.
    let filter = super::filter::Filter::parse(expr)?;
    let dc = ctx.info.datacenter.clone();
    let (map, meta) = blocking(&ctx, &p, &[Table::Services, Table::Nodes], |d| {
        let mut out: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
        for i in d.all_instances(&meta_filter) {
            if filter.matches(&catalog_service_json(&i, &dc))? {
                out.entry(i.service.service.to_string()).or_default().extend(i.service.tags.iter().map(|t| t.to_string()));
            }
        }
        Ok((out, d.index_of(&[Table::Services, Table::Nodes])))
    })
    .await?;
    Ok(reply(&meta, &map))
}

/// The services a terminating or ingress gateway routes to. Trellis has neither kind (its mesh
/// gateways route by SNI, and `?filter` still applies), so the answer is always empty.
async fn gateway_services(State(ctx): State<Ctx>, Path(_gateway): Path<String>, p: Params) -> Result<Response, ApiError> {
    let (none, meta) = blocking(&ctx, &p, &[Table::Services], |d| Ok((Vec::<Value>::new(), d.index_of(&[Table::Services])))).await?;
    Ok(reply(&meta, &filtered(&p, &none)?))
}

/// `?peer=` names a cluster peer; Trellis has none (cluster peering is not implemented), so
/// every peer is unknown and, as in Consul, its services are an empty answer.
pub fn unknown_peer(p: &Params) -> bool {
    p.get("peer").is_some_and(|peer| !peer.is_empty())
}

pub fn service_query(p: &Params) -> Result<ServiceQuery, ApiError> {
    Ok(ServiceQuery { tags: p.all("tag").into_iter().map(String::from).collect(), node_meta: p.node_meta()?, passing_only: false, connect: false })
}

pub fn catalog_service_json(i: &ServiceInstance, dc: &str) -> Value {
    let (n, s) = (&i.node, &i.service);
    json!({
        "ID": n.id, "Node": n.node, "Address": n.address, "Datacenter": dc,
        "TaggedAddresses": n.tagged_addresses, "NodeMeta": n.meta,
        "ServiceKind": s.kind, "ServiceID": s.id, "ServiceName": s.service, "ServiceTags": s.tags,
        "ServiceAddress": s.address, "ServiceTaggedAddresses": s.tagged_addresses, "ServiceWeights": s.weights,
        "ServiceMeta": s.meta, "ServicePort": s.port, "ServiceEnableTagOverride": s.enable_tag_override,
        "ServiceProxy": proxy_or_empty(s), "ServiceConnect": connect_json(s), "ServiceSocketPath": "",
        "CreateIndex": s.create_index, "ModifyIndex": s.modify_index,
    })
}

async fn service(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params, headers: HeaderMap) -> Result<Response, ApiError> {
    let q = service_query(&p)?;
    service_view(&ctx, "catalog", name, q, p, headers, catalog_service_json).await
}

/// A service's instances as one endpoint shows them (`catalog` or `health`, each with its own
/// rendering of an instance). The answer is computed and encoded once per index and shared by
/// every reader and watcher of the same query; a blocking reader waits on the service's own
/// watch, so writes to other services never wake it. `?near` sorts per request (by the
/// caller's coordinates, with ties shuffled), so those answers are not shared.
pub async fn service_view(
    ctx: &Ctx,
    endpoint: &str,
    name: String,
    q: ServiceQuery,
    p: Params,
    headers: HeaderMap,
    render_one: fn(&ServiceInstance, &str) -> Value,
) -> Result<Response, ApiError> {
    let dc = ctx.info.datacenter.clone();
    let peer = unknown_peer(&p);
    let instances = |d: &StateData| match peer {
        true => Vec::new(),
        false => d.service_instances(&name, &q).0,
    };
    // The index and the watch of the view: the service's own, or its connect view.
    let view = if q.connect { crate::state::catalog::connect_view_key(&name) } else { name.clone() };
    let key = WatchKey::Service(view.clone());
    let near = p.get("near").filter(|n| !n.is_empty());
    let merge = p.flag("merge-central-config");
    if near.is_some() || merge {
        // Per-request answers: sorted by the caller's coordinates, or completed with config
        // entries (and so also woken by their changes).
        let mut keys = vec![key];
        if merge {
            keys.push(WatchKey::Table(Table::ConfigEntries));
        }
        let (list, meta) = blocking_on(ctx, &p, &keys, |d| {
            let mut inst = instances(d);
            if let Some(near) = near.and_then(|n| near_node(d, n, ctx, &headers)) {
                d.sort_near(&mut inst, |i| i.node.node.as_str(), &near);
            }
            let mut list: Vec<Value> = inst.iter().map(|i| render_one(i, &dc)).collect();
            let mut index = d.service_view_index(&view);
            if merge {
                index = index.max(d.index_of(&[Table::ConfigEntries]));
                for v in &mut list {
                    merge_central(&d.config_entries, v);
                }
            }
            Ok((list, index))
        })
        .await?;
        return Ok(reply(&meta, &filtered(&p, &list)?));
    }
    // Nothing below needs the request's headers: free them before a long wait.
    drop(headers);
    let cache_key = super::query::cache_key(&format!("{endpoint}/{name}"), &p);
    super::query::shared_read(
        ctx,
        &p,
        cache_key,
        key,
        |d| (d.service_view_index(&view), 0),
        |d| Ok(instances(d)),
        |inst| {
            let list: Vec<Value> = inst.iter().map(|i| render_one(i, &dc)).collect();
            let body = serde_json::to_vec(&filtered(&p, &list)?).map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(body.into())
        },
    )
    .await
}

/// `?merge-central-config` on one rendered instance (a health entry's `Service`, or a
/// catalog entry's `ServiceKind`/`ServiceProxy`).
fn merge_central(entries: &BTreeMap<(String, String), crate::state::mesh::ConfigEntry>, v: &mut Value) {
    use crate::connect::config_entry::merge_central_config;
    if v.get("Service").is_some_and(Value::is_object) {
        let kind = v["Service"]["Kind"].as_str().unwrap_or_default().to_string();
        merge_central_config(entries, &kind, &mut v["Service"]["Proxy"]);
    } else if v.get("ServiceProxy").is_some() {
        let kind = v["ServiceKind"].as_str().unwrap_or_default().to_string();
        merge_central_config(entries, &kind, &mut v["ServiceProxy"]);
    }
}

async fn node(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params) -> Result<Response, ApiError> {
    let dc = ctx.info.datacenter.clone();
    let (found, meta) = blocking(&ctx, &p, &[Table::Nodes, Table::Services], |d| {
        let (found, idx) = d.node_services(&name);
        Ok((
            found.map(|(n, svcs)| {
                let services: BTreeMap<String, Value> = svcs.iter().map(|s| (s.id.to_string(), service_json(s))).collect();
                json!({ "Node": node_json(&n, &dc), "Services": services })
            }),
            idx,
        ))
    })
    .await?;
    Ok(reply(&meta, &found))
}

/// A service as Consul's `NodeService` (health endpoints, node services): `Proxy` and
/// `Connect` always present, `Kind` and `TaggedAddresses` only when set.
pub fn service_json(s: &Service) -> Value {
    let mut v = json!({
        "ID": s.id, "Service": s.service, "Tags": s.tags, "Address": s.address, "Meta": s.meta, "Port": s.port,
        "Weights": s.weights, "EnableTagOverride": s.enable_tag_override,
        "Proxy": proxy_or_empty(s), "Connect": connect_json(s), "PeerName": "",
        "CreateIndex": s.create_index, "ModifyIndex": s.modify_index,
    });
    if !s.kind.is_empty() {
        v["Kind"] = json!(s.kind);
    }
    if !s.tagged_addresses.is_empty() {
        v["TaggedAddresses"] = json!(s.tagged_addresses);
    }
    v
}

fn proxy_or_empty(s: &Service) -> Value {
    match &s.proxy {
        Some(p) => crate::connect::registration::proxy_json(p),
        None => json!({ "Mode": "", "MeshGateway": {}, "Expose": {} }),
    }
}

fn connect_json(s: &Service) -> Value {
    if s.connect_native { json!({ "Native": true }) } else { json!({}) }
}

async fn node_services(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params) -> Result<Response, ApiError> {
    let dc = ctx.info.datacenter.clone();
    let (found, meta) = blocking(&ctx, &p, &[Table::Nodes, Table::Services], |d| {
        let (found, idx) = d.node_services(&name);
        Ok((found, idx))
    })
    .await?;
    let body = match found {
        Some((n, svcs)) => {
            json!({ "Node": node_json(&n, &dc), "Services": filtered(&p, &svcs.iter().map(|s| service_json(s)).collect::<Vec<_>>())? })
        }
        None => Value::Null,
    };
    Ok(reply(&meta, &body))
}
