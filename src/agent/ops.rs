//! `AgentOps` for this agent: the API's agent endpoints answered from the local state, gossip
//! and (on servers) Raft.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long an agent endpoint that changed a service or check waits for the catalog to follow
/// (Consul syncs before answering); past it, the request succeeds and anti-entropy goes on.
const SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

use super::local::checks::Status;
use super::local::{LocalAgent, Origin};
use crate::api::ApiError;
use crate::api::agent::AgentOps;
use crate::cluster::RaftNode;
use crate::cluster::{ClusterReply, ClusterRpc, KeyringOp};
use crate::membership::{Gossip, Member, MemberStatus, UserEvent};

/// Serf's member status codes, which Consul's API reports as numbers.
const MEMBER_ALIVE: u8 = 1;
const MEMBER_LEFT: u8 = 3;
const MEMBER_FAILED: u8 = 4;

/// The internal event that carries keyring changes to every member (never listed).
const KEYRING_EVENT: &str = "_trellis-keyring";
/// Gossip tags advertising which keys a member holds, by fingerprint.
const KEYS_TAG: &str = "kr";
const PRIMARY_KEY_TAG: &str = "krp";

/// A short, non-secret fingerprint of a gossip key (the first 4 bytes of its SHA-256).
pub fn key_fingerprint(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.trim().as_bytes()).as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The tags that advertise `keyring`'s keys.
pub fn keyring_tags(keyring: &crate::membership::keyring::Keyring) -> [(String, String); 2] {
    let all: Vec<String> = keyring.list().iter().map(|k| key_fingerprint(k)).collect();
    [(KEYS_TAG.into(), all.join(",")), (PRIMARY_KEY_TAG.into(), key_fingerprint(&keyring.primary()))]
}

fn apply_keyring(gossip: &Gossip, op: &str, key: &str) -> Result<(), String> {
    let ring = gossip.keyring().ok_or("Gossip encryption is not enabled on this agent")?;
    match op {
        "install" => ring.install(key).or_else(|e| if ring.list().iter().any(|k| k == key) { Ok(()) } else { Err(e) }),
        "use" => ring.use_key(key),
        "remove" => ring.remove(key).or_else(|e| if ring.list().iter().any(|k| k == key) { Err(e) } else { Ok(()) }),
        other => return Err(format!("unknown keyring operation {other:?}")),
    }
    .map_err(|e| e.to_string())
}

/// Re-advertise this member's keys after a keyring change.
async fn publish_keys(gossip: &Gossip) {
    let Some(ring) = gossip.keyring() else { return };
    let me = gossip.local_name().to_string();
    let Some(mut tags) = gossip.members().into_iter().find(|m| m.name == me).map(|m| m.tags) else { return };
    tags.extend(keyring_tags(&ring));
    if let Err(e) = gossip.set_tags(tags).await {
        tracing::warn!(error = %e, "could not advertise the new keyring");
    }
}

/// Consul keeps the last 256 user events an agent received.
const EVENT_BUFFER: usize = 256;

/// User events this agent accepted, newest last.
pub struct EventLog {
    buf: Mutex<VecDeque<Value>>,
    index: watch::Sender<u64>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog { buf: Mutex::new(VecDeque::new()), index: watch::channel(0).0 }
    }
}

fn event_json(e: &UserEvent) -> Value {
    use base64::Engine;
    json!({
        "ID": e.id, "Name": e.name,
        "Payload": if e.payload.is_empty() { Value::Null } else { json!(base64::engine::general_purpose::STANDARD.encode(&e.payload)) },
        "NodeFilter": e.node_filter, "ServiceFilter": e.service_filter, "TagFilter": e.tag_filter,
        "Version": 1, "LTime": e.ltime,
    })
}

