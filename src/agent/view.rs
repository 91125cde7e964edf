//! The agent's view of one deployment's tree, and how observations update
//! it. Pure: the watches observe, this decides what the tree wants.
//!
//! Two observations feed it: a snapshot of the tree (which versions exist,
//! from a listing plus one read of their keys) and `current` (its value and
//! ModifyIndex). Until both have been seen, nothing is wanted: the agent
//! does nothing rather than act on half a view. Nor does it act on an empty
//! prefix: Consul answers the same for "everything was deleted" and "the
//! token may not read this", and only the first would justify cleaning.

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::plan::Wanted;
use crate::tree::shown;
use crate::version_name::VersionName;

/// One look at the tree under the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TreeSeen {
    /// `None`: nothing at all under the prefix (or the token may not read it).
    /// Shared by the watch's snapshot and the main loop's view: one copy
    /// per deployment, however many hold it (issue 19: a copy each cost
    /// ~150 bytes per version).
    pub listing: Option<Arc<ListingSeen>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ListingSeen {
    /// The versions that exist, each with the key that makes it exist
    /// (its folder key, or a plain key written by another tool).
    pub versions: BTreeMap<VersionName, String>,
    /// Names under the prefix that are not valid versions.
    pub ignored: BTreeSet<String>,
    /// This node's keys that were checked (those it reported `failed`)
    /// and found missing.
    pub own_missing: BTreeSet<VersionName>,
    /// A progressive rollout under way that names this node.
    pub wave: Option<Wave>,
}

/// A wave of a progressive rollout that names this node: run `version`
/// instead of `current`, as long as `current` still has the ModifyIndex
/// `base_index` (see `tree::RolloutPlan`); for a restart, run its rollout
/// hook once more, once per restart id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Wave {
    pub version: VersionName,
    pub base_index: u64,
    pub restart: Option<u64>,
}

/// `<prefix>/current` as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CurrentSeen {
    /// The raw value; `None` when the key does not exist.
    pub value: Option<Vec<u8>>,
    /// Its ModifyIndex (0 when it does not exist).
    pub index: u64,
}

#[derive(Debug, Default)]
pub(crate) struct View {
    tree: Option<TreeSeen>,
    current: Option<Current>,
    /// Folder keys this node re-created, until a snapshot shows them.
    repaired: BTreeMap<VersionName, String>,
    /// A ModifyIndex of `current` that a repair found outdated: no repair
    /// until `current` is seen anew.
    outdated_current: Option<u64>,
    /// The ModifyIndex of the last `current` that named a version the
    /// snapshot did not list (so the tree was read whole for it).
    looked_up_current: Option<u64>,
    /// Versions gone from the listing that could not be confirmed removed
    /// (Consul hides keys the token may not read): kept, until checked again.
    kept: BTreeSet<VersionName>,
    /// What [`View::wanted`] built from the above; emptied by every change.
    wanted: OnceCell<Option<Wanted>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Current {
    version: Option<VersionName>,
    index: u64,
}

/// What changed in the view that the agent should say or check.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Noticed {
    /// Warnings about names or values that are ignored (bounded, escaped).
    pub warnings: Vec<String>,
    /// This node's `failed` keys that are gone: an operator's retry, or a
    /// lost session; the agent must find out which.
    pub own_missing: BTreeSet<VersionName>,
    /// The prefix just became empty (or unreadable).
    pub emptied: bool,
    /// Versions whose key was there in the last snapshot and is gone.
    pub removed: BTreeSet<VersionName>,
}

