//! The app workload: apps deployed, and deployed again with other placements, while the nemesis
//! kills and partitions nodes; every node is asked often what it runs. After the faults, every
//! app of the final configuration must run exactly once, on its node, and nowhere else.
//!
//! - **apps** (`apps`, 6 by default): half of them (rounded up) *stateful*, `flock-testapp`
//!   (an append-only log over TCP) with a volume, so each has a dataset named after it; the
//!   others stateless: busybox `sleep` loops and `flock-testapp` without a volume. All run under
//!   the process driver (the nodes have no container engine), each testapp on its own port,
//!   restart policy `always` (so that an app whose node was killed comes back with it).
//!   Names: `<prefix>-s<i>` stateful, `<prefix>-l<j>` loops, `<prefix>-w<j>` stateless testapps.
//! - **deploys**: one deployer, one call at a time (`Deploy`, the whole configuration in one
//!   Raft entry, through a random node). The first deploy spreads the apps over the nodes, each
//!   pinned to its node (retried until acknowledged). Then, every `deploy_interval` or so, one
//!   or two apps are pinned to another node and the whole configuration is deployed again: a
//!   stateless app moves by a stop and a start, a stateful one with its data (its node stops it,
//!   the dataset moves, the new node starts it). Each deploy is an `app_deploy` op with its plan
//!   (every app's node, and whether it has a volume) and its outcome: `ok`; `fail` when flock
//!   refused it; `unknown` when it may have taken effect. After a failed deploy the deployer
//!   goes on from the configuration before it; after an unknown one, from the one it asked for
//!   (the next acknowledged deploy replaces either).
//! - **polls**: one poller per node asks that node `LocalApps` every `poll_interval`, one call
//!   at a time: an `app_local` op with the node, its invocation and completion times, and every
//!   app the node's agent reports with its state and instance id (the process driver: the pid).
//! - **the cluster's view**: `AppList` (a linearizable read of the desired state: each app's
//!   node, and the state that node reports) from a random node every `list_interval`: an
//!   `app_list` op.
//!
//! After the faults end ([`finish`]): the deployer stops (its last call finishes), the pollers
//! go on; `AppList` is read (recorded) every half second, and the latest poll of every node,
//! made after that read began, is compared with it: every app of the desired state running on
//! its node, no app running anywhere else. Once that held for `stable`, or at `bound` after the
//! heal plus a few seconds, a last `AppList` is read and the pollers stop.
//! [`crate::checker::app`] judges the history.

use super::pause;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use flock_proto::v1 as pb;
use flock_scheduler::config::{AppSpec, PlannedApp, PortMap, RestartPolicy, Volume};

use super::Done;
use crate::client::{classify, Api, ClientConfig, Failure};
use crate::docker::Node;
use crate::history::{AppPin, AppResult, AppSeen, Call, Outcome};
use crate::runner::{record_call, Conn, Recorder};

/// Where a stateful app sees its volume (the process driver runs it in the dataset's directory
/// and passes it in `FLOCK_DATASET_PATH`; the mountpoint matters to containers only).
const MOUNTPOINT: &str = "/data";
/// How long after the bound the harness keeps looking, so that the history shows the state
/// after the bound when the cluster did not converge within it.
const AFTER_BOUND: Duration = Duration::from_secs(5);

