//! The replicated desired state and the commands that change it.
//!
//! Every change goes through Raft as a [`Command`]; every node applies the same commands in the
//! same order with [`ClusterState::apply`], which is deterministic and validates each command
//! against the state it finds. A command that does not fit (a stale plan, a taken name, a wrong
//! join secret) is rejected with an [`ApplyError`] and changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::app::{App, Change};
use crate::config::PlannedApp;
use crate::dataset::{Dataset, DatasetId, SnapshotRecord};
use crate::limits::shown;

/// A node's id inside its cluster. Assigned by [`Command::RegisterNode`]; the first node is 1.
pub type NodeId = u64;

pub use crate::limits::{MAX_KEY_LEN, MAX_NAME_LEN, MAX_VALUE_LEN};

/// The key-value namespace: key to entry, in key order.
pub type KvMap = imbl::OrdMap<String, KvEntry>;

/// The desired state of a cluster, replicated to every node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Set once by [`Command::InitCluster`]; empty before.
    pub cluster_id: String,
    /// `sha256:<hex>` of the secret part of the join token (see [`hash_join_secret`]); the
    /// plaintext lives only in the CA holder's data dir, so a store, a snapshot or a backup
    /// reveals no usable token.
    pub join_secret_hash: String,
    /// The node whose data dir holds the cluster CA's key (the one that created the cluster):
    /// joins and admin certificates are signed there.
    pub ca_holder: NodeId,
    /// The id the next registered node gets.
    pub next_node_id: NodeId,
    pub nodes: BTreeMap<NodeId, Node>,
    /// Users' cluster-wide settings. A persistent map: cloning the state (every agent takes a
    /// copy to decide on) shares it instead of copying every entry, which made each write cost
    /// the namespace's size (issue 20). Serialized exactly as a `BTreeMap` (a map in key order).
    pub kv: KvMap,
    /// Revision of the key-value namespace: grows by one with every change to it.
    pub revision: u64,
    /// Datasets by id.
    pub datasets: BTreeMap<DatasetId, Dataset>,
    /// The id the next created dataset gets (ids are never reused).
    pub next_dataset_id: DatasetId,
    /// The deployed applications, by name: JSON inside the snapshot (from format 6), so app
    /// fields can be added without a new layout ([`crate::json_field`]).
    #[serde(with = "crate::json_field")]
    pub apps: BTreeMap<String, App>,
    /// Grows by one with every deploy.
    pub deploy_generation: u64,
    /// Docker containers' mounts of datasets, by dataset (see [`crate::mount`]).
    pub mounts: BTreeMap<DatasetId, crate::mount::Mounts>,
    /// Labels of admin certificates that no node accepts any more ([`Command::RevokeAdmin`]).
    pub revoked_admins: BTreeSet<String>,
    /// Replication settings, nodes declared down, failovers and what they left behind (see
    /// [`crate::failover`]).
    pub failover: crate::failover::Failover,
    /// Secrets and configs of stacks, by name (`STACK_NAME`); apps mount them read-only. Since
    /// snapshot data format 5.
    pub secrets: BTreeMap<String, Secret>,
}

/// A secret (or config) of a stack: its content, given to the stack's apps that name it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub stack: Option<String>,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    /// Never the content: states are logged and printed in test failures.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("stack", &self.stack)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// A machine in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    /// HOST:PORT that other nodes and flockctl reach this node's gRPC (Raft and API) on.
    pub addr: String,
    pub labels: BTreeMap<String, String>,
    pub state: NodeState,
    /// What the node offers apps, as it last reported ([`Command::ReportNode`]); `None` until
    /// it has.
    pub capacity: Option<crate::fit::Capacity>,
}

/// Whether the scheduler may place work on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Ready,
    Draining,
    Down,
}

/// One key of the key-value namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    pub value: String,
    /// Revision that created the key.
    pub create_revision: u64,
    /// Revision of the last change to the key.
    pub mod_revision: u64,
    /// Changes since it was created: 1 after the first put.
    pub version: u64,
}

