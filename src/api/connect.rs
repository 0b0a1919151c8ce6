//! The mesh endpoints: the CA (`/v1/connect/ca/*`), intentions (`/v1/connect/intentions*`),
//! the agent's leaf, roots and authorize endpoints, and the connect-capable instances of a
//! service (`/v1/catalog/connect/*`, `/v1/health/connect/*`), in Consul's shapes.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::catalog::service_query;
use super::error::decode;
use super::query::{Blocking, Meta, Params, blocking, filtered, reply};
use super::{ApiError, Ctx};
use crate::connect::intention::{self, Intention};
use crate::state::mesh::{CaConfig, ConnectCa};
use crate::state::{Command, Outcome, StateData, Table};

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/connect/ca/roots", get(roots))
        .route("/v1/connect/ca/configuration", get(ca_config_get).put(ca_config_put))
        .route("/v1/agent/connect/ca/roots", get(agent_roots))
        .route("/v1/agent/connect/ca/leaf/{service}", get(agent_leaf))
        .route("/v1/agent/connect/authorize", post(authorize))
        .route("/v1/connect/intentions", get(intentions_list).post(intention_create_legacy))
        .route("/v1/connect/intentions/exact", get(intention_get).put(intention_put).delete(intention_delete))
        .route("/v1/connect/intentions/match", get(intentions_match))
        .route("/v1/connect/intentions/check", get(intention_check))
        .route("/v1/catalog/connect/{service}", get(catalog_connect))
        .route("/v1/health/connect/{service}", get(health_connect))
}

fn enabled(ctx: &Ctx) -> Result<(), ApiError> {
    if ctx.info.connect_enabled { Ok(()) } else { Err(ApiError::Internal("Connect must be enabled in order to use this endpoint".into())) }
}

fn root_json(r: &crate::state::mesh::CaRoot) -> Value {
    json!({
        "ID": r.id, "Name": r.name, "SerialNumber": r.serial_number, "SigningKeyID": r.signing_key_id,
        "ExternalTrustDomain": r.external_trust_domain, "NotBefore": r.not_before, "NotAfter": r.not_after,
        "RootCert": ensure_newline(&r.root_cert),
        "IntermediateCerts": if r.intermediate_certs.is_empty() { Value::Null } else { json!(r.intermediate_certs.iter().map(|c| ensure_newline(c)).collect::<Vec<_>>()) },
        "Active": r.active, "PrivateKeyType": r.private_key_type, "PrivateKeyBits": r.private_key_bits,
        "CreateIndex": r.create_index, "ModifyIndex": r.modify_index,
    })
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') { s.to_string() } else { format!("{s}\n") }
}

/// Consul's `IndexedCARoots`.
pub fn roots_json(ca: &ConnectCa) -> Value {
    json!({
        "ActiveRootID": ca.active_root().map(|r| r.id.clone()).unwrap_or_default(),
        "TrustDomain": ca.trust_domain(),
        "Roots": ca.roots.iter().map(root_json).collect::<Vec<_>>(),
    })
}

fn pem_chain(ca: &ConnectCa) -> String {
    ca.roots
        .iter()
        .flat_map(|r| std::iter::once(ensure_newline(&r.root_cert)).chain(r.intermediate_certs.iter().map(|c| ensure_newline(c))))
        .collect()
}

async fn roots(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    let pem = match p.get("pem") {
        None => false,
        Some("" | "true" | "1") => true,
        Some("false" | "0") => false,
        Some(_) => return Err(ApiError::BadRequest("The 'pem' query parameter must be a boolean value".into())),
    };
    let (ca, meta) = blocking(&ctx, &p, &[Table::ConnectCa], |d| Ok((d.connect_ca.clone(), d.index_of(&[Table::ConnectCa])))).await?;
    let ca = ca.ok_or_else(|| ApiError::Internal("CA has not finished initializing".into()))?;
    if pem {
        let mut resp = ([("content-type", "application/pem-certificate-chain")], pem_chain(&ca)).into_response();
        meta.apply(&mut resp);
        return Ok(resp);
    }
    Ok(reply(&meta, &roots_json(&ca)))
}

async fn agent_roots(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    match &ctx.node {
        Some(_) => roots(State(ctx.clone()), p).await,
        // A client agent serves the roots from its cache, kept fresh by one upstream watch.
        None => super::agent_cache::read(&ctx, "/v1/connect/ca/roots", &p).await,
    }
}

