//! The move workload (issue 7): clients append to a stateful test app through whichever node
//! runs it, while a mover moves it between nodes (`AppMove`, sometimes cancelled) and the
//! nemesis kills and partitions nodes. After the faults, the app's whole log is read once it
//! runs in one place; [`crate::checker::moves`] proves that no acknowledged write was lost and
//! that no two copies accepted writes at once.
//!
//! - **apps** (`apps`, 1 by default): `flock-testapp` (an append-only log, fsync'ed before each
//!   `OK <seq>`) with a volume, restart policy `always`, internal port `base_port + i`,
//!   external port `base_port + 100 + i`. Names `<prefix>-<i>` (`jm-1`). Deployed unpinned
//!   (`mv_deploy`) by this workload, or, when the app workload runs too (a deploy replaces the
//!   whole configuration), by the app workload's deployer with its own apps, unpinned, so that
//!   its deploys leave them where they run (see [`crate::workload::app::AppOptions::extra`]).
//! - **clients** (`clients`, 4; client `c` writes to app `c % apps`): one `APPEND w<c>-<n>` at a
//!   time, each value unique, about `rate` appends per second all together. A client keeps a
//!   TCP connection; on a new one it first sends `PING` (the answer names the process, the
//!   *instance*, that takes its appends). Where it connects (`via`): `direct`, the node that
//!   runs the app (from `AppList`: a recorded `mv_locate` op, cached, asked again after a
//!   failure) at the app's internal port; `mesh`, a random node at the app's external port (the
//!   routing mesh forwards it). An `mv_append` op is `ok` with the seq and instance, `fail` when
//!   the append was never sent (no connection, or `PING` got no answer), `unknown` when it was
//!   sent and no `OK` came back.
//! - **mover**: about every `move_interval`, locates an app (`mv_locate`) and moves it
//!   (`mv_move`: `AppMove`, which returns once the move is recorded, as `flockctl app move
//!   --no-wait`) to a random other node, through a random node (another one if that one cannot
//!   be reached); with `cancel_probability`, cancels it (`mv_cancel`) a moment later, and a move
//!   still in progress at the next round is cancelled or redirected.
//!
//! After the faults end ([`finish`]): the clients and the mover stop; the app is located until
//! `AppList` shows it running with no move in progress and every node's `LocalApps` shows it on
//! that node only, then its log is read (`mv_read`), within `bound`.

use super::pause;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use flock_proto::v1 as pb;
use flock_scheduler::config::{AppSpec, PlannedApp, PortMap, Volume, VolumePolicy};

use super::failover::{events_op, replicate};
use super::Done;
use crate::client::{classify, ClientConfig, Failure};
use crate::docker::Node;
use crate::history::{AppResult, AppSeen, Call, Op, Outcome};
use crate::runner::{record_call, Conn, Recorder};

/// How clients reach the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// The node that runs the app (as `AppList` says), at the app's internal port.
    Direct,
    /// A random node, at the app's external port (the routing mesh forwards it).
    Mesh,
    /// Half the clients direct (the even ones), half through the mesh; the final read direct.
    Mixed,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Mesh => "mesh",
            Via::Mixed => "mixed",
        }
    }

    /// How client `c` goes: direct or mesh.
    pub fn of_client(self, c: usize) -> Via {
        match self {
            Via::Mixed if c.is_multiple_of(2) => Via::Direct,
            Via::Mixed => Via::Mesh,
            v => v,
        }
    }

    /// How the final read goes: direct or mesh.
    fn of_read(self) -> Via {
        match self {
            Via::Mixed => Via::Direct,
            v => v,
        }
    }
}

