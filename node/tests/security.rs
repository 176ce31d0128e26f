//! Mutual TLS and membership against real running clusters: who gets in and who does not.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use flock_node::client::ClientConfig;
use flock_node::pki::{client_tls, NodeTls, TlsPaths};
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
            .map_err(|e| format!("connect: {}", flock_node::client::error_chain(&e)))?;
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
    let o = Command::new(FLOCKCTL)
        .args(["status"])
        .env_remove("FLOCK_CONFIG")
        .output()
        .unwrap();
    assert!(stderr(&o).contains("no client config"), "{}", stderr(&o));
}

#[test]
fn s08_quic_endpoint_requires_a_cluster_certificate() {
    let c = TestCluster::start(1, &[]);
    let n1 = NodeTls::load(&TlsPaths::new(&c.data_dir(1))).unwrap();
    let addr: std::net::SocketAddr = c.addr(1).parse().unwrap();
    rt().block_on(async {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // A member's certificate: the connection is established and stays up.
        ep.set_default_client_config(n1.quic_client().unwrap());
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
        tls.alpn_protocols = vec![flock_node::pki::QUIC_ALPN.to_vec()];
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
