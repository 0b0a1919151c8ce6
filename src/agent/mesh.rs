//! The agent's part of the mesh.
//!
//! - Servers sign leaves for agents (`ClusterRpc::SignLeaf`) within the CA's limits
//!   (`CSRMaxPerSecond`, else `CSRMaxConcurrent`: a request that waits more than 500 ms for a
//!   slot is refused with "Rate limit reached, try again later", a 429 over HTTP).
//! - The leader of the primary creates the CA at first start and prunes roots no leaf needs;
//!   a secondary's leader replicates the primary's CA and config entries and keeps an
//!   intermediate signed by the primary's active root.
//! - Every agent keeps a leaf per service it is asked for (`LeafCache`): a fresh key and CSR,
//!   signed by a server, renewed at a random point between 60 % and 90 % of its life, and
//!   again (after up to 30 s of jitter) when the active root changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::{ClusterReply, ClusterRpc, MeshState, RaftNode, SignedLeaf};
use crate::connect::ca;
use crate::rpc::{ErrorCode, RpcClient, RpcError, Service};
use crate::state::mesh::{CaConfig, ConnectCa};
use crate::state::{Command, Outcome, Table};

/// How long a signing request may wait for a slot under the CA's limits (Consul's 500 ms).
const CSR_SLOT_WAIT: Duration = Duration::from_millis(500);
pub const RATE_LIMITED: &str = "Rate limit reached, try again later";
/// How long a replication query waits at the primary before it is renewed.
const REPLICATION_WAIT: Duration = Duration::from_secs(60);
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// A root rotation reaches each agent's leaves within this much jitter (Consul's 30 s).
const ROOT_CHANGE_JITTER: Duration = Duration::from_secs(30);
/// Retries of a failed signing.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The CA without anything secret: what agents and other datacenters may see.
pub fn public_ca(ca: &ConnectCa) -> ConnectCa {
    let mut c = ca.clone();
    for r in &mut c.roots {
        r.signing_key.clear();
    }
    c
}

/// The server side: signing within the CA's limits.
pub struct Signer {
    node: RaftNode,
    datacenter: String,
    /// Token bucket: the earliest time the next request may be signed.
    next_slot: Mutex<Instant>,
    concurrent: tokio::sync::Semaphore,
}

impl Signer {
    pub fn new(node: RaftNode, datacenter: String) -> Arc<Signer> {
        Arc::new(Signer { node, datacenter, next_slot: Mutex::new(Instant::now()), concurrent: tokio::sync::Semaphore::new(Semaphore::MAX_PERMITS) })
    }

    fn ca(&self) -> Result<ConnectCa, RpcError> {
        self.node.store.read().data().connect_ca.clone().ok_or_else(|| RpcError::new(ErrorCode::NotFound, "CA has not finished initializing"))
    }

