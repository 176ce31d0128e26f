//! Stacks and service names, end to end (issue 18): real flockd processes, the real Docker
//! engine and the image flock-test-busybox:latest (built from local files; nothing is pulled).
//!
//! A three-service stack (web, db, cache) from one compose file, with `depends_on` and a
//! `healthcheck`, a named volume, a `${VARIABLE}` from the `.env` beside the file and a secret:
//! web reaches `db` and `cache` by name on their own ports, with nothing published but web's
//! port, and keeps reaching db while db moves to another node. A second stack with services
//! of the same names deployed beside it reaches its own, never the first's, and deploying it
//! touches no app of the first.
//!
//! Busybox's static `wget` cannot resolve names (static glibc has no NSS for /etc/hosts), so
//! the apps look their siblings up in `/etc/hosts` themselves: what a glibc or musl program
//! does by itself.
//!
//! This test needs a running Docker engine and iptables, and fails (never skips) without.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::containers::*;
use common::*;
use serde_json::Value;

/// The shell functions the apps resolve a sibling's service name with, and fetch a page with
/// (busybox's static `wget` crashes on any address but loopback: `nc` it is).
const RESOLVE: &str = r#"addr() { awk -v n="$1" '$2==n {print $1; exit}' /etc/hosts; }; get() { printf 'GET %s HTTP/1.0\r\n\r\n' "$3" | nc -w 2 "$1" "$2" | tr -d '\r' | sed '1,/^$/d'; }"#;

/// The ports one stack uses: its db's and cache's internal ports, web's internal and published
/// one. The same host runs every node here, so two stacks' internal ports must differ (on real
/// machines they differ only when their apps share a node).
struct Ports {
    db: u16,
    cache: u16,
    web: u16,
    web_ext: u16,
}

/// The stack's compose file. `$` of the scripts is written `$$` (compose's escape).
fn compose(stack: &str, p: &Ports) -> String {
    let web = format!(
        "{RESOLVE}; mkdir -p /www; i=0; while true; do i=$((i+1)); \
         get \"$(addr db)\" {db} /value > /tmp/db; get \"$(addr cache)\" {cache} /index.html > /tmp/cache; \
         if [ -s /tmp/db ] && [ -s /tmp/cache ]; then \
         (cat /tmp/db /tmp/cache; echo seq=$i) > /www/status.tmp && mv /www/status.tmp /www/status; \
         fi; sleep 0.2; done & exec httpd -f -p {web} -h /www",
        db = p.db,
        cache = p.cache,
        web = p.web
    )
    .replace('$', "$$");
    let db = format!(
        "echo \"db={stack} pw=$(cat /run/secrets/db_password) flavour=$FLAVOUR\" > /data/value; \
         echo start >> /data/starts; exec httpd -f -p {db} -h /data",
        db = p.db
    )
    .replace('$', "$$");
    let cache = format!(
        "mkdir -p /www && echo cache={stack} > /www/index.html && exec httpd -f -p {cache} -h /www",
        cache = p.cache
    )
    .replace('$', "$$");
    format!(
        r#"name: {stack}
services:
  web:
    image: {TEST_IMAGE}
    command: ["sh", "-c", {web:?}]
    ports: ["{web_ext}:{web_port}"]
    depends_on:
      db:
        condition: service_healthy
      cache:
        condition: service_started
    restart: always
    stop_grace_period: 1s
  db:
    image: {TEST_IMAGE}
    command: ["sh", "-c", {db:?}]
    environment:
      FLAVOUR: ${{FLAVOUR}}
    volumes: ["dbdata:/data"]
    expose: ["{db_port}"]
    secrets: [db_password]
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:{db_port}/value"]
      interval: 1s
      timeout: 1s
      retries: 3
    restart: always
    stop_grace_period: 1s
  cache:
    image: {TEST_IMAGE}
    command: ["sh", "-c", {cache:?}]
    expose: [{cache_port}]
    restart: always
    stop_grace_period: 2500ms
secrets:
  db_password:
    file: ./db_password.txt
volumes:
  dbdata: {{}}
"#,
        web_ext = p.web_ext,
        web_port = p.web,
        db_port = p.db,
        cache_port = p.cache,
    )
}

