//! Reading typed fields out of the YAML tree, with errors that point at them. Shared by the
//! Flocker and the compose readers.

use std::collections::BTreeMap;

use super::spec::MIN_VOLUME_SIZE;
use super::yaml::{Pos, Val, Yaml};
use super::ConfigError;
use crate::retention::{Retention, MAX_KEEP};

/// The file being read, for errors.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'f> {
    pub file: &'f str,
}

/// `path.key`, with the key quoted when it is not a plain word: `nodes."172.16.255.250"`.
pub(crate) fn child(path: &str, key: &str) -> String {
    let word = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if word {
        key.to_string()
    } else {
        crate::limits::shown(key).to_string()
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

/// `path[i]`.
pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

impl<'f> Ctx<'f> {
    pub fn err(&self, at: Pos, path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.file, at, path, message)
    }

    fn expected(&self, y: &Yaml, path: &str, what: &str) -> ConfigError {
        self.err(
            y.at,
            path,
            format!("expected {what}, found {}", y.describe()),
        )
    }

    /// The entries of a mapping.
    pub fn mapping<'y>(&self, y: &'y Yaml, path: &str) -> Result<&'y [(Yaml, Yaml)], ConfigError> {
        match &y.val {
            Val::Map(entries) => Ok(entries),
            _ => Err(self.expected(y, path, "a mapping")),
        }
    }

    /// The entries of a mapping; an empty value is an empty mapping.
    pub fn mapping_or_empty<'y>(
        &self,
        y: &'y Yaml,
        path: &str,
    ) -> Result<&'y [(Yaml, Yaml)], ConfigError> {
        if y.is_null() {
            Ok(&[])
        } else {
            self.mapping(y, path)
        }
    }

    /// The items of a list.
    pub fn list<'y>(&self, y: &'y Yaml, path: &str) -> Result<&'y [Yaml], ConfigError> {
        match &y.val {
            Val::Seq(items) => Ok(items),
            _ => Err(self.expected(y, path, "a list")),
        }
    }

    /// A scalar's text as written; empty values are refused.
    pub fn string(&self, y: &Yaml, path: &str) -> Result<String, ConfigError> {
        match &y.val {
            Val::Scalar { text, .. } if !y.is_null() => Ok(text.clone()),
            _ => Err(self.expected(y, path, "a string")),
        }
    }

    /// A non-negative integer (written as digits, quoted or not).
    pub fn uint(&self, y: &Yaml, path: &str) -> Result<u64, ConfigError> {
        match &y.val {
            Val::Scalar { text, .. } if is_digits(text) => text
                .parse()
                .map_err(|_| self.err(y.at, path, format!("{text} is too large"))),
            _ => Err(self.expected(y, path, "a whole number")),
        }
    }

    /// A TCP port, 1 to 65535.
    pub fn port(&self, y: &Yaml, path: &str) -> Result<u16, ConfigError> {
        match &y.val {
            Val::Scalar { text, .. } if is_digits(text) => port_number(text)
                .ok_or_else(|| self.err(y.at, path, format!("{text} is not a port (1 to 65535)"))),
            _ => Err(self.expected(y, path, "a port number")),
        }
    }

    /// A list of placement constraints, `["node.labels.disk == ssd", ...]`.
    pub fn constraints(
        &self,
        y: &Yaml,
        path: &str,
    ) -> Result<Vec<super::spec::Constraint>, ConfigError> {
        let mut out = Vec::new();
        for (i, item) in self.list(y, path)?.iter().enumerate() {
            let item_path = index(path, i);
            let text = self.string(item, &item_path)?;
            let c = text
                .parse()
                .map_err(|m: String| self.err(item.at, &item_path, m))?;
            out.push(c);
        }
        Ok(out)
    }

    /// Refuses keys not in `allowed`, naming the ones that are (and the likely one meant).
    pub fn check_keys(
        &self,
        entries: &[(Yaml, Yaml)],
        path: &str,
        allowed: &[&str],
        what: &str,
    ) -> Result<(), ConfigError> {
        for (k, _) in entries {
            let key = k.scalar().unwrap_or_default();
            if !allowed.contains(&key) {
                return Err(self.unknown_key(k.at, path, key, allowed, what));
            }
        }
        Ok(())
    }

    pub fn unknown_key(
        &self,
        at: Pos,
        path: &str,
        key: &str,
        allowed: &[&str],
        what: &str,
    ) -> ConfigError {
        let hint = match allowed.iter().find(|a| near(a, key)) {
            Some(a) => format!(
                "did you mean {a_shown}? ",
                a_shown = crate::limits::shown(a)
            ),
            None => String::new(),
        };
        self.err(
            at,
            path,
            format!(
                "unknown key {key_shown}; {hint}{what} takes {}",
                allowed.join(", "),
                key_shown = crate::limits::shown(key)
            ),
        )
    }

    /// Refuses a key that is the rest of a retention policy cut off by a comma of a flow
    /// mapping (`{retention: last=5,daily=3}` reads as a key `daily=3`), saying to quote it.
    pub fn check_cut_policy(
        &self,
        entries: &[(Yaml, Yaml)],
        path: &str,
    ) -> Result<(), ConfigError> {
        for (k, _) in entries {
            let key = k.scalar().unwrap_or_default();
            let tier = key.split_once('=').map(|(tier, _)| tier.trim());
            if tier.is_some_and(|t| ["last", "hourly", "daily"].contains(&t)) {
                return Err(self.err(
                    k.at,
                    path,
                    format!(
                        "{key_shown} is the rest of a retention policy, cut off by a comma of \
                         {{...}}: quote the policy, as retention: \"last=5,daily=3\"",
                        key_shown = crate::limits::shown(key)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The value of a key that must be there; the error points at `owner_at`, the key of the
    /// mapping that lacks it.
    pub fn required<'y>(
        &self,
        entries: &'y [(Yaml, Yaml)],
        owner_at: Pos,
        path: &str,
        key: &str,
        hint: &str,
    ) -> Result<&'y Yaml, ConfigError> {
        get(entries, key).ok_or_else(|| self.err(owner_at, path, format!("missing {key}{hint}")))
    }

    /// What the app runs: `image` (a container; `command`, if also given, replaces the
    /// image's command, as in compose) or `command` alone (a process).
    pub fn what_to_run(
        &self,
        entries: &[(Yaml, Yaml)],
        owner_at: Pos,
        path: &str,
    ) -> Result<(Option<String>, Option<Vec<String>>), ConfigError> {
        match (entry(entries, "image"), entry(entries, "command")) {
            (Some((_, image)), None) => Ok((Some(self.image(image, &child(path, "image"))?), None)),
            (None, Some((_, command))) => {
                Ok((None, Some(self.command(command, &child(path, "command"))?)))
            }
            (Some((_, image)), Some((_, command))) => Ok((
                Some(self.image(image, &child(path, "image"))?),
                Some(self.command(command, &child(path, "command"))?),
            )),
            (None, None) => Err(self.err(
                owner_at,
                path,
                "missing image (a container image) or command (a process to run)",
            )),
        }
    }

    pub fn image(&self, y: &Yaml, path: &str) -> Result<String, ConfigError> {
        let image = self.string(y, path)?;
        if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.err(
                y.at,
                path,
                format!(
                    "{image_shown} is not an image name (no spaces: postgres:9.4)",
                    image_shown = crate::limits::shown(&image)
                ),
            ));
        }
        Ok(image)
    }

    /// A command: a list of words, or one string split as a POSIX shell would (quotes and
    /// backslashes; no variables, globs or pipes).
    pub fn command(&self, y: &Yaml, path: &str) -> Result<Vec<String>, ConfigError> {
        let words = match &y.val {
            Val::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match &item.val {
                    Val::Scalar { text, .. } => Ok(text.clone()),
                    _ => Err(self.expected(item, &index(path, i), "a string")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Val::Scalar { text, .. } if !y.is_null() => shlex::split(text).ok_or_else(|| {
                self.err(
                    y.at,
                    path,
                    format!(
                        "{text_shown} has an unclosed quote or a trailing backslash",
                        text_shown = crate::limits::shown(text)
                    ),
                )
            })?,
            _ => return Err(self.expected(y, path, "a command (a string or a list)")),
        };
        if words.first().is_none_or(|w| w.is_empty()) {
            return Err(self.err(y.at, path, "the command is empty"));
        }
        if words.iter().any(|w| w.contains('\0')) {
            return Err(self.err(y.at, path, "the command contains a NUL character"));
        }
        Ok(words)
    }

    /// Environment variables: a mapping of names to values (a value is taken as written;
    /// an empty value is ""), or, when `list_ok`, a list of `NAME=VALUE` (or `NAME` for "").
    pub fn environment(
        &self,
        y: &Yaml,
        path: &str,
        list_ok: bool,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut env = BTreeMap::new();
        let mut add = |name: String, value: String, at: Pos, item_path: &str| {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(self.err(
                    at,
                    item_path,
                    format!(
                        "{name_shown} is not a variable name (no '=', not empty)",
                        name_shown = crate::limits::shown(&name)
                    ),
                ));
            }
            if value.contains('\0') {
                return Err(self.err(at, item_path, "the value contains a NUL character"));
            }
            if env.insert(name.clone(), value).is_some() {
                return Err(self.err(at, item_path, format!("{name} is set twice")));
            }
            Ok(())
        };
        match &y.val {
            Val::Map(entries) => {
                for (k, v) in entries {
                    let name = k.scalar().unwrap_or_default().to_string();
                    let item_path = child(path, &name);
                    let value = match &v.val {
                        _ if v.is_null() => String::new(),
                        Val::Scalar { text, .. } => text.clone(),
                        _ => return Err(self.expected(v, &item_path, "a string")),
                    };
                    add(name, value, k.at, &item_path)?;
                }
            }
            Val::Seq(items) if list_ok => {
                for (i, item) in items.iter().enumerate() {
                    let item_path = index(path, i);
                    let text = self.string(item, &item_path)?;
                    // fig's rule: NAME=VALUE, or NAME alone for an empty value.
                    let (name, value) = text.split_once('=').unwrap_or((&text, ""));
                    add(name.to_string(), value.to_string(), item.at, &item_path)?;
                }
            }
            _ if y.is_null() => {}
            _ => {
                let what = if list_ok {
                    "a mapping of names to values, or a list of NAME=VALUE"
                } else {
                    "a mapping of names to values (lists of NAME=VALUE are for compose files)"
                };
                return Err(self.expected(y, path, what));
            }
        }
        Ok(env)
    }

    /// A size in bytes: an integer, or a string such as 500M or 1G (see [`super::parse_size`]).
    pub fn size(&self, y: &Yaml, path: &str) -> Result<u64, ConfigError> {
        match &y.val {
            Val::Scalar { text, .. } if !y.is_null() => {
                super::parse_size(text).map_err(|m| self.err(y.at, path, m))
            }
            _ => Err(self.expected(y, path, "a size (500M, 1G or bytes)")),
        }
    }

    /// A volume's `maximum_size` (see [`volume_size`]).
    pub fn volume_size(&self, y: &Yaml, path: &str) -> Result<u64, ConfigError> {
        match &y.val {
            Val::Scalar { text, .. } if !y.is_null() => {
                volume_size(text).map_err(|m| self.err(y.at, path, m))
            }
            _ => Err(self.expected(y, path, "a size (500M, 1G or bytes)")),
        }
    }

    /// A volume's retention policy: a string (see [`retention`]) or a mapping of tiers
    /// (`{last: 5, daily: 3}`, a tier not given keeping its default).
    pub fn retention(&self, y: &Yaml, path: &str) -> Result<Option<Retention>, ConfigError> {
        match &y.val {
            Val::Scalar { text, .. } if !y.is_null() => {
                retention(text).map_err(|m| self.err(y.at, path, m))
            }
            Val::Map(entries) => {
                let tiers = ["last", "hourly", "daily"];
                self.check_keys(entries, path, &tiers, "a retention policy")?;
                if entries.is_empty() {
                    return Err(self.err(
                        y.at,
                        path,
                        format!("an empty retention policy; write {RETENTION_FORMS}, or default"),
                    ));
                }
                let mut r = Retention::default();
                for (k, v) in entries {
                    let tier = k.scalar().unwrap_or_default();
                    let tier_path = child(path, tier);
                    let n = self.uint(v, &tier_path)?;
                    let n = u32::try_from(n).map_err(|_| {
                        self.err(
                            v.at,
                            &tier_path,
                            format!("{tier}={n} is more than {MAX_KEEP}"),
                        )
                    })?;
                    match tier {
                        "last" => r.last = n,
                        "hourly" => r.hourly = n,
                        _ => r.daily = n,
                    }
                    // The default passes and each tier is checked on its own: a failure now
                    // is this tier's.
                    r.validate().map_err(|m| self.err(v.at, &tier_path, m))?;
                }
                Ok(Some(r))
            }
            _ => Err(self.expected(y, path, &format!("a retention policy ({RETENTION_FORMS})"))),
        }
    }

    /// `mem_limit`: bytes, as an integer or a size string; not zero.
    /// A volume's `replicas`: copies kept on other nodes, for failover.
    pub fn replicas(&self, y: &Yaml, path: &str) -> Result<u32, ConfigError> {
        let n = self.uint(y, path)?;
        let max = crate::failover::MAX_REPLICAS;
        u32::try_from(n)
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| self.err(y.at, path, format!("{n} replicas; at most {max}")))
    }

    /// A volume's `snapshot_interval`, in milliseconds.
    pub fn interval(&self, y: &Yaml, path: &str) -> Result<u64, ConfigError> {
        let text = self.string(y, path)?;
        interval_ms(&text).map_err(|m| self.err(y.at, path, m))
    }

    pub fn mem_limit(&self, y: &Yaml, path: &str) -> Result<u64, ConfigError> {
        let bytes = self.size(y, path)?;
        if bytes == 0 {
            return Err(self.err(y.at, path, "0 is not a limit; leave mem_limit out for none"));
        }
        Ok(bytes)
    }

    /// `cpu_shares`: a positive integer.
    pub fn cpu_shares(&self, y: &Yaml, path: &str) -> Result<u64, ConfigError> {
        let shares = self.uint(y, path)?;
        if shares == 0 {
            return Err(self.err(
                y.at,
                path,
                "0 is not a weight; leave cpu_shares out for the default (1024)",
            ));
        }
        Ok(shares)
    }
}

/// The two ways to write a retention policy, for messages.
const RETENTION_FORMS: &str =
    "last=3,hourly=24,daily=7 or {last: 3, hourly: 24, daily: 7}, each tier optional";

/// A volume's size limit written as text: a size (see [`super::parse_size`]) of at least
/// [`MIN_VOLUME_SIZE`].
pub(crate) fn volume_size(text: &str) -> Result<u64, String> {
    let bytes = super::parse_size(text)?;
    if bytes < MIN_VOLUME_SIZE {
        let hint = if is_digits(text) {
            format!("; did you mean \"{text}M\"?")
        } else {
            String::new()
        };
        return Err(format!(
            "{text_shown} is {bytes} bytes, too small for a volume (at least 1M){hint}",
            text_shown = crate::limits::shown(text)
        ));
    }
    Ok(bytes)
}

/// A retention policy written as text, as [`Retention`] parses it (`last=5,daily=3`); `None`
/// for `default`: the default policy, whatever it is when it is applied.
/// A snapshot interval: `500ms`, `2s`, `1m`, `1h`, or a number of seconds (`2`, `0.5`), in
/// milliseconds, within the bounds replication allows.
pub fn interval_ms(text: &str) -> Result<u64, String> {
    use crate::failover::{MAX_INTERVAL_MS, MIN_INTERVAL_MS};
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    if num.trim().is_empty() {
        return Err(format!(
            "snapshot interval {t:?} is not a duration (2s, 500ms)"
        ));
    }
    let scale = match unit {
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => {
            return Err(format!(
                "snapshot interval {t:?}: the unit must be ms, s, m or h (2s, 500ms)"
            ))
        }
    };
    let n: f64 = num
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| format!("snapshot interval {t:?} is not a duration (2s, 500ms)"))?;
    let ms = (n * scale).round();
    if ms < MIN_INTERVAL_MS as f64 || ms > MAX_INTERVAL_MS as f64 {
        return Err(format!(
            "snapshot interval {t:?} is outside {MIN_INTERVAL_MS}ms to 24h"
        ));
    }
    Ok(ms as u64)
}

