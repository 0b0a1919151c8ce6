//! This agent's own services and checks: registration (API and config), persistence across
//! restarts, check runners, maintenance mode, and anti-entropy with the catalog.
//!
//! The local state is authoritative for this node: `sync` makes the catalog match it, at once
//! after a change and periodically to repair drift. Servers write through their own Raft node;
//! client agents send the same commands to a server over RPC (`Upstream`).

mod alias;
pub mod checks;
pub mod sidecar;
pub mod sync;

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::ApiError;
use crate::api::catalog::ServiceBody;
use crate::api::error::decode;
use crate::state::{CheckStatus, HealthCheck, Service, Str};
use checks::{CheckDefinition, CheckHandle, CheckRunner, CheckUpdate, RunnerOptions};

pub use sync::Upstream;

/// The file under the data dir that keeps API-registered services and checks.
const PERSIST_FILE: &str = "local-state.json";
const SERVICE_MAINT_PREFIX: &str = "_service_maintenance:";
const NODE_MAINT_CHECK: &str = "_node_maintenance";

/// Where a registration came from: decides whether it is persisted across restarts and
/// whether its script checks may run (`enable_local_script_checks` trusts only config files
/// and the API reached over loopback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A configuration file: the files hold it, so it is not persisted.
    Config,
    /// The HTTP API, from a loopback address.
    LocalApi,
    /// The HTTP API, from another host.
    RemoteApi,
}

impl Origin {
    fn persisted(self) -> bool {
        self != Origin::Config
    }

    /// The origin of an API request from `peer` (unknown peers count as remote).
    pub fn of_api_peer(peer: Option<std::net::IpAddr>) -> Origin {
        if peer.is_some_and(|ip| ip.is_loopback()) { Origin::LocalApi } else { Origin::RemoteApi }
    }
}

/// A service as this agent holds it.
#[derive(Debug, Clone)]
struct LocalService {
    service: Service,
    origin: Origin,
    /// The definition as given, kept to persist it verbatim.
    definition: Value,
    /// For a sidecar registered through its parent's `Connect.SidecarService`: the parent's
    /// ID (the sidecar goes with it, and is re-created from its definition, not persisted).
    sidecar_of: Option<String>,
}

#[derive(Debug, Clone)]
struct LocalCheck {
    check: HealthCheck,
    definition: CheckDefinition,
    origin: Origin,
    raw: Value,
    critical_since: Option<Instant>,
    deregister_after: Option<Duration>,
}

#[derive(Default)]
struct LocalState {
    services: BTreeMap<String, LocalService>,
    checks: BTreeMap<String, LocalCheck>,
    /// Maintenance checks are agent-made and never persisted.
    maintenance: BTreeMap<String, HealthCheck>,
}

#[derive(Serialize, Deserialize, Default)]
struct Persisted {
    services: Vec<Value>,
    checks: Vec<Value>,
    /// IDs of the services and checks above that came from another host's API request
    /// (their script checks run only with `enable_script_checks`).
    #[serde(default)]
    remote: Vec<String>,
}

/// Facts about this node that registrations carry.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub name: String,
    pub id: String,
    pub datacenter: String,
    pub address: String,
    pub meta: BTreeMap<String, String>,
    pub server: bool,
    /// `ports.sidecar_min_port`..=`sidecar_max_port` (both 0: no automatic sidecar ports).
    pub sidecar_ports: (u16, u16),
}

#[derive(Clone)]
pub struct LocalAgent {
    inner: Arc<Inner>,
}

struct Inner {
    node: NodeFacts,
    data_dir: PathBuf,
    state: Mutex<LocalState>,
    /// Wakes the syncer after a change that the catalog should see.
    changed: Notify,
    /// Bumped on every local change (alias checks watch it).
    revision: tokio::sync::watch::Sender<u64>,
    /// The last revision the syncer has tried to bring the catalog to.
    attempted: tokio::sync::watch::Sender<u64>,
    /// Whether a syncer runs (set when it starts).
    syncing: std::sync::atomic::AtomicBool,
    updates: mpsc::Sender<CheckUpdate>,
    runners: Mutex<BTreeMap<String, CheckHandle>>,
    options: RunnerOptions,
    shutdown: CancellationToken,
}

