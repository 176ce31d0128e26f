//! openraft's network over gRPC: each Raft RPC is one unary call whose payload is openraft's own
//! request, postcard-encoded (see [`crate::codec`]), tagged with the cluster id.
//!
//! Sizes and time: every message is at most [`MAX_MESSAGE_BYTES`]; AppendEntries carry at most
//! about [`MAX_APPEND_BYTES`] of entries (one larger entry goes alone). openraft drops an
//! AppendEntries call after one heartbeat interval, whatever it carries, which a multi-MiB batch
//! cannot meet: a call with entries therefore runs in a task of its own, with a timeout that
//! grows with its bytes ([`call_timeout`]), and the retry openraft sends after dropping it waits
//! for that same call instead of sending the entries again (see [`GrpcConnection`]).
//!
//! AppendEntries of up to [`STREAM_MAX_BYTES`] go on one long-lived stream per peer
//! ([`PeerStream`], the `AppendStream` RPC) instead of a unary call each: a call then costs one
//! message each way, not an HTTP/2 stream with its headers and trailers (issue 20). A peer whose
//! build lacks the RPC answers UNIMPLEMENTED, and calls to it stay unary (tried again after
//! [`STREAM_RETRY`], for a peer upgraded meanwhile).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use flock_proto::v1::raft_client::RaftClient;
use flock_proto::v1::{RaftReply, RaftRequest};

use crate::codec::{decode, encode};
use crate::tls::{peer_channel, Peer, TlsError, TlsIdentity};
use crate::types::{Entry, LogId, MemberNode, NodeId, TypeConfig, Vote};

pub use crate::tls::CONNECT_TIMEOUT;

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

/// How many AppendEntries may be on a peer's stream, sent and not yet answered; a call past
/// that goes unary. Also the depth of the server's reply queue.
pub const STREAM_DEPTH: usize = 64;

/// AppendEntries larger than this go as unary calls, each on its own HTTP/2 stream, so that a
/// heartbeat sent beside a running batch (see [`GrpcConnection`]) is not queued behind it.
pub const STREAM_MAX_BYTES: usize = 256 << 10;

/// How long opening a peer's stream may take (connecting included); calls queued meanwhile go
/// unary after it.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// After a peer answered that it has no AppendStream, how long its calls stay unary before the
/// stream is tried again.
pub const STREAM_RETRY: Duration = Duration::from_secs(30);

/// After a stream failed to open (the peer is down, or accepts connections and never answers),
/// how long its calls stay unary before another open: at most one open per peer is pending,
/// and one starts at most this often.
pub const STREAM_BACKOFF: Duration = Duration::from_secs(2);

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

/// A gRPC channel over mutual TLS to node `target` at `addr` (HOST:PORT), connected on first
/// use; the connection is refused unless the peer's certificate is `target`'s.
pub fn lazy_channel(addr: &str, tls: &TlsIdentity, target: Peer) -> Result<Channel, TlsError> {
    peer_channel(addr, tls, target, CONNECT_TIMEOUT)
}

/// Each peer's AppendEntries stream, by peer id and address.
type PeerStreams = HashMap<(NodeId, String), Arc<PeerStream>>;

/// Creates a connection per peer; openraft keeps one per replication stream.
#[derive(Clone)]
pub struct GrpcNetwork {
    cluster_id: String,
    tls: TlsIdentity,
    /// One channel per peer (id and address). openraft asks for a new client for every replication
    /// stream and every leadership check (each linearizable read); a channel per call would mean
    /// a TCP and TLS handshake per read.
    channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
    /// One AppendEntries stream per peer, shared by every connection to it.
    streams: Arc<Mutex<PeerStreams>>,
}

impl GrpcNetwork {
    /// A network for `cluster_id` whose connections use `tls` (this node's client identity).
    pub fn new(cluster_id: impl Into<String>, tls: TlsIdentity) -> Self {
        GrpcNetwork {
            cluster_id: cluster_id.into(),
            tls,
            channels: Arc::new(Mutex::new(HashMap::new())),
            streams: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn stream(&self, target: NodeId, addr: &str, client: &RaftClient<Channel>) -> Arc<PeerStream> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .entry((target, addr.to_string()))
            .or_insert_with(|| Arc::new(PeerStream::new(client.clone())))
            .clone()
    }

    fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, TlsError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (target, addr.to_string());
        if let Some(ch) = channels.get(&key) {
            return Ok(ch.clone());
        }
        let ch = lazy_channel(addr, &self.tls, Peer::Node(target))?;
        channels.insert(key, ch.clone());
        Ok(ch)
    }

