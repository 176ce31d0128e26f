//! The results: the comparison table, the `RESULTS.md` section and the JSON.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::sysinfo;
use crate::workload::{median, FailoverRound, Throughput};

#[derive(Debug, Serialize)]
pub struct Report {
    /// RFC 3339, UTC.
    pub date: String,
    pub machine: Machine,
    /// The command line as the user typed it (run.sh passes it on).
    pub command: String,
    pub setup: Setup,
    pub systems: Vec<SystemResult>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    /// Share of all CPUs busy during one second just before the benchmark started (0..1):
    /// other work on the machine skews the figures, and this is how a reader can tell.
    pub busy_before: f64,
    /// 1-minute load average when the benchmark ended (its own load included).
    pub load_end: f64,
}

impl Machine {
    /// What this machine is, from /proc; unknown parts say "unknown". `busy_before` comes
    /// from `cpu_busy` before the run.
    pub fn here(busy_before: f64) -> Machine {
        Machine {
            nproc: sysinfo::nproc(),
            kernel: sysinfo::kernel().unwrap_or_else(|| "unknown".into()),
            cpu: sysinfo::cpu_model().unwrap_or_else(|| "unknown".into()),
            busy_before,
            load_end: load_average(),
        }
    }
}

/// Share of CPU time (all CPUs) not idle over `window`, from /proc/stat (0 if unreadable).
pub async fn cpu_busy(window: std::time::Duration) -> f64 {
    tokio::task::spawn_blocking(move || sysinfo::cpu_busy(window))
        .await
        .unwrap_or(0.0)
}

