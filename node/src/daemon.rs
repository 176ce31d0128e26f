//! Starting and stopping a node: `init` (a new cluster), `join` (an existing one), `run` (restart
//! from a data dir); `run --force-new-cluster` ([`force_new_cluster`]) and `init --restore`
//! ([`RunningNode::restore`]) are the ways back from a lost quorum and from a backup. Startup builds everything, then starts the server and the workers (through
//! [`crate::worker::Workers`]); shutdown stops them in a fixed order: API/Raft server, agents,
//! mesh and plugin, membership worker, Raft, QUIC transfer server and endpoint, store flush.
//! Every connection is mutual TLS with the cluster CA's certificates (see [`crate::pki`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{Config, SnapshotPolicy};
use tokio::net::TcpListener;

use flock_proto::v1::JoinRequest;
use flock_raft::log_store::DiskWriter;
use flock_raft::network::GrpcNetwork;
use flock_raft::server::RaftService;
use flock_raft::{MemberNode, Raft, Store};
use flock_scheduler::state::{validate_addr, validate_name};
use flock_scheduler::{Command, CommandResult};

use flock_raft::server::Authorize;

use crate::api::ApiService;
use crate::cluster::{membership_worker, Cluster};
use crate::datadir::{DataDir, Identity, IDENTITY_FORMAT};
use crate::datasets::{Datasets, StorageChoice};
use crate::pki::{
    fetch_pinned_ca, fingerprint, new_key_and_csr, pem_to_der, read_private, role_of,
    write_private, Authorizer, CertAuthority, NodeTls, PkiError, Role, TlsIdentity, TlsPaths,
};
use crate::token::{new_secret, random_hex, JoinSecretFile, JoinToken};
use crate::transfer::Peers;
use crate::worker::{Phase, Workers, WorkersView};
use flock_client::{connect, with_backoff, ClientConfig};
use flock_dataset::Backend;

/// Raft and request timing. Every field has a default suited to a LAN or one machine.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Leader heartbeat interval, ms. Default 50.
    pub heartbeat_ms: u64,
    /// Minimum election timeout, ms; the maximum is 4/3 of it. Default 150. openraft also makes
    /// a follower wait one leader lease (the maximum) after the last heartbeat before it stands,
    /// so a dead leader is replaced after roughly lease + timeout = 0.35 to 0.4 s by default,
    /// seven heartbeats missed in a row (issue 20: flock-bench counts the elections under load).
    pub election_timeout_ms: u64,
    /// Build a snapshot after this many new log entries. Default 10000.
    pub snapshot_logs: u64,
    /// Entries kept in the log after a snapshot, for followers slightly behind. Default 1000.
    pub keep_logs: u64,
    /// How long a request waits for a leader and for its command to commit. Default 5 s.
    pub request_timeout: Duration,
    /// Where datasets live; `None`: what the data dir recorded, or `dir` for a new node.
    pub storage: Option<StorageChoice>,
    /// The node's labels for placement constraints; `None` keeps the ones the cluster has.
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// Where the routing mesh listens.
    pub mesh: MeshAddr,
    /// The Docker volume plugin's name (its socket: `/run/docker/plugins/NAME.sock`); `None`:
    /// no plugin. Default: none; flockd's `init`, `join` and `run` serve "flock".
    pub plugin: Option<String>,
    /// Where `/metrics` is served. Default: 127.0.0.1 on the API port + 1000.
    pub metrics: crate::metrics::MetricsAddr,
}

/// Where a node's routing mesh listens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MeshAddr {
    /// On the address the node listens on (all interfaces when it listens on all).
    #[default]
    Listen,
    At(std::net::IpAddr),
    Off,
}

impl std::str::FromStr for MeshAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(MeshAddr::Off),
            _ => s.parse().map(MeshAddr::At).map_err(|_| {
                format!("{s:?} is not an IP address: give the address the routing mesh listens on (0.0.0.0 for all), or \"off\"")
            }),
        }
    }
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            heartbeat_ms: 50,
            election_timeout_ms: 150,
            snapshot_logs: 10_000,
            keep_logs: 1_000,
            request_timeout: Duration::from_secs(5),
            storage: None,
            labels: None,
            mesh: MeshAddr::Listen,
            plugin: None,
            metrics: crate::metrics::MetricsAddr::Default,
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
            // Each InstallSnapshot call carries at most this much (the Raft service's message
            // limit is far above it); AppendEntries are bounded in bytes by the log reader.
            snapshot_max_chunk_size: flock_raft::network::SNAPSHOT_CHUNK_BYTES,
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

