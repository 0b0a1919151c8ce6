//! Intentions: the views Consul's `/v1/connect/intentions` endpoints give over
//! `service-intentions` config entries (one entry per destination, one intention per source),
//! their precedence, the decision for a connection from one service to another (`decide`), and
//! for one HTTP request over it (`decide_request`, L7 permissions).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::state::mesh::ConfigEntry;

/// Consul's precedence (CE: namespaces are always exact): exact beats wildcard, destination
/// first. 9 exact→exact, 8 *→exact, 6 exact→*, 5 *→*.
pub fn precedence(source: &str, destination: &str) -> i64 {
    let count = |n: &str| if n == "*" { 1 } else { 2 };
    let max = match count(destination) {
        2 => 9,
        _ => 6,
    };
    max - (2 - count(source))
}

/// One intention, as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Intention {
    pub source: String,
    pub destination: String,
    /// `allow` or `deny`; empty when the intention has L7 permissions instead.
    pub action: String,
    pub permissions: Vec<Value>,
    pub precedence: i64,
    pub description: String,
    pub meta: Value,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Intention {
    pub fn is_l7(&self) -> bool {
        !self.permissions.is_empty()
    }

    /// Consul's `Intention.String()` (CE).
    pub fn describe(&self) -> String {
        let what =
            if self.is_l7() { format!("Permissions: {}", self.permissions.len()) } else { format!("Action: {}", self.action.to_ascii_uppercase()) };
        format!("default/{} => default/{} (Precedence: {}, {what})", self.source, self.destination, self.precedence)
    }

    /// Read an intention back from its JSON (a client agent's cached match results).
    pub fn from_json(v: &Value) -> Option<Intention> {
        Some(Intention {
            source: v["SourceName"].as_str()?.to_string(),
            destination: v["DestinationName"].as_str()?.to_string(),
            action: v["Action"].as_str().unwrap_or_default().to_string(),
            permissions: v["Permissions"].as_array().cloned().unwrap_or_default(),
            precedence: v["Precedence"].as_i64().unwrap_or(0),
            description: v["Description"].as_str().unwrap_or_default().to_string(),
            meta: v.get("Meta").cloned().unwrap_or(Value::Null),
            create_index: v["CreateIndex"].as_u64().unwrap_or(0),
            modify_index: v["ModifyIndex"].as_u64().unwrap_or(0),
        })
    }

    pub fn json(&self) -> Value {
        let mut v = json!({
            "SourceNS": "default", "SourceName": self.source, "DestinationNS": "default", "DestinationName": self.destination,
            "SourceType": "consul", "Precedence": self.precedence, "CreateIndex": self.create_index, "ModifyIndex": self.modify_index,
        });
        if !self.action.is_empty() {
            v["Action"] = json!(self.action);
        }
        if self.is_l7() {
            v["Permissions"] = Value::Array(self.permissions.clone());
        }
        if !self.description.is_empty() {
            v["Description"] = json!(self.description);
        }
        if self.meta.as_object().is_some_and(|m| !m.is_empty()) {
            v["Meta"] = self.meta.clone();
        }
        v
    }
}

/// Every intention held in `entries`, in evaluation order: precedence, highest first, then
/// by source and destination name.
pub fn all(entries: &BTreeMap<(String, String), ConfigEntry>) -> Vec<Intention> {
    let mut out = Vec::new();
    for ((kind, _), e) in entries.range(("service-intentions".to_string(), String::new())..) {
        if kind != "service-intentions" {
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(&e.json) else { continue };
        for s in v["Sources"].as_array().into_iter().flatten() {
            out.push(Intention {
                source: s["Name"].as_str().unwrap_or_default().to_string(),
                destination: e.name.clone(),
                action: s["Action"].as_str().unwrap_or_default().to_string(),
                permissions: s["Permissions"].as_array().cloned().unwrap_or_default(),
                precedence: s["Precedence"].as_i64().unwrap_or(0),
                description: s["Description"].as_str().unwrap_or_default().to_string(),
                meta: v.get("Meta").cloned().unwrap_or(Value::Null),
                create_index: e.create_index,
                modify_index: e.modify_index,
            });
        }
    }
    sort(&mut out);
    out
}

fn sort(v: &mut [Intention]) {
    v.sort_by(|a, b| b.precedence.cmp(&a.precedence).then_with(|| a.source.cmp(&b.source)).then_with(|| a.destination.cmp(&b.destination)));
}

/// Intentions that apply to `name` as a destination (`by_destination`) or a source: its own
/// and the wildcard ones, in evaluation order.
pub fn matching(all: &[Intention], name: &str, by_destination: bool) -> Vec<Intention> {
    all.iter()
        .filter(|i| {
            let n = if by_destination { &i.destination } else { &i.source };
            n == name || n == "*"
        })
        .cloned()
        .collect()
}

/// The decision for a connection from `source` to `destination`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
    /// The intention that decided, if one did.
    pub intention: Option<Intention>,
}

