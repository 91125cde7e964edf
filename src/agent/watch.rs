//! The watches of a deployment: two threads that sit in Consul blocking
//! queries and tell the main loop what they saw. They decide nothing.
//!
//! - The tree watch blocks on the doorbell, `<prefix>/.changed`, alone. The
//!   depro CLI rings it in the same transaction as every change it makes,
//!   with a line that says what changed and the doorbell's index before
//!   (`created v2/ after 1234 by …`, see [`crate::doorbell`]). A ring that
//!   follows the last one heard is applied to the watch's snapshot of the
//!   tree without reading anything; other nodes' state writes do not wake
//!   it at all. So an agent's work for a deploy does not grow with the fleet.
//! - It reads the whole tree only when it must: at start; when it missed a
//!   ring or cannot read one (another tool rang); after a failure or when
//!   Consul's index went backwards; and every `rescan_interval` (jittered)
//!   for changes by tools that do not ring. A whole read is the one-level
//!   listing (`?keys&separator=/`), which costs the server a walk over every
//!   key under the prefix (nodes × versions), then one read-only transaction
//!   that checks the listed folder keys exist (a listing cannot tell a folder
//!   key from a folder implied by node keys).
//! - A whole read also checks that this node's `failed` keys exist: the
//!   CLI's retry deletes one and rings (`retried v/node`). The main loop
//!   checks them too, every few seconds while there are any, for an
//!   operator who deletes one by hand.
//! - The current watch blocks on `<prefix>/current` alone, so a switch is
//!   seen at once. Before the first switch the key does not exist, and
//!   Consul wakes a query on a missing key at every write anywhere: those
//!   wake-ups are paced, and a ring ends the pause.
//!
//! Each posts only when what it saw differs from what it posted last. Both
//! follow the [`Cursor`] rules: a failed request or an index that went
//! backwards makes them read again from index 0, from the leader (Consul
//! lost or replaced its state); an index that went backwards is also
//! posted, so that the main loop registers this node's keys again. Blocking
//! reads use `?stale`, so followers share the load; a whole read after a
//! ring at index I waits until the server that answers has reached I.
//!
//! Threads and connections per deployment: two, whatever the tree holds.
//! Each watch has a client with connections of its own; dropping the
//! [`Watches`] shuts them down, so a removed deployment's queries end at once
//! (not when their wait runs out) and its threads exit. Queries wait at most
//! [`WAIT`]: an agent killed while its queries wait leaves them on the server
//! no longer than that.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::view::{CurrentSeen, ListingSeen, TreeSeen, Wave};
use crate::consul::{Consistency, Consul, ConsulError, ConsulErrorKind, Read, TxnOp, TxnOutcome};
use crate::cursor::{Answered, Cursor, Pacing};
use crate::doorbell::{Change, Ring};
use crate::pacing::Backoff;
use crate::tree::{Listing, Prefix};
use crate::version_name::VersionName;

/// How long a watch's query may wait for a change.
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// How long a whole read after a ring waits for the answering server to
/// reach the ring's index (a follower that lags), before taking what it has.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Answers that changed nothing a watch cares about (the doorbell or
/// `current` while missing, which Consul wakes at every write anywhere)
/// are paced: a burst of two reads, then one every five seconds while they
/// keep coming. A ring ends the current watch's pause.
const IDLE: Pacing = Pacing {
    burst: 2,
    refill: Duration::from_secs(5),
};

/// Rings remembered, to apply again over a whole read that started before
/// them (see [`Book::whole`]).
const RINGS_KEPT: usize = 64;

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
    /// The tree watch's snapshot, shared with the main loop's whole reads.
    pub book: Arc<Mutex<Book>>,
    /// How often at most the tree is read whole (for tools that do not ring).
    pub rescan: Duration,
    /// The agent's session, for the scout's lock (`None` while it has none).
    pub session: Arc<Mutex<Option<String>>>,
}

