//! The Raft state machine: the scheduler's [`ClusterState`], kept in memory and made durable by
//! snapshots on the [`RaftDisk`](crate::disk::RaftDisk).
//!
//! Applying a command is [`ClusterState::apply`], nothing more. The state is not written on every
//! apply: the log is durable, and after a restart openraft re-applies the committed entries that
//! follow the last snapshot. A snapshot is fsync'ed before openraft may purge the log it covers.
//!
//! A snapshot's data is the encoded [`ClusterState`] behind its own format byte
//! ([`SNAPSHOT_DATA_VERSION`]), so the state's layout can change while log entries keep theirs;
//! [`decode_cluster`] reads every format an older build wrote.

use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};

use flock_scheduler::{ClusterState, CommandResult};

use crate::codec::CodecError;
use crate::disk::{DiskError, StoredSnapshot, WriteOp};
use crate::log_store::DiskWriter;
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// The format of a snapshot's data that this build writes: 1 held the join secret in plain
/// text (and no revoked admins); 2 holds its hash; 3 adds datasets' retention, replicas' bases
/// and holds; 4 adds the failover state (replication, nodes down, diverged copies, events); 5
/// adds stacks (apps' new fields and service addresses, secrets); 6 keeps the apps as JSON
/// inside (`flock_scheduler::json_field`), so app fields can be added with a default.
pub const SNAPSHOT_DATA_VERSION: u8 = 6;

/// A snapshot's data: the format byte, then the postcard encoding of the state.
pub fn encode_cluster(cluster: &ClusterState) -> Vec<u8> {
    // As codec::encode: postcard fails only on types serde cannot size, never on plain data.
    postcard::to_extend(cluster, vec![SNAPSHOT_DATA_VERSION]).expect("postcard encodes plain data")
}

/// Reads a snapshot's data in any format a build of flock wrote.
pub fn decode_cluster(bytes: &[u8]) -> Result<ClusterState, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&1, rest)) => Ok(postcard::from_bytes::<legacy::ClusterStateV1>(rest)?.into()),
        Some((&2, rest)) => Ok(postcard::from_bytes::<legacy::ClusterStateV2>(rest)?.into()),
        Some((&3, rest)) => Ok(postcard::from_bytes::<legacy::ClusterStateV3>(rest)?.into()),
        Some((&4, rest)) => Ok(postcard::from_bytes::<legacy::ClusterStateV4>(rest)?.into()),
        Some((&5, rest)) => Ok(postcard::from_bytes::<legacy::ClusterStateV5>(rest)?.into()),
        Some((&SNAPSHOT_DATA_VERSION, rest)) => Ok(postcard::from_bytes(rest)?),
        Some((&v, _)) => Err(CodecError::UnknownSnapshotVersion(v)),
    }
}

/// Snapshot data formats of older builds.
mod legacy {
    use std::collections::{BTreeMap, BTreeSet};

    use flock_scheduler::legacy::{apps_from_v1, apps_from_v2, AppV1, AppV2};
    use flock_scheduler::{
        hash_join_secret, ClusterState, Dataset, DatasetId, DatasetMove, KvEntry, Node, NodeId,
        SnapshotRecord,
    };
    use serde::Deserialize;

    /// [`Dataset`] as formats 1 and 2 laid it out: no retention, bases or hold.
    #[derive(Deserialize)]
    pub(super) struct DatasetV2 {
        id: DatasetId,
        name: String,
        size_limit: Option<u64>,
        primary: NodeId,
        epoch: u64,
        replicas: BTreeSet<NodeId>,
        snapshots: Vec<SnapshotRecord>,
        moving: Option<DatasetMove>,
    }

    impl From<DatasetV2> for Dataset {
        fn from(d: DatasetV2) -> Self {
            Dataset {
                id: d.id,
                name: d.name,
                size_limit: d.size_limit,
                primary: d.primary,
                epoch: d.epoch,
                replicas: d.replicas,
                snapshots: d.snapshots,
                moving: d.moving,
                retention: None,
                bases: BTreeMap::new(),
                hold: None,
            }
        }
    }

