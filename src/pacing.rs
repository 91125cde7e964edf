//! Pacing of requests to Consul: capped exponential backoff with jitter for
//! failures, and a token bucket that coalesces storms of wake-ups.
//!
//! Both are pure (time is passed in), so they are tested without sleeping.

use std::time::{Duration, Instant};

/// Capped exponential backoff with "equal jitter": the n-th delay is drawn
/// from [d/2, d] where d = min(cap, base × 2ⁿ), so retries from many agents
/// spread out instead of arriving together.
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Backoff {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        Backoff {
            base,
            cap,
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// The delay before the next retry.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        let ceiling = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(self.random_unit())
    }

    /// After a success: the next failure starts from the base delay again.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    fn random_unit(&mut self) -> f64 {
        // xorshift64: plenty for jitter.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A token bucket: `burst` requests at once after a quiet spell, then one
/// per `refill`. The first change after a quiet spell is acted on at once;
/// a storm of wake-ups is coalesced into one read per `refill`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    burst: f64,
    refill: Duration,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(burst: u32, refill: Duration, now: Instant) -> TokenBucket {
        TokenBucket {
            burst: f64::from(burst),
            refill,
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes a token: returns how long to wait before the request may go
    /// (zero when a token was available).
    pub(crate) fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens =
            (self.tokens + elapsed.as_secs_f64() / self.refill.as_secs_f64()).min(self.burst);
        // A wait cut short (a ring ends a watch's pause) is not owed: the
        // debt never exceeds one request, so no pause exceeds one refill.
        self.tokens = (self.tokens - 1.0).max(-1.0);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            self.refill.mul_f64(-self.tokens)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(5)));
        assert!(delays[11] >= Duration::from_millis(2500));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut a = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let delays: std::collections::BTreeSet<Duration> =
            (0..20).map(|_| a.next_delay()).collect();
        assert!(delays.len() > 10);
    }

    #[test]
    fn a_bucket_lets_a_burst_through_then_paces_a_storm() {
        let start = Instant::now();
        let refill = Duration::from_millis(100);
        let mut bucket = TokenBucket::new(3, refill, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Duration::ZERO);
        }
        let wait = bucket.take(start);
        assert!(
            wait > Duration::from_millis(99) && wait <= refill,
            "{wait:?}"
        );
        // After waiting it out the request goes, and the next one waits again.
        let later = start + wait;
        let wait2 = bucket.take(later);
        assert!(wait2 > Duration::from_millis(99), "{wait2:?}");
    }

    #[test]
    fn a_pause_cut_short_never_makes_the_next_one_longer_than_one_refill() {
        // A watch pauses for the wait `take` returns, but a ring ends the
        // pause early and the watch reads at once. Its next pause must
        // still be at most one refill: the reads it skipped are not owed.
        let start = Instant::now();
        let refill = Duration::from_secs(5);
        let mut bucket = TokenBucket::new(2, refill, start);
        bucket.take(start);
        bucket.take(start);
        assert_eq!(bucket.take(start), refill);
        let cut_short = start + Duration::from_millis(10);
        let wait = bucket.take(cut_short);
        assert!(wait <= refill, "{wait:?}");
        assert!(wait > refill - Duration::from_millis(20), "{wait:?}");
    }

    #[test]
    fn a_quiet_spell_refills_the_bucket() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, Duration::from_millis(100), start);
        for _ in 0..5 {
            bucket.take(start);
        }
        let quiet = start + Duration::from_secs(10);
        assert_eq!(bucket.take(quiet), Duration::ZERO);
        assert_eq!(bucket.take(quiet), Duration::ZERO);
        assert!(bucket.take(quiet) > Duration::ZERO);
    }
}
