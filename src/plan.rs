//! The reconcile decision: a pure function from what Consul wants, what the
//! disk has and what this node has reported, to the ordered actions that
//! bring them together. No I/O happens here; `agent` executes the actions.
//!
//! The agent executes only the first action of a plan, then plans again with
//! the new state, so each plan only has to be right about what comes first.
//! The order of a plan is:
//! 1. catch-up reports (node keys that do not match the local state yet) and
//!    the repair of `current`'s folder key: cheap facts, written first;
//! 2. the deploy of `current`, if this node lacks it;
//! 3. the rollout of `current`, once its deploy succeeded here: before any
//!    other deploy, so a rollback waits for nothing and a new host serves
//!    `current` as soon as it has it;
//! 4. deploys of the other versions this node lacks;
//! 5. the cleaning of versions that left the tree, never the live one.
//!
//! A deployment runs one hook at a time. While one runs, the agent takes
//! only the reports of a plan, and asks [`preempt`] whether the running
//! hook must give way: a deploy or clean hook stops for `current` (its
//! rollout or its deploy), a deploy stops when its version leaves the tree,
//! and health checks stop when `current` moves away. A stopped deploy is
//! deployed again later.
//!
//! Invariants (checked exhaustively by the tests below):
//! - a version is rolled out only when its deploy finished successfully;
//! - the live version, the one the node runs after an unsettled rollout
//!   (`switched`), and the target of an unsettled rollout, are never
//!   cleaned;
//! - a failed version is not retried by the plan (the agent turns an
//!   operator's retry into a state change first);
//! - executing plans with hooks that succeed converges: the disk holds
//!   exactly the wanted versions, `current` is live, reports match.

use std::collections::{BTreeMap, BTreeSet};

use crate::hooks::HookKind;
use crate::tree::NodeState;
use crate::version_name::VersionName;

/// What the Consul tree asks of this node, for one deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Wanted {
    /// Versions whose folder key (or plain key) exists.
    pub versions: BTreeSet<VersionName>,
    /// The version `<prefix>/current` names, if any (and if valid).
    pub current: Option<VersionName>,
    /// A missing folder key of `current` may be re-created (false while a
    /// repair is known to have been refused for this value of `current`).
    pub may_repair: bool,
    /// Versions gone from the listing that the agent could not confirm
    /// removed (Consul may hide keys the token may not read): kept on disk
    /// as they are, neither cleaned nor reported.
    pub kept: BTreeSet<VersionName>,
    /// A restart of `current` that names this node (`depro restart`): its
    /// id. The rollout hook of `current` runs once more for each new id.
    pub restart: Option<u64>,
}

/// The local state of one version directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LocalVersion {
    /// Recorded before the directory is made; the deploy has not finished.
    Deploying,
    /// The deploy hook succeeded.
    Ready,
    /// The deploy hook failed (in this run of the agent).
    DeployFailed,
}

/// A rollout that started and has not completed successfully (its hook
/// failed, its health checks did not pass or were cut short, or the agent
/// died meanwhile): what is live is unsettled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RolloutAttempt {
    pub to: VersionName,
}

/// What this node has on disk for one deployment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct OnDisk {
    /// Version directories depro created, and their state.
    pub versions: BTreeMap<VersionName, LocalVersion>,
    /// The version last rolled out successfully (`<path>/current`).
    pub live: Option<VersionName>,
    /// While set, the live state is unsettled: the rollout hook of `to` ran
    /// (or started) and did not finish successfully.
    pub rollout: Option<RolloutAttempt>,
    /// Versions whose rollout hook failed here (in this run of the agent):
    /// reported failed, and not rolled out again until an operator retries.
    pub rollout_failed: BTreeSet<VersionName>,
    /// The version whose rollout hook last succeeded here, when its rollout
    /// did not settle (its health checks failed or were cut short): the node
    /// runs it, whatever `live` says, until another rollout hook succeeds.
    pub switched: Option<VersionName>,
    /// The id of the last restart whose rollout settled here.
    pub restarted: Option<u64>,
}

impl OnDisk {
    /// The version the node runs now, as far as depro knows: the last one
    /// whose rollout hook succeeded here (even if its health checks then
    /// failed, and even if a later rollout hook failed), else the last
    /// version rolled out completely. A rollout hook sees it as
    /// `PREVIOUS_VERSION`.
    pub(crate) fn on_node(&self) -> Option<&VersionName> {
        self.switched.as_ref().or(self.live.as_ref())
    }
}

/// What this node has written to Consul, under its current session.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reports<'a> {
    /// No session: nothing can be reported, local work goes on.
    Offline,
    Online(&'a BTreeMap<VersionName, NodeState>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Write this node's key for the version.
    Report(VersionName, NodeState),
    /// Delete this node's key for the version (after cleaning it).
    Unreport(VersionName),
    /// Re-create `current`'s missing folder key (and so its node key).
    Repair(VersionName),
    /// Record that a deploy starts (before making the directory).
    Stage(VersionName),
    /// Make a fresh directory and run the deploy hook in it.
    Deploy(VersionName),
    /// Run the rollout hook to make `to` the live version.
    Rollout {
        to: VersionName,
        from: Option<VersionName>,
    },
    /// Run the clean hook and delete the directory.
    Clean(VersionName),
}

