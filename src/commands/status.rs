//! `status` (alias `query`): every version in creation order, which one is
//! current, and each live node's state, as aligned tables or as JSON.
//!
//! The JSON document (stable; fields are only ever added):
//!
//! ```json
//! { "schema": 1,                           // the document's version (see SCHEMA)
//!   "prefix": "api/version",
//!   "current": "v2",                       // null when unset or invalid
//!   "previous": "v1",                      // what `depro rollback` would go back to, or null
//!   "versions": [
//!     { "name": "v1", "current": false,
//!       "removing": false,                  // folder key gone, nodes still cleaning
//!       "create_index": 12,
//!       "created_at": "2026-11-26T10:00:00.000Z", "created_by": "ops@host",   // or null
//!       "current_since": null, "current_by": null,   // set only on the current version
//!       "current_message": null,
//!       "counts": { "busy": 0, "ready": 3, "active": 0, "failed": 0 },
//!       "nodes": { "node1": "ready", "node2": "ready", "node3": "ready" },
//!       "nodes_since": { "node1": "2026-11-26T10:00:02.113Z", … },   // when each state was written, or null
//!       "reasons": { "node4": { "hook": "deploy", "error": "the deploy hook exited with status 3",
//!                               "exit_code": 3, "output": "…", "at": "…" } } } ],
//!   "agents": { "node1": { "depro": "0.3.0", "since": "2026-11-26T09:00:00.000Z" } },
//!   "absent": { "node5": { "depro": "0.3.0", "since": "…", "left": "…", "joined": 812 } },   // agents that followed it and are gone (left: when it stopped, if recorded)
//!   "rollout": null,                       // or the progressive rollout under way, see below
//!   "policy": null,                        // or { "flags": "-nodes=all -canary=1", "by", "since", "message" }
//!   "ignored": [ "../" ] }
//! ```
//!
//! `rollout`, while a progressive rollout is under way: `{ "version", "base",
//! "waves": [[nodes]], "started_waves", "switched": [nodes], "by", "since",
//! "flags", "paused", "driver", "in_effect" }` (`driver`: who drives its
//! waves, or null when no command does) (`in_effect` is false when `current` moved since it
//! started: then no agent follows it).

use std::collections::BTreeSet;

use super::{Ctx, version_arg};
use crate::cli::StatusArgs;
use crate::config::Env;
use crate::error::{Error, Result};
use crate::tree::{NodeState, Prefix, Tree, VersionInfo, shown};

pub(crate) fn status(args: StatusArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let only = args.version.as_deref().map(version_arg).transpose()?;
    if args.watch {
        return watch(&mut ctx, only.as_ref());
    }
    let tree = ctx.read_tree()?;
    // Agents that follow the prefix make it a fleet already, before its
    // first version: it is shown, not refused.
    let fleet_only = tree.versions.is_empty() && tree.current.is_none() && !tree.agents.is_empty();
    match if fleet_only {
        Ok(())
    } else {
        ctx.check_not_empty(&tree)
    } {
        // A script reading -json gets a document even for an empty prefix
        // (no versions), then the error and its exit code.
        Err(e @ Error::Refused(_)) if args.tree.json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&json(&ctx.prefix, &tree, &|_| true))
                    .unwrap_or_default()
            );
            return Err(e);
        }
        other => other?,
    }
    if let Some(version) = &only {
        if !tree.versions.contains_key(version) {
            return Err(Error::Refused(format!(
                "{version} is not in the tree under {}; `depro status -prefix={}` lists the versions",
                ctx.prefix, ctx.prefix
            )));
        }
    }
    let filter = |v: &crate::version_name::VersionName| only.as_ref().is_none_or(|o| o == v);
    if args.tree.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json(&ctx.prefix, &tree, &filter)).unwrap_or_default()
        );
    } else {
        print!("{}", table(&ctx.prefix, &tree, &filter));
    }
    Ok(())
}

/// `status -watch`: on a terminal, the table kept up to date in place
/// (only changed lines are redrawn) with when Consul last answered; else
/// the starting state (`now:` lines), then one line per change (a node's
/// state, `current`, a version created or removed), for logs. Follows the prefix with blocking `?stale` reads,
/// paced like the commands' follow loop, until interrupted.
fn watch(ctx: &mut Ctx, only: Option<&crate::version_name::VersionName>) -> Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    let filter = |v: &crate::version_name::VersionName| only.is_none_or(|o| o == v);
    let mut drawn: Vec<String> = Vec::new();
    follow_prefix(ctx, |ctx, seen| {
        let (tree, last) = (seen.tree, seen.before);
        if tty {
            // Every answer: the footer says when Consul last answered.
            let text = format!(
                "{}\n(heard from Consul at {}; Ctrl-C ends)\n",
                table(&ctx.prefix, tree, &filter),
                crate::logging::timestamp()
            );
            print!("{}", redraw(&mut drawn, &text));
        } else if !seen.changed {
            return;
        } else if last.is_none() {
            // The starting state, as a state (not as changes from nothing).
            for line in state_lines(tree, &filter) {
                println!("{} now: {line}", crate::logging::timestamp());
            }
        } else {
            for line in changes(last, tree, &filter) {
                println!("{} {line}", crate::logging::timestamp());
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })
}

/// One answer of [`follow_prefix`].
pub(crate) struct Followed<'a> {
    /// What Consul answered, and at which index.
    pub entries: &'a [crate::consul::KvEntry],
    pub index: u64,
    pub tree: &'a Tree,
    /// The tree of the answer before (none at first).
    pub before: Option<&'a Tree>,
    /// The tree differs from the one before.
    pub changed: bool,
}

