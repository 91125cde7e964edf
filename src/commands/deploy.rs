//! `deploy`, `rollout` and `rollback`: the commands that move `current`.
//! Each reads what it needs, decides with `switch_plan::decide`, and then
//! either carries the plan out (`switch.rs`, `waves.rs`) or, with
//! `-dry-run`, prints it (`dry_run.rs`): one decision for both.

use std::collections::BTreeSet;
use std::time::Instant;

use super::switch::{Wait, describe_current, refused, wait_ready};
use super::switch_plan::{
    Intent, Observed, Plan, SwitchPlan, Then, decide, in_effect, prune_after,
};
use super::{Ctx, interrupt, took, version_arg};
use crate::cli::{DeployArgs, RollbackArgs, RolloutArgs, SwitchFlags, parse_policy};
use crate::config::Env;
use crate::consul::{TxnOp, TxnOutcome};
use crate::doorbell::Change;
use crate::error::{Error, Result};
use crate::tree::{Tree, VersionMeta, shown};
use crate::version_name::VersionName;

pub(crate) fn deploy(args: DeployArgs, env: Env<'_>) -> Result<()> {
    let (tree, versions) = (args.tree.clone(), vec![args.version.clone()]);
    super::result::reported(
        "deploy",
        &tree,
        &versions,
        env,
        Box::new(|| deploy_now(args, env)),
    )
}

fn deploy_now(mut args: DeployArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let version = version_arg(&args.version)?;
    let start = Instant::now();
    ctx.deadline = start + args.switch.timeout;
    let intent = Intent::Deploy {
        version: version.clone(),
        no_rollout: args.no_rollout,
    };
    // current, the plan under way and this version's keys: nothing else of
    // the tree is needed.
    let seen = observe_version(&ctx, &version)?;
    resolve_flags(&mut ctx, &mut args.switch, &seen, Some(&version))?;
    let plan = decide(&intent, &args.switch, &seen).map_err(|r| refused(&ctx, r))?;
    let Plan::Switch(plan) = plan else {
        unreachable!("a deploy undoes nothing")
    };
    let artifact = artifact_of(
        args.artifact.take(),
        &ctx.prefix.to_string(),
        &version,
        &seen,
        plan.create,
    )?;
    if args.switch.dry_run {
        let prune = match args.keep {
            Some(keep) => prune_after(&ctx.read_tree()?, &version, keep),
            None => Vec::new(),
        };
        return super::dry_run::show_switch(&ctx, &plan, &seen, &args.switch, &prune);
    }
    interrupt::catch();
    let info = seen.tree.versions.get(&version);
    // A prefix no agent follows (a typo, most often) would have the
    // command wait its whole timeout: said at once, with the prefix meant.
    if info.is_none_or(|i| i.nodes.is_empty()) && !ctx.followed()? {
        ctx.out.line(&format!(
            "no agent follows {} (none announces itself under {}){}; waiting for one",
            ctx.prefix,
            ctx.prefix.agents_dir(),
            ctx.nearest_followed()
        ));
    }

    // 1. The version's folder key, and a retry for nodes that failed it.
    if plan.create {
        let meta = VersionMeta {
            created_at: Some(crate::logging::timestamp()),
            created_by: Some(ctx.user.clone()),
            artifact: artifact.clone(),
            ..VersionMeta::default()
        };
        let key = ctx.prefix.folder_key(&version);
        let meta = meta.to_json();
        let create = TxnOp::Cas {
            key: &key,
            value: &meta,
            index: 0,
        };
        // Rejected: someone created it first, which is as good.
        if let TxnOutcome::Committed(_) =
            ctx.write_ringing(&[create], Change::Created(version.clone()))?
        {
            ctx.out
                .line(&format!("created {version} under {}", ctx.prefix));
        }
    }
    let mut retried = BTreeSet::new();
    for (node, index) in &plan.retry {
        let key = ctx.prefix.node_key(&version, node);
        let reason = ctx.prefix.reason_key(&version, node);
        let delete = [
            TxnOp::DeleteCas {
                key: &key,
                index: *index,
            },
            TxnOp::Delete { key: &reason },
        ];
        let change = Change::Retried {
            version: version.clone(),
            node: node.clone(),
        };
        if let TxnOutcome::Committed(_) = ctx.write_ringing(&delete, change)? {
            ctx.out
                .line(&format!("{node}: failed before; asked it to try again"));
            retried.insert(node.clone());
        }
    }
    let base = plan.base.as_ref();
    interrupt::leaves(format!(
        "{version} stays under {} and the agents go on deploying it; current is unchanged \
         ({}); finish with `depro deploy {version} -prefix={}{}{}`, or drop it with \
         `depro remove {version} -prefix={}`",
        ctx.prefix,
        describe_current(base),
        ctx.prefix,
        ctx.switch_flags,
        if args.no_rollout { " -no-rollout" } else { "" },
        ctx.prefix
    ));

    // 2. Ready on enough nodes, failed on none.
    let wait = Wait {
        version: &version,
        need: args.switch.need(),
        min: args.switch.min_nodes,
        deadline: ctx.deadline,
        retried: &retried,
        base,
        // Without a switch to make, another operator's switch is not ours to mind.
        abort_if_current_moves: plan.then != Then::Stop,
        how: "deploy",
    };
    let ready_nodes = wait_ready(&mut ctx, &wait)?;
    if plan.then == Then::Stop {
        say!(
            "{version} is ready on {} nodes under {} ({}); current unchanged ({}); switch with `depro rollout {version} -prefix={}{}`",
            ready_nodes.len(),
            ctx.prefix,
            took(start),
            describe_current(base),
            ctx.prefix,
            ctx.nodes_flag
        );
        return Ok(());
    }

    // 3 and 4. Switch `current`, confirm the rollout.
    let resuming = matches!(plan.then, Then::Resume { .. });
    super::waves::switch(&mut ctx, &wait, ready_nodes, &args.switch, start, resuming)?;

    // 5. Keep only the newest versions.
    if let Some(keep) = args.keep {
        prune_to(&mut ctx, &version, keep)?;
    }
    Ok(())
}

