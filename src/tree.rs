//! The Consul tree protocol: where each fact lives under a deployment's
//! prefix, and what the values mean. `docs/protocol.md` is the prose
//! version of this module; keep the two in step.
//!
//! ```text
//! <prefix>/current            = <version>                    written by operators
//! <prefix>/<version>/         = "" or CLI metadata (JSON)    the version exists
//! <prefix>/<version>/<node>   = busy | ready | active | failed   written by <node>'s agent
//! <prefix>/<version>/.reason/<node> = why it failed (JSON)   written by <node>'s agent
//! <prefix>/<version>/.restarted/<node> = the restart it ran   written by <node>'s agent
//! <prefix>/<version>/.hook/<node> = the hook that runs long   written by <node>'s agent
//! <prefix>/.agents/<node>     = the agent that follows the prefix (JSON), held by its session
//! <prefix>/.known/<node>      = the same, kept after the agent stops (until `depro forget`)
//! <prefix>/.removed/<version> = who removed it and when (JSON), written with the removal (CLI, scout)
//! <prefix>/.rollout           = a progressive rollout under way (JSON), written by the CLI
//! <prefix>/.history           = the last switches of current (JSON), written by the CLI
//! <prefix>/.policy            = the rollout policy (JSON), written by `depro policy`
//! <prefix>/.driver            = the command driving a rollout's waves, held by its session
//! <prefix>/.changed           = the doorbell (see `doorbell`)
//! <prefix>/.scout             = the agent that rings it for other clients, held by its session
//! <prefix>/.secret            = the agents' secret for serving artifacts to each other
//! ```
//!
//! Everything read from the tree is untrusted: a name under the prefix
//! becomes a [`VersionName`] only if it is valid, and is ignored otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::consul::KvEntry;
use crate::version_name::VersionName;

/// A value read from the tree, as it may be shown on a terminal or in a
/// log line: control characters escaped and at most [`SHOWN_MAX`]
/// characters (with the full length said when cut). Values from Consul are
/// untrusted: one could be half a megabyte, or carry terminal escapes.
pub(crate) fn shown(text: &str) -> String {
    let escaped: String = text.chars().flat_map(char::escape_debug).collect();
    if escaped.chars().count() <= SHOWN_MAX {
        escaped
    } else {
        let cut: String = escaped.chars().take(SHOWN_MAX).collect();
        format!("{cut}… ({} bytes)", text.len())
    }
}

/// A line of untrusted text (a hook's output) for the log: control
/// characters escaped, at most [`LINE_MAX`] characters.
pub(crate) fn shown_line(text: &str) -> String {
    shown_cut_line(text, text.len())
}

/// [`shown_line`] of the start of a line of `length` bytes, which says how
/// long the line was when `text` is not all of it.
pub(crate) fn shown_cut_line(text: &str, length: usize) -> String {
    let escaped: String = text
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if is_bidi_control(c) {
                c.escape_unicode().collect()
            } else if !c.is_control() || c == '\t' {
                vec![c]
            } else {
                c.escape_debug().collect()
            };
            escaped
        })
        .collect();
    if escaped.chars().count() <= LINE_MAX && length == text.len() {
        escaped
    } else {
        let cut: String = escaped.chars().take(LINE_MAX).collect();
        format!("{cut}… (a line of {length} bytes, cut)")
    }
}

/// The characters that reorder the text around them on a terminal (the
/// Unicode bidirectional controls): a line could show other than it is.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// How many characters of a hook's output line the log keeps.
pub(crate) const LINE_MAX: usize = 1024;

/// How many characters of an untrusted value [`shown`] keeps.
pub(crate) const SHOWN_MAX: usize = 80;

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

    /// Why `node` failed `version` (next to its node key; a node name never
    /// starts with a dot, so this is never a node key).
    pub(crate) fn reason_key(&self, version: &VersionName, node: &str) -> String {
        format!("{}{version}/{REASON}/{node}", self.0)
    }

    /// The restart of `version` that `node` ran last (`depro restart`).
    pub(crate) fn restarted_key(&self, version: &VersionName, node: &str) -> String {
        format!("{}{version}/{RESTARTED}/{node}", self.0)
    }

    /// The hook of `version` that has been running on `node` for a while.
    pub(crate) fn hook_key(&self, version: &VersionName, node: &str) -> String {
        format!("{}{version}/{HOOK}/{node}", self.0)
    }

    /// Where the agent on `node` announces that it follows this prefix.
    pub(crate) fn agent_key(&self, node: &str) -> String {
        format!("{}{AGENTS}/{node}", self.0)
    }

    /// Where an agent that followed the prefix is remembered.
    pub(crate) fn known_key(&self, node: &str) -> String {
        format!("{}{KNOWN}/{node}", self.0)
    }

    /// Who removed `version` and when, written with the removal.
    pub(crate) fn removed_key(&self, version: &VersionName) -> String {
        format!("{}{REMOVED}/{version}", self.0)
    }

    /// The secret the prefix's agents authenticate to each other with.
    pub(crate) fn secret_key(&self) -> String {
        format!("{}{SECRET}", self.0)
    }

    /// The folder of the agents' announcements.
    pub(crate) fn agents_dir(&self) -> String {
        format!("{}{AGENTS}/", self.0)
    }

    /// The progressive rollout under way, if any.
    pub(crate) fn rollout_key(&self) -> String {
        format!("{}{ROLLOUT}", self.0)
    }

    /// Held by the command that drives a progressive rollout's waves.
    pub(crate) fn driver_key(&self) -> String {
        format!("{}{DRIVER}", self.0)
    }

    /// The prefix's rollout policy (`depro policy`).
    pub(crate) fn policy_key(&self) -> String {
        format!("{}{POLICY}", self.0)
    }

    /// The record of the last switches of `current`.
    pub(crate) fn history_key(&self) -> String {
        format!("{}{HISTORY}", self.0)
    }

    /// The doorbell: the depro CLI rings it in the same transaction as
    /// every change it makes under the prefix (see [`crate::doorbell`]);
    /// agents watch it alone.
    pub(crate) fn changed_key(&self) -> String {
        format!("{}{CHANGED}", self.0)
    }

    /// Held by the agent that scouts the prefix for changes other clients
    /// make without ringing the doorbell (see `agent::scout`).
    pub(crate) fn scout_key(&self) -> String {
        format!("{}{SCOUT}", self.0)
    }
}

