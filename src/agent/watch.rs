//! The watches of a deployment: three threads that sit in Consul blocking
//! queries and tell the main loop what they saw. They decide nothing.
//!
//! - The tree watch blocks on the one-level listing of the prefix
//!   (`?keys&separator=/`). A listing cannot tell a real folder key from a
//!   folder implied by node keys, nor does it change when a folder key is
//!   deleted while node keys remain; so after each answer the watch reads
//!   the folder keys it lists, and this node's keys it was asked to check,
//!   in one read-only transaction (`Get` fails for a missing key, and the
//!   answer names every missing one). Two requests per wake-up, whatever
//!   the number of versions; 64 keys per transaction.
//! - The current watch blocks on `<prefix>/current` alone, so a switch is
//!   seen at once even while node writes keep the tree watch busy.
//! - The doorbell watch blocks on `<prefix>/.changed` alone, which the depro
//!   CLI writes with every change it makes to the versions and `current`:
//!   when it rings, the other two end any pause and read at once. So a new
//!   version never waits behind the pacing of other nodes' writes, nor the
//!   first switch behind that of the watch of a missing `current` (Consul
//!   wakes it at every write anywhere). Another tool's change is seen
//!   within the pacing interval.
//!
//! Each posts only when what it saw differs from what it posted last. Both
//! follow the [`Cursor`] rules: a failed request or an index that went
//! backwards makes them read again from index 0 (Consul lost or replaced
//! its state); an index that went backwards is also posted, so that the
//! main loop registers this node's keys again. Reads use `?stale`, so
//! followers share the load.
//!
//! Threads and connections per deployment: three, whatever the tree holds.
//! Each watch has a client with connections of its own; dropping the
//! [`Watches`] shuts them down, so a removed deployment's queries end at once
//! (not when their wait runs out) and its threads exit.
//!
//! Pacing: an answer caused by this node's own write (its index is the one
//! the agent's last write got) is not an idle wake-up and is not paced; nor
//! is anything that changed what the watch sees. Only other nodes' writes
//! are coalesced. Queries wait at most [`WAIT`]: an agent killed while its
//! queries wait leaves them on the server no longer than that.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::view::{CurrentSeen, ListingSeen, TreeSeen};
use crate::consul::{Consul, ConsulError, MAX_TXN_OPS, TxnOp, TxnOutcome};
use crate::cursor::{Answered, Cursor, Pacing};

/// How long a watch's query may wait for a change.
pub(crate) const WAIT: Duration = Duration::from_secs(60);
use crate::tree::{Listing, Prefix};
use crate::version_name::VersionName;

/// Answers that changed nothing a watch cares about (another node's write
/// under the same prefix) are paced: a burst of two reads, then one every
/// five seconds while they keep coming. A storm of N nodes' writes costs
/// each agent a few reads, instead of one per write (N² in all). Nothing
/// depro does waits on this: `current` and the doorbell have watches of
/// their own. Only other tools' changes (which do not ring the doorbell)
/// are seen late, and only during a storm: at most this long.
const IDLE: Pacing = Pacing {
    burst: 2,
    refill: Duration::from_secs(5),
};

/// What the watches tell the main loop.
#[derive(Debug)]
pub(crate) enum Seen {
    Tree(TreeSeen),
    Current(CurrentSeen),
    /// Consul's index went backwards: its state was replaced (restarted
    /// without its data, rebuilt, restored from a snapshot). What this
    /// watch posted before is void; it posts what it sees next.
    Replaced(Part),
}

/// Which watch a [`Seen::Replaced`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    Tree,
    Current,
}

/// What a deployment's watches need to know.
#[derive(Clone)]
pub(crate) struct Target {
    pub prefix: Prefix,
    pub node: String,
    /// Versions whose node key of this node the tree watch must check
    /// (those it reported `failed`: their deletion asks for a retry).
    pub own: Arc<Mutex<BTreeSet<VersionName>>>,
    /// The index this node's last write under the prefix got: a wake-up
    /// at that index is this node's own doing, not other nodes' noise.
    pub own_write: Arc<AtomicU64>,
}

