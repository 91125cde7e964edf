//! `restart`: `current`'s rollout hook (and health checks) run again on the
//! nodes that run it, in waves with a rollout's gates, without moving
//! `current`. Decided by `switch_plan::decide_restart`, carried out by
//! `waves::restart`, printed by the dry run from the same decision.

use std::time::Instant;

use super::switch::{Wait, refused};
use super::switch_plan::{Observed, decide_restart};
use super::{Ctx, interrupt};
use crate::cli::RestartArgs;
use crate::config::Env;
use crate::error::Result;
use crate::tree::{NodeState, Tree};

pub(crate) fn restart(mut args: RestartArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let start = Instant::now();
    ctx.deadline = start + args.switch.timeout;
    let current = ctx.read_current()?;
    let mut tree = Tree {
        rollout: ctx.read_rollout()?,
        ..Tree::default()
    };
    if let Some(version) = current.as_ref().and_then(|c| c.version.clone()) {
        tree.versions
            .insert(version.clone(), ctx.read_version(&version)?);
    }
    tree.current = current;
    let seen = Observed { tree };
    // Resuming a restart takes its own flags, as a resumed rollout does.
    let version = seen.tree.current_version().cloned();
    super::deploy::resolve_flags(&mut ctx, &mut args.switch, &seen, version.as_ref())?;
    // Nothing to roll back to: a failed node halts the restart, as a
    // failed canary halts a rollout, and waits for a fix and a retry.
    if args.switch.rollback_on_failure {
        args.switch.rollback_on_failure = false;
        ctx.out
            .line("-rollback-on-failure does not apply to a restart: a failure halts it");
        ctx.hints_repeat(&args.switch);
    }
    let plan = decide_restart(&seen).map_err(|r| refused(&ctx, r))?;
    if args.switch.dry_run {
        super::dry_run::show_restart(&ctx, &plan, &args.switch);
        return Ok(());
    }
    interrupt::catch();
    // Nodes that report the version but do not run it are not restarted:
    // said, not silently dropped.
    let skipped: Vec<String> = seen
        .tree
        .versions
        .get(&plan.version)
        .map(|info| {
            info.nodes
                .iter()
                .filter(|(n, e)| e.state != NodeState::Active && !plan.nodes.contains(*n))
                .map(|(n, e)| format!("{n} ({})", e.state))
                .collect()
        })
        .unwrap_or_default();
    if plan.resume.is_none() && !skipped.is_empty() {
        ctx.out.line(&format!(
            "not restarting {}: they do not run {} now",
            skipped.join(", "),
            plan.version
        ));
    }
    let wait = Wait {
        version: &plan.version,
        need: args.switch.need(),
        min: args.switch.min_nodes,
        deadline: ctx.deadline,
        retried: &Default::default(),
        base: Some(&plan.base),
        abort_if_current_moves: true,
        how: "restart",
    };
    let resume = plan.resume.clone().map(|(p, index)| (*p, index));
    let left_behind = seen.tree.rollout.as_ref().map_or(0, |(_, index)| *index);
    super::waves::restart(
        &mut ctx,
        &wait,
        &plan.nodes,
        &args.switch,
        start,
        resume,
        left_behind,
    )
}
