//! The replicated state machine: tables of nodes, services, checks, KV entries and sessions, each
//! row stamped with the Raft index that last changed it, and per-table watches that wake
//! blocking queries.
//!
//! This layer knows nothing of Raft or the network: `Store::apply(index, &Request)` is a
//! deterministic function of the current tables, so it is tested with no cluster at all and
//! replays identically on every server.

pub mod catalog;
pub mod command;
pub mod federation;
pub mod kv;
pub mod mesh;
pub mod query;
pub mod session;
pub mod types;
pub mod watch;

use std::collections::BTreeMap;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use command::{Command, KvVerb, Outcome, Registration, Request, TxnError, TxnOp};
pub use types::*;
pub use watch::{Changes, WatchKey, Watches};

/// The tables a query can read; each has its own watch so a write wakes only its readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Nodes = 0,
    Services = 1,
    Checks = 2,
    Kv = 3,
    Sessions = 4,
    Autopilot = 5,
    /// The auto-encrypt CA that signs client agents' RPC certificates.
    AgentCa = 6,
    PreparedQueries = 7,
    Coordinates = 8,
    /// The Connect CA: roots, signing material and configuration.
    ConnectCa = 9,
    ConfigEntries = 10,
    /// Each datacenter's mesh gateways (owned by the primary, replicated to secondaries).
    FederationStates = 11,
}

pub(crate) const TABLE_COUNT: usize = 12;

/// Everything replicated, in a form that snapshots serialize as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StateData {
    pub nodes: imbl::OrdMap<Str, Arc<Node>>,
    /// Keyed by (node, service id).
    pub services: imbl::OrdMap<(Str, Str), Arc<Service>>,
    /// Keyed by (node, check id).
    pub checks: imbl::OrdMap<(Str, Str), Arc<HealthCheck>>,
    /// Persistent (structurally shared) maps: a snapshot copies them in O(1) while apply is
    /// paused, instead of copying every entry (which stalled writes for tens of milliseconds).
    pub kv: imbl::OrdMap<String, KvEntry>,
    /// Index at which a key was deleted, so that prefix reads report deletions in their index.
    pub kv_tombstones: imbl::OrdMap<String, RaftIndex>,
    /// The highest index of any tombstone reaped so far: prefix reads never report less, so
    /// that reaping cannot make an index go back.
    pub kv_graveyard_index: RaftIndex,
    pub sessions: imbl::OrdMap<String, Session>,
    /// Key -> wall-clock millisecond until which it cannot be acquired (session lock-delay).
    pub lock_delays: BTreeMap<String, u64>,
    pub autopilot: AutopilotConfig,
    /// The CA servers sign client agents' RPC certificates with (auto-encrypt); created once by
    /// the first leader. Its key never leaves the servers except inside snapshots.
    pub agent_ca: Option<AgentCa>,
    /// Prepared queries by ID.
    pub prepared_queries: BTreeMap<String, query::PreparedQuery>,
    /// Each node's network coordinate in this datacenter, as its agent last reported it.
    pub coordinates: imbl::OrdMap<String, CoordinateEntry>,
    /// The Connect CA of this datacenter (None until the first leader creates it).
    #[serde(default)]
    pub connect_ca: Option<mesh::ConnectCa>,
    /// Config entries by (kind, name).
    #[serde(default)]
    pub config_entries: BTreeMap<(String, String), mesh::ConfigEntry>,
    /// Federation states by lower-cased datacenter name.
    #[serde(default)]
    pub federation_states: BTreeMap<String, federation::FederationState>,
    /// A snapshot restore in progress: chunks applied so far (part of the replicated state, so
    /// a Raft snapshot taken mid-restore carries it).
    pub restore_staging: Option<RestoreStaging>,
    /// Highest index that changed each table.
    pub table_index: [RaftIndex; TABLE_COUNT],
    /// Highest index that changed anything a service's catalog/health view shows.
    pub service_index: imbl::OrdMap<String, RaftIndex>,
    /// Derived, not replicated: the instances of each service by name, so that reading one
    /// service costs its own instances, not the whole catalog.
    #[serde(skip)]
    pub by_service: DerivedIndex,
}

/// Indexes derived from the tables: rebuilt after a snapshot loads, maintained by apply, and
/// equal whenever the tables are (they carry no information of their own).
#[derive(Debug, Clone, Default)]
pub struct DerivedIndex(pub imbl::OrdMap<String, imbl::OrdSet<(Str, Str)>>);

