//! The gRPC service that receives Raft RPCs from peers and hands them to openraft.

use std::sync::{Arc, Mutex};

use serde::{de::DeserializeOwned, Serialize};
use tonic::{Request, Response, Status};

use flock_proto::v1::raft_server::{self, RaftServer};
use flock_proto::v1::{RaftReply, RaftRequest};
use openraft::raft::InstallSnapshotRequest;

use crate::codec::{decode, encode};
use crate::network::MAX_MESSAGE_BYTES;
use crate::types::{Raft, TypeConfig};

/// Decides whether the caller of a Raft RPC may make it (from its TLS certificate).
pub type Authorize = Arc<dyn Fn(&Request<RaftRequest>) -> Result<(), Status> + Send + Sync>;

/// Serves `flock.v1.Raft` for one node.
pub struct RaftService {
    raft: Raft,
    cluster_id: String,
    authorize: Authorize,
    /// The snapshot being received and how far its bytes reach, so that a chunk cannot make
    /// this node grow its buffer to an arbitrary offset.
    receiving: Mutex<Option<(String, u64)>>,
}

impl RaftService {
    /// A tonic service for `raft`, accepting only requests for `cluster_id` from callers that
    /// `authorize` admits.
    pub fn server(raft: Raft, cluster_id: String, authorize: Authorize) -> RaftServer<RaftService> {
        RaftServer::new(RaftService {
            raft,
            cluster_id,
            authorize,
            receiving: Mutex::new(None),
        })
        // Only callers with a node certificate get this far (the pre-authentication layer
        // refuses the rest before reading a body); this bounds what a node may make another
        // buffer. See MAX_MESSAGE_BYTES for what fits.
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
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

impl RaftService {
    /// A chunk must start a snapshot (offset 0) or continue the one being received without a
    /// gap (openraft sends them in order, and again from 0 after a failure).
    fn check_chunk(&self, rpc: &InstallSnapshotRequest<TypeConfig>) -> Result<(), Status> {
        let mut receiving = self.receiving.lock().unwrap_or_else(|p| p.into_inner());
        let end = rpc.offset.saturating_add(rpc.data.len() as u64);
        match &mut *receiving {
            _ if rpc.offset == 0 => {
                *receiving = Some((rpc.meta.snapshot_id.clone(), end));
            }
            Some((id, reached)) if *id == rpc.meta.snapshot_id && rpc.offset <= *reached => {
                *reached = (*reached).max(end);
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk at offset {} does not continue the snapshot being received; \
                     chunks go in order from offset 0",
                    rpc.offset
                )))
            }
        }
        Ok(())
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
        self.check_chunk(&rpc)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
