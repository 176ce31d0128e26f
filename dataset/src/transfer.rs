//! Sending a snapshot from a backend into a byte pipe and receiving one from it, framed and
//! verified ([`crate::frame`]): blocking functions, and async ones for the QUIC transfer.
//!
//! The async functions run the blocking backend on `spawn_blocking` and hand complete 256 KiB
//! frames (framed and checksummed there) across a small bounded channel (send), or bridge the
//! async reader into a blocking one that verifies the stream and hands the verified payload to
//! the backend on a thread of its own (receive), so the async side never blocks, checksums and
//! backend IO overlap with the transport, and memory stays bounded. Dropping the future of a
//! send stops the producer (and kills `zfs send`); a receive whose input breaks off rejects the
//! stream and leaves the dataset at its last good snapshot.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::Arc;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::backend::{Backend, BackendKind, SnapshotInfo, StreamSpec};
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

/// Opens a framed stream: its verified header, refused when it is of another backend kind than
/// `kind` or when `check` refuses it (before anything is written).
fn open_checked<'a>(
    kind: BackendKind,
    src: &'a mut dyn BufRead,
    check: &mut dyn FnMut(&StreamHeader) -> Result<(), DatasetError>,
) -> Result<(FramedReader<&'a mut dyn BufRead>, StreamHeader), DatasetError> {
    let reader = FramedReader::new(src).map_err(|source| DatasetError::Stream {
        dataset: "(unknown: unreadable header)".into(),
        source,
    })?;
    let header = reader.header().clone();
    if header.kind != kind {
        return Err(DatasetError::KindMismatch {
            dataset: header.spec.dataset.to_string(),
            stream: header.kind,
            backend: kind,
        });
    }
    check(&header)?;
    Ok((reader, header))
}

/// What a receive returns once the backend committed `snapshot` after reading `wire_bytes`;
/// an error unless it read the stream to its trailer (`complete`).
fn received(
    header: StreamHeader,
    snapshot: SnapshotInfo,
    wire_bytes: u64,
    complete: bool,
) -> Result<Received, DatasetError> {
    if !complete {
        // Backends read their input to the end before committing; this would be a bug.
        return Err(DatasetError::Stream {
            dataset: header.spec.dataset.to_string(),
            source: StreamError::Corrupt {
                offset: wire_bytes,
                detail: "the backend stopped reading before the stream's trailer".into(),
            },
        });
    }
    Ok(Received {
        header,
        snapshot,
        wire_bytes,
    })
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
    let (mut reader, header) = open_checked(backend.kind(), src, check)?;
    let snapshot = backend.receive(&header.spec, header.limit, &mut reader)?;
    received(header, snapshot, reader.wire_offset(), reader.is_complete())
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

/// What the producer of [`send_framed_async`] hands the writer, in stream order.
enum Framed {
    /// One data frame, prefix and payload in one buffer; the payload bytes framed so far.
    Frame(Vec<u8>, u64),
    /// The trailer: the stream is complete.
    End(Vec<u8>, StreamTotals),
    /// Reading the backend failed: the abort record to send, and the error.
    Abort(Vec<u8>, io::Error),
}

/// [`send_framed`] for async writers (a QUIC send stream): the backend runs on
/// `spawn_blocking`, which also frames and checksums each chunk (so BLAKE3 runs beside the
/// transport, not on the async threads), and complete frames cross a bounded channel; the
/// writer hands their buffers back for the next reads. `progress` gets the payload bytes sent
/// so far and the stream's size hint (see [`crate::SendStream::size_hint`]). The trailer goes
/// out only when the producer framed the whole stream: a producer that dies ends the send with
/// an error, never with a stream that looks complete.
pub async fn send_framed_async<W>(
    backend: Arc<dyn Backend>,
    spec: StreamSpec,
    dst: &mut W,
    mut progress: impl FnMut(u64, Option<u64>) + Send,
) -> Result<Sent, DatasetError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    const PREFIX: usize = 5;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Framed>(4);
    let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
    let opened = {
        let spec = spec.clone();
        let backend = backend.clone();
        tokio::task::spawn_blocking(move || open_send(&*backend, &spec))
    };
    let (header, mut stream) = joined(opened.await)?;
    let size_hint = header.size_hint;
    progress(0, size_hint);
    let (mut enc, head) = Encoder::new(&header);
    // Dropped with the future: the producer then sees a closed channel and stops.
    let _producer = tokio::task::spawn_blocking(move || loop {
        // A buffer the writer is done with keeps its length: no zeroing, no page faults.
        let mut buf = recycled
            .try_recv()
            .unwrap_or_else(|_| vec![0u8; PREFIX + DEFAULT_FRAME_LEN]);
        let out = match read_full(&mut stream, &mut buf[PREFIX..]) {
            Ok(0) => {
                let (trailer, totals) = enc.trailer();
                let _ = tx.blocking_send(Framed::End(trailer, totals));
                break;
            }
            Ok(n) => {
                buf.truncate(PREFIX + n);
                let prefix = enc.frame_prefix(&buf[PREFIX..]);
                buf[..PREFIX].copy_from_slice(&prefix);
                Framed::Frame(buf, enc.totals().payload_bytes)
            }
            Err(e) => {
                let _ = tx.blocking_send(Framed::Abort(enc.abort(&e.to_string()), e));
                break;
            }
        };
        if tx.blocking_send(out).is_err() {
            break;
        }
    });
    let fail = |e| send_failed(&spec, e);
    dst.write_all(&head).await.map_err(fail)?;
    while let Some(item) = rx.recv().await {
        match item {
            Framed::Frame(mut frame, sent) => {
                dst.write_all(&frame).await.map_err(fail)?;
                progress(sent, size_hint);
                if frame.capacity() >= PREFIX + DEFAULT_FRAME_LEN {
                    frame.resize(PREFIX + DEFAULT_FRAME_LEN, 0);
                    let _ = recycle.send(frame);
                }
            }
            Framed::End(trailer, totals) => {
                dst.write_all(&trailer).await.map_err(fail)?;
                dst.flush().await.map_err(fail)?;
                return Ok(Sent { header, totals });
            }
            Framed::Abort(record, e) => {
                let _ = dst.write_all(&record).await;
                let _ = dst.flush().await;
                return Err(fail(e));
            }
        }
    }
    Err(fail(io::Error::other(
        "the sending thread stopped before the end of the stream",
    )))
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
            receive_pipelined(backend, &mut reader, &mut check)
        })
        .await,
    )
}

