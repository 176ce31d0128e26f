//! Linearizability of a key-value store seen as independent registers, one per key.
//!
//! A history is split by key (registers compose: the whole is linearizable iff every key is) and
//! each key is searched with [`linearizable::check`]. The workload writes unique values per key,
//! which makes two simplifications sound:
//! - an op whose outcome is unknown and whose value nobody observed is dropped: whether it took
//!   effect cannot matter to any other op, and keeping it would only widen the search;
//! - a violation is shrunk to a minimal failing sub-history by removing ops together with every
//!   op that observed the value they wrote, so the smaller history never fails only because a
//!   write it depended on was cut away.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::linearizable::{self, Entry, Linearizability, Model};
use crate::history::{secs, Call, FaultInterval, Op, Outcome};

/// A register op with values interned to small integers (`None`: the key does not exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterOp {
    Read(Option<u32>),
    Write(u32),
    Cas(Option<u32>, u32),
}

impl RegisterOp {
    /// The value this op writes, if it writes.
    fn writes(&self) -> Option<u32> {
        match self {
            RegisterOp::Read(_) => None,
            RegisterOp::Write(v) | RegisterOp::Cas(_, v) => Some(*v),
        }
    }
    /// The value this op saw, if it observes the state.
    fn observes(&self) -> Option<u32> {
        match self {
            RegisterOp::Read(v) | RegisterOp::Cas(v, _) => *v,
            RegisterOp::Write(_) => None,
        }
    }
}

/// A register that starts absent.
pub struct Register;

impl Model for Register {
    type State = Option<u32>;
    type Op = RegisterOp;

    fn init(&self) -> Option<u32> {
        None
    }

    fn step(&self, s: &Option<u32>, op: &RegisterOp) -> Option<Option<u32>> {
        match op {
            RegisterOp::Read(v) => (v == s).then_some(*s),
            RegisterOp::Write(v) => Some(Some(*v)),
            RegisterOp::Cas(expect, v) => (expect == s).then_some(Some(*v)),
        }
    }
}

/// One key's history, ready for the search, with each entry's op in the original history.
struct KeyHistory {
    entries: Vec<Entry<RegisterOp>>,
    /// `entries[i]` came from `ops[source[i]]`.
    source: Vec<usize>,
}

/// The checkable part of one key's ops (indexes into `ops`): drops failed ops, and unknown
/// writes whose value nobody saw.
fn key_history(ops: &[&Op]) -> KeyHistory {
    let mut values: HashMap<String, u32> = HashMap::new();
    let mut intern = |v: &str| {
        let n = values.len() as u32;
        *values.entry(v.to_string()).or_insert(n)
    };
    let mut raw: Vec<(usize, Entry<RegisterOp>)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let return_ns = match op.outcome {
            Outcome::Fail => continue,
            Outcome::Ok => Some(op.complete_ns),
            Outcome::Unknown => None,
        };
        let rop = match (&op.call, op.outcome) {
            (Call::Read { .. }, Outcome::Ok) => match &op.read {
                Some(v) => RegisterOp::Read(v.as_deref().map(&mut intern)),
                None => continue,
            },
            // A read that did not answer has no effect and says nothing.
            (Call::Read { .. }, _) => continue,
            (Call::Write { value, .. }, _) => RegisterOp::Write(intern(value)),
            (Call::Cas { expect, value, .. }, _) => {
                RegisterOp::Cas(expect.as_deref().map(&mut intern), intern(value))
            }
            // Not a register op (the caller passes register ops only).
            _ => continue,
        };
        raw.push((
            i,
            Entry {
                call_ns: op.invoke_ns,
                return_ns,
                op: rop,
            },
        ));
    }
    let observed: BTreeSet<u32> = raw
        .iter()
        .filter(|(_, e)| e.return_ns.is_some())
        .filter_map(|(_, e)| e.op.observes())
        .collect();
    let mut out = KeyHistory {
        entries: Vec::new(),
        source: Vec::new(),
    };
    for (i, e) in raw {
        let unseen_unknown =
            e.return_ns.is_none() && e.op.writes().is_none_or(|v| !observed.contains(&v));
        if !unseen_unknown {
            out.source.push(i);
            out.entries.push(e);
        }
    }
    out
}

