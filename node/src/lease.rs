//! The executors of leases and liveness ([`flock_decide::lease`] decides).
//!
//! - [`renew`]: every `renew_every`, this node renews its lease by a read index on the leader
//!   (`ReadIndex` with `lease` set; on the leader itself, a local one), and records the lease
//!   for the apps agent and for the fencing watchdog ([`crate::fence`]), which kills the
//!   stateful apps when the lease runs out even if flockd is dead, hung or stopped.
//! - [`watch`]: on the leader, proposes `DeclareNodeDown` for nodes silent for longer than
//!   lease + drift margin, and `NodeBackUp` for down nodes heard steadily again.
//!
//! Times in the decisions are on this process's monotonic clock, counted from [`Leases::new`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use flock_decide::apps::LeaseSeen;
use flock_decide::lease::{Lease, LeaseConfig, Liveness, LivenessAction};
use flock_proto::v1::ReadIndexRequest;
use flock_scheduler::{ClusterState, Command, CommandResult, NodeId};

use crate::cluster::Cluster;
use crate::worker::WorkerStatus;

/// How often the leader looks at who it heard from.
const LIVENESS_TICK: Duration = Duration::from_millis(200);

/// This node's lease and the leader's liveness view, shared by the API (which hears nodes'
/// renewals), the renewal and liveness workers and the apps agent.
pub struct Leases {
    cfg: LeaseConfig,
    origin: std::time::Instant,
    own: Mutex<Own>,
    liveness: Mutex<Liveness>,
    /// Where the fencing watchdog reads the lease; `None`: no watchdog (in-process fencing only).
    fence: Mutex<Option<Arc<crate::fence::FenceDir>>>,
    /// flockd's binary and the data dir, to start the watchdog again if it is gone.
    watchdog: Mutex<Option<(std::path::PathBuf, std::path::PathBuf)>>,
    /// A check that the watchdog runs is under way.
    ensuring: Arc<std::sync::atomic::AtomicBool>,
    /// The apply level each node's build said in its last read (leader), and when.
    levels: Mutex<BTreeMap<NodeId, (u32, flock_decide::Instant)>>,
}

struct Own {
    lease: Lease,
    renewed_once: bool,
    /// Why the last renewal failed.
    why: String,
}

impl Leases {
    pub fn new(cfg: LeaseConfig) -> Leases {
        Leases {
            cfg,
            origin: std::time::Instant::now(),
            own: Mutex::new(Own {
                lease: Lease::default(),
                renewed_once: false,
                why: "not renewed yet since flockd started".into(),
            }),
            liveness: Mutex::new(Liveness::new()),
            fence: Mutex::new(None),
            watchdog: Mutex::new(None),
            ensuring: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            levels: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// Now on the decisions' clock.
    pub fn now(&self) -> flock_decide::Instant {
        flock_decide::Instant::from_millis(
            u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX),
        )
    }

    /// The watchdog's directory: every renewal is written there from now on.
    pub fn set_fence(&self, dir: crate::fence::FenceDir) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(dir));
    }

    /// The watchdog runs from flockd's binary `exe` for `data_dir`: renewals check that it still
    /// does and start it again if not.
    pub fn set_watchdog(&self, exe: std::path::PathBuf, data_dir: std::path::PathBuf) {
        *self.watchdog.lock().unwrap_or_else(|p| p.into_inner()) = Some((exe, data_dir));
    }

    /// Starts the watchdog again if it is gone (it exits when idle), in the background.
    fn ensure_watchdog(&self) {
        use std::sync::atomic::Ordering;
        let Some((exe, dir)) = self
            .watchdog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        if self.ensuring.swap(true, Ordering::AcqRel) {
            return;
        }
        let flag = self.ensuring.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::fence::ensure_watch(&exe, &dir) {
                tracing::error!(error = %e, "the fencing watchdog is not running and could not be started");
            }
            flag.store(false, Ordering::Release);
        });
    }

    /// Calls `f` with the watchdog's directory, if there is one (no lock is held meanwhile).
    pub fn with_fence<T>(&self, f: impl FnOnce(&crate::fence::FenceDir) -> T) -> Option<T> {
        let dir = self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone();
        dir.map(|d| f(&d))
    }

    /// This node's lease as the apps agent sees it.
    pub fn seen(&self) -> LeaseSeen {
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.now();
        if own.lease.holds(now) {
            LeaseSeen::Holds
        } else if !own.renewed_once && now < flock_decide::Instant::ZERO + self.cfg.lease {
            LeaseSeen::Pending {
                why: own.why.clone(),
            }
        } else {
            LeaseSeen::Lapsed {
                why: own.why.clone(),
            }
        }
    }

    /// A peer's request reached this node (the leader records it).
    pub fn heard(&self, node: NodeId) {
        let now = self.now();
        self.liveness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .heard(node, now, &self.cfg);
    }

    /// `node`'s build applies commands up to `level` ([`flock_scheduler::APPLY_LEVEL`]).
    pub fn heard_level(&self, node: NodeId, level: u32) {
        let now = self.now();
        self.levels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, (level, now));
    }

    /// The apply level of each node heard within the last lease: an older one may be of a
    /// build since replaced.
    pub fn recent_levels(&self) -> BTreeMap<NodeId, u32> {
        let now = self.now();
        self.levels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, (_, at))| now.saturating_since(*at) <= self.cfg.lease)
            .map(|(id, (level, _))| (*id, *level))
            .collect()
    }

    /// Whether `node` may renew its lease now.
    pub fn may_renew(&self, state: &ClusterState, node: NodeId) -> Result<(), String> {
        self.liveness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .may_renew(state, node)
    }

    fn renewed(&self, sent: flock_decide::Instant) {
        let remaining = {
            let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
            own.lease.renewed(sent, &self.cfg);
            if !own.renewed_once || !own.why.is_empty() {
                tracing::info!("lease renewed");
            }
            own.renewed_once = true;
            own.why.clear();
            own.lease.remaining(self.now())
        };
        self.with_fence(|f| {
            if let Err(e) = f.write_lease(remaining) {
                tracing::warn!(error = %e, "could not record the lease for the fencing watchdog");
            }
        });
    }

    fn failed(&self, why: String) {
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        if own.why.is_empty() {
            tracing::warn!(reason = %why, "lease renewal failed");
        }
        if why.contains("operator declared") {
            // Refused by the leader: the lease is over now, not when it would have run out.
            own.lease.revoke();
        }
        own.why = why;
    }
}

