//! What the volume plugin's calls do: a Docker volume is a flock dataset of the same name.
//!
//! - Create proposes the dataset with this node as its primary (`-o size=1G` sets its limit).
//! - Mount moves the dataset here first if it lives elsewhere (the move every `flockctl dataset
//!   move` makes: snapshot, push over QUIC, commit under epoch + 1), then records the mount
//!   under Docker's mount id through Raft and answers the dataset's path. The cluster refuses
//!   the mount while containers on another node have the dataset mounted, or an app uses it.
//!   The wait for a move is bounded below Docker's patience; past it the answer says how far
//!   the move got, and the move goes on (the next try finds it further or done). A copy that
//!   lacks the dataset's newest recorded snapshot is not mounted
//!   ([`flock_decide::copies::copy_is_current`], the apps agent's rule too).
//! - Unmount drops the mount; the dataset may move again once no container uses it.
//! - Remove deletes the dataset on every node, unless it is mounted somewhere.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use flock_decide::copies::copy_is_current;
use flock_proto::v1 as pb;
use flock_scheduler::dataset::validate_dataset_name;
use flock_scheduler::mount::MAX_MOUNT_ID_LEN;
use flock_scheduler::state::node_name;
use flock_scheduler::{ApplyError, ClusterState, Command, CommandResult, Dataset, NodeId};

use crate::cluster::{Cluster, ClusterError};
use crate::datasets::Datasets;
use flock_client::{human, parse_size};

/// How long a mount waits for its dataset to arrive. Docker's client waits two minutes for a
/// mount (one minute for the other calls), so the answer comes well before it gives up.
pub const MOUNT_WAIT: Duration = Duration::from_secs(60);
/// For tests: the environment variable that replaces [`MOUNT_WAIT`], in milliseconds.
pub const MOUNT_WAIT_ENV: &str = "FLOCK_PLUGIN_MOUNT_WAIT_MS";
/// How often a waiting mount looks again.
const POLL: Duration = Duration::from_millis(100);
/// How long a mount waits for the primary's progress report when it gives up waiting.
const REPORT_WAIT: Duration = Duration::from_secs(2);

/// The plugin's view of the cluster from this node.
pub struct Volumes {
    pub cluster: Arc<Cluster>,
    pub datasets: Arc<Datasets>,
    /// See [`MOUNT_WAIT`].
    pub mount_wait: Duration,
    /// The local engine, to tell at start which recorded mounts are stale.
    pub docker: Option<bollard::Docker>,
}

type Result<T> = std::result::Result<T, String>;

fn cluster_err(e: ClusterError) -> String {
    format!("flock: {e}")
}

fn rejected(r: CommandResult) -> String {
    match r {
        CommandResult::Rejected(e) => format!("flock: {e}"),
        other => format!("flock: unexpected answer from the cluster: {other:?}"),
    }
}

fn not_found(name: &str) -> String {
    format!("flock: no volume named {name:?} (`docker volume ls` lists them; `docker volume create -d DRIVER {name}` makes it)")
}

/// A volume name flock takes (a dataset name); the error never echoes more than a prefix.
pub fn check_name(name: &str) -> Result<()> {
    validate_dataset_name(name).map_err(|e| {
        let reason = match e {
            ApplyError::InvalidDatasetName { reason, .. } => reason,
            other => other.to_string(),
        };
        format!(
            "flock: invalid volume name {}: {reason}; a flock volume name is 1 to 40 letters, digits, '_', '.', ':' or '-'",
            super::echo(name)
        )
    })
}

/// Docker's mount id: the cluster records at most [`MAX_MOUNT_ID_LEN`] bytes, and a mount needs
/// one.
pub fn check_mount_id(call: &str, id: &str) -> Result<()> {
    if id.is_empty() && call.ends_with(".Mount") {
        return Err(format!("flock: {call} needs the caller's ID"));
    }
    if id.len() > MAX_MOUNT_ID_LEN {
        return Err(format!(
            "flock: {call}: the ID {} is longer than {MAX_MOUNT_ID_LEN} bytes",
            super::echo(id)
        ));
    }
    Ok(())
}

