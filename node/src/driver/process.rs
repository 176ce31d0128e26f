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
//!
//! An instance is the app's whole process group, not only its leader: it is `Running` while any
//! process of the group lives (zombies aside: they run no code), and `Exited` only once all are
//! gone. When the leader exits and others remain (`sh -c 'worker & exec server'`), the driver
//! ends the rest (SIGTERM, SIGKILL after the grace period, [`STOP_GRACE`] by default), so that a restart never overlaps a
//! leftover worker; a stop SIGKILLs the group after the grace whatever the leader did. The group
//! is found through /proc; a /proc or record that cannot be read makes the instance
//! [`RunState::Unknown`], never exited. (Not a cgroup per app: see [`group_members`].)

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
    /// How long processes get between SIGTERM and SIGKILL: in a stop, and when a leader left
    /// processes behind.
    grace: Duration,
    /// The host the node is reached at, given to apps as `FLOCK_NODE_HOST`.
    pub(crate) node_host: Option<String>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How long the processes of a group may take to die after SIGKILL before a stop fails.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// One process, as /proc/PID/stat shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub(crate) ppid: i32,
    pub(crate) pgrp: i32,
    /// Field 22: the start time in clock ticks since boot; with the pid, names one process.
    pub(crate) start: u64,
    pub(crate) zombie: bool,
}

/// /proc/PID/stat of `pid`; `Ok(None)` when there is no such process (any more).
pub(crate) fn proc_stat(pid: i32) -> std::io::Result<Option<ProcStat>> {
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        // ESRCH: it exited between the directory listing and the read.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ESRCH) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let bad = || std::io::Error::other(format!("/proc/{pid}/stat is not as expected: {stat:?}"));
    // The command name (field 2) is in parentheses and may hold spaces or parentheses.
    let rest = &stat[stat.rfind(')').ok_or_else(bad)? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<i64>().ok())
            .ok_or_else(bad)
    };
    Ok(Some(ProcStat {
        // After the name: state, ppid, pgrp, session, ..., starttime (field 22, index 19).
        zombie: matches!(fields.first(), Some(&"Z" | &"X")),
        ppid: i32::try_from(num(1)?).map_err(|_| bad())?,
        pgrp: i32::try_from(num(2)?).map_err(|_| bad())?,
        start: u64::try_from(num(19)?).map_err(|_| bad())?,
    }))
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot), and whether the process
/// is a zombie; `None` when there is no such process or it cannot be read.
fn proc_start(pid: i32) -> Option<(u64, bool)> {
    proc_stat(pid).ok().flatten().map(|s| (s.start, s.zombie))
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

    /// Whether the group's leader lives (the pid still names the process recorded).
    fn alive(&self) -> bool {
        matches!(proc_start(self.pid), Some((start, false)) if start == self.start)
    }
}

/// The live processes of the app's process group (the leader's pid is the group's id, as
/// `process_group(0)` made it): every non-zombie process in /proc with that group, the leader
/// included while it lives. An error when /proc cannot be read: the group is then unknown.
///
/// Why not a cgroup per app: this machine and CI are cgroup v1 hybrids where only root can make
/// cgroups in /sys/fs/cgroup/unified, flockd runs in containers whose /sys/fs/cgroup is
/// read-only, and a systemd host would need delegation; the process group works everywhere
/// for the apps flock runs (a process that leaves its group with setsid is not followed).
///
/// A group id stays reserved while any process of the group lives, so processes in the
/// recorded group are the app's, unless the leader's pid names another process now: then the
/// app's group ended and the number was reused. Zombie members that are flockd's own children
/// (orphans re-parented to flockd when it runs as pid 1 or a subreaper) are reaped here, or
/// they would stay forever; the leader is left to the thread that waits for it.
fn group_members(rec: &PidRecord) -> std::io::Result<Vec<i32>> {
    let pgid = rec.pid;
    if let Some(leader) = proc_stat(pgid)? {
        if leader.start != rec.start {
            return Ok(Vec::new());
        }
    }
    // SAFETY: kill(2) with signal 0 only checks; a negative pid names the process group.
    let probe = unsafe { libc::kill(-pgid, 0) };
    if probe == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return Ok(Vec::new());
    }
    let me = std::process::id() as i32;
    let mut members = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Some(st) = proc_stat(pid)? else {
            continue;
        };
        if st.pgrp != pgid {
            continue;
        }
        if !st.zombie {
            members.push(pid);
        } else if st.ppid == me && pid != pgid {
            // SAFETY: reaps one exited child of ours that nothing else waits for.
            unsafe {
                libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
            }
        }
    }
    Ok(members)
}

