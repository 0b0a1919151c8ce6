//! Catalog tables: registration, deregistration and the reads behind the catalog and health
//! endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{CheckStatus, HealthCheck, Node, Outcome, RaftIndex, Registration, Service, StateData, Store, Str, Table};

/// One instance of a service with its node and the checks that decide its health.
#[derive(Debug, Clone)]
///
/// Rows are shared with the tables (`Arc`), so a read copies pointers, not records.
pub struct ServiceInstance {
    pub node: Arc<Node>,
    pub service: Arc<Service>,
    pub checks: Vec<Arc<HealthCheck>>,
}

impl ServiceInstance {
    /// The worst status among the instance's checks (passing when it has none).
    pub fn status(&self) -> CheckStatus {
        self.checks.iter().map(|c| c.status).max().unwrap_or(CheckStatus::Passing)
    }
}

fn same_node(a: &Node, b: &Node) -> bool {
    a.id == b.id && a.address == b.address && a.datacenter == b.datacenter && a.tagged_addresses == b.tagged_addresses && a.meta == b.meta
}

fn same_service(a: &Service, b: &Service) -> bool {
    Service { create_index: 0, modify_index: 0, ..a.clone() } == Service { create_index: 0, modify_index: 0, ..b.clone() }
}

fn same_check(a: &HealthCheck, b: &HealthCheck) -> bool {
    HealthCheck { create_index: 0, modify_index: 0, ..a.clone() } == HealthCheck { create_index: 0, modify_index: 0, ..b.clone() }
}

impl Store {
    pub(super) fn register(&mut self, index: RaftIndex, now_ms: u64, r: &Registration) -> Outcome {
        let node_name = r.node.node.clone();
        if node_name.is_empty() {
            return Outcome::Rejected("Must provide node".into());
        }
        let existing_node = self.data.nodes.get(&node_name).cloned();
        if r.node.address.is_empty() && !(r.skip_node_update && existing_node.is_some()) {
            return Outcome::Rejected("Must provide address if SkipNodeUpdate is not set".into());
        }
        let service = match &r.service {
            Some(s) => {
                if s.service.is_empty() {
                    return Outcome::Rejected("Must provide service name with ID".into());
                }
                let mut s = s.clone();
                if s.id.is_empty() {
                    s.id = s.service.clone();
                }
                Some(s)
            }
            None => None,
        };
        let mut checks = Vec::with_capacity(r.checks.len());
        for c in &r.checks {
            let mut c = c.clone();
            if !c.node.is_empty() && c.node != node_name {
                return Outcome::Rejected(format!("Check node '{}' does not match node '{}'", c.node, node_name));
            }
            c.node = node_name.clone();
            if c.check_id.is_empty() {
                c.check_id = c.name.clone();
            }
            if c.check_id.is_empty() {
                return Outcome::Rejected("Must provide a CheckID or Name for each check".into());
            }
            if c.name.is_empty() {
                c.name = c.check_id.clone();
            }
            if !c.service_id.is_empty() {
                let svc: Option<&Service> = match &service {
                    Some(s) if s.id == c.service_id => Some(s),
                    _ => self.data.services.get(&(node_name.clone(), c.service_id.clone())).map(|s| &**s),
                };
                let Some(svc) = svc else {
                    return Outcome::Rejected(format!("Unknown service ID '{}' for check ID '{}'", c.service_id, c.check_id));
                };
                c.service_name = svc.service.clone();
                c.service_tags = svc.tags.clone();
            } else {
                c.service_name.clear();
                c.service_tags.clear();
            }
            checks.push(c);
        }

        // Everything validated: now mutate.
        let mut dirty_services: BTreeSet<String> = BTreeSet::new();
        let node_changed = !matches!(&existing_node, Some(n) if r.skip_node_update || same_node(n, &r.node));
        if node_changed {
            let mut n = r.node.clone();
            n.create_index = existing_node.as_ref().map(|e| e.create_index).unwrap_or(index);
            n.modify_index = index;
            self.data.nodes.insert(node_name.clone(), Arc::new(n));
            self.touch(Table::Nodes);
            dirty_services.extend(self.services_of(&node_name).flat_map(view_keys));
        }
        if let Some(mut s) = service {
            let key = (node_name.clone(), s.id.clone());
            let prev = self.data.services.get(&key).cloned();
            if prev.as_ref().is_none_or(|p| !same_service(p, &s)) {
                s.create_index = prev.as_ref().map(|p| p.create_index).unwrap_or(index);
                s.modify_index = index;
                if let Some(p) = &prev {
                    dirty_services.extend(view_keys(p));
                }
                dirty_services.extend(view_keys(&s));
                if let Some(p) = &prev {
                    self.unindex_service(&key, p);
                }
                self.index_service(&key, &s);
                self.data.services.insert(key, Arc::new(s));
                self.touch(Table::Services);
            }
        }
        for mut c in checks {
            let key = (node_name.clone(), c.check_id.clone());
            let prev = self.data.checks.get(&key).cloned();
            if prev.as_ref().is_some_and(|p| same_check(p, &c)) {
                continue;
            }
            c.create_index = prev.as_ref().map(|p| p.create_index).unwrap_or(index);
            c.modify_index = index;
            let critical = c.status == CheckStatus::Critical;
            self.mark_check_services(&c, &mut dirty_services);
            self.data.checks.insert(key.clone(), Arc::new(c));
            self.touch(Table::Checks);
            if critical {
                self.invalidate_check_sessions(index, now_ms, &node_name, &key.1);
            }
        }
        self.bump_services(index, dirty_services);
        Outcome::Done
    }