/// A compose duration, as Go's `time.ParseDuration` reads it: one or more numbers with a
/// unit each (`1m30s`, `10s`, `500ms`, `1.5h`; units `ns`, `us`, `ms`, `s`, `m`, `h`), in
/// milliseconds (rounded); a bare number is seconds.
pub(crate) fn duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "{} is not a duration (write 1m30s, 10s or 500ms)",
            crate::limits::shown(text)
        )
    };
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok((secs * 1000.0).round() as u64);
        }
        return Err(bad());
    }
    let mut ms = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-6,
            "us" | "µs" => 1e-3,
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return Err(bad()),
        };
        ms += n * scale;
        rest = tail;
    }
    if !ms.is_finite() || ms > u64::MAX as f64 / 2.0 {
        return Err(bad());
    }
    Ok(ms.round() as u64)
}

pub(crate) fn retention(text: &str) -> Result<Option<Retention>, String> {
    if text.trim() == "default" {
        return Ok(None);
    }
    text.parse().map(Some)
}

/// The value of `key` in a mapping's entries.
pub(crate) fn get<'y>(entries: &'y [(Yaml, Yaml)], key: &str) -> Option<&'y Yaml> {
    entry(entries, key).map(|(_, v)| v)
}

/// The key node and value of `key` in a mapping's entries.
pub(crate) fn entry<'y>(entries: &'y [(Yaml, Yaml)], key: &str) -> Option<(&'y Yaml, &'y Yaml)> {
    entries
        .iter()
        .find(|(k, _)| k.scalar() == Some(key))
        .map(|(k, v)| (k, v))
}

