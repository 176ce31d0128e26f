//! flock's datasets: storage backends with snapshots, and the stream format that moves
//! snapshots between nodes.
//!
//! - [`backend`]: the [`Backend`] trait (create, destroy, list, snapshot, rollback, restore,
//!   set limit, mount path, send, receive), the values it speaks ([`DatasetInfo`], [`SnapshotInfo`], [`StreamSpec`])
//!   and [`newest_common_snapshot`] (where an incremental stream or a rollback starts).
//! - [`dir`]: [`DirBackend`], plain directories with hard-link snapshots; the embedded default.
//! - [`zfs`]: [`ZfsBackend`], the `zfs` CLI on a pool (zfs-fuse or OpenZFS).
//! - [`frame`]: the framing a stream travels in (header, length-prefixed chunks, BLAKE3
//!   trailer): a sans-IO [`frame::Decoder`] and `Read`/`Write` adapters. Pure.
//! - [`transfer`]: send a snapshot into / receive one from a byte pipe, framed and verified;
//!   blocking and async (for the QUIC transfer in `flock-node`), with progress and cancellation.
//! - [`name`]: validated [`DatasetName`] and [`SnapshotName`]; [`error`]: [`DatasetError`],
//!   [`StreamError`].
//!
//! **Blocking trait, async at the edge.** Both backends are blocking by nature: `std::fs` has
//! no async API (tokio's file IO is itself a thread pool) and zfs works through short-lived
//! child processes. So [`Backend`] is a plain blocking, object-safe trait (`Arc<dyn Backend>`
//! picked at startup from `--backend`), each backend is written once as straight-line code and
//! tested without a runtime, and the one place that meets async code — streaming over QUIC —
//! goes through [`transfer::send_framed_async`] / [`transfer::receive_framed_async`], which run
//! the backend on `spawn_blocking` with bounded buffers. Short calls (list, snapshot) from async
//! code belong on `spawn_blocking` too.
//!
//! **Receive commits only a verified stream.** The framed reader releases the last payload
//! chunk only after the trailer's checksum verified, and each backend reads its input to the
//! end before committing (dir: rename from staging; zfs: zfs's own atomic receive), so a
//! truncated, corrupted or interrupted stream leaves the receiver at its last good snapshot,
//! and a failed full receive leaves no dataset.

pub mod backend;
pub mod dir;
pub mod error;
pub mod frame;
pub mod name;
pub mod transfer;
pub mod zfs;

pub use backend::{
    newest_common_snapshot, set_aside, Backend, BackendKind, DatasetInfo, SendStream, SetAside,
    SnapshotInfo, SpaceSharing, StreamSpec,
};
pub use dir::DirBackend;
pub use error::{DatasetError, StreamError};
pub use frame::StreamHeader;
pub use name::{DatasetName, SnapshotName};
pub use zfs::ZfsBackend;
