//! Layouts of replicated records that older builds wrote, and their conversions to the current
//! ones. postcard writes fields by position, without names: a field added to a record changes
//! its layout, so a log entry or snapshot written before must be read with the layout it was
//! written in. [`crate::Command::DeployV1`] carries these; `flock-raft` reads older snapshots
//! through them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::config::{AppSpec, Constraint, Link, PlannedApp, PortMap, RestartPolicy, Volume};
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
        }
    }
}

/// The apps of an older snapshot, in today's layout.
pub fn apps_from_v1(apps: BTreeMap<String, AppV1>) -> BTreeMap<String, App> {
    apps.into_iter().map(|(n, a)| (n, a.into())).collect()
}
