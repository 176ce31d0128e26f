//! One test run, start to end: build and start the cluster, run the workload's clients and the
//! nemesis for the time limit, heal, check that the cluster recovers and converges, make the
//! final reads, check the history and write everything under the run's store directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::watch;

use flock_proto::v1::{KvListRequest, StatusRequest};

use crate::checker::{self, stats::Stats, CheckResult};
use crate::client::{self, Api, ClientConfig, Failure};
use crate::docker::{self, Compose, Node};
use crate::history::{
    Call, History, HistoryError, HistoryWriter, NemesisEvent, Op, Outcome, Record, RunMeta,
};
use crate::nemesis::{self, Active, FaultKind, Nemesis, Step};
use crate::report;
use crate::workload::app::{self, AppOptions, AppPhase};
use crate::workload::dataset::{self, DatasetOptions, DatasetPhase};
use crate::workload::moves::{self, MoveOptions, MovePhase};
use crate::workload::register::{Register, RegisterOptions};
use crate::workload::Workload;

/// Which workloads a run makes, side by side on the same cluster.
#[derive(Clone, Debug)]
pub struct Workloads {
    /// The register workload (key-value reads, writes, compare-and-sets).
    pub register: bool,
    /// The dataset workload, with its settings.
    pub dataset: Option<DatasetOptions>,
    /// The app workload, with its settings.
    pub app: Option<AppOptions>,
    /// The move workload, with its settings.
    pub moves: Option<MoveOptions>,
    /// The failover workload (the move workload's machinery on its own apps, with replicas
    /// and no moves), with its settings.
    pub failover: Option<MoveOptions>,
}

impl Workloads {
    /// The workloads that run, joined with `+`: `register`, `dataset`, `app`,
    /// `register+dataset+app`, ...
    pub fn name(&self) -> String {
        let mut w = Vec::new();
        if self.register {
            w.push("register");
        }
        if self.dataset.is_some() {
            w.push("dataset");
        }
        if self.app.is_some() {
            w.push("app");
        }
        if self.moves.is_some() {
            w.push("move");
        }
        if self.failover.is_some() {
            w.push("failover");
        }
        if w.is_empty() {
            w.push("register");
        }
        w.join("+")
    }
}

/// Everything a run needs to know.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub compose: Compose,
    /// Run `docker/build-image.sh` first (builds flockd and the image).
    pub build: bool,
    /// Start a fresh cluster (else use the one that runs).
    pub setup: bool,
    /// Remove the cluster at the end.
    pub teardown: bool,
    pub repo_root: PathBuf,
    pub store: PathBuf,
    pub seed: u64,
    pub time_limit: Duration,
    pub nemeses: Vec<FaultKind>,
    pub fault_interval: Duration,
    pub fault_hold: Duration,
    pub concurrency: usize,
    /// Target ops per second, all clients together.
    pub rate: f64,
    /// How long a client waits for an answer before it records `unknown`.
    pub op_timeout: Duration,
    pub recovery_bound: Duration,
    pub convergence_bound: Duration,
    pub register: RegisterOptions,
    pub workloads: Workloads,
    /// The admin config to connect with; by default `admin.conf` is copied from the first node,
    /// which created the cluster.
    pub admin_config: Option<PathBuf>,
    /// The command line, for the report's "run it again" line.
    pub command_line: String,
}

/// How each node came back after the faults ended.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Recovery {
    pub bound_s: f64,
    /// Seconds after the heal until the node served a write and a linearizable read.
    pub nodes: BTreeMap<String, Option<f64>>,
    pub ok: bool,
    pub heal_actions: Vec<String>,
}

/// Whether every node ended with the same key-value state, equal to the final reads.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Convergence {
    pub bound_s: f64,
    /// Seconds after recovery until every node's replica matched.
    pub converged_after_s: Option<f64>,
    pub keys: usize,
    /// What still differed at the bound, node by node.
    pub differences: Vec<String>,
    pub ok: bool,
}

