//! The fencing watchdog (`flockd fence-watch`) with real processes, the real flockd binary and
//! the real local Docker engine (the container test fails when there is none).
//!
//! Every test ends what it started, also on a failure: the watchdogs by pid (found through
//! /proc by their command line, which names the test's own temp dir), the apps by process group
//! (the test holds them as unreaped children, so their pids cannot be reused meanwhile), the
//! containers by id.

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{docker, ensure_test_image, until, FLOCKD, TEST_IMAGE};
use flock_node::fence::{spawn_watch, FenceDir};

const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// What a test started; ended when dropped.
#[derive(Default)]
struct Started {
    /// Data dirs whose watchdogs are ended.
    dirs: Vec<PathBuf>,
    /// Process group leaders, children of this test.
    apps: Vec<Child>,
    containers: Vec<String>,
}

impl Drop for Started {
    fn drop(&mut self) {
        for dir in &self.dirs {
            for pid in watchdogs(dir) {
                // SAFETY: kill(2) on a watchdog of this test's own temp dir.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for app in &mut self.apps {
            // The leader is an unreaped child of ours: its group id is still the app's.
            // SAFETY: kill(2) on this test's own process group.
            unsafe { libc::kill(-(app.id() as i32), libc::SIGKILL) };
            let _ = app.wait();
        }
        for id in &self.containers {
            let _ = docker(&["rm", "-f", id]);
        }
    }
}

impl Started {
    /// Starts `sh -c 'sleep 1000 & exec sleep 1000'` in a process group of its own: two
    /// processes; returns the group's id (the leader's pid) once both run.
    fn app(&mut self) -> i32 {
        let child = Command::new("sh")
            .args(["-c", "sleep 1000 & exec sleep 1000"])
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start sh");
        let pgid = child.id() as i32;
        self.apps.push(child);
        until("both processes of the app", Duration::from_secs(5), || {
            (group(pgid).len() == 2).then_some(())
        });
        pgid
    }

    /// Starts the watchdog of `data_dir` through the real flockd; its pid.
    fn watch(&mut self, data_dir: &Path) -> i32 {
        self.dirs.push(data_dir.to_path_buf());
        spawn_watch(Path::new(FLOCKD), data_dir).expect("spawn_watch");
        let pids = watchdogs(data_dir);
        assert_eq!(
            pids.len(),
            1,
            "watchdogs of {}: {pids:?}",
            data_dir.display()
        );
        pids[0]
    }
}

/// The live processes whose /proc/PID/stat matches `pick` (given the fields after the name).
fn processes(pick: impl Fn(i32, &[&str]) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.first().is_some_and(|s| *s != "Z" && *s != "X") && pick(pid, &fields) {
            out.push(pid);
        }
    }
    out
}

/// The live processes of group `pgid`.
fn group(pgid: i32) -> Vec<i32> {
    processes(|_, f| f.get(2).and_then(|g| g.parse().ok()) == Some(pgid))
}

/// The live watchdogs whose command line names `data_dir`.
fn watchdogs(data_dir: &Path) -> Vec<i32> {
    let dir = data_dir.display().to_string();
    processes(|pid, _| {
        let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        cmd.contains("fence-watch") && cmd.contains(&dir)
    })
}

fn log(fence: &FenceDir) -> String {
    fs::read_to_string(fence.path().join("watch.log")).unwrap_or_default()
}

#[test]
fn g01_a_guarded_process_group_lives_while_the_lease_is_renewed_and_dies_once_it_lapses() {
    let tmp = tempfile::tempdir().unwrap();
    let mut started = Started::default();
    let pgid = started.app();
    let fence = FenceDir::open(tmp.path()).unwrap();
    fence.guard_process("db", pgid as u32).unwrap();
    let lease = Duration::from_millis(1500);
    fence.write_lease(lease).unwrap();
    let watchdog = started.watch(tmp.path());
    assert_eq!(
        fs::read_to_string(fence.path().join("watch.lock"))
            .unwrap()
            .trim(),
        watchdog.to_string(),
        "the lock file names the watchdog"
    );

    let renewing = Instant::now();
    let mut last = Instant::now();
    while renewing.elapsed() < Duration::from_secs(2) {
        last = Instant::now();
        fence.write_lease(lease).unwrap();
        assert!(fence.lease_holds());
        thread::sleep(Duration::from_millis(200));
        assert_eq!(
            group(pgid).len(),
            2,
            "the app died while the lease was renewed"
        );
    }

    let died = until(
        "the app's group to die",
        lease + Duration::from_secs(1),
        || group(pgid).is_empty().then(|| last.elapsed()),
    );
    assert!(
        died >= lease,
        "the app died {died:?} after the last renewal, before its lease of {lease:?} ran out"
    );
    assert!(!fence.lease_holds());
    until("the guard to go", Duration::from_secs(1), || {
        fence.guarded().unwrap().is_empty().then_some(())
    });
    let log = log(&fence);
    assert!(
        log.contains(&format!("fenced app db (pid {pgid}): lease expired ")),
        "watch.log: {log}"
    );
    assert_eq!(
        watchdogs(tmp.path()),
        vec![watchdog],
        "the watchdog keeps watching"
    );
}

