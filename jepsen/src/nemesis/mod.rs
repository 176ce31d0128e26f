//! Nemeses: the faults the harness injects, their seeded schedule, and carrying them out.
//!
//! - [`FaultKind`]: kill -9 of a node's container and restart, kill -9 of flockd alone (its
//!   apps and fencing watchdog run on) and restart, pause and resume of flockd (SIGSTOP and
//!   SIGCONT from the host), and partitions (halves, the leader isolated, a bridge node, a
//!   majorities ring), with leader-targeted variants and, for the failover workload, variants
//!   aimed at the node that runs its app (the dataset's primary).
//! - [`schedule`]: from a seed, when each fault starts, how long it holds and whom it hits
//!   (pure: the same seed and nodes give the same plan).
//! - [`Nemesis`]: starts and stops faults on the docker cluster and records each as an event.
//!
//! One fault is active at a time; every fault is undone by [`Nemesis::heal_all`] at the end,
//! whatever happened in between.

pub mod partition;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use crate::client::{self, ClientConfig};
use crate::docker::{self, DockerError, Node};
use flock_proto::v1::{AppListRequest, StatusRequest};
use partition::Grudge;

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// kill -9 one or two random nodes (a minority), restart them when the fault ends.
    Kill,
    /// kill -9 the leader.
    KillLeader,
    /// Pause (SIGSTOP, from the host) the flockd of one or two random nodes; their apps run on.
    Pause,
    /// Pause the leader.
    PauseLeader,
    /// Two random halves, 2 | 3.
    PartitionHalves,
    /// The leader alone against the others.
    PartitionLeader,
    /// Two sides and one node that hears both.
    PartitionBridge,
    /// Every node hears a majority, no two the same majority.
    PartitionRing,
    /// kill -9 flockd alone on one or two random nodes (its apps and its fencing watchdog run
    /// on); start it again when the fault ends.
    KillFlockd,
    /// kill -9 the node (container) that runs a failover-workload app.
    KillPrimary,
    /// kill -9 flockd alone on the node that runs a failover-workload app.
    KillFlockdPrimary,
    /// Pause the flockd of the node that runs a failover-workload app.
    PausePrimary,
    /// The node that runs a failover-workload app alone against the others.
    PartitionPrimary,
}

impl FaultKind {
    pub const ALL: [FaultKind; 13] = [
        FaultKind::Kill,
        FaultKind::KillLeader,
        FaultKind::Pause,
        FaultKind::PauseLeader,
        FaultKind::PartitionHalves,
        FaultKind::PartitionLeader,
        FaultKind::PartitionBridge,
        FaultKind::PartitionRing,
        FaultKind::KillFlockd,
        FaultKind::KillPrimary,
        FaultKind::KillFlockdPrimary,
        FaultKind::PausePrimary,
        FaultKind::PartitionPrimary,
    ];

