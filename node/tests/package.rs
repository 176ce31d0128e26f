//! flock's Debian package (packaging/build-deb.sh), built from this test's own flockd and
//! flockctl: its files and fields, a real `dpkg -i` (the test runs as root on a disposable
//! machine, and purges the package at the end, failure or not), its man pages and completions,
//! and the installed unit's command line run as systemd would run it, without systemd.
//!
//! Needs dpkg-dev (dpkg-shlibdeps, strip), groff-base (groff) and bash; a missing one fails the
//! test with the package to install.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::CommandFactory;

use common::{free_port, EndApps, FLOCKCTL, FLOCKD};

const UNIT: &str = "/lib/systemd/system/flockd.service";
const DEFAULTS: &str = "/etc/default/flock";
const DATA: &str = "/var/lib/flock";

/// Each tool the test runs, and the Debian package that has it.
const TOOLS: &[(&str, &str)] = &[
    ("dpkg-deb", "dpkg"),
    ("dpkg", "dpkg"),
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("strip", "binutils"),
    ("groff", "groff-base"),
    ("bash", "bash"),
    ("gzip", "gzip"),
];

/// The package builds from the test's binaries with every file in place; it installs with
/// dpkg; its man pages render and its completions parse; a node created with `flockd init
/// --setup-only` runs from the installed unit's ExecStart (expanded as systemd does, with its
/// EnvironmentFile), answers `flockctl status` and stops cleanly on SIGTERM; `dpkg --purge`
/// removes the package and keeps the data dir.
#[test]
fn p01_the_package_installs_and_its_unit_runs_a_node() {
    require_tools();
    // SAFETY: geteuid(2) reads the process's effective user id; no memory involved.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test installs a package with dpkg -i: run it as root (it does on CI)"
    );
    let status = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "flock"]));
    assert!(
        !status.status.success() || text(&status.stdout).contains("not-installed"),
        "a package named flock is already on this machine ({}): this test installs and purges \
         its own; remove that one first (dpkg --purge flock) if it may go",
        text(&status.stdout)
    );

    let dir = tempfile::tempdir().expect("temp dir");
    // Ends the node and its fencing watchdog if the test fails half-way (apps outlive flockd).
    let _end = EndApps(dir.path().to_path_buf());
    let deb = build_deb(&dir.path().join("out"));
    check_contents(&deb);
    check_fields(&deb);

    let data_existed = Path::new(DATA).exists();
    let mut installed = Installed {
        purged: false,
        remove_data: !data_existed,
    };
    let out = run(Command::new("dpkg")
        .arg("-i")
        .arg(&deb)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(out.status.success(), "dpkg -i failed: {}", both(&out));
    let out = ok(Command::new("/usr/bin/flockd").arg("--version"));
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "/usr/bin/flockd --version: {out}"
    );
    if !data_existed {
        let mode = std::fs::metadata(DATA)
            .unwrap_or_else(|e| panic!("postinst did not create {DATA}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o700, "{DATA} is {:o}, not private", mode);
    }
    check_docs();
    run_unit(dir.path());

    installed.purge();
    for gone in ["/usr/bin/flockd", "/usr/bin/flockctl", UNIT, DEFAULTS] {
        assert!(
            !Path::new(gone).exists(),
            "{gone} is still there after dpkg --purge flock"
        );
    }
    assert!(
        Path::new(DATA).is_dir(),
        "dpkg --purge flock removed {DATA}: the data dir must be kept"
    );
}

/// Fails, naming the package to install, when a tool the test needs is missing.
fn require_tools() {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(tool, pkg)| format!("{tool} (apt-get install {pkg})"))
        .collect();
    assert!(missing.is_empty(), "missing tools: {}", missing.join(", "));
}

/// packaging/build-deb.sh --bin-dir (this test's binaries) --out `out`; the .deb it wrote.
fn build_deb(out: &Path) -> PathBuf {
    let bin_dir = Path::new(FLOCKD).parent().expect("flockd's directory");
    assert_eq!(
        Path::new(FLOCKCTL).parent(),
        Some(bin_dir),
        "flockd and flockctl are built into different directories"
    );
    let script = workspace().join("packaging/build-deb.sh");
    let built = run(Command::new("sh")
        .arg(&script)
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--out")
        .arg(out));
    assert!(
        built.status.success(),
        "build-deb.sh failed: {}",
        both(&built)
    );
    let arch = ok(Command::new("dpkg").arg("--print-architecture"));
    let deb = out.join(format!("flock_{}_{arch}.deb", env!("CARGO_PKG_VERSION")));
    assert_eq!(
        text(&built.stdout).trim(),
        deb.display().to_string(),
        "build-deb.sh names the file it wrote"
    );
    assert!(deb.is_file(), "{} was not written", deb.display());
    deb
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds node/")
        .to_path_buf()
}

