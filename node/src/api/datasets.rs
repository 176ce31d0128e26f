//! The dataset calls of the API: desired state through Raft, observed state from the holders.

use std::time::{Duration, Instant};

use futures::future::join_all;
use tonic::{Request, Response, Status};

use flock_proto::v1 as pb;
use flock_scheduler::dataset::validate_snapshot_name;
use flock_scheduler::state::node_name;
use flock_scheduler::{ClusterState, Command, CommandResult, Dataset, DatasetId, NodeId};

use super::{unexpected, ApiService, Reply};
use crate::cluster::ClusterError;
use crate::datasets::{blocking, DatasetGuard, LocalCopy, TransferState};

/// Metadata that marks a call one node forwarded to another (forwarded at most once).
pub(super) const FORWARDED: &str = "flock-forwarded";
/// How long `dataset ls` waits for each node's report.
const HOLDER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a rollback waits for the pushes of its dataset to end.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// How long a rollback waits for the apps it holds to stop (a database's clean shutdown).
const USERS_STOP_WAIT: Duration = Duration::from_secs(60);

/// The node named by `name` (its name or its id).
pub fn resolve_node(state: &ClusterState, name: &str) -> Result<NodeId, ClusterError> {
    if let Some(n) = state.node_by_name(name) {
        return Ok(n.id);
    }
    if let Ok(id) = name.parse::<NodeId>() {
        if state.nodes.contains_key(&id) {
            return Ok(id);
        }
    }
    let known: Vec<&str> = state.nodes.values().map(|n| n.name.as_str()).collect();
    Err(ClusterError::NotFound(format!(
        "no node named {}; the nodes are {} (`flockctl node ls`)",
        flock_scheduler::shown(name),
        known.join(", ")
    )))
}

fn find_dataset(state: &ClusterState, name: &str) -> Result<Dataset, ClusterError> {
    state.dataset_by_name(name).cloned().ok_or_else(|| {
        ClusterError::NotFound(format!(
            "no dataset named {} (`flockctl dataset ls` lists them)",
            flock_scheduler::shown(name)
        ))
    })
}

fn snapshot_proto(s: &flock_scheduler::SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        name: s.name.clone(),
        guid: s.guid,
        created_unix: s.created_unix,
        epoch: s.epoch,
    }
}

fn dataset_proto(state: &ClusterState, ds: &Dataset) -> pb::Dataset {
    pb::Dataset {
        id: ds.id,
        name: ds.name.clone(),
        size_limit: ds.size_limit,
        primary_id: ds.primary,
        primary_name: node_name(state, ds.primary),
        epoch: ds.epoch,
        replicas: ds.replicas.iter().map(|r| node_name(state, *r)).collect(),
        snapshots: ds.snapshots.iter().map(snapshot_proto).collect(),
        moving_to: ds
            .moving
            .as_ref()
            .map(|m| node_name(state, m.to))
            .unwrap_or_default(),
        holders: Vec::new(),
        transfers: Vec::new(),
        mounts: state
            .mounts_of(ds.id)
            .map(|(node, id)| pb::VolumeMount {
                node: node_name(state, *node),
                id: id.clone(),
            })
            .collect(),
        retention: ds.retention().to_string(),
        hold: ds.hold.clone().unwrap_or_default(),
        bases: ds
            .bases
            .iter()
            .map(|(n, s)| (node_name(state, *n), s.clone()))
            .collect(),
        replicas_wanted: state
            .failover
            .replication_of(ds.id)
            .map_or(0, |r| r.replicas),
        snapshot_interval_ms: state
            .failover
            .replication_of(ds.id)
            .map_or(0, |r| r.interval_ms),
        replica_lag_ms: {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            ds.bases
                .iter()
                .filter_map(|(n, b)| {
                    let rec = ds.snapshots.iter().find(|s| &s.name == b)?;
                    Some((
                        node_name(state, *n),
                        now_ms.saturating_sub(rec.created_unix.saturating_mul(1000)),
                    ))
                })
                .collect()
        },
        diverged: state
            .failover
            .diverged
            .get(&ds.id)
            .map(|m| m.keys().map(|n| node_name(state, *n)).collect())
            .unwrap_or_default(),
        kept: state
            .failover
            .kept
            .get(&ds.id)
            .into_iter()
            .flatten()
            .flat_map(|(n, snaps)| {
                snaps.iter().map(|s| pb::KeptSnapshot {
                    name: s.clone(),
                    node: node_name(state, *n),
                })
            })
            .collect(),
    }
}

