//! A three-node flock cluster on loopback, started from the `flockd` binary the way an operator
//! would: `flockd init` on the first node, `flockd join` on the others, `flockd run` to restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use flock_proto::v1::{api_client::ApiClient, StatusReply, StatusRequest};
use tonic::transport::ClientTlsConfig;

use crate::cluster::{Cluster, KvClient, LeaderProbe, System, Target};
use crate::proc::{free_addrs, Daemon};

/// How long a node may take to print `flockd: ready`, and the cluster to reach three voters.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// What flockd prints once it serves.
const READY_LINE: &str = "flockd: ready";
/// What `flockd init` prints; the token is the last word.
const TOKEN_LINE: &str = "flockd: join with token";
/// Every flockd logs warnings and errors only, so logging costs it no more than etcd's
/// `--log-level warn`.
const ENV: &[(&str, &str)] = &[("RUST_LOG", "warn")];

struct Node {
    name: String,
    addr: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    daemon: Option<Daemon>,
}

pub struct FlockCluster {
    flockd: PathBuf,
    nodes: Vec<Node>,
    /// The client side of flock's mutual TLS, from the admin client config `flockd init`
    /// writes; `None` for a flockd from before TLS (it writes none and serves plaintext).
    tls: Option<ClientTlsConfig>,
}

