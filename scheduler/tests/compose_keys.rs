//! Compose's keys as flock reads them (issue 18): honoured, ignored with a warning naming the
//! key, or refused saying what to do; and every problem of a file at once, each where it is.

use std::collections::BTreeMap;

use flock_scheduler::config::interpolate::Vars;
use flock_scheduler::config::stack::into_stack;
use flock_scheduler::config::{
    parse_compose, AppSpec, Applications, BindMount, Dependency, HealthCheck, ParseOptions,
    Problems, RestartPolicy, SecretMount, Ulimit, Warning,
};

/// Files a test's compose file may name: `name -> content`; the others are missing.
type Files = BTreeMap<&'static str, &'static str>;

fn parse_with(
    text: &str,
    vars: &Vars,
    profiles: &[String],
    files: &Files,
) -> Result<(Applications, Vec<Warning>), Problems> {
    let read = |name: &str| {
        files
            .get(name)
            .map(|c| c.as_bytes().to_vec())
            .ok_or_else(|| "No such file or directory (os error 2)".to_string())
    };
    let options = ParseOptions {
        vars: Some(vars),
        profiles,
        dir: Some("/home/me/shop"),
        read_file: &read,
    };
    parse_compose("compose.yml", text, &options)
}

fn parse(text: &str) -> (Applications, Vec<String>) {
    match parse_with(text, &Vars::new(), &[], &Files::new()) {
        Ok((apps, w)) => (apps, w.iter().map(ToString::to_string).collect()),
        Err(p) => panic!("{:#?}", errors(&p)),
    }
}

fn errors(p: &Problems) -> Vec<String> {
    p.errors.iter().map(ToString::to_string).collect()
}

fn refused(text: &str) -> Vec<String> {
    match parse_with(text, &Vars::new(), &[], &Files::new()) {
        Ok(_) => panic!("parsed: {text}"),
        Err(p) => errors(&p),
    }
}

fn app<'a>(apps: &'a Applications, name: &str) -> &'a AppSpec {
    &apps.apps[name]
}

#[test]
fn every_problem_of_a_file_at_once_in_its_order() {
    let text = "\
services:
  web:
    image: nginx
    volumes: [\"./html:/usr/share/nginx/html\"]
    privileged: true
  db:
    image: postgres
    restart: sometimes
    container_name: db
";
    let p = parse_with(text, &Vars::new(), &[], &Files::new()).unwrap_err();
    assert_eq!(
        errors(&p),
        [
            "compose.yml:4:15: services.web.volumes[0]: \"./html\" is a writable host directory: \
             data written there stays on one node's disk and does not move with the app; use a \
             named volume (NAME:/usr/share/nginx/html, one dataset that moves with the app), or \
             mount it read-only (./html:/usr/share/nginx/html:ro)",
            "compose.yml:5:5: services.web.privileged: a privileged app has the whole node, \
             which flock does not give: remove privileged",
            "compose.yml:8:14: services.db.restart: \"sometimes\" is not a restart policy (use \
             no, always, unless-stopped, on-failure or on-failure:N)",
        ]
    );
    // The warnings of a refused file come with it.
    assert_eq!(p.warnings.len(), 1);
    assert_eq!(
        p.warnings[0].to_string(),
        "compose.yml:9:5: services.db.container_name: container_name is ignored: flock names \
         the container after the app (STACK_SERVICE)"
    );
    assert_eq!((p.warnings[0].line, p.warnings[0].column), (9, 5));
}

#[test]
fn depends_on_lists_maps_and_conditions() {
    let (apps, warnings) = parse(
        "\
services:
  web:
    image: web
    depends_on:
      db: {condition: service_healthy}
      cache: {condition: service_started}
      init: {condition: service_completed_successfully}
  worker:
    image: worker
    depends_on: [db]
  db: {image: postgres, expose: [5432]}
  cache: {image: redis, expose: [6379]}
  init: {image: init}
",
    );
    let dep = |app: &str, healthy| Dependency {
        app: app.into(),
        healthy,
    };
    assert_eq!(
        app(&apps, "web").depends_on,
        [dep("db", true), dep("cache", false), dep("init", false)]
    );
    assert_eq!(app(&apps, "worker").depends_on, [dep("db", false)]);
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].starts_with("compose.yml:7:25: services.web.depends_on.init.condition: service_completed_successfully is taken as service_started"),
        "{warnings:?}"
    );
    // into_stack names the siblings' apps.
    let s = into_stack(apps, "shop").unwrap();
    assert_eq!(s.apps["shop_worker"].depends_on, [dep("shop_db", false)]);
}

