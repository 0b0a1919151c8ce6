//! The discovery chain compiler: config entries (`service-router`, `service-splitter`,
//! `service-resolver`, `service-defaults`, `proxy-defaults`) distilled into the graph a proxy
//! walks for one upstream, in Consul's `/v1/discovery-chain/:service` JSON (`{"Chain": {...}}`):
//! a start node, router/splitter/resolver nodes and the targets (service, subset, datacenter,
//! SNI, mesh gateway mode, connect timeout) that resolvers end in.
//!
//! It follows Consul's compiler step for step (redirects, default subsets, failover targets
//! compiled through the same resolution, nested splitters flattened with effective weights,
//! unreachable nodes pruned, cycles and protocol mismatches refused), so its errors are
//! Consul's graph errors. `validate_write` runs it over every chain a proposed config entry
//! change could touch, as Consul's state store does before accepting the write.
//!
//! Pure: reads the parsed entries, knows nothing of Raft, the network or HTTP.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::chain_entry::{scale_weight, weight_json};
use crate::state::mesh::ConfigEntry;

/// A resolver without `ConnectTimeout` gives its targets this (Consul's compiler default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Namespaces and partitions are an Enterprise feature: every chain lives in these.
const NAMESPACE: &str = "default";
const PARTITION: &str = "default";
/// The trust domain used while only validating (no SNI is ever shown).
const VALIDATION_TRUST_DOMAIN: &str = "validation.consul";

/// Why a chain does not compile (Consul's `ConfigEntryGraphError` texts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("discovery chain {chain:?} uses inconsistent protocols; service {service:?} has {protocol:?} which is not {first:?}")]
    InconsistentProtocols { chain: String, service: String, protocol: String, first: String },
    #[error("discovery chain {chain:?} uses a protocol {protocol:?} that does not permit advanced routing or splitting behavior")]
    NoAdvancedRouting { chain: String, protocol: String },
    #[error("detected circular resolver redirect: [{}]", path.join(" -> "))]
    CircularRedirect { path: Vec<String> },
    #[error("detected circular reference: [{}]", path.join(" -> "))]
    CircularReference { path: Vec<String> },
    #[error("service {service:?} does not have a subset named {subset:?}")]
    MissingSubset { service: String, subset: String },
    #[error("service {service:?} has an external SNI set; cannot define {what} for external services")]
    ExternalService { service: String, what: &'static str },
    #[error("service {service:?} has protocol {protocol:?}, which is incompatible with L7 intentions permissions")]
    L7IntentionsNeedHttp { service: String, protocol: String },
}

/// What `POST /v1/discovery-chain/:service` may change about a compilation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Every target's connect timeout (when set and non-zero).
    pub connect_timeout: Option<Duration>,
    /// The chain's protocol; a non-HTTP one drops routers and splitters.
    pub protocol: Option<String>,
    /// Every (non-external) target's mesh gateway mode: `none`, `local` or `remote`.
    pub mesh_gateway_mode: Option<String>,
}

/// Whether a protocol allows routers, splitters and L7 intentions (Consul's `IsProtocolHTTPLike`).
pub fn is_http_like(protocol: &str) -> bool {
    matches!(protocol, "http" | "http2" | "grpc")
}

/// The config entries a chain is compiled from, parsed once, by kind and name.
#[derive(Debug, Clone, Default)]
pub struct ChainEntries {
    routers: HashMap<String, Value>,
    splitters: HashMap<String, Value>,
    resolvers: HashMap<String, Value>,
    service_defaults: HashMap<String, Value>,
    intentions: HashMap<String, Value>,
    proxy_defaults: Option<Value>,
}

impl ChainEntries {
    pub fn from_state(entries: &BTreeMap<(String, String), ConfigEntry>) -> ChainEntries {
        let mut set = ChainEntries::default();
        for ((kind, name), e) in entries {
            if let Ok(v) = serde_json::from_str::<Value>(&e.json) {
                set.set(kind, name, Some(v));
            }
        }
        set
    }

    /// Put (or with `None` remove) one entry.
    pub fn set(&mut self, kind: &str, name: &str, v: Option<Value>) {
        let map = match kind {
            "service-router" => &mut self.routers,
            "service-splitter" => &mut self.splitters,
            "service-resolver" => &mut self.resolvers,
            "service-defaults" => &mut self.service_defaults,
            "service-intentions" => &mut self.intentions,
            "proxy-defaults" => {
                self.proxy_defaults = v;
                return;
            }
            _ => return,
        };
        match v {
            Some(v) => map.insert(name.to_string(), v),
            None => map.remove(name),
        };
    }

    /// A service's protocol by Consul's rule: its `service-defaults` `Protocol` when that entry
    /// exists (even empty), else `proxy-defaults` `Config.protocol`, else tcp; lower-cased.
    pub fn protocol(&self, service: &str) -> String {
        let p = match self.service_defaults.get(service) {
            Some(sd) => text(&sd["Protocol"]),
            None => self.proxy_defaults.as_ref().map(|pd| text(&pd["Config"]["protocol"])).unwrap_or_default(),
        };
        if p.is_empty() { "tcp".into() } else { p.to_ascii_lowercase() }
    }

    /// Every service some entry names or points at: the chains a change could affect.
    fn services(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = BTreeSet::new();
        for map in [&self.routers, &self.splitters, &self.resolvers, &self.service_defaults] {
            out.extend(map.keys().cloned());
        }
        let mut add = |v: &Value| {
            if let Some(s) = v.as_str().filter(|s| !s.is_empty()) {
                out.insert(s.to_string());
            }
        };
        for r in self.routers.values() {
            for route in r["Routes"].as_array().into_iter().flatten() {
                add(&route["Destination"]["Service"]);
            }
        }
        for s in self.splitters.values() {
            for split in s["Splits"].as_array().into_iter().flatten() {
                add(&split["Service"]);
            }
        }
        for r in self.resolvers.values() {
            add(&r["Redirect"]["Service"]);
            for f in r["Failover"].as_object().into_iter().flat_map(|m| m.values()) {
                add(&f["Service"]);
                for t in f["Targets"].as_array().into_iter().flatten() {
                    add(&t["Service"]);
                }
            }
        }
        out
    }
}

/// A weakly typed scalar as text (`Config.protocol` may arrive as anything).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn go_duration(v: &Value) -> Duration {
    match v {
        Value::String(s) => crate::duration::parse_go(s).unwrap_or_default(),
        Value::Number(n) => Duration::from_nanos(n.as_u64().unwrap_or(0)),
        _ => Duration::ZERO,
    }
}

/// Compile the chain of `service` as seen from `evaluate_in_dc`, from the state's config entries.
pub fn compile(
    entries: &BTreeMap<(String, String), ConfigEntry>,
    service: &str,
    evaluate_in_dc: &str,
    trust_domain: &str,
    overrides: &Overrides,
) -> Result<Value, ChainError> {
    compile_set(&ChainEntries::from_state(entries), service, evaluate_in_dc, trust_domain, overrides)
}

