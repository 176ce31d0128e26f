//! Fixtures for the conformance suite: fresh backends ("nodes") on their own storage, and small
//! ones that fill up, for `dir` (temp dirs, tmpfs) and `zfs` (file-backed pools under zfs-fuse).
//! Everything is torn down on drop, panics included.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flock_dataset::frame::{write_framed, StreamHeader, DEFAULT_FRAME_LEN};
use flock_dataset::transfer::{receive_framed, send_framed, Received};
use flock_dataset::{
    Backend, DatasetError, DatasetName, DirBackend, SnapshotName, StreamSpec, ZfsBackend,
};

pub const MIB: u64 = 1 << 20;

/// Where backends for one test come from; each `node` is a separate backend on separate storage.
pub trait Fixture {
    /// A fresh, empty backend, as on another node.
    fn node(&mut self) -> Arc<dyn Backend>;
    /// A fresh backend on storage of about `mib` MiB, to fill up.
    fn small_node(&mut self, mib: u64) -> Arc<dyn Backend>;
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique() -> usize {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------------
// dir

pub struct DirFixture {
    mounts: Vec<PathBuf>,
    tmp: tempfile::TempDir,
}

impl DirFixture {
    pub fn new() -> Self {
        DirFixture {
            mounts: Vec::new(),
            tmp: tempfile::tempdir().expect("create a temp dir"),
        }
    }
}

impl Fixture for DirFixture {
    fn node(&mut self) -> Arc<dyn Backend> {
        let root = self.tmp.path().join(format!("node{}", unique()));
        Arc::new(DirBackend::open(root).expect("open dir backend"))
    }

    fn small_node(&mut self, mib: u64) -> Arc<dyn Backend> {
        let mnt = self.tmp.path().join(format!("small{}", unique()));
        fs::create_dir(&mnt).expect("create mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&mnt)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the dir backend's disk-full test mounts a {mib} MiB tmpfs and needs root \
             (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounts.push(mnt.clone());
        Arc::new(DirBackend::open(mnt.join("root")).expect("open dir backend on tmpfs"))
    }
}

impl Drop for DirFixture {
    fn drop(&mut self) {
        for m in self.mounts.drain(..) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// zfs

const POOL_PREFIX: &str = "flkt";

/// A file-backed pool, destroyed on drop.
struct Pool {
    name: String,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("zpool")
                .args(["destroy", "-f", &self.name])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "could not destroy test pool {}; run `zpool destroy -f {}`",
            self.name, self.name
        );
    }
}

pub struct ZfsFixture {
    // Pools go before the temp dir holding their files, and the lock last (fields drop in order).
    pools: Vec<Pool>,
    tmp: tempfile::TempDir,
    _serial: SerialLock,
}

/// Holds an exclusive `flock` so that zfs tests run one at a time across test processes:
/// zfs-fuse 0.7 wedged when two tests drove it at once (and one at a time is no slower).
struct SerialLock(fs::File);

impl SerialLock {
    fn acquire() -> Self {
        use std::os::fd::AsRawFd;
        let path = std::env::temp_dir().join("flock-dataset-zfs-tests.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: a valid open descriptor; the lock is released when the file is closed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        SerialLock(file)
    }
}

fn require_zfs() {
    let have = |bin: &str| {
        ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(bin).is_file())
    };
    assert!(
        have("zfs") && have("zpool"),
        "zfs is not installed: run `apt-get install -y zfs-fuse` and start the daemon with \
         `/usr/sbin/zfs-fuse` (./test.sh does both). The zfs conformance tests do not skip."
    );
    let out = Command::new("zpool")
        .args(["list", "-H", "-o", "name"])
        .output()
        .expect("run zpool");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || !text.contains("daemon"),
        "the zfs-fuse daemon is not running: start it with `/usr/sbin/zfs-fuse` \
         (./test.sh does). zpool said: {text}"
    );
    // Pools left by a test process that died without cleaning up.
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(pid) = name
            .strip_prefix(POOL_PREFIX)
            .and_then(|rest| rest.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("zpool").args(["destroy", "-f", name]).status();
        }
    }
}

impl ZfsFixture {
    pub fn new() -> Self {
        let serial = SerialLock::acquire();
        require_zfs();
        ZfsFixture {
            pools: Vec::new(),
            tmp: tempfile::tempdir().expect("create a temp dir"),
            _serial: serial,
        }
    }

