//! fig and compose files: the same fields as Flocker's application.yml, written as Docker's
//! tools write them, read as `docker compose` and `docker stack deploy` read them.
//!
//! ```yaml
//! web:                         # fig / compose v1: services at the top level
//!   image: clusterhq/flask     # or command: "python -m http.server 80"
//!   ports: ["80:8080"]         # "EXTERNAL:INTERNAL"
//!   links: ["redis:db"]        # "SERVICE[:ALIAS]"
//!   volumes: ["/data"]         # one writable volume: "/path" or "NAME:/path"; ":ro" host paths
//!   environment: {A: "1"}      # or ["A=1"]
//!   mem_limit: 512m
//!   cpu_shares: 512
//!   restart: on-failure:5      # no | always | on-failure[:N]
//!   x-flock:                   # flock's own, for the volume (compose has no place for them)
//!     retention: last=5,daily=3   # or {last: 5, daily: 3}
//!     maximum_size: 10G
//!   labels:                    # or ["flock.retention=last=5,daily=3"]
//!     flock.retention: last=5,daily=3
//!     flock.maximum_size: 10G
//! ```
//!
//! A volume's retention and size may be given in `x-flock` or in `labels` (`flock.retention`,
//! `flock.maximum_size`), or both when they agree; a service without a volume takes neither.
//!
//! A compose v2/v3 file puts the services under `services:` (with an optional `version: "2"`
//! or `"3.x"`, `volumes:`, `secrets:`, `configs:`, `networks:` and `x-` extension fields). A
//! link to a service becomes one [`Link`] per port that service publishes (local = its
//! internal port, remote = its external port), as Flocker's `FigConfiguration` did.
//!
//! What compose honours, flock honours; what it ignores, flock ignores with a warning naming
//! the key; it refuses only what would lose data or break the app if run anyway (a writable
//! host directory, the host's network, a second writable volume...), saying what to do. The
//! reader goes on after an error, to the next key and the next service, so that one run lists
//! every problem of the file ([`Report`]). docs/compose.md's "Compose keys" lists every key.

use std::collections::{BTreeMap, BTreeSet};

use super::fields::{child, duration_ms, entry, get, index, is_digits, near, port_number, Ctx};
use super::flocker::check_new_link;
use super::spec::{
    check_alias, check_app_name, normalize_mountpoint, AppSource, AppSpec, Applications, BindMount,
    Dependency, Format, HealthCheck, Link, PortMap, RestartPolicy, SecretMount, Ulimit, Volume,
    VolumePolicy,
};
use super::yaml::{Pos, Val, Yaml};
use super::{ConfigError, ParseOptions, Problems, Warning};
use crate::retention::Retention;

/// Service keys flock reads (some of them only for some values: `network_mode`, `pid`...).
const SERVICE_KEYS: &[&str] = &[
    "image",
    "build",
    "command",
    "entrypoint",
    "ports",
    "expose",
    "links",
    "volumes",
    "environment",
    "env_file",
    "restart",
    "mem_limit",
    "mem_reservation",
    "cpu_shares",
    "cpus",
    "deploy",
    "labels",
    "x-flock",
    "depends_on",
    "healthcheck",
    "user",
    "working_dir",
    "hostname",
    "stop_signal",
    "stop_grace_period",
    "ulimits",
    "shm_size",
    "profiles",
    "secrets",
    "configs",
    "scale",
    "networks",
    "network_mode",
    "net",
    "pid",
    "ipc",
    "cap_add",
    "privileged",
    "devices",
    "gpus",
    "volumes_from",
    "extends",
    "use_api_socket",
];

/// Service keys compose reads and flock ignores, with why (the warning says it). A key whose
/// value asks for nothing (`tty: false`, `[]`) is passed over silently.
const IGNORED: &[(&str, &str)] = &[
    (
        "container_name",
        "flock names the container after the app (STACK_SERVICE)",
    ),
    ("platform", "each node runs the image for its own platform"),
    (
        "pull_policy",
        "a node pulls the image when it does not have it",
    ),
    (
        "logging",
        "flock keeps the app's output (flockctl app logs)",
    ),
    ("stdin_open", "an app runs without input"),
    ("tty", "an app runs without a terminal"),
    ("init", "the app's command is the container's first process"),
    ("domainname", "the container gets the node's domain"),
    ("dns", "the node's DNS settings apply"),
    ("dns_search", "the node's DNS settings apply"),
    ("dns_opt", "the node's DNS settings apply"),
    ("extra_hosts", "the app's /etc/hosts gets no extra entries"),
    (
        "external_links",
        "containers outside the file are not linked (reach them by their published ports)",
    ),
    (
        "security_opt",
        "the app runs with Docker's default security options",
    ),
    (
        "cap_drop",
        "the app runs with Docker's default capabilities",
    ),
    ("read_only", "the app's file system is writable"),
    ("sysctls", "the node's kernel settings apply"),
    ("group_add", "the app runs with its user's groups"),
    ("oom_score_adj", "the app has Docker's default OOM score"),
    (
        "oom_kill_disable",
        "the kernel may kill the app when the node runs out of memory",
    ),
    (
        "memswap_limit",
        "swap is Docker's default (as much as mem_limit)",
    ),
    ("mem_swappiness", "swap is Docker's default"),
    (
        "cpuset",
        "the app may run on any cpu of its node (cpus: limits how much)",
    ),
    (
        "cpu_quota",
        "flock limits cpu with cpus: (deploy.resources.limits.cpus)",
    ),
    (
        "cpu_period",
        "flock limits cpu with cpus: (deploy.resources.limits.cpus)",
    ),
    (
        "cpu_count",
        "flock limits cpu with cpus: (deploy.resources.limits.cpus)",
    ),
    (
        "cpu_percent",
        "flock limits cpu with cpus: (deploy.resources.limits.cpus)",
    ),
    ("cpu_rt_runtime", "the app gets no real-time cpu time"),
    ("cpu_rt_period", "the app gets no real-time cpu time"),
    ("blkio_config", "disk bandwidth is not limited"),
    ("pids_limit", "the number of processes is not limited"),
    ("cgroup_parent", "flock places the app's cgroup"),
    ("cgroup", "flock places the app's cgroup"),
    (
        "mac_address",
        "the app gets an address on its node's network",
    ),
    (
        "userns_mode",
        "the app runs in Docker's default user namespace",
    ),
    ("uts", "the app has its own host name"),
    ("isolation", "the node's default isolation applies"),
    (
        "runtime",
        "the node's default container runtime runs the app",
    ),
    (
        "storage_opt",
        "the app's writable layer has the node's default options",
    ),
    ("annotations", "they are metadata for other tools"),
    ("develop", "compose watch is for development on one machine"),
    ("attach", "flock keeps the app's output (flockctl app logs)"),
    ("credential_spec", "it is for Windows containers"),
    ("label_file", "give the labels in labels:"),
    ("device_cgroup_rules", "the app gets no devices"),
    ("post_start", "lifecycle hooks are not run"),
    ("pre_stop", "lifecycle hooks are not run"),
    (
        "tmpfs",
        "the paths are in the app's own writable layer, not in memory (and not kept)",
    ),
];

/// Top-level keys of a compose file.
const TOP_KEYS: &[&str] = &[
    "version", "name", "services", "volumes", "networks", "secrets", "configs", "include",
];

/// Whether a top-level value is a service definition (fig's rule: a mapping with an `image`
/// or `build` key; flock adds `command`).
pub(crate) fn is_service(y: &Yaml) -> bool {
    ["image", "build", "command"]
        .iter()
        .any(|k| y.get(k).is_some())
}

/// The errors and warnings found so far: a reader records an error and goes on.
pub(crate) struct Report<'f> {
    cx: Ctx<'f>,
    problems: Problems,
}

impl Report<'_> {
    fn error(&mut self, at: Pos, path: &str, message: impl Into<String>) {
        self.problems.errors.push(self.cx.err(at, path, message));
    }

    fn warn(&mut self, at: Pos, path: &str, message: impl Into<String>) {
        self.problems
            .warnings
            .push(Warning::new(self.cx.file, at, path, message));
    }

    /// The value, or `None` with its error recorded.
    fn ok<T>(&mut self, r: Result<T, ConfigError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.problems.errors.push(e);
                None
            }
        }
    }
}

/// A value that asks for nothing: empty, `false`, `[]` or `{}`.
fn is_off(y: &Yaml) -> bool {
    match &y.val {
        _ if y.is_null() => true,
        Val::Scalar { text, .. } => matches!(text.as_str(), "false" | "False" | "FALSE" | "no"),
        Val::Seq(items) => items.is_empty(),
        Val::Map(entries) => entries.is_empty(),
    }
}

fn is_true(y: &Yaml) -> bool {
    matches!(y.scalar(), Some("true" | "True" | "TRUE" | "yes"))
}

/// A secret or config of the file's top-level `secrets:` / `configs:`.
struct SecretDef {
    /// Where its value comes from, and where that is written.
    source: SecretSource,
    at: Pos,
    path: String,
}

enum SecretSource {
    File(String),
    Env(String),
    Content(String),
    /// Refused (external) or malformed: already reported.
    None,
}

/// The file's top-level definitions the services refer to.
struct Tops {
    secrets: BTreeMap<String, SecretDef>,
    configs: BTreeMap<String, SecretDef>,
}

/// Reads a fig or compose file. The applications are `None` only when the file's shape is
/// unreadable; with errors in the report they are partial and not to be used.
pub(crate) fn read(
    file: &str,
    doc: &Yaml,
    format: Format,
    options: &ParseOptions,
) -> (Option<Applications>, Problems) {
    let mut r = Report {
        cx: Ctx { file },
        problems: Problems {
            errors: Vec::new(),
            warnings: Vec::new(),
        },
    };
    let apps = read_file(&mut r, doc, format, options);
    (apps, r.problems)
}

