//! Test harness: real `flockd` processes on loopback (port 0) and the real `flockctl`.

#![allow(dead_code)]

pub mod containers;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const FLOCKD: &str = env!("CARGO_BIN_EXE_flockd");
pub const FLOCKCTL: &str = env!("CARGO_BIN_EXE_flockctl");

/// Fast Raft timing for tests, passed to every flockd.
pub const FAST: &[&str] = &["--heartbeat-ms", "50", "--election-timeout-ms", "300"];

/// A flockd process and what it printed.
pub struct Proc {
    pub child: Option<Child>,
    pub name: String,
    pub data_dir: PathBuf,
    pub addr: String,
    pub lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    pub extra: Vec<String>,
}

impl Proc {
    /// Starts `flockd ARGS` and waits for its "ready" line (or its exit).
    pub fn start(args: &[String], data_dir: &Path, name: &str, log: &Path) -> Result<Proc, String> {
        Self::start_env(args, data_dir, name, log, &[])
    }

    /// As [`start`](Self::start), with these environment variables set.
    pub fn start_env(
        args: &[String],
        data_dir: &Path,
        name: &str,
        log: &Path,
        env: &[(String, String)],
    ) -> Result<Proc, String> {
        Self::start_bin(Path::new(FLOCKD), args, data_dir, name, log, env)
    }

