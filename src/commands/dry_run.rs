//! `-dry-run` on `deploy`, `rollout`, `rollback`, `remove` and `prune`: the
//! command reads the tree and decides as the real run does; this prints the
//! decision (what it would write and which nodes it would wait for) instead
//! of carrying it out. A refusal is the real run's: the same error, the
//! same exit code.

use std::collections::BTreeSet;

use super::switch_plan::{Observed, RestartPlan, SwitchPlan, Then, plan_waves};
use super::{Ctx, names};
use crate::cli::{Need, SwitchFlags};
use crate::error::Result;
use crate::tree::{NodeState, RolloutPlan, Tree, VersionInfo, shown};
use crate::version_name::VersionName;

fn say(line: &str) {
    say!("dry run: {line}");
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

/// The plan of `deploy`, `rollout` or `rollback` (as decided for the real
/// run), and `prune`: what `-keep` would remove once the switch is made.
pub(crate) fn show_switch(
    ctx: &Ctx,
    plan: &SwitchPlan,
    seen: &Observed,
    flags: &SwitchFlags,
    prune: &[VersionName],
) -> Result<()> {
    let version = &plan.version;
    let info = seen.tree.versions.get(version).cloned().unwrap_or_default();
    if let Some(from) = &plan.from {
        say(&format!(
            "would roll {} back from {from} to {version}",
            ctx.prefix
        ));
    }
    if plan.create {
        say(&format!(
            "would create {} (created_at, created_by) and ring {}",
            ctx.prefix.folder_key(version),
            ctx.prefix.changed_key()
        ));
    }
    for (node, _) in &plan.retry {
        say(&format!(
            "would delete {} and its reason: ask {node} to try again",
            ctx.prefix.node_key(version, node)
        ));
    }
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
    let nodes = nodes_now(&info);
    let base = plan.base.as_ref();
    let from = base.map_or("unset".to_string(), |c| shown(&c.value));
    let index = base.map_or(0, |c| c.modify_index);
    match &plan.then {
        Then::Stop => {
            say(&format!(
                "would wait until {need} nodes{of} have {version} ready ({nodes}), then stop: \
                 current unchanged"
            ));
            say("nothing was written");
            return Ok(());
        }
        _ => say(&format!(
            "would wait until {need} nodes{of} have {version} ready and none failed ({nodes})"
        )),
    }
    match &plan.then {
        Then::Stop => unreachable!("handled above"),
        Then::AlreadyCurrent => say(&format!(
            "{version} is already current: would only wait for it to be active"
        )),
        // A restart under way (this command names current): the restart
        // goes on, as `depro restart` would take it; current does not move.
        Then::Resume {
            plan: under_way, ..
        } if under_way.restart.is_some() => {
            restart_lines(ctx, version, &BTreeSet::new(), Some(under_way), flags);
            return Ok(());
        }
        Then::Resume {
            plan: under_way, ..
        } => {
            say_paused(ctx, under_way);
            say(&format!(
                "would resume the progressive rollout of {version}{} at wave {} of {} ({} \
                 switched: {}), each wave active before the next{}",
                under_way.by_whom(),
                under_way.started_waves,
                under_way.waves.len(),
                under_way.switched.len(),
                names(&under_way.switched.iter().cloned().collect::<Vec<_>>()),
                pause(flags)
            ));
            switch_line(ctx, version, &from, index, flags);
        }
        Then::Waves => {
            let ready: BTreeSet<String> = info
                .nodes
                .iter()
                .filter(|(_, e)| e.state.has_it())
                .map(|(n, _)| n.clone())
                .collect();
            let waves = plan_waves(&ready, flags.canary, flags.batch);
            let described: Vec<String> = waves.iter().map(|w| format!("[{}]", names(w))).collect();
            say(&format!(
                "would roll out in waves drawn from the nodes ready then (as of now: {}), each \
                 active before the next{}",
                if described.is_empty() {
                    "none yet".to_string()
                } else {
                    described.join(" ")
                },
                pause(flags)
            ));
            if flags.promote_manual && waves.len() != 1 {
                // current does not move in this run.
                say(&format!(
                    "would stop after the first wave (-promote=manual), exit 0, until `depro \
                     promote {version} -prefix={}`",
                    ctx.prefix
                ));
            } else {
                switch_line(ctx, version, &from, index, flags);
            }
        }
        Then::AtOnce => switch_line(ctx, version, &from, index, flags),
    }
    if !prune.is_empty() {
        let list: Vec<&str> = prune.iter().map(VersionName::as_str).collect();
        say(&format!("would then prune {}", list.join(", ")));
    }
    say("nothing was written");
    Ok(())
}

fn pause(flags: &SwitchFlags) -> String {
    match flags.pause.is_zero() {
        true => String::new(),
        false => format!(", {} apart", crate::duration::human(flags.pause)),
    }
}

/// The switch itself, and the wait for the rollout.
fn switch_line(ctx: &Ctx, version: &VersionName, from: &str, index: u64, flags: &SwitchFlags) {
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
}

/// `rollback` while a progressive rollout is under way: the undo.
pub(crate) fn show_undo(ctx: &Ctx, plan: &RolloutPlan, index: u64) {
    say(&format!(
        "would undo the progressive rollout of {}: delete {} (check-and-set on index {index}), \
         then wait until {} run {} again",
        shown(&plan.version),
        ctx.prefix.rollout_key(),
        names(&plan.switched.iter().cloned().collect::<Vec<_>>()),
        shown(&plan.base)
    ));
    say("nothing was written");
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

/// The plan of `restart`, as decided for the real run.
pub(crate) fn show_restart(ctx: &Ctx, plan: &RestartPlan, flags: &SwitchFlags) {
    let resume = plan.resume.as_ref().map(|(p, _)| &**p);
    restart_lines(ctx, &plan.version, &plan.nodes, resume, flags);
}

/// A paused plan waits for `depro resume` before its next wave.
fn say_paused(ctx: &Ctx, plan: &RolloutPlan) {
    if let Some(by) = &plan.paused {
        say(&format!(
            "the {} is paused (by {}): would wait for `depro resume -prefix={}` before the next \
             wave",
            match plan.restart {
                Some(_) => "restart",
                None => "rollout",
            },
            shown(by),
            ctx.prefix
        ));
    }
}

/// A restart of `version` on `nodes`, or the one under way resumed.
fn restart_lines(
    ctx: &Ctx,
    version: &VersionName,
    nodes: &BTreeSet<String>,
    resume: Option<&RolloutPlan>,
    flags: &SwitchFlags,
) {
    match resume {
        Some(under_way) => {
            say_paused(ctx, under_way);
            say(&format!(
                "would resume the restart of {version}{} at wave {} of {} ({} told to restart: \
                 {})",
                under_way.by_whom(),
                under_way.started_waves,
                under_way.waves.len(),
                under_way.switched.len(),
                names(&under_way.switched)
            ));
        }
        None => {
            let waves = plan_waves(nodes, flags.canary, flags.batch);
            say(&format!(
                "would write {} (check-and-set) and ring {}: restart {version} on the {} nodes \
                 that run it, in {} wave{} ({})",
                ctx.prefix.rollout_key(),
                ctx.prefix.changed_key(),
                nodes.len(),
                waves.len(),
                if waves.len() == 1 { "" } else { "s" },
                waves.iter().map(names).collect::<Vec<_>>().join(" | ")
            ));
            if flags.promote_manual && waves.len() > 1 {
                say("would stop after the first wave until `depro promote`");
            }
        }
    }
    say(&format!(
        "each node would run {version}'s rollout hook and health checks again, each wave \
         restarted before the next{}; the first failure halts it; then the plan goes and \
         {} records the restart; current unchanged",
        match flags.pause.is_zero() {
            true => String::new(),
            false => format!(", {} between waves", crate::duration::human(flags.pause)),
        },
        ctx.prefix.history_key()
    ));
    say("nothing was written");
}
