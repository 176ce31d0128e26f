//! Variables in compose files, as compose substitutes them: `$NAME`, `${NAME}`,
//! `${NAME:-default}` (unset or empty: the default), `${NAME-default}` (unset: the default),
//! `${NAME:?message}` / `${NAME?message}` (an error when unset or empty / unset),
//! `${NAME:+other}` / `${NAME+other}` (`other` when set and not empty / set, else empty), and
//! `$$` for a literal `$`. Defaults and alternatives may hold variables themselves
//! (`${A:-${B}}`). A variable that is unset and has no default becomes the empty string, and
//! is reported so that the caller can warn with its name.
//!
//! The values come from the client: its environment over a `.env` file beside the compose
//! file ([`parse_env_file`]), as compose reads them. Substitution applies to every scalar value
//! of the document (not to keys), before any field is read, so that `ports: ["${PORT}:80"]`
//! and `image: app:${TAG}` work.

use std::collections::{BTreeMap, BTreeSet};

use super::yaml::{Pos, Val, Yaml};
use super::ConfigError;

/// The variables a compose file may use, by name.
pub type Vars = BTreeMap<String, String>;

/// Why a value cannot be substituted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterpolateError(pub String);

/// Substitutes the variables in `text` from `vars`; the names used while unset without a
/// default are added to `unset`.
pub fn interpolate(
    text: &str,
    vars: &Vars,
    unset: &mut BTreeSet<String>,
) -> Result<String, InterpolateError> {
    if !text.contains('$') {
        return Ok(text.to_string());
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.push('$');
                i += 2;
            }
            Some('{') => {
                let close = matching_brace(&chars, i + 1).ok_or_else(|| {
                    InterpolateError(format!(
                        "{:?}: a '${{' without its '}}' (write $$ for a literal $)",
                        text
                    ))
                })?;
                let inner: String = chars[i + 2..close].iter().collect();
                out.push_str(&braced(&inner, vars, unset)?);
                i = close + 1;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                let start = i + 1;
                let mut end = start;
                while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_')
                {
                    end += 1;
                }
                let name: String = chars[start..end].iter().collect();
                out.push_str(&lookup(&name, vars, unset));
                i = end;
            }
            _ => {
                return Err(InterpolateError(format!(
                    "{text:?}: a '$' that starts no variable (write $$ for a literal $, \
                     ${{NAME}} or $NAME for a variable)"
                )));
            }
        }
    }
    Ok(out)
}

