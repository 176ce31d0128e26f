//! Fencing: a node whose lease ran out stops its stateful apps, even when flockd itself is dead,
//! hung or stopped.
//!
//! flockd renews its lease through the Raft quorum and records every renewal here
//! ([`FenceDir::write_lease`]). A separate watchdog process per data dir (`flockd fence-watch`,
//! started by [`spawn_watch`], its loop in [`run_watch`]) kills the guarded apps once the
//! recorded deadline has passed. Apps outlive flockd by design, so the watchdog must too: it is a
//! process of its own, in a session of its own, and it uses no async runtime.
//!
//! ```text
//! DATA_DIR/fence/               0700, files 0600, all written atomically (temp file, rename)
//!   lease                       "flock-fence 1\nlease BOOTTIME_NS\n": the deadline
//!   guards/APP                  "flock-fence 1\nprocess PID STARTTIME\n" or
//!                               "flock-fence 1\ncontainer ID SOCKET\n"; APP is the app's name
//!                               with bytes other than [A-Za-z0-9._-] and a leading dot as %XX
//!   watch.lock                  flock(2)ed by the running watchdog, which writes its pid in it
//!   watch.log                   what the watchdog did (its stderr too)
//! ```
//!
//! Deadlines are on CLOCK_BOOTTIME ([`boottime_now`]): one clock for every process of the
//! machine, which nobody sets and which keeps counting through a suspend.
//!
//! The watchdog fails closed: a lease file it cannot read or parse counts as expired, and a
//! guard stays until its target was killed or is verifiably gone (a Docker engine that does not
//! answer is asked again on the next tick). With no lease file at all nothing is killed: a node
//! that never recorded a lease has nothing to fence. A process is recorded by its pid and start
//! time, so a pid the kernel has given to another process is never signalled.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::datadir::create_private_dir;
use crate::driver::process::proc_stat;

/// The first line of every file here; a file with another first line is not understood.
const FORMAT_LINE: &str = "flock-fence 1";
const FENCE_DIR: &str = "fence";
const LEASE_FILE: &str = "lease";
const GUARDS_DIR: &str = "guards";
const LOCK_FILE: &str = "watch.lock";
const LOG_FILE: &str = "watch.log";
/// How often the watchdog looks at the lease.
const TICK: Duration = Duration::from_millis(100);
/// Bounds each step of one call to the Docker engine (connect, send, read the status line).
const DOCKER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`spawn_watch`] waits for the watchdog it started to hold the lock.
const SPAWN_WAIT: Duration = Duration::from_secs(10);
/// A failure that repeats every tick is logged again after this long.
const REPEAT_LOG: Duration = Duration::from_secs(30);
/// A watchdog with nothing to guard and no lease holding for this long exits: flockd starts
/// one again when it renews (see [`ensure_watch`]).
const IDLE_EXIT: Duration = Duration::from_secs(60);

/// CLOCK_BOOTTIME now: the time since boot, suspend included, the same for every process of
/// the machine.
pub fn boottime_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    // Only an unknown clock or a bad pointer fail; CLOCK_BOOTTIME exists since Linux 2.6.39.
    assert_eq!(
        rc,
        0,
        "clock_gettime(CLOCK_BOOTTIME): {}",
        io::Error::last_os_error()
    );
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A node's fence records: `<data_dir>/fence`.
#[derive(Clone, Debug)]
pub struct FenceDir {
    path: PathBuf,
}

