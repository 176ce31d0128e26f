//! fig and compose files: the same fields as Flocker's application.yml, written as Docker's
//! tools write them.
//!
//! ```yaml
//! web:                         # fig / compose v1: services at the top level
//!   image: clusterhq/flask     # or command: "python -m http.server 80"
//!   ports: ["80:8080"]         # "EXTERNAL:INTERNAL"
//!   links: ["redis:db"]        # "SERVICE[:ALIAS]"
//!   volumes: ["/data"]         # one volume: "/path" or "NAME:/path"
//!   environment: {A: "1"}      # or ["A=1"]
//!   mem_limit: 512m
//!   cpu_shares: 512
//!   restart: on-failure:5      # no | always | on-failure[:N]
//! ```
//!
//! A compose v2/v3 file puts the services under `services:` (with an optional `version: "2"`
//! or `"3.x"`, a `volumes:` section and `x-` extension fields). A link to a service becomes
//! one [`Link`] per port that service publishes (local = its internal port, remote = its
//! external port), as Flocker's `FigConfiguration` did.

use std::collections::BTreeMap;

use super::fields::{child, entry, get, index, port_number, Ctx};
use super::flocker::check_new_link;
use super::spec::{
    check_alias, check_app_name, normalize_mountpoint, AppSource, AppSpec, Applications, Format,
    Link, PortMap, RestartPolicy, Volume,
};
use super::yaml::{Pos, Val, Yaml};
use super::ConfigError;

const SERVICE_KEYS: &[&str] = &[
    "image",
    "command",
    "ports",
    "links",
    "volumes",
    "environment",
    "restart",
    "mem_limit",
    "cpu_shares",
    "deploy",
];

/// Service keys of compose that flock does not read: refused as unsupported rather than
/// unknown (they are not typos).
const COMPOSE_ONLY_KEYS: &[&str] = &[
    "cap_add",
    "cap_drop",
    "cgroup_parent",
    "configs",
    "container_name",
    "cpus",
    "cpuset",
    "depends_on",
    "devices",
    "dns",
    "dns_search",
    "domainname",
    "entrypoint",
    "env_file",
    "expose",
    "extends",
    "external_links",
    "extra_hosts",
    "healthcheck",
    "hostname",
    "init",
    "ipc",
    "labels",
    "logging",
    "mem_reservation",
    "memswap_limit",
    "net",
    "network_mode",
    "networks",
    "pid",
    "platform",
    "privileged",
    "profiles",
    "pull_policy",
    "read_only",
    "secrets",
    "security_opt",
    "shm_size",
    "stdin_open",
    "stop_grace_period",
    "stop_signal",
    "sysctls",
    "tmpfs",
    "tty",
    "ulimits",
    "user",
    "volumes_from",
    "working_dir",
];

/// Whether a top-level value is a service definition (fig's rule: a mapping with an `image`
/// or `build` key; flock adds `command`).
pub(crate) fn is_service(y: &Yaml) -> bool {
    ["image", "build", "command"]
        .iter()
        .any(|k| y.get(k).is_some())
}

pub(crate) fn read(file: &str, doc: &Yaml, format: Format) -> Result<Applications, ConfigError> {
    let cx = Ctx { file };
    let top = cx.mapping(doc, "")?;
    let (services, prefix) = match format {
        Format::Compose => (compose_services(cx, top, doc.at)?, "services"),
        _ => (top, ""),
    };
    let mut apps = BTreeMap::new();
    let mut sources = BTreeMap::new();
    let mut pending_links = Vec::new();
    for (key, value) in services {
        let name = key.scalar().unwrap_or_default();
        let path = child(prefix, name);
        if format == Format::Fig && !matches!(value.val, Val::Map(_)) {
            return Err(cx.err(
                key.at,
                &path,
                format!(
                    "expected a service (a mapping with image or command), found {}; \
                     Flocker's application.yml starts with version: 1 and applications:",
                    value.describe()
                ),
            ));
        }
        check_app_name(name).map_err(|m| cx.err(key.at, &path, m))?;
        let (spec, source, links) = read_service(cx, name, key.at, value, &path)?;
        apps.insert(name.to_string(), spec);
        sources.insert(name.to_string(), source);
        pending_links.push((name.to_string(), links));
    }
    // Links name services that may come later in the file: resolve them once all are read.
    for (name, links) in pending_links {
        let mut resolved = Vec::new();
        for link in links {
            let Some(target) = apps.get(&link.target) else {
                return Err(cx.err(
                    link.at,
                    &link.path,
                    format!("{:?} is not a service in this file", link.target),
                ));
            };
            if target.ports.is_empty() {
                return Err(cx.err(
                    link.at,
                    &link.path,
                    format!(
                        "{} publishes no ports, and a link reaches a service through its \
                         published ports; give {} ports",
                        link.target, link.target
                    ),
                ));
            }
            for port in &target.ports {
                let new = Link {
                    local_port: port.internal,
                    remote_port: port.external,
                    alias: link.alias.clone(),
                };
                check_new_link(cx, &resolved, &new, link.at, &link.path)?;
                resolved.push(new);
            }
        }
        if let Some(app) = apps.get_mut(&name) {
            app.links = resolved;
        }
    }
    Ok(Applications {
        file: file.to_string(),
        format,
        apps,
        sources,
    })
}

