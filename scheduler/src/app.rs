//! Applications in the desired state, and the planner that turns a deployed configuration into
//! placements.
//!
//! `flockctl deploy` resolves the user's files into a [`Plan`] (see [`crate::config`]) and
//! proposes it as one [`crate::Command::Deploy`]: the whole configuration replaces the previous
//! one in a single log entry, so a leader dying mid-deploy leaves either the old or the new
//! configuration in force. [`plan_deploy`] computes what changes (pure, deterministic); `apply`
//! runs it again on the state it finds, so a plan computed from a stale view is re-checked.
//!
//! Placement: an app pinned by deployment.yml goes to its node; an unpinned app stays where it
//! is, else goes where its dataset lives, else to the ready node with the fewest apps (lowest
//! id on a tie); always to a node it fits ([`crate::fit`]: driver, labels, memory, cpu), or the
//! deploy is refused with each node's reason. An app with a volume gets a dataset named after it, created on its node; when
//! the app's node changes, the dataset is moved there (the app starts once it arrived).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::{AppSpec, PlannedApp};
use crate::dataset::DatasetId;
use crate::fit::{misfit, Reserved};
use crate::state::{ApplyError, ClusterState, Command, CommandResult, NodeId, NodeState};

/// A deployed application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub spec: AppSpec,
    /// The node deployment.yml pinned it to.
    pub pinned: Option<NodeId>,
    /// The node it should run on.
    pub node: NodeId,
    /// The dataset of its volume.
    pub dataset: Option<DatasetId>,
    /// Its service address: [`service_ip`] of this index, the same on every node. Given when
    /// the app is deployed (apps of snapshots written before stacks get one at the next
    /// deploy).
    pub vip: Option<u16>,
    /// The nodes of its instances after the first (which is on `node`), one per node, when
    /// its spec asks for more than one ([`AppSpec::instances`]). Fewer than asked when no
    /// other node fits them.
    #[serde(default)]
    pub more: Vec<NodeId>,
    /// Its instances' health as their nodes reported it ([`Command::ReportHealth`]), by node
    /// (one instance per node). Only apps with a health check have any; an instance without an
    /// entry has not been reported on (its node runs a build that does not report, or has not
    /// looked yet). Entries go when the instance leaves the node or the spec changes (see
    /// [`ClusterState::prune_health`]), so a verdict never outlives the instance it is about.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub health: BTreeMap<NodeId, Health>,
}

/// An instance's health check verdict as the replicated state records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Health {
    /// Its check has not passed yet (or it does not run now).
    Starting,
    Healthy,
    /// Its check failed `retries` times in a row.
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// The key instance `index` (1-based) of app `name` runs under on its node, as its driver
/// names it: the app's own name for the first, `NAME.INDEX` for the others.
pub fn instance_key(name: &str, index: usize) -> String {
    if index <= 1 {
        name.to_string()
    } else {
        format!("{name}.{index}")
    }
}

impl App {
    /// The nodes its instances are placed on, the first's first.
    pub fn instance_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        std::iter::once(self.node).chain(self.more.iter().copied())
    }

    /// Whether an instance of it is placed on `node`.
    pub fn placed_on(&self, node: NodeId) -> bool {
        self.node == node || self.more.contains(&node)
    }

    /// Its instance after the first on `from` goes to `to`, or waits (`None`: dropped until
    /// placed again).
    pub(crate) fn move_instance(&mut self, from: NodeId, to: Option<NodeId>) {
        match to {
            Some(to) => self
                .more
                .iter_mut()
                .filter(|n| **n == from)
                .for_each(|n| *n = to),
            None => self.more.retain(|n| *n != from),
        }
    }

    /// Instance `index` (1-based) as an app of its own: on its node, without other instances.
    /// `None` if there is no such instance.
    pub fn instance(&self, index: usize) -> Option<App> {
        let node = self.instance_nodes().nth(index.checked_sub(1)?)?;
        Some(App {
            node,
            more: Vec::new(),
            ..self.clone()
        })
    }

    /// Whether the mesh sends new connections to its instance on `node`: not while that
    /// instance's recorded health is starting or unhealthy (Swarm's rule: an app whose every
    /// instance is unhealthy gets none, and connections are refused). An instance without a
    /// record is routed to as before health was recorded: apps without a health check never
    /// have one, and an instance whose node runs a build that does not report health (a
    /// rolling upgrade) must keep its traffic rather than lose it for want of a report.
    pub fn serves_on(&self, node: NodeId) -> bool {
        !matches!(
            self.health.get(&node),
            Some(Health::Starting | Health::Unhealthy)
        )
    }

    /// The app as a deploy names it: its spec and the node it is pinned to.
    pub fn planned(&self) -> PlannedApp {
        PlannedApp {
            spec: self.spec.clone(),
            node: self.pinned,
        }
    }
}

/// The service address of index `i`: `198.18.X.Y` (RFC 2544's benchmarking range, which no
/// real network routes), one per app, where the mesh of every node listens on the app's
/// internal ports.
pub fn service_ip(i: u16) -> std::net::Ipv4Addr {
    let [hi, lo] = i.to_be_bytes();
    std::net::Ipv4Addr::new(198, 18, hi, lo)
}

/// The ports an app takes on its node: the internal ports of `ports`, and `expose`.
pub fn internal_ports(spec: &AppSpec) -> BTreeSet<u16> {
    spec.ports
        .iter()
        .map(|p| p.internal)
        .chain(spec.expose.iter().copied())
        .collect()
}

/// The lowest and highest service address indexes (`198.18.0.1` to `198.18.255.254`).
const VIP_RANGE: std::ops::RangeInclusive<u16> = 1..=0xfffe;

/// One change a deploy makes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Start {
        app: String,
        node: NodeId,
    },
    Stop {
        app: String,
        node: NodeId,
    },
    Move {
        app: String,
        from: NodeId,
        to: NodeId,
    },
    Update {
        app: String,
        node: NodeId,
    },
}

impl Change {
    pub fn app(&self) -> &str {
        match self {
            Change::Start { app, .. }
            | Change::Stop { app, .. }
            | Change::Move { app, .. }
            | Change::Update { app, .. } => app,
        }
    }
}

/// Refuses a count of instances an app cannot have: none, more than one of an app with a
/// volume (a dataset has one writer), or one whose key another app's name takes.
fn check_instances(
    name: &str,
    app: &PlannedApp,
    apps: &BTreeMap<String, PlannedApp>,
) -> Result<(), ApplyError> {
    let count = app.spec.instance_count();
    let bad = |why: &str| {
        Err(ApplyError::InstanceCount {
            app: name.to_string(),
            count,
            why: why.to_string(),
        })
    };
    if count == 0 {
        return bad("give at least 1, or remove the app");
    }
    if count > 1 && app.spec.volume.is_some() {
        return bad(
            "it has a volume, and a dataset has one writer; only apps without a volume scale",
        );
    }
    // Instance 2 of app a runs as `a.2` on its node: no app may be named so.
    if let Some((base, index)) = name.rsplit_once('.') {
        let taken = index.parse::<u32>().is_ok_and(|i| {
            apps.get(base)
                .is_some_and(|b| i >= 2 && i <= b.spec.instance_count())
        });
        if taken {
            return Err(ApplyError::InstanceCount {
                app: base.to_string(),
                count: apps[base].spec.instance_count(),
                why: format!("its instance {index} would run as {name:?}, an app of its own; rename that app"),
            });
        }
    }
    Ok(())
}

