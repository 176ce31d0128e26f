//! Which of a dataset's snapshots are kept: the retention policy, and the names that tell the
//! snapshots flock takes by itself from the ones a user took.
//!
//! flock takes snapshots by itself for a move's rounds (`move-...`) and, with continuous
//! replication, periodically (`auto-...`); these are *automatic* and pruned by the dataset's
//! [`Retention`]: the `last` newest are kept whatever their age, then one per hour for `hourly`
//! hours and one per day for `daily` days (sanoid's hourly/daily, zrepl's grid), the hours and
//! days counted back from the newest snapshot. Every other snapshot (`flockctl dataset snapshot`,
//! with or without `--tag`, and the `pre-rollback-...` snapshot a rollback keeps) was asked for
//! by a user and is kept until a user removes it. A user's tag may not take an automatic prefix.
//!
//! The policy is what may go; what must stay whatever the policy says (the newest snapshot, the
//! base each replica's next incremental starts from) is decided where the state is known
//! ([`crate::ClusterState::apply`] refuses to prune them).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The name prefixes of the snapshots flock takes by itself.
pub const AUTOMATIC_PREFIXES: [&str; 2] = ["move-", "auto-"];

/// The prefix of the snapshot a rollback keeps of the state it replaced (a user's snapshot).
pub const PRE_ROLLBACK_PREFIX: &str = "pre-rollback-";

/// The most snapshots a policy may keep in any one of its tiers (a typo such as `last=30000`
/// would keep a pile no one wants).
pub const MAX_KEEP: u32 = 1000;

/// Whether flock took the snapshot named `name` by itself (so its retention may prune it).
pub fn is_automatic(name: &str) -> bool {
    AUTOMATIC_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// How many automatic snapshots of a dataset are kept. See the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Retention {
    /// The newest automatic snapshots kept, whatever their age.
    pub last: u32,
    /// Then the newest of each hour, for this many hours back from the newest snapshot.
    pub hourly: u32,
    /// Then the newest of each day, for this many days back from the newest snapshot.
    pub daily: u32,
}

impl Default for Retention {
    /// The three newest, one an hour for a day, one a day for a week.
    fn default() -> Self {
        Retention {
            last: 3,
            hourly: 24,
            daily: 7,
        }
    }
}

impl Retention {
    /// The most automatic snapshots this policy keeps at once.
    pub fn bound(&self) -> u64 {
        u64::from(self.last) + u64::from(self.hourly) + u64::from(self.daily)
    }

    /// Checks the tiers' bounds; `last` must be at least 1 (the newest automatic snapshot
    /// is often the base of the next push).
    pub fn validate(&self) -> Result<(), String> {
        if self.last == 0 {
            return Err("last=0 would drop the newest snapshot; keep at least last=1".into());
        }
        for (tier, n) in [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
        ] {
            if n > MAX_KEEP {
                return Err(format!("{tier}={n} is more than {MAX_KEEP}"));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "last={},hourly={},daily={}",
            self.last, self.hourly, self.daily
        )
    }
}

impl FromStr for Retention {
    type Err = String;

    /// `last=N,hourly=N,daily=N`, any of them, in any order, separated by commas or spaces;
    /// a tier not given keeps its default. `default` is the default policy.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = "use e.g. last=3,hourly=24,daily=7 (each tier optional)";
        let text = text.trim();
        let mut r = Retention::default();
        if text == "default" {
            return Ok(r);
        }
        let mut any = false;
        for part in text.split([',', ' ']).filter(|p| !p.is_empty()) {
            let Some((key, value)) = part.split_once('=') else {
                return Err(format!("{part:?} is not TIER=N; {usage}"));
            };
            let n: u32 = value
                .trim()
                .parse()
                .map_err(|_| format!("{value:?} in {part:?} is not a whole number; {usage}"))?;
            match key.trim() {
                "last" => r.last = n,
                "hourly" => r.hourly = n,
                "daily" => r.daily = n,
                other => {
                    return Err(format!(
                        "unknown retention tier {other:?}: the tiers are last, hourly and daily; {usage}"
                    ))
                }
            }
            any = true;
        }
        if !any {
            return Err(format!("an empty retention policy; {usage}"));
        }
        r.validate()?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let r: Retention = "last=5, daily=2".parse().unwrap();
        assert_eq!(
            r,
            Retention {
                last: 5,
                hourly: 24,
                daily: 2
            }
        );
        assert_eq!(r.to_string().parse::<Retention>().unwrap(), r);
        assert_eq!(
            "default".parse::<Retention>().unwrap(),
            Retention::default()
        );
        assert_eq!(r.bound(), 31);
    }

    #[test]
    fn bad_policies_say_what_is_wrong() {
        for (text, says) in [
            ("", "empty"),
            ("last", "TIER=N"),
            ("last=x", "whole number"),
            ("weekly=3", "unknown retention tier"),
            ("last=0", "last=1"),
            ("hourly=5000", "more than"),
        ] {
            let e = text.parse::<Retention>().unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn automatic_names() {
        assert!(is_automatic("move-2026-11-23T23-15-49.123Z"));
        assert!(is_automatic("auto-1"));
        assert!(!is_automatic("2026-11-23T23-15-49.123Z"));
        assert!(!is_automatic("pre-rollback-x"));
        assert!(!is_automatic("nightly"));
    }
}
