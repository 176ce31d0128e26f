//! The move checker: no acknowledged write to a moving app was lost, and no two copies of it
//! ever accepted writes at once.
//!
//! A pure function of the history ([`crate::workload::moves`] records it): the `mv_append` ops
//! (each value unique; `ok` with the seq the test app acknowledged and the instance, the
//! process, that took it; `fail` when the append was never sent; `unknown` when it was sent and
//! no `OK` came back), the moves and cancels, the locates, and the app's whole log read after
//! the faults (`mv_read`, the last `ok` one of each app: *the final log*), once the app ran in
//! one place. Findings, per app:
//!
//! - **lost-write**: a value acknowledged `OK <seq>` is not in the final log.
//! - **wrong-seq**: a value acknowledged `OK <seq>` is in the final log, but not at that seq
//!   (the seq holds another value: the position it was given went to another write).
//! - **duplicate-seq**: two acknowledgements with the same seq for different values: two copies
//!   handed out the same position.
//! - **stale-copy**: an append acknowledged at a seq not above that of an append acknowledged
//!   before it was sent (real-time order): it went to a copy that lacked the earlier entry.
//! - **concurrent-copies**: instance J acknowledged an append invoked after instance I
//!   acknowledged one and completed before I took another: both accepted writes at once. (I
//!   took its first append by that completion and its last after that invocation, and a
//!   process that stopped does not come back: the instance names one process.)
//! - **failed-write-present**: a value whose append certainly was not sent is in the final log.
//! - **duplicate-entry**: a value is in the final log more than once (an acknowledged value
//!   exactly once, at its seq; a value of unknown outcome at most once).
//! - **foreign-entry**: the final log holds a value no append sent, or its seqs are not 1..n.
//!
//! Figures: appends ok/fail/unknown, values of unknown outcome found and not found, acks per
//! instance (and the nodes it was reached through), moves asked, and each accepted move's fate
//! (`committed`: a later `AppList` showed the app on its target with no move in progress;
//! `cancelled`: a cancel was acknowledged first; `superseded`: another move was acknowledged
//! first; `unresolved`), with the longest time without an acknowledged append around it (from
//! the move's invocation to the next move or cancel: the downtime the move, and any fault
//! meanwhile, caused).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::register::describe;
use super::{faults_during, kinds_of, validity, CheckResult, Checker};
use crate::history::{AppResult, Call, FaultInterval, History, Op, Outcome};

/// One accepted move. Its window runs from its invocation to the next move or cancel that
/// was not refused (or the end of the appends).
#[derive(Clone, Debug, Default, Serialize)]
pub struct MoveFigure {
    /// When it was asked (seconds since the start).
    pub at_s: f64,
    pub from: String,
    pub to: String,
    /// `committed`, `cancelled`, `superseded` or `unresolved`.
    pub fate: String,
    /// The longest time without an acknowledged append of the app that overlaps the window
    /// from this move's invocation to the next move or cancel (or the end of the appends).
    pub gap_s: f64,
    pub gap_from_s: f64,
    pub gap_to_s: f64,
    /// Faults during that gap.
    pub faults: String,
    /// The handoff: from the last acknowledged append before the first one taken by another
    /// instance (direct: on the target) after the move was asked, to that one. `None` when no
    /// other instance took an append before the next move or cancel.
    pub handoff_s: Option<f64>,
    pub handoff_at_s: Option<f64>,
}

/// Acknowledgements of one instance (process) of the app.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InstanceFigure {
    pub instance: String,
    /// The nodes its appends went through (direct: the node it ran on).
    pub nodes: Vec<String>,
    pub acks: u64,
    pub first_s: f64,
    pub last_s: f64,
    pub seqs: (u64, u64),
}

/// What the checker found about one app.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MoveFigures {
    pub acked: u64,
    pub failed: u64,
    pub unknown: u64,
    /// Values of unknown outcome in the final log, and not in it.
    pub unknown_present: u64,
    pub unknown_absent: u64,
    pub final_entries: u64,
    pub final_node: String,
    pub final_instance: String,
    pub moves_ok: u64,
    pub moves_fail: u64,
    pub moves_unknown: u64,
    pub cancels_ok: u64,
    pub cancels_fail: u64,
    pub cancels_unknown: u64,
    pub committed: u64,
    pub cancelled: u64,
    pub superseded: u64,
    pub unresolved: u64,
    /// The longest time without an acknowledged append (the appends' span).
    pub longest_gap_s: f64,
    pub longest_gap_from_s: f64,
    pub longest_gap_to_s: f64,
    pub moves: Vec<MoveFigure>,
    pub instances: Vec<InstanceFigure>,
}

/// One finding.
#[derive(Clone, Debug, Serialize)]
pub struct MoveAnomaly {
    pub app: String,
    pub kind: String,
    /// How many cases (values, seqs, pairs) it covers.
    pub count: usize,
    pub explanation: String,
}

/// The move checker's findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MoveVerdict {
    pub apps: BTreeMap<String, MoveFigures>,
    pub anomalies: Vec<MoveAnomaly>,
    pub undecided: Vec<String>,
}

