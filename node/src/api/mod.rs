//! The gRPC API that flockctl talks to (`flock.v1.Api`), served by every node.
//!
//! Handlers translate requests into [`Cluster`] operations: writes become scheduler commands
//! proposed through Raft (forwarded to the leader by [`Cluster::propose`]), reads are served from
//! the local state machine after a read barrier unless the caller asked for a stale read.
//! Dataset calls are in [`datasets`]; the backup file and what a restore brings back, in
//! [`backup`].

mod apps;
pub mod backup;
mod datasets;
mod events;
mod join;
pub use datasets::resolve_node;
pub use join::RETRY_AFTER_MS;

use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use flock_proto::v1::api_server::{Api, ApiServer};
use flock_proto::v1::*;
use flock_raft::codec::{decode, encode};
use flock_scheduler::{limits, Command, CommandResult, NodeId};

use crate::cluster::{Cluster, ClusterError};
use crate::datasets::Datasets;
use crate::pki::{Authorizer, CertAuthority, Role};
use crate::token::{new_secret, JoinSecretFile, JoinToken, SecretError};

/// The largest API request decoded, in bytes: room for the largest command
/// (`flock_scheduler::limits::MAX_COMMAND_BYTES`, 4 MiB) in a `Propose` or a deploy, with
/// framing to spare.
pub const MAX_API_MESSAGE: usize = 8 << 20;

/// What runs on this node that the API reports on: datasets, the app driver, the app agent.
pub struct LocalParts {
    pub datasets: Arc<Datasets>,
    pub drivers: crate::driver::Drivers,
    pub apps: crate::apps::AppsView,
    pub mesh: crate::mesh::MeshView,
    /// The node's workers, for the status.
    pub workers: crate::worker::WorkersView,
}

/// The API service of one node.
pub struct ApiService {
    cluster: Arc<Cluster>,
    auth: Authorizer,
    /// This cluster's CA certificate (PEM) and its fingerprint.
    ca_pem: String,
    ca_fingerprint: String,
    /// The CA's signing key, on the node that created the cluster only.
    ca: Option<Arc<CertAuthority>>,
    /// The join secret in plain text, on the CA holder only.
    secret: Option<JoinSecretFile>,
    /// One rotation of the join secret at a time (file, then proposal).
    rotating: tokio::sync::Mutex<()>,
    /// Joins per source address.
    join_limiter: join::JoinLimiter,
    /// This node's datasets.
    datasets: Arc<Datasets>,
    /// This node's app driver and the app agent's view.
    drivers: crate::driver::Drivers,
    apps: crate::apps::AppsView,
    /// This node's routing mesh, as it reports itself.
    mesh: crate::mesh::MeshView,
    /// This node's long-lived tasks and their states.
    workers: crate::worker::WorkersView,
}

impl ApiService {
    pub fn server(
        cluster: Arc<Cluster>,
        auth: Authorizer,
        ca_pem: String,
        ca_fingerprint: String,
        ca: Option<(Arc<CertAuthority>, JoinSecretFile)>,
        local: LocalParts,
    ) -> ApiServer<ApiService> {
        let LocalParts {
            datasets,
            drivers,
            apps,
            mesh,
            workers,
        } = local;
        let (ca, secret) = ca.unzip();
        let service = ApiService {
            cluster,
            auth,
            ca_pem,
            ca_fingerprint,
            ca,
            secret,
            rotating: tokio::sync::Mutex::new(()),
            join_limiter: join::JoinLimiter::default(),
            datasets,
            drivers,
            apps,
            mesh,
            workers,
        };
        ApiServer::new(service).max_decoding_message_size(MAX_API_MESSAGE)
    }

    /// The status's warnings about pushes: each dataset primary's failing, given up or
    /// degraded pushes ([`crate::ctl::progress::push_problem`]); a primary that did not answer
    /// in time is named (its pushes are unknown, not fine).
    async fn push_warnings(&self) -> Vec<String> {
        let state = self.cluster.view.read().cluster.clone();
        let primaries: std::collections::BTreeSet<NodeId> =
            state.datasets.values().map(|d| d.primary).collect();
        let nodes: Vec<(NodeId, String)> = primaries
            .iter()
            .filter_map(|id| state.nodes.get(id).map(|n| (*id, n.addr.clone())))
            .collect();
        let reports = self.reports(&nodes).await;
        push_warnings(&state, &reports)
    }