/// Decide a connection at L4: the first intention in evaluation order that matches both ends
/// decides (one with L7 permissions denies here: its rules apply per request to HTTP services
/// only); with none, the default policy does.
pub fn decide(all: &[Intention], source: &str, destination: &str, default_allow: bool, default_from_config: bool) -> Decision {
    let found = all.iter().find(|i| (i.destination == destination || i.destination == "*") && (i.source == source || i.source == "*"));
    match found {
        Some(i) if i.is_l7() => Decision { allowed: false, reason: format!("Matched L7 intention: {}", i.describe()), intention: Some(i.clone()) },
        Some(i) => Decision { allowed: i.action == "allow", reason: format!("Matched L4 intention: {}", i.describe()), intention: Some(i.clone()) },
        None if default_from_config => Decision { allowed: default_allow, reason: "Default intention policy".into(), intention: None },
        None => Decision { allowed: default_allow, reason: "Default behavior configured by ACLs".into(), intention: None },
    }
}

/// What a per-request decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The request's path, without the query string.
    pub path: &'a str,
    pub headers: &'a axum::http::HeaderMap,
}

/// Decide one HTTP request from `source` to `destination`, as Consul's (Envoy RBAC) rules do:
/// the first intention in evaluation order that matches both ends decides. An L4 one by its
/// action; an L7 one by its permissions, in order, the first that matches the request deciding.
/// A request that matches none of them gets the default policy (not the next, less precise
/// intention: the source's own intention took the decision out of their hands). With no
/// intention at all, the default policy decides.
pub fn decide_request(
    all: &[Intention],
    source: &str,
    destination: &str,
    req: &RequestFacts,
    default_allow: bool,
    default_from_config: bool,
) -> Decision {
    let found = all.iter().find(|i| (i.destination == destination || i.destination == "*") && (i.source == source || i.source == "*"));
    let Some(i) = found.filter(|i| i.is_l7()) else {
        return decide(all, source, destination, default_allow, default_from_config);
    };
    for (n, p) in i.permissions.iter().enumerate() {
        if permission_matches(p, req) {
            let action = p["Action"].as_str().unwrap_or_default();
            return Decision {
                allowed: action == "allow",
                reason: format!("Matched L7 intention: {}, permission {n} ({action})", i.describe()),
                intention: Some(i.clone()),
            };
        }
    }
    let default = if default_from_config { "default intention policy" } else { "default behavior configured by ACLs" };
    Decision {
        allowed: default_allow,
        reason: format!("Matched L7 intention: {}, no permission matched: {default}", i.describe()),
        intention: Some(i.clone()),
    }
}

/// Whether an intention permission's `HTTP` matcher (`PathExact`/`PathPrefix`/`PathRegex`,
/// `Header`, `Methods`, all of them) matches the request.
pub fn permission_matches(permission: &Value, req: &RequestFacts) -> bool {
    let h = &permission["HTTP"];
    let path_ok = if let Some(p) = h["PathExact"].as_str() {
        req.path == p
    } else if let Some(p) = h["PathPrefix"].as_str() {
        req.path.starts_with(p)
    } else if let Some(p) = h["PathRegex"].as_str() {
        full_match(p, req.path)
    } else {
        true
    };
    let methods_ok = h["Methods"].as_array().is_none_or(|m| m.iter().any(|m| m.as_str().is_some_and(|m| m.eq_ignore_ascii_case(req.method))));
    path_ok && methods_ok && h["Header"].as_array().into_iter().flatten().all(|m| header_matches(m, req.headers))
}

