//! Secrets at rest, against real flockd processes: nothing in a node's data dir is readable by
//! another local user, whatever umask flockd was started with; a data dir found with looser
//! modes is tightened at start; the Docker plugin's socket is for root and the docker group.
//!
//! Applications' data (dataset trees, an app's work dir) keeps the modes the application gave
//! it: flockd never changes them. Other users cannot reach it all the same, because every
//! directory above it is 0700; the unprivileged reads below try those paths too.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use flock_node::datadir::holds_app_data;

const USER: &str = "flocktest";
const PASSWORD: &str = "hunter2-at-rest-7f3a";

/// The unprivileged user of these tests, created if missing (uid, gid).
fn unprivileged_user() -> (u32, u32) {
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, USER]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        // Another test may create it at the same time: only the outcome matters.
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .output();
    }
    match (id("-u"), id("-g")) {
        (Some(u), Some(g)) => (u, g),
        _ => panic!("cannot create the unprivileged user {USER} (these tests run as root)"),
    }
}

/// Every path under `root` as root sees it: (path, is a directory), symlinks not followed.
fn every_path(root: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            for e in fs::read_dir(&p).expect("ls").flatten() {
                stack.push(e.path());
            }
        }
        if !md.file_type().is_symlink() {
            out.push((p, md.is_dir()));
        }
    }
    out
}

/// What `USER` could read (files) or list (directories) of `paths`.
fn readable_by_others(paths: &[(PathBuf, bool)]) -> Vec<String> {
    let (uid, gid) = unprivileged_user();
    let script = r#"for a; do p="${a#?:}"; case "$a" in
        d:*) ls -a "$p" >/dev/null 2>&1 && echo "LISTED $p";;
        *) head -c1 "$p" >/dev/null 2>&1 && echo "READ $p";;
    esac; done; true"#;
    let mut out = Vec::new();
    for chunk in paths.chunks(500) {
        let args: Vec<String> = chunk
            .iter()
            .map(|(p, dir)| format!("{}:{}", if *dir { 'd' } else { 'f' }, p.display()))
            .collect();
        let o = Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .args(["sh", "-c", script, "sh"])
            .args(&args)
            .output()
            .expect("setpriv");
        assert!(
            o.status.success(),
            "the check as {USER} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out.extend(String::from_utf8_lossy(&o.stdout).lines().map(String::from));
    }
    out
}

/// Paths of flockd's own in `dd` (applications' data left out) that group or others may
/// access, with their modes.
fn loose_modes(dd: &Path) -> Vec<String> {
    every_path(dd)
        .into_iter()
        .filter(|(p, _)| !holds_app_data(p.strip_prefix(dd).expect("below the data dir")))
        .filter_map(|(p, _)| {
            let mode = fs::symlink_metadata(&p).ok()?.mode() & 0o7777;
            (mode & 0o077 != 0).then(|| format!("{} {mode:04o}", p.display()))
        })
        .collect()
}

fn set_umask(mask: u32) {
    // SAFETY: umask only sets this test process's creation mask (nextest runs each test in its
    // own process); flockd inherits it.
    unsafe { libc::umask(mask as libc::mode_t) };
}

/// Kills the app a test deployed on node 1 (it outlives flockd), even when the test fails.
struct StopApp(PathBuf);

