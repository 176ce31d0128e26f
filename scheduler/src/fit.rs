//! Whether an app fits a node: the node's driver, labels, memory and cpu against what the app
//! asks for and what the apps already placed there take. Pure.
//!
//! A node reports its [`Capacity`] and labels when it starts ([`crate::Command::ReportNode`]).
//! Memory is reserved by `mem_limit`, cpu by `cpu_shares` as Kubernetes maps cpu requests to
//! cgroup shares: 1024 shares are one cpu, so a node with 2 cpus holds apps whose shares add up
//! to at most 2048. An app without a limit reserves nothing. A node that has not reported yet
//! (an older flockd) is taken to fit everything but its labels, which it has none of.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{AppSpec, Constraint, ConstraintKey};
use crate::state::Node;

/// The cpu shares of one cpu.
pub const SHARES_PER_CPU: u64 = 1024;

/// What a node offers apps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Memory in bytes.
    pub memory: u64,
    /// Cpus flockd may use.
    pub cpus: u32,
    /// Whether the node's docker driver works (the process driver always does).
    pub docker: bool,
}

impl Capacity {
    pub fn cpu_shares(&self) -> u64 {
        u64::from(self.cpus) * SHARES_PER_CPU
    }
}

/// What the apps placed on a node reserve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reserved {
    pub memory: u64,
    pub cpu_shares: u64,
}

impl Reserved {
    pub fn add(&mut self, app: &AppSpec) {
        self.memory += app.mem_limit.unwrap_or(0);
        self.cpu_shares += app.cpu_shares.unwrap_or(0);
    }
}

/// Whether the app needs the docker driver.
pub fn needs_docker(app: &AppSpec) -> bool {
    app.image.is_some()
}

/// Why `app` cannot run on `node` with `reserved` already taken there; `None` when it fits.
pub fn misfit(node: &Node, app: &AppSpec, reserved: Reserved) -> Option<String> {
    for c in &app.constraints {
        if !satisfies(node, c) {
            return Some(format!("it does not satisfy the constraint {c}"));
        }
    }
    let cap = node.capacity.as_ref()?;
    if needs_docker(app) && !cap.docker {
        return Some(
            "the app has an image and the node has no working docker driver (is the Docker engine running there?)"
                .to_string(),
        );
    }
    if let Some(mem) = app.mem_limit {
        let free = cap.memory.saturating_sub(reserved.memory);
        if mem > free {
            return Some(format!(
                "mem_limit {} is more than the {} of memory left there (of {})",
                bytes(mem),
                bytes(free),
                bytes(cap.memory)
            ));
        }
    }
    if let Some(shares) = app.cpu_shares {
        let free = cap.cpu_shares().saturating_sub(reserved.cpu_shares);
        if shares > free {
            return Some(format!(
                "cpu_shares {shares} is more than the {free} left there ({} cpus, {SHARES_PER_CPU} shares each)",
                cap.cpus
            ));
        }
    }
    None
}

fn satisfies(node: &Node, c: &Constraint) -> bool {
    let have = match &c.key {
        ConstraintKey::NodeName => Some(node.name.as_str()),
        ConstraintKey::Label(k) => node.labels.get(k).map(String::as_str),
    };
    (have == Some(c.value.as_str())) == c.equal
}

/// A short, exact size: `512 MiB`, `1.5 GiB`, `1000 B`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    let s = format!("{v:.1}");
    format!("{} {}", s.trim_end_matches(".0"), UNITS[unit])
}

