//! The app checker: a stateful app never runs on two nodes at once, and after the faults every
//! app of the final configuration runs exactly once, on its node, and nowhere else.
//!
//! A pure function of the history ([`crate::workload::app`] records it): the deploys with
//! their plans and outcomes, the polls of every node's `LocalApps` (what that node's agent
//! runs: each app's state and instance id, the process driver's pid), the `AppList` reads (the
//! desired state, read linearizably), and the nemesis events. An app *is seen running* on node
//! N at poll P when P's answer lists it with state `running`.
//!
//! - **running-twice** (stateful apps only: those with a volume). An instance is a (node, id)
//!   pair. If polls P1 and P2 of node N both saw instance (N, X) of app A running, with no poll
//!   of N in between that saw A not running or under another id, and no kill of N (or restart
//!   of N by the final heal) recorded between P1's invocation and P2's completion, then that
//!   instance ran without a break from P1's completion to P2's invocation: a process does not
//!   stop and resume, and its pid names no other process of N meanwhile (pids start over only
//!   after N's processes all died with its container, which only a kill or a restart does; the
//!   pid counter cannot wrap between two successive polls of N, which are a few hundred
//!   milliseconds apart while N answers, and a paused container starts nothing).
//!   If a poll of another node M, invoked and completed entirely inside that interval, saw A
//!   running, A ran on N and M at the same time: a violation, with the three polls that prove
//!   it. (A paused node's instance is frozen, not stopped: it counts as running.) Stateless apps
//!   may overlap for a moment while they move (stop here, start there, no fence): the same
//!   overlaps are counted for them, as notes.
//! - **wrong-count** / **misplaced**: F is the final configuration, the last `AppList` read
//!   after the heal, each app on the node the desired state places it on (while an app's
//!   dataset moves, `AppList` names the node it still runs on and the node it moves to: the
//!   latter). Every poll invoked later than `bound` after the heal, and the last poll
//!   of every node, must show every app of F placed on that node running and no other app
//!   running. An app of F running on a node F does not name is `misplaced` when no such poll of
//!   its own node saw it running, else `wrong-count` (it ran more than once); an app of F that
//!   such a poll of its own node saw not running, or an app F does not contain that runs
//!   somewhere, is `wrong-count`.
//! - **not-started**: an app of F never seen running on F's node in any poll after the heal,
//!   with the state and detail `AppList` gave for it.
//! - **config-mismatch**: F is the plan of the last acknowledged deploy, or of a deploy whose
//!   outcome is unknown (it may have taken effect at any time after it was invoked). Apps no
//!   deploy names (the move workload's, which ride along unpinned and move by `AppMove`) are
//!   left out of this comparison, and judged like the others otherwise.
//!
//! What the claim leans on: `LocalApps` answers from the node agent's view, which the agent
//! refreshes every 300 ms from the driver (which checks that each recorded pid is alive and is
//! still the same process) and updates right after it stops an instance. The apps of the
//! workload do not exit on their own, so an instance ends only when its node's agent stops it
//! (and the view says so at once) or when its node dies; a `running` in an answer therefore
//! means that instance had not ended when the node answered.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use super::register::describe;
use super::{faults_during, kinds_of, validity, CheckResult, Checker};
use crate::history::{AppResult, AppSeen, Call, History, Op, Outcome};

/// What the checker found about one app.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AppFigures {
    /// Has a volume (in some deploy that did not fail).
    pub stateful: bool,
    /// Deploys that did not fail and pinned it to another node than the one before.
    pub moves_asked: u64,
    /// Polls that saw it running.
    pub seen_running: u64,
    /// Distinct instances (node, id) seen running.
    pub instances: u64,
    /// Nodes it was seen running on.
    pub nodes: Vec<String>,
    /// The longest time between two polls that saw it running (anywhere), or from the last one
    /// to the end of the polls.
    pub longest_unseen_s: f64,
    /// Intervals in which one instance provably ran (two polls or more), and their total length.
    pub runs: u64,
    pub run_seconds: f64,
    /// Pairs of instances on two nodes seen running at the same time (a poll of one inside an
    /// interval of the other; stateful: violations; stateless: overlaps while moving, allowed).
    pub overlaps: u64,
    /// Its node and state in the final configuration.
    pub final_node: String,
    pub final_state: String,
}

/// One finding.
#[derive(Clone, Debug, Serialize)]
pub struct AppAnomaly {
    pub app: String,
    pub kind: String,
    /// The nodes concerned.
    pub nodes: Vec<String>,
    /// How many polls showed it.
    pub count: usize,
    pub explanation: String,
}

/// The app checker's findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AppVerdict {
    pub apps: BTreeMap<String, AppFigures>,
    pub anomalies: Vec<AppAnomaly>,
    pub undecided: Vec<String>,
    pub notes: Vec<String>,
    pub deploys_ok: u64,
    pub deploys_fail: u64,
    pub deploys_unknown: u64,
    pub polls_ok: u64,
    pub polls_fail: u64,
    pub lists_ok: u64,
    pub lists_fail: u64,
    /// Instance intervals of stateful apps (the running-twice claim's reach), and their length.
    pub stateful_runs: u64,
    pub stateful_run_seconds: f64,
    /// Seconds after the heal until the last poll of every node that began a clean stretch
    /// (lasting to its last poll) completed.
    pub converged_after_s: Option<f64>,
    pub final_generation: Option<u64>,
}

impl AppVerdict {
    pub fn valid(&self) -> Option<bool> {
        validity(&self.anomalies, &self.undecided)
    }
}

