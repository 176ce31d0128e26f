//! The `zfs` backend: the real `zfs` command on a pool (zfs-fuse on Debian, or OpenZFS).
//!
//! ```text
//! ROOT/NAME          container: flock:state = creating|receiving|ready, canmount=off,
//!                    flock:layout=refquota; a quota only while a stream is received
//! ROOT/NAME/data     the file system the application sees; refquota = the size limit;
//!                    snapshots are ROOT/NAME/data@SNAP
//! ROOT/NAME/restore  a short-lived clone of a snapshot while [`Backend::restore`] runs
//! ```
//!
//! ROOT is the pool or a dataset in it, given at [`ZfsBackend::open`]. The size limit is the
//! `refquota` of `data`: it counts the live data and not the snapshots, so a dataset that moved
//! once (live data plus the snapshot it came with) is not "full" at half its limit.
//!
//! The container exists so that a size limit holds for a dataset that is still being received:
//! `zfs receive` in zfs-fuse takes no `-o refquota=`, and renaming a received dataset into place
//! is unreliable under zfs-fuse ("dataset is busy" right after an unmount). A full receive
//! creates the container with `quota` = the limit (a full stream makes one snapshot, so that
//! counts its data once) and `flock:state=receiving`, receives into `data`, then moves the limit
//! to `data`'s refquota, clears the quota and marks it `ready` only after the stream verified; a
//! failed receive destroys the container. An incremental receive bounds the container by a
//! temporary quota of what it uses plus the limit (all a stream can add to a snapshot within
//! the limit), then checks the new snapshot's `referenced` against the limit and rolls it back
//! if it is over. Datasets not `ready` are invisible to [`Backend::list`]/[`Backend::info`] and
//! removed by [`ZfsBackend::open`] (a crash mid-receive), which also clears a temporary quota
//! and a restore clone that a crash left.
//!
//! Older datasets carry the limit as the container's `quota` (which counted snapshots too) and
//! no `flock:layout`: [`Backend::info`] reads them as they are, and [`ZfsBackend::open`],
//! [`Backend::set_limit`] and an incremental receive move them to the refquota layout.
//!
//! zfs-fuse 0.7 quirks handled here: `zfs list -p` does not exist (sizes come from `zfs get -p`);
//! `zfs receive` has no `-o`/`-u`/`-s`; after an incremental `zfs receive -F` the FUSE mount can
//! serve stale file contents until it is remounted, so the backend remounts; `zfs destroy`
//! right after an unmount can fail with "dataset is busy", so it is retried briefly.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::{
    Backend, BackendKind, DatasetInfo, SendStream, SnapshotInfo, SpaceSharing, StreamSpec,
};
use crate::error::{DatasetError, StreamError};
use crate::frame::read_full;
use crate::name::{DatasetName, SnapshotName};

const STATE_PROP: &str = "flock:state";
/// Set to [`LAYOUT_REFQUOTA`] on containers whose limit is `data`'s refquota.
const LAYOUT_PROP: &str = "flock:layout";
const LAYOUT_REFQUOTA: &str = "refquota";
/// The child of a container that holds a snapshot's clone during a restore.
const RESTORE_CHILD: &str = "restore";
const BUSY_RETRY_FOR: Duration = Duration::from_secs(10);
/// `struct dmu_replay_record` holding a `drr_begin`: the first record of every zfs stream.
const BEGIN_LEN: usize = 312;
const DMU_BACKUP_MAGIC: u64 = 0x2F5B_ACBAC;

/// Serializes zfs management commands within the process (see [`ZfsBackend::zfs`]).
static ZFS_COMMANDS: Mutex<()> = Mutex::new(());