/// The verdict file.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// `true`, `false`, or `null` (undecided).
    pub valid: Option<bool>,
    pub seed: u64,
    pub checks: Vec<CheckResult>,
    pub recovery: Recovery,
    pub convergence: Convergence,
    /// The dataset workload's phase after the faults, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datasets: Option<DatasetPhase>,
    /// The app workload's phase after the faults, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apps: Option<AppPhase>,
    /// The move workload's phase after the faults, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moves: Option<MovePhase>,
    /// The failover workload's phase after the faults, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<MovePhase>,
    pub stats: Stats,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Docker(#[from] docker::DockerError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("{0}")]
    Setup(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Appends to the history (file and memory) from every task.
#[derive(Clone)]
pub(crate) struct Recorder {
    pub(crate) t0: Instant,
    /// The wall clock at `t0`, ns since the Unix epoch (to put the cluster's times, which
    /// are wall-clock times of the same host, on the history's clock).
    pub(crate) t0_unix_ns: u64,
    inner: Arc<Mutex<RecorderInner>>,
}

struct RecorderInner {
    writer: HistoryWriter,
    history: History,
    next_index: u64,
    error: Option<HistoryError>,
}

impl Recorder {
    pub(crate) fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn record(&self, r: Record) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = g.writer.write(&r) {
            g.error.get_or_insert(e);
        }
        g.history.push(r);
    }

    /// Records a completed op under the next index, and returns it with that index.
    pub(crate) fn record_op(&self, mut op: Op) -> Op {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        op.index = g.next_index;
        g.next_index += 1;
        let r = Record::Op(Box::new(op.clone()));
        if let Err(e) = g.writer.write(&r) {
            g.error.get_or_insert(e);
        }
        g.history.push(r);
        op
    }

    fn nemesis(&self, action: &str, fault: &str, detail: &str) {
        let e = NemesisEvent {
            time_ns: self.now_ns(),
            action: action.into(),
            fault: fault.into(),
            detail: detail.into(),
        };
        println!(
            "jepsen: {:>7.1}s nemesis {action} {fault}: {detail}",
            e.time_ns as f64 / 1e9
        );
        self.record(Record::Nemesis(e));
    }

    fn counts(&self) -> (usize, usize, usize) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let c = |o| g.history.ops.iter().filter(|op| op.outcome == o).count();
        (c(Outcome::Ok), c(Outcome::Fail), c(Outcome::Unknown))
    }

    fn finish(&self) -> Result<History, HistoryError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = g.error.take() {
            return Err(e);
        }
        g.writer.flush()?;
        Ok(g.history.clone())
    }
}

/// A client's view of one node: connects on first use and after a transport error.
pub(crate) struct Conn {
    addr: String,
    cfg: ClientConfig,
    pub(crate) api: Option<Api>,
}

impl Conn {
    pub(crate) fn new(node: &Node, cfg: &ClientConfig) -> Conn {
        Conn {
            addr: node.api_addr(),
            cfg: cfg.clone(),
            api: None,
        }
    }

    pub(crate) async fn api(&mut self) -> Result<&mut Api, Failure> {
        if self.api.is_none() {
            let api = client::connect(&self.addr, &self.cfg)
                .await
                .map_err(|e| Failure::Definite(format!("not sent: {e}")))?;
            self.api = Some(api);
        }
        match self.api.as_mut() {
            Some(api) => Ok(api),
            None => Err(Failure::Definite("not connected".into())),
        }
    }
}

/// Makes one call on `conn` and records it. Reads that fail are `fail` (they change nothing);
/// writes that time out or lose their connection after sending are `unknown`.
async fn perform<W: Workload>(
    w: &W,
    rec: &Recorder,
    conn: &mut Conn,
    node: &str,
    process: u64,
    call: Call,
    timeout: Duration,
) -> Op {
    let attempt = async {
        let api = conn.api().await?;
        w.invoke(api, &call).await
    };
    let (op, broken) = record_call(rec, node, process, call.clone(), timeout, attempt).await;
    if broken {
        conn.api = None;
    }
    w.observe(&op);
    op
}

