//! Watches: threads that sit in a Consul blocking query and tell the main
//! loop when what they watch has changed. They decide nothing.
//!
//! A watch posts only when its observation differs from the last one it
//! posted, so a wake-up that changed nothing it cares about (another node's
//! state write under the same prefix) costs nothing but the next query.
//! Those idle wake-ups are paced with a token bucket (a storm of them is
//! coalesced into a few reads a second); a real change is always read again
//! at once. A watch backs off with jitter while Consul is unreachable. It follows Consul's client rules for the index:
//! an index that goes backwards (Consul restarted, a snapshot restored)
//! resets it to 0, and it never blocks on 0.
//!
//! Reads that only need eventual consistency use `?stale`, so followers
//! share the load; a watch on the agent's own node key reads from the
//! leader, so it cannot see an old value after the agent's own write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::consul::{Consul, ConsulError, Read};
use crate::pacing::{Backoff, TokenBucket};

/// How long Consul may hold a blocking query before answering unchanged.
pub(crate) const WAIT: Duration = Duration::from_secs(300);
/// Idle wake-ups (nothing this watch cares about changed) are paced by a
/// token bucket: a burst of this many reads...
const BURST: u32 = 3;
/// ...then one read per this interval while they keep coming. Each node's
/// state write wakes every agent's listing watch on that prefix, so this
/// bounds what a deploy to N hosts costs Consul: at most 2 reads a second
/// per agent during the storm, instead of one per write (N² in all).
const REFILL: Duration = Duration::from_millis(500);

/// What a watch follows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Target {
    /// The names one level under a prefix (`?keys&separator=/`).
    Keys { prefix: String },
    /// One key's value.
    Key { key: String, consistent: bool },
}

/// What a watch saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// `None`: nothing exists under the prefix.
    Keys(Option<Vec<String>>),
    /// `None`: the key does not exist.
    Key(Option<Vec<u8>>),
}

/// Stops its watch when dropped. The thread notices after its current
/// blocking query returns and exits without posting.
pub(crate) struct WatchHandle {
    stop: Arc<AtomicBool>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts a watch. `post` is called with each new observation; when it
/// returns false (the main loop is gone) the watch ends.
pub(crate) fn spawn(
    consul: Arc<Consul>,
    target: Target,
    health: Arc<Health>,
    post: impl Fn(Seen) -> bool + Send + 'static,
) -> WatchHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let handle = WatchHandle { stop: stop.clone() };
    let spawned = std::thread::Builder::new()
        .name("watch".into())
        .stack_size(256 * 1024)
        .spawn(move || watch_loop(&consul, &target, &health, &stop, post));
    if let Err(e) = spawned {
        log::error!("cannot start a watch thread: {e}");
    }
    handle
}

fn watch_loop(
    consul: &Consul,
    target: &Target,
    health: &Health,
    stop: &AtomicBool,
    post: impl Fn(Seen) -> bool,
) {
    let mut index = 0u64;
    let mut last: Option<Seen> = None;
    let mut bucket = TokenBucket::new(BURST, REFILL, Instant::now());
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut idle_wakeup = false;
    loop {
        // Only wake-ups that changed nothing this watch cares about are
        // paced: a real change is read again at once.
        if idle_wakeup {
            let wait = bucket.take(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let result = read(consul, target, index);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match result {
            Ok((new_index, seen)) => {
                health.reachable(consul);
                backoff.reset();
                // Consul's rules: reset an index that went backwards; never block on 0.
                index = if new_index < index {
                    0
                } else {
                    new_index.max(1)
                };
                idle_wakeup = last.as_ref() == Some(&seen);
                if !idle_wakeup {
                    if !post(seen.clone()) {
                        return;
                    }
                    last = Some(seen);
                }
            }
            Err(e) => {
                health.unreachable(&e);
                std::thread::sleep(backoff.next_delay());
            }
        }
    }
}

fn read(consul: &Consul, target: &Target, index: u64) -> Result<(u64, Seen), ConsulError> {
    match target {
        Target::Keys { prefix } => {
            let answer = consul.keys(prefix, Read::blocking(index, WAIT, true))?;
            Ok((answer.index, Seen::Keys(answer.value)))
        }
        Target::Key { key, consistent } => {
            let answer = consul.get(key, Read::blocking(index, WAIT, !consistent))?;
            Ok((answer.index, Seen::Key(answer.value.map(|e| e.value))))
        }
    }
}

/// Whether Consul answers, shared by every thread of the agent, so that an
/// outage is logged once when it starts and once when it ends, not once per
/// request.
#[derive(Default)]
pub(crate) struct Health {
    down: Mutex<Option<String>>,
}

impl Health {
    pub(crate) fn reachable(&self, consul: &Consul) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if down.take().is_some() {
            log::info!("Consul at {} answers again", consul.server());
        }
    }

    pub(crate) fn unreachable(&self, err: &ConsulError) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        let summary = err.summary();
        if down.as_deref() != Some(summary.as_str()) {
            if down.is_none() {
                log::warn!("{err}; retrying with backoff");
            } else {
                log::warn!("Consul at {} is still failing, now: {summary}", err.server);
            }
            *down = Some(summary);
        } else {
            log::debug!("{err}");
        }
    }
}
