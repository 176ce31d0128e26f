//! The app agent every node runs: it makes the apps running here match the desired state and
//! applies restart policies.
//!
//! - An app runs where `ClusterState::app_runs_on` says: its node, or while its dataset moves,
//!   the dataset's primary until the move's handoff: the app never runs on a copy that is not
//!   the current one, nor in two places.
//! - An instance started from another spec is stopped and started again (an update).
//! - An instance whose app is not placed here any more is stopped and removed.
//! - An exited app is restarted per its restart policy, after an exponential backoff (1 s,
//!   doubling, at most [`MAX_BACKOFF`]); on-failure gives up after its maximum and the app shows
//!   as failed with its last exit status and output.
//!
//! After a flockd restart, the driver's records make the running instances adopted, not
//! started again. What the agent sees is kept in [`AppsView`] for the API (`app ls`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use flock_proto::v1 as pb;
use flock_scheduler::config::RestartPolicy;
use flock_scheduler::{App, ClusterState};

use crate::cluster::Cluster;
use crate::datasets::Datasets;
use crate::driver::{Drivers, Instance, Kind, RunSpec, RunState};

const TICK: Duration = Duration::from_millis(300);
/// The shortest time between two looks when the replicated state keeps changing.
const MIN_GAP: Duration = Duration::from_millis(20);
/// The longest wait before restarting an exited app.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
const LAST_LINES: usize = 10;
/// How long to wait before trying again a start that failed for a passing reason.
const START_RETRY: Duration = Duration::from_secs(2);

/// What the agent knows of one app on this node.
#[derive(Clone, Debug, Default)]
pub struct Local {
    pub state: &'static str,
    pub restarts: u32,
    pub last_code: Option<i32>,
    pub last_signal: Option<i32>,
    pub detail: String,
    pub last_lines: Vec<String>,
    pub id: String,
    next_start: Option<Instant>,
    /// The spec whose start failed (not retried until the spec changes).
    failed_start: Option<String>,
    /// When to try again a start that failed for a passing reason.
    retry_at: Option<Instant>,
}

/// The agent's view, shared with the API.
#[derive(Clone, Default)]
pub struct AppsView(Arc<Mutex<BTreeMap<String, Local>>>);

