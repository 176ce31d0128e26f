//! Pushing a dataset's snapshot from its primary to another node, on one QUIC stream.
//!
//! ```text
//! primary (sender)                          holder (receiver)
//!   Request::Push {dataset, name, epoch} ->
//!                                         <- Holding (its snapshots) | Refused (not a holder,
//!                                            epoch mismatch, ...)
//!   Plan {base, target}                  ->   rolls back to `base` (or destroys its copy when
//!                                            `base` is none), then, if `target` is set:
//!   framed stream base..target           ->   receives it; commits only a complete, verified
//!                                            stream (flock_dataset::transfer)
//!                                         <- Outcome::Done {guid} | Failed {reason, no_space}
//! ```
//!
//! The base is the newest snapshot both sides hold (same name and guid), so a push that was
//! interrupted resumes from there, incremental whenever the sides share a snapshot. The
//! decisions are flock-decide's ([`flock_decide::push`]): the sender plans every step from
//! what it lists and what the state records at that step; the receiver takes a push only from
//! the dataset's current primary under the current epoch, only for a dataset it should hold,
//! never onto the primary's own copy, and, checked again under the dataset's lock right before
//! it acts, never rolls its copy back past a snapshot recorded in Raft.

use std::sync::Arc;
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use flock_dataset::transfer::{receive_framed_async, send_framed_async};
use flock_dataset::{DatasetError, SnapshotInfo, SnapshotName, StreamSpec};
use flock_decide::push::{self as decide, HeldSnapshot, PlanError};
use flock_raft::codec::{decode, encode};
use flock_raft::state_machine::StateView;
use flock_scheduler::dataset::DatasetId;
use flock_scheduler::{Dataset, NodeId};

use crate::datasets::{backend_name, blocking, Datasets};

/// The largest control message, in bytes.
const MAX_MESSAGE: usize = 1 << 20;
/// How long a side waits for the other's control message.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// The first message on a stream.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Push {
        dataset: DatasetId,
        name: String,
        epoch: u64,
    },
}

/// What the receiver holds of the dataset.
#[derive(Debug, Serialize, Deserialize)]
enum Holding {
    /// Its snapshots, oldest first: (name, guid). Empty when it has no copy.
    Snapshots(Vec<(String, u64)>),
    Refused(String),
}

/// What the sender will do, on the wire ([`decide::Plan`], whose meaning it carries): the
/// receiver goes back to `base` (destroys its copy when `None`), then receives `target` if set.
/// Both `None`: the receiver keeps everything as it is.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Plan {
    base: Option<String>,
    target: Option<String>,
}

impl From<decide::Plan> for Plan {
    fn from(p: decide::Plan) -> Self {
        Plan {
            base: p.base,
            target: p.target,
        }
    }
}

impl From<Plan> for decide::Plan {
    fn from(p: Plan) -> Self {
        decide::Plan {
            base: p.base,
            target: p.target,
        }
    }
}

fn held(list: &[SnapshotInfo]) -> Vec<HeldSnapshot> {
    list.iter()
        .map(|s| HeldSnapshot::new(s.name.as_str(), s.guid))
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
    Done { guid: Option<u64> },
    Failed { reason: String, no_space: bool },
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("no space on {node}: {reason}")]
    NoSpace { node: String, reason: String },
    #[error("{node} refused the push: {reason}")]
    Refused { node: String, reason: String },
    #[error("{node} failed to receive: {reason}")]
    ReceiveFailed { node: String, reason: String },
    /// The step's plan would destroy a recorded snapshot on the receiver: not sent.
    #[error("not pushing to {node}: {reason}")]
    Unsafe { node: String, reason: String },
    #[error("the stream to {node} broke off: {reason}")]
    Connection { node: String, reason: String },
    #[error("{0}")]
    Local(#[from] DatasetError),
}

impl PushError {
    /// Whether trying again later can help (the peer or the network failed, not the data).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, PushError::NoSpace { .. })
    }
}