fn local_proto(c: &LocalCopy) -> pb::LocalDataset {
    pb::LocalDataset {
        id: c.id,
        name: c.name.clone(),
        used_bytes: c.used_bytes,
        referenced_bytes: c.referenced_bytes,
        size_limit: c.limit,
        mount_path: c.mount_path.display().to_string(),
        snapshots: c
            .snapshots
            .iter()
            .map(|s| pb::Snapshot {
                name: s.name.to_string(),
                guid: s.guid,
                created_unix: s.created_unix,
                epoch: 0,
            })
            .collect(),
    }
}

/// `t` as the API reports it at `now`.
/// A backend's message about dataset `name` (id `id`) with the dataset named as people know it:
/// "dataset db", not "dataset db.3" (a zfs command line keeps its full names).
fn people_named(text: &str, name: &str, id: flock_scheduler::DatasetId) -> String {
    let local = flock_scheduler::dataset::local_name(name, id);
    text.replace(&format!("dataset {local}"), &format!("dataset {name}"))
}

fn transfer_proto(state: &ClusterState, t: &TransferState, now: Instant) -> pb::Transfer {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    pb::Transfer {
        dataset: t.dataset.clone(),
        dataset_id: t.id,
        to_node: node_name(state, t.to),
        phase: t.phase.to_string(),
        bytes: t.bytes,
        total: t.total.unwrap_or(0),
        bytes_per_sec: t.rate_at(now),
        last_error: t
            .last_error
            .as_deref()
            .map(|e| people_named(e, &t.dataset, t.id))
            .unwrap_or_default(),
        attempt: t.attempt,
        retry_in_ms: t.retry_at.map(|at| ms(at.saturating_duration_since(now))),
        degraded: t
            .degraded
            .as_deref()
            .map(|e| people_named(e, &t.dataset, t.id))
            .unwrap_or_default(),
        // Rounded up: "0 s left" while bytes remain would be wrong.
        eta_secs: t
            .eta_at(now)
            .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
        kind: t.kind.as_str().to_string(),
        attempt_elapsed_ms: ms(now.saturating_duration_since(t.attempt_started)),
    }
}

fn rejected(r: CommandResult) -> Status {
    match r {
        CommandResult::Rejected(e) => ClusterError::from(e).into(),
        other => unexpected(other),
    }
}

impl ApiService {
    async fn local_report(&self) -> pb::LocalDatasetsReply {
        let datasets = &self.datasets;
        let state = self.cluster.view.read().cluster.clone();
        let now = Instant::now();
        let transfers = datasets
            .transfers()
            .iter()
            .map(|t| transfer_proto(&state, t, now))
            .collect();
        let space_sharing = blocking(&datasets.backend, |b| b.space_sharing())
            .await
            .map(|s| s.as_str().to_string())
            .unwrap_or_default();
        match datasets.local().await {
            Ok(copies) => pb::LocalDatasetsReply {
                backend: datasets.backend.kind().to_string(),
                datasets: copies.iter().map(local_proto).collect(),
                transfers,
                error: String::new(),
                space_sharing,
            },
            Err(e) => pb::LocalDatasetsReply {
                backend: datasets.backend.kind().to_string(),
                datasets: Vec::new(),
                transfers,
                error: e.to_string(),
                space_sharing,
            },
        }
    }

    /// Each node's report, `None` for nodes that did not answer in time.
    pub(super) async fn reports(
        &self,
        nodes: &[(NodeId, String)],
    ) -> Vec<(NodeId, Option<pb::LocalDatasetsReply>)> {
        join_all(nodes.iter().map(|(id, addr)| async move {
            if *id == self.cluster.node_id {
                return (*id, Some(self.local_report().await));
            }
            let Ok(mut client) = self.cluster.peer(*id, addr) else {
                return (*id, None);
            };
            let mut req = Request::new(pb::LocalDatasetsRequest {});
            req.set_timeout(HOLDER_TIMEOUT);
            let r = tokio::time::timeout(HOLDER_TIMEOUT, client.local_datasets(req)).await;
            (*id, r.ok().and_then(|r| r.ok()).map(|r| r.into_inner()))
        }))
        .await
    }

    pub(super) async fn do_local_datasets(
        &self,
        req: Request<pb::LocalDatasetsRequest>,
    ) -> Reply<pb::LocalDatasetsReply> {
        self.authorize(&req)?;
        Ok(Response::new(self.local_report().await))
    }

