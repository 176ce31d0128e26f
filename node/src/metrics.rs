//! A node's Prometheus metrics: one registry per node (several nodes may share a process, as
//! `flockd dev` does), rendered in the text exposition format by `--metrics-addr`
//! ([`serve`]) and by the `Metrics` RPC (what `flockctl ui` reads).
//!
//! - Counters and histograms are updated where things happen: the proposal batcher (Raft
//!   proposals, commit latency), the Raft store's writer thread (fsync latency), the app agent
//!   (starts, restarts, stops), the dataset agent (pushes, moves), the routing mesh.
//! - Gauges that describe what is (Raft's term and indexes, apps by state, datasets' sizes and
//!   limits, replica lag) are filled when scraped ([`scrape`]) from the node's own view: never
//!   stale, and nothing to keep in step.
//! - Process metrics (`process_*`, no `flock_` prefix, as Prometheus' client libraries name
//!   them) are read from /proc at scrape time.
//!
//! Labels are low-cardinality: app, dataset and node names, ports, phases; never a connection.
//! No series carries a secret (no environment, no key-value content, no token).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// One label.
pub type Label = (&'static str, String);
type L1 = [Label; 1];
type L2 = [Label; 2];
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type FGauge = Gauge<f64, AtomicU64>;

fn l1(k: &'static str, v: impl Into<String>) -> L1 {
    [(k, v.into())]
}

fn l2(k1: &'static str, v1: impl Into<String>, k2: &'static str, v2: impl Into<String>) -> L2 {
    [(k1, v1.into()), (k2, v2.into())]
}

/// Latencies of disk and Raft: 100 µs to about 13 s.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Phases of moves, downtimes, failovers' windows: 10 ms to about 11 min.
fn long_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 17))
}

/// Raft's series.
pub struct RaftSeries {
    pub has_leader: Gauge,
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    pub term: Gauge,
    pub last_log_index: Gauge,
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    pub proposals_committed: Counter,
    pub proposals_failed: Counter,
    pub fsync_seconds: Histogram,
    pub commit_seconds: Histogram,
}

/// The apps' series; `apps` is filled when scraped.
pub struct AppSeries {
    pub apps: Family<L1, Gauge>,
    pub starts: Family<L1, Counter>,
    pub start_failures: Family<L1, Counter>,
    pub restarts: Family<L1, Counter>,
    pub stops: Family<L1, Counter>,
}

/// The datasets' series; the gauges are filled when scraped.
pub struct DatasetSeries {
    pub used_bytes: Family<L2, Gauge>,
    pub referenced_bytes: Family<L1, Gauge>,
    pub limit_bytes: Family<L1, Gauge>,
    pub snapshots: Family<L1, Gauge>,
    pub replica_lag_seconds: Family<L2, FGauge>,
    pub replica_lag_bytes: Family<L2, Gauge>,
    pub pushes: Family<L2, Counter>,
    pub push_bytes: Family<L2, Counter>,
    pub push_failures: Family<L2, Counter>,
}

/// Moves (counted on the node they move away from) and failovers (on every node, as the
/// cluster's log records them).
pub struct MoveSeries {
    pub moves: Family<L1, Counter>,
    pub phase_seconds: Histograms<L1>,
    pub downtime_seconds: Histogram,
    pub failovers: Counter,
    pub failover_at_risk_seconds: Histogram,
    pub failover_seconds: Histogram,
    /// The id of the next failover event not counted yet.
    next_event: Mutex<Option<u64>>,
}

/// The routing mesh's series, by published port.
pub struct MeshSeries {
    pub connections: Family<L1, Counter>,
    pub refused: Family<L1, Counter>,
    pub open: Family<L1, Gauge>,
    pub bytes: Family<L2, Counter>,
}