/// Tells the watch threads to stop, and wakes them from a pause: to stop,
/// or (the doorbell) to read at once.
#[derive(Default)]
struct Stop {
    state: Mutex<Wake>,
    wake: Condvar,
    flag: AtomicBool,
}

#[derive(Default)]
struct Wake {
    stopped: bool,
    /// How many times the doorbell rang. Each watch keeps the count it had
    /// when it last read: a ring during its query ends its next pause too.
    rings: u64,
}

impl Stop {
    fn stopped(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The rings so far: a watch notes them just before it reads.
    fn rings(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).rings
    }

    /// Sleeps for `duration`, or less if told to stop or the doorbell rang
    /// since the watch noted `read_at`; returns whether to stop.
    fn sleep(&self, duration: Duration, read_at: u64) -> bool {
        let guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .wake
            .wait_timeout_while(guard, duration, |w| !w.stopped && w.rings == read_at)
            .unwrap_or_else(|e| e.into_inner());
        guard.stopped
    }

    /// The doorbell rang: pauses end now.
    fn ring(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).rings += 1;
        self.wake.notify_all();
    }

    fn stop(&self) {
        self.flag.store(true, Ordering::Relaxed);
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stopped = true;
        self.wake.notify_all();
    }
}

/// A deployment's running watches: dropping them ends their queries and
/// threads at once.
pub(crate) struct Watches {
    stop: Arc<Stop>,
    clients: Vec<Arc<Consul>>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        self.stop.stop();
        for client in &self.clients {
            client.shut_down();
        }
    }
}

/// Starts a deployment's three watches, each with a client of its own.
/// `post` is called with each new observation; when it returns false (the
/// main loop is gone) a watch ends. Fails only if a thread cannot be
/// started (then none runs).
pub(crate) fn start(
    consul: &Consul,
    target: Target,
    health: Arc<Health>,
    post: impl Fn(Seen) -> bool + Clone + Send + 'static,
) -> std::io::Result<Watches> {
    let stop = Arc::new(Stop::default());
    let tree = Arc::new(consul.with_own_connections());
    let current = Arc::new(consul.with_own_connections());
    let bell = Arc::new(consul.with_own_connections());
    let watches = Watches {
        stop: stop.clone(),
        clients: vec![tree.clone(), current.clone(), bell.clone()],
    };
    {
        let (target, health, stop, post) =
            (target.clone(), health.clone(), stop.clone(), post.clone());
        spawn("watch-tree", move || {
            tree_loop(&tree, &target, &health, &stop, post)
        })?;
    }
    // If one of these cannot start, dropping `watches` stops the others.
    {
        let (target, health, stop) = (target.clone(), health.clone(), stop.clone());
        spawn("watch-changed", move || {
            doorbell_loop(&bell, &target, &health, &stop)
        })?;
    }
    spawn("watch-current", move || {
        current_loop(&current, &target, &health, &stop, post)
    })?;
    Ok(watches)
}

/// Watches the doorbell key; each time it changes, the tree watch reads at once.
fn doorbell_loop(consul: &Consul, target: &Target, health: &Health, stop: &Stop) {
    let key = target.prefix.changed_key();
    let mut cursor = Cursor::new(WAIT, true, IDLE);
    let mut last: Option<u64> = None;
    loop {
        let pause = cursor.pause(Instant::now());
        if (!pause.is_zero() && stop.sleep(pause, stop.rings())) || stop.stopped() {
            return;
        }
        let read = consul.get(&key, cursor.read());
        if stop.stopped() {
            return;
        }
        match read {
            Ok(answer) => {
                health.reachable(consul);
                let seen = answer.value.map_or(0, |e| e.modify_index);
                let changed = last.is_some_and(|l| l != seen);
                cursor.answered(answer.index, changed || last.is_none());
                if changed {
                    stop.ring();
                }
                last = Some(seen);
            }
            Err(e) => {
                if stop.stopped() {
                    return;
                }
                health.unreachable(&e);
                if stop.sleep(cursor.failed(), stop.rings()) {
                    return;
                }
            }
        }
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 * 1024)
        .spawn(body)
        .map(drop)
}