/// Writes stack `stack`'s directory: the compose file, its `.env` and its secret's file.
fn write_stack(root: &Path, stack: &str, p: &Ports) -> String {
    let dir = root.join(stack);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("compose.yml"), compose(stack, p)).unwrap();
    fs::write(dir.join(".env"), format!("FLAVOUR={stack}-flavour\n")).unwrap();
    fs::write(dir.join("db_password.txt"), format!("{stack}-secret")).unwrap();
    dir.join("compose.yml").display().to_string()
}

/// web's status page through node 1's routing mesh: what it last read from db and cache, and
/// its count.
fn status(web_ext: u16) -> Result<(String, u64), String> {
    let body = http_get(&format!("{}:{web_ext}", mesh_ip(1)), "/status")?;
    let seq = body
        .lines()
        .find_map(|l| l.strip_prefix("seq="))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("no seq in {body:?}"))?;
    Ok((body, seq))
}

#[test]
fn s01_a_stack_reaches_its_services_by_name_across_a_move_beside_another_stack() {
    let c = DockerCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let shop = Ports {
        db: free_port_any(),
        cache: free_port_any(),
        web: free_port_any(),
        web_ext: free_port_any(),
    };
    let file = write_stack(root.path(), "shop", &shop);

    // The dry run lists the stack's apps; nothing is published but web's port.
    let dry = c.ctl_ok(c.addr(1), &["deploy", &file, "--dry-run"]);
    for app in ["shop_web", "shop_db", "shop_cache"] {
        assert!(dry.contains(&format!("would start {app}")), "{dry}");
    }
    let out = c.ctl_ok(c.addr(1), &["deploy", &file]);
    assert!(out.contains("stack shop:"), "{out}");

    // web reaches db and cache by name: db's value carries the secret and the .env variable.
    let expected = "db=shop pw=shop-secret flavour=shop-flavour\ncache=shop\n";
    let (body, _) = c.until("web to reach db and cache", Duration::from_secs(90), |_| {
        status(shop.web_ext).and_then(|(b, s)| {
            b.starts_with(expected)
                .then_some((b.clone(), s))
                .ok_or(format!("status: {b:?}"))
        })
    });
    println!("s01: web reads {body:?}");
    let ls = c.app_ls();
    let db = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "shop_db")
        .cloned()
        .unwrap();
    assert_eq!(db["stack"], "shop", "{db:#}");
    assert_eq!(db["service"], "db", "{db:#}");
    let vip = db["service_ip"].as_str().unwrap().to_string();
    assert!(vip.starts_with("198.18."), "{db:#}");
    // web's hosts entries name its siblings' service addresses.
    let web = c.app("shop_web");
    let hosts = docker(&["exec", web["id"].as_str().unwrap(), "cat", "/etc/hosts"]).unwrap();
    assert!(
        hosts
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [vip.as_str(), "db"]),
        "{hosts}"
    );
    // The secret's file is read-only in the container, and not readable on the host by others.
    let info = inspect(db["id"].as_str().unwrap());
    // Compose's keys reached the engine: the grace, the health check.
    assert_eq!(info["Config"]["StopTimeout"], 1, "{:#}", info["Config"]);
    assert_eq!(
        info["Config"]["Healthcheck"]["Test"][0], "CMD",
        "{:#}",
        info["Config"]
    );
    assert_eq!(
        info["State"]["Health"]["Status"], "healthy",
        "{:#}",
        info["State"]
    );
    // ... and flock reports it.
    let db_now = c.until(
        "app ls to report db healthy",
        Duration::from_secs(10),
        |c| {
            let a = c.app("shop_db");
            (a["health"] == "healthy")
                .then_some(a.clone())
                .ok_or(format!("{a}"))
        },
    );
    assert_eq!(db_now["id"], db["id"]);
    let secret_mount = info["Mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["Destination"] == "/run/secrets/db_password")
        .cloned()
        .unwrap_or_else(|| panic!("no secret mount: {:#}", info["Mounts"]));
    assert_eq!(secret_mount["RW"], false, "{secret_mount:#}");
    let dir = Path::new(secret_mount["Source"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&dir).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{} is {mode:o}", dir.display());
    // app show never prints the secret.
    let show = c.ctl_ok(c.addr(1), &["app", "show", "shop_db", "--json"]);
    assert!(!show.contains("shop-secret"), "{show}");

    // A second stack with the same service names, beside it: it reaches its own db, and the
    // first stack's apps are not touched (same containers).
    let ids_before: Vec<Value> = ["shop_web", "shop_db", "shop_cache"]
        .iter()
        .map(|a| c.app(a)["id"].clone())
        .collect();
    let blog = Ports {
        db: free_port_any(),
        cache: free_port_any(),
        web: free_port_any(),
        web_ext: free_port_any(),
    };
    let blog_file = write_stack(root.path(), "blog", &blog);
    let out = c.ctl_ok(c.addr(2), &["deploy", &blog_file]);
    assert!(!out.contains("shop_"), "{out}");
    c.until(
        "blog's web to reach its own db",
        Duration::from_secs(90),
        |_| {
            status(blog.web_ext).and_then(|(b, _)| {
                b.starts_with("db=blog pw=blog-secret flavour=blog-flavour\ncache=blog\n")
                    .then_some(())
                    .ok_or(format!("status: {b:?}"))
            })
        },
    );
    let ids_after: Vec<Value> = ["shop_web", "shop_db", "shop_cache"]
        .iter()
        .map(|a| c.app(a)["id"].clone())
        .collect();
    assert_eq!(ids_before, ids_after, "deploying blog restarted a shop app");
    let stacks = c.ctl_ok(c.addr(3), &["stack", "ls"]);
    assert!(
        stacks.contains("blog") && stacks.contains("shop"),
        "{stacks}"
    );

    // db moves to another node with its data; web keeps reaching it at db:PORT.
    let from = db["node"].as_str().unwrap().to_string();
    let to = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != from && *n != c.app("shop_web")["node"].as_str().unwrap())
        .unwrap();
    c.ctl_ok(c.addr(1), &["app", "move", "shop_db", "--to", to]);
    let moved = c.app("shop_db");
    assert_eq!(moved["node"], to, "{moved:#}");
    let (_, seq_then) = status(shop.web_ext).unwrap();
    c.until(
        "web to reach db on its new node",
        Duration::from_secs(60),
        |_| {
            status(shop.web_ext).and_then(|(b, s)| {
                (b.starts_with(expected) && s > seq_then + 5)
                    .then_some(())
                    .ok_or(format!("seq {s} (was {seq_then}): {b:?}"))
            })
        },
    );

    // Removing a stack removes its apps only.
    let out = c.ctl_ok(c.addr(1), &["stack", "rm", "blog"]);
    assert!(out.contains("removed stack blog: 3 app(s)"), "{out}");
    c.until("blog's apps to go", Duration::from_secs(30), |c| {
        let names: Vec<String> = c
            .app_ls()
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect();
        (names == ["shop_cache", "shop_db", "shop_web"])
            .then_some(())
            .ok_or(format!("{names:?}"))
    });
    c.ctl_ok(c.addr(1), &["stack", "rm", "shop"]);
    c.until("every container to go", Duration::from_secs(60), |c| {
        let left = c.all_containers();
        left.is_empty()
            .then_some(())
            .ok_or(format!("left: {left:?}"))
    });
    drop(c);
}

