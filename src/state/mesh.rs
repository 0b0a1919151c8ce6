//! The service mesh's replicated records: the Connect CA (roots, the key that signs leaves in
//! this datacenter, the CA configuration), config entries, and the proxy part of a service
//! registration.
//!
//! Config entries are kept as canonical JSON text: the API validates and normalises each kind
//! (`connect::config_entry`) before it is written, and the state only stores, orders and
//! versions them. Opaque JSON inside records (a proxy's `Config`) is text too, since the
//! state's binary encoding cannot carry arbitrary JSON values; in the HTTP API it is the JSON
//! object it was.

use serde::{Deserialize, Serialize};

use super::{Outcome, RaftIndex, Store, Table};

/// JSON text that is an object in JSON and a string in binary encodings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonText(pub String);

impl JsonText {
    pub fn value(&self) -> serde_json::Value {
        if self.0.is_empty() { serde_json::Value::Null } else { serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null) }
    }

    pub fn of(v: &serde_json::Value) -> JsonText {
        if v.is_null() { JsonText::default() } else { JsonText(v.to_string()) }
    }

    /// One key of an object, as a string.
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.value().get(key).and_then(|v| v.as_str().map(str::to_string))
    }
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { self.value().serialize(s) } else { s.serialize_str(&self.0) }
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let v = serde_json::Value::deserialize(d)?;
            Ok(JsonText::of(&v))
        } else {
            Ok(JsonText(String::deserialize(d)?))
        }
    }
}

/// `MeshGateway { Mode }`: how a proxy reaches other datacenters (`""`, `none`, `local`,
/// `remote`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct MeshGatewayConfig {
    #[serde(default)]
    pub mode: String,
}

/// One upstream of a connect proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct Upstream {
    /// `service` (default) or `prepared_query`.
    #[serde(default)]
    pub destination_type: String,
    #[serde(default)]
    pub destination_namespace: String,
    pub destination_name: String,
    #[serde(default)]
    pub datacenter: String,
    #[serde(default)]
    pub local_bind_address: String,
    #[serde(default)]
    pub local_bind_port: u16,
    #[serde(default)]
    pub config: JsonText,
    #[serde(default)]
    pub mesh_gateway: MeshGatewayConfig,
}

/// The `Proxy` block of a `connect-proxy` (or gateway) service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceProxy {
    #[serde(default)]
    pub destination_service_name: String,
    #[serde(rename = "DestinationServiceID", default)]
    pub destination_service_id: String,
    #[serde(default)]
    pub local_service_address: String,
    #[serde(default)]
    pub local_service_port: u16,
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub config: JsonText,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    #[serde(default)]
    pub mesh_gateway: MeshGatewayConfig,
    #[serde(default)]
    pub expose: JsonText,
}

/// The built-in CA's settings (Consul's `CAConfiguration` for the `consul` provider).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaConfig {
    pub provider: String,
    pub leaf_cert_ttl: String,
    pub intermediate_cert_ttl: String,
    pub root_cert_ttl: String,
    pub private_key_type: String,
    pub private_key_bits: u32,
    pub csr_max_per_second: f64,
    pub csr_max_concurrent: u64,
    pub force_without_cross_signing: bool,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            provider: "consul".into(),
            leaf_cert_ttl: "72h".into(),
            intermediate_cert_ttl: "8760h".into(),
            root_cert_ttl: "87600h".into(),
            private_key_type: "ec".into(),
            private_key_bits: 256,
            csr_max_per_second: 50.0,
            csr_max_concurrent: 0,
            force_without_cross_signing: false,
        }
    }
}

/// One CA root, as `/v1/connect/ca/roots` lists it, plus the signing material the API never
/// shows.
#[derive(Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CaRoot {
    /// Colon-hex SHA-1 of the root certificate's DER.
    pub id: String,
    pub name: String,
    pub serial_number: u64,
    /// Colon-hex key identifier of the certificate that signs leaves in this datacenter.
    pub signing_key_id: String,
    pub external_trust_domain: String,
    pub not_before: String,
    pub not_after: String,
    pub root_cert: String,
    /// Cross-signed certificates (during a rotation) and this datacenter's intermediate.
    pub intermediate_certs: Vec<String>,
    pub active: bool,
    pub private_key_type: String,
    pub private_key_bits: u32,
    /// When it stopped being the active root (ms since the epoch); 0 while active.
    pub rotated_out_at_ms: u64,
    /// The certificate and key that sign leaves here (the root itself in the primary, this
    /// datacenter's intermediate in a secondary). Empty in a secondary's copy of roots it does
    /// not sign with.
    pub signing_cert: String,
    pub signing_key: String,
    pub create_index: RaftIndex,
    pub modify_index: RaftIndex,
}

