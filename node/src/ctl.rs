//! flockctl: the operator's CLI. Every command is one or two API calls to any node.
//!
//! Exit codes: 0 success, 1 error, 2 bad usage, 3 a compare-and-set whose expectation did not
//! hold, 4 a key, dataset, snapshot or node that does not exist.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tonic::transport::Channel;

use flock_proto::v1::api_client::ApiClient;
use flock_proto::v1::*;
use flock_scheduler::shown;

use crate::pki::new_key_and_csr;
use flock_client::{connect, ClientConfig};

/// Exit code of a compare-and-set whose expected value did not match.
pub const EXIT_CAS_FAILED: i32 = 3;
/// Exit code of `kv get` on a key that does not exist.
pub const EXIT_NOT_FOUND: i32 = 4;

/// flock's operator CLI: inspect and change a flock cluster through any of its nodes.
#[derive(Parser, Debug)]
#[command(name = "flockctl", version)]
pub struct Cli {
    /// Client config: the cluster's CA, an admin certificate and key, and member addresses.
    /// `flockd init` writes one to DATA_DIR/admin.conf; `flockctl cluster admin-config` makes more.
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

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Cluster id, leader, term, log indexes, and each member's role, health and lag.
    Status(JsonFlag),
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Cluster-wide settings.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The replicated key-value namespace for users' cluster-wide settings.
    #[command(subcommand)]
    Kv(KvCmd),
    /// Datasets: create, list, snapshot, roll back, remove, and move them between nodes.
    #[command(subcommand)]
    Dataset(crate::ctl_dataset::DatasetCmd),
    /// Make the cluster run a configuration: Flocker's DEPLOYMENT APPLICATION files
    /// (deployment.yml, application.yml), or one compose file. The whole configuration
    /// replaces the previous one; deploying the same files again changes nothing.
    Deploy {
        #[arg(required = true, num_args = 1..=2, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Print the changes (start, stop, move, update) without making them.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Deployed applications.
    #[command(subcommand)]
    App(crate::ctl_app::AppCmd),
}

#[derive(Args, Debug)]
pub struct JsonFlag {
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List the members with their role and health.
    Ls(JsonFlag),
    /// Remove a node from the cluster (its Raft membership and its registration).
    Rm {
        name: String,
        /// Remove a voter even if the remaining healthy voters would not form a quorum.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Print the token new nodes join with (`flockd join PEER --token TOKEN`).
    Token {
        /// Replace the token's secret first: old tokens stop working, members are unaffected.
        #[arg(long)]
        rotate: bool,
    },
    /// Issue another admin client config (a new key and certificate) into FILE, or revoke
    /// every admin certificate with a label (--revoke LABEL).
    AdminConfig {
        /// Where to write it (created with mode 0600; an existing file is not overwritten).
        #[arg(long, required_unless_present = "revoke", conflicts_with = "revoke")]
        out: Option<PathBuf>,
        /// Label in the certificate, to tell admins apart.
        #[arg(long, default_value = "admin")]
        label: String,
        /// Revoke every admin certificate labelled LABEL, on every node, for good (the label
        /// cannot be issued again). Not the label of the config making the call.
        #[arg(long, value_name = "LABEL")]
        revoke: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Set KEY to VALUE.
    Put { key: String, value: String },
    /// Print KEY's value (exit code 4 when it does not exist).
    Get {
        key: String,
        /// Read this node's replica without asking the leader: fast, possibly old.
        #[arg(long)]
        stale: bool,
        #[arg(long)]
        json: bool,
    },
    /// Set KEY to VALUE only if it holds OLD now (exit code 3 when it does not).
    Cas {
        key: String,
        /// The value KEY must hold.
        #[arg(long, required_unless_present = "absent", conflicts_with = "absent")]
        expect: Option<String>,
        /// Instead of --expect: KEY must not exist.
        #[arg(long)]
        absent: bool,
        value: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete KEY.
    Rm { key: String },
    /// List keys starting with PREFIX (all keys without one).
    Ls {
        prefix: Option<String>,
        #[arg(long)]
        stale: bool,
        #[arg(long)]
        json: bool,
    },
}

/// A gRPC error as a one-line message; the node's own message already says what to do.
fn status_err(s: tonic::Status) -> anyhow::Error {
    // A refused handshake surfaces on the first call as a bare "transport error": the reason
    // is in the sources.
    let mut msg = s.message().to_string();
    let mut cur = std::error::Error::source(&s);
    while let Some(e) = cur {
        let t = e.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        cur = e.source();
    }
    if msg.contains("CertificateExpired") {
        msg.push_str(" (the certificate in this client config has expired: ask an administrator for a new one, flockctl cluster admin-config --out FILE)");
    }
    anyhow::anyhow!("{msg}")
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[derive(Serialize)]
struct KvJson<'a> {
    key: &'a str,
    value: &'a str,
    mod_revision: u64,
    create_revision: u64,
    version: u64,
}

fn kv_json(e: &KvEntry) -> KvJson<'_> {
    KvJson {
        key: &e.key,
        value: &e.value,
        mod_revision: e.mod_revision,
        create_revision: e.create_revision,
        version: e.version,
    }
}

#[derive(Serialize)]
struct MemberJson<'a> {
    id: u64,
    name: &'a str,
    addr: &'a str,
    role: &'a str,
    health: &'a str,
    matched_index: Option<u64>,
    lag: Option<u64>,
    rtt_ms: Option<u64>,
    labels: std::collections::BTreeMap<&'a str, &'a str>,
    memory: Option<u64>,
    cpus: Option<u32>,
    docker: Option<bool>,
}

fn member_json(m: &Member) -> MemberJson<'_> {
    MemberJson {
        id: m.id,
        name: &m.name,
        addr: &m.addr,
        role: &m.role,
        health: &m.health,
        matched_index: m.matched_index,
        lag: m.lag,
        rtt_ms: m.rtt_ms,
        labels: m
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        memory: m.memory,
        cpus: m.cpus,
        docker: m.docker,
    }
}

#[derive(Serialize)]
struct StatusJson<'a> {
    cluster_id: &'a str,
    reported_by: &'a str,
    leader_id: Option<u64>,
    leader_name: &'a str,
    leader_addr: &'a str,
    term: u64,
    commit_index: Option<u64>,
    applied_index: Option<u64>,
    last_log_index: Option<u64>,
    snapshot_index: Option<u64>,
    purged_index: Option<u64>,
    members: Vec<MemberJson<'a>>,
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn members_table(members: &[Member]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "ID".into(),
        "ADDRESS".into(),
        "ROLE".into(),
        "HEALTH".into(),
        "MATCHED".into(),
        "LAG".into(),
        "RTT".into(),
        "LABELS".into(),
    ]];
    for m in members {
        rows.push([
            m.name.clone(),
            m.id.to_string(),
            m.addr.clone(),
            m.role.clone(),
            m.health.clone(),
            opt(m.matched_index),
            opt(m.lag),
            m.rtt_ms
                .map(|r| format!("{r}ms"))
                .unwrap_or_else(|| "-".into()),
            labels_text(&m.labels),
        ]);
    }
    table(&rows)
}

