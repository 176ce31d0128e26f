//! `flockctl dataset ...`: datasets, their snapshots and moves.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Subcommand;
use serde_json::{json, Value};
use tonic::transport::Channel;

use flock_client::{human, parse_size};
use flock_proto::v1::api_client::ApiClient;
use flock_proto::v1::*;

use super::output::{print_json, status_err, table, NotFound};
use super::progress::{self, Follow};

/// `flockctl dataset ...`.
#[derive(Subcommand, Debug)]
pub enum DatasetCmd {
    /// Create a dataset on a node (default: the node flockctl talks to).
    Create {
        /// The dataset (`flockctl dataset ls` lists them).
        name: String,
        /// The node to create it on (name or id).
        #[arg(long)]
        node: Option<String>,
        /// Size limit, such as 512M, 10G or 1.5TiB (bytes without a unit); none by default.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List datasets: primary, space used, snapshots, and the state of each holder's copy.
    Ls {
        /// Only this dataset.
        name: Option<String>,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Take a snapshot on the dataset's primary (kept until `dataset snapshot rm`), or remove
    /// one.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Snapshot {
        #[command(subcommand)]
        action: Option<SnapshotCmd>,
        /// The dataset.
        #[arg(required = true)]
        name: Option<String>,
        /// The snapshot's name (default: the time, such as 2026-11-23T23-15-49.123Z).
        #[arg(long)]
        tag: Option<String>,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List a dataset's recorded snapshots, oldest first.
    Snapshots {
        /// The dataset (`flockctl dataset ls` lists them).
        name: String,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put the dataset's data back to SNAPSHOT. The state before is kept as a snapshot
    /// (pre-rollback-TIME: roll back to it to undo), and every snapshot is kept. A dataset an
    /// app uses is refused unless --stop-app.
    Rollback {
        /// The dataset (`flockctl dataset ls` lists them).
        name: String,
        /// The snapshot to go back to (`flockctl dataset snapshots NAME` lists them).
        snapshot: String,
        /// Stop the apps that use the dataset for the rollback and start them again after.
        #[arg(long)]
        stop_app: bool,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Change a dataset's size limit or the retention of its automatic snapshots.
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["size", "keep", "replicas", "interval"])))]
    Set {
        /// The dataset (`flockctl dataset ls` lists them).
        name: String,
        /// The new size limit, such as 512M or 10G, or `none`. A limit below what the dataset
        /// holds is refused.
        #[arg(long, value_parser = parse_limit)]
        size: Option<Limit>,
        /// Which automatic snapshots (moves', replication's) to keep, such as
        /// `last=3,hourly=24,daily=7` (the default; `default` sets it back). The newest
        /// snapshot and each replica's base are always kept, and snapshots you took are kept
        /// until `dataset snapshot rm`.
        #[arg(long)]
        keep: Option<String>,
        /// Copies to keep on other nodes for failover (0: none). A dead primary's apps start
        /// on the replica holding the newest snapshot.
        #[arg(long)]
        replicas: Option<u32>,
        /// How often the primary snapshots and pushes to its replicas, such as 2s or 500ms:
        /// a failover loses at most about this much.
        #[arg(long)]
        interval: Option<String>,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Destroy a dataset on every node that holds it; the name is free again at once.
    Rm {
        /// The dataset (`flockctl dataset ls` lists them).
        name: String,
        /// Seconds to wait for every holder to confirm.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
    /// Forget the Docker containers' mounts of a dataset, when they are gone without
    /// unmounting (their node died): the dataset may move again. Only with --force, and only
    /// once those containers are known to be stopped.
    Unmount {
        /// The dataset (`flockctl dataset ls` lists them).
        name: String,
        /// Only the mounts on this node (name or id).
        #[arg(long)]
        node: Option<String>,
        /// Yes: the containers are gone.
        #[arg(long)]
        force: bool,
    },
    /// Give up the diverged copy a failover left on a node: the writes only that copy holds
    /// (made after the last snapshot that reached the new primary) are dropped, and the node
    /// becomes a replica again. Copy out what you need first; only with --force.
    DropDiverged {
        /// The dataset (`flockctl dataset ls` lists them).
        name: String,
        /// The node holding the diverged copy (name or id).
        #[arg(long)]
        node: String,
        /// Yes: drop its diverged writes.
        #[arg(long)]
        force: bool,
    },
    /// Move a dataset (one no application uses) to another node, with its snapshots.
    Move {
        /// The dataset (`flockctl dataset ls` lists them).
        name: String,
        /// The node to move it to (name or id).
        #[arg(long, required_unless_present = "cancel", conflicts_with = "cancel")]
        to: Option<String>,
        /// Give up the move in progress; the dataset stays where it is.
        #[arg(long)]
        cancel: bool,
        /// Return once the move is recorded; follow it with `flockctl dataset ls NAME`.
        #[arg(long)]
        no_wait: bool,
        /// Progress as JSON lines on stdout.
        #[arg(long)]
        json: bool,
    },
}

fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "name": s.name, "guid": s.guid, "created": created(s.created_unix),
        "created_unix": s.created_unix, "epoch": s.epoch,
    })
}