/// The environment variable that points the docker driver at another engine socket than
/// [`crate::driver::docker::DOCKER_SOCKET`] (a rootless engine, or a test's fake one).
pub const DOCKER_SOCKET_ENV: &str = "FLOCK_DOCKER_SOCKET";

/// The Docker engine's socket: [`DOCKER_SOCKET_ENV`] if set (and not empty), else the default.
/// A value that is not UTF-8 is refused rather than replaced by the default: the operator
/// asked for another engine, and silently using the local one would run apps on the wrong one.
pub(crate) fn docker_socket() -> anyhow::Result<String> {
    match std::env::var(DOCKER_SOCKET_ENV) {
        Ok(s) if !s.is_empty() => Ok(s),
        Ok(_) | Err(std::env::VarError::NotPresent) => {
            Ok(crate::driver::docker::DOCKER_SOCKET.to_string())
        }
        Err(std::env::VarError::NotUnicode(v)) => anyhow::bail!(
            "{DOCKER_SOCKET_ENV}={v:?} is not UTF-8: give the Docker engine's socket path, or unset it for {}",
            crate::driver::docker::DOCKER_SOCKET
        ),
    }
}

/// Starts the fencing watchdog of the data dir at `root` (unless one runs) and has every lease
/// renewal recorded for it: it kills this node's stateful apps once the lease has run out,
/// also when flockd is dead, hung or stopped. Without it (not run as the flockd binary, or the
/// watchdog cannot start) only flockd itself fences, which it cannot do when it is not running:
/// said loudly.
async fn start_fencing(cluster: &Cluster, root: &std::path::Path) {
    let dir = match crate::fence::FenceDir::open(root) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the fencing directory; stateful apps are fenced only while flockd runs");
            return;
        }
    };
    cluster.leases.set_fence(dir);
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot find flockd's binary to start the fencing watchdog");
            return;
        }
    };
    let is_flockd = exe
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("flockd"));
    if !is_flockd {
        tracing::warn!(exe = %exe.display(), "not run as flockd: no fencing watchdog (stateful apps are fenced only while this process runs)");
        return;
    }
    let root = root.to_path_buf();
    cluster.leases.set_watchdog(exe.clone(), root.clone());
    let spawned = tokio::task::spawn_blocking(move || crate::fence::spawn_watch(&exe, &root)).await;
    match spawned {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the fencing watchdog did not start; stateful apps are fenced only while flockd runs")
        }
        Err(e) => tracing::error!(error = %e, "the fencing watchdog did not start"),
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
    /// The address the server is bound to (TCP for gRPC, and UDP for QUIC on the same port).
    pub bound: SocketAddr,
    /// The QUIC endpoint snapshot streams use, with the same certificates as gRPC.
    pub quic: quinn::Endpoint,
    pub tls: NodeTls,
    /// The process driver that runs this node's apps.
    pub drivers: crate::driver::Drivers,
    /// Where the routing mesh listens; `None` when it is off.
    pub mesh: Option<std::net::IpAddr>,
    /// The Docker volume plugin's socket, when it is served.
    pub plugin: Option<std::path::PathBuf>,
    /// Where `/metrics` is served, when it is.
    pub metrics_addr: Option<SocketAddr>,
    /// The join secret's file, on the CA holder.
    secret: Option<JoinSecretFile>,
    /// The node's long-lived tasks, stopped in order by [`RunningNode::shutdown`].
    workers: Workers,
    closer: DiskWriter,
}

impl RunningNode {
    /// Creates a new cluster with this node as its only member, in an empty `data_dir`: the
    /// cluster CA, this node's certificate, and an admin client config (`DATA_DIR/admin.conf`).
    pub async fn init(
        dd: &DataDir,
        ep: Endpoint,
        name: Option<String>,
        opts: &NodeOptions,
    ) -> anyhow::Result<RunningNode> {
        crate::datadir::restrict_umask();
        let checked = check_storage(opts)?;
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
        let paths = TlsPaths::new(dd.root());
        let (ca, ca_key_pem) = CertAuthority::create(&identity.cluster_id)?;
        let (key_pem, csr_pem) = new_key_and_csr()?;
        let tls = NodeTls {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: ca.sign_csr(&csr_pem, &Role::Node(identity.node_id))?,
            key_pem,
        };
        tls.save(&paths)?;
        write_private(&paths.ca_key(), &ca_key_pem)?;
        JoinSecretFile::new(dd.root()).write(&new_secret())?;
        let (admin_key, admin_csr) = new_key_and_csr()?;
        ClientConfig {
            format: 1,
            cluster_id: identity.cluster_id.clone(),
            addrs: vec![identity.advertise.clone()],
            ca_pem: ca.cert_pem.clone(),
            cert_pem: ca.sign_csr(&admin_csr, &Role::Admin("admin".into()))?,
            key_pem: admin_key,
        }
        .save(&dd.admin_config_path())?;
        let mut store = Store::open(&dd.store_path())?;
        // Before anything is written to it (whatever umask redb created it with).
        crate::datadir::make_private(&dd.store_path())?;
        store
            .set_cluster_id(&identity.cluster_id)
            .await
            .map_err(anyhow::Error::msg)?;
        // Written with the identity: a node that failed to start leaves its dir reusable.
        let backend = open_new_storage(dd, opts, checked)?;
        dd.save_identity(&identity)?;
        let node = Self::start(
            identity,
            store,
            ep.listener,
            (tls, paths),
            Some((ca, JoinSecretFile::new(dd.root()))),
            (backend, dd.root().join("apps")),
            opts,
        )
        .await?;
        node.bootstrap(dd).await?;
        Ok(node)
    }