/// The metrics of one node. Parts of the node hold an `Arc<Metrics>` and update the series
/// they own; rendering reads them all.
pub struct Metrics {
    registry: Registry,
    pub raft: RaftSeries,
    pub apps: AppSeries,
    pub datasets: DatasetSeries,
    pub moves: MoveSeries,
    pub mesh: MeshSeries,
    /// One scrape at a time: a scrape clears and refills the gauges it fills.
    scraping: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Every series of a node, registered once: `flock_*` and the process's.
    pub fn new() -> Arc<Metrics> {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let r = root.sub_registry_with_prefix("flock");
        let info: Gauge = Gauge::default();
        info.set(1);
        r.register(
            "build_info",
            "flockd's version (the value is always 1)",
            info,
        );

        let raft = RaftSeries {
            has_leader: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            term: Gauge::default(),
            last_log_index: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            proposals_committed: Counter::default(),
            proposals_failed: Counter::default(),
            fsync_seconds: latency_buckets(),
            commit_seconds: latency_buckets(),
        };
        r.register(
            "raft_has_leader",
            "1 when this node knows a leader, else 0",
            raft.has_leader.clone(),
        );
        r.register(
            "raft_is_leader",
            "1 when this node is the leader, else 0",
            raft.is_leader.clone(),
        );
        r.register(
            "raft_leader_changes_seen",
            "Leader changes this node has seen since it started",
            raft.leader_changes.clone(),
        );
        r.register(
            "raft_term",
            "This node's current Raft term",
            raft.term.clone(),
        );
        r.register(
            "raft_last_log_index",
            "The index of the last entry in this node's log",
            raft.last_log_index.clone(),
        );
        r.register(
            "raft_commit_index",
            "The index of the last entry this node knows committed",
            raft.commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "The index of the last entry applied to this node's state",
            raft.applied_index.clone(),
        );
        r.register(
            "raft_proposals_committed",
            "Commands this node put in the log as leader (its own and those forwarded to it) that were committed",
            raft.proposals_committed.clone(),
        );
        r.register(
            "raft_proposals_failed",
            "Commands this node tried to put in the log as leader that failed (not committed in time, leadership lost, refused)",
            raft.proposals_failed.clone(),
        );
        r.register(
            "raft_fsync_duration_seconds",
            "Durable writes (one fdatasync each) of the Raft store",
            raft.fsync_seconds.clone(),
        );
        r.register(
            "raft_commit_duration_seconds",
            "On the leader, from proposing a log entry (a batch of commands) to its commit and apply",
            raft.commit_seconds.clone(),
        );

        let apps = AppSeries {
            apps: Family::default(),
            starts: Family::default(),
            start_failures: Family::default(),
            restarts: Family::default(),
            stops: Family::default(),
        };
        r.register(
            "apps",
            "Apps placed on this node, by state (running, waiting, restarting, exited, failed, unknown, new)",
            apps.apps.clone(),
        );
        r.register(
            "app_starts",
            "Starts of an app on this node (restarts included)",
            apps.starts.clone(),
        );
        r.register(
            "app_start_failures",
            "Starts of an app on this node that failed",
            apps.start_failures.clone(),
        );
        r.register(
            "app_restarts",
            "Starts of an app on this node after it exited (its restart policy)",
            apps.restarts.clone(),
        );
        r.register(
            "app_stops",
            "Stops of an app on this node (a move, a spec change, a removal)",
            apps.stops.clone(),
        );

        let datasets = DatasetSeries {
            used_bytes: Family::default(),
            referenced_bytes: Family::default(),
            limit_bytes: Family::default(),
            snapshots: Family::default(),
            replica_lag_seconds: Family::default(),
            replica_lag_bytes: Family::default(),
            pushes: Family::default(),
            push_bytes: Family::default(),
            push_failures: Family::default(),
        };
        r.register(
            "dataset_used_bytes",
            "Bytes this node's copy of a dataset takes, its snapshots included (role: primary or replica)",
            datasets.used_bytes.clone(),
        );
        r.register(
            "dataset_referenced_bytes",
            "Bytes of a dataset's live data on this node (what its limit applies to)",
            datasets.referenced_bytes.clone(),
        );
        r.register(
            "dataset_limit_bytes",
            "The size limit of this node's copy of a dataset (absent: none)",
            datasets.limit_bytes.clone(),
        );
        r.register(
            "dataset_snapshots",
            "Snapshots of a dataset this node holds",
            datasets.snapshots.clone(),
        );
        r.register(
            "dataset_replica_lag_seconds",
            "On the primary, per replica: the age of the newest snapshot the replica holds (what a failover to it would lose at most)",
            datasets.replica_lag_seconds.clone(),
        );
        r.register(
            "dataset_replica_lag_bytes",
            "On the primary, per replica: 0 when it holds the newest snapshot, else the bytes the push under way to it has still to send (absent: unknown)",
            datasets.replica_lag_bytes.clone(),
        );
        r.register(
            "dataset_pushes",
            "Snapshot pushes from this node that ended well (kind: move or replica)",
            datasets.pushes.clone(),
        );
        r.register(
            "dataset_push_bytes",
            "Payload bytes of snapshot pushes from this node",
            datasets.push_bytes.clone(),
        );
        r.register(
            "dataset_push_failures",
            "Snapshot pushes from this node that failed",
            datasets.push_failures.clone(),
        );

        let moves = MoveSeries {
            moves: Family::default(),
            phase_seconds: Family::new_with_constructor(long_buckets as fn() -> Histogram),
            downtime_seconds: long_buckets(),
            failovers: Counter::default(),
            failover_at_risk_seconds: long_buckets(),
            failover_seconds: long_buckets(),
            next_event: Mutex::new(None),
        };
        r.register(
            "moves",
            "Move attempts run from this node (the source), by result: committed or failed",
            moves.moves.clone(),
        );
        r.register(
            "move_phase_duration_seconds",
            "How long each phase of a move took, on its source",
            moves.phase_seconds.clone(),
        );
        r.register(
            "move_downtime_seconds",
            "A move's downtime: from the handoff (its app stops) to the commit on the target (it may start there)",
            moves.downtime_seconds.clone(),
        );
        r.register(
            "failovers",
            "Datasets failed over to a replica, as this node applied them from the log (counted from its first scrape on)",
            moves.failovers.clone(),
        );
        r.register(
            "failover_data_at_risk_seconds",
            "Per failover: the window of writes that may be lost (from the snapshot to the last time the old primary was heard from)",
            moves.failover_at_risk_seconds.clone(),
        );
        r.register(
            "failover_duration_seconds",
            "Per failover: from the last time the leader heard from the old primary to the failover's commit (the new primary may start the app then)",
            moves.failover_seconds.clone(),
        );

        let mesh = MeshSeries {
            connections: Family::default(),
            refused: Family::default(),
            open: Family::default(),
            bytes: Family::default(),
        };
        r.register(
            "mesh_connections",
            "Connections the routing mesh accepted, by published port",
            mesh.connections.clone(),
        );
        r.register(
            "mesh_connections_refused",
            "Connections the routing mesh refused (no app, it did not accept, or it stayed in a move too long)",
            mesh.refused.clone(),
        );
        r.register(
            "mesh_connections_open",
            "Connections the routing mesh forwards now",
            mesh.open.clone(),
        );
        r.register(
            "mesh_bytes",
            "Bytes the routing mesh forwarded (direction: to_app or from_app)",
            mesh.bytes.clone(),
        );

        Arc::new(Metrics {
            registry: root,
            raft,
            apps,
            datasets,
            moves,
            mesh,
            scraping: tokio::sync::Mutex::new(()),
        })
    }

