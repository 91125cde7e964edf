//! Progressive rollouts: `-canary=N` and `-batch=K|P%` on `deploy`,
//! `rollout` and `rollback`. Nodes switch in waves, each `active` (and so
//! healthy) before the next starts; the first failure halts the rollout.
//!
//! The waves live in one key, `<prefix>/.rollout` ([`RolloutPlan`]), which
//! the command writes by check-and-set, ringing the doorbell each time. An
//! agent on a node the plan names runs the plan's version instead of
//! `current`, but only while `current` has the ModifyIndex the plan started
//! from: any switch of `current` (another operator, the last step) ends the
//! plan's effect everywhere at once. Every other node, and a host that
//! joins meanwhile, follows `current`, never a half-done wave. The last step
//! switches `current` and deletes the plan in one transaction.
//!
//! So at every moment each node runs the previous version or the new one;
//! a killed command leaves the plan in the tree (`depro status` shows it),
//! where `depro rollout V` resumes it and `depro rollback` undoes it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::driver::Driver;
use super::switch::{Wait, failed_nodes, refused, switch_and_confirm};
use super::switch_plan::{Then, plan_waves, then_for};
use super::{Also, Ctx, names, took};
use crate::cli::SwitchFlags;
use crate::consul::{Conflict, Consistency, Read, TxnOp, TxnOutcome};
use crate::doorbell::Change;
use crate::error::{Error, Result};
use crate::tree::{CurrentKey, NodeState, RolloutPlan, shown};
use crate::version_name::VersionName;

/// Steps 3 and 4 of `deploy`, `rollout` and `rollback`: all at once, or in
/// waves when asked to (or when a rollout of this version is under way:
/// it is resumed).
///
/// `resuming`: the command decided at its start to resume the rollout under
/// way; if that is gone at the switch (undone or finished by another
/// command), it does not start one of its own (exit 5).
pub(crate) fn switch(
    ctx: &mut Ctx,
    wait: &Wait<'_>,
    ready: BTreeSet<String>,
    flags: &SwitchFlags,
    start: Instant,
    resuming: bool,
) -> Result<()> {
    let version = wait.version;
    let base_index = wait.base.map_or(0, |c| c.modify_index);
    // Read once: the plan a new one replaces is the one read here, so that
    // a plan another operator writes after this read makes this command's
    // check-and-set fail (exit 5) rather than overwrite it. What to do with
    // it is decided again, as at the start, on what is read now.
    let found = ctx.read_rollout()?;
    let left_behind = found.as_ref().map_or(0, |(_, index)| *index);
    let then = then_for(version, wait.base, found.as_ref(), flags).map_err(|r| refused(ctx, r))?;
    if resuming && !matches!(then, Then::Resume { .. }) {
        return Err(Error::LostRace(format!(
            "the progressive rollout of {version} this command was to resume was undone or \
             finished by another command meanwhile; nothing was switched; see `depro status \
             -prefix={}`",
            ctx.prefix
        )));
    }
    if matches!(then, Then::Stop | Then::AlreadyCurrent | Then::AtOnce) {
        return switch_and_confirm(ctx, wait, ready, flags.rollback_on_failure, start, None);
    }
    // One command at a time drives the waves; `status` and `resume` see it.
    let _driver = Driver::take(ctx, version, base_index)?;
    let then_is_new = then == Then::Waves;
    let (plan, index) = match then {
        Then::Stop | Then::AlreadyCurrent | Then::AtOnce => unreachable!("switched above"),
        Then::Resume { plan, index } => {
            ctx.out.line(&format!(
                "resuming the {} of {version}: wave {} of {} was started{}",
                match plan.restart {
                    Some(_) => "restart",
                    None => "rollout",
                },
                plan.started_waves,
                plan.waves.len(),
                plan.by_whom()
            ));
            (*plan, index)
        }
        Then::Waves => {
            let base = wait.base.expect("then_for gives waves only with a base");
            start_plan(ctx, version, base, &ready, flags, left_behind)?
        }
    };
    drive(ctx, wait, ready, flags, start, plan, index, then_is_new)
}

