//! What alias checks read: this agent's own checks, and on servers the catalog's checks of
//! other nodes. Client agents cannot alias other nodes yet (they would need a catalog watch).

use std::sync::Weak;

use tokio::sync::watch;

use super::Inner;
use super::checks::{AliasSource, AliasedCheck, Status};
use crate::cluster::RaftNode;
use crate::state::{CheckStatus, HealthCheck, Table};

pub struct AliasView {
    pub agent: Weak<Inner>,
    pub catalog: Option<RaftNode>,
}

fn aliased(c: &HealthCheck) -> AliasedCheck {
    let status = match c.status {
        CheckStatus::Passing => Status::Passing,
        CheckStatus::Warning => Status::Warning,
        CheckStatus::Critical | CheckStatus::Maintenance => Status::Critical,
    };
    AliasedCheck {
        node: c.node.to_string(),
        check_id: c.check_id.to_string(),
        name: c.name.to_string(),
        service_id: c.service_id.to_string(),
        status,
        output: c.output.to_string(),
    }
}

impl AliasView {
    fn is_local(&self, node: Option<&str>) -> bool {
        match (node, self.agent.upgrade()) {
            (None, _) => true,
            (Some(n), Some(a)) => a.node.name == n,
            (Some(_), None) => false,
        }
    }
}

impl AliasSource for AliasView {
    fn checks(&self, node: Option<&str>) -> Result<Vec<AliasedCheck>, String> {
        if self.is_local(node) {
            let a = self.agent.upgrade().ok_or("agent stopped")?;
            let st = a.state.lock();
            return Ok(st.checks.values().map(|c| aliased(&c.check)).chain(st.maintenance.values().map(aliased)).collect());
        }
        let (Some(node), Some(raft)) = (node, &self.catalog) else {
            return Err("aliasing checks of another node needs a server agent".into());
        };
        let store = raft.store.read();
        Ok(store.data().node_checks(node).0.iter().map(|c| aliased(c)).collect())
    }

    fn service_exists(&self, node: Option<&str>, service_id: &str) -> bool {
        if self.is_local(node) {
            return self.agent.upgrade().is_some_and(|a| a.state.lock().services.contains_key(service_id));
        }
        match (node, &self.catalog) {
            (Some(n), Some(raft)) => raft.store.read().data().services.contains_key(&(n.into(), service_id.into())),
            _ => false,
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        match (&self.catalog, self.agent.upgrade()) {
            // On servers, catalog check changes wake aliases of other nodes.
            (Some(raft), _) => raft.store.read().watch(Table::Checks),
            (None, Some(a)) => a.revision.subscribe(),
            (None, None) => watch::channel(0).1,
        }
    }
}
