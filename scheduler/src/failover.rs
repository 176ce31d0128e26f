//! Failover in the desired state: replication settings, nodes declared down, the failover of
//! their datasets and apps, and the copies a failover left behind.
//!
//! A node is declared down by a committed [`Command::DeclareNodeDown`], which the leader proposes
//! only after the node's lease has run out plus a margin for clock drift (see flock-decide's
//! `lease` module), or an operator who knows the machine is dead (`flockctl node down`). Applying
//! it fails every dataset the node was primary of over to the replica holding the newest recorded
//! snapshot among those where the dataset's apps fit, under epoch + 1, in the same step: a
//! leader lost in the middle leaves either nothing or the whole failover recorded.
//!
//! The snapshots recorded after the new primary's base are forgotten: only the old primary held
//! them. The old primary's copy is recorded as diverged ([`Failover::diverged`]): it is never
//! served (it is not primary) and never destroyed, until the returning node has kept its
//! writes as a named snapshot and rolled back ([`Command::KeepDiverged`]); then it is a replica.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::dataset::DatasetId;
use crate::fit::{misfit, Reserved};
use crate::state::{ApplyError, ClusterState, CommandResult, NodeId, NodeState};

/// The most failover events the state keeps (the oldest go first).
pub const MAX_EVENTS: usize = 256;
/// The most replicas a dataset may ask for.
pub const MAX_REPLICAS: u32 = 8;
/// The shortest snapshot interval, in milliseconds.
pub const MIN_INTERVAL_MS: u64 = 200;
/// The longest snapshot interval, in milliseconds (a day).
pub const MAX_INTERVAL_MS: u64 = 86_400_000;
/// The snapshot interval of a dataset that asks for replicas without saying how often.
pub const DEFAULT_INTERVAL_MS: u64 = 2_000;
/// The prefix of the snapshots a returning node keeps its diverged writes in.
pub const DIVERGED_PREFIX: &str = "diverged-";

/// What the cluster knows about replication and failures, beyond the datasets themselves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    /// Per dataset, the replicas it asks for and how often its primary snapshots.
    pub replication: BTreeMap<DatasetId, Replication>,
    /// Nodes declared down, and when.
    pub down: BTreeMap<NodeId, DownRecord>,
    /// Per dataset, the nodes that were its primary when a failover took it away: their copies
    /// may hold writes the new primary lacks. Never served, never destroyed while listed.
    pub diverged: BTreeMap<DatasetId, BTreeMap<NodeId, Diverged>>,
    /// Per dataset and node, the snapshots a returning node kept its diverged writes in:
    /// never pruned, removed only by an operator.
    pub kept: BTreeMap<DatasetId, BTreeMap<NodeId, BTreeSet<String>>>,
    /// Recent events, oldest first, at most [`MAX_EVENTS`].
    pub events: VecDeque<Event>,
    /// The id the next event gets.
    pub next_event: u64,
    /// Nodes an operator declared dead (`flockctl node down`): the leader renews their leases
    /// no more and declares them down once the last lease it granted has run out.
    pub condemned: BTreeSet<NodeId>,
}

/// How a dataset is replicated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// Copies kept on other nodes than the primary.
    pub replicas: u32,
    /// How often the primary snapshots and pushes to them, in milliseconds.
    pub interval_ms: u64,
}

impl Replication {
    pub fn validate(&self) -> Result<(), ApplyError> {
        if self.replicas > MAX_REPLICAS {
            return Err(ApplyError::InvalidReplication {
                reason: format!(
                    "replicas {} is more than the most a dataset may ask for ({MAX_REPLICAS})",
                    self.replicas
                ),
            });
        }
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(ApplyError::InvalidReplication {
                reason: format!(
                    "snapshot interval {} ms is outside {MIN_INTERVAL_MS} ms to one day",
                    self.interval_ms
                ),
            });
        }
        Ok(())
    }
}

/// A node declared down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownRecord {
    /// When the leader last heard from it (ms since the Unix epoch, on the leader's clock).
    pub last_heard_unix_ms: u64,
    /// When it was declared down.
    pub declared_unix_ms: u64,
    /// Declared by an operator (`flockctl node down`), not by the leader's lease check.
    pub by_operator: bool,
}

/// A copy a failover left on its old primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diverged {
    /// The epoch the node was primary under.
    pub epoch: u64,
    /// The newest recorded snapshot the new primary held then: the copy rolls back to it.
    pub common: Option<String>,
}

/// Something that happened to a node or a dataset, for `flockctl events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: u64,
    pub at_unix_ms: u64,
    pub what: EventKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    NodeDown {
        node: NodeId,
        last_heard_unix_ms: u64,
        by_operator: bool,
    },
    NodeUp {
        node: NodeId,
    },
    /// A dataset (and its apps) failed over from `from` to `to`.
    FailedOver {
        dataset: String,
        apps: Vec<String>,
        from: NodeId,
        to: NodeId,
        epoch: u64,
        /// The snapshot it starts from, and when it was taken (s since the Unix epoch).
        snapshot: Option<String>,
        snapshot_unix: Option<u64>,
        /// Writes in this window, between the snapshot and the last time the old primary was
        /// heard from, may be lost (ms).
        at_risk_ms: u64,
    },
    /// A dataset of a down node has no replica to fail over to.
    NoReplica {
        dataset: String,
        node: NodeId,
        reason: String,
    },
    /// A stateless app of a down node was placed elsewhere.
    Replaced {
        app: String,
        from: NodeId,
        to: NodeId,
    },
    /// A returning node kept its diverged writes in `snapshot`, or (`None`) an operator gave
    /// them up; either way it became a replica.
    DivergedKept {
        dataset: String,
        node: NodeId,
        snapshot: Option<String>,
    },
}