/// The name of the doorbell key under a prefix (not a version: it starts
/// with a dot).
pub(crate) const CHANGED: &str = ".changed";
/// The folder of the agents' announcements under a prefix.
pub(crate) const AGENTS: &str = ".agents";
/// The folder of the agents remembered after they stop.
pub(crate) const KNOWN: &str = ".known";
/// The folder of the removals' records.
pub(crate) const REMOVED: &str = ".removed";
/// The progressive rollout under way.
pub(crate) const ROLLOUT: &str = ".rollout";
/// The record of the last switches of `current`.
pub(crate) const HISTORY: &str = ".history";
/// The rollout policy.
pub(crate) const POLICY: &str = ".policy";
/// The lock of the command that drives a rollout's waves.
pub(crate) const DRIVER: &str = ".driver";
/// The folder of failure reasons inside a version's folder.
pub(crate) const REASON: &str = ".reason";
/// The folder of restart acknowledgements inside a version's folder.
pub(crate) const RESTARTED: &str = ".restarted";
/// The folder of the hooks that run long, inside a version's folder.
pub(crate) const HOOK: &str = ".hook";
/// The agents' shared secret (artifacts served to each other).
pub(crate) const SECRET: &str = ".secret";
/// The scout's lock.
pub(crate) const SCOUT: &str = ".scout";

/// Names under a prefix that are depro's own (never versions, never warned
/// about): the doorbell, the agents' folder, the rollout under way.
fn is_depro_name(rest: &str) -> bool {
    rest == CHANGED
        || rest == ROLLOUT
        || rest == HISTORY
        || rest == POLICY
        || rest == DRIVER
        || rest == SCOUT
        || rest == SECRET
        || rest == format!("{AGENTS}/")
        || rest == format!("{KNOWN}/")
        || rest == format!("{REMOVED}/")
}

/// Who drives a rollout's waves, as `.driver` says: `ops@build1 since …`.
pub(crate) fn driver_of(value: &[u8]) -> String {
    let record: serde_json::Value = serde_json::from_slice(value).unwrap_or_default();
    let field = |name: &str| record[name].as_str().map(shown).unwrap_or_default();
    format!("{} since {}", field("by"), field("since"))
}

/// Why a node failed a version, as its agent reports it next to its
/// `failed` key (`<prefix>/<version>/.reason/<node>`, JSON). Every field is
/// optional, so older and newer depro versions read each other's reasons.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FailReason {
    /// `deploy`, `rollout` or `health`; none when no hook was to blame (a
    /// full disk, a state directory a hook deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// What happened, in words: `the deploy hook exited with status 3`.
    #[serde(default)]
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// The hook's last output lines (at most 1 KiB, as printed: readers
    /// escape control characters before showing them).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

impl FailReason {
    pub(crate) fn parse(value: &[u8]) -> FailReason {
        serde_json::from_slice(value).unwrap_or_else(|_| FailReason {
            error: shown(&String::from_utf8_lossy(value)),
            ..FailReason::default()
        })
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// For a terminal: the error, then the output's last lines, indented,
    /// control characters escaped (the values come from another host).
    pub(crate) fn shown(&self, indent: &str) -> String {
        let mut text = shown_line(&self.error);
        for line in self.output.lines().filter(|l| !l.trim().is_empty()) {
            text.push('\n');
            text.push_str(indent);
            text.push_str("| ");
            text.push_str(&shown_line(line));
        }
        text
    }
}

/// What an agent announces under `<prefix>/.agents/<node>` while it runs
/// (held by its session: a dead agent drops out).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AgentRecord {
    /// The agent's depro version.
    #[serde(default)]
    pub depro: String,
    /// When this agent's session started following the prefix.
    #[serde(default)]
    pub since: String,
    /// Where it serves verified artifacts to the other agents (`listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Its site (`zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// When it stopped (`.known` only, written as it stops cleanly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<String>,
    /// With `left`: the CreateIndex of the announcement it ended.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub joined: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `<prefix>/.removed/<version>`: a removal by the depro CLI, written in the
/// transaction that deletes the version's key, so the record's ModifyIndex
/// is the removal's: `depro events -since` tells the removals made while it
/// was not following. At most [`REMOVALS_KEPT`] are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Removal {
    pub by: String,
    pub at: String,
    /// The CreateIndex of the key that made the version exist.
    pub created: u64,
}

