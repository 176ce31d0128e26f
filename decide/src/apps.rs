//! The apps decision: which app instances this node should start, stop, update or restart,
//! given the replicated state, what its drivers and backend report, and the time.
//!
//! - An app runs where [`ClusterState::app_runs_on`] says: its node, or while its dataset moves,
//!   the dataset's primary until the move's handoff; never on a copy that is not the current
//!   one, nor in two places.
//! - An instance started from another spec is stopped and started again (an update).
//! - An instance whose app may not run here now is removed.
//! - An exited app is restarted per its restart policy after [`restart_backoff`]; on-failure
//!   gives up after its maximum.
//! - Fail closed: an app whose driver could not be listed, or whose instance's state is
//!   unknown, is never started nor counted as exited; a dataset copy that could not be read
//!   counts as not ready.
//! - A start is decided from a state that may be stale by the time it is carried out, so it
//!   carries a [`StartGuard`]: the executor re-checks it with [`may_start`] against the latest
//!   applied state, under the dataset's start gate that a move holds from its stop check on.
//!
//! [`AppsCore::decide`] is called with observations; it returns [`AppAction`]s grouped per app
//! (carry them out in order; when one fails, skip that app's later actions) and the executor
//! reports results back through [`AppsCore::started`], [`AppsCore::logs`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use flock_scheduler::app::instance_key;
use flock_scheduler::config::RestartPolicy;
use flock_scheduler::dataset::DatasetId;
use flock_scheduler::state::host_of;
use flock_scheduler::{App, ClusterState, NodeId};

use crate::Instant;

/// The longest wait before restarting an exited app (or retrying a start that failed).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The wait before restarting an app restarted `restarts` times: 1 s, doubling, at most
/// [`MAX_BACKOFF`].
pub fn restart_backoff(restarts: u32) -> Duration {
    Duration::from_secs(1u64 << restarts.min(5)).min(MAX_BACKOFF)
}

/// Which driver runs an app: `docker` for an `image`, `process` for a `command` alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DriverKind {
    Process,
    Docker,
}

impl DriverKind {
    /// The driver for an app with this image.
    pub fn of(image: Option<&str>) -> DriverKind {
        if image.is_some() {
            DriverKind::Docker
        } else {
            DriverKind::Process
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Process => "process",
            DriverKind::Docker => "docker",
        }
    }
}

impl std::fmt::Display for DriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to run for one application on this node.
///
/// Its JSON form is hashed into [`RunSpec::fingerprint`], which instances carry: keep the
/// fields' names and order, or every running instance looks out of date after an upgrade.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub app: String,
    /// For the docker driver.
    pub image: Option<String>,
    /// For the process driver: the program and its arguments.
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// The dataset's files on this node, if the app has a volume.
    pub dataset_path: Option<PathBuf>,
    /// Where the app sees its volume (docker: the bind mount's target).
    pub mountpoint: Option<String>,
    /// (internal, external) ports.
    pub ports: Vec<(u16, u16)>,
    pub mem_limit: Option<u64>,
    pub cpu_shares: Option<u64>,
    /// What came with stacks and compose's keys, each left out of the JSON when empty, so that
    /// an app without them keeps the fingerprint it had before them.
    #[serde(flatten)]
    pub more: RunMore,
}

/// [`RunSpec`]'s fields from compose's keys (see [`flock_scheduler::config::AppSpec`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMore {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ulimits: Vec<flock_scheduler::config::Ulimit>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit_milli: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_reservation: Option<u64>,
    /// Read-only host paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<flock_scheduler::config::BindMount>,
    /// The stack's secrets the app mounts; the node writes their files before it starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<flock_scheduler::config::HealthCheck>,
    /// Internal ports besides `ports`' that the node publishes (siblings reach them through
    /// the app's service address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose: Vec<u16>,
    /// Host names the app resolves: its stack's siblings' service names, to their service
    /// addresses.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_hosts: BTreeMap<String, String>,
}

/// A secret file of an app: its content is in the replicated state, never in the spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretFile {
    /// The secret's name in the state.
    pub secret: String,
    /// The path the app sees it at.
    pub target: String,
    pub mode: u32,
    /// A digest of the content (a changed secret restarts the app with the new one).
    pub digest: String,
}

/// The host names and variables by which a stack's app reaches its siblings: each sibling's
/// service name to its service address (for `/etc/hosts`), and `NAME_SERVICE_HOST` variables
/// (Kubernetes' convention; NAME upper-cased, `-` and `.` as `_`). Empty for an app outside
/// stacks.
pub fn service_names(
    state: &ClusterState,
    app: &App,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let (mut hosts, mut env) = (BTreeMap::new(), BTreeMap::new());
    let Some(stack) = &app.spec.stack else {
        return (hosts, env);
    };
    for other in state
        .apps
        .values()
        .filter(|o| o.spec.stack.as_ref() == Some(stack))
    {
        let Some(vip) = other.vip else { continue };
        let ip = flock_scheduler::app::service_ip(vip).to_string();
        let name = other.spec.service_name();
        let var = name.to_ascii_uppercase().replace(['-', '.'], "_");
        env.insert(format!("{var}_SERVICE_HOST"), ip.clone());
        hosts.insert(name.to_string(), ip);
    }
    (hosts, env)
}

impl RunSpec {
    /// A digest of the spec: an instance started from another spec is out of date.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).expect("a spec serializes");
        hex::encode(&Sha256::digest(&json)[..12])
    }
}