/// The `services` of a compose v2/v3 file, after checking its other top-level keys.
fn compose_services<'y>(
    cx: Ctx,
    top: &'y [(Yaml, Yaml)],
    doc_at: Pos,
) -> Result<&'y [(Yaml, Yaml)], ConfigError> {
    let allowed = ["version", "services", "volumes", "name"];
    for (k, v) in top {
        let key = k.scalar().unwrap_or_default();
        if key.starts_with("x-") {
            continue;
        }
        if matches!(key, "networks" | "configs" | "secrets") {
            let why = if key == "networks" {
                " (apps reach each other through links and the routing mesh)"
            } else {
                ""
            };
            return Err(cx.err(
                k.at,
                "",
                format!(
                    "{key} is not supported by flock{why}; a compose file takes version, \
                     services, volumes, name and x- fields"
                ),
            ));
        }
        if !allowed.contains(&key) {
            return Err(cx.unknown_key(k.at, "", key, &allowed, "a compose file"));
        }
        if key == "version" {
            let text = v.scalar().unwrap_or_default();
            let major = text.split('.').next().unwrap_or_default();
            if !matches!(major, "2" | "3") || !text.split('.').all(super::fields::is_digits) {
                return Err(cx.err(
                    v.at,
                    "version",
                    format!(
                        "compose file version {} is not supported (use \"2\", \"3\" or leave \
                         version out)",
                        v.describe()
                    ),
                ));
            }
        }
    }
    let services = get(top, "services").ok_or_else(|| cx.err(doc_at, "", "missing services"))?;
    cx.mapping_or_empty(services, "services")
}

/// A link as written, before the service it names is known.
struct PendingLink {
    target: String,
    alias: String,
    at: Pos,
    path: String,
}