impl FenceDir {
    /// `<data_dir>/fence`, created with mode 0700 if missing.
    pub fn open(data_dir: &Path) -> io::Result<FenceDir> {
        let path = data_dir.join(FENCE_DIR);
        create_private_dir(&path.join(GUARDS_DIR))?;
        // Made by someone else, it may be open to others.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))?;
        Ok(FenceDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that the lease holds for `valid_for` more: its deadline is [`boottime_now`] +
    /// `valid_for`. Called on every renewal.
    pub fn write_lease(&self, valid_for: Duration) -> io::Result<()> {
        let deadline = boottime_now().saturating_add(valid_for);
        let ns = u64::try_from(deadline.as_nanos()).unwrap_or(u64::MAX);
        write_atomic(
            &self.path,
            LEASE_FILE,
            &format!("{FORMAT_LINE}\nlease {ns}\n"),
        )
    }

    /// The recorded deadline (on CLOCK_BOOTTIME); `None` if there is no lease file or it cannot
    /// be read or parsed (which the watchdog takes as expired).
    pub fn lease_deadline(&self) -> Option<Duration> {
        match read_lease(&self.path) {
            Lease::Until(deadline) => Some(deadline),
            Lease::Absent | Lease::Unreadable(_) => None,
        }
    }

    /// Whether a lease is recorded and its deadline has not passed.
    pub fn lease_holds(&self) -> bool {
        self.lease_deadline().is_some_and(|d| d > boottime_now())
    }

    /// Guards a stateful app's process group, `pid` being its leader (started with
    /// `process_group(0)`): the watchdog SIGKILLs the whole group when the lease runs out. The
    /// process's start time is recorded with the pid, so a reused pid is never killed.
    pub fn guard_process(&self, app: &str, pid: u32) -> io::Result<()> {
        let p = i32::try_from(pid)
            .ok()
            .filter(|&p| p > 1)
            .ok_or_else(|| invalid(format!("cannot guard pid {pid} of app {app:?}")))?;
        if pid == std::process::id() {
            return Err(invalid(format!(
                "pid {pid} of app {app:?} is flockd itself, not an app"
            )));
        }
        let st = proc_stat(p)?.filter(|st| !st.zombie).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("app {app:?}: no process {pid} (it exited)"),
            )
        })?;
        if st.pgrp != p {
            return Err(invalid(format!(
                "app {app:?}: process {pid} leads no process group (its group is {}); guard the \
                 leader of a group started with process_group(0)",
                st.pgrp
            )));
        }
        self.write_guard(
            app,
            &Target::Process {
                pid: p,
                start: st.start,
            },
        )
    }

    /// Guards a stateful app's Docker container `id`: the watchdog kills it through the engine
    /// at `docker_socket` (POST /containers/{id}/kill?signal=KILL) when the lease runs out.
    pub fn guard_container(&self, app: &str, id: &str, docker_socket: &str) -> io::Result<()> {
        if !valid_container_id(id) {
            return Err(invalid(format!(
                "app {app:?}: {id:?} is not a container id or name"
            )));
        }
        if !docker_socket.starts_with('/') || docker_socket.contains('\n') {
            return Err(invalid(format!(
                "app {app:?}: the Docker socket {docker_socket:?} is not an absolute path"
            )));
        }
        // The watchdog must be able to connect: a path too long for a unix address fails here.
        socket2::SockAddr::unix(docker_socket)?;
        self.write_guard(
            app,
            &Target::Container {
                id: id.to_string(),
                socket: docker_socket.to_string(),
            },
        )
    }

    /// Stops guarding `app` (it was stopped or moved away); no error if it was not guarded.
    pub fn unguard(&self, app: &str) -> io::Result<()> {
        let path = self.path.join(GUARDS_DIR).join(guard_file_name(app)?);
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The apps guarded now, by name, sorted.
    pub fn guarded(&self) -> io::Result<Vec<String>> {
        let mut apps: Vec<String> = guard_files(&self.path)?
            .into_iter()
            .map(|(app, _)| app)
            .collect();
        apps.sort();
        Ok(apps)
    }

    fn write_guard(&self, app: &str, target: &Target) -> io::Result<()> {
        let dir = self.path.join(GUARDS_DIR);
        write_atomic(&dir, &guard_file_name(app)?, &target.render())
    }
}

