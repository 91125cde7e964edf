//! `pause`, `resume` and `promote`: a progressive rollout under way, held
//! or let go on from any terminal. `-promote=manual` is a pause the
//! rollout's own command makes after its first wave; `promote V` is a
//! resume of V's rollout. A pause is a mark in the plan (`.rollout`'s
//! `paused`): the command driving the waves starts no further wave while it
//! is there (the wave under way completes), and neither does a resume of an
//! abandoned rollout. `resume` removes it; when no command drives the
//! rollout (`.driver`), it drives it itself, as `depro rollout V` would.

use super::Ctx;
use super::switch_plan::in_effect;
use crate::cli::{RolloutArgs, SwitchFlags, TreeArgs};
use crate::config::Env;
use crate::consul::{Read, TxnOp, TxnOutcome};
use crate::error::{Error, Result};
use crate::tree::{RolloutPlan, driver_of, shown};

pub(crate) fn pause(args: TreeArgs, env: Env<'_>) -> Result<()> {
    let ctx = Ctx::resolve(&args, env)?;
    let (plan, index) = under_way(&ctx)?;
    let version = shown(&plan.version);
    let what = what(&plan);
    if let Some(by) = &plan.paused {
        println!(
            "{}: the {what} of {version} is paused already (by {})",
            ctx.prefix,
            shown(by)
        );
        return Ok(());
    }
    let mut paused = plan.clone();
    paused.paused = Some(format!("{} at {}", ctx.user, crate::logging::timestamp()));
    mark(&ctx, &paused, index)?;
    println!(
        "{}: paused the {what} of {version} at wave {} of {}: no further wave starts ({}); go \
         on with `depro resume -prefix={}`, {} with `depro rollback -prefix={}`",
        ctx.prefix,
        plan.started_waves,
        plan.waves.len(),
        match driver(&ctx)? {
            Some(who) => format!("the command driving it, of {who}, waits"),
            None => "no command drives it now".into(),
        },
        ctx.prefix,
        if plan.restart.is_some() {
            "stop it there"
        } else {
            "undo it"
        },
        ctx.prefix
    );
    Ok(())
}

/// `resume`, and `promote VERSION` (the same, for the rollout of VERSION
/// only: it stopped after its canary, `-promote=manual`).
pub(crate) fn resume(args: TreeArgs, env: Env<'_>, promote: Option<String>) -> Result<()> {
    let ctx = Ctx::resolve(&args, env)?;
    let (plan, index) = under_way(&ctx)?;
    let version = shown(&plan.version);
    let what = what(&plan);
    if let Some(asked) = &promote
        && asked != &plan.version
    {
        return Err(Error::Refused(format!(
            "the progressive rollout under way under {} is of {version}, not {}; promote it with \
             `depro promote {version} -prefix={}`",
            ctx.prefix,
            shown(asked),
            ctx.prefix
        )));
    }
    if plan.paused.is_some() {
        let mut resumed = plan.clone();
        resumed.paused = None;
        mark(&ctx, &resumed, index)?;
        ctx.out.line(&format!("resumed the {what} of {version}"));
    }
    if let Some(who) = driver(&ctx)? {
        println!(
            "{}: the {what} of {version} goes on: the command driving it, of {who}, starts the \
             next wave (one killed with -9 holds its claim for up to 20 s: if no wave starts, run \
             `depro resume -prefix={}` again then)",
            ctx.prefix, ctx.prefix
        );
        return Ok(());
    }
    ctx.out.line(&format!(
        "no command drives the {what} of {version}: driving it from here"
    ));
    drop(ctx);
    // A restart goes on as `depro restart` takes it (on the nodes its
    // plan names, whatever else reports the version now).
    if plan.restart.is_some() {
        return super::restart::restart(
            crate::cli::RestartArgs {
                tree: args,
                switch: SwitchFlags::default(),
            },
            env,
        );
    }
    super::deploy::rollout(
        RolloutArgs {
            tree: args,
            version: plan.version,
            switch: SwitchFlags::default(),
        },
        env,
    )
}

/// What a plan is, in words: a restart or a rollout.
fn what(plan: &RolloutPlan) -> &'static str {
    match plan.restart {
        Some(_) => "restart",
        None => "rollout",
    }
}

/// The progressive rollout under way (it applies to `current`), or exit 2.
fn under_way(ctx: &Ctx) -> Result<(RolloutPlan, u64)> {
    let rollout = ctx.read_rollout()?;
    let current = ctx.read_current()?;
    match in_effect(rollout.as_ref(), current.as_ref()) {
        Some((plan, index)) => Ok((plan.clone(), index)),
        None => Err(Error::Refused(format!(
            "no progressive rollout is under way under {} (`depro status -prefix={}` shows what \
             is)",
            ctx.prefix, ctx.prefix
        ))),
    }
}

/// Writes the plan with its mark changed, by check-and-set; exit 5 if the
/// rollout changed meanwhile.
fn mark(ctx: &Ctx, plan: &RolloutPlan, index: u64) -> Result<()> {
    match super::waves::write_plan_if(ctx, plan, index)? {
        Some(_) => Ok(()),
        None => Err(Error::LostRace(format!(
            "the rollout under {} changed meanwhile (a wave started, or another command paused, \
             resumed or undid it); see `depro status -prefix={}` and run this again",
            ctx.prefix, ctx.prefix
        ))),
    }
}

/// Who drives the rollout's waves now, if a command does.
fn driver(ctx: &Ctx) -> Result<Option<String>> {
    let key = ctx.prefix.driver_key();
    let answer = ctx.retrying(|c| c.get(&key, Read::consistent()))?;
    Ok(answer
        .value
        .filter(|e| e.session.is_some())
        .map(|e| driver_of(&e.value)))
}

/// `forget NODE`: the node of a retired host is no longer remembered
/// (`.known`), so `status` stops showing it absent. Refused while its agent
/// runs (it would be remembered again at once).
pub(crate) fn forget(args: TreeArgs, env: Env<'_>, node: &str) -> Result<()> {
    let ctx = Ctx::resolve(&args, env)?;
    crate::tree::check_node_name(node).map_err(|why| Error::Usage(format!("forget: {why}")))?;
    if ctx.read_agents()?.contains_key(node) {
        return Err(Error::Refused(format!(
            "{node}'s agent follows {} now; stop it (and retire the host) first",
            ctx.prefix
        )));
    }
    let key = ctx.prefix.known_key(node);
    let Some(entry) = ctx.retrying(|c| c.get(&key, Read::consistent()))?.value else {
        return Err(Error::Refused(format!(
            "{node} is not remembered under {} (`depro status -prefix={}` lists the absent nodes)",
            ctx.prefix, ctx.prefix
        )));
    };
    let op = TxnOp::DeleteCas {
        key: &key,
        index: entry.modify_index,
    };
    match ctx.retrying(|c| c.txn(std::slice::from_ref(&op)))? {
        TxnOutcome::Committed(_) => {
            println!("{}: forgot {node}", ctx.prefix);
            Ok(())
        }
        TxnOutcome::Rejected(_) => Err(Error::LostRace(format!(
            "{node}'s agent started again meanwhile (it wrote {key}); stop it first"
        ))),
    }
}