    pub(super) async fn do_dataset_create(
        &self,
        req: Request<pb::DatasetCreateRequest>,
    ) -> Reply<pb::DatasetCreateReply> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let primary = if req.node.is_empty() {
            self.cluster.node_id
        } else {
            self.cluster
                .read(false, |a| resolve_node(&a.cluster, &req.node))
                .await??
        };
        let cmd = Command::CreateDataset {
            name: req.name.clone(),
            primary,
            size_limit: req.size_limit,
        };
        let id = match self.cluster.propose(cmd).await? {
            CommandResult::DatasetCreated { id } => id,
            other => return Err(rejected(other)),
        };
        // Wait (briefly) for the primary to create it, so that it is usable on return.
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = self
            .cluster
            .view
            .read()
            .cluster
            .nodes
            .get(&primary)
            .map(|n| n.addr.clone());
        while let Some(addr) = &addr {
            let reports = self.reports(&[(primary, addr.clone())]).await;
            let ready = reports[0]
                .1
                .as_ref()
                .is_some_and(|r| r.datasets.iter().any(|d| d.id == id));
            if ready || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let dataset = self.cluster.read(true, |a| {
            a.cluster
                .datasets
                .get(&id)
                .map(|d| dataset_proto(&a.cluster, d))
        });
        Ok(Response::new(pb::DatasetCreateReply {
            dataset: dataset.await?,
        }))
    }

