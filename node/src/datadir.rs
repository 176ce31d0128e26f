//! A node's data directory: its identity (`identity.json`) and its Raft store (`raft.redb`).
//!
//! A data dir is never overwritten: `init` and `join` want an empty or new directory, `run`
//! wants one that holds an identity, and a store that disagrees with its identity is refused.
//!
//! It is private to flockd's user: the directory is 0700 and everything flockd writes in it is
//! 0600 (directories 0700), whatever the umask flockd was started with ([`restrict_umask`]);
//! `flockd run` tightens what it finds looser ([`DataDir::tighten`]), except applications'
//! data (dataset trees, an app's work dir), whose modes belong to the application.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use flock_scheduler::NodeId;

/// The identity format this build writes.
pub const IDENTITY_FORMAT: u32 = 1;
const IDENTITY_FILE: &str = "identity.json";
const STORE_FILE: &str = "raft.redb";

/// Who this node is, written once when it is created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: u32,
    pub cluster_id: String,
    pub node_id: NodeId,
    pub name: String,
    /// Address the node binds.
    pub listen: String,
    /// Address other nodes and flockctl reach it on.
    pub advertise: String,
    /// For the first node: whether the cluster's first command has been committed. A node that
    /// crashed during `flockd init` finishes the bootstrap on `flockd run`.
    #[serde(default)]
    pub bootstrapped: bool,
}

/// Why a data dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{dir} already holds node {name} of cluster {cluster_id}; restart it with `flockd run --data-dir {dir}`, or choose an empty directory")]
    AlreadyMember {
        dir: String,
        name: String,
        cluster_id: String,
    },
    #[error("{dir} is not empty and holds no flock identity ({found} found); choose an empty or new directory")]
    NotEmpty { dir: String, found: String },
    #[error("{dir} is not a flock data dir (no {IDENTITY_FILE}); create a node with `flockd init` or `flockd join`")]
    NoIdentity { dir: String },
    #[error("{path} is damaged: {reason}; refusing to start (restore it from a backup, or remove the node and join again)")]
    Corrupt { path: String, reason: String },
    #[error("{path} was written by a newer flock (format {found}); upgrade flockd")]
    TooNew { path: String, found: u32 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The umask flockd was started with, before [`restrict_umask`] (`u32::MAX`: not changed).
static ORIGINAL_UMASK: AtomicU32 = AtomicU32::new(u32::MAX);

/// Makes everything this process creates from now on private to its user (umask 077),
/// whatever umask it was started with. Processes flockd starts for apps get the original umask
/// back ([`original_umask`]).
pub fn restrict_umask() {
    // SAFETY: umask only replaces the process's file mode creation mask.
    let old = unsafe { libc::umask(0o077) };
    // Keep the first original: a second call would see 077.
    let _ =
        ORIGINAL_UMASK.compare_exchange(u32::MAX, old as u32, Ordering::SeqCst, Ordering::SeqCst);
}

/// The umask flockd was started with, if [`restrict_umask`] changed it.
pub fn original_umask() -> Option<libc::mode_t> {
    match ORIGINAL_UMASK.load(Ordering::SeqCst) {
        u32::MAX => None,
        m => Some(m as libc::mode_t),
    }
}

/// The one writer of private files (0600, atomic); it lives in flock-tls so that the client
/// crate writes its config the same way.
pub use flock_tls::pki::write_private_atomic;

/// Creates `path` and its missing parents as 0700 directories, whatever the umask.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Makes `path` (a file flockd wrote) 0600 or stricter.
pub fn make_private(path: &Path) -> Result<(), DataDirError> {
    let mode = fs::symlink_metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o700))
            .map_err(io_err(path))?;
    }
    Ok(())
}