fn ca_config_json(ca: &ConnectCa) -> Value {
    let c = &ca.config;
    json!({
        "Provider": c.provider,
        "Config": {
            "LeafCertTTL": c.leaf_cert_ttl, "IntermediateCertTTL": c.intermediate_cert_ttl, "RootCertTTL": c.root_cert_ttl,
            "PrivateKeyType": c.private_key_type, "PrivateKeyBits": c.private_key_bits,
            "CSRMaxPerSecond": c.csr_max_per_second, "CSRMaxConcurrent": c.csr_max_concurrent,
        },
        "State": Value::Null,
        "ForceWithoutCrossSigning": c.force_without_cross_signing,
        "CreateIndex": ca.config_create_index, "ModifyIndex": ca.config_modify_index,
    })
}

async fn ca_config_get(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    let (ca, meta) = blocking(&ctx, &p, &[Table::ConnectCa], |d| Ok((d.connect_ca.clone(), d.index_of(&[Table::ConnectCa])))).await?;
    let ca = ca.ok_or_else(|| ApiError::Internal("CA has not finished initializing".into()))?;
    Ok(reply(&meta, &ca_config_json(&ca)))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct CaConfigBody {
    provider: String,
    #[serde(default)]
    config: serde_json::Map<String, Value>,
    #[serde(default)]
    state: Option<Value>,
    #[serde(default)]
    force_without_cross_signing: bool,
    #[serde(default)]
    create_index: Option<u64>,
    #[serde(default)]
    modify_index: Option<u64>,
}

/// Apply a `Config` map (keys case-insensitive, values weakly typed, as Consul's mapstructure
/// decodes them) over `base`.
fn merge_ca_config(base: &CaConfig, m: &serde_json::Map<String, Value>) -> Result<CaConfig, ApiError> {
    let mut c = base.clone();
    let bad = |k: &str, want: &str| ApiError::BadRequest(format!("error parsing CA config: Config.{k}: expected {want}"));
    let as_str = |k: &str, v: &Value| v.as_str().map(str::to_string).ok_or_else(|| bad(k, "a string"));
    let as_num = |k: &str, v: &Value| v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).ok_or_else(|| bad(k, "a number"));
    for (k, v) in m {
        match k.to_ascii_lowercase().replace('_', "").as_str() {
            "leafcertttl" => c.leaf_cert_ttl = as_str(k, v)?,
            "intermediatecertttl" => c.intermediate_cert_ttl = as_str(k, v)?,
            "rootcertttl" => c.root_cert_ttl = as_str(k, v)?,
            "privatekeytype" => c.private_key_type = as_str(k, v)?.to_ascii_lowercase(),
            "privatekeybits" => c.private_key_bits = as_num(k, v)? as u32,
            "csrmaxpersecond" => c.csr_max_per_second = as_num(k, v)?,
            "csrmaxconcurrent" => c.csr_max_concurrent = as_num(k, v)? as u64,
            "rotationperiod" | "leafcertttlcomment" => {}
            "privatekey" | "rootcert" => {
                return Err(ApiError::BadRequest(format!(
                    "Config.{k}: bringing your own root key is not supported by the built-in CA; omit it and Trellis generates and rotates the root"
                )));
            }
            _ => return Err(ApiError::BadRequest(format!("error parsing CA config: unknown key Config.{k}"))),
        }
    }
    Ok(c)
}

/// Change the CA's configuration. A new key type or size rotates the root (the old root
/// cross-signs the new one; leaves signed by either keep verifying until they renew); other
/// changes (TTLs, limits) keep the root.
async fn ca_config_put(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    if !super::config::is_primary(&ctx) {
        return Err(ApiError::BadRequest(format!(
            "the CA is configured in the primary datacenter ({}): send this request there",
            ctx.info.primary_datacenter
        )));
    }
    let b: CaConfigBody = decode(&body)?;
    let _ = (b.create_index, b.modify_index);
    if b.state.as_ref().is_some_and(|s| !s.is_null() && s.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(ApiError::BadRequest("Provider State is read-only. It must be omitted or identical to the current value".into()));
    }
    let raft = ctx.raft()?;
    let current = raft.store.read().data().connect_ca.clone().ok_or_else(|| ApiError::Internal("CA has not finished initializing".into()))?;
    let mut next_cfg = merge_ca_config(&current.config, &b.config)?;
    next_cfg.provider = b.provider.to_ascii_lowercase();
    next_cfg.force_without_cross_signing = b.force_without_cross_signing;
    crate::connect::ca::validate_config(&next_cfg).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let rotate = next_cfg.private_key_type != current.config.private_key_type || next_cfg.private_key_bits != current.config.private_key_bits;
    let next = if rotate {
        let (cur, cfg) = (current.clone(), next_cfg.clone());
        let now = crate::cluster::now_ms();
        tokio::task::spawn_blocking(move || crate::connect::ca::rotate(&cur, &cfg, now))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::BadRequest(e.to_string()))?
    } else {
        ConnectCa { config: next_cfg, ..current.clone() }
    };
    if next == current {
        return Ok(().into_response());
    }
    let expect = current.version();
    match raft.write(Command::CaSet { ca: Box::new(next), expect }).await? {
        (Outcome::Applied(true), _) => {
            if rotate {
                tracing::info!("Connect CA root rotated");
            }
            Ok(().into_response())
        }
        _ => Err(ApiError::Conflict("the CA configuration changed while this request was applied; try again".into())),
    }
}