    pub(super) fn deregister(&mut self, index: RaftIndex, now_ms: u64, node: &str, service_id: Option<&str>, check_id: Option<&str>) -> Outcome {
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        match (service_id, check_id) {
            (None, None) => {
                if self.data.nodes.remove(node).is_none() {
                    return Outcome::Done;
                }
                self.touch(Table::Nodes);
                if self.data.coordinates.remove(node).is_some() {
                    self.touch(Table::Coordinates);
                }
                let svc_keys: Vec<_> = self.data.services.range(node_range(node)).map(|(k, _)| k.clone()).collect();
                for k in svc_keys {
                    if let Some(s) = self.data.services.remove(&k) {
                        self.unindex_service(&k, &s);
                        dirty.extend(view_keys(&s));
                        self.touch(Table::Services);
                    }
                }
                let check_keys: Vec<_> = self.data.checks.range(node_range(node)).map(|(k, _)| k.clone()).collect();
                for k in check_keys {
                    self.data.checks.remove(&k);
                    self.touch(Table::Checks);
                }
                let sessions: Vec<String> = self.data.sessions.values().filter(|s| s.node == node).map(|s| s.id.clone()).collect();
                for id in sessions {
                    self.session_destroy(index, now_ms, &id);
                }
            }
            (Some(sid), _) => {
                let key: (Str, Str) = (node.into(), sid.into());
                if let Some(s) = self.data.services.remove(&key) {
                    self.unindex_service(&key, &s);
                    dirty.extend(view_keys(&s));
                    self.touch(Table::Services);
                }
                let check_keys: Vec<_> =
                    self.data.checks.range(node_range(node)).filter(|(_, c)| c.service_id == sid).map(|(k, _)| k.clone()).collect();
                for k in check_keys {
                    self.data.checks.remove(&k);
                    self.touch(Table::Checks);
                    self.invalidate_check_sessions(index, now_ms, node, &k.1);
                }
            }
            (None, Some(cid)) => {
                if let Some(c) = self.data.checks.remove(&(node.into(), cid.into())) {
                    self.touch(Table::Checks);
                    self.mark_check_services(&c, &mut dirty);
                    self.invalidate_check_sessions(index, now_ms, node, cid);
                }
            }
        }
        self.bump_services(index, dirty);
        Outcome::Done
    }