    /// Drops the cached channels (after this node's certificate was renewed): new clients
    /// connect afresh with the new certificate.
    pub fn reset_channels(&self) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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
        let client = match self.channel(target, &node.addr) {
            Ok(ch) => Ok(RaftClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)),
            Err(e) => Err(format!(
                "bad address {:?} for node {target}: {e}",
                node.addr
            )),
        };
        let stream = client
            .as_ref()
            .ok()
            .map(|c| self.stream(target, &node.addr, c));
        GrpcConnection {
            target,
            cluster_id: self.cluster_id.clone(),
            client,
            stream,
            in_flight: None,
            stretch: Arc::new(AtomicU32::new(1)),
            beating: Arc::new(AtomicBool::new(false)),
        }
    }
}

// openraft's RaftNetwork fixes this error type (280 bytes), hence `result_large_err` allowed on
// the few functions that return it.
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

    #[allow(clippy::result_large_err)]
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
    /// The peer's AppendEntries stream (None when the address is bad).
    stream: Option<Arc<PeerStream>>,
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
        let stream = match rpc {
            Rpc::AppendEntries => self.stream.clone(),
            _ => None,
        };
        send(
            client,
            stream,
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
            // Unary: on the stream it would wait behind what it is sent beside.
            let r: AppendResult = send(
                client,
                None,
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
    #[allow(clippy::result_large_err)]
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
                let stream = self.stream.clone();
                let (tx, done) = watch::channel(None);
                let (target, cluster_id) = (self.target, self.cluster_id.clone());
                let payload = encode(&rpc);
                let stretch = self.stretch.clone();
                let factor = stretch.load(Ordering::Relaxed).clamp(1, MAX_STRETCH);
                let timeout = call_timeout(option.hard_ttl(), bytes) * factor;
                let task = tokio::spawn(async move {
                    let r = send(
                        client,
                        stream,
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

#[allow(clippy::result_large_err)]
fn unreachable_result(target: NodeId) -> AppendResult {
    Err(RPCError::Network(NetworkError::new(&Failure(format!(
        "node {target}: the replication call stopped without an answer"
    )))))
}

/// One call to `target`, given up after `timeout`: on `stream` when given, it takes the call
/// and the payload is small, else unary.
async fn send<Resp, E>(
    mut client: RaftClient<Channel>,
    stream: Option<Arc<PeerStream>>,
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
    let request = RaftRequest {
        cluster_id,
        payload,
    };
    let streamed = match stream.filter(|_| request.payload.len() <= STREAM_MAX_BYTES) {
        Some(stream) => stream.call(request, timeout).await,
        None => Err(request),
    };
    let reply = match streamed {
        Ok(reply) => reply,
        // Not on the stream, and certainly not sent there: unary.
        Err(request) => {
            let mut request = tonic::Request::new(request);
            request.set_timeout(timeout);
            let call = async {
                match rpc {
                    Rpc::AppendEntries => client.append_entries(request).await,
                    Rpc::Vote => client.vote(request).await,
                    Rpc::InstallSnapshot => client.install_snapshot(request).await,
                }
            };
            // The deadline travels to the server; this one also covers a peer that never
            // answers.
            match tokio::time::timeout(timeout, call).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {timeout:?}"
                ))),
            }
        }
    };
    let RaftReply { payload } = match reply {
        Ok(r) => r,
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

/// What becomes of a call given to a [`PeerStream`].
enum Answer {
    Reply(Result<RaftReply, tonic::Status>),
    /// Never written to the stream (it did not open, or ended first): send it unary.
    NotSent(RaftRequest),
}

/// A call waiting on a [`PeerStream`]: the request, and where its answer goes.
type StreamCall = (RaftRequest, oneshot::Sender<Answer>);

/// Whether a peer's AppendEntries stream is open.
enum StreamState {
    /// Not open: the next call opens it.
    Idle,
    /// Being opened: calls queue for its pump task, which sends them once it is open (or gives
    /// them back to go unary when it does not open).
    Opening(mpsc::Sender<StreamCall>),
    /// Open: calls go to its pump task.
    Open(mpsc::Sender<StreamCall>),
    /// The peer has no AppendStream (an older build), as found at this time.
    Unsupported(Instant),
    /// The last open failed at this time ([`STREAM_BACKOFF`]).
    Failed(Instant),
}

impl StreamState {
    fn pump(&self) -> Option<&mpsc::Sender<StreamCall>> {
        match self {
            StreamState::Opening(tx) | StreamState::Open(tx) => Some(tx),
            _ => None,
        }
    }
}

/// One peer's AppendEntries stream: calls are written to it in order and answered in order by
/// a pump task, which the first call starts and which ends with the stream.
pub struct PeerStream {
    client: RaftClient<Channel>,
    state: Mutex<StreamState>,
    /// How many times a stream was opened (started to be).
    opens: AtomicU32,
}

impl PeerStream {
    fn new(client: RaftClient<Channel>) -> Self {
        PeerStream {
            client,
            state: Mutex::new(StreamState::Idle),
            opens: AtomicU32::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stream's pump, started when none runs; None while the peer is known not to have
    /// the RPC.
    fn pump(self: &Arc<Self>) -> Option<mpsc::Sender<StreamCall>> {
        let mut state = self.state();
        match &*state {
            StreamState::Open(tx) | StreamState::Opening(tx) if !tx.is_closed() => {
                return Some(tx.clone())
            }
            StreamState::Unsupported(at) if at.elapsed() < STREAM_RETRY => return None,
            StreamState::Failed(at) if at.elapsed() < STREAM_BACKOFF => return None,
            _ => {}
        }
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        *state = StreamState::Opening(tx.clone());
        self.opens.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(run_pump(
            Arc::downgrade(self),
            self.client.clone(),
            tx.clone(),
            rx,
        ));
        Some(tx)
    }

    /// Sets the state that follows the pump `tx`, if it is still the stream's pump and, when
    /// `only_open`, open (not still opening).
    fn replace(&self, tx: &mpsc::Sender<StreamCall>, next: StreamState, only_open: bool) {
        let mut state = self.state();
        let current = state.pump().is_some_and(|p| p.same_channel(tx));
        if current && !(only_open && matches!(&*state, StreamState::Opening(_))) {
            *state = next;
        }
    }

    /// Makes `request` on the stream, waiting at most `timeout` for its answer. Gives the
    /// request back when it was certainly not sent (the peer lacks the RPC, the stream did not
    /// open, too many calls waiting), so that the caller sends it unary.
    async fn call(
        self: &Arc<Self>,
        request: RaftRequest,
        timeout: Duration,
    ) -> Result<Result<RaftReply, tonic::Status>, RaftRequest> {
        let Some(tx) = self.pump() else {
            return Err(request);
        };
        let (answer, answered) = oneshot::channel();
        if let Err(e) = tx.try_send((request, answer)) {
            let (mpsc::error::TrySendError::Full((request, _))
            | mpsc::error::TrySendError::Closed((request, _))) = e;
            return Err(request);
        }
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(Answer::Reply(reply))) => Ok(reply),
            Ok(Ok(Answer::NotSent(request))) => Err(request),
            Ok(Err(_)) => Ok(Err(tonic::Status::unavailable(
                "the replication stream ended before the call was answered",
            ))),
            Err(_) => {
                // Unanswered in time: the next call opens a new stream rather than queue
                // behind a stuck one. Not while it is still opening: that has its own timeout,
                // and against a peer that never answers every call would start another open.
                self.replace(&tx, StreamState::Idle, true);
                Ok(Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {timeout:?}"
                ))))
            }
        }
    }
}

