//! The failover checker: a failover loses at most the acknowledged appends made after the
//! snapshot it starts from, and never lets two copies take appends.
//!
//! A pure function of the history ([`crate::workload::failover`] records it): the failover
//! workload's apps (those with a `fo_replicate` op), their `mv_append` ops (as the move
//! workload's: `ok` with the seq and the instance, the process, that took it), the final log
//! (the last `ok` `mv_read`), the cluster's `FailedOver` events read after the faults (the last
//! `ok` `fo_events`: each with its time of declaration `D`, its nodes, and the time `S` its
//! snapshot was taken, on the history's clock) and the nemesis events.
//!
//! **The rule.** An acknowledged append `w` (invoked at `i`, acknowledged at `c`) missing from
//! the final log was lost by the failover `F`: the first `FailedOver` of its app with `D > i`
//! (the first that can have ended the epoch `w` was written under). Then:
//!
//! - `c < S` (acknowledged, so fsync'ed, before `F`'s snapshot was begun: the snapshot holds
//!   it, and the new primary starts from it): **lost-before-snapshot**, a violation.
//! - otherwise (acknowledged after the snapshot began, or `F` started from no snapshot): an
//!   allowed loss, counted and listed per failover (it is in `F`'s at-risk window).
//! - no such `F`: **lost-write**, a violation (no failover explains it).
//!
//! `S` is the time in the snapshot's name (`auto-<UTC time to the ms>`, taken by flockd just
//! before it snapshots), else the event's `snapshot_unix` (seconds, rounded down; so `S` is
//! never after the moment the snapshot was taken). The nodes and the harness read the same
//! host clock. Further findings:
//!
//! - **acked-after-failover**: an instance that took an append acknowledged before `D` takes
//!   one invoked after `D`: the old primary's app outlived the declaration, which the leader
//!   makes only after the node's lease ran out (and the node fenced its apps).
//! - **concurrent-copies**, **wrong-seq**, **duplicate-seq**, **stale-copy**,
//!   **failed-write-present**, **duplicate-entry**, **foreign-entry**: the move checker's
//!   ([`super::moves`]), with the lost appends above left out of the seq findings (a copy that
//!   starts from an older snapshot hands their positions out again).
//! - **no-failover**: a fault aimed at the app's node (`kill-primary`, `kill-flockd-primary`,
//!   `pause-primary`, `partition-primary`) held for [`EXPECT_FAILOVER_HOLD_NS`] or longer, after
//!   the app had taken an append, with no `FailedOver` of the app from that node between the
//!   fault's start and [`FAILOVER_GRACE_NS`] after its end, and no `NoReplica` event of its
//!   dataset meanwhile (which says why it could not).
//!
//! Figures, per failover: the fault before it (the latest one started at or before `D`), when
//! the leader last heard from the old primary, `D`, the snapshot and its at-risk window, the
//! appends lost (allowed and not), and the first append acknowledged by the new primary (the
//! first by an instance that took none before `D`; direct ones on `F`'s new node): the time
//! from the fault's start to it; their median and maximum over the failovers.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::moves::{check_app, failover_apps, MoveAnomaly, MoveFigures, MoveVerdict};
use super::register::describe;
use super::{faults_during, kinds_of, validity, CheckResult, Checker};
use crate::history::{
    AppResult, Call, FailoverSeen, FaultInterval, History, NemesisEvent, NoReplicaSeen, Op, Outcome,
};

/// A fault aimed at the app's node held this long must make it fail over: the leader declares
/// a node down after 3.5 s without hearing from it; 4 s more for an election, a new leader's
/// first round of heartbeats and a loaded machine.
pub const EXPECT_FAILOVER_HOLD_NS: u64 = 7_500_000_000;
/// ... within this after the fault ended (the declaration may be committing as it ends).
pub const FAILOVER_GRACE_NS: u64 = 2_000_000_000;

/// The fault kinds aimed at the failover workload's app.
const AIMED: [&str; 4] = [
    "kill-primary",
    "kill-flockd-primary",
    "pause-primary",
    "partition-primary",
];

