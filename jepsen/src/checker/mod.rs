//! Checkers: pure functions from a history to a verdict.
//!
//! - [`linearizable`]: the WGL search, generic over a sequential model.
//! - [`register`]: per-key register linearizability of the key-value workload, with minimal
//!   failing sub-histories.
//! - [`dataset`]: every snapshot reported complete reads back byte-identical (the dataset
//!   workload).
//! - [`app`]: a stateful app never runs on two nodes at once, and after the faults every app
//!   runs exactly once on its node (the app workload).
//! - [`moves`]: no acknowledged append to a moving app is lost, and no two copies of it took
//!   appends at once (the move workload).
//! - [`stats`]: counts, latencies and the longest unavailability (informational).
//!
//! Each workload names the checkers that judge it ([`Checker`]); later workloads (the mesh) add
//! their own next to these.

pub mod app;
pub mod dataset;
pub mod failover;
pub mod linearizable;
pub mod moves;
pub mod register;
pub mod stats;
#[cfg(test)]
pub(crate) mod testutil;

use std::collections::BTreeSet;

use serde::Serialize;

use crate::history::{FaultInterval, History};

/// The answer of one checker.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    pub checker: String,
    /// `true`, `false`, or `null` when the checker could not decide.
    pub valid: Option<bool>,
    /// One line for humans.
    pub summary: String,
    /// The checker's own findings.
    pub details: serde_json::Value,
}

impl CheckResult {
    /// The answer of `checker`, with `details` (a verdict) as JSON, `null` if it does not
    /// serialize.
    pub(crate) fn new(
        checker: &str,
        valid: Option<bool>,
        summary: String,
        details: &impl Serialize,
    ) -> CheckResult {
        CheckResult {
            checker: checker.into(),
            valid,
            summary,
            details: serde_json::to_value(details).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// A verdict's validity: invalid with any anomaly, else undecided with anything undecided, else
/// valid.
pub(crate) fn validity<A, U>(anomalies: &[A], undecided: &[U]) -> Option<bool> {
    if !anomalies.is_empty() {
        Some(false)
    } else if !undecided.is_empty() {
        None
    } else {
        Some(true)
    }
}

/// The distinct kinds of findings, sorted, joined by commas (for a summary).
pub(crate) fn kinds_of<'a>(kinds: impl IntoIterator<Item = &'a str>) -> String {
    kinds
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join(", ")
}

/// The faults that overlap `from..to` (ns), as `fault (detail)`.
pub(crate) fn faults_in(faults: &[FaultInterval], from: u64, to: u64) -> Vec<String> {
    faults
        .iter()
        .filter(|f| f.start_ns < to && f.stop_ns > from)
        .map(|f| format!("{} ({})", f.fault, f.detail))
        .collect()
}

/// [`faults_in`], joined by commas, or `none`.
pub(crate) fn faults_during(faults: &[FaultInterval], from: u64, to: u64) -> String {
    let f = faults_in(faults, from, to);
    if f.is_empty() {
        "none".into()
    } else {
        f.join(", ")
    }
}

/// Something that judges a history.
pub trait Checker: Send + Sync {
    fn name(&self) -> &'static str;
    fn check(&self, history: &History) -> CheckResult;
}

/// Linearizability of the register workload's ops, key by key.
pub struct RegisterLinearizable {
    /// Search steps per key before the key is reported undecided.
    pub max_steps: u64,
}

impl Checker for RegisterLinearizable {
    fn name(&self) -> &'static str {
        "linearizable-registers"
    }

    fn check(&self, history: &History) -> CheckResult {
        let mut v = register::check_registers(&history.ops, self.max_steps);
        register::annotate(&mut v, &history.fault_intervals());
        let summary = match v.valid() {
            Some(true) => format!(
                "linearizable: {} ops on {} keys",
                v.ops_checked, v.keys_checked
            ),
            Some(false) => format!(
                "NOT linearizable: {} of {} keys have no linearization (first: {})",
                v.anomalies.len(),
                v.keys_checked,
                v.anomalies.first().map(|a| a.key.as_str()).unwrap_or("")
            ),
            None => format!(
                "undecided: the search ran out of budget on {} keys ({} ops on {} keys checked)",
                v.undecided_keys.len(),
                v.ops_checked,
                v.keys_checked
            ),
        };
        CheckResult::new(self.name(), v.valid(), summary, &v)
    }
}

/// Combines results: invalid if any is invalid, undecided if any is undecided, else valid.
pub fn overall(results: &[CheckResult]) -> Option<bool> {
    if results.iter().any(|r| r.valid == Some(false)) {
        Some(false)
    } else if results.iter().any(|r| r.valid.is_none()) {
        None
    } else {
        Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_verdict_helpers() {
        let none: [u8; 0] = [];
        assert_eq!(validity(&[1], &["u"]), Some(false));
        assert_eq!(validity(&none, &["u"]), None);
        assert_eq!(validity(&none, &none), Some(true));
        assert_eq!(kinds_of(["lost", "dup", "lost"]), "dup, lost");
        let faults = [FaultInterval {
            start_ns: 10,
            stop_ns: 20,
            fault: "kill".into(),
            detail: "kill -9 n1".into(),
        }];
        assert_eq!(faults_during(&faults, 15, 30), "kill (kill -9 n1)");
        assert_eq!(faults_during(&faults, 20, 30), "none");
        assert!(faults_in(&faults, 0, 10).is_empty());
        let r = CheckResult::new("x", None, "s".into(), &serde_json::json!({"a": 1}));
        assert_eq!((r.checker.as_str(), r.valid), ("x", None));
        assert_eq!(r.details["a"], 1);
    }
}
