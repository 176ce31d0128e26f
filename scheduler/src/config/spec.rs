//! The values the config files describe. [`AppSpec`] goes into the replicated desired state,
//! so it is plain data with serde; positions in the source files stay in [`Applications`] and
//! [`crate::config::Deployment`], for the messages of [`crate::config::resolve`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::yaml::Pos;
use crate::retention::Retention;

pub use crate::limits::MAX_APP_NAME_LEN;

/// The smallest `maximum_size` a volume may have: 1 MiB. A smaller limit cannot hold a file
/// system worth having, and is almost always a forgotten unit (`maximum_size: 500` for 500M).
pub const MIN_VOLUME_SIZE: u64 = 1 << 20;

/// One application: what to run (a container image or a command), how to reach it and what
/// it keeps.
///
/// Its postcard layout is in Raft logs and snapshots: a field added here needs the previous
/// layout kept in [`crate::legacy`] (see [`crate::legacy::AppSpecV1`]). The fields after
/// `constraints` came with stacks (snapshot data format 5, [`crate::Command::DeployStack`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub name: String,
    /// A container image (`postgres`, `clusterhq/mongodb:3.0`), for the docker driver.
    /// At least one of `image` and `command` is set; with both, `command` replaces the
    /// image's command.
    pub image: Option<String>,
    /// A program and its arguments, for the process driver.
    pub command: Option<Vec<String>>,
    /// Published ports: the routing mesh listens on `external` on every node and forwards to
    /// `internal` in the app. External ports are unique in the cluster.
    pub ports: Vec<PortMap>,
    /// Other apps this one reaches through the mesh, announced to it as environment variables
    /// `ALIAS_PORT_<local_port>_TCP=tcp://HOST:<remote_port>` (Flocker's and Docker's form).
    pub links: Vec<Link>,
    /// The app's persistent data: a dataset named after the app, mounted at `mountpoint`.
    pub volume: Option<Volume>,
    pub environment: BTreeMap<String, String>,
    pub restart_policy: RestartPolicy,
    /// Memory limit in bytes.
    pub mem_limit: Option<u64>,
    /// Relative CPU weight (Docker's default is 1024); the scheduler reserves 1024 shares per
    /// cpu of a node (see [`crate::fit`]).
    pub cpu_shares: Option<u64>,
    /// Where the app may run: compose's `deploy.placement.constraints`.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// The stack (compose project) the app belongs to: deploying a stack adds, changes and
    /// removes only its own apps. `None`: an app of the whole-configuration deploy (Flocker's
    /// two files), which replaces every app outside stacks.
    #[serde(default)]
    pub stack: Option<String>,
    /// The name its siblings in the stack reach it by (compose's service name); `None`: the
    /// app's name.
    #[serde(default)]
    pub service: Option<String>,
    /// Internal ports its siblings reach through its service address besides those of `ports`
    /// (compose's `expose`, and the ports its image exposes).
    #[serde(default)]
    pub expose: Vec<u16>,
    /// Apps (by app name) started before this one, and whether each must be healthy first.
    #[serde(default)]
    pub depends_on: Vec<Dependency>,
    /// How the app's health is checked; `None`: the image's own check, if any.
    #[serde(default)]
    pub healthcheck: Option<HealthCheck>,
    /// Replaces the image's entrypoint (docker driver).
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `USER[:GROUP]` the app runs as.
    #[serde(default)]
    pub user: Option<String>,
    /// The directory the app starts in.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// The container's host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The signal that stops the app (`SIGTERM` when `None`).
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// How long the app has to stop before it is killed, in ms (10 s when `None`).
    #[serde(default)]
    pub stop_grace_ms: Option<u64>,
    #[serde(default)]
    pub ulimits: Vec<Ulimit>,
    /// Container labels (metadata for other tools).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Size of `/dev/shm` in bytes.
    #[serde(default)]
    pub shm_size: Option<u64>,
    /// Memory reserved for the app on its node, in bytes (compose's
    /// `deploy.resources.reservations.memory`); placement counts it.
    #[serde(default)]
    pub mem_reservation: Option<u64>,
    /// CPU limit in thousandths of a cpu (compose's `cpus`, `deploy.resources.limits.cpus`).
    #[serde(default)]
    pub cpu_limit_milli: Option<u64>,
    /// Secrets of the stack given to the app as read-only files.
    #[serde(default)]
    pub secrets: Vec<SecretMount>,
    /// Read-only host files or directories mounted into the app: they stay on each node and do
    /// not move with the app.
    #[serde(default)]
    pub binds: Vec<BindMount>,
    /// How many instances of the app run, each on its own node (compose's `deploy.replicas`,
    /// `flockctl app scale`); `None`: one. Only an app without a volume may have more than
    /// one: a dataset has one writer.
    #[serde(default)]
    pub instances: Option<u32>,
}

