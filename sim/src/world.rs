//! One simulated cluster: N nodes, each running the real decision cores (flock-decide) against
//! its own copy of the real replicated state (`ClusterState::apply` on the committed log), with
//! simulated drivers (processes that outlive flockd, children, exits), dataset copies (snapshots
//! of a list of write ids), a network (delays, partitions, lost answers), crashes of flockd and
//! of whole machines, and drivers that fail or lie. Everything happens on one thread, in the
//! order of a seeded event queue, so a seed replays exactly.
//!
//! The executors here are as thin as node/'s: observe, ask the core, carry its actions out with
//! a delay. The invariants (DESIGN.md) are checked as the run goes and at its end.
//!
//! Leases and failover (node/src/lease.rs, fence.rs): a leader is elected among the nodes in
//! touch with a majority (after an election timeout, whenever the last one lost its majority);
//! every node renews its lease through it as node/ does (a read index, answered over the
//! simulated network, counted from the send time once applied), on a clock of its own that runs
//! within 5% of real time; the leader runs the real `Liveness` and proposes `DeclareNodeDown` and
//! `NodeBackUp`; the apps core sees the lease (`AppsSeen::lease`); a fencing watchdog per
//! machine kills the stateful apps once the lease it was last told of ran out, whatever flockd
//! does (crashed, hung). Most datasets are replicated, with periodic snapshots.
//!
//! The invariants: at most one instance of a stateful app runs at any instant (on any machine
//! that is up, whatever its flockd does); no node's lease holds on its own clock when the leader
//! declares it down; a failover's new primary holds every write acknowledged before the snapshot
//! it starts from (those after it are counted as lost, and no others may be); a diverged copy is
//! never written or destroyed; and after the faults every node is back up, every app runs where
//! it belongs with every acknowledged write, nothing moves, retention holds.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use flock_decide::apps::{
    may_start, AppAction, AppsCore, AppsSeen, CopySeen, DriverKind, LeaseSeen, Seen, SeenState,
    StartFailure,
};
use flock_decide::datasets::{
    AsideSeen, CopiesSeen, CopySeen as DsCopySeen, DatasetAction, DatasetsCore, Job as DsJob,
    JobOutcome,
};
use flock_decide::lease::{Lease, LeaseConfig, Liveness, LivenessAction};
use flock_decide::moves::{
    InstanceSeen, InstancesSeen, Move, MoveInput, MoveStep, PushFailure, RunSeen,
};
use flock_decide::push::{self, HeldSnapshot, Plan};
use flock_decide::Instant;
use flock_scheduler::config::{AppSpec, PlannedApp, RestartPolicy, Volume};
use flock_scheduler::dataset::DatasetId;
use flock_scheduler::failover::Replication;
use flock_scheduler::{ClusterState, Command, CommandResult, NodeId, NodeState, SnapshotRecord};

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
    /// A node's lease counts from when the leader's answer arrived, not from when it sent the
    /// renewal (so it may outlast the leader's count of its silence).
    pub lease_from_answer: bool,
    /// No fencing watchdog: the stateful apps of a crashed or hung flockd run on past its lease.
    pub no_watchdog: bool,
    /// The leader declares a node down once it has been silent for the lease alone, with no
    /// margin for the clocks' drift.
    pub down_without_margin: bool,
    /// The apps ignore the lease: stateful apps start and keep running as if it always held.
    pub ignore_lease: bool,
    /// A returning node rolls its diverged copy back without setting its writes aside (what
    /// `dataset drop-diverged --force` does on an operator's word).
    pub roll_back_diverged: bool,
    /// Snapshots are taken and recorded without the dataset's record order: an operator's
    /// snapshot taken just after a move's last one may be recorded before it, and the move's
    /// push, which carries the history up to its last snapshot, never carries it.
    pub unordered_snapshots: bool,
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
            "lease-from-answer" => b.lease_from_answer = true,
            "no-watchdog" => b.no_watchdog = true,
            "down-without-margin" => b.down_without_margin = true,
            "ignore-lease" => b.ignore_lease = true,
            "roll-back-diverged" => b.roll_back_diverged = true,
            "unordered-snapshots" => b.unordered_snapshots = true,
            _ => return None,
        }
        Some(b)
    }

    pub const NAMES: [&'static str; 12] = [
        "blind-as-empty",
        "children-outlive-stop",
        "start-without-recheck",
        "push-stale-rollback",
        "no-retention",
        "prune-by-count",
        "lease-from-answer",
        "no-watchdog",
        "down-without-margin",
        "ignore-lease",
        "roll-back-diverged",
        "unordered-snapshots",
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
    /// Print every traced event as it happens (to stderr), not only the last before a failure.
    pub verbose: bool,
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
            verbose: false,
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
    /// Leaders elected (the first included).
    pub leaders: u64,
    /// `DeclareNodeDown`s committed, and the datasets they failed over.
    pub declared_down: u64,
    pub failovers: u64,
    /// `NodeBackUp`s committed.
    pub backed_up: u64,
    /// Stateful instances the fencing watchdog killed.
    pub fenced: u64,
    /// Acknowledged writes a failover lost: taken after the snapshot the new primary started
    /// from, before the old primary was declared down (the window failover accepts).
    pub writes_lost_in_failover: u64,
}

const TICK_MS: u64 = 300;
/// How often the leader looks at whom it heard (node/src/lease.rs's LIVENESS_TICK).
const LIVENESS_MS: u64 = 200;
/// How often the fencing watchdog reads the lease (node/src/fence.rs's TICK).
const WATCHDOG_MS: u64 = 100;
const WRITE_MS: u64 = 25;
const TRACE: usize = 100;