/// `flockd --version`, for the report; "unknown" if it has none.
pub async fn version(flockd: &Path) -> Result<String> {
    if !flockd.is_file() {
        bail!(
            "flockd not found at {}; build it (cargo build --release -p flock-node) or pass \
             --flockd PATH",
            flockd.display()
        );
    }
    let out = tokio::process::Command::new(flockd)
        .arg("--version")
        .output()
        .await
        .with_context(|| format!("cannot run {} --version", flockd.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(match text.lines().next() {
        // clap prints "flockd 0.1.0"; the report already says which system it is.
        Some(line) if out.status.success() => line.trim().trim_start_matches("flockd ").to_string(),
        _ => "unknown".to_string(),
    })
}

impl FlockCluster {
    /// `flockd init` n1, `flockd join` n2 and n3, then waits until all three are voters.
    pub async fn start(flockd: &Path, dir: &Path) -> Result<FlockCluster> {
        let addrs = free_addrs(3)?;
        let mut cluster = FlockCluster {
            tls: None,
            flockd: flockd.to_path_buf(),
            nodes: addrs
                .iter()
                .enumerate()
                .map(|(i, addr)| {
                    let name = format!("n{}", i + 1);
                    Node {
                        addr: *addr,
                        data_dir: dir.join(&name),
                        log: dir.join(format!("{name}.log")),
                        name,
                        daemon: None,
                    }
                })
                .collect(),
        };

        let first = &cluster.nodes[0];
        let mut init = cluster.spawn(
            0,
            vec![
                "init".into(),
                "--data-dir".into(),
                first.data_dir.to_string_lossy().into_owned(),
                "--listen".into(),
                first.addr.to_string(),
                "--name".into(),
                first.name.clone(),
            ],
        )?;
        init.wait_for_line(READY_LINE, READY_TIMEOUT).await?;
        // A flockd with mutual TLS writes the admin client config at init (the one flockctl
        // uses); an older one does not.
        let admin = cluster.nodes[0].data_dir.join("admin.conf");
        if admin.exists() {
            let config = flock_client::ClientConfig::load(&admin)
                .with_context(|| format!("cannot load flock's admin config {}", admin.display()))?;
            cluster.tls = Some(config.tls());
        }
        let token_line = init.wait_for_line(TOKEN_LINE, READY_TIMEOUT).await?;
        let token = token_line
            .split_whitespace()
            .last()
            .filter(|t| !t.is_empty() && *t != "token")
            .ok_or_else(|| anyhow!("flockd n1 printed no token in \"{token_line}\""))?
            .to_string();
        cluster.nodes[0].daemon = Some(init);

        let seed = cluster.nodes[0].addr.to_string();
        for i in 1..cluster.nodes.len() {
            let node = &cluster.nodes[i];
            let mut join = cluster.spawn(
                i,
                vec![
                    "join".into(),
                    seed.clone(),
                    "--token".into(),
                    token.clone(),
                    "--data-dir".into(),
                    node.data_dir.to_string_lossy().into_owned(),
                    "--listen".into(),
                    node.addr.to_string(),
                    "--name".into(),
                    node.name.clone(),
                ],
            )?;
            join.wait_for_line(READY_LINE, READY_TIMEOUT).await?;
            cluster.nodes[i].daemon = Some(join);
        }

        cluster.wait_whole(0).await?;
        Ok(cluster)
    }

    fn spawn(&self, i: usize, args: Vec<String>) -> Result<Daemon> {
        let node = &self.nodes[i];
        Daemon::spawn(
            format!("flockd {}", node.name),
            &self.flockd,
            &args,
            ENV,
            node.log.clone(),
        )
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.log.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Waits until, asked through node `via`, the cluster has three healthy voters and a
    /// leader, and a write through `via` is acknowledged.
    async fn wait_whole(&mut self, via: usize) -> Result<()> {
        let target = self.target(via);
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < READY_TIMEOUT {
            self.check_running().await?;
            match status(&target).await {
                Ok(s) => {
                    let voters = s.members.iter().filter(|m| m.role == "voter").count();
                    let healthy = s.members.iter().all(|m| m.health == "healthy");
                    last = describe(&s);
                    if voters == self.nodes.len() && healthy && s.leader_id.is_some() {
                        let mut kv = KvClient::connect(System::Flock, &target).await?;
                        match tokio::time::timeout(
                            Duration::from_secs(2),
                            kv.put("bench/ready".to_string(), "ok"),
                        )
                        .await
                        {
                            Ok(Ok(())) => return Ok(()),
                            Ok(Err(e)) => last = format!("{last}; put failed: {e}"),
                            Err(_) => last = format!("{last}; put timed out"),
                        }
                    }
                }
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "flock cluster did not reach {} healthy voters with a leader within {} s, asked \
             through {} (last status: {last}); see {}",
            self.nodes.len(),
            READY_TIMEOUT.as_secs(),
            self.nodes[via].name,
            self.logs()
        )
    }
}

/// `Api/Status` with `local: false` (the leader's view) through `target`.
async fn status(target: &Target) -> Result<StatusReply> {
    let channel = target.connect().await?;
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        ApiClient::new(channel).status(StatusRequest { local: false }),
    )
    .await
    .with_context(|| format!("flock Status at {} timed out", target.url))??;
    Ok(reply.into_inner())
}

/// One line about a Status reply, for error messages.
fn describe(s: &StatusReply) -> String {
    let members = s
        .members
        .iter()
        .map(|m| format!("{} {} {}", m.name, m.role, m.health))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "leader {}, members [{members}]",
        if s.leader_name.is_empty() {
            "none"
        } else {
            &s.leader_name
        }
    )
}

impl Cluster for FlockCluster {
    fn system(&self) -> System {
        System::Flock
    }

    fn size(&self) -> usize {
        self.nodes.len()
    }

    fn member_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    fn target(&self, i: usize) -> Target {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Target {
            url: format!("{scheme}://{}", self.nodes[i].addr),
            tls: self.tls.clone(),
        }
    }

    fn transport(&self) -> &'static str {
        if self.tls.is_some() {
            "mutual TLS on client and Raft connections (flockd's own certificates)"
        } else {
            "plaintext (a flockd from before mutual TLS)"
        }
    }

    async fn leader(&self) -> Result<usize> {
        let mut last_err = anyhow!("no live node");
        for (i, n) in self.nodes.iter().enumerate() {
            if n.daemon.is_none() {
                continue;
            }
            match status(&self.target(i)).await {
                Ok(s) if s.leader_id.is_some() => {
                    return self
                        .nodes
                        .iter()
                        .position(|n| n.addr.to_string() == s.leader_addr)
                        .or_else(|| self.nodes.iter().position(|n| n.name == s.leader_name))
                        .ok_or_else(|| {
                            anyhow!(
                                "flock reports leader {} at {}, not one of ours",
                                s.leader_name,
                                s.leader_addr
                            )
                        });
                }
                Ok(_) => last_err = anyhow!("flockd {} knows no leader", n.name),
                Err(e) => last_err = e,
            }
        }
        Err(last_err.context("cannot find flock's leader"))
    }

    async fn term(&self) -> Result<u64> {
        let mut term = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.daemon.is_some() {
                let t = status(&self.target(i)).await?.term;
                term = Some(term.map_or(t, |m: u64| m.max(t)));
            }
        }
        term.ok_or_else(|| anyhow!("no live flockd to ask for the term"))
    }

    async fn kill(&mut self, i: usize) -> Result<()> {
        match self.nodes[i].daemon.take() {
            Some(d) => d.kill().await,
            None => bail!("flockd {} is not running", self.nodes[i].name),
        }
    }

    async fn restart(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].daemon.is_some() {
            bail!("flockd {} is still running", self.nodes[i].name);
        }
        let data_dir = self.nodes[i].data_dir.to_string_lossy().into_owned();
        let mut d = self.spawn(i, vec!["run".into(), "--data-dir".into(), data_dir])?;
        d.wait_for_line(READY_LINE, READY_TIMEOUT).await?;
        self.nodes[i].daemon = Some(d);
        self.wait_whole(i).await
    }

    fn leader_probe(&self) -> Result<LeaderProbe> {
        Ok(LeaderProbe::Flock {
            clients: (0..self.nodes.len())
                .map(|i| Ok(ApiClient::new(self.target(i).endpoint()?.connect_lazy())))
                .collect::<Result<_>>()?,
            addrs: self.nodes.iter().map(|n| n.addr.to_string()).collect(),
            names: self.nodes.iter().map(|n| n.name.clone()).collect(),
        })
    }

    async fn check_running(&mut self) -> Result<()> {
        for d in self.nodes.iter_mut().filter_map(|m| m.daemon.as_mut()) {
            d.check_running().await?;
        }
        Ok(())
    }

    async fn shutdown(mut self) -> Result<()> {
        for n in &mut self.nodes {
            if let Some(d) = n.daemon.take() {
                d.kill().await?;
            }
        }
        Ok(())
    }
}

