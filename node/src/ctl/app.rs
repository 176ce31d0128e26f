//! `flockctl deploy` and `flockctl app ...`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};
use tonic::transport::Channel;

use flock_proto::v1::api_client::ApiClient;
use flock_proto::v1::*;
use flock_scheduler::config::{self, NodeRef};
use flock_scheduler::limits;

use super::dataset::follow_move;
use super::output::{print_json, status_err, table};

#[derive(Subcommand, Debug)]
pub enum AppCmd {
    /// List the deployed apps: node, state, restarts, ports, dataset.
    Ls {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
        /// Only the apps of this stack.
        #[arg(long, value_name = "STACK")]
        stack: Option<String>,
    },
    /// Everything about one app, with its last output lines when it failed.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an app from the deployment (its dataset stays; `flockctl dataset rm` removes it).
    Rm { name: String },
    /// Move an app to another node with its data: the data is copied while the app runs,
    /// then the app stops for the last delta only and starts on the target.
    Move {
        name: String,
        /// The target node (name or id).
        #[arg(long, required_unless_present = "cancel")]
        to: Option<String>,
        /// Give up a move that has not committed: the app stays on (or returns to) its source.
        #[arg(long, conflicts_with_all = ["to", "no_wait"])]
        cancel: bool,
        /// Return once the move is recorded; `flockctl app ls` shows its progress.
        #[arg(long)]
        no_wait: bool,
        /// Progress events as JSON lines, then a final "done" or "failed" event.
        #[arg(long)]
        json: bool,
    },
    /// Print an app's output (stdout and stderr), from the node that runs it.
    Logs {
        name: String,
        /// Lines from the end.
        #[arg(long, default_value_t = 100)]
        tail: u32,
        /// Keep printing new output until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
}

/// Reads a config file: refused before reading when it is larger than
/// [`limits::MAX_CONFIG_FILE_BYTES`] (and never read past that, should it grow meanwhile).
fn read(path: &Path) -> anyhow::Result<(String, String)> {
    use std::io::Read;
    let cannot = |e: std::io::Error| anyhow::anyhow!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot)?;
    let len = file.metadata().map_err(cannot)?.len();
    config::check_file_size(&path.display().to_string(), len)?;
    let mut bytes = Vec::new();
    file.take(limits::MAX_CONFIG_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    config::check_file_size(&path.display().to_string(), bytes.len() as u64)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok((name, text))
}

/// The request that deploys `plan`: its apps, and apart from them (their specs' layout is in
/// the Raft log) the policies of their volumes.
fn deploy_request(
    plan: &config::Plan,
    dry_run: bool,
    stack: Option<&str>,
) -> anyhow::Result<DeployRequest> {
    Ok(DeployRequest {
        plan_json: serde_json::to_string(&plan.apps)?,
        dry_run,
        volumes_json: serde_json::to_string(&plan.volumes)?,
        stack: stack.unwrap_or_default().to_string(),
        secrets: Default::default(),
        problems_in_reply: true,
    })
}

/// How `flockctl deploy` reads its files.
pub struct DeployArgs<'a> {
    pub files: &'a [PathBuf],
    pub dry_run: bool,
    pub json: bool,
    pub env_file: Option<&'a Path>,
    /// `-p`: the stack's name.
    pub project: Option<&'a str>,
}

/// The name of the directory a file is in (its absolute path's parent), for the stack's name.
fn dir_name(file: &Path) -> Option<String> {
    let abs = std::path::absolute(file).ok()?;
    Some(abs.parent()?.file_name()?.to_string_lossy().into_owned())
}

/// The variables a compose file `file` may use: `env_file`'s, else those of `.env` beside
/// it if there is one, with the environment's over them (as compose reads them).
fn compose_vars(file: &Path, env_file: Option<&Path>) -> anyhow::Result<config::interpolate::Vars> {
    let beside = file
        .parent()
        .map(|d| d.join(".env"))
        .filter(|p| p.is_file());
    let mut vars = match env_file.map(Path::to_path_buf).or(beside) {
        Some(p) => {
            let (name, text) = read(&p)?;
            config::interpolate::parse_env_file(&text)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
        }
        None => config::interpolate::Vars::new(),
    };
    vars.extend(std::env::vars());
    Ok(vars)
}