/// Settings of the app workload.
#[derive(Clone, Debug)]
pub struct AppOptions {
    /// App names start with `<prefix>-` (their datasets are named after them).
    pub prefix: String,
    /// How many apps; half of them (rounded up) stateful.
    pub apps: usize,
    /// Ports: stateful testapp `i` listens on `base_port + i`, stateless testapp `j` on
    /// `base_port + 50 + j` (internal and external alike).
    pub base_port: u16,
    /// Mean time between deploys (each drawn between half and one and a half times it).
    pub deploy_interval: Duration,
    /// At most this many apps change node per deploy (at least one does).
    pub moves_per_deploy: usize,
    /// Pause between one node's polls.
    pub poll_interval: Duration,
    /// Time limit of a poll (a paused node does not answer).
    pub poll_timeout: Duration,
    /// Mean time between `AppList` reads during the workload.
    pub list_interval: Duration,
    /// Time limit of a deploy and of an `AppList`.
    pub op_timeout: Duration,
    /// After the heal, every app must run exactly once on its node within this.
    pub bound: Duration,
    /// ... and go on doing so for this long before the harness stops looking.
    pub stable: Duration,
    /// Apps of other workloads (the move workload's), deployed unpinned with every deploy (a
    /// deploy replaces the whole configuration), so that they stay where they run; not
    /// recorded in the deploys' plans.
    pub extra: Vec<AppSpec>,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            prefix: "ja".into(),
            apps: 6,
            base_port: 9100,
            deploy_interval: Duration::from_secs(8),
            moves_per_deploy: 2,
            poll_interval: Duration::from_millis(250),
            poll_timeout: Duration::from_secs(3),
            list_interval: Duration::from_secs(1),
            op_timeout: Duration::from_secs(10),
            bound: Duration::from_secs(60),
            stable: Duration::from_secs(3),
            extra: Vec::new(),
        }
    }
}

/// One app of the workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppDef {
    pub name: String,
    /// With a volume (a dataset): stateful.
    pub volume: bool,
    pub command: Vec<String>,
    pub port: Option<u16>,
    /// What runs, briefly.
    pub what: String,
}

impl AppDef {
    /// The spec flockctl would make of it from an application.yml. Made through serde, so
    /// that fields the scheduler adds with a default need nothing here.
    pub fn spec(&self) -> Result<AppSpec, String> {
        let ports: Vec<PortMap> = self
            .port
            .map(|p| {
                vec![PortMap {
                    internal: p,
                    external: p,
                }]
            })
            .unwrap_or_default();
        let volume = self.volume.then(|| Volume {
            mountpoint: MOUNTPOINT.into(),
            maximum_size: None,
            dataset: None,
        });
        spec_of(&self.name, &self.command, ports, volume)
    }
}

/// The spec flockctl would make of an app of the test image from an application.yml (always
/// restarted, no links, environment or limits). Made through serde, so that fields the scheduler
/// adds with a default need nothing here.
pub(crate) fn spec_of(
    name: &str,
    command: &[String],
    ports: Vec<PortMap>,
    volume: Option<Volume>,
) -> Result<AppSpec, String> {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "image": null,
        "command": command,
        "ports": ports,
        "links": [],
        "volume": volume,
        "environment": {},
        "restart_policy": RestartPolicy::Always,
        "mem_limit": null,
        "cpu_shares": null,
    }))
    .map_err(|e| format!("the spec of {name}: {e}"))
}

/// The workload's apps: stateful testapps first, then stateless loops and testapps in turn.
pub fn catalogue(opts: &AppOptions) -> Vec<AppDef> {
    let n = opts.apps.max(1);
    let stateful = n.div_ceil(2);
    let mut out = Vec::new();
    for i in 1..=stateful {
        let port = opts.base_port + i as u16;
        out.push(AppDef {
            name: format!("{}-s{i}", opts.prefix),
            volume: true,
            command: vec!["flock-testapp".into()],
            port: Some(port),
            what: format!("flock-testapp :{port}"),
        });
    }
    for j in 1..=(n - stateful) {
        if j % 2 == 1 {
            out.push(AppDef {
                name: format!("{}-l{j}", opts.prefix),
                volume: false,
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "while true; do sleep 1; done".into(),
                ],
                port: None,
                what: "sleep loop".into(),
            });
        } else {
            let port = opts.base_port + 50 + j as u16;
            out.push(AppDef {
                name: format!("{}-w{j}", opts.prefix),
                volume: false,
                command: vec!["flock-testapp".into()],
                port: Some(port),
                what: format!("flock-testapp :{port} (no volume)"),
            });
        }
    }
    out
}