/// The state this node should report for a version it has on disk.
/// `switching`: a rollout is about to run, or one ran and did not finish
/// successfully. Then no version is `active` here: the live one is only
/// `ready`, so that nobody reads a node whose rollout hook has yet to run
/// (again) as running a version.
pub(crate) fn report_for(
    version: &VersionName,
    local: LocalVersion,
    disk: &OnDisk,
    switching: bool,
) -> NodeState {
    match local {
        LocalVersion::Deploying => NodeState::Busy,
        LocalVersion::DeployFailed => NodeState::Failed,
        LocalVersion::Ready => {
            if disk.rollout_failed.contains(version) {
                NodeState::Failed
            } else if disk.live.as_ref() == Some(version) && !switching {
                NodeState::Active
            } else {
                NodeState::Ready
            }
        }
    }
}

/// The rollout `current` needs here, if any: only once its deploy
/// succeeded, never one that failed here, and not when it is live already
/// (unless a restart this node has not run yet asks for it again).
fn rollout_of_current(wanted: &Wanted, disk: &OnDisk) -> Option<Action> {
    let current = wanted.current.as_ref()?;
    let ready = disk.versions.get(current) == Some(&LocalVersion::Ready);
    let settled = disk.rollout.is_none();
    let restart_due = wanted.restart.is_some() && wanted.restart != disk.restarted;
    let already_live = disk.live.as_ref() == Some(current) && settled && !restart_due;
    let failed_here = disk.rollout_failed.contains(current);
    (ready && !already_live && !failed_here).then(|| Action::Rollout {
        to: current.clone(),
        from: disk.on_node().cloned(),
    })
}

/// A hook that runs in a deployment, for [`preempt`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunningHook<'a> {
    pub kind: HookKind,
    pub version: &'a VersionName,
}

/// Why a running hook must stop now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Preempt {
    /// `current` is ready here and waits for its rollout (a rollback, say).
    ForRollout,
    /// `current` waits for its deploy.
    ForCurrent,
    /// Its version left the tree.
    Removed,
    /// `current` moved away from the version whose health it checks.
    CurrentMoved,
}

/// Whether the hook running in a deployment must give way (see the module
/// documentation). A rollout hook never does: stopping it halfway would
/// leave the node half-switched.
pub(crate) fn preempt(wanted: &Wanted, disk: &OnDisk, running: RunningHook<'_>) -> Option<Preempt> {
    let current = wanted.current.as_ref();
    match running.kind {
        HookKind::Rollout => None,
        HookKind::Health => (current != Some(running.version)).then_some(Preempt::CurrentMoved),
        HookKind::Deploy | HookKind::Clean => {
            if current == Some(running.version) {
                return None;
            }
            if running.kind == HookKind::Deploy && !wanted.versions.contains(running.version) {
                return Some(Preempt::Removed);
            }
            // A rollback or a switch is urgent; a restart of the live
            // version is not: it waits for the deployment like a deploy.
            let restart_only =
                current.is_some_and(|c| disk.live.as_ref() == Some(c)) && disk.rollout.is_none();
            if rollout_of_current(wanted, disk).is_some() && !restart_only {
                return Some(Preempt::ForRollout);
            }
            let lacks_current = current.is_some_and(|c| {
                matches!(disk.versions.get(c), None | Some(LocalVersion::Deploying))
            });
            lacks_current.then_some(Preempt::ForCurrent)
        }
    }
}

/// Decides what to do next; see the module documentation for the order.
/// Linear in the number of versions: the sets and maps are walked side by
/// side in their common order, never searched per version.
pub(crate) fn plan(wanted: &Wanted, disk: &OnDisk, reports: Reports<'_>) -> Vec<Action> {
    let mut actions = Vec::new();
    let rollout = rollout_of_current(wanted, disk);
    let switching = rollout.is_some() || disk.rollout.is_some();
    let is_current = |v: &VersionName| wanted.current.as_ref() == Some(v);

    // 1. Reports and repair. Only versions whose key exists are reported
    // (a node key is never written for a version the tree lacks); a key
    // is deleted only once its version left the disk.
    if let Reports::Online(reported) = reports {
        let mut changed: Vec<(&VersionName, NodeState)> = Vec::new();
        let mut gone: Vec<&VersionName> = Vec::new();
        let on_disk = side_by_side(
            disk.versions.iter(),
            wanted.versions.iter().map(|v| (v, ())),
        );
        let kept = on_disk.filter_map(|(v, local, listed)| Some((v, local?, listed?)));
        for (version, here, there) in side_by_side(kept.map(|(v, l, _)| (v, l)), reported.iter()) {
            match (here, there) {
                (Some(local), there) => {
                    let state = report_for(version, *local, disk, switching);
                    if there != Some(&state) {
                        changed.push((version, state));
                    }
                }
                (None, Some(_)) if !disk.versions.contains_key(version) => gone.push(version),
                (None, _) => {}
            }
        }
        // A new `active` goes first in its batch (one transaction anyway).
        changed.sort_by_key(|(v, state)| (*state != NodeState::Active, *v));
        actions.extend(
            changed
                .into_iter()
                .map(|(v, s)| Action::Report(v.clone(), s)),
        );
        actions.extend(gone.into_iter().map(|v| Action::Unreport(v.clone())));
        if let Some(current) = &wanted.current {
            let has_it = disk.versions.get(current) == Some(&LocalVersion::Ready);
            if has_it && !wanted.versions.contains(current) && wanted.may_repair {
                actions.push(Action::Repair(current.clone()));
            }
        }
    }

    // 2. The deploy of `current`; 3. its rollout.
    let deploy = |version: &VersionName| match disk.versions.get(version) {
        None => Some(Action::Stage(version.clone())),
        Some(LocalVersion::Deploying) => Some(Action::Deploy(version.clone())),
        Some(LocalVersion::Ready | LocalVersion::DeployFailed) => None,
    };
    actions.extend(wanted.current.iter().filter_map(deploy));
    actions.extend(rollout);

    // 4. The other deploys.
    for (version, listed, here) in side_by_side(
        wanted.versions.iter().map(|v| (v, ())),
        disk.versions.iter(),
    ) {
        if is_current(version) {
            continue;
        }
        match (listed, here) {
            (Some(()), None) => actions.push(Action::Stage(version.clone())),
            (Some(()), Some(LocalVersion::Deploying)) => {
                actions.push(Action::Deploy(version.clone()))
            }
            _ => {}
        }
    }

    // 5. Cleaning.
    for (version, here, listed) in side_by_side(
        disk.versions.iter(),
        wanted.versions.iter().map(|v| (v, ())),
    ) {
        let wanted_here = listed.is_some() || is_current(version) || wanted.kept.contains(version);
        let live = disk.live.as_ref() == Some(version) || disk.switched.as_ref() == Some(version);
        let rolling = disk.rollout.as_ref().is_some_and(|r| &r.to == version);
        if here.is_some() && !wanted_here && !live && !rolling {
            actions.push(Action::Clean(version.clone()));
        }
    }
    actions
}

