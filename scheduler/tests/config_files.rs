//! The config readers against Flocker's own documentation files (tests/fixtures/flocker, a
//! copy of ../shared/fixtures/flocker), compose files, and every error a user can make, with
//! the exact message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flock_scheduler::config::{
    parse_application, parse_deployment, resolve, resolve_unpinned, AppSpec, Applications, Format,
    Link, NodeRef, PortMap, RestartPolicy, Volume,
};

/// The copy kept in this repository: it must be there.
fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flocker");
    assert!(
        dir.is_dir(),
        "the Flocker fixtures are missing: {} (copy ../shared/fixtures/flocker there)",
        dir.display()
    );
    dir
}

/// The shared original, beside the repository in the workplace and in CI.
fn shared_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/flocker")
}

fn yml_files(dir: &Path) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.insert(name, std::fs::read_to_string(&path).unwrap());
        }
    }
    files
}

/// The two machines of Flocker's tutorial (a Vagrant cluster), as flock nodes.
fn tutorial_nodes() -> Vec<NodeRef> {
    vec![
        NodeRef {
            id: 1,
            name: "node1".into(),
            addr: "172.16.255.250:7801".into(),
        },
        NodeRef {
            id: 2,
            name: "node2".into(),
            addr: "172.16.255.251:7801".into(),
        },
    ]
}

/// The application file a deployment fixture goes with.
fn application_for(deployment: &str) -> String {
    if deployment.starts_with("deployment-") {
        return "fig.yml".into(); // Flocker's getting-started guide: fig.yml on two nodes
    }
    match deployment.split_once("-deployment") {
        Some((prefix, _)) => format!("{prefix}-application.yml"),
        None => panic!("{deployment} is not a deployment file"),
    }
}

/// Every fixture file parses; every deployment resolves with its application file against the
/// tutorial's nodes and places exactly the apps it lists, on the nodes it names; no file is
/// left out.
fn check_fixture_dir(dir: &Path) {
    let files = yml_files(dir);
    assert_eq!(files.len(), 20, "fixture files in {}", dir.display());
    let nodes = tutorial_nodes();
    let mut used = std::collections::BTreeSet::new();
    let mut pairs = 0;
    for (name, text) in &files {
        if !name.contains("deployment") {
            continue;
        }
        let deployment = parse_deployment(name, text).unwrap_or_else(|e| panic!("{e}"));
        let app_file = application_for(name);
        let apps =
            parse_application(&app_file, &files[&app_file]).unwrap_or_else(|e| panic!("{e}"));
        let plan = resolve(&apps, &deployment, &nodes).unwrap_or_else(|e| panic!("{e}"));
        let mut expected = BTreeMap::new();
        for node in &deployment.nodes {
            let id = nodes
                .iter()
                .find(|n| n.addr.starts_with(&node.key))
                .unwrap()
                .id;
            for app in &node.apps {
                expected.insert(app.clone(), id);
            }
        }
        let placed: BTreeMap<String, u64> = plan
            .apps
            .iter()
            .map(|(name, a)| (name.clone(), a.node.unwrap()))
            .collect();
        assert_eq!(placed, expected, "{name} with {app_file}");
        for (app, planned) in &plan.apps {
            assert_eq!(&planned.spec, &apps.apps[app]);
        }
        used.insert(name.clone());
        used.insert(app_file);
        pairs += 1;
    }
    assert_eq!(pairs, 13);
    let unused: Vec<&String> = files.keys().filter(|f| !used.contains(*f)).collect();
    assert!(unused.is_empty(), "fixtures no test pairs: {unused:?}");
}

#[test]
fn every_fixture_parses_and_deploys() {
    check_fixture_dir(&fixtures());
}