/// The deploy plan of `pins` (app -> node name) as `Deploy` takes it: JSON of the apps of a
/// `flock_scheduler::config::Plan`, each pinned to its node's id.
pub fn plan_json(
    defs: &[AppDef],
    pins: &BTreeMap<String, String>,
    ids: &BTreeMap<String, u64>,
) -> Result<String, String> {
    let mut apps = BTreeMap::new();
    for d in defs {
        let Some(node) = pins.get(&d.name) else {
            continue;
        };
        let id = ids
            .get(node)
            .ok_or_else(|| format!("no member named {node}"))?;
        apps.insert(
            d.name.clone(),
            PlannedApp {
                spec: d.spec()?,
                node: Some(*id),
            },
        );
    }
    serde_json::to_string(&apps).map_err(|e| e.to_string())
}

/// `plan` (JSON of a plan's apps) with `extra` added, unpinned: they stay where they run.
pub fn with_extra(plan: &str, extra: &[AppSpec]) -> Result<String, String> {
    if extra.is_empty() {
        return Ok(plan.to_string());
    }
    let mut apps: BTreeMap<String, PlannedApp> =
        serde_json::from_str(plan).map_err(|e| e.to_string())?;
    for spec in extra {
        apps.insert(
            spec.name.clone(),
            PlannedApp {
                spec: spec.clone(),
                node: None,
            },
        );
    }
    serde_json::to_string(&apps).map_err(|e| e.to_string())
}

/// What the harness saw after the faults ended.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AppPhase {
    pub bound_s: f64,
    /// Seconds after the heal until the harness saw every app running once on its node (and
    /// kept seeing it for the stable time).
    pub converged_after_s: Option<f64>,
    /// What was still wrong when the harness stopped looking.
    pub unconverged: Vec<String>,
    /// The generation of the final configuration, as the last `AppList` read showed it.
    pub final_generation: Option<u64>,
    /// Converged within the bound.
    pub ok: bool,
}

/// What the app workload's tasks share.
pub(crate) struct Ctx {
    pub rec: Recorder,
    pub nodes: Vec<Node>,
    pub cfg: ClientConfig,
    pub opts: AppOptions,
    pub seed: u64,
    defs: Vec<AppDef>,
    /// Node name -> id, from the membership.
    ids: Mutex<BTreeMap<String, u64>>,
    /// Each node's latest ok poll: when it was invoked, and what it showed.
    latest: Mutex<BTreeMap<String, (u64, Vec<AppSeen>)>>,
}

impl Ctx {
    pub fn new(
        rec: Recorder,
        nodes: Vec<Node>,
        cfg: ClientConfig,
        opts: AppOptions,
        seed: u64,
    ) -> Ctx {
        let defs = catalogue(&opts);
        Ctx {
            rec,
            nodes,
            cfg,
            opts,
            seed,
            defs,
            ids: Mutex::new(BTreeMap::new()),
            latest: Mutex::new(BTreeMap::new()),
        }
    }

    fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }
}

/// The running tasks of the workload.
pub(crate) struct Tasks {
    deployer: JoinHandle<()>,
    lister: JoinHandle<()>,
    pollers: Vec<JoinHandle<()>>,
    stop_polls: watch::Sender<bool>,
}

fn seen(s: pb::AppStatus) -> AppSeen {
    let moving_to = moving_to(&s.detail).unwrap_or_default();
    seen_as(s, moving_to)
}

/// An app's status as recorded, with `moving_to` as the caller reads it.
pub(crate) fn seen_as(s: pb::AppStatus, moving_to: String) -> AppSeen {
    AppSeen {
        moving_to,
        app: s.name,
        node: s.node,
        state: s.state,
        id: s.id,
        detail: s.detail,
        dataset: s.dataset,
    }
}