    fn datasets(v2: BTreeMap<DatasetId, DatasetV2>) -> BTreeMap<DatasetId, Dataset> {
        v2.into_iter().map(|(id, d)| (id, d.into())).collect()
    }

    /// [`ClusterState`] as format 5 laid it out: apps in postcard's layout.
    #[derive(Deserialize)]
    pub(super) struct ClusterStateV5 {
        cluster_id: String,
        join_secret_hash: String,
        ca_holder: NodeId,
        next_node_id: NodeId,
        nodes: BTreeMap<NodeId, Node>,
        kv: BTreeMap<String, KvEntry>,
        revision: u64,
        datasets: BTreeMap<DatasetId, Dataset>,
        next_dataset_id: DatasetId,
        apps: BTreeMap<String, AppV2>,
        deploy_generation: u64,
        mounts: BTreeMap<DatasetId, flock_scheduler::mount::Mounts>,
        revoked_admins: BTreeSet<String>,
        failover: flock_scheduler::failover::Failover,
        secrets: BTreeMap<String, flock_scheduler::state::Secret>,
    }

    impl From<ClusterStateV5> for ClusterState {
        fn from(v5: ClusterStateV5) -> Self {
            ClusterState {
                cluster_id: v5.cluster_id,
                join_secret_hash: v5.join_secret_hash,
                ca_holder: v5.ca_holder,
                next_node_id: v5.next_node_id,
                nodes: v5.nodes,
                kv: v5.kv.into_iter().collect(),
                revision: v5.revision,
                datasets: v5.datasets,
                next_dataset_id: v5.next_dataset_id,
                apps: apps_from_v2(v5.apps),
                deploy_generation: v5.deploy_generation,
                mounts: v5.mounts,
                revoked_admins: v5.revoked_admins,
                failover: v5.failover,
                secrets: v5.secrets,
            }
        }
    }

    /// [`ClusterState`] as format 4 laid it out: apps before stacks, no secrets.
    #[derive(Deserialize)]
    pub(super) struct ClusterStateV4 {
        cluster_id: String,
        join_secret_hash: String,
        ca_holder: NodeId,
        next_node_id: NodeId,
        nodes: BTreeMap<NodeId, Node>,
        kv: BTreeMap<String, KvEntry>,
        revision: u64,
        datasets: BTreeMap<DatasetId, Dataset>,
        next_dataset_id: DatasetId,
        apps: BTreeMap<String, AppV1>,
        deploy_generation: u64,
        mounts: BTreeMap<DatasetId, flock_scheduler::mount::Mounts>,
        revoked_admins: BTreeSet<String>,
        failover: flock_scheduler::failover::Failover,
    }

    impl From<ClusterStateV4> for ClusterState {
        fn from(v4: ClusterStateV4) -> Self {
            ClusterState {
                cluster_id: v4.cluster_id,
                join_secret_hash: v4.join_secret_hash,
                ca_holder: v4.ca_holder,
                next_node_id: v4.next_node_id,
                nodes: v4.nodes,
                kv: v4.kv.into_iter().collect(),
                revision: v4.revision,
                datasets: v4.datasets,
                next_dataset_id: v4.next_dataset_id,
                apps: apps_from_v1(v4.apps),
                deploy_generation: v4.deploy_generation,
                mounts: v4.mounts,
                revoked_admins: v4.revoked_admins,
                failover: v4.failover,
                secrets: Default::default(),
            }
        }
    }

    /// [`ClusterState`] as format 3 laid it out: no failover state.
    #[derive(Deserialize)]
    pub(super) struct ClusterStateV3 {
        cluster_id: String,
        join_secret_hash: String,
        ca_holder: NodeId,
        next_node_id: NodeId,
        nodes: BTreeMap<NodeId, Node>,
        kv: BTreeMap<String, KvEntry>,
        revision: u64,
        datasets: BTreeMap<DatasetId, Dataset>,
        next_dataset_id: DatasetId,
        apps: BTreeMap<String, AppV1>,
        deploy_generation: u64,
        mounts: BTreeMap<DatasetId, flock_scheduler::mount::Mounts>,
        revoked_admins: BTreeSet<String>,
    }

