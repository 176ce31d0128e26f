//! Starting and stopping a node: `init` (a new cluster), `join` (an existing one), `run` (restart
//! from a data dir). Startup builds everything, then starts the server and workers; shutdown
//! stops them in a fixed order: API/Raft server, membership worker, Raft, store flush.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{Config, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use flock_proto::v1::JoinRequest;
use flock_raft::log_store::DiskWriter;
use flock_raft::network::GrpcNetwork;
use flock_raft::server::RaftService;
use flock_raft::{MemberNode, Raft, Store};
use flock_scheduler::state::{validate_addr, validate_name};
use flock_scheduler::{Command, CommandResult};

use crate::api::ApiService;
use crate::client::connect_with_retry;
use crate::cluster::{membership_worker, Cluster};
use crate::datadir::{DataDir, Identity, IDENTITY_FORMAT};
use crate::token::{random_hex, JoinToken};

/// Raft and request timing. Every field has a default suited to a LAN or one machine.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Leader heartbeat interval, ms. Default 100.
    pub heartbeat_ms: u64,
    /// Minimum election timeout, ms; the maximum is 4/3 of it. Default 300. openraft also makes
    /// a follower wait one leader lease (the maximum) after the last heartbeat before it stands,
    /// so a dead leader is replaced after roughly lease + timeout = 0.7 to 0.8 s by default.
    pub election_timeout_ms: u64,
    /// Build a snapshot after this many new log entries. Default 10000.
    pub snapshot_logs: u64,
    /// Entries kept in the log after a snapshot, for followers slightly behind. Default 1000.
    pub keep_logs: u64,
    /// How long a request waits for a leader and for its command to commit. Default 5 s.
    pub request_timeout: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            heartbeat_ms: 100,
            election_timeout_ms: 300,
            snapshot_logs: 10_000,
            keep_logs: 1_000,
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl NodeOptions {
    fn raft_config(&self, cluster_id: &str) -> anyhow::Result<Arc<Config>> {
        let config = Config {
            cluster_name: cluster_id.to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_ms,
            election_timeout_max: self.election_timeout_ms + self.election_timeout_ms / 3,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            max_in_snapshot_log_to_keep: self.keep_logs,
            ..Default::default()
        };
        Ok(Arc::new(
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("bad raft timing: {e}"))?,
        ))
    }
}

/// Where a new node listens and how others reach it.
pub struct Endpoint {
    pub listener: TcpListener,
    /// HOST:PORT others use; when `None`, the bound address (which must then be specific).
    pub advertise: Option<String>,
}

impl Endpoint {
    /// Binds `listen` (port 0 picks a free port).
    pub async fn bind(listen: &str, advertise: Option<String>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        Ok(Endpoint {
            listener,
            advertise,
        })
    }

    fn addrs(&self) -> anyhow::Result<(SocketAddr, String)> {
        let bound = self.listener.local_addr()?;
        let advertise = match &self.advertise {
            Some(a) => a.clone(),
            None if bound.ip().is_unspecified() => anyhow::bail!(
                "listening on {bound} (all interfaces): give --advertise HOST:PORT, the address other nodes reach this one on"
            ),
            None => bound.to_string(),
        };
        validate_addr(&advertise).map_err(|e| anyhow::anyhow!("--advertise: {e}"))?;
        Ok((bound, advertise))
    }
}

/// A running node.
pub struct RunningNode {
    pub cluster: Arc<Cluster>,
    pub identity: Identity,
    /// The address the server is bound to.
    pub bound: SocketAddr,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    worker: JoinHandle<()>,
    closer: DiskWriter,
}