/// The copy is the shared original, unchanged (skipped where the shared directory is absent,
/// e.g. a clone outside the workplace; the copy above is always tested).
#[test]
fn the_fixture_copy_is_unchanged() {
    let shared = shared_fixtures();
    if !shared.is_dir() {
        eprintln!("{} is absent: comparing skipped", shared.display());
        return;
    }
    check_fixture_dir(&shared);
    let read_all = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect()
    };
    assert_eq!(read_all(&fixtures()), read_all(&shared));
}

fn fixture_apps(name: &str) -> Applications {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    parse_application(name, &text).unwrap()
}

fn image_app(name: &str, image: &str) -> AppSpec {
    AppSpec {
        name: name.into(),
        image: Some(image.into()),
        command: None,
        ports: vec![],
        links: vec![],
        volume: None,
        environment: BTreeMap::new(),
        restart_policy: RestartPolicy::Never,
        mem_limit: None,
        cpu_shares: None,
        constraints: vec![],
        ..Default::default()
    }
}

fn port(internal: u16, external: u16) -> PortMap {
    PortMap { internal, external }
}

#[test]
fn elk_application_reads_every_field() {
    let apps = fixture_apps("elk-application.yml");
    assert_eq!(apps.format, Format::Flocker);
    let mut es = image_app("elasticsearch", "clusterhq/elasticsearch");
    es.ports = vec![port(9200, 9200)];
    // "/var/lib/elasticsearch/" as written; the trailing slash is dropped.
    es.volume = Some(Volume {
        mountpoint: "/var/lib/elasticsearch".into(),
        maximum_size: None,
        dataset: None,
    });
    let mut logstash = image_app("logstash", "clusterhq/logstash");
    logstash.ports = vec![port(5000, 5000)];
    logstash.links = vec![Link {
        local_port: 9200,
        remote_port: 9200,
        alias: "es".into(),
    }];
    let mut kibana = image_app("kibana", "clusterhq/kibana");
    kibana.ports = vec![port(8080, 80)];
    let expected: BTreeMap<String, AppSpec> = [es, logstash, kibana]
        .into_iter()
        .map(|a| (a.name.clone(), a))
        .collect();
    assert_eq!(apps.apps, expected);
}

#[test]
fn mysql_and_postgres_applications() {
    let mysql = fixture_apps("mysql-application.yml");
    let mut expected = image_app("mysql-volume-example", "mysql:5.6.17");
    expected.environment = [("MYSQL_ROOT_PASSWORD".to_string(), "clusterhq".to_string())].into();
    expected.ports = vec![port(3306, 3306)];
    expected.volume = Some(Volume {
        mountpoint: "/var/lib/mysql".into(),
        maximum_size: None,
        dataset: None,
    });
    assert_eq!(mysql.apps["mysql-volume-example"], expected);

    // Comments inside the volume mapping.
    let postgres = fixture_apps("postgres-application.yml");
    let app = &postgres.apps["postgres-volume-example"];
    assert_eq!(
        app.volume.as_ref().unwrap().mountpoint,
        "/var/lib/postgresql/data"
    );
    assert_eq!(app.image.as_deref(), Some("postgres"));
}

#[test]
fn fig_file_links_follow_the_target_ports() {
    let apps = fixture_apps("fig.yml");
    assert_eq!(apps.format, Format::Fig);
    let mut web = image_app("web", "clusterhq/flask");
    web.ports = vec![port(80, 80)];
    web.links = vec![Link {
        local_port: 6379,
        remote_port: 6379,
        alias: "redis".into(),
    }];
    let mut redis = image_app("redis", "redis");
    redis.ports = vec![port(6379, 6379)];
    redis.volume = Some(Volume {
        mountpoint: "/data".into(),
        maximum_size: None,
        dataset: None,
    });
    assert_eq!(apps.apps["web"], web);
    assert_eq!(apps.apps["redis"], redis);
}