/// Settings of the move workload.
#[derive(Clone, Debug)]
pub struct MoveOptions {
    /// App names are `<prefix>-<i>` (their datasets are named after them).
    pub prefix: String,
    /// How many test apps (each with its own clients).
    pub apps: usize,
    /// App `i` listens on `base_port + i`; its external port is `base_port + 100 + i`.
    pub base_port: u16,
    pub via: Via,
    /// Appending clients, all apps together.
    pub clients: usize,
    /// Target appends per second, all clients together.
    pub rate: f64,
    /// Mean time between two moves (each drawn in half to one and a half times it).
    pub move_interval: Duration,
    /// Chance that a move is cancelled a moment after it was asked for.
    pub cancel_probability: f64,
    /// Time limit of a connect, and of the `PING` on a new connection.
    pub connect_timeout: Duration,
    /// Time limit of an `APPEND`'s answer (then `unknown`).
    pub append_timeout: Duration,
    /// Time limit of the cluster calls (`AppList`, `AppMove`, `Deploy`).
    pub rpc_timeout: Duration,
    /// After the heal, the app must run in one place and its log be read within this.
    pub bound: Duration,
    /// Deploy the apps (false when the app workload deploys them with its own).
    pub deploy: bool,
    /// Move the apps about (the failover workload does not: its failovers come from faults).
    pub moves: bool,
    /// Replicas for failover and the snapshot interval of each app's dataset (the failover
    /// workload): sent with its deploy as the volume's policy, and set with `DatasetSet`
    /// (`fo_replicate`) until acknowledged, whoever deployed it.
    pub replication: Option<(u32, Duration)>,
    /// Process numbers of its clients start here (8_000_000; another one side by side needs
    /// its own).
    pub process_base: u64,
    /// How it is named in what the harness prints (`move workload`).
    pub label: &'static str,
}

impl Default for MoveOptions {
    fn default() -> Self {
        MoveOptions {
            prefix: "jm".into(),
            apps: 1,
            base_port: 9200,
            via: Via::Mixed,
            clients: 4,
            rate: 40.0,
            move_interval: Duration::from_secs(10),
            cancel_probability: 0.2,
            connect_timeout: Duration::from_secs(1),
            append_timeout: Duration::from_secs(3),
            rpc_timeout: Duration::from_secs(10),
            bound: Duration::from_secs(60),
            deploy: true,
            moves: true,
            replication: None,
            process_base: 8_000_000,
            label: "move workload",
        }
    }
}

impl MoveOptions {
    /// The failover workload's settings: apps `jf-1`.. on ports 9401.. (external 9501..),
    /// datasets with `replicas` replicas snapshotting every `interval`, no moves.
    pub fn failover(replicas: u32, interval: Duration) -> MoveOptions {
        MoveOptions {
            prefix: "jf".into(),
            base_port: 9400,
            moves: false,
            cancel_probability: 0.0,
            replication: Some((replicas, interval)),
            process_base: 18_000_000,
            label: "failover workload",
            ..MoveOptions::default()
        }
    }

    /// The volume policies its deploy sends (`DeployRequest.volumes_json`): empty without
    /// replication (policies left as they are).
    pub fn volumes_json(&self) -> Result<String, String> {
        let Some((replicas, interval)) = self.replication else {
            return Ok(String::new());
        };
        let policies: BTreeMap<String, VolumePolicy> = app_names(self)
            .into_iter()
            .map(|n| {
                (
                    n,
                    VolumePolicy {
                        retention: None,
                        replicas: Some(replicas),
                        snapshot_interval_ms: Some(interval.as_millis() as u64),
                    },
                )
            })
            .collect();
        serde_json::to_string(&policies).map_err(|e| e.to_string())
    }
}

/// The names of the workload's apps.
pub fn app_names(opts: &MoveOptions) -> Vec<String> {
    (1..=opts.apps.max(1))
        .map(|i| format!("{}-{i}", opts.prefix))
        .collect()
}

/// App `i`'s (internal, external) port, `i` counted from 0.
pub fn ports(opts: &MoveOptions, i: usize) -> (u16, u16) {
    let p = opts.base_port + 1 + i as u16;
    (p, p + 100)
}

/// The apps' specs, as flockctl would make them from an application.yml (through serde, so
/// that fields the scheduler adds with a default need nothing here).
pub fn specs(opts: &MoveOptions) -> Result<Vec<AppSpec>, String> {
    app_names(opts)
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let (internal, external) = ports(opts, i);
            super::app::spec_of(
                &name,
                &["flock-testapp".to_string()],
                vec![PortMap { internal, external }],
                Some(Volume {
                    mountpoint: "/data".into(),
                    maximum_size: None,
                    dataset: None,
                }),
            )
        })
        .collect()
}

/// What the harness saw after the faults ended.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MovePhase {
    pub bound_s: f64,
    /// Per app: seconds after the heal until its log was read (it ran in one place).
    pub read_after_s: BTreeMap<String, Option<f64>>,
    /// Per app: the node it ran on when its log was read.
    pub final_node: BTreeMap<String, String>,
    /// What was still wrong when the harness stopped looking.
    pub problems: Vec<String>,
    /// Every app's log read within the bound.
    pub ok: bool,
}

