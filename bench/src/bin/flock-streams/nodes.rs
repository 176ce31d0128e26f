//! Node to node, through flockd itself: two real flockd processes on loopback (n1 `init`, n2
//! `join`), driven by the real flockctl, on the dir backend or each on its own zfs-fuse pool.
//!
//! - full: a dataset with `full_mib` written on n1 and snapshot s1, then
//!   `flockctl dataset move bench --to n2`: the push protocol streams s1 in full, then the
//!   move's final snapshot incrementally, and commits the new primary. The time is the move's
//!   own, as flockctl reports it (from the request to the commit).
//! - incremental: `inc_mib` more written on n2 (now the primary) and snapshot s2; n1, now a
//!   replica, receives it by an incremental push. The time runs from the snapshot command's
//!   return until `dataset ls` (asked every 20 ms) shows s2 on n1.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// One flockd process.
struct Node {
    child: Child,
    addr: String,
    _lines: mpsc::Receiver<String>,
}

/// A two-node flock cluster, stopped on drop.
pub struct Cluster {
    nodes: Vec<Node>,
    flockctl: PathBuf,
    config: PathBuf,
}

/// What one push took.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub secs: f64,
    /// Payload bytes, from the move's progress (0 when not reported).
    pub bytes: u64,
}

const FAST: &[&str] = &["--heartbeat-ms", "100", "--election-timeout-ms", "300"];

fn start_node(flockd: &Path, args: &[String], log: &Path, filter: &str) -> Result<Node> {
    let stderr = std::fs::File::create(log)?;
    let mut child = Command::new(flockd)
        .args(args)
        .env("RUST_LOG", filter)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start {}", flockd.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with("flockd: ready") => {
                let addr = l.rsplit(' ').next().unwrap_or_default().to_string();
                return Ok(Node {
                    child,
                    addr,
                    _lines: rx,
                });
            }
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                bail!(
                    "flockd did not get ready (printed {seen:?}); log: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }
}

impl Cluster {
    /// Starts n1 (`init`) and n2 (`join`) with data dirs under `dir`, `storage[i]` as node
    /// i+1's storage flags, logging to DIR/n1.log and DIR/n2.log under RUST_LOG `log_filter`.
    pub fn start(
        bin_dir: &Path,
        dir: &Path,
        storage: [Vec<String>; 2],
        log_filter: &str,
    ) -> Result<Cluster> {
        let flockd = bin_dir.join("flockd");
        let flockctl = bin_dir.join("flockctl");
        let d1 = dir.join("n1");
        let mut args: Vec<String> = [
            "init",
            "--data-dir",
            &d1.display().to_string(),
            "--listen",
            "127.0.0.1:0",
            "--name",
            "n1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(FAST.iter().map(|s| s.to_string()));
        args.extend(storage[0].clone());
        let first = start_node(&flockd, &args, &dir.join("n1.log"), log_filter)?;
        let config = d1.join("admin.conf");
        let mut c = Cluster {
            nodes: vec![first],
            flockctl,
            config,
        };
        let token = c.ctl(&["cluster", "token"])?;
        let token = token
            .split_whitespace()
            .find(|w| w.starts_with("FLOCK-"))
            .ok_or_else(|| anyhow!("no token in {token:?}"))?
            .to_string();
        let d2 = dir.join("n2");
        let mut args: Vec<String> = [
            "join",
            &c.nodes[0].addr,
            "--token",
            &token,
            "--data-dir",
            &d2.display().to_string(),
            "--listen",
            "127.0.0.1:0",
            "--name",
            "n2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(FAST.iter().map(|s| s.to_string()));
        args.extend(storage[1].clone());
        c.nodes
            .push(start_node(&flockd, &args, &dir.join("n2.log"), log_filter)?);
        Ok(c)
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.flockctl)
            .arg("--config")
            .arg(&self.config)
            .arg("--addr")
            .arg(&self.nodes[0].addr)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", self.flockctl.display()))?;
        if !out.status.success() {
            bail!(
                "flockctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn dataset(&self) -> Result<Value> {
        let v: Value = serde_json::from_str(&self.ctl(&["dataset", "ls", "bench", "--json"])?)?;
        Ok(v[0].clone())
    }

    fn holder(d: &Value, node: &str) -> Option<Value> {
        d["holders"]
            .as_array()?
            .iter()
            .find(|h| h["node"] == node)
            .cloned()
    }

    fn mount_path(&self, node: &str) -> Result<PathBuf> {
        let d = self.dataset()?;
        let h = Self::holder(&d, node).ok_or_else(|| anyhow!("{node} holds no copy: {d}"))?;
        h["mount_path"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("no mount path for {node}: {d}"))
    }

    /// The full push (by a move to n2) and the incremental one (to n1, a replica since).
    pub fn run(&self, full_mib: u64, inc_mib: u64) -> Result<[Pushed; 2]> {
        self.ctl(&["dataset", "create", "bench", "--node", "n1"])?;
        fill(&self.mount_path("n1")?.join("full.bin"), full_mib, 11)?;
        self.ctl(&["dataset", "snapshot", "bench", "--tag", "s1"])?;

        mark("dataset move starts");
        let started = Instant::now();
        let out = self.ctl(&["dataset", "move", "bench", "--to", "n2", "--json"])?;
        mark("dataset move returned");
        let wall = started.elapsed().as_secs_f64();
        let events: Vec<Value> = out
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let done = events
            .iter()
            .find(|e| e["event"] == "done")
            .ok_or_else(|| anyhow!("the move did not finish: {out}"))?;
        let full = Pushed {
            secs: done["seconds"].as_f64().unwrap_or(wall),
            bytes: events
                .iter()
                .filter(|e| e["phase"] == "full")
                .filter_map(|e| e["bytes"].as_u64())
                .max()
                .unwrap_or(0),
        };

        mark("writing the increment");
        fill(&self.mount_path("n2")?.join("inc.bin"), inc_mib, 12)?;
        mark("dataset snapshot s2 starts");
        self.ctl(&["dataset", "snapshot", "bench", "--tag", "s2"])?;
        mark("dataset snapshot s2 returned");
        let started = Instant::now();
        let deadline = started + Duration::from_secs(600);
        loop {
            let d = self.dataset()?;
            if Self::holder(&d, "n1").is_some_and(|h| h["latest_snapshot"] == "s2") {
                mark("dataset ls shows s2 on n1");
                break;
            }
            if Instant::now() > deadline {
                bail!("n1 did not receive s2 within 600 s: {d}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let inc = Pushed {
            secs: started.elapsed().as_secs_f64(),
            bytes: 0,
        };
        Ok([full, inc])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in self.nodes.iter_mut().rev() {
            // SIGTERM: flockd shuts down in order; then make sure.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(n.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = n.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

/// Prints a step of the run with the wall-clock time, to match against the flockd logs.
fn mark(what: &str) {
    eprintln!(
        "flock-streams: {} nodes: {what}",
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
    );
}

/// Writes `mib` MiB of incompressible bytes to `path` and syncs it.
fn fill(path: &Path, mib: u64, seed: u64) -> Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    Ok(())
}