/// A change to the desired state, committed through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The first command of every cluster: names it and registers its first node.
    /// `join_secret` is the secret's hash (`sha256:<hex>`, see [`hash_join_secret`]); a
    /// plaintext secret (as logs written before hashing carry) is hashed when applied.
    InitCluster {
        cluster_id: String,
        join_secret: String,
        node_id: NodeId,
        name: String,
        addr: String,
    },
    /// Admits a node that presented `secret`; the node gets the next free id and, when
    /// `name` is `None`, the name `n<id>`. Kept for logs written before the secret was hashed:
    /// new code proposes [`Command::RegisterNodeHashed`], which carries no plaintext.
    RegisterNode {
        secret: String,
        name: Option<String>,
        addr: String,
    },
    /// Forgets a node; the leader's membership worker then drops it from Raft membership.
    RemoveNode {
        id: NodeId,
    },
    /// Replaces the join secret: tokens with the old one stop working; members are unaffected.
    /// Kept for logs written before the secret was hashed: new code proposes
    /// [`Command::SetJoinSecretHash`].
    RotateJoinSecret {
        secret: String,
    },
    KvPut {
        key: String,
        value: String,
    },
    /// Sets `key` to `value` only if it holds `expect` now (`None`: only if it does not exist).
    KvCas {
        key: String,
        expect: Option<String>,
        value: String,
    },
    KvDelete {
        key: String,
    },
    /// Several commands in one log entry, applied in order, each on its own (one rejected command
    /// does not undo the others). The leader batches concurrent proposals so they share one fsync.
    Batch(Vec<Command>),
    // New variants go last: a variant's index is its encoding in stored log entries.
    /// Creates a dataset with `primary` as its first holder; the primary's agent creates it.
    CreateDataset {
        name: String,
        primary: NodeId,
        size_limit: Option<u64>,
    },
    /// The primary took `snapshot` under `epoch`.
    RecordSnapshot {
        dataset: DatasetId,
        epoch: u64,
        snapshot: SnapshotRecord,
    },
    /// The primary rolled the dataset back to snapshot `to` under `epoch`; later snapshots are
    /// gone.
    RollbackDataset {
        dataset: DatasetId,
        epoch: u64,
        to: String,
    },
    /// Forgets a dataset; every holder's agent destroys its copy, and the name is free again.
    DeleteDataset {
        dataset: DatasetId,
    },
    /// Starts moving a dataset to `to`: its primary streams the data there, then commits.
    BeginDatasetMove {
        dataset: DatasetId,
        to: NodeId,
    },
    /// `to` holds `snapshot`, the newest one, so it becomes the primary under epoch + 1; the
    /// old primary keeps its copy as a replica.
    CommitDatasetMove {
        dataset: DatasetId,
        epoch: u64,
        to: NodeId,
        snapshot: String,
    },
    /// Gives up a dataset move; the primary stays where it is.
    CancelDatasetMove {
        dataset: DatasetId,
    },
    /// Replaces the whole application configuration (`flockctl deploy`), as builds before
    /// stacks proposed it: read from older logs; new code proposes [`Command::Deploy`].
    DeployV1 {
        apps: BTreeMap<String, crate::legacy::PlannedAppV1>,
    },
    /// The app using the dataset has had its time on the primary: it stops, the last delta
    /// goes to `to` and the move commits (see [`crate::dataset::DatasetMove`]).
    HandoffDatasetMove {
        dataset: DatasetId,
        epoch: u64,
        to: NodeId,
    },
    /// Moves an app to node `to` (`flockctl app move`), with its dataset.
    MoveApp {
        app: String,
        to: NodeId,
    },
    /// Gives up an app's move that has not committed: it stays on (or goes back to) its
    /// dataset's primary.
    CancelAppMove {
        app: String,
    },
    /// A node's capacity, and its labels when it was started with some (`None` keeps the
    /// ones it has), as it reports them when it starts.
    ReportNode {
        id: NodeId,
        labels: Option<BTreeMap<String, String>>,
        capacity: crate::fit::Capacity,
    },
    /// A Docker container (Docker's mount `id`) mounted the dataset on `node`, its primary.
    MountVolume {
        dataset: DatasetId,
        node: NodeId,
        id: String,
    },
    /// The container with mount `id` on `node` unmounted the dataset.
    UnmountVolume {
        dataset: DatasetId,
        node: NodeId,
        id: String,
    },
    /// Drops the dataset's recorded mounts (on `node` only, if given): the operator's way out
    /// when a node died with containers that no longer exist.
    ForgetMounts {
        dataset: DatasetId,
        node: Option<NodeId>,
    },
    /// Admits a node whose secret the proposer checked and hashed ([`hash_join_secret`]); apply
    /// checks the hash again (the secret may have been rotated since). As
    /// [`Command::RegisterNode`], without the plaintext in the log.
    RegisterNodeHashed {
        secret_hash: String,
        name: Option<String>,
        addr: String,
    },
    /// Replaces the join secret by the one with this hash (`sha256:<hex>`): tokens with the
    /// old secret stop working; members are unaffected.
    SetJoinSecretHash {
        secret_hash: String,
    },
    /// Revokes every admin certificate with this label, on every node. Revoking twice is fine.
    RevokeAdmin {
        label: String,
    },
    /// Sets a dataset's size limit (`None`: no limit); every holder applies it to its copy. The
    /// proposer checked that the primary's data fits under it.
    SetDatasetLimit {
        dataset: DatasetId,
        size_limit: Option<u64>,
    },
    /// Sets how many of a dataset's automatic snapshots are kept (`None`: the default).
    SetRetention {
        dataset: DatasetId,
        retention: Option<crate::Retention>,
    },
    /// Forgets recorded snapshots of a dataset under `epoch` (pruned by its retention, or removed
    /// by a user); every holder then destroys its copies. All or none: refused if one is unknown,
    /// the newest, a replica's base, or the dataset moves (see [`Dataset::must_keep`]).
    PruneSnapshots {
        dataset: DatasetId,
        epoch: u64,
        names: Vec<String>,
    },
    /// Replica `node` holds recorded `snapshot` (the primary pushed it, or found it there, under
    /// `epoch`): the base of the next push to it.
    ReplicaHolds {
        dataset: DatasetId,
        epoch: u64,
        node: NodeId,
        snapshot: String,
    },
    /// The dataset's apps stop, and do not start, until [`Command::ReleaseDataset`]: the primary
    /// works on the live data (a rollback). `reason` is shown while it lasts.
    HoldDataset {
        dataset: DatasetId,
        epoch: u64,
        reason: String,
    },
    /// Ends a [`Command::HoldDataset`]: the dataset's apps may run again.
    ReleaseDataset {
        dataset: DatasetId,
    },
    /// The node is down: the leader has not heard from it for longer than its lease plus a
    /// margin for clock drift, or an operator says so. Its datasets fail over to their
    /// replicas and its stateless apps are placed elsewhere, in this one step (see
    /// [`crate::failover`]). Times are ms since the Unix epoch on the proposer's clock, for
    /// reports only.
    DeclareNodeDown {
        node: NodeId,
        last_heard_unix_ms: u64,
        at_unix_ms: u64,
        by_operator: bool,
    },
    /// An operator says the node is dead: the leader stops renewing its lease and declares it
    /// down once the last lease it granted has run out.
    CondemnNode {
        node: NodeId,
    },
    /// Marks a node draining (nothing new is placed on it; `flockctl node drain` then moves its
    /// apps away) or, with `drain: false`, ready again.
    DrainNode {
        node: NodeId,
        drain: bool,
    },
    /// A node declared down has been heard from steadily again: work may be placed on it.
    NodeBackUp {
        node: NodeId,
        at_unix_ms: u64,
    },
    /// How many replicas a dataset keeps and how often its primary snapshots (`None`: no
    /// replicas are asked for; existing ones stay until removed).
    SetReplication {
        dataset: DatasetId,
        replication: Option<crate::failover::Replication>,
    },
    /// `node` becomes a replica of `dataset` (the primary's agent proposes it, under `epoch`).
    AddReplica {
        dataset: DatasetId,
        epoch: u64,
        node: NodeId,
    },
    /// The returning `node` kept its diverged writes of `dataset` in `snapshot` (if it had
    /// any) and rolled its copy back to the common snapshot: it becomes a replica.
    KeepDiverged {
        dataset: DatasetId,
        node: NodeId,
        snapshot: Option<String>,
        at_unix_ms: u64,
    },
    /// An operator removed `snapshot`, where `node` kept the diverged writes of `dataset`
    /// (`flockctl dataset snapshot rm`): the node destroys that copy.
    DropKept {
        dataset: DatasetId,
        node: NodeId,
        snapshot: String,
    },
    /// [`Command::Deploy`] as builds from stacks to app scaling proposed it, apps in postcard's
    /// layout: read from older logs.
    DeployV2 {
        stack: Option<String>,
        apps: BTreeMap<String, crate::legacy::PlannedAppV2>,
        secrets: BTreeMap<String, Vec<u8>>,
    },
    /// Deploys stack `stack` (a compose project): its apps become `apps` (each with
    /// `spec.stack == stack`) and its secrets `secrets`; apps and secrets of other stacks stay
    /// as they are. `stack: None` is the whole-configuration deploy of Flocker's two files: it
    /// replaces every app outside stacks. An empty stack removes it (`flockctl stack rm`). The
    /// apps are JSON in the entry ([`crate::json_field`]), so app fields can be added.
    Deploy {
        stack: Option<String>,
        #[serde(with = "crate::json_field")]
        apps: BTreeMap<String, PlannedApp>,
        secrets: BTreeMap<String, Vec<u8>>,
    },
    /// Instances of the stateless app `app` that wait go to `nodes`, one each, in order: each
    /// only if it still fits there and the app still waits for one (see [`crate::scale`]). The
    /// leader proposes it when room appears (a node joins, a drain ends, an app is removed).
    PlaceInstances {
        app: String,
        nodes: Vec<NodeId>,
    },
    /// The health check of app `app`'s instance on `node` changed its verdict (the node's apps
    /// agent proposes it on transitions only); the mesh routes only to instances that are not
    /// recorded starting or unhealthy ([`App::serves_on`]).
    ReportHealth {
        app: String,
        node: NodeId,
        health: crate::app::Health,
    },
}

impl Command {
    /// The command as the build before apps in JSON can read it, when it can say it: a
    /// [`Command::Deploy`] whose apps use no field newer than format 5 goes as
    /// [`Command::DeployV2`] (the older build's `Deploy`), so nodes not upgraded yet keep
    /// applying deploys during a rolling upgrade. Anything else is returned as it is.
    pub fn for_older_peers(self) -> Command {
        let Command::Deploy {
            stack,
            apps,
            secrets,
        } = &self
        else {
            return self;
        };
        let old: Option<BTreeMap<String, crate::legacy::PlannedAppV2>> = apps
            .iter()
            .map(|(n, p)| {
                let spec = crate::legacy::AppSpecV2::from_current(&p.spec)?;
                Some((
                    n.clone(),
                    crate::legacy::PlannedAppV2 { spec, node: p.node },
                ))
            })
            .collect();
        match old {
            Some(apps) => Command::DeployV2 {
                stack: stack.clone(),
                apps,
                secrets: secrets.clone(),
            },
            None => self,
        }
    }

    /// The whole-configuration deploy of `apps` (apps outside stacks), without secrets.
    pub fn deploy_all(apps: BTreeMap<String, PlannedApp>) -> Command {
        Command::Deploy {
            stack: None,
            apps,
            secrets: BTreeMap::new(),
        }
    }
}

