//! A node's data directory: its identity (`identity.json`) and its Raft store (`raft.redb`).
//!
//! A data dir is never overwritten: `init` and `join` want an empty or new directory, `run`
//! wants one that holds an identity, and a store that disagrees with its identity is refused.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

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
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
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
        let tmp = self.root.join(format!("{IDENTITY_FILE}.tmp"));
        let text = serde_json::to_string_pretty(id).expect("identity serializes");
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        fs::File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.root))?;
        Ok(())
    }
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