/// The checker of the app workload.
pub struct AppsRunRight {
    /// After the heal, every app must run exactly once on its node within this.
    pub bound: Duration,
}

impl Checker for AppsRunRight {
    fn name(&self) -> &'static str {
        "apps"
    }

    fn check(&self, history: &History) -> CheckResult {
        let v = check_apps(history, self.bound.as_nanos() as u64);
        let stateful = v.apps.values().filter(|a| a.stateful).count();
        let summary = match v.valid() {
            Some(true) => format!(
                "{} apps ({stateful} stateful) never seen running twice ({} instance intervals, {:.0} s) over {} deploys ({} ok) and {} polls; every app ran once on its node {}",
                v.apps.len(),
                v.stateful_runs,
                v.stateful_run_seconds,
                v.deploys_ok + v.deploys_fail + v.deploys_unknown,
                v.deploys_ok,
                v.polls_ok,
                match v.converged_after_s {
                    Some(t) => format!("{t:.1}s after the heal"),
                    None => "after the heal".to_string(),
                }
            ),
            Some(false) => format!(
                "{} findings ({}) in {} apps",
                v.anomalies.len(),
                kinds_of(v.anomalies.iter().map(|a| a.kind.as_str())),
                v.anomalies
                    .iter()
                    .map(|a| a.app.as_str())
                    .collect::<BTreeSet<_>>()
                    .len()
            ),
            None => format!("undecided: {}", v.undecided.join("; ")),
        };
        CheckResult::new(self.name(), v.valid(), summary, &v)
    }
}

/// What a poll saw, if it is an ok `LocalApps`.
fn local(op: &Op) -> Option<&[AppSeen]> {
    match (&op.call, op.outcome, &op.app) {
        (Call::AppLocal {}, Outcome::Ok, Some(AppResult::Local { apps })) => Some(apps),
        _ => None,
    }
}

/// The id of `app`'s instance if the poll saw it running.
fn running<'a>(op: &'a Op, app: &str) -> Option<&'a str> {
    local(op)?
        .iter()
        .find(|a| a.app == app && a.state == "running")
        .map(|a| a.id.as_str())
}

/// The state a poll saw `app` in (`absent` when not listed).
fn state_in(op: &Op, app: &str) -> String {
    local(op)
        .and_then(|apps| apps.iter().find(|a| a.app == app))
        .map(|a| {
            if a.detail.is_empty() {
                a.state.clone()
            } else {
                format!("{} ({})", a.state, a.detail)
            }
        })
        .unwrap_or_else(|| "absent".into())
}

/// Times at which node `n`'s processes may all have died and its pids started over: the start
/// of every kill that named it (or of a kill that failed, naming nobody), and the final heal
/// when it restarted it.
fn restarts(history: &History) -> (BTreeMap<String, Vec<u64>>, Vec<u64>) {
    let mut per: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut all = Vec::new();
    for e in &history.nemesis {
        if e.action == "start" && e.fault.starts_with("kill") {
            match e.detail.strip_prefix("kill -9 ") {
                Some(names) => {
                    for n in names.split_whitespace() {
                        per.entry(n.to_string()).or_default().push(e.time_ns);
                    }
                }
                None if e.detail.contains("skipped") => {}
                // A kill that failed may have killed some of its nodes.
                None => all.push(e.time_ns),
            }
        } else if e.action == "heal" {
            for part in e.detail.split(',') {
                if let Some(n) = part.trim().strip_prefix("started ") {
                    per.entry(n.trim().to_string()).or_default().push(e.time_ns);
                }
            }
        }
    }
    (per, all)
}

/// An interval in which one instance provably ran: from the completion of the first poll that
/// saw it to the invocation of the last, with every poll between.
struct Run<'a> {
    node: &'a str,
    id: &'a str,
    polls: Vec<&'a Op>,
}

impl Run<'_> {
    fn from(&self) -> u64 {
        self.polls[0].complete_ns
    }
    fn to(&self) -> u64 {
        self.polls[self.polls.len() - 1].invoke_ns
    }
}