impl PartialEq for DerivedIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The chunks of a restore received so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RestoreStaging {
    pub id: String,
    pub next_seq: u32,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl StateData {
    /// Rebuild the derived indexes from the tables (after a snapshot is loaded).
    pub fn rebuild_indexes(&mut self) {
        let mut by = BTreeMap::<String, std::collections::BTreeSet<(Str, Str)>>::new();
        for (key, s) in &self.services {
            for v in catalog::view_keys(s) {
                by.entry(v).or_default().insert(key.clone());
            }
        }
        self.by_service = DerivedIndex(by.into_iter().map(|(k, v)| (k, v.into_iter().collect::<imbl::OrdSet<_>>())).collect());
    }

    pub fn index_of(&self, tables: &[Table]) -> RaftIndex {
        tables.iter().map(|t| self.table_index[*t as usize]).max().unwrap_or(0)
    }
}

/// The applied state plus the watches readers wait on.
pub struct Store {
    data: StateData,
    watches: Arc<Watches>,
    /// Tables changed by the command being applied.
    touched: [bool; TABLE_COUNT],
    /// Everything changed since the last `take_changes`, to publish once the lock is released.
    pending: Changes,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    pub fn new() -> Store {
        Store { data: StateData::default(), watches: Watches::new(), touched: [false; TABLE_COUNT], pending: Changes::default() }
    }

    pub fn data(&self) -> &StateData {
        &self.data
    }

    /// A receiver that changes whenever `table` does (subscribe under the read lock).
    pub fn watch(&self, table: Table) -> tokio::sync::watch::Receiver<RaftIndex> {
        self.watches.subscribe(&WatchKey::Table(table))
    }

    /// The watch registry, to subscribe to finer keys and to publish changes.
    pub fn watches(&self) -> &Arc<Watches> {
        &self.watches
    }

    /// What changed since the last call; publish it (`Watches::publish`) once the write lock
    /// is released.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.pending)
    }

    /// Publish what changed, from inside the write lock (tests and single-threaded users).
    pub fn publish(&mut self) {
        let c = self.take_changes();
        self.watches.publish(&c);
    }

    /// Replace everything (snapshot install): every watcher wakes at the next publish.
    pub fn replace(&mut self, data: StateData) {
        self.data = data;
        self.data.rebuild_indexes();
        self.pending.all = true;
        self.pending.index = self.pending.index.max(self.data.table_index.iter().copied().max().unwrap_or(0));
    }

