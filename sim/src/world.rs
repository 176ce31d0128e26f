//! One simulated cluster: N nodes, each running the real decision cores (flock-decide) against
//! its own copy of the real replicated state (`ClusterState::apply` on the committed log), with
//! simulated drivers (processes that outlive flockd, children, exits), dataset copies (snapshots
//! of a list of write ids), a network (delays, partitions, lost answers), crashes of flockd and
//! of whole machines, and drivers that fail or lie. Everything happens on one thread, in the
//! order of a seeded event queue, so a seed replays exactly.
//!
//! The executors here are as thin as node/'s: observe, ask the core, carry its actions out with
//! a delay. The invariants (DESIGN.md) are checked as the run goes and at its end.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::path::PathBuf;

use flock_decide::apps::{
    may_start, AppAction, AppsCore, AppsSeen, CopySeen, DriverKind, Seen, SeenState, StartFailure,
};
use flock_decide::datasets::{
    CopiesSeen, CopySeen as DsCopySeen, DatasetAction, DatasetsCore, Job as DsJob, JobOutcome,
};
use flock_decide::moves::{
    InstanceSeen, InstancesSeen, Move, MoveInput, MoveStep, PushFailure, RunSeen,
};
use flock_decide::push::{self, HeldSnapshot, Plan};
use flock_decide::Instant;
use flock_scheduler::config::{AppSpec, PlannedApp, RestartPolicy, Volume};
use flock_scheduler::dataset::DatasetId;
use flock_scheduler::{ClusterState, Command, CommandResult, NodeId, SnapshotRecord};

use crate::rng::Rng;

/// Bugs the simulation can put back, to show that a seed catches each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs {
    /// A driver whose listing fails answers "nothing runs" (the docker driver before issue 15).
    pub blind_as_empty: bool,
    /// Stopping an app whose group leader already exited leaves its children running (the
    /// process driver before issue 15), and a leader's exit is reported while they run.
    pub children_outlive_stop: bool,
    /// A start decided from an older state is carried out without re-checking the latest one
    /// under the dataset's start gate (jepsen seed 4122026).
    pub start_without_recheck: bool,
    /// A push plans every step from the snapshot list it saw when it began, and the receiver
    /// rolls back whatever it is told to, recorded snapshots included.
    pub push_stale_rollback: bool,
    /// The primary never proposes what its dataset's retention prunes (before issue 16).
    pub no_retention: bool,
    /// A holder prunes its copy by the policy's count on its own (keeps the `last` newest
    /// automatic snapshots) instead of destroying only what Raft forgot.
    pub prune_by_count: bool,
}

impl Bugs {
    /// The bug named `name` (as the replay command spells it).
    pub fn named(name: &str) -> Option<Bugs> {
        let mut b = Bugs::default();
        match name {
            "blind-as-empty" => b.blind_as_empty = true,
            "children-outlive-stop" => b.children_outlive_stop = true,
            "start-without-recheck" => b.start_without_recheck = true,
            "push-stale-rollback" => b.push_stale_rollback = true,
            "no-retention" => b.no_retention = true,
            "prune-by-count" => b.prune_by_count = true,
            _ => return None,
        }
        Some(b)
    }

    pub const NAMES: [&'static str; 6] = [
        "blind-as-empty",
        "children-outlive-stop",
        "start-without-recheck",
        "push-stale-rollback",
        "no-retention",
        "prune-by-count",
    ];
}

/// What one run simulates.
#[derive(Clone, Debug)]
pub struct Config {
    pub nodes: u64,
    pub apps: usize,
    /// Simulated milliseconds with faults and operator moves.
    pub fault_ms: u64,
    /// Simulated milliseconds after every fault ends, for the cluster to converge.
    pub heal_ms: u64,
    pub bugs: Bugs,
    /// Retention on (the default). Off is the world before issue 16: nothing is pruned and
    /// nothing checks it, where older bugs that need long snapshot chains are caught.
    pub retention: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            nodes: 3,
            apps: 2,
            fault_ms: 40_000,
            heal_ms: 60_000,
            bugs: Bugs::default(),
            retention: true,
        }
    }
}

/// An invariant that failed.
#[derive(Clone, Debug)]
pub struct Violation {
    pub seed: u64,
    pub at_ms: u64,
    pub what: String,
    /// The last events before it, oldest first.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {} at {} ms: {}", self.seed, self.at_ms, self.what)?;
        writeln!(f, "last events:")?;
        for l in &self.trace {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// What a run that kept every invariant did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub sim_ms: u64,
    pub events: u64,
    pub commands: usize,
    pub moves_committed: u64,
    pub moves_cancelled: u64,
    pub writes_acked: u64,
    pub starts: u64,
    /// Local snapshot copies destroyed because Raft no longer recorded them.
    pub snapshots_pruned: u64,
}

const TICK_MS: u64 = 300;
const WRITE_MS: u64 = 25;
const TRACE: usize = 60;

#[derive(Clone, Debug)]
enum Ev {
    /// The node's agents look.
    Tick(NodeId),
    /// The node carries out action `i` of an apps pass.
    Exec {
        node: NodeId,
        gen: u64,
        groups: Vec<Vec<AppAction>>,
        g: usize,
        i: usize,
    },
    /// The node applies what the log committed.
    Apply(NodeId),
    Write,
    Fault,
    MoveStep {
        node: NodeId,
        gen: u64,
        ds: DatasetId,
        to: NodeId,
    },
    PushStep {
        node: NodeId,
        gen: u64,
        job: Job,
    },
    /// flockd (and the machine, if it was killed) comes back.
    Restart(NodeId),
    Reconnect(NodeId),
    Heal,
}

/// A push job: for a move (its task continues when it ends) or a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Job {
    Move(DatasetId, NodeId),
    Replicate(DatasetId, NodeId),
}

#[derive(Clone, Debug)]
struct Snap {
    name: String,
    guid: u64,
    data: Vec<u64>,
}

/// A dataset copy on a node's disk: its snapshots and its live data (write ids, in order).
#[derive(Clone, Debug, Default)]
struct Copy {
    name: String,
    snaps: Vec<Snap>,
    live: Vec<u64>,
}

/// An app's instance as the process driver records it: a group leader and one child worker.
#[derive(Clone, Debug)]
struct Proc {
    fingerprint: String,
    restarts: u32,
    id: u64,
    leader: bool,
    child: bool,
    code: Option<i32>,
    dataset: Option<DatasetId>,
}

impl Proc {
    fn alive(&self) -> bool {
        self.leader || self.child
    }
}

/// A move attempt this node runs: the core's state machine and the push it waits for.
struct SimMove {
    mv: Move,
    /// The gate is taken: released when the attempt ends.
    gated: bool,
}

