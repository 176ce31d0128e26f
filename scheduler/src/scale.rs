//! Instances of scaled stateless apps that wait, and their placement once room appears.
//!
//! A deploy or `flockctl app scale` places as many instances as fit, one per node
//! ([`crate::app::plan_deploy`]); the others wait. Room may appear later without a deploy: a
//! node joins, a drain ends, another app is removed or scaled down, a node reports more
//! capacity or other labels. The leader asks [`waiting_placements`] (pure) and proposes what
//! it returns as [`Command::PlaceInstances`], whose apply ([`ClusterState::place_instances`])
//! checks each node again against the state it finds: a placement computed from a stale view
//! places only what still fits, so proposing the same placement twice places it once.
//!
//! The fit rules are [`ClusterState::instance_misfit`]'s, the same as a node back up applies
//! to the instances that wait (see [`crate::failover`]): the node is ready (not draining or
//! down), has no instance of the app yet, has the app's internal ports free, and has room
//! ([`crate::fit::misfit`]); and, unlike there, it has reported its capacity (a node that
//! just joined is not taken to fit everything before it said what it offers). Among the nodes that fit, the least loaded (fewest apps placed)
//! gets the next instance, the lowest id on a tie.

use std::collections::BTreeMap;

use crate::app::internal_ports;
use crate::failover::reserved_on;
use crate::fit::misfit;
use crate::state::{ApplyError, ClusterState, Command, CommandResult, NodeId, NodeState};

/// How many of app `name`'s instances wait: asked for, not placed. Zero for an app with a
/// dataset (it runs one instance) or an unknown one.
pub fn waiting_count(state: &ClusterState, name: &str) -> usize {
    state.apps.get(name).map_or(0, |a| {
        if a.dataset.is_some() {
            return 0;
        }
        (a.spec.instance_count().max(1) as usize).saturating_sub(a.more.len() + 1)
    })
}

impl ClusterState {
    /// Why an instance of app `name` cannot be placed on `node` now; `None` when it can.
    pub fn instance_misfit(&self, name: &str, node: NodeId) -> Option<String> {
        let Some(app) = self.apps.get(name) else {
            return Some(format!("there is no app named {}", crate::shown(name)));
        };
        let Some(n) = self.nodes.get(&node) else {
            return Some(format!("node {node} is not a member"));
        };
        match n.state {
            NodeState::Ready => {}
            NodeState::Draining => return Some("it is draining".into()),
            NodeState::Down => return Some("it is down".into()),
        }
        if app.dataset.is_some() {
            return Some("the app has a dataset: it runs one instance".into());
        }
        if app.placed_on(node) {
            return Some("it runs one of the app's instances already".into());
        }
        // A node that just joined has not said yet what it offers (memory, cpus, a working
        // docker): wait for its report rather than guess that everything fits there.
        if n.capacity.is_none() {
            return Some("it has not reported its capacity yet".into());
        }
        let ports = internal_ports(&app.spec);
        if let Some((other, p)) = self
            .apps
            .iter()
            .filter(|(_, a)| a.placed_on(node))
            .find_map(|(o, a)| {
                internal_ports(&a.spec)
                    .intersection(&ports)
                    .next()
                    .map(|p| (o, *p))
            })
        {
            return Some(format!("app {other} there takes internal port {p} too"));
        }
        misfit(n, &app.spec, reserved_on(self, node))
    }

    /// Places instances of app `name` on `nodes`, in order, each only if it still fits
    /// ([`ClusterState::instance_misfit`]) and the app still waits for one; the others are
    /// refused with the reason. Refused as a whole only when the app does not exist.
    pub(crate) fn place_instances(
        &mut self,
        name: &str,
        nodes: &[NodeId],
    ) -> Result<CommandResult, ApplyError> {
        if !self.apps.contains_key(name) {
            return Err(ApplyError::UnknownApp {
                name: name.to_string(),
            });
        }
        let mut placed = Vec::new();
        let mut refused = Vec::new();
        for &node in nodes {
            let why = if waiting_count(self, name) == 0 {
                Some("the app has all the instances it asks for".to_string())
            } else {
                self.instance_misfit(name, node)
            };
            match why {
                Some(why) => refused.push((node, why)),
                None => {
                    self.apps.get_mut(name).expect("checked").more.push(node);
                    placed.push(node);
                }
            }
        }
        Ok(CommandResult::InstancesPlaced { placed, refused })
    }
}