/// Starts the watchdog for `data_dir` unless one runs for it already: `exe fence-watch --dir
/// <data_dir>/fence` (made absolute), in /, in a session of its own (it survives flockd and the
/// signals sent to flockd's process group), stdin and stdout null, stderr appended to
/// `<fence>/watch.log`. Returns once the watchdog holds `<fence>/watch.lock` (which then names
/// its pid); a thread waits for it, so that it leaves no zombie behind if it ends while this
/// process runs.
pub fn spawn_watch(exe: &Path, data_dir: &Path) -> io::Result<()> {
    let fence = FenceDir::open(data_dir)?;
    // Absolute: the watchdog runs in / (so that it keeps no directory of flockd's in use).
    let dir = &std::path::absolute(fence.path())?;
    if watch_running(dir)? {
        return Ok(());
    }
    let log = open_log(dir)?;
    // A bare name is looked up in PATH; a relative path would be taken from / otherwise.
    let exe = &if exe.components().count() > 1 {
        std::path::absolute(exe)?
    } else {
        exe.to_path_buf()
    };
    let mut cmd = Command::new(exe);
    cmd.arg("fence-watch")
        .arg("--dir")
        .arg(dir)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setsid(2) is async-signal-safe; the child is not a group leader, so it succeeds.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start the fencing watchdog {}: {e}", exe.display()),
        )
    })?;
    let pid = child.id();
    let deadline = Instant::now() + SPAWN_WAIT;
    let started = loop {
        if watch_pid(dir) == Some(pid) {
            break Ok(());
        }
        if let Some(status) = child.try_wait()? {
            // It exits 0 at once when another watchdog holds the lock: one started meanwhile.
            if status.success() {
                return Ok(());
            }
            return Err(io::Error::other(format!(
                "the fencing watchdog ({} fence-watch) failed at start ({status}); see {}",
                exe.display(),
                dir.join(LOG_FILE).display()
            )));
        }
        if Instant::now() >= deadline {
            // Left running: it may yet take the lock.
            break Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the fencing watchdog (pid {pid}) did not take {} within {} s; see {}",
                    dir.join(LOCK_FILE).display(),
                    SPAWN_WAIT.as_secs(),
                    dir.join(LOG_FILE).display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Without a waiter it would stay a zombie of ours once it exits. Not being able to start
    // the thread costs only that.
    let _ = std::thread::Builder::new()
        .name("fence-watch-wait".into())
        .spawn(move || child.wait());
    started
}

/// The watchdog (`flockd fence-watch --dir DIR`, DIR being `<data_dir>/fence`): takes
/// `DIR/watch.lock` (returns `Ok` at once if another watchdog holds it), then every 100 ms: if
/// the lease has expired (or its file cannot be read), kills every guarded app and removes its
/// guard, logging each to `DIR/watch.log`. Returns when DIR is removed (or replaced).
pub fn run_watch(dir: &Path) -> io::Result<()> {
    let mut lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))?;
    if !try_lock(&lock)? {
        return Ok(());
    }
    // Who holds it, for flockd and the operator: the lock file says.
    lock.set_len(0)?;
    lock.write_all(format!("{}\n", std::process::id()).as_bytes())?;
    let meta = fs::metadata(dir)?;
    let identity = (meta.dev(), meta.ino());
    let mut watch = Watch {
        dir: dir.to_path_buf(),
        log: open_log(dir)?,
        reported: HashMap::new(),
    };
    watch.log(&format!(
        "watching {} (pid {})",
        dir.display(),
        std::process::id()
    ));
    let mut idle_since: Option<std::time::Instant> = None;
    loop {
        let idle = guard_files(dir).is_ok_and(|g| g.is_empty())
            && !matches!(read_lease(dir), Lease::Until(d) if d > boottime_now());
        match (idle, idle_since) {
            (false, _) => idle_since = None,
            (true, None) => idle_since = Some(std::time::Instant::now()),
            (true, Some(t)) if t.elapsed() >= IDLE_EXIT => {
                watch.log("nothing guarded and no lease for a minute: exiting");
                return Ok(());
            }
            (true, Some(_)) => {}
        }
        match fs::metadata(dir) {
            // The data dir was removed: nothing left to guard.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Ok(m) if (m.dev(), m.ino()) != identity => {
                watch.log(&format!(
                    "{} was replaced; its own watchdog guards it",
                    dir.display()
                ));
                return Ok(());
            }
            // Anything else: keep watching (failing closed).
            _ => {}
        }
        watch.tick();
        std::thread::sleep(TICK);
    }
}

/// What a guard protects against: the target to kill.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// A process group, by its leader's pid and start time (field 22 of /proc/PID/stat).
    Process { pid: i32, start: u64 },
    /// A Docker container and the engine's socket.
    Container { id: String, socket: String },
}

impl Target {
    fn render(&self) -> String {
        match self {
            Target::Process { pid, start } => format!("{FORMAT_LINE}\nprocess {pid} {start}\n"),
            Target::Container { id, socket } => format!("{FORMAT_LINE}\ncontainer {id} {socket}\n"),
        }
    }

