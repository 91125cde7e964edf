//! The switch engine's decisions, pure. Every command that moves `current`
//! (`deploy`, `rollout`, `rollback`; within them waves, a resume, an undo)
//! reads what it needs ([`Observed`]), then decides here what it will do
//! ([`decide`] → [`Plan`]). The real run carries the plan out (`deploy.rs`,
//! `waves.rs`, `switch.rs`); `-dry-run` prints the same plan (`dry_run.rs`),
//! so the two cannot drift. What the real run decides again later, on what
//! it reads then (at the switch: [`then_for`]; after it: [`prune_after`]),
//! it decides with the same functions.

use std::collections::BTreeSet;

use crate::cli::{Batch, SwitchFlags};
use crate::tree::{CurrentKey, NodeState, RolloutPlan, Tree, VersionInfo, nodes_in};
use crate::version_name::VersionName;

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Intent {
    /// `deploy V`: create V if needed, then (unless `no_rollout`) switch.
    Deploy {
        version: VersionName,
        no_rollout: bool,
    },
    /// `rollout V`: switch to V, which must be in the tree.
    Rollout { version: VersionName },
    /// `rollback [-to=V]`: undo a progressive rollout under way, or switch
    /// back to V or to the last good version before `current`.
    Rollback { to: Option<VersionName> },
}

/// What the command read before deciding. For `deploy` and `rollout`,
/// `tree` holds `current`, the rollout plan and the target version's keys;
/// for `rollback`, the whole tree.
#[derive(Clone, Debug, Default)]
pub(crate) struct Observed {
    pub tree: Tree,
}

/// Why a command refuses before writing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Another version's progressive rollout is under way (exit 5).
    OtherUnderWay(Box<RolloutPlan>),
    /// The plan under way for this version is not one depro can resume.
    CannotResume,
    /// The version to switch to is not in the tree.
    NotInTree(VersionName),
    /// `current` does not name a version: no base to keep outside a wave.
    NoBaseForWaves,
    /// `rollback` with `current` unset.
    NothingToRollBackFrom,
    /// `rollback` with no good version left; the others, and why not.
    NoGoodVersion(Vec<(VersionName, &'static str)>),
    /// `restart` with `current` unset (or naming no valid version).
    NothingToRestart,
    /// `restart` with no node running `current` (`active`) to restart.
    NoneActive(VersionName),
}

/// How `current` comes to name the version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Then {
    /// `-no-rollout`: stop once enough nodes have it ready.
    Stop,
    /// It is current already: wait for it to be active.
    AlreadyCurrent,
    /// Switch every node at once.
    AtOnce,
    /// Start waves drawn from the nodes ready at the switch.
    Waves,
    /// Go on with the progressive rollout of the version under way.
    Resume { plan: Box<RolloutPlan>, index: u64 },
}

/// A switch to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SwitchPlan {
    pub version: VersionName,
    /// `current` as read (the check-and-set's base).
    pub base: Option<CurrentKey>,
    /// For `rollback`: the version it goes back from.
    pub from: Option<VersionName>,
    /// The version's folder key is to be created.
    pub create: bool,
    /// Nodes that failed the version, asked to try again (their key's
    /// index, for the check-and-set delete).
    pub retry: Vec<(String, u64)>,
    pub then: Then,
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// `rollback` while a progressive rollout is under way: undo it.
    Undo {
        plan: RolloutPlan,
        index: u64,
    },
    Switch(SwitchPlan),
}