impl AppsView {
    pub fn snapshot(&self) -> BTreeMap<String, Local> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The status of `name` for the API, from the desired state and this node's view.
pub fn status(state: &ClusterState, name: &str, app: &App, local: Option<&Local>) -> pb::AppStatus {
    let node_name = state
        .nodes
        .get(&app.node)
        .map_or_else(|| format!("node-{}", app.node), |n| n.name.clone());
    let mut s = pb::AppStatus {
        name: name.to_string(),
        node: node_name,
        image: app.spec.image.clone().unwrap_or_default(),
        command: app.spec.command.clone().unwrap_or_default(),
        ports: app
            .spec
            .ports
            .iter()
            .map(|p| format!("{}:{}", p.external, p.internal))
            .collect(),
        dataset: app
            .dataset
            .and_then(|d| state.datasets.get(&d))
            .map(|d| d.name.clone())
            .unwrap_or_default(),
        restart_policy: match app.spec.restart_policy {
            RestartPolicy::Never => "never".into(),
            RestartPolicy::Always => "always".into(),
            RestartPolicy::OnFailure { max_retry: None } => "on-failure".into(),
            RestartPolicy::OnFailure { max_retry: Some(n) } => format!("on-failure:{n}"),
        },
        driver: match Kind::of(app.spec.image.as_deref()) {
            Kind::Process => "process".into(),
            Kind::Docker => "docker".into(),
        },
        ..Default::default()
    };
    if let Some(l) = local {
        s.state = l.state.to_string();
        s.restarts = l.restarts;
        s.last_exit_code = l.last_code;
        s.last_signal = l.last_signal;
        s.detail = l.detail.clone();
        s.last_lines = l.last_lines.clone();
        s.id = l.id.clone();
    }
    s
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
            Some((crate::mesh::host_of(&node.addr).to_string(), port.internal))
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

/// What the agent works with on this node.
struct Here<'a> {
    datasets: &'a Datasets,
    drivers: &'a Drivers,
    /// Where this node's routing mesh listens, for link variables; `None`: the mesh is off.
    mesh_host: Option<&'a str>,
}

/// Runs until `shutdown`.
pub async fn run(
    cluster: Arc<Cluster>,
    datasets: Arc<Datasets>,
    drivers: Drivers,
    view: AppsView,
    mesh_host: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    if !cluster.caught_up(&mut shutdown).await {
        return;
    }
    let here = Here {
        datasets: &datasets,
        drivers: &drivers,
        mesh_host: mesh_host.as_deref(),
    };
    let mut changes = cluster.metrics_watch();
    let mut last: Option<(ClusterState, Instant)> = None;
    loop {
        // Again after TICK (local events: an exit, a backoff's end, a dataset's arrival), or
        // sooner when the replicated state changes (a move's handoff or commit must not wait a
        // whole tick: it is the app's downtime), but at most every MIN_GAP under a busy log,
        // and not for an entry that changed only the key-value namespace: a busy key-value
        // workload would have every node list its instances (docker: an API call) 50 times a
        // second.
        let due = match &last {
            None => true,
            Some((seen, at)) => {
                at.elapsed() >= TICK || !cluster.view.read().cluster.same_but_kv(seen)
            }
        };
        if due {
            let state = cluster.view.read().cluster.clone();
            converge(&cluster, &state, &here, &view).await;
            last = Some((state, Instant::now()));
        }
        let wait = last
            .as_ref()
            .map_or(TICK, |(_, at)| TICK.saturating_sub(at.elapsed()));
        if !Cluster::next_change(&mut changes, wait, MIN_GAP, &mut shutdown).await {
            return;
        }
    }
}

fn backoff(restarts: u32) -> Duration {
    Duration::from_secs(1u64 << restarts.min(5)).min(MAX_BACKOFF)
}

async fn converge(cluster: &Cluster, state: &ClusterState, here: &Here<'_>, view: &AppsView) {
    let me = cluster.node_id;
    let drivers = here.drivers;
    let listing = drivers.list().await;
    let instances: BTreeMap<String, (Instance, Kind)> = listing
        .instances
        .iter()
        .map(|(i, k)| (i.app.clone(), (i.clone(), *k)))
        .collect();
    // Instances whose app may not run here now: placed elsewhere, or its dataset is handing
    // off (an app whose dataset moves keeps running on the primary until the handoff).
    for (app, (_, kind)) in &instances {
        let here = state
            .apps
            .get(app)
            .is_some_and(|a| state.app_runs_on(a) == Some(me));
        if !here {
            tracing::info!(app, "stopping an app that may not run on this node now");
            match drivers.remove(*kind, app).await {
                Ok(()) => {
                    view.0.lock().unwrap_or_else(|p| p.into_inner()).remove(app);
                }
                Err(e) => tracing::warn!(app, error = %e, "could not stop and remove it"),
            }
        }
    }
    for (name, app) in state
        .apps
        .iter()
        .filter(|(_, a)| a.node == me || state.app_runs_on(a) == Some(me))
    {
        let mut local = view
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default();
        let unknown = listing.failure(Kind::of(app.spec.image.as_deref()));
        step(
            name,
            app,
            state,
            here,
            instances.get(name),
            unknown,
            &mut local,
        )
        .await;
        view.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), local);
    }
}