pub(crate) fn rollout(args: RolloutArgs, env: Env<'_>) -> Result<()> {
    let (tree, versions) = (args.tree.clone(), vec![args.version.clone()]);
    super::result::reported(
        "rollout",
        &tree,
        &versions,
        env,
        Box::new(|| rollout_now(args, env)),
    )
}

fn rollout_now(mut args: RolloutArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let version = version_arg(&args.version)?;
    let start = Instant::now();
    ctx.deadline = start + args.switch.timeout;
    let intent = Intent::Rollout {
        version: version.clone(),
    };
    let seen = observe_version(&ctx, &version)?;
    resolve_flags(&mut ctx, &mut args.switch, &seen, Some(&version))?;
    let plan = decide(&intent, &args.switch, &seen).map_err(|r| refused(&ctx, r))?;
    let Plan::Switch(plan) = plan else {
        unreachable!("a rollout undoes nothing")
    };
    if args.switch.dry_run {
        return super::dry_run::show_switch(&ctx, &plan, &seen, &args.switch, &[]);
    }
    interrupt::catch();
    roll_to(&mut ctx, &plan, &args.switch, start, "rollout")
}

pub(crate) fn rollback(args: RollbackArgs, env: Env<'_>) -> Result<()> {
    let (tree, versions) = (
        args.tree.clone(),
        args.to.iter().cloned().collect::<Vec<_>>(),
    );
    super::result::reported(
        "rollback",
        &tree,
        &versions,
        env,
        Box::new(|| rollback_now(args, env)),
    )
}