/// Docker-style link variables for `app`'s links: `ALIAS_PORT_<local>_TCP=tcp://HOST:PORT`
/// and its `_ADDR`, `_PORT` and `_PROTO` parts. With the routing mesh on (`mesh_host`, where
/// this node's mesh listens), they point at the mesh and the linked app's external port, so
/// they stay valid while the linked app moves; without it, at the node that runs the linked
/// app now and the app's internal port there.
pub fn link_env(
    state: &ClusterState,
    app: &App,
    mesh_host: Option<&str>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for link in &app.spec.links {
        let target = state.apps.values().find_map(|other| {
            let port = other
                .spec
                .ports
                .iter()
                .find(|p| p.external == link.remote_port)?;
            if let Some(host) = mesh_host {
                return Some((host.to_string(), port.external));
            }
            let node = state
                .nodes
                .get(&state.app_runs_on(other).unwrap_or(other.node))?;
            Some((host_of(&node.addr).to_string(), port.internal))
        });
        let Some((host, port)) = target else {
            continue;
        };
        let prefix = format!(
            "{}_PORT_{}_TCP",
            link.alias.to_ascii_uppercase().replace('-', "_"),
            link.local_port
        );
        env.insert(prefix.clone(), format!("tcp://{host}:{port}"));
        env.insert(format!("{prefix}_ADDR"), host);
        env.insert(format!("{prefix}_PORT"), port.to_string());
        env.insert(format!("{prefix}_PROTO"), "tcp".into());
    }
    env
}

/// One instance a driver reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub kind: DriverKind,
    pub state: SeenState,
    /// [`RunSpec::fingerprint`] of the spec it was started from.
    pub fingerprint: String,
    /// The driver's id for it (a pid, a container id).
    pub id: String,
    /// The restart count it was started with.
    pub restarts: u32,
}

/// Whether an instance runs, as its driver reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeenState {
    Running,
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// Its state could not be read (a failed or timed-out inspect): it may run.
    Unknown {
        reason: String,
    },
}

/// A dataset copy on this node, as the backend reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopySeen {
    /// The copy, where its files are, and the guids of its snapshots.
    Present {
        mount_path: PathBuf,
        guids: Vec<u64>,
    },
    Absent,
    /// The backend could not tell.
    Unknown {
        reason: String,
    },
}

/// What this node's drivers and backend reported on one look.
#[derive(Clone, Debug, Default)]
pub struct AppsSeen {
    /// Every instance the drivers listed, by app.
    pub instances: BTreeMap<String, Vec<Seen>>,
    /// Drivers whose listing failed, with why: any app of that kind may run unseen.
    pub blind: BTreeMap<DriverKind, String>,
    /// The copies of the datasets of apps placed here; a dataset missing here is unknown.
    pub copies: BTreeMap<DatasetId, CopySeen>,
    /// This node's lease, which stateful apps run under (the executor sets it on every look).
    pub lease: LeaseSeen,
    /// The apps that apps placed here and not yet started depend on (`depends_on`), as the
    /// nodes that run them report them; one missing here is unknown.
    pub dependencies: BTreeMap<String, DepSeen>,
    /// The health check's verdict of each instance that has one, by app.
    pub health: BTreeMap<String, bool>,
    /// The instances of `health` whose check has not given a verdict yet (counted there as not
    /// healthy): starting.
    pub starting: std::collections::BTreeSet<String>,
}

/// An app another depends on, as the node that runs it reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DepSeen {
    /// It runs; `healthy`: its health check's verdict (`None`: it has none).
    Running { healthy: Option<bool> },
    /// It does not run: why.
    NotRunning { why: String },
    /// Its node could not tell.
    Unknown { why: String },
}

/// Why `app` may not start yet: a dependency that does not run, or is not healthy when the app
/// waits for its health (compose's `condition: service_healthy`). Only a first start waits
/// (compose's rule): a restart of an app that ran does not.
pub fn waiting_for(
    state: &ClusterState,
    app: &App,
    deps: &BTreeMap<String, DepSeen>,
) -> Option<String> {
    for d in &app.spec.depends_on {
        // A dependency whose spec has a check is healthy only once a verdict says so (none
        // reported yet is not "no check").
        let checked = state
            .apps
            .get(&d.app)
            .and_then(|a| a.spec.healthcheck.as_ref())
            .is_some_and(|h| !h.disable);
        let why = match deps.get(&d.app) {
            Some(DepSeen::Running { healthy }) => match (d.healthy, healthy) {
                (true, Some(false)) => format!("{} to be healthy", d.app),
                (true, None) if checked => format!("{} to be healthy", d.app),
                (true, None) | (false, _) | (true, Some(true)) => continue,
            },
            Some(DepSeen::NotRunning { why }) => format!("{} to run ({why})", d.app),
            Some(DepSeen::Unknown { why }) => format!("{} (its state is unknown: {why})", d.app),
            None => format!("{} (not looked at yet)", d.app),
        };
        return Some(format!("waiting for {why}"));
    }
    None
}

/// This node's lease as the apps see it ([`crate::lease`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LeaseSeen {
    #[default]
    Holds,
    /// Not renewed since flockd started: stateful apps do not start, and running ones are left
    /// to the fencing watchdog, which enforces the lease the previous flockd held (a restart
    /// shorter than the lease adopts them without a restart).
    Pending { why: String },
    /// Renewals failed for longer than the lease: stateful apps are stopped (fenced).
    Lapsed { why: String },
}

/// Where an app is on this node, as `flockctl app ls` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Not looked at yet since flockd started.
    #[default]
    New,
    /// Not ready to run here: its dataset is elsewhere, missing or behind.
    Waiting,
    Running,
    /// Exited; restarts after its backoff.
    Restarting,
    /// Exited and stays so (restart policy never, or a clean exit under on-failure).
    Exited,
    /// Gave up: on-failure's maximum reached, or it cannot start (bad command, missing image).
    Failed,
    /// What runs of it could not be observed: nothing is started until it can.
    Unknown,
}