/// Decides what a command does with the tree it read.
pub(crate) fn decide(
    intent: &Intent,
    flags: &SwitchFlags,
    seen: &Observed,
) -> Result<Plan, Refusal> {
    let tree = &seen.tree;
    let base = tree.current.clone();
    let info = |v: &VersionName| tree.versions.get(v).cloned().unwrap_or_default();
    match intent {
        Intent::Deploy {
            version,
            no_rollout,
        } => {
            let info = info(version);
            let then = match no_rollout {
                true => Then::Stop,
                false => then_for(version, base.as_ref(), tree.rollout.as_ref(), flags)?,
            };
            Ok(Plan::Switch(SwitchPlan {
                version: version.clone(),
                base,
                from: None,
                create: !info.exists,
                retry: retries(&info),
                then,
            }))
        }
        Intent::Rollout { version } => {
            let then = then_for(version, base.as_ref(), tree.rollout.as_ref(), flags)?;
            if !info(version).exists {
                return Err(Refusal::NotInTree(version.clone()));
            }
            Ok(Plan::Switch(SwitchPlan {
                version: version.clone(),
                base,
                from: None,
                create: false,
                retry: Vec::new(),
                then,
            }))
        }
        Intent::Rollback { to } => {
            if let Some((plan, index)) = in_effect(tree.rollout.as_ref(), base.as_ref()) {
                return Ok(Plan::Undo {
                    plan: plan.clone(),
                    index,
                });
            }
            let (from, to) = rollback_target(tree, to.as_ref())?;
            if !info(&to).exists {
                return Err(Refusal::NotInTree(to));
            }
            let then = then_for(&to, base.as_ref(), tree.rollout.as_ref(), flags)?;
            Ok(Plan::Switch(SwitchPlan {
                version: to,
                base,
                from: Some(from),
                create: false,
                retry: Vec::new(),
                then,
            }))
        }
    }
}

/// The failed nodes of a version, which a deploy asks to try again.
fn retries(info: &VersionInfo) -> Vec<(String, u64)> {
    nodes_in(&info.nodes, NodeState::Failed)
        .into_iter()
        .map(|node| {
            let index = info.nodes[&node].modify_index;
            (node, index)
        })
        .collect()
}

/// The progressive rollout in `rollout`, if it still applies to `current`
/// (a switch of `current` ends a plan's effect).
pub(crate) fn in_effect<'a>(
    rollout: Option<&'a (RolloutPlan, u64)>,
    current: Option<&CurrentKey>,
) -> Option<(&'a RolloutPlan, u64)> {
    let current_index = current.map_or(0, |c| c.modify_index);
    rollout
        .filter(|(plan, _)| plan.applies_to(current_index))
        .map(|(plan, index)| (plan, *index))
}

/// How `current` comes to name `version`, given the plan under way (as read
/// at the start, and again at the switch).
pub(crate) fn then_for(
    version: &VersionName,
    base: Option<&CurrentKey>,
    rollout: Option<&(RolloutPlan, u64)>,
    flags: &SwitchFlags,
) -> Result<Then, Refusal> {
    match in_effect(rollout, base) {
        // The plan comes from Consul: one depro could not have written is
        // not resumed (nor indexed into), only undone.
        // (A plan of current to itself without its restart id is a restart
        // an older CLI rewrote: resumed as a rollout it would never end.)
        Some((plan, _))
            if plan.version == version.as_str()
                && (plan.waves.iter().any(Vec::is_empty)
                    || !(1..=plan.waves.len()).contains(&plan.started_waves)
                    || (plan.version == plan.base && plan.restart.is_none())) =>
        {
            Err(Refusal::CannotResume)
        }
        Some((plan, index)) if plan.version == version.as_str() => Ok(Then::Resume {
            plan: Box::new(plan.clone()),
            index,
        }),
        Some((plan, _)) => Err(Refusal::OtherUnderWay(Box::new(plan.clone()))),
        None if base.is_some_and(|c| c.version.as_ref() == Some(version)) => {
            Ok(Then::AlreadyCurrent)
        }
        None if !flags.progressive() => Ok(Then::AtOnce),
        None if base.is_none_or(|c| c.version.is_none()) => Err(Refusal::NoBaseForWaves),
        None => Ok(Then::Waves),
    }
}