    fn parse(text: &str) -> Option<Target> {
        let mut lines = text.lines();
        if lines.next()? != FORMAT_LINE {
            return None;
        }
        let line = lines.next()?;
        if lines.next().is_some() {
            return None;
        }
        let (kind, rest) = line.split_once(' ')?;
        match kind {
            "process" => {
                let (pid, start) = rest.split_once(' ')?;
                let pid: i32 = pid.parse().ok()?;
                // Never kill(-1) or kill(0): those would reach every process or our own group.
                (pid > 1).then_some(())?;
                Some(Target::Process {
                    pid,
                    start: start.parse().ok()?,
                })
            }
            "container" => {
                let (id, socket) = rest.split_once(' ')?;
                (valid_container_id(id) && socket.starts_with('/')).then(|| Target::Container {
                    id: id.to_string(),
                    socket: socket.to_string(),
                })
            }
            _ => None,
        }
    }

    /// How the log names it.
    fn describe(&self) -> String {
        match self {
            Target::Process { pid, .. } => format!("pid {pid}"),
            Target::Container { id, .. } => format!("container {id}"),
        }
    }
}

/// What one attempt to fence a target found.
enum Outcome {
    Killed,
    /// Nothing of it runs any more: nothing to kill.
    Gone(String),
    /// Neither killed nor known gone: tried again on the next tick.
    Failed(String),
}

/// The watchdog's state between ticks.
struct Watch {
    dir: PathBuf,
    log: fs::File,
    /// Failures logged lately, by what failed: a failure repeating every tick is logged when
    /// it changes or after [`REPEAT_LOG`].
    reported: HashMap<String, (String, Instant)>,
}

impl Watch {
    fn tick(&mut self) {
        let why = match read_lease(&self.dir) {
            Lease::Absent => return,
            Lease::Until(deadline) => {
                let now = boottime_now();
                if deadline > now {
                    return;
                }
                format!("lease expired {}ms ago", (now - deadline).as_millis())
            }
            Lease::Unreadable(reason) => format!("lease unreadable, taken as expired ({reason})"),
        };
        let guards = match guard_files(&self.dir) {
            Ok(g) => g,
            Err(e) => {
                // Keyed "": no app has an empty name.
                self.report(
                    "",
                    format!("cannot list the guards in {}: {e}", self.dir.display()),
                );
                return;
            }
        };
        let mut seen = HashSet::new();
        let mut records = Vec::new();
        for (app, path) in guards {
            seen.insert(app.clone());
            match fs::read_to_string(&path) {
                Ok(text) => match Target::parse(&text) {
                    Some(target) => records.push((app, path, text, target)),
                    None => self.report(
                        &app,
                        format!(
                            "cannot fence app {app}: its guard {} is garbled: {:?}",
                            path.display(),
                            truncated(&text)
                        ),
                    ),
                },
                // Unguarded meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => self.report(
                    &app,
                    format!(
                        "cannot fence app {app}: cannot read {}: {e}",
                        path.display()
                    ),
                ),
            }
        }
        self.reported
            .retain(|what, _| what.is_empty() || seen.contains(what));
        // Processes first: an engine slow to answer must not delay them.
        records.sort_by_key(|(_, _, _, t)| matches!(t, Target::Container { .. }));
        // An engine that failed this tick is not asked again for the next container before
        // the next tick, so one tick stays short.
        let mut failed_engines = HashSet::new();
        for (app, path, text, target) in records {
            let outcome = match &target {
                Target::Process { pid, start } => fence_process(*pid, *start),
                Target::Container { socket, .. } if failed_engines.contains(socket) => continue,
                Target::Container { id, socket } => fence_container(id, socket),
            };
            let what = target.describe();
            match outcome {
                Outcome::Killed => {
                    self.log(&format!("fenced app {app} ({what}): {why}"));
                    self.remove_guard(&app, &path, &text);
                }
                Outcome::Gone(reason) => {
                    self.log(&format!(
                        "app {app} ({what}) needs no fencing ({why}): {reason}"
                    ));
                    self.remove_guard(&app, &path, &text);
                }
                Outcome::Failed(reason) => {
                    if let Target::Container { socket, .. } = &target {
                        failed_engines.insert(socket.clone());
                    }
                    self.report(
                        &app,
                        format!("cannot fence app {app} ({what}) yet, retrying: {reason}"),
                    );
                }
            }
        }
    }

    /// Removes a guard whose target was dealt with, unless it was replaced meanwhile (a new
    /// guard for the same app is not this one).
    fn remove_guard(&mut self, app: &str, path: &Path, text: &str) {
        if fs::read_to_string(path).is_ok_and(|now| now == text) {
            if let Err(e) = fs::remove_file(path) {
                if e.kind() != io::ErrorKind::NotFound {
                    self.log(&format!("cannot remove {}: {e}", path.display()));
                }
            }
        }
        self.reported.remove(app);
    }

    /// Logs a failure unless the same one was logged lately.
    fn report(&mut self, what: &str, message: String) {
        let now = Instant::now();
        if let Some((last, at)) = self.reported.get(what) {
            if *last == message && now.duration_since(*at) < REPEAT_LOG {
                return;
            }
        }
        self.log(&message);
        self.reported.insert(what.to_string(), (message, now));
    }

    fn log(&mut self, line: &str) {
        let now = humantime::format_rfc3339_millis(SystemTime::now());
        // Nowhere to say that the log cannot be written: killing goes on regardless.
        let _ = writeln!(self.log, "{now} {line}");
    }
}

