//! Properties of the config readers: any valid set of apps, rendered as Flocker's
//! application.yml, reads back equal; no input makes the readers panic.

use std::collections::{BTreeMap, BTreeSet};

use flock_scheduler::config::{
    parse_application, parse_deployment, to_flocker_yaml, AppSpec, Constraint, ConstraintKey, Link,
    PortMap, RestartPolicy, Volume, MIN_VOLUME_SIZE,
};
use proptest::prelude::*;

/// Any text without NUL (which no field accepts): quotes, backslashes, newlines, controls,
/// non-ASCII.
fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[^\\x00]{{0,{max}}}")).unwrap()
}

fn ports() -> impl Strategy<Value = Vec<PortMap>> {
    proptest::collection::vec((1..=u16::MAX, 1..=u16::MAX), 0..4).prop_map(|pairs| {
        let mut seen = BTreeSet::new();
        pairs
            .into_iter()
            .filter(|(_, external)| seen.insert(*external))
            .map(|(internal, external)| PortMap { internal, external })
            .collect()
    })
}

fn links() -> impl Strategy<Value = Vec<Link>> {
    let link = (1..=u16::MAX, 1..=u16::MAX, "[A-Za-z0-9][A-Za-z0-9_-]{0,12}");
    proptest::collection::vec(link, 0..4).prop_map(|links| {
        // Two links may not set the same variables.
        let mut seen = BTreeSet::new();
        links
            .into_iter()
            .filter(|(local, _, alias)| {
                seen.insert((alias.to_ascii_uppercase().replace('-', "_"), *local))
            })
            .map(|(local_port, remote_port, alias)| Link {
                local_port,
                remote_port,
                alias,
            })
            .collect()
    })
}

fn volume() -> impl Strategy<Value = Option<Volume>> {
    let segments = proptest::collection::vec("[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", 1..4);
    let size = proptest::option::of(MIN_VOLUME_SIZE..=u64::MAX);
    proptest::option::of(
        (segments, size).prop_map(|(segments, maximum_size)| Volume {
            mountpoint: format!("/{}", segments.join("/")),
            maximum_size,
            dataset: None,
        }),
    )
}

fn restart_policy() -> impl Strategy<Value = RestartPolicy> {
    prop_oneof![
        Just(RestartPolicy::Never),
        Just(RestartPolicy::Always),
        proptest::option::of(1..=u32::MAX)
            .prop_map(|max_retry| RestartPolicy::OnFailure { max_retry }),
    ]
}

fn environment() -> impl Strategy<Value = BTreeMap<String, String>> {
    let name = proptest::string::string_regex("[^=\\x00]{1,12}").unwrap();
    proptest::collection::btree_map(name, text(20), 0..4)
}

/// An image, or a command whose first word is not empty.
fn what_to_run() -> impl Strategy<Value = (Option<String>, Option<Vec<String>>)> {
    prop_oneof![
        "[a-z0-9][a-z0-9./_-]{0,20}(:[a-z0-9._-]{1,10})?".prop_map(|i| (Some(i), None)),
        (
            proptest::string::string_regex("[^\\x00]{1,12}").unwrap(),
            proptest::collection::vec(text(12), 0..4)
        )
            .prop_map(|(first, rest)| {
                let mut words = vec![first];
                words.extend(rest);
                (None, Some(words))
            }),
    ]
}

/// A placement constraint on a label (a key without `=`, `!` or spaces at its ends) or the
/// node's name.
fn constraint() -> impl Strategy<Value = Constraint> {
    let word = "[a-zA-Z0-9._/-]{1,12}";
    (proptest::option::of(word), any::<bool>(), word).prop_map(|(label, equal, value)| Constraint {
        key: label.map_or(ConstraintKey::NodeName, ConstraintKey::Label),
        equal,
        value,
    })
}

prop_compose! {
    fn app_spec()(
        name in "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,39}",
        (image, command) in what_to_run(),
        ports in ports(),
        links in links(),
        volume in volume(),
        environment in environment(),
        restart_policy in restart_policy(),
        mem_limit in proptest::option::of(1..=u64::MAX),
        cpu_shares in proptest::option::of(1..=u64::MAX),
        constraints in proptest::collection::vec(constraint(), 0..3),
    ) -> AppSpec {
        AppSpec {
            name, image, command, ports, links, volume, environment, restart_policy, mem_limit,
            cpu_shares, constraints,
            ..Default::default()
        }
    }
}

fn apps() -> impl Strategy<Value = BTreeMap<String, AppSpec>> {
    proptest::collection::vec(app_spec(), 0..5)
        .prop_map(|apps| apps.into_iter().map(|a| (a.name.clone(), a)).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn rendered_apps_read_back_equal(apps in apps()) {
        let yaml = to_flocker_yaml(apps.values());
        let parsed = parse_application("application.yml", &yaml)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        prop_assert_eq!(parsed.apps, apps, "{}", yaml);
    }

    /// AppSpecs go into the replicated state: postcard carries them unchanged.
    #[test]
    fn apps_survive_postcard(apps in apps()) {
        let bytes = postcard::to_allocvec(&apps).unwrap();
        let back: BTreeMap<String, AppSpec> = postcard::from_bytes(&bytes).unwrap();
        prop_assert_eq!(back, apps);
    }

    #[test]
    fn no_text_makes_the_readers_panic(text in text(200)) {
        let _ = parse_application("a.yml", &text);
        let _ = parse_deployment("d.yml", &text);
    }

    /// Rendered files cut short or with one character changed: errors, never a panic.
    #[test]
    fn damaged_files_do_not_panic(apps in apps(), cut in any::<prop::sample::Index>(), c in any::<char>()) {
        let yaml = to_flocker_yaml(apps.values());
        let chars: Vec<char> = yaml.chars().collect();
        let at = cut.index(chars.len().max(1)).min(chars.len());
        let cut_short: String = chars[..at].iter().collect();
        let _ = parse_application("a.yml", &cut_short);
        let mut changed = chars.clone();
        if at < changed.len() {
            changed[at] = c;
        }
        let _ = parse_application("a.yml", &changed.iter().collect::<String>());
    }
}