/// The placements that can be made now: for each stateless app whose instances wait (by
/// name), the nodes its next instances go to, as [`Command::PlaceInstances`]. Each instance
/// goes to the least loaded node where it fits (the lowest id on a tie), counting the
/// placements made before it, so the commands applied in order place all of them. Empty when
/// nothing waits or nothing fits. Pure and deterministic.
pub fn waiting_placements(state: &ClusterState) -> Vec<Command> {
    let waiting: Vec<&String> = state
        .apps
        .keys()
        .filter(|n| waiting_count(state, n) > 0)
        .collect();
    if waiting.is_empty() {
        return Vec::new();
    }
    // What the placements so far make of the state: each is checked against the ones before it.
    let mut scratch = state.clone();
    let mut out = Vec::new();
    for name in waiting {
        let mut nodes = Vec::new();
        while waiting_count(&scratch, name) > 0 {
            let load: BTreeMap<NodeId, usize> = scratch
                .nodes
                .keys()
                .map(|id| {
                    let l = scratch.apps.values().filter(|a| a.placed_on(*id)).count();
                    (*id, l)
                })
                .collect();
            let Some(best) = load
                .iter()
                .filter(|(id, _)| scratch.instance_misfit(name, **id).is_none())
                .min_by_key(|(id, l)| (**l, **id))
                .map(|(id, _)| *id)
            else {
                break;
            };
            scratch
                .apps
                .get_mut(name.as_str())
                .expect("listed")
                .more
                .push(best);
            nodes.push(best);
        }
        if !nodes.is_empty() {
            out.push(Command::PlaceInstances {
                app: name.clone(),
                nodes,
            });
        }
    }
    out
}

/// How many nodes' reasons [`why_instances_wait`] names.
const MAX_REASONS_SHOWN: usize = 8;

