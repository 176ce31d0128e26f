//! The application calls of the API: deploy through Raft, status from the nodes that run them.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use tonic::{Request, Response, Status};

use flock_proto::v1 as pb;
use flock_scheduler::app::{plan_deploy, Change};
use flock_scheduler::config::{AppSpec, PlannedApp, VolumePolicy};
use flock_scheduler::{ClusterState, Command, CommandResult, DatasetId, NodeId};

use flock_scheduler::state::node_name;

use super::datasets::FORWARDED;
use super::{unexpected, ApiService, Reply};
use crate::cluster::ClusterError;

const NODE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most a deploy's volume policies may take (JSON): far more than any real file needs.
const MAX_VOLUMES_JSON: usize = 1 << 20;

/// A volume's size limit a deploy changes: (app, its dataset, the limit now, the new one).
type LimitChange = (String, DatasetId, Option<u64>, Option<u64>);

/// The existing datasets of `apps` whose `maximum_size` differs from their limit now.
fn limit_changes(state: &ClusterState, apps: &BTreeMap<String, PlannedApp>) -> Vec<LimitChange> {
    apps.iter()
        .filter_map(|(name, planned)| {
            let wanted = planned.spec.volume.as_ref()?.maximum_size;
            let ds = state.datasets.get(&state.apps.get(name)?.dataset?)?;
            (ds.size_limit != wanted).then(|| (name.clone(), ds.id, ds.size_limit, wanted))
        })
        .collect()
}

fn changes_proto(state: &ClusterState, changes: &[Change]) -> Vec<pb::AppChange> {
    changes
        .iter()
        .map(|c| {
            let (kind, node, from) = match c {
                Change::Start { node, .. } => ("start", *node, None),
                Change::Stop { node, .. } => ("stop", *node, None),
                Change::Update { node, .. } => ("update", *node, None),
                Change::Move { from, to, .. } => ("move", *to, Some(*from)),
            };
            pb::AppChange {
                kind: kind.into(),
                app: c.app().to_string(),
                node: node_name(state, node),
                from_node: from.map(|f| node_name(state, f)).unwrap_or_default(),
            }
        })
        .collect()
}

/// An error listing `problems` after `what`: the first few (an error's message travels in a
/// header, whose size is limited), and how many there are.
fn problems_error(what: &str, problems: &[String]) -> Status {
    const SHOWN: usize = 10;
    let more = problems.len().saturating_sub(SHOWN);
    Status::failed_precondition(format!(
        "{what}: {}{}",
        problems[..problems.len().min(SHOWN)].join("; "),
        if more > 0 {
            format!("; and {more} more (`flockctl deploy --dry-run` lists them all)")
        } else {
            String::new()
        }
    ))
}

/// Each placed instance of `app` (whose first instance's status is `first`) as its node
/// reports it.
fn instances_of(
    state: &ClusterState,
    first: &pb::AppStatus,
    app: &flock_scheduler::App,
    reports: &BTreeMap<NodeId, Option<pb::LocalAppsReply>>,
) -> Vec<pb::AppInstance> {
    let recorded = |node: NodeId| {
        app.health
            .get(&node)
            .map_or_else(String::new, |h| h.as_str().to_string())
    };
    let mut out = vec![pb::AppInstance {
        key: first.name.clone(),
        node: first.node.clone(),
        state: first.state.clone(),
        restarts: first.restarts,
        detail: first.detail.clone(),
        routed_health: recorded(state.app_runs_on(app).unwrap_or(app.node)),
    }];
    for (i, node) in app.more.iter().enumerate() {
        let key = flock_scheduler::app::instance_key(&first.name, i + 2);
        let (state_word, restarts, detail) = match reports.get(node) {
            Some(Some(r)) => match r.apps.iter().find(|a| a.name == key) {
                Some(a) => (a.state.clone(), a.restarts, a.detail.clone()),
                None => ("starting".to_string(), 0, String::new()),
            },
            _ => (
                "unreachable".to_string(),
                0,
                format!("node {} did not answer", node_name(state, *node)),
            ),
        };
        out.push(pb::AppInstance {
            key,
            node: node_name(state, *node),
            state: state_word,
            restarts,
            detail,
            routed_health: recorded(*node),
        });
    }
    out
}