    impl From<ClusterStateV3> for ClusterState {
        fn from(v3: ClusterStateV3) -> Self {
            ClusterState {
                cluster_id: v3.cluster_id,
                join_secret_hash: v3.join_secret_hash,
                ca_holder: v3.ca_holder,
                next_node_id: v3.next_node_id,
                nodes: v3.nodes,
                kv: v3.kv.into_iter().collect(),
                revision: v3.revision,
                datasets: v3.datasets,
                next_dataset_id: v3.next_dataset_id,
                apps: apps_from_v1(v3.apps),
                deploy_generation: v3.deploy_generation,
                mounts: v3.mounts,
                revoked_admins: v3.revoked_admins,
                failover: Default::default(),
                secrets: Default::default(),
            }
        }
    }

    /// [`ClusterState`] as format 2 laid it out: datasets as [`DatasetV2`].
    #[derive(Deserialize)]
    pub(super) struct ClusterStateV2 {
        cluster_id: String,
        join_secret_hash: String,
        ca_holder: NodeId,
        next_node_id: NodeId,
        nodes: BTreeMap<NodeId, Node>,
        kv: BTreeMap<String, KvEntry>,
        revision: u64,
        datasets: BTreeMap<DatasetId, DatasetV2>,
        next_dataset_id: DatasetId,
        apps: BTreeMap<String, AppV1>,
        deploy_generation: u64,
        mounts: BTreeMap<DatasetId, flock_scheduler::mount::Mounts>,
        revoked_admins: BTreeSet<String>,
    }

    impl From<ClusterStateV2> for ClusterState {
        fn from(v2: ClusterStateV2) -> Self {
            ClusterState {
                cluster_id: v2.cluster_id,
                join_secret_hash: v2.join_secret_hash,
                ca_holder: v2.ca_holder,
                next_node_id: v2.next_node_id,
                nodes: v2.nodes,
                kv: v2.kv.into_iter().collect(),
                revision: v2.revision,
                datasets: datasets(v2.datasets),
                next_dataset_id: v2.next_dataset_id,
                apps: apps_from_v1(v2.apps),
                deploy_generation: v2.deploy_generation,
                mounts: v2.mounts,
                revoked_admins: v2.revoked_admins,
                failover: Default::default(),
                secrets: Default::default(),
            }
        }
    }

    /// [`ClusterState`] as format 1 laid it out (fields in this order): the join secret in
    /// plain text, no revoked admins.
    #[derive(Deserialize)]
    pub(super) struct ClusterStateV1 {
        cluster_id: String,
        join_secret: String,
        ca_holder: NodeId,
        next_node_id: NodeId,
        nodes: BTreeMap<NodeId, Node>,
        kv: BTreeMap<String, KvEntry>,
        revision: u64,
        datasets: BTreeMap<DatasetId, DatasetV2>,
        next_dataset_id: DatasetId,
        apps: BTreeMap<String, AppV1>,
        deploy_generation: u64,
        mounts: BTreeMap<DatasetId, flock_scheduler::mount::Mounts>,
    }

    impl From<ClusterStateV1> for ClusterState {
        fn from(v1: ClusterStateV1) -> Self {
            ClusterState {
                // The hash of the empty secret (before init) would not be "no secret".
                join_secret_hash: if v1.join_secret.is_empty() {
                    String::new()
                } else {
                    hash_join_secret(&v1.join_secret)
                },
                cluster_id: v1.cluster_id,
                ca_holder: v1.ca_holder,
                next_node_id: v1.next_node_id,
                nodes: v1.nodes,
                kv: v1.kv.into_iter().collect(),
                revision: v1.revision,
                datasets: datasets(v1.datasets),
                next_dataset_id: v1.next_dataset_id,
                apps: apps_from_v1(v1.apps),
                deploy_generation: v1.deploy_generation,
                mounts: v1.mounts,
                revoked_admins: Default::default(),
                failover: Default::default(),
                secrets: Default::default(),
            }
        }
    }
}

