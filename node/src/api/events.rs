//! `flockctl node down` and `flockctl events`: an operator's declaration that a node is dead,
//! and the record of nodes going down and coming back, failovers and what they may have lost.

use serde::Serialize;
use tonic::Response;

use flock_proto::v1::{
    DatasetDropDivergedReply, DatasetDropDivergedRequest, DrainedApp, EventsReply, EventsRequest,
    NodeDownReply, NodeDownRequest, NodeDrainReply, NodeDrainRequest,
};
use flock_scheduler::failover::{Event, EventKind};
use flock_scheduler::{ClusterState, Command, CommandResult, NodeId};

use super::datasets::resolve_node;
use super::ApiService;
use crate::cluster::ClusterError;

/// An event as `flockctl events --json` shows it.
#[derive(Serialize)]
struct EventView<'a> {
    id: u64,
    at_unix_ms: u64,
    text: String,
    /// For a failover: how many milliseconds of writes before the old primary stopped may be
    /// lost, from the snapshot it failed over from until the old primary's lease ran out (its
    /// apps took writes until then: the stored `at_risk_ms` ends when it was last heard).
    #[serde(skip_serializing_if = "Option::is_none")]
    may_lose_ms: Option<u64>,
    event: &'a EventKind,
}

/// The window of writes a failover may have lost: `at_risk_ms` (snapshot to last heard) plus
/// the lease, which the old primary's apps could still write under.
fn may_lose_ms(what: &EventKind) -> Option<u64> {
    match what {
        EventKind::FailedOver { at_risk_ms, .. } => Some(
            at_risk_ms.saturating_add(
                u64::try_from(
                    flock_decide::lease::LeaseConfig::default()
                        .lease
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
            ),
        ),
        _ => None,
    }
}

fn name(state: &ClusterState, id: NodeId) -> String {
    state
        .nodes
        .get(&id)
        .map_or_else(|| format!("#{id}"), |n| n.name.clone())
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// One line saying what happened.
pub fn describe(state: &ClusterState, e: &Event) -> String {
    match &e.what {
        EventKind::NodeDown {
            node,
            last_heard_unix_ms,
            by_operator,
        } => format!(
            "node {} declared down{} (last heard {} before)",
            name(state, *node),
            if *by_operator { " by an operator" } else { "" },
            seconds(e.at_unix_ms.saturating_sub(*last_heard_unix_ms))
        ),
        EventKind::NodeUp { node } => format!(
            "node {} is back up (heard steadily again); work may be placed on it",
            name(state, *node)
        ),
        EventKind::FailedOver {
            dataset,
            apps,
            from,
            to,
            epoch,
            snapshot,
            ..
        } => format!(
            "dataset {dataset}{} failed over from {} to {} (epoch {epoch}), from snapshot {}; \
             writes in the last {} before {}'s lease ran out may be lost (they are kept there)",
            if apps.is_empty() {
                String::new()
            } else {
                format!(" (app {})", apps.join(", "))
            },
            name(state, *from),
            name(state, *to),
            snapshot.as_deref().unwrap_or("(none: empty)"),
            seconds(may_lose_ms(&e.what).unwrap_or_default()),
            name(state, *from)
        ),
        EventKind::NoReplica {
            dataset,
            node,
            reason,
        } => format!(
            "dataset {dataset} on {} cannot fail over: {reason}; its apps wait for the node",
            name(state, *node)
        ),
        EventKind::Replaced { app, from, to } => format!(
            "app {app} (stateless) placed on {} instead of {}",
            name(state, *to),
            name(state, *from)
        ),
        EventKind::DivergedKept {
            dataset,
            node,
            snapshot,
        } => match snapshot {
            Some(s) => format!(
                "{} kept its diverged writes of {dataset} in snapshot {s} and is a replica again",
                name(state, *node)
            ),
            None => format!(
                "{}'s diverged copy of {dataset} was given up; it is a replica again",
                name(state, *node)
            ),
        },
    }
}

impl ApiService {
    pub(super) async fn node_down_impl(
        &self,
        req: NodeDownRequest,
    ) -> Result<Response<NodeDownReply>, ClusterError> {
        let id = {
            let state = self.cluster.view.read();
            resolve_node(&state.cluster, &req.name)?
        };
        if id == self.cluster.node_id && self.cluster.is_leader() {
            // Allowed (the leader steps nothing down itself; a new leader will declare it),
            // but said plainly in the log.
            tracing::warn!(
                node = id,
                "an operator declared this node (the leader) down"
            );
        }
        match self
            .cluster
            .propose(Command::CondemnNode { node: id })
            .await?
        {
            CommandResult::NodeCondemned => {}
            CommandResult::Rejected(e) => return Err(ClusterError::Refused(e.to_string())),
            other => {
                return Err(ClusterError::Refused(format!(
                    "unexpected result {other:?}"
                )))
            }
        }
        let cfg = self.cluster.leases.config();
        Ok(Response::new(NodeDownReply {
            node_id: id,
            within_ms: u64::try_from(cfg.down_after().as_millis()).unwrap_or(u64::MAX),
        }))
    }

    pub(super) async fn node_drain_impl(
        &self,
        req: NodeDrainRequest,
    ) -> Result<Response<NodeDrainReply>, ClusterError> {
        let id = {
            let state = self.cluster.view.read();
            resolve_node(&state.cluster, &req.name)?
        };
        let cmd = Command::DrainNode {
            node: id,
            drain: !req.undo,
        };
        match self.cluster.propose(cmd).await? {
            CommandResult::NodeDraining { .. } => {}
            CommandResult::Rejected(e) => return Err(ClusterError::Refused(e.to_string())),
            other => {
                return Err(ClusterError::Refused(format!(
                    "unexpected result {other:?}"
                )))
            }
        }
        if req.undo {
            return Ok(Response::new(NodeDrainReply { apps: Vec::new() }));
        }
        // Planned on the state after the drain applied: its own reservations aside.
        let state = self.cluster.read(false, |a| a.cluster.clone()).await?;
        let mut apps = Vec::new();
        for (app, to) in flock_scheduler::failover::drain_plan(&state, id) {
            let result = match to {
                Ok(to) => match self
                    .cluster
                    .propose(Command::MoveApp {
                        app: app.clone(),
                        to,
                    })
                    .await?
                {
                    CommandResult::AppMoved { .. } => Ok(name(&state, to)),
                    CommandResult::Rejected(e) => Err(e.to_string()),
                    other => Err(format!("unexpected result {other:?}")),
                },
                Err(why) => Err(why),
            };
            apps.push(match result {
                Ok(to) => DrainedApp {
                    app,
                    to,
                    error: String::new(),
                },
                Err(error) => DrainedApp {
                    app,
                    to: String::new(),
                    error,
                },
            });
        }
        Ok(Response::new(NodeDrainReply { apps }))
    }

    pub(super) async fn drop_diverged_impl(
        &self,
        req: DatasetDropDivergedRequest,
    ) -> Result<Response<DatasetDropDivergedReply>, ClusterError> {
        let (dataset, node) = {
            let state = self.cluster.view.read();
            let node = resolve_node(&state.cluster, &req.node)?;
            let ds = state.cluster.dataset_by_name(&req.name).ok_or_else(|| {
                ClusterError::NotFound(format!(
                    "no dataset named {} (`flockctl dataset ls` lists them)",
                    flock_scheduler::shown(&req.name)
                ))
            })?;
            if !state.cluster.failover.is_diverged(ds.id, node) {
                return Err(ClusterError::Refused(format!(
                    "node {} holds no diverged copy of {} (`flockctl dataset ls {}` lists them)",
                    name(&state.cluster, node),
                    ds.name,
                    ds.name
                )));
            }
            (ds.id, node)
        };
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let cmd = Command::KeepDiverged {
            dataset,
            node,
            snapshot: None,
            at_unix_ms: at,
        };
        match self.cluster.propose(cmd).await? {
            CommandResult::DivergedKept => Ok(Response::new(DatasetDropDivergedReply {})),
            CommandResult::Rejected(e) => Err(ClusterError::Refused(e.to_string())),
            other => Err(ClusterError::Refused(format!(
                "unexpected result {other:?}"
            ))),
        }
    }

    pub(super) async fn events_impl(
        &self,
        req: EventsRequest,
    ) -> Result<Response<EventsReply>, ClusterError> {
        let (json, next) = self
            .cluster
            .read(false, |applied| {
                let state = &applied.cluster;
                let views: Vec<EventView> = state
                    .failover
                    .events
                    .iter()
                    .filter(|e| e.id >= req.after)
                    .map(|e| EventView {
                        id: e.id,
                        at_unix_ms: e.at_unix_ms,
                        text: describe(state, e),
                        may_lose_ms: may_lose_ms(&e.what),
                        event: &e.what,
                    })
                    .collect();
                (
                    serde_json::to_string(&views).unwrap_or_else(|_| "[]".into()),
                    state.failover.next_event,
                )
            })
            .await?;
        Ok(Response::new(EventsReply {
            events_json: json,
            next,
        }))
    }
}
