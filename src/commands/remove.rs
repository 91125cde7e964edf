//! `remove` and `prune`: take versions out of the tree. Removing a version
//! deletes its folder key (or plain key) only; each agent then cleans its
//! directory and deletes its own node key, so `-wait` can follow the purge
//! node by node.

use std::time::Instant;

use super::{Ctx, Seen, Vanished, names, took, version_arg};
use crate::cli::{PruneArgs, RemoveArgs};
use crate::config::Env;
use crate::consul::{TxnOp, TxnOutcome};
use crate::doorbell::Change;
use crate::error::{Error, Result};
use crate::tree::Tree;
use crate::version_name::VersionName;

pub(crate) fn remove(args: RemoveArgs, env: Env<'_>) -> Result<()> {
    let (tree, versions) = (args.tree.clone(), args.versions.clone());
    super::result::reported(
        "remove",
        &tree,
        &versions,
        env,
        Box::new(|| remove_now(args, env)),
    )
}

fn remove_now(args: RemoveArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let versions: Vec<VersionName> = args
        .versions
        .iter()
        .map(|v| version_arg(v))
        .collect::<Result<_>>()?;
    let start = Instant::now();
    let deadline = start + args.timeout;
    ctx.deadline = deadline;
    let tree = ctx.read_existing_tree()?;
    for version in &versions {
        if let Some(refusal) = refusal(&ctx, &tree, version) {
            return Err(refusal);
        }
    }
    if args.dry_run {
        super::dry_run::remove(&ctx, &tree, &versions, args.wait);
        return Ok(());
    }
    super::interrupt::catch();
    let prefix = ctx.prefix.clone();
    let again = |rest: &[VersionName]| {
        let rest: Vec<&str> = rest.iter().map(VersionName::as_str).collect();
        format!("`depro remove {} -prefix={prefix}`", rest.join(" "))
    };
    remove_each(&mut ctx, &tree, &versions, again)?;
    if !args.wait {
        let list: Vec<&str> = versions.iter().map(VersionName::as_str).collect();
        say!(
            "removed {} from {}; the agents are cleaning up (add -wait to follow them)",
            list.join(", "),
            ctx.prefix
        );
        return Ok(());
    }
    for version in &versions {
        let before = tree.versions.get(version).map_or(0, |i| i.nodes.len());
        let mut left = before;
        let outcome = ctx.follow(version, deadline, |out, seen: &Seen| {
            left = seen.info.nodes.len();
            if left == 0 {
                return Some(seen.vanished.clone());
            }
            let nodes = if left == 1 {
                "node still has"
            } else {
                "nodes still have"
            };
            out.count(&format!("{left} {nodes} {version}"));
            None
        })?;
        let Some(vanished) = outcome else {
            return Err(Error::Timeout(format!(
                "timed out: {left} nodes still have {version} under {}; check their agents \
                 (`depro status -prefix={} {version}`)",
                ctx.prefix, ctx.prefix
            )));
        };
        let gone: Vec<&String> = vanished
            .iter()
            .filter(|(_, why)| **why == Vanished::AgentGone)
            .map(|(node, _)| node)
            .collect();
        let purged = before.saturating_sub(gone.len());
        let mut summary = format!(
            "removed {version} from {}: purged from {purged} {} in {}",
            ctx.prefix,
            if purged == 1 { "node" } else { "nodes" },
            took(start)
        );
        if !gone.is_empty() {
            summary.push_str(&format!(
                "; {} gone (the agent stopped and its session ended before it cleaned up): \
                 the directory there may remain until its agent runs again",
                match gone.len() {
                    1 => format!("{} is", gone[0]),
                    _ => format!("{} are", names(gone.iter().copied())),
                }
            ));
        }
        say!("{summary}");
    }
    Ok(())
}

/// Why `version` may not be removed from `tree`, if it may not.
fn refusal(ctx: &Ctx, tree: &Tree, version: &VersionName) -> Option<Error> {
    if tree.current_version() == Some(version) {
        return Some(Error::Refused(format!(
            "{version} is current under {}: roll out another version first (`depro rollback` or \
             `depro rollout`), then remove it",
            ctx.prefix
        )));
    }
    let rolling_out = tree
        .rollout_in_effect()
        .is_some_and(|(plan, _)| plan.version == version.as_str());
    if rolling_out {
        return Some(Error::Refused(format!(
            "{version} is being rolled out progressively under {}: finish it with \
             `depro rollout {version} -prefix={}` or undo it with `depro rollback -prefix={}`, \
             then remove it",
            ctx.prefix, ctx.prefix, ctx.prefix
        )));
    }
    if !tree.versions.contains_key(version) {
        return Some(Error::Refused(format!(
            "{version} is not in the tree under {}; `depro status -prefix={}` lists the versions",
            ctx.prefix, ctx.prefix
        )));
    }
    None
}