/// `depro restart`: runs `current`'s rollout hook (and health checks)
/// again on `nodes`, in waves with a rollout's gates (`-canary`, `-batch`,
/// `-pause`, `-promote=manual`, `depro pause`; the first failure halts),
/// through a plan whose `restart` id the agents on its nodes act on once;
/// or resumes the restart under way. `current` does not move: the last
/// step deletes the plan and records the restart in the history.
pub(crate) fn restart(
    ctx: &mut Ctx,
    wait: &Wait<'_>,
    nodes: &BTreeSet<String>,
    flags: &SwitchFlags,
    start: Instant,
    resume: Option<(RolloutPlan, u64)>,
    left_behind: u64,
) -> Result<()> {
    let version = wait.version;
    let base = wait.base.expect("a restart has a current version");
    let _driver = Driver::take(ctx, version, base.modify_index)?;
    let is_new = resume.is_none();
    let (plan, index) = match resume {
        Some((plan, index)) => {
            ctx.out.line(&format!(
                "resuming the restart of {version}: wave {} of {} was started{}",
                plan.started_waves,
                plan.waves.len(),
                plan.by_whom()
            ));
            (plan, index)
        }
        None => {
            // By check-and-set on the plan the decision read (0: none): a
            // plan written since makes it fail (exit 5), never overwritten.
            let mut plan = new_plan(ctx, version, base, nodes, flags);
            plan.restart = Some(crate::logging::now_ms());
            ctx.out.line(&format!(
                "restarting {version} in {} wave{} ({}): each node runs its rollout hook and \
                 health checks again",
                plan.waves.len(),
                if plan.waves.len() == 1 { "" } else { "s" },
                plan.waves
                    .iter()
                    .map(|w| w.len().to_string())
                    .collect::<Vec<_>>()
                    .join(" + "),
            ));
            let index = write_plan(ctx, &plan, left_behind)?;
            (plan, index)
        }
    };
    drive(
        ctx,
        wait,
        BTreeSet::new(),
        flags,
        start,
        plan,
        index,
        is_new,
    )
}