    /// As [`start_env`](Self::start_env), with the flockd binary at `bin` (an older build, for
    /// the upgrade test).
    pub fn start_bin(
        bin: &Path,
        args: &[String],
        data_dir: &Path,
        name: &str,
        log: &Path,
        env: &[(String, String)],
    ) -> Result<Proc, String> {
        let stderr = std::fs::File::create(log).expect("log file");
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                "warn,flock_node=info,flock_raft=info,flock_client=info",
            )
            // No Docker volume plugin unless a test names one (--plugin-name): a flockd killed
            // with -9 leaves its socket behind, and the engine waits on it in `docker volume ls`.
            .env("FLOCK_NO_PLUGIN", "true")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn flockd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Proc {
            child: Some(child),
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            addr: String::new(),
            lines: rx,
            seen: Vec::new(),
            extra: Vec::new(),
        };
        let line = p
            .wait_line("flockd: ready", Duration::from_secs(40))
            .map_err(|e| {
                format!(
                    "{e}\n--- log {}:\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })?;
        p.addr = line.rsplit(' ').next().unwrap_or_default().to_string();
        Ok(p)
    }

    /// Waits for a stdout line starting with `prefix`.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return Ok(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return Ok(l);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{}: no line {prefix:?} within {timeout:?}; saw {:?}",
                        self.name, self.seen
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    return Err(format!(
                        "{}: exited ({status:?}) before {prefix:?}; saw {:?}",
                        self.name, self.seen
                    ));
                }
            }
        }
    }

    /// kill -9.
    /// The flockd's pid (0 once it was reaped).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal and waits for the process to exit; returns its exit code.
    pub fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe {
            libc::kill(c.id() as i32, sig);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Drains stdout lines printed so far.
    pub fn drain(&mut self) -> Vec<String> {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A cluster of flockd processes in a temp dir.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Proc>,
    pub token: String,
    pub extra_args: Vec<String>,
    /// Arguments for one node only (index 0 is node 1), after `extra_args`.
    pub node_args: Vec<Vec<String>>,
    /// Environment variables every flockd of the cluster starts with.
    pub env: Vec<(String, String)>,
    /// Each node listens (and is reached) on its own loopback address, 127.0.0.(20+i), as
    /// nodes on separate machines are: apps that bind `$FLOCK_NODE_HOST` run on every node.
    pub own_hosts: bool,
    /// The flockd binary nodes start (and restart) with: this build's unless a test says.
    pub flockd: PathBuf,
}

pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

impl TestCluster {
    /// Starts `n` nodes: the first with `init`, the others with `join`, and waits until the
    /// voter count is what the promotion rule gives.
    pub fn start(n: usize, extra: &[&str]) -> TestCluster {
        Self::start_with(n, extra, Vec::new())
    }

    /// As [`start`](Self::start), with `node_args[i]` given to node i + 1 only.
    pub fn start_with(n: usize, extra: &[&str], node_args: Vec<Vec<String>>) -> TestCluster {
        Self::start_env(n, extra, node_args, Vec::new())
    }

    /// As [`start_with`](Self::start_with), every flockd with the environment variables `env`.
    pub fn start_env(
        n: usize,
        extra: &[&str],
        node_args: Vec<Vec<String>>,
        env: Vec<(String, String)>,
    ) -> TestCluster {
        Self::start_full(n, extra, node_args, env, false)
    }

    /// [`TestCluster::start`] with each node on its own loopback address ([`Self::own_hosts`]).
    pub fn start_own_hosts(n: usize) -> TestCluster {
        Self::start_full(n, &[], Vec::new(), Vec::new(), true)
    }

    /// [`TestCluster::start`] with the flockd binary at `bin` (an older build: the upgrade
    /// test); set [`Self::flockd`] to restart nodes with another.
    pub fn start_bin(n: usize, bin: &Path) -> TestCluster {
        Self::start_full_bin(n, &[], Vec::new(), Vec::new(), false, bin)
    }

    fn start_full(
        n: usize,
        extra: &[&str],
        node_args: Vec<Vec<String>>,
        env: Vec<(String, String)>,
        own_hosts: bool,
    ) -> TestCluster {
        Self::start_full_bin(n, extra, node_args, env, own_hosts, Path::new(FLOCKD))
    }

    fn start_full_bin(
        n: usize,
        extra: &[&str],
        node_args: Vec<Vec<String>>,
        env: Vec<(String, String)>,
        own_hosts: bool,
        bin: &Path,
    ) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = TestCluster {
            dir,
            nodes: Vec::new(),
            token: String::new(),
            extra_args: s(extra),
            node_args,
            env,
            own_hosts,
            flockd: bin.to_path_buf(),
        };
        let listen1 = c.listen(1);
        let d1 = c.data_dir(1);
        let mut args = s(&[
            "init",
            "--data-dir",
            d1.to_str().unwrap(),
            "--listen",
            &listen1,
            "--name",
            "n1",
        ]);
        args.extend(s(FAST));
        args.extend(c.extra_args.clone());
        args.extend(c.args_of(1));
        let mut first = Proc::start_bin(&c.flockd, &args, &d1, "n1", &c.log(1, "init"), &c.env)
            .expect("n1 starts");
        let tok = first
            .wait_line("flockd: join with token", Duration::from_secs(5))
            .expect("token line");
        c.token = tok.rsplit(' ').next().unwrap().to_string();
        c.nodes.push(first);
        for i in 2..=n {
            let p = c.join(i).expect("node joins");
            c.nodes.push(p);
        }
        let voters = match n {
            1 | 2 => 1,
            3 | 4 => 3,
            _ => 5,
        };
        c.wait_voters(voters, Duration::from_secs(30));
        c
    }

    /// Node `i`'s own flags. Each node's routing mesh listens on its own loopback address,
    /// 127.0.0.(i+1) ([`mesh_ip`]), so that every node can listen on every published port, and
    /// apps that tests run on 127.0.0.1 never share an address with a mesh. Metrics are served
    /// on a port the kernel picks: the default (the API port + 1000) of a node restarted on its
    /// recorded port could take another test's node's port.
    fn args_of(&self, i: usize) -> Vec<String> {
        let mut args = self.node_args.get(i - 1).cloned().unwrap_or_default();
        if !args.iter().any(|a| a == "--mesh-addr") {
            args.extend(["--mesh-addr".to_string(), mesh_ip(i)]);
        }
        if !args.iter().any(|a| a == "--metrics-addr") {
            args.extend(["--metrics-addr".to_string(), "127.0.0.1:0".to_string()]);
        }
        args
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{i}"))
    }

    pub fn log(&self, i: usize, what: &str) -> PathBuf {
        self.dir.path().join(format!("n{i}.{what}.log"))
    }

    /// `flockd join` node `i` through node 1.
    /// The address node `i` listens on.
    pub fn listen(&self, i: usize) -> String {
        if self.own_hosts {
            format!("127.0.0.{}:0", 20 + i)
        } else {
            "127.0.0.1:0".into()
        }
    }

    pub fn join(&self, i: usize) -> Result<Proc, String> {
        let d = self.data_dir(i);
        let name = format!("n{i}");
        let listen = self.listen(i);
        let mut args = s(&[
            "join",
            &self.nodes[0].addr,
            "--token",
            &self.token,
            "--data-dir",
            d.to_str().unwrap(),
            "--listen",
            &listen,
            "--name",
            &name,
        ]);
        args.extend(s(FAST));
        args.extend(self.extra_args.clone());
        args.extend(self.args_of(i));
        Proc::start_bin(
            &self.flockd,
            &args,
            &d,
            &name,
            &self.log(i, "join"),
            &self.env,
        )
    }

    /// `flockd run` node `i` (1-based) from its data dir, replacing the dead process.
    pub fn restart(&mut self, i: usize) {
        let d = self.data_dir(i);
        let mut args = s(&["run", "--data-dir", d.to_str().unwrap()]);
        args.extend(s(FAST));
        args.extend(self.extra_args.clone());
        args.extend(self.args_of(i));
        let p = Proc::start_bin(
            &self.flockd,
            &args,
            &d,
            &format!("n{i}"),
            &self.log(i, "run"),
            &self.env,
        )
        .expect("node restarts");
        assert_eq!(
            p.addr,
            self.nodes[i - 1].addr,
            "restarted node kept its address"
        );
        self.nodes[i - 1] = p;
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.nodes[i - 1].addr
    }

    /// Any running node's address other than `except` (1-based index).
    pub fn live_addr(&mut self, except: Option<usize>) -> String {
        for i in 1..=self.nodes.len() {
            if Some(i) != except && self.nodes[i - 1].running() {
                return self.nodes[i - 1].addr.clone();
            }
        }
        panic!("no live node");
    }

    /// The admin client config `flockd init` wrote.
    pub fn config(&self) -> PathBuf {
        self.data_dir(1).join("admin.conf")
    }

    /// flockctl with this cluster's admin config.
    pub fn ctl(&self, addr: &str, args: &[&str]) -> Output {
        ctl(&self.config(), addr, args)
    }

    pub fn ctl_ok(&self, addr: &str, args: &[&str]) -> String {
        ctl_ok(&self.config(), addr, args)
    }

    /// `flockctl status --json` through `addr`.
    pub fn status(&self, addr: &str) -> Value {
        let out = self.ctl(addr, &["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// Waits until node 1 (or any live node) reports `n` healthy voters.
    pub fn wait_voters(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let addr = self.live_addr(None);
            let st = self.ctl(&addr, &["status", "--json"]);
            if st.status.success() {
                let v: Value = serde_json::from_slice(&st.stdout).unwrap();
                let voters = v["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| m["role"] == "voter" && m["health"] == "healthy")
                    .count();
                if voters == n {
                    return;
                }
                if Instant::now() > deadline {
                    panic!("wanted {n} healthy voters; status: {v:#}");
                }
            } else if Instant::now() > deadline {
                panic!("status failed: {}", String::from_utf8_lossy(&st.stderr));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index (1-based) of the leader, as a live node reports it.
    pub fn leader(&mut self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let addr = self.live_addr(None);
            let v = self.status(&addr);
            if let Some(la) = v["leader_addr"].as_str() {
                if let Some(i) = self.nodes.iter_mut().position(|p| p.addr == la) {
                    if self.nodes[i].running()
                        && v["members"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|m| m["health"] == "healthy")
                    {
                        return i + 1;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader: {v:#}");
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs flockctl with client config `config` against `addr`.
pub fn ctl(config: &Path, addr: &str, args: &[&str]) -> Output {
    Command::new(FLOCKCTL)
        .arg("--config")
        .arg(config)
        .arg("--addr")
        .arg(addr)
        .args(args)
        .env_remove("FLOCK_CONFIG")
        .env_remove("FLOCK_ADDR")
        .output()
        .expect("run flockctl")
}

/// Runs flockctl and returns stdout, asserting success.
pub fn ctl_ok(config: &Path, addr: &str, args: &[&str]) -> String {
    let out = ctl(config, addr, args);
    assert!(
        out.status.success(),
        "flockctl {args:?} at {addr} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Stderr of a flockctl run as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Where node `i`'s routing mesh listens in a [`TestCluster`].
pub fn mesh_ip(i: usize) -> String {
    format!("127.0.0.{}", i + 1)
}

/// A port free on the meshes' addresses (127.0.0.2..4) and the nodes' (127.0.0.21..23), for
/// a cluster started with its own hosts ([`TestCluster::start_own_hosts`]).
pub fn free_on_every_address() -> u16 {
    loop {
        let p = free_port();
        let ips = (2..=4).chain(21..=23);
        if ips
            .into_iter()
            .all(|i| std::net::TcpListener::bind(format!("127.0.0.{i}:{p}")).is_ok())
        {
            return p;
        }
    }
}

/// A free loopback port, for a server a test starts on a port it names; see [`free_ports`].
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive ports that are free on 127.0.0.1 for TCP and UDP (a dev cluster
/// takes one per node, a flockd its port for both). They are taken below the kernel's ephemeral
/// range (32768 up on Linux), not from it: a port the kernel hands out to bind(0) is handed out
/// again to the next outgoing connection, which in a busy test run took one between this check
/// and the server's bind ("Address already in use"). The search starts at a place that depends
/// on the process id, so test processes running side by side rarely try the same ports.
pub fn free_ports(n: u16) -> u16 {
    use std::net::{TcpListener, UdpSocket};
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000; // up to 31_999
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = u32::from(n.max(1));
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let at = NEXT.fetch_add(n, Ordering::Relaxed);
        let base = LOW + (start + at) % (SPAN - n);
        let free = (base..base + n).all(|p| {
            let p = p as u16;
            TcpListener::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("127.0.0.1", p)).is_ok()
        });
        if free {
            return base as u16;
        }
    }
    panic!(
        "no {n} consecutive free ports on 127.0.0.1 between {LOW} and {}",
        LOW + SPAN
    )
}

/// Runs flockd to completion (for commands that are expected to fail or exit).
pub fn flockd(args: &[&str]) -> Output {
    Command::new(FLOCKD)
        .args(args)
        .env("FLOCK_NO_PLUGIN", "true")
        .output()
        .expect("run flockd")
}

// ---------------------------------------------------------------------------------------------
// zfs pools

/// File-backed zfs pools for one test, destroyed on drop; holds the lock that keeps zfs tests
/// of all test binaries one at a time (zfs-fuse wedged under concurrent tests).
pub struct Pools {
    names: Vec<String>,
    dir: tempfile::TempDir,
    _lock: std::fs::File,
}

impl Pools {
    pub fn new() -> Pools {
        use std::os::fd::AsRawFd;
        let path = std::env::temp_dir().join("flock-dataset-zfs-tests.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap();
        // SAFETY: a valid descriptor; released when the file closes.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let zpool = Command::new("zpool").args(["list", "-H"]).output();
        match zpool {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "the zfs-fuse daemon does not answer (start it with /usr/sbin/zfs-fuse; ./test.sh does): {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!(
                "zfs is not installed ({e}): apt-get install zfs-fuse, then start /usr/sbin/zfs-fuse (./test.sh does both)"
            ),
        }
        Pools {
            names: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            _lock: lock,
        }
    }

    /// A new pool of `mib` MiB; its name.
    /// Where the pools are mounted (under it): an app on a pool's dataset runs there.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn create(&mut self, mib: u64) -> String {
        let name = format!("flocknodetest{}x{}", std::process::id(), self.names.len());
        let file = self.dir.path().join(format!("{name}.img"));
        std::fs::File::create(&file)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let mnt = self.dir.path().join(format!("{name}.mnt"));
        let out = Command::new("zpool")
            .args(["create", "-m"])
            .arg(&mnt)
            .arg(&name)
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "zpool create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.names.push(name.clone());
        name
    }
}

impl Drop for Pools {
    fn drop(&mut self) {
        for n in &self.names {
            for _ in 0..20 {
                let ok = Command::new("zpool")
                    .args(["destroy", "-f", n])
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    break;
                }
                thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

pub fn zfs_args(pool: &str) -> Vec<String> {
    vec![
        "--backend".into(),
        "zfs".into(),
        "--zfs-pool".into(),
        format!("{pool}/flock"),
    ]
}

/// The image the docker tests run: Debian's busybox-static FROM scratch, built locally by
/// docker/build-testapp-image.sh (nothing can be pulled).
pub const TEST_IMAGE: &str = "flock-test-busybox:latest";

/// Builds [`TEST_IMAGE`] once per test process if it is missing. Fails, with the reason, when
/// there is no Docker engine.
pub fn ensure_test_image() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let ping = Command::new("docker").args(["version"]).output();
        assert!(
            ping.as_ref().is_ok_and(|o| o.status.success()),
            "the docker tests need the docker CLI and a running Docker engine \
             (at /var/run/docker.sock, where flockd looks for it): {ping:?}"
        );
        let have = Command::new("docker")
            .args(["image", "inspect", TEST_IMAGE])
            .output()
            .expect("run docker");
        if !have.status.success() {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/build-testapp-image.sh");
            let st = Command::new("sh")
                .arg(&script)
                .status()
                .expect("run the script");
            assert!(st.success(), "{} failed", script.display());
        }
    });
}

/// Deterministic incompressible bytes: `len` of them from `seed` (xorshift).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// The test app (flock-testapp) and its clients.

/// Polls `f` every 100 ms until it gives a value; fails the test after `timeout`.
pub fn until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// application.yml's entry for `counter`: the test app, stateful (a 64M volume at /data),
/// listening on 127.0.0.1:`port`, published as `ext`, always restarted.
pub fn counter_app(port: u16, ext: u16) -> String {
    format!(
        r#"  counter:
    command: ["{}", "--listen", "127.0.0.1:{port}"]
    ports:
      - internal: {port}
        external: {ext}
    volume:
      mountpoint: /data
      maximum_size: 64M
    restart_policy:
      name: always
"#,
        testapp().display()
    )
}

/// [`counter_app`] with a replica, snapshotted every 500 ms (the failover tests' app).
pub fn replicated_counter_app(port: u16, ext: u16) -> String {
    counter_app(port, ext).replace(
        "      maximum_size: 64M\n",
        "      maximum_size: 64M\n      replicas: 1\n      snapshot_interval: 500ms\n",
    )
}

/// The kept diverged snapshots of `dataset` (`dataset snapshots --json`), asked of node `at`:
/// (snapshot, the node keeping it).
pub fn kept_diverged(c: &TestCluster, at: usize, dataset: &str) -> Vec<(String, String)> {
    let snaps: serde_json::Value =
        serde_json::from_str(&c.ctl_ok(c.addr(at), &["dataset", "snapshots", dataset, "--json"]))
            .unwrap();
    snaps
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["diverged"] == true)
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["kept_on"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The test app, built beside flockd by the workspace build.
pub fn testapp() -> PathBuf {
    let p = PathBuf::from(FLOCKD).with_file_name("flock-testapp");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p flock-testapp` (./test.sh builds the whole workspace)",
        p.display()
    );
    p
}

/// One request to the test app at `addr` on a new connection; its reply line.
pub fn ask(addr: &str, req: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("{req}\n").as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line.trim().to_string())
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Appends `w<i>` to the test app as fast as it answers, on one connection (a new one after an
/// error), until `stop`; every acknowledged entry with the time of its OK.
pub fn writer(
    addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(String, Instant)> {
    use std::sync::atomic::Ordering;
    let mut acked = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(s) = TcpStream::connect(&addr) else {
            thread::sleep(Duration::from_millis(5));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let v = format!("w{i}");
            let mut line = String::new();
            let ok = w.write_all(format!("APPEND {v}\n").as_bytes()).is_ok()
                && r.read_line(&mut line).is_ok_and(|n| n > 0)
                && line.starts_with("OK ");
            if !ok {
                break;
            }
            acked.push((v, Instant::now()));
        }
    }
    acked
}

/// Every entry the test app at `addr` holds.
pub fn read_all(addr: &str) -> Vec<String> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(b"READ\n").unwrap();
    let mut out = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line.unwrap();
        if line == "END" {
            break;
        }
        out.push(
            line.split_once(' ')
                .map_or(line.clone(), |(_, t)| t.to_string()),
        );
    }
    out
}

/// Runs `docker ARGS`; its stdout, or `Err(stderr)`.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(format!(
            "docker {args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Ends the apps started under `dir` (their working directories are there) when
/// dropped, so a failing test leaves none running: apps outlive flockd by design. The
/// cluster's own flockd processes (their command lines name `dir`) go first, so that none
/// starts an app again behind it; declare it after the cluster.
pub struct EndApps(pub PathBuf);

impl Drop for EndApps {
    fn drop(&mut self) {
        let dir = self.0.display().to_string();
        let procs = |pick: &dyn Fn(&str, Option<PathBuf>) -> bool| -> Vec<i32> {
            let Ok(entries) = std::fs::read_dir("/proc") else {
                return Vec::new();
            };
            entries
                .flatten()
                .filter_map(|e| {
                    let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
                    let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                    let cwd = std::fs::read_link(e.path().join("cwd")).ok();
                    pick(&cmd, cwd).then_some(pid)
                })
                .collect()
        };
        let flockds = procs(&|cmd, _| cmd.contains("flockd") && cmd.contains(&dir));
        // Every app the cluster started works in its data dir: the test app, and the shells
        // and sleeps some tests deploy.
        let apps = procs(&|_, cwd| cwd.is_some_and(|c| c.starts_with(&self.0)));
        for pid in flockds.into_iter().chain(apps) {
            // SAFETY: kill(2) on a process of this test's cluster; no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Deploys Flocker files written in `dir`: application.yml with `entries` (application.yml's
/// `applications:` entries, as [`counter_app`] gives them) and deployment.yml putting `app` on
/// node `node`, through node 1.
pub fn deploy_flocker(c: &TestCluster, dir: &Path, entries: &str, node: &str, app: &str) {
    let application = dir.join("application.yml");
    std::fs::write(
        &application,
        format!("version: 1\napplications:\n{entries}"),
    )
    .unwrap();
    let deployment = dir.join("deployment.yml");
    std::fs::write(
        &deployment,
        format!("version: 1\nnodes:\n  {node}: [{app}]\n"),
    )
    .unwrap();
    c.ctl_ok(
        c.addr(1),
        &[
            "deploy",
            deployment.to_str().unwrap(),
            application.to_str().unwrap(),
        ],
    );
}

/// Waits until counter's dataset has a replica known to hold a recorded snapshot.
pub fn wait_for_replica(c: &TestCluster) {
    until(
        "counter's dataset to have a replica holding a snapshot",
        Duration::from_secs(30),
        || {
            let ds: Value =
                serde_json::from_str(&c.ctl_ok(c.addr(1), &["dataset", "ls", "counter", "--json"]))
                    .unwrap();
            ds[0]["bases"]
                .as_object()
                .is_some_and(|b| !b.is_empty())
                .then_some(())
        },
    );
}