/// Kills the process group led by `pid` if it is still the one recorded.
fn fence_process(pid: i32, start: u64) -> Outcome {
    match proc_stat(pid) {
        Err(e) => Outcome::Failed(format!("cannot read /proc/{pid}/stat: {e}")),
        // The pid names another process: the number was free, so nothing was left of the app's
        // group (a group's id stays taken while any process of it lives).
        Ok(Some(st)) if st.start != start => Outcome::Gone(format!(
            "pid {pid} is another process now (started at {} ticks, not {start})",
            st.start
        )),
        // The leader, alive or a zombie: the group is the app's.
        Ok(Some(_)) => kill_group(pid),
        Ok(None) => {
            // The leader is gone and reaped. A group by its id can only be the app's (see
            // above): the processes it left behind.
            // SAFETY: kill(2) with signal 0 only checks; a negative pid names a process group.
            if unsafe { libc::kill(-pid, 0) } == -1
                && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
            {
                return Outcome::Gone("no process of its group is left".into());
            }
            kill_group(pid)
        }
    }
}

fn kill_group(pgid: i32) -> Outcome {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    if unsafe { libc::kill(-pgid, libc::SIGKILL) } == 0 {
        return Outcome::Killed;
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Outcome::Gone("no process of its group is left".into())
    } else {
        Outcome::Failed(format!("kill(-{pgid}, SIGKILL): {e}"))
    }
}

/// Kills container `id` through the engine at `socket`.
fn fence_container(id: &str, socket: &str) -> Outcome {
    match docker_kill(id, socket) {
        Ok(204) => Outcome::Killed,
        Ok(404) => Outcome::Gone("no such container".into()),
        // Not running (flock's containers have no restart policy: it stays stopped).
        Ok(409) => Outcome::Gone("the container is not running".into()),
        Ok(code) => Outcome::Failed(format!(
            "the Docker engine at {socket} answered HTTP {code} to the kill"
        )),
        Err(e) => Outcome::Failed(format!("the Docker engine at {socket}: {e}")),
    }
}

/// POST /containers/{id}/kill?signal=KILL to the engine at `socket`: the HTTP status code. Every
/// step is bounded by [`DOCKER_TIMEOUT`].
fn docker_kill(id: &str, socket: &str) -> io::Result<u16> {
    let addr = socket2::SockAddr::unix(socket)?;
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    sock.connect_timeout(&addr, DOCKER_TIMEOUT)?;
    let mut stream = UnixStream::from(sock);
    stream.set_write_timeout(Some(DOCKER_TIMEOUT))?;
    stream.write_all(
        format!(
            "POST /containers/{id}/kill?signal=KILL HTTP/1.1\r\nHost: docker\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )?;
    // Only the status line matters; read it within the time, however the engine trickles it.
    let deadline = Instant::now() + DOCKER_TIMEOUT;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    line.strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP status line: {:?}", truncated(line)),
            )
        })
}

/// The lease file as read.
enum Lease {
    Absent,
    Until(Duration),
    Unreadable(String),
}