/// One failover of an app.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailoverFigure {
    pub from: String,
    pub to: String,
    pub epoch: u64,
    /// When it was declared (s since the start).
    pub at_s: f64,
    pub last_heard_s: Option<f64>,
    pub snapshot: Option<String>,
    pub snapshot_s: Option<f64>,
    pub at_risk_ms: u64,
    /// The fault before it: kind and detail, and its start.
    pub fault: String,
    pub fault_s: Option<f64>,
    /// From the fault's start to the declaration.
    pub declared_after_fault_s: Option<f64>,
    /// The first append the new primary acknowledged: when, and how long after the fault's
    /// start (and after the declaration).
    pub first_ack_s: Option<f64>,
    pub fault_to_first_ack_s: Option<f64>,
    pub declared_to_first_ack_s: Option<f64>,
    /// Acknowledged appends it lost: after the snapshot (allowed), before it (violations).
    pub lost_allowed: u64,
    pub lost_before_snapshot: u64,
    /// Of the allowed ones: acknowledged after the leader last heard from the old primary, so
    /// outside the window the event reports as at risk (the old primary's app runs on until
    /// its lease runs out and it is fenced).
    pub lost_after_last_heard: u64,
}

/// What the checker found about one app.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailoverFigures {
    pub acked: u64,
    pub lost_allowed: u64,
    pub lost_before_snapshot: u64,
    /// Allowed losses in failovers that started from no snapshot.
    pub lost_without_snapshot: u64,
    /// Allowed losses acknowledged after the leader last heard from the old primary.
    pub lost_after_last_heard: u64,
    pub failovers: Vec<FailoverFigure>,
    /// Over the failovers after which the new primary acknowledged an append.
    pub fault_to_first_ack_median_s: Option<f64>,
    pub fault_to_first_ack_max_s: Option<f64>,
    /// Failovers the cluster could not make (`NoReplica`).
    pub no_replica: Vec<String>,
    /// The move checker's figures of the app.
    pub appends: MoveFigures,
}

/// The failover checker's findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailoverVerdict {
    pub apps: BTreeMap<String, FailoverFigures>,
    pub anomalies: Vec<MoveAnomaly>,
    pub undecided: Vec<String>,
}

impl FailoverVerdict {
    pub fn valid(&self) -> Option<bool> {
        validity(&self.anomalies, &self.undecided)
    }

    /// Fault-to-first-ack times of every failover of every app, sorted.
    pub fn first_ack_times(&self) -> Vec<f64> {
        let mut t: Vec<f64> = self
            .apps
            .values()
            .flat_map(|a| a.failovers.iter().filter_map(|f| f.fault_to_first_ack_s))
            .collect();
        t.sort_by(f64::total_cmp);
        t
    }
}

/// The checker of the failover workload.
pub struct FailoverLosesOnlyAtRisk;

impl Checker for FailoverLosesOnlyAtRisk {
    fn name(&self) -> &'static str {
        "failover"
    }

    fn check(&self, history: &History) -> CheckResult {
        let v = check_failover(history);
        let sum = |f: &dyn Fn(&FailoverFigures) -> u64| v.apps.values().map(f).sum::<u64>();
        let times = v.first_ack_times();
        let failovers = sum(&|f| f.failovers.len() as u64);
        let figures = format!(
            "{failovers} failovers; from the fault to the first ack on the new primary {}; {} acknowledged appends, {} lost after the snapshot (allowed; {} in failovers from no snapshot; {} acknowledged after the leader last heard from the old primary, outside the at-risk window the event reports), {} lost before it",
            match (median(&times), times.last()) {
                (Some(m), Some(x)) => format!("median {m:.2}s, max {x:.2}s (over {})", times.len()),
                _ => "never measured".into(),
            },
            sum(&|f| f.acked),
            sum(&|f| f.lost_allowed),
            sum(&|f| f.lost_without_snapshot),
            sum(&|f| f.lost_after_last_heard),
            sum(&|f| f.lost_before_snapshot),
        );
        let no_replica: Vec<String> = v
            .apps
            .iter()
            .flat_map(|(a, f)| f.no_replica.iter().map(move |n| format!("{a} {n}")))
            .collect();
        let figures = if no_replica.is_empty() {
            figures
        } else {
            format!(
                "{figures}; {} failovers the cluster could not make (NoReplica, the app waited for its node): {}",
                no_replica.len(),
                no_replica.join("; ")
            )
        };
        let summary = match v.valid() {
            Some(true) => format!("{figures}; no two copies took appends"),
            Some(false) => format!(
                "{} findings ({}); {figures}",
                v.anomalies.len(),
                kinds_of(v.anomalies.iter().map(|a| a.kind.as_str())),
            ),
            None => format!("undecided: {}; {figures}", v.undecided.join("; ")),
        };
        CheckResult::new(self.name(), v.valid(), summary, &v)
    }
}