/// db's node dies (flockd, its fencing watchdog and its containers at once): db, asking for a
/// replica in `x-flock`, fails over to it, and web, on a node that lives, keeps reaching it at
/// `db:PORT` through its service address, with the value db keeps in its volume.
#[test]
fn s02_web_keeps_reaching_db_by_name_when_db_s_node_dies() {
    let mut c = DockerCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let p = Ports {
        db: free_port_any(),
        cache: free_port_any(),
        web: free_port_any(),
        web_ext: free_port_any(),
    };
    let file = write_stack(root.path(), "shop", &p);
    // db's volume has a replica, snapshotted every second.
    let text = fs::read_to_string(&file).unwrap();
    let with_replica = text.replacen(
        "    restart: always\n    stop_grace_period: 1s\n  cache:",
        "    restart: always\n    stop_grace_period: 1s\n    x-flock: {replicas: 1, snapshot_interval: 1s}\n  cache:",
        1,
    );
    assert_ne!(
        text, with_replica,
        "the compose file's db section changed shape"
    );
    fs::write(&file, with_replica).unwrap();
    c.ctl_ok(c.addr(1), &["deploy", &file]);
    let expected = "db=shop pw=shop-secret flavour=shop-flavour\ncache=shop\n";
    c.until("web to reach db and cache", Duration::from_secs(90), |_| {
        status(p.web_ext).and_then(|(b, _)| {
            b.starts_with(expected)
                .then_some(())
                .ok_or(format!("status: {b:?}"))
        })
    });

    // The victim: n2 or n3, not web's node (n1 serves the page and the CLI). db goes there.
    let web_node = c.app("shop_web")["node"].as_str().unwrap().to_string();
    let victim = if web_node == "n2" { 3 } else { 2 };
    let victim_name = format!("n{victim}");
    if c.app("shop_db")["node"] != victim_name.as_str() {
        c.ctl_ok(c.addr(1), &["app", "move", "shop_db", "--to", &victim_name]);
    }
    // Its replica is on another node and has a snapshot.
    let dataset = c.app("shop_db")["dataset"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(!dataset.is_empty(), "{:#}", c.app("shop_db"));
    c.until("db's replica to follow", Duration::from_secs(60), |c| {
        let out = c.ctl_ok(c.addr(1), &["dataset", "ls", &dataset, "--json"]);
        let d: Value = serde_json::from_str(&out).unwrap();
        let d = &d[0];
        let following = d["primary"] == victim_name.as_str()
            && d["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().any(|n| n != victim_name.as_str()))
            && d["holders"].as_array().is_some_and(|hs| {
                hs.iter().any(|h| {
                    h["role"] == "replica" && h["state"] == "ready" && h["latest_snapshot"] != ""
                })
            });
        following.then_some(()).ok_or(format!("{d:#}"))
    });
    c.until(
        "web to reach db on its node",
        Duration::from_secs(60),
        |_| {
            status(p.web_ext).and_then(|(b, _)| {
                b.starts_with(expected)
                    .then_some(())
                    .ok_or(format!("status: {b:?}"))
            })
        },
    );
    let (_, seq_then) = status(p.web_ext).unwrap();

    // The machine dies.
    let dog: Option<i32> = fs::read_to_string(c.data_dir(victim).join("fence").join("watch.lock"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let dog = dog.unwrap_or_else(|| panic!("{victim_name}'s fencing watchdog runs"));
    let on_victim = containers_with(&[format!("flock.node={}", c.node_label(victim))]);
    c.nodes[victim - 1].kill9();
    // SAFETY: kill(2) of this test's own process.
    unsafe { libc::kill(dog, libc::SIGKILL) };
    for id in &on_victim {
        let _ = docker(&["kill", id]);
    }

    let moved = c.until("db to fail over", Duration::from_secs(60), |c| {
        let a = c.app("shop_db");
        (a["node"] != victim_name.as_str() && a["state"] == "running")
            .then_some(a.clone())
            .ok_or(format!("{a}"))
    });
    println!("s02: db failed over to {}", moved["node"]);
    c.until(
        "web to reach db by name on the replica's node",
        Duration::from_secs(60),
        |_| {
            status(p.web_ext).and_then(|(b, s)| {
                (b.starts_with(expected) && s > seq_then + 5)
                    .then_some(())
                    .ok_or(format!("seq {s} (was {seq_then}): {b:?}"))
            })
        },
    );
    c.ctl_ok(c.addr(1), &["stack", "rm", "shop"]);
    c.until(
        "the living nodes' containers to go",
        Duration::from_secs(60),
        |c| {
            let left: Vec<String> = [1, 2, 3]
                .into_iter()
                .filter(|i| *i != victim)
                .flat_map(|i| containers_with(&[format!("flock.node={}", c.node_label(i))]))
                .collect();
            left.is_empty()
                .then_some(())
                .ok_or(format!("left: {left:?}"))
        },
    );
    drop(c);
}
