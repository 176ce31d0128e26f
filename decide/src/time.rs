//! Time as the decisions see it: handed in, never read.

use std::time::Duration;

/// A point on one node's monotonic clock, in milliseconds from an origin the caller chose (the
/// executor: when flockd started; the simulation: 0). Only differences mean anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    pub const ZERO: Instant = Instant(0);

    pub fn from_millis(ms: u64) -> Instant {
        Instant(ms)
    }

    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        Instant(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Instant::from_millis(1000);
        assert_eq!((t + Duration::from_millis(500)).as_millis(), 1500);
        assert_eq!(
            t.saturating_since(Instant::from_millis(2000)),
            Duration::ZERO
        );
        assert_eq!(
            Instant::from_millis(2500).saturating_since(t),
            Duration::from_millis(1500)
        );
        assert_eq!((t + Duration::MAX).as_millis(), u64::MAX);
    }
}
