//! Flocker's `deployment.yml` and [`resolve`], which joins it with the applications and the
//! cluster's nodes:
//!
//! ```yaml
//! "version": 1
//! "nodes":
//!   "172.16.255.250": ["elasticsearch", "logstash"]   # a node's host, HOST:PORT or name
//!   "n2": ["kibana"]
//!   "n3": []                                          # nothing runs there
//! ```
//!
//! As in Flocker (`deployment_from_configuration` in `flocker/control/_config.py`): an app
//! appears at most once; an app deployed must be defined; apps defined but not deployed do not
//! run; a node that is not in the cluster is an error.

use std::collections::BTreeMap;

use super::fields::{child, index, Ctx};
use super::flocker::check_version;
use super::spec::{Applications, NodeRef, Plan, PlannedApp, VolumePolicy};
use super::yaml::{Pos, Val, Yaml};
use super::ConfigError;

/// The apps each node runs, as a deployment file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deployment {
    /// The file name given to [`crate::config::parse_deployment`], for messages.
    pub file: String,
    /// In file order.
    pub nodes: Vec<DeploymentNode>,
}

/// One entry of `nodes:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentNode {
    /// How the file names the node: a name, HOST:PORT or HOST.
    pub key: String,
    pub apps: Vec<String>,
    at: Pos,
    app_at: Vec<Pos>,
    /// Whether the apps were written as a list (not one name alone).
    listed: bool,
}

pub(crate) fn read(file: &str, doc: &Yaml) -> Result<Deployment, ConfigError> {
    let cx = Ctx { file };
    let top = cx.mapping(doc, "")?;
    cx.check_keys(top, "", &["version", "nodes"], "Flocker's deployment.yml")?;
    check_version(cx, top, doc.at)?;
    let nodes_node = doc
        .get("nodes")
        .ok_or_else(|| cx.err(doc.at, "", "missing nodes (NODE: [APP, ...])"))?;
    let mut nodes: Vec<DeploymentNode> = Vec::new();
    // app -> (node key, position) of its first appearance
    let mut seen: BTreeMap<String, (String, Pos)> = BTreeMap::new();
    for (key, value) in cx.mapping_or_empty(nodes_node, "nodes")? {
        let name = key.scalar().unwrap_or_default();
        let path = child("nodes", name);
        if name.is_empty() {
            return Err(cx.err(key.at, "nodes", "a node key is empty; name the node"));
        }
        // A list of app names; one name alone (as Flocker's documentation wrote it); or none.
        let items: Vec<(&Yaml, String)> = match &value.val {
            _ if value.is_null() => Vec::new(),
            Val::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| (item, index(&path, i)))
                .collect(),
            Val::Scalar { .. } => vec![(value, path.clone())],
            Val::Map(_) => {
                return Err(cx.err(
                    value.at,
                    &path,
                    "expected a list of application names, found a mapping",
                ))
            }
        };
        let mut node = DeploymentNode {
            key: name.to_string(),
            apps: Vec::new(),
            at: key.at,
            app_at: Vec::new(),
            listed: !matches!(value.val, Val::Scalar { .. }),
        };
        for (item, item_path) in items {
            let app = cx.string(item, &item_path)?;
            if let Some((first_node, first_at)) = seen.get(&app) {
                return Err(cx.err(
                    item.at,
                    &item_path,
                    format!(
                        "{app_shown} is already deployed on {first_node_shown} (line {}); an \
                         application runs on one node",
                        first_at.line,
                        app_shown = crate::limits::shown(&app),
                        first_node_shown = crate::limits::shown(first_node)
                    ),
                ));
            }
            seen.insert(app.clone(), (name.to_string(), item.at));
            node.apps.push(app);
            node.app_at.push(item.at);
        }
        nodes.push(node);
    }
    Ok(Deployment {
        file: file.to_string(),
        nodes,
    })
}

/// The apps `deployment` places, each with the id of its node. Errors: a node key that names
/// no node of `nodes` (or several), two keys for one node, an app that `apps` does not define,
/// and two apps publishing the same external port.
pub fn resolve(
    apps: &Applications,
    deployment: &Deployment,
    nodes: &[NodeRef],
) -> Result<Plan, ConfigError> {
    let cx = Ctx {
        file: &deployment.file,
    };
    let mut plan = Plan::default();
    // node id -> the key that named it first, and where
    let mut keys: BTreeMap<u64, (&str, Pos)> = BTreeMap::new();
    for entry in &deployment.nodes {
        let path = child("nodes", &entry.key);
        let node = find_node(cx, entry, &path, nodes)?;
        if let Some((other, at)) = keys.get(&node.id) {
            return Err(cx.err(
                entry.at,
                &path,
                format!(
                    "{:?} and {other_shown} (line {}) are the same node, {}; list its apps under one key",
                    entry.key, at.line, node.name, other_shown = crate::limits::shown(other)
                ),
            ));
        }
        keys.insert(node.id, (&entry.key, entry.at));
        for (i, (app, at)) in entry.apps.iter().zip(&entry.app_at).enumerate() {
            let Some(spec) = apps.apps.get(app) else {
                let item_path = if entry.listed {
                    index(&path, i)
                } else {
                    path.clone()
                };
                return Err(cx.err(
                    *at,
                    &item_path,
                    format!(
                        "{app_shown} is not an application in {} ({})",
                        apps.file,
                        defined(apps),
                        app_shown = crate::limits::shown(app)
                    ),
                ));
            };
            plan.apps.insert(
                app.clone(),
                PlannedApp {
                    spec: spec.clone(),
                    node: Some(node.id),
                },
            );
        }
    }
    check_ports(apps, &plan)?;
    plan.volumes = volume_policies(apps, &plan);
    Ok(plan)
}