    /// Every series in Prometheus' text format (version 0.0.4), as last updated (see
    /// [`scrape`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        classic_text(&out)
    }

    /// A hook for the Raft store's writer thread: each durable write's duration.
    pub fn fsync_observer(self: &Arc<Self>) -> flock_raft::log_store::DurableWriteHook {
        let h = self.raft.fsync_seconds.clone();
        Arc::new(move |d: Duration| h.observe(d.as_secs_f64()))
    }

    /// Counts the failover events of `failover` not counted yet. The first call only notes
    /// where the log is: failovers from before this node started are not counted again.
    pub fn note_failovers(&self, failover: &flock_scheduler::failover::Failover) {
        use flock_scheduler::failover::EventKind;
        let mut next = self
            .moves
            .next_event
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let first = match *next {
            None => {
                *next = Some(failover.next_event);
                return;
            }
            Some(n) => n,
        };
        for e in failover.events.iter().filter(|e| e.id >= first) {
            let EventKind::FailedOver {
                at_risk_ms, from, ..
            } = &e.what
            else {
                continue;
            };
            self.moves.failovers.inc();
            self.moves
                .failover_at_risk_seconds
                .observe(*at_risk_ms as f64 / 1000.0);
            // When the old primary was last heard from: its down record, or (once it is back)
            // the event that declared it down.
            let last_heard = failover
                .down
                .get(from)
                .map(|d| d.last_heard_unix_ms)
                .or_else(|| {
                    failover.events.iter().rev().find_map(|d| match &d.what {
                        EventKind::NodeDown {
                            node,
                            last_heard_unix_ms,
                            ..
                        } if node == from && d.id < e.id => Some(*last_heard_unix_ms),
                        _ => None,
                    })
                });
            if let Some(heard) = last_heard {
                self.moves
                    .failover_seconds
                    .observe(e.at_unix_ms.saturating_sub(heard) as f64 / 1000.0);
            }
        }
        *next = Some(failover.next_event);
    }
}

