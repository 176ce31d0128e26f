//! flockctl: the operator's CLI. Every command is one or two API calls to any node.
//!
//! Exit codes: 0 success, 1 error, 2 bad usage, 3 a compare-and-set whose expectation did not
//! hold, 4 a key, dataset, snapshot or node that does not exist ([`exit_code`]).
//!
//! This module parses the command line, connects ([`flock_client`]) and hands each command to
//! its module; the modules import [`output`] and nothing above them:
//! - [`cluster`]: `status`, `node ...`, `cluster ...`.
//! - [`kv`]: `kv ...`.
//! - [`dataset`]: `dataset ...`, and following a move's progress.
//! - [`app`]: `deploy` and `app ...` (an app's move is followed as its dataset's).
//! - [`output`]: what every command prints with: tables, JSON, gRPC errors, exit codes.
//! - [`progress`]: what a push shows: a move's progress line, pushes' failures.
//! - [`ui`]: `ui`, the local status page (an HTTP server with the page embedded).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tonic::transport::Channel;

use flock_client::{connect, ClientConfig};
use flock_proto::v1::api_client::ApiClient;

pub mod app;
pub mod cluster;
pub mod dataset;
pub mod kv;
pub mod output;
pub mod progress;
pub mod ui;

pub use output::{exit_code, JsonFlag, NotFound, EXIT_CAS_FAILED, EXIT_NOT_FOUND};

/// flock's operator CLI: inspect and change a flock cluster through any of its nodes.
#[derive(Parser, Debug)]
#[command(name = "flockctl", version)]
pub struct Cli {
    /// Client config: the cluster's CA, an admin certificate and key, and member addresses.
    /// `flockd init` writes one to DATA_DIR/admin.conf; `flockctl cluster admin-config` makes more.
    /// Default: ~/.config/flock/admin.conf, else /var/lib/flock/admin.conf.
    #[arg(long, global = true, env = "FLOCK_CONFIG")]
    pub config: Option<PathBuf>,
    /// API address of a node to talk to, instead of the config's addresses.
    #[arg(long, global = true, env = "FLOCK_ADDR")]
    pub addr: Option<String>,
    /// Seconds to wait for the node to answer.
    #[arg(long, global = true, default_value_t = 10)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: Cmd,
}

/// flockctl's commands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Cluster id, leader, term, log indexes, and each member's role, health and lag.
    Status(JsonFlag),
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(cluster::NodeCmd),
    /// Cluster-wide settings.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// The replicated key-value namespace for users' cluster-wide settings.
    #[command(subcommand)]
    Kv(kv::KvCmd),
    /// Datasets: create, list, snapshot, roll back, remove, and move them between nodes.
    #[command(subcommand)]
    Dataset(dataset::DatasetCmd),
    /// Make the cluster run a configuration: one compose file, deployed as a stack (its
    /// project) whose apps alone it adds, changes or removes; or Flocker's DEPLOYMENT
    /// APPLICATION files (deployment.yml, application.yml), which replace the apps outside
    /// stacks. Deploying the same files again changes nothing.
    Deploy {
        /// One compose file, or deployment.yml then application.yml.
        #[arg(required = true, num_args = 1..=2, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Print the changes (start, stop, move, update) without making them.
        #[arg(long)]
        dry_run: bool,
        /// Print the changes and warnings as JSON.
        #[arg(long)]
        json: bool,
        /// Where a compose file's ${VARIABLES} come from besides the environment (which wins),
        /// NAME=VALUE lines [default: .env beside the file, if there is one].
        #[arg(long, value_name = "FILE")]
        env_file: Option<PathBuf>,
        /// The stack's name [default: the compose file's name:, else its directory's name].
        #[arg(short = 'p', long = "project-name", value_name = "NAME")]
        project: Option<String>,
        /// Deploy the services of this compose profile too (repeatable; COMPOSE_PROFILES adds
        /// to them): services with profiles: run only when one of theirs is active.
        #[arg(long = "profile", value_name = "NAME")]
        profiles: Vec<String>,
    },
    /// Stacks: the compose projects deployed.
    #[command(subcommand)]
    Stack(app::StackCmd),
    /// Deployed applications.
    #[command(subcommand)]
    App(app::AppCmd),
    /// What happened to nodes and stateful apps: nodes declared down and back up, failovers
    /// (from where to where, from which snapshot, how much may have been lost).
    Events {
        /// Keep printing new events as they happen.
        #[arg(long)]
        follow: bool,
        /// One JSON object per event, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Serve a live, read-only status page of the cluster on loopback (nodes, apps, datasets,
    /// moves, events, charts), read with this admin config; prints its URL with a token.
    Ui(ui::UiArgs),
    /// Print flockctl's completion script for SHELL, for a system without flock's package
    /// (which installs them), e.g. `flockctl completions bash >
    /// ~/.local/share/bash-completion/completions/flockctl`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

/// Where flockctl looks for a client config when neither --config nor FLOCK_CONFIG names one,
/// in order: the user's own (`$XDG_CONFIG_HOME/flock/admin.conf`, else
/// `~/.config/flock/admin.conf`), then the packaged node's (`/var/lib/flock/admin.conf`, which
/// only root can read), as kubectl reads ~/.kube/config.
pub fn default_config_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let xdg = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty());
    match (xdg, std::env::var_os("HOME").filter(|v| !v.is_empty())) {
        (Some(x), _) => paths.push(PathBuf::from(x).join("flock/admin.conf")),
        (None, Some(h)) => paths.push(PathBuf::from(h).join(".config/flock/admin.conf")),
        (None, None) => {}
    }
    paths.push(PathBuf::from("/var/lib/flock/admin.conf"));
    paths
}