/// The node an app is moving to, from `AppList`'s detail while its dataset moves
/// (`moving to n3: copying its data while it runs; ...`): then `node` is where it runs until
/// the handoff, the dataset's primary, not the node the desired state places it on.
pub fn moving_to(detail: &str) -> Option<String> {
    let (node, _) = detail.strip_prefix("moving to ")?.split_once(':')?;
    let node = node.trim();
    (!node.is_empty() && !node.contains(' ')).then(|| node.to_string())
}

async fn deploy(api: &mut Api, plan_json: String) -> Result<Done, Failure> {
    let r = api
        .deploy(pb::DeployRequest {
            plan_json,
            dry_run: false,
            volumes_json: String::new(),
            ..Default::default()
        })
        .await
        .map_err(|s| classify(&s))?
        .into_inner();
    let changes = r
        .changes
        .into_iter()
        .map(|c| match c.kind.as_str() {
            "move" => format!("move {} {}->{}", c.app, c.from_node, c.node),
            k => format!("{k} {} {}", c.app, c.node),
        })
        .collect();
    Ok(Done::app(AppResult::Deployed {
        generation: r.generation,
        changes,
    }))
}

async fn local_apps(api: &mut Api) -> Result<Done, Failure> {
    let r = api
        .local_apps(pb::LocalAppsRequest {})
        .await
        .map_err(|s| classify(&s))?
        .into_inner();
    let apps = r
        .apps
        .into_iter()
        .map(|s| AppSeen {
            // One node's view: the desired node is not what it says.
            node: String::new(),
            ..seen(s)
        })
        .collect();
    Ok(Done::app(AppResult::Local { apps }))
}

/// `AppList` of `name` (all apps when empty), each app's status recorded by `seen`.
pub(crate) async fn app_list(
    api: &mut Api,
    name: &str,
    seen: fn(pb::AppStatus) -> AppSeen,
) -> Result<Done, Failure> {
    let r = api
        .app_list(pb::AppListRequest {
            name: name.to_string(),
        })
        .await
        .map_err(|s| classify(&s))?
        .into_inner();
    Ok(Done::app(AppResult::List {
        generation: r.generation,
        apps: r.apps.into_iter().map(seen).collect(),
    }))
}

/// The members' ids by name, from any node that answers (not recorded: setup).
async fn member_ids(ctx: &Ctx) -> Result<BTreeMap<String, u64>, String> {
    let mut last = String::from("no node answered");
    for n in &ctx.nodes {
        let Ok(mut api) = crate::client::connect(&n.api_addr(), &ctx.cfg).await else {
            last = format!("{} does not answer", n.name);
            continue;
        };
        let status = api.status(pb::StatusRequest { local: false });
        match tokio::time::timeout(Duration::from_secs(5), status).await {
            Ok(Ok(r)) => {
                let ids: BTreeMap<String, u64> = r
                    .into_inner()
                    .members
                    .into_iter()
                    .map(|m| (m.name, m.id))
                    .collect();
                if ctx.nodes.iter().all(|n| ids.contains_key(&n.name)) {
                    return Ok(ids);
                }
                last = format!("{} lists only {:?}", n.name, ids.keys());
            }
            Ok(Err(s)) => last = format!("{}: {:?}: {}", n.name, s.code(), s.message()),
            Err(_) => last = format!("{}: no answer", n.name),
        }
    }
    Err(last)
}

/// One deploy of `pins` through a random node, recorded.
async fn deploy_op(
    ctx: &Ctx,
    conns: &mut [Conn],
    rng: &mut StdRng,
    process: u64,
    pins: &BTreeMap<String, String>,
) -> crate::history::Op {
    let call = Call::AppDeploy {
        apps: ctx
            .defs
            .iter()
            .filter_map(|d| {
                pins.get(&d.name).map(|node| {
                    (
                        d.name.clone(),
                        AppPin {
                            node: node.clone(),
                            volume: d.volume,
                            what: d.what.clone(),
                        },
                    )
                })
            })
            .collect(),
    };
    let plan = {
        let ids = ctx.ids.lock().unwrap_or_else(|p| p.into_inner());
        plan_json(&ctx.defs, pins, &ids).and_then(|p| with_extra(&p, &ctx.opts.extra))
    };
    let i = rng.random_range(0..conns.len());
    let conn = &mut conns[i];
    let attempt = async {
        let plan = plan.map_err(|e| Failure::Definite(format!("no plan: {e}")))?;
        let api = conn.api().await?;
        deploy(api, plan).await
    };
    let (op, broken) = record_call(
        &ctx.rec,
        &ctx.nodes[i].name,
        process,
        call,
        ctx.opts.op_timeout,
        attempt,
    )
    .await;
    if broken {
        conns[i].api = None;
    }
    op
}

