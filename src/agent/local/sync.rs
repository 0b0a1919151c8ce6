//! Anti-entropy: make the catalog's entries for this node match the local state, right after a
//! local change and on a periodic full sync that repairs any drift (a server restored from an
//! old snapshot, a write lost with a crashed leader, an entry deleted through the catalog API).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::LocalAgent;
use crate::cluster::{ClusterReply, ClusterRpc, NodeState, RaftNode};
use crate::rpc::{RpcClient, Service as RpcService};
use crate::state::{Command, HealthCheck, Node, Outcome, Registration, Request, Service};

/// Clusters above this many nodes sync less often (Consul's scaling).
const SCALE_THRESHOLD: usize = 128;
/// How long one sync round may take before it is abandoned until the next.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries the leader owns for every node, which the agent must leave alone.
const LEADER_OWNED_CHECK: &str = "serfHealth";
const SERVER_SERVICE: &str = "consul";

/// Where this agent's catalog writes go.
#[derive(Clone)]
pub enum Upstream {
    /// A server writes through its own Raft node.
    Raft(RaftNode),
    /// A client agent sends writes to a server, found through `servers`.
    Rpc { rpc: RpcClient, servers: Arc<dyn Fn() -> Vec<SocketAddr> + Send + Sync> },
}

impl Upstream {
    async fn call(&self, req: ClusterRpc) -> Result<ClusterReply, String> {
        let Upstream::Rpc { rpc, servers } = self else { return Err("not a remote upstream".into()) };
        let list = servers();
        if list.is_empty() {
            return Err("No known Consul servers".into());
        }
        let mut last = String::new();
        for s in list {
            match rpc.call_typed::<ClusterRpc, ClusterReply>(s, RpcService::Cluster, &req, SYNC_TIMEOUT).await {
                Ok(r) => return Ok(r),
                Err(e) => last = format!("{s}: {e}"),
            }
        }
        Err(last)
    }

    pub async fn node_state(&self, node: &str) -> Result<NodeState, String> {
        match self {
            Upstream::Raft(n) => Ok(n.node_state(node)),
            Upstream::Rpc { .. } => match self.call(ClusterRpc::NodeState { node: node.to_string() }).await? {
                ClusterReply::NodeState(s) => Ok(*s),
                _ => Err("unexpected reply".into()),
            },
        }
    }

    /// A catalog read, from the local state on servers or from a server for clients.
    /// A catalog read from this datacenter's state, or (`dc` set, client agents only) one a
    /// server passes on to another datacenter.
    pub async fn read(&self, dc: Option<&str>, q: crate::state::catalog::CatalogQuery) -> Result<crate::state::catalog::CatalogAnswer, String> {
        match self {
            Upstream::Raft(n) => Ok(n.store.read().data().answer(&q)),
            Upstream::Rpc { .. } => match self.call(ClusterRpc::Read { dc: dc.map(str::to_string), query: q }).await? {
                ClusterReply::Read(a) => Ok(*a),
                _ => Err("unexpected reply".into()),
            },
        }
    }

    /// The datacenters a server knows, nearest first.
    pub async fn datacenters(&self) -> Result<Vec<String>, String> {
        match self.call(ClusterRpc::Datacenters).await? {
            ClusterReply::Datacenters(d) => Ok(d),
            _ => Err("unexpected reply".into()),
        }
    }

    pub async fn write(&self, command: Command) -> Result<Outcome, String> {
        match self {
            Upstream::Raft(n) => n.write(command).await.map(|(o, _)| o).map_err(|e| e.to_string()),
            Upstream::Rpc { .. } => {
                let req = Request { now_ms: crate::cluster::now_ms(), command };
                match self.call(ClusterRpc::Apply { req: Box::new(req), hops: 0 }).await? {
                    ClusterReply::Applied { outcome, .. } => Ok(outcome),
                    _ => Err("unexpected reply".into()),
                }
            }
        }
    }
}

fn same_service(a: &Service, b: &Service) -> bool {
    Service { create_index: 0, modify_index: 0, ..a.clone() } == Service { create_index: 0, modify_index: 0, ..b.clone() }
}

fn same_check(a: &HealthCheck, b: &HealthCheck) -> bool {
    a.status == b.status
        && a.output == b.output
        && a.name == b.name
        && a.notes == b.notes
        && a.service_id == b.service_id
        && a.check_type == b.check_type
}

/// The commands that turn `remote` into what `local` says.
pub fn plan(node: &Node, services: &[Service], checks: &[HealthCheck], remote: &NodeState, server: bool) -> Vec<Command> {
    let mut cmds = Vec::new();
    let node_ok = remote.node.as_ref().is_some_and(|n| n.address == node.address && n.id == node.id && n.meta == node.meta);
    if !node_ok {
        cmds.push(Command::Register(Registration { node: node.clone(), service: None, checks: Vec::new(), skip_node_update: false }));
    }
    for s in services {
        let own: Vec<HealthCheck> = checks.iter().filter(|c| c.service_id == s.id).cloned().collect();
        let svc_ok = remote.services.iter().any(|r| r.id == s.id && same_service(r, s));
        let checks_ok = own.iter().all(|c| remote.checks.iter().any(|r| r.check_id == c.check_id && same_check(r, c)));
        if !(svc_ok && checks_ok) {
            cmds.push(Command::Register(Registration { node: node.clone(), service: Some(s.clone()), checks: own, skip_node_update: true }));
        }
    }
    let node_checks: Vec<HealthCheck> = checks
        .iter()
        .filter(|c| c.service_id.is_empty())
        .filter(|c| !remote.checks.iter().any(|r| r.check_id == c.check_id && same_check(r, c)))
        .cloned()
        .collect();
    if !node_checks.is_empty() {
        cmds.push(Command::Register(Registration { node: node.clone(), service: None, checks: node_checks, skip_node_update: true }));
    }
    let local_services: BTreeSet<&str> = services.iter().map(|s| s.id.as_str()).collect();
    let mut gone_services = BTreeSet::new();
    for r in &remote.services {
        let kept = local_services.contains(r.id.as_str()) || (server && r.id == SERVER_SERVICE);
        if !kept {
            gone_services.insert(r.id.clone());
            cmds.push(Command::Deregister { node: node.node.to_string(), service_id: Some(r.id.to_string()), check_id: None });
        }
    }
    let local_checks: BTreeSet<&str> = checks.iter().map(|c| c.check_id.as_str()).collect();
    for r in &remote.checks {
        if !local_checks.contains(r.check_id.as_str()) && r.check_id != LEADER_OWNED_CHECK && !gone_services.contains(&r.service_id) {
            cmds.push(Command::Deregister { node: node.node.to_string(), service_id: None, check_id: Some(r.check_id.to_string()) });
        }
    }
    cmds
}