/// The verdict on one key that is not linearizable.
#[derive(Clone, Debug, Serialize)]
pub struct KeyAnomaly {
    pub key: String,
    /// How many ops of this key were searched.
    pub ops_checked: usize,
    /// A minimal sub-history that has no linearization: removing any one op (with the ops that
    /// observed its value) makes it linearizable.
    pub minimal_history: Vec<Op>,
    /// The same, as a readable time line.
    pub explanation: String,
    /// Faults active while these ops ran (filled in by [`annotate`]).
    #[serde(default)]
    pub faults: Vec<String>,
}

/// The register checker's findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RegisterVerdict {
    pub keys_checked: usize,
    pub ops_checked: usize,
    pub anomalies: Vec<KeyAnomaly>,
    /// Keys whose search ran out of budget: neither proven nor refuted.
    pub undecided_keys: Vec<String>,
}

impl RegisterVerdict {
    pub fn valid(&self) -> Option<bool> {
        super::validity(&self.anomalies, &self.undecided_keys)
    }
}

/// Checks every key of `ops` (the register workload's ops; other ops are ignored), with at
/// most `max_steps` search steps per key.
pub fn check_registers(ops: &[Op], max_steps: u64) -> RegisterVerdict {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.call.is_register()) {
        by_key.entry(op.call.key()).or_default().push(op);
    }
    let mut verdict = RegisterVerdict::default();
    for (key, ops) in by_key {
        let kh = key_history(&ops);
        verdict.keys_checked += 1;
        verdict.ops_checked += kh.entries.len();
        match linearizable::check(&Register, &kh.entries, max_steps) {
            Linearizability::Linearizable(_) => {}
            Linearizability::Unknown { .. } => verdict.undecided_keys.push(key.to_string()),
            Linearizability::NotLinearizable { .. } => {
                let keep = minimize(&kh.entries, max_steps);
                let minimal: Vec<Op> = keep.iter().map(|&i| ops[kh.source[i]].clone()).collect();
                let explanation = explain(key, &minimal, &ops);
                verdict.anomalies.push(KeyAnomaly {
                    key: key.to_string(),
                    ops_checked: kh.entries.len(),
                    minimal_history: minimal,
                    explanation,
                    faults: Vec::new(),
                });
            }
        }
    }
    verdict
}

/// Names, for each anomaly, the faults that overlapped its ops, in its explanation too.
pub fn annotate(verdict: &mut RegisterVerdict, faults: &[FaultInterval]) {
    for a in &mut verdict.anomalies {
        let from = a
            .minimal_history
            .iter()
            .map(|o| o.invoke_ns)
            .min()
            .unwrap_or(0);
        let to = a
            .minimal_history
            .iter()
            .map(|o| o.complete_ns)
            .max()
            .unwrap_or(0);
        a.faults = faults
            .iter()
            .filter(|f| f.start_ns <= to && f.stop_ns >= from)
            .map(|f| {
                format!(
                    "{} ({}) {}..{}",
                    f.fault,
                    f.detail,
                    secs(f.start_ns),
                    secs(f.stop_ns)
                )
            })
            .collect();
        if a.faults.is_empty() {
            a.explanation.push_str("  no fault was active meanwhile\n");
        } else {
            a.explanation
                .push_str(&format!("  faults meanwhile: {}\n", a.faults.join("; ")));
        }
    }
}

/// `remove` plus every op (transitively) that observed a value written by a removed op.
fn with_observers(entries: &[Entry<RegisterOp>], alive: &[bool], remove: &[usize]) -> Vec<usize> {
    let mut out: BTreeSet<usize> = remove.iter().copied().collect();
    let mut frontier: Vec<usize> = remove.to_vec();
    while let Some(i) = frontier.pop() {
        let Some(v) = entries[i].op.writes() else {
            continue;
        };
        for (j, e) in entries.iter().enumerate() {
            if alive[j] && !out.contains(&j) && e.op.observes() == Some(v) {
                out.insert(j);
                frontier.push(j);
            }
        }
    }
    out.into_iter().collect()
}

fn fails(entries: &[Entry<RegisterOp>], alive: &[bool], max_steps: u64) -> bool {
    let sub: Vec<Entry<RegisterOp>> = entries
        .iter()
        .zip(alive)
        .filter(|(_, a)| **a)
        .map(|(e, _)| e.clone())
        .collect();
    linearizable::check(&Register, &sub, max_steps).is_violation()
}