async fn agent_leaf(State(ctx): State<Ctx>, Path(service): Path<String>, p: Params) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    // Leaves wait 10 minutes by default, as Consul's do.
    let min = p.u64("index")?.filter(|i| *i > 0);
    let wait = match p.get("wait") {
        None | Some("") => std::time::Duration::from_secs(600),
        Some(w) => crate::duration::parse(w).ok_or_else(|| ApiError::BadRequest("Invalid wait time".into()))?.min(super::query::MAX_WAIT),
    };
    let b = Blocking::start_local(&ctx, &p)?;
    let deadline = if min.is_some() { tokio::time::Instant::now() + wait } else { b.deadline };
    let (leaf, index) = ctx.agent.leaf(service, min, deadline).await?;
    Ok(reply(&Meta::of(&ctx, index, &p), &leaf))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct AuthorizeBody {
    target: String,
    #[serde(rename = "ClientCertURI")]
    client_cert_uri: String,
    client_cert_serial: String,
}

/// The intentions that apply to `destination`, in evaluation order: from this server's state,
/// or on a client agent from its cache (one upstream watch per destination).
pub async fn intentions_for(ctx: &Ctx, destination: &str) -> Result<Vec<Intention>, ApiError> {
    if let Some(node) = &ctx.node {
        let all = intention::all(&node.store.read().data().config_entries);
        return Ok(intention::matching(&all, destination, true));
    }
    let p = Params::parse(Some(&format!("by=destination&name={}&cached", super::agent_cache::pct(destination))));
    let resp = super::agent_cache::read(ctx, "/v1/connect/intentions/match", &p).await?;
    let body = axum::body::to_bytes(resp.into_body(), 16 << 20).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::Internal(format!("intentions from the servers: {e}")))?;
    Ok(v[destination].as_array().into_iter().flatten().filter_map(Intention::from_json).collect())
}

fn default_policy(ctx: &Ctx) -> (bool, bool) {
    match ctx.info.default_intention_policy {
        Some(allow) => (allow, true),
        None => (true, false),
    }
}

async fn authorize(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    let b: AuthorizeBody = decode(&body)?;
    let _ = b.client_cert_serial;
    if b.target.is_empty() {
        return Err(ApiError::BadRequest("Target service must be specified".into()));
    }
    if b.client_cert_uri.is_empty() {
        return Err(ApiError::BadRequest("ClientCertURI not a valid Connect identifier".into()));
    }
    let id = crate::connect::spiffe::parse_service(&b.client_cert_uri).map_err(|e| match e {
        crate::connect::spiffe::SpiffeError::Scheme => ApiError::BadRequest("ClientCertURI not a valid Connect identifier".into()),
        crate::connect::spiffe::SpiffeError::Format => ApiError::BadRequest("ClientCertURI not a valid Service identifier".into()),
    })?;
    let list = intentions_for(&ctx, &b.target).await?;
    let (allow, from_config) = default_policy(&ctx);
    let d = intention::decide(&list, &id.service, &b.target, allow, from_config);
    Ok(axum::Json(json!({ "Authorized": d.allowed, "Reason": d.reason })).into_response())
}

fn all_intentions(d: &StateData) -> Vec<Intention> {
    intention::all(&d.config_entries)
}

async fn intentions_list(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    let (list, meta) = blocking(&ctx, &p, &[Table::ConfigEntries], |d| {
        Ok((all_intentions(d).iter().map(Intention::json).collect::<Vec<_>>(), d.index_of(&[Table::ConfigEntries])))
    })
    .await?;
    Ok(reply(&meta, &filtered(&p, &list)?))
}

async fn intention_create_legacy() -> ApiError {
    ApiError::BadRequest(
        "the ID-based intention API is not supported: use PUT /v1/connect/intentions/exact?source=<src>&destination=<dst> or a service-intentions config entry".into(),
    )
}