    /// A node-level check affects every service on the node; a service check only its own.
    fn mark_check_services(&self, c: &HealthCheck, dirty: &mut BTreeSet<String>) {
        if c.service_id.is_empty() {
            dirty.extend(self.services_of(&c.node).flat_map(view_keys));
        } else if let Some(s) = self.data.services.get(&(c.node.clone(), c.service_id.clone())) {
            dirty.extend(view_keys(s));
        } else {
            dirty.insert(c.service_name.to_string());
        }
    }

    fn services_of<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Service> + 'a {
        self.data.services.range(node_range(node)).map(|(_, s)| &**s)
    }

    fn bump_services(&mut self, index: RaftIndex, names: BTreeSet<String>) {
        for n in names {
            self.data.service_index.insert(n.clone(), index);
            self.pending.services.insert(n);
        }
    }

    /// Index a service under every view it shows up in (its name, a connect view).
    fn index_service(&mut self, key: &(Str, Str), s: &Service) {
        for v in view_keys(s) {
            self.data.by_service.0.entry(v).or_default().insert(key.clone());
        }
    }

    fn unindex_service(&mut self, key: &(Str, Str), s: &Service) {
        for v in view_keys(s) {
            if let Some(set) = self.data.by_service.0.get_mut(&v) {
                set.remove(key);
                if set.is_empty() {
                    self.data.by_service.0.remove(&v);
                }
            }
        }
    }

    /// Destroy the sessions that depend on a check that just failed or went away.
    fn invalidate_check_sessions(&mut self, index: RaftIndex, now_ms: u64, node: &str, check_id: &str) {
        let ids: Vec<String> = self
            .data
            .sessions
            .values()
            .filter(|s| s.node == node && (s.node_checks.iter().any(|c| c == check_id) || s.service_checks.iter().any(|c| c.id == check_id)))
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            self.session_destroy(index, now_ms, &id);
        }
    }
}

/// The views a service shows up in: its own (catalog and health of its name) and, for a proxy
/// or a connect-native service, the connect view of the service it serves.
pub fn view_keys(s: &Service) -> Vec<String> {
    let mut v = vec![s.service.to_string()];
    if let Some(p) = &s.proxy {
        v.push(connect_view_key(&p.destination_service_name));
    }
    if s.connect_native {
        v.push(connect_view_key(&s.service));
    }
    if !s.kind.is_empty() {
        v.push(kind_view_key(&s.kind));
    }
    v
}

/// The key under which the services of a kind (mesh gateways, ...) are indexed and watched, so
/// that finding them costs their own count, not a scan of the whole catalog.
pub fn kind_view_key(kind: &str) -> String {
    format!("\u{0}kind\u{0}{kind}")
}

/// The key under which a service's connect view (its sidecars and native instances) is
/// indexed and watched: a NUL-prefixed name no service can have.
pub fn connect_view_key(service: &str) -> String {
    format!("\u{0}connect\u{0}{service}")
}

/// The key range of every row belonging to `node` in a (node, id) keyed table.
fn node_range(node: &str) -> std::ops::RangeInclusive<(Str, Str)> {
    (node.into(), Str::new())..=(node.into(), Str::from(char::MAX))
}

/// A node and its services.
pub type NodeServices = (Arc<Node>, Vec<Arc<Service>>);

/// An instance as catalog answers carry it: node, service, and the checks deciding its health.
pub type InstanceRow = (Arc<Node>, Arc<Service>, Vec<Arc<HealthCheck>>);

/// Filters a catalog or health service query can apply before `?filter=`.
#[derive(Debug, Default, Clone)]
pub struct ServiceQuery {
    pub tags: Vec<String>,
    pub node_meta: BTreeMap<String, String>,
    pub passing_only: bool,
    /// The connect view: the service's sidecars and its connect-native instances.
    pub connect: bool,
}