/// Drives the waves of `plan` (at `index`) to their end: each wave active
/// (for a restart: restarted) before the next, then the last step.
#[allow(clippy::too_many_arguments)]
fn drive(
    ctx: &mut Ctx,
    wait: &Wait<'_>,
    ready: BTreeSet<String>,
    flags: &SwitchFlags,
    start: Instant,
    mut plan: RolloutPlan,
    mut index: u64,
    then_is_new: bool,
) -> Result<()> {
    let version = wait.version;
    let base_index = wait.base.map_or(0, |c| c.modify_index);
    let doing = match plan.restart {
        Some(_) => "restarting",
        None => "switching to",
    };
    // The last step records the message the rollout was started with,
    // unless this command gives its own.
    if ctx.message.is_none() {
        ctx.message.clone_from(&plan.message);
    }
    let total = plan.waves.len();
    let mut wave = plan.started_waves.max(1) - 1;
    // `-promote=manual` stops a rollout this command starts after its
    // first wave; a resumed one (`depro promote`) goes on.
    let stop_for_promotion = flags.promote_manual && then_is_new && total > 1;
    loop {
        leaves_wave(ctx, &plan);
        let nodes = plan.waves[wave].clone();
        ctx.out.line(&format!(
            "wave {}/{total}: {} {doing} {version}",
            wave + 1,
            names(&nodes)
        ));
        let mut paused = plan.paused.clone();
        let waited = wait_wave(ctx, wait, &plan, &mut index, &mut paused, base_index)?;
        plan.paused = paused;
        match waited {
            Ok(()) => ctx.out.line(&format!(
                "wave {}/{total}: {} {} {version} ({})",
                wave + 1,
                names(&nodes),
                match plan.restart {
                    Some(_) => "restarted",
                    None => "active on",
                },
                took(start)
            )),
            Err(why) => return Err(halted(ctx, wait, &plan, index, wave, why, flags)),
        }
        if stop_for_promotion {
            let mut held = plan.clone();
            held.paused = Some(format!(
                "{} at {} (waiting for promotion)",
                ctx.user,
                crate::logging::timestamp()
            ));
            // Lost to a pause or a resume made meanwhile: again on the
            // plan's new index (anything else is another command's).
            let mut written = None;
            for _ in 0..3 {
                written = write_plan_if(ctx, &held, index)?;
                if written.is_some() {
                    break;
                }
                match ctx.read_rollout()? {
                    Some((now, now_index)) if now.same_rollout(&plan) => index = now_index,
                    _ => {
                        let why = Halt::Overtaken(
                            "the rollout was undone or replaced by another command meanwhile"
                                .into(),
                        );
                        return Err(halted(ctx, wait, &plan, index, wave, why, flags));
                    }
                }
            }
            if written.is_some() && plan.restart.is_some() {
                say!(
                    "{version} restarted on {} (its first wave), not yet on the other nodes; \
                     waiting for promotion: `depro promote {version} -prefix={}` goes on, \
                     `depro rollback -prefix={}` stops the restart there ({})",
                    names(&nodes),
                    ctx.prefix,
                    ctx.prefix,
                    took(start)
                );
                return Ok(());
            }
            if written.is_some() {
                say!(
                    "{version}'s first wave is active on {} under {}, the other nodes run {}; \
                     waiting for promotion: `depro promote {version} -prefix={}` goes on, \
                     `depro rollback -prefix={}` undoes it ({})",
                    names(&nodes),
                    ctx.prefix,
                    shown(&plan.base),
                    ctx.prefix,
                    ctx.prefix,
                    took(start)
                );
                return Ok(());
            }
            return Err(Error::LostRace(format!(
                "{} kept changing while this command tried to stop the rollout of {version} for \
                 its promotion; see `depro status -prefix={}`",
                ctx.prefix.rollout_key(),
                ctx.prefix
            )));
        }
        wave += 1;
        // Between waves, and before the last step: -pause, and a pause by
        // `depro pause` from any terminal until `depro resume`.
        let mut pause = if wave < total {
            flags.pause
        } else {
            Duration::ZERO
        };
        loop {
            index = match between_waves(ctx, wait, &mut plan, index, pause, wave, total)? {
                Ok(index) => index,
                Err(why) => return Err(halted(ctx, wait, &plan, index, wave - 1, why, flags)),
            };
            if wave == total {
                break;
            }
            let mut next = plan.clone();
            next.started_waves = wave + 1;
            next.switched.extend(plan.waves[wave].iter().cloned());
            // Lost to a pause made meanwhile: wait again (a change of
            // anything else is another command's, and halts the rollout).
            if let Some(written) = write_plan_if(ctx, &next, index)? {
                (plan, index) = (next, written);
                break;
            }
            pause = Duration::ZERO;
        }
        if wave == total {
            break;
        }
    }
    if plan.restart.is_some() {
        return finish_restart(ctx, wait, &mut plan, index, start);
    }
    // Every wave is active: `current` moves and the plan goes, at once.
    let expected: BTreeSet<String> = ready.union(&plan.switched).cloned().collect();
    let mut tries = 0;
    loop {
        let outcome = switch_and_confirm(
            ctx,
            wait,
            expected.clone(),
            flags.rollback_on_failure,
            start,
            Some(index),
        );
        // The last step lost only to a pause (or a resume) made just before
        // it: `current` as it was, the same rollout under a new index. Wait
        // for the resume, then take the step again.
        let Err(Error::LostRace(_)) = &outcome else {
            return outcome;
        };
        tries += 1;
        let current = ctx.read_current()?.map_or(0, |c| c.modify_index);
        let paused_only = match ctx.read_rollout()? {
            Some((now, now_index)) => now_index != index && now.same_rollout(&plan),
            None => false,
        };
        if tries > 3 || current != base_index || !paused_only {
            return outcome;
        }
        index = match between_waves(ctx, wait, &mut plan, index, Duration::ZERO, total, total)? {
            Ok(index) => index,
            Err(why) => return Err(halted(ctx, wait, &plan, index, total - 1, why, flags)),
        };
    }
}

