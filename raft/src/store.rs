//! Opening a node's Raft store: the disk, its writer thread, the log store and the state machine.

use std::path::Path;
use std::thread::JoinHandle;

use crate::disk::{DiskError, NodeDisk, RaftDisk, WriteOp};
use crate::log_store::{DiskWriter, LogStore};
use crate::state_machine::StateMachine;

/// A node's opened Raft store.
pub struct Store {
    pub log: LogStore,
    pub state_machine: StateMachine,
    /// The cluster this store belongs to, once recorded.
    pub cluster_id: Option<String>,
    writer: DiskWriter,
    writer_thread: JoinHandle<()>,
}

impl Store {
    /// Opens (or creates) the store at `path` (a redb file) and its log beside it.
    pub fn open(path: &Path) -> Result<Store, DiskError> {
        Self::open_on(NodeDisk::open(path)?)
    }

    /// Opens a store on any [`RaftDisk`].
    pub fn open_on<D: RaftDisk>(disk: D) -> Result<Store, DiskError> {
        let mut loaded = disk.load()?;
        let (writer, writer_thread) = DiskWriter::start(disk);
        let state_machine = StateMachine::new(loaded.snapshot.take(), writer.clone())?;
        let log = LogStore::new(&mut loaded, writer.clone());
        Ok(Store {
            log,
            state_machine,
            cluster_id: loaded.cluster_id,
            writer,
            writer_thread,
        })
    }

    /// Records which cluster this store belongs to, durably.
    pub async fn set_cluster_id(&mut self, id: &str) -> Result<(), String> {
        self.writer
            .write(vec![WriteOp::SetClusterId(id.to_string())], true)
            .await?;
        self.cluster_id = Some(id.to_string());
        Ok(())
    }

    /// A handle that flushes the store at shutdown and waits for its writer thread.
    pub fn closer(&self) -> DiskWriter {
        self.writer.clone()
    }

    /// Splits off the parts openraft takes, keeping the writer thread's handle.
    pub fn into_parts(self) -> (LogStore, StateMachine, DiskWriter, JoinHandle<()>) {
        (
            self.log,
            self.state_machine,
            self.writer,
            self.writer_thread,
        )
    }
}
