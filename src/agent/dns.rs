//! The catalog as DNS sees it: `DnsCatalog` over the local state (servers) or a server's
//! (client agents), through the same `Upstream` anti-entropy uses.

use std::net::IpAddr;

use crate::dns::{DnsCatalog, Health, Instance, LookupError, NodeInfo, PtrTarget, QueryResult};
use crate::state::catalog::{CatalogAnswer, CatalogQuery, ServiceInstance};
use crate::state::query::order_near;
use crate::state::{CheckStatus, Table};

use super::local::Upstream;

pub struct CatalogDns {
    pub upstream: Upstream,
    pub datacenter: String,
    /// This agent's node, what a prepared query's `Near = "_agent"` means.
    pub node_name: String,
}

impl CatalogDns {
    /// Only this datacenter is reachable until federation exists.
    fn check_dc(&self, dc: Option<&str>) -> Result<(), LookupError> {
        match dc {
            Some(d) if !d.eq_ignore_ascii_case(&self.datacenter) => Err(LookupError::UnknownDatacenter),
            _ => Ok(()),
        }
    }

    fn instance(&self, n: crate::state::Node, s: crate::state::Service, checks: &[crate::state::HealthCheck]) -> Instance {
        Instance {
            node: n.node,
            node_address: n.address,
            service_address: s.address,
            port: s.port,
            status: health(checks),
            node_meta: n.meta,
            datacenter: self.datacenter.clone(),
        }
    }

    async fn read(&self, q: CatalogQuery) -> Result<CatalogAnswer, LookupError> {
        self.upstream.read(q).await.map_err(LookupError::Unavailable)
    }
}

fn health(checks: &[crate::state::HealthCheck]) -> Health {
    match checks.iter().map(|c| c.status).max() {
        None | Some(CheckStatus::Passing) => Health::Passing,
        Some(CheckStatus::Warning) => Health::Warning,
        Some(CheckStatus::Critical | CheckStatus::Maintenance) => Health::Critical,
    }
}

#[async_trait::async_trait]
impl DnsCatalog for CatalogDns {
    async fn service_instances(&self, dc: Option<&str>, service: &str, tag: Option<&str>) -> Result<Vec<Instance>, LookupError> {
        self.check_dc(dc)?;
        let CatalogAnswer::Instances(list) = self.read(CatalogQuery::ServiceInstances { service: service.into(), tag: tag.map(Into::into) }).await?
        else {
            return Err(LookupError::Unavailable("unexpected catalog answer".into()));
        };
        Ok(list.into_iter().map(|(n, s, checks)| self.instance(n, s, &checks)).collect())
    }

    async fn node(&self, dc: Option<&str>, name: &str) -> Result<Option<NodeInfo>, LookupError> {
        self.check_dc(dc)?;
        let CatalogAnswer::Node(n) = self.read(CatalogQuery::Node { name: name.into() }).await? else {
            return Err(LookupError::Unavailable("unexpected catalog answer".into()));
        };
        Ok(n.map(|n| NodeInfo { name: n.node, address: n.address, meta: n.meta, datacenter: self.datacenter.clone() }))
    }

    async fn by_address(&self, ip: IpAddr) -> Result<Vec<PtrTarget>, LookupError> {
        let CatalogAnswer::ByAddress { nodes, services } = self.read(CatalogQuery::ByAddress { ip: ip.to_string() }).await? else {
            return Err(LookupError::Unavailable("unexpected catalog answer".into()));
        };
        let dc = self.datacenter.clone();
        Ok(nodes
            .into_iter()
            .map(|name| PtrTarget::Node { name, dc: dc.clone() })
            .chain(services.into_iter().map(|(service, node)| PtrTarget::Service { service, node, dc: dc.clone() }))
            .collect())
    }

    async fn prepared_query(&self, dc: Option<&str>, name: &str, source: Option<IpAddr>) -> Result<Option<QueryResult>, LookupError> {
        self.check_dc(dc)?;
        let q = CatalogQuery::PreparedQuery { name: name.into(), agent: self.node_name.clone(), source: source.map(|ip| ip.to_string()) };
        let CatalogAnswer::Query(answer) = self.read(q).await? else {
            return Err(LookupError::Unavailable("unexpected catalog answer".into()));
        };
        // A template that cannot render for this name answers like an unknown name.
        let Some(answer) = answer.ok().flatten() else { return Ok(None) };
        // Checks the query ignores do not count towards an instance's health here either.
        let ignored = &answer.query.service.ignore_check_ids;
        let mut instances: Vec<ServiceInstance> = answer
            .instances
            .into_iter()
            .map(|(node, service, mut checks)| {
                checks.retain(|c| !ignored.contains(&c.check_id));
                ServiceInstance { node, service, checks }
            })
            .collect();
        order_near(&mut instances, answer.near.as_deref());
        Ok(Some(QueryResult {
            instances: instances.into_iter().map(|i| self.instance(i.node, i.service, &i.checks)).collect(),
            ttl: crate::duration::parse(&answer.query.dns.ttl),
            only_passing: answer.query.service.only_passing,
            service: answer.query.service.service,
            ordered: true,
        }))
    }

    fn datacenter(&self) -> String {
        self.datacenter.clone()
    }

    /// Servers answer from their own state, whose catalog index is a lock away. Client agents
    /// ask a server each time and keep nothing (their answers are as fresh as the server's).
    fn generation(&self) -> Option<u64> {
        match &self.upstream {
            Upstream::Raft(node) => {
                let store = node.store.read().expect("state lock");
                Some(store.data().index_of(&[Table::Nodes, Table::Services, Table::Checks, Table::PreparedQueries]))
            }
            Upstream::Rpc { .. } => None,
        }
    }
}
