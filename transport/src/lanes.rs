//! Lanes: one transfer's byte stream carried over N unidirectional QUIC streams of an open
//! connection, written through [`tokio::io::AsyncWrite`] and read back, in order, through
//! [`tokio::io::AsyncRead`].
//!
//! ```text
//! // sender                                        // receiver
//! let mut w = lanes::open(&conn, id, 4).await?;    let mut r = lanes::accept(&conn).await?;
//! tokio::io::copy(&mut src, &mut w).await?;        assert_eq!(r.transfer_id(), id);
//! w.shutdown().await?;                             tokio::io::copy(&mut r, &mut dst).await?;
//! ```
//!
//! - [`open`] opens `lanes` streams and returns a [`LaneWriter`]. Its `shutdown` resolves once
//!   the peer has acknowledged every byte on every lane; dropping it without `shutdown` resets
//!   the lanes, so the reader fails instead of seeing a shorter stream.
//! - [`accept`] takes the next unidirectional streams of the connection, which must be the
//!   lanes of one transfer, and returns a [`LaneReader`]. For a connection that carries other
//!   streams too, read each stream's [`LaneHeader`] with [`read_header`] and group them yourself
//!   ([`LaneReader::new`]). One transfer at a time per connection is the simple rule.
//! - The reader ends with a clean EOF only when every lane delivered its end record with the
//!   same total and then finished. A lane that breaks off (finished early, reset, connection
//!   lost), a missing lane, or a total that does not match is an error (`UnexpectedEof` or
//!   `InvalidData`), never a shorter stream.
//!
//! Wire format, on each lane: a 16-byte header, `b"FLN1"`, the transfer id (u64, big endian),
//! the lane's index and the lane count (u16 each); then records: a u32 length and that many
//! bytes (1 ..= [`MAX_CHUNK`]); chunk `k` of the byte stream travels on lane `k % lanes`. Each
//! lane ends with an end record, length 0 followed by the transfer's total length (u64), then
//! the stream's FIN.
//!
//! Why lanes: a QUIC stream's throughput is bounded by its flow-control window, so several
//! streams let a transfer have several windows in flight. Measured on loopback
//! (bench/RESULTS.md, "Snapshot streams"), that does not pay on one connection: one lane is as
//! fast as one plain stream and 2-4 lanes are slower, because quinn drives every stream of a
//! connection from one task. Use one lane unless a path's bandwidth-delay product outgrows the
//! stream window. What one lane does add over a plain stream: the writer collects bytes into
//! pooled 256 KiB buffers and hands them to quinn as owned `Bytes` (`write_chunk`) instead of
//! quinn copying each write into a fresh allocation, the reader takes quinn's received chunks
//! without copying them until `poll_read`, and a stream cut short is an error, never a clean EOF.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::channel::mpsc;
use futures::StreamExt;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

/// The first bytes of every lane.
pub const MAGIC: [u8; 4] = *b"FLN1";
/// The largest record on a lane, and the size of the writer's buffers.
pub const MAX_CHUNK: usize = 256 << 10;
/// The most lanes a transfer may have.
pub const MAX_LANES: u16 = 64;
/// Chunks queued per lane between the writer and the lane's task.
const QUEUE: usize = 8;
/// Error code a lane is reset with when its writer is dropped without `shutdown`.
pub const ABANDONED: u32 = 0x4c41_4e45; // "LANE"

/// The header at the start of each lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneHeader {
    pub transfer_id: u64,
    pub lane: u16,
    pub lanes: u16,
}

impl LaneHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4..12].copy_from_slice(&self.transfer_id.to_be_bytes());
        b[12..14].copy_from_slice(&self.lane.to_be_bytes());
        b[14..16].copy_from_slice(&self.lanes.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; Self::LEN]) -> io::Result<LaneHeader> {
        if b[..4] != MAGIC {
            return Err(invalid("not a lane: bad magic"));
        }
        let h = LaneHeader {
            transfer_id: u64::from_be_bytes(b[4..12].try_into().expect("8 bytes")),
            lane: u16::from_be_bytes([b[12], b[13]]),
            lanes: u16::from_be_bytes([b[14], b[15]]),
        };
        if h.lanes == 0 || h.lanes > MAX_LANES || h.lane >= h.lanes {
            return Err(invalid(format!(
                "bad lane header: lane {} of {}",
                h.lane, h.lanes
            )));
        }
        Ok(h)
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn eof(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, msg.into())
}