/// Where an app runs, as the last `AppList` said.
#[derive(Clone, Debug, Default)]
struct Location {
    at: Option<Instant>,
    seen: Option<AppSeen>,
}

/// What the workload's tasks share.
pub(crate) struct Ctx {
    pub rec: Recorder,
    pub nodes: Vec<Node>,
    pub cfg: ClientConfig,
    pub opts: MoveOptions,
    pub seed: u64,
    names: Vec<String>,
    /// Per app: its last location, and a lock so that one client asks at a time.
    located: BTreeMap<String, (Mutex<Location>, tokio::sync::Mutex<()>)>,
    /// The cluster's events read while the workload runs, by id (the failover workload): the
    /// cluster keeps only its newest few hundred, so a long run reads them as they come.
    pub(crate) events_seen: Mutex<BTreeMap<u64, serde_json::Value>>,
}

impl Ctx {
    pub fn new(
        rec: Recorder,
        nodes: Vec<Node>,
        cfg: ClientConfig,
        opts: MoveOptions,
        seed: u64,
    ) -> Ctx {
        let names = app_names(&opts);
        let located = names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    (Mutex::new(Location::default()), tokio::sync::Mutex::new(())),
                )
            })
            .collect();
        Ctx {
            rec,
            nodes,
            cfg,
            opts,
            seed,
            names,
            located,
            events_seen: Mutex::new(BTreeMap::new()),
        }
    }

    fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    fn port(&self, app: &str) -> (u16, u16) {
        let i = self.names.iter().position(|n| n == app).unwrap_or(0);
        ports(&self.opts, i)
    }

    fn cached(&self, app: &str) -> Location {
        self.located
            .get(app)
            .map(|(l, _)| l.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }
}

/// The running tasks of the workload.
pub(crate) struct Tasks {
    clients: Vec<JoinHandle<()>>,
    mover: JoinHandle<()>,
    events: Option<JoinHandle<()>>,
}

/// An app's status as recorded: its target from `moving_to`, or else from the detail.
fn seen(mut s: pb::AppStatus) -> AppSeen {
    let moving_to = if s.moving_to.is_empty() {
        super::app::moving_to(&s.detail).unwrap_or_default()
    } else {
        std::mem::take(&mut s.moving_to)
    };
    super::app::seen_as(s, moving_to)
}

/// One `AppList` of `app` through node `i`, recorded; what it showed, if it answered.
async fn locate_op(
    ctx: &Ctx,
    conns: &mut [Conn],
    i: usize,
    process: u64,
    app: &str,
) -> (Op, Option<AppSeen>) {
    let conn = &mut conns[i];
    let attempt = async {
        let api = conn.api().await?;
        super::app::app_list(api, app, seen).await
    };
    let (op, broken) = record_call(
        &ctx.rec,
        &ctx.nodes[i].name,
        process,
        Call::MvLocate {
            app: app.to_string(),
        },
        ctx.opts.rpc_timeout.min(Duration::from_secs(3)),
        attempt,
    )
    .await;
    if broken {
        conns[i].api = None;
    }
    let found = match (&op.outcome, &op.app) {
        (Outcome::Ok, Some(AppResult::List { apps, .. })) => {
            apps.iter().find(|a| a.app == app).cloned()
        }
        _ => None,
    };
    if let Some(s) = &found {
        if let Some((l, _)) = ctx.located.get(app) {
            *l.lock().unwrap_or_else(|p| p.into_inner()) = Location {
                at: Some(Instant::now()),
                seen: Some(s.clone()),
            };
        }
    }
    (op, found)
}

/// Where `app` runs: the cached answer, unless `fresh` asks for one younger than a few hundred
/// milliseconds (then asked through random nodes, one client at a time, recorded).
async fn resolve(
    ctx: &Ctx,
    conns: &mut [Conn],
    rng: &mut StdRng,
    process: u64,
    app: &str,
    fresh: bool,
) -> Option<AppSeen> {
    const YOUNG: Duration = Duration::from_millis(300);
    let young = |l: &Location| l.at.is_some_and(|t| t.elapsed() < YOUNG);
    let l = ctx.cached(app);
    if l.seen.is_some() && (!fresh || young(&l)) {
        return l.seen;
    }
    let (_, lock) = ctx.located.get(app)?;
    let _guard = lock.lock().await;
    let l = ctx.cached(app);
    if l.seen.is_some() && young(&l) {
        return l.seen;
    }
    for _ in 0..3 {
        let i = rng.random_range(0..conns.len());
        if let (_, Some(s)) = locate_op(ctx, conns, i, process, app).await {
            return Some(s);
        }
    }
    ctx.cached(app).seen
}