/// The last step of a restart: every wave restarted, the plan goes (by
/// check-and-set, while `current` keeps its index) and the history records
/// the restart, in one transaction with a ring. Lost only to a pause or a
/// resume just before it: then it waits for the resume and goes again.
fn finish_restart(
    ctx: &mut Ctx,
    wait: &Wait<'_>,
    plan: &mut RolloutPlan,
    mut index: u64,
    start: Instant,
) -> Result<()> {
    let version = wait.version;
    let (current_key, rollout_key, history_key) = (
        ctx.prefix.current_key(),
        ctx.prefix.rollout_key(),
        ctx.prefix.history_key(),
    );
    for _ in 0..5 {
        let (history, history_index) = ctx.read_history()?;
        let history = history
            .with(crate::tree::Switch {
                version: version.to_string(),
                from: version.to_string(),
                since: crate::logging::timestamp(),
                by: ctx.user.clone(),
                how: "restart".into(),
                message: ctx.message.clone().unwrap_or_default(),
                after: history_index,
            })
            .to_json();
        let ops = [
            TxnOp::CheckIndex {
                key: &current_key,
                index: plan.base_index,
            },
            TxnOp::DeleteCas {
                key: &rollout_key,
                index,
            },
            TxnOp::Cas {
                key: &history_key,
                value: &history,
                index: history_index,
            },
        ];
        match ctx.write_ringing(&ops, Change::Wave(None))? {
            TxnOutcome::Committed(_) => {
                say!(
                    "{version} restarted under {} on {} nodes ({}); current unchanged",
                    ctx.prefix,
                    plan.switched.len(),
                    took(start)
                );
                return Ok(());
            }
            TxnOutcome::Rejected(failures) => {
                if let Some(denied) = failures.iter().find(|f| f.conflict == Conflict::Denied) {
                    return Err(Error::Refused(format!(
                        "the ACL token may not finish the restart of {version} ({}: {})",
                        ops.get(denied.op).map_or("the transaction", |op| op.key()),
                        denied.what
                    )));
                }
            }
        }
        let total = plan.waves.len();
        let moved = ctx.read_current()?.map_or(0, |c| c.modify_index) != plan.base_index;
        let why = match ctx.read_rollout()? {
            _ if moved => Some("current was changed meanwhile"),
            Some((now, now_index)) if now.same_rollout(plan) => {
                if now_index != index {
                    // Paused (or resumed) just before the last step.
                    index = match between_waves(
                        ctx,
                        wait,
                        plan,
                        index,
                        Duration::ZERO,
                        total,
                        total,
                    )? {
                        Ok(index) => index,
                        Err(why) => {
                            return Err(halted(
                                ctx,
                                wait,
                                plan,
                                index,
                                total - 1,
                                why,
                                &SwitchFlags::default(),
                            ));
                        }
                    };
                }
                None // else the history changed: again
            }
            _ => Some("the restart was stopped or replaced by another command"),
        };
        if let Some(why) = why {
            return Err(Error::LostRace(format!(
                "{why} before the restart of {version} finished; every node it named ran its \
                 rollout hook again; check with `depro status -prefix={}`",
                ctx.prefix
            )));
        }
    }
    Err(Error::LostRace(format!(
        "{} kept changing while this command tried to finish the restart of {version}; check \
         with `depro status -prefix={}`",
        history_key, ctx.prefix
    )))
}

/// Waits out `pause` before wave `next` + 1 of `total` (or, with `next ==
/// total`, before the last step), and while the plan is paused (`depro
/// pause`), until it is resumed: the command's -timeout runs on meanwhile.
/// Returns the plan's index as it is now: a pause and a resume change it,
/// and nothing else may (that is another command's doing: `Overtaken`).
fn between_waves(
    ctx: &mut Ctx,
    wait: &Wait<'_>,
    plan: &mut RolloutPlan,
    mut index: u64,
    pause: Duration,
    next: usize,
    total: usize,
) -> Result<std::result::Result<u64, Halt>> {
    let key = ctx.prefix.rollout_key();
    if !pause.is_zero() {
        ctx.out.line(&format!(
            "pausing {} before wave {}/{total}",
            crate::duration::human(pause),
            next + 1
        ));
    }
    let until = Instant::now() + pause;
    let mut read = Read::consistent();
    loop {
        let answer = ctx.retrying(|c| c.get(&key, read))?;
        let Some(entry) = answer.value else {
            return Ok(Err(Halt::Overtaken(
                "the rollout was undone by another command meanwhile".into(),
            )));
        };
        if entry.modify_index != index {
            match RolloutPlan::parse(&entry.value) {
                Some(now) if now.same_rollout(plan) => {
                    match (&plan.paused, &now.paused) {
                        (None, Some(by)) => ctx.out.line(&format!(
                            "paused by {}: no further wave starts until `depro resume -prefix={}` \
                             (`depro rollback -prefix={}` undoes it)",
                            shown(by),
                            ctx.prefix,
                            ctx.prefix
                        )),
                        (Some(_), None) => ctx.out.line("resumed"),
                        _ => {}
                    }
                    plan.paused = now.paused;
                    index = entry.modify_index;
                }
                _ => {
                    return Ok(Err(Halt::Overtaken(
                        "the rollout was changed by another command meanwhile".into(),
                    )));
                }
            }
        }
        let now = Instant::now();
        if plan.paused.is_none() && now >= until {
            return Ok(Ok(index));
        }
        if now >= wait.deadline {
            return Ok(Err(Halt::Paused));
        }
        let limit = match plan.paused {
            Some(_) => wait.deadline,
            None => until.min(wait.deadline),
        };
        let left = limit
            .saturating_duration_since(now)
            .max(Duration::from_millis(10));
        read = Read::blocking(index, left.min(PAUSE_POLL), Consistency::Consistent);
    }
}