impl StateData {
    pub fn node_list(&self, node_meta: &BTreeMap<String, String>) -> (Vec<Arc<Node>>, RaftIndex) {
        let nodes = self.nodes.values().filter(|n| meta_matches(&n.meta, node_meta)).cloned().collect();
        (nodes, self.index_of(&[Table::Nodes]))
    }

    /// Service name -> union of tags, for nodes matching `node_meta`.
    pub fn service_list(&self, node_meta: &BTreeMap<String, String>) -> (BTreeMap<String, BTreeSet<String>>, RaftIndex) {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for ((node, _), s) in &self.services {
            if !node_meta.is_empty() && !self.nodes.get(node).is_some_and(|n| meta_matches(&n.meta, node_meta)) {
                continue;
            }
            out.entry(s.service.to_string()).or_default().extend(s.tags.iter().map(|t| t.to_string()));
        }
        (out, self.index_of(&[Table::Services, Table::Nodes]))
    }

    /// Every service instance (checks left out), on nodes matching `node_meta`.
    pub fn all_instances(&self, node_meta: &BTreeMap<String, String>) -> Vec<ServiceInstance> {
        self.services
            .iter()
            .filter_map(|((node, _), s)| {
                let n = self.nodes.get(node)?;
                meta_matches(&n.meta, node_meta).then(|| ServiceInstance { node: n.clone(), service: s.clone(), checks: Vec::new() })
            })
            .collect()
    }

    /// The index a service's catalog or health view last changed at.
    pub fn service_view_index(&self, name: &str) -> RaftIndex {
        self.service_index.get(name).copied().unwrap_or_else(|| self.index_of(&[Table::Services, Table::Nodes, Table::Checks]))
    }

    pub fn service_instances(&self, name: &str, q: &ServiceQuery) -> (Vec<ServiceInstance>, RaftIndex) {
        let mut out = Vec::new();
        let lookup = if q.connect { connect_view_key(name) } else { name.to_string() };
        let keys = self.by_service.0.get(&lookup).into_iter().flatten();
        for (node_name, s) in keys.filter_map(|k| self.services.get(k).map(|s| (&k.0, s))) {
            if !q.tags.iter().all(|t| s.tags.iter().any(|x| x == t)) {
                continue;
            }
            let Some(node) = self.nodes.get(node_name) else {
                continue;
            };
            if !meta_matches(&node.meta, &q.node_meta) {
                continue;
            }
            let checks = self.instance_checks(node_name, &s.id);
            let inst = ServiceInstance { node: node.clone(), service: s.clone(), checks };
            if q.passing_only && inst.status() != CheckStatus::Passing {
                continue;
            }
            out.push(inst);
        }
        (out, self.service_view_index(&lookup))
    }

    /// Every instance of services of `kind` (e.g. "mesh-gateway"), in node order.
    pub fn instances_of_kind(&self, kind: &str) -> Vec<ServiceInstance> {
        let keys = self.by_service.0.get(&kind_view_key(kind)).into_iter().flatten();
        keys.filter_map(|k| Some((k, self.services.get(k)?)))
            .filter(|(_, s)| s.kind == kind)
            .filter_map(|((node, id), s)| {
                let n = self.nodes.get(node)?;
                Some(ServiceInstance { node: n.clone(), service: s.clone(), checks: self.instance_checks(node, id) })
            })
            .collect()
    }

    /// The checks that decide an instance's health: the node's own and the service's.
    pub(super) fn instance_checks(&self, node: &str, service_id: &str) -> Vec<Arc<HealthCheck>> {
        self.checks.range(node_range(node)).map(|(_, c)| c).filter(|c| c.service_id.is_empty() || c.service_id == service_id).cloned().collect()
    }

    pub fn node_services(&self, node: &str) -> (Option<NodeServices>, RaftIndex) {
        let idx = self.index_of(&[Table::Nodes, Table::Services]);
        let found = self.nodes.get(node).map(|n| (n.clone(), self.services.range(node_range(node)).map(|(_, s)| s.clone()).collect()));
        (found, idx)
    }