/// A client's connection to the app: the node it goes through and the instance behind it.
struct AppConn {
    node: String,
    instance: String,
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl AppConn {
    /// Connects and asks `PING`; any failure means nothing was sent that changes anything.
    async fn open(node: &Node, port: u16, timeout: Duration) -> Result<AppConn, String> {
        let addr = format!("{}:{port}", node.ip);
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("not sent: connect {addr}: {e}")),
            Err(_) => {
                return Err(format!(
                    "not sent: connect {addr}: no answer in {timeout:?}"
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        let (r, writer) = stream.into_split();
        let mut c = AppConn {
            node: node.name.clone(),
            instance: String::new(),
            reader: BufReader::new(r),
            writer,
        };
        let pong = match tokio::time::timeout(timeout, c.ask("PING")).await {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(format!("not sent: PING to {addr}: {e}")),
            Err(_) => {
                return Err(format!(
                    "not sent: PING to {addr}: no answer in {timeout:?}"
                ))
            }
        };
        match pong.strip_prefix("PONG ") {
            Some(i) => c.instance = i.trim().to_string(),
            None => return Err(format!("not sent: PING to {addr} answered {pong:?}")),
        }
        Ok(c)
    }

    /// Sends one request line and reads one answer line.
    async fn ask(&mut self, request: &str) -> Result<String, String> {
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        self.line().await
    }

    async fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line).await {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(format!("receive: {e}")),
        }
    }
}

/// Parses the test app's answer to `APPEND`: `OK <seq>`.
pub fn parse_ok(line: &str) -> Option<u64> {
    line.strip_prefix("OK ")?.trim().parse().ok()
}

/// Parses one line of `READ`'s answer: `<seq> <text>`.
pub fn parse_entry(line: &str) -> Option<(u64, String)> {
    let (seq, text) = line.split_once(' ')?;
    Some((seq.parse().ok()?, text.to_string()))
}

/// The node to go through: direct, the node `AppList` names (where it runs, or until a move's
/// handoff, the dataset's primary); mesh, a random node.
fn target<'a>(ctx: &'a Ctx, via: Via, rng: &mut StdRng, loc: Option<&AppSeen>) -> Option<&'a Node> {
    match via {
        Via::Mesh => ctx.nodes.choose(rng),
        _ => ctx.node(&loc?.node),
    }
}

fn port_for(ctx: &Ctx, via: Via, app: &str) -> u16 {
    let (internal, external) = ctx.port(app);
    match via {
        Via::Mesh => external,
        _ => internal,
    }
}