/// Follows the whole prefix with blocking `?stale` reads, paced like the
/// commands' follow loop (transient failures are a notice and a retry),
/// giving `each` every answer, until a failure that is not transient.
pub(crate) fn follow_prefix(
    ctx: &mut Ctx,
    mut each: impl FnMut(&mut Ctx, Followed<'_>),
) -> Result<()> {
    let prefix = ctx.prefix.as_dir().to_string();
    let pacing = crate::cursor::Pacing {
        burst: 4,
        refill: std::time::Duration::from_millis(100),
    };
    let mut cursor = crate::cursor::Cursor::new(crate::cursor::WAIT, true, pacing);
    let mut last: Option<Tree> = None;
    loop {
        let pause = cursor.pause(std::time::Instant::now());
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        let answer = match ctx.consul.list(&prefix, cursor.read()) {
            Ok(answer) => answer,
            Err(e) if e.is_transient() => {
                // A notice like every command's, not an error line.
                ctx.out.retrying(&e.summary());
                std::thread::sleep(cursor.failed());
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let tree = Tree::parse(&ctx.prefix, &answer.value);
        let changed = last.as_ref() != Some(&tree);
        cursor.answered(answer.index, changed);
        let seen = Followed {
            entries: &answer.value,
            index: answer.index,
            tree: &tree,
            before: last.as_ref(),
            changed,
        };
        each(ctx, seen);
        last = Some(tree);
    }
}

/// Draws `text` over what the terminal shows (`drawn`, as drawn before):
/// only the lines that changed are written again, so a redraw neither
/// flickers nor moves what the eye follows. Returns what to print.
fn redraw(drawn: &mut Vec<String>, text: &str) -> String {
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let mut out = String::new();
    if drawn.is_empty() {
        out.push_str("\x1b[H\x1b[2J");
    }
    for (row, line) in lines.iter().enumerate() {
        if drawn.get(row) != Some(line) {
            out.push_str(&format!("\x1b[{};1H{line}\x1b[K", row + 1));
        }
    }
    if lines.len() < drawn.len() {
        out.push_str(&format!("\x1b[{};1H\x1b[J", lines.len() + 1));
    }
    out.push_str(&format!("\x1b[{};1H", lines.len() + 1));
    *drawn = lines;
    out
}

/// The tree as a state, one line per fact: `current v2`, `v1 node1: active`.
fn state_lines(
    tree: &Tree,
    filter: &dyn Fn(&crate::version_name::VersionName) -> bool,
) -> Vec<String> {
    let mut lines = vec![format!(
        "current {}",
        tree.current
            .as_ref()
            .map_or("unset".to_string(), |c| shown(&c.value))
    )];
    for (version, info) in tree.versions.iter().filter(|(v, _)| filter(v)) {
        if info.nodes.is_empty() {
            lines.push(format!("{version}: no node has reported"));
        }
        for (node, entry) in &info.nodes {
            lines.push(format!("{version} {node}: {}", entry.state));
        }
    }
    lines
}

/// What changed between two reads of the tree, one line each.
fn changes(
    before: Option<&Tree>,
    after: &Tree,
    filter: &dyn Fn(&crate::version_name::VersionName) -> bool,
) -> Vec<String> {
    let empty = Tree::default();
    let before = before.unwrap_or(&empty);
    let mut lines = Vec::new();
    let name = |t: &Tree| {
        t.current
            .as_ref()
            .map_or("unset".to_string(), |c| shown(&c.value))
    };
    if before.current.as_ref().map(|c| &c.value) != after.current.as_ref().map(|c| &c.value) {
        lines.push(format!("current: {} -> {}", name(before), name(after)));
    }
    let versions: BTreeSet<&crate::version_name::VersionName> = before
        .versions
        .keys()
        .chain(after.versions.keys())
        .filter(|v| filter(v))
        .collect();
    let none = crate::tree::VersionInfo::default();
    for version in versions {
        let (old, new) = (
            before.versions.get(version).unwrap_or(&none),
            after.versions.get(version).unwrap_or(&none),
        );
        if old.exists != new.exists {
            lines.push(format!(
                "{version}: {}",
                if new.exists { "created" } else { "removed" }
            ));
        }
        let nodes: BTreeSet<&String> = old.nodes.keys().chain(new.nodes.keys()).collect();
        for node in nodes {
            let state = |i: &crate::tree::VersionInfo| i.nodes.get(node).map(|e| e.state);
            match (state(old), state(new)) {
                (a, b) if a == b => {}
                (None, Some(b)) => lines.push(format!("{version} {node}: {b}")),
                (Some(a), None) => lines.push(format!("{version} {node}: {a} -> gone")),
                (Some(a), Some(b)) => lines.push(format!("{version} {node}: {a} -> {b}")),
                (None, None) => {}
            }
        }
    }
    lines
}

/// The version of the `-json` document: fields are only ever added within
/// a schema; a change of meaning or a removal makes a new one.
pub(crate) const SCHEMA: u32 = 1;

/// Above this many nodes, the node × version table is only printed for one version.
const MATRIX_NODES: usize = 20;

const STATES: [NodeState; 4] = [
    NodeState::Active,
    NodeState::Ready,
    NodeState::Busy,
    NodeState::Failed,
];

/// The hooks nodes noted as running long (`<version>/.hook/<node>`), for
/// the nodes still busy with the version or switching to it: a note that
/// outlived its hook (its delete failed) says nothing of an active node.
pub(crate) fn running_hooks(info: &VersionInfo) -> impl Iterator<Item = (&String, &str, u64)> {
    info.hooks.iter().filter_map(|(node, (hook, since))| {
        let entry = info.nodes.get(node)?;
        let busy = matches!(entry.state, NodeState::Busy | NodeState::Ready);
        // A hook starts after its node's state was written; a note older
        // than the state outlived its hook (its delete failed).
        let stale = *since > 0 && entry.since_ms > *since;
        (busy && !stale).then_some((node, hook.as_str(), *since))
    })
}

/// What a noted hook is doing, in words: `deploy hook`, `fetching its
/// artifact`.
pub(crate) fn doing(hook: &str) -> String {
    match hook {
        "fetch" => "fetching its artifact".into(),
        hook => format!("{hook} hook"),
    }
}

/// How `node`'s fetch of the version's artifact goes, as it noted it:
/// ` (3.1/20.0 MB, 2.4 MB/s, from the peer 10.0.0.5:8571)`, or nothing.
pub(crate) fn fetch_detail(info: &VersionInfo, node: &str) -> String {
    info.fetches
        .get(node)
        .map_or(String::new(), |detail| format!(" ({detail})"))
}

pub(crate) fn json(
    prefix: &Prefix,
    tree: &Tree,
    filter: &dyn Fn(&crate::version_name::VersionName) -> bool,
) -> serde_json::Value {
    let current = tree.current_version();
    let versions: Vec<serde_json::Value> = tree
        .in_creation_order()
        .into_iter()
        .filter(|(v, _)| filter(v))
        .map(|(name, info)| {
            let count = |s: NodeState| info.nodes.values().filter(|e| e.state == s).count();
            let nodes: serde_json::Map<String, serde_json::Value> = info
                .nodes
                .iter()
                .map(|(n, e)| (n.clone(), e.state.as_str().into()))
                .collect();
            // When each node's agent wrote its state (null where it did
            // not say: an older depro, or another tool).
            let since: serde_json::Map<String, serde_json::Value> = info
                .nodes
                .iter()
                .map(|(n, e)| {
                    let at = (e.since_ms > 0).then(|| crate::logging::timestamp_of(e.since_ms));
                    (n.clone(), at.into())
                })
                .collect();
            let reasons: serde_json::Map<String, serde_json::Value> = info
                .reasons
                .iter()
                .filter(|(n, _)| {
                    info.nodes
                        .get(*n)
                        .is_some_and(|e| e.state == NodeState::Failed)
                })
                .map(|(n, r)| (n.clone(), serde_json::to_value(r).unwrap_or_default()))
                .collect();
            serde_json::json!({
                "name": name.as_str(),
                "current": Some(name) == current,
                "removing": !info.exists,
                "create_index": info.create_index,
                "created_at": info.meta.created_at,
                "created_by": info.meta.created_by,
                // Only on the version that is current: for the others these
                // are stale (the last time each was current).
                "current_since": info.meta.current_since.as_ref().filter(|_| Some(name) == current),
                "current_by": info.meta.current_by.as_ref().filter(|_| Some(name) == current),
                "current_message": info
                    .meta
                    .current_message
                    .as_ref()
                    .filter(|_| Some(name) == current),
                "counts": {
                    "busy": count(NodeState::Busy), "ready": count(NodeState::Ready),
                    "active": count(NodeState::Active), "failed": count(NodeState::Failed),
                },
                "nodes": nodes,
                "nodes_since": since,
                "reasons": reasons,
                "hooks": running_hooks(info)
                    .map(|(n, hook, since)| {
                        let since = (since > 0).then(|| crate::logging::timestamp_of(since));
                        let mut noted = serde_json::json!({ "hook": hook, "since": since });
                        if let Some(detail) = info.fetches.get(n) {
                            noted["progress"] = detail.as_str().into();
                        }
                        (n.clone(), noted)
                    })
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
            })
        })
        .collect();
    let policy = tree.policy.as_ref().map(|(p, _)| p);
    let rollout = tree.rollout.as_ref().map(|(plan, _)| {
        serde_json::json!({
            "version": plan.version,
            "base": plan.base,
            "waves": plan.waves,
            "started_waves": plan.started_waves,
            "switched": plan.switched,
            "by": plan.by,
            "since": plan.since,
            "flags": plan.flags,
            "paused": plan.paused,
            "restart": plan.restart.is_some(),
            "message": plan.message,
            "driver": tree.driver,
            "in_effect": tree.rollout_in_effect().is_some(),
        })
    });
    serde_json::json!({
        "schema": SCHEMA,
        "prefix": prefix.to_string(),
        "current": current.map(|c| c.as_str()),
        "previous": tree.previous().map(|v| v.as_str()),
        "versions": versions,
        "agents": tree.agents,
        "absent": tree
            .known
            .iter()
            .filter(|(node, _)| !tree.agents.contains_key(*node))
            .collect::<std::collections::BTreeMap<_, _>>(),
        "rollout": rollout,
        "policy": policy,
        "ignored": tree.ignored.iter().collect::<Vec<_>>(),
    })
}

/// The progressive rollout under way, in words, with the commands that
/// finish or undo it.
pub(crate) fn describe_rollout(prefix: &Prefix, tree: &Tree) -> Option<String> {
    let (plan, _) = tree.rollout.as_ref()?;
    let version = shown(&plan.version);
    if !tree.plan_version_exists(plan) {
        return Some(format!(
            "a progressive rollout of {version} was left behind, but {version} was removed since: \
             no agent follows it (the next rollout replaces it; `depro rollback -prefix={prefix}` \
             clears it)\n"
        ));
    }
    if tree.rollout_in_effect().is_none() {
        return Some(format!(
            "a progressive rollout of {version} was left behind, but current changed since it started: \
             no agent follows it (the next rollout replaces it)\n"
        ));
    }
    let switched: Vec<String> = plan.switched.iter().map(|n| shown(n)).collect();
    let base = if plan.base.is_empty() {
        "nothing".to_string()
    } else {
        shown(&plan.base)
    };
    // Driven by a command (alive), or abandoned; paused or not.
    let state = match (&tree.driver, &plan.paused) {
        (Some(driver), None) => {
            format!("  driven by a command of {driver}\n  pause:  depro pause -prefix={prefix}\n")
        }
        (Some(driver), Some(by)) => format!(
            "  paused by {}; its command ({driver}) waits\n  resume: depro resume -prefix={prefix}\n",
            shown(by)
        ),
        (None, Some(by)) => format!(
            "  paused by {}, and no command drives it\n  resume: depro resume -prefix={prefix}\n",
            shown(by)
        ),
        (None, None) => format!(
            "  no command drives it (interrupted or gone)\n  resume: depro {} -prefix={prefix}\n",
            match plan.restart {
                Some(_) => "restart".to_string(),
                None => format!("rollout {version}"),
            }
        ),
    };
    let (what, told, others) = match plan.restart {
        Some(_) => (
            "restart",
            "told to restart".to_string(),
            "not yet (they run it as before)".to_string(),
        ),
        None => (
            "progressive rollout",
            format!("switched to {version}"),
            format!("every other node runs current ({base})"),
        ),
    };
    Some(format!(
        "{what} of {version} under way: wave {} of {}{}{}\n  \
         {told}: {}\n  {others}\n{}{state}  \
         {}   depro rollback -prefix={prefix}\n",
        plan.started_waves,
        plan.waves.len(),
        plan.by_whom(),
        plan.since
            .as_deref()
            .map(|t| format!(" since {}", shown(t)))
            .unwrap_or_default(),
        super::names(&switched),
        plan.flags
            .as_deref()
            .map(|f| format!("  its flags (a resume takes them): {}\n", shown(f)))
            .unwrap_or_default(),
        match plan.restart {
            Some(_) => "stop:",
            None => "undo:",
        },
    ))
}

/// How many nodes not where they should be a summary names.
const ASTRAY_SHOWN: usize = 10;

/// For a big fleet: the nodes that do not run `current` (a failed or busy
/// key for it, or none), the first few by name.
fn astray(prefix: &Prefix, tree: &Tree, nodes: &BTreeSet<&String>) -> String {
    let Some(current) = tree.current_version() else {
        return String::new();
    };
    let on_current = tree.versions.get(current).map(|i| &i.nodes);
    // Nodes a progressive rollout switched, running its version.
    let switched = |node: &str| {
        tree.rollout_in_effect().is_some_and(|(plan, _)| {
            plan.switched.contains(node)
                && crate::version_name::VersionName::parse(&plan.version)
                    .ok()
                    .and_then(|v| tree.versions.get(&v))
                    .and_then(|i| i.nodes.get(node))
                    .is_some_and(|e| e.state == NodeState::Active)
        })
    };
    let mut astray: Vec<String> = Vec::new();
    for node in nodes {
        if switched(node) {
            continue;
        }
        let entry = on_current.and_then(|n| n.get(*node));
        let why = match entry.map(|e| e.state) {
            Some(NodeState::Active) => continue,
            Some(NodeState::Failed) => {
                let reason = tree
                    .versions
                    .get(current)
                    .and_then(|i| i.reasons.get(*node))
                    .map(|r| format!(" ({})", shown(&r.error)))
                    .unwrap_or_default();
                format!("{current} failed{reason}")
            }
            Some(state) => format!("{current} {state}"),
            None => format!("no key for {current}"),
        };
        astray.push(format!("  {}: {why}\n", shown(node)));
    }
    if astray.is_empty() {
        return format!("every node runs {current}\n");
    }
    let total = astray.len();
    let mut text = format!(
        "{total} {} not active on {current}:\n",
        if total == 1 { "node is" } else { "nodes are" }
    );
    for line in astray.iter().take(ASTRAY_SHOWN) {
        text.push_str(line);
    }
    if total > ASTRAY_SHOWN {
        text.push_str(&format!(
            "  … and {} more: `depro status -prefix={prefix} {current}`\n",
            total - ASTRAY_SHOWN
        ));
    }
    text
}

/// Two aligned tables: versions with their counts, then nodes × versions.
pub(crate) fn table(
    prefix: &Prefix,
    tree: &Tree,
    filter: &dyn Fn(&crate::version_name::VersionName) -> bool,
) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    table_at(prefix, tree, filter, now_ms)
}

/// How long ago, shortly: `12s`, `3m`, `2h`, `4d`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// [`table`] as of `now_ms` (milliseconds since the epoch): a busy node
/// shows for how long it has been busy, when its agent said since when.
pub(crate) fn table_at(
    prefix: &Prefix,
    tree: &Tree,
    filter: &dyn Fn(&crate::version_name::VersionName) -> bool,
    now_ms: u64,
) -> String {
    let current = tree.current_version();
    let versions: Vec<_> = tree
        .in_creation_order()
        .into_iter()
        .filter(|(v, _)| filter(v))
        .collect();
    let policy = match &tree.policy {
        Some((p, _)) => format!(
            "rollout policy: {} (by {})\n",
            shown(&p.flags),
            shown(&p.by)
        ),
        None => String::new(),
    };
    let mut out = format!(
        "{prefix}: current {}\n{policy}\n",
        match (&tree.current, current) {
            (_, Some(c)) => match tree
                .versions
                .get(c)
                .and_then(|i| i.meta.current_message.as_deref())
            {
                Some(message) => format!("{c}: {}", crate::tree::shown_line(message)),
                None => c.to_string(),
            },
            (Some(raw), None) => format!("\"{}\" (not a valid version)", shown(&raw.value)),
            (None, None) if tree.versions.is_empty() => format!(
                "unset: no version yet; {} {} the prefix (deploy a first one with \
                 `depro deploy VERSION -prefix={prefix}`)",
                tree.agents.len(),
                if tree.agents.len() == 1 {
                    "agent follows"
                } else {
                    "agents follow"
                }
            ),
            (None, None) => "unset".to_string(),
        }
    );
    let mut rows = vec![vec![
        "VERSION".to_string(),
        "".into(),
        "ACTIVE".into(),
        "READY".into(),
        "BUSY".into(),
        "FAILED".into(),
        "CREATED".into(),
    ]];
    for (name, info) in &versions {
        let mark = if Some(*name) == current {
            "current"
        } else if !info.exists {
            "removing"
        } else {
            ""
        };
        let mut row = vec![name.to_string(), mark.to_string()];
        for state in STATES {
            row.push(
                info.nodes
                    .values()
                    .filter(|e| e.state == state)
                    .count()
                    .to_string(),
            );
        }
        row.push(
            info.meta
                .created_at
                .as_deref()
                .map_or_else(|| "-".into(), shown),
        );
        rows.push(row);
    }
    out.push_str(&align(&rows));
    if let Some(rollout) = describe_rollout(prefix, tree) {
        out.push('\n');
        out.push_str(&rollout);
    }
    let nodes: BTreeSet<&String> = versions
        .iter()
        .flat_map(|(_, i)| i.nodes.keys())
        .chain(tree.agents.keys())
        .chain(tree.known.keys())
        .collect();
    let one_version = versions.len() == 1;
    if nodes.len() > MATRIX_NODES && !one_version {
        out.push_str(&format!(
            "\n{} nodes ({} live agents follow the prefix): `depro status -prefix={prefix} VERSION` \
             lists them for one version, -json for all\n",
            nodes.len(),
            tree.agents.len()
        ));
        out.push_str(&astray(prefix, tree, &nodes));
    } else if !nodes.is_empty() {
        out.push('\n');
        let mut rows = vec![
            ["NODE", "AGENT"]
                .into_iter()
                .map(String::from)
                .chain(versions.iter().map(|(v, _)| v.to_string()))
                .collect(),
        ];
        for node in nodes {
            let agent = match (tree.agents.get(node), tree.known.contains_key(node)) {
                (Some(a), _) => shown(&a.depro),
                (None, true) => "absent".to_string(),
                (None, false) => "-".to_string(),
            };
            let mut row = vec![node.clone(), agent];
            for (_, info) in &versions {
                let hook = running_hooks(info)
                    .find(|(n, _, _)| *n == node)
                        .map(|(_, hook, since)| match since > 0 && now_ms >= since {
                        true => format!(", {} {}", doing(hook), age(now_ms - since)),
                        false => format!(", {}", doing(hook)),
                    } + &fetch_detail(info, node))
                    .unwrap_or_default();
                row.push(
                    info.nodes
                        .get(node)
                        .map_or("-".to_string(), |e| match e.state {
                            NodeState::Busy if e.since_ms > 0 && now_ms >= e.since_ms => {
                                format!("busy {}{hook}", age(now_ms - e.since_ms))
                            }
                            state => format!("{state}{hook}"),
                        }),
                );
            }
            rows.push(row);
        }
        out.push_str(&align(&rows));
        out.push_str(
            "(AGENT: the depro version of the live agent that follows the prefix, absent if it \
             stopped, - if none is known; -: no report on that version)\n",
        );
    }
    let absent: Vec<String> = tree
        .known
        .iter()
        .filter(|(node, _)| !tree.agents.contains_key(*node))
        .map(|(node, record)| format!("{node} (started {})", shown(&record.since)))
        .collect();
    if !absent.is_empty() {
        let more = match absent.len() > 10 {
            true => format!(" and {} more (-json lists them)", absent.len() - 10),
            false => String::new(),
        };
        out.push_str(&format!(
            "absent: {}{more}; a retired host is forgotten with `depro forget NODE \
             -prefix={prefix}`\n",
            absent[..absent.len().min(10)].join(", ")
        ));
    }
    // One line per version and reason, naming every node that gave it
    // (20 nodes failing alike are one line, not 20).
    // The failures of versions older than current (superseded: created
    // before it), but for the one rollback would go back to, age out of the
    // list: counted, not listed, unless asked for one version.
    let mut failures: Vec<String> = Vec::new();
    let current_at = versions.iter().position(|(v, _)| Some(*v) == current);
    let previous = tree.previous();
    let mut aged = (0, 0);
    for (at, (version, info)) in versions.iter().enumerate() {
        let failed = info
            .nodes
            .values()
            .filter(|e| e.state == NodeState::Failed)
            .count();
        let superseded = current_at.is_some_and(|c| at < c) && Some(*version) != previous;
        if versions.len() > 1 && superseded && failed > 0 {
            aged = (aged.0 + 1, aged.1 + failed);
            continue;
        }
        let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
        for (node, _) in info
            .nodes
            .iter()
            .filter(|(_, e)| e.state == NodeState::Failed)
        {
            let text = match info.reasons.get(node) {
                Some(reason) => reason.shown("    "),
                None => "(no reason reported)".to_string(),
            };
            match groups.iter_mut().find(|(t, _)| *t == text) {
                Some((_, nodes)) => nodes.push(node),
                None => groups.push((text, vec![node])),
            }
        }
        for (text, nodes) in groups {
            failures.push(format!("  {version} on {}: {text}", compact_names(&nodes)));
        }
    }
    if aged.0 > 0 {
        failures.push(format!(
            "  (and {} failed node report(s) of {} version(s) older than current: `depro status \
             -prefix={prefix} VERSION` shows them, `depro prune -failed` removes the versions \
             that failed everywhere)",
            aged.1, aged.0
        ));
    }
    if !failures.is_empty() {
        out.push_str(&format!("\nfailures:\n{}\n", failures.join("\n")));
    }
    if !tree.ignored.is_empty() {
        let list: Vec<String> = tree.ignored.iter().take(20).map(|n| shown(n)).collect();
        out.push_str(&format!(
            "\nignored (not valid names): {}\n",
            list.join(", ")
        ));
    }
    out
}

/// Node names as a short list: runs of three or more numbered alike
/// (`node13`, `node14`, `node15`) as one range (`node13-15`).
pub(crate) fn compact_names(names: &[&str]) -> String {
    // (stem, number, its digits) for names ending in digits.
    let split = |name: &str| {
        let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
        let digits = &name[stem.len()..];
        let number = digits.parse::<u64>().ok().filter(|_| digits.len() <= 18);
        (stem.to_string(), number, digits.len())
    };
    let mut parsed: Vec<(String, Option<u64>, usize, &str)> = names
        .iter()
        .map(|n| {
            let (stem, number, width) = split(n);
            (stem, number, width, *n)
        })
        .collect();
    parsed.sort();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < parsed.len() {
        let mut j = i;
        while j + 1 < parsed.len() {
            let (a, b) = (&parsed[j], &parsed[j + 1]);
            let next = a.0 == b.0 && a.2 == b.2 && a.1.zip(b.1).is_some_and(|(x, y)| y == x + 1);
            if !next {
                break;
            }
            j += 1;
        }
        if j - i >= 2 {
            let last = parsed[j].3;
            out.push(format!("{}-{}", parsed[i].3, &last[parsed[j].0.len()..]));
        } else {
            out.extend(parsed[i..=j].iter().map(|p| p.3.to_string()));
        }
        i = j + 1;
    }
    out.join(", ")
}

pub(crate) fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::KvEntry;

    /// Node keys are held by a session; folder keys and `current` are not.
    fn entry(key: &str, value: &str, create: u64) -> KvEntry {
        let held = !key.ends_with('/') && !key.ends_with("/current");
        KvEntry::sample(key, value, held, create)
    }

    fn sample() -> (Prefix, Tree) {
        let prefix = Prefix::parse("api/version").unwrap();
        let tree = Tree::parse(
            &prefix,
            &[
                entry("api/version/current", "v2", 9),
                entry("api/version/v2/", "", 5),
                entry("api/version/v2/node1", "active", 6),
                entry("api/version/v2/node2", "busy", 7),
                entry("api/version/v1/", "", 1),
                entry("api/version/v1/node1", "ready", 2),
                entry("api/version/v1/node2", "failed", 3),
                entry(
                    "api/version/v1/.reason/node2",
                    r#"{"hook":"deploy","error":"the deploy hook exited with status 3","exit_code":3,"output":"curl: (22) 404\n\u001b[31mgone"}"#,
                    3,
                ),
                entry(
                    "api/version/.agents/node1",
                    r#"{"depro":"0.3.0","since":"t0"}"#,
                    1,
                ),
                entry(
                    "api/version/.agents/node3",
                    r#"{"depro":"0.3.0","since":"t0"}"#,
                    1,
                ),
            ],
        );
        (prefix, tree)
    }

    #[test]
    fn a_busy_node_shows_for_how_long() {
        let prefix = Prefix::parse("p").unwrap();
        let mut busy = entry("p/v1/node1", "busy", 2);
        busy.flags = 1_000_000;
        let mut old = entry("p/v1/node2", "busy", 2);
        old.flags = 0; // an older agent: no time
        let tree = Tree::parse(&prefix, &[entry("p/v1/", "", 1), busy, old]);
        let text = table_at(&prefix, &tree, &|_| true, 1_000_000 + 135_000);
        assert!(text.contains("node1  -      busy 2m"), "{text}");
        assert!(text.contains("node2  -      busy\n"), "{text}");
        assert_eq!(age(59_999), "59s");
        assert_eq!(age(7_200_000), "2h");
        assert_eq!(age(3 * 86_400_000), "3d");
    }

    #[test]
    fn node_lists_collapse_runs_of_three_or_more_into_ranges() {
        let names = [
            "node13", "node14", "node15", "node2", "web-1", "node9", "node10", "db",
        ];
        assert_eq!(
            compact_names(&names),
            "db, node2, node9, node10, node13-15, web-1"
        );
        assert_eq!(compact_names(&["a1", "a2"]), "a1, a2");
        assert_eq!(compact_names(&["n08", "n09", "n10"]), "n08-10");
        assert_eq!(compact_names(&["n8", "n9", "n10"]), "n8, n9, n10");
        assert_eq!(compact_names(&[]), "");
    }

    #[test]
    fn identical_failure_reasons_are_one_line_naming_their_nodes() {
        let prefix = Prefix::parse("p").unwrap();
        let reason =
            r#"{"hook":"deploy","error":"the deploy hook exited with status 3","exit_code":3}"#;
        let mut entries = vec![entry("p/current", "v1", 1), entry("p/v1/", "", 1)];
        for n in 1..=5 {
            entries.push(entry(&format!("p/v1/node{n}"), "failed", 2));
            if n != 4 {
                entries.push(entry(&format!("p/v1/.reason/node{n}"), reason, 2));
            }
        }
        let text = table(&prefix, &Tree::parse(&prefix, &entries), &|_| true);
        let failures = &text[text.find("failures:").unwrap()..];
        assert_eq!(
            failures,
            "failures:\n  v1 on node1-3, node5: the deploy hook exited with status 3\n  \
             v1 on node4: (no reason reported)\n"
        );
    }

    #[test]
    fn the_table_lists_versions_in_creation_order_and_nodes_by_version() {
        let (prefix, tree) = sample();
        let text = table(&prefix, &tree, &|_| true);
        let expected = "\
api/version: current v2

VERSION           ACTIVE  READY  BUSY  FAILED  CREATED
v1                0       1      0     1       -
v2       current  1       0      1     0       -

NODE   AGENT  v1      v2
node1  0.3.0  ready   active
node2  -      failed  busy
node3  0.3.0  -       -
(AGENT: the depro version of the live agent that follows the prefix, absent if it stopped, - if none is known; -: no report on that version)

failures:
  v1 on node2: the deploy hook exited with status 3
    | curl: (22) 404
    | \\u{1b}[31mgone
";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_redraw_writes_only_the_lines_that_changed() {
        let mut drawn = Vec::new();
        let first = redraw(&mut drawn, "a\nb\nc\n");
        assert!(first.starts_with("\x1b[H\x1b[2J"), "{first:?}");
        assert!(first.contains("\x1b[2;1Hb\x1b[K"), "{first:?}");
        // One line changed: only it is written.
        let second = redraw(&mut drawn, "a\nB\nc\n");
        assert_eq!(second, "\x1b[2;1HB\x1b[K\x1b[4;1H");
        // Shorter: what is below is cleared.
        let third = redraw(&mut drawn, "a\n");
        assert_eq!(third, "\x1b[2;1H\x1b[J\x1b[2;1H");
    }

    #[test]
    fn failures_of_versions_older_than_current_and_the_rollback_target_age_out() {
        let prefix = Prefix::parse("api/version").unwrap();
        let order = |n: u64| format!(r#"{{"current_order": {n}}}"#);
        let entries = vec![
            entry("api/version/current", "v3", 20),
            entry("api/version/v1/", &order(2), 1),
            entry("api/version/v1/node1", "failed", 3),
            entry("api/version/v2/", &order(8), 5),
            entry("api/version/v2/node1", "ready", 6),
            entry("api/version/v2/node2", "failed", 7),
            entry("api/version/v3/", &order(19), 10),
            entry("api/version/v3/node1", "active", 11),
        ];
        let tree = Tree::parse(&prefix, &entries);
        let text = table(&prefix, &tree, &|_| true);
        // v2 is the rollback target: its failure stays; v1's ages out.
        assert!(text.contains("  v2 on node2: "), "{text}");
        assert!(!text.contains("  v1 on node1"), "{text}");
        assert!(
            text.contains("(and 1 failed node report(s) of 1 version(s) older than current"),
            "{text}"
        );
        // Asked for v1 alone, its failure is listed.
        let one = table(&prefix, &tree, &|v| v.as_str() == "v1");
        assert!(one.contains("  v1 on node1: "), "{one}");
    }

    #[test]
    fn json_has_a_schema_the_rollback_target_and_current_since_only_on_current() {
        let prefix = Prefix::parse("api/version").unwrap();
        let meta = |since: &str| format!(r#"{{"current_since": "{since}", "current_by": "ops"}}"#);
        let mut entries = vec![
            entry("api/version/current", "v2", 9),
            entry("api/version/v1/", &meta("t1"), 1),
            entry("api/version/v2/", &meta("t2"), 5),
        ];
        for e in &mut entries {
            e.session = None;
        }
        let doc = json(&prefix, &Tree::parse(&prefix, &entries), &|_| true);
        assert_eq!(doc["schema"], SCHEMA);
        assert_eq!(doc["previous"], "v1");
        assert!(doc["versions"][0]["current_since"].is_null(), "{doc}");
        assert_eq!(doc["versions"][1]["current_since"], "t2");
        assert_eq!(doc["versions"][1]["current_by"], "ops");
        let empty = json(&prefix, &Tree::default(), &|_| true);
        assert_eq!(empty["versions"], serde_json::json!([]));
        assert!(empty["current"].is_null() && empty["previous"].is_null());
    }

    #[test]
    fn json_carries_agents_failure_reasons_and_the_rollout_under_way() {
        let (prefix, tree) = sample();
        let doc = json(&prefix, &tree, &|_| true);
        assert_eq!(doc["agents"]["node3"]["depro"], "0.3.0");
        let v1 = &doc["versions"][0];
        assert_eq!(v1["reasons"]["node2"]["exit_code"], 3);
        assert_eq!(v1["reasons"]["node2"]["hook"], "deploy");
        assert!(doc["rollout"].is_null());
        let mut entries_v3 = tree.clone();
        entries_v3.versions.insert(
            crate::version_name::VersionName::parse("v3").unwrap(),
            crate::tree::VersionInfo {
                exists: true,
                ..Default::default()
            },
        );
        let mut tree = entries_v3;
        tree.rollout = Some((
            crate::tree::RolloutPlan {
                version: "v3".into(),
                base: "v2".into(),
                base_index: 9,
                waves: vec![vec!["node1".into()], vec!["node2".into()]],
                started_waves: 1,
                switched: ["node1".to_string()].into(),
                ..Default::default()
            },
            20,
        ));
        let doc = json(&prefix, &tree, &|_| true);
        assert_eq!(doc["rollout"]["in_effect"], true);
        assert_eq!(doc["rollout"]["switched"][0], "node1");
        let text = table(&prefix, &tree, &|_| true);
        assert!(
            text.contains("rollout of v3 under way: wave 1 of 2"),
            "{text}"
        );
        assert!(
            text.contains("depro rollback -prefix=api/version"),
            "{text}"
        );
        let plan = tree.rollout.clone();
        tree.current.as_mut().unwrap().modify_index = 30;
        let text = table(&prefix, &tree, &|_| true);
        assert!(text.contains("current changed since it started"), "{text}");
        // A plan for a version removed since: no agent follows it either.
        tree.current.as_mut().unwrap().modify_index = 9;
        tree.rollout = plan;
        tree.versions
            .remove(&crate::version_name::VersionName::parse("v3").unwrap());
        let text = table(&prefix, &tree, &|_| true);
        assert!(text.contains("but v3 was removed since"), "{text}");
        assert!(!text.contains("resume:"), "{text}");
    }

    #[test]
    fn large_fleets_get_the_node_table_only_for_one_version() {
        let prefix = Prefix::parse("api/version").unwrap();
        let mut entries = vec![
            entry("api/version/v1/", "", 1),
            entry("api/version/v2/", "", 2),
        ];
        for n in 0..25 {
            entries.push(entry(
                &format!("api/version/v1/node{n:02}"),
                "ready",
                10 + n,
            ));
            entries.push(entry(
                &format!("api/version/v2/node{n:02}"),
                "active",
                100 + n,
            ));
        }
        let tree = Tree::parse(&prefix, &entries);
        let all = table(&prefix, &tree, &|_| true);
        assert!(
            all.contains("25 nodes (0 live agents follow the prefix): `depro status -prefix=api/version VERSION`"),
            "{all}"
        );
        assert!(!all.contains("node07"), "{all}");
        let one = table(&prefix, &tree, &|v| v.as_str() == "v2");
        assert!(one.contains("node07  -      active"), "{one}");
    }

    #[test]
    fn hostile_names_and_metadata_reach_the_terminal_escaped() {
        let prefix = Prefix::parse("api/version").unwrap();
        let mut hostile = entry("api/version/v1/", r#"{"created_at": "\u001b[2J"}"#, 1);
        hostile.session = None;
        let tree = Tree::parse(
            &prefix,
            &[hostile, entry("api/version/\x1b]0;owned\x07/", "", 2)],
        );
        let text = table(&prefix, &tree, &|_| true);
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
        assert!(text.contains("\\u{1b}"), "{text}");
    }

    #[test]
    fn the_json_document_has_its_documented_shape() {
        let (prefix, tree) = sample();
        let doc = json(&prefix, &tree, &|_| true);
        assert_eq!(doc["prefix"], "api/version");
        assert_eq!(doc["current"], "v2");
        assert_eq!(doc["versions"][0]["name"], "v1");
        assert_eq!(doc["versions"][1]["current"], true);
        assert_eq!(doc["versions"][1]["counts"]["busy"], 1);
        assert_eq!(doc["versions"][0]["nodes"]["node2"], "failed");
        assert_eq!(doc["versions"][0]["removing"], false);
        assert!(doc["ignored"].as_array().unwrap().is_empty());
    }
}
