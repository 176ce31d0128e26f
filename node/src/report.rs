//! The node's capacity and labels, reported through Raft when it starts so the scheduler places
//! apps only where they fit (`flock_scheduler::fit`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flock_scheduler::fit::Capacity;
use flock_scheduler::{Command, CommandResult};
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::worker::WorkerStatus;

/// What this machine offers: its memory (the cgroup's limit when lower), the cpus this process
/// may use, and whether the docker driver works.
pub fn local_capacity(docker: bool) -> Capacity {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_meminfo_total(&t))
        .unwrap_or(0);
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    let memory = match limit {
        Some(l) if l < total => l,
        _ => total,
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    Capacity {
        memory,
        cpus,
        docker,
    }
}

/// `MemTotal:` of /proc/meminfo, in bytes.
fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parses `KEY=VALUE` label flags.
pub fn parse_labels(flags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for f in flags {
        let Some((k, v)) = f.split_once('=') else {
            anyhow::bail!("--label {f:?}: write KEY=VALUE, as --label disk=ssd");
        };
        labels.insert(k.to_string(), v.to_string());
    }
    flock_scheduler::fit::validate_labels(&labels).map_err(|e| anyhow::anyhow!("--label: {e}"))?;
    Ok(labels)
}

/// Proposes this node's report until the replicated state holds it (the leader may not be
/// known yet at start), then returns: a job, "done" once the state holds the report, "failed"
/// when the cluster refuses the labels.
pub async fn run(
    cluster: Arc<Cluster>,
    labels: Option<BTreeMap<String, String>>,
    capacity: Capacity,
    mut shutdown: watch::Receiver<bool>,
    status: WorkerStatus,
) {
    let me = cluster.node_id;
    let mut backoff = Duration::from_millis(200);
    loop {
        let current = {
            let s = cluster.view.read();
            s.cluster
                .nodes
                .get(&me)
                .map(|n| (n.capacity.clone(), n.labels.clone()))
        };
        if let Some((cap, have)) = current {
            if cap.as_ref() == Some(&capacity) && labels.as_ref().is_none_or(|l| *l == have) {
                status.done("the cluster holds this node's capacity and labels");
                return;
            }
        }
        let cmd = Command::ReportNode {
            id: me,
            labels: labels.clone(),
            capacity: capacity.clone(),
        };
        match cluster.propose(cmd).await {
            Ok(CommandResult::NodeReported) => {
                tracing::info!(memory = capacity.memory, cpus = capacity.cpus, docker = capacity.docker, labels = ?labels, "reported this node's capacity");
                status.done("reported this node's capacity and labels");
                return;
            }
            Ok(CommandResult::Rejected(e @ flock_scheduler::ApplyError::InvalidLabels { .. })) => {
                tracing::error!(error = %e, "the cluster refused this node's labels");
                status.fail(format!("the cluster refused this node's labels: {e}"));
                return;
            }
            // Not initialized or not registered yet: a new cluster's first entries are still
            // on their way.
            Ok(CommandResult::Rejected(e)) => {
                tracing::debug!(error = %e, "reporting this node's capacity; retrying");
                status.error(&e);
            }
            Ok(other) => {
                tracing::warn!(?other, "unexpected answer to this node's report");
                status.error(format!("unexpected answer: {other:?}"));
            }
            Err(e) => {
                tracing::debug!(error = %e, "reporting this node's capacity; retrying");
                status.error(&e);
            }
        }
        status.idle(format!("retrying the report in {backoff:?}"));
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_labels() {
        let t = "MemTotal:       24576000 kB\nMemFree:  100 kB\n";
        assert_eq!(parse_meminfo_total(t), Some(24_576_000 * 1024));
        assert_eq!(parse_meminfo_total("nothing"), None);
        let l = parse_labels(&["disk=ssd".into(), "zone=".into()]).unwrap();
        assert_eq!(l["disk"], "ssd");
        assert_eq!(l["zone"], "");
        assert!(parse_labels(&["disk".into()])
            .unwrap_err()
            .to_string()
            .contains("KEY=VALUE"));
        assert!(parse_labels(&["a b=c".into()]).is_err());
    }

    #[test]
    fn this_machine_reports_something() {
        let c = local_capacity(false);
        assert!(c.memory > 0 && c.cpus > 0, "{c:?}");
    }
}
