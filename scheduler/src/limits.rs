//! Every size limit of flock's replicated state and config files, in one place, and the check
//! that a [`Command`] keeps to them before it is proposed.
//!
//! A command is checked twice: [`Command::check_limits`] before it is proposed (on the node the
//! client reached and again on the leader), so an oversized command never reaches the Raft log,
//! and [`crate::ClusterState::apply`] re-checks what it always checked (deterministically, so
//! every replica agrees). The limits that only [`Command::check_limits`] knows (environment,
//! command line, spec, encoded size...) are deliberately not added to `apply`: entries that an
//! older build let into a log must replay as they applied then.
//!
//! [`shown`] is how an error quotes user input: a bounded prefix and the length, never the whole
//! text (errors travel in gRPC status headers, which are small).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{AppSpec, PlannedApp};
use crate::state::{ApplyError, Command};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// The largest single command a proposal may carry, postcard-encoded with its version byte
/// (what one Raft log entry holds). The leader's batches of concurrent proposals keep to it too.
pub const MAX_COMMAND_BYTES: usize = 4 * MIB;

/// The longest key of the key-value namespace, in bytes.
pub const MAX_KEY_LEN: usize = KIB;
/// The largest value of the key-value namespace, in bytes (as etcd's default request limit).
pub const MAX_VALUE_LEN: usize = 1536 * KIB;

/// The longest node name (and admin certificate label), in bytes.
pub const MAX_NAME_LEN: usize = 63;
/// The longest dataset name, in bytes (the backend name adds `.ID`).
pub const MAX_DATASET_NAME_LEN: usize = 40;
/// The longest snapshot name, in bytes.
pub const MAX_SNAPSHOT_NAME_LEN: usize = 64;
/// The longest app name: an app's volume is a dataset named after the app, so app names obey
/// the dataset name limit.
pub const MAX_APP_NAME_LEN: usize = MAX_DATASET_NAME_LEN;
/// The longest Docker mount id a volume mount records, in bytes.
pub const MAX_MOUNT_ID_LEN: usize = 128;
/// The longest node address (`HOST:PORT`), in bytes: a DNS name is at most 253 bytes; the rest
/// leaves room for a bracketed IPv6 address with a zone and the port.
pub const MAX_ADDR_LEN: usize = 300;
/// The longest cluster id, in bytes (flockd makes 32 hex digits).
pub const MAX_CLUSTER_ID_LEN: usize = 256;
/// The longest join secret, in bytes (flockd makes 32 hex digits).
pub const MAX_SECRET_LEN: usize = 256;

/// The most snapshots one [`Command::PruneSnapshots`] forgets (a pruner proposes in chunks).
pub const MAX_PRUNE_NAMES: usize = 1000;
/// The longest reason a [`Command::HoldDataset`] shows, in bytes.
pub const MAX_HOLD_REASON_LEN: usize = 256;

/// The longest node label key and value, in bytes.
pub const MAX_LABEL_LEN: usize = 63;
/// The most labels one node may carry.
pub const MAX_LABELS: usize = 64;

/// The largest environment variable of an app, `NAME=value`, in bytes (Linux's limit on one
/// argument or variable, `MAX_ARG_STRLEN`).
pub const MAX_ENV_VAR_BYTES: usize = 128 * KIB;
/// The largest environment of one app, all `NAME=value` together, in bytes (half of Linux's
/// default `ARG_MAX`, which holds arguments and environment together).
pub const MAX_ENV_TOTAL_BYTES: usize = MIB;
/// The largest argument of an app's command line, in bytes (`MAX_ARG_STRLEN`).
pub const MAX_ARG_BYTES: usize = 128 * KIB;
/// The largest command line of one app, all arguments together, in bytes.
pub const MAX_COMMAND_LINE_BYTES: usize = MIB;
/// The longest of an app's other strings (image, mountpoint, link alias, constraint), in bytes.
pub const MAX_FIELD_LEN: usize = 4 * KIB;
/// The largest app spec, encoded, in bytes.
pub const MAX_APP_SPEC_BYTES: usize = 2 * MIB + 64 * KIB;
/// The most apps one deploy may name (a deploy carries the whole application configuration),
/// and the most apps of a cluster, all stacks together.
pub const MAX_DEPLOY_APPS: usize = 1000;
/// The most instances of one app (`deploy.replicas`, `flockctl app scale`).
pub const MAX_INSTANCES: usize = 1000;
/// The most entries of one of an app's lists (labels, ulimits, secrets, mounts, exposed ports,
/// dependencies, entrypoint and healthcheck arguments).
pub const MAX_APP_LIST_LEN: usize = 1024;
/// The largest secret or config of a stack, in bytes (Docker swarm's limit).
pub const MAX_SECRET_BYTES: usize = 500 * KIB;
/// The most secrets one deploy may carry.
pub const MAX_DEPLOY_SECRETS: usize = 256;
/// The longest secret name (`STACK_NAME`), in bytes.
pub const MAX_SECRET_NAME_LEN: usize = 128;
/// All secrets of a cluster together, in bytes: they live in every node's memory.
pub const MAX_SECRETS_TOTAL_BYTES: usize = 64 * MIB;