/// Deploys the first configuration, then moves apps now and then, until `stop`.
async fn deployer(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0xa995_de91_0000_0000);
    let mut conns: Vec<Conn> = ctx.nodes.iter().map(|n| Conn::new(n, &ctx.cfg)).collect();
    let mut process = 7_000_000u64;
    let names = ctx.names();
    if names.is_empty() {
        return;
    }
    loop {
        match member_ids(&ctx).await {
            Ok(ids) => {
                *ctx.ids.lock().unwrap_or_else(|p| p.into_inner()) = ids;
                break;
            }
            Err(e) => {
                println!("jepsen: apps: no node ids yet: {e}");
                if pause(Duration::from_secs(1), &mut stop).await {
                    return;
                }
            }
        }
    }
    // Spread over the nodes, from a seeded first node.
    let first = rng.random_range(0..names.len());
    let mut pins: BTreeMap<String, String> = ctx
        .defs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.clone(), names[(first + i) % names.len()].clone()))
        .collect();
    loop {
        let op = deploy_op(&ctx, &mut conns, &mut rng, process, &pins).await;
        match op.outcome {
            Outcome::Ok => break,
            Outcome::Unknown => process += 1,
            Outcome::Fail => {}
        }
        if pause(Duration::from_secs(1), &mut stop).await {
            return;
        }
    }
    println!(
        "jepsen: apps deployed: {}",
        pins.iter()
            .map(|(a, n)| format!("{a}@{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    loop {
        let wait = ctx.opts.deploy_interval.mul_f64(rng.random_range(0.5..1.5));
        if pause(wait, &mut stop).await {
            return;
        }
        let mut next = pins.clone();
        let apps: Vec<String> = pins.keys().cloned().collect();
        let k = rng.random_range(1..=ctx.opts.moves_per_deploy.clamp(1, apps.len().max(1)));
        for app in apps.choose_multiple(&mut rng, k) {
            let others: Vec<&String> = names.iter().filter(|n| Some(*n) != pins.get(app)).collect();
            if let Some(to) = others.choose(&mut rng) {
                next.insert(app.clone(), (*to).clone());
            }
        }
        let op = deploy_op(&ctx, &mut conns, &mut rng, process, &next).await;
        match op.outcome {
            Outcome::Ok => pins = next,
            // It may still take effect; the next acknowledged deploy replaces either.
            Outcome::Unknown => {
                pins = next;
                process += 1;
            }
            Outcome::Fail => {}
        }
    }
}

/// Asks node `i` what it runs, one poll after another, until `stop`.
async fn poller(ctx: Arc<Ctx>, i: usize, mut stop: watch::Receiver<bool>) {
    let node = ctx.nodes[i].clone();
    let mut conn = Conn::new(&node, &ctx.cfg);
    let process = 7_100_000 + i as u64;
    loop {
        let attempt = async {
            let api = conn.api().await?;
            local_apps(api).await
        };
        let (op, broken) = record_call(
            &ctx.rec,
            &node.name,
            process,
            Call::AppLocal {},
            ctx.opts.poll_timeout,
            attempt,
        )
        .await;
        if broken {
            conn.api = None;
        }
        if let (Outcome::Ok, Some(AppResult::Local { apps })) = (op.outcome, op.app) {
            ctx.latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.name.clone(), (op.invoke_ns, apps));
        }
        if pause(ctx.opts.poll_interval, &mut stop).await {
            return;
        }
    }
}

