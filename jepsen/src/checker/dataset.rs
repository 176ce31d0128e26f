//! The dataset checker: every snapshot reported complete reads back byte-identical.
//!
//! A pure function of the history ([`crate::workload::dataset`] records it): the dataset ops of
//! the run, then, after the faults, each dataset's final state (`ds_state` with holders: the
//! recorded snapshots with name, guid and epoch) and each node's disk (`ds_read`: every
//! snapshot's files with size and SHA-256). The workload only ever adds files, each with a
//! unique name and recorded content, and never rolls back. For each dataset D:
//!
//! - **unrecorded**: a snapshot acknowledged `ok` (name, guid, epoch) is in D's final record.
//! - **unreadable**: an acknowledged snapshot is held (same name and guid) by at least one
//!   node whose disk was read (undecided when it is on none of them but some disk could not be
//!   read).
//! - **divergent**: every node that holds a recorded snapshot (same name and guid) holds the
//!   same files with the same bytes; and no copy holds anything but regular files.
//! - **missing-on-holder**: a holder that reports itself ready with D's newest snapshot holds
//!   every acknowledged snapshot.
//! - **lost-write** (same epoch): a write acknowledged `ok` to node P under epoch e, where an
//!   `ok` state read showed P as the primary of epoch e, is in every recorded snapshot of epoch e
//!   whose snapshot op was invoked after the write completed, byte for byte. (Sound without
//!   further assumptions: a snapshot recorded under epoch e was taken by e's primary, whose live
//!   directory is only ever replaced after it hands the dataset on, which ends epoch e.)
//! - **lost-write** (carried over by a move): a *fenced* acknowledged write of epoch e is in
//!   every recorded snapshot of a later epoch, and in the last snapshot of epoch e (the move's)
//!   when epoch e ended, unless retention pruned that one. Fenced: the last `ok` state read
//!   before the write showed its node as primary under its epoch with no move in progress, and
//!   every move op of D invoked before the
//!   write completed had failed, or had succeeded and completed before that state read began
//!   (so no move could start before the write was in place; a move whose outcome is unknown may
//!   take effect at any later time, so it unfences every later write of D).
//! - **foreign-content**: every file in a recorded snapshot was written by a write op of D that
//!   did not fail, with exactly that op's size and SHA-256, invoked before the snapshot op
//!   completed.
//! - **not-monotonic**: each recorded snapshot holds every file of the one recorded before it,
//!   with the same bytes (the workload never deletes or rewrites a file).
//! - **epoch-conflict**: no two `ok` state reads show different primaries for one epoch.
//! - **record-regressed**: a state read never shows a lower epoch, or a list of the snapshots a
//!   user took that is not an extension of the one, of a state read that completed before it
//!   began (desired state is linearizable, epochs only grow, and the workload never rolls back
//!   or removes a snapshot). Automatic snapshots (a move's `move-*`) are left out: retention
//!   prunes them.
//! - **snapshot-unseen**: a state read that began after a snapshot was acknowledged lists it.
//!
//! Each finding names the snapshots and holders it was seen on; one finding is reported once per
//! (kind, file), with how many snapshot copies showed it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::register::describe;
use super::{kinds_of, validity, CheckResult, Checker};
use crate::history::{
    file_digest, Call, DiskSnapshot, DsResult, DsSnap, DsState, History, Op, Outcome,
};

/// What the checker found in one dataset's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DatasetFigures {
    pub writes_ok: u64,
    pub writes_fail: u64,
    pub writes_unknown: u64,
    /// Acknowledged writes that were fenced (see the module's description).
    pub writes_fenced: u64,
    pub bytes_ok: u64,
    pub snapshots_ok: u64,
    pub snapshots_fail: u64,
    pub snapshots_unknown: u64,
    /// Snapshots in the final record (the writer's and the moves').
    pub recorded: u64,
    pub moves_ok: u64,
    pub moves_fail: u64,
    pub moves_unknown: u64,
    /// Epochs the dataset went through after the first: committed moves.
    pub moves_committed: u64,
    /// Copies of recorded snapshots read back (snapshot x node).
    pub copies_read: u64,
    /// File checks made (required writes found, files matched to their write).
    pub files_checked: u64,
    pub final_primary: String,
    pub final_holders: Vec<String>,
}

/// One finding.
#[derive(Clone, Debug, Serialize)]
pub struct DsAnomaly {
    pub dataset: String,
    pub kind: String,
    /// The file concerned, if one.
    pub file: Option<String>,
    /// Snapshot copies it was seen on, as `snapshot@node` (the first few).
    pub seen_on: Vec<String>,
    /// How many snapshot copies showed it.
    pub count: usize,
    pub explanation: String,
}

/// The dataset checker's findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DatasetVerdict {
    pub datasets: BTreeMap<String, DatasetFigures>,
    pub anomalies: Vec<DsAnomaly>,
    /// What could not be decided, and why.
    pub undecided: Vec<String>,
    /// Things worth knowing that are no violation.
    pub notes: Vec<String>,
    pub acknowledged_snapshots: u64,
    pub copies_read: u64,
    pub files_checked: u64,
}

impl DatasetVerdict {
    pub fn valid(&self) -> Option<bool> {
        validity(&self.anomalies, &self.undecided)
    }
}

/// The checker of the dataset workload.
pub struct SnapshotsReadBack;

