//! `flockd dev`: a local cluster on loopback in one command, for a first try.
//!
//! The nodes run in this process, each a full node with its own data dir, port and Raft, formed
//! the way a real cluster is: the first `init`s, the others `join` with the token.

use std::path::PathBuf;
use std::time::Duration;

use crate::daemon::{Endpoint, MeshAddr, NodeOptions, RunningNode};
use crate::datadir::DataDir;
use flock_client::ClientConfig;

/// Waits for Ctrl-C or SIGTERM; returns which.
pub async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = term.recv() => "terminated",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "interrupted"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "interrupted"
    }
}

/// What flockd says when a node's Raft stopped on a fatal error (a failed write to its store,
/// most often a full disk): which node, where its data is, and what to do.
pub fn raft_stopped(node: &str, data_dir: &std::path::Path, error: &str) -> String {
    format!(
        "raft stopped on node {node} (data dir {}): {error}; flockd exits rather than serve \
         without Raft. Fix the cause (free space if the disk is full), then start it again \
         (`flockd run --data-dir {}`); its state is kept",
        data_dir.display(),
        data_dir.display()
    )
}

/// Runs a dev cluster of `nodes` nodes on 127.0.0.1 from `port` up, until Ctrl-C.
/// With `data_dir`, the nodes' data is kept there and a later run restarts them.
pub async fn run(
    nodes: usize,
    port: u16,
    data_dir: Option<PathBuf>,
    opts: &NodeOptions,
) -> anyhow::Result<()> {
    anyhow::ensure!(nodes >= 1, "--nodes must be at least 1");
    let last_port = port as usize + nodes - 1;
    anyhow::ensure!(
        last_port <= u16::MAX as usize,
        "--port {port} leaves no room for {nodes} nodes"
    );
    let (root, _temp) = match data_dir {
        Some(d) => (d, None),
        None => {
            let t = tempdir()?;
            (t.clone(), Some(TempDir(t)))
        }
    };
    let dir = |i: usize| DataDir::new(root.join(format!("n{i}")));
    let addr = |i: usize| format!("127.0.0.1:{}", port as usize + i - 1);
    let resume = dir(1).load_identity().is_ok();
    // Each node's routing mesh on its own loopback address (127.0.0.I), so that every node can
    // listen on every published port.
    let opts_of = |i: usize| {
        let mut o = opts.clone();
        if o.mesh == MeshAddr::Listen {
            o.mesh = MeshAddr::At(std::net::IpAddr::from([127, 0, 0, (i % 255) as u8]));
        }
        // One Docker engine, several nodes: each its own volume plugin, flock-n1, flock-n2...
        o.plugin = o.plugin.map(|p| format!("{p}-n{i}"));
        // One address given: the first node's; the others take the next ports.
        if let crate::metrics::MetricsAddr::At(a) = &mut o.metrics {
            if a.port() != 0 {
                a.set_port(a.port().saturating_add((i - 1) as u16));
            }
        }
        o
    };

    let mut running: Vec<RunningNode> = Vec::new();
    let started = async {
        if resume {
            for i in 1..=nodes {
                let dd = dir(i);
                if dd.load_identity().is_err() {
                    anyhow::bail!(
                        "{} holds no node n{i}; remove {} to start afresh",
                        dd.root().display(),
                        root.display()
                    );
                }
                running.push(RunningNode::run(&dd, None, &opts_of(i)).await?);
            }
        } else {
            let ep = Endpoint::bind(&addr(1), None).await.map_err(|e| {
                anyhow::anyhow!("{e} (another flockd dev? pick other ports with --port)")
            })?;
            let first = RunningNode::init(&dir(1), ep, Some("n1".into()), &opts_of(1)).await?;
            let token = first.token()?;
            running.push(first);
            for i in 2..=nodes {
                let ep = Endpoint::bind(&addr(i), None).await.map_err(|e| {
                    anyhow::anyhow!("{e} (another flockd dev? pick other ports with --port)")
                })?;
                let n = RunningNode::join(
                    &dir(i),
                    ep,
                    &addr(1),
                    &token,
                    Some(format!("n{i}")),
                    Duration::from_secs(15),
                    &opts_of(i),
                )
                .await?;
                n.wait_until_member(Duration::from_secs(30)).await?;
                running.push(n);
            }
        }
        Ok(())
    };
    let outcome = started.await;
    if let Err(e) = outcome {
        for n in running.into_iter().rev() {
            let _ = n.shutdown().await;
        }
        return Err(e);
    }

    println!(
        "flock dev cluster: {nodes} node(s) on 127.0.0.1:{port}..{last_port}, data in {}{}",
        root.display(),
        if _temp.is_some() {
            " (removed on exit; --data-dir keeps it)"
        } else {
            ""
        }
    );
    for n in &running {
        match n.mesh {
            Some(ip) => println!(
                "  {}  {}  (apps' published ports on {ip})",
                n.identity.name, n.identity.advertise
            ),
            None => println!("  {}  {}", n.identity.name, n.identity.advertise),
        }
        if let Some(addr) = n.metrics_addr {
            println!("      metrics: http://{addr}/metrics");
        }
    }
    for n in running.iter().filter(|n| n.plugin.is_some()) {
        println!(
            "  docker run -v demo:/data --volume-driver={}-{} ...   (node {}'s volume plugin)",
            opts.plugin.as_deref().unwrap_or_default(),
            n.identity.name,
            n.identity.name
        );
    }
    // The admin config init wrote names node 1 only; list every node so flockctl fails over.
    let conf_path = dir(1).admin_config_path();
    let mut conf = ClientConfig::load(&conf_path)?;
    conf.addrs = running
        .iter()
        .map(|n| n.identity.advertise.clone())
        .collect();
    conf.save(&conf_path)?;
    println!(
        "\nPoint flockctl at it:\n  export FLOCK_CONFIG={}\n  flockctl status\n  flockctl kv put greeting hello\n",
        conf_path.display()
    );
    println!("Ctrl-C stops the cluster.");
    println!(
        "flockd: ready dev cluster of {nodes} node(s), first serving on {}",
        addr(1)
    );

    // One process, several nodes: when any node's Raft stops on a fatal error, the whole dev
    // cluster stops (exit 1) rather than run on without it; `--data-dir` keeps every node's
    // state for the next run.
    let fatal = futures::future::select_all(running.iter().map(|n| {
        let cluster = n.cluster.clone();
        Box::pin(async move { cluster.fatal().await })
    }));
    let failed = tokio::select! {
        sig = shutdown_signal() => {
            println!("flockd dev: {sig}, stopping {nodes} node(s) and their apps");
            None
        }
        (e, i, _) = fatal => {
            let n = &running[i];
            let again = match &_temp {
                Some(_) => "its temporary data is removed on exit".to_string(),
                None => format!("`flockd dev --data-dir {}` starts it again", root.display()),
            };
            let msg = format!(
                "raft stopped on node {} (data dir {}): {e}; the dev cluster stops rather than \
                 run without it. Fix the cause (free space if the disk is full); {again}",
                n.identity.name,
                dir(i + 1).root().display()
            );
            eprintln!("flockd dev: {msg}");
            println!("flockd dev: stopping {nodes} node(s) and their apps");
            Some(())
        }
    };
    for n in running.into_iter().rev() {
        // Apps outlive a real flockd (a restarted one adopts them); a dev cluster takes its
        // apps along, so that a first try leaves no processes or containers behind (their data
        // stays in the datasets; a next run on the same --data-dir starts them again).
        // The node first, so that its agent does not restart what is stopped here.
        let drivers = n.drivers.clone();
        let name = n.identity.name.clone();
        let node_dir = root.join(&name);
        match n.shutdown().await {
            Ok(()) => {}
            // A node whose Raft failed may fail to flush too; stop the others all the same.
            Err(e) if failed.is_some() => eprintln!("flockd dev: stopping {name}: {e:#}"),
            Err(e) => return Err(e),
        }
        let listing = drivers.list().await;
        for (kind, why) in &listing.failed {
            if *kind == crate::driver::Kind::Process || drivers.docker.is_some() {
                eprintln!(
                    "flockd dev: {name}: cannot list its {} apps to stop them: {why}",
                    kind.as_str()
                );
            }
        }
        for (i, kind) in listing.instances {
            if let Err(e) = drivers.remove(kind, &i.app).await {
                eprintln!("flockd dev: {name}: stopping app {}: {e}", i.app);
            }
        }
        // Its apps are stopped: their fencing watchdog has nothing left to guard.
        crate::fence::stop_watch(&node_dir);
    }
    match failed {
        Some(_) => {
            println!("flockd dev: stopped");
            anyhow::bail!("dev cluster stopped: a node's raft failed (see above)")
        }
        None => {
            println!("flockd dev: stopped");
            Ok(())
        }
    }
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("flock-dev-{}", crate::token::random_hex(4)));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

/// Removes a temporary dev data dir when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