#[derive(Clone, Debug)]
enum Ev {
    /// The node's agents look (every TICK_MS).
    Tick(NodeId),
    /// The node's agents look because its applied state changed.
    Wake(NodeId),
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
    /// The nodes in touch with a majority elect a leader.
    Elect,
    /// The node's renewal loop sends its next renewal to the leader.
    RenewSend {
        node: NodeId,
        gen: u64,
    },
    /// A renewal reaches `leader` (which hears the node, and answers with a read index if it
    /// still leads with a quorum).
    RenewArrive {
        node: NodeId,
        gen: u64,
        attempt: u64,
        leader: NodeId,
    },
    /// The leader's answer reaches the node: the read index to apply before the renewal counts.
    RenewAnswer {
        node: NodeId,
        gen: u64,
        attempt: u64,
        from: NodeId,
        index: Result<usize, String>,
    },
    /// The node looks whether it applied the read index yet (until `deadline`, its clock).
    RenewApplied {
        node: NodeId,
        gen: u64,
        attempt: u64,
        index: usize,
        deadline: u64,
    },
    /// The leader did not answer in time.
    RenewTimeout {
        node: NodeId,
        gen: u64,
        attempt: u64,
    },
    /// The node's liveness worker looks (it decides only while the node leads).
    Liveness(NodeId),
    /// A leader's liveness proposal, one replication round after it decided it.
    LivenessPropose {
        leader: NodeId,
        term: u64,
        cmd: Command,
    },
    /// The fencing watchdog reads the lease.
    Watchdog(NodeId),
    /// An operator's `flockctl dataset snapshot`, carried out on the node it reached (the
    /// primary, as its state says): in the record order, take the snapshot.
    OperatorSnapshot {
        node: NodeId,
        gen: u64,
        ds: DatasetId,
    },
    /// ... and propose its record, a moment later.
    OperatorRecord {
        node: NodeId,
        gen: u64,
        snapshot: SnapshotRecord,
        ds: DatasetId,
    },
}

/// Who holds a dataset's record order on a node (node/src/datasets/mod.rs's `record_order`):
/// from taking a snapshot until its record's outcome is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recorder {
    Move(NodeId),
    Operator,
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
    /// A wake-up of the agents is queued.
    woken: bool,
    datasets: DatasetsCore,
    moves: BTreeMap<(DatasetId, NodeId), SimMove>,
    pushes: BTreeMap<Job, PushTask>,
    /// Start gates held, by dataset: the target of the move attempt that holds it.
    gates: BTreeMap<DatasetId, NodeId>,
    /// Record orders held, by dataset.
    recording: BTreeMap<DatasetId, Recorder>,
    /// An operator's snapshot is under way (it holds the dataset's shared lock).
    operator_snapshots: BTreeSet<DatasetId>,
    // On disk and in the kernel: these outlive flockd.
    procs: BTreeMap<String, Proc>,
    orphans: Vec<(String, DatasetId)>,
    copies: BTreeMap<DatasetId, Copy>,
    /// Copies set aside with diverged writes, by dataset and kept snapshot.
    asides: BTreeMap<(DatasetId, String), Copy>,
    list_fails_until: u64,
    inspect_fails_until: u64,
    start_fails_until: u64,
    /// The storage backend fails every call (a zfs command erroring).
    backend_fails_until: u64,
    /// The machine's clock runs at this rate of real time (its own lease, the leader's view).
    rate: f64,
    /// flockd is hung (not crashed) until then: it does nothing, forgets nothing, answers
    /// nobody; its events wait.
    paused_until: u64,
    /// flockd's leases and liveness (its memory: lost when it crashes).
    keeper: Keeper,
    /// The fencing watchdog's lease deadline, on the machine's clock: what the last renewal
    /// wrote to the fence directory (outlives flockd).
    fence_until: Option<u64>,
}