/// Loads the client config named by --config or FLOCK_CONFIG, else the first of
/// [`default_config_paths`] that exists.
fn load_config(cli: &Cli) -> anyhow::Result<ClientConfig> {
    let path = match &cli.config {
        Some(p) => p.clone(),
        None => default_config_paths()
            .into_iter()
            .find(|p| p.exists())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no client config: give --config FILE or set FLOCK_CONFIG, or put one at {} (flockd init wrote DATA_DIR/admin.conf; `flockd dev` prints the export line)",
                    default_config_paths()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                )
            })?,
    };
    ClientConfig::load(&path).map_err(|e| config_error(&path, e))
}

/// A config that cannot be loaded, said once, with what to do: `{e:#}` of the file error would
/// print the OS error twice (the path's message, then its source).
fn config_error(path: &std::path::Path, e: flock_client::ClientError) -> anyhow::Error {
    use flock_client::ClientError;
    use flock_tls::pki::PkiError;
    match e {
        ClientError::File(PkiError::Io { source, .. }) => {
            let what = match source.kind() {
                std::io::ErrorKind::NotFound => "no such file".to_string(),
                std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                _ => source.to_string(),
            };
            anyhow::anyhow!(
                "cannot read the client config {}: {what}; give --config FILE or set FLOCK_CONFIG \
                 to a config that exists (`flockd init` writes DATA_DIR/admin.conf, `flockd dev` \
                 prints the export line, `flockctl cluster admin-config` makes more)",
                path.display()
            )
        }
        e => e.into(),
    }
}

/// Connects to the first address that answers: --addr, else the config's addresses in order.
async fn connect_any(cli: &Cli, config: &ClientConfig) -> anyhow::Result<ApiClient<Channel>> {
    let addrs = match &cli.addr {
        Some(a) => vec![a.clone()],
        None => config.addrs.clone(),
    };
    let tls = config.identity()?;
    let mut errors = Vec::new();
    for addr in &addrs {
        match connect(addr, &tls, Duration::from_secs(cli.timeout)).await {
            Ok(c) => return Ok(c),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    anyhow::bail!(
        "{}\nis flockd running there? point flockctl at a node with --addr HOST:PORT or FLOCK_ADDR",
        if errors.is_empty() {
            "the config names no addresses".to_string()
        } else {
            errors.join("\n")
        }
    )
}

/// Runs one flockctl command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    if let Cmd::Completions { shell } = cli.command {
        // Needs no cluster, so no config either.
        use clap::CommandFactory;
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "flockctl",
            &mut std::io::stdout(),
        );
        return Ok(0);
    }
    let config = load_config(&cli)?;
    if let Cmd::Ui(args) = &cli.command {
        // Not one connection: the page asks every node, and shows those that do not answer.
        ui::run(&config, cli.addr.as_deref(), args).await?;
        return Ok(0);
    }
    let mut api = connect_any(&cli, &config).await?;
    match cli.command {
        Cmd::Status(f) => cluster::status(&mut api, f.json).await?,
        Cmd::Node(cmd) => cluster::node(&mut api, cmd).await?,
        Cmd::Cluster(cmd) => cluster::cluster(&mut api, cmd).await?,
        Cmd::Kv(cmd) => return kv::run(&mut api, cmd).await,
        Cmd::Dataset(cmd) => return dataset::run(&mut api, cmd).await,
        Cmd::Deploy {
            files,
            dry_run,
            json,
            env_file,
            project,
            profiles,
        } => {
            let args = app::DeployArgs {
                files: &files,
                dry_run,
                json,
                env_file: env_file.as_deref(),
                project: project.as_deref(),
                profiles: &profiles,
            };
            return app::deploy(&mut api, args).await;
        }
        Cmd::Stack(cmd) => return app::stack(&mut api, cmd).await,
        Cmd::App(cmd) => return app::run(&mut api, cmd).await,
        Cmd::Events { follow, json } => cluster::events(&mut api, follow, json).await?,
        Cmd::Ui(_) | Cmd::Completions { .. } => unreachable!("handled above"),
    }
    Ok(0)
}

/// The flags and arguments of `cmd` and its subcommands that have no help line ("flockctl kv
/// ls: stale"): the tests of flockctl and flockd require none.
pub fn args_without_help(cmd: &clap::Command) -> Vec<String> {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path}: {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(cmd, cmd.get_name(), &mut missing);
    missing
}

#[cfg(test)]
mod tests {
    use super::{args_without_help, Cli};
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it is in `--help`.
    #[test]
    fn every_argument_has_a_help_line() {
        let missing = args_without_help(&Cli::command());
        assert!(
            missing.is_empty(),
            "arguments without a help line: {missing:#?}"
        );
    }
}