impl Phase {
    /// The word the API reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::New => "",
            Phase::Waiting => "waiting",
            Phase::Running => "running",
            Phase::Restarting => "restarting",
            Phase::Exited => "exited",
            Phase::Failed => "failed",
            Phase::Unknown => "unknown",
        }
    }
}

/// What the node knows of one app placed on it.
#[derive(Clone, Debug, Default)]
pub struct AppLocal {
    pub phase: Phase,
    pub restarts: u32,
    pub last_code: Option<i32>,
    pub last_signal: Option<i32>,
    pub detail: String,
    pub last_lines: Vec<String>,
    /// The running instance's driver id.
    pub id: String,
    /// The running instance's health check's verdict (`None`: it has none).
    pub healthy: Option<bool>,
    /// When the app may be started again (a restart's or a failed start's backoff).
    next_start: Option<Instant>,
    /// Starts that failed in a row for reasons that may pass (an engine error).
    start_failures: u32,
    /// The spec whose start failed for good (not retried until the spec changes).
    failed_spec: Option<String>,
}

/// What must still hold, in the latest applied state, when a start is carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartGuard {
    pub app: String,
    pub node: NodeId,
    /// The app's dataset, the epoch it was decided under, and the newest recorded snapshot's
    /// guid the copy was found to hold.
    pub dataset: Option<(DatasetId, u64)>,
}

/// Whether the start `guard` describes may still happen in `state`, the latest applied: the app
/// still runs on this node, and its dataset is still primary here under the same epoch with no
/// handoff begun. Call it under the dataset's start gate, right before the driver's start.
pub fn may_start(state: &ClusterState, guard: &StartGuard) -> Result<(), String> {
    let app = state
        .instance_app(&guard.app)
        .ok_or_else(|| format!("app {} was removed", guard.app))?;
    if state.app_runs_on(&app) != Some(guard.node) {
        return Err(format!(
            "app {} may not run on this node now (moved, or its dataset is handing off)",
            guard.app
        ));
    }
    if app.dataset != guard.dataset.map(|(id, _)| id) {
        return Err(format!("app {}'s dataset changed", guard.app));
    }
    if let Some((id, epoch)) = guard.dataset {
        let ds = state
            .datasets
            .get(&id)
            .ok_or_else(|| format!("dataset {id} was removed"))?;
        if ds.primary != guard.node || ds.epoch != epoch {
            return Err(format!(
                "dataset {} changed primary or epoch ({} now)",
                ds.name, ds.epoch
            ));
        }
        if ds.moving.as_ref().is_some_and(|m| m.handoff) {
            return Err(format!("dataset {} is handing off", ds.name));
        }
    }
    Ok(())
}

/// Something the executor should do for one app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppAction {
    /// Stop and forget an instance that may not run here.
    Remove {
        app: String,
        kind: DriverKind,
        why: &'static str,
    },
    /// Stop an instance (its spec changed, or its dataset is not primary here now).
    Stop {
        app: String,
        kind: DriverKind,
        why: &'static str,
    },
    /// Read the last output lines of an instance that just exited, for `app ls`
    /// (report them through [`AppsCore::logs`]).
    CollectLogs { app: String, kind: DriverKind },
    /// Start the app (report through [`AppsCore::started`]); only if [`may_start`] still
    /// holds for `guard` in the latest state, under the dataset's start gate.
    Start {
        spec: Box<RunSpec>,
        kind: DriverKind,
        restarts: u32,
        guard: StartGuard,
    },
}

/// Why a start did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartFailure {
    /// It cannot work until the spec changes (no such command, no image on the node).
    Permanent(String),
    /// It may work later (an engine error, a timeout).
    Transient(String),
    /// [`may_start`] no longer held: the state moved on; nothing was started.
    Overtaken(String),
}

/// One node's apps decisions, with what it remembers between looks (restart counts, backoffs,
/// last exits).
#[derive(Clone, Debug, Default)]
pub struct AppsCore {
    apps: BTreeMap<String, AppLocal>,
}

impl AppsCore {
    pub fn new() -> AppsCore {
        AppsCore::default()
    }

    /// What the node knows of each app placed on it, for the API.
    pub fn view(&self) -> &BTreeMap<String, AppLocal> {
        &self.apps
    }

    /// The actions for this look, grouped per app, in order.
    pub fn decide(
        &mut self,
        state: &ClusterState,
        me: NodeId,
        seen: &AppsSeen,
        mesh_host: Option<&str>,
        now: Instant,
    ) -> Vec<Vec<AppAction>> {
        let mut out = Vec::new();
        // Instances whose app may not run here now: removed, placed elsewhere, or its dataset
        // is handing off (an app whose dataset moves keeps running on the primary until then).
        for (name, instances) in &seen.instances {
            let app = state.instance_app(name);
            let here = app
                .as_deref()
                .is_some_and(|a| state.app_runs_on(a) == Some(me));
            if !here {
                let mut kinds: Vec<DriverKind> = instances.iter().map(|i| i.kind).collect();
                kinds.sort();
                kinds.dedup();
                out.push(
                    kinds
                        .into_iter()
                        .map(|kind| AppAction::Remove {
                            app: name.clone(),
                            kind,
                            why: "it may not run on this node now",
                        })
                        .collect(),
                );
                if app.is_none_or(|a| a.node != me) {
                    self.apps.remove(name);
                }
            }
        }
        let placed = placed_here(state, me);
        self.apps.retain(|name, _| placed.contains_key(name));
        for (name, app) in &placed {
            let local = self.apps.entry(name.clone()).or_default();
            let instances = seen.instances.get(name).map_or(&[][..], |v| v.as_slice());
            let actions = step(name, app, state, me, instances, seen, mesh_host, now, local);
            if !actions.is_empty() {
                out.push(actions);
            }
        }
        out.retain(|a: &Vec<AppAction>| !a.is_empty());
        out
    }