/// `flockctl deploy DEPLOYMENT APPLICATION` or `flockctl deploy COMPOSE_FILE`.
pub async fn deploy(api: &mut ApiClient<Channel>, args: DeployArgs<'_>) -> anyhow::Result<i32> {
    let DeployArgs {
        files,
        dry_run,
        json: json_out,
        env_file,
        project,
    } = args;
    let mut warnings = Vec::new();
    let mut stack = None;
    let plan = match files {
        [app] => {
            let (name, text) = read(app)?;
            let vars = compose_vars(app, env_file)?;
            let (apps, w) = config::parse_application_with(&name, &text, Some(&vars))?;
            warnings.extend(w);
            // A compose or fig file is a stack; Flocker's application.yml alone is the
            // configuration outside stacks, as with its deployment.yml.
            let apps = if apps.format == config::Format::Flocker {
                if project.is_some() {
                    anyhow::bail!(
                        "{name} is Flocker's application.yml, which deploys outside stacks: -p is for compose files"
                    );
                }
                apps
            } else {
                let p = config::stack::project_name(project, &apps, dir_name(app).as_deref())
                    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                let apps = config::stack::into_stack(apps, &p)?;
                stack = Some(p);
                apps
            };
            config::resolve_unpinned(&apps)?
        }
        [deployment, app] => {
            let (dname, dtext) = read(deployment)?;
            let (aname, atext) = read(app)?;
            let dep = config::parse_deployment(&dname, &dtext)?;
            let vars = compose_vars(app, env_file)?;
            let (apps, w) = config::parse_application_with(&aname, &atext, Some(&vars))?;
            warnings.extend(w);
            let members = api
                .status(StatusRequest { local: false })
                .await
                .map_err(status_err)?
                .into_inner()
                .members;
            let nodes: Vec<NodeRef> = members
                .iter()
                .map(|m| NodeRef {
                    id: m.id,
                    name: m.name.clone(),
                    addr: m.addr.clone(),
                })
                .collect();
            config::resolve(&apps, &dep, &nodes)?
        }
        _ => anyhow::bail!(
            "give DEPLOYMENT APPLICATION (Flocker's deployment.yml and application.yml), or one compose file"
        ),
    };
    if files.len() == 2 && project.is_some() {
        anyhow::bail!(
            "Flocker's two files deploy the configuration outside stacks: -p is for a compose file"
        );
    }
    let r = api
        .deploy(deploy_request(&plan, dry_run, stack.as_deref())?)
        .await
        .map_err(status_err)?
        .into_inner();
    warnings.extend(r.warnings.iter().cloned());
    if !r.problems.is_empty() {
        if json_out {
            print_json(
                &json!({"dry_run": dry_run, "stack": stack, "deployed": false,
                "problems": r.problems, "warnings": warnings}),
            )?;
        } else {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            eprintln!(
                "error: nothing was deployed: {} problem(s):",
                r.problems.len()
            );
            for p in &r.problems {
                eprintln!("  {p}");
            }
        }
        return Ok(1);
    }
    if json_out {
        let changes: Vec<Value> = r
            .changes
            .iter()
            .map(|c| {
                json!({"kind": c.kind, "app": c.app, "node": c.node,
                "from": (!c.from_node.is_empty()).then_some(&c.from_node)})
            })
            .collect();
        print_json(
            &json!({"dry_run": dry_run, "stack": stack, "generation": r.generation,
            "changes": changes, "warnings": warnings, "problems": []}),
        )?;
        return Ok(0);
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let verb = if dry_run { "would " } else { "" };
    if let Some(s) = &stack {
        println!("stack {s}:");
    }
    if r.changes.is_empty() {
        println!("no changes: the cluster already runs this configuration");
    }
    for c in &r.changes {
        match c.kind.as_str() {
            "move" => println!("{verb}move {} from {} to {}", c.app, c.from_node, c.node),
            kind => println!("{verb}{kind} {} on {}", c.app, c.node),
        }
    }
    Ok(0)
}

fn app_json(a: &AppStatus) -> Value {
    json!({
        "name": a.name, "node": a.node, "state": a.state, "restarts": a.restarts,
        "last_exit_code": a.last_exit_code, "last_signal": a.last_signal,
        "image": (!a.image.is_empty()).then_some(&a.image),
        "command": (!a.command.is_empty()).then_some(&a.command),
        "ports": a.ports, "dataset": (!a.dataset.is_empty()).then_some(&a.dataset),
        "restart_policy": a.restart_policy, "driver": a.driver, "id": a.id,
        "detail": (!a.detail.is_empty()).then_some(&a.detail), "last_lines": a.last_lines,
        "moving_to": (!a.moving_to.is_empty()).then_some(&a.moving_to),
        "endpoints": a.endpoints, "mesh_problems": a.mesh_problems,
        "stack": (!a.stack.is_empty()).then_some(&a.stack),
        "service": a.service, "service_ip": (!a.service_ip.is_empty()).then_some(&a.service_ip),
    })
}

/// The ENDPOINTS cell: every address on a small cluster, the first few and a count on a big one.
fn endpoints_cell(a: &AppStatus) -> String {
    const SHOWN: usize = 3;
    let mut cell = a
        .endpoints
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if a.endpoints.len() > SHOWN {
        cell.push_str(&format!(" +{} more", a.endpoints.len() - SHOWN));
    }
    cell
}

/// The DETAIL cell: the app's detail, then what keeps nodes from serving its ports.
fn detail_cell(a: &AppStatus) -> String {
    let mut parts = Vec::new();
    if !a.detail.is_empty() {
        parts.push(a.detail.clone());
    }
    if !a.mesh_problems.is_empty() {
        parts.push(format!("mesh: {}", a.mesh_problems.join("; ")));
    }
    parts.join("; ")
}

/// Runs one `flockctl app` command.
pub async fn run(api: &mut ApiClient<Channel>, cmd: AppCmd) -> anyhow::Result<i32> {
    match cmd {
        AppCmd::Ls { json, stack } => {
            let mut r = api
                .app_list(AppListRequest::default())
                .await
                .map_err(status_err)?
                .into_inner();
            if let Some(s) = &stack {
                r.apps.retain(|a| a.stack == *s);
                if r.apps.is_empty() {
                    return Err(super::output::NotFound(format!(
                        "no stack named {} (`flockctl stack ls` lists them)",
                        limits::shown(s)
                    ))
                    .into());
                }
            }
            if json {
                print_json(&r.apps.iter().map(app_json).collect::<Vec<_>>())?;
                return Ok(0);
            }
            let mut rows = vec![[
                "NAME".to_string(),
                "NODE".into(),
                "STATE".into(),
                "RESTARTS".into(),
                "PORTS".into(),
                "ENDPOINTS".into(),
                "DATASET".into(),
                "DETAIL".into(),
            ]];
            for a in &r.apps {
                rows.push([
                    a.name.clone(),
                    a.node.clone(),
                    a.state.clone(),
                    a.restarts.to_string(),
                    a.ports.join(","),
                    endpoints_cell(a),
                    a.dataset.clone(),
                    detail_cell(a),
                ]);
            }
            print!("{}", table(&rows));
        }
        AppCmd::Show { name, json } => {
            let r = api
                .app_list(AppListRequest { name })
                .await
                .map_err(status_err)?
                .into_inner();
            let a = r
                .apps
                .first()
                .ok_or_else(|| anyhow::anyhow!("the node returned no app"))?;
            if json {
                print_json(&app_json(a))?;
                return Ok(0);
            }
            println!("name            {}", a.name);
            println!("node            {}", a.node);
            println!("state           {}", a.state);
            if !a.detail.is_empty() {
                println!("detail          {}", a.detail);
            }
            println!("driver          {}", a.driver);
            if !a.image.is_empty() {
                println!("image           {}", a.image);
            }
            if !a.command.is_empty() {
                println!("command         {}", a.command.join(" "));
            }
            println!(
                "restart policy  {} ({} restart(s))",
                a.restart_policy, a.restarts
            );
            if let Some(c) = a.last_exit_code {
                println!("last exit       status {c}");
            }
            if let Some(s) = a.last_signal {
                println!("last exit       signal {s}");
            }
            if !a.ports.is_empty() {
                println!("ports           {}", a.ports.join(", "));
            }
            if !a.endpoints.is_empty() {
                println!("endpoints       {}", a.endpoints.join(", "));
            }
            for p in &a.mesh_problems {
                println!("not served      {p}");
            }
            if !a.dataset.is_empty() {
                println!("dataset         {}", a.dataset);
            }
            if !a.stack.is_empty() {
                println!("stack           {} (service {})", a.stack, a.service);
            }
            if !a.service_ip.is_empty() {
                println!("service address {}", a.service_ip);
            }
            // Its failovers and re-placements, from the cluster's events (an older flockd has
            // none to give).
            if let Ok(r) = api.events(EventsRequest { after: 0 }).await {
                let events: Vec<serde_json::Value> =
                    serde_json::from_str(&r.into_inner().events_json).unwrap_or_default();
                for e in events.iter().filter(|e| {
                    let ev = &e["event"];
                    ev["FailedOver"]["apps"]
                        .as_array()
                        .is_some_and(|apps| apps.iter().any(|x| x == a.name.as_str()))
                        || ev["Replaced"]["app"] == a.name.as_str()
                }) {
                    let at = e["at_unix_ms"].as_u64().unwrap_or(0);
                    let when = humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(at),
                    );
                    println!(
                        "failed over     {when}: {}",
                        e["text"].as_str().unwrap_or("")
                    );
                }
            }
            if !a.last_lines.is_empty() {
                println!("last output:");
                for l in &a.last_lines {
                    println!("  {l}");
                }
            }
        }
        AppCmd::Move {
            name,
            to,
            cancel,
            no_wait,
            json,
        } => {
            let r = api
                .app_move(AppMoveRequest {
                    name: name.clone(),
                    to: to.unwrap_or_default(),
                    cancel,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if cancel {
                println!("cancelled the move of {name}; it stays on {}", r.to_node);
                return Ok(0);
            }
            if r.dataset.is_empty() {
                // Nothing to carry: it stops on the source and starts on the target.
                if json {
                    println!(
                        "{}",
                        json!({"event": "done", "app": name, "from": r.from_node, "to": r.to_node})
                    );
                } else {
                    println!("moved {name} from {} to {}", r.from_node, r.to_node);
                }
                return Ok(0);
            }
            if no_wait {
                println!(
                    "moving {name} from {} to {} with dataset {}; follow it with `flockctl app ls`",
                    r.from_node, r.to_node, r.dataset
                );
                return Ok(0);
            }
            return follow_move(api, &r.dataset, &r.to_node, json).await;
        }
        AppCmd::Rm { name } => {
            let r = api
                .app_remove(AppRemoveRequest { name: name.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            let node = r
                .changes
                .iter()
                .find(|c| c.app == name)
                .map(|c| c.node.clone())
                .unwrap_or_default();
            println!("removed app {name} (stopping on {node}); its dataset, if any, stays");
        }
        AppCmd::Logs { name, tail, follow } => {
            let r = api
                .app_logs(AppLogsRequest {
                    name: name.clone(),
                    tail,
                    since_offset: None,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            for l in &r.lines {
                println!("{l}");
            }
            let mut offset = r.offset;
            if !follow {
                return Ok(0);
            }
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let r = api
                    .app_logs(AppLogsRequest {
                        name: name.clone(),
                        tail,
                        since_offset: Some(offset),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                for l in &r.lines {
                    println!("{l}");
                }
                offset = r.offset;
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use flock_scheduler::config::{PlannedApp, VolumePolicy};
    use flock_scheduler::Retention;

    use super::*;

    /// The request carries the apps as before and, beside them, a policy for every volume: the
    /// file's, or the default (null) when it sets none; apps without a volume have none.
    #[test]
    fn deploy_request_carries_the_volumes_policies() {
        let text = "services:\n  db:\n    image: postgres\n    volumes: [/data]\n    x-flock: {retention: \"last=5,daily=3\"}\n  cache:\n    image: redis\n    volumes: [/data]\n  web:\n    image: nginx\n";
        let apps = config::parse_application("compose.yml", text).unwrap();
        let plan = config::resolve_unpinned(&apps).unwrap();
        let req = deploy_request(&plan, true, None).unwrap();
        assert!(req.dry_run);
        let sent: BTreeMap<String, PlannedApp> = serde_json::from_str(&req.plan_json).unwrap();
        assert_eq!(sent, plan.apps);
        assert_eq!(
            req.volumes_json,
            r#"{"cache":{"retention":null},"db":{"retention":{"last":5,"hourly":24,"daily":3}}}"#
        );
        let volumes: BTreeMap<String, VolumePolicy> =
            serde_json::from_str(&req.volumes_json).unwrap();
        let db = Retention {
            last: 5,
            hourly: 24,
            daily: 3,
        };
        assert_eq!(volumes["db"].retention, Some(db));
        assert_eq!(volumes["cache"].retention, None);
        assert!(!volumes.contains_key("web"));
    }
}

#[derive(Subcommand, Debug)]
pub enum StackCmd {
    /// List the stacks (compose projects deployed with `flockctl deploy FILE`) and their apps.
    Ls {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a stack: its apps stop and its secrets go; its datasets stay (`flockctl dataset
    /// rm` removes them).
    Rm {
        /// The stack's name (`flockctl stack ls`).
        name: String,
    },
}

/// Runs one `flockctl stack` command.
pub async fn stack(api: &mut ApiClient<Channel>, cmd: StackCmd) -> anyhow::Result<i32> {
    let r = api
        .app_list(AppListRequest::default())
        .await
        .map_err(status_err)?
        .into_inner();
    let mut stacks: std::collections::BTreeMap<&str, Vec<&AppStatus>> = Default::default();
    for a in r.apps.iter().filter(|a| !a.stack.is_empty()) {
        stacks.entry(a.stack.as_str()).or_default().push(a);
    }
    match cmd {
        StackCmd::Ls { json } => {
            if json {
                let v: Vec<Value> = stacks
                    .iter()
                    .map(|(s, apps)| {
                        json!({"name": s, "apps": apps.iter().map(|a| &a.name).collect::<Vec<_>>(),
                        "running": apps.iter().filter(|a| a.state == "running").count()})
                    })
                    .collect();
                print_json(&v)?;
                return Ok(0);
            }
            let mut rows = vec![[
                "NAME".to_string(),
                "APPS".into(),
                "RUNNING".into(),
                "SERVICES".into(),
            ]];
            for (s, apps) in &stacks {
                rows.push([
                    s.to_string(),
                    apps.len().to_string(),
                    apps.iter()
                        .filter(|a| a.state == "running")
                        .count()
                        .to_string(),
                    apps.iter()
                        .map(|a| a.service.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                ]);
            }
            print!("{}", table(&rows));
            Ok(0)
        }
        StackCmd::Rm { name } => {
            let Some(apps) = stacks.get(name.as_str()) else {
                return Err(super::output::NotFound(format!(
                    "no stack named {} (`flockctl stack ls` lists them)",
                    limits::shown(&name)
                ))
                .into());
            };
            let count = apps.len();
            let r = api
                .deploy(DeployRequest {
                    plan_json: "{}".into(),
                    dry_run: false,
                    volumes_json: String::new(),
                    stack: name.clone(),
                    secrets: Default::default(),
                    problems_in_reply: true,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if !r.problems.is_empty() {
                anyhow::bail!("stack {name} was not removed: {}", r.problems.join("; "));
            }
            println!("removed stack {name}: {count} app(s) stopped; their datasets stay");
            Ok(0)
        }
    }
}
