//! The Docker volume plugin's calls, sent straight to its socket as the engine sends them, on
//! real flockd processes, without the engine (node/tests/docker_plugin.rs runs the engine). The
//! socket lives in a directory of the test's own (FLOCK_PLUGIN_DIR), never the engine's
//! /run/docker/plugins, where a socket left behind slows every later `docker volume ls`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// POSTs `body` to `path` on the plugin socket `socket`, as the engine does; the JSON answer.
fn call(socket: &Path, path: &str, body: &Value) -> Result<Value, String> {
    let body = body.to_string();
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(90)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/vnd.docker.plugins.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("send the request: {e}"))?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .map_err(|e| format!("read the answer: {e}"))?;
    let (_, answer) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP answer: {raw:?}"))?;
    serde_json::from_str(answer).map_err(|e| format!("{e}: {answer:?}"))
}

/// The answer's `Err` ("" when the call succeeded).
fn err_of(v: &Value) -> &str {
    v["Err"].as_str().unwrap_or("(no Err field)")
}

/// The directory of snapshot `snap` of dataset `name` in node `data_dir`'s dir backend
/// (storage/datasets/NAME.ID/snapshots/SEQ/, see flock_dataset's dir layout).
fn snapshot_dir(data_dir: &Path, name: &str, snap: &str) -> PathBuf {
    let datasets = data_dir.join("storage/datasets");
    let copies: Vec<PathBuf> = std::fs::read_dir(&datasets)
        .expect("the dir backend's datasets")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}.")))
        })
        .collect();
    assert_eq!(copies.len(), 1, "copies of {name}: {copies:?}");
    let snapshots = copies[0].join("snapshots");
    for e in std::fs::read_dir(&snapshots).expect("snapshots") {
        let dir = e.expect("entry").path();
        let info: Value = serde_json::from_slice(
            &std::fs::read(dir.join("info.json")).expect("the snapshot's info.json"),
        )
        .expect("info json");
        if info["name"] == snap {
            return dir;
        }
    }
    panic!("no snapshot {snap} in {}", snapshots.display());
}

/// A mount on a copy that lacks the dataset's newest recorded snapshot (as a copy rolled back
/// by a push would) is refused, naming the volume and the snapshot; once the copy holds it
/// again, the same mount succeeds.
#[test]
fn p01_a_mount_refuses_a_copy_that_lacks_the_newest_recorded_snapshot() {
    let plugin = format!("flockstale{}", std::process::id());
    let plugins = tempfile::tempdir().expect("plugin dir");
    let c = TestCluster::start_env(
        1,
        &[],
        vec![s(&["--plugin-name", &plugin])],
        vec![(
            flock_node::plugin::PLUGIN_DIR_ENV.to_string(),
            plugins.path().display().to_string(),
        )],
    );
    let socket = plugins.path().join(format!("{plugin}.sock"));
    let a = c.addr(1).to_string();
    until("the plugin answers", Duration::from_secs(10), || {
        call(&socket, "/VolumeDriver.Capabilities", &json!({})).ok()
    });
    let created = call(&socket, "/VolumeDriver.Create", &json!({"Name": "vol"})).expect("create");
    assert_eq!(err_of(&created), "", "{created}");
    // The agent creates the copy shortly after the dataset is recorded.
    until("the first snapshot", Duration::from_secs(20), || {
        c.ctl(&a, &["dataset", "snapshot", "vol", "--tag", "s1"])
            .status
            .success()
            .then_some(())
    });
    let mount = |id: &str| {
        call(
            &socket,
            "/VolumeDriver.Mount",
            &json!({"Name": "vol", "ID": id}),
        )
        .expect("mount")
    };
    let unmount = |id: &str| {
        let v = call(
            &socket,
            "/VolumeDriver.Unmount",
            &json!({"Name": "vol", "ID": id}),
        )
        .expect("unmount");
        assert_eq!(err_of(&v), "", "{v}");
    };
    let first = mount("m1");
    assert_eq!(err_of(&first), "", "{first}");
    unmount("m1");

    c.ctl_ok(&a, &["dataset", "snapshot", "vol", "--tag", "s2"]);
    // The copy loses s2 behind flockd's back: what a push that rolled it back did.
    let s2 = snapshot_dir(&c.data_dir(1), "vol", "s2");
    let away = c.dir.path().join("s2-away");
    std::fs::rename(&s2, &away).expect("move s2 away");
    let refused = mount("m2");
    let e = err_of(&refused);
    assert!(
        e.contains("\"vol\"")
            && e.contains("dataset vol")
            && e.contains("newest recorded snapshot s2")
            && e.contains("try again"),
        "{refused}"
    );
    assert!(
        refused["Mountpoint"].as_str().unwrap_or("").is_empty(),
        "{refused}"
    );
    let got = call(&socket, "/VolumeDriver.Get", &json!({"Name": "vol"})).expect("get");
    assert_eq!(
        got["Volume"]["Status"]["mounts"],
        json!({}),
        "the refused mount was recorded: {got}"
    );

    std::fs::rename(&away, &s2).expect("put s2 back");
    let again = mount("m2");
    assert_eq!(err_of(&again), "", "{again}");
    assert!(
        !again["Mountpoint"].as_str().unwrap_or("").is_empty(),
        "{again}"
    );
    unmount("m2");
}