fn read_service(
    cx: Ctx,
    name: &str,
    at: Pos,
    y: &Yaml,
    path: &str,
) -> Result<(AppSpec, AppSource, Vec<PendingLink>), ConfigError> {
    let map = cx.mapping(y, path)?;
    for (k, _) in map {
        let key = k.scalar().unwrap_or_default();
        if key == "build" {
            return Err(cx.err(
                k.at,
                path,
                "build is not supported: flock does not build images; push the image to a \
                 registry and give image:",
            ));
        }
        if COMPOSE_ONLY_KEYS.contains(&key) {
            let why = match key {
                "depends_on" => {
                    " (apps start independently on their nodes: an app that needs another \
                     should retry until it answers, with restart: always; remove depends_on)"
                }
                _ => "",
            };
            return Err(cx.err(
                k.at,
                path,
                format!(
                    "{key} is not supported by flock{why}; a service takes {}",
                    SERVICE_KEYS.join(", ")
                ),
            ));
        }
        if !SERVICE_KEYS.contains(&key) && !key.starts_with("x-") {
            return Err(cx.unknown_key(k.at, path, key, SERVICE_KEYS, "a service"));
        }
    }
    let (image, command) = cx.what_to_run(map, at, path)?;
    let mut source = AppSource {
        at,
        ports: Vec::new(),
    };
    let mut ports: Vec<PortMap> = Vec::new();
    if let Some(list) = get(map, "ports") {
        let ports_path = child(path, "ports");
        for (i, item) in cx.list(list, &ports_path)?.iter().enumerate() {
            let item_path = index(&ports_path, i);
            let (port, ext_at) = read_port(cx, item, &item_path)?;
            if let Some(j) = ports.iter().position(|p| p.external == port.external) {
                return Err(cx.err(
                    ext_at,
                    &item_path,
                    format!(
                        "external port {} is already published by {}",
                        port.external,
                        index(&ports_path, j)
                    ),
                ));
            }
            ports.push(port);
            source.ports.push((ext_at, item_path));
        }
    }
    let mut links = Vec::new();
    if let Some(list) = get(map, "links") {
        let links_path = child(path, "links");
        for (i, item) in cx.list(list, &links_path)?.iter().enumerate() {
            let item_path = index(&links_path, i);
            let text = cx.string(item, &item_path)?;
            let (target, alias) = match text.split_once(':') {
                Some((t, a)) => (t, a),
                None => (text.as_str(), text.as_str()),
            };
            check_alias(alias).map_err(|m| cx.err(item.at, &item_path, m))?;
            links.push(PendingLink {
                target: target.to_string(),
                alias: alias.to_string(),
                at: item.at,
                path: item_path,
            });
        }
    }
    let volume = match entry(map, "volumes") {
        Some((k, v)) => read_volumes(cx, k.at, v, &child(path, "volumes"))?,
        None => None,
    };
    let environment = match get(map, "environment") {
        Some(v) => cx.environment(v, &child(path, "environment"), true)?,
        None => BTreeMap::new(),
    };
    let restart_policy = match get(map, "restart") {
        Some(v) => read_restart(cx, v, &child(path, "restart"))?,
        None => RestartPolicy::Never,
    };
    let mem_limit = match get(map, "mem_limit") {
        Some(v) => Some(cx.mem_limit(v, &child(path, "mem_limit"))?),
        None => None,
    };
    let cpu_shares = match get(map, "cpu_shares") {
        Some(v) => Some(cx.cpu_shares(v, &child(path, "cpu_shares"))?),
        None => None,
    };
    let constraints = match get(map, "deploy") {
        Some(v) => read_deploy(cx, v, &child(path, "deploy"))?,
        None => Vec::new(),
    };
    let spec = AppSpec {
        name: name.to_string(),
        image,
        command,
        ports,
        links: Vec::new(),
        volume,
        environment,
        restart_policy,
        mem_limit,
        cpu_shares,
        constraints,
    };
    Ok((spec, source, links))
}

/// `deploy:`, of which flock reads `placement: {constraints: [...]}`; the rest of it (replicas,
/// resources, update policies) is Swarm's and refused.
fn read_deploy(cx: Ctx, y: &Yaml, path: &str) -> Result<Vec<super::spec::Constraint>, ConfigError> {
    let map = cx.mapping(y, path)?;
    cx.check_keys(map, path, &["placement"], "deploy")?;
    let Some(placement) = get(map, "placement") else {
        return Ok(Vec::new());
    };
    let placement_path = child(path, "placement");
    let pmap = cx.mapping(placement, &placement_path)?;
    cx.check_keys(pmap, &placement_path, &["constraints"], "placement")?;
    match get(pmap, "constraints") {
        Some(v) => cx.constraints(v, &child(&placement_path, "constraints")),
        None => Ok(Vec::new()),
    }
}

/// `"EXTERNAL:INTERNAL"` (optionally `/tcp`), or compose's long form
/// `{target: INTERNAL, published: EXTERNAL}`. Returns where the external port is written.
fn read_port(cx: Ctx, y: &Yaml, path: &str) -> Result<(PortMap, Pos), ConfigError> {
    let form = "write \"EXTERNAL:INTERNAL\", as \"8080:80\"";
    match &y.val {
        Val::Map(map) => {
            cx.check_keys(map, path, &["target", "published", "protocol"], "a port")?;
            if let Some(p) = get(map, "protocol") {
                if p.scalar() != Some("tcp") {
                    return Err(cx.err(
                        p.at,
                        &child(path, "protocol"),
                        "only tcp ports are supported",
                    ));
                }
            }
            let hint = " (a port is {target: PORT_IN_APP, published: PUBLISHED_PORT})";
            let target = cx.required(map, y.at, path, "target", hint)?;
            let published = cx.required(map, y.at, path, "published", hint)?;
            let port = PortMap {
                internal: cx.port(target, &child(path, "target"))?,
                external: cx.port(published, &child(path, "published"))?,
            };
            Ok((port, published.at))
        }
        Val::Scalar { text, .. } if !y.is_null() => {
            let spec = match text.split_once('/') {
                Some((s, "tcp")) => s,
                Some((_, proto)) => {
                    return Err(cx.err(
                        y.at,
                        path,
                        format!(
                            "{text_shown}: only tcp ports are supported, not {proto}",
                            text_shown = crate::limits::shown(text)
                        ),
                    ))
                }
                None => text.as_str(),
            };
            let parts: Vec<&str> = spec.split(':').collect();
            match parts.as_slice() {
                [external, internal] => match (port_number(external), port_number(internal)) {
                    (Some(external), Some(internal)) => Ok((PortMap { internal, external }, y.at)),
                    _ if spec.contains('-') => Err(cx.err(y.at, path, format!("{text_shown}: port ranges are not supported; list each port", text_shown = crate::limits::shown(text)))),
                    _ => Err(cx.err(y.at, path, format!("{text_shown} is not a port mapping (ports are 1 to 65535); {form}", text_shown = crate::limits::shown(text)))),
                },
                [_] => Err(cx.err(
                    y.at,
                    path,
                    format!("{text_shown} has no external port; {form} (the mesh publishes EXTERNAL on every node)", text_shown = crate::limits::shown(text)),
                )),
                [_, _, _] => Err(cx.err(
                    y.at,
                    path,
                    format!("{text_shown}: binding to one address is not supported (the mesh publishes a port on every node); {form}", text_shown = crate::limits::shown(text)),
                )),
                _ => Err(cx.err(y.at, path, format!("{text_shown} is not a port mapping; {form}", text_shown = crate::limits::shown(text)))),
            }
        }
        _ => Err(cx.err(
            y.at,
            path,
            format!("expected a port mapping, found {}; {form}", y.describe()),
        )),
    }
}