#[test]
fn a_dependency_no_sibling_could_reach_is_warned_once() {
    let (_, warnings) = parse(
        "\
services:
  web:
    image: web
    depends_on: [db, migrate]
  worker:
    image: worker
    depends_on: [db]
  db: {image: postgres}
  migrate: {image: migrate}
  later:
    image: later
    depends_on:
      migrate: {condition: service_completed_successfully}
",
    );
    let reach: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("cannot reach it by name"))
        .collect();
    assert_eq!(reach.len(), 2, "{warnings:#?}");
    assert!(
        reach[0].starts_with(
            "compose.yml:4:18: services.web.depends_on[0]: db has no ports or expose, so web \
             cannot reach it by name on any port (flock does not read an image's EXPOSE): give \
             db `expose: [PORT]`"
        ),
        "{reach:#?}"
    );
    assert!(reach[1].contains("migrate has no ports"), "{reach:#?}");
}

#[test]
fn a_dependency_cycle_or_an_unknown_service_is_refused() {
    assert_eq!(
        refused(
            "\
services:
  a: {image: a, depends_on: [b]}
  b: {image: b, depends_on: [c]}
  c: {image: c, depends_on: [a, nope]}
"
        ),
        [
            "compose.yml:2:30: services.a.depends_on[0]: a dependency cycle: a -> b -> c -> a; \
             none of them could start first: remove one of these depends_on",
            "compose.yml:4:33: services.c.depends_on[1]: \"nope\" is not a service in this file",
        ]
    );
    assert_eq!(
        refused("services:\n  a: {image: a, depends_on: [a]}\n"),
        [
            "compose.yml:2:30: services.a.depends_on[0]: a dependency cycle: a -> a; none of them \
          could start first: remove one of these depends_on"
        ]
    );
}

#[test]
fn profiles_leave_out_the_services_not_activated() {
    let text = "\
services:
  web: {image: web}
  debug: {image: busybox, profiles: [debug]}
  admin: {image: adminer, profiles: [tools, admin], depends_on: [debug]}
";
    let names = |r: Result<(Applications, Vec<Warning>), Problems>| {
        r.unwrap().0.apps.keys().cloned().collect::<Vec<_>>()
    };
    let none = Vars::new();
    assert_eq!(names(parse_with(text, &none, &[], &Files::new())), ["web"]);
    assert_eq!(
        names(parse_with(text, &none, &["debug".into()], &Files::new())),
        ["debug", "web"]
    );
    let from_env: Vars = [("COMPOSE_PROFILES".to_string(), "debug, admin".to_string())].into();
    assert_eq!(
        names(parse_with(text, &from_env, &[], &Files::new())),
        ["admin", "debug", "web"]
    );
    // A service activated needs its dependencies activated too.
    let p = parse_with(text, &none, &["tools".into()], &Files::new()).unwrap_err();
    assert_eq!(
        errors(&p),
        ["compose.yml:4:66: services.admin.depends_on[0]: debug is only in profile debug, which \
          is not active: activate it (--profile debug) or remove the dependency"]
    );
}

