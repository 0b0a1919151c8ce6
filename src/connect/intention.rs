//! Intentions: the views Consul's `/v1/connect/intentions` endpoints give over
//! `service-intentions` config entries (one entry per destination, one intention per source),
//! their precedence, and the decision for a connection from one service to another.

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

    #[test]
    fn l7_intentions_deny_at_l4() {
        let entries: BTreeMap<_, _> =
            [entry("db", json!([{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}]))].into_iter().collect();
        let d = decide(&all(&entries), "web", "db", true, false);
        assert!(!d.allowed && d.reason.starts_with("Matched L7 intention"));
    }
}