impl Checker for SnapshotsReadBack {
    fn name(&self) -> &'static str {
        "datasets"
    }

    fn check(&self, history: &History) -> CheckResult {
        let v = check_datasets(&history.ops);
        let summary = match v.valid() {
            Some(true) => format!(
                "{} acknowledged snapshots of {} datasets read back byte-identical ({} copies, {} file checks)",
                v.acknowledged_snapshots,
                v.datasets.len(),
                v.copies_read,
                v.files_checked
            ),
            Some(false) => format!(
                "{} findings ({}) in {} datasets",
                v.anomalies.len(),
                kinds_of(v.anomalies.iter().map(|a| a.kind.as_str())),
                v.anomalies
                    .iter()
                    .map(|a| a.dataset.as_str())
                    .collect::<BTreeSet<_>>()
                    .len()
            ),
            None => format!("undecided: {}", v.undecided.join("; ")),
        };
        CheckResult::new(self.name(), v.valid(), summary, &v)
    }
}

fn state(op: &Op) -> Option<&DsState> {
    match (&op.ds, op.outcome) {
        (Some(DsResult::State(s)), Outcome::Ok) => Some(s),
        _ => None,
    }
}

/// A finding's kind and file.
type FindingKey = (String, Option<String>);

/// Findings of one kind on one file, merged over snapshot copies.
#[derive(Default)]
struct Findings {
    /// (kind, file) -> (explanation, seen_on, count)
    by: BTreeMap<FindingKey, (String, Vec<String>, usize)>,
}

impl Findings {
    fn add(
        &mut self,
        kind: &str,
        file: Option<&str>,
        seen_on: String,
        explain: impl FnOnce() -> String,
    ) {
        let e = self
            .by
            .entry((kind.to_string(), file.map(str::to_string)))
            .or_insert_with(|| (explain(), Vec::new(), 0));
        if e.1.len() < 6 {
            e.1.push(seen_on);
        }
        e.2 += 1;
    }

    fn into_anomalies(self, dataset: &str) -> Vec<DsAnomaly> {
        self.by
            .into_iter()
            .map(|((kind, file), (explanation, seen_on, count))| DsAnomaly {
                dataset: dataset.to_string(),
                kind,
                file,
                explanation: format!(
                    "{explanation}  seen on {count} snapshot copies: {}{}\n",
                    seen_on.join(", "),
                    if count > seen_on.len() { ", ..." } else { "" }
                ),
                seen_on,
                count,
            })
            .collect()
    }
}

/// Checks every dataset of `ops` (other ops are ignored).
pub fn check_datasets(ops: &[Op]) -> DatasetVerdict {
    let mut v = DatasetVerdict::default();
    // The latest ok disk read of each node, and the nodes whose disk could not be read.
    let mut disks: BTreeMap<&str, &crate::history::NodeDisk> = BTreeMap::new();
    let mut read_nodes: BTreeSet<&str> = BTreeSet::new();
    for op in ops {
        if let Call::DsRead { disk: node } = &op.call {
            read_nodes.insert(node);
            if let (Outcome::Ok, Some(DsResult::Disk(d))) = (op.outcome, &op.ds) {
                disks.insert(node, d);
            }
        }
    }
    let unread: Vec<&str> = read_nodes
        .iter()
        .filter(|n| !disks.contains_key(*n))
        .copied()
        .collect();
    if read_nodes.is_empty() {
        v.undecided
            .push("no node's disk was read (no ds_read op in the history)".into());
    }
    for n in &unread {
        v.notes.push(format!("{n}'s disk could not be read"));
    }
    let mut by_dataset: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        if matches!(op.call, Call::DsRead { .. }) || !op.call.is_dataset() {
            continue;
        }
        by_dataset.entry(op.call.key()).or_default().push(op);
    }
    for (name, ops) in by_dataset {
        check_one(name, &ops, &disks, &unread, &mut v);
    }
    v
}