/// One `AppList` through node `i`, recorded; what it showed, if it answered.
async fn list_op(
    ctx: &Ctx,
    conns: &mut [Conn],
    i: usize,
    process: u64,
) -> (crate::history::Op, Option<(u64, Vec<AppSeen>)>) {
    let conn = &mut conns[i];
    let attempt = async {
        let api = conn.api().await?;
        app_list(api, "", seen).await
    };
    let (op, broken) = record_call(
        &ctx.rec,
        &ctx.nodes[i].name,
        process,
        Call::AppList {},
        ctx.opts.op_timeout,
        attempt,
    )
    .await;
    if broken {
        conns[i].api = None;
    }
    let list = match (&op.outcome, &op.app) {
        (Outcome::Ok, Some(AppResult::List { generation, apps })) => {
            Some((*generation, apps.clone()))
        }
        _ => None,
    };
    (op, list)
}

/// `AppList` from a random node now and then, until `stop`.
async fn lister(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x0a99_1157_0000_0000);
    let mut conns: Vec<Conn> = ctx.nodes.iter().map(|n| Conn::new(n, &ctx.cfg)).collect();
    loop {
        let wait = ctx.opts.list_interval.mul_f64(rng.random_range(0.5..1.5));
        if pause(wait, &mut stop).await {
            return;
        }
        let i = rng.random_range(0..conns.len());
        list_op(&ctx, &mut conns, i, 7_200_000).await;
    }
}

/// Starts the deployer, the pollers (one per node) and the lister. The deployer and the lister
/// stop with `stop`; the pollers go on until [`finish`].
pub(crate) fn start(ctx: Arc<Ctx>, stop: watch::Receiver<bool>) -> Tasks {
    let (stop_polls, polls_rx) = watch::channel(false);
    let pollers = (0..ctx.nodes.len())
        .map(|i| tokio::spawn(poller(ctx.clone(), i, polls_rx.clone())))
        .collect();
    Tasks {
        deployer: tokio::spawn(deployer(ctx.clone(), stop.clone())),
        lister: tokio::spawn(lister(ctx, stop)),
        pollers,
        stop_polls,
    }
}

/// What is wrong with the cluster's apps, judged from `desired` (an `AppList`) and each node's
/// latest poll, which must have been invoked at or after `since_ns`. Empty when every app of
/// `desired` runs on its node and nothing runs anywhere else.
pub fn judge(
    nodes: &[String],
    desired: &[AppSeen],
    latest: &BTreeMap<String, (u64, Vec<AppSeen>)>,
    since_ns: u64,
) -> Vec<String> {
    let want: BTreeMap<&str, &str> = desired
        .iter()
        .map(|a| (a.app.as_str(), a.desired()))
        .collect();
    let mut wrong = Vec::new();
    let mut running: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for n in nodes {
        match latest.get(n) {
            Some((at, apps)) if *at >= since_ns => {
                for a in apps.iter().filter(|a| a.state == "running") {
                    running.entry(a.app.as_str()).or_default().insert(n);
                }
            }
            _ => wrong.push(format!("{n}: no poll answered since the app list")),
        }
    }
    for (app, node) in &want {
        let on = running.get(app).cloned().unwrap_or_default();
        if !on.contains(node) {
            let state = desired
                .iter()
                .find(|a| a.app == *app)
                .map(|a| {
                    if a.detail.is_empty() {
                        a.state.clone()
                    } else {
                        format!("{}: {}", a.state, a.detail)
                    }
                })
                .unwrap_or_default();
            wrong.push(format!("{app} does not run on {node} ({state})"));
        }
    }
    for (app, on) in &running {
        for n in on {
            if want.get(app) != Some(n) {
                wrong.push(format!(
                    "{app} runs on {n}{}",
                    match want.get(app) {
                        Some(d) => format!(", not only on {d}"),
                        None => " but is not in the configuration".to_string(),
                    }
                ));
            }
        }
    }
    wrong
}