/// Whether two specs differ at most in their count of instances.
fn same_but_count(a: &AppSpec, b: &AppSpec) -> bool {
    a == b
        || AppSpec {
            instances: None,
            ..a.clone()
        } == AppSpec {
            instances: None,
            ..b.clone()
        }
}

fn usable(state: &ClusterState, node: NodeId) -> bool {
    state
        .nodes
        .get(&node)
        .is_some_and(|n| n.state == NodeState::Ready)
}

/// Where each app of `apps` goes and what changes, given `state`. Pure and deterministic.
///
/// Each app is placed on one node, and an app with more than one instance
/// ([`AppSpec::instances`]) on as many other nodes as fit, one per node (its internal ports are
/// taken on each): the instances it already has stay where they fit, the others go to the least
/// loaded nodes. The nodes of each app's instances, the first's first, and the changes.
#[allow(clippy::type_complexity)]
pub fn plan_deploy(
    state: &ClusterState,
    apps: &BTreeMap<String, PlannedApp>,
) -> Result<(BTreeMap<String, Vec<NodeId>>, Vec<Change>), ApplyError> {
    let mut ports: BTreeMap<u16, &str> = BTreeMap::new();
    for (name, app) in apps {
        crate::dataset::validate_dataset_name(name)
            .map_err(|_| ApplyError::InvalidAppName { name: name.clone() })?;
        for p in &app.spec.ports {
            if let Some(other) = ports.insert(p.external, name) {
                return Err(ApplyError::PortTaken {
                    port: p.external,
                    app: name.clone(),
                    other: other.to_string(),
                });
            }
        }
        if let Some(node) = app.node {
            if !state.nodes.contains_key(&node) {
                return Err(ApplyError::UnknownNode { id: node });
            }
        }
        check_instances(name, app, apps)?;
    }
    if state.nodes.values().all(|n| n.state != NodeState::Ready) {
        return Err(ApplyError::NoReadyNode);
    }
    // Load of each ready node: apps already placed that stay where they are, counted as we go.
    let mut load: BTreeMap<NodeId, usize> = state
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Ready)
        .map(|n| (n.id, 0))
        .collect();
    let mut placed = BTreeMap::new();
    let datasets_by_name: BTreeMap<&str, &crate::dataset::Dataset> = state
        .datasets
        .values()
        .map(|d| (d.name.as_str(), d))
        .collect();
    // Pinned apps and apps that stay first, so the spread sees them.
    let mut order: Vec<&String> = apps.keys().collect();
    order.sort_by_key(|name| {
        let pinned = apps[*name].node.is_some();
        let staying = state.apps.get(*name).is_some_and(|a| usable(state, a.node));
        (!(pinned || staying), (*name).clone())
    });
    let mut by_load: BTreeSet<(usize, NodeId)> = load.iter().map(|(id, c)| (*c, *id)).collect();
    // What the apps placed so far reserve on each node.
    let mut reserved: BTreeMap<NodeId, Reserved> = BTreeMap::new();
    // Apps sharing a dataset (a compose volume several services name) run on one node: the
    // first placed of them (pinned and staying ones come first) decides; (node, app).
    let mut dataset_at: BTreeMap<&str, (NodeId, &str)> = BTreeMap::new();
    let mut dataset_size: BTreeMap<&str, (Option<u64>, &str)> = BTreeMap::new();
    for (name, app) in apps {
        if let (Some(ds), Some(v)) = (app.spec.dataset_name(), &app.spec.volume) {
            if let Some((size, other)) = dataset_size.insert(ds, (v.maximum_size, name)) {
                if size != v.maximum_size {
                    return Err(ApplyError::SharedVolumeMismatch {
                        dataset: ds.to_string(),
                        apps: format!("{other} and {name}"),
                        why: "give it one maximum_size".into(),
                    });
                }
            }
        }
    }
    // The internal ports the apps placed so far take on each node (their drivers publish them
    // there, where the mesh and service addresses reach them).
    let mut used_ports: BTreeMap<NodeId, BTreeMap<u16, &str>> = BTreeMap::new();
    for name in order {
        let app = &apps[name];
        let own_ports = internal_ports(&app.spec);
        let misfit_on =
            |node: NodeId,
             reserved: &BTreeMap<NodeId, Reserved>,
             used_ports: &BTreeMap<NodeId, BTreeMap<u16, &str>>| {
                // A pin or a state naming a node that is not a member (a bad proposal or snapshot)
                // is refused, never a panic in apply.
                let Some(n) = state.nodes.get(&node) else {
                    return Some(format!("node {node} is not a member"));
                };
                if let Some(used) = used_ports.get(&node) {
                    if let Some((p, other)) =
                        own_ports.iter().find_map(|p| used.get(p).map(|o| (p, o)))
                    {
                        return Some(format!("app {other} there takes internal port {p} too"));
                    }
                }
                misfit(
                    n,
                    &app.spec,
                    reserved.get(&node).copied().unwrap_or_default(),
                )
            };
        let fits = |node: &NodeId| {
            usable(state, *node) && misfit_on(*node, &reserved, &used_ports).is_none()
        };
        let shared = app
            .spec
            .dataset_name()
            .and_then(|ds| dataset_at.get(ds).map(|at| (ds, *at)));
        let node = match (shared, app.node) {
            (Some((ds, (at, other))), pin) => {
                if pin.is_some_and(|p| p != at) || misfit_on(at, &reserved, &used_ports).is_some() {
                    let why = match misfit_on(at, &reserved, &used_ports) {
                        Some(reason) if pin.is_none_or(|p| p == at) => format!(
                            "they run on one node, and {name} does not fit on {} beside {other}: \
                             {reason}",
                            state.node_label(at)
                        ),
                        _ => format!(
                            "they run on one node, but {other} is on {} and {name} is pinned \
                             elsewhere",
                            state.node_label(at)
                        ),
                    };
                    return Err(ApplyError::SharedVolumeMismatch {
                        dataset: ds.to_string(),
                        apps: format!("{other} and {name}"),
                        why,
                    });
                }
                at
            }
            (None, pin) => match pin {
                Some(pin) => {
                    if let Some(reason) = misfit_on(pin, &reserved, &used_ports) {
                        return Err(ApplyError::PinnedMisfit {
                            app: name.clone(),
                            node: state
                                .nodes
                                .get(&pin)
                                .map_or_else(|| format!("#{pin}"), |n| n.name.clone()),
                            reason,
                        });
                    }
                    pin
                }
                None => {
                    let staying = state.apps.get(name).map(|a| a.node).filter(fits);
                    let dataset_home = app
                        .spec
                        .dataset_name()
                        .and_then(|ds| datasets_by_name.get(ds))
                        .map(|d| d.primary)
                        .filter(fits);
                    // The least loaded node that fits: in (load, id) order, so an app that fits
                    // the first node costs one lookup, not a scan of every node.
                    let spread = || by_load.iter().map(|(_, id)| *id).find(|id| fits(id));
                    match staying.or(dataset_home).or_else(spread) {
                        Some(n) => n,
                        None => {
                            let reasons: Vec<String> = load
                                .keys()
                                .filter_map(|id| {
                                    misfit_on(*id, &reserved, &used_ports)
                                        .map(|r| format!("{}: {r}", state.nodes[id].name))
                                })
                                .collect();
                            return Err(ApplyError::NoFittingNode {
                                app: name.clone(),
                                reasons: reasons.join("; "),
                            });
                        }
                    }
                }
            },
        };
        if let Some(ds) = app.spec.dataset_name() {
            dataset_at.entry(ds).or_insert((node, name));
        }
        // The instances after the first: where they are if they still fit, else on the least
        // loaded nodes without one; as many as fit.
        let before: &[NodeId] = state.apps.get(name).map_or(&[], |a| &a.more[..]);
        let want = app.spec.instance_count().max(1) as usize;
        let mut nodes = vec![node];
        loop {
            let next = *nodes.last().expect("one");
            let used = used_ports.entry(next).or_default();
            for p in &own_ports {
                used.insert(*p, name);
            }
            let count = load.entry(next).or_default();
            if by_load.remove(&(*count, next)) {
                by_load.insert((*count + 1, next));
            }
            *count += 1;
            reserved.entry(next).or_default().add(&app.spec);
            if nodes.len() >= want {
                break;
            }
            let free = |id: &NodeId| {
                !nodes.contains(id)
                    && usable(state, *id)
                    && misfit_on(*id, &reserved, &used_ports).is_none()
            };
            let Some(more) = before
                .iter()
                .copied()
                .find(|id| free(id))
                .or_else(|| by_load.iter().map(|(_, id)| *id).find(|id| free(id)))
            else {
                break;
            };
            nodes.push(more);
        }
        placed.insert(name.clone(), nodes);
    }
    let mut changes = Vec::new();
    for (name, old) in &state.apps {
        if !apps.contains_key(name) {
            changes.push(Change::Stop {
                app: name.clone(),
                node: old.node,
            });
        }
    }
    for (name, nodes) in &placed {
        let node = &nodes[0];
        match state.apps.get(name) {
            None => changes.push(Change::Start {
                app: name.clone(),
                node: *node,
            }),
            Some(old) if old.node != *node => changes.push(Change::Move {
                app: name.clone(),
                from: old.node,
                to: *node,
            }),
            Some(old) if old.spec != apps[name].spec || old.more != nodes[1..] => {
                changes.push(Change::Update {
                    app: name.clone(),
                    node: *node,
                })
            }
            Some(_) => {}
        }
    }
    Ok((placed, changes))
}