/// One client: appends unique values to `app` until `stop`.
async fn client(ctx: Arc<Ctx>, c: usize, app: String, mut stop: watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(
        ctx.seed ^ 0x6d76_636c_0000_0000u64.wrapping_add((c as u64).wrapping_mul(0x9e37_79b9)),
    );
    let mut conns: Vec<Conn> = ctx.nodes.iter().map(|n| Conn::new(n, &ctx.cfg)).collect();
    let clients = ctx.opts.clients.max(1) as u64;
    let mean_delay = Duration::from_secs_f64(clients as f64 / ctx.opts.rate.max(0.1));
    let how = ctx.opts.via.of_client(c);
    let port = port_for(&ctx, how, &app);
    let via = how.as_str().to_string();
    let mut process = ctx.opts.process_base + c as u64;
    let mut conn: Option<AppConn> = None;
    let mut fresh = false;
    let mut n = 0u64;
    while !*stop.borrow() {
        if conn.is_none() {
            let loc = resolve(
                &ctx,
                &mut conns,
                &mut rng,
                ctx.opts.process_base + 100_000 + c as u64,
                &app,
                fresh,
            )
            .await;
            fresh = false;
            if loc.is_none() && how == Via::Direct {
                // Not deployed yet, or no node answered: nothing to write to.
                fresh = true;
                if pause(Duration::from_millis(300), &mut stop).await {
                    return;
                }
                continue;
            }
            let Some(node) = target(&ctx, how, &mut rng, loc.as_ref()).cloned() else {
                fresh = true;
                if pause(Duration::from_millis(300), &mut stop).await {
                    return;
                }
                continue;
            };
            n += 1;
            let value = format!("w{c}-{n}");
            let timeout = ctx.opts.connect_timeout;
            let mut opened = None;
            let attempt = async {
                let mut ac = AppConn::open(&node, port, timeout)
                    .await
                    .map_err(Failure::Definite)?;
                let r = append(&mut ac, &value, ctx.opts.append_timeout).await;
                opened = Some(ac);
                r
            };
            let (op, _) = record_call(
                &ctx.rec,
                &node.name,
                process,
                Call::MvAppend {
                    app: app.clone(),
                    value: value.clone(),
                    via: via.clone(),
                },
                timeout * 2 + ctx.opts.append_timeout + Duration::from_millis(500),
                attempt,
            )
            .await;
            match op.outcome {
                Outcome::Ok => conn = opened,
                Outcome::Unknown => process += clients,
                Outcome::Fail => {}
            }
            if op.outcome != Outcome::Ok {
                fresh = true;
                let wait = Duration::from_millis(rng.random_range(100..300));
                if pause(wait, &mut stop).await {
                    return;
                }
                continue;
            }
        } else if let Some(mut ac) = conn.take() {
            n += 1;
            let value = format!("w{c}-{n}");
            let node = ac.node.clone();
            let limit = ctx.opts.append_timeout;
            let mut kept = None;
            let attempt = async {
                let r = append(&mut ac, &value, limit).await;
                kept = Some(ac);
                r
            };
            let (op, _) = record_call(
                &ctx.rec,
                &node,
                process,
                Call::MvAppend {
                    app: app.clone(),
                    value: value.clone(),
                    via: via.clone(),
                },
                limit + Duration::from_millis(500),
                attempt,
            )
            .await;
            match op.outcome {
                Outcome::Ok => conn = kept,
                Outcome::Unknown => {
                    process += clients;
                    fresh = true;
                }
                Outcome::Fail => fresh = true,
            }
            if op.outcome != Outcome::Ok {
                let wait = Duration::from_millis(rng.random_range(100..300));
                if pause(wait, &mut stop).await {
                    return;
                }
                continue;
            }
        }
        let delay = mean_delay.mul_f64(rng.random_range(0.0..2.0));
        if pause(delay, &mut stop).await {
            return;
        }
    }
}

/// `APPEND value` on an open connection: `ok` with the seq, or unknown (it was sent).
async fn append(ac: &mut AppConn, value: &str, limit: Duration) -> Result<Done, Failure> {
    let line = match tokio::time::timeout(limit, ac.ask(&format!("APPEND {value}"))).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => return Err(Failure::Indefinite(format!("sent: {e}"))),
        Err(_) => {
            return Err(Failure::Indefinite(format!(
                "sent: no answer within {limit:?}"
            )))
        }
    };
    match parse_ok(&line) {
        Some(seq) => Ok(Done::app(AppResult::Appended {
            seq,
            instance: ac.instance.clone(),
        })),
        // ERR: the entry may be in the file although its fsync failed.
        None => Err(Failure::Indefinite(format!("answered {line:?}"))),
    }
}

/// One `AppMove` (or its cancel) of `app` through a random node, recorded; through another
/// node when the chosen one could not be reached (up to three tries).
async fn move_op(
    ctx: &Ctx,
    conns: &mut [Conn],
    rng: &mut StdRng,
    process: u64,
    app: &str,
    to: Option<&str>,
) -> Op {
    let mut tries = 0;
    loop {
        tries += 1;
        let i = rng.random_range(0..conns.len());
        let conn = &mut conns[i];
        let call = match to {
            Some(to) => Call::MvMove {
                app: app.to_string(),
                to: to.to_string(),
            },
            None => Call::MvCancel {
                app: app.to_string(),
            },
        };
        let attempt = async {
            let api = conn.api().await?;
            let r = api
                .app_move(pb::AppMoveRequest {
                    name: app.to_string(),
                    to: to.unwrap_or_default().to_string(),
                    cancel: to.is_none(),
                })
                .await
                .map_err(|s| classify(&s))?
                .into_inner();
            Ok(Done::app(AppResult::Moved {
                from: r.from_node,
                to: r.to_node,
            }))
        };
        let (op, broken) = record_call(
            &ctx.rec,
            &ctx.nodes[i].name,
            process,
            call,
            ctx.opts.rpc_timeout,
            attempt,
        )
        .await;
        if broken {
            conns[i].api = None;
        }
        let unreachable = op.outcome == Outcome::Fail
            && op
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with("not sent"));
        if !unreachable || tries >= 3 {
            return op;
        }
    }
}