/// Every file the package must install, with its mode; and a man page per command.
fn check_contents(deb: &Path) {
    let listing = ok(Command::new("dpkg-deb").arg("--contents").arg(deb));
    // "-rwxr-xr-x root/root 123 2026-01-01 00:00 ./usr/bin/flockd"
    let files: BTreeMap<String, (String, String)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.get(5)?.strip_prefix("./")?;
            (!path.is_empty() && !path.ends_with('/'))
                .then(|| (format!("/{path}"), (f[0].to_string(), f[1].to_string())))
        })
        .collect();
    let mut expected: Vec<(String, &str)> = vec![
        ("/usr/bin/flockd".into(), "-rwxr-xr-x"),
        ("/usr/bin/flockctl".into(), "-rwxr-xr-x"),
        (UNIT.into(), "-rw-r--r--"),
        (DEFAULTS.into(), "-rw-r--r--"),
        ("/usr/share/doc/flock/copyright".into(), "-rw-r--r--"),
        ("/usr/share/doc/flock/README".into(), "-rw-r--r--"),
        ("/usr/share/doc/flock/changelog.gz".into(), "-rw-r--r--"),
    ];
    for b in ["flockd", "flockctl"] {
        for f in [
            format!("/usr/share/bash-completion/completions/{b}"),
            format!("/usr/share/zsh/vendor-completions/_{b}"),
            format!("/usr/share/fish/vendor_completions.d/{b}.fish"),
        ] {
            expected.push((f, "-rw-r--r--"));
        }
    }
    // One page per command: flockctl's from its definition here, flockd's (a binary's) by name.
    let mut pages = man_pages(&flock_node::ctl::Cli::command(), "flockctl");
    pages.extend(
        [
            "flockd",
            "flockd-init",
            "flockd-join",
            "flockd-run",
            "flockd-dev",
        ]
        .map(String::from),
    );
    assert!(pages.contains(&"flockctl-dataset-move".to_string()));
    for p in &pages {
        expected.push((format!("/usr/share/man/man1/{p}.1.gz"), "-rw-r--r--"));
    }
    for (path, mode) in &expected {
        match files.get(path) {
            Some((m, owner)) => {
                assert_eq!(m, mode, "{path}'s mode in the package");
                assert_eq!(owner, "root/root", "{path}'s owner in the package");
            }
            None => panic!("the package has no {path}; it has:\n{listing}"),
        }
    }
    for hidden in ["flockd-fence-watch", "flockd-gen-docs"] {
        assert!(
            !files.contains_key(&format!("/usr/share/man/man1/{hidden}.1.gz")),
            "a man page for the hidden command {hidden}"
        );
    }
}

/// flockctl, flockctl-dataset, flockctl-dataset-move...: the pages clap_mangen writes.
fn man_pages(cmd: &clap::Command, name: &str) -> Vec<String> {
    let mut pages = vec![name.to_string()];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.extend(man_pages(sub, &format!("{name}-{}", sub.get_name())));
    }
    pages
}

/// The control file's fields and the conffile.
fn check_fields(deb: &Path) {
    let field = |f: &str| ok(Command::new("dpkg-deb").arg("--field").arg(deb).arg(f));
    assert_eq!(field("Package"), "flock");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        field("Architecture"),
        ok(Command::new("dpkg").arg("--print-architecture"))
    );
    let depends = field("Depends");
    assert!(
        depends.contains("libc6 (>="),
        "Depends names libc6 with a version: {depends}"
    );
    assert!(!field("Maintainer").is_empty(), "no Maintainer");
    let info = ok(Command::new("dpkg-deb").arg("--info").arg(deb));
    for member in ["postinst", "prerm", "postrm", "conffiles", "md5sums"] {
        assert!(info.contains(member), "no {member} in the package: {info}");
    }
    let conffiles = ok(Command::new("dpkg-deb")
        .arg("--info")
        .arg(deb)
        .arg("conffiles"));
    assert_eq!(conffiles, DEFAULTS, "the package's conffiles");
}