    pub fn node_checks(&self, node: &str) -> (Vec<Arc<HealthCheck>>, RaftIndex) {
        (self.checks.range(node_range(node)).map(|(_, c)| c.clone()).collect(), self.index_of(&[Table::Checks]))
    }

    pub fn service_checks(&self, service: &str) -> (Vec<Arc<HealthCheck>>, RaftIndex) {
        let mut checks = Vec::new();
        for (node, sid) in self.by_service.0.get(service).into_iter().flatten() {
            checks.extend(self.checks.range(node_range(node)).map(|(_, c)| c).filter(|c| &c.service_id == sid).cloned());
        }
        (checks, self.service_view_index(service))
    }

    /// Checks in `state`; `None` means any state.
    pub fn checks_in_state(&self, state: Option<CheckStatus>) -> (Vec<Arc<HealthCheck>>, RaftIndex) {
        let checks = self.checks.values().filter(|c| state.is_none_or(|s| c.status == s)).cloned().collect();
        (checks, self.index_of(&[Table::Checks]))
    }
}

impl StateData {
    /// The node a `near` value names: `_agent` is `agent`, `_ip` the node at `client_ip`,
    /// empty is none, anything else a node name.
    pub fn near_node(&self, near: &str, agent: &str, client_ip: Option<&str>) -> Option<String> {
        match near {
            "" => None,
            "_agent" => Some(agent.to_string()),
            "_ip" => client_ip.and_then(|ip| self.nodes.values().find(|n| n.address == ip)).map(|n| n.node.to_string()),
            name => Some(name.to_string()),
        }
    }

    /// Order `items` for `?near=` / `Near`: by estimated round trip from `near`'s network
    /// coordinate to each item's node, the near node itself first, nodes without a coordinate
    /// last; ties (and everything, when `near` has no coordinate but for itself first) in
    /// random order.
    pub fn sort_near<T>(&self, items: &mut [T], node_of: impl Fn(&T) -> &str, near: &str) {
        use rand::seq::SliceRandom;
        items.shuffle(&mut rand::rng());
        let origin = self.coordinates.get(near).map(|e| &e.coord);
        items.sort_by_key(|item| {
            let node = node_of(item);
            if node.eq_ignore_ascii_case(near) {
                return std::time::Duration::ZERO;
            }
            match (origin, self.coordinates.get(node)) {
                (Some(a), Some(b)) => a.distance_to(&b.coord).max(std::time::Duration::from_nanos(1)),
                _ => std::time::Duration::MAX,
            }
        });
    }
}

