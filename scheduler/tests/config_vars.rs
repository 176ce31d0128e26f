//! Variables in compose files (issue 18): substituted from the client's variables as compose
//! does, bare environment names passed through, and every unset name reported.

use flock_scheduler::config::interpolate::{parse_env_file, Vars};
use flock_scheduler::config::{parse_application, parse_application_with};

const FILE: &str = r#"services:
  db:
    image: "postgres:${PG_TAG:-16}"
    environment:
      POSTGRES_PASSWORD: ${POSTGRES_PW}
      PGDATA: /var/lib/postgresql/data
      HOME:
      MISSING_MAP:
    ports: ["${DB_PORT}:5432"]
  web:
    image: web${TAG}
    command: ["sh", "-c", "echo $$HOME ${GREETING:-hello}"]
    environment: [DB_HOST=db, HOME, MISSING_LIST]
"#;

fn vars(pairs: &[(&str, &str)]) -> Vars {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn variables_are_substituted_and_bare_names_passed_through() {
    let v = vars(&[
        ("POSTGRES_PW", "s3cret"),
        ("DB_PORT", "15432"),
        ("HOME", "/root"),
    ]);
    let (apps, warnings) = parse_application_with("compose.yml", FILE, Some(&v)).unwrap();
    let db = &apps.apps["db"];
    assert_eq!(db.image.as_deref(), Some("postgres:16"));
    assert_eq!(db.environment["POSTGRES_PASSWORD"], "s3cret");
    assert_eq!(db.environment["HOME"], "/root");
    assert!(!db.environment.contains_key("MISSING_MAP"));
    assert_eq!(db.ports[0].external, 15432);
    let web = &apps.apps["web"];
    assert_eq!(web.image.as_deref(), Some("web"));
    assert_eq!(
        web.command.as_deref().unwrap(),
        ["sh", "-c", "echo $HOME hello"]
    );
    assert_eq!(web.environment["DB_HOST"], "db");
    assert_eq!(web.environment["HOME"], "/root");
    assert!(!web.environment.contains_key("MISSING_LIST"));
    // Each unset name, once, by name.
    assert_eq!(warnings.len(), 3, "{warnings:#?}");
    assert!(
        warnings[0].contains("variable TAG is not set"),
        "{warnings:#?}"
    );
    assert!(warnings
        .iter()
        .any(|w| w.contains("db: environment MISSING_MAP is not set")));
    assert!(warnings
        .iter()
        .any(|w| w.contains("web: environment MISSING_LIST is not set")));
}

#[test]
fn a_required_variable_or_a_stray_dollar_is_refused_where_it_is() {
    let text =
        "services:\n  db:\n    image: pg\n    environment:\n      PW: ${PW:?set PW in .env}\n";
    let err = parse_application_with("c.yml", text, Some(&Vars::new()))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "c.yml:5:11: variable PW: set PW in .env");
    let text = "services:\n  a:\n    command: [\"echo\", \"$1\"]\n";
    let err = parse_application_with("c.yml", text, Some(&Vars::new()))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("c.yml:3:23: ") && err.contains("write $$"),
        "{err}"
    );
}

#[test]
fn flocker_files_and_parsing_without_variables_are_as_before() {
    // Flocker's application.yml has no variables: `$` is text.
    let text = "version: 1\napplications:\n  a:\n    command: [\"echo\", \"${X}\"]\n";
    let (apps, warnings) = parse_application_with("a.yml", text, Some(&Vars::new())).unwrap();
    assert_eq!(apps.apps["a"].command.as_deref().unwrap(), ["echo", "${X}"]);
    assert!(warnings.is_empty());
    // Without variables (a caller that has none), nothing is substituted.
    let apps =
        parse_application("compose.yml", "services:\n  web:\n    image: web${TAG}\n").unwrap();
    assert_eq!(apps.apps["web"].image.as_deref(), Some("web${TAG}"));
}

#[test]
fn an_env_file_then_the_environment() {
    let mut v = parse_env_file("TAG=1.0\nPOSTGRES_PW='from file'\n").unwrap();
    v.extend(vars(&[("TAG", "2.0"), ("DB_PORT", "15432")]));
    let (apps, _) = parse_application_with("compose.yml", FILE, Some(&v)).unwrap();
    assert_eq!(apps.apps["web"].image.as_deref(), Some("web2.0"));
    assert_eq!(
        apps.apps["db"].environment["POSTGRES_PASSWORD"],
        "from file"
    );
}