/// What this build's [`ClusterState::apply`] knows beyond the commands of the builds before
/// levels were reported: 1, [`Command::PlaceInstances`] and [`Command::ReportHealth`]. A node says it in every lease renewal,
/// and a leader proposes such a command on its own only once every member can apply it
/// (flock-decide's `upgrade`).
pub const APPLY_LEVEL: u32 = 1;

impl Command {
    /// The [`APPLY_LEVEL`] a build needs to decode and apply this command: 0 for the commands
    /// of the builds before levels, which every member applies.
    pub fn apply_level(&self) -> u32 {
        match self {
            Command::Batch(cmds) => cmds.iter().map(Command::apply_level).max().unwrap_or(0),
            Command::PlaceInstances { .. } | Command::ReportHealth { .. } => 1,
            _ => 0,
        }
    }
}

/// What applying a [`Command`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// For log entries that carry no command (blank and membership entries).
    Nothing,
    ClusterInitialized,
    NodeRegistered {
        id: NodeId,
        name: String,
    },
    NodeRemoved {
        id: NodeId,
    },
    JoinSecretRotated,
    KvPut(KvEntry),
    /// `entry` is the new entry on success, the current one (if any) on failure.
    KvCas {
        succeeded: bool,
        entry: Option<KvEntry>,
    },
    KvDeleted {
        existed: bool,
        revision: u64,
    },
    DatasetCreated {
        id: DatasetId,
    },
    SnapshotRecorded,
    RolledBack {
        /// How many recorded snapshots the rollback destroyed.
        dropped: usize,
    },
    DatasetDeleted {
        /// The nodes that held a copy and now destroy it.
        holders: Vec<NodeId>,
    },
    MoveBegun {
        epoch: u64,
    },
    MoveCommitted {
        epoch: u64,
    },
    MoveCancelled {
        to: Option<NodeId>,
    },
    Deployed {
        generation: u64,
        changes: Vec<Change>,
    },
    /// The command did not fit the state and changed nothing.
    Rejected(ApplyError),
    /// One result per command of a [`Command::Batch`], in order.
    Batch(Vec<CommandResult>),
    NodeReported,
    HandedOff,
    AppMoved {
        from: NodeId,
        /// The app's dataset, which now moves too.
        dataset: Option<DatasetId>,
    },
    AppMoveCancelled {
        node: NodeId,
    },
    /// The dataset's mounts on the node, this one included.
    VolumeMounted {
        mounts: usize,
    },
    /// The dataset's mounts left on the node.
    VolumeUnmounted {
        mounts: usize,
    },
    MountsForgotten {
        dropped: usize,
    },
    AdminRevoked {
        /// Whether the label was revoked before.
        already: bool,
    },
    DatasetLimitSet,
    RetentionSet,
    SnapshotsPruned {
        count: usize,
    },
    ReplicaRecorded,
    DatasetHeld,
    DatasetReleased {
        /// Whether it was held.
        was_held: bool,
    },
    NodeDeclaredDown {
        /// Datasets that failed over, with their new primaries.
        failed_over: Vec<(String, NodeId)>,
        /// Datasets that wait: no replica to fail over to.
        waiting: Vec<String>,
    },
    NodeUp {
        was_down: bool,
    },
    ReplicationSet,
    DivergedKept,
    NodeCondemned,
    NodeDraining {
        draining: bool,
    },
    KeptDropped,
    /// The nodes that got an instance, and those refused with the reason.
    InstancesPlaced {
        placed: Vec<NodeId>,
        refused: Vec<(NodeId, String)>,
    },
    HealthReported {
        /// Whether the record changed (a report repeated after a lost answer does not).
        changed: bool,
    },
}

/// Why a command was rejected. Messages name the bad input and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("the cluster is already initialized as {cluster_id}")]
    AlreadyInitialized { cluster_id: String },
    #[error("the cluster is not initialized yet")]
    NotInitialized,
    #[error("the join token is wrong or has been rotated; get the current one with `flockctl cluster token`")]
    WrongJoinSecret,
    #[error("a node named {n} is already a member; choose another --name, or remove the old one with `flockctl node rm {name}`", n = shown(.name))]
    NameTaken { name: String },
    #[error("invalid node name {n}: {reason}", n = shown(.name))]
    InvalidName { name: String, reason: String },
    #[error("invalid node address {a}: expected HOST:PORT", a = shown(.addr))]
    InvalidAddr { addr: String },
    #[error("no node with id {id}")]
    UnknownNode { id: NodeId },
    #[error("invalid key {k}: {reason}", k = shown(.key))]
    InvalidKey { key: String, reason: String },
    #[error("value for key {k} is {len}; the limit is {max}", k = shown(.key), len = sized(*.len), max = sized(*.max))]
    ValueTooLarge { key: String, len: usize, max: usize },
    #[error("a batch cannot contain another batch")]
    NestedBatch,
    #[error("invalid dataset name {n}: {reason}", n = shown(.name))]
    InvalidDatasetName { name: String, reason: String },
    #[error("invalid snapshot name {n}: {reason}", n = shown(.name))]
    InvalidSnapshotName { name: String, reason: String },
    #[error("a dataset named {n} already exists; choose another name, or remove it with `flockctl dataset rm {name}`", n = shown(.name))]
    DatasetExists { name: String },
    #[error("dataset {name:?}: a size limit of 0 bytes leaves no room for data; give a size such as 1G, or none for no limit")]
    ZeroSizeLimit { name: String },
    #[error("no dataset with id {id}")]
    UnknownDataset { id: DatasetId },
    #[error("dataset {dataset:?} has no snapshot {s}; list them with `flockctl dataset snapshots {dataset}`", s = shown(.snapshot))]
    UnknownSnapshot { dataset: String, snapshot: String },
    #[error("dataset {dataset:?} already has a snapshot named {s}; choose another --tag", s = shown(.snapshot))]
    SnapshotExists { dataset: String, snapshot: String },
    #[error("dataset {dataset:?} changed hands (epoch {current}, this request was made under epoch {epoch}); retry")]
    StaleEpoch {
        dataset: String,
        epoch: u64,
        current: u64,
    },
    #[error("node {name:?} is down")]
    NodeDown { name: String },
    #[error("dataset {dataset:?} is already on that node")]
    AlreadyPrimary { dataset: String },
    #[error("dataset {dataset:?} is already moving to node {to}; wait for it, or cancel it with `flockctl dataset move {dataset} --cancel`")]
    MoveInProgress { dataset: String, to: NodeId },
    #[error("dataset {dataset:?} is not moving to node {to}")]
    NoSuchMove { dataset: String, to: NodeId },
    #[error(
        "invalid app name {n}: use letters, digits, '_', '.', ':' and '-', at most 40 bytes",
        n = shown(.name)
    )]
    InvalidAppName { name: String },
    #[error("apps {other:?} and {app:?} both publish external port {port}; external ports are unique in the cluster")]
    PortTaken {
        port: u16,
        app: String,
        other: String,
    },
    #[error("no node is ready to run apps")]
    NoReadyNode,
    #[error("{name:?} is not a stack name (letters, digits, '_', '-' and '.', starting with a letter or digit)")]
    InvalidStackName { name: String },
    #[error("app {app:?} is not of stack {stack:?}, which this deploy is of")]
    NotOfStack { app: String, stack: String },
    #[error("an app named {app:?} exists in {}; remove it there or rename this one", if other.is_empty() { "the configuration outside stacks".to_string() } else { format!("stack {other:?}") })]
    AppOfOtherStack { app: String, other: String },
    #[error("secret {secret:?} belongs to {}; secrets are named STACK_NAME", if other.is_empty() { "the configuration outside stacks".to_string() } else { format!("stack {other:?}") })]
    SecretOfOtherStack { secret: String, other: String },
    #[error("apps {apps} share volume {dataset:?}: {why}")]
    SharedVolumeMismatch {
        dataset: String,
        apps: String,
        why: String,
    },
    #[error("app {app:?} mounts secret {secret:?}, which its stack does not define")]
    UnknownSecret { app: String, secret: String },
    #[error("every service address (198.18.0.1 to 198.18.255.254) is taken")]
    NoServiceAddress,
    #[error("app {app:?} cannot have {count} instances: {why}")]
    InstanceCount {
        app: String,
        count: u32,
        why: String,
    },
    #[error("dataset {dataset:?} is the volume of app {app:?}: it moves with its app (`flockctl app move {app} --to NODE`), and is removed only after the app (`flockctl app rm {app}`)")]
    DatasetInUse { dataset: String, app: String },
    #[error("node {name:?} is the primary of dataset {dataset:?}; move the dataset away (`flockctl dataset move {dataset} --to NODE`) or remove it first")]
    PrimaryOfDataset { name: String, dataset: String },
    #[error("app {app:?} cannot run on node {node:?}, where deployment.yml puts it: {reason}")]
    PinnedMisfit {
        app: String,
        node: String,
        reason: String,
    },
    #[error("no ready node can run app {app:?}: {reasons}")]
    NoFittingNode { app: String, reasons: String },
    #[error("invalid node labels: {reason}")]
    InvalidLabels { reason: String },
    #[error("dataset {dataset:?} is still in the first phase of its move (its app runs on the primary); hand off first")]
    NotHandedOff { dataset: String },
    #[error("no app named {n} (`flockctl app ls` lists them)", n = shown(.name))]
    UnknownApp { name: String },
    #[error("app {app:?} is already on node {node:?}")]
    AppAlreadyThere { app: String, node: String },
    #[error("app {app:?} is not moving")]
    AppNotMoving { app: String },
    #[error("volume {dataset:?} is in use by {containers} container(s) on node {node:?}; stop them there first (if {node:?} is gone for good: `flockctl dataset unmount {dataset} --force`)")]
    VolumeMounted {
        dataset: String,
        node: String,
        containers: usize,
    },
    #[error(
        "volume {dataset:?} is on node {primary:?}, not on {node:?}; it must move there first"
    )]
    NotOnNode {
        dataset: String,
        node: String,
        primary: String,
    },
    #[error("volume {dataset:?} is moving to node {to:?}; try again when the move is done (`flockctl dataset ls {dataset}`)")]
    VolumeMoving { dataset: String, to: String },
    #[error("invalid mount id {i}: expected 1 to 128 bytes", i = shown(.id))]
    InvalidMountId { id: String },
    /// A field (or the whole command) over its size limit (see [`crate::limits`]); `what` names
    /// it, quoting user input only as [`shown`] does.
    #[error("{what} is {len}; the limit is {max}", len = sized(*.len), max = sized(*.max))]
    TooLarge {
        what: String,
        len: usize,
        max: usize,
    },
    #[error("invalid join secret hash: expected sha256: and 64 lowercase hex digits")]
    InvalidSecretHash,
    #[error("invalid retention: {reason}")]
    InvalidRetention { reason: String },
    #[error("snapshot {s} of dataset {dataset:?} must be kept: {reason}", s = shown(.snapshot))]
    MustKeepSnapshot {
        dataset: String,
        snapshot: String,
        reason: String,
    },
    #[error("node {node} is not a replica of dataset {dataset:?}")]
    NotAReplica { dataset: String, node: NodeId },
    #[error("dataset {dataset:?} is held ({reason}); try again when that is done (`flockctl dataset ls {dataset}`)")]
    DatasetHeld { dataset: String, reason: String },
    #[error("invalid replication: {reason}")]
    InvalidReplication { reason: String },
    #[error("node {node:?} holds a diverged copy of dataset {dataset:?} (writes a failover left there, kept); it cannot take the dataset while that copy is there")]
    DivergedCopy { dataset: String, node: String },
    #[error("node {name:?} is draining: nothing new is placed on it (`flockctl node drain {name} --undo` ends that)")]
    NodeDraining { name: String },
    /// Refused by the leader before proposing: members run a build that could not decode the
    /// command. Only ever sent to a build that knows it (older ones never propose such a command).
    #[error("{} run(s) an older flockd that cannot apply this change; upgrade {} first (or wait for {} to renew its lease)", nodes.join(", "), if nodes.len() == 1 { "it" } else { "them" }, if nodes.len() == 1 { "it" } else { "them" })]
    MembersTooOld { nodes: Vec<String> },
    #[error("app {app:?} has no instance on node {node}")]
    NotPlacedOn { app: String, node: NodeId },
}

