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
//! interrupted resumes from there, incremental whenever the sides share a snapshot. The receiver
//! takes a push only from the dataset's current primary under the current epoch, only for a
//! dataset it should hold, and never onto the primary's own copy.

use std::sync::Arc;
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use flock_dataset::transfer::{receive_framed_async, send_framed_async};
use flock_dataset::{newest_common_snapshot, DatasetError, SnapshotName, StreamSpec};
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

/// What the sender will do: the receiver goes back to `base` (destroys its copy when `None`),
/// then receives `target` if set. Both `None`: the receiver already holds a newer snapshot of
/// the primary's history than the one pushed, and keeps everything as it is.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Plan {
    base: Option<String>,
    target: Option<String>,
}

impl Plan {
    fn is_nothing(&self) -> bool {
        self.base.is_none() && self.target.is_none()
    }
}

/// The sender's plan for one step, from what it holds and what the receiver holds: `chain` (the
/// recorded snapshots up to the push's target, oldest first), `later` (the guids of the
/// sender's own snapshots after the target) and `theirs`. The index in `chain` of the snapshot
/// to send, if any.
///
/// A receiver holding one of `later` is ahead of this push (a later push, such as a move's, got
/// there first): it is left alone. Going back to the newest common snapshot would throw away
/// snapshots of the primary's own history, and with them writes it acknowledged.
fn plan_step(
    chain: &[flock_dataset::SnapshotInfo],
    later: &[u64],
    theirs: &[flock_dataset::SnapshotInfo],
) -> (Plan, Option<usize>) {
    if theirs.iter().any(|t| later.contains(&t.guid)) {
        let nothing = Plan {
            base: None,
            target: None,
        };
        return (nothing, None);
    }
    let last = chain.last().expect("the chain ends with the target");
    let common = newest_common_snapshot(chain, theirs);
    let next = match common {
        None => Some(0),
        Some(c) if c.guid == last.guid => None,
        Some(c) => chain.iter().position(|s| s.guid == c.guid).map(|i| i + 1),
    };
    let plan = Plan {
        base: common.map(|c| c.name.to_string()),
        target: next.map(|i| chain[i].name.to_string()),
    };
    (plan, next)
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
/// with the same history as the sender. `progress` gets the phase (`"full"` or
/// `"incremental"`), the payload bytes sent in this push and the estimated total of the current
/// stream's end.
pub async fn push(
    conn: &quinn::Connection,
    datasets: &Datasets,
    ds: &Dataset,
    target: &str,
    to_name: &str,
    mut progress: impl FnMut(&'static str, u64, Option<u64>) + Send,
) -> Result<Pushed, PushError> {
    let name = backend_name(ds)?;
    let ours = {
        let name = name.clone();
        blocking(&datasets.backend, move |b| b.snapshots(&name)).await?
    };
    let Some(idx) = ours.iter().position(|s| s.name.as_str() == target) else {
        return Err(DatasetError::SnapshotNotFound {
            dataset: ds.name.clone(),
            snapshot: target.to_string(),
        }
        .into());
    };
    // The recorded snapshots up to the target: what the receiver should hold afterwards.
    let chain: Vec<_> = ours[..=idx]
        .iter()
        .filter(|s| {
            s.name.as_str() == target || ds.snapshots.iter().any(|r| r.name == s.name.as_str())
        })
        .cloned()
        .collect();
    let later: Vec<u64> = ours[idx + 1..].iter().map(|s| s.guid).collect();
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
            ds,
            &chain,
            &later,
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

/// Asks the receiver what it holds and sends it the next snapshot of `chain` after the newest
/// one both hold (or nothing when it holds the last one).
async fn push_step(
    conn: &quinn::Connection,
    datasets: &Datasets,
    ds: &Dataset,
    chain: &[flock_dataset::SnapshotInfo],
    later: &[u64],
    to_name: &str,
    mut progress: impl FnMut(&'static str, u64, Option<u64>) + Send,
) -> Result<Step, PushError> {
    let broke = |e: &dyn std::fmt::Display| PushError::Connection {
        node: to_name.to_string(),
        reason: e.to_string(),
    };
    let name = backend_name(ds)?;
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
    let theirs: Vec<flock_dataset::SnapshotInfo> = theirs
        .into_iter()
        .filter_map(|(n, guid)| {
            Some(flock_dataset::SnapshotInfo {
                name: SnapshotName::new(n).ok()?,
                guid,
                created_unix: 0,
            })
        })
        .collect();
    let last = chain.last().expect("the chain ends with the target");
    let (plan, next) = plan_step(chain, later, &theirs);
    let next = next.map(|i| &chain[i]);
    write_msg(&mut send, &plan).await.map_err(|e| broke(&e))?;
    let mut bytes = 0;
    if let Some(next) = next {
        let spec = match &plan.base {
            Some(base) => {
                StreamSpec::incremental(name, SnapshotName::new(base)?, next.name.clone())
            }
            None => StreamSpec::full(name, next.name.clone()),
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
    let outcome = tokio::time::timeout(Duration::from_secs(600), read_msg::<Outcome>(&mut recv))
        .await
        .map_err(|_| broke(&"no outcome within 600 s of the stream's end"))?
        .map_err(|e| broke(&e))?;
    match outcome {
        Outcome::Done { .. } => Ok(Step {
            base: plan.base,
            bytes,
            sent: next.is_some(),
            reached_target: next.is_some_and(|n| n.guid == last.guid),
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
    if let Err(reason) = admit(&view, datasets.node_id, peer, dataset, &name, epoch) {
        tracing::info!(peer, dataset = %name, %reason, "refused a push");
        return refuse(send, reason).await;
    }
    let _guard = datasets.lock(dataset).await;
    // The state may have moved on while this push waited for the lock (another push from the
    // same primary held it, and the move it carried has been committed since): admit it again,
    // or a push admitted under an old epoch could overwrite the copy of a new primary.
    let ds = match admit(&view, datasets.node_id, peer, dataset, &name, epoch) {
        Ok(ds) => ds,
        Err(reason) => {
            tracing::info!(peer, dataset = %name, %reason, "refused a push after waiting for the dataset");
            return refuse(send, reason).await;
        }
    };
    let outcome = match receive_locked(&ds, &mut send, recv, &datasets, cancel).await {
        Ok(Some(guid)) => {
            tracing::info!(peer, dataset = %name, guid, "received a snapshot");
            Outcome::Done { guid: Some(guid) }
        }
        Ok(None) => Outcome::Done { guid: None },
        Err(e) => {
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

/// Whether `peer` may push dataset `id` to this node now; the dataset if so.
fn admit(
    view: &StateView,
    me: NodeId,
    peer: NodeId,
    id: DatasetId,
    name: &str,
    epoch: u64,
) -> Result<Dataset, String> {
    let state = view.read();
    let Some(ds) = state.cluster.datasets.get(&id) else {
        return Err(format!(
            "this node does not know dataset {name} (id {id}): removed, or not caught up yet"
        ));
    };
    if ds.name != name {
        return Err(format!("dataset {id} is {:?}, not {name:?}", ds.name));
    }
    if ds.epoch != epoch || ds.primary != peer {
        return Err(format!(
            "dataset {name} is at epoch {} with primary node {} here; the push came from node {peer} under epoch {epoch} (retry once both agree)",
            ds.epoch, ds.primary
        ));
    }
    if ds.primary == me {
        return Err(format!("this node is the primary of {name}"));
    }
    if !ds.holders().contains(&me) {
        return Err(format!(
            "this node is neither a replica nor a move target of {name}"
        ));
    }
    Ok(ds.clone())
}

/// The receiver's side once admitted, holding the dataset's lock: `Some(guid)` when a snapshot
/// was received.
async fn receive_locked(
    ds: &Dataset,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    datasets: &Datasets,
    cancel: CancellationToken,
) -> Result<Option<u64>, DatasetError> {
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
    let plan: Plan = read_msg(&mut recv).await.map_err(stream_err)?;
    if plan.is_nothing() {
        return Ok(None);
    }
    // Go back to the base: the primary's history wins over anything only this copy has.
    {
        let name = name.clone();
        let base = plan.base.clone();
        let has_copy = !ours.is_empty();
        blocking(&datasets.backend, move |b| {
            match base {
                Some(base) => {
                    let base = SnapshotName::new(base)?;
                    let latest = b.latest_snapshot(&name)?;
                    if latest.map(|l| l.name) != Some(base.clone()) {
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
    let want = StreamSpec {
        dataset: name.clone(),
        base: plan.base.map(SnapshotName::new).transpose()?,
        target: SnapshotName::new(target)?,
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
    use super::*;
    use flock_dataset::SnapshotInfo;

    fn snaps(list: &[(&str, u64)]) -> Vec<SnapshotInfo> {
        list.iter()
            .map(|(n, g)| SnapshotInfo {
                name: SnapshotName::new(*n).expect("valid"),
                guid: *g,
                created_unix: 0,
            })
            .collect()
    }

    fn plan(base: Option<&str>, target: Option<&str>) -> Plan {
        Plan {
            base: base.map(str::to_string),
            target: target.map(str::to_string),
        }
    }

    #[test]
    fn sends_the_next_snapshot_after_the_newest_common_one() {
        let chain = snaps(&[("s1", 1), ("s2", 2), ("s3", 3)]);
        assert_eq!(
            plan_step(&chain, &[], &snaps(&[])),
            (plan(None, Some("s1")), Some(0))
        );
        assert_eq!(
            plan_step(&chain, &[], &snaps(&[("s1", 1)])),
            (plan(Some("s1"), Some("s2")), Some(1))
        );
        assert_eq!(
            plan_step(&chain, &[], &snaps(&[("s1", 1), ("s2", 2), ("s3", 3)])),
            (plan(Some("s3"), None), None)
        );
    }

    #[test]
    fn a_copy_that_diverged_goes_back_to_the_common_snapshot() {
        let chain = snaps(&[("s1", 1), ("s2", 2)]);
        // s2 with another guid, and x: a former primary's snapshots nobody recorded.
        let theirs = snaps(&[("s1", 1), ("s2", 9), ("x", 10)]);
        assert_eq!(
            plan_step(&chain, &[], &theirs),
            (plan(Some("s1"), Some("s2")), Some(1))
        );
    }

    #[test]
    fn a_receiver_ahead_of_the_push_is_left_alone() {
        // A replica push of s2 that waited while the move's push delivered m3: going back to s2
        // would drop m3 and the writes in it, on the node about to become the primary.
        let chain = snaps(&[("s1", 1), ("s2", 2)]);
        let theirs = snaps(&[("s1", 1), ("s2", 2), ("m3", 3)]);
        assert_eq!(plan_step(&chain, &[3], &theirs), (plan(None, None), None));
        assert!(plan(None, None).is_nothing());
        // Without the sender holding m3 it is a stray snapshot: back to s2.
        assert_eq!(
            plan_step(&chain, &[], &theirs),
            (plan(Some("s2"), None), None)
        );
    }
}