/// Checks the app ops of `history` (others are ignored); `bound_ns`: see [`AppsRunRight`].
pub fn check_apps(history: &History, bound_ns: u64) -> AppVerdict {
    let mut v = AppVerdict::default();
    let ops: Vec<&Op> = history.ops.iter().filter(|o| o.call.is_app()).collect();
    if ops.is_empty() {
        v.undecided
            .push("no app op in the history (the app workload did not run)".into());
        return v;
    }
    let faults = history.fault_intervals();
    let mut deploys: Vec<&Op> = Vec::new();
    let mut lists: Vec<&Op> = Vec::new();
    let mut polls: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for o in &ops {
        match (&o.call, o.outcome) {
            (Call::AppDeploy { .. }, Outcome::Ok) => v.deploys_ok += 1,
            (Call::AppDeploy { .. }, Outcome::Fail) => v.deploys_fail += 1,
            (Call::AppDeploy { .. }, Outcome::Unknown) => v.deploys_unknown += 1,
            (Call::AppLocal {}, Outcome::Ok) => v.polls_ok += 1,
            (Call::AppLocal {}, _) => v.polls_fail += 1,
            (Call::AppList {}, Outcome::Ok) => v.lists_ok += 1,
            (Call::AppList {}, _) => v.lists_fail += 1,
            _ => {}
        }
        match &o.call {
            Call::AppDeploy { .. } => deploys.push(o),
            Call::AppList {} => lists.push(o),
            Call::AppLocal {} if local(o).is_some() => {
                polls.entry(o.node.as_str()).or_default().push(o);
            }
            _ => {}
        }
    }
    deploys.sort_by_key(|o| o.invoke_ns);
    lists.sort_by_key(|o| o.complete_ns);
    for p in polls.values_mut() {
        p.sort_by_key(|o| o.invoke_ns);
    }
    let mut nodes: BTreeSet<&str> = history
        .meta
        .as_ref()
        .map(|m| m.nodes.iter().map(String::as_str).collect())
        .unwrap_or_default();
    nodes.extend(ops.iter().map(|o| o.node.as_str()));

    // Apps and whether they are stateful: every app of a deploy that did not fail, or that a
    // list showed.
    let mut stateful: BTreeMap<&str, bool> = BTreeMap::new();
    let mut moves_asked: BTreeMap<&str, u64> = BTreeMap::new();
    let mut prev: Option<&BTreeMap<String, crate::history::AppPin>> = None;
    for d in &deploys {
        let Call::AppDeploy { apps } = &d.call else {
            continue;
        };
        if d.outcome == Outcome::Fail {
            continue;
        }
        for (name, pin) in apps {
            *stateful.entry(name).or_default() |= pin.volume;
            if prev
                .and_then(|p| p.get(name))
                .is_some_and(|p| p.node != pin.node)
            {
                *moves_asked.entry(name).or_default() += 1;
            }
        }
        prev = Some(apps);
    }
    for l in &lists {
        if let (Outcome::Ok, Some(AppResult::List { apps, .. })) = (l.outcome, &l.app) {
            for a in apps {
                *stateful.entry(a.app.as_str()).or_default() |= !a.dataset.is_empty();
            }
        }
    }
    for ps in polls.values() {
        for p in ps {
            for a in local(p).unwrap_or_default() {
                stateful.entry(a.app.as_str()).or_default();
            }
        }
    }

    let (restart_at, restart_all) = restarts(history);
    let broken = |node: &str, from: u64, to: u64| -> bool {
        restart_at
            .get(node)
            .into_iter()
            .flatten()
            .chain(restart_all.iter())
            .any(|t| (from..=to).contains(t))
    };
    let end_of_polls = polls
        .values()
        .flatten()
        .map(|o| o.complete_ns)
        .max()
        .unwrap_or(0);

    // Instances and the intervals in which each provably ran; then polls of other nodes inside
    // them.
    for (&app, &is_stateful) in &stateful {
        let mut fig = AppFigures {
            stateful: is_stateful,
            moves_asked: moves_asked.get(app).copied().unwrap_or(0),
            ..Default::default()
        };
        let mut runs: Vec<Run> = Vec::new();
        let mut instances: BTreeSet<(&str, &str)> = BTreeSet::new();
        let mut seen_at: Vec<u64> = Vec::new();
        for (&node, ps) in &polls {
            let mut cur: Option<Run> = None;
            for p in ps {
                match running(p, app) {
                    Some(id) => {
                        fig.seen_running += 1;
                        instances.insert((node, id));
                        seen_at.push(p.complete_ns);
                        let extends = cur.as_ref().is_some_and(|r| {
                            r.id == id
                                && !broken(
                                    node,
                                    r.polls[r.polls.len() - 1].invoke_ns,
                                    p.complete_ns,
                                )
                        });
                        if extends {
                            if let Some(r) = cur.as_mut() {
                                r.polls.push(p);
                            }
                        } else {
                            runs.extend(cur.take().filter(|r| r.polls.len() > 1));
                            cur = Some(Run {
                                node,
                                id,
                                polls: vec![p],
                            });
                        }
                    }
                    None => runs.extend(cur.take().filter(|r| r.polls.len() > 1)),
                }
            }
            runs.extend(cur.take().filter(|r| r.polls.len() > 1));
        }
        fig.instances = instances.len() as u64;
        fig.nodes = instances
            .iter()
            .map(|(n, _)| n.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        seen_at.sort_unstable();
        if let Some(&first) = seen_at.first() {
            let mut prev = first;
            let mut longest = 0u64;
            for &t in seen_at.iter().chain(std::iter::once(&end_of_polls)) {
                longest = longest.max(t.saturating_sub(prev));
                prev = prev.max(t);
            }
            fig.longest_unseen_s = longest as f64 / 1e9;
        }
        fig.runs = runs.len() as u64;
        fig.run_seconds = runs
            .iter()
            .map(|r| r.to().saturating_sub(r.from()) as f64 / 1e9)
            .sum();
        if is_stateful {
            v.stateful_runs += fig.runs;
            v.stateful_run_seconds += fig.run_seconds;
        }
        // Each pair of instances once (either one's interval may hold the other's poll):
        // {(node, id), (node, id)} -> (the run's instance, the other's, first witness, count).
        type Instance<'a> = (&'a str, &'a str);
        let mut twice: BTreeMap<(Instance, Instance), (Instance, Instance, String, usize)> =
            BTreeMap::new();
        for r in &runs {
            let (from, to) = (r.from(), r.to());
            for (&other, ps) in polls.iter().filter(|(n, _)| **n != r.node) {
                for q in ps
                    .iter()
                    .filter(|q| q.invoke_ns >= from && q.complete_ns <= to)
                {
                    let Some(y) = running(q, app) else {
                        continue;
                    };
                    let (a, b) = ((r.node, r.id), (other, y));
                    let key = if a <= b { (a, b) } else { (b, a) };
                    let e = twice.entry(key).or_insert_with(|| {
                        let before = r
                            .polls
                            .iter()
                            .rev()
                            .find(|p| p.complete_ns <= q.invoke_ns)
                            .unwrap_or(&r.polls[0]);
                        let after = r
                            .polls
                            .iter()
                            .find(|p| p.invoke_ns >= q.complete_ns)
                            .unwrap_or(&r.polls[r.polls.len() - 1]);
                        (
                            a,
                            b,
                            format!(
                                "  {}\n  {}\n  {}\n  faults meanwhile: {}\n",
                                describe(before),
                                describe(q),
                                describe(after),
                                faults_during(&faults, before.invoke_ns, after.complete_ns)
                            ),
                            0,
                        )
                    });
                    e.3 += 1;
                }
            }
        }
        fig.overlaps = twice.len() as u64;
        for ((n, x), (m, y), witness, count) in twice.into_values() {
            if is_stateful {
                let mut pair = vec![n.to_string(), m.to_string()];
                pair.sort();
                v.anomalies.push(AppAnomaly {
                    app: app.to_string(),
                    kind: "running-twice".into(),
                    nodes: pair,
                    count,
                    explanation: format!(
                        "stateful app {app} ran on {n} and {m} at the same time: {n}'s instance {x} was seen running before and after a poll of {m} saw instance {y} running, and {n} was not killed or restarted in between ({count} such polls):\n{witness}"
                    ),
                });
            } else if v.notes.len() < 20 {
                v.notes.push(format!(
                    "stateless app {app}: {m}'s instance {y} was seen running while {n}'s instance {x} still ran ({count} polls; allowed while it moves)"
                ));
            }
        }
        v.apps.insert(app.to_string(), fig);
    }

    // After the heal.
    let Some(heal) = history
        .nemesis
        .iter()
        .filter(|e| e.action == "heal")
        .map(|e| e.time_ns)
        .max()
    else {
        v.undecided
            .push("no heal in the history: the state after the faults cannot be judged".into());
        return v;
    };
    let Some((fin_op, generation, fin)) = lists
        .iter()
        .filter(|o| o.invoke_ns >= heal)
        .filter_map(|o| match (&o.outcome, &o.app) {
            (Outcome::Ok, Some(AppResult::List { generation, apps })) => {
                Some((*o, *generation, apps))
            }
            _ => None,
        })
        .next_back()
    else {
        v.undecided
            .push("no app list was read after the heal: the final configuration is unknown".into());
        return v;
    };
    v.final_generation = Some(generation);
    let want: BTreeMap<&str, &AppSeen> = fin.iter().map(|a| (a.app.as_str(), a)).collect();
    for (name, a) in &want {
        let fig = v.apps.entry(name.to_string()).or_default();
        fig.final_node = a.desired().to_string();
        fig.final_state = if a.moving_to.is_empty() {
            a.state.clone()
        } else {
            format!("{} on {}, moving", a.state, a.node)
        };
    }

    // config-mismatch: F is the plan of the last acknowledged deploy or of an unknown one.
    let placement: BTreeMap<&str, &str> =
        fin.iter().map(|a| (a.app.as_str(), a.desired())).collect();
    let last_ok = deploys.iter().rposition(|d| d.outcome == Outcome::Ok);
    let candidates: Vec<&Op> = deploys
        .iter()
        .enumerate()
        .filter(|(i, d)| Some(*i) == last_ok || d.outcome == Outcome::Unknown)
        .map(|(_, d)| *d)
        .collect();
    let plan_of = |d: &Op| -> BTreeMap<String, String> {
        match &d.call {
            Call::AppDeploy { apps } => apps
                .iter()
                .map(|(a, p)| (a.clone(), p.node.clone()))
                .collect(),
            _ => BTreeMap::new(),
        }
    };
    // Apps no deploy of this workload names belong to another workload (the move workload's,
    // deployed unpinned with these deploys and moved by its own calls): not part of the plans.
    let planned: BTreeSet<&str> = deploys
        .iter()
        .filter_map(|d| match &d.call {
            Call::AppDeploy { apps } => Some(apps.keys().map(String::as_str)),
            _ => None,
        })
        .flatten()
        .collect();
    let placed: BTreeMap<String, String> = placement
        .iter()
        .filter(|(a, _)| planned.is_empty() || planned.contains(**a))
        .map(|(a, n)| (a.to_string(), n.to_string()))
        .collect();
    if !candidates.is_empty() && !candidates.iter().any(|d| plan_of(d) == placed) {
        v.anomalies.push(AppAnomaly {
            app: "*".into(),
            kind: "config-mismatch".into(),
            nodes: Vec::new(),
            count: 1,
            explanation: format!(
                "the final configuration (generation {generation}) is not the plan of the last acknowledged deploy nor of any deploy of unknown outcome:\n  {}\n  last acknowledged: {}\n",
                describe(fin_op),
                last_ok
                    .map(|i| describe(deploys[i]))
                    .unwrap_or_else(|| "none".into())
            ),
        });
    }

    // The polls judged: every poll invoked after the bound, and each node's last poll.
    let after_heal: BTreeMap<&str, Vec<&Op>> = polls
        .iter()
        .map(|(n, ps)| {
            (
                *n,
                ps.iter().filter(|p| p.invoke_ns >= heal).copied().collect(),
            )
        })
        .collect();
    for n in &nodes {
        if after_heal.get(n).is_none_or(|p| p.is_empty()) {
            v.undecided.push(format!(
                "{n} answered no LocalApps poll after the heal: what it runs is unknown"
            ));
        }
    }
    let clean = |p: &Op| -> bool {
        let apps = local(p).unwrap_or_default();
        let ok_running = apps
            .iter()
            .filter(|a| a.state == "running")
            .all(|a| placement.get(a.app.as_str()) == Some(&p.node.as_str()));
        let all_there = placement
            .iter()
            .filter(|(_, n)| **n == p.node)
            .all(|(a, _)| running(p, a).is_some());
        ok_running && all_there
    };
    // converged_after_s: the latest completion, over the nodes, of the first poll of the clean
    // stretch each node's polls end with.
    let mut converged: Option<u64> = Some(heal);
    for ps in after_heal.values() {
        let start = ps.iter().rposition(|p| !clean(p)).map_or(0, |i| i + 1);
        match ps.get(start) {
            Some(p) => converged = converged.map(|c| c.max(p.complete_ns)),
            None => converged = None,
        }
    }
    v.converged_after_s = converged.map(|c| c.saturating_sub(heal) as f64 / 1e9);

    let judged: Vec<&Op> = after_heal
        .values()
        .flat_map(|ps| {
            let last = ps.last().copied();
            ps.iter()
                .filter(move |p| {
                    p.invoke_ns >= heal.saturating_add(bound_ns)
                        || last.is_some_and(|l| l.index == p.index)
                })
                .copied()
        })
        .collect();
    // Per app: the judged polls that saw it elsewhere, that saw it on its own node, that saw it
    // missing on its own node.
    let mut elsewhere: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    let mut at_home: BTreeSet<&str> = BTreeSet::new();
    let mut missing: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for p in &judged {
        for a in local(p).unwrap_or_default() {
            if a.state == "running" {
                if placement.get(a.app.as_str()) == Some(&p.node.as_str()) {
                    at_home.insert(a.app.as_str());
                } else {
                    elsewhere.entry(a.app.as_str()).or_default().push(p);
                }
            }
        }
        for (app, _) in placement.iter().filter(|(_, n)| **n == p.node) {
            if running(p, app).is_none() {
                missing.entry(app).or_default().push(p);
            }
        }
    }
    let bound_s = bound_ns as f64 / 1e9;
    let witnesses = |ps: &[&Op]| -> String {
        ps.iter()
            .take(3)
            .map(|p| format!("  {}\n", describe(p)))
            .collect::<String>()
    };
    let nodes_of = |ps: &[&Op]| -> Vec<String> {
        ps.iter()
            .map(|p| p.node.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    for (app, a) in &want {
        let home = a.desired();
        let ever_home = after_heal
            .get(home)
            .is_some_and(|ps| ps.iter().any(|p| running(p, app).is_some()));
        if !ever_home && after_heal.get(home).is_some_and(|ps| !ps.is_empty()) {
            let last = after_heal.get(home).and_then(|ps| ps.last());
            v.anomalies.push(AppAnomaly {
                app: app.to_string(),
                kind: "not-started".into(),
                nodes: vec![home.to_string()],
                count: after_heal.get(home).map_or(0, Vec::len),
                explanation: format!(
                    "app {app} of the final configuration (generation {generation}) never ran on {home} after the heal: the app list says {}{}; {home}'s last poll says {}\n  {}\n{}",
                    a.state,
                    if a.detail.is_empty() { String::new() } else { format!(" ({})", a.detail) },
                    last.map(|p| state_in(p, app)).unwrap_or_default(),
                    describe(fin_op),
                    last.map(|p| format!("  {}\n", describe(p))).unwrap_or_default()
                ),
            });
        }
        if let Some(ps) = elsewhere.get(app) {
            let kind = if at_home.contains(app) {
                "wrong-count"
            } else {
                "misplaced"
            };
            v.anomalies.push(AppAnomaly {
                app: app.to_string(),
                kind: kind.into(),
                nodes: nodes_of(ps),
                count: ps.len(),
                explanation: format!(
                    "app {app} of the final configuration (on {home}, generation {generation}) ran on {} {}after the heal and the bound ({bound_s:.0}s, or at the end):\n{}",
                    nodes_of(ps).join(", "),
                    if kind == "wrong-count" { format!("as well as on {home} ") } else { String::new() },
                    witnesses(ps)
                ),
            });
        } else if let Some(ps) = missing.get(app).filter(|_| ever_home) {
            v.anomalies.push(AppAnomaly {
                app: app.to_string(),
                kind: "wrong-count".into(),
                nodes: vec![home.to_string()],
                count: ps.len(),
                explanation: format!(
                    "app {app} of the final configuration (on {home}, generation {generation}) did not run at all after the heal and the bound ({bound_s:.0}s, or at the end): {home}'s poll says {}\n{}",
                    state_in(ps[0], app),
                    witnesses(ps)
                ),
            });
        }
    }
    for (app, ps) in &elsewhere {
        if want.contains_key(app) {
            continue;
        }
        v.anomalies.push(AppAnomaly {
            app: app.to_string(),
            kind: "wrong-count".into(),
            nodes: nodes_of(ps),
            count: ps.len(),
            explanation: format!(
                "app {app} is not in the final configuration (generation {generation}) but ran on {} after the heal and the bound ({bound_s:.0}s, or at the end):\n{}",
                nodes_of(ps).join(", "),
                witnesses(ps)
            ),
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testutil::{ms, sorted_kinds, Builder};
    use crate::history::{AppPin, Record, RunMeta};

    const S: &str = "ja-s1";
    const L: &str = "ja-l1";

    /// The app workload's ops, numbered from 0, of process 0, after the run's meta.
    struct Apps;
    type H = Builder<Apps>;

    impl H {
        fn new() -> H {
            let mut h = H::start(0, 0);
            h.h.push(Record::Meta(RunMeta {
                seed: 1,
                workload: "app".into(),
                read_mode: "linearizable".into(),
                nemeses: vec![],
                nodes: vec!["n1".into(), "n2".into(), "n3".into()],
                started: String::new(),
                key_prefix: String::new(),
                t0_unix_ns: None,
            }));
            h
        }
        /// A deploy of `pins` (app, node, stateful).
        fn deploy(&mut self, pins: &[(&str, &str, bool)], outcome: Outcome, t: (u64, u64)) {
            let apps = pins
                .iter()
                .map(|(a, n, v)| {
                    (
                        a.to_string(),
                        AppPin {
                            node: n.to_string(),
                            volume: *v,
                            what: String::new(),
                        },
                    )
                })
                .collect();
            self.op(
                "n1",
                Call::AppDeploy { apps },
                outcome,
                t,
                (outcome == Outcome::Ok).then(|| AppResult::Deployed {
                    generation: 1,
                    changes: vec![],
                }),
            );
        }
        /// A poll of `node` seeing `apps` (app, state, id).
        fn poll(&mut self, node: &str, apps: &[(&str, &str, &str)], t: (u64, u64)) {
            let apps = apps
                .iter()
                .map(|(a, s, id)| AppSeen {
                    app: a.to_string(),
                    state: s.to_string(),
                    id: id.to_string(),
                    ..Default::default()
                })
                .collect();
            self.op(
                node,
                Call::AppLocal {},
                Outcome::Ok,
                t,
                Some(AppResult::Local { apps }),
            );
        }
        /// An AppList showing `apps` (app, node, state, detail).
        fn list(&mut self, apps: &[(&str, &str, &str, &str)], t: (u64, u64)) {
            let apps = apps
                .iter()
                .map(|(a, n, s, d)| AppSeen {
                    app: a.to_string(),
                    node: n.to_string(),
                    state: s.to_string(),
                    detail: d.to_string(),
                    dataset: if a.contains("-s") {
                        a.to_string()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                })
                .collect();
            self.op(
                "n2",
                Call::AppList {},
                Outcome::Ok,
                t,
                Some(AppResult::List {
                    generation: 2,
                    apps,
                }),
            );
        }
        fn check(&self) -> AppVerdict {
            check_apps(&self.h, ms(10_000))
        }
    }

    fn kinds(v: &AppVerdict) -> Vec<&str> {
        sorted_kinds(v.anomalies.iter().map(|a| a.kind.as_str()))
    }

    /// S moves from n1 to n2 and L from n2 to n3, cleanly; then the heal and a good end.
    fn good() -> H {
        let mut h = H::new();
        h.deploy(&[(S, "n1", true), (L, "n2", false)], Outcome::Ok, (0, 10));
        h.poll("n1", &[(S, "running", "11")], (100, 110));
        h.poll("n2", &[(L, "running", "21")], (100, 110));
        h.poll("n1", &[(S, "running", "11")], (200, 210));
        h.deploy(
            &[(S, "n2", true), (L, "n3", false)],
            Outcome::Ok,
            (250, 260),
        );
        h.poll("n1", &[], (300, 310));
        h.poll(
            "n2",
            &[(S, "waiting", ""), (L, "running", "21")],
            (300, 310),
        );
        h.poll("n2", &[(S, "running", "22")], (400, 410));
        h.poll("n3", &[(L, "running", "31")], (400, 410));
        h.nemesis(500, "heal", "all", "nothing left to undo");
        h.list(
            &[(S, "n2", "running", ""), (L, "n3", "running", "")],
            (510, 520),
        );
        h.poll("n1", &[], (600, 610));
        h.poll("n2", &[(S, "running", "22")], (600, 610));
        h.poll("n3", &[(L, "running", "31")], (600, 610));
        h.list(
            &[(S, "n2", "running", ""), (L, "n3", "running", "")],
            (700, 710),
        );
        h
    }

    #[test]
    fn a_clean_move_is_valid() {
        let v = good().check();
        assert_eq!(v.valid(), Some(true), "{v:#?}");
        assert_eq!(v.apps[S].instances, 2);
        assert_eq!(v.apps[S].moves_asked, 1);
        assert!(v.apps[S].stateful && !v.apps[L].stateful);
        assert_eq!(v.final_generation, Some(2));
        assert!(v.converged_after_s.is_some());
        assert_eq!(v.deploys_ok, 2);
    }

    /// n1's instance of S is seen before and after n2's: ran twice.
    fn overlap(app: &str, stateful: bool, kill: bool) -> AppVerdict {
        let mut h = H::new();
        h.deploy(&[(app, "n1", stateful)], Outcome::Ok, (0, 10));
        h.poll("n1", &[(app, "running", "11")], (100, 110));
        h.deploy(&[(app, "n2", stateful)], Outcome::Ok, (150, 160));
        if kill {
            h.nemesis(180, "start", "kill", "kill -9 n1");
            h.nemesis(190, "stop", "kill", "healed");
        }
        h.poll("n2", &[(app, "running", "22")], (200, 210));
        h.poll("n1", &[(app, "running", "11")], (300, 310));
        h.poll("n1", &[], (400, 410));
        h.nemesis(500, "heal", "all", "nothing left to undo");
        h.list(&[(app, "n2", "running", "")], (510, 520));
        h.poll("n1", &[], (600, 610));
        h.poll("n2", &[(app, "running", "22")], (600, 610));
        h.poll("n3", &[], (600, 610));
        h.check()
    }

    #[test]
    fn a_stateful_app_seen_on_two_nodes_at_once_ran_twice() {
        let v = overlap(S, true, false);
        assert_eq!(kinds(&v), vec!["running-twice"], "{v:#?}");
        let a = &v.anomalies[0];
        assert_eq!(a.nodes, vec!["n1", "n2"]);
        assert!(a.explanation.contains("instance 11"), "{}", a.explanation);
        assert!(a.explanation.contains("instance 22"), "{}", a.explanation);
    }

    #[test]
    fn a_stateless_overlap_is_only_a_note() {
        let v = overlap(L, false, false);
        assert_eq!(v.valid(), Some(true), "{v:#?}");
        assert_eq!(v.notes.len(), 1, "{:?}", v.notes);
        assert_eq!(v.apps[L].overlaps, 1);
    }

    #[test]
    fn a_kill_between_the_two_polls_breaks_the_instance() {
        // n1's pid 11 after the restart may be another process: n1's polls prove no interval,
        // and n2's instance is seen only once.
        for kill in [false, true] {
            let mut h = H::new();
            h.deploy(&[(S, "n1", true)], Outcome::Ok, (0, 10));
            h.poll("n1", &[(S, "running", "11")], (100, 110));
            if kill {
                h.nemesis(180, "start", "kill", "kill -9 n1 n3");
                h.nemesis(190, "stop", "kill", "healed");
            }
            h.poll("n2", &[(S, "running", "22")], (200, 210));
            h.poll("n1", &[(S, "running", "11")], (300, 310));
            let v = h.check();
            assert_eq!(
                kinds(&v).contains(&"running-twice"),
                !kill,
                "kill {kill}: {v:#?}"
            );
        }
    }

    #[test]
    fn a_restarted_node_running_an_app_that_moved_away_runs_it_twice() {
        // n1 restarts after the app moved to n2 and runs it again while n2's instance runs.
        let v = overlap(S, true, true);
        assert_eq!(kinds(&v), vec!["running-twice"], "{v:#?}");
        assert!(v.anomalies[0]
            .explanation
            .contains("n2's instance 22 was seen running before and after"));
    }

    #[test]
    fn another_id_or_a_stop_in_between_breaks_the_instance() {
        for between in [(S, "running", "12"), (S, "exited", "11")] {
            let mut h = H::new();
            h.deploy(&[(S, "n1", true)], Outcome::Ok, (0, 10));
            h.poll("n1", &[(S, "running", "11")], (100, 110));
            h.poll("n1", &[between], (150, 160));
            h.poll("n2", &[(S, "running", "22")], (200, 210));
            h.poll("n1", &[(S, "running", "11")], (300, 310));
            let v = h.check();
            assert!(!kinds(&v).contains(&"running-twice"), "{between:?}: {v:#?}");
        }
    }

    #[test]
    fn a_poll_not_entirely_inside_the_interval_proves_nothing() {
        let mut h = H::new();
        h.deploy(&[(S, "n1", true)], Outcome::Ok, (0, 10));
        h.poll("n1", &[(S, "running", "11")], (100, 200));
        // Invoked before the first poll completed: it may have been answered before it.
        h.poll("n2", &[(S, "running", "22")], (150, 250));
        h.poll("n1", &[(S, "running", "11")], (300, 310));
        let v = h.check();
        assert!(!kinds(&v).contains(&"running-twice"), "{v:#?}");
    }

    #[test]
    fn after_the_bound_each_app_runs_once_on_its_node() {
        // S also on n1 at the end: wrong-count; L only on n2 (F says n3): misplaced; an app
        // not in F running: wrong-count.
        let mut h = good();
        h.poll(
            "n1",
            &[(S, "running", "13"), ("ja-x", "running", "14")],
            (800, 810),
        );
        h.poll("n3", &[], (800, 810));
        h.poll(
            "n2",
            &[(S, "running", "22"), (L, "running", "23")],
            (800, 810),
        );
        let v = h.check();
        assert_eq!(
            kinds(&v),
            vec!["misplaced", "wrong-count", "wrong-count"],
            "{v:#?}"
        );
        let misplaced = v.anomalies.iter().find(|a| a.kind == "misplaced").unwrap();
        assert_eq!(
            (misplaced.app.as_str(), misplaced.nodes.clone()),
            (L, vec!["n2".to_string()])
        );
        assert!(v
            .anomalies
            .iter()
            .any(|a| a.app == "ja-x" && a.explanation.contains("not in the final")));
    }

    #[test]
    fn a_wrong_state_before_the_bound_is_allowed_but_not_after() {
        // Within the bound (10 s) after the heal, S briefly not running on n2: fine.
        let mut h = good();
        h.poll("n2", &[(S, "restarting", "22")], (650, 660));
        h.poll("n2", &[(S, "running", "24")], (700, 710));
        assert_eq!(h.check().valid(), Some(true));
        // After the bound, not running on n2: wrong-count, and n2's last poll shows it too.
        h.poll("n2", &[(S, "restarting", "")], (11_000, 11_010));
        let v = h.check();
        assert_eq!(kinds(&v), vec!["wrong-count"], "{v:#?}");
        assert!(v.anomalies[0].explanation.contains("restarting"));
    }

    #[test]
    fn an_app_that_never_ran_on_its_node_after_the_heal_was_not_started() {
        let mut h = H::new();
        h.deploy(&[(S, "n1", true)], Outcome::Ok, (0, 10));
        h.poll("n1", &[(S, "running", "11")], (100, 110));
        h.deploy(&[(S, "n2", true)], Outcome::Unknown, (150, 160));
        h.nemesis(500, "heal", "all", "started n3");
        h.poll("n1", &[], (600, 610));
        h.poll("n2", &[(S, "waiting", "")], (600, 610));
        h.poll("n3", &[], (600, 610));
        h.list(
            &[(
                S,
                "n2",
                "waiting",
                "waiting for dataset ja-s1 to arrive on this node",
            )],
            (700, 710),
        );
        let v = h.check();
        assert_eq!(kinds(&v), vec!["not-started"], "{v:#?}");
        assert!(v.anomalies[0].explanation.contains("waiting for dataset"));
    }

    #[test]
    fn the_final_configuration_must_be_one_that_was_deployed() {
        let mut h = good();
        h.list(
            &[(S, "n3", "running", ""), (L, "n3", "running", "")],
            (900, 910),
        );
        h.poll(
            "n3",
            &[(S, "running", "33"), (L, "running", "31")],
            (950, 960),
        );
        h.poll("n2", &[], (950, 960));
        let v = h.check();
        assert!(kinds(&v).contains(&"config-mismatch"), "{v:#?}");
        // A deploy of unknown outcome may be the one in force.
        let mut h = good();
        h.deploy(
            &[(S, "n3", true), (L, "n3", false)],
            Outcome::Unknown,
            (880, 890),
        );
        h.list(
            &[(S, "n3", "running", ""), (L, "n3", "running", "")],
            (900, 910),
        );
        h.poll(
            "n3",
            &[(S, "running", "33"), (L, "running", "31")],
            (950, 960),
        );
        h.poll("n2", &[], (950, 960));
        let v = h.check();
        assert_eq!(v.valid(), Some(true), "{v:#?}");
    }

    #[test]
    fn another_workloads_app_is_judged_but_not_part_of_the_plans() {
        // M (the move workload's) is in no deploy's plan; it runs on n1, then on n2.
        const M: &str = "jm-1";
        let run = |twice: bool| {
            let mut h = H::new();
            h.deploy(&[(S, "n1", true)], Outcome::Ok, (0, 10));
            h.poll(
                "n1",
                &[(S, "running", "11"), (M, "running", "12")],
                (100, 110),
            );
            h.poll("n2", &[], (150, 160));
            h.poll("n1", &[(S, "running", "11")], (200, 210));
            h.poll("n2", &[(M, "running", "21")], (250, 260));
            if twice {
                h.poll(
                    "n1",
                    &[(S, "running", "11"), (M, "running", "12")],
                    (300, 310),
                );
                h.poll("n2", &[(M, "running", "21")], (320, 330));
                h.poll(
                    "n1",
                    &[(S, "running", "11"), (M, "running", "12")],
                    (340, 350),
                );
            }
            h.nemesis(500, "heal", "all", "nothing left to undo");
            h.list(
                &[(S, "n1", "running", ""), (M, "n2", "running", "")],
                (510, 520),
            );
            // M has a dataset: stateful.
            if let Some(AppResult::List { apps, .. }) =
                h.h.ops.last_mut().and_then(|o| o.app.as_mut())
            {
                apps[1].dataset = M.into();
            }
            h.poll("n1", &[(S, "running", "11")], (600, 610));
            h.poll("n2", &[(M, "running", "21")], (600, 610));
            h.poll("n3", &[], (600, 610));
            h.check()
        };
        let v = run(false);
        assert_eq!(v.valid(), Some(true), "{v:#?}");
        assert!(v.apps[M].stateful);
        assert_eq!(v.apps[M].final_node, "n2");
        let v = run(true);
        assert_eq!(kinds(&v), vec!["running-twice"], "{v:#?}");
        assert_eq!(v.anomalies[0].app, M);
    }

    #[test]
    fn an_app_still_moving_at_the_end_is_misplaced() {
        // The desired state puts S on n2; its dataset is still moving there and S runs on n1.
        let mut h = H::new();
        h.deploy(&[(S, "n1", true)], Outcome::Ok, (0, 10));
        h.deploy(&[(S, "n2", true)], Outcome::Ok, (100, 110));
        h.nemesis(500, "heal", "all", "nothing left to undo");
        h.poll("n1", &[(S, "running", "11")], (600, 610));
        h.poll("n2", &[], (600, 610));
        h.poll("n3", &[], (600, 610));
        h.list(
            &[(S, "n1", "running", "moving to n2: handing off")],
            (700, 710),
        );
        if let Some(AppResult::List { apps, .. }) = h.h.ops.last_mut().and_then(|o| o.app.as_mut())
        {
            apps[0].moving_to = "n2".into();
        }
        let v = h.check();
        // It never ran on n2 after the heal either.
        assert_eq!(kinds(&v), vec!["misplaced", "not-started"], "{v:#?}");
        assert_eq!(v.apps[S].final_node, "n2");
    }

    #[test]
    fn a_node_never_polled_after_the_heal_is_undecided() {
        let mut h = H::new();
        h.deploy(&[(S, "n1", true)], Outcome::Ok, (0, 10));
        h.nemesis(500, "heal", "all", "nothing left to undo");
        h.list(&[(S, "n1", "running", "")], (510, 520));
        h.poll("n1", &[(S, "running", "11")], (600, 610));
        h.poll("n2", &[], (600, 610));
        let v = h.check();
        assert_eq!(v.valid(), None, "{v:#?}");
        assert!(v.undecided[0].contains("n3"));
    }
}
