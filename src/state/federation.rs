//! Federation states: each datacenter's mesh gateways, published by its leader to the primary
//! and replicated from there to every secondary, so that any datacenter can reach any other
//! through gateways alone (and learn when they move).

use serde::{Deserialize, Serialize};

use super::types::RaftIndex;
use super::{Outcome, Store, Table};

/// One datacenter's federation state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FederationState {
    pub datacenter: String,
    /// The datacenter's mesh gateways as a JSON array of Consul's `CheckServiceNode`
    /// (`{Node, Service, Checks}`).
    pub mesh_gateways: String,
    /// RFC 3339 time the owning datacenter's leader published it.
    pub updated_at: String,
    /// In a secondary: the primary's modify index of this state (0 in the primary).
    pub primary_modify_index: RaftIndex,
    pub create_index: RaftIndex,
    pub modify_index: RaftIndex,
}

impl FederationState {
    pub fn gateways(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.mesh_gateways).unwrap_or_default()
    }

    /// Consul's JSON.
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "Datacenter": self.datacenter,
            "UpdatedAt": self.updated_at,
            "PrimaryModifyIndex": self.primary_modify_index,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        });
        let gws = self.gateways();
        if !gws.is_empty() {
            v["MeshGateways"] = serde_json::Value::Array(gws);
        }
        v
    }
}

fn key(dc: &str) -> String {
    dc.to_ascii_lowercase()
}

impl Store {
    /// Upsert a datacenter's state. The same gateways with a newer `updated_at` change nothing
    /// (Consul's `IsSame`), so a periodic republish wakes no watcher.
    pub(super) fn federation_state_set(&mut self, index: RaftIndex, s: &FederationState) -> Outcome {
        if s.datacenter.is_empty() {
            return Outcome::Rejected("invalid request: missing federation state datacenter".into());
        }
        let k = key(&s.datacenter);
        let existing = self.data.federation_states.get(&k);
        if existing.is_some_and(|e| e.mesh_gateways == s.mesh_gateways && e.primary_modify_index == s.primary_modify_index) {
            return Outcome::Applied(true);
        }
        let create_index = existing.map_or(index, |e| e.create_index);
        self.data.federation_states.insert(k, FederationState { create_index, modify_index: index, ..s.clone() });
        self.touch(Table::FederationStates);
        Outcome::Applied(true)
    }

    pub(super) fn federation_state_delete(&mut self, dc: &str) -> Outcome {
        if self.data.federation_states.remove(&key(dc)).is_some() {
            self.touch(Table::FederationStates);
        }
        Outcome::Applied(true)
    }

    /// A secondary's copy of the primary's states: the whole set, each stamped with the
    /// primary's modify index.
    pub(super) fn federation_replicate(&mut self, index: RaftIndex, states: &[FederationState]) -> Outcome {
        let wanted: std::collections::BTreeMap<String, &FederationState> = states.iter().map(|s| (key(&s.datacenter), s)).collect();
        let before = self.data.federation_states.len();
        self.data.federation_states.retain(|k, _| wanted.contains_key(k));
        let mut changed = before != self.data.federation_states.len();
        for (k, s) in wanted {
            let existing = self.data.federation_states.get(&k);
            if existing.is_some_and(|e| e.mesh_gateways == s.mesh_gateways && e.primary_modify_index == s.modify_index) {
                continue;
            }
            let create_index = existing.map_or(index, |e| e.create_index);
            self.data
                .federation_states
                .insert(k, FederationState { primary_modify_index: s.modify_index, create_index, modify_index: index, ..s.clone() });
            changed = true;
        }
        if changed {
            self.touch(Table::FederationStates);
        }
        Outcome::Done
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::req;
    use super::super::{Command, Outcome, Store};
    use super::*;

    fn state(dc: &str, gws: &str, at: &str) -> FederationState {
        FederationState { datacenter: dc.into(), mesh_gateways: gws.into(), updated_at: at.into(), ..Default::default() }
    }

    #[test]
    fn republishing_the_same_gateways_changes_nothing_and_replication_mirrors_the_primary() {
        let mut s = Store::default();
        assert_eq!(s.apply(3, &req(Command::FederationStateSet { state: state("dc2", "[1]", "t1") })), Outcome::Applied(true));
        assert_eq!(s.apply(4, &req(Command::FederationStateSet { state: state("DC2", "[1]", "t2") })), Outcome::Applied(true));
        let st = &s.data().federation_states["dc2"];
        assert_eq!((st.create_index, st.modify_index, st.updated_at.as_str()), (3, 3, "t1"));
        assert!(matches!(s.apply(5, &req(Command::FederationStateSet { state: state("", "[]", "t") })), Outcome::Rejected(_)));

        let mut secondary = Store::default();
        secondary.apply(1, &req(Command::FederationStateSet { state: state("gone", "[]", "t") }));
        let mut primary_copy = s.data().federation_states["dc2"].clone();
        primary_copy.modify_index = 3;
        secondary.apply(9, &req(Command::FederationReplicate { states: vec![primary_copy] }));
        let got: Vec<(&String, u64, u64)> =
            secondary.data().federation_states.iter().map(|(k, v)| (k, v.primary_modify_index, v.modify_index)).collect();
        assert_eq!(got, vec![(&"dc2".to_string(), 3, 9)]);
        assert_eq!(s.apply(10, &req(Command::FederationStateDelete { datacenter: "dc2".into() })), Outcome::Applied(true));
        assert!(s.data().federation_states.is_empty());
    }
}
