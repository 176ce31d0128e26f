//! Flocker's `application.yml`:
//!
//! ```yaml
//! "version": 1
//! "applications":
//!   "postgres":
//!     "image": "postgres:9.4"          # or "command": "postgres -D /data" (flock)
//!     "ports": [{"internal": 5432, "external": 5432}]
//!     "links": [{"local_port": 80, "remote_port": 8080, "alias": "web"}]
//!     "volume": {"mountpoint": "/var/lib/postgresql/data", "maximum_size": "1G",
//!                "retention": "last=5,daily=3"}   # flock: or {last: 5, daily: 3}
//!     "environment": {"POSTGRES_USER": "admin"}
//!     "restart_policy": {"name": "on-failure", "maximum_retry_count": 10}
//!     "mem_limit": 100000000
//!     "cpu_shares": 512
//! ```
//!
//! Keys and rules as `FlockerConfiguration` in Flocker's `flocker/control/_config.py`; a
//! volume's `retention` (its dataset's [`crate::Retention`]) is flock's own.

use std::collections::BTreeMap;

use super::fields::{child, entry, get, index, Ctx};
use super::spec::{
    check_alias, check_app_name, normalize_mountpoint, AppSource, AppSpec, Applications, Format,
    Link, PortMap, RestartPolicy, Volume, VolumePolicy,
};
use super::yaml::{Pos, Val, Yaml};
use super::ConfigError;

const TOP_KEYS: &[&str] = &["version", "applications"];
const APP_KEYS: &[&str] = &[
    "image",
    "command",
    "ports",
    "links",
    "volume",
    "environment",
    "restart_policy",
    "mem_limit",
    "cpu_shares",
    // flock's own: compose's deploy.placement.constraints, for Flocker's format.
    "constraints",
    // flock's own: how many instances of a stateless app run (compose's deploy.replicas).
    "instances",
];

pub(crate) fn read(file: &str, doc: &Yaml) -> Result<Applications, ConfigError> {
    let cx = Ctx { file };
    let top = cx.mapping(doc, "")?;
    cx.check_keys(top, "", TOP_KEYS, "Flocker's application.yml")?;
    check_version(cx, top, doc.at)?;
    let apps_node = get(top, "applications")
        .ok_or_else(|| cx.err(doc.at, "", "missing applications: {NAME: {image: ...}}"))?;
    let mut apps = BTreeMap::new();
    let mut sources = BTreeMap::new();
    let mut volumes = BTreeMap::new();
    for (key, value) in cx.mapping_or_empty(apps_node, "applications")? {
        let name = key.scalar().unwrap_or_default();
        let path = child("applications", name);
        check_app_name(name).map_err(|m| cx.err(key.at, &path, m))?;
        let (spec, source, policy) = read_app(cx, name, key.at, value, &path)?;
        if let Some(policy) = policy {
            volumes.insert(name.to_string(), policy);
        }
        apps.insert(name.to_string(), spec);
        sources.insert(name.to_string(), source);
    }
    Ok(Applications {
        file: file.to_string(),
        format: Format::Flocker,
        apps,
        volumes,
        sources,
        project: None,
        secrets: BTreeMap::new(),
        built: Default::default(),
    })
}

/// `version: 1`, required (Flocker's only version).
pub(crate) fn check_version(cx: Ctx, top: &[(Yaml, Yaml)], doc_at: Pos) -> Result<(), ConfigError> {
    let Some(version) = get(top, "version") else {
        return Err(cx.err(doc_at, "", "missing version: 1"));
    };
    if version.scalar() != Some("1") {
        return Err(cx.err(
            version.at,
            "version",
            format!(
                "{} is not supported; write version: 1",
                version
                    .scalar()
                    .map_or_else(|| version.describe(), str::to_string)
            ),
        ));
    }
    Ok(())
}