impl std::fmt::Debug for CaRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRoot").field("id", &self.id).field("active", &self.active).field("signing_key", &"<redacted>").finish()
    }
}

/// The Connect CA of this datacenter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ConnectCa {
    /// The cluster's UUID; the trust domain is `<cluster_id>.consul`.
    pub cluster_id: String,
    pub config: CaConfig,
    pub config_create_index: RaftIndex,
    pub config_modify_index: RaftIndex,
    pub roots: Vec<CaRoot>,
}

impl ConnectCa {
    pub fn trust_domain(&self) -> String {
        format!("{}.consul", self.cluster_id.to_ascii_lowercase())
    }

    pub fn active_root(&self) -> Option<&CaRoot> {
        self.roots.iter().find(|r| r.active)
    }

    /// The version a write of the CA must name (`Command::CaSet::expect`).
    pub fn version(&self) -> RaftIndex {
        self.config_modify_index.max(self.roots.iter().map(|r| r.modify_index).max().unwrap_or(0))
    }
}

/// A config entry: its kind and name, and the rest as canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ConfigEntry {
    pub kind: String,
    pub name: String,
    /// The whole entry as JSON (Kind and Name included, indexes not).
    pub json: String,
    pub create_index: RaftIndex,
    pub modify_index: RaftIndex,
}

impl Store {
    /// Install a new CA state (initialisation, configuration change, rotation, a secondary's
    /// new intermediate). `expect` is the CA's modify index the writer read (0: only if none
    /// exists): two leaders racing cannot replace each other's CA.
    pub(super) fn ca_set(&mut self, index: RaftIndex, ca: &ConnectCa, expect: RaftIndex) -> Outcome {
        let current =
            self.data.connect_ca.as_ref().map_or(0, |c| c.config_modify_index.max(c.roots.iter().map(|r| r.modify_index).max().unwrap_or(0)));
        if current != expect {
            return Outcome::Applied(false);
        }
        let mut ca = ca.clone();
        let old = self.data.connect_ca.take();
        if old.as_ref().is_none_or(|o| o.config != ca.config) || ca.config_create_index == 0 {
            ca.config_create_index = old.as_ref().map_or(index, |o| o.config_create_index);
            ca.config_modify_index = index;
        }
        for r in &mut ca.roots {
            let before = old.as_ref().and_then(|o| o.roots.iter().find(|x| x.id == r.id));
            r.create_index = before.map_or(index, |b| b.create_index);
            let unchanged = before.is_some_and(|b| {
                CaRoot { create_index: 0, modify_index: 0, ..b.clone() } == CaRoot { create_index: 0, modify_index: 0, ..r.clone() }
            });
            r.modify_index = if unchanged { before.map_or(index, |b| b.modify_index) } else { index };
        }
        self.data.connect_ca = Some(ca);
        self.touch(Table::ConnectCa);
        Outcome::Applied(true)
    }

    /// Write a config entry; with `cas`, only if its modify index is that (0: only if absent).
    pub(super) fn config_set(&mut self, index: RaftIndex, e: &ConfigEntry, cas: Option<RaftIndex>) -> Outcome {
        let key = (e.kind.clone(), e.name.clone());
        let existing = self.data.config_entries.get(&key);
        if let Some(cas) = cas
            && existing.map_or(0, |x| x.modify_index) != cas
        {
            return Outcome::Applied(false);
        }
        if existing.is_some_and(|x| x.json == e.json) {
            return Outcome::Applied(true);
        }
        let create_index = existing.map_or(index, |x| x.create_index);
        self.data.config_entries.insert(key, ConfigEntry { create_index, modify_index: index, ..e.clone() });
        self.touch(Table::ConfigEntries);
        Outcome::Applied(true)
    }

    pub(super) fn config_delete(&mut self, kind: &str, name: &str, cas: Option<RaftIndex>) -> Outcome {
        let key = (kind.to_string(), name.to_string());
        match (self.data.config_entries.get(&key), cas) {
            (Some(e), Some(cas)) if e.modify_index != cas => return Outcome::Applied(false),
            (None, Some(_)) => return Outcome::Applied(false),
            (None, None) => return Outcome::Applied(true),
            _ => {}
        }
        self.data.config_entries.remove(&key);
        self.touch(Table::ConfigEntries);
        Outcome::Applied(true)
    }

