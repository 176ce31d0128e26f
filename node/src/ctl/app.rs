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
        /// The app (`flockctl app ls` lists them).
        name: String,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove an app from the deployment (its dataset stays; `flockctl dataset rm` removes it).
    Rm {
        /// The app (`flockctl app ls` lists them).
        name: String,
    },
    /// Run N instances of a stateless app, each on its own node (as many as fit); the mesh
    /// spreads new connections over them. Scaling down stops the last ones gracefully.
    Scale {
        /// The app.
        name: String,
        /// How many instances (at least 1).
        instances: u32,
        /// Say what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move an app to another node with its data: the data is copied while the app runs,
    /// then the app stops for the last delta only and starts on the target.
    Move {
        /// The app (`flockctl app ls` lists them).
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
        /// The app (`flockctl app ls` lists them).
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
    secrets: &std::collections::BTreeMap<String, Vec<u8>>,
) -> anyhow::Result<DeployRequest> {
    Ok(DeployRequest {
        plan_json: serde_json::to_string(&plan.apps)?,
        dry_run,
        volumes_json: serde_json::to_string(&plan.volumes)?,
        stack: stack.unwrap_or_default().to_string(),
        secrets: secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
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
    /// `--profile`: the compose profiles to activate.
    pub profiles: &'a [String],
}

/// Reads a file a compose file names (`env_file`, a secret's `file:`), as written: relative
/// to the compose file's directory `dir`. At most [`limits::MAX_CONFIG_FILE_BYTES`].
fn read_beside(dir: &Path, name: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let path = dir.join(name);
    let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
    let max = limits::MAX_CONFIG_FILE_BYTES as u64;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!(
            "larger than {}",
            flock_scheduler::config::human_size(max)
        ));
    }
    Ok(bytes)
}

/// Parses an application or compose file at `path` (named `name`, with text `text`) with
/// everything beside it: its variables, the files it names, the profiles.
fn parse_file(
    path: &Path,
    name: &str,
    text: &str,
    vars: &config::interpolate::Vars,
    profiles: &[String],
) -> Result<(config::Applications, Vec<config::Warning>), config::Problems> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir_text = dir.to_string_lossy().into_owned();
    let read_file = |f: &str| read_beside(&dir, f);
    let options = config::ParseOptions {
        vars: Some(vars),
        profiles,
        dir: Some(&dir_text),
        read_file: &read_file,
    };
    config::parse_compose(name, text, &options)
}

/// A warning or an error of a file, for `--json`.
fn problem_json(file: &str, line: usize, column: usize, path: &str, message: &str) -> Value {
    json!({"file": file, "line": line, "column": column, "path": path, "message": message})
}

fn warning_json(w: &config::Warning) -> Value {
    problem_json(&w.file, w.line, w.column, &w.path, &w.message)
}

fn error_json(e: &config::ConfigError) -> Value {
    problem_json(&e.file, e.line, e.column, &e.path, &e.message)
}

/// [`refused`] for a file the reader refused: its errors and warnings.
fn refused_file(json_out: bool, dry_run: bool, p: &config::Problems) -> anyhow::Result<i32> {
    let errors: Vec<Value> = p.errors.iter().map(error_json).collect();
    let warnings: Vec<Value> = p.warnings.iter().map(warning_json).collect();
    refused(json_out, dry_run, None, &errors, &warnings)
}

/// Prints why nothing was deployed, every problem and warning (one a line, the warnings
/// first), and returns the exit code, 1. `errors` and `warnings` are the files' (with their
/// positions, as JSON objects) and the cluster's (a message each).
fn refused(
    json_out: bool,
    dry_run: bool,
    stack: Option<&str>,
    errors: &[Value],
    warnings: &[Value],
) -> anyhow::Result<i32> {
    if json_out {
        print_json(
            &json!({"dry_run": dry_run, "stack": stack, "deployed": false,
            "errors": errors, "warnings": warnings,
            "problems": errors.iter().map(shown_problem).collect::<Vec<_>>()}),
        )?;
        return Ok(1);
    }
    for w in warnings {
        eprintln!("warning: {}", shown_problem(w));
    }
    for e in errors {
        eprintln!("error: {}", shown_problem(e));
    }
    eprintln!("{} problem(s); nothing was deployed", errors.len());
    Ok(1)
}

/// A problem as one line: `file:line:col: path: message`, or the message alone.
fn shown_problem(p: &Value) -> String {
    let message = p["message"].as_str().unwrap_or_default();
    let Some(file) = p["file"].as_str() else {
        return message.to_string();
    };
    let path = match p["path"].as_str() {
        Some(path) if !path.is_empty() => format!("{path}: "),
        _ => String::new(),
    };
    format!("{file}:{}:{}: {path}{message}", p["line"], p["column"])
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

/// Whether YAML `text` has `key:` at the top level (a line that starts with it), to tell
/// Flocker's two files apart before parsing them as what they are not.
fn has_top_key(text: &str, key: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
    })
}