/// Runs `attempt` (which carries out `call` on `node`) with a time limit and records it as an
/// op: `ok` or `fail` as its answer says; when it fails without knowing, or does not answer in
/// time, `fail` for a read and `unknown` for anything else. Also returns whether the
/// connection it used may be broken (a transport error or a timeout).
pub(crate) async fn record_call(
    rec: &Recorder,
    node: &str,
    process: u64,
    call: Call,
    timeout: Duration,
    attempt: impl std::future::Future<Output = Result<crate::workload::Done, Failure>>,
) -> (Op, bool) {
    let invoke_ns = rec.now_ns();
    let result = tokio::time::timeout(timeout, attempt).await;
    let complete_ns = rec.now_ns();
    let unknown = if call.is_read() {
        Outcome::Fail
    } else {
        Outcome::Unknown
    };
    let (outcome, done, error, broken) = match result {
        Ok(Ok(done)) => (done.outcome, Some(done.clone()), done.note.clone(), false),
        Ok(Err(Failure::Definite(m))) => (Outcome::Fail, None, Some(m), false),
        Ok(Err(Failure::Indefinite(m))) => (unknown, None, Some(m), true),
        Err(_) => (
            unknown,
            None,
            Some(format!("no answer within {timeout:?}")),
            true,
        ),
    };
    let op = Op {
        index: 0,
        process,
        node: node.to_string(),
        call,
        outcome,
        read: done.as_ref().and_then(|d| d.read.clone()),
        revision: done.as_ref().and_then(|d| d.revision),
        invoke_ns,
        complete_ns,
        error,
        ds: done.as_ref().and_then(|d| d.ds.clone()),
        app: done.and_then(|d| d.app),
    };
    (rec.record_op(op), broken)
}

