//! The scout: one agent per prefix rings the doorbell for the changes that
//! other clients make without ringing it, so that the seed's own protocol
//! (plain KV writes: add `<prefix>/<version>/`, set `current`) gets the same
//! prompt service as the depro CLI.
//!
//! Every agent runs this thread; the one holding `<prefix>/.scout` (a lock
//! of its session) scouts, the others wait in a blocking query on that key
//! and take over when its holder's session ends. The scout:
//! - follows the prefix's one-level listing in a blocking query (every
//!   write under the prefix wakes it, node keys too, so its reads are
//!   paced: [`PACE`], a few at once then four a second while they come);
//! - after each answer, reads the tree whole (the listing, and which
//!   folders have their key: a folder key deleted while node keys remain
//!   leaves the listing as it was) and compares it with its own agent's
//!   snapshot, once that has heard every ring up to the doorbell's index: a
//!   version there that the snapshot lacks was added without a ring, one the
//!   snapshot has that is gone (confirmed by a read of its key) was removed
//!   without one;
//! - rings for each (`created v/`, `removed v/`; a plain key, which no ring
//!   names, as a ring no agent can apply, which makes them read the tree
//!   whole), and rings when `current` appears (a query on a missing key is
//!   paced by the agents, and a ring ends their pause).
//!
//! So the work for a change the CLI rang stays one doorbell answer per agent
//! (the scout's check costs its own agent two reads); a change another
//! client made costs one more ring, heard by every agent, instead of
//! waiting for their next rescan. See docs/scaling.md.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::watch::{Health, Stop, Target, Whole, backed_off, read_whole};
use crate::consul::{Conflict, Consul, Read, TxnOp, TxnOutcome};
use crate::cursor::{Cursor, Pacing};
use crate::doorbell::{Change, Ring};
use crate::version_name::VersionName;

/// The scout's pace while the prefix keeps changing (node writes): a few
/// reads at once, then four a second.
const PACE: Pacing = Pacing {
    burst: 5,
    refill: Duration::from_millis(250),
};

/// How long the scout waits for its agent's snapshot to hear the rings up
/// to the doorbell's index before comparing.
const CATCH_UP: Duration = Duration::from_secs(2);

/// How long a waiting agent's query on the scout's lock may wait.
const LOCK_WAIT: Duration = Duration::from_secs(60);

pub(super) fn scout_loop(consul: &Consul, target: &Target, health: &Health, stop: &Stop) {
    let key = target.prefix.scout_key();
    let mut cursor = Cursor::new(LOCK_WAIT, true, PACE);
    let mut denied = false;
    // Who held the lock while this agent waited for it.
    let mut holder: Option<String> = None;
    loop {
        if stop.stopped() {
            return;
        }
        let session = target
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(session) = session else {
            if stop.sleep(Duration::from_secs(1), stop.rings()) {
                return;
            }
            continue;
        };
        let value = target.node.as_bytes();
        let lock = TxnOp::Lock {
            key: &key,
            value,
            session: &session,
            flags: 0,
        };
        match consul.txn(&[lock]) {
            Ok(TxnOutcome::Committed(_)) => {
                log::debug!(
                    "{}: this agent scouts it for other clients' changes",
                    target.prefix
                );
                denied = false;
                if scout(consul, target, health, stop, &session, holder.take()) {
                    return;
                }
            }
            Ok(TxnOutcome::Rejected(failures)) => {
                let conflict = failures.first().map(|f| f.conflict);
                if conflict == Some(Conflict::Denied) {
                    if !denied {
                        log::debug!(
                            "{}: may not hold {key}; another agent scouts",
                            target.prefix
                        );
                        denied = true;
                    }
                    if stop.sleep(target.rescan, stop.rings()) {
                        return;
                    }
                    continue;
                }
                // Another agent scouts (or this session just ended): wait
                // until the lock is free.
                if wait_for_free_lock(consul, &key, &mut cursor, health, stop, &mut holder) {
                    return;
                }
            }
            Err(e) => {
                if backed_off(&e, &mut cursor, health, stop) {
                    return;
                }
            }
        }
    }
}

