//! The `process` driver: runs an app's `command` as a child process of flockd, in its own
//! process group, with the app's environment, its dataset as working directory and in
//! `FLOCK_DATASET_PATH`, and its output appended to a log file.
//!
//! ```text
//! ROOT/APP/spec.json    the RunSpec it was started from
//! ROOT/APP/pid          "PID STARTTIME STARTED_UNIX": STARTTIME (from /proc/PID/stat) tells the
//!                       process apart from a later one that reuses the pid
//! ROOT/APP/exit         "code N" or "signal N", written when flockd saw it exit
//! ROOT/APP/restarts     how many times the app had been restarted when it started
//! ROOT/APP/output.log   stdout and stderr
//! ROOT/APP/work/        the working directory of an app without a dataset (the app's own)
//! ```
//!
//! Everything here is private to flockd's user (directories 0700, files 0600, whatever the
//! umask): a spec holds the app's environment, often passwords, and its log what it printed.
//! The app itself runs with the umask flockd was started with.
//!
//! The process outlives flockd (its own process group, not killed with flockd), so a restarted
//! flockd adopts it from the pid file. Calls block (files, signals, waiting for an exit): run
//! them on `spawn_blocking`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{DriverError, Instance, RunSpec, RunState};
use crate::datadir::create_private_dir;

/// How long a stopped app may take to exit after SIGTERM before it gets SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs apps as processes; one per node, rooted in the node's data dir.
#[derive(Debug, Clone)]
pub struct ProcessDriver {
    root: PathBuf,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot), and whether the process
/// is a zombie; `None` when there is no such process.
fn proc_start(pid: i32) -> Option<(u64, bool)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let zombie = fields.first() == Some(&"Z");
    Some((fields.get(19)?.parse().ok()?, zombie))
}

/// A recorded process, alive only if the pid still names the same process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PidRecord {
    pid: i32,
    start: u64,
    since_unix: u64,
}

impl PidRecord {
    fn parse(text: &str) -> Option<PidRecord> {
        let mut it = text.split_whitespace().map(str::parse::<u64>);
        Some(PidRecord {
            pid: i32::try_from(it.next()?.ok()?).ok()?,
            start: it.next()?.ok()?,
            since_unix: it.next()?.ok()?,
        })
    }

    fn alive(&self) -> bool {
        matches!(proc_start(self.pid), Some((start, false)) if start == self.start)
    }
}