    /// The kinds the groups hold in every run (`kill`, `pause`, `partition`, `all`).
    const BASE: [FaultKind; 8] = [
        FaultKind::Kill,
        FaultKind::KillLeader,
        FaultKind::Pause,
        FaultKind::PauseLeader,
        FaultKind::PartitionHalves,
        FaultKind::PartitionLeader,
        FaultKind::PartitionBridge,
        FaultKind::PartitionRing,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::KillLeader => "kill-leader",
            FaultKind::Pause => "pause",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::PartitionHalves => "partition-halves",
            FaultKind::PartitionLeader => "partition-leader",
            FaultKind::PartitionBridge => "partition-bridge",
            FaultKind::PartitionRing => "partition-ring",
            FaultKind::KillFlockd => "kill-flockd",
            FaultKind::KillPrimary => "kill-primary",
            FaultKind::KillFlockdPrimary => "kill-flockd-primary",
            FaultKind::PausePrimary => "pause-primary",
            FaultKind::PartitionPrimary => "partition-primary",
        }
    }

    /// The group (`kill`, `pause`, `partition`) the kind belongs to.
    pub fn group(self) -> &'static str {
        match self {
            FaultKind::Kill
            | FaultKind::KillLeader
            | FaultKind::KillFlockd
            | FaultKind::KillPrimary
            | FaultKind::KillFlockdPrimary => "kill",
            FaultKind::Pause | FaultKind::PauseLeader | FaultKind::PausePrimary => "pause",
            _ => "partition",
        }
    }

    /// Aimed at the node that runs a failover-workload app.
    pub fn targets_primary(self) -> bool {
        matches!(
            self,
            FaultKind::KillPrimary
                | FaultKind::KillFlockdPrimary
                | FaultKind::PausePrimary
                | FaultKind::PartitionPrimary
        )
    }

    fn targets_leader(self) -> bool {
        matches!(
            self,
            FaultKind::KillLeader | FaultKind::PauseLeader | FaultKind::PartitionLeader
        )
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a comma-separated list of fault kinds and groups: `kill` (kill and kill-leader),
/// `pause` (pause and pause-leader), `partition` (every partition), `all`, `none`, or single
/// kinds such as `kill-leader` or `partition-ring`. The kinds `kill-flockd` and the
/// primary-targeted ones are in the groups only with [`parse_nemeses_for`] and a failover
/// workload; by name they are always accepted.
pub fn parse_nemeses(spec: &str) -> Result<Vec<FaultKind>, String> {
    parse_nemeses_for(spec, false)
}

/// [`parse_nemeses`]; with `failover` (the failover workload runs) the groups also hold
/// `kill-flockd` and the kinds aimed at its app's node: `kill` adds kill-flockd, kill-primary
/// and kill-flockd-primary, `pause` adds pause-primary, `partition` adds partition-primary.
pub fn parse_nemeses_for(spec: &str, failover: bool) -> Result<Vec<FaultKind>, String> {
    let in_groups: Vec<FaultKind> = if failover {
        FaultKind::ALL.to_vec()
    } else {
        FaultKind::BASE.to_vec()
    };
    let group = |g: &str| -> Vec<FaultKind> {
        in_groups
            .iter()
            .copied()
            .filter(|k| k.group() == g)
            .collect()
    };
    let mut out: Vec<FaultKind> = Vec::new();
    for word in spec.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let kinds: Vec<FaultKind> = match word {
            "none" => vec![],
            "all" => in_groups.clone(),
            "kill" | "pause" | "partition" => group(word),
            w => match FaultKind::ALL.iter().find(|k| k.name() == w) {
                Some(k) => vec![*k],
                None => {
                    return Err(format!(
                    "unknown nemesis {w:?}; use all, none, kill, pause, partition or one of: {}",
                    FaultKind::ALL.map(|k| k.name()).join(", ")
                ))
                }
            },
        };
        for k in kinds {
            if !out.contains(&k) {
                out.push(k);
            }
        }
    }
    Ok(out)
}

impl FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match parse_nemeses(s)?.as_slice() {
            [k] => Ok(*k),
            _ => Err(format!("{s:?} is not a single fault kind")),
        }
    }
}

/// A fault with its random choices made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Kill(Vec<String>),
    /// kill -9 of flockd alone on these nodes.
    KillFlockd(Vec<String>),
    Pause(Vec<String>),
    Partition {
        grudge: Grudge,
        desc: String,
    },
    /// Leader-targeted: resolved when it starts.
    Leader(FaultKind),
    /// Aimed at the node of a failover-workload app: resolved when it starts.
    Primary(FaultKind),
}

/// One fault of the schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Since the start of the workload.
    pub at: Duration,
    pub hold: Duration,
    pub kind: FaultKind,
    pub plan: Plan,
}