/// `flockctl deploy DEPLOYMENT APPLICATION` or `flockctl deploy COMPOSE_FILE`.
pub async fn deploy(api: &mut ApiClient<Channel>, args: DeployArgs<'_>) -> anyhow::Result<i32> {
    let DeployArgs {
        files,
        dry_run,
        json: json_out,
        env_file,
        project,
        profiles,
    } = args;
    let mut warnings: Vec<Value> = Vec::new();
    let mut stack = None;
    let mut secrets = std::collections::BTreeMap::new();
    let plan = match files {
        [app] => {
            let (name, text) = read(app)?;
            if has_top_key(&text, "nodes") && !has_top_key(&text, "applications") {
                anyhow::bail!(
                    "{name} looks like Flocker's deployment.yml (it has nodes:): give its \
                     application.yml after it: flockctl deploy {} APPLICATION",
                    app.display()
                );
            }
            let vars = compose_vars(app, env_file)?;
            let (apps, w) = match parse_file(app, &name, &text, &vars, profiles) {
                Ok(parsed) => parsed,
                Err(p) => return refused_file(json_out, dry_run, &p),
            };
            warnings.extend(w.iter().map(warning_json));
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
            secrets = apps.secrets.clone();
            match config::resolve_unpinned(&apps) {
                Ok(plan) => plan,
                Err(e) => {
                    return refused(json_out, dry_run, stack.as_deref(), &[error_json(&e)], &warnings)
                }
            }
        }
        [deployment, app] => {
            let (dname, dtext) = read(deployment)?;
            let (aname, atext) = read(app)?;
            if has_top_key(&dtext, "applications") && has_top_key(&atext, "nodes") {
                anyhow::bail!(
                    "the files are the wrong way round: {dname} looks like an application.yml \
                     (it has applications:) and {aname} like a deployment.yml (nodes:); put the \
                     deployment first: flockctl deploy {} {}",
                    app.display(),
                    deployment.display()
                );
            }
            let dep = config::parse_deployment(&dname, &dtext)?;
            let vars = compose_vars(app, env_file)?;
            let (apps, w) = match parse_file(app, &aname, &atext, &vars, profiles) {
                Ok(parsed) => parsed,
                Err(p) => return refused_file(json_out, dry_run, &p),
            };
            warnings.extend(w.iter().map(warning_json));
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
        .deploy(deploy_request(&plan, dry_run, stack.as_deref(), &secrets)?)
        .await
        .map_err(status_err)?
        .into_inner();
    warnings.extend(r.warnings.iter().map(|w| json!({"message": w})));
    if !r.problems.is_empty() {
        let errors: Vec<Value> = r.problems.iter().map(|p| json!({"message": p})).collect();
        return refused(json_out, dry_run, stack.as_deref(), &errors, &warnings);
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
        eprintln!("warning: {}", shown_problem(w));
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
        "health": (!a.health.is_empty()).then_some(&a.health),
        "stack": (!a.stack.is_empty()).then_some(&a.stack),
        "service": a.service, "service_ip": (!a.service_ip.is_empty()).then_some(&a.service_ip),
        "instances": a.instances.max(1),
        "instance_list": a.instance_list.iter().map(|i| json!({
            "key": i.key, "node": i.node, "state": i.state, "restarts": i.restarts,
            "detail": (!i.detail.is_empty()).then_some(&i.detail),
            "routed_health": (!i.routed_health.is_empty()).then_some(&i.routed_health),
        })).collect::<Vec<_>>(),
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

/// The NODE cell: the node of each instance of a scaled app.
fn nodes_cell(a: &AppStatus) -> String {
    if a.instance_list.len() > 1 {
        let nodes: Vec<&str> = a.instance_list.iter().map(|i| i.node.as_str()).collect();
        nodes.join(",")
    } else {
        a.node.clone()
    }
}

/// The STATE cell: with instances asked for, how many run of how many.
fn state_cell(a: &AppStatus) -> String {
    if a.instances <= 1 {
        return a.state.clone();
    }
    let running = a
        .instance_list
        .iter()
        .filter(|i| i.state == "running")
        .count();
    format!("{} {running}/{}", a.state, a.instances)
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
                    nodes_cell(a),
                    state_cell(a),
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
            if !a.health.is_empty() {
                println!("health          {}", a.health);
            }
            // What the mesh routes by: each instance's health as the replicated state records
            // it (an instance recorded starting or unhealthy gets no new connection).
            for i in a
                .instance_list
                .iter()
                .filter(|i| !i.routed_health.is_empty())
            {
                let routed = if i.routed_health == "healthy" {
                    "routed"
                } else {
                    "not routed"
                };
                println!(
                    "routing         {} on {}: {} ({routed})",
                    i.key, i.node, i.routed_health
                );
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
            // The app's dataset's epoch before: a move that ends where it began changes none.
            let epoch_before = match api
                .app_list(AppListRequest { name: name.clone() })
                .await
                .map_err(status_err)?
                .into_inner()
                .apps
                .first()
                .map(|a| a.dataset.clone())
                .filter(|d| !d.is_empty())
            {
                Some(ds) => super::dataset::get(api, &ds).await.ok().map(|d| d.epoch),
                None => None,
            };
            let epoch_before = epoch_before.unwrap_or(u64::MAX);
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
            // Asked to go back where its data is while it was moving away: the move is
            // cancelled and it stays; say so rather than report a move that did not happen.
            let d = super::dataset::get(api, &r.dataset).await?;
            if d.moving_to.is_empty() && d.primary_name == r.to_node && d.epoch == epoch_before {
                if json {
                    println!(
                        "{}",
                        json!({"event": "done", "app": name, "to": r.to_node, "cancelled_move": true})
                    );
                } else {
                    println!(
                        "{name} stays on {}, where its data is: the move it was making is cancelled",
                        r.to_node
                    );
                }
                return Ok(0);
            }
            return follow_move(api, &r.dataset, &r.to_node, json).await;
        }
        AppCmd::Scale {
            name,
            instances,
            dry_run,
        } => {
            let r = api
                .app_scale(AppScaleRequest {
                    name: name.clone(),
                    instances,
                    dry_run,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            let a = api
                .app_list(AppListRequest { name: name.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            let placed = a.apps.first().map_or(0, |a| a.instance_list.len());
            let verb = if dry_run { "would run" } else { "runs" };
            if dry_run {
                println!("app {name} {verb} {instances} instance(s)");
            } else if placed < instances as usize {
                println!(
                    "app {name} {verb} {placed} of {instances} instance(s): no other node fits the rest (one per node; `flockctl node ls` shows their room); they are placed at the next deploy or scale"
                );
            } else {
                println!("app {name} {verb} {instances} instance(s)");
            }
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
        let req = deploy_request(&plan, true, None, &BTreeMap::new()).unwrap();
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

    /// flockctl reads the files a compose file names beside it: a secret's content goes in
    /// the request under the stack's name, env_file's values under the service's
    /// environment, a relative read-only bind is made absolute; a missing secret file is an
    /// error naming its line, with the other problems of the file.
    #[test]
    fn files_beside_the_compose_file() {
        let dir = tempfile::tempdir().unwrap();
        let compose = dir.path().join("compose.yml");
        let text = "services:\n  db:\n    image: postgres\n    env_file: db.env\n    secrets: [pw]\n    volumes: [\"./init.sql:/docker-entrypoint-initdb.d/init.sql:ro\"]\nsecrets:\n  pw:\n    file: ./pw.txt\n";
        std::fs::write(&compose, text).unwrap();
        std::fs::write(dir.path().join("db.env"), "A=1\n").unwrap();
        let vars = config::interpolate::Vars::new();
        let p = parse_file(&compose, "compose.yml", text, &vars, &[]).unwrap_err();
        let shown: Vec<String> = p.errors.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 1, "{shown:#?}");
        assert!(
            shown[0].starts_with("compose.yml:9:11: secrets.pw.file: cannot read \"./pw.txt\""),
            "{shown:#?}"
        );
        std::fs::write(dir.path().join("pw.txt"), "s3cret").unwrap();
        let (apps, warnings) = parse_file(&compose, "compose.yml", text, &vars, &[]).unwrap();
        assert!(warnings[0].message.contains("must exist on every node"));
        let apps = config::stack::into_stack(apps, "shop").unwrap();
        let db = &apps.apps["shop_db"];
        assert_eq!(db.environment["A"], "1");
        let abs = std::path::absolute(dir.path()).unwrap();
        assert_eq!(db.binds[0].source, format!("{}/init.sql", abs.display()));
        assert_eq!(db.secrets[0].secret, "shop_pw");
        let plan = config::resolve_unpinned(&apps).unwrap();
        let req = deploy_request(&plan, true, Some("shop"), &apps.secrets).unwrap();
        assert_eq!(req.secrets["shop_pw"], b"s3cret");
    }

    #[test]
    fn problems_print_as_one_line_each() {
        let e = problem_json("c.yml", 3, 5, "services.web", "no");
        assert_eq!(shown_problem(&e), "c.yml:3:5: services.web: no");
        assert_eq!(
            shown_problem(&json!({"message": "app db: no node"})),
            "app db: no node"
        );
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