fn read_lease(dir: &Path) -> Lease {
    let path = dir.join(LEASE_FILE);
    match fs::read_to_string(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Lease::Absent,
        Err(e) => Lease::Unreadable(format!("cannot read {}: {e}", path.display())),
        Ok(text) => match parse_lease(&text) {
            Some(deadline) => Lease::Until(deadline),
            None => Lease::Unreadable(format!(
                "{} is garbled: {:?}",
                path.display(),
                truncated(&text)
            )),
        },
    }
}

fn parse_lease(text: &str) -> Option<Duration> {
    let mut lines = text.lines();
    if lines.next()? != FORMAT_LINE {
        return None;
    }
    let ns = lines.next()?.strip_prefix("lease ")?.parse().ok()?;
    lines.next().is_none().then(|| Duration::from_nanos(ns))
}

/// The guards in fence dir `dir`: (app, file) for each file whose name is an escaped app name
/// (temp files and strays are not).
fn guard_files(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let guards = dir.join(GUARDS_DIR);
    let entries = match fs::read_dir(&guards) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r?,
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(app) = entry.file_name().to_str().and_then(app_of_file_name) {
            out.push((app, entry.path()));
        }
    }
    Ok(out)
}

/// The file name of `app`'s guard: the name itself when it is made of [A-Za-z0-9._-] and does
/// not start with a dot (flock's app names are), else every other byte (and a leading dot) as
/// %XX. Never a path, never hidden, never empty, and one name per app.
fn guard_file_name(app: &str) -> io::Result<String> {
    if app.is_empty() {
        return Err(invalid("an app name is empty".into()));
    }
    let mut out = String::with_capacity(app.len());
    for (i, b) in app.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    Ok(out)
}

/// The app whose guard file is named `file`, if it is one ([`guard_file_name`] reversed).
fn app_of_file_name(file: &str) -> Option<String> {
    let bytes = file.as_bytes();
    let mut app = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = file.get(i + 1..i + 3)?;
            app.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            app.push(bytes[i]);
            i += 1;
        }
    }
    let app = String::from_utf8(app).ok()?;
    // Only the one spelling guard_file_name makes: no temp file, no lower-case hex.
    (guard_file_name(&app).ok()? == file).then_some(app)
}

/// Docker's container ids (hex) and names ([a-zA-Z0-9][a-zA-Z0-9_.-]*): safe in a URL path.
fn valid_container_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Numbers the temp files this process writes, so that concurrent writers never share one.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `dir/name` atomically as a 0600 file (a temp file beside it, then rename). Not
/// [`crate::datadir::write_private_atomic`]: its fsync would cost every lease renewal (twice a
/// second) for records that mean nothing after a reboot, and its temp file NAME.tmp is shared
/// by names that differ only after a dot. The temp names start with a dot, which no guard file
/// name does.
fn write_atomic(dir: &Path, name: &str, contents: &str) -> io::Result<()> {
    let tmp = dir.join(format!(
        ".tmp.{}.{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .and_then(|()| fs::rename(&tmp, dir.join(name)));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Whether a watchdog holds `dir/watch.lock`.
fn watch_running(dir: &Path) -> io::Result<bool> {
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))?;
    // Taken here, it is released when `lock` closes.
    Ok(!try_lock(&lock)?)
}

/// The pid the watchdog wrote in its lock file (it may have ended since).
/// Starts the watchdog of `data_dir` again if none holds its lock (it exited when idle, or was
/// killed): flockd calls it with every renewal it records. `exe` as for [`spawn_watch`].
pub fn ensure_watch(exe: &Path, data_dir: &Path) -> io::Result<()> {
    let lock = data_dir.join(FENCE_DIR).join(LOCK_FILE);
    let held = match fs::OpenOptions::new().read(true).open(&lock) {
        Ok(f) => !try_lock(&f)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if held {
        return Ok(());
    }
    spawn_watch(exe, data_dir)
}

/// Ends the watchdog of `data_dir`, if one runs (its pid from the lock file, checked against
/// its command line so a reused pid is left alone): for `flockd dev`, which stops its apps
/// itself and leaves nothing running. True if one was signalled.
pub fn stop_watch(data_dir: &Path) -> bool {
    let dir = data_dir.join("fence");
    let Some(pid) = watch_pid(&dir) else {
        return false;
    };
    let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    let abs = fs::canonicalize(&dir).unwrap_or(dir);
    if !cmd.contains("fence-watch") || !cmd.contains(&abs.display().to_string()) {
        return false;
    }
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) of the watchdog identified above; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGKILL) == 0 }
}