#[test]
fn g02_a_guard_whose_pid_names_another_process_now_kills_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut started = Started::default();
    let reused = started.app();
    let guarded = started.app();
    let fence = FenceDir::open(tmp.path()).unwrap();
    fence.guard_process("old", reused as u32).unwrap();
    fence.guard_process("db", guarded as u32).unwrap();
    // As if "old"'s process had ended and its pid gone to the process running now: the
    // recorded start time is not the live process's.
    let path = fence.path().join("guards").join("old");
    let record = fs::read_to_string(&path).unwrap();
    let start: u64 = record.split_whitespace().last().unwrap().parse().unwrap();
    assert_eq!(
        record,
        format!("flock-fence 1\nprocess {reused} {start}\n"),
        "the guard's format"
    );
    fs::write(
        &path,
        format!("flock-fence 1\nprocess {reused} {}\n", start + 1),
    )
    .unwrap();

    fence.write_lease(Duration::ZERO).unwrap();
    started.watch(tmp.path());
    until(
        "both guards to be dealt with",
        Duration::from_secs(3),
        || fence.guarded().unwrap().is_empty().then_some(()),
    );
    until("the guarded app to die", Duration::from_secs(1), || {
        group(guarded).is_empty().then_some(())
    });
    assert_eq!(
        group(reused).len(),
        2,
        "the process that reused the pid was killed"
    );
    let log = log(&fence);
    assert!(
        log.contains(&format!("fenced app db (pid {guarded})")),
        "{log}"
    );
    assert!(
        log.contains(&format!("app old (pid {reused}) needs no fencing")),
        "{log}"
    );
}

#[test]
fn g03_no_lease_file_kills_nothing_a_garbled_one_counts_as_expired() {
    let tmp = tempfile::tempdir().unwrap();
    let mut started = Started::default();
    let pgid = started.app();
    let fence = FenceDir::open(tmp.path()).unwrap();
    fence.guard_process("db", pgid as u32).unwrap();
    started.watch(tmp.path());
    thread::sleep(Duration::from_millis(500));
    assert_eq!(group(pgid).len(), 2, "killed without a lease file");
    assert_eq!(fence.guarded().unwrap(), vec!["db"]);

    fs::write(fence.path().join("lease"), "flock-fence 1\nlease soon\n").unwrap();
    assert_eq!(fence.lease_deadline(), None);
    until("the app to die", Duration::from_secs(2), || {
        group(pgid).is_empty().then_some(())
    });
    let log = log(&fence);
    assert!(
        log.contains(&format!("fenced app db (pid {pgid}): lease unreadable")),
        "{log}"
    );
}

#[test]
fn g04_a_second_watchdog_for_the_same_dir_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut started = Started::default();
    let first = started.watch(tmp.path());
    // What flockd does on every start: a no-op while one runs.
    spawn_watch(Path::new(FLOCKD), tmp.path()).unwrap();
    assert_eq!(watchdogs(tmp.path()), vec![first]);

    // Started directly, one sees the lock taken and exits 0.
    let fence = FenceDir::open(tmp.path()).unwrap();
    let mut second = Command::new(FLOCKD)
        .arg("fence-watch")
        .arg("--dir")
        .arg(fence.path())
        .spawn()
        .unwrap();
    let status = until(
        "the second watchdog to exit",
        Duration::from_secs(3),
        || second.try_wait().unwrap(),
    );
    assert!(status.success(), "{status}");
    assert_eq!(watchdogs(tmp.path()), vec![first]);
}

#[test]
fn g05_removing_the_data_dir_ends_its_watchdog() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("node");
    let mut started = Started::default();
    started.watch(&data_dir);
    assert!(data_dir.join("fence").is_dir());
    fs::remove_dir_all(&data_dir).unwrap();
    until("the watchdog to exit", Duration::from_secs(2), || {
        watchdogs(&data_dir).is_empty().then_some(())
    });
    assert!(!data_dir.exists(), "the watchdog made the dir again");
}

#[test]
fn g06_a_guarded_container_is_killed_through_the_engine_once_the_lease_lapses() {
    ensure_test_image();
    let tmp = tempfile::tempdir().unwrap();
    let mut started = Started::default();
    let id = docker(&[
        "run",
        "-d",
        "--rm",
        "--label",
        "flock-test=fence",
        TEST_IMAGE,
        "sleep",
        "1000",
    ])
    .unwrap()
    .trim()
    .to_string();
    started.containers.push(id.clone());
    let running = || {
        docker(&["ps", "-q", "--no-trunc", "--filter", &format!("id={id}")])
            .unwrap()
            .contains(&id)
    };
    assert!(running());

    let fence = FenceDir::open(tmp.path()).unwrap();
    fence.guard_container("web", &id, DOCKER_SOCKET).unwrap();
    let lease = Duration::from_millis(1000);
    let renewed = Instant::now();
    fence.write_lease(lease).unwrap();
    started.watch(tmp.path());
    thread::sleep(Duration::from_millis(500));
    assert!(running(), "killed before the lease ran out");
    let died = until("the container to stop", Duration::from_secs(5), || {
        (!running()).then(|| renewed.elapsed())
    });
    assert!(
        died >= lease,
        "stopped {died:?} after the lease was written"
    );
    until("the guard to go", Duration::from_secs(1), || {
        fence.guarded().unwrap().is_empty().then_some(())
    });
    let log = log(&fence);
    assert!(
        log.contains(&format!("fenced app web (container {id}): lease expired ")),
        "{log}"
    );
}