fn s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The median of sorted `t`.
pub fn median(t: &[f64]) -> Option<f64> {
    match t.len() {
        0 => None,
        n if n % 2 == 1 => Some(t[n / 2]),
        n => Some((t[n / 2 - 1] + t[n / 2]) / 2.0),
    }
}

/// Checks the failover workload's apps of `history`.
pub fn check_failover(history: &History) -> FailoverVerdict {
    let mut v = FailoverVerdict::default();
    let apps = failover_apps(history);
    if apps.is_empty() {
        v.undecided.push(
            "no failover-workload op in the history (the failover workload did not run)".into(),
        );
        return v;
    }
    let events = history
        .ops
        .iter()
        .filter(|o| matches!(o.call, Call::FoEvents {}) && o.outcome == Outcome::Ok)
        .max_by_key(|o| o.complete_ns)
        .and_then(|o| match &o.app {
            Some(AppResult::Failovers {
                failovers,
                no_replica,
            }) => Some((failovers.clone(), no_replica.clone())),
            _ => None,
        });
    let Some((failovers, no_replica)) = events else {
        v.undecided.push(
            "the cluster's events were never read after the faults: which failover lost what is unknown"
                .into(),
        );
        return v;
    };
    let faults = history.fault_intervals();
    let ops: Vec<&Op> = history
        .ops
        .iter()
        .filter(|o| o.call.is_move() && apps.contains(o.call.key()))
        .collect();
    for app in apps {
        let mut mine: Vec<&FailoverSeen> = failovers
            .iter()
            .filter(|f| f.apps.iter().any(|a| a == app) || f.dataset == app)
            .collect();
        mine.sort_by_key(|f| f.at_ns);
        let nr: Vec<&NoReplicaSeen> = no_replica.iter().filter(|n| n.dataset == app).collect();
        check_one(&mut v, app, &ops, &faults, &history.nemesis, &mine, &nr);
    }
    v
}

/// An acknowledged append.
struct Ack<'a> {
    op: &'a Op,
    value: &'a str,
    instance: &'a str,
}