fn check_one(
    name: &str,
    ops: &[&Op],
    disks: &BTreeMap<&str, &crate::history::NodeDisk>,
    unread: &[&str],
    v: &mut DatasetVerdict,
) {
    let mut fig = DatasetFigures::default();
    let mut found = Findings::default();
    let created = ops.iter().any(|o| {
        (matches!(o.call, Call::DsCreate { .. }) && o.outcome != Outcome::Fail)
            || state(o).is_some()
    });
    // The final state: the last ok state read with the holders' reports, made after every
    // write and snapshot of the dataset.
    let last_change = ops
        .iter()
        .filter(|o| !o.call.is_read())
        .map(|o| o.complete_ns)
        .max()
        .unwrap_or(0);
    let Some(fin) = ops
        .iter()
        .filter(|o| matches!(o.call, Call::DsState { holders: true, .. }))
        .filter(|o| o.invoke_ns >= last_change)
        .filter_map(|o| state(o))
        .next_back()
    else {
        if created {
            v.undecided.push(format!(
                "{name}: its final state was not read after its last write or snapshot"
            ));
        }
        return;
    };
    let local = format!("{name}.{}", fin.id);
    fig.recorded = fin.snapshots.len() as u64;
    fig.moves_committed = fin.epoch.saturating_sub(1);
    fig.final_primary = fin.primary.clone();
    fig.final_holders = fin.holders.iter().map(|h| h.node.clone()).collect();
    let record: HashMap<&str, (usize, &DsSnap)> = fin
        .snapshots
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), (i, s)))
        .collect();

    // Epoch -> primary, from every ok state read.
    let mut primaries: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    let mut states: Vec<&Op> = Vec::new();
    for o in ops {
        if let Some(s) = state(o) {
            primaries.entry(s.epoch).or_default().insert(&s.primary);
            states.push(o);
        }
    }
    states.sort_by_key(|o| o.complete_ns);
    for (epoch, ps) in &primaries {
        if ps.len() > 1 {
            found.add("epoch-conflict", None, format!("epoch {epoch}"), || {
                format!(
                    "dataset {name}: state reads showed different primaries for epoch {epoch}: {}\n",
                    ps.iter().copied().collect::<Vec<_>>().join(", ")
                )
            });
        }
    }
    let primary_of = |e: u64| -> Option<&str> {
        primaries
            .get(&e)
            .filter(|p| p.len() == 1)
            .and_then(|p| p.iter().next().copied())
    };

    let moves: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o.call, Call::DsMove { .. }))
        .copied()
        .collect();
    for m in &moves {
        match m.outcome {
            Outcome::Ok => fig.moves_ok += 1,
            Outcome::Fail => fig.moves_fail += 1,
            Outcome::Unknown => fig.moves_unknown += 1,
        }
    }
    // Writes by file name (each file is written by one op).
    let mut writes: HashMap<&str, &Op> = HashMap::new();
    let mut fenced: HashMap<&str, bool> = HashMap::new();
    for o in ops {
        let Call::DsWrite {
            file,
            bytes,
            primary: node,
            epoch,
            ..
        } = &o.call
        else {
            continue;
        };
        writes.insert(file, o);
        match o.outcome {
            Outcome::Ok => {
                fig.writes_ok += 1;
                fig.bytes_ok += bytes;
            }
            Outcome::Fail => fig.writes_fail += 1,
            Outcome::Unknown => fig.writes_unknown += 1,
        }
        if o.outcome != Outcome::Ok {
            continue;
        }
        let before = states.iter().rev().find(|s| s.complete_ns <= o.invoke_ns);
        let is_fenced = before.is_some_and(|r| {
            let s = state(r).expect("ok state reads only");
            &s.primary == node
                && s.epoch == *epoch
                && s.moving_to.is_empty()
                && moves
                    .iter()
                    .filter(|m| m.invoke_ns < o.complete_ns)
                    .all(|m| match m.outcome {
                        Outcome::Fail => true,
                        Outcome::Ok => m.complete_ns < r.invoke_ns,
                        Outcome::Unknown => false,
                    })
        });
        if is_fenced {
            fig.writes_fenced += 1;
        }
        fenced.insert(file, is_fenced);
    }
    // Snapshot ops by tag.
    let mut snap_ops: HashMap<&str, &Op> = HashMap::new();
    for o in ops {
        if let Call::DsSnapshot { tag, .. } = &o.call {
            snap_ops.insert(tag, o);
            match o.outcome {
                Outcome::Ok => fig.snapshots_ok += 1,
                Outcome::Fail => fig.snapshots_fail += 1,
                Outcome::Unknown => fig.snapshots_unknown += 1,
            }
        }
    }

    // The record read by read: never older than a read that completed before it began.
    for (j, r2) in states.iter().enumerate() {
        let s2 = state(r2).expect("ok state reads only");
        for r1 in states[..j]
            .iter()
            .filter(|r1| r1.complete_ns < r2.invoke_ns)
        {
            let s1 = state(r1).expect("ok state reads only");
            let kept = |s: &DsState| -> Vec<DsSnap> {
                s.snapshots
                    .iter()
                    .filter(|x| !flock_scheduler::retention::is_automatic(&x.name))
                    .cloned()
                    .collect()
            };
            let (k1, k2) = (kept(s1), kept(s2));
            let prefix = k1.len() <= k2.len() && k1[..] == k2[..k1.len()];
            if s1.epoch > s2.epoch || !prefix {
                found.add(
                    "record-regressed",
                    None,
                    format!("read #{}", r2.index),
                    || {
                        format!(
                            "dataset {name}: a state read shows an older record than one that completed before it began (epoch {} then {}; {} then {} snapshots taken by the workload{}):\n  {}\n  {}\n",
                            s1.epoch,
                            s2.epoch,
                            k1.len(),
                            k2.len(),
                            if prefix { "" } else { ", not a prefix" },
                            describe(r1),
                            describe(r2)
                        )
                    },
                );
                break;
            }
        }
    }
    // An acknowledged snapshot is in every state read that began after it completed.
    for so in snap_ops.values().filter(|o| o.outcome == Outcome::Ok) {
        let Some(DsResult::Snapshot(ack)) = &so.ds else {
            continue;
        };
        for r in states.iter().filter(|r| r.invoke_ns > so.complete_ns) {
            let st = state(r).expect("ok state reads only");
            if !st.snapshots.contains(ack) {
                found.add(
                    "snapshot-unseen",
                    None,
                    format!("{}@read #{}", ack.name, r.index),
                    || {
                        format!(
                            "dataset {name}: snapshot {} was acknowledged, but a state read that began afterwards does not list it:\n  {}\n  {}\n",
                            ack.name,
                            describe(so),
                            describe(r)
                        )
                    },
                );
            }
        }
    }

    // Copies on disk: snapshot name -> [(node, copy)] with the recorded guid.
    let mut copies: BTreeMap<&str, Vec<(&str, &DiskSnapshot)>> = BTreeMap::new();
    for (node, disk) in disks {
        let Some(dd) = disk.datasets.iter().find(|d| d.local_name == local) else {
            continue;
        };
        for s in &dd.snapshots {
            match record.get(s.name.as_str()) {
                Some((_, r)) if r.guid == s.guid => {
                    copies.entry(r.name.as_str()).or_default().push((node, s))
                }
                Some((_, r)) => v.notes.push(format!(
                    "{name}: {node} holds a snapshot named {} with guid {}, the record says {}",
                    s.name, s.guid, r.guid
                )),
                None => {}
            }
        }
    }
    // Acknowledged snapshots: recorded, readable, on every up-to-date holder.
    let latest = fin.snapshots.last().map(|s| s.name.as_str()).unwrap_or("");
    let current_holders: Vec<&str> = fin
        .holders
        .iter()
        .filter(|h| h.state == "ready" && h.latest_snapshot == latest)
        .map(|h| h.node.as_str())
        .collect();
    for h in fin
        .holders
        .iter()
        .filter(|h| !current_holders.contains(&h.node.as_str()))
    {
        v.notes.push(format!(
            "{name}: holder {} ({}) was {} with {:?} at the end, not ready with {latest:?}",
            h.node, h.role, h.state, h.latest_snapshot
        ));
    }
    let mut tags: Vec<(&&str, &&Op)> = snap_ops.iter().collect();
    tags.sort_by_key(|(_, o)| o.index);
    for (tag, op) in tags {
        if op.outcome != Outcome::Ok {
            continue;
        }
        v.acknowledged_snapshots += 1;
        let Some(DsResult::Snapshot(ack)) = &op.ds else {
            found.add("unrecorded", None, format!("{tag}@-"), || {
                format!(
                    "dataset {name}: snapshot {tag} was acknowledged without its record:\n  {}\n",
                    describe(op)
                )
            });
            continue;
        };
        let rec = record.get(ack.name.as_str()).map(|(_, r)| *r);
        if rec != Some(ack) {
            found.add("unrecorded", None, format!("{}@record", ack.name), || {
                format!(
                    "dataset {name}: snapshot {} (guid {}, epoch {}) was acknowledged, but the final record {}:\n  {}\n",
                    ack.name,
                    ack.guid,
                    ack.epoch,
                    match rec {
                        Some(r) => format!("has guid {} epoch {}", r.guid, r.epoch),
                        None => "does not list it".to_string(),
                    },
                    describe(op)
                )
            });
            continue;
        }
        let held: Vec<&str> = copies
            .get(ack.name.as_str())
            .map(|c| c.iter().map(|(n, _)| *n).collect())
            .unwrap_or_default();
        if held.is_empty() {
            if unread.is_empty() {
                found.add("unreadable", None, format!("{}@-", ack.name), || {
                    format!(
                        "dataset {name}: acknowledged snapshot {} (guid {}) is on no node's disk:\n  {}\n",
                        ack.name,
                        ack.guid,
                        describe(op)
                    )
                });
            } else {
                v.undecided.push(format!(
                    "{name}: acknowledged snapshot {} is on none of the disks read ({} not read)",
                    ack.name,
                    unread.join(", ")
                ));
            }
        }
        for h in &current_holders {
            if disks.contains_key(h) && !held.contains(h) {
                found.add(
                    "missing-on-holder",
                    None,
                    format!("{}@{h}", ack.name),
                    || {
                        format!(
                            "dataset {name}: holder {h} reported itself ready with the newest snapshot {latest} but lacks acknowledged snapshot {}\n",
                            ack.name
                        )
                    },
                );
            }
        }
    }

    // Copies agree.
    for (snap, cs) in &copies {
        for (node, c) in cs {
            fig.copies_read += 1;
            for p in &c.problems {
                found.add("divergent", None, format!("{snap}@{node}"), || {
                    format!("dataset {name}: snapshot {snap} on {node}: {p}\n")
                });
            }
        }
        let (n0, c0) = cs[0];
        for (n, c) in &cs[1..] {
            if c.files != c0.files {
                let keys: BTreeSet<&String> = c0.files.keys().chain(c.files.keys()).collect();
                let diff: Vec<String> = keys
                    .into_iter()
                    .filter(|k| c0.files.get(*k) != c.files.get(*k))
                    .take(5)
                    .map(|k| format!("{k}: {n0}={:?} {n}={:?}", c0.files.get(k), c.files.get(k)))
                    .collect();
                found.add("divergent", None, format!("{snap}@{n}"), || {
                    format!(
                        "dataset {name}: the copies of snapshot {snap} on {n0} and {n} differ: {}\n",
                        diff.join("; ")
                    )
                });
            }
        }
    }

    // Contents of each recorded snapshot, copy by copy.
    // The last recorded snapshot of each epoch, when it is the move's that ended the epoch: not
    // when it is one the workload took, which happens when retention pruned the move's (that
    // one need not hold the writes after it; later epochs' snapshots still must).
    let last_of_epoch: BTreeMap<u64, usize> = fin
        .snapshots
        .iter()
        .enumerate()
        .map(|(i, s)| (s.epoch, i))
        .collect::<BTreeMap<u64, usize>>()
        .into_iter()
        .filter(|(_, i)| !snap_ops.contains_key(fin.snapshots[*i].name.as_str()))
        .collect();
    let ok_writes: Vec<(&str, &Op)> = {
        let mut w: Vec<(&str, &Op)> = writes
            .iter()
            .filter(|(_, o)| o.outcome == Outcome::Ok)
            .map(|(f, o)| (*f, *o))
            .collect();
        w.sort_by_key(|(_, o)| o.index);
        w
    };
    for (i, s) in fin.snapshots.iter().enumerate() {
        let Some(cs) = copies.get(s.name.as_str()) else {
            continue;
        };
        let sop = snap_ops.get(s.name.as_str()).copied();
        // The writes this snapshot must hold.
        let required: Vec<(&str, &Op, &str)> = ok_writes
            .iter()
            .filter_map(|(f, w)| {
                let Call::DsWrite {
                    primary: node,
                    epoch,
                    ..
                } = &w.call
                else {
                    return None;
                };
                let same_epoch = *epoch == s.epoch
                    && primary_of(*epoch) == Some(node.as_str())
                    && sop.is_some_and(|so| w.complete_ns < so.invoke_ns);
                let carried = fenced.get(f).copied().unwrap_or(false)
                    && (s.epoch > *epoch
                        || (s.epoch == *epoch
                            && fin.epoch > *epoch
                            && last_of_epoch.get(epoch) == Some(&i)));
                if same_epoch {
                    Some((*f, *w, "same-epoch"))
                } else if carried {
                    Some((*f, *w, "carried"))
                } else {
                    None
                }
            })
            .collect();
        for (node, c) in cs {
            let at = format!("{}@{node}", s.name);
            for (f, w, why) in &required {
                let Call::DsWrite { bytes, sha256, .. } = &w.call else {
                    continue;
                };
                fig.files_checked += 1;
                let want = file_digest(*bytes, sha256);
                match c.files.get(*f) {
                    Some(got) if *got == want => {}
                    got => found.add("lost-write", Some(f), at.clone(), || {
                        format!(
                            "dataset {name}: acknowledged write of {f} is {} in snapshot {} (epoch {}) on {node}; {}:\n  {}\n{}",
                            match got {
                                Some(g) => format!("different ({g}, written {want})"),
                                None => "missing".to_string(),
                            },
                            s.name,
                            s.epoch,
                            if *why == "same-epoch" {
                                "the write completed under the same epoch before the snapshot was asked for"
                            } else {
                                "the write was fenced (no move could begin before it was in place) and an epoch it belonged to has since been handed on"
                            },
                            describe(w),
                            sop.map(|so| format!("  {}\n", describe(so))).unwrap_or_default()
                        )
                    }),
                }
            }
            for (f, got) in &c.files {
                fig.files_checked += 1;
                let Some(w) = writes.get(f.as_str()) else {
                    found.add("foreign-content", Some(f), at.clone(), || {
                        format!(
                            "dataset {name}: snapshot {} on {node} holds {f} ({got}), which no write of the history made\n",
                            s.name
                        )
                    });
                    continue;
                };
                let Call::DsWrite { bytes, sha256, .. } = &w.call else {
                    continue;
                };
                let want = file_digest(*bytes, sha256);
                let problem = if w.outcome == Outcome::Fail {
                    Some("its write failed (certainly not made)".to_string())
                } else if *got != want {
                    Some(format!(
                        "its content {got} is not what was written ({want})"
                    ))
                } else if sop
                    .is_some_and(|so| so.outcome == Outcome::Ok && w.invoke_ns > so.complete_ns)
                {
                    Some("its write began after the snapshot had completed".to_string())
                } else {
                    None
                };
                if let Some(p) = problem {
                    found.add("foreign-content", Some(f), at.clone(), || {
                        format!(
                            "dataset {name}: snapshot {} on {node} holds {f}, but {p}:\n  {}\n{}",
                            s.name,
                            describe(w),
                            sop.map(|so| format!("  {}\n", describe(so)))
                                .unwrap_or_default()
                        )
                    });
                }
            }
        }
        // Monotonic: this snapshot holds everything the previous recorded one held.
        if i > 0 {
            let prev = &fin.snapshots[i - 1];
            if let Some(pcs) = copies.get(prev.name.as_str()) {
                let (pn, pc) = pcs[0];
                let (n, c) = cs[0];
                for (f, d) in &pc.files {
                    if c.files.get(f) != Some(d) {
                        found.add("not-monotonic", Some(f), format!("{}@{n}", s.name), || {
                            format!(
                                "dataset {name}: {f} ({d}) is in snapshot {} (on {pn}) but {} in the next recorded snapshot {} (on {n})\n",
                                prev.name,
                                match c.files.get(f) {
                                    Some(g) => format!("different ({g})"),
                                    None => "missing".to_string(),
                                },
                                s.name
                            )
                        });
                    }
                }
            }
        }
    }
    v.copies_read += fig.copies_read;
    v.files_checked += fig.files_checked;
    v.anomalies.extend(found.into_anomalies(name));
    v.datasets.insert(name.to_string(), fig);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{DiskDataset, DsHolder, NodeDisk};

    /// Builds a history op by op, with increasing times.
    struct H {
        ops: Vec<Op>,
        t: u64,
        /// What the record holds so far (state reads list it).
        recorded: Vec<DsSnap>,
    }

    const D: &str = "jd0-0";

    fn data(f: &str) -> (u64, String) {
        (
            f.len() as u64 * 100,
            format!("{:0>64}", f.trim_start_matches('f')),
        )
    }

    impl H {
        fn new() -> H {
            H {
                ops: Vec::new(),
                t: 0,
                recorded: Vec::new(),
            }
        }
        fn push(&mut self, call: Call, outcome: Outcome, ds: Option<DsResult>) -> &mut Op {
            self.t += 10;
            self.ops.push(Op {
                index: self.ops.len() as u64,
                process: 0,
                node: "n1".into(),
                call,
                outcome,
                read: None,
                revision: None,
                invoke_ns: self.t,
                complete_ns: self.t + 5,
                error: None,
                ds,
                app: None,
            });
            self.ops.last_mut().expect("just pushed")
        }
        fn state(&mut self, primary: &str, epoch: u64, moving: &str) {
            self.push(
                Call::DsState {
                    dataset: D.into(),
                    holders: false,
                },
                Outcome::Ok,
                Some(DsResult::State(DsState {
                    id: 1,
                    primary: primary.into(),
                    epoch,
                    moving_to: moving.into(),
                    snapshots: self.recorded.clone(),
                    ..Default::default()
                })),
            );
        }
        /// A snapshot recorded without an op of the writer (a move's).
        fn record(&mut self, name: &str, epoch: u64) {
            self.recorded.push(DsSnap {
                name: name.into(),
                guid: guid(name),
                epoch,
            });
        }
        fn write(&mut self, f: &str, node: &str, epoch: u64, outcome: Outcome) {
            let (bytes, sha256) = data(f);
            self.push(
                Call::DsWrite {
                    dataset: D.into(),
                    file: f.into(),
                    bytes,
                    sha256,
                    primary: node.into(),
                    epoch,
                },
                outcome,
                None,
            );
        }
        fn snapshot(&mut self, tag: &str, epoch: u64, outcome: Outcome) {
            let ds = (outcome == Outcome::Ok).then(|| {
                DsResult::Snapshot(DsSnap {
                    name: tag.into(),
                    guid: guid(tag),
                    epoch,
                })
            });
            if outcome == Outcome::Ok {
                self.record(tag, epoch);
            }
            self.push(
                Call::DsSnapshot {
                    dataset: D.into(),
                    tag: tag.into(),
                },
                outcome,
                ds,
            );
        }
        fn do_move(&mut self, to: &str, outcome: Outcome) {
            self.push(
                Call::DsMove {
                    dataset: D.into(),
                    to: to.into(),
                },
                outcome,
                None,
            );
        }
        fn fin(&mut self, primary: &str, epoch: u64, snaps: &[(&str, u64)], holders: &[&str]) {
            let snapshots: Vec<DsSnap> = snaps
                .iter()
                .map(|(n, e)| DsSnap {
                    name: n.to_string(),
                    guid: guid(n),
                    epoch: *e,
                })
                .collect();
            let latest = snapshots.last().map(|s| s.name.clone()).unwrap_or_default();
            self.push(
                Call::DsState {
                    dataset: D.into(),
                    holders: true,
                },
                Outcome::Ok,
                Some(DsResult::State(DsState {
                    id: 1,
                    primary: primary.into(),
                    epoch,
                    moving_to: String::new(),
                    snapshots,
                    holders: holders
                        .iter()
                        .map(|h| DsHolder {
                            node: h.to_string(),
                            role: if *h == primary { "primary" } else { "replica" }.into(),
                            state: "ready".into(),
                            latest_snapshot: latest.clone(),
                            mount_path: "/data/x".into(),
                        })
                        .collect(),
                })),
            );
        }
        /// A node's disk: snapshots with the files they hold.
        fn disk(&mut self, node: &str, snaps: &[(&str, &[&str])]) {
            let snapshots = snaps
                .iter()
                .map(|(n, files)| DiskSnapshot {
                    name: n.to_string(),
                    guid: guid(n),
                    files: files
                        .iter()
                        .map(|f| {
                            let (b, s) = data(f);
                            (f.to_string(), file_digest(b, &s))
                        })
                        .collect(),
                    problems: Vec::new(),
                })
                .collect();
            self.push(
                Call::DsRead { disk: node.into() },
                Outcome::Ok,
                Some(DsResult::Disk(NodeDisk {
                    datasets: vec![DiskDataset {
                        local_name: format!("{D}.1"),
                        snapshots,
                    }],
                })),
            );
        }
    }

    fn guid(name: &str) -> u64 {
        name.bytes().map(u64::from).sum::<u64>() * 7 + 1
    }

    /// Two writes and snapshots on n1, a move to n2 (its snapshot `m1`), a write and a
    /// snapshot on n2; both nodes read back.
    fn good() -> H {
        let mut h = H::new();
        h.push(
            Call::DsCreate {
                dataset: D.into(),
                primary: "n1".into(),
            },
            Outcome::Ok,
            None,
        );
        h.state("n1", 1, "");
        h.write("f00001", "n1", 1, Outcome::Ok);
        h.snapshot("s00001", 1, Outcome::Ok);
        h.state("n1", 1, "");
        h.write("f00002", "n1", 1, Outcome::Ok);
        h.snapshot("s00002", 1, Outcome::Ok);
        h.do_move("n2", Outcome::Ok);
        h.state("n1", 1, "n2");
        h.record("m1", 1);
        h.state("n2", 2, "");
        h.write("f00003", "n2", 2, Outcome::Ok);
        h.snapshot("s00003", 2, Outcome::Ok);
        h
    }

    fn finish_good(h: &mut H) {
        h.fin(
            "n2",
            2,
            &[("s00001", 1), ("s00002", 1), ("m1", 1), ("s00003", 2)],
            &["n1", "n2"],
        );
        let all: &[(&str, &[&str])] = &[
            ("s00001", &["f00001"]),
            ("s00002", &["f00001", "f00002"]),
            ("m1", &["f00001", "f00002"]),
            ("s00003", &["f00001", "f00002", "f00003"]),
        ];
        h.disk("n1", all);
        h.disk("n2", all);
    }

    fn kinds(v: &DatasetVerdict) -> Vec<&str> {
        v.anomalies.iter().map(|a| a.kind.as_str()).collect()
    }

    #[test]
    fn a_history_whose_snapshots_read_back_is_valid() {
        let mut h = good();
        finish_good(&mut h);
        let v = check_datasets(&h.ops);
        assert_eq!(v.valid(), Some(true), "{v:#?}");
        assert_eq!(v.acknowledged_snapshots, 3);
        assert_eq!(v.copies_read, 8);
        let f = &v.datasets[D];
        assert_eq!((f.writes_ok, f.writes_fenced, f.moves_committed), (3, 3, 1));
        assert!(v.files_checked > 10);
    }

    #[test]
    fn a_write_missing_from_a_later_snapshot_is_a_lost_write() {
        let mut h = good();
        h.fin(
            "n2",
            2,
            &[("s00001", 1), ("s00002", 1), ("m1", 1), ("s00003", 2)],
            &["n1", "n2"],
        );
        // n2's copy of s00003 lacks f00002 (on both nodes, so the copies agree).
        let bad: &[(&str, &[&str])] = &[
            ("s00001", &["f00001"]),
            ("s00002", &["f00001", "f00002"]),
            ("m1", &["f00001", "f00002"]),
            ("s00003", &["f00001", "f00003"]),
        ];
        h.disk("n1", bad);
        h.disk("n2", bad);
        let v = check_datasets(&h.ops);
        assert_eq!(v.valid(), Some(false));
        let k = kinds(&v);
        assert!(k.contains(&"lost-write"), "{k:?}");
        assert!(k.contains(&"not-monotonic"), "{k:?}");
        let lost = v.anomalies.iter().find(|a| a.kind == "lost-write").unwrap();
        assert_eq!(lost.file.as_deref(), Some("f00002"));
        assert_eq!(lost.count, 2, "seen on both copies of s00003: {lost:?}");
        assert!(lost.explanation.contains("missing"), "{}", lost.explanation);
    }

    #[test]
    fn copies_that_differ_are_divergent() {
        let mut h = good();
        h.fin(
            "n2",
            2,
            &[("s00001", 1), ("s00002", 1), ("m1", 1), ("s00003", 2)],
            &["n1", "n2"],
        );
        let good_disk: &[(&str, &[&str])] = &[
            ("s00001", &["f00001"]),
            ("s00002", &["f00001", "f00002"]),
            ("m1", &["f00001", "f00002"]),
            ("s00003", &["f00001", "f00002", "f00003"]),
        ];
        h.disk("n1", good_disk);
        h.disk("n2", good_disk);
        // n2's copy of s00001 has other bytes in f00001.
        if let Some(DsResult::Disk(d)) = &mut h.ops.last_mut().unwrap().ds {
            d.datasets[0].snapshots[0]
                .files
                .insert("f00001".into(), "600:ffff".into());
        }
        let v = check_datasets(&h.ops);
        assert_eq!(v.valid(), Some(false));
        let k = kinds(&v);
        assert!(k.contains(&"divergent"), "{k:?}");
        // Its content matches no write either.
        assert!(k.contains(&"foreign-content"), "{k:?}");
    }

    #[test]
    fn an_acknowledged_snapshot_the_record_lacks_is_unrecorded() {
        let mut h = good();
        // The record lost s00002.
        h.fin(
            "n2",
            2,
            &[("s00001", 1), ("m1", 1), ("s00003", 2)],
            &["n1", "n2"],
        );
        let disk: &[(&str, &[&str])] = &[
            ("s00001", &["f00001"]),
            ("m1", &["f00001", "f00002"]),
            ("s00003", &["f00001", "f00002", "f00003"]),
        ];
        h.disk("n1", disk);
        h.disk("n2", disk);
        let v = check_datasets(&h.ops);
        // Also seen as a record that went back (the final read lacks what earlier reads had).
        assert_eq!(
            kinds(&v),
            vec!["record-regressed", "snapshot-unseen", "unrecorded"],
            "{v:#?}"
        );
    }

    #[test]
    fn an_acknowledged_snapshot_on_no_disk_is_unreadable_or_undecided() {
        let mut h = good();
        h.fin(
            "n2",
            2,
            &[("s00001", 1), ("s00002", 1), ("m1", 1), ("s00003", 2)],
            &["n1", "n2"],
        );
        let disk: &[(&str, &[&str])] = &[
            ("s00001", &["f00001"]),
            ("m1", &["f00001", "f00002"]),
            ("s00003", &["f00001", "f00002", "f00003"]),
        ];
        h.disk("n1", disk);
        h.disk("n2", disk);
        let v = check_datasets(&h.ops);
        let k = kinds(&v);
        assert!(k.contains(&"unreadable"), "{k:?}");
        assert!(k.contains(&"missing-on-holder"), "{k:?}");
        // With a node whose disk could not be read, it may be there: undecided.
        let mut h2 = good();
        // The only holder is the node whose disk could not be read.
        h2.fin(
            "n2",
            2,
            &[("s00001", 1), ("s00002", 1), ("m1", 1), ("s00003", 2)],
            &["n3"],
        );
        h2.disk("n2", disk);
        h2.push(Call::DsRead { disk: "n3".into() }, Outcome::Fail, None);
        let v2 = check_datasets(&h2.ops);
        assert_eq!(v2.valid(), None, "{v2:#?}");
    }

    #[test]
    fn a_failed_writes_file_in_a_snapshot_is_foreign() {
        let mut h = good();
        h.state("n2", 2, "");
        h.write("f00004", "n2", 2, Outcome::Fail);
        h.fin(
            "n2",
            2,
            &[
                ("s00001", 1),
                ("s00002", 1),
                ("m1", 1),
                ("s00003", 2),
                ("s00005", 2),
            ],
            &["n2"],
        );
        h.disk(
            "n2",
            &[
                ("s00001", &["f00001"]),
                ("s00002", &["f00001", "f00002"]),
                ("m1", &["f00001", "f00002"]),
                ("s00003", &["f00001", "f00002", "f00003"]),
                ("s00005", &["f00001", "f00002", "f00003", "f00004"]),
            ],
        );
        let v = check_datasets(&h.ops);
        assert_eq!(kinds(&v), vec!["foreign-content"], "{v:#?}");
        assert!(v.anomalies[0].explanation.contains("failed"));
    }

    /// A write whose own snapshot failed, then a move: the move must carry it, unless a move
    /// of unknown outcome could have begun before the write was in place.
    fn carried(unknown_move_before: bool) -> DatasetVerdict {
        let mut h = H::new();
        h.state("n1", 1, "");
        if unknown_move_before {
            h.do_move("n3", Outcome::Unknown);
            h.state("n1", 1, "");
        }
        h.write("f00001", "n1", 1, Outcome::Ok);
        h.snapshot("s00001", 1, Outcome::Fail);
        h.do_move("n2", Outcome::Ok);
        h.record("m1", 1);
        h.state("n2", 2, "");
        h.write("f00002", "n2", 2, Outcome::Ok);
        h.snapshot("s00002", 2, Outcome::Ok);
        h.fin("n2", 2, &[("m1", 1), ("s00002", 2)], &["n1", "n2"]);
        // The move's snapshot missed f00001.
        let disk: &[(&str, &[&str])] = &[("m1", &[]), ("s00002", &["f00002"])];
        h.disk("n1", disk);
        h.disk("n2", disk);
        check_datasets(&h.ops)
    }

    #[test]
    fn a_fenced_write_must_survive_the_move() {
        let v = carried(false);
        assert_eq!(kinds(&v), vec!["lost-write"], "{v:#?}");
        assert!(v.anomalies[0].explanation.contains("fenced"));
        // Not fenced: the unknown move may have taken its snapshot before the write.
        let v = carried(true);
        assert_eq!(v.valid(), Some(true), "{v:#?}");
        assert_eq!(v.datasets[D].writes_fenced, 0);
    }

    #[test]
    fn a_snapshot_with_a_file_written_after_it_completed_is_foreign() {
        let mut h = good();
        h.state("n2", 2, "");
        h.write("f00004", "n2", 2, Outcome::Unknown);
        h.fin(
            "n2",
            2,
            &[("s00001", 1), ("s00002", 1), ("m1", 1), ("s00003", 2)],
            &["n2"],
        );
        h.disk(
            "n2",
            &[
                ("s00001", &["f00001"]),
                ("s00002", &["f00001", "f00002"]),
                ("m1", &["f00001", "f00002"]),
                ("s00003", &["f00001", "f00002", "f00003", "f00004"]),
            ],
        );
        let v = check_datasets(&h.ops);
        assert_eq!(kinds(&v), vec!["foreign-content"], "{v:#?}");
        assert!(v.anomalies[0].explanation.contains("after the snapshot"));
    }

    #[test]
    fn a_move_snapshot_that_retention_pruned_is_no_regression() {
        let mut h = H::new();
        h.push(
            Call::DsCreate {
                dataset: D.into(),
                primary: "n1".into(),
            },
            Outcome::Ok,
            None,
        );
        h.state("n1", 1, "");
        h.write("f00001", "n1", 1, Outcome::Ok);
        h.snapshot("s00001", 1, Outcome::Ok);
        // A fenced write after s00001: the move's snapshot held it, s00001 cannot.
        h.state("n1", 1, "");
        h.write("f00003", "n1", 1, Outcome::Ok);
        h.do_move("n2", Outcome::Ok);
        h.record("move-1", 1);
        h.state("n2", 2, "");
        h.write("f00002", "n2", 2, Outcome::Ok);
        h.snapshot("s00002", 2, Outcome::Ok);
        // Retention forgot move-1; the workload's own snapshots are all there.
        h.fin("n2", 2, &[("s00001", 1), ("s00002", 2)], &["n1", "n2"]);
        let all: &[(&str, &[&str])] = &[
            ("s00001", &["f00001"]),
            ("s00002", &["f00001", "f00003", "f00002"]),
        ];
        h.disk("n1", all);
        h.disk("n2", all);
        let v = check_datasets(&h.ops);
        assert!(kinds(&v).is_empty(), "{:?}", v.anomalies);
    }

    #[test]
    fn a_read_that_forgets_the_record_regressed() {
        let mut h = good();
        // After s00003 was acknowledged, a read shows the record of before the move.
        h.push(
            Call::DsState {
                dataset: D.into(),
                holders: false,
            },
            Outcome::Ok,
            Some(DsResult::State(DsState {
                id: 1,
                primary: "n1".into(),
                epoch: 1,
                snapshots: vec![DsSnap {
                    name: "s00001".into(),
                    guid: guid("s00001"),
                    epoch: 1,
                }],
                ..Default::default()
            })),
        );
        finish_good(&mut h);
        let v = check_datasets(&h.ops);
        let k = kinds(&v);
        assert!(k.contains(&"snapshot-unseen"), "{k:?}");
        assert!(k.contains(&"record-regressed"), "{k:?}");
    }

    #[test]
    fn two_primaries_for_one_epoch_conflict_and_no_final_state_is_undecided() {
        let mut h = good();
        h.state("n3", 2, "");
        finish_good(&mut h);
        assert!(kinds(&check_datasets(&h.ops)).contains(&"epoch-conflict"));
        let h = good();
        let mut ops = h.ops.clone();
        ops.push(Op {
            index: 99,
            call: Call::DsRead { disk: "n1".into() },
            ds: Some(DsResult::Disk(NodeDisk::default())),
            ..h.ops[0].clone()
        });
        assert_eq!(check_datasets(&ops).valid(), None);
    }
}