/// A verified chunk of payload on its way from the verifying thread to the backend's.
enum Verified {
    Data(Vec<u8>),
    /// The trailer verified: the payload is complete.
    End,
    /// Reading or verifying failed: the backend must not commit.
    Failed(io::Error),
}

/// [`receive_framed`] on two threads: this one reads and verifies the framed stream (QUIC,
/// BLAKE3), a second one writes the verified payload into the backend, so the two overlap.
/// What the backend sees is exactly what [`FramedReader`] releases (the last chunk only after
/// the trailer verified; an error, never an end, for a truncated, corrupt or aborted stream),
/// so it commits exactly when `receive_framed` would.
fn receive_pipelined(
    backend: Arc<dyn Backend>,
    src: &mut dyn BufRead,
    check: &mut dyn FnMut(&StreamHeader) -> Result<(), DatasetError>,
) -> Result<Received, DatasetError> {
    let (mut reader, header) = open_checked(backend.kind(), src, check)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Verified>(4);
    let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
    let writer = {
        let spec = header.spec.clone();
        let limit = header.limit;
        std::thread::Builder::new()
            .name("flock-receive".into())
            .spawn(move || {
                let mut input = VerifiedReader {
                    rx,
                    recycle,
                    chunk: Vec::new(),
                    pos: 0,
                    ended: false,
                };
                let r = backend.receive(&spec, limit, &mut input);
                r.map(|snapshot| (snapshot, input.consumed_all()))
            })
            .map_err(|e| DatasetError::io("start", std::path::Path::new("receive thread"), e))?
    };
    // Verify and hand over until the end, an error, or the backend stopped reading (it failed:
    // its error is the one to report).
    loop {
        let mut buf = recycled
            .try_recv()
            .unwrap_or_else(|_| vec![0u8; DEFAULT_FRAME_LEN]);
        let item = match read_full(&mut reader, &mut buf) {
            Ok(0) => Verified::End,
            Ok(n) => {
                buf.truncate(n);
                Verified::Data(buf)
            }
            Err(e) => Verified::Failed(e),
        };
        let last = !matches!(item, Verified::Data(_));
        if tx.send(item).is_err() || last {
            break;
        }
    }
    drop(tx);
    let (snapshot, consumed_all) = match writer.join() {
        Ok(r) => r?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    received(
        header,
        snapshot,
        reader.wire_offset(),
        consumed_all && reader.is_complete(),
    )
}

/// The backend's side of [`receive_pipelined`]: verified payload; `Ok(0)` only after the
/// trailer verified, an error when the verifying side failed or went away.
struct VerifiedReader {
    rx: std::sync::mpsc::Receiver<Verified>,
    recycle: std::sync::mpsc::Sender<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl VerifiedReader {
    /// Whether the backend took every verified byte, up to the verified end. A backend may
    /// stop calling `read` after the last byte it needs; the verifying side sends the end
    /// right after the last chunk (which it releases only once the trailer verified).
    fn consumed_all(&mut self) -> bool {
        if self.pos < self.chunk.len() {
            return false;
        }
        self.ended || matches!(self.rx.recv(), Ok(Verified::End))
    }
}

impl Read for VerifiedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.chunk.len() {
                let n = buf.len().min(self.chunk.len() - self.pos);
                buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.ended || buf.is_empty() {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Verified::Data(next)) => {
                    let mut done = std::mem::replace(&mut self.chunk, next);
                    self.pos = 0;
                    if done.capacity() >= DEFAULT_FRAME_LEN {
                        done.resize(DEFAULT_FRAME_LEN, 0);
                        let _ = self.recycle.send(done);
                    }
                }
                Ok(Verified::End) => self.ended = true,
                Ok(Verified::Failed(e)) => return Err(e),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the verifying side of the receive stopped",
                    ))
                }
            }
        }
    }
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
