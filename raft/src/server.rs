//! The gRPC service that receives Raft RPCs from peers and hands them to openraft.

use std::sync::Arc;

use serde::{de::DeserializeOwned, Serialize};
use tonic::{Request, Response, Status};

use flock_proto::v1::raft_server::{self, RaftServer};
use flock_proto::v1::{RaftReply, RaftRequest};

use crate::codec::{decode, encode};
use crate::types::Raft;

/// Decides whether the caller of a Raft RPC may make it (from its TLS certificate).
pub type Authorize = Arc<dyn Fn(&Request<RaftRequest>) -> Result<(), Status> + Send + Sync>;

/// Serves `flock.v1.Raft` for one node.
pub struct RaftService {
    raft: Raft,
    cluster_id: String,
    authorize: Authorize,
}

impl RaftService {
    /// A tonic service for `raft`, accepting only requests for `cluster_id` from callers that
    /// `authorize` admits.
    pub fn server(raft: Raft, cluster_id: String, authorize: Authorize) -> RaftServer<RaftService> {
        RaftServer::new(RaftService {
            raft,
            cluster_id,
            authorize,
        })
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
    }

    fn open<T: DeserializeOwned>(&self, req: Request<RaftRequest>) -> Result<T, Status> {
        (self.authorize)(&req)?;
        let req = req.into_inner();
        if req.cluster_id != self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "this node belongs to cluster {}, not {}",
                self.cluster_id, req.cluster_id
            )));
        }
        decode(&req.payload).map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
    }
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftReply>, Status> {
    Ok(Response::new(RaftReply {
        payload: encode(result),
    }))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc = self.open(req)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc = self.open(req)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc = self.open(req)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