/// What a push did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// The snapshot the receiver started from (`None`: a full stream, or nothing sent).
    pub base: Option<String>,
    /// Payload bytes streamed (0 when the receiver already held the target).
    pub bytes: u64,
    /// Whether a stream was sent at all.
    pub sent: bool,
}

async fn write_msg<T: Serialize>(s: &mut quinn::SendStream, m: &T) -> std::io::Result<()> {
    let body = encode(m);
    s.write_all(&(body.len() as u32).to_be_bytes()).await?;
    s.write_all(&body).await?;
    Ok(())
}

async fn read_msg<T: DeserializeOwned>(s: &mut quinn::RecvStream) -> std::io::Result<T> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let read = async {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)
            .await
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_MESSAGE {
            return Err(bad(format!("control message of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body)
            .await
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e))?;
        decode(&body).map_err(|e| bad(e.to_string()))
    };
    tokio::time::timeout(CONTROL_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 60 s"))?
}

/// Pushes snapshot `target` of `ds` to the node `to_name` over `conn`, with every recorded
/// snapshot before it that the receiver lacks, one stream per snapshot: the receiver ends up
/// with the same history as the sender. Each step plans from what this node lists then and what
/// `view` (this node's applied state) records then, together with the records in `ds` (the
/// caller's, who may have just recorded `target`): never from a list taken when the push began.
/// `progress` gets the phase (`"full"` or `"incremental"`), the payload bytes sent in this push
/// and the estimated total of the current stream's end.
pub async fn push(
    conn: &quinn::Connection,
    datasets: &Datasets,
    view: &StateView,
    ds: &Dataset,
    target: &str,
    to_name: &str,
    mut progress: impl FnMut(&'static str, u64, Option<u64>) + Send,
) -> Result<Pushed, PushError> {
    let mut total = Pushed {
        base: None,
        bytes: 0,
        sent: false,
    };
    let mut first = true;
    loop {
        let done_before = total.bytes;
        let step = push_step(
            conn,
            datasets,
            view,
            ds,
            target,
            to_name,
            |phase, n, est| progress(phase, done_before + n, est.map(|e| done_before + e)),
        )
        .await?;
        if first {
            total.base = step.base.clone();
            first = false;
        }
        total.bytes += step.bytes;
        total.sent |= step.sent;
        if !step.sent || step.reached_target {
            return Ok(total);
        }
    }
}

/// One step of [`push`].
struct Step {
    base: Option<String>,
    bytes: u64,
    sent: bool,
    reached_target: bool,
}

/// Asks the receiver what it holds and sends it the next recorded snapshot up to `target` after
/// the newest one both hold (or nothing when it holds `target`, or is ahead of it).
async fn push_step(
    conn: &quinn::Connection,
    datasets: &Datasets,
    view: &StateView,
    ds: &Dataset,
    target: &str,
    to_name: &str,
    mut progress: impl FnMut(&'static str, u64, Option<u64>) + Send,
) -> Result<Step, PushError> {
    let broke = |e: &dyn std::fmt::Display| PushError::Connection {
        node: to_name.to_string(),
        reason: e.to_string(),
    };
    let name = backend_name(ds)?;
    tracing::debug!(dataset = %ds.name, to = to_name, target, "push step: asking what the receiver holds");
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| broke(&e))?;
    write_msg(
        &mut send,
        &Request::Push {
            dataset: ds.id,
            name: ds.name.clone(),
            epoch: ds.epoch,
        },
    )
    .await
    .map_err(|e| broke(&e))?;
    let theirs = match read_msg::<Holding>(&mut recv)
        .await
        .map_err(|e| broke(&e))?
    {
        Holding::Snapshots(s) => s,
        Holding::Refused(reason) => {
            return Err(PushError::Refused {
                node: to_name.to_string(),
                reason,
            })
        }
    };
    let theirs: Vec<HeldSnapshot> = theirs
        .into_iter()
        .map(|(n, guid)| HeldSnapshot::new(n, guid))
        .collect();
    // What this node holds and the state records now, after the receiver answered: a push
    // (a move's) may have landed a newer snapshot there since the last step.
    let ours = {
        let name = name.clone();
        blocking(&datasets.backend, move |b| b.snapshots(&name)).await?
    };
    let record = {
        let state = view.read();
        decide::step_record(state.cluster.datasets.get(&ds.id), ds)
    };
    let plan = match decide::plan_step(&record, &held(&ours), target, &theirs) {
        Ok(plan) => plan,
        Err(e) => {
            // The receiver keeps everything as it is; this push ends here.
            let _ = write_msg(&mut send, &Plan::from(decide::Plan::NOTHING)).await;
            let _ = send.finish();
            return Err(match e {
                PlanError::TargetMissing { .. } => DatasetError::SnapshotNotFound {
                    dataset: ds.name.clone(),
                    snapshot: target.to_string(),
                }
                .into(),
                PlanError::Unsafe(e) => PushError::Unsafe {
                    node: to_name.to_string(),
                    reason: e.to_string(),
                },
            });
        }
    };
    let next = match &plan.target {
        Some(t) => Some(SnapshotName::new(t.clone())?),
        None => None,
    };
    let plan = Plan::from(plan);
    tracing::debug!(dataset = %ds.name, to = to_name, base = ?plan.base, target = ?plan.target, "push step: plan");
    write_msg(&mut send, &plan).await.map_err(|e| broke(&e))?;
    let mut bytes = 0;
    if let Some(next) = &next {
        // A receiver that speaks flock-stream/2 reads changed files as their changed ranges.
        let deltas = flock_transport::quic::protocol_version(conn) >= 2;
        let spec = match &plan.base {
            Some(base) => StreamSpec::incremental(name, SnapshotName::new(base)?, next.clone())
                .with_deltas(deltas),
            None => StreamSpec::full(name, next.clone()),
        };
        let phase = if plan.base.is_some() {
            "incremental"
        } else {
            "full"
        };
        let mut wire = FlipFailpoint::new(&mut send);
        let sent = send_framed_async(datasets.backend.clone(), spec, &mut wire, |n, total| {
            progress(phase, n, total)
        })
        .await;
        match sent {
            Ok(s) => bytes = s.totals.payload_bytes,
            Err(e) => {
                // A receiver that gave up (no space, a bad stream) stops reading and says why:
                // its reason beats the broken pipe this side saw.
                let said =
                    tokio::time::timeout(Duration::from_secs(10), read_msg::<Outcome>(&mut recv))
                        .await;
                if let Ok(Ok(failed @ Outcome::Failed { .. })) = said {
                    return Err(failure(failed, to_name));
                }
                return Err(match e {
                    DatasetError::SendFailed { source, .. }
                        if source.kind() != std::io::ErrorKind::Other =>
                    {
                        broke(&source)
                    }
                    e => e.into(),
                });
            }
        }
    }
    let _ = send.finish();
    tracing::debug!(dataset = %ds.name, to = to_name, bytes, "push step: stream sent, waiting for the outcome");
    let outcome = tokio::time::timeout(Duration::from_secs(600), read_msg::<Outcome>(&mut recv))
        .await
        .map_err(|_| broke(&"no outcome within 600 s of the stream's end"))?
        .map_err(|e| broke(&e))?;
    tracing::debug!(dataset = %ds.name, to = to_name, ?outcome, "push step: outcome");
    match outcome {
        Outcome::Done { .. } => Ok(Step {
            base: plan.base,
            bytes,
            sent: next.is_some(),
            reached_target: next.is_some_and(|n| n.as_str() == target),
        }),
        failed => Err(failure(failed, to_name)),
    }
}

fn failure(outcome: Outcome, to_name: &str) -> PushError {
    match outcome {
        Outcome::Failed {
            reason,
            no_space: true,
        } => PushError::NoSpace {
            node: to_name.to_string(),
            reason,
        },
        Outcome::Failed { reason, .. } => PushError::ReceiveFailed {
            node: to_name.to_string(),
            reason,
        },
        Outcome::Done { .. } => PushError::ReceiveFailed {
            node: to_name.to_string(),
            reason: "it reported success for a stream that did not reach it".into(),
        },
    }
}

/// Serves one stream a peer opened: receives a push, if `peer` may make it.
pub async fn receive(
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    datasets: Arc<Datasets>,
    view: StateView,
    cancel: CancellationToken,
) {
    let request = match read_msg::<Request>(&mut recv).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(peer, error = %e, "unreadable stream request");
            return;
        }
    };
    let Request::Push {
        dataset,
        name,
        epoch,
    } = request;
    let push = Admitted {
        me: datasets.node_id,
        peer,
        id: dataset,
        name: &name,
        epoch,
    };
    if let Err(reason) = push.admit(&view) {
        tracing::info!(peer, dataset = %name, %reason, "refused a push");
        return refuse(send, reason).await;
    }
    tracing::debug!(peer, dataset = %name, "push request admitted, taking the dataset's lock");
    let _guard = datasets.lock(dataset).await;
    // The state may have moved on while this push waited for the lock (another push from the
    // same primary held it, and the move it carried has been committed since): admit it again,
    // or a push admitted under an old epoch could overwrite the copy of a new primary.
    let ds = match push.admit(&view) {
        Ok(ds) => ds,
        Err(reason) => {
            tracing::info!(peer, dataset = %name, %reason, "refused a push after waiting for the dataset");
            return refuse(send, reason).await;
        }
    };
    let outcome = match receive_locked(&ds, &push, &view, &mut send, recv, &datasets, cancel).await
    {
        Ok(Some(guid)) => {
            tracing::info!(peer, dataset = %name, guid, "received a snapshot");
            Outcome::Done { guid: Some(guid) }
        }
        Ok(None) => Outcome::Done { guid: None },
        Err(ReceiveError::Refused(reason)) => {
            tracing::warn!(peer, dataset = %name, %reason, "refused a push's plan");
            Outcome::Failed {
                no_space: false,
                reason,
            }
        }
        Err(ReceiveError::Dataset(e)) => {
            tracing::warn!(peer, dataset = %name, error = %e, "receive failed");
            Outcome::Failed {
                no_space: e.is_no_space(),
                reason: e.to_string(),
            }
        }
    };
    let _ = write_msg(&mut send, &outcome).await;
    let _ = send.finish();
    // Let the outcome reach the sender before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
}

