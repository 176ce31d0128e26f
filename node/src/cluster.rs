//! A running node's view of its cluster: proposing commands (forwarded to the leader when this
//! node is not it), linearizable reads, status, and the leader's membership worker.
//!
//! Retries are only made when a command certainly was not applied (the local Raft said "not
//! leader" before appending, or the leader could not be reached at all). When a command may or
//! may not have been applied, the caller gets [`ClusterError::OutcomeUnknown`] instead: retrying a
//! compare-and-set blindly could report failure for a write that succeeded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tonic::transport::Channel;

use flock_proto::v1::api_client::ApiClient;
use flock_proto::v1::{Member, PingRequest, ProposeRequest, ReadIndexRequest, StatusReply};
use flock_raft::codec::{decode, encode};
use flock_raft::network::lazy_channel;
use flock_raft::state_machine::{Applied, StateView};
use flock_raft::tls::{Peer, TlsIdentity};
use flock_raft::types::RaftMetrics;
use flock_raft::{MemberNode, NodeId, Raft};
use flock_scheduler::membership::{check_removal, voters_to_promote};
use flock_scheduler::{limits, ApplyError, Command, CommandResult};

/// How long a health probe of a member may take before it counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// How often the leader reconciles Raft membership with the registered nodes.
pub const MEMBERSHIP_TICK: Duration = Duration::from_millis(250);
/// A learner within this many entries of the leader's log counts as caught up.
pub const CAUGHT_UP_SLACK: u64 = 64;

/// Errors of cluster operations; each maps to one gRPC status.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no leader could be reached within {0:?}; is a majority of voters running? (`flockctl status` lists them)")]
    NoLeader(Duration),
    #[error("the outcome is unknown: {0}; the change may or may not have been applied, check before retrying")]
    OutcomeUnknown(String),
    #[error("this node is not the leader")]
    NotLeader,
    #[error(transparent)]
    Rejected(#[from] ApplyError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("raft stopped: {0}")]
    Fatal(String),
}

impl From<ClusterError> for tonic::Status {
    fn from(e: ClusterError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            // gRPC's own contract: UNAVAILABLE is safe to retry (nothing was applied);
            // DEADLINE_EXCEEDED may have been applied. Clients such as the jepsen workload rely on it.
            ClusterError::NoLeader(_) => Status::unavailable(msg),
            ClusterError::OutcomeUnknown(_) => Status::deadline_exceeded(msg),
            ClusterError::NotLeader | ClusterError::Refused(_) => Status::failed_precondition(msg),
            ClusterError::Invalid(_) => Status::invalid_argument(msg),
            ClusterError::NotFound(_) => Status::not_found(msg),
            ClusterError::PermissionDenied(_) => Status::permission_denied(msg),
            ClusterError::Fatal(_) => Status::internal(msg),
            ClusterError::Rejected(a) => match a {
                ApplyError::WrongJoinSecret => Status::permission_denied(msg),
                ApplyError::NameTaken { .. } | ApplyError::AlreadyInitialized { .. } => {
                    Status::already_exists(msg)
                }
                ApplyError::DatasetExists { .. } | ApplyError::SnapshotExists { .. } => {
                    Status::already_exists(msg)
                }
                ApplyError::UnknownNode { .. }
                | ApplyError::UnknownDataset { .. }
                | ApplyError::UnknownApp { .. }
                | ApplyError::UnknownSnapshot { .. } => Status::not_found(msg),
                ApplyError::MoveInProgress { .. }
                | ApplyError::NoSuchMove { .. }
                | ApplyError::AlreadyPrimary { .. }
                | ApplyError::PrimaryOfDataset { .. }
                | ApplyError::NodeDown { .. }
                | ApplyError::PinnedMisfit { .. }
                | ApplyError::NoFittingNode { .. }
                | ApplyError::AppAlreadyThere { .. }
                | ApplyError::AppNotMoving { .. }
                | ApplyError::NotHandedOff { .. }
                | ApplyError::VolumeMounted { .. }
                | ApplyError::NotOnNode { .. }
                | ApplyError::VolumeMoving { .. } => Status::failed_precondition(msg),
                ApplyError::StaleEpoch { .. } => Status::aborted(msg),
                ApplyError::NotInitialized => Status::unavailable(msg),
                _ => Status::invalid_argument(msg),
            },
        }
    }
}