pub(super) fn meta_matches(meta: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| meta.get(k) == Some(v))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::tests::req;
    use super::super::{Command, Outcome, Store};
    use super::*;

    pub fn web_registration(node: &str, addr: &str) -> Registration {
        Registration {
            node: Node { node: node.into(), address: addr.into(), ..Default::default() },
            service: Some(Service { service: "web".into(), port: 80, tags: vec!["v1".into()], ..Default::default() }),
            checks: vec![HealthCheck {
                check_id: "web-alive".into(),
                name: "web alive".into(),
                status: CheckStatus::Passing,
                service_id: "web".into(),
                ..Default::default()
            }],
            skip_node_update: false,
        }
    }

    #[test]
    fn register_creates_node_service_and_check_with_indexes() {
        let mut s = Store::new();
        assert_eq!(s.apply(10, &req(Command::Register(web_registration("n1", "10.0.0.1")))), Outcome::Done);
        let d = s.data();
        assert_eq!(d.nodes["n1"].create_index, 10);
        let (inst, idx) = d.service_instances("web", &ServiceQuery::default());
        assert_eq!(idx, 10);
        assert_eq!(inst.len(), 1);
        assert_eq!(inst[0].checks[0].service_name, "web");
    }

    #[test]
    fn services_of_a_kind_are_found_through_their_index_and_leave_it() {
        let mut s = Store::new();
        s.apply(1, &req(Command::Register(web_registration("n1", "10.0.0.1"))));
        let mut gw = web_registration("n2", "10.0.0.2");
        if let Some(svc) = gw.service.as_mut() {
            svc.kind = "mesh-gateway".into();
            svc.service = "gateway".into();
        }
        gw.checks.clear();
        s.apply(2, &req(Command::Register(gw)));
        let found: Vec<_> = s.data().instances_of_kind("mesh-gateway").iter().map(|i| i.node.node.to_string()).collect();
        assert_eq!(found, ["n2"]);
        assert!(s.data().instances_of_kind("terminating-gateway").is_empty());
        // The index a loaded snapshot rebuilds finds them too.
        let mut d = s.data().clone();
        d.by_service = Default::default();
        d.rebuild_indexes();
        assert_eq!(d.instances_of_kind("mesh-gateway").len(), 1);
        s.apply(3, &req(Command::Deregister { node: "n2".into(), service_id: None, check_id: None }));
        assert!(s.data().instances_of_kind("mesh-gateway").is_empty());
    }

    #[test]
    fn reregistering_unchanged_data_keeps_modify_index() {
        let mut s = Store::new();
        s.apply(10, &req(Command::Register(web_registration("n1", "10.0.0.1"))));
        s.apply(11, &req(Command::Register(web_registration("n1", "10.0.0.1"))));
        assert_eq!(s.data().nodes["n1"].modify_index, 10);
        assert_eq!(s.data().service_view_index("web"), 10);
    }

    #[test]
    fn register_without_address_is_rejected_and_changes_nothing() {
        let mut s = Store::new();
        let mut r = web_registration("n1", "");
        r.node.address.clear();
        assert!(matches!(s.apply(3, &req(Command::Register(r))), Outcome::Rejected(_)));
        assert!(s.data().nodes.is_empty());
    }

    #[test]
    fn check_for_unknown_service_is_rejected() {
        let mut s = Store::new();
        let mut r = web_registration("n1", "10.0.0.1");
        r.service = None;
        assert!(matches!(s.apply(3, &req(Command::Register(r))), Outcome::Rejected(m) if m.contains("Unknown service")));
        assert!(s.data().nodes.is_empty());
    }

    #[test]
    fn passing_filter_skips_critical_instances() {
        let mut s = Store::new();
        s.apply(1, &req(Command::Register(web_registration("n1", "10.0.0.1"))));
        let mut bad = web_registration("n2", "10.0.0.2");
        bad.checks[0].status = CheckStatus::Critical;
        s.apply(2, &req(Command::Register(bad)));
        let q = ServiceQuery { passing_only: true, ..Default::default() };
        let (inst, _) = s.data().service_instances("web", &q);
        assert_eq!(inst.iter().map(|i| i.node.node.as_str()).collect::<Vec<_>>(), vec!["n1"]);
    }

    #[test]
    fn deregistering_a_node_removes_its_services_and_checks() {
        let mut s = Store::new();
        s.apply(1, &req(Command::Register(web_registration("n1", "10.0.0.1"))));
        s.apply(2, &req(Command::Deregister { node: "n1".into(), service_id: None, check_id: None }));
        assert!(s.data().services.is_empty() && s.data().checks.is_empty() && s.data().nodes.is_empty());
        assert_eq!(s.data().service_view_index("web"), 2);
    }
}