/// What the state machine holds: the cluster state and where in the log it stands.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub cluster: ClusterState,
}

/// A read-only view of the applied state, for serving reads without going through Raft.
#[derive(Clone)]
pub struct StateView(Arc<RwLock<Applied>>);

impl StateView {
    /// Reads the applied state. Hold the guard briefly: applying waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// openraft's [`RaftStateMachine`] for flock.
#[derive(Clone)]
pub struct StateMachine {
    applied: Arc<RwLock<Applied>>,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    writer: DiskWriter,
}

fn sm_err(e: impl ToString) -> StorageError {
    StorageIOError::write_state_machine(&std::io::Error::other(e.to_string())).into()
}

impl StateMachine {
    /// A state machine restored from the snapshot on disk, if there is one.
    pub fn new(snapshot: Option<StoredSnapshot>, writer: DiskWriter) -> Result<Self, DiskError> {
        let applied = match &snapshot {
            Some(s) => Applied {
                last_applied: s.meta.last_log_id,
                membership: s.meta.last_membership.clone(),
                cluster: decode_cluster(&s.data).map_err(|e| DiskError::Corrupt {
                    what: "snapshot".into(),
                    source: e,
                })?,
            },
            None => Applied::default(),
        };
        Ok(StateMachine {
            applied: Arc::new(RwLock::new(applied)),
            current: Arc::new(Mutex::new(snapshot)),
            writer,
        })
    }