/// Waits until no session holds the scout's lock (or the key is gone),
/// noting who held it. Returns whether to stop.
fn wait_for_free_lock(
    consul: &Consul,
    key: &str,
    cursor: &mut Cursor,
    health: &Health,
    stop: &Stop,
    holder: &mut Option<String>,
) -> bool {
    loop {
        let pause = cursor.pause(Instant::now());
        if (!pause.is_zero() && stop.sleep(pause, stop.rings())) || stop.stopped() {
            return true;
        }
        match consul.get(key, cursor.read()) {
            Ok(answer) => {
                health.reachable(consul);
                let held = answer.value.as_ref().filter(|e| e.session.is_some());
                if let Some(entry) = held {
                    let name = String::from_utf8_lossy(&entry.value).into_owned();
                    *holder = crate::tree::check_node_name(&name).is_ok().then_some(name);
                }
                let held = held.is_some();
                cursor.answered(answer.index, !held);
                if !held {
                    return false;
                }
            }
            Err(e) => {
                if backed_off(&e, cursor, health, stop) {
                    return true;
                }
            }
        }
    }
}

/// Scouts while this agent holds the lock with `session`. Returns whether
/// to stop the thread.
fn scout(
    consul: &Consul,
    target: &Target,
    health: &Health,
    stop: &Stop,
    session: &str,
    predecessor: Option<String>,
) -> bool {
    let mut cursor = Cursor::new(super::watch::WAIT, true, PACE);
    let dir = target.prefix.as_dir().to_string();
    let current_key = target.prefix.current_key();
    // Whether the last listing had `current` (`None`: no listing yet).
    // Only that is kept, not the listing: the scout's memory stays flat
    // with the versions.
    let mut had_current: Option<bool> = None;
    // The first comparison rings for a whole read instead (see
    // `ring_for_changes`).
    let mut first = true;
    // What this scout read before its last ring for a whole read.
    let mut baseline: Option<BTreeSet<VersionName>> = None;
    // The agents announced at the last answer (`None`: not read yet).
    let mut agents: Option<BTreeSet<String>> = None;
    // The scout before this one, whose departure it records.
    let mut predecessor = predecessor;
    loop {
        let ours = target
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(session);
        if !ours {
            return false; // a new session: take the lock again
        }
        let pause = cursor.pause(Instant::now());
        if (!pause.is_zero() && stop.sleep(pause, stop.rings())) || stop.stopped() {
            return true;
        }
        let answer = match consul.keys(&dir, cursor.read()) {
            Ok(answer) => answer,
            Err(e) => {
                if backed_off(&e, &mut cursor, health, stop) {
                    return true;
                }
                had_current = None;
                continue;
            }
        };
        health.reachable(consul);
        let keys = answer.value.unwrap_or_default();
        // Every answer is looked at (paced): not only a listing that
        // changed, since a folder key deleted under remaining node keys
        // leaves the listing as it was.
        cursor.answered(answer.index, false);
        let has_current = keys.contains(&current_key);
        drop(keys);
        let current_appeared = has_current && had_current == Some(false);
        had_current = Some(has_current);
        let scouted = ring_for_changes(
            consul,
            target,
            answer.index,
            current_appeared,
            &mut first,
            &mut baseline,
        )
        .and_then(|()| record_departures(consul, target, &mut agents, &mut predecessor));
        if let Err(e) = scouted {
            if backed_off(&e, &mut cursor, health, stop) {
                return true;
            }
            had_current = None;
        }
    }
}