#[derive(Clone, Debug)]
struct PushTask {
    ds: DatasetId,
    to: NodeId,
    target: String,
    epoch: u64,
    /// A move's push: the dataset as recorded so far (its last snapshot may not be applied
    /// here yet).
    record: Option<flock_scheduler::Dataset>,
    /// Payload "bytes" streamed so far (64 KiB a write).
    bytes: u64,
    /// Guids of the sender's snapshots after the target when the push began (the bug's list).
    later_at_start: Vec<u64>,
}

#[derive(Default)]
struct SimNode {
    machine_up: bool,
    flockd_up: bool,
    gen: u64,
    applied: usize,
    state: ClusterState,
    apps: AppsCore,
    pass_in_flight: bool,
    datasets: DatasetsCore,
    moves: BTreeMap<(DatasetId, NodeId), SimMove>,
    pushes: BTreeMap<Job, PushTask>,
    /// Start gates held, by dataset: the target of the move attempt that holds it.
    gates: BTreeMap<DatasetId, NodeId>,
    // On disk and in the kernel: these outlive flockd.
    procs: BTreeMap<String, Proc>,
    orphans: Vec<(String, DatasetId)>,
    copies: BTreeMap<DatasetId, Copy>,
    list_fails_until: u64,
    inspect_fails_until: u64,
    start_fails_until: u64,
    /// The storage backend fails every call (a zfs command erroring).
    backend_fails_until: u64,
}

/// The simulated cluster.
pub struct World {
    cfg: Config,
    seed: u64,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    log: Vec<Command>,
    canonical: ClusterState,
    nodes: BTreeMap<NodeId, SimNode>,
    cut: BTreeSet<NodeId>,
    next_id: u64,
    acked: BTreeMap<String, Vec<u64>>,
    trace: VecDeque<String>,
    healed: bool,
    out: Outcome,
}

type Step = Result<(), Violation>;