/// Why app `name`'s waiting instances wait, for `flockctl app ls`/`show`: each member's reason
/// (`None` when none waits). When some node fits one, it names it: the leader places the
/// instance there shortly.
pub fn why_instances_wait(state: &ClusterState, name: &str) -> Option<String> {
    let waiting = waiting_count(state, name);
    if waiting == 0 {
        return None;
    }
    let mut room = Vec::new();
    let mut reasons = Vec::new();
    for n in state.nodes.values() {
        match state.instance_misfit(name, n.id) {
            Some(why) => reasons.push(format!("{}: {why}", n.name)),
            None => room.push(n.name.as_str()),
        }
    }
    if !room.is_empty() {
        return Some(format!(
            "{waiting} instance(s) wait: room appeared on {}, being placed there",
            room.join(", ")
        ));
    }
    let more = reasons.len().saturating_sub(MAX_REASONS_SHOWN);
    reasons.truncate(MAX_REASONS_SHOWN);
    if more > 0 {
        reasons.push(format!("and {more} other node(s)"));
    }
    Some(format!(
        "{waiting} instance(s) wait: one runs per node, and no other ready node has room for \
         one ({})",
        reasons.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PlannedApp;
    use crate::fit::Capacity;
    use crate::testutil::{cluster, spec};

    #[test]
    fn place_instances_needs_level_1_also_inside_a_batch() {
        let place = Command::PlaceInstances {
            app: "web".into(),
            nodes: vec![2],
        };
        assert_eq!(place.apply_level(), 1);
        let older = Command::KvDelete { key: "k".into() };
        assert_eq!(older.apply_level(), 0);
        assert_eq!(Command::Batch(vec![older.clone()]).apply_level(), 0);
        assert_eq!(Command::Batch(vec![older, place]).apply_level(), 1);
    }

    /// The apps of `s` as planned, and `other` on node 2: a redeploy that adds it there.
    fn with_other_on_2(
        s: &ClusterState,
        other: crate::config::AppSpec,
    ) -> std::collections::BTreeMap<String, PlannedApp> {
        let mut apps: std::collections::BTreeMap<String, PlannedApp> = s
            .apps
            .iter()
            .map(|(n, a)| (n.clone(), a.planned()))
            .collect();
        apps.insert(
            "other".into(),
            PlannedApp {
                spec: other,
                node: Some(2),
            },
        );
        apps
    }

    /// `web` asking for `instances`, with `mem` of memory each, deployed on `s`.
    fn deploy_web(s: &mut ClusterState, instances: u32, mem: Option<u64>) {
        let mut web = spec("web", Some(8080), false);
        web.instances = Some(instances);
        web.mem_limit = mem;
        let apps = [(
            "web".to_string(),
            PlannedApp {
                spec: web,
                node: None,
            },
        )]
        .into();
        let r = s.apply(&Command::deploy_all(apps));
        assert!(!matches!(r, CommandResult::Rejected(_)), "{r:?}");
    }

    fn drain(s: &mut ClusterState, node: NodeId, drain: bool) {
        let r = s.apply(&Command::DrainNode { node, drain });
        assert!(!matches!(r, CommandResult::Rejected(_)), "{r:?}");
    }

    fn report(s: &mut ClusterState, id: NodeId, memory: u64) {
        s.apply(&Command::ReportNode {
            id,
            labels: None,
            capacity: Capacity {
                memory,
                cpus: 2,
                docker: false,
            },
        });
    }

    #[test]
    fn nothing_waits_nothing_is_placed() {
        let mut s = cluster(3);
        assert!(waiting_placements(&s).is_empty());
        deploy_web(&mut s, 3, None);
        assert_eq!(s.apps["web"].instance_nodes().count(), 3);
        assert!(waiting_placements(&s).is_empty());
        assert_eq!(why_instances_wait(&s, "web"), None);
    }

    /// `cluster(nodes)` whose nodes all reported room for anything here.
    fn reported(nodes: u64) -> ClusterState {
        let mut s = cluster(nodes);
        for id in 1..=nodes {
            report(&mut s, id, 1 << 30);
        }
        s
    }

    #[test]
    fn an_instance_waiting_after_a_drain_is_placed_when_the_drain_ends() {
        let mut s = reported(3);
        deploy_web(&mut s, 3, None);
        let third = s.apps["web"].more[1];
        drain(&mut s, third, true);
        assert_eq!(waiting_count(&s, "web"), 1);
        // Draining: nowhere to go, and the reason says why for each node.
        assert!(waiting_placements(&s).is_empty());
        let why = why_instances_wait(&s, "web").unwrap();
        assert!(why.contains("1 instance(s) wait"), "{why}");
        assert!(why.contains("it is draining"), "{why}");
        assert!(
            why.contains("runs one of the app's instances already"),
            "{why}"
        );
        // The drain ends: undrain itself places nothing (its apply is as it was) ...
        drain(&mut s, third, false);
        assert_eq!(s.apps["web"].instance_nodes().count(), 2);
        assert!(why_instances_wait(&s, "web")
            .unwrap()
            .contains("being placed there"));
        // ... the decision does, and its command applied places it.
        let cmds = waiting_placements(&s);
        assert_eq!(
            cmds,
            vec![Command::PlaceInstances {
                app: "web".into(),
                nodes: vec![third]
            }]
        );
        assert_eq!(
            s.apply(&cmds[0]),
            CommandResult::InstancesPlaced {
                placed: vec![third],
                refused: vec![]
            }
        );
        assert!(s.apps["web"].placed_on(third));
        assert!(waiting_placements(&s).is_empty());
        assert_eq!(why_instances_wait(&s, "web"), None);
        // The same command again (a retry) places nothing more.
        assert_eq!(
            s.apply(&cmds[0]),
            CommandResult::InstancesPlaced {
                placed: vec![],
                refused: vec![(third, "the app has all the instances it asks for".into())]
            }
        );
        assert_eq!(s.apps["web"].instance_nodes().count(), 3);
    }

    #[test]
    fn joining_nodes_get_the_waiting_instances_least_loaded_first() {
        let mut s = cluster(1);
        deploy_web(&mut s, 4, None);
        assert_eq!(waiting_count(&s, "web"), 3);
        // Two nodes join; another app on node 2 makes node 3 the less loaded one.
        for _ in 0..2 {
            s.apply(&Command::RegisterNode {
                secret: "s".into(),
                name: None,
                addr: "h:2".into(),
            });
        }
        let mut other = spec("other", Some(9090), false);
        other.ports[0].internal = 81;
        let apps = with_other_on_2(&s, other);
        // The redeploy places web's instances too: take them back off to test the decision.
        s.apply(&Command::deploy_all(apps));
        s.apps.get_mut("web").unwrap().more.clear();
        assert_eq!(waiting_count(&s, "web"), 3);
        // Not before they said what they offer.
        assert!(waiting_placements(&s).is_empty());
        let why = why_instances_wait(&s, "web").unwrap();
        assert!(
            why.contains("n3: it has not reported its capacity yet"),
            "{why}"
        );
        report(&mut s, 2, 1 << 30);
        report(&mut s, 3, 1 << 30);
        let cmds = waiting_placements(&s);
        assert_eq!(
            cmds,
            vec![Command::PlaceInstances {
                app: "web".into(),
                nodes: vec![3, 2]
            }]
        );
        for c in &cmds {
            s.apply(c);
        }
        assert_eq!(
            s.apps["web"].instance_nodes().collect::<Vec<_>>(),
            [1, 3, 2]
        );
        // One still waits: every node has one.
        assert_eq!(waiting_count(&s, "web"), 1);
        assert!(waiting_placements(&s).is_empty());
    }

    #[test]
    fn room_freed_by_memory_is_used_and_counted_across_apps() {
        let mut s = cluster(2);
        report(&mut s, 1, 1000);
        report(&mut s, 2, 100);
        deploy_web(&mut s, 2, Some(300));
        // Node 2 has too little memory: one waits.
        assert_eq!(waiting_count(&s, "web"), 1);
        assert!(waiting_placements(&s).is_empty());
        let why = why_instances_wait(&s, "web").unwrap();
        assert!(why.contains("mem_limit"), "{why}");
        // Node 2 reports more memory (restarted with more): the instance goes there.
        report(&mut s, 2, 1000);
        let cmds = waiting_placements(&s);
        assert_eq!(
            cmds,
            vec![Command::PlaceInstances {
                app: "web".into(),
                nodes: vec![2]
            }]
        );
        s.apply(&cmds[0]);
        assert!(s.apps["web"].placed_on(2));
    }

    #[test]
    fn a_placement_that_no_longer_fits_is_refused_and_changes_nothing() {
        let mut s = cluster(2);
        report(&mut s, 1, 1000);
        report(&mut s, 2, 100);
        deploy_web(&mut s, 2, Some(300));
        report(&mut s, 2, 1000);
        let cmds = waiting_placements(&s);
        assert_eq!(cmds.len(), 1);
        // Before it applies, node 2 shrinks again: the stale placement is refused.
        report(&mut s, 2, 100);
        let before = s.clone();
        match s.apply(&cmds[0]) {
            CommandResult::InstancesPlaced { placed, refused } => {
                assert!(placed.is_empty());
                assert_eq!(refused.len(), 1);
                assert!(refused[0].1.contains("mem_limit"), "{refused:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s, before);
        // A drain, a node already holding one, a port another app takes: refused too.
        report(&mut s, 2, 1000);
        drain(&mut s, 2, true);
        assert!(s.instance_misfit("web", 2).unwrap().contains("draining"));
        drain(&mut s, 2, false);
        assert!(s.instance_misfit("web", 1).unwrap().contains("already"));
        let mut other = spec("other", Some(9090), false);
        other.mem_limit = None;
        let apps = with_other_on_2(&s, other);
        // Internal port 80 is taken on node 2 by `other` now: web's placement there is refused.
        s.apply(&Command::deploy_all(apps));
        assert!(!s.apps["web"].placed_on(2));
        let before = s.clone();
        let r = s.apply(&Command::PlaceInstances {
            app: "web".into(),
            nodes: vec![2],
        });
        assert!(
            matches!(&r, CommandResult::InstancesPlaced { placed, refused }
                if placed.is_empty() && refused[0].1.contains("internal port 80")),
            "{r:?}"
        );
        assert_eq!(s, before);
        assert!(waiting_placements(&s).is_empty());
        // An unknown app, or one with a dataset, is refused.
        assert!(matches!(
            s.apply(&Command::PlaceInstances {
                app: "nope".into(),
                nodes: vec![2],
            }),
            CommandResult::Rejected(ApplyError::UnknownApp { .. })
        ));
    }

    #[test]
    fn an_app_with_a_dataset_never_gets_more_instances() {
        let mut s = cluster(2);
        let apps = [(
            "db".to_string(),
            PlannedApp {
                spec: spec("db", Some(5432), true),
                node: None,
            },
        )]
        .into();
        s.apply(&Command::deploy_all(apps));
        assert_eq!(waiting_count(&s, "db"), 0);
        assert!(waiting_placements(&s).is_empty());
        let node = s.apps["db"].node;
        let other = if node == 1 { 2 } else { 1 };
        assert!(s.instance_misfit("db", other).unwrap().contains("dataset"));
        let r = s.apply(&Command::PlaceInstances {
            app: "db".into(),
            nodes: vec![other],
        });
        assert!(
            matches!(&r, CommandResult::InstancesPlaced { placed, .. } if placed.is_empty()),
            "{r:?}"
        );
    }
}
