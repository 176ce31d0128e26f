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
/// The most apps one deploy may name (a deploy carries the whole application configuration).
pub const MAX_DEPLOY_APPS: usize = 1000;

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

fn too_large(what: String, len: usize, max: usize) -> ApplyError {
    ApplyError::TooLarge { what, len, max }
}

/// `Err` when `s` is longer than `max` bytes, naming it as `what` with a bounded quote.
fn len_at_most(what: &str, s: &str, max: usize) -> Result<(), ApplyError> {
    if s.len() > max {
        return Err(too_large(format!("{what} {}", shown(s)), s.len(), max));
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
        len_at_most(&format!("the value of label {}", shown(k)), v, MAX_LABEL_LEN)?;
    }
    Ok(())
}

/// Checks one app's spec against every per-app limit: its name, environment, command line,
/// other fields and its encoded size.
pub fn check_app(name: &str, spec: &AppSpec) -> Result<(), ApplyError> {
    len_at_most("app name", name, MAX_APP_NAME_LEN)?;
    len_at_most("app name", &spec.name, MAX_APP_NAME_LEN)?;
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
            len_at_most(&format!("argument {i} of app {app}'s command"), arg, MAX_ARG_BYTES)?;
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
        len_at_most(&format!("a link alias of app {app}"), &l.alias, MAX_FIELD_LEN)?;
    }
    for c in &spec.constraints {
        if let crate::config::ConstraintKey::Label(k) = &c.key {
            len_at_most(&format!("a constraint's label of app {app}"), k, MAX_FIELD_LEN)?;
        }
        len_at_most(
            &format!("a constraint's value of app {app}"),
            &c.value,
            MAX_FIELD_LEN,
        )?;
    }
    let bytes = encoded_len(spec);
    if bytes > MAX_APP_SPEC_BYTES {
        return Err(too_large(
            format!("the spec of app {app}, encoded,"),
            bytes,
            MAX_APP_SPEC_BYTES,
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
            return Err(too_large("the command, encoded,".into(), bytes, MAX_COMMAND_BYTES));
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
                len_at_most("join secret", join_secret, MAX_SECRET_LEN)?;
                len_at_most("node name", name, MAX_NAME_LEN)?;
                len_at_most("node address", addr, MAX_ADDR_LEN)
            }
            Command::RegisterNode { secret, name, addr } => {
                len_at_most("join secret", secret, MAX_SECRET_LEN)?;
                if let Some(name) = name {
                    len_at_most("node name", name, MAX_NAME_LEN)?;
                }
                len_at_most("node address", addr, MAX_ADDR_LEN)
            }
            Command::RotateJoinSecret { secret } => {
                len_at_most("join secret", secret, MAX_SECRET_LEN)
            }
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
            Command::Deploy { apps } => check_deploy(apps),
            Command::MoveApp { app, .. } | Command::CancelAppMove { app } => {
                len_at_most("app name", app, MAX_APP_NAME_LEN)
            }
            Command::ReportNode { labels, .. } => labels.as_ref().map_or(Ok(()), check_labels),
            Command::MountVolume { id, .. } | Command::UnmountVolume { id, .. } => {
                len_at_most("mount id", id, MAX_MOUNT_ID_LEN)
            }
            // Nothing but numbers.
            Command::RemoveNode { .. }
            | Command::DeleteDataset { .. }
            | Command::BeginDatasetMove { .. }
            | Command::CancelDatasetMove { .. }
            | Command::HandoffDatasetMove { .. }
            | Command::ForgetMounts { .. } => Ok(()),
        }
    }
}