impl ClusterState {
    /// The whole configuration after deploying stack `stack` as `apps`: its apps replaced,
    /// every other app as it is (with the node it is pinned to). Refuses an app of the deploy
    /// that is not of `stack`, or whose name an app of another stack has.
    pub fn with_stack(
        &self,
        stack: Option<&str>,
        apps: &BTreeMap<String, PlannedApp>,
    ) -> Result<BTreeMap<String, PlannedApp>, ApplyError> {
        if let Some(s) = stack {
            crate::dataset::validate_dataset_name(s).map_err(|_| ApplyError::InvalidStackName {
                name: s.to_string(),
            })?;
        }
        let mut all: BTreeMap<String, PlannedApp> = self
            .apps
            .iter()
            .filter(|(_, a)| a.spec.stack.as_deref() != stack)
            .map(|(n, a)| (n.clone(), a.planned()))
            .collect();
        for (name, app) in apps {
            if app.spec.stack.as_deref() != stack {
                return Err(ApplyError::NotOfStack {
                    app: name.clone(),
                    stack: stack.unwrap_or_default().to_string(),
                });
            }
            if let Some(other) = all.get(name) {
                return Err(ApplyError::AppOfOtherStack {
                    app: name.clone(),
                    other: other.spec.stack.clone().unwrap_or_default(),
                });
            }
        }
        all.extend(apps.iter().map(|(n, a)| (n.clone(), a.clone())));
        if all.len() > crate::limits::MAX_DEPLOY_APPS {
            return Err(crate::limits::too_large(
                "the number of apps in the cluster".into(),
                all.len(),
                crate::limits::MAX_DEPLOY_APPS,
            ));
        }
        Ok(all)
    }

    pub(crate) fn deploy(
        &mut self,
        stack: Option<&str>,
        apps: &BTreeMap<String, PlannedApp>,
        secrets: &BTreeMap<String, Vec<u8>>,
    ) -> Result<CommandResult, ApplyError> {
        let apps = &self.with_stack(stack, apps)?;
        let (mut placed, changes) = plan_deploy(self, apps)?;
        // Datasets first: every check that can fail is done, so the rest cannot half-apply.
        let mut next = self.clone();
        let mut new_apps = BTreeMap::new();
        // Service addresses: an app keeps its own; a new one takes the lowest free index.
        let mut taken: BTreeSet<u16> = apps
            .keys()
            .filter_map(|n| self.apps.get(n).and_then(|a| a.vip))
            .collect();
        let mut candidates = VIP_RANGE;
        for (name, app) in apps {
            let mut more = placed.remove(name).unwrap_or_default();
            let node = more.remove(0);
            let vip = match self.apps.get(name).and_then(|a| a.vip) {
                Some(v) => v,
                None => {
                    let v = candidates
                        .by_ref()
                        .find(|i| !taken.contains(i))
                        .ok_or(ApplyError::NoServiceAddress)?;
                    taken.insert(v);
                    v
                }
            };
            let dataset = match (&app.spec.volume, app.spec.dataset_name()) {
                (Some(vol), Some(ds_name)) => {
                    Some(match next.dataset_by_name(ds_name).map(|d| d.id) {
                        Some(id) => {
                            next.dataset_follows(id, node)?;
                            id
                        }
                        None => match next.create_dataset(ds_name, node, vol.maximum_size)? {
                            CommandResult::DatasetCreated { id } => id,
                            _ => unreachable!("create_dataset returns DatasetCreated"),
                        },
                    })
                }
                _ => None,
            };
            new_apps.insert(
                name.clone(),
                App {
                    spec: app.spec.clone(),
                    pinned: app.node,
                    node,
                    dataset,
                    vip: Some(vip),
                    more,
                    // Verdicts are about the instances that run this spec: an update restarts
                    // them, and they are starting again (a new count of instances restarts
                    // none; the ones that went are pruned below).
                    health: self
                        .apps
                        .get(name)
                        .filter(|old| same_but_count(&old.spec, &app.spec))
                        .map(|old| old.health.clone())
                        .unwrap_or_default(),
                },
            );
        }
        next.apps = new_apps;
        next.secrets.retain(|_, s| s.stack.as_deref() != stack);
        for (name, data) in secrets {
            if let Some(other) = next.secrets.get(name) {
                return Err(ApplyError::SecretOfOtherStack {
                    secret: name.clone(),
                    other: other.stack.clone().unwrap_or_default(),
                });
            }
            next.secrets.insert(
                name.clone(),
                crate::state::Secret {
                    stack: stack.map(str::to_string),
                    data: data.clone(),
                },
            );
        }
        for (name, app) in &next.apps {
            if let Some(m) = app
                .spec
                .secrets
                .iter()
                .find(|m| !next.secrets.contains_key(&m.secret))
            {
                return Err(ApplyError::UnknownSecret {
                    app: name.clone(),
                    secret: m.secret.clone(),
                });
            }
        }
        let total: usize = next.secrets.values().map(|s| s.data.len()).sum();
        if total > crate::limits::MAX_SECRETS_TOTAL_BYTES {
            return Err(crate::limits::too_large(
                "the secrets of the cluster".into(),
                total,
                crate::limits::MAX_SECRETS_TOTAL_BYTES,
            ));
        }
        next.deploy_generation += 1;
        *self = next;
        Ok(CommandResult::Deployed {
            generation: self.deploy_generation,
            changes,
        })
    }

