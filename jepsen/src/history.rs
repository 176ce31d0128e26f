//! The history of a run: every operation with its invocation and completion times and outcome,
//! and every nemesis event, as one JSON object per line (`history.jsonl`).
//!
//! Times are nanoseconds since the start of the run, taken from one monotonic clock on the
//! host, so every client's ops and every fault share a time line.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What an operation asked for. Register workload: `read`, `write`, `cas` on one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Call {
    /// Read `key`; `stale` reads the contacted node's replica without a read barrier.
    Read {
        key: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stale: bool,
    },
    /// Set `key` to `value`.
    Write { key: String, value: String },
    /// Set `key` to `value` if it holds `expect` (absent `expect`: if the key does not exist).
    Cas {
        key: String,
        expect: Option<String>,
        value: String,
    },
}

impl Call {
    pub fn key(&self) -> &str {
        match self {
            Call::Read { key, .. } | Call::Write { key, .. } | Call::Cas { key, .. } => key,
        }
    }

    /// Short name of the function: `read`, `write`, `cas`.
    pub fn f(&self) -> &'static str {
        match self {
            Call::Read { .. } => "read",
            Call::Write { .. } => "write",
            Call::Cas { .. } => "cas",
        }
    }

    pub fn is_read(&self) -> bool {
        matches!(self, Call::Read { .. })
    }
}

/// How an operation ended, as far as the client can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It happened, with the recorded result.
    Ok,
    /// It certainly did not take effect.
    Fail,
    /// It may or may not have taken effect (a timeout, a lost connection after sending).
    Unknown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Unknown => "unknown",
        }
    }
}

/// One completed (or abandoned) operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Position in the history, in order of completion.
    pub index: u64,
    /// The logical client. A client whose op ended `unknown` continues under a new process
    /// number, as in Jepsen: the old process might still be acting.
    pub process: u64,
    /// The node the client sent the op to.
    pub node: String,
    #[serde(flatten)]
    pub call: Call,
    pub outcome: Outcome,
    /// For an `ok` read: the value read (`null` when the key does not exist).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_or_null"
    )]
    pub read: Option<Option<String>>,
    /// Cluster revision the node reported with its answer, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    pub invoke_ns: u64,
    /// When the client stopped waiting (for `unknown`, when it gave up).
    pub complete_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    pub fn latency_ns(&self) -> u64 {
        self.complete_ns.saturating_sub(self.invoke_ns)
    }
}

/// A field that is present (possibly `null`) is `Some`; a missing one is `None` (by `default`).
fn present_or_null<'de, D>(d: D) -> Result<Option<Option<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<String>::deserialize(d).map(Some)
}

/// A fault starting or ending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NemesisEvent {
    pub time_ns: u64,
    /// `start` or `stop`.
    pub action: String,
    /// The fault's kind, e.g. `kill-leader`, `partition-ring`.
    pub fault: String,
    /// What exactly was done, e.g. `kill -9 n3` or `n1 n2 | n3 n4 n5`.
    pub detail: String,
}

/// The first line of a history: what ran, with which seed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMeta {
    pub seed: u64,
    pub workload: String,
    pub read_mode: String,
    pub nemeses: Vec<String>,
    pub nodes: Vec<String>,
    /// Wall-clock start, RFC 3339.
    pub started: String,
    pub key_prefix: String,
}

/// A line of `history.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Meta(RunMeta),
    Op(Op),
    Nemesis(NemesisEvent),
}

