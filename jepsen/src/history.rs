//! The history of a run: every operation with its invocation and completion times and outcome,
//! and every nemesis event, as one JSON object per line (`history.jsonl`).
//!
//! Times are nanoseconds since the start of the run, taken from one monotonic clock on the
//! host, so every client's ops and every fault share a time line.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What an operation asked for. Register workload: `read`, `write`, `cas` on one key. Dataset
/// workload: the `ds_*` calls on one dataset (see [`crate::workload::dataset`]). App workload:
/// the `app_*` calls (see [`crate::workload::app`]).
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
    /// Create dataset `dataset` with `primary` as its primary (`DatasetCreate`).
    DsCreate { dataset: String, primary: String },
    /// Write file `file` (`bytes` long, SHA-256 `sha256`) into the live directory of `primary`,
    /// which a linearizable read just before showed as the primary of `dataset` under `epoch`.
    /// (The op's `node` is the same node: the container written to.)
    DsWrite {
        dataset: String,
        file: String,
        bytes: u64,
        sha256: String,
        primary: String,
        epoch: u64,
    },
    /// Snapshot `dataset` under the name `tag` (`DatasetSnapshot`).
    DsSnapshot { dataset: String, tag: String },
    /// Begin a move of `dataset` to `to` (`DatasetMove`).
    DsMove { dataset: String, to: String },
    /// Cancel the move of `dataset` in progress (`DatasetMove` with `cancel`).
    DsCancelMove { dataset: String },
    /// Read the desired state of `dataset` (`DatasetList`, linearizable), with what each
    /// holder reports when `holders`.
    DsState {
        dataset: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        holders: bool,
    },
    /// Read every snapshot's files on the disk of node `disk` (after the run; the op's `node`
    /// is the same).
    DsRead { disk: String },
    /// Deploy the configuration `apps` (`Deploy`, which replaces the whole configuration): each
    /// app pinned to a node.
    AppDeploy { apps: BTreeMap<String, AppPin> },
    /// What the op's node runs now (`LocalApps`: that node's agent's view, not forwarded).
    AppLocal {},
    /// The cluster's view (`AppList`): the desired node of every app (a linearizable read of the
    /// desired state) and the state its node reports.
    AppList {},
    /// Move workload (its calls name their app `app_name` in the history: an op's `app` is
    /// what a call returned): deploy its apps (`Deploy`; only when the app workload does not run,
    /// which otherwise deploys them with its own, unpinned).
    MvDeploy { apps: Vec<String> },
    /// Move workload: `APPEND value` to the test app `app`, through the op's node (direct:
    /// the node that runs it, at its internal port; mesh: any node, at its external port).
    MvAppend {
        #[serde(rename = "app_name")]
        app: String,
        value: String,
        /// `direct` or `mesh`.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        via: String,
    },
    /// Move workload: `READ` the whole log of `app` (after the faults).
    MvRead {
        #[serde(rename = "app_name")]
        app: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        via: String,
    },
    /// Move workload: `AppMove` of `app` to `to` (returns once the move is recorded).
    MvMove {
        #[serde(rename = "app_name")]
        app: String,
        to: String,
    },
    /// Move workload: `AppMove` with `cancel`.
    MvCancel {
        #[serde(rename = "app_name")]
        app: String,
    },
    /// Move workload: `AppList` of `app` (where it runs, and where it moves to).
    MvLocate {
        #[serde(rename = "app_name")]
        app: String,
    },
    /// Failover workload (the move workload's calls on its own apps, plus these two): ask
    /// that `app`'s dataset keep `replicas` replicas, snapshotting every `interval_ms`
    /// (`DatasetSet`; the workload's apps are those it made this call for).
    FoReplicate {
        #[serde(rename = "app_name")]
        app: String,
        replicas: u32,
        interval_ms: u64,
    },
    /// Failover workload: the cluster's events (`Events`) after the faults, with each
    /// `FailedOver` on the history's clock.
    FoEvents {},
}

/// Where a deploy pins an app, and what the app is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppPin {
    /// The node it is pinned to.
    pub node: String,
    /// Whether it has a volume (a dataset): a stateful app, which must never run twice.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub volume: bool,
    /// What runs, briefly (`flock-testapp :9101`, `sleep loop`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub what: String,
}

