//! What flockctl shows of a push ([`Transfer`]): a move's progress line and the failures of
//! pushes that `dataset ls` and `status` show. Pure functions of the API's values, so what a
//! person reads is tested without a cluster.

use std::time::Duration;

use flock_client::human;
use flock_decide::moves::MovePhase;
use flock_proto::v1::Transfer;

/// A phase's name (the API's) in words; an unknown one (a newer node's) as it is.
pub fn phase_words(phase: &str) -> &str {
    match MovePhase::from_name(phase) {
        Some(p) => p.words(),
        None => phase,
    }
}

/// Whether the phase streams bytes (a count, a rate and maybe a bar make sense).
fn streams(phase: &str) -> bool {
    matches!(
        MovePhase::from_name(phase),
        Some(MovePhase::Full | MovePhase::Incremental | MovePhase::FinalDelta)
    )
}

/// Whether the attempt that reported this is over (done, given up, or waiting to retry).
fn ended(phase: &str) -> bool {
    MovePhase::from_name(phase).is_some_and(MovePhase::has_ended)
}

/// A duration as a person reads it, to the second ("2m 5s").
fn secs(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// A milliseconds count, rounded up to the second.
fn ms_secs(ms: u64) -> String {
    secs(Duration::from_millis(ms.div_ceil(1000) * 1000))
}

/// One progress line of a move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The phase in words.
    pub words: String,
    /// Position and length of a bar: only while a stream of known size runs.
    pub bar: Option<(u64, u64)>,
    /// Bytes, rate, ETA, the attempt and its failures, as they apply.
    pub detail: String,
}

/// The line to show for `t` (a report [`Follow::current`] let through).
pub fn line(t: &Transfer) -> Line {
    let mut parts: Vec<String> = Vec::new();
    let mut bar = None;
    if streams(&t.phase) {
        // Before a size is known: the count and the rate, never a full bar.
        let mut count = human(t.bytes);
        if t.total > 0 {
            count.push_str(&format!(" of {}", human(t.total)));
            bar = Some((t.bytes.min(t.total), t.total));
        }
        if t.bytes_per_sec >= 1.0 {
            count.push_str(&format!(" at {}/s", human(t.bytes_per_sec as u64)));
        }
        if let Some(eta) = t.eta_secs {
            count.push_str(&format!(", eta {}", secs(Duration::from_secs(eta))));
        }
        parts.push(count);
    }
    let phase = MovePhase::from_name(&t.phase);
    match phase {
        Some(MovePhase::Retrying) => {
            let mut s = format!("attempt {} failed", shown_attempt(t));
            if let Some(ms) = t.retry_in_ms {
                s.push_str(&format!(", retry in {}", ms_secs(ms)));
            }
            if !t.last_error.is_empty() {
                s.push_str(&format!(": {}", t.last_error));
            }
            parts.push(s);
        }
        Some(MovePhase::Failed) if !t.last_error.is_empty() => parts.push(t.last_error.clone()),
        _ if t.attempt > 1 => parts.push(if t.last_error.is_empty() {
            format!("attempt {}", t.attempt)
        } else {
            format!(
                "attempt {}; attempt {} failed: {}",
                t.attempt,
                t.attempt - 1,
                t.last_error
            )
        }),
        _ => {}
    }
    if !t.degraded.is_empty() {
        parts.push(format!("degraded: {}", t.degraded));
    }
    Line {
        words: phase_words(&t.phase).to_string(),
        bar,
        detail: parts.join("; "),
    }
}

/// The attempt number to name ("?" from a node too old to count them).
fn shown_attempt(t: &Transfer) -> String {
    if t.attempt == 0 {
        "?".into()
    } else {
        t.attempt.to_string()
    }
}

/// What a follower of one move has seen, so that a report of an earlier attempt, or of an
/// earlier move to the same node, is never shown as this one's progress.
#[derive(Clone, Debug, Default)]
pub struct Follow {
    /// The newest attempt seen.
    attempt: u32,
}

impl Follow {
    /// A follower that has seen nothing yet.
    pub fn new() -> Follow {
        Follow::default()
    }

