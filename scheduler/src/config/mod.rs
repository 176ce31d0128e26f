//! Reading the configuration files users already have: Flocker's `application.yml` and
//! `deployment.yml`, and fig/compose files, into plain values. Pure: callers read the files
//! and pass their names (for messages) and their text.
//!
//! - [`parse_application`]: an application file in any of three forms, told apart as Flocker
//!   did: a top-level `version` + `applications` is Flocker's form ([`Format::Flocker`]); a
//!   top-level `services` is a compose v2/v3 file ([`Format::Compose`]); otherwise every
//!   top-level key is a fig service ([`Format::Fig`], what `fig.yml` and compose v1 look like).
//! - [`parse_deployment`]: `version: 1`, `nodes: {NODE: [APP, ...]}`.
//! - [`resolve`]: applications + deployment + the cluster's nodes -> a [`Plan`] (each deployed
//!   app with the node it is pinned to); [`resolve_unpinned`] for a compose file deployed alone.
//! - [`to_flocker_yaml`]: the inverse of [`parse_application`], in Flocker's form.
//!
//! Every error is a [`ConfigError`] naming the file, the line and column, the field and what to
//! do: `app.yml:7:21: applications.db.volume.maximum_size: "12X" is not a size (use 500M, 1G or
//! bytes)`.
//!
//! The rules follow Flocker's own reader (`flocker/control/_config.py`, tag 1.0.0 and later)
//! and its documentation (`docs/using/config/configuration.rst`), with these differences:
//! - an app may give `command` (a process, for the process driver) instead of `image`; with
//!   both, the app is a container whose image's command `command` replaces (as in compose);
//! - a deployment node may be named by the node's name or address (Flocker wanted an IPv4
//!   address), and its apps may be one name instead of a list (as Flocker's documentation wrote
//!   it, though its reader refused it);
//! - a volume's `maximum_size` may be an integer as well as a string, and is at least
//!   [`MIN_VOLUME_SIZE`]; `mem_limit` may be a size string (`512M`) as well as bytes;
//! - `restart_policy` may be the policy's name alone (`restart_policy: always`);
//! - scalars are read as written: an environment value `8080` or `true` is that text (Flocker
//!   wanted quoted strings), and an empty one is "";
//! - keys Flocker ignored (unknown top-level keys) are errors, so a typo is not silently lost;
//! - compose files may also use `restart`, `cpu_shares`, long-form ports, named volumes,
//!   anchors and merge keys, and `services:` (compose v2/v3).
//! - a volume may give its dataset's retention policy (`retention: "last=5,daily=3"` or
//!   `{last: 5, daily: 3}`); a compose service gives it, and its volume's `maximum_size`, in
//!   `x-flock: {retention: ..., maximum_size: ...}` or as the labels `flock.retention` and
//!   `flock.maximum_size` (other labels are not read). The policies are kept out of
//!   [`AppSpec`] (stored in the Raft log) and go in [`Applications::volumes`] and
//!   [`Plan::volumes`].

mod compose;
mod deployment;
mod fields;
mod flocker;
pub mod interpolate;
#[cfg(test)]
mod policy_tests;
mod render;
mod spec;
pub mod stack;
mod yaml;

pub use deployment::{resolve, resolve_unpinned, Deployment, DeploymentNode};
pub use fields::interval_ms;
pub use render::{flocker_part, to_flocker_yaml};
pub use spec::{
    human_size, parse_size, AppSpec, Applications, BindMount, Constraint, ConstraintKey,
    Dependency, Format, HealthCheck, Link, NodeRef, Plan, PlannedApp, PortMap, RestartPolicy,
    SecretMount, Ulimit, Volume, VolumePolicy, MAX_APP_NAME_LEN, MIN_VOLUME_SIZE,
};

use yaml::{Pos, Yaml};