/// Ends the recorded group: SIGTERM, then SIGKILL after `grace`, whatever the leader did. Ok
/// once no process of it lives; an error if some outlive SIGKILL by [`KILL_WAIT`] or the group
/// cannot be read.
fn end_group(rec: &PidRecord, grace: Duration) -> Result<(), String> {
    end_group_with(rec, grace, libc::SIGTERM)
}

/// [`end_group`] with `signal` first instead of SIGTERM (compose's `stop_signal`).
fn end_group_with(rec: &PidRecord, grace: Duration, signal: i32) -> Result<(), String> {
    let read = |e: std::io::Error| format!("cannot read /proc to find its processes: {e}");
    let deadline = Instant::now() + grace;
    let mut termed = false;
    loop {
        if group_members(rec).map_err(read)?.is_empty() {
            return Ok(());
        }
        if !termed {
            // The group is non-empty, so its id is still the app's: signalling it is safe.
            signal_group(rec.pid, signal);
            termed = true;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let members = group_members(rec).map_err(read)?;
        if members.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "processes {members:?} of group {} outlived SIGKILL by {} s",
                rec.pid,
                KILL_WAIT.as_secs()
            ));
        }
        signal_group(rec.pid, libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Groups (leader pid, start time) a thread of this flockd is tending: waiting for the leader's
/// exit, or ending the processes it left. They count as running until the thread is done, and
/// no second thread is started for them.
static TENDED: std::sync::Mutex<std::collections::BTreeSet<(i32, u64)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn tended() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<(i32, u64)>> {
    TENDED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends what the leader of `rec` left behind, on a thread of its own, unless one already does.
fn tend_leftovers(rec: PidRecord, grace: Duration) {
    if !tended().insert((rec.pid, rec.start)) {
        return;
    }
    std::thread::spawn(move || {
        if let Err(e) = end_group(&rec, grace) {
            tracing::warn!(pgid = rec.pid, error = %e, "processes an app's leader left could not be ended");
        }
        tended().remove(&(rec.pid, rec.start));
    });
}

impl ProcessDriver {
    /// A driver keeping its records under `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<ProcessDriver> {
        let root = root.into();
        create_private_dir(&root)?;
        Ok(ProcessDriver {
            root,
            grace: STOP_GRACE,
            node_host: None,
        })
    }

    /// The same driver with another grace period than [`STOP_GRACE`].
    pub fn with_grace(mut self, grace: Duration) -> ProcessDriver {
        self.grace = grace;
        self
    }

    /// How long processes get between SIGTERM and SIGKILL.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// How the app is stopped: the signal its spec asks for (`stop_signal`, SIGTERM by
    /// default) and its grace (`stop_grace_period`, else `default`). An unreadable spec or an
    /// unknown signal name stops it with SIGTERM.
    pub fn stop_plan(&self, app: &str, default: Duration) -> (i32, Duration) {
        let spec: Option<RunSpec> = fs::read(self.dir(app).join("spec.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let more = spec.map(|s| s.more).unwrap_or_default();
        let signal = more
            .stop_signal
            .as_deref()
            .and_then(signal_number)
            .unwrap_or(libc::SIGTERM);
        let grace = more.stop_grace_ms.map_or(default, Duration::from_millis);
        (signal, grace)
    }

    /// Where the app's secret files are (see [`super::Drivers::write_secrets`]).
    pub fn secrets_dir(&self, app: &str) -> PathBuf {
        self.dir(app).join("secrets")
    }

    fn dir(&self, app: &str) -> PathBuf {
        self.root.join(app)
    }

    fn io(app: &str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
        let (app, what) = (app.to_string(), what.into());
        move |source| DriverError::Io { app, what, source }
    }

    /// The app's pid record: `None` when it has none; an error (the reason) when it has one
    /// that cannot be read.
    fn pid_record(&self, app: &str) -> Result<Option<PidRecord>, String> {
        match fs::read_to_string(self.dir(app).join("pid")) {
            Ok(text) => PidRecord::parse(&text)
                .map(Some)
                .ok_or_else(|| format!("its pid record is unreadable: {:?}", text.trim())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read its pid record: {e}")),
        }
    }

    /// Whether the recorded group runs: `Ok(true)` while any of its processes lives; the
    /// reason when that cannot be told. Starts ending the leftovers of a group whose leader
    /// exited.
    fn group_runs(&self, rec: &PidRecord) -> Result<bool, String> {
        if rec.alive() || tended().contains(&(rec.pid, rec.start)) {
            return Ok(true);
        }
        let members = group_members(rec)
            .map_err(|e| format!("cannot read /proc to find its processes: {e}"))?;
        if members.is_empty() {
            return Ok(false);
        }
        // The leader exited without flockd watching (flockd restarted): end the rest.
        tend_leftovers(*rec, self.grace);
        Ok(true)
    }

    /// The instance of `app`, if this driver ever started it and it was not removed.
    pub fn instance(&self, app: &str) -> Option<Instance> {
        let dir = self.dir(app);
        // An unreadable spec only costs the fingerprint (the agent then replaces the instance);
        // what runs is told by the pid record.
        let spec: Option<RunSpec> = fs::read(dir.join("spec.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let rec = self.pid_record(app);
        if spec.is_none() && matches!(rec, Ok(None)) {
            return None;
        }
        let runs = match &rec {
            Ok(Some(r)) => self.group_runs(r).map(|runs| runs.then_some(r.since_unix)),
            Ok(None) => Ok(None),
            Err(why) => Err(why.clone()),
        };
        let state = match runs {
            Err(reason) => RunState::Unknown { reason },
            Ok(Some(since_unix)) => RunState::Running { since_unix },
            Ok(None) => {
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
            fingerprint: spec.map(|s| s.fingerprint()).unwrap_or_default(),
            state,
            id: rec
                .ok()
                .flatten()
                .map(|r| r.pid.to_string())
                .unwrap_or_default(),
            restarts: fs::read_to_string(dir.join("restarts"))
                .ok()
                .and_then(|r| r.trim().parse().ok())
                .unwrap_or(0),
            healthy: None,
        })
    }

    /// Every app this driver has a record of, running, exited or unknown; an error when the
    /// records cannot be read (then every app of this driver is unknown).
    pub fn list(&self) -> Result<Vec<Instance>, DriverError> {
        let failed = |e: std::io::Error| DriverError::ListFailed {
            driver: "process",
            detail: format!("reading {}: {e}", self.root.display()),
        };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(failed)? {
            let entry = entry.map_err(failed)?;
            if let Some(i) = self.instance(&entry.file_name().to_string_lossy()) {
                out.push(i);
            }
        }
        out.sort_by(|a, b| a.app.cmp(&b.app));
        Ok(out)
    }

    /// Starts `spec`'s command, recording `restarts` with it. Refused while any process of
    /// the app's last instance runs, or when that cannot be told.
    pub fn start(&self, spec: &RunSpec, restarts: u32) -> Result<Instance, DriverError> {
        let app = &spec.app;
        let unknown = |reason| DriverError::Unknown {
            app: app.clone(),
            reason,
        };
        if let Some(r) = self.pid_record(app).map_err(unknown)? {
            if self.group_runs(&r).map_err(unknown)? {
                return Err(DriverError::AlreadyRunning {
                    app: app.clone(),
                    id: r.pid.to_string(),
                });
            }
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
        if let Some(h) = &self.node_host {
            // Where the mesh and service addresses reach the app on this node: an app that
            // binds it, not 0.0.0.0, shares a machine with other nodes' instances of itself.
            cmd.env("FLOCK_NODE_HOST", h);
        }
        if !spec.more.secrets.is_empty() {
            // A process has no /run/secrets of its own: its files are here, by name.
            cmd.env("FLOCK_SECRETS_DIR", self.secrets_dir(app));
        }
        if let Some(w) = &spec.more.working_dir {
            // Relative to its work dir (or its dataset's), as a container's is to its root.
            cmd.current_dir(workdir.join(w.trim_start_matches('/')));
        }
        if let Some(user) = &spec.more.user {
            let (uid, gid) = resolve_user(user).map_err(|detail| DriverError::Unknown {
                app: app.clone(),
                reason: format!("user {user}: {detail}"),
            })?;
            // std drops root's supplementary groups (setgroups) when it changes the uid.
            cmd.uid(uid).gid(gid);
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
            signal_group(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
            return Err(Self::io(app, "record the spec")(e));
        }
        if let Err(e) = write_atomic(&dir.join("restarts"), format!("{restarts}\n").as_bytes()) {
            signal_group(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
            return Err(Self::io(app, "record its restarts")(e));
        }
        let pid = child.id() as i32;
        // Unreaped, the child is in /proc even if it exited already.
        let Some((start, _)) = proc_start(pid) else {
            signal_group(pid, libc::SIGKILL);
            let _ = child.wait();
            return Err(Self::io(app, "read its start time")(std::io::Error::other(
                format!("/proc/{pid}/stat is unreadable"),
            )));
        };
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
            signal_group(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
            return Err(Self::io(app, "record the pid")(e));
        }
        let exit_file = dir.join("exit");
        let grace = self.grace;
        // Running until this thread is done: the leader's exit recorded, and the processes it
        // left ended.
        tended().insert((rec.pid, rec.start));
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let text = match (status.code(), status.signal()) {
                    (Some(c), _) => format!("code {c}\n"),
                    (None, Some(s)) => format!("signal {s}\n"),
                    _ => String::new(),
                };
                let _ = write_atomic(&exit_file, text.as_bytes());
            }
            if let Err(e) = end_group(&rec, grace) {
                tracing::warn!(pgid = rec.pid, error = %e, "processes an app's leader left could not be ended");
            }
            tended().remove(&(rec.pid, rec.start));
        });
        Ok(Instance {
            app: app.clone(),
            fingerprint: spec.fingerprint(),
            state: RunState::Running {
                since_unix: rec.since_unix,
            },
            id: pid.to_string(),
            restarts,
            healthy: None,
        })
    }

    /// Stops the app's process group: SIGTERM, then SIGKILL after `grace` whatever its leader
    /// did. Ok only once no process of the group lives; its record and log stay (see
    /// [`remove`](Self::remove)).
    pub fn stop(&self, app: &str, grace: Duration) -> Result<(), DriverError> {
        let (signal, grace) = self.stop_plan(app, grace);
        let rec = match self.pid_record(app) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(reason) => {
                return Err(DriverError::Unknown {
                    app: app.to_string(),
                    reason,
                })
            }
        };
        end_group_with(&rec, grace, signal).map_err(|detail| DriverError::StillRunning {
            app: app.to_string(),
            detail,
        })?;
        let _ = fs::remove_file(self.dir(app).join("pid"));
        Ok(())
    }

    /// Stops the app and forgets it, log included.
    pub fn remove(&self, app: &str) -> Result<(), DriverError> {
        self.stop(app, self.grace)?;
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

/// A signal by name (`SIGINT`, `INT`, any case) or number, as compose's `stop_signal`.
pub fn signal_number(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    Some(match bare {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "WINCH" => libc::SIGWINCH,
        "PWR" => libc::SIGPWR,
        _ => return None,
    })
}

/// The group a process runs as when `user:` names none: the user's primary group in
/// /etc/passwd, else this one (nogroup). Never root's group, which a uid change alone would keep.
const NO_GROUP: u32 = 65534;

/// `USER[:GROUP]` as uid and gid: numbers, or names from the password and group files. Without
/// a group, the user's primary group from /etc/passwd (by name or uid), else [`NO_GROUP`].
fn resolve_user(spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    // name:password:uid:gid:...
    let entry = |pick: &dyn Fn(&str, u32) -> bool| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let (uid, gid) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            pick(f[0], uid).then_some((uid, gid))
        })
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (n, entry(&|_, uid| uid == n).map(|(_, g)| g)),
        Err(_) => {
            let (uid, gid) = entry(&|name, _| name == user)
                .ok_or_else(|| format!("no {user} in /etc/passwd"))?;
            (uid, Some(gid))
        }
    };
    let gid = match group {
        None => primary.unwrap_or(NO_GROUP),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup("/etc/group", g)?,
        },
    };
    Ok((uid, gid))
}

/// The id (third field) of `name` in a colon-separated file such as /etc/group.
fn lookup(file: &str, name: &str) -> Result<u32, String> {
    let text = fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(n, _)| *n == name)
        .and_then(|(_, id)| id.parse().ok())
        .ok_or_else(|| format!("no {name} in {file}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `user:` alone runs with the user's own group, never with root's.
    #[test]
    fn a_user_without_a_group_gets_its_own_group_not_roots() {
        assert_eq!(resolve_user("root"), Ok((0, 0)));
        let nobody = resolve_user("nobody").unwrap();
        assert_eq!(nobody.0, 65534);
        assert_ne!(nobody.1, 0, "nobody ran in root's group");
        // A uid no entry names: nogroup.
        assert_eq!(resolve_user("4242424"), Ok((4242424, NO_GROUP)));
        assert_eq!(resolve_user("4242424:7"), Ok((4242424, 7)));
        assert_eq!(resolve_user("nobody:root"), Ok((65534, 0)));
        assert!(resolve_user("no-such-user-here").is_err());
    }

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
            more: Default::default(),
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
        let listed = d2.list().unwrap();
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
        assert!(d2.list().unwrap().is_empty());
    }

    /// compose's stop_signal, stop_grace_period, working_dir and secrets for a process: the
    /// app gets its own signal first, and its own grace.
    #[test]
    fn a_process_stops_with_its_own_signal_and_grace() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ProcessDriver::new(tmp.path()).unwrap();
        let mut s = spec(
            "trapper",
            &[
                "sh",
                "-c",
                "trap 'echo int > got; exit 0' INT; trap '' TERM; pwd > cwd; while true; do sleep 0.05; done",
            ],
        );
        s.more.stop_signal = Some("SIGINT".into());
        s.more.stop_grace_ms = Some(3000);
        s.more.working_dir = Some("/sub".into());
        std::fs::create_dir_all(tmp.path().join("trapper/work/sub")).unwrap();
        d.start(&s, 0).unwrap();
        let work = tmp.path().join("trapper/work/sub");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !work.join("cwd").exists() {
            assert!(
                Instant::now() < deadline,
                "the app did not start in its working_dir"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            d.stop_plan("trapper", Duration::from_secs(10)),
            (libc::SIGINT, Duration::from_secs(3))
        );
        let t = Instant::now();
        // A default grace of 0 would SIGKILL it at once: its own grace gives it time for INT.
        d.stop("trapper", Duration::ZERO).unwrap();
        assert_eq!(fs::read_to_string(work.join("got")).unwrap().trim(), "int");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert_eq!(signal_number("term"), Some(libc::SIGTERM));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SIGBOGUS"), None);
        d.remove("trapper").unwrap();
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
