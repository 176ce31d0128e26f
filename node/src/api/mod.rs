//! The gRPC API that flockctl talks to (`flock.v1.Api`), served by every node.
//!
//! Handlers translate requests into [`Cluster`] operations: writes become scheduler commands
//! proposed through Raft (forwarded to the leader by [`Cluster::propose`]), reads are served from
//! the local state machine after a read barrier unless the caller asked for a stale read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use flock_proto::v1::api_server::{Api, ApiServer};
use flock_proto::v1::*;
use flock_raft::codec::{decode, encode};
use flock_scheduler::{Command, CommandResult};

use crate::cluster::{Cluster, ClusterError};
use crate::token::JoinToken;

/// The API service of one node.
pub struct ApiService {
    cluster: Arc<Cluster>,
}

impl ApiService {
    pub fn server(cluster: Arc<Cluster>) -> ApiServer<ApiService> {
        ApiServer::new(ApiService { cluster })
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

#[tonic::async_trait]
impl Api for ApiService {
    async fn status(&self, req: Request<StatusRequest>) -> Reply<StatusReply> {
        let c = &self.cluster;
        if !req.into_inner().local && !c.is_leader() {
            if let Some((_, leader)) = c.leader() {
                if let Ok(mut client) = c.peer(&leader.addr) {
                    let mut fwd = Request::new(StatusRequest { local: true });
                    fwd.set_timeout(Duration::from_secs(3));
                    if let Ok(r) = client.status(fwd).await {
                        return Ok(r);
                    }
                }
            }
        }
        Ok(Response::new(c.local_status().await))
    }

    async fn ping(&self, _req: Request<PingRequest>) -> Reply<PingReply> {
        Ok(Response::new(PingReply {
            cluster_id: self.cluster.cluster_id.clone(),
            node_id: self.cluster.node_id,
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Reply<JoinReply> {
        let req = req.into_inner();
        let token =
            JoinToken::parse(&req.token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if token.cluster_id != self.cluster.cluster_id {
            return Err(Status::permission_denied(format!(
                "the token is for cluster {}, but this node belongs to cluster {}",
                token.cluster_id, self.cluster.cluster_id
            )));
        }
        let cmd = Command::RegisterNode {
            secret: token.secret,
            name: (!req.name.is_empty()).then_some(req.name),
            addr: req.addr,
        };
        match self.cluster.propose(cmd).await? {
            CommandResult::NodeRegistered { id, name } => {
                tracing::info!(id, %name, "node registered");
                Ok(Response::new(JoinReply {
                    cluster_id: self.cluster.cluster_id.clone(),
                    node_id: id,
                    name,
                }))
            }
            CommandResult::Rejected(e) => Err(ClusterError::from(e).into()),
            other => Err(unexpected(other)),
        }
    }

    async fn remove_node(&self, req: Request<RemoveNodeRequest>) -> Reply<RemoveNodeReply> {
        let c = &self.cluster;
        let req = req.into_inner();
        if !c.is_leader() {
            let (_, leader) = c
                .leader()
                .ok_or(ClusterError::NoLeader(c.request_timeout))?;
            return c.peer(&leader.addr)?.remove_node(req).await;
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

    async fn cluster_token(&self, _req: Request<ClusterTokenRequest>) -> Reply<ClusterTokenReply> {
        let token = self
            .cluster
            .read(false, |a| JoinToken {
                cluster_id: a.cluster.cluster_id.clone(),
                secret: a.cluster.join_secret.clone(),
            })
            .await?;
        Ok(Response::new(ClusterTokenReply {
            token: token.render(),
        }))
    }

    async fn kv_put(&self, req: Request<KvPutRequest>) -> Reply<KvPutReply> {
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
        let KvListRequest { prefix, stale } = req.into_inner();
        let reply = self
            .cluster
            .read(stale, |a| KvListReply {
                entries: a.cluster.kv_prefix(&prefix).map(to_proto).collect(),
                revision: a.cluster.revision,
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn propose(&self, req: Request<ProposeRequest>) -> Reply<ProposeReply> {
        let cmd: Command = decode(&req.into_inner().command)
            .map_err(|e| Status::invalid_argument(format!("undecodable command: {e}")))?;
        let deadline = Instant::now() + self.cluster.request_timeout;
        let result = self.cluster.propose_local(cmd, deadline).await?;
        Ok(Response::new(ProposeReply {
            result: encode(&result),
        }))
    }

    async fn read_index(&self, _req: Request<ReadIndexRequest>) -> Reply<ReadIndexReply> {
        let index = self.cluster.local_read_index().await?;
        Ok(Response::new(ReadIndexReply { index }))
    }
}
