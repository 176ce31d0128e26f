//! One client connection through the mesh: find where the app runs now, connect there, and
//! forward both ways until both sides have ended.

use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use flock_scheduler::ClusterState;

use super::splice::pump;
use super::MeshOptions;
use crate::cluster::Cluster;

/// Where a connection to an external port goes now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// No app publishes the port (any more).
    Nobody,
    /// The app is handed off between nodes: it runs nowhere until the move commits.
    Moving,
    /// HOST:PORT of the app on each node that runs an instance of it whose recorded health
    /// lets it serve ([`flock_scheduler::App::serves_on`]), the first instance's first.
    At(Vec<String>),
    /// Every instance is recorded starting or unhealthy: none gets the connection. While one
    /// is `starting` (a new instance after a move, a restart) the connection waits for it as
    /// for a move; when all are unhealthy it is refused at once, as Swarm does.
    Unready { starting: bool },
}

/// Where a connection to external `port` goes in `state`.
pub fn target(state: &ClusterState, port: u16) -> Target {
    let found = state.apps.values().find_map(|app| {
        let p = app.spec.ports.iter().find(|p| p.external == port)?;
        Some((app, p.internal))
    });
    let Some((app, internal)) = found else {
        return Target::Nobody;
    };
    let Some(first) = state.app_runs_on(app) else {
        return Target::Moving;
    };
    let nodes: Vec<_> = std::iter::once(first)
        .chain(app.more.iter().copied())
        .collect();
    let serving: Vec<_> = nodes.iter().filter(|n| app.serves_on(**n)).collect();
    if serving.is_empty() {
        return Target::Unready {
            starting: nodes
                .iter()
                .any(|n| app.health.get(n) == Some(&flock_scheduler::Health::Starting)),
        };
    }
    let addrs: Vec<String> = serving
        .into_iter()
        .filter_map(|id| state.nodes.get(id))
        .map(|node| {
            let host = super::host_of(&node.addr);
            if host.contains(':') {
                format!("[{host}]:{internal}")
            } else {
                format!("{host}:{internal}")
            }
        })
        .collect();
    if addrs.is_empty() {
        return Target::Moving;
    }
    Target::At(addrs)
}

/// Spreads new connections over an app's instances: each starts at the next one.
static NEXT_INSTANCE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Pause between attempts to reach an app that did not accept.
const RETRY_GAP: Duration = Duration::from_millis(25);
/// The most one connect may take (a node that is down and drops packets).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) async fn connection(
    client: TcpStream,
    port: u16,
    cluster: Arc<Cluster>,
    opts: MeshOptions,
) {
    let mesh = &cluster.prometheus.mesh;
    let label = [("port", port.to_string())];
    mesh.connections.get_or_create(&label).inc();
    let Some(backend) = reach(port, &cluster, &opts).await else {
        mesh.refused.get_or_create(&label).inc();
        refuse(client);
        return;
    };
    let open = mesh.open.get_or_create_owned(&label);
    open.inc();
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    let bytes = |dir: &str| {
        mesh.bytes
            .get_or_create_owned(&[("port", port.to_string()), ("direction", dir.to_string())])
    };
    let (to_app, from_app) = (bytes("to_app"), bytes("from_app"));
    if let Err(e) = tokio::try_join!(
        half(&client, &backend, &to_app),
        half(&backend, &client, &from_app)
    ) {
        tracing::debug!(port, error = %e, "routing mesh: connection ended with an error");
        // A reset on one side is passed on as a reset.
        refuse(client);
    }
    open.dec();
}

/// One way of a connection: forwards until the sender ends, then passes its end of stream on
/// (the other way stays open: a client may half-close and still read the reply). Counts the
/// bytes in `sent` as they go.
async fn half(
    from: &TcpStream,
    to: &TcpStream,
    sent: &prometheus_client::metrics::counter::Counter,
) -> std::io::Result<u64> {
    let n = pump(from, to, |b| {
        sent.inc_by(b);
    })
    .await?;
    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
    Ok(n)
}

/// Connects to the app behind `port`, following it while it moves. `None`: refuse the client.
async fn reach(port: u16, cluster: &Cluster, opts: &MeshOptions) -> Option<TcpStream> {
    let start = Instant::now();
    let mut changes = cluster.metrics_watch();
    // Since when the app has been somewhere (a new place restarts the retry budget: the app
    // is starting there).
    let mut placed: Option<(String, Instant)> = None;
    loop {
        let now = Instant::now();
        let t = target(&cluster.view.read().cluster, port);
        match t {
            Target::Nobody | Target::Unready { starting: false } => return None,
            Target::Moving | Target::Unready { starting: true } => {
                if now >= start + opts.hold {
                    tracing::info!(
                        port,
                        "routing mesh: the app stayed in a move too long; refusing"
                    );
                    return None;
                }
                placed = None;
                // Wait for the next applied entry (the move's commit), or a little.
                let _ = tokio::time::timeout(RETRY_GAP * 4, changes.changed()).await;
            }
            Target::At(addrs) => {
                let key = addrs.join(",");
                let since = match &placed {
                    Some((a, t)) if *a == key => *t,
                    _ => {
                        placed = Some((key, now));
                        now
                    }
                };
                // Each instance in turn from the next one: an instance that does not accept
                // (not started, exited, its node down) passes the connection on to the others.
                let first = NEXT_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut last_error = String::new();
                for k in 0..addrs.len() {
                    let addr = &addrs[(first + k) % addrs.len()];
                    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                        Ok(Ok(s)) => return Some(s),
                        Ok(Err(e)) => last_error = format!("{addr}: {e}"),
                        Err(_) => last_error = format!("{addr}: its node does not answer"),
                    }
                }
                if now >= since + opts.retry {
                    tracing::info!(port, error = %last_error, "routing mesh: the app does not accept; refusing");
                    return None;
                }
                tokio::time::sleep(RETRY_GAP).await;
            }
        }
    }
}

/// Closes with a reset, so the client sees "connection reset" at once rather than a clean end.
fn refuse(client: TcpStream) {
    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
    drop(client);
}