fn read_file(
    r: &mut Report,
    doc: &Yaml,
    format: Format,
    options: &ParseOptions,
) -> Option<Applications> {
    let cx = r.cx;
    let top = r.ok(cx.mapping(doc, ""))?;
    let no_vars = super::interpolate::Vars::new();
    let vars = options.vars.unwrap_or(&no_vars);
    let mut project = None;
    let mut tops = Tops {
        secrets: BTreeMap::new(),
        configs: BTreeMap::new(),
    };
    let (services, prefix) = match format {
        Format::Compose => {
            project = get(top, "name").and_then(|v| r.ok(cx.string(v, "name")));
            read_top_keys(r, top);
            if let Some(v) = get(top, "volumes") {
                read_top_volumes(r, v);
            }
            if let Some(v) = get(top, "secrets") {
                tops.secrets = read_top_secrets(r, v, "secrets");
            }
            if let Some(v) = get(top, "configs") {
                tops.configs = read_top_secrets(r, v, "configs");
            }
            // One namespace in the cluster (STACK_NAME): a secret and a config of one name
            // would overwrite each other.
            for (name, def) in &tops.configs {
                if tops.secrets.contains_key(name) {
                    r.error(
                        def.at,
                        &def.path,
                        format!(
                            "{name} is also a secret's name, and secrets and configs share \
                             their names in the cluster: rename one"
                        ),
                    );
                }
            }
            let services = match get(top, "services") {
                Some(s) => r.ok(cx.mapping_or_empty(s, "services"))?,
                None => {
                    r.error(doc.at, "", "missing services");
                    return None;
                }
            };
            (services, "services")
        }
        _ => (top, ""),
    };
    let mut active: BTreeSet<String> = options.profiles.iter().cloned().collect();
    if let Some(p) = vars.get("COMPOSE_PROFILES") {
        active.extend(
            p.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    let mut apps = BTreeMap::new();
    let mut sources = BTreeMap::new();
    let mut pending = Vec::new();
    let mut volumes = BTreeMap::new();
    let mut built = BTreeSet::new();
    // Services left out because none of their profiles is active, with their profiles.
    let mut inactive: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut used_secrets: BTreeSet<(&'static str, String)> = BTreeSet::new();
    for (key, value) in services {
        let name = key.scalar().unwrap_or_default();
        let path = child(prefix, name);
        if format == Format::Fig && !matches!(value.val, Val::Map(_)) {
            r.error(
                key.at,
                &path,
                format!(
                    "expected a service (a mapping with image or command), found {}; \
                     Flocker's application.yml starts with version: 1 and applications:",
                    value.describe()
                ),
            );
            continue;
        }
        if let Err(m) = check_app_name(name) {
            r.error(key.at, &path, m);
            continue;
        }
        if let Some(profiles) = service_profiles(r, value, &path) {
            let on = active.contains("*") || profiles.iter().any(|p| active.contains(p));
            if !on {
                inactive.insert(name.to_string(), profiles);
                continue;
            }
        }
        let Some(s) = read_service(r, options, &tops, name, key.at, value, &path) else {
            continue;
        };
        if let Some(policy) = s.policy {
            volumes.insert(name.to_string(), policy);
        }
        if s.built {
            built.insert(name.to_string());
        }
        for m in &s.spec.secrets {
            let kind = if s.configs.contains(&m.secret) {
                "configs"
            } else {
                "secrets"
            };
            used_secrets.insert((kind, m.secret.clone()));
        }
        apps.insert(name.to_string(), s.spec);
        sources.insert(name.to_string(), s.source);
        pending.push((name.to_string(), s.links, s.deps));
    }
    resolve_links_and_deps(r, &mut apps, pending, &inactive);
    check_dataset_names(r, &apps, &sources);
    let secrets = read_secret_contents(r, options, vars, &tops, used_secrets.iter());
    Some(Applications {
        file: r.cx.file.to_string(),
        format,
        apps,
        volumes,
        sources,
        project,
        secrets,
        built,
    })
}

/// Checks a compose file's top-level keys (not `services`, `volumes`, `secrets`, `configs`:
/// read on their own).
fn read_top_keys(r: &mut Report, top: &[(Yaml, Yaml)]) {
    for (k, v) in top {
        let key = k.scalar().unwrap_or_default();
        if key.starts_with("x-") {
            continue;
        }
        match key {
            "networks" => {
                if !is_off(v) {
                    r.warn(
                        k.at,
                        "networks",
                        "networks is ignored: services reach each other by name on any node",
                    );
                }
            }
            "include" => r.error(
                k.at,
                "include",
                "include reads other compose files, which flock does not: merge them into this \
                 file",
            ),
            "version" => {
                let text = v.scalar().unwrap_or_default();
                let major = text.split('.').next().unwrap_or_default();
                if !matches!(major, "2" | "3") || !text.split('.').all(is_digits) {
                    r.error(
                        v.at,
                        "version",
                        format!(
                            "compose file version {} is not supported (use \"2\", \"3\" or \
                             leave version out)",
                            v.describe()
                        ),
                    );
                }
            }
            _ if TOP_KEYS.contains(&key) => {}
            _ => {
                let e = r.cx.unknown_key(k.at, "", key, TOP_KEYS, "a compose file");
                r.problems.errors.push(e);
            }
        }
    }
}

/// The top-level `volumes:` (a named volume need not be declared there). An external volume is refused (flock creates
/// the stack's datasets: one made elsewhere would be replaced by an empty one); the driver's
/// settings are ignored with a warning (a volume is a flock dataset).
fn read_top_volumes(r: &mut Report, y: &Yaml) {
    let Some(map) = r.ok(r.cx.mapping_or_empty(y, "volumes")) else {
        return;
    };
    for (k, v) in map {
        let name = k.scalar().unwrap_or_default();
        let path = child("volumes", name);
        if v.is_null() {
            continue;
        }
        let Some(entries) = r.ok(r.cx.mapping(v, &path)) else {
            continue;
        };
        for (kk, vv) in entries {
            let key = kk.scalar().unwrap_or_default();
            let field = child(&path, key);
            match key {
                "external" if is_true(vv) || matches!(vv.val, Val::Map(_)) => r.error(
                    kk.at,
                    &field,
                    format!(
                        "an external volume holds data made outside the stack, which flock \
                         would not find (a stack's volume is the dataset STACK_{name}, made on \
                         deploy): remove external: and copy the data into the dataset"
                    ),
                ),
                "external" => {}
                "driver" | "driver_opts" | "name" | "labels" => r.warn(
                    kk.at,
                    &field,
                    format!(
                        "{key} is ignored: the volume is the flock dataset STACK_{name}, which \
                         moves with its app"
                    ),
                ),
                _ if key.starts_with("x-") => {}
                _ => {
                    let e = r.cx.unknown_key(
                        kk.at,
                        &path,
                        key,
                        &["driver", "driver_opts", "external", "labels", "name"],
                        "a volume",
                    );
                    r.problems.errors.push(e);
                }
            }
        }
    }
}

/// The top-level `secrets:` or `configs:` (`kind`): each NAME with `file:`, `environment:` or
/// (configs) `content:`. External ones are refused: flock has no secrets but a stack's own.
fn read_top_secrets(r: &mut Report, y: &Yaml, kind: &str) -> BTreeMap<String, SecretDef> {
    let mut defs = BTreeMap::new();
    let Some(map) = r.ok(r.cx.mapping_or_empty(y, kind)) else {
        return defs;
    };
    let one = if kind == "secrets" {
        "secret"
    } else {
        "config"
    };
    let mut sources = vec!["file", "environment"];
    if kind == "configs" {
        sources.push("content");
    }
    for (k, v) in map {
        let name = k.scalar().unwrap_or_default().to_string();
        let path = child(kind, &name);
        let mut def = SecretDef {
            source: SecretSource::None,
            at: k.at,
            path: path.clone(),
        };
        if let Err(m) = check_app_name(&name) {
            r.error(
                k.at,
                &path,
                m.replace("an application name", &format!("a {one} name"))
                    .replace("the application name", &format!("the {one} name")),
            );
            continue;
        }
        let Some(entries) = r.ok(r.cx.mapping(v, &path)) else {
            defs.insert(name, def);
            continue;
        };
        let mut given = 0;
        for (kk, vv) in entries {
            let key = kk.scalar().unwrap_or_default();
            let field = child(&path, key);
            match key {
                "file" | "environment" | "content" if sources.contains(&key) => {
                    given += 1;
                    let Some(text) = r.ok(r.cx.string(vv, &field)) else {
                        continue;
                    };
                    def.at = vv.at;
                    def.path = field;
                    def.source = match key {
                        "file" => SecretSource::File(text),
                        "environment" => SecretSource::Env(text),
                        _ => SecretSource::Content(text),
                    };
                }
                "external" if is_off(vv) => {}
                "external" => {
                    given += 1;
                    r.error(
                        kk.at,
                        &field,
                        format!(
                            "flock has no external {kind}: a stack's {kind} travel with its \
                             deploy; give {name} {} instead",
                            sources.join(": or ") + ":"
                        ),
                    );
                }
                "name" | "labels" | "driver" | "driver_opts" | "template_driver" => r.warn(
                    kk.at,
                    &field,
                    format!("{key} is ignored: the {one} is STACK_{name} in the cluster"),
                ),
                _ if key.starts_with("x-") => {}
                _ => {
                    let mut allowed = sources.clone();
                    allowed.extend(["external", "name", "labels"]);
                    let e =
                        r.cx.unknown_key(kk.at, &path, key, &allowed, &format!("a {one}"));
                    r.problems.errors.push(e);
                }
            }
        }
        if given == 0 {
            r.error(
                k.at,
                &path,
                format!(
                    "{name} gives no value: give {}",
                    sources.join(": or ") + ":"
                ),
            );
        } else if given > 1 {
            r.error(
                k.at,
                &path,
                format!(
                    "{name} gives more than one of {}; give one",
                    sources.join(", ")
                ),
            );
        }
        defs.insert(name, def);
    }
    defs
}

/// The contents of the secrets and configs the services use: a file read beside the compose
/// file, a variable's value, or the content as written.
fn read_secret_contents<'k>(
    r: &mut Report,
    options: &ParseOptions,
    vars: &super::interpolate::Vars,
    tops: &Tops,
    used: impl Iterator<Item = &'k (&'static str, String)>,
) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (kind, name) in used {
        let defs = if *kind == "configs" {
            &tops.configs
        } else {
            &tops.secrets
        };
        let Some(def) = defs.get(name) else { continue };
        let one = if *kind == "configs" {
            "config"
        } else {
            "secret"
        };
        let content = match &def.source {
            SecretSource::File(f) => match (options.read_file)(f) {
                Ok(bytes) => bytes,
                Err(e) => {
                    r.error(
                        def.at,
                        &def.path,
                        format!(
                            "cannot read {}: {e} (a {one}'s file is read beside the compose \
                             file, before anything is deployed)",
                            crate::limits::shown(f)
                        ),
                    );
                    continue;
                }
            },
            SecretSource::Env(var) => match vars.get(var) {
                Some(v) => v.clone().into_bytes(),
                None => {
                    r.error(
                        def.at,
                        &def.path,
                        format!(
                            "variable {var} is not set: set it in the environment or in .env \
                             (its value is the {one} {name})"
                        ),
                    );
                    continue;
                }
            },
            SecretSource::Content(c) => c.clone().into_bytes(),
            SecretSource::None => continue,
        };
        out.insert(name.clone(), content);
    }
    out
}