/// An exclusive `flock(2)` on a file in the temp dir, held while one zfs command runs. Best
/// effort: without the file, commands still run (serialized within the process).
struct HostLock(#[allow(dead_code)] Option<std::fs::File>);

impl HostLock {
    fn acquire() -> Self {
        use std::os::fd::AsRawFd;
        let path = std::env::temp_dir().join("flock-zfs-commands.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok();
        if let Some(f) = &file {
            // SAFETY: a valid open descriptor; the lock goes with the file.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        }
        HostLock(file)
    }
}

/// Datasets as zfs file systems under one root dataset of a pool.
#[derive(Debug)]
pub struct ZfsBackend {
    root: String,
    pool: String,
    zfs: PathBuf,
}

/// A failed zfs command.
#[derive(Debug)]
struct Failure {
    command: String,
    stderr: String,
}

impl Failure {
    fn has(&self, needle: &str) -> bool {
        self.stderr.to_ascii_lowercase().contains(needle)
    }

    fn daemon_down(&self) -> bool {
        self.has("zfs-fuse daemon is running")
            || self.has("failed to initialize zfs library")
            || self.has("connect:")
    }

    fn no_space(&self) -> bool {
        self.has("out of space") || self.has("quota exceeded") || self.has("no space")
    }

    fn missing(&self) -> bool {
        self.has("does not exist") || self.has("could not find any snapshots")
    }

    fn exists(&self) -> bool {
        self.has("already exists")
    }

    fn busy(&self) -> bool {
        self.has("busy")
    }

    /// zfs refused a quota or refquota below what the dataset holds.
    fn below_use(&self) -> bool {
        self.has("less than current used")
    }

    fn into_error(self) -> DatasetError {
        if self.daemon_down() {
            DatasetError::ZfsDaemonNotRunning
        } else {
            DatasetError::Zfs {
                command: self.command,
                stderr: self.stderr,
            }
        }
    }
}

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn check_root(root: &str) -> Result<(), DatasetError> {
    let invalid = |reason: &str| DatasetError::InvalidName {
        what: "zfs root",
        name: root.to_string(),
        reason: reason.to_string(),
    };
    if root.is_empty() {
        return Err(invalid(
            "it is empty; give a pool name such as \"tank\" or \"tank/flock\"",
        ));
    }
    for part in root.split('/') {
        if part.is_empty()
            || !part.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
        {
            return Err(invalid(
                "use POOL or POOL/PATH with letters, digits, '_', '-', '.' and ':'",
            ));
        }
    }
    Ok(())
}

/// Property values of several datasets, from `zfs get -H -p -o name,property,value`.
type Props = HashMap<String, HashMap<String, String>>;

fn parse_props(out: &str) -> Props {
    let mut props: Props = HashMap::new();
    for line in out.lines() {
        let mut cols = line.splitn(3, '\t');
        if let (Some(name), Some(prop), Some(value)) = (cols.next(), cols.next(), cols.next()) {
            props
                .entry(name.to_string())
                .or_default()
                .insert(prop.to_string(), value.to_string());
        }
    }
    props
}

/// `refquota=BYTES`, or `refquota=none` for no limit (zfs refuses 0).
fn refquota_arg(limit: Option<u64>) -> String {
    format!(
        "refquota={}",
        limit.map_or("none".to_string(), |l| l.to_string())
    )
}

fn parse_u64(v: Option<&String>) -> Option<u64> {
    v.and_then(|v| v.parse().ok())
}

impl ZfsBackend {
    /// Opens the backend on `root` (`POOL` or `POOL/PATH`; the path is created if missing).
    ///
    /// Fails with [`DatasetError::ZfsNotInstalled`], [`DatasetError::ZfsDaemonNotRunning`] or
    /// [`DatasetError::PoolNotFound`] when the node cannot use zfs, so that flockd can say so at
    /// start. Removes datasets left half-created or half-received by a crash.
    pub fn open(root: &str) -> Result<Self, DatasetError> {
        check_root(root)?;
        let zfs = find_binary("zfs").ok_or(DatasetError::ZfsNotInstalled)?;
        let zpool = find_binary("zpool").ok_or(DatasetError::ZfsNotInstalled)?;
        let pool = root.split('/').next().unwrap_or(root).to_string();
        let backend = ZfsBackend {
            root: root.to_string(),
            pool: pool.clone(),
            zfs,
        };
        match run(&zpool, &["list", "-H", "-o", "name", &pool]) {
            Ok(_) => {}
            Err(f) if f.daemon_down() => return Err(DatasetError::ZfsDaemonNotRunning),
            Err(f) if f.has("no such pool") => return Err(DatasetError::PoolNotFound { pool }),
            Err(f) => return Err(f.into_error()),
        }
        if root != pool {
            match backend.zfs(&["list", "-H", "-o", "name", root]) {
                Ok(_) => {}
                Err(f) if f.missing() => {
                    backend
                        .zfs(&["create", "-p", root])
                        .map_err(Failure::into_error)?;
                }
                Err(f) => return Err(f.into_error()),
            }
        }
        let mountpoint = backend
            .zfs(&["get", "-H", "-o", "value", "mountpoint", root])
            .map_err(Failure::into_error)?;
        let mountpoint = mountpoint.trim();
        if !mountpoint.starts_with('/') {
            return Err(DatasetError::ZfsRootNotMounted {
                root: root.to_string(),
                mountpoint: mountpoint.to_string(),
            });
        }
        backend.recover()?;
        Ok(backend)
    }

    /// The root dataset this backend keeps its datasets under.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The pool.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    fn zfs(&self, args: &[&str]) -> Result<String, Failure> {
        // zfs-fuse 0.7 wedged (FUSE mounts stopped answering) when management commands ran
        // concurrently in our tests, never when they ran one at a time: serialize them, within
        // the process and across the processes of one machine (several flockd on one host, as
        // in tests and `flockd dev`). Streams (`zfs send`/`zfs receive`) run beside them.
        let _one_at_a_time = ZFS_COMMANDS.lock().unwrap_or_else(|e| e.into_inner());
        let _host_wide = HostLock::acquire();
        run(&self.zfs, args)
    }

    /// Runs a zfs command, retrying for a while as long as it fails with "busy".
    fn zfs_retry_busy(&self, args: &[&str]) -> Result<String, Failure> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match self.zfs(args) {
                Err(f) if f.busy() && start.elapsed() < BUSY_RETRY_FOR => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    fn container(&self, ds: &DatasetName) -> String {
        format!("{}/{}", self.root, ds)
    }

    fn data(&self, ds: &DatasetName) -> String {
        format!("{}/{}/data", self.root, ds)
    }

    fn restore_clone(&self, ds: &DatasetName) -> String {
        format!("{}/{}/{RESTORE_CHILD}", self.root, ds)
    }

    fn snap(&self, ds: &DatasetName, snap: &SnapshotName) -> String {
        format!("{}/{}/data@{}", self.root, ds, snap)
    }

    fn no_space(&self, ds: &DatasetName, limit: Option<u64>, stderr: &str) -> DatasetError {
        let what = match limit {
            Some(l) => format!("its size limit of {l} bytes or pool {} is full", self.pool),
            None => format!("pool {} is full", self.pool),
        };
        DatasetError::NoSpace {
            dataset: ds.to_string(),
            detail: format!(
                "{what} (zfs: {}); free space or raise the limit",
                stderr.trim()
            ),
        }
    }

    /// Removes datasets that a crash left `creating` or `receiving`.
    fn recover(&self) -> Result<(), DatasetError> {
        let out = self
            .zfs(&[
                "get",
                "-H",
                "-p",
                "-d",
                "1",
                "-o",
                "name,property,value",
                STATE_PROP,
                &self.root,
            ])
            .map_err(Failure::into_error)?;
        for (name, props) in parse_props(&out) {
            let unfinished = props
                .get(STATE_PROP)
                .is_some_and(|s| s == "creating" || s == "receiving");
            if name != self.root && unfinished {
                tracing::warn!(dataset = %name, "destroying a dataset left unfinished by a crash");
                self.zfs_retry_busy(&["destroy", "-r", &name])
                    .map_err(Failure::into_error)?;
            }
        }
        let props = self.props(None)?.unwrap_or_default();
        let prefix = format!("{}/", self.root);
        for name in props.keys() {
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            match rest.split_once('/') {
                Some((ds, RESTORE_CHILD)) if DatasetName::new(ds).is_ok() => {
                    tracing::warn!(clone = %name, "destroying a restore clone left by a crash");
                    self.zfs_retry_busy(&["destroy", "-r", name])
                        .map_err(Failure::into_error)?;
                }
                None => {
                    let Ok(ds) = DatasetName::new(rest) else {
                        continue;
                    };
                    if self.info_from(&ds, &props).is_none() {
                        continue;
                    }
                    // Not fatal: a dataset left in the old layout still works (info reads it,
                    // set_limit and the next receive retry the move).
                    if let Err(e) = self.settle_layout(&ds, &props) {
                        tracing::warn!(dataset = %ds, error = %e, "could not move the size limit to the refquota layout");
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Puts a ready dataset's limit on `data`'s refquota: moves an old layout's container
    /// quota there, and clears a temporary receive quota a crash left on the container.
    fn settle_layout(&self, ds: &DatasetName, props: &Props) -> Result<(), DatasetError> {
        let container = self.container(ds);
        let Some(c) = props.get(&container) else {
            return Ok(());
        };
        let quota = parse_u64(c.get("quota")).filter(|&q| q > 0);
        if c.get(LAYOUT_PROP).map(String::as_str) != Some(LAYOUT_REFQUOTA) {
            tracing::info!(dataset = %ds, "moving the size limit from the container's quota to the data's refquota");
            // In this order a crash midway leaves either layout whole: the limit is read from
            // the quota until the layout mark is set.
            if let Some(q) = quota {
                self.zfs(&["set", &format!("refquota={q}"), &self.data(ds)])
                    .map_err(Failure::into_error)?;
            }
            self.zfs(&[
                "set",
                &format!("{LAYOUT_PROP}={LAYOUT_REFQUOTA}"),
                &container,
            ])
            .map_err(Failure::into_error)?;
        } else if quota.is_none() {
            return Ok(());
        }
        self.zfs(&["set", "quota=none", &container])
            .map_err(Failure::into_error)?;
        Ok(())
    }

    /// Like [`Self::settle_layout`] for one dataset, reading its properties first.
    fn settle_layout_of(&self, ds: &DatasetName) -> Result<(), DatasetError> {
        match self.props(Some(ds))? {
            Some(props) => self.settle_layout(ds, &props),
            None => Err(DatasetError::NotFound {
                dataset: ds.to_string(),
            }),
        }
    }

    /// One numeric property of a zfs dataset or snapshot.
    fn get_u64(&self, name: &str, prop: &str) -> Result<u64, DatasetError> {
        let out = self
            .zfs(&["get", "-H", "-p", "-o", "value", prop, name])
            .map_err(Failure::into_error)?;
        out.trim().parse().map_err(|_| DatasetError::Zfs {
            command: format!("zfs get -H -p -o value {prop} {name}"),
            stderr: format!("expected a number of bytes, got {:?}", out.trim()),
        })
    }

    /// Properties of the containers and data file systems under the root (or of one dataset).
    fn props(&self, ds: Option<&DatasetName>) -> Result<Option<Props>, DatasetError> {
        let fields = [
            "used",
            "quota",
            "referenced",
            "refquota",
            STATE_PROP,
            LAYOUT_PROP,
            "mountpoint",
        ]
        .join(",");
        let out = match ds {
            Some(ds) => self.zfs(&[
                "get",
                "-H",
                "-p",
                "-o",
                "name,property,value",
                &fields,
                &self.container(ds),
                &self.data(ds),
            ]),
            None => self.zfs(&[
                "get",
                "-H",
                "-p",
                "-d",
                "2",
                "-o",
                "name,property,value",
                &fields,
                &self.root,
            ]),
        };
        match out {
            Ok(out) => Ok(Some(parse_props(&out))),
            Err(f) if f.missing() => Ok(None),
            Err(f) => Err(f.into_error()),
        }
    }

    fn info_from(&self, ds: &DatasetName, props: &Props) -> Option<DatasetInfo> {
        let container = props.get(&self.container(ds))?;
        let data = props.get(&self.data(ds))?;
        if container.get(STATE_PROP).map(String::as_str) != Some("ready") {
            return None;
        }
        let limit = if container.get(LAYOUT_PROP).map(String::as_str) == Some(LAYOUT_REFQUOTA) {
            parse_u64(data.get("refquota"))
        } else {
            // The old layout: the limit was the container's quota.
            parse_u64(container.get("quota"))
        };
        Some(DatasetInfo {
            name: ds.clone(),
            used_bytes: parse_u64(container.get("used")).unwrap_or(0),
            // Unreadable, it counts as all the dataset uses (never as "nothing").
            referenced_bytes: parse_u64(data.get("referenced"))
                .or_else(|| parse_u64(container.get("used")))
                .unwrap_or(0),
            limit: limit.filter(|&q| q > 0),
            mount_path: PathBuf::from(data.get("mountpoint").cloned().unwrap_or_default()),
        })
    }

    fn require(&self, ds: &DatasetName) -> Result<DatasetInfo, DatasetError> {
        self.info(ds)?.ok_or_else(|| DatasetError::NotFound {
            dataset: ds.to_string(),
        })
    }

    fn snapshot_infos(&self, ds: &DatasetName) -> Result<Vec<SnapshotInfo>, DatasetError> {
        let data = self.data(ds);
        let not_found = || DatasetError::NotFound {
            dataset: ds.to_string(),
        };
        // `zfs list` gives the order (creation txg); `zfs get -p` the exact values.
        let order = match self.zfs(&[
            "list", "-H", "-t", "snapshot", "-o", "name", "-d", "1", &data,
        ]) {
            Ok(out) => out,
            Err(f) if f.missing() => return Err(not_found()),
            Err(f) => return Err(f.into_error()),
        };
        let values = match self.zfs(&[
            "get",
            "-H",
            "-p",
            "-d",
            "1",
            "-o",
            "name,property,value",
            "guid,creation",
            &data,
        ]) {
            Ok(out) => parse_props(&out),
            Err(f) if f.missing() => return Err(not_found()),
            Err(f) => return Err(f.into_error()),
        };
        let prefix = format!("{data}@");
        let mut out = Vec::new();
        for full in order.lines() {
            let Some(name) = full.strip_prefix(&prefix) else {
                continue;
            };
            let Ok(name) = SnapshotName::new(name) else {
                tracing::warn!(
                    snapshot = full,
                    "ignoring a snapshot with a name flock does not use"
                );
                continue;
            };
            let props = values.get(full);
            out.push(SnapshotInfo {
                name,
                guid: parse_u64(props.and_then(|p| p.get("guid"))).unwrap_or(0),
                created_unix: parse_u64(props.and_then(|p| p.get("creation"))).unwrap_or(0),
            });
        }
        Ok(out)
    }

    fn find_snapshot(
        &self,
        ds: &DatasetName,
        snaps: &[SnapshotInfo],
        name: &SnapshotName,
    ) -> Result<usize, DatasetError> {
        snaps
            .iter()
            .position(|s| &s.name == name)
            .ok_or_else(|| DatasetError::SnapshotNotFound {
                dataset: ds.to_string(),
                snapshot: name.to_string(),
            })
    }

    /// Drops zfs-fuse's cached view of `data` after its contents changed underneath it.
    fn remount(&self, ds: &DatasetName) {
        let data = self.data(ds);
        match self.zfs_retry_busy(&["umount", &data]) {
            Ok(_) => {
                // Right after an unmount zfs-fuse may still call the mountpoint busy.
                if let Err(f) = self.zfs_retry_busy(&["mount", &data]) {
                    tracing::warn!(dataset = %ds, error = %f.stderr, "remount failed");
                }
            }
            Err(f) => {
                tracing::warn!(dataset = %ds, error = %f.stderr, "could not remount after receive; the mount may show stale data until it is remounted");
            }
        }
    }

    fn destroy_quietly(&self, name: &str) {
        if let Err(f) = self.zfs_retry_busy(&["destroy", "-r", name]) {
            if !f.missing() {
                tracing::error!(dataset = name, error = %f.stderr, "could not clean up after a failed receive");
            }
        }
    }

    /// Feeds `stream` to `zfs receive args...`; see [`Backend::receive`] for the contract.
    fn pump_receive(
        &self,
        spec: &StreamSpec,
        limit: Option<u64>,
        from_guid: u64,
        args: &[&str],
        stream: &mut dyn Read,
    ) -> Result<(), ReceiveFailure> {
        let ds = &spec.dataset;
        let stream_err = |source: StreamError| DatasetError::Stream {
            dataset: ds.to_string(),
            source,
        };
        let mut begin = vec![0u8; BEGIN_LEN];
        let got = read_full(stream, &mut begin)
            .map_err(|e| ReceiveFailure::before(stream_err(StreamError::from_io(e, 0))))?;
        if got < BEGIN_LEN {
            return Err(ReceiveFailure::before(stream_err(StreamError::Truncated {
                offset: got as u64,
            })));
        }
        check_begin(&begin, from_guid, &spec.target)
            .map_err(|e| ReceiveFailure::before(stream_err(e)))?;

        let command = format!("zfs {}", args.join(" "));
        let mut child = Command::new(&self.zfs)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ReceiveFailure::before(DatasetError::io("run", &self.zfs, e)))?;
        let stderr = collect_stderr(&mut child);
        let mut input_error = None;
        let mut offset = got as u64;
        if let Some(mut stdin) = child.stdin.take() {
            let mut buf = vec![0u8; 256 << 10];
            let mut pending: &[u8] = &begin;
            loop {
                if !pending.is_empty() {
                    // zfs stops reading when it fails (or finishes): stop writing then.
                    if stdin.write_all(pending).is_err() {
                        break;
                    }
                }
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        offset += n as u64;
                        pending = &buf[..n];
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => pending = &[],
                    Err(e) => {
                        input_error = Some(StreamError::from_io(e, offset));
                        break;
                    }
                }
            }
            // Closing stdin before zfs saw its end record makes it fail and roll back.
        }
        let status = child
            .wait()
            .map_err(|e| ReceiveFailure::before(DatasetError::io("wait for", &self.zfs, e)))?;
        let stderr = stderr.join().unwrap_or_default();
        if let Some(e) = input_error {
            return Err(ReceiveFailure {
                error: stream_err(e),
                maybe_committed: status.success(),
            });
        }
        if !status.success() {
            let f = Failure { command, stderr };
            let error = if f.no_space() {
                self.no_space(ds, limit, &f.stderr)
            } else if f.has("invalid") || f.has("checksum") || f.has("does not match") {
                stream_err(StreamError::Corrupt {
                    offset,
                    detail: format!("zfs receive: {}", f.stderr.trim()),
                })
            } else {
                f.into_error()
            };
            return Err(ReceiveFailure::before(error));
        }
        // zfs stopped at its end record; whatever follows must be nothing.
        let mut probe = [0u8; 1];
        loop {
            match stream.read(&mut probe) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(ReceiveFailure {
                        error: stream_err(StreamError::Corrupt {
                            offset,
                            detail: "data after the end of the zfs stream".into(),
                        }),
                        maybe_committed: true,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(ReceiveFailure {
                        error: stream_err(StreamError::from_io(e, offset)),
                        maybe_committed: true,
                    })
                }
            }
        }
    }
}

struct ReceiveFailure {
    error: DatasetError,
    /// zfs committed the snapshot before the rest of the input failed: undo it.
    maybe_committed: bool,
}

impl ReceiveFailure {
    fn before(error: DatasetError) -> Self {
        ReceiveFailure {
            error,
            maybe_committed: false,
        }
    }
}

/// Checks a zfs stream's BEGIN record: a zfs stream, from the expected base, of the expected
/// snapshot name.
fn check_begin(rec: &[u8], from_guid: u64, target: &SnapshotName) -> Result<(), StreamError> {
    let u64_at = |i: usize, le: bool| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&rec[i..i + 8]);
        if le {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    };
    let le = if u64_at(8, true) == DMU_BACKUP_MAGIC {
        true
    } else if u64_at(8, false) == DMU_BACKUP_MAGIC {
        false
    } else {
        return Err(StreamError::BadMagic { format: "zfs" });
    };
    let stream_from = u64_at(48, le);
    if stream_from != from_guid {
        return Err(StreamError::Unexpected(if from_guid == 0 {
            "an incremental zfs stream where a full stream was expected".into()
        } else if stream_from == 0 {
            "a full zfs stream where an incremental stream was expected".into()
        } else {
            format!(
                "the zfs stream starts from snapshot guid {stream_from}, the receiver's latest is {from_guid}"
            )
        }));
    }
    let name_bytes = &rec[56..BEGIN_LEN];
    let end = name_bytes
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name_bytes.len());
    let toname = String::from_utf8_lossy(&name_bytes[..end]);
    let snap = toname.rsplit_once('@').map(|(_, s)| s).unwrap_or("");
    if snap != target.as_str() {
        return Err(StreamError::Unexpected(format!(
            "the zfs stream creates {toname}, expected a snapshot named {target}"
        )));
    }
    Ok(())
}

fn collect_stderr(child: &mut Child) -> JoinHandle<String> {
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s);
        }
        s
    })
}