/// One app placed on this node: start, update, restart or leave it. `unknown`: why its
/// driver's listing failed (then it is neither started nor taken as exited).
async fn step(
    name: &str,
    app: &App,
    state: &ClusterState,
    here: &Here<'_>,
    found: Option<&(Instance, Kind)>,
    unknown: Option<&str>,
    local: &mut Local,
) {
    let (datasets, drivers) = (here.datasets, here.drivers);
    let me = datasets.node_id;
    let kind = Kind::of(app.spec.image.as_deref());
    // An instance of the other driver (the app switched between image and command) goes.
    if let Some((i, k)) = found.filter(|(_, k)| *k != kind) {
        if let Err(e) = drivers.remove(*k, &i.app).await {
            local.state = "unknown";
            local.detail = format!("its instance of the other driver could not be removed: {e}");
            return;
        }
    }
    let instance = found.filter(|(_, k)| *k == kind).map(|(i, _)| i);
    let unknown = unknown.map(str::to_string).or_else(|| match instance {
        Some(Instance {
            state: RunState::Unknown { reason },
            ..
        }) => Some(reason.clone()),
        _ => None,
    });
    if local.state.is_empty() {
        // The first look since flockd started: the restart count goes on from the one the
        // instance was started with (restart policies' maximums hold across flockd restarts).
        if let Some(i) = instance {
            local.restarts = i.restarts;
        }
    }
    let mut dataset_path = None;
    if let Some(id) = app.dataset {
        let Some(ds) = state.datasets.get(&id) else {
            local.state = "waiting";
            local.detail = "its dataset is gone".into();
            return;
        };
        if state.app_runs_on(app) != Some(me) || ds.primary != me {
            // Another node holds the current copy, or it is handing off: this one may not
            // write it.
            if let Some(i) = instance
                .filter(|i| matches!(i.state, RunState::Running { .. } | RunState::Unknown { .. }))
            {
                tracing::warn!(app = name, "stopping: its dataset is not primary here");
                if let Err(e) = drivers.stop(kind, &i.app).await {
                    tracing::warn!(app = name, error = %e, "the stop failed");
                }
            }
            local.state = "waiting";
            local.detail = format!("waiting for dataset {} to arrive on this node", ds.name);
            return;
        }
        match datasets.local_copy(ds).await {
            // The copy here must hold the newest recorded snapshot (a move's last one): an app
            // never starts on data older than what its dataset's record says it has.
            Ok(Some(copy))
                if ds
                    .latest_snapshot()
                    .is_some_and(|l| !copy.snapshots.iter().any(|s| s.guid == l.guid)) =>
            {
                local.state = "waiting";
                local.detail = format!(
                    "waiting: this copy of dataset {} lacks its newest recorded snapshot",
                    ds.name
                );
                return;
            }
            Ok(Some(copy)) => dataset_path = Some(copy.mount_path),
            _ => {
                local.state = "waiting";
                local.detail = format!("waiting for dataset {} to be created", ds.name);
                return;
            }
        }
    }
    let mut env = app.spec.environment.clone();
    env.extend(link_env(state, app, here.mesh_host));
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
    };
    let fingerprint = spec.fingerprint();
    if let Some(reason) = unknown {
        // It may run: never started again nor taken as exited until it can be seen.
        local.state = "unknown";
        local.detail = reason;
        return;
    }
    if local.failed_start.as_ref() == Some(&fingerprint) {
        return;
    }
    match instance.map(|i| (&i.state, i.fingerprint == fingerprint)) {
        Some((RunState::Running { .. }, true)) => {
            local.state = "running";
            local.detail.clear();
            local.id = instance.map(|i| i.id.clone()).unwrap_or_default();
            return;
        }
        Some((RunState::Running { .. }, false)) => {
            tracing::info!(app = name, "updating: its spec changed");
            if let Err(e) = drivers.stop(kind, name).await {
                local.state = "unknown";
                local.detail = format!("stopping it for an update failed: {e}");
                return;
            }
            local.restarts = 0;
        }
        Some((RunState::Exited { code, signal }, same)) if same => {
            if local.state == "running"
                || local.state == "starting"
                || local.state == "unknown"
                || local.state.is_empty()
            {
                // Just exited (or found exited at startup).
                local.last_code = *code;
                local.last_signal = *signal;
                local.last_lines = drivers.logs(kind, name, LAST_LINES).await;
                tracing::info!(app = name, ?code, ?signal, "app exited");
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
                local.state = if gave_up { "failed" } else { "exited" };
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
                return;
            }
            let at = *local
                .next_start
                .get_or_insert_with(|| Instant::now() + backoff(local.restarts));
            if Instant::now() < at {
                local.state = "restarting";
                local.detail = format!(
                    "restarting in {:.1}s (exit {:?}, signal {:?})",
                    at.saturating_duration_since(Instant::now()).as_secs_f64(),
                    code,
                    signal
                );
                return;
            }
            local.restarts += 1;
        }
        _ => {}
    }
    if local.retry_at.is_some_and(|at| Instant::now() < at) {
        return;
    }
    local.next_start = None;
    local.retry_at = None;
    match drivers.start(kind, &spec, local.restarts).await {
        Ok(i) => {
            tracing::info!(app = name, id = %i.id, "started");
            local.state = "running";
            local.detail.clear();
            local.id = i.id;
        }
        Err(e) if !e.is_permanent() => {
            // The engine failing or slow, or an old instance unknown: not the spec's fault.
            tracing::warn!(app = name, error = %e, "start failed; trying again");
            local.state = "starting";
            local.detail = format!("start failed, trying again in {START_RETRY:?}: {e}");
            local.retry_at = Some(Instant::now() + START_RETRY);
        }
        Err(e) => {
            tracing::warn!(app = name, error = %e, "start failed");
            local.state = "failed";
            local.detail = e.to_string();
            local.failed_start = Some(fingerprint);
        }
    }
}