/// A service's `profiles:`, or `None` when it has none (it always runs).
fn service_profiles(r: &mut Report, y: &Yaml, path: &str) -> Option<Vec<String>> {
    let (_, v) = y.entry("profiles")?;
    let field = child(path, "profiles");
    let items = r.ok(r.cx.list(v, &field))?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        out.push(r.ok(r.cx.string(item, &index(&field, i)))?);
    }
    (!out.is_empty()).then_some(out)
}

/// A link as written, before the service it names is known.
struct PendingLink {
    target: String,
    alias: String,
    at: Pos,
    path: String,
}

/// A dependency as written, before the service it names is known.
struct PendingDep {
    target: String,
    healthy: bool,
    /// `required: false`: a service that is not there (not in an active profile) is no error.
    required: bool,
    /// `condition: service_completed_successfully`: a job that runs first, not a server.
    job: bool,
    at: Pos,
    path: String,
}

/// A service as read.
struct Service {
    spec: AppSpec,
    source: AppSource,
    links: Vec<PendingLink>,
    deps: Vec<PendingDep>,
    /// Its volume's policy, when it has a volume.
    policy: Option<VolumePolicy>,
    /// `build` without `image`: compose's image name is filled in with the stack's.
    built: bool,
    /// The names among its secrets that are configs.
    configs: BTreeSet<String>,
}

type Pending = (String, Vec<PendingLink>, Vec<PendingDep>);

/// Links and dependencies name services that may come later in the file: resolved once all
/// are read. A dependency cycle is refused (nothing of it could start).
fn resolve_links_and_deps(
    r: &mut Report,
    apps: &mut BTreeMap<String, AppSpec>,
    pending: Vec<Pending>,
    inactive: &BTreeMap<String, Vec<String>>,
) {
    let missing = |target: &str, what: &str| match inactive.get(target) {
        Some(profiles) => format!(
            "{target} is only in profile {}, which is not active: activate it (--profile {}) \
             or {what}",
            profiles.join(", "),
            profiles[0]
        ),
        None => format!("{:?} is not a service in this file", target),
    };
    let mut graph: BTreeMap<String, Vec<(String, Pos, String)>> = BTreeMap::new();
    // Services others depend on that no sibling could reach by name: said once each.
    let mut portless: BTreeSet<String> = BTreeSet::new();
    for (name, links, deps) in pending {
        let mut resolved = Vec::new();
        for link in links {
            let Some(target) = apps.get(&link.target) else {
                r.error(
                    link.at,
                    &link.path,
                    missing(&link.target, "remove the link"),
                );
                continue;
            };
            if target.ports.is_empty() {
                r.error(
                    link.at,
                    &link.path,
                    format!(
                        "{} publishes no ports, and a link reaches a service through its \
                         published ports; give {} ports",
                        link.target, link.target
                    ),
                );
                continue;
            }
            for port in &target.ports {
                let new = Link {
                    local_port: port.internal,
                    remote_port: port.external,
                    alias: link.alias.clone(),
                };
                match check_new_link(r.cx, &resolved, &new, link.at, &link.path) {
                    Ok(()) => resolved.push(new),
                    Err(e) => r.problems.errors.push(e),
                }
            }
        }
        let mut depends_on = Vec::new();
        for dep in deps {
            if !apps.contains_key(&dep.target) {
                if dep.required {
                    r.error(
                        dep.at,
                        &dep.path,
                        missing(&dep.target, "remove the dependency"),
                    );
                }
                continue;
            }
            let target = &apps[&dep.target];
            if !dep.job
                && target.ports.is_empty()
                && target.expose.is_empty()
                && portless.insert(dep.target.clone())
            {
                r.warn(
                    dep.at,
                    &dep.path,
                    format!(
                        "{} has no ports or expose, so {name} cannot reach it by name on any \
                         port (flock does not read an image's EXPOSE): give {} `expose: [PORT]` \
                         with the port it listens on",
                        dep.target, dep.target
                    ),
                );
            }
            graph
                .entry(name.clone())
                .or_default()
                .push((dep.target.clone(), dep.at, dep.path));
            depends_on.push(Dependency {
                app: dep.target,
                healthy: dep.healthy,
            });
        }
        if let Some(app) = apps.get_mut(&name) {
            app.links = resolved;
            app.depends_on = depends_on;
        }
    }
    for (cycle, at, path) in cycles(&graph) {
        r.error(
            at,
            &path,
            format!(
                "a dependency cycle: {}; none of them could start first: remove one of these \
                 depends_on",
                cycle.join(" -> ")
            ),
        );
    }
}

/// The dependency cycles of `graph` (service -> (dependency, where written, its field)), each
/// once: its services from the first met, back to it, and where its first edge is written.
fn cycles(graph: &BTreeMap<String, Vec<(String, Pos, String)>>) -> Vec<(Vec<String>, Pos, String)> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit<'g>(
        node: &'g str,
        graph: &'g BTreeMap<String, Vec<(String, Pos, String)>>,
        marks: &mut BTreeMap<&'g str, Mark>,
        stack: &mut Vec<(&'g str, Pos, &'g str)>,
        found: &mut Vec<(Vec<String>, Pos, String)>,
    ) {
        marks.insert(node, Mark::Open);
        for (next, at, path) in graph.get(node).into_iter().flatten() {
            stack.push((node, *at, path));
            match marks.get(next.as_str()).copied().unwrap_or(Mark::New) {
                Mark::New => visit(next, graph, marks, stack, found),
                Mark::Open => {
                    let start = stack.iter().position(|(n, _, _)| *n == next).unwrap_or(0);
                    let mut names: Vec<String> = stack[start..]
                        .iter()
                        .map(|(n, _, _)| n.to_string())
                        .collect();
                    names.push(next.clone());
                    let (_, at, path) = stack[start];
                    found.push((names, at, path.to_string()));
                }
                Mark::Done => {}
            }
            stack.pop();
        }
        marks.insert(node, Mark::Done);
    }
    let mut marks = BTreeMap::new();
    let mut found = Vec::new();
    for node in graph.keys() {
        if marks.get(node.as_str()).copied().unwrap_or(Mark::New) == Mark::New {
            visit(node, graph, &mut marks, &mut Vec::new(), &mut found);
        }
    }
    found
}

/// A named volume is the dataset STACK_NAME, and a service's anonymous volume the dataset
/// named after its app, STACK_SERVICE: a volume named like a service with an anonymous volume
/// would be that service's dataset too.
fn check_dataset_names(
    r: &mut Report,
    apps: &BTreeMap<String, AppSpec>,
    sources: &BTreeMap<String, AppSource>,
) {
    for (name, app) in apps {
        let Some(ds) = app.volume.as_ref().and_then(|v| v.dataset.as_deref()) else {
            continue;
        };
        let other = apps
            .get(ds)
            .filter(|o| o.volume.as_ref().is_some_and(|v| v.dataset.is_none()));
        if let (Some(_), Some(src)) = (other, sources.get(name)) {
            r.error(
                src.at,
                &child("services", name),
                format!(
                    "the volume {ds} has the name of the service {ds}, whose own volume is the \
                     dataset of that name: rename the volume"
                ),
            );
        }
    }
}

/// A service's writable volume, as read.
struct Mount {
    target: String,
    /// The named volume, or `None` for an anonymous one.
    name: Option<String>,
}