impl Call {
    /// The register's key, or the dataset's name (`*` for a read of a node's whole disk).
    pub fn key(&self) -> &str {
        match self {
            Call::Read { key, .. } | Call::Write { key, .. } | Call::Cas { key, .. } => key,
            Call::DsCreate { dataset, .. }
            | Call::DsWrite { dataset, .. }
            | Call::DsSnapshot { dataset, .. }
            | Call::DsMove { dataset, .. }
            | Call::DsCancelMove { dataset }
            | Call::DsState { dataset, .. } => dataset,
            Call::DsRead { .. } | Call::AppDeploy { .. } | Call::AppLocal {} | Call::AppList {} => {
                "*"
            }
            Call::MvDeploy { .. } | Call::FoEvents {} => "*",
            Call::MvAppend { app, .. }
            | Call::MvRead { app, .. }
            | Call::MvMove { app, .. }
            | Call::MvCancel { app }
            | Call::MvLocate { app }
            | Call::FoReplicate { app, .. } => app,
        }
    }

    /// Short name of the function: `read`, `write`, `cas`, `ds_write`, ...
    pub fn f(&self) -> &'static str {
        match self {
            Call::Read { .. } => "read",
            Call::Write { .. } => "write",
            Call::Cas { .. } => "cas",
            Call::DsCreate { .. } => "ds_create",
            Call::DsWrite { .. } => "ds_write",
            Call::DsSnapshot { .. } => "ds_snapshot",
            Call::DsMove { .. } => "ds_move",
            Call::DsCancelMove { .. } => "ds_cancel_move",
            Call::DsState { .. } => "ds_state",
            Call::DsRead { .. } => "ds_read",
            Call::AppDeploy { .. } => "app_deploy",
            Call::AppLocal {} => "app_local",
            Call::AppList {} => "app_list",
            Call::MvDeploy { .. } => "mv_deploy",
            Call::MvAppend { .. } => "mv_append",
            Call::MvRead { .. } => "mv_read",
            Call::MvMove { .. } => "mv_move",
            Call::MvCancel { .. } => "mv_cancel",
            Call::MvLocate { .. } => "mv_locate",
            Call::FoReplicate { .. } => "fo_replicate",
            Call::FoEvents {} => "fo_events",
        }
    }

    /// Whether the call changes nothing (a failed one is `fail`, never `unknown`).
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Call::Read { .. }
                | Call::DsState { .. }
                | Call::DsRead { .. }
                | Call::AppLocal {}
                | Call::AppList {}
                | Call::MvRead { .. }
                | Call::MvLocate { .. }
                | Call::FoEvents {}
        )
    }

    /// Whether the call belongs to the register workload (the key-value namespace).
    pub fn is_register(&self) -> bool {
        matches!(
            self,
            Call::Read { .. } | Call::Write { .. } | Call::Cas { .. }
        )
    }

    /// Whether the call belongs to the dataset workload (the `ds_*` calls).
    pub fn is_dataset(&self) -> bool {
        matches!(
            self,
            Call::DsCreate { .. }
                | Call::DsWrite { .. }
                | Call::DsSnapshot { .. }
                | Call::DsMove { .. }
                | Call::DsCancelMove { .. }
                | Call::DsState { .. }
                | Call::DsRead { .. }
        )
    }

    /// Whether the call belongs to the move workload (the `mv_*` calls).
    pub fn is_move(&self) -> bool {
        matches!(
            self,
            Call::MvDeploy { .. }
                | Call::MvAppend { .. }
                | Call::MvRead { .. }
                | Call::MvMove { .. }
                | Call::MvCancel { .. }
                | Call::MvLocate { .. }
                | Call::FoReplicate { .. }
                | Call::FoEvents {}
        )
    }

    /// Whether the call is one of the failover workload's own (`fo_*`).
    pub fn is_failover(&self) -> bool {
        matches!(self, Call::FoReplicate { .. } | Call::FoEvents {})
    }

    /// Whether the call belongs to the app workload (the `app_*` calls).
    pub fn is_app(&self) -> bool {
        matches!(
            self,
            Call::AppDeploy { .. } | Call::AppLocal {} | Call::AppList {}
        )
    }
}

