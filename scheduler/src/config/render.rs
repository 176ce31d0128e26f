//! Apps back to Flocker's application.yml, which [`crate::config::parse_application`] reads
//! to the same values (for `--dry-run` output, exports and the round-trip tests).

use std::fmt::Write;

use super::spec::{AppSpec, RestartPolicy};

/// What of `spec` Flocker's application.yml can say, which [`to_flocker_yaml`] renders: the
/// spec without the fields that came with compose's keys and stacks.
pub fn flocker_part(spec: &AppSpec) -> AppSpec {
    AppSpec {
        name: spec.name.clone(),
        image: spec.image.clone(),
        command: spec.command.clone(),
        ports: spec.ports.clone(),
        links: spec.links.clone(),
        volume: spec.volume.as_ref().map(|v| super::spec::Volume {
            dataset: None,
            ..v.clone()
        }),
        environment: spec.environment.clone(),
        restart_policy: spec.restart_policy,
        mem_limit: spec.mem_limit,
        cpu_shares: spec.cpu_shares,
        constraints: spec.constraints.clone(),
        instances: spec.instances,
        ..AppSpec::default()
    }
}

/// Renders apps as Flocker's application.yml (`version: 1`, `applications:`), every string
/// double-quoted; of each, its [`flocker_part`].
pub fn to_flocker_yaml<'a>(apps: impl IntoIterator<Item = &'a AppSpec>) -> String {
    let mut out = String::from("\"version\": 1\n\"applications\":");
    let mut empty = true;
    for app in apps {
        if empty {
            out.push('\n');
            empty = false;
        }
        render_app(&mut out, app);
    }
    if empty {
        out.push_str(" {}\n");
    }
    out
}

fn render_app(out: &mut String, app: &AppSpec) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "  {}:", quote(&app.name));
    if let Some(image) = &app.image {
        let _ = writeln!(out, "    \"image\": {}", quote(image));
    }
    if let Some(command) = &app.command {
        let words: Vec<String> = command.iter().map(|w| quote(w)).collect();
        let _ = writeln!(out, "    \"command\": [{}]", words.join(", "));
    }
    if !app.ports.is_empty() {
        out.push_str("    \"ports\":\n");
        for p in &app.ports {
            let _ = writeln!(
                out,
                "    - \"internal\": {}\n      \"external\": {}",
                p.internal, p.external
            );
        }
    }
    if !app.links.is_empty() {
        out.push_str("    \"links\":\n");
        for l in &app.links {
            let _ = writeln!(
                out,
                "    - \"local_port\": {}\n      \"remote_port\": {}\n      \"alias\": {}",
                l.local_port,
                l.remote_port,
                quote(&l.alias)
            );
        }
    }
    if let Some(v) = &app.volume {
        let _ = writeln!(
            out,
            "    \"volume\":\n      \"mountpoint\": {}",
            quote(&v.mountpoint)
        );
        if let Some(size) = v.maximum_size {
            let _ = writeln!(out, "      \"maximum_size\": \"{size}\"");
        }
    }
    if !app.environment.is_empty() {
        out.push_str("    \"environment\":\n");
        for (k, v) in &app.environment {
            let _ = writeln!(out, "      {}: {}", quote(k), quote(v));
        }
    }
    match app.restart_policy {
        RestartPolicy::Never => {}
        RestartPolicy::Always => {
            out.push_str("    \"restart_policy\":\n      \"name\": \"always\"\n")
        }
        RestartPolicy::OnFailure { max_retry } => {
            out.push_str("    \"restart_policy\":\n      \"name\": \"on-failure\"\n");
            if let Some(n) = max_retry {
                let _ = writeln!(out, "      \"maximum_retry_count\": {n}");
            }
        }
    }
    if let Some(m) = app.mem_limit {
        let _ = writeln!(out, "    \"mem_limit\": {m}");
    }
    if let Some(c) = app.cpu_shares {
        let _ = writeln!(out, "    \"cpu_shares\": {c}");
    }
    if let Some(n) = app.instances {
        let _ = writeln!(out, "    \"instances\": {n}");
    }
    if !app.constraints.is_empty() {
        out.push_str("    \"constraints\":\n");
        for c in &app.constraints {
            let _ = writeln!(out, "      - {}", quote(&c.to_string()));
        }
    }
}

/// A YAML double-quoted scalar: `\` and `"` escaped, and every control or non-printable
/// character as an escape, so any string survives the round trip.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            // C0/C1 controls, DEL, what YAML reads as line breaks or a BOM, and non-characters.
            c if c.is_control()
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
                ) =>
            {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
