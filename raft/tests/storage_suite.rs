//! openraft's storage conformance suite, run against flock's redb store.

use flock_raft::log_store::LogStore;
use flock_raft::state_machine::StateMachine;
use flock_raft::types::{StorageError, TypeConfig};
use flock_raft::Store;
use openraft::testing::{StoreBuilder, Suite};

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("raft.redb"))?;
        let (log, sm, _writer, _thread) = store.into_parts();
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(RedbBuilder) {
        panic!("openraft storage suite failed: {e}");
    }
}