    /// A view for reads.
    pub fn view(&self) -> StateView {
        StateView(self.applied.clone())
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<StoredSnapshot>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (data, last_log_id, last_membership) = {
            let a = self.applied.read().unwrap_or_else(|p| p.into_inner());
            (
                encode_cluster(&a.cluster),
                a.last_applied,
                a.membership.clone(),
            )
        };
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.writer
            .write(vec![WriteOp::Snapshot(stored.clone())], true)
            .await
            .map_err(|e| {
                StorageError::from(StorageIOError::write_snapshot(
                    Some(meta.signature()),
                    &std::io::Error::other(e),
                ))
            })?;
        *self.current() = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let a = self.applied.read().unwrap_or_else(|p| p.into_inner());
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut a = self.applied.write().unwrap_or_else(|p| p.into_inner());
        let mut results = Vec::new();
        for entry in entries {
            a.last_applied = Some(entry.log_id);
            let r = match &entry.payload {
                EntryPayload::Blank => CommandResult::Nothing,
                EntryPayload::Normal(cmd) => a.cluster.apply(cmd),
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    CommandResult::Nothing
                }
            };
            results.push(r);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let cluster = decode_cluster(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        // Durable first: once the state machine moves past the log, the snapshot is the only copy.
        self.writer
            .write(vec![WriteOp::Snapshot(stored.clone())], true)
            .await
            .map_err(sm_err)?;
        {
            let mut a = self.applied.write().unwrap_or_else(|p| p.into_inner());
            *a = Applied {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                cluster,
            };
        }
        *self.current() = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.current().clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_scheduler::{hash_join_secret, Command, SnapshotRecord};

    const LEGACY_SECRET: &str = "00112233445566778899aabbccddeeff";

    /// The commands behind [`V1_SNAPSHOT`].
    fn legacy_commands() -> Vec<Command> {
        vec![
            Command::InitCluster {
                cluster_id: "c-legacy".into(),
                join_secret: LEGACY_SECRET.into(),
                node_id: 1,
                name: "n1".into(),
                addr: "10.0.0.1:7801".into(),
            },
            Command::RegisterNode {
                secret: LEGACY_SECRET.into(),
                name: Some("db".into()),
                addr: "10.0.0.2:7801".into(),
            },
            Command::KvPut {
                key: "k".into(),
                value: "v".into(),
            },
            Command::CreateDataset {
                name: "pg".into(),
                primary: 2,
                size_limit: Some(1 << 30),
            },
            Command::RecordSnapshot {
                dataset: 1,
                epoch: 1,
                snapshot: SnapshotRecord {
                    name: "s1".into(),
                    guid: 7,
                    created_unix: 1_700_000_000,
                    epoch: 1,
                },
            },
            Command::MountVolume {
                dataset: 1,
                node: 2,
                id: "m1".into(),
            },
        ]
    }

    /// The snapshot data the build before format 2 (main at 09a9b89) wrote for the state after
    /// [`legacy_commands`]: `codec::encode(&cluster)` of its `ClusterState`, made with that
    /// build's own code, not with the legacy struct here.
    const V1_SNAPSHOT: &str = "0108632d6c65676163792030303131323233333434353536363737383839396161626263636464656566660103020101026e310d31302e302e302e313a3738303100000002020264620d31302e302e302e323a3738303100000001016b016b017601010101010101027067018080808004020100010273310780e2cfaa06010002000001010102026d31";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn replayed() -> ClusterState {
        let mut s = ClusterState::default();
        for c in legacy_commands() {
            assert!(
                !matches!(s.apply(&c), CommandResult::Rejected(_)),
                "{c:?} rejected"
            );
        }
        s
    }

    #[test]
    fn a_v1_snapshot_decodes_with_the_secret_hashed() {
        let bytes = unhex(V1_SNAPSHOT);
        // The plaintext is in the old snapshot, and not in what it becomes.
        let needle = LEGACY_SECRET.as_bytes();
        assert!(bytes.windows(needle.len()).any(|w| w == needle));
        let cluster = decode_cluster(&bytes).unwrap();
        assert_eq!(cluster.join_secret_hash, hash_join_secret(LEGACY_SECRET));
        assert!(cluster.revoked_admins.is_empty());
        // Same state as replaying the old log with this build.
        assert_eq!(cluster, replayed());
        let again = encode_cluster(&cluster);
        assert_eq!(again[0], SNAPSHOT_DATA_VERSION);
        assert!(!again.windows(needle.len()).any(|w| w == needle));
        assert_eq!(decode_cluster(&again).unwrap(), cluster);
    }

    /// `bytes` (a state without apps, encoded by this build) with the apps as formats 1 to 5
    /// laid them out: an empty map (one byte), not the JSON text `{}` (three).
    fn apps_in_postcard(bytes: &[u8]) -> Vec<u8> {
        let json = [2, b'{', b'}'];
        let at = bytes
            .windows(3)
            .position(|w| w == json)
            .expect("the apps, as JSON");
        assert_eq!(bytes.windows(3).filter(|w| *w == json).count(), 1);
        [&bytes[..at], &[0], &bytes[at + 3..]].concat()
    }

    #[test]
    fn an_empty_v1_state_stays_without_a_secret() {
        let bytes = apps_in_postcard(&crate::codec::encode(&ClusterState::default()));
        // An empty state has the same bytes in both layouts but for the empty deny list.
        assert_eq!(
            decode_cluster(&bytes[..bytes.len() - 1]).unwrap(),
            ClusterState::default()
        );
    }

    /// Format 3 is format 4 without the failover state, the last field: the state replayed
    /// from the legacy log, encoded by this build with an empty failover state (seven bytes:
    /// five empty collections, the next event id 0, one more empty collection) and cut there, is what main at f4fc48a
    /// wrote.
    #[test]
    fn a_v3_snapshot_decodes_with_no_failover_state() {
        let cluster = replayed();
        let v6 = encode_cluster(&cluster);
        assert_eq!(v6[0], 6);
        let v5 = apps_in_postcard(&v6);
        // Format 5 adds the secrets (empty: one byte) after the failover state; no apps here,
        // so the rest is format 4's layout.
        assert_eq!(&v5[v5.len() - 8..], &[0, 0, 0, 0, 0, 0, 0, 0]);
        let mut v3 = v5[..v5.len() - 8].to_vec();
        v3[0] = 3;
        assert_eq!(decode_cluster(&v3).unwrap(), cluster);
        // A failover state that is not empty survives the round trip in today's format.
        let mut after = cluster.clone();
        assert!(!matches!(
            after.apply(&flock_scheduler::Command::DeclareNodeDown {
                node: 2,
                last_heard_unix_ms: 1,
                at_unix_ms: 2,
                by_operator: true,
            }),
            CommandResult::Rejected(_)
        ));
        assert!(!after.failover.events.is_empty());
        assert_eq!(decode_cluster(&encode_cluster(&after)).unwrap(), after);
    }

    /// The snapshot data main at 9ea7e19 (format 2) wrote for the state after
    /// [`legacy_commands`], then `RevokeAdmin alice`, `UnmountVolume 1 2 m1` and
    /// `BeginDatasetMove 1 -> 1`: made with that build's own `encode_cluster`.
    const V2_SNAPSHOT: &str = "0208632d6c6567616379477368613235363a643539393538306438393430306133313665623564356636376135303365353962656564356139336663373131306263613263373532646439313933396164620103020101026e310d31302e302e302e313a3738303100000002020264620d31302e302e302e323a3738303100000001016b016b017601010101010101027067018080808004020100010273310780e2cfaa0601010100020000000105616c696365";

    #[test]
    fn a_v2_snapshot_decodes_with_default_dataset_policies() {
        let cluster = decode_cluster(&unhex(V2_SNAPSHOT)).unwrap();
        let mut expected = replayed();
        for c in [
            Command::RevokeAdmin {
                label: "alice".into(),
            },
            Command::UnmountVolume {
                dataset: 1,
                node: 2,
                id: "m1".into(),
            },
            Command::BeginDatasetMove { dataset: 1, to: 1 },
        ] {
            assert!(!matches!(expected.apply(&c), CommandResult::Rejected(_)));
        }
        assert_eq!(cluster, expected);
        let ds = &cluster.datasets[&1];
        assert_eq!((ds.retention, ds.bases.len(), &ds.hold), (None, 0, &None));
        assert_eq!(ds.moving.as_ref().map(|m| m.to), Some(1));
        assert_eq!(decode_cluster(&encode_cluster(&cluster)).unwrap(), cluster);
    }

    /// What main at f71b59e (format 4, before stacks) wrote: a `Command::Deploy` log entry of
    /// app db (image postgres, port 15432:5432, a 1 GiB volume at /data, A=1, restart always),
    /// and the snapshot data of the state after `InitCluster` (c-v4, n1, capacity cleared) and
    /// that deploy. Made with that build's own `codec::encode` and `encode_cluster`.
    const V4_DEPLOY: &str = "010f010264620264620108706f7374677265730001b82ac8780001052f6461746101808080800401014101310100000000";
    const V4_SNAPSHOT: &str = "0404632d7634477368613235363a396662323930656136353365346364343563363130393933333938623637393034386534336663373436626461656539626432376134653735303262383034660102010101026e310d31302e302e302e313a373830310000000000010101026462018080808004010100000000000002010264620264620108706f7374677265730001b82ac8780001052f646174610180808080040101410131010000000001010101000000000000000000";

    fn v4_state() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&Command::InitCluster {
            cluster_id: "c-v4".into(),
            join_secret: "sha256:00".into(),
            node_id: 1,
            name: "n1".into(),
            addr: "10.0.0.1:7801".into(),
        });
        s.nodes.get_mut(&1).unwrap().capacity = None;
        s
    }

