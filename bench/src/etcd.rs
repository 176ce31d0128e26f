//! A three-member etcd cluster on loopback, started from the `etcd` binary (Debian's
//! etcd-server, 3.4) with its default Raft timing and fsync, plaintext or, with `--etcd-tls`,
//! with mutual TLS on client and peer connections as flock has (certificates from a CA made
//! for the run, ECDSA P-256 like flock's).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::cluster::{Cluster, KvClient, LeaderProbe, System, Target};
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
    tls: Option<Tls>,
}

/// The files etcd's TLS flags name, and the client side of the same TLS.
struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client: ClientTlsConfig,
}

impl Tls {
    /// A CA, one certificate for every member (server and client use, for 127.0.0.1: members
    /// check each other's peer URL against it) and one client certificate, under `dir`.
    fn create(dir: &Path) -> Result<Tls> {
        let pki = |what: &str, e: rcgen::Error| anyhow!("cannot make etcd's {what}: {e}");
        let ca_key = KeyPair::generate().map_err(|e| pki("CA key", e))?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| pki("CA", e))?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "flock-bench etcd CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca.self_signed(&ca_key).map_err(|e| pki("CA", e))?.pem();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, cn: &str| -> Result<(String, String)> {
            let key = KeyPair::generate().map_err(|e| pki("key", e))?;
            let mut params = CertificateParams::new(names).map_err(|e| pki("certificate", e))?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params
                .signed_by(&key, &issuer)
                .map_err(|e| pki("certificate", e))?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (member_cert, member_key) =
            leaf(vec!["127.0.0.1".into(), "localhost".into()], "etcd member")?;
        let (client_cert, client_key) = leaf(vec![], "flock-bench")?;

