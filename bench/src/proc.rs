//! Child processes of the benchmark: the cluster daemons (`flockd`, `etcd`).
//!
//! Each daemon's stderr goes to a log file; its stdout is read line by line, copied into the
//! same log file and kept, so the harness can wait for a readiness line (`flockd: ready ...`)
//! and read values a daemon prints (the join token).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Everything a daemon printed on stdout so far, and whether its stdout is closed (it exited).
#[derive(Default)]
struct Stdout {
    lines: Vec<String>,
    closed: bool,
}

/// One running daemon process.
pub struct Daemon {
    /// How errors name it, e.g. "flockd n2".
    pub label: String,
    /// Its stderr and stdout.
    pub log: PathBuf,
    child: Child,
    stdout: watch::Receiver<Stdout>,
}

impl Daemon {
    /// Starts `program args` with `env` added, stderr and stdout into `log` (appended, so a
    /// restarted daemon keeps its earlier log).
    pub fn spawn(
        label: String,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Daemon> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open log file {}", log.display()))?;
        let stdout_copy = file
            .try_clone()
            .with_context(|| format!("cannot open log file {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            // A benchmark that fails or is interrupted must not leave daemons behind.
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {label} ({})", program.display()))?;
        let pipe = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{label}: stdout was not captured"))?;

        let (tx, rx) = watch::channel(Stdout::default());
        tokio::spawn(async move {
            let mut copy = tokio::fs::File::from_std(stdout_copy);
            let mut lines = BufReader::new(pipe).lines();
            // Copying into the log is best effort: the lines also reach `tx`.
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = copy.write_all(format!("{line}\n").as_bytes()).await;
                tx.send_modify(|s| s.lines.push(line));
            }
            tx.send_modify(|s| s.closed = true);
        });
        Ok(Daemon {
            label,
            log,
            child,
            stdout: rx,
        })
    }

    /// Waits until the daemon printed a line starting with `prefix` and returns that line.
    /// Fails when the daemon exits first or `timeout` passes; the error names the log.
    pub async fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let mut rx = self.stdout.clone();
        let waited = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| s.closed || s.lines.iter().any(|l| l.starts_with(prefix))),
        )
        .await;
        // Copy the line out: the guard `wait_for` returns blocks the reader task while held.
        let found = match waited {
            Ok(Ok(s)) => s.lines.iter().find(|l| l.starts_with(prefix)).cloned(),
            // Timed out, or the reader task ended without marking `closed` (treated as exit).
            Err(_) | Ok(Err(_)) => None,
        };
        if let Some(line) = found {
            return Ok(line);
        }
        // A closed stdout usually means the process is exiting; give it a moment to finish.
        if let Some(status) = self.exit_status(Duration::from_millis(500)).await {
            bail!(
                "{} exited ({status}) before it printed \"{prefix}\"; see {}",
                self.label,
                self.log.display()
            );
        }
        bail!(
            "{} did not print \"{prefix}\" within {} s; see {}",
            self.label,
            timeout.as_secs(),
            self.log.display()
        )
    }

    /// The exit status if the process has exited, or exits within `grace`.
    pub async fn exit_status(&mut self, grace: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails, naming the log, if the process has exited: a member that dies on its own while
    /// the harness waits for the cluster should be reported as that, not as a timeout.
    pub async fn check_running(&mut self) -> Result<()> {
        match self.exit_status(Duration::ZERO).await {
            Some(status) => bail!(
                "{} exited unexpectedly ({status}); see {}",
                self.label,
                self.log.display()
            ),
            None => Ok(()),
        }
    }

    /// `kill -9`: sends SIGKILL and reaps the process. Returns when it is gone, so its sockets
    /// are closed by then.
    pub async fn kill(mut self) -> Result<()> {
        // start_kill sends SIGKILL on Unix.
        if let Err(e) = self.child.start_kill() {
            // Already exited: nothing to kill, but reap it below.
            if self.child.try_wait().ok().flatten().is_none() {
                return Err(e).with_context(|| format!("cannot kill {}", self.label));
            }
        }
        self.child
            .wait()
            .await
            .with_context(|| format!("cannot reap {}", self.label))?;
        Ok(())
    }
}

/// `n` distinct loopback addresses whose ports were free a moment ago: bind port 0, read the
/// port the kernel chose, let it go when the daemon is about to bind it. All listeners are held
/// until all are chosen, so the kernel cannot hand out the same port twice. Another process
/// could take a port in between; the daemon then fails with a bind error in its log. etcd's
/// well-known ports are skipped in case a system etcd runs there.
pub fn free_addrs(n: usize) -> Result<Vec<SocketAddr>> {
    let mut held = Vec::with_capacity(n);
    let mut addrs = Vec::with_capacity(n);
    while addrs.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
        let addr = listener
            .local_addr()
            .context("cannot read a bound address")?;
        if addr.port() != 2379 && addr.port() != 2380 {
            addrs.push(addr);
        }
        held.push(listener);
    }
    Ok(addrs)
}