    /// Every call but Join needs a certificate of this cluster.
    fn authorize<T>(&self, req: &Request<T>) -> Result<Role, Status> {
        self.auth.check(&req.peer_certs())
    }

    /// A client for the node holding the CA key, for signing requests this node cannot do.
    fn ca_holder(
        &self,
    ) -> Result<flock_proto::v1::api_client::ApiClient<tonic::transport::Channel>, Status> {
        let (id, addr) = {
            let a = self.cluster.view.read();
            let id = a.cluster.ca_holder;
            (id, a.cluster.nodes.get(&id).map(|n| n.addr.clone()))
        };
        let addr = addr.ok_or_else(|| {
            Status::unavailable(format!(
                "the cluster CA was on node {id}, which is no longer a member; new certificates cannot be signed"
            ))
        })?;
        Ok(self.cluster.peer(id, &addr)?)
    }

    fn token(&self, secret: &str) -> String {
        JoinToken {
            ca_fingerprint: self.ca_fingerprint.clone(),
            secret: secret.to_string(),
        }
        .render()
    }
}

fn unreachable_ca(s: Status) -> Status {
    if s.code() == tonic::Code::Unavailable {
        Status::unavailable(format!(
            "the node holding the cluster CA cannot be reached ({}); joins and new certificates need it",
            s.message()
        ))
    } else {
        s
    }
}

fn to_proto(e: &flock_scheduler::KvEntry) -> KvEntry {
    KvEntry {
        key: e.key.clone(),
        value: e.value.clone(),
        mod_revision: e.mod_revision,
        create_revision: e.create_revision,
        version: e.version,
    }
}

fn unexpected(r: CommandResult) -> Status {
    Status::internal(format!("unexpected result from the state machine: {r:?}"))
}

type Reply<T> = Result<Response<T>, Status>;

/// The warnings of [`ApiService::push_warnings`] from the primaries' `reports` (`None`: did
/// not answer), about the datasets `state` still has.
fn push_warnings(
    state: &flock_scheduler::ClusterState,
    reports: &[(NodeId, Option<LocalDatasetsReply>)],
) -> Vec<String> {
    let mut out = Vec::new();
    for (node, report) in reports {
        let Some(report) = report else {
            out.push(format!(
                "{} did not report its dataset pushes in time: whether they fail is unknown",
                flock_scheduler::state::node_name(state, *node)
            ));
            continue;
        };
        for t in &report.transfers {
            let current = state
                .datasets
                .get(&t.dataset_id)
                .is_some_and(|d| d.primary == *node);
            if let Some(p) = current
                .then(|| crate::ctl::progress::push_problem(t))
                .flatten()
            {
                out.push(format!("dataset {}: {p}", t.dataset));
            }
        }
    }
    out
}

/// The most bytes of entries one `KvList` reply to a client that does not page (an older
/// flockctl, which accepts replies up to 64 MiB) holds; a larger list is refused.
const KV_LIST_UNPAGED_BYTES: usize = 32 << 20;

/// The most state bytes one `ClusterBackup` message carries: far below every client's
/// message limit, so a state of any size streams.
const BACKUP_CHUNK: usize = 1 << 20;

/// The stream `ClusterBackup` answers with.
type BackupStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<ClusterBackupChunk, Status>> + Send>>;

/// The largest certificate signing request a node may send to renew its certificate (a CSR
/// for flock's keys is well under 1 KiB).
const MAX_CSR_BYTES: usize = 16 * 1024;

#[tonic::async_trait]
impl Api for ApiService {
    async fn status(&self, req: Request<StatusRequest>) -> Reply<StatusReply> {
        self.authorize(&req)?;
        let c = &self.cluster;
        if !req.into_inner().local && !c.is_leader() {
            if let Some((leader_id, leader)) = c.leader() {
                if let Ok(mut client) = c.peer(leader_id, &leader.addr) {
                    let mut fwd = Request::new(StatusRequest { local: true });
                    fwd.set_timeout(Duration::from_secs(3));
                    if let Ok(r) = client.status(fwd).await {
                        return Ok(r);
                    }
                }
            }
        }
        let mut reply = c.local_status().await;
        // Whichever node answers reports its own workers (the leader's, when forwarded).
        reply.workers = self.workers.to_proto();
        reply.warnings = self.push_warnings().await;
        Ok(Response::new(reply))
    }