impl View {
    /// Takes a snapshot of the tree.
    pub(crate) fn see_tree(&mut self, seen: TreeSeen, prefix: &str) -> Noticed {
        self.wanted.take();
        let mut noticed = Noticed::default();
        match &seen.listing {
            None => {
                noticed.emptied = self.tree.as_ref().is_none_or(|t| t.listing.is_some());
            }
            Some(listing) => {
                noticed.warnings = listing
                    .ignored
                    .iter()
                    .map(|name| {
                        format!(
                            "ignoring {} under {prefix}: not a valid version name",
                            shown_quoted(name)
                        )
                    })
                    .collect();
                noticed.own_missing = listing.own_missing.clone();
                if let Some(before) = self.tree.as_ref().and_then(|t| t.listing.as_ref()) {
                    noticed.removed = before
                        .versions
                        .keys()
                        .filter(|v| !listing.versions.contains_key(*v))
                        .cloned()
                        .collect();
                }
                self.repaired
                    .retain(|v, _| !listing.versions.contains_key(v));
            }
        }
        self.tree = Some(seen);
        noticed
    }

    /// Takes `current` as read; says why it is ignored if it is.
    pub(crate) fn see_current(&mut self, seen: CurrentSeen, key: &str) -> Option<String> {
        self.wanted.take();
        let text = seen
            .value
            .as_ref()
            .map(|v| String::from_utf8_lossy(v).trim().to_string());
        let (version, warning) = match text.as_deref() {
            None | Some("") => (None, None),
            Some(text) => match VersionName::parse(text) {
                Ok(version) => (Some(version), None),
                Err(why) => (
                    None,
                    Some(format!("ignoring {key} = {}: {why}", shown_quoted(text))),
                ),
            },
        };
        let current = Current {
            version,
            index: seen.index,
        };
        if self.current.as_ref() != Some(&current) {
            self.outdated_current = None;
        }
        self.current = Some(current);
        warning
    }

    /// What the tree wants of this node, once both the tree and `current`
    /// have been seen and the prefix is not empty.
    /// Computed once per change of the view (the main loop asks after every
    /// action; with a thousand versions, building it is not free).
    pub(crate) fn wanted(&self) -> Option<&Wanted> {
        self.wanted.get_or_init(|| self.build_wanted()).as_ref()
    }

    fn build_wanted(&self) -> Option<Wanted> {
        let listing = self.tree.as_ref()?.listing.as_ref()?;
        let current = self.current.as_ref()?;
        let mut versions: BTreeSet<VersionName> = listing.versions.keys().cloned().collect();
        versions.extend(self.repaired.keys().cloned());
        // A wave of a progressive rollout that names this node, started on
        // the `current` this node sees, for a version the tree has.
        if let Some(wave) = listing
            .wave
            .as_ref()
            .filter(|w| w.base_index == current.index && versions.contains(&w.version))
        {
            return Some(Wanted {
                kept: self.kept_besides(&versions),
                versions,
                current: Some(wave.version.clone()),
                may_repair: false,
                restart: wave.restart,
            });
        }
        Some(Wanted {
            kept: self.kept_besides(&versions),
            versions,
            current: current.version.clone(),
            may_repair: self.outdated_current != Some(current.index),
            restart: None,
        })
    }

    fn kept_besides(&self, listed: &BTreeSet<VersionName>) -> BTreeSet<VersionName> {
        self.kept.difference(listed).cloned().collect()
    }

    /// `version` left the listing but could not be confirmed removed: keep
    /// it as it is until [`View::recheck_kept`].
    pub(crate) fn keep(&mut self, version: &VersionName) {
        self.wanted.take();
        self.kept.insert(version.clone());
    }

    /// Checks the kept versions again (the plan asks to clean them anew).
    pub(crate) fn recheck_kept(&mut self) -> bool {
        self.wanted.take();
        !std::mem::take(&mut self.kept).is_empty()
    }

    /// The key that makes `version` exist, as last seen (or re-created).
    pub(crate) fn key_of(&self, version: &VersionName) -> Option<&str> {
        self.tree
            .as_ref()
            .and_then(|t| t.listing.as_ref())
            .and_then(|l| l.versions.get(version))
            .or_else(|| self.repaired.get(version))
            .map(String::as_str)
    }

    /// `current`'s ModifyIndex as last seen.
    pub(crate) fn current_index(&self) -> Option<u64> {
        self.current.as_ref().map(|c| c.index)
    }