pub(crate) fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// A port number 1..=65535 written as digits.
pub(crate) fn port_number(text: &str) -> Option<u16> {
    if !is_digits(text) {
        return None;
    }
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Whether `a` is a likely misspelling of `b`: at most two edits apart.
pub(crate) fn near(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 2 {
        return false;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()] <= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(child("", "applications"), "applications");
        assert_eq!(child("applications", "web"), "applications.web");
        assert_eq!(child("nodes", "172.16.255.250"), "nodes.\"172.16.255.250\"");
        assert_eq!(index("a.ports", 2), "a.ports[2]");
    }

    #[test]
    fn compose_durations() {
        assert_eq!(duration_ms("1m30s"), Ok(90_000));
        assert_eq!(duration_ms("10s"), Ok(10_000));
        assert_eq!(duration_ms("500ms"), Ok(500));
        assert_eq!(duration_ms("1.5h"), Ok(5_400_000));
        assert_eq!(duration_ms("30"), Ok(30_000));
        assert_eq!(duration_ms("2us"), Ok(0));
        assert!(duration_ms("10x").is_err());
        assert!(duration_ms("s").is_err());
        assert!(duration_ms("").is_err());
        assert!(duration_ms("-1s").is_err());
    }

    #[test]
    fn near_misses() {
        assert!(near("image", "imgae"));
        assert!(near("ports", "port"));
        assert!(!near("volume", "links"));
    }
}