#[test]
fn moved_deployments_place_on_the_other_node() {
    let apps = fixture_apps("volume-application.yml");
    let nodes = tutorial_nodes();
    let read = |name: &str| {
        let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
        parse_deployment(name, &text).unwrap()
    };
    let before = resolve(&apps, &read("volume-deployment.yml"), &nodes).unwrap();
    let after = resolve(&apps, &read("volume-deployment-moved.yml"), &nodes).unwrap();
    assert_eq!(before.apps["mongodb-volume-example"].node, Some(1));
    assert_eq!(after.apps["mongodb-volume-example"].node, Some(2));
    // A node listed with [] is in the deployment, with nothing on it.
    let d = read("volume-deployment.yml");
    assert_eq!(d.nodes[1].key, "172.16.255.251");
    assert!(d.nodes[1].apps.is_empty());
}

#[test]
fn nodes_are_named_by_name_address_or_host() {
    let apps = fixture_apps("elk-application.yml");
    let nodes = tutorial_nodes();
    let text =
        "version: 1\nnodes:\n  node1: [elasticsearch]\n  \"172.16.255.251:7801\": [logstash]\n";
    let plan = resolve(&apps, &parse_deployment("d.yml", text).unwrap(), &nodes).unwrap();
    assert_eq!(plan.apps["elasticsearch"].node, Some(1));
    assert_eq!(plan.apps["logstash"].node, Some(2));
    // Not deployed: not run.
    assert!(!plan.apps.contains_key("kibana"));
    // One app given without a list, as Flocker's documentation wrote it.
    let text = "\"version\": 1\n\"nodes\":\n  \"node2\":\n    \"kibana\"\n";
    let plan = resolve(&apps, &parse_deployment("d.yml", text).unwrap(), &nodes).unwrap();
    assert_eq!(plan.apps["kibana"].node, Some(2));
    // IPv6 hosts, with or without brackets.
    let v6 = vec![NodeRef {
        id: 9,
        name: "n9".into(),
        addr: "[fd00::9]:7801".into(),
    }];
    for key in ["\"fd00::9\"", "\"[fd00::9]\""] {
        let text = format!("version: 1\nnodes:\n  {key}: [kibana]\n");
        let plan = resolve(&apps, &parse_deployment("d.yml", &text).unwrap(), &v6).unwrap();
        assert_eq!(plan.apps["kibana"].node, Some(9));
    }
}

const COMPOSE_V3: &str = r#"version: "3.8"
x-defaults: &defaults
  restart: on-failure:3
  mem_limit: 512m
services:
  db:
    <<: *defaults
    image: postgres:16
    environment:
      - POSTGRES_PASSWORD=secret
      - EMPTY
    ports:
      - target: 5432
        published: 15432
        protocol: tcp
    volumes:
      - dbdata:/var/lib/postgresql/data
    deploy:
      placement:
        constraints: ["node.labels.disk == ssd", "node.hostname!=n3"]
  web:
    command: python3 -m http.server 'with space' 8000
    ports: ["8000:8000/tcp"]
    links: [db]
    environment:
      DEBUG: true
      WORKERS: 4
    cpu_shares: 512
    restart: always
volumes:
  dbdata: {}
"#;

