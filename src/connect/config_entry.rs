//! Config entries: decoding (field names case-insensitive, Consul's snake_case aliases, unknown
//! keys refused by name), validation and normalisation per kind, and the canonical JSON the
//! state stores and the API returns.
//!
//! Kinds: `proxy-defaults` (name `global`), `service-defaults`, `service-intentions`, and the
//! discovery chain's `service-router`, `service-splitter` and `service-resolver` (decoded and
//! checked in `chain_entry`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::intention;

/// Every kind this agent accepts.
pub const KINDS: &[&str] = &["proxy-defaults", "service-defaults", "service-intentions", "service-router", "service-splitter", "service-resolver"];

/// Why an entry cannot be written: `Decode` is a malformed body (Consul's "Request decoding
/// failed"), `Invalid` a well-formed entry that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("Request decoding failed: {0}")]
    Decode(String),
    #[error("{0}")]
    Invalid(String),
}

/// Field names used by config entries, in their canonical spelling. Keys arrive in any case
/// and (as Consul's aliases allow) in snake_case; anything not listed is an unknown key.
const FIELDS: &[&str] = &[
    "Kind",
    "Name",
    "Namespace",
    "Partition",
    "Meta",
    "Config",
    "Mode",
    "TransparentProxy",
    "OutboundListenerPort",
    "DialedDirectly",
    "MutualTLSMode",
    "MeshGateway",
    "Expose",
    "Checks",
    "Paths",
    "ListenerPort",
    "Path",
    "LocalPathPort",
    "Protocol",
    "AccessLogs",
    "Enabled",
    "DisableListenerLogs",
    "Type",
    "JSONFormat",
    "TextFormat",
    "EnvoyExtensions",
    "FailoverPolicy",
    "PrioritizeByLocality",
    "ExternalSNI",
    "UpstreamConfig",
    "Defaults",
    "Overrides",
    "ConnectTimeoutMs",
    "Limits",
    "MaxConnections",
    "MaxPendingRequests",
    "MaxConcurrentRequests",
    "PassiveHealthCheck",
    "Interval",
    "MaxFailures",
    "EnforcingConsecutive5xx",
    "BalanceOutboundConnections",
    "Peer",
    "Destination",
    "Addresses",
    "Port",
    "MaxInboundConnections",
    "LocalConnectTimeoutMs",
    "LocalRequestTimeoutMs",
    "BalanceInboundConnections",
    "RateLimits",
    "Sources",
    "Action",
    "Permissions",
    "HTTP",
    "PathExact",
    "PathPrefix",
    "PathRegex",
    "Header",
    "Present",
    "Exact",
    "Prefix",
    "Suffix",
    "Contains",
    "Regex",
    "Invert",
    "IgnoreCase",
    "Methods",
    "Precedence",
    "Description",
    "LegacyID",
    "LegacyMeta",
    "LegacyCreateTime",
    "LegacyUpdateTime",
    "SamenessGroup",
    "JWT",
    "Routes",
    "Match",
    "QueryParam",
    "Service",
    "ServiceSubset",
    "PrefixRewrite",
    "RequestTimeout",
    "IdleTimeout",
    "NumRetries",
    "RetryOnConnectFailure",
    "RetryOnStatusCodes",
    "RetryOn",
    "RequestHeaders",
    "ResponseHeaders",
    "Add",
    "Set",
    "Remove",
    "Splits",
    "Weight",
    "DefaultSubset",
    "Subsets",
    "Filter",
    "OnlyPassing",
    "Redirect",
    "Datacenter",
    "Failover",
    "Datacenters",
    "Targets",
    "ConnectTimeout",
    "LoadBalancer",
    "Policy",
    "RingHashConfig",
    "MinimumRingSize",
    "MaximumRingSize",
    "LeastRequestConfig",
    "ChoiceCount",
    "HashPolicies",
    "Field",
    "FieldValue",
    "CookieConfig",
    "Session",
    "TTL",
    "SourceIP",
    "Terminal",
];

/// Maps whose keys are the user's own (their values may still be structures, whose keys are
/// ours): left as they are.
const USER_KEYED: &[&str] = &["Meta", "LegacyMeta", "Config", "Subsets", "Failover", "Add", "Set"];