fn required(p: &Params, k: &str) -> Result<String, ApiError> {
    let v = p.get(k).filter(|v| !v.is_empty()).ok_or_else(|| ApiError::BadRequest(format!("required query parameter '{k}' not set")))?;
    intention::parse_name(v).map_err(ApiError::BadRequest)
}

async fn intention_get(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    let (src, dst) = (required(&p, "source")?, required(&p, "destination")?);
    let (found, meta) = blocking(&ctx, &p, &[Table::ConfigEntries], |d| {
        let found = all_intentions(d).into_iter().find(|i| i.source == src && i.destination == dst).map(|i| i.json());
        Ok((found, d.index_of(&[Table::ConfigEntries])))
    })
    .await?;
    match found {
        Some(i) => Ok(reply(&meta, &i)),
        None => {
            let mut resp = ApiError::NotFound("Intention not found".into()).into_response();
            meta.apply(&mut resp);
            Ok(resp)
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct IntentionBody {
    #[serde(rename = "ID")]
    id: String,
    source_type: String,
    action: String,
    permissions: Option<Vec<Value>>,
    description: String,
    meta: Option<serde_json::Map<String, Value>>,
    source_name: String,
    destination_name: String,
    #[serde(rename = "SourceNS")]
    source_ns: String,
    #[serde(rename = "DestinationNS")]
    destination_ns: String,
    precedence: Option<i64>,
    create_index: Option<u64>,
    modify_index: Option<u64>,
    created_at: Option<Value>,
    updated_at: Option<Value>,
    hash: Option<Value>,
}

/// Write the destination's `service-intentions` entry with `change` applied to its sources,
/// through Raft with a CAS on the entry (so concurrent intention writes never lose each
/// other's sources), retrying a few times when another write got in between.
async fn update_intentions(
    ctx: &Ctx,
    destination: &str,
    change: impl Fn(&mut Vec<Value>, &mut Option<Value>) -> Result<(), ApiError>,
) -> Result<u64, ApiError> {
    let raft = ctx.raft()?;
    for _ in 0..5 {
        let (mut sources, mut meta, cas) = {
            let store = raft.store.read();
            match store.data().config_entries.get(&("service-intentions".to_string(), destination.to_string())) {
                Some(e) => {
                    let v: Value = serde_json::from_str(&e.json).unwrap_or_default();
                    (v["Sources"].as_array().cloned().unwrap_or_default(), v.get("Meta").cloned(), e.modify_index)
                }
                None => (Vec::new(), None, 0),
            }
        };
        change(&mut sources, &mut meta)?;
        let (outcome, index) = if sources.is_empty() {
            raft.write(Command::ConfigDelete { kind: "service-intentions".into(), name: destination.into(), cas: Some(cas) }).await?
        } else {
            let mut raw = json!({ "Kind": "service-intentions", "Name": destination, "Sources": sources });
            if let Some(m) = meta {
                raw["Meta"] = m;
            }
            let (kind, name, v) = crate::connect::config_entry::normalize(raw)?;
            // L7 permissions need an HTTP-like destination (Consul's graph validation).
            crate::connect::chain::validate_write(&raft.store.read().data().config_entries, &kind, &name, Some(&v), &ctx.info.datacenter)
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            let entry = crate::state::mesh::ConfigEntry { kind, name, json: v.to_string(), create_index: 0, modify_index: 0 };
            raft.write(Command::ConfigSet { entry, cas: Some(cas) }).await?
        };
        if outcome == Outcome::Applied(true) {
            return Ok(index);
        }
    }
    Err(ApiError::Conflict("the intentions of this destination kept changing; try again".into()))
}

async fn intention_put(State(ctx): State<Ctx>, p: Params, body: Bytes) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    let (src, dst) = (required(&p, "source")?, required(&p, "destination")?);
    if !super::config::is_primary(&ctx) {
        return super::forward::to_primary(&ctx, "PUT", "/v1/connect/intentions/exact", &p, body).await;
    }
    let b: IntentionBody = decode(&body)?;
    let _ = (
        b.id,
        b.source_name,
        b.destination_name,
        b.source_ns,
        b.destination_ns,
        b.precedence,
        b.create_index,
        b.modify_index,
        b.created_at,
        b.updated_at,
        b.hash,
    );
    let mut source = json!({ "Name": src });
    if !b.source_type.is_empty() {
        source["Type"] = json!(b.source_type);
    }
    if !b.action.is_empty() {
        source["Action"] = json!(b.action);
    }
    if let Some(perms) = b.permissions.filter(|p| !p.is_empty()) {
        source["Permissions"] = json!(perms);
    }
    if !b.description.is_empty() {
        source["Description"] = json!(b.description);
    }
    let new_meta = b.meta.filter(|m| !m.is_empty()).map(Value::Object);
    let index = update_intentions(&ctx, &dst, |sources, meta| {
        match (&new_meta, sources.is_empty()) {
            (Some(_), true) => return Err(ApiError::BadRequest("Meta must not be specified".into())),
            (Some(m), false) if Some(m) != meta.as_ref() => {
                return Err(ApiError::BadRequest("Meta must not be specified, or should be unchanged during an update.".into()));
            }
            _ => {}
        }
        sources.retain(|s| s["Name"] != src.as_str());
        sources.push(source.clone());
        Ok(())
    })
    .await?;
    Ok(super::catalog::write_reply(&ctx, index, true))
}

async fn intention_delete(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    let (src, dst) = (required(&p, "source")?, required(&p, "destination")?);
    if !super::config::is_primary(&ctx) {
        return super::forward::to_primary(&ctx, "DELETE", "/v1/connect/intentions/exact", &p, Bytes::new()).await;
    }
    let index = update_intentions(&ctx, &dst, |sources, _| {
        sources.retain(|s| s["Name"] != src.as_str());
        Ok(())
    })
    .await?;
    Ok(super::catalog::write_reply(&ctx, index, true))
}

async fn intentions_match(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    let by = p.get("by").filter(|b| !b.is_empty()).ok_or_else(|| ApiError::BadRequest("required query parameter 'by' not set".into()))?;
    let by_destination = match by {
        "destination" => true,
        "source" => false,
        _ => return Err(ApiError::BadRequest("'by' parameter must be one of 'source' or 'destination'".into())),
    };
    let names: Vec<String> = p.all("name").into_iter().map(str::to_string).collect();
    if names.is_empty() {
        return Err(ApiError::BadRequest("required query parameter 'name' not set".into()));
    }
    let parsed: Vec<String> = names.iter().map(|n| intention::parse_name(n).map_err(ApiError::BadRequest)).collect::<Result<_, _>>()?;
    let (out, meta) = blocking(&ctx, &p, &[Table::ConfigEntries], |d| {
        let all = all_intentions(d);
        let mut out = serde_json::Map::new();
        for (raw, name) in names.iter().zip(&parsed) {
            let m = intention::matching(&all, name, by_destination);
            out.insert(raw.clone(), if m.is_empty() { Value::Null } else { Value::Array(m.iter().map(Intention::json).collect()) });
        }
        Ok((Value::Object(out), d.index_of(&[Table::ConfigEntries])))
    })
    .await?;
    Ok(reply(&meta, &out))
}

async fn intention_check(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    enabled(&ctx)?;
    let (src, dst) = (required(&p, "source")?, required(&p, "destination")?);
    if let Some(t) = p.get("source-type").filter(|t| !t.is_empty() && *t != "consul") {
        return Err(ApiError::BadRequest(format!("unsupported SourceType: {t:?}")));
    }
    let (allow, from_config) = default_policy(&ctx);
    let (allowed, meta) = blocking(&ctx, &p, &[Table::ConfigEntries], |d| {
        Ok((intention::decide(&all_intentions(d), &src, &dst, allow, from_config).allowed, d.index_of(&[Table::ConfigEntries])))
    })
    .await?;
    Ok(reply(&meta, &json!({ "Allowed": allowed })))
}

/// The connect-capable instances of a service: its sidecars (`connect-proxy` services whose
/// destination it is) and its own instances if they are `Connect.Native`.
async fn connect_view(
    ctx: Ctx,
    name: String,
    mut q: crate::state::catalog::ServiceQuery,
    p: Params,
    headers: HeaderMap,
    health: bool,
) -> Result<Response, ApiError> {
    q.passing_only = health && p.flag("passing");
    q.connect = true;
    let endpoint = if health { "health-connect" } else { "catalog-connect" };
    let render: fn(&crate::state::catalog::ServiceInstance, &str) -> Value =
        if health { super::health::health_entry_json } else { super::catalog::catalog_service_json };
    super::catalog::service_view(&ctx, endpoint, name, q, p, headers, render).await
}

async fn catalog_connect(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params, headers: HeaderMap) -> Result<Response, ApiError> {
    let q = service_query(&p)?;
    connect_view(ctx, name, q, p, headers, false).await
}

async fn health_connect(State(ctx): State<Ctx>, Path(name): Path<String>, p: Params, headers: HeaderMap) -> Result<Response, ApiError> {
    let q = service_query(&p)?;
    connect_view(ctx, name, q, p, headers, true).await
}