/// A configuration file that cannot be used, and where: `file:line:column: field: message`.
///
/// `line` and `column` count from 1 (columns in characters). `path` names the field in the
/// document (`applications.web.ports[0].external`); it is empty for errors about the whole file
/// or its YAML syntax.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(file: &str, at: Pos, path: &str, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            line: at.line.max(1),
            column: at.col.max(1),
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// Parses an application file: Flocker's `application.yml`, a fig file or a compose file
/// (see the module documentation for how the form is told apart). Variables are not
/// substituted: see [`parse_application_with`].
pub fn parse_application(file: &str, text: &str) -> Result<Applications, ConfigError> {
    parse_application_with(file, text, None).map(|(apps, _)| apps)
}

/// [`parse_application`], and with `vars` a compose or fig file's variables are substituted
/// as compose does ([`interpolate`]) and an environment entry that is a bare name (`[NAME]`,
/// or `NAME:` with no value) takes NAME's value from `vars` (compose's pass-through), or is
/// left out when NAME is not set. Flocker's application.yml has no variables. Also returns the
/// warnings: each variable used while unset, each name passed through while unset, each key
/// ignored. The first error only (in the order of the file); [`parse_compose`] gives them all.
/// No file is read: a compose file's `env_file` or `secrets: {file: ...}` is an error here.
pub fn parse_application_with(
    file: &str,
    text: &str,
    vars: Option<&interpolate::Vars>,
) -> Result<(Applications, Vec<String>), ConfigError> {
    let no_files = |p: &str| Err(format!("{p}: no file is read here"));
    let options = ParseOptions {
        vars,
        profiles: &[],
        dir: None,
        read_file: &no_files,
    };
    match parse_compose(file, text, &options) {
        Ok((apps, warnings)) => Ok((apps, warnings.iter().map(ToString::to_string).collect())),
        Err(mut p) => Err(p.errors.remove(0)),
    }
}

/// A key flock reads past without doing what it says, or a value it changes, and where:
/// `file:line:column: field: message`, as [`ConfigError`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct Warning {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

impl Warning {
    pub(crate) fn new(file: &str, at: Pos, path: &str, message: impl Into<String>) -> Self {
        let e = ConfigError::new(file, at, path, message);
        Warning {
            file: e.file,
            line: e.line,
            column: e.column,
            path: e.path,
            message: e.message,
        }
    }
}

/// Why a file is refused: every error in it (at least one), in the order of the file, and the
/// warnings it would have had, so that one run shows all there is to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problems {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<Warning>,
}

impl Problems {
    fn one(e: ConfigError) -> Problems {
        Problems {
            errors: vec![e],
            warnings: Vec::new(),
        }
    }
}

/// What [`parse_compose`] needs from outside the file's text.
pub struct ParseOptions<'a> {
    /// The variables `${NAME}` takes (the environment over `.env`); `None`: no substitution
    /// and no pass-through, the file as written (an environment `secrets:` entry then has no
    /// value).
    pub vars: Option<&'a interpolate::Vars>,
    /// The profiles `--profile` activates (`COMPOSE_PROFILES` in `vars` adds to them).
    pub profiles: &'a [String],
    /// The compose file's directory, absolute: relative bind mount sources are made absolute
    /// against it (`None`: they are refused).
    pub dir: Option<&'a str>,
    /// Reads a file the compose file names (`env_file`, a secret's or config's `file:`), by
    /// the path as written, relative to the compose file's directory: its bytes, or why not.
    pub read_file: &'a dyn Fn(&str) -> Result<Vec<u8>, String>,
}

