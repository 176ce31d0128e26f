//! Nemeses: the faults the harness injects, their seeded schedule, and carrying them out.
//!
//! - [`FaultKind`]: kill -9 and restart, pause and resume (`docker pause`), and partitions
//!   (halves, the leader isolated, a bridge node, a majorities ring), each with a
//!   leader-targeted variant where that means something.
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
use flock_proto::v1::StatusRequest;
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
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
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
        }
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
/// kinds such as `kill-leader` or `partition-ring`.
pub fn parse_nemeses(spec: &str) -> Result<Vec<FaultKind>, String> {
    let mut out: Vec<FaultKind> = Vec::new();
    for word in spec.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let kinds: Vec<FaultKind> = match word {
            "none" => vec![],
            "all" => FaultKind::ALL.to_vec(),
            "kill" => vec![FaultKind::Kill, FaultKind::KillLeader],
            "pause" => vec![FaultKind::Pause, FaultKind::PauseLeader],
            "partition" => vec![
                FaultKind::PartitionHalves,
                FaultKind::PartitionLeader,
                FaultKind::PartitionBridge,
                FaultKind::PartitionRing,
            ],
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
    Pause(Vec<String>),
    Partition {
        grudge: Grudge,
        desc: String,
    },
    /// Leader-targeted: resolved when it starts.
    Leader(FaultKind),
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
            FaultKind::Kill => Plan::Kill(some(&mut rng, &shuffled)),
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
    Paused(Vec<Node>),
    Partitioned,
}

/// Carries out faults on the cluster.
pub struct Nemesis {
    pub nodes: Vec<Node>,
    pub client: ClientConfig,
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

    /// Starts a planned fault; returns what is in effect and a description for the history.
    pub async fn start(&self, step: &Step) -> Result<(Active, String), DockerError> {
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
                    _ => {
                        let names: Vec<String> =
                            self.nodes.iter().map(|n| n.name.clone()).collect();
                        let parts = partition::isolate(&leader, &names);
                        Plan::Partition {
                            grudge: partition::components(&parts),
                            desc: partition::describe(&parts),
                        }
                    }
                }
            }
            p => p.clone(),
        };
        match plan {
            Plan::Kill(names) => {
                let mut hit = Vec::new();
                for name in &names {
                    let n = self.node(name)?;
                    docker::kill(n).await?;
                    hit.push(n.clone());
                }
                Ok((Active::Killed(hit), format!("kill -9 {}", names.join(" "))))
            }
            Plan::Pause(names) => {
                let mut hit = Vec::new();
                for name in &names {
                    let n = self.node(name)?;
                    docker::pause(n).await?;
                    hit.push(n.clone());
                }
                Ok((Active::Paused(hit), format!("pause {}", names.join(" "))))
            }
            Plan::Partition { grudge, desc } => {
                docker::apply_grudge(&self.nodes, &grudge).await?;
                Ok((Active::Partitioned, desc))
            }
            Plan::Leader(k) => Err(DockerError::Other(format!("unresolved plan {k}"))),
        }
    }

    /// Ends a fault: restarts killed nodes, resumes paused ones, heals the network.
    pub async fn stop(&self, active: &Active) -> Result<(), DockerError> {
        match active {
            Active::Nothing => {}
            Active::Killed(nodes) => {
                for n in nodes {
                    docker::start(n).await?;
                }
            }
            Active::Paused(nodes) => {
                for n in nodes {
                    docker::unpause(n).await?;
                }
            }
            Active::Partitioned => {
                for n in &self.nodes {
                    docker::heal(n).await?;
                }
            }
        }
        Ok(())
    }

    /// Undoes every fault whatever the bookkeeping says: resumes paused containers, starts
    /// stopped ones, removes every iptables rule. Returns what it had to do.
    pub async fn heal_all(&self) -> Result<Vec<String>, DockerError> {
        let mut done = Vec::new();
        for n in &self.nodes {
            match docker::state(n).await?.as_str() {
                "paused" => {
                    docker::unpause(n).await?;
                    done.push(format!("unpaused {}", n.name));
                }
                "exited" | "created" | "dead" => {
                    docker::start(n).await?;
                    done.push(format!("started {}", n.name));
                }
                _ => {}
            }
        }
        for n in &self.nodes {
            docker::heal(n).await?;
        }
        Ok(done)
    }
}

/// How the plan reads in the report: one line per step.
pub fn describe_plan(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .map(|s| {
            let what = match &s.plan {
                Plan::Kill(n) => format!("kill -9 {}", n.join(" ")),
                Plan::Pause(n) => format!("pause {}", n.join(" ")),
                Plan::Partition { desc, .. } => desc.clone(),
                Plan::Leader(_) => "the leader at that time".to_string(),
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