/// Runs one AppendEntries stream: opens it, writes each call's request and hands each answer,
/// in order, to its caller. Ends when the stream fails or closes, or when no connection holds
/// its sender any longer; calls written and unanswered then fail (openraft retries them), and
/// calls not yet written go back to their callers to be sent unary.
async fn run_pump(
    peer: std::sync::Weak<PeerStream>,
    mut client: RaftClient<Channel>,
    tx: mpsc::Sender<StreamCall>,
    mut calls: mpsc::Receiver<StreamCall>,
) {
    let (requests, outgoing) = mpsc::channel::<RaftRequest>(STREAM_DEPTH);
    let opened = tokio::time::timeout(
        STREAM_OPEN_TIMEOUT,
        client.append_stream(ReceiverStream::new(outgoing)),
    )
    .await
    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("the stream did not open")));
    let mut replies = match opened {
        Ok(r) => r.into_inner(),
        Err(status) => {
            let next = if status.code() == tonic::Code::Unimplemented {
                tracing::debug!("peer has no AppendStream; its AppendEntries stay unary");
                StreamState::Unsupported(Instant::now())
            } else {
                tracing::debug!(error = %status, "the replication stream did not open");
                StreamState::Failed(Instant::now())
            };
            if let Some(peer) = peer.upgrade() {
                peer.replace(&tx, next, false);
            }
            give_back(&mut calls);
            return;
        }
    };
    if let Some(peer) = peer.upgrade() {
        peer.replace(&tx, StreamState::Open(tx.clone()), false);
    }
    drop(tx);
    let mut waiting: VecDeque<oneshot::Sender<Answer>> = VecDeque::new();
    let ended = loop {
        tokio::select! {
            call = calls.recv() => match call {
                Some((request, answer)) => match requests.try_send(request) {
                    Ok(()) => waiting.push_back(answer),
                    Err(e) => {
                        let _ = answer.send(Answer::NotSent(e.into_inner()));
                    }
                },
                None => break tonic::Status::unavailable("the replication stream was closed"),
            },
            reply = replies.message() => match reply {
                Ok(Some(reply)) => match waiting.pop_front() {
                    Some(answer) => {
                        let _ = answer.send(Answer::Reply(Ok(reply)));
                    }
                    None => break tonic::Status::internal("the peer answered a call not made"),
                },
                Ok(None) => {
                    break tonic::Status::unavailable("the peer closed the replication stream")
                }
                Err(status) => break status,
            },
        }
    };
    for answer in waiting {
        let _ = answer.send(Answer::Reply(Err(ended.clone())));
    }
    give_back(&mut calls);
}

