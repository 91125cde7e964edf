//! `-json` on the commands that change the tree or wait on it (`deploy`,
//! `rollout`, `rollback`, `wait`, `remove`, `prune`; issue 22): one result
//! document on stdout, whatever the outcome, with `"schema": 1` — what
//! switched and from what, the nodes by state, the failure reasons, how
//! long it took, the exit code and its meaning. The command runs as it
//! does without `-json`; its result lines go to stderr instead, and the
//! document is made from the tree as read before and after it.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::Ctx;
use crate::cli::TreeArgs;
use crate::config::Env;
use crate::error::{Error, Result};
use crate::tree::{NodeState, Tree};

/// Set while a command's result goes out as a JSON document.
static JSON: AtomicBool = AtomicBool::new(false);

/// The document's first fields (command, prefix, versions) and when the
/// command started, for an interruption's document.
static STARTED: Mutex<Option<(serde_json::Value, Instant)>> = Mutex::new(None);

/// Under `-json`, the document of an interrupted command (exit 130), with
/// what it leaves behind.
pub(crate) fn interrupted(leaves: &str) {
    if !JSON.load(Ordering::Relaxed) {
        return;
    }
    let started = STARTED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some((mut doc, start)) = started else {
        return;
    };
    doc["ok"] = false.into();
    doc["exit_code"] = super::interrupt::EXIT_CODE.into();
    doc["meaning"] = "interrupted".into();
    doc["error"] = format!("interrupted; {leaves}").into();
    doc["duration_seconds"] = ((start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0).into();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    );
    let _ = out.flush();
}

/// A command's result line: on stdout, or on stderr under `-json`.
pub(crate) fn say(line: &str) {
    match JSON.load(Ordering::Relaxed) {
        true => eprintln!("{line}"),
        false => println!("{line}"),
    }
}

/// What an exit code means, in the document.
fn meaning(code: i32) -> &'static str {
    match code {
        0 => "done",
        1 => "bad usage or configuration",
        2 => "a node failed, or the operation was refused",
        3 => "timed out",
        4 => "Consul unreachable, or it denied the request",
        5 => "another operator changed current first",
        _ => "failed",
    }
}

/// Runs `command` (about `versions`), and under `-json` prints its result
/// document on stdout.
pub(crate) fn reported(
    command: &str,
    tree: &TreeArgs,
    versions: &[String],
    env: Env<'_>,
    run: Box<dyn FnOnce() -> Result<()> + '_>,
) -> Result<()> {
    if !tree.json {
        return run();
    }
    JSON.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let ctx = Ctx::resolve(tree, env);
    let read = |ctx: &Result<Ctx>| -> Option<Tree> {
        let ctx = ctx.as_ref().ok()?;
        let prefix = ctx.prefix.as_dir().to_string();
        let answer = ctx
            .consul
            .list(&prefix, crate::consul::Read::consistent())
            .ok()?;
        Some(Tree::parse(&ctx.prefix, &answer.value))
    };
    let before = read(&ctx);
    let prefix = ctx.as_ref().map(|c| c.prefix.to_string()).ok();
    let base = serde_json::json!({
        "schema": super::status::SCHEMA,
        "command": command,
        "prefix": prefix,
        "versions": versions,
    });
    *STARTED.lock().unwrap_or_else(|e| e.into_inner()) = Some((base, start));
    let outcome = run();
    let after = read(&ctx);
    let code = outcome.as_ref().err().map_or(0, |e| e.exit_code() as i32);
    let current = |t: &Option<Tree>| {
        t.as_ref()
            .and_then(|t| t.current.as_ref())
            .map(|c| c.value.clone())
    };
    let (from, to) = (current(&before), current(&after));
    let mut nodes = serde_json::Map::new();
    let mut reasons = serde_json::Map::new();
    let after_tree = after.clone().unwrap_or_default();
    let mut shown: Vec<String> = versions.to_vec();
    if let Some(to) = &to
        && !shown.contains(to)
    {
        shown.push(to.clone());
    }
    for version in &shown {
        let Some(info) = crate::version_name::VersionName::parse(version)
            .ok()
            .and_then(|v| after_tree.versions.get(&v))
        else {
            continue;
        };
        let by_state = |state: NodeState| -> Vec<&String> {
            info.nodes
                .iter()
                .filter(|(_, e)| e.state == state)
                .map(|(n, _)| n)
                .collect()
        };
        nodes.insert(
            version.clone(),
            serde_json::json!({
                "active": by_state(NodeState::Active),
                "ready": by_state(NodeState::Ready),
                "busy": by_state(NodeState::Busy),
                "failed": by_state(NodeState::Failed),
            }),
        );
        let why: serde_json::Map<String, serde_json::Value> = info
            .reasons
            .iter()
            .map(|(n, r)| (n.clone(), r.error.clone().into()))
            .collect();
        if !why.is_empty() {
            reasons.insert(version.clone(), why.into());
        }
    }
    let removed: Vec<String> = match (&before, &after) {
        (Some(b), Some(a)) => b
            .versions
            .iter()
            .filter(|(v, i)| i.exists && !a.versions.get(*v).is_some_and(|i| i.exists))
            .map(|(v, _)| v.to_string())
            .collect(),
        _ => Vec::new(),
    };
    let doc = serde_json::json!({
        "schema": super::status::SCHEMA,
        "command": command,
        "prefix": prefix,
        "versions": versions,
        "ok": code == 0,
        "exit_code": code,
        "meaning": meaning(code),
        "error": outcome.as_ref().err().map(Error::to_string),
        "current": { "before": from, "after": to },
        "switched": before.is_some() && after.is_some() && from != to,
        "nodes": nodes,
        "reasons": reasons,
        "removed": removed,
        "duration_seconds": (start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    });
    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    outcome
}