/// A client: calls from the workload, one at a time, on one node, at about `rate` per second.
#[allow(clippy::too_many_arguments)]
async fn client_loop<W: Workload>(
    w: Arc<W>,
    rec: Recorder,
    node: Node,
    cfg: ClientConfig,
    worker: u64,
    concurrency: u64,
    seed: u64,
    mean_delay: Duration,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng =
        StdRng::seed_from_u64(seed.wrapping_add(worker.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let mut conn = Conn::new(&node, &cfg);
    let mut process = worker;
    while !*stop.borrow() {
        let call = w.next_call(&mut rng);
        let op = perform(&*w, &rec, &mut conn, &node.name, process, call, timeout).await;
        if op.outcome == Outcome::Unknown {
            process += concurrency;
        }
        let delay = mean_delay.mul_f64(rng.random_range(0.0..2.0));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Runs the schedule; every started fault is stopped, also when `stop` fires first.
async fn nemesis_loop(
    nem: Arc<Nemesis>,
    steps: Vec<Step>,
    rec: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    for step in steps {
        let at = rec.t0 + step.at;
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = stop.changed() => return,
        }
        let fault = step.kind.name();
        let active = match nem.start(&step).await {
            Ok((active, detail)) => {
                rec.nemesis("start", fault, &detail);
                active
            }
            Err(e) => {
                rec.nemesis("start", fault, &format!("failed: {e}"));
                Active::Nothing
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(step.hold) => {}
            _ = stop.changed() => {}
        }
        match nem.stop(&active).await {
            Ok(()) => rec.nemesis("stop", fault, "healed"),
            Err(e) => rec.nemesis("stop", fault, &format!("failed: {e}")),
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Copies the admin config `flockd init` wrote on the first node (the cluster's creator) into
/// `dir`, retrying until it is there.
async fn fetch_admin_config(
    nodes: &[Node],
    dir: &Path,
    within: Duration,
) -> Result<ClientConfig, RunError> {
    let Some(seed) = nodes.first() else {
        return Err(RunError::Setup("the compose file has no nodes".into()));
    };
    let dest = dir.join("admin.conf");
    let deadline = Instant::now() + within;
    loop {
        match docker::copy_from(seed, "/data/admin.conf", &dest).await {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))
                    .map_err(io_err(&dest))?;
                return ClientConfig::from_admin_config(&dest)
                    .map_err(|e| RunError::Setup(e.to_string()));
            }
            Err(e) if Instant::now() > deadline => {
                return Err(RunError::Setup(format!(
                    "no admin config from {} within {within:?}: {e}",
                    seed.name
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Waits until a node reports every node as a healthy member with the voters it should have
/// (all of them up to five) and a leader.
async fn wait_ready(
    nodes: &[Node],
    cfg: &ClientConfig,
    within: Duration,
) -> Result<String, RunError> {
    let deadline = Instant::now() + within;
    let want_voters = match nodes.len().min(5) {
        n if n % 2 == 0 => n - 1,
        n => n,
    };
    let mut last = String::from("no node answered");
    while Instant::now() < deadline {
        for n in nodes {
            let Ok(mut api) = client::connect(&n.api_addr(), cfg).await else {
                last = format!("{} does not answer", n.name);
                continue;
            };
            let status = tokio::time::timeout(
                Duration::from_secs(3),
                api.status(StatusRequest { local: false }),
            )
            .await;
            let Ok(Ok(s)) = status else {
                last = format!("{} gave no status", n.name);
                continue;
            };
            let s = s.into_inner();
            let voters = s.members.iter().filter(|m| m.role == "voter").count();
            let healthy = s.members.iter().filter(|m| m.health == "healthy").count();
            if !s.leader_name.is_empty()
                && s.members.len() == nodes.len()
                && voters == want_voters
                && healthy == nodes.len()
            {
                return Ok(s.leader_name);
            }
            last = format!(
                "{} members, {voters} voters, {healthy} healthy, leader {:?}",
                s.members.len(),
                s.leader_name
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(RunError::Setup(format!(
        "the cluster did not form within {within:?} (last seen: {last}); see `docker-compose -f docker-compose.test.yml logs`"
    )))
}

/// Until `deadline`: through `node`, a write of a probe key, then a linearizable read of it.
async fn recover_node(
    rec: &Recorder,
    node: &Node,
    cfg: &ClientConfig,
    prefix: &str,
    process: u64,
    deadline: Instant,
    timeout: Duration,
) -> Option<Instant> {
    let w = Probe;
    let mut conn = Conn::new(node, cfg);
    let key = format!("{prefix}probe/{}", node.name);
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let write = Call::Write {
            key: key.clone(),
            value: n.to_string(),
        };
        let op = perform(&w, rec, &mut conn, &node.name, process, write, timeout).await;
        if op.outcome == Outcome::Ok {
            let read = Call::Read {
                key: key.clone(),
                stale: false,
            };
            let op = perform(&w, rec, &mut conn, &node.name, process, read, timeout).await;
            if op.outcome == Outcome::Ok {
                return Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Plain reads and writes for the recovery probes and final reads (no generator, no checker).
struct Probe;

impl Workload for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }
    fn next_call(&self, _rng: &mut StdRng) -> Call {
        Call::Read {
            key: String::new(),
            stale: false,
        }
    }
    async fn invoke(&self, api: &mut Api, call: &Call) -> Result<crate::workload::Done, Failure> {
        if let Call::Cas { .. } = call {
            return Err(Failure::Definite("probes do not cas".into()));
        }
        crate::workload::register::invoke_kv(api, call).await
    }
    fn observe(&self, _op: &Op) {}
    fn final_calls(&self) -> Vec<Call> {
        Vec::new()
    }
    fn checkers(&self) -> Vec<Box<dyn checker::Checker>> {
        Vec::new()
    }
}

/// Each node's replica of the keys under `prefix`, read without a barrier.
async fn replica(
    node: &Node,
    cfg: &ClientConfig,
    prefix: &str,
) -> Result<BTreeMap<String, String>, String> {
    let mut api = client::connect(&node.api_addr(), cfg)
        .await
        .map_err(|e| e.to_string())?;
    let list = api.kv_list(KvListRequest {
        prefix: prefix.to_string(),
        stale: true,
        // One reply (not paged): the workload's keys are few.
        ..Default::default()
    });
    let r = tokio::time::timeout(Duration::from_secs(5), list)
        .await
        .map_err(|_| "no answer within 5s".to_string())?
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(r.into_inner()
        .entries
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect())
}

/// Polls every node's replica until all match `expected` (the final linearizable reads, for
/// the keys they cover) and each other.
async fn converge(
    nodes: &[Node],
    cfg: &ClientConfig,
    prefix: &str,
    expected: &BTreeMap<String, Option<String>>,
    bound: Duration,
) -> Convergence {
    let start = Instant::now();
    let mut differences = Vec::new();
    let mut keys = 0;
    while start.elapsed() < bound {
        differences.clear();
        let mut replicas = Vec::new();
        for n in nodes {
            match replica(n, cfg, prefix).await {
                Ok(r) => replicas.push((n.name.clone(), r)),
                Err(e) => differences.push(format!("{}: {e}", n.name)),
            }
        }
        if let Some((first_name, first)) = replicas.first() {
            keys = first.len();
            for (name, r) in &replicas[1..] {
                if r != first {
                    let keys: BTreeSet<&String> = first.keys().chain(r.keys()).collect();
                    let d: Vec<String> = keys
                        .into_iter()
                        .filter(|k| first.get(*k) != r.get(*k))
                        .take(5)
                        .map(|k| {
                            format!("{k}: {first_name}={:?} {name}={:?}", first.get(k), r.get(k))
                        })
                        .collect();
                    differences.push(format!(
                        "{name} differs from {first_name}: {}",
                        d.join("; ")
                    ));
                }
            }
            for (key, want) in expected {
                if first.get(key) != want.as_ref() {
                    differences.push(format!(
                        "{key}: the final read saw {want:?}, {first_name}'s replica has {:?}",
                        first.get(key)
                    ));
                }
            }
        }
        if differences.is_empty() && replicas.len() == nodes.len() {
            return Convergence {
                bound_s: bound.as_secs_f64(),
                converged_after_s: Some(start.elapsed().as_secs_f64()),
                keys,
                differences,
                ok: true,
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Convergence {
        bound_s: bound.as_secs_f64(),
        converged_after_s: None,
        keys,
        differences,
        ok: false,
    }
}

/// A directory name for now, e.g. `20260101T120000Z`.
fn stamp() -> String {
    let s = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    s.replace(['-', ':'], "")
}

/// Runs the test; returns the verdict and the directory it was written to.
pub async fn run(opts: RunOptions) -> Result<(Verdict, PathBuf), RunError> {
    let dir = opts.store.join(stamp());
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let latest = opts.store.join("latest");
    let _ = std::fs::remove_file(&latest);
    if let Some(name) = dir.file_name() {
        let _ = std::os::unix::fs::symlink(name, &latest);
    }
    println!(
        "jepsen: seed {} (repeat with --seed {})",
        opts.seed, opts.seed
    );
    println!("jepsen: writing to {}", dir.display());

    if opts.build {
        let script = opts.repo_root.join("docker/build-image.sh");
        println!("jepsen: building the image with {}", script.display());
        let status = tokio::process::Command::new(&script)
            .status()
            .await
            .map_err(io_err(&script))?;
        if !status.success() {
            return Err(RunError::Setup(format!(
                "{} failed ({status})",
                script.display()
            )));
        }
    }
    if opts.setup {
        println!(
            "jepsen: starting a fresh cluster ({})",
            opts.compose.file.display()
        );
        opts.compose.down().await?;
        opts.compose.up().await?;
    }
    let nodes = opts.compose.nodes().await?;
    let result = async {
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let client = match &opts.admin_config {
            Some(path) => {
                ClientConfig::from_admin_config(path).map_err(|e| RunError::Setup(e.to_string()))?
            }
            None => fetch_admin_config(&nodes, dir.as_path(), Duration::from_secs(60)).await?,
        };
        let leader = wait_ready(&nodes, &client, Duration::from_secs(120)).await?;
        println!(
            "jepsen: cluster ready: {} (leader {leader})",
            nodes
                .iter()
                .map(|n| format!("{}={}", n.name, n.ip))
                .collect::<Vec<_>>()
                .join(" ")
        );
        run_on_cluster(&opts, &client, &dir, &nodes, &names).await
    }
    .await;
    // The logs tell what happened, also (above all) when the cluster did not form.
    if let Err(e) = opts.compose.save_logs(&nodes, &dir).await {
        eprintln!("jepsen: could not save the node logs: {e}");
    }
    if opts.teardown {
        if let Err(e) = opts.compose.down().await {
            eprintln!("jepsen: could not remove the cluster: {e}");
        }
        // Its admin key is of no use once the cluster is gone; do not leave keys lying around.
        let _ = std::fs::remove_file(dir.join("admin.conf"));
    }
    result.map(|v| (v, dir))
}

async fn run_on_cluster(
    opts: &RunOptions,
    client: &ClientConfig,
    dir: &Path,
    nodes: &[Node],
    names: &[String],
) -> Result<Verdict, RunError> {
    let prefix = opts.register.prefix.clone();
    let meta = RunMeta {
        seed: opts.seed,
        workload: opts.workloads.name(),
        read_mode: opts.register.read_mode.as_str().into(),
        nemeses: opts.nemeses.iter().map(|k| k.name().to_string()).collect(),
        nodes: names.to_vec(),
        started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        key_prefix: prefix.clone(),
        t0_unix_ns: None,
    };
    let writer = HistoryWriter::create(&dir.join("history.jsonl"))?;
    let t0 = Instant::now();
    let t0_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let meta = RunMeta {
        t0_unix_ns: Some(t0_unix_ns),
        ..meta
    };
    let rec = Recorder {
        t0,
        t0_unix_ns,
        inner: Arc::new(Mutex::new(RecorderInner {
            writer,
            history: History::default(),
            next_index: 0,
            error: None,
        })),
    };
    rec.record(Record::Meta(meta.clone()));

    let steps = nemesis::schedule(
        &opts.nemeses,
        names,
        opts.seed,
        opts.time_limit,
        opts.fault_interval,
        opts.fault_hold,
    );
    println!("jepsen: {} faults planned:", steps.len());
    for line in nemesis::describe_plan(&steps) {
        println!("jepsen:   {line}");
    }
    let nem = Arc::new(Nemesis {
        nodes: nodes.to_vec(),
        client: client.clone(),
        targets: opts
            .workloads
            .failover
            .as_ref()
            .map(moves::app_names)
            .unwrap_or_default(),
    });
    let workload = Arc::new(Register::new(opts.register.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (stop_nem_tx, stop_nem_rx) = watch::channel(false);

    let concurrency = opts.concurrency.max(1) as u64;
    let mean_delay = Duration::from_secs_f64(concurrency as f64 / opts.rate.max(0.1));
    let mut clients = Vec::new();
    for w in (0..concurrency).filter(|_| opts.workloads.register) {
        let node = nodes[(w as usize) % nodes.len()].clone();
        clients.push(tokio::spawn(client_loop(
            workload.clone(),
            rec.clone(),
            node,
            client.clone(),
            w,
            concurrency,
            opts.seed,
            mean_delay,
            opts.op_timeout,
            stop_rx.clone(),
        )));
    }
    let ds_ctx = opts.workloads.dataset.as_ref().map(|o| {
        Arc::new(dataset::Ctx::new(
            rec.clone(),
            nodes.to_vec(),
            client.clone(),
            o.clone(),
            opts.seed,
        ))
    });
    let writers = ds_ctx
        .clone()
        .map(|ctx| tokio::spawn(dataset::run_writers(ctx, stop_rx.clone())));
    let app_ctx = opts.workloads.app.as_ref().map(|o| {
        Arc::new(app::Ctx::new(
            rec.clone(),
            nodes.to_vec(),
            client.clone(),
            o.clone(),
            opts.seed,
        ))
    });
    let app_tasks = app_ctx.clone().map(|ctx| app::start(ctx, stop_rx.clone()));
    let move_ctx = opts.workloads.moves.as_ref().map(|o| {
        Arc::new(moves::Ctx::new(
            rec.clone(),
            nodes.to_vec(),
            client.clone(),
            o.clone(),
            opts.seed,
        ))
    });
    let move_tasks = move_ctx
        .clone()
        .map(|ctx| moves::start(ctx, stop_rx.clone()));
    let failover_ctx = opts.workloads.failover.as_ref().map(|o| {
        Arc::new(moves::Ctx::new(
            rec.clone(),
            nodes.to_vec(),
            client.clone(),
            o.clone(),
            opts.seed ^ 0x6661_696c_6f76_6572,
        ))
    });
    let failover_tasks = failover_ctx
        .clone()
        .map(|ctx| moves::start(ctx, stop_rx.clone()));
    let nemesis_task = tokio::spawn(nemesis_loop(
        nem.clone(),
        steps.clone(),
        rec.clone(),
        stop_nem_rx,
    ));

    // The workload under faults, with a progress line every 10 s.
    let end = rec.t0 + opts.time_limit;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while Instant::now() < end {
        let next = (Instant::now() + Duration::from_secs(10)).min(end);
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = &mut interrupted => {
                println!("jepsen: interrupted: healing, then checking what was recorded");
                break;
            }
        }
        let (ok, fail, unknown) = rec.counts();
        println!(
            "jepsen: {:>7.1}s ops ok {ok} fail {fail} unknown {unknown}",
            rec.t0.elapsed().as_secs_f64()
        );
    }
    let workload_end_ns = rec.now_ns();

    // Faults end: clients stop making new calls (those in flight finish on their own), the
    // nemesis undoes its current fault, then anything left is undone.
    let _ = stop_tx.send(true);
    let _ = stop_nem_tx.send(true);
    let _ = nemesis_task.await;
    let heal_actions = nem.heal_all().await;
    rec.nemesis(
        "heal",
        "all",
        &if heal_actions.is_empty() {
            "nothing left to undo".to_string()
        } else {
            heal_actions.join(", ")
        },
    );
    let healed_at = Instant::now();

    // The register side (recovery probes, final reads, convergence), the dataset side (a write
    // and a snapshot on every dataset, settling, reading the disks) and the app side (every app
    // once on its node) at the same time.
    let register_side = async {
        // Recovery: every node serves a write and a linearizable read within the bound.
        let deadline = healed_at + opts.recovery_bound;
        let probes = nodes.iter().enumerate().map(|(i, n)| {
            let rec = rec.clone();
            let cfg = client.clone();
            let prefix = prefix.clone();
            let timeout = opts.op_timeout;
            async move {
                let at = recover_node(
                    &rec,
                    n,
                    &cfg,
                    &prefix,
                    1_000_000 + i as u64,
                    deadline,
                    timeout,
                )
                .await;
                (
                    n.name.clone(),
                    at.map(|t| t.duration_since(healed_at).as_secs_f64()),
                )
            }
        });
        let probes = futures::future::join_all(probes);
        let (recovered, _) = tokio::join!(probes, futures::future::join_all(clients));
        let recovered: BTreeMap<String, Option<f64>> = recovered.into_iter().collect();
        let recovery = Recovery {
            bound_s: opts.recovery_bound.as_secs_f64(),
            ok: recovered.values().all(Option::is_some),
            nodes: recovered,
            heal_actions,
        };
        println!(
            "jepsen: recovery after heal: {}",
            recovery
                .nodes
                .iter()
                .map(|(n, t)| match t {
                    Some(t) => format!("{n} {t:.1}s"),
                    None => format!("{n} NOT within {:?}", opts.recovery_bound),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );

        // Final reads of every key the workload used, retried until they succeed.
        let mut expected = BTreeMap::new();
        let final_deadline = Instant::now() + opts.convergence_bound;
        let mut conns: Vec<Conn> = nodes.iter().map(|n| Conn::new(n, client)).collect();
        for (i, call) in workload.final_calls().into_iter().enumerate() {
            let key = call.key().to_string();
            loop {
                let j = i % nodes.len();
                let op = perform(
                    &Probe,
                    &rec,
                    &mut conns[j],
                    &nodes[j].name,
                    2_000_000,
                    call.clone(),
                    opts.op_timeout,
                )
                .await;
                if op.outcome == Outcome::Ok {
                    expected.insert(key.clone(), op.read.clone().flatten());
                    break;
                }
                if Instant::now() > final_deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let convergence = converge(nodes, client, &prefix, &expected, opts.convergence_bound).await;
        println!(
            "jepsen: convergence: {}",
            match convergence.converged_after_s {
                Some(t) => format!(
                    "all {} nodes hold the same {} keys after {t:.1}s",
                    nodes.len(),
                    convergence.keys
                ),
                None => format!(
                    "NOT within {:?}: {}",
                    opts.convergence_bound,
                    convergence.differences.join(" / ")
                ),
            }
        );
        (recovery, convergence)
    };
    let dataset_side = async {
        let (Some(ctx), Some(task)) = (ds_ctx, writers) else {
            return None;
        };
        let cursors = task.await.unwrap_or_default();
        Some(dataset::finish(ctx, cursors, healed_at).await)
    };
    let app_side = async {
        let (Some(ctx), Some(tasks)) = (app_ctx, app_tasks) else {
            return None;
        };
        Some(app::finish(ctx, tasks, healed_at).await)
    };
    let move_side = async {
        let (Some(ctx), Some(tasks)) = (move_ctx, move_tasks) else {
            return None;
        };
        Some(moves::finish(ctx, tasks, healed_at).await)
    };
    let failover_side = async {
        let (Some(ctx), Some(tasks)) = (failover_ctx, failover_tasks) else {
            return None;
        };
        Some(moves::finish(ctx, tasks, healed_at).await)
    };
    let ((recovery, convergence), datasets, apps, moves_phase, failover_phase) = tokio::join!(
        register_side,
        dataset_side,
        app_side,
        move_side,
        failover_side
    );

    let history = rec.finish()?;
    println!("jepsen: checking {} ops", history.ops.len());
    let mut checkers = Vec::new();
    if opts.workloads.register {
        checkers.extend(workload.checkers());
    }
    if opts.workloads.dataset.is_some() {
        checkers.push(Box::new(checker::dataset::SnapshotsReadBack) as Box<dyn checker::Checker>);
    }
    if let Some(a) = &opts.workloads.app {
        checkers.push(Box::new(checker::app::AppsRunRight { bound: a.bound }));
    }
    if opts.workloads.moves.is_some() {
        checkers.push(Box::new(checker::moves::NoWriteLost));
    }
    if opts.workloads.failover.is_some() {
        checkers.push(Box::new(checker::failover::FailoverLosesOnlyAtRisk));
    }
    let mut checks: Vec<CheckResult> = checkers.iter().map(|c| c.check(&history)).collect();
    let stats = Stats::of(&history, 0, workload_end_ns);
    // Stats are informational, but a run in which a function never succeeded checked nothing.
    // (Cancelling a stuck move is housekeeping: a run may need none, or end with one that
    // failed because the move finished meanwhile. The move workload's cancels are drawn by
    // chance and fail when the move is done already.)
    let never: Vec<&String> = stats
        .by_f
        .iter()
        .filter(|(f, c)| c.ok == 0 && !matches!(f.as_str(), "ds_cancel_move" | "mv_cancel"))
        .map(|(f, _)| f)
        .collect();
    checks.push(CheckResult {
        checker: "stats".into(),
        valid: Some(never.is_empty() && stats.all.ok > 0),
        summary: if never.is_empty() {
            format!(
                "{} ops: {} ok, {} fail, {} unknown",
                stats.all.total, stats.all.ok, stats.all.fail, stats.all.unknown
            )
        } else {
            format!("no {:?} op ever succeeded", never)
        },
        details: serde_json::Value::Null,
    });
    let datasets_ok = datasets.as_ref().is_none_or(|d| d.ok);
    let apps_ok = apps.as_ref().is_none_or(|a| a.ok);
    let moves_ok = moves_phase.as_ref().is_none_or(|m| m.ok);
    let failover_ok = failover_phase.as_ref().is_none_or(|m| m.ok);
    let valid = match checker::overall(&checks) {
        Some(true)
            if recovery.ok
                && convergence.ok
                && datasets_ok
                && apps_ok
                && moves_ok
                && failover_ok =>
        {
            Some(true)
        }
        Some(true) => Some(false),
        other => other,
    };
    let verdict = Verdict {
        valid,
        seed: opts.seed,
        checks,
        recovery,
        convergence,
        datasets,
        apps,
        moves: moves_phase,
        failover: failover_phase,
        stats,
    };
    let vpath = dir.join("verdict.json");
    let text = serde_json::to_string_pretty(&verdict).map_err(|e| RunError::Io {
        path: vpath.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&vpath, text).map_err(io_err(&vpath))?;
    report::write(dir, &history, &verdict, &steps, opts, workload_end_ns)?;
    Ok(verdict)
}