    #[test]
    fn a_v4_deploy_entry_and_snapshot_decode_with_the_app_as_it_was() {
        use flock_scheduler::config::{PortMap, RestartPolicy};
        let cmd: Command = crate::codec::decode(&unhex(V4_DEPLOY)).unwrap();
        let Command::DeployV1 { apps } = &cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(apps["db"].spec.image.as_deref(), Some("postgres"));
        // Replayed by this build, the old entry deploys db as it did.
        let mut replayed = v4_state();
        assert!(matches!(
            replayed.apply(&cmd),
            CommandResult::Deployed { generation: 1, .. }
        ));
        let db = &replayed.apps["db"];
        assert_eq!(
            db.spec.ports,
            [PortMap {
                internal: 5432,
                external: 15432
            }]
        );
        assert_eq!(db.spec.restart_policy, RestartPolicy::Always);
        assert_eq!(db.spec.volume.as_ref().unwrap().maximum_size, Some(1 << 30));
        assert_eq!((db.spec.stack.clone(), db.vip), (None, Some(1)));
        // The old snapshot: the same app, without a service address until the next deploy.
        let cluster = decode_cluster(&unhex(V4_SNAPSHOT)).unwrap();
        let mut expected = replayed.clone();
        expected.apps.get_mut("db").unwrap().vip = None;
        assert_eq!(cluster, expected);
        assert!(cluster.secrets.is_empty());
        assert_eq!(decode_cluster(&encode_cluster(&cluster)).unwrap(), cluster);
    }

