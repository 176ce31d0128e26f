//! Recovery (issue 21), against real flockd processes: a survivor forced into a one-voter
//! cluster when a majority of voters is lost for good (`flockd run --force-new-cluster`), and a
//! backup of the replicated state restored into a new cluster (`flockctl cluster backup`,
//! `flockd init --restore`). Numbered so the first failure says what broke first.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `flockd run --force-new-cluster` on node `i`'s data dir, with the flags a
/// [`TestCluster`] node has; its stdout lines so far and the process.
fn force(c: &TestCluster, i: usize, what: &str) -> Result<Proc, String> {
    let d = c.data_dir(i);
    let mut args = s(&[
        "run",
        "--data-dir",
        d.to_str().unwrap(),
        "--force-new-cluster",
    ]);
    args.extend(s(FAST));
    args.extend(s(&[
        "--mesh-addr",
        &mesh_ip(i),
        "--metrics-addr",
        "127.0.0.1:0",
    ]));
    Proc::start(&args, &d, &format!("n{i}"), &c.log(i, what))
}

fn voters(c: &TestCluster, addr: &str) -> Vec<String> {
    c.status(addr)["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "voter")
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn f01_a_survivor_of_a_lost_majority_is_forced_into_a_new_cluster_and_grows_again() {
    let mut c = TestCluster::start(3, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    c.ctl_ok(c.addr(1), &["kv", "put", "before", "kept"]);
    // n2 and n3 are lost for good; n1 alone has no quorum.
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    let o = c.ctl(c.addr(1), &["kv", "put", "stuck", "x", "--timeout", "2"]);
    assert!(!o.status.success(), "a write without a quorum succeeded");
    c.nodes[0].signal_and_wait(libc::SIGTERM, Duration::from_secs(30));

    let mut p = force(&c, 1, "force").expect("n1 starts forced");
    let said = p.drain().join("\n");
    assert!(said.contains("FORCED A NEW CLUSTER"), "{said}");
    assert!(
        said.contains("dropped voters: n2 (id 2") && said.contains("n3 (id 3"),
        "{said}"
    );
    assert!(said.contains("flockctl node rm NAME` (n2, n3"), "{said}");
    assert!(said.contains("must NEVER start again"), "{said}");
    let log = fs::read_to_string(c.log(1, "force")).unwrap();
    assert!(
        log.contains("WARN") && log.contains("FORCED A NEW CLUSTER"),
        "{log}"
    );
    c.nodes[0] = p;
    let a = c.addr(1).to_string();
    let st = c.status(&a);
    assert_eq!(st["leader_name"], "n1", "{st:#}");
    assert_eq!(voters(&c, &a), ["n1"]);
    // The old state is there, and the cluster writes again.
    assert_eq!(c.ctl_ok(&a, &["kv", "get", "before"]), "kept");
    c.ctl_ok(&a, &["kv", "put", "after", "written"]);
    assert_eq!(c.ctl_ok(&a, &["kv", "get", "after"]), "written");

    // The lost nodes are removed (they are learners now, or not members at all).
    for n in ["n2", "n3"] {
        let out = c.ctl_ok(&a, &["node", "rm", n]);
        assert!(out.contains(&format!("removed node {n}")), "{out}");
    }
    let ls: Value = serde_json::from_str(&c.ctl_ok(&a, &["node", "ls", "--json"])).unwrap();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["n1"]);

    // Forcing an only voter is refused, and says why.
    c.nodes[0].signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    let d1 = c.data_dir(1);
    let out = flockd(&[
        "run",
        "--data-dir",
        d1.to_str().unwrap(),
        "--force-new-cluster",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already the only voter") && err.contains("nothing to force"),
        "{err}"
    );
    c.restart(1);

    // New machines join and become voters with it.
    for i in [4, 5] {
        let p = c.join(i).expect("a new node joins");
        c.nodes.push(p);
    }
    c.wait_voters(3, Duration::from_secs(40));
    let a = c.addr(1).to_string();
    let mut v = voters(&c, &a);
    v.sort();
    assert_eq!(v, ["n1", "n4", "n5"]);
    assert_eq!(c.ctl_ok(c.addr(5), &["kv", "get", "before"]), "kept");
    // A backup through a follower holds every write acknowledged before it (a read barrier).
    c.ctl_ok(&a, &["kv", "put", "last", "write"]);
    let leader_commit = c.status(&a)["commit_index"].as_u64().unwrap();
    let file = c.dir.path().join("f01.backup");
    let j: Value = serde_json::from_str(&c.ctl_ok(
        c.addr(5),
        &["cluster", "backup", file.to_str().unwrap(), "--json"],
    ))
    .unwrap();
    assert_eq!(j["node"], "n5", "{j:#}");
    assert_eq!(j["cluster_id"], c.status(&a)["cluster_id"], "{j:#}");
    assert!(
        j["applied_index"].as_u64().unwrap() >= leader_commit,
        "{j:#} (leader's commit index {leader_commit})"
    );
}

/// Every file under `dir` whose content is exactly `content`.
fn files_holding(dir: &Path, content: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            found.extend(files_holding(&p, content));
        } else if meta.is_file() && fs::read(&p).is_ok_and(|b| b == content) {
            found.push(p);
        }
    }
    found
}

#[test]
fn b01_a_backup_restores_keys_and_stateless_apps_into_a_new_cluster() {
    let mut c = TestCluster::start(1, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    let a = c.addr(1).to_string();
    c.ctl_ok(&a, &["kv", "put", "app/a", "1"]);
    c.ctl_ok(&a, &["kv", "put", "greeting", "hello world"]);
    // A state over 4 MiB (the largest command), which the backup streams in pieces.
    let big = |i: usize| format!("{i:03}{}", "x".repeat(100 * 1024));
    for i in 0..45 {
        c.ctl_ok(&a, &["kv", "put", &format!("big/{i}"), &big(i)]);
    }
    // A stateful app (counter, with a volume) and a stateless one (web), from Flocker's files;
    // and a stack with a stateless process app and a secret.
    let files = tempfile::tempdir().unwrap();
    let (port, web_port) = (free_port(), free_port());
    let web_addr = format!("127.0.0.1:{web_port}");
    let application = files.path().join("application.yml");
    fs::write(
        &application,
        format!(
            "version: 1\napplications:\n{}  web:\n    command: [\"{}\", \"--listen\", \"{web_addr}\"]\n    restart_policy:\n      name: always\n",
            counter_app(port, port + 1),
            testapp().display()
        ),
    )
    .unwrap();
    let deployment = files.path().join("deployment.yml");
    fs::write(&deployment, "version: 1\nnodes:\n  n1: [counter, web]\n").unwrap();
    c.ctl_ok(
        &a,
        &[
            "deploy",
            deployment.to_str().unwrap(),
            application.to_str().unwrap(),
        ],
    );
    let stack_dir = files.path().join("s");
    fs::create_dir_all(&stack_dir).unwrap();
    fs::write(stack_dir.join("pw.txt"), "s3cret-to-restore").unwrap();
    let compose = stack_dir.join("compose.yml");
    fs::write(
        &compose,
        "name: s\nservices:\n  api:\n    command: sleep 600\n    secrets: [pw]\nsecrets:\n  pw:\n    file: ./pw.txt\n",
    )
    .unwrap();
    c.ctl_ok(&a, &["deploy", compose.to_str().unwrap()]);
    until("web and counter running", Duration::from_secs(30), || {
        let ls: Value = serde_json::from_str(&c.ctl_ok(&a, &["app", "ls", "--json"])).unwrap();
        let running = ls
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["state"] == "running")
            .count();
        (running == 3).then_some(())
    });

    // The backup: 0600, never over an existing file without --force.
    let file = files.path().join("cluster.backup");
    let out = c.ctl_ok(&a, &["cluster", "backup", file.to_str().unwrap()]);
    assert!(out.contains("secrets"), "{out}");
    let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let o = c.ctl(&a, &["cluster", "backup", file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
    let j: Value = serde_json::from_str(&c.ctl_ok(
        &a,
        &[
            "cluster",
            "backup",
            file.to_str().unwrap(),
            "--force",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(j["holds_secrets"], true, "{j:#}");
    assert!(j["applied_index"].as_u64().unwrap() > 45, "{j:#}");
    assert!(j["bytes"].as_u64().unwrap() > 4 << 20, "{j:#}");
    let bytes = fs::read(&file).unwrap();
    let header: Value = serde_json::from_slice(bytes.split(|b| *b == b'\n').next().unwrap())
        .expect("a JSON header line");
    assert_eq!(header["format"], 1, "{header:#}");
    assert_eq!(header["cluster_id"], j["cluster_id"]);

    // The old cluster is gone (its apps too: the restored web takes the same port).
    c.nodes[0].kill9();
    drop(EndApps(c.data_dir(1)));

    // A damaged backup is refused, naming the file, and makes no data dir.
    let damaged = files.path().join("damaged.backup");
    fs::write(&damaged, &bytes[..bytes.len() - 10]).unwrap();
    let bad_dir = c.dir.path().join("bad");
    let out = flockd(&[
        "init",
        "--restore",
        damaged.to_str().unwrap(),
        "--data-dir",
        bad_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("damaged.backup") && err.contains("damaged"),
        "{err}"
    );
    assert!(!bad_dir.exists());

    // Restored into a new cluster.
    let d = c.dir.path().join("restored");
    let mut args = s(&[
        "init",
        "--restore",
        file.to_str().unwrap(),
        "--data-dir",
        d.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--name",
        "r1",
        "--mesh-addr",
        "127.0.0.9",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    args.extend(s(FAST));
    let mut r = Proc::start(&args, &d, "r1", &c.dir.path().join("r1.log")).expect("restores");
    let said = r.drain().join("\n");
    assert!(said.contains("restored 47 of 47 keys"), "{said}");
    assert!(
        said.contains("deployed the apps outside stacks: web"),
        "{said}"
    );
    assert!(said.contains("deployed stack s: s_api"), "{said}");
    assert!(
        said.contains("pinned to old nodes, placed anew: web"),
        "{said}"
    );
    assert!(
        said.contains("NOT restored, apps with a dataset")
            && said.contains("their data is on the old nodes' disks"),
        "{said}"
    );
    let stateful = said
        .lines()
        .find(|l| l.contains("NOT restored, apps with a dataset"))
        .unwrap();
    assert!(stateful.ends_with(": counter"), "{stateful}");
    assert!(said.contains("NOT restored, the old nodes"), "{said}");
    let log = fs::read_to_string(c.dir.path().join("r1.log")).unwrap();
    assert!(log.contains("NOT restored, apps with a dataset"), "{log}");

    let conf = d.join("admin.conf");
    let ra = r.addr.clone();
    let st: Value = serde_json::from_str(&ctl_ok(&conf, &ra, &["status", "--json"])).unwrap();
    assert_ne!(st["cluster_id"], header["cluster_id"], "a new cluster");
    assert_eq!(
        ctl_ok(&conf, &ra, &["kv", "get", "greeting"]),
        "hello world"
    );
    assert_eq!(ctl_ok(&conf, &ra, &["kv", "get", "app/a"]), "1");
    assert_eq!(ctl_ok(&conf, &ra, &["kv", "get", "big/44"]), big(44));
    until("the restored web serves", Duration::from_secs(30), || {
        let ls: Value =
            serde_json::from_str(&ctl_ok(&conf, &ra, &["app", "ls", "--json"])).unwrap();
        let names: Vec<&str> = ls
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["s_api", "web"], "{ls:#}");
        let web = ls.as_array().unwrap().iter().find(|x| x["name"] == "web")?;
        (web["state"] == "running" && ask(&web_addr, "PING").is_some()).then_some(())
    });
    // The stack's secret came back with it, written for its app.
    until("the restored secret", Duration::from_secs(20), || {
        (!files_holding(&d, b"s3cret-to-restore").is_empty()).then_some(())
    });
    assert!(ctl(&conf, &ra, &["dataset", "ls", "--json"])
        .status
        .success());
    let ds: Value =
        serde_json::from_str(&ctl_ok(&conf, &ra, &["dataset", "ls", "--json"])).unwrap();
    assert_eq!(ds, Value::Array(vec![]), "no dataset is restored");
}

#[test]
fn f02_another_survivor_started_as_it_was_follows_the_forced_node() {
    let mut c = TestCluster::start(5, &[]);
    let _end = EndApps(c.dir.path().to_path_buf());
    c.ctl_ok(c.addr(1), &["kv", "put", "before", "kept"]);
    // Three of five voters are lost for good; n1 and n2 survive without a quorum.
    for i in [3, 4, 5] {
        c.nodes[i - 1].kill9();
    }
    // While they wait, the survivors stand for election again and again.
    std::thread::sleep(Duration::from_secs(2));
    for i in [1, 2] {
        c.nodes[i - 1].signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    }
    let p = force(&c, 1, "force").expect("n1 starts forced");
    c.nodes[0] = p;
    let said = c.nodes[0].drain().join("\n");
    assert!(said.contains("dropped voters: n2 (id 2"), "{said}");
    let a = c.addr(1).to_string();
    c.ctl_ok(&a, &["kv", "put", "after", "written"]);
    // n2 starts with its data dir as it was: it follows n1 as a learner, with n1's log.
    c.restart(2);
    until("n2 follows n1", Duration::from_secs(30), || {
        let st = c.status(&a);
        let n2 = st["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "n2")?
            .clone();
        (n2["role"] == "learner" && n2["health"] == "healthy" && n2["lag"] == 0).then_some(())
    });
    assert_eq!(c.ctl_ok(c.addr(2), &["kv", "get", "after"]), "written");
    assert_eq!(c.status(&a)["leader_name"], "n1");
    for n in ["n3", "n4", "n5"] {
        c.ctl_ok(&a, &["node", "rm", n]);
    }
    // One more machine, and the cluster has three voters again.
    let p = c.join(6).expect("a new node joins");
    c.nodes.push(p);
    c.wait_voters(3, Duration::from_secs(40));
    let mut v = voters(&c, &a);
    v.sort();
    assert_eq!(v, ["n1", "n2", "n6"]);
}