/// Whether an event is meant for this agent: its node name and (when given) one of its
/// services and tags must match the event's regular expressions.
fn accepts(e: &UserEvent, node: &str, services: &[crate::state::Service]) -> bool {
    let matches = |re: &str, s: &str| re.is_empty() || regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(s));
    if !matches(&e.node_filter, node) {
        return false;
    }
    if e.service_filter.is_empty() {
        return true;
    }
    services.iter().any(|s| matches(&e.service_filter, &s.service) && (e.tag_filter.is_empty() || s.tags.iter().any(|t| matches(&e.tag_filter, t))))
}

impl EventLog {
    /// Take events from gossip until shutdown, keeping the ones addressed to this agent.
    pub async fn run(self: Arc<Self>, gossip: Gossip, local: LocalAgent, shutdown: CancellationToken) {
        let mut rx = gossip.events();
        loop {
            let e = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = rx.recv() => match e {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
            };
            if e.name == KEYRING_EVENT {
                let text = String::from_utf8_lossy(&e.payload).into_owned();
                if let Some((op, key)) = text.split_once(':') {
                    match apply_keyring(&gossip, op, key) {
                        Ok(()) => publish_keys(&gossip).await,
                        Err(err) => tracing::warn!(op, error = %err, "keyring change from the cluster not applied"),
                    }
                }
                continue;
            }
            let (services, _) = local.desired();
            if !accepts(&e, &local.node().name, &services) {
                continue;
            }
            let mut buf = self.buf.lock();
            if buf.len() == EVENT_BUFFER {
                buf.pop_front();
            }
            buf.push_back(event_json(&e));
            self.index.send_modify(|i| *i += 1);
        }
    }
}

pub struct AgentHandle {
    pub events: Arc<EventLog>,
    pub local: LocalAgent,
    pub gossip: Gossip,
    pub raft: Option<RaftNode>,
    pub datacenter: String,
    pub serf_lan_port: u16,
    /// The WAN pool (servers only).
    pub wan: Option<Gossip>,
    pub serf_wan_port: u16,
    /// Routes to other datacenters (servers only), for keyring changes.
    pub federation: Option<crate::federation::Router>,
    /// RPC to the servers (a client agent's keyring changes).
    pub rpc: crate::rpc::RpcClient,
    /// The leaf certificates of this agent's services (and any other it is asked for).
    pub leaves: super::mesh::LeafCache,
    pub connect_enabled: bool,
    /// Cancelled by `/v1/agent/leave`, which stops the agent after it leaves.
    pub shutdown: CancellationToken,
    /// Re-read configuration (SIGHUP and `/v1/agent/reload`).
    pub reload: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

/// How long a keyring change may take in another datacenter.
const KEYRING_FANOUT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

impl AgentHandle {
    /// Make a keyring change in this datacenter's pool (a gossip broadcast reaches every
    /// member) and, with `fan_out`, ask a server of every other datacenter to make it in
    /// theirs: their servers share the WAN pool's key. Returns the datacenters where it failed.
    pub async fn keyring_in_cluster(&self, op: KeyringOp, key: String, fan_out: bool) -> Result<Vec<String>, String> {
        let name = match op {
            KeyringOp::Install => "install",
            KeyringOp::Use => "use",
            KeyringOp::Remove => "remove",
        };
        apply_keyring(&self.gossip, name, &key)?;
        publish_keys(&self.gossip).await;
        let ev = UserEvent {
            id: String::new(),
            name: KEYRING_EVENT.into(),
            payload: format!("{name}:{key}").into_bytes(),
            node_filter: String::new(),
            service_filter: String::new(),
            tag_filter: String::new(),
            ltime: 0,
        };
        self.gossip.fire_event(ev).map_err(|e| e.to_string())?;
        let mut failed = Vec::new();
        let Some(router) = self.federation.as_ref().filter(|_| fan_out) else { return Ok(failed) };
        for dc in router.datacenters().into_iter().filter(|dc| !router.is_local(dc)) {
            let req = ClusterRpc::Keyring { op, key: key.clone() };
            let reply = match crate::rpc::encode(&req) {
                Ok(body) => router.call(&dc, crate::rpc::Service::Cluster, body, KEYRING_FANOUT_TIMEOUT).await,
                Err(e) => Err(e),
            };
            match reply.and_then(|b| crate::rpc::decode::<ClusterReply>(&b)) {
                Ok(ClusterReply::Keyring { .. }) => {}
                Ok(_) => failed.push(format!("{dc}: unexpected reply")),
                Err(e) => failed.push(format!("{dc}: {e}")),
            }
        }
        Ok(failed)
    }