impl ApiService {
    /// Deploys `deploy` (a [`Command::Deploy`]; or, with `dry_run`, says what deploying it
    /// would change). With `problems_in_reply`, what stops it is in the reply's `problems`.
    async fn deploy_plan(
        &self,
        deploy: Command,
        volumes: Option<BTreeMap<String, VolumePolicy>>,
        dry_run: bool,
        problems_in_reply: bool,
    ) -> Reply<pb::DeployReply> {
        // Sizes first: an oversized deploy is refused before it is planned or sent to nodes.
        deploy.check_limits().map_err(ClusterError::from)?;
        let Command::Deploy { stack, apps, .. } = &deploy else {
            return Err(Status::internal("deploy_plan takes a Command::Deploy"));
        };
        // Plan on the current state and ask each node that gets an app whether it can run it,
        // so a missing image or program is an error now, with nothing deployed. `apply` plans
        // again on the state it finds (a deploy may have come between).
        let state = self.cluster.read(false, |a| a.cluster.clone()).await?;
        let all = state
            .with_stack(stack.as_deref(), apps)
            .map_err(ClusterError::from)?;
        let (_, changes) = plan_deploy(&state, &all).map_err(ClusterError::from)?;
        let (warnings, problems) = self.preflight(&state, &all, &changes).await;
        if !problems.is_empty() {
            if problems_in_reply {
                return Ok(Response::new(pb::DeployReply {
                    changes: changes_proto(&state, &changes),
                    generation: state.deploy_generation,
                    warnings,
                    problems,
                }));
            }
            // An older flockctl reads them from the error.
            return Err(problems_error("nothing was deployed", &problems));
        }
        // Existing volumes whose maximum_size changes: a limit below what one holds is
        // refused now, with nothing deployed.
        let limits = limit_changes(&state, apps);
        self.check_lower_limits(&state, &limits).await?;
        if dry_run {
            return Ok(Response::new(pb::DeployReply {
                changes: changes_proto(&state, &changes),
                generation: state.deploy_generation,
                warnings,
                problems: Vec::new(),
            }));
        }
        // Checked and planned in today's form; sent in the older one when it can say it, so
        // nodes not upgraded yet still apply it.
        match self.cluster.propose(deploy.for_older_peers()).await? {
            CommandResult::Deployed {
                generation,
                changes,
            } => {
                let mut warnings = warnings;
                // On a follower the deploy may not have applied here yet: read linearizably,
                // or the new apps' volume policies would be skipped.
                let state = self.cluster.read(false, |a| a.cluster.clone()).await?;
                warnings.extend(self.apply_volume_policies(&state, &limits, volumes).await);
                let state = self.cluster.view.read().cluster.clone();
                Ok(Response::new(pb::DeployReply {
                    changes: changes_proto(&state, &changes),
                    generation,
                    warnings,
                    problems: Vec::new(),
                }))
            }
            CommandResult::Rejected(e) => Err(ClusterError::from(e).into()),
            other => Err(unexpected(other)),
        }
    }