/// What node/src/lease.rs's `Leases` holds in flockd's memory.
#[derive(Default)]
struct Keeper {
    lease: Lease,
    renewed_once: bool,
    /// Why the last renewal failed.
    why: String,
    /// When this flockd started, on the machine's clock.
    started: u64,
    /// The renewal in flight (its number), until it ends; answers to others are dropped.
    attempt: u64,
    /// When it was sent, and when its answer arrived (this machine's clock).
    sent: u64,
    answered_at: u64,
    in_flight: bool,
    /// The leader answered the attempt in flight (its timeout no longer applies).
    answered: bool,
    liveness: Liveness,
    /// The term this node's liveness leads in (a new term: `follow()` then `lead()`).
    led_term: Option<u64>,
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
    /// Writes a failover lost from the new primary, by dataset and old primary: they must be
    /// kept there, set aside under a `diverged-` snapshot.
    diverged_writes: BTreeMap<(DatasetId, NodeId), BTreeSet<u64>>,
    trace: VecDeque<String>,
    healed: bool,
    out: Outcome,
    /// The leader and its term (`None`: an election is under way).
    leader: Option<(NodeId, u64)>,
    term: u64,
    electing: bool,
    lease_cfg: LeaseConfig,
    /// An invariant broken inside a step that cannot return it (a commit's consequences).
    broken: Option<String>,
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
            diverged_writes: BTreeMap::new(),
            trace: VecDeque::new(),
            healed: false,
            out: Outcome::default(),
            leader: None,
            term: 0,
            electing: false,
            lease_cfg: LeaseConfig::default(),
            broken: None,
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
                        dataset: None,
                    }),
                    environment: BTreeMap::new(),
                    restart_policy: RestartPolicy::Always,
                    mem_limit: None,
                    cpu_shares: None,
                    constraints: vec![],
                    ..Default::default()
                };
                let node = Some(i as u64 % w.cfg.nodes + 1);
                (name, PlannedApp { spec, node })
            })
            .collect();
        w.commit(Command::deploy_all(apps));
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
        // Most datasets are replicated: their primary snapshots every interval and pushes to
        // the replicas it asks for, which a failover can then take over. The rest wait for
        // their node to come back.
        let ids: Vec<DatasetId> = w.canonical.datasets.keys().copied().collect();
        for dataset in ids {
            if !w.rng.chance(0.8) {
                continue;
            }
            let replicas = if w.cfg.nodes > 2 && w.rng.chance(0.3) {
                2
            } else {
                1
            };
            let interval_ms = 100 * w.rng.range(5, 20);
            w.commit(Command::SetReplication {
                dataset,
                replication: Some(Replication {
                    replicas,
                    interval_ms,
                }),
            });
        }
        for id in 1..=w.cfg.nodes {
            // Clocks run within 5% of real time: well inside the drift the lease's margin
            // covers (drift_margin / lease = 40%).
            let rate = 0.95 + w.rng.range(0, 100) as f64 / 1000.0;
            w.nodes.insert(
                id,
                SimNode {
                    machine_up: true,
                    flockd_up: true,
                    rate,
                    keeper: Keeper {
                        why: "not renewed yet since flockd started".into(),
                        ..Keeper::default()
                    },
                    ..Default::default()
                },
            );
            let at = w.rng.range(0, TICK_MS);
            w.at(at, Ev::Tick(id));
            let at = w.rng.range(1, 30);
            w.at(at, Ev::Apply(id));
            let at = w.rng.range(0, w.lease_cfg.renew_every.as_millis() as u64);
            w.at(at, Ev::RenewSend { node: id, gen: 0 });
            let at = w.rng.range(0, LIVENESS_MS);
            w.at(at, Ev::Liveness(id));
            if !w.cfg.bugs.no_watchdog {
                let at = w.rng.range(0, WATCHDOG_MS);
                w.at(at, Ev::Watchdog(id));
            }
        }
        w.electing = true;
        let at = w.rng.range(50, 300);
        w.at(at, Ev::Elect);
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
            if let Some(until) = self.hung(&ev) {
                // A hung flockd does this once it goes on.
                self.at(until - t, ev);
                continue;
            }
            self.handle(ev)?;
            if let Some(what) = self.broken.take() {
                return Err(self.violation(what));
            }
            self.check_leader();
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
        let line = format!("{:>7} {line}", self.now);
        if self.cfg.verbose {
            eprintln!("{line}");
        }
        self.trace.push_back(line);
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

    /// flockd runs on `id` and answers (not crashed, not hung).
    fn up(&self, id: NodeId) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|n| n.machine_up && n.flockd_up && self.now >= n.paused_until)
    }

    /// When the hung flockd that `ev` belongs to goes on, if it is hung now.
    fn hung(&self, ev: &Ev) -> Option<u64> {
        let owner = match ev {
            Ev::Tick(n) | Ev::Wake(n) | Ev::Apply(n) | Ev::Liveness(n) => *n,
            Ev::Exec { node, .. }
            | Ev::MoveStep { node, .. }
            | Ev::PushStep { node, .. }
            | Ev::RenewSend { node, .. }
            | Ev::RenewAnswer { node, .. }
            | Ev::RenewApplied { node, .. }
            | Ev::RenewTimeout { node, .. }
            | Ev::OperatorSnapshot { node, .. }
            | Ev::OperatorRecord { node, .. } => *node,
            Ev::RenewArrive { leader, .. } | Ev::LivenessPropose { leader, .. } => *leader,
            Ev::Write
            | Ev::Fault
            | Ev::Restart(_)
            | Ev::Reconnect(_)
            | Ev::Heal
            | Ev::Elect
            | Ev::Watchdog(_) => return None,
        };
        let n = &self.nodes[&owner];
        (n.machine_up && n.flockd_up && self.now < n.paused_until).then_some(n.paused_until)
    }

    /// Now on node `id`'s clock (ms).
    fn clock(&self, id: NodeId) -> u64 {
        (self.now as f64 * self.nodes[&id].rate) as u64
    }

    /// Real milliseconds until `ms` have passed on node `id`'s clock.
    fn real_ms(&self, id: NodeId, ms: u64) -> u64 {
        (ms as f64 / self.nodes[&id].rate).ceil() as u64
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
        let r = self.commit(cmd.clone());
        self.committed(id, &cmd, &r);
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
            Ev::Tick(id) | Ev::Wake(id) => {
                if let Ev::Tick(_) = ev {
                    let at = self.rng.range(TICK_MS - 50, TICK_MS + 50);
                    self.at(at, Ev::Tick(id));
                }
                self.node(id).woken = false;
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
                self.start_flockd(id);
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
                    self.start_flockd(id);
                }
                self.note("faults end".into());
                Ok(())
            }
            Ev::Elect => {
                self.elect();
                Ok(())
            }
            Ev::RenewSend { node, gen } => {
                self.renew_send(node, gen);
                Ok(())
            }
            Ev::RenewArrive {
                node,
                gen,
                attempt,
                leader,
            } => {
                self.renew_arrive(node, gen, attempt, leader);
                Ok(())
            }
            Ev::RenewAnswer {
                node,
                gen,
                attempt,
                from,
                index,
            } => {
                self.renew_answer(node, gen, attempt, from, index);
                Ok(())
            }
            Ev::RenewApplied {
                node,
                gen,
                attempt,
                index,
                deadline,
            } => {
                self.renew_applied(node, gen, attempt, index, deadline);
                Ok(())
            }
            Ev::RenewTimeout { node, gen, attempt } => {
                let k = &self.nodes[&node].keeper;
                if self.nodes[&node].gen == gen
                    && k.in_flight
                    && k.attempt == attempt
                    && !k.answered
                {
                    let limit = self.lease_cfg.lease;
                    self.renew_end(node, Err(format!("the leader did not answer in {limit:?}")));
                }
                Ok(())
            }
            Ev::Liveness(id) => {
                let at = self.real_ms(id, LIVENESS_MS);
                self.at(at, Ev::Liveness(id));
                self.liveness(id);
                Ok(())
            }
            Ev::LivenessPropose { leader, term, cmd } => {
                if self.leader == Some((leader, term)) {
                    let _ = self.propose(leader, cmd);
                }
                Ok(())
            }
            Ev::Watchdog(id) => {
                let at = self.real_ms(id, WATCHDOG_MS);
                self.at(at, Ev::Watchdog(id));
                self.watchdog(id);
                Ok(())
            }
            Ev::OperatorSnapshot { node, gen, ds } => {
                if self.up(node) && self.nodes[&node].gen == gen {
                    self.operator_snapshot(node, ds);
                }
                Ok(())
            }
            Ev::OperatorRecord {
                node,
                gen,
                snapshot,
                ds,
            } => {
                if self.up(node) && self.nodes[&node].gen == gen {
                    self.operator_record(node, ds, snapshot);
                }
                Ok(())
            }
        }
    }

    /// flockd starts on `id` (and the machine, if it was down): a new process, whose lease is
    /// pending until its first renewal.
    fn start_flockd(&mut self, id: NodeId) {
        let clock = self.clock(id);
        let n = self.node(id);
        if n.machine_up && n.flockd_up {
            return;
        }
        n.machine_up = true;
        n.flockd_up = true;
        n.paused_until = 0;
        n.keeper = Keeper {
            started: clock,
            why: "not renewed yet since flockd started".into(),
            ..Keeper::default()
        };
        let gen = n.gen;
        self.at(1, Ev::RenewSend { node: id, gen });
        self.note(format!("n{id} flockd starts"));
    }

    // ---- leader, leases and liveness -------------------------------------------------------

    /// The leader keeps the lead while it is in touch with a majority; without one, the nodes
    /// that are elect one after an election timeout.
    fn check_leader(&mut self) {
        if let Some((l, term)) = self.leader {
            if !self.quorum(l) {
                self.leader = None;
                self.note(format!("n{l} loses the lead (term {term})"));
            }
        }
        if self.leader.is_none() && !self.electing {
            self.electing = true;
            let at = self.rng.range(300, 700);
            self.at(at, Ev::Elect);
        }
    }

    fn elect(&mut self) {
        self.electing = false;
        if self.leader.is_some() {
            return;
        }
        let candidates: Vec<NodeId> = self
            .nodes
            .keys()
            .copied()
            .filter(|&id| self.quorum(id))
            .collect();
        if candidates.is_empty() {
            return; // check_leader calls another election
        }
        let l = *self.rng.pick(&candidates);
        self.term += 1;
        self.leader = Some((l, self.term));
        self.out.leaders += 1;
        self.note(format!("n{l} leads (term {})", self.term));
    }

    /// Network delay of a renewal or its answer: mostly short, now and then (while faults
    /// last) a congested link.
    fn net_delay(&mut self) -> u64 {
        if !self.healed && self.rng.chance(0.02) {
            self.rng.range(200, 1500)
        } else {
            self.rng.range(1, 20)
        }
    }

    /// node/src/lease.rs's `renew`: one renewal, a read index on the leader.
    fn renew_send(&mut self, id: NodeId, gen: u64) {
        if !self.up(id) || self.nodes[&id].gen != gen {
            return;
        }
        let sent = self.clock(id);
        let k = &mut self.node(id).keeper;
        k.attempt += 1;
        k.in_flight = true;
        k.answered = false;
        k.sent = sent;
        let attempt = k.attempt;
        let limit = self.real_ms(id, self.lease_cfg.lease.as_millis() as u64);
        self.at(
            limit,
            Ev::RenewTimeout {
                node: id,
                gen,
                attempt,
            },
        );
        match self.leader {
            Some((l, _)) if l == id => {
                // The leader's own renewal: a local read index.
                let n = &self.nodes[&id];
                let index = if self.quorum(id) {
                    n.keeper
                        .liveness
                        .may_renew(&n.state, id)
                        .map(|()| self.log.len())
                } else {
                    Err("this node lost its quorum".into())
                };
                let at = self.rng.range(0, 5);
                self.at(
                    at,
                    Ev::RenewAnswer {
                        node: id,
                        gen,
                        attempt,
                        from: id,
                        index,
                    },
                );
            }
            Some((l, _)) => {
                // Across a partition the request is lost: the attempt times out.
                if self.reachable(id, l) {
                    let at = self.net_delay();
                    self.at(
                        at,
                        Ev::RenewArrive {
                            node: id,
                            gen,
                            attempt,
                            leader: l,
                        },
                    );
                }
            }
            None => {
                let at = self.rng.range(1, 5);
                self.at(
                    at,
                    Ev::RenewAnswer {
                        node: id,
                        gen,
                        attempt,
                        from: id,
                        index: Err("no leader known".into()),
                    },
                );
            }
        }
    }

    /// node/src/api's `read_index` on the leader: any request proves its sender alive; a
    /// renewal gets the commit index if this node still leads with a quorum.
    fn renew_arrive(&mut self, id: NodeId, gen: u64, attempt: u64, l: NodeId) {
        if !self.up(l) {
            return; // nobody answers: the attempt times out
        }
        let now = Instant::from_millis(self.clock(l));
        let cfg = self.lease_cfg;
        self.node(l).keeper.liveness.heard(id, now, &cfg);
        let leads = matches!(self.leader, Some((x, _)) if x == l);
        let index = if leads && self.quorum(l) {
            let n = &self.nodes[&l];
            n.keeper
                .liveness
                .may_renew(&n.state, id)
                .map(|()| self.log.len())
        } else {
            Err(format!("n{l} is not the leader"))
        };
        if self.reachable(l, id) {
            let at = self.net_delay();
            self.at(
                at,
                Ev::RenewAnswer {
                    node: id,
                    gen,
                    attempt,
                    from: l,
                    index,
                },
            );
        }
    }

    fn renew_answer(
        &mut self,
        id: NodeId,
        gen: u64,
        attempt: u64,
        from: NodeId,
        index: Result<usize, String>,
    ) {
        let clock = self.clock(id);
        let n = &self.nodes[&id];
        let k = &n.keeper;
        if !self.up(id) || n.gen != gen || !k.in_flight || k.attempt != attempt || k.answered {
            return;
        }
        if !self.reachable(from, id) {
            return; // lost on the way: the attempt times out
        }
        let k = &mut self.node(id).keeper;
        k.answered = true;
        k.answered_at = clock;
        match index {
            Err(e) => self.renew_end(id, Err(e)),
            Ok(index) => {
                // The renewal counts once this node applied what the leader had committed.
                let deadline = clock + self.lease_cfg.lease.as_millis() as u64;
                self.renew_applied(id, gen, attempt, index, deadline);
            }
        }
    }

    fn renew_applied(&mut self, id: NodeId, gen: u64, attempt: u64, index: usize, deadline: u64) {
        let clock = self.clock(id);
        let n = &self.nodes[&id];
        if !self.up(id) || n.gen != gen || !n.keeper.in_flight || n.keeper.attempt != attempt {
            return;
        }
        if n.applied >= index {
            self.renew_end(id, Ok(()));
        } else if clock >= deadline {
            self.renew_end(
                id,
                Err(format!(
                    "this node did not apply the leader's index {index} in time"
                )),
            );
        } else {
            let at = self.rng.range(5, 20);
            self.at(
                at,
                Ev::RenewApplied {
                    node: id,
                    gen,
                    attempt,
                    index,
                    deadline,
                },
            );
        }
    }

    /// The renewal in flight ended; the next one goes after `renew_every`.
    fn renew_end(&mut self, id: NodeId, result: Result<(), String>) {
        let clock = self.clock(id);
        let cfg = self.lease_cfg;
        let from_answer = self.cfg.bugs.lease_from_answer;
        let n = self.node(id);
        let k = &mut n.keeper;
        k.in_flight = false;
        let line = match result {
            Ok(()) => {
                let from = if from_answer { k.answered_at } else { k.sent };
                k.lease.renewed(Instant::from_millis(from), &cfg);
                let first = !k.renewed_once || !k.why.is_empty();
                k.renewed_once = true;
                k.why.clear();
                // What the watchdog reads: the deadline, on this machine's clock.
                let remaining = k.lease.remaining(Instant::from_millis(clock));
                n.fence_until = Some(clock + remaining.as_millis() as u64);
                first.then(|| format!("n{id} lease renewed ({} ms left)", remaining.as_millis()))
            }
            Err(why) => {
                let first = k.why.is_empty();
                k.why = why.clone();
                first.then(|| format!("n{id} lease renewal failed: {why}"))
            }
        };
        let gen = n.gen;
        if let Some(line) = line {
            self.note(line);
        }
        let at = self.real_ms(id, cfg.renew_every.as_millis() as u64);
        self.at(at, Ev::RenewSend { node: id, gen });
    }

    /// This node's lease as node/src/lease.rs's `Leases::seen` tells the apps.
    fn lease_seen(&self, id: NodeId) -> LeaseSeen {
        let n = &self.nodes[&id];
        let k = &n.keeper;
        let clock = self.clock(id);
        if k.lease.holds(Instant::from_millis(clock)) {
            LeaseSeen::Holds
        } else if !k.renewed_once && clock < k.started + self.lease_cfg.lease.as_millis() as u64 {
            LeaseSeen::Pending { why: k.why.clone() }
        } else {
            LeaseSeen::Lapsed { why: k.why.clone() }
        }
    }

    /// node/src/lease.rs's `watch`: the leader (only) proposes what its liveness decides.
    fn liveness(&mut self, id: NodeId) {
        if !self.up(id) {
            return;
        }
        let clock = Instant::from_millis(self.clock(id));
        let mut cfg = self.lease_cfg;
        if self.cfg.bugs.down_without_margin {
            cfg.drift_margin = Duration::ZERO;
        }
        let term = match self.leader {
            Some((l, t)) if l == id => Some(t),
            _ => None,
        };
        let n = self.nodes.get_mut(&id).expect("a node");
        let k = &mut n.keeper;
        let Some(term) = term else {
            k.liveness.follow();
            k.led_term = None;
            return;
        };
        if k.led_term != Some(term) {
            // A new term: what this node heard before counts no more.
            k.liveness.follow();
            k.liveness.lead(clock);
            k.led_term = Some(term);
        }
        let actions = k.liveness.decide(&n.state, id, clock, &cfg);
        for action in actions {
            let at_unix_ms = clock.as_millis();
            let cmd = match action {
                LivenessAction::DeclareDown {
                    node,
                    silent,
                    by_operator,
                } => Command::DeclareNodeDown {
                    node,
                    last_heard_unix_ms: at_unix_ms.saturating_sub(silent.as_millis() as u64),
                    at_unix_ms,
                    by_operator,
                },
                LivenessAction::BackUp { node } => Command::NodeBackUp { node, at_unix_ms },
            };
            {
                // A replication round before it commits: a renewal that reaches the leader
                // meanwhile must not get a read index without it (the leader refuses renewals
                // of a node it is declaring down until the declaration applied).
                self.note(format!("n{id} decides to propose {}", brief(&cmd)));
                let at = self.rng.range(1, 15);
                self.at(
                    at,
                    Ev::LivenessPropose {
                        leader: id,
                        term,
                        cmd,
                    },
                );
            }
        }
    }

    /// The fencing watchdog (node/src/fence.rs): kills the guarded (stateful) apps once the
    /// recorded lease ran out on this machine's clock, whatever flockd does.
    fn watchdog(&mut self, id: NodeId) {
        let clock = self.clock(id);
        let n = self.node(id);
        if !n.machine_up || n.fence_until.is_none_or(|d| clock < d) {
            return;
        }
        let mut killed = Vec::new();
        for (app, p) in n.procs.iter_mut() {
            if p.dataset.is_some() && p.alive() {
                p.leader = false;
                p.child = false;
                p.code = None;
                killed.push(app.clone());
            }
        }
        for app in killed {
            self.out.fenced += 1;
            self.note(format!("n{id} watchdog kills {app}: the lease ran out"));
        }
    }

    /// What a committed command means for the invariants.
    fn committed(&mut self, by: NodeId, cmd: &Command, r: &CommandResult) {
        match (cmd, r) {
            (
                Command::DeclareNodeDown { node, .. },
                CommandResult::NodeDeclaredDown {
                    failed_over,
                    waiting,
                },
            ) => {
                let x = *node;
                self.out.declared_down += 1;
                self.note(format!(
                    "n{x} declared down by n{by}: failed over {failed_over:?}, waiting {waiting:?}"
                ));
                // The node's lease, on its own clock, ran out before this (flockd's, or the
                // one its watchdog still enforces).
                let clock = self.clock(x);
                let n = &self.nodes[&x];
                let own = if n.machine_up && n.flockd_up {
                    n.keeper
                        .lease
                        .remaining(Instant::from_millis(clock))
                        .as_millis() as u64
                } else {
                    0
                };
                let fence = n
                    .fence_until
                    .filter(|_| n.machine_up)
                    .map_or(0, |d| d.saturating_sub(clock));
                let left = own.max(fence);
                if left > 0 && self.broken.is_none() {
                    self.broken = Some(format!(
                        "n{by} declared n{x} down while n{x}'s lease still held for {left} ms on its own clock (clock rates: n{x} {:.3}, n{by} {:.3})",
                        n.rate, self.nodes[&by].rate
                    ));
                }
                for (name, to) in failed_over.clone() {
                    self.failed_over(x, &name, to);
                }
            }
            (Command::NodeBackUp { node, .. }, CommandResult::NodeUp { was_down: true }) => {
                self.out.backed_up += 1;
                self.note(format!("n{node} back up (by n{by})"));
            }
            _ => {}
        }
    }

    /// Dataset `name` failed over from `from` to `to`: every write acknowledged before the
    /// snapshot the new primary starts from must be in its copy; those after it that the copy
    /// lacks are the writes failover loses (counted, and no longer expected at the end).
    fn failed_over(&mut self, from: NodeId, name: &str, to: NodeId) {
        self.out.failovers += 1;
        let Some(ds) = self.canonical.datasets.values().find(|d| d.name == name) else {
            return;
        };
        let Some(base) = ds.snapshots.last().cloned() else {
            self.broken = Some(format!(
                "dataset {name} failed over from n{from} to n{to} with no recorded snapshot"
            ));
            return;
        };
        let id = ds.id;
        let Some(copy) = self.nodes[&to].copies.get(&id) else {
            self.broken = Some(format!(
                "dataset {name} failed over from n{from} to n{to}, which holds no copy of it"
            ));
            return;
        };
        if !copy.snaps.iter().any(|s| s.guid == base.guid) {
            self.broken = Some(format!(
                "dataset {name} failed over from n{from} to n{to}, which lacks its base snapshot {}",
                base.name
            ));
            return;
        }
        let live: BTreeSet<u64> = copy.live.iter().copied().collect();
        let apps: Vec<String> = self
            .canonical
            .apps_of_dataset(id)
            .map(|(a, _)| a.clone())
            .collect();
        for app in apps {
            let Some(acked) = self.acked.get_mut(&app) else {
                continue;
            };
            // Write ids and snapshot guids come from one counter: a write acknowledged before
            // the snapshot was taken has a smaller id.
            let before: Vec<u64> = acked
                .iter()
                .copied()
                .filter(|w| *w < base.guid && !live.contains(w))
                .collect();
            if !before.is_empty() {
                self.broken = Some(format!(
                    "app {app}: dataset {name} failed over to n{to} from snapshot {} (guid {}), and {} writes acknowledged before it are not in n{to}'s copy (first {:?})",
                    base.name,
                    base.guid,
                    before.len(),
                    &before[..before.len().min(5)]
                ));
                return;
            }
            let kept = acked.len();
            let gone: Vec<u64> = acked
                .iter()
                .copied()
                .filter(|w| !live.contains(w))
                .collect();
            acked.retain(|w| live.contains(w));
            // Those the old primary holds are kept there (others were acknowledged on
            // another node before a move: not this failover's to keep).
            let old: BTreeSet<u64> = self.nodes[&from]
                .copies
                .get(&id)
                .map(|c| c.live.iter().copied().collect())
                .unwrap_or_default();
            self.diverged_writes
                .entry((id, from))
                .or_default()
                .extend(gone.into_iter().filter(|w| old.contains(w)));
            let lost = (kept - acked.len()) as u64;
            self.out.writes_lost_in_failover += lost;
            self.note(format!(
                "{app} fails over n{from} -> n{to} from {}: {lost} acknowledged writes after it lost",
                base.name
            ));
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
        // A change wakes the agents (as `metrics_watch` does), not only the tick; one wake-up
        // (a watch channel) until they looked.
        if !n.woken {
            n.woken = true;
            let at = self.rng.range(1, 20);
            self.at(at, Ev::Wake(id));
        }
    }

    // ---- the apps executor -------------------------------------------------------------

    fn observe_apps(&mut self, id: NodeId) -> AppsSeen {
        let bugs = self.cfg.bugs;
        let now = self.now;
        let lease = if bugs.ignore_lease {
            LeaseSeen::Holds
        } else {
            self.lease_seen(id)
        };
        let n = self.nodes.get_mut(&id).expect("a node");
        let mut seen = AppsSeen {
            lease,
            ..AppsSeen::default()
        };
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
                // The lease may have lapsed since the look: a stateful app starts only under it.
                let lapsed = guard.dataset.is_some()
                    && !bugs.ignore_lease
                    && self.lease_seen(id) != LeaseSeen::Holds;
                if lapsed {
                    let e = "this node's lease does not hold".to_string();
                    self.node(id)
                        .apps
                        .started(&app, &spec, Err(StartFailure::Overtaken(e)), t);
                    return false;
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
            .chain(n.operator_snapshots.iter().copied())
            .collect();
        let backend_fails = self.now < n.backend_fails_until;
        let asides = if backend_fails {
            Vec::new()
        } else {
            n.asides
                .iter()
                .map(|((ds, snap), c)| AsideSeen {
                    id: *ds,
                    name: c.name.clone(),
                    snapshot: snap.clone(),
                })
                .collect()
        };
        let copies = CopiesSeen {
            asides,
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
                    if self.canonical.failover.is_diverged(ds, id) && self.broken.is_none() {
                        self.broken = Some(format!(
                            "n{id} destroys its diverged copy of {ds}, which may hold the only copy of writes a failover left behind"
                        ));
                    }
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
                DatasetAction::Snapshot { dataset, epoch } => {
                    let outcome = self.periodic_snapshot(id, dataset, epoch);
                    self.node(id)
                        .datasets
                        .finished(DsJob::Snapshot { dataset }, outcome, now);
                }
                DatasetAction::KeepDiverged {
                    dataset,
                    epoch,
                    common,
                    ..
                } => {
                    let outcome = self.keep_diverged(id, dataset, epoch, common);
                    self.node(id)
                        .datasets
                        .finished(DsJob::KeepDiverged { dataset }, outcome, now);
                }
                DatasetAction::DestroyAside {
                    id: ds, snapshot, ..
                } => {
                    let kept = self.canonical.failover.keeps(ds, id, &snapshot)
                        || self.canonical.failover.is_diverged(ds, id);
                    if kept && self.canonical.datasets.contains_key(&ds) && self.broken.is_none() {
                        self.broken = Some(format!(
                            "n{id} destroys {snapshot} of {ds}, the diverged writes it keeps"
                        ));
                    }
                    self.node(id).asides.remove(&(ds, snapshot));
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

    /// node/src/api/datasets.rs's `dataset_snapshot` on the primary: under the dataset's
    /// shared lock, a linearizable read says this node is the primary; in the dataset's record
    /// order (waiting for it), the snapshot is taken, and its record proposed a moment later
    /// ([`Self::operator_record`]).
    fn operator_snapshot(&mut self, id: NodeId, ds: DatasetId) {
        let gen = self.nodes[&id].gen;
        if !self.quorum(id) {
            return; // the read fails: the operator is told to try again
        }
        let Some(epoch) = self
            .canonical
            .datasets
            .get(&ds)
            .filter(|d| d.primary == id)
            .map(|d| d.epoch)
        else {
            return; // "moved to another node; try again"
        };
        let ordered = !self.cfg.bugs.unordered_snapshots;
        let now_ms = self.now;
        let n = self.node(id);
        n.operator_snapshots.insert(ds);
        if ordered {
            if n.recording.contains_key(&ds) {
                self.at(10, Ev::OperatorSnapshot { node: id, gen, ds });
                return;
            }
            n.recording.insert(ds, Recorder::Operator);
        }
        let fails = now_ms < n.backend_fails_until;
        self.next_id += 1;
        let guid = self.next_id;
        let name = format!("snap-{guid}");
        let n = self.node(id);
        let taken = match n.copies.get_mut(&ds) {
            Some(c) if !fails => {
                let data = c.live.clone();
                c.snaps.push(Snap {
                    name: name.clone(),
                    guid,
                    data,
                });
                true
            }
            _ => false,
        };
        if !taken {
            n.operator_snapshots.remove(&ds);
            if n.recording.get(&ds) == Some(&Recorder::Operator) {
                n.recording.remove(&ds);
            }
            return;
        }
        let snapshot = SnapshotRecord {
            name,
            guid,
            created_unix: now_ms / 1000,
            epoch,
        };
        let at = self.rng.range(1, 40);
        self.at(
            at,
            Ev::OperatorRecord {
                node: id,
                gen,
                snapshot,
                ds,
            },
        );
    }

    /// The operator's snapshot's record is proposed; a definite refusal takes the snapshot
    /// back (`snapshot_and_record`), then the record order and the lock are let go.
    fn operator_record(&mut self, id: NodeId, ds: DatasetId, snapshot: SnapshotRecord) {
        let guid = snapshot.guid;
        let cmd = Command::RecordSnapshot {
            dataset: ds,
            epoch: snapshot.epoch,
            snapshot: snapshot.clone(),
        };
        let before = self.log.len();
        let recorded = match self.propose(id, cmd) {
            Ok(CommandResult::SnapshotRecorded) => true,
            Ok(_) => false,
            Err(_) => self.log.len() > before,
        };
        let n = self.node(id);
        if !recorded {
            if let Some(c) = n.copies.get_mut(&ds) {
                c.snaps.retain(|s| s.guid != guid);
            }
        }
        if n.recording.get(&ds) == Some(&Recorder::Operator) {
            n.recording.remove(&ds);
        }
        n.operator_snapshots.remove(&ds);
        let what = if recorded { "recorded" } else { "refused" };
        self.note(format!(
            "n{id} operator's snapshot {} of {ds} {what}",
            snapshot.name
        ));
    }

    /// node/src/datasets/agent.rs's `periodic_snapshot`: an `auto-` snapshot of the copy,
    /// recorded in Raft if this node is still the primary at `epoch`; taken back if it was
    /// definitely not recorded.
    fn periodic_snapshot(&mut self, id: NodeId, ds: DatasetId, epoch: u64) -> JobOutcome {
        let now_ms = self.now;
        let n = &self.nodes[&id];
        if !n
            .state
            .datasets
            .get(&ds)
            .is_some_and(|d| d.primary == id && d.epoch == epoch)
        {
            return JobOutcome::Skipped;
        }
        if now_ms < n.backend_fails_until {
            return JobOutcome::Failed("zfs snapshot failed".into());
        }
        self.next_id += 1;
        let guid = self.next_id;
        let name = format!("auto-{guid}");
        let Some(c) = self.node(id).copies.get_mut(&ds) else {
            return JobOutcome::Failed("no copy here".into());
        };
        let data = c.live.clone();
        c.snaps.push(Snap {
            name: name.clone(),
            guid,
            data,
        });
        let cmd = Command::RecordSnapshot {
            dataset: ds,
            epoch,
            snapshot: SnapshotRecord {
                name: name.clone(),
                guid,
                created_unix: now_ms / 1000,
                epoch,
            },
        };
        let before = self.log.len();
        let (outcome, recorded) = match self.propose(id, cmd) {
            Ok(CommandResult::SnapshotRecorded) => (JobOutcome::Done, true),
            Ok(CommandResult::Rejected(e)) => (JobOutcome::Failed(e.to_string()), false),
            Ok(other) => (JobOutcome::Failed(format!("{other:?}")), false),
            // A lost answer: it committed (the executor would not know; it keeps the snapshot
            // as uncertain, which comes to the same here).
            Err(e) => (JobOutcome::Failed(e), self.log.len() > before),
        };
        if !recorded {
            if let Some(c) = self.node(id).copies.get_mut(&ds) {
                c.snaps.retain(|s| s.guid != guid);
            }
        }
        outcome
    }

    /// As node/'s executor (`keep_diverged`, flock_dataset::set_aside): the diverged copy is
    /// set aside whole under `diverged-EPOCH`, restarts from `common`, and that is proposed.
    fn keep_diverged(
        &mut self,
        id: NodeId,
        ds: DatasetId,
        epoch: u64,
        common: Option<String>,
    ) -> JobOutcome {
        let now = self.now;
        let n = self.node(id);
        let still = n
            .state
            .failover
            .diverged
            .get(&ds)
            .and_then(|m| m.get(&id))
            .is_some_and(|d| d.epoch == epoch);
        if !still {
            return JobOutcome::Skipped;
        }
        if n.backend_fails_until > now {
            return JobOutcome::Failed("the backend fails".into());
        }
        let snapshot = flock_decide::datasets::diverged_snapshot(epoch);
        let key = (ds, snapshot.clone());
        let keep = !self.cfg.bugs.roll_back_diverged;
        let n = self.node(id);
        if keep && !n.asides.contains_key(&key) {
            if let Some(mut c) = n.copies.remove(&ds) {
                self.next_id += 1;
                let guid = self.next_id;
                let n = self.node(id);
                c.snaps.push(Snap {
                    name: snapshot.clone(),
                    guid,
                    data: c.live.clone(),
                });
                n.asides.insert(key.clone(), c);
            }
        }
        let n = self.node(id);
        if !keep {
            // The bug: the copy goes back to the common snapshot, its writes with it.
            if let Some(c) = n.copies.get_mut(&ds) {
                let base = common
                    .as_ref()
                    .and_then(|name| c.snaps.iter().position(|s| &s.name == name));
                match base {
                    Some(i) => {
                        c.snaps.truncate(i + 1);
                        c.live = c.snaps[i].data.clone();
                    }
                    None => {
                        n.copies.remove(&ds);
                    }
                }
            }
        }
        let n = self.node(id);
        let kept = n.asides.get(&key).cloned();
        if let (Some(aside), None) = (&kept, n.copies.get(&ds)) {
            // As a rollback: the snapshots up to the common one stay.
            if let Some(i) = common
                .as_ref()
                .and_then(|c| aside.snaps.iter().position(|s| &s.name == c))
            {
                n.copies.insert(
                    ds,
                    Copy {
                        name: aside.name.clone(),
                        snaps: aside.snaps[..=i].to_vec(),
                        live: aside.snaps[i].data.clone(),
                    },
                );
            }
        }
        let cmd = Command::KeepDiverged {
            dataset: ds,
            node: id,
            snapshot: kept.map(|_| snapshot),
            at_unix_ms: self.now,
        };
        match self.propose(id, cmd) {
            Ok(CommandResult::DivergedKept) => JobOutcome::Done,
            Ok(CommandResult::Rejected(e)) => JobOutcome::Failed(e.to_string()),
            Ok(other) => JobOutcome::Failed(format!("{other:?}")),
            Err(e) => JobOutcome::Failed(e),
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
        if n.recording.get(&key.0) == Some(&Recorder::Move(key.1)) {
            n.recording.remove(&key.0);
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
        let records = matches!(step, MoveStep::ProposeRecord { .. });
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
                if !self.cfg.bugs.unordered_snapshots {
                    let n = self.node(id);
                    match n.recording.get(&ds) {
                        Some(r) if *r != Recorder::Move(to) => {
                            // An operator's snapshot is being recorded: wait for it.
                            self.at(10, move_step(id, gen, key));
                            return;
                        }
                        _ => {
                            n.recording.insert(ds, Recorder::Move(to));
                        }
                    }
                }
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
            // The record's outcome is known (or the snapshot failed): the order is free.
            let recorded = records || matches!(answer, MoveInput::Snapshot(Err(_)));
            let n = self.node(id);
            if recorded && n.recording.get(&ds) == Some(&Recorder::Move(to)) {
                n.recording.remove(&ds);
            }
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
        if self.canonical.failover.is_diverged(p.ds, to) && self.broken.is_none() {
            self.broken = Some(format!(
                "n{id} pushes {} into n{to}'s diverged copy, which may hold the only copy of writes a failover left behind",
                sender_ds.name
            ));
        }
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
                let flockd = if !n.flockd_up {
                    ", flockd crashed"
                } else if self.now < n.paused_until {
                    ", flockd hung"
                } else {
                    ""
                };
                if n.procs.get(&app).is_some_and(|p| p.alive()) {
                    writers.push(format!("n{id} (pid {}{flockd})", n.procs[&app].id));
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
        match self.rng.range(0, 13) {
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
            9 => {
                // flockd hangs (stopped, swapping, a long pause): it renews nothing, answers
                // nobody, and goes on later with what it had in memory.
                if self.up(id) {
                    let t = self.now + self.rng.range(500, 5000);
                    self.node(id).paused_until = t;
                    self.note(format!("n{id} flockd hangs until {t}"));
                }
            }
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
                // Also to a node holding a diverged copy of the app's dataset: the state
                // refuses such a move (its push would overwrite the kept writes).
                if let Some(m) = any {
                    let cmd = if self.rng.chance(0.1) {
                        Command::CancelAppMove { app }
                    } else {
                        Command::MoveApp { app, to }
                    };
                    let _ = self.propose(m, cmd);
                }
                // And now and then takes a snapshot of a dataset, on its primary, a moment
                // later (often in the middle of that move).
                if self.rng.chance(0.5) {
                    let datasets: Vec<(DatasetId, NodeId)> = self
                        .canonical
                        .datasets
                        .values()
                        .map(|d| (d.id, d.primary))
                        .collect();
                    if !datasets.is_empty() {
                        let (ds, node) = *self.rng.pick(&datasets);
                        let gen = self.nodes[&node].gen;
                        let at = self.rng.range(0, 3000);
                        self.at(at, Ev::OperatorSnapshot { node, gen, ds });
                    }
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
        n.recording.clear();
        n.operator_snapshots.clear();
        n.keeper = Keeper::default();
        n.paused_until = 0;
        // Its applied state survives (the state machine is on disk), and so does the lease
        // its watchdog enforces.
    }

    fn final_check(&mut self) -> Step {
        for (id, n) in &self.nodes {
            if !(n.machine_up && n.flockd_up) {
                return Err(self.violation(format!("n{id} is still down after the faults ended")));
            }
        }
        // Liveness: every node was heard steadily again and brought back up.
        for node in self.canonical.nodes.values() {
            if node.state == NodeState::Down {
                return Err(self.violation(format!(
                    "n{} is still declared down {} ms after the faults ended",
                    node.id, self.cfg.heal_ms
                )));
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
                        "dataset {}: n{h} holds {held} automatic snapshots, over the retention's bound {bound} (held {:?}, recorded {:?})",
                        ds.name,
                        c.snaps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
                        ds.snapshots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
                    )));
                }
            }
        }
        // The writes a failover lost from the new primary are kept on the old one, set aside
        // under a diverged- snapshot, which is recorded there.
        for ((ds, node), writes) in &self.diverged_writes {
            if writes.is_empty() || !self.canonical.datasets.contains_key(ds) {
                continue;
            }
            let n = &self.nodes[node];
            let kept: BTreeSet<u64> = n
                .asides
                .iter()
                .filter(|((d, snap), _)| d == ds && self.canonical.failover.keeps(*ds, *node, snap))
                .flat_map(|(_, c)| c.snaps.iter().flat_map(|s| s.data.iter().copied()))
                .collect();
            if let Some(w) = writes.iter().find(|w| !kept.contains(w)) {
                return Err(self.violation(format!(
                    "dataset {ds}: write {w}, acknowledged on n{node} and lost by a failover, is not in a diverged snapshot n{node} keeps ({} such writes, kept: {:?})",
                    writes.len(),
                    n.asides.keys().collect::<Vec<_>>()
                )));
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