    /// What was seen of the tree is void (Consul's state was replaced, or a
    /// write proved it outdated): nothing is wanted until it is seen again.
    pub(crate) fn forget_tree(&mut self) {
        self.wanted.take();
        self.tree = None;
        self.repaired.clear();
    }

    /// What was seen of `current` is void: nothing is wanted until it is
    /// seen again.
    pub(crate) fn forget_current(&mut self) {
        self.wanted.take();
        self.current = None;
    }

    /// This node re-created `version`'s folder key.
    pub(crate) fn repaired(&mut self, version: &VersionName, key: String) {
        self.wanted.take();
        self.repaired.insert(version.clone(), key);
    }

    /// Whether `current` names a version the snapshot of the tree does not
    /// list: a tool that does not ring the doorbell created it, or its
    /// folder key is missing. True once per value of `current`, so that the
    /// agent reads the tree whole once before it acts on that value.
    pub(crate) fn current_unlisted(&mut self) -> bool {
        let Some(Current {
            version: Some(version),
            index,
        }) = &self.current
        else {
            return false;
        };
        if self.tree.is_none()
            || self.key_of(version).is_some()
            || self.looked_up_current == Some(*index)
        {
            return false;
        }
        self.looked_up_current = Some(*index);
        true
    }

    /// A repair found `current` changed since it was seen: wait for the new one.
    pub(crate) fn current_outdated(&mut self) {
        self.wanted.take();
        self.outdated_current = self.current_index();
    }
}

