//! Service addresses: every app has one (`198.18.X.Y`, [`flock_scheduler::app::service_ip`]),
//! the same on every node, and a connection to it on one of the app's internal ports reaches
//! the app wherever it runs, across moves and failovers. Its stack's siblings resolve its
//! service name to it (the docker driver's hosts entries; `NAME_SERVICE_HOST` variables for
//! process apps), so `db:5432` works as it does in compose and Swarm, with no published port.
//!
//! How: Swarm's model (a virtual address per service on every node), built as kube-proxy
//! builds it. Each node keeps a nat chain, `FLOCK-SERVICES`, with one rule per (address,
//! port): DNAT to the node that runs the app, at the app's internal port there (where the
//! drivers publish it), or REDIRECT to this machine when the app runs here. Rules act before
//! any socket is looked up, so they never collide with an app that listens on the same port
//! number on every address (a listening socket on the service address would: an app binding
//! `0.0.0.0:5432` would fail, or take connections meant for another stack's db). The whole
//! range is a local route (`ip route replace local 198.18.0.0/16 dev lo`), so an address with
//! no app behind it is refused at once instead of leaving through the default route.
//!
//! - [`routes`] is pure: the replicated state to (address, port, node it runs on).
//! - [`rules`] is pure too: routes and each node's address to the chain's text.
//! - [`run`] applies them with `iptables-restore --noflush` (the chain is replaced whole,
//!   atomically) whenever they change. Several flockd on one machine (a dev cluster) write the
//!   same chain from the same state.
//!
//! While an app is handed off between nodes or its node is down it runs nowhere: its rules go,
//! and a new connection is refused until it runs again (a client retries, as after any
//! restart). A connection made before a move keeps its node until it closes.
//!
//! Health gates the rules: an instance recorded starting or unhealthy in the replicated state
//! ([`flock_scheduler::App::health`], reported by its node's apps agent on transitions) gets no
//! new connection, so after a move the new instance gets traffic once its check passes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use flock_scheduler::{ClusterState, NodeId};

use crate::cluster::Cluster;

/// The range of service addresses.
pub const RANGE: &str = "198.18.0.0/16";
/// The nat chain flock keeps its rules in.
pub const CHAIN: &str = "FLOCK-SERVICES";
/// Held while the chain and its jumps are set up.
const LOCK: &str = "/run/flock-services.lock";

/// One service port: connections to `vip:port` go to `port` on one of `nodes`, where the
/// app's instances run, each as likely (empty: the app runs nowhere now).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub nodes: Vec<NodeId>,
    pub app: String,
}

/// Every app's service ports (the internal ports of `ports` and its `expose`), and where each
/// goes now.
pub fn routes(state: &ClusterState) -> Vec<Route> {
    let mut out = Vec::new();
    for (name, app) in &state.apps {
        let Some(vip) = app.vip else { continue };
        let vip = flock_scheduler::app::service_ip(vip);
        // Only instances whose recorded health lets them serve: not starting, not unhealthy.
        // None left (all unhealthy): no rule, and connections are refused, as Swarm does.
        // An instance without a record (no check, or a node that does not report) is routed
        // to as before health was recorded (see `App::serves_on`).
        let nodes: Vec<NodeId> = state
            .app_runs_on(app)
            .into_iter()
            .chain(app.more.iter().copied())
            .filter(|n| app.serves_on(*n))
            .collect();
        let mut ports: Vec<u16> = app.spec.ports.iter().map(|p| p.internal).collect();
        ports.extend(app.spec.expose.iter().copied());
        ports.sort_unstable();
        ports.dedup();
        for port in ports {
            out.push(Route {
                vip,
                port,
                nodes: nodes.clone(),
                app: name.clone(),
            });
        }
    }
    out.sort();
    out
}

/// Where a node is for the rules: this machine, or an address to DNAT to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeAt {
    Here,
    At(Ipv4Addr),
}

