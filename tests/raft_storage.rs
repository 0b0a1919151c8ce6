//! openraft's storage conformance suite, run against the write-ahead log store and our state machine.

use std::sync::Arc;

use parking_lot::RwLock;

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};
use trellis::consensus::log_store::LogStore;
use trellis::consensus::state_machine::StateMachine;
use trellis::consensus::storage::Storage;
use trellis::consensus::{NodeId, TypeConfig};
use trellis::state::Store;

struct WalBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for WalBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open storage");
        let sm = StateMachine::open(storage.clone(), Arc::new(RwLock::new(Store::new())), 64 << 20)?;
        Ok((dir, LogStore::new(storage), sm))
    }
}

#[test]
fn wal_store_passes_openraft_storage_suite() {
    Suite::test_all(WalBuilder).expect("storage suite");
}