/// flock's Raft timing as flockd documents it, for the report: the defaults and descriptions
/// `flockd run --help` shows for `--heartbeat-ms` and `--election-timeout-ms` (flock-bench runs
/// flockd with its defaults, so these are what ran). Quoted rather than interpreted, so the
/// report stays right when flockd's timing rules change.
pub async fn settings(flockd: &Path) -> String {
    let help = tokio::process::Command::new(flockd)
        .args(["run", "--help"])
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    match (
        help_entry(&help, "--heartbeat-ms"),
        help_entry(&help, "--election-timeout-ms"),
    ) {
        ((_, Some(h)), (text, Some(e))) => format!(
            "--heartbeat-ms {h} --election-timeout-ms {e} (flockd's defaults; flockd run --help: \
             \"{text}\"), fsync on"
        ),
        _ => "flockd's default Raft timing (not found in `flockd run --help`), fsync on".into(),
    }
}

/// A flag's description in clap's help (the lines under the flag, up to the next flag) without
/// its `[default: X]`, and that X.
fn help_entry(help: &str, flag: &str) -> (String, Option<String>) {
    let mut lines = help.lines().map(str::trim);
    if lines.by_ref().find(|l| l.starts_with(flag)).is_none() {
        return (String::new(), None);
    }
    let text = lines
        .take_while(|l| !l.starts_with('-'))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    match text.find("[default: ") {
        Some(at) => {
            let rest = &text[at + "[default: ".len()..];
            let default = rest.find(']').map(|end| rest[..end].to_string());
            (text[..at].trim().to_string(), default)
        }
        None => (text, None),
    }
}

#[cfg(test)]
mod tests {
    use super::help_entry;

    #[test]
    fn defaults_are_read_from_clap_help() {
        let help = "Options:
      --data-dir <DATA_DIR>
          
      --heartbeat-ms <HEARTBEAT_MS>
          Leader heartbeat interval, in milliseconds [default: 100]
      --election-timeout-ms <ELECTION_TIMEOUT_MS>
          Minimum election timeout in milliseconds (the maximum is 4/3 of it) [default: 300]
      --snapshot-logs <SNAPSHOT_LOGS>
          Take a Raft snapshot after this many log entries [default: 10000]
";
        assert_eq!(
            help_entry(help, "--heartbeat-ms"),
            (
                "Leader heartbeat interval, in milliseconds".to_string(),
                Some("100".to_string())
            )
        );
        assert_eq!(
            help_entry(help, "--election-timeout-ms"),
            (
                "Minimum election timeout in milliseconds (the maximum is 4/3 of it)".to_string(),
                Some("300".to_string())
            )
        );
        assert_eq!(help_entry(help, "--data-dir"), (String::new(), None));
        assert_eq!(help_entry(help, "--nope"), (String::new(), None));
    }
}