/// The rules of [`CHAIN`] for `routes` (`iptables-restore` lines), given where each node is;
/// a node not in `nodes` (its address unknown) gets no rule: never sent elsewhere. A route to
/// several nodes spreads new connections evenly: the first rule takes 1 in k of them, the
/// next 1 in k-1 of the rest, and so on, the last all that remain.
pub fn rules(routes: &[Route], nodes: &BTreeMap<NodeId, NodeAt>) -> Vec<String> {
    let mut out = Vec::new();
    for r in routes {
        let all: Vec<&NodeAt> = r.nodes.iter().filter_map(|n| nodes.get(n)).collect();
        for (i, at) in all.iter().enumerate() {
            let target = match at {
                NodeAt::Here => format!("REDIRECT --to-ports {}", r.port),
                NodeAt::At(ip) => format!("DNAT --to-destination {ip}:{}", r.port),
            };
            let left = all.len() - i;
            let share = if left > 1 {
                format!(
                    "-m statistic --mode random --probability {:.8} ",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            out.push(format!(
                "-A {CHAIN} -d {}/32 -p tcp -m tcp --dport {} -m comment --comment {} {share}-j {target}",
                r.vip,
                r.port,
                comment(&r.app)
            ));
        }
    }
    out
}

/// An app's name as an iptables comment: names are letters, digits, `_`, `-` and `.`.
fn comment(app: &str) -> String {
    app.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .collect()
}

/// The input of `iptables-restore --noflush` that replaces [`CHAIN`] by `rules`.
pub fn restore_input(rules: &[String]) -> String {
    let mut s = format!("*nat\n:{CHAIN} - [0:0]\n");
    for r in rules {
        s.push_str(r);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    s
}

/// Whether `ip` is an address of this machine (it can be bound).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Where each node is, from its advertised address (resolved when it is a name; IPv6 nodes
/// are not reached through service addresses, which are IPv4).
async fn node_addresses(state: &ClusterState) -> BTreeMap<NodeId, NodeAt> {
    let mut out = BTreeMap::new();
    for (id, node) in &state.nodes {
        let host = flock_scheduler::state::host_of(&node.addr).to_string();
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => tokio::net::lookup_host((host.as_str(), 0))
                .await
                .ok()
                .and_then(|mut a| a.find(|a| a.is_ipv4()).map(|a| a.ip())),
        };
        match ip {
            Some(ip) if is_local(ip) => {
                out.insert(*id, NodeAt::Here);
            }
            Some(IpAddr::V4(v4)) => {
                out.insert(*id, NodeAt::At(v4));
            }
            _ => {}
        }
    }
    out
}

/// Runs `program args`, input on stdin; its stderr as the error.
async fn run_cmd(program: &str, args: &[&str], input: Option<&str>) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e} (install iptables and iproute2)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        if let Some(input) = input {
            stdin
                .write_all(input.as_bytes())
                .await
                .map_err(|e| format!("{program}: {e}"))?;
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| format!("{program} did not finish within 10 s"))?
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The route, the chain and the jumps to it from PREROUTING (containers) and OUTPUT (this
/// machine's processes); each added once.
async fn prepare() -> Result<(), String> {
    // Several flockd on one machine (a dev cluster) would each find a jump missing and add it:
    // one at a time. The lock goes with the file when this returns.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .map_err(|e| format!("cannot open {LOCK}: {e}"))?;
    let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .map_err(|e| format!("locking {LOCK}: {e}"))?
        .map_err(|e| format!("cannot lock {LOCK}: {e}"))?;
    let _held = lock;
    run_cmd(
        "ip",
        &["route", "replace", "local", RANGE, "dev", "lo"],
        None,
    )
    .await?;
    // Declares the chain (empty) if it is not there; --noflush keeps every other rule.
    if run_cmd("iptables", &["-t", "nat", "-S", CHAIN], None)
        .await
        .is_err()
    {
        run_cmd(
            "iptables-restore",
            &["--noflush"],
            Some(&restore_input(&[])),
        )
        .await?;
    }
    for hook in ["PREROUTING", "OUTPUT"] {
        let rule = ["-t", "nat", "-C", hook, "-d", RANGE, "-j", CHAIN];
        if run_cmd("iptables", &rule, None).await.is_err() {
            let mut add = rule;
            add[2] = "-I";
            run_cmd("iptables", &add, None).await?;
        }
    }
    Ok(())
}

const TICK: Duration = Duration::from_secs(2);
/// How long rules made from an unchanged state stand before nodes' names are resolved again.
const REFRESH: Duration = Duration::from_secs(30);
const MIN_GAP: Duration = Duration::from_millis(20);

/// Keeps this machine's service rules in step with the state until `shutdown`. The rules stay
/// when flockd stops: apps outlive it, and keep reaching each other.
pub async fn run(
    cluster: Arc<Cluster>,
    mut shutdown: watch::Receiver<bool>,
    worker: crate::worker::WorkerStatus,
) {
    let mut changes = cluster.metrics_watch();
    let mut prepared = false;
    let mut applied: Option<Vec<String>> = None;
    let mut last_error = String::new();
    // The state the rules were last made from, and when: an entry that changes only the
    // key-value namespace changes no route, and a busy key-value workload must not cost a
    // state copy and a look at every node's address per entry. Names are resolved again now
    // and then (REFRESH).
    let mut done_for: Option<(ClusterState, std::time::Instant)> = None;
    loop {
        let unchanged = done_for.as_ref().is_some_and(|(s, at)| {
            at.elapsed() < REFRESH && cluster.view.read().cluster.same_but_kv(s)
        });
        if unchanged {
            if !Cluster::next_change(&mut changes, TICK, MIN_GAP, &mut shutdown).await {
                return;
            }
            continue;
        }
        worker.running();
        let state = cluster.view.read().cluster.clone();
        let routes = routes(&state);
        let result = async {
            if routes.is_empty() && applied.is_none() && !prepared {
                // Nothing to route, and nothing of ours to clear: no need for iptables.
                return Ok(0);
            }
            if !prepared {
                prepare().await?;
                prepared = true;
            }
            let rules = rules(&routes, &node_addresses(&state).await);
            if applied.as_ref() != Some(&rules) {
                run_cmd(
                    "iptables-restore",
                    &["--noflush"],
                    Some(&restore_input(&rules)),
                )
                .await?;
                applied = Some(rules.clone());
            }
            Ok::<usize, String>(rules.len())
        }
        .await;
        match result {
            Ok(n) => {
                last_error.clear();
                worker.idle(format!("{n} service ports routed"));
                done_for = Some((state, std::time::Instant::now()));
            }
            Err(e) => {
                prepared = false;
                applied = None;
                done_for = None;
                if e != last_error {
                    tracing::warn!(error = %e, "service addresses: cannot set this machine's rules; apps cannot reach each other by service name here");
                    last_error = e.clone();
                }
                worker.error(&e);
            }
        }
        if !Cluster::next_change(&mut changes, TICK, MIN_GAP, &mut shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_scheduler::config::{AppSpec, PlannedApp, PortMap};
    use flock_scheduler::Command;

    fn deployed() -> ClusterState {
        let mut s = ClusterState {
            cluster_id: "c".into(),
            ..Default::default()
        };
        for id in 1..=2 {
            s.nodes.insert(
                id,
                flock_scheduler::Node {
                    id,
                    name: format!("n{id}"),
                    addr: format!("10.0.0.{id}:7801"),
                    labels: Default::default(),
                    state: flock_scheduler::NodeState::Ready,
                    capacity: None,
                },
            );
        }
        let mut apps = BTreeMap::new();
        for (svc, ports, expose) in [
            ("db", vec![], vec![5432]),
            ("web", vec![(80, 8080)], vec![]),
        ] {
            let name = format!("shop_{svc}");
            let spec = AppSpec {
                name: name.clone(),
                command: Some(vec!["x".into()]),
                ports: ports
                    .iter()
                    .map(|&(internal, external)| PortMap { internal, external })
                    .collect(),
                expose,
                stack: Some("shop".into()),
                service: Some(svc.into()),
                ..Default::default()
            };
            apps.insert(
                name,
                PlannedApp {
                    spec,
                    node: Some(if svc == "db" { 2 } else { 1 }),
                },
            );
        }
        let r = s.apply(&Command::Deploy {
            stack: Some("shop".into()),
            apps,
            secrets: BTreeMap::new(),
        });
        assert!(
            matches!(r, flock_scheduler::CommandResult::Deployed { .. }),
            "{r:?}"
        );
        s
    }

    #[test]
    fn every_internal_and_exposed_port_routes_to_where_the_app_runs() {
        let s = deployed();
        let r = routes(&s);
        let db = flock_scheduler::app::service_ip(s.apps["shop_db"].vip.unwrap());
        let web = flock_scheduler::app::service_ip(s.apps["shop_web"].vip.unwrap());
        assert_ne!(db, web);
        assert_eq!(
            r.iter()
                .map(|r| (r.vip, r.port, r.nodes.clone()))
                .collect::<Vec<_>>(),
            {
                let mut v = vec![(db, 5432, vec![2]), (web, 80, vec![1])];
                v.sort();
                v
            }
        );
        let nodes = BTreeMap::from([
            (1, NodeAt::Here),
            (2, NodeAt::At(Ipv4Addr::new(10, 0, 0, 2))),
        ]);
        let text = rules(&r, &nodes).join("\n");
        assert!(
            text.contains(&format!(
                "-d {db}/32 -p tcp -m tcp --dport 5432 -m comment --comment shop_db -j DNAT --to-destination 10.0.0.2:5432"
            )),
            "{text}"
        );
        assert!(text.contains(&format!("-d {web}/32 -p tcp -m tcp --dport 80 -m comment --comment shop_web -j REDIRECT --to-ports 80")), "{text}");
        // A node whose address is unknown gets no rule: refused, never sent elsewhere.
        assert_eq!(rules(&r, &BTreeMap::from([(1, NodeAt::Here)])).len(), 1);
        let input = restore_input(&rules(&r, &nodes));
        assert!(
            input.starts_with("*nat\n:FLOCK-SERVICES - [0:0]\n") && input.ends_with("COMMIT\n")
        );
    }

    #[test]
    fn an_app_with_instances_spreads_connections_over_their_nodes() {
        let mut s = deployed();
        s.apps.get_mut("shop_web").unwrap().more = vec![2, 3];
        let r = routes(&s);
        let web = r.iter().find(|r| r.app == "shop_web").unwrap();
        assert_eq!(web.nodes, [1, 2, 3]);
        let nodes = BTreeMap::from([
            (1, NodeAt::Here),
            (2, NodeAt::At(Ipv4Addr::new(10, 0, 0, 2))),
            (3, NodeAt::At(Ipv4Addr::new(10, 0, 0, 3))),
        ]);
        let lines: Vec<String> = rules(&r, &nodes)
            .into_iter()
            .filter(|l| l.contains("shop_web"))
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].contains("--probability 0.33333333 -j REDIRECT"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("--probability 0.50000000 -j DNAT --to-destination 10.0.0.2:80"),
            "{lines:?}"
        );
        assert!(
            !lines[2].contains("statistic") && lines[2].ends_with("10.0.0.3:80"),
            "{lines:?}"
        );
        // A node whose address is unknown is left out, never sent elsewhere.
        let two = rules(&r, &BTreeMap::from([(1, NodeAt::Here), (3, NodeAt::Here)]));
        assert_eq!(two.iter().filter(|l| l.contains("shop_web")).count(), 2);
    }

    #[test]
    fn only_instances_recorded_neither_starting_nor_unhealthy_are_routed_to() {
        use flock_scheduler::Health;
        let mut s = deployed();
        s.apps.get_mut("shop_web").unwrap().more = vec![2, 3];
        let mut n3 = s.nodes[&2].clone();
        n3.id = 3;
        n3.addr = "10.0.0.3:7801".into();
        s.nodes.insert(3, n3);
        let web_nodes = |s: &ClusterState| {
            routes(s)
                .into_iter()
                .find(|r| r.app == "shop_web")
                .unwrap()
                .nodes
        };
        // No record (no check, or a node that does not report): routed as before.
        assert_eq!(web_nodes(&s), [1, 2, 3]);
        let set = |s: &mut ClusterState, h: &[(NodeId, Health)]| {
            s.apps.get_mut("shop_web").unwrap().health = h.iter().copied().collect();
        };
        set(&mut s, &[(1, Health::Healthy), (2, Health::Starting)]);
        assert_eq!(web_nodes(&s), [1, 3]);
        set(&mut s, &[(1, Health::Unhealthy), (2, Health::Healthy)]);
        assert_eq!(web_nodes(&s), [2, 3]);
        // Every instance unhealthy or starting: routed nowhere, so refused.
        set(
            &mut s,
            &[
                (1, Health::Unhealthy),
                (2, Health::Unhealthy),
                (3, Health::Starting),
            ],
        );
        assert!(web_nodes(&s).is_empty());
        let all = BTreeMap::from([(1, NodeAt::Here), (2, NodeAt::Here), (3, NodeAt::Here)]);
        assert!(rules(&routes(&s), &all)
            .iter()
            .all(|l| !l.contains("shop_web")));
        // Another app's health changes nothing of this one's.
        assert_eq!(
            routes(&s)
                .iter()
                .find(|r| r.app == "shop_db")
                .unwrap()
                .nodes,
            [2]
        );
        // The published port's forwarder picks the same instances.
        use crate::mesh::forward::{target, Target};
        assert_eq!(target(&s, 8080), Target::Unready { starting: true });
        set(&mut s, &[(1, Health::Unhealthy), (2, Health::Unhealthy)]);
        assert_eq!(target(&s, 8080), Target::At(vec!["10.0.0.3:80".into()]));
        s.apps
            .get_mut("shop_web")
            .unwrap()
            .health
            .insert(3, Health::Unhealthy);
        assert_eq!(target(&s, 8080), Target::Unready { starting: false });
    }

    #[test]
    fn an_app_that_runs_nowhere_has_no_rule() {
        let mut s = deployed();
        let db = s.apps["shop_db"].clone();
        // Its node is down and it has no dataset to fail over with: it runs where the state
        // places it, and while a dataset moves with handoff it runs nowhere.
        assert_eq!(s.app_runs_on(&db), Some(2));
        s.apps.get_mut("shop_db").unwrap().dataset = Some(99);
        let r = routes(&s);
        let db_route = r.iter().find(|r| r.app == "shop_db").unwrap();
        assert!(db_route.nodes.is_empty());
        let nodes = BTreeMap::from([(1, NodeAt::Here), (2, NodeAt::Here)]);
        assert!(rules(&r, &nodes).iter().all(|l| !l.contains("shop_db")));
    }
}