/// A man page renders without a warning and says what its command takes; the bash
/// completions parse and register their commands.
fn check_docs() {
    let page = "/usr/share/man/man1/flockctl-dataset-move.1.gz";
    let gz = run(Command::new("gzip").args(["-t", page]));
    assert!(gz.status.success(), "gzip -t {page}: {}", both(&gz));
    let rendered = run(Command::new("sh").args([
        "-c",
        &format!("gzip -dc {page} | groff -man -Tascii -ww -P-cbou"),
    ]));
    let out = text(&rendered.stdout);
    assert!(
        rendered.status.success() && text(&rendered.stderr).trim().is_empty(),
        "groff on {page}: {}",
        both(&rendered)
    );
    for want in ["flockctl-dataset-move", "--to", "--cancel"] {
        assert!(out.contains(want), "{page} does not mention {want}:\n{out}");
    }
    for b in ["flockd", "flockctl"] {
        let f = format!("/usr/share/bash-completion/completions/{b}");
        let parsed = run(Command::new("bash").args(["-n", &f]));
        assert!(parsed.status.success(), "bash -n {f}: {}", both(&parsed));
        let registered =
            ok(Command::new("bash").args(["-c", &format!("source {f} && complete -p {b}")]));
        assert!(
            registered.contains(b),
            "{f} registers no completion: {registered}"
        );
    }
    // Users without the package: the same script from flockctl itself.
    let printed = ok(Command::new("/usr/bin/flockctl").args(["completions", "bash"]));
    let shipped =
        std::fs::read_to_string("/usr/share/bash-completion/completions/flockctl").expect("read");
    assert_eq!(printed.trim(), shipped.trim(), "flockctl completions bash");
}

/// Creates a node with the installed flockd (`init --setup-only`), then runs the installed
/// unit's ExecStart, expanded as systemd would with FLOCK_DATA_DIR pointing at it.
fn run_unit(dir: &Path) {
    let data = dir.join("node");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let setup = run_bounded(
        Command::new("/usr/bin/flockd")
            .args(["init", "--setup-only", "--data-dir"])
            .arg(&data)
            .args(["--listen", &listen])
            // The Docker volume plugin's socket would be left in /run/docker/plugins.
            .env("FLOCK_NO_PLUGIN", "true"),
        Duration::from_secs(60),
    );
    let said = text(&setup.stdout);
    assert!(
        setup.status.success(),
        "flockd init --setup-only: {}",
        both(&setup)
    );
    for want in ["flockd: join with token", "systemctl enable --now flockd"] {
        assert!(
            said.contains(want),
            "init --setup-only did not say {want:?}: {said}"
        );
    }
    assert!(
        !said.contains("flockd: ready"),
        "init --setup-only ran the node: {said}"
    );
    let watchdog = data.join("fence/watch.lock");
    if let Ok(pid) = std::fs::read_to_string(&watchdog) {
        let pid = pid.trim();
        common::until(
            "the setup's watchdog to end",
            Duration::from_secs(5),
            || (pid.is_empty() || !common::pid_alive(pid)).then_some(()),
        );
    }

    let unit = std::fs::read_to_string(UNIT).expect("the installed unit");
    let service = unit_settings(&unit);
    assert_eq!(
        service.get("KillMode").map(String::as_str),
        Some("process"),
        "the unit must leave flockd's apps and watchdog running on stop and restart"
    );
    let mut env = BTreeMap::new();
    if let Some(v) = service.get("Environment") {
        for (k, v) in v.split_whitespace().filter_map(|a| a.split_once('=')) {
            env.insert(k.to_string(), v.to_string());
        }
    }
    let file = service
        .get("EnvironmentFile")
        .expect("the unit reads an EnvironmentFile");
    let file = file.strip_prefix('-').unwrap_or(file);
    assert_eq!(file, DEFAULTS);
    let defaults = std::fs::read_to_string(file).expect("the installed /etc/default/flock");
    env.extend(environment_file(&defaults));
    assert_eq!(env.get("FLOCK_DATA_DIR").map(String::as_str), Some(DATA));
    env.insert("FLOCK_DATA_DIR".into(), data.display().to_string());
    let exec = service.get("ExecStart").expect("the unit's ExecStart");
    let argv = expand_exec(exec, &env);
    assert_eq!(
        argv[..4],
        [
            "/usr/bin/flockd",
            "run",
            "--data-dir",
            &data.display().to_string()
        ],
        "ExecStart {exec:?} expanded"
    );

    let mut node = Node::start(&argv, &env, &dir.join("unit.log"));
    let ready = node.wait_line("flockd: ready", Duration::from_secs(60));
    assert!(ready.contains(&listen), "{ready}");
    let status = ok(Command::new("/usr/bin/flockctl")
        .arg("--config")
        .arg(data.join("admin.conf"))
        .arg("status")
        .env_remove("FLOCK_CONFIG")
        .env_remove("FLOCK_ADDR"));
    assert!(status.contains("leader"), "flockctl status: {status}");

    // A second node joins the one the unit runs, and stops once a member.
    let token = said
        .lines()
        .find_map(|l| l.strip_prefix("flockd: join with token "))
        .expect("init printed the token")
        .trim();
    let joined = run_bounded(
        Command::new("/usr/bin/flockd")
            .args([
                "join",
                &listen,
                "--token",
                token,
                "--setup-only",
                "--data-dir",
            ])
            .arg(dir.join("node2"))
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .env("FLOCK_NO_PLUGIN", "true"),
        Duration::from_secs(60),
    );
    assert!(
        joined.status.success()
            && text(&joined.stdout).contains("systemctl enable --now flockd")
            && !text(&joined.stdout).contains("flockd: ready"),
        "flockd join --setup-only: {}",
        both(&joined)
    );

    let code = node.terminate(Duration::from_secs(60));
    assert_eq!(
        code,
        Some(0),
        "flockd run did not exit 0 on SIGTERM; log:\n{}",
        std::fs::read_to_string(dir.join("unit.log")).unwrap_or_default()
    );
}

