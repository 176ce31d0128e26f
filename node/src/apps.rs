//! The app agent every node runs: a thin executor of flock-decide's apps decision
//! ([`flock_decide::apps::AppsCore`], where every rule lives: where an app may run, updates,
//! restart policies and backoff, what counts as unknown). Each look it observes (the drivers'
//! listing, this node's dataset copies), asks the core, and carries out its actions in order.
//!
//! A start is carried out under the dataset's start gate ([`Datasets::try_start_gate`]), after
//! [`may_start`] re-checks it against the latest applied state: a move's handoff applied since
//! the look that decided the start stops it (issue 15: jepsen seed 4122026).
//!
//! After a flockd restart, the driver's records make the running instances adopted, not
//! started again. What the core knows is published in [`AppsView`] for the API (`app ls`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use flock_decide::apps::{
    may_start, AppAction, AppLocal, AppsCore, AppsSeen, CopySeen, DriverKind, LeaseSeen, Seen,
    SeenState, StartFailure,
};
use flock_proto::v1 as pb;
use flock_scheduler::config::RestartPolicy;
use flock_scheduler::{App, ClusterState};

use crate::cluster::Cluster;
use crate::datasets::Datasets;
use crate::driver::{Drivers, Kind, RunState};

pub use flock_decide::apps::{link_env, MAX_BACKOFF};

const TICK: Duration = Duration::from_millis(300);
/// The shortest time between two looks when the replicated state keeps changing.
const MIN_GAP: Duration = Duration::from_millis(20);
const LAST_LINES: usize = 10;

/// The core's view of the apps placed on this node, shared with the API.
#[derive(Clone, Default)]
pub struct AppsView(Arc<Mutex<BTreeMap<String, AppLocal>>>);

impl AppsView {
    pub fn snapshot(&self) -> BTreeMap<String, AppLocal> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish(&self, core: &AppsCore) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = core.view().clone();
    }
}

/// The status of `name` for the API, from the desired state and this node's view.
pub fn status(
    state: &ClusterState,
    name: &str,
    app: &App,
    local: Option<&AppLocal>,
) -> pb::AppStatus {
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
        driver: Kind::of(app.spec.image.as_deref()).as_str().into(),
        ..Default::default()
    };
    if let Some(l) = local {
        s.state = l.phase.as_str().to_string();
        s.restarts = l.restarts;
        s.last_exit_code = l.last_code;
        s.last_signal = l.last_signal;
        s.detail = l.detail.clone();
        s.last_lines = l.last_lines.clone();
        s.id = l.id.clone();
        if l.phase == flock_decide::apps::Phase::Running {
            s.health = match l.healthy {
                Some(true) => "healthy".into(),
                Some(false) => "unhealthy".into(),
                None => String::new(),
            };
        }
    }
    s
}

/// What the agent works with on this node.
struct Here<'a> {
    cluster: &'a Cluster,
    datasets: &'a Datasets,
    drivers: &'a Drivers,
    /// Where this node's routing mesh listens, for link variables; `None`: the mesh is off.
    mesh_host: Option<&'a str>,
    /// The origin of the core's clock.
    origin: Instant,
    /// The health checks of process apps (Docker runs its containers').
    health: Mutex<crate::health::Prober>,
    /// The members known to read health reports, and when the others were last asked.
    readers: Mutex<(BTreeSet<flock_scheduler::NodeId>, Option<Instant>)>,
}

impl Here<'_> {
    fn now(&self) -> flock_decide::Instant {
        flock_decide::Instant::from_millis(
            u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX),
        )
    }
}