/// A snapshot's creation time for people: RFC 3339 in UTC, to the second.
fn created(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn transfer_json(t: &Transfer) -> Value {
    json!({
        "dataset": t.dataset, "to": t.to_node, "phase": t.phase, "bytes": t.bytes,
        "total": (t.total > 0).then_some(t.total), "bytes_per_sec": t.bytes_per_sec,
        "last_error": (!t.last_error.is_empty()).then_some(&t.last_error),
        "kind": (!t.kind.is_empty()).then_some(&t.kind),
        "attempt": (t.attempt > 0).then_some(t.attempt),
        "retry_in_ms": t.retry_in_ms,
        "eta_secs": t.eta_secs,
        "degraded": (!t.degraded.is_empty()).then_some(&t.degraded),
    })
}

/// `flockctl dataset snapshot ...`.
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Remove a recorded snapshot from every holder. The newest, and each replica's base, are
    /// refused: they are what the next pushes start from.
    Rm {
        /// The dataset (`flockctl dataset ls` lists them).
        name: String,
        /// The snapshot to go back to (`flockctl dataset snapshots NAME` lists them).
        snapshot: String,
    },
}

/// A size limit on the command line: a size, or none.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    Bytes(u64),
    Unlimited,
}

fn parse_limit(s: &str) -> Result<Limit, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Limit::Unlimited);
    }
    parse_size(s).map(Limit::Bytes).map_err(|e| e.to_string())
}

/// What `dataset ls` says under its table: failing pushes, copies over their limit, holds,
/// and file systems where each snapshot costs a copy.
fn dataset_problems(ds: &[Dataset]) -> Vec<String> {
    let mut out = Vec::new();
    for d in ds {
        if !d.hold.is_empty() {
            out.push(format!("{}: apps held stopped ({})", d.name, d.hold));
        }
        for h in &d.holders {
            if let Some(over) = over_limit(d, h) {
                out.push(format!(
                    "{}: OVER ITS LIMIT on {}: its data takes {}, {} over its limit of {} (the dir backend cannot enforce limits). Free space in it, or raise the limit with `flockctl dataset set {} --size SIZE`",
                    d.name,
                    h.node_name,
                    human(h.referenced_bytes),
                    human(over),
                    d.size_limit.map_or_else(String::new, human),
                    d.name
                ));
            }
            if h.space_sharing == "copy" && !d.snapshots.is_empty() {
                out.push(format!(
                    "{}: on {} each snapshot costs a copy of what changed (no reflinks on this file system; XFS or btrfs share them)",
                    d.name, h.node_name
                ));
            }
        }
        out.extend(
            d.transfers
                .iter()
                .filter_map(|t| progress::push_problem(t).map(|p| format!("{}: {p}", d.name))),
        );
    }
    out
}

