//! The test app as its users drive it: a real process, a real socket, a real kill -9.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct App(Child, String);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &std::path::Path) -> App {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_flock-testapp"))
        .args(["--listen", &addr])
        .env("FLOCK_DATASET_PATH", dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "the app does not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    App(child, addr)
}

fn ask(addr: &str, req: &str) -> Vec<String> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line.unwrap();
        let end = req != "READ" || line == "END";
        lines.push(line);
        if end {
            break;
        }
    }
    lines
}

#[test]
fn acknowledged_appends_survive_kill_9_and_a_torn_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path());
    for i in 1..=20 {
        assert_eq!(ask(&app.1, &format!("APPEND v{i}")), [format!("OK {i}")]);
    }
    let pong = ask(&app.1, "PING");
    drop(app); // SIGKILL
               // A write that was cut short (never acknowledged) is dropped at the next start.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("log"))
        .unwrap();
    f.write_all(b"21 half").unwrap();
    drop(f);
    let app = start(dir.path());
    assert_eq!(ask(&app.1, "COUNT"), ["COUNT 20"]);
    let all = ask(&app.1, "READ");
    assert_eq!(all.len(), 21);
    assert_eq!(all[19], "20 v20");
    assert_eq!(ask(&app.1, "APPEND next"), ["OK 21"]);
    assert_ne!(
        ask(&app.1, "PING"),
        pong,
        "a new process has a new instance id"
    );
    assert!(ask(&app.1, "BOGUS")[0].starts_with("ERR unknown request"));
}