impl MoveVerdict {
    pub fn valid(&self) -> Option<bool> {
        validity(&self.anomalies, &self.undecided)
    }
}

/// The checker of the move workload.
pub struct NoWriteLost;

impl Checker for NoWriteLost {
    fn name(&self) -> &'static str {
        "moves"
    }

    fn check(&self, history: &History) -> CheckResult {
        let v = check_moves(history);
        let sum = |f: &dyn Fn(&MoveFigures) -> u64| v.apps.values().map(f).sum::<u64>();
        let summary = match v.valid() {
            Some(true) => format!(
                "{} acknowledged appends ({} unknown, {} failed) all in the final log at their seq, no two copies took writes at once; {} moves asked ({} committed, {} cancelled, {} superseded, {} unresolved, {} refused), {} instances",
                sum(&|f| f.acked),
                sum(&|f| f.unknown),
                sum(&|f| f.failed),
                sum(&|f| f.moves_ok + f.moves_fail + f.moves_unknown),
                sum(&|f| f.committed),
                sum(&|f| f.cancelled),
                sum(&|f| f.superseded),
                sum(&|f| f.unresolved),
                sum(&|f| f.moves_fail),
                sum(&|f| f.instances.len() as u64),
            ),
            Some(false) => format!(
                "{} findings ({}) over {} acknowledged appends",
                v.anomalies.len(),
                kinds_of(v.anomalies.iter().map(|a| a.kind.as_str())),
                sum(&|f| f.acked)
            ),
            None => format!("undecided: {}", v.undecided.join("; ")),
        };
        CheckResult::new(self.name(), v.valid(), summary, &v)
    }
}

fn s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// An acknowledged append.
struct Ack<'a> {
    op: &'a Op,
    value: &'a str,
    seq: u64,
    instance: &'a str,
}

/// The longest gap between successive times in `times` (sorted) that overlaps `[from, to]`.
fn longest_gap(times: &[u64], from: u64, to: u64) -> (u64, u64) {
    let mut best = (from, from);
    for w in times.windows(2) {
        let (a, b) = (w[0], w[1]);
        if b > from && a < to && b - a > best.1 - best.0 {
            best = (a, b);
        }
    }
    best
}

/// The failover workload's apps: those it asked replicas for (`fo_replicate`).
pub fn failover_apps(history: &History) -> BTreeSet<&str> {
    history
        .ops
        .iter()
        .filter(|o| matches!(o.call, Call::FoReplicate { .. }))
        .map(|o| o.call.key())
        .collect()
}

/// The move workload's apps (not the failover workload's) in `history`.
pub fn move_apps(history: &History) -> BTreeSet<&str> {
    let failover = failover_apps(history);
    let ops: Vec<&Op> = history.ops.iter().filter(|o| o.call.is_move()).collect();
    apps_of(&ops)
        .into_iter()
        .filter(|a| !failover.contains(a))
        .collect()
}

/// The apps that the move-workload calls among `ops` name.
pub(crate) fn apps_of<'a>(ops: &[&'a Op]) -> BTreeSet<&'a str> {
    let mut apps: BTreeSet<&str> = BTreeSet::new();
    for o in ops {
        match &o.call {
            Call::MvDeploy { apps: names } => apps.extend(names.iter().map(String::as_str)),
            c => {
                if c.key() != "*" {
                    apps.insert(c.key());
                }
            }
        }
    }
    apps
}

/// Checks the move workload's ops of `history` (others are ignored, and so are the failover
/// workload's apps, which [`crate::checker::failover`] judges).
pub fn check_moves(history: &History) -> MoveVerdict {
    let mut v = MoveVerdict::default();
    let failover = failover_apps(history);
    let ops: Vec<&Op> = history
        .ops
        .iter()
        .filter(|o| o.call.is_move() && !failover.contains(o.call.key()))
        .collect();
    let apps: BTreeSet<&str> = apps_of(&ops)
        .into_iter()
        .filter(|a| !failover.contains(a))
        .collect();
    if apps.is_empty() {
        v.undecided
            .push("no move-workload op in the history (the move workload did not run)".into());
        return v;
    }
    let faults = history.fault_intervals();
    for app in apps {
        check_app(&mut v, app, &ops, &faults, &BTreeSet::new());
    }
    v
}