impl AppSpec {
    /// How many instances of the app should run.
    pub fn instance_count(&self) -> u32 {
        self.instances.unwrap_or(1)
    }

    /// The name of its volume's dataset: the volume's `dataset`, else the app's name; `None`
    /// without a volume.
    pub fn dataset_name(&self) -> Option<&str> {
        self.volume
            .as_ref()
            .map(|v| v.dataset.as_deref().unwrap_or(&self.name))
    }

    /// The name siblings reach the app by.
    pub fn service_name(&self) -> &str {
        self.service.as_deref().unwrap_or(&self.name)
    }
}

/// An app this one waits for before it starts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dependency {
    /// The app's name.
    pub app: String,
    /// Wait until it is healthy (`condition: service_healthy`), not only started.
    pub healthy: bool,
}

/// How an app's health is checked: compose's `healthcheck`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The command: `["CMD", prog, args...]` (run directly) or `["CMD-SHELL", "script"]`;
    /// empty with `disable`.
    pub test: Vec<String>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub retries: Option<u32>,
    pub start_period_ms: Option<u64>,
    /// `disable: true` or `test: ["NONE"]`: the image's check is off.
    pub disable: bool,
}

/// A resource limit (`ulimit`), soft and hard.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ulimit {
    pub name: String,
    pub soft: i64,
    pub hard: i64,
}

/// A secret (or config) of the stack as the app sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SecretMount {
    /// The secret's name in the cluster (`STACK_NAME`), whose content is in the replicated
    /// state ([`crate::ClusterState::secrets`]).
    pub secret: String,
    /// The absolute path of the file in the app (`/run/secrets/NAME` by default).
    pub target: String,
    /// File mode (0o444 by default).
    pub mode: u32,
}

/// A host path mounted read-only into the app.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BindMount {
    pub source: String,
    pub target: String,
}

/// A placement constraint, as compose writes them: `node.labels.disk == ssd`,
/// `node.hostname != n3` (`node.name` is the same as `node.hostname`: the node's flock name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Constraint {
    pub key: ConstraintKey,
    /// `==` (true) or `!=`.
    pub equal: bool,
    pub value: String,
}

/// What a [`Constraint`] looks at.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ConstraintKey {
    NodeName,
    Label(String),
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = if self.equal { "==" } else { "!=" };
        match &self.key {
            ConstraintKey::NodeName => write!(f, "node.hostname {op} {}", self.value),
            ConstraintKey::Label(k) => write!(f, "node.labels.{k} {op} {}", self.value),
        }
    }
}

impl std::str::FromStr for Constraint {
    type Err = String;

    fn from_str(s: &str) -> Result<Constraint, String> {
        let (lhs, rhs, equal) = if let Some((l, r)) = s.split_once("==") {
            (l, r, true)
        } else if let Some((l, r)) = s.split_once("!=") {
            (l, r, false)
        } else {
            return Err(format!(
                "constraint {s_shown} has no == or !=; write it as node.labels.KEY == VALUE or node.hostname != NAME", s_shown = crate::limits::shown(s)
            ));
        };
        let (lhs, value) = (lhs.trim(), rhs.trim());
        if value.is_empty() || value.contains(['=', '!']) {
            return Err(format!(
                "constraint {s_shown}: the value after the operator is missing or malformed",
                s_shown = crate::limits::shown(s)
            ));
        }
        let key = match lhs {
            "node.hostname" | "node.name" => ConstraintKey::NodeName,
            _ => match lhs.strip_prefix("node.labels.") {
                Some(k) if !k.is_empty() => ConstraintKey::Label(k.to_string()),
                _ => {
                    return Err(format!(
                        "constraint {s_shown}: flock places by node.labels.KEY and node.hostname, not {lhs_shown}", s_shown = crate::limits::shown(s), lhs_shown = crate::limits::shown(lhs)
                    ))
                }
            },
        };
        Ok(Constraint {
            key,
            equal,
            value: value.to_string(),
        })
    }
}

/// A published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortMap {
    /// The port the app listens on.
    pub internal: u16,
    /// The port published on every node of the cluster.
    pub external: u16,
}

/// A link to another app's published port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Link {
    /// The port the app expects (names its environment variables).
    pub local_port: u16,
    /// The external port the other app publishes (where the variables point).
    pub remote_port: u16,
    /// The variables' prefix: letters, digits, `_` and `-` (upper-cased, `-` as `_`).
    pub alias: String,
}