    /// What main at e1074cf (format 5, apps in postcard's layout) wrote: a `Command::Deploy`
    /// log entry of stack s (app s_db: image postgres, port 15432:5432, dataset s_data of
    /// 1 GiB at /data, A=1, restart always, service db, expose 5433, user 999, stop grace 5 s,
    /// label l=v, secret s_pw at /run/secrets/pw mode 0400), and the snapshot data of the
    /// state after `InitCluster` (c-v5, n1, capacity cleared) and that deploy.
    const V5_DEPLOY: &str = "01280101730104735f646204735f64620108706f7374677265730001b82ac8780001052f646174610180808080040106735f646174610101410131010000000101730102646201b92a00000001033939390000000188270001016c01760000000104735f70770f2f72756e2f736563726574732f7077800200000104735f70770768756e74657232";
    const V5_SNAPSHOT: &str = "0504632d7635477368613235363a396662323930656136353365346364343563363130393933333938623637393034386534336663373436626461656539626432376134653735303262383034660102010101026e310d31302e302e302e313a37383031000000000001010106735f646174610180808080040101000000000000020104735f646204735f64620108706f7374677265730001b82ac8780001052f646174610180808080040106735f646174610101410131010000000101730102646201b92a00000001033939390000000188270001016c01760000000104735f70770f2f72756e2f736563726574732f7077800200000101010101010000000000000000000104735f70770101730768756e74657232";