/// Checks one app. `excused`: acknowledged values whose absence from the final log is judged
/// elsewhere (the failover checker: lost in a failover). They make no `lost-write`, and no
/// `duplicate-seq` or `stale-copy` with another append (a copy that started from an older
/// snapshot hands their positions out again); every other finding stands.
pub(crate) fn check_app(
    v: &mut MoveVerdict,
    app: &str,
    all: &[&Op],
    faults: &[FaultInterval],
    excused: &BTreeSet<&str>,
) {
    let ops: Vec<&Op> = all
        .iter()
        .filter(|o| o.call.key() == app)
        .copied()
        .collect();
    let mut fig = MoveFigures::default();
    let mut acks: Vec<Ack> = Vec::new();
    // value -> outcome of the append that sent it.
    let mut sent: BTreeMap<&str, Outcome> = BTreeMap::new();
    let mut failed: Vec<&Op> = Vec::new();
    for o in &ops {
        let Call::MvAppend { value, .. } = &o.call else {
            continue;
        };
        sent.insert(value.as_str(), o.outcome);
        match (o.outcome, &o.app) {
            (Outcome::Ok, Some(AppResult::Appended { seq, instance })) => {
                fig.acked += 1;
                acks.push(Ack {
                    op: o,
                    value,
                    seq: *seq,
                    instance,
                });
            }
            (Outcome::Ok, _) => {
                // An ok append without its seq: nothing to check it against.
                v.undecided
                    .push(format!("{app}: {} is ok without a seq", describe(o)));
            }
            (Outcome::Fail, _) => {
                fig.failed += 1;
                failed.push(o);
            }
            (Outcome::Unknown, _) => fig.unknown += 1,
        }
    }
    let mut anomaly = |kind: &str, count: usize, explanation: String| {
        v.anomalies.push(MoveAnomaly {
            app: app.to_string(),
            kind: kind.into(),
            count,
            explanation,
        });
    };
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

    // duplicate-seq: two acks, one seq, different values.
    let mut by_seq: BTreeMap<u64, Vec<&Ack>> = BTreeMap::new();
    for a in acks.iter().filter(|a| !excused.contains(a.value)) {
        by_seq.entry(a.seq).or_default().push(a);
    }
    let dups: Vec<(&u64, &Vec<&Ack>)> = by_seq
        .iter()
        .filter(|(_, xs)| xs.iter().map(|a| a.value).collect::<BTreeSet<_>>().len() > 1)
        .collect();
    if !dups.is_empty() {
        let mut text = format!(
            "{app}: {} seqs were acknowledged to two different appends (two copies handed out the same position); the first:\n",
            dups.len()
        );
        for (seq, xs) in dups.iter().take(3) {
            text.push_str(&format!("seq {seq}:\n"));
            let os: Vec<&Op> = xs.iter().map(|a| a.op).collect();
            text.push_str(&witnesses(&os));
            let mut from = u64::MAX;
            let mut to = 0;
            for o in &os {
                from = from.min(o.invoke_ns);
                to = to.max(o.complete_ns);
            }
            text.push_str(&format!(
                "  faults meanwhile: {}\n",
                faults_during(faults, from, to)
            ));
        }
        anomaly("duplicate-seq", dups.len(), text);
    }

    // stale-copy: in real-time order, seqs grow.
    let kept: Vec<&Ack> = acks.iter().filter(|a| !excused.contains(a.value)).collect();
    let mut by_complete: Vec<&Ack> = kept.clone();
    by_complete.sort_by_key(|a| a.op.complete_ns);
    let mut by_invoke: Vec<&Ack> = kept.clone();
    by_invoke.sort_by_key(|a| a.op.invoke_ns);
    let mut best: Option<&Ack> = None;
    let mut k = 0;
    let mut stale: Vec<(&Ack, &Ack)> = Vec::new();
    for b in &by_invoke {
        while k < by_complete.len() && by_complete[k].op.complete_ns < b.op.invoke_ns {
            let a = by_complete[k];
            if best.is_none_or(|x| a.seq > x.seq) {
                best = Some(a);
            }
            k += 1;
        }
        if let Some(a) = best.filter(|a| b.seq <= a.seq) {
            stale.push((a, b));
        }
    }
    if !stale.is_empty() {
        let mut text = format!(
            "{app}: {} appends were acknowledged at a seq not above that of an append acknowledged before they were sent (they went to a copy that lacked it); the first:\n",
            stale.len()
        );
        for (a, b) in stale.iter().take(3) {
            text.push_str(&witnesses(&[a.op, b.op]));
            text.push_str(&format!(
                "  faults meanwhile: {}\n",
                faults_during(faults, a.op.invoke_ns, b.op.complete_ns)
            ));
        }
        anomaly("stale-copy", stale.len(), text);
    }

    // concurrent-copies, and the figures per instance.
    let mut per_instance: BTreeMap<&str, Vec<&Ack>> = BTreeMap::new();
    for a in &acks {
        per_instance.entry(a.instance).or_default().push(a);
    }
    let mut pairs: BTreeMap<(&str, &str), (&Ack, &Ack, &Ack, usize)> = BTreeMap::new();
    for (i, xs) in &per_instance {
        let first = xs.iter().min_by_key(|a| a.op.complete_ns).copied();
        let last = xs.iter().max_by_key(|a| a.op.invoke_ns).copied();
        if let (Some(first), Some(last)) = (first, last) {
            fig.instances.push(InstanceFigure {
                instance: i.to_string(),
                nodes: xs
                    .iter()
                    .map(|a| a.op.node.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                acks: xs.len() as u64,
                first_s: s(first.op.complete_ns),
                last_s: s(last.op.invoke_ns),
                seqs: (
                    xs.iter().map(|a| a.seq).min().unwrap_or(0),
                    xs.iter().map(|a| a.seq).max().unwrap_or(0),
                ),
            });
            let (lo, hi) = (first.op.complete_ns, last.op.invoke_ns);
            if lo >= hi {
                continue;
            }
            for b in acks
                .iter()
                .filter(|b| b.instance != *i && b.op.invoke_ns > lo && b.op.complete_ns < hi)
            {
                pairs
                    .entry((*i, b.instance))
                    .or_insert((first, b, last, 0))
                    .3 += 1;
            }
        }
    }
    fig.instances
        .sort_by(|a, b| a.first_s.total_cmp(&b.first_s));
    for ((i, j), (first, b, last, count)) in pairs {
        anomaly(
            "concurrent-copies",
            count,
            format!(
                "{app}: instance {j} acknowledged {count} appends while instance {i} went on taking appends (one before, one after): two copies accepted writes at once:\n{}  faults meanwhile: {}\n",
                witnesses(&[first.op, b.op, last.op]),
                faults_during(faults, first.op.invoke_ns, last.op.complete_ns)
            ),
        );
    }

    // Moves, cancels, locates: fates.
    let mut mover: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o.call, Call::MvMove { .. } | Call::MvCancel { .. }))
        .copied()
        .collect();
    mover.sort_by_key(|o| o.invoke_ns);
    let mut locates: Vec<(u64, String, String)> = Vec::new();
    for o in &ops {
        if let (Call::MvLocate { .. }, Outcome::Ok, Some(AppResult::List { apps, .. })) =
            (&o.call, o.outcome, &o.app)
        {
            if let Some(a) = apps.iter().find(|a| a.app == app) {
                locates.push((o.invoke_ns, a.node.clone(), a.moving_to.clone()));
            }
        }
    }
    locates.sort_by_key(|l| l.0);
    let mut ok_times: Vec<u64> = acks.iter().map(|a| a.op.complete_ns).collect();
    ok_times.sort_unstable();
    let append_end = ops
        .iter()
        .filter(|o| matches!(o.call, Call::MvAppend { .. }))
        .map(|o| o.complete_ns)
        .max()
        .unwrap_or(0);
    let append_start = ops
        .iter()
        .filter(|o| matches!(o.call, Call::MvAppend { .. }))
        .map(|o| o.invoke_ns)
        .min()
        .unwrap_or(0);
    let mut edges = vec![append_start];
    edges.extend(ok_times.iter().copied());
    edges.push(append_end.max(append_start));
    let mut acks_by_complete: Vec<&Ack> = acks.iter().collect();
    acks_by_complete.sort_by_key(|a| a.op.complete_ns);
    let (gf, gt) = longest_gap(&edges, 0, u64::MAX);
    fig.longest_gap_s = s(gt - gf);
    fig.longest_gap_from_s = s(gf);
    fig.longest_gap_to_s = s(gt);
    for (idx, m) in mover.iter().enumerate() {
        let is_move = matches!(m.call, Call::MvMove { .. });
        match (is_move, m.outcome) {
            (true, Outcome::Ok) => fig.moves_ok += 1,
            (true, Outcome::Fail) => fig.moves_fail += 1,
            (true, Outcome::Unknown) => fig.moves_unknown += 1,
            (false, Outcome::Ok) => fig.cancels_ok += 1,
            (false, Outcome::Fail) => fig.cancels_fail += 1,
            (false, Outcome::Unknown) => fig.cancels_unknown += 1,
        }
        let Call::MvMove { to, .. } = &m.call else {
            continue;
        };
        if m.outcome != Outcome::Ok {
            continue;
        }
        let from = match &m.app {
            Some(AppResult::Moved { from, .. }) => from.clone(),
            _ => String::new(),
        };
        // The first of: a locate showing it on its target, settled; an acknowledged cancel;
        // another acknowledged move.
        let committed_at = locates
            .iter()
            .find(|(t, node, moving)| *t >= m.complete_ns && node == to && moving.is_empty())
            .map(|l| l.0);
        let next = mover[idx + 1..]
            .iter()
            .find(|o| o.outcome == Outcome::Ok && o.invoke_ns >= m.complete_ns);
        let fate = match (committed_at, next) {
            (Some(c), Some(n)) if c <= n.complete_ns => "committed",
            (Some(_), None) => "committed",
            (_, Some(n)) if matches!(n.call, Call::MvCancel { .. }) => "cancelled",
            (_, Some(_)) => "superseded",
            (None, None) => "unresolved",
        };
        match fate {
            "committed" => fig.committed += 1,
            "cancelled" => fig.cancelled += 1,
            "superseded" => fig.superseded += 1,
            _ => fig.unresolved += 1,
        }
        // A refused move or cancel changed nothing: it does not end the window.
        let window_end = mover[idx + 1..]
            .iter()
            .find(|o| o.invoke_ns > m.invoke_ns && o.outcome != Outcome::Fail)
            .map(|o| o.invoke_ns)
            .unwrap_or(append_end)
            .max(m.complete_ns);
        let (a, b) = longest_gap(&edges, m.invoke_ns, window_end);
        // The handoff: the first ack after the move by another instance (direct: on `to`).
        let k = acks_by_complete.partition_point(|x| x.op.complete_ns < m.invoke_ns);
        let before = k.checked_sub(1).map(|i| acks_by_complete[i].instance);
        let handoff = acks_by_complete[k..]
            .iter()
            .position(|x| {
                x.op.complete_ns <= window_end
                    && Some(x.instance) != before
                    && match &x.op.call {
                        Call::MvAppend { via, .. } if via == "direct" => x.op.node == *to,
                        _ => true,
                    }
            })
            .map(|j| {
                let new = acks_by_complete[k + j];
                let prev = (k + j)
                    .checked_sub(1)
                    .map(|i| acks_by_complete[i].op.complete_ns)
                    .unwrap_or(append_start);
                (new.op.complete_ns, new.op.complete_ns.saturating_sub(prev))
            });
        fig.moves.push(MoveFigure {
            handoff_s: handoff.map(|h| s(h.1)),
            handoff_at_s: handoff.map(|h| s(h.0)),
            at_s: s(m.invoke_ns),
            from,
            to: to.clone(),
            fate: fate.into(),
            gap_s: s(b - a),
            gap_from_s: s(a),
            gap_to_s: s(b),
            faults: faults_during(faults, a, b),
        });
    }

    // The final log.
    let Some(read) = ops
        .iter()
        .filter(|o| matches!(o.call, Call::MvRead { .. }) && o.outcome == Outcome::Ok)
        .max_by_key(|o| o.complete_ns)
    else {
        v.undecided.push(format!(
            "{app}: its log was never read after the faults: whether acknowledged appends survived is unknown"
        ));
        v.apps.insert(app.to_string(), fig);
        return;
    };
    let Some(AppResult::Log { instance, entries }) = &read.app else {
        v.undecided.push(format!(
            "{app}: the final read {} holds no log",
            describe(read)
        ));
        v.apps.insert(app.to_string(), fig);
        return;
    };
    fig.final_entries = entries.len() as u64;
    fig.final_node = read.node.clone();
    fig.final_instance = instance.clone();
    let bad_seqs: Vec<String> = entries
        .iter()
        .enumerate()
        .filter(|(i, (seq, _))| *seq != *i as u64 + 1)
        .map(|(i, (seq, t))| format!("entry {} is {seq} {t}", i + 1))
        .take(3)
        .collect();
    let mut at: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (seq, text) in entries {
        at.entry(text.as_str()).or_default().push(*seq);
    }
    let value_at = |seq: u64| -> Option<&str> {
        entries
            .get((seq as usize).wrapping_sub(1))
            .filter(|(s2, _)| *s2 == seq)
            .map(|(_, t)| t.as_str())
    };
    let read_line = format!("  the final read: {}\n", describe(read));

    let mut lost: Vec<&Op> = Vec::new();
    let mut moved: Vec<(&Ack, Vec<u64>, Option<&str>)> = Vec::new();
    for a in &acks {
        match at.get(a.value) {
            None if excused.contains(a.value) => {}
            None => lost.push(a.op),
            Some(seqs) if !seqs.contains(&a.seq) => {
                moved.push((a, seqs.clone(), value_at(a.seq)));
            }
            Some(_) => {}
        }
    }
    if !lost.is_empty() {
        let from = lost.iter().map(|o| o.invoke_ns).min().unwrap_or(0);
        let to = lost.iter().map(|o| o.complete_ns).max().unwrap_or(0);
        anomaly(
            "lost-write",
            lost.len(),
            format!(
                "{app}: {} acknowledged appends are not in the final log ({} entries):\n{}{read_line}  faults while they were made: {}\n",
                lost.len(),
                entries.len(),
                witnesses(&lost),
                faults_during(faults, from, to)
            ),
        );
    }
    if !moved.is_empty() {
        let mut text = format!(
            "{app}: {} acknowledged appends are in the final log, but not at the seq acknowledged:\n",
            moved.len()
        );
        for (a, seqs, holder) in moved.iter().take(4) {
            text.push_str(&format!(
                "  {}\n    in the final log at {:?}; its seq {} holds {}\n",
                describe(a.op),
                seqs,
                a.seq,
                holder.map(|h| format!("{h:?}")).unwrap_or("nothing".into())
            ));
        }
        text.push_str(&read_line);
        anomaly("wrong-seq", moved.len(), text);
    }
    let failed_present: Vec<&Op> = failed
        .iter()
        .filter(|o| match &o.call {
            Call::MvAppend { value, .. } => at.contains_key(value.as_str()),
            _ => false,
        })
        .copied()
        .collect();
    if !failed_present.is_empty() {
        anomaly(
            "failed-write-present",
            failed_present.len(),
            format!(
                "{app}: {} appends that were never sent are in the final log:\n{}{read_line}",
                failed_present.len(),
                witnesses(&failed_present)
            ),
        );
    }
    let twice: Vec<String> = at
        .iter()
        .filter(|(_, seqs)| seqs.len() > 1)
        .map(|(t, seqs)| format!("{t} at {seqs:?}"))
        .collect();
    if !twice.is_empty() {
        anomaly(
            "duplicate-entry",
            twice.len(),
            format!(
                "{app}: {} values are in the final log more than once: {}{}\n{read_line}",
                twice.len(),
                twice.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                if twice.len() > 5 { ", ..." } else { "" }
            ),
        );
    }
    let foreign: Vec<String> = at
        .keys()
        .filter(|t| !sent.contains_key(*t))
        .map(|t| t.to_string())
        .collect();
    if !foreign.is_empty() || !bad_seqs.is_empty() {
        anomaly(
            "foreign-entry",
            foreign.len() + bad_seqs.len(),
            format!(
                "{app}: the final log holds {} values no append sent ({}){}\n{read_line}",
                foreign.len(),
                foreign
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if bad_seqs.is_empty() {
                    String::new()
                } else {
                    format!("; its seqs are not 1..n: {}", bad_seqs.join(", "))
                }
            ),
        );
    }
    for (value, outcome) in &sent {
        if *outcome == Outcome::Unknown {
            if at.contains_key(value) {
                fig.unknown_present += 1;
            } else {
                fig.unknown_absent += 1;
            }
        }
    }
    v.apps.insert(app.to_string(), fig);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testutil::{sorted_kinds, Builder};
    use crate::history::AppSeen;

    const A: &str = "jm-1";

    /// The move workload's ops, numbered from 1, of process 1.
    struct Moves;
    type H = Builder<Moves>;

    impl H {
        fn new() -> H {
            H::start(1, 1)
        }
        fn append(
            &mut self,
            value: &str,
            outcome: Outcome,
            seq_inst: Option<(u64, &str)>,
            t: (u64, u64),
        ) {
            let call = Call::MvAppend {
                app: A.into(),
                value: value.into(),
                via: "direct".into(),
            };
            // Instance iK runs on nK.
            let node = seq_inst
                .and_then(|(_, i)| i.strip_prefix('i'))
                .map(|k| format!("n{k}"))
                .unwrap_or_else(|| "n1".into());
            let app = seq_inst.map(|(seq, i)| AppResult::Appended {
                seq,
                instance: i.into(),
            });
            self.op(&node, call, outcome, t, app);
        }
        fn ok(&mut self, value: &str, seq: u64, inst: &str, t: (u64, u64)) {
            self.append(value, Outcome::Ok, Some((seq, inst)), t);
        }
        fn mv(&mut self, to: &str, outcome: Outcome, t: (u64, u64)) {
            let app = (outcome == Outcome::Ok).then(|| AppResult::Moved {
                from: "n1".into(),
                to: to.into(),
            });
            self.op(
                "n3",
                Call::MvMove {
                    app: A.into(),
                    to: to.into(),
                },
                outcome,
                t,
                app,
            );
        }
        fn cancel(&mut self, outcome: Outcome, t: (u64, u64)) {
            self.op("n3", Call::MvCancel { app: A.into() }, outcome, t, None);
        }
        fn locate(&mut self, node: &str, moving_to: &str, t: (u64, u64)) {
            let app = AppResult::List {
                generation: 1,
                apps: vec![AppSeen {
                    app: A.into(),
                    node: node.into(),
                    moving_to: moving_to.into(),
                    state: "running".into(),
                    ..Default::default()
                }],
            };
            self.op(
                "n2",
                Call::MvLocate { app: A.into() },
                Outcome::Ok,
                t,
                Some(app),
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
        fn check(&self) -> MoveVerdict {
            check_moves(&self.h)
        }
    }

    fn kinds(v: &MoveVerdict) -> Vec<&str> {
        sorted_kinds(v.anomalies.iter().map(|a| a.kind.as_str()))
    }

    /// Three acks on n1's instance i1, a move to n2 that commits, an unknown append that
    /// landed and one that did not, a failed one, two acks on n2's i2; the final log has all.
    fn good() -> H {
        let mut h = H::new();
        h.ok("w0-1", 1, "i1", (0, 10));
        h.ok("w1-1", 2, "i1", (5, 15));
        h.ok("w0-2", 3, "i1", (20, 30));
        h.mv("n2", Outcome::Ok, (40, 50));
        h.append("w1-2", Outcome::Unknown, None, (60, 3060));
        h.append("w0-3", Outcome::Unknown, None, (60, 3060));
        h.append("w1-3", Outcome::Fail, None, (3100, 3101));
        h.nemesis(3000, "start", "kill", "kill -9 n4");
        h.nemesis(3500, "stop", "kill", "healed");
        h.locate("n2", "", (3200, 3210));
        h.ok("w0-4", 5, "i2", (3300, 3310));
        h.ok("w1-4", 6, "i2", (3320, 3330));
        h.nemesis(4000, "heal", "all", "nothing left to undo");
        h.read(
            &["w0-1", "w1-1", "w0-2", "w0-3", "w0-4", "w1-4"],
            (4100, 4110),
        );
        h
    }

    #[test]
    fn a_clean_move_is_valid_with_its_figures() {
        let v = good().check();
        assert_eq!(v.valid(), Some(true), "{v:#?}");
        let f = &v.apps[A];
        assert_eq!((f.acked, f.unknown, f.failed), (5, 2, 1));
        assert_eq!((f.unknown_present, f.unknown_absent), (1, 1));
        assert_eq!(f.final_entries, 6);
        assert_eq!((f.moves_ok, f.committed), (1, 1));
        assert_eq!(f.instances.len(), 2);
        assert_eq!(f.instances[0].instance, "i1");
        assert_eq!(f.instances[0].acks, 3);
        assert_eq!(f.instances[1].seqs, (5, 6));
        // The downtime around the move: from the last ack on i1 (30 ms) to the first on i2.
        let m = &f.moves[0];
        assert_eq!(m.fate, "committed");
        assert!((m.gap_s - 3.28).abs() < 1e-9, "{m:?}");
        // ... which is the handoff too: the first ack on n2 by another instance.
        assert_eq!(m.handoff_at_s, Some(3.31));
        assert!((m.handoff_s.unwrap() - 3.28).abs() < 1e-9, "{m:?}");
        assert!(m.faults.contains("kill"), "{m:?}");
        assert!((f.longest_gap_s - 3.28).abs() < 1e-9);
        let r = NoWriteLost.check(&good().h);
        assert_eq!(r.valid, Some(true));
        assert!(
            r.summary.contains("5 acknowledged appends"),
            "{}",
            r.summary
        );
    }

    #[test]
    fn an_acknowledged_write_missing_from_the_final_log_is_lost() {
        let mut h = good();
        h.read(&["w0-1", "w1-1", "w0-2", "w0-3", "w0-4"], (4200, 4210));
        let v = h.check();
        assert_eq!(kinds(&v), vec!["lost-write"], "{v:#?}");
        assert!(v.anomalies[0].explanation.contains("w1-4"));
        assert!(v.anomalies[0].explanation.contains("final read"));
    }

    #[test]
    fn an_ack_at_another_seq_is_flagged() {
        // w0-3 (unknown) is absent, so w0-4 sits at 4 although acknowledged at 5.
        let mut h = good();
        h.read(&["w0-1", "w1-1", "w0-2", "w0-4", "w1-4"], (4200, 4210));
        let v = h.check();
        assert!(kinds(&v).contains(&"wrong-seq"), "{v:#?}");
        let a = v.anomalies.iter().find(|a| a.kind == "wrong-seq").unwrap();
        assert!(a.explanation.contains("w0-4"), "{}", a.explanation);
        assert!(a.explanation.contains("[4]"), "{}", a.explanation);
    }

    #[test]
    fn two_copies_handing_out_one_seq_is_flagged() {
        // After the move, the old copy (i1) takes w1-5 at seq 4 while the new one (i2) gave
        // seq 4... the same position to w0-9.
        let mut h = good();
        h.ok("w0-9", 7, "i2", (3400, 3410));
        h.ok("w1-9", 7, "i1", (3402, 3405));
        h.read(
            &["w0-1", "w1-1", "w0-2", "w0-3", "w0-4", "w1-4", "w0-9"],
            (4200, 4210),
        );
        let v = h.check();
        let k = kinds(&v);
        assert!(k.contains(&"duplicate-seq"), "{v:#?}");
        assert!(k.contains(&"lost-write"), "{k:?}");
        // i1 took w1-9 after i2 had started taking appends... and i2 between i1's? i1's last
        // ack is invoked at 3402, after i2's acks at 3300..3330 completed: i2 took appends
        // while i1 went on.
        assert!(k.contains(&"concurrent-copies"), "{k:?}");
        // w1-9 was acknowledged at seq 7 after w0-4 (seq 5)... and after w1-4 (seq 6): fine;
        // but not after w0-9 (overlapping): no stale-copy from it.
        let d = v
            .anomalies
            .iter()
            .find(|a| a.kind == "duplicate-seq")
            .unwrap();
        assert!(d.explanation.contains("seq 7"), "{}", d.explanation);
    }

    #[test]
    fn an_ack_below_an_earlier_one_came_from_a_stale_copy() {
        let mut h = good();
        // After w1-4 (seq 6) completed at 3330, i3 acknowledges seq 4.
        h.ok("w0-5", 4, "i3", (3400, 3410));
        let v = h.check();
        let k = kinds(&v);
        assert!(k.contains(&"stale-copy"), "{v:#?}");
        let a = v.anomalies.iter().find(|a| a.kind == "stale-copy").unwrap();
        assert!(a.explanation.contains("w0-5"), "{}", a.explanation);
        assert!(k.contains(&"lost-write"), "{k:?}");
    }

    #[test]
    fn an_interleaving_of_two_instances_is_flagged_even_with_consistent_seqs() {
        let mut h = H::new();
        h.ok("w0-1", 1, "i1", (0, 10));
        h.ok("w1-1", 2, "i2", (20, 30));
        h.ok("w0-2", 3, "i1", (40, 50));
        h.nemesis(100, "heal", "all", "");
        h.read(&["w0-1", "w1-1", "w0-2"], (200, 210));
        let v = h.check();
        assert_eq!(kinds(&v), vec!["concurrent-copies"], "{v:#?}");
        assert!(v.anomalies[0].explanation.contains("instance i2"));
        // Overlapping in time (not provably between two of i1's): no finding.
        let mut h = H::new();
        h.ok("w0-1", 1, "i1", (0, 10));
        h.ok("w1-1", 2, "i2", (5, 30));
        h.ok("w0-2", 3, "i2", (40, 50));
        h.read(&["w0-1", "w1-1", "w0-2"], (200, 210));
        assert_eq!(h.check().valid(), Some(true));
    }

    #[test]
    fn a_failed_write_in_the_log_and_a_value_twice_are_flagged() {
        let mut h = good();
        h.read(
            &[
                "w0-1", "w1-1", "w0-2", "w0-3", "w0-4", "w1-4", "w1-3", "w0-3", "zz",
            ],
            (4200, 4210),
        );
        let v = h.check();
        assert_eq!(
            kinds(&v),
            vec!["duplicate-entry", "failed-write-present", "foreign-entry"],
            "{v:#?}"
        );
        let f = v
            .anomalies
            .iter()
            .find(|a| a.kind == "failed-write-present")
            .unwrap();
        assert!(f.explanation.contains("w1-3"));
        let d = v
            .anomalies
            .iter()
            .find(|a| a.kind == "duplicate-entry")
            .unwrap();
        assert!(
            d.explanation.contains("w0-3 at [4, 8]"),
            "{}",
            d.explanation
        );
        let x = v
            .anomalies
            .iter()
            .find(|a| a.kind == "foreign-entry")
            .unwrap();
        assert!(x.explanation.contains("zz"));
    }

    #[test]
    fn without_a_final_read_it_is_undecided() {
        let mut h = H::new();
        h.ok("w0-1", 1, "i1", (0, 10));
        let v = h.check();
        assert_eq!(v.valid(), None, "{v:#?}");
        assert!(v.undecided[0].contains("never read"));
        assert_eq!(check_moves(&History::default()).valid(), None);
    }

    #[test]
    fn move_fates_are_told_apart() {
        let mut h = H::new();
        h.ok("w0-1", 1, "i1", (0, 10));
        // cancelled
        h.mv("n2", Outcome::Ok, (100, 110));
        h.cancel(Outcome::Ok, (200, 210));
        h.locate("n1", "", (300, 310));
        // superseded, then the second commits
        h.mv("n3", Outcome::Ok, (400, 410));
        h.locate("n1", "n3", (450, 460));
        h.mv("n4", Outcome::Ok, (500, 510));
        h.locate("n4", "", (600, 610));
        // a cancel too late fails; refused and unknown moves
        h.cancel(Outcome::Fail, (515, 520));
        h.ok("w0-3", 2, "i4", (560, 570));
        h.mv("n5", Outcome::Fail, (700, 710));
        h.mv("n5", Outcome::Unknown, (800, 900));
        // the last one never seen done
        h.mv("n2", Outcome::Ok, (1000, 1010));
        h.ok("w0-2", 3, "i2", (1100, 1110));
        h.read(&["w0-1", "w0-3", "w0-2"], (2000, 2010));
        let v = h.check();
        assert_eq!(v.valid(), Some(true), "{v:#?}");
        let f = &v.apps[A];
        let fates: Vec<&str> = f.moves.iter().map(|m| m.fate.as_str()).collect();
        assert_eq!(
            fates,
            vec!["cancelled", "superseded", "committed", "unresolved"]
        );
        assert_eq!((f.moves_ok, f.moves_fail, f.moves_unknown), (4, 1, 1));
        assert_eq!((f.cancels_ok, f.cancels_fail), (1, 1));
        assert_eq!(
            (f.committed, f.cancelled, f.superseded, f.unresolved),
            (1, 1, 1, 1)
        );
        // The refused cancel does not end the n4 move's window: its handoff is found.
        assert_eq!(f.moves[2].handoff_at_s, Some(0.57), "{:?}", f.moves[2]);
        assert!((f.moves[2].handoff_s.unwrap() - 0.56).abs() < 1e-9);
        assert_eq!(f.moves[3].handoff_at_s, Some(1.11));
        // No other instance took an append before the cancel.
        assert_eq!(f.moves[0].handoff_s, None);
    }

    #[test]
    fn the_longest_gap_is_the_one_overlapping_the_window() {
        let t = [0, 10, 50, 60, 200, 210];
        assert_eq!(longest_gap(&t, 0, u64::MAX), (60, 200));
        assert_eq!(longest_gap(&t, 15, 40), (10, 50));
        assert_eq!(longest_gap(&t, 55, 58), (50, 60));
    }
}