fn broken(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, msg.into())
}

// ---------------------------------------------------------------------------------------------
// Sending

/// Opens `lanes` unidirectional streams on `conn` for transfer `transfer_id` and returns the
/// writer that spreads a byte stream over them.
pub async fn open(conn: &Connection, transfer_id: u64, lanes: u16) -> io::Result<LaneWriter> {
    if lanes == 0 || lanes > MAX_LANES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("lanes must be 1..={MAX_LANES}, not {lanes}"),
        ));
    }
    let mut streams = Vec::with_capacity(lanes as usize);
    for lane in 0..lanes {
        let mut s = conn.open_uni().await.map_err(io::Error::from)?;
        let header = LaneHeader {
            transfer_id,
            lane,
            lanes,
        };
        s.write_chunk(Bytes::copy_from_slice(&header.encode()))
            .await
            .map_err(io::Error::from)?;
        streams.push(s);
    }
    Ok(LaneWriter::new(streams))
}

/// What the writer hands a lane's task.
enum ToLane {
    Chunk(Bytes),
    /// The transfer's total length: write the end record, finish, wait for acknowledgement.
    End(u64),
}

/// Buffers of [`MAX_CHUNK`] bytes that come back when quinn drops the `Bytes` made of them
/// (once the peer acknowledged them), so a long transfer allocates (and page-faults) only
/// while the window fills.
struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

struct Pooled {
    data: Vec<u8>,
    pool: Arc<Pool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut data = std::mem::take(&mut self.data);
        data.clear();
        let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.pool.keep {
            free.push(data);
        }
    }
}

impl Pool {
    fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(MAX_CHUNK))
    }
}

/// The sending side of a transfer: an [`AsyncWrite`] over N lanes. See the module docs.
pub struct LaneWriter {
    lanes: Vec<mpsc::Sender<ToLane>>,
    tasks: Vec<Option<JoinHandle<io::Result<()>>>>,
    pool: Arc<Pool>,
    /// The chunk being filled.
    buf: Vec<u8>,
    /// The lane the next chunk goes to.
    next: usize,
    total: u64,
    /// Lanes that were sent their end record, during shutdown.
    ended: usize,
    failed: Option<io::Error>,
}

impl LaneWriter {
    /// A writer over streams already opened and headed (lane `i` is `streams[i]`). Must be
    /// called within a tokio runtime: each lane gets a task.
    pub fn new(streams: Vec<SendStream>) -> LaneWriter {
        let n = streams.len();
        let pool = Arc::new(Pool {
            free: Mutex::new(Vec::new()),
            keep: n * (QUEUE + 2) + 64,
        });
        let mut lanes = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for stream in streams {
            let (tx, rx) = mpsc::channel(QUEUE);
            lanes.push(tx);
            tasks.push(Some(tokio::spawn(drive_lane(stream, rx))));
        }
        let buf = pool.take();
        LaneWriter {
            lanes,
            tasks,
            pool,
            buf,
            next: 0,
            total: 0,
            ended: 0,
            failed: None,
        }
    }

    /// Bytes written so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The error of a lane whose task stopped (its channel closed): waits for the task.
    fn poll_lane_error(&mut self, cx: &mut Context<'_>, lane: usize) -> Poll<io::Error> {
        let e = match self.tasks[lane].as_mut() {
            Some(task) => match ready!(Pin::new(task).poll(cx)) {
                Ok(Ok(())) => broken(format!("lane {lane} ended early")),
                Ok(Err(e)) => e,
                Err(e) => io::Error::other(format!("lane {lane}: {e}")),
            },
            None => broken(format!("lane {lane} is closed")),
        };
        self.tasks[lane] = None;
        let kept = io::Error::new(e.kind(), e.to_string());
        self.failed = Some(e);
        Poll::Ready(kept)
    }