/// Whether a header matcher (`Name` with one of `Present`, `Exact`, `Prefix`, `Suffix`,
/// `Contains`, `Regex`; `Invert`, `IgnoreCase`) matches, with Envoy's semantics: several values
/// of the header are joined with `,`; a missing header matches only an inverted `Present`.
/// Routers' header matches have the same shape and meaning.
pub fn header_matches(m: &Value, headers: &axum::http::HeaderMap) -> bool {
    let name = m["Name"].as_str().unwrap_or_default();
    let invert = m["Invert"].as_bool() == Some(true);
    let values: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
    if values.is_empty() {
        return invert && m["Present"].as_bool() == Some(true);
    }
    let joined = values.join(",");
    let fold = m["IgnoreCase"].as_bool() == Some(true);
    let cmp = |s: &str| if fold { s.to_ascii_lowercase() } else { s.to_string() };
    let value = cmp(&joined);
    let s = |k: &str| m[k].as_str().map(cmp);
    let matched = if m["Present"].as_bool() == Some(true) {
        true
    } else if let Some(x) = s("Exact") {
        value == x
    } else if let Some(x) = s("Prefix") {
        value.starts_with(&x)
    } else if let Some(x) = s("Suffix") {
        value.ends_with(&x)
    } else if let Some(x) = s("Contains") {
        value.contains(&x)
    } else if let Some(x) = m["Regex"].as_str() {
        full_match(x, &joined)
    } else {
        false
    };
    matched != invert
}

/// Compiled patterns, shared: a proxy decides every request with the same few.
static PATTERNS: std::sync::LazyLock<parking_lot::Mutex<std::collections::HashMap<String, Option<regex::Regex>>>> =
    std::sync::LazyLock::new(Default::default);
/// Distinct patterns remembered before the cache starts over.
const MAX_PATTERNS: usize = 1024;

/// Whether `re` matches the whole of `text` (Envoy's `safe_regex`, RE2 semantics); an invalid
/// pattern (refused at write time, so only from an older entry) matches nothing.
pub fn full_match(re: &str, text: &str) -> bool {
    let compiled = {
        let mut cache = PATTERNS.lock();
        if cache.len() >= MAX_PATTERNS && !cache.contains_key(re) {
            cache.clear();
        }
        cache.entry(re.to_string()).or_insert_with(|| regex::Regex::new(&format!("^(?:{re})$")).ok()).clone()
    };
    compiled.is_some_and(|r| r.is_match(text))
}