    /// Makes dataset `id` go where its app goes: a move to `node` (the app keeps running on
    /// the primary until the move's handoff), or none when it is there already.
    fn dataset_follows(&mut self, id: DatasetId, node: NodeId) -> Result<(), ApplyError> {
        let Some(ds) = self.datasets.get(&id) else {
            return Err(ApplyError::UnknownDataset { id });
        };
        let target = ds.moving.as_ref().map(|m| m.to);
        if ds.primary == node {
            if target.is_some() {
                self.cancel_dataset_move(id)?;
            }
        } else if target != Some(node) {
            self.cancel_dataset_move(id)?;
            self.begin_dataset_move(id, node)?;
        }
        Ok(())
    }

    /// The nodes an instance of `app` may run on now, so may report health from: its
    /// instances' nodes, and while its dataset moves before the handoff, the primary.
    fn health_nodes(&self, app: &App) -> BTreeSet<NodeId> {
        self.app_runs_on(app)
            .into_iter()
            .chain(app.instance_nodes())
            .collect()
    }

    /// Drops recorded health of instances that are not where it was reported any more (moved,
    /// stopped, or the node left), so an old "healthy" never routes to a new instance: a new
    /// one has no record until its node reports it.
    pub(crate) fn prune_health(&mut self) {
        let keep: Vec<(String, BTreeSet<NodeId>)> = self
            .apps
            .iter()
            .filter(|(_, a)| !a.health.is_empty())
            .map(|(n, a)| (n.clone(), self.health_nodes(a)))
            .collect();
        for (name, nodes) in keep {
            if let Some(app) = self.apps.get_mut(&name) {
                app.health.retain(|n, _| nodes.contains(n));
            }
        }
    }

    /// [`Command::ReportHealth`]: `node` runs an instance of `app`, whose health is `health`.
    pub(crate) fn report_health(
        &mut self,
        app: &str,
        node: NodeId,
        health: Health,
    ) -> Result<CommandResult, ApplyError> {
        let a = self.apps.get(app).ok_or_else(|| ApplyError::UnknownApp {
            name: app.to_string(),
        })?;
        if !self.health_nodes(a).contains(&node) {
            return Err(ApplyError::NotPlacedOn {
                app: app.to_string(),
                node,
            });
        }
        let before = self
            .apps
            .get_mut(app)
            .and_then(|a| a.health.insert(node, health));
        Ok(CommandResult::HealthReported {
            changed: before != Some(health),
        })
    }

    /// Where app `app` may run now: its node, or while its dataset moves, the dataset's
    /// primary until the handoff, then nowhere until the move commits. `None` also while its
    /// dataset is not on its node for another reason, and while its dataset is held (a
    /// rollback). The app agents start an app only where
    /// this says, so an app with a dataset never runs in two places.
    pub fn app_runs_on(&self, app: &App) -> Option<NodeId> {
        let Some(id) = app.dataset else {
            return Some(app.node);
        };
        let ds = self.datasets.get(&id)?;
        if ds.hold.is_some() {
            return None;
        }
        match &ds.moving {
            Some(m) if m.handoff => None,
            Some(_) => Some(ds.primary),
            None => (ds.primary == app.node).then_some(app.node),
        }
    }