    fn check_failed(&self) -> io::Result<()> {
        match &self.failed {
            Some(e) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Ok(()),
        }
    }

    /// Hands the buffered chunk to its lane.
    fn poll_push(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let lane = self.next;
        if ready!(self.lanes[lane].poll_ready(cx)).is_err() {
            return Poll::Ready(Err(ready!(self.poll_lane_error(cx, lane))));
        }
        let data = std::mem::replace(&mut self.buf, self.pool.take());
        let chunk = Bytes::from_owner(Pooled {
            data,
            pool: self.pool.clone(),
        });
        if self.lanes[lane].start_send(ToLane::Chunk(chunk)).is_err() {
            return Poll::Ready(Err(ready!(self.poll_lane_error(cx, lane))));
        }
        self.next = (self.next + 1) % self.lanes.len();
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for LaneWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_failed()?;
        if self.ended > 0 {
            return Poll::Ready(Err(broken("write after shutdown")));
        }
        if self.buf.len() == MAX_CHUNK {
            ready!(self.poll_push(cx))?;
        }
        let n = data.len().min(MAX_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.total += n as u64;
        Poll::Ready(Ok(n))
    }

    /// Hands what is buffered to the lanes (it is then sent as soon as quinn can).
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_failed()?;
        self.poll_push(cx)
    }