/// How long one blocking read of the plan waits, between waves.
const PAUSE_POLL: Duration = Duration::from_secs(10);

/// Records what an interruption leaves while `plan` is under way.
fn leaves_wave(ctx: &Ctx, plan: &RolloutPlan) {
    if plan.restart.is_some() {
        return super::interrupt::leaves(format!(
            "the restart of {} stays at wave {} of {} (current is unchanged); resume it with \
             `depro restart -prefix={}{}`, or stop it there with `depro rollback -prefix={}`",
            shown(&plan.version),
            plan.started_waves,
            plan.waves.len(),
            ctx.prefix,
            ctx.switch_flags,
            ctx.prefix
        ));
    }
    super::interrupt::leaves(format!(
        "the rollout of {} stays at wave {} of {} ({} of its nodes run it, the others {}, \
         current is unchanged); resume with `depro rollout {} -prefix={}{}`, or undo with \
         `depro rollback -prefix={}`",
        shown(&plan.version),
        plan.started_waves,
        plan.waves.len(),
        plan.switched.len(),
        shown(&plan.base),
        shown(&plan.version),
        ctx.prefix,
        ctx.switch_flags,
        ctx.prefix
    ));
}

/// Writes a new plan (its first wave started), by check-and-set on
/// `left_behind`: the index of a plan that no longer applies, as read
/// before, or 0 where there was none.
fn start_plan(
    ctx: &mut Ctx,
    version: &VersionName,
    base: &CurrentKey,
    ready: &BTreeSet<String>,
    flags: &SwitchFlags,
    left_behind: u64,
) -> Result<(RolloutPlan, u64)> {
    let plan = new_plan(ctx, version, base, ready, flags);
    ctx.out.line(&format!(
        "rolling out {version} in {} waves ({}); the other nodes stay on {}",
        plan.waves.len(),
        plan.waves
            .iter()
            .map(|w| w.len().to_string())
            .collect::<Vec<_>>()
            .join(" + "),
        shown(&base.value)
    ));
    let index = write_plan(ctx, &plan, left_behind)?;
    Ok((plan, index))
}

/// A plan of waves over `nodes`, its first wave started.
fn new_plan(
    ctx: &Ctx,
    version: &VersionName,
    base: &CurrentKey,
    nodes: &BTreeSet<String>,
    flags: &SwitchFlags,
) -> RolloutPlan {
    let waves = plan_waves(nodes, flags.canary, flags.batch);
    let mut how = Vec::new();
    if let Some(canary) = flags.canary {
        how.push(format!("-canary={canary}"));
    }
    if let Some(batch) = flags.batch {
        how.push(format!("-batch={batch}"));
    }
    RolloutPlan {
        version: version.to_string(),
        base: base.value.clone(),
        base_index: base.modify_index,
        switched: waves.first().into_iter().flatten().cloned().collect(),
        waves,
        started_waves: 1,
        by: Some(ctx.user.clone()),
        since: Some(crate::logging::timestamp()),
        how: Some(how.join(" ")),
        flags: Some(flags.repeated().trim().to_string()),
        paused: None,
        restart: None,
        message: ctx.message.clone(),
    }
}

