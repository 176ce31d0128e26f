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
//!   x-flock:                   # flock's own, for the volume (compose has no place for them)
//!     retention: last=5,daily=3   # or {last: 5, daily: 3}
//!     maximum_size: 10G
//!   labels:                    # or ["flock.retention=last=5,daily=3"]; others are not read
//!     flock.retention: last=5,daily=3
//!     flock.maximum_size: 10G
//! ```
//!
//! A volume's retention and size may be given in `x-flock` or in `labels` (`flock.retention`,
//! `flock.maximum_size`), or both when they agree; a service without a volume takes neither.
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
    Link, PortMap, RestartPolicy, Volume, VolumePolicy,
};
use super::yaml::{Pos, Val, Yaml};
use super::ConfigError;
use crate::retention::Retention;

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
    "labels",
    "x-flock",
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
    let project = match format {
        Format::Compose => get(top, "name").map(|v| cx.string(v, "name")).transpose()?,
        _ => None,
    };
    let (services, prefix) = match format {
        Format::Compose => (compose_services(cx, top, doc.at)?, "services"),
        _ => (top, ""),
    };
    let mut apps = BTreeMap::new();
    let mut sources = BTreeMap::new();
    let mut pending_links = Vec::new();
    let mut volumes = BTreeMap::new();
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
        let (spec, source, links, policy) = read_service(cx, name, key.at, value, &path)?;
        if let Some(policy) = policy {
            volumes.insert(name.to_string(), policy);
        }
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
        volumes,
        sources,
        project,
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

/// A service as read: its spec, where it is written, its links to resolve and (when it has a
/// volume) its volume's policy.
type Service = (AppSpec, AppSource, Vec<PendingLink>, Option<VolumePolicy>);

fn read_service(
    cx: Ctx,
    name: &str,
    at: Pos,
    y: &Yaml,
    path: &str,
) -> Result<Service, ConfigError> {
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
    let mut volume = match entry(map, "volumes") {
        Some((k, v)) => read_volumes(cx, k.at, v, &child(path, "volumes"))?,
        None => None,
    };
    let settings = volume_settings(cx, map, path)?;
    let policy = match &mut volume {
        Some(volume) => {
            if let Some(size) = settings.maximum_size {
                volume.maximum_size = Some(size.value);
            }
            let retention = settings.retention.and_then(|r| r.value);
            Some(VolumePolicy {
                retention,
                replicas: settings.replicas.map(|r| r.value),
                snapshot_interval_ms: settings.snapshot_interval.map(|i| i.value),
            })
        }
        None => {
            let given = match (settings.retention, settings.maximum_size) {
                (Some(r), _) => Some((
                    r.at,
                    r.path,
                    "a retention policy is for a volume's snapshots",
                )),
                (None, Some(s)) => Some((s.at, s.path, "a size limit is for a volume")),
                (None, None) => settings
                    .replicas
                    .map(|r| (r.at, r.path, "replicas are copies of a volume"))
                    .or_else(|| {
                        settings.snapshot_interval.map(|i| {
                            (
                                i.at,
                                i.path,
                                "a snapshot interval is for a volume's replicas",
                            )
                        })
                    }),
            };
            if let Some((at, field, what)) = given {
                return Err(cx.err(
                    at,
                    &field,
                    format!(
                        "{name} has no volume, and {what}: give {name} one (volumes: \
                         [\"/data\"]) or remove this setting"
                    ),
                ));
            }
            None
        }
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
        ..Default::default()
    };
    Ok((spec, source, links, policy))
}

/// A volume setting as one place of the file gives it: the value, where, and its field.
struct Given<T> {
    value: T,
    at: Pos,
    path: String,
}

/// The volume settings a service gives in `x-flock` or `labels`.
#[derive(Default)]
struct VolumeSettings {
    retention: Option<Given<Option<Retention>>>,
    maximum_size: Option<Given<u64>>,
    /// `x-flock` only.
    replicas: Option<Given<u32>>,
    /// `x-flock` only, in ms.
    snapshot_interval: Option<Given<u64>>,
}

/// The labels flock reads (the same as `x-flock`'s keys).
const FLOCK_LABELS: [&str; 2] = ["flock.retention", "flock.maximum_size"];

/// The service's `x-flock` and `labels` settings, one value for each: both given and unequal
/// is an error naming the two.
fn volume_settings(
    cx: Ctx,
    map: &[(Yaml, Yaml)],
    path: &str,
) -> Result<VolumeSettings, ConfigError> {
    let ext = match get(map, "x-flock") {
        Some(v) => read_x_flock(cx, v, &child(path, "x-flock"))?,
        None => VolumeSettings::default(),
    };
    let labels = match get(map, "labels") {
        Some(v) => read_labels(cx, v, &child(path, "labels"))?,
        None => VolumeSettings::default(),
    };
    let show_retention =
        |r: &Option<Retention>| r.map_or_else(|| "default".to_string(), |r| r.to_string());
    Ok(VolumeSettings {
        replicas: ext.replicas,
        snapshot_interval: ext.snapshot_interval,
        retention: one_of(
            cx,
            ext.retention,
            labels.retention,
            |a, b| a.unwrap_or_default() == b.unwrap_or_default(),
            show_retention,
        )?,
        maximum_size: one_of(
            cx,
            ext.maximum_size,
            labels.maximum_size,
            |a, b| a == b,
            |n| format!("{n} bytes"),
        )?,
    })
}