/// The seeded schedule: quiet for about `interval`, then a fault for about `hold` (each drawn
/// between half and one and a half times the figure), until `limit`.
pub fn schedule(
    kinds: &[FaultKind],
    nodes: &[String],
    seed: u64,
    limit: Duration,
    interval: Duration,
    hold: Duration,
) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    if kinds.is_empty() || nodes.is_empty() {
        return out;
    }
    let jitter = |rng: &mut StdRng, d: Duration| d.mul_f64(rng.random_range(0.5..1.5));
    let mut t = jitter(&mut rng, interval);
    let minority = (nodes.len() - 1) / 2;
    loop {
        let h = jitter(&mut rng, hold);
        if t + h > limit {
            break;
        }
        let Some(&kind) = kinds.choose(&mut rng) else {
            break;
        };
        let mut shuffled = nodes.to_vec();
        shuffled.shuffle(&mut rng);
        let some = |rng: &mut StdRng, s: &[String]| {
            let k = rng.random_range(1..=minority.max(1));
            let mut v = s[..k.min(s.len())].to_vec();
            v.sort();
            v
        };
        let plan = match kind {
            k if k.targets_leader() => Plan::Leader(k),
            k if k.targets_primary() => Plan::Primary(k),
            FaultKind::Kill => Plan::Kill(some(&mut rng, &shuffled)),
            FaultKind::KillFlockd => Plan::KillFlockd(some(&mut rng, &shuffled)),
            FaultKind::Pause => Plan::Pause(some(&mut rng, &shuffled)),
            FaultKind::PartitionHalves => {
                let parts = partition::halves(&shuffled);
                Plan::Partition {
                    grudge: partition::components(&parts),
                    desc: partition::describe(&parts),
                }
            }
            FaultKind::PartitionBridge => {
                let (grudge, desc) = partition::bridge(&shuffled);
                Plan::Partition { grudge, desc }
            }
            FaultKind::PartitionRing => {
                let (grudge, desc) = partition::majorities_ring(&shuffled);
                Plan::Partition { grudge, desc }
            }
            // Leader-targeted kinds are matched above.
            k => Plan::Leader(k),
        };
        out.push(Step {
            at: t,
            hold: h,
            kind,
            plan,
        });
        t += h + jitter(&mut rng, interval);
    }
    out
}

/// A fault in effect, with what it takes to undo it.
#[derive(Clone, Debug)]
pub enum Active {
    /// The fault could not be aimed (no leader known) and did nothing.
    Nothing,
    Killed(Vec<Node>),
    /// flockd killed alone on these nodes.
    FlockdKilled(Vec<Node>),
    Paused(Vec<Node>),
    Partitioned,
}

/// Carries out faults on the cluster.
pub struct Nemesis {
    pub nodes: Vec<Node>,
    pub client: ClientConfig,
    /// The apps whose node the primary-targeted kinds hit (the failover workload's).
    pub targets: Vec<String>,
}