fn read_service(
    r: &mut Report,
    options: &ParseOptions,
    tops: &Tops,
    name: &str,
    at: Pos,
    y: &Yaml,
    path: &str,
) -> Option<Service> {
    let cx = r.cx;
    let map = r.ok(cx.mapping(y, path))?;
    for (k, v) in map {
        let key = k.scalar().unwrap_or_default();
        let field = child(path, key);
        if key.starts_with("x-") && key != "x-flock" {
            continue;
        }
        if let Some((_, why)) = IGNORED.iter().find(|(k, _)| *k == key) {
            if !is_off(v) {
                r.warn(k.at, &field, format!("{key} is ignored: {why}"));
            }
            continue;
        }
        if !SERVICE_KEYS.contains(&key) {
            let known = SERVICE_KEYS
                .iter()
                .copied()
                .chain(IGNORED.iter().map(|(k, _)| *k));
            let hint = match known.clone().find(|a| near(a, key)) {
                Some(a) => format!("did you mean {a}? "),
                None => String::new(),
            };
            r.error(
                k.at,
                path,
                format!(
                    "unknown key {}; {hint}a service takes compose's keys (docs/compose.md: Compose \
                     keys)",
                    crate::limits::shown(key)
                ),
            );
            continue;
        }
        if let Some(why) = refusal(key, v) {
            r.error(k.at, &field, why);
        }
    }
    let field = |key: &str| child(path, key);
    let mut spec = AppSpec {
        name: name.to_string(),
        ..Default::default()
    };
    // What to run: an image, one compose would build, or a command (a process).
    let image = get(map, "image").and_then(|v| r.ok(cx.image(v, &field("image"))));
    let mut built = false;
    if let Some((k, v)) = entry(map, "build") {
        if !matches!(v.val, Val::Map(_) | Val::Scalar { .. }) {
            r.error(
                v.at,
                &field("build"),
                "expected a build context (a path) or a mapping",
            );
        } else if let Some(image) = &image {
            r.warn(
                k.at,
                &field("build"),
                format!(
                    "build is ignored: flock does not build images; each node pulls {image} \
                     (push it to a registry, or build and load it on every node)"
                ),
            );
        } else {
            built = true;
            let image = format!("STACK-{}", name.to_lowercase());
            r.warn(
                k.at,
                &field("build"),
                format!(
                    "flock does not build images: the app runs {image} (STACK: the stack's \
                     name), compose's name for the image it builds; build it and load it on \
                     every node (docker build -t {image} CONTEXT; docker save {image} | docker \
                     load), or push it to a registry and give image:"
                ),
            );
        }
    }
    spec.image = image;
    if let Some(v) = get(map, "command") {
        spec.command = r.ok(cx.command(v, &field("command")));
    }
    if spec.image.is_none() && !built && get(map, "command").is_none() {
        r.error(
            at,
            path,
            "missing image (a container image) or command (a process to run)",
        );
    }
    if let Some(v) = get(map, "entrypoint") {
        spec.entrypoint = read_entrypoint(r, v, &field("entrypoint"));
    }
    let mut source = AppSource {
        at,
        ports: Vec::new(),
    };
    if let Some(list) = get(map, "ports") {
        read_ports(r, list, &field("ports"), &mut spec, &mut source);
    }
    if let Some(list) = get(map, "expose") {
        read_expose(r, list, &field("expose"), &mut spec.expose);
    }
    let mut links = Vec::new();
    if let Some(list) = get(map, "links") {
        let links_path = field("links");
        for (i, item) in r
            .ok(cx.list(list, &links_path))
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let item_path = index(&links_path, i);
            let Some(text) = r.ok(cx.string(item, &item_path)) else {
                continue;
            };
            let (target, alias) = match text.split_once(':') {
                Some((t, a)) => (t, a),
                None => (text.as_str(), text.as_str()),
            };
            if let Err(m) = check_alias(alias) {
                r.error(item.at, &item_path, m);
                continue;
            }
            links.push(PendingLink {
                target: target.to_string(),
                alias: alias.to_string(),
                at: item.at,
                path: item_path,
            });
        }
    }
    let mut mount = None;
    if let Some((k, v)) = entry(map, "volumes") {
        let (mounts, binds) = read_volumes(r, options, v, &field("volumes"));
        spec.binds = binds;
        if mounts.len() > 1 {
            let list: Vec<String> = mounts
                .iter()
                .map(|m| match &m.name {
                    Some(n) => format!("{n}:{}", m.target),
                    None => m.target.clone(),
                })
                .collect();
            r.error(
                k.at,
                &field("volumes"),
                format!(
                    "{} writable volumes ({}); flock gives an app one dataset, which moves \
                     with it: keep one (put the data under one directory), or mount host \
                     files read-only (:ro)",
                    mounts.len(),
                    list.join(", ")
                ),
            );
        }
        mount = mounts.into_iter().next();
    }
    let settings = r.ok(volume_settings(cx, map, path));
    let (settings, labels) = settings.unwrap_or_default();
    spec.labels = labels;
    let mut policy = None;
    if let Some(m) = &mount {
        spec.volume = Some(Volume {
            mountpoint: m.target.clone(),
            maximum_size: settings.maximum_size.as_ref().map(|s| s.value),
            dataset: m.name.clone(),
        });
        policy = Some(VolumePolicy {
            retention: settings.retention.as_ref().and_then(|r| r.value),
            replicas: settings.replicas.as_ref().map(|r| r.value),
            snapshot_interval_ms: settings.snapshot_interval.as_ref().map(|i| i.value),
        });
    } else {
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
        if let Some((at, f, what)) = given {
            r.error(
                at,
                &f,
                format!(
                    "{name} has no volume, and {what}: give {name} one (volumes: \
                     [\"/data\"]) or remove this setting"
                ),
            );
        }
    }
    // env_file first, environment over it (compose's order).
    if let Some(v) = get(map, "env_file") {
        spec.environment = read_env_files(r, options, v, &field("env_file"));
    }
    if let Some(v) = get(map, "environment") {
        if let Some(env) = r.ok(cx.environment(v, &field("environment"), true)) {
            spec.environment.extend(env);
        }
    }
    if let Some(v) = get(map, "restart") {
        spec.restart_policy = r
            .ok(read_restart(cx, v, &field("restart")))
            .unwrap_or_default();
    }
    if let Some(v) = get(map, "mem_limit") {
        spec.mem_limit = r.ok(cx.mem_limit(v, &field("mem_limit")));
    }
    if let Some(v) = get(map, "mem_reservation") {
        spec.mem_reservation = r.ok(cx.mem_limit(v, &field("mem_reservation")));
    }
    if let Some(v) = get(map, "cpu_shares") {
        spec.cpu_shares = r.ok(cx.cpu_shares(v, &field("cpu_shares")));
    }
    if let Some(v) = get(map, "cpus") {
        spec.cpu_limit_milli = read_cpus(r, v, &field("cpus")).filter(|m| *m > 0);
    }
    if let Some(v) = get(map, "deploy") {
        read_deploy(r, v, &field("deploy"), &mut spec);
    }
    if let Some(v) = get(map, "scale") {
        if let Some(n) = r.ok(cx.uint(v, &field("scale"))) {
            set_instances(r, v.at, &field("scale"), n, &mut spec);
        }
    }
    let deps = match get(map, "depends_on") {
        Some(v) => read_depends_on(r, v, &field("depends_on")),
        None => Vec::new(),
    };
    if let Some(v) = get(map, "healthcheck") {
        spec.healthcheck = read_healthcheck(r, v, &field("healthcheck"));
    }
    let text =
        |r: &mut Report, key: &str| get(map, key).and_then(|v| r.ok(cx.string(v, &field(key))));
    spec.user = text(r, "user");
    spec.working_dir = text(r, "working_dir");
    spec.hostname = text(r, "hostname");
    spec.stop_signal = text(r, "stop_signal");
    if let Some(v) = get(map, "stop_grace_period") {
        spec.stop_grace_ms = read_duration(r, v, &field("stop_grace_period"));
    }
    if let Some(v) = get(map, "ulimits") {
        spec.ulimits = read_ulimits(r, v, &field("ulimits"));
    }
    if let Some(v) = get(map, "shm_size") {
        spec.shm_size = r.ok(cx.size(v, &field("shm_size")));
    }
    let mut configs = BTreeSet::new();
    for kind in ["secrets", "configs"] {
        if let Some(v) = get(map, kind) {
            for m in read_service_secrets(r, tops, v, &field(kind), kind) {
                if spec.secrets.iter().any(|s| s.target == m.target) {
                    r.error(
                        v.at,
                        &field(kind),
                        format!("two secrets or configs are mounted at {}", m.target),
                    );
                }
                if kind == "configs" {
                    configs.insert(m.secret.clone());
                }
                spec.secrets.push(m);
            }
        }
    }
    for key in ["network_mode", "net", "pid", "ipc"] {
        if let Some((k, v)) = entry(map, key) {
            namespace_mode(r, key, k.at, v, &field(key));
        }
    }
    if let Some((k, v)) = entry(map, "networks") {
        read_service_networks(r, k.at, v, &field("networks"));
    }
    if spec.instances.is_some() && spec.volume.is_some() {
        r.error(
            at,
            path,
            "it has a volume and more than one instance (scale or deploy.replicas): a dataset \
             has one writer, so only services without a volume scale; give 1 instance, or \
             move the state out of the service",
        );
    }
    Some(Service {
        spec,
        source,
        links,
        deps,
        policy,
        built,
        configs,
    })
}

/// Why `key` with value `v` is refused, if it is: what it asks would be lost or broken.
fn refusal(key: &str, v: &Yaml) -> Option<String> {
    let why = match key {
        "cap_add" if !is_off(v) => {
            "cap_add gives the app kernel capabilities, which flock does not grant (it runs \
             apps with Docker's default capabilities): remove cap_add"
        }
        "privileged" if !is_off(v) => {
            "a privileged app has the whole node, which flock does not give: remove privileged"
        }
        "devices" if !is_off(v) => {
            "devices are a node's hardware, which does not move with the app: remove devices"
        }
        "gpus" if !is_off(v) => "flock does not place apps by GPU: remove gpus",
        "volumes_from" if !is_off(v) => {
            "volumes_from shares another container's volumes, which flock does not do: give \
             the services one named volume instead (a named volume used by several services \
             is one dataset, and they run on one node)"
        }
        "extends" => {
            "extends takes keys from another service or file, which flock does not read: write \
             the keys into this service"
        }
        "use_api_socket" if !is_off(v) => {
            "the Docker API of a node is not given to apps: remove use_api_socket"
        }
        _ => return None,
    };
    Some(why.to_string())
}