/// The index of the `}` closing the `{` at `open`, counting nested `${...}`.
fn matching_brace(chars: &[char], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < chars.len() {
        match chars[i] {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn lookup(name: &str, vars: &Vars, unset: &mut BTreeSet<String>) -> String {
    match vars.get(name) {
        Some(v) => v.clone(),
        None => {
            unset.insert(name.to_string());
            String::new()
        }
    }
}

/// `NAME`, `NAME:-default`, `NAME-default`, `NAME:?err`, `NAME?err`, `NAME:+alt`, `NAME+alt`.
fn braced(
    inner: &str,
    vars: &Vars,
    unset: &mut BTreeSet<String>,
) -> Result<String, InterpolateError> {
    let name_end = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let name = &inner[..name_end];
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !valid {
        return Err(InterpolateError(format!(
            "${{{inner}}}: not a variable name (letters, digits and _, not starting with a digit)"
        )));
    }
    let rest = &inner[name_end..];
    if rest.is_empty() {
        return Ok(lookup(name, vars, unset));
    }
    let value = vars.get(name);
    let (colon, op, arg) = match rest.strip_prefix(':') {
        Some(r) => (true, r.chars().next(), r.get(1..).unwrap_or("")),
        None => (false, rest.chars().next(), rest.get(1..).unwrap_or("")),
    };
    // With ':', an empty value counts as unset.
    let set = value.is_some_and(|v| !colon || !v.is_empty());
    match op {
        Some('-') => match value.filter(|_| set) {
            Some(v) => Ok(v.clone()),
            None => interpolate(arg, vars, unset),
        },
        Some('?') => match value.filter(|_| set) {
            Some(v) => Ok(v.clone()),
            None => {
                let message = interpolate(arg, vars, unset)?;
                Err(InterpolateError(if message.is_empty() {
                    format!(
                        "variable {name} is required but {}",
                        if colon { "unset or empty" } else { "unset" }
                    )
                } else {
                    format!("variable {name}: {message}")
                }))
            }
        },
        Some('+') => {
            if set {
                interpolate(arg, vars, unset)
            } else {
                Ok(String::new())
            }
        }
        _ => Err(InterpolateError(format!(
            "${{{inner}}}: after the name comes '}}', ':-', '-', ':?', '?', ':+' or '+'"
        ))),
    }
}

/// Substitutes the variables in every scalar value of `doc` (keys are left as written). The
/// variables used while unset without a default, sorted, each with where it is first used.
pub fn interpolate_document(
    file: &str,
    doc: &mut Yaml,
    vars: &Vars,
) -> Result<Vec<(String, Pos)>, ConfigError> {
    let mut unset = BTreeMap::new();
    walk(file, doc, vars, &mut unset)?;
    Ok(unset.into_iter().collect())
}

fn walk(
    file: &str,
    y: &mut Yaml,
    vars: &Vars,
    unset: &mut BTreeMap<String, Pos>,
) -> Result<(), ConfigError> {
    let at: Pos = y.at;
    match &mut y.val {
        Val::Scalar { text, .. } => {
            let mut here = BTreeSet::new();
            *text = interpolate(text, vars, &mut here)
                .map_err(|e| ConfigError::new(file, at, "", e.0))?;
            for name in here {
                unset.entry(name).or_insert(at);
            }
        }
        Val::Seq(items) => {
            for item in items {
                walk(file, item, vars, unset)?;
            }
        }
        Val::Map(entries) => {
            for (_, v) in entries {
                walk(file, v, vars, unset)?;
            }
        }
    }
    Ok(())
}

/// Compose's pass-through: in each service's `environment`, a bare `NAME` (list form) or a
/// `NAME:` without a value (mapping form) takes NAME's value from `vars`, or is removed when
/// NAME is not set there. The services are under `services:` (`compose`) or at the top level
/// (fig). Returns (service, name, where it was) for each name removed.
pub fn pass_through(doc: &mut Yaml, vars: &Vars, compose: bool) -> Vec<(String, String, Pos)> {
    let mut missing = Vec::new();
    let services = if compose {
        match &mut doc.val {
            Val::Map(entries) => entries
                .iter_mut()
                .find(|(k, _)| k.scalar() == Some("services"))
                .map(|(_, v)| v),
            _ => None,
        }
    } else {
        Some(doc)
    };
    let Some(Yaml {
        val: Val::Map(services),
        ..
    }) = services
    else {
        return missing;
    };
    for (name, service) in services.iter_mut() {
        let service_name = name.scalar().unwrap_or_default().to_string();
        let Val::Map(keys) = &mut service.val else {
            continue;
        };
        let Some((_, env)) = keys
            .iter_mut()
            .find(|(k, _)| k.scalar() == Some("environment"))
        else {
            continue;
        };
        match &mut env.val {
            Val::Seq(items) => items.retain_mut(|item| {
                let Val::Scalar { text, .. } = &mut item.val else {
                    return true;
                };
                if text.contains('=') {
                    return true;
                }
                match vars.get(text.as_str()) {
                    Some(v) => {
                        *text = format!("{text}={v}");
                        true
                    }
                    None => {
                        missing.push((service_name.clone(), text.clone(), item.at));
                        false
                    }
                }
            }),
            Val::Map(entries) => entries.retain_mut(|(k, v)| {
                if !v.is_null() {
                    return true;
                }
                let key = k.scalar().unwrap_or_default().to_string();
                match vars.get(&key) {
                    Some(value) => {
                        v.val = Val::Scalar {
                            text: value.clone(),
                            plain: false,
                        };
                        true
                    }
                    None => {
                        missing.push((service_name.clone(), key, k.at));
                        false
                    }
                }
            }),
            _ => {}
        }
    }
    missing
}

/// Reads a `.env` file as compose does: `NAME=VALUE` lines, `#` comments and blank lines
/// skipped, an optional `export ` before the name; a value in single quotes is taken as
/// written, one in double quotes with `\n`, `\t`, `\"` and `\\` unescaped, an unquoted one up to
/// a ` #` comment and trimmed. Errors name the line.
pub fn parse_env_file(text: &str) -> Result<Vars, String> {
    let mut vars = Vars::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((name, value)) = line.split_once('=') else {
            return Err(format!(
                "line {}: expected NAME=VALUE, found {line:?}",
                n + 1
            ));
        };
        let name = name.trim();
        let ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(format!("line {}: {name:?} is not a variable name", n + 1));
        }
        let value = value.trim();
        let value = if let Some(v) = value.strip_prefix('\'') {
            v.strip_suffix('\'')
                .ok_or_else(|| format!("line {}: a ' without its closing '", n + 1))?
                .to_string()
        } else if let Some(v) = value.strip_prefix('"') {
            let v = v
                .strip_suffix('"')
                .ok_or_else(|| format!("line {}: a \" without its closing \"", n + 1))?;
            let mut out = String::new();
            let mut chars = v.chars();
            while let Some(c) = chars.next() {
                if c != '\\' {
                    out.push(c);
                    continue;
                }
                match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(other) => out.push(other),
                    None => out.push('\\'),
                }
            }
            out
        } else {
            value
                .split_once(" #")
                .map_or(value, |(v, _)| v)
                .trim()
                .to_string()
        };
        vars.insert(name.to_string(), value);
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sub(text: &str, v: &Vars) -> Result<(String, Vec<String>), String> {
        let mut unset = BTreeSet::new();
        interpolate(text, v, &mut unset)
            .map(|s| (s, unset.into_iter().collect()))
            .map_err(|e| e.0)
    }

    #[test]
    fn the_forms_compose_knows() {
        let v = vars(&[("PW", "secret"), ("EMPTY", ""), ("TAG", "1.2")]);
        let ok = |t: &str| sub(t, &v).unwrap().0;
        assert_eq!(ok("plain"), "plain");
        assert_eq!(ok("$PW"), "secret");
        assert_eq!(ok("${PW}"), "secret");
        assert_eq!(ok("app:${TAG}-x"), "app:1.2-x");
        assert_eq!(ok("$PW/$TAG"), "secret/1.2");
        assert_eq!(ok("cost: $$5 ($$PW)"), "cost: $5 ($PW)");
        assert_eq!(ok("${NOPE:-dflt}"), "dflt");
        assert_eq!(ok("${EMPTY:-dflt}"), "dflt");
        assert_eq!(ok("${EMPTY-dflt}"), "");
        assert_eq!(ok("${NOPE-dflt}"), "dflt");
        assert_eq!(ok("${PW:-dflt}"), "secret");
        assert_eq!(ok("${NOPE:-${TAG}}"), "1.2");
        assert_eq!(ok("${NOPE:-a ${NOPE2:-b} c}"), "a b c");
        assert_eq!(ok("${PW:+on}"), "on");
        assert_eq!(ok("${EMPTY:+on}"), "");
        assert_eq!(ok("${EMPTY+on}"), "on");
        assert_eq!(ok("${NOPE+on}"), "");
        assert_eq!(ok("${PW:?needed}"), "secret");
    }

    #[test]
    fn unset_variables_are_empty_and_named() {
        let v = vars(&[]);
        assert_eq!(
            sub("a${X}b$Y", &v).unwrap(),
            ("ab".to_string(), vec!["X".to_string(), "Y".to_string()])
        );
        // A default is not a warning.
        assert_eq!(sub("${X:-d}", &v).unwrap(), ("d".to_string(), vec![]));
    }

    #[test]
    fn errors_say_what_to_write() {
        let v = vars(&[("EMPTY", "")]);
        let err = |t: &str| sub(t, &v).unwrap_err();
        assert_eq!(err("${PW:?set PW in .env}"), "variable PW: set PW in .env");
        assert!(err("${PW?}").contains("PW is required but unset"));
        assert!(err("${EMPTY:?}").contains("unset or empty"));
        assert_eq!(sub("${EMPTY?}", &v).unwrap().0, "");
        assert!(err("echo $1").contains("write $$ for a literal $"));
        assert!(err("${UNCLOSED").contains("without its"));
        assert!(err("${1X}").contains("not a variable name"));
        assert!(err("${X/a/b}").contains("after the name"));
        assert!(err("trailing $").contains("write $$"));
    }

    #[test]
    fn env_files_as_compose_reads_them() {
        let text = "# a comment\n\nPW=secret\nexport TAG = 1.2 \nQ='a b # c'\nD=\"x\\ny\\\"\"\nC=v # note\nE=\n";
        let v = parse_env_file(text).unwrap();
        assert_eq!(v["PW"], "secret");
        assert_eq!(v["TAG"], "1.2");
        assert_eq!(v["Q"], "a b # c");
        assert_eq!(v["D"], "x\ny\"");
        assert_eq!(v["C"], "v");
        assert_eq!(v["E"], "");
        assert!(parse_env_file("JUSTNAME\n").unwrap_err().contains("line 1"));
        assert!(parse_env_file("A=1\n1B=2\n")
            .unwrap_err()
            .contains("line 2"));
        assert!(parse_env_file("A='open\n").unwrap_err().contains("closing"));
    }
}