/// Prometheus' text format (0.0.4) from the OpenMetrics text prometheus-client writes: a
/// counter's HELP and TYPE name its samples' name (`x_total`), not the family's (`x`), or a
/// 0.0.4 parser takes the samples for another, untyped family; and no `# EOF`.
fn classic_text(open_metrics: &str) -> String {
    let mut lines: Vec<String> = Vec::new();
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|l| l.strip_suffix(" counter"))
        {
            let help = format!("# HELP {name} ");
            if let Some(prev) = lines.last_mut().filter(|p| p.starts_with(&help)) {
                *prev = format!("# HELP {name}_total {}", &prev[help.len()..]);
            }
            lines.push(format!("# TYPE {name}_total counter"));
            continue;
        }
        lines.push(line.to_string());
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// Fills the gauges read from the node's view, then renders every series: what both
/// `--metrics-addr` and the `Metrics` RPC serve.
pub async fn scrape(
    cluster: &crate::cluster::Cluster,
    datasets: &crate::datasets::Datasets,
    apps: &crate::apps::AppsView,
) -> String {
    let m = &cluster.prometheus;
    let _one = m.scraping.lock().await;
    // Raft.
    let rm = cluster.metrics();
    let r = &m.raft;
    r.has_leader.set(i64::from(rm.current_leader.is_some()));
    r.is_leader
        .set(i64::from(rm.state == openraft::ServerState::Leader));
    r.term.set(rm.current_term as i64);
    r.last_log_index.set(rm.last_log_index.unwrap_or(0) as i64);
    r.applied_index
        .set(rm.last_applied.map_or(0, |l| l.index) as i64);
    let committed = cluster
        .raft
        .with_raft_state(|st| st.committed.map(|l| l.index))
        .await
        .ok()
        .flatten();
    r.commit_index.set(committed.unwrap_or(0) as i64);
    // Apps placed here, by state; every state is shown (0 when none), so a query need not
    // guess which exist.
    m.apps.apps.clear();
    for s in [
        "new",
        "waiting",
        "running",
        "restarting",
        "exited",
        "failed",
        "unknown",
    ] {
        m.apps.apps.get_or_create(&l1("state", s)).set(0);
    }
    for local in apps.snapshot().values() {
        let s = match local.phase.as_str() {
            "" => "new",
            s => s,
        };
        m.apps.apps.get_or_create(&l1("state", s)).inc();
    }
    // Datasets: this node's copies as its backend lists them.
    let state = cluster.view.read().cluster.clone();
    m.note_failovers(&state.failover);
    let d = &m.datasets;
    d.used_bytes.clear();
    d.referenced_bytes.clear();
    d.limit_bytes.clear();
    d.snapshots.clear();
    d.replica_lag_seconds.clear();
    d.replica_lag_bytes.clear();
    let listed = tokio::time::timeout(Duration::from_secs(5), datasets.local()).await;
    match listed {
        Ok(Ok(copies)) => {
            for c in copies {
                let role = match state.datasets.get(&c.id) {
                    Some(ds) if ds.primary == cluster.node_id => "primary",
                    Some(ds) if ds.moving.as_ref().is_some_and(|m| m.to == cluster.node_id) => {
                        "target"
                    }
                    _ => "replica",
                };
                d.used_bytes
                    .get_or_create(&l2("dataset", &c.name, "role", role))
                    .set(c.used_bytes as i64);
                d.referenced_bytes
                    .get_or_create(&l1("dataset", &c.name))
                    .set(c.referenced_bytes as i64);
                if let Some(limit) = c.limit {
                    d.limit_bytes
                        .get_or_create(&l1("dataset", &c.name))
                        .set(limit as i64);
                }
                d.snapshots
                    .get_or_create(&l1("dataset", &c.name))
                    .set(c.snapshots.len() as i64);
            }
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics: cannot list the datasets"),
        Err(_) => tracing::debug!("metrics: listing the datasets took over 5 s"),
    }
    // Replica lag, on the primary: the age of the newest snapshot each replica holds, and the
    // bytes of a push to it still to send.
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |t| t.as_secs_f64());
    let pending: BTreeMap<(u64, u64), u64> = datasets
        .transfers()
        .iter()
        .filter(|t| t.kind == crate::datasets::TransferKind::Replica)
        .filter(|t| {
            use flock_decide::moves::MovePhase;
            matches!(t.phase, MovePhase::Full | MovePhase::Incremental) && t.total.is_some()
        })
        .map(|t| {
            let left = t.total.map_or(0, |total| total.saturating_sub(t.bytes));
            ((t.id, t.to), left)
        })
        .collect();
    for ds in state
        .datasets
        .values()
        .filter(|ds| ds.primary == cluster.node_id)
    {
        for replica in &ds.replicas {
            let name = flock_scheduler::state::node_name(&state, *replica);
            let labels = l2("dataset", &ds.name, "replica", name);
            let base = ds
                .bases
                .get(replica)
                .and_then(|b| ds.snapshots.iter().find(|s| &s.name == b));
            if let Some(base) = base {
                d.replica_lag_seconds
                    .get_or_create(&labels)
                    .set((now_s - base.created_unix as f64).max(0.0));
            }
            // As `flockctl dataset ls` says it: none when it holds the newest snapshot, else
            // what the push under way to it has still to send; unknown (absent) otherwise.
            let newest = ds.snapshots.last().map(|s| &s.name);
            let lag = if newest.is_some() && ds.bases.get(replica) == newest {
                Some(0)
            } else {
                pending.get(&(ds.id, *replica)).copied()
            };
            if let Some(lag) = lag {
                d.replica_lag_bytes.get_or_create(&labels).set(lag as i64);
            }
        }
    }
    m.render()
}