async fn refuse(mut send: quinn::SendStream, reason: String) {
    let _ = write_msg(&mut send, &Holding::Refused(reason)).await;
    let _ = send.finish();
}

/// A push as its request names it, on the receiving node `me`.
struct Admitted<'a> {
    me: NodeId,
    peer: NodeId,
    id: DatasetId,
    name: &'a str,
    epoch: u64,
}

impl Admitted<'_> {
    /// Whether the push may go on in the latest applied state: the dataset's record if so.
    fn admit(&self, view: &StateView) -> Result<Dataset, String> {
        let state = view.read();
        decide::admit(
            &state.cluster,
            self.me,
            self.peer,
            self.id,
            self.name,
            self.epoch,
        )
        .cloned()
        .map_err(|e| e.to_string())
    }

    /// Whether this copy, holding `held`, may carry `plan` out now: the push is still admitted
    /// and the plan rolls back no snapshot the latest applied state records.
    fn check_plan(
        &self,
        view: &StateView,
        held: &[HeldSnapshot],
        plan: &decide::Plan,
    ) -> Result<(), String> {
        let state = view.read();
        let ds = decide::admit(
            &state.cluster,
            self.me,
            self.peer,
            self.id,
            self.name,
            self.epoch,
        )
        .map_err(|e| e.to_string())?;
        decide::guard_rollback(ds, held, plan).map_err(|e| e.to_string())
    }
}