/// Deploys the apps (unpinned) until a deploy is acknowledged, or `stop`.
async fn deploy(ctx: &Ctx, conns: &mut [Conn], rng: &mut StdRng, stop: &mut watch::Receiver<bool>) {
    let plan = match specs(&ctx.opts).and_then(|specs| {
        let apps: BTreeMap<String, PlannedApp> = specs
            .into_iter()
            .map(|spec| (spec.name.clone(), PlannedApp { spec, node: None }))
            .collect();
        serde_json::to_string(&apps).map_err(|e| e.to_string())
    }) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("jepsen: {}: {e}", ctx.opts.label);
            return;
        }
    };
    let volumes_json = match ctx.opts.volumes_json() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("jepsen: {}: {e}", ctx.opts.label);
            return;
        }
    };
    let mut process = ctx.opts.process_base + 200_000;
    loop {
        let i = rng.random_range(0..conns.len());
        let conn = &mut conns[i];
        let plan = plan.clone();
        let volumes_json = volumes_json.clone();
        let attempt = async {
            let api = conn.api().await?;
            let r = api
                .deploy(pb::DeployRequest {
                    plan_json: plan,
                    dry_run: false,
                    volumes_json,
                    ..Default::default()
                })
                .await
                .map_err(|s| classify(&s))?
                .into_inner();
            Ok(Done::app(AppResult::Deployed {
                generation: r.generation,
                changes: r
                    .changes
                    .into_iter()
                    .map(|c| format!("{} {} {}", c.kind, c.app, c.node))
                    .collect(),
            }))
        };
        let (op, broken) = record_call(
            &ctx.rec,
            &ctx.nodes[i].name,
            process,
            Call::MvDeploy {
                apps: ctx.names.clone(),
            },
            ctx.opts.rpc_timeout,
            attempt,
        )
        .await;
        if broken {
            conns[i].api = None;
        }
        match op.outcome {
            Outcome::Ok => return,
            Outcome::Unknown => process += 1,
            Outcome::Fail => {}
        }
        if pause(Duration::from_secs(1), stop).await {
            return;
        }
    }
}

/// Deploys the apps if it is this workload's job, then moves them about until `stop`.
async fn mover(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x6d6f_7665_0000_0000);
    let mut conns: Vec<Conn> = ctx.nodes.iter().map(|n| Conn::new(n, &ctx.cfg)).collect();
    if ctx.opts.deploy {
        deploy(&ctx, &mut conns, &mut rng, &mut stop).await;
    }
    if let Some((replicas, interval)) = ctx.opts.replication {
        for app in ctx.names.clone() {
            replicate(
                &ctx, &mut conns, &mut rng, &app, replicas, interval, &mut stop,
            )
            .await;
        }
    }
    if !ctx.opts.moves {
        return;
    }
    let names: Vec<String> = ctx.nodes.iter().map(|n| n.name.clone()).collect();
    let mut process = ctx.opts.process_base + 300_000;
    loop {
        let wait = ctx.opts.move_interval.mul_f64(rng.random_range(0.5..1.5));
        if pause(wait, &mut stop).await {
            return;
        }
        let Some(app) = ctx.names.choose(&mut rng).cloned() else {
            return;
        };
        let Some(loc) = resolve(&ctx, &mut conns, &mut rng, process, &app, true).await else {
            continue;
        };
        if !loc.moving_to.is_empty() && rng.random_bool(0.5) {
            let op = move_op(&ctx, &mut conns, &mut rng, process, &app, None).await;
            if op.outcome == Outcome::Unknown {
                process += 1;
            }
            continue;
        }
        let others: Vec<&String> = names
            .iter()
            .filter(|n| **n != loc.node && **n != loc.desired())
            .collect();
        let Some(to) = others.choose(&mut rng).map(|s| s.to_string()) else {
            continue;
        };
        let op = move_op(&ctx, &mut conns, &mut rng, process, &app, Some(&to)).await;
        if op.outcome == Outcome::Unknown {
            process += 1;
        }
        if op.outcome == Outcome::Ok && rng.random_bool(ctx.opts.cancel_probability.clamp(0.0, 1.0))
        {
            let wait = Duration::from_millis(rng.random_range(0..1500));
            if pause(wait, &mut stop).await {
                return;
            }
            let op = move_op(&ctx, &mut conns, &mut rng, process, &app, None).await;
            if op.outcome == Outcome::Unknown {
                process += 1;
            }
        }
    }
}