impl ProcessDriver {
    /// A driver keeping its records under `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<ProcessDriver> {
        let root = root.into();
        create_private_dir(&root)?;
        Ok(ProcessDriver { root })
    }

    fn dir(&self, app: &str) -> PathBuf {
        self.root.join(app)
    }

    fn io(app: &str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
        let (app, what) = (app.to_string(), what.into());
        move |source| DriverError::Io { app, what, source }
    }

    fn pid_record(&self, app: &str) -> Option<PidRecord> {
        PidRecord::parse(&fs::read_to_string(self.dir(app).join("pid")).ok()?)
    }

    /// The instance of `app`, if this driver ever started it and it was not removed.
    pub fn instance(&self, app: &str) -> Option<Instance> {
        let dir = self.dir(app);
        let spec: RunSpec = serde_json::from_slice(&fs::read(dir.join("spec.json")).ok()?).ok()?;
        let rec = self.pid_record(app);
        let state = match rec {
            Some(r) if r.alive() => RunState::Running {
                since_unix: r.since_unix,
            },
            _ => {
                let exit = fs::read_to_string(dir.join("exit")).unwrap_or_default();
                let mut it = exit.split_whitespace();
                let (kind, n) = (it.next(), it.next().and_then(|n| n.parse().ok()));
                RunState::Exited {
                    code: if kind == Some("code") { n } else { None },
                    signal: if kind == Some("signal") { n } else { None },
                }
            }
        };
        Some(Instance {
            app: app.to_string(),
            fingerprint: spec.fingerprint(),
            state,
            id: rec.map(|r| r.pid.to_string()).unwrap_or_default(),
            restarts: fs::read_to_string(dir.join("restarts"))
                .ok()
                .and_then(|r| r.trim().parse().ok())
                .unwrap_or(0),
        })
    }

    /// Every app this driver has a record of, running or exited.
    pub fn list(&self) -> Vec<Instance> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<Instance> = entries
            .flatten()
            .filter_map(|e| self.instance(&e.file_name().to_string_lossy()))
            .collect();
        out.sort_by(|a, b| a.app.cmp(&b.app));
        out
    }

    /// Starts `spec`'s command, recording `restarts` with it. Refused while an instance of the
    /// app runs.
    pub fn start(&self, spec: &RunSpec, restarts: u32) -> Result<Instance, DriverError> {
        let app = &spec.app;
        if let Some(r) = self.pid_record(app).filter(PidRecord::alive) {
            return Err(DriverError::AlreadyRunning {
                app: app.clone(),
                id: r.pid.to_string(),
            });
        }
        let argv = spec
            .command
            .as_ref()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| DriverError::NoCommand { app: app.clone() })?;
        let dir = self.dir(app);
        create_private_dir(&dir).map_err(Self::io(app, format!("create {}", dir.display())))?;
        let _ = fs::remove_file(dir.join("exit"));
        let _ = fs::remove_file(dir.join("pid"));
        let workdir = match &spec.dataset_path {
            Some(p) => p.clone(),
            None => {
                let w = dir.join("work");
                fs::create_dir_all(&w).map_err(Self::io(app, "create its work dir"))?;
                w
            }
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join("output.log"))
            .map_err(Self::io(app, "open output.log"))?;
        // A log an older flockd created keeps its mode through open: set it.
        log.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(Self::io(app, "make output.log private"))?;
        let log2 = log.try_clone().map_err(Self::io(app, "open output.log"))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(&workdir)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("HOME", &workdir)
            .env("FLOCK_APP", app)
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: it outlives flockd, and a stop reaches its children too.
            .process_group(0);
        if let Some(p) = &spec.dataset_path {
            cmd.env("FLOCK_DATASET_PATH", p);
        }
        if let Some(mask) = crate::datadir::original_umask() {
            // SAFETY: umask is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        if let Some((internal, _)) = spec.ports.first() {
            cmd.env("PORT", internal.to_string());
        }
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                DriverError::CommandNotFound {
                    app: app.clone(),
                    program: argv[0].clone(),
                    detail: e.to_string(),
                }
            }
            _ => Self::io(app, format!("start {:?}", argv[0]))(e),
        })?;
        if let Err(e) = write_atomic(
            &dir.join("spec.json"),
            &serde_json::to_vec_pretty(spec).expect("a spec serializes"),
        ) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Self::io(app, "record the spec")(e));
        }
        if let Err(e) = write_atomic(&dir.join("restarts"), format!("{restarts}\n").as_bytes()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Self::io(app, "record its restarts")(e));
        }
        let pid = child.id() as i32;
        let start = proc_start(pid).map_or(0, |(s, _)| s);
        let rec = PidRecord {
            pid,
            start,
            since_unix: now_unix(),
        };
        if let Err(e) = write_atomic(
            &dir.join("pid"),
            format!("{} {} {}\n", rec.pid, rec.start, rec.since_unix).as_bytes(),
        ) {
            // Unrecorded, it could be neither adopted nor stopped later: do not leave it.
            let _ = child.kill();
            let _ = child.wait();
            return Err(Self::io(app, "record the pid")(e));
        }
        let exit_file = dir.join("exit");
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let text = match (status.code(), status.signal()) {
                    (Some(c), _) => format!("code {c}\n"),
                    (None, Some(s)) => format!("signal {s}\n"),
                    _ => String::new(),
                };
                let _ = write_atomic(&exit_file, text.as_bytes());
            }
        });
        Ok(Instance {
            app: app.clone(),
            fingerprint: spec.fingerprint(),
            state: RunState::Running {
                since_unix: rec.since_unix,
            },
            id: pid.to_string(),
            restarts,
        })
    }

    /// Stops the app's process group: SIGTERM, then SIGKILL after `grace`. Its record and log
    /// stay (see [`remove`](Self::remove)).
    pub fn stop(&self, app: &str, grace: Duration) -> Result<(), DriverError> {
        let Some(rec) = self.pid_record(app) else {
            return Ok(());
        };
        if rec.alive() {
            signal_group(rec.pid, libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while rec.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if rec.alive() {
                signal_group(rec.pid, libc::SIGKILL);
                let deadline = Instant::now() + Duration::from_secs(5);
                while rec.alive() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let _ = fs::remove_file(self.dir(app).join("pid"));
        Ok(())
    }

    /// Stops the app and forgets it, log included.
    pub fn remove(&self, app: &str) -> Result<(), DriverError> {
        self.stop(app, STOP_GRACE)?;
        match fs::remove_dir_all(self.dir(app)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Self::io(app, "remove its record")(e))
            }
            _ => Ok(()),
        }
    }

    /// The last `tail` lines of the app's output, and the byte offset they end at (to follow).
    pub fn logs(&self, app: &str, tail: usize) -> Result<(Vec<String>, u64), DriverError> {
        let path = self.dir(app).join("output.log");
        let f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DriverError::NotHere {
                    app: app.to_string(),
                })
            }
            Err(e) => return Err(Self::io(app, "read output.log")(e)),
        };
        let len = f.metadata().map_or(0, |m| m.len());
        // The tail is in the last few lines' worth of bytes; read at most 4 MiB.
        let mut r = BufReader::new(f);
        let from = len.saturating_sub(4 << 20);
        r.seek(SeekFrom::Start(from))
            .map_err(Self::io(app, "read output.log"))?;
        let mut lines: Vec<String> = r.lines().map_while(Result::ok).collect::<Vec<_>>();
        if from > 0 && !lines.is_empty() {
            lines.remove(0); // probably cut in the middle
        }
        let skip = lines.len().saturating_sub(tail);
        Ok((lines.split_off(skip), len))
    }

    /// The complete lines written to the app's output after byte `since`, and the offset
    /// they end at.
    pub fn logs_since(&self, app: &str, since: u64) -> Result<(Vec<String>, u64), DriverError> {
        let path = self.dir(app).join("output.log");
        let mut f = fs::File::open(&path).map_err(Self::io(app, "read output.log"))?;
        f.seek(SeekFrom::Start(since))
            .map_err(Self::io(app, "read output.log"))?;
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut text).map_err(Self::io(app, "read output.log"))?;
        // Only complete lines: a line being written is sent next time.
        let end = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let lines = String::from_utf8_lossy(&text[..end])
            .lines()
            .map(str::to_string)
            .collect();
        Ok((lines, since + end as u64))
    }

    /// The apps with a record, by name, with their last spec.
    pub fn specs(&self) -> BTreeMap<String, RunSpec> {
        let mut out = BTreeMap::new();
        if let Ok(entries) = fs::read_dir(&self.root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Ok(bytes) = fs::read(e.path().join("spec.json")) {
                    if let Ok(spec) = serde_json::from_slice(&bytes) {
                        out.insert(name, spec);
                    }
                }
            }
        }
        out
    }
}

