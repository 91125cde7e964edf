//! `deploy`, `rollout` and `rollback`: the commands that move `current`, and
//! the guarantees they keep:
//! - `current` moves only when at least N nodes have the version ready and
//!   no node that reported has failed;
//! - it moves by check-and-set against the value read at the start, in one
//!   transaction with the version's history, so of two racing operators
//!   exactly one wins;
//! - success means every node that had the version ready reports it active.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::{Ctx, names, took, version_arg};
use crate::cli::{DeployArgs, RollbackArgs, RolloutArgs, SwitchFlags};
use crate::config::Env;
use crate::consul::{Read, TxnOp};
use crate::error::{Error, Result};
use crate::tree::{CurrentKey, NodeEntry, NodeState, Tree, VersionInfo, VersionMeta};
use crate::version_name::VersionName;

/// Where a version stands before the switch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    Waiting { ready: usize, reported: usize },
    Ready,
    Failed(Vec<String>),
}

/// Enough nodes reported, all of them have the version, and each node in
/// `awaiting` (nodes asked to retry) has reported again.
pub(crate) fn readiness(
    nodes: &BTreeMap<String, NodeEntry>,
    need: u32,
    awaiting: &BTreeSet<String>,
) -> Readiness {
    let failed: Vec<String> = nodes
        .iter()
        .filter(|(_, e)| e.state == NodeState::Failed)
        .map(|(n, _)| n.clone())
        .collect();
    if !failed.is_empty() {
        return Readiness::Failed(failed);
    }
    let ready = nodes.values().filter(|e| e.state.has_it()).count();
    let reported = nodes.len();
    let retried_back = awaiting.iter().all(|n| nodes.contains_key(n));
    if reported >= need as usize && ready == reported && retried_back {
        Readiness::Ready
    } else {
        Readiness::Waiting { ready, reported }
    }
}

/// Where a rollout stands after the switch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Confirmation {
    Waiting { active: usize },
    Confirmed,
    Failed(Vec<String>),
}

/// Every node in `expected` (those that had the version ready at the
/// switch) reports it active; a failed one ends the wait.
pub(crate) fn confirmation(
    nodes: &BTreeMap<String, NodeEntry>,
    expected: &BTreeSet<String>,
) -> Confirmation {
    let state = |n: &String| nodes.get(n).map(|e| e.state);
    let failed: Vec<String> = expected
        .iter()
        .filter(|n| state(n) == Some(NodeState::Failed))
        .cloned()
        .collect();
    if !failed.is_empty() {
        return Confirmation::Failed(failed);
    }
    let active = expected
        .iter()
        .filter(|n| state(n) == Some(NodeState::Active))
        .count();
    if active == expected.len() {
        Confirmation::Confirmed
    } else {
        Confirmation::Waiting { active }
    }
}

pub(crate) fn deploy(args: DeployArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let version = version_arg(&args.version)?;
    let start = Instant::now();
    let deadline = start + args.switch.timeout;
    let tree = ctx.read_tree()?;
    let base = tree.current.clone();

    // 1. The version's folder key, and a retry for nodes that failed it.
    let info = tree.versions.get(&version).cloned().unwrap_or_default();
    if !info.exists {
        let meta = VersionMeta {
            created_at: Some(crate::logging::timestamp()),
            created_by: Some(ctx.user.clone()),
            ..VersionMeta::default()
        };
        let key = ctx.prefix.folder_key(&version);
        ctx.consul.create(&key, &meta.to_json())?;
        ctx.out
            .line(&format!("created {version} under {}", ctx.prefix));
    }
    let mut retried = BTreeSet::new();
    for (node, entry) in info
        .nodes
        .iter()
        .filter(|(_, e)| e.state == NodeState::Failed)
    {
        let key = ctx.prefix.node_key(&version, node);
        if ctx.consul.delete(&key, Some(entry.modify_index))? {
            ctx.out
                .line(&format!("{node}: failed before; asked it to try again"));
            retried.insert(node.clone());
        }
    }

    // 2. Ready on enough nodes, failed on none.
    let ready_nodes = wait_ready(
        &mut ctx,
        &version,
        args.switch.nodes,
        deadline,
        &retried,
        base.as_ref(),
    )?;
    if args.no_rollout {
        println!(
            "{version} is ready on {} nodes under {} ({}); current unchanged ({}); switch with `depro rollout {version} -prefix={}`",
            ready_nodes.len(),
            ctx.prefix,
            took(start),
            describe_current(base.as_ref()),
            ctx.prefix
        );
        return Ok(());
    }

    // 3 and 4. Switch `current`, confirm the rollout.
    switch_and_confirm(
        &mut ctx,
        &version,
        base.as_ref(),
        ready_nodes,
        args.switch.rollback_on_failure,
        deadline,
        start,
    )?;

    // 5. Keep only the newest versions.
    if let Some(keep) = args.keep {
        prune_to(&mut ctx, keep)?;
    }
    Ok(())
}

