//! The test cluster as docker-compose runs it (`docker-compose.test.yml`), driven through the
//! `docker`, `docker-compose`, `nsenter` and `iptables` commands on the host.
//!
//! Network faults are iptables rules in each container's network namespace, entered from the
//! host with `nsenter -t <pid> -n`, so the image needs no tools of its own. Only traffic between
//! nodes is dropped; the harness (on the host, via the bridge's gateway) reaches every node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Service and node name, e.g. `n1`.
    pub name: String,
    pub container: String,
    /// Address on the compose network.
    pub ip: String,
}

impl Node {
    /// The API address the harness uses.
    pub fn api_addr(&self) -> String {
        format!("{}:7801", self.ip)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "cannot run {cmd}: {source}; is it installed? (test.sh installs what the suite needs)"
    )]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{cmd} took longer than {timeout:?}")]
    Timeout { cmd: String, timeout: Duration },
    #[error("{0}")]
    Other(String),
}

/// Runs a command, returning its stdout; fails with its stderr when it exits non-zero.
pub async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<String, DockerError> {
    let cmd = format!("{program} {}", args.join(" "));
    let child = Command::new(program).args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(timeout, child)
        .await
        .map_err(|_| DockerError::Timeout {
            cmd: cmd.clone(),
            timeout,
        })?
        .map_err(|source| DockerError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(DockerError::Failed {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

const SHORT: Duration = Duration::from_secs(30);

/// Runs a setup command that must answer but may be slow on a loaded machine: each try gets a
/// minute, and a try that times out is made again (saying so) for up to four minutes in all.
async fn run_patient(program: &str, args: &[&str]) -> Result<String, DockerError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match run(program, args, Duration::from_secs(60)).await {
            Err(e @ DockerError::Timeout { .. }) if std::time::Instant::now() < deadline => {
                eprintln!("jepsen: {e} (try {attempt}); the engine is slow, asking again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            r => return r,
        }
    }
}

/// Where the engine finds volume plugins by their unix sockets.
const PLUGIN_DIR: &str = "/run/docker/plugins";

/// A compose command that failed or hung may have waited on the engine's volume lookups: the
/// engine asks every volume plugin it ever saw on each lookup by name (compose looks the
/// project's named volumes up), and keeps asking one whose socket vanished until dockerd
/// restarts, for many seconds each time. When a volume listing is slow too, says so, naming
/// the plugin sockets.
async fn with_plugin_hint(r: Result<String, DockerError>) -> Result<String, DockerError> {
    let Err(e) = r else {
        return r;
    };
    if !matches!(e, DockerError::Timeout { .. } | DockerError::Failed { .. }) {
        return Err(e);
    }
    let started = std::time::Instant::now();
    let slow = run("docker", &["volume", "ls", "-q"], Duration::from_secs(5))
        .await
        .is_err()
        || started.elapsed() > Duration::from_secs(3);
    if !slow {
        return Err(e);
    }
    let sockets: Vec<String> = std::fs::read_dir(PLUGIN_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    Err(DockerError::Other(format!(
        "{e}\n(the engine's volume lookups hang: `docker volume ls` took more than 3 s. On each \
         lookup the engine asks every volume plugin it has seen, and it keeps asking one whose \
         socket vanished until dockerd restarts{}; compose cannot work until then. Restart dockerd, then run again.)",
        if sockets.is_empty() {
            String::new()
        } else {
            format!(" (sockets in {PLUGIN_DIR}: {})", sockets.join(" "))
        }
    )))
}

/// The compose project the tests run.
#[derive(Clone, Debug)]
pub struct Compose {
    pub file: PathBuf,
    pub project: String,
}

impl Compose {
    fn args<'a>(&'a self, file: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["-f", file, "-p", self.project.as_str()];
        a.extend_from_slice(rest);
        a
    }

    async fn compose(&self, rest: &[&str], timeout: Duration) -> Result<String, DockerError> {
        let file = self.file.display().to_string();
        run("docker-compose", &self.args(&file, rest), timeout).await
    }

    /// Removes the cluster's containers, network and volumes.
    pub async fn down(&self) -> Result<(), DockerError> {
        let r = self
            .compose(
                &["down", "-v", "--remove-orphans", "-t", "5"],
                Duration::from_secs(120),
            )
            .await;
        with_plugin_hint(r).await.map(|_| ())
    }

    /// Starts a fresh cluster (new containers, so new data dirs).
    pub async fn up(&self) -> Result<(), DockerError> {
        let r = self
            .compose(
                &["up", "-d", "--force-recreate", "--renew-anon-volumes"],
                Duration::from_secs(180),
            )
            .await;
        with_plugin_hint(r).await.map(|_| ())
    }

    /// The services of the compose file (the node names), sorted.
    pub async fn services(&self) -> Result<Vec<String>, DockerError> {
        let out = self
            .compose(&["config", "--services"], Duration::from_secs(60))
            .await?;
        let mut s: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
        s.retain(|l| !l.is_empty());
        s.sort();
        Ok(s)
    }

    /// The running cluster's nodes, with their containers and addresses.
    pub async fn nodes(&self) -> Result<Vec<Node>, DockerError> {
        let mut nodes = Vec::new();
        for name in self.services().await? {
            let container = self.container_of(&name).await?;
            if container.is_empty() {
                return Err(DockerError::Other(format!(
                    "service {name} has no container; is the cluster up? ({})",
                    self.file.display()
                )));
            }
            let ip = run_patient(
                "docker",
                &[
                    "inspect",
                    "-f",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                    &container,
                ],
            )
            .await?;
            let ip = ip.split_whitespace().next().unwrap_or("").to_string();
            if ip.is_empty() {
                return Err(DockerError::Other(format!(
                    "container of {name} has no address on the compose network; give it a static ipv4_address"
                )));
            }
            nodes.push(Node {
                name,
                container,
                ip,
            });
        }
        Ok(nodes)
    }

    /// The id of the service's container, asked of the engine by compose's labels (no
    /// docker-compose call: compose v1's `ps` inspects every container of the project, and right
    /// after a long test run on a loaded machine that has taken longer than a minute). A slow
    /// answer is asked again, within a bounded time, saying so; an empty answer is "no
    /// container".
    async fn container_of(&self, service: &str) -> Result<String, DockerError> {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let svc = format!("label=com.docker.compose.service={service}");
        let args = [
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &project,
            "--filter",
            &svc,
        ];
        let out = with_plugin_hint(run_patient("docker", &args).await).await?;
        Ok(out.lines().next().unwrap_or("").trim().to_string())
    }

    /// Saves each node's container log under `dir/<node>.log`.
    pub async fn save_logs(&self, nodes: &[Node], dir: &Path) -> Result<(), DockerError> {
        for n in nodes {
            let out = Command::new("docker")
                .args(["logs", "--timestamps", &n.container])
                .output()
                .await
                .map_err(|source| DockerError::Spawn {
                    cmd: "docker logs".into(),
                    source,
                })?;
            let mut text = out.stdout;
            text.extend_from_slice(&out.stderr);
            let path = dir.join(format!("{}.log", n.name));
            std::fs::write(&path, text)
                .map_err(|e| DockerError::Other(format!("{}: {e}", path.display())))?;
        }
        Ok(())
    }
}

/// Copies `path` out of the node's container to `dest` on the host.
pub async fn copy_from(node: &Node, path: &str, dest: &Path) -> Result<(), DockerError> {
    let src = format!("{}:{path}", node.container);
    let dest = dest.display().to_string();
    run("docker", &["cp", &src, &dest], SHORT).await.map(|_| ())
}

/// `docker kill -s KILL`: the process dies at once, as with kill -9 on a machine.
pub async fn kill(node: &Node) -> Result<(), DockerError> {
    run("docker", &["kill", "-s", "KILL", &node.container], SHORT)
        .await
        .map(|_| ())
}

/// Starts a stopped container; its entrypoint restarts flockd from the data dir.
pub async fn start(node: &Node) -> Result<(), DockerError> {
    run("docker", &["start", &node.container], SHORT)
        .await
        .map(|_| ())
}

/// The host pid of the container's first process (docker's init under the supervisor).
async fn init_pid(node: &Node) -> Result<i32, DockerError> {
    let init = run(
        "docker",
        &["inspect", "-f", "{{.State.Pid}}", &node.container],
        SHORT,
    )
    .await?;
    let init: i32 = init.trim().parse().unwrap_or(0);
    if init <= 0 {
        return Err(DockerError::Other(format!(
            "the container of {} does not run (no pid)",
            node.name
        )));
    }
    Ok(init)
}

/// The host pids of the node's flockd processes (not its fencing watchdog): those in the
/// container's pid namespace whose command line starts with flockd.
async fn flockd_pids(node: &Node) -> Result<Vec<i32>, DockerError> {
    let pids = flockd_pids_or_none(node).await?;
    if pids.is_empty() {
        return Err(DockerError::Other(format!(
            "no flockd runs in {}'s container",
            node.name
        )));
    }
    Ok(pids)
}

/// [`flockd_pids`], empty when the container runs but flockd does not (killed alone).
async fn flockd_pids_or_none(node: &Node) -> Result<Vec<i32>, DockerError> {
    let init = init_pid(node).await?;
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let Some(want) = ns(init) else {
        return Err(DockerError::Other(format!(
            "cannot read the pid namespace of {}'s container (pid {init})",
            node.name
        )));
    };
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").map_err(|e| DockerError::Other(e.to_string()))? {
        let Some(pid) = e
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        else {
            continue;
        };
        if ns(pid).as_ref() != Some(&want) {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let first = cmd.split(' ').next().unwrap_or("");
        if first.ends_with("flockd") && !cmd.contains("fence-watch") {
            pids.push(pid);
        }
    }
    Ok(pids)
}

fn signal_all(pids: &[i32], sig: i32) -> Result<(), DockerError> {
    for pid in pids {
        // SAFETY: kill(2) of a process of the test cluster found above; no memory involved.
        if unsafe { libc::kill(*pid, sig) } != 0 {
            return Err(DockerError::Other(format!(
                "kill({pid}, {sig}): {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Pauses the node's flockd with SIGSTOP from the host, as a hung flockd: its apps and its
/// fencing watchdog keep running. Not `docker pause`, which freezes the whole container's
/// cgroup: an exec into a frozen container deadlocks the engine (the `runc init` it starts
/// freezes too), after which every inspect, unpause and partition of the run fails.
pub async fn pause(node: &Node) -> Result<(), DockerError> {
    signal_all(&flockd_pids(node).await?, libc::SIGSTOP)
}

pub async fn unpause(node: &Node) -> Result<(), DockerError> {
    signal_all(&flockd_pids(node).await?, libc::SIGCONT)
}

/// Kills the node's flockd alone (SIGKILL from the host), as a crashed daemon: the apps it
/// started and its fencing watchdog run on (the container's pid 1 is docker's init running
/// `jepsen/docker/supervise.sh`, which starts flockd again only after [`restart_flockd`]).
pub async fn kill_flockd(node: &Node) -> Result<(), DockerError> {
    signal_all(&flockd_pids(node).await?, libc::SIGKILL)
}

/// Whether flockd runs in the node's (running) container.
pub async fn flockd_runs(node: &Node) -> Result<bool, DockerError> {
    Ok(!flockd_pids_or_none(node).await?.is_empty())
}

/// Lets the supervisor start flockd again: creates `/tmp/flockd-go` in the container, from
/// the host through `/proc/PID/root` (no docker exec).
pub async fn restart_flockd(node: &Node) -> Result<(), DockerError> {
    let init = init_pid(node).await?;
    let path = format!("/proc/{init}/root/tmp/flockd-go");
    std::fs::write(&path, b"go\n")
        .map_err(|e| DockerError::Other(format!("{}: cannot write {path}: {e}", node.name)))
}

/// The container's state as docker reports it: `running`, `paused`, `exited`, ...
pub async fn state(node: &Node) -> Result<String, DockerError> {
    let out = run(
        "docker",
        &["inspect", "-f", "{{.State.Status}}", &node.container],
        SHORT,
    )
    .await?;
    Ok(out.trim().to_string())
}

async fn pid(node: &Node) -> Result<String, DockerError> {
    let out = run(
        "docker",
        &["inspect", "-f", "{{.State.Pid}}", &node.container],
        SHORT,
    )
    .await?;
    let pid = out.trim().to_string();
    if pid.is_empty() || pid == "0" {
        return Err(DockerError::Other(format!(
            "{} is not running: no network namespace to change",
            node.name
        )));
    }
    Ok(pid)
}

async fn iptables(node: &Node, args: &[&str]) -> Result<(), DockerError> {
    let pid = pid(node).await?;
    let mut a = vec!["-t", pid.as_str(), "-n", "iptables", "-w", "5"];
    a.extend_from_slice(args);
    run("nsenter", &a, SHORT).await.map(|_| ())
}

/// Makes `node` drop every packet from the nodes in `from` (it sees them no more; together
/// with the same rule on their side the link is cut both ways).
pub async fn drop_from(node: &Node, from: &[&Node]) -> Result<(), DockerError> {
    for other in from {
        iptables(node, &["-A", "INPUT", "-s", &other.ip, "-j", "DROP"]).await?;
    }
    Ok(())
}

/// Removes every rule the harness added on `node`.
pub async fn heal(node: &Node) -> Result<(), DockerError> {
    iptables(node, &["-F", "INPUT"]).await
}

/// Applies a grudge: each node drops traffic from the nodes it holds a grudge against.
pub async fn apply_grudge(
    nodes: &[Node],
    grudge: &BTreeMap<String, Vec<String>>,
) -> Result<(), DockerError> {
    for (name, others) in grudge {
        let Some(node) = nodes.iter().find(|n| &n.name == name) else {
            return Err(DockerError::Other(format!("unknown node {name}")));
        };
        let from: Vec<&Node> = nodes.iter().filter(|n| others.contains(&n.name)).collect();
        drop_from(node, &from).await?;
    }
    Ok(())
}

/// What `docker exec` said: its exit code (`None` when killed by a signal), stdout and stderr.
#[derive(Clone, Debug)]
pub struct ExecOutput {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl ExecOutput {
    /// Whether docker refused to run the command at all (the container is stopped, paused or
    /// gone), so nothing ran inside it.
    pub fn not_run(&self) -> bool {
        const REFUSALS: [&str; 4] = [
            "is not running",
            "is paused",
            "No such container",
            "is restarting",
        ];
        self.code != Some(0) && REFUSALS.iter().any(|r| self.stderr.contains(r))
    }
}

/// `docker exec [-i] [-w DIR] CONTAINER ARGS...`, feeding `stdin` when given. A non-zero exit
/// is returned as an [`ExecOutput`], not as an error; errors are failures to run `docker` or a
/// timeout (then the `docker` client is killed, but what it started inside the container may
/// still be running).
pub async fn exec(
    node: &Node,
    workdir: Option<&str>,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<ExecOutput, DockerError> {
    use tokio::io::AsyncWriteExt;
    let mut a: Vec<&str> = vec!["exec"];
    if stdin.is_some() {
        a.push("-i");
    }
    if let Some(w) = workdir {
        a.extend(["-w", w]);
    }
    a.push(&node.container);
    a.extend_from_slice(args);
    let cmd = format!("docker exec {} {}", node.name, args.join(" "));
    let shown = if cmd.chars().count() > 200 {
        format!("{}...", cmd.chars().take(200).collect::<String>())
    } else {
        cmd
    };
    let work = async {
        let mut child = Command::new("docker")
            .args(&a)
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DockerError::Spawn {
                cmd: shown.clone(),
                source,
            })?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A broken pipe shows in the exit status and stderr; the caller judges those.
            let _ = pipe.write_all(data).await;
            let _ = pipe.shutdown().await;
            drop(pipe);
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|source| DockerError::Spawn {
                cmd: shown.clone(),
                source,
            })?;
        Ok(ExecOutput {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| DockerError::Timeout {
            cmd: shown.clone(),
            timeout,
        })?
}