/// Removes `versions` one by one; an interruption says which are removed
/// and which are left, with the command (`again` of them) that finishes.
pub(crate) fn remove_each(
    ctx: &mut Ctx,
    tree: &Tree,
    versions: &[VersionName],
    again: impl Fn(&[VersionName]) -> String,
) -> Result<()> {
    for (i, version) in versions.iter().enumerate() {
        remove_one(ctx, tree, version)?;
        let done: Vec<&str> = versions[..=i].iter().map(VersionName::as_str).collect();
        let rest = &versions[i + 1..];
        let mut leaves = format!(
            "removed {} from {}; the agents go on cleaning up (`depro status -prefix={}` shows them)",
            done.join(", "),
            ctx.prefix,
            ctx.prefix
        );
        if !rest.is_empty() {
            leaves.push_str(&format!("; not removed yet: finish with {}", again(rest)));
        }
        super::interrupt::leaves(leaves);
    }
    Ok(())
}

/// Deletes the key that makes `version` exist (never its node keys), on
/// the condition that `current` and the progressive rollout are still as
/// read: a switch to it, or a plan for it, written since makes the delete
/// fail, and the tree is read again and the version checked again.
pub(crate) fn remove_one(ctx: &mut Ctx, tree: &Tree, version: &VersionName) -> Result<()> {
    let mut fresh: Option<Tree> = None;
    for _ in 0..super::RING_TRIES {
        let tree = fresh.as_ref().unwrap_or(tree);
        if let Some(refusal) = refusal(ctx, tree, version) {
            return Err(refusal);
        }
        let Some(info) = tree.versions.get(version) else {
            return Ok(());
        };
        let Some((key, _)) = info.key.clone() else {
            return Ok(());
        };
        // Recorded with the removal, for `events -since`; the oldest
        // records beyond the bound go in the same transaction.
        let record_key = ctx.prefix.removed_key(version);
        let record = serde_json::to_vec(&crate::tree::Removal {
            by: ctx.user.clone(),
            at: crate::logging::timestamp(),
            created: info.create_index,
        })
        .unwrap_or_default();
        let forgotten: Vec<String> = tree
            .removals_beyond_bound(version)
            .iter()
            .map(|name| ctx.prefix.removed_key(name))
            .collect();
        let (current_key, rollout_key) = (ctx.prefix.current_key(), ctx.prefix.rollout_key());
        fn unchanged(key: &str, index: Option<u64>) -> TxnOp<'_> {
            match index {
                Some(index) => TxnOp::CheckIndex { key, index },
                None => TxnOp::CheckNotExists { key },
            }
        }
        let mut ops = vec![
            TxnOp::Delete { key: &key },
            unchanged(&current_key, tree.current.as_ref().map(|c| c.modify_index)),
            unchanged(&rollout_key, tree.rollout.as_ref().map(|(_, index)| *index)),
            TxnOp::Set {
                key: &record_key,
                value: &record,
            },
        ];
        ops.extend(forgotten.iter().map(|key| TxnOp::Delete { key }));
        let change = Change::Removed {
            version: version.clone(),
            folder: key.ends_with('/'),
        };
        match ctx.write_ringing(&ops, change)? {
            TxnOutcome::Committed(_) => return Ok(()),
            TxnOutcome::Rejected(_) => fresh = Some(ctx.read_tree()?),
        }
    }
    Err(ctx.bell_kept_ringing())
}

pub(crate) fn prune(args: PruneArgs, env: Env<'_>) -> Result<()> {
    let tree = args.tree.clone();
    super::result::reported("prune", &tree, &[], env, Box::new(|| prune_now(args, env)))
}

fn prune_now(args: PruneArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let tree = ctx.read_existing_tree()?;
    if args.dry_run {
        super::dry_run::prune(&ctx, &tree, args.keep, args.failed);
        return Ok(());
    }
    let doomed = tree.prune(args.keep.map_or(usize::MAX, |k| k as usize), args.failed);
    super::interrupt::catch();
    let prefix = ctx.prefix.clone();
    let flags = format!(
        "{}{}",
        args.keep.map_or(String::new(), |k| format!("-keep={k} ")),
        if args.failed { "-failed " } else { "" }
    );
    let again = |_: &[VersionName]| format!("`depro prune {flags}-prefix={prefix}`");
    remove_each(&mut ctx, &tree, &doomed, again)?;
    let kept: Vec<String> = tree
        .in_creation_order()
        .into_iter()
        .filter(|(v, i)| i.exists && !doomed.contains(v))
        .map(|(v, _)| {
            if tree.current_version() == Some(v) {
                format!("{v} (current)")
            } else if tree.failed_everywhere(v) {
                format!("{v} (failed)")
            } else {
                v.to_string()
            }
        })
        .collect();
    let removed: Vec<&str> = doomed.iter().map(VersionName::as_str).collect();
    if removed.is_empty() {
        say!(
            "nothing to prune under {}; kept {}",
            ctx.prefix,
            kept.join(", ")
        );
    } else {
        say!(
            "pruned {} from {}; kept {}",
            removed.join(", "),
            ctx.prefix,
            kept.join(", ")
        );
    }
    Ok(())
}
