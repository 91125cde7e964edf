//! `-dry-run` on `deploy`, `rollout`, `rollback`, `remove` and `prune`: reads
//! the tree as the real command would, prints what it would write and which
//! nodes it would wait for, writes nothing, and exits with the code the real
//! run would start with (a refusal is the same error, the same exit code).

use std::collections::BTreeSet;

use super::deploy::{not_in_tree, rollback_target};
use super::{Ctx, names, version_arg, waves};
use crate::cli::{Need, SwitchFlags};
use crate::error::Result;
use crate::tree::{CurrentKey, NodeState, Tree, VersionInfo, shown};
use crate::version_name::VersionName;

fn say(line: &str) {
    println!("dry run: {line}");
}

/// What the nodes say of `version` now, for the lines about waiting.
fn nodes_now(info: &VersionInfo) -> String {
    let mut parts = Vec::new();
    for state in [
        NodeState::Active,
        NodeState::Ready,
        NodeState::Busy,
        NodeState::Failed,
    ] {
        let nodes = crate::tree::nodes_in(&info.nodes, state);
        if !nodes.is_empty() {
            parts.push(format!("{state}: {}", names(&nodes)));
        }
    }
    if parts.is_empty() {
        "no node has reported it yet".into()
    } else {
        format!("now {}", parts.join("; "))
    }
}

/// The switch and the waits that follow it.
fn switch_lines(
    ctx: &Ctx,
    version: &VersionName,
    base: Option<&CurrentKey>,
    info: &VersionInfo,
    flags: &SwitchFlags,
) -> Result<()> {
    let live = match flags.need().counts_agents() {
        true => ctx.read_agents()?.len(),
        false => 0,
    };
    let need = flags.needed(live);
    let floor = match flags.min_nodes > flags.need().count(live) {
        true => format!(", -min-nodes={}", flags.min_nodes),
        false => String::new(),
    };
    let of = match flags.need() {
        Need::Count(_) => String::new(),
        other => format!(" (-nodes={other} of {live} live agents{floor})"),
    };
    say(&format!(
        "would wait until {need} nodes{of} have {version} ready and none failed ({})",
        nodes_now(info)
    ));
    if base.is_some_and(|c| c.version.as_ref() == Some(version)) {
        say(&format!(
            "{version} is already current: would only wait for it to be active"
        ));
        return Ok(());
    }
    let from = base.map_or("unset".to_string(), |c| shown(&c.value));
    let index = base.map_or(0, |c| c.modify_index);
    if flags.progressive() {
        waves::base_for_waves(ctx, base)?;
        let ready: BTreeSet<String> = info
            .nodes
            .iter()
            .filter(|(_, e)| e.state.has_it())
            .map(|(n, _)| n.clone())
            .collect();
        let plan = waves::plan_waves(&ready, flags.canary, flags.batch);
        let described: Vec<String> = plan.iter().map(|w| format!("[{}]", names(w))).collect();
        say(&format!(
            "would roll out in waves drawn from the nodes ready then (as of now: {}), each active before the next{}",
            if described.is_empty() {
                "none yet".to_string()
            } else {
                described.join(" ")
            },
            if flags.pause.is_zero() {
                String::new()
            } else {
                format!(", {} apart", crate::duration::human(flags.pause))
            }
        ));
    }
    say(&format!(
        "would switch {} from {from} to {version} (check-and-set on index {index}), record it in {}, ring {}",
        ctx.prefix.current_key(),
        ctx.prefix.history_key(),
        ctx.prefix.changed_key()
    ));
    say(&format!(
        "would wait until every node that had {version} ready reports it active{}",
        if flags.rollback_on_failure {
            format!(", and switch back to {from} if one fails")
        } else {
            String::new()
        }
    ));
    Ok(())
}