/// Parses an application file in any form (see the module documentation), compose files as
/// `docker compose` reads them: all their errors at once (each with its line and column) or
/// the applications and the warnings (keys ignored, variables unset...), in the order of the
/// file. Flocker's application.yml stops at its first error.
pub fn parse_compose(
    file: &str,
    text: &str,
    options: &ParseOptions,
) -> Result<(Applications, Vec<Warning>), Problems> {
    let mut doc = document(
        file,
        text,
        "expected version: 1 and applications: (Flocker's application.yml) or compose services",
    )
    .map_err(Problems::one)?;
    let form = form_of(file, &doc).map_err(Problems::one)?;
    let mut warnings = Vec::new();
    if let (Some(vars), Format::Compose | Format::Fig) = (options.vars, form) {
        let unset =
            interpolate::interpolate_document(file, &mut doc, vars).map_err(Problems::one)?;
        for (name, at) in unset {
            warnings.push(Warning::new(
                file,
                at,
                "",
                format!(
                    "variable {name} is not set: it was replaced by an empty string (set it in \
                     the environment or in .env, or give a default: ${{{name}:-default}})"
                ),
            ));
        }
        for (service, name, at) in
            interpolate::pass_through(&mut doc, vars, form == Format::Compose)
        {
            warnings.push(Warning::new(
                file,
                at,
                "",
                format!(
                    "{service}: environment {name} is not set here, so {service} gets no \
                     {name} (set it in the environment or in .env, or give NAME=VALUE)"
                ),
            ));
        }
    }
    match form {
        Format::Compose | Format::Fig => {
            let (apps, mut problems) = compose::read(file, &doc, form, options);
            warnings.append(&mut problems.warnings);
            match apps {
                Some(apps) if problems.errors.is_empty() => Ok((apps, warnings)),
                _ => {
                    problems.errors.sort_by_key(|e| (e.line, e.column));
                    Err(Problems {
                        errors: problems.errors,
                        warnings,
                    })
                }
            }
        }
        _ => flocker::read(file, &doc)
            .map(|apps| (apps, warnings))
            .map_err(Problems::one),
    }
}

/// Which form an application file is in (see the module documentation).
fn form_of(file: &str, doc: &Yaml) -> Result<Format, ConfigError> {
    let map = fields::Ctx { file }.mapping(doc, "")?;
    let has = |key: &str| {
        map.iter()
            .find(|(k, _)| k.scalar() == Some(key))
            .is_some_and(|(_, v)| !compose::is_service(v))
    };
    let key = |key: &str| map.iter().any(|(k, _)| k.scalar() == Some(key));
    // `version` beside `applications` is Flocker's form even when the applications mapping
    // holds an app named like a service key (`command:`): a fig file has no `version`.
    if has("applications") || (key("version") && key("applications")) {
        Ok(Format::Flocker)
    } else if has("services") {
        Ok(Format::Compose)
    } else if let Some((k, _)) = map.iter().find(|(k, _)| k.scalar() == Some("version")) {
        Err(ConfigError::new(
            file,
            k.at,
            "",
            "a file with a version needs applications: (Flocker's application.yml) or \
             services: (a compose file)",
        ))
    } else {
        Ok(Format::Fig)
    }
}

/// Parses Flocker's `deployment.yml`: `version: 1` and `nodes`, a mapping from a node (its
/// name, its address HOST:PORT, or its host) to the names of the apps it runs.
pub fn parse_deployment(file: &str, text: &str) -> Result<Deployment, ConfigError> {
    let doc = document(file, text, "expected version: 1 and nodes:")?;
    deployment::read(file, &doc)
}

/// Refuses a config file larger than [`MAX_CONFIG_FILE_BYTES`](crate::limits::MAX_CONFIG_FILE_BYTES),
/// naming it, its size and the limit. `len` is its size in bytes.
pub fn check_file_size(file: &str, len: u64) -> Result<(), ConfigError> {
    let max = crate::limits::MAX_CONFIG_FILE_BYTES;
    if len > max as u64 {
        return Err(ConfigError::new(
            file,
            Pos { line: 1, col: 1 },
            "",
            format!(
                "the file is {len} bytes; a config file may be at most {max} bytes ({} MiB)",
                max >> 20
            ),
        ));
    }
    Ok(())
}

fn document(file: &str, text: &str, expected: &str) -> Result<Yaml, ConfigError> {
    check_file_size(file, text.len() as u64)?;
    match yaml::parse(text) {
        Ok(Some(doc)) => Ok(doc),
        Ok(None) => Err(ConfigError::new(
            file,
            Pos { line: 1, col: 1 },
            "",
            format!("the file is empty; {expected}"),
        )),
        Err(e) => Err(ConfigError::new(
            file,
            e.at,
            "",
            format!("not valid YAML: {}", e.message),
        )),
    }
}