fn read_app(
    cx: Ctx,
    name: &str,
    at: Pos,
    y: &Yaml,
    path: &str,
) -> Result<(AppSpec, AppSource, Option<VolumePolicy>), ConfigError> {
    let map = cx.mapping(y, path)?;
    cx.check_keys(map, path, APP_KEYS, "an application")?;
    let (image, command) = cx.what_to_run(map, at, path)?;
    let mut source = AppSource {
        at,
        ports: Vec::new(),
    };
    let mut ports = Vec::new();
    if let Some(list) = get(map, "ports") {
        let ports_path = child(path, "ports");
        for (i, item) in cx.list(list, &ports_path)?.iter().enumerate() {
            let item_path = index(&ports_path, i);
            let (port, ext_at) = read_port(cx, item, &item_path)?;
            let ext_path = child(&item_path, "external");
            if let Some(j) = ports
                .iter()
                .position(|p: &PortMap| p.external == port.external)
            {
                return Err(cx.err(
                    ext_at,
                    &ext_path,
                    format!(
                        "external port {} is already published by {}",
                        port.external,
                        index(&ports_path, j)
                    ),
                ));
            }
            ports.push(port);
            source.ports.push((ext_at, ext_path));
        }
    }
    let mut links = Vec::new();
    if let Some(list) = get(map, "links") {
        let links_path = child(path, "links");
        for (i, item) in cx.list(list, &links_path)?.iter().enumerate() {
            let item_path = index(&links_path, i);
            let link = read_link(cx, item, &item_path)?;
            check_new_link(cx, &links, &link, item.at, &item_path)?;
            links.push(link);
        }
    }
    let (volume, policy) = match get(map, "volume") {
        Some(v) => {
            let (volume, policy) = read_volume(cx, v, &child(path, "volume"))?;
            (Some(volume), Some(policy))
        }
        None => (None, None),
    };
    let environment = match get(map, "environment") {
        Some(v) => cx.environment(v, &child(path, "environment"), false)?,
        None => BTreeMap::new(),
    };
    let restart_policy = match get(map, "restart_policy") {
        Some(v) => read_restart_policy(cx, v, &child(path, "restart_policy"))?,
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
    let constraints = match get(map, "constraints") {
        Some(v) => cx.constraints(v, &child(path, "constraints"))?,
        None => Vec::new(),
    };
    let instances = match entry(map, "instances") {
        Some((_, v)) => {
            let field = child(path, "instances");
            let n = cx.uint(v, &field)?;
            if n == 0 || n > crate::limits::MAX_INSTANCES as u64 {
                return Err(cx.err(
                    v.at,
                    &field,
                    format!("{n} instances: give 1 to {}", crate::limits::MAX_INSTANCES),
                ));
            }
            if n > 1 && volume.is_some() {
                return Err(cx.err(
                    v.at,
                    &field,
                    format!(
                        "{n} instances of an application with a volume: a dataset has one \
                         writer, so only applications without a volume scale"
                    ),
                ));
            }
            (n > 1).then_some(n as u32)
        }
        None => None,
    };
    let spec = AppSpec {
        name: name.to_string(),
        image,
        command,
        ports,
        links,
        volume,
        environment,
        restart_policy,
        mem_limit,
        cpu_shares,
        constraints,
        instances,
        ..Default::default()
    };
    Ok((spec, source, policy))
}

/// `{internal: 80, external: 8080}`; also returns where the external port is written.
fn read_port(cx: Ctx, y: &Yaml, path: &str) -> Result<(PortMap, Pos), ConfigError> {
    if let Some((external, internal)) = y.scalar().and_then(|t| t.split_once(':')) {
        return Err(cx.err(
            y.at,
            path,
            format!(
                "{:?} is the compose form; application.yml writes {{internal: {internal}, \
                 external: {external}}}",
                y.scalar().unwrap_or_default()
            ),
        ));
    }
    let map = cx.mapping(y, path)?;
    cx.check_keys(map, path, &["internal", "external"], "a port")?;
    let hint = " (a port is {internal: PORT_IN_APP, external: PUBLISHED_PORT})";
    let internal = cx.required(map, y.at, path, "internal", hint)?;
    let external = cx.required(map, y.at, path, "external", hint)?;
    let port = PortMap {
        internal: cx.port(internal, &child(path, "internal"))?,
        external: cx.port(external, &child(path, "external"))?,
    };
    Ok((port, external.at))
}

/// `{local_port: 80, remote_port: 8080, alias: "web"}`.
fn read_link(cx: Ctx, y: &Yaml, path: &str) -> Result<Link, ConfigError> {
    let map = cx.mapping(y, path)?;
    let keys = ["local_port", "remote_port", "alias"];
    cx.check_keys(map, path, &keys, "a link")?;
    let hint = " (a link is {local_port: PORT, remote_port: PUBLISHED_PORT, alias: NAME})";
    let local = cx.required(map, y.at, path, "local_port", hint)?;
    let remote = cx.required(map, y.at, path, "remote_port", hint)?;
    let alias = cx.required(map, y.at, path, "alias", hint)?;
    let alias_path = child(path, "alias");
    let alias_text = cx.string(alias, &alias_path)?;
    check_alias(&alias_text).map_err(|m| cx.err(alias.at, &alias_path, m))?;
    Ok(Link {
        local_port: cx.port(local, &child(path, "local_port"))?,
        remote_port: cx.port(remote, &child(path, "remote_port"))?,
        alias: alias_text,
    })
}

/// Two links that would set the same environment variables are refused.
pub(crate) fn check_new_link(
    cx: Ctx,
    links: &[Link],
    link: &Link,
    at: Pos,
    path: &str,
) -> Result<(), ConfigError> {
    let var = |l: &Link| (l.alias.to_ascii_uppercase().replace('-', "_"), l.local_port);
    if links.iter().any(|l| var(l) == var(link)) {
        return Err(cx.err(
            at,
            path,
            format!(
                "another link already sets {}_PORT_{}_TCP; give this one another alias",
                var(link).0,
                link.local_port
            ),
        ));
    }
    Ok(())
}

/// `{mountpoint: /data, maximum_size: 1G, retention: "last=5,daily=3"}`, and the policy of
/// its dataset.
fn read_volume(cx: Ctx, y: &Yaml, path: &str) -> Result<(Volume, VolumePolicy), ConfigError> {
    let map = cx.mapping(y, path)?;
    let keys = [
        "mountpoint",
        "maximum_size",
        "retention",
        "replicas",
        "snapshot_interval",
    ];
    cx.check_cut_policy(map, path)?;
    cx.check_keys(map, path, &keys, "a volume")?;
    let mountpoint = cx.required(
        map,
        y.at,
        path,
        "mountpoint",
        " (where the app sees its data: /var/lib/data)",
    )?;
    let mp_path = child(path, "mountpoint");
    let mp_text = cx.string(mountpoint, &mp_path)?;
    let mountpoint_text =
        normalize_mountpoint(&mp_text).map_err(|m| cx.err(mountpoint.at, &mp_path, m))?;
    let maximum_size = match entry(map, "maximum_size") {
        Some((_, size)) => {
            let size_path = child(path, "maximum_size");
            Some(cx.volume_size(size, &size_path)?)
        }
        None => None,
    };
    let retention = match get(map, "retention") {
        Some(r) => cx.retention(r, &child(path, "retention"))?,
        None => None,
    };
    let replicas = match get(map, "replicas") {
        Some(r) => Some(cx.replicas(r, &child(path, "replicas"))?),
        None => None,
    };
    let snapshot_interval_ms = match get(map, "snapshot_interval") {
        Some(i) => Some(cx.interval(i, &child(path, "snapshot_interval"))?),
        None => None,
    };
    let volume = Volume {
        mountpoint: mountpoint_text,
        maximum_size,
        dataset: None,
    };
    Ok((
        volume,
        VolumePolicy {
            retention,
            replicas,
            snapshot_interval_ms,
        },
    ))
}

/// `{name: never|always|on-failure, maximum_retry_count: N}` (N only with on-failure), or the
/// name alone.
fn read_restart_policy(cx: Ctx, y: &Yaml, path: &str) -> Result<RestartPolicy, ConfigError> {
    let names = "never, always or on-failure";
    let (name_node, retries) = match &y.val {
        Val::Map(map) => {
            cx.check_keys(
                map,
                path,
                &["name", "maximum_retry_count"],
                "a restart_policy",
            )?;
            let name = cx.required(map, y.at, path, "name", &format!(" ({names})"))?;
            (name, entry(map, "maximum_retry_count"))
        }
        Val::Scalar { .. } if !y.is_null() => (y, None),
        _ => {
            return Err(cx.err(
                y.at,
                path,
                format!(
                "expected a mapping such as {{name: on-failure, maximum_retry_count: 5}}, found {}",
                y.describe()
            ),
            ))
        }
    };
    let name_path = if std::ptr::eq(name_node, y) {
        path.to_string()
    } else {
        child(path, "name")
    };
    let name = cx.string(name_node, &name_path)?;
    let policy = match name.as_str() {
        "never" => RestartPolicy::Never,
        "always" => RestartPolicy::Always,
        "on-failure" => RestartPolicy::OnFailure { max_retry: None },
        _ => {
            return Err(cx.err(
                name_node.at,
                &name_path,
                format!(
                    "{name_shown} is not a restart policy (use {names})",
                    name_shown = crate::limits::shown(&name)
                ),
            ))
        }
    };
    match (policy, retries) {
        (_, None) => Ok(policy),
        (RestartPolicy::OnFailure { .. }, Some((_, count))) => {
            let count_path = child(path, "maximum_retry_count");
            let n = cx.uint(count, &count_path)?;
            match u32::try_from(n) {
                Ok(n) if n >= 1 => Ok(RestartPolicy::OnFailure { max_retry: Some(n) }),
                _ => Err(cx.err(
                    count.at,
                    &count_path,
                    format!(
                        "{n} is not a retry count (1 to {}); leave it out for no limit",
                        u32::MAX
                    ),
                )),
            }
        }
        (_, Some((k, _))) => Err(cx.err(
            k.at,
            path,
            format!("maximum_retry_count goes only with on-failure, not {name}"),
        )),
    }
}
