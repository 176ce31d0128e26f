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
pub mod linearizable;
pub mod moves;
pub mod register;
pub mod stats;

use serde::Serialize;

use crate::history::History;

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
        CheckResult {
            checker: self.name().into(),
            valid: v.valid(),
            summary,
            details: serde_json::to_value(&v).unwrap_or(serde_json::Value::Null),
        }
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