    /// A secondary datacenter's copy of the primary's entries: everything replaced by
    /// `entries` (their content; indexes are this datacenter's own).
    pub(super) fn config_replicate(&mut self, index: RaftIndex, entries: &[ConfigEntry]) -> Outcome {
        let wanted: std::collections::BTreeMap<(String, String), &ConfigEntry> =
            entries.iter().map(|e| ((e.kind.clone(), e.name.clone()), e)).collect();
        let stale: Vec<(String, String)> = self.data.config_entries.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        let mut changed = !stale.is_empty();
        for k in stale {
            self.data.config_entries.remove(&k);
        }
        for (k, e) in wanted {
            let existing = self.data.config_entries.get(&k);
            if existing.is_some_and(|x| x.json == e.json) {
                continue;
            }
            let create_index = existing.map_or(index, |x| x.create_index);
            self.data.config_entries.insert(k, ConfigEntry { create_index, modify_index: index, ..e.clone() });
            changed = true;
        }
        if changed {
            self.touch(Table::ConfigEntries);
        }
        Outcome::Done
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::req;
    use super::super::{Command, Outcome, Store};
    use super::*;

    fn entry(kind: &str, name: &str, json: &str) -> ConfigEntry {
        ConfigEntry { kind: kind.into(), name: name.into(), json: json.into(), ..Default::default() }
    }

    #[test]
    fn config_entries_honour_cas_and_keep_their_create_index() {
        let mut s = Store::new();
        let e = entry("service-defaults", "web", r#"{"Protocol":"http"}"#);
        assert_eq!(s.apply(5, &req(Command::ConfigSet { entry: e.clone(), cas: Some(0) })), Outcome::Applied(true));
        assert_eq!(s.apply(6, &req(Command::ConfigSet { entry: e.clone(), cas: Some(0) })), Outcome::Applied(false));
        let e2 = entry("service-defaults", "web", r#"{"Protocol":"grpc"}"#);
        assert_eq!(s.apply(7, &req(Command::ConfigSet { entry: e2, cas: Some(5) })), Outcome::Applied(true));
        let got = &s.data().config_entries[&("service-defaults".to_string(), "web".to_string())];
        assert_eq!((got.create_index, got.modify_index), (5, 7));
        assert_eq!(
            s.apply(8, &req(Command::ConfigDelete { kind: "service-defaults".into(), name: "web".into(), cas: Some(5) })),
            Outcome::Applied(false)
        );
        assert_eq!(
            s.apply(9, &req(Command::ConfigDelete { kind: "service-defaults".into(), name: "web".into(), cas: Some(7) })),
            Outcome::Applied(true)
        );
        assert!(s.data().config_entries.is_empty());
    }

    #[test]
    fn replication_replaces_the_whole_set() {
        let mut s = Store::new();
        s.apply(1, &req(Command::ConfigSet { entry: entry("proxy-defaults", "global", "{}"), cas: None }));
        s.apply(2, &req(Command::ConfigSet { entry: entry("service-defaults", "old", "{}"), cas: None }));
        let primary = vec![entry("proxy-defaults", "global", "{}"), entry("service-defaults", "new", "{}")];
        s.apply(3, &req(Command::ConfigReplicate { entries: primary }));
        let names: Vec<&str> = s.data().config_entries.values().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["global", "new"]);
        assert_eq!(
            s.data().config_entries[&("proxy-defaults".to_string(), "global".to_string())].modify_index,
            1,
            "unchanged entries keep their index"
        );
    }

    #[test]
    fn the_ca_is_set_only_over_the_version_its_writer_read() {
        let mut s = Store::new();
        let root = CaRoot { id: "aa".into(), active: true, ..Default::default() };
        let ca = ConnectCa { cluster_id: "c".into(), roots: vec![root], ..Default::default() };
        assert_eq!(s.apply(3, &req(Command::CaSet { ca: Box::new(ca.clone()), expect: 0 })), Outcome::Applied(true));
        assert_eq!(s.apply(4, &req(Command::CaSet { ca: Box::new(ca.clone()), expect: 0 })), Outcome::Applied(false), "a racing initialiser loses");
        let mut rotated = s.data().connect_ca.clone().unwrap();
        rotated.roots[0].active = false;
        rotated.roots.push(CaRoot { id: "bb".into(), active: true, ..Default::default() });
        assert_eq!(s.apply(5, &req(Command::CaSet { ca: Box::new(rotated), expect: 3 })), Outcome::Applied(true));
        let c = s.data().connect_ca.as_ref().unwrap();
        assert_eq!(c.active_root().unwrap().id, "bb");
        assert_eq!((c.roots[0].create_index, c.roots[0].modify_index, c.roots[1].create_index), (3, 5, 5));
        assert_eq!(c.trust_domain(), "c.consul");
    }
}