    /// Sign a leaf CSR, within the configured limits.
    pub async fn sign_leaf(&self, csr: &[u8]) -> Result<SignedLeaf, RpcError> {
        let ca = self.ca()?;
        let limited = || RpcError::new(ErrorCode::RateLimited, RATE_LIMITED);
        let _permit = if ca.config.csr_max_per_second > 0.0 {
            let gap = Duration::from_secs_f64(1.0 / ca.config.csr_max_per_second);
            let wait = {
                let mut next = self.next_slot.lock();
                let now = Instant::now();
                let at = (*next).max(now);
                if at.duration_since(now) > CSR_SLOT_WAIT {
                    return Err(limited());
                }
                *next = at + gap;
                at.duration_since(now)
            };
            tokio::time::sleep(wait).await;
            None
        } else if ca.config.csr_max_concurrent > 0 {
            let limit = ca.config.csr_max_concurrent as usize;
            let in_use = Semaphore::MAX_PERMITS - self.concurrent.available_permits();
            if in_use >= limit {
                // Wait a little for one of the signings in progress to finish.
                let deadline = tokio::time::Instant::now() + CSR_SLOT_WAIT;
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if Semaphore::MAX_PERMITS - self.concurrent.available_permits() < limit {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(limited());
                    }
                }
            }
            Some(self.concurrent.acquire().await.map_err(|_| limited())?)
        } else {
            None
        };
        let dc = self.datacenter.clone();
        let csr = csr.to_vec();
        // Signing is CPU work of a millisecond or two: off the async workers.
        let leaf = tokio::task::spawn_blocking(move || ca::sign_leaf(&ca, &dc, &csr))
            .await
            .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| match e {
                ca::CaError::NotInitialized => RpcError::new(ErrorCode::NotFound, e.to_string()),
                e => RpcError::new(ErrorCode::BadRequest, e.to_string()),
            })?;
        let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Ok(SignedLeaf {
            cert_pem: leaf.cert_pem,
            serial: leaf.serial,
            service_uri: leaf.service_uri,
            valid_after_ms: ms(leaf.valid_after),
            valid_before_ms: ms(leaf.valid_before),
        })
    }

    /// Sign a secondary datacenter's intermediate (primary only).
    pub fn sign_intermediate(&self, datacenter: &str, csr: &[u8]) -> Result<String, RpcError> {
        let ca = self.ca()?;
        ca::sign_intermediate(&ca, datacenter, csr).map_err(|e| RpcError::new(ErrorCode::BadRequest, e.to_string()))
    }

    /// The CA and config entries once newer than `min_index` (or after a while), for a
    /// secondary's replication.
    pub async fn mesh_state(&self, min_index: u64) -> MeshState {
        let deadline = tokio::time::Instant::now() + REPLICATION_WAIT;
        loop {
            let (mut ca_watch, mut entries_watch, mut states_watch, state) = {
                let store = self.node.store.read();
                let d = store.data();
                let state = MeshState {
                    ca: d.connect_ca.as_ref().map(public_ca),
                    entries: d.config_entries.values().cloned().collect(),
                    federation_states: d.federation_states.values().cloned().collect(),
                    index: d.index_of(&[Table::ConnectCa, Table::ConfigEntries, Table::FederationStates]),
                };
                (store.watch(Table::ConnectCa), store.watch(Table::ConfigEntries), store.watch(Table::FederationStates), state)
            };
            if state.index > min_index || tokio::time::Instant::now() >= deadline {
                return state;
            }
            let changed = async {
                tokio::select! {
                    _ = ca_watch.changed() => {}
                    _ = entries_watch.changed() => {}
                    _ = states_watch.changed() => {}
                }
            };
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return state;
            }
        }
    }
}

struct Semaphore;
impl Semaphore {
    const MAX_PERMITS: usize = 1 << 20;
}

/// The CA configuration an agent's config asks for at first start.
pub fn initial_ca_config(c: &crate::config::ConnectSettings) -> CaConfig {
    let d = CaConfig::default();
    CaConfig {
        leaf_cert_ttl: c.leaf_cert_ttl.clone().unwrap_or(d.leaf_cert_ttl),
        intermediate_cert_ttl: c.intermediate_cert_ttl.clone().unwrap_or(d.intermediate_cert_ttl),
        root_cert_ttl: c.root_cert_ttl.clone().unwrap_or(d.root_cert_ttl),
        private_key_type: c.private_key_type.clone().unwrap_or(d.private_key_type),
        private_key_bits: c.private_key_bits.unwrap_or(d.private_key_bits),
        csr_max_per_second: c.csr_max_per_second.unwrap_or(d.csr_max_per_second),
        csr_max_concurrent: c.csr_max_concurrent.unwrap_or(d.csr_max_concurrent),
        ..d
    }
}

