//! Hand-built histories for the checkers' tests.

use std::marker::PhantomData;

use crate::history::{AppResult, Call, History, NemesisEvent, Op, Outcome, Record};

/// Milliseconds in nanoseconds.
pub(crate) fn ms(t: u64) -> u64 {
    t * 1_000_000
}

/// A history built record by record; times in milliseconds. `W` names the workload: each
/// checker's tests add their own calls in an `impl Builder<TheirWorkload>`.
pub(crate) struct Builder<W> {
    pub h: History,
    /// The process of every op.
    process: u64,
    /// The index of the first op (the next ones count up from it).
    first_index: u64,
    workload: PhantomData<W>,
}

impl<W> Builder<W> {
    pub(crate) fn start(process: u64, first_index: u64) -> Builder<W> {
        Builder {
            h: History::default(),
            process,
            first_index,
            workload: PhantomData,
        }
    }

    /// An op on `node` invoked at `t.0` and completed at `t.1`.
    pub(crate) fn op(
        &mut self,
        node: &str,
        call: Call,
        outcome: Outcome,
        t: (u64, u64),
        app: Option<AppResult>,
    ) {
        let index = self.first_index + self.h.ops.len() as u64;
        self.h.push(Record::Op(Box::new(Op {
            index,
            process: self.process,
            node: node.into(),
            call,
            outcome,
            read: None,
            revision: None,
            invoke_ns: ms(t.0),
            complete_ns: ms(t.1),
            error: None,
            ds: None,
            app,
        })));
    }

    pub(crate) fn nemesis(&mut self, t: u64, action: &str, fault: &str, detail: &str) {
        self.h.push(Record::Nemesis(NemesisEvent {
            time_ns: ms(t),
            action: action.into(),
            fault: fault.into(),
            detail: detail.into(),
        }));
    }
}

/// The kinds of a verdict's anomalies, sorted.
pub(crate) fn sorted_kinds<'a>(kinds: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut k: Vec<&str> = kinds.into_iter().collect();
    k.sort_unstable();
    k
}