/// What an app call returned, beyond its outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AppResult {
    /// A deploy's answer: the configuration's generation and what it changes
    /// (`move APP n2->n3`, `start APP n1`, ...).
    Deployed {
        generation: u64,
        changes: Vec<String>,
    },
    /// `LocalApps`: every app the node's agent knows of, with its state there.
    Local { apps: Vec<AppSeen> },
    /// `AppList`: every app of the desired state, with its desired node and the state that
    /// node reports.
    List { generation: u64, apps: Vec<AppSeen> },
    /// The test app acknowledged an `APPEND` at `seq`; `instance`: what `PING` answered on
    /// the same connection (unique to the process that took it).
    Appended { seq: u64, instance: String },
    /// The test app's whole log (`READ`), each entry `(seq, text)`, from `instance`.
    Log {
        instance: String,
        entries: Vec<(u64, String)>,
    },
    /// `AppMove` (or its cancel) answered: from where to where.
    Moved { from: String, to: String },
    /// `DatasetSet` answered: the replication the dataset has now.
    Replicated { replicas: u32, interval_ms: u64 },
    /// `Events`: the failovers (and the failovers that could not be made) it lists.
    Failovers {
        failovers: Vec<FailoverSeen>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        no_replica: Vec<NoReplicaSeen>,
    },
}

/// A `FailedOver` event, its times also on the history's clock (ns since the start of the
/// workload; the nodes and the harness share the host's clock).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverSeen {
    pub id: u64,
    pub dataset: String,
    pub apps: Vec<String>,
    pub from: String,
    pub to: String,
    pub epoch: u64,
    /// When the leader declared `from` down and failed the dataset over.
    pub at_unix_ms: u64,
    pub at_ns: u64,
    /// When the leader had last heard from `from` (its `NodeDown` event), if listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heard_ns: Option<u64>,
    /// The snapshot the new primary starts from (`None`: empty), and when it was taken: to the
    /// millisecond when its name tells (`auto-2026-01-01T12-00-00.123Z`, the periodic
    /// snapshots, named by the time taken just before the snapshot), else the event's
    /// `snapshot_unix` (seconds, rounded down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ns: Option<u64>,
    pub at_risk_ms: u64,
}

/// A `NoReplica` event: a dataset of a down node that could not fail over.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoReplicaSeen {
    pub dataset: String,
    pub node: String,
    pub reason: String,
    pub at_ns: u64,
}

/// One app as `LocalApps` or `AppList` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSeen {
    pub app: String,
    /// `AppList`: the node it runs on (empty in `LocalApps`, which is one node's view). That is
    /// the node it should run on, except while its dataset moves: then the dataset's primary,
    /// where it runs until the move's handoff, and `moving_to` names its node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// `AppList`: the node the app's dataset is moving to with it, while it moves.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub moving_to: String,
    /// `running`, `starting`, `waiting`, `exited`, `failed`, `restarting`, `unreachable`.
    pub state: String,
    /// The driver's instance id (the process driver: the pid).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Its dataset, if it has a volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dataset: String,
}

/// What a dataset call returned, beyond its outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DsResult {
    /// A dataset as `DatasetList` answered.
    State(DsState),
    /// The snapshot `DatasetSnapshot` took and recorded.
    Snapshot(DsSnap),
    /// What a node's disk holds: every snapshot of every dataset, file by file.
    Disk(NodeDisk),
}

/// A dataset's desired state (Raft's), and the holders' reports when asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DsState {
    pub id: u64,
    pub primary: String,
    pub epoch: u64,
    /// The target of a move in progress, empty when none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub moving_to: String,
    /// The recorded snapshots, oldest first.
    pub snapshots: Vec<DsSnap>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<DsHolder>,
}

/// A recorded snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DsSnap {
    pub name: String,
    pub guid: u64,
    pub epoch: u64,
}

/// One node's copy of a dataset, as `DatasetList` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DsHolder {
    pub node: String,
    /// `primary`, `replica` or `target`.
    pub role: String,
    /// `ready`, `missing`, `unreachable` or `error`.
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub latest_snapshot: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mount_path: String,
}

/// Every dataset copy on one node's disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDisk {
    pub datasets: Vec<DiskDataset>,
}