/// The largest config file (`application.yml`, `deployment.yml`, a compose file) flockctl
/// reads, in bytes: twice a deploy's largest command, which is plenty for any real
/// configuration and keeps the parser's work small.
pub const MAX_CONFIG_FILE_BYTES: usize = 2 * MAX_COMMAND_BYTES;
/// The most bytes a config document may expand to through YAML aliases and anchors (each copy
/// of an aliased node counts again), against "billion laughs" bombs of long scalars.
pub const MAX_CONFIG_EXPANDED_BYTES: usize = 4 * MAX_CONFIG_FILE_BYTES;

/// One page of `KvList`: at most this many entries...
pub const KV_LIST_PAGE_ENTRIES: usize = 10_000;
/// ...and at most this many bytes of keys and values (a page always holds at least one entry,
/// which fits: a key and a value are at most [`MAX_KEY_LEN`] + [`MAX_VALUE_LEN`]).
pub const KV_LIST_PAGE_BYTES: usize = 4 * MIB;

/// How many characters of user input an error quotes.
pub const SHOWN_CHARS: usize = 64;

/// User input as an error quotes it: the whole text quoted when it is short, else its first
/// [`SHOWN_CHARS`] characters quoted, `…` and its length in bytes: `"aaaa…"…(100000 bytes)`.
pub fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}…({} bytes)", &s[..cut], s.len()),
    }
}

/// The size of `value` as flock-raft's codec stores it: the version byte, then postcard.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    // postcard fails only on types serde cannot size; every type here is plain data.
    1 + postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .unwrap_or(usize::MAX - 1)
}

pub(crate) fn too_large(what: String, len: usize, max: usize) -> ApplyError {
    ApplyError::TooLarge { what, len, max }
}

/// `Err` when `s` is longer than `max` bytes, naming it as `what` with a bounded quote.
fn len_at_most(what: &str, s: &str, max: usize) -> Result<(), ApplyError> {
    if s.len() > max {
        return Err(too_large(format!("{what} {}", shown(s)), s.len(), max));
    }
    Ok(())
}

/// As [`len_at_most`], for a secret: named, never quoted.
fn secret_len(secret: &str) -> Result<(), ApplyError> {
    if secret.len() > MAX_SECRET_LEN {
        return Err(too_large(
            "the join secret".into(),
            secret.len(),
            MAX_SECRET_LEN,
        ));
    }
    Ok(())
}

fn key_len(key: &str) -> Result<(), ApplyError> {
    len_at_most("key", key, MAX_KEY_LEN)
}