/// The size a Create asks for (`-o size=1G`); any other option is refused.
pub fn create_size(name: &str, opts: &BTreeMap<String, String>) -> Result<Option<u64>> {
    let unknown: Vec<String> = opts
        .keys()
        .filter(|k| *k != "size")
        .take(5)
        .map(|k| super::echo(k))
        .collect();
    if !unknown.is_empty() {
        let more = opts.keys().filter(|k| *k != "size").count() - unknown.len();
        return Err(format!(
            "flock: unknown option(s) {}{} for volume {}; flock takes: size (e.g. -o size=1G)",
            unknown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            super::echo(name)
        ));
    }
    match opts.get("size") {
        Some(s) => parse_size(s)
            .map(Some)
            .map_err(|_| {
                format!(
                    "flock: -o size: {} is not a size; write a number with an optional unit, such as 512M, 10G or 1.5T (at least 1 byte)",
                    super::echo(s)
                )
            }),
        None => Ok(None),
    }
}

impl Volumes {
    pub fn new(cluster: Arc<Cluster>, datasets: Arc<Datasets>) -> Self {
        let mount_wait = std::env::var(MOUNT_WAIT_ENV)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(MOUNT_WAIT, Duration::from_millis);
        Volumes {
            cluster,
            datasets,
            mount_wait,
            docker: None,
        }
    }