#[test]
fn compose_v3_files() {
    let apps = parse_application("docker-compose.yml", COMPOSE_V3).unwrap();
    assert_eq!(apps.format, Format::Compose);
    let mut db = image_app("db", "postgres:16");
    db.environment = [
        ("POSTGRES_PASSWORD".to_string(), "secret".to_string()),
        ("EMPTY".to_string(), String::new()),
    ]
    .into();
    db.ports = vec![port(5432, 15432)];
    db.volume = Some(Volume {
        mountpoint: "/var/lib/postgresql/data".into(),
        maximum_size: None,
        // A named volume is a dataset by its name (into_stack prefixes it with the stack's).
        dataset: Some("dbdata".into()),
    });
    db.restart_policy = RestartPolicy::OnFailure { max_retry: Some(3) };
    db.mem_limit = Some(512 << 20);
    db.constraints = vec![
        "node.labels.disk == ssd".parse().unwrap(),
        "node.hostname != n3".parse().unwrap(),
    ];
    let web = AppSpec {
        name: "web".into(),
        image: None,
        command: Some(
            ["python3", "-m", "http.server", "with space", "8000"]
                .map(String::from)
                .to_vec(),
        ),
        ports: vec![port(8000, 8000)],
        links: vec![Link {
            local_port: 5432,
            remote_port: 15432,
            alias: "db".into(),
        }],
        volume: None,
        environment: [
            ("DEBUG".to_string(), "true".to_string()),
            ("WORKERS".to_string(), "4".to_string()),
        ]
        .into(),
        restart_policy: RestartPolicy::Always,
        mem_limit: None,
        cpu_shares: Some(512),
        constraints: vec![],
        ..Default::default()
    };
    assert_eq!(apps.apps["db"], db);
    assert_eq!(apps.apps["web"], web);

    // Deployed alone, the scheduler places every service.
    let plan = resolve_unpinned(&apps).unwrap();
    assert_eq!(plan.apps.len(), 2);
    assert!(plan.apps.values().all(|a| a.node.is_none()));
}

#[test]
fn compose_v2_and_command_lists() {
    let text = "version: '2'\nservices:\n  worker:\n    command: [\"/bin/sh\", \"-c\", \"sleep 1; echo done\"]\n    restart: \"no\"\n";
    let apps = parse_application("c.yml", text).unwrap();
    assert_eq!(apps.format, Format::Compose);
    let w = &apps.apps["worker"];
    assert_eq!(
        w.command.as_deref(),
        Some(
            &[
                "/bin/sh".to_string(),
                "-c".into(),
                "sleep 1; echo done".into()
            ][..]
        )
    );
    assert_eq!(w.restart_policy, RestartPolicy::Never);
    // Without a version, as the compose specification writes files now.
    let text = "services:\n  a:\n    image: nginx\n    restart: no\n";
    assert_eq!(
        parse_application("c.yml", text).unwrap().format,
        Format::Compose
    );
    // unless-stopped is always: nothing but a config change stops a deployed app.
    let text = "services:\n  a:\n    image: nginx\n    restart: unless-stopped\n";
    assert_eq!(
        parse_application("c.yml", text).unwrap().apps["a"].restart_policy,
        RestartPolicy::Always
    );
}

#[test]
fn flocker_form_every_field() {
    let text = r#"version: 1
applications:
  site:
    command: "/usr/bin/site --port 8080"
    ports:
    - internal: 8080
      external: 80
    links:
    - local_port: 3306
      remote_port: 3306
      alias: "DB"
    volume:
      mountpoint: /srv/data
      maximum_size: "2.5G"
    environment:
      WP_ADMIN_USERNAME: administrator
    restart_policy:
      name: "on-failure"
      maximum_retry_count: 10
    mem_limit: 100000000
    cpu_shares: 512
  other:
    image: busybox
    restart_policy: always
  empty:
    image: busybox
    environment: {}
"#;
    let apps = parse_application("application.yml", text).unwrap();
    let site = &apps.apps["site"];
    assert_eq!(
        site.command.as_deref(),
        Some(&["/usr/bin/site".to_string(), "--port".into(), "8080".into()][..])
    );
    assert_eq!(site.image, None);
    assert_eq!(site.links[0].alias, "DB");
    assert_eq!(
        site.volume,
        Some(Volume {
            mountpoint: "/srv/data".into(),
            maximum_size: Some(5 << 29),
            dataset: None,
        })
    );
    assert_eq!(
        site.restart_policy,
        RestartPolicy::OnFailure {
            max_retry: Some(10)
        }
    );
    assert_eq!(site.mem_limit, Some(100_000_000));
    assert_eq!(site.cpu_shares, Some(512));
    assert_eq!(apps.apps["other"].restart_policy, RestartPolicy::Always);
    assert!(apps.apps["empty"].environment.is_empty());
    // No applications at all is a valid (empty) configuration.
    let none = parse_application("a.yml", "version: 1\napplications: {}\n").unwrap();
    assert!(none.apps.is_empty());
}

