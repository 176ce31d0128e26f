//! openraft's network over gRPC: each Raft RPC is one unary call whose payload is openraft's own
//! request, postcard-encoded (see [`crate::codec`]), tagged with the cluster id.
//!
//! Sizes and time: every message is at most [`MAX_MESSAGE_BYTES`]; AppendEntries carry at most
//! about [`MAX_APPEND_BYTES`] of entries (one larger entry goes alone). openraft drops an
//! AppendEntries call after one heartbeat interval, whatever it carries, which a multi-MiB batch
//! cannot meet: a call with entries therefore runs in a task of its own, with a timeout that
//! grows with its bytes ([`call_timeout`]), and the retry openraft sends after dropping it waits
//! for that same call instead of sending the entries again (see [`GrpcConnection`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use flock_proto::v1::raft_client::RaftClient;
use flock_proto::v1::{RaftReply, RaftRequest};

use crate::codec::{decode, encode};
use crate::types::{Entry, LogId, MemberNode, NodeId, TypeConfig, Vote};

/// How long a connection attempt to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The largest message the Raft service receives or sends, either way. AppendEntries stay near
/// [`MAX_APPEND_BYTES`] (a single entry is at most one command, 4 MiB, or one proposal batch of
/// about that), snapshot chunks at most [`SNAPSHOT_CHUNK_BYTES`]; the rest is headroom.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// An AppendEntries carries entries up to about this many bytes (encoded); an entry larger than
/// that goes alone.
pub const MAX_APPEND_BYTES: usize = 8 << 20;

/// The most snapshot bytes in one InstallSnapshot call (openraft's `snapshot_max_chunk_size`).
pub const SNAPSHOT_CHUNK_BYTES: u64 = 3 << 20;

/// The throughput a call's timeout allows for what it carries, on top of the heartbeat-derived
/// time: low enough for a loaded machine, TLS and the follower's fsync (6 MiB calls did not
/// finish within 176 ms, at 50 MB/s, on a busy two-core machine running a debug build).
pub const MIN_BYTES_PER_SEC: u64 = 20_000_000;

/// How long a heartbeat sent beside a running batch may take to reach the peer: it only has to
/// arrive, and a peer busy writing the batch reads it late.
const SIDE_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// An entry's size as it travels and is stored (postcard; counted, not encoded).
pub fn entry_bytes(e: &Entry) -> usize {
    postcard::experimental::serialized_size(e).unwrap_or(usize::MAX)
}

/// How many of the entries with these sizes, from the first, fit in [`MAX_APPEND_BYTES`]
/// (at least one), and their bytes.
pub fn fitting(sizes: impl IntoIterator<Item = usize>) -> (usize, usize) {
    let (mut n, mut bytes) = (0usize, 0usize);
    for size in sizes {
        if n > 0 && bytes.saturating_add(size) > MAX_APPEND_BYTES {
            break;
        }
        n += 1;
        bytes = bytes.saturating_add(size);
    }
    (n, bytes)
}

/// How long a call carrying `bytes` may take: `base` (what openraft allows a small call) plus
/// the bytes at [`MIN_BYTES_PER_SEC`].
pub fn call_timeout(base: Duration, bytes: usize) -> Duration {
    base + Duration::from_micros((bytes as u64).saturating_mul(1_000_000) / MIN_BYTES_PER_SEC)
}

/// A gRPC channel over mutual TLS to `addr` (HOST:PORT), connected on first use.
pub fn lazy_channel(addr: &str, tls: &ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls.clone())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // Detect a peer that vanished without closing its connections (a paused or partitioned
        // node) within about two seconds, instead of letting requests hang on the dead connection.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Creates a connection per peer; openraft keeps one per replication stream.