/// One dataset copy on a node's disk: the backend's name (`NAME.ID`) and its snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDataset {
    pub local_name: String,
    pub snapshots: Vec<DiskSnapshot>,
}

/// One snapshot on a node's disk, as its metadata names it, with every regular file in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshot {
    pub name: String,
    pub guid: u64,
    /// File name (relative to the snapshot's root) -> `SIZE:SHA256`.
    pub files: std::collections::BTreeMap<String, String>,
    /// Entries other than regular files and directories, and anything unreadable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl AppSeen {
    /// `AppList`: the node the desired state places the app on.
    pub fn desired(&self) -> &str {
        if self.moving_to.is_empty() {
            &self.node
        } else {
            &self.moving_to
        }
    }
}

/// How a file's size and digest are written in [`DiskSnapshot::files`].
pub fn file_digest(bytes: u64, sha256: &str) -> String {
    format!("{bytes}:{sha256}")
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
    /// What a dataset call returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ds: Option<DsResult>,
    /// What an app call returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppResult>,
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
    /// The wall clock at the start of the workload (time 0 of the ops), in ns since the Unix
    /// epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t0_unix_ns: Option<u64>,
    pub key_prefix: String,
}

/// A line of `history.jsonl`. (An op's call is flattened into it: no call may have a field an
/// [`Op`] has, such as `node`.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Meta(RunMeta),
    /// Boxed: an op (with what a call returned) is much larger than the other records.
    Op(Box<Op>),
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
            Record::Op(o) => self.ops.push(*o),
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

    /// An ok op of `process` on n2, from 1 to 2 ns: the base of the roundtrip tests.
    fn base_op(process: u64, call: Call, app: Option<AppResult>) -> Op {
        Op {
            index: 1,
            process,
            node: "n2".into(),
            call,
            outcome: Outcome::Ok,
            read: None,
            revision: None,
            invoke_ns: 1,
            complete_ns: 2,
            error: None,
            ds: None,
            app,
        }
    }

    /// `op` as a record reads back from its JSON line unchanged.
    fn assert_roundtrips(op: Op) {
        let r = Record::Op(Box::new(op));
        let line = serde_json::to_string(&r).expect("serializes");
        let back: Record = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(back, r, "{line}");
    }

    #[test]
    fn records_roundtrip_through_json_lines() {
        let op = Record::Op(Box::new(Op {
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
            ds: None,
            app: None,
        }));
        let line = serde_json::to_string(&op).expect("serializes");
        assert!(line.contains(r#""type":"op""#), "{line}");
        assert!(line.contains(r#""f":"cas""#), "{line}");
        let back: Record = serde_json::from_str(&line).expect("parses");
        assert_eq!(back, op);

        let read = Record::Op(Box::new(Op {
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
            ds: None,
            app: None,
        }));
        let line = serde_json::to_string(&read).expect("serializes");
        let back: Record = serde_json::from_str(&line).expect("parses");
        assert_eq!(
            back, read,
            "a read of a missing key stays Some(None): {line}"
        );
    }

    #[test]
    fn dataset_ops_roundtrip_through_json_lines() {
        let base = base_op(
            3,
            Call::DsWrite {
                dataset: "d".into(),
                file: "f00001".into(),
                bytes: 5,
                sha256: "ab".into(),
                primary: "n2".into(),
                epoch: 2,
            },
            None,
        );
        let disk = NodeDisk {
            datasets: vec![DiskDataset {
                local_name: "d.1".into(),
                snapshots: vec![DiskSnapshot {
                    name: "s1".into(),
                    guid: 9,
                    files: [("f00001".to_string(), file_digest(5, "ab"))].into(),
                    problems: Vec::new(),
                }],
            }],
        };
        let state = DsState {
            id: 1,
            primary: "n2".into(),
            epoch: 2,
            moving_to: "n3".into(),
            snapshots: vec![DsSnap {
                name: "s1".into(),
                guid: 9,
                epoch: 2,
            }],
            holders: vec![DsHolder {
                node: "n2".into(),
                role: "primary".into(),
                state: "ready".into(),
                latest_snapshot: "s1".into(),
                mount_path: "/data/x".into(),
            }],
        };
        let calls = [
            (base.call.clone(), None),
            (
                Call::DsCreate {
                    dataset: "d".into(),
                    primary: "n1".into(),
                },
                None,
            ),
            (
                Call::DsSnapshot {
                    dataset: "d".into(),
                    tag: "s1".into(),
                },
                Some(DsResult::Snapshot(DsSnap {
                    name: "s1".into(),
                    guid: 9,
                    epoch: 2,
                })),
            ),
            (
                Call::DsState {
                    dataset: "d".into(),
                    holders: true,
                },
                Some(DsResult::State(state)),
            ),
            (
                Call::DsRead { disk: "n2".into() },
                Some(DsResult::Disk(disk)),
            ),
            (
                Call::DsMove {
                    dataset: "d".into(),
                    to: "n3".into(),
                },
                None,
            ),
            (
                Call::DsCancelMove {
                    dataset: "d".into(),
                },
                None,
            ),
        ];
        for (call, ds) in calls {
            assert_roundtrips(Op {
                call,
                ds,
                ..base.clone()
            });
        }
    }

    #[test]
    fn app_ops_roundtrip_through_json_lines() {
        let seen = AppSeen {
            app: "ja-s1".into(),
            node: "n2".into(),
            state: "running".into(),
            id: "41".into(),
            detail: String::new(),
            dataset: "ja-s1".into(),
            moving_to: String::new(),
        };
        let base = base_op(
            7_100_000,
            Call::AppLocal {},
            Some(AppResult::Local {
                apps: vec![AppSeen {
                    node: String::new(),
                    ..seen.clone()
                }],
            }),
        );
        let deploy = Call::AppDeploy {
            apps: [(
                "ja-s1".to_string(),
                AppPin {
                    node: "n3".into(),
                    volume: true,
                    what: "flock-testapp :9101".into(),
                },
            )]
            .into(),
        };
        let ops = [
            base.clone(),
            Op {
                call: Call::AppList {},
                app: Some(AppResult::List {
                    generation: 4,
                    apps: vec![
                        seen.clone(),
                        AppSeen {
                            moving_to: "n4".into(),
                            ..seen
                        },
                    ],
                }),
                ..base.clone()
            },
            Op {
                call: deploy,
                app: Some(AppResult::Deployed {
                    generation: 5,
                    changes: vec!["move ja-s1 n2->n3".into()],
                }),
                ..base.clone()
            },
            Op {
                outcome: Outcome::Fail,
                app: None,
                error: Some("Unavailable: no leader".into()),
                ..base
            },
        ];
        for op in ops {
            assert!(op.call.is_app() && !op.call.is_dataset() && !op.call.is_register());
            assert_roundtrips(op);
        }
    }

    #[test]
    fn move_ops_roundtrip_through_json_lines() {
        let base = base_op(
            8_000_000,
            Call::MvAppend {
                app: "jm-1".into(),
                value: "w0-1".into(),
                via: "direct".into(),
            },
            Some(AppResult::Appended {
                seq: 3,
                instance: "7-123".into(),
            }),
        );
        let app = || "jm-1".to_string();
        let ops = [
            base.clone(),
            Op {
                call: Call::MvRead {
                    app: app(),
                    via: "mesh".into(),
                },
                app: Some(AppResult::Log {
                    instance: "7-123".into(),
                    entries: vec![(1, "w0-1".into()), (2, "w1-1".into())],
                }),
                ..base.clone()
            },
            Op {
                call: Call::MvMove {
                    app: app(),
                    to: "n3".into(),
                },
                app: Some(AppResult::Moved {
                    from: "n2".into(),
                    to: "n3".into(),
                }),
                ..base.clone()
            },
            Op {
                call: Call::MvCancel { app: app() },
                outcome: Outcome::Unknown,
                app: None,
                ..base.clone()
            },
            Op {
                call: Call::MvLocate { app: app() },
                app: Some(AppResult::List {
                    generation: 2,
                    apps: vec![AppSeen {
                        app: app(),
                        node: "n2".into(),
                        state: "running".into(),
                        ..Default::default()
                    }],
                }),
                ..base.clone()
            },
            Op {
                call: Call::MvDeploy { apps: vec![app()] },
                app: None,
                ..base
            },
        ];
        for op in ops {
            assert!(op.call.is_move() && !op.call.is_app() && !op.call.is_register());
            assert_roundtrips(op);
        }
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
