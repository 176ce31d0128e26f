//! A volume's policy in the config files: `retention` in application.yml, `x-flock` and
//! `labels` in compose files, and the plan's `volumes` (one entry for every app with a volume).

use std::collections::BTreeMap;

use super::*;
use crate::retention::Retention;

fn apps(text: &str) -> Applications {
    parse_application("app.yml", text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn error(text: &str) -> String {
    match parse_application("app.yml", text) {
        Ok(apps) => panic!("parsed, with volumes {:?}:\n{text}", apps.volumes),
        Err(e) => e.to_string(),
    }
}

fn keep(last: u32, hourly: u32, daily: u32) -> Option<Retention> {
    Some(Retention {
        last,
        hourly,
        daily,
    })
}

fn policy(retention: Option<Retention>) -> VolumePolicy {
    VolumePolicy {
        retention,
        ..Default::default()
    }
}

/// Checks every case and reports all mismatches at once.
fn check_all(cases: &[(&str, String, &str)]) {
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(_, got, want)| got != want)
        .map(|(what, got, want)| format!("{what}:\n   got: {got}\n  want: {want}"))
        .collect();
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

const FLOCKER: &str = r#"version: 1
applications:
  a:
    image: postgres
    volume:
      mountpoint: /data
      retention: "last=5,daily=3"
  b:
    image: postgres
    volume:
      mountpoint: /data
      maximum_size: 1G
      retention: {last: 5, hourly: 0, daily: 3}
  c:
    image: postgres
    volume: {mountpoint: /data}
  d:
    image: postgres
    volume: {mountpoint: /data, retention: default}
  e:
    image: nginx
"#;

#[test]
fn flocker_retention_string_map_and_default() {
    let apps = apps(FLOCKER);
    let want = BTreeMap::from([
        ("a".to_string(), policy(keep(5, 24, 3))),
        ("b".to_string(), policy(keep(5, 0, 3))),
        ("c".to_string(), policy(None)),
        ("d".to_string(), policy(None)),
    ]);
    assert_eq!(apps.volumes, want);
    // The policy stays out of the spec; the size stays in it.
    assert_eq!(
        apps.apps["b"].volume.as_ref().unwrap().maximum_size,
        Some(1 << 30)
    );
}

#[test]
fn plans_have_a_policy_for_every_volume() {
    let apps = apps(FLOCKER);
    let plan = resolve_unpinned(&apps).unwrap();
    assert_eq!(plan.volumes, apps.volumes, "e has no volume, so no entry");
    let nodes = [NodeRef {
        id: 7,
        name: "n1".into(),
        addr: "10.0.0.1:7801".into(),
    }];
    let dep = parse_deployment("deployment.yml", "version: 1\nnodes:\n  n1: [b, c, e]\n").unwrap();
    let plan = resolve(&apps, &dep, &nodes).unwrap();
    // Only the deployed apps; c, which sets no policy, gets the default (a key removed from
    // the file resets the dataset).
    let want = BTreeMap::from([
        ("b".to_string(), policy(keep(5, 0, 3))),
        ("c".to_string(), policy(None)),
    ]);
    assert_eq!(plan.volumes, want);
    assert_eq!(plan.apps.len(), 3);
}

#[test]
fn flocker_retention_errors_name_file_line_and_field() {
    let app = |retention: &str| {
        error(&format!(
            "version: 1\napplications:\n  db:\n    image: postgres\n    volume:\n      mountpoint: /data\n      retention: {retention}\n"
        ))
    };
    let at = "app.yml:7:18: applications.db.volume.retention";
    check_all(&[
        (
            "an unknown tier in the string form",
            app("\"weekly=2\""),
            &format!("{at}: unknown retention tier \"weekly\": the tiers are last, hourly and daily; use e.g. last=3,hourly=24,daily=7 (each tier optional)"),
        ),
        (
            "not a number",
            app("last=x"),
            &format!("{at}: \"x\" in \"last=x\" is not a whole number; use e.g. last=3,hourly=24,daily=7 (each tier optional)"),
        ),
        (
            "a number alone",
            app("5"),
            &format!("{at}: \"5\" is not TIER=N; use e.g. last=3,hourly=24,daily=7 (each tier optional)"),
        ),
        (
            "last=0 in the string form",
            app("last=0"),
            &format!("{at}: last=0 would drop the newest snapshot; keep at least last=1"),
        ),
        (
            "an unknown tier in the map form, with the near one",
            app("{last: 2, hourli: 3}"),
            "app.yml:7:28: applications.db.volume.retention: unknown key \"hourli\"; did you mean \"hourly\"? a retention policy takes last, hourly, daily",
        ),
        (
            "last: 0 points at last",
            app("{daily: 3, last: 0}"),
            "app.yml:7:35: applications.db.volume.retention.last: last=0 would drop the newest snapshot; keep at least last=1",
        ),
        (
            "too many points at the tier",
            app("{hourly: 5000}"),
            "app.yml:7:27: applications.db.volume.retention.hourly: hourly=5000 is more than 1000",
        ),
        (
            "more than a u32",
            app("{daily: 99999999999}"),
            "app.yml:7:26: applications.db.volume.retention.daily: daily=99999999999 is more than 1000",
        ),
        (
            "a tier that is not a number",
            app("{daily: a week}"),
            "app.yml:7:26: applications.db.volume.retention.daily: expected a whole number, found \"a week\"",
        ),
        (
            "an empty map",
            app("{}"),
            &format!("{at}: an empty retention policy; write last=3,hourly=24,daily=7 or {{last: 3, hourly: 24, daily: 7}}, each tier optional, or default"),
        ),
        (
            "a list",
            app("[5, 3]"),
            &format!("{at}: expected a retention policy (last=3,hourly=24,daily=7 or {{last: 3, hourly: 24, daily: 7}}, each tier optional), found a list"),
        ),
        (
            "nothing",
            app(""),
            "app.yml:7:16: applications.db.volume.retention: expected a retention policy (last=3,hourly=24,daily=7 or {last: 3, hourly: 24, daily: 7}, each tier optional), found empty",
        ),
    ]);
    // An unquoted policy in a flow mapping is cut at its comma: say to quote it.
    assert_eq!(
        error("version: 1\napplications:\n  db:\n    image: postgres\n    volume: {mountpoint: /data, retention: last=5,daily=3}\n"),
        "app.yml:5:51: applications.db.volume: \"daily=3\" is the rest of a retention policy, cut off by a comma of {...}: quote the policy, as retention: \"last=5,daily=3\""
    );
    // A retention beside the volume, not in it, is an unknown key of the app.
    let e = error("version: 1\napplications:\n  db:\n    image: postgres\n    retention: last=2\n");
    assert!(
        e.starts_with("app.yml:5:5: applications.db: unknown key \"retention\""),
        "{e}"
    );
}

#[test]
fn compose_x_flock_string_and_map() {
    let apps = apps(
        r#"services:
  db:
    image: postgres
    volumes: ["pgdata:/var/lib/postgresql/data"]
    x-flock:
      retention: last=5,daily=3
      maximum_size: 10G
  cache:
    image: redis
    volumes: [/data]
    x-flock:
      retention: {hourly: 6}
  web:
    image: nginx
    x-other: {anything: 1}
  plain:
    image: postgres
    volumes: [/data]
"#,
    );
    assert_eq!(apps.format, Format::Compose);
    let want = BTreeMap::from([
        ("db".to_string(), policy(keep(5, 24, 3))),
        ("cache".to_string(), policy(keep(3, 6, 7))),
        ("plain".to_string(), policy(None)),
    ]);
    assert_eq!(apps.volumes, want);
    let size = |app: &str| apps.apps[app].volume.as_ref().unwrap().maximum_size;
    assert_eq!(size("db"), Some(10 << 30));
    assert_eq!(size("cache"), None);
    assert_eq!(resolve_unpinned(&apps).unwrap().volumes, want);
}

#[test]
fn compose_labels_map_and_list() {
    let apps = apps(
        r#"version: "3.8"
services:
  db:
    image: postgres
    volumes: [/data]
    labels:
      com.example.team: storage
      flock.retention: "last=2,hourly=0"
      flock.maximum_size: 2G
  log:
    image: syslog
    volumes: [/data]
    labels: ["flock.retention=daily=30", "flock.maximum_size=512M", "com.example.x", "a=b=c"]
  web:
    image: nginx
    labels: [com.example.role=frontend]
"#,
    );
    let want = BTreeMap::from([
        ("db".to_string(), policy(keep(2, 0, 7))),
        ("log".to_string(), policy(keep(3, 24, 30))),
    ]);
    assert_eq!(apps.volumes, want);
    let size = |app: &str| apps.apps[app].volume.as_ref().unwrap().maximum_size;
    assert_eq!(size("db"), Some(2 << 30));
    assert_eq!(size("log"), Some(512 << 20));
    assert_eq!(apps.apps["web"].volume, None);
}

#[test]
fn fig_files_take_x_flock_and_labels_too() {
    let apps = apps(
        "db:\n  image: postgres\n  volumes: [/data]\n  x-flock: {retention: last=4}\n  labels: {flock.retention: \"last=4,hourly=24,daily=7\"}\n",
    );
    assert_eq!(apps.format, Format::Fig);
    // The same policy written twice, once with the defaults spelt out: it agrees.
    assert_eq!(apps.volumes["db"], policy(keep(4, 24, 7)));
}

#[test]
fn compose_policy_errors() {
    let svc = |body: &str| error(&format!("services:\n  db:\n    image: postgres\n{body}"));
    check_all(&[
        (
            "a retention for a service without a volume",
            svc("    x-flock: {retention: last=2}\n"),
            "app.yml:4:26: services.db.x-flock.retention: db has no volume, and a retention policy is for a volume's snapshots: give db one (volumes: [\"/data\"]) or remove this setting",
        ),
        (
            "a size in a label for a service without a volume",
            svc("    labels: [\"flock.maximum_size=1G\"]\n"),
            "app.yml:4:14: services.db.labels[0]: db has no volume, and a size limit is for a volume: give db one (volumes: [\"/data\"]) or remove this setting",
        ),
        (
            "x-flock and labels disagree",
            svc("    volumes: [/data]\n    x-flock:\n      retention: last=2\n    labels:\n      flock.retention: last=3\n"),
            "app.yml:8:24: services.db.labels.\"flock.retention\": last=3,hourly=24,daily=7 here but last=2,hourly=24,daily=7 in services.db.x-flock.retention (line 6); give it in one place",
        ),
        (
            "sizes disagree",
            svc("    volumes: [/data]\n    x-flock: {maximum_size: 1G}\n    labels: [flock.maximum_size=2G]\n"),
            "app.yml:6:14: services.db.labels[0]: 2147483648 bytes here but 1073741824 bytes in services.db.x-flock.maximum_size (line 5); give it in one place",
        ),
        (
            "an unknown x-flock key",
            svc("    volumes: [/data]\n    x-flock: {retension: last=2}\n"),
            "app.yml:5:15: services.db.x-flock: unknown key \"retension\"; did you mean \"retention\"? x-flock takes retention, maximum_size, replicas, snapshot_interval",
        ),
        (
            "an unquoted policy cut by a comma",
            svc("    volumes: [/data]\n    x-flock: {retention: last=5,hourly=2}\n"),
            "app.yml:5:33: services.db.x-flock: \"hourly=2\" is the rest of a retention policy, cut off by a comma of {...}: quote the policy, as retention: \"last=5,daily=3\"",
        ),
        (
            "x-flock not a mapping",
            svc("    volumes: [/data]\n    x-flock: last=2\n"),
            "app.yml:5:14: services.db.x-flock: expected a mapping, found \"last=2\"",
        ),
        (
            "a bad retention in x-flock",
            svc("    volumes: [/data]\n    x-flock: {retention: {last: 0}}\n"),
            "app.yml:5:33: services.db.x-flock.retention.last: last=0 would drop the newest snapshot; keep at least last=1",
        ),
        (
            "a bad retention in a label",
            svc("    volumes: [/data]\n    labels: {flock.retention: monthly=1}\n"),
            "app.yml:5:31: services.db.labels.\"flock.retention\": unknown retention tier \"monthly\": the tiers are last, hourly and daily; use e.g. last=3,hourly=24,daily=7 (each tier optional)",
        ),
        (
            "an empty retention label",
            svc("    volumes: [/data]\n    labels: [flock.retention]\n"),
            "app.yml:5:14: services.db.labels[0]: an empty retention policy; use e.g. last=3,hourly=24,daily=7 (each tier optional)",
        ),
        (
            "a size too small, in a label",
            svc("    volumes: [/data]\n    labels: [flock.maximum_size=500]\n"),
            "app.yml:5:14: services.db.labels[0]: \"500\" is 500 bytes, too small for a volume (at least 1M); did you mean \"500M\"?",
        ),
        (
            "a size that is not one, in x-flock",
            svc("    volumes: [/data]\n    x-flock: {maximum_size: 12X}\n"),
            "app.yml:5:29: services.db.x-flock.maximum_size: \"12X\" is not a size (use 500M, 1G or bytes)",
        ),
        (
            "an unknown flock label",
            svc("    volumes: [/data]\n    labels:\n      flock.retension: last=2\n"),
            "app.yml:6:7: services.db.labels.\"flock.retension\": unknown flock label \"flock.retension\"; did you mean flock.retention? flock reads flock.retention and flock.maximum_size (labels outside flock. are not read)",
        ),
        (
            "a flock label twice in a list",
            svc("    volumes: [/data]\n    labels: [flock.retention=last=2, flock.retention=last=2]\n"),
            "app.yml:5:38: services.db.labels[1]: flock.retention is set twice; give it once",
        ),
        (
            "labels that are neither a mapping nor a list",
            svc("    labels: frontend\n"),
            "app.yml:4:13: services.db.labels: expected a mapping of labels to values, or a list of KEY=VALUE, found \"frontend\"",
        ),
        (
            "a label's value that is a mapping",
            svc("    labels: {a: {b: c}}\n"),
            "app.yml:4:17: services.db.labels.a: expected a label's value (a string), found a mapping",
        ),
    ]);
}

/// Replicas and the snapshot interval (issue 17): in application.yml's volume, in compose's
/// `x-flock`; bad values name the field and the forms.
#[test]
fn replication_in_both_formats_and_its_errors() {
    let flocker = "version: 1\napplications:\n  db:\n    image: postgres\n    volume: {mountpoint: /data, replicas: 2, snapshot_interval: 500ms}\n  web:\n    image: nginx\n";
    let apps = apps(flocker);
    let db = &apps.volumes["db"];
    assert_eq!((db.replicas, db.snapshot_interval_ms), (Some(2), Some(500)));
    assert_eq!(
        db.replication(),
        Some(crate::failover::Replication {
            replicas: 2,
            interval_ms: 500
        })
    );
    let plain = &apps.volumes.get("web");
    assert!(plain.is_none());
    // Replicas without an interval get the default one; 0 replicas is none.
    let only = VolumePolicy {
        replicas: Some(1),
        ..Default::default()
    };
    assert_eq!(
        only.replication().map(|r| r.interval_ms),
        Some(crate::failover::DEFAULT_INTERVAL_MS)
    );
    let zero = VolumePolicy {
        replicas: Some(0),
        ..Default::default()
    };
    assert_eq!(zero.replication(), None);

    let compose = "services:\n  db:\n    image: postgres\n    volumes: [/data]\n    x-flock: {replicas: 1, snapshot_interval: 2s}\n";
    let c = parse_application("c.yml", compose).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (
            c.volumes["db"].replicas,
            c.volumes["db"].snapshot_interval_ms
        ),
        (Some(1), Some(2000))
    );

    let bad = |v: &str| {
        error(&format!(
            "version: 1\napplications:\n  db:\n    image: postgres\n    volume: {{mountpoint: /data, {v}}}\n"
        ))
    };
    let e = bad("replicas: 99");
    assert!(
        e.contains("volume.replicas") && e.contains("at most 8"),
        "{e}"
    );
    let e = bad("snapshot_interval: 10ms");
    assert!(
        e.contains("snapshot_interval") && e.contains("outside"),
        "{e}"
    );
    let e = bad("snapshot_interval: fast");
    assert!(e.contains("not a duration"), "{e}");
    let e = bad("snapshot_interval: 3 weeks");
    assert!(e.contains("the unit must be"), "{e}");
    assert_eq!(super::fields::interval_ms("1.5"), Ok(1500));
    assert_eq!(super::fields::interval_ms("1m"), Ok(60_000));
    // A service without a volume cannot ask for replicas.
    let e = match parse_application(
        "c.yml",
        "services:\n  web:\n    image: nginx\n    x-flock: {replicas: 1}\n",
    ) {
        Ok(_) => panic!("parsed"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("replicas are copies of a volume"), "{e}");
}