pub(crate) fn rollout(args: RolloutArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let version = version_arg(&args.version)?;
    let start = Instant::now();
    let tree = ctx.read_existing_tree()?;
    roll_to(&mut ctx, &tree, &version, &args.switch, start)
}

pub(crate) fn rollback(args: RollbackArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let start = Instant::now();
    let tree = ctx.read_existing_tree()?;
    let from = tree.current_version().cloned().ok_or_else(|| {
        Error::Refused(format!(
            "{}/current is not set: there is nothing to roll back from",
            ctx.prefix
        ))
    })?;
    let to = match &args.to {
        Some(text) => version_arg(text)?,
        None => tree.previous().cloned().ok_or_else(|| {
            Error::Refused(format!(
                "no earlier version of {} is left to roll back to; `depro status -prefix={}` lists them",
                ctx.prefix, ctx.prefix
            ))
        })?,
    };
    ctx.out
        .line(&format!("rolling back {} from {from} to {to}", ctx.prefix));
    roll_to(&mut ctx, &tree, &to, &args.switch, start)
}

/// Steps 2 to 4 for a version that is already in the tree.
fn roll_to(
    ctx: &mut Ctx,
    tree: &Tree,
    version: &VersionName,
    switch: &SwitchFlags,
    start: Instant,
) -> Result<()> {
    if !tree.versions.get(version).is_some_and(|i| i.exists) {
        return Err(Error::Refused(format!(
            "{version} is not in the tree under {}; deploy it with `depro deploy {version} -prefix={}`",
            ctx.prefix, ctx.prefix
        )));
    }
    let deadline = start + switch.timeout;
    let base = tree.current.clone();
    let ready = wait_ready(
        ctx,
        version,
        switch.nodes,
        deadline,
        &BTreeSet::new(),
        base.as_ref(),
    )?;
    switch_and_confirm(
        ctx,
        version,
        base.as_ref(),
        ready,
        switch.rollback_on_failure,
        deadline,
        start,
    )
}

fn describe_current(current: Option<&CurrentKey>) -> String {
    match current {
        Some(c) => format!("still {}", c.value),
        None => "still unset".to_string(),
    }
}

/// Waits for step 2; returns the nodes that have the version.
fn wait_ready(
    ctx: &mut Ctx,
    version: &VersionName,
    need: u32,
    deadline: Instant,
    retried: &BTreeSet<String>,
    base: Option<&CurrentKey>,
) -> Result<BTreeSet<String>> {
    let mut last = Readiness::Waiting {
        ready: 0,
        reported: 0,
    };
    let outcome = ctx.follow(
        version,
        deadline,
        "gone (its agent stopped?)",
        |out, info: &VersionInfo| {
            last = readiness(&info.nodes, need, retried);
            match &last {
                Readiness::Waiting { ready, .. } => {
                    out.count(&format!("{ready}/{need} ready"));
                    None
                }
                Readiness::Ready => {
                    let ready = info.nodes.len();
                    out.count(&format!("{ready}/{} ready", need.max(ready as u32)));
                    Some(Ok(info.nodes.keys().cloned().collect()))
                }
                Readiness::Failed(nodes) => Some(Err(nodes.clone())),
            }
        },
    )?;
    match outcome {
        Some(Ok(nodes)) => Ok(nodes),
        Some(Err(failed)) => Err(Error::Refused(format!(
            "{version} failed on {}; current unchanged ({}); see the agent's log there \
             (journalctl -u depro), fix the hook, and run `depro deploy {version}` again to retry",
            names(&failed),
            describe_current(base)
        ))),
        None => {
            let (ready, reported) = match last {
                Readiness::Waiting { ready, reported } => (ready, reported),
                _ => (0, 0),
            };
            Err(Error::Timeout(format!(
                "timed out waiting for {version}: {ready} of the {need} nodes needed have it \
                 ({reported} reported); current unchanged ({}); check the agents (`depro status -prefix={}`) \
                 or use a longer -timeout",
                describe_current(base),
                ctx.prefix
            )))
        }
    }
}

