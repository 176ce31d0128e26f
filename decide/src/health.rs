//! Health reports: which changes of this node's instances' health go through Raft.
//!
//! The mesh routes by the health the replicated state records ([`flock_scheduler::App::health`],
//! [`flock_scheduler::App::serves_on`]). A node proposes [`Command::ReportHealth`] only when
//! what it sees differs from that record, so the log carries transitions, not every check. The
//! record itself is the "previous report": a proposal that failed is proposed again on the next
//! look, and one that was applied is not repeated.

use flock_scheduler::app::{instance_key, Health};
use flock_scheduler::{App, ClusterState, Command, NodeId};

use crate::apps::{AppsSeen, SeenState};

/// Whether `app`'s spec asks for a health check (one that is not disabled).
fn has_check(app: &App) -> bool {
    app.spec.healthcheck.as_ref().is_some_and(|c| !c.disable)
}

/// What `seen` says of instance `key`'s health, `None` when it says nothing to report:
/// - running with a verdict: healthy or unhealthy; still starting (no verdict yet): starting;
/// - running without a verdict: starting if its spec has a check, else nothing (an app
///   without a check never has a record, and routes as it always did);
/// - not running (exited, or not there) while its driver could be listed: starting, so a
///   record made for the instance that ran does not route to one that does not (yet);
/// - unknown (a driver that could not be listed, an instance in an unknown state): nothing,
///   the record stays as it is. Unknown is not taken as healthy, but not as a change either.
fn observed(app: &App, key: &str, seen: &AppsSeen) -> Option<Health> {
    let instances = seen.instances.get(key).map_or(&[][..], Vec::as_slice);
    if instances.iter().any(|i| i.state == SeenState::Running) {
        if seen.starting.contains(key) {
            return Some(Health::Starting);
        }
        return match seen.health.get(key) {
            Some(true) => Some(Health::Healthy),
            Some(false) => Some(Health::Unhealthy),
            None => has_check(app).then_some(Health::Starting),
        };
    }
    let unknown = !seen.blind.is_empty()
        || instances
            .iter()
            .any(|i| matches!(i.state, SeenState::Unknown { .. }));
    (!unknown).then_some(Health::Starting)
}