// ---------------------------------------------------------------------------------------
// Errors: each with its exact message.

fn app_error(text: &str) -> String {
    parse_application("app.yml", text).unwrap_err().to_string()
}

fn deploy_error(apps: &str, deployment: &str, nodes: &[NodeRef]) -> String {
    let apps = parse_application("application.yml", apps).unwrap();
    match parse_deployment("deployment.yml", deployment) {
        Err(e) => e.to_string(),
        Ok(d) => resolve(&apps, &d, nodes).unwrap_err().to_string(),
    }
}

#[test]
fn errors_carry_their_parts() {
    let text = "\"version\": 1\n\"applications\":\n  \"postgres\":\n    \"image\": \"postgres\"\n    \"volume\":\n      \"mountpoint\": \"/data\"\n      \"maximum_size\": \"12X\"\n";
    let e = parse_application("volume-application.yml", text).unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.line, e.column, e.path.as_str()),
        (
            "volume-application.yml",
            7,
            23,
            "applications.postgres.volume.maximum_size"
        )
    );
    assert_eq!(
        e.to_string(),
        "volume-application.yml:7:23: applications.postgres.volume.maximum_size: \"12X\" is not \
         a size (use 500M, 1G or bytes)"
    );
    // Errors about the file as a whole have no field.
    let e = parse_application("a.yml", "a: [\n").unwrap_err();
    assert_eq!(e.path, "");
    assert!(
        e.to_string().starts_with("a.yml:2:1: not valid YAML: "),
        "{e}"
    );
}

#[test]
fn fig_services_may_run_commands() {
    let apps = parse_application(
        "fig.yml",
        "log:\n  command: [testapp, --listen, \"0.0.0.0:9000\", --data, /data]\n  ports: [\"9000:9000\"]\n  volumes: [/data]\n",
    )
    .unwrap();
    assert_eq!(apps.format, Format::Fig);
    let log = &apps.apps["log"];
    assert_eq!(log.image, None);
    assert_eq!(log.command.as_ref().unwrap()[0], "testapp");
    assert_eq!(log.volume.as_ref().unwrap().mountpoint, "/data");
}