/// `network_mode` (or fig's `net`), `pid` and `ipc`: the node's (`host`) or another
/// container's (`service:X`, `container:X`) namespaces are refused (they bypass the mesh, or
/// tie the app to a container on one node); other values are Docker's defaults or close
/// enough, ignored with a warning.
fn namespace_mode(r: &mut Report, key: &str, at: Pos, v: &Yaml, path: &str) {
    let Some(mode) = r.ok(r.cx.string(v, path)) else {
        return;
    };
    let shared = mode == "host" || mode.starts_with("service:") || mode.starts_with("container:");
    if shared {
        let why = match key {
            "network_mode" | "net" => {
                "the app would use that network instead of the mesh, which publishes its ports \
                 on every node and lets its siblings reach it by name: remove it and give ports:"
            }
            "pid" => "the app would see those processes, which stay on one node: remove pid",
            _ => "the app would share that memory, which stays on one node: remove ipc",
        };
        r.error(at, path, format!("{key}: {mode} is refused: {why}"));
    } else if !matches!(mode.as_str(), "bridge" | "default" | "private" | "") {
        r.warn(
            at,
            path,
            format!("{key}: {mode} is ignored: the app gets Docker's default"),
        );
    }
}

/// A service's `networks`: ignored, with what is lost named (aliases, fixed addresses).
fn read_service_networks(r: &mut Report, at: Pos, v: &Yaml, path: &str) {
    let mut aliases = Vec::new();
    if let Val::Map(entries) = &v.val {
        for (_, net) in entries {
            if let Some(Val::Seq(items)) = net.get("aliases").map(|a| &a.val) {
                aliases.extend(items.iter().filter_map(|i| i.scalar().map(String::from)));
            }
        }
    }
    if is_off(v) {
        return;
    }
    let lost = if aliases.is_empty() {
        String::new()
    } else {
        format!(" (not by the aliases {})", aliases.join(", "))
    };
    r.warn(
        at,
        path,
        format!("networks is ignored: services reach each other by name on any node{lost}"),
    );
}

/// `scale` or `deploy.replicas`: how many instances of the service run.
fn set_instances(r: &mut Report, at: Pos, path: &str, n: u64, spec: &mut AppSpec) {
    if n == 0 {
        r.error(
            at,
            path,
            "0 instances: flock runs at least one; remove the service, or give 1 or more",
        );
        return;
    }
    if n > crate::limits::MAX_INSTANCES as u64 {
        r.error(
            at,
            path,
            format!(
                "{n} instances: the most is {}",
                crate::limits::MAX_INSTANCES
            ),
        );
        return;
    }
    spec.instances = (n > 1).then_some(n as u32);
}

/// `entrypoint`: a list of words, or a string split as a shell splits words; empty (`[]` or
/// `""`) clears the image's entrypoint, as in compose.
fn read_entrypoint(r: &mut Report, v: &Yaml, path: &str) -> Option<Vec<String>> {
    match &v.val {
        Val::Seq(items) if items.is_empty() => Some(Vec::new()),
        Val::Scalar { text, .. } if text.trim().is_empty() => Some(Vec::new()),
        _ => r.ok(r.cx.command(v, path)),
    }
}

/// `cpus: 0.5` (or `"1.5"`): thousandths of a cpu.
fn read_cpus(r: &mut Report, v: &Yaml, path: &str) -> Option<u64> {
    let text = r.ok(r.cx.string(v, path))?;
    match text.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Some((n * 1000.0).round() as u64),
        _ => {
            r.error(
                v.at,
                path,
                format!(
                    "{} is not a number of cpus (0.5, 2)",
                    crate::limits::shown(&text)
                ),
            );
            None
        }
    }
}

fn read_duration(r: &mut Report, v: &Yaml, path: &str) -> Option<u64> {
    let text = r.ok(r.cx.string(v, path))?;
    match duration_ms(&text) {
        Ok(ms) => Some(ms),
        Err(m) => {
            r.error(v.at, path, m);
            None
        }
    }
}

/// `"EXTERNAL:INTERNAL"` and compose's long form publish a port through the mesh; a port
/// without its external side (compose publishes it on a random port) or bound to the
/// loopback address (only the node reaches it) is not published but exposed to the siblings,
/// with a warning.
fn read_ports(r: &mut Report, list: &Yaml, path: &str, spec: &mut AppSpec, source: &mut AppSource) {
    let Some(items) = r.ok(r.cx.list(list, path)) else {
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let item_path = index(path, i);
        match r.ok(read_port(r.cx, item, &item_path)) {
            Some(PortRead::Publish(port, ext_at)) => {
                if let Some(j) = spec.ports.iter().position(|p| p.external == port.external) {
                    r.error(
                        ext_at,
                        &item_path,
                        format!(
                            "external port {} is already published by {}",
                            port.external,
                            index(path, j)
                        ),
                    );
                    continue;
                }
                spec.ports.push(port);
                source.ports.push((ext_at, item_path));
            }
            Some(PortRead::Expose(port, why)) => {
                r.warn(item.at, &item_path, why);
                if !spec.expose.contains(&port) {
                    spec.expose.push(port);
                }
            }
            None => {}
        }
    }
}

enum PortRead {
    /// Published, and where the external port is written.
    Publish(PortMap, Pos),
    /// Not published, reached by the siblings; the warning.
    Expose(u16, String),
}