    fn pool(&mut self, mib: u64) -> String {
        let name = format!("{POOL_PREFIX}{}x{}", std::process::id(), unique());
        let file = self.tmp.path().join(format!("{name}.img"));
        let f = fs::File::create(&file).expect("create pool file");
        f.set_len(mib * MIB).expect("size pool file (sparse)");
        drop(f);
        let mnt = self.tmp.path().join(format!("{name}.mnt"));
        let out = Command::new("zpool")
            .args(["create", "-m"])
            .arg(&mnt)
            .arg(&name)
            .arg(&file)
            .output()
            .expect("run zpool create");
        assert!(
            out.status.success(),
            "zpool create {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.pools.push(Pool { name: name.clone() });
        name
    }
}

impl ZfsFixture {
    /// The zfs root of the latest [`Fixture::node`].
    pub fn last_root(&self) -> String {
        let pool = self.pools.last().expect("a node was made");
        format!("{}/flock", pool.name)
    }
}

impl Fixture for ZfsFixture {
    fn node(&mut self) -> Arc<dyn Backend> {
        let pool = self.pool(256);
        Arc::new(ZfsBackend::open(&format!("{pool}/flock")).expect("open zfs backend"))
    }

    fn small_node(&mut self, mib: u64) -> Arc<dyn Backend> {
        let pool = self.pool(mib);
        Arc::new(ZfsBackend::open(&pool).expect("open zfs backend"))
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

pub fn ds(name: &str) -> DatasetName {
    DatasetName::new(name).expect("valid dataset name")
}

pub fn snap(name: &str) -> SnapshotName {
    SnapshotName::new(name).expect("valid snapshot name")
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough for zfs.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).expect("create parent");
    }
    fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

pub fn set_mtime(path: &Path, secs: u64) {
    let t = SystemTime::UNIX_EPOCH + Duration::new(secs, 123_456_789);
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.set_modified(t)
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A rich tree: sizes from empty to > 1 MiB, nested and empty directories, modes, symlinks
/// (relative and dangling), fixed mtimes.
pub fn populate(root: &Path) {
    write(root, "empty.txt", b"");
    write(root, "hello.txt", b"hello, flock\n");
    write(root, "big.bin", &noise(MIB as usize + 17, 1));
    write(root, "a/b/c/deep.txt", b"deep\n");
    write(root, "secret.key", b"k3y");
    chmod(&root.join("secret.key"), 0o600);
    write(root, "bin/run.sh", b"#!/bin/sh\necho hi\n");
    chmod(&root.join("bin/run.sh"), 0o755);
    fs::create_dir_all(root.join("empty-dir")).expect("mkdir");
    fs::create_dir_all(root.join("private")).expect("mkdir");
    write(root, "private/note", b"mine");
    std::os::unix::fs::symlink("a/b/c/deep.txt", root.join("link")).expect("symlink");
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).expect("symlink");
    for (rel, t) in [
        ("hello.txt", 1_600_000_000),
        ("big.bin", 1_600_000_100),
        ("a/b/c/deep.txt", 1_500_000_000),
    ] {
        set_mtime(&root.join(rel), t);
    }
    chmod(&root.join("private"), 0o700);
    // Directories last: creating entries changes their mtime.
    for (rel, t) in [
        ("a/b/c", 1_400_000_000),
        ("a/b", 1_400_000_001),
        ("empty-dir", 1_400_000_002),
    ] {
        set_mtime(&root.join(rel), t);
    }
}

/// What a tree holds, for comparison: kind, content hash or link target, mode, owner, mtime.
pub type Manifest = BTreeMap<PathBuf, String>;

pub fn manifest(root: &Path) -> Manifest {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = if rel.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let md =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        let what = if md.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&path)
                .expect("read dir")
                .map(|e| e.expect("dir entry").file_name())
                .collect();
            names.sort();
            for n in names {
                stack.push(rel.join(n));
            }
            "dir".to_string()
        } else if md.is_symlink() {
            format!(
                "symlink -> {}",
                fs::read_link(&path).expect("readlink").display()
            )
        } else {
            let data = fs::read(&path).expect("read file");
            format!("file {} bytes {}", data.len(), blake3::hash(&data).to_hex())
        };
        // The root directory's own mtime is left out: a zfs mount root and a dir live tree
        // root both change it on every entry created, which the two backends do at different
        // moments of a receive; every other directory's mtime is compared.
        let mtime = if rel.as_os_str().is_empty() {
            String::new()
        } else {
            format!("{}.{:09}", md.mtime(), md.mtime_nsec())
        };
        let mode = if md.is_symlink() {
            0
        } else {
            md.mode() & 0o7777
        };
        out.insert(
            rel,
            format!(
                "{what} mode {mode:o} owner {}:{} mtime {mtime}",
                md.uid(),
                md.gid()
            ),
        );
    }
    out
}