/// Each node's latest poll, once every node has answered one invoked at or after `since_ns`
/// (or after a poll's time limit and period, with what there is then).
async fn fresh_polls(ctx: &Ctx, since_ns: u64) -> BTreeMap<String, (u64, Vec<AppSeen>)> {
    let until = Instant::now() + ctx.opts.poll_timeout + ctx.opts.poll_interval * 2;
    loop {
        let latest = ctx.latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let fresh = ctx
            .nodes
            .iter()
            .all(|n| latest.get(&n.name).is_some_and(|(at, _)| *at >= since_ns));
        if fresh || Instant::now() >= until {
            return latest;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After the heal: waits until every app of the final configuration runs exactly once on its
/// node (see the module's description), then stops the pollers.
pub(crate) async fn finish(ctx: Arc<Ctx>, tasks: Tasks, healed_at: Instant) -> AppPhase {
    let _ = tasks.deployer.await;
    let _ = tasks.lister.await;
    let opts = ctx.opts.clone();
    let names = ctx.names();
    let deadline = healed_at + opts.bound + AFTER_BOUND;
    let mut conns: Vec<Conn> = ctx.nodes.iter().map(|n| Conn::new(n, &ctx.cfg)).collect();
    let mut problems = vec!["no app list was read".to_string()];
    let mut clean_since: Option<Instant> = None;
    let mut converged_after_s = None;
    let mut generation = None;
    let mut i = 0usize;
    while Instant::now() < deadline {
        let (op, list) = list_op(&ctx, &mut conns, i % names.len().max(1), 7_300_000).await;
        i += 1;
        if let Some((g, desired)) = list {
            generation = Some(g);
            let latest = fresh_polls(&ctx, op.invoke_ns).await;
            problems = judge(&names, &desired, &latest, op.invoke_ns);
            if problems.is_empty() {
                let since = *clean_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= opts.stable {
                    converged_after_s = Some(since.duration_since(healed_at).as_secs_f64());
                    break;
                }
            } else {
                clean_since = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The final configuration, read once more after the last look.
    for k in 0..names.len() {
        if let (_, Some((g, _))) = list_op(&ctx, &mut conns, (i + k) % names.len(), 7_300_000).await
        {
            generation = Some(g);
            break;
        }
    }
    let _ = tasks.stop_polls.send(true);
    for p in tasks.pollers {
        let _ = p.await;
    }
    println!(
        "jepsen: apps after heal: {}",
        match converged_after_s {
            Some(t) => format!(
                "every app ran once on its node {t:.1}s after the heal (generation {})",
                generation.unwrap_or(0)
            ),
            None => format!(
                "NOT converged within {:?}: {}",
                opts.bound,
                problems.join("; ")
            ),
        }
    );
    AppPhase {
        bound_s: opts.bound.as_secs_f64(),
        ok: converged_after_s.is_some_and(|t| t <= opts.bound.as_secs_f64()),
        converged_after_s,
        unconverged: if converged_after_s.is_some() {
            Vec::new()
        } else {
            problems
        },
        final_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_has_stateful_and_stateless_apps_on_distinct_ports() {
        let defs = catalogue(&AppOptions::default());
        assert_eq!(defs.len(), 6);
        assert_eq!(defs.iter().filter(|d| d.volume).count(), 3);
        let ports: Vec<u16> = defs.iter().filter_map(|d| d.port).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(ports.len(), distinct.len());
        assert!(defs.iter().any(|d| d.command[0] == "sh"));
        assert!(defs
            .iter()
            .any(|d| !d.volume && d.command[0] == "flock-testapp"));
        let names: BTreeSet<&str> = defs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names.len(), 6);
        assert!(names.contains("ja-s1") && names.contains("ja-l1") && names.contains("ja-w2"));
    }

    #[test]
    fn the_plan_is_what_deploy_takes() {
        let defs = catalogue(&AppOptions::default());
        let pins: BTreeMap<String, String> = defs
            .iter()
            .map(|d| (d.name.clone(), "n2".to_string()))
            .collect();
        let ids: BTreeMap<String, u64> = [("n2".to_string(), 7)].into();
        let json = plan_json(&defs, &pins, &ids).unwrap();
        let back: BTreeMap<String, PlannedApp> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), 6);
        let s1 = &back["ja-s1"];
        assert_eq!(s1.node, Some(7));
        assert!(s1.spec.volume.is_some());
        assert_eq!(s1.spec.restart_policy, RestartPolicy::Always);
        assert_eq!(s1.spec.ports[0].external, 9101);
        assert!(plan_json(&defs, &pins, &BTreeMap::new()).is_err());
        // Another workload's apps ride along, unpinned.
        let extra = crate::workload::moves::specs(&Default::default()).unwrap();
        let json = with_extra(&json, &extra).unwrap();
        let back: BTreeMap<String, PlannedApp> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), 7);
        assert_eq!(back["jm-1"].node, None);
        assert!(back["jm-1"].spec.volume.is_some());
        assert_eq!(back["ja-s1"].node, Some(7));
    }

    fn seen(app: &str, node: &str, state: &str) -> AppSeen {
        AppSeen {
            app: app.into(),
            node: node.into(),
            state: state.into(),
            id: "1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_moving_apps_node_is_where_it_moves_to() {
        assert_eq!(
            moving_to("moving to n3: copying its data while it runs; waiting").as_deref(),
            Some("n3")
        );
        assert_eq!(
            moving_to("moving to n4: handing off").as_deref(),
            Some("n4")
        );
        assert_eq!(
            moving_to("waiting for dataset ja-s1 to arrive on this node"),
            None
        );
        assert_eq!(moving_to(""), None);
        // While it moves it still runs on the source: not converged.
        let nodes = vec!["n1".to_string(), "n2".to_string()];
        let desired = vec![AppSeen {
            moving_to: "n2".into(),
            ..seen("a", "n1", "running")
        }];
        let latest: BTreeMap<String, (u64, Vec<AppSeen>)> = [
            ("n1".to_string(), (10, vec![seen("a", "", "running")])),
            ("n2".to_string(), (10, vec![])),
        ]
        .into();
        assert_eq!(judge(&nodes, &desired, &latest, 5).len(), 2);
    }

    #[test]
    fn judging_wants_each_app_once_on_its_node() {
        let nodes = vec!["n1".to_string(), "n2".to_string()];
        let desired = vec![seen("a", "n1", "running"), seen("b", "n2", "waiting")];
        let mut latest: BTreeMap<String, (u64, Vec<AppSeen>)> = BTreeMap::new();
        latest.insert("n1".into(), (10, vec![seen("a", "", "running")]));
        latest.insert("n2".into(), (10, vec![seen("b", "", "running")]));
        assert!(judge(&nodes, &desired, &latest, 5).is_empty());
        // A poll from before the list does not count.
        let w = judge(&nodes, &desired, &latest, 11);
        assert_eq!(
            w.iter().filter(|p| p.contains("no poll answered")).count(),
            2,
            "{w:?}"
        );
        // b also on n1; a not running.
        latest.insert(
            "n1".into(),
            (
                10,
                vec![seen("a", "", "restarting"), seen("b", "", "running")],
            ),
        );
        let w = judge(&nodes, &desired, &latest, 5);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().any(|p| p.contains("a does not run on n1")));
        assert!(w.iter().any(|p| p.contains("b runs on n1, not only on n2")));
        // An app not in the configuration.
        latest.insert(
            "n1".into(),
            (10, vec![seen("a", "", "running"), seen("c", "", "running")]),
        );
        let w = judge(&nodes, &desired, &latest, 5);
        assert_eq!(w, vec!["c runs on n1 but is not in the configuration"]);
    }
}
