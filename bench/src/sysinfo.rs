//! What the machine is and how busy it is, from /proc, for every benchmark's report.
//!
//! Shared by all of bench's binaries: flock-bench declares it with `mod sysinfo;`, the others
//! with `#[path = ...] mod sysinfo;`. Each caller picks its own text for what is unreadable.

use std::time::Duration;

/// The CPU's model name, from /proc/cpuinfo.
pub fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The kernel's release, from /proc/sys/kernel/osrelease.
pub fn kernel() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// The CPUs this process may use (0 if unknown).
pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The 1-minute load average as /proc/loadavg writes it.
pub fn load_average() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()
        .map(str::to_string)
}

/// /proc/stat's total and idle (idle + iowait) jiffies since boot, all CPUs.
pub fn busy_counters() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    Some((fields.iter().sum(), fields.get(3)? + fields.get(4)?))
}

/// The share of CPU time (all CPUs) not idle since `from`, a [`busy_counters`] (0 if
/// unreadable).
pub fn busy_since(from: Option<(u64, u64)>) -> f64 {
    match (from, busy_counters()) {
        (Some((t0, i0)), Some((t1, i1))) if t1 > t0 => {
            1.0 - i1.saturating_sub(i0) as f64 / (t1 - t0) as f64
        }
        _ => 0.0,
    }
}

/// The share of CPU time (all CPUs) not idle over `window`, blocking for it (0 if
/// unreadable).
pub fn cpu_busy(window: Duration) -> f64 {
    let from = busy_counters();
    std::thread::sleep(window);
    busy_since(from)
}