/// The leader's mesh duties, run every leader tick.
pub struct MeshLeader {
    pub node: RaftNode,
    pub datacenter: String,
    pub primary: String,
    pub settings: crate::config::ConnectSettings,
    pub federation: crate::federation::Router,
    /// The primary's replication index this leader has applied.
    replicated: AtomicU64,
    last_prune: Mutex<Option<Instant>>,
    replicating: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The gateways last sent to the primary, when, and the send in flight.
    published: Mutex<(String, Option<Instant>)>,
    publishing: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How often a datacenter republishes unchanged gateways that the primary does not show yet.
const REPUBLISH: Duration = Duration::from_secs(5);

/// This datacenter's mesh gateways as a federation state lists them: Consul's
/// `CheckServiceNode`s without indexes or check output (so that only real changes count).
pub fn gateways_json(d: &crate::state::StateData, dc: &str) -> String {
    let list: Vec<serde_json::Value> = d
        .instances_of_kind("mesh-gateway")
        .iter()
        .map(|i| {
            let mut svc = crate::api::catalog::service_json(&i.service);
            if let Some(o) = svc.as_object_mut() {
                o.remove("CreateIndex");
                o.remove("ModifyIndex");
            }
            let mut node = crate::api::catalog::node_json(&i.node, dc);
            if let Some(o) = node.as_object_mut() {
                o.remove("CreateIndex");
                o.remove("ModifyIndex");
            }
            let checks: Vec<serde_json::Value> = i
                .checks
                .iter()
                .map(|c| {
                    serde_json::json!({"Node": c.node, "CheckID": c.check_id, "Name": c.name, "Status": c.status,
                        "ServiceID": c.service_id, "ServiceName": c.service_name})
                })
                .collect();
            serde_json::json!({ "Node": node, "Service": svc, "Checks": checks })
        })
        .collect();
    serde_json::to_string(&list).unwrap_or_else(|_| "[]".into())
}

impl MeshLeader {
    pub fn new(
        node: RaftNode,
        datacenter: String,
        primary: String,
        settings: crate::config::ConnectSettings,
        federation: crate::federation::Router,
    ) -> Arc<MeshLeader> {
        Arc::new(MeshLeader {
            node,
            datacenter,
            primary,
            settings,
            federation,
            replicated: AtomicU64::new(0),
            last_prune: Mutex::new(None),
            replicating: Mutex::new(None),
            published: Mutex::new((String::new(), None)),
            publishing: Mutex::new(None),
        })
    }

    fn is_primary(&self) -> bool {
        self.datacenter.eq_ignore_ascii_case(&self.primary)
    }

    /// Called every tick while this server leads; `leading` false stops the secondary's
    /// replication.
    pub async fn tick(self: &Arc<Self>, leading: bool, shutdown: &CancellationToken) {
        if !self.settings.enabled {
            return;
        }
        if !leading {
            if let Some(h) = self.replicating.lock().take() {
                h.abort();
            }
            return;
        }
        self.publish_gateways();
        if self.is_primary() {
            self.seed_ca().await;
            self.prune_roots().await;
        } else {
            let mut r = self.replicating.lock();
            if r.as_ref().is_none_or(|h| h.is_finished()) {
                let me = self.clone();
                let stop = shutdown.clone();
                *r = Some(tokio::spawn(async move { me.replicate(stop).await }));
            }
        }
    }

    /// Publish this datacenter's gateways to the primary when they differ from what the
    /// primary holds (as replicated here), at most every [`REPUBLISH`] for the same set.
    fn publish_gateways(self: &Arc<Self>) {
        let (gateways, stored) = {
            let store = self.node.store.read();
            let d = store.data();
            let stored = d.federation_states.get(&self.datacenter.to_ascii_lowercase()).map(|s| s.mesh_gateways.clone());
            (gateways_json(d, &self.datacenter), stored)
        };
        if stored.as_deref() == Some(gateways.as_str()) || (stored.is_none() && gateways == "[]") {
            return;
        }
        {
            let published = self.published.lock();
            if published.0 == gateways && published.1.is_some_and(|t| t.elapsed() < REPUBLISH) {
                return;
            }
        }
        let mut inflight = self.publishing.lock();
        if inflight.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        *self.published.lock() = (gateways.clone(), Some(Instant::now()));
        let me = self.clone();
        *inflight = Some(tokio::spawn(async move {
            let state = crate::state::federation::FederationState {
                datacenter: me.datacenter.clone(),
                mesh_gateways: gateways,
                updated_at: crate::duration::rfc3339(SystemTime::now()),
                ..Default::default()
            };
            let result = if me.is_primary() {
                me.node.write(Command::FederationStateSet { state }).await.map(|_| ()).map_err(|e| e.to_string())
            } else {
                let call = async {
                    let body = crate::rpc::encode(&ClusterRpc::FederationStateSet { state })?;
                    let reply = me.federation.call(&me.primary, Service::Cluster, body, RPC_TIMEOUT).await?;
                    crate::rpc::decode::<ClusterReply>(&reply)
                };
                match call.await {
                    Ok(ClusterReply::Applied { .. }) => Ok(()),
                    Ok(other) => Err(format!("unexpected reply {other:?}")),
                    Err(e) => Err(e.to_string()),
                }
            };
            match result {
                Ok(()) => info!(datacenter = %me.datacenter, "published this datacenter's mesh gateways"),
                Err(e) => warn!(primary = %me.primary, error = %e, "publishing this datacenter's mesh gateways failed; retrying"),
            }
        }));
    }

