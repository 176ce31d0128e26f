//! The docker driver against the real local Docker engine, with flock-test-busybox:latest
//! (built by docker/build-testapp-image.sh from Debian's busybox-static, FROM scratch; no image
//! is pulled). These tests need a running engine and fail when there is none.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::container::InspectContainerOptions;
use common::{ensure_test_image, free_port, TEST_IMAGE};
use flock_node::driver::docker::{DockerDriver, LABEL_APP, LABEL_NODE, LABEL_SPEC};
use flock_node::driver::{DriverError, RunSpec, RunState};

const IMAGE: &str = TEST_IMAGE;

/// Removes every container of a node label when dropped, also on a panic.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in containers(&self.0) {
            let _ = Command::new("docker").args(["rm", "-f", &id]).output();
        }
    }
}

/// `docker ps -a` for a node label: the container ids.
fn containers(node: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label={LABEL_NODE}={node}"),
        ])
        .output()
        .expect("run docker ps");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A node label of its own for each test (and test process).
fn node_label(test: &str) -> (String, Cleanup) {
    let label = format!("t{}-{test}", std::process::id());
    (label.clone(), Cleanup(label))
}

async fn connect(node: &str) -> DockerDriver {
    ensure_test_image();
    match DockerDriver::connect(node).await {
        Ok(d) => d,
        Err(e) => panic!("the docker driver tests need a running Docker engine: {e}"),
    }
}

fn spec(app: &str, script: &str) -> RunSpec {
    RunSpec {
        app: app.into(),
        image: Some(IMAGE.into()),
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        env: BTreeMap::from([("GREETING".to_string(), "world".to_string())]),
        dataset_path: None,
        mountpoint: None,
        ports: Vec::new(),
        mem_limit: None,
        cpu_shares: None,
        more: Default::default(),
    }
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn runs_a_container_with_its_dataset_env_limits_and_ports_and_is_adopted() {
    let (node, _cleanup) = node_label("full");
    let d = connect(&node).await;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut s = spec(
        "web",
        "echo hello $GREETING; echo $FLOCK_APP >&2; echo data > /data/f; sleep 300",
    );
    s.dataset_path = Some(data.path().to_path_buf());
    s.mountpoint = Some("/data".into());
    s.mem_limit = Some(64 << 20);
    s.cpu_shares = Some(512);
    s.ports = vec![(port, 80)];

    let started = d.start(&s, 0, None).await.unwrap();
    assert_eq!(started.app, "web");
    assert_eq!(started.fingerprint, s.fingerprint());
    assert!(
        matches!(started.state, RunState::Running { .. }),
        "{started:?}"
    );
    let listed = d.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, started.id);
    assert_eq!(listed[0].fingerprint, s.fingerprint());
    let RunState::Running { since_unix } = listed[0].state else {
        panic!("{listed:?}")
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        since_unix <= now + 1 && since_unix + 60 > now,
        "{since_unix} vs {now}"
    );

    // What the engine was told.
    let c = d
        .client()
        .inspect_container(&started.id, None::<InspectContainerOptions>)
        .await
        .unwrap();
    assert_eq!(c.name.as_deref(), Some(&*format!("/flock-{node}-web")));
    let hc = c.host_config.unwrap();
    assert_eq!(hc.memory, Some(64 << 20));
    assert_eq!(hc.cpu_shares, Some(512));
    assert_eq!(
        hc.binds,
        Some(vec![format!("{}:/data", data.path().display())])
    );
    let pb = hc.port_bindings.unwrap();
    let b = pb[&format!("{port}/tcp")].as_ref().unwrap();
    assert_eq!(b[0].host_ip.as_deref(), Some("0.0.0.0"));
    assert_eq!(b[0].host_port.as_deref(), Some(&*port.to_string()));
    assert_eq!(
        hc.restart_policy
            .and_then(|r| r.name)
            .map(|n| n.to_string()),
        Some("no".to_string())
    );
    let cfg = c.config.unwrap();
    let labels = cfg.labels.unwrap();
    assert_eq!(labels[LABEL_NODE], node);
    assert_eq!(labels[LABEL_APP], "web");
    assert_eq!(labels[LABEL_SPEC], s.fingerprint());
    let env = cfg.env.unwrap();
    assert!(env.contains(&"GREETING=world".to_string()), "{env:?}");
    assert!(env.contains(&"FLOCK_APP=web".to_string()), "{env:?}");
    assert!(cfg
        .exposed_ports
        .unwrap()
        .contains_key(&format!("{port}/tcp")));

    // Output and the dataset.
    wait_for("the output", || async {
        let lines = d.logs("web", 10).await.unwrap();
        lines.contains(&"hello world".to_string()) && lines.contains(&"web".to_string())
    })
    .await;
    assert_eq!(d.logs("web", 1).await.unwrap().len(), 1);
    let f = data.path().join("f");
    wait_for("/data/f", || async { f.exists() }).await;
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "data\n");

    // Running: a second start is refused.
    let again = d.start(&s, 0, None).await.unwrap_err();
    assert!(
        matches!(again, DriverError::AlreadyRunning { .. }),
        "{again}"
    );

    // As after a flockd restart: a new driver adopts the container.
    let d2 = connect(&node).await;
    let adopted = d2.list().await.unwrap();
    assert_eq!(adopted.len(), 1);
    assert_eq!(adopted[0].id, started.id);
    assert_eq!(adopted[0].fingerprint, s.fingerprint());
    assert_eq!(adopted[0].restarts, 0);
    assert!(matches!(adopted[0].state, RunState::Running { .. }));

    // Stop: sh ignores SIGTERM as pid 1, so the grace runs out and it is killed.
    d2.stop("web", Duration::from_secs(1)).await.unwrap();
    let stopped = d2.list().await.unwrap();
    assert_eq!(stopped.len(), 1);
    assert!(
        matches!(
            stopped[0].state,
            RunState::Exited {
                code: Some(137),
                signal: None
            }
        ),
        "{stopped:?}"
    );
    d2.stop("web", Duration::from_secs(1)).await.unwrap(); // stopping a stopped one is fine

    // Start again: the exited container is replaced.
    std::fs::remove_file(&f).unwrap();
    let restarted = d2.start(&s, 4, None).await.unwrap();
    assert_ne!(restarted.id, started.id);
    // The restart count it was started with is kept on the container, for the next flockd.
    assert_eq!(restarted.restarts, 4);
    let d3 = DockerDriver::connect(&node).await.unwrap();
    assert_eq!(d3.instance("web").await.map(|i| i.restarts), Some(4));
    assert_eq!(containers(&node), vec![restarted.id[..12].to_string()]);
    wait_for("/data/f again", || async { f.exists() }).await;

    d2.stop("web", Duration::from_secs(1)).await.unwrap();
    d2.remove("web").await.unwrap();
    assert!(containers(&node).is_empty());
    assert!(d2.list().await.unwrap().is_empty());
    assert!(matches!(
        d2.logs("web", 10).await,
        Err(DriverError::NotHere { .. })
    ));
    d2.remove("web").await.unwrap(); // removing a removed one is fine
}

