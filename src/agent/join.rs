//! Bootstrap and join: introduce ourselves to the `retry_join` servers until this server is a
//! voter of its datacenter's Raft configuration.
//!
//! With `bootstrap_expect = N`, once N uninitialised servers know each other the one with the
//! lowest Raft id initialises the cluster with all N; every later server (or one removed while it
//! was down) asks the leader to add it. The loop keeps running, at a slower pace, so that a
//! server dropped from the configuration comes back by itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::cluster::hello;
use crate::cluster::{ClusterReply, ClusterRpc, HelloInfo, RaftNode};
use crate::consensus::ServerNode;
use crate::rpc::Service;

/// Pace of introductions while forming or joining a cluster, and once a member.
const JOIN_RETRY: Duration = Duration::from_secs(1);
const MEMBER_RECHECK: Duration = Duration::from_secs(5);
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Adding a voter waits for it to catch up, which can take a while on a big state.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

pub struct JoinWorker {
    pub node: RaftNode,
    /// Servers found through LAN gossip are introduced to as well.
    pub gossip: crate::membership::Gossip,
    pub datacenter: String,
    pub retry_join: Vec<String>,
    pub default_port: u16,
    pub bootstrap_expect: usize,
}

impl JoinWorker {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let pace = match self.step().await {
                true => MEMBER_RECHECK,
                false => JOIN_RETRY,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pace) => {}
            }
        }
    }

    async fn resolve(&self) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for target in &self.retry_join {
            let with_port = if target.parse::<SocketAddr>().is_ok()
                || target.rsplit_once(':').is_some_and(|(h, p)| !h.ends_with(']') && p.parse::<u16>().is_ok() && !h.contains(':'))
            {
                target.clone()
            } else if target.contains(':') && !target.starts_with('[') {
                format!("[{target}]:{}", self.default_port)
            } else {
                format!("{target}:{}", self.default_port)
            };
            match tokio::net::lookup_host(with_port.as_str()).await {
                Ok(addrs) => out.extend(addrs),
                Err(e) => debug!(target, error = %e, "cannot resolve retry_join address"),
            }
        }
        out.extend(super::ops::alive_servers(&self.gossip, &self.datacenter));
        out.sort();
        out.dedup();
        out.retain(|a| self.node.me.socket_addr() != Some(*a));
        out
    }

    async fn introductions(&self) -> Vec<HelloInfo> {
        let addrs = self.resolve().await;
        let calls =
            addrs.iter().map(|a| self.node.rpc.call_typed::<ClusterRpc, ClusterReply>(*a, Service::Cluster, &ClusterRpc::Hello, HELLO_TIMEOUT));
        futures::future::join_all(calls)
            .await
            .into_iter()
            .filter_map(|r| match r {
                Ok(ClusterReply::Hello(h)) if h.datacenter == self.datacenter && h.id != self.node.id => Some(h),
                Ok(ClusterReply::Hello(h)) if h.datacenter != self.datacenter => {
                    warn!(peer = %h.node, their_dc = %h.datacenter, "retry_join peer is in another datacenter; ignoring it");
                    None
                }
                _ => None,
            })
            .collect()
    }

    /// One round; returns whether this server is a voter of a running cluster.
    async fn step(&self) -> bool {
        let me = hello(&self.node, &self.datacenter);
        let peers = self.introductions().await;
        let views = || peers.iter().chain(std::iter::once(&me));
        if let Some((leader_id, leader)) = views().find_map(|h| h.leader.clone()) {
            if leader_id == self.node.id {
                return true;
            }
            // The leader's own view of the configuration decides; without it, ask anyway
            // (adding a server that already votes is a no-op).
            if views().find(|h| h.id == leader_id).is_some_and(|v| v.voters.contains(&self.node.id)) {
                return true;
            }
            self.ask_to_join(&leader).await;
            return false;
        }
        if me.initialized {
            // A configuration exists but no leader is known yet: elections will settle it.
            return me.voters.contains(&self.node.id);
        }
        if self.bootstrap_expect == 0 {
            return false;
        }
        let mut candidates: BTreeMap<u64, ServerNode> = peers.iter().filter(|h| !h.initialized).map(|h| (h.id, h.node.clone())).collect();
        candidates.insert(self.node.id, self.node.me.clone());
        if candidates.len() < self.bootstrap_expect {
            debug!(known = candidates.len(), expect = self.bootstrap_expect, "waiting for more servers before bootstrapping");
            return false;
        }
        let chosen: BTreeMap<u64, ServerNode> = candidates.into_iter().take(self.bootstrap_expect).collect();
        if chosen.keys().next() == Some(&self.node.id) {
            info!(servers = ?chosen.values().map(|n| n.name.as_str()).collect::<Vec<_>>(), "bootstrapping the cluster");
            if let Err(e) = self.node.raft.initialize(chosen).await {
                warn!(error = %e, "bootstrap failed");
            }
        }
        false
    }

    async fn ask_to_join(&self, leader: &ServerNode) {
        let Some(addr) = leader.socket_addr() else {
            return;
        };
        info!(leader = %leader, "asking the leader to add this server");
        let req = ClusterRpc::Join { id: self.node.id, node: self.node.me.clone() };
        if let Err(e) = self.node.rpc.call_typed::<ClusterRpc, ClusterReply>(addr, Service::Cluster, &req, JOIN_TIMEOUT).await {
            warn!(leader = %leader, error = %e, "join failed; will retry");
        }
    }
}

/// Joins the LAN gossip pool through `retry_join`, retrying until one address answers (then
/// gossip itself keeps the membership), as Consul's `retry_join` does.
pub struct GossipJoinWorker {
    pub gossip: crate::membership::Gossip,
    pub retry_join: Vec<String>,
    pub default_port: u16,
}

impl GossipJoinWorker {
    pub async fn run(self, shutdown: CancellationToken) {
        if self.retry_join.is_empty() {
            return shutdown.cancelled().await;
        }
        loop {
            let mut addrs = Vec::new();
            for t in &self.retry_join {
                let target = if t.contains(':') && !t.starts_with('[') && t.matches(':').count() == 1 {
                    t.clone()
                } else {
                    format!("{t}:{}", self.default_port)
                };
                if let Ok(found) = tokio::net::lookup_host(target.as_str()).await {
                    addrs.extend(found);
                }
            }
            match self.gossip.join(&addrs).await {
                Ok(n) if n > 0 => {
                    info!(answered = n, "joined the LAN gossip pool");
                    // Done: gossip keeps the membership from here. Stay until shutdown, since
                    // the agent treats any task ending early as a failure.
                    return shutdown.cancelled().await;
                }
                Ok(_) => debug!("no retry_join address answered yet"),
                Err(e) => debug!(error = %e, "gossip join failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(JOIN_RETRY) => {}
            }
        }
    }
}