/// `depro restart`: `current`'s rollout hook (and health checks) run again
/// on the nodes that run it, in waves, without moving `current`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RestartPlan {
    pub version: VersionName,
    /// `current` as read: the restart applies while it keeps its index.
    pub base: CurrentKey,
    /// The nodes that run it (`active`), to restart.
    pub nodes: BTreeSet<String>,
    /// A restart of it under way, resumed (its plan and the plan's index).
    pub resume: Option<(Box<RolloutPlan>, u64)>,
}

/// Decides a restart from `current`, the plan under way and `current`'s
/// version keys: a restart of `current` under way is resumed; any other
/// rollout under way is refused, as for a switch.
pub(crate) fn decide_restart(seen: &Observed) -> Result<RestartPlan, Refusal> {
    let tree = &seen.tree;
    let base = tree.current.clone().ok_or(Refusal::NothingToRestart)?;
    let version = base.version.clone().ok_or(Refusal::NothingToRestart)?;
    let resume = match in_effect(tree.rollout.as_ref(), Some(&base)) {
        Some((plan, index)) if plan.restart.is_some() && plan.version == version.as_str() => {
            match then_for(
                &version,
                Some(&base),
                tree.rollout.as_ref(),
                &SwitchFlags::default(),
            )? {
                Then::Resume { plan, index } => Some((plan, index)),
                _ => unreachable!("a plan of the version in effect is resumed: {index}"),
            }
        }
        Some((plan, _)) => return Err(Refusal::OtherUnderWay(Box::new(plan.clone()))),
        None => None,
    };
    let nodes: BTreeSet<String> = tree
        .versions
        .get(&version)
        .map(|info| {
            nodes_in(&info.nodes, NodeState::Active)
                .into_iter()
                .collect()
        })
        .unwrap_or_default();
    if nodes.is_empty() && resume.is_none() {
        return Err(Refusal::NoneActive(version));
    }
    Ok(RestartPlan {
        version,
        base,
        nodes,
        resume,
    })
}

/// What `rollback` switches from and to: `current`, and `to` or the last
/// good version before it.
pub(crate) fn rollback_target(
    tree: &Tree,
    to: Option<&VersionName>,
) -> Result<(VersionName, VersionName), Refusal> {
    let from = tree
        .current_version()
        .cloned()
        .ok_or(Refusal::NothingToRollBackFrom)?;
    if let Some(to) = to {
        return Ok((from, to.clone()));
    }
    match tree.previous() {
        Some(to) => Ok((from, to.clone())),
        None => Err(Refusal::NoGoodVersion(
            tree.versions
                .iter()
                .filter(|(v, i)| i.exists && *v != &from && !tree.is_good(v))
                .map(|(v, _)| {
                    let why = match tree.failed_everywhere(v) {
                        true => "failed everywhere",
                        false => "rolled back from",
                    };
                    (v.clone(), why)
                })
                .collect(),
        )),
    }
}