/// A length in an error, for people: `300 bytes`, `1.5 MiB (1572864 bytes)`.
fn sized(len: usize) -> String {
    if len < 1024 {
        format!("{len} bytes")
    } else {
        format!("{} ({len} bytes)", crate::config::human_size(len as u64))
    }
}

impl ClusterState {
    /// Whether `self` and `other` are the same but for the key-value namespace (`kv` and
    /// `revision`): the agents act on the rest, and a busy key-value workload changes only that.
    /// Every other field is compared (the destructuring makes a new field a compile error here
    /// until it is placed).
    pub fn same_but_kv(&self, other: &ClusterState) -> bool {
        let ClusterState {
            cluster_id,
            join_secret_hash,
            ca_holder,
            next_node_id,
            nodes,
            kv: _,
            revision: _,
            datasets,
            next_dataset_id,
            apps,
            deploy_generation,
            mounts,
            revoked_admins,
            failover,
            secrets,
        } = self;
        *cluster_id == other.cluster_id
            && *join_secret_hash == other.join_secret_hash
            && *ca_holder == other.ca_holder
            && *next_node_id == other.next_node_id
            && *nodes == other.nodes
            && *datasets == other.datasets
            && *next_dataset_id == other.next_dataset_id
            && *apps == other.apps
            && *deploy_generation == other.deploy_generation
            && *mounts == other.mounts
            && *revoked_admins == other.revoked_admins
            && *failover == other.failover
            && *secrets == other.secrets
    }

