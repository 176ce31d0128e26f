//! The tables, and the generated part of bench/RESULTS.md's "Snapshot streams" section.

use std::path::Path;

use anyhow::{Context, Result};

use flock_tls::pki::NodeTls;
use flock_transport::quic::QuicTuning;

use crate::datasets::Moved;
use crate::raw::{Measure, Pair};
use crate::sysinfo;

pub const BEGIN: &str =
    "<!-- flock-streams: latest run (generated; text outside these markers is kept) -->";
pub const END: &str = "<!-- flock-streams: end of latest run -->";

pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub busy_before: f64,
    pub load_end: f64,
}

pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub command: String,
    /// How QUIC was set up, as opened on this machine.
    pub settings: String,
    pub transports: Vec<Row>,
    pub study: Vec<Row>,
    pub datasets: Vec<DatasetRow>,
}

/// One transport (or tuning variant) at one size.
pub struct Row {
    pub label: String,
    pub mib: u64,
    pub gbps: f64,
    pub min: f64,
    pub max: f64,
    pub cpu_per_gb: f64,
    pub drops: u64,
}

impl Row {
    pub fn new(label: &str, mib: u64, ms: Vec<Measure>) -> Row {
        let rates: Vec<f64> = ms.iter().map(|m| m.gbps()).collect();
        let cpu: Vec<f64> = ms.iter().map(|m| m.cpu_per_gb()).collect();
        Row {
            label: label.to_string(),
            mib,
            gbps: median(&rates),
            min: rates.iter().cloned().fold(f64::INFINITY, f64::min),
            max: rates.iter().cloned().fold(0.0, f64::max),
            cpu_per_gb: median(&cpu),
            drops: ms.iter().map(|m| m.udp_drops).sum(),
        }
    }
}

/// One method moving one snapshot of one backend.
pub struct DatasetRow {
    pub backend: String,
    pub phase: &'static str,
    pub mib: u64,
    pub method: String,
    /// The backend stream's size, bytes.
    pub payload: u64,
    pub secs: f64,
    pub cpu_secs: f64,
}

impl DatasetRow {
    pub fn new(
        backend: &str,
        phase: &'static str,
        mib: u64,
        method: &str,
        payload: u64,
        runs: Vec<Moved>,
    ) -> DatasetRow {
        let secs: Vec<f64> = runs.iter().map(|r| r.secs).collect();
        let cpu: Vec<f64> = runs.iter().map(|r| r.cpu_secs).collect();
        DatasetRow {
            backend: backend.to_string(),
            phase,
            mib,
            method: method.to_string(),
            payload,
            secs: median(&secs),
            cpu_secs: median(&cpu),
        }
    }

    fn mbps(&self) -> f64 {
        self.payload as f64 / self.secs / 1e6
    }
}