/// The 1-minute load average from /proc/loadavg (0 if unreadable).
pub fn load_average() -> f64 {
    sysinfo::load_average()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

#[derive(Debug, Serialize)]
pub struct Setup {
    pub members: usize,
    pub warmup_s: u64,
    pub duration_s: u64,
    pub clients: Vec<usize>,
    pub value_bytes: usize,
    pub failover_rounds: usize,
    pub failover_put_timeout_ms: u64,
    /// How the systems shared the machine.
    pub schedule: String,
    /// How clients connect.
    pub channels: String,
}

#[derive(Debug, Serialize)]
pub struct SystemResult {
    /// "flock" or "etcd".
    pub system: String,
    pub version: String,
    /// Raft timing and durability as configured.
    pub settings: String,
    /// Plaintext or TLS, on client and member-to-member connections.
    pub transport: String,
    pub throughput: Vec<Throughput>,
    pub failover: Vec<FailoverRound>,
    pub failover_median_ms: Option<f64>,
}

impl Report {
    fn system(&self, name: &str) -> Option<&SystemResult> {
        self.systems.iter().find(|s| s.system == name)
    }

    /// The comparison table in Markdown.
    pub fn table(&self) -> String {
        let flock = self.system("flock");
        let etcd = self.system("etcd");
        let etcd_title = etcd
            .map(|e| format!("etcd {}", short_version(&e.version)))
            .unwrap_or_else(|| "etcd 3.4".into());
        let mut rows: Vec<[String; 4]> = Vec::new();
        for &clients in &self.setup.clients {
            let of = |s: Option<&SystemResult>| {
                s.and_then(|s| s.throughput.iter().find(|t| t.clients == clients))
                    .cloned()
            };
            let (f, e) = (of(flock), of(etcd));
            let plural = if clients == 1 { "client" } else { "clients" };
            rows.push([
                format!("throughput {clients} {plural} (ops/s)"),
                cell(f.as_ref().map(|t| format!("{:.0}", t.ops_per_sec))),
                cell(e.as_ref().map(|t| format!("{:.0}", t.ops_per_sec))),
                ratio(
                    f.as_ref().map(|t| t.ops_per_sec),
                    e.as_ref().map(|t| t.ops_per_sec),
                ),
            ]);
            rows.push([
                format!("p50 / p99 {clients} {plural} (ms)"),
                cell(
                    f.as_ref()
                        .map(|t| format!("{:.2} / {:.2}", t.p50_ms, t.p99_ms)),
                ),
                cell(
                    e.as_ref()
                        .map(|t| format!("{:.2} / {:.2}", t.p50_ms, t.p99_ms)),
                ),
                format!(
                    "{} / {}",
                    ratio(f.as_ref().map(|t| t.p50_ms), e.as_ref().map(|t| t.p50_ms)),
                    ratio(f.as_ref().map(|t| t.p99_ms), e.as_ref().map(|t| t.p99_ms))
                ),
            ]);
            rows.push([
                format!("elections during the {clients}-{plural} run"),
                cell(f.as_ref().map(|t| t.elections.to_string())),
                cell(e.as_ref().map(|t| t.elections.to_string())),
                String::new(),
            ]);
            let errors = |t: &Option<Throughput>| t.as_ref().map(|t| t.errors).unwrap_or(0);
            if errors(&f) + errors(&e) > 0 {
                rows.push([
                    format!("failed puts {clients} {plural}"),
                    cell(f.as_ref().map(|t| t.errors.to_string())),
                    cell(e.as_ref().map(|t| t.errors.to_string())),
                    String::new(),
                ]);
            }
        }
        let gap = |s: Option<&SystemResult>| s.and_then(|s| s.failover_median_ms);
        rows.push([
            "failover gap median (ms)".into(),
            cell(gap(flock).map(|m| format!("{m:.0}"))),
            cell(gap(etcd).map(|m| format!("{m:.0}"))),
            ratio(gap(flock), gap(etcd)),
        ]);
        let elected = |s: Option<&SystemResult>| {
            s.and_then(|s| {
                let v: Vec<f64> = s
                    .failover
                    .iter()
                    .filter_map(|r| r.dead_to_leader_ms)
                    .collect();
                median(&v)
            })
        };
        rows.push([
            "new leader named after the kill, median (ms)".into(),
            cell(elected(flock).map(|m| format!("{m:.0}"))),
            cell(elected(etcd).map(|m| format!("{m:.0}"))),
            ratio(elected(flock), elected(etcd)),
        ]);
        let rounds = |s: Option<&SystemResult>| {
            s.filter(|s| !s.failover.is_empty()).map(|s| {
                s.failover
                    .iter()
                    .map(|r| format!("{:.0}", r.gap_ms))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
        };
        rows.push([
            "failover gaps, each round (ms)".into(),
            cell(rounds(flock)),
            cell(rounds(etcd)),
            String::new(),
        ]);

        let mut out = format!("| measure | flock | {etcd_title} | flock/etcd |\n");
        out.push_str("|---|---:|---:|---:|\n");
        for r in rows {
            out.push_str(&format!("| {} | {} | {} | {} |\n", r[0], r[1], r[2], r[3]));
        }
        out
    }

    /// The "latest run" section of RESULTS.md: header lines, then the table.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(BEGIN);
        out.push_str("\n## Latest run\n\n");
        out.push_str(&format!("- date: {}\n", self.date));
        out.push_str(&format!(
            "- machine: {} CPUs ({}), Linux {}; CPUs {:.0}% busy in the second before the \
             run, 1-minute load average {:.2} at its end\n",
            self.machine.nproc,
            self.machine.cpu,
            self.machine.kernel,
            self.machine.busy_before * 100.0,
            self.machine.load_end
        ));
        out.push_str(&format!("- command: `{}`\n", self.command));
        out.push_str(&format!(
            "- setup: {} members per system on 127.0.0.1, fsync on (defaults); {}; \
             {}-byte values to distinct keys; {}; {} s warm-up, then {} s measured\n",
            self.setup.members,
            self.setup.schedule,
            self.setup.value_bytes,
            self.setup.channels,
            self.setup.warmup_s,
            self.setup.duration_s
        ));
        for s in &self.systems {
            out.push_str(&format!(
                "- {} {}: {}; {}\n",
                s.system, s.version, s.settings, s.transport
            ));
        }
        out.push_str(&format!(
            "- failover: one writer putting sequentially with a {} ms timeout per put, moving to \
             the next live member after any error; the leader is killed with SIGKILL 2 s in; \
             gap = last write acknowledged before the kill to the first acknowledged after it; \
             new leader named = from the kill to the first time a live member names a new leader \
             (each asked every 20 ms, from its own view); {} rounds, the killed member restarted \
             between rounds\n\n",
            self.setup.failover_put_timeout_ms, self.setup.failover_rounds
        ));
        out.push_str(&self.table());
        out.push_str(
            "\nflock/etcd above 1 means flock's figure is higher: better for throughput, worse \
             for latency and the failover gap.\n\n",
        );
        out.push_str(END);
        out.push('\n');
        out
    }
}

/// Markers around the generated section of RESULTS.md; text outside them is the user's.
const BEGIN: &str =
    "<!-- flock-bench: latest run (generated; text outside these markers is kept) -->";
const END: &str = "<!-- flock-bench: end of latest run -->";

/// Replaces the latest-run section of `path` (or appends it, or creates the file).
pub fn write_results(path: &Path, report: &Report) -> Result<()> {
    let section = report.markdown();
    let old = match std::fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let new = match old {
        None => format!(
            "# flock-bench results\n\nflock's replicated store against etcd 3.4, measured by \
             `bench/run.sh` (see bench/src/main.rs for what is measured and how).\n\n{section}"
        ),
        Some(old) => match (old.find(BEGIN), old.find(END)) {
            (Some(b), Some(e)) if e > b => {
                let after = &old[e + END.len()..];
                let after = after.strip_prefix('\n').unwrap_or(after);
                format!("{}{section}{after}", &old[..b])
            }
            _ => {
                let sep = if old.ends_with("\n\n") || old.is_empty() {
                    ""
                } else if old.ends_with('\n') {
                    "\n"
                } else {
                    "\n\n"
                };
                format!("{old}{sep}{section}")
            }
        },
    };
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}

fn cell(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

/// "3.4" from "3.4.23".
fn short_version(v: &str) -> String {
    v.split('.').take(2).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            date: "2026-01-01T00:00:00Z".into(),
            machine: Machine {
                nproc: 2,
                kernel: "6".into(),
                cpu: "x".into(),
                busy_before: 0.0,
                load_end: 0.0,
            },
            command: "bench/run.sh".into(),
            setup: Setup {
                members: 3,
                warmup_s: 2,
                duration_s: 10,
                clients: vec![1],
                value_bytes: 64,
                failover_rounds: 1,
                failover_put_timeout_ms: 500,
                schedule: "one at a time".into(),
                channels: "one channel per client".into(),
            },
            systems: vec![SystemResult {
                system: "etcd".into(),
                version: "3.4.23".into(),
                settings: "defaults".into(),
                transport: "plaintext".into(),
                throughput: vec![],
                failover: vec![],
                failover_median_ms: Some(1000.0),
            }],
        }
    }

    #[test]
    fn results_section_is_replaced_and_other_text_kept() {
        let dir = std::env::temp_dir().join(format!("flock-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("RESULTS.md");
        std::fs::write(&path, "# mine\n\nnotes before\n").unwrap();
        write_results(&path, &report()).unwrap();
        let once = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{once}\nnotes after\n")).unwrap();
        write_results(&path, &report()).unwrap();
        let twice = std::fs::read_to_string(&path).unwrap();
        assert!(twice.starts_with("# mine\n\nnotes before\n"));
        assert!(twice.ends_with("\nnotes after\n"));
        assert_eq!(twice.matches(BEGIN).count(), 1);
        assert!(twice.contains("| failover gap median (ms) | - | 1000 | - |"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
