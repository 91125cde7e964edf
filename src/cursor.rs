//! The blocking-query cursor: how to follow something in Consul, written
//! once and used by the agent's watches and the CLI's follow loop.
//!
//! The rules:
//! - the first read, and every read after a reset, answers at once
//!   (index 0); later reads block on the index the last answer carried;
//! - an index that goes backwards means Consul lost or replaced its state
//!   (a restart without its data, a rebuilt cluster, a snapshot restore):
//!   read again at once, from 0;
//! - a failed request resets the index too: whichever Consul answers next
//!   may be a new one whose index is lower, and a query that asks for an
//!   index Consul has not reached blocks for its whole wait (minutes);
//! - failures are retried after a capped, jittered backoff;
//! - an answer that changed nothing the caller cares about (another node's
//!   write under the same prefix) is followed by a paced read (token
//!   bucket); an answer that changed something is followed at once;
//! - a read after a pause does not block: Consul may have been replaced
//!   during the pause, and a blocking query on an index it has not reached
//!   would sit out its whole wait. The answer shows the index as it is;
//! - reads may be `?stale` (any server answers, followers share the load),
//!   but the first one, and the first after a failure or a backwards index,
//!   is `?consistent`: answered by a leader that has caught up, so neither a
//!   follower that lags nor a leader fresh from an election sets where
//!   reading starts from.
//!
//! The cursor is pure: it decides, the caller sleeps and reads.

use std::time::{Duration, Instant};

use crate::consul::{Consistency, Read};
use crate::pacing::{Backoff, TokenBucket};

/// How long Consul may hold one of the CLI's blocking queries before
/// answering unchanged. Short on purpose: Consul keeps a query a command
/// left (it exited, or was killed) until its wait runs out, and counts its
/// connection against the client address's limit (200 by default), so a
/// script running commands back to back must not leave minutes of them.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// The wait of the first blocking query after a start or a failure; each
/// answer doubles it, up to the cursor's wait. A process that dies right
/// after it started (a crash loop) leaves queries held for seconds, not
/// for the whole wait.
pub(crate) const FIRST_WAIT: Duration = Duration::from_secs(5);

/// Pacing of reads after answers that changed nothing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pacing {
    /// Reads allowed at once after a quiet spell...
    pub burst: u32,
    /// ...then one per this interval while idle answers keep coming.
    pub refill: Duration,
}

#[derive(Debug)]
pub(crate) struct Cursor {
    index: u64,
    /// The highest index answered since the last time it went backwards,
    /// kept across failures: a Consul that comes back lower was replaced.
    high: u64,
    wait: Duration,
    /// The wait of the next blocking read: from [`FIRST_WAIT`] up to `wait`.
    ramp: Duration,
    stale: bool,
    backoff: Backoff,
    bucket: TokenBucket,
    /// The last answer changed nothing: the next read is paced.
    idle: bool,
    /// The caller paused before this read: it does not block.
    paused: bool,
    /// The next read is answered by the leader (a fresh start).
    from_leader: bool,
}

/// What an answer's index says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answered {
    /// The index moved forward (or stayed).
    Forward,
    /// The index went backwards: Consul's state was replaced.
    Backwards,
}

impl Cursor {
    pub(crate) fn new(wait: Duration, stale: bool, pacing: Pacing) -> Cursor {
        Cursor {
            index: 0,
            high: 0,
            wait,
            ramp: FIRST_WAIT.min(wait),
            stale,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            bucket: TokenBucket::new(pacing.burst, pacing.refill, Instant::now()),
            idle: false,
            paused: false,
            from_leader: true,
        }
    }

    /// The next read: at once with index 0 or after a pause, else blocking
    /// on the index.
    pub(crate) fn read(&self) -> Read {
        let consistency = if self.from_leader {
            Consistency::Consistent
        } else if self.stale {
            Consistency::Stale
        } else {
            Consistency::Default
        };
        if self.index == 0 || self.paused {
            Read {
                consistency,
                ..Read::now()
            }
        } else {
            Read::blocking(self.index, self.ramp, consistency)
        }
    }

    /// How long to wait before the next read (pacing after idle answers).
    pub(crate) fn pause(&mut self, now: Instant) -> Duration {
        let pause = if self.idle {
            self.bucket.take(now)
        } else {
            Duration::ZERO
        };
        self.paused = !pause.is_zero();
        pause
    }