    /// Ends the transfer on every lane and waits until the peer acknowledged all of it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_failed()?;
        ready!(self.poll_push(cx))?;
        while self.ended < self.lanes.len() {
            let lane = self.ended;
            if ready!(self.lanes[lane].poll_ready(cx)).is_err() {
                return Poll::Ready(Err(ready!(self.poll_lane_error(cx, lane))));
            }
            let total = self.total;
            if self.lanes[lane].start_send(ToLane::End(total)).is_err() {
                return Poll::Ready(Err(ready!(self.poll_lane_error(cx, lane))));
            }
            self.ended += 1;
        }
        for lane in 0..self.tasks.len() {
            if let Some(task) = self.tasks[lane].as_mut() {
                let r = ready!(Pin::new(task).poll(cx));
                self.tasks[lane] = None;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        self.failed = Some(io::Error::new(e.kind(), e.to_string()));
                        return Poll::Ready(Err(e));
                    }
                    Err(e) => {
                        return Poll::Ready(Err(io::Error::other(format!("lane {lane}: {e}"))))
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LaneWriter {
    fn drop(&mut self) {
        // The lane tasks see their channel close without an end record and reset their
        // streams; a task still finishing a clean end is left to complete.
        self.lanes.clear();
    }
}

/// A lane's task: writes the chunks it is given as records, and the end record.
async fn drive_lane(mut stream: SendStream, mut rx: mpsc::Receiver<ToLane>) -> io::Result<()> {
    while let Some(msg) = rx.next().await {
        match msg {
            ToLane::Chunk(chunk) => {
                let len = (chunk.len() as u32).to_be_bytes();
                stream
                    .write_all_chunks(&mut [Bytes::copy_from_slice(&len), chunk])
                    .await
                    .map_err(io::Error::from)?;
            }
            ToLane::End(total) => {
                let mut end = [0u8; 12];
                end[4..].copy_from_slice(&total.to_be_bytes());
                stream
                    .write_chunk(Bytes::copy_from_slice(&end))
                    .await
                    .map_err(io::Error::from)?;
                stream.finish().map_err(|e| broken(e.to_string()))?;
                return match stream.stopped().await {
                    Ok(None) => Ok(()),
                    Ok(Some(code)) => Err(broken(format!("the peer stopped the lane ({code})"))),
                    Err(e) => Err(broken(e.to_string())),
                };
            }
        }
    }
    // The writer went away without shutdown: make sure the reader cannot take what it got
    // for the whole transfer.
    let _ = stream.reset(VarInt::from_u32(ABANDONED));
    Err(broken("the writer was dropped before shutdown"))
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// Reads a lane's header from a stream just accepted.
pub async fn read_header(stream: &mut RecvStream) -> io::Result<LaneHeader> {
    let mut b = [0u8; LaneHeader::LEN];
    stream.read_exact(&mut b).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => eof("a lane ended inside its header"),
        quinn::ReadExactError::ReadError(e) => io::Error::from(e),
    })?;
    LaneHeader::decode(&b)
}

/// Accepts the lanes of the next transfer on `conn` (the next unidirectional streams, which
/// must all belong to it) and returns the reader.
pub async fn accept(conn: &Connection) -> io::Result<LaneReader> {
    let mut first = conn.accept_uni().await.map_err(io::Error::from)?;
    let header = read_header(&mut first).await?;
    let mut lanes: Vec<Option<RecvStream>> = (0..header.lanes).map(|_| None).collect();
    lanes[header.lane as usize] = Some(first);
    for _ in 1..header.lanes {
        let mut s = conn.accept_uni().await.map_err(|e| {
            eof(format!(
                "transfer {}: only some of its {} lanes arrived: {e}",
                header.transfer_id, header.lanes
            ))
        })?;
        let h = read_header(&mut s).await?;
        if h.transfer_id != header.transfer_id || h.lanes != header.lanes {
            return Err(invalid(format!(
                "a lane of transfer {} ({} lanes) arrived among the lanes of transfer {} ({} lanes)",
                h.transfer_id, h.lanes, header.transfer_id, header.lanes
            )));
        }
        if lanes[h.lane as usize].replace(s).is_some() {
            return Err(invalid(format!("lane {} arrived twice", h.lane)));
        }
    }
    let streams = lanes
        .into_iter()
        .map(|s| s.expect("every lane index was filled once"))
        .collect();
    Ok(LaneReader::new(header.transfer_id, streams))
}

/// What a lane's task hands the reader.
enum FromLane {
    /// Part of a record; `last` when the record is complete.
    Piece { data: Bytes, last: bool },
    /// The end record and a clean FIN after it.
    End(u64),
}

/// The receiving side of a transfer: an [`AsyncRead`] of the bytes in the order they were
/// written. See the module docs.
pub struct LaneReader {
    transfer_id: u64,
    lanes: Vec<mpsc::Receiver<io::Result<FromLane>>>,
    tasks: Vec<JoinHandle<()>>,
    /// The lane the next bytes come from.
    current: usize,
    piece: Bytes,
    piece_last: bool,
    delivered: u64,
    /// Set once the end record was found on the current lane: the others must end too.
    ending: Option<u64>,
    /// Lanes checked for their end record, in index order, once `ending` is set.
    checked: usize,
    done: bool,
    failed: Option<(io::ErrorKind, String)>,
}

impl LaneReader {
    /// A reader over lanes whose headers were read (lane `i` is `streams[i]`). Must be called
    /// within a tokio runtime: each lane gets a task.
    pub fn new(transfer_id: u64, streams: Vec<RecvStream>) -> LaneReader {
        let mut lanes = Vec::with_capacity(streams.len());
        let mut tasks = Vec::with_capacity(streams.len());
        for (i, s) in streams.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(QUEUE);
            lanes.push(rx);
            tasks.push(tokio::spawn(read_lane(i, s, tx)));
        }
        LaneReader {
            transfer_id,
            lanes,
            tasks,
            current: 0,
            piece: Bytes::new(),
            piece_last: false,
            delivered: 0,
            ending: None,
            checked: 0,
            done: false,
            failed: None,
        }
    }

    pub fn transfer_id(&self) -> u64 {
        self.transfer_id
    }

    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Bytes delivered so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.failed = Some((e.kind(), e.to_string()));
        e
    }

    /// The next message of lane `lane`; a closed channel is an error (the task reports why
    /// before it stops, so this is only a task that went away).
    fn poll_lane(&mut self, cx: &mut Context<'_>, lane: usize) -> Poll<io::Result<FromLane>> {
        match ready!(self.lanes[lane].poll_next_unpin(cx)) {
            Some(r) => Poll::Ready(r),
            None => Poll::Ready(Err(eof(format!(
                "lane {lane} ended without its end record"
            )))),
        }
    }
}

