//! Sizes as people write and read them (dataset size limits, transfer progress).

/// A size that [`parse_size`] refused; the message quotes it and says what to write.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadSize(String);

/// Parses a size: a number with an optional unit (K, M, G, T, P; KB/KiB and friends are all
/// powers of 1024, as zfs counts), with the rules of application.yml's sizes (exact: a fraction
/// rounds up to the next byte), as the scheduler parses them: one parser for every size flock
/// reads.
pub fn parse_size(s: &str) -> Result<u64, BadSize> {
    match flock_scheduler::config::parse_size(s) {
        Ok(0) => Err(BadSize(format!(
            "{s:?} is not a usable size (at least 1 byte)"
        ))),
        Ok(n) => Ok(n),
        Err(_) => Err(BadSize(format!(
            "{s:?} is not a size; write a number with an optional unit, such as 512M, 10G or 1.5T"
        ))),
    }
}

/// Bytes for people: 1.5 GiB (the scheduler's [`flock_scheduler::config::human_size`]).
pub use flock_scheduler::config::human_size as human;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2 tb"), Ok(2 << 40));
        for bad in ["", "G", "ten", "10X", "-5M", "0", "1e3"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