/// Bytes holder `h`'s live data of `d` holds over the dataset's limit, if it is over.
fn over_limit(d: &Dataset, h: &Holder) -> Option<u64> {
    let limit = d.size_limit?;
    (h.state == "ready")
        .then(|| h.referenced_bytes.checked_sub(limit))
        .flatten()
        .filter(|&o| o > 0)
}

fn dataset_json(d: &Dataset) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "size_limit": d.size_limit,
        "primary": d.primary_name,
        "epoch": d.epoch,
        "replicas": d.replicas,
        "moving_to": (!d.moving_to.is_empty()).then_some(&d.moving_to),
        "snapshots": d.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
        "holders": d.holders.iter().map(|h| json!({
            "node": h.node_name, "role": h.role, "state": h.state, "used_bytes": h.used_bytes,
            "referenced_bytes": h.referenced_bytes, "over_limit_bytes": over_limit(d, h),
            "snapshot_count": h.snapshot_count,
            "space_sharing": (!h.space_sharing.is_empty()).then_some(&h.space_sharing),
            "latest_snapshot": (!h.latest_snapshot.is_empty()).then_some(&h.latest_snapshot),
            "mount_path": (!h.mount_path.is_empty()).then_some(&h.mount_path),
            "error": (!h.error.is_empty()).then_some(&h.error),
        })).collect::<Vec<_>>(),
        "transfers": d.transfers.iter().map(transfer_json).collect::<Vec<_>>(),
        "mounts": d.mounts.iter().map(|m| json!({"node": m.node, "id": m.id})).collect::<Vec<_>>(),
        "retention": d.retention,
        "hold": (!d.hold.is_empty()).then_some(&d.hold),
        "bases": d.bases,
        "replicas_wanted": d.replicas_wanted,
        "snapshot_interval_ms": (d.replicas_wanted > 0).then_some(d.snapshot_interval_ms),
        "replica_lag_ms": d.replica_lag_ms,
        "replica_lag_bytes": d.replicas.iter().map(|r| (r.clone(), lag_bytes(d, r))).collect::<serde_json::Map<_, _>>(),
        "diverged": d.diverged,
        "kept": d.kept.iter().map(|k| json!({"snapshot": k.name, "node": k.node})).collect::<Vec<_>>(),
    })
}

/// How many bytes replica `node` lacks of the snapshots taken: none when it holds the newest,
/// else what the push under way to it has still to send (its stream's estimated total less
/// what went); `null` when no push to it is under way or its size is unknown. Writes since the
/// newest snapshot are not counted (they are in no snapshot yet).
fn lag_bytes(d: &Dataset, node: &str) -> Value {
    let newest = d.snapshots.last().map(|s| s.name.as_str());
    if newest.is_some() && d.bases.get(node).map(String::as_str) == newest {
        return json!(0);
    }
    d.transfers
        .iter()
        .find(|t| {
            t.to_node == node && t.total > 0 && matches!(t.phase.as_str(), "full" | "incremental")
        })
        .map_or(Value::Null, |t| json!(t.total.saturating_sub(t.bytes)))
}

/// "2 replicas every 2.0s" or "no replicas asked for".
fn replication_text(d: &Dataset) -> String {
    if d.replicas_wanted == 0 {
        return "no replicas asked for".into();
    }
    format!(
        "{} replica(s) every {:.1}s",
        d.replicas_wanted,
        d.snapshot_interval_ms as f64 / 1000.0
    )
}