pub struct SyncWorker {
    pub local: LocalAgent,
    pub upstream: Upstream,
    pub interval: Duration,
    /// Current cluster size, to scale the period as Consul does.
    pub cluster_size: Arc<dyn Fn() -> usize + Send + Sync>,
}

impl SyncWorker {
    fn period(&self) -> Duration {
        let n = (self.cluster_size)();
        if n <= SCALE_THRESHOLD {
            return self.interval;
        }
        let mult = ((n as f64 / SCALE_THRESHOLD as f64).log2().ceil() as u32) + 1;
        self.interval.saturating_mul(mult)
    }

    pub async fn run(self, shutdown: CancellationToken) {
        self.local.syncer_started();
        let mut next_full = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.local.changed() => {}
                _ = tokio::time::sleep_until(next_full) => next_full = tokio::time::Instant::now() + self.period(),
            }
            for id in self.local.expired_services() {
                warn!(service = %id, "deregistering a service whose check stayed critical past DeregisterCriticalServiceAfter");
                let _ = self.local.remove_service(&id);
            }
            let revision = self.local.revision();
            let result = tokio::time::timeout(SYNC_TIMEOUT, self.sync_once()).await;
            self.local.sync_attempted(revision);
            match result {
                Ok(Ok(n)) if n > 0 => debug!(writes = n, "anti-entropy synced the catalog"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "anti-entropy sync failed; retrying shortly");
                    next_full = next_full.min(tokio::time::Instant::now() + Duration::from_secs(2));
                }
                Err(_) => warn!("anti-entropy sync timed out"),
            }
        }
    }

    /// One full comparison and repair; returns how many writes it made.
    pub async fn sync_once(&self) -> Result<usize, String> {
        let f = self.local.node();
        let node = Node {
            id: f.id.clone().into(),
            node: f.name.clone().into(),
            address: f.address.clone().into(),
            datacenter: f.datacenter.clone().into(),
            meta: f.meta.clone(),
            ..Default::default()
        };
        let remote = self.upstream.node_state(&f.name).await?;
        let (services, checks) = self.local.desired();
        let cmds = plan(&node, &services, &checks, &remote, f.server);
        let n = cmds.len();
        for c in cmds {
            if let Outcome::Rejected(m) = self.upstream.write(c).await? {
                return Err(m);
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::CheckStatus;

    fn node() -> Node {
        Node { node: "c1".into(), address: "10.0.0.1".into(), ..Default::default() }
    }

    fn web() -> Service {
        Service { id: "web".into(), service: "web".into(), port: 80, ..Default::default() }
    }

    fn check(id: &str, svc: &str, status: CheckStatus) -> HealthCheck {
        HealthCheck { node: "c1".into(), check_id: id.into(), service_id: svc.into(), status, ..Default::default() }
    }

    #[test]
    fn in_sync_state_plans_nothing() {
        let remote = NodeState {
            node: Some(node().into()),
            services: vec![web().into()],
            checks: vec![check("service:web", "web", CheckStatus::Passing).into(), check("serfHealth", "", CheckStatus::Passing).into()],
        };
        assert!(plan(&node(), &[web()], &[check("service:web", "web", CheckStatus::Passing)], &remote, false).is_empty());
    }

    #[test]
    fn a_service_deleted_behind_the_agents_back_is_registered_again() {
        let remote = NodeState { node: Some(node().into()), services: vec![], checks: vec![] };
        let cmds = plan(&node(), &[web()], &[check("service:web", "web", CheckStatus::Passing)], &remote, false);
        assert!(matches!(&cmds[..], [Command::Register(r)] if r.service.as_ref().unwrap().id == "web" && r.checks.len() == 1));
    }

    #[test]
    fn extra_remote_entries_are_removed_but_leader_owned_ones_kept() {
        let mut other = web();
        other.id = "old".into();
        let consul = Service { id: "consul".into(), service: "consul".into(), ..Default::default() };
        let remote = NodeState {
            node: Some(node().into()),
            services: vec![other.into(), consul.into()],
            checks: vec![check("serfHealth", "", CheckStatus::Passing).into(), check("stale", "", CheckStatus::Passing).into()],
        };
        let cmds = plan(&node(), &[], &[], &remote, true);
        assert_eq!(cmds.len(), 2, "{cmds:?}");
    }

    #[test]
    fn a_status_change_reregisters_the_service_with_its_checks() {
        let remote = NodeState {
            node: Some(node().into()),
            services: vec![web().into()],
            checks: vec![check("service:web", "web", CheckStatus::Passing).into()],
        };
        let cmds = plan(&node(), &[web()], &[check("service:web", "web", CheckStatus::Critical)], &remote, false);
        assert_eq!(cmds.len(), 1);
    }
}
