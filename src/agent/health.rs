//! The health gate after a rollout: when to check again and when to give
//! up. Pure: the agent asks it, with the time, what comes next.
//!
//! The health hook runs as soon as the rollout hook succeeded, then again
//! [`RETRY`] after each failed attempt started, until one passes or
//! `health_timeout` has elapsed since the first: no attempt starts after
//! that, each attempt's own time limit is cut to what is left of it, and
//! the gate fails when it has elapsed, not before (a 4s gate whose
//! attempts fail at once tries at 0, 1, 2 and 3s, and fails at 4s).

use std::time::{Duration, Instant};

/// How long after a failed health attempt started the next one starts.
pub(crate) const RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HealthGate {
    /// When the first attempt started.
    pub started: Instant,
    /// `health_timeout`.
    pub limit: Duration,
    /// Attempts started so far.
    pub attempts: u32,
    /// When the last attempt started.
    pub last_start: Instant,
}

/// What follows a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Start another attempt at this time.
    Attempt(Instant),
    /// Fail the gate at this time (its deadline).
    GiveUp(Instant),
}

impl HealthGate {
    /// A gate whose first attempt starts `now`.
    pub(crate) fn new(now: Instant, limit: Duration) -> HealthGate {
        HealthGate {
            started: now,
            limit,
            attempts: 0,
            last_start: now,
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.started + self.limit
    }

    /// Records an attempt starting `now`; returns its time limit: the
    /// hook's `timeout`, cut to what is left of the gate.
    pub(crate) fn attempt(&mut self, now: Instant, hook_timeout: Duration) -> Duration {
        self.attempts += 1;
        self.last_start = now;
        hook_timeout
            .min(self.deadline().saturating_duration_since(now))
            .max(Duration::from_millis(100))
    }

    /// After an attempt failed at `now`: the next attempt, or the end.
    pub(crate) fn after_failure(&self, now: Instant) -> Next {
        let next = (self.last_start + RETRY).max(now);
        if next < self.deadline() {
            Next::Attempt(next)
        } else {
            Next::GiveUp(self.deadline().max(now))
        }
    }

    /// `N attempts in T` for the failure message, at `now`.
    pub(crate) fn summary(&self, now: Instant) -> String {
        format!(
            "{} attempt{} in {}",
            self.attempts,
            if self.attempts == 1 { "" } else { "s" },
            crate::duration::human(now.saturating_duration_since(self.started))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Attempts that fail after `each`: when they start, and when the gate
    /// gives up.
    fn run(limit: f64, each: f64) -> (Vec<f64>, f64) {
        let t0 = Instant::now();
        let mut gate = HealthGate::new(t0, secs(limit));
        let mut now = t0;
        let mut starts = Vec::new();
        loop {
            let allowed = gate.attempt(now, secs(600.0));
            starts.push((now - t0).as_secs_f64());
            now += secs(each).min(allowed);
            match gate.after_failure(now) {
                Next::Attempt(at) => now = at,
                Next::GiveUp(at) => return (starts, (at - t0).as_secs_f64()),
            }
        }
    }

    #[test]
    fn a_gate_of_4s_whose_attempts_fail_at_once_tries_at_0_1_2_3_and_fails_at_4() {
        let (starts, end) = run(4.0, 0.0);
        assert_eq!(starts, [0.0, 1.0, 2.0, 3.0]);
        assert_eq!(end, 4.0);
    }

    #[test]
    fn slow_attempts_start_right_after_the_last_and_the_last_is_cut_to_the_deadline() {
        let (starts, end) = run(4.0, 1.5);
        assert_eq!(starts, [0.0, 1.5, 3.0]);
        assert_eq!(end, 4.0, "the third attempt is cut at 4s");
        let t0 = Instant::now();
        let mut gate = HealthGate::new(t0, secs(4.0));
        assert_eq!(gate.attempt(t0, secs(10.0)), secs(4.0));
        assert_eq!(gate.attempt(t0 + secs(3.5), secs(10.0)), secs(0.5));
        assert_eq!(gate.attempt(t0, secs(2.0)), secs(2.0), "the hook's timeout");
    }

    #[test]
    fn the_summary_counts_attempts_and_time() {
        let t0 = Instant::now();
        let mut gate = HealthGate::new(t0, secs(4.0));
        for k in 0..4 {
            gate.attempt(t0 + secs(k as f64), secs(600.0));
        }
        assert_eq!(gate.summary(t0 + secs(4.0)), "4 attempts in 4s");
    }
}