/// `expose: ["3000", 3000, "3000/tcp", "8000-8002"]`: ports siblings reach by the service's
/// name. UDP ones are ignored with a warning (the mesh carries TCP).
fn read_expose(r: &mut Report, list: &Yaml, path: &str, out: &mut Vec<u16>) {
    let Some(items) = r.ok(r.cx.list(list, path)) else {
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let item_path = index(path, i);
        let Some(text) = r.ok(r.cx.string(item, &item_path)) else {
            continue;
        };
        let spec = match text.split_once('/') {
            None | Some((_, "tcp")) => text.split('/').next().unwrap_or_default(),
            Some((_, proto)) => {
                r.warn(
                    item.at,
                    &item_path,
                    format!("{proto} is ignored: the mesh carries tcp"),
                );
                continue;
            }
        };
        let range = match spec.split_once('-') {
            Some((a, b)) => port_number(a).zip(port_number(b)).filter(|(a, b)| a <= b),
            None => port_number(spec).map(|p| (p, p)),
        };
        match range {
            Some((a, b)) => {
                for p in a..=b {
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
            }
            None => r.error(
                item.at,
                &item_path,
                format!(
                    "{} is not a port (1 to 65535, or a range 8000-8002)",
                    crate::limits::shown(&text)
                ),
            ),
        }
    }
}

/// `"EXTERNAL:INTERNAL"` (optionally `/tcp`, or `IP:EXTERNAL:INTERNAL` with `0.0.0.0` or a
/// loopback address), or compose's long form `{target, published, host_ip, protocol, mode}`.
fn read_port(cx: Ctx, y: &Yaml, path: &str) -> Result<PortRead, ConfigError> {
    let form = "write \"EXTERNAL:INTERNAL\", as \"8080:80\"";
    let unpublished = |internal: u16| {
        PortRead::Expose(
            internal,
            format!(
                "port {internal} is not published (compose would publish it on a random \
                 port): its siblings reach it by the service's name; write \
                 \"{internal}:{internal}\" to publish it on every node"
            ),
        )
    };
    let loopback = |ip: &str, internal: u16| {
        PortRead::Expose(
            internal,
            format!(
                "port {internal} is bound to {ip}, which only its node reaches: flock does not \
                 publish it (the mesh publishes a port on every node); its siblings reach it \
                 by the service's name"
            ),
        )
    };
    let is_loopback = |ip: &str| ip.starts_with("127.") || ip == "::1" || ip == "[::1]";
    let is_any = |ip: &str| matches!(ip, "0.0.0.0" | "::" | "[::]" | "");
    match &y.val {
        Val::Map(map) => {
            cx.check_keys(
                map,
                path,
                &[
                    "target",
                    "published",
                    "protocol",
                    "host_ip",
                    "mode",
                    "name",
                    "app_protocol",
                ],
                "a port",
            )?;
            if let Some(p) = get(map, "protocol") {
                if p.scalar() != Some("tcp") {
                    return Err(cx.err(
                        p.at,
                        &child(path, "protocol"),
                        "only tcp ports are supported (the mesh carries tcp)",
                    ));
                }
            }
            let hint = " (a port is {target: PORT_IN_APP, published: PUBLISHED_PORT})";
            let target = cx.required(map, y.at, path, "target", hint)?;
            let internal = cx.port(target, &child(path, "target"))?;
            let ip = get(map, "host_ip").and_then(Yaml::scalar).unwrap_or("");
            let Some(published) = get(map, "published").filter(|p| !p.is_null()) else {
                return Ok(unpublished(internal));
            };
            let external = cx.port(published, &child(path, "published"))?;
            if is_loopback(ip) {
                return Ok(loopback(ip, internal));
            }
            if !is_any(ip) {
                return Err(cx.err(
                    y.at,
                    path,
                    format!("binding to {ip} is not supported (the mesh publishes a port on every node); leave host_ip out"),
                ));
            }
            Ok(PortRead::Publish(
                PortMap { internal, external },
                published.at,
            ))
        }
        Val::Scalar { text, .. } if !y.is_null() => {
            let shown = crate::limits::shown(text);
            let spec = match text.split_once('/') {
                Some((s, "tcp")) => s,
                Some((_, proto)) => {
                    return Err(cx.err(
                        y.at,
                        path,
                        format!(
                        "{shown}: only tcp ports are supported, not {proto} (the mesh carries tcp)"
                    ),
                    ))
                }
                None => text.as_str(),
            };
            if spec.contains('-') {
                return Err(cx.err(
                    y.at,
                    path,
                    format!("{shown}: port ranges are not supported; list each port"),
                ));
            }
            // IPv6 addresses in brackets hold colons.
            let (ip, rest) = match spec.strip_prefix('[').and_then(|s| s.split_once("]:")) {
                Some((ip, rest)) => (Some(ip), rest),
                None => match spec.matches(':').count() {
                    2 => {
                        let (ip, rest) = spec.split_once(':').unwrap_or_default();
                        (Some(ip), rest)
                    }
                    _ => (None, spec),
                },
            };
            let parts: Vec<&str> = rest.split(':').collect();
            let bad = || {
                cx.err(
                    y.at,
                    path,
                    format!("{shown} is not a port mapping (ports are 1 to 65535); {form}"),
                )
            };
            match (ip, parts.as_slice()) {
                (None, [internal]) => port_number(internal).map(unpublished).ok_or_else(bad),
                (ip, [external, internal]) => {
                    let (Some(internal), external) = (port_number(internal), *external) else {
                        return Err(bad());
                    };
                    let ip = ip.unwrap_or("");
                    if is_loopback(ip) {
                        return Ok(loopback(ip, internal));
                    }
                    if !is_any(ip) {
                        return Err(cx.err(
                            y.at,
                            path,
                            format!("{shown}: binding to one address is not supported (the mesh publishes a port on every node); {form}"),
                        ));
                    }
                    if external.is_empty() {
                        return Ok(unpublished(internal));
                    }
                    let external = port_number(external).ok_or_else(bad)?;
                    Ok(PortRead::Publish(PortMap { internal, external }, y.at))
                }
                _ => Err(bad()),
            }
        }
        _ => Err(cx.err(
            y.at,
            path,
            format!("expected a port mapping, found {}; {form}", y.describe()),
        )),
    }
}

/// Mount options compose accepts after a volume's target (`:ro`, `:rw,z`, `:nocopy`...).
const VOLUME_OPTIONS: &[&str] = &[
    "ro",
    "rw",
    "z",
    "Z",
    "nocopy",
    "cached",
    "delegated",
    "consistent",
    "shared",
    "slave",
    "private",
    "rshared",
    "rslave",
    "rprivate",
];

/// `volumes:`, short (`"/path"`, `"NAME:/path[:ro]"`, `"./host:/path:ro"`) or long
/// (`{type, source, target, read_only}`): the writable volumes (anonymous or named: one
/// dataset is allowed, checked by the caller) and the read-only host paths. A writable host
/// directory is refused: its data stays on one node's disk.
fn read_volumes(
    r: &mut Report,
    options: &ParseOptions,
    y: &Yaml,
    path: &str,
) -> (Vec<Mount>, Vec<BindMount>) {
    let mut mounts = Vec::new();
    let mut binds = Vec::new();
    let Some(items) = r.ok(r.cx.list(y, path)) else {
        return (mounts, binds);
    };
    for (i, item) in items.iter().enumerate() {
        let item_path = index(path, i);
        let Some(v) = read_volume(r, item, &item_path) else {
            continue;
        };
        let target = match normalize_mountpoint(&v.target) {
            Ok(t) => t,
            Err(m) => {
                r.error(item.at, &item_path, m);
                continue;
            }
        };
        match v.kind {
            VolumeKind::Tmpfs => r.warn(
                item.at,
                &item_path,
                format!(
                    "tmpfs {target} is ignored: the path is in the app's own writable layer, \
                     not in memory (and not kept)"
                ),
            ),
            VolumeKind::Volume(name) => {
                if let Some(n) = &name {
                    if n.is_empty() {
                        r.error(
                            item.at,
                            &item_path,
                            format!(
                                "nothing before :{target} (is a variable unset?); write \
                                 NAME:{target} for a named volume, or {target} alone"
                            ),
                        );
                        continue;
                    }
                    if let Err(m) = check_app_name(n) {
                        r.error(
                            item.at,
                            &item_path,
                            m.replace("the application name", "the volume name"),
                        );
                        continue;
                    }
                }
                if v.read_only {
                    r.warn(
                        item.at,
                        &item_path,
                        format!(
                            "{target} is mounted read-write: flock mounts an app's dataset \
                             writable"
                        ),
                    );
                }
                mounts.push(Mount { target, name });
            }
            VolumeKind::Bind(source) => {
                if !v.read_only {
                    r.error(
                        item.at,
                        &item_path,
                        format!(
                            "{} is a writable host directory: data written there stays on one \
                             node's disk and does not move with the app; use a named volume \
                             (NAME:{target}, one dataset that moves with the app), or mount it \
                             read-only ({source}:{target}:ro)",
                            crate::limits::shown(&source)
                        ),
                    );
                    continue;
                }
                let Some(abs) = absolute_source(r, options, &source, item.at, &item_path) else {
                    continue;
                };
                if abs.ends_with("/docker.sock") {
                    r.error(
                        item.at,
                        &item_path,
                        format!(
                            "{abs} is the node's Docker API, which is not given to apps (read-only \
                             or not, it lets the app start and stop the node's containers, \
                             flock's among them): remove it"
                        ),
                    );
                    continue;
                }
                r.warn(
                    item.at,
                    &item_path,
                    format!(
                        "{abs} is mounted from the node's disk: it must exist on every node \
                         the app may run on, and does not move with the app"
                    ),
                );
                binds.push(BindMount {
                    source: abs,
                    target,
                });
            }
        }
    }
    (mounts, binds)
}

enum VolumeKind {
    /// A named volume, or an anonymous one (`None`).
    Volume(Option<String>),
    /// A host path, as written.
    Bind(String),
    Tmpfs,
}

struct VolumeRead {
    kind: VolumeKind,
    target: String,
    read_only: bool,
}

fn read_volume(r: &mut Report, item: &Yaml, path: &str) -> Option<VolumeRead> {
    let cx = r.cx;
    if let Val::Map(map) = &item.val {
        let keys = [
            "type",
            "source",
            "target",
            "read_only",
            "bind",
            "volume",
            "tmpfs",
            "consistency",
        ];
        r.ok(cx.check_keys(map, path, &keys, "a volume"))?;
        let text = |r: &mut Report, key: &str| {
            get(map, key).and_then(|v| r.ok(cx.string(v, &child(path, key))))
        };
        let kind = text(r, "type").unwrap_or_else(|| "volume".into());
        let source = text(r, "source");
        let target = text(r, "target");
        let Some(target) = target else {
            r.error(item.at, path, "missing target (the path in the app)");
            return None;
        };
        let read_only = get(map, "read_only").is_some_and(is_true);
        let kind = match kind.as_str() {
            "volume" => VolumeKind::Volume(source),
            "bind" => match source {
                Some(s) => VolumeKind::Bind(s),
                None => {
                    r.error(
                        item.at,
                        path,
                        "missing source (the host path of the bind mount)",
                    );
                    return None;
                }
            },
            "tmpfs" => VolumeKind::Tmpfs,
            other => {
                r.error(
                    item.at,
                    &child(path, "type"),
                    format!(
                        "{} volumes are not supported: use volume, bind (read-only) or tmpfs",
                        crate::limits::shown(other)
                    ),
                );
                return None;
            }
        };
        return Some(VolumeRead {
            kind,
            target,
            read_only,
        });
    }
    let text = r.ok(cx.string(item, path))?;
    let mut parts: Vec<&str> = text.split(':').collect();
    let mut read_only = false;
    if parts.len() > 1 {
        let last = parts[parts.len() - 1];
        if last.split(',').all(|o| VOLUME_OPTIONS.contains(&o)) {
            read_only = last.split(',').any(|o| o == "ro");
            parts.pop();
        }
    }
    match parts.as_slice() {
        [target] => Some(VolumeRead {
            kind: VolumeKind::Volume(None),
            target: target.to_string(),
            read_only,
        }),
        [source, target] => {
            let kind = if is_host_path(source) {
                VolumeKind::Bind(source.to_string())
            } else {
                VolumeKind::Volume(Some(source.to_string()))
            };
            Some(VolumeRead {
                kind,
                target: target.to_string(),
                read_only,
            })
        }
        _ => {
            r.error(
                item.at,
                path,
                format!(
                    "{} is not a volume; write \"/path\", \"NAME:/path\" or \
                     \"/host/path:/path:ro\"",
                    crate::limits::shown(&text)
                ),
            );
            None
        }
    }
}

fn is_host_path(source: &str) -> bool {
    source.starts_with(['/', '.', '~'])
}

/// A bind mount's host path, absolute: relative ones are against the compose file's
/// directory, `~` is the client's HOME (as compose reads them).
fn absolute_source(
    r: &mut Report,
    options: &ParseOptions,
    source: &str,
    at: Pos,
    path: &str,
) -> Option<String> {
    if source.starts_with('/') {
        return Some(normalize_host_path(source));
    }
    if let Some(rest) = source.strip_prefix('~') {
        let home = options.vars.and_then(|v| v.get("HOME"));
        return match home {
            Some(h) if rest.is_empty() || rest.starts_with('/') => {
                Some(normalize_host_path(&format!("{h}{rest}")))
            }
            _ => {
                r.error(
                    at,
                    path,
                    format!("{source}: HOME is not known here; write the path out"),
                );
                None
            }
        };
    }
    match options.dir {
        Some(dir) => Some(normalize_host_path(&format!("{dir}/{source}"))),
        None => {
            r.error(
                at,
                path,
                format!("{source} is relative to the compose file's directory, which is not known here; write an absolute path"),
            );
            None
        }
    }
}

/// `/a/./b/../c/` -> `/a/c`.
fn normalize_host_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            _ => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `env_file: F`, `[F, ...]` or `[{path: F, required: false}]`: NAME=VALUE files read beside
/// the compose file, the later over the earlier. A required file that cannot be read is an
/// error (compose's too).
fn read_env_files(
    r: &mut Report,
    options: &ParseOptions,
    v: &Yaml,
    path: &str,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let one = [v.clone()];
    let items: &[Yaml] = match &v.val {
        Val::Seq(items) => items,
        _ => &one,
    };
    for (i, item) in items.iter().enumerate() {
        let item_path = if matches!(v.val, Val::Seq(_)) {
            index(path, i)
        } else {
            path.to_string()
        };
        let (file, required, at) = match &item.val {
            Val::Map(map) => {
                if r.ok(r.cx.check_keys(
                    map,
                    &item_path,
                    &["path", "required", "format"],
                    "an env_file",
                ))
                .is_none()
                {
                    continue;
                }
                let Some(p) = get(map, "path") else {
                    r.error(
                        item.at,
                        &item_path,
                        "missing path (the file of NAME=VALUE lines)",
                    );
                    continue;
                };
                let Some(file) = r.ok(r.cx.string(p, &child(&item_path, "path"))) else {
                    continue;
                };
                let required = !get(map, "required").is_some_and(is_off);
                (file, required, p.at)
            }
            _ => match r.ok(r.cx.string(item, &item_path)) {
                Some(f) => (f, true, item.at),
                None => continue,
            },
        };
        let bytes = match (options.read_file)(&file) {
            Ok(b) => b,
            Err(_) if !required => continue,
            Err(e) => {
                r.error(
                    at,
                    &item_path,
                    format!(
                        "cannot read {}: {e} (env_file is read beside the compose file; create \
                         it, or give {{path: {file}, required: false}})",
                        crate::limits::shown(&file)
                    ),
                );
                continue;
            }
        };
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => {
                r.error(
                    at,
                    &item_path,
                    format!("{}: not UTF-8 text", crate::limits::shown(&file)),
                );
                continue;
            }
        };
        match super::interpolate::parse_env_file(&text) {
            Ok(vars) => env.extend(vars),
            Err(m) => r.error(
                at,
                &item_path,
                format!("{}: {m}", crate::limits::shown(&file)),
            ),
        }
    }
    env
}