/// The value of a setting given in `x-flock`, in `labels`, or in both when they agree.
fn one_of<T>(
    cx: Ctx,
    ext: Option<Given<T>>,
    label: Option<Given<T>>,
    same: impl Fn(&T, &T) -> bool,
    show: impl Fn(&T) -> String,
) -> Result<Option<Given<T>>, ConfigError> {
    match (ext, label) {
        (Some(e), Some(l)) if !same(&e.value, &l.value) => Err(cx.err(
            l.at,
            &l.path,
            format!(
                "{} here but {} in {} (line {}); give it in one place",
                show(&l.value),
                show(&e.value),
                e.path,
                e.at.line
            ),
        )),
        (Some(e), _) => Ok(Some(e)),
        (None, l) => Ok(l),
    }
}

/// `x-flock: {retention: ..., maximum_size: ...}`.
fn read_x_flock(cx: Ctx, y: &Yaml, path: &str) -> Result<VolumeSettings, ConfigError> {
    let map = cx.mapping_or_empty(y, path)?;
    cx.check_cut_policy(map, path)?;
    cx.check_keys(
        map,
        path,
        &["retention", "maximum_size", "replicas", "snapshot_interval"],
        "x-flock",
    )?;
    let given = |key: &str| entry(map, key).map(|(_, v)| (v, child(path, key)));
    let replicas = match given("replicas") {
        Some((v, field)) => Some(Given {
            value: cx.replicas(v, &field)?,
            at: v.at,
            path: field,
        }),
        None => None,
    };
    let snapshot_interval = match given("snapshot_interval") {
        Some((v, field)) => Some(Given {
            value: cx.interval(v, &field)?,
            at: v.at,
            path: field,
        }),
        None => None,
    };
    let retention = match entry(map, "retention") {
        Some((_, v)) => {
            let field = child(path, "retention");
            Some(Given {
                value: cx.retention(v, &field)?,
                at: v.at,
                path: field,
            })
        }
        None => None,
    };
    let maximum_size = match entry(map, "maximum_size") {
        Some((_, v)) => {
            let field = child(path, "maximum_size");
            Some(Given {
                value: cx.volume_size(v, &field)?,
                at: v.at,
                path: field,
            })
        }
        None => None,
    };
    Ok(VolumeSettings {
        retention,
        maximum_size,
        replicas,
        snapshot_interval,
    })
}

/// `labels:`, a mapping of labels to values or a list of `KEY=VALUE` (or `KEY` for ""): the
/// flock labels are read; labels outside `flock.` are metadata for other tools and ignored; a
/// `flock.` label flock does not know is refused (a typo would be silently lost).
fn read_labels(cx: Ctx, y: &Yaml, path: &str) -> Result<VolumeSettings, ConfigError> {
    // (label, value, where the label is, where its value is, its field)
    let mut labels: Vec<(String, String, Pos, Pos, String)> = Vec::new();
    match &y.val {
        Val::Map(entries) => {
            for (k, v) in entries {
                let key = k.scalar().unwrap_or_default().to_string();
                let item_path = child(path, &key);
                let value = match &v.val {
                    _ if v.is_null() => String::new(),
                    Val::Scalar { text, .. } => text.clone(),
                    _ => {
                        return Err(cx.err(
                            v.at,
                            &item_path,
                            format!(
                                "expected a label's value (a string), found {}",
                                v.describe()
                            ),
                        ))
                    }
                };
                labels.push((key, value, k.at, v.at, item_path));
            }
        }
        Val::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_path = index(path, i);
                let text = cx.string(item, &item_path)?;
                let (key, value) = text.split_once('=').unwrap_or((&text, ""));
                let (key, value) = (key.to_string(), value.to_string());
                labels.push((key, value, item.at, item.at, item_path));
            }
        }
        _ if y.is_null() => {}
        _ => {
            return Err(cx.err(
                y.at,
                path,
                format!(
                    "expected a mapping of labels to values, or a list of KEY=VALUE, found {}",
                    y.describe()
                ),
            ))
        }
    }
    let mut settings = VolumeSettings::default();
    for (key, value, key_at, at, item_path) in labels {
        if !key.starts_with("flock.") {
            continue;
        }
        if !FLOCK_LABELS.contains(&key.as_str()) {
            let hint = match FLOCK_LABELS.iter().find(|k| super::fields::near(k, &key)) {
                Some(k) => format!("did you mean {k}? "),
                None => String::new(),
            };
            return Err(cx.err(
                key_at,
                &item_path,
                format!(
                    "unknown flock label {key_shown}; {hint}flock reads {} (labels outside \
                     flock. are not read)",
                    FLOCK_LABELS.join(" and "),
                    key_shown = crate::limits::shown(&key)
                ),
            ));
        }
        let twice = || {
            cx.err(
                key_at,
                &item_path,
                format!("{key} is set twice; give it once"),
            )
        };
        if key == "flock.retention" {
            if settings.retention.is_some() {
                return Err(twice());
            }
            let value = super::fields::retention(&value).map_err(|m| cx.err(at, &item_path, m))?;
            settings.retention = Some(Given {
                value,
                at,
                path: item_path,
            });
        } else {
            if settings.maximum_size.is_some() {
                return Err(twice());
            }
            let value =
                super::fields::volume_size(&value).map_err(|m| cx.err(at, &item_path, m))?;
            settings.maximum_size = Some(Given {
                value,
                at,
                path: item_path,
            });
        }
    }
    Ok(settings)
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
        dataset: None,
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