/// Why the receiver did not take a stream it was admitted for.
#[derive(Debug, thiserror::Error)]
enum ReceiveError {
    /// The plan, checked right before acting, is not one this copy may carry out.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

/// The receiver's side once admitted, holding the dataset's lock: `Some(guid)` when a snapshot
/// was received.
async fn receive_locked(
    ds: &Dataset,
    push: &Admitted<'_>,
    view: &StateView,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    datasets: &Datasets,
    cancel: CancellationToken,
) -> Result<Option<u64>, ReceiveError> {
    let name = backend_name(ds)?;
    let ours = {
        let name = name.clone();
        blocking(&datasets.backend, move |b| match b.info(&name)? {
            Some(_) => b.snapshots(&name),
            None => Ok(Vec::new()),
        })
        .await?
    };
    let holding = Holding::Snapshots(ours.iter().map(|s| (s.name.to_string(), s.guid)).collect());
    let stream_err = |e: std::io::Error| DatasetError::Stream {
        dataset: name.to_string(),
        source: flock_dataset::StreamError::from_io(e, 0),
    };
    write_msg(send, &holding).await.map_err(stream_err)?;
    let plan: decide::Plan = read_msg::<Plan>(&mut recv)
        .await
        .map_err(stream_err)?
        .into();
    tracing::debug!(peer = push.peer, dataset = %name, base = ?plan.base, target = ?plan.target, "push plan received");
    if plan.is_nothing() {
        return Ok(None);
    }
    // Right before acting, under the dataset's lock: the sender planned from what it knew; the
    // state here may record more by now (a move's snapshot this copy holds). A plan from a
    // sender of the previous build, which fixed its list at the push's start, is checked too.
    push.check_plan(view, &held(&ours), &plan)
        .map_err(ReceiveError::Refused)?;
    // Go back to the base: the primary's history wins over anything only this copy has that
    // nobody recorded.
    {
        let name = name.clone();
        let base = plan.base.clone();
        let has_copy = !ours.is_empty();
        let latest = ours.last().map(|s| s.name.clone());
        blocking(&datasets.backend, move |b| {
            match base {
                Some(base) => {
                    // `ours` was listed under the dataset's lock, which this receive still
                    // holds: its last entry is the copy's latest snapshot (no second listing:
                    // on zfs each is a `zfs list`).
                    let base = SnapshotName::new(base)?;
                    if latest != Some(base.clone()) {
                        b.rollback(&name, &base)?;
                    }
                }
                None if has_copy || b.info(&name)?.is_some() => b.destroy(&name)?,
                None => {}
            }
            Ok(())
        })
        .await?;
    }
    let Some(target) = plan.target else {
        return Ok(None);
    };
    tracing::debug!(peer = push.peer, dataset = %name, "at the plan's base, receiving the stream");
    let want = StreamSpec {
        dataset: name.clone(),
        base: plan.base.map(SnapshotName::new).transpose()?,
        target: SnapshotName::new(target)?,
        deltas: false,
    };
    let received = receive_framed_async(
        datasets.backend.clone(),
        recv,
        move |header| {
            if header.spec != want {
                return Err(DatasetError::Stream {
                    dataset: want.dataset.to_string(),
                    source: flock_dataset::StreamError::Corrupt {
                        offset: 0,
                        detail: format!(
                            "the stream carries {:?}, not the planned {:?}",
                            header.spec, want
                        ),
                    },
                });
            }
            Ok(())
        },
        cancel,
    )
    .await?;
    Ok(Some(received.snapshot.guid))
}

/// The environment variable of a fault-injection point for tests: when it holds a number N, the
/// sender flips the bits of the stream's byte at offset N on its way out (after framing), as a
/// bad link or memory would. The receiver must reject the stream.
pub const FLIP_BYTE_FAILPOINT: &str = "FLOCK_FAILPOINT_FLIP_STREAM_BYTE";

/// The writer of [`FLIP_BYTE_FAILPOINT`]; passes bytes through untouched when it is not set.
struct FlipFailpoint<'a, W> {
    inner: &'a mut W,
    flip_at: Option<u64>,
    written: u64,
}

