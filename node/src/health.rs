//! Health checks of process apps (compose's `healthcheck`): Docker runs a container's itself;
//! for a process, flock runs the check command, as Docker would: every `interval` (30 s by
//! default), each run at most `timeout` (30 s), `retries` (3) failures in a row make it
//! unhealthy, failures within `start_period` do not count, and it is "starting" (not healthy)
//! until a check passes.
//!
//! [`Verdicts`] is the pure part: runs' results and time in, the verdict out. [`Prober`] runs
//! the commands, never blocking a look: a check runs in its own task, and a look takes the
//! results that are in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flock_scheduler::config::HealthCheck;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_RETRIES: u32 = 3;

fn ms(v: Option<u64>, default: Duration) -> Duration {
    v.map_or(default, Duration::from_millis)
}

/// One instance's check state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The instance it is about (a new instance starts over).
    pub id: String,
    pub since: Instant,
    pub next_due: Instant,
    pub failures: u32,
    /// `None` until a check passes or fails for good: starting.
    pub healthy: Option<bool>,
}

impl Verdict {
    pub fn new(id: &str, now: Instant) -> Verdict {
        Verdict {
            id: id.to_string(),
            since: now,
            next_due: now,
            failures: 0,
            healthy: None,
        }
    }

    /// Whether a check is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_due
    }

    /// A check was started at `now`: the next is an interval later.
    pub fn started(&mut self, check: &HealthCheck, now: Instant) {
        self.next_due = now + ms(check.interval_ms, DEFAULT_INTERVAL);
    }

    /// A check that ended at `now` passed (`ok`) or not.
    pub fn ended(&mut self, check: &HealthCheck, ok: bool, now: Instant) {
        if ok {
            self.failures = 0;
            self.healthy = Some(true);
            return;
        }
        if now < self.since + ms(check.start_period_ms, Duration::ZERO) {
            return;
        }
        self.failures += 1;
        if self.failures >= check.retries.unwrap_or(DEFAULT_RETRIES).max(1) {
            self.healthy = Some(false);
        }
    }

    /// Healthy: a check passed since the last run of failures long enough to count.
    pub fn is_healthy(&self) -> bool {
        self.healthy == Some(true)
    }
}

/// The program and arguments a check runs: `["CMD", prog, args...]` directly,
/// `["CMD-SHELL", script]` through `sh -c`; `None` for `["NONE"]`, a disabled or empty check.
pub fn argv(check: &HealthCheck) -> Option<Vec<String>> {
    if check.disable {
        return None;
    }
    match check.test.split_first() {
        Some((kind, rest)) if kind == "CMD" && !rest.is_empty() => Some(rest.to_vec()),
        Some((kind, rest)) if kind == "CMD-SHELL" && !rest.is_empty() => {
            Some(vec!["sh".into(), "-c".into(), rest.join(" ")])
        }
        _ => None,
    }
}

/// The checks of this node's process apps, and the verdicts so far, by app.
#[derive(Default)]
pub struct Prober {
    verdicts: BTreeMap<String, Verdict>,
    running: BTreeMap<String, tokio::task::JoinHandle<bool>>,
}

impl Prober {
    /// One look: `apps` are the running process apps with a check; results that came in are
    /// counted, due checks started. Returns the verdicts (`None` while starting).
    pub fn look(&mut self, apps: &[Checked], now: Instant) -> BTreeMap<String, Option<bool>> {
        self.verdicts
            .retain(|name, v| apps.iter().any(|c| &c.name == name && c.id == v.id));
        self.running
            .retain(|name, _| self.verdicts.contains_key(name));
        let mut out = BTreeMap::new();
        for Checked {
            name,
            id,
            check,
            env,
            cwd,
            creds,
        } in apps
        {
            let Some(argv) = argv(check) else { continue };
            let v = self
                .verdicts
                .entry(name.clone())
                .or_insert_with(|| Verdict::new(id, now));
            if self.running.get(name).is_some_and(|h| h.is_finished()) {
                if let Some(h) = self.running.remove(name) {
                    let ok = futures::FutureExt::now_or_never(h)
                        .and_then(Result::ok)
                        .unwrap_or(false);
                    v.ended(check, ok, now);
                }
            }
            if !self.running.contains_key(name) && v.due(now) {
                v.started(check, now);
                let timeout = ms(check.timeout_ms, DEFAULT_TIMEOUT);
                let (env, cwd, creds) = (env.clone(), cwd.clone(), *creds);
                self.running.insert(
                    name.clone(),
                    tokio::spawn(run(argv, env, cwd, creds, timeout)),
                );
            }
            out.insert(name.clone(), v.healthy);
        }
        out
    }
}