impl Target {
    fn own(&self) -> BTreeSet<VersionName> {
        self.own.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The snapshot of the tree the rings are applied to, and the last rings
/// heard. The main loop's whole reads ([`look_now`]) go through it too, so a
/// ring heard while one was under way is not lost.
#[derive(Debug, Default)]
pub(crate) struct Book {
    seen: Option<TreeSeen>,
    rings: VecDeque<(u64, Heard)>,
    /// The index the snapshot is complete up to: its whole read's, or the
    /// last ring applied over it.
    heard: u64,
}

/// A ring as the tree watch applied it: a change, or (for a wave ring) what
/// it then read of the rollout under way.
#[derive(Clone, Debug)]
enum Heard {
    Change(Change),
    Wave(Option<Wave>),
}

impl Book {
    /// A whole read, as of the listing's index `as_of`: the rings heard
    /// since are applied over it (applying a ring twice changes nothing).
    fn whole(&mut self, mut seen: TreeSeen, as_of: u64, target: &Target) -> TreeSeen {
        for (index, heard) in &self.rings {
            if *index > as_of {
                apply(&mut seen, heard, target);
            }
        }
        keep_own(&mut seen, &target.own());
        if let Some(before) = self.seen.as_ref().and_then(|s| s.listing.as_ref()) {
            reuse(&mut seen, before);
        }
        self.seen = Some(seen.clone());
        self.heard = self.heard.max(as_of);
        seen
    }

    /// How far the snapshot is complete (see [`Book::heard`]), and the
    /// versions it holds (`None` before the first whole read).
    pub(crate) fn versions(&self) -> (u64, Option<BTreeSet<VersionName>>) {
        let versions = self
            .seen
            .as_ref()
            .map(|s| {
                s.listing
                    .as_ref()
                    .map(|l| l.versions.keys().cloned().collect())
            })
            .map(Option::unwrap_or_default);
        (self.heard, versions)
    }

    /// A ring at `index`: applied to the snapshot, if there is one yet.
    fn ring(&mut self, index: u64, heard: Heard, target: &Target) -> Option<TreeSeen> {
        if self.rings.len() == RINGS_KEPT {
            self.rings.pop_front();
        }
        let seen = self.seen.as_mut().map(|seen| {
            apply(seen, &heard, target);
            keep_own(seen, &target.own());
            seen.clone()
        });
        self.rings.push_back((index, heard));
        if self.seen.is_some() {
            self.heard = self.heard.max(index);
        }
        seen
    }

    /// Consul's state was replaced: indexes from before mean nothing.
    fn forget(&mut self) {
        self.seen = None;
        self.rings.clear();
        self.heard = 0;
    }
}

/// Keeps what a whole read found unchanged as it was held: the listing
/// itself when nothing changed (a rescan, mostly), else the names of the
/// versions that were there before. So a version's name is one allocation
/// for as long as it is in the tree, whichever maps hold it, and the
/// allocator is not left with a fresh copy of every name scattered among
/// freed blocks after each read.
fn reuse(seen: &mut TreeSeen, before: &Arc<ListingSeen>) {
    let Some(listing) = seen.listing.as_mut() else {
        return;
    };
    if **listing == **before {
        *listing = before.clone();
        return;
    }
    let fresh = Arc::make_mut(listing);
    fresh.versions = std::mem::take(&mut fresh.versions)
        .into_iter()
        .map(
            |(version, key)| match before.versions.get_key_value(&version) {
                Some((held, _)) => (held.clone(), key),
                None => (version, key),
            },
        )
        .collect();
}

/// Applies what a ring says to a snapshot.
fn apply(seen: &mut TreeSeen, heard: &Heard, target: &Target) {
    let change = match heard {
        Heard::Wave(wave) => {
            if let Some(listing) = seen.listing.as_mut().map(Arc::make_mut) {
                listing.wave = wave.clone();
            }
            return;
        }
        Heard::Change(change) => change,
    };
    match change {
        Change::Created(version) => {
            Arc::make_mut(seen.listing.get_or_insert_with(Default::default))
                .versions
                .insert(version.clone(), target.prefix.folder_key(version));
        }
        Change::Removed { version, folder } => {
            let key = if *folder {
                target.prefix.folder_key(version)
            } else {
                format!("{}{version}", target.prefix.as_dir())
            };
            if let Some(listing) = &mut seen.listing {
                if listing.versions.get(version) == Some(&key) {
                    Arc::make_mut(listing).versions.remove(version);
                }
            }
        }
        Change::Retried { version, node } if *node == target.node => {
            if let Some(listing) = seen.listing.as_mut().map(Arc::make_mut) {
                listing.own_missing.insert(version.clone());
            }
        }
        // A switch of `current` ends a rollout's effect through `current`'s
        // index (see `View`), not here: this ring may reach the main loop
        // before the new `current` does, and clearing the wave now would
        // send a node of the last wave back to the old version meanwhile.
        Change::Switched(_)
        | Change::Restored(_)
        | Change::Retried { .. }
        | Change::Opened
        | Change::Wave(_) => {}
    }
}

/// Only versions this node still has `failed` can have their key missing.
fn keep_own(seen: &mut TreeSeen, own: &BTreeSet<VersionName>) {
    if let Some(listing) = &mut seen.listing {
        // Copied only when it changes: the listing is shared with the
        // main loop's view.
        if listing.own_missing.iter().any(|v| !own.contains(v)) {
            Arc::make_mut(listing)
                .own_missing
                .retain(|v| own.contains(v));
        }
    }
}

/// Tells the watch threads to stop, and wakes them from a pause: to stop,
/// or (the doorbell) to read at once.
#[derive(Default)]
pub(super) struct Stop {
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
    pub(super) fn stopped(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The rings so far: a watch notes them just before it reads.
    pub(super) fn rings(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).rings
    }

    /// Sleeps for `duration`, or less if told to stop or the doorbell rang
    /// since the watch noted `read_at`; returns whether to stop.
    pub(super) fn sleep(&self, duration: Duration, read_at: u64) -> bool {
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

/// Starts a deployment's two watches and its scout, each with a client of
/// its own.
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
    let scout = Arc::new(consul.with_own_connections());
    let watches = Watches {
        stop: stop.clone(),
        clients: vec![tree.clone(), current.clone(), scout.clone()],
    };
    {
        let (target, health, stop) = (target.clone(), health.clone(), stop.clone());
        spawn("scout", move || {
            super::scout::scout_loop(&scout, &target, &health, &stop)
        })?;
    }
    {
        let (target, health, stop, post) =
            (target.clone(), health.clone(), stop.clone(), post.clone());
        spawn("watch-tree", move || {
            tree_loop(&tree, &target, &health, &stop, post)
        })?;
    }
    // If this one cannot start, dropping `watches` stops the other.
    spawn("watch-current", move || {
        current_loop(&current, &target, &health, &stop, post)
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

/// Where the next whole read of the tree comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Whole {
    /// A leader that has caught up: after a start, a failure or a replaced
    /// state, when nothing else says how far Consul got.
    Leader,
    /// Any server that has reached the doorbell's index `at`.
    From { at: u64 },
}

/// The tree watch: the doorbell, the snapshot, whole reads when needed.
fn tree_loop(
    consul: &Consul,
    target: &Target,
    health: &Health,
    stop: &Stop,
    post: impl Fn(Seen) -> bool,
) {
    let key = target.prefix.changed_key();
    target.book().forget(); // a new start: possibly another Consul
    let mut cursor = Cursor::new(WAIT, true, IDLE);
    // The doorbell's ModifyIndex as last heard (0: missing); `None` until
    // the first answer since a start or failure.
    let mut bell: Option<u64> = None;
    let mut whole = Some(Whole::Leader);
    let mut opened = false;
    let mut last: Option<TreeSeen> = None;
    let mut rescans = Backoff::new(target.rescan, target.rescan);
    let mut rescan_at = Instant::now() + rescans.next_delay();
    let publish = |seen: Option<TreeSeen>, last: &mut Option<TreeSeen>| -> bool {
        match seen {
            Some(seen) if last.as_ref() != Some(&seen) => {
                *last = Some(seen.clone());
                post(Seen::Tree(seen))
            }
            _ => true,
        }
    };
    loop {
        if stop.stopped() {
            return;
        }
        // Whole reads and own checks come once the doorbell's index is
        // known, so that any ring after them is heard.
        if let Some(at) = bell {
            let now = Instant::now();
            if whole.is_none() && now >= rescan_at {
                whole = Some(Whole::From { at });
            }
            let result = match whole {
                Some(from) => read_whole(consul, target, from).map(|(seen, as_of)| {
                    log::debug!(
                        "{}: read the tree whole ({from:?}), as of {as_of}",
                        target.prefix
                    );
                    whole = None;
                    rescan_at = now + rescans.next_delay();
                    Some(target.book().whole(seen, as_of, target))
                }),
                None => Ok(None),
            };
            match result {
                Ok(seen) => {
                    if !publish(seen, &mut last) {
                        return;
                    }
                }
                Err(e) => {
                    if failed(&e, &mut cursor, health, stop, stop.rings()) {
                        return;
                    }
                    // Whoever answers next may hold another tree: start over.
                    (bell, whole, last) = (None, Some(Whole::Leader), None);
                    continue;
                }
            }
        }
        // The doorbell.
        let pause = cursor.pause(Instant::now());
        if (!pause.is_zero() && stop.sleep(pause, stop.rings())) || stop.stopped() {
            return;
        }
        let mut read = cursor.read();
        let until_due = rescan_at.saturating_duration_since(Instant::now());
        read.wait = read
            .wait
            .map(|wait| wait.min(until_due.max(Duration::from_secs(1))));
        let answer = consul.get(&key, read);
        if stop.stopped() {
            return;
        }
        match answer {
            Ok(answer) => {
                health.reachable(consul);
                let index = answer.value.as_ref().map_or(0, |e| e.modify_index);
                let changed = bell != Some(index);
                if cursor.answered(answer.index, changed) == Answered::Backwards {
                    if !post(Seen::Replaced(Part::Tree)) {
                        return;
                    }
                    target.book().forget();
                    (bell, whole, last) = (None, Some(Whole::Leader), None);
                    continue;
                }
                let Some(before) = bell.replace(index) else {
                    // The first answer: rings are heard from here on.
                    if answer.value.is_none() && !opened {
                        opened = true;
                        open_doorbell(consul, target);
                    }
                    continue;
                };
                if !changed {
                    continue;
                }
                stop.ring();
                let ring = answer.value.as_ref().and_then(|e| Ring::parse(&e.value));
                log::debug!(
                    "{}: the doorbell rang at {index} (heard {before} before): {}",
                    target.prefix,
                    match (&ring, &answer.value) {
                        (Some(ring), _) => format!("{} after {}", ring.change, ring.after),
                        (None, Some(_)) => "not a depro ring".to_string(),
                        (None, None) => "deleted".to_string(),
                    }
                );
                match ring {
                    Some(ring) if ring.after == before => {
                        let heard = match ring.change {
                            Change::Wave(_) => match read_wave(consul, target, Some(index)) {
                                Ok(wave) => Heard::Wave(wave),
                                Err(e) => {
                                    if failed(&e, &mut cursor, health, stop, stop.rings()) {
                                        return;
                                    }
                                    (bell, whole, last) = (None, Some(Whole::Leader), None);
                                    continue;
                                }
                            },
                            change => Heard::Change(change),
                        };
                        let seen = target.book().ring(index, heard, target);
                        if !publish(seen, &mut last) {
                            return;
                        }
                    }
                    // A ring missed, another tool's ring, or the doorbell
                    // deleted: read the whole tree.
                    _ if index > 0 => whole = Some(Whole::From { at: index }),
                    _ => whole = Some(Whole::Leader),
                }
            }
            Err(e) => {
                if failed(&e, &mut cursor, health, stop, stop.rings()) {
                    return;
                }
                (bell, whole, last) = (None, Some(Whole::Leader), None);
            }
        }
    }
}

/// A request failed: says so (once per outage) and waits the cursor's
/// backoff, or less if the doorbell rang since `read_at`. Returns whether
/// to stop.
fn failed(
    err: &ConsulError,
    cursor: &mut Cursor,
    health: &Health,
    stop: &Stop,
    read_at: u64,
) -> bool {
    if stop.stopped() {
        return true;
    }
    health.unreachable(err);
    stop.sleep(cursor.failed(), read_at)
}

/// A request failed, for the scout (see [`failed`]).
pub(super) fn backed_off(
    err: &ConsulError,
    cursor: &mut Cursor,
    health: &Health,
    stop: &Stop,
) -> bool {
    failed(err, cursor, health, stop, stop.rings())
}

/// Creates the doorbell if it does not exist yet, so that the watch blocks
/// on a key that only rings wake (a query on a missing key wakes at every
/// write anywhere). Only if missing (check-and-set on 0); many agents may
/// try at once, one succeeds. Failure is harmless: the watch still works.
fn open_doorbell(consul: &Consul, target: &Target) {
    let key = target.prefix.changed_key();
    let ring = Ring {
        change: Change::Opened,
        after: 0,
    };
    let value = ring.text(
        &format!("agent {}", target.node),
        &crate::logging::timestamp(),
    );
    let op = TxnOp::Cas {
        key: &key,
        value: value.as_bytes(),
        index: 0,
    };
    match consul.txn(&[op]) {
        Ok(TxnOutcome::Committed(_)) => log::debug!("created the doorbell {key}"),
        Ok(TxnOutcome::Rejected(_)) => {} // another agent was first, or no write permission
        Err(e) => log::debug!("could not create the doorbell {key}: {e}"),
    }
}

/// Reads the progressive rollout under way (`<prefix>/.rollout`): the
/// version this node is told to run and the `current` index it applies to,
/// if the rollout names this node. After a ring at index `at`, from a
/// server that has reached it; otherwise from the leader.
fn read_wave(
    consul: &Consul,
    target: &Target,
    at: Option<u64>,
) -> Result<Option<Wave>, ConsulError> {
    let read = match at {
        Some(at) => Read::blocking(at.saturating_sub(1), CATCH_UP, Consistency::Stale),
        None => Read::consistent(),
    };
    let answer = consul.get(&target.prefix.rollout_key(), read)?;
    let plan = answer
        .value
        .and_then(|e| crate::tree::RolloutPlan::parse(&e.value));
    Ok(plan.and_then(|plan| {
        let version = plan.target()?;
        plan.switched.contains(&target.node).then_some(Wave {
            version,
            base_index: plan.base_index,
            restart: plan.restart,
        })
    }))
}

/// Reads the tree whole, through the book (for the main loop, when a write
/// proved its view outdated): from a leader that has caught up.
pub(crate) fn look_now(consul: &Consul, target: &Target) -> Result<TreeSeen, ConsulError> {
    let (seen, as_of) = read_whole(consul, target, Whole::Leader)?;
    Ok(target.book().whole(seen, as_of, target))
}

/// Reads the tree whole: the listing, then which listed folders have their
/// key and which of this node's `failed` keys are missing. Returns the
/// snapshot and the listing's index.
pub(super) fn read_whole(
    consul: &Consul,
    target: &Target,
    from: Whole,
) -> Result<(TreeSeen, u64), ConsulError> {
    let read = match from {
        Whole::Leader => Read::consistent(),
        // Blocks until the server has reached the ring (the doorbell is
        // under the prefix, so the listing's index moves with it).
        Whole::From { at } => Read::blocking(at.saturating_sub(1), CATCH_UP, Consistency::Stale),
    };
    let answer = consul.keys(target.prefix.as_dir(), read)?;
    // Nothing but depro's own keys (the doorbell and the agents'
    // announcements, which agents write themselves) is an empty prefix
    // too: it never cleans anything.
    let dir = target.prefix.as_dir();
    let Some(keys) = answer.value.filter(|keys| {
        keys.iter().any(|key| {
            key.strip_prefix(dir)
                .is_some_and(|name| !name.is_empty() && !name.starts_with('.'))
        })
    }) else {
        return Ok((TreeSeen { listing: None }, answer.index));
    };
    let listing = Listing::parse(&target.prefix, &keys);
    let own: Vec<VersionName> = target.own().into_iter().collect();
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
    let missing: BTreeSet<String> = consul
        .missing_keys(&all)?
        .into_iter()
        .map(String::from)
        .collect();
    let rollout_key = target.prefix.rollout_key();
    let wave = match keys.contains(&rollout_key) {
        true => read_wave(consul, target, None)?,
        false => None,
    };
    let mut seen = ListingSeen {
        ignored: listing.ignored,
        wave,
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
    let seen = TreeSeen {
        listing: Some(Arc::new(seen)),
    };
    Ok((seen, answer.index))
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
                if failed(&e, &mut cursor, health, stop, read_at) {
                    return;
                }
                last = None;
            }
        }
    }
}

/// Whether Consul answers, shared by every thread of the agent, so that an
/// outage is logged once when it starts and once when it ends (with how
/// long it lasted), not once per request: an edge box may be cut off for
/// hours. What changes in between (refused, timed out, reset) is debug.
#[derive(Default)]
pub(crate) struct Health {
    down: Mutex<Option<Outage>>,
    /// Told when an outage of at least [`STRANDING`] ends.
    on_return: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// Told when Consul refuses the credentials (a denial, a TLS refusal):
    /// the token or certificate files may have been renewed meanwhile.
    on_refused: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// The last denial logged, and when: a denial is not an outage (Consul
    /// answers), and is logged once, again only if it changes or after
    /// [`DENIAL_REPEAT`].
    denied: Mutex<Option<(String, std::time::Instant)>>,
}

/// How often the same denial is logged again while it lasts.
const DENIAL_REPEAT: std::time::Duration = std::time::Duration::from_secs(600);

/// An outage this long may have stranded requests on connections that
/// died with the link (a link that drops packets is only noticed through
/// timeouts, seconds long): when it ends, the agent restarts its watches
/// rather than wait for their blocking queries to time out.
const STRANDING: std::time::Duration = std::time::Duration::from_secs(2);

struct Outage {
    since: std::time::Instant,
    summary: String,
}

impl Health {
    /// Calls `f` (from whichever thread sees Consul answer again) when an
    /// outage that may have stranded requests ends.
    pub(crate) fn on_return(&self, f: impl Fn() + Send + 'static) {
        *self.on_return.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Calls `f` (from whichever thread sees it) when Consul refuses the
    /// credentials.
    pub(crate) fn on_refused(&self, f: impl Fn() + Send + 'static) {
        *self.on_refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    pub(crate) fn reachable(&self, consul: &Consul) {
        crate::metrics::METRICS.consul_answered();
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(outage) = down.take() {
            let lasted = outage.since.elapsed();
            log::info!(
                "Consul at {} answers again after {} without it; catching up",
                consul.server(),
                crate::duration::human(lasted)
            );
            if lasted >= STRANDING {
                if let Some(f) = &*self.on_return.lock().unwrap_or_else(|e| e.into_inner()) {
                    f();
                }
            }
        }
    }

    pub(crate) fn unreachable(&self, err: &ConsulError) {
        let refused = matches!(
            err.kind,
            ConsulErrorKind::Denied(_) | ConsulErrorKind::Tls(_)
        );
        if refused && let Some(f) = &*self.on_refused.lock().unwrap_or_else(|e| e.into_inner()) {
            f();
        }
        let summary = err.summary();
        if let ConsulErrorKind::Denied(_) = err.kind {
            crate::metrics::METRICS.consul_failed("denied", false);
            // Consul answers: not an outage.
            let mut denied = self.denied.lock().unwrap_or_else(|e| e.into_inner());
            let repeat = match &*denied {
                Some((last, at)) => *last != summary || at.elapsed() >= DENIAL_REPEAT,
                None => true,
            };
            if repeat {
                log::warn!(
                    "{err}; retrying with backoff (the running version stays; logged again if \
                     the denial changes, or in {})",
                    crate::duration::human(DENIAL_REPEAT)
                );
                *denied = Some((summary, std::time::Instant::now()));
            } else {
                log::debug!("{err}");
            }
            return;
        }
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        crate::metrics::METRICS.consul_failed(err.kind.as_str(), down.is_none());
        match down.as_mut() {
            None => {
                log::warn!(
                    "{err}; retrying with backoff (the running version stays; logged again \
                     when Consul answers)"
                );
                *down = Some(Outage {
                    since: std::time::Instant::now(),
                    summary,
                });
            }
            Some(outage) if outage.summary != summary => {
                log::debug!("Consul at {} is still failing, now: {summary}", err.server);
                outage.summary = summary;
            }
            Some(_) => log::debug!("{err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(names: &[&str], wave: Option<(&str, u64)>) -> TreeSeen {
        let v = |n: &str| VersionName::parse(n).unwrap();
        TreeSeen {
            listing: Some(Arc::new(ListingSeen {
                versions: names.iter().map(|n| (v(n), format!("p/{n}/"))).collect(),
                wave: wave.map(|(n, i)| Wave {
                    version: v(n),
                    base_index: i,
                    restart: None,
                }),
                ..ListingSeen::default()
            })),
        }
    }

    #[test]
    fn a_whole_read_that_changed_nothing_keeps_the_listing_held_and_one_that_did_is_taken_whole() {
        let held = listing(&["v1", "v2"], None).listing.unwrap();
        let mut same = listing(&["v1", "v2"], None);
        reuse(&mut same, &held);
        assert!(Arc::ptr_eq(same.listing.as_ref().unwrap(), &held));
        // Only the wave changed: the new wave is taken, not the held listing.
        let mut waved = listing(&["v1", "v2"], Some(("v2", 7)));
        reuse(&mut waved, &held);
        let taken = waved.listing.unwrap();
        assert!(!Arc::ptr_eq(&taken, &held));
        assert_eq!(
            *taken,
            *listing(&["v1", "v2"], Some(("v2", 7))).listing.unwrap()
        );
        // A version gone and one new: exactly what was read.
        let mut changed = listing(&["v2", "v3"], None);
        reuse(&mut changed, &held);
        assert_eq!(
            changed
                .listing
                .unwrap()
                .versions
                .keys()
                .map(VersionName::as_str)
                .collect::<Vec<_>>(),
            ["v2", "v3"]
        );
    }

    fn target() -> Target {
        Target {
            prefix: Prefix::parse("p").unwrap(),
            node: "node4".into(),
            own: Arc::default(),
            book: Arc::default(),
            rescan: Duration::from_secs(300),
            session: Arc::default(),
        }
    }

    #[test]
    fn the_switch_that_ends_a_rollout_leaves_its_wave_to_current_s_index() {
        // The last step of a rollout rings `switched v2`; the main loop may
        // hear it before it sees the new `current`. Clearing the wave here
        // would send the node back to the old version meanwhile.
        let target = target();
        let v2 = VersionName::parse("v2").unwrap();
        let mut book = Book::default();
        let listing = ListingSeen {
            versions: [(v2.clone(), "p/v2/".to_string())].into(),
            wave: Some(Wave {
                version: v2.clone(),
                base_index: 7,
                restart: None,
            }),
            ..ListingSeen::default()
        };
        book.whole(
            TreeSeen {
                listing: Some(Arc::new(listing)),
            },
            10,
            &target,
        );
        let seen = book
            .ring(11, Heard::Change(Change::Switched(v2.clone())), &target)
            .unwrap();
        assert_eq!(
            seen.listing
                .unwrap()
                .wave
                .clone()
                .map(|w| (w.version, w.base_index)),
            Some((v2, 7))
        );
        // An undo (the plan deleted) clears it.
        let seen = book.ring(12, Heard::Wave(None), &target).unwrap();
        assert_eq!(seen.listing.unwrap().wave, None);
    }

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