    async fn ping(&self, req: Request<PingRequest>) -> Reply<PingReply> {
        self.authorize(&req)?;
        Ok(Response::new(PingReply {
            cluster_id: self.cluster.cluster_id.clone(),
            node_id: self.cluster.node_id,
        }))
    }

    async fn metrics(&self, req: Request<MetricsRequest>) -> Reply<MetricsReply> {
        self.authorize(&req)?;
        let c = &self.cluster;
        let want = req.into_inner().node_id;
        if want == 0 || want == c.node_id {
            let node_name = {
                let a = c.view.read();
                flock_scheduler::state::node_name(&a.cluster, c.node_id)
            };
            return Ok(Response::new(MetricsReply {
                node_id: c.node_id,
                node_name,
                text: crate::metrics::scrape(c, &self.datasets, &self.apps).await,
            }));
        }
        let addr = c
            .view
            .read()
            .cluster
            .nodes
            .get(&want)
            .map(|n| n.addr.clone());
        let addr =
            addr.ok_or_else(|| Status::not_found(format!("no node {want} in the cluster")))?;
        let mut client = c.peer(want, &addr)?;
        let mut fwd = Request::new(MetricsRequest { node_id: 0 });
        fwd.set_timeout(Duration::from_secs(3));
        client.metrics(fwd).await
    }

    async fn join(&self, req: Request<JoinRequest>) -> Reply<JoinReply> {
        // No certificate yet: the token's secret is what admits the caller.
        self.do_join(req).await
    }

    async fn issue_admin_cert(
        &self,
        req: Request<IssueAdminCertRequest>,
    ) -> Reply<IssueAdminCertReply> {
        self.authorize(&req)?;
        let Some(ca) = &self.ca else {
            return self
                .ca_holder()?
                .issue_admin_cert(req.into_inner())
                .await
                .map_err(unreachable_ca);
        };
        let req = req.into_inner();
        let label = if req.label.is_empty() {
            "admin".to_string()
        } else {
            req.label
        };
        flock_scheduler::state::validate_name(&label)
            .map_err(|e| Status::invalid_argument(format!("--label: {e}")))?;
        if self
            .cluster
            .read(false, |a| a.cluster.admin_revoked(&label))
            .await?
        {
            return Err(Status::failed_precondition(format!(
                "admin certificates labelled {label:?} were revoked; choose another --label"
            )));
        }
        let cert_pem = ca
            .sign_csr(&req.csr_pem, &Role::Admin(label))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let addrs = self
            .cluster
            .read(false, |a| {
                a.cluster.nodes.values().map(|n| n.addr.clone()).collect()
            })
            .await?;
        Ok(Response::new(IssueAdminCertReply {
            cert_pem,
            ca_pem: self.ca_pem.clone(),
            cluster_id: self.cluster.cluster_id.clone(),
            addrs,
        }))
    }