fn run(bin: &Path, args: &[&str]) -> Result<String, Failure> {
    let command = format!(
        "{} {}",
        bin.file_name()
            .map_or("zfs".into(), |n| n.to_string_lossy()),
        args.join(" ")
    );
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Failure {
            command: command.clone(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err(Failure { command, stderr })
    }
}

/// `zfs send`'s stdout; an error at the end if zfs send failed.
struct ZfsSendReader {
    child: Child,
    stdout: ChildStdout,
    stderr: Option<JoinHandle<String>>,
    finished: bool,
}

impl Read for ZfsSendReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.finished {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        self.finished = true;
        let status = self.child.wait()?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if status.success() {
            Ok(0)
        } else {
            Err(io::Error::other(format!(
                "zfs send failed ({status}): {}",
                stderr.trim()
            )))
        }
    }
}

impl Drop for ZfsSendReader {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Backend for ZfsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Zfs
    }

    fn create(&self, ds: &DatasetName, limit: Option<u64>) -> Result<DatasetInfo, DatasetError> {
        let container = self.create_container(ds, None, limit, "creating")?;
        let ready = format!("{STATE_PROP}=ready");
        let refquota = refquota_arg(limit);
        let finish = self
            .zfs(&["create", "-o", &refquota, &self.data(ds)])
            .and_then(|_| self.zfs(&["set", &ready, &container]));
        if let Err(f) = finish {
            self.destroy_quietly(&container);
            return Err(if f.no_space() {
                self.no_space(ds, limit, &f.stderr)
            } else {
                f.into_error()
            });
        }
        self.require(ds)
    }

    fn destroy(&self, ds: &DatasetName) -> Result<(), DatasetError> {
        match self.zfs_retry_busy(&["destroy", "-r", &self.container(ds)]) {
            Ok(_) => Ok(()),
            Err(f) if f.missing() => Err(DatasetError::NotFound {
                dataset: ds.to_string(),
            }),
            Err(f) => Err(f.into_error()),
        }
    }

    fn info(&self, ds: &DatasetName) -> Result<Option<DatasetInfo>, DatasetError> {
        Ok(self.props(Some(ds))?.and_then(|p| self.info_from(ds, &p)))
    }

    fn list(&self) -> Result<Vec<DatasetInfo>, DatasetError> {
        let props = self.props(None)?.unwrap_or_default();
        let prefix = format!("{}/", self.root);
        let mut out: Vec<DatasetInfo> = props
            .keys()
            .filter_map(|name| name.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/') && !rest.contains('@'))
            .filter_map(|rest| DatasetName::new(rest).ok())
            .filter_map(|ds| self.info_from(&ds, &props))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn snapshot(
        &self,
        ds: &DatasetName,
        snapshot: &SnapshotName,
    ) -> Result<SnapshotInfo, DatasetError> {
        self.require(ds)?;
        match self.zfs(&["snapshot", &self.snap(ds, snapshot)]) {
            Ok(_) => {}
            Err(f) if f.exists() => {
                return Err(DatasetError::SnapshotExists {
                    dataset: ds.to_string(),
                    snapshot: snapshot.to_string(),
                })
            }
            Err(f) if f.missing() => {
                return Err(DatasetError::NotFound {
                    dataset: ds.to_string(),
                })
            }
            Err(f) if f.no_space() => return Err(self.no_space(ds, None, &f.stderr)),
            Err(f) => return Err(f.into_error()),
        }
        let snaps = self.snapshot_infos(ds)?;
        let i = self.find_snapshot(ds, &snaps, snapshot)?;
        Ok(snaps[i].clone())
    }

    fn snapshots(&self, ds: &DatasetName) -> Result<Vec<SnapshotInfo>, DatasetError> {
        self.require(ds)?;
        self.snapshot_infos(ds)
    }

    fn destroy_snapshot(
        &self,
        ds: &DatasetName,
        snapshot: &SnapshotName,
    ) -> Result<(), DatasetError> {
        self.require(ds)?;
        match self.zfs_retry_busy(&["destroy", &self.snap(ds, snapshot)]) {
            Ok(_) => Ok(()),
            Err(f) if f.missing() => Err(DatasetError::SnapshotNotFound {
                dataset: ds.to_string(),
                snapshot: snapshot.to_string(),
            }),
            Err(f) => Err(f.into_error()),
        }
    }

    fn rollback(&self, ds: &DatasetName, snapshot: &SnapshotName) -> Result<(), DatasetError> {
        self.require(ds)?;
        let snaps = self.snapshot_infos(ds)?;
        self.find_snapshot(ds, &snaps, snapshot)?;
        self.zfs_retry_busy(&["rollback", "-r", &self.snap(ds, snapshot)])
            .map_err(Failure::into_error)?;
        self.remount(ds);
        Ok(())
    }

    fn restore(&self, ds: &DatasetName, snapshot: &SnapshotName) -> Result<(), DatasetError> {
        // `zfs rollback` would destroy the later snapshots, and zfs-fuse serves no
        // `.zfs/snapshot`: clone the snapshot, sync the clone's tree into the live mount, drop
        // the clone.
        self.require(ds)?;
        let snaps = self.snapshot_infos(ds)?;
        self.find_snapshot(ds, &snaps, snapshot)?;
        let live = self.mount_path(ds)?;
        let clone = self.restore_clone(ds);
        self.destroy_quietly(&clone);
        self.zfs(&[
            "clone",
            "-o",
            "readonly=on",
            &self.snap(ds, snapshot),
            &clone,
        ])
        .map_err(Failure::into_error)?;
        let synced = (|| {
            let mounted = self
                .zfs(&["get", "-H", "-o", "value", "mounted", &clone])
                .map_err(Failure::into_error)?;
            if mounted.trim() != "yes" {
                self.zfs_retry_busy(&["mount", &clone])
                    .map_err(Failure::into_error)?;
            }
            let from = self
                .zfs(&["get", "-H", "-o", "value", "mountpoint", &clone])
                .map_err(Failure::into_error)?;
            let from = PathBuf::from(from.trim());
            if !from.is_absolute() {
                return Err(DatasetError::Zfs {
                    command: format!("zfs get mountpoint {clone}"),
                    stderr: format!("the restore clone has no mount path ({})", from.display()),
                });
            }
            crate::dir::tree::sync_to(&from, &live, crate::dir::tree::Keep::SameContent)
        })();
        let dropped = self
            .zfs_retry_busy(&["destroy", "-r", &clone])
            .map_err(Failure::into_error);
        match synced {
            Err(DatasetError::Io { ref source, .. }) if crate::dir::tree::is_full(source) => {
                Err(self.no_space(ds, None, &source.to_string()))
            }
            Err(e) => Err(e),
            Ok(()) => dropped.map(|_| ()),
        }
    }

    fn set_limit(&self, ds: &DatasetName, limit: Option<u64>) -> Result<(), DatasetError> {
        self.require(ds)?;
        self.settle_layout_of(ds)?;
        let data = self.data(ds);
        let below = |used: u64, limit: u64| DatasetError::LimitBelowUse {
            dataset: ds.to_string(),
            limit,
            used,
        };
        if let Some(limit) = limit {
            let used = self.get_u64(&data, "referenced")?;
            if limit < used {
                return Err(below(used, limit));
            }
        }
        let refquota = refquota_arg(limit);
        match self.zfs(&["set", &refquota, &data]) {
            Ok(_) => Ok(()),
            // The data grew between the check and the set.
            Err(f) if f.below_use() => {
                let used = self.get_u64(&data, "referenced")?;
                Err(below(used, limit.unwrap_or(0)))
            }
            Err(f) => Err(f.into_error()),
        }
    }

    fn space_sharing(&self) -> Result<SpaceSharing, DatasetError> {
        Ok(SpaceSharing::CopyOnWrite)
    }

    fn mount_path(&self, ds: &DatasetName) -> Result<PathBuf, DatasetError> {
        let info = self.require(ds)?;
        let data = self.data(ds);
        let mounted = self
            .zfs(&["get", "-H", "-o", "value", "mounted", &data])
            .map_err(Failure::into_error)?;
        if mounted.trim() != "yes" {
            self.zfs_retry_busy(&["mount", &data])
                .map_err(Failure::into_error)?;
        }
        Ok(info.mount_path)
    }

    fn send(&self, spec: &StreamSpec) -> Result<SendStream, DatasetError> {
        let ds = &spec.dataset;
        self.require(ds)?;
        let snaps = self.snapshot_infos(ds)?;
        let t = self.find_snapshot(ds, &snaps, &spec.target)?;
        let target = self.snap(ds, &spec.target);
        let mut args = vec!["send".to_string()];
        if let Some(base) = &spec.base {
            let b = self.find_snapshot(ds, &snaps, base)?;
            if b >= t {
                return Err(DatasetError::BaseMismatch {
                    dataset: ds.to_string(),
                    base: base.to_string(),
                    latest: format!("{} (the base must be older than the target)", spec.target),
                });
            }
            args.push("-i".into());
            args.push(self.snap(ds, base));
        }
        args.push(target.clone());
        let size_hint = match spec.base {
            None => self
                .zfs(&["get", "-H", "-p", "-o", "value", "referenced", &target])
                .ok()
                .and_then(|v| v.trim().parse().ok()),
            Some(_) => None,
        };
        let mut child = Command::new(&self.zfs)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| DatasetError::io("run", &self.zfs, e))?;
        let stderr = collect_stderr(&mut child);
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(DatasetError::io(
                "read output of",
                &self.zfs,
                io::Error::other("no stdout pipe"),
            ));
        };
        let reader = ZfsSendReader {
            child,
            stdout,
            stderr: Some(stderr),
            finished: false,
        };
        Ok(SendStream::new(Box::new(reader), size_hint))
    }

    fn receive(
        &self,
        spec: &StreamSpec,
        limit: Option<u64>,
        stream: &mut dyn Read,
    ) -> Result<SnapshotInfo, DatasetError> {
        let ds = &spec.dataset;
        let target = self.snap(ds, &spec.target);
        match &spec.base {
            None => {
                // The container's quota bounds the receive; a full stream makes one snapshot,
                // so it counts the data once.
                let container = self.create_container(ds, limit, limit, "receiving")?;
                if let Err(failure) =
                    self.pump_receive(spec, limit, 0, &["receive", &target], stream)
                {
                    // A failed full receive leaves no dataset behind.
                    self.destroy_quietly(&container);
                    return Err(failure.error);
                }
                // The limit moves to the data's refquota, then the dataset is ready.
                let refquota = refquota_arg(limit);
                let ready = format!("{STATE_PROP}=ready");
                let finish = self
                    .zfs(&["set", &refquota, &self.data(ds)])
                    .and_then(|_| self.zfs(&["set", "quota=none", &container]))
                    .and_then(|_| self.zfs(&["set", &ready, &container]));
                if let Err(f) = finish {
                    self.destroy_quietly(&container);
                    return Err(if f.below_use() || f.no_space() {
                        self.no_space(ds, limit, &f.stderr)
                    } else {
                        f.into_error()
                    });
                }
            }
            Some(base) => {
                self.require(ds)?;
                self.settle_layout_of(ds)?;
                let info = self.require(ds)?;
                let snaps = self.snapshot_infos(ds)?;
                let Some(latest) = snaps.last().filter(|s| &s.name == base) else {
                    return Err(DatasetError::BaseMismatch {
                        dataset: ds.to_string(),
                        base: base.to_string(),
                        latest: snaps.last().map_or("none".into(), |s| s.name.to_string()),
                    });
                };
                if snaps.iter().any(|s| s.name == spec.target) {
                    return Err(DatasetError::SnapshotExists {
                        dataset: ds.to_string(),
                        snapshot: spec.target.to_string(),
                    });
                }
                // A snapshot within the limit adds at most `limit` bytes of new blocks: bound
                // the receive by that (plus room for metadata), check exactly afterwards.
                let container = self.container(ds);
                if let Some(limit) = info.limit {
                    let used = self.get_u64(&container, "used")?;
                    let bound = used
                        .saturating_add(limit)
                        .saturating_add(limit / 32 + (1 << 20));
                    self.zfs(&["set", &format!("quota={bound}"), &container])
                        .map_err(Failure::into_error)?;
                }
                let mut result = self.pump_receive(
                    spec,
                    info.limit,
                    latest.guid,
                    &["receive", "-F", &target],
                    stream,
                );
                if info.limit.is_some() {
                    if let Err(f) = self.zfs(&["set", "quota=none", &container]) {
                        // Cleared at the next open; until then it only bounds the dataset more.
                        tracing::error!(dataset = %ds, error = %f.stderr, "could not clear the temporary receive quota");
                    }
                }
                if let (Ok(()), Some(limit)) = (&result, info.limit) {
                    let referenced = self.get_u64(&self.snap(ds, &spec.target), "referenced")?;
                    if referenced > limit {
                        result = Err(ReceiveFailure {
                            error: DatasetError::NoSpace {
                                dataset: ds.to_string(),
                                detail: format!(
                                    "snapshot {} holds {referenced} bytes of data, more than \
                                     the dataset's size limit of {limit} bytes; raise the limit",
                                    spec.target
                                ),
                            },
                            maybe_committed: true,
                        });
                    }
                }
                if let Err(failure) = result {
                    if failure.maybe_committed {
                        // Back to exactly the last good snapshot.
                        if let Err(f) =
                            self.zfs_retry_busy(&["rollback", "-r", &self.snap(ds, base)])
                        {
                            tracing::error!(dataset = %ds, error = %f.stderr, "could not undo a rejected receive");
                        }
                    }
                    self.remount(ds);
                    return Err(failure.error);
                }
                self.remount(ds);
            }
        }
        let snaps = self.snapshot_infos(ds)?;
        let i = self.find_snapshot(ds, &snaps, &spec.target)?;
        Ok(snaps[i].clone())
    }
}

impl ZfsBackend {
    /// Creates the dataset's container (`ROOT/NAME`, not mounted, the refquota layout) in
    /// `state`, with `quota` (to bound a full receive; `limit` is for messages); returns its
    /// zfs name.
    fn create_container(
        &self,
        ds: &DatasetName,
        quota: Option<u64>,
        limit: Option<u64>,
        state: &str,
    ) -> Result<String, DatasetError> {
        let container = self.container(ds);
        let quota = format!(
            "quota={}",
            quota.map_or("none".to_string(), |l| l.to_string())
        );
        let state = format!("{STATE_PROP}={state}");
        let layout = format!("{LAYOUT_PROP}={LAYOUT_REFQUOTA}");
        match self.zfs(&[
            "create",
            "-o",
            "canmount=off",
            "-o",
            &quota,
            "-o",
            &state,
            "-o",
            &layout,
            &container,
        ]) {
            Ok(_) => Ok(container),
            Err(f) if f.exists() => Err(DatasetError::AlreadyExists {
                dataset: ds.to_string(),
            }),
            Err(f) if f.no_space() => Err(self.no_space(ds, limit, &f.stderr)),
            Err(f) => Err(f.into_error()),
        }
    }
}