impl Removal {
    /// Every field optional (read through a `Value`: cheaper in bytes
    /// than a derived reader for a record read in one place).
    pub(crate) fn parse(value: &[u8]) -> Removal {
        let record: serde_json::Value = serde_json::from_slice(value).unwrap_or_default();
        let text = |name: &str| record[name].as_str().unwrap_or_default().to_string();
        Removal {
            by: text("by"),
            at: text("at"),
            created: record["created"].as_u64().unwrap_or_default(),
        }
    }
}

/// How many removal records a prefix keeps: a removal past them deletes
/// the oldest.
pub(crate) const REMOVALS_KEPT: usize = 100;

/// One switch of `current`, as `<prefix>/.history` records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Switch {
    /// The version made current (empty: `current` deleted).
    pub version: String,
    /// What `current` was before (empty: unset).
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub by: String,
    /// `deploy`, `rollout`, `rollback`, `rollback-on-failure` (with `waves`
    /// for a progressive rollout's last step).
    #[serde(default)]
    pub how: String,
    /// Why, in the operator's words (`-message`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The ModifyIndex of `.history` this entry's write replaced (by
    /// check-and-set): so each write's index is the next one's `after`,
    /// and the last one's is the key's. 0: not known (an older CLI).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub after: u64,
}

/// `<prefix>/.policy` (JSON): the prefix's rollout policy, as the flags
/// that hold it (`-nodes=all -canary=1 -batch=25%`), read with the command
/// line's rules (`cli::parse_policy`); who set it, when and why. Every
/// switch takes from it each flag it is not given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Policy {
    /// Empty: the policy was cleared (in the history).
    #[serde(default)]
    pub flags: String,
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub since: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// As [`Switch::after`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub after: u64,
}

impl Policy {
    pub(crate) fn parse(value: &[u8]) -> Option<Policy> {
        serde_json::from_slice(value).ok()
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `<prefix>/.history`: the last [`HISTORY_KEPT`] switches, newest first,
/// and the last [`POLICIES_KEPT`] changes of the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct History {
    #[serde(default)]
    pub switches: Vec<Switch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Policy>,
}

/// How many changes of the policy `.history` keeps.
pub(crate) const POLICIES_KEPT: usize = 20;

/// How many switches `.history` keeps.
pub(crate) const HISTORY_KEPT: usize = 100;

impl History {
    pub(crate) fn parse(value: &[u8]) -> History {
        serde_json::from_slice(value).unwrap_or_default()
    }

    /// This history with `switch` recorded first.
    pub(crate) fn with(&self, switch: Switch) -> History {
        let mut switches = vec![switch];
        switches.extend(self.switches.iter().take(HISTORY_KEPT - 1).cloned());
        History {
            switches,
            policies: self.policies.clone(),
        }
    }

