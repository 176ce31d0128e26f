//! `flockctl status`, `flockctl node ...` and `flockctl cluster ...`: members, their health,
//! and the cluster's join token and admin certificates.

use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;
use tonic::transport::Channel;

use flock_client::{ClientConfig, CLIENT_CONFIG_FORMAT};
use flock_proto::v1::api_client::ApiClient;
use flock_proto::v1::*;

use super::output::{cell, print_json, status_err, table, JsonFlag};
use crate::pki::new_key_and_csr;

/// `flockctl node ...`.
#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List the members with their role and health.
    Ls(JsonFlag),
    /// Declare a node dead, as an operator who knows the machine is gone: its lease is renewed
    /// no more, and once the last one it held has run out (a few seconds) it is declared down
    /// and its stateful apps fail over to their replicas. If it is in fact alive, it stops
    /// (fences) its stateful apps when its lease runs out, before any replica starts.
    Down {
        /// The node's name (or id).
        name: String,
    },
    /// Move every app off a node with live moves (a stateful app to its replica when it has
    /// one), and mark it draining so nothing new lands there; shows each app's progress.
    Drain {
        /// The node's name (or id).
        name: String,
        /// Make it ready again (apps are not moved back).
        #[arg(long)]
        undo: bool,
        /// Return once the moves are asked for, without following them.
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove a node from the cluster (its Raft membership and its registration).
    Rm {
        /// The node (`flockctl node ls` lists them).
        name: String,
        /// Remove a voter even if the remaining healthy voters would not form a quorum.
        #[arg(long)]
        force: bool,
    },
}

