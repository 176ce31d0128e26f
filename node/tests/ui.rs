//! `flockctl ui` against a real cluster, read by a real headless browser (Debian's chromium):
//! the token guards every path, the page lists the cluster's nodes, apps and datasets, follows
//! a dataset's move while it runs, and shows a node that does not answer as such. Screenshots
//! of each view go to target/ui-screens/ (look at them): 1-overview, 2-move, 3-node-down, 4-failed-over.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The headless browser, or a failure saying what to install: never a quiet skip.
fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
        {
            let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !p.is_empty() {
                return PathBuf::from(p);
            }
        }
    }
    panic!(
        "the ui test needs a headless chromium: install it (Debian: apt-get install chromium; \
         ./test.sh does)"
    );
}

/// Where the screenshots go: target/ui-screens/.
fn screens_dir() -> PathBuf {
    let target = Path::new(FLOCKD)
        .parent()
        .and_then(Path::parent)
        .expect("flockd sits in target/PROFILE/");
    let dir = target.join("ui-screens");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `flockctl ui`, ended when dropped.
struct Ui {
    child: Child,
    url: String,
    /// 127.0.0.1:PORT
    addr: String,
    token: String,
}

impl Ui {
    fn start(c: &TestCluster) -> Ui {
        let mut child = Command::new(FLOCKCTL)
            .arg("--config")
            .arg(c.config())
            .args(["--addr", c.addr(1)])
            .args(["ui", "--listen", "127.0.0.1:0", "--json"])
            .env_remove("FLOCK_CONFIG")
            .env_remove("FLOCK_ADDR")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run flockctl ui");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("flockctl ui printed {line:?}: {e}"));
        let addr = v["listen"].as_str().unwrap().to_string();
        Ui {
            child,
            url: v["url"].as_str().unwrap().to_string(),
            addr,
            token: v["token"].as_str().unwrap().to_string(),
        }
    }

    fn cookie(&self) -> String {
        let port = self.addr.rsplit(':').next().unwrap();
        format!("flock_ui_{port}={}", self.token)
    }

    /// The page's state document, read as the page reads it.
    fn state(&self) -> Value {
        let (code, _, body) = get(&self.addr, "/api/state", &[("Cookie", &self.cookie())]);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET: status code, headers (lower-cased names), body.
fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_lowercase(), body.to_string())
}

/// Chromium, headless, on a fresh profile, with `args` then the URL; its stdout.
fn browse(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1400,1500",
            // The page polls every second: let it load and draw a couple of times.
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the page took {:?} to load",
        started.elapsed()
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The page's DOM once drawn (the body says data-ready="true" once it drew a state).
fn dom(ui: &Ui) -> String {
    let dom = browse(&ui.url, &["--dump-dom"]);
    assert!(
        dom.contains("data-ready=\"true\""),
        "the page drew nothing: {dom}"
    );
    dom
}

/// A screenshot of the page, to target/ui-screens/NAME.png.
fn screenshot(ui: &Ui, name: &str) -> PathBuf {
    let path = screens_dir().join(format!("{name}.png"));
    let _ = fs::remove_file(&path);
    browse(&ui.url, &[&format!("--screenshot={}", path.display())]);
    assert!(
        fs::metadata(&path).is_ok_and(|m| m.len() > 10_000),
        "no screenshot at {}",
        path.display()
    );
    eprintln!("screenshot: {}", path.display());
    path
}

#[test]
fn u01_the_status_page_lists_the_cluster_follows_a_move_and_shows_a_dead_node_and_its_failover() {
    // Hold each move for a few seconds after its first phase, so the page is sure to catch it
    // running even where the copy itself is quick.
    let mut c = TestCluster::start_env(
        3,
        &[],
        Vec::new(),
        vec![(
            "FLOCK_FAILPOINT_MOVE_HOLD".to_string(),
            "copied:8000".to_string(),
        )],
    );
    let _end = EndApps(c.dir.path().to_path_buf());

    // A replicated app on n3 (its dataset gets a replica: lag to show), and a big dataset.
    let files = tempfile::tempdir().unwrap();
    let port = free_port();
    let application = files.path().join("application.yml");
    fs::write(
        &application,
        format!(
            "version: 1\napplications:\n{}  ticker:\n    command: [\"{}\", \"--listen\", \"127.0.0.1:0\"]\n    instances: 2\n",
            replicated_counter_app(port, port + 1),
            testapp().display()
        ),
    )
    .unwrap();
    // ticker: a stateless app scaled to two instances, on n1 and one other node.
    let deployment = files.path().join("deployment.yml");
    fs::write(
        &deployment,
        "version: 1\nnodes:\n  n1: [ticker]\n  n3: [counter]\n",
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
    c.ctl_ok(c.addr(1), &["dataset", "create", "bulk", "--node", "n1"]);
    let ds: Value =
        serde_json::from_str(&c.ctl_ok(c.addr(1), &["dataset", "ls", "bulk", "--json"])).unwrap();
    let live = PathBuf::from(ds[0]["holders"][0]["mount_path"].as_str().unwrap());
    fs::write(live.join("big.bin"), pattern(19, 300 << 20)).unwrap();

    // Not on an address other than loopback, unless asked to.
    let out = c.ctl(c.addr(1), &["ui", "--listen", "0.0.0.0:0"]);
    assert!(!out.status.success(), "flockctl ui served on 0.0.0.0");
    assert!(stderr(&out).contains("--allow-remote"), "{}", stderr(&out));

    let ui = Ui::start(&c);

    // The token: nothing without it, a wrong one, or another Host; with it, a cookie.
    for path in ["/", "/api/state", "/app.js", "/style.css", "/nope"] {
        let (code, _, _) = get(&ui.addr, path, &[]);
        assert_eq!(code, 401, "{path} without the token");
    }
    let (code, _, _) = get(&ui.addr, "/?token=wrong", &[]);
    assert_eq!(code, 401, "a wrong token");
    let (code, _, _) = get(
        &ui.addr,
        "/api/state",
        &[("Cookie", &format!("{}x", ui.cookie()))],
    );
    assert_eq!(code, 401, "a wrong cookie");
    let (code, _, _) = get(
        &ui.addr,
        &format!("/api/state?token={}", ui.token),
        &[("Host", "rebound.example:80")],
    );
    assert_eq!(code, 403, "a Host that is not loopback (DNS rebinding)");
    let (code, head, _) = get(&ui.addr, &format!("/?token={}", ui.token), &[]);
    assert_eq!(code, 303, "{head}");
    assert!(
        head.contains("set-cookie: flock_ui_") && head.contains("httponly"),
        "{head}"
    );
    assert!(head.contains("samesite=strict"), "{head}");
    let (code, head, page) = get(&ui.addr, "/", &[("Cookie", &ui.cookie())]);
    assert_eq!(code, 200);
    assert!(head.contains("content-security-policy"), "{head}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page fetches nothing from elsewhere"
    );

    // The overview: every node, the app running, both datasets.
    until(
        "the page to see counter running",
        Duration::from_secs(60),
        || {
            let s = ui.state();
            let apps = s["apps"].as_array()?;
            let running = apps
                .iter()
                .any(|a| a["name"] == "counter" && a["state"] == "running")
                && apps
                    .iter()
                    .any(|a| a["name"] == "ticker" && a["instances_running"] == 2);
            let replicated = s["datasets"]
                .as_array()?
                .iter()
                .any(|d| d["name"] == "counter" && d["replicas"][0]["lag_ms"].is_u64());
            (running && replicated).then_some(())
        },
    );
    let page = dom(&ui);
    for want in [
        "n1",
        "n2",
        "n3",
        "counter",
        "bulk",
        "running",
        "leader",
        "2 of 2 instances running",
    ] {
        assert!(page.contains(want), "the page lacks {want:?}: {page}");
    }
    assert!(
        !page.contains("not answering"),
        "every node answers: {page}"
    );
    screenshot(&ui, "1-overview");

    // A move, followed while it runs.
    c.ctl_ok(
        c.addr(1),
        &["dataset", "move", "bulk", "--to", "n2", "--no-wait"],
    );
    let seen = until(
        "the page to show bulk's move",
        Duration::from_secs(60),
        || {
            let s = ui.state();
            s["moves"]
                .as_array()?
                .iter()
                .find(|m| m["dataset"] == "bulk" && m["kind"] == "move" && m["ended"] == false)
                .cloned()
        },
    );
    eprintln!("the move as the page saw it: {seen}");
    let page = dom(&ui);
    assert!(
        page.contains("move of bulk") && page.contains("n1 → n2"),
        "the page does not show the move: {page}"
    );
    screenshot(&ui, "2-move");
    until("the move to end", Duration::from_secs(120), || {
        let s = ui.state();
        let d = s["datasets"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == "bulk")?
            .clone();
        (d["primary"] == "n2" && d["moving_to"] == "").then_some(())
    });

    // A node that does not answer (n3, counter's): shown as such, the page still loads at
    // once; then its app fails over, and the page says so.
    c.nodes[2].kill9();
    until("the page to show n3 down", Duration::from_secs(30), || {
        let s = ui.state();
        s["nodes"]
            .as_array()?
            .iter()
            .any(|n| n["name"] == "n3" && n["answering"] == false)
            .then_some(())
    });
    let started = Instant::now();
    let page = dom(&ui);
    assert!(
        page.contains("not answering") && page.contains("last seen"),
        "the page does not show n3 as not answering: {page}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the page hung on a dead node"
    );
    screenshot(&ui, "3-node-down");
    until(
        "the page to list counter's failover",
        Duration::from_secs(60),
        || {
            let s = ui.state();
            s["events"]
                .as_array()?
                .iter()
                .any(|e| {
                    e["text"]
                        .as_str()
                        .is_some_and(|t| t.contains("failed over"))
                })
                .then_some(())
        },
    );
    let page = dom(&ui);
    assert!(
        page.contains("declared down") && page.contains("failed over"),
        "the page does not list the failover: {page}"
    );
    screenshot(&ui, "4-failed-over");
}
