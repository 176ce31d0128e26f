//! What the disk (redb and the log) holds after a reopen: exactly what was written, in order.

use flock_raft::disk::{NodeDisk, RaftDisk, StoredSnapshot, WriteOp};
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

fn indexes(d: &NodeDisk) -> Vec<u64> {
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
        let mut d = NodeDisk::open(&path).unwrap();
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
    let d = NodeDisk::open(&path).unwrap();
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
    let _first = NodeDisk::open(&path).unwrap();
    let e = NodeDisk::open(&path).err().expect("second open refused");
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
    assert!(NodeDisk::open(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192]);
}

/// A redb disk that records what each write carried.
struct Recording {
    inner: NodeDisk,
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
        inner: NodeDisk::open(&path).unwrap(),
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
    let back = NodeDisk::open(&path).unwrap().load().unwrap();
    assert_eq!(back.committed, Some(id(5)));
    assert_eq!(back.logs.len(), 5);
}

fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

fn write_entries(d: &mut NodeDisk, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        d.write(&[WriteOp::Append(vec![entry(1, i)])], true)
            .unwrap();
    }
}

/// A crash in the middle of a write leaves a torn tail (zeros where the write did not reach,
/// or a record cut short): it was never acknowledged, and the log opens without it, cut back
/// to its last whole record, and takes appends again.
#[test]
fn a_torn_tail_is_cut_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let wal = flock_raft::disk::wal_dir(&path);
    write_entries(&mut NodeDisk::open(&path).unwrap(), 1..=5);
    let seg = segments(&wal).pop().unwrap();
    let whole = std::fs::read(&seg).unwrap();
    for tail in [
        // A record whose head made it, and the sectors after it did not (zeros).
        {
            let mut t = vec![0xd0u8, 0x07, 0, 0, 1, 2, 3, 4];
            t.extend_from_slice(&[0; 2000]);
            t
        },
        // A record whose end is not in the file.
        vec![40u8, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9],
        // A head cut short.
        vec![40u8, 0, 0],
        // The file was extended but nothing written.
        vec![0; 1000],
    ] {
        let mut torn = whole.clone();
        torn.extend_from_slice(&tail);
        std::fs::write(&seg, &torn).unwrap();
        let mut d = NodeDisk::open(&path).unwrap();
        assert_eq!(
            std::fs::read(&seg).unwrap(),
            whole,
            "cut back to the whole records"
        );
        assert_eq!(indexes(&d), vec![1, 2, 3, 4, 5]);
        write_entries(&mut d, 6..=6);
        assert_eq!(indexes(&d), vec![1, 2, 3, 4, 5, 6]);
        drop(d);
        std::fs::write(&seg, &whole).unwrap();
    }
}

/// A record that is whole in length but whose bytes changed (no zeros: not a torn write) is
/// damage. Cutting there would silently drop acknowledged entries: the store refuses to open,
/// says where, and leaves the file as it was.
#[test]
fn a_damaged_record_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let wal = flock_raft::disk::wal_dir(&path);
    write_entries(&mut NodeDisk::open(&path).unwrap(), 1..=5);
    let seg = segments(&wal).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // The second record's body (past the 12-byte header and the first record).
    let first_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let at = 12 + 8 + first_len + 8 + 3;
    bytes[at] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
    let e = NodeDisk::open(&path)
        .err()
        .expect("a damaged log is refused");
    let msg = e.to_string();
    assert!(
        msg.contains("is damaged at byte") && msg.contains("checksum"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "left as it was");
}

/// The log rolls to new segments, a purge deletes the segments it covers (never the one being
/// written), and what is left reopens: the entries after the purge point, and the last commit
/// index even when the segment it was first written in is gone.
#[test]
fn segments_roll_and_a_purge_deletes_the_ones_it_covers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let wal = flock_raft::disk::wal_dir(&path);
    let id = |i| LogId::new(CommittedLeaderId::new(1, 1), i);
    {
        let mut d = NodeDisk::open(&path).unwrap();
        d.set_segment_bytes(256);
        write_entries(&mut d, 1..=40);
        d.write(&[WriteOp::Committed(Some(id(40)))], false).unwrap();
        write_entries(&mut d, 41..=100);
        let before = d.wal_segments();
        assert!(before > 5, "{before} segments");
        d.write(&[WriteOp::PurgeUpto(id(60))], false).unwrap();
        let after = d.wal_segments();
        assert!(after < before && after > 1, "{before} -> {after} segments");
        assert_eq!(segments(&wal).len(), after);
        // Everything purged: every segment but the current one goes.
        d.write(&[WriteOp::PurgeUpto(id(100))], false).unwrap();
        assert_eq!(d.wal_segments(), 1);
        write_entries(&mut d, 101..=102);
    }
    let d = NodeDisk::open(&path).unwrap();
    let s = d.load().unwrap();
    assert_eq!(s.last_purged, Some(id(100)));
    assert_eq!(s.committed, Some(id(40)));
    assert_eq!(indexes(&d), vec![101, 102]);
}

/// A data dir whose log is gone is refused, not started empty (it would forget acknowledged
/// entries); so is a log whose store file is gone.
#[test]
fn a_store_without_its_log_and_a_log_without_its_store_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let wal = flock_raft::disk::wal_dir(&path);
    write_entries(&mut NodeDisk::open(&path).unwrap(), 1..=3);
    let moved = dir.path().join("elsewhere");
    std::fs::rename(&wal, &moved).unwrap();
    let e = NodeDisk::open(&path).err().expect("no log").to_string();
    assert!(e.contains("is missing"), "{e}");
    std::fs::rename(&moved, &wal).unwrap();
    std::fs::remove_file(&path).unwrap();
    let e = NodeDisk::open(&path).err().expect("no store").to_string();
    assert!(e.contains("store file is missing"), "{e}");
    assert!(!path.exists(), "no store was created");
}