    /// The result of an [`AppAction::Start`].
    pub fn started(
        &mut self,
        app: &str,
        spec: &RunSpec,
        result: Result<String, StartFailure>,
        now: Instant,
    ) {
        let Some(local) = self.apps.get_mut(app) else {
            return;
        };
        match result {
            Ok(id) => {
                local.phase = Phase::Running;
                local.detail.clear();
                local.id = id;
                local.start_failures = 0;
                local.next_start = None;
            }
            Err(StartFailure::Permanent(e)) => {
                local.phase = Phase::Failed;
                local.detail = e;
                local.failed_spec = Some(spec.fingerprint());
            }
            Err(StartFailure::Transient(e)) => {
                let wait = restart_backoff(local.start_failures);
                local.start_failures = local.start_failures.saturating_add(1);
                local.phase = Phase::Restarting;
                local.detail = format!("start failed, retrying in {:.1}s: {e}", wait.as_secs_f64());
                local.next_start = Some(now + wait);
            }
            Err(StartFailure::Overtaken(e)) => {
                local.phase = Phase::Waiting;
                local.detail = e;
            }
        }
    }

    /// The last output lines of an app that exited ([`AppAction::CollectLogs`]).
    pub fn logs(&mut self, app: &str, lines: Vec<String>) {
        if let Some(local) = self.apps.get_mut(app) {
            local.last_lines = lines;
        }
    }
}

/// The instances placed on node `me`, by key ([`flock_scheduler::app::instance_key`]), each
/// as an app of its own: an app's first instance where it is placed or runs (a moving app runs
/// on its dataset's primary until the handoff), its others where they are placed.
pub fn placed_here(state: &ClusterState, me: NodeId) -> BTreeMap<String, Cow<'_, App>> {
    let mut out = BTreeMap::new();
    for (name, app) in &state.apps {
        if app.node == me || state.app_runs_on(app) == Some(me) {
            out.insert(name.clone(), Cow::Borrowed(app));
        }
        for (i, node) in app.more.iter().enumerate() {
            if *node == me {
                let index = i + 2;
                if let Some(inst) = app.instance(index) {
                    out.insert(instance_key(name, index), Cow::Owned(inst));
                }
            }
        }
    }
    out
}