    /// Joins the cluster that `peer` belongs to, with a node in an empty `data_dir`. Checks that
    /// `peer` presents the CA the token names before sending anything; the node's key never
    /// leaves it (the cluster signs a request for it).
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
        crate::datadir::restrict_umask();
        let checked = check_storage(opts)?;
        dd.prepare_new()?;
        let (bound, advertise) = ep.addrs()?;
        let fp = token.ca_fingerprint.clone();
        // Only an unreachable peer is worth retrying; a wrong CA is final.
        let ca_pem = with_backoff(
            "the address",
            join_timeout,
            |e| {
                e.downcast_ref::<PkiError>()
                    .is_some_and(|p| matches!(p, PkiError::Unreachable { .. }))
            },
            || async { Ok(fetch_pinned_ca(peer, &fp).await?) },
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot join through {peer}: {e:#}"))?;
        let pinned = TlsIdentity::from_pem(&ca_pem, None)?;
        let mut client = connect(peer, &pinned, Duration::from_secs(5)).await?;
        let (key_pem, csr_pem) = new_key_and_csr()?;
        let request = JoinRequest {
            token: token.render(),
            name: name.unwrap_or_default(),
            addr: advertise.clone(),
            csr_pem,
        };
        let deadline = Instant::now() + join_timeout;
        let reply = loop {
            match client.join(request.clone()).await {
                Ok(r) => break r.into_inner(),
                // Too many joins from this address just now: wait as long as the node says.
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    let wait = retry_after(&s);
                    if Instant::now() + wait > deadline {
                        anyhow::bail!(
                            "{peer} refused the join: {} (still refused after {join_timeout:?}; --join-timeout waits longer)",
                            s.message()
                        );
                    }
                    tracing::info!("{peer}: {}; retrying", s.message());
                    tokio::time::sleep(wait).await;
                }
                Err(s) => anyhow::bail!("{peer} refused the join: {}", s.message()),
            }
        };
        if fingerprint(&pem_to_der(&reply.ca_pem, "CA certificate")?) != token.ca_fingerprint {
            anyhow::bail!("{peer} answered with a CA other than the token's; refusing it");
        }
        if role_of(&pem_to_der(&reply.cert_pem, "node certificate")?)? != Role::Node(reply.node_id)
        {
            anyhow::bail!("{peer} answered with a certificate for another node; refusing it");
        }
        let tls = NodeTls {
            ca_pem: reply.ca_pem,
            cert_pem: reply.cert_pem,
            key_pem,
        };
        let paths = TlsPaths::new(dd.root());
        tls.save(&paths)?;
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
        // Before anything is written to it (whatever umask redb created it with).
        crate::datadir::make_private(&dd.store_path())?;
        store
            .set_cluster_id(&identity.cluster_id)
            .await
            .map_err(anyhow::Error::msg)?;
        // Written with the identity: a node that failed to start leaves its dir reusable.
        let backend = open_new_storage(dd, opts, checked)?;
        dd.save_identity(&identity)?;
        Self::start(
            identity,
            store,
            ep.listener,
            (tls, paths),
            None,
            (backend, dd.root().join("apps")),
            opts,
        )
        .await
    }

