//! Duties of the leader, run once a second while this server leads: keep the catalog's record
//! of the servers true (node, `consul` service, `serfHealth` check), expire sessions whose TTL
//! lapsed, and run autopilot (server health, dead-server cleanup).

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use openraft::ChangeMembers;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::operator::{AutopilotHealth, ServerHealth};
use crate::api::session::parse_ttl;
use crate::cluster::RaftNode;
use crate::cluster::sessions::SessionTimers;
use crate::consensus::{NodeId, ServerNode};
use crate::membership::{Gossip, Member, MemberStatus};
use crate::state::{CheckStatus, Command, HealthCheck, Node, Registration, Service};

const TICK: Duration = Duration::from_secs(1);
/// A server that has not answered the leader for this long counts as failed: its
/// `serfHealth` turns critical and autopilot may remove it.
pub const SERVER_FAILED_AFTER: Duration = Duration::from_secs(10);
/// The service every server registers, as Consul's servers do.
const SERVER_SERVICE: &str = "consul";
/// How long a new leader waits before removing catalog nodes its gossip view does not know,
/// so that a restart does not deregister (and invalidate the sessions of) live nodes.
const REAP_GRACE: Duration = Duration::from_secs(30);
const SERF_CHECK: &str = "serfHealth";

pub struct LeaderWorker {
    pub node: RaftNode,
    pub gossip: Gossip,
    pub datacenter: String,
    pub sessions: SessionTimers,
    pub health: Arc<Mutex<AutopilotHealth>>,
    /// The configured autopilot settings, stored once if the cluster has none yet.
    pub autopilot: crate::config::AutopilotSettings,
    pub domain: String,
    /// How long deleted KV keys are remembered (`tombstone_ttl`).
    pub tombstone_ttl: Duration,
    /// The Connect CA and the replication of the mesh's state.
    pub mesh: std::sync::Arc<super::mesh::MeshLeader>,
}

struct Tenure {
    since: Instant,
    stable_since: HashMap<NodeId, (bool, SystemTime)>,
    /// (when, applied index then), one per tick: a tombstone at or below the index applied
    /// `tombstone_ttl` ago is old enough to reap.
    applied_at: std::collections::VecDeque<(Instant, u64)>,
}