impl<'a, W> FlipFailpoint<'a, W> {
    fn new(inner: &'a mut W) -> Self {
        let flip_at = std::env::var(FLIP_BYTE_FAILPOINT)
            .ok()
            .and_then(|v| v.parse().ok());
        FlipFailpoint {
            inner,
            flip_at,
            written: 0,
        }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FlipFailpoint<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let poll = match this.flip_at {
            Some(at) if at >= this.written && at < this.written + buf.len() as u64 => {
                let mut bad = buf.to_vec();
                bad[(at - this.written) as usize] ^= 0xff;
                std::pin::Pin::new(&mut *this.inner).poll_write(cx, &bad)
            }
            _ => std::pin::Pin::new(&mut *this.inner).poll_write(cx, buf),
        };
        if let std::task::Poll::Ready(Ok(n)) = poll {
            this.written += n as u64;
        }
        poll
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! Pushes between two real dir-backend copies over real QUIC, each side with a state view
    //! of its own (a real Raft store whose state is installed as a snapshot).

    use std::collections::BTreeSet;
    use std::io::Cursor;
    use std::path::PathBuf;

    use openraft::storage::RaftStateMachine;

    use flock_dataset::{Backend, DirBackend};
    use flock_raft::state_machine::{encode_cluster, StateMachine};
    use flock_raft::types::{SnapshotMeta, StoredMembership};
    use flock_scheduler::{ClusterState, SnapshotRecord};

    use super::*;
    use crate::pki::{new_key_and_csr, CertAuthority, NodeTls, Role};
    use crate::transfer::quic::QuicTuning;

    const PRIMARY: NodeId = 1;
    const REPLICA: NodeId = 2;

    /// One node: its dir backend and its applied state.
    struct Side {
        datasets: Arc<Datasets>,
        sm: StateMachine,
        _dir: tempfile::TempDir,
    }

    impl Side {
        fn new(id: NodeId) -> Side {
            let dir = tempfile::tempdir().expect("tempdir");
            let backend = DirBackend::open(dir.path().join("datasets")).expect("dir backend");
            let store = flock_raft::Store::open(&dir.path().join("raft.redb")).expect("store");
            let (_, sm, _, _) = store.into_parts();
            Side {
                datasets: Arc::new(Datasets::new(Arc::new(backend), id)),
                sm,
                _dir: dir,
            }
        }

        fn view(&self) -> StateView {
            self.sm.view()
        }

        /// Makes `ds` (alone) this node's applied state.
        async fn apply(&mut self, ds: &Dataset) {
            let mut state = ClusterState::default();
            state.datasets.insert(ds.id, ds.clone());
            let meta = SnapshotMeta {
                last_log_id: None,
                last_membership: StoredMembership::default(),
                snapshot_id: format!("test-{}", ds.snapshots.len()),
            };
            self.sm
                .install_snapshot(&meta, Box::new(Cursor::new(encode_cluster(&state))))
                .await
                .expect("install the state");
        }

        fn backend(&self) -> &dyn Backend {
            &*self.datasets.backend
        }

        fn live(&self, ds: &Dataset) -> PathBuf {
            self.backend()
                .mount_path(&backend_name(ds).expect("name"))
                .expect("mount path")
        }

        fn snapshots(&self, ds: &Dataset) -> Vec<(String, u64)> {
            let name = backend_name(ds).expect("name");
            match self.backend().info(&name).expect("info") {
                None => Vec::new(),
                Some(_) => self
                    .backend()
                    .snapshots(&name)
                    .expect("snapshots")
                    .into_iter()
                    .map(|s| (s.name.to_string(), s.guid))
                    .collect(),
            }
        }

        /// Writes `data` into the live copy and takes snapshot `snap`; its record.
        fn write_and_snapshot(&self, ds: &Dataset, data: &str, snap: &str) -> SnapshotRecord {
            std::fs::write(self.live(ds).join("data"), data).expect("write");
            let info = self
                .backend()
                .snapshot(
                    &backend_name(ds).expect("name"),
                    &SnapshotName::new(snap).expect("snapshot name"),
                )
                .expect("snapshot");
            SnapshotRecord {
                name: snap.to_string(),
                guid: info.guid,
                created_unix: info.created_unix,
                epoch: ds.epoch,
            }
        }

        fn data(&self, ds: &Dataset) -> String {
            std::fs::read_to_string(self.live(ds).join("data")).expect("read")
        }
    }

    /// A QUIC connection from the primary to the replica, whose endpoint serves pushes with
    /// [`receive`] as flockd does.
    async fn serve_replica(replica: &Side) -> (quinn::Connection, quinn::Endpoint) {
        let (ca, _) = CertAuthority::create("push-test").expect("ca");
        let tls = |id| {
            let (key_pem, csr) = new_key_and_csr().expect("key");
            NodeTls {
                ca_pem: ca.cert_pem.clone(),
                cert_pem: ca.sign_csr(&csr, &Role::Node(id)).expect("cert"),
                key_pem,
            }
        };
        let loopback = "127.0.0.1:0".parse().expect("addr");
        let tuning = QuicTuning::default();
        let server = tuning
            .open(loopback, &tls(REPLICA), true)
            .expect("server")
            .endpoint;
        let client = tuning
            .open(loopback, &tls(PRIMARY), false)
            .expect("client")
            .endpoint;
        let addr = server.local_addr().expect("addr");
        let datasets = replica.datasets.clone();
        let view = replica.view();
        tokio::spawn(async move {
            let Some(incoming) = server.accept().await else {
                return;
            };
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(receive(
                    PRIMARY,
                    send,
                    recv,
                    datasets.clone(),
                    view.clone(),
                    CancellationToken::new(),
                ));
            }
        });
        let conn = client
            .connect(addr, crate::pki::SERVER_NAME)
            .expect("connect")
            .await
            .expect("handshake");
        (conn, client)
    }