fn value(key: &str, value: &str) -> Result<(), ApplyError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(ApplyError::ValueTooLarge {
            key: key.to_string(),
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

/// Checks node labels' count and sizes (their characters are `apply`'s business).
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApplyError> {
    if labels.len() > MAX_LABELS {
        return Err(too_large(
            "the number of node labels".into(),
            labels.len(),
            MAX_LABELS,
        ));
    }
    for (k, v) in labels {
        len_at_most("label key", k, MAX_LABEL_LEN)?;
        len_at_most(
            &format!("the value of label {}", shown(k)),
            v,
            MAX_LABEL_LEN,
        )?;
    }
    Ok(())
}

/// Checks one app's spec against every per-app limit: its name, environment, command line,
/// other fields and its encoded size.
pub fn check_app(name: &str, spec: &AppSpec) -> Result<(), ApplyError> {
    len_at_most("app name", name, MAX_APP_NAME_LEN)?;
    len_at_most("app name", &spec.name, MAX_APP_NAME_LEN)?;
    instances_at_most(name, spec.instance_count())?;
    let app = shown(name);
    let mut env_total = 0usize;
    for (k, v) in &spec.environment {
        let var = k.len() + 1 + v.len();
        if var > MAX_ENV_VAR_BYTES {
            return Err(too_large(
                format!("environment variable {} of app {app}", shown(k)),
                var,
                MAX_ENV_VAR_BYTES,
            ));
        }
        env_total += var;
    }
    if env_total > MAX_ENV_TOTAL_BYTES {
        return Err(too_large(
            format!("the environment of app {app}"),
            env_total,
            MAX_ENV_TOTAL_BYTES,
        ));
    }
    if let Some(cmd) = &spec.command {
        let mut total = 0usize;
        for (i, arg) in cmd.iter().enumerate() {
            len_at_most(
                &format!("argument {i} of app {app}'s command"),
                arg,
                MAX_ARG_BYTES,
            )?;
            total += arg.len() + 1;
        }
        if total > MAX_COMMAND_LINE_BYTES {
            return Err(too_large(
                format!("the command line of app {app}"),
                total,
                MAX_COMMAND_LINE_BYTES,
            ));
        }
    }
    if let Some(image) = &spec.image {
        len_at_most(&format!("the image of app {app}"), image, MAX_FIELD_LEN)?;
    }
    if let Some(v) = &spec.volume {
        len_at_most(
            &format!("the mountpoint of app {app}"),
            &v.mountpoint,
            MAX_FIELD_LEN,
        )?;
    }
    for l in &spec.links {
        len_at_most(
            &format!("a link alias of app {app}"),
            &l.alias,
            MAX_FIELD_LEN,
        )?;
    }
    for c in &spec.constraints {
        if let crate::config::ConstraintKey::Label(k) = &c.key {
            len_at_most(
                &format!("a constraint's label of app {app}"),
                k,
                MAX_FIELD_LEN,
            )?;
        }
        len_at_most(
            &format!("a constraint's value of app {app}"),
            &c.value,
            MAX_FIELD_LEN,
        )?;
    }
    let fields = [
        ("stack", spec.stack.as_deref()),
        ("service", spec.service.as_deref()),
        ("user", spec.user.as_deref()),
        ("working_dir", spec.working_dir.as_deref()),
        ("hostname", spec.hostname.as_deref()),
        ("stop_signal", spec.stop_signal.as_deref()),
    ];
    for (what, v) in fields {
        if let Some(v) = v {
            len_at_most(&format!("the {what} of app {app}"), v, MAX_FIELD_LEN)?;
        }
    }
    let lists = [
        ("entrypoint", spec.entrypoint.as_ref().map_or(0, Vec::len)),
        ("labels", spec.labels.len()),
        ("ulimits", spec.ulimits.len()),
        ("secrets", spec.secrets.len()),
        ("read-only mounts", spec.binds.len()),
        ("exposed ports", spec.expose.len()),
        ("dependencies", spec.depends_on.len()),
        (
            "healthcheck arguments",
            spec.healthcheck.as_ref().map_or(0, |h| h.test.len()),
        ),
    ];
    for (what, n) in lists {
        if n > MAX_APP_LIST_LEN {
            return Err(too_large(
                format!("the {what} of app {app}"),
                n,
                MAX_APP_LIST_LEN,
            ));
        }
    }
    let strings = spec
        .entrypoint
        .iter()
        .flatten()
        .chain(spec.labels.iter().flat_map(|(k, v)| [k, v]))
        .chain(spec.ulimits.iter().map(|u| &u.name))
        .chain(spec.secrets.iter().flat_map(|s| [&s.secret, &s.target]))
        .chain(spec.binds.iter().flat_map(|b| [&b.source, &b.target]))
        .chain(spec.depends_on.iter().map(|d| &d.app))
        .chain(spec.healthcheck.iter().flat_map(|h| &h.test));
    for v in strings {
        len_at_most(&format!("a field of app {app}"), v, MAX_ARG_BYTES)?;
    }
    // As the log and snapshots keep it: JSON ([`crate::json_field`]).
    let bytes = serde_json::to_vec(spec).map_or(usize::MAX, |v| v.len());
    if bytes > MAX_APP_SPEC_BYTES {
        return Err(too_large(
            format!("the spec of app {app}, encoded,"),
            bytes,
            MAX_APP_SPEC_BYTES,
        ));
    }
    Ok(())
}

fn instances_at_most(app: &str, n: u32) -> Result<(), ApplyError> {
    if n as usize > MAX_INSTANCES {
        return Err(too_large(
            format!("the number of instances of app {}", shown(app)),
            n as usize,
            MAX_INSTANCES,
        ));
    }
    Ok(())
}

fn deploy_len(n: usize) -> Result<(), ApplyError> {
    if n > MAX_DEPLOY_APPS {
        return Err(too_large(
            "the number of apps in the deploy".into(),
            n,
            MAX_DEPLOY_APPS,
        ));
    }
    Ok(())
}

fn check_deploy(apps: &BTreeMap<String, PlannedApp>) -> Result<(), ApplyError> {
    if apps.len() > MAX_DEPLOY_APPS {
        return Err(too_large(
            "the number of apps in the deploy".into(),
            apps.len(),
            MAX_DEPLOY_APPS,
        ));
    }
    for (name, app) in apps {
        check_app(name, &app.spec)?;
    }
    Ok(())
}

impl Command {
    /// Checks every field of the command against its size limit, and the whole command against
    /// [`MAX_COMMAND_BYTES`]; a pure function of the command, cheap (nothing big is copied).
    /// Call it before proposing: a command it refuses must never reach the log.
    pub fn check_limits(&self) -> Result<(), ApplyError> {
        self.check_fields()?;
        let bytes = encoded_len(self);
        if bytes > MAX_COMMAND_BYTES {
            return Err(too_large(
                "the command, encoded,".into(),
                bytes,
                MAX_COMMAND_BYTES,
            ));
        }
        Ok(())
    }

    fn check_fields(&self) -> Result<(), ApplyError> {
        match self {
            Command::InitCluster {
                cluster_id,
                join_secret,
                node_id: _,
                name,
                addr,
            } => {
                len_at_most("cluster id", cluster_id, MAX_CLUSTER_ID_LEN)?;
                secret_len(join_secret)?;
                len_at_most("node name", name, MAX_NAME_LEN)?;
                len_at_most("node address", addr, MAX_ADDR_LEN)
            }
            Command::RegisterNode { secret, name, addr } => {
                secret_len(secret)?;
                if let Some(name) = name {
                    len_at_most("node name", name, MAX_NAME_LEN)?;
                }
                len_at_most("node address", addr, MAX_ADDR_LEN)
            }
            Command::RotateJoinSecret { secret } => secret_len(secret),
            Command::RegisterNodeHashed {
                secret_hash,
                name,
                addr,
            } => {
                len_at_most("join secret hash", secret_hash, MAX_SECRET_LEN)?;
                if let Some(name) = name {
                    len_at_most("node name", name, MAX_NAME_LEN)?;
                }
                len_at_most("node address", addr, MAX_ADDR_LEN)
            }
            Command::SetJoinSecretHash { secret_hash } => {
                len_at_most("join secret hash", secret_hash, MAX_SECRET_LEN)
            }
            Command::RevokeAdmin { label } => len_at_most("admin label", label, MAX_NAME_LEN),
            Command::KvPut { key, value: v } => {
                key_len(key)?;
                value(key, v)
            }
            Command::KvCas {
                key,
                expect,
                value: v,
            } => {
                key_len(key)?;
                if let Some(e) = expect {
                    value(key, e)?;
                }
                value(key, v)
            }
            Command::KvDelete { key } => key_len(key),
            Command::Batch(cmds) => cmds.iter().try_for_each(Command::check_fields),
            Command::CreateDataset { name, .. } => {
                len_at_most("dataset name", name, MAX_DATASET_NAME_LEN)
            }
            Command::RecordSnapshot { snapshot, .. } => {
                len_at_most("snapshot name", &snapshot.name, MAX_SNAPSHOT_NAME_LEN)
            }
            Command::RollbackDataset { to, .. } => {
                len_at_most("snapshot name", to, MAX_SNAPSHOT_NAME_LEN)
            }
            Command::CommitDatasetMove { snapshot, .. } => {
                len_at_most("snapshot name", snapshot, MAX_SNAPSHOT_NAME_LEN)
            }
            // Only read from older logs, whose builds checked the rest.
            Command::DeployV1 { apps } => deploy_len(apps.len()),
            Command::DeployV2 { apps, .. } => deploy_len(apps.len()),
            Command::Deploy {
                stack,
                apps,
                secrets,
            } => {
                if let Some(s) = stack {
                    len_at_most("stack name", s, MAX_DATASET_NAME_LEN)?;
                }
                if secrets.len() > MAX_DEPLOY_SECRETS {
                    return Err(too_large(
                        "the number of secrets in the deploy".into(),
                        secrets.len(),
                        MAX_DEPLOY_SECRETS,
                    ));
                }
                for (name, data) in secrets {
                    len_at_most("secret name", name, MAX_SECRET_NAME_LEN)?;
                    if data.len() > MAX_SECRET_BYTES {
                        return Err(too_large(
                            format!("secret {}", shown(name)),
                            data.len(),
                            MAX_SECRET_BYTES,
                        ));
                    }
                }
                check_deploy(apps)
            }
            Command::MoveApp { app, .. }
            | Command::CancelAppMove { app }
            | Command::ReportHealth { app, .. } => len_at_most("app name", app, MAX_APP_NAME_LEN),
            Command::PlaceInstances { app, nodes } => {
                len_at_most("app name", app, MAX_APP_NAME_LEN)?;
                if nodes.len() > MAX_INSTANCES {
                    return Err(too_large(
                        "the list of nodes to place instances on".into(),
                        nodes.len(),
                        MAX_INSTANCES,
                    ));
                }
                Ok(())
            }
            Command::ReportNode { labels, .. } => labels.as_ref().map_or(Ok(()), check_labels),
            Command::MountVolume { id, .. } | Command::UnmountVolume { id, .. } => {
                len_at_most("mount id", id, MAX_MOUNT_ID_LEN)
            }
            Command::PruneSnapshots { names, .. } => {
                if names.len() > MAX_PRUNE_NAMES {
                    return Err(too_large(
                        "the list of snapshots to prune".into(),
                        names.len(),
                        MAX_PRUNE_NAMES,
                    ));
                }
                names
                    .iter()
                    .try_for_each(|n| len_at_most("snapshot name", n, MAX_SNAPSHOT_NAME_LEN))
            }
            Command::ReplicaHolds { snapshot, .. } => {
                len_at_most("snapshot name", snapshot, MAX_SNAPSHOT_NAME_LEN)
            }
            Command::HoldDataset { reason, .. } => {
                len_at_most("hold reason", reason, MAX_HOLD_REASON_LEN)
            }
            Command::KeepDiverged { snapshot, .. } => snapshot.as_ref().map_or(Ok(()), |n| {
                len_at_most("snapshot name", n, MAX_SNAPSHOT_NAME_LEN)
            }),
            Command::DropKept { snapshot, .. } => {
                len_at_most("snapshot name", snapshot, MAX_SNAPSHOT_NAME_LEN)
            }
            // Nothing but numbers.
            Command::DeclareNodeDown { .. }
            | Command::CondemnNode { .. }
            | Command::DrainNode { .. }
            | Command::NodeBackUp { .. }
            | Command::SetReplication { .. }
            | Command::AddReplica { .. }
            | Command::SetDatasetLimit { .. }
            | Command::SetRetention { .. }
            | Command::ReleaseDataset { .. }
            | Command::RemoveNode { .. }
            | Command::DeleteDataset { .. }
            | Command::BeginDatasetMove { .. }
            | Command::CancelDatasetMove { .. }
            | Command::HandoffDatasetMove { .. }
            | Command::ForgetMounts { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConstraintKey, Link, Volume};
    use crate::dataset::SnapshotRecord;
    use crate::fit::Capacity;

    fn long(n: usize) -> String {
        "x".repeat(n)
    }

    fn too_large(cmd: &Command) -> (String, usize, usize) {
        match cmd.check_limits() {
            Err(ApplyError::TooLarge { what, len, max }) => (what, len, max),
            other => panic!("{cmd:.80?}: expected TooLarge, got {other:?}"),
        }
    }

    fn app(env: &[(&str, usize)], cmd: Vec<String>) -> PlannedApp {
        let mut spec = crate::testutil::spec("web", Some(8080), true);
        spec.environment = env.iter().map(|(k, n)| (k.to_string(), long(*n))).collect();
        spec.command = Some(cmd);
        PlannedApp { spec, node: None }
    }

    fn deploy(apps: Vec<(String, PlannedApp)>) -> Command {
        Command::deploy_all(apps.into_iter().collect())
    }

    #[test]
    fn shown_is_bounded_and_says_the_length() {
        assert_eq!(shown("db"), "\"db\"");
        let s = shown(&long(100_000));
        assert!(s.len() < 100, "{s}");
        assert!(s.ends_with("…(100000 bytes)"), "{s}");
        // Cut on a character boundary.
        let s = shown(&"é".repeat(1000));
        assert!(s.contains("…(2000 bytes)"), "{s}");
        assert_eq!(
            shown(&long(SHOWN_CHARS)),
            format!("{:?}", long(SHOWN_CHARS))
        );
    }

    #[test]
    fn kv_commands() {
        let ok = Command::KvPut {
            key: long(MAX_KEY_LEN),
            value: long(MAX_VALUE_LEN),
        };
        assert_eq!(ok.check_limits(), Ok(()));
        let (what, len, max) = too_large(&Command::KvPut {
            key: long(100_000),
            value: "v".into(),
        });
        assert!(what.starts_with("key \"xxx") && what.len() < 100, "{what}");
        assert_eq!((len, max), (100_000, MAX_KEY_LEN));
        let big = long(1_600_000);
        for cmd in [
            Command::KvPut {
                key: "k".into(),
                value: big.clone(),
            },
            Command::KvCas {
                key: "k".into(),
                expect: None,
                value: big.clone(),
            },
            Command::KvCas {
                key: "k".into(),
                expect: Some(big.clone()),
                value: "v".into(),
            },
        ] {
            assert_eq!(
                cmd.check_limits(),
                Err(ApplyError::ValueTooLarge {
                    key: "k".into(),
                    len: 1_600_000,
                    max: MAX_VALUE_LEN
                })
            );
        }
        too_large(&Command::KvDelete { key: long(1025) });
        too_large(&Command::KvCas {
            key: long(1025),
            expect: None,
            value: "v".into(),
        });
    }

    #[test]
    fn node_commands() {
        let (what, len, _) = too_large(&Command::RegisterNode {
            secret: long(3_800_000),
            name: None,
            addr: "h:1".into(),
        });
        // A secret is never quoted.
        assert_eq!((what.as_str(), len), ("the join secret", 3_800_000));
        too_large(&Command::RegisterNode {
            secret: "s".into(),
            name: Some(long(64)),
            addr: "h:1".into(),
        });
        too_large(&Command::RegisterNode {
            secret: "s".into(),
            name: None,
            addr: format!("{}:1", long(MAX_ADDR_LEN)),
        });
        let init = |cluster_id: String, join_secret: String, name: String, addr: String| {
            Command::InitCluster {
                cluster_id,
                join_secret,
                node_id: 1,
                name,
                addr,
            }
        };
        let s = || "s".to_string();
        assert_eq!(init(s(), s(), s(), "h:1".into()).check_limits(), Ok(()));
        too_large(&init(long(257), s(), s(), "h:1".into()));
        too_large(&init(s(), long(257), s(), "h:1".into()));
        too_large(&init(s(), s(), long(64), "h:1".into()));
        too_large(&init(s(), s(), s(), long(301)));
        too_large(&Command::RotateJoinSecret { secret: long(257) });
        let report = |labels: BTreeMap<String, String>| Command::ReportNode {
            id: 1,
            labels: Some(labels),
            capacity: Capacity {
                memory: 1,
                cpus: 1,
                docker: false,
            },
        };
        assert_eq!(
            report(BTreeMap::from([("disk".into(), "ssd".into())])).check_limits(),
            Ok(())
        );
        too_large(&report(BTreeMap::from([(long(64), "ssd".into())])));
        too_large(&report(BTreeMap::from([("disk".into(), long(64))])));
        too_large(&report(
            (0..=MAX_LABELS)
                .map(|i| (i.to_string(), String::new()))
                .collect(),
        ));
    }

    #[test]
    fn dataset_and_mount_commands() {
        let (what, _, _) = too_large(&Command::CreateDataset {
            name: long(100_000),
            primary: 1,
            size_limit: None,
        });
        assert!(what.len() < 100, "{what}");
        let err = Command::CreateDataset {
            name: long(100_000),
            primary: 1,
            size_limit: None,
        }
        .check_limits()
        .unwrap_err()
        .to_string();
        assert!(err.len() < 200, "{err}");
        too_large(&Command::RecordSnapshot {
            dataset: 1,
            epoch: 1,
            snapshot: SnapshotRecord {
                name: long(65),
                guid: 1,
                created_unix: 1,
                epoch: 1,
            },
        });
        too_large(&Command::RollbackDataset {
            dataset: 1,
            epoch: 1,
            to: long(65),
        });
        too_large(&Command::CommitDatasetMove {
            dataset: 1,
            epoch: 1,
            to: 2,
            snapshot: long(65),
        });
        too_large(&Command::MoveApp {
            app: long(41),
            to: 2,
        });
        too_large(&Command::CancelAppMove { app: long(41) });
        too_large(&Command::MountVolume {
            dataset: 1,
            node: 1,
            id: long(129),
        });
        too_large(&Command::UnmountVolume {
            dataset: 1,
            node: 1,
            id: long(129),
        });
        for ok in [
            Command::RemoveNode { id: 1 },
            Command::DeleteDataset { dataset: 1 },
            Command::BeginDatasetMove { dataset: 1, to: 2 },
            Command::CancelDatasetMove { dataset: 1 },
            Command::HandoffDatasetMove {
                dataset: 1,
                epoch: 1,
                to: 2,
            },
            Command::ForgetMounts {
                dataset: 1,
                node: None,
            },
        ] {
            assert_eq!(ok.check_limits(), Ok(()));
        }
    }

    #[test]
    fn deploy_commands() {
        let one = |a: PlannedApp| deploy(vec![("web".into(), a)]);
        assert_eq!(
            one(app(&[("A", 1000)], vec!["run".into()])).check_limits(),
            Ok(())
        );
        // A 3.6 MB environment in variables of 100 KB: the total is refused.
        let env: Vec<(String, usize)> = (0..36).map(|i| (format!("V{i}"), 100_000)).collect();
        let env: Vec<(&str, usize)> = env.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        let (what, len, max) = too_large(&one(app(&env, vec!["run".into()])));
        assert_eq!(what, "the environment of app \"web\"");
        assert!(len > 3_600_000 && max == MAX_ENV_TOTAL_BYTES);
        // One variable over MAX_ENV_VAR_BYTES.
        let (what, ..) = too_large(&one(app(&[("BIG", MAX_ENV_VAR_BYTES)], vec![])));
        assert!(what.contains("\"BIG\""), "{what}");
        // The command line: one argument, and all together.
        too_large(&one(app(&[], vec![long(MAX_ARG_BYTES + 1)])));
        too_large(&one(app(&[], vec![long(100 * 1024); 11])));
        // Other fields.
        let mut a = app(&[], vec![]);
        a.spec.image = Some(long(MAX_FIELD_LEN + 1));
        too_large(&one(a));
        let mut a = app(&[], vec![]);
        a.spec.volume = Some(Volume {
            mountpoint: long(MAX_FIELD_LEN + 1),
            maximum_size: None,
            dataset: None,
        });
        too_large(&one(a));
        let mut a = app(&[], vec![]);
        a.spec.links = vec![Link {
            local_port: 1,
            remote_port: 2,
            alias: long(MAX_FIELD_LEN + 1),
        }];
        too_large(&one(a));
        let mut a = app(&[], vec![]);
        a.spec.constraints = vec![crate::config::Constraint {
            key: ConstraintKey::Label(long(MAX_FIELD_LEN + 1)),
            equal: true,
            value: "x".into(),
        }];
        too_large(&one(a));
        // The app's name, as a key and in its spec.
        too_large(&deploy(vec![(long(100_000), app(&[], vec![]))]));
        let mut a = app(&[], vec![]);
        a.spec.name = long(41);
        too_large(&one(a));
        // Within every per-field limit, the spec as a whole: 8 variables of 120 KB, 8
        // arguments of 120 KB and 100 links with 4 KB aliases.
        let env: Vec<(String, usize)> = (0..8).map(|i| (format!("V{i}"), 120_000)).collect();
        let env: Vec<(&str, usize)> = env.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        let mut a = app(&env, vec![long(120_000); 8]);
        a.spec.links = (0..100)
            .map(|i| Link {
                local_port: i,
                remote_port: i,
                alias: long(4000),
            })
            .collect();
        let (what, ..) = too_large(&one(a));
        assert!(what.starts_with("the spec of app"), "{what}");
        // Too many apps.
        let apps = (0..=MAX_DEPLOY_APPS)
            .map(|i| (format!("a{i}"), app(&[], vec![])))
            .collect();
        let (what, ..) = too_large(&deploy(apps));
        assert_eq!(what, "the number of apps in the deploy");
        // Apps each within limits, together over MAX_COMMAND_BYTES.
        let env: Vec<(String, usize)> = (0..7).map(|i| (format!("V{i}"), 120_000)).collect();
        let env: Vec<(&str, usize)> = env.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        let apps = (0..6)
            .map(|i| (format!("a{i}"), app(&env, vec![])))
            .collect();
        let (what, len, max) = too_large(&deploy(apps));
        assert_eq!(what, "the command, encoded,");
        assert!(len > MAX_COMMAND_BYTES && max == MAX_COMMAND_BYTES);
    }

    #[test]
    fn health_reports_bound_the_app_name() {
        let ok = Command::ReportHealth {
            app: long(MAX_APP_NAME_LEN),
            node: 1,
            health: crate::Health::Healthy,
        };
        assert_eq!(ok.check_limits(), Ok(()));
        let (what, len, max) = too_large(&Command::ReportHealth {
            app: long(MAX_APP_NAME_LEN + 1),
            node: 1,
            health: crate::Health::Starting,
        });
        assert!(what.starts_with("app name"), "{what}");
        assert_eq!((len, max), (MAX_APP_NAME_LEN + 1, MAX_APP_NAME_LEN));
    }

    #[test]
    fn batches_check_each_command_and_their_total() {
        let put = |value: usize| Command::KvPut {
            key: "k".into(),
            value: long(value),
        };
        assert_eq!(
            Command::Batch(vec![put(10), put(10)]).check_limits(),
            Ok(())
        );
        assert!(matches!(
            Command::Batch(vec![put(10), put(MAX_VALUE_LEN + 1)]).check_limits(),
            Err(ApplyError::ValueTooLarge { .. })
        ));
        too_large(&Command::Batch(vec![Command::KvDelete { key: long(1025) }]));
        too_large(&Command::Batch(vec![
            put(MAX_VALUE_LEN),
            put(MAX_VALUE_LEN),
            put(MAX_VALUE_LEN),
        ]));
    }

    #[test]
    fn placing_instances_is_bounded_by_name_and_node_count() {
        let place = |app: usize, nodes: usize| Command::PlaceInstances {
            app: long(app),
            nodes: (1..=nodes as u64).collect(),
        };
        assert_eq!(
            place(MAX_APP_NAME_LEN, MAX_INSTANCES).check_limits(),
            Ok(())
        );
        too_large(&place(MAX_APP_NAME_LEN + 1, 1));
        let (what, len, max) = too_large(&place(3, MAX_INSTANCES + 1));
        assert_eq!(
            (what.as_str(), len, max),
            (
                "the list of nodes to place instances on",
                MAX_INSTANCES + 1,
                MAX_INSTANCES
            )
        );
    }

    #[test]
    fn encoded_len_is_the_codec_size() {
        let cmd = Command::KvPut {
            key: "k".into(),
            value: long(300),
        };
        let mut bytes = vec![1u8];
        bytes.extend(postcard::to_allocvec(&cmd).unwrap());
        assert_eq!(encoded_len(&cmd), bytes.len());
    }

    #[test]
    fn apply_errors_quote_input_bounded() {
        let e = crate::dataset::validate_dataset_name(&long(100_000)).unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
        let e = crate::state::validate_name(&long(100_000)).unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
        let e = crate::state::validate_addr(&long(100_000)).unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
        let e = ApplyError::UnknownApp {
            name: long(100_000),
        };
        assert!(e.to_string().len() < 200, "{e}");
    }
}