    /// Refuses a lower limit (of `limits`) below what the dataset's primary says its live data
    /// takes, or when the primary cannot tell.
    async fn check_lower_limits(
        &self,
        state: &ClusterState,
        limits: &[LimitChange],
    ) -> Result<(), Status> {
        let lower: Vec<(&LimitChange, NodeId, String)> = limits
            .iter()
            .filter(|(_, _, now, new)| match (now, new) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(a), Some(b)) => b < a,
            })
            .filter_map(|c| {
                let ds = state.datasets.get(&c.1)?;
                let addr = state.nodes.get(&ds.primary)?.addr.clone();
                Some((c, ds.primary, addr))
            })
            .collect();
        if lower.is_empty() {
            return Ok(());
        }
        let nodes: Vec<(NodeId, String)> = lower.iter().map(|(_, n, a)| (*n, a.clone())).collect();
        let reports = self.reports(&nodes).await;
        for ((app, id, _, new), primary, _) in &lower {
            let new = new.unwrap_or(u64::MAX);
            let held = reports
                .iter()
                .find(|(n, _)| n == primary)
                .and_then(|(_, r)| r.as_ref())
                .and_then(|r| r.datasets.iter().find(|d| d.id == *id))
                .map(|d| d.referenced_bytes);
            match held {
                Some(b) if b <= new => {}
                Some(b) => {
                    return Err(Status::failed_precondition(format!(
                        "app {app}'s volume holds {} of data, more than the new maximum_size of {}; delete data first or choose at least {}",
                        flock_client::human(b),
                        flock_client::human(new),
                        flock_client::human(b)
                    )))
                }
                None => {
                    return Err(Status::unavailable(format!(
                        "cannot lower the maximum_size of app {app}'s volume: its primary (node {}) did not say how much it holds; try again",
                        node_name(state, *primary)
                    )))
                }
            }
        }
        Ok(())
    }

    /// After a deploy applied: the size limits of `limits` and the retention of every planned
    /// app's volume (`volumes`; `None` leaves them). What could not be applied, as warnings.
    async fn apply_volume_policies(
        &self,
        state: &ClusterState,
        limits: &[LimitChange],
        volumes: Option<BTreeMap<String, VolumePolicy>>,
    ) -> Vec<String> {
        let mut cmds = Vec::new();
        for (app, id, _, new) in limits {
            cmds.push((
                app.clone(),
                Command::SetDatasetLimit {
                    dataset: *id,
                    size_limit: *new,
                },
            ));
        }
        for (app, policy) in volumes.into_iter().flatten() {
            let Some(ds) = state
                .apps
                .get(&app)
                .and_then(|a| a.dataset)
                .and_then(|id| state.datasets.get(&id))
            else {
                continue;
            };
            if ds.retention != policy.retention {
                cmds.push((
                    app.clone(),
                    Command::SetRetention {
                        dataset: ds.id,
                        retention: policy.retention,
                    },
                ));
            }
            let replication = policy.replication();
            if state.failover.replication_of(ds.id) != replication {
                cmds.push((
                    app,
                    Command::SetReplication {
                        dataset: ds.id,
                        replication,
                    },
                ));
            }
        }
        let mut warnings = Vec::new();
        for (app, cmd) in cmds {
            let r = match cmd.check_limits() {
                Ok(()) => self.cluster.propose(cmd).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match r {
                Ok(
                    CommandResult::DatasetLimitSet
                    | CommandResult::RetentionSet
                    | CommandResult::ReplicationSet,
                ) => {}
                Ok(other) => warnings.push(format!(
                    "app {app}'s volume policy was not applied: {}",
                    match other {
                        CommandResult::Rejected(e) => e.to_string(),
                        o => format!("{o:?}"),
                    }
                )),
                Err(e) => warnings.push(format!(
                    "app {app}'s volume policy was not applied: {e}; deploy again"
                )),
            }
        }
        warnings
    }

    /// Asks every node that starts, moves in or updates an app of `changes` whether it can run
    /// it. An error listing every problem found; otherwise warnings naming the nodes that did
    /// not answer (their apps were not checked).
    async fn preflight(
        &self,
        state: &ClusterState,
        apps: &BTreeMap<String, PlannedApp>,
        changes: &[Change],
    ) -> (Vec<String>, Vec<String>) {
        let mut by_node: BTreeMap<NodeId, Vec<&AppSpec>> = BTreeMap::new();
        for c in changes {
            let node = match c {
                Change::Start { node, .. } | Change::Update { node, .. } => *node,
                Change::Move { to, .. } => *to,
                Change::Stop { .. } => continue,
            };
            by_node.entry(node).or_default().push(&apps[c.app()].spec);
        }
        let answers = join_all(by_node.iter().map(|(id, specs)| async move {
            if *id == self.cluster.node_id {
                let mut problems = Vec::new();
                for spec in specs {
                    if let Some(p) = self.drivers.preflight(spec).await {
                        problems.push(pb::AppProblem {
                            app: spec.name.clone(),
                            problem: p,
                        });
                    }
                }
                return (*id, Some(problems));
            }
            let Some(node) = state.nodes.get(id) else {
                return (*id, None);
            };
            let Ok(mut client) = self.cluster.peer(*id, &node.addr) else {
                return (*id, None);
            };
            let spec_json = specs
                .iter()
                .map(|s| serde_json::to_string(s).expect("an AppSpec is plain data"))
                .collect();
            let mut req = Request::new(pb::CheckAppsRequest { spec_json });
            req.set_timeout(NODE_TIMEOUT);
            let r = tokio::time::timeout(NODE_TIMEOUT, client.check_apps(req)).await;
            (
                *id,
                r.ok().and_then(|r| r.ok()).map(|r| r.into_inner().problems),
            )
        }))
        .await;
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        for (id, answer) in answers {
            let name = node_name(state, id);
            match answer {
                Some(ps) => problems.extend(
                    ps.into_iter()
                        .map(|p| format!("app {} on node {name}: {}", p.app, p.problem)),
                ),
                None => warnings.push(format!(
                    "node {name} did not answer; whether it can run {} was not checked",
                    by_node[&id]
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        }
        (warnings, problems)
    }

    pub(super) async fn do_app_move(
        &self,
        req: Request<pb::AppMoveRequest>,
    ) -> Reply<pb::AppMoveReply> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let state = self.cluster.read(false, |a| a.cluster.clone()).await?;
        let Some(app) = state.apps.get(&req.name) else {
            return Err(ClusterError::NotFound(format!(
                "no app named {:?} (`flockctl app ls` lists them)",
                req.name
            ))
            .into());
        };
        let dataset = app
            .dataset
            .and_then(|id| state.datasets.get(&id))
            .map(|d| d.name.clone())
            .unwrap_or_default();
        if req.cancel {
            return match self
                .cluster
                .propose(Command::CancelAppMove { app: req.name })
                .await?
            {
                CommandResult::AppMoveCancelled { node } => Ok(Response::new(pb::AppMoveReply {
                    from_node: node_name(&state, app.node),
                    to_node: node_name(&state, node),
                    dataset,
                })),
                CommandResult::Rejected(e) => Err(ClusterError::from(e).into()),
                other => Err(unexpected(other)),
            };
        }
        let to = super::resolve_node(&state, &req.to)?;
        // The target must be able to start it before anything moves or stops.
        let move_change = [Change::Move {
            app: req.name.clone(),
            from: app.node,
            to,
        }];
        let one: BTreeMap<String, PlannedApp> = [(
            req.name.clone(),
            PlannedApp {
                spec: app.spec.clone(),
                node: Some(to),
            },
        )]
        .into();
        let (warnings, problems) = self.preflight(&state, &one, &move_change).await;
        if !problems.is_empty() {
            return Err(problems_error("nothing was moved", &problems));
        }
        if !warnings.is_empty() {
            return Err(Status::unavailable(format!(
                "{}; the move was not started",
                warnings.join("; ")
            )));
        }
        match self
            .cluster
            .propose(Command::MoveApp {
                app: req.name.clone(),
                to,
            })
            .await?
        {
            CommandResult::AppMoved { from, .. } => Ok(Response::new(pb::AppMoveReply {
                from_node: node_name(&state, from),
                to_node: node_name(&state, to),
                dataset,
            })),
            CommandResult::Rejected(e) => Err(ClusterError::from(e).into()),
            other => Err(unexpected(other)),
        }
    }

    pub(super) async fn do_check_apps(
        &self,
        req: Request<pb::CheckAppsRequest>,
    ) -> Reply<pb::CheckAppsReply> {
        self.authorize(&req)?;
        let mut problems = Vec::new();
        for json in req.into_inner().spec_json {
            let spec: AppSpec = serde_json::from_str(&json)
                .map_err(|e| Status::invalid_argument(format!("undecodable app spec: {e}")))?;
            if let Some(p) = self.drivers.preflight(&spec).await {
                problems.push(pb::AppProblem {
                    app: spec.name,
                    problem: p,
                });
            }
        }
        Ok(Response::new(pb::CheckAppsReply { problems }))
    }

    pub(super) async fn do_deploy(
        &self,
        req: Request<pb::DeployRequest>,
    ) -> Reply<pb::DeployReply> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let apps: BTreeMap<String, PlannedApp> = serde_json::from_str(&req.plan_json)
            .map_err(|e| Status::invalid_argument(format!("undecodable deploy plan: {e}")))?;
        // An older flockctl sends no policies: they are left as they are.
        let volumes = if req.volumes_json.is_empty() {
            None
        } else {
            if req.volumes_json.len() > MAX_VOLUMES_JSON {
                return Err(Status::invalid_argument(format!(
                    "the deploy's volume policies take {} bytes, over the limit of {MAX_VOLUMES_JSON}",
                    req.volumes_json.len()
                )));
            }
            Some(serde_json::from_str(&req.volumes_json).map_err(|e| {
                Status::invalid_argument(format!("undecodable volume policies: {e}"))
            })?)
        };
        let stack = (!req.stack.is_empty()).then_some(req.stack);
        let deploy = Command::Deploy {
            stack,
            apps,
            secrets: req.secrets.into_iter().collect(),
        };
        self.deploy_plan(deploy, volumes, req.dry_run, req.problems_in_reply)
            .await
    }

    pub(super) async fn do_app_remove(
        &self,
        req: Request<pb::AppRemoveRequest>,
    ) -> Reply<pb::DeployReply> {
        self.authorize(&req)?;
        let name = req.into_inner().name;
        let state = self.cluster.read(false, |a| a.cluster.clone()).await?;
        if !state.apps.contains_key(&name) {
            return Err(ClusterError::NotFound(format!(
                "no app named {} (`flockctl app ls` lists them)",
                flock_scheduler::shown(&name)
            ))
            .into());
        }
        // The app's stack is deployed again without it (and with its secrets as they are).
        let deploy = state.remove_command(&name).map_err(ClusterError::from)?;
        self.deploy_plan(deploy, None, false, false).await
    }

    pub(super) async fn do_app_scale(
        &self,
        req: Request<pb::AppScaleRequest>,
    ) -> Reply<pb::DeployReply> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let state = self.cluster.read(false, |a| a.cluster.clone()).await?;
        let deploy = state
            .scale_command(&r.name, r.instances)
            .map_err(ClusterError::from)?;
        self.deploy_plan(deploy, None, r.dry_run, false).await
    }

    pub(super) async fn do_local_apps(
        &self,
        req: Request<pb::LocalAppsRequest>,
    ) -> Reply<pb::LocalAppsReply> {
        self.authorize(&req)?;
        Ok(Response::new(self.local_apps_report()))
    }

    fn local_apps_report(&self) -> pb::LocalAppsReply {
        let state = self.cluster.view.read().cluster.clone();
        let view = self.apps.snapshot();
        let transfers = self.datasets.transfers();
        pb::LocalAppsReply {
            apps: view
                .iter()
                .filter_map(|(name, local)| {
                    let app = state.instance_app(name)?;
                    let app = &*app;
                    let mut s = crate::apps::status(&state, name, app, Some(local));
                    // A move this node carries out for the app's dataset: how far it is.
                    let moving = app
                        .dataset
                        .and_then(|id| state.datasets.get(&id))
                        .filter(|d| d.moving.is_some() && d.primary == self.cluster.node_id);
                    let of_move = |d: &&flock_scheduler::Dataset| {
                        transfers
                            .iter()
                            .find(|t| t.id == d.id && t.kind == crate::datasets::TransferKind::Move)
                    };
                    if let Some((over, limit)) = app.dataset.and_then(|id| self.datasets.over_limit(id)) {
                        let p = format!(
                            "its dataset is OVER ITS LIMIT by {} (limit {}): free space in it or `flockctl dataset set {} --size SIZE`",
                            flock_client::human(over),
                            flock_client::human(limit),
                            s.dataset
                        );
                        s.detail = if s.detail.is_empty() {
                            p
                        } else {
                            format!("{p}; {}", s.detail)
                        };
                    }
                    if let Some(t) = moving.and_then(|d| of_move(&d)) {
                        let mib = |b: u64| b as f64 / (1 << 20) as f64;
                        let mut p = format!("{} {:.1} MiB", t.phase, mib(t.bytes));
                        if let Some(total) = t.total {
                            p.push_str(&format!(" of {:.1} MiB", mib(total)));
                        }
                        p.push_str(&format!(" at {:.1} MiB/s", t.rate() / (1 << 20) as f64));
                        if let Some(e) = &t.last_error {
                            p.push_str(&format!(" (retrying: {e})"));
                        }
                        s.detail = if s.detail.is_empty() {
                            p
                        } else {
                            format!("{p}; {}", s.detail)
                        };
                    }
                    Some(s)
                })
                .collect(),
            mesh: self.mesh_report(),
            reads_health_reports: true,
        }
    }

    /// This node's routing mesh, for `app ls`; `None` when it is off.
    fn mesh_report(&self) -> Option<pb::MeshReport> {
        use crate::mesh::PortState;
        let m = self.mesh.snapshot();
        Some(pb::MeshReport {
            addr: m.ip?.to_string(),
            ports: m
                .ports
                .into_iter()
                .map(|(port, (app, st))| {
                    let (state, problem) = match st {
                        PortState::Serving => ("serving", String::new()),
                        PortState::ServedByApp => ("served by the app", String::new()),
                        PortState::Problem(p) => ("problem", p),
                    };
                    pb::MeshPort {
                        port: port.into(),
                        app,
                        state: state.into(),
                        problem,
                    }
                })
                .collect(),
        })
    }

    pub(super) async fn do_app_list(
        &self,
        req: Request<pb::AppListRequest>,
    ) -> Reply<pb::AppListReply> {
        self.authorize(&req)?;
        let name = req.into_inner().name;
        let state = self.cluster.read(false, |a| a.cluster.clone()).await?;
        if !name.is_empty() && !state.apps.contains_key(&name) {
            return Err(ClusterError::NotFound(format!(
                "no app named {} (`flockctl app ls` lists them)",
                flock_scheduler::shown(&name)
            ))
            .into());
        }
        // An app is reported by the node it runs on: while its dataset moves, the primary.
        // Every node is asked: each reports its routing mesh too.
        let where_of = |a: &flock_scheduler::App| state.app_runs_on(a).unwrap_or(a.node);
        let nodes: Vec<(NodeId, String)> = state
            .nodes
            .iter()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let reports: BTreeMap<NodeId, Option<pb::LocalAppsReply>> =
            join_all(nodes.iter().map(|(id, addr)| async move {
                if *id == self.cluster.node_id {
                    return (*id, Some(self.local_apps_report()));
                }
                let Ok(mut client) = self.cluster.peer(*id, addr) else {
                    return (*id, None);
                };
                let mut req = Request::new(pb::LocalAppsRequest {});
                req.set_timeout(NODE_TIMEOUT);
                let r = tokio::time::timeout(NODE_TIMEOUT, client.local_apps(req)).await;
                (*id, r.ok().and_then(|r| r.ok()).map(|r| r.into_inner()))
            }))
            .await
            .into_iter()
            .collect();
        let apps = state
            .apps
            .iter()
            .filter(|(n, _)| name.is_empty() || **n == name)
            .map(|(n, app)| match reports.get(&where_of(app)) {
                Some(Some(r)) => match r.apps.iter().find(|a| a.name == *n) {
                    Some(s) => {
                        let mut s = s.clone();
                        if let Some(ds) = app
                            .dataset
                            .and_then(|id| state.datasets.get(&id))
                            .filter(|d| d.moving.is_some())
                        {
                            let phase = if ds.moving.as_ref().is_some_and(|m| m.handoff) {
                                "handing off"
                            } else {
                                "copying its data while it runs"
                            };
                            s.node = node_name(&state, where_of(app));
                            s.moving_to = node_name(&state, app.node);
                            s.detail = format!(
                                "moving to {}: {phase}{}",
                                node_name(&state, app.node),
                                if s.detail.is_empty() {
                                    String::new()
                                } else {
                                    format!("; {}", s.detail)
                                }
                            );
                        }
                        s
                    }
                    None => {
                        let mut s = crate::apps::status(&state, n, app, None);
                        s.state = "starting".into();
                        s
                    }
                },
                _ => {
                    let mut s = crate::apps::status(&state, n, app, None);
                    s.state = "unreachable".into();
                    s.detail = format!("node {} did not answer", s.node);
                    let down = state
                        .nodes
                        .get(&where_of(app))
                        .is_some_and(|n| n.state == flock_scheduler::NodeState::Down);
                    if down {
                        s.state = "waiting".into();
                        s.detail = match app.dataset {
                            Some(id) => format!(
                                "node {} is down and the app cannot fail over: {}",
                                s.node,
                                flock_scheduler::failover::failover_target(&state, id)
                                    .err()
                                    .unwrap_or_else(|| "a failover is due".into())
                            ),
                            None => {
                                format!("node {} is down and no other node fits the app", s.node)
                            }
                        };
                    }
                    s
                }
            })
            .map(|mut s: pb::AppStatus| {
                if let Some(app) = state.apps.get(&s.name) {
                    s.instances = app.spec.instance_count();
                    s.instance_list = instances_of(&state, &s, app, &reports);
                    // Why the instances not placed wait, node by node (or that one is being
                    // placed where room appeared); placed ones not reported yet are not waiting.
                    if let Some(why) = flock_scheduler::scale::why_instances_wait(&state, &s.name) {
                        s.detail = if s.detail.is_empty() {
                            why
                        } else {
                            format!("{}; {why}", s.detail)
                        };
                    }
                    (s.endpoints, s.mesh_problems) = mesh_endpoints(&state, app, &reports);
                    s.stack = app.spec.stack.clone().unwrap_or_default();
                    s.service = app.spec.service_name().to_string();
                    s.service_ip = app
                        .vip
                        .map(|v| flock_scheduler::app::service_ip(v).to_string())
                        .unwrap_or_default();
                }
                s
            })
            .collect();
        Ok(Response::new(pb::AppListReply {
            apps,
            generation: state.deploy_generation,
        }))
    }

    pub(super) async fn do_app_logs(
        &self,
        req: Request<pb::AppLogsRequest>,
    ) -> Reply<pb::AppLogsReply> {
        self.authorize(&req)?;
        let name = req.get_ref().name.clone();
        let state = self.cluster.read(true, |a| a.cluster.clone()).await?;
        let app = state.apps.get(&name).ok_or_else(|| {
            ClusterError::NotFound(format!(
                "no app named {} (`flockctl app ls` lists them)",
                flock_scheduler::shown(&name)
            ))
        })?;
        if app.node != self.cluster.node_id {
            if req.metadata().contains_key(FORWARDED) {
                return Err(Status::unavailable("the app moved; try again"));
            }
            let addr = state
                .nodes
                .get(&app.node)
                .map(|n| n.addr.clone())
                .ok_or_else(|| Status::unavailable("the app's node is not a member"))?;
            let mut fwd = Request::new(req.into_inner());
            fwd.metadata_mut()
                .insert(FORWARDED, "1".parse().expect("ascii"));
            return self.cluster.peer(app.node, &addr)?.app_logs(fwd).await;
        }
        let req = req.into_inner();
        let tail = if req.tail == 0 {
            100
        } else {
            req.tail as usize
        };
        if crate::driver::Kind::of(app.spec.image.as_deref()) == crate::driver::Kind::Docker {
            // Containers' logs come from the engine: the tail, once (no following by offset).
            let lines = match req.since_offset {
                Some(_) => Vec::new(),
                None => {
                    self.drivers
                        .logs(crate::driver::Kind::Docker, &name, tail)
                        .await
                }
            };
            return Ok(Response::new(pb::AppLogsReply { lines, offset: 0 }));
        }
        let driver = self.drivers.process.clone();
        let read = tokio::task::spawn_blocking(move || driver.logs(&name, tail))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let (lines, offset) = match read {
            Ok(r) => r,
            Err(crate::driver::DriverError::NotHere { .. }) => (Vec::new(), 0),
            Err(e) => return Err(Status::internal(e.to_string())),
        };
        let (lines, offset) = match req.since_offset {
            // Following: only what came after the caller's offset.
            Some(since) if since <= offset => {
                let driver = self.drivers.process.clone();
                let app = req.name.clone();
                tokio::task::spawn_blocking(move || driver.logs_since(&app, since))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| Status::internal(e.to_string()))?
            }
            _ => (lines, offset),
        };
        Ok(Response::new(pb::AppLogsReply { lines, offset }))
    }
}