#[track_caller]
pub fn assert_same(a: &Manifest, b: &Manifest) {
    if a != b {
        let mut diff = String::new();
        for (k, v) in a {
            match b.get(k) {
                Some(w) if w == v => {}
                Some(w) => diff += &format!("  {}: {v}\n   vs {w}\n", k.display()),
                None => diff += &format!("  {}: only in the first\n", k.display()),
            }
        }
        for k in b.keys().filter(|k| !a.contains_key(*k)) {
            diff += &format!("  {}: only in the second\n", k.display());
        }
        panic!("trees differ:\n{diff}");
    }
}

/// The framed stream of `spec` as bytes.
pub fn framed(backend: &dyn Backend, spec: &StreamSpec) -> Vec<u8> {
    let mut out = Vec::new();
    send_framed(backend, spec, &mut out, &mut |_| {}).expect("send");
    out
}

/// The framed stream of `spec` with the header's size limit replaced.
pub fn framed_with_limit(backend: &dyn Backend, spec: &StreamSpec, limit: Option<u64>) -> Vec<u8> {
    let mut raw = backend.send(spec).expect("send");
    let header = StreamHeader {
        kind: backend.kind(),
        spec: spec.clone(),
        limit,
        size_hint: raw.size_hint(),
    };
    let mut out = Vec::new();
    write_framed(&header, &mut raw, &mut out, DEFAULT_FRAME_LEN, &mut |_| {}).expect("frame");
    out
}

pub fn receive(backend: &dyn Backend, bytes: &[u8]) -> Result<Received, DatasetError> {
    let mut src = bytes;
    receive_framed(backend, &mut src, &mut |_| Ok(()))
}

/// Offsets of every record boundary of a framed stream (header end, each frame's prefix and
/// payload end, the trailer start), from the documented format.
pub fn frame_boundaries(bytes: &[u8]) -> Vec<usize> {
    let body = u32::from_be_bytes(bytes[10..14].try_into().expect("4 bytes")) as usize;
    let mut pos = 14 + body + 32;
    let mut out = vec![0, pos];
    while pos < bytes.len() && bytes[pos] == b'D' {
        let len = u32::from_be_bytes(bytes[pos + 1..pos + 5].try_into().expect("4 bytes")) as usize;
        out.push(pos + 5);
        pos += 5 + len;
        out.push(pos);
    }
    out.push(bytes.len() - 32);
    out.dedup();
    out
}

pub fn snapshot_names(backend: &dyn Backend, d: &DatasetName) -> Vec<String> {
    backend
        .snapshots(d)
        .expect("list snapshots")
        .into_iter()
        .map(|s| s.name.to_string())
        .collect()
}

pub fn dataset_names(backend: &dyn Backend) -> Vec<String> {
    backend
        .list()
        .expect("list datasets")
        .into_iter()
        .map(|i| i.name.to_string())
        .collect()
}
