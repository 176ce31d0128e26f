//! Backups of the replicated state: the file `flockctl cluster backup` writes, and what
//! `flockd init --restore` brings back from it.
//!
//! The file is one line of JSON, the [`BackupHeader`], then the state as a Raft snapshot's
//! data ([`flock_raft::state_machine::encode_cluster`]: its own format byte, then postcard), so
//! a later flockd reads an older backup as it reads an older snapshot. The header says the
//! state's length and SHA-256: a truncated or damaged file is refused, never half-restored.
//!
//! [`RestorePlan::of`] is what a restore proposes (pure): the key-value namespace, revoked
//! admin labels, and the apps without a dataset with their stacks' secrets; and what it leaves
//! out, by name.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use flock_scheduler::config::PlannedApp;
use flock_scheduler::ClusterState;

/// The backup file format this build writes and reads.
pub const BACKUP_FORMAT: u32 = 1;

/// The most bytes the header line may take before its newline.
const MAX_HEADER: usize = 64 * 1024;

/// The first line of a backup file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    /// [`BACKUP_FORMAT`] when written by this build.
    pub format: u32,
    pub cluster_id: String,
    /// The last log entry applied to the state copied, and its term.
    pub applied_index: u64,
    pub applied_term: u64,
    /// When the state was read (RFC 3339, UTC, on the serving node's clock).
    pub time: String,
    /// The flock version of the node that read it.
    pub flock_version: String,
    /// The node that read it.
    pub node: String,
    /// The state's length in bytes and its SHA-256 (hex).
    pub state_bytes: u64,
    pub state_sha256: String,
}

/// Why a backup file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path} is not a flock backup (its first line is not a backup header: {reason}); give a file `flockctl cluster backup` wrote")]
    NotABackup { path: String, reason: String },
    #[error("{path} is a backup of format {found}, newer than this flockd reads ({BACKUP_FORMAT}); restore it with a newer flockd")]
    TooNew { path: String, found: u64 },
    #[error("{path} is damaged: {reason}; refusing to restore from it (take another backup, or use an intact copy)")]
    Damaged { path: String, reason: String },
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The whole file: `header` (its length and checksum filled in from `state`), a newline, and
/// `state`.
pub fn encode_file(mut header: BackupHeader, state: &[u8]) -> Vec<u8> {
    header.format = BACKUP_FORMAT;
    header.state_bytes = state.len() as u64;
    header.state_sha256 = sha256_hex(state);
    let mut out = serde_json::to_vec(&header).expect("a header is plain data");
    out.push(b'\n');
    out.extend_from_slice(state);
    out
}

/// Reads a backup file's bytes (`path` names it in errors): its header and the state.
pub fn decode_file(path: &str, bytes: &[u8]) -> Result<(BackupHeader, ClusterState), BackupError> {
    let not_a_backup = |reason: String| BackupError::NotABackup {
        path: path.to_string(),
        reason,
    };
    let damaged = |reason: String| BackupError::Damaged {
        path: path.to_string(),
        reason,
    };
    let end = bytes
        .iter()
        .take(MAX_HEADER)
        .position(|b| *b == b'\n')
        .ok_or_else(|| not_a_backup("no header line".into()))?;
    let line: serde_json::Value = serde_json::from_slice(&bytes[..end])
        .map_err(|e| not_a_backup(format!("not JSON: {e}")))?;
    let format = line
        .get("format")
        .and_then(|f| f.as_u64())
        .ok_or_else(|| not_a_backup("no format".into()))?;
    if format > u64::from(BACKUP_FORMAT) {
        return Err(BackupError::TooNew {
            path: path.to_string(),
            found: format,
        });
    }
    let header: BackupHeader =
        serde_json::from_value(line).map_err(|e| damaged(format!("its header: {e}")))?;
    let state = &bytes[end + 1..];
    if state.len() as u64 != header.state_bytes {
        return Err(damaged(format!(
            "the header says {} bytes of state, the file holds {}",
            header.state_bytes,
            state.len()
        )));
    }
    if sha256_hex(state) != header.state_sha256 {
        return Err(damaged("the state's SHA-256 is not the header's".into()));
    }
    let cluster = flock_raft::state_machine::decode_cluster(state)
        .map_err(|e| damaged(format!("the state does not decode: {e}")))?;
    Ok((header, cluster))
}

/// One deploy a restore proposes: a stack's apps without a dataset (or the apps outside
/// stacks), with the stack's secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredDeploy {
    pub stack: Option<String>,
    pub apps: BTreeMap<String, PlannedApp>,
    pub secrets: BTreeMap<String, Vec<u8>>,
}