/// Hands every call not yet taken from `calls` back to its caller, unsent.
fn give_back(calls: &mut mpsc::Receiver<StreamCall>) {
    calls.close();
    while let Ok((request, answer)) = calls.try_recv() {
        let _ = answer.send(Answer::NotSent(request));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
    use std::sync::atomic::AtomicUsize;
    use tonic::{Request, Response, Status, Streaming};

    /// A Raft service that echoes payloads and counts how calls arrive; `streams: false` is a
    /// build without AppendStream.
    #[derive(Clone)]
    struct Echo {
        streams: bool,
        unary: Arc<AtomicUsize>,
        streamed: Arc<AtomicUsize>,
        opened: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl RaftRpc for Echo {
        type AppendStreamStream = crate::server::ReplyStream;

        async fn append_entries(
            &self,
            req: Request<RaftRequest>,
        ) -> Result<Response<RaftReply>, Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(RaftReply {
                payload: req.into_inner().payload,
            }))
        }
        async fn vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("vote"))
        }
        async fn install_snapshot(
            &self,
            _: Request<RaftRequest>,
        ) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("install_snapshot"))
        }
        async fn append_stream(
            &self,
            req: Request<Streaming<RaftRequest>>,
        ) -> Result<Response<Self::AppendStreamStream>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("not in this build"));
            }
            self.opened.fetch_add(1, Ordering::SeqCst);
            let mut incoming = req.into_inner();
            let (tx, rx) = mpsc::channel(STREAM_DEPTH);
            let streamed = self.streamed.clone();
            tokio::spawn(async move {
                while let Ok(Some(m)) = incoming.message().await {
                    streamed.fetch_add(1, Ordering::SeqCst);
                    // "end" ends the stream with an error, as a refusal does.
                    let answer = if m.payload == b"end" {
                        Err(Status::permission_denied("ended"))
                    } else {
                        Ok(RaftReply { payload: m.payload })
                    };
                    let end = answer.is_err();
                    if tx.send(answer).await.is_err() || end {
                        break;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    async fn serve(streams: bool) -> (Echo, RaftClient<Channel>) {
        let echo = Echo {
            streams,
            unary: Arc::default(),
            streamed: Arc::default(),
            opened: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = RaftServer::new(echo.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        (echo, RaftClient::new(ch))
    }

    fn req(payload: &[u8]) -> RaftRequest {
        RaftRequest {
            cluster_id: "c".into(),
            payload: payload.to_vec(),
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn calls_share_one_stream_and_each_gets_its_own_answer() {
        let (echo, client) = serve(true).await;
        let stream = Arc::new(PeerStream::new(client));
        // Concurrent callers on one stream: every answer is its own call's.
        for round in 0..4u32 {
            let mut calls = Vec::new();
            for i in 0..(STREAM_DEPTH as u32 * 3 / 4) {
                let stream = stream.clone();
                calls.push(tokio::spawn(async move {
                    let payload = (round * 1000 + i).to_le_bytes();
                    let reply = stream.call(req(&payload), T).await;
                    let reply = reply.expect("taken by the stream").unwrap();
                    assert_eq!(reply.payload, payload);
                }));
            }
            for c in calls {
                c.await.unwrap();
            }
        }
        assert_eq!(echo.streamed.load(Ordering::SeqCst), STREAM_DEPTH * 3);
        assert_eq!(echo.opened.load(Ordering::SeqCst), 1);
        assert_eq!(echo.unary.load(Ordering::SeqCst), 0);
        // A stream the peer ends fails the call on it; the next call opens a new one.
        let ended = stream.call(req(b"end"), T).await.ok().unwrap();
        assert_eq!(ended.unwrap_err().code(), tonic::Code::PermissionDenied);
        let again = stream.call(req(b"x"), T).await.ok().unwrap().unwrap();
        assert_eq!(again.payload, b"x");
        assert_eq!(echo.opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_older_peer_without_the_stream_gets_unary_calls() {
        let (echo, client) = serve(false).await;
        let stream = Arc::new(PeerStream::new(client.clone()));
        let back = stream.call(req(b"a"), T).await.expect_err("given back");
        assert_eq!(back.payload, b"a");
        assert!(matches!(*stream.state(), StreamState::Unsupported(_)));
        // Through `send`, as the network makes calls: answered, unary.
        let r: AppendResult = send(
            client,
            Some(stream.clone()),
            2,
            "c".into(),
            Rpc::AppendEntries,
            encode(&Ok::<AppendEntriesResponse<NodeId>, RaftError<NodeId>>(
                AppendEntriesResponse::Success,
            )),
            T,
        )
        .await;
        // The echo hands back what was sent: an encoded Ok(Success).
        assert!(matches!(r, Ok(AppendEntriesResponse::Success)), "{r:?}");
        assert_eq!(echo.unary.load(Ordering::SeqCst), 1);
        assert_eq!(echo.streamed.load(Ordering::SeqCst), 0);
    }

    /// A peer that accepts connections and never answers: calls that time out while the
    /// stream is still opening do not each start another open (one pending open per peer), and
    /// after the open fails calls go unary for a while instead of opening again at once.
    #[tokio::test]
    async fn a_peer_that_never_answers_gets_one_open_at_a_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let stream = Arc::new(PeerStream::new(RaftClient::new(ch)));
        let began = Instant::now();
        let (mut timed_out, mut given_back) = (0, 0);
        while began.elapsed() < STREAM_OPEN_TIMEOUT - Duration::from_secs(1) {
            match stream.call(req(b"x"), Duration::from_millis(50)).await {
                Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => timed_out += 1,
                // The queue of the opening stream is full: the call goes unary.
                Err(_) => {
                    given_back += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(other) => panic!("{:?}", other.map(|r| r.payload)),
            }
        }
        assert!(timed_out > 20, "{timed_out} calls timed out");
        assert_eq!(
            stream.opens.load(Ordering::Relaxed),
            1,
            "{timed_out} calls timed out, {given_back} given back"
        );
        // The open gives up; calls then go unary, with no new open for a while.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert!(matches!(*stream.state(), StreamState::Failed(_)));
        let back = stream.call(req(b"y"), Duration::from_millis(50)).await;
        assert_eq!(back.expect_err("given back to go unary").payload, b"y");
        assert_eq!(stream.opens.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn large_calls_go_unary() {
        let (echo, client) = serve(true).await;
        let stream = Arc::new(PeerStream::new(client.clone()));
        let big = vec![7u8; STREAM_MAX_BYTES + 1];
        let r: AppendResult = send(
            client,
            Some(stream),
            2,
            "c".into(),
            Rpc::AppendEntries,
            big,
            T,
        )
        .await;
        // Not a valid reply (the echo sends the bytes back), but it went unary.
        assert!(r.is_err());
        assert_eq!(echo.unary.load(Ordering::SeqCst), 1);
        assert_eq!(echo.opened.load(Ordering::SeqCst), 0);
    }
}