    /// Whether `t` is this move's current report, `following` being how long the follower has
    /// followed (the move began no earlier). Not: an attempt older than one seen, or an ended
    /// report (done, failed, retrying) of an attempt that started before the follow did (an
    /// earlier move's, kept for a while).
    pub fn current(&mut self, t: &Transfer, following: Duration) -> bool {
        if t.attempt < self.attempt {
            return false;
        }
        // A node older than the attempt fields reports 0 for both: nothing to tell by.
        let old_node = t.attempt == 0 && t.attempt_elapsed_ms == 0;
        // A second of slack for the clocks' and the calls' delays.
        let before_follow =
            Duration::from_millis(t.attempt_elapsed_ms) > following + Duration::from_secs(1);
        if ended(&t.phase) && before_follow && !old_node {
            return false;
        }
        self.attempt = t.attempt;
        true
    }
}

/// What a person should know about push `t` of `dataset` that went wrong: a failing or given
/// up push, one retried after a failure, a replica without room. `None`: nothing wrong.
pub fn push_problem(t: &Transfer) -> Option<String> {
    let what = if t.kind == "move" {
        "move to"
    } else {
        "push to"
    };
    let to = &t.to_node;
    let mut out = Vec::new();
    if !t.degraded.is_empty() {
        let mut s = format!("replica {to} degraded");
        if let Some(ms) = t.retry_in_ms {
            s.push_str(&format!(" (retry in {})", ms_secs(ms)));
        }
        out.push(format!("{s}: {}", t.degraded));
    }
    let error = if t.last_error.is_empty() {
        "no reason reported"
    } else {
        &t.last_error
    };
    match MovePhase::from_name(&t.phase) {
        // A degraded replica's failure is its degradation.
        _ if !t.degraded.is_empty() => {}
        Some(MovePhase::Retrying) => {
            let mut s = format!("{what} {to} failed (attempt {}", shown_attempt(t));
            if let Some(ms) = t.retry_in_ms {
                s.push_str(&format!(", retry in {}", ms_secs(ms)));
            }
            out.push(format!("{s}): {error}"));
        }
        Some(MovePhase::Failed) => out.push(format!("{what} {to} failed, given up: {error}")),
        Some(p) if !p.has_ended() && t.attempt > 1 && !t.last_error.is_empty() => {
            out.push(format!(
                "{what} {to} on attempt {} ({}), attempt {} failed: {error}",
                t.attempt,
                p.words(),
                t.attempt - 1
            ))
        }
        _ => {}
    }
    (!out.is_empty()).then(|| out.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn t(phase: &str) -> Transfer {
        Transfer {
            dataset: "db".into(),
            to_node: "n2".into(),
            phase: phase.into(),
            attempt: 1,
            kind: "move".into(),
            ..Default::default()
        }
    }

    #[test]
    fn no_bar_before_the_size_is_known() {
        let mut x = t("full");
        x.bytes = 12 * MIB;
        x.bytes_per_sec = 3.0 * MIB as f64;
        let l = line(&x);
        assert_eq!(l.bar, None);
        assert_eq!(l.words, "full copy");
        assert_eq!(l.detail, "12.0 MiB at 3.0 MiB/s");
        // Known: a bar, and the ETA the node computed.
        x.total = 100 * MIB;
        x.eta_secs = Some(30);
        let l = line(&x);
        assert_eq!(l.bar, Some((12 * MIB, 100 * MIB)));
        assert_eq!(l.detail, "12.0 MiB of 100.0 MiB at 3.0 MiB/s, eta 30s");
        // An estimate exceeded: the bar is full, not past its end.
        x.bytes = 120 * MIB;
        x.eta_secs = None;
        assert_eq!(line(&x).bar, Some((100 * MIB, 100 * MIB)));
        // No rate yet: none shown.
        x.bytes_per_sec = 0.0;
        assert_eq!(line(&x).detail, "120.0 MiB of 100.0 MiB");
    }

    #[test]
    fn phases_without_a_stream_show_their_words_only() {
        for (phase, words) in [
            ("snapshot", "snapshot"),
            ("handoff", "handing off"),
            ("stopping-app", "waiting for the app to stop"),
            ("committing", "commit"),
            ("some-newer-phase", "some-newer-phase"),
        ] {
            let mut x = t(phase);
            // Bytes left from the stream before are not this phase's.
            x.bytes = 5 * MIB;
            x.total = 5 * MIB;
            let l = line(&x);
            assert_eq!(
                (l.words.as_str(), l.bar, l.detail.as_str()),
                (words, None, "")
            );
        }
        let mut x = t("final-delta");
        x.bytes = MIB;
        assert_eq!(line(&x).words, "final delta");
        assert_eq!(line(&x).detail, "1.0 MiB");
    }

    #[test]
    fn a_failed_attempt_says_so_and_when_the_next_starts() {
        let mut x = t("retrying");
        x.attempt = 3;
        x.bytes = 40 * MIB;
        x.total = 100 * MIB;
        x.last_error = "connection reset".into();
        x.retry_in_ms = Some(1500);
        let l = line(&x);
        assert_eq!(l.words, "retrying");
        assert_eq!(l.bar, None);
        assert_eq!(l.detail, "attempt 3 failed, retry in 2s: connection reset");
        // The next attempt runs: its own numbers, and why the one before failed.
        let mut x = t("incremental");
        x.attempt = 4;
        x.bytes = MIB;
        x.last_error = "connection reset".into();
        assert_eq!(
            line(&x).detail,
            "1.0 MiB; attempt 4; attempt 3 failed: connection reset"
        );
        let mut x = t("failed");
        x.last_error = "n2 has no room".into();
        assert_eq!(line(&x).detail, "n2 has no room");
    }

    #[test]
    fn earlier_attempts_and_earlier_moves_are_not_current() {
        let following = Duration::from_secs(10);
        let mut f = Follow::new();
        // The move before this one, done 5 minutes ago.
        let mut old = t("done");
        old.attempt_elapsed_ms = 300_000;
        assert!(!f.current(&old, following));
        let mut old = t("failed");
        old.attempt_elapsed_ms = 300_000;
        assert!(!f.current(&old, following));
        // This move's first attempt, then its second.
        let mut a1 = t("full");
        a1.attempt_elapsed_ms = 5_000;
        assert!(f.current(&a1, following));
        let mut a2 = t("snapshot");
        a2.attempt = 2;
        assert!(f.current(&a2, following));
        // A late report of attempt 1 (another node's view, a reordered reply).
        a1.phase = "retrying".into();
        assert!(!f.current(&a1, following));
        // An ended report of an attempt that began before the follow: not this move's.
        let mut a3 = t("retrying");
        a3.attempt = 3;
        a3.attempt_elapsed_ms = 600_000;
        assert!(!f.current(&a3, following));
        a3.attempt_elapsed_ms = 2_000;
        assert!(f.current(&a3, following));
        // A node that does not count attempts: shown as it is.
        let mut f = Follow::new();
        let mut legacy = t("done");
        legacy.attempt = 0;
        assert!(f.current(&legacy, following));
    }

    #[test]
    fn push_problems_name_the_target_attempt_retry_and_reason() {
        let mut x = t("retrying");
        x.kind = "replica".into();
        x.attempt = 4;
        x.retry_in_ms = Some(120_000);
        x.last_error = "connection refused".into();
        assert_eq!(
            push_problem(&x).as_deref(),
            Some("push to n2 failed (attempt 4, retry in 2m): connection refused")
        );
        x.kind = "move".into();
        x.retry_in_ms = None;
        assert_eq!(
            push_problem(&x).as_deref(),
            Some("move to n2 failed (attempt 4): connection refused")
        );
        let mut x = t("retrying");
        x.kind = "replica".into();
        x.to_node = "n3".into();
        x.degraded = "no space left (needs 2.0 GiB, 1.1 GiB free)".into();
        x.retry_in_ms = Some(300_000);
        assert_eq!(
            push_problem(&x).as_deref(),
            Some("replica n3 degraded (retry in 5m): no space left (needs 2.0 GiB, 1.1 GiB free)")
        );
        let mut x = t("failed");
        x.last_error = "n2 is full".into();
        assert_eq!(
            push_problem(&x).as_deref(),
            Some("move to n2 failed, given up: n2 is full")
        );
        // Running again after a failure.
        let mut x = t("full");
        x.attempt = 2;
        x.last_error = "reset".into();
        assert_eq!(
            push_problem(&x).as_deref(),
            Some("move to n2 on attempt 2 (full copy), attempt 1 failed: reset")
        );
        // Nothing wrong.
        for p in ["full", "snapshot", "done", "stopping-app"] {
            assert_eq!(push_problem(&t(p)), None, "{p}");
        }
        let mut x = t("retrying");
        x.attempt = 0;
        assert_eq!(
            push_problem(&x).as_deref(),
            Some("move to n2 failed (attempt ?): no reason reported")
        );
    }
}