impl World {
    pub fn new(seed: u64, cfg: Config) -> World {
        let mut w = World {
            seed,
            rng: Rng::new(seed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            log: Vec::new(),
            canonical: ClusterState::default(),
            nodes: BTreeMap::new(),
            cut: BTreeSet::new(),
            next_id: 1,
            acked: BTreeMap::new(),
            trace: VecDeque::new(),
            healed: false,
            out: Outcome::default(),
            cfg,
        };
        w.commit(Command::InitCluster {
            cluster_id: "sim".into(),
            join_secret: "s".into(),
            node_id: 1,
            name: "n1".into(),
            addr: "n1:7000".into(),
        });
        for i in 2..=w.cfg.nodes {
            w.commit(Command::RegisterNode {
                secret: "s".into(),
                name: None,
                addr: format!("n{i}:7000"),
            });
        }
        let apps = (0..w.cfg.apps)
            .map(|i| {
                let name = format!("a{i}");
                let spec = AppSpec {
                    name: name.clone(),
                    image: None,
                    command: Some(vec!["db".into()]),
                    ports: vec![],
                    links: vec![],
                    volume: Some(Volume {
                        mountpoint: "/data".into(),
                        maximum_size: None,
                    }),
                    environment: BTreeMap::new(),
                    restart_policy: RestartPolicy::Always,
                    mem_limit: None,
                    cpu_shares: None,
                    constraints: vec![],
                };
                let node = Some(i as u64 % w.cfg.nodes + 1);
                (name, PlannedApp { spec, node })
            })
            .collect();
        w.commit(Command::Deploy { apps });
        // A tight retention on most datasets, so a run's few moves exceed it: what is kept is
        // what the policy, the newest snapshot and the replicas' bases need. The rest keep the
        // default policy, whose long chains are where a push's base can go wrong.
        let ids: Vec<DatasetId> = w.canonical.datasets.keys().copied().collect();
        for dataset in ids {
            if !w.cfg.retention || w.rng.chance(0.5) {
                continue;
            }
            let last = 1 + w.rng.range(0, 2) as u32;
            w.commit(Command::SetRetention {
                dataset,
                retention: Some(flock_scheduler::Retention {
                    last,
                    hourly: 0,
                    daily: 0,
                }),
            });
        }
        for id in 1..=w.cfg.nodes {
            w.nodes.insert(
                id,
                SimNode {
                    machine_up: true,
                    flockd_up: true,
                    ..Default::default()
                },
            );
            let at = w.rng.range(0, TICK_MS);
            w.at(at, Ev::Tick(id));
            let at = w.rng.range(1, 30);
            w.at(at, Ev::Apply(id));
        }
        w.at(WRITE_MS, Ev::Write);
        let at = w.rng.range(500, 1500);
        w.at(at, Ev::Fault);
        let fault_ms = w.cfg.fault_ms;
        w.at(fault_ms, Ev::Heal);
        w
    }

    /// Runs to the end; the first violated invariant, if any.
    pub fn run(mut self) -> Result<Outcome, Violation> {
        let end = self.cfg.fault_ms + self.cfg.heal_ms;
        while let Some(Reverse((t, seq))) = self.queue.pop() {
            if t > end {
                break;
            }
            self.now = t;
            let ev = self
                .events
                .remove(&seq)
                .expect("every queued event is stored");
            self.out.events += 1;
            self.handle(ev)?;
        }
        self.now = end;
        self.final_check()?;
        self.out.sim_ms = end;
        self.out.commands = self.log.len();
        Ok(self.out)
    }

    fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn note(&mut self, line: String) {
        if self.trace.len() == TRACE {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>7} {line}", self.now));
    }

    fn violation(&self, what: String) -> Violation {
        Violation {
            seed: self.seed,
            at_ms: self.now,
            what,
            trace: self.trace.iter().cloned().collect(),
        }
    }

    fn commit(&mut self, cmd: Command) -> CommandResult {
        let r = self.canonical.apply(&cmd);
        self.log.push(cmd);
        r
    }

    fn node(&mut self, id: NodeId) -> &mut SimNode {
        self.nodes.get_mut(&id).expect("a simulated node")
    }

    fn up(&self, id: NodeId) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|n| n.machine_up && n.flockd_up)
    }

    fn reachable(&self, a: NodeId, b: NodeId) -> bool {
        a == b || (!self.cut.contains(&a) && !self.cut.contains(&b))
    }

    /// Whether `id` is in touch with a majority of running nodes (itself included).
    fn quorum(&self, id: NodeId) -> bool {
        let n = self
            .nodes
            .keys()
            .filter(|&&m| self.up(m) && self.reachable(id, m))
            .count() as u64;
        self.up(id) && n * 2 > self.cfg.nodes
    }

    /// A proposal from node `id`: committed if it reaches a quorum; its answer may be lost
    /// (then the proposer sees an error though the command committed).
    fn propose(&mut self, id: NodeId, cmd: Command) -> Result<CommandResult, String> {
        if !self.quorum(id) {
            return Err("no quorum".into());
        }
        self.note(format!("n{id} proposes {}", brief(&cmd)));
        let r = self.commit(cmd);
        if let CommandResult::MoveCommitted { .. } = r {
            self.out.moves_committed += 1;
        }
        if let CommandResult::MoveCancelled { .. } = r {
            self.out.moves_cancelled += 1;
        }
        if self.rng.chance(0.03) {
            return Err("the answer was lost (committed)".into());
        }
        Ok(r)
    }

    fn handle(&mut self, ev: Ev) -> Step {
        match ev {
            Ev::Tick(id) => {
                let at = self.rng.range(TICK_MS - 50, TICK_MS + 50);
                self.at(at, Ev::Tick(id));
                if self.up(id) && self.nodes[&id].applied > 0 {
                    self.apps_pass(id);
                    self.datasets_pass(id);
                }
                Ok(())
            }
            Ev::Apply(id) => {
                let at = self.rng.range(5, 60);
                self.at(at, Ev::Apply(id));
                self.apply(id);
                Ok(())
            }
            Ev::Exec {
                node,
                gen,
                groups,
                g,
                i,
            } => {
                self.exec(node, gen, groups, g, i);
                Ok(())
            }
            Ev::Write => {
                self.at(WRITE_MS, Ev::Write);
                self.write()
            }
            Ev::Fault => {
                if !self.healed {
                    let at = self.rng.range(300, 1500);
                    self.at(at, Ev::Fault);
                    self.fault();
                }
                Ok(())
            }
            Ev::MoveStep { node, gen, ds, to } => {
                if self.up(node) && self.nodes[&node].gen == gen {
                    self.move_step(node, ds, to);
                }
                Ok(())
            }
            Ev::PushStep { node, gen, job } => {
                if self.up(node) && self.nodes[&node].gen == gen {
                    self.push_step(node, job);
                }
                Ok(())
            }
            Ev::Restart(id) => {
                let n = self.node(id);
                n.machine_up = true;
                n.flockd_up = true;
                self.note(format!("n{id} flockd starts"));
                Ok(())
            }
            Ev::Reconnect(id) => {
                self.cut.remove(&id);
                self.note(format!("n{id} reconnected"));
                Ok(())
            }
            Ev::Heal => {
                self.healed = true;
                self.cut.clear();
                let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
                for id in ids {
                    let n = self.node(id);
                    n.list_fails_until = 0;
                    n.inspect_fails_until = 0;
                    n.start_fails_until = 0;
                    n.backend_fails_until = 0;
                    if !(n.machine_up && n.flockd_up) {
                        n.machine_up = true;
                        n.flockd_up = true;
                    }
                }
                self.note("faults end".into());
                Ok(())
            }
        }
    }

    /// The node catches up with the committed log (when in touch with a quorum).
    fn apply(&mut self, id: NodeId) {
        if !self.quorum(id) {
            return;
        }
        let upto = self.log.len();
        let n = self.nodes.get_mut(&id).expect("a node");
        if n.applied == upto {
            return;
        }
        for cmd in &self.log[n.applied..upto] {
            n.state.apply(cmd);
        }
        n.applied = upto;
        // A change wakes the agents (as `metrics_watch` does), not only the tick.
        let at = self.rng.range(1, 20);
        self.at(at, Ev::Tick(id));
    }

    // ---- the apps executor -------------------------------------------------------------

    fn observe_apps(&mut self, id: NodeId) -> AppsSeen {
        let bugs = self.cfg.bugs;
        let now = self.now;
        let n = self.nodes.get_mut(&id).expect("a node");
        let mut seen = AppsSeen::default();
        if now < n.list_fails_until {
            if !bugs.blind_as_empty {
                seen.blind
                    .insert(DriverKind::Process, "listing failed".into());
            }
        } else {
            let inspect_fails = now < n.inspect_fails_until;
            for (app, p) in n.procs.iter_mut() {
                let state = if inspect_fails {
                    if bugs.blind_as_empty {
                        continue; // an instance that could not be inspected "is not there"
                    }
                    SeenState::Unknown {
                        reason: "inspect failed".into(),
                    }
                } else if p.leader {
                    SeenState::Running
                } else if p.child && !bugs.children_outlive_stop {
                    // The leader exited and a child lingers: the driver kills the group and
                    // reports it running until it is gone.
                    p.child = false;
                    SeenState::Running
                } else {
                    SeenState::Exited {
                        code: p.code,
                        signal: None,
                    }
                };
                seen.instances.entry(app.clone()).or_default().push(Seen {
                    kind: DriverKind::Process,
                    state,
                    fingerprint: p.fingerprint.clone(),
                    id: p.id.to_string(),
                    restarts: p.restarts,
                });
            }
        }
        for (name, app) in &n.state.apps {
            let _ = name;
            if let Some(ds) = app.dataset {
                let copy = match n.copies.get(&ds) {
                    _ if now < n.backend_fails_until => CopySeen::Unknown {
                        reason: "zfs list failed".into(),
                    },
                    Some(c) => CopySeen::Present {
                        mount_path: PathBuf::from(format!("/sim/{ds}")),
                        guids: c.snaps.iter().map(|s| s.guid).collect(),
                    },
                    None => CopySeen::Absent,
                };
                seen.copies.insert(ds, copy);
            }
        }
        seen
    }

    fn apps_pass(&mut self, id: NodeId) {
        if self.nodes[&id].pass_in_flight {
            return;
        }
        let seen = self.observe_apps(id);
        let now = Instant::from_millis(self.now);
        let n = self.nodes.get_mut(&id).expect("a node");
        let groups = n.apps.decide(&n.state, id, &seen, None, now);
        if groups.is_empty() {
            return;
        }
        n.pass_in_flight = true;
        let gen = n.gen;
        let at = self.rng.range(1, 30);
        self.at(
            at,
            Ev::Exec {
                node: id,
                gen,
                groups,
                g: 0,
                i: 0,
            },
        );
    }

    fn exec(&mut self, id: NodeId, gen: u64, groups: Vec<Vec<AppAction>>, g: usize, i: usize) {
        if !self.up(id) || self.nodes[&id].gen != gen {
            return;
        }
        let Some(action) = groups.get(g).and_then(|a| a.get(i)).cloned() else {
            self.node(id).pass_in_flight = false;
            return;
        };
        let ok = self.carry_out(id, action);
        let (g, i) = if ok && i + 1 < groups[g].len() {
            (g, i + 1)
        } else {
            (g + 1, 0)
        };
        // Starting a process takes a while (a container: up to seconds).
        let at = self.rng.range(1, 1500);
        self.at(
            at,
            Ev::Exec {
                node: id,
                gen,
                groups,
                g,
                i,
            },
        );
    }

    /// One app action; false when it failed (the app's later actions are skipped).
    fn carry_out(&mut self, id: NodeId, action: AppAction) -> bool {
        let bugs = self.cfg.bugs;
        let now = self.now;
        match action {
            AppAction::Remove { app, .. } => {
                self.stop_proc(id, &app);
                self.node(id).procs.remove(&app);
                true
            }
            AppAction::Stop { app, .. } => {
                self.stop_proc(id, &app);
                true
            }
            AppAction::CollectLogs { app, .. } => {
                self.node(id).apps.logs(&app, Vec::new());
                true
            }
            AppAction::Start {
                spec,
                restarts,
                guard,
                ..
            } => {
                let t = Instant::from_millis(now);
                let app = spec.app.clone();
                if !bugs.start_without_recheck {
                    let n = &self.nodes[&id];
                    let gated = guard
                        .dataset
                        .is_some_and(|(ds, _)| n.gates.contains_key(&ds));
                    let check = if gated {
                        Err("a move holds the dataset's start gate".to_string())
                    } else {
                        may_start(&n.state, &guard)
                    };
                    if let Err(e) = check {
                        self.node(id)
                            .apps
                            .started(&app, &spec, Err(StartFailure::Overtaken(e)), t);
                        return false;
                    }
                }
                let n = self.nodes.get_mut(&id).expect("a node");
                if now < n.start_fails_until {
                    n.apps.started(
                        &app,
                        &spec,
                        Err(StartFailure::Transient("the engine said 500".into())),
                        t,
                    );
                    return false;
                }
                if let Some(old) = n.procs.get(&app).filter(|p| p.alive()) {
                    if bugs.children_outlive_stop && !old.leader {
                        // The driver thought it exited; its child goes on, untracked.
                        let ds = old.dataset.unwrap_or_default();
                        n.orphans.push((app.clone(), ds));
                    } else {
                        n.apps.started(
                            &app,
                            &spec,
                            Err(StartFailure::Transient(format!("{app} is already running"))),
                            t,
                        );
                        return false;
                    }
                }
                self.next_id += 1;
                let pid = self.next_id;
                let n = self.nodes.get_mut(&id).expect("a node");
                n.procs.insert(
                    app.clone(),
                    Proc {
                        fingerprint: spec.fingerprint(),
                        restarts,
                        id: pid,
                        leader: true,
                        child: true,
                        code: None,
                        dataset: guard.dataset.map(|(d, _)| d),
                    },
                );
                n.apps.started(&app, &spec, Ok(pid.to_string()), t);
                self.out.starts += 1;
                self.note(format!("n{id} starts {app} (pid {pid})"));
                true
            }
        }
    }

    /// The driver's stop: the group gets SIGTERM then SIGKILL; with the bug, only when the
    /// leader still runs.
    fn stop_proc(&mut self, id: NodeId, app: &str) {
        let bugs = self.cfg.bugs;
        let n = self.node(id);
        if let Some(p) = n.procs.get_mut(app) {
            if p.leader || !bugs.children_outlive_stop {
                p.child = false;
            }
            p.leader = false;
            p.code = None;
            let orphan = p.child.then(|| p.dataset.unwrap_or_default());
            if let Some(ds) = orphan {
                p.child = false;
                n.orphans.push((app.to_string(), ds));
            }
        }
        self.note(format!("n{id} stops {app}"));
    }

    // ---- the datasets executor ---------------------------------------------------------

    fn datasets_pass(&mut self, id: NodeId) {
        let now = Instant::from_millis(self.now);
        let n = self.nodes.get_mut(&id).expect("a node");
        let busy: BTreeSet<DatasetId> = n
            .moves
            .keys()
            .map(|(ds, _)| *ds)
            .chain(n.pushes.values().map(|p| p.ds))
            .collect();
        let backend_fails = self.now < n.backend_fails_until;
        let copies = CopiesSeen {
            copies: if backend_fails {
                Err("zfs list failed".into())
            } else {
                Ok(n.copies
                    .iter()
                    .map(|(ds, c)| DsCopySeen {
                        id: *ds,
                        name: c.name.clone(),
                        snapshots: c.snaps.iter().map(|s| s.name.clone()).collect(),
                        // Copies have no size limit here: as recorded, so none is set.
                        limit: n.state.datasets.get(ds).and_then(|d| d.size_limit),
                    })
                    .collect())
            },
            busy: busy.clone(),
            // A proposal's outcome here is never decided later than its answer: a recording
            // either committed (then it is recorded) or did not.
            uncertain: Default::default(),
            holding: Default::default(),
        };
        let actions = n.datasets.decide(&n.state, id, &copies, now);
        for action in actions {
            match action {
                DatasetAction::Destroy { id: ds, .. } => {
                    self.node(id).copies.remove(&ds);
                    self.note(format!("n{id} destroys its copy of {ds}"));
                }
                DatasetAction::Create { id: ds, name, .. } => {
                    self.node(id).copies.insert(
                        ds,
                        Copy {
                            name,
                            ..Copy::default()
                        },
                    );
                }
                DatasetAction::StartMove { dataset, to } => {
                    self.node(id).moves.insert(
                        (dataset, to),
                        SimMove {
                            mv: Move::new(dataset, to),
                            gated: false,
                        },
                    );
                    let gen = self.nodes[&id].gen;
                    self.at(
                        1,
                        Ev::MoveStep {
                            node: id,
                            gen,
                            ds: dataset,
                            to,
                        },
                    );
                }
                DatasetAction::Replicate {
                    dataset,
                    to,
                    snapshot,
                    epoch,
                } => {
                    let job = Job::Replicate(dataset, to);
                    self.start_push(id, job, dataset, to, snapshot, epoch, None);
                }
                DatasetAction::ReportMissing { dataset, .. } => {
                    self.note(format!("n{id} is primary of {dataset} but holds no copy"));
                }
                DatasetAction::Prune { dataset, .. }
                    if self.cfg.bugs.no_retention || !self.cfg.retention =>
                {
                    let now = Instant::from_millis(self.now);
                    self.node(id).datasets.finished(
                        DsJob::Prune { dataset },
                        JobOutcome::Done,
                        now,
                    );
                }
                DatasetAction::Prune {
                    dataset,
                    epoch,
                    names,
                } => {
                    let cmd = Command::PruneSnapshots {
                        dataset,
                        epoch,
                        names,
                    };
                    self.proposal_job(id, DsJob::Prune { dataset }, cmd, now);
                }
                DatasetAction::Release { dataset } => {
                    let cmd = Command::ReleaseDataset { dataset };
                    self.proposal_job(id, DsJob::Release { dataset }, cmd, now);
                }
                DatasetAction::AddReplica {
                    dataset,
                    epoch,
                    node,
                } => {
                    let cmd = Command::AddReplica {
                        dataset,
                        epoch,
                        node,
                    };
                    self.proposal_job(id, DsJob::AddReplica { dataset }, cmd, now);
                }
                // The simulated datasets ask for no replication yet: no periodic snapshots.
                DatasetAction::Snapshot { dataset, .. } => {
                    self.node(id).datasets.finished(
                        DsJob::Snapshot { dataset },
                        JobOutcome::Skipped,
                        now,
                    );
                }
                DatasetAction::SetLimit { id: ds, .. } => {
                    self.node(id).datasets.finished(
                        DsJob::SetLimit { dataset: ds },
                        JobOutcome::Done,
                        now,
                    );
                }
                DatasetAction::DestroySnapshots { id: ds, .. } => {
                    // As the executor: under the lock (nothing works on it), against the
                    // copy and state as they are now.
                    if busy.contains(&ds) || !self.cfg.retention {
                        continue;
                    }
                    let by_count = self.cfg.bugs.prune_by_count;
                    let n = self.node(id);
                    let Some(record) = n.state.datasets.get(&ds).cloned() else {
                        continue;
                    };
                    let Some(c) = n.copies.get_mut(&ds) else {
                        continue;
                    };
                    let names: Vec<String> = c.snaps.iter().map(|s| s.name.clone()).collect();
                    let gone: Vec<String> = if by_count {
                        let autos: Vec<&String> = names
                            .iter()
                            .filter(|n| flock_scheduler::retention::is_automatic(n))
                            .collect();
                        let keep = record.retention().last as usize;
                        autos[..autos.len().saturating_sub(keep)]
                            .iter()
                            .map(|n| n.to_string())
                            .collect()
                    } else {
                        flock_decide::retention::local_to_destroy(&record, &names, &BTreeSet::new())
                    };
                    c.snaps.retain(|s| !gone.contains(&s.name));
                    self.out.snapshots_pruned += gone.len() as u64;
                }
            }
        }
    }

    /// A job that is one proposal: done if it applied, failed if it was refused or lost.
    fn proposal_job(&mut self, id: NodeId, job: DsJob, cmd: Command, now: Instant) {
        let outcome = match self.propose(id, cmd) {
            Ok(CommandResult::Rejected(e)) => JobOutcome::Failed(e.to_string()),
            Ok(_) => JobOutcome::Done,
            Err(e) => JobOutcome::Failed(e),
        };
        self.node(id).datasets.finished(job, outcome, now);
    }

    #[allow(clippy::too_many_arguments)]
    fn start_push(
        &mut self,
        id: NodeId,
        job: Job,
        ds: DatasetId,
        to: NodeId,
        target: String,
        epoch: u64,
        record: Option<flock_scheduler::Dataset>,
    ) {
        let n = self.node(id);
        let later_at_start = n
            .copies
            .get(&ds)
            .map(|c| {
                c.snaps
                    .iter()
                    .skip_while(|s| s.name != target)
                    .skip(1)
                    .map(|s| s.guid)
                    .collect()
            })
            .unwrap_or_default();
        n.pushes.insert(
            job,
            PushTask {
                ds,
                to,
                target,
                epoch,
                record,
                bytes: 0,
                later_at_start,
            },
        );
        let gen = n.gen;
        let at = self.rng.range(5, 100);
        self.at(at, Ev::PushStep { node: id, gen, job });
    }

    /// A replica push ended: the datasets core hears of it.
    fn replica_ended(&mut self, id: NodeId, ds: DatasetId, to: NodeId, outcome: JobOutcome) {
        let now = Instant::from_millis(self.now);
        if let JobOutcome::Failed(why) = &outcome {
            self.note(format!("n{id} replica push of {ds} to n{to} failed: {why}"));
        }
        let n = self.node(id);
        let task = n.pushes.remove(&Job::Replicate(ds, to));
        let mut outcome = outcome;
        // As the executor: the replica's new base is recorded.
        if let (JobOutcome::Done, Some(task)) = (&outcome, task) {
            let known =
                n.state.datasets.get(&ds).and_then(|d| d.bases.get(&to)) == Some(&task.target);
            if !known {
                let cmd = Command::ReplicaHolds {
                    dataset: ds,
                    epoch: task.epoch,
                    node: to,
                    snapshot: task.target.clone(),
                };
                outcome = match self.propose(id, cmd) {
                    Ok(CommandResult::ReplicaRecorded) => JobOutcome::Done,
                    Ok(CommandResult::Rejected(_)) => JobOutcome::Skipped,
                    Ok(other) => JobOutcome::Failed(format!("{other:?}")),
                    Err(e) => JobOutcome::Failed(e),
                };
            }
        }
        self.node(id)
            .datasets
            .finished(DsJob::Replicate { dataset: ds, to }, outcome, now);
    }

    /// A move's push ended: its attempt hears of it and goes on.
    fn move_push_ended(
        &mut self,
        id: NodeId,
        key: (DatasetId, NodeId),
        result: Result<u64, PushFailure>,
    ) {
        let n = self.node(id);
        n.pushes.remove(&Job::Move(key.0, key.1));
        if let Some(m) = n.moves.get_mut(&key) {
            m.mv.observe(MoveInput::Pushed(result));
            let gen = n.gen;
            let at = self.rng.range(1, 30);
            self.at(at, move_step(id, gen, key));
        }
    }

    /// A move attempt ended: its gate is released and the datasets core hears of it.
    fn move_ended(&mut self, id: NodeId, key: (DatasetId, NodeId), result: Result<(), String>) {
        let now = Instant::from_millis(self.now);
        let n = self.node(id);
        let Some(m) = n.moves.remove(&key) else {
            return;
        };
        if m.gated && n.gates.get(&key.0) == Some(&key.1) {
            n.gates.remove(&key.0);
        }
        n.pushes.remove(&Job::Move(key.0, key.1));
        let outcome = match &result {
            Ok(()) => JobOutcome::Done,
            Err(e) => JobOutcome::Failed(e.clone()),
        };
        n.datasets.finished(
            DsJob::Move {
                dataset: key.0,
                to: key.1,
            },
            outcome,
            now,
        );
        if let Err(e) = result {
            self.note(format!("n{id} move of {} to n{} failed: {e}", key.0, key.1));
        }
    }

    /// One step of a move attempt: ask the core, do the IO, answer it.
    fn move_step(&mut self, id: NodeId, ds: DatasetId, to: NodeId) {
        let key = (ds, to);
        let now = Instant::from_millis(self.now);
        let gen = self.nodes[&id].gen;
        let n = self.nodes.get_mut(&id).expect("a node");
        if n.pushes.contains_key(&Job::Move(ds, to)) {
            return; // waiting for its push
        }
        let Some(m) = n.moves.get_mut(&key) else {
            return;
        };
        let step = m.mv.next(&n.state, id, now);
        let answer = match step {
            MoveStep::Connect { .. } => {
                let ok = self.up(to) && self.reachable(id, to);
                Some(MoveInput::Connected(if ok {
                    Ok(())
                } else {
                    Err("unreachable".into())
                }))
            }
            MoveStep::TakeSnapshot { dataset } => {
                self.next_id += 1;
                let guid = self.next_id;
                let now_ms = self.now;
                let n = self.node(id);
                let copy = if now_ms < n.backend_fails_until {
                    None
                } else {
                    n.copies.get_mut(&ds)
                };
                Some(MoveInput::Snapshot(match copy {
                    Some(c) => {
                        let name = format!("move-{guid}");
                        let data = c.live.clone();
                        c.snaps.push(Snap {
                            name: name.clone(),
                            guid,
                            data,
                        });
                        Ok(SnapshotRecord {
                            name,
                            guid,
                            created_unix: now_ms / 1000,
                            epoch: dataset.epoch,
                        })
                    }
                    None => Err("the backend failed or holds no copy".into()),
                }))
            }
            MoveStep::ProposeRecord { .. }
            | MoveStep::ProposeCancel { .. }
            | MoveStep::ProposeHandoff { .. }
            | MoveStep::ProposeCommit { .. } => {
                let cmd = step.command().expect("a proposal step has a command");
                Some(MoveInput::Proposed(self.propose(id, cmd)))
            }
            MoveStep::Push { dataset, snapshot } => {
                let epoch = dataset.epoch;
                self.start_push(
                    id,
                    Job::Move(ds, to),
                    ds,
                    to,
                    snapshot,
                    epoch,
                    Some(dataset),
                );
                None
            }
            MoveStep::AwaitHandoffApplied { until }
            | MoveStep::AwaitApplied { until, .. }
            | MoveStep::Wait(until) => {
                // Ask again then, or sooner: the local state may change meanwhile.
                let wait = until.saturating_since(now).as_millis() as u64;
                self.at(wait.clamp(1, 50), move_step(id, gen, key));
                return;
            }
            MoveStep::TakeStartGate { dataset } => {
                let n = self.node(id);
                match n.gates.get(&dataset) {
                    Some(holder) if *holder != to => {
                        // Another attempt holds it: wait for it, as the executor's lock does.
                        self.at(10, move_step(id, gen, key));
                        return;
                    }
                    _ => {}
                }
                n.gates.insert(dataset, to);
                if let Some(m) = n.moves.get_mut(&key) {
                    m.gated = true;
                }
                Some(MoveInput::GateHeld)
            }
            MoveStep::ObserveUsers { .. } => {
                let seen = self.observe_apps(id);
                Some(MoveInput::Users(users_seen(&seen)))
            }
            MoveStep::Done => return self.move_ended(id, key, Ok(())),
            MoveStep::Failed(e) => return self.move_ended(id, key, Err(e)),
        };
        if let Some(answer) = answer {
            if let Some(m) = self.node(id).moves.get_mut(&key) {
                m.mv.observe(answer);
            }
            let at = self.rng.range(1, 30);
            self.at(at, move_step(id, gen, key));
        }
    }

    /// One step of a push: the receiver admits it and says what it holds, the sender plans
    /// (flock_decide::push), the receiver checks the plan against its latest state, goes back
    /// to the base and takes the next snapshot.
    fn push_step(&mut self, id: NodeId, job: Job) {
        let bugs = self.cfg.bugs;
        let Some(p) = self.nodes[&id].pushes.get(&job).cloned() else {
            return;
        };
        if !self.up(p.to) || !self.reachable(id, p.to) {
            return self.push_failed(id, job, "connection".into());
        }
        if self.now < self.nodes[&id].backend_fails_until
            || self.now < self.nodes[&p.to].backend_fails_until
        {
            return self.push_failed(id, job, "zfs send or receive failed".into());
        }
        // The sender: a push goes on only under the epoch it began with; a move's push plans
        // with the dataset as recorded so far.
        let applied = self.nodes[&id].state.datasets.get(&p.ds);
        let sender_ds = match &p.record {
            Some(record) => Some(push::step_record(applied, record)),
            None => applied.cloned(),
        };
        let Some(sender_ds) = sender_ds.filter(|d| d.epoch == p.epoch && d.primary == id) else {
            return self.push_ended(id, job, Err(JobOutcome::Skipped));
        };
        let receiver_ds = match push::admit(
            &self.nodes[&p.to].state,
            p.to,
            id,
            p.ds,
            &sender_ds.name,
            p.epoch,
        ) {
            Ok(d) => d.clone(),
            Err(e) => return self.push_failed(id, job, e.to_string()),
        };
        let held = |c: Option<&Copy>| -> Vec<HeldSnapshot> {
            c.map(|c| {
                c.snaps
                    .iter()
                    .map(|s| HeldSnapshot::new(s.name.clone(), s.guid))
                    .collect()
            })
            .unwrap_or_default()
        };
        let ours = held(self.nodes[&id].copies.get(&p.ds));
        let theirs = held(self.nodes[&p.to].copies.get(&p.ds));
        let plan = if bugs.push_stale_rollback {
            stale_plan(&sender_ds, &ours, &p, &theirs)
        } else {
            match push::plan_step(&sender_ds, &ours, &p.target, &theirs) {
                Ok(plan) => Some(plan),
                Err(e) => return self.push_failed(id, job, e.to_string()),
            }
        };
        let Some(plan) = plan else {
            return self.push_failed(id, job, "target snapshot missing here".into());
        };
        if plan.is_nothing() {
            return self.push_finished(id, job, &p);
        }
        // The receiver, under its dataset's lock, against its latest state.
        if !bugs.push_stale_rollback {
            let latest = self.nodes[&p.to].state.datasets.get(&p.ds).cloned();
            let latest = latest.unwrap_or(receiver_ds);
            if let Err(e) = push::guard_rollback(&latest, &theirs, &plan) {
                return self.push_failed(id, job, e.to_string());
            }
        }
        let to = p.to;
        let name = sender_ds.name.clone();
        let rc = self.node(to).copies.entry(p.ds).or_insert_with(|| Copy {
            name,
            ..Copy::default()
        });
        let before = rc.snaps.len();
        let base_len = rc.live.len() as u64;
        match &plan.base {
            Some(b) => {
                if let Some(pos) = rc.snaps.iter().rposition(|s| &s.name == b) {
                    rc.snaps.truncate(pos + 1);
                    rc.live = rc.snaps[pos].data.clone();
                }
            }
            None => {
                rc.snaps.clear();
                rc.live.clear();
            }
        }
        let dropped = before - rc.snaps.len();
        if dropped > 0 {
            self.note(format!("n{to} rolls {} back {dropped} snapshot(s)", p.ds));
        }
        let sent = plan.target.as_ref().and_then(|t| {
            self.nodes[&id]
                .copies
                .get(&p.ds)
                .and_then(|c| c.snaps.iter().find(|s| &s.name == t))
                .cloned()
        });
        let reached = match sent {
            Some(snap) => {
                let done = snap.name == p.target;
                let delta = (snap.data.len() as u64).saturating_sub(base_len) << 16;
                if let Some(t) = self.node(id).pushes.get_mut(&job) {
                    t.bytes += delta;
                }
                let rc = self.node(to).copies.entry(p.ds).or_default();
                rc.live = snap.data.clone();
                rc.snaps.push(snap);
                done
            }
            None => true,
        };
        if reached {
            return self.push_finished(id, job, &p);
        }
        let gen = self.nodes[&id].gen;
        // A replica's stream may be large (it may be far behind); a move's rounds are small.
        let at = match job {
            Job::Move(..) => self.rng.range(10, 200),
            Job::Replicate(..) => self.rng.range(50, 3000),
        };
        self.at(at, Ev::PushStep { node: id, gen, job });
    }

    fn push_finished(&mut self, id: NodeId, job: Job, _p: &PushTask) {
        let bytes = self.nodes[&id].pushes.get(&job).map_or(0, |t| t.bytes);
        self.push_ended(id, job, Ok(bytes));
    }

    fn push_failed(&mut self, id: NodeId, job: Job, why: String) {
        self.push_ended(id, job, Err(JobOutcome::Failed(why)));
    }

    /// A push ended: `Ok(bytes)`, or how it did not.
    fn push_ended(&mut self, id: NodeId, job: Job, result: Result<u64, JobOutcome>) {
        match job {
            Job::Replicate(ds, to) => {
                let outcome = match result {
                    Ok(_) => JobOutcome::Done,
                    Err(o) => o,
                };
                self.replica_ended(id, ds, to, outcome);
            }
            Job::Move(ds, to) => {
                let r = match result {
                    Ok(b) => Ok(b),
                    Err(JobOutcome::Failed(e)) => Err(PushFailure::Other(e)),
                    Err(_) => Err(PushFailure::Other("the dataset moved on".into())),
                };
                self.move_push_ended(id, (ds, to), r);
            }
        }
    }

    // ---- the world around the nodes ----------------------------------------------------

    /// Every process of a stateful app that runs writes to its copy; the writes it takes are
    /// acknowledged. At most one may run at any instant.
    fn write(&mut self) -> Step {
        let apps: Vec<(String, DatasetId)> = self
            .canonical
            .apps
            .iter()
            .filter_map(|(n, a)| a.dataset.map(|d| (n.clone(), d)))
            .collect();
        for (app, ds) in apps {
            let mut writers = Vec::new();
            for (&id, n) in &self.nodes {
                if !n.machine_up {
                    continue;
                }
                if n.procs.get(&app).is_some_and(|p| p.alive()) {
                    writers.push(format!("n{id} (pid {})", n.procs[&app].id));
                }
                for _ in n.orphans.iter().filter(|(a, _)| *a == app) {
                    writers.push(format!("n{id} (a child the driver lost)"));
                }
            }
            if writers.len() > 1 {
                return Err(self.violation(format!(
                    "two instances of stateful app {app} run at once: {}",
                    writers.join(", ")
                )));
            }
            let writer_nodes: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(_, n)| {
                    n.machine_up
                        && (n.procs.get(&app).is_some_and(|p| p.alive())
                            || n.orphans.iter().any(|(a, _)| *a == app))
                })
                .map(|(id, _)| *id)
                .collect();
            for id in writer_nodes {
                self.next_id += 1;
                let w = self.next_id;
                if let Some(c) = self.node(id).copies.get_mut(&ds) {
                    c.live.push(w);
                    self.acked.entry(app.clone()).or_default().push(w);
                    self.out.writes_acked += 1;
                }
            }
        }
        Ok(())
    }

    fn fault(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let id = *self.rng.pick(&ids);
        match self.rng.range(0, 12) {
            0 => {
                if self.up(id) {
                    let n = self.node(id);
                    n.flockd_up = false;
                    self.crash(id);
                    let at = self.rng.range(500, 4000);
                    self.at(at, Ev::Restart(id));
                    self.note(format!("n{id} flockd crashes"));
                }
            }
            1 => {
                if self.nodes[&id].machine_up {
                    let n = self.node(id);
                    n.machine_up = false;
                    n.flockd_up = false;
                    for p in n.procs.values_mut() {
                        p.leader = false;
                        p.child = false;
                        p.code = None;
                    }
                    n.orphans.clear();
                    self.crash(id);
                    let at = self.rng.range(1000, 5000);
                    self.at(at, Ev::Restart(id));
                    self.note(format!("n{id} machine killed"));
                }
            }
            2 => {
                self.cut.insert(id);
                let at = self.rng.range(1000, 5000);
                self.at(at, Ev::Reconnect(id));
                self.note(format!("n{id} partitioned"));
            }
            3 => self.fail_for_a_while(id, "driver listing", |n| &mut n.list_fails_until),
            4 => self.fail_for_a_while(id, "driver inspect", |n| &mut n.inspect_fails_until),
            5 => self.fail_for_a_while(id, "driver start", |n| &mut n.start_fails_until),
            8 => self.fail_for_a_while(id, "backend", |n| &mut n.backend_fails_until),
            6 | 7 => {
                let apps: Vec<String> = self.nodes[&id].procs.keys().cloned().collect();
                if !apps.is_empty() {
                    let app = self.rng.pick(&apps).clone();
                    if let Some(p) = self.node(id).procs.get_mut(&app) {
                        if p.leader {
                            p.leader = false;
                            p.code = Some(1);
                            self.note(format!("n{id} {app}'s leader exits 1"));
                        }
                    }
                }
            }
            _ => {
                // The operator moves an app.
                let apps: Vec<String> = self.canonical.apps.keys().cloned().collect();
                let app = self.rng.pick(&apps).clone();
                let to = *self.rng.pick(&ids);
                let any = ids.iter().copied().find(|&m| self.quorum(m));
                if let Some(m) = any {
                    let cmd = if self.rng.chance(0.1) {
                        Command::CancelAppMove { app }
                    } else {
                        Command::MoveApp { app, to }
                    };
                    let _ = self.propose(m, cmd);
                }
            }
        }
    }

    /// Makes `what` on node `id` fail from now for 0.2 to 3 s (`until`: which deadline).
    fn fail_for_a_while(&mut self, id: NodeId, what: &str, until: fn(&mut SimNode) -> &mut u64) {
        let t = self.now + self.rng.range(200, 3000);
        *until(self.node(id)) = t;
        self.note(format!("n{id} {what} fails until {t}"));
    }

    /// flockd on `id` is gone: what it held in memory is lost, its tasks end.
    fn crash(&mut self, id: NodeId) {
        let n = self.node(id);
        n.gen += 1;
        n.apps = AppsCore::new();
        n.pass_in_flight = false;
        n.datasets = DatasetsCore::new();
        n.moves.clear();
        n.pushes.clear();
        n.gates.clear();
        // Its applied state survives (the state machine is on disk).
    }

    fn final_check(&mut self) -> Step {
        for (id, n) in &self.nodes {
            if !(n.machine_up && n.flockd_up) {
                return Err(self.violation(format!("n{id} is still down after the faults ended")));
            }
        }
        for (name, ds) in &self.canonical.datasets {
            if let Some(m) = &ds.moving {
                let p = &self.nodes[&ds.primary];
                return Err(self.violation(format!(
                    "dataset {name} is still moving from n{} to n{} {} ms after the faults ended (the primary: copy {}, move task {}, jobs {:?}, applied {} of {})",
                    ds.primary,
                    m.to,
                    self.cfg.heal_ms,
                    if p.copies.contains_key(&ds.id) { "held" } else { "missing" },
                    p.moves.keys().any(|(d, _)| *d == ds.id),
                    p.datasets.running().collect::<Vec<_>>(),
                    p.applied,
                    self.log.len()
                )));
            }
        }
        // Retention held: once the replicas' bases are known, the automatic snapshots Raft
        // records are within the policy's bound (plus each replica's base), on every holder too.
        for ds in self.canonical.datasets.values() {
            if !self.cfg.retention || flock_scheduler::dataset::unconfirmed_replica(ds).is_some() {
                continue;
            }
            let bound = ds.retention().bound() + ds.replicas.len() as u64 + 1;
            let autos = |names: &mut dyn Iterator<Item = &str>| {
                names
                    .filter(|n| flock_scheduler::retention::is_automatic(n))
                    .count() as u64
            };
            let recorded = autos(&mut ds.snapshots.iter().map(|s| s.name.as_str()));
            if recorded > bound {
                return Err(self.violation(format!(
                    "dataset {}: {recorded} automatic snapshots recorded, over its retention's bound {bound}",
                    ds.name
                )));
            }
            for h in ds.holders() {
                let Some(c) = self.nodes[&h].copies.get(&ds.id) else {
                    continue;
                };
                let held = autos(&mut c.snaps.iter().map(|s| s.name.as_str()));
                if held > bound + 1 {
                    return Err(self.violation(format!(
                        "dataset {}: n{h} holds {held} automatic snapshots, over the retention's bound {bound}",
                        ds.name
                    )));
                }
            }
        }
        // Every snapshot Raft recorded survives on the dataset's primary.
        for ds in self.canonical.datasets.values() {
            let held: BTreeSet<u64> = self.nodes[&ds.primary]
                .copies
                .get(&ds.id)
                .map(|c| c.snaps.iter().map(|s| s.guid).collect())
                .unwrap_or_default();
            if let Some(lost) = ds.snapshots.iter().find(|r| !held.contains(&r.guid)) {
                return Err(self.violation(format!(
                    "dataset {}: recorded snapshot {} (guid {}) is not on its primary n{}",
                    ds.name, lost.name, lost.guid, ds.primary
                )));
            }
        }
        for (name, app) in &self.canonical.apps {
            let Some(on) = self.canonical.app_runs_on(app) else {
                return Err(self.violation(format!("app {name} runs nowhere at the end")));
            };
            let runs = self.nodes[&on].procs.get(name).is_some_and(|p| p.leader);
            if !runs {
                return Err(self.violation(format!(
                    "app {name} does not run on n{on} {} ms after the faults ended ({:?})",
                    self.cfg.heal_ms,
                    self.nodes[&on]
                        .apps
                        .view()
                        .get(name)
                        .map(|l| (l.phase, l.detail.clone()))
                )));
            }
            let Some(ds) = app.dataset else { continue };
            let live = self.nodes[&on]
                .copies
                .get(&ds)
                .map(|c| c.live.iter().copied().collect::<BTreeSet<u64>>())
                .unwrap_or_default();
            let lost: Vec<u64> = self
                .acked
                .get(name)
                .map(|a| a.iter().copied().filter(|w| !live.contains(w)).collect())
                .unwrap_or_default();
            if !lost.is_empty() {
                return Err(self.violation(format!(
                    "app {name}: {} acknowledged writes are not in its copy on n{on} (first {:?})",
                    lost.len(),
                    &lost[..lost.len().min(5)]
                )));
            }
        }
        Ok(())
    }
}