/// The agent service definition (Consul's `/v1/agent/service/register` body).
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase", default)]
struct AgentServiceBody {
    #[serde(rename = "ID")]
    id: String,
    name: String,
    kind: String,
    tags: Option<Vec<String>>,
    address: String,
    tagged_addresses: Option<BTreeMap<String, crate::api::catalog::ServiceAddressBody>>,
    meta: Option<BTreeMap<String, String>>,
    port: i64,
    weights: Option<crate::api::catalog::WeightsBody>,
    enable_tag_override: bool,
    check: Option<Value>,
    checks: Option<Vec<Value>>,
    proxy: Option<crate::connect::registration::ProxyBody>,
    connect: Option<crate::connect::registration::ConnectBody>,
}

/// A local service as `/v1/agent/services` shows it (Consul's `AgentService`): no raft
/// indexes (the agent's own view has none), `Kind` and `TaggedAddresses` only when set, and a
/// `ContentHash` that changes whenever the definition does.
pub fn agent_service_json(s: &Service, datacenter: &str) -> Value {
    let mut v = json!({
        "ID": s.id, "Service": s.service, "Tags": s.tags, "Meta": s.meta, "Port": s.port, "Address": s.address,
        "Weights": s.weights, "EnableTagOverride": s.enable_tag_override, "Datacenter": datacenter,
    });
    if !s.kind.is_empty() {
        v["Kind"] = json!(s.kind);
    }
    if !s.tagged_addresses.is_empty() {
        v["TaggedAddresses"] = json!(s.tagged_addresses);
    }
    if let Some(p) = &s.proxy {
        v["Proxy"] = crate::connect::registration::proxy_json(p);
    }
    if s.connect_native {
        v["Connect"] = json!({ "Native": true });
    }
    let hash = ring::digest::digest(&ring::digest::SHA256, v.to_string().as_bytes());
    v["ContentHash"] = json!(hash.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect::<String>());
    v
}

fn status_of(s: checks::Status) -> CheckStatus {
    match s {
        checks::Status::Passing => CheckStatus::Passing,
        checks::Status::Warning => CheckStatus::Warning,
        checks::Status::Critical => CheckStatus::Critical,
    }
}