        let tls = Tls {
            ca: dir.join("ca.pem"),
            cert: dir.join("member.pem"),
            key: dir.join("member-key.pem"),
            client: ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca_pem))
                .identity(Identity::from_pem(&client_cert, &client_key)),
        };
        for (path, pem) in [
            (&tls.ca, &ca_pem),
            (&tls.cert, &member_cert),
            (&tls.key, &member_key),
        ] {
            std::fs::write(path, pem)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(tls)
    }

    /// etcd's flags for mutual TLS on both the client and the peer port.
    fn flags(&self) -> Vec<String> {
        let (ca, cert, key) = (
            self.ca.to_string_lossy(),
            self.cert.to_string_lossy(),
            self.key.to_string_lossy(),
        );
        [
            ("--trusted-ca-file", &ca),
            ("--cert-file", &cert),
            ("--key-file", &key),
            ("--peer-trusted-ca-file", &ca),
            ("--peer-cert-file", &cert),
            ("--peer-key-file", &key),
        ]
        .iter()
        .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
        .chain([
            "--client-cert-auth".into(),
            "--peer-client-cert-auth".into(),
        ])
        .collect()
    }
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
    /// Starts three members under `dir` (with mutual TLS if `tls`) and waits until each
    /// accepts a write.
    pub async fn start(etcd: &Path, dir: &Path, tls: bool) -> Result<EtcdCluster> {
        let tls = if tls { Some(Tls::create(dir)?) } else { None };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addrs = free_addrs(6)?;
        let members: Vec<Member> = (0..3)
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
            .map(|m| format!("{}={scheme}://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "flock-bench-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let mut cluster = EtcdCluster {
            etcd: etcd.to_path_buf(),
            initial_cluster,
            token,
            members,
            tls,
        };
        // All three at once: a new etcd member waits for its peers before it serves.
        for i in 0..cluster.members.len() {
            cluster.members[i].daemon = Some(cluster.spawn(i, "new")?);
        }
        for i in 0..3 {
            cluster.wait_serving(i).await?;
        }
        Ok(cluster)
    }

    /// Waits until member `i` accepts a write (forwarded to the leader if it follows, so this
    /// also proves it is part of a cluster with a leader) and records its member id.
    async fn wait_serving(&mut self, i: usize) -> Result<()> {
        let target = self.target(i);
        let start = Instant::now();
        let mut last_err = String::from("no attempt yet");
        while start.elapsed() < READY_TIMEOUT {
            self.check_running().await?;
            match try_serving(&target).await {
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

/// One write and one Status call through `target`; returns the member id that answered.
async fn try_serving(target: &Target) -> Result<u64> {
    let mut kv = KvClient::connect(System::Etcd, target).await?;
    tokio::time::timeout(
        Duration::from_secs(2),
        kv.put("bench/ready".to_string(), "ok"),
    )
    .await
    .context("put timed out")??;
    let status = status(target).await?;
    if status.leader == 0 {
        bail!("member knows no leader");
    }
    status
        .header
        .map(|h| h.member_id)
        .ok_or_else(|| anyhow!("Status reply without header"))
}

/// The Maintenance.Status RPC on `target`.
async fn status(target: &Target) -> Result<etcdpb::StatusResponse> {
    let channel = target.connect().await?;
    let mut client = etcdpb::maintenance_client::MaintenanceClient::new(channel);
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        client.status(etcdpb::StatusRequest {}),
    )
    .await
    .with_context(|| format!("etcd Status at {} timed out", target.url))??;
    Ok(reply.into_inner())
}

impl EtcdCluster {
    /// Starts member `i`; `state` is etcd's `--initial-cluster-state` ("new" or "existing").
    fn spawn(&self, i: usize, state: &str) -> Result<Daemon> {
        let m = &self.members[i];
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut args: Vec<String> = [
            "--name",
            &m.name,
            "--data-dir",
            &m.data_dir.to_string_lossy(),
            "--listen-client-urls",
            &format!("{scheme}://{}", m.client),
            "--advertise-client-urls",
            &format!("{scheme}://{}", m.client),
            "--listen-peer-urls",
            &format!("{scheme}://{}", m.peer),
            "--initial-advertise-peer-urls",
            &format!("{scheme}://{}", m.peer),
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-token",
            &self.token,
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
        if let Some(tls) = &self.tls {
            args.extend(tls.flags());
        }
        Daemon::spawn(
            format!("etcd {}", m.name),
            &self.etcd,
            &args,
            &[],
            m.log.clone(),
        )
    }
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

    fn target(&self, i: usize) -> Target {
        match &self.tls {
            Some(tls) => Target {
                url: format!("https://{}", self.members[i].client),
                tls: Some(tls.client.clone()),
            },
            None => Target {
                url: format!("http://{}", self.members[i].client),
                tls: None,
            },
        }
    }

    fn transport(&self) -> &'static str {
        if self.tls.is_some() {
            "mutual TLS on client and peer connections (--etcd-tls)"
        } else {
            "plaintext (etcd's default; --etcd-tls gives it mutual TLS like flock's)"
        }
    }

    async fn leader(&self) -> Result<usize> {
        let mut last_err = anyhow!("no live member");
        for (i, m) in self.members.iter().enumerate() {
            if m.daemon.is_none() {
                continue;
            }
            match status(&self.target(i)).await {
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

    async fn term(&self) -> Result<u64> {
        let mut term = None;
        for (i, m) in self.members.iter().enumerate() {
            if m.daemon.is_some() {
                let t = status(&self.target(i)).await?.raft_term;
                term = Some(term.map_or(t, |x: u64| x.max(t)));
            }
        }
        term.ok_or_else(|| anyhow!("no live etcd member to ask for the term"))
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
        let d = self.spawn(i, "existing")?;
        self.members[i].daemon = Some(d);
        self.wait_serving(i).await
    }

    fn leader_probe(&self) -> Result<LeaderProbe> {
        Ok(LeaderProbe::Etcd {
            clients: (0..self.members.len())
                .map(|i| {
                    Ok(etcdpb::maintenance_client::MaintenanceClient::new(
                        self.target(i).endpoint()?.connect_lazy(),
                    ))
                })
                .collect::<Result<_>>()?,
            ids: self.members.iter().map(|m| m.id).collect(),
        })
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