/// The plan of the push before issue 15, as it was (put back by [`Bugs::push_stale_rollback`]):
/// the sender's snapshots after the target as they were when the push began, a chain of only
/// the snapshots whose records the sender applied, and no guard. Seeds catch it through the
/// hole the recorded-only chain leaves (seed 228); the stale list and the missing guard alone
/// are not caught by a seed below 1000 (this simulation takes no snapshots outside moves, so
/// replica pushes rarely overlap a move to the same node).
fn stale_plan(
    ds: &flock_scheduler::Dataset,
    ours: &[HeldSnapshot],
    p: &PushTask,
    theirs: &[HeldSnapshot],
) -> Option<Plan> {
    let idx = ours.iter().position(|s| s.name == p.target)?;
    if theirs.iter().any(|t| p.later_at_start.contains(&t.guid)) {
        return Some(Plan::NOTHING);
    }
    let chain: Vec<&HeldSnapshot> = ours[..=idx]
        .iter()
        .enumerate()
        .filter(|(i, s)| *i == idx || ds.snapshots.iter().any(|r| r.guid == s.guid))
        .map(|(_, s)| s)
        .collect();
    let common = chain.iter().rposition(|s| theirs.contains(s));
    let next = match common {
        None => Some(0),
        Some(c) if c + 1 == chain.len() => None,
        Some(c) => Some(c + 1),
    };
    Some(Plan {
        base: common.map(|c| chain[c].name.clone()),
        target: next.map(|n| chain[n].name.clone()),
    })
}

