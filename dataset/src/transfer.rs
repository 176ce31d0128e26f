//! Sending a snapshot from a backend into a byte pipe and receiving one from it, framed and
//! verified ([`crate::frame`]): blocking functions, and async ones for the QUIC transfer.
//!
//! The async functions run the blocking backend on `spawn_blocking` and hand 256 KiB chunks
//! across a small bounded channel (send) or bridge the async reader into a blocking one
//! (receive), so the async side never blocks and memory stays bounded. Dropping the future of
//! a send stops the producer (and kills `zfs send`); a receive whose input breaks off rejects
//! the stream and leaves the dataset at its last good snapshot.

use std::io::{self, BufRead, BufReader, Write};
use std::sync::Arc;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::backend::{Backend, SnapshotInfo, StreamSpec};
use crate::error::{DatasetError, StreamError};
use crate::frame::{
    read_full, write_framed, Encoder, FramedReader, FramedWriteError, StreamHeader, StreamTotals,
    DEFAULT_FRAME_LEN,
};

/// A stream that was sent completely.
#[derive(Clone, Debug)]
pub struct Sent {
    /// The header that went first.
    pub header: StreamHeader,
    /// Payload, frames and wire bytes.
    pub totals: StreamTotals,
}

/// A stream that was received, verified and committed.
#[derive(Clone, Debug)]
pub struct Received {
    /// The stream's header.
    pub header: StreamHeader,
    /// The snapshot now on the receiver.
    pub snapshot: SnapshotInfo,
    /// Bytes read, framing included.
    pub wire_bytes: u64,
}

/// Opens `spec` on `backend` and builds the header that describes it.
fn open_send(
    backend: &dyn Backend,
    spec: &StreamSpec,
) -> Result<(StreamHeader, crate::backend::SendStream), DatasetError> {
    let info = backend
        .info(&spec.dataset)?
        .ok_or_else(|| DatasetError::NotFound {
            dataset: spec.dataset.to_string(),
        })?;
    let stream = backend.send(spec)?;
    let header = StreamHeader {
        kind: backend.kind(),
        spec: spec.clone(),
        limit: info.limit,
        size_hint: stream.size_hint(),
    };
    Ok((header, stream))
}

fn send_failed(spec: &StreamSpec, source: io::Error) -> DatasetError {
    DatasetError::SendFailed {
        dataset: spec.dataset.to_string(),
        source,
    }
}