    /// Apply one replicated command at `index`. Never panics on any input: a command that
    /// cannot apply returns `Outcome::Rejected` and changes nothing.
    pub fn apply(&mut self, index: RaftIndex, req: &Request) -> Outcome {
        self.touched = [false; TABLE_COUNT];
        let outcome = match &req.command {
            // Each request of a batch is applied (and marks its tables) as if alone.
            Command::Batch(reqs) => {
                return Outcome::Batch(
                    reqs.iter()
                        .map(|r| match r.command.batchable() {
                            true => self.apply(index, r),
                            false => Outcome::Rejected(format!("{} cannot be part of a batch", r.command.name())),
                        })
                        .collect(),
                );
            }
            Command::Register(r) => self.register(index, req.now_ms, r),
            Command::Deregister { node, service_id, check_id } => {
                self.deregister(index, req.now_ms, node, service_id.as_deref(), check_id.as_deref())
            }
            Command::Txn(ops) => self.txn(index, req.now_ms, ops),
            Command::SessionCreate(s) => self.session_create(index, s),
            Command::SessionDestroy { id } => {
                self.session_destroy(index, req.now_ms, id);
                Outcome::Done
            }
            Command::AutopilotSetConfig { config, cas } => self.autopilot_set(index, config, *cas),
            Command::CoordinateBatch(updates) => {
                for (node, coord) in updates {
                    // Only registered nodes have a coordinate (Consul drops the others too).
                    if !self.data.nodes.contains_key(node.as_str()) || !coord.is_valid() {
                        continue;
                    }
                    let create_index = self.data.coordinates.get(node).map_or(index, |e| e.create_index);
                    self.data.coordinates.insert(node.clone(), CoordinateEntry { coord: coord.clone(), create_index, modify_index: index });
                    self.touch(Table::Coordinates);
                }
                Outcome::Done
            }
            Command::KvReap { up_to } => {
                let reaped: Vec<(String, RaftIndex)> =
                    self.data.kv_tombstones.iter().filter(|(_, i)| **i <= *up_to).map(|(k, i)| (k.clone(), *i)).collect();
                for (k, i) in reaped {
                    self.data.kv_tombstones.remove(&k);
                    self.pending.kv_keys.insert(k.clone());
                    self.data.kv_graveyard_index = self.data.kv_graveyard_index.max(i);
                    self.touch(Table::Kv);
                }
                Outcome::Done
            }
            Command::CaSet { ca, expect } => self.ca_set(index, ca, *expect),
            Command::ConfigSet { entry, cas } => self.config_set(index, entry, *cas),
            Command::ConfigDelete { kind, name, cas } => self.config_delete(kind, name, *cas),
            Command::ConfigReplicate { entries } => self.config_replicate(index, entries),
            Command::FederationStateSet { state } => self.federation_state_set(index, state),
            Command::FederationStateDelete { datacenter } => self.federation_state_delete(datacenter),
            Command::FederationReplicate { states } => self.federation_replicate(index, states),
            Command::QuerySet(q) => self.query_set(index, q),
            Command::QueryUpdate(q) if !self.data.prepared_queries.contains_key(&q.id) => Outcome::Rejected(query::NOT_FOUND.into()),
            Command::QueryUpdate(q) => self.query_set(index, q),
            Command::QueryDelete { id } => self.query_delete(id),
            Command::AgentCaInit(ca) => {
                // First writer wins, so two leaders racing (one deposed) cannot swap the CA
                // under clients that already hold certificates from it.
                if self.data.agent_ca.is_some() {
                    return Outcome::Applied(false);
                }
                self.data.agent_ca = Some(ca.clone());
                self.touch(Table::AgentCa);
                Outcome::Applied(true)
            }
            Command::RestoreChunk { id, seq, bytes } => {
                match (&mut self.data.restore_staging, seq) {
                    (staging, 0) => *staging = Some(RestoreStaging { id: id.clone(), next_seq: 1, bytes: bytes.clone() }),
                    (Some(st), seq) if st.id == *id && st.next_seq == *seq => {
                        st.next_seq += 1;
                        st.bytes.extend_from_slice(bytes);
                    }
                    _ => return Outcome::Rejected(format!("restore {id}: chunk {seq} is out of order (another restore may have started)")),
                }
                return Outcome::Done;
            }
            Command::RestoreCommit { id, sha256 } => {
                let Some(staging) = self.data.restore_staging.take_if(|s| s.id == *id) else {
                    return Outcome::Rejected(format!("restore {id}: nothing staged (another restore may have started)"));
                };
                if ring::digest::digest(&ring::digest::SHA256, &staging.bytes).as_ref() != sha256.as_slice() {
                    return Outcome::Rejected(format!("restore {id}: the staged snapshot does not match its checksum"));
                }
                let mut data: StateData = match postcard::from_bytes(&staging.bytes) {
                    Ok(d) => d,
                    Err(e) => return Outcome::Rejected(format!("restore {id}: undecodable snapshot: {e}")),
                };
                // The CA that signs client agents' RPC certificates stays the cluster's own: a
                // snapshot may not swap who the servers trust.
                data.agent_ca = self.data.agent_ca.clone();
                data.restore_staging = None;
                // A restored state is newer than anything a blocked reader saw before it.
                for t in data.table_index.iter_mut() {
                    *t = index;
                }
                self.replace(data);
                return Outcome::Done;
            }
        };
        for i in 0..TABLE_COUNT {
            if self.touched[i] {
                self.data.table_index[i] = index;
                self.pending.tables[i] = true;
            }
        }
        self.pending.index = index;
        outcome
    }

    fn touch(&mut self, t: Table) {
        self.touched[t as usize] = true;
    }

    fn autopilot_set(&mut self, index: RaftIndex, config: &AutopilotConfig, cas: Option<u64>) -> Outcome {
        if let Some(cas) = cas
            && cas != self.data.autopilot.modify_index
        {
            return Outcome::Applied(false);
        }
        let mut c = config.clone();
        c.create_index = if self.data.autopilot.create_index == 0 { index } else { self.data.autopilot.create_index };
        c.modify_index = index;
        self.data.autopilot = c;
        self.touch(Table::Autopilot);
        Outcome::Applied(true)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn req(command: Command) -> Request {
        Request { now_ms: 1_000_000, command }
    }

    #[test]
    fn autopilot_cas_rejects_stale_index() {
        let mut s = Store::new();
        let c = AutopilotConfig::default();
        assert_eq!(s.apply(5, &req(Command::AutopilotSetConfig { config: c.clone(), cas: None })), Outcome::Applied(true));
        assert_eq!(s.apply(6, &req(Command::AutopilotSetConfig { config: c.clone(), cas: Some(4) })), Outcome::Applied(false));
        assert_eq!(s.apply(7, &req(Command::AutopilotSetConfig { config: c, cas: Some(5) })), Outcome::Applied(true));
        assert_eq!(s.data().autopilot.modify_index, 7);
    }

    #[test]
    fn coordinates_are_kept_for_registered_nodes_and_go_with_them() {
        let mut s = Store::new();
        s.apply(1, &req(Command::Register(catalog::tests::web_registration("n1", "10.0.0.1"))));
        let c = crate::coordinate::Coordinate::default();
        s.apply(2, &req(Command::CoordinateBatch(vec![("n1".into(), c.clone()), ("ghost".into(), c.clone())])));
        assert_eq!(s.data().coordinates.keys().collect::<Vec<_>>(), vec!["n1"]);
        s.apply(3, &req(Command::CoordinateBatch(vec![("n1".into(), c)])));
        assert_eq!((s.data().coordinates["n1"].create_index, s.data().coordinates["n1"].modify_index), (2, 3));
        s.apply(4, &req(Command::Deregister { node: "n1".into(), service_id: None, check_id: None }));
        assert!(s.data().coordinates.is_empty());
        assert_eq!(s.data().index_of(&[Table::Coordinates]), 4);
    }

    #[test]
    fn near_sorting_goes_by_estimated_round_trip_with_the_node_itself_first() {
        let mut s = Store::new();
        for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
            s.apply(i as u64 + 1, &req(Command::Register(catalog::tests::web_registration(n, &format!("10.0.0.{i}")))));
        }
        let at = |x: f64| {
            let mut c = crate::coordinate::Coordinate::default();
            c.vec[0] = x;
            c
        };
        // a at 0, b at 0.050 s, c at 0.010 s; d has no coordinate.
        s.apply(9, &req(Command::CoordinateBatch(vec![("a".into(), at(0.0)), ("b".into(), at(0.05)), ("c".into(), at(0.01))])));
        for _ in 0..5 {
            let mut nodes = vec!["d", "b", "c", "a"];
            s.data().sort_near(&mut nodes, |n| n, "a");
            assert_eq!(nodes, vec!["a", "c", "b", "d"]);
        }
    }