/// Walks two sequences sorted by key (a `BTreeMap`'s or `BTreeSet`'s
/// order) side by side: each key once, with what each side has for it.
fn side_by_side<'a, K: Ord + 'a, A, B>(
    left: impl Iterator<Item = (&'a K, A)>,
    right: impl Iterator<Item = (&'a K, B)>,
) -> impl Iterator<Item = (&'a K, Option<A>, Option<B>)> {
    let (mut left, mut right) = (left.peekable(), right.peekable());
    std::iter::from_fn(move || match (left.peek(), right.peek()) {
        (None, None) => None,
        (Some(_), None) => left.next().map(|(k, a)| (k, Some(a), None)),
        (None, Some(_)) => right.next().map(|(k, b)| (k, None, Some(b))),
        (Some((l, _)), Some((r, _))) => match l.cmp(r) {
            std::cmp::Ordering::Less => left.next().map(|(k, a)| (k, Some(a), None)),
            std::cmp::Ordering::Greater => right.next().map(|(k, b)| (k, None, Some(b))),
            std::cmp::Ordering::Equal => {
                let (k, a) = left.next()?;
                let (_, b) = right.next()?;
                Some((k, Some(a), Some(b)))
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use LocalVersion::*;

    fn v(name: &str) -> VersionName {
        VersionName::parse(name).unwrap()
    }

    fn wanted(versions: &[&str], current: Option<&str>) -> Wanted {
        Wanted {
            versions: versions.iter().map(|n| v(n)).collect(),
            current: current.map(v),
            may_repair: true,
            kept: BTreeSet::new(),
            restart: None,
        }
    }

    fn disk(versions: &[(&str, LocalVersion)], live: Option<&str>) -> OnDisk {
        OnDisk {
            versions: versions.iter().map(|(n, s)| (v(n), *s)).collect(),
            live: live.map(v),
            rollout: None,
            rollout_failed: BTreeSet::new(),
            switched: None,
            restarted: None,
        }
    }

    fn reported(entries: &[(&str, NodeState)]) -> BTreeMap<VersionName, NodeState> {
        entries.iter().map(|(n, s)| (v(n), *s)).collect()
    }

    #[test]
    fn a_new_version_is_staged_then_reported_busy_then_deployed() {
        let want = wanted(&["v1"], None);
        let none = reported(&[]);
        assert_eq!(
            plan(&want, &disk(&[], None), Reports::Online(&none)),
            [Action::Stage(v("v1"))]
        );
        let staged = disk(&[("v1", Deploying)], None);
        assert_eq!(
            plan(&want, &staged, Reports::Online(&none)),
            [
                Action::Report(v("v1"), NodeState::Busy),
                Action::Deploy(v("v1"))
            ]
        );
        let busy = reported(&[("v1", NodeState::Busy)]);
        assert_eq!(
            plan(&want, &staged, Reports::Online(&busy)),
            [Action::Deploy(v("v1"))]
        );
        let done = disk(&[("v1", Ready)], None);
        assert_eq!(
            plan(&want, &done, Reports::Online(&busy)),
            [Action::Report(v("v1"), NodeState::Ready)]
        );
    }

    #[test]
    fn current_is_deployed_before_other_versions_then_rolled_out_then_old_ones_cleaned() {
        let want = wanted(&["a", "z"], Some("z"));
        let have = disk(&[("old", Ready)], Some("old"));
        assert_eq!(
            plan(&want, &have, Reports::Offline),
            [Action::Stage(v("z")), Action::Stage(v("a"))]
        );
        let have = disk(&[("old", Ready), ("z", Ready), ("a", Ready)], Some("old"));
        assert_eq!(
            plan(&want, &have, Reports::Offline),
            [Action::Rollout {
                to: v("z"),
                from: Some(v("old"))
            }]
        );
        let have = disk(&[("old", Ready), ("z", Ready), ("a", Ready)], Some("z"));
        assert_eq!(
            plan(&want, &have, Reports::Offline),
            [Action::Clean(v("old"))]
        );
    }

    #[test]
    fn a_version_is_rolled_out_only_after_its_deploy_succeeded() {
        let want = wanted(&["v2"], Some("v2"));
        for state in [Deploying, DeployFailed] {
            let have = disk(&[("v1", Ready), ("v2", state)], Some("v1"));
            let actions = plan(&want, &have, Reports::Offline);
            assert!(
                !actions.iter().any(|a| matches!(a, Action::Rollout { .. })),
                "{state:?}: {actions:?}"
            );
        }
    }

    #[test]
    fn the_live_version_is_never_cleaned_even_when_its_key_is_gone() {
        let want = wanted(&[], None);
        let have = disk(&[("v1", Ready)], Some("v1"));
        assert_eq!(plan(&want, &have, Reports::Offline), []);
    }

    #[test]
    fn a_failed_deploy_is_not_retried_and_reported_failed() {
        let want = wanted(&["v1"], Some("v1"));
        let have = disk(&[("v1", DeployFailed)], None);
        let none = reported(&[]);
        assert_eq!(
            plan(&want, &have, Reports::Online(&none)),
            [Action::Report(v("v1"), NodeState::Failed)]
        );
        let failed = reported(&[("v1", NodeState::Failed)]);
        assert_eq!(plan(&want, &have, Reports::Online(&failed)), []);
    }

    #[test]
    fn a_failed_rollout_is_reported_and_not_repeated_but_its_target_is_kept() {
        let want = wanted(&["v1", "v2"], Some("v2"));
        let mut have = disk(&[("v1", Ready), ("v2", Ready)], Some("v1"));
        have.rollout = Some(RolloutAttempt { to: v("v2") });
        have.rollout_failed.insert(v("v2"));
        let now = reported(&[("v1", NodeState::Active), ("v2", NodeState::Ready)]);
        assert_eq!(
            plan(&want, &have, Reports::Online(&now)),
            [
                Action::Report(v("v1"), NodeState::Ready),
                Action::Report(v("v2"), NodeState::Failed)
            ],
            "v1 is no longer active: the failed hook may have half-switched"
        );
        // Rolled back: v1 is rolled out again (the failed hook may have left
        // things half-switched), and v2 is kept until that has happened.
        let back = wanted(&["v1"], Some("v1"));
        assert_eq!(
            plan(&back, &have, Reports::Offline),
            [Action::Rollout {
                to: v("v1"),
                from: Some(v("v1"))
            }]
        );
        // While v1's rollout is pending, v1 is only ready...
        let now = reported(&[("v1", NodeState::Ready), ("v2", NodeState::Failed)]);
        assert_eq!(
            plan(&back, &have, Reports::Online(&now)),
            [Action::Rollout {
                to: v("v1"),
                from: Some(v("v1"))
            }]
        );
        // ...and active again once its hook ran. v2 stays failed until an
        // operator retries.
        have.rollout = None;
        let back = wanted(&["v1", "v2"], Some("v1"));
        assert_eq!(
            plan(&back, &have, Reports::Online(&now)),
            [Action::Report(v("v1"), NodeState::Active)]
        );
        let now = reported(&[("v1", NodeState::Active), ("v2", NodeState::Failed)]);
        assert_eq!(plan(&back, &have, Reports::Online(&now)), []);
    }

    #[test]
    fn before_a_rollout_runs_the_live_version_is_reported_ready_not_active() {
        let want = wanted(&["v1", "v2"], Some("v2"));
        let have = disk(&[("v1", Ready), ("v2", Ready)], Some("v1"));
        let now = reported(&[("v1", NodeState::Active), ("v2", NodeState::Ready)]);
        assert_eq!(
            plan(&want, &have, Reports::Online(&now)),
            [
                Action::Report(v("v1"), NodeState::Ready),
                Action::Rollout {
                    to: v("v2"),
                    from: Some(v("v1"))
                }
            ]
        );
    }

    #[test]
    fn an_interrupted_rollout_is_run_again() {
        let want = wanted(&["v2"], Some("v2"));
        let mut have = disk(&[("v1", Ready), ("v2", Ready)], Some("v1"));
        have.rollout = Some(RolloutAttempt { to: v("v2") });
        assert_eq!(
            plan(&want, &have, Reports::Offline),
            [Action::Rollout {
                to: v("v2"),
                from: Some(v("v1"))
            }]
        );
    }

    #[test]
    fn current_without_a_folder_key_is_repaired_by_nodes_that_have_it() {
        let want = wanted(&[], Some("v1"));
        let have = disk(&[("v1", Ready)], Some("v1"));
        let now = reported(&[("v1", NodeState::Active)]);
        assert_eq!(
            plan(&want, &have, Reports::Online(&now)),
            [Action::Repair(v("v1"))]
        );
        // A node that lacks it deploys it instead (and cannot repair).
        let empty = disk(&[], None);
        assert_eq!(
            plan(&want, &empty, Reports::Online(&now)),
            [Action::Unreport(v("v1")), Action::Stage(v("v1"))]
        );
    }

    #[test]
    fn a_repair_refused_for_this_current_is_not_tried_again() {
        let mut want = wanted(&[], Some("v1"));
        want.may_repair = false;
        let have = disk(&[("v1", Ready)], Some("v1"));
        let now = reported(&[("v1", NodeState::Active)]);
        assert_eq!(plan(&want, &have, Reports::Online(&now)), []);
    }

    #[test]
    fn no_node_key_is_written_for_a_version_the_tree_lacks() {
        // The tree lists none of the versions this node has.
        let want = wanted(&[], None);
        let have = disk(&[("v0", Ready), ("v1", Ready)], Some("v1"));
        let none = reported(&[]);
        assert_eq!(
            plan(&want, &have, Reports::Online(&none)),
            [Action::Clean(v("v0"))]
        );
        // A version on its way out keeps its key until it is cleaned.
        let want = wanted(&["v1"], Some("v1"));
        let now = reported(&[("v0", NodeState::Ready), ("v1", NodeState::Active)]);
        assert_eq!(
            plan(&want, &have, Reports::Online(&now)),
            [Action::Clean(v("v0"))]
        );
    }

    #[test]
    fn a_removed_version_is_cleaned_then_unreported() {
        let want = wanted(&["v2"], Some("v2"));
        let have = disk(&[("v1", Ready), ("v2", Ready)], Some("v2"));
        let now = reported(&[("v1", NodeState::Ready), ("v2", NodeState::Active)]);
        assert_eq!(
            plan(&want, &have, Reports::Online(&now)),
            [Action::Clean(v("v1"))]
        );
        let cleaned = disk(&[("v2", Ready)], Some("v2"));
        assert_eq!(
            plan(&want, &cleaned, Reports::Online(&now)),
            [Action::Unreport(v("v1"))]
        );
    }

    #[test]
    fn a_new_active_is_reported_first_in_its_batch() {
        let want = wanted(&["a", "b"], Some("b"));
        let have = disk(&[("a", Ready), ("b", Ready)], Some("b"));
        let now = reported(&[("a", NodeState::Active), ("b", NodeState::Ready)]);
        assert_eq!(
            plan(&want, &have, Reports::Online(&now)),
            [
                Action::Report(v("b"), NodeState::Active),
                Action::Report(v("a"), NodeState::Ready)
            ]
        );
    }

    // ---- exhaustive checks over a small universe ----

    const NAMES: [&str; 3] = ["a", "b", "c"];

    /// Every combination of wanted set, current, local states, live version
    /// and rollout attempt over three versions.
    fn universe() -> Vec<(Wanted, OnDisk)> {
        let names: Vec<VersionName> = NAMES.iter().map(|n| v(n)).collect();
        let maybe = |i: usize| {
            if i == 0 {
                None
            } else {
                Some(names[i - 1].clone())
            }
        };
        let mut cases = Vec::new();
        for wanted_bits in 0..8u32 {
            for current in 0..4 {
                for local_code in 0..64u32 {
                    for live in 0..4 {
                        for rollout in 0..24 {
                            let want = Wanted {
                                versions: (0..3)
                                    .filter(|i| wanted_bits & (1 << i) != 0)
                                    .map(|i| names[i].clone())
                                    .collect(),
                                current: maybe(current),
                                may_repair: true,
                                kept: if wanted_bits == 0 && rollout % 2 == 1 {
                                    BTreeSet::from([names[(local_code % 3) as usize].clone()])
                                } else {
                                    BTreeSet::new()
                                },
                                restart: (rollout % 3 == 0).then_some(7),
                            };
                            let mut have = OnDisk {
                                restarted: (local_code % 3 == 0).then_some(7),
                                ..OnDisk::default()
                            };
                            for (i, name) in names.iter().enumerate() {
                                let state = match (local_code >> (2 * i)) & 3 {
                                    0 => continue,
                                    1 => Deploying,
                                    2 => Ready,
                                    _ => DeployFailed,
                                };
                                have.versions.insert(name.clone(), state);
                            }
                            have.live =
                                maybe(live).filter(|l| have.versions.get(l) == Some(&Ready));
                            // A rollout is only ever attempted for a Ready version.
                            have.switched = match rollout / 12 {
                                0 => None,
                                _ => Some(names[rollout % 3].clone()),
                            }
                            .filter(|s| have.versions.get(s) == Some(&Ready));
                            have.rollout = match rollout % 4 {
                                0 => None,
                                n => Some(RolloutAttempt {
                                    to: names[n - 1].clone(),
                                }),
                            }
                            .filter(|r| have.versions.get(&r.to) == Some(&Ready));
                            have.rollout_failed = match (rollout % 12) / 4 {
                                0 => BTreeSet::new(),
                                1 => BTreeSet::from([names[0].clone()]),
                                _ => BTreeSet::from([names[1].clone(), names[2].clone()]),
                            };
                            have.rollout_failed
                                .retain(|f| have.versions.get(f) == Some(&Ready));
                            cases.push((want, have));
                        }
                    }
                }
            }
        }
        cases
    }

    #[test]
    fn no_plan_ever_breaks_the_invariants() {
        for (want, have) in universe() {
            let actions = plan(&want, &have, Reports::Offline);
            assert_eq!(
                actions,
                plan(&want, &have, Reports::Offline),
                "not deterministic"
            );
            for action in &actions {
                match action {
                    Action::Rollout { to, from } => {
                        assert_eq!(have.versions.get(to), Some(&Ready), "{want:?} {have:?}");
                        if have.live.as_ref() == Some(to) && have.rollout.is_none() {
                            assert!(
                                want.restart.is_some() && want.restart != have.restarted,
                                "rolled out the live version again without a new restart"
                            );
                        }
                        assert_eq!(from.as_ref(), have.on_node(), "PREVIOUS_VERSION");
                        assert!(
                            !have.rollout_failed.contains(to),
                            "retried a failed rollout"
                        );
                        assert_eq!(Some(to), want.current.as_ref());
                    }
                    Action::Clean(version) => {
                        assert_ne!(Some(version), have.live.as_ref(), "cleaned live: {have:?}");
                        assert_ne!(Some(version), have.switched.as_ref(), "cleaned what runs");
                        assert!(
                            !want.kept.contains(version),
                            "cleaned a version Consul hides"
                        );
                        assert_ne!(Some(version), want.current.as_ref());
                        assert!(!want.versions.contains(version));
                        assert!(have.rollout.as_ref().is_none_or(|r| &r.to != version));
                    }
                    Action::Stage(version) | Action::Deploy(version) => {
                        let wanted_here = want.versions.contains(version)
                            || want.current.as_ref() == Some(version);
                        assert!(wanted_here, "deploying an unwanted version");
                        assert_ne!(have.versions.get(version), Some(&DeployFailed), "retried");
                    }
                    Action::Report(..) | Action::Unreport(_) | Action::Repair(_) => {
                        panic!("reported while offline")
                    }
                }
            }
        }
    }

    #[test]
    fn a_running_hook_gives_way_exactly_when_current_needs_the_deployment() {
        let kinds = [
            HookKind::Deploy,
            HookKind::Rollout,
            HookKind::Health,
            HookKind::Clean,
        ];
        let names: Vec<VersionName> = NAMES.iter().map(|n| v(n)).collect();
        for (want, have) in universe() {
            // What the deployment would do first if nothing ran.
            let first_hook = plan(&want, &have, Reports::Offline)
                .into_iter()
                .find(|a| !matches!(a, Action::Stage(_)));
            for kind in kinds {
                for version in &names {
                    let running = RunningHook { kind, version };
                    let verdict = preempt(&want, &have, running);
                    let is_current = want.current.as_ref() == Some(version);
                    match kind {
                        HookKind::Rollout => assert_eq!(verdict, None),
                        HookKind::Health => {
                            assert_eq!(verdict.is_some(), !is_current, "{want:?} {running:?}");
                        }
                        HookKind::Deploy | HookKind::Clean => {
                            if is_current {
                                assert_eq!(verdict, None, "current's own deploy goes on");
                                continue;
                            }
                            let removed =
                                kind == HookKind::Deploy && !want.versions.contains(version);
                            assert_eq!(
                                verdict == Some(Preempt::Removed),
                                removed,
                                "{want:?} {running:?}"
                            );
                            // A rollout of current never waits for another
                            // version's deploy or clean (a restart of the
                            // live version does).
                            let restart_only = want.current.is_some()
                                && have.live == want.current
                                && have.rollout.is_none();
                            if matches!(first_hook, Some(Action::Rollout { .. })) && !restart_only {
                                assert!(verdict.is_some(), "{want:?} {have:?} {running:?}");
                            }
                            if verdict == Some(Preempt::ForRollout) {
                                assert!(matches!(first_hook, Some(Action::Rollout { .. })));
                                assert!(!restart_only, "a restart stopped a deploy");
                            }
                            if verdict == Some(Preempt::ForCurrent) {
                                let c = want.current.as_ref().unwrap();
                                assert!(matches!(have.versions.get(c), None | Some(Deploying)));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_restart_runs_the_live_version_s_rollout_hook_once_per_restart() {
        let mut want = wanted(&["v3"], Some("v3"));
        let mut have = disk(&[("v3", Ready)], Some("v3"));
        let active = reported(&[("v3", NodeState::Active)]);
        assert_eq!(plan(&want, &have, Reports::Online(&active)), []);
        want.restart = Some(7);
        // Reported `ready` (not running it as far as readers know) while
        // its rollout hook runs again, with itself as PREVIOUS_VERSION.
        assert_eq!(
            plan(&want, &have, Reports::Online(&active)),
            [
                Action::Report(v("v3"), NodeState::Ready),
                Action::Rollout {
                    to: v("v3"),
                    from: Some(v("v3"))
                }
            ]
        );
        // Once it settled for this restart: nothing more, and `active`.
        have.restarted = Some(7);
        let ready = reported(&[("v3", NodeState::Ready)]);
        assert_eq!(
            plan(&want, &have, Reports::Online(&ready)),
            [Action::Report(v("v3"), NodeState::Active)]
        );
        // A new restart runs it again; one that failed here waits for a retry.
        want.restart = Some(8);
        assert!(matches!(
            plan(&want, &have, Reports::Offline)[..],
            [Action::Rollout { .. }]
        ));
        have.rollout_failed.insert(v("v3"));
        have.rollout = Some(RolloutAttempt { to: v("v3") });
        assert_eq!(plan(&want, &have, Reports::Offline), []);
    }

    #[test]
    fn a_rollback_during_a_deploy_stops_it_rolls_out_then_deploys_it_again() {
        let want = wanted(&["v3", "v5"], Some("v3"));
        // v3 ready and live before; v5 being deployed; current moved back to
        // v3 after a failed switch to v4 (gone).
        let mut have = disk(&[("v3", Ready), ("v5", Deploying)], Some("v3"));
        have.rollout = Some(RolloutAttempt { to: v("v3") });
        let deploying = RunningHook {
            kind: HookKind::Deploy,
            version: &v("v5"),
        };
        assert_eq!(preempt(&want, &have, deploying), Some(Preempt::ForRollout));
        assert_eq!(
            plan(&want, &have, Reports::Offline),
            [
                Action::Rollout {
                    to: v("v3"),
                    from: Some(v("v3"))
                },
                Action::Deploy(v("v5"))
            ]
        );
    }

    #[test]
    fn a_fresh_host_rolls_out_current_before_deploying_the_other_versions() {
        let want = wanted(&["a", "b", "c"], Some("b"));
        let have = disk(&[("b", Ready)], None);
        assert_eq!(
            plan(&want, &have, Reports::Offline),
            [
                Action::Rollout {
                    to: v("b"),
                    from: None
                },
                Action::Stage(v("a")),
                Action::Stage(v("c"))
            ]
        );
    }

    #[test]
    fn previous_version_is_what_runs_on_the_node_after_a_failed_health_gate() {
        // v2's rollout hook switched the node, its health checks failed;
        // current goes back to v1: the rollback's hook is told v2 runs.
        let want = wanted(&["v1", "v2"], Some("v1"));
        let mut have = disk(&[("v1", Ready), ("v2", Ready)], Some("v1"));
        have.rollout = Some(RolloutAttempt { to: v("v2") });
        have.switched = Some(v("v2"));
        have.rollout_failed.insert(v("v2"));
        assert_eq!(
            plan(&want, &have, Reports::Offline),
            [Action::Rollout {
                to: v("v1"),
                from: Some(v("v2"))
            }]
        );
    }

    /// Applies an action as the agent would with hooks that all succeed.
    fn simulate(
        action: &Action,
        have: &mut OnDisk,
        reports: &mut BTreeMap<VersionName, NodeState>,
        want: &mut Wanted,
    ) {
        match action {
            Action::Report(version, state) => {
                reports.insert(version.clone(), *state);
            }
            Action::Unreport(version) => {
                reports.remove(version);
            }
            Action::Repair(version) => {
                want.versions.insert(version.clone());
            }
            Action::Stage(version) => {
                have.versions.insert(version.clone(), Deploying);
            }
            Action::Deploy(version) => {
                have.versions.insert(version.clone(), Ready);
            }
            Action::Rollout { to, .. } => {
                have.live = Some(to.clone());
                have.rollout = None;
                have.switched = None;
                if want.restart.is_some() {
                    have.restarted = want.restart;
                }
            }
            Action::Clean(version) => {
                have.versions.remove(version);
            }
        }
    }

    #[test]
    fn executing_plans_with_successful_hooks_always_converges() {
        for (want, have) in universe() {
            if have.versions.values().any(|s| *s == DeployFailed) {
                continue; // failures wait for an operator's retry
            }
            if want
                .current
                .as_ref()
                .is_some_and(|c| have.rollout_failed.contains(c))
            {
                continue; // so do failed rollouts of current
            }
            let (mut want, mut have, mut reports) = (want, have, BTreeMap::new());
            let mut steps = 0;
            loop {
                let actions = plan(&want, &have, Reports::Online(&reports));
                let Some(first) = actions.first() else { break };
                simulate(first, &mut have, &mut reports, &mut want);
                steps += 1;
                assert!(steps < 40, "no convergence: {want:?} {have:?} {actions:?}");
            }
            let mut expected: BTreeSet<VersionName> = want.versions.clone();
            expected.extend(want.current.clone());
            // Nothing but the wanted versions, plus the live one if its key is gone.
            let kept: BTreeSet<VersionName> = have.versions.keys().cloned().collect();
            let mut allowed = expected.clone();
            allowed.extend(have.live.clone());
            allowed.extend(have.switched.clone());
            allowed.extend(want.kept.iter().cloned());
            allowed.extend(have.rollout.as_ref().map(|r| r.to.clone()));
            assert!(
                kept.is_superset(&expected) && kept.is_subset(&allowed),
                "{want:?} {have:?}"
            );
            // A kept version stays as it was, even half-deployed.
            assert!(
                have.versions
                    .iter()
                    .all(|(v, s)| *s == Ready || want.kept.contains(v))
            );
            if want.current.is_some() {
                assert_eq!(have.live, want.current);
            }
            assert!(have.rollout.is_none() || want.current.is_none());
            for (version, local) in have
                .versions
                .iter()
                .filter(|(v, _)| want.versions.contains(*v))
            {
                assert_eq!(
                    reports.get(version),
                    Some(&report_for(version, *local, &have, have.rollout.is_some()))
                );
            }
        }
    }

    // ---- properties over random states ----

    /// xorshift: a seedable source of random states (no dependency).
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// A random (tree, disk, reports, session) state over up to six versions.
    fn random_state(rng: &mut Random) -> (Wanted, OnDisk, BTreeMap<VersionName, NodeState>, bool) {
        let count = 1 + rng.below(6) as usize;
        let names: Vec<VersionName> = (0..count).map(|i| v(&format!("v{i}"))).collect();
        let pick = |rng: &mut Random| names[rng.below(count as u64) as usize].clone();
        let want = Wanted {
            versions: names.iter().filter(|_| rng.chance(60)).cloned().collect(),
            current: rng.chance(80).then(|| pick(rng)),
            may_repair: rng.chance(80),
            kept: BTreeSet::new(),
            restart: rng.chance(20).then(|| 1 + rng.below(2)),
        };
        let mut have = OnDisk {
            restarted: rng.chance(30).then(|| 1 + rng.below(2)),
            ..OnDisk::default()
        };
        for name in &names {
            let state = match rng.below(5) {
                0 | 1 => continue,
                2 => Deploying,
                3 => Ready,
                _ => DeployFailed,
            };
            have.versions.insert(name.clone(), state);
        }
        let ready: Vec<VersionName> = have
            .versions
            .iter()
            .filter(|(_, s)| **s == Ready)
            .map(|(v, _)| v.clone())
            .collect();
        if !ready.is_empty() {
            let one = |rng: &mut Random| ready[rng.below(ready.len() as u64) as usize].clone();
            have.live = rng.chance(70).then(|| one(rng));
            have.rollout = rng.chance(20).then(|| RolloutAttempt { to: one(rng) });
            have.switched = rng.chance(20).then(|| one(rng));
            if rng.chance(20) {
                have.rollout_failed.insert(one(rng));
            }
        }
        let states = [
            NodeState::Busy,
            NodeState::Ready,
            NodeState::Active,
            NodeState::Failed,
        ];
        let mut reports = BTreeMap::new();
        for name in &names {
            if rng.chance(40) {
                reports.insert(name.clone(), states[rng.below(4) as usize]);
            }
        }
        (want, have, reports, rng.chance(80))
    }

    /// What must hold of any plan, whatever the state.
    fn check_plan(want: &Wanted, have: &OnDisk, actions: &[Action]) -> Result<(), String> {
        let rolling_out = actions.iter().any(|a| matches!(a, Action::Rollout { .. }));
        for action in actions {
            match action {
                Action::Rollout { to, .. } => {
                    if have.versions.get(to) != Some(&Ready) {
                        return Err(format!(
                            "rolled out {to}, which the disk does not fully have"
                        ));
                    }
                    // The live, settled version runs its rollout hook again
                    // only for a restart it has not run (once per id).
                    let settled_live = have.live.as_ref() == Some(to) && have.rollout.is_none();
                    if settled_live && (want.restart.is_none() || want.restart == have.restarted) {
                        return Err(format!("rolled out {to} again without a new restart"));
                    }
                    if have.rollout_failed.contains(to) || want.current.as_ref() != Some(to) {
                        return Err(format!("rolled out {to}, failed here or not current"));
                    }
                }
                Action::Clean(version) => {
                    let running = have.live.as_ref() == Some(version)
                        || have.switched.as_ref() == Some(version)
                        || have.rollout.as_ref().is_some_and(|r| &r.to == version);
                    if running {
                        return Err(format!(
                            "cleaned {version}, which runs (or is being switched to)"
                        ));
                    }
                    if want.versions.contains(version) || want.current.as_ref() == Some(version) {
                        return Err(format!("cleaned {version}, which the tree wants"));
                    }
                }
                Action::Report(version, state) => {
                    if !want.versions.contains(version) {
                        return Err(format!("reported {version}, whose key the tree lacks"));
                    }
                    let settled_live = have.live.as_ref() == Some(version)
                        && have.rollout.is_none()
                        && !rolling_out;
                    if *state == NodeState::Active && !settled_live {
                        return Err(format!("reported {version} active while still switching"));
                    }
                }
                Action::Stage(version) | Action::Deploy(version) => {
                    if have.versions.get(version) == Some(&DeployFailed) {
                        return Err(format!("retried {version} without an operator"));
                    }
                }
                Action::Unreport(version) => {
                    if have.versions.contains_key(version) {
                        return Err(format!("unreported {version} before cleaning it"));
                    }
                }
                Action::Repair(version) => {
                    if !want.may_repair || want.current.as_ref() != Some(version) {
                        return Err(format!("repaired {version} without leave"));
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn random_states_never_break_a_property_and_always_converge() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        let mut rng = Random(seed);
        for case in 0..20_000 {
            let (mut want, mut have, mut reports, online) = random_state(&mut rng);
            fn view(r: &BTreeMap<VersionName, NodeState>, online: bool) -> Reports<'_> {
                if online {
                    Reports::Online(r)
                } else {
                    Reports::Offline
                }
            }
            let actions = plan(&want, &have, view(&reports, online));
            if let Err(why) = check_plan(&want, &have, &actions) {
                panic!("seed {seed} case {case}: {why}\n{want:?}\n{have:?}\n{actions:?}");
            }
            // Run it with hooks that succeed, losing the session now and
            // then (every report is gone with it): it must converge.
            let stuck = have.versions.values().any(|s| *s == DeployFailed)
                || want
                    .current
                    .as_ref()
                    .is_some_and(|c| have.rollout_failed.contains(c));
            if stuck {
                continue; // failures wait for an operator's retry
            }
            let mut steps = 0;
            loop {
                let online = online || steps > 10;
                if rng.chance(3) {
                    reports.clear();
                }
                let actions = plan(&want, &have, view(&reports, online));
                if let Err(why) = check_plan(&want, &have, &actions) {
                    panic!("seed {seed} case {case} step {steps}: {why}\n{want:?}\n{have:?}");
                }
                let Some(first) = actions.first() else { break };
                simulate(first, &mut have, &mut reports, &mut want);
                steps += 1;
                assert!(steps < 200, "seed {seed} case {case}: no convergence");
            }
            if let Some(current) = &want.current {
                if have.versions.get(current) == Some(&Ready) {
                    assert_eq!(have.live.as_ref(), Some(current), "seed {seed} case {case}");
                }
            }
        }
    }
}