/// Where `app`'s external ports are served through the mesh (HOST:PORT on each node that
/// serves them), and the nodes that do not serve them, with why.
fn mesh_endpoints(
    state: &ClusterState,
    app: &flock_scheduler::App,
    reports: &BTreeMap<NodeId, Option<pb::LocalAppsReply>>,
) -> (Vec<String>, Vec<String>) {
    let (mut endpoints, mut problems) = (Vec::new(), Vec::new());
    for p in &app.spec.ports {
        for (id, report) in reports {
            let node = node_name(state, *id);
            let Some(report) = report else {
                problems.push(format!("{node}: did not answer"));
                continue;
            };
            let Some(mesh) = &report.mesh else {
                problems.push(format!("{node}: the routing mesh is off"));
                continue;
            };
            let host = match mesh.addr.parse::<std::net::IpAddr>() {
                Ok(ip) => {
                    crate::mesh::link_host(ip, state.nodes.get(id).map_or("", |n| n.addr.as_str()))
                }
                Err(_) => mesh.addr.clone(),
            };
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            match mesh.ports.iter().find(|m| m.port == u32::from(p.external)) {
                Some(m) if m.state != "problem" => endpoints.push(format!("{host}:{}", p.external)),
                Some(m) => problems.push(format!("{node}: {}", m.problem)),
                None => problems.push(format!("{node}: not listening on {} yet", p.external)),
            }
        }
    }
    (endpoints, problems)
}