fn check_one(
    v: &mut FailoverVerdict,
    app: &str,
    all: &[&Op],
    faults: &[FaultInterval],
    nemesis: &[NemesisEvent],
    failovers: &[&FailoverSeen],
    no_replica: &[&NoReplicaSeen],
) {
    let ops: Vec<&Op> = all
        .iter()
        .filter(|o| o.call.key() == app)
        .copied()
        .collect();
    let acks: Vec<Ack> = ops
        .iter()
        .filter_map(|o| match (&o.call, o.outcome, &o.app) {
            (
                Call::MvAppend { value, .. },
                Outcome::Ok,
                Some(AppResult::Appended { instance, .. }),
            ) => Some(Ack {
                op: o,
                value,
                instance,
            }),
            _ => None,
        })
        .collect();
    let mut fig = FailoverFigures {
        acked: acks.len() as u64,
        no_replica: no_replica
            .iter()
            .map(|n| format!("{:.1}s {}: {}", s(n.at_ns), n.node, n.reason))
            .collect(),
        ..Default::default()
    };
    let mut figs: Vec<FailoverFigure> = failovers
        .iter()
        .map(|f| FailoverFigure {
            from: f.from.clone(),
            to: f.to.clone(),
            epoch: f.epoch,
            at_s: s(f.at_ns),
            last_heard_s: f.last_heard_ns.map(s),
            snapshot: f.snapshot.clone(),
            snapshot_s: f.snapshot_ns.map(s),
            at_risk_ms: f.at_risk_ms,
            ..Default::default()
        })
        .collect();
    let mut anomaly = |kind: &str, count: usize, explanation: String| {
        v.anomalies.push(MoveAnomaly {
            app: app.to_string(),
            kind: kind.into(),
            count,
            explanation,
        });
    };

    // The final log's values (without it, the move checker says undecided).
    let final_log: Option<BTreeSet<&str>> = ops
        .iter()
        .filter(|o| matches!(o.call, Call::MvRead { .. }) && o.outcome == Outcome::Ok)
        .max_by_key(|o| o.complete_ns)
        .and_then(|o| match &o.app {
            Some(AppResult::Log { entries, .. }) => {
                Some(entries.iter().map(|(_, t)| t.as_str()).collect())
            }
            _ => None,
        });

    // Lost appends, each to the first failover declared after it was invoked.
    let mut excused: BTreeSet<&str> = BTreeSet::new();
    let mut before: BTreeMap<usize, Vec<&Op>> = BTreeMap::new();
    if let Some(log) = &final_log {
        for a in acks.iter().filter(|a| !log.contains(a.value)) {
            let Some(k) = failovers.iter().position(|f| f.at_ns > a.op.invoke_ns) else {
                continue; // lost-write, from the move checker's rules
            };
            excused.insert(a.value);
            match failovers[k].snapshot_ns {
                Some(snap) if a.op.complete_ns < snap => {
                    figs[k].lost_before_snapshot += 1;
                    fig.lost_before_snapshot += 1;
                    before.entry(k).or_default().push(a.op);
                }
                Some(_) => {
                    figs[k].lost_allowed += 1;
                    fig.lost_allowed += 1;
                    if failovers[k]
                        .last_heard_ns
                        .is_some_and(|h| a.op.complete_ns > h)
                    {
                        figs[k].lost_after_last_heard += 1;
                        fig.lost_after_last_heard += 1;
                    }
                }
                None => {
                    figs[k].lost_allowed += 1;
                    fig.lost_allowed += 1;
                    fig.lost_without_snapshot += 1;
                }
            }
        }
    }
    let witnesses = |os: &[&Op]| -> String {
        let mut t: String = os
            .iter()
            .take(4)
            .map(|o| format!("  {}\n", describe(o)))
            .collect();
        if os.len() > 4 {
            t.push_str(&format!("  ({} more)\n", os.len() - 4));
        }
        t
    };
    let said = |f: &FailoverSeen| {
        format!(
            "the failover of {} from {} to {} (epoch {}) declared at {:.3}s, from snapshot {} taken at {}, at risk {} ms",
            f.dataset,
            f.from,
            f.to,
            f.epoch,
            s(f.at_ns),
            f.snapshot.as_deref().unwrap_or("(none)"),
            f.snapshot_ns
                .map(|t| format!("{:.3}s", s(t)))
                .unwrap_or("-".into()),
            f.at_risk_ms
        )
    };
    for (k, os) in &before {
        anomaly(
            "lost-before-snapshot",
            os.len(),
            format!(
                "{app}: {} appends acknowledged before the snapshot of {} are not in the final log:\n{}  faults meanwhile: {}\n",
                os.len(),
                said(failovers[*k]),
                witnesses(os),
                faults_during(
                    faults,
                    os.iter().map(|o| o.invoke_ns).min().unwrap_or(0),
                    failovers[*k].at_ns
                )
            ),
        );
    }

    // acked-after-failover: an instance with an ack before D takes one invoked after D.
    for f in failovers {
        let old: BTreeSet<&str> = acks
            .iter()
            .filter(|a| a.op.complete_ns <= f.at_ns)
            .map(|a| a.instance)
            .collect();
        let late: Vec<&Op> = acks
            .iter()
            .filter(|a| a.op.invoke_ns > f.at_ns && old.contains(a.instance))
            .map(|a| a.op)
            .collect();
        if !late.is_empty() {
            anomaly(
                "acked-after-failover",
                late.len(),
                format!(
                    "{app}: an instance that took appends before {} took {} appends sent after it (it outlived its node's lease):\n{}",
                    said(f),
                    late.len(),
                    witnesses(&late)
                ),
            );
        }
    }

    // The new primary's first ack after each failover, and the fault before it.
    for (k, f) in failovers.iter().enumerate() {
        let fault = nemesis
            .iter()
            .filter(|e| {
                e.action == "start"
                    && e.time_ns <= f.at_ns
                    && !e.detail.contains("skipped")
                    && !e.detail.starts_with("failed")
            })
            .max_by_key(|e| e.time_ns);
        let old: BTreeSet<&str> = acks
            .iter()
            .filter(|a| a.op.complete_ns <= f.at_ns)
            .map(|a| a.instance)
            .collect();
        let first = acks
            .iter()
            .filter(|a| {
                a.op.complete_ns > f.at_ns
                    && !old.contains(a.instance)
                    && match &a.op.call {
                        Call::MvAppend { via, .. } if via == "direct" => a.op.node == f.to,
                        _ => true,
                    }
            })
            .min_by_key(|a| a.op.complete_ns);
        let g = &mut figs[k];
        if let Some(e) = fault {
            g.fault = format!("{} ({})", e.fault, e.detail);
            g.fault_s = Some(s(e.time_ns));
            g.declared_after_fault_s = Some(s(f.at_ns - e.time_ns));
        }
        if let Some(a) = first {
            g.first_ack_s = Some(s(a.op.complete_ns));
            g.declared_to_first_ack_s = Some(s(a.op.complete_ns - f.at_ns));
            g.fault_to_first_ack_s = fault.map(|e| s(a.op.complete_ns - e.time_ns));
        }
    }

    // no-failover: a fault aimed at the app's node, held long enough, and no failover.
    let first_ack = acks.iter().map(|a| a.op.complete_ns).min();
    for fi in faults
        .iter()
        .filter(|fi| AIMED.contains(&fi.fault.as_str()))
    {
        let Some(node) = aimed_node(&fi.detail, app) else {
            continue; // skipped, or aimed at another app
        };
        if fi.stop_ns.saturating_sub(fi.start_ns) < EXPECT_FAILOVER_HOLD_NS
            || first_ack.is_none_or(|t| t > fi.start_ns)
        {
            continue;
        }
        let window = fi.start_ns..=fi.stop_ns + FAILOVER_GRACE_NS;
        let failed_over = failovers
            .iter()
            .any(|f| f.from == node && window.contains(&f.at_ns));
        let explained = no_replica.iter().any(|n| window.contains(&n.at_ns));
        if !failed_over && !explained {
            let earlier = no_replica
                .iter()
                .filter(|n| n.at_ns < fi.start_ns)
                .max_by_key(|n| n.at_ns)
                .map(|n| {
                    format!(
                        "; earlier, at {:.1}s, the cluster could not fail it over from {}: {}",
                        s(n.at_ns),
                        n.node,
                        n.reason
                    )
                })
                .unwrap_or_default();
            anomaly(
                "no-failover",
                1,
                format!(
                    "{app}: {} ({}) held {:.1}s from {:.1}s, and {app} did not fail over from {node} (no FailedOver from it by {:.1}s, no NoReplica either){earlier}; its failovers before: {}\n",
                    fi.fault,
                    fi.detail,
                    s(fi.stop_ns - fi.start_ns),
                    s(fi.start_ns),
                    s(fi.stop_ns + FAILOVER_GRACE_NS),
                    failovers
                        .iter()
                        .filter(|f| f.at_ns < fi.start_ns)
                        .map(|f| format!("{:.1}s {}->{}", s(f.at_ns), f.from, f.to))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }

    let mut times: Vec<f64> = figs.iter().filter_map(|f| f.fault_to_first_ack_s).collect();
    times.sort_by(f64::total_cmp);
    fig.fault_to_first_ack_median_s = median(&times);
    fig.fault_to_first_ack_max_s = times.last().copied();
    fig.failovers = figs;

    // The move checker's rules, the losses above left to this checker.
    let mut mv = MoveVerdict::default();
    check_app(&mut mv, app, all, faults, &excused);
    v.anomalies.extend(mv.anomalies);
    v.undecided.extend(mv.undecided);
    if let Some(f) = mv.apps.remove(app) {
        fig.appends = f;
    }
    v.apps.insert(app.to_string(), fig);
}

/// One line per failover of a failover check's details (`verdict.json`'s `details`): the
/// fault before it, the declaration, the snapshot, the losses, the first ack on the new node.
pub fn describe_failovers(details: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let apps = details.get("apps").and_then(|a| a.as_object());
    for (app, f) in apps.into_iter().flatten() {
        for g in f
            .get("failovers")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
        {
            let x = |k: &str| g.get(k).and_then(|v| v.as_f64());
            let t = |k: &str| g.get(k).and_then(|v| v.as_str()).unwrap_or("");
            let secs = |v: Option<f64>| v.map(|v| format!("{v:.2}s")).unwrap_or("-".into());
            out.push(format!(
                "{app}: failover {} -> {} declared at {:.1}s ({} after the fault {}), from snapshot {} (at risk {} ms); lost {} allowed ({} after the old primary was last heard), {} before the snapshot; first ack on {} {} after the fault ({} after the declaration)",
                t("from"),
                t("to"),
                x("at_s").unwrap_or(0.0),
                secs(x("declared_after_fault_s")),
                t("fault"),
                g.get("snapshot").and_then(|v| v.as_str()).unwrap_or("(none)"),
                g.get("at_risk_ms").and_then(|v| v.as_u64()).unwrap_or(0),
                g.get("lost_allowed").and_then(|v| v.as_u64()).unwrap_or(0),
                g.get("lost_after_last_heard")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0),
                g.get("lost_before_snapshot").and_then(|v| v.as_u64()).unwrap_or(0),
                t("to"),
                secs(x("fault_to_first_ack_s")),
                secs(x("declared_to_first_ack_s")),
            ));
        }
    }
    out
}

/// The node a fault aimed at `app` hit, from its detail (`kill -9 n3 (runs jf-1)`,
/// `kill -9 flockd on n3 (runs jf-1)`, `pause n3 (runs jf-1)`, `n3 | n1 n2 n4 n5 (runs jf-1)`).
fn aimed_node(detail: &str, app: &str) -> Option<String> {
    let head = detail.strip_suffix(&format!(" (runs {app})"))?;
    if head.contains('|') {
        return head.split_whitespace().next().map(str::to_string);
    }
    head.split_whitespace().last().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testutil::{sorted_kinds, Builder};
    use crate::history::{AppResult, Call, FailoverSeen, Outcome};

    const A: &str = "jf-1";

    struct Failover;
    type H = Builder<Failover>;

    impl H {
        fn new() -> H {
            let mut h = H::start(1, 1);
            h.op(
                "n1",
                Call::FoReplicate {
                    app: A.into(),
                    replicas: 2,
                    interval_ms: 500,
                },
                Outcome::Ok,
                (0, 5),
                Some(AppResult::Replicated {
                    replicas: 2,
                    interval_ms: 500,
                }),
            );
            h
        }
        /// An acknowledged append at `seq` by instance `inst` (direct, on `node`).
        fn ok(&mut self, value: &str, seq: u64, inst: &str, node: &str, t: (u64, u64)) {
            self.op(
                node,
                Call::MvAppend {
                    app: A.into(),
                    value: value.into(),
                    via: "direct".into(),
                },
                Outcome::Ok,
                t,
                Some(AppResult::Appended {
                    seq,
                    instance: inst.into(),
                }),
            );
        }
        fn read(&mut self, log: &[&str], t: (u64, u64)) {
            let entries = log
                .iter()
                .enumerate()
                .map(|(i, v)| (i as u64 + 1, v.to_string()))
                .collect();
            self.op(
                "n2",
                Call::MvRead {
                    app: A.into(),
                    via: "direct".into(),
                },
                Outcome::Ok,
                t,
                Some(AppResult::Log {
                    instance: "i9".into(),
                    entries,
                }),
            );
        }
        /// The events: failovers (from, to, declared at ms, snapshot taken at ms).
        fn events(&mut self, fs: &[(&str, &str, u64, Option<u64>)], t: (u64, u64)) {
            let failovers = fs
                .iter()
                .enumerate()
                .map(|(i, (from, to, at, snap))| FailoverSeen {
                    id: i as u64,
                    dataset: A.into(),
                    apps: vec![A.into()],
                    from: from.to_string(),
                    to: to.to_string(),
                    epoch: i as u64 + 2,
                    at_ns: at * 1_000_000,
                    last_heard_ns: Some((at - 3500) * 1_000_000),
                    snapshot: snap.map(|t| format!("auto-{t}")),
                    snapshot_ns: snap.map(|t| t * 1_000_000),
                    ..Default::default()
                })
                .collect();
            self.op(
                "n3",
                Call::FoEvents {},
                Outcome::Ok,
                t,
                Some(AppResult::Failovers {
                    failovers,
                    no_replica: vec![],
                }),
            );
        }
        fn check(&self) -> FailoverVerdict {
            check_failover(&self.h)
        }
    }

    fn kinds(v: &FailoverVerdict) -> Vec<&str> {
        sorted_kinds(v.anomalies.iter().map(|a| a.kind.as_str()))
    }

    /// i1 on n1 takes w1..w4 (seqs 1..4); the snapshot is taken at 250 ms (after w2, before
    /// w3); n1 is killed at 1000 ms, declared down at 4500 ms, the app fails over to n2 from
    /// that snapshot; i2 on n2 takes w5 and w6 at seqs 3 and 4 (w3, w4 lost: allowed).
    fn good() -> H {
        let mut h = H::new();
        h.ok("w1", 1, "i1", "n1", (100, 110));
        h.ok("w2", 2, "i1", "n1", (200, 210));
        h.ok("w3", 3, "i1", "n1", (300, 310));
        h.ok("w4", 4, "i1", "n1", (400, 410));
        h.nemesis(1000, "start", "kill-primary", "kill -9 n1 (runs jf-1)");
        h.ok("w5", 3, "i2", "n2", (5000, 5010));
        h.ok("w6", 4, "i2", "n2", (5100, 5110));
        h.nemesis(9000, "stop", "kill-primary", "healed");
        h.nemesis(9500, "heal", "all", "");
        h.read(&["w1", "w2", "w5", "w6"], (10000, 10010));
        h.events(&[("n1", "n2", 4500, Some(250))], (10100, 10110));
        h
    }

    #[test]
    fn losses_after_the_snapshot_are_allowed_and_counted() {
        let v = good().check();
        assert_eq!(v.valid(), Some(true), "{v:#?}");
        let f = &v.apps[A];
        assert_eq!((f.acked, f.lost_allowed, f.lost_before_snapshot), (6, 2, 0));
        // Heard last at 1000 ms: both lost appends were acknowledged before.
        assert_eq!(f.lost_after_last_heard, 0);
        assert_eq!(f.failovers.len(), 1);
        let g = &f.failovers[0];
        assert_eq!(g.lost_allowed, 2);
        assert_eq!(g.fault_s, Some(1.0));
        assert!(
            (g.fault_to_first_ack_s.unwrap() - 4.01).abs() < 1e-9,
            "{g:?}"
        );
        assert!((g.declared_after_fault_s.unwrap() - 3.5).abs() < 1e-9);
        assert!((g.declared_to_first_ack_s.unwrap() - 0.51).abs() < 1e-9);
        assert!((f.fault_to_first_ack_max_s.unwrap() - 4.01).abs() < 1e-9);
        // Without the failover checker's excuse, the move checker's rules would call these
        // losses (and the reused seqs) findings.
        let mut mv = MoveVerdict::default();
        let h = good();
        let ops: Vec<&Op> = h.h.ops.iter().collect();
        check_app(&mut mv, A, &ops, &[], &BTreeSet::new());
        let k = sorted_kinds(mv.anomalies.iter().map(|a| a.kind.as_str()));
        assert!(
            k.contains(&"lost-write") && k.contains(&"duplicate-seq"),
            "{k:?}"
        );
        let r = FailoverLosesOnlyAtRisk.check(&good().h);
        assert_eq!(r.valid, Some(true));
        assert!(
            r.summary.contains("2 lost after the snapshot"),
            "{}",
            r.summary
        );
        assert!(r.summary.contains("median 4.01s"), "{}", r.summary);
    }

    #[test]
    fn losses_after_the_last_heartbeat_are_counted_apart() {
        // The old primary's app goes on after its node was last heard (1000 ms): w9 at 1500.
        let mut h = good();
        h.ok("w9", 5, "i1", "n1", (1500, 1510));
        let v = h.check();
        assert_eq!(v.valid(), Some(true), "{v:#?}");
        assert_eq!(v.apps[A].lost_allowed, 3);
        assert_eq!(v.apps[A].lost_after_last_heard, 1);
        assert_eq!(v.apps[A].failovers[0].lost_after_last_heard, 1);
    }

    #[test]
    fn a_loss_acknowledged_before_the_snapshot_is_a_violation() {
        // The snapshot was taken at 350 ms, after w3 was acknowledged: w3 must survive.
        let mut h = good();
        h.events(&[("n1", "n2", 4500, Some(350))], (10200, 10210));
        let v = h.check();
        assert_eq!(kinds(&v), vec!["lost-before-snapshot"], "{v:#?}");
        assert!(v.anomalies[0].explanation.contains("w3"));
        assert!(!v.anomalies[0].explanation.contains("w4"));
        assert_eq!(v.apps[A].lost_before_snapshot, 1);
        assert_eq!(v.apps[A].lost_allowed, 1);
    }

    #[test]
    fn a_loss_no_failover_explains_is_a_lost_write() {
        let mut h = good();
        h.events(&[], (10200, 10210));
        let v = h.check();
        let k = kinds(&v);
        assert!(k.contains(&"lost-write"), "{v:#?}");
    }

    #[test]
    fn two_writers_at_once_are_flagged() {
        // The old instance i1 goes on taking appends after i2 took some.
        let mut h = good();
        h.ok("w7", 5, "i1", "n1", (5200, 5210));
        h.ok("w8", 5, "i2", "n2", (5300, 5310));
        h.read(&["w1", "w2", "w5", "w6", "w8"], (10300, 10310));
        let v = h.check();
        let k = kinds(&v);
        assert!(k.contains(&"acked-after-failover"), "{k:?}");
        assert!(k.contains(&"concurrent-copies"), "{k:?}");
        let a = v
            .anomalies
            .iter()
            .find(|a| a.kind == "acked-after-failover")
            .unwrap();
        assert!(a.explanation.contains("w7"), "{}", a.explanation);
    }

    #[test]
    fn an_old_instance_acking_after_the_declaration_is_flagged_alone() {
        // i1 acknowledges an append sent after the declaration, before i2 took any: no two
        // copies took appends at once, but the old one outlived its lease. (The append is
        // lost, and no later failover explains that: a lost write too; and i2 handed its seq
        // out again: stale.)
        let mut h = good();
        h.ok("w7", 5, "i1", "n1", (4600, 4610));
        let v = h.check();
        assert_eq!(
            kinds(&v),
            vec!["acked-after-failover", "lost-write", "stale-copy"],
            "{v:#?}"
        );
    }

    #[test]
    fn a_survivor_at_another_seq_is_still_wrong() {
        let mut h = good();
        h.read(&["w2", "w1", "w5", "w6"], (10300, 10310));
        let v = h.check();
        assert!(kinds(&v).contains(&"wrong-seq"), "{v:#?}");
    }

    #[test]
    fn an_aimed_fault_without_a_failover_is_flagged() {
        let mut h = good();
        h.nemesis(20000, "start", "pause-primary", "pause n2 (runs jf-1)");
        h.nemesis(30000, "stop", "pause-primary", "healed");
        let v = h.check();
        assert_eq!(kinds(&v), vec!["no-failover"], "{v:#?}");
        assert!(v.anomalies[0].explanation.contains("from n2"));
        // Held too briefly to fail over: nothing expected.
        let mut h = good();
        h.nemesis(20000, "start", "pause-primary", "pause n2 (runs jf-1)");
        h.nemesis(25000, "stop", "pause-primary", "healed");
        assert_eq!(h.check().valid(), Some(true));
        // Skipped: nothing expected either.
        let mut h = good();
        h.nemesis(
            20000,
            "start",
            "partition-primary",
            "no node said where the app runs; skipped",
        );
        h.nemesis(30000, "stop", "partition-primary", "healed");
        assert_eq!(h.check().valid(), Some(true));
    }

    #[test]
    fn a_failover_from_no_snapshot_loses_everything_allowed() {
        let mut h = good();
        h.read(&["w5", "w6"], (10300, 10310));
        h.events(&[("n1", "n2", 4500, None)], (10400, 10410));
        // w5, w6 acknowledged at 3 and 4 but now at 1 and 2: the seqs came from a copy with
        // two entries; a failover from nothing would have given 1 and 2.
        let v = h.check();
        assert_eq!(v.apps[A].lost_without_snapshot, 4, "{v:#?}");
        assert!(kinds(&v).contains(&"wrong-seq"));
    }

    #[test]
    fn without_events_or_final_read_it_is_undecided() {
        let mut h = H::new();
        h.ok("w1", 1, "i1", "n1", (100, 110));
        assert_eq!(h.check().valid(), None);
        h.events(&[], (200, 210));
        let v = h.check();
        assert_eq!(v.valid(), None, "{v:#?}");
        assert!(v.undecided[0].contains("never read"), "{v:#?}");
        assert_eq!(check_failover(&History::default()).valid(), None);
    }

    #[test]
    fn aimed_nodes_parse() {
        assert_eq!(
            aimed_node("kill -9 n3 (runs jf-1)", A).as_deref(),
            Some("n3")
        );
        assert_eq!(
            aimed_node("kill -9 flockd on n3 (runs jf-1)", A).as_deref(),
            Some("n3")
        );
        assert_eq!(
            aimed_node("n4 | n1 n2 n3 n5 (runs jf-1)", A).as_deref(),
            Some("n4")
        );
        assert_eq!(aimed_node("pause n3 (runs jf-2)", A), None);
        assert_eq!(aimed_node("no leader known; skipped", A), None);
    }

    #[test]
    fn the_median_is_the_middle() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, 2.0, 9.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), Some(3.0));
    }
}