impl AsyncRead for LaneReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some((kind, msg)) = &self.failed {
            return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
        }
        if self.done || out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(total) = self.ending {
                return match ready!(self.poll_finish(cx, total)) {
                    Ok(()) => {
                        self.done = true;
                        Poll::Ready(Ok(()))
                    }
                    Err(e) => Poll::Ready(Err(self.fail(e))),
                };
            }
            if !self.piece.is_empty() {
                let n = self.piece.len().min(out.remaining());
                let part = self.piece.split_to(n);
                out.put_slice(&part);
                self.delivered += n as u64;
                if self.piece.is_empty() && self.piece_last {
                    self.current = (self.current + 1) % self.lanes.len();
                }
                return Poll::Ready(Ok(()));
            }
            let lane = self.current;
            match ready!(self.poll_lane(cx, lane)) {
                Ok(FromLane::Piece { data, last }) => {
                    if data.is_empty() {
                        if last {
                            self.current = (self.current + 1) % self.lanes.len();
                        }
                        continue;
                    }
                    self.piece = data;
                    self.piece_last = last;
                }
                Ok(FromLane::End(total)) => self.ending = Some(total),
                Err(e) => return Poll::Ready(Err(self.fail(e))),
            }
        }
    }
}

impl LaneReader {
    /// After the end record on the current lane: every other lane must end with the same
    /// total and nothing after it. Resumable: `checked` counts the lanes already seen to end.
    fn poll_finish(&mut self, cx: &mut Context<'_>, total: u64) -> Poll<io::Result<()>> {
        if total != self.delivered {
            return Poll::Ready(Err(invalid(format!(
                "transfer {}: the sender wrote {total} bytes, {} arrived",
                self.transfer_id, self.delivered
            ))));
        }
        while self.checked < self.lanes.len() {
            let lane = self.checked;
            if lane != self.current {
                match ready!(self.poll_lane(cx, lane))? {
                    FromLane::End(t) if t == total => {}
                    FromLane::End(t) => {
                        return Poll::Ready(Err(invalid(format!(
                            "lane {lane} ended at a total of {t}, lane {} at {total}",
                            self.current
                        ))))
                    }
                    FromLane::Piece { .. } => {
                        return Poll::Ready(Err(invalid(format!(
                            "lane {lane} has data after the end of the transfer"
                        ))))
                    }
                }
            }
            self.checked += 1;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LaneReader {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A lane's task: reads records and hands their bytes on without copying them.
async fn read_lane(
    lane: usize,
    mut stream: RecvStream,
    mut tx: mpsc::Sender<io::Result<FromLane>>,
) {
    use futures::SinkExt;
    let r = async {
        loop {
            let mut len = [0u8; 4];
            read_exact(&mut stream, &mut len, lane, "a record's length").await?;
            let len = u32::from_be_bytes(len) as usize;
            if len == 0 {
                let mut total = [0u8; 8];
                read_exact(&mut stream, &mut total, lane, "the end record").await?;
                // Nothing may follow the end record.
                match stream.read_chunk(1, true).await.map_err(io::Error::from)? {
                    None => return Ok(Some(u64::from_be_bytes(total))),
                    Some(_) => {
                        return Err(invalid(format!(
                            "lane {lane} has data after its end record"
                        )))
                    }
                }
            }
            if len > MAX_CHUNK {
                return Err(invalid(format!(
                    "lane {lane}: a record of {len} bytes (at most {MAX_CHUNK})"
                )));
            }
            let mut left = len;
            while left > 0 {
                let chunk = stream
                    .read_chunk(left, true)
                    .await
                    .map_err(io::Error::from)?
                    .ok_or_else(|| eof(format!("lane {lane} broke off inside a record")))?;
                left -= chunk.bytes.len();
                let piece = FromLane::Piece {
                    data: chunk.bytes,
                    last: left == 0,
                };
                if tx.send(Ok(piece)).await.is_err() {
                    return Ok(None); // the reader went away
                }
            }
        }
    }
    .await;
    match r {
        Ok(Some(total)) => {
            let _ = tx.send(Ok(FromLane::End(total))).await;
        }
        Ok(None) => {}
        Err(e) => {
            let _ = tx.send(Err(e)).await;
        }
    }
}

async fn read_exact(
    stream: &mut RecvStream,
    buf: &mut [u8],
    lane: usize,
    what: &str,
) -> io::Result<()> {
    stream.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => eof(format!("lane {lane} ended inside {what}")),
        quinn::ReadExactError::ReadError(e) => io::Error::from(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quic::QuicTuning;
    use flock_tls::pki::CertAuthority;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Two endpoints on loopback with one connection between them: (client side, server side).
    async fn connected() -> (Connection, Connection, quinn::Endpoint, quinn::Endpoint) {
        let (ca, _) = CertAuthority::create("lanes-test").unwrap();
        let tls = |id| crate::quic::tests::node_tls(&ca, id);
        let loopback = "127.0.0.1:0".parse().unwrap();
        let tuning = QuicTuning::default();
        let server = tuning.open(loopback, &tls(1), true).unwrap().endpoint;
        let client = tuning.open(loopback, &tls(2), false).unwrap().endpoint;
        let addr = server.local_addr().unwrap();
        let (c, s) = tokio::join!(
            async {
                client
                    .connect(addr, flock_tls::SERVER_NAME)
                    .unwrap()
                    .await
                    .unwrap()
            },
            async { server.accept().await.unwrap().await.unwrap() }
        );
        (c, s, client, server)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 997) as u8).collect()
    }

    async fn read_to_end(r: &mut LaneReader) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn bytes_arrive_in_order_over_one_or_several_lanes() {
        let (c, s, _ce, _se) = connected().await;
        let sizes = [0, 1, MAX_CHUNK, MAX_CHUNK + 1, 5 * MAX_CHUNK + 17, 3 << 20];
        let mut id = 0;
        for lanes in [1u16, 3, 8] {
            for &size in &sizes {
                id += 1;
                let data = pattern(size);
                let writer = async {
                    let mut w = open(&c, id, lanes).await.unwrap();
                    // Odd-sized writes, so chunks and writes do not line up.
                    for piece in data.chunks(100_003) {
                        w.write_all(piece).await.unwrap();
                    }
                    w.shutdown().await.unwrap();
                    w.total()
                };
                let reader = async {
                    let mut r = accept(&s).await.unwrap();
                    assert_eq!((r.transfer_id(), r.lanes()), (id, lanes as usize));
                    read_to_end(&mut r).await.unwrap()
                };
                let (total, got) = tokio::join!(writer, reader);
                assert_eq!(total, size as u64);
                assert!(got == data, "lanes {lanes}, size {size}: the bytes differ");
            }
        }
    }

    /// Opens `lanes` raw lanes of transfer `id` with their headers.
    async fn raw_lanes(c: &Connection, id: u64, lanes: u16) -> Vec<SendStream> {
        let mut v = Vec::new();
        for lane in 0..lanes {
            let mut st = c.open_uni().await.unwrap();
            let h = LaneHeader {
                transfer_id: id,
                lane,
                lanes,
            };
            st.write_all(&h.encode()).await.unwrap();
            v.push(st);
        }
        v
    }

    fn record(data: &[u8]) -> Vec<u8> {
        let mut r = (data.len() as u32).to_be_bytes().to_vec();
        r.extend_from_slice(data);
        r
    }

    fn end(total: u64) -> Vec<u8> {
        let mut r = vec![0u8; 4];
        r.extend_from_slice(&total.to_be_bytes());
        r
    }

    /// Reads until the reader fails; a clean EOF is a test failure.
    async fn expect_error(s: &Connection) -> io::Error {
        let mut r = match accept(s).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        match read_to_end(&mut r).await {
            Ok(got) => panic!("clean EOF after {} bytes of a broken transfer", got.len()),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn a_lane_that_ends_without_its_end_record_is_an_error() {
        let (c, s, _ce, _se) = connected().await;
        let mut l = raw_lanes(&c, 7, 2).await;
        l[0].write_all(&record(b"first")).await.unwrap();
        l[1].write_all(&record(b"second")).await.unwrap();
        l[0].write_all(&end(11)).await.unwrap();
        l[0].finish().unwrap();
        l[1].finish().unwrap(); // no end record: truncated
        let e = expect_error(&s).await;
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[tokio::test]
    async fn a_lane_that_breaks_off_inside_a_record_is_an_error() {
        let (c, s, _ce, _se) = connected().await;
        let mut l = raw_lanes(&c, 8, 1).await;
        let mut rec = record(&[9u8; 1000]);
        rec.truncate(500);
        l[0].write_all(&rec).await.unwrap();
        l[0].finish().unwrap();
        let e = expect_error(&s).await;
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[tokio::test]
    async fn a_total_that_does_not_match_is_an_error() {
        let (c, s, _ce, _se) = connected().await;
        let mut l = raw_lanes(&c, 9, 2).await;
        l[0].write_all(&record(b"abc")).await.unwrap();
        // Lane 1's chunk is missing: the end records claim more than arrived.
        l[1].write_all(&end(6)).await.unwrap();
        l[0].write_all(&end(6)).await.unwrap();
        l[0].finish().unwrap();
        l[1].finish().unwrap();
        let e = expect_error(&s).await;
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[tokio::test]
    async fn a_writer_dropped_before_shutdown_fails_the_reader() {
        let (c, s, _ce, _se) = connected().await;
        let writer = async {
            let mut w = open(&c, 10, 3).await.unwrap();
            w.write_all(&pattern(2 * MAX_CHUNK + 5)).await.unwrap();
            w.flush().await.unwrap();
            drop(w);
        };
        let (_, e) = tokio::join!(writer, expect_error(&s));
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_lost_connection_fails_the_reader_and_the_writer() {
        let (c, s, _ce, _se) = connected().await;
        let mut w = open(&c, 11, 2).await.unwrap();
        w.write_all(&pattern(MAX_CHUNK * 3)).await.unwrap();
        w.flush().await.unwrap();
        let mut r = accept(&s).await.unwrap();
        let mut first = vec![0u8; 1000];
        r.read_exact(&mut first).await.unwrap();
        c.close(1u32.into(), b"gone");
        assert!(read_to_end(&mut r).await.is_err());
        assert!(w.shutdown().await.is_err());
    }

    #[tokio::test]
    async fn missing_and_foreign_lanes_are_refused() {
        let (c, s, _ce, _se) = connected().await;
        // Two lanes announced, one opened, then the connection goes.
        let mut only = c.open_uni().await.unwrap();
        let h = LaneHeader {
            transfer_id: 12,
            lane: 0,
            lanes: 2,
        };
        only.write_all(&h.encode()).await.unwrap();
        only.write_all(&end(0)).await.unwrap();
        only.finish().unwrap();
        let accepted = tokio::spawn({
            let s = s.clone();
            async move { accept(&s).await.map(|_| ()) }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        c.close(1u32.into(), b"gone");
        let e = accepted.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");

        // A lane of another transfer among them.
        let (c, s, _ce, _se) = connected().await;
        let mut kept = Vec::new();
        for transfer_id in [13, 14] {
            let mut st = c.open_uni().await.unwrap();
            let h = LaneHeader {
                transfer_id,
                lane: 0,
                lanes: 2,
            };
            st.write_all(&h.encode()).await.unwrap();
            kept.push(st);
        }
        let e = accept(&s)
            .await
            .err()
            .expect("lanes of two transfers were mixed");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");

        // Not a lane at all.
        let mut st = c.open_uni().await.unwrap();
        st.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        st.finish().unwrap();
        let e = accept(&s)
            .await
            .err()
            .expect("a stream without a lane header");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        let h = LaneHeader {
            transfer_id: u64::MAX - 3,
            lane: 2,
            lanes: 5,
        };
        assert_eq!(LaneHeader::decode(&h.encode()).unwrap(), h);
        for (lane, lanes) in [(0, 0), (5, 5), (0, MAX_LANES + 1)] {
            let bad = LaneHeader {
                transfer_id: 1,
                lane,
                lanes,
            };
            assert!(LaneHeader::decode(&bad.encode()).is_err());
        }
        let mut b = h.encode();
        b[0] = b'X';
        assert!(LaneHeader::decode(&b).is_err());
    }
}