impl Nemesis {
    fn node(&self, name: &str) -> Result<&Node, DockerError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| DockerError::Other(format!("unknown node {name}")))
    }

    /// The leader's name as some reachable node reports it.
    pub async fn leader(&self) -> Option<String> {
        for n in &self.nodes {
            let Ok(mut api) = client::connect(&n.api_addr(), &self.client).await else {
                continue;
            };
            let status = api.status(StatusRequest { local: false });
            if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(3), status).await {
                let name = reply.into_inner().leader_name;
                if !name.is_empty() {
                    return Some(name);
                }
            }
        }
        None
    }

    /// The node that runs one of [`Nemesis::targets`] (chosen by `pick`), as a linearizable
    /// `AppList` of some reachable node says, with the app's name.
    pub async fn primary(&self, pick: usize) -> Option<(String, String)> {
        if self.targets.is_empty() {
            return None;
        }
        let app = &self.targets[pick % self.targets.len()];
        for n in &self.nodes {
            let Ok(Ok(mut api)) = tokio::time::timeout(
                Duration::from_secs(3),
                client::connect(&n.api_addr(), &self.client),
            )
            .await
            else {
                continue;
            };
            let list = api.app_list(AppListRequest { name: app.clone() });
            if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(3), list).await {
                if let Some(a) = reply.into_inner().apps.into_iter().find(|a| &a.name == app) {
                    if !a.node.is_empty() {
                        return Some((a.node, app.clone()));
                    }
                }
            }
        }
        None
    }

    /// Starts a planned fault; returns what is in effect and a description for the history.
    /// A fault that could act on some of its nodes only is in effect on those, and says what
    /// failed; one that could act on none is an error (nothing to undo).
    pub async fn start(&self, step: &Step) -> Result<(Active, String), DockerError> {
        let mut aim = String::new();
        let plan = match &step.plan {
            Plan::Leader(kind) => {
                let leader = self.leader().await;
                let Some(leader) = leader else {
                    // No leader to target: skip, and say so.
                    return Ok((Active::Nothing, "no leader known; skipped".into()));
                };
                match kind {
                    FaultKind::KillLeader => Plan::Kill(vec![leader]),
                    FaultKind::PauseLeader => Plan::Pause(vec![leader]),
                    _ => self.isolating(&leader),
                }
            }
            Plan::Primary(kind) => {
                let Some((node, app)) = self.primary(step.at.as_millis() as usize).await else {
                    return Ok((
                        Active::Nothing,
                        if self.targets.is_empty() {
                            "no failover-workload app to aim at; skipped".into()
                        } else {
                            "no node said where the app runs; skipped".into()
                        },
                    ));
                };
                aim = format!(" (runs {app})");
                match kind {
                    FaultKind::KillPrimary => Plan::Kill(vec![node]),
                    FaultKind::KillFlockdPrimary => Plan::KillFlockd(vec![node]),
                    FaultKind::PausePrimary => Plan::Pause(vec![node]),
                    _ => self.isolating(&node),
                }
            }
            p => p.clone(),
        };
        let (active, desc) = match plan {
            Plan::Kill(names) => {
                let (hit, errors) = self.each(&names, docker::kill).await;
                (
                    Active::Killed(hit.clone()),
                    Self::said("kill -9", &hit, &errors)?,
                )
            }
            Plan::KillFlockd(names) => {
                let (hit, errors) = self.each(&names, docker::kill_flockd).await;
                (
                    Active::FlockdKilled(hit.clone()),
                    Self::said("kill -9 flockd on", &hit, &errors)?,
                )
            }
            Plan::Pause(names) => {
                let (hit, errors) = self.each(&names, docker::pause).await;
                (
                    Active::Paused(hit.clone()),
                    Self::said("pause", &hit, &errors)?,
                )
            }
            Plan::Partition { grudge, desc } => {
                if let Err(e) = docker::apply_grudge(&self.nodes, &grudge).await {
                    // Some rules may be in place: heal them now (best effort), then say so.
                    for n in &self.nodes {
                        let _ = docker::heal(n).await;
                    }
                    return Err(e);
                }
                (Active::Partitioned, desc)
            }
            Plan::Leader(k) | Plan::Primary(k) => {
                return Err(DockerError::Other(format!("unresolved plan {k}")))
            }
        };
        Ok((active, format!("{desc}{aim}")))
    }

    /// The partition that isolates `node`.
    fn isolating(&self, node: &str) -> Plan {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let parts = partition::isolate(node, &names);
        Plan::Partition {
            grudge: partition::components(&parts),
            desc: partition::describe(&parts),
        }
    }

    /// Runs `f` on each named node, going on after a failure: the nodes it acted on, and
    /// what failed.
    async fn each<'a, F, Fut>(&'a self, names: &[String], f: F) -> (Vec<Node>, Vec<String>)
    where
        F: Fn(&'a Node) -> Fut,
        Fut: std::future::Future<Output = Result<(), DockerError>>,
    {
        let mut hit = Vec::new();
        let mut errors = Vec::new();
        for name in names {
            match self.node(name) {
                Ok(n) => match f(n).await {
                    Ok(()) => hit.push(n.clone()),
                    Err(e) => errors.push(format!("{name}: {e}")),
                },
                Err(e) => errors.push(e.to_string()),
            }
        }
        (hit, errors)
    }

    /// `what n1 n2` (and what failed), or an error when no node was hit.
    fn said(what: &str, hit: &[Node], errors: &[String]) -> Result<String, DockerError> {
        if hit.is_empty() {
            return Err(DockerError::Other(errors.join("; ")));
        }
        let names: Vec<&str> = hit.iter().map(|n| n.name.as_str()).collect();
        let mut d = format!("{what} {}", names.join(" "));
        if !errors.is_empty() {
            d.push_str(&format!(" (could not act on: {})", errors.join("; ")));
        }
        Ok(d)
    }

    /// Ends a fault: restarts killed nodes and flockds, resumes paused ones, heals the
    /// network. Goes on after a failure and reports every one.
    pub async fn stop(&self, active: &Active) -> Result<(), DockerError> {
        let mut errors = Vec::new();
        match active {
            Active::Nothing => {}
            Active::Killed(nodes) => {
                for n in nodes {
                    if let Err(e) = docker::start(n).await {
                        errors.push(format!("{}: {e}", n.name));
                    }
                }
            }
            Active::FlockdKilled(nodes) => {
                for n in nodes {
                    if let Err(e) = self.revive(n).await {
                        errors.push(format!("{}: {e}", n.name));
                    }
                }
            }
            Active::Paused(nodes) => {
                for n in nodes {
                    if let Err(e) = docker::unpause(n).await {
                        errors.push(format!("{}: {e}", n.name));
                    }
                }
            }
            Active::Partitioned => {
                for n in &self.nodes {
                    if let Err(e) = docker::heal(n).await {
                        errors.push(format!("{}: {e}", n.name));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DockerError::Other(errors.join("; ")))
        }
    }

    /// Starts flockd again on a node whose flockd was killed alone: the supervisor's go file,
    /// or `docker start` if the whole container stopped meanwhile (an image without the
    /// supervisor, where flockd is pid 1).
    async fn revive(&self, n: &Node) -> Result<(), DockerError> {
        match docker::state(n).await?.as_str() {
            "exited" | "created" | "dead" => docker::start(n).await,
            _ => docker::restart_flockd(n).await,
        }
    }

    /// Undoes every fault whatever the bookkeeping says: resumes paused flockds, starts
    /// stopped containers and killed flockds, removes every iptables rule. Returns what it
    /// did, and what it could not do (it goes on after a failure: each call is bounded).
    pub async fn heal_all(&self) -> Vec<String> {
        let mut done = Vec::new();
        for n in &self.nodes {
            let state = match docker::state(n).await {
                Ok(s) => s,
                Err(e) => {
                    done.push(format!("COULD NOT inspect {}: {e}", n.name));
                    continue;
                }
            };
            let r = match state.as_str() {
                "exited" | "created" | "dead" => docker::start(n)
                    .await
                    .map(|()| format!("started {}", n.name)),
                "running" => match docker::flockd_runs(n).await {
                    Ok(false) => docker::restart_flockd(n)
                        .await
                        .map(|()| format!("restarted flockd on {}", n.name)),
                    // A stopped flockd (or none stopped) resumes: SIGCONT is harmless.
                    Ok(true) => docker::unpause(n).await.map(|()| String::new()),
                    Err(e) => Err(e),
                },
                _ => Ok(String::new()),
            };
            match r {
                Ok(s) if s.is_empty() => {}
                Ok(s) => done.push(s),
                Err(e) => done.push(format!("COULD NOT heal {}: {e}", n.name)),
            }
        }
        for n in &self.nodes {
            if let Err(e) = docker::heal(n).await {
                done.push(format!("COULD NOT flush the rules of {}: {e}", n.name));
            }
        }
        done
    }
}

/// How the plan reads in the report: one line per step.
pub fn describe_plan(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .map(|s| {
            let what = match &s.plan {
                Plan::Kill(n) => format!("kill -9 {}", n.join(" ")),
                Plan::KillFlockd(n) => format!("kill -9 flockd on {}", n.join(" ")),
                Plan::Pause(n) => format!("pause {}", n.join(" ")),
                Plan::Partition { desc, .. } => desc.clone(),
                Plan::Leader(_) => "the leader at that time".to_string(),
                Plan::Primary(_) => "the failover app's node at that time".to_string(),
            };
            format!(
                "{:>7.1}s +{:>4.1}s {:<17} {}",
                s.at.as_secs_f64(),
                s.hold.as_secs_f64(),
                s.kind.name(),
                what
            )
        })
        .collect()
}

/// Count of each kind in a schedule.
pub fn kinds_in(steps: &[Step]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for s in steps {
        *m.entry(s.kind.name()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn five() -> Vec<String> {
        (1..=5).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn groups_and_names_parse() {
        assert_eq!(
            parse_nemeses("kill,partition-ring").ok(),
            Some(vec![
                FaultKind::Kill,
                FaultKind::KillLeader,
                FaultKind::PartitionRing
            ])
        );
        assert_eq!(parse_nemeses("all").map(|v| v.len()).ok(), Some(8));
        assert_eq!(parse_nemeses("none").ok(), Some(vec![]));
        assert!(parse_nemeses("kill,flood").is_err());
    }

    #[test]
    fn with_the_failover_workload_the_groups_add_the_aimed_kinds() {
        let k = parse_nemeses_for("kill", true).unwrap_or_default();
        assert_eq!(
            k,
            vec![
                FaultKind::Kill,
                FaultKind::KillLeader,
                FaultKind::KillFlockd,
                FaultKind::KillPrimary,
                FaultKind::KillFlockdPrimary
            ]
        );
        assert_eq!(
            parse_nemeses_for("pause,partition", true)
                .unwrap_or_default()
                .len(),
            2 + 1 + 4 + 1
        );
        assert_eq!(
            parse_nemeses_for("all", true).map(|v| v.len()).ok(),
            Some(13)
        );
        // Without it, the groups are as they were; the kinds are there by name.
        assert_eq!(parse_nemeses("kill").map(|v| v.len()).ok(), Some(2));
        assert_eq!(
            parse_nemeses("kill-flockd,pause-primary").ok(),
            Some(vec![FaultKind::KillFlockd, FaultKind::PausePrimary])
        );
        // Aimed kinds are resolved when they start; kill-flockd hits a minority.
        let s = schedule(
            &[FaultKind::KillFlockd, FaultKind::PartitionPrimary],
            &five(),
            9,
            Duration::from_secs(500),
            Duration::from_secs(5),
            Duration::from_secs(5),
        );
        assert!(s.len() > 10);
        for step in s {
            match step.plan {
                Plan::KillFlockd(n) => assert!((1..=2).contains(&n.len())),
                Plan::Primary(k) => assert_eq!(k, FaultKind::PartitionPrimary),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let kinds = parse_nemeses("all").unwrap_or_default();
        let a = schedule(
            &kinds,
            &five(),
            42,
            Duration::from_secs(600),
            Duration::from_secs(10),
            Duration::from_secs(10),
        );
        let b = schedule(
            &kinds,
            &five(),
            42,
            Duration::from_secs(600),
            Duration::from_secs(10),
            Duration::from_secs(10),
        );
        let c = schedule(
            &kinds,
            &five(),
            43,
            Duration::from_secs(600),
            Duration::from_secs(10),
            Duration::from_secs(10),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.len() > 15, "{}", a.len());
        // Faults do not overlap and end before the limit.
        for w in a.windows(2) {
            assert!(w[0].at + w[0].hold < w[1].at);
        }
        let last = a.last().map(|s| s.at + s.hold).unwrap_or_default();
        assert!(last <= Duration::from_secs(600));
        // Every kind shows up in a long schedule.
        assert_eq!(kinds_in(&a).len(), 8, "{:?}", kinds_in(&a));
    }

    #[test]
    fn random_kills_and_pauses_hit_a_minority() {
        let s = schedule(
            &[FaultKind::Kill, FaultKind::Pause],
            &five(),
            7,
            Duration::from_secs(1000),
            Duration::from_secs(5),
            Duration::from_secs(5),
        );
        for step in s {
            match step.plan {
                Plan::Kill(n) | Plan::Pause(n) => assert!((1..=2).contains(&n.len())),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
