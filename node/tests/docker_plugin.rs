//! The Docker volume plugin, end to end against the real local Docker engine: two flockd
//! processes serving two plugin names, flock-test-n1 and flock-test-n2, the image
//! flock-test-busybox (built from local files by docker/build-testapp-image.sh; nothing is
//! pulled). The names are fixed and a file lock lets one run use them at a time: the engine
//! keeps every (v1) plugin it has talked to until it restarts, and retries a gone one for up to
//! 30 s in `docker volume ls`, so names unique per run would pile up there. The volume's name
//! is unique per run.
//!
//! One engine keeps one driver per volume name ("driver X already has volume V"), so the test
//! plays "the same `docker run` on the other machine" by swapping the plugin names of the two
//! nodes (a restart of each with the other's `--plugin-name`): the engine then reaches n2
//! through the name it used with n1, as each machine's engine reaches its own flockd as
//! `flock`. A mount that another node's engine asks for while a container holds the volume is
//! the plugin call that engine makes, sent straight to n2's socket.
//!
//! This test needs a running Docker engine and fails (never skips) when there is none.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PLUGIN_DIR: &str = "/run/docker/plugins";

fn socket(name: &str) -> PathBuf {
    PathBuf::from(PLUGIN_DIR).join(format!("{name}.sock"))
}

/// POSTs `body` to `path` on the plugin socket `name`, as the engine does; the HTTP status and
/// the JSON answer.
fn call(name: &str, path: &str, body: &str) -> (u16, Value) {
    try_call(name, path, body).unwrap_or_else(|e| panic!("{path} on {name}: {e}"))
}

/// [`call`], with an error for a connection the plugin did not answer on.
fn try_call(name: &str, path: &str, body: &str) -> Result<(u16, Value), String> {
    let mut s = UnixStream::connect(socket(name)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/vnd.docker.plugins.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("send the request: {e}"))?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .map_err(|e| format!("read the answer: {e}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP answer: {raw:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status code in {head:?}"))?;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/vnd.docker.plugins.v1+json"),
        "{head}"
    );
    let v = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    Ok((status, v))
}

/// The plugin's `Err`, which must be there.
fn call_err(name: &str, path: &str, body: &str) -> String {
    let (_, v) = call(name, path, body);
    let e = v["Err"].as_str().unwrap_or_default().to_string();
    assert!(!e.is_empty(), "{path} {body} gave no Err: {v}");
    e
}

/// Two nodes serving plugins `names`; dropping it removes the test's containers and volume
/// (while the plugins still answer), then stops the nodes and removes their sockets.
struct PluginCluster {
    c: TestCluster,
    /// Whether the test removed its volume itself (the engine asks every plugin, stale sockets
    /// included, about a volume it does not know).
    removed: bool,
    names: [String; 2],
    volume: String,
    label: String,
}

impl Drop for PluginCluster {
    fn drop(&mut self) {
        let filter = format!("label={}", self.label);
        if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter]) {
            for id in ids.split_whitespace() {
                let _ = docker(&["rm", "-f", id]);
            }
        }
        if !self.removed {
            let _ = docker(&["volume", "rm", "-f", &self.volume]);
        }
        for n in &mut self.c.nodes {
            n.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
        }
        for name in &self.names {
            let _ = std::fs::remove_file(socket(name));
        }
    }
}

fn dataset(c: &TestCluster, name: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(&c.ctl_ok(c.addr(1), &["dataset", "ls", "--json"]))
        .expect("dataset ls json");
    v.as_array()
        .expect("a list")
        .iter()
        .find(|d| d["name"] == name)
        .cloned()
}

/// An exclusive lock on a file, held while a test serves the fixed plugin names (it is released
/// when the file is closed).
fn plugin_lock() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("flock-docker-plugin-test.lock"))
        .expect("lock file");
    // SAFETY: flock on a file descriptor this function owns.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
    f
}

