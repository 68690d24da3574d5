//! Error lines that every request would write while a dependency is down (the store
//! unreachable or its write queue full, the key device failing) are written at most once a
//! second, each with how many were left out since the one before. An outage then gives a
//! readable log instead of one ERROR line per refused request, and a client cannot make the
//! log grow as fast as it can send. Every refusal is still counted
//! (`keygate_requests_failed_total`), and the client still gets its problem document.

use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// One kind of repeated error line: at most one a second (GCRA, governor).
pub(super) struct Throttle<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    skipped: AtomicU64,
}

impl<C: Clock> Throttle<C> {
    fn with_clock(clock: C) -> Self {
        Throttle {
            limiter: RateLimiter::direct_with_clock(Quota::per_second(NonZeroU32::MIN), clock),
            skipped: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written now; `None`
    /// (and one more left out) when not.
    pub(super) fn admit(&self) -> Option<u64> {
        if self.limiter.check().is_ok() {
            Some(self.skipped.swap(0, Ordering::Relaxed))
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// "store failed" (`error.rs`).
pub(super) static STORE_FAILED: LazyLock<Throttle> =
    LazyLock::new(|| Throttle::with_clock(DefaultClock::default()));
/// "key backend failed" (`error.rs`).
pub(super) static BACKEND_FAILED: LazyLock<Throttle> =
    LazyLock::new(|| Throttle::with_clock(DefaultClock::default()));

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;

    #[test]
    fn one_line_a_second_with_the_count_left_out() {
        let clock = FakeRelativeClock::default();
        let t = Throttle::with_clock(clock.clone());
        assert_eq!(t.admit(), Some(0));
        for _ in 0..250 {
            assert_eq!(t.admit(), None);
        }
        clock.advance(Duration::from_millis(999));
        assert_eq!(t.admit(), None);
        clock.advance(Duration::from_millis(1));
        assert_eq!(t.admit(), Some(251), "the next line says how many were left out");
        assert_eq!(t.admit(), None);
        // after a quiet spell, one line at once again, and no burst of them
        clock.advance(Duration::from_secs(60));
        assert_eq!(t.admit(), Some(1));
        assert_eq!(t.admit(), None);
    }
}