fn shown_quoted(text: &str) -> String {
    format!("\"{}\"", shown(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str) -> VersionName {
        VersionName::parse(name).unwrap()
    }

    fn wave(name: &str, base_index: u64) -> Wave {
        Wave {
            version: v(name),
            base_index,
            restart: None,
        }
    }

    fn tree(versions: &[&str]) -> TreeSeen {
        TreeSeen {
            listing: Some(Arc::new(ListingSeen {
                versions: versions.iter().map(|n| (v(n), format!("p/{n}/"))).collect(),
                ..ListingSeen::default()
            })),
        }
    }

    fn current(value: &str, index: u64) -> CurrentSeen {
        CurrentSeen {
            value: Some(value.as_bytes().to_vec()),
            index,
        }
    }

    #[test]
    fn nothing_is_wanted_until_the_tree_and_current_were_both_seen() {
        let mut view = View::default();
        assert_eq!(view.wanted(), None);
        view.see_tree(tree(&["v1"]), "p/");
        assert_eq!(view.wanted(), None);
        view.see_current(current("v1", 7), "p/current");
        let wanted = view.wanted().unwrap();
        assert_eq!(wanted.versions, BTreeSet::from([v("v1")]));
        assert_eq!(wanted.current, Some(v("v1")));
        assert_eq!(view.key_of(&v("v1")), Some("p/v1/"));
    }

    #[test]
    fn a_wave_that_names_this_node_applies_only_while_current_keeps_its_index() {
        let mut view = View::default();
        let mut seen = tree(&["v1", "v2"]);
        Arc::make_mut(seen.listing.as_mut().unwrap()).wave = Some(wave("v2", 7));
        view.see_tree(seen.clone(), "p/");
        view.see_current(current("v1", 7), "p/current");
        let wanted = view.wanted().unwrap();
        assert_eq!(wanted.current, Some(v("v2")), "the wave applies");
        assert!(!wanted.may_repair);
        // The last step: current moves (to the same version, or another),
        // whether or not the snapshot still has the wave.
        view.see_current(current("v2", 9), "p/current");
        assert_eq!(view.wanted().unwrap().current, Some(v("v2")));
        view.see_current(current("v1", 11), "p/current");
        assert_eq!(view.wanted().unwrap().current, Some(v("v1")), "ended");
        // A wave for a version the tree lacks never applies.
        let mut gone = tree(&["v1"]);
        Arc::make_mut(gone.listing.as_mut().unwrap()).wave = Some(wave("v2", 11));
        view.see_tree(gone, "p/");
        assert_eq!(view.wanted().unwrap().current, Some(v("v1")));
    }

    #[test]
    fn an_empty_prefix_wants_nothing_at_all() {
        let mut view = View::default();
        view.see_tree(tree(&["v1"]), "p/");
        view.see_current(current("v1", 7), "p/current");
        let noticed = view.see_tree(TreeSeen { listing: None }, "p/");
        assert!(noticed.emptied);
        assert_eq!(view.wanted(), None, "an empty prefix never cleans");
    }

    #[test]
    fn an_invalid_current_is_ignored_with_a_bounded_escaped_warning() {
        let mut view = View::default();
        view.see_tree(tree(&["v1"]), "p/");
        let hostile = format!("../\x1b[31m{}", "x".repeat(100_000));
        let warning = view.see_current(current(&hostile, 9), "p/current").unwrap();
        assert!(warning.len() < 400, "{}", warning.len());
        assert!(!warning.contains('\x1b'));
        assert_eq!(view.wanted().unwrap().current, None);
    }

    #[test]
    fn a_repaired_folder_counts_until_the_tree_shows_it() {
        let mut view = View::default();
        view.see_tree(tree(&["v2"]), "p/");
        view.see_current(current("v1", 7), "p/current");
        view.repaired(&v("v1"), "p/v1/".into());
        assert_eq!(
            view.wanted().unwrap().versions,
            BTreeSet::from([v("v1"), v("v2")])
        );
        view.see_tree(tree(&["v1"]), "p/");
        assert_eq!(view.key_of(&v("v1")), Some("p/v1/"));
    }

    #[test]
    fn a_void_tree_or_current_wants_nothing_until_seen_again() {
        let mut view = View::default();
        view.see_tree(tree(&["v1", "v2"]), "p/");
        view.see_current(current("v2", 7), "p/current");
        view.forget_tree();
        assert_eq!(view.wanted(), None, "a stale view never cleans");
        view.see_tree(tree(&["v2"]), "p/");
        assert!(view.wanted().is_some());
        view.forget_current();
        assert_eq!(view.wanted(), None);
    }

    #[test]
    fn a_repair_refused_for_an_outdated_current_waits_for_current_to_be_seen_again() {
        let mut view = View::default();
        view.see_tree(tree(&[]), "p/");
        view.see_current(current("v1", 7), "p/current");
        assert!(view.wanted().unwrap().may_repair);
        view.current_outdated();
        assert!(!view.wanted().unwrap().may_repair);
        view.see_current(current("v2", 8), "p/current");
        assert!(view.wanted().unwrap().may_repair);
    }

    #[test]
    fn a_current_the_tree_does_not_list_asks_for_one_whole_read_per_value() {
        let mut view = View::default();
        view.see_current(current("v5", 7), "p/current");
        assert!(
            !view.current_unlisted(),
            "no snapshot yet: the first read is whole"
        );
        view.see_tree(tree(&["v1"]), "p/");
        assert!(view.current_unlisted());
        assert!(!view.current_unlisted(), "once per value of current");
        view.see_current(current("v1", 8), "p/current");
        assert!(!view.current_unlisted(), "v1 is listed");
        view.see_current(current("v5", 9), "p/current");
        assert!(view.current_unlisted(), "a new value of current");
    }

    #[test]
    fn hostile_names_are_warned_about_bounded_and_escaped() {
        let mut view = View::default();
        let mut seen = tree(&["v1"]);
        let listing = Arc::make_mut(seen.listing.as_mut().unwrap());
        listing.ignored.insert("../".into());
        listing
            .ignored
            .insert(format!("\x1b]0;{}", "y".repeat(600)));
        let noticed = view.see_tree(seen, "p/");
        assert_eq!(noticed.warnings.len(), 2);
        assert!(
            noticed
                .warnings
                .iter()
                .all(|w| w.len() < 300 && !w.contains('\x1b'))
        );
    }
}