    fn dataset() -> Dataset {
        Dataset {
            id: 1,
            name: "db".into(),
            size_limit: None,
            primary: PRIMARY,
            epoch: 1,
            replicas: BTreeSet::from([REPLICA]),
            snapshots: Vec::new(),
            moving: None,
            retention: None,
            bases: Default::default(),
            hold: None,
        }
    }

    /// Primary and replica both hold s1, s2 and the move's m3, all recorded on both sides.
    async fn replica_with_the_moves_snapshot() -> (Side, Side, Dataset, quinn::Connection) {
        let (mut primary, mut replica) = (Side::new(PRIMARY), Side::new(REPLICA));
        let mut ds = dataset();
        primary
            .backend()
            .create(&backend_name(&ds).expect("name"), None)
            .expect("create");
        for (data, snap) in [("one", "s1"), ("two", "s2")] {
            let r = primary.write_and_snapshot(&ds, data, snap);
            ds.snapshots.push(r);
        }
        primary.apply(&ds).await;
        replica.apply(&ds).await;
        let (conn, _client) = serve_replica(&replica).await;
        let view = primary.view();
        let pushed = push(
            &conn,
            &primary.datasets,
            &view,
            &ds,
            "s2",
            "n2",
            |_, _, _| {},
        )
        .await
        .expect("the replica push");
        assert!(pushed.sent);
        assert_eq!(replica.snapshots(&ds), primary.snapshots(&ds));
        // The move's round: a snapshot recorded, then pushed (as the agent does).
        ds.moving = Some(flock_scheduler::DatasetMove {
            to: REPLICA,
            handoff: false,
        });
        let m3 = primary.write_and_snapshot(&ds, "three", "m3");
        ds.snapshots.push(m3);
        primary.apply(&ds).await;
        replica.apply(&ds).await;
        push(
            &conn,
            &primary.datasets,
            &view,
            &ds,
            "m3",
            "n2",
            |_, _, _| {},
        )
        .await
        .expect("the move's push");
        assert_eq!(replica.data(&ds), "three");
        (primary, replica, ds, conn)
    }