fn canonical(v: Value, errs: &mut Vec<String>, path: &str) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.into_iter().enumerate().map(|(i, x)| canonical(x, errs, &format!("{path}[{i}]"))).collect()),
        Value::Object(o) => {
            let mut out = Map::new();
            for (k, v) in o {
                let bare = k.replace('_', "");
                let Some(name) = FIELDS.iter().find(|f| f.eq_ignore_ascii_case(&k) || f.eq_ignore_ascii_case(&bare)) else {
                    errs.push(format!("invalid config key \"{}{k}\"", if path.is_empty() { String::new() } else { format!("{path}.") }));
                    continue;
                };
                let child = if path.is_empty() { name.to_string() } else { format!("{path}.{name}") };
                let v = match (USER_KEYED.contains(name), v) {
                    // `Config` of proxy-defaults is opaque; `Subsets`/`Failover` are maps of
                    // ours keyed by the user's names.
                    (true, Value::Object(m)) if matches!(*name, "Subsets" | "Failover") => Value::Object(
                        m.into_iter()
                            .map(|(k, v)| {
                                let c = canonical(v, errs, &format!("{child}.{k}"));
                                (k, c)
                            })
                            .collect(),
                    ),
                    (true, v) => v,
                    (_, v) => canonical(v, errs, &child),
                };
                // The canonical spelling wins over an alias given alongside it.
                if !(out.contains_key(*name) && bare.len() != k.len()) {
                    out.insert(name.to_string(), v);
                }
            }
            Value::Object(out)
        }
        other => other,
    }
}

pub(super) fn from<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, EntryError> {
    serde_json::from_value(v).map_err(|e| EntryError::Decode(e.to_string()))
}