/// True when a failed call certainly never reached the peer's handler (no connection could be
/// made: refused, timed out connecting, or the name did not resolve), so retrying it elsewhere
/// cannot apply a command twice.
pub fn never_sent(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    // tonic reports a failed connect as UNAVAILABLE with the connector's error in the message or
    // in the error chain; a request that was sent and then lost reports other errors.
    let connect_failed = |text: &str| {
        [
            "error trying to connect",
            "tcp connect error",
            "Connection refused",
            "dns error",
        ]
        .iter()
        .any(|m| text.contains(m))
    };
    if connect_failed(status.message()) {
        return true;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = cur {
        if connect_failed(&e.to_string()) {
            return true;
        }
        cur = e.source();
    }
    false
}

/// How long one forwarded call to the leader may take before this node looks again for the
/// leader: a leader that died or was cut off without closing its connections would otherwise
/// hold the call for the whole request timeout, long after a new leader was elected.
pub const FORWARD_ATTEMPT: Duration = Duration::from_millis(1500);

/// A running node's handle on its cluster. Shared by the API service and the workers.
pub struct Cluster {
    pub raft: Raft,
    pub view: StateView,
    pub node_id: NodeId,
    pub node_name: String,
    pub cluster_id: String,
    /// How long a request may wait for a leader and for its command to apply.
    pub request_timeout: Duration,
    /// This node's client identity for calls to peers.
    tls: TlsIdentity,
    /// Proposals on their way into Raft, batched (see [`run_batcher`]).
    proposals: mpsc::UnboundedSender<Proposal>,
    peers: Mutex<HashMap<(NodeId, String), ApiClient<Channel>>>,
    /// This node's lease and, while it leads, who it heard from ([`crate::lease`]).
    pub leases: crate::lease::Leases,
    /// This node's Prometheus series, which the node's parts update ([`crate::metrics`]);
    /// not to be confused with Raft's own figures, [`metrics`](Self::metrics).
    pub prometheus: Arc<crate::metrics::Metrics>,
}

/// Outcome of forwarding to the leader.
enum Forwarded<T> {
    Done(T),
    /// Certainly not applied: safe to retry.
    Retry,
}

impl Cluster {
    pub fn new(
        raft: Raft,
        view: StateView,
        node_id: NodeId,
        node_name: String,
        cluster_id: String,
        request_timeout: Duration,
        tls: TlsIdentity,
    ) -> Self {
        let metrics = crate::metrics::Metrics::new();
        let (proposals, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_batcher(
            raft.clone(),
            request_timeout,
            rx,
            metrics.clone(),
        ));
        tokio::spawn(count_leader_changes(raft.metrics(), metrics.clone()));
        Cluster {
            proposals,
            raft,
            view,
            node_id,
            node_name,
            cluster_id,
            request_timeout,
            tls,
            peers: Mutex::new(HashMap::new()),
            leases: crate::lease::Leases::new(flock_decide::lease::LeaseConfig::default()),
            prometheus: metrics,
        }
    }

    /// A client for the API of node `id` at `addr`, sharing one connection per peer; the
    /// connection is refused unless the peer's certificate is node `id`'s.
    pub fn peer(&self, id: NodeId, addr: &str) -> Result<ApiClient<Channel>, ClusterError> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let key = (id, addr.to_string());
        if let Some(c) = peers.get(&key) {
            return Ok(c.clone());
        }
        let ch = lazy_channel(addr, &self.tls, Peer::Node(id))
            .map_err(|e| ClusterError::Invalid(format!("bad address of node {id}: {e}")))?;
        let c = ApiClient::new(ch);
        peers.insert(key, c.clone());
        Ok(c)
    }

    /// Drops the cached peer connections (after this node's certificate was renewed), so new
    /// calls connect with the new certificate.
    pub fn reset_peers(&self) {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    /// Raft's metrics as they change (each applied entry changes `last_applied`).
    pub fn metrics_watch(&self) -> tokio::sync::watch::Receiver<RaftMetrics> {
        self.raft.metrics()
    }

    /// For agents that act on the replicated state: waits `tick`, or less when an entry is
    /// applied (then `min_gap` more, so a busy log does not make the agent spin). `changes` is
    /// the agent's [`metrics_watch`](Self::metrics_watch). False when `shutdown` fires.
    pub async fn next_change(
        changes: &mut tokio::sync::watch::Receiver<RaftMetrics>,
        tick: Duration,
        min_gap: Duration,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        let seen = changes.borrow().last_applied;
        let tick = tokio::time::sleep(tick);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return false,
                _ = &mut tick => return true,
                r = changes.changed() => {
                    if r.is_err() {
                        (&mut tick).await;
                        return true;
                    }
                    if changes.borrow().last_applied != seen {
                        tokio::time::sleep(min_gap).await;
                        return true;
                    }
                }
            }
        }
    }

    /// The leader's id and address as this node knows them.
    pub fn leader(&self) -> Option<(NodeId, MemberNode)> {
        let m = self.metrics();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }

    pub fn is_leader(&self) -> bool {
        self.metrics().state == ServerState::Leader
    }

    /// Runs `cmd` through Raft and returns what applying it did. Forwards to the leader when this
    /// node is not it; waits up to `request_timeout` for a leader.
    /// A command over a size limit ([`Command::check_limits`]) is refused at once, before it
    /// is forwarded or proposed: it never reaches the log.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, ClusterError> {
        let bytes = checked_size(&cmd)?;
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let leader = match self.propose_checked(cmd.clone(), bytes, deadline).await {
                Err(ClusterError::NotLeader) => self.leader(),
                other => return other,
            };
            if let Some((id, node)) = leader.filter(|(id, _)| *id != self.node_id) {
                match self.forward_propose(id, &node.addr, &cmd, deadline).await? {
                    Forwarded::Done(r) => return Ok(r),
                    Forwarded::Retry => {}
                }
            }
            self.pause_before_retry(deadline).await?;
        }
    }

    /// Proposes on this node only; [`ClusterError::NotLeader`] when it is not the leader (and
    /// then the command was certainly not appended). Checks the command's size limits first,
    /// as [`propose`](Self::propose) does (this is also the path of a peer's forwarded command).
    pub async fn propose_local(
        &self,
        cmd: Command,
        deadline: Instant,
    ) -> Result<CommandResult, ClusterError> {
        let bytes = checked_size(&cmd)?;
        self.propose_checked(cmd, bytes, deadline).await
    }

    /// [`propose_local`](Self::propose_local) of a command whose limits were checked; `bytes`
    /// is its encoded size.
    async fn propose_checked(
        &self,
        cmd: Command,
        bytes: usize,
        deadline: Instant,
    ) -> Result<CommandResult, ClusterError> {
        if let Some(refusal) = self.too_new_for_members(&cmd) {
            return Ok(CommandResult::Rejected(refusal));
        }
        let (tx, rx) = oneshot::channel();
        self.proposals
            .send(Proposal { cmd, bytes, tx })
            .map_err(|_| ClusterError::Fatal("the node is shutting down".into()))?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => Err(ClusterError::OutcomeUnknown(format!(
                "not committed within {:?}",
                self.request_timeout
            ))),
            Ok(Err(_)) => Err(ClusterError::Fatal("the node is shutting down".into())),
            Ok(Ok(r)) => r,
        }
    }

    /// On the leader: a command some member's build could not decode (a rolling upgrade under
    /// way) is refused before it reaches the log, where it would stop that member's apply
    /// ([`flock_decide::upgrade`]). A follower lets it through: its batcher answers
    /// `NotLeader`, and the leader, which hears every member's level, decides.
    fn too_new_for_members(&self, cmd: &Command) -> Option<ApplyError> {
        let level = cmd.apply_level();
        if level == 0 || !self.is_leader() {
            return None;
        }
        let levels = self.leases.recent_levels();
        let view = self.view.read();
        let nodes =
            flock_decide::upgrade::cannot_apply(&view.cluster, self.node_id, &levels, level);
        (!nodes.is_empty()).then_some(ApplyError::MembersTooOld { nodes })
    }

    async fn forward_propose(
        &self,
        leader: NodeId,
        addr: &str,
        cmd: &Command,
        deadline: Instant,
    ) -> Result<Forwarded<CommandResult>, ClusterError> {
        let mut client = self.peer(leader, addr)?;
        let mut req = tonic::Request::new(ProposeRequest {
            command: encode(cmd),
        });
        let attempt = deadline
            .saturating_duration_since(Instant::now())
            .min(FORWARD_ATTEMPT);
        req.set_timeout(attempt);
        let answer = tokio::time::timeout(attempt, client.propose(req))
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {attempt:?}"
                )))
            });
        match answer {
            Ok(reply) => {
                let r = decode(&reply.into_inner().result).map_err(|e| {
                    ClusterError::OutcomeUnknown(format!(
                        "leader {leader} sent an undecodable result: {e}"
                    ))
                })?;
                Ok(Forwarded::Done(r))
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(Forwarded::Retry),
            Err(s) if never_sent(&s) => Ok(Forwarded::Retry),
            Err(s) => Err(ClusterError::OutcomeUnknown(format!(
                "forwarded to leader {leader} at {addr}, which did not answer: {}",
                s.message()
            ))),
        }
    }

    async fn pause_before_retry(&self, deadline: Instant) -> Result<(), ClusterError> {
        if Instant::now() >= deadline {
            return Err(ClusterError::NoLeader(self.request_timeout));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(())
    }

    /// Waits until this node's state machine reflects every write committed before the call
    /// (a linearizable read point), asking the leader when this node is not it.
    pub async fn read_barrier(&self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let read = tokio::time::timeout_at(deadline.into(), self.raft.ensure_linearizable());
            match read.await {
                Err(_) => return Err(ClusterError::NoLeader(self.request_timeout)),
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(RaftError::Fatal(f))) => return Err(ClusterError::Fatal(f.to_string())),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {}
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                    if let (Some(leader), Some(node)) = (f.leader_id, f.leader_node) {
                        if let Some(index) =
                            self.remote_read_index(leader, &node.addr, deadline).await
                        {
                            let wait = self
                                .raft
                                .wait(Some(deadline.saturating_duration_since(Instant::now())))
                                .applied_index_at_least(Some(index), "linearizable read")
                                .await;
                            return wait
                                .map(|_| ())
                                .map_err(|_| ClusterError::NoLeader(self.request_timeout));
                        }
                    }
                }
            }
            self.pause_before_retry(deadline).await?;
        }
    }

    /// Waits until this node has applied everything the cluster committed before the call (a
    /// read barrier, retried until it succeeds); `false` when `shutdown` came first. The agents
    /// call it before they first act: after a restart the local state may lag far behind (the
    /// committed index is not written durably with every entry), and acting on it would stop
    /// or start apps and destroy copies the current state wants kept.
    pub async fn caught_up(&self, shutdown: &mut tokio::sync::watch::Receiver<bool>) -> bool {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return false,
                r = self.read_barrier() => match r {
                    Ok(()) => return true,
                    Err(e) => tracing::info!(error = %e, "waiting to catch up with the cluster before acting"),
                },
            }
            tokio::select! {
                _ = shutdown.changed() => return false,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    async fn remote_read_index(&self, id: NodeId, addr: &str, deadline: Instant) -> Option<u64> {
        let mut client = self.peer(id, addr).ok()?;
        let mut req = tonic::Request::new(ReadIndexRequest {
            lease: false,
            apply_level: flock_scheduler::APPLY_LEVEL,
        });
        // Reads have no effect: on a silent leader give up early and look for the new one.
        let attempt = deadline
            .saturating_duration_since(Instant::now())
            .min(FORWARD_ATTEMPT);
        req.set_timeout(attempt);
        tokio::time::timeout(attempt, client.read_index(req))
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner().index)
    }

    /// On the leader: confirms leadership with a quorum and returns the index a linearizable
    /// read must observe.
    pub async fn local_read_index(&self) -> Result<u64, ClusterError> {
        let read = tokio::time::timeout(self.request_timeout, self.raft.ensure_linearizable());
        match read.await {
            Err(_) => Err(ClusterError::NoLeader(self.request_timeout)),
            Ok(Ok(log_id)) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                Err(ClusterError::NotLeader)
            }
            Ok(Err(RaftError::APIError(e))) => Err(ClusterError::Refused(e.to_string())),
            Ok(Err(RaftError::Fatal(f))) => Err(ClusterError::Fatal(f.to_string())),
        }
    }

    /// Reads the applied state, linearizably unless `stale`.
    pub async fn read<T>(
        &self,
        stale: bool,
        f: impl FnOnce(&Applied) -> T,
    ) -> Result<T, ClusterError> {
        if !stale {
            self.read_barrier().await?;
        }
        Ok(f(&self.view.read()))
    }

    /// Probes each member's API; returns the round trip of those that answered as this cluster.
    pub async fn probe(
        &self,
        members: &BTreeMap<NodeId, MemberNode>,
    ) -> BTreeMap<NodeId, Duration> {
        let probes = members.iter().map(|(&id, node)| async move {
            if id == self.node_id {
                return Some((id, Duration::ZERO));
            }
            let mut client = self.peer(id, &node.addr).ok()?;
            let start = Instant::now();
            let reply = tokio::time::timeout(PROBE_TIMEOUT, client.ping(PingRequest {}))
                .await
                .ok()?
                .ok()?
                .into_inner();
            (reply.cluster_id == self.cluster_id && reply.node_id == id)
                .then(|| (id, start.elapsed()))
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// This node's status: Raft figures, and for each member its role, health and lag. Health and
    /// lag are known on the leader; elsewhere they are reported as unknown.
    pub async fn local_status(&self) -> StatusReply {
        let m = self.metrics();
        let committed = self
            .raft
            .with_raft_state(|st| st.committed.map(|l| l.index))
            .await
            .ok()
            .flatten();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let nodes: BTreeMap<NodeId, MemberNode> =
            membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let is_leader = m.state == ServerState::Leader;
        let rtts = if is_leader {
            self.probe(&nodes).await
        } else {
            BTreeMap::new()
        };
        let last = m.last_log_index.unwrap_or(0);
        let placement: BTreeMap<NodeId, flock_scheduler::Node> =
            self.view.read().cluster.nodes.clone();
        let members = nodes
            .iter()
            .map(|(id, node)| {
                let matched = if !is_leader {
                    None
                } else if *id == self.node_id {
                    m.last_log_index
                } else {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(id).cloned().flatten())
                        .map(|l| l.index)
                };
                let health = match (is_leader, rtts.get(id)) {
                    (false, _) => "unknown",
                    (true, Some(_)) => "healthy",
                    (true, None) => "unreachable",
                };
                Member {
                    id: *id,
                    name: node.name.clone(),
                    addr: node.addr.clone(),
                    role: if voters.contains(id) {
                        "voter"
                    } else {
                        "learner"
                    }
                    .into(),
                    health: health.into(),
                    matched_index: matched,
                    lag: if is_leader {
                        Some(last.saturating_sub(matched.unwrap_or(0)))
                    } else {
                        None
                    },
                    rtt_ms: rtts.get(id).map(|d| d.as_millis() as u64),
                    labels: placement
                        .get(id)
                        .map(|n| n.labels.clone().into_iter().collect())
                        .unwrap_or_default(),
                    memory: placement
                        .get(id)
                        .and_then(|n| n.capacity.as_ref())
                        .map(|c| c.memory),
                    cpus: placement
                        .get(id)
                        .and_then(|n| n.capacity.as_ref())
                        .map(|c| c.cpus),
                    docker: placement
                        .get(id)
                        .and_then(|n| n.capacity.as_ref())
                        .map(|c| c.docker),
                    state: placement
                        .get(id)
                        .map(|n| match n.state {
                            flock_scheduler::NodeState::Ready => "ready",
                            flock_scheduler::NodeState::Draining => "draining",
                            flock_scheduler::NodeState::Down => "down",
                        })
                        .unwrap_or_default()
                        .into(),
                }
            })
            .collect();
        let leader = m
            .current_leader
            .and_then(|id| nodes.get(&id).map(|n| (id, n.clone())));
        StatusReply {
            cluster_id: self.cluster_id.clone(),
            node_id: self.node_id,
            node_name: self.node_name.clone(),
            leader_id: leader.as_ref().map(|(id, _)| *id),
            leader_name: leader
                .as_ref()
                .map(|(_, n)| n.name.clone())
                .unwrap_or_default(),
            leader_addr: leader
                .as_ref()
                .map(|(_, n)| n.addr.clone())
                .unwrap_or_default(),
            term: m.current_term,
            commit_index: committed,
            applied_index: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            members,
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower if voters.contains(&self.node_id) => "follower",
                ServerState::Follower | ServerState::Learner => "learner",
                ServerState::Candidate => "candidate",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
            // The API adds them: it holds the node's workers.
            workers: Vec::new(),
            // The API adds them: it asks the datasets' primaries.
            warnings: Vec::new(),
        }
    }

    /// Removes the node named `name`: refuses to remove the last voter, or (without `force`) a
    /// voter whose removal leaves the healthy voters short of a quorum, or the node holding the
    /// cluster CA's key. Must run on the leader.
    pub async fn remove_node(&self, name: &str, force: bool) -> Result<NodeId, ClusterError> {
        self.read_barrier().await?;
        let (id, ca_holder) = {
            let a = self.view.read();
            let id = a.cluster.node_by_name(name).map(|n| n.id).ok_or_else(|| {
                ClusterError::NotFound(format!(
                    "no node named {}; `flockctl node ls` lists them",
                    flock_scheduler::shown(name)
                ))
            })?;
            (id, a.cluster.ca_holder)
        };

        let membership = self.metrics().membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let nodes: BTreeMap<NodeId, MemberNode> =
            membership.nodes().map(|(i, n)| (*i, n.clone())).collect();
        let healthy: BTreeSet<NodeId> = self.probe(&nodes).await.into_keys().collect();
        check_removal(&voters, &healthy, id, force)
            .map_err(|e| ClusterError::Refused(format!("cannot remove {name}: {e}")))?;
        if id == ca_holder && !force {
            return Err(ClusterError::Refused(format!(
                "cannot remove {name}: it holds the cluster CA's key; without it no node can join and no admin config can be issued; use --force to remove it anyway"
            )));
        }
        match self.propose(Command::RemoveNode { id }).await? {
            CommandResult::NodeRemoved { id } => Ok(id),
            CommandResult::Rejected(e) => Err(e.into()),
            other => Err(ClusterError::Fatal(format!("unexpected result {other:?}"))),
        }
    }
}

/// The leader's membership worker: keeps Raft membership in line with the registered nodes
/// (adds joined nodes as learners, drops removed ones) and promotes caught-up learners so the
/// voter count grows to 5 and stays odd. Acts only once the leader has applied its own term's
/// first entry, so it never acts on a state older than its leadership.
///
/// Its status: idle while this node is not the leader, running while it reconciles, and the
/// last deferred change as its last error.
pub async fn membership_worker(
    cluster: Arc<Cluster>,
    mut shutdown: watch::Receiver<bool>,
    status: crate::worker::WorkerStatus,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(MEMBERSHIP_TICK) => {}
            _ = shutdown.changed() => return,
        }
        let leading = cluster.is_leader();
        if leading {
            status.running();
        } else {
            status.idle("not the leader");
        }
        // A membership change waits for a quorum of the new configuration; at shutdown that
        // quorum may already be gone (a dev cluster stops its nodes one by one), so stopping
        // never waits for it. Raft resumes or drops the change on the next start.
        tokio::select! {
            r = reconcile_membership(&cluster) => {
                match r {
                    Err(e) => {
                        tracing::info!(error = %e, "membership change deferred");
                        status.error(format!("membership change deferred: {e}"));
                        status.idle("retrying a deferred membership change");
                    }
                    Ok(()) if leading => status.idle("leader: keeps membership in line with the registered nodes"),
                    Ok(()) => {}
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn reconcile_membership(cluster: &Cluster) -> Result<(), String> {
    let m = cluster.metrics();
    if m.state != ServerState::Leader {
        return Ok(());
    }
    if m.last_applied.map(|l| l.leader_id.term) != Some(m.current_term) {
        return Ok(());
    }
    let membership = m.membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members: BTreeMap<NodeId, MemberNode> =
        membership.nodes().map(|(i, n)| (*i, n.clone())).collect();
    let registered: BTreeMap<NodeId, MemberNode> = cluster
        .view
        .read()
        .cluster
        .nodes
        .values()
        .map(|n| {
            (
                n.id,
                MemberNode {
                    name: n.name.clone(),
                    addr: n.addr.clone(),
                },
            )
        })
        .collect();
    let raft = &cluster.raft;
    let fail = |e: RaftError<NodeId, ClientWriteError<NodeId, MemberNode>>| e.to_string();

    // Removed nodes leave Raft membership (voters first: they are not kept as learners).
    let gone_voters: BTreeSet<NodeId> = voters
        .iter()
        .copied()
        .filter(|id| !registered.contains_key(id))
        .collect();
    if !gone_voters.is_empty() {
        tracing::info!(nodes = ?gone_voters, "removing voters of removed nodes");
        raft.change_membership(ChangeMembers::RemoveVoters(gone_voters), false)
            .await
            .map_err(fail)?;
        return Ok(());
    }
    let gone: BTreeSet<NodeId> = members
        .keys()
        .copied()
        .filter(|id| !registered.contains_key(id))
        .collect();
    if !gone.is_empty() {
        tracing::info!(nodes = ?gone, "removing learners of removed nodes");
        raft.change_membership(ChangeMembers::RemoveNodes(gone), false)
            .await
            .map_err(fail)?;
        return Ok(());
    }
    // Joined nodes become learners.
    for (id, node) in registered
        .iter()
        .filter(|(id, _)| !members.contains_key(id))
    {
        tracing::info!(node = %node, id, "adding learner");
        raft.add_learner(*id, node.clone(), false)
            .await
            .map_err(fail)?;
    }
    // Caught-up learners become voters, keeping the count odd.
    let last = m.last_log_index.unwrap_or(0);
    let ready: Vec<NodeId> = members
        .keys()
        .copied()
        .filter(|id| !voters.contains(id))
        .filter(|id| {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id).cloned().flatten());
            matched.is_some_and(|l| l.index + CAUGHT_UP_SLACK >= last)
        })
        .collect();
    let promote = voters_to_promote(&voters, &ready);
    if !promote.is_empty() {
        tracing::info!(nodes = ?promote, "promoting learners to voters");
        raft.change_membership(
            ChangeMembers::AddVoterIds(promote.into_iter().collect()),
            true,
        )
        .await
        .map_err(fail)?;
    }
    Ok(())
}

impl Cluster {
    /// Resolves when Raft stops on a fatal error (a failed disk write, say), with the reason.
    pub async fn fatal(&self) -> String {
        let mut rx = self.raft.metrics();
        loop {
            if let Err(e) = &rx.borrow().running_state {
                return e.to_string();
            }
            if rx.changed().await.is_err() {
                return "raft stopped".to_string();
            }
        }
    }
}

/// A command waiting to be proposed, and who waits for its result.
struct Proposal {
    cmd: Command,
    /// Its encoded size, for bounding batches.
    bytes: usize,
    tx: oneshot::Sender<Result<CommandResult, ClusterError>>,
}

/// Checks `cmd` against every size limit; its encoded size when it keeps to them.
fn checked_size(cmd: &Command) -> Result<usize, ClusterError> {
    cmd.check_limits()?;
    Ok(limits::encoded_len(cmd))
}

/// Bytes a [`Command::Batch`] adds around its commands' own encodings (its tag and length;
/// generous).
const BATCH_OVERHEAD: usize = 16;

/// Most commands in one batch.
const MAX_BATCH: usize = 512;
/// Batches in Raft at once: two, so one batch's fsync on the leader overlaps the previous one's
/// replication.
const BATCHES_IN_FLIGHT: usize = 2;

/// Counts the leader changes this node sees (a known leader other than the last one known),
/// until Raft stops.
async fn count_leader_changes(
    mut rx: watch::Receiver<RaftMetrics>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut last = None;
    loop {
        let leader = rx.borrow_and_update().current_leader;
        if leader.is_some() && leader != last {
            if last.is_some() {
                metrics.raft.leader_changes.inc();
            }
            last = leader;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Proposes commands through Raft, batching those that arrive while earlier batches are in
/// flight into one [`Command::Batch`] entry. openraft 0.9 appends (and fsyncs) each client write
/// on its own, so without this every write would wait for its own fsync; with it, concurrent
/// writes share one.
async fn run_batcher(
    raft: Raft,
    timeout: Duration,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    // A proposal that did not fit the previous batch starts the next one.
    let mut carried: Option<Proposal> = None;
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let batch = fill_batch(first, &mut rx, &mut carried);
        let (raft, metrics) = (raft.clone(), metrics.clone());
        tokio::spawn(async move {
            propose_batch(&raft, timeout, batch, &metrics).await;
            drop(permit);
        });
    }
}

/// A batch: `first` and the proposals waiting in `rx`, at most [`MAX_BATCH`] of them and
/// within [`limits::MAX_COMMAND_BYTES`] encoded (one batch is one log entry, which keeps to
/// that like any command); a proposal that does not fit is left in `carried` for the next one.
fn fill_batch(
    first: Proposal,
    rx: &mut mpsc::UnboundedReceiver<Proposal>,
    carried: &mut Option<Proposal>,
) -> Vec<Proposal> {
    let mut bytes = BATCH_OVERHEAD + first.bytes;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(p) if bytes + p.bytes > limits::MAX_COMMAND_BYTES => {
                *carried = Some(p);
                break;
            }
            Ok(p) => {
                bytes += p.bytes;
                batch.push(p);
            }
            Err(_) => break,
        }
    }
    batch
}

async fn propose_batch(
    raft: &Raft,
    timeout: Duration,
    batch: Vec<Proposal>,
    metrics: &crate::metrics::Metrics,
) {
    let (mut cmds, txs): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.tx)).unzip();
    // Not the leader: refuse before appending, so the caller may safely send it elsewhere.
    if raft.metrics().borrow().state != ServerState::Leader {
        for tx in txs {
            let _ = tx.send(Err(ClusterError::NotLeader));
        }
        return;
    }
    let single = cmds.len() == 1;
    let cmd = match (single, cmds.pop()) {
        (true, Some(c)) => c,
        (_, last) => {
            cmds.extend(last);
            Command::Batch(cmds)
        }
    };
    let began = Instant::now();
    let written = tokio::time::timeout(timeout, raft.client_write(cmd)).await;
    let r = &metrics.raft;
    if let Ok(Ok(_)) = &written {
        r.commit_seconds.observe(began.elapsed().as_secs_f64());
        r.proposals_committed.inc_by(txs.len() as u64);
    } else {
        r.proposals_failed.inc_by(txs.len() as u64);
    }
    let outcome = match written {
        Err(_) => Err(ClusterError::OutcomeUnknown(format!(
            "not committed within {timeout:?}"
        ))),
        Ok(Ok(resp)) => Ok(resp.data),
        // openraft answers ForwardToLeader both when it refuses before appending and when it
        // truncates an appended entry; a truncated entry may still be held, and later committed,
        // by another node (with five voters), so after submitting as leader it is unknown.
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(
            ClusterError::OutcomeUnknown("leadership changed while the write was in flight".into()),
        ),
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
            Err(ClusterError::Refused(e.to_string()))
        }
        Ok(Err(RaftError::Fatal(f))) => Err(ClusterError::Fatal(f.to_string())),
    };
    match outcome {
        Ok(CommandResult::Batch(results)) if !single && results.len() == txs.len() => {
            for (tx, r) in txs.into_iter().zip(results) {
                let _ = tx.send(Ok(r));
            }
        }
        Ok(r) if single => {
            for tx in txs {
                let _ = tx.send(Ok(r.clone()));
            }
        }
        Ok(other) => {
            let e = ClusterError::Fatal(format!("unexpected result for a batch: {other:?}"));
            for tx in txs {
                let _ = tx.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for tx in txs {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_identity() -> TlsIdentity {
        let (ca, _) = crate::pki::CertAuthority::create("c0ffee").unwrap();
        TlsIdentity::from_pem(&ca.cert_pem, None).unwrap()
    }

    /// Concurrent proposals of the largest kv value: batches stay within MAX_COMMAND_BYTES
    /// (encoded, as Raft stores them), and every proposal goes, in order.
    #[test]
    fn batches_keep_to_the_command_limit() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let value = "m".repeat(flock_scheduler::MAX_VALUE_LEN);
        let mut waiters = Vec::new();
        for k in 0..8 {
            let cmd = Command::KvPut {
                key: format!("k{k}"),
                value: value.clone(),
            };
            let bytes = checked_size(&cmd).unwrap();
            let (ptx, prx) = oneshot::channel();
            waiters.push(prx);
            tx.send(Proposal {
                cmd,
                bytes,
                tx: ptx,
            })
            .unwrap();
        }
        for k in 0..600 {
            let cmd = Command::KvDelete {
                key: format!("small{k}"),
            };
            let bytes = checked_size(&cmd).unwrap();
            let (ptx, _) = oneshot::channel();
            tx.send(Proposal {
                cmd,
                bytes,
                tx: ptx,
            })
            .unwrap();
        }
        drop(tx);
        let mut carried = None;
        let mut keys = Vec::new();
        let mut batches = 0;
        loop {
            let first = match carried.take() {
                Some(p) => p,
                None => match rx.try_recv() {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let batch = fill_batch(first, &mut rx, &mut carried);
            assert!(batch.len() <= MAX_BATCH);
            let cmds: Vec<Command> = batch.into_iter().map(|p| p.cmd).collect();
            keys.extend(cmds.iter().map(|c| match c {
                Command::KvPut { key, .. } | Command::KvDelete { key } => key.clone(),
                _ => unreachable!(),
            }));
            let entry = Command::Batch(cmds);
            assert!(encode(&entry).len() <= limits::MAX_COMMAND_BYTES);
            assert_eq!(entry.check_limits(), Ok(()));
            batches += 1;
        }
        let want: Vec<String> = (0..8)
            .map(|k| format!("k{k}"))
            .chain((0..600).map(|k| format!("small{k}")))
            .collect();
        assert_eq!(keys, want);
        // Two of the largest values a batch (4 MiB holds two of 1.5 MiB, not three).
        // Four batches hold the large puts, two each (the fourth fills up to MAX_BATCH with
        // small ones); a fifth takes the remaining small ones.
        assert_eq!(batches, 5);
    }

    /// A forward to a leader whose name no longer resolves (a dead container) was never sent:
    /// it must be retried, not reported as an unknown outcome.
    #[tokio::test]
    async fn unresolvable_leader_counts_as_never_sent() {
        let ch =
            lazy_channel("no-such-node.invalid:7801", &test_identity(), Peer::Node(2)).unwrap();
        let status = ApiClient::new(ch).ping(PingRequest {}).await.unwrap_err();
        assert!(never_sent(&status), "{status:?}");
    }

    #[tokio::test]
    async fn refused_connection_counts_as_never_sent() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ch = lazy_channel(
            &format!("127.0.0.1:{port}"),
            &test_identity(),
            Peer::Node(2),
        )
        .unwrap();
        let status = ApiClient::new(ch).ping(PingRequest {}).await.unwrap_err();
        assert!(never_sent(&status), "{status:?}");
        assert!(!never_sent(&tonic::Status::deadline_exceeded("x")));
        assert!(!never_sent(&tonic::Status::unavailable("connection reset")));
    }
}