fn tree_loop(
    consul: &Consul,
    target: &Target,
    health: &Health,
    stop: &Stop,
    post: impl Fn(Seen) -> bool,
) {
    let mut cursor = Cursor::new(WAIT, true, IDLE);
    let mut last: Option<TreeSeen> = None;
    let mut read_at = stop.rings();
    loop {
        let pause = cursor.pause(Instant::now());
        if (!pause.is_zero() && stop.sleep(pause, read_at)) || stop.stopped() {
            return;
        }
        read_at = stop.rings();
        let read = consul
            .keys(target.prefix.as_dir(), cursor.read())
            .and_then(|answer| Ok((answer.index, look(consul, target, answer.value)?)));
        if stop.stopped() {
            return;
        }
        match read {
            Ok((index, seen)) => {
                health.reachable(consul);
                // This node's own write is no noise to coalesce: the next
                // real change must not wait behind it.
                let own = index == target.own_write.load(Ordering::Relaxed);
                let differs = last.as_ref() != Some(&seen);
                let replaced = cursor.answered(index, differs || own) == Answered::Backwards;
                if replaced && !post(Seen::Replaced(Part::Tree)) {
                    return;
                }
                if differs || replaced {
                    if !post(Seen::Tree(seen.clone())) {
                        return;
                    }
                    last = Some(seen);
                }
            }
            Err(e) => {
                if stop.stopped() {
                    return;
                }
                health.unreachable(&e);
                // The Consul that answers next may hold another tree: post it
                // even if it looks the same.
                last = None;
                if stop.sleep(cursor.failed(), read_at) {
                    return;
                }
            }
        }
    }
}

/// Reads the tree once, at once (no blocking): for the main loop, when a
/// write proved its view outdated.
pub(crate) fn look_now(consul: &Consul, target: &Target) -> Result<TreeSeen, ConsulError> {
    let answer = consul.keys(target.prefix.as_dir(), crate::consul::Read::consistent())?;
    look(consul, target, answer.value)
}

/// Turns a listing into a snapshot: which listed folders have their key,
/// and which of this node's keys to check are missing.
fn look(
    consul: &Consul,
    target: &Target,
    keys: Option<Vec<String>>,
) -> Result<TreeSeen, ConsulError> {
    let Some(keys) = keys else {
        return Ok(TreeSeen { listing: None });
    };
    let listing = Listing::parse(&target.prefix, &keys);
    let own: Vec<VersionName> = target
        .own
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    let folder_keys: Vec<String> = listing
        .folders
        .iter()
        .map(|v| target.prefix.folder_key(v))
        .collect();
    let own_keys: Vec<String> = own
        .iter()
        .map(|v| target.prefix.node_key(v, &target.node))
        .collect();
    let all: Vec<&str> = folder_keys
        .iter()
        .chain(&own_keys)
        .map(String::as_str)
        .collect();
    let missing: BTreeSet<String> = missing_keys(consul, &all)?
        .into_iter()
        .map(String::from)
        .collect();
    let mut seen = ListingSeen {
        ignored: listing.ignored,
        ..ListingSeen::default()
    };
    for version in listing.plain {
        let key = format!("{}{version}", target.prefix.as_dir());
        seen.versions.insert(version, key);
    }
    for (version, key) in listing.folders.into_iter().zip(folder_keys) {
        if !missing.contains(key.as_str()) {
            seen.versions.insert(version, key);
        }
    }
    for (version, key) in own.into_iter().zip(own_keys) {
        if missing.contains(key.as_str()) {
            seen.own_missing.insert(version);
        }
    }
    Ok(TreeSeen {
        listing: Some(seen),
    })
}