    /// Restarts the node kept in `data_dir`, with its identity and state. `listen` overrides the
    /// address to bind (the advertised address stays).
    pub async fn run(
        dd: &DataDir,
        listen: Option<String>,
        opts: &NodeOptions,
    ) -> anyhow::Result<RunningNode> {
        crate::datadir::restrict_umask();
        let identity = dd.load_identity()?;
        let tightened = dd.tighten()?;
        if !tightened.is_empty() {
            tracing::warn!(
                "{} in {} could be read or listed by other users; took group and other permissions away from {} paths: {}",
                if tightened.len() == 1 { "a file or directory" } else { "files and directories" },
                dd.root().display(),
                tightened.len(),
                crate::datadir::describe_tightened(dd.root(), &tightened)
            );
        }
        let paths = TlsPaths::new(dd.root());
        let tls = NodeTls::load(&paths)?;
        let ca = if paths.ca_key().exists() {
            let secret = JoinSecretFile::new(dd.root());
            if identity.bootstrapped && secret.read()?.is_none() {
                tracing::warn!(
                    "{} does not exist: this cluster's join secret was made by an older flockd, which kept it in the replicated state; run `flockctl cluster token --rotate` once every node runs this version",
                    secret.path().display()
                );
            }
            Some((
                CertAuthority::load(&tls.ca_pem, &read_private(&paths.ca_key())?)?,
                secret,
            ))
        } else {
            None
        };
        let store = Store::open(&dd.store_path())?;
        crate::datadir::make_private(&dd.store_path())?;
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
        let backend = StorageChoice::resolve(dd, opts.storage.as_ref())?.open(dd)?;
        let node = Self::start(
            identity,
            store,
            listener,
            (tls, paths),
            ca,
            (backend, dd.root().join("apps")),
            opts,
        )
        .await?;
        if !node.identity.bootstrapped {
            node.bootstrap(dd).await?;
        }
        Ok(node)
    }