/// Writes the plan by check-and-set on `index` (0: only if absent), with a
/// ring; returns its new index, or `None` when the plan's key moved
/// meanwhile (a denial is an error of its own, see `Ctx::write_ringing`).
pub(super) fn write_plan_if(ctx: &Ctx, plan: &RolloutPlan, index: u64) -> Result<Option<u64>> {
    let key = ctx.prefix.rollout_key();
    let value = plan.to_json();
    let op = TxnOp::Cas {
        key: &key,
        value: &value,
        index,
    };
    Ok(
        match ctx.write_ringing(&[op], Change::Wave(plan.target()))? {
            outcome @ TxnOutcome::Committed(_) => Some(outcome.index_of(&key).unwrap_or_default()),
            TxnOutcome::Rejected(_) => None,
        },
    )
}

/// [`write_plan_if`]; exit 5 if someone else changed the plan.
fn write_plan(ctx: &Ctx, plan: &RolloutPlan, index: u64) -> Result<u64> {
    write_plan_if(ctx, plan, index)?.ok_or_else(|| {
        Error::LostRace(format!(
            "another command started, changed or undid a progressive rollout under {} meanwhile; \
             check with `depro status -prefix={}`",
            ctx.prefix, ctx.prefix
        ))
    })
}

/// Why a wave did not complete.
enum Halt {
    Failed(Vec<String>, BTreeMap<String, crate::tree::FailReason>),
    /// `current` moved, or the plan was changed or undone by another command.
    Overtaken(String),
    /// The version was removed from the tree meanwhile.
    Removed,
    Timeout(usize),
    /// The -timeout ran out between waves (paused, or in -pause).
    Paused,
}

/// Waits until every node switched so far runs `version` (`active`); a
/// failed one halts the rollout.
/// `index` follows the plan's key, and `paused` its mark: a pause or a
/// resume changes them, not the rollout.
fn wait_wave(
    ctx: &mut Ctx,
    wait: &Wait<'_>,
    plan: &RolloutPlan,
    index: &mut u64,
    paused: &mut Option<String>,
    base_index: u64,
) -> Result<std::result::Result<(), Halt>> {
    let version = wait.version;
    let switched = &plan.switched;
    let also = Also {
        agents: false,
        rollout: true,
    };
    let mut active = 0;
    let outcome = ctx.follow_also(version, wait.deadline, also, |out, seen| {
        if !seen.info.exists {
            return Some(Err(Halt::Removed));
        }
        if seen.current.as_ref().map_or(0, |c| c.modify_index) != base_index {
            return Some(Err(Halt::Overtaken(format!(
                "current was changed to {} meanwhile",
                seen.current
                    .as_ref()
                    .map_or("unset".to_string(), |c| shown(&c.value))
            ))));
        }
        // A pause or a resume changes the plan's index, not the rollout.
        match &seen.rollout {
            Some((p, i)) if *i == *index || p.same_rollout(plan) => {
                *index = *i;
                paused.clone_from(&p.paused);
            }
            _ => {
                return Some(Err(Halt::Overtaken(
                    "the rollout was undone or replaced by another command meanwhile".into(),
                )));
            }
        }
        let failed = in_state(seen, switched, NodeState::Failed);
        if !failed.is_empty() {
            return Some(Err(Halt::Failed(failed, seen.info.reasons.clone())));
        }
        // Every switched node, also one whose agent is restarting (its key
        // is gone for a moment): it comes back and reports. For a restart,
        // only once it acknowledged this restart.
        let mut on = in_state(seen, switched, NodeState::Active);
        if let Some(id) = plan.restart {
            on.retain(|n| seen.info.restarted.get(n) == Some(&id));
        }
        active = on.len();
        let lagging = switched.iter().filter(|n| !on.contains(n));
        let left = switched.len() - active;
        out.count_lagging(
            &format!(
                "{active}/{} {}",
                switched.len(),
                match plan.restart {
                    Some(_) => "restarted",
                    None => "active",
                }
            ),
            left,
            lagging,
        );
        (active == switched.len()).then_some(Ok(()))
    })?;
    Ok(outcome.unwrap_or(Err(Halt::Timeout(active))))
}

