//! The config parsers (`flock_scheduler::config`): Flocker's application.yml and
//! deployment.yml, fig and compose files, and the YAML layer under them. These read files a
//! user hands to `flockctl deploy`.
//!
//! An application file that parses must render back ([`to_flocker_yaml`]) to text that parses
//! to the same apps (the renderer's documented promise). A deployment that parses is resolved
//! against the examples' apps and three nodes.

use flock_scheduler::config::{
    parse_application, parse_deployment, resolve, resolve_unpinned, to_flocker_yaml,
};

use super::{Outcome, Target};
use crate::gen;
use crate::mutate::Rng;

const YAML_DICT: &[&[u8]] = &[
    b"&a ",
    b"*a",
    b"<<: *a\n",
    b"- ",
    b": ",
    b"\n  ",
    b"{",
    b"}",
    b"[",
    b"]",
    b", ",
    b"'",
    b"\"",
    b"!!str ",
    b"!!binary ",
    b"%YAML 1.2\n---\n",
    b"---\n",
    b"...\n",
    b"? ",
    b"|\n  ",
    b">-\n  ",
    b"# c\n",
    b"~",
    b"\\u0000",
    b"\t",
    b"version: 1\n",
    b"applications:\n",
    b"services:\n",
    b"nodes:\n",
    b"image: ",
    b"command: ",
    b"ports:\n",
    b"internal: ",
    b"external: ",
    b"volume:\n",
    b"mountpoint: ",
    b"maximum_size: ",
    b"environment:\n",
    b"links:\n",
    b"local_port: ",
    b"remote_port: ",
    b"alias: ",
    b"restart_policy:\n",
    b"maximum_retry_count: ",
    b"mem_limit: ",
    b"cpu_shares: ",
    b"restart: ",
    b"depends_on: ",
    b"volumes:\n",
    b"deploy:\n",
    b"constraints: ",
    b"node.labels.disk == ssd",
    b"99999999999999999999",
    b"1.5G",
    b"-1",
    b"0x10",
    b"/data",
    b"8080:80/udp",
];

const FIXTURES: &[&str] = &[
    gen::APPLICATION_YML,
    include_str!("../../../scheduler/tests/fixtures/flocker/elk-application.yml"),
];

const DEPLOYMENTS: &[&str] = &[
    gen::DEPLOYMENT_YML,
    include_str!("../../../examples/deployment-moved.yml"),
    include_str!("../../../scheduler/tests/fixtures/flocker/deployment-node1.yml"),
    include_str!("../../../scheduler/tests/fixtures/flocker/deployment-node2.yml"),
    include_str!("../../../scheduler/tests/fixtures/flocker/elk-deployment.yml"),
    include_str!("../../../scheduler/tests/fixtures/flocker/elk-deployment-moved.yml"),
];

const COMPOSE: &[&str] = &[
    r#"version: "3.8"
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
"#,
    "web:\n  image: nginx\n  ports: [\"80:80\"]\n  links: [\"redis:cache\"]\nredis:\n  image: redis\n  volumes: [\"/data\"]\n",
    "services: {a: {image: x, command: [sh, -c, 'sleep 1'], restart: unless-stopped}}\n",
];

pub fn application_target() -> Target {
    Target {
        name: "config_application",
        about: "Flocker application.yml (and the YAML layer), with the render round trip (scheduler/src/config)",
        run: run_application,
        seeds: || FIXTURES.iter().map(|s| s.as_bytes().to_vec()).collect(),
        fixup: text_fixup,
        generate: Some(|u| yaml_doc(u, true)),
        dict: YAML_DICT,
        max_len: 16 << 10,
        known: &[],
    }
}

pub fn compose_target() -> Target {
    Target {
        name: "config_compose",
        about: "compose v2/v3 and fig files: anchors, merge keys, long-form ports (scheduler/src/config/compose.rs)",
        run: run_application,
        seeds: || COMPOSE.iter().map(|s| s.as_bytes().to_vec()).collect(),
        fixup: text_fixup,
        generate: Some(|u| yaml_doc(u, false)),
        dict: YAML_DICT,
        max_len: 16 << 10,
        known: &[],
    }
}