/// `depends_on: [a, b]` or `{a: {condition: service_healthy, required: false}}`.
fn read_depends_on(r: &mut Report, v: &Yaml, path: &str) -> Vec<PendingDep> {
    let mut deps = Vec::new();
    match &v.val {
        Val::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_path = index(path, i);
                if let Some(target) = r.ok(r.cx.string(item, &item_path)) {
                    deps.push(PendingDep {
                        target,
                        healthy: false,
                        required: true,
                        job: false,
                        at: item.at,
                        path: item_path,
                    });
                }
            }
        }
        Val::Map(entries) => {
            for (k, dv) in entries {
                let target = k.scalar().unwrap_or_default().to_string();
                let item_path = child(path, &target);
                let mut dep = PendingDep {
                    target,
                    healthy: false,
                    required: true,
                    job: false,
                    at: k.at,
                    path: item_path.clone(),
                };
                if !dv.is_null() {
                    let Some(map) = r.ok(r.cx.mapping(dv, &item_path)) else {
                        continue;
                    };
                    if r.ok(r.cx.check_keys(
                        map,
                        &item_path,
                        &["condition", "required", "restart"],
                        "a dependency",
                    ))
                    .is_none()
                    {
                        continue;
                    }
                    if let Some(c) = get(map, "condition") {
                        let cpath = child(&item_path, "condition");
                        match c.scalar().unwrap_or_default() {
                            "service_started" => {}
                            "service_healthy" => dep.healthy = true,
                            "service_completed_successfully" => {
                                dep.job = true;
                                r.warn(
                                    c.at,
                                    &cpath,
                                    format!(
                                    "service_completed_successfully is taken as service_started: \
                                     flock starts this app once {} has started, not after it \
                                     has exited",
                                    dep.target
                                ),
                                );
                            }
                            other => r.error(
                                c.at,
                                &cpath,
                                format!(
                                    "{} is not a condition (use service_started, \
                                     service_healthy or service_completed_successfully)",
                                    crate::limits::shown(other)
                                ),
                            ),
                        }
                    }
                    if let Some(req) = get(map, "required") {
                        dep.required = !is_off(req);
                    }
                    if let Some((rk, rv)) = entry(map, "restart") {
                        if is_true(rv) {
                            r.warn(
                                rk.at,
                                &child(&item_path, "restart"),
                                format!(
                                    "restart is ignored: this app is not restarted when {} is",
                                    dep.target
                                ),
                            );
                        }
                    }
                }
                deps.push(dep);
            }
        }
        _ => r.error(
            v.at,
            path,
            format!(
                "expected a list of services or a mapping of services to {{condition: ...}}, \
                 found {}",
                v.describe()
            ),
        ),
    }
    deps
}

/// `healthcheck: {test, interval, timeout, retries, start_period, disable}`.
fn read_healthcheck(r: &mut Report, v: &Yaml, path: &str) -> Option<HealthCheck> {
    let cx = r.cx;
    let map = r.ok(cx.mapping(v, path))?;
    let keys = [
        "test",
        "interval",
        "timeout",
        "retries",
        "start_period",
        "start_interval",
        "disable",
    ];
    r.ok(cx.check_keys(map, path, &keys, "a healthcheck"))?;
    let mut hc = HealthCheck::default();
    if let Some(t) = get(map, "test") {
        let tpath = child(path, "test");
        match &t.val {
            Val::Scalar { text, .. } if !t.is_null() => {
                hc.test = vec!["CMD-SHELL".into(), text.clone()];
            }
            Val::Seq(_) => {
                let words = r.ok(cx.command(t, &tpath))?;
                match words[0].as_str() {
                    "NONE" => hc.disable = true,
                    "CMD" | "CMD-SHELL" if words.len() > 1 => hc.test = words,
                    "CMD" | "CMD-SHELL" => {
                        r.error(t.at, &tpath, format!("{} without a command", words[0]));
                    }
                    other => r.error(
                        t.at,
                        &tpath,
                        format!(
                            "a test list starts with CMD, CMD-SHELL or NONE, not {}; write \
                             [\"CMD\", \"{other}\", ...] or a string (run by the shell)",
                            crate::limits::shown(other)
                        ),
                    ),
                }
            }
            _ => r.error(t.at, &tpath, "expected a command (a string or a list)"),
        }
    }
    for (key, slot) in [
        ("interval", &mut hc.interval_ms),
        ("timeout", &mut hc.timeout_ms),
        ("start_period", &mut hc.start_period_ms),
    ] {
        if let Some(d) = get(map, key) {
            *slot = read_duration(r, d, &child(path, key));
        }
    }
    if let Some((k, _)) = entry(map, "start_interval") {
        r.warn(
            k.at,
            &child(path, "start_interval"),
            "start_interval is ignored: the check runs every interval from the start",
        );
    }
    if let Some(n) = get(map, "retries") {
        let field = child(path, "retries");
        hc.retries = r.ok(cx.uint(n, &field)).and_then(|n| u32::try_from(n).ok());
    }
    if let Some(d) = get(map, "disable") {
        hc.disable |= is_true(d);
    }
    Some(hc)
}

/// `ulimits: {nofile: 65536, nproc: {soft: 1024, hard: 2048}}`.
fn read_ulimits(r: &mut Report, v: &Yaml, path: &str) -> Vec<Ulimit> {
    let mut out = Vec::new();
    let Some(map) = r.ok(r.cx.mapping(v, path)) else {
        return out;
    };
    let int = |r: &mut Report, y: &Yaml, p: &str| -> Option<i64> {
        match y.scalar().map(|t| t.parse::<i64>()) {
            Some(Ok(n)) => Some(n),
            _ => {
                r.error(
                    y.at,
                    p,
                    format!("expected a whole number, found {}", y.describe()),
                );
                None
            }
        }
    };
    for (k, lim) in map {
        let name = k.scalar().unwrap_or_default().to_string();
        let lpath = child(path, &name);
        let (soft, hard) = match &lim.val {
            Val::Map(m) => {
                if r.ok(r.cx.check_keys(m, &lpath, &["soft", "hard"], "a ulimit"))
                    .is_none()
                {
                    continue;
                }
                let (Some(s), Some(h)) = (get(m, "soft"), get(m, "hard")) else {
                    r.error(lim.at, &lpath, "give both soft and hard");
                    continue;
                };
                let (Some(s), Some(h)) = (
                    int(r, s, &child(&lpath, "soft")),
                    int(r, h, &child(&lpath, "hard")),
                ) else {
                    continue;
                };
                (s, h)
            }
            _ => match int(r, lim, &lpath) {
                Some(n) => (n, n),
                None => continue,
            },
        };
        if soft > hard && hard >= 0 {
            r.error(lim.at, &lpath, format!("soft {soft} is above hard {hard}"));
            continue;
        }
        out.push(Ulimit { name, soft, hard });
    }
    out
}