/// Shrinks a non-linearizable history to a minimal one (indexes into `entries`, in order):
/// drops chunks of ops, halving the chunk size down to single ops, keeping every removal after
/// which the rest still has no linearization.
pub fn minimize(entries: &[Entry<RegisterOp>], max_steps: u64) -> Vec<usize> {
    let mut alive = vec![true; entries.len()];
    let mut chunk = entries.len().div_ceil(2).max(1);
    loop {
        let live: Vec<usize> = (0..entries.len()).filter(|&i| alive[i]).collect();
        let mut removed_any = false;
        // From the end: the ops after the violation are the likeliest to be irrelevant.
        for group in live.chunks(chunk).rev() {
            if group.iter().all(|&i| !alive[i]) {
                continue;
            }
            let remove = with_observers(entries, &alive, group);
            let mut trial = alive.clone();
            for &i in &remove {
                trial[i] = false;
            }
            if fails(entries, &trial, max_steps) {
                alive = trial;
                removed_any = true;
            }
        }
        if chunk > 1 {
            chunk = chunk.div_ceil(2);
        } else if !removed_any {
            // A whole pass of single removals changed nothing: minimal.
            break;
        }
    }
    (0..entries.len()).filter(|&i| alive[i]).collect()
}

/// A minimal failing sub-history as a time line, with a note on values whose writer is not in it.
fn explain(key: &str, minimal: &[Op], all: &[&Op]) -> String {
    let mut s = format!(
        "key {key}: these {} operations have no linearization (times are seconds since the start; \
         an unknown op may take effect at any time after its invocation, or never):\n",
        minimal.len()
    );
    let mut sorted: Vec<&Op> = minimal.iter().collect();
    sorted.sort_by_key(|o| o.invoke_ns);
    for op in &sorted {
        s.push_str(&format!("  {}\n", describe(op)));
    }
    // A value read but written by no op in the sub-history: say what happened to its write.
    let written: BTreeSet<&str> = minimal
        .iter()
        .filter_map(|o| match &o.call {
            Call::Write { value, .. } | Call::Cas { value, .. } => Some(value.as_str()),
            _ => None,
        })
        .collect();
    for op in &sorted {
        let seen = match (&op.call, &op.read) {
            (Call::Read { .. }, Some(Some(v))) => Some(v.as_str()),
            (
                Call::Cas {
                    expect: Some(v), ..
                },
                _,
            ) => Some(v.as_str()),
            _ => None,
        };
        let Some(v) = seen.filter(|v| !written.contains(v)) else {
            continue;
        };
        let writers: Vec<String> = all
            .iter()
            .filter(|o| {
                matches!(&o.call, Call::Write { value, .. } | Call::Cas { value, .. } if value == v)
            })
            .map(|o| describe(o))
            .collect();
        if writers.is_empty() {
            s.push_str(&format!(
                "  value {v:?} was never written by any op of the history\n"
            ));
        } else {
            for w in writers {
                s.push_str(&format!("  value {v:?} was written by: {w}\n"));
            }
        }
    }
    s
}