/// Checks a node's labels: keys and values of letters, digits, `.`, `_`, `-` and `/`, 1-63
/// bytes (keys) and 0-63 bytes (values). The reason when not.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    let ok = |s: &str| {
        s.len() <= crate::limits::MAX_LABEL_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    };
    for (k, v) in labels {
        if k.is_empty() || !ok(k) {
            return Err(format!(
                "label key {}: use 1-63 letters, digits, '.', '_', '-' or '/'",
                crate::limits::shown(k)
            ));
        }
        if !ok(v) {
            return Err(format!(
                "label {}={}: use at most 63 letters, digits, '.', '_', '-' or '/'",
                crate::limits::shown(k),
                crate::limits::shown(v)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NodeState;

    fn node(cap: Option<Capacity>, labels: &[(&str, &str)]) -> Node {
        Node {
            id: 1,
            name: "n1".into(),
            addr: "h:1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: NodeState::Ready,
            capacity: cap,
        }
    }

    fn app(image: bool, mem: Option<u64>, cpu: Option<u64>, constraints: &[&str]) -> AppSpec {
        AppSpec {
            name: "a".into(),
            image: image.then(|| "busybox".into()),
            command: (!image).then(|| vec!["run".into()]),
            ports: vec![],
            links: vec![],
            volume: None,
            environment: BTreeMap::new(),
            restart_policy: Default::default(),
            mem_limit: mem,
            cpu_shares: cpu,
            constraints: constraints
                .iter()
                .map(|c| c.parse().expect("a valid constraint"))
                .collect(),
            ..Default::default()
        }
    }

    const GIB: u64 = 1 << 30;

    fn cap(memory: u64, cpus: u32, docker: bool) -> Option<Capacity> {
        Some(Capacity {
            memory,
            cpus,
            docker,
        })
    }

    #[test]
    fn memory_and_cpu_count_what_is_reserved() {
        let n = node(cap(4 * GIB, 2, true), &[]);
        let none = Reserved::default();
        assert_eq!(
            misfit(&n, &app(false, Some(4 * GIB), Some(2048), &[]), none),
            None
        );
        let half = Reserved {
            memory: 3 * GIB,
            cpu_shares: 1024,
        };
        let m = misfit(&n, &app(false, Some(2 * GIB), None, &[]), half).unwrap();
        assert!(
            m.contains("mem_limit 2 GiB") && m.contains("1 GiB of memory left"),
            "{m}"
        );
        let c = misfit(&n, &app(false, None, Some(1536), &[]), half).unwrap();
        assert!(
            c.contains("cpu_shares 1536") && c.contains("1024 left"),
            "{c}"
        );
        assert_eq!(misfit(&n, &app(false, None, None, &[]), half), None);
    }

    #[test]
    fn images_need_docker() {
        let n = node(cap(GIB, 1, false), &[]);
        let m = misfit(&n, &app(true, None, None, &[]), Reserved::default()).unwrap();
        assert!(m.contains("docker"), "{m}");
        assert_eq!(
            misfit(&n, &app(false, None, None, &[]), Reserved::default()),
            None
        );
    }

    #[test]
    fn constraints_match_labels_and_names() {
        let n = node(None, &[("disk", "ssd")]);
        let r = Reserved::default();
        assert_eq!(
            misfit(
                &n,
                &app(true, Some(GIB), None, &["node.labels.disk == ssd"]),
                r
            ),
            None
        );
        assert_eq!(
            misfit(&n, &app(false, None, None, &["node.hostname==n1"]), r),
            None
        );
        assert_eq!(
            misfit(&n, &app(false, None, None, &["node.labels.zone != a"]), r),
            None
        );
        let m = misfit(&n, &app(false, None, None, &["node.labels.disk==hdd"]), r).unwrap();
        assert!(m.contains("node.labels.disk == hdd"), "{m}");
        assert!(misfit(&n, &app(false, None, None, &["node.name != n1"]), r).is_some());
    }

    #[test]
    fn labels_are_checked() {
        let mut l = BTreeMap::new();
        l.insert("zone".to_string(), "eu-1".to_string());
        assert!(validate_labels(&l).is_ok());
        l.insert("bad key".to_string(), "x".to_string());
        assert!(validate_labels(&l).unwrap_err().contains("bad key"));
    }
}