    #[test]
    fn a_v5_deploy_entry_and_snapshot_decode_with_the_app_as_it_was() {
        use flock_scheduler::config::{PortMap, RestartPolicy, SecretMount};
        let cmd: Command = crate::codec::decode(&unhex(V5_DEPLOY)).unwrap();
        let Command::DeployV2 {
            stack,
            apps,
            secrets,
        } = &cmd
        else {
            panic!("{cmd:?}")
        };
        assert_eq!((stack.as_deref(), apps.len()), (Some("s"), 1));
        // The same deploy made today is sent in that build's bytes, which it can apply during
        // a rolling upgrade; with a field it lacks (instances), in today's form.
        let today = Command::Deploy {
            stack: stack.clone(),
            apps: apps
                .iter()
                .map(|(n, a)| (n.clone(), a.clone().into()))
                .collect(),
            secrets: secrets.clone(),
        };
        assert_eq!(
            crate::codec::encode(&today.clone().for_older_peers()),
            unhex(V5_DEPLOY)
        );
        let mut scaled = today;
        if let Command::Deploy { apps, .. } = &mut scaled {
            apps.get_mut("s_db").unwrap().spec.instances = Some(2);
        }
        assert!(matches!(scaled.for_older_peers(), Command::Deploy { .. }));
        let mut replayed = ClusterState::default();
        replayed.apply(&Command::InitCluster {
            cluster_id: "c-v5".into(),
            join_secret: "sha256:00".into(),
            node_id: 1,
            name: "n1".into(),
            addr: "10.0.0.1:7801".into(),
        });
        replayed.nodes.get_mut(&1).unwrap().capacity = None;
        assert!(matches!(
            replayed.apply(&cmd),
            CommandResult::Deployed { generation: 1, .. }
        ));
        let db = &replayed.apps["s_db"];
        let spec = &db.spec;
        assert_eq!(
            spec.ports,
            [PortMap {
                internal: 5432,
                external: 15432
            }]
        );
        assert_eq!(spec.restart_policy, RestartPolicy::Always);
        assert_eq!(spec.dataset_name(), Some("s_data"));
        assert_eq!(
            (
                spec.service.as_deref(),
                &spec.expose[..],
                spec.user.as_deref()
            ),
            (Some("db"), &[5433][..], Some("999"))
        );
        assert_eq!(
            (spec.stop_grace_ms, spec.labels["l"].as_str()),
            (Some(5000), "v")
        );
        assert_eq!(
            spec.secrets,
            [SecretMount {
                secret: "s_pw".into(),
                target: "/run/secrets/pw".into(),
                mode: 0o400
            }]
        );
        assert_eq!(db.vip, Some(1));
        assert_eq!(replayed.secrets["s_pw"].data, b"hunter2");
        // The old snapshot holds the same state, and it is written again in today's format.
        let cluster = decode_cluster(&unhex(V5_SNAPSHOT)).unwrap();
        assert_eq!(cluster, replayed);
        let again = encode_cluster(&cluster);
        assert_eq!(again[0], SNAPSHOT_DATA_VERSION);
        assert_eq!(decode_cluster(&again).unwrap(), cluster);
        // Recorded health lives in the apps' JSON: a state without any is written as before
        // it existed (an older build of format 6 reads it), and one with some roundtrips in
        // the same format, no new layout.
        assert!(!again.windows(9).any(|w| w == b"\"health\":"));
        let mut reported = cluster.clone();
        let report = Command::ReportHealth {
            app: "s_db".into(),
            node: 1,
            health: flock_scheduler::Health::Unhealthy,
        };
        assert_eq!(
            reported.apply(&report),
            CommandResult::HealthReported { changed: true }
        );
        let bytes = encode_cluster(&reported);
        assert_eq!(bytes[0], SNAPSHOT_DATA_VERSION);
        assert!(bytes.windows(9).any(|w| w == b"\"health\":"));
        assert_eq!(decode_cluster(&bytes).unwrap(), reported);
        // The command is a new variant after every older one: their encodings are unchanged
        // (the V5 entry above decoded as it was written).
        let entry = crate::codec::encode(&report);
        assert_eq!(crate::codec::decode::<Command>(&entry).unwrap(), report);
    }

    #[test]
    fn the_current_format_roundtrips_and_unknown_formats_are_refused() {
        let mut s = replayed();
        for c in [
            Command::RevokeAdmin {
                label: "alice".into(),
            },
            Command::SetRetention {
                dataset: 1,
                retention: Some("last=2".parse().unwrap()),
            },
            Command::HoldDataset {
                dataset: 1,
                epoch: 1,
                reason: "rollback".into(),
            },
        ] {
            assert!(!matches!(s.apply(&c), CommandResult::Rejected(_)));
        }
        s.datasets.get_mut(&1).unwrap().bases.insert(1, "s1".into());
        let bytes = encode_cluster(&s);
        assert_eq!(decode_cluster(&bytes).unwrap(), s);
        assert!(matches!(decode_cluster(&[]), Err(CodecError::Empty)));
        let mut future = bytes.clone();
        future[0] = SNAPSHOT_DATA_VERSION + 1;
        assert!(matches!(
            decode_cluster(&future),
            Err(CodecError::UnknownSnapshotVersion(v)) if v == SNAPSHOT_DATA_VERSION + 1
        ));
        assert!(matches!(
            decode_cluster(&bytes[..bytes.len() / 2]),
            Err(CodecError::Postcard(_))
        ));
    }
}