impl LeaderWorker {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tenure: Option<Tenure> = None;
        let mut metrics = self.node.raft.metrics();
        let mut next_tick = tokio::time::Instant::now();
        loop {
            // Run every tick, and at once when leadership changes; other Raft metric changes
            // (one per write) only wake the loop to look.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next_tick) => {}
                r = metrics.changed() => if r.is_err() { return },
            }
            let leading = self.node.is_leader();
            if leading == tenure.is_some() && tokio::time::Instant::now() < next_tick {
                continue;
            }
            next_tick = tokio::time::Instant::now() + TICK;
            if !leading {
                if tenure.take().is_some() {
                    self.sessions.clear();
                    self.mesh.tick(false, &shutdown).await;
                }
                continue;
            }
            let t = tenure.get_or_insert_with(|| {
                info!("leader duties started");
                self.sessions.clear();
                Tenure { since: Instant::now(), stable_since: HashMap::new(), applied_at: Default::default() }
            });
            self.seed_autopilot().await;
            self.seed_agent_ca().await;
            self.mesh.tick(true, &shutdown).await;
            let alive = self.liveness(t.since);
            // A new leader's gossip view may still be filling in (a restart, a join in
            // progress): only reap nodes gossip does not know once it has had time to learn.
            let reap = t.since.elapsed() >= REAP_GRACE && self.gossip.members().len() > 1;
            self.reconcile_members(&alive, reap).await;
            self.expire_sessions().await;
            self.reap_tombstones(t).await;
            self.autopilot(&alive, t).await;
        }
    }

    /// Which servers answer the leader. Right after taking office nobody has had the chance
    /// to, so everyone counts as alive for the first period.
    /// Which servers are alive: as gossip sees them, or, for a server gossip does not know
    /// (yet), whether it answers the leader's RPCs. Right after taking office nobody has had
    /// the chance to answer, so the unknown count as alive for the first period.
    fn liveness(&self, since: Instant) -> HashMap<NodeId, bool> {
        let grace = since.elapsed() < SERVER_FAILED_AFTER;
        let gossip: HashMap<String, MemberStatus> = self.gossip.members().into_iter().map(|m| (m.name, m.status)).collect();
        self.node
            .members()
            .into_iter()
            .map(|(id, n, _)| {
                let alive = match gossip.get(&n.name) {
                    _ if id == self.node.id => true,
                    Some(status) => *status == MemberStatus::Alive,
                    None => grace || self.node.contacts.since(id).is_some_and(|d| d < SERVER_FAILED_AFTER),
                };
                (id, alive)
            })
            .collect()
    }

    /// Make the catalog's nodes and `serfHealth` checks follow membership: servers from the
    /// Raft configuration, every other node from LAN gossip.
    async fn reconcile_members(&self, alive: &HashMap<NodeId, bool>, reap: bool) {
        let servers = self.node.members();
        let members = self.gossip.members();
        let mut writes = Vec::new();
        {
            let store = self.node.store.read();
            let d = store.data();
            let mut wanted: Vec<Registration> =
                servers.iter().map(|(id, server, _)| server_registration(server, &self.datacenter, alive.get(id).copied().unwrap_or(true))).collect();
            let server_names: BTreeSet<&str> = servers.iter().map(|(_, n, _)| n.name.as_str()).collect();
            for m in members
                .iter()
                .filter(|m| m.tags.get("dc").map(String::as_str) == Some(self.datacenter.as_str()) && !server_names.contains(m.name.as_str()))
            {
                match m.status {
                    MemberStatus::Left => {
                        if d.nodes.contains_key(m.name.as_str()) {
                            writes.push(Command::Deregister { node: m.name.clone(), service_id: None, check_id: None });
                        }
                    }
                    status => wanted.push(client_registration(m, &self.datacenter, status == MemberStatus::Alive)),
                }
            }
            for reg in wanted {
                let name = &reg.node.node;
                let node_ok = d.nodes.get(name).is_some_and(|n| n.address == reg.node.address && n.id == reg.node.id);
                let svc_ok = match &reg.service {
                    Some(s) => d.services.get(&(name.clone(), s.id.clone())).is_some_and(|r| r.port == s.port),
                    None => true,
                };
                let check_ok = d.checks.get(&(name.clone(), SERF_CHECK.into())).is_some_and(|c| c.status == reg.checks[0].status);
                if !(node_ok && svc_ok && check_ok) {
                    writes.push(Command::Register(reg));
                }
            }
            // Nodes gossip no longer knows (reaped, or forced out) leave the catalog.
            let known: BTreeSet<&str> = members.iter().map(|m| m.name.as_str()).chain(server_names.iter().copied()).collect();
            // By node, not by check: a catalog has many times more checks than nodes.
            if reap {
                for node in d.nodes.keys().filter(|n| !known.contains(n.as_str())) {
                    if d.checks.contains_key(&(node.clone(), SERF_CHECK.into())) {
                        writes.push(Command::Deregister { node: node.to_string(), service_id: None, check_id: None });
                    }
                }
            }
        }
        for w in writes {
            if let Err(e) = self.node.write(w).await {
                warn!(error = %e, "catalog reconcile write failed");
            }
        }
    }

    async fn seed_autopilot(&self) {
        if self.node.store.read().data().autopilot.modify_index != 0 {
            return;
        }
        let a = &self.autopilot;
        let config = crate::state::AutopilotConfig {
            cleanup_dead_servers: a.cleanup_dead_servers,
            last_contact_threshold: a.last_contact_threshold.clone(),
            max_trailing_logs: a.max_trailing_logs,
            min_quorum: a.min_quorum,
            server_stabilization_time: a.server_stabilization_time.clone(),
            create_index: 0,
            modify_index: 0,
        };
        let cmd = Command::AutopilotSetConfig { config, cas: Some(0) };
        if let Err(e) = self.node.write(cmd).await {
            warn!(error = %e, "storing the configured autopilot settings failed");
        }
    }

    /// Create the auto-encrypt CA the first time a leader takes office.
    async fn seed_agent_ca(&self) {
        if self.node.store.read().data().agent_ca.is_some() {
            return;
        }
        let (cert_pem, key_pem) = match crate::tls::create_agent_ca(&self.datacenter, &self.domain) {
            Ok(ca) => ca,
            Err(e) => return warn!(error = %e, "creating the auto-encrypt CA failed"),
        };
        match self.node.write(Command::AgentCaInit(crate::state::AgentCa { cert_pem, key_pem })).await {
            Ok(_) => info!("auto-encrypt CA created"),
            Err(e) => warn!(error = %e, "storing the auto-encrypt CA failed"),
        }
    }

    async fn expire_sessions(&self) {
        let live: Vec<(String, Duration)> = {
            let store = self.node.store.read();
            store.data().sessions.values().filter_map(|s| parse_ttl(&s.ttl).ok().flatten().map(|t| (s.id.clone(), t))).collect()
        };
        for id in self.sessions.expired(&live) {
            info!(session = %id, "session TTL expired");
            if let Err(e) = self.node.write(Command::SessionDestroy { id }).await {
                warn!(error = %e, "destroying expired session failed");
            }
        }
    }

    /// Consul's tombstone GC: deleted keys are remembered (so that a blocking prefix read sees
    /// the deletion) for `tombstone_ttl`, then reaped through Raft. A new leader starts its
    /// clock afresh, so tombstones live at least the TTL whatever leadership does.
    async fn reap_tombstones(&self, t: &mut Tenure) {
        let now = Instant::now();
        t.applied_at.push_back((now, self.node.applied_index()));
        let mut expired_up_to = None;
        while let Some((at, index)) = t.applied_at.front().copied() {
            if now.duration_since(at) < self.tombstone_ttl {
                break;
            }
            expired_up_to = Some(index);
            t.applied_at.pop_front();
        }
        let Some(up_to) = expired_up_to else { return };
        let due = self.node.store.read().data().kv_tombstones.values().any(|i| *i <= up_to);
        if due && let Err(e) = self.node.write(Command::KvReap { up_to }).await {
            warn!(error = %e, "reaping KV tombstones failed; retrying next tick");
        }
    }

    async fn autopilot(&self, alive: &HashMap<NodeId, bool>, t: &mut Tenure) {
        let cfg = self.node.store.read().data().autopilot.clone();
        let threshold = crate::duration::parse(&cfg.last_contact_threshold).unwrap_or(Duration::from_millis(200));
        let m = self.node.raft.metrics().borrow().clone();
        let leader_index = m.last_log_index.unwrap_or(0);
        let matched: HashMap<NodeId, u64> =
            m.replication.as_ref().map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0))).collect()).unwrap_or_default();
        let members = self.node.members();
        let mut servers = Vec::new();
        for (id, n, voter) in &members {
            let is_self = *id == self.node.id;
            let contact = if is_self { Some(Duration::ZERO) } else { self.node.contacts.since(*id) };
            let last_index = if is_self { leader_index } else { matched.get(id).copied().unwrap_or(0) };
            let up = alive.get(id).copied().unwrap_or(false);
            let healthy = up && contact.is_some_and(|c| c <= threshold.max(TICK)) && leader_index.saturating_sub(last_index) <= cfg.max_trailing_logs;
            let entry = t.stable_since.entry(*id).or_insert((healthy, SystemTime::now()));
            if entry.0 != healthy {
                *entry = (healthy, SystemTime::now());
            }
            servers.push(ServerHealth {
                id: n.id.clone(),
                name: n.name.clone(),
                address: n.rpc_addr.clone(),
                serf_status: if up { "alive" } else { "failed" }.into(),
                version: crate::api::version().into(),
                leader: is_self,
                last_contact: contact.map(crate::duration::format).unwrap_or_else(|| "never".into()),
                last_term: m.current_term,
                last_index,
                healthy,
                voter: *voter,
                stable_since: crate::duration::rfc3339(entry.1),
            });
        }
        let voters = servers.iter().filter(|s| s.voter).count();
        let healthy_voters = servers.iter().filter(|s| s.voter && s.healthy).count();
        *self.health.lock() =
            AutopilotHealth { healthy: servers.iter().all(|s| s.healthy), failure_tolerance: healthy_voters.saturating_sub(voters / 2 + 1), servers };
        if !cfg.cleanup_dead_servers {
            return;
        }
        let failed: BTreeSet<NodeId> =
            members.iter().filter(|(id, _, v)| *v && !alive.get(id).copied().unwrap_or(true)).map(|(id, _, _)| *id).collect();
        let remaining = voters - failed.len();
        // Only remove what leaves a majority of the old configuration and the operator's floor.
        if failed.is_empty() || remaining <= voters / 2 || (remaining as u64) < cfg.min_quorum {
            return;
        }
        info!(servers = ?failed, "autopilot removing failed servers");
        if let Err(e) = self.node.raft.change_membership(ChangeMembers::RemoveVoters(failed), false).await {
            warn!(error = %e, "autopilot could not remove failed servers");
        }
    }
}

