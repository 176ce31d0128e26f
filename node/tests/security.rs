//! Mutual TLS and membership against real running clusters: who gets in and who does not.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use flock_client::{client_tls, ClientConfig};
use flock_node::pki::{NodeTls, Peer, TlsIdentity, TlsPaths};
use flock_proto::v1::api_client::ApiClient;
use flock_proto::v1::StatusRequest;
use tonic::transport::Endpoint;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn config(c: &TestCluster) -> ClientConfig {
    ClientConfig::load(&c.config()).unwrap()
}

/// Status through gRPC with an arbitrary TLS client config; returns the error text, if any.
fn status_with(addr: &str, tls: tonic::transport::ClientTlsConfig) -> Result<(), String> {
    rt().block_on(async {
        let ep = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(3));
        let ch = ep
            .connect()
            .await
            .map_err(|e| format!("connect: {}", flock_client::error_chain(&e)))?;
        ApiClient::new(ch)
            .status(StatusRequest { local: true })
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
}

#[test]
fn s01_client_without_a_certificate_is_not_a_member() {
    let c = TestCluster::start(1, &[]);
    let conf = config(&c);
    let e = status_with(c.addr(1), client_tls(&conf.ca_pem, None)).unwrap_err();
    assert!(
        e.contains("Unauthenticated") && e.contains("not a member"),
        "{e}"
    );
    // With the admin certificate the same call works.
    status_with(c.addr(1), conf.tls()).unwrap();
}

#[test]
fn s02_certificate_from_another_ca_is_rejected_at_the_handshake() {
    let a = TestCluster::start(1, &[]);
    let b = TestCluster::start(1, &[]);
    let (ca, cb) = (config(&a), config(&b));
    // Trusts A's CA (so the client side is happy) but presents B's certificate.
    let mixed = client_tls(&ca.ca_pem, Some((&cb.cert_pem, &cb.key_pem)));
    let e = status_with(a.addr(1), mixed).unwrap_err();
    // Refused by the TLS layer, not by a handler: with TLS 1.3 the client may finish its side
    // of the handshake before the server rejects the certificate, so the failure shows up as a
    // failed connect or as the first call being cancelled or reset.
    assert!(!e.contains("not a member"), "reached a handler: {e}");
    assert!(
        ["connect", "Unavailable", "Unknown", "Cancelled"]
            .iter()
            .any(|k| e.contains(k)),
        "{e}"
    );
    // flockctl with B's config against A: B's CA does not vouch for A's server either.
    let o = ctl(&b.config(), a.addr(1), &["status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot reach flockd at"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn s03_plaintext_is_refused() {
    let c = TestCluster::start(1, &[]);
    let e = rt().block_on(async {
        let ch = Endpoint::from_shared(format!("http://{}", c.addr(1)))
            .unwrap()
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await;
        match ch {
            Err(e) => e.to_string(),
            Ok(ch) => match ApiClient::new(ch)
                .status(StatusRequest { local: true })
                .await
            {
                Ok(_) => "plaintext call succeeded".to_string(),
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            },
        }
    });
    assert!(!e.contains("succeeded"), "{e}");
}

#[test]
fn s04_a_removed_nodes_certificate_is_no_longer_accepted() {
    let c = TestCluster::start(4, &[]);
    let removed = TlsPaths::new(&c.data_dir(4));
    let n4 = NodeTls::load(&removed).unwrap();
    // While a member, its certificate is accepted.
    status_with(
        c.addr(1),
        client_tls(&n4.ca_pem, Some((&n4.cert_pem, &n4.key_pem))),
    )
    .unwrap();
    c.ctl_ok(c.addr(1), &["node", "rm", "n4"]);
    for i in 1..=3 {
        let e = status_with(
            c.addr(i),
            client_tls(&n4.ca_pem, Some((&n4.cert_pem, &n4.key_pem))),
        )
        .unwrap_err();
        assert!(e.contains("not a member: node 4 was removed"), "n{i}: {e}");
    }
}

fn join(c: &TestCluster, token: &str, dir: &Path) -> std::process::Output {
    Command::new(FLOCKD)
        .args([
            "join",
            c.addr(1),
            "--token",
            token,
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap()
}

#[test]
fn s05_rotated_token_stops_working_and_members_are_unaffected() {
    let mut c = TestCluster::start(3, &[]);
    let old = c.token.clone();
    let new = c.ctl_ok(c.addr(2), &["cluster", "token", "--rotate"]);
    assert_ne!(old, new);
    assert_eq!(c.ctl_ok(c.addr(3), &["cluster", "token"]), new);
    let d = c.dir.path().join("late");
    let o = join(&c, &old, &d);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("token is wrong or has been rotated"),
        "{}",
        stderr(&o)
    );
    assert!(!d.join("identity.json").exists() && !d.join("tls").exists());
    // Members keep working, across a restart too.
    c.ctl_ok(c.addr(2), &["kv", "put", "after", "rotation"]);
    c.nodes[2].kill9();
    c.restart(3);
    assert_eq!(c.ctl_ok(c.addr(3), &["kv", "get", "after"]), "rotation");
    // The new token admits a node.
    c.token = new;
    let p = c.join(4).expect("joins with the new token");
    assert!(p.addr.starts_with("127.0.0.1:"));
}

#[test]
fn s06_a_world_readable_key_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = TestCluster::start(1, &[]);
    assert_eq!(
        c.nodes[0].signal_and_wait(libc::SIGTERM, Duration::from_secs(10)),
        Some(0)
    );
    let key = TlsPaths::new(&c.data_dir(1)).node_key();
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = Command::new(FLOCKD)
        .args(["run", "--data-dir", c.data_dir(1).to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    // flockctl refuses an open config too.
    std::fs::set_permissions(c.config(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = c.ctl("127.0.0.1:1", &["status"]);
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
}

#[test]
fn s07_admin_config_issues_a_working_certificate() {
    let c = TestCluster::start(3, &[]);
    let out = c.dir.path().join("ops.conf");
    c.ctl_ok(
        c.addr(2),
        &[
            "cluster",
            "admin-config",
            "--out",
            out.to_str().unwrap(),
            "--label",
            "ops",
        ],
    );
    let conf = ClientConfig::load(&out).unwrap();
    assert_eq!(conf.addrs.len(), 3);
    // No --addr: flockctl uses the config's addresses.
    let o = Command::new(FLOCKCTL)
        .args([
            "--config",
            out.to_str().unwrap(),
            "kv",
            "put",
            "from",
            "ops",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // It never overwrites.
    let o = c.ctl(
        c.addr(1),
        &["cluster", "admin-config", "--out", out.to_str().unwrap()],
    );
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
    // Without a config flockctl says what to do.
    let home = tempfile::tempdir().unwrap();
    let status_as_user = || {
        Command::new(FLOCKCTL)
            .args(["status", "--addr", c.addr(1)])
            .env_remove("FLOCK_CONFIG")
            .env_remove("XDG_CONFIG_HOME")
            .env("HOME", home.path())
            .output()
            .unwrap()
    };
    let o = status_as_user();
    assert!(stderr(&o).contains("no client config"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "{}/.config/flock/admin.conf",
            home.path().display()
        )),
        "{}",
        stderr(&o)
    );
    // One in the user's config directory is read without being named.
    let user = home.path().join(".config/flock");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::copy(c.config(), user.join("admin.conf")).unwrap();
    let o = status_as_user();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn s08_quic_endpoint_requires_a_cluster_certificate() {
    let c = TestCluster::start(1, &[]);
    let n1 = NodeTls::load(&TlsPaths::new(&c.data_dir(1))).unwrap();
    let addr: std::net::SocketAddr = c.addr(1).parse().unwrap();
    rt().block_on(async {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // A member's certificate: the connection is established and stays up.
        ep.set_default_client_config(
            flock_transport::quic::quic_client(&n1.identity().unwrap(), Peer::Node(1)).unwrap(),
        );
        let conn = ep
            .connect(addr, flock_node::pki::SERVER_NAME)
            .unwrap()
            .await
            .expect("member connects over QUIC");
        assert!(
            tokio::time::timeout(Duration::from_millis(500), conn.closed())
                .await
                .is_err(),
            "server closed a member's connection"
        );
        // Without a client certificate the server ends the connection.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(flock_node::pki::pem_to_der(&n1.ca_pem, "ca").unwrap())
            .unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![flock_transport::quic::QUIC_ALPN.to_vec()];
        let anon = quinn::ClientConfig::new(std::sync::Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let refused = match ep
            .connect_with(anon, addr, flock_node::pki::SERVER_NAME)
            .unwrap()
            .await
        {
            Err(_) => true,
            Ok(conn) => tokio::time::timeout(Duration::from_secs(3), conn.closed())
                .await
                .is_ok(),
        };
        assert!(refused, "a QUIC client without a certificate was kept");
    });
}

/// VmHWM (peak resident set) and VmRSS of process `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A TLS channel that trusts the cluster's CA and presents no certificate.
async fn anonymous_channel(c: &TestCluster, i: usize) -> tonic::transport::Channel {
    let conf = config(c);
    Endpoint::from_shared(format!("https://{}", c.addr(i)))
        .unwrap()
        .tls_config(client_tls(&conf.ca_pem, None))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap()
}

/// Sends one gRPC message of `len` bytes (zeros after the 5-byte gRPC frame header that
/// declares it) to `path`, streamed in 1 MiB chunks as the server takes them. Returns the gRPC
/// status code of the answer and how many bytes the server let the client send.
async fn send_huge(ch: &tonic::transport::Channel, path: &str, len: u32) -> (tonic::Code, usize) {
    use futures::StreamExt;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tonic::codegen::{http, Service};

    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let mut header = vec![0u8];
    header.extend_from_slice(&len.to_be_bytes());
    const CHUNK: usize = 1 << 20;
    let zeros = bytes::Bytes::from(vec![0u8; CHUNK]);
    let chunks = (0..(len as usize).div_ceil(CHUNK)).map(move |k| {
        let n = CHUNK.min(len as usize - k * CHUNK);
        zeros.slice(..n)
    });
    let frames = futures::stream::iter(std::iter::once(bytes::Bytes::from(header)).chain(chunks))
        .map(move |b| {
            counter.fetch_add(b.len(), Ordering::Relaxed);
            Ok::<_, tonic::Status>(http_body::Frame::data(b))
        });
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://{}{path}", "flock"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            frames,
        )))
        .unwrap();
    let mut ch = ch.clone();
    futures::future::poll_fn(|cx| ch.poll_ready(cx))
        .await
        .unwrap();
    let code = match tokio::time::timeout(Duration::from_secs(60), ch.call(req)).await {
        Err(_) => panic!("{path}: no answer within 60 s"),
        Ok(Err(e)) => panic!("{path}: {e}"),
        Ok(Ok(resp)) => {
            let from_headers = tonic::Status::from_header_map(resp.headers());
            match from_headers {
                Some(s) => s.code(),
                None => {
                    let body = resp.into_body().collect().await;
                    match body {
                        Ok(b) => b
                            .trailers()
                            .and_then(tonic::Status::from_header_map)
                            .map_or(tonic::Code::Ok, |s| s.code()),
                        Err(s) => s.code(),
                    }
                }
            }
        }
    };
    (code, sent.load(Ordering::Relaxed))
}

#[test]
fn s20_no_certificate_no_memory_300mb_messages_are_refused_before_their_body_is_read() {
    let mut c = TestCluster::start(1, &[]);
    let pid = c.nodes[0].child.as_ref().unwrap().id();
    const BIG: u32 = 300_000_000;
    rt().block_on(async {
        let ch = anonymous_channel(&c, 1).await;
        // Warm up: the connection and its buffers exist before the first measurement.
        let (code, _) = send_huge(&ch, "/flock.v1.Api/KvPut", 16).await;
        assert_eq!(code, tonic::Code::Unauthenticated);
        let (hwm0, rss0) = memory_kib(pid);
        for path in [
            "/flock.v1.Raft/AppendEntries",
            "/flock.v1.Raft/Vote",
            "/flock.v1.Raft/InstallSnapshot",
            "/flock.v1.Api/KvPut",
            "/flock.v1.Api/Deploy",
            "/flock.v1.Api/Propose",
        ] {
            // 300 MB, and 60 MB and 7 MB: under the Raft (64 MiB) and API (8 MiB) message
            // limits, so that only the missing certificate refuses them.
            for len in [BIG, 60_000_000, 7_000_000] {
                let (code, sent) = send_huge(&ch, path, len).await;
                assert_eq!(code, tonic::Code::Unauthenticated, "{path} {len}");
                assert!(sent < 8 << 20, "{path} {len}: the server took {sent} bytes");
            }
        }
        // Join is open, but its body stops at 64 KiB (1 MB is under the API's limit).
        for len in [BIG, 1_000_000] {
            let (code, sent) = send_huge(&ch, "/flock.v1.Api/Join", len).await;
            assert!(
                matches!(
                    code,
                    tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
                ),
                "Join {len}: {code:?}"
            );
            if len == 1_000_000 {
                assert_eq!(code, tonic::Code::ResourceExhausted);
            }
            assert!(sent < 8 << 20, "Join {len}: the server took {sent} bytes");
        }
        let (hwm1, rss1) = memory_kib(pid);
        eprintln!("flockd VmHWM {hwm0} -> {hwm1} KiB, VmRSS {rss0} -> {rss1} KiB");
        assert!(
            hwm1 < hwm0 + 6 * 1024,
            "flockd's peak RSS grew from {hwm0} to {hwm1} KiB"
        );
    });
    // The node keeps serving.
    c.ctl_ok(c.addr(1), &["kv", "put", "still", "here"]);
    assert_eq!(c.ctl_ok(c.addr(1), &["kv", "get", "still"]), "here");
    assert!(c.nodes[0].running());
}

fn last_log_index(c: &TestCluster) -> u64 {
    c.status(c.addr(1))["last_log_index"].as_u64().unwrap()
}

/// A Join call without a certificate; retried while the node says there are too many.
async fn join_call(
    ch: &tonic::transport::Channel,
    req: flock_proto::v1::JoinRequest,
) -> Result<(), tonic::Status> {
    loop {
        match ApiClient::new(ch.clone()).join(req.clone()).await {
            Err(s) if s.metadata().contains_key("retry-after-ms") => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted);
                let ms: u64 = s
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .expect("a retry-after-ms hint in milliseconds");
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            r => return r.map(|_| ()),
        }
    }
}

#[test]
fn s21_failed_joins_write_nothing_and_a_legitimate_join_follows() {
    use flock_proto::v1::JoinRequest;
    let mut c = TestCluster::start(1, &[]);
    let good = flock_node::token::JoinToken::parse(&c.token).unwrap();
    let wrong = flock_node::token::JoinToken {
        secret: "00".repeat(16),
        ..good.clone()
    }
    .render();
    // Settled: the first node's start-up entries are in.
    let before = until("a quiet log", Duration::from_secs(10), || {
        let a = last_log_index(&c);
        std::thread::sleep(Duration::from_millis(500));
        (a == last_log_index(&c)).then_some(a)
    });
    let (_, csr) = flock_node::pki::new_key_and_csr().unwrap();
    let req = |token: &str, name: &str, addr: &str, csr: &str| JoinRequest {
        token: token.to_string(),
        name: name.to_string(),
        addr: addr.to_string(),
        csr_pem: csr.to_string(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (denied, limited) = rt.block_on(async {
        let ch = anonymous_channel(&c, 1).await;
        // With the right secret, every other field is still checked before anything is proposed.
        for (what, r, code) in [
            (
                "bad CSR",
                req(&c.token, "", "127.0.0.1:9", "garbage"),
                tonic::Code::InvalidArgument,
            ),
            (
                "bad name",
                req(&c.token, "Bad Name", "127.0.0.1:9", &csr),
                tonic::Code::InvalidArgument,
            ),
            (
                "taken name",
                req(&c.token, "n1", "127.0.0.1:9", &csr),
                tonic::Code::AlreadyExists,
            ),
            (
                "bad addr",
                req(&c.token, "", "nowhere", &csr),
                tonic::Code::InvalidArgument,
            ),
            (
                "long addr",
                req(&c.token, "", &"a".repeat(1000), &csr),
                tonic::Code::InvalidArgument,
            ),
            (
                "a request past 64 KiB",
                req(&c.token, "", &"a".repeat(100_000), &csr),
                tonic::Code::ResourceExhausted,
            ),
            (
                "long name",
                req(&c.token, &"a".repeat(1000), "127.0.0.1:9", &csr),
                tonic::Code::InvalidArgument,
            ),
            (
                "long CSR",
                req(&c.token, "", "127.0.0.1:9", &"A".repeat(20_000)),
                tonic::Code::InvalidArgument,
            ),
            (
                "long token",
                req(
                    &format!("{}{}", c.token, "0".repeat(1000)),
                    "",
                    "127.0.0.1:9",
                    &csr,
                ),
                tonic::Code::InvalidArgument,
            ),
        ] {
            let e = join_call(&ch, r).await.expect_err(what);
            assert_eq!(e.code(), code, "{what}: {e:?}");
            assert!(
                e.message().len() < 400,
                "{what}: the error echoes the input: {}",
                e.message().len()
            );
        }
        // 1,000 joins with a wrong secret at once, once the source's bucket has refilled
        // (5 joins, one more a second): some reach the secret check, the rest are refused
        // before it.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let calls = (0..1000).map(|_| {
            let ch = ch.clone();
            let r = req(&wrong, "", "127.0.0.1:9", &csr);
            tokio::spawn(async move { ApiClient::new(ch).join(r).await.map(|_| ()) })
        });
        let (mut denied, mut limited) = (0, 0);
        for call in futures::future::join_all(calls).await {
            match call.unwrap() {
                Err(s) if s.code() == tonic::Code::PermissionDenied => {
                    assert!(s.message().contains("token is wrong"), "{s:?}");
                    denied += 1
                }
                Err(s) if s.code() == tonic::Code::ResourceExhausted => limited += 1,
                other => panic!("a join with a wrong secret: {other:?}"),
            }
        }
        (denied, limited)
    });
    eprintln!("1000 wrong joins: {denied} refused for the secret, {limited} rate-limited");
    assert!(denied >= 1, "no join reached the secret check");
    assert!(limited >= 900, "only {limited} of 1000 rate-limited");
    assert_eq!(last_log_index(&c), before, "a failed join wrote to the log");
    // The legitimate join that follows (from the same address, which is still rate-limited)
    // waits as it is told and gets in.
    let p = c.join(2).expect("the legitimate join works");
    c.nodes.push(p);
    c.wait_voters(1, Duration::from_secs(10));
    assert!(c.ctl_ok(c.addr(1), &["node", "ls"]).contains("n2"));
}

/// Every regular file under `dir` that holds one of `needles`, with the needle's index.
fn files_holding(dir: &Path, needles: &[Vec<u8>]) -> Vec<(std::path::PathBuf, usize)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let bytes = std::fs::read(e.path()).unwrap();
                for (k, n) in needles.iter().enumerate() {
                    if bytes.windows(n.len()).any(|w| w == n.as_slice()) {
                        found.push((e.path(), k));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn s22_the_join_secret_is_in_no_file_but_the_ca_holders_secret_file() {
    use std::os::unix::fs::PermissionsExt;
    // Snapshots every few entries, so snapshots are searched too, and the whole log is kept.
    let mut c = TestCluster::start(3, &["--snapshot-logs", "5", "--keep-logs", "1000"]);
    let first = c.token.clone();
    let rotated = c.ctl_ok(c.addr(3), &["cluster", "token", "--rotate"]);
    assert_ne!(rotated, first);
    for i in 0..20 {
        c.ctl_ok(c.addr(2), &["kv", "put", &format!("k{i}"), "v"]);
    }
    // The rotated token works, through a node that is not the CA holder too.
    assert_eq!(c.ctl_ok(c.addr(2), &["cluster", "token"]), rotated);
    // Joined through a node that is not the CA holder: it checks, then forwards.
    let d4 = c.data_dir(4);
    let mut args = s(&["join", c.addr(2), "--token", &rotated, "--data-dir"]);
    args.extend(s(&[
        d4.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--name",
        "n4",
    ]));
    args.extend(s(FAST));
    let p = Proc::start(&args, &d4, "n4", &c.log(4, "join")).expect("joins with the rotated token");
    c.nodes.push(p);
    c.ctl_ok(c.addr(4), &["kv", "put", "after", "join"]);
    let secret_file = c.data_dir(1).join("tls").join("join.secret");
    assert_eq!(
        std::fs::metadata(&secret_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let mut needles = Vec::new();
    for t in [&first, &rotated] {
        let secret = flock_node::token::JoinToken::parse(t).unwrap().secret;
        needles.push(secret.as_bytes().to_vec());
        needles.push(hex::decode(&secret).unwrap());
    }
    // Stop the nodes so that everything they hold is written out.
    for n in &mut c.nodes {
        assert_eq!(
            n.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)),
            Some(0)
        );
    }
    let mut found = Vec::new();
    for i in 1..=4 {
        found.extend(files_holding(&c.data_dir(i), &needles));
    }
    // Only the current secret's text, only in the CA holder's file.
    assert_eq!(
        found,
        vec![(secret_file, 2)],
        "the secret is in other files"
    );
}

/// Status through flock's own connector ([`flock_raft::tls::connect_peer`], what nodes and
/// flockctl use), presenting `tls` and accepting only `peer`; the error text, if any.
fn status_as(addr: &str, tls: &TlsIdentity, peer: Peer) -> Result<(), String> {
    rt().block_on(async {
        let ch = flock_raft::tls::connect_peer(addr, tls, peer, Duration::from_secs(3))
            .await
            .map_err(|e| e.to_string())?;
        ApiClient::new(ch)
            .status(StatusRequest { local: true })
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
}

fn node_identity(c: &TestCluster, i: usize) -> TlsIdentity {
    NodeTls::load(&TlsPaths::new(&c.data_dir(i)))
        .unwrap()
        .identity()
        .unwrap()
}

#[test]
fn s30_a_node_reached_as_another_node_is_refused() {
    let c = TestCluster::start(3, &[]);
    let n1 = node_identity(&c, 1);
    // Node 2's address, dialled as node 2: accepted; as node 3 (an address that went to the
    // wrong machine): refused at the handshake, before any request is sent.
    status_as(c.addr(2), &n1, Peer::Node(2)).unwrap();
    let e = status_as(c.addr(2), &n1, Peer::Node(3)).unwrap_err();
    assert!(
        e.contains("not valid for name \"node-3\"") && e.contains("common name \"node-2\""),
        "{e}"
    );
    // flockctl accepts any node.
    status_as(c.addr(2), &n1, Peer::AnyNode).unwrap();
    // QUIC snapshot streams: the same check.
    rt().block_on(async {
        let tls = NodeTls::load(&TlsPaths::new(&c.data_dir(1))).unwrap();
        let opened = flock_node::transfer::quic::QuicTuning::default()
            .open_with("127.0.0.1:0".parse().unwrap(), &tls, &n1, false)
            .unwrap();
        let peers = flock_node::transfer::Peers::new(opened.endpoint, n1.clone(), opened.tuning);
        peers.connect(2, c.addr(2)).await.expect("node 2 as node 2");
        let e = peers.connect(3, c.addr(2)).await.unwrap_err().to_string();
        assert!(e.contains("node-3"), "{e}");
    });
}

#[test]
fn s31_an_admin_certificate_cannot_serve() {
    use rustls::pki_types::pem::PemObject;
    let c = TestCluster::start(1, &[]);
    let conf = config(&c);
    let n1 = node_identity(&c, 1);
    let paths = TlsPaths::new(&c.data_dir(1));
    let ca_key = flock_node::pki::read_private(&paths.ca_key()).unwrap();
    // An admin certificate as issued now (client-auth usage only), and one made the old way
    // (server-auth usage too, as certificates issued before this check carry): neither serves.
    let old_style = {
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(
            &conf.ca_pem,
            rcgen::KeyPair::from_pem(&ca_key).unwrap(),
        )
        .unwrap();
        let mut p =
            rcgen::CertificateParams::new(vec![flock_node::pki::SERVER_NAME.into()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "admin-old");
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        (
            p.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    for (what, cert, key, expect) in [
        (
            "issued admin",
            conf.cert_pem.clone(),
            conf.key_pem.clone(),
            "extended key usage for server authentication",
        ),
        ("old-style admin", old_style.0, old_style.1, "admin-old"),
    ] {
        let e = rt().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let chain =
                vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
            let serve = tokio::spawn(async move {
                if let Ok((tcp, _)) = listener.accept().await {
                    let _ = acceptor.accept(tcp).await;
                }
            });
            let r =
                flock_raft::tls::connect_peer(&addr, &n1, Peer::AnyNode, Duration::from_secs(3))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string());
            serve.abort();
            r
        });
        let e = e.expect_err(what);
        assert!(e.contains(expect), "{what}: {e}");
    }
}

#[test]
fn s32_a_revoked_admin_config_is_refused_on_every_node() {
    let c = TestCluster::start(3, &[]);
    let ops = c.dir.path().join("ops.conf");
    c.ctl_ok(
        c.addr(1),
        &[
            "cluster",
            "admin-config",
            "--out",
            ops.to_str().unwrap(),
            "--label",
            "ops",
        ],
    );
    for i in 1..=3 {
        ctl_ok(&ops, c.addr(i), &["kv", "put", "k", "ops"]);
    }
    // An admin cannot revoke the label it calls with.
    let o = ctl(
        &ops,
        c.addr(2),
        &["cluster", "admin-config", "--revoke", "ops"],
    );
    assert!(
        stderr(&o).contains("issue another admin config first"),
        "{}",
        stderr(&o)
    );
    let out = c.ctl_ok(c.addr(2), &["cluster", "admin-config", "--revoke", "ops"]);
    assert!(out.contains("revoked"), "{out}");
    for i in 1..=3 {
        let o = ctl(&ops, c.addr(i), &["kv", "put", "k", "again"]);
        assert_eq!(o.status.code(), Some(1), "n{i}");
        assert!(stderr(&o).contains("were revoked"), "n{i}: {}", stderr(&o));
        // The other admin still works everywhere.
        c.ctl_ok(c.addr(i), &["kv", "put", "k", "admin"]);
    }
    // The label cannot be issued again.
    let again = c.dir.path().join("ops2.conf");
    let o = c.ctl(
        c.addr(3),
        &[
            "cluster",
            "admin-config",
            "--out",
            again.to_str().unwrap(),
            "--label",
            "ops",
        ],
    );
    assert!(stderr(&o).contains("were revoked"), "{}", stderr(&o));
    assert!(!again.exists());
    // Revoking again is fine and says so.
    let out = c.ctl_ok(c.addr(3), &["cluster", "admin-config", "--revoke", "ops"]);
    assert!(out.contains("already"), "{out}");
}

/// The not-after time of the first certificate in a PEM file.
fn not_after(pem_path: &Path) -> std::time::SystemTime {
    let pem = std::fs::read_to_string(pem_path).unwrap();
    let der = flock_node::pki::pem_to_der(&pem, "cert").unwrap();
    flock_raft::tls::validity(&der).unwrap().1
}

#[test]
fn s33_certificates_expire_and_nodes_renew_their_own() {
    const VALIDITY: u64 = 30;
    let c = TestCluster::start_env(
        3,
        &[],
        Vec::new(),
        vec![("FLOCK_CERT_VALIDITY".into(), format!("{VALIDITY}s"))],
    );
    let originals: Vec<(String, std::time::SystemTime)> = (1..=3)
        .map(|i| {
            let p = TlsPaths::new(&c.data_dir(i)).node_cert();
            (std::fs::read_to_string(&p).unwrap(), not_after(&p))
        })
        .collect();
    let admin_expiry = {
        let der = flock_node::pki::pem_to_der(&config(&c).cert_pem, "admin").unwrap();
        flock_raft::tls::validity(&der).unwrap().1
    };
    let latest = originals
        .iter()
        .map(|(_, t)| *t)
        .max()
        .unwrap()
        .max(admin_expiry);
    let now = std::time::SystemTime::now();
    assert!(
        latest <= now + Duration::from_secs(VALIDITY + 1),
        "certificates carry the configured validity"
    );
    // Past every original certificate's expiry (and the admin config's).
    std::thread::sleep(latest.duration_since(now).unwrap_or_default() + Duration::from_secs(2));
    for i in 1..=3 {
        // The node renewed its certificate on disk...
        let p = TlsPaths::new(&c.data_dir(i)).node_cert();
        assert!(
            not_after(&p) > originals[i - 1].1,
            "n{i} renewed its certificate"
        );
        // ...presents it (this client refuses an expired server certificate), and the cluster
        // takes writes through every node (forwarded to the leader with the new certificates).
        let me = NodeTls::load(&TlsPaths::new(&c.data_dir(i))).unwrap();
        rt().block_on(async {
            let ch = flock_raft::tls::connect_peer(
                c.addr(i),
                &me.identity().unwrap(),
                Peer::Node(i as u64),
                Duration::from_secs(3),
            )
            .await
            .unwrap();
            ApiClient::new(ch)
                .kv_put(flock_proto::v1::KvPutRequest {
                    key: format!("after-expiry-{i}"),
                    value: "ok".into(),
                })
                .await
                .unwrap_or_else(|s| panic!("write through n{i}: {s:?}"));
        });
        // An expired certificate is refused: the admin config's, and the node's original one.
        let o = c.ctl(c.addr(i), &["status"]);
        assert_eq!(o.status.code(), Some(1), "n{i}: {}", stderr(&o));
        assert!(!stderr(&o).contains("not a member"), "n{i}: {}", stderr(&o));
        let old =
            TlsIdentity::from_pem(&me.ca_pem, Some((&originals[i - 1].0, &me.key_pem))).unwrap();
        let e = status_as(c.addr(i % 3 + 1), &old, Peer::AnyNode).unwrap_err();
        assert!(
            !e.contains("not a member"),
            "reached a handler with an expired certificate: {e}"
        );
    }
    let log = std::fs::read_to_string(c.log(2, "join")).unwrap();
    assert!(log.contains("renewed this node's certificate"), "{log}");
}

#[test]
fn s23_a_ca_holder_without_the_secret_file_asks_for_a_rotation() {
    // As a cluster made by a flockd that kept the secret in the replicated state: the CA holder
    // has no tls/join.secret.
    let mut c = TestCluster::start(2, &[]);
    assert_eq!(
        c.nodes[0].signal_and_wait(libc::SIGTERM, Duration::from_secs(10)),
        Some(0)
    );
    std::fs::remove_file(c.data_dir(1).join("tls").join("join.secret")).unwrap();
    c.restart(1);
    for i in [1, 2] {
        let o = c.ctl(c.addr(i), &["cluster", "token"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("cluster token --rotate"),
            "n{i}: {}",
            stderr(&o)
        );
    }
    // The old token still admits (its hash is in the state) until the rotation.
    let old = c.token.clone();
    let p = c.join(3).expect("the old token works until rotated");
    c.nodes.push(p);
    let new = c.ctl_ok(c.addr(2), &["cluster", "token", "--rotate"]);
    assert_eq!(c.ctl_ok(c.addr(1), &["cluster", "token"]), new);
    let o = join(&c, &old, &c.dir.path().join("late"));
    assert!(
        stderr(&o).contains("token is wrong or has been rotated"),
        "{}",
        stderr(&o)
    );
    c.token = new;
    let p = c.join(4).expect("the rotated token works");
    c.nodes.push(p);
}