/// `volumes: ["/path"]` or `["NAME:/path"]`: at most one, and no host directories (they do
/// not move with the app).
fn read_volumes(cx: Ctx, key_at: Pos, y: &Yaml, path: &str) -> Result<Option<Volume>, ConfigError> {
    let items = cx.list(y, path)?;
    if items.len() > 1 {
        return Err(cx.err(
            key_at,
            path,
            format!(
                "{} volumes given; flock gives an app one volume (as Flocker)",
                items.len()
            ),
        ));
    }
    let Some(item) = items.first() else {
        return Ok(None);
    };
    let item_path = index(path, 0);
    let text = cx.string(item, &item_path)?;
    let mut parts: Vec<&str> = text.split(':').collect();
    if parts.len() > 1 && matches!(parts.last(), Some(&"rw")) {
        parts.pop();
    }
    let mountpoint = match parts.as_slice() {
        [path_only] => *path_only,
        [source, target] if is_host_path(source) => {
            return Err(cx.err(
                item.at,
                &item_path,
                format!(
                    "{source_shown} is a host directory, which does not move with the app; write \
                     {target_shown} alone (or NAME:{target}) for a volume flock manages",
                    source_shown = crate::limits::shown(source),
                    target_shown = crate::limits::shown(target)
                ),
            ))
        }
        [_, target] => *target,
        _ => {
            return Err(cx.err(
                item.at,
                &item_path,
                format!(
                    "{text_shown} is not a volume; write \"/path\" or \"NAME:/path\" (read-write)",
                    text_shown = crate::limits::shown(&text)
                ),
            ))
        }
    };
    let mountpoint =
        normalize_mountpoint(mountpoint).map_err(|m| cx.err(item.at, &item_path, m))?;
    Ok(Some(Volume {
        mountpoint,
        maximum_size: None,
    }))
}

fn is_host_path(source: &str) -> bool {
    source.starts_with(['/', '.', '~'])
}

/// `restart: no | always | unless-stopped | on-failure | on-failure:N`. `unless-stopped` is
/// `always`: nothing stops a deployed app but a change of its config, which replaces it.
fn read_restart(cx: Ctx, y: &Yaml, path: &str) -> Result<RestartPolicy, ConfigError> {
    let text = cx.string(y, path)?;
    let use_ = "use no, always, unless-stopped, on-failure or on-failure:N";
    match text.as_str() {
        // YAML 1.1 readers see `no` as false; either way it means no.
        "no" | "false" | "never" => Ok(RestartPolicy::Never),
        "always" | "unless-stopped" => Ok(RestartPolicy::Always),
        "on-failure" => Ok(RestartPolicy::OnFailure { max_retry: None }),
        _ => match text.strip_prefix("on-failure:").map(str::parse::<u32>) {
            Some(Ok(n)) if n >= 1 => Ok(RestartPolicy::OnFailure { max_retry: Some(n) }),
            _ => Err(cx.err(
                y.at,
                path,
                format!(
                    "{text_shown} is not a restart policy ({use_})",
                    text_shown = crate::limits::shown(&text)
                ),
            )),
        },
    }
}