/// `compile` over entries already parsed.
pub fn compile_set(
    entries: &ChainEntries,
    service: &str,
    evaluate_in_dc: &str,
    trust_domain: &str,
    overrides: &Overrides,
) -> Result<Value, ChainError> {
    let mut c = Compiler {
        e: entries,
        service,
        dc: evaluate_in_dc,
        td: trust_domain,
        ov: overrides,
        disable_advanced: overrides.protocol.as_deref().is_some_and(|p| !p.is_empty() && !is_http_like(p)),
        uses_advanced: false,
        customized: Customized::default(),
        protocol: None,
        resolve_nodes: HashMap::new(),
        nodes: BTreeMap::new(),
        targets: BTreeMap::new(),
        retained: BTreeSet::new(),
    };
    c.compile()
}

/// Check a proposed config entry change (`proposed` the new canonical JSON, `None` a delete)
/// against the rules that span entries: every chain it could touch must still compile, and
/// every destination with L7 intentions must still speak an HTTP-like protocol. Chains that
/// were already broken before the change do not block it.
pub fn validate_write(
    current: &BTreeMap<(String, String), ConfigEntry>,
    kind: &str,
    name: &str,
    proposed: Option<&Value>,
    datacenter: &str,
) -> Result<(), ChainError> {
    if !matches!(kind, "service-router" | "service-splitter" | "service-resolver" | "service-defaults" | "proxy-defaults" | "service-intentions") {
        return Ok(());
    }
    let old = ChainEntries::from_state(current);
    let mut new = old.clone();
    new.set(kind, name, proposed.cloned());
    if kind != "service-intentions" {
        let mut services = old.services();
        services.extend(new.services());
        if kind != "proxy-defaults" {
            services.insert(name.to_string());
        }
        let none = Overrides::default();
        for svc in &services {
            if let Err(err) = compile_set(&new, svc, datacenter, VALIDATION_TRUST_DOMAIN, &none)
                && compile_set(&old, svc, datacenter, VALIDATION_TRUST_DOMAIN, &none).is_ok()
            {
                return Err(err);
            }
        }
    }
    let has_l7 = |set: &ChainEntries, dest: &str| {
        set.intentions.get(dest).is_some_and(|e| e["Sources"].as_array().into_iter().flatten().any(|s| s.get("Permissions").is_some()))
    };
    for dest in new.intentions.keys().filter(|d| d.as_str() != "*") {
        let protocol = new.protocol(dest);
        if !has_l7(&new, dest) || is_http_like(&protocol) {
            continue;
        }
        let was_broken = has_l7(&old, dest) && !is_http_like(&old.protocol(dest));
        if !was_broken || (kind == "service-intentions" && name == dest) {
            return Err(ChainError::L7IntentionsNeedHttp { service: dest.clone(), protocol });
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Customized {
    mesh_gateway: bool,
    protocol: bool,
    connect_timeout: bool,
}

/// What names a target: the same options give the same target.
#[derive(Debug, Clone, Default)]
struct Opts {
    service: String,
    subset: String,
    namespace: String,
    partition: String,
    datacenter: String,
}

#[derive(Debug, Clone)]
struct Target {
    id: String,
    service: String,
    subset: String,
    datacenter: String,
    mesh_gateway: String,
    subset_def: Value,
    dialed_directly: bool,
    connect_timeout: Duration,
    external: bool,
    sni: String,
    name: String,
}

#[derive(Debug, Clone)]
struct Route {
    definition: Value,
    next: String,
}

#[derive(Debug, Clone)]
struct Split {
    definition: Value,
    weight: f32,
    next: String,
}

#[derive(Debug, Clone)]
struct Resolver {
    default: bool,
    connect_timeout: Duration,
    request_timeout: Duration,
    target: String,
    failover: Option<(Vec<String>, Option<Value>)>,
}

#[derive(Debug, Clone)]
enum NodeKind {
    Router(Vec<Route>),
    Splitter(Vec<Split>),
    Resolver(Resolver),
}

#[derive(Debug, Clone)]
struct Node {
    name: String,
    kind: NodeKind,
    load_balancer: Option<Value>,
}

impl Node {
    fn key(&self) -> String {
        let t = match self.kind {
            NodeKind::Router(_) => "router",
            NodeKind::Splitter(_) => "splitter",
            NodeKind::Resolver(_) => "resolver",
        };
        format!("{t}:{}", self.name)
    }

    fn next_nodes(&self) -> Vec<String> {
        match &self.kind {
            NodeKind::Router(r) => r.iter().map(|r| r.next.clone()).collect(),
            NodeKind::Splitter(s) => s.iter().map(|s| s.next.clone()).collect(),
            NodeKind::Resolver(_) => Vec::new(),
        }
    }
}

/// A resolved resolver node: its key, its final target and its load balancer.
struct Resolved {
    key: String,
    target: String,
    load_balancer: Option<Value>,
}

struct Compiler<'a> {
    e: &'a ChainEntries,
    service: &'a str,
    dc: &'a str,
    td: &'a str,
    ov: &'a Overrides,
    disable_advanced: bool,
    uses_advanced: bool,
    customized: Customized,
    protocol: Option<String>,
    /// Resolver node key by target ID.
    resolve_nodes: HashMap<String, String>,
    nodes: BTreeMap<String, Node>,
    targets: BTreeMap<String, Target>,
    retained: BTreeSet<String>,
}

fn service_id(svc: &str) -> String {
    format!("{svc}.{NAMESPACE}.{PARTITION}")
}

fn is_hash_based(lb: &Value) -> bool {
    matches!(s(lb, "Policy"), "ring_hash" | "maglev")
}

/// Consul's `MergeHTTPHeaderModifiers(base, overrides)`: `overrides` wins where both speak.
fn merge_header_mods(base: Option<&Value>, overrides: Option<&Value>) -> Option<Value> {
    let (base, over) = match (base, overrides) {
        (None, None) => return None,
        (Some(b), None) => return Some(b.clone()),
        (None, Some(o)) => return Some(o.clone()),
        (Some(b), Some(o)) => (b, o),
    };
    let mut merged = over.as_object().cloned().unwrap_or_default();
    let over_set = over["Set"].as_object().cloned().unwrap_or_default();
    let mut add = merged.get("Add").and_then(Value::as_object).cloned().unwrap_or_default();
    for (k, v) in base["Add"].as_object().into_iter().flatten() {
        if !over_set.contains_key(k) && !add.contains_key(k) {
            add.insert(k.clone(), v.clone());
        }
    }
    let mut set = over_set.clone();
    for (k, v) in base["Set"].as_object().into_iter().flatten() {
        set.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let mut remove: Vec<Value> = merged.get("Remove").and_then(Value::as_array).cloned().unwrap_or_default();
    for r in base["Remove"].as_array().into_iter().flatten() {
        let re_added = r.as_str().is_some_and(|r| add.contains_key(r) || set.contains_key(r));
        if !re_added && !remove.contains(r) {
            remove.push(r.clone());
        }
    }
    for (k, v) in [("Add", Value::Object(add)), ("Set", Value::Object(set)), ("Remove", Value::Array(remove))] {
        let empty = v.as_object().is_some_and(Map::is_empty) || v.as_array().is_some_and(Vec::is_empty);
        if empty {
            merged.remove(k);
        } else {
            merged.insert(k.into(), v);
        }
    }
    Some(Value::Object(merged))
}

/// Consul's `ServiceSplit.MergeParent`: a nested split keeps the parent's request header
/// changes under its own, and the parent's response changes over its own.
fn merge_parent(child: &Value, parent: &Value) -> Value {
    let mut out = child.clone();
    let req = merge_header_mods(parent.get("RequestHeaders"), child.get("RequestHeaders"));
    let resp = merge_header_mods(child.get("ResponseHeaders"), parent.get("ResponseHeaders"));
    if let Value::Object(o) = &mut out {
        for (k, v) in [("RequestHeaders", req), ("ResponseHeaders", resp)] {
            match v {
                Some(v) => o.insert(k.into(), v),
                None => o.remove(k),
            };
        }
    }
    out
}

impl Compiler<'_> {
    fn compile(&mut self) -> Result<Value, ChainError> {
        let start = self.assemble()?;
        self.detect_cycles(&start, &mut Vec::new())?;
        self.flatten_splitters();
        self.prune(&start);
        let retained = std::mem::take(&mut self.retained);
        self.targets.retain(|id, _| retained.contains(id));
        let protocol = self.protocol.clone().unwrap_or_else(|| "tcp".into());
        if !is_http_like(&protocol) && self.uses_advanced {
            return Err(ChainError::NoAdvancedRouting { chain: self.service.into(), protocol });
        }
        let mut protocol = protocol;
        if let Some(p) = self.ov.protocol.as_deref().filter(|p| !p.is_empty())
            && p != protocol
        {
            protocol = p.to_string();
            self.customized.protocol = true;
        }
        Ok(self.render(&start, &protocol))
    }

    fn record_protocol(&mut self, svc: &str) -> Result<(), ChainError> {
        let p = self.e.protocol(svc);
        match &self.protocol {
            None => self.protocol = Some(p),
            Some(first) if *first != p => {
                return Err(ChainError::InconsistentProtocols { chain: self.service.into(), service: svc.into(), protocol: p, first: first.clone() });
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The target for `opts` (namespace, partition and datacenter defaulted), made once.
    fn new_target(&mut self, mut o: Opts) -> String {
        if o.datacenter.is_empty() {
            o.datacenter = self.dc.to_string();
        }
        if o.namespace.is_empty() {
            o.namespace = NAMESPACE.into();
        }
        if o.partition.is_empty() {
            o.partition = PARTITION.into();
        }
        let id = if o.subset.is_empty() {
            format!("{}.{}.{}.{}", o.service, o.namespace, o.partition, o.datacenter)
        } else {
            format!("{}.{}.{}.{}.{}", o.subset, o.service, o.namespace, o.partition, o.datacenter)
        };
        if !self.targets.contains_key(&id) {
            // The default partition's SNI omits the partition label.
            let sni = if o.subset.is_empty() {
                format!("{}.{}.{}.internal.{}", o.service, o.namespace, o.datacenter, self.td)
            } else {
                format!("{}.{}.{}.{}.internal.{}", o.subset, o.service, o.namespace, o.datacenter, self.td)
            };
            self.targets.insert(
                id.clone(),
                Target {
                    id: id.clone(),
                    service: o.service,
                    subset: o.subset,
                    datacenter: o.datacenter,
                    mesh_gateway: String::new(),
                    subset_def: json!({}),
                    dialed_directly: false,
                    connect_timeout: Duration::ZERO,
                    external: false,
                    name: sni.clone(),
                    sni,
                },
            );
        }
        id
    }

    /// Consul's `rewriteTarget`: the target with `opts` applied over it (a different service
    /// drops the subset).
    fn rewrite_target(&mut self, id: &str, o: Opts) -> String {
        let t = &self.targets[id];
        let mut m = Opts { service: t.service.clone(), subset: t.subset.clone(), datacenter: t.datacenter.clone(), ..Opts::default() };
        if !o.service.is_empty() && o.service != m.service {
            m.service = o.service;
            m.subset = String::new();
        }
        if !o.subset.is_empty() {
            m.subset = o.subset;
        }
        if !o.datacenter.is_empty() {
            m.datacenter = o.datacenter;
        }
        self.new_target(m)
    }

    /// The start node's key, after building every node reachable from it.
    fn assemble(&mut self) -> Result<String, ChainError> {
        let mut router = self.e.routers.get(self.service);
        if router.is_some() && self.disable_advanced {
            router = None;
            self.customized.protocol = true;
        }
        let Some(router) = router else {
            let t = self.new_target(Opts { service: self.service.into(), ..Opts::default() });
            return self.splitter_or_resolver(&t);
        };
        self.uses_advanced = true;
        self.record_protocol(self.service)?;
        let mut routes = Vec::new();
        for def in router["Routes"].as_array().into_iter().flatten() {
            let dest = &def["Destination"];
            let svc = match s(dest, "Service") {
                "" => self.service.to_string(),
                other => other.to_string(),
            };
            let subset = s(dest, "ServiceSubset").to_string();
            let next = if subset.is_empty() {
                let t = self.new_target(Opts { service: svc, ..Opts::default() });
                self.splitter_or_resolver(&t)?
            } else {
                let t = self.new_target(Opts { service: svc, subset, ..Opts::default() });
                self.resolver_node(&t, false)?.key
            };
            routes.push(Route { definition: def.clone(), next });
        }
        // Unmatched requests go on to the service itself.
        let t = self.new_target(Opts { service: self.service.into(), ..Opts::default() });
        let next = self.splitter_or_resolver(&t)?;
        routes.push(Route {
            definition: json!({"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": self.service, "Namespace": NAMESPACE, "Partition": PARTITION}}),
            next,
        });
        let node = Node { name: service_id(self.service), kind: NodeKind::Router(routes), load_balancer: None };
        let key = node.key();
        self.nodes.insert(key.clone(), node);
        Ok(key)
    }

    fn splitter_or_resolver(&mut self, target: &str) -> Result<String, ChainError> {
        let svc = self.targets[target].service.clone();
        if let Some(key) = self.splitter_node(&svc)? {
            return Ok(key);
        }
        Ok(self.resolver_node(target, false)?.key)
    }

    fn splitter_node(&mut self, svc: &str) -> Result<Option<String>, ChainError> {
        let name = service_id(svc);
        let key = format!("splitter:{name}");
        if self.nodes.contains_key(&key) {
            return Ok(Some(key));
        }
        let mut splitter = self.e.splitters.get(svc);
        if splitter.is_some() && self.disable_advanced {
            splitter = None;
            self.customized.protocol = true;
        }
        let Some(splitter) = splitter else { return Ok(None) };
        // Recorded before its splits are followed, so that a loop ends here (and is reported).
        self.nodes.insert(key.clone(), Node { name, kind: NodeKind::Splitter(Vec::new()), load_balancer: None });
        let mut splits = Vec::new();
        let mut load_balancer = None;
        for def in splitter["Splits"].as_array().into_iter().flatten() {
            let weight = def["Weight"].as_f64().unwrap_or(0.0) as f32;
            let split_svc = match s(def, "Service") {
                "" => svc.to_string(),
                other => other.to_string(),
            };
            let subset = s(def, "ServiceSubset").to_string();
            if split_svc != svc
                && subset.is_empty()
                && let Some(next) = self.splitter_node(&split_svc)?
            {
                splits.push(Split { definition: def.clone(), weight, next });
                continue;
            }
            let t = self.new_target(Opts { service: split_svc, subset, ..Opts::default() });
            let r = self.resolver_node(&t, false)?;
            // One hash policy per route: the first hash-based balancer among the legs.
            if load_balancer.is_none()
                && let Some(lb) = r.load_balancer.filter(is_hash_based)
            {
                load_balancer = Some(lb);
            }
            splits.push(Split { definition: def.clone(), weight, next: r.key });
        }
        if let Some(n) = self.nodes.get_mut(&key) {
            n.kind = NodeKind::Splitter(splits);
            n.load_balancer = load_balancer;
        }
        self.uses_advanced = true;
        Ok(Some(key))
    }

    /// Resolve a target through its resolver: redirects, the default subset, the subset's
    /// filter, timeouts, mesh gateway mode and failover. With `for_failover` the node is
    /// returned without being recorded (only its target is kept).
    fn resolver_node(&mut self, target: &str, for_failover: bool) -> Result<Resolved, ChainError> {
        let mut target = target.to_string();
        let mut history: Vec<String> = Vec::new();
        let empty = json!({});
        let resolver = loop {
            if let Some(key) = self.resolve_nodes.get(&target) {
                let n = &self.nodes[key];
                return Ok(Resolved { key: key.clone(), target: target.clone(), load_balancer: n.load_balancer.clone() });
            }
            let svc = self.targets[&target].service.clone();
            self.record_protocol(&svc)?;
            let resolver = self.e.resolvers.get(&svc).unwrap_or(&empty);
            if history.contains(&target) {
                history.push(target);
                return Err(ChainError::CircularRedirect { path: history });
            }
            history.push(target.clone());
            if let Some(r) = resolver.get("Redirect") {
                let o = Opts {
                    service: s(r, "Service").into(),
                    subset: s(r, "ServiceSubset").into(),
                    datacenter: s(r, "Datacenter").into(),
                    ..Opts::default()
                };
                let next = self.rewrite_target(&target, o);
                if next != target {
                    target = next;
                    continue;
                }
            }
            let default_subset = s(resolver, "DefaultSubset");
            if self.targets[&target].subset.is_empty() && !default_subset.is_empty() {
                target = self.rewrite_target(&target, Opts { subset: default_subset.into(), ..Opts::default() });
                continue;
            }
            let subset = self.targets[&target].subset.clone();
            if !subset.is_empty() && resolver["Subsets"].get(&subset).is_none() {
                return Err(ChainError::MissingSubset { service: svc, subset });
            }
            break resolver;
        };
        let svc = self.targets[&target].service.clone();
        let mut connect_timeout = go_duration(&resolver["ConnectTimeout"]);
        if connect_timeout.is_zero() {
            connect_timeout = DEFAULT_CONNECT_TIMEOUT;
        }
        if let Some(o) = self.ov.connect_timeout.filter(|d| !d.is_zero())
            && o != connect_timeout
        {
            connect_timeout = o;
            self.customized.connect_timeout = true;
        }
        let is_default = ["DefaultSubset", "Subsets", "Redirect", "Failover", "ConnectTimeout", "RequestTimeout", "LoadBalancer"]
            .iter()
            .all(|k| resolver.get(*k).is_none());
        let node = Node {
            name: target.clone(),
            kind: NodeKind::Resolver(Resolver {
                default: is_default,
                connect_timeout,
                request_timeout: go_duration(&resolver["RequestTimeout"]),
                target: target.clone(),
                failover: None,
            }),
            load_balancer: resolver.get("LoadBalancer").cloned(),
        };
        let sd = self.e.service_defaults.get(&svc);
        let external_sni = sd.map(|sd| s(sd, "ExternalSNI")).unwrap_or("").to_string();
        if !external_sni.is_empty() {
            for (k, what) in [("Redirect", "redirects"), ("Subsets", "subsets"), ("Failover", "failover")] {
                if resolver.get(k).is_some() {
                    return Err(ChainError::ExternalService { service: svc, what });
                }
            }
        }
        let pd = self.e.proxy_defaults.as_ref();
        let override_mode = self.ov.mesh_gateway_mode.clone().filter(|m| !m.is_empty());
        let subset_def = {
            let t = &self.targets[&target];
            resolver["Subsets"].get(&t.subset).cloned().unwrap_or_else(|| json!({}))
        };
        let mut customized_mg = false;
        if let Some(t) = self.targets.get_mut(&target) {
            t.connect_timeout = connect_timeout;
            t.subset_def = subset_def;
            if !external_sni.is_empty() {
                // An external service is reached directly, never through gateways.
                t.sni = external_sni;
                t.external = true;
                t.mesh_gateway = String::new();
            } else {
                t.mesh_gateway = sd.map(|sd| s(&sd["MeshGateway"], "Mode").to_string()).unwrap_or_default();
                t.dialed_directly = sd.is_some_and(|sd| sd["TransparentProxy"]["DialedDirectly"].as_bool() == Some(true));
                if let Some(pd) = pd {
                    if t.mesh_gateway.is_empty() {
                        t.mesh_gateway = s(&pd["MeshGateway"], "Mode").to_string();
                    }
                    t.dialed_directly |= pd["TransparentProxy"]["DialedDirectly"].as_bool() == Some(true);
                }
                if let Some(m) = &override_mode
                    && *m != t.mesh_gateway
                {
                    t.mesh_gateway = m.clone();
                    customized_mg = true;
                }
            }
        }
        self.customized.mesh_gateway |= customized_mg;
        self.retained.insert(target.clone());
        let key = node.key();
        let resolved = Resolved { key: key.clone(), target: target.clone(), load_balancer: node.load_balancer.clone() };
        if for_failover {
            return Ok(resolved);
        }
        self.nodes.insert(key.clone(), node);
        self.resolve_nodes.insert(target.clone(), key.clone());

        let subset = self.targets[&target].subset.clone();
        let Some(failover) = resolver["Failover"].get(&subset).or_else(|| resolver["Failover"].get("*")) else { return Ok(resolved) };
        let mut failover_targets = Vec::new();
        let base = Opts { service: s(failover, "Service").into(), subset: s(failover, "ServiceSubset").into(), ..Opts::default() };
        if let Some(dcs) = failover["Datacenters"].as_array().filter(|d| !d.is_empty()) {
            for dc in dcs.iter().filter_map(Value::as_str) {
                let t = self.rewrite_target(&target, Opts { datacenter: dc.into(), ..base.clone() });
                if t != target {
                    failover_targets.push(t);
                }
            }
        } else if let Some(list) = failover["Targets"].as_array().filter(|t| !t.is_empty()) {
            for ft in list {
                let o = Opts {
                    service: s(ft, "Service").into(),
                    subset: s(ft, "ServiceSubset").into(),
                    datacenter: s(ft, "Datacenter").into(),
                    ..Opts::default()
                };
                let t = self.rewrite_target(&target, o);
                if t != target {
                    failover_targets.push(t);
                }
            }
        } else {
            let t = self.rewrite_target(&target, base);
            if t != target {
                failover_targets.push(t);
            }
        }
        if failover_targets.is_empty() {
            return Ok(resolved);
        }
        let policy = match failover.get("Policy").filter(|p| !s(p, "Mode").is_empty()) {
            Some(p) => Some(p.clone()),
            None => pd.and_then(|pd| pd.get("FailoverPolicy")).cloned(),
        };
        let mut ids = Vec::new();
        for ft in failover_targets {
            ids.push(self.resolver_node(&ft, true)?.target);
        }
        if let Some(Node { kind: NodeKind::Resolver(r), .. }) = self.nodes.get_mut(&key) {
            r.failover = Some((ids, policy));
        }
        Ok(resolved)
    }

    /// Consul's `detectCircularReferences`: a path that meets a node twice.
    fn detect_cycles(&self, key: &str, path: &mut Vec<String>) -> Result<(), ChainError> {
        if path.iter().any(|k| k == key) {
            path.push(key.to_string());
            return Err(ChainError::CircularReference { path: path.clone() });
        }
        path.push(key.to_string());
        if let Some(n) = self.nodes.get(key) {
            for next in n.next_nodes() {
                self.detect_cycles(&next, path)?;
            }
        }
        path.pop();
        Ok(())
    }

    /// A split that leads to another splitter is replaced by that splitter's splits, with
    /// effective weights (parent × child / 100) and merged header changes, until none is left.
    fn flatten_splitters(&mut self) {
        loop {
            let mut changed = false;
            let keys: Vec<String> = self.nodes.iter().filter(|(_, n)| matches!(n.kind, NodeKind::Splitter(_))).map(|(k, _)| k.clone()).collect();
            for key in keys {
                let NodeKind::Splitter(splits) = &self.nodes[&key].kind else { continue };
                let mut fixed = Vec::new();
                let mut this_changed = false;
                for split in splits {
                    match self.nodes.get(&split.next).map(|n| &n.kind) {
                        Some(NodeKind::Splitter(inner)) => {
                            this_changed = true;
                            for i in inner {
                                let effective = split.weight * i.weight / 100.0;
                                fixed.push(Split {
                                    definition: merge_parent(&i.definition, &split.definition),
                                    weight: scale_weight(effective) as f32 / 100.0,
                                    next: i.next.clone(),
                                });
                            }
                        }
                        _ => fixed.push(split.clone()),
                    }
                }
                if this_changed {
                    changed = true;
                    if let Some(n) = self.nodes.get_mut(&key) {
                        n.kind = NodeKind::Splitter(fixed);
                    }
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// Drop the nodes that nothing reachable from the start points at any more.
    fn prune(&mut self, start: &str) {
        let mut seen = BTreeSet::new();
        let mut todo = vec![start.to_string()];
        while let Some(k) = todo.pop() {
            if !seen.insert(k.clone()) {
                continue;
            }
            if let Some(n) = self.nodes.get(&k) {
                todo.extend(n.next_nodes());
            }
        }
        self.nodes.retain(|k, _| seen.contains(k));
    }

    fn customization_hash(&self) -> Option<String> {
        let c = &self.customized;
        if !(c.mesh_gateway || c.protocol || c.connect_timeout) {
            return None;
        }
        // Opaque: only stable and distinct per set of overrides that took effect.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mode = if c.mesh_gateway { self.ov.mesh_gateway_mode.clone().unwrap_or_default() } else { String::new() };
        let protocol = if c.protocol { self.ov.protocol.clone().unwrap_or_default() } else { String::new() };
        let timeout = if c.connect_timeout { self.ov.connect_timeout.unwrap_or_default().as_nanos() } else { 0 };
        for b in format!("{mode}\u{0}{protocol}\u{0}{timeout}").bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Some(format!("{h:016x}")[..8].to_string())
    }

    fn render(&self, start: &str, protocol: &str) -> Value {
        let mut nodes = Map::new();
        for (key, n) in &self.nodes {
            let mut v = json!({ "Type": key.split(':').next().unwrap_or_default(), "Name": n.name });
            match &n.kind {
                NodeKind::Router(routes) => {
                    v["Routes"] = routes.iter().map(|r| json!({ "Definition": r.definition, "NextNode": r.next })).collect();
                }
                NodeKind::Splitter(splits) => {
                    v["Splits"] = splits
                        .iter()
                        .map(|sp| {
                            let mut m = json!({ "Definition": sp.definition });
                            let scaled = scale_weight(sp.weight);
                            if scaled != 0 {
                                m["Weight"] = weight_json(scaled);
                            }
                            m["NextNode"] = json!(sp.next);
                            m
                        })
                        .collect();
                }
                NodeKind::Resolver(r) => {
                    let mut m = json!({ "ConnectTimeout": crate::duration::format_go(r.connect_timeout) });
                    if r.default {
                        m["Default"] = json!(true);
                    }
                    if !r.request_timeout.is_zero() {
                        // No string form for this one in Consul: integer nanoseconds.
                        m["RequestTimeout"] = json!(r.request_timeout.as_nanos() as u64);
                    }
                    m["Target"] = json!(r.target);
                    if let Some((targets, policy)) = &r.failover {
                        let mut f = json!({ "Targets": targets });
                        if let Some(p) = policy {
                            f["Policy"] = p.clone();
                        }
                        m["Failover"] = f;
                    }
                    v["Resolver"] = m;
                }
            }
            if let Some(lb) = &n.load_balancer {
                v["LoadBalancer"] = lb.clone();
            }
            nodes.insert(key.clone(), v);
        }
        let mut targets = Map::new();
        for (id, t) in &self.targets {
            let mut v = Map::new();
            if !t.connect_timeout.is_zero() {
                v.insert("ConnectTimeout".into(), json!(crate::duration::format_go(t.connect_timeout)));
            }
            v.insert("ID".into(), json!(t.id));
            v.insert("Service".into(), json!(t.service));
            if !t.subset.is_empty() {
                v.insert("ServiceSubset".into(), json!(t.subset));
            }
            v.insert("Namespace".into(), json!(NAMESPACE));
            v.insert("Partition".into(), json!(PARTITION));
            v.insert("Datacenter".into(), json!(t.datacenter));
            v.insert("MeshGateway".into(), if t.mesh_gateway.is_empty() { json!({}) } else { json!({ "Mode": t.mesh_gateway }) });
            v.insert("Subset".into(), t.subset_def.clone());
            v.insert("TransparentProxy".into(), if t.dialed_directly { json!({ "DialedDirectly": true }) } else { json!({}) });
            if t.external {
                v.insert("External".into(), json!(true));
            }
            v.insert("SNI".into(), json!(t.sni));
            v.insert("Name".into(), json!(t.name));
            targets.insert(id.clone(), Value::Object(v));
        }
        let mut chain = Map::new();
        chain.insert("ServiceName".into(), json!(self.service));
        chain.insert("Namespace".into(), json!(NAMESPACE));
        chain.insert("Partition".into(), json!(PARTITION));
        chain.insert("Datacenter".into(), json!(self.dc));
        if let Some(h) = self.customization_hash() {
            chain.insert("CustomizationHash".into(), json!(h));
        }
        if self.is_default_chain(start) {
            chain.insert("Default".into(), json!(true));
        }
        chain.insert("Protocol".into(), json!(protocol));
        let sd = self.e.service_defaults.get(self.service);
        if let Some(m) = sd.and_then(|sd| sd.get("Meta")).filter(|m| m.as_object().is_some_and(|m| !m.is_empty())) {
            chain.insert("ServiceMeta".into(), m.clone());
        }
        let extensions: Vec<Value> = [self.e.proxy_defaults.as_ref(), sd]
            .into_iter()
            .flatten()
            .flat_map(|e| e["EnvoyExtensions"].as_array().cloned().unwrap_or_default())
            .collect();
        if !extensions.is_empty() {
            chain.insert("EnvoyExtensions".into(), Value::Array(extensions));
        }
        chain.insert("StartNode".into(), json!(start));
        chain.insert("Nodes".into(), Value::Object(nodes));
        chain.insert("Targets".into(), Value::Object(targets));
        chain.insert("AutoVirtualIPs".into(), Value::Null);
        chain.insert("ManualVirtualIPs".into(), Value::Null);
        json!({ "Chain": chain })
    }

    /// Consul's `determineIfDefaultChain`: the start is a default resolver of the chain's own
    /// service (a redirect to another service's default resolver is not default).
    fn is_default_chain(&self, start: &str) -> bool {
        match self.nodes.get(start).map(|n| &n.kind) {
            Some(NodeKind::Resolver(r)) => r.default && self.targets.get(&r.target).is_some_and(|t| t.service == self.service),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

    fn entries(list: Vec<Value>) -> BTreeMap<(String, String), ConfigEntry> {
        list.into_iter()
            .map(|raw| {
                let (kind, name, json) = crate::connect::config_entry::normalize(raw).unwrap();
                ((kind.clone(), name.clone()), ConfigEntry { kind, name, json: json.to_string(), create_index: 1, modify_index: 1 })
            })
            .collect()
    }

    fn chain(list: Vec<Value>, service: &str) -> Value {
        compile(&entries(list), service, "dc1", TD, &Overrides::default()).unwrap()
    }

    fn target(id: &str, service: &str, subset: Option<(&str, Value)>, dc: &str, timeout: &str, mg: Value) -> Value {
        let sni_prefix = subset.as_ref().map(|(s, _)| format!("{s}.")).unwrap_or_default();
        let sni = format!("{sni_prefix}{service}.default.{dc}.internal.{TD}");
        let mut t = json!({
            "ConnectTimeout": timeout, "ID": id, "Service": service, "Namespace": "default", "Partition": "default",
            "Datacenter": dc, "MeshGateway": mg, "Subset": {}, "TransparentProxy": {}, "SNI": sni, "Name": sni,
        });
        if let Some((s, def)) = subset {
            t["ServiceSubset"] = json!(s);
            t["Subset"] = def;
        }
        t
    }

    #[test]
    fn example_a_no_entries_gives_the_default_chain() {
        let got = chain(vec![], "web");
        let want = json!({"Chain": {
            "ServiceName": "web", "Namespace": "default", "Partition": "default", "Datacenter": "dc1",
            "Default": true, "Protocol": "tcp", "StartNode": "resolver:web.default.default.dc1",
            "Nodes": {"resolver:web.default.default.dc1": {"Type": "resolver", "Name": "web.default.default.dc1",
                "Resolver": {"ConnectTimeout": "5s", "Default": true, "Target": "web.default.default.dc1"}}},
            "Targets": {"web.default.default.dc1": target("web.default.default.dc1", "web", None, "dc1", "5s", json!({}))},
            "AutoVirtualIPs": null, "ManualVirtualIPs": null,
        }});
        assert_eq!(got, want);
    }

    #[test]
    fn example_b_router_with_two_routes() {
        let got = chain(
            vec![
                json!({"Kind": "service-defaults", "Name": "web", "Protocol": "http"}),
                json!({"Kind": "service-defaults", "Name": "admin", "Protocol": "http"}),
                json!({"Kind": "service-resolver", "Name": "web", "Subsets": {"canary": {"Filter": "Service.Meta.flavor == canary"}}}),
                json!({"Kind": "service-router", "Name": "web", "Routes": [
                    {"Match": {"HTTP": {"PathPrefix": "/admin"}}, "Destination": {"Service": "admin", "PrefixRewrite": "/"}},
                    {"Match": {"HTTP": {"Header": [{"Name": "x-debug", "Exact": "1"}]}}, "Destination": {"ServiceSubset": "canary"}}]}),
            ],
            "web",
        );
        let canary = json!({"Filter": "Service.Meta.flavor == canary"});
        let want = json!({"Chain": {
            "ServiceName": "web", "Namespace": "default", "Partition": "default", "Datacenter": "dc1",
            "Protocol": "http", "StartNode": "router:web.default.default",
            "Nodes": {
                "resolver:admin.default.default.dc1": {"Type": "resolver", "Name": "admin.default.default.dc1",
                    "Resolver": {"ConnectTimeout": "5s", "Default": true, "Target": "admin.default.default.dc1"}},
                "resolver:canary.web.default.default.dc1": {"Type": "resolver", "Name": "canary.web.default.default.dc1",
                    "Resolver": {"ConnectTimeout": "5s", "Target": "canary.web.default.default.dc1"}},
                "resolver:web.default.default.dc1": {"Type": "resolver", "Name": "web.default.default.dc1",
                    "Resolver": {"ConnectTimeout": "5s", "Target": "web.default.default.dc1"}},
                "router:web.default.default": {"Type": "router", "Name": "web.default.default", "Routes": [
                    {"Definition": {"Match": {"HTTP": {"PathPrefix": "/admin"}}, "Destination": {"Service": "admin", "PrefixRewrite": "/"}},
                     "NextNode": "resolver:admin.default.default.dc1"},
                    {"Definition": {"Match": {"HTTP": {"Header": [{"Name": "x-debug", "Exact": "1"}]}}, "Destination": {"ServiceSubset": "canary"}},
                     "NextNode": "resolver:canary.web.default.default.dc1"},
                    {"Definition": {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": "web", "Namespace": "default", "Partition": "default"}},
                     "NextNode": "resolver:web.default.default.dc1"}]},
            },
            "Targets": {
                "admin.default.default.dc1": target("admin.default.default.dc1", "admin", None, "dc1", "5s", json!({})),
                "canary.web.default.default.dc1": target("canary.web.default.default.dc1", "web", Some(("canary", canary)), "dc1", "5s", json!({})),
                "web.default.default.dc1": target("web.default.default.dc1", "web", None, "dc1", "5s", json!({})),
            },
            "AutoVirtualIPs": null, "ManualVirtualIPs": null,
        }});
        assert_eq!(got, want);
    }

    fn example_c_entries() -> Vec<Value> {
        vec![
            json!({"Kind": "service-defaults", "Name": "web", "Protocol": "http"}),
            json!({"Kind": "service-resolver", "Name": "web", "DefaultSubset": "v1",
                "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}}),
            json!({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]}),
        ]
    }

    #[test]
    fn example_c_splitter_between_subsets() {
        let got = chain(example_c_entries(), "web");
        let v = |n: &str| json!({"Filter": format!("Service.Meta.version == {n}")});
        let want = json!({"Chain": {
            "ServiceName": "web", "Namespace": "default", "Partition": "default", "Datacenter": "dc1",
            "Protocol": "http", "StartNode": "splitter:web.default.default",
            "Nodes": {
                "resolver:v1.web.default.default.dc1": {"Type": "resolver", "Name": "v1.web.default.default.dc1",
                    "Resolver": {"ConnectTimeout": "5s", "Target": "v1.web.default.default.dc1"}},
                "resolver:v2.web.default.default.dc1": {"Type": "resolver", "Name": "v2.web.default.default.dc1",
                    "Resolver": {"ConnectTimeout": "5s", "Target": "v2.web.default.default.dc1"}},
                "splitter:web.default.default": {"Type": "splitter", "Name": "web.default.default", "Splits": [
                    {"Definition": {"Weight": 90, "ServiceSubset": "v1"}, "Weight": 90, "NextNode": "resolver:v1.web.default.default.dc1"},
                    {"Definition": {"Weight": 10, "ServiceSubset": "v2"}, "Weight": 10, "NextNode": "resolver:v2.web.default.default.dc1"}]},
            },
            "Targets": {
                "v1.web.default.default.dc1": target("v1.web.default.default.dc1", "web", Some(("v1", v("v1"))), "dc1", "5s", json!({})),
                "v2.web.default.default.dc1": target("v2.web.default.default.dc1", "web", Some(("v2", v("v2"))), "dc1", "5s", json!({})),
            },
            "AutoVirtualIPs": null, "ManualVirtualIPs": null,
        }});
        assert_eq!(got, want);
        let dc2 = compile(&entries(example_c_entries()), "web", "dc2", TD, &Overrides::default()).unwrap();
        assert_eq!(dc2["Chain"]["Datacenter"], "dc2");
        assert_eq!(dc2["Chain"]["Targets"]["v2.web.default.default.dc2"]["SNI"], format!("v2.web.default.dc2.internal.{TD}"));
    }

    #[test]
    fn example_d_failover_to_dc2_through_local_gateways() {
        let got = chain(
            vec![
                json!({"Kind": "proxy-defaults", "Name": "global", "MeshGateway": {"Mode": "local"}}),
                json!({"Kind": "service-resolver", "Name": "web", "ConnectTimeout": "15s", "Failover": {"*": {"Datacenters": ["dc2"]}}}),
            ],
            "web",
        );
        let local = json!({"Mode": "local"});
        let want = json!({"Chain": {
            "ServiceName": "web", "Namespace": "default", "Partition": "default", "Datacenter": "dc1",
            "Protocol": "tcp", "StartNode": "resolver:web.default.default.dc1",
            "Nodes": {"resolver:web.default.default.dc1": {"Type": "resolver", "Name": "web.default.default.dc1",
                "Resolver": {"ConnectTimeout": "15s", "Target": "web.default.default.dc1", "Failover": {"Targets": ["web.default.default.dc2"]}}}},
            "Targets": {
                "web.default.default.dc1": target("web.default.default.dc1", "web", None, "dc1", "15s", local.clone()),
                "web.default.default.dc2": target("web.default.default.dc2", "web", None, "dc2", "15s", local),
            },
            "AutoVirtualIPs": null, "ManualVirtualIPs": null,
        }});
        assert_eq!(got, want);
    }

    #[test]
    fn example_e_redirect_with_every_override() {
        let list = entries(vec![json!({"Kind": "service-resolver", "Name": "web", "Redirect": {"Datacenter": "dc2"}})]);
        let ov = Overrides { connect_timeout: Some(Duration::from_secs(7)), protocol: Some("grpc".into()), mesh_gateway_mode: Some("remote".into()) };
        let c = &compile(&list, "web", "dc1", TD, &ov).unwrap()["Chain"];
        assert_eq!(c["Protocol"], "grpc");
        assert_eq!(c["StartNode"], "resolver:web.default.default.dc2");
        assert_eq!(c["CustomizationHash"].as_str().map(str::len), Some(8));
        assert_eq!(c["Nodes"]["resolver:web.default.default.dc2"]["Resolver"]["ConnectTimeout"], "7s");
        assert_eq!(c["Targets"].as_object().unwrap().keys().collect::<Vec<_>>(), vec!["web.default.default.dc2"]);
        assert_eq!(c["Targets"]["web.default.default.dc2"]["MeshGateway"], json!({"Mode": "remote"}));
        assert!(c.get("Default").is_none(), "a redirect is never the default chain");
        let plain = compile(&list, "web", "dc1", TD, &Overrides::default()).unwrap();
        assert!(plain["Chain"].get("CustomizationHash").is_none());
        let same = Overrides { protocol: Some("tcp".into()), ..Overrides::default() };
        assert!(
            compile(&list, "web", "dc1", TD, &same).unwrap()["Chain"].get("CustomizationHash").is_none(),
            "an override equal to the computed value changes nothing"
        );
    }

    #[test]
    fn nested_splitters_flatten_with_effective_weights_and_merged_headers() {
        let got = chain(
            vec![
                json!({"Kind": "proxy-defaults", "Config": {"protocol": "http"}}),
                json!({"Kind": "service-splitter", "Name": "web", "Splits": [
                    {"Weight": 50, "Service": "api", "RequestHeaders": {"Set": {"x-from": "web"}}}, {"Weight": 50}]}),
                json!({"Kind": "service-splitter", "Name": "api", "Splits": [
                    {"Weight": 40, "Service": "api-v1"}, {"Weight": 60, "Service": "api-v2", "RequestHeaders": {"Set": {"x-from": "api"}}}]}),
            ],
            "web",
        );
        let c = &got["Chain"];
        assert!(c["Nodes"].get("splitter:api.default.default").is_none(), "the inner splitter is flattened away");
        let splits = c["Nodes"]["splitter:web.default.default"]["Splits"].as_array().unwrap();
        let summary: Vec<(Value, &str)> = splits.iter().map(|s| (s["Weight"].clone(), s["NextNode"].as_str().unwrap())).collect();
        assert_eq!(
            summary,
            vec![
                (json!(20), "resolver:api-v1.default.default.dc1"),
                (json!(30), "resolver:api-v2.default.default.dc1"),
                (json!(50), "resolver:web.default.default.dc1")
            ]
        );
        assert_eq!(splits[0]["Definition"]["RequestHeaders"]["Set"]["x-from"], "web", "the parent's change carries over");
        assert_eq!(splits[1]["Definition"]["RequestHeaders"]["Set"]["x-from"], "api", "the child's own change wins");
        assert_eq!(splits[1]["Definition"]["Weight"], 60, "Definition keeps the original weight");
    }

    #[test]
    fn protocol_rules_are_consuls() {
        let err = |list: Vec<Value>| compile(&entries(list), "web", "dc1", TD, &Overrides::default()).unwrap_err().to_string();
        assert_eq!(
            err(vec![json!({"Kind": "service-router", "Name": "web", "Routes": [{"Match": {"HTTP": {"PathPrefix": "/a"}}}]})]),
            "discovery chain \"web\" uses a protocol \"tcp\" that does not permit advanced routing or splitting behavior"
        );
        assert_eq!(
            err(vec![
                json!({"Kind": "service-defaults", "Name": "web", "Protocol": "http"}),
                json!({"Kind": "service-router", "Name": "web", "Routes": [{"Destination": {"Service": "admin"}}]}),
            ]),
            "discovery chain \"web\" uses inconsistent protocols; service \"admin\" has \"tcp\" which is not \"http\""
        );
        // A tcp override drops the router, so the chain compiles (and says it was customised).
        let list = entries(vec![
            json!({"Kind": "service-defaults", "Name": "web", "Protocol": "http"}),
            json!({"Kind": "service-router", "Name": "web", "Routes": []}),
        ]);
        let c = compile(&list, "web", "dc1", TD, &Overrides { protocol: Some("tcp".into()), ..Overrides::default() }).unwrap();
        assert_eq!((c["Chain"]["StartNode"].as_str(), c["Chain"]["Protocol"].as_str()), (Some("resolver:web.default.default.dc1"), Some("tcp")));
        assert!(c["Chain"]["CustomizationHash"].is_string());
    }

    #[test]
    fn redirect_loops_missing_subsets_and_splitter_cycles_are_errors() {
        let err = |list: Vec<Value>| compile(&entries(list), "a", "dc1", TD, &Overrides::default()).unwrap_err().to_string();
        assert_eq!(
            err(vec![
                json!({"Kind": "service-resolver", "Name": "a", "Redirect": {"Service": "b"}}),
                json!({"Kind": "service-resolver", "Name": "b", "Redirect": {"Service": "a"}}),
            ]),
            "detected circular resolver redirect: [a.default.default.dc1 -> b.default.default.dc1 -> a.default.default.dc1]"
        );
        assert_eq!(
            err(vec![json!({"Kind": "service-resolver", "Name": "a", "Redirect": {"Service": "other", "ServiceSubset": "v1"}})]),
            "service \"other\" does not have a subset named \"v1\""
        );
        assert_eq!(
            err(vec![
                json!({"Kind": "proxy-defaults", "Config": {"protocol": "http"}}),
                json!({"Kind": "service-splitter", "Name": "a", "Splits": [{"Weight": 100, "Service": "b"}]}),
                json!({"Kind": "service-splitter", "Name": "b", "Splits": [{"Weight": 100, "Service": "a"}]}),
            ]),
            "detected circular reference: [splitter:a.default.default -> splitter:b.default.default -> splitter:a.default.default]"
        );
    }

    #[test]
    fn failover_targets_go_through_redirects_and_default_subsets() {
        let c = chain(
            vec![
                json!({"Kind": "service-resolver", "Name": "web", "Failover": {"*": {"Service": "backup"}}}),
                json!({"Kind": "service-resolver", "Name": "backup", "DefaultSubset": "v2", "Subsets": {"v2": {"OnlyPassing": true}}}),
                json!({"Kind": "service-defaults", "Name": "backup", "MeshGateway": {"Mode": "remote"}}),
            ],
            "web",
        );
        let c = &c["Chain"];
        assert_eq!(c["Nodes"]["resolver:web.default.default.dc1"]["Resolver"]["Failover"], json!({"Targets": ["v2.backup.default.default.dc1"]}));
        assert!(c["Nodes"].get("resolver:v2.backup.default.default.dc1").is_none(), "failover targets get no node of their own");
        let t = &c["Targets"]["v2.backup.default.default.dc1"];
        assert_eq!((t["Subset"].clone(), t["MeshGateway"].clone()), (json!({"OnlyPassing": true}), json!({"Mode": "remote"})));
        assert!(c["Targets"].get("backup.default.default.dc1").is_none(), "the pre-default-subset target is not kept");
    }

    #[test]
    fn writes_are_checked_against_every_chain_they_touch() {
        let current = entries(vec![
            json!({"Kind": "service-defaults", "Name": "web", "Protocol": "http"}),
            json!({"Kind": "service-defaults", "Name": "admin", "Protocol": "http"}),
            json!({"Kind": "service-router", "Name": "web", "Routes": [{"Destination": {"Service": "admin"}}]}),
            json!({"Kind": "service-intentions", "Name": "api", "Sources": [{"Name": "web", "Action": "allow"}]}),
        ]);
        let proposed = |raw: Value| crate::connect::config_entry::normalize(raw).unwrap();
        let (k, n, v) = proposed(json!({"Kind": "service-defaults", "Name": "admin", "Protocol": "tcp"}));
        assert_eq!(
            validate_write(&current, &k, &n, Some(&v), "dc1").unwrap_err().to_string(),
            "discovery chain \"web\" uses inconsistent protocols; service \"admin\" has \"tcp\" which is not \"http\""
        );
        assert!(validate_write(&current, "service-defaults", "admin", None, "dc1").is_err(), "a delete that breaks a chain is refused");
        let (k, n, v) = proposed(json!({"Kind": "service-splitter", "Name": "db", "Splits": [{"Weight": 100}]}));
        assert_eq!(
            validate_write(&current, &k, &n, Some(&v), "dc1").unwrap_err().to_string(),
            "discovery chain \"db\" uses a protocol \"tcp\" that does not permit advanced routing or splitting behavior"
        );
        let (k, n, v) = proposed(json!({"Kind": "service-intentions", "Name": "api", "Sources": [
            {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}]}));
        assert_eq!(
            validate_write(&current, &k, &n, Some(&v), "dc1").unwrap_err().to_string(),
            "service \"api\" has protocol \"tcp\", which is incompatible with L7 intentions permissions"
        );
        let (k, n, v) = proposed(json!({"Kind": "service-defaults", "Name": "api", "Protocol": "http"}));
        assert!(validate_write(&current, &k, &n, Some(&v), "dc1").is_ok());
    }
}