/// Every app of `apps`, placed by the scheduler (a compose file deployed without a deployment
/// file). Errors: two apps publishing the same external port.
pub fn resolve_unpinned(apps: &Applications) -> Result<Plan, ConfigError> {
    let mut plan = Plan {
        apps: apps
            .apps
            .iter()
            .map(|(name, spec)| {
                let app = PlannedApp {
                    spec: spec.clone(),
                    node: None,
                };
                (name.clone(), app)
            })
            .collect(),
        volumes: BTreeMap::new(),
    };
    check_ports(apps, &plan)?;
    plan.volumes = volume_policies(apps, &plan);
    Ok(plan)
}

/// The policy of every planned app's volume: the file's, or the default (an entry even then,
/// so that a key removed from the file resets the dataset to the default policy).
fn volume_policies(apps: &Applications, plan: &Plan) -> BTreeMap<String, VolumePolicy> {
    plan.apps
        .iter()
        .filter(|(_, app)| app.spec.volume.is_some())
        .map(|(name, _)| {
            let policy = apps.volumes.get(name).cloned().unwrap_or_default();
            (name.clone(), policy)
        })
        .collect()
}

/// The node a deployment key names: by name first, then by HOST:PORT, then by HOST.
fn find_node<'n>(
    cx: Ctx,
    entry: &DeploymentNode,
    path: &str,
    nodes: &'n [NodeRef],
) -> Result<&'n NodeRef, ConfigError> {
    let key = entry.key.as_str();
    let tiers: [&dyn Fn(&NodeRef) -> bool; 3] = [&|n| n.name == key, &|n| n.addr == key, &|n| {
        crate::state::host_of(&n.addr) == key.trim_matches(['[', ']'])
    }];
    for matches in tiers {
        let found: Vec<&NodeRef> = nodes.iter().filter(|n| matches(n)).collect();
        match found.as_slice() {
            [] => continue,
            [one] => return Ok(one),
            several => {
                return Err(cx.err(
                    entry.at,
                    path,
                    format!(
                        "{key_shown} is the address of several nodes: {}; name one by its name or \
                         HOST:PORT",
                        list_nodes(several),
                        key_shown = crate::limits::shown(key)
                    ),
                ))
            }
        }
    }
    let known = if nodes.is_empty() {
        "the cluster has no nodes".to_string()
    } else {
        let all: Vec<&NodeRef> = nodes.iter().collect();
        format!("the cluster's nodes are {}", list_nodes(&all))
    };
    Err(cx.err(
        entry.at,
        path,
        format!(
            "no node is named or addressed {key_shown}; {known}",
            key_shown = crate::limits::shown(key)
        ),
    ))
}

fn list_nodes(nodes: &[&NodeRef]) -> String {
    let names: Vec<String> = nodes
        .iter()
        .map(|n| format!("{} ({})", n.name, n.addr))
        .collect();
    names.join(", ")
}

/// "it defines a, b and c" for messages, shortened after ten.
fn defined(apps: &Applications) -> String {
    let names: Vec<&str> = apps.apps.keys().map(String::as_str).collect();
    match names.as_slice() {
        [] => "it defines none".into(),
        [one] => format!("it defines {one}"),
        _ if names.len() > 10 => format!(
            "it defines {} and {} more",
            names[..10].join(", "),
            names.len() - 10
        ),
        [init @ .., last] => format!("it defines {} and {last}", init.join(", ")),
    }
}

/// External ports are unique in the cluster: the mesh publishes each on every node.
fn check_ports(apps: &Applications, plan: &Plan) -> Result<(), ConfigError> {
    let cx = Ctx { file: &apps.file };
    // Walk the apps in file order, so that the error is about the later one.
    let mut order: Vec<(&String, &PlannedApp)> = plan.apps.iter().collect();
    order.sort_by_key(|(name, _)| apps.sources.get(*name).map(|s| s.at));
    let mut taken: BTreeMap<u16, (&str, Pos)> = BTreeMap::new();
    for (name, app) in order {
        let source = apps.sources.get(name);
        for (i, port) in app.spec.ports.iter().enumerate() {
            let (at, path) = source
                .and_then(|s| s.ports.get(i))
                .map_or((Pos::default(), String::new()), |(at, p)| (*at, p.clone()));
            if let Some((other, other_at)) = taken.get(&port.external) {
                return Err(cx.err(
                    at,
                    &path,
                    format!(
                        "external port {} is already published by {other} (line {}); external \
                         ports are unique in the cluster",
                        port.external, other_at.line
                    ),
                ));
            }
            taken.insert(port.external, (name, at));
        }
    }
    Ok(())
}
