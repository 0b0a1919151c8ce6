//! A compiled discovery chain (Consul's `/v1/discovery-chain/:service` JSON) as the HTTP-aware
//! sidecar walks it per request: router (match path, headers, query, method), splitter
//! (weighted), resolver (a target and its failover targets).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::balance::LoadBalancing;

/// What a request is routed to: the targets to try in order (the resolver's, then its
/// failover targets), and what the route says about the request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routed {
    pub targets: Vec<String>,
    pub prefix_rewrite: Option<(String, String)>,
    pub request_timeout: Option<Duration>,
    pub num_retries: u32,
    pub retry_on_connect_failure: bool,
    pub retry_on_status_codes: Vec<u16>,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
}

/// Header changes (`Add`, `Set`, `Remove`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderMods {
    pub add: Vec<(String, String)>,
    pub set: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderMods {
    fn parse(v: &Value) -> HeaderMods {
        let pairs = |v: &Value| -> Vec<(String, String)> {
            v.as_object().into_iter().flatten().map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap_or_default().to_string())).collect()
        };
        HeaderMods {
            add: pairs(&v["Add"]),
            set: pairs(&v["Set"]),
            remove: v["Remove"].as_array().into_iter().flatten().filter_map(|h| h.as_str().map(str::to_ascii_lowercase)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }

    fn merge(&mut self, other: &HeaderMods) {
        self.add.extend(other.add.iter().cloned());
        self.set.extend(other.set.iter().cloned());
        self.remove.extend(other.remove.iter().cloned());
    }

    pub fn apply(&self, h: &mut http::HeaderMap) {
        for r in &self.remove {
            h.remove(r.as_str());
        }
        for (k, v) in &self.set {
            if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(v)) {
                h.insert(k, v);
            }
        }
        for (k, v) in &self.add {
            if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(v)) {
                h.append(k, v);
            }
        }
    }
}

/// One target: where the instances are and how to reach them.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub id: String,
    pub service: String,
    pub datacenter: String,
    /// The subset's filter over health entries (`Service.Meta.version == v1`).
    pub filter: Option<String>,
    pub only_passing: bool,
    pub sni: String,
    pub mesh_gateway: String,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
struct HeaderMatch {
    name: String,
    exact: Option<String>,
    prefix: Option<String>,
    suffix: Option<String>,
    regex: Option<regex::Regex>,
    present: bool,
    invert: bool,
}

#[derive(Debug, Clone)]
struct QueryMatch {
    name: String,
    exact: Option<String>,
    regex: Option<regex::Regex>,
    present: bool,
}

#[derive(Debug, Clone, Default)]
struct RouteMatch {
    path_exact: Option<String>,
    path_prefix: Option<String>,
    path_regex: Option<regex::Regex>,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
    methods: Vec<String>,
}

#[derive(Debug, Clone)]
struct Route {
    m: RouteMatch,
    dest: Value,
    next: String,
}

#[derive(Debug, Clone)]
struct Split {
    weight: f64,
    next: String,
    request_headers: HeaderMods,
    response_headers: HeaderMods,
}

#[derive(Debug, Clone)]
enum Node {
    Router(Vec<Route>),
    Splitter(Vec<Split>),
    Resolver { target: String, failover: Vec<String>, request_timeout: Option<Duration> },
}

/// A chain ready to route requests.
#[derive(Debug, Clone)]
pub struct Chain {
    pub protocol: String,
    start: String,
    nodes: HashMap<String, Node>,
    pub targets: HashMap<String, Target>,
    /// Each target's load balancing: its resolver's `LoadBalancer`; a failover target
    /// without a resolver of its own takes that of the resolver failing over to it.
    lb: HashMap<String, Arc<LoadBalancing>>,
}

/// Consul's durations in chain JSON: "5s" strings, or integer nanoseconds.
fn duration(v: &Value) -> Option<Duration> {
    match v {
        Value::String(s) if !s.is_empty() => crate::duration::parse(s),
        Value::Number(n) => n.as_u64().filter(|n| *n > 0).map(Duration::from_nanos),
        _ => None,
    }
}

fn regex(v: &Value) -> Result<Option<regex::Regex>, String> {
    match v.as_str().filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(r) => regex::Regex::new(&format!("^(?:{r})$")).map(Some).map_err(|e| format!("regex {r:?}: {e}")),
    }
}

