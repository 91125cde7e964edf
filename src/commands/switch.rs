//! Carrying out a switch of `current`, and the guarantees it keeps:
//! - `current` moves only when at least N nodes have the version ready and
//!   no node that reported has failed ([`readiness`]);
//! - it moves by check-and-set against the value read at the start, in one
//!   transaction with the version's history, so of two racing operators
//!   exactly one wins;
//! - success means every node that had the version ready reports it active
//!   ([`confirmation`]).
//!
//! What to switch, and how, is decided in `switch_plan.rs`; this module
//! waits, writes and confirms, and says why a command refuses.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::switch_plan::Refusal;
use super::{Also, Ctx, Seen, interrupt, names, took};
use crate::cli::Need;
use crate::consul::{Conflict, TxnOp, TxnOutcome};
use crate::doorbell::Change;
use crate::error::{Error, Result};
use crate::tree::{CurrentKey, FailReason, NodeEntry, NodeState, Switch, VersionMeta, shown};
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
    let failed = crate::tree::nodes_in(nodes, NodeState::Failed);
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

pub(super) fn describe_current(current: Option<&CurrentKey>) -> String {
    match current {
        Some(c) => format!("still {}", shown(&c.value)),
        None => "still unset".to_string(),
    }
}

/// What a refusal says: exit 2, or 5 for another operator's rollout.
pub(super) fn refused(ctx: &Ctx, refusal: Refusal) -> Error {
    let prefix = &ctx.prefix;
    match refusal {
        Refusal::OtherUnderWay(plan) => Error::LostRace(format!(
            "a progressive rollout of {} is under way under {prefix} (wave {} of {}{}); finish it \
             with `depro rollout {} -prefix={prefix}` or undo it with `depro rollback \
             -prefix={prefix}` first",
            shown(&plan.version),
            plan.started_waves,
            plan.waves.len(),
            plan.by_whom(),
            shown(&plan.version),
        )),
        Refusal::CannotResume => Error::Refused(format!(
            "{} holds a progressive rollout that depro cannot resume (its waves are empty or it \
             names no started wave); undo it with `depro rollback -prefix={prefix}`",
            prefix.rollout_key(),
        )),
        // Under a prefix no agent follows (a typo, most often) it says so,
        // with the prefix meant, rather than suggest a deploy there.
        Refusal::NotInTree(version) if !ctx.followed().unwrap_or(true) => Error::Refused(format!(
            "{version} is not in the tree under {prefix}, and no agent follows that \
                 prefix{}: check -prefix",
            ctx.nearest_followed()
        )),
        Refusal::NotInTree(version) => Error::Refused(format!(
            "{version} is not in the tree under {prefix}; deploy it with `depro deploy {version} \
             -prefix={prefix}{}`",
            ctx.nodes_flag
        )),
        Refusal::NoBaseForWaves => Error::Refused(format!(
            "{prefix}/current is not set, so there is no version to keep on the nodes outside a \
             wave; roll out the first version to every node at once (without -canary or -batch, \
             or with -canary=0 -batch=0 against a policy of waves)"
        )),
        Refusal::NothingToRollBackFrom => Error::Refused(format!(
            "{prefix}/current is not set: there is nothing to roll back from"
        )),
        Refusal::NoGoodVersion(skipped) if skipped.is_empty() => Error::Refused(format!(
            "no earlier version of {prefix} is left to roll back to; `depro status \
             -prefix={prefix}` lists them"
        )),
        Refusal::NothingToRestart => Error::Refused(format!(
            "{prefix}/current does not name a version: there is nothing to restart"
        )),
        Refusal::NoneActive(version) => Error::Refused(format!(
            "no node runs {version} (reports it active) under {prefix}: there is nothing to \
             restart; see `depro status -prefix={prefix}`"
        )),
        Refusal::NoGoodVersion(skipped) => Error::Refused(format!(
            "no earlier version of {prefix} that ran well is left to roll back to ({}); to go \
             back to one of those anyway, name it: `depro rollback -to=VERSION -prefix={prefix}`",
            skipped
                .iter()
                .map(|(v, why)| format!("{v} {why}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// What the waits before and after the switch need to know.
pub(crate) struct Wait<'a> {
    pub version: &'a VersionName,
    pub need: Need,
    /// A floor under what `need` counts (`-min-nodes`; 0: none).
    pub min: u32,
    pub deadline: Instant,
    /// Nodes asked to retry, which must report again.
    pub retried: &'a BTreeSet<String>,
    /// `current` as read when the command started.
    pub base: Option<&'a CurrentKey>,
    /// End the wait (exit 5) as soon as someone else moves `current`.
    pub abort_if_current_moves: bool,
    /// The command, for the history: `deploy`, `rollout` or `rollback`.
    pub how: &'static str,
}

/// Failed nodes with what their agents reported: `node2 (the deploy hook
/// exited with status 3)`.
pub(super) fn failed_nodes(failed: &[String], reasons: &BTreeMap<String, FailReason>) -> String {
    let described: Vec<String> = failed
        .iter()
        .map(|node| match reasons.get(node) {
            Some(reason) if !reason.error.is_empty() => {
                format!("{node} ({})", crate::tree::shown_line(&reason.error))
            }
            _ => node.clone(),
        })
        .collect();
    names(&described)
}

/// Why a wait ended without the outcome it waited for.
enum Interrupted {
    /// These nodes failed, with what they reported.
    Failed(Vec<String>, BTreeMap<String, FailReason>),
    /// The version's key is gone: someone removed it. With `current` as
    /// then read.
    Removed(Option<CurrentKey>),
    /// `current` moved, to this.
    Moved(Option<CurrentKey>),
}

/// Waits for step 2; returns the nodes that have the version (as the
/// leader sees them: [`Ctx::follow`] confirms every decision there).
pub(super) fn wait_ready(ctx: &mut Ctx, wait: &Wait<'_>) -> Result<BTreeSet<String>> {
    let version = wait.version;
    let base_index = wait.base.map(|c| c.modify_index);
    let mut last = Readiness::Waiting {
        ready: 0,
        reported: 0,
    };
    let mut need = 0;
    // With -nodes=all or a share: the agents that have not reported yet.
    let mut missing: Vec<String> = Vec::new();
    // Nodes that reported the version and do not have it yet: the switch
    // waits for them even once enough others have it.
    let mut busy: Vec<String> = Vec::new();
    let also = Also {
        agents: wait.need.counts_agents(),
        rollout: false,
    };
    if let Need::Count(n) = wait.need {
        ctx.out.nodes_seen(n as usize);
    }
    // Agents that followed the prefix and are gone: -nodes=all does not
    // count them, and the progress says so.
    let known = match wait.need.counts_agents() {
        true => ctx.read_known()?,
        false => BTreeSet::new(),
    };
    let outcome = ctx.follow_also(version, wait.deadline, also, |out, seen: &Seen| {
        if !seen.info.exists {
            return Some(Err(Interrupted::Removed(seen.current.clone())));
        }
        if wait.abort_if_current_moves
            && seen.current.as_ref().map(|c| c.modify_index) != base_index
        {
            return Some(Err(Interrupted::Moved(seen.current.clone())));
        }
        let counted = wait.need.count(seen.agents.len());
        need = counted.max(wait.min);
        missing = seen
            .agents
            .keys()
            .filter(|n| !seen.info.nodes.get(*n).is_some_and(|e| e.state.has_it()))
            .cloned()
            .collect();
        last = readiness(&seen.info.nodes, need, wait.retried);
        let floor = if wait.min > counted {
            format!(", -min-nodes={}", wait.min)
        } else {
            String::new()
        };
        let absent: Vec<&String> = known
            .iter()
            .filter(|n| !seen.agents.contains_key(*n))
            .collect();
        let absent = match absent.len() {
            0 => String::new(),
            n => format!(
                ", {n} absent: {}{}",
                names(absent.iter().take(5).copied()),
                if n > 5 { ", …" } else { "" }
            ),
        };
        let needed = match wait.need {
            Need::Count(_) => format!("{need} needed"),
            other => format!(
                "-nodes={other} of {} agents{absent}{floor}: {need} needed",
                seen.agents.len()
            ),
        };
        let of = match wait.need {
            Need::Count(_) => String::new(),
            _ => format!(" ({needed})"),
        };
        match &last {
            Readiness::Waiting { ready, reported } => {
                // Lagging: nodes that reported and are still busy, and the
                // agents (with -nodes=all or a share) that have not.
                busy = crate::tree::nodes_in(&seen.info.nodes, NodeState::Busy);
                let lagging = busy
                    .iter()
                    .chain(missing.iter().filter(|n| !busy.contains(n)));
                // Every node that reported must have it too, not only the
                // count asked for.
                let must = (need as usize).max(*reported);
                let left = must.saturating_sub(*ready);
                let of = if must > need as usize {
                    format!(" ({needed}, and every node that reported)")
                } else {
                    of
                };
                out.count_lagging(&format!("{ready}/{must} ready{of}"), left, lagging);
                None
            }
            Readiness::Ready => {
                let ready = seen.info.nodes.len();
                out.count(&format!("{ready}/{} ready{of}", need.max(ready as u32)));
                Some(Ok(seen.info.nodes.keys().cloned().collect()))
            }
            Readiness::Failed(nodes) => Some(Err(Interrupted::Failed(
                nodes.clone(),
                seen.info.reasons.clone(),
            ))),
        }
    })?;
    match outcome {
        Some(Ok(nodes)) => Ok(nodes),
        Some(Err(why)) => Err(interrupted(ctx, wait, why)),
        None => {
            let (ready, reported) = match last {
                Readiness::Waiting { ready, reported } => (ready, reported),
                _ => (0, 0),
            };
            let lagging = if wait.need.counts_agents() && !missing.is_empty() {
                format!(
                    "; the agents without it: {}",
                    names(&missing.iter().map(|n| shown(n)).collect::<Vec<_>>())
                )
            } else {
                String::new()
            };
            let has = match ready {
                1 => "1 node has".to_string(),
                n => format!("{n} nodes have"),
            };
            let busy_names = names(&busy.iter().map(|n| shown(n)).collect::<Vec<_>>());
            let (head, check) = if ready >= need as usize && !busy.is_empty() {
                let is = if busy.len() == 1 { "is" } else { "are" };
                (
                    format!(
                        "{has} it ({need} needed), but {busy_names} reported it and {is} still \
                         busy: every node that reports a version must have it before current moves"
                    ),
                    format!("the agent on {busy_names}"),
                )
            } else {
                (
                    format!(
                        "{ready} of the {need} nodes needed have it ({reported} reported{lagging})"
                    ),
                    "the agents".to_string(),
                )
            };
            Err(Error::Timeout(format!(
                "timed out waiting for {version}: {head}; current unchanged ({}); check {check} \
                 (`depro status -prefix={}`) or use a longer -timeout",
                describe_current(wait.base),
                ctx.prefix
            )))
        }
    }
}

/// The error for a wait before the switch that ended early.
fn interrupted(ctx: &Ctx, wait: &Wait<'_>, why: Interrupted) -> Error {
    let version = wait.version;
    match why {
        Interrupted::Failed(failed, reasons) => Error::Refused(format!(
            "{version} failed on {}; current unchanged ({}); see the agent's log there \
             (journalctl -u depro), fix the hook, and run `depro deploy {version} -prefix={}{}` \
             again to retry",
            failed_nodes(&failed, &reasons),
            describe_current(wait.base),
            ctx.prefix,
            ctx.switch_flags
        )),
        Interrupted::Removed(now) => removed_before_switch(ctx, version, wait.base, now.as_ref()),
        Interrupted::Moved(now) => lost_race(
            ctx,
            version,
            now.as_ref(),
            "is not current (this command had not switched yet)",
        ),
    }
}

/// Exit 5: someone else moved `current`; says to what and, if the tree
/// records it, by whom.
fn lost_race(ctx: &Ctx, version: &VersionName, now: Option<&CurrentKey>, ours: &str) -> Error {
    let winner = now.map_or_else(|| "unset".to_string(), |c| shown(&c.value));
    let by = now
        .and_then(|c| switched_by(ctx, c))
        .map(|by| format!(" by {by}"))
        .unwrap_or_default();
    Error::LostRace(format!(
        "{}/current was changed to {winner}{by} while this command waited; {version} {ours}; \
         check with `depro status -prefix={}`, then `depro rollout {version} -prefix={}{}` if it should still win",
        ctx.prefix, ctx.prefix, ctx.prefix, ctx.nodes_flag
    ))
}

/// Who made `current` what it is, if depro recorded it in the same write.
fn switched_by(ctx: &Ctx, current: &CurrentKey) -> Option<String> {
    let version = current.version.as_ref()?;
    let entry = ctx.read_version_key(version).ok()??;
    (entry.modify_index == current.modify_index)
        .then(|| VersionMeta::parse(&entry.value).current_by)
        .flatten()
        .map(|by| shown(&by))
}

/// Steps 3 and 4. `finishing`: the progressive rollout whose last step
/// this switch is (its key and index, deleted in the same transaction).
pub(super) fn switch_and_confirm(
    ctx: &mut Ctx,
    wait: &Wait<'_>,
    expected: BTreeSet<String>,
    rollback_on_failure: bool,
    start: Instant,
    finishing: Option<u64>,
) -> Result<()> {
    let version = wait.version;
    let base = wait.base;
    let was = base.map(|c| shown(&c.value));
    let already = base.is_some_and(|c| c.version.as_ref() == Some(version));
    let ours = match base {
        Some(c) if already => {
            interrupt::leaves(format!(
                "{version} was already current; follow its nodes with `depro wait {version} \
                 -for=active -prefix={}{}`",
                ctx.prefix, ctx.nodes_flag
            ));
            c.modify_index
        }
        _ => {
            let how = match finishing {
                Some(_) => format!("{} (waves)", wait.how),
                None => wait.how.to_string(),
            };
            interrupt::leaves(format!(
                "current was being switched to {version}: `depro status -prefix={}` tells \
                 whether it was; if so, {}",
                ctx.prefix,
                ctx.back_to(base)
            ));
            let index = switch_current(ctx, version, base, wait.deadline, finishing, &how)?;
            ctx.leaves_rolling_out(version, base);
            ctx.out.line(&format!(
                "current: {} -> {version}",
                was.as_deref().unwrap_or("unset")
            ));
            index
        }
    };
    let mut last = Confirmation::Waiting { active: 0 };
    let total = expected.len();
    // Nodes whose key vanished with their agent's session since the switch.
    // They are still waited for: an agent that restarts (an upgrade, a
    // crash and `Restart=`) looks the same for a moment, and comes back.
    let mut gone: BTreeSet<String> = BTreeSet::new();
    let outcome = ctx.follow(version, wait.deadline, |out, seen| {
        if seen.current.as_ref().map(|c| c.modify_index) != Some(ours) {
            return Some(Err(Interrupted::Moved(seen.current.clone())));
        }
        gone = expected
            .iter()
            .filter(|n| !seen.info.nodes.contains_key(*n))
            .filter(|n| seen.vanished.get(*n) == Some(&super::Vanished::AgentGone))
            .cloned()
            .collect();
        last = confirmation(&seen.info.nodes, &expected);
        match &last {
            Confirmation::Waiting { active } => {
                let lagging = expected.iter().filter(|n| {
                    seen.info.nodes.get(*n).map(|e| e.state) != Some(NodeState::Active)
                });
                let left = total.saturating_sub(*active);
                out.count_lagging(&format!("{active}/{total} active"), left, lagging);
                None
            }
            Confirmation::Confirmed => {
                out.count(&format!("{total}/{total} active"));
                Some(Ok(()))
            }
            Confirmation::Failed(nodes) => Some(Err(Interrupted::Failed(
                nodes.clone(),
                seen.info.reasons.clone(),
            ))),
        }
    })?;
    match outcome {
        Some(Ok(())) if already => {
            say!(
                "{version} was already current under {} and is active on {total} nodes; nothing to do",
                ctx.prefix
            );
            Ok(())
        }
        Some(Ok(())) => {
            say!(
                "{version} is current under {} (was {}): active on {total}/{total} nodes in {}",
                ctx.prefix,
                was.as_deref().unwrap_or("unset"),
                took(start)
            );
            Ok(())
        }
        Some(Err(Interrupted::Moved(now))) => Err(lost_race(
            ctx,
            version,
            now.as_ref(),
            "was made current by this command, and its rollout was not confirmed",
        )),
        Some(Err(Interrupted::Removed(_))) => {
            unreachable!("only the wait before the switch ends on it")
        }
        Some(Err(Interrupted::Failed(failed, reasons))) => {
            let mut message = format!(
                "the rollout of {version} failed on {}",
                failed_nodes(&failed, &reasons)
            );
            if rollback_on_failure && !already {
                message.push_str(&restore_current(ctx, version, base, ours)?);
            } else {
                message.push_str(&format!(
                    "; current stays {version}; roll back with `depro rollback -prefix={}{}`",
                    ctx.prefix, ctx.nodes_flag
                ));
            }
            Err(Error::Refused(message))
        }
        None => Err(Error::Timeout(format!(
            "timed out waiting for the rollout of {version}: {} of {total} nodes active{}; current is {version}; \
             check the agents with `depro status -prefix={}`",
            match last {
                Confirmation::Waiting { active } => active,
                _ => 0,
            },
            if gone.is_empty() {
                String::new()
            } else {
                format!(
                    " (the agents of {} stopped during the rollout and have not come back)",
                    names(&gone)
                )
            },
            ctx.prefix
        ))),
    }
}

/// Step 3: one transaction that moves `current` by check-and-set against
/// `base` and records the history in the version's key by check-and-set
/// against the index read just before. So `current` moves only if nobody
/// moved it since the command started, and only to a version whose key
/// still exists, unchanged: a version removed meanwhile is never made
/// current, nor its key re-created. Returns `current`'s new ModifyIndex.
///
/// If the answer is lost (the connection drops, the leader changes), the
/// outcome is unknown: the command reads until it knows, and reports what
/// is true.
/// What an operation of the switch's transaction checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// `current` is as the command read it.
    Current,
    /// The version's key (its metadata) is as read.
    VersionKey,
    /// Nobody rang the doorbell since.
    Doorbell,
    /// `.history` is as read.
    History,
    /// The progressive rollout's plan is as left (its last step).
    Plan,
}

fn switch_current(
    ctx: &mut Ctx,
    version: &VersionName,
    base: Option<&CurrentKey>,
    deadline: Instant,
    finishing: Option<u64>,
    how: &str,
) -> Result<u64> {
    let base_index = base.map_or(0, |c| c.modify_index);
    let current_key = ctx.prefix.current_key();
    let rollout_key = ctx.prefix.rollout_key();
    let history_key = ctx.prefix.history_key();
    // A version's key changes when another command records its own
    // switch to it; a few rounds settle that.
    for _ in 0..5 {
        // The version's key alone: its metadata and index, nothing else.
        let Some(entry) = ctx.read_version_key(version)? else {
            let now = ctx.read_current().ok().flatten();
            return Err(removed_before_switch(ctx, version, base, now.as_ref()));
        };
        let (version_key, version_index) = (entry.key.clone(), entry.modify_index);
        let mut meta = VersionMeta::parse(&entry.value);
        let since = crate::logging::timestamp();
        meta.current_since = Some(since.clone());
        meta.current_by = Some(ctx.user.clone());
        meta.current_order = Some(base_index);
        meta.current_how = Some(how.to_string());
        meta.current_message = ctx.message.clone();
        let meta_json = meta.to_json();
        let (history, history_index) = ctx.read_history()?;
        let history = history
            .with(Switch {
                version: version.to_string(),
                from: base.map(|c| c.value.clone()).unwrap_or_default(),
                since,
                by: ctx.user.clone(),
                how: how.to_string(),
                message: ctx.message.clone().unwrap_or_default(),
                after: history_index,
            })
            .to_json();
        let bell = ctx.ring(Change::Switched(version.clone()))?;
        // Each operation with what it checks: a failure is read by that,
        // not by its position in the transaction.
        let mut checked = vec![
            (
                Check::Current,
                TxnOp::Cas {
                    key: &current_key,
                    value: version.as_str().as_bytes(),
                    index: base_index,
                },
            ),
            (
                Check::VersionKey,
                TxnOp::Cas {
                    key: &version_key,
                    value: &meta_json,
                    index: version_index,
                },
            ),
            // Agents whose watch of a missing `current` is paced (every
            // write anywhere wakes it) see the first switch at once.
            (Check::Doorbell, bell.op()),
            (
                Check::History,
                TxnOp::Cas {
                    key: &history_key,
                    value: &history,
                    index: history_index,
                },
            ),
        ];
        if let Some(index) = finishing {
            // The last step of a progressive rollout: its key goes in the
            // same transaction, and only if nobody changed it meanwhile.
            checked.push((
                Check::Plan,
                TxnOp::DeleteCas {
                    key: &rollout_key,
                    index,
                },
            ));
        }
        let ops: Vec<TxnOp<'_>> = checked.iter().map(|(_, op)| *op).collect();
        let failed = |outcome: &TxnOutcome, check: Check| match outcome {
            TxnOutcome::Rejected(failures) => failures
                .iter()
                .any(|f| checked.get(f.op).is_some_and(|(c, _)| *c == check)),
            TxnOutcome::Committed(_) => false,
        };
        let outcome = match ctx.consul.txn(&ops) {
            Ok(outcome) => outcome,
            Err(e) if e.is_transient() => {
                ctx.out.line(&format!(
                    "the answer to the switch was lost ({}); reading {current_key} to find out what happened",
                    e.summary()
                ));
                return settle_unknown_switch(ctx, version, base_index, deadline, finishing, how);
            }
            Err(e) => return Err(e.into()),
        };
        match outcome {
            TxnOutcome::Committed(_) => {
                return outcome.index_of(&current_key).ok_or_else(|| {
                    Error::Consul(Box::new(ctx.consul.unexpected(
                        format!("switching {current_key} to {version}"),
                        "the transaction's answer has no entry for current".into(),
                    )))
                });
            }
            TxnOutcome::Rejected(ref failures) => {
                if let Some(denied) = failures.iter().find(|f| f.conflict == Conflict::Denied) {
                    return Err(Error::Consul(Box::new(ctx.consul.denied(
                        format!("switching {current_key} to {version}"),
                        format!(
                            "{} (on {})",
                            denied.what,
                            ops.get(denied.op).map_or("the transaction", |op| op.key())
                        ),
                    ))));
                }
                if failed(&outcome, Check::Current) {
                    // `current` moved since the command started.
                    let now = ctx.read_current()?;
                    if let Some(index) = ours_after_all(ctx, version, base_index, now.as_ref())? {
                        return Ok(index);
                    }
                    return Err(lost_race(
                        ctx,
                        version,
                        now.as_ref(),
                        "is ready but not current",
                    ));
                }
                if failed(&outcome, Check::Plan) {
                    return Err(Error::LostRace(format!(
                        "the progressive rollout of {version} under {} was changed by another command \
                         (undone or replaced) before its last step; current unchanged; check with \
                         `depro status -prefix={}`",
                        ctx.prefix, ctx.prefix
                    )));
                }
                if [Check::VersionKey, Check::Doorbell, Check::History]
                    .into_iter()
                    .any(|check| failed(&outcome, check))
                {
                    // The version's key changed or went (read it again), or
                    // another command rang the doorbell first (ring again).
                    continue;
                }
                let what: Vec<&str> = failures.iter().map(|f| f.what.as_str()).collect();
                return Err(Error::Consul(Box::new(ctx.consul.unexpected(
                    format!("switching {current_key} to {version}"),
                    what.join("; "),
                ))));
            }
        }
    }
    Err(Error::LostRace(format!(
        "{version}'s key under {} kept changing while this command tried to make it current; \
         check with `depro status -prefix={}` and try again",
        ctx.prefix, ctx.prefix
    )))
}

/// The version was removed before the switch. `base` is `current` as the
/// command read it first, `now` as read when it found the version gone:
/// when the two differ (the whole tree went, as when Consul lost its
/// data), it says what it saw, not "unchanged".
fn removed_before_switch(
    ctx: &Ctx,
    version: &VersionName,
    base: Option<&CurrentKey>,
    now: Option<&CurrentKey>,
) -> Error {
    let was = base.map_or("unset".to_string(), |c| shown(&c.value));
    let current = match (base, now) {
        (Some(b), Some(n)) if b.modify_index == n.modify_index => describe_current(base),
        (None, None) => describe_current(None),
        (_, None) => format!(
            "current is unset now (it was {was} when this command started: did Consul lose its \
             data, or was the prefix deleted?)"
        ),
        (_, Some(n)) => format!(
            "current is {} now (it was {was} when this command started)",
            shown(&n.value)
        ),
    };
    let current = if current.starts_with("still") {
        format!("current unchanged ({current})")
    } else {
        current
    };
    Error::Refused(format!(
        "{version} was removed from {} while this command waited (by another operator?); \
         {current}; deploy it again with `depro deploy {version} -prefix={}{}` if it is still wanted",
        ctx.prefix, ctx.prefix, ctx.switch_flags
    ))
}

/// Whether `current` as read now is this command's own switch: it names
/// the version, and the version's key was written in the same transaction
/// (same ModifyIndex) with this command's base as its history.
fn ours_after_all(
    ctx: &Ctx,
    version: &VersionName,
    base_index: u64,
    now: Option<&CurrentKey>,
) -> Result<Option<u64>> {
    let Some(now) = now.filter(|c| c.version.as_ref() == Some(version)) else {
        return Ok(None);
    };
    let Some(entry) = ctx.read_version_key(version)? else {
        return Ok(None);
    };
    let meta = VersionMeta::parse(&entry.value);
    let same_write = entry.modify_index == now.modify_index;
    let from_our_base = meta.current_order == Some(base_index);
    let by_us = meta.current_by.as_deref() == Some(ctx.user.as_str());
    Ok((same_write && from_our_base && by_us).then_some(now.modify_index))
}

/// After a switch whose answer was lost: reads `current` from the leader
/// until Consul answers, then either the switch happened (go on), did not
/// happen (try it again: it is a check-and-set, so it cannot apply twice),
/// or someone else moved `current` (exit 5).
fn settle_unknown_switch(
    ctx: &mut Ctx,
    version: &VersionName,
    base_index: u64,
    deadline: Instant,
    finishing: Option<u64>,
    how: &str,
) -> Result<u64> {
    let mut backoff = crate::pacing::Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(5),
    );
    loop {
        match ctx.read_current() {
            Ok(now) => {
                if let Some(index) = ours_after_all(ctx, version, base_index, now.as_ref())? {
                    ctx.out
                        .line(&format!("the switch went through: current is {version}"));
                    return Ok(index);
                }
                let unchanged = now.as_ref().map_or(0, |c| c.modify_index) == base_index;
                if unchanged {
                    ctx.out.line("the switch did not happen; trying again");
                    let base = now.clone();
                    return switch_current(ctx, version, base.as_ref(), deadline, finishing, how);
                }
                return Err(lost_race(
                    ctx,
                    version,
                    now.as_ref(),
                    "is ready but not current",
                ));
            }
            Err(Error::Consul(e)) if e.is_transient() => {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout(format!(
                        "the switch of {}/current to {version} may or may not have happened: Consul did not answer \
                         before the deadline ({}); check with `depro status -prefix={}`",
                        ctx.prefix,
                        e.summary(),
                        ctx.prefix
                    )));
                }
                std::thread::sleep(backoff.next_delay());
            }
            Err(e) => return Err(e),
        }
    }
}

/// `-rollback-on-failure`: puts `current` back as it was, by check-and-set
/// against the index this command's own switch left, so another operator's
/// later switch is never overwritten.
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
    let was = base.map_or("unset".to_string(), |c| shown(&c.value));
    let restored = base.and_then(|c| VersionName::parse(&c.value).ok());
    interrupt::leaves(format!(
        "{version} failed and current was being switched back to {was}: `depro status \
         -prefix={}` tells whether it was; if not, {}",
        ctx.prefix,
        ctx.back_to(base)
    ));
    let mut outcome = None;
    let history_key = ctx.prefix.history_key();
    for _ in 0..5 {
        let bell = ctx.ring(Change::Restored(restored.clone()))?;
        let (history, history_index) = ctx.read_history()?;
        let history = history
            .with(Switch {
                version: base.map(|c| c.value.clone()).unwrap_or_default(),
                from: version.to_string(),
                since: crate::logging::timestamp(),
                by: ctx.user.clone(),
                how: "rollback-on-failure".into(),
                message: String::new(),
                after: history_index,
            })
            .to_json();
        let record = TxnOp::Cas {
            key: &history_key,
            value: &history,
            index: history_index,
        };
        let attempt = ctx.consul.txn(&[op, bell.op(), record])?;
        // Only the ring or the record failed: another command wrote first.
        if !matches!(&attempt, TxnOutcome::Rejected(f) if f.iter().all(|f| f.op >= 1)) {
            outcome = Some(attempt);
            break;
        }
    }
    let Some(outcome) = outcome else {
        return Err(ctx.bell_kept_ringing());
    };
    Ok(match outcome {
        TxnOutcome::Committed(_) => {
            ctx.out
                .line(&format!("current: {version} -> {was} (rolled back)"));
            format!("; current switched back to {was}")
        }
        TxnOutcome::Rejected(failures)
            if failures.iter().any(|f| f.conflict == Conflict::Denied) =>
        {
            format!("; current could not be switched back to {was}: the ACL token may not write it")
        }
        TxnOutcome::Rejected(_) => format!(
            "; current was changed by someone else meanwhile, so it was not switched back to {was}"
        ),
    })
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
                        since_ms: 0,
                        session: "s".into(),
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
