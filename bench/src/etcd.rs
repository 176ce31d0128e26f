//! A three-member etcd cluster on loopback, started from the `etcd` binary (Debian's
//! etcd-server, 3.4) with its default Raft timing and fsync.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::cluster::{Cluster, KvClient, System};
use crate::etcdpb;
use crate::proc::{free_addrs, Daemon};
use crate::progress;

/// etcd's own defaults, passed explicitly so the report states exactly what ran.
pub const HEARTBEAT_MS: u64 = 100;
pub const ELECTION_TIMEOUT_MS: u64 = 1000;

/// How long a member may take to start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    daemon: Option<Daemon>,
    /// etcd's member id, learned from the Status RPC once the member serves.
    id: u64,
}

pub struct EtcdCluster {
    etcd: PathBuf,
    initial_cluster: String,
    token: String,
    members: Vec<Member>,
}

/// `etcd --version`'s first line ("etcd Version: 3.4.23"), to check the binary and report it.
pub async fn version(etcd: &Path) -> Result<String> {
    let out = tokio::process::Command::new(etcd)
        .arg("--version")
        .output()
        .await
        .with_context(|| {
            format!(
                "cannot run {} --version; install etcd 3.4 (Debian: apt-get install etcd-server) \
                 or pass --etcd PATH",
                etcd.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("etcd Version:"))
        .ok_or_else(|| {
            anyhow!(
                "{} --version printed no \"etcd Version:\" line",
                etcd.display()
            )
        })?;
    let v = line.trim_start_matches("etcd Version:").trim().to_string();
    if !v.starts_with("3.4.") {
        progress!("warning: {} is etcd {v}, not 3.4", etcd.display());
    }
    Ok(v)
}

impl EtcdCluster {
    /// Starts three members under `dir` and waits until each accepts a write.
    pub async fn start(etcd: &Path, dir: &Path) -> Result<EtcdCluster> {
        let addrs = free_addrs(6)?;
        let mut members: Vec<Member> = (0..3)
            .map(|i| {
                let name = format!("e{}", i + 1);
                Member {
                    client: addrs[2 * i],
                    peer: addrs[2 * i + 1],
                    data_dir: dir.join(&name),
                    log: dir.join(format!("{name}.log")),
                    name,
                    daemon: None,
                    id: 0,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "flock-bench-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        // All three at once: a new etcd member waits for its peers before it serves.
        for m in &mut members {
            m.daemon = Some(spawn(etcd, m, &initial_cluster, &token, "new")?);
        }
        let mut cluster = EtcdCluster {
            etcd: etcd.to_path_buf(),
            initial_cluster,
            token,
            members,
        };
        for i in 0..3 {
            cluster.wait_serving(i).await?;
        }
        Ok(cluster)
    }

    /// Waits until member `i` accepts a write (forwarded to the leader if it follows, so this
    /// also proves it is part of a cluster with a leader) and records its member id.
    async fn wait_serving(&mut self, i: usize) -> Result<()> {
        let url = self.client_url(i);
        let start = Instant::now();
        let mut last_err = String::from("no attempt yet");
        while start.elapsed() < READY_TIMEOUT {
            self.check_running().await?;
            match try_serving(&url).await {
                Ok(id) => {
                    self.members[i].id = id;
                    return Ok(());
                }
                Err(e) => last_err = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "etcd {} did not accept a write within {} s (last error: {last_err}); see {}",
            self.members[i].name,
            READY_TIMEOUT.as_secs(),
            self.members[i].log.display()
        )
    }
}

/// One write and one Status call through `url`; returns the member id that answered.
async fn try_serving(url: &str) -> Result<u64> {
    let mut kv = KvClient::connect(System::Etcd, url).await?;
    tokio::time::timeout(
        Duration::from_secs(2),
        kv.put("bench/ready".to_string(), "ok"),
    )
    .await
    .context("put timed out")??;
    let status = status(url).await?;
    if status.leader == 0 {
        bail!("member knows no leader");
    }
    status
        .header
        .map(|h| h.member_id)
        .ok_or_else(|| anyhow!("Status reply without header"))
}

/// The Maintenance.Status RPC on `url`.
async fn status(url: &str) -> Result<etcdpb::StatusResponse> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .with_context(|| format!("cannot connect to etcd at {url}"))?;
    let mut client = etcdpb::maintenance_client::MaintenanceClient::new(channel);
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        client.status(etcdpb::StatusRequest {}),
    )
    .await
    .with_context(|| format!("etcd Status at {url} timed out"))??;
    Ok(reply.into_inner())
}

fn spawn(
    etcd: &Path,
    m: &Member,
    initial_cluster: &str,
    token: &str,
    state: &str,
) -> Result<Daemon> {
    let args: Vec<String> = [
        "--name",
        &m.name,
        "--data-dir",
        &m.data_dir.to_string_lossy(),
        "--listen-client-urls",
        &format!("http://{}", m.client),
        "--advertise-client-urls",
        &format!("http://{}", m.client),
        "--listen-peer-urls",
        &format!("http://{}", m.peer),
        "--initial-advertise-peer-urls",
        &format!("http://{}", m.peer),
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-token",
        token,
        "--initial-cluster-state",
        state,
        "--heartbeat-interval",
        &HEARTBEAT_MS.to_string(),
        "--election-timeout",
        &ELECTION_TIMEOUT_MS.to_string(),
        "--logger",
        "zap",
        "--log-level",
        "warn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Daemon::spawn(format!("etcd {}", m.name), etcd, &args, &[], m.log.clone())
}

impl Cluster for EtcdCluster {
    fn system(&self) -> System {
        System::Etcd
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn member_name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    fn client_url(&self, i: usize) -> String {
        format!("http://{}", self.members[i].client)
    }

    async fn leader(&self) -> Result<usize> {
        let mut last_err = anyhow!("no live member");
        for (i, m) in self.members.iter().enumerate() {
            if m.daemon.is_none() {
                continue;
            }
            match status(&self.client_url(i)).await {
                Ok(s) if s.leader != 0 => {
                    return self
                        .members
                        .iter()
                        .position(|m| m.id == s.leader)
                        .ok_or_else(|| {
                            anyhow!("etcd reports leader id {:x}, not one of ours", s.leader)
                        });
                }
                Ok(_) => last_err = anyhow!("etcd {} knows no leader", m.name),
                Err(e) => last_err = e,
            }
        }
        Err(last_err.context("cannot find etcd's leader"))
    }

    async fn kill(&mut self, i: usize) -> Result<()> {
        match self.members[i].daemon.take() {
            Some(d) => d.kill().await,
            None => bail!("etcd {} is not running", self.members[i].name),
        }
    }

    async fn restart(&mut self, i: usize) -> Result<()> {
        if self.members[i].daemon.is_some() {
            bail!("etcd {} is still running", self.members[i].name);
        }
        let d = spawn(
            &self.etcd,
            &self.members[i],
            &self.initial_cluster,
            &self.token,
            "existing",
        )?;
        self.members[i].daemon = Some(d);
        self.wait_serving(i).await
    }

    async fn check_running(&mut self) -> Result<()> {
        for d in self.members.iter_mut().filter_map(|m| m.daemon.as_mut()) {
            d.check_running().await?;
        }
        Ok(())
    }

    async fn shutdown(mut self) -> Result<()> {
        for m in &mut self.members {
            if let Some(d) = m.daemon.take() {
                d.kill().await?;
            }
        }
        Ok(())
    }
}