/// Records, in `.known/<node>`, the departure of each agent whose
/// announcement went since the last answer without its agent recording it
/// (it died: Consul deleted the announcement with its session), so that
/// `depro events -since` tells it: `left`, and `joined` from the record's
/// ModifyIndex (written with the announcement). By check-and-set, and only
/// while the agent is not announced again. One keys read per answer, and a
/// read and a write per departure; when the scout starts, the departure of
/// the scout before it, if it died (recorded late).
fn record_departures(
    consul: &Consul,
    target: &Target,
    agents: &mut Option<BTreeSet<String>>,
    predecessor: &mut Option<String>,
) -> Result<(), crate::consul::ConsulError> {
    let dir = target.prefix.agents_dir();
    let names: BTreeSet<String> = consul
        .keys(&dir, Read::consistent())?
        .value
        .unwrap_or_default()
        .iter()
        .filter_map(|key| key.strip_prefix(&dir))
        .map(String::from)
        .collect();
    let before = agents.replace(names);
    let gone: Vec<String> = match before {
        Some(before) => before.into_iter().filter(|n| !has(agents, n)).collect(),
        // A scout that takes over from one that died records that one.
        None => predecessor
            .take()
            .into_iter()
            .filter(|n| !has(agents, n))
            .collect(),
    };
    for node in gone {
        let key = target.prefix.known_key(&node);
        let Some(known) = consul.get(&key, Read::consistent())?.value else {
            continue; // forgotten
        };
        // As a `Value`: every field kept, whichever depro wrote it.
        let mut record: serde_json::Value =
            serde_json::from_slice(&known.value).unwrap_or_default();
        if !record.is_object() || record["left"].is_string() {
            continue; // it stopped cleanly and said so (or is no record)
        }
        record["left"] = crate::logging::timestamp().into();
        record["joined"] = known.modify_index.into();
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let op = TxnOp::Cas {
            key: &key,
            value: &value,
            index: known.modify_index,
        };
        let announced = target.prefix.agent_key(&node);
        let absent = TxnOp::CheckNotExists { key: &announced };
        if let TxnOutcome::Committed(_) = consul.txn(&[op, absent])? {
            log::info!(
                "{}: the agent {node} left (its session ended)",
                target.prefix
            );
        }
    }
    Ok(())
}

fn has(agents: &Option<BTreeSet<String>>, node: &str) -> bool {
    agents.as_ref().is_some_and(|a| a.contains(node))
}