impl Failover {
    fn push(&mut self, at_unix_ms: u64, what: EventKind) {
        self.events.push_back(Event {
            id: self.next_event,
            at_unix_ms,
            what,
        });
        self.next_event += 1;
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// The replication a dataset asks for (none by default).
    pub fn replication_of(&self, dataset: DatasetId) -> Option<Replication> {
        self.replication.get(&dataset).copied()
    }

    /// Whether `node` must keep its copy of `dataset` untouched (diverged, not yet kept).
    pub fn is_diverged(&self, dataset: DatasetId, node: NodeId) -> bool {
        self.diverged
            .get(&dataset)
            .is_some_and(|m| m.contains_key(&node))
    }

    /// Whether `snapshot` of `dataset` is a kept diverged snapshot on some node.
    pub fn is_kept(&self, dataset: DatasetId, snapshot: &str) -> bool {
        self.kept
            .get(&dataset)
            .is_some_and(|m| m.values().any(|s| s.contains(snapshot)))
    }
}

/// What the apps already placed on `node` reserve there.
pub fn reserved_on(state: &ClusterState, node: NodeId) -> Reserved {
    let mut r = Reserved::default();
    for app in state.apps.values().filter(|a| a.placed_on(node)) {
        r.add(&app.spec);
    }
    r
}

/// Why the dataset's apps cannot run on `node`, if they cannot.
fn apps_misfit(state: &ClusterState, dataset: DatasetId, node: NodeId) -> Option<String> {
    let n = state.nodes.get(&node)?;
    let mut reserved = reserved_on(state, node);
    for (_, app) in state.apps_of_dataset(dataset) {
        if app.node == node {
            continue;
        }
        if let Some(why) = misfit(n, &app.spec, reserved) {
            return Some(why);
        }
        reserved.add(&app.spec);
    }
    None
}

/// The replica a failover of `dataset` would pick: among ready replicas with a confirmed base
/// where its apps fit, the one whose base is the newest recorded snapshot (ties: the lowest
/// id). `Err` says why there is none.
pub fn failover_target(state: &ClusterState, dataset: DatasetId) -> Result<NodeId, String> {
    let ds = state
        .datasets
        .get(&dataset)
        .ok_or_else(|| format!("dataset {dataset} is gone"))?;
    // Only a dataset that asks for replication has replicas fresh enough to serve: a copy a
    // move left behind may be hours old, and failing over to it would put those hours of
    // writes aside. Such a dataset waits for its node.
    if state.failover.replication_of(dataset).is_none() {
        return Err(format!(
            "dataset {} does not ask for replicas (ask with `flockctl dataset set {} --replicas 1`)",
            ds.name, ds.name
        ));
    }
    if ds.replicas.is_empty() {
        return Err(format!(
            "dataset {} has no replica (ask for one: `flockctl dataset set {} --replicas 1`)",
            ds.name, ds.name
        ));
    }
    let mut why = Vec::new();
    let mut best: Option<(usize, NodeId)> = None;
    for r in &ds.replicas {
        let name = state
            .nodes
            .get(r)
            .map_or_else(|| format!("#{r}"), |n| n.name.clone());
        if state.nodes.get(r).map(|n| n.state) != Some(NodeState::Ready) {
            why.push(format!("{name} is not ready"));
            continue;
        }
        let Some(pos) = ds
            .bases
            .get(r)
            .and_then(|b| ds.snapshots.iter().position(|s| &s.name == b))
        else {
            why.push(format!("{name} holds no recorded snapshot yet"));
            continue;
        };
        if let Some(m) = apps_misfit(state, dataset, *r) {
            why.push(format!("{name}: {m}"));
            continue;
        }
        if best.is_none_or(|(p, _)| pos > p) {
            best = Some((pos, *r));
        }
    }
    best.map(|(_, n)| n).ok_or_else(|| why.join("; "))
}

/// The node that should become the next replica of `dataset`, if it asks for more replicas
/// than it has on nodes that are up: a ready node that is neither its primary, nor a replica,
/// nor holding a diverged copy of it, where its apps fit; the one holding the fewest datasets
/// (ties: the lowest id). `None` when it has enough or no node qualifies.
pub fn replica_wanted(state: &ClusterState, dataset: DatasetId) -> Option<NodeId> {
    let want = state.failover.replication_of(dataset)?.replicas;
    let ds = state.datasets.get(&dataset)?;
    let up = ds
        .replicas
        .iter()
        .filter(|r| {
            state
                .nodes
                .get(r)
                .is_some_and(|n| n.state != NodeState::Down)
        })
        .count();
    if up >= want as usize {
        return None;
    }
    let held = |node: NodeId| {
        state
            .datasets
            .values()
            .filter(|d| d.primary == node || d.replicas.contains(&node))
            .count()
    };
    state
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Ready)
        .filter(|n| n.id != ds.primary && !ds.replicas.contains(&n.id))
        .filter(|n| !state.failover.is_diverged(dataset, n.id))
        .filter(|n| apps_misfit(state, dataset, n.id).is_none())
        .min_by_key(|n| (held(n.id), n.id))
        .map(|n| n.id)
}