/// Catalog reads that client agents send to a server (DNS answers them on every agent).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum CatalogQuery {
    /// Instances of a service (names compared case-insensitively, as DNS names are).
    ServiceInstances {
        service: String,
        tag: Option<String>,
    },
    Node {
        name: String,
    },
    /// The instances that carry a service's mesh traffic (`<svc>.connect.consul`): its
    /// sidecar proxies and connect-native instances.
    ConnectInstances {
        service: String,
    },
    /// Nodes, and service instances with their own address, at this IP.
    ByAddress {
        ip: String,
    },
    /// Run a query given by its definition (another datacenter failing over to this one).
    ExecuteQuery(Box<super::query::PreparedQuery>),
    /// Execute a prepared query; `agent` and `source` resolve `Near` values `_agent` and `_ip`.
    PreparedQuery {
        name: String,
        agent: String,
        source: Option<String>,
    },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum CatalogAnswer {
    /// (node, service, the node's and the service's checks)
    Instances(Vec<InstanceRow>),
    Node(Option<Arc<Node>>),
    ByAddress {
        nodes: Vec<String>,
        services: Vec<(String, String)>,
    },
    /// The rendered query, its instances (nearest first when `Near` resolved to a node, which
    /// `near` names), and the node `Near` resolved to. `Err` is a query that cannot render.
    Query(Result<Option<Box<QueryAnswer>>, String>),
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueryAnswer {
    pub query: super::query::PreparedQuery,
    pub instances: Vec<InstanceRow>,
    pub near: Option<String>,
}

impl StateData {
    pub fn answer(&self, q: &CatalogQuery) -> CatalogAnswer {
        match q {
            CatalogQuery::ServiceInstances { service, tag } => {
                let mut out = Vec::new();
                for ((node_name, _), s) in &self.services {
                    if !s.service.eq_ignore_ascii_case(service) || tag.as_ref().is_some_and(|t| !s.tags.iter().any(|x| x.eq_ignore_ascii_case(t))) {
                        continue;
                    }
                    let Some(node) = self.nodes.get(node_name) else { continue };
                    let checks = self.instance_checks(node_name, &s.id);
                    out.push((node.clone(), s.clone(), checks));
                }
                CatalogAnswer::Instances(out)
            }
            CatalogQuery::ConnectInstances { service } => {
                let mut out = Vec::new();
                for ((node_name, _), s) in &self.services {
                    let serves = view_keys(s).iter().any(|k| k.strip_prefix("\u{0}connect\u{0}").is_some_and(|v| v.eq_ignore_ascii_case(service)));
                    if !serves {
                        continue;
                    }
                    let Some(node) = self.nodes.get(node_name) else { continue };
                    let checks = self.instance_checks(node_name, &s.id);
                    out.push((node.clone(), s.clone(), checks));
                }
                CatalogAnswer::Instances(out)
            }
            CatalogQuery::Node { name } => CatalogAnswer::Node(self.nodes.values().find(|n| n.node.eq_ignore_ascii_case(name)).cloned()),
            CatalogQuery::ByAddress { ip } => CatalogAnswer::ByAddress {
                nodes: self.nodes.values().filter(|n| n.address == ip.as_str()).map(|n| n.node.to_string()).collect(),
                services: self
                    .services
                    .iter()
                    .filter(|(_, s)| s.address == ip.as_str())
                    .map(|((node, _), s)| (s.service.to_string(), node.to_string()))
                    .collect(),
            },
            CatalogQuery::ExecuteQuery(q) => {
                let instances = self.execute_query(q).into_iter().map(|i| (i.node, i.service, i.checks)).collect();
                CatalogAnswer::Query(Ok(Some(Box::new(QueryAnswer { query: (**q).clone(), instances, near: None }))))
            }
            CatalogQuery::PreparedQuery { name, agent, source } => CatalogAnswer::Query(self.resolve_query(name).map(|q| {
                q.map(|q| {
                    let near = self.near_node(&q.service.near, agent, source.as_deref());
                    let mut found = self.execute_query(&q);
                    if let Some(near) = &near {
                        self.sort_near(&mut found, |i| i.node.node.as_str(), near);
                    }
                    let instances = found.into_iter().map(|i| (i.node, i.service, i.checks)).collect();
                    Box::new(QueryAnswer { query: q, instances, near })
                })
            })),
        }
    }
}
