//! Stacks: a compose file deploys as a project (compose's word; Swarm's stack), whose apps
//! are its services named `PROJECT_SERVICE`. Deploying it again adds, changes and removes only
//! that project's apps ([`crate::Command::Deploy`] with its stack).

use std::collections::BTreeMap;

use super::spec::Applications;
use super::yaml::Pos;
use super::{ConfigError, MAX_APP_NAME_LEN};

/// The separator between a stack's name and a service's in the app's name (Swarm's).
pub const SEPARATOR: char = '_';

/// A project name as compose makes one from a directory name or `-p`: lower case, only
/// letters, digits, `_` and `-`, starting with a letter or digit. `None` when nothing is left.
pub fn normalize_project(name: &str) -> Option<String> {
    let s: String = name
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        .collect();
    let s = s.trim_start_matches(['_', '-']).to_string();
    (!s.is_empty()).then_some(s)
}

/// The project of a compose file, as compose picks it: `-p` (`given`), else the file's
/// `name:`, else the name of the file's directory. Errors say which to set.
pub fn project_name(
    given: Option<&str>,
    apps: &Applications,
    dir: Option<&str>,
) -> Result<String, String> {
    let (name, from) = match (given, &apps.project, dir) {
        (Some(p), _, _) => (p, "-p"),
        (None, Some(p), _) => (p.as_str(), "the file's name:"),
        (None, None, Some(d)) => (d, "the file's directory"),
        (None, None, None) => {
            return Err("the stack has no name: give -p NAME or name: in the file".into())
        }
    };
    let normalized = normalize_project(name).ok_or_else(|| {
        format!(
            "{} (from {from}) is not a stack name: give -p NAME, with letters, digits, _ or -",
            crate::limits::shown(name)
        )
    })?;
    // Room for `_` and a service name.
    let max = MAX_APP_NAME_LEN - 2;
    if normalized.len() > max {
        return Err(format!(
            "stack name {} (from {from}) is longer than {max} bytes: give a shorter -p NAME",
            crate::limits::shown(&normalized)
        ));
    }
    Ok(normalized)
}

/// The app name of `service` in stack `project`.
pub fn app_name(project: &str, service: &str) -> String {
    format!("{project}{SEPARATOR}{service}")
}

/// `apps` (a compose or fig file's services) as the apps of stack `project`: each service
/// `S` is the app `PROJECT_S` (its `stack` and `service` set), its dependencies name the
/// siblings' apps, a volume shared by name is the dataset `PROJECT_VOLUME`, a secret or config
/// `NAME` is `PROJECT_NAME` (in the apps' mounts and in [`Applications::secrets`]), and a
/// service that gives `build` alone runs `PROJECT-S`, the image compose would build.
pub fn into_stack(mut apps: Applications, project: &str) -> Result<Applications, ConfigError> {
    let rename = |s: &str| app_name(project, s);
    let mut renamed = BTreeMap::new();
    for (service, mut spec) in std::mem::take(&mut apps.apps) {
        let name = rename(&service);
        if name.len() > MAX_APP_NAME_LEN {
            let at = apps
                .sources
                .get(&service)
                .map_or(Pos { line: 1, col: 1 }, |s| s.at);
            return Err(ConfigError::new(
                &apps.file,
                at,
                &format!("services.{service}"),
                format!(
                    "the app's name {name} (stack {project}, service {service}) is longer than \
                     {MAX_APP_NAME_LEN} bytes: give a shorter stack name with -p, or rename the \
                     service"
                ),
            ));
        }
        spec.name = name.clone();
        spec.stack = Some(project.to_string());
        spec.service = Some(service.clone());
        for d in &mut spec.depends_on {
            d.app = rename(&d.app);
        }
        if let Some(v) = &mut spec.volume {
            if let Some(ds) = &mut v.dataset {
                *ds = rename(ds);
            }
        }
        for s in &mut spec.secrets {
            s.secret = rename(&s.secret);
        }
        if apps.built.contains(&service) {
            spec.image = Some(built_image(project, &service));
        }
        renamed.insert(name, spec);
    }
    apps.apps = renamed;
    apps.secrets = std::mem::take(&mut apps.secrets)
        .into_iter()
        .map(|(s, v)| (rename(&s), v))
        .collect();
    apps.volumes = std::mem::take(&mut apps.volumes)
        .into_iter()
        .map(|(s, v)| (rename(&s), v))
        .collect();
    apps.sources = std::mem::take(&mut apps.sources)
        .into_iter()
        .map(|(s, v)| (rename(&s), v))
        .collect();
    Ok(apps)
}

/// The image compose builds for `service` of `project` (compose v2's name): `project-service`,
/// lower case.
pub fn built_image(project: &str, service: &str) -> String {
    format!("{project}-{service}").to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_are_normalized_as_compose_does() {
        assert_eq!(normalize_project("My.Shop"), Some("myshop".into()));
        assert_eq!(normalize_project("_-x"), Some("x".into()));
        assert_eq!(normalize_project("..."), None);
        let apps =
            crate::config::parse_application("c.yml", "services:\n  db:\n    image: pg\n").unwrap();
        assert_eq!(project_name(Some("P"), &apps, Some("dir")).unwrap(), "p");
        assert_eq!(project_name(None, &apps, Some("Dir")).unwrap(), "dir");
        assert!(project_name(None, &apps, None)
            .unwrap_err()
            .contains("-p NAME"));
        let named = crate::config::parse_application(
            "c.yml",
            "name: shop\nservices:\n  db:\n    image: pg\n",
        )
        .unwrap();
        assert_eq!(project_name(None, &named, Some("dir")).unwrap(), "shop");
        let long = "x".repeat(60);
        assert!(project_name(Some(&long), &apps, None)
            .unwrap_err()
            .contains("shorter"));
    }

    #[test]
    fn services_become_the_stacks_apps() {
        let apps = crate::config::parse_application(
            "c.yml",
            "services:\n  db:\n    image: pg\n    volumes: [/data]\n  web:\n    image: w\n",
        )
        .unwrap();
        let s = into_stack(apps, "shop").unwrap();
        assert_eq!(s.apps.keys().collect::<Vec<_>>(), ["shop_db", "shop_web"]);
        let db = &s.apps["shop_db"];
        assert_eq!(
            (db.name.as_str(), db.stack.as_deref(), db.service_name()),
            ("shop_db", Some("shop"), "db")
        );
        assert!(s.volumes.contains_key("shop_db"));
        let long = crate::config::parse_application(
            "c.yml",
            &format!("services:\n  {}:\n    image: pg\n", "s".repeat(36)),
        )
        .unwrap();
        let e = into_stack(long, "shop").unwrap_err().to_string();
        assert!(e.contains("c.yml:2:3") && e.contains("shorter"), "{e}");
    }
}