/// `k=v,k2=v2` in key order, or `-`.
fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let sorted: std::collections::BTreeMap<_, _> = labels.iter().collect();
    if sorted.is_empty() {
        return "-".into();
    }
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Entries per `kv ls` page flockctl asks for (the server may send fewer).
const KV_LIST_PAGE: u32 = 1000;

/// The most characters of a key or value `kv ls` shows in its table (`--json` shows them whole).
const CELL_CHARS: usize = 80;

/// A table cell for a key or value: cut to [`CELL_CHARS`] characters, with `…` and the length
/// when cut, and its line breaks and tabs shown as `\n` and `\t` (one row per entry).
fn cell(text: &str) -> String {
    let one_line = |s: &str| s.replace('\n', "\\n").replace('\t', "\\t");
    match text.char_indices().nth(CELL_CHARS) {
        None => one_line(text),
        Some((cut, _)) => format!("{}…({} bytes)", one_line(&text[..cut]), text.len()),
    }
}

/// Left-aligned columns separated by two spaces. Cells of any width (padded by hand: a format
/// width is at most 65535).
pub(crate) fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            line.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(c.chars().count()),
            ));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

async fn status(api: &mut ApiClient<Channel>) -> anyhow::Result<StatusReply> {
    Ok(api
        .status(StatusRequest { local: false })
        .await
        .map_err(status_err)?
        .into_inner())
}