/// A whole history in memory.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub meta: Option<RunMeta>,
    pub ops: Vec<Op>,
    pub nemesis: Vec<NemesisEvent>,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: not a history record: {source}")]
    Parse {
        path: String,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

impl History {
    pub fn push(&mut self, r: Record) {
        match r {
            Record::Meta(m) => self.meta = Some(m),
            Record::Op(o) => self.ops.push(o),
            Record::Nemesis(n) => self.nemesis.push(n),
        }
    }

    /// Reads a `history.jsonl`, naming the line that is not a record.
    pub fn load(path: &Path) -> Result<History, HistoryError> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|source| HistoryError::Io {
            path: shown.clone(),
            source,
        })?;
        let mut h = History::default();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| HistoryError::Io {
                path: shown.clone(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let r = serde_json::from_str(&line).map_err(|source| HistoryError::Parse {
                path: shown.clone(),
                line: i + 1,
                source,
            })?;
            h.push(r);
        }
        Ok(h)
    }

    /// The end of the run: the latest completion or nemesis event.
    pub fn end_ns(&self) -> u64 {
        let ops = self.ops.iter().map(|o| o.complete_ns).max().unwrap_or(0);
        let nem = self.nemesis.iter().map(|n| n.time_ns).max().unwrap_or(0);
        ops.max(nem)
    }

    /// The faults as (start, stop, fault, detail) intervals; a fault never stopped ends at `end`.
    pub fn fault_intervals(&self) -> Vec<FaultInterval> {
        let mut open: Vec<&NemesisEvent> = Vec::new();
        let mut out = Vec::new();
        for e in &self.nemesis {
            if e.action == "start" {
                open.push(e);
            } else if let Some(pos) = open.iter().position(|s| s.fault == e.fault) {
                let s = open.remove(pos);
                out.push(FaultInterval {
                    start_ns: s.time_ns,
                    stop_ns: e.time_ns,
                    fault: s.fault.clone(),
                    detail: s.detail.clone(),
                });
            }
        }
        let end = self.end_ns();
        for s in open {
            out.push(FaultInterval {
                start_ns: s.time_ns,
                stop_ns: end,
                fault: s.fault.clone(),
                detail: s.detail.clone(),
            });
        }
        out.sort_by_key(|f| f.start_ns);
        out
    }
}

/// A fault from its start to its end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FaultInterval {
    pub start_ns: u64,
    pub stop_ns: u64,
    pub fault: String,
    pub detail: String,
}

/// Appends records to `history.jsonl` as they happen, so a crashed run leaves its history.
pub struct HistoryWriter {
    out: BufWriter<File>,
    path: String,
}

impl HistoryWriter {
    pub fn create(path: &Path) -> Result<HistoryWriter, HistoryError> {
        let shown = path.display().to_string();
        let file = File::create(path).map_err(|source| HistoryError::Io {
            path: shown.clone(),
            source,
        })?;
        Ok(HistoryWriter {
            out: BufWriter::new(file),
            path: shown,
        })
    }

    pub fn write(&mut self, r: &Record) -> Result<(), HistoryError> {
        let io = |source| HistoryError::Io {
            path: self.path.clone(),
            source,
        };
        let line = serde_json::to_string(r).map_err(|e| io(std::io::Error::other(e)))?;
        writeln!(self.out, "{line}").map_err(io)
    }

    pub fn flush(&mut self) -> Result<(), HistoryError> {
        self.out.flush().map_err(|source| HistoryError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Formats nanoseconds since the start as seconds with millisecond precision.
pub fn secs(ns: u64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_through_json_lines() {
        let op = Record::Op(Op {
            index: 3,
            process: 7,
            node: "n2".into(),
            call: Call::Cas {
                key: "k".into(),
                expect: None,
                value: "4".into(),
            },
            outcome: Outcome::Unknown,
            read: None,
            revision: None,
            invoke_ns: 10,
            complete_ns: 20,
            error: Some("deadline exceeded".into()),
        });
        let line = serde_json::to_string(&op).expect("serializes");
        assert!(line.contains(r#""type":"op""#), "{line}");
        assert!(line.contains(r#""f":"cas""#), "{line}");
        let back: Record = serde_json::from_str(&line).expect("parses");
        assert_eq!(back, op);

        let read = Record::Op(Op {
            index: 4,
            process: 1,
            node: "n1".into(),
            call: Call::Read {
                key: "k".into(),
                stale: false,
            },
            outcome: Outcome::Ok,
            read: Some(None),
            revision: Some(9),
            invoke_ns: 1,
            complete_ns: 2,
            error: None,
        });
        let line = serde_json::to_string(&read).expect("serializes");
        let back: Record = serde_json::from_str(&line).expect("parses");
        assert_eq!(
            back, read,
            "a read of a missing key stays Some(None): {line}"
        );
    }

    #[test]
    fn fault_intervals_pair_starts_with_stops() {
        let mut h = History::default();
        let ev = |t, a: &str, f: &str| {
            Record::Nemesis(NemesisEvent {
                time_ns: t,
                action: a.into(),
                fault: f.into(),
                detail: String::new(),
            })
        };
        h.push(ev(1, "start", "kill"));
        h.push(ev(5, "stop", "kill"));
        h.push(ev(7, "start", "pause"));
        let iv = h.fault_intervals();
        assert_eq!(iv.len(), 2);
        assert_eq!((iv[0].start_ns, iv[0].stop_ns), (1, 5));
        assert_eq!((iv[1].start_ns, iv[1].stop_ns), (7, 7));
    }
}