/// Steps 3 and 4.
fn switch_and_confirm(
    ctx: &mut Ctx,
    version: &VersionName,
    base: Option<&CurrentKey>,
    expected: BTreeSet<String>,
    rollback_on_failure: bool,
    deadline: Instant,
    start: Instant,
) -> Result<()> {
    let was = base.map(|c| c.value.clone());
    let already = base.is_some_and(|c| c.version.as_ref() == Some(version));
    let switched_at = if already {
        None
    } else {
        Some(switch_current(ctx, version, base)?)
    };
    if switched_at.is_some() {
        ctx.out.line(&format!(
            "current: {} -> {version}",
            was.as_deref().unwrap_or("unset")
        ));
    }
    let mut last = Confirmation::Waiting { active: 0 };
    let total = expected.len();
    let outcome = ctx.follow(
        version,
        deadline,
        "gone (its agent stopped?)",
        |out, info| {
            last = confirmation(&info.nodes, &expected);
            match &last {
                Confirmation::Waiting { active } => {
                    out.count(&format!("{active}/{total} active"));
                    None
                }
                Confirmation::Confirmed => {
                    out.count(&format!("{total}/{total} active"));
                    Some(Ok(()))
                }
                Confirmation::Failed(nodes) => Some(Err(nodes.clone())),
            }
        },
    )?;
    match outcome {
        Some(Ok(())) if already => {
            println!(
                "{version} was already current under {} and is active on {total} nodes; nothing to do",
                ctx.prefix
            );
            Ok(())
        }
        Some(Ok(())) => {
            println!(
                "{version} is current under {} (was {}): active on {total}/{total} nodes in {}",
                ctx.prefix,
                was.as_deref().unwrap_or("unset"),
                took(start)
            );
            Ok(())
        }
        Some(Err(failed)) => {
            let mut message = format!("the rollout of {version} failed on {}", names(&failed));
            match (rollback_on_failure, switched_at) {
                (true, Some(index)) => {
                    message.push_str(&restore_current(ctx, version, base, index)?)
                }
                _ => message.push_str(&format!(
                    "; current stays {version}; roll back with `depro rollback -prefix={}`",
                    ctx.prefix
                )),
            }
            Err(Error::Refused(message))
        }
        None => Err(Error::Timeout(format!(
            "timed out waiting for the rollout of {version}: {} of {total} nodes active; current is {version}; \
             check the agents with `depro status -prefix={}`",
            match last {
                Confirmation::Waiting { active } => active,
                _ => 0,
            },
            ctx.prefix
        ))),
    }
}

/// Step 3: check-and-set `current` against `base`, recording the history in
/// the version's key in the same transaction. Returns current's new index.
fn switch_current(ctx: &mut Ctx, version: &VersionName, base: Option<&CurrentKey>) -> Result<u64> {
    let tree = ctx.read_tree()?;
    let info = tree.versions.get(version).cloned().unwrap_or_default();
    let base_index = base.map_or(0, |c| c.modify_index);
    let mut meta = info.meta.clone();
    meta.current_since = Some(crate::logging::timestamp());
    meta.current_by = Some(ctx.user.clone());
    meta.current_order = Some(base_index);
    let meta_json = meta.to_json();
    let current_key = ctx.prefix.current_key();
    let version_key = info
        .key
        .map(|(key, _)| key)
        .unwrap_or_else(|| ctx.prefix.folder_key(version));
    let ops = [
        TxnOp::Cas {
            key: &current_key,
            value: version.as_str().as_bytes(),
            index: base_index,
        },
        TxnOp::Set {
            key: &version_key,
            value: &meta_json,
        },
    ];
    if ctx.consul.txn(&ops)? {
        let answer = ctx.consul.get(&current_key, Read::now())?;
        return Ok(answer.value.map_or(0, |e| e.modify_index));
    }
    // Lost the race: say who won.
    let now = ctx.read_tree()?;
    let winner = now
        .current
        .as_ref()
        .map(|c| c.value.clone())
        .unwrap_or_else(|| "unset".into());
    let by = now
        .current_version()
        .and_then(|v| now.versions.get(v))
        .and_then(|i| i.meta.current_by.clone())
        .map(|by| format!(" by {by}"))
        .unwrap_or_default();
    Err(Error::LostRace(format!(
        "{}/current was changed to {winner}{by} while this command waited; {version} is ready but not current; \
         check with `depro status -prefix={}`, then `depro rollout {version}` if it should still win",
        ctx.prefix, ctx.prefix
    )))
}

