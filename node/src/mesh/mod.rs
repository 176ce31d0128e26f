//! The routing mesh: every node listens on every app's published (external) port and forwards
//! each connection to the node that runs the app, at the app's internal port, so a client can use
//! any node's address and keeps working when the app moves (Flocker's routing, Swarm's routing
//! mesh).
//!
//! - Which ports a node listens on is [`plan`]: a pure function of the replicated state. A node
//!   leaves a port to an app of its own that listens on that number (an app whose external and
//!   internal ports are equal serves its port itself on its node), from the handoff of a move to
//!   it on, so the app can bind it.
//! - Where a connection goes is decided when it arrives, from this node's copy of the state
//!   ([`forward`]): the node the app runs on now. While the app is handed off between nodes the
//!   connection waits (up to [`MeshOptions::hold`]); an app that does not accept is retried
//!   briefly, then the client's connection is reset: refused promptly, not hung.
//! - A port that cannot be bound (something else holds it) is reported by this node
//!   ([`MeshView`], in `flockctl app ls`) and retried; the other nodes keep serving.
//! - Bytes move with splice(2) through a pipe, socket to socket, without a copy through user
//!   space.

mod forward;
pub mod services;
mod splice;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use flock_scheduler::{ClusterState, NodeId};

use crate::cluster::Cluster;

pub use forward::Target;

/// How the mesh runs on a node.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// The address to listen on; unspecified (0.0.0.0) listens on every interface.
    pub ip: IpAddr,
    /// How long a new connection waits for an app that is being handed off between nodes.
    pub hold: Duration,
    /// How long a new connection retries an app that does not accept (starting on its new
    /// node, or its node is down) before the client is refused.
    pub retry: Duration,
}

impl MeshOptions {
    pub fn new(ip: IpAddr) -> Self {
        MeshOptions {
            ip,
            hold: Duration::from_secs(10),
            retry: Duration::from_secs(1),
        }
    }
}

/// What the mesh should do with one external port on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// Listen and forward to `app`.
    Listen { app: String },
    /// Leave the port to `local`, an app on this node listening on that number: `app` itself
    /// (its internal port is its external one) or another app (a conflict).
    Yield { app: String, local: String },
}

/// The ports this node's mesh listens on, from the replicated state. An app counts as on this
/// node (and keeps its internal ports) where it runs, and on a move's target from the handoff.
pub fn plan(state: &ClusterState, me: NodeId) -> BTreeMap<u16, Want> {
    let mut local: BTreeMap<u16, &str> = BTreeMap::new();
    for (name, app) in &state.apps {
        let runs_on = state.app_runs_on(app);
        let here =
            runs_on == Some(me) || (runs_on.is_none() && app.node == me) || app.more.contains(&me);
        if here {
            for p in &app.spec.ports {
                local.entry(p.internal).or_insert(name);
            }
        }
    }
    let mut want = BTreeMap::new();
    for (name, app) in &state.apps {
        for p in &app.spec.ports {
            let w = match local.get(&p.external) {
                Some(l) => Want::Yield {
                    app: name.clone(),
                    local: l.to_string(),
                },
                None => Want::Listen { app: name.clone() },
            };
            want.insert(p.external, w);
        }
    }
    want
}

/// One port's state on this node, as `flockctl app ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortState {
    /// The mesh listens on it.
    Serving,
    /// The app runs here and listens on the port itself.
    ServedByApp,
    /// Not served here: why.
    Problem(String),
}

/// What this node's mesh does, for status reports.
#[derive(Clone, Debug, Default)]
pub struct MeshStatus {
    /// Where it listens; `None` when the mesh is off.
    pub ip: Option<IpAddr>,
    /// External port: the app publishing it and its state here.
    pub ports: BTreeMap<u16, (String, PortState)>,
}

/// Shared with the API, which reports it.
#[derive(Clone, Default)]
pub struct MeshView(Arc<Mutex<MeshStatus>>);

impl MeshView {
    pub fn snapshot(&self) -> MeshStatus {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, s: MeshStatus) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }
}

/// The host other apps on this node reach the mesh on: its address, or the node's advertised
/// host when it listens on every interface.
pub fn link_host(ip: IpAddr, advertised: &str) -> String {
    if ip.is_unspecified() {
        host_of(advertised).to_string()
    } else {
        ip.to_string()
    }
}

pub use flock_scheduler::state::host_of;

const TICK: Duration = Duration::from_millis(300);
/// Sooner while a port could not be bound (an app on its way out still holds it).
const RETRY_BIND: Duration = Duration::from_millis(100);
const MIN_GAP: Duration = Duration::from_millis(20);

