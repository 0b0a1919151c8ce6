//! Records held in the replicated tables, with Consul's JSON field names.
//!
//! These types travel inside Raft entries (postcard) and out of the HTTP API (JSON), so they use
//! only serde attributes that both encodings understand: renames and defaults, never
//! `skip_serializing_if`, `flatten` or `untagged`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The strings of catalog rows: 16 bytes, held inline up to 15 bytes (most node names, IDs,
/// addresses and tags), shared by reference count beyond. A catalog instance is otherwise
/// mostly string headers and small heap allocations.
pub type Str = ecow::EcoString;

/// Raft log index at which a row was created or last modified.
pub type RaftIndex = u64;

/// Health of a check, ordered from best to worst so that `max` gives the aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Passing,
    Warning,
    #[default]
    Critical,
    Maintenance,
}

impl CheckStatus {
    pub fn parse(s: &str) -> Option<CheckStatus> {
        match s {
            "passing" => Some(CheckStatus::Passing),
            "warning" => Some(CheckStatus::Warning),
            "critical" => Some(CheckStatus::Critical),
            "maintenance" => Some(CheckStatus::Maintenance),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Passing => "passing",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
            CheckStatus::Maintenance => "maintenance",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    #[serde(rename = "ID", default)]
    pub id: Str,
    pub node: Str,
    pub address: Str,
    #[serde(default)]
    pub datacenter: Str,
    #[serde(default)]
    pub tagged_addresses: BTreeMap<String, String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub create_index: RaftIndex,
    #[serde(default)]
    pub modify_index: RaftIndex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: i64,
    pub warning: i64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights { passing: 1, warning: 1 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceAddress {
    pub address: Str,
    pub port: u16,
}

/// One service instance on one node (Consul's `NodeService`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct Service {
    #[serde(default)]
    pub kind: Str,
    #[serde(rename = "ID", default)]
    pub id: Str,
    pub service: Str,
    #[serde(default)]
    pub tags: Vec<Str>,
    #[serde(default)]
    pub address: Str,
    #[serde(default)]
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub weights: Weights,
    #[serde(default)]
    pub enable_tag_override: bool,
    /// The proxy part of a `connect-proxy` (or gateway) registration (boxed: most services
    /// have none, and a row stays small).
    #[serde(default)]
    pub proxy: Option<Box<super::mesh::ServiceProxy>>,
    /// `Connect.Native`: the service speaks mesh mTLS itself.
    #[serde(default)]
    pub connect_native: bool,
    #[serde(default)]
    pub create_index: RaftIndex,
    #[serde(default)]
    pub modify_index: RaftIndex,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    #[serde(default)]
    pub node: Str,
    #[serde(rename = "CheckID", default)]
    pub check_id: Str,
    #[serde(default)]
    pub name: Str,
    #[serde(default)]
    pub status: CheckStatus,
    #[serde(default)]
    pub notes: Str,
    #[serde(default)]
    pub output: Str,
    #[serde(rename = "ServiceID", default)]
    pub service_id: Str,
    #[serde(default)]
    pub service_name: Str,
    #[serde(default)]
    pub service_tags: Vec<Str>,
    #[serde(rename = "Type", default)]
    pub check_type: Str,
    #[serde(default)]
    pub create_index: RaftIndex,
    #[serde(default)]
    pub modify_index: RaftIndex,
}

/// A key/value entry. `Value` is base64 in JSON, as Consul sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct KvEntry {
    pub key: String,
    #[serde(with = "base64_opt")]
    pub value: Option<Vec<u8>>,
    pub flags: u64,
    pub lock_index: u64,
    pub session: String,
    pub create_index: RaftIndex,
    pub modify_index: RaftIndex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SessionBehavior {
    #[default]
    Release,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct Session {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub node: String,
    /// Node checks whose failure invalidates the session (Consul's `NodeChecks`).
    pub node_checks: Vec<String>,
    /// Service checks `(service id ignored, check id)` whose failure invalidates the session.
    pub service_checks: Vec<ServiceCheckRef>,
    /// Lock delay in nanoseconds, as Consul's JSON carries it.
    pub lock_delay: u64,
    pub behavior: SessionBehavior,
    #[serde(rename = "TTL")]
    pub ttl: String,
    pub namespace: String,
    pub create_index: RaftIndex,
    pub modify_index: RaftIndex,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceCheckRef {
    #[serde(rename = "ID")]
    pub id: String,
    pub namespace: String,
}

/// A node's network coordinate with the indexes of its row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinateEntry {
    pub coord: crate::coordinate::Coordinate,
    pub create_index: RaftIndex,
    pub modify_index: RaftIndex,
}

/// The auto-encrypt CA: PEM certificate and private key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for AgentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCa").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// Autopilot settings (Consul's `AutopilotConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AutopilotConfig {
    pub cleanup_dead_servers: bool,
    /// Go duration string, e.g. "200ms".
    pub last_contact_threshold: String,
    pub max_trailing_logs: u64,
    pub min_quorum: u64,
    /// Go duration string, e.g. "10s".
    pub server_stabilization_time: String,
    pub create_index: RaftIndex,
    pub modify_index: RaftIndex,
}

impl Default for AutopilotConfig {
    fn default() -> Self {
        AutopilotConfig {
            cleanup_dead_servers: true,
            last_contact_threshold: "200ms".into(),
            max_trailing_logs: 250,
            min_quorum: 0,
            server_stabilization_time: "10s".into(),
            create_index: 0,
            modify_index: 0,
        }
    }
}

mod base64_opt {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    // Human-readable formats (JSON) carry base64 text; binary ones (postcard) carry raw bytes.
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            // An empty value reads back as null, as Consul's does (Go's nil []byte).
            match v {
                Some(b) if !b.is_empty() => s.serialize_some(&STANDARD.encode(b)),
                _ => s.serialize_none(),
            }
        } else {
            match v {
                Some(b) => s.serialize_some(serde_bytes::Bytes::new(b)),
                None => s.serialize_none(),
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        if d.is_human_readable() {
            let t: Option<String> = Option::deserialize(d)?;
            t.map(|t| STANDARD.decode(t).map_err(serde::de::Error::custom)).transpose()
        } else {
            Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(serde_bytes::ByteBuf::into_vec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_entry_value_is_base64_in_json_and_raw_in_postcard() {
        let e = KvEntry { key: "a".into(), value: Some(b"hi".to_vec()), ..Default::default() };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["Value"], "aGk=");
        let back: KvEntry = serde_json::from_value(j).unwrap();
        assert_eq!(back, e);
        let p = postcard::to_allocvec(&e).unwrap();
        assert_eq!(postcard::from_bytes::<KvEntry>(&p).unwrap(), e);
    }
}