fn wait_socket(name: &str) {
    // Until the plugin answers a call: connecting is not enough (a socket whose flockd is
    // starting or stopping takes connections it will not answer).
    let deadline = Instant::now() + Duration::from_secs(10);
    let caps = loop {
        match try_call(name, "/VolumeDriver.Capabilities", "{}") {
            Ok((_, caps)) => break caps,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no plugin answers at {}: {e}",
                    socket(name).display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(
        caps["Capabilities"]["Scope"],
        "global",
        "{} is served by another process than this test's flockd: {caps}",
        socket(name).display()
    );
}

#[test]
fn docker_volumes_follow_their_containers() {
    ensure_test_image();
    // Fixed names, one run at a time: the engine keeps every plugin it used until it
    // restarts, so names unique per run would pile up in it.
    let _lock = plugin_lock();
    let tag = format!("{}-{}", std::process::id(), free_port());
    let names = ["flock-test-n1".to_string(), "flock-test-n2".to_string()];
    let volume = format!("demo-{tag}");
    let label = format!("flock.test={tag}");
    let c = TestCluster::start_with(
        2,
        &[],
        vec![
            s(&["--plugin-name", &names[0]]),
            s(&["--plugin-name", &names[1]]),
        ],
    );
    let mut pc = PluginCluster {
        c,
        removed: false,
        names: names.clone(),
        volume: volume.clone(),
        label: label.clone(),
    };
    let [p1, p2] = [names[0].as_str(), names[1].as_str()];
    wait_socket(p1);
    wait_socket(p2);

    // The handshake, and bad input answered with Err, never a hang.
    assert_eq!(
        call(p1, "/Plugin.Activate", ""),
        (200, json!({"Implements": ["VolumeDriver"]}))
    );
    assert_eq!(
        call(p2, "/VolumeDriver.Capabilities", "{}").1,
        json!({"Capabilities": {"Scope": "global"}})
    );
    let (status, v) = call(p1, "/VolumeDriver.Mount", "{\"Name\": \"demo\", ");
    assert_eq!(status, 400);
    assert!(v["Err"].as_str().unwrap().contains("malformed"), "{v}");
    let e = call_err(
        p1,
        "/VolumeDriver.Mount",
        r#"{"Name": "nosuch", "ID": "x"}"#,
    );
    assert!(e.contains("no volume named \"nosuch\""), "{e}");
    let e = call_err(p1, "/VolumeDriver.Get", r#"{"Name": "nosuch"}"#);
    assert!(e.contains("no volume named"), "{e}");
    let e = call_err(p1, "/VolumeDriver.Create", r#"{"Name": "bad/name"}"#);
    assert!(e.contains("invalid volume name \"bad/name\""), "{e}");
    let e = call_err(
        p1,
        "/VolumeDriver.Create",
        r#"{"Name": "x", "Opts": {"color": "blue", "size": "1G"}}"#,
    );
    assert!(e.contains("unknown option(s) \"color\""), "{e}");
    let e = call_err(
        p1,
        "/VolumeDriver.Create",
        r#"{"Name": "x", "Opts": {"size": "lots"}}"#,
    );
    assert!(e.contains("is not a size"), "{e}");
    // The same through the engine: docker's user sees flock's message.
    let out = docker(&["volume", "create", "-d", p1, "-o", "colour=red", &volume]).unwrap_err();
    assert!(
        out.contains("unknown option(s)") && out.contains("colour"),
        "{out}"
    );

    // Written through n1's plugin: created on n1.
    let mount_src = format!("{volume}:/data");
    let run = |plugin: &str, cmd: &[&str]| {
        let mut args = vec![
            "run",
            "--rm",
            "--label",
            &label,
            "-v",
            &mount_src,
            "--volume-driver",
            plugin,
            TEST_IMAGE,
        ];
        args.extend(cmd);
        docker(&args)
    };
    let t = Instant::now();
    run(p1, &["sh", "-c", "echo fish > /data/file"]).unwrap();
    eprintln!("first docker run on n1: {:?}", t.elapsed());
    let d = dataset(&pc.c, &volume).expect("the volume is a flock dataset");
    assert_eq!(d["primary"], "n1", "{d:#}");

    // A container holds it on n1: n2's engine is refused, and so is a move by hand.
    let holder = docker(&[
        "run",
        "-d",
        "--label",
        &label,
        "-v",
        &mount_src,
        "--volume-driver",
        p1,
        TEST_IMAGE,
        "sleep",
        "300",
    ])
    .unwrap();
    let holder = holder.trim().to_string();
    let e = call_err(
        p2,
        "/VolumeDriver.Mount",
        &json!({"Name": volume, "ID": "engine-of-n2"}).to_string(),
    );
    assert!(
        e.contains(&format!(
            "volume \"{volume}\" is in use by 1 container(s) on node \"n1\""
        )),
        "{e}"
    );
    let mv =
        pc.c.ctl(pc.c.addr(2), &["dataset", "move", &volume, "--to", "n2"]);
    assert!(!mv.status.success());
    assert!(
        stderr(&mv).contains("in use by 1 container(s) on node \"n1\""),
        "{}",
        stderr(&mv)
    );
    let e = call_err(
        p2,
        "/VolumeDriver.Remove",
        &json!({"Name": volume}).to_string(),
    );
    assert!(e.contains("in use by 1 container(s)"), "{e}");
    // Its Get shows where it is used.
    let (_, g) = call(
        p2,
        "/VolumeDriver.Get",
        &json!({"Name": volume}).to_string(),
    );
    assert_eq!(g["Volume"]["Status"]["mounts"]["n1"], 1, "{g}");
    assert_eq!(g["Volume"]["Mountpoint"], "", "not on n2: {g}");
    docker(&["rm", "-f", &holder]).unwrap();
    // Docker unmounts as the container goes; then the volume is free.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, g) = call(
            p2,
            "/VolumeDriver.Get",
            &json!({"Name": volume}).to_string(),
        );
        if g["Volume"]["Status"]["mounts"] == json!({}) {
            break;
        }
        assert!(Instant::now() < deadline, "never unmounted: {g}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A mount whose container died with its engine (the node is gone): the operator's way
    // out is `flockctl dataset unmount --force`.
    let (_, m) = call(
        p1,
        "/VolumeDriver.Mount",
        &json!({"Name": volume, "ID": "ghost"}).to_string(),
    );
    assert!(
        m["Mountpoint"]
            .as_str()
            .is_some_and(|p| p.starts_with(pc.c.data_dir(1).to_str().unwrap())),
        "{m}"
    );
    let d = dataset(&pc.c, &volume).unwrap();
    assert_eq!(d["mounts"], json!([{"node": "n1", "id": "ghost"}]), "{d:#}");
    let no_force = pc.c.ctl(pc.c.addr(2), &["dataset", "unmount", &volume]);
    assert_eq!(no_force.status.code(), Some(2), "{}", stderr(&no_force));
    let out = pc.c.ctl_ok(
        pc.c.addr(2),
        &["dataset", "unmount", &volume, "--node", "n1", "--force"],
    );
    assert!(out.contains("forgot 1 mount(s)"), "{out}");
    assert_eq!(dataset(&pc.c, &volume).unwrap()["mounts"], json!([]));
    // Another whose container is gone while flockd is down: n1's flockd drops it when it
    // starts again, as no running container of its engine uses the volume.
    let (_, m) = call(
        p1,
        "/VolumeDriver.Mount",
        &json!({"Name": volume, "ID": "gone-at-restart"}).to_string(),
    );
    assert_eq!(m["Err"], "", "{m}");

    // "On n2": the engine now reaches n2 under the name it used for the volume.
    let t = Instant::now();
    for i in [1, 2] {
        pc.c.nodes[i - 1].signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
    }
    pc.c.node_args = vec![
        s(&["--plugin-name", &names[1]]),
        s(&["--plugin-name", &names[0]]),
    ];
    pc.c.restart(1);
    pc.c.restart(2);
    wait_socket(p1);
    wait_socket(p2);
    eprintln!("nodes swapped plugin names: {:?}", t.elapsed());
    assert_eq!(
        dataset(&pc.c, &volume).unwrap()["mounts"],
        json!([]),
        "n1 dropped its stale mount at start"
    );
    let t = Instant::now();
    let out = run(p1, &["cat", "/data/file"]).unwrap();
    eprintln!("docker run on n2, with the move: {:?}", t.elapsed());
    assert_eq!(out.trim(), "fish");
    let d = dataset(&pc.c, &volume).unwrap();
    assert_eq!(d["primary"], "n2", "the dataset followed: {d:#}");

    // docker volume ls / inspect / rm.
    let ls = docker(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]).unwrap();
    assert!(ls.lines().any(|l| l == format!("{p1} {volume}")), "{ls}");
    let inspect: Value =
        serde_json::from_str(&docker(&["volume", "inspect", &volume]).unwrap()).unwrap();
    assert_eq!(inspect[0]["Driver"], p1, "{inspect:#}");
    assert_eq!(inspect[0]["Scope"], "global", "{inspect:#}");
    assert_eq!(inspect[0]["Status"]["primary"], "n2", "{inspect:#}");
    assert!(
        inspect[0]["Mountpoint"]
            .as_str()
            .is_some_and(|m| m.starts_with(pc.c.data_dir(2).to_str().unwrap())),
        "{inspect:#}"
    );
    docker(&["volume", "rm", &volume]).unwrap();
    pc.removed = true;
    assert!(
        dataset(&pc.c, &volume).is_none(),
        "removed from the cluster"
    );
    let e = call_err(
        p1,
        "/VolumeDriver.Get",
        &json!({"Name": volume}).to_string(),
    );
    assert!(e.contains("no volume named"), "{e}");
    drop(pc);
    assert!(
        !socket(p1).exists() && !socket(p2).exists(),
        "sockets removed at shutdown"
    );
}

/// A mount that would outlast Docker's patience answers in time, saying how far the move got,
/// and the move goes on: a later mount finds the data there. (The move is held at its handoff by
/// a failpoint, and the mount's wait is cut to 1.5 s.)
#[test]
fn a_slow_move_is_reported_not_waited_for() {
    let _lock = plugin_lock();
    // This test's own process: its flockds inherit both.
    std::env::set_var("FLOCK_FAILPOINT_MOVE_HOLD", "handoff:6000");
    std::env::set_var("FLOCK_PLUGIN_MOUNT_WAIT_MS", "1500");
    let names = ["flock-test-n1".to_string(), "flock-test-n2".to_string()];
    let volume = format!("slow-{}-{}", std::process::id(), free_port());
    let c = TestCluster::start_with(
        2,
        &[],
        vec![
            s(&["--plugin-name", &names[0]]),
            s(&["--plugin-name", &names[1]]),
        ],
    );
    let pc = PluginCluster {
        c,
        removed: true,
        names: names.clone(),
        volume: volume.clone(),
        label: "flock.test=none".into(),
    };
    let [p1, p2] = [names[0].as_str(), names[1].as_str()];
    wait_socket(p1);
    wait_socket(p2);
    let create = json!({"Name": volume}).to_string();
    assert_eq!(call(p1, "/VolumeDriver.Create", &create).1["Err"], "");
    let mount = |p: &str, id: &str| {
        call(
            p,
            "/VolumeDriver.Mount",
            &json!({"Name": volume, "ID": id}).to_string(),
        )
        .1
    };
    assert_eq!(mount(p1, "a")["Err"], "");
    let unmount = json!({"Name": volume, "ID": "a"}).to_string();
    assert_eq!(call(p1, "/VolumeDriver.Unmount", &unmount).1["Err"], "");

    let t = Instant::now();
    let r = mount(p2, "b");
    let e = r["Err"].as_str().unwrap_or_default();
    assert!(
        e.contains(&format!("moving {volume} from n1: ")) && e.contains("try again"),
        "{r}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        t.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = mount(p2, "b");
        if r["Err"] == "" || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        r["Mountpoint"]
            .as_str()
            .is_some_and(|m| m.starts_with(pc.c.data_dir(2).to_str().unwrap())),
        "{r}"
    );
    assert_eq!(dataset(&pc.c, &volume).unwrap()["primary"], "n2");
}