/// `flockctl cluster ...`.
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
    /// Write a consistent copy of the replicated state into FILE (mode 0600): nodes, apps,
    /// stacks with their secrets and configs, datasets' records, the key-value namespace,
    /// revoked admin labels. It holds the stacks' secrets in clear: keep it as you keep them.
    /// Datasets' data is not in it (it stays on the nodes that hold it). `flockd init --restore
    /// FILE` starts a new cluster from it; see docs/recovery.md.
    Backup {
        /// Where to write the backup (created with mode 0600, atomically; an existing file is
        /// not overwritten without --force).
        file: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct MemberJson<'a> {
    id: u64,
    name: &'a str,
    addr: &'a str,
    role: &'a str,
    health: &'a str,
    state: &'a str,
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
        state: &m.state,
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
        "STATE".into(),
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
            if m.state.is_empty() {
                "-".into()
            } else {
                m.state.clone()
            },
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

/// The status's warnings, one `warning  ...` line each (whole: the reason is the point).
fn warning_lines(warnings: &[String]) -> String {
    warnings
        .iter()
        .map(|w| format!("warning  {}\n", w.replace('\n', "\\n")))
        .collect()
}

async fn read_status(api: &mut ApiClient<Channel>) -> anyhow::Result<StatusReply> {
    Ok(api
        .status(StatusRequest { local: false })
        .await
        .map_err(status_err)?
        .into_inner())
}

/// `flockctl status`: the cluster, its leader and log, and the members.
pub async fn status(api: &mut ApiClient<Channel>, json: bool) -> anyhow::Result<()> {
    let s = read_status(api).await?;
    // The workers of the node that answered (`reported_by`); none from an older flockd.
    let ago = |ms: Option<u64>| match ms {
        Some(ms) => format!(
            "{} ago",
            humantime::format_duration(std::time::Duration::from_secs(ms / 1000))
        ),
        None => "-".to_string(),
    };
    if json {
        // Beside StatusJson's fields, in this order (a json! map would sort the keys).
        #[derive(serde::Serialize)]
        struct WorkerJson<'a> {
            name: &'a str,
            phase: &'a str,
            state: &'a str,
            detail: &'a str,
            last_activity_ms_ago: Option<u64>,
            last_error: &'a str,
            last_error_ms_ago: Option<u64>,
        }
        #[derive(serde::Serialize)]
        struct WithWorkers<'a> {
            #[serde(flatten)]
            status: StatusJson<'a>,
            workers: Vec<WorkerJson<'a>>,
            warnings: &'a [String],
        }
        print_json(&WithWorkers {
            status: StatusJson {
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
            },
            workers: s
                .workers
                .iter()
                .map(|w| WorkerJson {
                    name: &w.name,
                    phase: &w.phase,
                    state: &w.state,
                    detail: &w.detail,
                    last_activity_ms_ago: w.last_activity_ms_ago,
                    last_error: &w.last_error,
                    last_error_ms_ago: w.last_error_ms_ago,
                })
                .collect(),
            warnings: &s.warnings,
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
        print!("{}", warning_lines(&s.warnings));
        println!();
        print!("{}", members_table(&s.members));
        println!();
        if s.workers.is_empty() {
            println!(
                "WORKERS  none reported by {} (a flockd older than this flockctl)",
                s.node_name
            );
        } else {
            println!("WORKERS of {}", s.node_name);
            let mut rows = vec![[
                "NAME".to_string(),
                "PHASE".into(),
                "STATE".into(),
                "ACTIVE".into(),
                "DETAIL".into(),
                "LAST ERROR".into(),
            ]];
            for w in &s.workers {
                rows.push([
                    w.name.clone(),
                    w.phase.clone(),
                    w.state.clone(),
                    ago(w.last_activity_ms_ago),
                    if w.detail.is_empty() {
                        "-".into()
                    } else {
                        cell(&w.detail)
                    },
                    match w.last_error_ms_ago {
                        Some(_) => {
                            format!("{} ({})", cell(&w.last_error), ago(w.last_error_ms_ago))
                        }
                        None => "-".into(),
                    },
                ]);
            }
            print!("{}", table(&rows));
        }
    }
    Ok(())
}

/// `flockctl node ...`.
pub async fn node(api: &mut ApiClient<Channel>, cmd: NodeCmd) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Ls(f) => {
            let s = read_status(api).await?;
            if f.json {
                print_json(&s.members.iter().map(member_json).collect::<Vec<_>>())?;
            } else {
                print!("{}", members_table(&s.members));
            }
        }
        NodeCmd::Down { name } => {
            let r = api
                .node_down(NodeDownRequest { name: name.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "node {name} (id {}) is renewed no more; it is declared down and its apps fail \
                 over within {:.1}s (`flockctl events --follow` shows it)",
                r.node_id,
                r.within_ms as f64 / 1000.0
            );
        }
        NodeCmd::Drain {
            name,
            undo,
            no_wait,
        } => return drain(api, &name, undo, no_wait).await,
        NodeCmd::Rm { name, force } => {
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
    }
    Ok(())
}

/// `flockctl node drain NODE`: asks for the moves, then follows them app by app.
async fn drain(
    api: &mut ApiClient<Channel>,
    name: &str,
    undo: bool,
    no_wait: bool,
) -> anyhow::Result<()> {
    let r = api
        .node_drain(NodeDrainRequest {
            name: name.to_string(),
            undo,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if undo {
        println!("node {name} is ready again: apps may be placed on it");
        return Ok(());
    }
    println!("node {name} is draining: nothing new is placed on it");
    if r.apps.is_empty() {
        println!("no app runs on {name}");
        return Ok(());
    }
    let mut stuck = 0;
    for a in &r.apps {
        if a.error.is_empty() {
            println!("  {}: moving to {}", a.app, a.to);
        } else {
            stuck += 1;
            println!("  {}: stays: {}", a.app, a.error);
        }
    }
    if no_wait {
        return Ok(());
    }
    let mut last: std::collections::BTreeMap<String, String> = Default::default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let apps = api
            .app_list(AppListRequest {
                name: String::new(),
            })
            .await
            .map_err(status_err)?
            .into_inner()
            .apps;
        let mut pending = 0;
        for a in r.apps.iter().filter(|a| a.error.is_empty()) {
            let Some(s) = apps.iter().find(|s| s.name == a.app) else {
                continue;
            };
            let done = s.node == a.to && s.state == "running";
            let line = if done {
                format!("running on {}", a.to)
            } else {
                pending += 1;
                format!(
                    "{} on {}{}",
                    if s.state.is_empty() {
                        "starting"
                    } else {
                        &s.state
                    },
                    s.node,
                    if s.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s.detail)
                    }
                )
            };
            if last.get(&a.app) != Some(&line) {
                println!("  {}: {line}", a.app);
                last.insert(a.app.clone(), line);
            }
        }
        if pending == 0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "{pending} app(s) still moving after 10 minutes; `flockctl app ls` shows them"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    if stuck > 0 {
        anyhow::bail!("{stuck} app(s) could not move off {name} (see above)");
    }
    println!("node {name} is drained");
    Ok(())
}

/// `flockctl events [--follow] [--json]`.
pub async fn events(api: &mut ApiClient<Channel>, follow: bool, json: bool) -> anyhow::Result<()> {
    let mut after = 0;
    loop {
        let r = api
            .events(EventsRequest { after })
            .await
            .map_err(status_err)?
            .into_inner();
        let events: Vec<serde_json::Value> = serde_json::from_str(&r.events_json)?;
        for e in &events {
            if json {
                println!("{e}");
            } else {
                let at = e["at_unix_ms"].as_u64().unwrap_or(0);
                let when = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(at),
                );
                println!("{when}  {}", e["text"].as_str().unwrap_or(""));
            }
        }
        if events.is_empty() && !follow && !json {
            println!("no events yet (nodes declared down, failovers)");
        }
        after = r.next;
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// `flockctl cluster ...`.
pub async fn cluster(api: &mut ApiClient<Channel>, cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Token { rotate } => {
            let r = api
                .cluster_token(ClusterTokenRequest { rotate })
                .await
                .map_err(status_err)?;
            if rotate {
                eprintln!("flockctl: join secret rotated; tokens issued before no longer work");
            }
            println!("{}", r.into_inner().token);
        }
        ClusterCmd::AdminConfig {
            revoke: Some(label),
            ..
        } => {
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
        ClusterCmd::AdminConfig {
            out: Some(out),
            label,
            ..
        } => {
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
                format: CLIENT_CONFIG_FORMAT,
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
        ClusterCmd::AdminConfig { .. } => {
            anyhow::bail!("give --out FILE (a new admin config) or --revoke LABEL")
        }
        ClusterCmd::Backup { file, force, json } => backup(api, &file, force, json).await?,
    }
    Ok(())
}

/// `flockctl cluster backup FILE`: streams the state from the node, checks it is whole, and
/// writes the file atomically with mode 0600.
async fn backup(
    api: &mut ApiClient<Channel>,
    file: &std::path::Path,
    force: bool,
    json: bool,
) -> anyhow::Result<()> {
    use crate::api::backup::{encode_file, BackupHeader};
    use futures::StreamExt;
    if file.exists() && !force {
        anyhow::bail!(
            "{} exists; choose another FILE, or give --force to replace it",
            file.display()
        );
    }
    let mut stream = api
        .cluster_backup(ClusterBackupRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    let mut info = None;
    let mut state = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status_err)?;
        if let Some(i) = chunk.info {
            state.reserve(i.state_bytes as usize);
            info = Some(i);
        }
        state.extend_from_slice(&chunk.data);
    }
    let info = info.ok_or_else(|| anyhow::anyhow!("the node sent no backup (no header)"))?;
    if state.len() as u64 != info.state_bytes {
        anyhow::bail!(
            "the backup stream ended after {} of {} bytes; nothing was written, try again",
            state.len(),
            info.state_bytes
        );
    }
    let time = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(info.at_unix_ms),
    )
    .to_string();
    let header = BackupHeader {
        format: 0,
        cluster_id: info.cluster_id.clone(),
        applied_index: info.applied_index,
        applied_term: info.applied_term,
        time: time.clone(),
        flock_version: info.flock_version.clone(),
        node: info.node_name.clone(),
        state_bytes: 0,
        state_sha256: String::new(),
    };
    let bytes = encode_file(header, &state);
    // Checked again just before: a file made meanwhile is not replaced without --force.
    if file.exists() && !force {
        anyhow::bail!("{} appeared meanwhile; nothing was written", file.display());
    }
    flock_tls::pki::write_private_atomic(file, &bytes)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
    if json {
        print_json(&serde_json::json!({
            "file": file.display().to_string(),
            "cluster_id": info.cluster_id,
            "applied_index": info.applied_index,
            "applied_term": info.applied_term,
            "time": time,
            "node": info.node_name,
            "flock_version": info.flock_version,
            "bytes": bytes.len(),
            "holds_secrets": true,
        }))?;
    } else {
        println!(
            "wrote {} (mode 0600, {}): cluster {}, applied index {} (term {}), read on {} at {time}",
            file.display(),
            flock_client::human(bytes.len() as u64),
            info.cluster_id,
            info.applied_index,
            info.applied_term,
            info.node_name
        );
        println!(
            "it holds the stacks' secrets and configs in clear: keep it as you keep them; datasets' data is not in it"
        );
        println!("restore with: flockd init --restore {} --data-dir DIR --listen HOST:PORT (see docs/recovery.md)", file.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_warning_is_one_whole_line() {
        let long = format!(
            "dataset db: push to n2 failed (attempt 2): {}",
            "x".repeat(200)
        );
        let text = warning_lines(&[long.clone(), "two\nlines".into()]);
        assert_eq!(text, format!("warning  {long}\nwarning  two\\nlines\n"));
        assert_eq!(warning_lines(&[]), "");
    }
}