/// What `flockd init --restore` proposes after `InitCluster`, as ordinary commands, and what it
/// leaves out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestorePlan {
    /// Keys and values (revisions restart in the new cluster).
    pub kv: Vec<(String, String)>,
    /// Admin labels revoked in the old cluster, revoked again.
    pub revoked_admins: Vec<String>,
    pub deploys: Vec<RestoredDeploy>,
    /// Not restored: apps with a volume (their data is on the old nodes' disks).
    pub stateful_apps: Vec<String>,
    /// Not restored: datasets (with or without an app).
    pub datasets: Vec<String>,
    /// Not restored: the old nodes.
    pub nodes: Vec<String>,
    /// Apps pinned to an old node, restored unpinned.
    pub unpinned: Vec<String>,
    /// Restored apps that depend on an app not restored: (app, dependency); they wait for it.
    pub waiting: Vec<(String, String)>,
    /// Revoked labels left out: the new admin config's own (it would lock the operator out).
    pub kept_labels: Vec<String>,
}

impl RestorePlan {
    /// What to restore of `state` into a new cluster whose admin config is labelled
    /// `admin_label`.
    pub fn of(state: &ClusterState, admin_label: &str) -> RestorePlan {
        let mut plan = RestorePlan {
            kv: state
                .kv
                .iter()
                .map(|(k, e)| (k.clone(), e.value.clone()))
                .collect(),
            ..RestorePlan::default()
        };
        for label in &state.revoked_admins {
            if label == admin_label {
                plan.kept_labels.push(label.clone());
            } else {
                plan.revoked_admins.push(label.clone());
            }
        }
        let stateful: BTreeSet<&String> = state
            .apps
            .iter()
            .filter(|(_, a)| a.spec.volume.is_some() || a.dataset.is_some())
            .map(|(n, _)| n)
            .collect();
        plan.stateful_apps = stateful.iter().map(|n| n.to_string()).collect();
        plan.datasets = state.datasets.values().map(|d| d.name.clone()).collect();
        plan.nodes = state.nodes.values().map(|n| n.name.clone()).collect();
        let stacks: BTreeSet<Option<String>> = state
            .apps
            .values()
            .map(|a| a.spec.stack.clone())
            .chain(state.secrets.values().map(|s| s.stack.clone()))
            .collect();
        for stack in stacks {
            let mut apps = BTreeMap::new();
            for (name, app) in state
                .apps
                .iter()
                .filter(|(n, a)| a.spec.stack == stack && !stateful.contains(n))
            {
                let mut planned = app.planned();
                if planned.node.take().is_some() {
                    plan.unpinned.push(name.clone());
                }
                for d in &app.spec.depends_on {
                    if stateful.contains(&d.app) {
                        plan.waiting.push((name.clone(), d.app.clone()));
                    }
                }
                apps.insert(name.clone(), planned);
            }
            let secrets: BTreeMap<String, Vec<u8>> = state
                .secrets
                .iter()
                .filter(|(_, s)| s.stack == stack)
                .map(|(n, s)| (n.clone(), s.data.clone()))
                .collect();
            if !apps.is_empty() {
                plan.deploys.push(RestoredDeploy {
                    stack,
                    apps,
                    secrets,
                });
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_scheduler::{Command, CommandResult};

    fn header() -> BackupHeader {
        BackupHeader {
            format: 0,
            cluster_id: "c1".into(),
            applied_index: 7,
            applied_term: 2,
            time: "2026-12-05T23:00:00Z".into(),
            flock_version: "0.1.0".into(),
            node: "n1".into(),
            state_bytes: 0,
            state_sha256: String::new(),
        }
    }

    fn spec(name: &str, stack: Option<&str>, volume: bool) -> PlannedApp {
        use flock_scheduler::config::{AppSpec, Volume};
        let spec = AppSpec {
            name: name.into(),
            command: Some(vec!["/bin/true".into()]),
            stack: stack.map(str::to_string),
            volume: volume.then(|| Volume {
                mountpoint: "/data".into(),
                maximum_size: None,
                dataset: None,
            }),
            ..AppSpec::default()
        };
        PlannedApp { spec, node: None }
    }

    /// A state with keys, a revoked label, apps in and out of a stack (one stateful each), a
    /// secret and a dataset.
    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        let mut web = spec("web", None, false);
        web.node = Some(1);
        web.spec.depends_on = vec![flock_scheduler::config::Dependency {
            app: "db".into(),
            healthy: false,
        }];
        let cmds = [
            Command::InitCluster {
                cluster_id: "c1".into(),
                join_secret: "sha256:00".into(),
                node_id: 1,
                name: "n1".into(),
                addr: "127.0.0.1:1".into(),
            },
            Command::KvPut {
                key: "a".into(),
                value: "1".into(),
            },
            Command::KvPut {
                key: "b".into(),
                value: "2".into(),
            },
            Command::RevokeAdmin {
                label: "alice".into(),
            },
            Command::RevokeAdmin {
                label: "admin".into(),
            },
            Command::deploy_all(BTreeMap::from([
                ("web".into(), web),
                ("db".into(), spec("db", None, true)),
            ])),
            Command::Deploy {
                stack: Some("s".into()),
                apps: BTreeMap::from([
                    ("s_api".into(), spec("s_api", Some("s"), false)),
                    ("s_pg".into(), spec("s_pg", Some("s"), true)),
                ]),
                secrets: BTreeMap::from([("s_pw".into(), b"hunter2".to_vec())]),
            },
        ];
        for c in cmds {
            let r = s.apply(&c);
            assert!(!matches!(r, CommandResult::Rejected(_)), "{c:?}: {r:?}");
        }
        s
    }

    #[test]
    fn a_backup_file_roundtrips_and_damage_is_refused() {
        let s = state();
        let state_bytes = flock_raft::state_machine::encode_cluster(&s);
        let file = encode_file(header(), &state_bytes);
        let (h, back) = decode_file("b.flock", &file).unwrap();
        assert_eq!(
            (h.format, h.applied_index, h.cluster_id.as_str()),
            (1, 7, "c1")
        );
        assert_eq!(h.state_bytes, state_bytes.len() as u64);
        assert_eq!(back, s);
        let first = file.iter().position(|b| *b == b'\n').unwrap();
        // Truncated, a flipped byte, a newer format, not a backup at all.
        let e = decode_file("b.flock", &file[..file.len() - 1]).unwrap_err();
        assert!(matches!(e, BackupError::Damaged { .. }), "{e}");
        assert!(e.to_string().contains("b.flock"), "{e}");
        let mut flipped = file.clone();
        flipped[first + 10] ^= 1;
        let e = decode_file("b.flock", &flipped).unwrap_err();
        assert!(e.to_string().contains("SHA-256"), "{e}");
        let newer = String::from_utf8(file[..first].to_vec())
            .unwrap()
            .replace("\"format\":1", "\"format\":2");
        let e = decode_file("b.flock", &[newer.as_bytes(), &file[first..]].concat()).unwrap_err();
        assert!(matches!(e, BackupError::TooNew { found: 2, .. }), "{e}");
        let e = decode_file("x.yml", b"version: 1\napplications: {}\n").unwrap_err();
        assert!(matches!(e, BackupError::NotABackup { .. }), "{e}");
        assert!(decode_file("empty", b"").is_err());
    }

    #[test]
    fn a_restore_brings_back_keys_labels_and_stateless_apps_and_names_the_rest() {
        let p = RestorePlan::of(&state(), "admin");
        assert_eq!(
            p.kv,
            [("a".to_string(), "1".to_string()), ("b".into(), "2".into())]
        );
        assert_eq!(p.revoked_admins, ["alice"]);
        assert_eq!(p.kept_labels, ["admin"]);
        assert_eq!(p.stateful_apps, ["db", "s_pg"]);
        assert_eq!(p.datasets.len(), 2);
        assert_eq!(p.nodes, ["n1"]);
        assert_eq!(p.unpinned, ["web"]);
        assert_eq!(p.waiting, [("web".to_string(), "db".to_string())]);
        assert_eq!(p.deploys.len(), 2);
        let outside = &p.deploys[0];
        assert_eq!(outside.stack, None);
        assert_eq!(outside.apps.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(outside.apps["web"].node, None);
        assert!(outside.secrets.is_empty());
        let s = &p.deploys[1];
        assert_eq!(s.stack.as_deref(), Some("s"));
        assert_eq!(s.apps.keys().collect::<Vec<_>>(), ["s_api"]);
        assert_eq!(s.secrets["s_pw"], b"hunter2");
        // Each deploy keeps to the limits a deploy is checked against, and applies to a new
        // cluster.
        let mut fresh = ClusterState::default();
        fresh.apply(&Command::InitCluster {
            cluster_id: "c2".into(),
            join_secret: "sha256:00".into(),
            node_id: 1,
            name: "n1".into(),
            addr: "127.0.0.1:2".into(),
        });
        for d in &p.deploys {
            let cmd = Command::Deploy {
                stack: d.stack.clone(),
                apps: d.apps.clone(),
                secrets: d.secrets.clone(),
            };
            cmd.check_limits().unwrap();
            let r = fresh.apply(&cmd);
            assert!(matches!(r, CommandResult::Deployed { .. }), "{r:?}");
        }
        assert_eq!(fresh.apps.len(), 2);
        assert!(fresh.datasets.is_empty());
    }
}