/// Checks every case and reports all mismatches at once.
fn check_all(cases: &[(&str, String, &str)]) {
    let mut wrong = Vec::new();
    for (what, got, want) in cases {
        if got != want {
            wrong.push(format!("{what}:\n   got: {got}\n  want: {want}"));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

const V1: &str = "version: 1\napplications:\n";

#[test]
fn application_errors() {
    let app = |body: &str| app_error(&format!("{V1}  db:\n{body}"));
    check_all(&[
        (
            "a size that is not one",
            app("    image: postgres\n    volume:\n      mountpoint: /data\n      maximum_size: \"12X\"\n"),
            "app.yml:7:21: applications.db.volume.maximum_size: \"12X\" is not a size (use 500M, 1G or bytes)",
        ),
        (
            "a dataset too small",
            app("    image: postgres\n    volume:\n      mountpoint: /data\n      maximum_size: 100\n"),
            "app.yml:7:21: applications.db.volume.maximum_size: \"100\" is 100 bytes, too small for a volume (at least 1M); did you mean \"100M\"?",
        ),
        (
            "a dataset too small, with a unit",
            app("    image: postgres\n    volume:\n      mountpoint: /data\n      maximum_size: 512K\n"),
            "app.yml:7:21: applications.db.volume.maximum_size: \"512K\" is 524288 bytes, too small for a volume (at least 1M)",
        ),
        (
            "a relative mountpoint",
            app("    image: postgres\n    volume:\n      mountpoint: data\n"),
            "app.yml:6:19: applications.db.volume.mountpoint: \"data\" is not an absolute path (write /var/lib/data)",
        ),
        (
            "a volume without a mountpoint",
            app("    image: postgres\n    volume:\n      maximum_size: 1G\n"),
            "app.yml:6:7: applications.db.volume: missing mountpoint (where the app sees its data: /var/lib/data)",
        ),
        (
            "neither image nor command",
            app("    ports: []\n"),
            "app.yml:3:3: applications.db: missing image (a container image) or command (a process to run)",
        ),
        (
            "a misspelt key",
            app("    imgae: postgres\n"),
            "app.yml:4:5: applications.db: unknown key \"imgae\"; did you mean \"image\"? an application takes image, command, ports, links, volume, environment, restart_policy, mem_limit, cpu_shares, constraints, instances",
        ),
        (
            "a fig key in Flocker's form",
            app("    image: postgres\n    volumes: [/data]\n"),
            "app.yml:5:5: applications.db: unknown key \"volumes\"; did you mean \"volume\"? an application takes image, command, ports, links, volume, environment, restart_policy, mem_limit, cpu_shares, constraints, instances",
        ),
        (
            "a port out of range",
            app("    image: postgres\n    ports:\n    - internal: 5432\n      external: 70000\n"),
            "app.yml:7:17: applications.db.ports[0].external: 70000 is not a port (1 to 65535)",
        ),
        (
            "a port bound to an address other than loopback",
            app_error("web:\n  image: nginx\n  ports: [\"10.0.0.1:80:80\"]\n"),
            "app.yml:3:11: web.ports[0]: \"10.0.0.1:80:80\": binding to one address is not supported (the mesh publishes a port on every node); write \"EXTERNAL:INTERNAL\", as \"8080:80\"",
        ),
        (
            "a udp port",
            app_error("web:\n  image: nginx\n  ports: [\"53:53/udp\"]\n"),
            "app.yml:3:11: web.ports[0]: \"53:53/udp\": only tcp ports are supported, not udp (the mesh carries tcp)",
        ),
        (
            "a port range",
            app_error("web:\n  image: nginx\n  ports: [\"8000-8001:8000-8001\"]\n"),
            "app.yml:3:11: web.ports[0]: \"8000-8001:8000-8001\": port ranges are not supported; list each port",
        ),
        (
            "a writable host directory",
            app_error("web:\n  image: nginx\n  volumes: [\"./html:/usr/share/nginx/html\"]\n"),
            "app.yml:3:13: web.volumes[0]: \"./html\" is a writable host directory: data written there stays on one node's disk and does not move with the app; use a named volume (NAME:/usr/share/nginx/html, one dataset that moves with the app), or mount it read-only (./html:/usr/share/nginx/html:ro)",
        ),
        (
            "two volumes",
            app_error("web:\n  image: nginx\n  volumes: [/a, \"b:/b\"]\n"),
            "app.yml:3:3: web.volumes: 2 writable volumes (/a, b:/b); flock gives an app one dataset, which moves with it: keep one (put the data under one directory), or mount host files read-only (:ro)",
        ),
        (
            "an unknown key",
            app_error("services:\n  web:\n    image: nginx\n    depend_on: [db]\n"),
            "app.yml:4:5: services.web: unknown key \"depend_on\"; did you mean depends_on? a service takes compose's keys (docs/compose.md: Compose keys)",
        ),
        (
            "the host's network",
            app_error("services:\n  web:\n    image: nginx\n    network_mode: host\n"),
            "app.yml:4:5: services.web.network_mode: network_mode: host is refused: the app would use that network instead of the mesh, which publishes its ports on every node and lets its siblings reach it by name: remove it and give ports:",
        ),
        (
            "compose version 1",
            app_error("version: \"1\"\nservices:\n  web:\n    image: nginx\n"),
            "app.yml:1:10: version: compose file version \"1\" is not supported (use \"2\", \"3\" or leave version out)",
        ),
        (
            "a constraint on what flock does not know",
            app_error("web:\n  image: nginx\n  deploy:\n    placement:\n      constraints: [node.role == manager]\n"),
            "app.yml:5:21: web.deploy.placement.constraints[0]: constraint \"node.role == manager\": flock places by node.labels.KEY and node.hostname, not \"node.role\"",
        ),
        (
            "no replica",
            app_error("web:\n  image: nginx\n  deploy:\n    replicas: 0\n"),
            "app.yml:4:15: web.deploy.replicas: 0 instances: flock runs at least one; remove the service, or give 1 or more",
        ),
        (
            "restart on-failure:0",
            app_error("web:\n  image: nginx\n  restart: on-failure:0\n"),
            "app.yml:3:12: web.restart: \"on-failure:0\" is not a restart policy (use no, always, unless-stopped, on-failure or on-failure:N)",
        ),
        (
            "a top-level value that is not a service",
            app_error("web: nginx\n"),
            "app.yml:1:1: web: expected a service (a mapping with image or command), found \"nginx\"; Flocker's application.yml starts with version: 1 and applications:",
        ),
        (
            "a service without image or command",
            app_error("web:\n  image: nginx\nworker:\n  environment: {A: b}\n"),
            "app.yml:3:1: worker: missing image (a container image) or command (a process to run)",
        ),
    ]);
}

const APPS: &str = "version: 1
applications:
  web:
    image: nginx
    ports:
    - internal: 80
      external: 80
  db:
    image: postgres
    ports:
    - internal: 5432
      external: 5432
  admin:
    image: adminer
    ports:
    - internal: 8080
      external: 80
";

#[test]
fn deployment_errors() {
    let nodes = tutorial_nodes();
    let dev = vec![
        NodeRef {
            id: 1,
            name: "n1".into(),
            addr: "127.0.0.1:7801".into(),
        },
        NodeRef {
            id: 2,
            name: "n2".into(),
            addr: "127.0.0.1:7802".into(),
        },
    ];
    check_all(&[
        (
            "an unknown node",
            deploy_error(
                APPS,
                "version: 1\nnodes:\n  \"172.16.255.250\": [web]\n  \"172.16.255.252\": [db]\n",
                &nodes,
            ),
            "deployment.yml:4:3: nodes.\"172.16.255.252\": no node is named or addressed \"172.16.255.252\"; the cluster's nodes are node1 (172.16.255.250:7801), node2 (172.16.255.251:7801)",
        ),
        (
            "an unknown node, in an empty cluster",
            deploy_error(APPS, "version: 1\nnodes:\n  node1: [web]\n", &[]),
            "deployment.yml:3:3: nodes.node1: no node is named or addressed \"node1\"; the cluster has no nodes",
        ),
        (
            "an app in two places",
            deploy_error(
                APPS,
                "version: 1\nnodes:\n  \"172.16.255.250\": [web, db]\n  \"172.16.255.251\": [db]\n",
                &nodes,
            ),
            "deployment.yml:4:22: nodes.\"172.16.255.251\"[0]: \"db\" is already deployed on \"172.16.255.250\" (line 3); an application runs on one node",
        ),
        (
            "an app in two places on one node",
            deploy_error(APPS, "version: 1\nnodes:\n  node1: [web, web]\n", &nodes),
            "deployment.yml:3:16: nodes.node1[1]: \"web\" is already deployed on \"node1\" (line 3); an application runs on one node",
        ),
        (
            "two apps on one external port",
            deploy_error(
                APPS,
                "version: 1\nnodes:\n  node1: [admin]\n  node2: [web, db]\n",
                &nodes,
            ),
            "application.yml:17:17: applications.admin.ports[0].external: external port 80 is already published by web (line 7); external ports are unique in the cluster",
        ),
        (
            "an app that is not defined",
            deploy_error(APPS, "version: 1\nnodes:\n  node1: [web, redis]\n", &nodes),
            "deployment.yml:3:16: nodes.node1[1]: \"redis\" is not an application in application.yml (it defines admin, db and web)",
        ),
        (
            "an app that is not defined, given alone",
            deploy_error(APPS, "version: 1\nnodes:\n  node1: redis\n", &nodes),
            "deployment.yml:3:10: nodes.node1: \"redis\" is not an application in application.yml (it defines admin, db and web)",
        ),
        (
            "one node named twice",
            deploy_error(
                APPS,
                "version: 1\nnodes:\n  node1: [web]\n  \"172.16.255.250\": [db]\n",
                &nodes,
            ),
            "deployment.yml:4:3: nodes.\"172.16.255.250\": \"172.16.255.250\" and \"node1\" (line 3) are the same node, node1; list its apps under one key",
        ),
        (
            "a host with several nodes",
            deploy_error(APPS, "version: 1\nnodes:\n  127.0.0.1: [web]\n", &dev),
            "deployment.yml:3:3: nodes.\"127.0.0.1\": \"127.0.0.1\" is the address of several nodes: n1 (127.0.0.1:7801), n2 (127.0.0.1:7802); name one by its name or HOST:PORT",
        ),
        (
            "apps as a mapping",
            deploy_error(APPS, "version: 1\nnodes:\n  node1: {web: 1}\n", &nodes),
            "deployment.yml:3:10: nodes.node1: expected a list of application names, found a mapping",
        ),
        (
            "no nodes",
            deploy_error(APPS, "version: 1\n", &nodes),
            "deployment.yml:1:1: missing nodes (NODE: [APP, ...])",
        ),
        (
            "version 2",
            deploy_error(APPS, "version: 2\nnodes: {}\n", &nodes),
            "deployment.yml:1:10: version: 2 is not supported; write version: 1",
        ),
        (
            "an unknown key",
            deploy_error(APPS, "version: 1\nnode: {}\n", &nodes),
            "deployment.yml:2:1: unknown key \"node\"; did you mean \"nodes\"? Flocker's deployment.yml takes version, nodes",
        ),
        (
            "an app name that is a list",
            deploy_error(APPS, "version: 1\nnodes:\n  node1: [[web]]\n", &nodes),
            "deployment.yml:3:11: nodes.node1[0]: expected a string, found a list",
        ),
    ]);
}

#[test]
fn compose_alone_checks_ports() {
    let apps = parse_application(
        "docker-compose.yml",
        "services:\n  a:\n    image: x\n    ports: [\"80:80\"]\n  b:\n    image: y\n    ports: [\"80:8080\"]\n",
    )
    .unwrap();
    assert_eq!(
        resolve_unpinned(&apps).unwrap_err().to_string(),
        "docker-compose.yml:7:13: services.b.ports[0]: external port 80 is already published by \
         a (line 4); external ports are unique in the cluster"
    );
}

#[test]
fn image_with_command_is_a_container_whose_command_is_replaced() {
    let text =
        "version: 1\napplications:\n  db:\n    image: postgres\n    command: postgres -D /data\n";
    let apps = flock_scheduler::config::parse_application("app.yml", text).unwrap();
    let db = &apps.apps["db"];
    assert_eq!(db.image.as_deref(), Some("postgres"));
    assert_eq!(
        db.command.as_deref(),
        Some(&["postgres".to_string(), "-D".into(), "/data".into()][..])
    );
    let compose =
        "services:\n  web:\n    image: busybox\n    command: [\"sh\", \"-c\", \"sleep 1\"]\n";
    let apps = flock_scheduler::config::parse_application("compose.yml", compose).unwrap();
    assert_eq!(apps.apps["web"].image.as_deref(), Some("busybox"));
    assert_eq!(apps.apps["web"].command.as_ref().map(Vec::len), Some(3));
}
