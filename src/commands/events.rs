//! `depro events`: follows a prefix and prints one line per change, for
//! chat hooks and audit logs (issue 22): versions created and removed,
//! switches of `current` (by whom, how, with what message), a rollout's
//! waves started and finished, nodes' state changes, failures with their
//! reason, agents joining and leaving. `-json`: one object per line, each
//! with the Consul index it was seen at, which `-since=INDEX` resumes from.
//!
//! One blocking query at a time (the whole prefix, `?recurse`, from any
//! server), whatever the fleet's size; the events are the difference
//! between two reads (`diff`, pure).

use std::collections::BTreeSet;
use std::io::Write;

use serde::Serialize;

use super::Ctx;
use crate::error::Result;
use crate::tree::{NodeState, Tree, VersionInfo};
use crate::version_name::VersionName;

/// One change.
#[derive(Debug, Default, PartialEq, Serialize)]
pub(crate) struct Event {
    /// The Consul index of the read that saw it.
    pub index: u64,
    /// What happened: `created`, `removed`, `switched`, `restarted`,
    /// `state`, `failed`, `wave_started`, `wave_finished`, `joined`, `left`.
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub how: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wave: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

impl Event {
    /// The event as a line for people and logs (without its time).
    pub(crate) fn line(&self) -> String {
        let s = |o: &Option<String>| o.as_deref().map_or("-".into(), crate::tree::shown);
        let (v, n) = (s(&self.version), s(&self.node));
        let text = match self.event {
            "created" => format!("{v} created by {}", s(&self.by)),
            "removed" => match &self.by {
                Some(by) => format!("{v} removed by {}", crate::tree::shown(by)),
                None => format!("{v} removed"),
            },
            "switched" => {
                let message = match &self.message {
                    Some(m) => format!(": {}", crate::tree::shown(m)),
                    None => String::new(),
                };
                format!(
                    "current {} -> {} by {} ({}){message}",
                    s(&self.from),
                    s(&self.to),
                    s(&self.by),
                    s(&self.how)
                )
            }
            "state" => format!("{v} {n}: {} -> {}", s(&self.from), s(&self.to)),
            "failed" => format!("{v} {n}: failed: {}", s(&self.reason)),
            "wave_started" | "wave_finished" => format!(
                "{v}: wave {} {} ({})",
                self.wave.unwrap_or_default(),
                if self.event == "wave_started" {
                    "started"
                } else {
                    "finished"
                },
                self.nodes
                    .iter()
                    .map(|n| crate::tree::shown(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "joined" | "left" => format!("agent {n} {}", self.event),
            "restarted" => format!("{v} restarted by {}", s(&self.by)),
            other => other.to_string(),
        };
        format!("[{}] {text}", self.index)
    }
}

/// What changed from `before` to `after`, read at `index`.
pub(crate) fn diff(before: &Tree, after: &Tree, index: u64) -> Vec<Event> {
    let mut events = Vec::new();
    let event = |event: &'static str| Event {
        index,
        event,
        ..Event::default()
    };
    let versions: BTreeSet<_> = before
        .versions
        .keys()
        .chain(after.versions.keys())
        .collect();
    let none = crate::tree::VersionInfo::default();
    for version in &versions {
        let old = before.versions.get(*version).unwrap_or(&none);
        let new = after.versions.get(*version).unwrap_or(&none);
        // Removed and created again since `before`: another key.
        let again = old.exists && new.exists && old.create_index != new.create_index;
        if again {
            events.push(removed(version, old, after, index));
        }
        if (!old.exists || again) && new.exists {
            events.push(Event {
                version: Some(version.to_string()),
                by: new.meta.created_by.clone(),
                ..event("created")
            });
        }
    }
    // Switches: each one `.history` recorded after `before` was read, at
    // its own index, oldest first; a change of `current` that no entry
    // records (another client, an older CLI) as read.
    let some = |text: &str| (!text.is_empty()).then(|| text.to_string());
    let recorded = switches_after(&after.history, after.history_index, before.history_index);
    let name = |t: &Tree| t.current.as_ref().map(|c| c.value.clone());
    // A switch before the first one recorded that no entry places (an
    // older CLI's): told as read, without who.
    if let (Some(was), Some((at, first))) = (name(before), recorded.first()) {
        if was != first.from {
            events.push(Event {
                index: *at,
                from: Some(was),
                to: some(&first.from),
                ..event("switched")
            });
        }
    }
    for (at, switch) in &recorded {
        // A restart (`current` to itself) is its own event.
        let restart = switch.how == "restart";
        events.push(Event {
            index: *at,
            version: some(&switch.version).filter(|_| restart),
            from: some(&switch.from).filter(|_| !restart),
            to: some(&switch.version).filter(|_| !restart),
            by: some(&switch.by),
            how: some(&switch.how),
            message: some(&switch.message),
            ..event(if restart { "restarted" } else { "switched" })
        });
    }
    let was = match recorded.last() {
        Some((_, last)) => some(&last.version),
        None => name(before),
    };
    if was != name(after) {
        let meta = after
            .current
            .as_ref()
            .and_then(|c| c.version.as_ref())
            .and_then(|v| after.versions.get(v))
            .map(|i| &i.meta);
        // After recorded switches, what the version's key says is theirs.
        let after_recorded = !recorded.is_empty();
        events.push(Event {
            from: was,
            to: name(after),
            by: meta
                .and_then(|m| m.current_by.clone())
                .filter(|_| !after_recorded),
            how: meta
                .and_then(|m| m.current_how.clone())
                .filter(|_| !after_recorded),
            message: meta
                .and_then(|m| m.current_message.clone())
                .filter(|_| !after_recorded),
            ..event("switched")
        });
    }
    // Waves: a plan whose started waves grew, or that ended.
    fn waves(t: &Tree) -> Option<&crate::tree::RolloutPlan> {
        t.rollout.as_ref().map(|(p, _)| p)
    }
    match (waves(before), waves(after)) {
        (old, Some(new)) => {
            let same = old.filter(|o| o.version == new.version);
            // From the tree: no more waves than the plan has.
            let was = same.map_or(0, |o| o.started_waves.min(o.waves.len()));
            for wave in was + 1..=new.started_waves.min(new.waves.len()) {
                if wave > 1 {
                    events.push(wave_event(&event, "wave_finished", new, wave - 1));
                }
                events.push(wave_event(&event, "wave_started", new, wave));
            }
        }
        (Some(old), None) if old.started_waves > 0 => {
            let last = old.started_waves.min(old.waves.len()).max(1);
            events.push(wave_event(&event, "wave_finished", old, last));
        }
        _ => {}
    }
    for version in &versions {
        let old = before.versions.get(*version).unwrap_or(&none);
        let new = after.versions.get(*version).unwrap_or(&none);
        let nodes: BTreeSet<&String> = old.nodes.keys().chain(new.nodes.keys()).collect();
        for node in nodes {
            let state = |i: &crate::tree::VersionInfo| i.nodes.get(node).map(|e| e.state);
            let (from, to) = (state(old), state(new));
            if from == to {
                continue;
            }
            let base = Event {
                version: Some(version.to_string()),
                node: Some(node.clone()),
                ..event("state")
            };
            if to == Some(NodeState::Failed) {
                events.push(Event {
                    event: "failed",
                    reason: new.reasons.get(node).map(|r| r.error.clone()),
                    ..base
                });
            } else {
                events.push(Event {
                    from: Some(from.map_or("none", |s| s.as_str()).into()),
                    to: Some(to.map_or("gone", |s| s.as_str()).into()),
                    ..base
                });
            }
        }
        if old.exists && !new.exists {
            events.push(removed(version, old, after, index));
        }
    }
    let agents: BTreeSet<&String> = before.agents.keys().chain(after.agents.keys()).collect();
    for node in agents {
        let (was, is) = (
            before.agents.contains_key(node),
            after.agents.contains_key(node),
        );
        if was != is {
            events.push(Event {
                node: Some(node.clone()),
                ..event(if is { "joined" } else { "left" })
            });
        }
    }
    // In the order they happened: a recorded switch carries its own
    // index, below the read's (so the last line's index resumes after all).
    events.sort_by_key(|e| e.index);
    events
}

/// The switches `history` records after index `since`, oldest first, each
/// with its index: every write of `.history` (a switch, a change of the
/// policy) records the index it replaced (`after`), so a write's index is
/// the next write's `after`, and the last one's the key's (`index`).
/// Entries of an older CLI (no `after`) cannot be placed and are left out.
fn switches_after(
    history: &crate::tree::History,
    index: u64,
    since: u64,
) -> Vec<(u64, &crate::tree::Switch)> {
    let mut writes: Vec<u64> = history.switches.iter().map(|s| s.after).collect();
    writes.extend(history.policies.iter().map(|p| p.after));
    writes.retain(|a| *a > 0);
    writes.sort_unstable();
    let mut switches: Vec<_> = history
        .switches
        .iter()
        .filter(|s| s.after > 0)
        .map(|s| {
            let next = writes.partition_point(|a| *a <= s.after);
            (writes.get(next).copied().unwrap_or(index), s)
        })
        .filter(|(at, _)| *at > since)
        .collect();
    switches.sort_by_key(|(at, _)| *at);
    switches
}

/// `version` removed: who removed it, as recorded by the depro CLI (naming
/// the key it deleted by that key's CreateIndex) or by the scout (another
/// client's removal: 0, not known).
fn removed(version: &VersionName, old: &VersionInfo, after: &Tree, index: u64) -> Event {
    let by = after
        .removals
        .get(version.as_str())
        .filter(|(r, _)| r.created == old.create_index || r.created == 0)
        .map(|(r, _)| r.by.clone());
    Event {
        index,
        event: "removed",
        version: Some(version.to_string()),
        by,
        ..Event::default()
    }
}

fn wave_event(
    event: &dyn Fn(&'static str) -> Event,
    what: &'static str,
    plan: &crate::tree::RolloutPlan,
    wave: usize,
) -> Event {
    Event {
        version: Some(plan.version.clone()),
        wave: Some(wave),
        nodes: plan.waves.get(wave - 1).cloned().unwrap_or_default(),
        ..event(what)
    }
}

/// The tree as it was at `index`, as far as what is left shows it: keys
/// created (folder keys, agents) or written (the rest) after it are left
/// out; versions removed since (`.removed`) and agents that left since
/// (`.known` with `left`) are put back. What else was deleted since cannot
/// be seen: Consul keeps no record of deleted keys (the node keys of an
/// agent whose session expired). `now` is `entries` parsed.
fn as_of(
    prefix: &crate::tree::Prefix,
    entries: &[crate::consul::KvEntry],
    now: &Tree,
    index: u64,
) -> Tree {
    let mut kept: Vec<_> = entries
        .iter()
        .filter(|e| {
            let rest = e.key.strip_prefix(prefix.as_dir()).unwrap_or_default();
            // A version's folder key is written again at each switch; an
            // agent's announcement at each session.
            let created_only = rest.ends_with('/') || rest.starts_with(crate::tree::AGENTS);
            if created_only {
                e.create_index <= index
            } else {
                e.modify_index <= index
            }
        })
        .cloned()
        .collect();
    let back = |key: String, value: &[u8], held: bool, created: u64| crate::consul::KvEntry {
        key,
        value: value.to_vec(),
        session: held.then(String::new),
        create_index: created,
        modify_index: created,
        flags: 0,
    };
    for (name, (removal, removed_at)) in &now.removals {
        let version = crate::version_name::VersionName::parse(name);
        let still = version.as_ref().ok().and_then(|v| now.versions.get(v));
        // Gone, or there again under another key (created since: then
        // told as removed and created). The scout's records (another
        // client's removal) do not know the key: a version created and
        // removed while not following is told as removed only.
        let gone = still.is_none_or(|i| !i.exists || i.create_index != removal.created);
        if *removed_at > index && removal.created <= index && gone {
            let key = format!("{}{name}/", prefix.as_dir());
            kept.push(back(key, b"", false, removal.created));
        }
    }
    let known = format!("{}{}/", prefix.as_dir(), crate::tree::KNOWN);
    for entry in entries.iter().filter(|e| e.modify_index > index) {
        let Some(node) = entry.key.strip_prefix(&known) else {
            continue;
        };
        let record: crate::tree::AgentRecord =
            serde_json::from_slice(&entry.value).unwrap_or_default();
        if record.left.is_some() && record.joined <= index && !now.agents.contains_key(node) {
            kept.push(back(
                prefix.agent_key(node),
                &entry.value,
                true,
                record.joined,
            ));
        }
    }
    let mut then = Tree::parse(prefix, &kept);
    // The switches recorded after `index` are told from the record.
    then.history_index = index;
    then
}

/// `depro events`.
pub(crate) fn events(ctx: &mut Ctx, json: bool, since: Option<u64>) -> Result<()> {
    end_cleanly_on_signals();
    super::status::follow_prefix(ctx, |ctx, seen| {
        let then;
        let before = match (seen.before, since) {
            (Some(before), _) => before,
            (None, Some(index)) => {
                then = as_of(&ctx.prefix, seen.entries, seen.tree, index);
                &then
            }
            // From now on: the state as it is, no events.
            (None, None) => {
                eprintln!("following {} from index {}", ctx.prefix, seen.index);
                return;
            }
        };
        if seen.before.is_none() {
            eprintln!(
                "following {} from index {}",
                ctx.prefix,
                since.unwrap_or_default()
            );
        }
        let mut out = std::io::stdout().lock();
        for event in diff(before, seen.tree, seen.index) {
            let _ = match json {
                true => writeln!(out, "{}", serde_json::to_string(&event).unwrap_or_default()),
                false => writeln!(out, "{} {}", crate::logging::timestamp(), event.line()),
            };
        }
        let _ = out.flush();
    })
}

/// SIGINT and SIGTERM end the command with exit 0, between two lines.
fn end_cleanly_on_signals() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                // Waits for the lines being written to end, and keeps
                // others from starting; but not forever (a reader that
                // stopped reading holds the write).
                std::thread::spawn(|| {
                    let mut out = std::io::stdout().lock();
                    let _ = std::io::Write::flush(&mut out);
                    std::process::exit(0);
                });
                std::thread::sleep(std::time::Duration::from_secs(1));
                std::process::exit(0);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::KvEntry;

    fn tree(entries: &[(&str, &str, u64)]) -> (crate::tree::Prefix, Vec<KvEntry>) {
        let prefix = crate::tree::Prefix::parse("app/version").unwrap();
        let entries = entries
            .iter()
            .map(|(k, v, i)| KvEntry::sample(&format!("app/version/{k}"), v, true, *i))
            .collect();
        (prefix, entries)
    }

    /// A switch as `.history` records it.
    fn switch(version: &str, from: &str, how: &str, by: &str, after: u64) -> crate::tree::Switch {
        crate::tree::Switch {
            version: version.into(),
            from: from.into(),
            how: how.into(),
            by: by.into(),
            after,
            ..crate::tree::Switch::default()
        }
    }

    #[test]
    fn a_new_version_a_switch_and_a_failure_are_three_events_in_that_order() {
        let (prefix, before) = tree(&[
            ("v1/", "", 1),
            ("current", "v1", 2),
            ("v1/node1", "active", 3),
        ]);
        let (_, after) = tree(&[
            ("v1/", "", 1),
            ("v1/node1", "active", 3),
            (
                "v2/",
                r#"{"created_by":"ann@ci","current_by":"ann@ci","current_how":"deploy"}"#,
                4,
            ),
            ("v2/node1", "failed", 5),
            ("current", "v2", 6),
        ]);
        let events = diff(
            &Tree::parse(&prefix, &before),
            &Tree::parse(&prefix, &after),
            7,
        );
        let kinds: Vec<_> = events.iter().map(|e| e.event).collect();
        assert_eq!(kinds, ["created", "switched", "failed"]);
        assert_eq!(events[0].by.as_deref(), Some("ann@ci"));
        assert_eq!(events[1].line(), "[7] current v1 -> v2 by ann@ci (deploy)");
        assert!(events.iter().all(|e| e.index == 7));
    }

    #[test]
    fn since_an_index_what_was_written_after_it_is_new_and_the_rest_is_not() {
        let (prefix, entries) = tree(&[
            ("v1/", r#"{"current_by":"bob"}"#, 1),
            ("v1/node1", "active", 2),
            ("v2/", "", 10),
            ("v2/node1", "ready", 11),
        ]);
        let then = as_of(&prefix, &entries, &Tree::parse(&prefix, &entries), 5);
        let events = diff(&then, &Tree::parse(&prefix, &entries), 12);
        let said: Vec<_> = events.iter().map(Event::line).collect();
        assert_eq!(
            said,
            ["[12] v2 created by -", "[12] v2 node1: none -> ready"]
        );
    }

    #[test]
    fn switches_are_told_from_the_record_each_at_its_own_index_even_two_between_reads() {
        use crate::tree::{History, Policy};
        let switch = |version, from, how, after| switch(version, from, how, "ann", after);
        // Writes of .history: v1 at 10 (after 0: an older CLI), v2 at 20
        // (after 10), the policy at 30 (after 20), v3 at 40, v2 again at 50.
        let mut history = History::default().with(switch("v1", "", "deploy", 0));
        history = history.with(switch("v2", "v1", "deploy", 10));
        history = history.with_policy(Policy {
            after: 20,
            ..Policy::default()
        });
        history = history.with(switch("v3", "v2", "deploy", 30));
        history = history.with(switch("v2", "v3", "rollback", 40));
        let json = String::from_utf8(history.to_json()).unwrap();
        let (prefix, before) = tree(&[("current", "v2", 20), (".history", "{}", 20)]);
        let (_, after) = tree(&[("current", "v2", 50), (".history", &json, 50)]);
        let events = diff(
            &Tree::parse(&prefix, &before),
            &Tree::parse(&prefix, &after),
            55,
        );
        let said: Vec<_> = events.iter().map(Event::line).collect();
        assert_eq!(
            said,
            [
                "[40] current v2 -> v3 by ann (deploy)",
                "[50] current v3 -> v2 by ann (rollback)"
            ]
        );
        // Resumed from 25: the same two; from 45, the rollback only.
        let resumed = |index| {
            let then = as_of(&prefix, &after, &Tree::parse(&prefix, &after), index);
            diff(&then, &Tree::parse(&prefix, &after), 55).len()
        };
        assert_eq!((resumed(25), resumed(45), resumed(50)), (2, 1, 0));
    }

    #[test]
    fn a_restart_a_version_created_again_and_an_unrecorded_switch_are_told_as_such() {
        use crate::tree::History;
        let switch = |version, from, how, after| switch(version, from, how, "", after);
        // current was v1 at 10; an older CLI switched to v2 (no `after`),
        // then v2 was restarted at 30; v3 was removed (another client, the
        // scout's record) and created again at 25.
        let history = History::default()
            .with(switch("v2", "v1", "deploy", 0))
            .with(switch("v2", "v2", "restart", 20));
        let json = String::from_utf8(history.to_json()).unwrap();
        let (prefix, before) = tree(&[("current", "v1", 10), ("v3/", "", 5)]);
        let (_, after) = tree(&[
            ("current", "v2", 15),
            (".history", &json, 30),
            ("v3/", "", 25),
            (".removed/v3", r#"{"by":"another client","created":0}"#, 22),
        ]);
        let events = diff(
            &Tree::parse(&prefix, &before),
            &Tree::parse(&prefix, &after),
            31,
        );
        let said: Vec<_> = events.iter().map(Event::line).collect();
        assert_eq!(
            said,
            [
                "[30] current v1 -> v2 by - (-)",
                "[30] v2 restarted by -",
                "[31] v3 removed by another client",
                "[31] v3 created by -"
            ]
        );
    }

    #[test]
    fn since_an_index_versions_the_cli_removed_and_agents_that_stopped_since_are_told() {
        let left = r#"{"depro":"0.1.0","left":"2026-12-07T10:00:00.000Z","joined":3}"#;
        let (prefix, entries) = tree(&[
            ("v2/", "", 2),
            // v1 (created at 1) removed at 8 by ann; v0 removed at 4.
            ("v2/node1", "active", 5),
            (".removed/v1", r#"{"by":"ann@ci","created":1}"#, 8),
            (".removed/v0", r#"{"by":"bob@ci","created":1}"#, 4),
            // node2 (joined at 3) stopped at 9; node3 stopped at 4.
            (".known/node2", left, 9),
            (".known/node3", left, 4),
        ]);
        let then = as_of(&prefix, &entries, &Tree::parse(&prefix, &entries), 6);
        let events = diff(&then, &Tree::parse(&prefix, &entries), 10);
        let said: Vec<_> = events.iter().map(Event::line).collect();
        assert_eq!(said, ["[10] v1 removed by ann@ci", "[10] agent node2 left"]);
        // Live: the record names who removed it.
        let before = Tree::parse(&prefix, &tree(&[("v1/", "", 1)]).1);
        let events = diff(&before, &Tree::parse(&prefix, &entries), 8);
        assert!(
            events
                .iter()
                .any(|e| e.line() == "[8] v1 removed by ann@ci")
        );
    }
}