#[test]
fn healthchecks_entrypoints_and_the_process_settings() {
    let (apps, warnings) = parse(
        "\
services:
  db:
    image: postgres
    healthcheck:
      test: [\"CMD\", \"pg_isready\", \"-U\", \"postgres\"]
      interval: 1m30s
      timeout: 10s
      retries: 3
      start_period: 500ms
    entrypoint: /bin/sh -c 'exec \"$$0\"'
    user: \"999:999\"
    working_dir: /var/lib/postgresql
    hostname: db1
    stop_signal: SIGINT
    stop_grace_period: 1m30s
    ulimits:
      nofile: {soft: 20000, hard: 40000}
      nproc: 65535
    labels: [com.example.team=data, flock.retention=last=3]
    volumes: [/var/lib/postgresql/data]
    shm_size: 256mb
  web:
    image: web
    healthcheck: {test: curl -f http://localhost/ || exit 1}
    entrypoint: []
  job:
    image: job
    healthcheck: {test: [NONE]}
    entrypoint: [\"/run.sh\", \"--once\"]
",
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let db = app(&apps, "db");
    assert_eq!(
        db.healthcheck,
        Some(HealthCheck {
            test: ["CMD", "pg_isready", "-U", "postgres"]
                .map(String::from)
                .to_vec(),
            interval_ms: Some(90_000),
            timeout_ms: Some(10_000),
            retries: Some(3),
            start_period_ms: Some(500),
            disable: false,
        })
    );
    assert_eq!(
        db.entrypoint.as_deref(),
        Some(&["/bin/sh".to_string(), "-c".into(), "exec \"$0\"".into()][..])
    );
    assert_eq!(db.user.as_deref(), Some("999:999"));
    assert_eq!(db.working_dir.as_deref(), Some("/var/lib/postgresql"));
    assert_eq!(db.hostname.as_deref(), Some("db1"));
    assert_eq!(db.stop_signal.as_deref(), Some("SIGINT"));
    assert_eq!(db.stop_grace_ms, Some(90_000));
    assert_eq!(
        db.ulimits,
        [
            Ulimit {
                name: "nofile".into(),
                soft: 20000,
                hard: 40000
            },
            Ulimit {
                name: "nproc".into(),
                soft: 65535,
                hard: 65535
            }
        ]
    );
    // All labels are the container's; flock's are read as well.
    assert_eq!(db.labels["com.example.team"], "data");
    assert_eq!(db.labels["flock.retention"], "last=3");
    assert_eq!(apps.volumes["db"].retention.unwrap().last, 3);
    assert_eq!(db.shm_size, Some(256 << 20));
    let web = app(&apps, "web");
    assert_eq!(
        web.healthcheck.as_ref().unwrap().test,
        ["CMD-SHELL", "curl -f http://localhost/ || exit 1"]
    );
    assert_eq!(web.entrypoint, Some(vec![]));
    let job = app(&apps, "job");
    assert!(job.healthcheck.as_ref().unwrap().disable);
    assert_eq!(job.entrypoint.as_ref().unwrap().len(), 2);
    assert_eq!(
        refused(
            "services:\n  a:\n    image: a\n    healthcheck: {test: [curl, x], interval: 10y}\n"
        ),
        [
            "compose.yml:4:25: services.a.healthcheck.test: a test list starts with CMD, \
             CMD-SHELL or NONE, not \"curl\"; write [\"CMD\", \"curl\", ...] or a string (run by \
             the shell)",
            "compose.yml:4:46: services.a.healthcheck.interval: \"10y\" is not a duration \
             (write 1m30s, 10s or 500ms)",
        ]
    );
}

#[test]
fn ports_and_expose() {
    let (apps, warnings) = parse(
        "\
services:
  web:
    image: web
    ports:
      - \"8080:80\"
      - target: 443
        published: \"8443\"
      - \"127.0.0.1:9000:9000\"
      - \"3000\"
      - \"0.0.0.0:81:81/tcp\"
    expose: [\"5000\", 5001, \"6000-6002/tcp\", \"7000/udp\"]
",
    );
    let web = app(&apps, "web");
    let published: Vec<(u16, u16)> = web.ports.iter().map(|p| (p.external, p.internal)).collect();
    assert_eq!(published, [(8080, 80), (8443, 443), (81, 81)]);
    assert_eq!(web.expose, [9000, 3000, 5000, 5001, 6000, 6001, 6002]);
    assert_eq!(warnings.len(), 3, "{warnings:#?}");
    assert!(warnings[0]
        .starts_with("compose.yml:8:9: services.web.ports[2]: port 9000 is bound to 127.0.0.1"));
    assert!(warnings[1]
        .starts_with("compose.yml:9:9: services.web.ports[3]: port 3000 is not published"));
    assert!(warnings[2].contains("expose[3]: udp is ignored"));
}

#[test]
fn volumes_binds_and_datasets() {
    let (apps, warnings) = parse(
        "\
services:
  db:
    image: postgres
    volumes:
      - db-data:/var/lib/postgresql/data
      - /etc/localtime:/etc/localtime:ro
      - ./init.sql:/docker-entrypoint-initdb.d/init.sql:ro,z
  backup:
    image: busybox
    volumes:
      - type: volume
        source: db-data
        target: /data
      - type: bind
        source: ../conf
        target: /conf
        read_only: true
      - type: tmpfs
        target: /tmp
  cache:
    image: redis
    volumes: [/data]
volumes:
  db-data:
    driver: local
",
    );
    let db = app(&apps, "db");
    let vol = db.volume.as_ref().unwrap();
    assert_eq!(vol.mountpoint, "/var/lib/postgresql/data");
    assert_eq!(vol.dataset.as_deref(), Some("db-data"));
    let bind = |s: &str, t: &str| BindMount {
        source: s.into(),
        target: t.into(),
    };
    assert_eq!(
        db.binds,
        [
            bind("/etc/localtime", "/etc/localtime"),
            bind(
                "/home/me/shop/init.sql",
                "/docker-entrypoint-initdb.d/init.sql"
            )
        ]
    );
    // One named volume used by two services: one dataset.
    let backup = app(&apps, "backup");
    assert_eq!(
        backup.volume.as_ref().unwrap().dataset.as_deref(),
        Some("db-data")
    );
    assert_eq!(backup.binds, [bind("/home/me/conf", "/conf")]);
    assert_eq!(app(&apps, "cache").volume.as_ref().unwrap().dataset, None);
    let s = into_stack(apps, "shop").unwrap();
    let ds = |a: &str| s.apps[a].volume.as_ref().unwrap().dataset.clone();
    assert_eq!(ds("shop_db").as_deref(), Some("shop_db-data"));
    assert_eq!(ds("shop_backup").as_deref(), Some("shop_db-data"));
    // Warnings: each bind (3), the tmpfs, the volume's driver.
    let binds = warnings
        .iter()
        .filter(|w| w.contains("must exist on every node"))
        .count();
    assert_eq!(binds, 3, "{warnings:#?}");
    assert!(warnings.iter().any(|w| w.contains("tmpfs /tmp is ignored")));
    assert!(warnings
        .iter()
        .any(|w| w.starts_with("compose.yml:25:5: volumes.db-data.driver: driver is ignored")));
    assert_eq!(
        refused("services:\n  a:\n    image: a\n    volumes: [\"data:/data\", /cache, \"/run/docker.sock:/var/run/docker.sock:ro\"]\nvolumes:\n  data: {external: true}\n"),
        [
            "compose.yml:4:5: services.a.volumes: 2 writable volumes (data:/data, /cache); flock \
             gives an app one dataset, which moves with it: keep one (put the data under one \
             directory), or mount host files read-only (:ro)",
            "compose.yml:4:37: services.a.volumes[2]: /run/docker.sock is the node's Docker API, \
             which is not given to apps (read-only or not, it lets the app start and stop the \
             node's containers, flock's among them): remove it",
            "compose.yml:6:10: volumes.data.external: an external volume holds data made outside \
             the stack, which flock would not find (a stack's volume is the dataset STACK_data, \
             made on deploy): remove external: and copy the data into the dataset",
        ]
    );
}

#[test]
fn deploy_resources_restart_policy_and_replicas() {
    let (apps, warnings) = parse(
        "\
services:
  web:
    image: web
    cpus: 0.5
    mem_reservation: 64m
    deploy:
      replicas: 1
      mode: replicated
      resources:
        limits: {memory: 512M, cpus: \"1.5\"}
        reservations: {memory: 128M, cpus: \"0.5\"}
      restart_policy: {condition: on-failure, max_attempts: 3, delay: 5s}
      update_config: {parallelism: 2}
      labels: {a: b}
  job:
    image: job
    restart: always
    deploy:
      restart_policy: {condition: none}
",
    );
    let web = app(&apps, "web");
    assert_eq!(web.mem_limit, Some(512 << 20));
    assert_eq!(web.cpu_limit_milli, Some(1500));
    assert_eq!(web.mem_reservation, Some(128 << 20));
    assert_eq!(web.cpu_shares, Some(512));
    assert_eq!(
        web.restart_policy,
        RestartPolicy::OnFailure { max_retry: Some(3) }
    );
    assert_eq!(app(&apps, "job").restart_policy, RestartPolicy::Never);
    let keys: Vec<&str> = warnings
        .iter()
        .map(|w| w.split(": ").nth(1).unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "services.web.deploy.restart_policy.delay",
            "services.web.deploy.update_config",
            "services.web.deploy.labels"
        ]
    );
    assert_eq!(
        refused("services:\n  a:\n    image: a\n    deploy: {mode: global}\n  b:\n    image: b\n    scale: 0\n  c:\n    image: c\n    volumes: [data:/d]\n    deploy: {replicas: 2}\nvolumes: {data: {}}\n"),
        [
            "compose.yml:4:20: services.a.deploy.mode: global runs one container on every node, \
             which flock does not do (an app runs on one node): remove mode, for one replica",
            "compose.yml:7:12: services.b.scale: 0 instances: flock runs at least one; remove \
             the service, or give 1 or more",
            "compose.yml:8:3: services.c: it has a volume and more than one instance (scale or \
             deploy.replicas): a dataset has one writer, so only services without a volume \
             scale; give 1 instance, or move the state out of the service",
        ]
    );
}

#[test]
fn secrets_configs_and_env_files_are_read_beside_the_file() {
    let text = "\
services:
  db:
    image: postgres
    env_file: [db.env, {path: missing.env, required: false}]
    environment: {B: from-environment}
    secrets:
      - db_password
      - source: api_key
        target: key
        mode: 0400
        uid: \"999\"
    configs: [nginx_conf]
secrets:
  db_password: {file: ./pw.txt}
  api_key: {environment: API_KEY}
configs:
  nginx_conf: {content: \"worker_processes 1;\"}
  unused: {file: ./nowhere}
";
    let files: Files = [("db.env", "A=1\nB=2\n"), ("./pw.txt", "s3cret")].into();
    let vars: Vars = [("API_KEY".to_string(), "k3y".to_string())].into();
    let (apps, warnings) = parse_with(text, &vars, &[], &files).unwrap();
    let db = app(&apps, "db");
    assert_eq!(db.environment["A"], "1");
    assert_eq!(db.environment["B"], "from-environment");
    let mount = |s: &str, t: &str, mode| SecretMount {
        secret: s.into(),
        target: t.into(),
        mode,
    };
    assert_eq!(
        db.secrets,
        [
            mount("db_password", "/run/secrets/db_password", 0o444),
            mount("api_key", "/run/secrets/key", 0o400),
            mount("nginx_conf", "/nginx_conf", 0o444),
        ]
    );
    // Only what the services use; an unused config's missing file is no error.
    assert_eq!(
        apps.secrets.keys().collect::<Vec<_>>(),
        ["api_key", "db_password", "nginx_conf"]
    );
    assert_eq!(apps.secrets["db_password"], b"s3cret");
    assert_eq!(apps.secrets["api_key"], b"k3y");
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0]
        .to_string()
        .contains("secrets[1].uid: uid is ignored"));
    let s = into_stack(apps, "shop").unwrap();
    assert_eq!(s.apps["shop_db"].secrets[0].secret, "shop_db_password");
    assert!(s.secrets.contains_key("shop_api_key"));

    // Missing files: each named where it is written, with the rest of the file's problems.
    let p = parse_with(text, &Vars::new(), &[], &Files::new()).unwrap_err();
    assert_eq!(
        errors(&p),
        [
            "compose.yml:4:16: services.db.env_file[0]: cannot read \"db.env\": No such file or \
             directory (os error 2) (env_file is read beside the compose file; create it, or \
             give {path: db.env, required: false})",
            "compose.yml:14:23: secrets.db_password.file: cannot read \"./pw.txt\": No such \
             file or directory (os error 2) (a secret's file is read beside the compose file, \
             before anything is deployed)",
            "compose.yml:15:26: secrets.api_key.environment: variable API_KEY is not set: set it \
             in the environment or in .env (its value is the secret api_key)",
        ]
    );
    assert_eq!(
        refused("services:\n  a:\n    image: a\n    secrets: [nope]\nsecrets:\n  ext: {external: true}\n"),
        [
            "compose.yml:4:15: services.a.secrets[0]: \"nope\" is not in the file's secrets: \
             (ext); define it there with file: or environment:",
            "compose.yml:6:9: secrets.ext.external: flock has no external secrets: a stack's \
             secrets travel with its deploy; give ext file: or environment: instead",
        ]
    );
    assert_eq!(
        refused("services:\n  a: {image: a}\nsecrets:\n  x: {environment: X}\nconfigs:\n  x: {content: y}\n"),
        ["compose.yml:6:16: configs.x.content: x is also a secret's name, and secrets and \
          configs share their names in the cluster: rename one"]
    );
}

#[test]
fn build_runs_the_image_compose_would_build() {
    let (apps, warnings) = parse(
        "\
services:
  web:
    build: ./web
  api:
    build: {context: ./api}
    image: registry.example/api:1
",
    );
    assert_eq!(app(&apps, "web").image, None);
    assert_eq!(
        app(&apps, "api").image.as_deref(),
        Some("registry.example/api:1")
    );
    assert!(warnings[0].starts_with(
        "compose.yml:3:5: services.web.build: flock does not build images: the app runs STACK-web"
    ));
    assert!(warnings[0].contains("docker build -t STACK-web CONTEXT"));
    assert!(warnings[1].contains(
        "build is ignored: flock does not build images; each node pulls registry.example/api:1"
    ));
    let s = into_stack(apps, "Shop".to_lowercase().as_str()).unwrap();
    assert_eq!(s.apps["shop_web"].image.as_deref(), Some("shop-web"));
}

#[test]
fn ignored_keys_warn_by_name_and_silent_when_off() {
    let (_, warnings) = parse(
        "\
services:
  web:
    image: web
    container_name: web1
    platform: linux/amd64
    logging: {driver: syslog}
    tty: false
    stdin_open: true
    networks:
      front: {aliases: [www]}
    extra_hosts: [\"db:10.0.0.1\"]
networks:
  front: {}
",
    );
    let keys: Vec<&str> = warnings
        .iter()
        .map(|w| w.split(": ").nth(1).unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "networks",
            "services.web.container_name",
            "services.web.platform",
            "services.web.logging",
            "services.web.stdin_open",
            "services.web.extra_hosts",
            "services.web.networks",
        ]
    );
    assert!(warnings[6].ends_with("(not by the aliases www)"));
}

#[test]
fn replicas_and_scale_ask_for_instances() {
    let (apps, warnings) = parse(
        "services:\n  web:\n    image: nginx\n    deploy: {replicas: 3}\n  api:\n    image: api\n    scale: 2\n  one:\n    image: one\n    deploy: {replicas: 1}\n",
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(app(&apps, "web").instances, Some(3));
    assert_eq!(app(&apps, "api").instances, Some(2));
    // One is the default, written as none: the app's spec is the same as without the key.
    assert_eq!(app(&apps, "one").instances, None);
}
