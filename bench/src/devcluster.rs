//! What flock-move and flock-mesh share: a release `flockd dev` cluster run as a subprocess
//! ([`Dev`]), flockctl against it, bounded waits that stop on SIGINT, progress lines, the
//! xorshift test pattern and the parts of their reports that describe the run.
//!
//! Each binary includes it with `#[path = "../devcluster.rs"] mod devcluster;`, next to
//! `#[path = "../sysinfo.rs"] mod sysinfo;`, which it uses. What only one binary asks of the
//! cluster (its app, its dataset, its log lines) it adds in its own `impl Dev` block.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::sysinfo;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static STARTED: OnceLock<Instant> = OnceLock::new();

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Starts the clock of [`note`]'s progress lines.
pub fn start_clock() {
    STARTED.get_or_init(Instant::now);
}

/// From now on SIGINT only marks the run interrupted: every wait then fails, and the cluster
/// is stopped and cleaned up as on any error.
pub fn catch_sigint() {
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// A progress line on stderr, with the time since the start.
pub fn note(msg: impl AsRef<str>) {
    let t = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:7.1}s] {}", msg.as_ref());
}

/// Polls `f` every `every` until it gives a value; fails after `timeout`, or on an error.
pub fn until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {:.0}s waiting for {what}",
                timeout.as_secs_f64()
            );
        }
        thread::sleep(every);
    }
}

/// What a command printed, each stdout line with the time it arrived.
pub struct Output {
    pub status: ExitStatus,
    pub lines: Vec<(Instant, String)>,
    pub stderr: String,
}

