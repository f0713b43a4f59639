//! Time as a dependency: code asks a [`Clock`] for "now" instead of calling the system clock, so
//! that tests and the provider sandbox can move time forward without sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use time::OffsetDateTime;

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant, in UTC.
    fn now(&self) -> OffsetDateTime;
}

/// The wall clock, plus an offset that a test-only control endpoint may advance.
#[derive(Debug, Default)]
pub struct SystemClock {
    /// Milliseconds added to the system time (zero outside tests and demos).
    offset_ms: AtomicI64,
}

impl SystemClock {
    /// A shared system clock.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Moves this clock forward by `seconds` (used by the sandbox control endpoint), by at most
    /// [`MAX_OFFSET_MS`] in all.
    pub fn advance(&self, seconds: i64) {
        let step = seconds.saturating_mul(1000);
        let _ = self.offset_ms.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |offset| {
            Some(offset.saturating_add(step).min(MAX_OFFSET_MS))
        });
    }
}

/// How far the clock can be moved forward in all: a hundred years, so that every time it gives
/// stays far from the end of the representable range.
pub const MAX_OFFSET_MS: i64 = 100 * 365 * 86_400_000;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        let offset = self.offset_ms.load(Ordering::SeqCst);
        let now = OffsetDateTime::now_utc();
        now.checked_add(time::Duration::milliseconds(offset)).unwrap_or(now)
    }
}

/// Milliseconds since the Unix epoch: the form every timestamp takes in the database, so that
/// comparisons and indexes behave the same on SQLite and PostgreSQL.
pub fn to_millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The inverse of [`to_millis`]; out-of-range values clamp to the Unix epoch.
pub fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip() {
        let t =
            OffsetDateTime::from_unix_timestamp(1_764_000_000).unwrap() + time::Duration::milliseconds(123);
        assert_eq!(from_millis(to_millis(t)), t);
    }

    #[test]
    fn advance_moves_now_forward() {
        let c = SystemClock::default();
        let before = c.now();
        c.advance(3600);
        assert!(c.now() - before >= time::Duration::seconds(3600));
    }

    #[test]
    fn advance_stops_a_hundred_years_ahead() {
        let c = SystemClock::default();
        c.advance(i64::MAX);
        c.advance(i64::MAX);
        let ahead = c.now() - OffsetDateTime::now_utc();
        assert!(ahead <= time::Duration::milliseconds(MAX_OFFSET_MS), "{ahead}");
        assert!(ahead >= time::Duration::milliseconds(MAX_OFFSET_MS) - time::Duration::minutes(1), "{ahead}");
    }
}
