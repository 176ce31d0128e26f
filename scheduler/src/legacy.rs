//! Layouts of replicated records that older builds wrote, and their conversions to the current
//! ones. postcard writes fields by position, without names: a field added to a record changes
//! its layout, so a log entry or snapshot written before must be read with the layout it was
//! written in. [`crate::Command::DeployV1`] carries these; `flock-raft` reads older snapshots
//! through them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::config::{
    AppSpec, BindMount, Constraint, Dependency, HealthCheck, Link, PlannedApp, PortMap,
    RestartPolicy, SecretMount, Ulimit, Volume,
};
use crate::dataset::DatasetId;
use crate::state::NodeId;

/// [`AppSpec`] before stacks (snapshot data formats 1 to 4, [`crate::Command::DeployV1`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpecV1 {
    pub name: String,
    pub image: Option<String>,
    pub command: Option<Vec<String>>,
    pub ports: Vec<PortMap>,
    pub links: Vec<Link>,
    pub volume: Option<VolumeV1>,
    pub environment: BTreeMap<String, String>,
    pub restart_policy: RestartPolicy,
    pub mem_limit: Option<u64>,
    pub cpu_shares: Option<u64>,
    pub constraints: Vec<Constraint>,
}

/// [`Volume`] before stacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeV1 {
    pub mountpoint: String,
    pub maximum_size: Option<u64>,
}

/// [`PlannedApp`] before stacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedAppV1 {
    pub spec: AppSpecV1,
    pub node: Option<u64>,
}

/// [`App`] before stacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppV1 {
    pub spec: AppSpecV1,
    pub pinned: Option<NodeId>,
    pub node: NodeId,
    pub dataset: Option<DatasetId>,
}

impl From<AppSpecV1> for AppSpec {
    fn from(s: AppSpecV1) -> Self {
        AppSpec {
            name: s.name,
            image: s.image,
            command: s.command,
            ports: s.ports,
            links: s.links,
            volume: s.volume.map(|v| Volume {
                mountpoint: v.mountpoint,
                maximum_size: v.maximum_size,
                dataset: None,
            }),
            environment: s.environment,
            restart_policy: s.restart_policy,
            mem_limit: s.mem_limit,
            cpu_shares: s.cpu_shares,
            constraints: s.constraints,
            ..AppSpec::default()
        }
    }
}

impl From<PlannedAppV1> for PlannedApp {
    fn from(p: PlannedAppV1) -> Self {
        PlannedApp {
            spec: p.spec.into(),
            node: p.node,
        }
    }
}

impl From<AppV1> for App {
    fn from(a: AppV1) -> Self {
        App {
            spec: a.spec.into(),
            pinned: a.pinned,
            node: a.node,
            dataset: a.dataset,
            vip: None,
            more: Vec::new(),
            health: BTreeMap::new(),
        }
    }
}

/// The apps of an older snapshot, in today's layout.
pub fn apps_from_v1(apps: BTreeMap<String, AppV1>) -> BTreeMap<String, App> {
    apps.into_iter().map(|(n, a)| (n, a.into())).collect()
}

/// [`AppSpec`] as stacks laid it out in postcard (snapshot data format 5,
/// [`crate::Command::DeployV2`]); from format 6 on apps are JSON ([`crate::json_field`]). The
/// types of its fields keep their postcard layout too: change one and freeze a copy here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpecV2 {
    pub name: String,
    pub image: Option<String>,
    pub command: Option<Vec<String>>,
    pub ports: Vec<PortMap>,
    pub links: Vec<Link>,
    pub volume: Option<Volume>,
    pub environment: BTreeMap<String, String>,
    pub restart_policy: RestartPolicy,
    pub mem_limit: Option<u64>,
    pub cpu_shares: Option<u64>,
    pub constraints: Vec<Constraint>,
    pub stack: Option<String>,
    pub service: Option<String>,
    pub expose: Vec<u16>,
    pub depends_on: Vec<Dependency>,
    pub healthcheck: Option<HealthCheck>,
    pub entrypoint: Option<Vec<String>>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub hostname: Option<String>,
    pub stop_signal: Option<String>,
    pub stop_grace_ms: Option<u64>,
    pub ulimits: Vec<Ulimit>,
    pub labels: BTreeMap<String, String>,
    pub shm_size: Option<u64>,
    pub mem_reservation: Option<u64>,
    pub cpu_limit_milli: Option<u64>,
    pub secrets: Vec<SecretMount>,
    pub binds: Vec<BindMount>,
}