    /// This history with a change of the policy recorded first.
    pub(crate) fn with_policy(&self, policy: Policy) -> History {
        let mut policies = vec![policy];
        policies.extend(self.policies.iter().take(POLICIES_KEPT - 1).cloned());
        History {
            switches: self.switches.clone(),
            policies,
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A progressive rollout under way (`<prefix>/.rollout`, JSON), written by
/// the CLI. Agents on the nodes in `switched` run `version` instead of
/// `current`, as long as `current` still has the ModifyIndex `base_index`
/// (any other change of `current` ends the rollout for every agent). The
/// last wave makes `version` current and deletes this key in one
/// transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RolloutPlan {
    pub version: String,
    /// `current` when the rollout started (empty: unset) and its index.
    #[serde(default)]
    pub base: String,
    #[serde(default)]
    pub base_index: u64,
    /// The waves, each a list of nodes, in order.
    #[serde(default)]
    pub waves: Vec<Vec<String>>,
    /// How many waves have been told to switch (1 = the first).
    #[serde(default)]
    pub started_waves: usize,
    /// Every node told to switch so far (the first `started_waves` waves).
    #[serde(default)]
    pub switched: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// How it was asked for, to resume it the same way: `-canary=1 -batch=25%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub how: Option<String>,
    /// Every rollout flag it runs with (`-nodes=all -canary=1 -batch=25%
    /// -pause=1m -rollback-on-failure`), which a resume takes for each it
    /// is not given: the same rollout, from any machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<String>,
    /// Paused by `depro pause` (who and when): no further wave starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// A restart of `version` (which is `current`, `depro restart`), and
    /// its id (milliseconds since the Unix epoch when it started): each
    /// node in `switched` runs `version`'s rollout hook (and health
    /// checks) once more for it, then acknowledges the id under
    /// `<version>/.restarted/<node>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<u64>,
    /// Why (`-message`), recorded with its last step by whichever command
    /// takes it (a `depro promote` or a resume from another machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl RolloutPlan {
    pub(crate) fn parse(value: &[u8]) -> Option<RolloutPlan> {
        serde_json::from_slice(value).ok()
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The version it rolls out, if the name is valid.
    pub(crate) fn target(&self) -> Option<VersionName> {
        VersionName::parse(&self.version).ok()
    }

    /// `, by ops@build1` when the plan says who started it (escaped).
    pub(crate) fn by_whom(&self) -> String {
        self.by
            .as_deref()
            .map(|b| format!(", by {}", shown(b)))
            .unwrap_or_default()
    }

    /// The same rollout at the same wave: only who paused it may differ.
    pub(crate) fn same_rollout(&self, other: &RolloutPlan) -> bool {
        self.version == other.version
            && self.base_index == other.base_index
            && self.waves == other.waves
            && self.started_waves == other.started_waves
            && self.switched == other.switched
            && self.restart == other.restart
    }

    /// Whether it still applies to `current` as read (index 0: unset).
    pub(crate) fn applies_to(&self, current_index: u64) -> bool {
        self.base_index == current_index
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
            if rest.is_empty() || rest == "current" || is_depro_name(rest) {
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

/// What the CLI records in a version's folder key (JSON). Agents ignore it;
/// versions written by other tools have none. All fields are optional so
/// that older and newer depro versions read each other's metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VersionMeta {
    /// When and by whom the version was first deployed (RFC 3339, `user@host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// When and by whom it was last made current, and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_how: Option<String>,
    /// Why, in the operator's words (`-message`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_message: Option<String>,
    /// The ModifyIndex `current` had just before this version was made
    /// current: it grows with every switch, so the highest one among the
    /// other versions names the version that was current before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_order: Option<u64>,
    /// The build each agent fetches and verifies before the deploy hook
    /// (`depro deploy -artifact`), fixed when the version is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<crate::artifact::Artifact>,
    /// Fields of a newer depro, kept as they are when a switch rewrites
    /// the key (an older CLI dropped them).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl VersionMeta {
    pub(crate) fn parse(value: &[u8]) -> VersionMeta {
        serde_json::from_slice(value).unwrap_or_default()
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `<prefix>/current` as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CurrentKey {
    /// The raw value.
    pub value: String,
    /// The version it names, if that is a valid name.
    pub version: Option<VersionName>,
    pub modify_index: u64,
}

impl CurrentKey {
    pub(crate) fn from_entry(entry: &KvEntry) -> CurrentKey {
        let value = String::from_utf8_lossy(&entry.value).trim().to_string();
        CurrentKey {
            version: VersionName::parse(&value).ok(),
            value,
            modify_index: entry.modify_index,
        }
    }
}

/// One node's key for a version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeEntry {
    pub state: NodeState,
    pub modify_index: u64,
    /// When the agent wrote this state, in milliseconds since the Unix
    /// epoch, or 0 if it did not say (the key's flags; see `agent::execute`).
    pub since_ms: u64,
    /// The agent's session that holds the key.
    pub session: String,
}

/// The nodes that report `state`, in name order.
pub(crate) fn nodes_in(nodes: &BTreeMap<String, NodeEntry>, state: NodeState) -> Vec<String> {
    nodes
        .iter()
        .filter(|(_, e)| e.state == state)
        .map(|(n, _)| n.clone())
        .collect()
}

/// One version in the tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct VersionInfo {
    /// Its folder key (or a plain key) exists: the version is wanted. A
    /// version without one is being purged: only node keys are left.
    pub exists: bool,
    /// The key that makes it exist and its ModifyIndex.
    pub key: Option<(String, u64)>,
    /// Creation order: the CreateIndex of that key, else of its oldest node key.
    pub create_index: u64,
    pub meta: VersionMeta,
    /// Live nodes (their key is held by a session) and their state.
    pub nodes: BTreeMap<String, NodeEntry>,
    /// Why nodes failed it, as they reported (held by their session).
    pub reasons: BTreeMap<String, FailReason>,
    /// The restart (`RolloutPlan::restart`) each node ran last, as it
    /// reported (held by its session).
    pub restarted: BTreeMap<String, u64>,
    /// The hook each node has been running for a while, and since when
    /// (milliseconds since the Unix epoch), as it reported (held by its
    /// session).
    pub hooks: BTreeMap<String, (String, u64)>,
    /// How each node's fetch of the version's artifact goes (bytes, rate,
    /// from where), as it noted with its `fetch` hook (shown safely).
    pub fetches: BTreeMap<String, String>,
}

/// The whole tree under a prefix, as the CLI reads it (`?recurse`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tree {
    pub current: Option<CurrentKey>,
    pub versions: BTreeMap<VersionName, VersionInfo>,
    /// The live agents that follow the prefix (their key held by a session).
    pub agents: BTreeMap<String, AgentRecord>,
    /// Every agent that has followed the prefix, live or not (`.known`),
    /// until `depro forget`.
    pub known: BTreeMap<String, AgentRecord>,
    /// A progressive rollout under way, and its key's ModifyIndex.
    pub rollout: Option<(RolloutPlan, u64)>,
    /// The record of the last switches, and its key's ModifyIndex.
    pub history: History,
    pub history_index: u64,
    /// The records of the last removals (`.removed`) and their
    /// ModifyIndex, by version.
    pub removals: BTreeMap<String, (Removal, u64)>,
    /// The rollout policy, and its key's ModifyIndex.
    pub policy: Option<(Policy, u64)>,
    /// Who drives the rollout's waves (`.driver`, held), if a command does.
    pub driver: Option<String>,
    /// Names that are not valid versions, and node keys with bad values.
    pub ignored: BTreeSet<String>,
}

impl Tree {
    /// The oldest removal records to delete when `version` is removed, so
    /// that at most [`REMOVALS_KEPT`] stay (a few per removal, so that the
    /// transaction stays small; the next removals delete the rest).
    pub(crate) fn removals_beyond_bound(&self, version: &VersionName) -> Vec<VersionName> {
        let mut oldest: Vec<(u64, &String)> = self
            .removals
            .iter()
            .filter(|(name, _)| *name != version.as_str())
            .map(|(name, (_, index))| (*index, name))
            .collect();
        oldest.sort();
        let beyond = (oldest.len() + 1).saturating_sub(REMOVALS_KEPT);
        oldest[..beyond.min(8)]
            .iter()
            .filter_map(|(_, name)| VersionName::parse(name).ok())
            .collect()
    }

    pub(crate) fn parse(prefix: &Prefix, entries: &[KvEntry]) -> Tree {
        let mut tree = Tree::default();
        for entry in entries {
            let Some(rest) = entry.key.strip_prefix(prefix.as_dir()) else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            if rest == "current" {
                tree.current = Some(CurrentKey::from_entry(entry));
                continue;
            }
            if rest == CHANGED || rest == SCOUT {
                continue;
            }
            if rest == ROLLOUT {
                tree.rollout = RolloutPlan::parse(&entry.value).map(|p| (p, entry.modify_index));
                continue;
            }
            if rest == HISTORY {
                tree.history = History::parse(&entry.value);
                tree.history_index = entry.modify_index;
                continue;
            }
            if rest == DRIVER {
                tree.driver = entry.session.is_some().then(|| driver_of(&entry.value));
                continue;
            }
            if rest == POLICY {
                tree.policy = Policy::parse(&entry.value).map(|p| (p, entry.modify_index));
                continue;
            }
            if let Some(name) = rest.strip_prefix(REMOVED).and_then(|r| r.strip_prefix('/')) {
                if VersionName::parse(name).is_ok() {
                    let record = Removal::parse(&entry.value);
                    tree.removals
                        .insert(name.to_string(), (record, entry.modify_index));
                }
                continue;
            }
            if let Some(node) = rest.strip_prefix(KNOWN).and_then(|r| r.strip_prefix('/')) {
                if check_node_name(node).is_ok() {
                    let record = serde_json::from_slice(&entry.value).unwrap_or_default();
                    tree.known.insert(node.to_string(), record);
                }
                continue;
            }
            if let Some(node) = rest.strip_prefix(AGENTS).and_then(|r| r.strip_prefix('/')) {
                if entry.session.is_some() && check_node_name(node).is_ok() {
                    let record = serde_json::from_slice(&entry.value).unwrap_or_default();
                    tree.agents.insert(node.to_string(), record);
                }
                continue;
            }
            let (name, node) = match rest.split_once('/') {
                Some((name, node)) => (name, Some(node)),
                None => (rest, None),
            };
            let Ok(version) = VersionName::parse(name) else {
                tree.ignored
                    .insert(format!("{name}{}", if node.is_some() { "/" } else { "" }));
                continue;
            };
            let info = tree.versions.entry(version).or_default();
            if let Some(reason_of) = node
                .and_then(|n| n.strip_prefix(REASON))
                .and_then(|n| n.strip_prefix('/'))
            {
                if entry.session.is_some() && check_node_name(reason_of).is_ok() {
                    info.reasons
                        .insert(reason_of.to_string(), FailReason::parse(&entry.value));
                }
                continue;
            }
            if let Some(hook_of) = node
                .and_then(|n| n.strip_prefix(HOOK))
                .and_then(|n| n.strip_prefix('/'))
            {
                // A fetch's note says how it goes on a second line.
                let (first, detail) = match entry.value.iter().position(|&b| b == b'\n') {
                    Some(at) => entry.value.split_at(at),
                    None => (&entry.value[..], &[][..]),
                };
                let hook = match first.trim_ascii() {
                    b"deploy" => "deploy",
                    b"rollout" => "rollout",
                    b"health" => "health",
                    b"clean" => "clean",
                    b"fetch" => "fetch",
                    _ => continue,
                };
                if entry.session.is_some() && check_node_name(hook_of).is_ok() {
                    info.hooks
                        .insert(hook_of.to_string(), (hook.to_string(), entry.flags));
                    let detail = String::from_utf8_lossy(detail.trim_ascii());
                    if hook == "fetch" && !detail.is_empty() {
                        info.fetches.insert(hook_of.to_string(), shown(&detail));
                    }
                }
                continue;
            }
            if let Some(restarted_by) = node
                .and_then(|n| n.strip_prefix(RESTARTED))
                .and_then(|n| n.strip_prefix('/'))
            {
                let id = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|t| t.trim().parse().ok());
                if let (Some(_), Ok(()), Some(id)) =
                    (&entry.session, check_node_name(restarted_by), id)
                {
                    info.restarted.insert(restarted_by.to_string(), id);
                }
                continue;
            }
            match node {
                None | Some("") => {
                    info.exists = true;
                    info.key = Some((entry.key.clone(), entry.modify_index));
                    info.create_index = entry.create_index;
                    info.meta = VersionMeta::parse(&entry.value);
                }
                Some(node) => {
                    let state = NodeState::parse(entry.value.trim_ascii());
                    match (check_node_name(node), state, &entry.session) {
                        (Ok(()), Some(state), Some(session)) => {
                            info.nodes.insert(
                                node.to_string(),
                                NodeEntry {
                                    state,
                                    modify_index: entry.modify_index,
                                    since_ms: entry.flags,
                                    session: session.clone(),
                                },
                            );
                        }
                        (_, _, None) => {} // its agent's session is gone
                        _ => {
                            tree.ignored.insert(format!("{name}/{node}"));
                        }
                    }
                    if !info.exists
                        && (info.create_index == 0 || entry.create_index < info.create_index)
                    {
                        info.create_index = entry.create_index;
                    }
                }
            }
        }
        tree
    }

    /// The progressive rollout under way and its index, if it still
    /// applies: `current` has not moved since it started.
    pub(crate) fn rollout_in_effect(&self) -> Option<&(RolloutPlan, u64)> {
        let index = self.current.as_ref().map_or(0, |c| c.modify_index);
        self.rollout
            .as_ref()
            .filter(|(plan, _)| plan.applies_to(index) && self.plan_version_exists(plan))
    }

    /// Whether the version a plan rolls out is in the tree (agents ignore a
    /// plan for a version that is not).
    pub(crate) fn plan_version_exists(&self, plan: &RolloutPlan) -> bool {
        VersionName::parse(&plan.version)
            .ok()
            .and_then(|v| self.versions.get(&v))
            .is_some_and(|info| info.exists)
    }

    /// The version `current` names, if valid.
    pub(crate) fn current_version(&self) -> Option<&VersionName> {
        self.current.as_ref().and_then(|c| c.version.as_ref())
    }

    /// Versions in creation order, the oldest first.
    pub(crate) fn in_creation_order(&self) -> Vec<(&VersionName, &VersionInfo)> {
        let mut versions: Vec<_> = self.versions.iter().collect();
        versions.sort_by_key(|(name, info)| (info.create_index, (*name).clone()));
        versions
    }

    /// The version that was current before the present one: the one most
    /// recently made current by depro; failing any history, the newest one
    /// created before the present one. Only versions that still exist and
    /// are good (see [`Tree::is_good`]): never one that failed everywhere
    /// or that `current` was rolled back from.
    pub(crate) fn previous(&self) -> Option<&VersionName> {
        let current = self.current_version();
        let candidates = || {
            self.versions
                .iter()
                .filter(|(v, info)| info.exists && Some(*v) != current && self.is_good(v))
        };
        if let Some((version, _)) = candidates()
            .filter(|(_, info)| info.meta.current_order.is_some())
            .max_by_key(|(_, info)| info.meta.current_order)
        {
            return Some(version);
        }
        let current_created = current
            .and_then(|c| self.versions.get(c))
            .map_or(u64::MAX, |i| i.create_index);
        candidates()
            .filter(|(_, info)| info.create_index < current_created)
            .max_by_key(|(_, info)| info.create_index)
            .map(|(version, _)| version)
    }

    /// What `prune -keep=K` removes: the versions beyond the K newest that
    /// did not fail, but never `current` nor the version `rollback` would
    /// go back to. A failed version does not count among the K, and is
    /// removed only with `failed` (`prune -failed`). Oldest first.
    pub(crate) fn prune(&self, keep: usize, failed: bool) -> Vec<VersionName> {
        let existing: Vec<&VersionName> = self
            .in_creation_order()
            .into_iter()
            .filter(|(_, i)| i.exists)
            .map(|(v, _)| v)
            .collect();
        let protected = [self.current_version(), self.previous()];
        let mut kept = 0;
        let mut removed: Vec<VersionName> = Vec::new();
        for version in existing.iter().rev() {
            if protected.contains(&Some(*version)) {
                kept += 1;
                continue;
            }
            if self.failed_everywhere(version) {
                if failed {
                    removed.push((*version).clone());
                }
                continue;
            }
            if kept < keep {
                kept += 1;
            } else {
                removed.push((*version).clone());
            }
        }
        removed.reverse();
        removed
    }

    /// A version that failed on every node that reported on it (at least
    /// one): it never ran anywhere.
    pub(crate) fn failed_everywhere(&self, version: &VersionName) -> bool {
        self.versions.get(version).is_some_and(|info| {
            !info.nodes.is_empty() && info.nodes.values().all(|e| e.state == NodeState::Failed)
        })
    }

    /// A version `current` was last rolled back from (the newest switch
    /// that names it, in `.history`, is a rollback away from it).
    pub(crate) fn rolled_back_from(&self, version: &VersionName) -> bool {
        let name = version.as_str();
        self.history
            .switches
            .iter()
            .find(|s| s.version == name || s.from == name)
            .is_some_and(|s| s.from == name && s.how.starts_with("rollback"))
    }

    /// A version `rollback` may go back to by itself: not failed
    /// everywhere, not rolled back from.
    pub(crate) fn is_good(&self, version: &VersionName) -> bool {
        !self.failed_everywhere(version) && !self.rolled_back_from(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str) -> VersionName {
        VersionName::parse(name).unwrap()
    }

    #[test]
    fn a_removal_past_the_bound_forgets_the_oldest_records_and_never_its_own() {
        let prefix = Prefix::parse("app/version").unwrap();
        let record = |i: u64| {
            KvEntry::sample(
                &format!("app/version/.removed/r{i}"),
                r#"{"by":"ann","created":1}"#,
                false,
                1000 - i,
            )
        };
        let full: Vec<_> = (0..REMOVALS_KEPT as u64).map(record).collect();
        let tree = Tree::parse(&prefix, &full);
        assert_eq!(tree.removals.len(), REMOVALS_KEPT);
        assert_eq!(tree.removals["r3"].0.by, "ann");
        // r99 is the oldest (lowest index): it goes, to make room.
        assert_eq!(tree.removals_beyond_bound(&v("new")), [v("r99")]);
        // Removing r99's version again rewrites its record: nothing goes.
        assert!(tree.removals_beyond_bound(&v("r99")).is_empty());
        let under: Vec<_> = full[1..].to_vec();
        assert!(
            Tree::parse(&prefix, &under)
                .removals_beyond_bound(&v("new"))
                .is_empty()
        );
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
    fn bidirectional_controls_are_escaped_in_output_lines_and_values() {
        // "evil\u{202E}txt.exe" shows as "evilexe.txt" on a terminal.
        let line = "evil\u{202E}txt.exe and \u{2066}isolated\u{2069}";
        assert_eq!(
            shown_line(line),
            "evil\\u{202e}txt.exe and \\u{2066}isolated\\u{2069}"
        );
        assert!(!shown("v\u{202E}1").contains('\u{202E}'));
        assert_eq!(
            shown_line("tab\tkept, ünïcödé kept"),
            "tab\tkept, ünïcödé kept"
        );
    }

    #[test]
    fn untrusted_values_are_shown_escaped_and_bounded() {
        assert_eq!(shown("v1"), "v1");
        assert_eq!(shown("a\x1b[31mb\n"), "a\\u{1b}[31mb\\n");
        let huge = "x".repeat(511 * 1024);
        let text = shown(&huge);
        assert!(text.len() < 120, "{}", text.len());
        assert!(text.ends_with(&format!("({} bytes)", huge.len())), "{text}");
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
            "api/version/.changed",
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

    fn entry(key: &str, value: &str, session: bool, create: u64) -> KvEntry {
        KvEntry::sample(key, value, session, create)
    }

    fn sample() -> Tree {
        let p = Prefix::parse("app").unwrap();
        let meta = |order: u64| format!(r#"{{"current_order": {order}}}"#);
        Tree::parse(
            &p,
            &[
                entry("app/current", "v3", false, 50),
                entry("app/v1/", &meta(10), false, 5),
                entry("app/v1/n1", "ready", true, 6),
                entry("app/v2/", "", false, 20),
                entry("app/v2/n1", "failed", true, 21),
                entry("app/v2/gone", "ready", false, 22),
                entry("app/v3/", &meta(40), false, 30),
                entry("app/v3/n1", "active", true, 31),
                entry("app/v3/n2", "bogus", true, 32),
                entry("app/old/n1", "ready", true, 2),
                entry("app/../", "", false, 3),
                // depro's own keys: neither versions nor strangers.
                entry("app/.changed", "ring", false, 51),
                entry("app/.scout", "n1", true, 52),
            ],
        )
    }

    #[test]
    fn a_tree_knows_versions_nodes_current_and_strangers() {
        let tree = sample();
        assert_eq!(tree.current_version(), Some(&v("v3")));
        assert_eq!(
            tree.versions[&v("v2")].nodes.len(),
            1,
            "keys without a session are not listed"
        );
        assert_eq!(tree.versions[&v("v2")].nodes["n1"].state, NodeState::Failed);
        assert!(
            !tree.versions[&v("old")].exists,
            "only node keys left: being purged"
        );
        assert_eq!(
            tree.ignored,
            BTreeSet::from(["../".to_string(), "v3/n2".to_string()])
        );
        let order: Vec<&str> = tree
            .in_creation_order()
            .iter()
            .map(|(v, _)| v.as_str())
            .collect();
        assert_eq!(order, ["old", "v1", "v2", "v3"]);
    }

    #[test]
    fn a_restart_is_never_the_same_rollout_as_another_restart_or_a_rollout() {
        let plan = RolloutPlan {
            version: "v1".into(),
            base: "v1".into(),
            restart: Some(1),
            ..RolloutPlan::default()
        };
        let paused = RolloutPlan {
            paused: Some("ops".into()),
            ..plan.clone()
        };
        assert!(plan.same_rollout(&paused), "a pause changes nothing else");
        for restart in [Some(2), None] {
            let other = RolloutPlan {
                restart,
                ..plan.clone()
            };
            assert!(!plan.same_rollout(&other), "{restart:?}");
        }
    }

    #[test]
    fn a_version_s_metadata_keeps_the_fields_of_a_newer_depro_when_rewritten() {
        let value = br#"{"created_by":"ops@b1","artifact":{"url":"http://o/v1","sha256":"ab","size":3},"signature":{"key":"k"}}"#;
        let mut meta = VersionMeta::parse(value);
        assert_eq!(meta.artifact.as_ref().unwrap().size, Some(3));
        meta.current_by = Some("ops@b2".into());
        let again: serde_json::Value = serde_json::from_slice(&meta.to_json()).unwrap();
        assert_eq!(again["signature"]["key"], "k");
        assert_eq!(again["artifact"]["url"], "http://o/v1");
        assert_eq!(again["current_by"], "ops@b2");
    }

    #[test]
    fn previous_is_the_last_version_made_current_before_this_one() {
        let tree = sample();
        assert_eq!(tree.previous(), Some(&v("v1")));
    }

    #[test]
    fn without_history_previous_is_the_newest_created_before_current() {
        let p = Prefix::parse("app").unwrap();
        let tree = Tree::parse(
            &p,
            &[
                entry("app/current", "b", false, 9),
                entry("app/a/", "", false, 1),
                entry("app/b/", "", false, 2),
                entry("app/c/", "", false, 3),
            ],
        );
        assert_eq!(tree.previous(), Some(&v("a")));
    }

    #[test]
    fn prune_keeps_current_and_previous_and_counts_no_failed_version() {
        let tree = sample();
        // Existing, oldest first: v1 (previous), v2, v3 (current).
        // v2 failed on its only node: it counts among none, and goes only
        // with -failed.
        assert!(tree.prune(1, false).is_empty());
        assert!(tree.prune(0, false).is_empty());
        assert_eq!(tree.prune(0, true), [v("v2")]);
        assert_eq!(tree.prune(3, true), [v("v2")]);
    }

    /// After v3 failed everywhere and was rolled back from (to v2): the
    /// tree of issue 20's report.
    fn after_a_bad_release() -> Tree {
        let p = Prefix::parse("app").unwrap();
        let meta = |order: u64| format!(r#"{{"current_order": {order}}}"#);
        let history = r#"{"switches": [
            {"version": "v2", "from": "v3", "how": "rollback"},
            {"version": "v3", "from": "v2", "how": "deploy"},
            {"version": "v2", "from": "v1", "how": "deploy"}]}"#;
        Tree::parse(
            &p,
            &[
                entry("app/.history", history, false, 60),
                entry("app/current", "v2", false, 59),
                entry("app/v1/", &meta(10), false, 1),
                entry("app/v1/n1", "ready", true, 2),
                entry("app/v2/", &meta(58), false, 20),
                entry("app/v2/n1", "active", true, 21),
                entry("app/v3/", &meta(40), false, 30),
                entry("app/v3/n1", "failed", true, 31),
                entry("app/v4/", &meta(50), false, 45),
                entry("app/v4/n1", "failed", true, 46),
            ],
        )
    }

    #[test]
    fn rollback_skips_versions_that_failed_everywhere_or_were_rolled_back_from() {
        let tree = after_a_bad_release();
        assert!(tree.rolled_back_from(&v("v3")) && tree.failed_everywhere(&v("v3")));
        assert!(!tree.rolled_back_from(&v("v2")) && !tree.rolled_back_from(&v("v1")));
        assert_eq!(tree.previous(), Some(&v("v1")));
        // Rolled back from, but it ran: still not a target by itself.
        let p = Prefix::parse("app").unwrap();
        let history = r#"{"switches": [{"version": "a", "from": "b", "how": "rollback (waves)"}]}"#;
        let tree = Tree::parse(
            &p,
            &[
                entry("app/.history", history, false, 9),
                entry("app/current", "a", false, 8),
                entry("app/a/", r#"{"current_order": 7}"#, false, 1),
                entry("app/b/", r#"{"current_order": 5}"#, false, 2),
                entry("app/b/n1", "ready", true, 3),
            ],
        );
        assert_eq!(tree.previous(), None);
    }

    #[test]
    fn prune_keeps_good_versions_and_removes_failed_ones_only_when_asked() {
        let tree = after_a_bad_release();
        // Good: v1 (the rollback target), v2 (current). Failed: v3, v4.
        assert!(
            tree.prune(0, false).is_empty(),
            "current and the target stay"
        );
        assert_eq!(tree.prune(0, true), [v("v3"), v("v4")]);
        assert_eq!(tree.prune(2, true), [v("v3"), v("v4")]);
    }
}