/// Where an app keeps its data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// An absolute path inside the app, normalized (no trailing or doubled `/`).
    pub mountpoint: String,
    /// The dataset's size limit in bytes; `None` for no limit.
    pub maximum_size: Option<u64>,
    /// The dataset's name when it is not the app's (a compose named volume of a stack,
    /// `STACK_VOLUME`): apps naming the same dataset share it and run on one node.
    #[serde(default)]
    pub dataset: Option<String>,
}

/// What to do when the app exits. Flocker's default, and compose's, is `Never`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    #[default]
    Never,
    Always,
    /// Restart after a non-zero exit, at most `max_retry` times (`None`: without a limit).
    OnFailure {
        max_retry: Option<u32>,
    },
}

/// The form an application file was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Flocker's `application.yml`: `version: 1`, `applications: {...}`.
    Flocker,
    /// fig's `fig.yml` (compose v1): services at the top level.
    Fig,
    /// A compose v2/v3 file: `services: {...}`.
    Compose,
}

/// The applications an application file defines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applications {
    /// The file name given to [`crate::config::parse_application`], for messages.
    pub file: String,
    pub format: Format,
    pub apps: BTreeMap<String, AppSpec>,
    /// For every app with a volume: its dataset's policy, as the file gives it (kept out of
    /// [`AppSpec`], whose layout is in the Raft log).
    pub volumes: BTreeMap<String, VolumePolicy>,
    pub(crate) sources: BTreeMap<String, AppSource>,
    /// A compose file's project name (its top-level `name:`), if it gives one.
    pub project: Option<String>,
    /// The contents of the compose file's `secrets:` and `configs:` that its services use, by
    /// name (the file's names; [`crate::config::stack::into_stack`] prefixes them with the
    /// stack's, as [`SecretMount::secret`]): what `DeployRequest.secrets` carries.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// Services that give `build` without `image`: their image is the one compose would build,
    /// `PROJECT-SERVICE`, which [`crate::config::stack::into_stack`] fills in (the reader does
    /// not know the project).
    pub built: std::collections::BTreeSet<String>,
}

/// The policy of an app's volume's dataset that the config files set. It travels beside the
/// plan's apps (JSON in `DeployRequest.volumes_json`), not inside [`AppSpec`], whose postcard
/// layout is stored in Raft logs and snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumePolicy {
    /// Which automatic snapshots are kept; `None`: the default policy (also when the file
    /// says `retention: default`), so that a key removed from the file resets it.
    #[serde(default)]
    pub retention: Option<Retention>,
    /// Replicas kept for failover (`None`: none asked for, also when the key is removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// How often the primary snapshots for its replicas, in ms (`None`: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_interval_ms: Option<u64>,
}

impl VolumePolicy {
    /// The replication it asks for: replicas > 0 with the interval or the default one.
    pub fn replication(&self) -> Option<crate::failover::Replication> {
        self.replicas
            .filter(|n| *n > 0)
            .map(|replicas| crate::failover::Replication {
                replicas,
                interval_ms: self
                    .snapshot_interval_ms
                    .unwrap_or(crate::failover::DEFAULT_INTERVAL_MS),
            })
    }
}

/// Where an app and its external ports are written, for the messages of `resolve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AppSource {
    pub at: Pos,
    /// For each of the app's ports (same order): the position and path of its external port.
    pub ports: Vec<(Pos, String)>,
}

/// A node of the cluster as a deployment file may name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRef {
    pub id: u64,
    pub name: String,
    /// HOST:PORT. A deployment may name the node by it, or by HOST alone.
    pub addr: String,
}

/// The apps to run, each with the node it is pinned to (`None`: the scheduler places it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub apps: BTreeMap<String, PlannedApp>,
    /// App name -> the policy of its volume's dataset: one entry for every planned app that
    /// has a volume (the default policy when the file sets none), none for the others.
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumePolicy>,
}

/// One app of a [`Plan`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedApp {
    pub spec: AppSpec,
    pub node: Option<u64>,
}

/// Bytes for people: `512 B`, `1.5 GiB` (powers of 1024, as [`parse_size`] reads them).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses a size in bytes: a number, optionally with a fraction, and an optional unit. Units
/// are powers of 1024 and case-insensitive: `K`, `M`, `G`, `T`, `P`, also written `KB`/`KiB`
/// and so on, and `B` for bytes. A fraction is rounded up to the next byte (Flocker's rule:
/// `2.1M` is 2202010 bytes). Examples: `1073741824`, `500M`, `2.5G`, `1 GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text_shown} is not a size (use 500M, 1G or bytes)",
            text_shown = crate::limits::shown(text)
        )
    };
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (whole, rest) = t.split_at(digits_end);
    if whole.is_empty() {
        return Err(bad());
    }
    let (fraction, unit) = match rest.strip_prefix('.') {
        Some(r) => {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            r.split_at(end)
        }
        None => ("", rest),
    };
    let shift = match unit.trim_start().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => return Err(bad()),
    };
    let too_big = || {
        format!(
            "{text_shown} is too large (at most 16 EiB)",
            text_shown = crate::limits::shown(text)
        )
    };
    // Exact arithmetic: bytes = ceil((whole + fraction) * 2^shift). With whole < 2^64,
    // fraction < 10^18 < 2^60 and shift <= 50, nothing below overflows a u128.
    let whole: u64 = whole.parse().map_err(|_| too_big())?;
    let mut bytes = u128::from(whole) << shift;
    let fraction = fraction.trim_end_matches('0');
    if !fraction.is_empty() {
        if fraction.len() > 18 {
            return Err(bad());
        }
        let numerator: u128 = fraction.parse().map_err(|_| bad())?;
        let denominator = 10u128.pow(fraction.len() as u32);
        bytes += (numerator << shift).div_ceil(denominator);
    }
    u64::try_from(bytes).map_err(|_| too_big())
}