/// The event that asks move attempt `key` on node `node` for its next step.
fn move_step(node: NodeId, gen: u64, key: (DatasetId, NodeId)) -> Ev {
    Ev::MoveStep {
        node,
        gen,
        ds: key.0,
        to: key.1,
    }
}

/// The apps' instances as a move's check reads them.
fn users_seen(seen: &AppsSeen) -> InstancesSeen {
    InstancesSeen {
        instances: seen
            .instances
            .iter()
            .flat_map(|(app, list)| {
                list.iter().map(move |i| InstanceSeen {
                    app: app.clone(),
                    driver: i.kind,
                    run: match &i.state {
                        SeenState::Running => RunSeen::Running,
                        SeenState::Exited { .. } => RunSeen::Exited,
                        SeenState::Unknown { reason } => RunSeen::Unknown {
                            reason: reason.clone(),
                        },
                    },
                })
            })
            .collect(),
        failed: seen
            .blind
            .iter()
            .map(|(k, why)| (*k, why.clone()))
            .collect(),
    }
}

fn brief(cmd: &Command) -> String {
    match cmd {
        Command::RecordSnapshot {
            dataset, snapshot, ..
        } => format!("RecordSnapshot({dataset}, {})", snapshot.name),
        Command::HandoffDatasetMove { dataset, to, .. } => format!("Handoff({dataset} -> n{to})"),
        Command::CommitDatasetMove {
            dataset,
            to,
            snapshot,
            ..
        } => format!("Commit({dataset} -> n{to} at {snapshot})"),
        Command::MoveApp { app, to } => format!("MoveApp({app} -> n{to})"),
        Command::CancelAppMove { app } => format!("CancelAppMove({app})"),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}