/// Where each app placed on `node` goes when it is drained, in name order: a stateful app to
/// the replica of its dataset with the newest base where it fits (the move then sends only what
/// changed), else, as a stateless one, to the least loaded ready node where it fits; `Err` says
/// why it cannot go anywhere. Apps already planned reserve their room.
pub fn drain_plan(state: &ClusterState, node: NodeId) -> Vec<(String, Result<NodeId, String>)> {
    let mut extra: std::collections::BTreeMap<NodeId, Reserved> = Default::default();
    let mut load: std::collections::BTreeMap<NodeId, usize> = Default::default();
    for n in state.apps.values().flat_map(|a| a.instance_nodes()) {
        *load.entry(n).or_default() += 1;
    }
    let mut out = Vec::new();
    for (name, app) in state.apps.iter().filter(|(_, a)| a.node == node) {
        let fits = |cand: NodeId, extra: &std::collections::BTreeMap<NodeId, Reserved>| {
            let n = state.nodes.get(&cand)?;
            if n.state != NodeState::Ready || cand == node || app.placed_on(cand) {
                return None;
            }
            let mut r = reserved_on(state, cand);
            if let Some(e) = extra.get(&cand) {
                r.memory += e.memory;
                r.cpu_shares += e.cpu_shares;
            }
            misfit(n, &app.spec, r).is_none().then_some(cand)
        };
        let replica = app.dataset.and_then(|id| {
            let ds = state.datasets.get(&id)?;
            ds.replicas
                .iter()
                .filter_map(|r| fits(*r, &extra))
                .max_by_key(|r| {
                    ds.bases
                        .get(r)
                        .and_then(|b| ds.snapshots.iter().position(|s| &s.name == b))
                        .map_or(0, |p| p + 1)
                })
        });
        let spread = || {
            state
                .nodes
                .keys()
                .filter_map(|c| fits(*c, &extra))
                .min_by_key(|c| (load.get(c).copied().unwrap_or(0), *c))
        };
        let to = replica.or_else(spread).ok_or_else(|| {
            let reasons: Vec<String> = state
                .nodes
                .values()
                .filter(|n| n.id != node)
                .map(|n| {
                    let why = if n.state != NodeState::Ready {
                        "not ready".to_string()
                    } else {
                        misfit(n, &app.spec, reserved_on(state, n.id))
                            .unwrap_or_else(|| "full with the apps drained before it".into())
                    };
                    format!("{}: {why}", n.name)
                })
                .collect();
            format!("no node fits it ({})", reasons.join("; "))
        });
        if let Ok(t) = to {
            extra.entry(t).or_default().add(&app.spec);
            *load.entry(t).or_default() += 1;
        }
        out.push((name.clone(), to));
    }
    out
}

impl ClusterState {
    /// Marks `node` draining (nothing new is placed on it) or ready again.
    pub(crate) fn drain_node(
        &mut self,
        node: NodeId,
        drain: bool,
    ) -> Result<CommandResult, ApplyError> {
        let n = self
            .nodes
            .get_mut(&node)
            .ok_or(ApplyError::UnknownNode { id: node })?;
        match (n.state, drain) {
            (NodeState::Down, _) => Err(ApplyError::NodeDown {
                name: n.name.clone(),
            }),
            (_, true) => {
                n.state = NodeState::Draining;
                self.move_instances_off(node);
                Ok(CommandResult::NodeDraining { draining: true })
            }
            (_, false) => {
                n.state = NodeState::Ready;
                Ok(CommandResult::NodeDraining { draining: false })
            }
        }
    }