/// Parse `name`, `ns/name` (the namespace must be `default`) as intention endpoints take it.
pub fn parse_name(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [name] => Ok((*name).to_string()),
        [ns, name] if *ns == "default" || *ns == "*" => Ok((*name).to_string()),
        [_, _] => Err("namespaces are a consul enterprise feature".into()),
        [_, _, _] => Err("admin partitions are a consul enterprise feature".into()),
        _ => Err("input can contain at most two '/'".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dest: &str, sources: Value) -> ((String, String), ConfigEntry) {
        let (kind, name, json) =
            crate::connect::config_entry::normalize(json!({"Kind": "service-intentions", "Name": dest, "Sources": sources})).unwrap();
        ((kind.clone(), name.clone()), ConfigEntry { kind, name, json: json.to_string(), create_index: 3, modify_index: 4 })
    }

    #[test]
    fn precedence_is_consuls() {
        assert_eq!((precedence("web", "db"), precedence("*", "db"), precedence("web", "*"), precedence("*", "*")), (9, 8, 6, 5));
    }

    #[test]
    fn exact_intentions_beat_wildcards_and_the_default_applies_last() {
        let entries: BTreeMap<_, _> = [
            entry("db", json!([{"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "deny"}])),
            entry("*", json!([{"Name": "admin", "Action": "allow"}])),
        ]
        .into_iter()
        .collect();
        let all = all(&entries);
        assert_eq!(all.iter().map(|i| i.precedence).collect::<Vec<_>>(), vec![9, 8, 6]);
        let d = decide(&all, "web", "db", false, false);
        assert!(d.allowed);
        assert_eq!(d.reason, "Matched L4 intention: default/web => default/db (Precedence: 9, Action: ALLOW)");
        assert!(!decide(&all, "api", "db", true, false).allowed, "the wildcard deny of db beats the default");
        assert!(!decide(&all, "admin", "db", true, false).allowed, "db's own *->db (8) comes before admin->* (6)");
        assert!(decide(&all, "admin", "cache", false, false).allowed);
        let none = decide(&all, "api", "cache", true, true);
        assert_eq!((none.allowed, none.reason.as_str()), (true, "Default intention policy"));
        assert_eq!(matching(&all, "db", true).len(), 3);
        assert_eq!(matching(&all, "web", false).len(), 2);
    }

    fn facts<'a>(method: &'a str, path: &'a str, headers: &'a axum::http::HeaderMap) -> RequestFacts<'a> {
        RequestFacts { method, path, headers }
    }

    #[test]
    fn l7_permissions_decide_in_order_and_fall_back_to_the_default() {
        let entries: BTreeMap<_, _> = [
            entry(
                "api",
                json!([
                    {"Name": "web", "Permissions": [
                        {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                        {"Action": "allow", "HTTP": {"PathPrefix": "/v1", "Methods": ["GET", "HEAD"]}},
                        {"Action": "allow", "HTTP": {"PathRegex": "/items/[0-9]+", "Header": [{"Name": "x-env", "Exact": "prod"}]}}]},
                    {"Name": "*", "Action": "deny"},
                ]),
            ),
            entry("*", json!([{"Name": "web", "Action": "allow"}])),
        ]
        .into_iter()
        .collect();
        let all = all(&entries);
        let none = axum::http::HeaderMap::new();
        let mut prod = axum::http::HeaderMap::new();
        prod.insert("X-Env", "prod".parse().unwrap());
        let d = |method, path, h, default_allow| decide_request(&all, "web", "api", &facts(method, path, h), default_allow, true);
        let admin = d("GET", "/admin/users", &none, true);
        assert!(!admin.allowed);
        assert_eq!(admin.reason, "Matched L7 intention: default/web => default/api (Precedence: 9, Permissions: 3), permission 0 (deny)");
        assert!(d("GET", "/v1/things", &none, false).allowed);
        assert!(!d("POST", "/v1/things", &none, false).allowed, "a method outside the list does not match");
        assert!(d("POST", "/v1/things", &none, true).allowed, "no permission matched: the default policy, not the * deny");
        assert!(d("PUT", "/items/42", &prod, false).allowed);
        assert!(!d("PUT", "/items/42x", &prod, false).allowed, "regexes match the whole path");
        assert!(!d("PUT", "/items/42", &none, false).allowed);
        // Other sources: the L4 rules, as before.
        assert!(!decide_request(&all, "db", "api", &facts("GET", "/v1", &none), true, true).allowed);
        assert!(decide_request(&all, "web", "cache", &facts("GET", "/", &none), false, true).allowed);
    }

    #[test]
    fn header_matchers_follow_envoy() {
        let mut h = axum::http::HeaderMap::new();
        h.append("x-tag", "a".parse().unwrap());
        h.append("x-tag", "b".parse().unwrap());
        h.insert("x-user", "Alice".parse().unwrap());
        let m = |v: Value| header_matches(&v, &h);
        assert!(m(json!({"Name": "x-tag", "Exact": "a,b"})), "repeated headers are joined with commas");
        assert!(m(json!({"Name": "X-User", "Prefix": "Al"})));
        assert!(m(json!({"Name": "x-user", "Suffix": "ice"})));
        assert!(m(json!({"Name": "x-user", "Exact": "alice", "IgnoreCase": true})));
        assert!(!m(json!({"Name": "x-user", "Exact": "alice"})));
        assert!(m(json!({"Name": "x-user", "Regex": "[A-Z][a-z]+"})));
        assert!(!m(json!({"Name": "x-user", "Regex": "[a-z]+"})), "a regex must match the whole value");
        assert!(m(json!({"Name": "x-user", "Exact": "bob", "Invert": true})));
        assert!(m(json!({"Name": "x-missing", "Present": true, "Invert": true})));
        assert!(!m(json!({"Name": "x-missing", "Exact": "1", "Invert": true})), "a missing header matches only an inverted Present");
        assert!(!m(json!({"Name": "x-missing", "Present": true})));
    }

    #[test]
    fn l7_intentions_deny_at_l4() {
        let entries: BTreeMap<_, _> =
            [entry("db", json!([{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}]))].into_iter().collect();
        let d = decide(&all(&entries), "web", "db", true, false);
        assert!(!d.allowed && d.reason.starts_with("Matched L7 intention"));
    }
}