fn opt_str(v: &Value) -> Option<String> {
    v.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

impl Chain {
    /// Read `{"Chain": {...}}` (or the chain object itself).
    pub fn parse(v: &Value) -> Result<Chain, String> {
        let c = if v.get("Chain").is_some() { &v["Chain"] } else { v };
        let start = c["StartNode"].as_str().filter(|s| !s.is_empty()).ok_or("the chain has no StartNode")?.to_string();
        let mut nodes = HashMap::new();
        let mut lb: HashMap<String, Arc<LoadBalancing>> = HashMap::new();
        let mut failover_lb: Vec<(String, Arc<LoadBalancing>)> = Vec::new();
        for (key, n) in c["Nodes"].as_object().into_iter().flatten() {
            let node = match n["Type"].as_str() {
                Some("router") => {
                    let mut routes = Vec::new();
                    for r in n["Routes"].as_array().into_iter().flatten() {
                        let http = &r["Definition"]["Match"]["HTTP"];
                        let headers = http["Header"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|h| {
                                Ok(HeaderMatch {
                                    name: h["Name"].as_str().unwrap_or_default().to_ascii_lowercase(),
                                    exact: opt_str(&h["Exact"]),
                                    prefix: opt_str(&h["Prefix"]),
                                    suffix: opt_str(&h["Suffix"]),
                                    regex: regex(&h["Regex"])?,
                                    present: h["Present"].as_bool().unwrap_or(false),
                                    invert: h["Invert"].as_bool().unwrap_or(false),
                                })
                            })
                            .collect::<Result<Vec<_>, String>>()?;
                        let query = http["QueryParam"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|q| {
                                Ok(QueryMatch {
                                    name: q["Name"].as_str().unwrap_or_default().to_string(),
                                    exact: opt_str(&q["Exact"]),
                                    regex: regex(&q["Regex"])?,
                                    present: q["Present"].as_bool().unwrap_or(false),
                                })
                            })
                            .collect::<Result<Vec<_>, String>>()?;
                        routes.push(Route {
                            m: RouteMatch {
                                path_exact: opt_str(&http["PathExact"]),
                                path_prefix: opt_str(&http["PathPrefix"]),
                                path_regex: regex(&http["PathRegex"])?,
                                headers,
                                query,
                                methods: http["Methods"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .filter_map(|m| m.as_str().map(str::to_ascii_uppercase))
                                    .collect(),
                            },
                            dest: r["Definition"]["Destination"].clone(),
                            next: r["NextNode"].as_str().unwrap_or_default().to_string(),
                        });
                    }
                    Node::Router(routes)
                }
                Some("splitter") => Node::Splitter(
                    n["Splits"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| Split {
                            weight: s["Weight"].as_f64().or_else(|| s["Definition"]["Weight"].as_f64()).unwrap_or(0.0),
                            next: s["NextNode"].as_str().unwrap_or_default().to_string(),
                            request_headers: HeaderMods::parse(&s["Definition"]["RequestHeaders"]),
                            response_headers: HeaderMods::parse(&s["Definition"]["ResponseHeaders"]),
                        })
                        .collect(),
                ),
                Some("resolver") => {
                    let r = &n["Resolver"];
                    if n["LoadBalancer"].is_object() {
                        let l = Arc::new(LoadBalancing::parse(&n["LoadBalancer"]));
                        if let Some(t) = r["Target"].as_str() {
                            lb.insert(t.to_string(), l.clone());
                        }
                        for t in r["Failover"]["Targets"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                            failover_lb.push((t.to_string(), l.clone()));
                        }
                    }
                    Node::Resolver {
                        target: r["Target"].as_str().unwrap_or_default().to_string(),
                        failover: r["Failover"]["Targets"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(str::to_string)).collect(),
                        request_timeout: duration(&r["RequestTimeout"]),
                    }
                }
                other => return Err(format!("node {key}: unknown type {other:?}")),
            };
            nodes.insert(key.clone(), node);
        }
        let mut targets = HashMap::new();
        for (id, t) in c["Targets"].as_object().into_iter().flatten() {
            targets.insert(
                id.clone(),
                Target {
                    id: id.clone(),
                    service: t["Service"].as_str().unwrap_or_default().to_string(),
                    datacenter: t["Datacenter"].as_str().unwrap_or_default().to_string(),
                    filter: opt_str(&t["Subset"]["Filter"]),
                    only_passing: t["Subset"]["OnlyPassing"].as_bool().unwrap_or(false),
                    sni: t["SNI"].as_str().unwrap_or_default().to_string(),
                    mesh_gateway: t["MeshGateway"]["Mode"].as_str().unwrap_or_default().to_ascii_lowercase(),
                    connect_timeout: duration(&t["ConnectTimeout"]).unwrap_or(Duration::from_secs(5)),
                },
            );
        }
        if !nodes.contains_key(&start) {
            return Err(format!("the start node {start} is not in the chain"));
        }
        for (t, l) in failover_lb {
            lb.entry(t).or_insert(l);
        }
        Ok(Chain { protocol: c["Protocol"].as_str().unwrap_or("tcp").to_string(), start, nodes, targets, lb })
    }

    /// How the instances of `target` are chosen (round robin unless its resolver says).
    pub fn load_balancing(&self, target: &str) -> Arc<LoadBalancing> {
        self.lb.get(target).cloned().unwrap_or_default()
    }

    /// Route one request. `pick` chooses a split: given a number in [0, 100).
    pub fn route(&self, method: &str, path: &str, query: &str, headers: &http::HeaderMap, pick: f64) -> Option<Routed> {
        let mut out = Routed::default();
        let mut node = self.start.clone();
        for _ in 0..32 {
            match self.nodes.get(&node)? {
                Node::Router(routes) => {
                    let r = routes.iter().find(|r| matches(&r.m, method, path, query, headers))?;
                    let d = &r.dest;
                    if let Some(rw) = opt_str(&d["PrefixRewrite"]) {
                        let matched = r.m.path_prefix.clone().or(r.m.path_exact.clone()).unwrap_or_else(|| "/".into());
                        out.prefix_rewrite = Some((matched, rw));
                    }
                    out.request_timeout = duration(&d["RequestTimeout"]).or(out.request_timeout);
                    out.num_retries = d["NumRetries"].as_u64().unwrap_or(0) as u32;
                    out.retry_on_connect_failure = d["RetryOnConnectFailure"].as_bool().unwrap_or(false);
                    out.retry_on_status_codes =
                        d["RetryOnStatusCodes"].as_array().into_iter().flatten().filter_map(|c| c.as_u64().map(|c| c as u16)).collect();
                    out.request_headers.merge(&HeaderMods::parse(&d["RequestHeaders"]));
                    out.response_headers.merge(&HeaderMods::parse(&d["ResponseHeaders"]));
                    node = r.next.clone();
                }
                Node::Splitter(splits) => {
                    let total: f64 = splits.iter().map(|s| s.weight).sum();
                    let mut at = pick * total / 100.0;
                    let chosen = splits.iter().find(|s| {
                        if at < s.weight {
                            return true;
                        }
                        at -= s.weight;
                        false
                    });
                    let s = chosen.or(splits.last())?;
                    out.request_headers.merge(&s.request_headers);
                    out.response_headers.merge(&s.response_headers);
                    node = s.next.clone();
                }
                Node::Resolver { target, failover, request_timeout } => {
                    out.targets = std::iter::once(target.clone()).chain(failover.iter().cloned()).collect();
                    if out.request_timeout.is_none() {
                        out.request_timeout = *request_timeout;
                    }
                    return Some(out);
                }
            }
        }
        None
    }
}

fn matches(m: &RouteMatch, method: &str, path: &str, query: &str, headers: &http::HeaderMap) -> bool {
    if let Some(p) = &m.path_exact
        && p != path
    {
        return false;
    }
    if let Some(p) = &m.path_prefix
        && !path.starts_with(p.as_str())
    {
        return false;
    }
    if let Some(r) = &m.path_regex
        && !r.is_match(path)
    {
        return false;
    }
    if !m.methods.is_empty() && !m.methods.iter().any(|x| x.eq_ignore_ascii_case(method)) {
        return false;
    }
    for h in &m.headers {
        let value = headers.get(h.name.as_str()).and_then(|v| v.to_str().ok());
        // Consul allows one of Present, Exact, Prefix, Suffix, Regex per header match.
        let ok = match value {
            None => false,
            Some(v) => {
                if h.present {
                    true
                } else if let Some(e) = &h.exact {
                    v == e
                } else if let Some(p) = &h.prefix {
                    v.starts_with(p.as_str())
                } else if let Some(s) = &h.suffix {
                    v.ends_with(s.as_str())
                } else if let Some(r) = &h.regex {
                    r.is_match(v)
                } else {
                    true
                }
            }
        };
        if ok == h.invert {
            return false;
        }
    }
    let params = url_pairs(query);
    for q in &m.query {
        let v = params.iter().find(|(k, _)| *k == q.name).map(|(_, v)| v.as_str());
        let ok = match v {
            None => false,
            Some(v) => q.present || (q.exact.as_ref().is_none_or(|e| v == e) && q.regex.as_ref().is_none_or(|r| r.is_match(v))),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// `a=1&b=x%20y` as decoded pairs.
pub(super) fn url_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain() -> Chain {
        Chain::parse(&json!({"Chain": {
            "Protocol": "http",
            "StartNode": "router:web.default.default",
            "Nodes": {
                "router:web.default.default": {"Type": "router", "Routes": [
                    {"Definition": {"Match": {"HTTP": {"PathPrefix": "/admin"}}, "Destination": {"Service": "admin", "PrefixRewrite": "/", "RequestTimeout": "2s"}}, "NextNode": "resolver:admin.default.default.dc1"},
                    {"Definition": {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}}, "Destination": {"ServiceSubset": "canary", "NumRetries": 2, "RetryOnStatusCodes": [503]}}, "NextNode": "resolver:canary.web.default.default.dc1"},
                    {"Definition": {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": "web"}}, "NextNode": "splitter:web.default.default"}
                ]},
                "splitter:web.default.default": {"Type": "splitter", "Splits": [
                    {"Definition": {"Weight": 90, "ServiceSubset": "v1"}, "Weight": 90, "NextNode": "resolver:v1.web.default.default.dc1"},
                    {"Definition": {"Weight": 10, "ServiceSubset": "v2", "ResponseHeaders": {"Set": {"x-version": "v2"}}}, "Weight": 10, "NextNode": "resolver:v2.web.default.default.dc1"}
                ]},
                "resolver:admin.default.default.dc1": {"Type": "resolver", "Resolver": {"Target": "admin.default.default.dc1"}},
                "resolver:canary.web.default.default.dc1": {"Type": "resolver", "Resolver": {"Target": "canary.web.default.default.dc1"}},
                "resolver:v1.web.default.default.dc1": {"Type": "resolver", "Resolver": {"Target": "v1.web.default.default.dc1", "Failover": {"Targets": ["v1.web.default.default.dc2"]}}},
                "resolver:v2.web.default.default.dc1": {"Type": "resolver", "Resolver": {"Target": "v2.web.default.default.dc1", "RequestTimeout": 3000000000u64}}
            },
            "Targets": {
                "v1.web.default.default.dc1": {"Service": "web", "Datacenter": "dc1", "Subset": {"Filter": "Service.Meta.version == v1"}, "SNI": "v1.web.default.dc1.internal.td", "MeshGateway": {}, "ConnectTimeout": "5s"}
            }
        }}))
        .unwrap()
    }

    #[test]
    fn requests_walk_routes_splits_and_resolvers() {
        let c = chain();
        let h = http::HeaderMap::new();
        let admin = c.route("GET", "/admin/users", "", &h, 0.0).unwrap();
        assert_eq!(admin.targets, vec!["admin.default.default.dc1"]);
        assert_eq!(admin.prefix_rewrite, Some(("/admin".into(), "/".into())));
        assert_eq!(admin.request_timeout, Some(Duration::from_secs(2)));
        let mut canary = http::HeaderMap::new();
        canary.insert("x-canary", "1".parse().unwrap());
        let r = c.route("GET", "/", "", &canary, 0.0).unwrap();
        assert_eq!((r.targets[0].as_str(), r.num_retries, r.retry_on_status_codes.clone()), ("canary.web.default.default.dc1", 2, vec![503]));
        let v1 = c.route("GET", "/x", "", &h, 89.9).unwrap();
        assert_eq!(v1.targets, vec!["v1.web.default.default.dc1", "v1.web.default.default.dc2"]);
        let v2 = c.route("GET", "/x", "", &h, 90.0).unwrap();
        assert_eq!(v2.targets, vec!["v2.web.default.default.dc1"]);
        assert_eq!(v2.request_timeout, Some(Duration::from_secs(3)));
        assert_eq!(v2.response_headers.set, vec![("x-version".to_string(), "v2".to_string())]);
        assert_eq!(c.targets["v1.web.default.default.dc1"].filter.as_deref(), Some("Service.Meta.version == v1"));
    }

    #[test]
    fn matches_cover_methods_queries_regexes_and_inversion() {
        let m = RouteMatch {
            path_regex: regex(&json!("/api/v[0-9]+/.*")).unwrap(),
            methods: vec!["POST".into()],
            query: vec![QueryMatch { name: "debug".into(), exact: Some("a b".into()), regex: None, present: false }],
            headers: vec![HeaderMatch {
                name: "x-env".into(),
                exact: Some("prod".into()),
                prefix: None,
                suffix: None,
                regex: None,
                present: false,
                invert: true,
            }],
            ..Default::default()
        };
        let h = http::HeaderMap::new();
        assert!(matches(&m, "POST", "/api/v2/x", "debug=a+b", &h));
        assert!(!matches(&m, "GET", "/api/v2/x", "debug=a+b", &h));
        assert!(!matches(&m, "POST", "/api/vx/x", "debug=a+b", &h));
        assert!(!matches(&m, "POST", "/api/v2/x", "debug=a", &h));
        let mut prod = http::HeaderMap::new();
        prod.insert("x-env", "prod".parse().unwrap());
        assert!(!matches(&m, "POST", "/api/v2/x", "debug=a%20b", &prod), "inverted header match");
    }
}
