//! `policy`: the prefix's rollout policy, kept in the tree
//! (`<prefix>/.policy`) so that every switch follows it, whoever runs it
//! and wherever: a deploy script, a retry pasted from a hint, a resume from
//! another machine. Each policy flag a command does not give is the
//! policy's (`Ctx::take_policy`); set by check-and-set, and recorded in
//! `.history`.

use super::Ctx;
use crate::cli::PolicyArgs;
use crate::config::Env;
use crate::consul::{Conflict, TxnOp, TxnOutcome};
use crate::error::{Error, Result};
use crate::tree::{Policy, shown};

/// How often a write that lost only to a switch recording its history
/// (not to another change of the policy) is tried again.
const TRIES: usize = 5;

pub(crate) fn policy(args: PolicyArgs, env: Env<'_>) -> Result<()> {
    let ctx = Ctx::resolve(&args.tree, env)?;
    let flags = args.switch.policy_text();
    if flags.is_empty() && !args.clear {
        println!("{}", describe(&ctx, ctx.read_policy()?.map(|(p, _)| p)));
        return Ok(());
    }
    if !ctx.followed()? {
        ctx.out.line(&format!(
            "no agent follows {} yet{}",
            ctx.prefix,
            ctx.nearest_followed()
        ));
    }
    let key = ctx.prefix.policy_key();
    let history_key = ctx.prefix.history_key();
    for _ in 0..TRIES {
        let answer = ctx.retrying(|c| c.get(&key, crate::consul::Read::consistent()))?;
        let (was, index) = answer.value.map_or((None, 0), |e| {
            (
                Policy::parse(&e.value).filter(|p| !p.flags.is_empty()),
                e.modify_index,
            )
        });
        if args.clear && was.is_none() {
            println!("{}: no rollout policy to clear", ctx.prefix);
            return Ok(());
        }
        let (history, history_index) = ctx.read_history()?;
        let new = Policy {
            flags: flags.clone(),
            by: ctx.user.clone(),
            since: crate::logging::timestamp(),
            message: args.switch.message.clone().unwrap_or_default(),
            after: history_index,
        };
        let value = new.to_json();
        let recorded = history.with_policy(new).to_json();
        let write = match args.clear {
            true => TxnOp::DeleteCas { key: &key, index },
            false => TxnOp::Cas {
                key: &key,
                value: &value,
                index,
            },
        };
        let record = TxnOp::Cas {
            key: &history_key,
            value: &recorded,
            index: history_index,
        };
        let ops = [write, record];
        match ctx.retrying(|c| c.txn(&ops))? {
            TxnOutcome::Committed(_) => {
                let was = was.map_or("none".to_string(), |p| shown(&p.flags));
                match args.clear {
                    true => println!("{}: rollout policy cleared (was: {was})", ctx.prefix),
                    false => println!("{}: rollout policy {flags} (was: {was})", ctx.prefix),
                }
                return Ok(());
            }
            TxnOutcome::Rejected(failures) => {
                if let Some(denied) = failures.iter().find(|f| f.conflict == Conflict::Denied) {
                    return Err(Error::Consul(Box::new(ctx.consul.denied(
                        format!(
                            "writing {:?}",
                            ops.get(denied.op).map_or(key.as_str(), |op| op.key())
                        ),
                        denied.what.clone(),
                    ))));
                }
                if failures
                    .iter()
                    .any(|f| ops.get(f.op).is_none_or(|op| op.key() == key))
                {
                    return Err(Error::LostRace(format!(
                        "someone changed the rollout policy of {} meanwhile; see it with `depro \
                         policy -prefix={}` and run this again if it still applies",
                        ctx.prefix, ctx.prefix
                    )));
                }
                // Only the history moved (a switch recorded itself): again.
            }
        }
    }
    Err(Error::LostRace(format!(
        "{} kept changing while this command tried to record the policy; try again",
        history_key
    )))
}

/// `api/version: rollout policy -nodes=all -canary=1 (set by ops at …: why)`.
fn describe(ctx: &Ctx, policy: Option<Policy>) -> String {
    match policy {
        None => format!(
            "{}: no rollout policy; each command's flags (and their defaults) decide",
            ctx.prefix
        ),
        Some(p) => format!(
            "{}: rollout policy {} (set by {} at {}{})",
            ctx.prefix,
            shown(&p.flags),
            shown(&p.by),
            shown(&p.since),
            if p.message.is_empty() {
                String::new()
            } else {
                format!(": {}", crate::tree::shown_line(&p.message))
            }
        ),
    }
}