    /// At start, before the plugin answers a call: drops this node's recorded mounts of the
    /// volumes that no running container of the local engine has mounted. Their containers
    /// stopped while flockd was down (a reboot, a crash), so the engine's unmounts never came;
    /// a container that mounts a volume again is running, or starting through this plugin,
    /// which does not answer yet. How many it dropped.
    pub async fn forget_stale_mounts(&self) -> Result<usize> {
        let me = self.me();
        let mine: Vec<(flock_scheduler::DatasetId, String, String)> = self
            .cluster
            .read(false, |a| {
                let s = &a.cluster;
                s.mounts
                    .iter()
                    .flat_map(|(ds, m)| m.iter().map(move |(n, id)| (*ds, *n, id)))
                    .filter(|(_, n, _)| *n == me)
                    .filter_map(|(ds, _, id)| {
                        s.datasets
                            .get(&ds)
                            .map(|d| (ds, d.name.clone(), id.clone()))
                    })
                    .collect()
            })
            .await
            .map_err(cluster_err)?;
        if mine.is_empty() {
            return Ok(0);
        }
        let Some(docker) = &self.docker else {
            return Err("no Docker engine answers here; recorded mounts are kept".into());
        };
        let running = docker
            .list_containers(Some(bollard::container::ListContainersOptions::<String> {
                all: true,
                ..Default::default()
            }))
            .await
            .map_err(|e| format!("listing the engine's containers: {e}"))?;
        let in_use: std::collections::BTreeSet<String> = running
            .iter()
            .filter(|c| {
                matches!(
                    c.state.as_deref(),
                    Some("running" | "paused" | "restarting" | "removing")
                )
            })
            .flat_map(|c| c.mounts.iter().flatten())
            .filter(|m| m.driver.as_deref().is_some_and(|d| d != "local"))
            .filter_map(|m| m.name.clone())
            .collect();
        let mut dropped = 0;
        for (ds, name, id) in mine.into_iter().filter(|(_, n, _)| !in_use.contains(n)) {
            let cmd = Command::UnmountVolume {
                dataset: ds,
                node: me,
                id,
            };
            if let CommandResult::VolumeUnmounted { .. } =
                self.cluster.propose(cmd).await.map_err(cluster_err)?
            {
                tracing::info!(volume = %name, "dropped a mount whose container is gone");
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// The bound of every call but mount: a leader to wait for, and a commit.
    pub fn call_limit(&self) -> Duration {
        self.cluster.request_timeout * 2 + Duration::from_secs(5)
    }

    fn me(&self) -> NodeId {
        self.cluster.node_id
    }

    /// The dataset named `name`, read linearizably, with the state it was read from.
    async fn dataset(&self, name: &str) -> Result<(Dataset, ClusterState)> {
        check_name(name)?;
        let (ds, state) = self
            .cluster
            .read(false, |a| {
                (a.cluster.dataset_by_name(name).cloned(), a.cluster.clone())
            })
            .await
            .map_err(cluster_err)?;
        Ok((ds.ok_or_else(|| not_found(name))?, state))
    }

    /// `docker volume create -d flock [-o size=1G] NAME`, and every `docker run -v NAME:...` the
    /// engine has not seen yet: an existing dataset is fine, if its size agrees.
    pub async fn create(&self, name: &str, size: Option<u64>) -> Result<()> {
        check_name(name)?;
        let existing = self
            .cluster
            .read(false, |a| a.cluster.dataset_by_name(name).cloned())
            .await
            .map_err(cluster_err)?;
        if let Some(ds) = existing {
            return match size {
                Some(s) if ds.size_limit != Some(s) => Err(format!(
                    "flock: volume {name:?} exists with {}; remove it first to change its size",
                    ds.size_limit
                        .map_or_else(|| "no size limit".into(), |l| format!("size {}", human(l)))
                )),
                _ => Ok(()),
            };
        }
        let cmd = Command::CreateDataset {
            name: name.to_string(),
            primary: self.me(),
            size_limit: size,
        };
        match self.cluster.propose(cmd).await.map_err(cluster_err)? {
            CommandResult::DatasetCreated { .. } => Ok(()),
            // Created by another node's engine meanwhile.
            CommandResult::Rejected(ApplyError::DatasetExists { .. }) if size.is_none() => Ok(()),
            other => Err(rejected(other)),
        }
    }

    /// `docker volume rm NAME`: the dataset is destroyed on every node, unless a container
    /// (on any node) has it mounted. A volume already gone is fine.
    pub async fn remove(&self, name: &str) -> Result<()> {
        let ds = match self.dataset(name).await {
            Ok((ds, _)) => ds,
            Err(_) if self.known(name).is_none() => {
                check_name(name)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match self
            .cluster
            .propose(Command::DeleteDataset { dataset: ds.id })
            .await
            .map_err(cluster_err)?
        {
            CommandResult::DatasetDeleted { .. }
            | CommandResult::Rejected(ApplyError::UnknownDataset { .. }) => Ok(()),
            other => Err(rejected(other)),
        }
    }

    /// Moves the dataset here if needed, records the mount under Docker's `mount_id`, and
    /// returns the path Docker bind-mounts.
    pub async fn mount(&self, name: &str, mount_id: &str) -> Result<PathBuf> {
        check_mount_id("VolumeDriver.Mount", mount_id)?;
        let deadline = Instant::now() + self.mount_wait;
        let me = self.me();
        let mut asked_move = false;
        loop {
            let (ds, state) = self.dataset(name).await?;
            // What the cluster would refuse anyway, said before a move is started for nothing.
            if let Some((app, _)) = state.apps_of_dataset(ds.id).next() {
                return Err(format!(
                    "flock: volume {name:?} is the dataset of flock app {app:?}; flock runs that app, so Docker may not mount it"
                ));
            }
            if let Some((node, containers)) = state.mounted_on(ds.id).filter(|(n, _)| *n != me) {
                return Err(format!(
                    "flock: {}",
                    ApplyError::VolumeMounted {
                        dataset: name.to_string(),
                        node: node_name(&state, node),
                        containers,
                    }
                ));
            }
            match &ds.moving {
                Some(m) if m.to != me => {
                    return Err(format!(
                        "flock: {}",
                        ApplyError::VolumeMoving {
                            dataset: name.to_string(),
                            to: node_name(&state, m.to),
                        }
                    ))
                }
                _ => {}
            }
            if ds.primary != me {
                if ds.moving.is_none() {
                    if asked_move {
                        // Our move was given up (a target without room, a cancel).
                        return Err(format!(
                            "flock: moving volume {name:?} to {} was given up{}",
                            self.cluster.node_name,
                            self.last_error(&state, &ds).await
                        ));
                    }
                    let cmd = Command::BeginDatasetMove {
                        dataset: ds.id,
                        to: me,
                    };
                    match self.cluster.propose(cmd).await.map_err(cluster_err)? {
                        CommandResult::MoveBegun { .. } => asked_move = true,
                        other => return Err(rejected(other)),
                    }
                }
                if !self
                    .wait(deadline, |s| {
                        s.datasets
                            .get(&ds.id)
                            .is_none_or(|d| d.primary == me || d.moving.is_none())
                    })
                    .await
                {
                    return Err(self.still_moving(&ds).await);
                }
                continue;
            }
            // The primary's agent creates a new dataset's copy shortly after the commit.
            let copy = loop {
                match self.datasets.local_copy(&ds).await {
                    Ok(Some(c)) => break c,
                    Ok(None) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
                    Ok(None) => {
                        return Err(format!(
                            "flock: volume {name:?} is not created on {} yet; try again",
                            self.cluster.node_name
                        ))
                    }
                    Err(e) => return Err(format!("flock: volume {name:?}: {e}")),
                }
            };
            // As for an app: never data older than the dataset's record says it has (a copy
            // rolled back, or still short of the move's last snapshot). `ds` was read
            // linearizably, so it records every snapshot committed before this call.
            copy_is_current(&ds, copy.snapshots.iter().map(|s| s.guid))
                .map_err(|stale| format!("flock: volume {name:?}: {stale}"))?;
            let cmd = Command::MountVolume {
                dataset: ds.id,
                node: me,
                id: mount_id.to_string(),
            };
            return match self.cluster.propose(cmd).await.map_err(cluster_err)? {
                CommandResult::VolumeMounted { .. } => Ok(copy.mount_path),
                // Moved away or started moving between the read and the proposal.
                CommandResult::Rejected(
                    ApplyError::NotOnNode { .. } | ApplyError::VolumeMoving { .. },
                ) if Instant::now() < deadline => continue,
                other => Err(rejected(other)),
            };
        }
    }

    /// Waits until `done` holds for the applied state, or `deadline`; whether it held.
    async fn wait(&self, deadline: Instant, done: impl Fn(&ClusterState) -> bool) -> bool {
        loop {
            if done(&self.cluster.view.read().cluster) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The primary's report of the push of `ds`, if it answers.
    async fn transfer(&self, state: &ClusterState, ds: &Dataset) -> Option<pb::Transfer> {
        let addr = state.nodes.get(&ds.primary)?.addr.clone();
        let mut client = self.cluster.peer(ds.primary, &addr).ok()?;
        let mut req = tonic::Request::new(pb::LocalDatasetsRequest {});
        req.set_timeout(REPORT_WAIT);
        let reply = tokio::time::timeout(REPORT_WAIT, client.local_datasets(req))
            .await
            .ok()?
            .ok()?
            .into_inner();
        reply.transfers.into_iter().find(|t| t.dataset_id == ds.id)
    }

    async fn last_error(&self, state: &ClusterState, ds: &Dataset) -> String {
        match self.transfer(state, ds).await {
            Some(t) if !t.last_error.is_empty() => format!(": {}", t.last_error),
            _ => String::new(),
        }
    }

    /// Why a mount gave up waiting: how far the move got.
    async fn still_moving(&self, ds: &Dataset) -> String {
        let state = self.cluster.view.read().cluster.clone();
        let from = node_name(&state, ds.primary);
        let progress = match self.transfer(&state, ds).await {
            None => format!("no progress report from {from}"),
            Some(t) => {
                let mut p = match (t.phase.as_str(), t.total) {
                    ("full" | "incremental", 0) => format!("{} sent", human(t.bytes)),
                    ("full" | "incremental", total) => {
                        format!("{} of {} sent", human(t.bytes), human(total))
                    }
                    (phase, _) => format!("{phase} phase"),
                };
                if !t.last_error.is_empty() {
                    p.push_str(&format!(", last error: {}", t.last_error));
                }
                p
            }
        };
        format!(
            "flock: moving {} from {from}: {progress}; the move goes on, try again in a moment",
            ds.name
        )
    }

    /// Drops the mount; an unknown volume or mount is fine (Docker may repeat itself).
    pub async fn unmount(&self, name: &str, mount_id: &str) -> Result<()> {
        check_name(name)?;
        check_mount_id("VolumeDriver.Unmount", mount_id)?;
        let Some(ds) = self.known(name) else {
            return Ok(());
        };
        let cmd = Command::UnmountVolume {
            dataset: ds.id,
            node: self.me(),
            id: mount_id.to_string(),
        };
        match self.cluster.propose(cmd).await.map_err(cluster_err)? {
            CommandResult::VolumeUnmounted { .. } => Ok(()),
            other => Err(rejected(other)),
        }
    }

    /// The dataset `name` as this node's replicated state has it.
    fn known(&self, name: &str) -> Option<Dataset> {
        self.cluster
            .view
            .read()
            .cluster
            .dataset_by_name(name)
            .cloned()
    }

    /// This node's path of the dataset when it is its primary.
    async fn local_path(&self, ds: &Dataset) -> Option<PathBuf> {
        if ds.primary != self.me() {
            return None;
        }
        self.datasets
            .local_copy(ds)
            .await
            .ok()
            .flatten()
            .map(|c| c.mount_path)
    }

    /// The path of a volume mounted here; nothing when it is not.
    pub async fn path(&self, name: &str) -> Result<Option<PathBuf>> {
        check_name(name)?;
        let ds = self.known(name).ok_or_else(|| not_found(name))?;
        Ok(self.local_path(&ds).await)
    }

    /// `docker volume inspect`: the volume, with where it lives and who mounts it as Status.
    pub async fn get(&self, name: &str) -> Result<Value> {
        check_name(name)?;
        let state = self.cluster.view.read().cluster.clone();
        let ds = state
            .dataset_by_name(name)
            .cloned()
            .ok_or_else(|| not_found(name))?;
        let mut mounts: BTreeMap<String, usize> = BTreeMap::new();
        for (node, _) in state.mounts_of(ds.id) {
            *mounts.entry(node_name(&state, *node)).or_default() += 1;
        }
        let status = json!({
            "primary": node_name(&state, ds.primary),
            "epoch": ds.epoch,
            "replicas": ds.replicas.iter().map(|r| node_name(&state, *r)).collect::<Vec<_>>(),
            "size_limit": ds.size_limit,
            "moving_to": ds.moving.as_ref().map(|m| node_name(&state, m.to)),
            "mounts": mounts,
            "app": state.apps_of_dataset(ds.id).next().map(|(a, _)| a.clone()),
        });
        let mountpoint = self
            .local_path(&ds)
            .await
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(json!({ "Name": ds.name, "Mountpoint": mountpoint, "Status": status }))
    }

    /// `docker volume ls`: every dataset of the cluster (from this node's replica of the state).
    pub fn list(&self) -> Vec<Value> {
        let s = self.cluster.view.read();
        s.cluster
            .datasets
            .values()
            .map(|d| json!({ "Name": d.name }))
            .collect()
    }
}