/// The waves for `nodes` (in name order): the canary first, then batches.
pub(crate) fn plan_waves(
    nodes: &BTreeSet<String>,
    canary: Option<u32>,
    batch: Option<Batch>,
) -> Vec<Vec<String>> {
    let all: Vec<String> = nodes.iter().cloned().collect();
    let mut waves = Vec::new();
    let mut rest: &[String] = &all;
    if let Some(canary) = canary {
        let n = (canary as usize).min(rest.len());
        waves.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    let size = batch.map_or(rest.len(), |b| b.of(all.len())).max(1);
    waves.extend(rest.chunks(size).map(<[String]>::to_vec));
    waves.retain(|w| !w.is_empty());
    waves
}

/// What `-keep=K` removes once `version` is current: the tree as it will be
/// after the switch (the dry run's), or as read after it (the real run's),
/// pruned as `depro prune -keep=K` would.
pub(crate) fn prune_after(tree: &Tree, version: &VersionName, keep: u32) -> Vec<VersionName> {
    if tree.current_version() == Some(version) {
        return tree.prune(keep as usize, false);
    }
    let mut after = tree.clone();
    let index = after.current.as_ref().map_or(0, |c| c.modify_index) + 1;
    let newest = after
        .versions
        .values()
        .map(|i| i.create_index)
        .max()
        .unwrap_or(0);
    after.current = Some(CurrentKey {
        value: version.to_string(),
        version: Some(version.clone()),
        modify_index: index,
    });
    let info = after.versions.entry(version.clone()).or_default();
    if !info.exists {
        info.exists = true;
        info.create_index = newest + 1;
    }
    info.meta.current_order = Some(index);
    after.prune(keep as usize, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{NodeEntry, VersionMeta};

    fn v(name: &str) -> VersionName {
        VersionName::parse(name).unwrap()
    }

    fn current(name: &str, index: u64) -> CurrentKey {
        CurrentKey {
            value: name.into(),
            version: VersionName::parse(name).ok(),
            modify_index: index,
        }
    }

    /// A tree of versions created in this order (each current once, in
    /// order, up to `current`), node states per version.
    fn tree(versions: &[(&str, &[NodeState])], current_is: Option<&str>) -> Tree {
        let mut tree = Tree::default();
        for (i, (name, states)) in versions.iter().enumerate() {
            let nodes = states
                .iter()
                .enumerate()
                .map(|(n, s)| {
                    (
                        format!("node{}", n + 1),
                        NodeEntry {
                            state: *s,
                            modify_index: 100 + n as u64,
                            since_ms: 0,
                            session: String::new(),
                        },
                    )
                })
                .collect();
            let order = current_is
                .and_then(|c| versions.iter().position(|(n, _)| *n == c))
                .filter(|&c| i <= c)
                .map(|_| 10 + i as u64);
            tree.versions.insert(
                v(name),
                VersionInfo {
                    exists: true,
                    create_index: 1 + i as u64,
                    meta: VersionMeta {
                        current_order: order,
                        ..VersionMeta::default()
                    },
                    nodes,
                    ..VersionInfo::default()
                },
            );
        }
        tree.current = current_is.map(|c| current(c, 50));
        tree
    }

    fn seen(tree: Tree) -> Observed {
        Observed { tree }
    }

    fn waves(canary: u32) -> SwitchFlags {
        SwitchFlags {
            canary: Some(canary),
            ..SwitchFlags::default()
        }
    }

    fn plan_of(version: &str, base: &str, started: usize) -> RolloutPlan {
        RolloutPlan {
            version: version.into(),
            base: base.into(),
            base_index: 50,
            waves: vec![vec!["node1".into()], vec!["node2".into()]],
            started_waves: started,
            switched: ["node1".to_string()].into(),
            ..RolloutPlan::default()
        }
    }

    use NodeState::*;

    fn switch(plan: Result<Plan, Refusal>) -> SwitchPlan {
        match plan {
            Ok(Plan::Switch(s)) => s,
            other => panic!("not a switch: {other:?}"),
        }
    }

    #[test]
    fn a_restart_restarts_the_nodes_that_run_current_and_resumes_its_own_plan_only() {
        let t = tree(&[("v1", &[Active, Failed, Active])], Some("v1"));
        let plan = decide_restart(&seen(t.clone())).unwrap();
        assert_eq!(plan.version, v("v1"));
        assert_eq!(
            plan.nodes,
            ["node1".to_string(), "node3".to_string()].into()
        );
        assert_eq!(plan.resume, None);
        // Its own plan under way is resumed.
        let mut restarting = t.clone();
        let under_way = RolloutPlan {
            restart: Some(7),
            ..plan_of("v1", "v1", 1)
        };
        restarting.rollout = Some((under_way.clone(), 60));
        let plan = decide_restart(&seen(restarting)).unwrap();
        assert_eq!(plan.resume, Some((Box::new(under_way), 60)));
        // Another rollout under way is refused; a stale one is not.
        let mut rolling = t.clone();
        rolling.rollout = Some((plan_of("v2", "v1", 1), 60));
        assert!(matches!(
            decide_restart(&seen(rolling.clone())),
            Err(Refusal::OtherUnderWay(_))
        ));
        rolling.rollout.as_mut().unwrap().0.base_index = 49;
        assert!(decide_restart(&seen(rolling)).is_ok());
        // A restart an older CLI rewrote without its id is not resumed as
        // a rollout of current to itself (which would never restart).
        let mut stripped = t.clone();
        stripped.rollout = Some((plan_of("v1", "v1", 1), 60));
        let rollout = Intent::Rollout { version: v("v1") };
        assert_eq!(
            decide(&rollout, &SwitchFlags::default(), &seen(stripped)),
            Err(Refusal::CannotResume)
        );
        // Nothing current, or nothing running it: nothing to restart.
        let unset = tree(&[("v1", &[Active])], None);
        assert_eq!(decide_restart(&seen(unset)), Err(Refusal::NothingToRestart));
        let none = tree(&[("v1", &[Ready, Failed])], Some("v1"));
        assert_eq!(
            decide_restart(&seen(none)),
            Err(Refusal::NoneActive(v("v1")))
        );
    }

    #[test]
    fn without_waves_asked_the_plan_is_one_wave_of_every_node_as_a_restart_needs() {
        let nodes: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        assert_eq!(plan_waves(&nodes, None, None), [["a", "b", "c"]]);
        assert_eq!(
            plan_waves(&nodes, Some(1), Some(Batch::Count(1))),
            [vec!["a"], vec!["b"], vec!["c"]]
        );
    }

    #[test]
    fn a_deploy_of_a_new_version_creates_it_and_switches_every_node_at_once() {
        let t = tree(&[("v1", &[Active, Active])], Some("v1"));
        let intent = Intent::Deploy {
            version: v("v2"),
            no_rollout: false,
        };
        let s = switch(decide(&intent, &SwitchFlags::default(), &seen(t)));
        assert!(s.create);
        assert_eq!(s.then, Then::AtOnce);
        assert_eq!(s.base, Some(current("v1", 50)));
    }

    #[test]
    fn a_deploy_asks_the_nodes_that_failed_to_try_again() {
        let t = tree(
            &[("v1", &[Active, Active]), ("v2", &[Ready, Failed])],
            Some("v1"),
        );
        let intent = Intent::Deploy {
            version: v("v2"),
            no_rollout: false,
        };
        let s = switch(decide(&intent, &SwitchFlags::default(), &seen(t)));
        assert!(!s.create);
        assert_eq!(s.retry, [("node2".to_string(), 101)]);
    }

    #[test]
    fn no_rollout_stops_at_ready_whatever_is_under_way() {
        let mut t = tree(&[("v1", &[Active, Active])], Some("v1"));
        t.rollout = Some((plan_of("v9", "v1", 1), 60));
        let intent = Intent::Deploy {
            version: v("v2"),
            no_rollout: true,
        };
        assert_eq!(
            switch(decide(&intent, &waves(1), &seen(t))).then,
            Then::Stop
        );
    }

    #[test]
    fn waves_need_a_current_version_to_keep_outside_them() {
        let t = tree(&[("v1", &[Ready])], None);
        let intent = Intent::Rollout { version: v("v1") };
        assert_eq!(
            decide(&intent, &waves(1), &seen(t.clone())),
            Err(Refusal::NoBaseForWaves)
        );
        // All at once needs none.
        assert_eq!(
            switch(decide(&intent, &SwitchFlags::default(), &seen(t))).then,
            Then::AtOnce
        );
    }

    #[test]
    fn a_rollout_under_way_of_the_same_version_is_resumed_not_switched_at_once() {
        let mut t = tree(
            &[("v1", &[Active, Active]), ("v2", &[Ready, Ready])],
            Some("v1"),
        );
        t.rollout = Some((plan_of("v2", "v1", 1), 60));
        let intent = Intent::Rollout { version: v("v2") };
        // Whatever the flags: the plan's waves go on.
        for flags in [SwitchFlags::default(), waves(1)] {
            assert_eq!(
                switch(decide(&intent, &flags, &seen(t.clone()))).then,
                Then::Resume {
                    plan: Box::new(plan_of("v2", "v1", 1)),
                    index: 60
                }
            );
        }
    }

    #[test]
    fn another_version_s_rollout_under_way_is_refused_and_a_stale_plan_is_not() {
        let mut t = tree(
            &[("v1", &[Active, Active]), ("v2", &[Ready, Ready])],
            Some("v1"),
        );
        t.rollout = Some((plan_of("v3", "v1", 1), 60));
        let intent = Intent::Rollout { version: v("v2") };
        assert_eq!(
            decide(&intent, &SwitchFlags::default(), &seen(t.clone())),
            Err(Refusal::OtherUnderWay(Box::new(plan_of("v3", "v1", 1))))
        );
        // A plan from before the last switch of current has no effect.
        t.current = Some(current("v1", 70));
        assert_eq!(
            switch(decide(&intent, &SwitchFlags::default(), &seen(t))).then,
            Then::AtOnce
        );
    }

    #[test]
    fn a_plan_depro_could_not_have_written_is_not_resumed() {
        let mut t = tree(&[("v1", &[Active]), ("v2", &[Ready])], Some("v1"));
        for started in [0, 3] {
            t.rollout = Some((plan_of("v2", "v1", started), 60));
            let intent = Intent::Rollout { version: v("v2") };
            assert_eq!(
                decide(&intent, &SwitchFlags::default(), &seen(t.clone())),
                Err(Refusal::CannotResume)
            );
        }
    }

    #[test]
    fn a_rollout_of_the_current_version_only_waits_for_it_to_be_active() {
        let t = tree(&[("v1", &[Active, Ready])], Some("v1"));
        let intent = Intent::Rollout { version: v("v1") };
        assert_eq!(
            switch(decide(&intent, &waves(1), &seen(t))).then,
            Then::AlreadyCurrent
        );
    }

    #[test]
    fn a_rollout_of_a_version_not_in_the_tree_is_refused() {
        let t = tree(&[("v1", &[Active])], Some("v1"));
        let intent = Intent::Rollout { version: v("v2") };
        assert_eq!(
            decide(&intent, &SwitchFlags::default(), &seen(t)),
            Err(Refusal::NotInTree(v("v2")))
        );
    }

    #[test]
    fn rollback_undoes_a_rollout_under_way_before_anything_else() {
        let mut t = tree(
            &[("v1", &[Active, Active]), ("v2", &[Ready, Active])],
            Some("v1"),
        );
        t.rollout = Some((plan_of("v2", "v1", 1), 60));
        let intent = Intent::Rollback { to: None };
        assert_eq!(
            decide(&intent, &SwitchFlags::default(), &seen(t)),
            Ok(Plan::Undo {
                plan: plan_of("v2", "v1", 1),
                index: 60
            })
        );
    }

    #[test]
    fn rollback_goes_to_the_last_good_version_or_names_the_ones_it_skips() {
        let t = tree(
            &[
                ("v1", &[Active, Active]),
                ("v2", &[Failed, Failed]),
                ("v3", &[Active, Active]),
            ],
            Some("v3"),
        );
        let intent = Intent::Rollback { to: None };
        let s = switch(decide(&intent, &SwitchFlags::default(), &seen(t.clone())));
        assert_eq!((s.from, s.version), (Some(v("v3")), v("v1")));
        // -to goes where it is told, good or not.
        let intent = Intent::Rollback { to: Some(v("v2")) };
        let s = switch(decide(&intent, &SwitchFlags::default(), &seen(t)));
        assert_eq!(s.version, v("v2"));

        let t = tree(&[("v2", &[Failed]), ("v3", &[Active])], Some("v3"));
        assert_eq!(
            decide(
                &Intent::Rollback { to: None },
                &SwitchFlags::default(),
                &seen(t)
            ),
            Err(Refusal::NoGoodVersion(vec![(v("v2"), "failed everywhere")]))
        );
        let t = tree(&[("v1", &[Active])], None);
        assert_eq!(
            decide(
                &Intent::Rollback { to: None },
                &SwitchFlags::default(),
                &seen(t)
            ),
            Err(Refusal::NothingToRollBackFrom)
        );
    }

    #[test]
    fn keep_prunes_the_tree_as_it_will_be_after_the_switch() {
        // v1 and v2, v2 current: deploying v3 with -keep=1 keeps v3
        // (current then) and v2 (previous then), and removes v1. Pruning the
        // tree as read, before the switch, would remove nothing.
        let t = tree(&[("v1", &[Active]), ("v2", &[Active])], Some("v2"));
        assert_eq!(t.prune(1, false), Vec::<VersionName>::new());
        assert_eq!(prune_after(&t, &v("v3"), 1), [v("v1")]);
        // Once v3 is current, pruning the tree as read gives the same.
        let after = tree(
            &[("v1", &[Active]), ("v2", &[Active]), ("v3", &[Active])],
            Some("v3"),
        );
        assert_eq!(prune_after(&after, &v("v3"), 1), [v("v1")]);
        // A rollout of an older version: it becomes current, the one it
        // replaces becomes the rollback target.
        let t = tree(
            &[("v1", &[Active]), ("v2", &[Active]), ("v3", &[Active])],
            Some("v3"),
        );
        assert_eq!(prune_after(&t, &v("v1"), 1), [v("v2")]);
    }

    fn nodes(n: usize) -> BTreeSet<String> {
        (1..=n).map(|i| format!("node{i:02}")).collect()
    }

    fn sizes(waves: &[Vec<String>]) -> Vec<usize> {
        waves.iter().map(Vec::len).collect()
    }

    #[test]
    fn a_canary_goes_first_then_batches_of_the_rest() {
        let waves = plan_waves(&nodes(10), Some(1), Some(Batch::Count(4)));
        assert_eq!(sizes(&waves), [1, 4, 4, 1]);
        assert_eq!(waves[0], ["node01"]);
        assert_eq!(waves[1][0], "node02");
    }

    #[test]
    fn a_share_is_of_the_whole_fleet_and_never_empty() {
        assert_eq!(
            sizes(&plan_waves(&nodes(10), None, Some(Batch::Share(25)))),
            [3, 3, 3, 1]
        );
        assert_eq!(
            sizes(&plan_waves(&nodes(3), None, Some(Batch::Share(1)))),
            [1, 1, 1]
        );
    }

    #[test]
    fn a_canary_alone_is_followed_by_everyone_else() {
        assert_eq!(sizes(&plan_waves(&nodes(5), Some(2), None)), [2, 3]);
        assert_eq!(sizes(&plan_waves(&nodes(2), Some(5), None)), [2]);
    }

    #[test]
    fn every_node_is_in_exactly_one_wave() {
        let all = nodes(17);
        let waves = plan_waves(&all, Some(2), Some(Batch::Share(30)));
        let flat: Vec<&String> = waves.iter().flatten().collect();
        assert_eq!(flat.len(), all.len());
        assert_eq!(flat.into_iter().cloned().collect::<BTreeSet<_>>(), all);
    }

    // ---- exhaustive checks over a small universe ----

    /// Every combination of: the intent (deploy, deploy -no-rollout,
    /// rollout, rollback, rollback -to), `current` (unset, v1, a value that
    /// is not a version), whether v2 exists, a plan (none, of v2, of v3,
    /// one no longer in effect, one depro cannot resume), and the flags (at
    /// once, or waves).
    #[test]
    fn every_decision_keeps_the_switch_rules() {
        let intents = [
            Intent::Deploy {
                version: v("v2"),
                no_rollout: false,
            },
            Intent::Deploy {
                version: v("v2"),
                no_rollout: true,
            },
            Intent::Rollout { version: v("v2") },
            Intent::Rollback { to: None },
            Intent::Rollback { to: Some(v("v2")) },
        ];
        let currents = [
            None,
            Some(current("v1", 50)),
            Some(current("bad value", 50)),
        ];
        let plans = [
            None,
            Some(plan_of("v2", "v1", 1)),
            Some(plan_of("v3", "v1", 1)),
            Some(RolloutPlan {
                base_index: 7,
                ..plan_of("v2", "v1", 1)
            }),
            Some(plan_of("v2", "v1", 0)),
        ];
        let mut checked = 0;
        for intent in &intents {
            for base in &currents {
                for v2_exists in [false, true] {
                    for plan in &plans {
                        for flags in [SwitchFlags::default(), waves(1)] {
                            let mut t = tree(&[("v1", &[Active, Active])], None);
                            if v2_exists {
                                t = tree(
                                    &[("v1", &[Active, Active]), ("v2", &[Ready, Ready])],
                                    None,
                                );
                            }
                            t.current = base.clone();
                            t.rollout = plan.clone().map(|p| (p, 60));
                            let index = base.as_ref().map_or(0, |c| c.modify_index);
                            let in_effect = plan.as_ref().filter(|p| p.applies_to(index));
                            let decision = decide(intent, &flags, &seen(t));
                            check(
                                intent,
                                base.as_ref(),
                                v2_exists,
                                in_effect,
                                &flags,
                                &decision,
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 5 * 3 * 2 * 5 * 2);
    }

    fn check(
        intent: &Intent,
        base: Option<&CurrentKey>,
        v2_exists: bool,
        in_effect: Option<&RolloutPlan>,
        flags: &SwitchFlags,
        decision: &Result<Plan, Refusal>,
    ) {
        let case =
            format!("{intent:?} current={base:?} v2={v2_exists} plan={in_effect:?} {flags:?}");
        // A rollback with a plan in effect undoes it, and nothing else does.
        let undo = matches!(intent, Intent::Rollback { .. }) && in_effect.is_some();
        assert_eq!(matches!(decision, Ok(Plan::Undo { .. })), undo, "{case}");
        let Ok(Plan::Switch(plan)) = decision else {
            return;
        };
        // A switch is never to a version not in the tree, but a deploy's
        // (which creates it).
        let deploy = matches!(intent, Intent::Deploy { .. });
        assert!(deploy || v2_exists || plan.version != v("v2"), "{case}");
        assert_eq!(
            plan.create,
            deploy && plan.version == v("v2") && !v2_exists,
            "{case}"
        );
        // The check-and-set base is current as read.
        assert_eq!(plan.base.as_ref(), base, "{case}");
        match &plan.then {
            // -no-rollout, and only it, stops at ready.
            Then::Stop => assert!(
                matches!(
                    intent,
                    Intent::Deploy {
                        no_rollout: true,
                        ..
                    }
                ),
                "{case}"
            ),
            // Waves keep the version current names outside them.
            Then::Waves => {
                assert!(base.is_some_and(|c| c.version.is_some()), "{case}");
                assert!(flags.progressive() && in_effect.is_none(), "{case}");
            }
            // Only the plan of this very version is resumed, whatever the
            // flags, and only one depro could have written.
            Then::Resume { plan: resumed, .. } => {
                assert_eq!(resumed.version, plan.version.as_str(), "{case}");
                assert_eq!(Some(resumed.as_ref()), in_effect, "{case}");
                assert!(
                    (1..=resumed.waves.len()).contains(&resumed.started_waves),
                    "{case}"
                );
            }
            Then::AlreadyCurrent => {
                assert_eq!(
                    base.and_then(|c| c.version.as_ref()),
                    Some(&plan.version),
                    "{case}"
                )
            }
            Then::AtOnce => assert!(!flags.progressive() && in_effect.is_none(), "{case}"),
        }
        // Another version's rollout in effect is never switched over.
        if let Some(other) = in_effect
            && plan.then != Then::Stop
        {
            assert_eq!(other.version, plan.version.as_str(), "{case}");
        }
    }
}
