//! The gRPC service that receives Raft RPCs from peers and hands them to openraft.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use flock_proto::v1::raft_server::{self, RaftServer};
use flock_proto::v1::{RaftReply, RaftRequest};
use openraft::raft::InstallSnapshotRequest;

use crate::codec::{decode, encode};
use crate::network::{MAX_MESSAGE_BYTES, STREAM_DEPTH};
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
    /// True when the server stops: its AppendStreams end, as a graceful shutdown waits for
    /// every open stream.
    stop: watch::Receiver<bool>,
}

impl RaftService {
    /// A tonic service for `raft`, accepting only requests for `cluster_id` from callers that
    /// `authorize` admits; its streams end when `stop` turns true (or its sender goes).
    pub fn server(
        raft: Raft,
        cluster_id: String,
        authorize: Authorize,
        stop: watch::Receiver<bool>,
    ) -> RaftServer<RaftService> {
        RaftServer::new(RaftService {
            raft,
            cluster_id,
            authorize,
            receiving: Mutex::new(None),
            stop,
        })
        // Only callers with a node certificate get this far (the pre-authentication layer
        // refuses the rest before reading a body); this bounds what a node may make another
        // buffer. See MAX_MESSAGE_BYTES for what fits.
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn open<T: DeserializeOwned>(&self, req: Request<RaftRequest>) -> Result<T, Status> {
        open(&self.authorize, &self.cluster_id, req)
    }
}

/// The openraft request in `req`, once its caller is authorized and it is for `cluster_id`.
fn open<T: DeserializeOwned>(
    authorize: &Authorize,
    cluster_id: &str,
    req: Request<RaftRequest>,
) -> Result<T, Status> {
    authorize(&req)?;
    let req = req.into_inner();
    if req.cluster_id != cluster_id {
        return Err(Status::failed_precondition(format!(
            "this node belongs to cluster {cluster_id}, not {}",
            req.cluster_id
        )));
    }
    decode(&req.payload).map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
}

/// The replies of an [`AppendStream`](raft_server::Raft::append_stream), in request order.
pub type ReplyStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<RaftReply, Status>> + Send>>;

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
    type AppendStreamStream = ReplyStream;

    /// AppendEntries calls on one stream, each answered in turn. Every request is authorized
    /// as a unary call is (a node removed while its stream is open is refused from then on),
    /// and the first refusal or bad request ends the stream with its status.
    async fn append_stream(
        &self,
        req: Request<Streaming<RaftRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let (_, extensions, mut incoming) = req.into_parts();
        let authorize = self.authorize.clone();
        // A caller that may not make this call learns it at once, not at its first request.
        authorize(&Request::from_parts(
            MetadataMap::new(),
            extensions.clone(),
            RaftRequest::default(),
        ))?;
        let (raft, cluster_id) = (self.raft.clone(), self.cluster_id.clone());
        let mut stop = self.stop.clone();
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        tokio::spawn(async move {
            // Ends when the caller closes its side or goes away, at the first refusal, or when
            // the server stops (the caller's next call opens a stream elsewhere or goes unary).
            loop {
                let msg = tokio::select! {
                    msg = incoming.message() => match msg {
                        Ok(Some(msg)) => msg,
                        _ => break,
                    },
                    _ = stop.wait_for(|stopped| *stopped) => break,
                };
                let req = Request::from_parts(MetadataMap::new(), extensions.clone(), msg);
                let answer = match open(&authorize, &cluster_id, req) {
                    Ok(rpc) => Ok(RaftReply {
                        payload: encode(&raft.append_entries(rpc).await),
                    }),
                    Err(status) => Err(status),
                };
                let refused = answer.is_err();
                if tx.send(answer).await.is_err() || refused {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

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