struct Listening {
    accept: JoinHandle<()>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Runs the mesh until `shutdown`.
pub async fn run(
    cluster: Arc<Cluster>,
    opts: MeshOptions,
    view: MeshView,
    mut shutdown: watch::Receiver<bool>,
    worker: crate::worker::WorkerStatus,
) {
    let me = cluster.node_id;
    let mut listening: BTreeMap<u16, Listening> = BTreeMap::new();
    // The last bind error logged per port, to log each once.
    let mut logged: BTreeMap<u16, String> = BTreeMap::new();
    let mut changes = cluster.metrics_watch();
    loop {
        worker.running();
        let want = plan(&cluster.view.read().cluster, me);
        listening.retain(|port, _| matches!(want.get(port), Some(Want::Listen { .. })));
        let mut status = MeshStatus {
            ip: Some(opts.ip),
            ports: BTreeMap::new(),
        };
        let mut failed = false;
        for (port, w) in &want {
            let st = match w {
                Want::Yield { app, local } if app == local => PortState::ServedByApp,
                Want::Yield { local, .. } => PortState::Problem(format!(
                    "port {port} is app {local}'s internal port on this node"
                )),
                Want::Listen { .. } if listening.contains_key(port) => PortState::Serving,
                Want::Listen { .. } => match bind(SocketAddr::new(opts.ip, *port)) {
                    Ok(l) => {
                        logged.remove(port);
                        let accept =
                            tokio::spawn(accept_loop(l, *port, cluster.clone(), opts.clone()));
                        listening.insert(*port, Listening { accept });
                        PortState::Serving
                    }
                    Err(e) => {
                        failed = true;
                        let why = format!("cannot listen on {}:{port}: {e}", opts.ip);
                        if logged.get(port) != Some(&why) {
                            tracing::warn!(port, error = %e, "routing mesh: {why}");
                            logged.insert(*port, why.clone());
                        }
                        PortState::Problem(why)
                    }
                },
            };
            let app = match w {
                Want::Listen { app } | Want::Yield { app, .. } => app.clone(),
            };
            status.ports.insert(*port, (app, st));
        }
        logged.retain(|p, _| want.contains_key(p));
        let problems: Vec<String> = status
            .ports
            .values()
            .filter_map(|(_, st)| match st {
                PortState::Problem(why) => Some(why.clone()),
                _ => None,
            })
            .collect();
        let serving = status
            .ports
            .values()
            .filter(|(_, st)| matches!(st, PortState::Serving))
            .count();
        if let Some(first) = problems.first() {
            worker.error(first);
        }
        worker.idle(match problems.len() {
            0 => format!("serving {serving} ports"),
            n => format!("serving {serving} ports; {n} with a problem (flockctl app ls)"),
        });
        view.set(status);

        let tick = if failed { RETRY_BIND } else { TICK };
        if !Cluster::next_change(&mut changes, tick, MIN_GAP, &mut shutdown).await {
            return;
        }
    }
}

/// A listener with SO_REUSEADDR (a port left in TIME_WAIT by forwarded connections can be bound
/// again at once), bound synchronously so a failure is known now.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(listener: TcpListener, port: u16, cluster: Arc<Cluster>, opts: MeshOptions) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(forward::connection(
                    conn,
                    port,
                    cluster.clone(),
                    opts.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(port, error = %e, "routing mesh: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_scheduler::config::{AppSpec, PortMap, RestartPolicy};
    use flock_scheduler::{App, Node, NodeState};

    fn spec(name: &str, ports: &[(u16, u16)]) -> AppSpec {
        AppSpec {
            name: name.into(),
            image: None,
            command: Some(vec!["x".into()]),
            ports: ports
                .iter()
                .map(|&(internal, external)| PortMap { internal, external })
                .collect(),
            links: vec![],
            volume: None,
            environment: Default::default(),
            restart_policy: RestartPolicy::Never,
            mem_limit: None,
            cpu_shares: None,
            constraints: vec![],
            ..Default::default()
        }
    }

    /// An app: its name, its node, its (internal, external) ports.
    type TestApp<'a> = (&'a str, NodeId, &'a [(u16, u16)]);

    fn state(apps: &[TestApp]) -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            s.nodes.insert(
                id,
                Node {
                    id,
                    name: format!("n{id}"),
                    addr: format!("127.0.0.1:{}", 7800 + id),
                    labels: Default::default(),
                    state: NodeState::Ready,
                    capacity: None,
                },
            );
        }
        for (name, node, ports) in apps {
            s.apps.insert(
                name.to_string(),
                App {
                    spec: spec(name, ports),
                    pinned: None,
                    node: *node,
                    dataset: None,
                    vip: None,
                    more: Vec::new(),
                    health: Default::default(),
                },
            );
        }
        s
    }

    #[test]
    fn every_node_listens_on_every_external_port() {
        let s = state(&[("web", 1, &[(80, 8080)]), ("db", 2, &[(5432, 15432)])]);
        for me in 1..=3 {
            let p = plan(&s, me);
            assert_eq!(p.len(), 2);
            assert_eq!(p[&8080], Want::Listen { app: "web".into() });
            assert_eq!(p[&15432], Want::Listen { app: "db".into() });
        }
    }

    #[test]
    fn an_app_serving_its_own_port_keeps_it_on_its_node_only() {
        let s = state(&[("web", 2, &[(8080, 8080)])]);
        assert_eq!(
            plan(&s, 2)[&8080],
            Want::Yield {
                app: "web".into(),
                local: "web".into()
            }
        );
        assert_eq!(plan(&s, 1)[&8080], Want::Listen { app: "web".into() });
    }

    #[test]
    fn another_apps_internal_port_is_a_conflict_on_that_node() {
        let s = state(&[("web", 1, &[(80, 8080)]), ("side", 2, &[(8080, 9000)])]);
        assert_eq!(
            plan(&s, 2)[&8080],
            Want::Yield {
                app: "web".into(),
                local: "side".into()
            }
        );
        assert_eq!(plan(&s, 3)[&8080], Want::Listen { app: "web".into() });
    }

    #[test]
    fn link_host_is_the_mesh_address_or_the_advertised_host() {
        assert_eq!(
            link_host("127.0.0.2".parse().unwrap(), "127.0.0.1:7801"),
            "127.0.0.2"
        );
        assert_eq!(
            link_host("0.0.0.0".parse().unwrap(), "n1.lan:7801"),
            "n1.lan"
        );
        assert_eq!(
            link_host("::".parse().unwrap(), "[fd00::1]:7801"),
            "fd00::1"
        );
    }
}
