//! openraft's network over gRPC: each Raft RPC is one unary call whose payload is openraft's own
//! request, postcard-encoded (see [`crate::codec`]), tagged with the cluster id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Serialize};
use tonic::transport::Channel;

use flock_proto::v1::raft_client::RaftClient;
use flock_proto::v1::{RaftReply, RaftRequest};

use crate::codec::{decode, encode};
use crate::tls::{peer_channel, Peer, TlsError, TlsIdentity};
use crate::types::{MemberNode, NodeId, TypeConfig};

pub use crate::tls::CONNECT_TIMEOUT;

/// A gRPC channel over mutual TLS to node `target` at `addr` (HOST:PORT), connected on first
/// use; the connection is refused unless the peer's certificate is `target`'s.
pub fn lazy_channel(addr: &str, tls: &TlsIdentity, target: Peer) -> Result<Channel, TlsError> {
    peer_channel(addr, tls, target, CONNECT_TIMEOUT)
}

/// Creates a connection per peer; openraft keeps one per replication stream.
#[derive(Clone)]
pub struct GrpcNetwork {
    cluster_id: String,
    tls: TlsIdentity,
    /// One channel per peer (id and address). openraft asks for a new client for every replication
    /// stream and every leadership check (each linearizable read); a channel per call would mean
    /// a TCP and TLS handshake per read.
    channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
}

impl GrpcNetwork {
    /// A network for `cluster_id` whose connections use `tls` (this node's client identity).
    pub fn new(cluster_id: impl Into<String>, tls: TlsIdentity) -> Self {
        GrpcNetwork {
            cluster_id: cluster_id.into(),
            tls,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, TlsError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (target, addr.to_string());
        if let Some(ch) = channels.get(&key) {
            return Ok(ch.clone());
        }
        let ch = lazy_channel(addr, &self.tls, Peer::Node(target))?;
        channels.insert(key, ch.clone());
        Ok(ch)
    }

    /// Drops the cached channels (after this node's certificate was renewed): new clients
    /// connect afresh with the new certificate.
    pub fn reset_channels(&self) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// How many peer channels are open (for tests).
    pub fn channel_count(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> GrpcConnection {
        let client = match self.channel(target, &node.addr) {
            Ok(ch) => Ok(RaftClient::new(ch)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX)),
            Err(e) => Err(format!(
                "bad address {:?} for node {target}: {e}",
                node.addr
            )),
        };
        GrpcConnection {
            target,
            cluster_id: self.cluster_id.clone(),
            client,
        }
    }
}

/// A connection to one peer.
pub struct GrpcConnection {
    target: NodeId,
    cluster_id: String,
    client: Result<RaftClient<Channel>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

/// Which RPC to make.
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl GrpcConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, MemberNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Failure(e.clone())))),
        };
        let mut request = tonic::Request::new(RaftRequest {
            cluster_id: self.cluster_id.clone(),
            payload: encode(req),
        });
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::InstallSnapshot => client.install_snapshot(request).await,
        };
        let RaftReply { payload } = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let f = Failure(format!("node {}: {}", self.target, status.message()));
                return Err(match status.code() {
                    tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&f)),
                    _ => RPCError::Network(NetworkError::new(&f)),
                });
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> = decode(&payload).map_err(|e| {
            RPCError::Network(NetworkError::new(&Failure(format!(
                "node {} sent an undecodable reply: {e}",
                self.target
            ))))
        })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for GrpcConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>>
    {
        self.call(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, MemberNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