    /// Issue 15: a replica push of s2 that goes on after a move's push landed m3 on the same
    /// node leaves m3 there (the step plans from what the primary lists now).
    #[tokio::test]
    async fn a_replica_push_after_the_moves_push_keeps_the_moves_snapshot() {
        let (primary, replica, ds, conn) = replica_with_the_moves_snapshot().await;
        let before = replica.snapshots(&ds);
        let pushed = push(
            &conn,
            &primary.datasets,
            &primary.view(),
            &ds,
            "s2",
            "n2",
            |_, _, _| {},
        )
        .await
        .expect("the replica push's next step");
        assert!(!pushed.sent, "{pushed:?}");
        assert_eq!(replica.snapshots(&ds), before);
        assert_eq!(replica.data(&ds), "three");
    }

    /// The sender whose own list lacks a snapshot the receiver holds and the state records (the
    /// primary lost m3 here) does not plan the rollback: the push fails, the replica keeps m3.
    #[tokio::test]
    async fn a_sender_lacking_a_recorded_snapshot_does_not_roll_the_receiver_back() {
        let (primary, replica, ds, conn) = replica_with_the_moves_snapshot().await;
        primary
            .backend()
            .rollback(
                &backend_name(&ds).expect("name"),
                &SnapshotName::new("s2").expect("name"),
            )
            .expect("rollback");
        let before = replica.snapshots(&ds);
        let err = push(
            &conn,
            &primary.datasets,
            &primary.view(),
            &ds,
            "s2",
            "n2",
            |_, _, _| {},
        )
        .await
        .expect_err("a push that would destroy m3 on n2");
        assert!(matches!(err, PushError::Unsafe { .. }), "{err}");
        assert!(err.to_string().contains("m3"), "{err}");
        assert!(err.is_retryable());
        assert_eq!(replica.snapshots(&ds), before);
        assert_eq!(replica.data(&ds), "three");
    }