/// The nodes among `nodes` that report the followed version in `state`.
fn in_state(seen: &super::Seen, nodes: &BTreeSet<String>, state: NodeState) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| seen.info.nodes.get(*n).map(|e| e.state) == Some(state))
        .cloned()
        .collect()
}

/// The first failure halts the rollout: say which nodes run what, and with
/// `-rollback-on-failure` undo the waves first.
fn halted(
    ctx: &mut Ctx,
    wait: &Wait<'_>,
    plan: &RolloutPlan,
    index: u64,
    wave: usize,
    why: Halt,
    flags: &SwitchFlags,
) -> Error {
    let version = wait.version;
    let base = shown(&plan.base);
    let at = format!(
        "the {} of {version} halted in wave {} of {}",
        match plan.restart {
            Some(_) => "restart",
            None => "rollout",
        },
        wave + 1,
        plan.waves.len()
    );
    let switched: Vec<String> = plan.switched.iter().cloned().collect();
    let (what, exit_timeout) = match why {
        Halt::Overtaken(what) => {
            return Error::LostRace(format!(
                "{at}: {what}; check with `depro status -prefix={}`",
                ctx.prefix
            ));
        }
        Halt::Removed => {
            // The agents ignore a plan for a version the tree lacks: the
            // switched nodes go back to current on their own. The plan goes
            // too, so that nothing offers to resume it.
            let key = ctx.prefix.rollout_key();
            let cleared = ctx
                .write_ringing(&[TxnOp::DeleteCas { key: &key, index }], Change::Wave(None))
                .is_ok_and(|o| matches!(o, TxnOutcome::Committed(_)));
            return Error::Refused(format!(
                "{at}: {version} was removed from the tree meanwhile (by another command); the \
                 nodes it had switched ({}) go back to {base}, which every node runs (current){}",
                names(&switched),
                if cleared {
                    String::new()
                } else {
                    format!(
                        "; {key} could not be cleared: `depro rollback -prefix={}` clears it",
                        ctx.prefix
                    )
                }
            ));
        }
        Halt::Failed(failed, reasons) => (
            format!("failed on {}", failed_nodes(&failed, &reasons)),
            false,
        ),
        Halt::Timeout(active) => (
            format!(
                "timed out with {active} of the {} {}",
                switched.len(),
                match plan.restart {
                    Some(_) =>
                        "nodes told to restart restarted (an agent of a depro \
                                without restarts never does)",
                    None => "switched nodes active",
                }
            ),
            true,
        ),
        Halt::Paused if plan.restart.is_some() => {
            return Error::Timeout(format!(
                "{at}: timed out between waves; the restart stays there ({} told to restart, \
                 current unchanged): go on with `depro resume -prefix={}`, or stop it there with \
                 `depro rollback -prefix={}`",
                names(&switched),
                ctx.prefix,
                ctx.prefix
            ));
        }
        Halt::Paused => {
            return Error::Timeout(format!(
                "{at}: timed out between waves{}; the rollout stays there ({} switched to \
                 {version}, every other node runs {base}): go on with `depro resume -prefix={}`, \
                 or undo with `depro rollback -prefix={}`",
                match &plan.paused {
                    Some(by) => format!(" (paused by {})", shown(by)),
                    None => String::new(),
                },
                names(&switched),
                ctx.prefix,
                ctx.prefix
            ));
        }
    };
    let rest = if plan.restart.is_some() {
        format!(
            "; {} were told to restart (the failed ones run what their hooks left), current \
             stays {version}; fix the cause and go on with `depro deploy {version} -prefix={}` \
             (it retries failed nodes and resumes the restart), or stop it there with `depro \
             rollback -prefix={}`",
            names(&switched),
            ctx.prefix,
            ctx.prefix
        )
    } else if flags.rollback_on_failure {
        match undo(
            ctx,
            plan,
            index,
            wait.deadline.max(Instant::now() + UNDO_PATIENCE),
        ) {
            Ok(()) => format!(
                "; rolled back: {base} runs again on {}, like on every other node; current stays {base}",
                names(&switched)
            ),
            Err(e) => format!("; the rollback did not complete: {e}"),
        }
    } else {
        format!(
            "; {} switched to {version} (the failed ones run what their hooks left), every other node \
             runs {base} (current); fix the cause and resume with `depro deploy {version} -prefix={}{}` \
             (it retries failed nodes), or undo with `depro rollback -prefix={}`",
            names(&switched),
            ctx.prefix,
            ctx.switch_flags,
            ctx.prefix
        )
    };
    let message = format!("{at}: {what}{rest}");
    if exit_timeout {
        Error::Timeout(message)
    } else {
        Error::Refused(message)
    }
}