impl RunningNode {
    /// Creates a new cluster with this node as its only member, in an empty `data_dir`.
    pub async fn init(
        dd: &DataDir,
        ep: Endpoint,
        name: Option<String>,
        opts: &NodeOptions,
    ) -> anyhow::Result<RunningNode> {
        dd.prepare_new()?;
        let (bound, advertise) = ep.addrs()?;
        let name = name.unwrap_or_else(|| "n1".to_string());
        validate_name(&name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
        let identity = Identity {
            format: IDENTITY_FORMAT,
            cluster_id: random_hex(8),
            node_id: 1,
            name,
            listen: bound.to_string(),
            advertise,
            bootstrapped: false,
        };
        let mut store = Store::open(&dd.store_path())?;
        store
            .set_cluster_id(&identity.cluster_id)
            .await
            .map_err(anyhow::Error::msg)?;
        dd.save_identity(&identity)?;
        let node = Self::start(identity, store, ep.listener, opts).await?;
        node.bootstrap(dd).await?;
        Ok(node)
    }

    /// Joins the cluster that `peer` belongs to, with a node in an empty `data_dir`.
    pub async fn join(
        dd: &DataDir,
        ep: Endpoint,
        peer: &str,
        token: &str,
        name: Option<String>,
        join_timeout: Duration,
        opts: &NodeOptions,
    ) -> anyhow::Result<RunningNode> {
        let token = JoinToken::parse(token)?;
        if let Some(n) = &name {
            validate_name(n).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
        }
        dd.prepare_new()?;
        let (bound, advertise) = ep.addrs()?;
        let mut client = connect_with_retry(peer, join_timeout).await?;
        let reply = client
            .join(JoinRequest {
                token: token.render(),
                name: name.unwrap_or_default(),
                addr: advertise.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{peer} refused the join: {}", s.message()))?
            .into_inner();
        if reply.cluster_id != token.cluster_id {
            anyhow::bail!(
                "{peer} answered for cluster {}, but the token is for cluster {}",
                reply.cluster_id,
                token.cluster_id
            );
        }
        let identity = Identity {
            format: IDENTITY_FORMAT,
            cluster_id: reply.cluster_id,
            node_id: reply.node_id,
            name: reply.name,
            listen: bound.to_string(),
            advertise,
            bootstrapped: true,
        };
        let mut store = Store::open(&dd.store_path())?;
        store
            .set_cluster_id(&identity.cluster_id)
            .await
            .map_err(anyhow::Error::msg)?;
        dd.save_identity(&identity)?;
        Self::start(identity, store, ep.listener, opts).await
    }

    /// Restarts the node kept in `data_dir`, with its identity and state. `listen` overrides the
    /// address to bind (the advertised address stays).
    pub async fn run(
        dd: &DataDir,
        listen: Option<String>,
        opts: &NodeOptions,
    ) -> anyhow::Result<RunningNode> {
        let identity = dd.load_identity()?;
        let store = Store::open(&dd.store_path())?;
        match &store.cluster_id {
            Some(c) if *c == identity.cluster_id => {}
            found => anyhow::bail!(
                "{} belongs to cluster {} but its raft store to {}; refusing to start",
                dd.root().display(),
                identity.cluster_id,
                found.as_deref().unwrap_or("no cluster")
            ),
        }
        let listen = listen.unwrap_or_else(|| identity.listen.clone());
        let listener = TcpListener::bind(&listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        let node = Self::start(identity, store, listener, opts).await?;
        if !node.identity.bootstrapped {
            node.bootstrap(dd).await?;
        }
        Ok(node)
    }

    async fn start(
        identity: Identity,
        store: Store,
        listener: TcpListener,
        opts: &NodeOptions,
    ) -> anyhow::Result<RunningNode> {
        let bound = listener.local_addr()?;
        let config = opts.raft_config(&identity.cluster_id)?;
        let closer = store.closer();
        let (log, sm, _, _) = store.into_parts();
        let view = sm.view();
        let network = GrpcNetwork::new(identity.cluster_id.clone());
        let raft = Raft::new(identity.node_id, config, network, log, sm)
            .await
            .map_err(|e| anyhow::anyhow!("starting raft: {e}"))?;
        let cluster = Arc::new(Cluster::new(
            raft.clone(),
            view,
            identity.node_id,
            identity.name.clone(),
            identity.cluster_id.clone(),
            opts.request_timeout,
        ));
        let (stop, stopped) = watch::channel(false);
        let mut server_stop = stopped.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(RaftService::server(raft, identity.cluster_id.clone()))
                .add_service(ApiService::server(cluster.clone()))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = server_stop.changed().await;
                }),
        );
        let worker = tokio::spawn(membership_worker(cluster.clone(), stopped));
        Ok(RunningNode {
            cluster,
            identity,
            bound,
            stop,
            server,
            worker,
            closer,
        })
    }

    /// First node only: makes this node the cluster's single voter and commits the cluster's
    /// first command. Safe to repeat after a crash half-way.
    async fn bootstrap(&self, dd: &DataDir) -> anyhow::Result<()> {
        let id = &self.identity;
        let raft = &self.cluster.raft;
        if !raft.is_initialized().await? {
            let member = MemberNode {
                name: id.name.clone(),
                addr: id.advertise.clone(),
            };
            raft.initialize(
                [(id.node_id, member)]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("initializing raft: {e}"))?;
        }
        if self.cluster.view.read().cluster.cluster_id.is_empty() {
            let cmd = Command::InitCluster {
                cluster_id: id.cluster_id.clone(),
                join_secret: random_hex(16),
                node_id: id.node_id,
                name: id.name.clone(),
                addr: id.advertise.clone(),
            };
            match self.cluster.propose(cmd).await? {
                CommandResult::ClusterInitialized
                | CommandResult::Rejected(flock_scheduler::ApplyError::AlreadyInitialized {
                    ..
                }) => {}
                other => anyhow::bail!("initializing the cluster failed: {other:?}"),
            }
        }
        let mut done = self.identity.clone();
        done.bootstrapped = true;
        dd.save_identity(&done)?;
        Ok(())
    }

    /// Waits until this node is a member that has applied the cluster's state (a joining node
    /// becomes one once the leader has added it and replicated to it).
    pub async fn wait_until_member(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.cluster.metrics();
            let member = m
                .membership_config
                .membership()
                .get_node(&self.identity.node_id)
                .is_some();
            if member && !self.cluster.view.read().cluster.cluster_id.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "not added to the cluster's membership within {timeout:?}; check that the leader can reach this node at {}",
                    self.identity.advertise
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The join token of this node's cluster.
    pub fn token(&self) -> String {
        let a = self.cluster.view.read();
        JoinToken {
            cluster_id: a.cluster.cluster_id.clone(),
            secret: a.cluster.join_secret.clone(),
        }
        .render()
    }

    /// Stops the node in order: server, worker, Raft, then flushes the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(5), self.server).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server stopped with an error"),
            Err(_) => tracing::warn!("server did not stop within 5 s"),
            _ => {}
        }
        let _ = self.worker.await;
        if let Err(e) = self.cluster.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.closer
            .write(Vec::new(), true)
            .await
            .map_err(|e| anyhow::anyhow!("flushing the raft store: {e}"))?;
        Ok(())
    }
}