fn signal_group(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-pid, sig);
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::datadir::write_private_atomic(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(app: &str, command: &[&str]) -> RunSpec {
        RunSpec {
            app: app.into(),
            image: None,
            command: Some(command.iter().map(|s| s.to_string()).collect()),
            env: BTreeMap::from([("GREETING".to_string(), "hi".to_string())]),
            dataset_path: None,
            mountpoint: None,
            ports: vec![(8080, 80)],
            mem_limit: None,
            cpu_shares: None,
        }
    }

    fn wait_exit(d: &ProcessDriver, app: &str) -> RunState {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = d.instance(app).unwrap().state;
            if matches!(
                st,
                RunState::Exited { code: Some(_), .. }
                    | RunState::Exited {
                        signal: Some(_),
                        ..
                    }
            ) {
                return st;
            }
            assert!(Instant::now() < deadline, "{app} did not exit: {st:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn runs_with_env_and_reports_its_exit_and_output() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        fs::create_dir_all(&data).unwrap();
        let d = ProcessDriver::new(tmp.path().join("apps")).unwrap();
        let mut s = spec(
            "echo",
            &[
                "sh",
                "-c",
                "echo $GREETING $PORT $FLOCK_APP; pwd; echo $FLOCK_DATASET_PATH >&2; exit 3",
            ],
        );
        s.dataset_path = Some(data.clone());
        d.start(&s, 3).unwrap();
        assert_eq!(
            wait_exit(&d, "echo"),
            RunState::Exited {
                code: Some(3),
                signal: None
            }
        );
        let (lines, _) = d.logs("echo", 10).unwrap();
        let data = data.display().to_string();
        assert_eq!(lines, ["hi 8080 echo", data.as_str(), data.as_str()]);
        assert_eq!(d.instance("echo").unwrap().fingerprint, s.fingerprint());
        // The restart count it was started with, read back from its record.
        assert_eq!(d.instance("echo").unwrap().restarts, 3);
        assert_eq!(
            ProcessDriver::new(tmp.path().join("apps"))
                .unwrap()
                .instance("echo")
                .unwrap()
                .restarts,
            3
        );
    }

    #[test]
    fn a_running_app_is_adopted_by_a_new_driver_and_stopped_with_its_children() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ProcessDriver::new(tmp.path()).unwrap();
        // A shell with a child: stopping the app must end both.
        let s = spec(
            "sleeper",
            &["sh", "-c", "sleep 300 & echo $! > child; wait"],
        );
        let started = d.start(&s, 0).unwrap();
        assert!(matches!(started.state, RunState::Running { .. }));
        let again = d.start(&s, 0).unwrap_err();
        assert!(
            matches!(again, DriverError::AlreadyRunning { .. }),
            "{again}"
        );
        // As after a flockd restart: a fresh driver on the same root sees it running.
        let d2 = ProcessDriver::new(tmp.path()).unwrap();
        let listed = d2.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, started.id);
        assert!(matches!(listed[0].state, RunState::Running { .. }));
        let child_file = tmp.path().join("sleeper/work/child");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !child_file.exists() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        let child: i32 = fs::read_to_string(&child_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        d2.stop("sleeper", Duration::from_secs(5)).unwrap();
        assert!(matches!(
            d2.instance("sleeper").unwrap().state,
            RunState::Exited { .. }
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc_start(child).is_some_and(|(_, zombie)| !zombie) {
            assert!(
                Instant::now() < deadline,
                "the app's child {child} survived the stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d2.remove("sleeper").unwrap();
        assert!(d2.list().is_empty());
    }

    #[test]
    fn a_missing_command_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ProcessDriver::new(tmp.path()).unwrap();
        let e = d.start(&spec("x", &["/no/such/program"]), 0).unwrap_err();
        assert!(
            e.to_string()
                .contains("command \"/no/such/program\" not found"),
            "{e}"
        );
        let mut s = spec("y", &[]);
        s.command = None;
        s.image = Some("busybox".into());
        assert!(matches!(d.start(&s, 0), Err(DriverError::NoCommand { .. })));
    }
}