/// A running process app's check, and where it runs: as Docker runs a container's check inside
/// it, with the instance's own environment (`FLOCK_NODE_HOST`, `PORT`, `FLOCK_DATASET_PATH`,
/// the siblings' service hosts...) and in its working directory.
pub struct Checked {
    pub name: String,
    /// The instance it is about (a new instance starts over).
    pub id: String,
    pub check: HealthCheck,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<std::path::PathBuf>,
    /// The uid and gid it runs as: the instance's own (`None`: flockd's, in tests only).
    pub creds: Option<(u32, u32)>,
}

/// The effective uid and gid of process `pid`, from /proc/PID/status.
fn creds_of(pid: &str) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| -> Option<u32> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        // "Uid:\treal\teffective\tsaved\tfs"
        line.split_whitespace().nth(2)?.parse().ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// Whom a check runs as when its instance's credentials cannot be read (it just exited):
/// nobody, never root.
const NOBODY: (u32, u32) = (65534, 65534);

impl Checked {
    /// The check of the process `pid`: its environment, working directory and credentials as
    /// /proc shows them (a check of an app with `user:` runs as that user, as a container's
    /// runs inside it), or when they cannot be read (it just exited), `spec_env` in flockd's
    /// directory, as nobody.
    pub fn of_process(
        name: &str,
        pid: &str,
        check: HealthCheck,
        spec_env: &BTreeMap<String, String>,
    ) -> Checked {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok();
        let env = match environ {
            Some(bytes) => bytes
                .split(|b| *b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect(),
            None => spec_env.clone(),
        };
        Checked {
            name: name.to_string(),
            id: pid.to_string(),
            check,
            env,
            cwd: std::fs::read_link(format!("/proc/{pid}/cwd")).ok(),
            creds: Some(creds_of(pid).unwrap_or(NOBODY)),
        }
    }
}

/// Runs one check: true when it exits 0 within `timeout` (it is killed otherwise).
async fn run(
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<std::path::PathBuf>,
    creds: Option<(u32, u32)>,
    timeout: Duration,
) -> bool {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    if let Some((uid, gid)) = creds {
        // std drops root's supplementary groups (setgroups) when it changes the uid.
        cmd.uid(uid).gid(gid);
    }
    cmd.args(&argv[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .envs(&env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    match cmd.spawn() {
        Ok(mut child) => matches!(
            tokio::time::timeout(timeout, child.wait()).await,
            Ok(Ok(st)) if st.success()
        ),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(retries: u32, start_period_ms: u64) -> HealthCheck {
        HealthCheck {
            test: vec!["CMD".into(), "true".into()],
            interval_ms: Some(1000),
            timeout_ms: Some(500),
            retries: Some(retries),
            start_period_ms: Some(start_period_ms),
            disable: false,
        }
    }

    #[test]
    fn a_check_is_starting_then_healthy_then_unhealthy_after_its_retries() {
        let t0 = Instant::now();
        let c = check(2, 5000);
        let mut v = Verdict::new("1", t0);
        assert!(v.due(t0) && !v.is_healthy());
        v.started(&c, t0);
        assert!(!v.due(t0 + Duration::from_millis(999)) && v.due(t0 + Duration::from_secs(1)));
        // Failures within the start period do not count.
        v.ended(&c, false, t0 + Duration::from_secs(1));
        assert_eq!((v.failures, v.healthy), (0, None));
        v.ended(&c, true, t0 + Duration::from_secs(2));
        assert!(v.is_healthy());
        v.ended(&c, false, t0 + Duration::from_secs(6));
        assert!(v.is_healthy(), "one failure of two allowed");
        v.ended(&c, false, t0 + Duration::from_secs(7));
        assert_eq!(v.healthy, Some(false));
        v.ended(&c, true, t0 + Duration::from_secs(8));
        assert!(v.is_healthy());
    }

    #[test]
    fn the_check_runs_directly_or_in_a_shell_or_not_at_all() {
        let mut c = check(1, 0);
        assert_eq!(argv(&c), Some(vec!["true".to_string()]));
        c.test = vec!["CMD-SHELL".into(), "test -f /x".into()];
        assert_eq!(argv(&c).unwrap(), ["sh", "-c", "test -f /x"]);
        c.test = vec!["NONE".into()];
        assert_eq!(argv(&c), None);
        c.test = vec!["CMD".into(), "true".into()];
        c.disable = true;
        assert_eq!(argv(&c), None);
    }

    #[tokio::test]
    async fn the_prober_runs_real_commands() {
        let mut p = Prober::default();
        let t0 = Instant::now();
        let mut ok = check(1, 0);
        ok.test = vec!["CMD".into(), "true".into()];
        let mut bad = check(1, 0);
        bad.test = vec!["CMD-SHELL".into(), "exit 3".into()];
        let checked = |name: &str, id: &str, check: HealthCheck| Checked {
            name: name.into(),
            id: id.into(),
            check,
            env: BTreeMap::new(),
            cwd: None,
            creds: None,
        };
        let apps = vec![checked("good", "1", ok.clone()), checked("bad", "2", bad)];
        assert_eq!(
            p.look(&apps, t0),
            BTreeMap::from([("bad".to_string(), None), ("good".to_string(), None)])
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = p.look(&apps, t0 + Duration::from_millis(300));
        assert_eq!(seen["good"], Some(true), "{seen:?}");
        assert_eq!(seen["bad"], Some(false), "{seen:?}");
        assert_eq!(p.verdicts["bad"].healthy, Some(false));
        // A new instance starts over.
        let again = vec![checked("good", "9", ok)];
        assert_eq!(p.look(&again, t0 + Duration::from_secs(2))["good"], None);
        assert!(!p.verdicts.contains_key("bad"));
    }

    /// Runs `shell` once as the check of the process `app` (then ended): the verdict, and
    /// what the check was built from.
    async fn check_once(mut app: std::process::Child, shell: &str) -> (Option<bool>, Checked) {
        let mut c = check(1, 0);
        c.test = vec!["CMD-SHELL".into(), shell.into()];
        let pid = app.id().to_string();
        let apps = vec![Checked::of_process("web", &pid, c, &BTreeMap::new())];
        let mut p = Prober::default();
        let t0 = Instant::now();
        p.look(&apps, t0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = p.look(&apps, t0 + Duration::from_millis(300));
        let _ = app.kill();
        let _ = app.wait();
        let checked = apps.into_iter().next().expect("one app");
        (seen["web"], checked)
    }

    /// A check runs as its instance's user: an app started as nobody (`user: nobody`) is not
    /// checked as root.
    #[tokio::test]
    async fn a_check_runs_as_the_instances_user() {
        use std::os::unix::process::CommandExt;
        let app = std::process::Command::new("sleep")
            .arg("30")
            .uid(65534)
            .gid(65534)
            .spawn()
            .unwrap();
        let (seen, checked) = check_once(app, "test \"$(id -u):$(id -g)\" = 65534:65534").await;
        assert_eq!(checked.creds, Some((65534, 65534)));
        assert_eq!(seen, Some(true), "the check did not run as nobody");
    }

    /// A process app's check runs as if inside it: with the instance's environment (where it
    /// learns its node's host, its port...) and in its working directory.
    #[tokio::test]
    async fn a_check_runs_in_the_instances_environment_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("marker"), "").unwrap();
        let app = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .env("FLOCK_NODE_HOST", "127.0.0.42")
            .spawn()
            .unwrap();
        let (seen, checked) = check_once(
            app,
            "test \"$FLOCK_NODE_HOST\" = 127.0.0.42 && test -e marker",
        )
        .await;
        assert_eq!(
            seen,
            Some(true),
            "{:?} {:?}",
            checked.env.get("FLOCK_NODE_HOST"),
            checked.cwd
        );
    }
}