fn rollback_now(mut args: RollbackArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    let to = args.to.as_deref().map(version_arg).transpose()?;
    let start = Instant::now();
    ctx.deadline = start + args.switch.timeout;
    let seen = Observed {
        tree: ctx.read_existing_tree()?,
    };
    // A rollback is the way out of a bad day: the policy's waves and gates
    // hold, but not its -promote=manual (a rollback that stops after its
    // first wave, exit 0, is not one), and a policy depro cannot read does
    // not stop it.
    let asked_promote = args.switch.given.contains("promote");
    resolve_flags(&mut ctx, &mut args.switch, &seen, None)?;
    if !asked_promote && args.switch.promote_manual {
        args.switch.promote_manual = false;
        ctx.hints_repeat(&args.switch);
    }
    let plan =
        decide(&Intent::Rollback { to }, &args.switch, &seen).map_err(|r| refused(&ctx, r))?;
    if args.switch.dry_run {
        return match plan {
            Plan::Undo { plan, index } => {
                super::dry_run::show_undo(&ctx, &plan, index);
                Ok(())
            }
            Plan::Switch(plan) => {
                super::dry_run::show_switch(&ctx, &plan, &seen, &args.switch, &[])
            }
        };
    }
    interrupt::catch();
    match plan {
        // A progressive rollout under way is undone, whatever it rolls out.
        Plan::Undo { plan, index } => super::waves::undo_and_say(&mut ctx, &plan, index, start),
        Plan::Switch(plan) => {
            ctx.out.line(&format!(
                "rolling back {} from {} to {}",
                ctx.prefix,
                plan.from.as_ref().map_or("", |f| f.as_str()),
                plan.version
            ));
            roll_to(&mut ctx, &plan, &args.switch, start, "rollback")
        }
    }
}

/// The artifact a deploy names (its digest computed from a local copy if
/// asked), checked against the one the version already has: a version's
/// artifact is fixed when it is created, so that every host runs the same
/// bytes.
fn artifact_of(
    given: Option<crate::cli::ArtifactArgs>,
    prefix: &str,
    version: &VersionName,
    seen: &Observed,
    create: bool,
) -> Result<Option<crate::artifact::Artifact>> {
    let artifact = match given {
        None => None,
        Some(args) => {
            let (mut sha256, mut size) = (args.sha256, args.size);
            let mut pieces = None;
            if let Some(file) = &args.file {
                let (digest, bytes, in_pieces) = crate::artifact::digest_file_in_pieces(file)
                    .map_err(|e| Error::Usage(format!("-artifact-file={}: {e}", file.display())))?;
                for (flag, given, computed) in [
                    ("-sha256", sha256.clone(), digest.clone()),
                    ("-size", size.map(|s| s.to_string()), bytes.to_string()),
                ] {
                    if given.as_ref().is_some_and(|g| *g != computed) {
                        return Err(Error::Usage(format!(
                            "{flag} does not match -artifact-file={} ({computed}); give one \
                             of them",
                            file.display()
                        )));
                    }
                }
                (sha256, size, pieces) = (Some(digest), Some(bytes), Some(in_pieces));
            }
            let mut artifact = crate::artifact::Artifact {
                url: args.url,
                sha256: sha256.unwrap_or_default(),
                size,
                pieces,
                origin_hosts: args.origin_hosts,
                ..crate::artifact::Artifact::default()
            };
            if let Some(key) = &args.sign {
                let message = crate::signing::message(prefix, version.as_str(), &artifact);
                artifact.signature = Some(
                    crate::signing::sign(key, &message)
                        .map_err(|e| Error::Usage(format!("-sign: {e}")))?,
                );
            }
            Some(artifact)
        }
    };
    if create {
        return Ok(artifact);
    }
    let has = seen
        .tree
        .versions
        .get(version)
        .and_then(|info| info.meta.artifact.clone());
    match (&artifact, &has) {
        (None, _) => Ok(None),
        // A signature given now that the version does not carry is not
        // dropped silently: the agents would refuse it again.
        (Some(a), Some(h))
            if a.sha256 == h.sha256
                && a.signature.is_some()
                && a.signature.as_ref().map(|s| &s.key) != h.signature.as_ref().map(|s| &s.key) =>
        {
            Err(Error::Refused(format!(
                "{version} exists already with this artifact {}: a version's artifact and its \
                 signature are fixed when it is created; deploy the build under a new version \
                 name, signed",
                match &h.signature {
                    Some(_) => "signed by another key",
                    None => "unsigned",
                }
            )))
        }
        (Some(a), Some(h)) if a.sha256 == h.sha256 => Ok(Some(h.clone())),
        (Some(a), has) => Err(Error::Refused(format!(
            "{version} exists already {}, not with sha256 {}: a version's artifact is fixed \
             when it is created; deploy it under a new version name",
            has.as_ref()
                .map_or("without an artifact".into(), |h| format!(
                    "with sha256 {}",
                    h.sha256
                )),
            a.sha256
        ))),
    }
}