    pub(crate) fn declare_node_down(
        &mut self,
        node: NodeId,
        last_heard_unix_ms: u64,
        at_unix_ms: u64,
        by_operator: bool,
    ) -> Result<CommandResult, ApplyError> {
        let n = self
            .nodes
            .get(&node)
            .ok_or(ApplyError::UnknownNode { id: node })?;
        if n.state == NodeState::Down {
            return Err(ApplyError::NodeDown {
                name: n.name.clone(),
            });
        }
        self.nodes.get_mut(&node).expect("checked").state = NodeState::Down;
        self.failover.condemned.remove(&node);
        self.failover.down.insert(
            node,
            DownRecord {
                last_heard_unix_ms,
                declared_unix_ms: at_unix_ms,
                by_operator,
            },
        );
        self.failover.push(
            at_unix_ms,
            EventKind::NodeDown {
                node,
                last_heard_unix_ms,
                by_operator,
            },
        );
        let mut failed_over = Vec::new();
        let mut waiting = Vec::new();
        let primaries: Vec<DatasetId> = self
            .datasets
            .values()
            .filter(|d| d.primary == node)
            .map(|d| d.id)
            .collect();
        for id in primaries {
            match failover_target(self, id) {
                Ok(to) => {
                    let name = self.datasets[&id].name.clone();
                    self.fail_over(id, node, to, last_heard_unix_ms, at_unix_ms);
                    failed_over.push((name, to));
                }
                Err(reason) => {
                    let name = self.datasets[&id].name.clone();
                    self.failover.push(
                        at_unix_ms,
                        EventKind::NoReplica {
                            dataset: name.clone(),
                            node,
                            reason,
                        },
                    );
                    waiting.push(name);
                }
            }
        }
        // A replica on the down node gets no pushes until it is back.
        // Stateless apps go to the least loaded ready node where they fit, and without an
        // instance of theirs; pinned ones wait. An instance after the first with nowhere to go
        // is dropped until the next deploy or scale places it.
        let stateless: Vec<String> = self
            .apps
            .iter()
            .filter(|(_, a)| a.placed_on(node) && a.dataset.is_none())
            .filter(|(_, a)| a.node != node || a.pinned.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for name in stateless {
            let to = self.instance_home(&name);
            let app = self.apps.get_mut(&name).expect("listed");
            if app.node == node {
                let Some(to) = to else { continue };
                app.node = to;
            } else {
                app.move_instance(node, to);
            }
            if let Some(to) = to {
                self.failover.push(
                    at_unix_ms,
                    EventKind::Replaced {
                        app: name,
                        from: node,
                        to,
                    },
                );
            }
        }
        Ok(CommandResult::NodeDeclaredDown {
            failed_over,
            waiting,
        })
    }

    /// Makes `to` the primary of `dataset` under epoch + 1, from its base.
    fn fail_over(
        &mut self,
        dataset: DatasetId,
        from: NodeId,
        to: NodeId,
        last_heard_unix_ms: u64,
        at_unix_ms: u64,
    ) {
        let ds = self.datasets.get_mut(&dataset).expect("listed");
        let base = ds.bases.get(&to).cloned();
        if let Some(pos) = base
            .as_ref()
            .and_then(|b| ds.snapshots.iter().position(|s| &s.name == b))
        {
            ds.snapshots.truncate(pos + 1);
        }
        let record = ds.snapshots.last().cloned();
        self.failover.diverged.entry(dataset).or_default().insert(
            from,
            Diverged {
                epoch: ds.epoch,
                common: record.as_ref().map(|r| r.name.clone()),
            },
        );
        ds.epoch += 1;
        ds.primary = to;
        ds.moving = None;
        ds.replicas.remove(&to);
        ds.replicas.remove(&from);
        ds.bases.remove(&to);
        ds.bases.remove(&from);
        // A replica's base that the truncation forgot is not known any more.
        let names: BTreeSet<&str> = ds.snapshots.iter().map(|s| s.name.as_str()).collect();
        ds.bases.retain(|_, b| names.contains(b.as_str()));
        let epoch = ds.epoch;
        let name = ds.name.clone();
        // The old primary's Docker mounts went with it.
        if let Some(m) = self.mounts.get_mut(&dataset) {
            m.retain(|(n, _)| *n != from);
            if m.is_empty() {
                self.mounts.remove(&dataset);
            }
        }
        let mut apps = Vec::new();
        for (app_name, app) in self
            .apps
            .iter_mut()
            .filter(|(_, a)| a.dataset == Some(dataset))
        {
            app.node = to;
            // Pinned where its data is now, as after a move: a later re-plan (another app's
            // removal) must not send it back to the node it failed over from.
            if app.pinned.is_some() {
                app.pinned = Some(to);
            }
            apps.push(app_name.clone());
        }
        let snapshot_unix = record.as_ref().map(|r| r.created_unix);
        self.failover.push(
            at_unix_ms,
            EventKind::FailedOver {
                dataset: name,
                apps,
                from,
                to,
                epoch,
                snapshot: record.map(|r| r.name),
                snapshot_unix,
                at_risk_ms: last_heard_unix_ms
                    .saturating_sub(snapshot_unix.unwrap_or(0).saturating_mul(1000)),
            },
        );
    }

    pub(crate) fn condemn_node(&mut self, node: NodeId) -> Result<CommandResult, ApplyError> {
        let n = self
            .nodes
            .get(&node)
            .ok_or(ApplyError::UnknownNode { id: node })?;
        if n.state == NodeState::Down {
            return Err(ApplyError::NodeDown {
                name: n.name.clone(),
            });
        }
        self.failover.condemned.insert(node);
        Ok(CommandResult::NodeCondemned)
    }

    pub(crate) fn node_back_up(
        &mut self,
        node: NodeId,
        at_unix_ms: u64,
    ) -> Result<CommandResult, ApplyError> {
        let n = self
            .nodes
            .get_mut(&node)
            .ok_or(ApplyError::UnknownNode { id: node })?;
        if n.state != NodeState::Down {
            return Ok(CommandResult::NodeUp { was_down: false });
        }
        n.state = NodeState::Ready;
        self.failover.down.remove(&node);
        self.failover.push(at_unix_ms, EventKind::NodeUp { node });
        self.place_waiting_instances(node);
        Ok(CommandResult::NodeUp { was_down: true })
    }

    /// The least loaded ready node where app `name` has no instance and one fits, if any.
    fn instance_home(&self, name: &str) -> Option<NodeId> {
        let app = self.apps.get(name)?;
        let mut best: Option<(usize, NodeId)> = None;
        for cand in self.nodes.values().filter(|n| n.state == NodeState::Ready) {
            if app.placed_on(cand.id)
                || misfit(cand, &app.spec, reserved_on(self, cand.id)).is_some()
            {
                continue;
            }
            let load = self.apps.values().filter(|a| a.placed_on(cand.id)).count();
            if best.is_none_or(|(l, _)| load < l) {
                best = Some((load, cand.id));
            }
        }
        best.map(|(_, id)| id)
    }

    /// The instances after the first on `node`, being drained, go to another node where they
    /// fit, or wait for the next deploy or scale (the first moves with the drain's app moves).
    fn move_instances_off(&mut self, node: NodeId) {
        let names: Vec<String> = self
            .apps
            .iter()
            .filter(|(_, a)| a.more.contains(&node))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let to = self.instance_home(&name);
            self.apps
                .get_mut(&name)
                .expect("listed")
                .move_instance(node, to);
        }
    }