/// How long an undo waits at least for the switched nodes to run the
/// previous version again, even when the command's -timeout has passed.
const UNDO_PATIENCE: Duration = Duration::from_secs(60);

/// Deletes the plan (check-and-set on `index`, with a ring) and waits until
/// every node it switched runs `current` again.
fn undo(ctx: &mut Ctx, plan: &RolloutPlan, index: u64, deadline: Instant) -> Result<()> {
    let key = ctx.prefix.rollout_key();
    let op = TxnOp::DeleteCas { key: &key, index };
    match ctx.write_ringing(&[op], Change::Wave(None))? {
        TxnOutcome::Committed(_) => {}
        TxnOutcome::Rejected(failures) => {
            if failures.iter().any(|f| f.conflict == Conflict::Denied) {
                return Err(Error::Refused(format!(
                    "the ACL token may not delete {key}"
                )));
            }
            return Err(Error::LostRace(format!(
                "{key} was changed by another command meanwhile; check with `depro status -prefix={}`",
                ctx.prefix
            )));
        }
    }
    if plan.restart.is_some() {
        // Nothing to go back to: the nodes it named restarted, or finish
        // the rollout hook they run (it is never stopped halfway).
        return Ok(());
    }
    super::interrupt::leaves(format!(
        "the rollout of {} is undone (current stays {}) and the nodes it had switched go on \
         rolling back; follow them with `depro status -prefix={}`",
        shown(&plan.version),
        shown(&plan.base),
        ctx.prefix
    ));
    ctx.out.line(&format!(
        "undoing the rollout of {}: back to {} on {}",
        shown(&plan.version),
        shown(&plan.base),
        names(&plan.switched.iter().cloned().collect::<Vec<_>>())
    ));
    let Ok(base) = VersionName::parse(&plan.base) else {
        return Ok(());
    };
    let switched = plan.switched.clone();
    let outcome = ctx.follow(&base, deadline, |out, seen| {
        let failed = in_state(seen, &switched, NodeState::Failed);
        if !failed.is_empty() {
            return Some(Err(failed_nodes(&failed, &seen.info.reasons)));
        }
        let back = in_state(seen, &switched, NodeState::Active).len();
        out.count(&format!("{back}/{} back on {base}", switched.len()));
        (back == switched.len()).then_some(Ok(()))
    })?;
    match outcome {
        Some(Ok(())) => Ok(()),
        Some(Err(failed)) => Err(Error::Refused(format!(
            "{base} failed on {failed} on the way back"
        ))),
        None => Err(Error::Timeout(format!(
            "not every switched node reports {base} active yet; check with `depro status -prefix={}`",
            ctx.prefix
        ))),
    }
}

/// `depro rollback` while a progressive rollout is under way: undo it,
/// and say what runs where.
pub(crate) fn undo_and_say(
    ctx: &mut Ctx,
    plan: &RolloutPlan,
    index: u64,
    start: Instant,
) -> Result<()> {
    let deadline = ctx.deadline;
    undo(ctx, plan, index, deadline)?;
    if plan.restart.is_some() {
        say!(
            "stopped the restart of {} under {} at wave {} of {}: {} were told to restart \
             (their rollout hook runs to its end), the other nodes were not; current is {} ({})",
            shown(&plan.version),
            ctx.prefix,
            plan.started_waves,
            plan.waves.len(),
            names(&plan.switched.iter().cloned().collect::<Vec<_>>()),
            shown(&plan.version),
            took(start)
        );
        return Ok(());
    }
    say!(
        "undid the rollout of {} under {} (it had started wave {} of {}): {} runs again on {}, like on \
         every other node; current is {} ({})",
        shown(&plan.version),
        ctx.prefix,
        plan.started_waves,
        plan.waves.len(),
        shown(&plan.base),
        names(&plan.switched.iter().cloned().collect::<Vec<_>>()),
        shown(&plan.base),
        took(start)
    );
    Ok(())
}