/// Runs until `shutdown`.
pub async fn run(
    cluster: Arc<Cluster>,
    datasets: Arc<Datasets>,
    drivers: Drivers,
    view: AppsView,
    mesh_host: Option<String>,
    mut shutdown: watch::Receiver<bool>,
    status: crate::worker::WorkerStatus,
) {
    status.idle("catching up with the cluster's log");
    if !cluster.caught_up(&mut shutdown).await {
        return;
    }
    let here = Here {
        cluster: &cluster,
        datasets: &datasets,
        drivers: &drivers,
        mesh_host: mesh_host.as_deref(),
        origin: Instant::now(),
        health: Mutex::default(),
        readers: Mutex::default(),
    };
    let mut core = AppsCore::new();
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
            status.running();
            look(&here, &state, &mut core).await;
            view.publish(&core);
            status.idle(summary(&core));
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

/// What `flockctl status` shows of the agent: how many apps are in each phase here.
fn summary(core: &AppsCore) -> String {
    if core.view().is_empty() {
        return "no app placed on this node".into();
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for local in core.view().values() {
        *counts.entry(local.phase.as_str()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(phase, n)| format!("{n} {}", if phase.is_empty() { "new" } else { phase }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One look: observe, decide, act.
async fn look(here: &Here<'_>, state: &ClusterState, core: &mut AppsCore) {
    let me = here.cluster.node_id;
    let seen = observe(here, state).await;
    let groups = core.decide(state, me, &seen, here.mesh_host, here.now());
    for group in groups {
        for action in group {
            if !carry_out(here, core, action).await {
                break;
            }
        }
    }
    sync_guards(here, state, &seen);
    report_health(here, state, &seen).await;
}

/// How long a look waits for a health report to commit; one that does not is proposed again
/// on the next look (the decision compares with what the state records).
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Proposes the health transitions of this node's instances ([`flock_decide::health::reports`])
/// so the mesh of every node routes by them.
async fn report_health(here: &Here<'_>, state: &ClusterState, seen: &AppsSeen) {
    let cmds = flock_decide::health::reports(state, here.cluster.node_id, seen);
    if cmds.is_empty() || !all_read_health_reports(here, state).await {
        return;
    }
    for cmd in cmds {
        let what = format!("{cmd:?}");
        match tokio::time::timeout(REPORT_TIMEOUT, here.cluster.propose(cmd)).await {
            Ok(Ok(flock_scheduler::CommandResult::HealthReported { changed })) => {
                if changed {
                    tracing::info!(report = %what, "health recorded");
                }
            }
            Ok(Ok(r)) => tracing::debug!(report = %what, result = ?r, "health report not recorded"),
            Ok(Err(e)) => {
                tracing::warn!(report = %what, error = %e, "cannot record health; retrying on the next look")
            }
            Err(_) => {
                tracing::warn!(report = %what, "health report not committed in time; retrying on the next look")
            }
        }
    }
}

/// How often members not known to read health reports are asked again.
const READERS_ASK_EVERY: Duration = Duration::from_secs(5);

/// Whether every member that is not down runs a build that reads [`Command::ReportHealth`]
/// (its `LocalApps` reply says so): a member of an older build could not decode the entry, and
/// would stop following the log. Until then no health is recorded, and the mesh routes as
/// before (no record). A member that said so once is not asked again.
///
/// [`Command::ReportHealth`]: flock_scheduler::Command::ReportHealth
async fn all_read_health_reports(here: &Here<'_>, state: &ClusterState) -> bool {
    let me = here.cluster.node_id;
    let (missing, due) = {
        let r = here.readers.lock().unwrap_or_else(|p| p.into_inner());
        let missing: Vec<(flock_scheduler::NodeId, String)> = state
            .nodes
            .values()
            .filter(|n| n.id != me && n.state != flock_scheduler::NodeState::Down)
            .filter(|n| !r.0.contains(&n.id))
            .map(|n| (n.id, n.addr.clone()))
            .collect();
        let due = r.1.is_none_or(|at| at.elapsed() >= READERS_ASK_EVERY);
        (missing, due)
    };
    if missing.is_empty() {
        return true;
    }
    if !due {
        return false;
    }
    let answers = futures::future::join_all(missing.iter().map(|(id, addr)| async move {
        let Ok(mut client) = here.cluster.peer(*id, addr) else {
            return (*id, false);
        };
        let mut req = tonic::Request::new(pb::LocalAppsRequest {});
        req.set_timeout(DEPENDENCY_TIMEOUT);
        let reads = matches!(
            tokio::time::timeout(DEPENDENCY_TIMEOUT, client.local_apps(req)).await,
            Ok(Ok(r)) if r.get_ref().reads_health_reports
        );
        (*id, reads)
    }))
    .await;
    let mut r = here.readers.lock().unwrap_or_else(|p| p.into_inner());
    r.1 = Some(Instant::now());
    let mut all = true;
    for (id, reads) in answers {
        if reads {
            r.0.insert(id);
        } else {
            all = false;
        }
    }
    if !all {
        tracing::debug!(
            "health is not recorded yet: a member runs an older flockd, or did not answer"
        );
    }
    all
}

/// Guards a started stateful app with the fencing watchdog (its process group, or its
/// container), so it is killed once this node's lease runs out even if flockd cannot.
/// Why a stateful app's instance is not guarded by the fencing watchdog.
enum Unguarded {
    /// Its process is gone already.
    Exited(String),
    Failed(String),
}

fn guard(here: &Here<'_>, app: &str, kind: DriverKind, id: &str) -> Result<(), Unguarded> {
    let r = here
        .cluster
        .leases
        .with_fence(|fence| guard_with(fence, app, kind, id));
    r.unwrap_or(Ok(()))
}

fn guard_with(
    fence: &crate::fence::FenceDir,
    app: &str,
    kind: DriverKind,
    id: &str,
) -> Result<(), Unguarded> {
    match kind {
        DriverKind::Process => {
            let pid: u32 = id.parse().map_err(|_| {
                Unguarded::Failed(format!("the process driver's id {id:?} is not a pid"))
            })?;
            fence.guard_process(app, pid).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Unguarded::Exited(e.to_string())
                } else {
                    Unguarded::Failed(e.to_string())
                }
            })
        }
        DriverKind::Docker => {
            let socket =
                crate::daemon::docker_socket().map_err(|e| Unguarded::Failed(e.to_string()))?;
            fence
                .guard_container(app, id, &socket)
                .map_err(|e| Unguarded::Failed(e.to_string()))
        }
    }
}

/// Keeps the watchdog's guards in step with what runs: every stateful app running here is
/// guarded (also one adopted from a flockd without a watchdog), and a guard whose app was seen
/// not running goes. Nothing is unguarded while a driver could not be listed.
fn sync_guards(here: &Here<'_>, state: &ClusterState, seen: &AppsSeen) {
    here.cluster.leases.with_fence(|fence| {
        let guarded = match fence.guarded() {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the fencing watchdog's guards");
                return;
            }
        };
        let mut may_run = BTreeSet::new();
        for (name, instances) in &seen.instances {
            let stateful = state.apps.get(name).is_some_and(|a| a.dataset.is_some());
            for i in instances {
                match i.state {
                    SeenState::Running => {
                        may_run.insert(name.as_str());
                        if stateful && !guarded.iter().any(|g| g == name) {
                            if let Err(Unguarded::Failed(e)) =
                                guard_with(fence, name, i.kind, &i.id)
                            {
                                tracing::warn!(app = %name, error = %e, "cannot guard the app with the fencing watchdog");
                            }
                        }
                    }
                    SeenState::Unknown { .. } => {
                        may_run.insert(name.as_str());
                    }
                    SeenState::Exited { .. } => {}
                }
            }
        }
        if !seen.blind.is_empty() {
            return;
        }
        for name in guarded.iter().filter(|g| !may_run.contains(g.as_str())) {
            if let Err(e) = fence.unguard(name) {
                tracing::warn!(app = %name, error = %e, "cannot remove the app's fencing guard");
            }
        }
    });
}

/// What the drivers and the backend report: every instance, the drivers that could not be
/// listed, and the copies of the datasets of the apps placed here.
async fn observe(here: &Here<'_>, state: &ClusterState) -> AppsSeen {
    let me = here.cluster.node_id;
    let listing = here.drivers.list().await;
    let mut seen = AppsSeen {
        lease: here.cluster.leases.seen(),
        ..AppsSeen::default()
    };
    for (kind, why) in listing.failed {
        seen.blind.insert(kind, why);
    }
    for (i, kind) in listing.instances {
        if let (Some(h), RunState::Running { .. }) = (i.healthy, &i.state) {
            seen.health.insert(i.app.clone(), h);
        }
        let state = match i.state {
            RunState::Running { .. } => SeenState::Running,
            RunState::Exited { code, signal } => SeenState::Exited { code, signal },
            RunState::Unknown { reason } => SeenState::Unknown { reason },
        };
        seen.instances.entry(i.app).or_default().push(Seen {
            kind,
            state,
            fingerprint: i.fingerprint,
            id: i.id,
            restarts: i.restarts,
        });
    }
    // Process apps' health checks, run here.
    let checked: Vec<_> = seen
        .instances
        .iter()
        .filter_map(|(name, is)| {
            let i = is.iter().find(|i| {
                i.kind == Kind::Process && matches!(i.state, flock_decide::apps::SeenState::Running)
            })?;
            let app = state.instance_app(name)?;
            let check = app.spec.healthcheck.clone()?;
            Some(crate::health::Checked::of_process(
                name,
                &i.id,
                check,
                &app.spec.environment,
            ))
        })
        .collect();
    let verdicts = here
        .health
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .look(&checked, Instant::now());
    for (name, verdict) in verdicts {
        if verdict.is_none() {
            seen.starting.insert(name.clone());
        }
        seen.health.insert(name, verdict == Some(true));
    }
    let placed = state
        .apps
        .values()
        .filter(|a| a.node == me || state.app_runs_on(a) == Some(me));
    for id in placed.filter_map(|a| a.dataset) {
        let Some(ds) = state.datasets.get(&id) else {
            continue;
        };
        if seen.copies.contains_key(&id) || ds.primary != me {
            continue;
        }
        let copy = match here.datasets.local_copy(ds).await {
            Ok(Some(c)) => CopySeen::Present {
                mount_path: c.mount_path,
                guids: c.snapshots.iter().map(|s| s.guid).collect(),
            },
            Ok(None) => CopySeen::Absent,
            Err(e) => CopySeen::Unknown {
                reason: e.to_string(),
            },
        };
        seen.copies.insert(id, copy);
    }
    seen.dependencies = dependencies(here, state, &seen).await;
    seen
}

/// How long a look waits for another node's report on a dependency.
const DEPENDENCY_TIMEOUT: Duration = Duration::from_millis(500);

/// The apps that apps placed here and not started yet depend on, as the nodes that run them
/// report them (this node from its own look; the others asked, side by side).
async fn dependencies(
    here: &Here<'_>,
    state: &ClusterState,
    seen: &AppsSeen,
) -> BTreeMap<String, flock_decide::apps::DepSeen> {
    use flock_decide::apps::DepSeen;
    let me = here.cluster.node_id;
    // Apps with an instance placed here that has not started yet.
    let wanted: std::collections::BTreeSet<&str> = state
        .apps
        .iter()
        .filter(|(n, a)| {
            a.instance_nodes().enumerate().any(|(i, node)| {
                let key = flock_scheduler::app::instance_key(n, i + 1);
                node == me && !seen.instances.contains_key(&key)
            })
        })
        .flat_map(|(_, a)| a.spec.depends_on.iter().map(|d| d.app.as_str()))
        .collect();
    let mut out = BTreeMap::new();
    let mut ask: BTreeMap<flock_scheduler::NodeId, Vec<&str>> = BTreeMap::new();
    for dep in wanted {
        let Some(app) = state.apps.get(dep) else {
            out.insert(
                dep.to_string(),
                DepSeen::NotRunning {
                    why: "it is not deployed".into(),
                },
            );
            continue;
        };
        match state.app_runs_on(app) {
            None => {
                out.insert(
                    dep.to_string(),
                    DepSeen::NotRunning {
                        why: "it moves or waits for its node".into(),
                    },
                );
            }
            Some(n) if n == me => {
                let running = seen.instances.get(dep).is_some_and(|is| {
                    is.iter()
                        .any(|i| matches!(i.state, flock_decide::apps::SeenState::Running))
                });
                out.insert(
                    dep.to_string(),
                    if running {
                        DepSeen::Running {
                            healthy: seen.health.get(dep).copied(),
                        }
                    } else {
                        DepSeen::NotRunning {
                            why: "it does not run".into(),
                        }
                    },
                );
            }
            Some(n) => ask.entry(n).or_default().push(dep),
        }
    }
    let answers = futures::future::join_all(ask.into_iter().map(|(n, deps)| async move {
        let addr = state
            .nodes
            .get(&n)
            .map(|x| x.addr.clone())
            .unwrap_or_default();
        let reply = match here.cluster.peer(n, &addr) {
            Ok(mut client) => {
                // Short: the look waits for it, and a dependency that does not answer is
                // waited for anyway.
                let mut req = tonic::Request::new(flock_proto::v1::LocalAppsRequest {});
                req.set_timeout(DEPENDENCY_TIMEOUT);
                match tokio::time::timeout(DEPENDENCY_TIMEOUT, client.local_apps(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(e)) => Err(e.message().to_string()),
                    Err(_) => Err(format!(
                        "no answer within {} ms",
                        DEPENDENCY_TIMEOUT.as_millis()
                    )),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        (n, deps, reply)
    }))
    .await;
    for (n, deps, reply) in answers {
        let node = flock_scheduler::state::node_name(state, n);
        for dep in deps {
            let seen = match &reply {
                Err(e) => DepSeen::Unknown {
                    why: format!("node {node}: {e}"),
                },
                Ok(r) => match r.apps.iter().find(|a| a.name == dep) {
                    Some(a) if a.state == "running" => DepSeen::Running {
                        healthy: match a.health.as_str() {
                            "" => None,
                            h => Some(h == "healthy"),
                        },
                    },
                    Some(a) => DepSeen::NotRunning {
                        why: format!("{} on {node}", a.state),
                    },
                    None => DepSeen::NotRunning {
                        why: format!("node {node} does not run it yet"),
                    },
                },
            };
            out.insert(dep.to_string(), seen);
        }
    }
    out
}

/// Carries out one action; false when it failed (the app's later actions are skipped).
async fn carry_out(here: &Here<'_>, core: &mut AppsCore, action: AppAction) -> bool {
    let drivers = here.drivers;
    let series = &here.cluster.prometheus.apps;
    let label = |app: &str| [("app", app.to_string())];
    match action {
        AppAction::Remove { app, kind, why } => {
            tracing::info!(app, why, "stopping and removing");
            match drivers.remove(kind, &app).await {
                Ok(()) => {
                    series.stops.get_or_create(&label(&app)).inc();
                    true
                }
                Err(e) => {
                    tracing::warn!(app, error = %e, "could not stop and remove it");
                    false
                }
            }
        }
        AppAction::Stop { app, kind, why } => {
            tracing::info!(app, why, "stopping");
            match drivers.stop(kind, &app).await {
                Ok(()) => {
                    series.stops.get_or_create(&label(&app)).inc();
                    true
                }
                Err(e) => {
                    tracing::warn!(app, error = %e, "the stop failed");
                    false
                }
            }
        }
        AppAction::CollectLogs { app, kind } => {
            tracing::info!(app, "app exited");
            let lines = drivers.logs(kind, &app, LAST_LINES).await;
            core.logs(&app, lines);
            true
        }
        AppAction::Start {
            spec,
            kind,
            restarts,
            guard,
        } => {
            let app = spec.app.clone();
            failpoint_start_hold(&app).await;
            // Under the start gate a move holds from its check that nothing runs: either this
            // start comes first (and the move sees it run) or it sees the handoff.
            let _gate = match guard.dataset {
                Some((id, _)) => match here.datasets.try_start_gate(id) {
                    Some(g) => Some(g),
                    None => {
                        let e = "a move of its dataset is checking that it is stopped".to_string();
                        tracing::info!(app, "not starting now: {e}");
                        core.started(&app, &spec, Err(StartFailure::Overtaken(e)), here.now());
                        return false;
                    }
                },
                None => None,
            };
            let check = may_start(&here.cluster.view.read().cluster, &guard).and_then(|()| {
                // The lease may have lapsed since the look: a stateful app starts only under it.
                match (guard.dataset, here.cluster.leases.seen()) {
                    (None, _) | (Some(_), LeaseSeen::Holds) => Ok(()),
                    (Some(_), _) => Err("this node's lease does not hold".to_string()),
                }
            });
            if let Err(e) = check {
                tracing::info!(app, reason = %e, "not starting: the state moved on");
                core.started(&app, &spec, Err(StartFailure::Overtaken(e)), here.now());
                return false;
            }
            // Its secrets' files first, from the state (the spec names them, never holds them).
            let contents: Result<Vec<Vec<u8>>, String> = {
                let view = here.cluster.view.read();
                spec.more
                    .secrets
                    .iter()
                    .map(|s| {
                        view.cluster
                            .secrets
                            .get(&s.secret)
                            .map(|v| v.data.clone())
                            .ok_or_else(|| format!("its secret {} is not in the state", s.secret))
                    })
                    .collect()
            };
            let written = contents.and_then(|c| {
                drivers
                    .write_secrets(&spec, &c)
                    .map_err(|e| format!("cannot write its secret files: {e}"))
            });
            if let Err(e) = written {
                tracing::warn!(app, error = %e, "not starting");
                core.started(&app, &spec, Err(StartFailure::Transient(e)), here.now());
                return false;
            }
            let result = match drivers.start(kind, &spec, restarts).await {
                Ok(i) => {
                    tracing::info!(app, id = %i.id, "started");
                    match guard.dataset.map(|_| self::guard(here, &app, kind, &i.id)) {
                        // Nothing runs that could outlive the lease: the restart policy
                        // decides, as for any exit.
                        Some(Err(Unguarded::Exited(e))) => {
                            tracing::warn!(app, error = %e, "it exited right after it started");
                            Err(StartFailure::Transient(format!(
                                "it exited right after it started: {e}"
                            )))
                        }
                        Some(Err(Unguarded::Failed(e))) => {
                            // Unguarded it could outlive the lease: not run at all.
                            tracing::warn!(app, error = %e, "cannot guard it with the fencing watchdog; stopping it");
                            let _ = drivers.stop(kind, &app).await;
                            Err(StartFailure::Transient(format!(
                                "cannot guard it with the fencing watchdog: {e}"
                            )))
                        }
                        _ => Ok(i.id),
                    }
                }
                Err(e) if e.is_permanent() => {
                    tracing::warn!(app, error = %e, "start failed");
                    Err(StartFailure::Permanent(e.to_string()))
                }
                Err(e) => {
                    tracing::warn!(app, error = %e, "start failed; retrying after a backoff");
                    Err(StartFailure::Transient(e.to_string()))
                }
            };
            let ok = result.is_ok();
            if ok {
                series.starts.get_or_create(&label(&app)).inc();
                // A start after an exit, by the restart policy, carries the count raised.
                if restarts > 0 {
                    series.restarts.get_or_create(&label(&app)).inc();
                }
            } else {
                series.start_failures.get_or_create(&label(&app)).inc();
            }
            core.started(&app, &spec, result, here.now());
            ok
        }
    }
}

/// The environment variable of a fault-injection point for tests: `APP:MS` makes the agent
/// wait MS milliseconds between deciding to start APP and carrying the start out (as a slow
/// engine or a busy node would), so a test can apply a move's handoff in between.
pub const START_HOLD_FAILPOINT: &str = "FLOCK_FAILPOINT_START_HOLD";

async fn failpoint_start_hold(app: &str) {
    let Ok(v) = std::env::var(START_HOLD_FAILPOINT) else {
        return;
    };
    let ms = v
        .split_once(':')
        .filter(|(a, _)| *a == app)
        .and_then(|(_, ms)| ms.parse::<u64>().ok());
    if let Some(ms) = ms {
        tracing::warn!(app, ms, "failpoint: holding the start");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}
