//! Figures of a run: op counts by function and outcome, latencies, and the longest stretch of
//! time in which the cluster completed no operation (unavailability).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::history::{FaultInterval, History, Op, Outcome};

/// Counts of one function's ops.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub total: u64,
    pub ok: u64,
    pub fail: u64,
    pub unknown: u64,
}

impl Counts {
    fn add(&mut self, o: Outcome) {
        self.total += 1;
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Fail => self.fail += 1,
            Outcome::Unknown => self.unknown += 1,
        }
    }
}

/// The longest time without a successful op, and what faults overlapped it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Gap {
    pub seconds: f64,
    pub from_s: f64,
    pub to_s: f64,
    /// Faults active during the gap, e.g. `partition-halves (n1 n2 | n3 n4 n5)`.
    pub during: Vec<String>,
}

/// Latency percentiles of successful ops, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// How long faults of one kind stopped the cluster: for each fault, the longest time without an
/// ok op from its start until a few seconds after its end.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FaultImpact {
    pub count: usize,
    pub median_gap_s: f64,
    pub max_gap_s: f64,
}

/// Seconds after a fault ends that still count towards its impact (recovery after the heal).
const AFTER_FAULT_NS: u64 = 5_000_000_000;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    pub all: Counts,
    pub by_f: BTreeMap<String, Counts>,
    pub by_node: BTreeMap<String, Counts>,
    pub latency: Latency,
    /// Longest time in which no op of any kind succeeded anywhere.
    pub longest_unavailable: Gap,
    /// Longest time in which no write (write or cas; a dataset call that changes something when
    /// only the dataset workload ran) succeeded.
    pub longest_without_write: Gap,
    pub duration_s: f64,
    pub faults: usize,
    /// Per fault kind: how long it stopped every op.
    pub by_fault: BTreeMap<String, FaultImpact>,
}

impl Stats {
    /// Stats of the workload's ops between `from_ns` and `to_ns` (the measured window).
    pub fn of(history: &History, from_ns: u64, to_ns: u64) -> Stats {
        let faults = history.fault_intervals();
        let ops: Vec<&Op> = history
            .ops
            .iter()
            .filter(|o| o.invoke_ns >= from_ns && o.invoke_ns <= to_ns)
            .collect();
        let mut s = Stats {
            duration_s: to_ns.saturating_sub(from_ns) as f64 / 1e9,
            faults: faults.len(),
            ..Stats::default()
        };
        for op in &ops {
            s.all.add(op.outcome);
            s.by_f
                .entry(op.call.f().to_string())
                .or_default()
                .add(op.outcome);
            s.by_node
                .entry(op.node.clone())
                .or_default()
                .add(op.outcome);
        }
        let mut lat: Vec<u64> = ops
            .iter()
            .filter(|o| o.outcome == Outcome::Ok)
            .map(|o| o.latency_ns())
            .collect();
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
            lat[i.min(lat.len() - 1)] as f64 / 1e6
        };
        s.latency = Latency {
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
        };
        let ok_times = |pred: &dyn Fn(&Op) -> bool| -> Vec<u64> {
            let mut t: Vec<u64> = ops
                .iter()
                .filter(|o| o.outcome == Outcome::Ok && pred(o))
                .map(|o| o.complete_ns)
                .collect();
            t.sort_unstable();
            t
        };
        let all_ok = ok_times(&|_| true);
        s.longest_unavailable = longest_gap(&all_ok, from_ns, to_ns, &faults);
        let mut gaps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for f in &faults {
            let end = f.stop_ns.saturating_add(AFTER_FAULT_NS).min(to_ns);
            if end <= f.start_ns {
                continue;
            }
            let g = longest_gap(&all_ok, f.start_ns, end, &[]);
            gaps.entry(f.fault.clone()).or_default().push(g.seconds);
        }
        for (kind, mut g) in gaps {
            g.sort_by(f64::total_cmp);
            s.by_fault.insert(
                kind,
                FaultImpact {
                    count: g.len(),
                    median_gap_s: g[g.len() / 2],
                    max_gap_s: g[g.len() - 1],
                },
            );
        }
        // Register writes when the register workload ran, else any write (dataset writes).
        let register = ops.iter().any(|o| o.call.is_register());
        s.longest_without_write = longest_gap(
            &ok_times(&|o| !o.call.is_read() && (o.call.is_register() || !register)),
            from_ns,
            to_ns,
            &faults,
        );
        s
    }
}

/// The longest interval between `from`, the successive `times` and `to`.
pub fn longest_gap(times: &[u64], from: u64, to: u64, faults: &[FaultInterval]) -> Gap {
    let mut best = (0u64, from, from);
    let mut prev = from;
    for &t in times.iter().chain(std::iter::once(&to)) {
        let t = t.clamp(from, to);
        if t.saturating_sub(prev) > best.0 {
            best = (t - prev, prev, t);
        }
        prev = prev.max(t);
    }
    let (len, a, b) = best;
    Gap {
        seconds: len as f64 / 1e9,
        from_s: a as f64 / 1e9,
        to_s: b as f64 / 1e9,
        during: super::faults_in(faults, a, b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_counts_the_edges_and_names_the_fault() {
        let faults = vec![FaultInterval {
            start_ns: 25,
            stop_ns: 60,
            fault: "kill-leader".into(),
            detail: "n1".into(),
        }];
        let g = longest_gap(&[10, 20, 70, 80], 0, 100, &faults);
        assert_eq!((g.from_s * 1e9, g.to_s * 1e9), (20.0, 70.0));
        assert_eq!(g.during, vec!["kill-leader (n1)".to_string()]);
        // Nothing ever succeeded: the whole window.
        let g = longest_gap(&[], 0, 100, &[]);
        assert_eq!(g.seconds * 1e9, 100.0);
    }

    #[test]
    fn each_fault_is_charged_with_the_gap_it_caused() {
        use crate::history::{Call, NemesisEvent, Record};
        let mut h = History::default();
        let ev = |t: u64, a: &str| {
            Record::Nemesis(NemesisEvent {
                time_ns: t * 1_000_000_000,
                action: a.into(),
                fault: "kill-leader".into(),
                detail: "n1".into(),
            })
        };
        // An ok op every second, except from 11 s to 16 s; the leader dies at 10 s.
        for t in (0..30u64).filter(|t| !(11..16).contains(t)) {
            h.push(Record::Op(Box::new(Op {
                index: t,
                process: 0,
                node: "n2".into(),
                call: Call::Read {
                    key: "k".into(),
                    stale: false,
                },
                outcome: Outcome::Ok,
                read: Some(None),
                revision: None,
                invoke_ns: t * 1_000_000_000,
                complete_ns: t * 1_000_000_000 + 1,
                error: None,
                ds: None,
                app: None,
            })));
        }
        h.push(ev(10, "start"));
        h.push(ev(20, "stop"));
        let s = Stats::of(&h, 0, 30_000_000_000);
        let k = &s.by_fault["kill-leader"];
        assert_eq!(k.count, 1);
        assert!((k.max_gap_s - 6.0).abs() < 0.01, "{k:?}");
        assert_eq!(
            s.longest_unavailable.during,
            vec!["kill-leader (n1)".to_string()]
        );
    }
}