/// The reports node `me` proposes now: one per instance placed here whose observed health
/// differs from its record. An instance with a check that does not run yet is reported
/// starting before it starts (the look that starts it proposes it), so a new instance (after a
/// move, a failover, a scale-up) gets no connection until its check passes. One without a
/// check and without a record needs none.
pub fn reports(state: &ClusterState, me: NodeId, seen: &AppsSeen) -> Vec<Command> {
    let mut out = Vec::new();
    for (name, app) in &state.apps {
        // Instance 1 runs where `app_runs_on` says (the primary, while its dataset moves
        // before the handoff); the others on their nodes.
        let first = state.app_runs_on(app);
        let index = if first == Some(me) {
            Some(1)
        } else {
            app.more.iter().position(|n| *n == me).map(|i| i + 2)
        };
        let Some(index) = index else { continue };
        let key = instance_key(name, index);
        let Some(health) = observed(app, &key, seen) else {
            continue;
        };
        let recorded = app.health.get(&me).copied();
        let news = match recorded {
            Some(r) => r != health,
            // Nothing recorded: a running instance's verdict is news, and so is a checked
            // one that is about to start; an unchecked one that does not run is not.
            None => {
                has_check(app)
                    || seen
                        .instances
                        .get(&key)
                        .is_some_and(|is| is.iter().any(|i| i.state == SeenState::Running))
            }
        };
        if news {
            out.push(Command::ReportHealth {
                app: name.clone(),
                node: me,
                health,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::apps::{DriverKind, Seen};
    use crate::testutil;
    use flock_scheduler::config::{HealthCheck, PlannedApp};

    /// `web` with two instances (nodes 1 and 2 of 3), with a health check if `checked`.
    fn web(checked: bool) -> ClusterState {
        let mut s = testutil::cluster(3);
        let mut spec = testutil::spec("web", false);
        spec.volume = None;
        spec.instances = Some(2);
        spec.healthcheck = checked.then(|| HealthCheck {
            test: vec!["CMD".into(), "true".into()],
            interval_ms: None,
            timeout_ms: None,
            retries: None,
            start_period_ms: None,
            disable: false,
        });
        let apps = BTreeMap::from([(
            "web".to_string(),
            PlannedApp {
                spec,
                node: Some(1),
            },
        )]);
        testutil::ok(&mut s, Command::deploy_all(apps));
        assert_eq!(s.apps["web"].instance_nodes().collect::<Vec<_>>(), [1, 2]);
        s
    }

    fn running(key: &str) -> AppsSeen {
        AppsSeen {
            instances: BTreeMap::from([(
                key.to_string(),
                vec![Seen {
                    kind: DriverKind::Process,
                    state: SeenState::Running,
                    fingerprint: "f".into(),
                    id: "1".into(),
                    restarts: 0,
                }],
            )]),
            ..Default::default()
        }
    }

    fn report(node: NodeId, health: Health) -> Command {
        Command::ReportHealth {
            app: "web".into(),
            node,
            health,
        }
    }

    /// Applies every report: what the next look then sees recorded.
    fn apply(s: &mut ClusterState, cmds: &[Command]) {
        for c in cmds {
            testutil::ok(s, c.clone());
        }
    }

    #[test]
    fn transitions_are_reported_once_each() {
        let mut s = web(true);
        // Node 2 runs instance 2 (`web.2`): starting (no verdict yet, or one in `starting`).
        let mut seen = running("web.2");
        assert_eq!(reports(&s, 2, &seen), [report(2, Health::Starting)]);
        seen.health.insert("web.2".into(), false);
        seen.starting.insert("web.2".into());
        let r = reports(&s, 2, &seen);
        assert_eq!(r, [report(2, Health::Starting)]);
        // Not applied (the proposal failed): proposed again; applied: not repeated.
        assert_eq!(reports(&s, 2, &seen), r);
        apply(&mut s, &r);
        assert!(reports(&s, 2, &seen).is_empty());
        seen.starting.clear();
        seen.health.insert("web.2".into(), true);
        let r = reports(&s, 2, &seen);
        assert_eq!(r, [report(2, Health::Healthy)]);
        apply(&mut s, &r);
        seen.health.insert("web.2".into(), false);
        let r = reports(&s, 2, &seen);
        assert_eq!(r, [report(2, Health::Unhealthy)]);
        apply(&mut s, &r);
        assert!(reports(&s, 2, &seen).is_empty());
        // Node 1 runs nothing of it yet: starting, before it starts; node 3 has no instance.
        assert_eq!(
            reports(&s, 1, &AppsSeen::default()),
            [report(1, Health::Starting)]
        );
        assert!(reports(&s, 3, &running("web")).is_empty());
        // It exited: starting, so its record routes to nothing that does not run.
        let r = reports(&s, 2, &AppsSeen::default());
        assert_eq!(r, [report(2, Health::Starting)]);
        apply(&mut s, &r);
        // A driver that could not be listed changes nothing.
        let blind = AppsSeen {
            blind: BTreeMap::from([(DriverKind::Process, "down".into())]),
            ..Default::default()
        };
        assert!(reports(&s, 2, &blind).is_empty());
    }

    #[test]
    fn an_app_without_a_check_is_never_reported() {
        let s = web(false);
        assert!(reports(&s, 1, &running("web")).is_empty());
        assert!(reports(&s, 1, &AppsSeen::default()).is_empty());
        // An image's own check (docker) gives verdicts: those are reported.
        let mut seen = running("web");
        seen.health.insert("web".into(), true);
        assert_eq!(reports(&s, 1, &seen), [report(1, Health::Healthy)]);
    }
}