#[tokio::test]
async fn an_exit_code_and_the_image_override_are_reported() {
    let (node, _cleanup) = node_label("exit");
    let d = connect(&node).await;
    d.start(&spec("quick", "echo out; echo err >&2; exit 3"), 0, None)
        .await
        .unwrap();
    wait_for("the exit", || async {
        matches!(
            d.list().await.unwrap().first().map(|i| &i.state),
            Some(RunState::Exited { .. })
        )
    })
    .await;
    assert_eq!(
        d.list().await.unwrap()[0].state,
        RunState::Exited {
            code: Some(3),
            signal: None
        }
    );
    // The engine copies stdout and stderr separately: lines written together may swap.
    let mut lines = d.logs("quick", 10).await.unwrap();
    lines.sort();
    assert_eq!(lines, ["err", "out"]);
    // Without `command`, the image's own (sh with no input) runs and exits 0.
    let mut s = spec("quick", "");
    s.command = None;
    d.start(&s, 0, None).await.unwrap();
    wait_for("the second exit", || async {
        d.list().await.unwrap().first().map(|i| i.state.clone())
            == Some(RunState::Exited {
                code: Some(0),
                signal: None,
            })
    })
    .await;
    d.remove("quick").await.unwrap();
    assert!(containers(&node).is_empty());
}

#[tokio::test]
async fn a_missing_image_or_no_image_is_a_clear_error() {
    let (node, _cleanup) = node_label("noimage");
    let d = connect(&node).await;
    let mut s = spec("x", "true");
    s.image = Some("flock-no-such-image:never".into());
    let e = d.start(&s, 0, None).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "app x: image flock-no-such-image:never is not on this node; build or load it \
         (docker build / docker load): no image can be pulled here"
    );
    s.image = None;
    assert!(matches!(
        d.start(&s, 0, None).await,
        Err(DriverError::NoImage { .. })
    ));
    assert!(containers(&node).is_empty());
    assert!(d.list().await.unwrap().is_empty());
}