/// A service's `secrets:` or `configs:` (`kind`): `- NAME` or `{source, target, mode, uid,
/// gid}`, each defined at the top level.
fn read_service_secrets(
    r: &mut Report,
    tops: &Tops,
    v: &Yaml,
    path: &str,
    kind: &str,
) -> Vec<SecretMount> {
    let mut out = Vec::new();
    let Some(items) = r.ok(r.cx.list(v, path)) else {
        return out;
    };
    let defs = if kind == "configs" {
        &tops.configs
    } else {
        &tops.secrets
    };
    for (i, item) in items.iter().enumerate() {
        let item_path = index(path, i);
        let (source, target, mode) = match &item.val {
            Val::Map(map) => {
                let keys = ["source", "target", "mode", "uid", "gid"];
                if r.ok(r.cx.check_keys(map, &item_path, &keys, "a secret"))
                    .is_none()
                {
                    continue;
                }
                let Some(s) = get(map, "source") else {
                    r.error(
                        item.at,
                        &item_path,
                        format!("missing source (the name in the file's {kind}:)"),
                    );
                    continue;
                };
                let Some(source) = r.ok(r.cx.string(s, &child(&item_path, "source"))) else {
                    continue;
                };
                let target = get(map, "target")
                    .and_then(|t| r.ok(r.cx.string(t, &child(&item_path, "target"))));
                let mode = match get(map, "mode") {
                    Some(m) => match parse_mode(m.scalar().unwrap_or_default()) {
                        Some(mode) => Some(mode),
                        None => {
                            r.error(
                                m.at,
                                &child(&item_path, "mode"),
                                format!("{} is not a file mode (0440)", m.describe()),
                            );
                            continue;
                        }
                    },
                    None => None,
                };
                for key in ["uid", "gid"] {
                    if let Some((k, _)) = entry(map, key) {
                        r.warn(
                            k.at,
                            &child(&item_path, key),
                            format!("{key} is ignored: the file belongs to root, readable as its mode says"),
                        );
                    }
                }
                (source, target, mode)
            }
            _ => match r.ok(r.cx.string(item, &item_path)) {
                Some(s) => (s, None, None),
                None => continue,
            },
        };
        if !defs.contains_key(&source) {
            let names: Vec<&str> = defs.keys().map(String::as_str).collect();
            r.error(
                item.at,
                &item_path,
                format!(
                    "{} is not in the file's {kind}: ({}); define it there with file: or \
                     environment:",
                    crate::limits::shown(&source),
                    if names.is_empty() {
                        "there are none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            );
            continue;
        }
        let target = match target {
            Some(t) if t.starts_with('/') => t,
            Some(t) if kind == "secrets" => format!("/run/secrets/{t}"),
            Some(t) => format!("/{t}"),
            None if kind == "secrets" => format!("/run/secrets/{source}"),
            None => format!("/{source}"),
        };
        let target = match normalize_mountpoint(&target) {
            Ok(t) => t,
            Err(m) => {
                r.error(item.at, &item_path, m);
                continue;
            }
        };
        out.push(SecretMount {
            secret: source,
            target,
            mode: mode.unwrap_or(0o444),
        });
    }
    out
}

/// A file mode as compose files write it: octal with a leading 0 (`0440`, `0o440`), else
/// decimal (`288`, what YAML 1.1 makes of 0440).
fn parse_mode(text: &str) -> Option<u32> {
    let mode = if let Some(o) = text.strip_prefix("0o") {
        u32::from_str_radix(o, 8).ok()?
    } else if text.len() > 1 && text.starts_with('0') {
        u32::from_str_radix(&text[1..], 8).ok()?
    } else {
        text.parse().ok()?
    };
    (mode <= 0o7777).then_some(mode)
}

/// `deploy:` as `docker stack deploy` reads it: placement constraints, resources, the restart
/// policy; one replica; Swarm's rollout settings ignored with a warning.
fn read_deploy(r: &mut Report, y: &Yaml, path: &str, spec: &mut AppSpec) {
    let cx = r.cx;
    let Some(map) = r.ok(cx.mapping(y, path)) else {
        return;
    };
    for (k, v) in map {
        let key = k.scalar().unwrap_or_default();
        let field = child(path, key);
        match key {
            "placement" => read_placement(r, v, &field, spec),
            "resources" => read_resources(r, v, &field, spec),
            "restart_policy" => {
                if let Some(p) = read_restart_policy(r, v, &field) {
                    spec.restart_policy = p;
                }
            }
            "replicas" => {
                if let Some(n) = r.ok(cx.uint(v, &field)) {
                    set_instances(r, v.at, &field, n, spec);
                }
            }
            "mode" => match v.scalar().unwrap_or_default() {
                "replicated" | "replicated-job" => {}
                "global" | "global-job" => r.error(
                    v.at,
                    &field,
                    "global runs one container on every node, which flock does not do (an app \
                     runs on one node): remove mode, for one replica",
                ),
                other => r.error(
                    v.at,
                    &field,
                    format!("{} is not a mode (replicated or global)", crate::limits::shown(other)),
                ),
            },
            "update_config" | "rollback_config" => r.warn(
                k.at,
                &field,
                format!("{key} is ignored: flock replaces an app by stopping it, then starting the new one"),
            ),
            "labels" => r.warn(
                k.at,
                &field,
                "labels is ignored: they are Swarm's service labels (the container's are the service's labels:)",
            ),
            "endpoint_mode" => r.warn(
                k.at,
                &field,
                "endpoint_mode is ignored: siblings reach the app through the mesh by its name",
            ),
            _ if key.starts_with("x-") => {}
            _ => {
                let allowed = [
                    "placement", "resources", "restart_policy", "replicas", "mode",
                    "update_config", "rollback_config", "labels", "endpoint_mode",
                ];
                let e = cx.unknown_key(k.at, path, key, &allowed, "deploy");
                r.problems.errors.push(e);
            }
        }
    }
}

fn read_placement(r: &mut Report, v: &Yaml, path: &str, spec: &mut AppSpec) {
    let cx = r.cx;
    let Some(map) = r.ok(cx.mapping(v, path)) else {
        return;
    };
    for (k, v) in map {
        let key = k.scalar().unwrap_or_default();
        let field = child(path, key);
        match key {
            "constraints" => {
                spec.constraints = r.ok(cx.constraints(v, &field)).unwrap_or_default();
            }
            "preferences" | "max_replicas_per_node" => r.warn(
                k.at,
                &field,
                format!("{key} is ignored: flock places the app where it fits"),
            ),
            _ => {
                let e = cx.unknown_key(
                    k.at,
                    path,
                    key,
                    &["constraints", "preferences"],
                    "placement",
                );
                r.problems.errors.push(e);
            }
        }
    }
}

/// `resources: {limits: {memory, cpus, pids}, reservations: {memory, cpus}}`.
fn read_resources(r: &mut Report, v: &Yaml, path: &str, spec: &mut AppSpec) {
    let cx = r.cx;
    let Some(map) = r.ok(cx.mapping(v, path)) else {
        return;
    };
    for (k, v) in map {
        let key = k.scalar().unwrap_or_default();
        let field = child(path, key);
        if !matches!(key, "limits" | "reservations") {
            let e = cx.unknown_key(k.at, path, key, &["limits", "reservations"], "resources");
            r.problems.errors.push(e);
            continue;
        }
        let Some(inner) = r.ok(cx.mapping_or_empty(v, &field)) else {
            continue;
        };
        for (ik, iv) in inner {
            let ikey = ik.scalar().unwrap_or_default();
            let ifield = child(&field, ikey);
            match (key, ikey) {
                ("limits", "memory") => spec.mem_limit = r.ok(cx.mem_limit(iv, &ifield)),
                ("limits", "cpus") => {
                    spec.cpu_limit_milli = read_cpus(r, iv, &ifield).filter(|m| *m > 0)
                }
                ("reservations", "memory") => {
                    spec.mem_reservation = r.ok(cx.mem_limit(iv, &ifield))
                }
                ("reservations", "cpus") => {
                    // Shares: 1024 a cpu, what the scheduler reserves a node's cpus in.
                    spec.cpu_shares = read_cpus(r, iv, &ifield)
                        .map(|m| (m * 1024).div_ceil(1000))
                        .filter(|s| *s > 0);
                }
                ("limits", "pids") => r.warn(
                    ik.at,
                    &ifield,
                    "pids is ignored: the number of processes is not limited",
                ),
                ("reservations", "devices" | "generic_resources") => r.error(
                    ik.at,
                    &ifield,
                    format!("{ikey}: flock does not place apps by device (GPUs): remove {ikey}"),
                ),
                _ => {
                    let allowed: &[&str] = if key == "limits" {
                        &["memory", "cpus", "pids"]
                    } else {
                        &["memory", "cpus", "devices"]
                    };
                    let e = cx.unknown_key(ik.at, &field, ikey, allowed, key);
                    r.problems.errors.push(e);
                }
            }
        }
    }
}

/// `restart_policy: {condition: none | on-failure | any, max_attempts, delay, window}`.
fn read_restart_policy(r: &mut Report, v: &Yaml, path: &str) -> Option<RestartPolicy> {
    let cx = r.cx;
    let map = r.ok(cx.mapping(v, path))?;
    r.ok(cx.check_keys(
        map,
        path,
        &["condition", "max_attempts", "delay", "window"],
        "restart_policy",
    ))?;
    let max = match get(map, "max_attempts") {
        Some(m) => {
            let n = r.ok(cx.uint(m, &child(path, "max_attempts")))?;
            (n > 0).then(|| u32::try_from(n).unwrap_or(u32::MAX))
        }
        None => None,
    };
    for key in ["delay", "window"] {
        if let Some((k, _)) = entry(map, key) {
            r.warn(
                k.at,
                &child(path, key),
                format!("{key} is ignored: flock restarts an app with its own back-off"),
            );
        }
    }
    let condition = match get(map, "condition") {
        Some(c) => r.ok(cx.string(c, &child(path, "condition")))?,
        None => "any".into(),
    };
    match condition.as_str() {
        "none" => Some(RestartPolicy::Never),
        "on-failure" => Some(RestartPolicy::OnFailure { max_retry: max }),
        "any" => {
            if let (Some(_), Some((k, _))) = (max, entry(map, "max_attempts")) {
                r.warn(
                    k.at,
                    &child(path, "max_attempts"),
                    "max_attempts is ignored with condition: any (flock restarts it always); \
                     use condition: on-failure for a limit",
                );
            }
            Some(RestartPolicy::Always)
        }
        other => {
            let c = get(map, "condition").map_or(v.at, |c| c.at);
            r.error(
                c,
                &child(path, "condition"),
                format!(
                    "{} is not a condition (none, on-failure or any)",
                    crate::limits::shown(other)
                ),
            );
            None
        }
    }
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
) -> Result<(VolumeSettings, BTreeMap<String, String>), ConfigError> {
    let ext = match get(map, "x-flock") {
        Some(v) => read_x_flock(cx, v, &child(path, "x-flock"))?,
        None => VolumeSettings::default(),
    };
    let (labels, all) = match get(map, "labels") {
        Some(v) => read_labels(cx, v, &child(path, "labels"))?,
        None => Default::default(),
    };
    let show_retention =
        |r: &Option<Retention>| r.map_or_else(|| "default".to_string(), |r| r.to_string());
    let settings = VolumeSettings {
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
    };
    Ok((settings, all))
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

/// `labels:`, a mapping of labels to values or a list of `KEY=VALUE` (or `KEY` for ""): all
/// are the container's labels, and the flock labels are read; a `flock.` label flock does not
/// know is refused (a typo would be silently lost).
fn read_labels(
    cx: Ctx,
    y: &Yaml,
    path: &str,
) -> Result<(VolumeSettings, BTreeMap<String, String>), ConfigError> {
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
    let all = labels
        .iter()
        .map(|(k, v, ..)| (k.clone(), v.clone()))
        .collect();
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
    Ok((settings, all))
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
