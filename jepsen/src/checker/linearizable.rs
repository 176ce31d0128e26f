//! The Wing & Gong linearizability search with Lowe's memoization (WGL), as Knossos and
//! Porcupine implement it, generic over a sequential [`Model`].
//!
//! The history is a list of call and return events sorted by time. The search walks it from the
//! front: at a call it tries to linearize that operation now (the model must accept it in the
//! current state), lifting its call and return out of the list and starting over from the front;
//! at a return it has met an operation that should already have been linearized, so it undoes the
//! last choice. A cache of (set of linearized ops, state) pairs already explored keeps the search
//! from repeating itself.
//!
//! Operations whose outcome is unknown have no return event: they may be linearized anywhere after
//! their call, or never (they did not take effect). The history is linearizable once every
//! operation with a return has been linearized.

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Op;

    fn init(&self) -> Self::State;

    /// The state after `op` takes effect in `state`, or `None` when `op`'s recorded result is
    /// impossible in `state` (a read that saw another value, a compare-and-set whose expectation
    /// does not hold).
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;
}

/// One operation of the history to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<O> {
    pub call_ns: u64,
    /// `None` when the outcome is unknown: the op may take effect at any time after its call, or
    /// not at all.
    pub return_ns: Option<u64>,
    pub op: O,
}

/// The answer of the search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Linearizability {
    /// A linearization exists; the op indexes in linearization order (unknown ops that are left
    /// out did not take effect).
    Linearizable(Vec<usize>),
    /// No linearization exists. `longest_prefix` is the longest sequence of ops the search could
    /// linearize, which shows where it got stuck.
    NotLinearizable { longest_prefix: Vec<usize> },
    /// The search gave up after `steps` steps without an answer.
    Unknown { steps: u64 },
}

impl Linearizability {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Linearizability::Linearizable(_))
    }
    pub fn is_violation(&self) -> bool {
        matches!(self, Linearizability::NotLinearizable { .. })
    }
}

const NIL: usize = usize::MAX;

/// A doubly linked list of events with O(1) removal and LIFO re-insertion.
struct Events {
    /// For each event: the op it belongs to and whether it is the call.
    op: Vec<usize>,
    is_call: Vec<bool>,
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The sentinel before the first event.
    head: usize,
    call_of: Vec<usize>,
    return_of: Vec<Option<usize>>,
}

impl Events {
    fn new<O>(history: &[Entry<O>]) -> Events {
        // (time, returns after calls at equal times, op, is_call): a return and a call at the
        // same instant are treated as concurrent, the permissive reading.
        let mut ev: Vec<(u64, u8, usize, bool)> = Vec::with_capacity(history.len() * 2);
        for (i, e) in history.iter().enumerate() {
            ev.push((e.call_ns, 0, i, true));
            if let Some(r) = e.return_ns {
                ev.push((r.max(e.call_ns), 1, i, false));
            }
        }
        ev.sort();
        let n = ev.len();
        let head = n;
        let mut events = Events {
            op: ev.iter().map(|e| e.2).collect(),
            is_call: ev.iter().map(|e| e.3).collect(),
            next: (1..=n).map(|i| if i == n { NIL } else { i }).collect(),
            prev: (0..n).map(|i| if i == 0 { head } else { i - 1 }).collect(),
            head,
            call_of: vec![NIL; history.len()],
            return_of: vec![None; history.len()],
        };
        // The sentinel's own links.
        events.next.push(if n == 0 { NIL } else { 0 });
        events.prev.push(NIL);
        for (idx, &(_, _, op, is_call)) in ev.iter().enumerate() {
            if is_call {
                events.call_of[op] = idx;
            } else {
                events.return_of[op] = Some(idx);
            }
        }
        events
    }

    fn unlink(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    /// Re-inserts `x` where it was; valid only in the reverse order of removals.
    fn relink(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = x;
        if n != NIL {
            self.prev[n] = x;
        }
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call_of[op]);
        if let Some(r) = self.return_of[op] {
            self.unlink(r);
        }
    }

