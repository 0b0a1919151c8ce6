//! The config entries of the discovery chain: `service-router`, `service-splitter` and
//! `service-resolver`. Decoding (after `config_entry`'s key canonicalisation), Consul's
//! validation with its messages and order, and the canonical JSON in Consul's shapes (durations
//! as Go strings, empty fields omitted).
//!
//! Rules that need the other entries too (protocols, subsets of other services, redirect loops)
//! are checked by compiling the chains they touch (`chain::validate_write`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::config_entry::{EntryError, METHODS, enterprise_only, from, invalid, meta};

/// Retry conditions a route may name (Envoy's `retry_on` values that Consul accepts).
const RETRY_CONDITIONS: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Load-balancing policies of a resolver (`""` is the proxy's default, round robin).
const LB_POLICIES: &[&str] = &["", "random", "round_robin", "least_request", "ring_hash", "maglev"];
const HASH_FIELDS: &[&str] = &["header", "cookie", "query_parameter"];
/// Longest subset name: subsets are DNS labels in SNI names.
const MAX_SUBSET_LEN: usize = 63;

/// Remove `null` members everywhere: clients send `null` for empty lists and absent objects.
fn drop_nulls(v: Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(o.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, drop_nulls(v))).collect()),
        Value::Array(a) => Value::Array(a.into_iter().map(drop_nulls).collect()),
        other => other,
    }
}

/// A duration given as a Go duration string (`"15s"`) or a number of nanoseconds, as Consul's
/// decoder takes it. Negative values are refused with `negative(text)`.
fn duration(v: Option<Value>, key: &str, negative: impl Fn(&str) -> String) -> Result<Duration, EntryError> {
    match v {
        None => Ok(Duration::ZERO),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(ns), _) => Ok(Duration::from_nanos(ns)),
            (None, Some(ns)) => Err(invalid(negative(&format!("-{}", crate::duration::format_go(Duration::from_nanos(ns.unsigned_abs())))))),
            _ => Err(invalid(format!("{key}: {n} is not a duration"))),
        },
        Some(Value::String(s)) if s.trim().is_empty() => Ok(Duration::ZERO),
        Some(Value::String(s)) if s.trim().starts_with('-') => Err(invalid(negative(s.trim()))),
        Some(Value::String(s)) => crate::duration::parse_go(&s).map_err(|e| invalid(format!("{key}: {e}"))),
        Some(other) => Err(invalid(format!("{key}: {other} is not a duration"))),
    }
}

fn plain_negative(key: &str) -> impl Fn(&str) -> String + '_ {
    move |s| format!("{key}: invalid duration {s:?}: must not be negative")
}

/// Unsigned integers, weakly typed (a number or a numeric string).
fn uint(v: Option<Value>, key: &str) -> Result<u64, EntryError> {
    match v {
        None => Ok(0),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().unwrap_or(0)),
        Some(Value::String(s)) if s.trim().parse::<u64>().is_ok() => Ok(s.trim().parse().unwrap_or(0)),
        Some(other) => Err(EntryError::Decode(format!("{key}: expected a non-negative integer, got {other}"))),
    }
}

fn put_str(m: &mut Map<String, Value>, k: &str, v: String) {
    if !v.is_empty() {
        m.insert(k.into(), Value::String(v));
    }
}

fn put_duration(m: &mut Map<String, Value>, k: &str, d: Duration) {
    if !d.is_zero() {
        m.insert(k.into(), json!(crate::duration::format_go(d)));
    }
}

fn compiles(re: &str, what: impl FnOnce() -> String) -> Result<(), EntryError> {
    regex::Regex::new(re).map(|_| ()).map_err(|e| invalid(format!("{} is not a valid regular expression: {e}", what())))
}

fn finish(kind: &str, name: String, mut v: Map<String, Value>, m: Option<BTreeMap<String, String>>) -> Result<(String, String, Value), EntryError> {
    if let Some(m) = meta(m)? {
        v.insert("Meta".into(), m);
    }
    Ok((kind.into(), name, Value::Object(v)))
}