pub fn deployment_target() -> Target {
    Target {
        name: "config_deployment",
        about: "Flocker deployment.yml, resolved against the examples' apps and three nodes (scheduler/src/config/deployment.rs)",
        run: run_deployment,
        seeds: || DEPLOYMENTS.iter().map(|s| s.as_bytes().to_vec()).collect(),
        fixup: text_fixup,
        generate: Some(deployment_doc),
        dict: YAML_DICT,
        max_len: 16 << 10,
        known: &[],
    }
}

/// An error's field path without indices and names of apps, and its message up to the first
/// quoted value: one label per kind of error, not per input.
fn label(path: &str, message: &str) -> String {
    let field = path.rsplit('.').next().unwrap_or("");
    let field = field.split('[').next().unwrap_or("");
    let msg = message.split(['"', '(']).next().unwrap_or("");
    format!("{field}: {}", super::prefix(msg, 50))
}

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

fn run_application(data: &[u8]) -> Outcome {
    let text = text(data);
    match parse_application("app.yml", &text) {
        Ok(apps) => {
            let _ = resolve_unpinned(&apps);
            let rendered = to_flocker_yaml(apps.apps.values());
            // Flocker's form says what Flocker's files can: compose's newer keys are not in it.
            let flocker =
                |a: &std::collections::BTreeMap<String, flock_scheduler::config::AppSpec>| {
                    a.iter()
                        .map(|(n, s)| (n.clone(), flock_scheduler::config::flocker_part(s)))
                        .collect::<std::collections::BTreeMap<_, _>>()
                };
            match parse_application("rendered.yml", &rendered) {
                Ok(again) => assert!(
                    flocker(&again.apps) == flocker(&apps.apps),
                    "rendering changes the apps: {:?} became {:?} (rendered: {:?})",
                    super::prefix(&format!("{:?}", apps.apps), 400),
                    super::prefix(&format!("{:?}", again.apps), 400),
                    super::prefix(&rendered, 400)
                ),
                Err(e) => panic!(
                    "the rendering of parsed apps does not parse: {} (rendered: {:?})",
                    super::prefix(&e.to_string(), 300),
                    super::prefix(&rendered, 400)
                ),
            }
            Outcome::ok(format!("{:?} {}", apps.format, apps.apps.len().min(4)))
        }
        Err(e) => Outcome::err(label(&e.path, &e.message)),
    }
}

fn run_deployment(data: &[u8]) -> Outcome {
    let text = text(data);
    match parse_deployment("deployment.yml", &text) {
        Ok(dep) => {
            let apps = parse_application("application.yml", gen::APPLICATION_YML)
                .expect("the example parses");
            match resolve(&apps, &dep, &gen::nodes()) {
                Ok(plan) => Outcome::ok(format!("resolved {}", plan.apps.len())),
                Err(e) => Outcome::err(format!("resolve: {}", label(&e.path, &e.message))),
            }
        }
        Err(e) => Outcome::err(label(&e.path, &e.message)),
    }
}

/// Mostly keeps the text valid UTF-8 (invalid bytes are read as U+FFFD anyway).
fn text_fixup(data: &mut Vec<u8>, rng: &mut Rng) {
    if rng.one_in(2) {
        if let Err(e) = std::str::from_utf8(data) {
            data.truncate(e.valid_up_to());
        }
    }
}

const KEYS: &[&str] = &[
    "version",
    "applications",
    "services",
    "image",
    "command",
    "ports",
    "internal",
    "external",
    "volume",
    "mountpoint",
    "maximum_size",
    "environment",
    "links",
    "local_port",
    "remote_port",
    "alias",
    "restart_policy",
    "name",
    "maximum_retry_count",
    "mem_limit",
    "cpu_shares",
    "restart",
    "volumes",
    "deploy",
    "placement",
    "constraints",
    "target",
    "published",
    "web",
    "db",
    "x-defaults",
    "<<",
    "nodes",
    "n1",
    "n2",
];