    /// The app an instance key ([`instance_key`]) names, as that instance: the app itself for
    /// its name, instance N (on its own node) for `NAME.N`.
    pub fn instance_app(&self, key: &str) -> Option<std::borrow::Cow<'_, App>> {
        if let Some(a) = self.apps.get(key) {
            return Some(std::borrow::Cow::Borrowed(a));
        }
        let (base, index) = key.rsplit_once('.')?;
        let i: usize = index.parse().ok().filter(|i| *i >= 2)?;
        if instance_key(base, i) != key {
            return None;
        }
        self.apps
            .get(base)?
            .instance(i)
            .map(std::borrow::Cow::Owned)
    }

    /// The deploy that runs `instances` instances of app `name` (`flockctl app scale`): its
    /// stack (or the apps outside stacks) deployed again as it is, with that count, so the same
    /// placement and checks hold.
    pub fn scale_command(&self, name: &str, instances: u32) -> Result<Command, ApplyError> {
        self.stack_deploy(name, |apps| {
            if let Some(p) = apps.get_mut(name) {
                p.spec.instances = (instances != 1).then_some(instances);
            }
        })
    }

    /// The deploy that removes app `name` (`flockctl app rm`): its stack without it.
    pub fn remove_command(&self, name: &str) -> Result<Command, ApplyError> {
        self.stack_deploy(name, |apps| {
            apps.remove(name);
        })
    }

    /// The deploy of app `name`'s stack (or of the apps outside stacks) as it is, with its
    /// secrets, after `change` to its apps.
    fn stack_deploy(
        &self,
        name: &str,
        change: impl FnOnce(&mut BTreeMap<String, PlannedApp>),
    ) -> Result<Command, ApplyError> {
        let app = self.apps.get(name).ok_or_else(|| ApplyError::UnknownApp {
            name: name.to_string(),
        })?;
        let stack = app.spec.stack.clone();
        let mut apps: BTreeMap<String, PlannedApp> = self
            .apps
            .iter()
            .filter(|(_, a)| a.spec.stack == stack)
            .map(|(n, a)| (n.clone(), a.planned()))
            .collect();
        change(&mut apps);
        let secrets: BTreeMap<String, Vec<u8>> = self
            .secrets
            .iter()
            .filter(|(_, s)| s.stack == stack)
            .map(|(n, s)| (n.clone(), s.data.clone()))
            .collect();
        Ok(Command::Deploy {
            stack,
            apps,
            secrets,
        })
    }

    pub(crate) fn move_app(&mut self, name: &str, to: NodeId) -> Result<CommandResult, ApplyError> {
        let app = self
            .apps
            .get(name)
            .ok_or_else(|| ApplyError::UnknownApp {
                name: name.to_string(),
            })?
            .clone();
        self.usable_node(to)?;
        let node = &self.nodes[&to];
        if node.state == NodeState::Draining {
            return Err(ApplyError::NodeDraining {
                name: node.name.clone(),
            });
        }
        // One instance per node: a scaled app's first does not join another of its own.
        if app.placed_on(to) {
            return Err(ApplyError::AppAlreadyThere {
                app: name.to_string(),
                node: node.name.clone(),
            });
        }
        // The apps sharing its dataset (one compose volume) go with it.
        let group: Vec<String> = match app.dataset {
            Some(id) => self.apps_of_dataset(id).map(|(n, _)| n.clone()).collect(),
            None => vec![name.to_string()],
        };
        let mut reserved = Reserved::default();
        for other in self
            .apps
            .iter()
            .filter(|(n, a)| !group.contains(n) && a.node == to)
        {
            reserved.add(&other.1.spec);
        }
        for member in &group {
            let spec = &self.apps[member].spec;
            let ports = internal_ports(spec);
            let taken = self
                .apps
                .iter()
                .filter(|(n, a)| !group.contains(n) && a.node == to)
                .find_map(|(n, a)| {
                    internal_ports(&a.spec)
                        .intersection(&ports)
                        .next()
                        .map(|p| format!("app {n} there takes internal port {p} too"))
                });
            if let Some(reason) = taken.or_else(|| misfit(node, spec, reserved)) {
                return Err(ApplyError::PinnedMisfit {
                    app: member.clone(),
                    node: node.name.clone(),
                    reason,
                });
            }
            reserved.add(spec);
        }
        let mut next = self.clone();
        if let Some(id) = app.dataset {
            next.dataset_follows(id, to)?;
        }
        for member in &group {
            let moved = next.apps.get_mut(member).expect("checked above");
            moved.node = to;
            moved.pinned = Some(to);
        }
        *self = next;
        Ok(CommandResult::AppMoved {
            from: app.node,
            dataset: app.dataset,
        })
    }

    pub(crate) fn cancel_app_move(&mut self, name: &str) -> Result<CommandResult, ApplyError> {
        let app = self.apps.get(name).ok_or_else(|| ApplyError::UnknownApp {
            name: name.to_string(),
        })?;
        let moving = app
            .dataset
            .and_then(|id| self.datasets.get(&id))
            .filter(|d| d.moving.is_some())
            .map(|d| (d.id, d.primary));
        let Some((id, primary)) = moving else {
            return Err(ApplyError::AppNotMoving {
                app: name.to_string(),
            });
        };
        self.cancel_dataset_move(id)?;
        let app = self.apps.get_mut(name).expect("checked above");
        app.node = primary;
        app.pinned = Some(primary);
        Ok(CommandResult::AppMoveCancelled { node: primary })
    }

    /// Apps that use dataset `id`.
    pub fn apps_of_dataset(&self, id: DatasetId) -> impl Iterator<Item = (&String, &App)> {
        self.apps.iter().filter(move |(_, a)| a.dataset == Some(id))
    }

    /// External ports in use, by app.
    pub fn published_ports(&self) -> BTreeSet<u16> {
        self.apps
            .values()
            .flat_map(|a| a.spec.ports.iter().map(|p| p.external))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use crate::testutil::{cluster, spec};
    use proptest::prelude::*;

    fn plan(apps: &[(&str, Option<u16>, bool, Option<NodeId>)]) -> BTreeMap<String, PlannedApp> {
        apps.iter()
            .map(|(n, p, v, node)| {
                (
                    n.to_string(),
                    PlannedApp {
                        spec: spec(n, *p, *v),
                        node: *node,
                    },
                )
            })
            .collect()
    }

    fn deploy(s: &mut ClusterState, apps: &BTreeMap<String, PlannedApp>) -> CommandResult {
        s.apply(&Command::deploy_all(apps.clone()))
    }

    fn report(s: &mut ClusterState, app: &str, node: NodeId, health: Health) -> CommandResult {
        s.apply(&Command::ReportHealth {
            app: app.into(),
            node,
            health,
        })
    }

    #[test]
    fn health_is_recorded_per_instance_and_gates_its_routing() {
        let mut s = cluster(3);
        let mut apps = plan(&[("web", None, false, None)]);
        apps.get_mut("web").unwrap().spec.instances = Some(2);
        assert!(matches!(
            deploy(&mut s, &apps),
            CommandResult::Deployed { .. }
        ));
        let nodes: Vec<NodeId> = s.apps["web"].instance_nodes().collect();
        let (a, b) = (nodes[0], nodes[1]);
        let idle = (1..=3).find(|n| !nodes.contains(n)).unwrap();
        // No record: routed, as before health was recorded.
        assert!(s.apps["web"].serves_on(a) && s.apps["web"].serves_on(b));
        assert_eq!(
            report(&mut s, "web", a, Health::Starting),
            CommandResult::HealthReported { changed: true }
        );
        assert_eq!(
            report(&mut s, "web", b, Health::Healthy),
            CommandResult::HealthReported { changed: true }
        );
        assert_eq!(
            report(&mut s, "web", b, Health::Healthy),
            CommandResult::HealthReported { changed: false }
        );
        assert!(!s.apps["web"].serves_on(a) && s.apps["web"].serves_on(b));
        report(&mut s, "web", a, Health::Healthy);
        report(&mut s, "web", b, Health::Unhealthy);
        assert!(s.apps["web"].serves_on(a) && !s.apps["web"].serves_on(b));
        // Only from a node that has an instance, only of an app that exists; a refusal
        // changes nothing.
        let before = s.clone();
        assert_eq!(
            report(&mut s, "web", idle, Health::Healthy),
            CommandResult::Rejected(ApplyError::NotPlacedOn {
                app: "web".into(),
                node: idle
            })
        );
        assert!(matches!(
            report(&mut s, "nope", a, Health::Healthy),
            CommandResult::Rejected(ApplyError::UnknownApp { .. })
        ));
        assert_eq!(s, before);
        // The same deploy again keeps the records; a changed spec restarts the instances,
        // whose verdicts then start over.
        deploy(&mut s, &apps);
        assert_eq!(s.apps["web"].health.len(), 2);
        apps.get_mut("web").unwrap().spec.environment =
            BTreeMap::from([("V".to_string(), "2".to_string())]);
        deploy(&mut s, &apps);
        assert!(s.apps["web"].health.is_empty());
        // Scaled down to one: the record of the instance that stopped goes.
        report(&mut s, "web", a, Health::Healthy);
        report(&mut s, "web", b, Health::Unhealthy);
        apps.get_mut("web").unwrap().spec.instances = Some(1);
        deploy(&mut s, &apps);
        assert_eq!(s.apps["web"].health, BTreeMap::from([(a, Health::Healthy)]));
        // Moved: the new instance has no record until its node reports one.
        assert!(matches!(
            s.apply(&Command::MoveApp {
                app: "web".into(),
                to: idle
            }),
            CommandResult::AppMoved { .. }
        ));
        assert!(s.apps["web"].health.is_empty());
        // Key-value writes leave records alone (and do not look at them).
        report(&mut s, "web", idle, Health::Starting);
        s.apply(&Command::KvPut {
            key: "k".into(),
            value: "v".into(),
        });
        assert_eq!(
            s.apps["web"].health,
            BTreeMap::from([(idle, Health::Starting)])
        );
        // Removed with its app.
        deploy(&mut s, &BTreeMap::new());
        assert!(!s.apps.contains_key("web"));
    }

    #[test]
    fn a_stateful_app_reports_from_its_primary_until_the_handoff() {
        let mut s = cluster(2);
        let apps = plan(&[("db", None, true, Some(1))]);
        deploy(&mut s, &apps);
        report(&mut s, "db", 1, Health::Healthy);
        // Moving to node 2: it runs on node 1 until the handoff, its record stays.
        assert!(matches!(
            s.apply(&Command::MoveApp {
                app: "db".into(),
                to: 2
            }),
            CommandResult::AppMoved { .. }
        ));
        assert_eq!(s.apps["db"].node, 2);
        assert_eq!(s.apps["db"].health, BTreeMap::from([(1, Health::Healthy)]));
        assert_eq!(
            report(&mut s, "db", 1, Health::Unhealthy),
            CommandResult::HealthReported { changed: true }
        );
        // The handoff stops it on node 1: nothing recorded runs any more.
        let ds = s.apps["db"].dataset.unwrap();
        let epoch = s.datasets[&ds].epoch;
        assert_eq!(
            s.apply(&Command::HandoffDatasetMove {
                dataset: ds,
                epoch,
                to: 2
            }),
            CommandResult::HandedOff
        );
        assert!(s.apps["db"].health.is_empty());
    }

    #[test]
    fn app_json_without_health_reads_as_before_and_with_it_roundtrips() {
        let mut s = cluster(1);
        deploy(&mut s, &plan(&[("web", None, false, None)]));
        let app = s.apps["web"].clone();
        let text = serde_json::to_string(&app).unwrap();
        // Nothing recorded: the JSON is what builds before health wrote.
        assert!(!text.contains("health\""), "{text}");
        let back: App = serde_json::from_str(&text).unwrap();
        assert_eq!(back, app);
        let mut with = app.clone();
        with.health.insert(1, Health::Unhealthy);
        let text = serde_json::to_string(&with).unwrap();
        assert!(text.contains("\"health\":{\"1\":\"Unhealthy\"}"), "{text}");
        assert_eq!(serde_json::from_str::<App>(&text).unwrap(), with);
    }

    #[test]
    fn instances_spread_one_per_node_and_wait_where_none_fits() {
        let mut s = cluster(3);
        let mut apps = plan(&[
            ("web", Some(8080), false, None),
            ("other", None, false, None),
        ]);
        apps.get_mut("web").unwrap().spec.instances = Some(5);
        assert!(matches!(
            deploy(&mut s, &apps),
            CommandResult::Deployed { .. }
        ));
        let web = &s.apps["web"];
        let mut nodes: Vec<NodeId> = web.instance_nodes().collect();
        nodes.sort();
        // Port 80 inside is taken on each node it runs on: three of five fit.
        assert_eq!(nodes, [1, 2, 3]);
        assert_eq!(web.instance(2).map(|a| a.node), Some(web.more[0]));
        assert_eq!(web.instance(4), None);
        assert_eq!(instance_key("web", 1), "web");
        assert_eq!(instance_key("web", 3), "web.3");
        // The first does not move onto a node of another of its instances.
        assert!(matches!(
            s.apply(&Command::MoveApp {
                app: "web".into(),
                to: s.apps["web"].more[0]
            }),
            CommandResult::Rejected(ApplyError::AppAlreadyThere { .. })
        ));
        let web = &s.apps["web"];
        // Scaled down to 2: the first two stay where they are.
        let before: Vec<NodeId> = web.instance_nodes().collect();
        assert!(matches!(
            s.apply(&s.scale_command("web", 2).unwrap()),
            CommandResult::Deployed { .. }
        ));
        let after: Vec<NodeId> = s.apps["web"].instance_nodes().collect();
        assert_eq!(after, before[..2]);
        assert_eq!(s.apps["web"].spec.instances, Some(2));
        // Back to one: the count is left unset, as a deploy without it writes.
        s.apply(&s.scale_command("web", 1).unwrap());
        assert_eq!(
            (s.apps["web"].spec.instances, s.apps["web"].more.len()),
            (None, 0)
        );
    }

    #[test]
    fn a_stateful_app_or_a_taken_key_refuses_more_instances() {
        let mut s = cluster(2);
        let apps = plan(&[("db", None, true, None), ("web", None, false, None)]);
        assert!(matches!(
            deploy(&mut s, &apps),
            CommandResult::Deployed { .. }
        ));
        let r = s.apply(&s.scale_command("db", 2).unwrap());
        let CommandResult::Rejected(e) = r else {
            panic!("{r:?}")
        };
        assert!(e.to_string().contains("one writer"), "{e}");
        for n in [0, 2] {
            let r = s.apply(&s.scale_command("web", n).unwrap());
            assert_eq!(
                matches!(r, CommandResult::Rejected(ApplyError::InstanceCount { .. })),
                n == 0,
                "{n}: {r:?}"
            );
        }
        let mut apps = plan(&[("web", None, false, None), ("web.2", None, false, None)]);
        apps.get_mut("web").unwrap().spec.instances = Some(2);
        let r = deploy(&mut s, &apps);
        assert!(
            matches!(&r, CommandResult::Rejected(ApplyError::InstanceCount { why, .. }) if why.contains("web.2")),
            "{r:?}"
        );
        assert!(matches!(
            s.scale_command("nope", 2),
            Err(ApplyError::UnknownApp { .. })
        ));
    }

    /// The apps of stack `stack`: (service, external port, volume).
    fn stack_plan(stack: &str, apps: &[(&str, Option<u16>, bool)]) -> BTreeMap<String, PlannedApp> {
        apps.iter()
            .map(|(svc, p, v)| {
                let name = format!("{stack}_{svc}");
                let mut spec = spec(&name, *p, *v);
                spec.stack = Some(stack.into());
                spec.service = Some(svc.to_string());
                (name, PlannedApp { spec, node: None })
            })
            .collect()
    }

    fn deploy_stack(
        s: &mut ClusterState,
        stack: &str,
        apps: BTreeMap<String, PlannedApp>,
        secrets: &[(&str, &str)],
    ) -> CommandResult {
        s.apply(&Command::Deploy {
            stack: Some(stack.into()),
            apps,
            secrets: secrets
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        })
    }

    #[test]
    fn a_stack_deploy_changes_only_its_own_apps() {
        let mut s = cluster(3);
        deploy(&mut s, &plan(&[("legacy", Some(81), false, None)]));
        let shop = stack_plan("shop", &[("db", None, true), ("web", Some(80), false)]);
        let r = deploy_stack(&mut s, "shop", shop.clone(), &[("shop_pw", "s3cret")]);
        assert!(matches!(r, CommandResult::Deployed { .. }), "{r:?}");
        let blog = stack_plan("blog", &[("db", None, true)]);
        let r = deploy_stack(&mut s, "blog", blog, &[]);
        let CommandResult::Deployed { changes, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            changes,
            [Change::Start {
                app: "blog_db".into(),
                node: s.apps["blog_db"].node
            }]
        );
        assert_eq!(
            s.apps.keys().collect::<Vec<_>>(),
            ["blog_db", "legacy", "shop_db", "shop_web"]
        );
        // Every app has its own service address, kept across deploys.
        let vips: BTreeSet<u16> = s.apps.values().filter_map(|a| a.vip).collect();
        assert_eq!(vips.len(), 4);
        let shop_db_vip = s.apps["shop_db"].vip;
        // Deploying shop again without web stops web only; the whole-configuration deploy
        // replaces only the apps outside stacks.
        let r = deploy_stack(
            &mut s,
            "shop",
            stack_plan("shop", &[("db", None, true)]),
            &[],
        );
        let CommandResult::Deployed { changes, .. } = r else {
            panic!("{r:?}")
        };
        assert!(
            matches!(changes.as_slice(), [Change::Stop { app, .. }] if app == "shop_web"),
            "{changes:?}"
        );
        assert_eq!(s.apps["shop_db"].vip, shop_db_vip);
        assert!(
            s.secrets.is_empty(),
            "shop's deploy without secrets drops them"
        );
        let CommandResult::Deployed { changes, .. } = deploy(&mut s, &BTreeMap::new()) else {
            panic!()
        };
        assert!(
            matches!(changes.as_slice(), [Change::Stop { app, .. }] if app == "legacy"),
            "{changes:?}"
        );
        assert_eq!(s.apps.keys().collect::<Vec<_>>(), ["blog_db", "shop_db"]);
        // Removing a stack: its deploy with no apps.
        deploy_stack(&mut s, "blog", BTreeMap::new(), &[]);
        assert_eq!(s.apps.keys().collect::<Vec<_>>(), ["shop_db"]);
        assert!(
            s.dataset_by_name("blog_db").is_some(),
            "a stack's datasets stay"
        );
    }

    #[test]
    fn apps_sharing_a_volume_share_its_dataset_and_their_node() {
        let mut s = cluster(3);
        // Spread would put them on different nodes: the volume keeps them together.
        let mut apps = stack_plan(
            "p",
            &[("a", None, true), ("b", None, true), ("c", None, false)],
        );
        for n in ["p_a", "p_b"] {
            apps.get_mut(n)
                .unwrap()
                .spec
                .volume
                .as_mut()
                .unwrap()
                .dataset = Some("p_data".into());
        }
        let r = deploy_stack(&mut s, "p", apps.clone(), &[]);
        assert!(matches!(r, CommandResult::Deployed { .. }), "{r:?}");
        let ds = s.dataset_by_name("p_data").unwrap().id;
        assert_eq!(
            (s.apps["p_a"].dataset, s.apps["p_b"].dataset),
            (Some(ds), Some(ds))
        );
        assert_eq!(s.apps["p_a"].node, s.apps["p_b"].node);
        assert_ne!(s.apps["p_c"].node, s.apps["p_a"].node);
        assert_eq!(s.datasets.len(), 1);
        // Moving one moves both, with the dataset.
        let to = if s.apps["p_a"].node == 3 { 2 } else { 3 };
        let r = s.apply(&Command::MoveApp {
            app: "p_b".into(),
            to,
        });
        assert!(matches!(r, CommandResult::AppMoved { .. }), "{r:?}");
        assert_eq!((s.apps["p_a"].node, s.apps["p_b"].node), (to, to));
        assert_eq!(s.datasets[&ds].moving.as_ref().map(|m| m.to), Some(to));
        // Two sizes for one volume, or pins on two nodes: refused.
        let mut sized = apps.clone();
        sized
            .get_mut("p_a")
            .unwrap()
            .spec
            .volume
            .as_mut()
            .unwrap()
            .maximum_size = Some(1 << 30);
        let r = deploy_stack(&mut s, "p", sized, &[]);
        assert!(
            matches!(
                &r,
                CommandResult::Rejected(ApplyError::SharedVolumeMismatch { .. })
            ),
            "{r:?}"
        );
        let mut pinned = apps.clone();
        pinned.get_mut("p_a").unwrap().node = Some(1);
        pinned.get_mut("p_b").unwrap().node = Some(2);
        let r = deploy_stack(&mut s, "p", pinned, &[]);
        let CommandResult::Rejected(e) = &r else {
            panic!("{r:?}")
        };
        assert!(e.to_string().contains("share volume \"p_data\""), "{e}");
    }

    #[test]
    fn a_stack_cannot_take_another_stacks_app_or_secret() {
        let mut s = cluster(2);
        deploy_stack(
            &mut s,
            "a",
            stack_plan("a", &[("x", None, false)]),
            &[("a_k", "1")],
        );
        // An app of stack b named like a's app.
        let mut stolen = stack_plan("a", &[("x", None, false)]);
        stolen.get_mut("a_x").unwrap().spec.stack = Some("b".into());
        let r = deploy_stack(&mut s, "b", stolen, &[]);
        assert!(
            matches!(&r, CommandResult::Rejected(ApplyError::AppOfOtherStack { app, other }) if app == "a_x" && other == "a"),
            "{r:?}"
        );
        // An app that says it is of another stack than the deploy's.
        let r = deploy_stack(&mut s, "b", stack_plan("a", &[("y", None, false)]), &[]);
        assert!(
            matches!(&r, CommandResult::Rejected(ApplyError::NotOfStack { .. })),
            "{r:?}"
        );
        let r = deploy_stack(&mut s, "b", BTreeMap::new(), &[("a_k", "2")]);
        assert!(
            matches!(
                &r,
                CommandResult::Rejected(ApplyError::SecretOfOtherStack { .. })
            ),
            "{r:?}"
        );
        let r = deploy_stack(&mut s, "no/slash", BTreeMap::new(), &[]);
        assert!(
            matches!(
                &r,
                CommandResult::Rejected(ApplyError::InvalidStackName { .. })
            ),
            "{r:?}"
        );
        assert_eq!(s.secrets["a_k"].data, b"1");
        // A secret's content is never in the state's debug output.
        assert!(!format!("{:?}", s.secrets).contains("[49]"));
    }

    #[test]
    fn deploy_places_creates_datasets_and_twice_changes_nothing() {
        let mut s = cluster(3);
        let p = plan(&[
            ("db", Some(5432), true, Some(2)),
            ("web", Some(80), false, None),
            ("worker", None, false, None),
        ]);
        let CommandResult::Deployed { changes, .. } = deploy(&mut s, &p) else {
            panic!()
        };
        assert_eq!(changes.len(), 3);
        assert_eq!(s.apps["db"].node, 2);
        // Spread: web and worker avoid n2 (which has db) and each other.
        assert_eq!((s.apps["web"].node, s.apps["worker"].node), (1, 3));
        let ds = s.dataset_by_name("db").unwrap();
        assert_eq!((ds.primary, s.apps["db"].dataset), (2, Some(ds.id)));
        let before = s.clone();
        let CommandResult::Deployed { changes, .. } = deploy(&mut s, &p) else {
            panic!()
        };
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(s.apps, before.apps);
        assert_eq!(s.datasets, before.datasets);
    }

    #[test]
    fn a_repinned_app_moves_with_its_dataset_and_a_dropped_app_stops() {
        let mut s = cluster(3);
        deploy(
            &mut s,
            &plan(&[("db", None, true, Some(1)), ("old", None, false, None)]),
        );
        let CommandResult::Deployed { changes, .. } =
            deploy(&mut s, &plan(&[("db", None, true, Some(3))]))
        else {
            panic!()
        };
        assert!(changes.contains(&Change::Move {
            app: "db".into(),
            from: 1,
            to: 3
        }));
        assert!(changes
            .iter()
            .any(|c| matches!(c, Change::Stop { app, .. } if app == "old")));
        let ds = s.dataset_by_name("db").unwrap();
        assert_eq!(ds.primary, 1, "the data moves first");
        assert_eq!(ds.moving.as_ref().map(|m| m.to), Some(3));
        assert!(!s.apps.contains_key("old"));
    }

    #[test]
    fn bad_deploys_change_nothing() {
        let mut s = cluster(2);
        deploy(&mut s, &plan(&[("db", Some(1000), true, None)]));
        let before = s.clone();
        for bad in [
            plan(&[("a", Some(80), false, None), ("b", Some(80), false, None)]),
            plan(&[("a", None, false, Some(9))]),
            plan(&[("bad/name", None, false, None)]),
        ] {
            let r = deploy(&mut s, &bad);
            assert!(matches!(r, CommandResult::Rejected(_)), "{r:?}");
            assert_eq!(s, before);
        }
    }

    #[test]
    fn an_app_moves_in_two_phases_and_never_runs_in_two_places() {
        let mut s = cluster(3);
        deploy(&mut s, &plan(&[("db", Some(5432), true, Some(1))]));
        let id = s.apps["db"].dataset.unwrap();
        let runs = |s: &ClusterState| s.app_runs_on(&s.apps["db"]);
        assert_eq!(runs(&s), Some(1));
        let r = s.apply(&Command::MoveApp {
            app: "db".into(),
            to: 2,
        });
        assert_eq!(
            r,
            CommandResult::AppMoved {
                from: 1,
                dataset: Some(id)
            }
        );
        // Phase one: it keeps running on the primary while the data streams.
        assert_eq!((s.apps["db"].node, runs(&s)), (2, Some(1)));
        s.apply(&Command::RecordSnapshot {
            dataset: id,
            epoch: 1,
            snapshot: crate::dataset::SnapshotRecord {
                name: "m1".into(),
                guid: 7,
                created_unix: 0,
                epoch: 1,
            },
        });
        let commit = Command::CommitDatasetMove {
            dataset: id,
            epoch: 1,
            to: 2,
            snapshot: "m1".into(),
        };
        assert!(matches!(
            s.apply(&commit),
            CommandResult::Rejected(ApplyError::NotHandedOff { .. })
        ));
        // Phase two: nowhere until the commit, then on the target under epoch 2.
        assert_eq!(
            s.apply(&Command::HandoffDatasetMove {
                dataset: id,
                epoch: 1,
                to: 2
            }),
            CommandResult::HandedOff
        );
        assert_eq!(runs(&s), None);
        assert_eq!(s.apply(&commit), CommandResult::MoveCommitted { epoch: 2 });
        assert_eq!(runs(&s), Some(2));
        // Moving it back and cancelling, before and after the handoff: back on the primary.
        s.apply(&Command::MoveApp {
            app: "db".into(),
            to: 3,
        });
        assert_eq!(runs(&s), Some(2));
        assert_eq!(
            s.apply(&Command::CancelAppMove { app: "db".into() }),
            CommandResult::AppMoveCancelled { node: 2 }
        );
        assert_eq!(
            (s.apps["db"].node, runs(&s), s.datasets[&id].moving.clone()),
            (2, Some(2), None)
        );
        s.apply(&Command::MoveApp {
            app: "db".into(),
            to: 3,
        });
        s.apply(&Command::HandoffDatasetMove {
            dataset: id,
            epoch: 2,
            to: 3,
        });
        assert_eq!(runs(&s), None);
        s.apply(&Command::CancelAppMove { app: "db".into() });
        assert_eq!(runs(&s), Some(2));
        // Bad input.
        assert!(matches!(
            s.apply(&Command::MoveApp {
                app: "nope".into(),
                to: 3
            }),
            CommandResult::Rejected(ApplyError::UnknownApp { .. })
        ));
        assert!(matches!(
            s.apply(&Command::MoveApp {
                app: "db".into(),
                to: 2
            }),
            CommandResult::Rejected(ApplyError::AppAlreadyThere { .. })
        ));
        assert!(matches!(
            s.apply(&Command::MoveApp {
                app: "db".into(),
                to: 9
            }),
            CommandResult::Rejected(ApplyError::UnknownNode { .. })
        ));
        assert!(matches!(
            s.apply(&Command::CancelAppMove { app: "db".into() }),
            CommandResult::Rejected(ApplyError::AppNotMoving { .. })
        ));
        // A redeploy that puts it back where its data is cancels the move.
        s.apply(&Command::MoveApp {
            app: "db".into(),
            to: 3,
        });
        deploy(&mut s, &plan(&[("db", Some(5432), true, Some(2))]));
        assert_eq!((runs(&s), s.datasets[&id].moving.clone()), (Some(2), None));
    }

    proptest! {
        /// Any sequence of deploys: external ports never collide, every app sits on a member,
        /// an app with a volume has its dataset, and deploying the same config again is a no-op.
        #[test]
        fn deploys_keep_the_invariants(rounds in prop::collection::vec(
            prop::collection::vec((0..6usize, prop::option::of(0..4u16), any::<bool>(), prop::option::of(1..4u64)), 0..6),
            1..6,
        )) {
            let names = ["a", "b", "c", "d", "e", "f"];
            let mut s = cluster(3);
            for round in rounds {
                let apps: Vec<_> = round
                    .iter()
                    .map(|(i, p, v, n)| (names[*i], p.map(|p| 8000 + p), *v, *n))
                    .collect();
                let p = plan(&apps);
                let before = s.clone();
                match deploy(&mut s, &p) {
                    CommandResult::Rejected(_) => prop_assert_eq!(&s, &before),
                    CommandResult::Deployed { .. } => {
                        let mut ports = BTreeSet::new();
                        for (name, app) in &s.apps {
                            prop_assert!(s.nodes.contains_key(&app.node));
                            for port in &app.spec.ports {
                                prop_assert!(ports.insert(port.external), "port {} twice", port.external);
                            }
                            prop_assert_eq!(app.spec.volume.is_some(), app.dataset.is_some());
                            if let Some(id) = app.dataset {
                                let ds = &s.datasets[&id];
                                prop_assert_eq!(&ds.name, name);
                                prop_assert!(ds.primary == app.node || ds.moving.as_ref().map(|m| m.to) == Some(app.node));
                            }
                        }
                        let again = s.clone();
                        let CommandResult::Deployed { changes, .. } = deploy(&mut s, &p) else {
                            panic!("a config that deployed once deploys again")
                        };
                        prop_assert!(changes.is_empty());
                        prop_assert_eq!(&s.apps, &again.apps);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }

        /// Nodes with reported capacity and labels, apps with reservations, images and
        /// constraints: a deploy that succeeds never puts more on a node than it reported, an
        /// image only where docker works, an app only where its constraints hold; a rejected one
        /// changes nothing; and the same config again changes nothing.
        #[test]
        fn deploys_never_overcommit_a_node(
            nodes in prop::collection::vec((1..5u64, 1..3u32, any::<bool>(), any::<bool>()), 1..5),
            rounds in prop::collection::vec(
                prop::collection::vec(
                    (0..6usize, prop::option::of(1..6u64), prop::option::of(1..5u64), any::<bool>(), prop::option::of(any::<bool>()), prop::option::of(1..5u64)),
                    0..6,
                ),
                1..5,
            ),
        ) {
            const GIB: u64 = 1 << 30;
            let names = ["a", "b", "c", "d", "e", "f"];
            let mut s = cluster(nodes.len() as u64);
            for (i, (mem, cpus, docker, ssd)) in nodes.iter().enumerate() {
                let labels = if *ssd { [("disk".to_string(), "ssd".to_string())].into() } else { BTreeMap::new() };
                let r = s.apply(&Command::ReportNode {
                    id: i as u64 + 1,
                    labels: Some(labels),
                    capacity: crate::fit::Capacity { memory: mem * GIB, cpus: *cpus, docker: *docker },
                });
                prop_assert_eq!(r, CommandResult::NodeReported);
            }
            for round in rounds {
                let p: BTreeMap<String, PlannedApp> = round
                    .iter()
                    .map(|(i, mem, cpu, image, ssd, pin)| {
                        let mut spec = spec(names[*i], None, false);
                        spec.mem_limit = mem.map(|m| m * GIB / 2);
                        spec.cpu_shares = cpu.map(|c| c * 512);
                        if *image {
                            spec.image = Some("busybox".into());
                        }
                        if let Some(want) = ssd {
                            let op = if *want { "==" } else { "!=" };
                            spec.constraints = vec![format!("node.labels.disk {op} ssd").parse().unwrap()];
                        }
                        let node = pin.filter(|n| *n <= nodes.len() as u64);
                        (names[*i].to_string(), PlannedApp { spec, node })
                    })
                    .collect();
                let before = s.clone();
                match deploy(&mut s, &p) {
                    CommandResult::Rejected(e) => {
                        prop_assert!(matches!(e, ApplyError::PinnedMisfit { .. } | ApplyError::NoFittingNode { .. }), "{e}");
                        prop_assert_eq!(&s, &before);
                    }
                    CommandResult::Deployed { .. } => {
                        let mut used: BTreeMap<NodeId, Reserved> = BTreeMap::new();
                        for app in s.apps.values() {
                            let node = &s.nodes[&app.node];
                            prop_assert_eq!(misfit(node, &app.spec, Reserved::default()), None);
                            used.entry(app.node).or_default().add(&app.spec);
                        }
                        for (id, r) in &used {
                            let cap = s.nodes[id].capacity.clone().unwrap();
                            prop_assert!(r.memory <= cap.memory, "node {} memory {} of {}", id, r.memory, cap.memory);
                            prop_assert!(r.cpu_shares <= cap.cpu_shares(), "node {} cpu {} of {}", id, r.cpu_shares, cap.cpu_shares());
                        }
                        let CommandResult::Deployed { changes, .. } = deploy(&mut s, &p) else {
                            panic!("a config that deployed once deploys again")
                        };
                        prop_assert!(changes.is_empty(), "{:?}", changes);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }
}