    pub(super) async fn do_dataset_list(
        &self,
        req: Request<pb::DatasetListRequest>,
    ) -> Reply<pb::DatasetListReply> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let (state, wanted) = self
            .cluster
            .read(false, |a| {
                let wanted = if req.name.is_empty() {
                    Ok(a.cluster.datasets.values().cloned().collect::<Vec<_>>())
                } else {
                    find_dataset(&a.cluster, &req.name).map(|d| vec![d])
                };
                (a.cluster.clone(), wanted)
            })
            .await?;
        let wanted = wanted?;
        let mut out: Vec<pb::Dataset> = wanted.iter().map(|d| dataset_proto(&state, d)).collect();
        if req.desired_only || wanted.is_empty() {
            return Ok(Response::new(pb::DatasetListReply { datasets: out }));
        }
        let nodes: Vec<(NodeId, String)> = state
            .nodes
            .values()
            .map(|n| (n.id, n.addr.clone()))
            .collect();
        let reports = self.reports(&nodes).await;
        for (ds, p) in wanted.iter().zip(out.iter_mut()) {
            for h in ds.holders() {
                let role = if h == ds.primary {
                    "primary"
                } else if ds.replicas.contains(&h) {
                    "replica"
                } else {
                    "target"
                };
                let mut holder = pb::Holder {
                    node_id: h,
                    node_name: node_name(&state, h),
                    role: role.into(),
                    ..Default::default()
                };
                match reports
                    .iter()
                    .find(|(id, _)| *id == h)
                    .and_then(|(_, r)| r.as_ref())
                {
                    None => holder.state = "unreachable".into(),
                    Some(r) if !r.error.is_empty() => {
                        holder.state = "error".into();
                        holder.error = r.error.clone();
                    }
                    Some(r) => match r.datasets.iter().find(|d| d.id == ds.id) {
                        Some(d) => {
                            holder.state = "ready".into();
                            holder.used_bytes = d.used_bytes;
                            holder.referenced_bytes = d.referenced_bytes;
                            holder.size_limit = d.size_limit;
                            holder.space_sharing = r.space_sharing.clone();
                            holder.snapshot_count =
                                u32::try_from(d.snapshots.len()).unwrap_or(u32::MAX);
                            holder.mount_path = d.mount_path.clone();
                            holder.latest_snapshot = d
                                .snapshots
                                .last()
                                .map(|s| s.name.clone())
                                .unwrap_or_default();
                        }
                        None => holder.state = "missing".into(),
                    },
                }
                p.holders.push(holder);
            }
            if let Some((_, Some(r))) = reports.iter().find(|(id, _)| *id == ds.primary) {
                p.transfers = r
                    .transfers
                    .iter()
                    .filter(|t| t.dataset_id == ds.id)
                    .cloned()
                    .collect();
            }
        }
        Ok(Response::new(pb::DatasetListReply { datasets: out }))
    }

    /// For the calls the primary carries out: the dataset named `name`, with its lock held on
    /// this node, when this node is its primary; otherwise the request marked as forwarded and
    /// the primary's address to send it to (an error if it was forwarded already).
    async fn on_primary<T>(
        &self,
        req: Request<T>,
        name: &str,
        exclusive: bool,
    ) -> Result<Result<(Dataset, DatasetGuard), (Request<T>, NodeId, String)>, Status> {
        let ds = self
            .cluster
            .read(false, |a| find_dataset(&a.cluster, name))
            .await??;
        if ds.primary != self.cluster.node_id {
            if req.metadata().contains_key(FORWARDED) {
                return Err(Status::unavailable(format!(
                    "node {} is not the primary of {name} here; try again",
                    self.cluster.node_name
                )));
            }
            let addr = self
                .cluster
                .view
                .read()
                .cluster
                .nodes
                .get(&ds.primary)
                .map(|n| n.addr.clone())
                .ok_or_else(|| Status::unavailable("the dataset's primary is not a member"))?;
            let mut fwd = Request::new(req.into_inner());
            fwd.metadata_mut()
                .insert(FORWARDED, "1".parse().expect("ascii"));
            return Ok(Err((fwd, ds.primary, addr)));
        }
        // A rollback waits for pushes of the dataset to end, but not forever.
        let guard = if exclusive {
            tokio::time::timeout(LOCK_WAIT, self.datasets.lock(ds.id))
                .await
                .map_err(|_| {
                    Status::unavailable(format!(
                        "{name} is busy (a push to another node is running, `flockctl dataset ls {name}` shows it); try again"
                    ))
                })?
        } else {
            self.datasets.share(ds.id).await
        };
        // The state may have moved on while this waited for the lock.
        let ds = self
            .cluster
            .read(true, |a| find_dataset(&a.cluster, name))
            .await??;
        if ds.primary != self.cluster.node_id {
            return Err(Status::unavailable(format!(
                "{name} moved to another node; try again"
            )));
        }
        Ok(Ok((ds, guard)))
    }

    pub(super) async fn do_dataset_snapshot(
        &self,
        req: Request<pb::DatasetSnapshotRequest>,
    ) -> Reply<pb::DatasetSnapshotReply> {
        self.authorize(&req)?;
        let name = req.get_ref().name.clone();
        let tag = req.get_ref().tag.clone();
        if !tag.is_empty() {
            validate_snapshot_name(&tag).map_err(ClusterError::from)?;
            if flock_scheduler::retention::is_automatic(&tag) {
                return Err(Status::invalid_argument(format!(
                    "snapshot names starting with {} are flock's own, which retention prunes; choose another --tag",
                    flock_scheduler::retention::AUTOMATIC_PREFIXES.join(" or ")
                )));
            }
        }
        let (ds, _guard) = match self.on_primary(req, &name, false).await? {
            Ok(locked) => locked,
            Err((fwd, id, addr)) => {
                return self.cluster.peer(id, &addr)?.dataset_snapshot(fwd).await
            }
        };
        let datasets = &self.datasets;
        if ds.snapshots.iter().any(|s| s.name == tag) {
            return Err(
                ClusterError::from(flock_scheduler::ApplyError::SnapshotExists {
                    dataset: name,
                    snapshot: tag,
                })
                .into(),
            );
        }
        if datasets
            .local_copy(&ds)
            .await
            .map_err(|e| ds_err(e.naming(&ds.name)))?
            .is_none()
        {
            return Err(Status::unavailable(format!(
                "the primary {} has not created {name} yet; try again in a moment",
                self.cluster.node_name
            )));
        }
        use crate::datasets::record::RecordError;
        match datasets
            .snapshot_and_record(
                &self.cluster,
                &ds,
                (!tag.is_empty()).then_some(tag.as_str()),
            )
            .await
        {
            Ok(record) => Ok(Response::new(pb::DatasetSnapshotReply {
                snapshot: Some(snapshot_proto(&record)),
            })),
            Err(RecordError::Snapshot(e)) => Err(ds_err(e.naming(&ds.name))),
            Err(RecordError::Refused(e)) => Err(ClusterError::from(e).into()),
            Err(RecordError::Unexpected(other)) => Err(unexpected(other)),
            Err(RecordError::Unknown(e)) => Err(e.into()),
        }
    }

    pub(super) async fn do_dataset_rollback(
        &self,
        req: Request<pb::DatasetRollbackRequest>,
    ) -> Reply<pb::DatasetRollbackReply> {
        self.authorize(&req)?;
        let name = req.get_ref().name.clone();
        let to = req.get_ref().snapshot.clone();
        let stop_app = req.get_ref().stop_app;
        let (ds, _guard) = match self.on_primary(req, &name, true).await? {
            Ok(locked) => locked,
            Err((fwd, id, addr)) => {
                return self.cluster.peer(id, &addr)?.dataset_rollback(fwd).await
            }
        };
        if !ds.snapshots.iter().any(|s| s.name == to) {
            return Err(Status::not_found(format!(
                "{name} has no snapshot {}; `flockctl dataset snapshots {name}` lists them",
                flock_scheduler::shown(&to)
            )));
        }
        let state = self.cluster.view.read().cluster.clone();
        let plan = flock_decide::rollback::plan(&state, &ds, &to, stop_app)
            .map_err(Status::failed_precondition)?;
        // No stale-hold release while this runs (see `Datasets::holding`).
        let _holding = self.datasets.holding(ds.id);
        if plan.holds() {
            let cmd = Command::HoldDataset {
                dataset: ds.id,
                epoch: ds.epoch,
                reason: format!("rollback to {to}"),
            };
            match self.cluster.propose(cmd).await? {
                CommandResult::DatasetHeld => {}
                other => return Err(rejected(other)),
            }
            tracing::info!(dataset = %name, snapshot = %to, apps = ?plan.users, "holding the dataset's apps stopped for a rollback");
        }
        let r = self.rollback_held(&ds, &to, &plan).await;
        if plan.holds() {
            match self
                .cluster
                .propose(Command::ReleaseDataset { dataset: ds.id })
                .await
            {
                Ok(CommandResult::DatasetReleased { .. }) => {}
                // The agent releases a hold no operation holds, once `_holding` is gone.
                other => {
                    tracing::warn!(dataset = %name, result = ?other, "cannot release the rollback's hold; the agent retries")
                }
            }
        }
        let kept = r?;
        tracing::info!(dataset = %name, snapshot = %to, kept = %kept, "rolled back");
        Ok(Response::new(pb::DatasetRollbackReply {
            dropped: 0,
            kept,
            stopped_apps: plan.users.into_iter().map(|(n, _)| n).collect(),
        }))
    }

    /// The rollback of `ds` (primary here, locked) to `to` once its hold (if `plan` holds) is
    /// recorded: waits for its apps to stop, keeps the state before as a snapshot, restores.
    /// The name of the kept snapshot.
    async fn rollback_held(
        &self,
        ds: &Dataset,
        to: &str,
        plan: &flock_decide::rollback::RollbackPlan,
    ) -> Result<String, Status> {
        // Held from the check until the restore is done: no start of its apps behind it.
        let _gate = self.datasets.start_gate(ds.id).await;
        if plan.holds() {
            let deadline = Instant::now() + USERS_STOP_WAIT;
            loop {
                let seen = crate::datasets::agent::instances_seen(self.drivers.list().await);
                match flock_decide::moves::users_stopped(&plan.users, &seen) {
                    Ok(()) => break,
                    Err(why) if Instant::now() >= deadline => {
                        return Err(Status::deadline_exceeded(format!(
                            "the apps of {} did not stop within {}s ({why}); nothing was rolled back",
                            ds.name,
                            USERS_STOP_WAIT.as_secs()
                        )))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        // The state before, kept: rolling back to it undoes this rollback.
        let ds = self
            .cluster
            .read(true, |a| a.cluster.datasets.get(&ds.id).cloned())
            .await?
            .ok_or_else(|| Status::not_found(format!("{} was removed", ds.name)))?;
        let tag = flock_decide::rollback::pre_rollback_name(&crate::datasets::time_name(
            std::time::SystemTime::now(),
        ));
        use crate::datasets::record::RecordError;
        let kept = match self
            .datasets
            .snapshot_and_record(&self.cluster, &ds, Some(&tag))
            .await
        {
            Ok(r) => r.name,
            Err(RecordError::Snapshot(e)) => return Err(ds_err(e.naming(&ds.name))),
            Err(RecordError::Refused(e)) => return Err(ClusterError::from(e).into()),
            Err(RecordError::Unexpected(other)) => return Err(unexpected(other)),
            Err(RecordError::Unknown(e)) => return Err(e.into()),
        };
        let backend_name = crate::datasets::backend_name(&ds).map_err(ds_err)?;
        let snap = flock_dataset::SnapshotName::new(to.to_string()).map_err(ds_err)?;
        blocking(&self.datasets.backend, move |b| {
            b.restore(&backend_name, &snap)
        })
        .await
        .map_err(|e| {
            Status::internal(format!(
                "restoring {}: {}; its state before is kept as snapshot {kept}",
                ds.name,
                e.naming(&ds.name)
            ))
        })?;
        Ok(kept)
    }

    pub(super) async fn do_dataset_set(
        &self,
        req: Request<pb::DatasetSetRequest>,
    ) -> Reply<pb::DatasetSetReply> {
        self.authorize(&req)?;
        let r = req.get_ref();
        let name = r.name.clone();
        if r.clear_limit && r.size_limit.is_some() {
            return Err(Status::invalid_argument(
                "give a size limit or clear it, not both",
            ));
        }
        let retention = match r.retention.as_str() {
            "" => None,
            "default" => Some(None),
            text => {
                let parsed: flock_scheduler::Retention = text.parse().map_err(|e| {
                    Status::invalid_argument(format!(
                        "retention {}: {e}",
                        flock_scheduler::shown(text)
                    ))
                })?;
                Some(Some(parsed))
            }
        };
        let interval = match r.snapshot_interval.as_str() {
            "" => None,
            text => Some(
                flock_scheduler::config::interval_ms(text)
                    .map_err(|e| Status::invalid_argument(format!("--interval: {e}")))?,
            ),
        };
        if let Some(n) = r.replicas {
            if n > flock_scheduler::failover::MAX_REPLICAS {
                return Err(Status::invalid_argument(format!(
                    "--replicas {n}: at most {}",
                    flock_scheduler::failover::MAX_REPLICAS
                )));
            }
        }
        let req_replication = (r.replicas, interval);
        let limit = match (r.clear_limit, r.size_limit) {
            (true, _) => Some(None),
            (false, Some(l)) => Some(Some(l)),
            (false, None) => None,
        };
        if let Some(Some(l)) = limit {
            let cmd = Command::SetDatasetLimit {
                dataset: 0,
                size_limit: Some(l),
            };
            cmd.check_limits().map_err(ClusterError::from)?;
        }
        let ds = if let Some(limit) = limit {
            // The primary checks the limit against its live data and applies it to its copy
            // first: a limit below use is refused before anything is proposed.
            let (ds, _guard) = match self.on_primary(req, &name, false).await? {
                Ok(locked) => locked,
                Err((fwd, id, addr)) => {
                    return self.cluster.peer(id, &addr)?.dataset_set(fwd).await
                }
            };
            if self
                .datasets
                .local_copy(&ds)
                .await
                .map_err(|e| ds_err(e.naming(&ds.name)))?
                .is_none()
            {
                return Err(Status::unavailable(format!(
                    "the primary {} has not created {name} yet; try again in a moment",
                    self.cluster.node_name
                )));
            }
            let backend_name = crate::datasets::backend_name(&ds).map_err(ds_err)?;
            blocking(&self.datasets.backend, move |b| {
                b.set_limit(&backend_name, limit)
            })
            .await
            .map_err(|e| match e {
                flock_dataset::DatasetError::LimitBelowUse { limit, used, .. } => {
                    Status::failed_precondition(format!(
                        "{name} holds {} of data ({used} bytes), more than a limit of {}: delete data first or set a limit of at least {used} bytes",
                        flock_client::human(used),
                        flock_client::human(limit)
                    ))
                }
                other => ds_err(other.naming(&name)),
            })?;
            let cmd = Command::SetDatasetLimit {
                dataset: ds.id,
                size_limit: limit,
            };
            match self.cluster.propose(cmd).await? {
                CommandResult::DatasetLimitSet => {}
                other => return Err(rejected(other)),
            }
            ds
        } else {
            self.cluster
                .read(false, |a| find_dataset(&a.cluster, &name))
                .await??
        };
        if let Some(retention) = retention {
            let cmd = Command::SetRetention {
                dataset: ds.id,
                retention,
            };
            cmd.check_limits().map_err(ClusterError::from)?;
            match self.cluster.propose(cmd).await? {
                CommandResult::RetentionSet => {}
                other => return Err(rejected(other)),
            }
        }
        let r = req_replication;
        if r.0.is_some() || r.1.is_some() {
            let current = self
                .cluster
                .read(false, |a| a.cluster.failover.replication_of(ds.id))
                .await?;
            let replicas = r.0.or(current.map(|c| c.replicas)).unwrap_or(0);
            let interval_ms =
                r.1.or(current.map(|c| c.interval_ms))
                    .unwrap_or(flock_scheduler::failover::DEFAULT_INTERVAL_MS);
            let replication = (replicas > 0).then_some(flock_scheduler::failover::Replication {
                replicas,
                interval_ms,
            });
            match self
                .cluster
                .propose(Command::SetReplication {
                    dataset: ds.id,
                    replication,
                })
                .await?
            {
                CommandResult::ReplicationSet => {}
                other => return Err(rejected(other)),
            }
        }
        let dataset = self.dataset_now(ds.id).await?;
        Ok(Response::new(pb::DatasetSetReply { dataset }))
    }

    /// Dataset `id` as the API reports it (its holders aside), on a linearizable read.
    async fn dataset_now(&self, id: DatasetId) -> Result<Option<pb::Dataset>, Status> {
        let d = self.cluster.read(true, |a| {
            a.cluster
                .datasets
                .get(&id)
                .map(|d| dataset_proto(&a.cluster, d))
        });
        Ok(d.await?)
    }

    pub(super) async fn do_dataset_snapshot_remove(
        &self,
        req: Request<pb::DatasetSnapshotRemoveRequest>,
    ) -> Reply<pb::DatasetSnapshotRemoveReply> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let ds = self
            .cluster
            .read(false, |a| find_dataset(&a.cluster, &req.name))
            .await??;
        // Diverged writes a node keeps (a failover left them there) are not in the dataset's
        // history: removing them is the node's to do once the record is gone.
        let keepers = {
            let s = self.cluster.view.read();
            s.cluster.failover.kept_on(ds.id, &req.snapshot)
        };
        if !keepers.is_empty() && !ds.snapshots.iter().any(|r| r.name == req.snapshot) {
            for node in keepers {
                let cmd = Command::DropKept {
                    dataset: ds.id,
                    node,
                    snapshot: req.snapshot.clone(),
                };
                cmd.check_limits().map_err(ClusterError::from)?;
                match self.cluster.propose(cmd).await? {
                    CommandResult::KeptDropped => {}
                    other => return Err(rejected(other)),
                }
            }
            return Ok(Response::new(pb::DatasetSnapshotRemoveReply {}));
        }
        let cmd = Command::PruneSnapshots {
            dataset: ds.id,
            epoch: ds.epoch,
            names: vec![req.snapshot],
        };
        cmd.check_limits().map_err(ClusterError::from)?;
        match self.cluster.propose(cmd).await? {
            CommandResult::SnapshotsPruned { .. } => {
                Ok(Response::new(pb::DatasetSnapshotRemoveReply {}))
            }
            other => Err(rejected(other)),
        }
    }

    pub(super) async fn do_dataset_remove(
        &self,
        req: Request<pb::DatasetRemoveRequest>,
    ) -> Reply<pb::DatasetRemoveReply> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let ds = self
            .cluster
            .read(false, |a| find_dataset(&a.cluster, &req.name))
            .await??;
        let holders = match self
            .cluster
            .propose(Command::DeleteDataset { dataset: ds.id })
            .await?
        {
            CommandResult::DatasetDeleted { holders } => holders,
            other => return Err(rejected(other)),
        };
        let wait = if req.wait_ms == 0 {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(req.wait_ms)
        };
        let deadline = Instant::now() + wait;
        let nodes: Vec<(NodeId, String)> = {
            let s = self.cluster.view.read();
            holders
                .iter()
                .filter_map(|h| s.cluster.nodes.get(h).map(|n| (n.id, n.addr.clone())))
                .collect()
        };
        loop {
            let pending: Vec<NodeId> = self
                .reports(&nodes)
                .await
                .into_iter()
                .filter(|(_, r)| {
                    r.as_ref()
                        .is_none_or(|r| r.datasets.iter().any(|d| d.id == ds.id))
                })
                .map(|(id, _)| id)
                .collect();
            if pending.is_empty() || Instant::now() >= deadline {
                let s = self.cluster.view.read();
                return Ok(Response::new(pb::DatasetRemoveReply {
                    pending: pending
                        .iter()
                        .map(|id| node_name(&s.cluster, *id))
                        .collect(),
                }));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(super) async fn do_dataset_move(
        &self,
        req: Request<pb::DatasetMoveRequest>,
    ) -> Reply<pb::DatasetMoveReply> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let (ds, to) = self
            .cluster
            .read(false, |a| -> Result<_, ClusterError> {
                let ds = find_dataset(&a.cluster, &req.name)?;
                let to = if req.cancel {
                    None
                } else {
                    Some(resolve_node(&a.cluster, &req.to)?)
                };
                Ok((ds, to))
            })
            .await??;
        let cmd = match to {
            None => Command::CancelDatasetMove { dataset: ds.id },
            Some(to) => Command::BeginDatasetMove { dataset: ds.id, to },
        };
        match self.cluster.propose(cmd).await? {
            CommandResult::MoveBegun { .. } | CommandResult::MoveCancelled { .. } => {}
            other => return Err(rejected(other)),
        }
        let dataset = self.dataset_now(ds.id).await?;
        Ok(Response::new(pb::DatasetMoveReply { dataset }))
    }
}

impl ApiService {
    /// `flockctl dataset unmount NAME --force`: forgets Docker's mounts of the dataset, for
    /// containers that are gone without unmounting (their node died).
    pub(super) async fn do_dataset_unmount(
        &self,
        req: Request<pb::DatasetUnmountRequest>,
    ) -> Reply<pb::DatasetUnmountReply> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let (ds, node) = self
            .cluster
            .read(false, |a| -> Result<_, ClusterError> {
                let ds = find_dataset(&a.cluster, &req.name)?;
                let node = if req.node.is_empty() {
                    None
                } else {
                    Some(resolve_node(&a.cluster, &req.node)?)
                };
                Ok((ds, node))
            })
            .await??;
        match self
            .cluster
            .propose(Command::ForgetMounts {
                dataset: ds.id,
                node,
            })
            .await?
        {
            CommandResult::MountsForgotten { dropped } => {
                Ok(Response::new(pb::DatasetUnmountReply {
                    dropped: dropped as u64,
                }))
            }
            other => Err(rejected(other)),
        }
    }
}

fn ds_err(e: flock_dataset::DatasetError) -> Status {
    use flock_dataset::DatasetError as E;
    let msg = e.to_string();
    match e {
        E::NotFound { .. } | E::SnapshotNotFound { .. } => Status::not_found(msg),
        E::AlreadyExists { .. } | E::SnapshotExists { .. } => Status::already_exists(msg),
        E::InvalidName { .. } => Status::invalid_argument(msg),
        E::NoSpace { .. } => Status::resource_exhausted(msg),
        E::LimitBelowUse { .. } => Status::failed_precondition(msg),
        _ => Status::internal(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::TransferKind;
    use flock_decide::moves::MovePhase;

    #[test]
    fn a_push_error_names_the_dataset_as_people_know_it() {
        assert_eq!(
            people_named(
                "sending dataset db.3 failed: `zfs send tank/flock/db.3@a` broke off",
                "db",
                3
            ),
            "sending dataset db failed: `zfs send tank/flock/db.3@a` broke off"
        );
    }

    #[test]
    fn a_transfer_reports_its_attempt_retry_and_eta() {
        let t0 = Instant::now();
        let mut t = TransferState::new(
            TransferKind::Replica,
            "db".into(),
            7,
            3,
            MovePhase::Full,
            t0,
        );
        t.new_attempt(4, t0 + Duration::from_secs(10));
        t.total = Some(10_000_000);
        t.set_bytes(3_000_000, t0 + Duration::from_secs(12));
        let now = t0 + Duration::from_secs(12);
        let p = transfer_proto(&ClusterState::default(), &t, now);
        assert_eq!(
            (p.kind.as_str(), p.attempt, p.to_node.as_str()),
            ("replica", 4, "node-3")
        );
        assert_eq!(p.attempt_elapsed_ms, 2000);
        assert_eq!(p.bytes_per_sec, 1_500_000.0);
        // 7 MB left at 1.5 MB/s: 4.67 s, shown as 5.
        assert_eq!(p.eta_secs, Some(5));
        assert_eq!((p.retry_in_ms, p.degraded.as_str()), (None, ""));
        // Failed for lack of room: degraded, retried in a minute, no rate or ETA.
        t.phase = MovePhase::Retrying;
        t.last_error = Some("no space left on n3".into());
        t.degraded = Some("no space left on n3".into());
        t.retry_at = Some(now + Duration::from_secs(60));
        let p = transfer_proto(&ClusterState::default(), &t, now);
        assert_eq!(p.retry_in_ms, Some(60_000));
        assert_eq!(p.degraded, "no space left on n3");
        assert_eq!((p.bytes_per_sec, p.eta_secs), (0.0, None));
        // A retry time passed: zero, not a wrapped-around number.
        let p = transfer_proto(&ClusterState::default(), &t, now + Duration::from_secs(90));
        assert_eq!(p.retry_in_ms, Some(0));
    }
}