/// Starts the clients and the mover (which deploys first, if it is its job); all stop with
/// `stop`.
pub(crate) fn start(ctx: Arc<Ctx>, stop: watch::Receiver<bool>) -> Tasks {
    let apps = ctx.names.clone();
    let clients = (0..ctx.opts.clients.max(1))
        .map(|c| {
            let app = apps[c % apps.len()].clone();
            tokio::spawn(client(ctx.clone(), c, app, stop.clone()))
        })
        .collect();
    let events = ctx
        .opts
        .replication
        .is_some()
        .then(|| tokio::spawn(super::failover::collect_events(ctx.clone(), stop.clone())));
    Tasks {
        clients,
        mover: tokio::spawn(mover(ctx, stop)),
        events,
    }
}

/// Whether every node's `LocalApps` shows `app` running on `node` and nowhere else (nodes
/// that do not answer count as not showing it anywhere: they were healed, and must answer).
async fn runs_only_on(ctx: &Ctx, conns: &mut [Conn], app: &str, node: &str) -> Result<(), String> {
    for (i, n) in ctx.nodes.iter().enumerate() {
        let api = conns[i]
            .api()
            .await
            .map_err(|e| format!("{}: {}", n.name, e.message()))?;
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            api.local_apps(pb::LocalAppsRequest {}),
        )
        .await;
        let apps = match r {
            Ok(Ok(r)) => r.into_inner().apps,
            Ok(Err(s)) => {
                conns[i].api = None;
                return Err(format!("{}: LocalApps: {}", n.name, s.message()));
            }
            Err(_) => {
                conns[i].api = None;
                return Err(format!("{}: LocalApps: no answer", n.name));
            }
        };
        let running = apps.iter().any(|a| a.name == app && a.state == "running");
        if running != (n.name == node) {
            return Err(if running {
                format!("{app} also runs on {}", n.name)
            } else {
                format!("{app} does not run on {node} yet")
            });
        }
    }
    Ok(())
}

