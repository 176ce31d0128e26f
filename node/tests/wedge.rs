//! Inputs that once wedged Raft for good, against real flockd processes: multi-MiB entries in
//! the log across a leader change, and a full disk.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use flock_client::ClientConfig;
use flock_proto::v1::api_client::ApiClient;
use flock_proto::v1::{KvGetRequest, KvPutRequest, StatusReply, StatusRequest};
use flock_scheduler::MAX_VALUE_LEN;
use tonic::transport::{Channel, Endpoint};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// An API client to `addr` with the cluster's admin certificate.
async fn api(conf: &ClientConfig, addr: &str) -> ApiClient<Channel> {
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(conf.tls())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    ApiClient::new(ch)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

/// `key = value` through `addr`, within `timeout`.
async fn put(
    conf: &ClientConfig,
    addr: &str,
    key: &str,
    value: &str,
    timeout: Duration,
) -> Result<(), String> {
    let mut c = api(conf, addr).await;
    let call = c.kv_put(KvPutRequest {
        key: key.into(),
        value: value.into(),
    });
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Node `addr`'s own view (term, state, indexes), without asking the leader.
async fn local_status(conf: &ClientConfig, addr: &str) -> Option<StatusReply> {
    let mut c = api(conf, addr).await;
    tokio::time::timeout(
        Duration::from_secs(2),
        c.status(StatusRequest { local: true }),
    )
    .await
    .ok()?
    .ok()
    .map(|r| r.into_inner())
}

fn signal(p: &Proc, sig: i32) {
    let pid = p.child.as_ref().expect("running").id() as i32;
    // SAFETY: a plain kill(2) of a child this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// The value stored under key number `i`: MAX_VALUE_LEN bytes, distinct per key.
fn big_value(i: usize) -> String {
    let c = (b'a' + (i % 26) as u8) as char;
    let mut v = format!("{i}:");
    v.extend(std::iter::repeat_n(c, MAX_VALUE_LEN - v.len()));
    v
}

/// 20 values of the largest allowed size in the log (written concurrently, so that they share
/// replication batches, while one follower is paused so that it falls 30 MiB behind), then the
/// leader is paused: the up-to-date follower must take over, bring the lagging one up to date
/// and take writes within seconds; the old leader, resumed, rejoins and the term settles.
#[test]
fn w01_a_leader_change_settles_with_multi_mib_entries_in_the_log() {
    let mut c = TestCluster::start(3, &[]);
    let conf = ClientConfig::load(&c.config()).unwrap();
    let leader = c.leader();
    let others: Vec<usize> = (1..=3).filter(|&i| i != leader).collect();
    let (lagging, mut heir) = (others[0], others[1]);
    let addrs: Vec<String> = (1..=3).map(|i| c.addr(i).to_string()).collect();
    let rt = rt();

    signal(&c.nodes[lagging - 1], libc::SIGSTOP);
    let started = Instant::now();
    // Concurrent puts; a put whose outcome is unknown (a leader change under load) is repeated
    // (the same value, so a repeat changes nothing), through whichever node is up.
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    let results = rt.block_on(async {
        let puts = (0..20).map(|i| {
            let (conf, addrs, attempts) = (&conf, &addrs, &attempts);
            async move {
                let mut r = Err(String::new());
                for k in 0..6 {
                    attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let at = &addrs[[leader, heir][k % 2] - 1];
                    r = put(
                        conf,
                        at,
                        &format!("big/{i:02}"),
                        &big_value(i),
                        Duration::from_secs(10),
                    )
                    .await;
                    if r.is_ok() {
                        break;
                    }
                }
                (i, r)
            }
        });
        futures::future::join_all(puts).await
    });
    let acked: Vec<usize> = results
        .iter()
        .filter_map(|(i, r)| r.is_ok().then_some(*i))
        .collect();
    println!(
        "20 puts of {MAX_VALUE_LEN} bytes: {} acknowledged after {} attempts in {:?}; failures: {:?}",
        acked.len(),
        attempts.into_inner(),
        started.elapsed(),
        results.iter().filter(|(_, r)| r.is_err()).collect::<Vec<_>>()
    );
    assert_eq!(acked.len(), 20, "every big put is acknowledged");

    // Whichever of the two live nodes leads now (an election under load may have moved it).
    let leader = until(
        "a leader among the live nodes",
        Duration::from_secs(20),
        || {
            [leader, heir].into_iter().find(|&i| {
                rt.block_on(local_status(&conf, &addrs[i - 1]))
                    .is_some_and(|s| s.state == "leader")
            })
        },
    );
    heir = 6 - leader - lagging;
    // The lagging follower resumes and the leader pauses at once: only `heir` has every entry.
    signal(&c.nodes[lagging - 1], libc::SIGCONT);
    signal(&c.nodes[leader - 1], libc::SIGSTOP);
    let paused = Instant::now();
    let mut last_err = String::new();
    let mut written = None;
    for attempt in 0.. {
        if paused.elapsed() > Duration::from_secs(60) {
            break;
        }
        let at = &addrs[[heir, lagging][attempt % 2] - 1];
        match rt.block_on(put(&conf, at, "after", "pause", Duration::from_secs(3))) {
            Ok(()) => {
                written = Some(paused.elapsed());
                break;
            }
            Err(e) => last_err = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let terms: Vec<_> = [heir, lagging]
        .iter()
        .map(|&i| {
            rt.block_on(local_status(&conf, &addrs[i - 1]))
                .map(|s| s.term)
        })
        .collect();
    println!(
        "leader n{leader} paused; first write through another node after {written:?} (terms now {terms:?}; last error: {last_err})"
    );
    let took = written.unwrap_or_else(|| panic!("no write within 60 s; last error: {last_err}"));
    assert!(took < Duration::from_secs(10), "write took {took:?}");

    // The old leader resumes, rejoins as a follower and catches up; then no more elections.
    signal(&c.nodes[leader - 1], libc::SIGCONT);
    let caught_up = until(
        "the old leader to catch up",
        Duration::from_secs(30),
        || {
            let st: Vec<StatusReply> = addrs
                .iter()
                .map(|a| rt.block_on(local_status(&conf, a)))
                .collect::<Option<_>>()?;
            let leaders = st.iter().filter(|s| s.state == "leader").count();
            let applied: Vec<_> = st.iter().map(|s| s.applied_index).collect();
            (leaders == 1 && applied.iter().all(|a| *a == applied[0] && a.is_some())).then_some(st)
        },
    );
    let term = caught_up[0].term;
    assert!(caught_up.iter().all(|s| s.term == term), "{caught_up:#?}");
    std::thread::sleep(Duration::from_secs(4));
    let later: Vec<u64> = addrs
        .iter()
        .map(|a| rt.block_on(local_status(&conf, a)).expect("status").term)
        .collect();
    println!("term after catching up: {term}; 4 s later: {later:?}");
    assert!(
        later.iter().all(|t| *t == term),
        "elections went on: {term} then {later:?}"
    );

    // Everything acknowledged reads back, through the old leader too.
    rt.block_on(async {
        let mut client = api(&conf, &addrs[leader - 1]).await;
        for i in &acked {
            let r = client
                .kv_get(KvGetRequest {
                    key: format!("big/{i:02}"),
                    stale: false,
                })
                .await
                .unwrap_or_else(|s| panic!("get big/{i:02}: {s:?}"))
                .into_inner();
            assert!(
                r.entry.is_some_and(|e| e.value == big_value(*i)),
                "big/{i:02}"
            );
        }
    });
    let _ = c.leader();
}

/// A tmpfs mounted for one test, lazily unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the full-disk test mounts a {mib} MiB tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a_u8; 64 << 10];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
    }
    let _ = f.sync_all();
    n
}

/// One node's data dir on a small tmpfs that is then filled: that flockd exits (non-zero),
/// naming its data dir and the error, instead of serving without Raft; the other two keep
/// taking writes; with the space freed and the node started again it catches up, and every
/// acknowledged write reads back on every node.
#[test]
fn w02_a_full_disk_stops_flockd_saying_why_and_nothing_acknowledged_is_lost() {
    let mut c = TestCluster::start(3, &[]);
    let conf = ClientConfig::load(&c.config()).unwrap();
    let rt = rt();
    // Node 3's data dir moves onto a 24 MiB tmpfs (stopped, copied, started again).
    let d3 = c.data_dir(3);
    assert_eq!(
        c.nodes[2].signal_and_wait(libc::SIGTERM, Duration::from_secs(20)),
        Some(0)
    );
    let moved = c.dir.path().join("n3.orig");
    std::fs::rename(&d3, &moved).unwrap();
    let _tmpfs = Tmpfs::mount(&d3, 24);
    let cp = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", moved.display()))
        .arg(&d3)
        .status();
    assert!(cp.unwrap().success());
    c.restart(3);
    c.wait_voters(3, Duration::from_secs(30));
    let addrs: Vec<String> = (1..=3).map(|i| c.addr(i).to_string()).collect();

    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let write = |acked: &mut BTreeMap<String, String>, i: usize, at: &str| {
        let (key, value) = (format!("k/{i:04}"), format!("{i}:{}", "v".repeat(64 << 10)));
        if rt
            .block_on(put(&conf, at, &key, &value, Duration::from_secs(5)))
            .is_ok()
        {
            acked.insert(key, value);
        }
    };
    for i in 0..10 {
        write(&mut acked, i, &addrs[i % 3]);
    }
    assert_eq!(acked.len(), 10, "writes before the disk fills");

    let filler = d3.join("filler");
    let filled = fill(&filler);
    let full_at = Instant::now();
    let mut i = 10;
    while c.nodes[2].running() && full_at.elapsed() < Duration::from_secs(60) {
        // Enough writes to make n3 fail, not so many that catching up after the restart fills
        // its 24 MiB again (a loaded machine lets n3 take seconds to exit).
        if i < 60 {
            write(&mut acked, i, &addrs[i % 2]);
            i += 1;
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let code = c.nodes[2]
        .child
        .as_mut()
        .and_then(|ch| ch.try_wait().ok().flatten())
        .map(|s| s.code());
    let log = std::fs::read_to_string(c.log(3, "run")).unwrap_or_default();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("raft stopped on node"))
        .collect();
    println!(
        "filled {filled} bytes; n3 exited after {:?} with {code:?}, {} writes acknowledged meanwhile; it said: {said:?}",
        full_at.elapsed(),
        acked.len() - 10
    );
    assert!(
        !c.nodes[2].running(),
        "flockd n3 still runs 60 s after its disk filled:\n{log}"
    );
    assert_eq!(code, Some(Some(1)), "{log}");
    let msg = said
        .last()
        .unwrap_or_else(|| panic!("no reason given:\n{log}"));
    assert!(
        msg.contains("node n3") && msg.contains(&d3.display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains("No space left on device") || msg.contains("os error 28"),
        "{msg}"
    );
    assert!(acked.len() > 10, "the other two nodes kept taking writes");

    // Space freed, the node started again: it catches up and every write reads back everywhere.
    std::fs::remove_file(&filler).unwrap();
    c.restart(3);
    for _ in 0..5 {
        write(&mut acked, i, &addrs[2]);
        i += 1;
    }
    rt.block_on(async {
        for (n, addr) in addrs.iter().enumerate() {
            let mut client = api(&conf, addr).await;
            for (key, value) in &acked {
                let r = client
                    .kv_get(KvGetRequest {
                        key: key.clone(),
                        stale: false,
                    })
                    .await
                    .unwrap_or_else(|s| panic!("get {key} on n{}: {s:?}", n + 1))
                    .into_inner();
                assert!(
                    r.entry.is_some_and(|e| e.value == *value),
                    "{key} on n{}",
                    n + 1
                );
            }
        }
    });
    println!(
        "{} acknowledged writes read back on all three nodes",
        acked.len()
    );
}

/// `flockd dev` runs its nodes in one process: a full disk under its data dir stops the whole
/// dev cluster (exit 1, naming the node, its data dir and the error) instead of leaving it up
/// without Raft; with the space freed, the same command resumes it with every acknowledged write.
#[test]
fn w03_flockd_dev_on_a_full_disk_exits_saying_why_and_resumes_with_nothing_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("disk");
    let _tmpfs = Tmpfs::mount(&mnt, 48);
    let data = mnt.join("dev");
    let port = free_ports(3);
    let mut args = s(&[
        "dev",
        "--nodes",
        "3",
        "--port",
        &port.to_string(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    args.extend(s(FAST));
    let log = tmp.path().join("dev.log");
    let mut dev = Proc::start(&args, &data, "dev", &log).expect("flockd dev starts");
    let conf = ClientConfig::load(&data.join("n1").join("admin.conf")).unwrap();
    let rt = rt();
    let addrs: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", port + i)).collect();
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let write = |acked: &mut BTreeMap<String, String>, i: usize| {
        let (key, value) = (format!("k/{i:04}"), format!("{i}:{}", "v".repeat(64 << 10)));
        if rt
            .block_on(put(
                &conf,
                &addrs[i % 3],
                &key,
                &value,
                Duration::from_secs(5),
            ))
            .is_ok()
        {
            acked.insert(key, value);
        }
    };
    for i in 0..10 {
        write(&mut acked, i);
    }
    assert_eq!(acked.len(), 10, "writes before the disk fills");

    let filler = mnt.join("filler");
    fill(&filler);
    let full_at = Instant::now();
    let mut i = 10;
    while dev.running() && full_at.elapsed() < Duration::from_secs(60) {
        write(&mut acked, i);
        i += 1;
    }
    let code = dev
        .child
        .as_mut()
        .and_then(|ch| ch.try_wait().ok().flatten())
        .map(|s| s.code());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let said = text
        .lines()
        .find(|l| l.contains("raft stopped"))
        .map(str::to_string);
    println!(
        "flockd dev exited {:?} after the disk filled, with {code:?}: {said:?}",
        full_at.elapsed()
    );
    assert!(
        !dev.running(),
        "flockd dev still runs 60 s after its disk filled:\n{text}"
    );
    assert_eq!(code, Some(Some(1)), "{text}");
    let said = said.unwrap_or_else(|| panic!("no reason given:\n{text}"));
    assert!(said.contains(&data.display().to_string()), "{said}");
    assert!(
        said.contains("No space left on device") || said.contains("os error 28"),
        "{said}"
    );

    std::fs::remove_file(&filler).unwrap();
    let mut dev =
        Proc::start(&args, &data, "dev", &tmp.path().join("dev2.log")).expect("flockd dev resumes");
    for _ in 0..5 {
        write(&mut acked, i);
        i += 1;
    }
    rt.block_on(async {
        let mut client = api(&conf, &addrs[0]).await;
        for (key, value) in &acked {
            let r = client
                .kv_get(KvGetRequest {
                    key: key.clone(),
                    stale: false,
                })
                .await
                .unwrap_or_else(|s| panic!("get {key}: {s:?}"))
                .into_inner();
            assert!(r.entry.is_some_and(|e| e.value == *value), "{key}");
        }
    });
    println!(
        "{} acknowledged writes read back after the restart",
        acked.len()
    );
    assert_eq!(
        dev.signal_and_wait(libc::SIGTERM, Duration::from_secs(30)),
        Some(0)
    );
}