    async fn seed_ca(&self) {
        if self.node.store.read().data().connect_ca.is_some() {
            return;
        }
        let cluster_id = uuid::Uuid::new_v4().to_string();
        let config = initial_ca_config(&self.settings);
        let made = tokio::task::spawn_blocking({
            let (id, c) = (cluster_id.clone(), config.clone());
            move || ca::generate_root(&id, &c)
        })
        .await;
        let root = match made {
            Ok(Ok((root, _))) => root,
            Ok(Err(e)) => return warn!(error = %e, "creating the Connect CA failed (check connect.ca_config)"),
            Err(e) => return warn!(error = %e, "creating the Connect CA failed"),
        };
        let ca = ConnectCa { cluster_id, config, config_create_index: 0, config_modify_index: 0, roots: vec![root] };
        match self.node.write(Command::CaSet { ca: Box::new(ca), expect: 0 }).await {
            Ok((Outcome::Applied(true), _)) => info!("Connect CA created (built-in provider)"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "storing the Connect CA failed"),
        }
    }

    /// Hourly: drop roots rotated out longer ago than any leaf they signed can live.
    async fn prune_roots(&self) {
        {
            let mut last = self.last_prune.lock();
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Some(ca) = self.node.store.read().data().connect_ca.clone() else { return };
        if let Some(pruned) = ca::prune(&ca, now_ms()) {
            let expect = ca_version(&ca);
            match self.node.write(Command::CaSet { ca: Box::new(pruned), expect }).await {
                Ok(_) => info!("pruned CA roots no valid leaf needs"),
                Err(e) => warn!(error = %e, "pruning CA roots failed"),
            }
        }
    }

    /// A secondary's leader: follow the primary's CA and config entries, and keep an
    /// intermediate signed by its active root.
    async fn replicate(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = RETRY_MIN;
        loop {
            let min = self.replicated.load(Ordering::Relaxed);
            let req = ClusterRpc::MeshState { min_index: min };
            let call = async {
                let body = crate::rpc::encode(&req)?;
                let reply = self.federation.call(&self.primary, Service::Cluster, body, REPLICATION_WAIT + RPC_TIMEOUT).await?;
                crate::rpc::decode::<ClusterReply>(&reply)
            };
            let got = tokio::select! {
                _ = stop.cancelled() => return,
                r = call => r,
            };
            match got {
                Ok(ClusterReply::MeshState(state)) => {
                    backoff = RETRY_MIN;
                    if let Err(e) = self.apply_replicated(*state).await {
                        warn!(primary = %self.primary, error = %e, "mesh replication from the primary datacenter failed; retrying");
                        tokio::time::sleep(backoff).await;
                    }
                }
                Ok(_) => warn!("unexpected reply to a mesh replication request"),
                Err(e) => {
                    debug!(primary = %self.primary, error = %e, "the primary datacenter is not reachable for mesh replication");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    async fn apply_replicated(&self, state: MeshState) -> Result<(), String> {
        // Config entries: the primary's whole set.
        let local: Vec<_> = self.node.store.read().data().config_entries.values().cloned().collect();
        let same = local.len() == state.entries.len()
            && local.iter().zip(&state.entries).all(|(a, b)| a.kind == b.kind && a.name == b.name && a.json == b.json);
        if !same {
            self.node.write(Command::ConfigReplicate { entries: state.entries.clone() }).await.map_err(|e| e.to_string())?;
        }
        // Federation states: the primary's whole set.
        let local: Vec<_> = self.node.store.read().data().federation_states.values().cloned().collect();
        let same = local.len() == state.federation_states.len()
            && local.iter().zip(&state.federation_states).all(|(a, b)| {
                a.datacenter.eq_ignore_ascii_case(&b.datacenter) && a.mesh_gateways == b.mesh_gateways && a.primary_modify_index == b.modify_index
            });
        if !same {
            self.node.write(Command::FederationReplicate { states: state.federation_states.clone() }).await.map_err(|e| e.to_string())?;
        }
        if let Some(primary_ca) = &state.ca {
            self.follow_ca(primary_ca).await?;
        }
        self.replicated.store(state.index, Ordering::Relaxed);
        Ok(())
    }

    /// Mirror the primary's roots, with this datacenter's own intermediate (signed by the
    /// primary's active root) as the leaf signer; a new intermediate when the active root
    /// changed or half of the intermediate's life has passed.
    async fn follow_ca(&self, primary_ca: &ConnectCa) -> Result<(), String> {
        let local = self.node.store.read().data().connect_ca.clone();
        let primary_active = primary_ca.active_root().ok_or("the primary's CA has no active root")?;
        let current_signer = local.as_ref().and_then(|l| l.active_root().filter(|r| r.id == primary_active.id && !r.signing_key.is_empty()).cloned());
        let fresh = current_signer.as_ref().and_then(|r| ca::cert_info(&r.signing_cert)).is_some_and(|info| {
            let life = info.not_after.duration_since(info.not_before).unwrap_or_default();
            SystemTime::now() < info.not_before + life / 2
        });
        let roots_same = local.as_ref().is_some_and(|l| {
            l.roots.len() == primary_ca.roots.len()
                && l.roots.iter().zip(&primary_ca.roots).all(|(a, b)| a.id == b.id && a.active == b.active && a.root_cert == b.root_cert)
        });
        if fresh && roots_same && local.as_ref().is_some_and(|l| l.config == primary_ca.config && l.cluster_id == primary_ca.cluster_id) {
            return Ok(());
        }
        let mut next = primary_ca.clone();
        let (signing_cert, signing_key, inter) = match (&current_signer, fresh) {
            (Some(r), true) => (r.signing_cert.clone(), r.signing_key.clone(), r.signing_cert.clone()),
            _ => {
                let (csr, key) = ca::intermediate_csr(&primary_ca.trust_domain(), &primary_ca.config).map_err(|e| e.to_string())?;
                let req = ClusterRpc::SignIntermediate { datacenter: self.datacenter.clone(), csr };
                let body = crate::rpc::encode(&req).map_err(|e| e.to_string())?;
                let reply = self.federation.call(&self.primary, Service::Cluster, body, RPC_TIMEOUT).await.map_err(|e| e.to_string())?;
                let cert = match crate::rpc::decode::<ClusterReply>(&reply).map_err(|e| e.to_string())? {
                    ClusterReply::Intermediate { cert_pem } => cert_pem,
                    _ => return Err("unexpected reply to an intermediate signing request".into()),
                };
                info!(primary = %self.primary, "intermediate CA signed by the primary datacenter");
                (cert.clone(), key, cert)
            }
        };
        let info = ca::cert_info(&signing_cert).ok_or("the intermediate does not parse")?;
        for r in &mut next.roots {
            r.signing_key.clear();
            r.signing_cert.clear();
            if r.active {
                r.intermediate_certs.push(inter.clone());
                r.signing_cert = signing_cert.clone();
                r.signing_key = signing_key.clone();
                r.signing_key_id = info.key_id.clone();
            }
        }
        let expect = local.as_ref().map_or(0, ca_version);
        match self.node.write(Command::CaSet { ca: Box::new(next), expect }).await.map_err(|e| e.to_string())? {
            (Outcome::Applied(true), _) => Ok(()),
            _ => Err("the CA changed while it was being replicated".into()),
        }
    }
}

/// The version a CA write must name (`Command::CaSet::expect`).
pub fn ca_version(ca: &ConnectCa) -> u64 {
    ca.version()
}

/// A leaf as an agent holds it.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub service: String,
    pub service_uri: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: String,
    pub valid_after: SystemTime,
    pub valid_before: SystemTime,
    pub authority_key_id: String,
    /// Changes at every renewal (the index blocking readers wait on).
    pub index: u64,
}

impl Leaf {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "SerialNumber": self.serial, "CertPEM": self.cert_pem, "PrivateKeyPEM": self.key_pem,
            "Service": self.service, "ServiceURI": self.service_uri,
            "ValidAfter": crate::duration::rfc3339(self.valid_after), "ValidBefore": crate::duration::rfc3339(self.valid_before),
            "CreateIndex": self.index, "ModifyIndex": self.index,
        })
    }
}

/// Where an agent's leaves are signed and its view of the roots comes from.
#[derive(Clone)]
pub enum MeshUpstream {
    /// A server: its own state.
    Local { node: RaftNode, signer: Arc<Signer> },
    /// A client agent: the servers, over RPC.
    Remote { rpc: RpcClient, servers: Arc<dyn Fn() -> Vec<SocketAddr> + Send + Sync> },
}

impl MeshUpstream {
    async fn call(&self, req: &ClusterRpc, timeout: Duration) -> Result<ClusterReply, RpcError> {
        let MeshUpstream::Remote { rpc, servers } = self else { return Err(RpcError::new(ErrorCode::Internal, "not a remote upstream")) };
        let mut last = RpcError::new(ErrorCode::Unreachable, "No known Consul servers");
        for s in servers() {
            match rpc.call_typed::<ClusterRpc, ClusterReply>(s, Service::Cluster, req, timeout).await {
                Ok(r) => return Ok(r),
                Err(e) if e.code == ErrorCode::Unreachable || e.code == ErrorCode::Timeout => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    async fn sign(&self, csr: Vec<u8>) -> Result<SignedLeaf, RpcError> {
        match self {
            MeshUpstream::Local { signer, .. } => signer.sign_leaf(&csr).await,
            MeshUpstream::Remote { .. } => match self.call(&ClusterRpc::SignLeaf { csr }, RPC_TIMEOUT).await? {
                ClusterReply::Leaf(l) => Ok(*l),
                _ => Err(RpcError::new(ErrorCode::Internal, "unexpected reply to a signing request")),
            },
        }
    }

    /// The roots as this agent sees them.
    pub async fn roots(&self) -> Result<Option<ConnectCa>, RpcError> {
        match self {
            MeshUpstream::Local { node, .. } => Ok(node.store.read().data().connect_ca.as_ref().map(public_ca)),
            MeshUpstream::Remote { .. } => match self.call(&ClusterRpc::CaRoots, RPC_TIMEOUT).await? {
                ClusterReply::CaRoots(c) => Ok(c.map(|c| *c)),
                _ => Err(RpcError::new(ErrorCode::Internal, "unexpected reply to a roots request")),
            },
        }
    }

    /// Wait until the roots may have changed: a server watches its state; a client checks
    /// with the servers every few seconds.
    async fn roots_changed(&self, seen: &str) {
        match self {
            MeshUpstream::Local { node, .. } => {
                let mut w = node.store.read().watch(Table::ConnectCa);
                loop {
                    let id = node.store.read().data().connect_ca.as_ref().and_then(|c| c.active_root().map(|r| r.signing_key_id.clone()));
                    if id.as_deref().is_some_and(|id| id != seen) {
                        return;
                    }
                    if w.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                }
            }
            MeshUpstream::Remote { .. } => loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if let Ok(Some(ca)) = self.roots().await
                    && ca.active_root().is_some_and(|r| r.signing_key_id != seen)
                {
                    return;
                }
            },
        }
    }
}

struct LeafEntry {
    latest: watch::Sender<Option<Arc<Leaf>>>,
    /// The error of the first signing, for the readers waiting on it.
    first_error: Mutex<Option<RpcError>>,
}

/// The agent's leaf certificates, one per service name asked for.
#[derive(Clone)]
pub struct LeafCache {
    inner: Arc<LeafInner>,
}

struct LeafInner {
    upstream: MeshUpstream,
    datacenter: String,
    entries: Mutex<HashMap<String, Arc<LeafEntry>>>,
    index: AtomicU64,
    shutdown: CancellationToken,
}

impl LeafCache {
    pub fn new(upstream: MeshUpstream, datacenter: String, shutdown: CancellationToken) -> LeafCache {
        LeafCache { inner: Arc::new(LeafInner { upstream, datacenter, entries: Mutex::new(HashMap::new()), index: AtomicU64::new(1), shutdown }) }
    }

    pub fn upstream(&self) -> &MeshUpstream {
        &self.inner.upstream
    }

    /// The leaf of `service`; with `min_index`, wait (until `deadline`) for one newer than it.
    pub async fn get(&self, service: &str, min_index: Option<u64>, deadline: tokio::time::Instant) -> Result<Arc<Leaf>, RpcError> {
        let entry = {
            let mut entries = self.inner.entries.lock();
            match entries.get(service) {
                Some(e) => e.clone(),
                None => {
                    let e = Arc::new(LeafEntry { latest: watch::channel(None).0, first_error: Mutex::new(None) });
                    entries.insert(service.to_string(), e.clone());
                    tokio::spawn(self.clone().keep_fresh(service.to_string(), e.clone()));
                    e
                }
            }
        };
        let mut rx = entry.latest.subscribe();
        loop {
            if let Some(leaf) = rx.borrow_and_update().clone()
                && (min_index.is_none_or(|m| leaf.index != m) || tokio::time::Instant::now() >= deadline)
            {
                return Ok(leaf);
            }
            if let Some(e) = entry.first_error.lock().clone() {
                return Err(e);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(RpcError::new(ErrorCode::Internal, "leaf cache stopped")),
                Err(_) => {
                    let latest = entry.latest.borrow().clone();
                    return latest.ok_or_else(|| RpcError::new(ErrorCode::Timeout, "no leaf certificate yet"));
                }
            }
        }
    }

    async fn issue(&self, service: &str) -> Result<Leaf, RpcError> {
        let ca = self.inner.upstream.roots().await?.ok_or_else(|| RpcError::new(ErrorCode::NotFound, "CA has not finished initializing"))?;
        let uri = crate::connect::spiffe::service_uri(&ca.trust_domain(), &self.inner.datacenter, service);
        let (csr, key_pem) = tokio::task::spawn_blocking(move || ca::leaf_csr(&uri))
            .await
            .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))?;
        let signed = self.inner.upstream.sign(csr).await?;
        let aki = ca::cert_info(&signed.cert_pem).map(|i| i.authority_key_id).unwrap_or_default();
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        Ok(Leaf {
            service: service.to_string(),
            service_uri: signed.service_uri,
            cert_pem: signed.cert_pem,
            key_pem,
            serial: signed.serial,
            valid_after: at(signed.valid_after_ms),
            valid_before: at(signed.valid_before_ms),
            authority_key_id: aki,
            index: self.inner.index.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }

    /// Issue the first leaf of `service`, then renew it for as long as the agent runs.
    async fn keep_fresh(self, service: String, entry: Arc<LeafEntry>) {
        let stop = self.inner.shutdown.clone();
        let mut backoff = RETRY_MIN;
        loop {
            let leaf = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.issue(&service) => r,
            };
            let leaf = match leaf {
                Ok(l) => {
                    backoff = RETRY_MIN;
                    *entry.first_error.lock() = None;
                    Arc::new(l)
                }
                Err(e) => {
                    if entry.latest.borrow().is_none() {
                        // The first leaf failed: readers get the error (a 429 for the rate
                        // limit) and the next one starts over.
                        *entry.first_error.lock() = Some(e.clone());
                        entry.latest.send_modify(|_| {});
                        self.inner.entries.lock().remove(&service);
                        return;
                    }
                    debug!(%service, error = %e, "renewing a leaf certificate failed; keeping the current one");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(jittered(backoff)) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            };
            entry.latest.send_replace(Some(leaf.clone()));
            let renew_at = soft_expiry(leaf.valid_after, leaf.valid_before);
            let wait = renew_at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.upstream.roots_changed(&leaf.authority_key_id) => {
                    // Every agent renews within the jitter window, not all at once.
                    tokio::time::sleep(jittered(ROOT_CHANGE_JITTER)).await;
                }
            }
        }
    }
}

fn jittered(max: Duration) -> Duration {
    use rand::RngExt;
    Duration::from_millis(rand::rng().random_range(0..=max.as_millis().max(1) as u64))
}

/// When to renew a leaf: at a random point between 60 % and 90 % of its life (now, if that
/// window has passed or the leaf lives less than ten minutes).
fn soft_expiry(valid_after: SystemTime, valid_before: SystemTime) -> SystemTime {
    let life = valid_before.duration_since(valid_after).unwrap_or_default();
    let now = SystemTime::now();
    if life < Duration::from_secs(600) {
        return now;
    }
    let start = (valid_after + life.mul_f64(0.6)).max(now);
    let end = valid_after + life.mul_f64(0.9);
    if start >= end {
        return now;
    }
    start + jittered(end.duration_since(start).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_renew_between_60_and_90_percent_of_their_life() {
        let now = SystemTime::now();
        let after = now - Duration::from_secs(3600);
        let before = after + Duration::from_secs(72 * 3600);
        for _ in 0..50 {
            let at = soft_expiry(after, before);
            let frac = at.duration_since(after).unwrap().as_secs_f64() / (72.0 * 3600.0);
            assert!((0.6..=0.9001).contains(&frac), "{frac}");
        }
        let late = now - Duration::from_secs(95 * 3600);
        assert!(soft_expiry(late, late + Duration::from_secs(100 * 3600)) <= SystemTime::now() + Duration::from_secs(1));
    }
}