/// What an app call returned, on one line: running apps with their ids, the others' states.
fn describe_app_result(r: &crate::history::AppResult) -> String {
    use crate::history::{AppResult, AppSeen};
    let seen = |apps: &[AppSeen]| -> String {
        if apps.is_empty() {
            return "nothing".into();
        }
        apps.iter()
            .map(|a| {
                let at = if a.node.is_empty() {
                    String::new()
                } else {
                    format!("@{}", a.node)
                };
                if a.state == "running" {
                    format!("{}{at} running {}", a.app, a.id)
                } else {
                    format!("{}{at} {}", a.app, a.state)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match r {
        AppResult::Deployed {
            generation,
            changes,
        } => format!(
            "generation {generation}{}{}",
            if changes.is_empty() { "" } else { ": " },
            changes.join(", ")
        ),
        AppResult::Local { apps } => seen(apps),
        AppResult::List { generation, apps } => {
            format!("generation {generation}: {}", seen(apps))
        }
        AppResult::Appended { seq, instance } => format!("OK {seq} (instance {instance})"),
        AppResult::Log { instance, entries } => format!(
            "{} entries{} (instance {instance})",
            entries.len(),
            entries
                .last()
                .map(|(s, t)| format!(", the last {s} {t}"))
                .unwrap_or_default()
        ),
        AppResult::Moved { from, to } => format!("{from} -> {to}"),
        AppResult::Replicated {
            replicas,
            interval_ms,
        } => format!("{replicas} replicas, a snapshot every {interval_ms} ms"),
        AppResult::Failovers {
            failovers,
            no_replica,
        } => format!(
            "{} failovers{}",
            failovers.len(),
            if no_replica.is_empty() {
                String::new()
            } else {
                format!(", {} without a replica", no_replica.len())
            }
        ),
    }
}

/// One op on one line: `[invoke, complete] process on node: f args -> outcome result`.
pub fn describe(op: &Op) -> String {
    let call = match &op.call {
        Call::Read { stale, .. } => {
            if *stale {
                "read (stale)".to_string()
            } else {
                "read".to_string()
            }
        }
        Call::Write { value, .. } => format!("write {value}"),
        Call::Cas { expect, value, .. } => {
            format!("cas {} -> {value}", expect.as_deref().unwrap_or("<absent>"))
        }
        Call::DsCreate { dataset, primary } => format!("create dataset {dataset} on {primary}"),
        Call::DsWrite {
            dataset,
            file,
            bytes,
            primary,
            epoch,
            ..
        } => format!("write {dataset}/{file} ({bytes} bytes) on {primary} (epoch {epoch})"),
        Call::DsSnapshot { dataset, tag } => format!("snapshot {dataset}@{tag}"),
        Call::DsMove { dataset, to } => format!("move {dataset} to {to}"),
        Call::DsCancelMove { dataset } => format!("cancel the move of {dataset}"),
        Call::DsState { dataset, .. } => format!("state of {dataset}"),
        Call::DsRead { disk } => format!("read the snapshots on {disk}'s disk"),
        Call::AppDeploy { apps } => format!(
            "deploy {}",
            apps.iter()
                .map(|(a, p)| format!("{a}@{}", p.node))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Call::AppLocal {} => "local apps".to_string(),
        Call::AppList {} => "app list".to_string(),
        Call::MvDeploy { apps } => format!("deploy {}", apps.join(" ")),
        Call::MvAppend { app, value, via } => format!("append {value} to {app} ({via})"),
        Call::MvRead { app, via } => format!("read the log of {app} ({via})"),
        Call::MvMove { app, to } => format!("move {app} to {to}"),
        Call::MvCancel { app } => format!("cancel the move of {app}"),
        Call::MvLocate { app } => format!("locate {app}"),
        Call::FoReplicate {
            app,
            replicas,
            interval_ms,
        } => format!("keep {replicas} replicas of {app}, a snapshot every {interval_ms} ms"),
        Call::FoEvents {} => "the cluster's events".to_string(),
    };
    let result = match (&op.read, op.outcome, &op.app) {
        (Some(v), Outcome::Ok, _) => format!(" = {}", v.as_deref().unwrap_or("<absent>")),
        (_, Outcome::Ok, Some(a)) => format!(" = {}", describe_app_result(a)),
        _ => String::new(),
    };
    let complete = match op.outcome {
        Outcome::Unknown => format!("{}..?", secs(op.complete_ns)),
        _ => secs(op.complete_ns),
    };
    let err = op
        .error
        .as_deref()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    format!(
        "#{} [{} {}] p{} on {}: {call} -> {}{result}{err}",
        op.index,
        secs(op.invoke_ns),
        complete,
        op.process,
        op.node,
        op.outcome.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        index: u64,
        call: Call,
        outcome: Outcome,
        read: Option<Option<&str>>,
        t: (u64, u64),
    ) -> Op {
        Op {
            index,
            process: index,
            node: "n1".into(),
            call,
            outcome,
            read: read.map(|r| r.map(str::to_string)),
            revision: None,
            invoke_ns: t.0,
            complete_ns: t.1,
            error: None,
            ds: None,
            app: None,
        }
    }
    fn read(key: &str) -> Call {
        Call::Read {
            key: key.into(),
            stale: false,
        }
    }
    fn write(key: &str, v: &str) -> Call {
        Call::Write {
            key: key.into(),
            value: v.into(),
        }
    }
    fn cas(key: &str, e: Option<&str>, v: &str) -> Call {
        Call::Cas {
            key: key.into(),
            expect: e.map(str::to_string),
            value: v.into(),
        }
    }

    #[test]
    fn keys_are_checked_independently() {
        // Each key alone is fine, although across keys the reads are "out of order".
        let h = vec![
            op(0, write("a", "1"), Outcome::Ok, None, (0, 10)),
            op(1, write("b", "2"), Outcome::Ok, None, (0, 10)),
            op(2, read("a"), Outcome::Ok, Some(Some("1")), (20, 30)),
            op(3, read("b"), Outcome::Ok, Some(Some("2")), (20, 30)),
        ];
        let v = check_registers(&h, 100_000);
        assert_eq!(v.keys_checked, 2);
        assert_eq!(v.valid(), Some(true), "{v:?}");
    }

    #[test]
    fn failed_ops_are_left_out_but_their_values_may_not_appear() {
        // A write that failed (certainly not applied) and a read that saw it.
        let h = vec![
            op(0, write("k", "1"), Outcome::Fail, None, (0, 10)),
            op(1, read("k"), Outcome::Ok, Some(Some("1")), (20, 30)),
        ];
        let v = check_registers(&h, 100_000);
        assert_eq!(v.valid(), Some(false));
        let a = &v.anomalies[0];
        assert_eq!(a.minimal_history.len(), 1);
        assert!(
            a.explanation.contains("written by: #0"),
            "{}",
            a.explanation
        );
        assert!(a.explanation.contains("-> fail"), "{}", a.explanation);
    }

    #[test]
    fn unknown_ops_may_or_may_not_have_happened() {
        let h = vec![
            op(0, write("k", "1"), Outcome::Ok, None, (0, 10)),
            op(1, write("k", "2"), Outcome::Unknown, None, (20, 30)),
            op(
                2,
                cas("k", Some("1"), "3"),
                Outcome::Unknown,
                None,
                (20, 30),
            ),
            op(3, read("k"), Outcome::Ok, Some(Some("3")), (40, 50)),
            op(4, read("k"), Outcome::Ok, Some(Some("2")), (60, 70)),
        ];
        // cas 1->3 then write 2, both late: linearizable.
        assert_eq!(check_registers(&h, 100_000).valid(), Some(true));
        // Reading 3 again after 2 is not.
        let mut h = h;
        h.push(op(5, read("k"), Outcome::Ok, Some(Some("3")), (80, 90)));
        assert_eq!(check_registers(&h, 100_000).valid(), Some(false));
    }

    #[test]
    fn unknown_writes_nobody_saw_are_dropped_before_the_search() {
        let mut h = vec![op(0, write("k", "0"), Outcome::Ok, None, (0, 1))];
        for i in 1..200 {
            h.push(op(
                i,
                write("k", &i.to_string()),
                Outcome::Unknown,
                None,
                (i * 10, i * 10 + 5),
            ));
        }
        h.push(op(
            500,
            read("k"),
            Outcome::Ok,
            Some(Some("0")),
            (5000, 5001),
        ));
        let v = check_registers(&h, 10_000);
        assert_eq!(v.ops_checked, 2);
        assert_eq!(v.valid(), Some(true));
    }

    #[test]
    fn a_violation_is_shrunk_to_the_ops_that_cause_it() {
        // Lots of fine traffic, then a lost update: write 100 completes, a later read sees 99.
        let mut h = Vec::new();
        for i in 0..100u64 {
            let t = i * 100;
            h.push(op(
                2 * i,
                write("k", &i.to_string()),
                Outcome::Ok,
                None,
                (t, t + 10),
            ));
            h.push(op(
                2 * i + 1,
                read("k"),
                Outcome::Ok,
                Some(Some(&i.to_string())),
                (t + 20, t + 30),
            ));
        }
        h.push(op(
            300,
            write("k", "100"),
            Outcome::Ok,
            None,
            (20_000, 20_010),
        ));
        h.push(op(
            301,
            read("k"),
            Outcome::Ok,
            Some(Some("99")),
            (20_100, 20_110),
        ));
        let v = check_registers(&h, 1_000_000);
        assert_eq!(v.valid(), Some(false));
        let a = &v.anomalies[0];
        let idx: Vec<u64> = a.minimal_history.iter().map(|o| o.index).collect();
        // write 99, write 100, read 99: the read of 99 needs write 99, so it stays.
        assert_eq!(idx, vec![198, 300, 301], "{}", a.explanation);
    }

    #[test]
    fn the_verdict_says_no_to_a_double_cas() {
        let h = vec![
            op(0, cas("k", None, "1"), Outcome::Ok, None, (0, 10)),
            op(1, cas("k", Some("1"), "2"), Outcome::Ok, None, (20, 40)),
            op(2, cas("k", Some("1"), "3"), Outcome::Ok, None, (25, 45)),
        ];
        let v = check_registers(&h, 100_000);
        assert_eq!(v.valid(), Some(false));
        assert_eq!(v.anomalies[0].minimal_history.len(), 3);
    }
}
