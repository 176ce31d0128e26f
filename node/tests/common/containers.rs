//! Containers for the docker tests: a cluster whose containers are removed when it is dropped,
//! and small clients.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// Full ids of the containers (running or not) carrying every label of `labels`.
pub fn containers_with(labels: &[String]) -> Vec<String> {
    let mut args = vec!["ps", "-aq", "--no-trunc"];
    let filters: Vec<String> = labels.iter().map(|l| format!("label={l}")).collect();
    for f in &filters {
        args.extend(["--filter", f.as_str()]);
    }
    docker(&args)
        .unwrap_or_else(|e| panic!("{e}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `docker inspect` of one container.
pub fn inspect(id: &str) -> Value {
    let out = docker(&["inspect", id]).unwrap_or_else(|e| panic!("{e}"));
    let v: Value = serde_json::from_str(&out).expect("docker inspect json");
    v[0].clone()
}

/// A cluster whose nodes run containers; dropping it kills the flockds first (so no agent
/// starts a container again), then removes every container of the cluster's node labels,
/// also when the test panics.
pub struct DockerCluster {
    pub c: TestCluster,
    pub cluster_id: String,
}

impl Deref for DockerCluster {
    type Target = TestCluster;
    fn deref(&self) -> &TestCluster {
        &self.c
    }
}

impl DerefMut for DockerCluster {
    fn deref_mut(&mut self) -> &mut TestCluster {
        &mut self.c
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        for p in &mut self.c.nodes {
            p.kill9();
        }
        for i in 1..=self.c.nodes.len() {
            let label = format!("flock.node={}", self.node_label(i));
            let ids = Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("label={label}")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            for id in ids.split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
    }
}

impl DockerCluster {
    pub fn start(n: usize) -> DockerCluster {
        ensure_test_image();
        let c = TestCluster::start(n, &[]);
        let st = c.status(c.addr(1));
        let cluster_id = st["cluster_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no cluster_id in status: {st:#}"))
            .to_string();
        assert!(!cluster_id.is_empty(), "{st:#}");
        DockerCluster { c, cluster_id }
    }

    /// The docker driver's node label of node `i`: CLUSTER-nI.
    pub fn node_label(&self, i: usize) -> String {
        format!("{}-n{i}", self.cluster_id)
    }

    /// Container ids of `app` under node `i`'s label.
    pub fn app_containers(&self, i: usize, app: &str) -> Vec<String> {
        containers_with(&[
            format!("flock.node={}", self.node_label(i)),
            format!("flock.app={app}"),
        ])
    }

    /// Container ids under any of this cluster's node labels.
    pub fn all_containers(&self) -> Vec<String> {
        (1..=self.nodes.len())
            .flat_map(|i| containers_with(&[format!("flock.node={}", self.node_label(i))]))
            .collect()
    }

    /// `app ls --json` through node 1 (never killed here).
    pub fn app_ls(&self) -> Value {
        let out = self.ctl(self.addr(1), &["app", "ls", "--json"]);
        assert!(
            out.status.success(),
            "app ls failed: {}\n{}",
            stderr(&out),
            self.diagnostics()
        );
        serde_json::from_slice(&out.stdout).expect("app ls json")
    }

    pub fn app(&self, name: &str) -> Value {
        self.app_ls()
            .as_array()
            .expect("app ls gives a list")
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// What helps to understand a failure: app ls, the cluster's containers, and each node's
    /// log tail.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        let ls = self.ctl(self.addr(1), &["app", "ls", "--json"]);
        s.push_str(&format!(
            "--- flockctl app ls --json:\n{}{}\n",
            String::from_utf8_lossy(&ls.stdout),
            stderr(&ls)
        ));
        for i in 1..=self.nodes.len() {
            let ps = Command::new("docker")
                .args([
                    "ps",
                    "-a",
                    "--no-trunc",
                    "--filter",
                    &format!("label=flock.node={}", self.node_label(i)),
                    "--format",
                    "{{.ID}} {{.Names}} {{.Status}} {{.Labels}}",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            s.push_str(&format!("--- containers of n{i}:\n{ps}"));
        }
        let mut logs: Vec<PathBuf> = fs::read_dir(self.dir.path())
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
        logs.sort();
        for p in logs {
            let text = fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            s.push_str(&format!(
                "--- {} (tail):\n{}\n",
                p.display(),
                tail.join("\n")
            ));
        }
        s
    }

    /// Polls `f` every 200 ms until it gives a value; on timeout, fails with `what`, the last
    /// reason `f` gave, and the diagnostics.
    pub fn until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Self) -> Result<T, String>,
    ) -> T {
        let start = Instant::now();
        loop {
            match f(self) {
                Ok(v) => return v,
                Err(why) => {
                    if start.elapsed() > timeout {
                        panic!(
                            "timed out after {timeout:?} waiting for {what}; last: {why}\n{}",
                            self.diagnostics()
                        );
                    }
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `app` runs on `node` per app ls, and its container under that node's label
    /// is the one app ls names and is running. Fails at once if the app failed.
    pub fn wait_running(&self, app: &str, node: usize, timeout: Duration) -> (Value, Value) {
        self.until(&format!("{app} to run on n{node}"), timeout, |c| {
            let a = c.app(app);
            if a["state"] == "failed" {
                panic!(
                    "{app} failed (is the Docker engine usable by flockd?): {a:#}\n{}",
                    c.diagnostics()
                );
            }
            if a["node"] != format!("n{node}").as_str() || a["state"] != "running" {
                return Err(format!("app: {a}"));
            }
            let id = a["id"].as_str().unwrap_or_default().to_string();
            let ids = c.app_containers(node, app);
            if ids != [id.clone()] {
                return Err(format!(
                    "app ls says id {id:?}; containers under n{node}'s label: {ids:?}"
                ));
            }
            let info = inspect(&id);
            if info["State"]["Running"] != true {
                return Err(format!("container {id} state: {}", info["State"]));
            }
            Ok((a, info))
        })
    }
}

/// Reads `http://ADDR/PATH` (busybox httpd answers HTTP/1.0 and closes): the body of a 200.
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer from {addr}: {text:?}"))?;
    if !head.starts_with("HTTP/1.") || !head.lines().next().unwrap_or("").contains(" 200") {
        return Err(format!("{addr}{path}: {head}"));
    }
    Ok(body.to_string())
}

/// A free TCP port on all interfaces (the engine publishes on 0.0.0.0).
pub fn free_port_any() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