/// The process's own metrics, read from /proc when scraped (Linux; elsewhere none).
#[derive(Debug)]
struct ProcessCollector;

/// What /proc says of this process.
#[derive(Debug, Default, PartialEq)]
struct ProcStat {
    cpu_seconds: f64,
    start_time_seconds: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
}

/// Parses /proc/self/stat: its fields after the command name (which may hold spaces and
/// parentheses, so it is skipped up to its last ')').
fn parse_stat(stat: &str, ticks: f64, page: u64, boot_time: u64) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(ProcStat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
    })
}

fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn max_fds() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (r == 0).then_some(lim.rlim_cur)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // SAFETY: sysconf only reads configuration.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .zip(boot_time())
            .and_then(|(s, boot)| parse_stat(&s, ticks.max(1) as f64, page.max(1) as u64, boot));
        if let Some(st) = stat {
            let c = ConstCounter::new(st.cpu_seconds);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time the process spent, in seconds",
                None,
                c.metric_type(),
            )?)?;
            let gauges = [
                (
                    "process_start_time_seconds",
                    "When the process started, in seconds since the Unix epoch",
                    st.start_time_seconds,
                ),
                (
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes",
                    st.virtual_bytes as f64,
                ),
                (
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    st.resident_bytes as f64,
                ),
            ];
            for (name, help, v) in gauges {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let g = ConstGauge::new(fds.count() as i64);
            g.encode(encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(max) = max_fds() {
            let g = ConstGauge::new(max as f64);
            g.encode(encoder.encode_descriptor(
                "process_max_fds",
                "The most file descriptors the process may open",
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Where a node serves `/metrics` over HTTP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetricsAddr {
    /// 127.0.0.1 on the node's API port + [`DEFAULT_PORT_OFFSET`] (a free port when the API
    /// port was picked by the kernel).
    #[default]
    Default,
    At(SocketAddr),
    Off,
}

/// The default metrics port is the API port plus this (7800 → 8800).
pub const DEFAULT_PORT_OFFSET: u16 = 1000;

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(MetricsAddr::Off),
            _ => s.parse().map(MetricsAddr::At).map_err(|_| {
                format!("{s:?} is not IP:PORT: give the address to serve /metrics on (0.0.0.0:PORT for every interface), or \"off\"")
            }),
        }
    }
}

impl MetricsAddr {
    /// The address to bind for a node whose API is bound to `api`; `None`: none. The second
    /// value says whether the operator chose it (a failure to bind it is then an error).
    pub fn resolve(self, api: SocketAddr) -> Option<(SocketAddr, bool)> {
        match self {
            MetricsAddr::Off => None,
            MetricsAddr::At(a) => Some((a, true)),
            MetricsAddr::Default => {
                let port = match api.port() {
                    0 => 0,
                    p => p.checked_add(DEFAULT_PORT_OFFSET)?,
                };
                Some((SocketAddr::from(([127, 0, 0, 1], port)), false))
            }
        }
    }
}

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// How long one connection may stay open (a scrape takes well under a second).
const CONNECTION_TIME: Duration = Duration::from_secs(30);
/// The most a request's head may take, in bytes (hyper's smallest read buffer); a request
/// with a body is refused (a scrape is a GET).
const MAX_HEAD_BYTES: usize = 8192;

/// What `/metrics` answers with, per Prometheus' text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `GET /metrics` on `listener` until `shutdown`: HTTP/1.1, no TLS (bind it to loopback,
/// or to a network only Prometheus reaches). Anything else is 404 (405 for another method on
/// /metrics). At most [`MAX_CONNECTIONS`] at once, each for at most [`CONNECTION_TIME`], with
/// request heads of at most [`MAX_HEAD_BYTES`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    cluster: Arc<crate::cluster::Cluster>,
    datasets: Arc<crate::datasets::Datasets>,
    apps: crate::apps::AppsView,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    status: crate::worker::WorkerStatus,
) {
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioIo, TokioTimer};

    match listener.local_addr() {
        Ok(a) => status.idle(format!("serving http://{a}/metrics")),
        Err(_) => status.idle("serving /metrics"),
    }

    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let conn = tokio::select! {
            _ = shutdown.changed() => return,
            c = listener.accept() => c,
        };
        let stream = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Too many at once: closed unanswered, nothing read.
            continue;
        };
        let (cluster, datasets, apps) = (cluster.clone(), datasets.clone(), apps.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (cluster, datasets, apps) = (cluster.clone(), datasets.clone(), apps.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        respond(&req, || scrape(&cluster, &datasets, &apps)).await,
                    )
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(MAX_HEAD_BYTES)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIME, conn).await;
        });
    }
}