impl LocalAgent {
    /// Create the local agent and the task that applies check results; call `restore` next.
    /// `catalog` (servers only) lets alias checks mirror checks of other nodes.
    pub fn new(
        node: NodeFacts,
        data_dir: PathBuf,
        mut options: RunnerOptions,
        catalog: Option<crate::cluster::RaftNode>,
        shutdown: CancellationToken,
    ) -> (LocalAgent, mpsc::Receiver<CheckUpdate>) {
        let (tx, rx) = mpsc::channel(1024);
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            options.alias_source = Some(Arc::new(alias::AliasView { agent: weak.clone(), catalog }));
            Inner {
                node,
                data_dir,
                state: Mutex::new(LocalState::default()),
                changed: Notify::new(),
                revision: tokio::sync::watch::channel(0).0,
                attempted: tokio::sync::watch::channel(0).0,
                syncing: std::sync::atomic::AtomicBool::new(false),
                updates: tx,
                runners: Mutex::new(BTreeMap::new()),
                options,
                shutdown,
            }
        });
        (LocalAgent { inner }, rx)
    }

    /// Changes whenever the local state does (services, checks, their outputs).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }

    pub fn node(&self) -> &NodeFacts {
        &self.inner.node
    }

    /// The current revision of the local state.
    pub fn revision(&self) -> u64 {
        *self.inner.revision.borrow()
    }

    /// A syncer runs: agent endpoints wait for it (`wait_synced`).
    pub fn syncer_started(&self) {
        self.inner.syncing.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The syncer tried to bring the catalog to `revision` (successfully or not).
    pub fn sync_attempted(&self, revision: u64) {
        self.inner.attempted.send_modify(|a| *a = (*a).max(revision));
    }

    /// Wait (at most `timeout`) until the syncer has tried to bring the catalog to the current
    /// revision, as Consul's agent endpoints do before answering, so that a registration is in
    /// the catalog when its request returns. Returns at once when no syncer runs.
    pub async fn wait_synced(&self, timeout: std::time::Duration) {
        if !self.inner.syncing.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let want = self.revision();
        let mut rx = self.inner.attempted.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|a| *a >= want)).await;
    }

    /// Wait until something changed that the catalog should learn about.
    pub async fn changed(&self) {
        self.inner.changed.notified().await
    }

    fn poke(&self) {
        self.inner.changed.notify_one();
        self.inner.revision.send_modify(|r| *r += 1);
    }

    /// Apply check results as they come, until shutdown.
    pub async fn run_updates(self, mut rx: mpsc::Receiver<CheckUpdate>) {
        loop {
            let u = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                u = rx.recv() => match u { Some(u) => u, None => return },
            };
            let status_changed = {
                let mut st = self.inner.state.lock();
                let Some(c) = st.checks.get_mut(&u.check_id) else { continue };
                let new = status_of(u.status);
                let changed = c.check.status != new;
                c.check.status = new;
                c.check.output = u.output.into();
                c.critical_since = match (new, c.critical_since) {
                    (CheckStatus::Critical, Some(t)) => Some(t),
                    (CheckStatus::Critical, None) => Some(Instant::now()),
                    _ => None,
                };
                changed
            };
            self.inner.revision.send_modify(|r| *r += 1);
            // Output-only changes ride along with the next periodic sync, as Consul's do.
            if status_changed {
                self.poke();
            }
        }
    }

    /// Services and checks as the catalog should hold them for this node.
    pub fn desired(&self) -> (Vec<Service>, Vec<HealthCheck>) {
        let st = self.inner.state.lock();
        let services = st.services.values().map(|s| s.service.clone()).collect();
        let mut checks: Vec<HealthCheck> = st.checks.values().map(|c| c.check.clone()).collect();
        checks.extend(st.maintenance.values().cloned());
        (services, checks)
    }

    /// Services whose checks have been critical longer than their
    /// `DeregisterCriticalServiceAfter`, to be removed.
    pub fn expired_services(&self) -> Vec<String> {
        let st = self.inner.state.lock();
        st.checks
            .values()
            .filter(|c| !c.check.service_id.is_empty())
            .filter(|c| matches!((c.critical_since, c.deregister_after), (Some(t), Some(after)) if t.elapsed() >= after))
            .map(|c| c.check.service_id.to_string())
            .collect()
    }

    fn parse_service(&self, body: &AgentServiceBody) -> Result<Service, ApiError> {
        let b = body.clone();
        let name = if b.name.is_empty() { return Err(ApiError::BadRequest("Missing service name".into())) } else { b.name };
        let svc = ServiceBody {
            id: if b.id.is_empty() { name.clone() } else { b.id },
            service: name,
            kind: b.kind,
            tags: b.tags,
            address: b.address,
            tagged_addresses: b.tagged_addresses,
            meta: b.meta,
            port: b.port,
            weights: b.weights,
            enable_tag_override: b.enable_tag_override,
            proxy: b.proxy,
            connect: b.connect.map(|c| crate::connect::registration::ConnectBody { native: c.native, sidecar_service: None }),
        };
        let s = svc.into_service()?;
        if s.kind == "connect-proxy" {
            if s.port == 0 {
                return Err(ApiError::BadRequest("Validation failed: Port or SocketPath must be set for a connect-proxy".into()));
            }
            if s.proxy.as_ref().is_none_or(|p| p.destination_service_name.is_empty()) {
                return Err(ApiError::BadRequest(
                    "Validation failed: Proxy.DestinationServiceName must be non-empty for Connect proxy services".into(),
                ));
            }
        }
        if s.connect_native && s.kind == "connect-proxy" {
            return Err(ApiError::BadRequest("Validation failed: A Proxy cannot also be Connect Native, only typical services".into()));
        }
        if s.connect_native && s.port == 0 {
            return Err(ApiError::BadRequest("Validation failed: Port or SocketPath must be set for a Connect native service.".into()));
        }
        Ok(s)
    }

    fn build_check(&self, raw: &Value, service: Option<&Service>, n: usize, total: usize) -> Result<LocalCheck, ApiError> {
        let def: CheckDefinition = serde_json::from_value(raw.clone()).map_err(|e| ApiError::BadRequest(format!("Request decode failed: {e}")))?;
        let kind = def.kind().map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut id = def.check_id.clone();
        let mut name = def.name.clone();
        let (service_id, service_name, service_tags) = match service {
            Some(s) => (s.id.clone(), s.service.clone(), s.tags.clone()),
            None => (def.service_id.as_str().into(), Str::new(), Vec::new()),
        };
        if id.is_empty() {
            id = match service {
                Some(s) if total > 1 => format!("service:{}:{}", s.id, n + 1),
                Some(s) => format!("service:{}", s.id),
                None => name.clone(),
            };
        }
        if name.is_empty() {
            name = match service {
                Some(s) => format!("Service '{}' check", s.service),
                None => id.clone(),
            };
        }
        if id.is_empty() {
            return Err(ApiError::BadRequest("Missing check name".into()));
        }
        let initial = def.status.map(status_of).unwrap_or(CheckStatus::Critical);
        let check = HealthCheck {
            node: self.inner.node.name.clone().into(),
            check_id: id.into(),
            name: name.into(),
            status: initial,
            notes: def.notes.clone().into(),
            output: Str::new(),
            service_id,
            service_name,
            service_tags,
            check_type: kind.type_name().into(),
            create_index: 0,
            modify_index: 0,
        };
        Ok(LocalCheck {
            deregister_after: def.deregister_critical_service_after,
            check,
            definition: def,
            origin: Origin::RemoteApi,
            raw: raw.clone(),
            critical_since: (initial == CheckStatus::Critical).then(Instant::now),
        })
    }

    fn start_runner(&self, c: &LocalCheck) -> Result<(), ApiError> {
        let kind = c.definition.kind().map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut options = self.inner.options.clone();
        options.enable_script_checks = options.enable_script_checks || (options.enable_local_script_checks && c.origin != Origin::RemoteApi);
        let handle = CheckRunner::spawn(
            c.check.check_id.to_string(),
            c.definition.clone(),
            kind,
            options,
            self.inner.updates.clone(),
            self.inner.shutdown.child_token(),
        )
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if let Some(old) = self.inner.runners.lock().insert(c.check.check_id.to_string(), handle) {
            old.stop();
        }
        Ok(())
    }

    fn stop_runner(&self, id: &str) {
        if let Some(h) = self.inner.runners.lock().remove(id) {
            h.stop();
        }
    }

    /// Register a service (and its checks) from an agent API body or a config file.
    pub fn add_service(&self, raw: Value, origin: Origin, replace_existing_checks: bool) -> Result<(), ApiError> {
        let raw = crate::api::error::canonical_keys(raw);
        let body: AgentServiceBody = serde_json::from_value(raw.clone()).map_err(|e| ApiError::BadRequest(format!("Request decode failed: {e}")))?;
        let service = self.parse_service(&body)?;
        // A `Connect.SidecarService` becomes a service of its own, registered with the parent.
        let sidecar = match body.connect.as_ref().and_then(|c| c.sidecar_service.as_ref()).filter(|s| !s.is_null()) {
            Some(sc) => {
                let ctx = {
                    let st = self.inner.state.lock();
                    let sid = format!("{}-sidecar-proxy", service.id);
                    sidecar::SidecarContext {
                        node_address: &self.inner.node.address,
                        min_port: self.inner.node.sidecar_ports.0,
                        max_port: self.inner.node.sidecar_ports.1,
                        used_ports: st.services.values().filter(|s| s.service.id != sid).map(|s| s.service.port).collect(),
                        current_port: st.services.get(&sid).map(|s| s.service.port),
                    }
                };
                let mut parent = raw.clone();
                parent["ID"] = json!(service.id);
                Some(sidecar::definition(&parent, sc, &ctx)?)
            }
            None => None,
        };
        if let Some(def) = &sidecar {
            // Validate the sidecar before anything is registered: the pair goes in whole or not.
            let b: AgentServiceBody =
                serde_json::from_value(def.clone()).map_err(|e| ApiError::BadRequest(format!("Invalid SidecarService: {e}")))?;
            self.parse_service(&b).map_err(|e| ApiError::BadRequest(format!("Invalid SidecarService: {e}")))?;
        }
        self.add_one_service(raw, body, service.clone(), origin, replace_existing_checks, None)?;
        match sidecar {
            Some(def) => {
                let b: AgentServiceBody =
                    serde_json::from_value(def.clone()).map_err(|e| ApiError::BadRequest(format!("Invalid SidecarService: {e}")))?;
                let s = self.parse_service(&b)?;
                self.add_one_service(def, b, s, origin, replace_existing_checks, Some(service.id.to_string()))
            }
            None => {
                // A parent registered again without a sidecar loses the one it had.
                let old = format!("{}-sidecar-proxy", service.id);
                let was_ours = self.inner.state.lock().services.get(&old).is_some_and(|s| s.sidecar_of.as_deref() == Some(service.id.as_str()));
                if was_ours {
                    self.remove_service(&old)?;
                }
                Ok(())
            }
        }
    }

    fn add_one_service(
        &self,
        raw: Value,
        body: AgentServiceBody,
        service: Service,
        origin: Origin,
        replace_existing_checks: bool,
        sidecar_of: Option<String>,
    ) -> Result<(), ApiError> {
        let raws: Vec<Value> = body.check.into_iter().chain(body.checks.unwrap_or_default()).filter(|c| !c.is_null()).collect();
        let mut new_checks = Vec::new();
        for (i, r) in raws.iter().enumerate() {
            let mut c = self.build_check(r, Some(&service), i, raws.len())?;
            c.origin = origin;
            new_checks.push(c);
        }
        // Validated; start runners before publishing so a bad runner refuses the whole request.
        for c in &new_checks {
            self.start_runner(c)?;
        }
        {
            let mut st = self.inner.state.lock();
            let stale: Vec<String> = st
                .checks
                .values()
                .filter(|c| {
                    c.check.service_id == service.id && (replace_existing_checks || new_checks.iter().any(|n| n.check.check_id == c.check.check_id))
                })
                .map(|c| c.check.check_id.to_string())
                .filter(|id| !new_checks.iter().any(|n| n.check.check_id == id.as_str()))
                .collect();
            for id in stale {
                st.checks.remove(&id);
                self.stop_runner(&id);
            }
            for c in new_checks {
                st.checks.insert(c.check.check_id.to_string(), c);
            }
            st.services.insert(service.id.to_string(), LocalService { service: service.clone(), origin, definition: raw, sidecar_of });
        }
        info!(service = %service.id, "service registered");
        self.persist();
        self.poke();
        Ok(())
    }

    pub fn remove_service(&self, id: &str) -> Result<(), ApiError> {
        // A sidecar registered with this service goes with it.
        let sidecars: Vec<String> =
            self.inner.state.lock().services.values().filter(|s| s.sidecar_of.as_deref() == Some(id)).map(|s| s.service.id.to_string()).collect();
        for s in sidecars {
            self.remove_service(&s)?;
        }
        let removed_checks: Vec<String> = {
            let mut st = self.inner.state.lock();
            if st.services.remove(id).is_none() {
                return Err(ApiError::NotFound(format!("Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name.")));
            }
            st.maintenance.remove(&format!("{SERVICE_MAINT_PREFIX}{id}"));
            let ids: Vec<String> = st.checks.values().filter(|c| c.check.service_id == id).map(|c| c.check.check_id.to_string()).collect();
            for c in &ids {
                st.checks.remove(c);
            }
            ids
        };
        for c in removed_checks {
            self.stop_runner(&c);
        }
        info!(service = %id, "service deregistered");
        self.persist();
        self.poke();
        Ok(())
    }

    pub fn add_check(&self, raw: Value, origin: Origin) -> Result<(), ApiError> {
        let raw = crate::api::error::canonical_keys(raw);
        let def_service = raw.get("ServiceID").and_then(Value::as_str).unwrap_or("").to_string();
        let service = if def_service.is_empty() {
            None
        } else {
            let st = self.inner.state.lock();
            Some(
                st.services
                    .get(&def_service)
                    .map(|s| s.service.clone())
                    .ok_or_else(|| ApiError::NotFound(format!("ServiceID {def_service:?} does not exist")))?,
            )
        };
        let mut c = self.build_check(&raw, service.as_ref(), 0, 1)?;
        c.origin = origin;
        self.start_runner(&c)?;
        self.inner.state.lock().checks.insert(c.check.check_id.to_string(), c);
        self.persist();
        self.poke();
        Ok(())
    }

    pub fn remove_check(&self, id: &str) -> Result<(), ApiError> {
        if self.inner.state.lock().checks.remove(id).is_none() {
            return Err(ApiError::NotFound(format!("Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name.")));
        }
        self.stop_runner(id);
        self.persist();
        self.poke();
        Ok(())
    }

    pub fn ttl(&self, id: &str, status: checks::Status, output: String) -> Result<(), ApiError> {
        let runners = self.inner.runners.lock();
        let h = runners
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name.")))?;
        h.ttl_update(status, &output).map(|_| ()).map_err(|e| ApiError::BadRequest(e.to_string()))
    }

    pub fn maintenance(&self, service: Option<&str>, enable: bool, reason: String) -> Result<(), ApiError> {
        let mut st = self.inner.state.lock();
        let (id, svc) = match service {
            Some(sid) => {
                let s = st
                    .services
                    .get(sid)
                    .map(|s| s.service.clone())
                    .ok_or_else(|| ApiError::NotFound(format!("No service registered with ID {sid:?}")))?;
                (format!("{SERVICE_MAINT_PREFIX}{sid}"), Some(s))
            }
            None => (NODE_MAINT_CHECK.to_string(), None),
        };
        if !enable {
            st.maintenance.remove(&id);
        } else {
            let notes = if reason.is_empty() {
                "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.".to_string()
            } else {
                reason
            };
            st.maintenance.insert(
                id.clone(),
                HealthCheck {
                    node: self.inner.node.name.clone().into(),
                    check_id: id.into(),
                    name: if svc.is_some() { "Service Maintenance Mode".into() } else { "Node Maintenance Mode".into() },
                    status: CheckStatus::Critical,
                    notes: notes.into(),
                    service_id: svc.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
                    service_name: svc.as_ref().map(|s| s.service.clone()).unwrap_or_default(),
                    service_tags: svc.map(|s| s.tags).unwrap_or_default(),
                    ..Default::default()
                },
            );
        }
        drop(st);
        self.poke();
        Ok(())
    }

    pub fn services_json(&self) -> Value {
        let st = self.inner.state.lock();
        let map: serde_json::Map<String, Value> =
            st.services.values().map(|s| (s.service.id.to_string(), agent_service_json(&s.service, &self.inner.node.datacenter))).collect();
        Value::Object(map)
    }

    pub fn checks_json(&self) -> Value {
        let (_, checks) = self.desired();
        Value::Object(checks.into_iter().map(|c| (c.check_id.to_string(), serde_json::to_value(&c).unwrap_or(Value::Null))).collect())
    }

    /// Aggregated status of one local service ("passing", "warning", "critical", or
    /// "maintenance" counted as critical).
    pub fn service_status(&self, id: &str) -> Option<(String, Value)> {
        let (services, checks) = self.desired();
        let s = services.into_iter().find(|s| s.id == id)?;
        let worst = checks.iter().filter(|c| c.service_id == id || c.service_id.is_empty()).map(|c| c.status).max().unwrap_or(CheckStatus::Passing);
        let status = if worst == CheckStatus::Maintenance { CheckStatus::Critical } else { worst };
        Some((status.as_str().to_string(), agent_service_json(&s, &self.inner.node.datacenter)))
    }

    pub fn service_status_by_name(&self, name: &str) -> Vec<(String, Value)> {
        let (services, _) = self.desired();
        services.iter().filter(|s| s.service == name).filter_map(|s| self.service_status(&s.id)).collect()
    }

    fn persist(&self) {
        let p = {
            let st = self.inner.state.lock();
            let remote_services =
                st.services.values().filter(|s| s.origin == Origin::RemoteApi && s.sidecar_of.is_none()).map(|s| s.service.id.to_string());
            let remote_checks =
                st.checks.values().filter(|c| c.origin == Origin::RemoteApi && c.check.service_id.is_empty()).map(|c| c.check.check_id.to_string());
            Persisted {
                // Sidecars come back with their parents' definitions.
                services: st.services.values().filter(|s| s.origin.persisted() && s.sidecar_of.is_none()).map(|s| s.definition.clone()).collect(),
                checks: st.checks.values().filter(|c| c.origin.persisted() && c.check.service_id.is_empty()).map(|c| c.raw.clone()).collect(),
                remote: remote_services.chain(remote_checks).collect(),
            }
        };
        let path = self.inner.data_dir.join(PERSIST_FILE);
        let tmp = path.with_extension("tmp");
        let res = serde_json::to_vec_pretty(&p)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            warn!(path = %path.display(), error = %e, "could not persist local services and checks");
        }
    }

    /// Register what was persisted before the last stop.
    pub fn restore(&self) {
        let path = self.inner.data_dir.join(PERSIST_FILE);
        let Ok(bytes) = std::fs::read(&path) else { return };
        let p: Persisted = match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => return warn!(path = %path.display(), error = %e, "ignoring unreadable persisted local state"),
        };
        let origin = |raw: &Value, id_key: &str, name_key: &str| {
            let raw = crate::api::error::canonical_keys(raw.clone());
            let id = raw.get(id_key).or_else(|| raw.get(name_key)).and_then(Value::as_str).unwrap_or_default().to_string();
            if p.remote.contains(&id) { Origin::RemoteApi } else { Origin::LocalApi }
        };
        for s in &p.services {
            if let Err(e) = self.add_service(s.clone(), origin(s, "ID", "Name"), false) {
                warn!(error = %e, "could not restore a persisted service");
            }
        }
        for c in &p.checks {
            if let Err(e) = self.add_check(c.clone(), origin(c, "CheckID", "Name")) {
                warn!(error = %e, "could not restore a persisted check");
            }
        }
    }

    /// Bodies from the API: decoded with Consul's case-insensitive field names.
    pub fn decode_body(body: &Bytes) -> Result<Value, ApiError> {
        decode::<Value>(body)
    }
}