    #[test]
    fn agent_ca_is_set_once() {
        let mut s = Store::new();
        let ca = |n: &str| AgentCa { cert_pem: n.into(), key_pem: n.into() };
        assert_eq!(s.apply(2, &req(Command::AgentCaInit(ca("a")))), Outcome::Applied(true));
        assert_eq!(s.apply(3, &req(Command::AgentCaInit(ca("b")))), Outcome::Applied(false));
        assert_eq!(s.data().agent_ca.as_ref().unwrap().cert_pem, "a");
        assert_eq!(s.data().index_of(&[Table::AgentCa]), 2);
    }

    #[test]
    fn restore_keeps_the_running_clusters_agent_ca() {
        let mut s = Store::new();
        let ca = |n: &str| AgentCa { cert_pem: n.into(), key_pem: n.into() };
        s.apply(2, &req(Command::AgentCaInit(ca("ours"))));
        let mut restored = StateData { agent_ca: Some(ca("attacker")), ..Default::default() };
        restored.kv.insert("k".into(), KvEntry { key: "k".into(), ..Default::default() });
        let bytes = postcard::to_allocvec(&restored).unwrap();
        let sha256 = ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref().to_vec();
        let (a, b) = bytes.split_at(bytes.len() / 2);
        s.apply(3, &req(Command::RestoreChunk { id: "r".into(), seq: 0, bytes: a.to_vec() }));
        s.apply(4, &req(Command::RestoreChunk { id: "r".into(), seq: 1, bytes: b.to_vec() }));
        assert_eq!(s.apply(5, &req(Command::RestoreCommit { id: "r".into(), sha256 })), Outcome::Done);
        assert_eq!(s.data().agent_ca.as_ref().unwrap().cert_pem, "ours");
        assert!(s.data().kv.contains_key("k"));
        assert!(s.data().restore_staging.is_none());
    }

    #[test]
    fn restore_chunks_out_of_order_or_corrupt_change_nothing() {
        let mut s = Store::new();
        s.apply(1, &req(Command::Register(catalog::tests::web_registration("n1", "10.0.0.1"))));
        let bytes = postcard::to_allocvec(&StateData::default()).unwrap();
        let chunk = |seq, id: &str| Command::RestoreChunk { id: id.into(), seq, bytes: bytes.clone() };
        assert!(matches!(s.apply(2, &req(chunk(1, "r"))), Outcome::Rejected(_)));
        s.apply(3, &req(chunk(0, "r")));
        // Another restore starting takes over; the first one's later chunks are refused.
        s.apply(4, &req(chunk(0, "q")));
        assert!(matches!(s.apply(5, &req(chunk(1, "r"))), Outcome::Rejected(_)));
        assert!(
            matches!(s.apply(6, &req(Command::RestoreCommit { id: "q".into(), sha256: vec![0; 32] })), Outcome::Rejected(m) if m.contains("checksum"))
        );
        assert!(!s.data().nodes.is_empty(), "a failed restore leaves the state as it was");
    }

    #[test]
    fn state_data_round_trips_through_postcard() {
        let mut s = Store::new();
        s.apply(3, &req(Command::Register(catalog::tests::web_registration("n1", "10.0.0.1"))));
        let bytes = postcard::to_allocvec(s.data()).unwrap();
        let back: StateData = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(&back, s.data());
    }
}