/// One renewal: a read index confirmed by the leader's quorum.
async fn attempt(cluster: &Cluster) -> Result<(), String> {
    let limit = cluster.leases.cfg.lease;
    let index = if cluster.is_leader() {
        let index = cluster
            .local_read_index()
            .await
            .map_err(|e| e.to_string())?;
        let state = cluster.view.read();
        cluster.leases.may_renew(&state.cluster, cluster.node_id)?;
        index
    } else {
        let (id, node) = cluster.leader().ok_or("no leader known")?;
        let mut client = cluster.peer(id, &node.addr).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(ReadIndexRequest {
            lease: true,
            apply_level: flock_scheduler::APPLY_LEVEL,
        });
        req.set_timeout(limit);
        match tokio::time::timeout(limit, client.read_index(req)).await {
            Err(_) => {
                return Err(format!(
                    "the leader (node {id}) did not answer in {limit:?}"
                ))
            }
            Ok(Err(status)) => return Err(format!("the leader (node {id}): {}", status.message())),
            Ok(Ok(r)) => r.into_inner().index,
        }
    };
    // The renewal counts once this node has applied what the leader had committed: a node
    // back from a partition must see that its datasets failed over before its lease lets it
    // start anything.
    cluster
        .raft
        .wait(Some(limit))
        .applied_index_at_least(Some(index), "lease renewal")
        .await
        .map(|_| ())
        .map_err(|_| format!("this node did not apply the leader's index {index} in {limit:?}"))
}

/// Renews this node's lease until `shutdown`.
pub async fn renew(
    cluster: Arc<Cluster>,
    mut shutdown: watch::Receiver<bool>,
    status: WorkerStatus,
) {
    let every = cluster.leases.cfg.renew_every;
    loop {
        let sent = cluster.leases.now();
        status.running();
        let r = tokio::select! {
            _ = shutdown.changed() => return,
            r = attempt(&cluster) => r,
        };
        match r {
            Ok(()) => {
                cluster.leases.renewed(sent);
                cluster.leases.ensure_watchdog();
                status.idle("lease held");
            }
            Err(e) => {
                status.idle(format!("lease renewal failed: {e}"));
                cluster.leases.failed(e);
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Milliseconds since the Unix epoch on this node's clock.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// On the leader: declares silent nodes down and brings steady ones back, until `shutdown`.
pub async fn watch(
    cluster: Arc<Cluster>,
    mut shutdown: watch::Receiver<bool>,
    status: WorkerStatus,
) {
    let leases = &cluster.leases;
    loop {
        let now = leases.now();
        let actions = {
            let state = cluster.view.read().cluster.clone();
            let mut live = leases.liveness.lock().unwrap_or_else(|p| p.into_inner());
            if cluster.is_leader() {
                live.lead(now);
            } else {
                live.follow();
            }
            live.decide(&state, cluster.node_id, now, &leases.cfg)
        };
        if actions.is_empty() {
            status.idle(if cluster.is_leader() {
                "every node heard within its lease"
            } else {
                "not the leader"
            });
        }
        for action in actions {
            status.running();
            let at = unix_ms();
            let (cmd, what) = match action {
                LivenessAction::DeclareDown {
                    node,
                    silent,
                    by_operator,
                } => {
                    tracing::warn!(
                        node,
                        silent_ms = silent.as_millis() as u64,
                        by_operator,
                        "declaring the node down: its lease ran out; failing its apps over"
                    );
                    (
                        Command::DeclareNodeDown {
                            node,
                            last_heard_unix_ms: at
                                .saturating_sub(u64::try_from(silent.as_millis()).unwrap_or(0)),
                            at_unix_ms: at,
                            by_operator,
                        },
                        "declare it down",
                    )
                }
                LivenessAction::BackUp { node } => {
                    tracing::info!(node, "the node is heard steadily again: back up");
                    (
                        Command::NodeBackUp {
                            node,
                            at_unix_ms: at,
                        },
                        "bring it back up",
                    )
                }
            };
            let deadline = std::time::Instant::now() + cluster.request_timeout;
            match cluster.propose_local(cmd, deadline).await {
                Ok(CommandResult::NodeDeclaredDown {
                    failed_over,
                    waiting,
                }) => {
                    for (dataset, to) in failed_over {
                        tracing::warn!(dataset, to, "failed over");
                    }
                    for dataset in waiting {
                        tracing::warn!(dataset, "no replica to fail over to: its apps wait");
                    }
                }
                Ok(CommandResult::Rejected(e)) => {
                    tracing::info!(error = %e, "could not {what}");
                }
                Ok(_) => {}
                Err(e) => tracing::info!(error = %e, "could not {what}"),
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(LIVENESS_TICK) => {}
        }
    }
}