    /// Applies one command. Deterministic: the same state and command give the same result on
    /// every node. A rejected command leaves the state unchanged.
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        if let Command::Batch(cmds) = cmd {
            return CommandResult::Batch(
                cmds.iter()
                    .map(|c| match c {
                        Command::Batch(_) => CommandResult::Rejected(ApplyError::NestedBatch),
                        c => self.apply(c),
                    })
                    .collect(),
            );
        }
        match self.try_apply(cmd) {
            Ok(r) => {
                // Any command that may move, stop or remove an instance drops the health
                // recorded for it (the key-value namespace and health reports cannot).
                if !matches!(
                    cmd,
                    Command::KvPut { .. }
                        | Command::KvCas { .. }
                        | Command::KvDelete { .. }
                        | Command::ReportHealth { .. }
                ) {
                    self.prune_health();
                }
                r
            }
            Err(e) => CommandResult::Rejected(e),
        }
    }

    fn try_apply(&mut self, cmd: &Command) -> Result<CommandResult, ApplyError> {
        if !matches!(cmd, Command::InitCluster { .. }) && self.cluster_id.is_empty() {
            return Err(ApplyError::NotInitialized);
        }
        match cmd {
            Command::InitCluster {
                cluster_id,
                join_secret,
                node_id,
                name,
                addr,
            } => {
                if !self.cluster_id.is_empty() {
                    return Err(ApplyError::AlreadyInitialized {
                        cluster_id: self.cluster_id.clone(),
                    });
                }
                validate_name(name)?;
                validate_addr(addr)?;
                self.cluster_id = cluster_id.clone();
                self.join_secret_hash = if is_secret_hash(join_secret) {
                    join_secret.clone()
                } else {
                    hash_join_secret(join_secret)
                };
                self.ca_holder = *node_id;
                self.insert_node(*node_id, name.clone(), addr.clone());
                self.next_node_id = node_id + 1;
                Ok(CommandResult::ClusterInitialized)
            }
            Command::RegisterNode { secret, name, addr } => {
                self.register_node(&hash_join_secret(secret), name, addr)
            }
            Command::RegisterNodeHashed {
                secret_hash,
                name,
                addr,
            } => self.register_node(secret_hash, name, addr),
            Command::RemoveNode { id } => {
                let Some(node) = self.nodes.get(id) else {
                    return Err(ApplyError::UnknownNode { id: *id });
                };
                if let Some(ds) = self.datasets.values().find(|d| d.primary == *id) {
                    return Err(ApplyError::PrimaryOfDataset {
                        name: node.name.clone(),
                        dataset: ds.name.clone(),
                    });
                }
                self.nodes.remove(id);
                self.forget_dataset_holder(*id);
                self.prune_mounts(Some(*id));
                Ok(CommandResult::NodeRemoved { id: *id })
            }
            Command::RotateJoinSecret { secret } => {
                self.join_secret_hash = hash_join_secret(secret);
                Ok(CommandResult::JoinSecretRotated)
            }
            Command::SetJoinSecretHash { secret_hash } => {
                if !is_secret_hash(secret_hash) {
                    return Err(ApplyError::InvalidSecretHash);
                }
                self.join_secret_hash = secret_hash.clone();
                Ok(CommandResult::JoinSecretRotated)
            }
            Command::RevokeAdmin { label } => {
                validate_name(label)?;
                let already = !self.revoked_admins.insert(label.clone());
                Ok(CommandResult::AdminRevoked { already })
            }
            Command::KvPut { key, value } => {
                validate_kv(key, value)?;
                Ok(CommandResult::KvPut(self.kv_set(key, value)))
            }
            Command::KvCas { key, expect, value } => {
                validate_kv(key, value)?;
                let current = self.kv.get(key);
                if current.map(|e| &e.value) != expect.as_ref() {
                    return Ok(CommandResult::KvCas {
                        succeeded: false,
                        entry: current.cloned(),
                    });
                }
                Ok(CommandResult::KvCas {
                    succeeded: true,
                    entry: Some(self.kv_set(key, value)),
                })
            }
            Command::CreateDataset {
                name,
                primary,
                size_limit,
            } => self.create_dataset(name, *primary, *size_limit),
            Command::RecordSnapshot {
                dataset,
                epoch,
                snapshot,
            } => self.record_snapshot(*dataset, *epoch, snapshot),
            Command::RollbackDataset { dataset, epoch, to } => {
                self.rollback_dataset(*dataset, *epoch, to)
            }
            Command::DeleteDataset { dataset } => {
                self.dataset_unused(*dataset)?;
                self.not_mounted(*dataset)?;
                self.delete_dataset(*dataset)
            }
            Command::BeginDatasetMove { dataset, to } => {
                self.dataset_unused(*dataset)?;
                self.begin_dataset_move(*dataset, *to)
            }
            Command::DeployV1 { apps } => {
                let apps: BTreeMap<String, PlannedApp> = apps
                    .iter()
                    .map(|(n, a)| (n.clone(), a.clone().into()))
                    .collect();
                self.deploy_not_mounted(&apps)?;
                self.deploy(None, &apps, &BTreeMap::new())
            }
            Command::DeployV2 {
                stack,
                apps,
                secrets,
            } => {
                let apps: BTreeMap<String, PlannedApp> = apps
                    .iter()
                    .map(|(n, a)| (n.clone(), a.clone().into()))
                    .collect();
                self.deploy_not_mounted(&apps)?;
                self.deploy(stack.as_deref(), &apps, secrets)
            }
            Command::Deploy {
                stack,
                apps,
                secrets,
            } => {
                self.deploy_not_mounted(apps)?;
                self.deploy(stack.as_deref(), apps, secrets)
            }
            Command::ReportNode {
                id,
                labels,
                capacity,
            } => {
                if let Some(labels) = labels {
                    crate::fit::validate_labels(labels)
                        .map_err(|reason| ApplyError::InvalidLabels { reason })?;
                }
                let node = self
                    .nodes
                    .get_mut(id)
                    .ok_or(ApplyError::UnknownNode { id: *id })?;
                if let Some(labels) = labels {
                    node.labels = labels.clone();
                }
                node.capacity = Some(capacity.clone());
                Ok(CommandResult::NodeReported)
            }
            Command::CommitDatasetMove {
                dataset,
                epoch,
                to,
                snapshot,
            } => {
                let handed_off = self
                    .datasets
                    .get(dataset)
                    .and_then(|d| d.moving.as_ref())
                    .is_some_and(|m| m.handoff);
                if !handed_off && self.apps_of_dataset(*dataset).next().is_some() {
                    return Err(ApplyError::NotHandedOff {
                        dataset: self.datasets[dataset].name.clone(),
                    });
                }
                self.commit_dataset_move(*dataset, *epoch, *to, snapshot)
            }
            Command::HandoffDatasetMove { dataset, epoch, to } => {
                self.handoff_dataset_move(*dataset, *epoch, *to)
            }
            Command::MoveApp { app, to } => self.move_app(app, *to),
            Command::CancelAppMove { app } => self.cancel_app_move(app),
            Command::CancelDatasetMove { dataset } => {
                // An app whose dataset's move is given up (a target without room) stays on
                // the primary, where its data is.
                let r = self.cancel_dataset_move(*dataset)?;
                if let Some(primary) = self.datasets.get(dataset).map(|d| d.primary) {
                    for app in self
                        .apps
                        .values_mut()
                        .filter(|a| a.dataset == Some(*dataset))
                    {
                        app.node = primary;
                        app.pinned = Some(primary);
                    }
                }
                Ok(r)
            }
            Command::MountVolume { dataset, node, id } => self.mount_volume(*dataset, *node, id),
            Command::SetDatasetLimit {
                dataset,
                size_limit,
            } => self.set_dataset_limit(*dataset, *size_limit),
            Command::SetRetention { dataset, retention } => {
                self.set_retention(*dataset, *retention)
            }
            Command::PruneSnapshots {
                dataset,
                epoch,
                names,
            } => self.prune_snapshots(*dataset, *epoch, names),
            Command::ReplicaHolds {
                dataset,
                epoch,
                node,
                snapshot,
            } => self.replica_holds(*dataset, *epoch, *node, snapshot),
            Command::HoldDataset {
                dataset,
                epoch,
                reason,
            } => self.hold_dataset(*dataset, *epoch, reason),
            Command::ReleaseDataset { dataset } => self.release_dataset(*dataset),
            Command::DeclareNodeDown {
                node,
                last_heard_unix_ms,
                at_unix_ms,
                by_operator,
            } => self.declare_node_down(*node, *last_heard_unix_ms, *at_unix_ms, *by_operator),
            Command::NodeBackUp { node, at_unix_ms } => self.node_back_up(*node, *at_unix_ms),
            Command::CondemnNode { node } => self.condemn_node(*node),
            Command::DrainNode { node, drain } => self.drain_node(*node, *drain),
            Command::SetReplication {
                dataset,
                replication,
            } => self.set_replication(*dataset, *replication),
            Command::AddReplica {
                dataset,
                epoch,
                node,
            } => self.add_replica(*dataset, *epoch, *node),
            Command::KeepDiverged {
                dataset,
                node,
                snapshot,
                at_unix_ms,
            } => self.keep_diverged(*dataset, *node, snapshot.as_deref(), *at_unix_ms),
            Command::DropKept {
                dataset,
                node,
                snapshot,
            } => self.drop_kept(*dataset, *node, snapshot),
            Command::UnmountVolume { dataset, node, id } => Ok(CommandResult::VolumeUnmounted {
                mounts: self.unmount_volume(*dataset, *node, id),
            }),
            Command::ForgetMounts { dataset, node } => self.forget_mounts(*dataset, *node),
            Command::PlaceInstances { app, nodes } => self.place_instances(app, nodes),
            Command::ReportHealth { app, node, health } => self.report_health(app, *node, *health),
            // `apply` unpacks batches; one reaching here was nested.
            Command::Batch(_) => Err(ApplyError::NestedBatch),
            Command::KvDelete { key } => {
                validate_key(key)?;
                let existed = self.kv.remove(key).is_some();
                if existed {
                    self.revision += 1;
                }
                Ok(CommandResult::KvDeleted {
                    existed,
                    revision: self.revision,
                })
            }
        }
    }

    /// Refuses a user's change to a dataset that an app's volume uses.
    fn dataset_unused(&self, id: DatasetId) -> Result<(), ApplyError> {
        match self.apps_of_dataset(id).next() {
            Some((app, _)) => Err(ApplyError::DatasetInUse {
                dataset: self
                    .datasets
                    .get(&id)
                    .map_or_else(String::new, |d| d.name.clone()),
                app: app.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Registers a node that presented the secret with hash `secret_hash`.
    fn register_node(
        &mut self,
        secret_hash: &str,
        name: &Option<String>,
        addr: &str,
    ) -> Result<CommandResult, ApplyError> {
        if !self.join_secret_matches(secret_hash) {
            return Err(ApplyError::WrongJoinSecret);
        }
        validate_addr(addr)?;
        let id = self.next_node_id;
        let name = match name {
            Some(n) => {
                validate_name(n)?;
                if self.node_by_name(n).is_some() {
                    return Err(ApplyError::NameTaken { name: n.clone() });
                }
                n.clone()
            }
            None => self.free_default_name(id),
        };
        self.insert_node(id, name.clone(), addr.to_string());
        self.next_node_id = id + 1;
        Ok(CommandResult::NodeRegistered { id, name })
    }

    /// Whether `secret_hash` (as [`hash_join_secret`] gives) is the hash of the current join
    /// secret, compared in constant time. Never true before the cluster has a secret.
    pub fn join_secret_matches(&self, secret_hash: &str) -> bool {
        !self.join_secret_hash.is_empty()
            && constant_time_eq(secret_hash.as_bytes(), self.join_secret_hash.as_bytes())
    }

    /// Whether admin certificates with this label are revoked.
    pub fn admin_revoked(&self, label: &str) -> bool {
        self.revoked_admins.contains(label)
    }

    /// The node with this name, if any.
    pub fn node_by_name(&self, name: &str) -> Option<&Node> {
        self.nodes.values().find(|n| n.name == name)
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn kv_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KvEntry> + 'a {
        self.kv
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
    }

    fn insert_node(&mut self, id: NodeId, name: String, addr: String) {
        self.nodes.insert(
            id,
            Node {
                id,
                name,
                addr,
                labels: BTreeMap::new(),
                state: NodeState::Ready,
                capacity: None,
            },
        );
    }

    fn free_default_name(&self, id: NodeId) -> String {
        let base = format!("n{id}");
        let mut name = base.clone();
        let mut k = 2;
        while self.node_by_name(&name).is_some() {
            name = format!("{base}-{k}");
            k += 1;
        }
        name
    }

    fn kv_set(&mut self, key: &str, value: &str) -> KvEntry {
        self.revision += 1;
        let rev = self.revision;
        let entry = match self.kv.get(key) {
            Some(e) => KvEntry {
                key: e.key.clone(),
                value: value.to_string(),
                create_revision: e.create_revision,
                mod_revision: rev,
                version: e.version + 1,
            },
            None => KvEntry {
                key: key.to_string(),
                value: value.to_string(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
            },
        };
        self.kv.insert(key.to_string(), entry.clone());
        entry
    }
}

/// What [`hash_join_secret`] puts before the hex digest.
pub const SECRET_HASH_PREFIX: &str = "sha256:";

/// The form the replicated state keeps the join secret in: `sha256:<hex>` of SHA-256 over a
/// domain-separation tag and the secret. The secret is 128 random bits (`flockd` makes it), so a
/// fast hash is enough: there is nothing to guess a dictionary of, and no salt or slow KDF
/// would add anything against 2^128 tries.
pub fn hash_join_secret(secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"flock join secret v1\0");
    h.update(secret.as_bytes());
    format!("{SECRET_HASH_PREFIX}{}", hex::encode(h.finalize()))
}

/// Whether `s` has the form [`hash_join_secret`] gives. (A plaintext secret is hex only, so it
/// never has this form.)
pub fn is_secret_hash(s: &str) -> bool {
    s.strip_prefix(SECRET_HASH_PREFIX).is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Byte equality whose time depends only on the lengths, not on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A node name: 1 to 63 of `a-z 0-9 - _ .`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), ApplyError> {
    let bad = |reason: &str| {
        Err(ApplyError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 63 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return bad("it must start with a lowercase letter or a digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
    {
        return bad("use only lowercase letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// The host part of HOST:PORT, without an IPv6 address's brackets (`[::1]:7000` is `::1`): what
/// `(host, port)` connects to, and how a deployment names a node by host.
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(|c| c == '[' || c == ']')
}

/// A node's name as flock shows it, or `node-<id>` for a node no longer in the state (removed,
/// while a record still names it).
pub fn node_name(state: &ClusterState, id: NodeId) -> String {
    state
        .nodes
        .get(&id)
        .map_or_else(|| format!("node-{id}"), |n| n.name.clone())
}

/// HOST:PORT with a non-empty host and a numeric, non-zero port.
pub fn validate_addr(addr: &str) -> Result<(), ApplyError> {
    let ok = match addr.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ApplyError::InvalidAddr {
            addr: addr.to_string(),
        })
    }
}

fn validate_key(key: &str) -> Result<(), ApplyError> {
    let bad = |reason: String| {
        Err(ApplyError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("keys must not be empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return bad(format!("keys are at most {MAX_KEY_LEN} bytes"));
    }
    Ok(())
}

fn validate_kv(key: &str, value: &str) -> Result<(), ApplyError> {
    validate_key(key)?;
    if value.len() > MAX_VALUE_LEN {
        return Err(ApplyError::ValueTooLarge {
            key: key.to_string(),
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_in_errors_are_for_people() {
        let e = ApplyError::ValueTooLarge {
            key: "k".into(),
            len: 2 << 20,
            max: 3 << 19,
        };
        assert_eq!(
            e.to_string(),
            "value for key \"k\" is 2.0 MiB (2097152 bytes); the limit is 1.5 MiB (1572864 bytes)"
        );
        let e = ApplyError::TooLarge {
            what: "node name".into(),
            len: 300,
            max: 63,
        };
        assert_eq!(
            e.to_string(),
            "node name is 300 bytes; the limit is 63 bytes"
        );
    }

    #[test]
    fn hosts_lose_their_port_and_brackets_and_removed_nodes_keep_a_name() {
        assert_eq!(host_of("10.0.0.1:7000"), "10.0.0.1");
        assert_eq!(host_of("[fd00::9]:7801"), "fd00::9");
        assert_eq!(host_of("db.local:7000"), "db.local");
        assert_eq!(host_of("db.local"), "db.local");
        let s = initialized();
        assert_eq!(node_name(&s, 1), s.nodes[&1].name);
        assert_eq!(node_name(&s, 42), "node-42");
    }

    fn initialized() -> ClusterState {
        let mut s = ClusterState::default();
        let r = s.apply(&Command::InitCluster {
            cluster_id: "c1".into(),
            join_secret: "s3cret".into(),
            node_id: 1,
            name: "n1".into(),
            addr: "127.0.0.1:7801".into(),
        });
        assert_eq!(r, CommandResult::ClusterInitialized);
        s
    }

    fn register(s: &mut ClusterState, name: Option<&str>, secret: &str) -> CommandResult {
        s.apply(&Command::RegisterNode {
            secret: secret.into(),
            name: name.map(String::from),
            addr: "127.0.0.1:7802".into(),
        })
    }

    #[test]
    fn commands_before_init_are_rejected() {
        let mut s = ClusterState::default();
        let r = s.apply(&Command::KvPut {
            key: "a".into(),
            value: "1".into(),
        });
        assert_eq!(r, CommandResult::Rejected(ApplyError::NotInitialized));
        assert_eq!(s, ClusterState::default());
    }

    #[test]
    fn init_twice_is_rejected() {
        let mut s = initialized();
        let before = s.clone();
        let r = s.apply(&Command::InitCluster {
            cluster_id: "c2".into(),
            join_secret: "x".into(),
            node_id: 1,
            name: "n1".into(),
            addr: "h:1".into(),
        });
        assert!(matches!(
            r,
            CommandResult::Rejected(ApplyError::AlreadyInitialized { .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn register_assigns_ids_and_default_names() {
        let mut s = initialized();
        assert_eq!(
            register(&mut s, None, "s3cret"),
            CommandResult::NodeRegistered {
                id: 2,
                name: "n2".into()
            }
        );
        assert_eq!(
            register(&mut s, Some("db-host"), "s3cret"),
            CommandResult::NodeRegistered {
                id: 3,
                name: "db-host".into()
            }
        );
        // Someone took the name "n4" by hand: the default name steps around it.
        assert_eq!(
            register(&mut s, Some("n5"), "s3cret"),
            CommandResult::NodeRegistered {
                id: 4,
                name: "n5".into()
            }
        );
        assert_eq!(
            register(&mut s, None, "s3cret"),
            CommandResult::NodeRegistered {
                id: 5,
                name: "n5-2".into()
            }
        );
    }

    #[test]
    fn register_with_wrong_secret_or_taken_name_changes_nothing() {
        let mut s = initialized();
        let before = s.clone();
        assert_eq!(
            register(&mut s, None, "wrong"),
            CommandResult::Rejected(ApplyError::WrongJoinSecret)
        );
        assert_eq!(
            register(&mut s, Some("n1"), "s3cret"),
            CommandResult::Rejected(ApplyError::NameTaken { name: "n1".into() })
        );
        assert!(matches!(
            register(&mut s, Some("Bad Name"), "s3cret"),
            CommandResult::Rejected(ApplyError::InvalidName { .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn rotated_secret_refuses_the_old_one() {
        let mut s = initialized();
        assert_eq!(s.ca_holder, 1);
        assert_eq!(
            s.apply(&Command::RotateJoinSecret {
                secret: "new".into()
            }),
            CommandResult::JoinSecretRotated
        );
        assert_eq!(
            register(&mut s, None, "s3cret"),
            CommandResult::Rejected(ApplyError::WrongJoinSecret)
        );
        assert!(matches!(
            register(&mut s, None, "new"),
            CommandResult::NodeRegistered { .. }
        ));
    }

    #[test]
    fn the_state_holds_only_the_secret_hash() {
        let s = initialized();
        assert_eq!(s.join_secret_hash, hash_join_secret("s3cret"));
        assert!(is_secret_hash(&s.join_secret_hash));
        assert!(!format!("{s:?}").contains("s3cret"));
        // Domain-separated: not the plain SHA-256 of the secret.
        let plain = hex::encode(Sha256::digest(b"s3cret"));
        assert!(!s.join_secret_hash.contains(&plain));
    }

    #[test]
    fn init_with_a_hash_stores_it_as_is() {
        let mut s = ClusterState::default();
        let h = hash_join_secret("abcd");
        s.apply(&Command::InitCluster {
            cluster_id: "c1".into(),
            join_secret: h.clone(),
            node_id: 1,
            name: "n1".into(),
            addr: "127.0.0.1:7801".into(),
        });
        assert_eq!(s.join_secret_hash, h);
        // The old plaintext command and the hashed one admit the same secret.
        assert!(matches!(
            register(&mut s, None, "abcd"),
            CommandResult::NodeRegistered { id: 2, .. }
        ));
        assert!(matches!(
            s.apply(&Command::RegisterNodeHashed {
                secret_hash: h.clone(),
                name: None,
                addr: "h:2".into()
            }),
            CommandResult::NodeRegistered { id: 3, .. }
        ));
        // The hash itself is not a secret that RegisterNode accepts.
        assert_eq!(
            register(&mut s, None, &h),
            CommandResult::Rejected(ApplyError::WrongJoinSecret)
        );
    }

    #[test]
    fn hashed_register_with_wrong_hash_changes_nothing() {
        let mut s = initialized();
        let before = s.clone();
        for bad in [
            hash_join_secret("wrong"),
            String::new(),
            "sha256:".into(),
            hash_join_secret("s3cret")[..20].to_string(),
        ] {
            assert_eq!(
                s.apply(&Command::RegisterNodeHashed {
                    secret_hash: bad,
                    name: None,
                    addr: "h:2".into()
                }),
                CommandResult::Rejected(ApplyError::WrongJoinSecret)
            );
        }
        assert_eq!(s, before);
        // Before init there is no secret: nothing matches, not even the empty hash.
        assert!(!ClusterState::default().join_secret_matches(""));
    }

    #[test]
    fn set_secret_hash_rotates_and_refuses_malformed_hashes() {
        let mut s = initialized();
        let before = s.clone();
        for bad in ["s3cret", "sha256:xyz", &"A".repeat(71)] {
            assert_eq!(
                s.apply(&Command::SetJoinSecretHash {
                    secret_hash: bad.to_string()
                }),
                CommandResult::Rejected(ApplyError::InvalidSecretHash)
            );
        }
        assert_eq!(s, before);
        assert_eq!(
            s.apply(&Command::SetJoinSecretHash {
                secret_hash: hash_join_secret("new")
            }),
            CommandResult::JoinSecretRotated
        );
        assert_eq!(
            register(&mut s, None, "s3cret"),
            CommandResult::Rejected(ApplyError::WrongJoinSecret)
        );
        assert!(matches!(
            register(&mut s, None, "new"),
            CommandResult::NodeRegistered { .. }
        ));
    }

    #[test]
    fn revoke_admin_is_idempotent_and_validates_the_label() {
        let mut s = initialized();
        assert!(!s.admin_revoked("alice"));
        assert_eq!(
            s.apply(&Command::RevokeAdmin {
                label: "alice".into()
            }),
            CommandResult::AdminRevoked { already: false }
        );
        assert_eq!(
            s.apply(&Command::RevokeAdmin {
                label: "alice".into()
            }),
            CommandResult::AdminRevoked { already: true }
        );
        assert!(s.admin_revoked("alice") && !s.admin_revoked("bob"));
        let before = s.clone();
        assert!(matches!(
            s.apply(&Command::RevokeAdmin {
                label: "Not A Label".into()
            }),
            CommandResult::Rejected(ApplyError::InvalidName { .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn removed_name_can_be_reused() {
        let mut s = initialized();
        register(&mut s, Some("db"), "s3cret");
        assert_eq!(
            s.apply(&Command::RemoveNode { id: 2 }),
            CommandResult::NodeRemoved { id: 2 }
        );
        assert_eq!(
            register(&mut s, Some("db"), "s3cret"),
            CommandResult::NodeRegistered {
                id: 3,
                name: "db".into()
            }
        );
        assert_eq!(
            s.apply(&Command::RemoveNode { id: 2 }),
            CommandResult::Rejected(ApplyError::UnknownNode { id: 2 })
        );
    }

    #[test]
    fn addr_validation() {
        assert!(validate_addr("10.0.0.1:7801").is_ok());
        assert!(validate_addr("node-3.example:1").is_ok());
        assert!(validate_addr("[::1]:7801").is_ok());
        for bad in ["", "host", ":80", "host:", "host:0", "host:99999", "host:x"] {
            assert!(validate_addr(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn kv_revisions_follow_etcd() {
        let mut s = initialized();
        let put = |s: &mut ClusterState, k: &str, v: &str| match s.apply(&Command::KvPut {
            key: k.into(),
            value: v.into(),
        }) {
            CommandResult::KvPut(e) => e,
            r => panic!("{r:?}"),
        };
        let a1 = put(&mut s, "a", "1");
        assert_eq!((a1.create_revision, a1.mod_revision, a1.version), (1, 1, 1));
        put(&mut s, "b", "x");
        let a2 = put(&mut s, "a", "2");
        assert_eq!((a2.create_revision, a2.mod_revision, a2.version), (1, 3, 2));
        assert_eq!(
            s.apply(&Command::KvDelete { key: "zz".into() }),
            CommandResult::KvDeleted {
                existed: false,
                revision: 3
            }
        );
        assert_eq!(
            s.apply(&Command::KvDelete { key: "a".into() }),
            CommandResult::KvDeleted {
                existed: true,
                revision: 4
            }
        );
        let a3 = put(&mut s, "a", "3");
        assert_eq!((a3.create_revision, a3.version), (5, 1));
    }

    #[test]
    fn kv_rejects_empty_key_and_huge_value() {
        let mut s = initialized();
        let before = s.clone();
        assert!(matches!(
            s.apply(&Command::KvPut {
                key: "".into(),
                value: "v".into()
            }),
            CommandResult::Rejected(ApplyError::InvalidKey { .. })
        ));
        assert!(matches!(
            s.apply(&Command::KvCas {
                key: "k".into(),
                expect: None,
                value: "v".repeat(MAX_VALUE_LEN + 1)
            }),
            CommandResult::Rejected(ApplyError::ValueTooLarge { .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn kv_prefix_lists_only_the_prefix() {
        let mut s = initialized();
        for k in ["app/a", "app/b", "apq", "ap", "b"] {
            s.apply(&Command::KvPut {
                key: k.into(),
                value: "v".into(),
            });
        }
        let keys: Vec<_> = s.kv_prefix("app/").map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["app/a", "app/b"]);
        assert_eq!(s.kv_prefix("").count(), 5);
    }

    fn kv_command() -> impl Strategy<Value = Command> {
        let key = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
        let val = prop::sample::select(vec!["0", "1", "2"]).prop_map(String::from);
        prop_oneof![
            (key.clone(), val.clone()).prop_map(|(key, value)| Command::KvPut { key, value }),
            (key.clone(), prop::option::of(val.clone()), val)
                .prop_map(|(key, expect, value)| Command::KvCas { key, expect, value }),
            key.prop_map(|key| Command::KvDelete { key }),
        ]
    }

    proptest! {
        /// The key-value namespace behaves as a map of registers: compare it with a plain
        /// BTreeMap, and the revision grows by exactly one per change.
        #[test]
        fn kv_matches_a_plain_map(cmds in prop::collection::vec(kv_command(), 0..60)) {
            let mut s = initialized();
            let mut model: BTreeMap<String, String> = BTreeMap::new();
            for cmd in &cmds {
                let rev_before = s.revision;
                let r = s.apply(cmd);
                let changed = match (cmd, &r) {
                    (Command::KvPut { key, value }, CommandResult::KvPut(e)) => {
                        model.insert(key.clone(), value.clone());
                        prop_assert_eq!(e.mod_revision, s.revision);
                        true
                    }
                    (Command::KvCas { key, expect, value }, CommandResult::KvCas { succeeded, entry }) => {
                        let ok = model.get(key) == expect.as_ref();
                        prop_assert_eq!(ok, *succeeded);
                        if ok {
                            model.insert(key.clone(), value.clone());
                        } else {
                            prop_assert_eq!(entry.as_ref().map(|e| &e.value), model.get(key));
                        }
                        ok
                    }
                    (Command::KvDelete { key }, CommandResult::KvDeleted { existed, .. }) => {
                        prop_assert_eq!(*existed, model.remove(key).is_some());
                        *existed
                    }
                    _ => { prop_assert!(false, "unexpected result {:?} for {:?}", r, cmd); false }
                };
                prop_assert_eq!(s.revision, rev_before + changed as u64);
                let got: BTreeMap<_, _> = s.kv.iter().map(|(k, e)| (k.clone(), e.value.clone())).collect();
                prop_assert_eq!(&got, &model);
            }
        }

        /// Replaying the same commands gives the same state (what every replica relies on),
        /// and the state survives its stored encoding unchanged.
        #[test]
        fn apply_is_deterministic(cmds in prop::collection::vec(kv_command(), 0..40)) {
            let mut a = initialized();
            let mut b = initialized();
            let ra: Vec<_> = cmds.iter().map(|c| a.apply(c)).collect();
            let rb: Vec<_> = cmds.iter().map(|c| b.apply(c)).collect();
            prop_assert_eq!(ra, rb);
            prop_assert_eq!(&a, &b);
            let bytes = postcard::to_allocvec(&a).unwrap();
            let back: ClusterState = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(a, back);
        }

        /// Key-value commands leave a state `same_but_kv` as before; registering a node does not.
        #[test]
        fn kv_commands_change_only_the_kv(cmds in prop::collection::vec(kv_command(), 1..40)) {
            let before = initialized();
            let mut s = before.clone();
            for c in &cmds {
                s.apply(c);
            }
            prop_assert!(s.same_but_kv(&before) && before.same_but_kv(&s));
            register(&mut s, Some("n2"), "s3cret");
            prop_assert!(!s.same_but_kv(&before));
        }

        /// A batch applies exactly as its commands one by one.
        #[test]
        fn batch_equals_sequence(cmds in prop::collection::vec(kv_command(), 0..30)) {
            let mut one = initialized();
            let mut batch = initialized();
            let singles: Vec<_> = cmds.iter().map(|c| one.apply(c)).collect();
            let r = batch.apply(&Command::Batch(cmds.clone()));
            prop_assert_eq!(r, CommandResult::Batch(singles));
            prop_assert_eq!(one, batch);
        }

        /// Node names stay unique and ids never repeat, whatever is registered and removed.
        #[test]
        fn node_names_unique_ids_fresh(ops in prop::collection::vec((any::<bool>(), prop::option::of(prop::sample::select(vec!["n2", "n3", "db", "web"]))), 0..40)) {
            let mut s = initialized();
            let mut seen_ids = std::collections::BTreeSet::from([1]);
            for (remove, name) in ops {
                if remove {
                    if let Some(&id) = s.nodes.keys().last() {
                        s.apply(&Command::RemoveNode { id });
                    }
                } else if let CommandResult::NodeRegistered { id, .. } = register(&mut s, name, "s3cret") {
                    prop_assert!(seen_ids.insert(id), "id {} reused", id);
                }
                let mut names: Vec<_> = s.nodes.values().map(|n| n.name.clone()).collect();
                let total = names.len();
                names.sort();
                names.dedup();
                prop_assert_eq!(names.len(), total);
            }
        }
    }

    /// The namespace's persistent map is written exactly as the `BTreeMap` it replaced, so
    /// snapshots and peers of the previous build read it (issue 20).
    #[test]
    fn the_kv_map_encodes_as_the_btreemap_it_replaced() {
        let entries: Vec<(String, KvEntry)> = (0..300u64)
            .rev()
            .map(|i| {
                let key = format!("k/{i:05}");
                let e = KvEntry {
                    key: key.clone(),
                    value: "v".repeat((i % 7) as usize),
                    create_revision: i,
                    mod_revision: i + 1,
                    version: 1 + i % 3,
                };
                (key, e)
            })
            .collect();
        let persistent: KvMap = entries.iter().cloned().collect();
        let plain: BTreeMap<String, KvEntry> = entries.into_iter().collect();
        let bytes = postcard::to_allocvec(&persistent).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
        let back: KvMap = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, persistent);
        // A copy shares the map: a write to the original leaves the copy as it was.
        let mut s = ClusterState {
            kv: persistent,
            ..Default::default()
        };
        let copy = s.clone();
        s.kv_set("k/00001", "changed");
        assert_eq!(copy.kv["k/00001"].value, "v");
        assert_eq!(s.kv["k/00001"].value, "changed");
        assert_eq!(s.kv["k/00001"].version, copy.kv["k/00001"].version + 1);
    }
}