/// The size of the full and the incremental stream, from any run that counted it.
pub fn payloads(results: &[Vec<[Moved; 2]>]) -> [u64; 2] {
    let mut out = [0, 0];
    for runs in results {
        for r in runs {
            for i in 0..2 {
                out[i] = out[i].max(r[i].payload);
            }
        }
    }
    out
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The 1-minute load average (0 if unreadable).
pub fn load_average() -> f64 {
    sysinfo::load_average()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// flock's QUIC settings as an endpoint opened on this machine gets them.
pub fn settings(pair: &Pair, tls: &NodeTls) -> Result<String> {
    let _g = pair.receiver.enter();
    let opened = QuicTuning::default()
        .open("127.0.0.1:0".parse().expect("an address"), tls, true)
        .context("cannot open a QUIC endpoint")?;
    let t = &opened.tuning;
    let s = format!(
        "flock's QUIC tuning: receive windows {} MiB per stream / {} MiB per connection (fitted to the socket's \
         receive buffer: SO_RCVBUF {} MiB granted, SO_SNDBUF {} MiB; net.core.rmem_max {}), send window \
         {} MiB, MTU discovery from {} up to {} bytes, GSO on with batches split at 64 KiB, {:?} \
         congestion control, keep-alive {:?}, idle timeout {:?}",
        t.stream_receive_window >> 20,
        t.receive_window >> 20,
        opened.recv_buffer >> 20,
        opened.send_buffer >> 20,
        read_trimmed("/proc/sys/net/core/rmem_max"),
        t.send_window >> 20,
        t.initial_mtu,
        t.mtu_discovery_upper_bound.unwrap_or(t.initial_mtu),
        t.congestion,
        t.keep_alive.unwrap_or_default(),
        t.idle_timeout,
    );
    opened.endpoint.close(0u32.into(), b"");
    Ok(s)
}

impl Report {
    pub fn new(date: String, busy_before: f64, command: &str) -> Report {
        Report {
            date,
            machine: Machine {
                nproc: sysinfo::nproc(),
                cpu: sysinfo::cpu_model().unwrap_or_else(|| "unknown".into()),
                kernel: sysinfo::kernel().unwrap_or_else(|| "unknown".into()),
                busy_before,
                load_end: 0.0,
            },
            command: command.to_string(),
            settings: String::new(),
            transports: Vec::new(),
            study: Vec::new(),
            datasets: Vec::new(),
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        s.push_str("### Latest run\n\n");
        s.push_str(&format!("- date: {}\n", self.date));
        s.push_str(&format!(
            "- machine: {} CPUs ({}), Linux {}; CPUs {:.0}% busy in the second before the run, \
             1-minute load average {:.2} at its end\n",
            m.nproc,
            m.cpu,
            m.kernel,
            m.busy_before * 100.0,
            m.load_end
        ));
        s.push_str(&format!("- command: `{}`\n", self.command));
        s.push_str(
            "- setup: sender and receiver in two tokio runtimes of 2 workers each in one process \
             (as two flockd), over 127.0.0.1; time from the sender's first write to the \
             receiver's last read (datasets: to the receiver's commit); writes of 256 KiB, as \
             the dataset sender's frames; median of the repetitions, interleaved\n",
        );
        s.push_str(&format!("- {}\n\n", self.settings));

        let sizes: Vec<u64> = {
            let mut v: Vec<u64> = self.transports.iter().map(|r| r.mib).collect();
            v.dedup();
            v
        };
        if !self.transports.is_empty() {
            s.push_str("#### Transports\n\n| transport |");
            for mib in &sizes {
                s.push_str(&format!(
                    " {mib} MiB: GB/s (min-max) | CPU s/GB | UDP drops | / TLS |"
                ));
            }
            s.push_str("\n|---|");
            for _ in &sizes {
                s.push_str("---:|---:|---:|---:|");
            }
            s.push('\n');
            let labels: Vec<&str> = {
                let mut v: Vec<&str> = Vec::new();
                for r in &self.transports {
                    if !v.contains(&r.label.as_str()) {
                        v.push(&r.label);
                    }
                }
                v
            };
            for label in labels {
                s.push_str(&format!("| {label} |"));
                for mib in &sizes {
                    let row = self
                        .transports
                        .iter()
                        .find(|r| r.label == label && r.mib == *mib);
                    let tls = self
                        .transports
                        .iter()
                        .find(|r| r.label.starts_with("TLS") && r.mib == *mib);
                    match row {
                        Some(r) => s.push_str(&format!(
                            " {:.2} ({:.2}-{:.2}) | {:.2} | {} | {} |",
                            r.gbps,
                            r.min,
                            r.max,
                            r.cpu_per_gb,
                            r.drops,
                            tls.map(|t| format!("{:.2}", r.gbps / t.gbps))
                                .unwrap_or_default()
                        )),
                        None => s.push_str(" | | | |"),
                    }
                }
                s.push('\n');
            }
            s.push('\n');
        }

        if !self.study.is_empty() {
            s.push_str(
                "#### QUIC tuning, one setting at a time (1 GiB, one stream unless lanes)\n\n\
                 | variant | GB/s (min-max) | CPU s/GB | UDP drops | / quinn defaults |\n\
                 |---|---:|---:|---:|---:|\n",
            );
            let base = self.study.first().map(|r| r.gbps).unwrap_or(f64::NAN);
            for r in &self.study {
                s.push_str(&format!(
                    "| {} | {:.2} ({:.2}-{:.2}) | {:.2} | {} | {:.2} |\n",
                    r.label,
                    r.gbps,
                    r.min,
                    r.max,
                    r.cpu_per_gb,
                    r.drops,
                    r.gbps / base
                ));
            }
            s.push('\n');
        }

        if !self.datasets.is_empty() {
            s.push_str(
                "#### Dataset streams: flock over QUIC against a local pipe\n\n\
                 | backend | snapshot | method | seconds | MB/s of stream | CPU s | / local pipe |\n\
                 |---|---|---|---:|---:|---:|---:|\n",
            );
            for r in &self.datasets {
                let pipe = self.datasets.iter().find(|p| {
                    p.backend == r.backend && p.phase == r.phase && p.method == "local pipe"
                });
                s.push_str(&format!(
                    "| {} | {} ({} MiB written, {} MiB stream) | {} | {:.2} | {:.0} | {} | {} |\n",
                    r.backend,
                    r.phase,
                    r.mib,
                    r.payload >> 20,
                    r.method,
                    r.secs,
                    r.mbps(),
                    if r.cpu_secs.is_nan() {
                        "-".to_string()
                    } else {
                        format!("{:.2}", r.cpu_secs)
                    },
                    pipe.map(|p| format!("{:.2}", p.secs / r.secs))
                        .unwrap_or_default()
                ));
            }
            s.push_str(
                "\n/ local pipe is the local pipe's time over this method's: above 1 is faster \
                 than the pipe. CPU s is the benchmark process's CPU time (the zfs pipe and the \
                 flockd nodes run in other processes: none or `-`). The flockd rows take the \
                 stream size from the rows above (the same data).\n",
            );
        }
        s
    }
}

/// Rewrites the text between the markers in `path`, or appends a "Snapshot streams" section
/// with them.
pub fn write_results(path: &Path, generated: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{generated}\n{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{block}{}", &old[..a], &old[b + END.len()..])
        }
        _ => format!(
            "{}\n## Snapshot streams (issue 5)\n\n{block}\n",
            old.trim_end()
        ),
    };
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}