/// After the heal: waits for the clients and the mover, then for each app to run in one place
/// with no move in progress, and reads its log (recorded, `mv_read`), within `bound`.
pub(crate) async fn finish(ctx: Arc<Ctx>, tasks: Tasks, healed_at: Instant) -> MovePhase {
    for c in tasks.clients {
        let _ = c.await;
    }
    let _ = tasks.mover.await;
    if let Some(e) = tasks.events {
        let _ = e.await;
    }
    let opts = ctx.opts.clone();
    let deadline = healed_at + opts.bound;
    let mut conns: Vec<Conn> = ctx.nodes.iter().map(|n| Conn::new(n, &ctx.cfg)).collect();
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x6669_6e69_7368_0000);
    let mut phase = MovePhase {
        bound_s: opts.bound.as_secs_f64(),
        ..Default::default()
    };
    for app in ctx.names.clone() {
        let mut problem = String::from("no app list was read");
        let mut read_at = None;
        let mut k = 0usize;
        while Instant::now() < deadline {
            k += 1;
            let (_, loc) = locate_op(
                &ctx,
                &mut conns,
                k % ctx.nodes.len(),
                opts.process_base + 400_000,
                &app,
            )
            .await;
            let settled = match &loc {
                Some(l) if l.state == "running" && l.moving_to.is_empty() => {
                    match runs_only_on(&ctx, &mut conns, &app, &l.node).await {
                        Ok(()) => Some(l.node.clone()),
                        Err(e) => {
                            problem = e;
                            None
                        }
                    }
                }
                Some(l) => {
                    problem = format!(
                        "{app}: {} on {}{}{}",
                        l.state,
                        l.node,
                        if l.moving_to.is_empty() {
                            String::new()
                        } else {
                            format!(", moving to {}", l.moving_to)
                        },
                        if l.detail.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", l.detail)
                        }
                    );
                    None
                }
                None => {
                    problem = format!("{app}: no app list answered");
                    None
                }
            };
            if let Some(node) = settled {
                let op = read_op(&ctx, &app, &node, &mut rng).await;
                if op.outcome == Outcome::Ok {
                    read_at = Some(healed_at.elapsed().as_secs_f64());
                    phase.final_node.insert(app.clone(), node);
                    break;
                }
                problem = format!(
                    "{app}: READ on {node} failed: {}",
                    op.error.unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if read_at.is_none() {
            phase.problems.push(problem);
        }
        phase.read_after_s.insert(app, read_at);
    }
    if ctx.opts.replication.is_some() {
        events_op(&ctx, &mut conns).await;
    }
    phase.ok = phase.problems.is_empty();
    println!(
        "jepsen: {} after heal: {}",
        opts.label,
        if phase.ok {
            phase
                .read_after_s
                .iter()
                .map(|(a, t)| {
                    format!(
                        "{a}'s log read on {} {:.1}s after the heal",
                        phase.final_node.get(a).map(String::as_str).unwrap_or("?"),
                        t.unwrap_or(0.0)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            format!("NOT within {:?}: {}", opts.bound, phase.problems.join("; "))
        }
    );
    phase
}

/// `READ` of `app`'s whole log through `node` (direct: its node; mesh: a random node), recorded.
async fn read_op(ctx: &Ctx, app: &str, node: &str, rng: &mut StdRng) -> Op {
    let how = ctx.opts.via.of_read();
    let node = match how {
        Via::Mesh => ctx.nodes.choose(rng),
        _ => ctx.node(node),
    };
    let Some(node) = node.cloned() else {
        return Op {
            index: 0,
            process: ctx.opts.process_base + 500_000,
            node: node.map(|n| n.name.clone()).unwrap_or_default(),
            call: Call::MvRead {
                app: app.to_string(),
                via: how.as_str().into(),
            },
            outcome: Outcome::Fail,
            read: None,
            revision: None,
            invoke_ns: 0,
            complete_ns: 0,
            error: Some("no such node".into()),
            ds: None,
            app: None,
        };
    };
    let port = port_for(ctx, how, app);
    let timeout = ctx.opts.connect_timeout.max(Duration::from_secs(2));
    let attempt = async {
        let mut ac = AppConn::open(&node, port, timeout)
            .await
            .map_err(Failure::Definite)?;
        let first = ac.ask("READ").await.map_err(Failure::Definite)?;
        let mut entries = Vec::new();
        let mut line = first;
        while line != "END" {
            let e = parse_entry(&line)
                .ok_or_else(|| Failure::Definite(format!("READ answered {line:?}")))?;
            entries.push(e);
            line = ac.line().await.map_err(Failure::Definite)?;
        }
        Ok(Done::app(AppResult::Log {
            instance: ac.instance.clone(),
            entries,
        }))
    };
    record_call(
        &ctx.rec,
        &node.name,
        ctx.opts.process_base + 500_000,
        Call::MvRead {
            app: app.to_string(),
            via: how.as_str().into(),
        },
        Duration::from_secs(15),
        attempt,
    )
    .await
    .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_apps_are_stateful_testapps_on_distinct_ports() {
        let opts = MoveOptions {
            apps: 2,
            ..MoveOptions::default()
        };
        assert_eq!(app_names(&opts), vec!["jm-1", "jm-2"]);
        let specs = specs(&opts).unwrap();
        assert_eq!(specs.len(), 2);
        assert!(specs.iter().all(|s| s.volume.is_some()));
        assert_eq!(specs[0].ports[0].internal, 9201);
        assert_eq!(specs[0].ports[0].external, 9301);
        assert_eq!(specs[1].ports[0].internal, 9202);
        assert_eq!(
            specs[0].restart_policy,
            flock_scheduler::config::RestartPolicy::Always
        );
        assert_eq!(
            specs[0].command.as_deref(),
            Some(&["flock-testapp".to_string()][..])
        );
        // Not the app workload's ports (9101.., 9151..).
        let app_ports: Vec<u16> = super::super::app::catalogue(&Default::default())
            .iter()
            .filter_map(|d| d.port)
            .collect();
        for s in &specs {
            assert!(!app_ports.contains(&s.ports[0].internal));
            assert!(!app_ports.contains(&s.ports[0].external));
        }
    }

    #[test]
    fn the_test_apps_answers_parse() {
        assert_eq!(parse_ok("OK 17"), Some(17));
        assert_eq!(parse_ok("ERR disk full"), None);
        assert_eq!(parse_ok("OK x"), None);
        assert_eq!(parse_entry("3 w1-7"), Some((3, "w1-7".to_string())));
        assert_eq!(parse_entry("END"), None);
    }
}
