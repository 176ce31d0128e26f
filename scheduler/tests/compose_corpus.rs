//! Compose files as people write them (issue 18): every file of `fixtures/compose/` (real
//! files from public projects, listed in its SOURCES.md, and a few written for the tricky
//! cases) is read as `flockctl deploy` would read it, with every file it names present and
//! empty and no variables set. Each either parses (what remains is for the cluster: images to
//! pull, nodes to fit) or is refused; the table says what refuses them, by key, and the share
//! that parses must not fall below what it is now.

use std::collections::BTreeMap;
use std::path::Path;

use flock_scheduler::config::interpolate::Vars;
use flock_scheduler::config::{parse_compose, ConfigError, ParseOptions};

/// The files that parse, out of all the real ones (not `flock__*`), when this was last
/// raised: 20 of 53. A change that refuses more of them fails here.
const MIN_PARSING: usize = 20;

/// What blocks a file: the service key the error is under (`volumes`, `network_mode`...), with
/// the volume errors told apart.
fn blocker(e: &ConfigError) -> String {
    let path = e.path.strip_prefix("services.").unwrap_or(&e.path);
    let mut parts = path.splitn(2, '.');
    let first = parts.next().unwrap_or_default();
    let key = match parts.next() {
        Some(rest) => rest.split(['.', '[']).next().unwrap_or_default(),
        None if path.is_empty() => "(file)",
        None => first.split('[').next().unwrap_or_default(),
    };
    let key = if e.message.contains("Docker API") {
        "volumes: the Docker socket".to_string()
    } else if e.message.contains("is a variable unset?") {
        "volumes: a variable unset".to_string()
    } else if e.message.contains("writable host directory") {
        "volumes: a writable host directory".to_string()
    } else if e.message.contains(" writable volumes (") {
        "volumes: several writable volumes".to_string()
    } else if e.message.starts_with("unknown key") {
        format!("unknown key ({})", e.message)
    } else {
        key.to_string()
    };
    key
}

fn parse(path: &Path) -> Result<usize, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let vars = Vars::new();
    let present = |_: &str| Ok(Vec::new());
    let options = ParseOptions {
        vars: Some(&vars),
        profiles: &[],
        dir: Some("/srv/app"),
        read_file: &present,
    };
    parse_compose(&name, &text, &options)
        .map(|(apps, _)| apps.apps.len())
        .map_err(|p| p.errors)
}

#[test]
fn the_corpus_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/compose");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    let mut parsing = 0;
    let mut real = 0;
    // key -> the files it blocks
    let mut blocks: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // key -> the files it alone blocks
    let mut sole: BTreeMap<String, usize> = BTreeMap::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let ours = name.starts_with("flock__");
        if !ours {
            real += 1;
        }
        match parse(path) {
            Ok(n) => {
                assert!(n > 0, "{name}: no services");
                if !ours {
                    parsing += 1;
                }
                println!("parses   {name} ({n} services)");
            }
            Err(errors) => {
                println!("refused  {name}");
                let mut keys: Vec<String> = errors.iter().map(blocker).collect();
                keys.sort();
                keys.dedup();
                for e in &errors {
                    println!("           {e}");
                }
                if keys.len() == 1 && !ours {
                    *sole.entry(keys[0].clone()).or_default() += 1;
                }
                for k in keys.into_iter().filter(|_| !ours) {
                    blocks.entry(k).or_default().push(name.clone());
                }
            }
        }
    }
    println!("\n{parsing} of {real} real compose files parse\n\nwhat refuses the others:");
    let mut table: Vec<_> = blocks.into_iter().collect();
    table.sort_by_key(|(k, v)| (std::cmp::Reverse(v.len()), k.clone()));
    println!("files  alone  key");
    for (key, names) in &table {
        let alone = sole.get(key).copied().unwrap_or_default();
        println!("{:>5}  {alone:>5}  {key}", names.len());
    }
    assert!(real >= 40, "the corpus has {real} real files");
    assert!(
        parsing >= MIN_PARSING,
        "{parsing} of {real} parse, fewer than {MIN_PARSING}"
    );
}

/// The hand-written fixtures that must parse do, and those that must not are refused with
/// every problem.
#[test]
fn the_tricky_fixtures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/compose");
    let n = parse(&dir.join("flock__everything-honoured.yml")).unwrap_or_else(|e| {
        panic!(
            "{}",
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    // debug is in a profile not activated.
    assert_eq!(n, 3);
    let errors = parse(&dir.join("flock__refused.yml")).unwrap_err();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 6, "{shown:#?}");
}
