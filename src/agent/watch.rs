//! The watches of a deployment: two threads that sit in Consul blocking
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
//!
//! Each posts only when what it saw differs from what it posted last. Both
//! follow the [`Cursor`] rules: a failed request or an index that went
//! backwards makes them read again from index 0 (Consul lost or replaced
//! its state); an index that went backwards is also posted, so that the
//! main loop registers this node's keys again. Reads use `?stale`, so
//! followers share the load.
//!
//! Threads and connections per deployment: two, whatever the tree holds.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::view::{CurrentSeen, ListingSeen, TreeSeen};
use crate::consul::{Consul, ConsulError, MAX_TXN_OPS, TxnOp, TxnOutcome};
use crate::cursor::{Answered, Cursor, Pacing, WAIT};
use crate::tree::{Listing, Prefix};
use crate::version_name::VersionName;

/// Answers that changed nothing a watch cares about (another node's write
/// under the same prefix) are paced: a burst of this many reads, then two a
/// second while they keep coming. A storm of N nodes' writes costs each
/// agent at most two reads a second, instead of one per write (N² in all).
const IDLE: Pacing = Pacing {
    burst: 3,
    refill: Duration::from_millis(500),
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
}

/// Stops both watch threads when dropped (each notices after its current
/// blocking query returns, and exits without posting).
pub(crate) struct Watches {
    stop: Arc<AtomicBool>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts a deployment's two watches. `post` is called with each new
/// observation; when it returns false (the main loop is gone) a watch ends.
/// Fails only if a thread cannot be started (then none runs).
pub(crate) fn start(
    consul: Arc<Consul>,
    target: Target,
    health: Arc<Health>,
    post: impl Fn(Seen) -> bool + Clone + Send + 'static,
) -> std::io::Result<Watches> {
    let stop = Arc::new(AtomicBool::new(false));
    let watches = Watches { stop: stop.clone() };
    {
        let (consul, target, health, stop, post) = (
            consul.clone(),
            target.clone(),
            health.clone(),
            stop.clone(),
            post.clone(),
        );
        spawn("watch-tree", move || {
            tree_loop(&consul, &target, &health, &stop, post)
        })?;
    }
    // If this one cannot start, dropping `watches` stops the first.
    spawn("watch-current", move || {
        current_loop(&consul, &target, &health, &stop, post)
    })?;
    Ok(watches)
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
    stop: &AtomicBool,
    post: impl Fn(Seen) -> bool,
) {
    let mut cursor = Cursor::new(WAIT, true, IDLE);
    let mut last: Option<TreeSeen> = None;
    loop {
        let pause = cursor.pause(Instant::now());
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let read = consul
            .keys(target.prefix.as_dir(), cursor.read())
            .and_then(|answer| Ok((answer.index, look(consul, target, answer.value)?)));
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match read {
            Ok((index, seen)) => {
                health.reachable(consul);
                let mut changed = last.as_ref() != Some(&seen);
                if cursor.answered(index, changed) == Answered::Backwards {
                    if !post(Seen::Replaced(Part::Tree)) {
                        return;
                    }
                    changed = true;
                }
                if changed {
                    if !post(Seen::Tree(seen.clone())) {
                        return;
                    }
                    last = Some(seen);
                }
            }
            Err(e) => {
                health.unreachable(&e);
                // The Consul that answers next may hold another tree: post it
                // even if it looks the same.
                last = None;
                std::thread::sleep(cursor.failed());
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
    stop: &AtomicBool,
    post: impl Fn(Seen) -> bool,
) {
    let key = target.prefix.current_key();
    let mut cursor = Cursor::new(WAIT, true, IDLE);
    let mut last: Option<CurrentSeen> = None;
    loop {
        let pause = cursor.pause(Instant::now());
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let read = consul.get(&key, cursor.read());
        if stop.load(Ordering::Relaxed) {
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
                health.unreachable(&e);
                last = None;
                std::thread::sleep(cursor.failed());
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