/// The flags a command runs with: its own; then, resuming the progressive
/// rollout of `version`, the rollout's own (the same rollout, from any
/// machine); then the prefix's policy. The progress says what came from
/// where, and the hints repeat the result.
pub(super) fn resolve_flags(
    ctx: &mut Ctx,
    flags: &mut SwitchFlags,
    seen: &Observed,
    version: Option<&VersionName>,
) -> Result<()> {
    let own = flags.given.clone();
    if let Some(version) = version
        && let Some((plan, _)) = in_effect(seen.tree.rollout.as_ref(), seen.tree.current.as_ref())
        && plan.version == version.as_str()
        && let Some(stored) = plan.flags.as_deref().and_then(|f| parse_policy(f).ok())
    {
        let taken = flags.over(&stored);
        if !taken.is_empty() {
            ctx.out
                .line(&format!("resuming with the rollout's own flags: {taken}"));
        }
    }
    // A rollback (no version named here) goes on without a policy it
    // cannot read.
    if let Some((policy, stored)) = ctx.policy_flags(version.is_none())? {
        let taken = flags.over(&stored);
        let mut overridden = flags.clone();
        overridden
            .given
            .retain(|f| own.contains(f) && stored.given.contains(f));
        let overridden = overridden.policy_text();
        ctx.out.line(&format!(
            "policy of {} (set by {}{}): {}{}",
            ctx.prefix,
            shown(&policy.by),
            match policy.since.is_empty() {
                true => String::new(),
                false => format!(" at {}", shown(&policy.since)),
            },
            match taken.is_empty() {
                true => "none taken",
                false => &taken,
            },
            match overridden.is_empty() {
                true => String::new(),
                false => format!("; this command's own: {overridden}"),
            }
        ));
    }
    ctx.hints_repeat(flags);
    Ok(())
}

/// What `deploy` and `rollout` read before deciding: `current`, the plan
/// under way, and the version's keys.
fn observe_version(ctx: &Ctx, version: &VersionName) -> Result<Observed> {
    let mut tree = Tree {
        current: ctx.read_current()?,
        rollout: ctx.read_rollout()?,
        ..Tree::default()
    };
    tree.versions
        .insert(version.clone(), ctx.read_version(version)?);
    Ok(Observed { tree })
}

/// Steps 2 to 4 for a version that is already in the tree.
fn roll_to(
    ctx: &mut Ctx,
    plan: &SwitchPlan,
    switch: &SwitchFlags,
    start: Instant,
    how: &'static str,
) -> Result<()> {
    let wait = Wait {
        version: &plan.version,
        need: switch.need(),
        min: switch.min_nodes,
        deadline: start + switch.timeout,
        retried: &BTreeSet::new(),
        base: plan.base.as_ref(),
        abort_if_current_moves: true,
        how,
    };
    let ready = wait_ready(ctx, &wait)?;
    let resuming = matches!(plan.then, Then::Resume { .. });
    super::waves::switch(ctx, &wait, ready, switch, start, resuming)
}

/// `-keep=K` after a deploy: what `depro prune -keep=K` removes, now that
/// `version` is current (the dry run's `prune_after`, on the tree as read).
fn prune_to(ctx: &mut Ctx, version: &VersionName, keep: u32) -> Result<()> {
    let tree = ctx.read_tree()?;
    let doomed = prune_after(&tree, version, keep);
    let prefix = ctx.prefix.clone();
    let again = |_: &[VersionName]| format!("`depro prune -keep={keep} -prefix={prefix}`");
    super::remove::remove_each(ctx, &tree, &doomed, again)?;
    for version in doomed {
        ctx.out.line(&format!("pruned {version}"));
    }
    Ok(())
}