pub(super) fn invalid(m: impl Into<String>) -> EntryError {
    EntryError::Invalid(m.into())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct MeshGatewayIn {
    mode: String,
}

fn mesh_gateway(m: Option<MeshGatewayIn>, key: &str) -> Result<Value, EntryError> {
    let mode = m.map(|m| m.mode.to_ascii_lowercase()).unwrap_or_default();
    if !matches!(mode.as_str(), "" | "none" | "local" | "remote") {
        return Err(invalid(format!("{key}.Mode: invalid mesh gateway mode {mode:?} (one of none, local, remote)")));
    }
    Ok(if mode.is_empty() { json!({}) } else { json!({ "Mode": mode }) })
}

pub(super) fn meta(m: Option<BTreeMap<String, String>>) -> Result<Option<Value>, EntryError> {
    let Some(m) = m.filter(|m| !m.is_empty()) else { return Ok(None) };
    if m.len() > 64 {
        return Err(invalid("Meta: at most 64 pairs"));
    }
    if let Some((k, _)) = m.iter().find(|(k, v)| k.len() > 128 || v.len() > 512) {
        return Err(invalid(format!("Meta: the key or value of {k:?} is too long (keys up to 128, values up to 512 characters)")));
    }
    Ok(Some(json!(m)))
}

pub const PROTOCOLS: &[&str] = &["tcp", "http", "http2", "grpc"];

fn protocol(p: &str, key: &str) -> Result<String, EntryError> {
    let p = p.to_ascii_lowercase();
    if !p.is_empty() && !PROTOCOLS.contains(&p.as_str()) {
        return Err(invalid(format!("{key}: invalid value for protocol: {p} (one of tcp, http, http2, grpc)")));
    }
    Ok(p)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct ProxyDefaultsIn {
    kind: String,
    name: String,
    namespace: String,
    partition: String,
    config: Option<Map<String, Value>>,
    mode: String,
    transparent_proxy: Option<Value>,
    #[serde(rename = "MutualTLSMode")]
    mutual_tls_mode: String,
    mesh_gateway: Option<MeshGatewayIn>,
    expose: Option<Value>,
    access_logs: Option<Value>,
    envoy_extensions: Option<Value>,
    failover_policy: Option<Value>,
    prioritize_by_locality: Option<Value>,
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct UpstreamSettingIn {
    name: String,
    namespace: String,
    partition: String,
    peer: String,
    protocol: String,
    connect_timeout_ms: u64,
    limits: Option<Value>,
    passive_health_check: Option<Value>,
    mesh_gateway: Option<MeshGatewayIn>,
    balance_outbound_connections: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct UpstreamConfigIn {
    defaults: Option<UpstreamSettingIn>,
    overrides: Vec<UpstreamSettingIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct ServiceDefaultsIn {
    kind: String,
    name: String,
    namespace: String,
    partition: String,
    protocol: String,
    mode: String,
    transparent_proxy: Option<Value>,
    #[serde(rename = "MutualTLSMode")]
    mutual_tls_mode: String,
    mesh_gateway: Option<MeshGatewayIn>,
    expose: Option<Value>,
    #[serde(rename = "ExternalSNI")]
    external_sni: String,
    upstream_config: Option<UpstreamConfigIn>,
    destination: Option<Value>,
    max_inbound_connections: u64,
    local_connect_timeout_ms: u64,
    local_request_timeout_ms: u64,
    balance_inbound_connections: String,
    rate_limits: Option<Value>,
    envoy_extensions: Option<Value>,
    meta: Option<BTreeMap<String, String>>,
}

fn upstream_setting(u: UpstreamSettingIn, key: &str, named: bool) -> Result<Value, EntryError> {
    if named && u.name.is_empty() {
        return Err(invalid(format!("{key}.Name is required")));
    }
    if !named && !u.name.is_empty() {
        return Err(invalid(format!("{key}.Name must be empty")));
    }
    let mut v = json!({ "Peer": u.peer, "MeshGateway": mesh_gateway(u.mesh_gateway, &format!("{key}.MeshGateway"))? });
    if !u.name.is_empty() {
        v["Name"] = json!(u.name);
    }
    let p = protocol(&u.protocol, &format!("{key}.Protocol"))?;
    if !p.is_empty() {
        v["Protocol"] = json!(p);
    }
    if u.connect_timeout_ms > 0 {
        v["ConnectTimeoutMs"] = json!(u.connect_timeout_ms);
    }
    for (k, x) in [("Limits", u.limits), ("PassiveHealthCheck", u.passive_health_check)] {
        if let Some(x) = x {
            v[k] = x;
        }
    }
    Ok(v)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct ServiceIntentionsIn {
    kind: String,
    name: String,
    namespace: String,
    partition: String,
    sources: Vec<SourceIn>,
    meta: Option<BTreeMap<String, String>>,
    #[serde(rename = "JWT")]
    jwt: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct SourceIn {
    name: String,
    namespace: String,
    partition: String,
    peer: String,
    sameness_group: String,
    action: String,
    permissions: Vec<PermissionIn>,
    precedence: i64,
    #[serde(rename = "Type")]
    source_type: String,
    description: String,
    #[serde(rename = "LegacyID")]
    legacy_id: String,
    legacy_meta: Option<Value>,
    legacy_create_time: Option<Value>,
    legacy_update_time: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
struct PermissionIn {
    action: String,
    #[serde(rename = "HTTP")]
    http: Option<HttpIn>,
    #[serde(rename = "JWT")]
    jwt: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
pub(crate) struct HttpIn {
    pub path_exact: String,
    pub path_prefix: String,
    pub path_regex: String,
    pub header: Vec<HeaderIn>,
    pub methods: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default, deny_unknown_fields)]
pub(crate) struct HeaderIn {
    pub name: String,
    pub present: bool,
    pub exact: String,
    pub prefix: String,
    pub suffix: String,
    pub contains: String,
    pub regex: String,
    pub invert: bool,
    pub ignore_case: bool,
}

/// Longest intention description (Consul's `metaValueMaxLength`).
const MAX_DESCRIPTION: usize = 512;

/// HTTP methods a route or permission may name (Go's `net/http` constants).
pub(super) const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// Check one header matcher of a permission (exactly one way of matching) into its JSON form.
/// `Contains` and `IgnoreCase` are newer Consul fields, accepted and kept.
pub(crate) fn header_match(h: HeaderIn, key: &str) -> Result<Value, EntryError> {
    if h.name.is_empty() {
        return Err(invalid(format!("{key} missing required Name field")));
    }
    let ways = [h.present, !h.exact.is_empty(), !h.regex.is_empty(), !h.prefix.is_empty(), !h.suffix.is_empty(), !h.contains.is_empty()];
    if ways.iter().filter(|w| **w).count() != 1 {
        return Err(invalid(format!("{key} should only contain one of Present, Exact, Prefix, Suffix, or Regex")));
    }
    if !h.regex.is_empty() {
        regex::Regex::new(&h.regex).map_err(|e| invalid(format!("{key} Regex {:?} is not a valid regular expression: {e}", h.regex)))?;
    }
    let mut v = json!({ "Name": h.name });
    if h.present {
        v["Present"] = json!(true);
    }
    for (k, x) in [("Exact", h.exact), ("Prefix", h.prefix), ("Suffix", h.suffix), ("Contains", h.contains), ("Regex", h.regex)] {
        if !x.is_empty() {
            v[k] = json!(x);
        }
    }
    if h.invert {
        v["Invert"] = json!(true);
    }
    if h.ignore_case {
        v["IgnoreCase"] = json!(true);
    }
    Ok(v)
}

/// Check an HTTP matcher of an intention permission, in Consul's order and with its messages
/// (`key` is `Sources[i].Permissions[j].HTTP`).
fn http_permission(h: HttpIn, key: &str) -> Result<Value, EntryError> {
    let mut paths = 0;
    for (k, p) in [("PathExact", &h.path_exact), ("PathPrefix", &h.path_prefix)] {
        if !p.is_empty() {
            paths += 1;
            if !p.starts_with('/') {
                return Err(invalid(format!("{key}.{k} doesn't start with '/': {p:?}")));
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
        regex::Regex::new(&h.path_regex)
            .map_err(|e| invalid(format!("{key}.PathRegex {:?} is not a valid regular expression: {e}", h.path_regex)))?;
    }
    let mut v = Map::new();
    for (k, x) in [("PathExact", &h.path_exact), ("PathPrefix", &h.path_prefix), ("PathRegex", &h.path_regex)] {
        if !x.is_empty() {
            v.insert(k.into(), json!(x));
        }
    }
    let headers: Vec<Value> =
        h.header.into_iter().enumerate().map(|(i, x)| header_match(x, &format!("{key}.Header[{i}]"))).collect::<Result<_, _>>()?;
    let mut methods: Vec<String> = Vec::new();
    for m in h.methods.iter().map(|m| m.to_ascii_uppercase()) {
        if !METHODS.contains(&m.as_str()) {
            return Err(invalid(format!("{key}.Methods contains an invalid method {m:?}")));
        }
        if methods.contains(&m) {
            return Err(invalid(format!("{key}.Methods contains {m:?} more than once")));
        }
        methods.push(m);
    }
    if paths == 0 && headers.is_empty() && methods.is_empty() {
        return Err(invalid(format!("{key} should not be empty")));
    }
    if !headers.is_empty() {
        v.insert("Header".into(), Value::Array(headers));
    }
    if !methods.is_empty() {
        v.insert("Methods".into(), json!(methods));
    }
    Ok(Value::Object(v))
}

/// Wildcards must be whole values (`*`), as Consul requires.
fn check_wildcard(name: &str, key: &str) -> Result<(), EntryError> {
    if name.contains('*') && name != "*" {
        return Err(invalid(format!("{key}: wildcard character '*' cannot be used with partial values")));
    }
    Ok(())
}

pub(super) fn enterprise_only(ns: &str, part: &str, key: &str) -> Result<(), EntryError> {
    if !ns.is_empty() && ns != "default" {
        return Err(EntryError::Decode(format!("invalid config key \"{key}Namespace\", namespaces are a consul enterprise feature")));
    }
    if !part.is_empty() && part != "default" {
        return Err(EntryError::Decode(format!("invalid config key \"{key}Partition\", admin partitions are a consul enterprise feature")));
    }
    Ok(())
}

/// Decode, validate and normalise an entry from a request body (JSON or HCL-translated JSON).
/// Returns (kind, name, canonical JSON).
pub fn normalize(raw: Value) -> Result<(String, String, Value), EntryError> {
    let Value::Object(obj) = &raw else { return Err(EntryError::Decode("the body is not a JSON object".into())) };
    let kind = match obj.iter().find(|(k, _)| k.eq_ignore_ascii_case("kind")).map(|(_, v)| v) {
        None => return Err(EntryError::Decode("Payload does not contain a kind/Kind key at the top level".into())),
        Some(Value::String(k)) => k.to_ascii_lowercase(),
        Some(_) => return Err(EntryError::Decode("Kind value in payload is not a string".into())),
    };
    if !KINDS.contains(&kind.as_str()) {
        return Err(EntryError::Decode(format!("invalid config entry kind: {kind}")));
    }
    let mut errs = Vec::new();
    let v = canonical(raw, &mut errs, "");
    if !errs.is_empty() {
        return Err(EntryError::Decode(format!(
            "{} error{} occurred:\n{}",
            errs.len(),
            if errs.len() == 1 { "" } else { "s" },
            errs.iter().map(|e| format!("\t* {e}")).collect::<Vec<_>>().join("\n")
        )));
    }
    match kind.as_str() {
        "proxy-defaults" => proxy_defaults(from(v)?),
        "service-defaults" => service_defaults(from(v)?),
        "service-intentions" => service_intentions(from(v)?),
        "service-router" => super::chain_entry::service_router(v),
        "service-splitter" => super::chain_entry::service_splitter(v),
        "service-resolver" => super::chain_entry::service_resolver(v),
        other => Err(EntryError::Decode(format!("invalid config entry kind: {other}"))),
    }
}

fn proxy_defaults(e: ProxyDefaultsIn) -> Result<(String, String, Value), EntryError> {
    enterprise_only(&e.namespace, &e.partition, "")?;
    let name = if e.name.is_empty() { "global".to_string() } else { e.name };
    if name != "global" {
        return Err(invalid(format!("invalid name ({name:?}), only \"global\" is supported")));
    }
    let _ = e.kind;
    let mode = e.mode.to_ascii_lowercase();
    if !matches!(mode.as_str(), "" | "direct" | "transparent") {
        return Err(invalid(format!("Mode: invalid mode {:?} (one of direct, transparent)", e.mode)));
    }
    if !matches!(e.mutual_tls_mode.as_str(), "" | "strict" | "permissive") {
        return Err(invalid(format!("Invalid MutualTLSMode {:?}. Must be one of \"\", \"strict\", or \"permissive\".", e.mutual_tls_mode)));
    }
    if let Some(p) = e.config.as_ref().and_then(|c| c.get("protocol")) {
        protocol(p.as_str().ok_or_else(|| invalid("Config.protocol must be a string"))?, "Config.protocol")?;
    }
    let mut v = json!({
        "Kind": "proxy-defaults", "Name": name,
        "Config": e.config.map(Value::Object).unwrap_or(Value::Null),
        "TransparentProxy": e.transparent_proxy.unwrap_or(json!({})),
        "MeshGateway": mesh_gateway(e.mesh_gateway, "MeshGateway")?,
        "Expose": e.expose.unwrap_or(json!({})),
        "AccessLogs": e.access_logs.unwrap_or(json!({})),
    });
    if !mode.is_empty() {
        v["Mode"] = json!(mode);
    }
    if !e.mutual_tls_mode.is_empty() {
        v["MutualTLSMode"] = json!(e.mutual_tls_mode);
    }
    for (k, x) in [("EnvoyExtensions", e.envoy_extensions), ("FailoverPolicy", e.failover_policy), ("PrioritizeByLocality", e.prioritize_by_locality)]
    {
        if let Some(x) = x.filter(|x| !x.is_null()) {
            v[k] = x;
        }
    }
    if let Some(m) = meta(e.meta)? {
        v["Meta"] = m;
    }
    Ok(("proxy-defaults".into(), "global".into(), v))
}

fn service_defaults(e: ServiceDefaultsIn) -> Result<(String, String, Value), EntryError> {
    enterprise_only(&e.namespace, &e.partition, "")?;
    let _ = e.kind;
    if e.name.is_empty() {
        return Err(invalid("Name is required"));
    }
    if e.name == "*" {
        return Err(invalid("service-defaults name must be the name of a service, and not a wildcard"));
    }
    let p = protocol(&e.protocol, "Protocol")?;
    if e.upstream_config.is_some() && e.destination.is_some() {
        return Err(invalid("UpstreamConfig and Destination are mutually exclusive for service defaults"));
    }
    let mode = e.mode.to_ascii_lowercase();
    if !matches!(mode.as_str(), "" | "direct" | "transparent") {
        return Err(invalid(format!("Mode: invalid mode {:?} (one of direct, transparent)", e.mode)));
    }
    let mut v = json!({
        "Kind": "service-defaults", "Name": e.name, "Protocol": p,
        "TransparentProxy": e.transparent_proxy.unwrap_or(json!({})),
        "MeshGateway": mesh_gateway(e.mesh_gateway, "MeshGateway")?,
        "Expose": e.expose.unwrap_or(json!({})),
    });
    if !mode.is_empty() {
        v["Mode"] = json!(mode);
    }
    if !e.mutual_tls_mode.is_empty() {
        v["MutualTLSMode"] = json!(e.mutual_tls_mode);
    }
    if !e.external_sni.is_empty() {
        v["ExternalSNI"] = json!(e.external_sni);
    }
    if let Some(u) = e.upstream_config {
        let mut uc = Map::new();
        if let Some(d) = u.defaults {
            uc.insert("Defaults".into(), upstream_setting(d, "UpstreamConfig.Defaults", false)?);
        }
        let overrides: Vec<Value> = u
            .overrides
            .into_iter()
            .enumerate()
            .map(|(i, o)| upstream_setting(o, &format!("UpstreamConfig.Overrides[{i}]"), true))
            .collect::<Result<_, _>>()?;
        if !overrides.is_empty() {
            uc.insert("Overrides".into(), Value::Array(overrides));
        }
        v["UpstreamConfig"] = Value::Object(uc);
    }
    if let Some(d) = e.destination {
        v["Destination"] = d;
    }
    for (k, n) in [
        ("MaxInboundConnections", e.max_inbound_connections),
        ("LocalConnectTimeoutMs", e.local_connect_timeout_ms),
        ("LocalRequestTimeoutMs", e.local_request_timeout_ms),
    ] {
        if n > 0 {
            v[k] = json!(n);
        }
    }
    if !e.balance_inbound_connections.is_empty() {
        v["BalanceInboundConnections"] = json!(e.balance_inbound_connections);
    }
    for (k, x) in [("RateLimits", e.rate_limits), ("EnvoyExtensions", e.envoy_extensions)] {
        if let Some(x) = x.filter(|x| !x.is_null()) {
            v[k] = x;
        }
    }
    if let Some(m) = meta(e.meta)? {
        v["Meta"] = m;
    }
    let name = v["Name"].as_str().unwrap_or_default().to_string();
    Ok(("service-defaults".into(), name, v))
}

fn service_intentions(e: ServiceIntentionsIn) -> Result<(String, String, Value), EntryError> {
    enterprise_only(&e.namespace, &e.partition, "")?;
    let _ = e.kind;
    if e.name.is_empty() {
        return Err(invalid("Name is required"));
    }
    check_wildcard(&e.name, "Name")?;
    if e.jwt.as_ref().is_some_and(|j| !j.is_null()) {
        return Err(invalid("JWT: JWT authentication of intentions is not supported"));
    }
    if e.sources.is_empty() {
        return Err(invalid("At least one source is required"));
    }
    let mut sources = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in e.sources.into_iter().enumerate() {
        let key = format!("Sources[{i}]");
        enterprise_only(&s.namespace, &s.partition, &format!("{key}."))?;
        if s.name.is_empty() {
            return Err(invalid(format!("{key}.Name is required")));
        }
        check_wildcard(&s.name, &format!("{key}.Name"))?;
        if !s.peer.is_empty() || !s.sameness_group.is_empty() {
            return Err(invalid(format!("{key}: cluster peers and sameness groups are not supported")));
        }
        if s.description.len() > MAX_DESCRIPTION {
            return Err(invalid(format!("{key}.Description exceeds maximum length {MAX_DESCRIPTION}")));
        }
        for (k, set) in [
            ("LegacyMeta", s.legacy_meta.is_some()),
            ("LegacyCreateTime", s.legacy_create_time.is_some()),
            ("LegacyUpdateTime", s.legacy_update_time.is_some()),
            ("LegacyID", !s.legacy_id.is_empty()),
        ] {
            if set {
                return Err(invalid(format!("{key}.{k} must be omitted")));
            }
        }
        let action = s.action.to_ascii_lowercase();
        if s.permissions.is_empty() && !matches!(action.as_str(), "allow" | "deny") {
            return Err(invalid(format!("{key}.Action must be set to 'allow' or 'deny'")));
        }
        if !s.permissions.is_empty() && !action.is_empty() {
            return Err(invalid(format!("{key}.Action must be omitted if Permissions are specified")));
        }
        if e.name == "*" && !s.permissions.is_empty() {
            return Err(invalid(format!("{key}.Permissions cannot be specified on intentions with wildcarded destinations")));
        }
        let source_type = if s.source_type.is_empty() { "consul".to_string() } else { s.source_type };
        if source_type != "consul" {
            return Err(invalid(format!("{key}.Type must be set to 'consul'")));
        }
        let mut src = json!({ "Name": s.name, "Precedence": intention::precedence(&s.name, &e.name), "Type": source_type });
        if s.permissions.is_empty() {
            src["Action"] = json!(action);
        } else {
            let mut perms = Vec::new();
            for (j, p) in s.permissions.into_iter().enumerate() {
                let pk = format!("{key}.Permissions[{j}]");
                let pa = p.action.to_ascii_lowercase();
                if !matches!(pa.as_str(), "allow" | "deny") {
                    return Err(invalid(format!("{pk}.Action must be set to 'allow' or 'deny'")));
                }
                let http = p.http.ok_or_else(|| invalid(format!("{pk}.HTTP is required")))?;
                let http = http_permission(http, &format!("{pk}.HTTP"))?;
                if p.jwt.as_ref().is_some_and(|j| !j.is_null()) {
                    return Err(invalid(format!("{pk}.JWT: JWT authentication of intentions is not supported")));
                }
                perms.push(json!({ "Action": pa, "HTTP": http }));
            }
            src["Permissions"] = Value::Array(perms);
        }
        if !s.description.is_empty() {
            src["Description"] = json!(s.description);
        }
        if !seen.insert(src["Name"].as_str().unwrap_or_default().to_string()) {
            return Err(invalid(format!("{key} defines {:?} more than once", src["Name"].as_str().unwrap_or_default())));
        }
        let _ = s.precedence;
        sources.push(src);
    }
    // Evaluation order: precedence, highest first (stable among equals).
    sources.sort_by_key(|s| std::cmp::Reverse(s["Precedence"].as_i64().unwrap_or(0)));
    let mut v = json!({ "Kind": "service-intentions", "Name": e.name, "Sources": sources });
    if let Some(m) = meta(e.meta)? {
        v["Meta"] = m;
    }
    Ok(("service-intentions".into(), e.name, v))
}

/// An entry as the API returns it: its canonical JSON with the row's indexes.
pub fn entry_json(e: &crate::state::mesh::ConfigEntry) -> Value {
    let mut v: Value = serde_json::from_str(&e.json).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut v {
        o.insert("CreateIndex".into(), json!(e.create_index));
        o.insert("ModifyIndex".into(), json!(e.modify_index));
    }
    v
}

/// The protocol a service speaks, by Consul's rules: its `service-defaults` `Protocol` if that
/// entry exists (empty meaning tcp), else `proxy-defaults` `Config.protocol`, else tcp.
pub fn service_protocol(entries: &BTreeMap<(String, String), crate::state::mesh::ConfigEntry>, service: &str) -> String {
    let get = |kind: &str, name: &str| entries.get(&(kind.to_string(), name.to_string())).and_then(|e| serde_json::from_str::<Value>(&e.json).ok());
    if let Some(sd) = get("service-defaults", service) {
        let p = sd["Protocol"].as_str().unwrap_or_default();
        return if p.is_empty() { "tcp".into() } else { p.to_string() };
    }
    get("proxy-defaults", "global")
        .and_then(|pd| pd["Config"]["protocol"].as_str().map(str::to_string))
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "tcp".into())
}

/// Consul's `?merge-central-config`: a proxy's registration (`Proxy` JSON of a
/// `connect-proxy` or `mesh-gateway`) completed with what config entries say about it:
/// `proxy-defaults` `Config`, `Mode`, `MeshGateway`, `Expose` and `TransparentProxy` under the
/// registration's own values; the destination's `service-defaults` protocol and mesh gateway
/// mode; each upstream's protocol from its destination's entries. The registration wins.
pub fn merge_central_config(entries: &BTreeMap<(String, String), crate::state::mesh::ConfigEntry>, kind: &str, proxy: &mut Value) {
    if kind != "connect-proxy" && kind != "mesh-gateway" {
        return;
    }
    let get = |kind: &str, name: &str| entries.get(&(kind.to_string(), name.to_string())).and_then(|e| serde_json::from_str::<Value>(&e.json).ok());
    let pd = get("proxy-defaults", "global").unwrap_or(Value::Null);
    let destination = proxy["DestinationServiceName"].as_str().unwrap_or_default().to_string();
    let sd = if destination.is_empty() { Value::Null } else { get("service-defaults", &destination).unwrap_or(Value::Null) };
    let Value::Object(p) = proxy else { return };
    // Config: central keys under the registration's own.
    let mut config = pd["Config"].as_object().cloned().unwrap_or_default();
    if !destination.is_empty() {
        config.insert("protocol".into(), json!(service_protocol(entries, &destination)));
    }
    if let Some(own) = p.get("Config").and_then(Value::as_object) {
        for (k, v) in own {
            config.insert(k.clone(), v.clone());
        }
    }
    if !config.is_empty() {
        p.insert("Config".into(), Value::Object(config));
    }
    let empty = |v: Option<&Value>| v.is_none_or(|v| v.is_null() || v.as_str() == Some("") || v.as_object().is_some_and(|o| o.is_empty()));
    // Mesh gateway mode: the registration's, else the service's defaults, else proxy-defaults.
    if empty(p.get("MeshGateway").and_then(|m| m.get("Mode"))) {
        let mode = [&sd["MeshGateway"]["Mode"], &pd["MeshGateway"]["Mode"]].into_iter().find(|m| !empty(Some(m))).cloned();
        if let Some(m) = mode {
            p.insert("MeshGateway".into(), json!({ "Mode": m }));
        }
    }
    for key in ["Mode", "Expose", "TransparentProxy"] {
        if empty(p.get(key))
            && let Some(v) = [&sd[key], &pd[key]].into_iter().find(|v| !empty(Some(v)))
        {
            p.insert(key.into(), v.clone());
        }
    }
    if let Some(ups) = p.get_mut("Upstreams").and_then(Value::as_array_mut) {
        for u in ups {
            let (Some(name), Value::Object(u)) = (u["DestinationName"].as_str().map(str::to_string), u) else { continue };
            if u.get("DestinationType").and_then(Value::as_str).is_some_and(|t| t == "prepared_query") {
                continue;
            }
            let cfg = u.entry("Config").or_insert_with(|| json!({}));
            if let Value::Object(c) = cfg
                && !c.contains_key("protocol")
            {
                c.insert("protocol".into(), json!(service_protocol(entries, &name)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(v: Value) -> Result<Value, String> {
        normalize(v).map(|(_, _, v)| v).map_err(|e| e.to_string())
    }

    #[test]
    fn keys_are_case_insensitive_take_snake_aliases_and_unknown_ones_are_named() {
        let v = norm(json!({"kind": "service-defaults", "name": "web", "protocol": "HTTP", "mesh_gateway": {"mode": "local"}})).unwrap();
        assert_eq!(v["Protocol"], "http");
        assert_eq!(v["MeshGateway"]["Mode"], "local");
        let err = norm(json!({"Kind": "service-defaults", "Name": "web", "Protocl": "http"})).unwrap_err();
        assert!(err.contains("invalid config key \"Protocl\""), "{err}");
        assert!(norm(json!({"Name": "x"})).unwrap_err().contains("does not contain a kind"));
        assert!(norm(json!({"Kind": "mesh-thing", "Name": "x"})).unwrap_err().contains("invalid config entry kind: mesh-thing"));
    }

    #[test]
    fn proxy_defaults_are_global_and_keep_their_config_opaque() {
        let v = norm(json!({"Kind": "proxy-defaults", "Config": {"protocol": "http", "local_connect_timeout_ms": 1000}})).unwrap();
        assert_eq!((v["Name"].as_str(), v["Config"]["local_connect_timeout_ms"].as_i64()), (Some("global"), Some(1000)));
        assert!(norm(json!({"Kind": "proxy-defaults", "Name": "other"})).unwrap_err().contains("only \"global\" is supported"));
        assert!(norm(json!({"Kind": "proxy-defaults", "Config": {"protocol": "smtp"}})).unwrap_err().contains("invalid value for protocol"));
    }

    #[test]
    fn intentions_get_precedence_and_order_and_consuls_errors() {
        let v = norm(json!({"Kind": "service-intentions", "Name": "db", "Sources": [
            {"Name": "*", "Action": "deny"}, {"Name": "web", "Action": "ALLOW"}]}))
        .unwrap();
        assert_eq!(v["Sources"][0]["Name"], "web");
        assert_eq!((v["Sources"][0]["Precedence"].as_i64(), v["Sources"][1]["Precedence"].as_i64()), (Some(9), Some(8)));
        assert_eq!(v["Sources"][0]["Action"], "allow");
        assert_eq!(v["Sources"][0]["Type"], "consul");
        let e = |sources: Value| norm(json!({"Kind": "service-intentions", "Name": "db", "Sources": sources})).unwrap_err();
        assert!(e(json!([{"Name": "web"}])).contains("Sources[0].Action must be set to 'allow' or 'deny'"));
        assert!(e(json!([{"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}])).contains("defines \"web\" more than once"));
        assert!(e(json!([{"Name": "we*", "Action": "allow"}])).contains("partial values"));
        assert!(e(json!([])).contains("At least one source is required"));
        assert!(
            e(json!([{"Name": "web", "Action": "allow", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}]))
                .contains("Action must be omitted if Permissions are specified")
        );
        assert!(e(json!([{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "x"}}]}])).contains("doesn't start with '/'"));
    }

    #[test]
    fn service_protocol_follows_consuls_precedence() {
        let mut entries = BTreeMap::new();
        let put = |m: &mut BTreeMap<(String, String), crate::state::mesh::ConfigEntry>, v: Value| {
            let (kind, name, json) = normalize(v).unwrap();
            m.insert((kind.clone(), name.clone()), crate::state::mesh::ConfigEntry { kind, name, json: json.to_string(), ..Default::default() });
        };
        assert_eq!(service_protocol(&entries, "web"), "tcp");
        put(&mut entries, json!({"Kind": "proxy-defaults", "Config": {"protocol": "http"}}));
        assert_eq!(service_protocol(&entries, "web"), "http");
        put(&mut entries, json!({"Kind": "service-defaults", "Name": "web"}));
        assert_eq!(service_protocol(&entries, "web"), "tcp", "a service-defaults entry without Protocol hides proxy-defaults");
        put(&mut entries, json!({"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"}));
        assert_eq!(service_protocol(&entries, "web"), "grpc");
    }
}