    fn unlift(&mut self, op: usize) {
        if let Some(r) = self.return_of[op] {
            self.relink(r);
        }
        self.relink(self.call_of[op]);
    }
}

/// Searches for a linearization of `history` under `model`, giving up after `max_steps` steps.
pub fn check<M: Model>(model: &M, history: &[Entry<M::Op>], max_steps: u64) -> Linearizability {
    let mut events = Events::new(history);
    let mut remaining_returns = history.iter().filter(|e| e.return_ns.is_some()).count();
    let words = history.len().div_ceil(64).max(1);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    // (op linearized, state before it)
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut state = model.init();
    let mut entry = events.next[events.head];
    let mut steps = 0u64;

    loop {
        if remaining_returns == 0 || entry == NIL {
            return Linearizability::Linearizable(stack.iter().map(|(op, _)| *op).collect());
        }
        steps += 1;
        if steps > max_steps {
            return Linearizability::Unknown { steps };
        }
        let op = events.op[entry];
        if events.is_call[entry] {
            let mut advanced = false;
            if let Some(next_state) = model.step(&state, &history[op].op) {
                linearized[op / 64] |= 1 << (op % 64);
                if cache.insert((linearized.clone(), next_state.clone())) {
                    let before = std::mem::replace(&mut state, next_state);
                    stack.push((op, before));
                    if stack.len() > longest.len() {
                        longest = stack.iter().map(|(o, _)| *o).collect();
                    }
                    events.lift(op);
                    if history[op].return_ns.is_some() {
                        remaining_returns -= 1;
                    }
                    entry = events.next[events.head];
                    advanced = true;
                } else {
                    linearized[op / 64] &= !(1 << (op % 64));
                }
            }
            if !advanced {
                entry = events.next[entry];
            }
        } else {
            // The return of an op not yet linearized: undo the latest choice.
            let Some((top, before)) = stack.pop() else {
                return Linearizability::NotLinearizable {
                    longest_prefix: longest,
                };
            };
            state = before;
            linearized[top / 64] &= !(1 << (top % 64));
            events.unlift(top);
            if history[top].return_ns.is_some() {
                remaining_returns += 1;
            }
            entry = events.next[events.call_of[top]];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register of small integers with `None` for "absent".
    struct Reg;

    #[derive(Clone, Debug)]
    enum R {
        Read(Option<u32>),
        Write(u32),
        Cas(Option<u32>, u32),
    }

    impl Model for Reg {
        type State = Option<u32>;
        type Op = R;
        fn init(&self) -> Option<u32> {
            None
        }
        fn step(&self, s: &Option<u32>, op: &R) -> Option<Option<u32>> {
            match op {
                R::Read(v) => (v == s).then_some(*s),
                R::Write(v) => Some(Some(*v)),
                R::Cas(e, v) => (e == s).then_some(Some(*v)),
            }
        }
    }

    fn e(call: u64, ret: Option<u64>, op: R) -> Entry<R> {
        Entry {
            call_ns: call,
            return_ns: ret,
            op,
        }
    }

    fn run(h: &[Entry<R>]) -> Linearizability {
        check(&Reg, h, 1_000_000)
    }

    #[test]
    fn empty_and_sequential_histories_are_linearizable() {
        assert!(run(&[]).is_linearizable());
        let h = [
            e(0, Some(1), R::Read(None)),
            e(2, Some(3), R::Write(1)),
            e(4, Some(5), R::Read(Some(1))),
            e(6, Some(7), R::Cas(Some(1), 2)),
            e(8, Some(9), R::Read(Some(2))),
        ];
        assert_eq!(run(&h), Linearizability::Linearizable(vec![0, 1, 2, 3, 4]));
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_not_linearizable() {
        // write 1 completes, then write 2 completes, then a read sees 1.
        let h = [
            e(0, Some(1), R::Write(1)),
            e(2, Some(3), R::Write(2)),
            e(4, Some(5), R::Read(Some(1))),
        ];
        assert!(run(&h).is_violation());
    }

    #[test]
    fn concurrent_ops_may_be_ordered_either_way() {
        // The read overlaps the write: it may see the old or the new value.
        for seen in [None, Some(1)] {
            let h = [e(0, Some(10), R::Write(1)), e(1, Some(5), R::Read(seen))];
            assert!(run(&h).is_linearizable(), "read saw {seen:?}");
        }
    }

    #[test]
    fn reads_that_flip_back_are_not_linearizable() {
        // One write of 1, concurrent with two sequential reads that see 1 then absent: once a
        // read has seen the write, a later read cannot miss it.
        let h = [
            e(0, Some(100), R::Write(1)),
            e(10, Some(20), R::Read(Some(1))),
            e(30, Some(40), R::Read(None)),
        ];
        assert!(run(&h).is_violation());
    }

    #[test]
    fn unknown_writes_may_take_effect_late_or_never() {
        // The write's outcome is unknown; a read long after sees it: fine.
        let h = [e(0, None, R::Write(1)), e(50, Some(60), R::Read(Some(1)))];
        assert!(run(&h).is_linearizable());
        // Or never sees it: also fine.
        let h = [e(0, None, R::Write(1)), e(50, Some(60), R::Read(None))];
        assert!(run(&h).is_linearizable());
        // But it cannot take effect before it was invoked.
        let h = [e(50, None, R::Write(1)), e(0, Some(10), R::Read(Some(1)))];
        assert!(run(&h).is_violation());
    }

    #[test]
    fn an_unknown_write_seen_then_lost_is_not_linearizable() {
        let h = [
            e(0, None, R::Write(1)),
            e(10, Some(20), R::Read(Some(1))),
            e(30, Some(40), R::Read(None)),
        ];
        assert!(run(&h).is_violation());
    }

    #[test]
    fn cas_must_see_its_expected_value() {
        // cas 1->2 succeeds although 1 was never written.
        let h = [
            e(0, Some(1), R::Write(3)),
            e(2, Some(3), R::Cas(Some(1), 2)),
        ];
        assert!(run(&h).is_violation());
        // Two successful cas from the same value cannot both happen.
        let h = [
            e(0, Some(1), R::Write(1)),
            e(2, Some(10), R::Cas(Some(1), 2)),
            e(3, Some(11), R::Cas(Some(1), 3)),
        ];
        assert!(run(&h).is_violation());
        // A chain of cas interleaved in time is fine in the right order.
        let h = [
            e(0, Some(1), R::Cas(None, 1)),
            e(2, Some(10), R::Cas(Some(2), 3)),
            e(3, Some(11), R::Cas(Some(1), 2)),
            e(12, Some(13), R::Read(Some(3))),
        ];
        assert!(run(&h).is_linearizable());
    }

    #[test]
    fn the_search_needs_backtracking() {
        // Greedily linearizing write 1 first (it is first in the list) leads to a dead end; the
        // only order is 2, read 2, 1, read 1.
        let h = [
            e(0, Some(100), R::Write(1)),
            e(1, Some(20), R::Write(2)),
            e(21, Some(30), R::Read(Some(2))),
            e(110, Some(120), R::Read(Some(1))),
        ];
        assert_eq!(run(&h), Linearizability::Linearizable(vec![1, 2, 0, 3]));
    }

    #[test]
    fn the_longest_prefix_shows_where_the_search_got_stuck() {
        let h = [
            e(0, Some(1), R::Write(1)),
            e(2, Some(3), R::Read(Some(1))),
            e(4, Some(5), R::Write(2)),
            e(6, Some(7), R::Read(Some(1))),
        ];
        match run(&h) {
            Linearizability::NotLinearizable { longest_prefix } => {
                assert_eq!(longest_prefix, vec![0, 1, 2])
            }
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn the_budget_bounds_the_search() {
        let h: Vec<Entry<R>> = (0..40).map(|i| e(0, Some(1000), R::Write(i))).collect();
        assert!(matches!(
            check(&Reg, &h, 10),
            Linearizability::Unknown { .. }
        ));
    }
}