/// Sends `spec` from `backend` into `dst`, framed. `progress` gets the payload bytes sent so far.
pub fn send_framed(
    backend: &dyn Backend,
    spec: &StreamSpec,
    dst: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<Sent, DatasetError> {
    let (header, mut stream) = open_send(backend, spec)?;
    let totals = write_framed(&header, &mut stream, dst, DEFAULT_FRAME_LEN, progress).map_err(
        |e| match e {
            FramedWriteError::Source(e) | FramedWriteError::Write(e) => send_failed(spec, e),
        },
    )?;
    Ok(Sent { header, totals })
}

/// Receives one framed stream from `src` into `backend`.
///
/// `check` sees the verified header before anything is written (reject a dataset or snapshot
/// the caller did not ask for). A full stream creates the dataset with the header's size limit.
/// Nothing after the trailer is read from `src`.
pub fn receive_framed(
    backend: &dyn Backend,
    src: &mut dyn BufRead,
    check: &mut dyn FnMut(&StreamHeader) -> Result<(), DatasetError>,
) -> Result<Received, DatasetError> {
    let mut reader = FramedReader::new(src).map_err(|source| DatasetError::Stream {
        dataset: "(unknown: unreadable header)".into(),
        source,
    })?;
    let header = reader.header().clone();
    if header.kind != backend.kind() {
        return Err(DatasetError::KindMismatch {
            dataset: header.spec.dataset.to_string(),
            stream: header.kind,
            backend: backend.kind(),
        });
    }
    check(&header)?;
    let snapshot = backend.receive(&header.spec, header.limit, &mut reader)?;
    if !reader.is_complete() {
        // Backends read their input to the end before committing; this would be a bug.
        return Err(DatasetError::Stream {
            dataset: header.spec.dataset.to_string(),
            source: StreamError::Corrupt {
                offset: reader.wire_offset(),
                detail: "the backend stopped reading before the stream's trailer".into(),
            },
        });
    }
    Ok(Received {
        header,
        snapshot,
        wire_bytes: reader.wire_offset(),
    })
}

fn joined<T>(
    r: Result<Result<T, DatasetError>, tokio::task::JoinError>,
) -> Result<T, DatasetError> {
    match r {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(DatasetError::Cancelled),
    }
}

/// [`send_framed`] for async writers (a QUIC send stream): the backend runs on
/// `spawn_blocking`, chunks cross a bounded channel. `progress` gets the payload bytes sent so
/// far and the stream's size hint (see [`crate::SendStream::size_hint`]).
pub async fn send_framed_async<W>(
    backend: Arc<dyn Backend>,
    spec: StreamSpec,
    dst: &mut W,
    mut progress: impl FnMut(u64, Option<u64>) + Send,
) -> Result<Sent, DatasetError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Vec<u8>>>(4);
    let opened = {
        let spec = spec.clone();
        let backend = backend.clone();
        tokio::task::spawn_blocking(move || open_send(&*backend, &spec))
    };
    let (header, mut stream) = joined(opened.await)?;
    let size_hint = header.size_hint;
    progress(0, size_hint);
    // Dropped with the future: the producer then sees a closed channel and stops.
    let _producer = tokio::task::spawn_blocking(move || loop {
        let mut buf = vec![0u8; DEFAULT_FRAME_LEN];
        match read_full(&mut stream, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                buf.truncate(n);
                if tx.blocking_send(Ok(buf)).is_err() {
                    break;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                break;
            }
        }
    });
    let (mut enc, head) = Encoder::new(&header);
    let fail = |e| send_failed(&spec, e);
    dst.write_all(&head).await.map_err(fail)?;
    while let Some(item) = rx.recv().await {
        match item {
            Ok(chunk) => {
                let prefix = enc.frame_prefix(&chunk);
                dst.write_all(&prefix).await.map_err(fail)?;
                dst.write_all(&chunk).await.map_err(fail)?;
                progress(enc.totals().payload_bytes, size_hint);
            }
            Err(e) => {
                let _ = dst.write_all(&enc.abort(&e.to_string())).await;
                let _ = dst.flush().await;
                return Err(fail(e));
            }
        }
    }
    let (trailer, totals) = enc.trailer();
    dst.write_all(&trailer).await.map_err(fail)?;
    dst.flush().await.map_err(fail)?;
    Ok(Sent { header, totals })
}

/// [`receive_framed`] for async readers (a QUIC receive stream), on `spawn_blocking`.
///
/// Cancelling `cancel` (node shutdown, an operator's abort, a stalled peer) makes the next read
/// fail: the receive is rejected, the dataset stays at its last good snapshot, and this future
/// resolves once the backend has cleaned up. Dropping the future cancels too, but then nothing
/// waits for the clean-up.
pub async fn receive_framed_async<R>(
    backend: Arc<dyn Backend>,
    src: R,
    mut check: impl FnMut(&StreamHeader) -> Result<(), DatasetError> + Send + 'static,
    cancel: CancellationToken,
) -> Result<Received, DatasetError>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let _cancel_on_drop = cancel.clone().drop_guard();
    let src = Cancellable {
        inner: src,
        cancelled: Box::pin(cancel.cancelled_owned()),
    };
    let bridge = tokio_util::io::SyncIoBridge::new(src);
    joined(
        tokio::task::spawn_blocking(move || {
            let mut reader = BufReader::with_capacity(DEFAULT_FRAME_LEN + 64, bridge);
            receive_framed(&*backend, &mut reader, &mut check)
        })
        .await,
    )
}

/// An async reader that fails once its token is cancelled, even while waiting for data.
struct Cancellable<R> {
    inner: R,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Cancellable<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the receive was cancelled",
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}