fn datasets_table(ds: &[Dataset]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "PRIMARY".into(),
        "EPOCH".into(),
        "DATA".into(),
        "DISK".into(),
        "LIMIT".into(),
        "KEEP".into(),
        "SNAPSHOTS".into(),
        "HOLDERS".into(),
    ]];
    for d in ds {
        let primary = d
            .holders
            .iter()
            .find(|h| h.role == "primary" && h.state == "ready");
        let data = primary.map_or_else(|| "-".to_string(), |h| human(h.referenced_bytes));
        let used = primary.map_or_else(|| "-".to_string(), |h| human(h.used_bytes));
        let mut limit = d.size_limit.map_or_else(|| "none".into(), human);
        if d.holders.iter().any(|h| over_limit(d, h).is_some()) {
            limit.push_str(" OVER");
        }
        let snaps = match d.snapshots.last() {
            Some(s) => format!("{} (latest {})", d.snapshots.len(), s.name),
            None => "0".into(),
        };
        let mut holders: Vec<String> = d
            .holders
            .iter()
            .map(|h| format!("{}:{}:{}", h.node_name, h.role, h.state))
            .collect();
        if !d.moving_to.is_empty() {
            holders.push(format!("moving to {}", d.moving_to));
        }
        for (node, lag) in &d.replica_lag_ms {
            let bytes = match lag_bytes(d, node).as_u64() {
                Some(b) => format!(", {}", human(b)),
                None => String::new(),
            };
            holders.push(format!("{node} lag {:.1}s{bytes}", *lag as f64 / 1000.0));
        }
        if d.replicas_wanted > 0 {
            holders.push(format!("({})", replication_text(d)));
        }
        for node in &d.diverged {
            holders.push(format!(
                "{node}: diverged copy, untouched until it is set aside"
            ));
        }
        for k in &d.kept {
            holders.push(format!("{}: keeps {}", k.node, k.name));
        }
        if let Some(m) = d.mounts.first() {
            let n = d.mounts.iter().filter(|x| x.node == m.node).count();
            holders.push(format!("mounted by {n} container(s) on {}", m.node));
        }
        rows.push([
            d.name.clone(),
            d.primary_name.clone(),
            d.epoch.to_string(),
            data,
            used,
            limit,
            d.retention.clone(),
            snaps,
            holders.join(" "),
        ]);
    }
    table(&rows)
}

pub(super) async fn get(api: &mut ApiClient<Channel>, name: &str) -> anyhow::Result<Dataset> {
    get_as(api, name, false).await
}

/// The dataset named `name`; with `desired_only`, its desired state alone (no node is asked
/// for its copies or transfers: cheap enough to ask often).
async fn get_as(
    api: &mut ApiClient<Channel>,
    name: &str,
    desired_only: bool,
) -> anyhow::Result<Dataset> {
    api.dataset_list(DatasetListRequest {
        name: name.to_string(),
        desired_only,
    })
    .await
    .map_err(status_err)?
    .into_inner()
    .datasets
    .pop()
    .ok_or_else(|| NotFound(format!("no dataset named {}", flock_scheduler::shown(name))).into())
}