/// One app placed on this node: start, update, restart or leave it.
#[allow(clippy::too_many_arguments)]
fn step(
    name: &str,
    app: &App,
    state: &ClusterState,
    me: NodeId,
    instances: &[Seen],
    seen: &AppsSeen,
    mesh_host: Option<&str>,
    now: Instant,
    local: &mut AppLocal,
) -> Vec<AppAction> {
    let mut actions = Vec::new();
    let kind = DriverKind::of(app.spec.image.as_deref());
    // An instance of the other driver (the app switched between image and command) goes.
    for other in instances.iter().filter(|i| i.kind != kind) {
        if !actions
            .iter()
            .any(|a| matches!(a, AppAction::Remove { kind, .. } if *kind == other.kind))
        {
            actions.push(AppAction::Remove {
                app: name.to_string(),
                kind: other.kind,
                why: "the app changed driver",
            });
        }
    }
    let instance = instances.iter().find(|i| i.kind == kind);
    if local.phase == Phase::New {
        // The first look since flockd started: the restart count goes on from the one the
        // instance was started with (restart policies' maximums hold across flockd restarts).
        if let Some(i) = instance {
            local.restarts = i.restarts;
        }
    }
    let may_run = |i: &Seen| !matches!(i.state, SeenState::Exited { .. });
    if let Some(why) = seen.blind.get(&kind) {
        local.phase = Phase::Unknown;
        local.detail = format!("its {} driver could not be listed: {why}", kind.as_str());
        return actions;
    }
    let mut dataset_path = None;
    let mut guard_dataset = None;
    if let Some(id) = app.dataset {
        let Some(ds) = state.datasets.get(&id) else {
            local.phase = Phase::Waiting;
            local.detail = "its dataset is gone".into();
            return actions;
        };
        if state.app_runs_on(app) != Some(me) || ds.primary != me {
            // Another node holds the current copy, or it is handing off: this one may not
            // write it. An instance that may run (running, or unknown) goes (those whose app
            // may not run here at all were removed above).
            if let Some(i) = instance.filter(|i| may_run(i) && state.app_runs_on(app) == Some(me)) {
                actions.push(AppAction::Stop {
                    app: name.to_string(),
                    kind: i.kind,
                    why: "its dataset is not primary here",
                });
            }
            local.phase = Phase::Waiting;
            local.detail = format!("waiting for dataset {} to arrive on this node", ds.name);
            return actions;
        }
        // A stateful app runs only under this node's lease: another node may take its dataset
        // over once the lease ran out.
        match &seen.lease {
            LeaseSeen::Holds => {}
            LeaseSeen::Pending { why } => {
                if instance.is_none_or(|i| !may_run(i)) {
                    local.phase = Phase::Waiting;
                    local.detail = format!("waiting for this node's lease: {why}");
                }
                return actions;
            }
            LeaseSeen::Lapsed { why } => {
                if let Some(i) = instance.filter(|i| may_run(i)) {
                    actions.push(AppAction::Stop {
                        app: name.to_string(),
                        kind: i.kind,
                        why: "fenced: this node's lease ran out",
                    });
                }
                local.phase = Phase::Waiting;
                local.detail = format!("fenced: this node holds no lease ({why})");
                return actions;
            }
        }
        match seen.copies.get(&id) {
            // The copy here must hold the newest recorded snapshot (a move's last one): an app
            // never starts on data older than what its dataset's record says it has.
            Some(CopySeen::Present { mount_path, guids }) => {
                if let Err(stale) = crate::copies::copy_is_current(ds, guids.iter().copied()) {
                    local.phase = Phase::Waiting;
                    local.detail = format!("waiting: {stale}");
                    return actions;
                }
                dataset_path = Some(mount_path.clone());
            }
            Some(CopySeen::Absent) => {
                local.phase = Phase::Waiting;
                local.detail = format!("waiting for dataset {} to be created", ds.name);
                return actions;
            }
            Some(CopySeen::Unknown { reason }) => {
                local.phase = Phase::Unknown;
                local.detail = format!(
                    "this node's copy of dataset {} could not be read: {reason}",
                    ds.name
                );
                return actions;
            }
            None => {
                local.phase = Phase::Unknown;
                local.detail = format!("this node's copy of dataset {} was not looked at", ds.name);
                return actions;
            }
        }
        guard_dataset = Some((id, ds.epoch));
    }
    let mut env = app.spec.environment.clone();
    env.extend(link_env(state, app, mesh_host));
    let (extra_hosts, service_env) = service_names(state, app);
    for (k, v) in service_env {
        env.entry(k).or_insert(v);
    }
    let secrets = app
        .spec
        .secrets
        .iter()
        .map(|m| SecretFile {
            secret: m.secret.clone(),
            target: m.target.clone(),
            mode: m.mode,
            digest: state.secrets.get(&m.secret).map_or_else(
                || "missing".to_string(),
                |s| hex::encode(&Sha256::digest(&s.data)[..12]),
            ),
        })
        .collect();
    let a = &app.spec;
    let more = RunMore {
        entrypoint: a.entrypoint.clone(),
        user: a.user.clone(),
        working_dir: a.working_dir.clone(),
        hostname: a.hostname.clone(),
        stop_signal: a.stop_signal.clone(),
        stop_grace_ms: a.stop_grace_ms,
        ulimits: a.ulimits.clone(),
        labels: a.labels.clone(),
        shm_size: a.shm_size,
        cpu_limit_milli: a.cpu_limit_milli,
        mem_reservation: a.mem_reservation,
        binds: a.binds.clone(),
        secrets,
        healthcheck: a.healthcheck.clone(),
        expose: a.expose.clone(),
        extra_hosts,
    };
    let spec = RunSpec {
        app: name.to_string(),
        image: app.spec.image.clone(),
        command: app.spec.command.clone(),
        env,
        dataset_path,
        mountpoint: app.spec.volume.as_ref().map(|v| v.mountpoint.clone()),
        ports: app
            .spec
            .ports
            .iter()
            .map(|p| (p.internal, p.external))
            .collect(),
        mem_limit: app.spec.mem_limit,
        cpu_shares: app.spec.cpu_shares,
        more,
    };
    let fingerprint = spec.fingerprint();
    if local.failed_spec.as_ref() == Some(&fingerprint) {
        return actions;
    }
    local.failed_spec = None;
    match instance.map(|i| (&i.state, i.fingerprint == fingerprint)) {
        Some((SeenState::Unknown { reason }, _)) => {
            local.phase = Phase::Unknown;
            local.detail = format!("its instance's state could not be read: {reason}");
            return actions;
        }
        Some((SeenState::Running, true)) => {
            local.phase = Phase::Running;
            local.healthy = seen.health.get(name).copied();
            local.detail.clear();
            local.id = instance.map(|i| i.id.clone()).unwrap_or_default();
            local.next_start = None;
            return actions;
        }
        Some((SeenState::Running, false)) => {
            actions.push(AppAction::Stop {
                app: name.to_string(),
                kind,
                why: "its spec changed",
            });
            local.restarts = 0;
            local.next_start = None;
        }
        Some((SeenState::Exited { code, signal }, true)) => {
            if matches!(local.phase, Phase::Running | Phase::New) {
                // Just exited (or found exited at startup).
                local.last_code = *code;
                local.last_signal = *signal;
                actions.push(AppAction::CollectLogs {
                    app: name.to_string(),
                    kind,
                });
            }
            let failed = *code != Some(0);
            let restart = match app.spec.restart_policy {
                RestartPolicy::Never => false,
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure { max_retry } => {
                    failed && max_retry.is_none_or(|m| local.restarts < m)
                }
            };
            if !restart {
                let gave_up =
                    matches!(app.spec.restart_policy, RestartPolicy::OnFailure { .. }) && failed;
                local.phase = if gave_up {
                    Phase::Failed
                } else {
                    Phase::Exited
                };
                local.detail = match (code, signal) {
                    (Some(c), _) => format!("exited with status {c}"),
                    (None, Some(s)) => format!("killed by signal {s}"),
                    _ => "exited".into(),
                };
                if gave_up {
                    local.detail.push_str(&format!(
                        "; gave up after {} restart(s) (restart_policy on-failure)",
                        local.restarts
                    ));
                }
                return actions;
            }
            let at = *local
                .next_start
                .get_or_insert_with(|| now + restart_backoff(local.restarts));
            if now < at {
                local.phase = Phase::Restarting;
                local.detail = format!(
                    "restarting in {:.1}s (exit {:?}, signal {:?})",
                    at.saturating_since(now).as_secs_f64(),
                    code,
                    signal
                );
                return actions;
            }
            local.restarts += 1;
        }
        // Exited from another spec, or none: start it (after a failed start's backoff).
        _ => {
            if local.next_start.is_some_and(|at| now < at) {
                // A failed start's backoff: `started` said why and when.
                local.phase = Phase::Restarting;
                return actions;
            }
            if instance.is_none() {
                if let Some(why) = waiting_for(state, app, &seen.dependencies) {
                    local.phase = Phase::Waiting;
                    local.detail = why;
                    return actions;
                }
            }
        }
    }
    local.next_start = None;
    actions.push(AppAction::Start {
        spec: Box::new(spec),
        kind,
        restarts: local.restarts,
        guard: StartGuard {
            app: name.to_string(),
            node: me,
            dataset: guard_dataset,
        },
    });
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;
    use flock_scheduler::config::PlannedApp;
    use flock_scheduler::{Command, CommandResult, SnapshotRecord};

    /// Three nodes; app `db` with a dataset on node 1, restarted per `policy`.
    fn with_db(policy: RestartPolicy) -> ClusterState {
        let mut spec = testutil::spec("db", false);
        spec.restart_policy = policy;
        let mut s = testutil::cluster(3);
        let apps = BTreeMap::from([(
            "db".to_string(),
            PlannedApp {
                spec,
                node: Some(1),
            },
        )]);
        testutil::ok(&mut s, Command::deploy_all(apps));
        s
    }

    fn ds_id(s: &ClusterState) -> DatasetId {
        s.apps["db"].dataset.expect("db has a dataset")
    }

    fn seen_copy(s: &ClusterState, guids: Vec<u64>) -> AppsSeen {
        AppsSeen {
            copies: BTreeMap::from([(
                ds_id(s),
                CopySeen::Present {
                    mount_path: "/d".into(),
                    guids,
                },
            )]),
            ..Default::default()
        }
    }

    fn instance(state: SeenState, fingerprint: &str) -> Seen {
        Seen {
            kind: DriverKind::Process,
            state,
            fingerprint: fingerprint.into(),
            id: "42".into(),
            restarts: 0,
        }
    }

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn the_start(actions: &[Vec<AppAction>]) -> (RunSpec, u32, StartGuard) {
        let starts: Vec<_> = actions
            .iter()
            .flatten()
            .filter_map(|a| match a {
                AppAction::Start {
                    spec,
                    restarts,
                    guard,
                    ..
                } => Some(((**spec).clone(), *restarts, guard.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), 1, "one start expected: {actions:?}");
        starts.into_iter().next().expect("one start")
    }

    /// An app with three instances: each node starts its own, under its own key, and a node
    /// whose instance was scaled away removes it.
    #[test]
    fn each_node_runs_the_instances_placed_on_it() {
        let mut s = testutil::cluster(3);
        let mut web = testutil::spec("web", false);
        web.volume = None;
        web.instances = Some(3);
        let apps = BTreeMap::from([(
            "web".to_string(),
            PlannedApp {
                spec: web,
                node: None,
            },
        )]);
        testutil::ok(&mut s, Command::deploy_all(apps));
        let nodes: Vec<NodeId> = s.apps["web"].instance_nodes().collect();
        for (i, node) in nodes.iter().enumerate() {
            let key = instance_key("web", i + 1);
            let mut core = AppsCore::new();
            let actions = core.decide(&s, *node, &AppsSeen::default(), None, t(0));
            let (spec, _, guard) = the_start(&actions);
            assert_eq!(
                (spec.app.as_str(), guard.app.as_str()),
                (key.as_str(), key.as_str())
            );
            assert_eq!(may_start(&s, &guard), Ok(()));
        }
        // Scaled to one: the third node's instance may run no more, and goes.
        let third = nodes[2];
        let key = instance_key("web", 3);
        let scale = s.scale_command("web", 1).unwrap();
        testutil::ok(&mut s, scale);
        let seen = AppsSeen {
            instances: BTreeMap::from([(key.clone(), vec![instance(SeenState::Running, "x")])]),
            ..Default::default()
        };
        let actions = AppsCore::new().decide(&s, third, &seen, None, t(0));
        assert!(
            actions
                .iter()
                .flatten()
                .any(|a| matches!(a, AppAction::Remove { app, .. } if *app == key)),
            "{actions:?}"
        );
        let guard = StartGuard {
            app: key,
            node: third,
            dataset: None,
        };
        assert!(may_start(&s, &guard).is_err());
    }

    /// `depends_on`: a first start waits for its dependency to run, and to be healthy when it
    /// asks; a dependency nobody could look at is waited for, never assumed up.
    #[test]
    fn a_first_start_waits_for_its_dependencies() {
        use flock_scheduler::config::Dependency;
        let mut s = testutil::cluster(1);
        let mut web = testutil::spec("web", false);
        web.volume = None;
        web.depends_on = vec![Dependency {
            app: "db".into(),
            healthy: true,
        }];
        let apps = BTreeMap::from([(
            "web".to_string(),
            PlannedApp {
                spec: web,
                node: Some(1),
            },
        )]);
        testutil::ok(&mut s, Command::deploy_all(apps));
        let with = |dep: Option<DepSeen>| AppsSeen {
            dependencies: dep.into_iter().map(|d| ("db".to_string(), d)).collect(),
            ..Default::default()
        };
        let cases = [
            (None, Some("not looked at")),
            (
                Some(DepSeen::Unknown {
                    why: "n2 did not answer".into(),
                }),
                Some("unknown: n2 did not answer"),
            ),
            (
                Some(DepSeen::NotRunning {
                    why: "exited".into(),
                }),
                Some("db to run"),
            ),
            (
                Some(DepSeen::Running {
                    healthy: Some(false),
                }),
                Some("db to be healthy"),
            ),
            (
                Some(DepSeen::Running {
                    healthy: Some(true),
                }),
                None,
            ),
            (Some(DepSeen::Running { healthy: None }), None),
        ];
        // With a check in db's spec, no verdict yet is not healthy.
        let mut db = testutil::spec("db", false);
        db.volume = None;
        db.healthcheck = Some(flock_scheduler::config::HealthCheck {
            test: vec!["CMD".into(), "true".into()],
            ..Default::default()
        });
        let mut with_db = s.clone();
        with_db.apps.insert(
            "db".into(),
            flock_scheduler::App {
                spec: db,
                pinned: None,
                node: 1,
                dataset: None,
                vip: None,
                more: Vec::new(),
                health: Default::default(),
            },
        );
        let mut core = AppsCore::new();
        let no_verdict = with(Some(DepSeen::Running { healthy: None }));
        let actions = core.decide(&with_db, 1, &no_verdict, None, t(0));
        assert!(
            !actions
                .iter()
                .flatten()
                .any(|a| matches!(a, AppAction::Start { guard, .. } if guard.app == "web")),
            "{actions:?}"
        );
        assert!(core.view()["web"].detail.contains("db to be healthy"));
        for (dep, waits) in cases {
            let mut core = AppsCore::new();
            let actions = core.decide(&s, 1, &with(dep.clone()), None, t(0));
            match waits {
                Some(why) => {
                    assert!(actions.is_empty(), "{dep:?}: {actions:?}");
                    let v = &core.view()["web"];
                    assert_eq!(v.phase, Phase::Waiting, "{dep:?}");
                    assert!(v.detail.contains(why), "{dep:?}: {}", v.detail);
                }
                None => {
                    the_start(&actions);
                }
            }
        }
    }

    /// An app without compose's newer keys keeps the fingerprint builds before them gave it:
    /// its running instances are not restarted by an upgrade.
    #[test]
    fn a_spec_without_newer_keys_keeps_its_fingerprint() {
        let spec = RunSpec {
            app: "web".into(),
            image: None,
            command: Some(vec!["x".into()]),
            env: BTreeMap::new(),
            dataset_path: None,
            mountpoint: None,
            ports: vec![(80, 8080)],
            mem_limit: None,
            cpu_shares: None,
            more: RunMore::default(),
        };
        // The JSON main at f71b59e hashed for this spec.
        let before = r#"{"app":"web","image":null,"command":["x"],"env":{},"dataset_path":null,"mountpoint":null,"ports":[[80,8080]],"mem_limit":null,"cpu_shares":null}"#;
        assert_eq!(serde_json::to_string(&spec).unwrap(), before);
        let mut with = spec.clone();
        with.more.user = Some("1000".into());
        assert_ne!(with.fingerprint(), spec.fingerprint());
        let back: RunSpec = serde_json::from_str(before).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn an_app_placed_here_starts_on_its_current_copy_with_a_guard() {
        let s = with_db(RestartPolicy::Never);
        let mut core = AppsCore::new();
        let actions = core.decide(&s, 1, &seen_copy(&s, vec![]), None, t(0));
        let (spec, restarts, guard) = the_start(&actions);
        assert_eq!(spec.dataset_path, Some(PathBuf::from("/d")));
        assert_eq!(restarts, 0);
        assert_eq!(guard.dataset, Some((ds_id(&s), 1)));
        assert_eq!(may_start(&s, &guard), Ok(()));
        core.started("db", &spec, Ok("7".into()), t(1));
        assert_eq!(core.view()["db"].phase, Phase::Running);
        // Not on the other nodes.
        assert!(AppsCore::new()
            .decide(&s, 2, &seen_copy(&s, vec![]), None, t(0))
            .is_empty());
    }

    /// Fencing: without a lease a stateful app is stopped; while the first renewal is pending
    /// a running one is left (the watchdog holds the old lease) and none starts; stateless apps
    /// do not care.
    #[test]
    fn a_stateful_app_runs_only_under_the_lease() {
        let s = with_db(RestartPolicy::Always);
        let (spec, _, _) =
            the_start(&AppsCore::new().decide(&s, 1, &seen_copy(&s, vec![]), None, t(0)));
        let running = |lease: LeaseSeen| {
            let mut seen = seen_copy(&s, vec![]);
            seen.instances.insert(
                "db".into(),
                vec![instance(SeenState::Running, &spec.fingerprint())],
            );
            seen.lease = lease;
            seen
        };
        let mut core = AppsCore::new();
        let lapsed = LeaseSeen::Lapsed {
            why: "no quorum".into(),
        };
        assert_eq!(
            core.decide(&s, 1, &running(lapsed.clone()), None, t(0)),
            vec![vec![AppAction::Stop {
                app: "db".into(),
                kind: DriverKind::Process,
                why: "fenced: this node's lease ran out"
            }]]
        );
        assert!(core.view()["db"].detail.contains("fenced"));
        let pending = LeaseSeen::Pending {
            why: "starting".into(),
        };
        assert!(core
            .decide(&s, 1, &running(pending.clone()), None, t(0))
            .is_empty());
        for lease in [pending, lapsed] {
            let mut seen = seen_copy(&s, vec![]);
            seen.lease = lease;
            assert!(AppsCore::new().decide(&s, 1, &seen, None, t(0)).is_empty());
        }
        // A stateless app starts without a lease.
        let mut s2 = testutil::cluster(1);
        let mut web = testutil::spec("web", false);
        web.volume = None;
        let apps = BTreeMap::from([(
            "web".to_string(),
            PlannedApp {
                spec: web,
                node: None,
            },
        )]);
        testutil::ok(&mut s2, Command::deploy_all(apps));
        let seen = AppsSeen {
            lease: LeaseSeen::Lapsed { why: "x".into() },
            ..Default::default()
        };
        the_start(&AppsCore::new().decide(&s2, 1, &seen, None, t(0)));
    }

    #[test]
    fn a_blind_driver_or_an_unknown_instance_never_starts_the_app() {
        let s = with_db(RestartPolicy::Always);
        let mut core = AppsCore::new();
        let mut seen = seen_copy(&s, vec![]);
        seen.blind
            .insert(DriverKind::Process, "listing timed out".into());
        assert!(core.decide(&s, 1, &seen, None, t(0)).is_empty());
        assert_eq!(core.view()["db"].phase, Phase::Unknown);
        let mut seen = seen_copy(&s, vec![]);
        seen.instances.insert(
            "db".into(),
            vec![instance(
                SeenState::Unknown {
                    reason: "inspect failed".into(),
                },
                "x",
            )],
        );
        assert!(core.decide(&s, 1, &seen, None, t(0)).is_empty());
        assert_eq!(core.view()["db"].phase, Phase::Unknown);
        // An unreadable copy is not "absent": nothing starts.
        let mut seen = seen_copy(&s, vec![]);
        seen.copies.insert(
            ds_id(&s),
            CopySeen::Unknown {
                reason: "zfs list failed".into(),
            },
        );
        assert!(core.decide(&s, 1, &seen, None, t(0)).is_empty());
        assert_eq!(core.view()["db"].phase, Phase::Unknown);
    }

    #[test]
    fn an_exited_app_restarts_after_its_backoff_with_the_count_raised() {
        let s = with_db(RestartPolicy::Always);
        let mut core = AppsCore::new();
        let (spec, _, _) = the_start(&core.decide(&s, 1, &seen_copy(&s, vec![]), None, t(0)));
        core.started("db", &spec, Ok("7".into()), t(0));
        let mut seen = seen_copy(&s, vec![]);
        seen.instances.insert(
            "db".into(),
            vec![instance(
                SeenState::Exited {
                    code: Some(1),
                    signal: None,
                },
                &spec.fingerprint(),
            )],
        );
        let first = core.decide(&s, 1, &seen, None, t(100));
        assert_eq!(
            first,
            vec![vec![AppAction::CollectLogs {
                app: "db".into(),
                kind: DriverKind::Process
            }]]
        );
        assert_eq!(core.view()["db"].phase, Phase::Restarting);
        assert!(core.decide(&s, 1, &seen, None, t(1099)).is_empty());
        let (_, restarts, _) = the_start(&core.decide(&s, 1, &seen, None, t(1100)));
        assert_eq!(restarts, 1);
    }

    #[test]
    fn a_start_decided_before_the_handoff_is_refused_once_the_handoff_applied() {
        let mut s = with_db(RestartPolicy::Always);
        let id = ds_id(&s);
        let mut core = AppsCore::new();
        let (_, _, guard) = the_start(&core.decide(&s, 1, &seen_copy(&s, vec![]), None, t(0)));
        assert!(matches!(
            s.apply(&Command::MoveApp {
                app: "db".into(),
                to: 2
            }),
            CommandResult::AppMoved { .. }
        ));
        // Before the handoff the app still runs on the primary.
        assert_eq!(may_start(&s, &guard), Ok(()));
        assert!(matches!(
            s.apply(&Command::HandoffDatasetMove {
                dataset: id,
                epoch: 1,
                to: 2
            }),
            CommandResult::HandedOff
        ));
        assert!(may_start(&s, &guard).is_err());
        // And the next look stops wanting it here; the target waits for the last delta.
        let actions = core.decide(&s, 1, &seen_copy(&s, vec![]), None, t(10));
        assert!(actions.is_empty(), "{actions:?}");
        assert!(!core.view().contains_key("db"));
        let mut target = AppsCore::new();
        assert!(target
            .decide(&s, 2, &seen_copy(&s, vec![]), None, t(10))
            .is_empty());
        assert_eq!(target.view()["db"].phase, Phase::Waiting);
    }

    #[test]
    fn a_copy_without_the_newest_recorded_snapshot_waits() {
        let mut s = with_db(RestartPolicy::Never);
        let id = ds_id(&s);
        s.apply(&Command::RecordSnapshot {
            dataset: id,
            epoch: 1,
            snapshot: SnapshotRecord {
                name: "s1".into(),
                guid: 11,
                created_unix: 0,
                epoch: 1,
            },
        });
        let mut core = AppsCore::new();
        assert!(core
            .decide(&s, 1, &seen_copy(&s, vec![10]), None, t(0))
            .is_empty());
        assert_eq!(core.view()["db"].phase, Phase::Waiting);
        the_start(&core.decide(&s, 1, &seen_copy(&s, vec![10, 11]), None, t(0)));
    }

    #[test]
    fn a_transient_start_failure_is_retried_and_a_permanent_one_waits_for_a_new_spec() {
        let s = with_db(RestartPolicy::Never);
        let mut core = AppsCore::new();
        let seen = seen_copy(&s, vec![]);
        let (spec, _, _) = the_start(&core.decide(&s, 1, &seen, None, t(0)));
        core.started(
            "db",
            &spec,
            Err(StartFailure::Transient("engine 500".into())),
            t(0),
        );
        assert!(core.decide(&s, 1, &seen, None, t(500)).is_empty());
        let (spec, _, _) = the_start(&core.decide(&s, 1, &seen, None, t(1000)));
        core.started(
            "db",
            &spec,
            Err(StartFailure::Permanent("no such command".into())),
            t(1000),
        );
        assert!(core.decide(&s, 1, &seen, None, t(60_000)).is_empty());
        assert_eq!(core.view()["db"].phase, Phase::Failed);
    }

    #[test]
    fn an_instance_that_may_not_run_here_is_removed() {
        let s = with_db(RestartPolicy::Never);
        let mut core = AppsCore::new();
        let mut seen = AppsSeen::default();
        for app in ["db", "gone"] {
            seen.instances
                .insert(app.into(), vec![instance(SeenState::Running, "x")]);
        }
        let actions = core.decide(&s, 2, &seen, None, t(0));
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert!(actions
            .iter()
            .flatten()
            .all(|a| matches!(a, AppAction::Remove { .. })));
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        assert_eq!(restart_backoff(0), Duration::from_secs(1));
        assert_eq!(restart_backoff(3), Duration::from_secs(8));
        assert_eq!(restart_backoff(9), MAX_BACKOFF);
    }
}