#[derive(Clone)]
pub struct GrpcNetwork {
    cluster_id: String,
    tls: ClientTlsConfig,
    /// One channel per peer address. openraft asks for a new client for every replication
    /// stream and every leadership check (each linearizable read); a channel per call would mean
    /// a TCP and TLS handshake per read.
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl GrpcNetwork {
    /// A network for `cluster_id` whose connections use `tls` (this node's client identity).
    pub fn new(cluster_id: impl Into<String>, tls: ClientTlsConfig) -> Self {
        GrpcNetwork {
            cluster_id: cluster_id.into(),
            tls,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let ch = lazy_channel(addr, &self.tls)?;
        channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// How many peer channels are open (for tests).
    pub fn channel_count(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> GrpcConnection {
        let client = match self.channel(&node.addr) {
            Ok(ch) => Ok(RaftClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)),
            Err(e) => Err(format!(
                "bad address {:?} for node {target}: {e}",
                node.addr
            )),
        };
        GrpcConnection {
            target,
            cluster_id: self.cluster_id.clone(),
            client,
            in_flight: None,
            stretch: Arc::new(AtomicU32::new(1)),
            beating: Arc::new(AtomicBool::new(false)),
        }
    }
}

type AppendResult =
    Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>>;

/// An AppendEntries' answer in a form that every waiter can have a copy of.
#[derive(Clone, Debug)]
enum Outcome {
    Success,
    PartialSuccess(Option<LogId>),
    Conflict,
    HigherVote(Vote),
    Unreachable(String),
    Failed(String),
}

impl From<AppendResult> for Outcome {
    fn from(r: AppendResult) -> Self {
        match r {
            Ok(AppendEntriesResponse::Success) => Outcome::Success,
            Ok(AppendEntriesResponse::PartialSuccess(m)) => Outcome::PartialSuccess(m),
            Ok(AppendEntriesResponse::Conflict) => Outcome::Conflict,
            Ok(AppendEntriesResponse::HigherVote(v)) => Outcome::HigherVote(v),
            Err(RPCError::Unreachable(e)) => Outcome::Unreachable(e.to_string()),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

impl Outcome {
    fn failed(&self) -> bool {
        matches!(self, Outcome::Unreachable(_) | Outcome::Failed(_))
    }

    fn into_result(self) -> AppendResult {
        match self {
            Outcome::Success => Ok(AppendEntriesResponse::Success),
            Outcome::PartialSuccess(m) => Ok(AppendEntriesResponse::PartialSuccess(m)),
            Outcome::Conflict => Ok(AppendEntriesResponse::Conflict),
            Outcome::HigherVote(v) => Ok(AppendEntriesResponse::HigherVote(v)),
            Outcome::Unreachable(e) => Err(RPCError::Unreachable(Unreachable::new(&Failure(e)))),
            Outcome::Failed(e) => Err(RPCError::Network(NetworkError::new(&Failure(e)))),
        }
    }
}

/// An AppendEntries with entries, running in its own task until its own timeout.
struct InFlight {
    vote: Vote,
    prev: Option<LogId>,
    last: LogId,
    done: watch::Receiver<Option<Outcome>>,
    task: JoinHandle<()>,
}

impl InFlight {
    /// Whether a request for `vote`, `prev` and `entries` covers this call's entries, so that
    /// its answer holds for them: the same leader and starting point, and the same entry at this
    /// call's last index (a leader never changes an entry of its own term).
    fn covered_by(&self, vote: &Vote, prev: &Option<LogId>, entries: &[Entry]) -> bool {
        let Some(first) = entries.first() else {
            return false;
        };
        self.vote == *vote
            && self.prev == *prev
            && self.last.index >= first.log_id.index
            && entries
                .get((self.last.index - first.log_id.index) as usize)
                .is_some_and(|e| e.log_id == self.last)
    }

    fn failed(&self) -> bool {
        self.done.borrow().as_ref().is_some_and(Outcome::failed)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection to one peer, for one replication stream.
pub struct GrpcConnection {
    target: NodeId,
    cluster_id: String,
    client: Result<RaftClient<Channel>, String>,
    /// The latest AppendEntries with entries, while it runs and until openraft has its answer.
    in_flight: Option<InFlight>,
    /// How many times the usual time a call with entries gets: doubled after each one that
    /// failed (up to [`MAX_STRETCH`]), back to 1 after one that worked. A peer slower than
    /// [`MIN_BYTES_PER_SEC`] (a loaded machine, a slow disk) still gets every batch through.
    stretch: Arc<AtomicU32>,
    /// Whether a heartbeat sent beside a running batch is still on its way (one at a time).
    beating: Arc<AtomicBool>,
}

/// The most a call's time is stretched after failures.
const MAX_STRETCH: u32 = 16;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

/// Which RPC to make.
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl GrpcConnection {
    fn client(&self) -> Result<RaftClient<Channel>, Unreachable> {
        self.client
            .clone()
            .map_err(|e| Unreachable::new(&Failure(e)))
    }

    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, MemberNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = self.client().map_err(RPCError::Unreachable)?;
        send(
            client,
            self.target,
            self.cluster_id.clone(),
            rpc,
            encode(req),
            timeout,
        )
        .await
    }

    /// An empty AppendEntries from `rpc`'s starting point, sent in the background.
    fn heartbeat(&self, rpc: &AppendEntriesRequest<TypeConfig>) {
        let Ok(client) = self.client() else {
            return;
        };
        if self.beating.swap(true, Ordering::AcqRel) {
            return;
        }
        let beating = self.beating.clone();
        let beat = AppendEntriesRequest::<TypeConfig> {
            vote: rpc.vote,
            prev_log_id: rpc.prev_log_id,
            leader_commit: rpc.leader_commit,
            entries: Vec::new(),
        };
        let (target, cluster_id, payload) = (self.target, self.cluster_id.clone(), encode(&beat));
        tokio::spawn(async move {
            let r: AppendResult = send(
                client,
                target,
                cluster_id,
                Rpc::AppendEntries,
                payload,
                SIDE_HEARTBEAT_TIMEOUT,
            )
            .await;
            beating.store(false, Ordering::Release);
            if let Err(e) = r {
                tracing::debug!(target, error = %e, "heartbeat beside a running batch");
            }
        });
    }

    /// Sends entries in a task of their own (see the module doc), or waits for the running call
    /// that already carries them.
    async fn append_detached(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        bytes: usize,
        option: &RPCOption,
    ) -> AppendResult {
        let Some(last) = rpc.entries.last().map(|e| e.log_id) else {
            return self.call(Rpc::AppendEntries, &rpc, option.hard_ttl()).await;
        };
        let joined = self
            .in_flight
            .as_ref()
            .filter(|f| !f.failed() && f.covered_by(&rpc.vote, &rpc.prev_log_id, &rpc.entries));
        let (mut done, carried) = match joined {
            Some(f) => {
                let done = (f.done.clone(), f.last);
                // openraft gave up on the running call and sends its entries again; until that
                // call is done, keep the peer's election timer at bay as openraft's heartbeat
                // would (an empty AppendEntries from the same point), so that a batch that takes
                // longer than an election timeout does not cost the leader its followers.
                if done.0.borrow().is_none() {
                    self.heartbeat(&rpc);
                }
                done
            }
            None => {
                let client = self.client().map_err(RPCError::Unreachable)?;
                let (tx, done) = watch::channel(None);
                let (target, cluster_id) = (self.target, self.cluster_id.clone());
                let payload = encode(&rpc);
                let stretch = self.stretch.clone();
                let factor = stretch.load(Ordering::Relaxed).clamp(1, MAX_STRETCH);
                let timeout = call_timeout(option.hard_ttl(), bytes) * factor;
                let task = tokio::spawn(async move {
                    let r = send(
                        client,
                        target,
                        cluster_id,
                        Rpc::AppendEntries,
                        payload,
                        timeout,
                    )
                    .await;
                    let outcome = Outcome::from(r);
                    let next = if outcome.failed() {
                        (factor * 2).min(MAX_STRETCH)
                    } else {
                        1
                    };
                    stretch.store(next, Ordering::Relaxed);
                    if outcome.failed() {
                        tracing::debug!(target, ?timeout, ?outcome, "replication call failed");
                    }
                    let _ = tx.send(Some(outcome));
                });
                // Replacing an earlier call aborts it: its entries are no longer wanted.
                self.in_flight = Some(InFlight {
                    vote: rpc.vote,
                    prev: rpc.prev_log_id,
                    last,
                    done: done.clone(),
                    task,
                });
                (done, last)
            }
        };
        // openraft may drop this future at its own timeout; the call goes on, and the retry
        // that follows joins it.
        let result = match done.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone().map(Outcome::into_result),
            Err(_) => None,
        }
        .unwrap_or_else(|| unreachable_result(self.target));
        // openraft has the answer now: the next request starts afresh.
        self.in_flight = None;
        match result {
            // The running call carried a prefix of this request's entries.
            Ok(AppendEntriesResponse::Success) if carried != last => {
                Ok(AppendEntriesResponse::PartialSuccess(Some(carried)))
            }
            other => other,
        }
    }
}

fn unreachable_result(target: NodeId) -> AppendResult {
    Err(RPCError::Network(NetworkError::new(&Failure(format!(
        "node {target}: the replication call stopped without an answer"
    )))))
}

/// One call to `target`, given up after `timeout`.
async fn send<Resp, E>(
    mut client: RaftClient<Channel>,
    target: NodeId,
    cluster_id: String,
    rpc: Rpc,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<Resp, RPCError<NodeId, MemberNode, RaftError<NodeId, E>>>
where
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let mut request = tonic::Request::new(RaftRequest {
        cluster_id,
        payload,
    });
    request.set_timeout(timeout);
    let call = async {
        match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::InstallSnapshot => client.install_snapshot(request).await,
        }
    };
    // The deadline travels to the server; this one also covers a peer that never answers.
    let reply = match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {timeout:?}"
        ))),
    };
    let RaftReply { payload } = match reply {
        Ok(r) => r.into_inner(),
        Err(status) => {
            let f = Failure(format!("node {target}: {}", status.message()));
            return Err(match status.code() {
                tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&f)),
                _ => RPCError::Network(NetworkError::new(&f)),
            });
        }
    };
    let result: Result<Resp, RaftError<NodeId, E>> = decode(&payload).map_err(|e| {
        RPCError::Network(NetworkError::new(&Failure(format!(
            "node {target} sent an undecodable reply: {e}"
        ))))
    })?;
    result.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
}

impl RaftNetwork<TypeConfig> for GrpcConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>>
    {
        // The log reader already hands out byte-bounded batches; this holds for any caller.
        let sizes: Vec<usize> = rpc.entries.iter().map(entry_bytes).collect();
        let (fit, _) = fitting(sizes.iter().copied());
        if fit < sizes.len() {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(fit as u64),
            ));
        }
        let bytes = sizes.iter().sum();
        self.append_detached(rpc, bytes, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, MemberNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let timeout = call_timeout(option.hard_ttl(), rpc.data.len());
        self.call(Rpc::InstallSnapshot, &rpc, timeout).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }
}
