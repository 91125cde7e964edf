//! `wait`: for scripts that started a deploy elsewhere (or let agents
//! bootstrap a new host): waits until a version is ready, or active, on
//! enough nodes, and fails at once, with the reasons, if one fails.

use std::time::Instant;

use super::switch::{Readiness, failed_nodes, readiness};
use super::{Also, Ctx, took, version_arg};
use crate::cli::{WaitArgs, WaitFor};
use crate::config::Env;
use crate::error::{Error, Result};
use crate::tree::NodeState;

pub(crate) fn wait(args: WaitArgs, env: Env<'_>) -> Result<()> {
    let (tree, versions) = (args.tree.clone(), vec![args.version.clone()]);
    super::result::reported(
        "wait",
        &tree,
        &versions,
        env,
        Box::new(|| wait_now(args, env)),
    )
}

fn wait_now(args: WaitArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let version = version_arg(&args.version)?;
    let start = Instant::now();
    let deadline = start + args.timeout;
    ctx.deadline = deadline;
    super::interrupt::catch();
    if let crate::cli::Need::Count(n) = args.nodes {
        ctx.out.nodes_seen(n as usize);
    }
    let also = Also {
        agents: args.nodes.counts_agents(),
        rollout: args.state == WaitFor::Active,
    };
    let word = match args.state {
        WaitFor::Ready => "ready",
        WaitFor::Active => "active",
    };
    let mut last = (0, 0);
    // Said once, and again if the wait times out: why it cannot end yet.
    let mut stuck: Option<String> = None;
    let prefix = ctx.prefix.clone();
    let outcome = ctx.follow_also(&version, deadline, also, |out, seen| {
        if !seen.info.exists {
            return Some(Err(Error::Refused(format!(
                "{version} is not in the tree under {prefix} (or was removed); deploy it with \
                 `depro deploy {version} -prefix={prefix}`"
            ))));
        }
        let need = args.nodes.count(seen.agents.len());
        let nodes = &seen.info.nodes;
        let failed = crate::tree::nodes_in(nodes, NodeState::Failed);
        if !failed.is_empty() {
            return Some(Err(Error::Refused(format!(
                "{version} failed on {}",
                failed_nodes(&failed, &seen.info.reasons)
            ))));
        }
        let (have, done) = match args.state {
            WaitFor::Ready => {
                let have = nodes.values().filter(|e| e.state.has_it()).count();
                let no_retries = std::collections::BTreeSet::new();
                (
                    have,
                    readiness(nodes, need, &no_retries) == Readiness::Ready,
                )
            }
            WaitFor::Active => {
                let have = crate::tree::nodes_in(nodes, NodeState::Active).len();
                (have, have >= need as usize)
            }
        };
        last = (have, need);
        // Every node that reported must have it for `ready`, so the count
        // is of those when more reported than needed.
        let must = match args.state {
            WaitFor::Ready => (need as usize).max(nodes.len()),
            WaitFor::Active => (need as usize).max(have),
        };
        out.count(&format!("{have}/{must} {word}"));
        if args.state == WaitFor::Active && !done {
            let is_current =
                seen.current.as_ref().and_then(|c| c.version.as_ref()) == Some(&version);
            let rolling_out = seen
                .rollout
                .as_ref()
                .is_some_and(|(plan, _)| plan.version == version.as_str());
            if is_current || rolling_out {
                stuck = None;
            } else if stuck.is_none() {
                let why = format!(
                    "{version} is not current and no rollout of it is under way: it becomes active \
                     once something makes it current (`depro rollout {version} -prefix={prefix}`)"
                );
                out.line(&why);
                stuck = Some(why);
            }
        }
        done.then_some(Ok(have))
    });
    match outcome? {
        Some(Ok(have)) => {
            say!(
                "{version} is {word} on {have} nodes under {prefix} ({})",
                took(start)
            );
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None => Err(Error::Timeout(match stuck {
            Some(why) => format!(
                "timed out: {version} is {word} on {} of the {} nodes needed under {prefix}; {why}",
                last.0, last.1
            ),
            None => format!(
                "timed out: {version} is {word} on {} of the {} nodes needed under {prefix}; \
                 check the agents with `depro status -prefix={prefix} {version}`",
                last.0, last.1
            ),
        })),
    }
}