impl Output {
    pub fn stdout(&self) -> String {
        self.lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Runs `cmd` to its end, killing it after `timeout`.
fn run_bounded(cmd: &mut Command, timeout: Duration, what: &str) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    let out = thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for a child")? {
            break st;
        }
        if Instant::now() >= deadline || interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = out.join();
            let lines: Vec<String> = rx.try_iter().map(|(_, l)| l).collect();
            bail!(
                "{what} {} after {:.1}s; it printed {:?} and on stderr {:?}",
                if interrupted() {
                    "interrupted"
                } else {
                    "timed out"
                },
                (Instant::now() + timeout - deadline).as_secs_f64(),
                lines,
                err.join().unwrap_or_default().trim()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    let _ = out.join();
    Ok(Output {
        status,
        lines: rx.try_iter().collect(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Where flockd, flockctl and the other binaries `needs` are: `given`, or this binary's
/// directory. Fails naming the first one missing, with `build`, the command that builds them.
pub fn bin_dir(given: Option<&Path>, needs: &[&str], build: &str) -> Result<PathBuf> {
    let bin = match given {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no directory")?
            .to_path_buf(),
    };
    for b in needs {
        ensure!(
            bin.join(b).exists(),
            "{} is missing: {build}",
            bin.join(b).display()
        );
    }
    Ok(bin)
}

/// A `flockd dev` cluster, stopped and its data dir removed on drop.
pub struct Dev {
    /// `flockd dev`: all three nodes in one process.
    pub child: Child,
    /// The data dir: flockd.log, dev/ (the nodes' data), and whatever the benchmark adds.
    pub dir: PathBuf,
    bin: PathBuf,
    config: PathBuf,
    keep: bool,
    /// The benchmark's name, which starts its messages and its data dir's name.
    tool: &'static str,
    /// A word in the command line of the benchmark's app processes.
    app_marker: &'static str,
    /// The app's process ids seen, killed at the end should flockd leave one behind.
    app_pids: Mutex<Vec<u32>>,
    /// Every flockctl command run, as written (without the config).
    commands: Mutex<Vec<String>>,
}

impl Dev {
    /// Starts `flockd dev` from `bin` with its first node's API on `port` in a new data dir
    /// under the temp dir, and waits until its 3 nodes report their capacity. `tool` names the
    /// benchmark in messages; an app process left behind at the end is killed if its command
    /// line holds `app_marker`.
    pub fn start(
        bin: &Path,
        port: u16,
        keep: bool,
        tool: &'static str,
        app_marker: &'static str,
    ) -> Result<Dev> {
        for p in port..=port.saturating_add(2) {
            TcpListener::bind(("127.0.0.1", p))
                .and_then(|_| UdpSocket::bind(("127.0.0.1", p)))
                .with_context(|| {
                    format!("port {p} is in use (another flockd dev?); pick others with --port")
                })?;
        }
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("{tool}-{}-{nanos:x}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log = fs::File::create(dir.join("flockd.log"))?;
        let data = dir.join("dev");
        let spawned = Command::new(bin.join("flockd"))
            .arg("dev")
            .arg("--port")
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(anyhow!(
                    "cannot start {}: {e}",
                    bin.join("flockd").display()
                ));
            }
        };
        let mut dev = Dev {
            child,
            config: data.join("n1").join("admin.conf"),
            dir,
            bin: bin.to_path_buf(),
            keep,
            tool,
            app_marker,
            app_pids: Mutex::new(Vec::new()),
            commands: Mutex::new(Vec::new()),
        };
        note(format!(
            "flockd dev --port {port} --data-dir {}",
            data.display()
        ));
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            check_interrupted()?;
            if let Some(st) = dev.child.try_wait()? {
                bail!("flockd dev exited ({st}): {}", dev.log_tail(30));
            }
            if fs::read_to_string(dev.log_path())
                .unwrap_or_default()
                .contains("flockd: ready dev cluster")
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "timed out after 90s waiting for flockd dev to be ready: {}",
                dev.log_tail(30)
            );
            thread::sleep(Duration::from_millis(100));
        }
        // Every node reports its capacity shortly after it starts; placement needs it.
        until(
            "the 3 nodes to report to `flockctl status`",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let Ok(out) = dev.flockctl(&["status", "--json"], Duration::from_secs(10)) else {
                    return Ok(None);
                };
                if !out.status.success() {
                    return Ok(None);
                }
                let st: Value = serde_json::from_str(&out.stdout()).unwrap_or_default();
                let members = st["members"].as_array().cloned().unwrap_or_default();
                Ok((members.len() == 3
                    && members
                        .iter()
                        .all(|m| m["memory"].as_u64().is_some_and(|x| x > 0)))
                .then_some(()))
            },
        )?;
        Ok(dev)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("flockd.log")
    }

    /// The size of flockd's log so far, for [`Dev::log_since`].
    pub fn log_len(&self) -> u64 {
        fs::metadata(self.log_path()).map_or(0, |m| m.len())
    }

    /// flockd's log after byte `from`.
    pub fn log_since(&self, from: u64) -> String {
        let text = fs::read(self.log_path()).unwrap_or_default();
        String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of flockd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Prints the run's error `e` with the end of flockd's log.
    pub fn print_failure(&self, e: &anyhow::Error) {
        eprintln!(
            "{}: failed: {e:#}\n--- the end of flockd's log ({}) ---\n{}\n---",
            self.tool,
            self.log_path().display(),
            self.log_tail(60)
        );
    }

    /// Runs flockctl with the cluster's admin config, whatever its exit status.
    pub fn flockctl(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let shown = format!("flockctl {}", args.join(" "));
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(shown.clone());
        run_bounded(
            Command::new(self.bin.join("flockctl"))
                .args(args)
                .env("FLOCK_CONFIG", &self.config),
            timeout,
            &shown,
        )
    }

    /// Runs flockctl, which must succeed; its stdout.
    pub fn ctl(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let out = self.flockctl(args, timeout)?;
        if !out.status.success() {
            bail!(
                "flockctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                out.stderr.trim()
            );
        }
        Ok(out.stdout())
    }

    /// `flockctl deploy DEPLOYMENT APPLICATION`, which must say it starts `app` on `node`.
    pub fn deploy(
        &self,
        deployment: &Path,
        application: &Path,
        app: &str,
        node: &str,
    ) -> Result<()> {
        let out = self.ctl(
            &[
                "deploy",
                deployment.to_str().context("a UTF-8 path")?,
                application.to_str().context("a UTF-8 path")?,
            ],
            Duration::from_secs(60),
        )?;
        ensure!(
            out.contains(&format!("start {app} on {node}")),
            "deploy did not start {app} on {node}: {out}"
        );
        Ok(())
    }

    /// Notes the process id of `app`, an app as flockctl shows it, to kill it at the end
    /// should flockd leave it behind.
    pub fn saw_app(&self, app: &Value) {
        if let Some(pid) = app["id"].as_str().and_then(|i| i.parse::<u32>().ok()) {
            let mut pids = self.app_pids.lock().unwrap_or_else(|p| p.into_inner());
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }

    /// Every flockctl command run so far, as written (without the config).
    pub fn commands(&self) -> Vec<String> {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let tool = self.tool;
        note("stopping flockd dev (SIGINT)");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                _ => {
                    eprintln!("{tool}: flockd dev did not stop within 60s: killing it");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        for &pid in self
            .app_pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let ours = fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(self.app_marker));
            if ours && pid_alive(pid) {
                eprintln!("{tool}: app process {pid} outlived flockd: killing its group");
                // SAFETY: the process driver starts each app as its own process group leader.
                unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            }
        }
        if self.keep {
            eprintln!("{tool}: kept {} (flockd.log, dev/)", self.dir.display());
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("{tool}: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Deterministic incompressible bytes (xorshift64), block after block.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn fill(&mut self, block: &mut [u8]) {
        for chunk in block.chunks_mut(8) {
            let x = &mut self.0;
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Writes `bytes` of the pattern of `seed` to `out`, a MiB at a time; stops if interrupted.
pub fn write_pattern(out: &mut impl Write, bytes: u64, seed: u64) -> Result<()> {
    const BLOCK: usize = 1 << 20;
    let mut p = Pattern::new(seed);
    let mut block = vec![0u8; BLOCK];
    let mut left = bytes;
    while left > 0 {
        check_interrupted()?;
        let n = left.min(BLOCK as u64) as usize;
        p.fill(&mut block[..n]);
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// `bytes` in GiB or MiB when a whole number of them, else in bytes.
pub fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes & ((1 << 30) - 1) == 0 {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 20 && bytes & ((1 << 20) - 1) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} B")
    }
}

/// The 1-minute load average, "?" if unreadable.
pub fn load_average() -> String {
    sysinfo::load_average().unwrap_or_else(|| "?".into())
}

/// The machine for a report: CPUs, kernel, how busy the CPUs were (`busy`, from
/// [`sysinfo::cpu_busy`]) in the second before the run and the load average now.
pub fn machine(busy: f64) -> String {
    format!(
        "{} CPUs ({}), Linux {}; CPUs {:.0}% busy in the second before the run, 1-minute load average {} at its start",
        sysinfo::nproc(),
        sysinfo::cpu_model().unwrap_or_else(|| "unknown".into()),
        sysinfo::kernel().unwrap_or_else(|| "?".into()),
        busy * 100.0,
        load_average()
    )
}

/// The report's line with this process's command line.
pub fn command_line() -> String {
    format!(
        "- command: `{}`\n",
        std::env::args().collect::<Vec<_>>().join(" ")
    )
}

/// The report's closing block: the `flockd dev` command on `port`, then the first of the
/// `commands` run of each kind (the first three words).
pub fn commands_block(port: u16, commands: &[String]) -> String {
    let mut s = String::from("\nCommands (FLOCK_CONFIG=DATA/n1/admin.conf):\n\n```sh\n");
    s.push_str(&format!(
        "flockd dev --port {port} --data-dir DATA    # stopped with SIGINT at the end\n"
    ));
    let mut seen = HashSet::new();
    for c in commands {
        let generic = c.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        if seen.insert(generic) {
            s.push_str(c);
            s.push('\n');
        }
    }
    s.push_str("```\n");
    s
}