/// Which of `keys` do not exist, by read-only transactions of `Get`s.
fn missing_keys<'a>(consul: &Consul, keys: &[&'a str]) -> Result<BTreeSet<&'a str>, ConsulError> {
    let mut missing = BTreeSet::new();
    for chunk in keys.chunks(MAX_TXN_OPS) {
        let ops: Vec<TxnOp<'_>> = chunk.iter().map(|key| TxnOp::Get { key }).collect();
        match consul.read_txn(&ops)? {
            TxnOutcome::Committed(_) => {}
            TxnOutcome::Rejected(failures) => {
                for failure in failures {
                    let key = chunk.get(failure.op).copied().unwrap_or_default();
                    match failure.conflict {
                        crate::consul::Conflict::Missing => {
                            missing.insert(key);
                        }
                        crate::consul::Conflict::Denied => {
                            return Err(consul.denied(format!("reading {key:?}"), failure.what));
                        }
                        _ => {
                            return Err(consul.unexpected(format!("reading {key:?}"), failure.what));
                        }
                    }
                }
            }
        }
    }
    Ok(missing)
}

fn current_loop(
    consul: &Consul,
    target: &Target,
    health: &Health,
    stop: &Stop,
    post: impl Fn(Seen) -> bool,
) {
    let key = target.prefix.current_key();
    let mut cursor = Cursor::new(WAIT, true, IDLE);
    let mut last: Option<CurrentSeen> = None;
    let mut read_at = stop.rings();
    loop {
        let pause = cursor.pause(Instant::now());
        if (!pause.is_zero() && stop.sleep(pause, read_at)) || stop.stopped() {
            return;
        }
        read_at = stop.rings();
        let read = consul.get(&key, cursor.read());
        if stop.stopped() {
            return;
        }
        match read {
            Ok(answer) => {
                health.reachable(consul);
                let seen = CurrentSeen {
                    index: answer.value.as_ref().map_or(0, |e| e.modify_index),
                    value: answer.value.map(|e| e.value),
                };
                let mut changed = last.as_ref() != Some(&seen);
                if cursor.answered(answer.index, changed) == Answered::Backwards {
                    if !post(Seen::Replaced(Part::Current)) {
                        return;
                    }
                    changed = true;
                }
                if changed {
                    if !post(Seen::Current(seen.clone())) {
                        return;
                    }
                    last = Some(seen);
                }
            }
            Err(e) => {
                if stop.stopped() {
                    return;
                }
                health.unreachable(&e);
                last = None;
                if stop.sleep(cursor.failed(), read_at) {
                    return;
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_ends_the_pause_of_every_watch_that_sleeps() {
        let stop = Arc::new(Stop::default());
        let sleepers: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                let read_at = stop.rings();
                std::thread::spawn(move || {
                    let start = Instant::now();
                    stop.sleep(Duration::from_secs(60), read_at);
                    start.elapsed()
                })
            })
            .collect();
        stop.ring();
        for sleeper in sleepers {
            assert!(sleeper.join().unwrap() < Duration::from_secs(30));
        }
    }

    #[test]
    fn a_ring_while_a_watch_reads_ends_its_next_pause() {
        let stop = Stop::default();
        let read_at = stop.rings();
        stop.ring(); // while the watch's query was out
        let start = Instant::now();
        assert!(!stop.sleep(Duration::from_secs(60), read_at));
        assert!(start.elapsed() < Duration::from_secs(30));
        // Once it has read again, a pause lasts.
        let start = Instant::now();
        assert!(!stop.sleep(Duration::from_millis(50), stop.rings()));
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn stopping_ends_a_pause_and_says_so() {
        let stop = Stop::default();
        stop.stop();
        assert!(stop.sleep(Duration::from_secs(60), stop.rings()));
        assert!(stop.stopped());
    }
}