async fn respond<F, Fut>(
    req: &hyper::Request<hyper::body::Incoming>,
    render: F,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    use hyper::{header, Method, StatusCode};
    let reply = |status: StatusCode, ctype: &str, body: String| {
        let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = header::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        r
    };
    let plain = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            plain,
            "not found: try /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            plain,
            "only GET /metrics\n".into(),
        );
    }
    let has_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    if has_body {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            plain,
            "a scrape has no body\n".into(),
        );
    }
    reply(StatusCode::OK, CONTENT_TYPE, render().await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis; fields 14, 15 (utime, stime), 22
        // (starttime), 23 (vsize), 24 (rss).
        let stat =
            "4242 (flo) ck) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 8 0 1000 123456789 300 x";
        let st = parse_stat(stat, 100.0, 4096, 1_700_000_000).expect("parses");
        assert_eq!(
            st,
            ProcStat {
                cpu_seconds: 4.0,
                start_time_seconds: 1_700_000_010.0,
                virtual_bytes: 123_456_789,
                resident_bytes: 300 * 4096,
            }
        );
        assert_eq!(parse_stat("garbage", 100.0, 4096, 0), None);
    }

    #[test]
    fn the_default_address_is_loopback_on_the_api_port_plus_1000() {
        let api: SocketAddr = "10.0.0.5:7801".parse().unwrap();
        assert_eq!(
            MetricsAddr::Default.resolve(api),
            Some(("127.0.0.1:8801".parse().unwrap(), false))
        );
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            MetricsAddr::Default.resolve(any),
            Some(("127.0.0.1:0".parse().unwrap(), false))
        );
        assert_eq!(MetricsAddr::Off.resolve(api), None);
        assert_eq!("off".parse::<MetricsAddr>(), Ok(MetricsAddr::Off));
        assert!("localhost".parse::<MetricsAddr>().is_err());
        let high: SocketAddr = "127.0.0.1:65000".parse().unwrap();
        assert_eq!(MetricsAddr::Default.resolve(high), None);
    }

    /// Every family, each with a value (families with labels show only then).
    fn every_family() -> Arc<Metrics> {
        let m = Metrics::new();
        let a = l1("app", "web");
        for f in [
            &m.apps.starts,
            &m.apps.start_failures,
            &m.apps.restarts,
            &m.apps.stops,
        ] {
            f.get_or_create(&a).inc();
        }
        m.apps.apps.get_or_create(&l1("state", "running")).set(1);
        let d = &m.datasets;
        let ds = l1("dataset", "db");
        for f in [&d.referenced_bytes, &d.limit_bytes, &d.snapshots] {
            f.get_or_create(&ds).set(1);
        }
        d.used_bytes
            .get_or_create(&l2("dataset", "db", "role", "primary"))
            .set(1);
        let lag = l2("dataset", "db", "replica", "n2");
        d.replica_lag_seconds.get_or_create(&lag).set(1.0);
        d.replica_lag_bytes.get_or_create(&lag).set(1);
        let push = l2("dataset", "db", "kind", "move");
        for f in [&d.pushes, &d.push_bytes, &d.push_failures] {
            f.get_or_create(&push).inc();
        }
        m.moves
            .moves
            .get_or_create(&l1("result", "committed"))
            .inc();
        m.moves
            .phase_seconds
            .get_or_create(&l1("phase", "full"))
            .observe(1.0);
        let port = l1("port", "8080");
        m.mesh.connections.get_or_create(&port).inc();
        m.mesh.refused.get_or_create(&port).inc();
        m.mesh.open.get_or_create(&port).inc();
        m.mesh
            .bytes
            .get_or_create(&l2("port", "8080", "direction", "to_app"))
            .inc();
        m
    }

    /// The series' names in `text`, from its TYPE lines (a histogram's without its suffixes).
    fn families(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// The README's table of series and the Grafana dashboard name exactly the series flockd
    /// has: none missing from the table, none the table or the dashboard makes up.
    #[test]
    fn the_readme_and_the_dashboard_name_the_series_there_are() {
        let rendered = families(&every_family().render());
        let readme = include_str!("../../README.md");
        let section = readme
            .split("## Monitoring")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has a Monitoring section");
        let mut listed = std::collections::BTreeSet::new();
        for row in section.lines().filter(|l| l.starts_with("| `")) {
            let cell = row.split('|').nth(1).unwrap_or_default();
            for name in cell.split('`').skip(1).step_by(2) {
                listed.insert(name.to_string());
            }
        }
        assert_eq!(listed, rendered, "README's series table against flockd's");
        let dashboard = include_str!("../../contrib/grafana/flock-dashboard.json");
        let json: serde_json::Value =
            serde_json::from_str(dashboard).expect("the dashboard is JSON");
        let mut used = std::collections::BTreeSet::new();
        for p in json["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_default();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("flock_") || word.starts_with("process_") {
                        let base = ["_bucket", "_sum", "_count"]
                            .iter()
                            .find_map(|s| word.strip_suffix(s).filter(|b| rendered.contains(*b)))
                            .unwrap_or(word);
                        used.insert(base.to_string());
                    }
                }
            }
        }
        let unknown: Vec<_> = used.difference(&rendered).collect();
        assert!(
            unknown.is_empty(),
            "the dashboard queries series flockd has not: {unknown:?}"
        );
        assert!(
            used.len() >= 30,
            "the dashboard shows {} series",
            used.len()
        );
    }

    #[test]
    fn series_render_with_their_types_and_the_process_metrics_unprefixed() {
        let m = Metrics::new();
        m.raft.proposals_committed.inc();
        m.apps.starts.get_or_create(&l1("app", "web")).inc();
        m.raft.fsync_seconds.observe(0.002);
        let text = m.render();
        for want in [
            "# HELP flock_raft_proposals_committed_total Commands",
            "# TYPE flock_raft_proposals_committed_total counter",
            "flock_raft_proposals_committed_total 1",
            "flock_app_starts_total{app=\"web\"} 1",
            "# TYPE flock_raft_fsync_duration_seconds histogram",
            "flock_raft_fsync_duration_seconds_count 1",
            "flock_build_info 1",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(!text.contains("flock_process_"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            !text.contains("counter\nflock_raft_proposals_committed "),
            "{text}"
        );
    }
}
