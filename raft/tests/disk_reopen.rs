//! What the redb disk holds after a reopen: exactly what was written, in order.

use flock_raft::disk::{RaftDisk, RedbDisk, StoredSnapshot, WriteOp};
use flock_raft::types::{Entry, LogId, SnapshotMeta, Vote};
use flock_scheduler::Command;
use openraft::{CommittedLeaderId, EntryPayload};

fn entry(term: u64, index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(Command::KvPut {
            key: format!("k{index}"),
            value: "v".into(),
        }),
    }
}

fn indexes(d: &RedbDisk) -> Vec<u64> {
    d.load()
        .unwrap()
        .logs
        .iter()
        .map(|e| e.log_id.index)
        .collect()
}

#[test]
fn writes_survive_reopen_and_ops_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    {
        let mut d = RedbDisk::open(&path).unwrap();
        d.write(
            &[
                WriteOp::SetClusterId("c1".into()),
                WriteOp::Vote(Vote::new(3, 2)),
                WriteOp::Append((1..=10).map(|i| entry(1, i)).collect()),
                // A new leader overwrote the tail: truncate, then append the replacement.
                WriteOp::TruncateFrom(8),
                WriteOp::Append(vec![entry(2, 8)]),
                WriteOp::PurgeUpto(LogId::new(CommittedLeaderId::new(1, 1), 3)),
            ],
            true,
        )
        .unwrap();
        d.write(
            &[WriteOp::Snapshot(StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 3)),
                    last_membership: Default::default(),
                    snapshot_id: "s1".into(),
                },
                data: vec![1, 2, 3],
            })],
            true,
        )
        .unwrap();
    }
    let d = RedbDisk::open(&path).unwrap();
    let s = d.load().unwrap();
    assert_eq!(s.cluster_id.as_deref(), Some("c1"));
    assert_eq!(s.vote, Some(Vote::new(3, 2)));
    assert_eq!(s.last_purged.map(|l| l.index), Some(3));
    assert_eq!(indexes(&d), vec![4, 5, 6, 7, 8]);
    assert_eq!(s.logs.last().unwrap().log_id.leader_id.term, 2);
    let snap = s.snapshot.unwrap();
    assert_eq!(
        (snap.meta.snapshot_id.as_str(), snap.data),
        ("s1", vec![1, 2, 3])
    );
}

#[test]
fn a_second_open_of_a_store_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let _first = RedbDisk::open(&path).unwrap();
    let e = RedbDisk::open(&path).err().expect("second open refused");
    assert!(
        e.to_string().contains("used by another running flockd"),
        "{e}"
    );
}

#[test]
fn a_damaged_file_is_refused_not_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    assert!(RedbDisk::open(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192]);
}

/// A redb disk that records what each write carried.
struct Recording {
    inner: RedbDisk,
    writes: std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>,
}

impl RaftDisk for Recording {
    fn load(&self) -> Result<flock_raft::disk::DiskState, flock_raft::disk::DiskError> {
        self.inner.load()
    }
    fn write(&mut self, ops: &[WriteOp], durable: bool) -> Result<(), flock_raft::disk::DiskError> {
        let kinds = ops
            .iter()
            .map(|op| match op {
                WriteOp::Committed(c) => format!("committed {}", c.map_or(0, |c| c.index)),
                WriteOp::Append(es) => format!("append {}", es[0].log_id.index),
                other => format!("{other:?}"),
            })
            .collect();
        self.writes.lock().unwrap().push(kinds);
        self.inner.write(ops, durable)
    }
}

/// openraft saves the commit index after every commit; it is written with the next write
/// instead of in a transaction of its own (issue 20), and the last one when the store closes.
#[tokio::test]
async fn a_commit_index_rides_with_the_next_write_and_is_kept_at_close() {
    use openraft::storage::RaftLogStorage;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let disk = Recording {
        inner: RedbDisk::open(&path).unwrap(),
        writes: writes.clone(),
    };
    let (mut log, sm, writer, thread) = flock_raft::Store::open_on(disk).unwrap().into_parts();
    let id = |i| LogId::new(CommittedLeaderId::new(1, 1), i);
    for i in 1..=5u64 {
        writer
            .write(vec![WriteOp::Append(vec![entry(1, i)])], true)
            .await
            .unwrap();
        log.save_committed(Some(id(i))).await.unwrap();
        // Give the writer time to take the commit index alone, as it would between writes.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop((log, sm, writer));
    thread.join().unwrap();
    let writes = writes.lock().unwrap().clone();
    let mut expected: Vec<Vec<String>> = vec![vec!["append 1".into()]];
    for i in 2..=5 {
        expected.push(vec![format!("committed {}", i - 1), format!("append {i}")]);
    }
    expected.push(vec!["committed 5".into()]);
    assert_eq!(writes, expected);
    let back = RedbDisk::open(&path).unwrap().load().unwrap();
    assert_eq!(back.committed, Some(id(5)));
    assert_eq!(back.logs.len(), 5);
}