impl Drop for StopApp {
    fn drop(&mut self) {
        let pid = fs::read_to_string(self.0.join("apps/counter/pid")).unwrap_or_default();
        if let Some(pid) = pid
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) on the app's process group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

/// A process-driver app with a password in its environment and a dataset.
#[must_use]
fn deploy_secret_app(c: &TestCluster) -> StopApp {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let app = counter_app(port, port + 1).replace(
        "    restart_policy:",
        &format!("    environment:\n      DB_PASSWORD: {PASSWORD}\n    restart_policy:"),
    );
    let application = dir.path().join("application.yml");
    fs::write(&application, format!("version: 1\napplications:\n{app}")).expect("write");
    let deployment = dir.path().join("deployment.yml");
    fs::write(
        &deployment,
        "version: 1\nnodes:\n  n1: [counter]\n  n2: []\n",
    )
    .expect("write");
    c.ctl_ok(
        c.addr(1),
        &[
            "deploy",
            deployment.to_str().expect("utf-8"),
            application.to_str().expect("utf-8"),
        ],
    );
    let stop = StopApp(c.data_dir(1));
    let addr = format!("127.0.0.1:{port}");
    until("the app to run", Duration::from_secs(30), || {
        (ask(&addr, "APPEND at-rest").as_deref() == Some("OK 1")).then_some(())
    });
    c.ctl_ok(c.addr(2), &["dataset", "create", "spare", "--node", "n2"]);
    stop
}

/// The spec file of the secret app on node 1 (it holds the password).
fn spec_file(c: &TestCluster) -> PathBuf {
    let spec = c.data_dir(1).join("apps/counter/spec.json");
    let text = fs::read_to_string(&spec).expect("the app's spec");
    assert!(text.contains(PASSWORD), "the spec holds the environment");
    spec
}

fn nothing_readable_with_umask(mask: u32) {
    set_umask(mask);
    let plugin = format!("flockatrest{}", std::process::id());
    // Not the engine's directory: the engine would wait on this socket in every later
    // `docker volume ls` once the test's flockd is gone.
    let plugins = tempfile::tempdir().expect("plugin dir");
    let c = TestCluster::start_env(
        2,
        &[],
        vec![s(&["--plugin-name", &plugin])],
        vec![(
            flock_node::plugin::PLUGIN_DIR_ENV.to_string(),
            plugins.path().display().to_string(),
        )],
    );
    let _stop = deploy_secret_app(&c);
    let spec = spec_file(&c);
    let log = c.data_dir(1).join("apps/counter/output.log");
    for f in [&spec, &log, &c.data_dir(1).join("raft.redb")] {
        assert_eq!(
            fs::metadata(f).expect("stat").mode() & 0o777,
            0o600,
            "{}",
            f.display()
        );
    }
    let socket = plugins.path().join(format!("{plugin}.sock"));
    let md = fs::metadata(&socket).expect("the plugin socket");
    match flock_node::plugin::docker_gid() {
        Some(gid) => assert_eq!((md.mode() & 0o7777, md.gid()), (0o660, gid)),
        None => assert_eq!(md.mode() & 0o7777, 0o600),
    }
    let mut all = Vec::new();
    let mut app_data = 0;
    for i in 1..=2 {
        let dd = c.data_dir(i);
        assert_eq!(
            fs::metadata(&dd).expect("stat").mode() & 0o777,
            0o700,
            "umask {mask:03o}"
        );
        let loose = loose_modes(&dd);
        assert!(loose.is_empty(), "umask {mask:03o}: {loose:#?}");
        let paths = every_path(&dd);
        app_data += paths
            .iter()
            .filter(|(p, _)| holds_app_data(p.strip_prefix(&dd).expect("below")))
            .count();
        all.extend(paths);
    }
    assert!(all.len() > 20, "{} paths", all.len());
    let leaks = readable_by_others(&all);
    assert!(
        leaks.is_empty(),
        "umask {mask:03o}: {USER} can read: {leaks:#?}"
    );
    eprintln!(
        "umask {mask:03o}: {} paths in 2 data dirs ({app_data} of them app data), none readable by {USER}",
        all.len()
    );
}

#[test]
fn r01_nothing_in_a_data_dir_is_readable_by_others_with_umask_022() {
    nothing_readable_with_umask(0o022);
}

#[test]
fn r02_nothing_in_a_data_dir_is_readable_by_others_with_umask_000() {
    nothing_readable_with_umask(0o000);
}

#[test]
fn r03_a_loose_data_dir_is_tightened_at_start_and_app_data_is_left_alone() {
    set_umask(0o022);
    let mut c = TestCluster::start_with(2, &[], Vec::new());
    let _stop = deploy_secret_app(&c);
    spec_file(&c);
    let dd = c.data_dir(1);
    let live = dd.join("storage/datasets");
    // The app's own file in its dataset, with the mode the app chose.
    let app_file = every_path(&live)
        .into_iter()
        .find(|(p, dir)| !dir && p.components().any(|c| c.as_os_str() == "live"))
        .map(|(p, _)| p)
        .expect("the app wrote into its dataset");
    assert_eq!(
        c.nodes[0].signal_and_wait(libc::SIGTERM, Duration::from_secs(10)),
        Some(0)
    );
    // chmod -R, as a careless backup restore would; the private keys aside (below).
    let keys = [dd.join("tls/node.key"), dd.join("tls/ca.key")];
    for (p, dir) in every_path(&dd) {
        if !keys.contains(&p) {
            let mode = if dir { 0o755 } else { 0o644 };
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        }
    }
    c.restart(1);
    let log = fs::read_to_string(c.log(1, "run")).expect("log");
    let line = log
        .lines()
        .find(|l| l.contains("took group and other permissions away"))
        .unwrap_or_else(|| panic!("no log line about tightened modes:\n{log}"));
    for named in [
        ". 0755->0700",
        "raft.redb 0644->0600",
        "identity.json 0644->0600",
        "apps/counter/spec.json 0644->0600",
        "apps/counter/output.log 0644->0600",
        "tls/ca.crt 0644->0600",
    ] {
        assert!(line.contains(named), "{named} not named: {line}");
    }
    eprintln!("{line}");
    let loose = loose_modes(&dd);
    assert!(loose.is_empty(), "{loose:#?}");
    assert_eq!(
        fs::metadata(&app_file).expect("stat").mode() & 0o777,
        0o644,
        "the app's own file was changed"
    );
    let leaks = readable_by_others(&every_path(&dd));
    assert!(leaks.is_empty(), "{leaks:#?}");
    // A node key others could read is refused, not fixed: it may have been read.
    assert_eq!(
        c.nodes[0].signal_and_wait(libc::SIGTERM, Duration::from_secs(10)),
        Some(0)
    );
    fs::set_permissions(&keys[0], fs::Permissions::from_mode(0o644)).expect("chmod");
    let o = Command::new(FLOCKD)
        .args(["run", "--data-dir", dd.to_str().expect("utf-8")])
        .env("FLOCK_NO_PLUGIN", "true")
        .output()
        .expect("flockd run");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    assert_eq!(fs::metadata(&keys[0]).expect("stat").mode() & 0o777, 0o644);
    fs::set_permissions(&keys[0], fs::Permissions::from_mode(0o600)).expect("chmod");
    // A start after that finds nothing to tighten.
    c.restart(1);
    let log = fs::read_to_string(c.log(1, "run")).expect("log");
    assert!(
        !log.contains("took group and other permissions away"),
        "{log}"
    );
}