    /// What the previous build's replica push sent there (its list fixed before m3 existed):
    /// go back to s2. The receiver checks the plan against its state right before acting.
    async fn old_senders_rollback_to_s2(conn: &quinn::Connection, ds: &Dataset) -> Outcome {
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let request = Request::Push {
            dataset: ds.id,
            name: ds.name.clone(),
            epoch: ds.epoch,
        };
        write_msg(&mut send, &request).await.expect("request");
        let holding: Holding = read_msg(&mut recv).await.expect("holding");
        assert!(matches!(holding, Holding::Snapshots(_)), "{holding:?}");
        let plan = Plan {
            base: Some("s2".into()),
            target: None,
        };
        write_msg(&mut send, &plan).await.expect("plan");
        let _ = send.finish();
        read_msg(&mut recv).await.expect("outcome")
    }

    #[tokio::test]
    async fn the_receiver_refuses_a_plan_that_destroys_a_recorded_snapshot() {
        let (_primary, replica, ds, conn) = replica_with_the_moves_snapshot().await;
        let before = replica.snapshots(&ds);
        match old_senders_rollback_to_s2(&conn, &ds).await {
            Outcome::Failed {
                reason,
                no_space: false,
            } => assert!(
                reason.contains("m3") && reason.contains("recorded"),
                "{reason}"
            ),
            other => panic!("the rollback past m3 was taken: {other:?}"),
        }
        assert_eq!(replica.snapshots(&ds), before);
        assert_eq!(replica.data(&ds), "three");
    }

    /// The same plan when nobody recorded m3 (a former primary's divergent snapshot): the copy
    /// goes back to s2, as a replica drops data outside the recorded history.
    #[tokio::test]
    async fn the_receiver_drops_snapshots_nobody_recorded() {
        let (_primary, mut replica, mut ds, conn) = replica_with_the_moves_snapshot().await;
        ds.snapshots.retain(|s| s.name != "m3");
        replica.apply(&ds).await;
        match old_senders_rollback_to_s2(&conn, &ds).await {
            Outcome::Done { guid: None } => {}
            other => panic!("{other:?}"),
        }
        let names: Vec<String> = replica.snapshots(&ds).into_iter().map(|s| s.0).collect();
        assert_eq!(names, ["s1", "s2"]);
        assert_eq!(replica.data(&ds), "two");
    }
}
