//! The leader's placement worker: instances of scaled stateless apps that wait are placed
//! once room appears (a node joins, a drain ends, another app is removed or scaled down, a
//! node reports more capacity). [`flock_scheduler::scale::waiting_placements`] decides from
//! the applied state; this worker proposes its [`Command::PlaceInstances`], whose apply checks
//! each node again, so a proposal from a stale view or a retry places nothing twice. It
//! proposes only once every member not down runs a build that applies that command
//! ([`flock_decide::upgrade`]): during a rolling upgrade, the instances wait for it.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tokio::sync::watch;

use flock_scheduler::{Command, CommandResult};

use crate::cluster::Cluster;
use crate::worker::WorkerStatus;

/// How often the leader looks for instances that wait and a node with room for them.
const PLACEMENT_TICK: Duration = Duration::from_millis(500);

/// On the leader: places waiting instances where they fit, until `shutdown`.
pub async fn run(cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>, status: WorkerStatus) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(PLACEMENT_TICK) => {}
        }
        let m = cluster.metrics();
        // A new leader acts once it applied an entry of its own term: its view is then the
        // committed state, not a predecessor's tail.
        if m.state != ServerState::Leader
            || m.last_applied.map(|l| l.leader_id.term) != Some(m.current_term)
        {
            status.idle("not the leader");
            continue;
        }
        let levels = cluster.leases.recent_levels();
        let (cmds, waiting, older) = {
            let view = cluster.view.read();
            let state = &view.cluster;
            let waiting: usize = state
                .apps
                .keys()
                .map(|n| flock_scheduler::scale::waiting_count(state, n))
                .sum();
            let cmds = flock_scheduler::scale::waiting_placements(state);
            let need = cmds.iter().map(Command::apply_level).max().unwrap_or(0);
            let older = flock_decide::upgrade::cannot_apply(state, cluster.node_id, &levels, need);
            (cmds, waiting, older)
        };
        if cmds.is_empty() {
            status.idle(if waiting == 0 {
                "leader: no instance waits".to_string()
            } else {
                format!("leader: {waiting} instance(s) wait, no node has room yet")
            });
            continue;
        }
        // An entry an older member cannot decode would stop its log: wait for its upgrade.
        if !older.is_empty() {
            status.idle(format!(
                "leader: {waiting} instance(s) wait: node(s) {} run a build that cannot apply \
                 their placement (upgrade them)",
                older.join(", ")
            ));
            continue;
        }
        status.running();
        for cmd in cmds {
            let Command::PlaceInstances { app, nodes } = &cmd else {
                continue;
            };
            let (app, nodes) = (app.clone(), nodes.clone());
            let deadline = std::time::Instant::now() + cluster.request_timeout;
            match cluster.propose_local(cmd, deadline).await {
                Ok(CommandResult::InstancesPlaced { placed, refused }) => {
                    if !placed.is_empty() {
                        tracing::info!(
                            app,
                            ?placed,
                            "placed waiting instances where room appeared"
                        );
                    }
                    for (node, why) in refused {
                        tracing::info!(app, node, reason = %why, "a waiting instance no longer fits");
                    }
                }
                Ok(CommandResult::Rejected(e)) => {
                    tracing::info!(app, ?nodes, error = %e, "could not place waiting instances");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::info!(app, ?nodes, error = %e, "could not place waiting instances");
                    status.error(format!("placing instances of {app}: {e}"));
                }
            }
        }
        status.idle("placed waiting instances");
    }
}