/// An app name: 1 to [`MAX_APP_NAME_LEN`] ASCII letters, digits, `_`, `.` and `-`, starting
/// with a letter or a digit (a valid container and dataset name).
pub(crate) fn check_app_name(name: &str) -> Result<(), String> {
    let Some(first) = name.chars().next() else {
        return Err("an application name cannot be empty".into());
    };
    if name.len() > MAX_APP_NAME_LEN {
        return Err(format!(
            "the application name {} is longer than {MAX_APP_NAME_LEN} characters",
            crate::limits::shown(name)
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "the application name {name_shown} must start with a letter or a digit",
            name_shown = crate::limits::shown(name)
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "the application name {name_shown} contains {c:?} (use letters, digits, '_', '.' and '-')", name_shown = crate::limits::shown(name)
        ));
    }
    Ok(())
}

/// A link alias: ASCII letters, digits, `_` and `-`, starting with a letter or a digit.
pub(crate) fn check_alias(alias: &str) -> Result<(), String> {
    let ok = alias
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{alias_shown} is not a link alias (use letters, digits, '_' and '-', starting with a \
             letter or a digit)",
            alias_shown = crate::limits::shown(alias)
        ))
    }
}

/// Normalizes an absolute mountpoint: `/var/lib/es/` -> `/var/lib/es`.
pub(crate) fn normalize_mountpoint(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!(
            "{path_shown} is not an absolute path (write /var/lib/data)",
            path_shown = crate::limits::shown(path)
        ));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(format!(
            "{path_shown} contains {c:?}: a mountpoint is printable ASCII (as in Flocker)",
            path_shown = crate::limits::shown(path)
        ));
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err("a volume cannot be mounted at / (write /var/lib/data)".into());
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(format!(
            "{path_shown} contains . or ..: write the path without them",
            path_shown = crate::limits::shown(path)
        ));
    }
    Ok(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_flockers_rules() {
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("500m"), Ok(500 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2.5G"), Ok(5 << 29));
        // Flocker's example: fractions round up to the next byte.
        assert_eq!(parse_size("2.1M"), Ok(2202010));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.0"), Ok(1));
        assert_eq!(parse_size("1."), Ok(1));
        assert_eq!(parse_size("0.5"), Ok(1));
        assert_eq!(parse_size("16383P"), Ok(16383 << 50));
        assert_eq!(
            parse_size("12X"),
            Err("\"12X\" is not a size (use 500M, 1G or bytes)".into())
        );
        assert!(parse_size("").is_err());
        assert!(parse_size(".5G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.2.3").is_err());
        assert_eq!(
            parse_size("16384P"),
            Err("\"16384P\" is too large (at most 16 EiB)".into())
        );
        assert!(parse_size("99999999999999999999999999999999999999999").is_err());
    }

    #[test]
    fn mountpoints_are_normalized() {
        assert_eq!(
            normalize_mountpoint("/var/lib/elasticsearch/"),
            Ok("/var/lib/elasticsearch".into())
        );
        assert_eq!(normalize_mountpoint("//data//db"), Ok("/data/db".into()));
        assert!(normalize_mountpoint("data").is_err());
        assert!(normalize_mountpoint("/").is_err());
        assert!(normalize_mountpoint("/a/../b").is_err());
    }

    #[test]
    fn names() {
        assert!(check_app_name("site-clusterhq.com").is_ok());
        assert!(check_app_name("mongodb-volume-example").is_ok());
        assert!(check_app_name("-x").is_err());
        assert!(check_app_name("a b").is_err());
        assert!(check_app_name(&"a".repeat(41)).is_err());
        assert!(check_alias("es").is_ok());
        assert!(check_alias("my_db-1").is_ok());
        assert!(check_alias("a.b").is_err());
        assert!(check_alias("").is_err());
    }
}