/// Compares the tree as of `index` with the agent's snapshot, and rings for
/// what no ring announced.
///
/// The first time after taking the lock, it rings once for a whole read
/// instead: the agent's snapshot may come from a whole read made after a
/// change no ring announced, which another agent's earlier read missed
/// (agents starting together while a plain client adds a version).
///
/// After a ring for a whole read, the next comparison is with the versions
/// this scout read before ringing (`baseline`), not with the snapshot: the
/// agents read after the ring, each at its own index, and this agent's read
/// may have come after a change another's missed. What differs is rung for
/// (again, for an agent that has it: applying a ring twice changes nothing).
fn ring_for_changes(
    consul: &Consul,
    target: &Target,
    index: u64,
    current_appeared: bool,
    first: &mut bool,
    baseline: &mut Option<BTreeSet<VersionName>>,
) -> Result<(), crate::consul::ConsulError> {
    let (seen, _) = read_whole(consul, target, Whole::From { at: index })?;
    let tree: BTreeSet<VersionName> = seen
        .listing
        .as_ref()
        .map(|l| l.versions.keys().cloned().collect())
        .unwrap_or_default();
    let plain: BTreeSet<VersionName> = seen
        .listing
        .as_ref()
        .map(|l| {
            l.versions
                .iter()
                .filter(|(_, key)| !key.ends_with('/'))
                .map(|(v, _)| v.clone())
                .collect()
        })
        .unwrap_or_default();
    // The doorbell as of this read, and the agent's snapshot once it has
    // heard every ring up to it.
    let bell_key = target.prefix.changed_key();
    let bell = consul.get(&bell_key, Read::consistent())?;
    let bell_index = bell.value.as_ref().map_or(0, |e| e.modify_index);
    let bell_ring = bell.value.as_ref().and_then(|e| Ring::parse(&e.value));
    let deadline = Instant::now() + CATCH_UP;
    let book = loop {
        let (heard, versions) = target.book().versions();
        if heard >= bell_index || Instant::now() >= deadline {
            break versions;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let Some(book) = book else {
        return Ok(()); // the agent has not read the tree yet
    };
    let book = baseline.take().unwrap_or(book);
    if *first {
        log::debug!(
            "{}: scouting from here; one ring for a whole read, for agents that read before a \
             change no ring announced",
            target.prefix
        );
        // Lost to another ring: tried again at the next answer.
        *first = ring(consul, target, None, bell_index)?.is_none();
        if !*first {
            *baseline = Some(tree);
        }
        return Ok(());
    }
    let mut changes: Vec<Change> = Vec::new();
    let mut plain_changes = false;
    for version in tree.difference(&book) {
        if plain.contains(version) {
            plain_changes = true;
        } else {
            changes.push(Change::Created(version.clone()));
        }
    }
    for version in book.difference(&tree) {
        // The snapshot may have heard a ring after this read: confirm.
        let folder = target.prefix.folder_key(version);
        let plain_key = folder.trim_end_matches('/').to_string();
        let gone_folder = consul.get(&folder, Read::consistent())?.value.is_none();
        let gone_plain = consul.get(&plain_key, Read::consistent())?.value.is_none();
        if gone_folder && gone_plain {
            changes.push(Change::Removed {
                version: version.clone(),
                folder: true,
            });
        }
    }
    if current_appeared {
        let current = consul.get(&target.prefix.current_key(), Read::consistent())?;
        let named = current
            .value
            .and_then(|e| VersionName::parse(String::from_utf8_lossy(&e.value).trim()).ok());
        if let Some(version) = named {
            let rung =
                matches!(&bell_ring, Some(r) if r.change == Change::Switched(version.clone()));
            if !rung {
                changes.push(Change::Switched(version));
            }
        }
    }
    let mut after = bell_index;
    for change in changes {
        log::info!(
            "{}: {change} without a ring of the doorbell (another client); ringing it for the agents",
            target.prefix
        );
        match ring(consul, target, Some(change), after)? {
            Some(index) => after = index,
            None => return Ok(()), // someone else rang: the next answer looks again
        }
    }
    if plain_changes {
        log::info!(
            "{}: a version's plain key came or went without a ring; ringing for a whole read",
            target.prefix
        );
        if ring(consul, target, None, after)?.is_some() {
            *baseline = Some(tree);
        }
    }
    Ok(())
}

/// Rings the doorbell by check-and-set on `after`: a ring agents apply
/// (`Some`), or one they cannot and read the tree whole for (`None`).
/// Returns the new index, or `None` if someone else rang first.
fn ring(
    consul: &Consul,
    target: &Target,
    change: Option<Change>,
    after: u64,
) -> Result<Option<u64>, crate::consul::ConsulError> {
    let key = target.prefix.changed_key();
    let who = format!("the scout {}", target.node);
    let when = crate::logging::timestamp();
    // A removal is recorded with its ring, as the CLI records its own (for
    // `depro events -since`), the oldest records beyond the bound deleted.
    let mut removal = None;
    if let Some(Change::Removed { version, .. }) = &change {
        let dir = format!("{}{}/", target.prefix.as_dir(), crate::tree::REMOVED);
        let records = consul.list(&dir, Read::consistent())?.value;
        let forget =
            crate::tree::Tree::parse(&target.prefix, &records).removals_beyond_bound(version);
        let record = crate::tree::Removal {
            by: format!("another client (seen by {who})"),
            at: when.clone(),
            created: 0,
        };
        let keys: Vec<String> = forget
            .iter()
            .map(|v| target.prefix.removed_key(v))
            .collect();
        removal = Some((
            target.prefix.removed_key(version),
            serde_json::to_vec(&record).unwrap_or_default(),
            keys,
        ));
    }
    let value = match change {
        Some(change) => Ring { change, after }.text(&who, &when),
        None => format!("changed by another client, seen by {who} at {when}"),
    };
    let op = TxnOp::Cas {
        key: &key,
        value: value.as_bytes(),
        index: after,
    };
    let mut ops = vec![op];
    if let Some((key, record, forget)) = &removal {
        ops.push(TxnOp::Set { key, value: record });
        ops.extend(forget.iter().map(|key| TxnOp::Delete { key }));
    }
    Ok(match consul.txn(&ops)? {
        outcome @ TxnOutcome::Committed(_) => outcome.index_of(&key),
        TxnOutcome::Rejected(_) => None,
    })
}
