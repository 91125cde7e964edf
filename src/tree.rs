//! The Consul tree protocol: where each fact lives under a deployment's
//! prefix, and what the values mean. `docs/protocol.md` is the prose
//! version of this module; keep the two in step.
//!
//! ```text
//! <prefix>/current            = <version>                    written by operators
//! <prefix>/<version>/         = "" or CLI metadata (JSON)    the version exists
//! <prefix>/<version>/<node>   = busy | ready | active | failed   written by <node>'s agent
//! ```
//!
//! Everything read from the tree is untrusted: a name under the prefix
//! becomes a [`VersionName`] only if it is valid, and is ignored otherwise.

use std::collections::BTreeSet;
use std::fmt;

use crate::version_name::VersionName;

/// A deployment's key prefix, normalised to end in exactly one `/` (Consul
/// matches prefixes as plain strings, so `api/version` would also match
/// `api/versions/…`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Prefix(String);

impl Prefix {
    pub(crate) fn parse(text: &str) -> Result<Prefix, String> {
        let trimmed = text.trim_matches('/');
        if trimmed.is_empty() {
            return Err(format!(
                "the prefix {text:?} is empty; use a KV path such as api/version"
            ));
        }
        if let Some(bad) = trimmed
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
        {
            return Err(format!(
                "the prefix {text:?} contains {bad:?}; use letters, digits, . _ - and /"
            ));
        }
        if trimmed
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(format!("the prefix {text:?} has an empty, . or .. segment"));
        }
        Ok(Prefix(format!("{trimmed}/")))
    }

    /// The prefix with its trailing `/`, for listings.
    pub(crate) fn as_dir(&self) -> &str {
        &self.0
    }

    pub(crate) fn current_key(&self) -> String {
        format!("{}current", self.0)
    }

    pub(crate) fn folder_key(&self, version: &VersionName) -> String {
        format!("{}{version}/", self.0)
    }

    pub(crate) fn node_key(&self, version: &VersionName, node: &str) -> String {
        format!("{}{version}/{node}", self.0)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.trim_end_matches('/'))
    }
}

/// A node's state for one version, as its agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum NodeState {
    /// The agent has seen the version and is deploying it.
    Busy,
    /// The deploy hook succeeded: the node has the version.
    Ready,
    /// The node runs this version.
    Active,
    /// The deploy or rollout hook failed.
    Failed,
}

impl NodeState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NodeState::Busy => "busy",
            NodeState::Ready => "ready",
            NodeState::Active => "active",
            NodeState::Failed => "failed",
        }
    }

    pub(crate) fn parse(text: &[u8]) -> Option<NodeState> {
        Some(match text {
            b"busy" => NodeState::Busy,
            b"ready" => NodeState::Ready,
            b"active" => NodeState::Active,
            b"failed" => NodeState::Failed,
            _ => return None,
        })
    }

    /// Readers treat `ready` and `active` alike: the node has the version.
    pub(crate) fn has_it(self) -> bool {
        matches!(self, NodeState::Ready | NodeState::Active)
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Node names are path components of node keys: the same rules as version
/// names, minus the ban on `current`. Returns why a name is unusable.
pub(crate) fn check_node_name(name: &str) -> Result<(), String> {
    if name == "current" {
        return Ok(());
    }
    VersionName::parse(name)
        .map(|_| ())
        .map_err(|why| why.replace("version name", "node name"))
}

/// What a one-level listing (`<prefix>/?keys&separator=/`) says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Listing {
    /// Versions with a plain key `<prefix>/<version>`: they exist.
    pub plain: BTreeSet<VersionName>,
    /// Versions with a folder `<prefix>/<version>/`. The listing cannot tell
    /// a real folder key from a folder implied by node keys under it, so
    /// each of these needs its folder key read to know whether it exists.
    pub folders: BTreeSet<VersionName>,
    /// Names under the prefix that are not valid versions, for one warning each.
    pub ignored: BTreeSet<String>,
}

impl Listing {
    pub(crate) fn parse(prefix: &Prefix, keys: &[String]) -> Listing {
        let mut listing = Listing::default();
        for key in keys {
            let Some(rest) = key.strip_prefix(prefix.as_dir()) else {
                continue;
            };
            if rest.is_empty() || rest == "current" {
                continue;
            }
            let (name, is_folder) = match rest.strip_suffix('/') {
                Some(name) => (name, true),
                None => (rest, false),
            };
            match VersionName::parse(name) {
                Ok(version) if is_folder => {
                    listing.folders.insert(version);
                }
                Ok(version) => {
                    listing.plain.insert(version);
                }
                Err(_) => {
                    listing.ignored.insert(rest.to_string());
                }
            }
        }
        listing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str) -> VersionName {
        VersionName::parse(name).unwrap()
    }

    #[test]
    fn prefixes_are_normalised_to_one_trailing_slash() {
        assert_eq!(
            Prefix::parse("api/version").unwrap().as_dir(),
            "api/version/"
        );
        assert_eq!(
            Prefix::parse("/api/version//").unwrap().as_dir(),
            "api/version/"
        );
        assert_eq!(
            Prefix::parse("api/version").unwrap().to_string(),
            "api/version"
        );
        for bad in ["", "/", "api//version", "api/../x", "api version", "api?x"] {
            assert!(Prefix::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn keys_follow_the_protocol_layout() {
        let p = Prefix::parse("api/version").unwrap();
        assert_eq!(p.current_key(), "api/version/current");
        assert_eq!(p.folder_key(&v("v1")), "api/version/v1/");
        assert_eq!(p.node_key(&v("v1"), "n1"), "api/version/v1/n1");
    }

    #[test]
    fn a_listing_separates_folders_plain_keys_and_hostile_names() {
        let p = Prefix::parse("api/version").unwrap();
        let keys: Vec<String> = [
            "api/version/",
            "api/version/current",
            "api/version/v1/",
            "api/version/v2",
            "api/version/../",
            "api/version/.hidden/",
            "api/version/-rf",
            "api/version/a b/",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let listing = Listing::parse(&p, &keys);
        assert_eq!(listing.folders, BTreeSet::from([v("v1")]));
        assert_eq!(listing.plain, BTreeSet::from([v("v2")]));
        assert_eq!(
            listing.ignored,
            BTreeSet::from(["../", ".hidden/", "-rf", "a b/"].map(String::from))
        );
    }

    #[test]
    fn node_states_round_trip_and_ready_or_active_means_has_it() {
        for state in [
            NodeState::Busy,
            NodeState::Ready,
            NodeState::Active,
            NodeState::Failed,
        ] {
            assert_eq!(NodeState::parse(state.as_str().as_bytes()), Some(state));
        }
        assert_eq!(NodeState::parse(b"bogus"), None);
        assert!(NodeState::Ready.has_it() && NodeState::Active.has_it());
        assert!(!NodeState::Busy.has_it() && !NodeState::Failed.has_it());
    }
}