    async fn start(
        identity: Identity,
        store: Store,
        listener: TcpListener,
        (tls, paths): (NodeTls, TlsPaths),
        ca: Option<(CertAuthority, JoinSecretFile)>,
        (backend, apps_root): (Arc<dyn Backend>, std::path::PathBuf),
        opts: &NodeOptions,
    ) -> anyhow::Result<RunningNode> {
        let bound = listener.local_addr()?;
        let data_root = apps_root.parent().map(std::path::Path::to_path_buf);
        let datasets = Arc::new(Datasets::new(backend, identity.node_id));
        let drivers = crate::driver::Drivers::open_at(
            apps_root,
            &format!("{}-{}", identity.cluster_id, identity.name),
            &docker_socket()?,
        )
        .await?
        .with_node_host(flock_scheduler::state::host_of(&identity.advertise));
        let apps_view = crate::apps::AppsView::default();
        let mesh_view = crate::mesh::MeshView::default();
        let mesh = match opts.mesh {
            MeshAddr::Listen => Some(bound.ip()),
            MeshAddr::At(ip) => Some(ip),
            MeshAddr::Off => None,
        };
        let config = opts.raft_config(&identity.cluster_id)?;
        let closer = store.closer();
        let metrics_listener = match opts.metrics.resolve(bound) {
            None => None,
            Some((addr, chosen)) => match TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) if chosen => {
                    anyhow::bail!("cannot serve metrics on {addr} (--metrics-addr): {e}")
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot serve metrics on the default address; give --metrics-addr IP:PORT (or off)");
                    None
                }
            },
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let (log, sm, _, _) = store.into_parts();
        let view = sm.view();
        // One identity for every connection, client and server: renewal replaces its certificate.
        let tls_identity = tls.identity()?;
        let network = GrpcNetwork::new(identity.cluster_id.clone(), tls_identity.clone());
        let raft = Raft::new(identity.node_id, config, network.clone(), log, sm)
            .await
            .map_err(|e| anyhow::anyhow!("starting raft: {e}"))?;
        let cluster = Arc::new(Cluster::new(
            raft.clone(),
            view.clone(),
            identity.node_id,
            identity.name.clone(),
            identity.cluster_id.clone(),
            opts.request_timeout,
            tls_identity.clone(),
        ));
        closer.on_durable_write(cluster.prometheus.fsync_observer());
        if let Some(root) = &data_root {
            start_fencing(&cluster, root).await;
        }
        let secret = ca.as_ref().map(|(_, f)| f.clone());
        let auth = Authorizer::new(view);
        let edge = crate::edge::AuthLayer::new(auth.clone());
        let raft_auth = auth.clone();
        let quic_auth = auth.clone();
        let authorize: Authorize =
            Arc::new(move |req| raft_auth.check_node(&req.peer_certs()).map(|_| ()));
        let (ca, secret_file) = ca.map(|(ca, f)| (Arc::new(ca), f)).unzip();
        let workers = Workers::new();
        let api = ApiService::server(
            cluster.clone(),
            auth,
            tls.ca_pem.clone(),
            tls.ca_fingerprint()?,
            ca.clone().zip(secret_file),
            crate::api::LocalParts {
                datasets: datasets.clone(),
                drivers: drivers.clone(),
                apps: apps_view.clone(),
                mesh: mesh_view.clone(),
                workers: workers.view(),
            },
        );
        let (quic, quic_tuning) = crate::transfer::quic::bind_endpoint(bound, &tls, &tls_identity)
            .map_err(|e| anyhow::anyhow!("cannot open the QUIC endpoint on udp {bound}: {e}"))?;
        // TLS is done here rather than by tonic, so that a renewed certificate is presented
        // without a restart; tonic still reads the client's certificates from these streams.
        let incoming = flock_raft::tls::tls_incoming(
            listener,
            Arc::new(NodeTls::grpc_server(&tls_identity)?),
            workers.stop_signal(Phase::Api),
        );
        let raft_service = RaftService::server(
            raft,
            identity.cluster_id.clone(),
            authorize,
            workers.stop_signal(Phase::Api),
        );
        workers.spawn(Phase::Api, "api", |mut stop, status| async move {
            let served = tonic::transport::Server::builder()
                // Before any service: nothing but Join is read without a member's certificate.
                .layer(edge)
                .add_service(raft_service)
                .add_service(api)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.changed().await;
                })
                .await;
            if let Err(e) = served {
                status.fail(format!("the gRPC server stopped: {e}"));
            }
        });
        if let Some(listener) = metrics_listener {
            let (cluster, datasets, apps) = (cluster.clone(), datasets.clone(), apps_view.clone());
            tracing::info!(addr = ?metrics_addr, "serving metrics on /metrics");
            workers.spawn(Phase::Api, "metrics", |stop, status| {
                crate::metrics::serve(listener, cluster, datasets, apps, stop, status)
            });
        }
        workers.spawn(Phase::Membership, "membership", |stop, status| {
            membership_worker(cluster.clone(), stop, status)
        });
        workers.spawn(Phase::Membership, "liveness", |stop, status| {
            crate::lease::watch(cluster.clone(), stop, status)
        });
        workers.spawn(Phase::Membership, "placement", |stop, status| {
            crate::placement::run(cluster.clone(), stop, status)
        });
        workers.spawn(Phase::Membership, "lease", |stop, status| {
            crate::lease::renew(cluster.clone(), stop, status)
        });
        {
            let (quic, datasets, view) = (quic.clone(), datasets.clone(), cluster.view.clone());
            workers.spawn(Phase::Transfer, "transfer", |stop, _| {
                crate::transfer::serve(quic, quic_auth, datasets, view, stop)
            });
        }
        {
            let (cluster, datasets, drivers) = (cluster.clone(), datasets.clone(), drivers.clone());
            let link_host = mesh.map(|ip| crate::mesh::link_host(ip, &identity.advertise));
            workers.spawn(Phase::Agents, "apps", |stop, status| {
                crate::apps::run(
                    cluster, datasets, drivers, apps_view, link_host, stop, status,
                )
            });
        }
        {
            let cluster = cluster.clone();
            workers.spawn(Phase::Edge, "services", |stop, status| {
                crate::mesh::services::run(cluster, stop, status)
            });
        }
        if let Some(ip) = mesh {
            let cluster = cluster.clone();
            workers.spawn(Phase::Edge, "mesh", |stop, status| {
                crate::mesh::run(
                    cluster,
                    crate::mesh::MeshOptions::new(ip),
                    mesh_view,
                    stop,
                    status,
                )
            });
        }
        {
            let (cluster, labels) = (cluster.clone(), opts.labels.clone());
            let capacity = crate::report::local_capacity(drivers.docker.is_some());
            workers.spawn(Phase::Agents, "report", |stop, status| {
                crate::report::run(cluster, labels, capacity, stop, status)
            });
        }
        // The plugin is a front door, not the node's job: a socket it cannot have is a warning.
        let plugin_socket = opts.plugin.as_ref().and_then(|name| {
            crate::plugin::PluginSocket::bind(&crate::plugin::plugin_dir(), name)
                .inspect_err(|e| tracing::warn!("{e}; the Docker volume plugin is off"))
                .ok()
        });
        let plugin = plugin_socket.as_ref().map(|p| p.path.clone());
        if let Some(socket) = plugin_socket {
            let mut volumes = crate::plugin::Volumes::new(cluster.clone(), datasets.clone());
            volumes.docker = drivers.docker.as_ref().map(|d| d.client().clone());
            workers.spawn(Phase::Edge, "plugin", |stop, _| {
                socket.serve(Arc::new(volumes), stop)
            });
        }
        let peers = Arc::new(Peers::new(quic.clone(), tls_identity.clone(), quic_tuning));
        let renewal = crate::renew::Renewal {
            paths,
            ca_pem: tls.ca_pem.clone(),
            key_pem: tls.key_pem.clone(),
            identity: tls_identity,
            ca,
            cluster: cluster.clone(),
            network,
            peers: peers.clone(),
        };
        workers.spawn(Phase::Agents, "renewal", |stop, status| {
            crate::renew::run(renewal, stop, status)
        });
        {
            let (cluster, datasets, drivers) = (cluster.clone(), datasets.clone(), drivers.clone());
            workers.spawn(Phase::Agents, "datasets", |stop, status| {
                crate::datasets::agent::run(cluster, datasets, peers, drivers, stop, status)
            });
        }
        Ok(RunningNode {
            secret,
            plugin,
            metrics_addr,
            mesh,
            cluster,
            identity,
            bound,
            quic,
            tls,
            drivers,
            workers,
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
            // `init` wrote the secret; a data dir an older flockd left half-initialized has none.
            let file = JoinSecretFile::new(dd.root());
            let secret = match file.read()? {
                Some(s) => s,
                None => {
                    let s = new_secret();
                    file.write(&s)?;
                    s
                }
            };
            let cmd = Command::InitCluster {
                cluster_id: id.cluster_id.clone(),
                // Only the hash goes into the log and the state.
                join_secret: flock_scheduler::hash_join_secret(&secret),
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

    /// The join token of this node's cluster; on the CA holder only (the node `init` made).
    pub fn token(&self) -> anyhow::Result<String> {
        let hash = self.cluster.view.read().cluster.join_secret_hash.clone();
        let secret = self
            .secret
            .as_ref()
            .ok_or_else(|| {
                anyhow::anyhow!("only the node holding the cluster CA knows the join secret")
            })?
            .current(&hash)?;
        Ok(JoinToken {
            ca_fingerprint: self.tls.ca_fingerprint()?,
            secret,
        }
        .render())
    }

    /// The node's workers and their states, as `flockctl status` shows them.
    pub fn workers(&self) -> WorkersView {
        self.workers.view()
    }

    /// Stops the node in order: the agents, the mesh and plugin, the membership worker and the
    /// lease renewal, the API (no new requests), Raft, the QUIC transfer server and endpoint
    /// (closed, then idle), and last flushes the store. Each phase has a deadline; a worker
    /// that misses it is named in the log and aborted, and the shutdown goes on.
    ///
    /// The API (which serves Raft's RPCs and the read index every node renews its lease by)
    /// stops just before Raft: a leader that stopped it first, then spent seconds stopping its
    /// agents, left the other nodes unable to renew while it still heartbeat as leader, and
    /// their stateful apps were fenced. The lease is renewed until then too, so the node's own
    /// apps keep theirs through a slow shutdown.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        for phase in [Phase::Agents, Phase::Edge, Phase::Membership, Phase::Api] {
            self.workers.stop(phase).await;
            if phase == Phase::Agents {
                shutdown_failpoint().await;
            }
        }
        if let Err(e) = self.cluster.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        tracing::info!("shutdown: raft stopped");
        self.workers.stop(Phase::Transfer).await;
        self.quic.close(0u32.into(), b"shutdown");
        let idle = Duration::from_secs(2);
        match tokio::time::timeout(idle, self.quic.wait_idle()).await {
            Ok(()) => tracing::info!("shutdown: QUIC endpoint closed"),
            Err(_) => tracing::warn!(
                "shutdown: QUIC endpoint closed; its connections did not finish closing within {idle:?}"
            ),
        }
        self.closer
            .write(Vec::new(), true)
            .await
            .map_err(|e| anyhow::anyhow!("flushing the raft store: {e}"))?;
        tracing::info!("shutdown: store flushed");
        Ok(())
    }
}