const SCALARS: &[&str] = &[
    "1",
    "2",
    "\"3\"",
    "postgres:16",
    "/data",
    "1G",
    "100M",
    "0",
    "-5",
    "99999999999999999999",
    "always",
    "on-failure",
    "never",
    "on-failure:3",
    "8080:80",
    "\"80:80/udp\"",
    "[sh, -c, x]",
    "~",
    "''",
    "true",
    "node.labels.disk == ssd",
    "a b 'c d'",
    "1.5",
    "\"\\u00e9\"",
];

/// A random YAML document over the config files' keys, with anchors, aliases, flow and block
/// styles: the YAML layer's input as a user (or an attacker) might write it.
fn yaml_doc(u: &mut arbitrary::Unstructured, flocker: bool) -> Vec<u8> {
    let mut out = String::new();
    if flocker {
        out.push_str("version: 1\napplications:\n");
    } else if u.arbitrary().unwrap_or(false) {
        out.push_str("services:\n");
    }
    let mut anchors = 0u32;
    node(u, &mut out, 1, 0, &mut anchors);
    out.into_bytes()
}

fn node(
    u: &mut arbitrary::Unstructured,
    out: &mut String,
    indent: usize,
    depth: u32,
    anchors: &mut u32,
) {
    let pad = "  ".repeat(indent);
    let n = u.int_in_range(1..=4usize).unwrap_or(1);
    for _ in 0..n {
        let key = KEYS[u.choose_index(KEYS.len()).unwrap_or(0)];
        let anchor = if u.int_in_range(0..=5u8).unwrap_or(0) == 0 {
            *anchors += 1;
            format!(" &a{}", *anchors)
        } else {
            String::new()
        };
        match u.int_in_range(0..=6u8).unwrap_or(0) {
            0..=2 if depth < 5 => {
                out.push_str(&format!("{pad}{key}:{anchor}\n"));
                node(u, out, indent + 1, depth + 1, anchors);
            }
            3 if depth < 5 => {
                out.push_str(&format!("{pad}{key}:{anchor}\n"));
                let items = u.int_in_range(0..=3usize).unwrap_or(0);
                for _ in 0..items {
                    let v = SCALARS[u.choose_index(SCALARS.len()).unwrap_or(0)];
                    out.push_str(&format!("{pad}  - {v}\n"));
                }
            }
            4 if *anchors > 0 => {
                let a = u.int_in_range(1..=*anchors).unwrap_or(1);
                if u.arbitrary().unwrap_or(false) {
                    out.push_str(&format!("{pad}<<: *a{a}\n"));
                } else {
                    out.push_str(&format!("{pad}{key}: *a{a}\n"));
                }
            }
            5 => {
                let k2 = KEYS[u.choose_index(KEYS.len()).unwrap_or(0)];
                let v = SCALARS[u.choose_index(SCALARS.len()).unwrap_or(0)];
                out.push_str(&format!("{pad}{key}:{anchor} {{{k2}: {v}}}\n"));
            }
            _ => {
                let v = SCALARS[u.choose_index(SCALARS.len()).unwrap_or(0)];
                out.push_str(&format!("{pad}{key}:{anchor} {v}\n"));
            }
        }
    }
}

fn deployment_doc(u: &mut arbitrary::Unstructured) -> Vec<u8> {
    let mut out = String::from("version: 1\nnodes:\n");
    let n = u.int_in_range(0..=4usize).unwrap_or(0);
    for _ in 0..n {
        let node = *u
            .choose(&[
                "n1",
                "n2",
                "n3",
                "127.0.0.1:7001",
                "127.0.0.1",
                "n9",
                "\"\"",
            ])
            .unwrap_or(&"n1");
        let apps = u.int_in_range(0..=3usize).unwrap_or(0);
        let names: Vec<&str> = (0..apps)
            .map(|_| {
                *u.choose(&["counter", "writer", "nope", "counter"])
                    .unwrap_or(&"counter")
            })
            .collect();
        if u.arbitrary().unwrap_or(false) || names.len() != 1 {
            out.push_str(&format!("  {node}: [{}]\n", names.join(", ")));
        } else {
            out.push_str(&format!("  {node}: {}\n", names[0]));
        }
    }
    out.into_bytes()
}