    /// Takes an answer's index; `changed` says whether what was read
    /// differs from the last answer.
    pub(crate) fn answered(&mut self, index: u64, changed: bool) -> Answered {
        self.backoff.reset();
        self.paused = false;
        if index < self.high {
            self.index = 0;
            self.high = index;
            self.idle = false;
            self.from_leader = true;
            return Answered::Backwards;
        }
        self.high = index;
        self.from_leader = false;
        if self.index > 0 {
            self.ramp = (self.ramp * 2).min(self.wait);
        }
        // Consul never answers 0 for a blocking query; never block on 0.
        self.index = index.max(1);
        self.idle = !changed;
        Answered::Forward
    }

    /// A request failed: forget the index and say how long to back off.
    pub(crate) fn failed(&mut self) -> Duration {
        self.index = 0;
        self.ramp = FIRST_WAIT.min(self.wait);
        self.idle = false;
        self.paused = false;
        self.from_leader = true;
        self.backoff.next_delay()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> Cursor {
        Cursor::new(
            WAIT,
            true,
            Pacing {
                burst: 2,
                refill: Duration::from_millis(100),
            },
        )
    }

    #[test]
    fn blocking_waits_grow_from_a_few_seconds_to_the_full_wait_and_start_over_after_a_failure() {
        let mut cursor = Cursor::new(
            Duration::from_secs(60),
            true,
            Pacing {
                burst: 100,
                refill: Duration::from_millis(1),
            },
        );
        let mut waits = Vec::new();
        for index in 1..=7 {
            cursor.answered(index, true);
            waits.push(cursor.read().wait.unwrap().as_secs());
        }
        assert_eq!(waits, [5, 10, 20, 40, 60, 60, 60]);
        let _ = cursor.failed();
        cursor.answered(9, true);
        assert_eq!(cursor.read().wait, Some(FIRST_WAIT));
    }

    #[test]
    fn the_first_read_answers_at_once_and_later_ones_block_on_the_last_index() {
        let mut cursor = cursor();
        assert_eq!(cursor.read().index, 0);
        assert_eq!(
            cursor.read().consistency,
            Consistency::Consistent,
            "the first read is the leader's"
        );
        assert_eq!(cursor.answered(42, true), Answered::Forward);
        let read = cursor.read();
        assert_eq!((read.index, read.wait), (42, Some(FIRST_WAIT)));
        assert_eq!(
            read.consistency,
            Consistency::Stale,
            "then any server may answer"
        );
        cursor.failed();
        assert_eq!(
            cursor.read().consistency,
            Consistency::Consistent,
            "after a failure, the leader again"
        );
    }

    #[test]
    fn an_index_that_goes_backwards_reads_again_at_once() {
        let mut cursor = cursor();
        cursor.answered(1000, true);
        assert_eq!(cursor.answered(14, false), Answered::Backwards);
        assert_eq!(cursor.read().index, 0);
        assert_eq!(cursor.pause(Instant::now()), Duration::ZERO);
    }

    #[test]
    fn a_failure_forgets_the_index_so_a_new_consul_is_not_asked_for_an_index_it_has_not_reached() {
        let mut cursor = cursor();
        cursor.answered(1000, true);
        let delay = cursor.failed();
        assert!(delay > Duration::ZERO && delay <= Duration::from_millis(200));
        assert_eq!(cursor.read().index, 0);
        assert!(cursor.failed() > Duration::ZERO, "backs off further");
    }

    #[test]
    fn a_consul_that_comes_back_after_a_failure_with_a_lower_index_was_replaced() {
        let mut cursor = cursor();
        cursor.answered(1000, true);
        cursor.failed();
        assert_eq!(cursor.answered(12, true), Answered::Backwards);
        assert_eq!(cursor.read().index, 0, "and is read again at once");
        assert_eq!(cursor.answered(12, false), Answered::Forward);
        cursor.failed();
        assert_eq!(
            cursor.answered(15, true),
            Answered::Forward,
            "a mere outage"
        );
    }

    #[test]
    fn an_index_of_zero_never_makes_a_busy_loop() {
        let mut cursor = cursor();
        cursor.answered(0, true);
        assert_eq!(cursor.read().index, 1);
    }

    #[test]
    fn only_answers_that_changed_nothing_are_paced() {
        let mut cursor = cursor();
        let now = Instant::now();
        cursor.answered(5, true);
        assert_eq!(cursor.pause(now), Duration::ZERO);
        for i in 6..8 {
            cursor.answered(i, false);
            assert_eq!(cursor.pause(now), Duration::ZERO, "the burst");
        }
        cursor.answered(9, false);
        assert!(cursor.pause(now) > Duration::ZERO, "a storm is paced");
        assert_eq!(
            cursor.read().wait,
            None,
            "after a pause, a read answers at once: Consul may have been replaced meanwhile"
        );
        cursor.answered(10, true);
        assert_eq!(
            cursor.pause(now),
            Duration::ZERO,
            "a change is read at once"
        );
    }
}
