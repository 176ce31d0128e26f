//! flockd: the daemon every machine of a flock cluster runs. See `flock_node::daemon`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use flock_node::daemon::{Endpoint, MeshAddr, NodeOptions, RunningNode};
use flock_node::datadir::DataDir;
use flock_node::datasets::StorageChoice;
use flock_node::metrics::MetricsAddr;

/// flock's daemon: forms a cluster with the other machines' flockd and keeps its desired state.
#[derive(Parser, Debug)]
#[command(
    name = "flockd",
    version,
    after_help = "Environment: FLOCK_DOCKER_SOCKET, the Docker engine's socket for apps with an image \
                  (default /var/run/docker.sock); RUST_LOG, the log filter."
)]
struct Cli {
    /// How flockd logs to stderr: "text" (for people) or "json" (one object a line, for log
    /// shippers).
    #[arg(long, global = true, value_name = "text|json", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a new cluster with this machine as its first node, and keep running as that node.
    Init {
        #[command(flatten)]
        node: NewNode,
        /// Bring back the desired state of a backup (`flockctl cluster backup FILE`) into the
        /// new cluster: keys, revoked admin labels, and apps without a dataset with their
        /// stacks' secrets. Not apps with datasets, datasets, old nodes or old admin configs;
        /// see docs/recovery.md.
        #[arg(long, value_name = "FILE")]
        restore: Option<PathBuf>,
    },
    /// Join the cluster that PEER (HOST:PORT of any member) belongs to, and keep running.
    Join {
        /// HOST:PORT of any member of the cluster (its API address).
        peer: String,
        /// The join token (`flockctl cluster token` prints it).
        #[arg(long, env = "FLOCK_TOKEN")]
        token: String,
        /// Seconds to keep retrying an unreachable PEER before giving up.
        #[arg(long, default_value_t = 15)]
        join_timeout: u64,
        #[command(flatten)]
        node: NewNode,
    },
    /// Restart the node kept in a data dir, with its identity and state.
    Run {
        /// The node's data dir, as `flockd init` or `flockd join` made it.
        #[arg(long)]
        data_dir: PathBuf,
        /// Bind this address instead of the one recorded at creation (the advertised address stays).
        #[arg(long)]
        listen: Option<String>,
        /// When a majority of voters is lost for good: make this node the only voter of its
        /// cluster before it starts, keeping its state (entries the lost voters committed
        /// beyond this node's log are lost). Then remove the lost nodes (`flockctl node rm`)
        /// and join new ones; a lost node must never start again with its old data dir. See
        /// docs/recovery.md.
        #[arg(long)]
        force_new_cluster: bool,
        /// Must match what the data dir recorded at creation, if given.
        #[command(flatten)]
        storage: StorageArgs,
        #[command(flatten)]
        raft: RaftArgs,
    },
    /// Run a local cluster on loopback in one command, with embedded defaults.
    Dev {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// API port of the first node; the others take the next ones.
        #[arg(long, default_value_t = 7801)]
        port: u16,
        /// Keep the nodes' data here (reused on the next run) instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Serve each node's Docker volume plugin as PREFIX-n1, PREFIX-n2... (none by default:
        /// the engine remembers every plugin it used until it restarts).
        #[arg(long, value_name = "PREFIX")]
        plugin_name: Option<String>,
        #[command(flatten)]
        raft: RaftArgs,
    },
    /// The fencing watchdog of one data dir (started by flockd): kills the node's stateful apps
    /// once its lease has run out. See `flock_node::fence`.
    #[command(hide = true)]
    FenceWatch {
        /// The data dir's fence directory (DATA_DIR/fence).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Write the man pages (DIR/man/*.1) and the bash, zsh and fish completions
    /// (DIR/completions/) of flockd and flockctl, from their command-line definitions: for
    /// packaging/build-deb.sh.
    #[command(hide = true)]
    GenDocs {
        /// The directory to write into (created if absent).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
struct NewNode {
    /// Directory for this node's identity and Raft store; must be empty or absent.
    #[arg(long)]
    data_dir: PathBuf,
    /// HOST:PORT to serve Raft and the API on (port 0 picks a free one).
    #[arg(long)]
    listen: String,
    /// HOST:PORT other nodes and flockctl reach this node on (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// Node name (default: n<id>).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    raft: RaftArgs,
    /// Create the node, then stop it and exit 0 instead of running it, so that a service
    /// manager runs it afterwards (`systemctl enable --now flockd`, or `flockd run
    /// --data-dir DIR`).
    #[arg(long)]
    setup_only: bool,
}

#[derive(Args, Debug, Clone)]
struct StorageArgs {
    /// Where datasets live: "dir" (directories under the data dir; the default) or "zfs".
    #[arg(long, value_name = "dir|zfs")]
    backend: Option<String>,
    /// The zfs pool (or POOL/PATH) for datasets; implies --backend zfs.
    #[arg(long, value_name = "POOL")]
    zfs_pool: Option<String>,
    /// A label for placement constraints (`node.labels.KEY == VALUE` in an app's
    /// deploy.placement.constraints); repeat for several. Given on `run`, they replace the
    /// node's labels; left out, the node keeps the ones it has.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// The address the routing mesh listens on for apps' published ports (default: the
    /// address --listen binds; 0.0.0.0 for every interface), or "off".
    #[arg(long, value_name = "IP|off")]
    mesh_addr: Option<MeshAddr>,
    /// The Docker volume plugin's name, what `docker run --volume-driver=NAME` takes; it is
    /// served on /run/docker/plugins/NAME.sock. Default: flock.
    #[arg(long, value_name = "NAME")]
    plugin_name: Option<String>,
    /// Serve no Docker volume plugin (unless --plugin-name is given).
    #[arg(long, env = "FLOCK_NO_PLUGIN")]
    no_plugin: bool,
}

impl StorageArgs {
    fn options(&self, raft: &RaftArgs) -> anyhow::Result<NodeOptions> {
        Ok(NodeOptions {
            storage: StorageChoice::from_flags(self.backend.as_deref(), self.zfs_pool.as_deref())?,
            labels: if self.labels.is_empty() {
                None
            } else {
                Some(flock_node::report::parse_labels(&self.labels)?)
            },
            mesh: self.mesh_addr.unwrap_or_default(),
            plugin: match (&self.plugin_name, self.no_plugin) {
                (Some(name), _) => Some(name.clone()),
                (None, true) => None,
                (None, false) => Some(flock_node::plugin::DEFAULT_NAME.to_string()),
            },
            ..raft.options()
        })
    }
}

#[derive(Args, Debug, Clone)]
struct RaftArgs {
    /// Where to serve Prometheus metrics (GET /metrics), as IP:PORT, or "off". Default:
    /// 127.0.0.1 on the API port + 1000 (7800 gives 8800), loopback only; 0.0.0.0:PORT
    /// serves every interface (see README, Monitoring). `dev`: the first node's address, the
    /// others take the next ports.
    #[arg(long, value_name = "IP:PORT|off")]
    metrics_addr: Option<MetricsAddr>,
    /// Leader heartbeat interval, in milliseconds.
    #[arg(long, default_value_t = 50)]
    heartbeat_ms: u64,
    /// Minimum election timeout in milliseconds (the maximum is 4/3 of it). A dead leader is
    /// replaced after about twice this.
    #[arg(long, default_value_t = 150)]
    election_timeout_ms: u64,
    /// Take a Raft snapshot after this many log entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_logs: u64,
    /// Log entries kept after a snapshot, so slightly-behind followers need no snapshot.
    #[arg(long, default_value_t = 1_000)]
    keep_logs: u64,
    /// How long a request waits for a leader and for its change to commit, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    request_timeout_ms: u64,
}

impl RaftArgs {
    fn options(&self) -> NodeOptions {
        NodeOptions {
            heartbeat_ms: self.heartbeat_ms,
            election_timeout_ms: self.election_timeout_ms,
            snapshot_logs: self.snapshot_logs,
            keep_logs: self.keep_logs,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            storage: None,
            labels: None,
            mesh: MeshAddr::Listen,
            plugin: None,
            metrics: self.metrics_addr.unwrap_or_default(),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("warn,flock_node=info,flock_raft=info,flock_client=info")
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
    if let Cmd::FenceWatch { dir } = &cli.command {
        // No runtime: the watchdog is one thread, and its stderr is its log file.
        if let Err(e) = flock_node::fence::run_watch(dir) {
            eprintln!("flockd fence-watch: {}: {e}", dir.display());
            std::process::exit(1);
        }
        return;
    }
    if let Cmd::GenDocs { out } = &cli.command {
        if let Err(e) = gen_docs(out) {
            eprintln!("flockd gen-docs: {}: {e}", out.display());
            std::process::exit(1);
        }
        return;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flockd: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("flockd: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = match &cli.command {
        Cmd::Init { node, .. } | Cmd::Join { node, .. } => node.data_dir.clone(),
        Cmd::Run { data_dir, .. } => data_dir.clone(),
        Cmd::Dev { .. } | Cmd::FenceWatch { .. } | Cmd::GenDocs { .. } => PathBuf::new(),
    };
    let setup_only = matches!(&cli.command,
        Cmd::Init { node, .. } | Cmd::Join { node, .. } if node.setup_only);
    let node = match cli.command {
        Cmd::FenceWatch { .. } | Cmd::GenDocs { .. } => {
            unreachable!("main runs fence-watch and gen-docs without a runtime")
        }
        Cmd::Dev {
            nodes,
            port,
            data_dir,
            plugin_name,
            raft,
        } => {
            let opts = NodeOptions {
                plugin: plugin_name,
                ..raft.options()
            };
            return flock_node::dev::run(nodes, port, data_dir, &opts).await;
        }
        Cmd::Init { node: n, restore } => {
            // A backup is read and checked before anything is made: a bad one leaves no data dir.
            let restore = restore.map(|f| read_backup(&f)).transpose()?;
            let dd = DataDir::new(&n.data_dir);
            let ep = Endpoint::bind(&n.listen, n.advertise).await?;
            let opts = n.storage.options(&n.raft)?;
            let node = RunningNode::init(&dd, ep, n.name, &opts).await?;
            let token = node.token()?;
            println!("flockd: join with token {token}");
            println!(
                "flockd: add a node with: flockd join {} --token {token} --data-dir DIR --listen HOST:PORT",
                node.identity.advertise
            );
            if let Some((header, plan)) = restore {
                for line in node.restore(&dd, &header, plan).await? {
                    // What was left out is worth a WARN; "NOT restored, ...: none" is not.
                    let left_out = line.starts_with("NOT") && !line.ends_with(": none");
                    if left_out || line.starts_with("warning") {
                        tracing::warn!("restore: {line}");
                    } else {
                        tracing::info!("restore: {line}");
                    }
                    println!("flockd: {line}");
                }
            }
            node
        }
        Cmd::Join {
            peer,
            token,
            join_timeout,
            node: n,
        } => {
            let dd = DataDir::new(&n.data_dir);
            let opts = n.storage.options(&n.raft)?;
            let ep = Endpoint::bind(&n.listen, n.advertise).await?;
            let node = RunningNode::join(
                &dd,
                ep,
                &peer,
                &token,
                n.name,
                Duration::from_secs(join_timeout),
                &opts,
            )
            .await?;
            node.wait_until_member(Duration::from_secs(30)).await?;
            node
        }
        Cmd::Run {
            data_dir,
            listen,
            force_new_cluster,
            storage,
            raft,
        } => {
            let dd = DataDir::new(data_dir);
            if force_new_cluster {
                for line in flock_node::daemon::force_new_cluster(&dd)? {
                    tracing::warn!("force-new-cluster: {line}");
                    println!("flockd: {line}");
                }
            }
            RunningNode::run(&dd, listen, &storage.options(&raft)?).await?
        }
    };
    if setup_only {
        return stop_after_setup(node, &data_dir).await;
    }
    let id = &node.identity;
    if let Some(addr) = node.metrics_addr {
        println!("flockd: metrics on http://{addr}/metrics");
    }
    println!(
        "flockd: ready node {} (id {}) of cluster {} serving on {}",
        id.name, id.node_id, id.cluster_id, id.advertise
    );
    let cluster = node.cluster.clone();
    let fatal = async move { cluster.fatal().await };
    tokio::select! {
        sig = flock_node::dev::shutdown_signal() => println!("flockd: {sig}, shutting down"),
        e = fatal => {
            // Never a flockd serving without Raft: stop, say why, and let a supervisor (or the
            // operator, once the cause is fixed) start it again.
            let name = node.identity.name.clone();
            eprintln!("flockd: {}", flock_node::dev::raft_stopped(&name, &data_dir, &e));
            let _ = node.shutdown().await;
            anyhow::bail!("stopped: raft failed on node {name} (see above)");
        }
    }
    node.shutdown().await?;
    println!("flockd: stopped");
    Ok(())
}

/// Reads and checks the backup `file`, and what restoring it brings back.
fn read_backup(
    file: &std::path::Path,
) -> anyhow::Result<(
    flock_node::api::backup::BackupHeader,
    flock_node::api::backup::RestorePlan,
)> {
    let bytes = std::fs::read(file)
        .map_err(|e| anyhow::anyhow!("cannot read the backup {}: {e}", file.display()))?;
    let (header, state) =
        flock_node::api::backup::decode_file(&file.display().to_string(), &bytes)?;
    // The new admin config is labelled "admin" (RunningNode::init).
    Ok((
        header,
        flock_node::api::backup::RestorePlan::of(&state, "admin"),
    ))
}

/// `--setup-only`: the node exists (a member of its cluster); stop it cleanly and say how to
/// run it.
async fn stop_after_setup(node: RunningNode, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let name = node.identity.name.clone();
    node.shutdown().await?;
    // The fencing watchdog this run started would outlive it outside the service manager's
    // control; with nothing to guard (no app started yet) it is ended, and the flockd that runs
    // the node next starts its own.
    let unguarded = flock_node::fence::FenceDir::open(data_dir)
        .and_then(|f| f.guarded())
        .is_ok_and(|g| g.is_empty());
    if unguarded {
        flock_node::fence::stop_watch(data_dir);
    }
    // Absolute: the service's FLOCK_DATA_DIR must be.
    let dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    println!(
        "flockd: node {name} is set up in {dir} and stopped; start it with `systemctl enable --now flockd` \
         (the package's service, FLOCK_DATA_DIR={dir} in /etc/default/flock) or `flockd run --data-dir {dir}`",
        dir = dir.display()
    );
    Ok(())
}

/// `flockd gen-docs --out DIR`: man pages, one per command and subcommand (flockctl-dataset-move.1),
/// in DIR/man, and completions in DIR/completions, named as each shell's directory of
/// completions wants them (bash: the command's name, zsh: _NAME, fish: NAME.fish).
fn gen_docs(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    // clap_mangen::generate_to, with flock's version in every page's footer (a subcommand's
    // would show its own name).
    fn pages(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages(sub.clone(), dir)?;
        }
        let source = format!("flock {}", env!("CARGO_PKG_VERSION"));
        clap_mangen::Man::new(cmd).source(source).generate_to(dir)?;
        Ok(())
    }
    for cmd in [Cli::command(), flock_node::ctl::Cli::command()] {
        let name = cmd.get_name().to_string();
        let mut built = cmd.clone().disable_help_subcommand(true);
        built.build();
        pages(built, &man)?;
        for (shell, file) in [
            (Shell::Bash, name.clone()),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let mut f = std::fs::File::create(completions.join(file))?;
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut f);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it is in `--help`.
    #[test]
    fn every_argument_has_a_help_line() {
        let missing = flock_node::ctl::args_without_help(&super::Cli::command());
        assert!(
            missing.is_empty(),
            "arguments without a help line: {missing:#?}"
        );
    }
}