// ---------------------------------------------------------------------------------------------
// service-router

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct RouterIn {
    kind: String,
    name: String,
    namespace: String,
    partition: String,
    routes: Option<Vec<RouteIn>>,
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct RouteIn {
    #[serde(rename = "Match")]
    matches: Option<MatchIn>,
    destination: Option<DestinationIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct MatchIn {
    #[serde(rename = "HTTP")]
    http: Option<RouteHttpIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct RouteHttpIn {
    path_exact: String,
    path_prefix: String,
    path_regex: String,
    header: Vec<RouteHeaderIn>,
    query_param: Vec<QueryParamIn>,
    methods: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct RouteHeaderIn {
    name: String,
    present: bool,
    exact: String,
    prefix: String,
    suffix: String,
    regex: String,
    invert: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct QueryParamIn {
    name: String,
    present: bool,
    exact: String,
    regex: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct DestinationIn {
    service: String,
    service_subset: String,
    namespace: String,
    partition: String,
    prefix_rewrite: String,
    request_timeout: Option<Value>,
    idle_timeout: Option<Value>,
    num_retries: Option<Value>,
    retry_on_connect_failure: bool,
    retry_on: Vec<String>,
    retry_on_status_codes: Vec<Value>,
    request_headers: Option<HeaderModsIn>,
    response_headers: Option<HeaderModsIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct HeaderModsIn {
    add: BTreeMap<String, String>,
    set: BTreeMap<String, String>,
    remove: Vec<String>,
}

/// `HTTPHeaderModifiers` JSON: `Add`, `Set`, `Remove`, each omitted when empty.
fn header_mods(h: HeaderModsIn) -> Option<Value> {
    let mut m = Map::new();
    if !h.add.is_empty() {
        m.insert("Add".into(), json!(h.add));
    }
    if !h.set.is_empty() {
        m.insert("Set".into(), json!(h.set));
    }
    if !h.remove.is_empty() {
        m.insert("Remove".into(), json!(h.remove));
    }
    Some(Value::Object(m))
}

/// Upper-case the methods (Consul's `Normalize`) and check them: known, each once.
fn methods(list: Vec<String>, key: &str) -> Result<Vec<String>, EntryError> {
    let mut out: Vec<String> = Vec::new();
    for m in list.into_iter().map(|m| m.to_ascii_uppercase()) {
        if !METHODS.contains(&m.as_str()) {
            return Err(invalid(format!("{key} Methods contains an invalid method {m:?}")));
        }
        if out.contains(&m) {
            return Err(invalid(format!("{key} Methods contains {m:?} more than once")));
        }
        out.push(m);
    }
    Ok(out)
}

fn route_http(h: RouteHttpIn, i: usize) -> Result<(Value, bool), EntryError> {
    let key = format!("Route[{i}]");
    let mut paths = 0;
    for (k, p) in [("PathExact", &h.path_exact), ("PathPrefix", &h.path_prefix)] {
        if !p.is_empty() {
            paths += 1;
            if !p.starts_with('/') {
                return Err(invalid(format!("{key} {k} doesn't start with '/': {p:?}")));
            }
        }
    }
    if !h.path_regex.is_empty() {
        paths += 1;
    }
    if paths > 1 {
        return Err(invalid(format!("{key} should only contain at most one of PathExact, PathPrefix, or PathRegex")));
    }
    if !h.path_regex.is_empty() {
        compiles(&h.path_regex, || format!("{key} PathRegex {:?}", h.path_regex))?;
    }
    let mut headers = Vec::new();
    for (j, x) in h.header.into_iter().enumerate() {
        if x.name.is_empty() {
            return Err(invalid(format!("{key} Header[{j}] missing required Name field")));
        }
        let ways = [x.present, !x.exact.is_empty(), !x.regex.is_empty(), !x.prefix.is_empty(), !x.suffix.is_empty()];
        if ways.iter().filter(|w| **w).count() != 1 {
            return Err(invalid(format!("{key} Header[{j}] should only contain one of Present, Exact, Prefix, Suffix, or Regex")));
        }
        if !x.regex.is_empty() {
            compiles(&x.regex, || format!("{key} Header[{j}] Regex {:?}", x.regex))?;
        }
        let mut m = Map::new();
        m.insert("Name".into(), json!(x.name));
        if x.present {
            m.insert("Present".into(), json!(true));
        }
        put_str(&mut m, "Exact", x.exact);
        put_str(&mut m, "Prefix", x.prefix);
        put_str(&mut m, "Suffix", x.suffix);
        put_str(&mut m, "Regex", x.regex);
        if x.invert {
            m.insert("Invert".into(), json!(true));
        }
        headers.push(Value::Object(m));
    }
    let mut query = Vec::new();
    for (j, q) in h.query_param.into_iter().enumerate() {
        if q.name.is_empty() {
            return Err(invalid(format!("{key} QueryParam[{j}] missing required Name field")));
        }
        if [q.present, !q.exact.is_empty(), !q.regex.is_empty()].iter().filter(|w| **w).count() != 1 {
            return Err(invalid(format!("{key} QueryParam[{j}] should only contain one of Present, Exact, or Regex")));
        }
        if !q.regex.is_empty() {
            compiles(&q.regex, || format!("{key} QueryParam[{j}] Regex {:?}", q.regex))?;
        }
        let mut m = Map::new();
        m.insert("Name".into(), json!(q.name));
        if q.present {
            m.insert("Present".into(), json!(true));
        }
        put_str(&mut m, "Exact", q.exact);
        put_str(&mut m, "Regex", q.regex);
        query.push(Value::Object(m));
    }
    let methods = methods(h.methods, &key)?;
    let rewritable = !h.path_exact.is_empty() || !h.path_prefix.is_empty();
    let mut m = Map::new();
    put_str(&mut m, "PathExact", h.path_exact);
    put_str(&mut m, "PathPrefix", h.path_prefix);
    put_str(&mut m, "PathRegex", h.path_regex);
    if !headers.is_empty() {
        m.insert("Header".into(), Value::Array(headers));
    }
    if !query.is_empty() {
        m.insert("QueryParam".into(), Value::Array(query));
    }
    if !methods.is_empty() {
        m.insert("Methods".into(), json!(methods));
    }
    Ok((Value::Object(m), rewritable))
}

fn route_destination(d: DestinationIn, i: usize, rewritable: bool) -> Result<Value, EntryError> {
    let key = format!("Route[{i}]");
    enterprise_only(&d.namespace, &d.partition, &format!("Routes[{i}].Destination."))?;
    if !d.prefix_rewrite.is_empty() && !rewritable {
        return Err(invalid(format!("{key} cannot make use of PrefixRewrite without configuring either PathExact or PathPrefix")));
    }
    if let Some(r) = d.retry_on.iter().find(|r| !RETRY_CONDITIONS.contains(&r.as_str())) {
        return Err(invalid(format!("{key} contains an invalid retry condition: {r:?}")));
    }
    let request_timeout = duration(d.request_timeout, &format!("{key} RequestTimeout"), plain_negative(&format!("{key} RequestTimeout")))?;
    let idle_timeout = duration(d.idle_timeout, &format!("{key} IdleTimeout"), plain_negative(&format!("{key} IdleTimeout")))?;
    let num_retries = uint(d.num_retries, &format!("Routes[{i}].Destination.NumRetries"))?;
    if num_retries > u64::from(u32::MAX) {
        return Err(invalid(format!("{key} NumRetries {num_retries} is too large")));
    }
    let mut codes = Vec::new();
    for c in d.retry_on_status_codes {
        let code = uint(Some(c), &format!("Routes[{i}].Destination.RetryOnStatusCodes"))?;
        if !(100..=599).contains(&code) {
            return Err(invalid(format!("{key} RetryOnStatusCodes contains {code}, which is not an HTTP status code")));
        }
        codes.push(code);
    }
    let mut m = Map::new();
    put_duration(&mut m, "RequestTimeout", request_timeout);
    put_duration(&mut m, "IdleTimeout", idle_timeout);
    put_str(&mut m, "Service", d.service);
    put_str(&mut m, "ServiceSubset", d.service_subset);
    put_str(&mut m, "PrefixRewrite", d.prefix_rewrite);
    if num_retries > 0 {
        m.insert("NumRetries".into(), json!(num_retries));
    }
    if d.retry_on_connect_failure {
        m.insert("RetryOnConnectFailure".into(), json!(true));
    }
    if !d.retry_on.is_empty() {
        m.insert("RetryOn".into(), json!(d.retry_on));
    }
    if !codes.is_empty() {
        m.insert("RetryOnStatusCodes".into(), json!(codes));
    }
    if let Some(h) = d.request_headers.and_then(header_mods) {
        m.insert("RequestHeaders".into(), h);
    }
    if let Some(h) = d.response_headers.and_then(header_mods) {
        m.insert("ResponseHeaders".into(), h);
    }
    Ok(Value::Object(m))
}

pub(super) fn service_router(raw: Value) -> Result<(String, String, Value), EntryError> {
    let e: RouterIn = from(drop_nulls(raw))?;
    enterprise_only(&e.namespace, &e.partition, "")?;
    let _ = e.kind;
    if e.name.is_empty() {
        return Err(invalid("Name is required"));
    }
    let mut routes = Vec::new();
    let given = e.routes.is_some();
    for (i, r) in e.routes.unwrap_or_default().into_iter().enumerate() {
        let mut route = Map::new();
        let mut rewritable = false;
        if let Some(m) = r.matches {
            let mut mv = Map::new();
            if let Some(h) = m.http {
                let (hv, rw) = route_http(h, i)?;
                rewritable = rw;
                mv.insert("HTTP".into(), hv);
            }
            route.insert("Match".into(), Value::Object(mv));
        }
        if let Some(d) = r.destination {
            route.insert("Destination".into(), route_destination(d, i, rewritable)?);
        }
        routes.push(Value::Object(route));
    }
    let mut v = Map::new();
    v.insert("Kind".into(), json!("service-router"));
    v.insert("Name".into(), json!(e.name));
    // Consul prints `null` for a router written without routes.
    v.insert("Routes".into(), if given { Value::Array(routes) } else { Value::Null });
    finish("service-router", e.name, v, e.meta)
}

// ---------------------------------------------------------------------------------------------
// service-splitter

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct SplitterIn {
    kind: String,
    name: String,
    namespace: String,
    partition: String,
    splits: Vec<SplitIn>,
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct SplitIn {
    weight: Option<Value>,
    service: String,
    service_subset: String,
    namespace: String,
    partition: String,
    request_headers: Option<HeaderModsIn>,
    response_headers: Option<HeaderModsIn>,
}

/// A split weight in hundredths of a percent, as Consul's `scaleWeight` computes it (the
/// product in float32, then rounded).
pub fn scale_weight(w: f32) -> i64 {
    f64::from(w * 100.0).round() as i64
}

/// A weight in hundredths as JSON: an integer when whole (Go prints float32 `90` as `90`).
pub fn weight_json(scaled: i64) -> Value {
    if scaled % 100 == 0 { json!(scaled / 100) } else { json!(scaled as f64 / 100.0) }
}

fn weight(v: Option<Value>, i: usize) -> Result<f32, EntryError> {
    let w = match v {
        None => 0.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
        Some(Value::String(s)) => s.trim().parse::<f64>().map_err(|_| EntryError::Decode(format!("Splits[{i}].Weight: {s:?} is not a number")))?,
        Some(other) => return Err(EntryError::Decode(format!("Splits[{i}].Weight: {other} is not a number"))),
    };
    if !(0.0..=100.0).contains(&w) {
        return Err(invalid(format!("Splits[{i}].Weight must be between 0 and 100, not {w}")));
    }
    Ok(w as f32)
}

pub(super) fn service_splitter(raw: Value) -> Result<(String, String, Value), EntryError> {
    let e: SplitterIn = from(drop_nulls(raw))?;
    enterprise_only(&e.namespace, &e.partition, "")?;
    let _ = e.kind;
    if e.name.is_empty() {
        return Err(invalid("Name is required"));
    }
    if e.splits.is_empty() {
        return Err(invalid("no splits configured"));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut sum = 0i64;
    let mut splits = Vec::new();
    for (i, s) in e.splits.into_iter().enumerate() {
        enterprise_only(&s.namespace, &s.partition, &format!("Splits[{i}]."))?;
        let service = if s.service.is_empty() { e.name.clone() } else { s.service.clone() };
        if !seen.insert((service.clone(), s.service_subset.clone(), s.namespace.clone(), s.partition.clone())) {
            return Err(invalid(format!(
                "split destination occurs more than once: service={service:?}, subset={:?}, namespace={:?}, partition={:?}",
                s.service_subset, s.namespace, s.partition
            )));
        }
        let scaled = scale_weight(weight(s.weight, i)?);
        sum += scaled;
        let mut m = Map::new();
        m.insert("Weight".into(), weight_json(scaled));
        put_str(&mut m, "Service", s.service);
        put_str(&mut m, "ServiceSubset", s.service_subset);
        if let Some(h) = s.request_headers.and_then(header_mods) {
            m.insert("RequestHeaders".into(), h);
        }
        if let Some(h) = s.response_headers.and_then(header_mods) {
            m.insert("ResponseHeaders".into(), h);
        }
        splits.push(Value::Object(m));
    }
    if sum != 10_000 {
        return Err(invalid(format!("the sum of all split weights must be 100, not {:.6}", sum as f32 / 100.0)));
    }
    let mut v = Map::new();
    v.insert("Kind".into(), json!("service-splitter"));
    v.insert("Name".into(), json!(e.name));
    v.insert("Splits".into(), Value::Array(splits));
    finish("service-splitter", e.name, v, e.meta)
}

// ---------------------------------------------------------------------------------------------
// service-resolver

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct ResolverIn {
    kind: String,
    name: String,
    namespace: String,
    partition: String,
    default_subset: String,
    subsets: BTreeMap<String, SubsetIn>,
    redirect: Option<RedirectIn>,
    failover: BTreeMap<String, FailoverIn>,
    connect_timeout: Option<Value>,
    request_timeout: Option<Value>,
    load_balancer: Option<LoadBalancerIn>,
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct SubsetIn {
    filter: String,
    only_passing: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct RedirectIn {
    service: String,
    service_subset: String,
    namespace: String,
    partition: String,
    datacenter: String,
    peer: String,
    sameness_group: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct FailoverIn {
    service: String,
    service_subset: String,
    namespace: String,
    datacenters: Vec<String>,
    targets: Vec<FailoverTargetIn>,
    policy: Option<FailoverPolicyIn>,
    sameness_group: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct FailoverTargetIn {
    service: String,
    service_subset: String,
    partition: String,
    namespace: String,
    datacenter: String,
    peer: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct FailoverPolicyIn {
    mode: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct LoadBalancerIn {
    policy: String,
    ring_hash_config: Option<RingHashIn>,
    least_request_config: Option<LeastRequestIn>,
    hash_policies: Vec<HashPolicyIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct RingHashIn {
    minimum_ring_size: Option<Value>,
    maximum_ring_size: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct LeastRequestIn {
    choice_count: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct HashPolicyIn {
    field: String,
    field_value: String,
    cookie_config: Option<CookieIn>,
    #[serde(rename = "SourceIP")]
    source_ip: bool,
    terminal: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct CookieIn {
    session: bool,
    #[serde(rename = "TTL")]
    ttl: Option<Value>,
    path: String,
}

/// Consul's `validateServiceSubset`: subsets become DNS labels of SNI names.
fn subset_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SUBSET_LEN {
        return Err("must be non-empty and 63 characters or fewer".into());
    }
    let b = name.as_bytes();
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !edge(b[0]) || !edge(b[b.len() - 1]) || !b.iter().all(|c| edge(*c) || *c == b'-') {
        return Err("must be 63 characters or fewer, begin or end with lower case alphanumeric characters, and contain lower case alphanumeric characters or '-' in between".into());
    }
    Ok(())
}

fn no_peering(peer: &str, sameness: &str, key: &str) -> Result<(), EntryError> {
    if !peer.is_empty() || !sameness.is_empty() {
        return Err(invalid(format!("{key}: cluster peers and sameness groups are not supported")));
    }
    Ok(())
}

pub(super) fn service_resolver(raw: Value) -> Result<(String, String, Value), EntryError> {
    let e: ResolverIn = from(drop_nulls(raw))?;
    enterprise_only(&e.namespace, &e.partition, "")?;
    let _ = e.kind;
    if e.name.is_empty() {
        return Err(invalid("Name is required"));
    }
    for (name, s) in &e.subsets {
        if name.is_empty() {
            return Err(invalid("Subset defined with empty name"));
        }
        subset_name(name).map_err(|why| invalid(format!("Subset {name:?} is invalid: {why}")))?;
        if !s.filter.is_empty() {
            crate::api::filter::Filter::parse(&s.filter)
                .map_err(|err| invalid(format!("Filter for subset {name:?} is not a valid expression: {err}")))?;
        }
    }
    let is_subset = |s: &str| e.subsets.contains_key(s);
    if !e.default_subset.is_empty() && !is_subset(&e.default_subset) {
        return Err(invalid(format!("DefaultSubset {:?} is not a valid subset", e.default_subset)));
    }
    if let Some(r) = &e.redirect {
        enterprise_only(&r.namespace, &r.partition, "Redirect.")?;
        no_peering(&r.peer, &r.sameness_group, "Redirect")?;
        if !e.failover.is_empty() {
            return Err(invalid("Redirect and Failover cannot both be set"));
        }
        if [&r.service, &r.service_subset, &r.namespace, &r.partition, &r.datacenter].iter().all(|x| x.is_empty()) {
            return Err(invalid("Redirect is empty"));
        }
        if r.service.is_empty() {
            for (k, x) in [("ServiceSubset", &r.service_subset), ("Namespace", &r.namespace), ("Partition", &r.partition)] {
                if !x.is_empty() {
                    return Err(invalid(format!("Redirect.{k} defined without Redirect.Service")));
                }
            }
        } else if !r.service_subset.is_empty() && r.service == e.name && !is_subset(&r.service_subset) {
            return Err(invalid(format!("Redirect.ServiceSubset {:?} is not a valid subset of {:?}", r.service_subset, e.name)));
        }
    }
    for (subset, f) in &e.failover {
        let prefix = format!("Bad Failover[{subset:?}]: ");
        enterprise_only(&f.namespace, "", &format!("Failover[{subset:?}]."))?;
        no_peering("", &f.sameness_group, &format!("Failover[{subset:?}]"))?;
        if subset != "*" && !is_subset(subset) {
            return Err(invalid(format!("{prefix}not a valid subset subset")));
        }
        if f.service.is_empty() && f.service_subset.is_empty() && f.namespace.is_empty() && f.datacenters.is_empty() && f.targets.is_empty() {
            return Err(invalid(format!("{prefix}one of Service, ServiceSubset, Namespace, Targets, or Datacenters is required")));
        }
        if let Some(p) = &f.policy
            && !matches!(p.mode.as_str(), "" | "default" | "order-by-locality")
        {
            return Err(invalid(format!("{prefix}Policy must be one of '', 'default', or 'order-by-locality'")));
        }
        if !f.service_subset.is_empty() && (f.service.is_empty() || f.service == e.name) && !is_subset(&f.service_subset) {
            return Err(invalid(format!("{prefix}ServiceSubset {:?} is not a valid subset of {:?}", f.service_subset, f.service)));
        }
        if !f.datacenters.is_empty() && !f.targets.is_empty() {
            return Err(invalid(format!("{prefix}Targets cannot be set with Datacenters")));
        }
        if !f.service_subset.is_empty() && !f.targets.is_empty() {
            return Err(invalid(format!("{prefix}Targets cannot be set with ServiceSubset")));
        }
        if !f.service.is_empty() && !f.targets.is_empty() {
            return Err(invalid(format!("{prefix}Targets cannot be set with Service")));
        }
        for (i, t) in f.targets.iter().enumerate() {
            let tp = format!("Bad Failover[{subset:?}].Targets[{i}]: ");
            enterprise_only(&t.namespace, &t.partition, &format!("Failover[{subset:?}].Targets[{i}]."))?;
            no_peering(&t.peer, "", &format!("Failover[{subset:?}].Targets[{i}]"))?;
            if !t.service_subset.is_empty() && (t.service.is_empty() || t.service == e.name) && !is_subset(&t.service_subset) {
                return Err(invalid(format!("{tp}ServiceSubset {:?} is not a valid subset of {:?}", t.service_subset, e.name)));
            }
        }
        if f.datacenters.iter().any(String::is_empty) {
            return Err(invalid(format!("Bad Failover[{subset:?}].Datacenters: found empty datacenter")));
        }
    }
    let connect_timeout = duration(e.connect_timeout, "ConnectTimeout", |s| format!("Bad ConnectTimeout '{s}', must be >= 0"))?;
    let request_timeout = duration(e.request_timeout, "RequestTimeout", |s| format!("Bad RequestTimeout '{s}', must be >= 0"))?;
    let load_balancer = match e.load_balancer {
        Some(lb) => Some(load_balancer(lb)?),
        None => None,
    };

    let mut v = Map::new();
    put_duration(&mut v, "ConnectTimeout", connect_timeout);
    put_duration(&mut v, "RequestTimeout", request_timeout);
    v.insert("Kind".into(), json!("service-resolver"));
    v.insert("Name".into(), json!(e.name));
    put_str(&mut v, "DefaultSubset", e.default_subset);
    if !e.subsets.is_empty() {
        let subsets: Map<String, Value> = e
            .subsets
            .into_iter()
            .map(|(k, s)| {
                let mut m = Map::new();
                put_str(&mut m, "Filter", s.filter);
                if s.only_passing {
                    m.insert("OnlyPassing".into(), json!(true));
                }
                (k, Value::Object(m))
            })
            .collect();
        v.insert("Subsets".into(), Value::Object(subsets));
    }
    if let Some(r) = e.redirect {
        let mut m = Map::new();
        put_str(&mut m, "Service", r.service);
        put_str(&mut m, "ServiceSubset", r.service_subset);
        put_str(&mut m, "Datacenter", r.datacenter);
        v.insert("Redirect".into(), Value::Object(m));
    }
    if !e.failover.is_empty() {
        let failover: Map<String, Value> = e
            .failover
            .into_iter()
            .map(|(k, f)| {
                let mut m = Map::new();
                put_str(&mut m, "Service", f.service);
                put_str(&mut m, "ServiceSubset", f.service_subset);
                if !f.datacenters.is_empty() {
                    m.insert("Datacenters".into(), json!(f.datacenters));
                }
                if !f.targets.is_empty() {
                    let targets: Vec<Value> = f
                        .targets
                        .into_iter()
                        .map(|t| {
                            let mut tm = Map::new();
                            put_str(&mut tm, "Service", t.service);
                            put_str(&mut tm, "ServiceSubset", t.service_subset);
                            put_str(&mut tm, "Datacenter", t.datacenter);
                            Value::Object(tm)
                        })
                        .collect();
                    m.insert("Targets".into(), Value::Array(targets));
                }
                if let Some(p) = f.policy {
                    let mut pm = Map::new();
                    put_str(&mut pm, "Mode", p.mode);
                    m.insert("Policy".into(), Value::Object(pm));
                }
                (k, Value::Object(m))
            })
            .collect();
        v.insert("Failover".into(), Value::Object(failover));
    }
    if let Some(lb) = load_balancer {
        v.insert("LoadBalancer".into(), lb);
    }
    finish("service-resolver", e.name, v, e.meta)
}

fn load_balancer(lb: LoadBalancerIn) -> Result<Value, EntryError> {
    if !LB_POLICIES.contains(&lb.policy.as_str()) {
        return Err(invalid(format!("Bad LoadBalancer policy: {:?} is not supported", lb.policy)));
    }
    if lb.policy != "ring_hash" && lb.ring_hash_config.is_some() {
        return Err(invalid(format!(
            "Bad LoadBalancer configuration. RingHashConfig specified for incompatible load balancing policy {:?}",
            lb.policy
        )));
    }
    if lb.policy != "least_request" && lb.least_request_config.is_some() {
        return Err(invalid(format!(
            "Bad LoadBalancer configuration. LeastRequestConfig specified for incompatible load balancing policy {:?}",
            lb.policy
        )));
    }
    let hash_based = matches!(lb.policy.as_str(), "ring_hash" | "maglev");
    if !hash_based && !lb.hash_policies.is_empty() {
        return Err(invalid(format!("Bad LoadBalancer configuration: HashPolicies specified for non-hash-based Policy: {:?}", lb.policy)));
    }
    let mut policies = Vec::new();
    for (i, hp) in lb.hash_policies.into_iter().enumerate() {
        let p = format!("Bad LoadBalancer HashPolicy[{i}]: ");
        if !hp.field.is_empty() && !HASH_FIELDS.contains(&hp.field.as_str()) {
            return Err(invalid(format!("{p}{:?} is not a supported field", hp.field)));
        }
        if hp.source_ip && !hp.field.is_empty() {
            return Err(invalid(format!("{p}A single hash policy cannot hash both a source address and a {:?}", hp.field)));
        }
        if hp.source_ip && !hp.field_value.is_empty() {
            return Err(invalid(format!("{p}A FieldValue cannot be specified when hashing SourceIP")));
        }
        if !hp.field.is_empty() && hp.field_value.is_empty() {
            return Err(invalid(format!("{p}Field {:?} was specified without a FieldValue", hp.field)));
        }
        if !hp.field_value.is_empty() && hp.field.is_empty() {
            return Err(invalid(format!("{p}FieldValue requires a Field to apply to")));
        }
        let mut m = Map::new();
        put_str(&mut m, "Field", hp.field.clone());
        put_str(&mut m, "FieldValue", hp.field_value);
        if let Some(c) = hp.cookie_config {
            if hp.field != "cookie" {
                return Err(invalid(format!("{p}cookie_config provided for {:?}", hp.field)));
            }
            let ttl = duration(c.ttl, &format!("LoadBalancer.HashPolicies[{i}].CookieConfig.TTL"), plain_negative("CookieConfig.TTL"))?;
            if c.session && !ttl.is_zero() {
                return Err(invalid(format!("{p}a session cookie cannot have an associated TTL")));
            }
            let mut cm = Map::new();
            if c.session {
                cm.insert("Session".into(), json!(true));
            }
            // A plain Go time.Duration without a string form: integer nanoseconds.
            if !ttl.is_zero() {
                cm.insert("TTL".into(), json!(ttl.as_nanos() as u64));
            }
            put_str(&mut cm, "Path", c.path);
            m.insert("CookieConfig".into(), Value::Object(cm));
        }
        if hp.source_ip {
            m.insert("SourceIP".into(), json!(true));
        }
        if hp.terminal {
            m.insert("Terminal".into(), json!(true));
        }
        policies.push(Value::Object(m));
    }
    let mut m = Map::new();
    put_str(&mut m, "Policy", lb.policy);
    if let Some(r) = lb.ring_hash_config {
        let mut rm = Map::new();
        for (k, x) in [("MinimumRingSize", r.minimum_ring_size), ("MaximumRingSize", r.maximum_ring_size)] {
            let n = uint(x, &format!("LoadBalancer.RingHashConfig.{k}"))?;
            if n > 0 {
                rm.insert(k.into(), json!(n));
            }
        }
        m.insert("RingHashConfig".into(), Value::Object(rm));
    }
    if let Some(l) = lb.least_request_config {
        let mut lm = Map::new();
        let n = uint(l.choice_count, "LoadBalancer.LeastRequestConfig.ChoiceCount")?;
        if n > 0 {
            lm.insert("ChoiceCount".into(), json!(n));
        }
        m.insert("LeastRequestConfig".into(), Value::Object(lm));
    }
    if !policies.is_empty() {
        m.insert("HashPolicies".into(), Value::Array(policies));
    }
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::super::config_entry::normalize;
    use super::*;

    fn norm(v: Value) -> Result<Value, String> {
        normalize(v).map(|(_, _, v)| v).map_err(|e| e.to_string())
    }

    fn router_err(routes: Value) -> String {
        norm(json!({"Kind": "service-router", "Name": "web", "Routes": routes})).unwrap_err()
    }

    #[test]
    fn router_decodes_case_insensitively_with_aliases_and_prints_consuls_shape() {
        let v = norm(json!({"kind": "service-router", "name": "web", "routes": [
            {"match": {"http": {"path_prefix": "/admin", "methods": ["get", "post"],
                "header": [{"name": "x-debug", "exact": "1"}], "query_param": [{"name": "q", "present": true}]}},
             "destination": {"service": "admin", "prefix_rewrite": "/", "request_timeout": "15s", "idle_timeout": 30_000_000_000u64,
                "num_retries": 3, "retry_on_connect_failure": true, "retry_on": ["5xx"], "retry_on_status_codes": [503],
                "request_headers": {"set": {"X-Env": "prod"}, "remove": ["x-debug"]}}}]}))
        .unwrap();
        let r = &v["Routes"][0];
        assert_eq!(r["Match"]["HTTP"]["PathPrefix"], "/admin");
        assert_eq!(r["Match"]["HTTP"]["Methods"], json!(["GET", "POST"]));
        assert_eq!(r["Match"]["HTTP"]["Header"], json!([{"Name": "x-debug", "Exact": "1"}]));
        assert_eq!(r["Match"]["HTTP"]["QueryParam"], json!([{"Name": "q", "Present": true}]));
        let d = &r["Destination"];
        assert_eq!((d["RequestTimeout"].as_str(), d["IdleTimeout"].as_str()), (Some("15s"), Some("30s")));
        assert_eq!((d["NumRetries"].as_u64(), d["RetryOnStatusCodes"].clone()), (Some(3), json!([503])));
        assert_eq!(d["RequestHeaders"], json!({"Set": {"X-Env": "prod"}, "Remove": ["x-debug"]}), "header names in Set are the user's");
        assert!(d.get("Namespace").is_none() && d.get("ServiceSubset").is_none());
        assert_eq!(norm(json!({"Kind": "service-router", "Name": "web"})).unwrap()["Routes"], Value::Null);
    }

    #[test]
    fn router_validation_uses_consuls_messages() {
        assert_eq!(
            router_err(json!([{"Match": {"HTTP": {"PathPrefix": "/a", "PathExact": "/b"}}}])),
            "Route[0] should only contain at most one of PathExact, PathPrefix, or PathRegex"
        );
        assert_eq!(router_err(json!([{"Match": {"HTTP": {"PathPrefix": "admin"}}}])), "Route[0] PathPrefix doesn't start with '/': \"admin\"");
        assert_eq!(router_err(json!([{}, {"Match": {"HTTP": {"Header": [{"Exact": "1"}]}}}])), "Route[1] Header[0] missing required Name field");
        assert_eq!(
            router_err(json!([{"Match": {"HTTP": {"Header": [{"Name": "x", "Invert": true}]}}}])),
            "Route[0] Header[0] should only contain one of Present, Exact, Prefix, Suffix, or Regex"
        );
        assert_eq!(
            router_err(json!([{"Match": {"HTTP": {"QueryParam": [{"Name": "q", "Exact": "1", "Regex": "x"}]}}}])),
            "Route[0] QueryParam[0] should only contain one of Present, Exact, or Regex"
        );
        assert_eq!(router_err(json!([{"Match": {"HTTP": {"Methods": ["FETCH"]}}}])), "Route[0] Methods contains an invalid method \"FETCH\"");
        assert_eq!(router_err(json!([{"Match": {"HTTP": {"Methods": ["get", "GET"]}}}])), "Route[0] Methods contains \"GET\" more than once");
        assert_eq!(
            router_err(json!([{"Match": {"HTTP": {"PathRegex": "/a.*"}}, "Destination": {"PrefixRewrite": "/"}}])),
            "Route[0] cannot make use of PrefixRewrite without configuring either PathExact or PathPrefix"
        );
        assert_eq!(router_err(json!([{"Destination": {"RetryOn": ["sometimes"]}}])), "Route[0] contains an invalid retry condition: \"sometimes\"");
        assert!(
            router_err(json!([{"Match": {"HTTP": {"PathRegex": "/(a"}}}]))
                .starts_with("Route[0] PathRegex \"/(a\" is not a valid regular expression")
        );
        assert!(router_err(json!([{"Destination": {"Namespace": "team"}}])).contains("namespaces are a consul enterprise feature"));
        assert!(router_err(json!([{"Destination": {"RequestTimeout": "soon"}}])).contains("RequestTimeout"));
        assert_eq!(norm(json!({"Kind": "service-router"})).unwrap_err(), "Name is required");
    }

    #[test]
    fn splitter_weights_are_normalised_and_must_sum_to_100() {
        let v = norm(json!({"Kind": "service-splitter", "Name": "web", "Splits": [
            {"Weight": 33.333, "ServiceSubset": "v1"}, {"Weight": "33.33", "ServiceSubset": "v2"}, {"Weight": 33.34, "Service": "other"}]}))
        .unwrap();
        assert_eq!(v["Splits"][0]["Weight"], json!(33.33));
        assert_eq!(v["Splits"][2]["Service"], "other");
        let ok = norm(json!({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 90}, {"Weight": 10, "ServiceSubset": "v2"}]})).unwrap();
        assert_eq!(ok["Splits"][0], json!({"Weight": 90}), "whole weights print as integers");
        let e = |splits: Value| norm(json!({"Kind": "service-splitter", "Name": "web", "Splits": splits})).unwrap_err();
        assert_eq!(e(json!([{"Weight": 90}])), "the sum of all split weights must be 100, not 90.000000");
        assert_eq!(e(json!([])), "no splits configured");
        assert_eq!(
            e(json!([{"Weight": 50, "Service": "web"}, {"Weight": 50}])),
            "split destination occurs more than once: service=\"web\", subset=\"\", namespace=\"\", partition=\"\""
        );
        let headers = norm(json!({"Kind": "service-splitter", "Name": "web", "Splits": [
            {"Weight": 100, "RequestHeaders": {"Add": {"x-a": "1"}}, "ResponseHeaders": {"Remove": ["server"]}}]}))
        .unwrap();
        assert_eq!(headers["Splits"][0]["RequestHeaders"], json!({"Add": {"x-a": "1"}}));
        assert_eq!(headers["Splits"][0]["ResponseHeaders"], json!({"Remove": ["server"]}));
    }

    fn resolver(extra: Value) -> Result<Value, String> {
        let mut v = json!({"Kind": "service-resolver", "Name": "web"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        norm(v)
    }

    #[test]
    fn resolver_decodes_subsets_failover_and_load_balancer() {
        let v = resolver(json!({
            "default_subset": "v1",
            "subsets": {"v1": {"filter": "Service.Meta.version == v1", "only_passing": true}, "v2": {"Filter": "Service.Meta.version == v2"}},
            "failover": {"*": {"datacenters": ["dc2", "dc3"]}, "v2": {"targets": [{"service_subset": "v1", "datacenter": "dc2"}]}},
            "connect_timeout": "15s", "request_timeout": "1m30s",
            "load_balancer": {"policy": "ring_hash", "ring_hash_config": {"minimum_ring_size": 1024},
                "hash_policies": [{"field": "cookie", "field_value": "s", "cookie_config": {"ttl": "30s", "path": "/"}}, {"source_ip": true, "terminal": true}]}}))
        .unwrap();
        assert_eq!(v["Subsets"]["v1"], json!({"Filter": "Service.Meta.version == v1", "OnlyPassing": true}));
        assert_eq!(v["Failover"]["*"], json!({"Datacenters": ["dc2", "dc3"]}));
        assert_eq!(v["Failover"]["v2"]["Targets"], json!([{"ServiceSubset": "v1", "Datacenter": "dc2"}]));
        assert_eq!((v["ConnectTimeout"].as_str(), v["RequestTimeout"].as_str()), (Some("15s"), Some("1m30s")));
        let lb = &v["LoadBalancer"];
        assert_eq!(lb["RingHashConfig"], json!({"MinimumRingSize": 1024}));
        assert_eq!(lb["HashPolicies"][0]["CookieConfig"], json!({"TTL": 30_000_000_000u64, "Path": "/"}));
        assert_eq!(lb["HashPolicies"][1], json!({"SourceIP": true, "Terminal": true}));
        let r = resolver(json!({"Redirect": {"Datacenter": "dc2"}})).unwrap();
        assert_eq!(r["Redirect"], json!({"Datacenter": "dc2"}));
    }

    #[test]
    fn resolver_validation_uses_consuls_messages() {
        let e = |x: Value| resolver(x).unwrap_err();
        assert_eq!(e(json!({"DefaultSubset": "v9"})), "DefaultSubset \"v9\" is not a valid subset");
        assert_eq!(
            e(json!({"Subsets": {"V1": {}}})),
            "Subset \"V1\" is invalid: must be 63 characters or fewer, begin or end with lower case alphanumeric characters, and contain lower case alphanumeric characters or '-' in between"
        );
        assert!(
            e(json!({"Subsets": {"v1": {"Filter": "Service.Meta.version =="}}})).starts_with("Filter for subset \"v1\" is not a valid expression: ")
        );
        assert_eq!(
            e(json!({"Redirect": {"Datacenter": "dc2"}, "Failover": {"*": {"Datacenters": ["dc3"]}}})),
            "Redirect and Failover cannot both be set"
        );
        assert_eq!(e(json!({"Redirect": {}})), "Redirect is empty");
        assert_eq!(e(json!({"Redirect": {"ServiceSubset": "v1"}})), "Redirect.ServiceSubset defined without Redirect.Service");
        assert_eq!(
            e(json!({"Redirect": {"Service": "web", "ServiceSubset": "v1"}})),
            "Redirect.ServiceSubset \"v1\" is not a valid subset of \"web\""
        );
        assert_eq!(e(json!({"Failover": {"v1": {"Datacenters": ["dc2"]}}})), "Bad Failover[\"v1\"]: not a valid subset subset");
        assert_eq!(
            e(json!({"Failover": {"*": {}}})),
            "Bad Failover[\"*\"]: one of Service, ServiceSubset, Namespace, Targets, or Datacenters is required"
        );
        assert_eq!(
            e(json!({"Failover": {"*": {"Datacenters": ["dc2"], "Targets": [{"Datacenter": "dc3"}]}}})),
            "Bad Failover[\"*\"]: Targets cannot be set with Datacenters"
        );
        assert_eq!(e(json!({"Failover": {"*": {"Datacenters": [""]}}})), "Bad Failover[\"*\"].Datacenters: found empty datacenter");
        assert_eq!(
            e(json!({"Failover": {"*": {"Datacenters": ["dc2"], "Policy": {"Mode": "fastest"}}}})),
            "Bad Failover[\"*\"]: Policy must be one of '', 'default', or 'order-by-locality'"
        );
        assert_eq!(e(json!({"ConnectTimeout": "-5s"})), "Bad ConnectTimeout '-5s', must be >= 0");
        assert_eq!(e(json!({"LoadBalancer": {"Policy": "fastest"}})), "Bad LoadBalancer policy: \"fastest\" is not supported");
        assert_eq!(
            e(json!({"LoadBalancer": {"Policy": "random", "RingHashConfig": {"MinimumRingSize": 1}}})),
            "Bad LoadBalancer configuration. RingHashConfig specified for incompatible load balancing policy \"random\""
        );
        assert_eq!(
            e(json!({"LoadBalancer": {"Policy": "least_request", "HashPolicies": [{"SourceIP": true}]}})),
            "Bad LoadBalancer configuration: HashPolicies specified for non-hash-based Policy: \"least_request\""
        );
        assert_eq!(
            e(json!({"LoadBalancer": {"Policy": "maglev", "HashPolicies": [{"Field": "header"}]}})),
            "Bad LoadBalancer HashPolicy[0]: Field \"header\" was specified without a FieldValue"
        );
        assert_eq!(
            e(json!({"LoadBalancer": {"Policy": "maglev", "HashPolicies": [{"Field": "path", "FieldValue": "x"}]}})),
            "Bad LoadBalancer HashPolicy[0]: \"path\" is not a supported field"
        );
        assert_eq!(
            e(
                json!({"LoadBalancer": {"Policy": "maglev", "HashPolicies": [{"Field": "cookie", "FieldValue": "c", "CookieConfig": {"Session": true, "TTL": "5s"}}]}})
            ),
            "Bad LoadBalancer HashPolicy[0]: a session cookie cannot have an associated TTL"
        );
        assert!(e(json!({"Redirect": {"Peer": "other"}})).contains("cluster peers"));
    }
}