    /// A client agent's keyring change: a server of its datacenter makes it everywhere.
    async fn keyring_through_server(&self, op: KeyringOp, key: String) -> Result<Vec<String>, ApiError> {
        let servers = alive_servers(&self.gossip, &self.datacenter);
        let mut last = ApiError::Internal("No known Consul servers".into());
        for s in servers {
            let req = ClusterRpc::Keyring { op, key: key.clone() };
            match self.rpc.call_typed::<ClusterRpc, ClusterReply>(s, crate::rpc::Service::Cluster, &req, KEYRING_FANOUT_TIMEOUT).await {
                Ok(ClusterReply::Keyring { failed }) => return Ok(failed),
                Ok(_) => last = ApiError::Internal("unexpected reply to a keyring change".into()),
                Err(e) if e.code == crate::rpc::ErrorCode::BadRequest => return Err(ApiError::BadRequest(e.message)),
                Err(e) => last = ApiError::Internal(format!("{s}: {e}")),
            }
        }
        Err(last)
    }
}

pub fn member_json(m: &Member) -> Value {
    let status = match m.status {
        MemberStatus::Alive => MEMBER_ALIVE,
        MemberStatus::Left => MEMBER_LEFT,
        MemberStatus::Failed => MEMBER_FAILED,
    };
    json!({
        "Name": m.name, "Addr": m.addr.ip().to_string(), "Port": m.addr.port(), "Tags": m.tags, "Status": status,
        "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2, "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
    })
}

/// Servers of `dc` that gossip says are alive, by RPC address.
pub fn alive_servers(gossip: &Gossip, dc: &str) -> Vec<SocketAddr> {
    gossip
        .members()
        .into_iter()
        .filter(|m| {
            m.status == MemberStatus::Alive
                && m.tags.get("role").map(String::as_str) == Some("consul")
                && m.tags.get("dc").map(String::as_str) == Some(dc)
        })
        .filter_map(|m| m.tags.get("port").and_then(|p| p.parse::<u16>().ok()).map(|p| SocketAddr::new(m.addr.ip(), p)))
        .collect()
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

impl AgentOps for AgentHandle {
    fn leaf(&self, service: String, min_index: Option<u64>, deadline: tokio::time::Instant) -> BoxFuture<'_, Result<(Value, u64), ApiError>> {
        async move {
            if !self.connect_enabled {
                return Err(ApiError::Internal("Connect must be enabled in order to use this endpoint".into()));
            }
            match self.leaves.get(&service, min_index, deadline).await {
                Ok(l) => Ok((l.json(), l.index)),
                Err(e) if e.code == crate::rpc::ErrorCode::RateLimited => Err(ApiError::TooMany(e.message)),
                Err(e) if e.code == crate::rpc::ErrorCode::BadRequest => Err(ApiError::BadRequest(e.message)),
                Err(e) => Err(ApiError::Internal(e.message)),
            }
        }
        .boxed()
    }

    fn members(&self, wan: bool) -> Vec<Value> {
        if wan {
            // Only servers are in the WAN pool (as `<node>.<dc>`); a client agent has none.
            return self.wan.as_ref().map(|w| w.members().iter().map(member_json).collect()).unwrap_or_default();
        }
        self.gossip.members().iter().map(member_json).collect()
    }

    fn member_self(&self) -> Value {
        let me = &self.local.node().name;
        self.gossip.members().iter().find(|m| &m.name == me).map(member_json).unwrap_or(Value::Null)
    }

    fn servers(&self) -> Vec<SocketAddr> {
        alive_servers(&self.gossip, &self.datacenter)
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.local.changes()
    }

    fn services(&self) -> Value {
        self.local.services_json()
    }

    fn checks(&self) -> Value {
        self.local.checks_json()
    }

    fn service_health(&self, id: &str) -> Option<(String, Value)> {
        self.local.service_status(id)
    }

    fn service_health_by_name(&self, name: &str) -> Vec<(String, Value)> {
        self.local.service_status_by_name(name)
    }

    fn register_service(&self, body: Bytes, replace_existing_checks: bool, peer: Option<std::net::IpAddr>) -> BoxFuture<'_, Result<(), ApiError>> {
        async move {
            self.local.add_service(LocalAgent::decode_body(&body)?, Origin::of_api_peer(peer), replace_existing_checks)?;
            self.local.wait_synced(SYNC_WAIT).await;
            Ok(())
        }
        .boxed()
    }