/// `flockd run --force-new-cluster`, before the node starts: makes this node the only voter of
/// its cluster, keeping its state ([`flock_raft::recover`]), and returns what it did and what
/// the operator must do next, one line each (flockd prints them and logs them at WARN).
pub fn force_new_cluster(dd: &DataDir) -> anyhow::Result<Vec<String>> {
    let identity = dd.load_identity()?;
    let member = MemberNode {
        name: identity.name.clone(),
        addr: identity.advertise.clone(),
    };
    let f = flock_raft::recover::force_new_cluster(
        &dd.store_path(),
        &identity.cluster_id,
        identity.node_id,
        member,
    )?;
    let named = |nodes: &std::collections::BTreeMap<u64, MemberNode>| {
        nodes
            .iter()
            .map(|(id, n)| format!("{} (id {id}, {})", n.name, n.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let me = &identity.name;
    let mut lines = vec![format!(
        "FORCED A NEW CLUSTER: node {me} (id {}) is now the only voter of cluster {}, and its leader in term {} (membership entry at log index {})",
        identity.node_id, identity.cluster_id, f.log_id.leader_id.term, f.log_id.index
    )];
    if !f.dropped_voters.is_empty() {
        lines.push(format!("dropped voters: {}", named(&f.dropped_voters)));
    }
    if !f.dropped_learners.is_empty() {
        lines.push(format!(
            "dropped learners (the leader adds the registered ones back as learners): {}",
            named(&f.dropped_learners)
        ));
    }
    lines.push(match f.last_before {
        Some(l) => format!(
            "every entry of {me}'s log, up to index {} (term {}), is now committed; entries the lost voters may have committed after it are lost",
            l.index, l.leader_id.term
        ),
        None => format!("{me}'s log was empty; whatever the lost voters committed is lost"),
    });
    if !f.was_voter {
        lines.push(format!(
            "{me} was a learner, not a voter: its log may lag well behind what the voters had committed"
        ));
    }
    if !TlsPaths::new(dd.root()).ca_key().exists() {
        lines.push(format!(
            "{me} does not hold the cluster CA's key (its first node did): unless that node is still alive, no node can join and no admin config can be issued; take a backup (`flockctl cluster backup`) and start a new cluster from it (`flockd init --restore`)"
        ));
    }
    let lost: Vec<&str> = f.dropped_voters.values().map(|n| n.name.as_str()).collect();
    if !lost.is_empty() {
        lines.push(format!(
            "next: for each dropped node lost for good, `flockctl node rm NAME` ({}; --force for the node that holds the CA); their registrations stay until then, so their stateful apps fail over to replicas once their leases run out (`flockctl events`); a node that is a dataset's primary is refused until its dataset has failed over or moved",
            lost.join(", ")
        ));
    }
    lines.push(
        "next: start other survivors with `flockd run` (never with --force-new-cluster): they follow this node as learners, with its log; add machines with `flockd join` (a fresh data dir each); caught-up learners become voters again"
            .to_string(),
    );
    lines.push(
        "a lost node must NEVER start again with its old data dir: its old voters could elect a leader of their own; wipe it and join it as a new node"
            .to_string(),
    );
    Ok(lines)
}

impl RunningNode {
    /// `flockd init --restore`: on the new cluster this node just made, proposes what `plan`
    /// brings back of a backup, as ordinary commands (so older members apply them too), each
    /// through the normal size checks: the keys, the revoked admin labels, and the deploys of
    /// the apps without a dataset, through this node's own API as the new admin (the path of
    /// `flockctl deploy`, with its preflight). Returns what it did and what it left out, one
    /// line each; what failed is among them, and fails the whole only when nothing could be
    /// proposed.
    pub async fn restore(
        &self,
        dd: &DataDir,
        from: &crate::api::backup::BackupHeader,
        plan: crate::api::backup::RestorePlan,
    ) -> anyhow::Result<Vec<String>> {
        use futures::StreamExt;
        let mut lines = vec![format!(
            "restoring the backup of cluster {} (applied index {}, term {}, taken {} on {}) into new cluster {}",
            from.cluster_id,
            from.applied_index,
            from.applied_term,
            from.time,
            from.node,
            self.identity.cluster_id
        )];
        let cluster = &self.cluster;
        let keys = plan.kv.len();
        let failed: Vec<String> = futures::stream::iter(plan.kv)
            .map(|(key, value)| async move {
                let r = cluster
                    .propose(Command::KvPut {
                        key: key.clone(),
                        value,
                    })
                    .await;
                match r {
                    Ok(CommandResult::KvPut(_)) => None,
                    Ok(other) => Some(format!("{}: {other:?}", flock_scheduler::shown(&key))),
                    Err(e) => Some(format!("{}: {e}", flock_scheduler::shown(&key))),
                }
            })
            // Many at once: the leader batches concurrent proposals into one entry each fsync.
            .buffer_unordered(64)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        lines.push(format!(
            "restored {} of {keys} keys (their values; revisions, versions and create revisions start again from 1)",
            keys - failed.len()
        ));
        for f in &failed {
            lines.push(format!("key not restored: {f}"));
        }
        for label in &plan.revoked_admins {
            match cluster
                .propose(Command::RevokeAdmin {
                    label: label.clone(),
                })
                .await
            {
                Ok(CommandResult::AdminRevoked { .. }) => {}
                other => lines.push(format!(
                    "revoked admin label {label:?} not restored: {other:?}"
                )),
            }
        }
        if !plan.revoked_admins.is_empty() {
            lines.push(format!(
                "revoked admin labels again: {}",
                plan.revoked_admins.join(", ")
            ));
        }
        for label in &plan.kept_labels {
            lines.push(format!(
                "not revoked again: label {label:?}, the new admin config's own (DATA_DIR/admin.conf); revoke it once you issued another (`flockctl cluster admin-config --out FILE --label NEW`, then `--revoke {label}` with the new one)"
            ));
        }
        if !plan.deploys.is_empty() {
            let config = flock_client::ClientConfig::load(&dd.admin_config_path())?;
            let mut api = flock_client::connect(
                &self.identity.advertise,
                &config.identity()?,
                Duration::from_secs(5),
            )
            .await?;
            for d in plan.deploys {
                let what = match &d.stack {
                    Some(s) => format!("stack {s}"),
                    None => "the apps outside stacks".to_string(),
                };
                let names = d.apps.keys().cloned().collect::<Vec<_>>().join(", ");
                let req = flock_proto::v1::DeployRequest {
                    plan_json: serde_json::to_string(&d.apps)?,
                    dry_run: false,
                    volumes_json: String::new(),
                    stack: d.stack.clone().unwrap_or_default(),
                    secrets: d.secrets.into_iter().collect(),
                    problems_in_reply: true,
                };
                match api.deploy(req).await {
                    Ok(r) if r.get_ref().problems.is_empty() => {
                        lines.push(format!("deployed {what}: {names}"));
                        for w in &r.get_ref().warnings {
                            lines.push(format!("warning: {w}"));
                        }
                    }
                    Ok(r) => lines.push(format!(
                        "NOT restored, {what} ({names}): {}",
                        r.get_ref().problems.join("; ")
                    )),
                    Err(s) => {
                        lines.push(format!("NOT restored, {what} ({names}): {}", s.message()))
                    }
                }
            }
        }
        if !plan.unpinned.is_empty() {
            lines.push(format!(
                "pinned to old nodes, placed anew: {}",
                plan.unpinned.join(", ")
            ));
        }
        for (app, dep) in &plan.waiting {
            lines.push(format!(
                "app {app} depends on {dep}, which was not restored: it waits until {dep} runs"
            ));
        }
        let none = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        lines.push(format!(
            "NOT restored, apps with a dataset (their data is on the old nodes' disks; deploy them again once their data is in place): {}",
            none(&plan.stateful_apps)
        ));
        lines.push(format!("NOT restored, datasets: {}", none(&plan.datasets)));
        lines.push(format!(
            "NOT restored, the old nodes (join new ones with `flockd join`): {}",
            none(&plan.nodes)
        ));
        lines.push(
            "NOT restored: the old CA, admin configs and certificates; use the new admin config in this data dir (admin.conf)"
                .to_string(),
        );
        Ok(lines)
    }
}

/// The environment variable of a fault-injection point for tests: `MS` makes a shutdown wait MS
/// milliseconds once its agents have stopped, as a node whose agents are slow to stop (a push
/// in flight) does.
pub const SHUTDOWN_HOLD_FAILPOINT: &str = "FLOCK_FAILPOINT_SHUTDOWN_HOLD";

async fn shutdown_failpoint() {
    let Some(ms) = std::env::var(SHUTDOWN_HOLD_FAILPOINT)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    tracing::warn!(
        ms,
        "failpoint: holding the shutdown after the agents stopped"
    );
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// How long a RESOURCE_EXHAUSTED join refusal asks the caller to wait (1 s when it does not
/// say; at most 60 s, whatever it says).
fn retry_after(s: &tonic::Status) -> Duration {
    let ms = s
        .metadata()
        .get(crate::api::RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1000);
    Duration::from_millis(ms.clamp(10, 60_000))
}

/// For a new node: opens a zfs backend before anything is written, so that a node that cannot
/// use zfs says so at once and leaves its data dir untouched.
fn check_storage(opts: &NodeOptions) -> anyhow::Result<Option<Arc<dyn Backend>>> {
    match &opts.storage {
        Some(z @ StorageChoice::Zfs { .. }) => Ok(Some(z.open(&DataDir::new("/nonexistent"))?)),
        _ => Ok(None),
    }
}

/// For a new node, once its data dir is prepared: records the storage choice and opens it.
fn open_new_storage(
    dd: &DataDir,
    opts: &NodeOptions,
    checked: Option<Arc<dyn Backend>>,
) -> anyhow::Result<Arc<dyn Backend>> {
    let choice = opts.storage.clone().unwrap_or(StorageChoice::Dir);
    choice.save(dd)?;
    match checked {
        Some(b) => Ok(b),
        None => choice.open(dd),
    }
}