    async fn remove_node(&self, req: Request<RemoveNodeRequest>) -> Reply<RemoveNodeReply> {
        self.authorize(&req)?;
        let c = &self.cluster;
        let req = req.into_inner();
        if !c.is_leader() {
            let (leader_id, leader) = c
                .leader()
                .ok_or(ClusterError::NoLeader(c.request_timeout))?;
            return c.peer(leader_id, &leader.addr)?.remove_node(req).await;
        }
        let id = c.remove_node(&req.name, req.force).await?;
        // Give the membership worker a moment, so `node ls` right after shows the change.
        let deadline = Instant::now() + c.request_timeout;
        while Instant::now() < deadline && c.is_leader() {
            let still = c
                .metrics()
                .membership_config
                .membership()
                .get_node(&id)
                .is_some();
            if !still {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Response::new(RemoveNodeReply { node_id: id }))
    }

    async fn cluster_token(&self, req: Request<ClusterTokenRequest>) -> Reply<ClusterTokenReply> {
        self.authorize(&req)?;
        // The plaintext secret is on the CA holder only.
        let Some(file) = &self.secret else {
            return self
                .ca_holder()?
                .cluster_token(req.into_inner())
                .await
                .map_err(unreachable_ca);
        };
        if req.into_inner().rotate {
            let _one = self.rotating.lock().await;
            let secret = new_secret();
            // The file first: a secret in effect is always one this node can print (a rotation
            // that fails after this leaves the file ahead of the state, which `current` reports).
            file.write(&secret)
                .map_err(|e| Status::internal(format!("rotating the join secret: {e}")))?;
            let cmd = Command::SetJoinSecretHash {
                secret_hash: flock_scheduler::hash_join_secret(&secret),
            };
            return match self.cluster.propose(cmd).await? {
                CommandResult::JoinSecretRotated => {
                    tracing::info!("join secret rotated");
                    Ok(Response::new(ClusterTokenReply {
                        token: self.token(&secret),
                    }))
                }
                CommandResult::Rejected(e) => Err(ClusterError::from(e).into()),
                other => Err(unexpected(other)),
            };
        }
        let hash = self
            .cluster
            .read(false, |a| a.cluster.join_secret_hash.clone())
            .await?;
        let secret = file.current(&hash).map_err(|e| match e {
            SecretError::NotInitialized => Status::unavailable(e.to_string()),
            SecretError::Io(_) => Status::internal(e.to_string()),
            _ => Status::failed_precondition(e.to_string()),
        })?;
        Ok(Response::new(ClusterTokenReply {
            token: self.token(&secret),
        }))
    }

    async fn kv_put(&self, req: Request<KvPutRequest>) -> Reply<KvPutReply> {
        self.authorize(&req)?;
        let KvPutRequest { key, value } = req.into_inner();
        match self.cluster.propose(Command::KvPut { key, value }).await? {
            CommandResult::KvPut(e) => Ok(Response::new(KvPutReply {
                entry: Some(to_proto(&e)),
            })),
            CommandResult::Rejected(e) => Err(ClusterError::from(e).into()),
            other => Err(unexpected(other)),
        }
    }

    async fn kv_get(&self, req: Request<KvGetRequest>) -> Reply<KvGetReply> {
        self.authorize(&req)?;
        let KvGetRequest { key, stale } = req.into_inner();
        let reply = self
            .cluster
            .read(stale, |a| KvGetReply {
                entry: a.cluster.kv.get(&key).map(to_proto),
                revision: a.cluster.revision,
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn kv_cas(&self, req: Request<KvCasRequest>) -> Reply<KvCasReply> {
        self.authorize(&req)?;
        let KvCasRequest { key, expect, value } = req.into_inner();
        match self
            .cluster
            .propose(Command::KvCas { key, expect, value })
            .await?
        {
            CommandResult::KvCas { succeeded, entry } => Ok(Response::new(KvCasReply {
                succeeded,
                entry: entry.as_ref().map(to_proto),
            })),
            CommandResult::Rejected(e) => Err(ClusterError::from(e).into()),
            other => Err(unexpected(other)),
        }
    }

    async fn kv_delete(&self, req: Request<KvDeleteRequest>) -> Reply<KvDeleteReply> {
        self.authorize(&req)?;
        let key = req.into_inner().key;
        match self.cluster.propose(Command::KvDelete { key }).await? {
            CommandResult::KvDeleted { existed, revision } => {
                Ok(Response::new(KvDeleteReply { existed, revision }))
            }
            CommandResult::Rejected(e) => Err(ClusterError::from(e).into()),
            other => Err(unexpected(other)),
        }
    }

    async fn kv_list(&self, req: Request<KvListRequest>) -> Reply<KvListReply> {
        self.authorize(&req)?;
        let KvListRequest {
            prefix,
            stale,
            limit,
            start_after,
        } = req.into_inner();
        // An older flockctl neither pages nor knows `more`: it gets the whole list, or an error
        // when that is too large for one reply (rather than a list cut short).
        let paged = limit > 0 || !start_after.is_empty();
        let (max_entries, max_bytes) = if paged {
            (
                (limit as usize).min(limits::KV_LIST_PAGE_ENTRIES),
                limits::KV_LIST_PAGE_BYTES,
            )
        } else {
            (usize::MAX, KV_LIST_UNPAGED_BYTES)
        };
        let reply = self
            .cluster
            .read(stale, |a| {
                let from = if start_after.as_str() >= prefix.as_str() {
                    Bound::Excluded(start_after.as_str())
                } else {
                    Bound::Included(prefix.as_str())
                };
                let mut page = KvListReply {
                    entries: Vec::new(),
                    revision: a.cluster.revision,
                    more: false,
                };
                let mut bytes = 0;
                let keys = a
                    .cluster
                    .kv
                    .range::<_, str>((from, Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()));
                for (_, e) in keys {
                    let size = 2 * e.key.len() + e.value.len() + 64;
                    let full = page.entries.len() >= max_entries
                        || (!page.entries.is_empty() && bytes + size > max_bytes);
                    if full {
                        page.more = true;
                        break;
                    }
                    bytes += size;
                    page.entries.push(to_proto(e));
                }
                page
            })
            .await?;
        if reply.more && !paged {
            return Err(Status::out_of_range(format!(
                "the keys under prefix {} are more than {} MiB, too many for one reply; upgrade flockctl, which lists them in pages",
                limits::shown(&prefix),
                KV_LIST_UNPAGED_BYTES >> 20
            )));
        }
        Ok(Response::new(reply))
    }

    async fn propose(&self, req: Request<ProposeRequest>) -> Reply<ProposeReply> {
        self.auth.check_node(&req.peer_certs())?;
        let cmd: Command = decode(&req.into_inner().command)
            .map_err(|e| Status::invalid_argument(format!("undecodable command: {e}")))?;
        let deadline = Instant::now() + self.cluster.request_timeout;
        let result = self.cluster.propose_local(cmd, deadline).await?;
        Ok(Response::new(ProposeReply {
            result: encode(&result),
        }))
    }

    async fn read_index(&self, req: Request<ReadIndexRequest>) -> Reply<ReadIndexReply> {
        let caller = self.auth.check_node(&req.peer_certs())?;
        // Any call proves the caller alive; a renewal is also a question: may it hold a lease.
        self.cluster.leases.heard(caller);
        let req = req.into_inner();
        self.cluster.leases.heard_level(caller, req.apply_level);
        let index = self.cluster.local_read_index().await?;
        if req.lease {
            let state = self.cluster.view.read();
            self.cluster
                .leases
                .may_renew(&state.cluster, caller)
                .map_err(Status::failed_precondition)?;
        }
        Ok(Response::new(ReadIndexReply { index }))
    }

    async fn renew_node_cert(
        &self,
        req: Request<RenewNodeCertRequest>,
    ) -> Reply<RenewNodeCertReply> {
        // The caller's current certificate names the id it gets a certificate for: a node can
        // renew only its own, and a removed node none.
        let id = self.auth.check_node(&req.peer_certs())?;
        let Some(ca) = &self.ca else {
            let holder = self.cluster.view.read().cluster.ca_holder;
            return Err(Status::failed_precondition(format!(
                "this node does not hold the cluster CA; ask node {holder}"
            )));
        };
        let csr_pem = req.into_inner().csr_pem;
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!(
                "certificate signing request of {} bytes; at most {MAX_CSR_BYTES} are accepted",
                csr_pem.len()
            )));
        }
        let cert_pem = ca
            .sign_csr(&csr_pem, &Role::Node(id))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(node = id, "renewed a node certificate");
        Ok(Response::new(RenewNodeCertReply { cert_pem }))
    }

    async fn node_down(&self, req: Request<NodeDownRequest>) -> Reply<NodeDownReply> {
        self.authorize(&req)?;
        Ok(self.node_down_impl(req.into_inner()).await?)
    }

    async fn node_drain(&self, req: Request<NodeDrainRequest>) -> Reply<NodeDrainReply> {
        self.authorize(&req)?;
        Ok(self.node_drain_impl(req.into_inner()).await?)
    }

    async fn events(&self, req: Request<EventsRequest>) -> Reply<EventsReply> {
        self.authorize(&req)?;
        Ok(self.events_impl(req.into_inner()).await?)
    }

    async fn revoke_admin(&self, req: Request<RevokeAdminRequest>) -> Reply<RevokeAdminReply> {
        let caller = self.authorize(&req)?;
        let label = req.into_inner().label;
        flock_scheduler::state::validate_name(&label)
            .map_err(|e| Status::invalid_argument(format!("--revoke: {e}")))?;
        // Revoking the label one calls with would lock the caller out with nothing to replace
        // it: issue another admin config first and revoke with that one.
        if caller == Role::Admin(label.clone()) {
            return Err(Status::failed_precondition(format!(
                "this call is made with an admin certificate labelled {label:?}, the label to revoke; issue another admin config first (flockctl cluster admin-config --out FILE --label NEW) and revoke {label:?} with it"
            )));
        }
        match self
            .cluster
            .propose(Command::RevokeAdmin {
                label: label.clone(),
            })
            .await?
        {
            CommandResult::AdminRevoked { already } => {
                tracing::info!(%label, "admin certificates revoked");
                Ok(Response::new(RevokeAdminReply { already }))
            }
            CommandResult::Rejected(e) => Err(ClusterError::from(e).into()),
            other => Err(unexpected(other)),
        }
    }

    async fn dataset_create(
        &self,
        req: Request<DatasetCreateRequest>,
    ) -> Reply<DatasetCreateReply> {
        self.do_dataset_create(req).await
    }

    async fn dataset_list(&self, req: Request<DatasetListRequest>) -> Reply<DatasetListReply> {
        self.do_dataset_list(req).await
    }

    async fn dataset_snapshot(
        &self,
        req: Request<DatasetSnapshotRequest>,
    ) -> Reply<DatasetSnapshotReply> {
        self.do_dataset_snapshot(req).await
    }

    async fn dataset_rollback(
        &self,
        req: Request<DatasetRollbackRequest>,
    ) -> Reply<DatasetRollbackReply> {
        self.do_dataset_rollback(req).await
    }

    async fn dataset_remove(
        &self,
        req: Request<DatasetRemoveRequest>,
    ) -> Reply<DatasetRemoveReply> {
        self.do_dataset_remove(req).await
    }

    async fn dataset_move(&self, req: Request<DatasetMoveRequest>) -> Reply<DatasetMoveReply> {
        self.do_dataset_move(req).await
    }

    async fn dataset_set(&self, req: Request<DatasetSetRequest>) -> Reply<DatasetSetReply> {
        self.do_dataset_set(req).await
    }

    async fn dataset_snapshot_remove(
        &self,
        req: Request<DatasetSnapshotRemoveRequest>,
    ) -> Reply<DatasetSnapshotRemoveReply> {
        self.do_dataset_snapshot_remove(req).await
    }

    async fn dataset_unmount(
        &self,
        req: Request<DatasetUnmountRequest>,
    ) -> Reply<DatasetUnmountReply> {
        self.do_dataset_unmount(req).await
    }

    async fn dataset_drop_diverged(
        &self,
        req: Request<DatasetDropDivergedRequest>,
    ) -> Reply<DatasetDropDivergedReply> {
        self.authorize(&req)?;
        Ok(self.drop_diverged_impl(req.into_inner()).await?)
    }

    async fn local_datasets(
        &self,
        req: Request<LocalDatasetsRequest>,
    ) -> Reply<LocalDatasetsReply> {
        self.do_local_datasets(req).await
    }

    async fn deploy(&self, req: Request<DeployRequest>) -> Reply<DeployReply> {
        self.do_deploy(req).await
    }

    async fn app_list(&self, req: Request<AppListRequest>) -> Reply<AppListReply> {
        self.do_app_list(req).await
    }

    async fn app_remove(&self, req: Request<AppRemoveRequest>) -> Reply<DeployReply> {
        self.do_app_remove(req).await
    }

    async fn app_scale(&self, req: Request<AppScaleRequest>) -> Reply<DeployReply> {
        self.do_app_scale(req).await
    }

    async fn app_logs(&self, req: Request<AppLogsRequest>) -> Reply<AppLogsReply> {
        self.do_app_logs(req).await
    }

    async fn local_apps(&self, req: Request<LocalAppsRequest>) -> Reply<LocalAppsReply> {
        self.do_local_apps(req).await
    }

    async fn app_move(&self, req: Request<AppMoveRequest>) -> Reply<AppMoveReply> {
        self.do_app_move(req).await
    }

    async fn check_apps(&self, req: Request<CheckAppsRequest>) -> Reply<CheckAppsReply> {
        self.do_check_apps(req).await
    }

    type ClusterBackupStream = BackupStream;

    async fn cluster_backup(
        &self,
        req: Request<ClusterBackupRequest>,
    ) -> Reply<Self::ClusterBackupStream> {
        // Admins only: the state holds stacks' secrets, and no node needs a copy this way.
        if !matches!(self.authorize(&req)?, Role::Admin(_)) {
            return Err(Status::permission_denied(
                "only an admin may take a backup (it holds stacks' secrets)",
            ));
        }
        // After a read barrier: every write committed before the call is in the copy. The
        // state is copied under the lock (its key-value map is shared, not copied) and encoded
        // outside it.
        let (applied, state) = self
            .cluster
            .read(false, |a| (a.last_applied, a.cluster.clone()))
            .await?;
        let data = flock_raft::state_machine::encode_cluster(&state);
        let node_name = flock_scheduler::state::node_name(&state, self.cluster.node_id);
        let info = ClusterBackupInfo {
            cluster_id: state.cluster_id.clone(),
            applied_index: applied.map_or(0, |l| l.index),
            applied_term: applied.map_or(0, |l| l.leader_id.term),
            at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            flock_version: env!("CARGO_PKG_VERSION").to_string(),
            state_bytes: data.len() as u64,
            node_name,
        };
        tracing::info!(
            bytes = data.len(),
            index = info.applied_index,
            "serving a backup of the replicated state"
        );
        let mut chunks: Vec<ClusterBackupChunk> = data
            .chunks(BACKUP_CHUNK)
            .map(|c| ClusterBackupChunk {
                info: None,
                data: c.to_vec(),
            })
            .collect();
        match chunks.first_mut() {
            Some(first) => first.info = Some(info),
            None => chunks.push(ClusterBackupChunk {
                info: Some(info),
                data: Vec::new(),
            }),
        }
        let stream = futures::stream::iter(chunks.into_iter().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_scheduler::ClusterState;

    #[test]
    fn status_warns_of_failing_pushes_and_silent_primaries() {
        let mut s = ClusterState::default();
        for cmd in [
            Command::InitCluster {
                cluster_id: "c".into(),
                join_secret: "s".into(),
                node_id: 1,
                name: "n1".into(),
                addr: "h:1".into(),
            },
            Command::RegisterNode {
                secret: "s".into(),
                name: None,
                addr: "h:2".into(),
            },
            Command::CreateDataset {
                name: "db".into(),
                primary: 1,
                size_limit: None,
            },
            Command::CreateDataset {
                name: "logs".into(),
                primary: 2,
                size_limit: None,
            },
        ] {
            let r = s.apply(&cmd);
            assert!(!matches!(r, CommandResult::Rejected(_)), "{cmd:?}: {r:?}");
        }
        let db = s.dataset_by_name("db").unwrap().id;
        let push = |dataset_id, phase: &str| Transfer {
            dataset: "db".into(),
            dataset_id,
            to_node: "n2".into(),
            kind: "replica".into(),
            phase: phase.into(),
            attempt: 3,
            retry_in_ms: Some(4_000),
            last_error: "connection refused".into(),
            ..Default::default()
        };
        let report = LocalDatasetsReply {
            transfers: vec![
                push(db, "retrying"),
                push(db, "full"),
                // A dataset removed since: its old line is not a warning.
                push(db + 100, "retrying"),
            ],
            ..Default::default()
        };
        assert_eq!(
            push_warnings(&s, &[(1, Some(report)), (2, None)]),
            [
                "dataset db: push to n2 failed (attempt 3, retry in 4s): connection refused",
                "dataset db: push to n2 on attempt 3 (full copy), attempt 2 failed: connection refused",
                "n2 did not report its dataset pushes in time: whether they fail is unknown",
            ]
        );
        assert!(push_warnings(&s, &[(1, Some(LocalDatasetsReply::default()))]).is_empty());
    }
}
