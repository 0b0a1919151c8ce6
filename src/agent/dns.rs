//! The catalog as DNS sees it: `DnsCatalog` over the local state (servers) or a server's
//! (client agents), through the same `Upstream` anti-entropy uses.

use std::net::IpAddr;
use std::sync::Arc;

use crate::dns::{DnsCatalog, Health, Instance, LookupError, NodeInfo, PtrTarget, QueryResult};
use crate::federation::{Router, fail_over};
use crate::state::catalog::{CatalogAnswer, CatalogQuery, QueryAnswer, ServiceInstance};
use crate::state::{CheckStatus, Table};

use super::local::Upstream;

pub struct CatalogDns {
    pub upstream: Upstream,
    pub datacenter: String,
    /// This agent's node, what a prepared query's `Near = "_agent"` means.
    pub node_name: String,
    /// Servers route other datacenters' lookups themselves; client agents (`None`) ask a
    /// server to.
    pub federation: Option<Router>,
}

impl CatalogDns {
    fn instance(&self, dc: &str, n: &crate::state::Node, s: &crate::state::Service, checks: &[Arc<crate::state::HealthCheck>]) -> Instance {
        Instance {
            node: n.node.to_string(),
            node_address: n.address.to_string(),
            service_address: s.address.to_string(),
            port: s.port,
            status: health(checks),
            node_meta: n.meta.clone(),
            datacenter: dc.to_string(),
        }
    }

    /// The datacenter `dc` names: this one when `None` or our own.
    fn dc_of<'a>(&'a self, dc: Option<&'a str>) -> &'a str {
        dc.filter(|d| !d.eq_ignore_ascii_case(&self.datacenter)).unwrap_or(&self.datacenter)
    }

    /// A catalog read in `dc`: this datacenter's state, or another datacenter's servers.
    async fn read(&self, dc: &str, q: CatalogQuery) -> Result<CatalogAnswer, LookupError> {
        let result = if dc == self.datacenter {
            self.upstream.read(None, q).await
        } else if let Some(router) = &self.federation {
            router.read(dc, q).await.map_err(|e| e.message)
        } else {
            self.upstream.read(Some(dc), q).await
        };
        result.map_err(|e| if e.contains("No path to datacenter") { LookupError::UnknownDatacenter } else { LookupError::Unavailable(e) })
    }

    async fn datacenters(&self) -> Vec<String> {
        match &self.federation {
            Some(r) => r.datacenters(),
            None => self.upstream.datacenters().await.unwrap_or_default(),
        }
    }

    /// Run a query in `dc` (`name` there, or the given definition on failover).
    async fn query_in(&self, dc: &str, q: CatalogQuery) -> Result<Option<Box<QueryAnswer>>, LookupError> {
        let CatalogAnswer::Query(answer) = self.read(dc, q).await? else {
            return Err(LookupError::Unavailable("unexpected catalog answer".into()));
        };
        // A template that cannot render for this name answers like an unknown name.
        Ok(answer.ok().flatten())
    }
}

fn health(checks: &[Arc<crate::state::HealthCheck>]) -> Health {
    match checks.iter().map(|c| c.status).max() {
        None | Some(CheckStatus::Passing) => Health::Passing,
        Some(CheckStatus::Warning) => Health::Warning,
        Some(CheckStatus::Critical | CheckStatus::Maintenance) => Health::Critical,
    }
}

#[async_trait::async_trait]
impl DnsCatalog for CatalogDns {
    async fn service_instances(&self, dc: Option<&str>, service: &str, tag: Option<&str>) -> Result<Vec<Instance>, LookupError> {
        let dc = self.dc_of(dc);
        let q = CatalogQuery::ServiceInstances { service: service.into(), tag: tag.map(Into::into) };
        let CatalogAnswer::Instances(list) = self.read(dc, q).await? else {
            return Err(LookupError::Unavailable("unexpected catalog answer".into()));
        };
        Ok(list.iter().map(|(n, s, checks)| self.instance(dc, n, s, checks)).collect())
    }

    async fn connect_instances(&self, dc: Option<&str>, service: &str) -> Result<Vec<Instance>, LookupError> {
        let dc = self.dc_of(dc);
        let CatalogAnswer::Instances(list) = self.read(dc, CatalogQuery::ConnectInstances { service: service.into() }).await? else {
            return Err(LookupError::Unavailable("unexpected catalog answer".into()));
        };
        Ok(list.iter().map(|(n, s, checks)| self.instance(dc, n, s, checks)).collect())
    }

    async fn node(&self, dc: Option<&str>, name: &str) -> Result<Option<NodeInfo>, LookupError> {
        let dc = self.dc_of(dc);
        let CatalogAnswer::Node(n) = self.read(dc, CatalogQuery::Node { name: name.into() }).await? else {
            return Err(LookupError::Unavailable("unexpected catalog answer".into()));
        };
        Ok(n.map(|n| NodeInfo { name: n.node.to_string(), address: n.address.to_string(), meta: n.meta.clone(), datacenter: dc.to_string() }))
    }

    async fn by_address(&self, ip: IpAddr) -> Result<Vec<PtrTarget>, LookupError> {
        let CatalogAnswer::ByAddress { nodes, services } = self.read(&self.datacenter, CatalogQuery::ByAddress { ip: ip.to_string() }).await? else {
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
        let mut dc = self.dc_of(dc).to_string();
        let q = CatalogQuery::PreparedQuery { name: name.into(), agent: self.node_name.clone(), source: source.map(|ip| ip.to_string()) };
        let Some(mut answer) = self.query_in(&dc, q).await? else { return Ok(None) };
        // Nothing healthy here: the query's failover datacenters, nearest first.
        if answer.instances.is_empty() && dc == self.datacenter {
            let by_distance = self.datacenters().await;
            let read = |dc: String, q| async move { self.read(&dc, q).await.map_err(|e| format!("{e:?}")) };
            if let (Some((remote_dc, remote)), _) = fail_over(&answer.query, &by_distance, &self.datacenter, read).await {
                answer = remote;
                dc = remote_dc;
            }
        }
        // Checks the query ignores do not count towards an instance's health here either.
        let ignored = &answer.query.service.ignore_check_ids;
        let mut instances: Vec<ServiceInstance> = answer
            .instances
            .into_iter()
            .map(|(node, service, mut checks)| {
                checks.retain(|c| !ignored.iter().any(|i| c.check_id == *i));
                ServiceInstance { node, service, checks }
            })
            .collect();
        // Sorted near a node by the state already; otherwise shuffled for load spreading.
        if answer.near.is_none() {
            use rand::seq::SliceRandom;
            instances.shuffle(&mut rand::rng());
        }
        Ok(Some(QueryResult {
            instances: instances.iter().map(|i| self.instance(&dc, &i.node, &i.service, &i.checks)).collect(),
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
                let store = node.store.read();
                Some(store.data().index_of(&[Table::Nodes, Table::Services, Table::Checks, Table::PreparedQueries]))
            }
            Upstream::Rpc { .. } => None,
        }
    }
}