    /// Stateless apps with fewer instances placed than they ask for (one went down with no
    /// other node to go to) get one on `node`, back up, where it fits: room for the app, and
    /// its internal ports free there.
    fn place_waiting_instances(&mut self, node: NodeId) {
        let waiting: Vec<String> = self
            .apps
            .iter()
            .filter(|(_, a)| a.dataset.is_none() && !a.placed_on(node))
            .filter(|(_, a)| a.more.len() + 1 < a.spec.instance_count() as usize)
            .map(|(n, _)| n.clone())
            .collect();
        for name in waiting {
            let Some(n) = self.nodes.get(&node) else {
                return;
            };
            let spec = &self.apps[&name].spec;
            let ports = crate::app::internal_ports(spec);
            let taken = self
                .apps
                .values()
                .filter(|a| a.placed_on(node))
                .any(|a| !crate::app::internal_ports(&a.spec).is_disjoint(&ports));
            if taken || misfit(n, spec, reserved_on(self, node)).is_some() {
                continue;
            }
            self.apps.get_mut(&name).expect("listed").more.push(node);
        }
    }

    pub(crate) fn set_replication(
        &mut self,
        dataset: DatasetId,
        replication: Option<Replication>,
    ) -> Result<CommandResult, ApplyError> {
        if !self.datasets.contains_key(&dataset) {
            return Err(ApplyError::UnknownDataset { id: dataset });
        }
        match replication {
            Some(r) => {
                r.validate()?;
                self.failover.replication.insert(dataset, r);
            }
            None => {
                self.failover.replication.remove(&dataset);
            }
        }
        Ok(CommandResult::ReplicationSet)
    }

    /// Adds `node` as a replica of `dataset` (the primary's agent proposes it when the dataset
    /// asks for more replicas than it has).
    pub(crate) fn add_replica(
        &mut self,
        dataset: DatasetId,
        epoch: u64,
        node: NodeId,
    ) -> Result<CommandResult, ApplyError> {
        self.usable_node(node)?;
        if let Some(n) = self
            .nodes
            .get(&node)
            .filter(|n| n.state == NodeState::Draining)
        {
            return Err(ApplyError::NodeDraining {
                name: n.name.clone(),
            });
        }
        let diverged = self.failover.is_diverged(dataset, node);
        let ds = self
            .datasets
            .get_mut(&dataset)
            .ok_or(ApplyError::UnknownDataset { id: dataset })?;
        if ds.epoch != epoch {
            return Err(ApplyError::StaleEpoch {
                dataset: ds.name.clone(),
                epoch,
                current: ds.epoch,
            });
        }
        if ds.primary == node || diverged {
            return Err(ApplyError::NotAReplica {
                dataset: ds.name.clone(),
                node,
            });
        }
        ds.replicas.insert(node);
        Ok(CommandResult::ReplicaRecorded)
    }

    /// The returning `node` kept its diverged writes of `dataset` in `snapshot` (if it had
    /// any) and rolled its copy back to the common snapshot: it becomes a replica.
    pub(crate) fn keep_diverged(
        &mut self,
        dataset: DatasetId,
        node: NodeId,
        snapshot: Option<&str>,
        at_unix_ms: u64,
    ) -> Result<CommandResult, ApplyError> {
        let ds = self
            .datasets
            .get(&dataset)
            .ok_or(ApplyError::UnknownDataset { id: dataset })?;
        let name = ds.name.clone();
        let Some(div) = self
            .failover
            .diverged
            .get_mut(&dataset)
            .and_then(|m| m.remove(&node))
        else {
            return Err(ApplyError::NotAReplica {
                dataset: name,
                node,
            });
        };
        if self
            .failover
            .diverged
            .get(&dataset)
            .is_some_and(|m| m.is_empty())
        {
            self.failover.diverged.remove(&dataset);
        }
        if let Some(s) = snapshot {
            self.failover
                .kept
                .entry(dataset)
                .or_default()
                .entry(node)
                .or_default()
                .insert(s.to_string());
        }
        let ds = self.datasets.get_mut(&dataset).expect("checked");
        if ds.primary != node {
            ds.replicas.insert(node);
            // Its base is the common snapshot while the record still holds it.
            if let Some(c) = div
                .common
                .filter(|c| ds.snapshots.iter().any(|s| &s.name == c))
            {
                ds.bases.insert(node, c);
            }
        }
        self.failover.push(
            at_unix_ms,
            EventKind::DivergedKept {
                dataset: name,
                node,
                snapshot: snapshot.map(str::to_string),
            },
        );
        Ok(CommandResult::DivergedKept)
    }