fn serf_check(alive: bool) -> HealthCheck {
    let (status, output) =
        if alive { (CheckStatus::Passing, "Agent alive and reachable") } else { (CheckStatus::Critical, "Agent not live or unreachable") };
    HealthCheck { check_id: SERF_CHECK.into(), name: "Serf Health Status".into(), status, output: output.into(), ..Default::default() }
}

fn client_registration(m: &Member, dc: &str, alive: bool) -> Registration {
    Registration {
        node: Node {
            id: m.tags.get("id").cloned().unwrap_or_default().into(),
            node: m.name.clone().into(),
            address: m.addr.ip().to_string().into(),
            datacenter: dc.into(),
            ..Default::default()
        },
        service: None,
        checks: vec![serf_check(alive)],
        skip_node_update: false,
    }
}

fn server_registration(server: &ServerNode, dc: &str, alive: bool) -> Registration {
    let (ip, port) = server.socket_addr().map(|a| (a.ip().to_string(), a.port())).unwrap_or_default();
    Registration {
        node: Node {
            id: server.id.as_str().into(),
            node: server.name.as_str().into(),
            address: ip.into(),
            datacenter: dc.into(),
            ..Default::default()
        },
        service: Some(Service { id: SERVER_SERVICE.into(), service: SERVER_SERVICE.into(), port, ..Default::default() }),
        checks: vec![serf_check(alive)],
        skip_node_update: false,
    }
}