pub(crate) fn deploy(
    ctx: &mut Ctx,
    text: &str,
    flags: &SwitchFlags,
    no_rollout: bool,
    keep: Option<u32>,
) -> Result<()> {
    let version = version_arg(text)?;
    if !no_rollout {
        waves::check_none_other(ctx, &version)?;
    }
    let base = ctx.read_current()?;
    let info = ctx.read_version(&version)?;
    if !info.exists {
        say(&format!(
            "would create {} (created_at, created_by) and ring {}",
            ctx.prefix.folder_key(&version),
            ctx.prefix.changed_key()
        ));
    }
    for node in crate::tree::nodes_in(&info.nodes, NodeState::Failed) {
        say(&format!(
            "would delete {} and its reason: ask {node} to try again",
            ctx.prefix.node_key(&version, &node)
        ));
    }
    if no_rollout {
        let need = flags.needed(match flags.need().counts_agents() {
            true => ctx.read_agents()?.len(),
            false => 0,
        });
        say(&format!(
            "would wait until {need} nodes have {version} ready ({}), then stop: current unchanged",
            nodes_now(&info)
        ));
    } else {
        switch_lines(ctx, &version, base.as_ref(), &info, flags)?;
    }
    if let Some(keep) = keep {
        let tree = ctx.read_tree()?;
        let doomed: Vec<String> = tree
            .prune(keep as usize, false)
            .iter()
            .map(|v| v.to_string())
            .collect();
        if !doomed.is_empty() {
            say(&format!("would then prune {}", doomed.join(", ")));
        }
    }
    say("nothing was written");
    Ok(())
}

pub(crate) fn rollout(ctx: &mut Ctx, text: &str, flags: &SwitchFlags) -> Result<()> {
    let version = version_arg(text)?;
    waves::check_none_other(ctx, &version)?;
    let base = ctx.read_current()?;
    if ctx.read_version_key(&version)?.is_none() {
        return Err(not_in_tree(ctx, &version));
    }
    let info = ctx.read_version(&version)?;
    switch_lines(ctx, &version, base.as_ref(), &info, flags)?;
    say("nothing was written");
    Ok(())
}

pub(crate) fn rollback(ctx: &mut Ctx, to: Option<&str>, flags: &SwitchFlags) -> Result<()> {
    let tree = ctx.read_existing_tree()?;
    if let Some((plan, index)) = tree.rollout_in_effect() {
        say(&format!(
            "would undo the progressive rollout of {}: delete {} (check-and-set on index {index}), \
             then wait until {} run {} again",
            shown(&plan.version),
            ctx.prefix.rollout_key(),
            names(&plan.switched.iter().cloned().collect::<Vec<_>>()),
            shown(&plan.base)
        ));
        say("nothing was written");
        return Ok(());
    }
    let (_, target) = rollback_target(ctx, &tree, to)?;
    if !tree.versions.get(&target).is_some_and(|i| i.exists) {
        return Err(not_in_tree(ctx, &target));
    }
    let info = tree.versions.get(&target).cloned().unwrap_or_default();
    switch_lines(ctx, &target, tree.current.as_ref(), &info, flags)?;
    say("nothing was written");
    Ok(())
}

/// `remove -dry-run`, after the real command's checks passed.
pub(crate) fn remove(ctx: &Ctx, tree: &Tree, versions: &[VersionName], wait: bool) {
    for version in versions {
        let info = tree.versions.get(version).cloned().unwrap_or_default();
        let key = info
            .key
            .as_ref()
            .map_or_else(|| ctx.prefix.folder_key(version), |(k, _)| k.clone());
        say(&format!(
            "would delete {key} and ring {}; every agent then cleans {version} and deletes its key{}",
            ctx.prefix.changed_key(),
            if wait {
                format!(
                    "; would wait for {} node(s): {}",
                    info.nodes.len(),
                    names(&info.nodes.keys().cloned().collect::<Vec<_>>())
                )
            } else {
                String::new()
            }
        ));
    }
    say("nothing was written");
}

/// `prune -dry-run`.
pub(crate) fn prune(ctx: &Ctx, tree: &Tree, keep: Option<u32>, failed: bool) {
    let doomed = tree.prune(keep.map_or(usize::MAX, |k| k as usize), failed);
    if doomed.is_empty() {
        say(&format!("nothing to prune under {}", ctx.prefix));
    } else {
        let list: Vec<&str> = doomed.iter().map(VersionName::as_str).collect();
        say(&format!(
            "would remove {} from {}",
            list.join(", "),
            ctx.prefix
        ));
    }
    say("nothing was written");
}