    fn deregister_service(&self, id: String) -> BoxFuture<'_, Result<(), ApiError>> {
        async move {
            self.local.remove_service(&id)?;
            self.local.wait_synced(SYNC_WAIT).await;
            Ok(())
        }
        .boxed()
    }

    fn register_check(&self, body: Bytes, peer: Option<std::net::IpAddr>) -> BoxFuture<'_, Result<(), ApiError>> {
        async move {
            self.local.add_check(LocalAgent::decode_body(&body)?, Origin::of_api_peer(peer))?;
            self.local.wait_synced(SYNC_WAIT).await;
            Ok(())
        }
        .boxed()
    }

    fn deregister_check(&self, id: String) -> BoxFuture<'_, Result<(), ApiError>> {
        async move {
            self.local.remove_check(&id)?;
            self.local.wait_synced(SYNC_WAIT).await;
            Ok(())
        }
        .boxed()
    }

    fn update_ttl(&self, id: &str, status: &str, output: String) -> Result<(), ApiError> {
        let s = match status {
            "passing" => Status::Passing,
            "warning" => Status::Warning,
            _ => Status::Critical,
        };
        self.local.ttl(id, s, output)
    }

    fn service_maintenance(&self, id: &str, enable: bool, reason: String) -> Result<(), ApiError> {
        self.local.maintenance(Some(id), enable, reason)
    }

    fn node_maintenance(&self, enable: bool, reason: String) -> Result<(), ApiError> {
        self.local.maintenance(None, enable, reason)
    }

    fn join(&self, addr: String, wan: bool) -> BoxFuture<'_, Result<(), ApiError>> {
        async move {
            let (pool, port) = match (wan, &self.wan) {
                (false, _) => (&self.gossip, self.serf_lan_port),
                (true, Some(w)) => (w, self.serf_wan_port),
                (true, None) => return Err(bad("this agent is not in a WAN pool: only servers with a WAN gossip port join one")),
            };
            let target = if addr.contains(':') { addr.clone() } else { format!("{addr}:{port}") };
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&target).await.map_err(|e| bad(format!("cannot resolve {addr}: {e}")))?.collect();
            let n = pool.join(&addrs).await.map_err(bad)?;
            if n == 0 {
                return Err(ApiError::Internal(format!("Unable to join {addr}: no answer")));
            }
            Ok(())
        }
        .boxed()
    }

    fn leave(&self) -> BoxFuture<'_, Result<(), ApiError>> {
        async move {
            self.gossip.leave(std::time::Duration::from_secs(5)).await.map_err(|e| ApiError::Internal(e.to_string()))?;
            self.shutdown.cancel();
            Ok(())
        }
        .boxed()
    }

    fn force_leave(&self, node: &str) -> Result<(), ApiError> {
        self.gossip.force_leave(node).map_err(bad)
    }

    fn reload(&self) -> Result<(), ApiError> {
        (self.reload)().map_err(ApiError::BadRequest)
    }

    fn stats(&self) -> Value {
        let members = self.gossip.members();
        let (services, checks) = self.local.desired();
        let mut stats = json!({
            "agent": { "checks": checks.len().to_string(), "services": services.len().to_string() },
            "serf_lan": {
                "members": members.len().to_string(),
                "failed": members.iter().filter(|m| m.status == MemberStatus::Failed).count().to_string(),
                "left": members.iter().filter(|m| m.status == MemberStatus::Left).count().to_string(),
                "encrypted": self.gossip.keyring().is_some().to_string(),
            },
            "build": { "version": crate::api::version(), "prerelease": "", "revision": "" },
        });
        let consul = match &self.raft {
            Some(node) => {
                let m = node.raft.metrics().borrow().clone();
                let leader = node.leader();
                stats["raft"] = json!({
                    "state": format!("{:?}", m.state),
                    "term": m.current_term.to_string(),
                    "last_log_index": m.last_log_index.unwrap_or(0).to_string(),
                    "applied_index": m.last_applied.map(|l| l.index).unwrap_or(0).to_string(),
                    "last_snapshot_index": m.snapshot.map(|l| l.index).unwrap_or(0).to_string(),
                    "num_peers": m.membership_config.membership().voter_ids().filter(|id| *id != node.id).count().to_string(),
                });
                json!({
                    "server": "true",
                    "leader": (leader.as_ref().map(|l| l.0) == Some(node.id)).to_string(),
                    "leader_addr": leader.map(|l| l.1.rpc_addr).unwrap_or_default(),
                    "known_datacenters": "1",
                })
            }
            None => json!({ "server": "false", "known_servers": self.servers().len().to_string(), "known_datacenters": "1" }),
        };
        stats["consul"] = consul;
        stats
    }

    fn fire_event(&self, name: String, payload: Vec<u8>, node: String, service: String, tag: String) -> Result<Value, ApiError> {
        let ev =
            UserEvent { id: uuid::Uuid::new_v4().to_string(), name, payload, node_filter: node, service_filter: service, tag_filter: tag, ltime: 0 };
        self.gossip.fire_event(ev.clone()).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(event_json(&ev))
    }

    fn events(&self) -> (Vec<Value>, u64) {
        let buf = self.events.buf.lock();
        (buf.iter().cloned().collect(), *self.events.index.borrow())
    }

    fn event_changes(&self) -> watch::Receiver<u64> {
        self.events.index.subscribe()
    }

    fn keyring_list(&self) -> Result<Value, ApiError> {
        let ring = self.gossip.keyring().ok_or_else(|| ApiError::BadRequest("Gossip encryption is not enabled on this agent".into()))?;
        let alive: Vec<Member> = self.gossip.members().into_iter().filter(|m| m.status == MemberStatus::Alive).collect();
        let count = |tag: &str, fp: &str| alive.iter().filter(|m| m.tags.get(tag).is_some_and(|t| t.split(',').any(|x| x == fp))).count();
        let mut keys = serde_json::Map::new();
        let mut primary = serde_json::Map::new();
        for k in ring.list() {
            let fp = key_fingerprint(&k);
            keys.insert(k.clone(), json!(count(KEYS_TAG, &fp)));
            let p = count(PRIMARY_KEY_TAG, &fp);
            if p > 0 {
                primary.insert(k, json!(p));
            }
        }
        Ok(json!([{ "WAN": false, "Datacenter": self.datacenter, "Segment": "", "Keys": keys, "PrimaryKeys": primary, "NumNodes": alive.len() }]))
    }

    fn keyring_change(&self, op: KeyringOp, key: String) -> BoxFuture<'_, Result<(), ApiError>> {
        async move {
            let failed = match &self.raft {
                // A server makes the change here and in every other datacenter.
                Some(_) => self.keyring_in_cluster(op, key, true).await.map_err(ApiError::BadRequest)?,
                // A client agent asks a server to, which can reach the other datacenters.
                None => self.keyring_through_server(op, key).await?,
            };
            if failed.is_empty() {
                Ok(())
            } else {
                Err(ApiError::Internal(format!("the keyring change was applied in {} but failed in {}", self.datacenter, failed.join("; "))))
            }
        }
        .boxed()
    }
}