    /// An operator removed kept snapshot `snapshot` of `dataset` on `node`.
    pub(crate) fn drop_kept(
        &mut self,
        dataset: DatasetId,
        node: NodeId,
        snapshot: &str,
    ) -> Result<CommandResult, ApplyError> {
        let name = self
            .datasets
            .get(&dataset)
            .ok_or(ApplyError::UnknownDataset { id: dataset })?
            .name
            .clone();
        let per_node = self.failover.kept.get_mut(&dataset);
        let Some(set) = per_node.and_then(|m| m.get_mut(&node)) else {
            return Err(ApplyError::UnknownSnapshot {
                dataset: name,
                snapshot: snapshot.to_string(),
            });
        };
        if !set.remove(snapshot) {
            return Err(ApplyError::UnknownSnapshot {
                dataset: name,
                snapshot: snapshot.to_string(),
            });
        }
        let m = self.failover.kept.get_mut(&dataset).expect("found above");
        m.retain(|_, s| !s.is_empty());
        if m.is_empty() {
            self.failover.kept.remove(&dataset);
        }
        Ok(CommandResult::KeptDropped)
    }
}

impl Failover {
    /// The nodes that keep `snapshot` of `dataset` (diverged writes a failover left there).
    pub fn kept_on(&self, dataset: DatasetId, snapshot: &str) -> Vec<NodeId> {
        self.kept.get(&dataset).map_or_else(Vec::new, |m| {
            m.iter()
                .filter(|(_, s)| s.contains(snapshot))
                .map(|(n, _)| *n)
                .collect()
        })
    }