/// The [Service] settings of a unit file, the last of each name winning (none of ours repeats).
fn unit_settings(unit: &str) -> BTreeMap<String, String> {
    let mut section = "";
    let mut settings = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]" {
            if let Some((k, v)) = line.split_once('=') {
                settings.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    settings
}

/// KEY=VALUE lines of an EnvironmentFile, quotes taken off as systemd does.
fn environment_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let unquoted = ['"', '\'']
                .iter()
                .find_map(|q| v.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
                .unwrap_or(v);
            (k.trim().to_string(), unquoted.to_string())
        })
        .collect()
}

/// systemd's expansion of a command line (systemd.service(5), "Command lines"): a word that is
/// `$NAME` alone becomes the variable's value split at whitespace (no word if empty); `${NAME}`
/// is replaced within its word, unsplit. (Quoting is not needed by our unit.)
fn expand_exec(line: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let get = |name: &str| env.get(name).cloned().unwrap_or_default();
    let mut argv = Vec::new();
    for word in line.split_whitespace() {
        if let Some(name) = word.strip_prefix('$').filter(|n| !n.starts_with('{')) {
            argv.extend(get(name).split_whitespace().map(String::from));
            continue;
        }
        let mut out = String::new();
        let mut rest = word;
        while let Some(at) = rest.find("${") {
            out.push_str(&rest[..at]);
            let end = rest[at..].find('}').expect("a closed ${") + at;
            out.push_str(&get(&rest[at + 2..end]));
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        argv.push(out);
    }
    argv
}

/// The unit's flockd, run as systemd would run it (its environment, no terminal).
struct Node {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Node {
    fn start(argv: &[String], env: &BTreeMap<String, String>, log: &Path) -> Node {
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(env)
            // As in setup: no plugin socket left in /run/docker/plugins.
            .env("FLOCK_NO_PLUGIN", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {argv:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Node {
            child: Some(child),
            lines,
            seen: Vec::new(),
        }
    }

    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) => self.seen.push(l),
                Err(e) => panic!("no line {prefix:?} ({e:?}); saw {:?}", self.seen),
            }
        }
    }

    /// SIGTERM, as `systemctl stop` sends it (KillMode=process: to flockd alone); its exit code.
    fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) of our own child; no memory involved.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The installed package, purged when dropped (a failed test included), and /var/lib/flock
/// removed if the package made it (it stays empty: the test's node lives in a temp dir).
struct Installed {
    purged: bool,
    remove_data: bool,
}

impl Installed {
    fn purge(&mut self) {
        self.purged = true;
        let out = run(Command::new("dpkg")
            .args(["--purge", "flock"])
            .env("DEBIAN_FRONTEND", "noninteractive"));
        assert!(out.status.success(), "dpkg --purge flock: {}", both(&out));
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.purged {
            let _ = Command::new("dpkg")
                .args(["--purge", "flock"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output();
        }
        if self.remove_data {
            let _ = std::fs::remove_dir(DATA);
        }
    }
}

/// Runs a command to completion, stdout and stderr captured.
fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; its stdout, trimmed.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", both(&out));
    text(&out.stdout).trim().to_string()
}

/// Runs a command, killed if it takes longer than `limit` (a setup that hangs fails the test).
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for the command"),
        Err(_) => {
            // SAFETY: kill(2) of our own child, not yet reaped (its waiter still waits).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let out = rx.recv().ok().and_then(Result::ok);
            panic!(
                "{cmd:?} did not finish within {limit:?}; printed: {}",
                out.map(|o| both(&o)).unwrap_or_default()
            );
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn both(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}