fn watch_pid(dir: &Path) -> Option<u32> {
    fs::read_to_string(dir.join(LOCK_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// flock(LOCK_EX | LOCK_NB): false if another open file holds it.
fn try_lock(file: &fs::File) -> io::Result<bool> {
    // SAFETY: flock(2) on a descriptor `file` owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn open_log(dir: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(dir.join(LOG_FILE))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// At most 80 characters of `text`, for a log line.
fn truncated(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_file_names_are_plain_files_and_reversible() {
        for app in [
            "web", "db-1", "a.b_c", ".hidden", "..", "a/b", "../x", "%41", "é", "A",
        ] {
            let file = guard_file_name(app).unwrap();
            assert!(
                !file.contains('/') && !file.starts_with('.'),
                "{app}: {file}"
            );
            assert_eq!(app_of_file_name(&file).as_deref(), Some(app), "{file}");
        }
        assert_eq!(guard_file_name("db-1").unwrap(), "db-1");
        assert_eq!(guard_file_name("../x").unwrap(), "%2E.%2Fx");
        assert!(guard_file_name("").is_err());
        for stray in [".tmp.1.2", "%2e", "%4", "a%2", "a/b", "a b"] {
            assert_eq!(app_of_file_name(stray), None, "{stray}");
        }
    }

    #[test]
    fn records_parse_back_and_garbage_does_not() {
        let targets = [
            Target::Process {
                pid: 1234,
                start: 99,
            },
            Target::Container {
                id: "abc123".into(),
                socket: "/run/my docker.sock".into(),
            },
        ];
        for t in targets {
            assert_eq!(Target::parse(&t.render()), Some(t));
        }
        for bad in [
            "",
            "flock-fence 2\nprocess 12 3\n",
            "flock-fence 1\nprocess 1 3\n",
            "flock-fence 1\nprocess -5 3\n",
            "flock-fence 1\nprocess 0 3\n",
            "flock-fence 1\nprocess 12\n",
            "flock-fence 1\ncontainer ../x /s\n",
            "flock-fence 1\ncontainer abc relative.sock\n",
            "flock-fence 1\nprocess 12 3\nprocess 13 3\n",
        ] {
            assert_eq!(Target::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_lease("flock-fence 1\nlease 5000000000\n"),
            Some(Duration::from_secs(5))
        );
        for bad in [
            "",
            "flock-fence 1\n",
            "flock-fence 1\nlease x\n",
            "lease 5\n",
        ] {
            assert_eq!(parse_lease(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lease_and_guards_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let fence = FenceDir::open(tmp.path()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(fence.path()), 0o700);
        assert_eq!(fence.lease_deadline(), None);
        assert!(!fence.lease_holds());
        fence.write_lease(Duration::from_secs(60)).unwrap();
        assert!(fence.lease_holds());
        assert_eq!(mode(&fence.path().join(LEASE_FILE)), 0o600);
        fence.write_lease(Duration::ZERO).unwrap();
        assert!(!fence.lease_holds());
        fs::write(fence.path().join(LEASE_FILE), "garbage").unwrap();
        assert_eq!(fence.lease_deadline(), None);

        let me = std::process::id();
        assert!(fence.guard_process("self", me).is_err());
        assert!(fence.guard_process("init", 1).is_err());
        assert!(fence
            .guard_container("c", "x/../../y", "/var/run/docker.sock")
            .is_err());
        assert!(fence.guard_container("c", "abc", "docker.sock").is_err());
        fence
            .guard_container("c", "abc", "/var/run/docker.sock")
            .unwrap();
        fence
            .guard_container("../evil", "abc", "/var/run/docker.sock")
            .unwrap();
        assert_eq!(fence.guarded().unwrap(), vec!["../evil", "c"]);
        assert_eq!(
            mode(&fence.path().join(GUARDS_DIR).join("%2E.%2Fevil")),
            0o600
        );
        fence.unguard("../evil").unwrap();
        fence.unguard("never-guarded").unwrap();
        assert_eq!(fence.guarded().unwrap(), vec!["c"]);
    }
}