/// [`PlannedApp`] of format 5.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedAppV2 {
    pub spec: AppSpecV2,
    pub node: Option<u64>,
}

/// [`App`] of format 5.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppV2 {
    pub spec: AppSpecV2,
    pub pinned: Option<NodeId>,
    pub node: NodeId,
    pub dataset: Option<DatasetId>,
    pub vip: Option<u16>,
}

impl From<AppSpecV2> for AppSpec {
    fn from(s: AppSpecV2) -> Self {
        AppSpec {
            name: s.name,
            image: s.image,
            command: s.command,
            ports: s.ports,
            links: s.links,
            volume: s.volume,
            environment: s.environment,
            restart_policy: s.restart_policy,
            mem_limit: s.mem_limit,
            cpu_shares: s.cpu_shares,
            constraints: s.constraints,
            stack: s.stack,
            service: s.service,
            expose: s.expose,
            depends_on: s.depends_on,
            healthcheck: s.healthcheck,
            entrypoint: s.entrypoint,
            user: s.user,
            working_dir: s.working_dir,
            hostname: s.hostname,
            stop_signal: s.stop_signal,
            stop_grace_ms: s.stop_grace_ms,
            ulimits: s.ulimits,
            labels: s.labels,
            shm_size: s.shm_size,
            mem_reservation: s.mem_reservation,
            cpu_limit_milli: s.cpu_limit_milli,
            secrets: s.secrets,
            binds: s.binds,
            ..AppSpec::default()
        }
    }
}

impl From<PlannedAppV2> for PlannedApp {
    fn from(p: PlannedAppV2) -> Self {
        PlannedApp {
            spec: p.spec.into(),
            node: p.node,
        }
    }
}

impl From<AppV2> for App {
    fn from(a: AppV2) -> Self {
        App {
            spec: a.spec.into(),
            pinned: a.pinned,
            node: a.node,
            dataset: a.dataset,
            vip: a.vip,
            more: Vec::new(),
            health: BTreeMap::new(),
        }
    }
}

/// The apps of a format 5 snapshot, in today's layout.
pub fn apps_from_v2(apps: BTreeMap<String, AppV2>) -> BTreeMap<String, App> {
    apps.into_iter().map(|(n, a)| (n, a.into())).collect()
}

impl AppSpecV2 {
    /// `spec` in format 5's layout, if that layout can say all of it (it has no instances).
    pub fn from_current(spec: &AppSpec) -> Option<AppSpecV2> {
        if spec.instances.is_some() {
            return None;
        }
        let s = spec.clone();
        Some(AppSpecV2 {
            name: s.name,
            image: s.image,
            command: s.command,
            ports: s.ports,
            links: s.links,
            volume: s.volume,
            environment: s.environment,
            restart_policy: s.restart_policy,
            mem_limit: s.mem_limit,
            cpu_shares: s.cpu_shares,
            constraints: s.constraints,
            stack: s.stack,
            service: s.service,
            expose: s.expose,
            depends_on: s.depends_on,
            healthcheck: s.healthcheck,
            entrypoint: s.entrypoint,
            user: s.user,
            working_dir: s.working_dir,
            hostname: s.hostname,
            stop_signal: s.stop_signal,
            stop_grace_ms: s.stop_grace_ms,
            ulimits: s.ulimits,
            labels: s.labels,
            shm_size: s.shm_size,
            mem_reservation: s.mem_reservation,
            cpu_limit_milli: s.cpu_limit_milli,
            secrets: s.secrets,
            binds: s.binds,
        })
    }
}