/// `-rollback-on-failure`: puts `current` back as it was, unless someone
/// changed it since our switch.
fn restore_current(
    ctx: &mut Ctx,
    version: &VersionName,
    base: Option<&CurrentKey>,
    ours: u64,
) -> Result<String> {
    let key = ctx.prefix.current_key();
    let op = match base {
        Some(c) => TxnOp::Cas {
            key: &key,
            value: c.value.as_bytes(),
            index: ours,
        },
        None => TxnOp::DeleteCas {
            key: &key,
            index: ours,
        },
    };
    let was = base.map_or("unset".to_string(), |c| c.value.clone());
    Ok(if ctx.consul.txn(&[op])? {
        ctx.out
            .line(&format!("current: {version} -> {was} (rolled back)"));
        format!("; current switched back to {was}")
    } else {
        format!(
            "; current was changed by someone else meanwhile, so it was not switched back to {was}"
        )
    })
}

/// `-keep=K` after a deploy: the same as `depro prune`.
fn prune_to(ctx: &mut Ctx, keep: u32) -> Result<()> {
    let tree = ctx.read_tree()?;
    for version in tree.prune(keep as usize) {
        super::remove::remove_one(ctx, &tree, &version)?;
        ctx.out.line(&format!("pruned {version}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(states: &[(&str, NodeState)]) -> BTreeMap<String, NodeEntry> {
        states
            .iter()
            .map(|(n, s)| {
                (
                    n.to_string(),
                    NodeEntry {
                        state: *s,
                        modify_index: 1,
                    },
                )
            })
            .collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    use NodeState::*;

    #[test]
    fn ready_needs_enough_nodes_all_of_them_ready() {
        let none = set(&[]);
        assert_eq!(
            readiness(&nodes(&[("a", Ready), ("b", Ready)]), 3, &none),
            Readiness::Waiting {
                ready: 2,
                reported: 2
            }
        );
        assert_eq!(
            readiness(
                &nodes(&[("a", Ready), ("b", Active), ("c", Ready)]),
                3,
                &none
            ),
            Readiness::Ready
        );
        assert_eq!(
            readiness(
                &nodes(&[("a", Ready), ("b", Ready), ("c", Ready), ("d", Busy)]),
                3,
                &none
            ),
            Readiness::Waiting {
                ready: 3,
                reported: 4
            },
            "every node that reported must have it"
        );
    }

    #[test]
    fn one_failed_node_fails_the_deploy_at_once() {
        let state = nodes(&[("a", Ready), ("b", Failed), ("c", Busy)]);
        assert_eq!(
            readiness(&state, 1, &set(&[])),
            Readiness::Failed(vec!["b".into()])
        );
    }

    #[test]
    fn retried_nodes_must_report_again() {
        let state = nodes(&[("a", Ready)]);
        assert_eq!(
            readiness(&state, 1, &set(&["b"])),
            Readiness::Waiting {
                ready: 1,
                reported: 1
            }
        );
        let state = nodes(&[("a", Ready), ("b", Ready)]);
        assert_eq!(readiness(&state, 1, &set(&["b"])), Readiness::Ready);
    }

    #[test]
    fn a_rollout_is_confirmed_when_every_ready_node_is_active() {
        let expected = set(&["a", "b"]);
        assert_eq!(
            confirmation(&nodes(&[("a", Active), ("b", Ready)]), &expected),
            Confirmation::Waiting { active: 1 }
        );
        assert_eq!(
            confirmation(
                &nodes(&[("a", Active), ("b", Active), ("c", Busy)]),
                &expected
            ),
            Confirmation::Confirmed
        );
        assert_eq!(
            confirmation(&nodes(&[("a", Active), ("b", Failed)]), &expected),
            Confirmation::Failed(vec!["b".into()])
        );
        assert_eq!(
            confirmation(&nodes(&[("a", Active)]), &expected),
            Confirmation::Waiting { active: 1 },
            "b vanished"
        );
    }
}