    /// Whether `node` keeps `snapshot` of `dataset`.
    pub fn keeps(&self, dataset: DatasetId, node: NodeId, snapshot: &str) -> bool {
        self.kept
            .get(&dataset)
            .and_then(|m| m.get(&node))
            .is_some_and(|s| s.contains(snapshot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PlannedApp;
    use crate::dataset::SnapshotRecord;
    use crate::state::Command;
    use crate::testutil::{cluster, spec};

    /// Three nodes; app db (volume) pinned to n1 with snapshots a, b, c (created 10, 20, 30 s)
    /// and replicas 2 (base b) and 3 (base a); app web (stateless) on n1.
    fn setup() -> ClusterState {
        let mut s = cluster(3);
        let apps = [
            (
                "db".to_string(),
                PlannedApp {
                    spec: spec("db", None, true),
                    node: Some(1),
                },
            ),
            (
                "web".to_string(),
                PlannedApp {
                    spec: spec("web", Some(8080), false),
                    node: None,
                },
            ),
        ]
        .into_iter()
        .collect();
        let r = s.apply(&Command::deploy_all(apps));
        assert!(!matches!(r, CommandResult::Rejected(_)), "{r:?}");
        s.apps.get_mut("web").unwrap().node = 1;
        let id = s.dataset_by_name("db").unwrap().id;
        s.apply(&Command::SetReplication {
            dataset: id,
            replication: Some(Replication {
                replicas: 2,
                interval_ms: 1000,
            }),
        });
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            let r = s.apply(&Command::RecordSnapshot {
                dataset: id,
                epoch: 1,
                snapshot: SnapshotRecord {
                    name: n.to_string(),
                    guid: i as u64,
                    created_unix: 10 * (i as u64 + 1),
                    epoch: 1,
                },
            });
            assert!(!matches!(r, CommandResult::Rejected(_)), "{r:?}");
        }
        for (node, base) in [(2, "b"), (3, "a")] {
            assert_eq!(
                s.apply(&Command::AddReplica {
                    dataset: id,
                    epoch: 1,
                    node
                }),
                CommandResult::ReplicaRecorded
            );
            assert_eq!(
                s.apply(&Command::ReplicaHolds {
                    dataset: id,
                    epoch: 1,
                    node,
                    snapshot: base.into()
                }),
                CommandResult::ReplicaRecorded
            );
        }
        s
    }

    fn down(s: &mut ClusterState, node: NodeId) -> CommandResult {
        s.apply(&Command::DeclareNodeDown {
            node,
            last_heard_unix_ms: 35_000,
            at_unix_ms: 40_000,
            by_operator: false,
        })
    }

    #[test]
    fn the_replica_with_the_newest_base_becomes_primary_under_a_new_epoch() {
        let mut s = setup();
        let id = s.dataset_by_name("db").unwrap().id;
        assert_eq!(failover_target(&s, id), Ok(2));
        assert_eq!(
            down(&mut s, 1),
            CommandResult::NodeDeclaredDown {
                failed_over: vec![("db".into(), 2)],
                waiting: vec![],
            }
        );
        let ds = &s.datasets[&id];
        assert_eq!((ds.primary, ds.epoch), (2, 2));
        // c was only on n1: forgotten; n3's base a stays; n1 is diverged, not a replica.
        let names: Vec<&str> = ds.snapshots.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(ds.replicas, BTreeSet::from([3]));
        assert_eq!(ds.bases.get(&3).map(String::as_str), Some("a"));
        assert!(s.failover.is_diverged(id, 1));
        assert_eq!(s.failover.diverged[&id][&1].common.as_deref(), Some("b"));
        assert_eq!(s.apps["db"].node, 2);
        assert_eq!(s.apps["db"].pinned, Some(2));
        assert_eq!(s.app_runs_on(&s.apps["db"]), Some(2));
        // The stateless app went to the least loaded ready node (n3: n2 has db now).
        assert_eq!(s.apps["web"].node, 3);
        assert_eq!(s.nodes[&1].state, NodeState::Down);
        // What may be lost: from b (20 s) to the last time n1 was heard (35 s).
        let lost = s.failover.events.iter().find_map(|e| match &e.what {
            EventKind::FailedOver { at_risk_ms, .. } => Some(*at_risk_ms),
            _ => None,
        });
        assert_eq!(lost, Some(15_000));
        // The old primary can record nothing under its epoch.
        let r = s.apply(&Command::RecordSnapshot {
            dataset: id,
            epoch: 1,
            snapshot: SnapshotRecord {
                name: "late".into(),
                guid: 9,
                created_unix: 50,
                epoch: 1,
            },
        });
        assert!(matches!(
            r,
            CommandResult::Rejected(ApplyError::StaleEpoch { .. })
        ));
        // Declaring it down again is refused, nothing changes.
        let before = s.clone();
        assert!(matches!(down(&mut s, 1), CommandResult::Rejected(_)));
        assert_eq!(s, before);
    }

    #[test]
    fn without_a_fitting_replica_the_app_waits_and_says_why() {
        let mut s = setup();
        let id = s.dataset_by_name("db").unwrap().id;
        // n2 down first: its replica is not ready; n3's is, so n3 is the target.
        down(&mut s, 2);
        assert_eq!(failover_target(&s, id), Ok(3));
        down(&mut s, 3);
        let why = failover_target(&s, id).unwrap_err();
        assert!(why.contains("is not ready"), "{why}");
        assert_eq!(
            down(&mut s, 1),
            CommandResult::NodeDeclaredDown {
                failed_over: vec![],
                waiting: vec!["db".into()],
            }
        );
        assert_eq!(s.datasets[&id].primary, 1);
        assert_eq!(s.datasets[&id].epoch, 1);
        assert!(s
            .failover
            .events
            .iter()
            .any(|e| matches!(&e.what, EventKind::NoReplica { dataset, .. } if dataset == "db")));
    }

    #[test]
    fn a_dataset_that_asks_for_no_replicas_waits_for_its_node() {
        let mut s = setup();
        let id = s.dataset_by_name("db").unwrap().id;
        s.apply(&Command::SetReplication {
            dataset: id,
            replication: None,
        });
        assert!(failover_target(&s, id)
            .unwrap_err()
            .contains("does not ask for replicas"));
        down(&mut s, 1);
        assert_eq!(s.datasets[&id].primary, 1);
    }

    #[test]
    fn an_instance_with_nowhere_to_go_waits_for_its_node_to_come_back() {
        let mut s = cluster(3);
        let mut web = spec("web", Some(8080), false);
        web.instances = Some(3);
        let apps = [(
            "web".to_string(),
            PlannedApp {
                spec: web,
                node: None,
            },
        )]
        .into();
        assert!(!matches!(
            s.apply(&Command::deploy_all(apps)),
            CommandResult::Rejected(_)
        ));
        let third = s.apps["web"].more[1];
        // The two other nodes have one already: the instance is dropped, not doubled up.
        down(&mut s, third);
        let placed: Vec<NodeId> = s.apps["web"].instance_nodes().collect();
        assert_eq!(placed.len(), 2, "{placed:?}");
        assert!(!placed.contains(&third));
        s.apply(&Command::NodeBackUp {
            node: third,
            at_unix_ms: 50_000,
        });
        let placed: Vec<NodeId> = s.apps["web"].instance_nodes().collect();
        assert_eq!(placed.len(), 3, "{placed:?}");
        assert!(placed.contains(&third));
        // Drained, with no other node free: its instance goes and waits.
        assert!(!matches!(
            s.apply(&Command::DrainNode {
                node: third,
                drain: true
            }),
            CommandResult::Rejected(_)
        ));
        assert!(!s.apps["web"].placed_on(third));
        assert_eq!(s.apps["web"].instance_nodes().count(), 2);
        s.apply(&Command::DrainNode {
            node: third,
            drain: false,
        });
        // Back up again changes nothing: it has its three.
        down(&mut s, third);
        s.apply(&Command::NodeBackUp {
            node: third,
            at_unix_ms: 60_000,
        });
        assert_eq!(s.apps["web"].instance_nodes().count(), 3);
    }

    #[test]
    fn a_replica_without_a_confirmed_base_is_never_chosen() {
        let mut s = setup();
        let id = s.dataset_by_name("db").unwrap().id;
        s.datasets.get_mut(&id).unwrap().bases.clear();
        assert!(failover_target(&s, id)
            .unwrap_err()
            .contains("holds no recorded snapshot"));
    }

    #[test]
    fn the_returning_node_keeps_its_writes_and_becomes_a_replica() {
        let mut s = setup();
        let id = s.dataset_by_name("db").unwrap().id;
        down(&mut s, 1);
        // A diverged copy cannot be made a replica by the primary's agent.
        assert!(matches!(
            s.apply(&Command::AddReplica {
                dataset: id,
                epoch: 2,
                node: 1
            }),
            CommandResult::Rejected(_)
        ));
        assert_eq!(
            s.apply(&Command::NodeBackUp {
                node: 1,
                at_unix_ms: 50_000
            }),
            CommandResult::NodeUp { was_down: true }
        );
        // Nor can a move take the dataset there: its push would roll the writes back.
        assert!(matches!(
            s.apply(&Command::MoveApp {
                app: "db".into(),
                to: 1
            }),
            CommandResult::Rejected(ApplyError::DivergedCopy { .. })
        ));
        assert_eq!(
            s.apply(&Command::KeepDiverged {
                dataset: id,
                node: 1,
                snapshot: Some("diverged-1".into()),
                at_unix_ms: 51_000,
            }),
            CommandResult::DivergedKept
        );
        assert!(!s.failover.is_diverged(id, 1));
        assert!(s.failover.is_kept(id, "diverged-1"));
        let ds = &s.datasets[&id];
        assert!(ds.replicas.contains(&1));
        assert_eq!(ds.bases.get(&1).map(String::as_str), Some("b"));
        // Only once.
        assert!(matches!(
            s.apply(&Command::KeepDiverged {
                dataset: id,
                node: 1,
                snapshot: None,
                at_unix_ms: 52_000,
            }),
            CommandResult::Rejected(_)
        ));
        assert_eq!(s.failover.kept_on(id, "diverged-1"), vec![1]);
        // An operator removes it; only where it is kept, and only once.
        let drop = |node| Command::DropKept {
            dataset: id,
            node,
            snapshot: "diverged-1".into(),
        };
        assert!(matches!(
            s.apply(&drop(2)),
            CommandResult::Rejected(ApplyError::UnknownSnapshot { .. })
        ));
        assert_eq!(s.apply(&drop(1)), CommandResult::KeptDropped);
        assert!(!s.failover.is_kept(id, "diverged-1"));
        assert!(s.failover.kept.is_empty());
        assert!(matches!(
            s.apply(&drop(1)),
            CommandResult::Rejected(ApplyError::UnknownSnapshot { .. })
        ));
    }

    #[test]
    fn replication_settings_are_validated() {
        let mut s = setup();
        let id = s.dataset_by_name("db").unwrap().id;
        let set = |replicas, interval_ms| Command::SetReplication {
            dataset: id,
            replication: Some(Replication {
                replicas,
                interval_ms,
            }),
        };
        assert_eq!(s.apply(&set(2, 1000)), CommandResult::ReplicationSet);
        assert!(matches!(
            s.apply(&set(MAX_REPLICAS + 1, 1000)),
            CommandResult::Rejected(ApplyError::InvalidReplication { .. })
        ));
        assert!(matches!(
            s.apply(&set(1, 10)),
            CommandResult::Rejected(ApplyError::InvalidReplication { .. })
        ));
        assert_eq!(s.failover.replication_of(id).unwrap().replicas, 2);
    }

    #[test]
    fn replicas_go_to_ready_nodes_that_hold_the_fewest_datasets() {
        let mut s = cluster(4);
        let apps = [(
            "db".to_string(),
            PlannedApp {
                spec: spec("db", None, true),
                node: Some(1),
            },
        )]
        .into_iter()
        .collect();
        s.apply(&Command::deploy_all(apps));
        let id = s.dataset_by_name("db").unwrap().id;
        assert_eq!(replica_wanted(&s, id), None, "no replication asked for");
        s.apply(&Command::SetReplication {
            dataset: id,
            replication: Some(Replication {
                replicas: 2,
                interval_ms: 1000,
            }),
        });
        // n2 holds another dataset: n3 first (none held, lowest id), then n4.
        s.apply(&Command::CreateDataset {
            name: "other".into(),
            primary: 2,
            size_limit: None,
        });
        assert_eq!(replica_wanted(&s, id), Some(3));
        s.apply(&Command::AddReplica {
            dataset: id,
            epoch: 1,
            node: 3,
        });
        assert_eq!(replica_wanted(&s, id), Some(4));
        s.apply(&Command::AddReplica {
            dataset: id,
            epoch: 1,
            node: 4,
        });
        assert_eq!(replica_wanted(&s, id), None);
        // A replica on a down node does not count: another is wanted.
        s.apply(&Command::DeclareNodeDown {
            node: 4,
            last_heard_unix_ms: 0,
            at_unix_ms: 0,
            by_operator: true,
        });
        assert_eq!(replica_wanted(&s, id), Some(2));
    }

    #[test]
    fn a_drained_node_sends_stateful_apps_to_their_best_replica_and_takes_nothing_new() {
        let mut s = setup();
        assert_eq!(
            s.apply(&Command::DrainNode {
                node: 1,
                drain: true
            }),
            CommandResult::NodeDraining { draining: true }
        );
        let plan = drain_plan(&s, 1);
        // db to n2 (its replica with the newest base), web to the least loaded: n3.
        assert_eq!(
            plan,
            vec![("db".to_string(), Ok(2)), ("web".to_string(), Ok(3))]
        );
        // Nothing moves onto a draining node.
        assert!(matches!(
            s.apply(&Command::MoveApp {
                app: "web".into(),
                to: 1
            }),
            CommandResult::Rejected(_)
        ));
        s.apply(&Command::MoveApp {
            app: "web".into(),
            to: 3,
        });
        assert!(matches!(
            s.apply(&Command::MoveApp {
                app: "web".into(),
                to: 1
            }),
            CommandResult::Rejected(ApplyError::NodeDraining { .. })
        ));
        // With every other node down, it says why.
        down(&mut s, 2);
        down(&mut s, 3);
        let plan = drain_plan(&s, 1);
        assert!(
            plan[0].1.as_ref().unwrap_err().contains("not ready"),
            "{plan:?}"
        );
    }

    #[test]
    fn events_are_bounded() {
        let mut f = Failover::default();
        for i in 0..(MAX_EVENTS as u64 + 10) {
            f.push(i, EventKind::NodeUp { node: 1 });
        }
        assert_eq!(f.events.len(), MAX_EVENTS);
        assert_eq!(f.events.front().unwrap().id, 10);
    }
}