/// Runs one `flockctl dataset` command.
pub async fn run(api: &mut ApiClient<Channel>, cmd: DatasetCmd) -> anyhow::Result<i32> {
    match cmd {
        DatasetCmd::DropDiverged { name, node, force } => {
            if !force {
                eprintln!(
                    "flockctl: node {node}'s copy of {name} holds the writes made there after the last \
                     snapshot that reached the new primary; this drops them and makes {node} a replica \
                     again. Copy out what you need (the copy is in {node}'s data dir), then run it again \
                     with --force"
                );
                return Ok(2);
            }
            api.dataset_drop_diverged(DatasetDropDivergedRequest {
                name: name.clone(),
                node: node.clone(),
            })
            .await
            .map_err(status_err)?;
            println!(
                "{node}'s diverged copy of {name} is given up: {node} becomes a replica again"
            );
        }
        DatasetCmd::Unmount { name, node, force } => {
            if !force {
                eprintln!(
                    "flockctl: this forgets the Docker containers' mounts of {name}, as if they had unmounted it; \
                     a container still running would then share it with the next node that mounts it. \
                     Once they are gone (their node died or was wiped), run it again with --force"
                );
                return Ok(2);
            }
            let r = api
                .dataset_unmount(DatasetUnmountRequest {
                    name: name.clone(),
                    node: node.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("forgot {} mount(s) of {name}", r.dropped);
        }
        DatasetCmd::Create {
            name,
            node,
            size,
            json,
        } => {
            let d = api
                .dataset_create(DatasetCreateRequest {
                    name: name.clone(),
                    node: node.unwrap_or_default(),
                    size_limit: size,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .dataset
                .ok_or_else(|| anyhow::anyhow!("the node returned no dataset"))?;
            if json {
                print_json(&dataset_json(&d))?;
            } else {
                println!(
                    "created dataset {} on {}{}",
                    d.name,
                    d.primary_name,
                    d.size_limit
                        .map(|l| format!(" (limit {})", human(l)))
                        .unwrap_or_default()
                );
            }
        }
        DatasetCmd::Ls { name, json } => {
            let ds = api
                .dataset_list(DatasetListRequest {
                    name: name.unwrap_or_default(),
                    desired_only: false,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .datasets;
            if json {
                print_json(&Value::Array(ds.iter().map(dataset_json).collect()))?;
            } else {
                print!("{}", datasets_table(&ds));
                for p in dataset_problems(&ds) {
                    println!("{p}");
                }
            }
        }
        DatasetCmd::Snapshot {
            action: Some(SnapshotCmd::Rm { name, snapshot }),
            ..
        } => {
            api.dataset_snapshot_remove(DatasetSnapshotRemoveRequest {
                name: name.clone(),
                snapshot: snapshot.clone(),
            })
            .await
            .map_err(status_err)?;
            println!("removed snapshot {name}@{snapshot}; every holder destroys its copy");
        }
        DatasetCmd::Snapshot {
            action: None,
            name,
            tag,
            json,
        } => {
            let name = name.unwrap_or_default();
            let s = api
                .dataset_snapshot(DatasetSnapshotRequest {
                    name: name.clone(),
                    tag: tag.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .snapshot
                .ok_or_else(|| anyhow::anyhow!("the node returned no snapshot"))?;
            if json {
                print_json(&snapshot_json(&s))?;
            } else {
                println!("{name}@{}", s.name);
            }
        }
        DatasetCmd::Snapshots { name, json } => {
            let d = api
                .dataset_list(DatasetListRequest {
                    name,
                    desired_only: true,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .datasets
                .pop()
                .ok_or_else(|| anyhow::anyhow!("the node returned no dataset"))?;
            if json {
                let kept = d.kept.iter().map(
                    |k| serde_json::json!({"name": k.name, "kept_on": k.node, "diverged": true}),
                );
                print_json(&Value::Array(
                    d.snapshots.iter().map(snapshot_json).chain(kept).collect(),
                ))?;
            } else {
                let mut rows = vec![[
                    "NAME".to_string(),
                    "CREATED".into(),
                    "EPOCH".into(),
                    "WHERE".into(),
                ]];
                for s in &d.snapshots {
                    rows.push([
                        s.name.clone(),
                        created(s.created_unix),
                        s.epoch.to_string(),
                        "history".into(),
                    ]);
                }
                for k in &d.kept {
                    rows.push([
                        k.name.clone(),
                        "-".into(),
                        "-".into(),
                        format!("{}: diverged writes, kept (not on the primary)", k.node),
                    ]);
                }
                print!("{}", table(&rows));
            }
        }
        DatasetCmd::Rollback {
            name,
            snapshot,
            stop_app,
            json,
        } => {
            if stop_app && !json {
                eprintln!("stopping the apps of {name} for the rollback...");
            }
            let r = api
                .dataset_rollback(DatasetRollbackRequest {
                    name: name.clone(),
                    snapshot: snapshot.clone(),
                    stop_app,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                print_json(&json!({
                    "dataset": name,
                    "snapshot": snapshot,
                    "kept": r.kept,
                    "stopped_apps": r.stopped_apps,
                }))?;
            } else {
                println!("rolled {name} back to {snapshot}");
                if !r.kept.is_empty() {
                    let stop = if r.stopped_apps.is_empty() {
                        ""
                    } else {
                        " --stop-app"
                    };
                    println!(
                        "its state before is kept as snapshot {}: `flockctl dataset rollback {name} {}{stop}` undoes this",
                        r.kept, r.kept
                    );
                }
                if !r.stopped_apps.is_empty() {
                    println!(
                        "stopped {} for the rollback; they start again now",
                        r.stopped_apps.join(", ")
                    );
                }
                if r.dropped > 0 {
                    println!("{} later snapshot(s) destroyed", r.dropped);
                }
            }
        }
        DatasetCmd::Set {
            name,
            size,
            keep,
            replicas,
            interval,
            json,
        } => {
            let d = api
                .dataset_set(DatasetSetRequest {
                    name: name.clone(),
                    size_limit: match size {
                        Some(Limit::Bytes(b)) => Some(b),
                        _ => None,
                    },
                    clear_limit: matches!(size, Some(Limit::Unlimited)),
                    retention: keep.unwrap_or_default(),
                    replicas,
                    snapshot_interval: interval.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .dataset
                .ok_or_else(|| anyhow::anyhow!("the node returned no dataset"))?;
            if json {
                print_json(&dataset_json(&d))?;
            } else {
                println!(
                    "{name}: limit {}, keeps {}, {}",
                    d.size_limit.map_or_else(|| "none".into(), human),
                    d.retention,
                    replication_text(&d)
                );
            }
        }
        DatasetCmd::Rm { name, wait } => {
            let r = api
                .dataset_remove(DatasetRemoveRequest {
                    name: name.clone(),
                    wait_ms: wait.max(1) * 1000,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if r.pending.is_empty() {
                println!("removed dataset {name}");
            } else {
                println!(
                    "removed dataset {name}; {} did not confirm yet and will destroy their copy when they can",
                    r.pending.join(", ")
                );
            }
        }
        DatasetCmd::Move {
            name,
            to,
            cancel,
            no_wait,
            json,
        } => {
            let r = api
                .dataset_move(DatasetMoveRequest {
                    name: name.clone(),
                    to: to.clone().unwrap_or_default(),
                    cancel,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if cancel {
                println!("cancelled the move of {name}; it stays on its primary");
                return Ok(0);
            }
            let d = r
                .dataset
                .ok_or_else(|| anyhow::anyhow!("the node returned no dataset"))?;
            if no_wait {
                if json {
                    print_json(&dataset_json(&d))?;
                } else {
                    println!(
                        "moving {name} to {}; follow it with `flockctl dataset ls {name}`",
                        d.moving_to
                    );
                }
                return Ok(0);
            }
            let to = to.unwrap_or_default();
            // The target's name (the user may have given its id); a quick move may be over.
            let target = if !d.moving_to.is_empty() {
                d.moving_to.clone()
            } else if d.primary_id.to_string() == to {
                d.primary_name.clone()
            } else {
                to
            };
            return follow_move(api, &name, &target, json).await;
        }
    }
    Ok(0)
}

/// Waits for a move to end, showing its progress.
pub async fn follow_move(
    api: &mut ApiClient<Channel>,
    name: &str,
    to: &str,
    json: bool,
) -> anyhow::Result<i32> {
    let started = Instant::now();
    // A bar only while a stream of known size runs; otherwise the words and the counts.
    let with_bar = indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:30}] {msg}")
        .expect("valid template")
        .progress_chars("=> ");
    let without_bar =
        indicatif::ProgressStyle::with_template("{prefix:>12} {msg}").expect("valid template");
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(without_bar.clone());
        b
    });
    let mut shown_bar = false;
    let mut last_line = (Instant::now() - Duration::from_secs(10), String::new());
    let mut last_error = String::new();
    // Reports of an earlier attempt or an earlier move are never shown as this one's.
    let mut follow = Follow::new();
    // The progress (every node's report) every PROGRESS_EVERY, whether the move ended (the
    // desired state alone) every ENDED_POLL: the end is seen within 50 ms, not 200.
    const ENDED_POLL: Duration = Duration::from_millis(50);
    const PROGRESS_EVERY: u32 = 4;
    let mut polls: u32 = 0;
    loop {
        let full = polls.is_multiple_of(PROGRESS_EVERY);
        polls = polls.wrapping_add(1);
        let mut d = get_as(api, name, !full).await?;
        if !full && d.moving_to.is_empty() && d.primary_name != to {
            // Ended without reaching `to`: the reports say why.
            d = get(api, name).await?;
        }
        let t = d
            .transfers
            .iter()
            .find(|t| t.to_node == to && follow.current(t, started.elapsed()));
        if let Some(t) = t {
            if !t.last_error.is_empty() {
                last_error = t.last_error.clone();
            }
            let line = progress::line(t);
            if json {
                println!(
                    "{}",
                    json!({"event": "progress", "phase": t.phase, "bytes": t.bytes,
                        "total": (t.total > 0).then_some(t.total), "bytes_per_sec": t.bytes_per_sec,
                        "eta_secs": t.eta_secs, "attempt": (t.attempt > 0).then_some(t.attempt),
                        "retry_in_ms": t.retry_in_ms,
                        "last_error": (!t.last_error.is_empty()).then_some(&t.last_error)})
                );
            } else if let Some(b) = &bar {
                b.set_prefix(line.words.clone());
                if line.bar.is_some() != shown_bar {
                    shown_bar = line.bar.is_some();
                    b.set_style(if shown_bar {
                        with_bar.clone()
                    } else {
                        without_bar.clone()
                    });
                }
                if let Some((pos, len)) = line.bar {
                    b.set_length(len);
                    b.set_position(pos);
                }
                b.set_message(line.detail.clone());
            } else {
                // Every new phase at once; the counts every 2 s.
                if last_line.0.elapsed() >= Duration::from_secs(2) || line.words != last_line.1 {
                    if line.detail.is_empty() {
                        eprintln!("flockctl: {name}: {}", line.words);
                    } else {
                        eprintln!("flockctl: {name}: {}: {}", line.words, line.detail);
                    }
                    last_line = (Instant::now(), line.words);
                }
            }
        }
        if d.moving_to.is_empty() {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let secs = started.elapsed().as_secs_f64();
            if d.primary_name == to {
                if json {
                    println!(
                        "{}",
                        json!({"event": "done", "dataset": name, "primary": to, "epoch": d.epoch, "seconds": secs})
                    );
                } else {
                    println!("moved {name} to {to} (epoch {}) in {secs:.1}s", d.epoch);
                }
                return Ok(0);
            }
            let why = if last_error.is_empty() {
                "the move was cancelled".to_string()
            } else {
                last_error
            };
            if json {
                println!(
                    "{}",
                    json!({"event": "failed", "dataset": name, "primary": d.primary_name, "error": why})
                );
            }
            anyhow::bail!(
                "{name} did not move to {to}: {why}; it stays on {}",
                d.primary_name
            );
        }
        tokio::time::sleep(ENDED_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_ls_names_each_failing_push() {
        let push = |to: &str, kind: &str, phase: &str, error: &str| Transfer {
            to_node: to.into(),
            kind: kind.into(),
            phase: phase.into(),
            attempt: 4,
            retry_in_ms: Some(120_000),
            last_error: error.into(),
            ..Default::default()
        };
        let mut full = push("n3", "replica", "retrying", "no space");
        full.degraded = "no space".into();
        let ds = vec![
            Dataset {
                name: "db".into(),
                transfers: vec![
                    push("n2", "replica", "retrying", "connection refused"),
                    full,
                    push("n4", "replica", "full", ""),
                ],
                ..Default::default()
            },
            Dataset {
                name: "logs".into(),
                ..Default::default()
            },
        ];
        assert_eq!(
            dataset_problems(&ds),
            [
                "db: push to n2 failed (attempt 4, retry in 2m): connection refused",
                "db: replica n3 degraded (retry in 2m): no space",
            ]
        );
    }
}