/// One mode `DataDir::tighten` changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tightened {
    pub path: PathBuf,
    pub from: u32,
    pub to: u32,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A node's data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The admin client config `flockd init` writes (what `flockctl --config` reads).
    pub fn admin_config_path(&self) -> PathBuf {
        self.root.join("admin.conf")
    }

    pub fn store_path(&self) -> PathBuf {
        self.root.join(STORE_FILE)
    }

    fn identity_path(&self) -> PathBuf {
        self.root.join(IDENTITY_FILE)
    }

    /// Makes sure the directory can hold a new node: it is created if missing and must be empty.
    pub fn prepare_new(&self) -> Result<(), DataDirError> {
        if let Ok(id) = self.load_identity() {
            return Err(DataDirError::AlreadyMember {
                dir: self.root.display().to_string(),
                name: id.name,
                cluster_id: id.cluster_id,
            });
        }
        create_private_dir(&self.root).map_err(io_err(&self.root))?;
        // An empty directory made by someone else may be open to others.
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(io_err(&self.root))?;
        let mut entries = fs::read_dir(&self.root).map_err(io_err(&self.root))?;
        if let Some(first) = entries.next() {
            let first = first.map_err(io_err(&self.root))?;
            return Err(DataDirError::NotEmpty {
                dir: self.root.display().to_string(),
                found: first.file_name().to_string_lossy().into_owned(),
            });
        }
        Ok(())
    }

    /// Reads the identity of an existing node.
    pub fn load_identity(&self) -> Result<Identity, DataDirError> {
        let path = self.identity_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataDirError::NoIdentity {
                    dir: self.root.display().to_string(),
                })
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let id: Identity = serde_json::from_str(&text).map_err(|e| DataDirError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if id.format > IDENTITY_FORMAT {
            return Err(DataDirError::TooNew {
                path: path.display().to_string(),
                found: id.format,
            });
        }
        Ok(id)
    }

    /// Writes the identity atomically: a temp file, fsync, rename, fsync of the directory.
    pub fn save_identity(&self, id: &Identity) -> Result<(), DataDirError> {
        let path = self.identity_path();
        let text = serde_json::to_string_pretty(id).expect("identity serializes");
        write_private_atomic(&path, text.as_bytes()).map_err(io_err(&path))?;
        fs::File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.root))?;
        Ok(())
    }

    /// Takes group and other permissions away from everything in the data dir that flockd
    /// wrote (the directory itself included; symlinks are not followed), and returns what it
    /// changed. Left alone: applications' data ([`holds_app_data`]), and private keys in
    /// `tls/`, which `flockd run` refuses rather than fixes when others could read them (they
    /// may have been read: replace the node, or chmod 600 them knowing that).
    pub fn tighten(&self) -> Result<Vec<Tightened>, DataDirError> {
        let mut changed = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let path = if rel.as_os_str().is_empty() {
                self.root.clone()
            } else {
                self.root.join(&rel)
            };
            let md = match fs::symlink_metadata(&path) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            let ft = md.file_type();
            if ft.is_symlink() || holds_app_data(&rel) || is_tls_key(&rel) {
                continue;
            }
            let mode = md.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                let to = mode & 0o700;
                fs::set_permissions(&path, fs::Permissions::from_mode(to))
                    .map_err(io_err(&path))?;
                changed.push(Tightened {
                    path: path.clone(),
                    from: mode,
                    to,
                });
            }
            if ft.is_dir() {
                for entry in fs::read_dir(&path).map_err(io_err(&path))? {
                    let entry = entry.map_err(io_err(&path))?;
                    stack.push(rel.join(entry.file_name()));
                }
            }
        }
        Ok(changed)
    }
}

/// True if `rel` (relative to a data dir) is an application's data: inside the `dir`
/// backend's datasets (see `DirBackend::holds_app_data`), or a process-driver app's work dir.
pub fn holds_app_data(rel: &Path) -> bool {
    let mut parts = rel.components().map(|c| c.as_os_str());
    match parts.next() {
        Some(top) if top == "storage" => {
            let below: PathBuf = parts.collect();
            flock_dataset::DirBackend::holds_app_data(&below)
        }
        Some(top) if top == "apps" => {
            let _app = parts.next();
            parts.next().is_some_and(|w| w == "work")
        }
        _ => false,
    }
}

/// A private key in `tls/` (`*.key`).
fn is_tls_key(rel: &Path) -> bool {
    let mut parts = rel.components().map(|c| c.as_os_str());
    parts.next().is_some_and(|t| t == "tls")
        && parts
            .next()
            .is_some_and(|n| n.to_string_lossy().ends_with(".key"))
        && parts.next().is_none()
}

/// A log line's worth of what [`DataDir::tighten`] changed below `root`: at most 32 paths
/// (relative to `root`, sorted), and how many more.
pub fn describe_tightened(root: &Path, changed: &[Tightened]) -> String {
    let mut all: Vec<String> = changed
        .iter()
        .map(|t| {
            let rel = t.path.strip_prefix(root).unwrap_or(&t.path);
            let shown = if rel.as_os_str().is_empty() {
                Path::new(".")
            } else {
                rel
            };
            format!("{} {:04o}->{:04o}", shown.display(), t.from, t.to)
        })
        .collect();
    all.sort();
    let more = all.len().saturating_sub(32);
    all.truncate(32);
    if more > 0 {
        all.push(format!("and {more} more"));
    }
    all.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            format: IDENTITY_FORMAT,
            cluster_id: "c0ffee".into(),
            node_id: 1,
            name: "n1".into(),
            listen: "127.0.0.1:7801".into(),
            advertise: "127.0.0.1:7801".into(),
            bootstrapped: true,
        }
    }

    #[test]
    fn new_dir_must_be_empty_and_member_dir_is_never_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("node"));
        dd.prepare_new().unwrap();
        dd.save_identity(&identity()).unwrap();
        assert_eq!(dd.load_identity().unwrap(), identity());
        let e = dd.prepare_new().unwrap_err().to_string();
        assert!(e.contains("already holds node n1 of cluster c0ffee"), "{e}");

        let other = DataDir::new(tmp.path().join("other"));
        fs::create_dir_all(other.root()).unwrap();
        fs::write(other.root().join("notes.txt"), "x").unwrap();
        let e = other.prepare_new().unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("notes.txt"), "{e}");
    }

    #[test]
    fn damaged_or_missing_identity_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path());
        assert!(matches!(
            dd.load_identity(),
            Err(DataDirError::NoIdentity { .. })
        ));
        fs::write(tmp.path().join(IDENTITY_FILE), "{ not json").unwrap();
        let e = dd.load_identity().unwrap_err();
        assert!(matches!(e, DataDirError::Corrupt { .. }), "{e}");
        let mut newer = identity();
        newer.format = IDENTITY_FORMAT + 1;
        fs::write(
            tmp.path().join(IDENTITY_FILE),
            serde_json::to_string(&newer).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            dd.load_identity(),
            Err(DataDirError::TooNew { .. })
        ));
    }
}
