//! What the workloads need from a cluster under test, and the one client both systems are
//! driven with (tonic over HTTP/2, plaintext or TLS as the cluster serves, so the client side
//! costs the same for both).

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::etcdpb;
use flock_proto::v1::{api_client::ApiClient, KvPutRequest, StatusRequest};

/// Which system a client talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    Flock,
    Etcd,
}

impl System {
    /// The name used in progress lines, the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            System::Flock => "flock",
            System::Etcd => "etcd",
        }
    }
}

/// A running three-member cluster on loopback that the harness owns (it can kill members).
pub trait Cluster {
    fn system(&self) -> System;
    /// Number of members, live or not.
    fn size(&self) -> usize;
    /// Name of member `i` ("n1", "e2", ...).
    fn member_name(&self, i: usize) -> &str;
    /// How to reach member `i`'s client API.
    fn target(&self, i: usize) -> Target;
    /// How clients and members talk, for the report ("mutual TLS ..." or "plaintext ...").
    fn transport(&self) -> &'static str;
    /// Index of the member that leads now, as the live members report it.
    fn leader(&self) -> impl Future<Output = Result<usize>>;
    /// `kill -9` member `i` and reap it.
    /// The highest Raft term a live member reports: elections between two readings are counted.
    fn term(&self) -> impl Future<Output = Result<u64>>;
    fn kill(&mut self, i: usize) -> impl Future<Output = Result<()>>;
    /// Starts member `i` again on its data dir and waits until it serves as part of the cluster.
    fn restart(&mut self, i: usize) -> impl Future<Output = Result<()>>;
    /// Per-member clients that ask each member whom it sees as leader (see `LeaderProbe`).
    fn leader_probe(&self) -> Result<LeaderProbe>;
    /// Fails if a member the harness did not kill has exited.
    fn check_running(&mut self) -> impl Future<Output = Result<()>>;
    /// Kills every member.
    fn shutdown(self) -> impl Future<Output = Result<()>>;
}

/// A key-value client of either system, over one gRPC channel.
#[derive(Clone)]
pub enum KvClient {
    Flock(ApiClient<Channel>),
    Etcd(etcdpb::kv_client::KvClient<Channel>),
}

/// How long a (re)connect may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How to reach one member's client API: `http://` plaintext, or `https://` with the TLS
/// settings (whom to trust, and the client certificate for mutual TLS).
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub tls: Option<ClientTlsConfig>,
}

impl Target {
    pub fn endpoint(&self) -> Result<Endpoint> {
        let url = &self.url;
        let mut ep = Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad endpoint URL {url}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            // Small requests answered one at a time: Nagle would only add delay.
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            ep = ep
                .tls_config(tls.clone())
                .with_context(|| format!("TLS setup for {url}"))?;
        }
        Ok(ep)
    }

    /// A channel connected now; fails if the member does not accept the connection.
    pub async fn connect(&self) -> Result<Channel> {
        self.endpoint()?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.url))
    }
}

impl KvClient {
    fn over(system: System, channel: Channel) -> KvClient {
        match system {
            System::Flock => KvClient::Flock(ApiClient::new(channel)),
            System::Etcd => KvClient::Etcd(etcdpb::kv_client::KvClient::new(channel)),
        }
    }

    /// Opens a channel to `target` now; fails if the member does not accept the connection.
    pub async fn connect(system: System, target: &Target) -> Result<KvClient> {
        Ok(KvClient::over(system, target.connect().await?))
    }

    /// A channel that connects on first use and reconnects after a failure, so a client can
    /// hold one per member and keep it across that member's death and restart.
    pub fn lazy(system: System, target: &Target) -> Result<KvClient> {
        Ok(KvClient::over(system, target.endpoint()?.connect_lazy()))
    }

    /// Writes `value` under `key`; returns once the system acknowledged the write (committed
    /// through Raft on a majority, fsynced: both systems' defaults).
    pub async fn put(&mut self, key: String, value: &str) -> Result<(), tonic::Status> {
        match self {
            KvClient::Flock(c) => {
                c.kv_put(KvPutRequest {
                    key,
                    value: value.to_string(),
                })
                .await?;
            }
            KvClient::Etcd(c) => {
                c.put(etcdpb::PutRequest {
                    key: key.into_bytes(),
                    value: value.as_bytes().to_vec(),
                    ..Default::default()
                })
                .await?;
            }
        }
        Ok(())
    }
}

/// Asks one member whom it sees as leader, from its own view and without forwarding, so the
/// answer comes at once even while there is no leader. The failover rounds use it to time the
/// election itself, apart from what a client sees of it.
pub enum LeaderProbe {
    Flock {
        clients: Vec<ApiClient<Channel>>,
        /// Member addresses and names, to map a Status reply's leader to a member index.
        addrs: Vec<String>,
        names: Vec<String>,
    },
    Etcd {
        clients: Vec<etcdpb::maintenance_client::MaintenanceClient<Channel>>,
        /// Member ids, to map a Status reply's leader id to a member index.
        ids: Vec<u64>,
    },
}

/// How long one probe may take; a member that does not answer in time sees no leader.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

impl LeaderProbe {
    /// The member that member `i` sees as leader now, if any.
    pub async fn leader_seen_by(&mut self, i: usize) -> Option<usize> {
        match self {
            LeaderProbe::Flock {
                clients,
                addrs,
                names,
            } => {
                let reply = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    clients[i].status(StatusRequest { local: true }),
                )
                .await
                .ok()?
                .ok()?
                .into_inner();
                reply.leader_id?;
                addrs
                    .iter()
                    .position(|a| *a == reply.leader_addr)
                    .or_else(|| names.iter().position(|n| *n == reply.leader_name))
            }
            LeaderProbe::Etcd { clients, ids } => {
                let reply = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    clients[i].status(etcdpb::StatusRequest {}),
                )
                .await
                .ok()?
                .ok()?
                .into_inner();
                ids.iter().position(|&id| id != 0 && id == reply.leader)
            }
        }
    }
}