/// Loads the client config named by --config or FLOCK_CONFIG.
fn load_config(cli: &Cli) -> anyhow::Result<ClientConfig> {
    let path = cli.config.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "no client config: give --config FILE or set FLOCK_CONFIG (flockd init wrote DATA_DIR/admin.conf; `flockd dev` prints the export line)"
        )
    })?;
    Ok(ClientConfig::load(path)?)
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
    let config = load_config(&cli)?;
    let mut api = connect_any(&cli, &config).await?;
    match cli.command {
        Cmd::Status(f) => {
            let s = status(&mut api).await?;
            if f.json {
                print_json(&StatusJson {
                    cluster_id: &s.cluster_id,
                    reported_by: &s.node_name,
                    leader_id: s.leader_id,
                    leader_name: &s.leader_name,
                    leader_addr: &s.leader_addr,
                    term: s.term,
                    commit_index: s.commit_index,
                    applied_index: s.applied_index,
                    last_log_index: s.last_log_index,
                    snapshot_index: s.snapshot_index,
                    purged_index: s.purged_index,
                    members: s.members.iter().map(member_json).collect(),
                })?;
            } else {
                println!("cluster  {}", s.cluster_id);
                match s.leader_id {
                    Some(id) if id != s.node_id => println!(
                        "leader   {} (id {id}) at {}, term {}, as last seen by {}, which cannot reach it now; health and lag unknown",
                        s.leader_name, s.leader_addr, s.term, s.node_name
                    ),
                    Some(id) => println!(
                        "leader   {} (id {id}) at {}, term {}",
                        s.leader_name, s.leader_addr, s.term
                    ),
                    None => println!(
                        "leader   none known to {} (term {}); health and lag unknown",
                        s.node_name, s.term
                    ),
                }
                println!(
                    "log      commit {}, applied {}, last {}, snapshot {}, purged {}",
                    opt(s.commit_index),
                    opt(s.applied_index),
                    opt(s.last_log_index),
                    opt(s.snapshot_index),
                    opt(s.purged_index)
                );
                println!();
                print!("{}", members_table(&s.members));
            }
        }
        Cmd::Node(NodeCmd::Ls(f)) => {
            let s = status(&mut api).await?;
            if f.json {
                print_json(&s.members.iter().map(member_json).collect::<Vec<_>>())?;
            } else {
                print!("{}", members_table(&s.members));
            }
        }
        Cmd::Node(NodeCmd::Rm { name, force }) => {
            let r = api
                .remove_node(RemoveNodeRequest {
                    name: name.clone(),
                    force,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("removed node {name} (id {})", r.node_id);
        }
        Cmd::Cluster(ClusterCmd::Token { rotate }) => {
            let r = api
                .cluster_token(ClusterTokenRequest { rotate })
                .await
                .map_err(status_err)?;
            if rotate {
                eprintln!("flockctl: join secret rotated; tokens issued before no longer work");
            }
            println!("{}", r.into_inner().token);
        }
        Cmd::Cluster(ClusterCmd::AdminConfig {
            revoke: Some(label),
            ..
        }) => {
            let r = api
                .revoke_admin(RevokeAdminRequest {
                    label: label.clone(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if r.already {
                println!("admin certificates labelled {label:?} were already revoked");
            } else {
                println!("revoked admin certificates labelled {label:?} on every node");
            }
        }
        Cmd::Cluster(ClusterCmd::AdminConfig {
            out: Some(out),
            label,
            ..
        }) => {
            if out.exists() {
                anyhow::bail!(
                    "{} exists; choose another --out (flockctl never overwrites a config)",
                    out.display()
                );
            }
            let (key_pem, csr_pem) = new_key_and_csr()?;
            let r = api
                .issue_admin_cert(IssueAdminCertRequest { csr_pem, label })
                .await
                .map_err(status_err)?
                .into_inner();
            ClientConfig {
                format: 1,
                cluster_id: r.cluster_id,
                addrs: r.addrs,
                ca_pem: r.ca_pem,
                cert_pem: r.cert_pem,
                key_pem,
            }
            .save(&out)?;
            println!(
                "wrote {} (mode 0600); use it with --config or FLOCK_CONFIG",
                out.display()
            );
        }
        Cmd::Cluster(ClusterCmd::AdminConfig { .. }) => {
            anyhow::bail!("give --out FILE (a new admin config) or --revoke LABEL")
        }
        Cmd::Kv(cmd) => return kv(&mut api, cmd).await,
        Cmd::Dataset(cmd) => return crate::ctl_dataset::run(&mut api, cmd).await,
        Cmd::Deploy {
            files,
            dry_run,
            json,
        } => return crate::ctl_app::deploy(&mut api, &files, dry_run, json).await,
        Cmd::App(cmd) => return crate::ctl_app::run(&mut api, cmd).await,
    }
    Ok(0)
}

async fn kv(api: &mut ApiClient<Channel>, cmd: KvCmd) -> anyhow::Result<i32> {
    match cmd {
        KvCmd::Put { key, value } => {
            let r = api
                .kv_put(KvPutRequest { key, value })
                .await
                .map_err(status_err)?
                .into_inner();
            if let Some(e) = r.entry {
                println!("revision {}", e.mod_revision);
            }
        }
        KvCmd::Get { key, stale, json } => {
            let r = api
                .kv_get(KvGetRequest {
                    key: key.clone(),
                    stale,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            match r.entry {
                Some(e) if json => print_json(&kv_json(&e))?,
                Some(e) => println!("{}", e.value),
                None => {
                    if json {
                        println!("null");
                    } else {
                        eprintln!("flockctl: key {} does not exist", shown(&key));
                    }
                    return Ok(EXIT_NOT_FOUND);
                }
            }
        }
        KvCmd::Cas {
            key,
            expect,
            absent: _,
            value,
            json,
        } => {
            let r = api
                .kv_cas(KvCasRequest {
                    key: key.clone(),
                    expect: expect.clone(),
                    value,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                #[derive(Serialize)]
                struct CasJson<'a> {
                    succeeded: bool,
                    entry: Option<KvJson<'a>>,
                }
                print_json(&CasJson {
                    succeeded: r.succeeded,
                    entry: r.entry.as_ref().map(kv_json),
                })?;
            } else if r.succeeded {
                println!(
                    "revision {}",
                    r.entry.map(|e| e.mod_revision).unwrap_or_default()
                );
            } else {
                let now = match &r.entry {
                    Some(e) => format!("holds {}", shown(&e.value)),
                    None => "does not exist".into(),
                };
                let wanted = match &expect {
                    Some(v) => shown(v),
                    None => "no key".into(),
                };
                eprintln!(
                    "flockctl: not changed: {} {now}, expected {wanted}",
                    shown(&key)
                );
            }
            if !r.succeeded {
                return Ok(EXIT_CAS_FAILED);
            }
        }
        KvCmd::Rm { key } => {
            let r = api
                .kv_delete(KvDeleteRequest { key: key.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            if r.existed {
                println!("deleted {key} at revision {}", r.revision);
            } else {
                println!("{key} did not exist");
            }
        }
        KvCmd::Ls {
            prefix,
            stale,
            json,
        } => {
            let prefix = prefix.unwrap_or_default();
            // Page by page (each page a read of its own), until the server says there is no more.
            let mut entries: Vec<KvEntry> = Vec::new();
            loop {
                let start_after = entries.last().map(|e| e.key.clone()).unwrap_or_default();
                let r = api
                    .kv_list(KvListRequest {
                        prefix: prefix.clone(),
                        stale,
                        limit: KV_LIST_PAGE,
                        start_after,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                let progressed = !r.entries.is_empty();
                entries.extend(r.entries);
                if !r.more || !progressed {
                    break;
                }
            }
            if json {
                print_json(&entries.iter().map(kv_json).collect::<Vec<_>>())?;
            } else {
                let mut rows = vec![["KEY".to_string(), "VALUE".into(), "REVISION".into()]];
                rows.extend(
                    entries
                        .iter()
                        .map(|e| [cell(&e.key), cell(&e.value), e.mod_revision.to_string()]),
                );
                print!("{}", table(&rows));
            }
        }
    }
    Ok(0)
}
