//! Workloads: what the clients do, and which checkers judge the result.
//!
//! A workload generates calls ([`Workload::next_call`]), carries one out against a node
//! ([`Workload::invoke`]), names the calls to make once the cluster has healed (final reads) and
//! the checkers for its history. The runner supplies clients, timing, outcomes and faults.
//!
//! - [`register`]: read, write and compare-and-set on a few keys of the key-value namespace.
//! - [`dataset`]: datasets created, written, snapshotted and moved by one writer each; its
//!   writers run their own sequential protocol, so it does not go through [`Workload`].
//! - [`app`]: apps deployed and moved between nodes by one deployer, while pollers ask every
//!   node what it runs; like [`dataset`], it runs its own tasks.
//! - [`moves`]: clients append to a stateful test app through whichever node runs it while a
//!   mover moves it between nodes; its own tasks too.
//! - [`failover`]: the same clients on apps of its own whose datasets keep replicas, with no
//!   moves: the faults make them fail over.
//!
//! The mesh will add its own workload here.

pub mod app;
pub mod dataset;
pub mod failover;
pub mod moves;
pub mod register;

use std::future::Future;

use rand::rngs::StdRng;

use crate::checker::Checker;
use crate::client::{Api, Failure};
use crate::history::{Call, Op, Outcome};

/// What a call that got an answer returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    /// `Ok`, or `Fail` when the answer says the op did not take effect (a compare-and-set whose
    /// expectation did not hold).
    pub outcome: Outcome,
    pub read: Option<Option<String>>,
    pub revision: Option<u64>,
    pub note: Option<String>,
    /// What a dataset call returned.
    pub ds: Option<crate::history::DsResult>,
    /// What an app call returned.
    pub app: Option<crate::history::AppResult>,
}

impl Done {
    /// An ok answer that returned nothing.
    pub(crate) fn ok() -> Done {
        Done {
            outcome: Outcome::Ok,
            read: None,
            revision: None,
            note: None,
            ds: None,
            app: None,
        }
    }

    /// An ok answer of a dataset call.
    pub(crate) fn ds(ds: Option<crate::history::DsResult>) -> Done {
        Done { ds, ..Done::ok() }
    }

    /// An ok answer of an app call.
    pub(crate) fn app(app: crate::history::AppResult) -> Done {
        Done {
            app: Some(app),
            ..Done::ok()
        }
    }
}

pub trait Workload: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// The next call a client makes.
    fn next_call(&self, rng: &mut StdRng) -> Call;

    /// Makes `call` on a node. `Err` says what a failure means for its effect.
    fn invoke(
        &self,
        api: &mut Api,
        call: &Call,
    ) -> impl Future<Output = Result<Done, Failure>> + Send;

    /// Learns from a completed op (e.g. which values a compare-and-set can expect).
    fn observe(&self, op: &Op);

    /// Calls to make after the faults end and the cluster recovered, so the history ends with
    /// what the cluster finally holds.
    fn final_calls(&self) -> Vec<Call>;

    /// The checkers that judge this workload's history.
    fn checkers(&self) -> Vec<Box<dyn Checker>>;
}

/// Sleeps for `d` or until `stop`; true if stopped.
pub(crate) async fn pause(
    d: std::time::Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
