//! One deployment as the agent runs it: its spec, its directory and what
//! the disk holds, what this node reported, its view of the tree, its
//! watches, and the hook that runs in it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::hook_run::{HealthWait, HookRun};
use super::view::View;
use super::watch::{Book, Target, Watches};
use crate::config::Deployment;
use crate::error::{Error, Result};
use crate::hooks;
use crate::local_state::DeploymentDir;
use crate::pacing::Backoff;
use crate::plan::OnDisk;
use crate::tree::{FailReason, NodeState};
use crate::version_name::VersionName;

pub(crate) struct DeploymentState {
    pub spec: Deployment,
    /// The spec's shell has `set -o pipefail` (probed once, not per hook).
    pub pipefail: bool,
    pub dir: DeploymentDir,
    pub disk: OnDisk,
    /// This node's keys in Consul under the current session.
    pub reported: BTreeMap<VersionName, NodeState>,
    pub view: View,
    /// Warnings already given (names under the prefix, invalid current).
    warned: BTreeSet<String>,
    pub backoff: Backoff,
    pub blocked_until: Option<Instant>,
    pub watches: Option<Watches>,
    /// The id the running watches post with.
    pub watch_id: u64,
    /// When to try again to start watches that could not start.
    pub watch_retry: Option<Instant>,
    pub watch_backoff: Backoff,
    /// The versions this node reported `failed`: the tree watch checks that
    /// their keys still exist (an operator deleting one asks for a retry).
    own_failed: Arc<Mutex<BTreeSet<VersionName>>>,
    /// The tree watch's snapshot (see `watch::Book`).
    book: Arc<Mutex<Book>>,
    /// How often at most the tree is read whole.
    pub rescan: Duration,
    /// When to check next that this node's `failed` keys still exist (set
    /// while there are any).
    pub own_check_at: Option<Instant>,
    /// Why versions failed here, to report with their `failed` key.
    pub reasons: BTreeMap<VersionName, FailReason>,
    /// Versions whose reason key this node wrote: deleted with the next
    /// report of another state.
    pub reasons_written: BTreeSet<VersionName>,
    /// This node's announcement under `<prefix>/.agents/` is written under
    /// the current session: its CreateIndex.
    pub announced: Option<u64>,
    /// The hook that runs in this deployment (one at a time).
    pub hook: Option<HookRun>,
    /// When to check again the versions kept because Consul hides them.
    pub kept_check_at: Option<Instant>,
    /// Between two health checks of a rollout.
    pub health_wait: Option<HealthWait>,
    /// The restart (`depro restart`) the rollout under way runs for.
    pub restarting: Option<u64>,
    /// The restarts this node acknowledged under the current session, by
    /// version (`<version>/.restarted/<node>`).
    pub restarts_written: BTreeMap<VersionName, u64>,
    /// The version whose long-running hook this node noted under
    /// `<version>/.hook/<node>` (under the current session).
    pub hook_noted: Option<VersionName>,
    /// The prefix's secret for peers (`<prefix>/.secret`) and when it was
    /// read (again after a while, a reload, a new session).
    pub secret: Option<(std::time::Instant, String)>,
    /// The prefix's agents as last listed for a fetch, and when.
    pub agents_seen: Option<(std::time::Instant, Vec<(String, crate::tree::AgentRecord)>)>,
}

/// How often this node's `failed` keys are checked while it has some: an
/// operator who deletes one by hand (not through the CLI, which rings)
/// asks for a retry.
pub(crate) const OWN_CHECK: Duration = Duration::from_secs(10);

impl DeploymentState {
    /// Opens the deployment's directory (taking its lock), kills the hook
    /// an earlier run left running, and loads what the disk holds.
    pub(crate) fn open(spec: Deployment, rescan: Duration) -> Result<DeploymentState> {
        let wrap = |e: Error| Error::Config(format!("{}.path: {e}", spec.origin));
        let dir = DeploymentDir::open(&spec.path).map_err(wrap)?;
        if let Some(leftover) = dir.leftover_hook() {
            let killed = hooks::kill_leftover(&leftover);
            if killed > 0 {
                log::warn!(
                    "{}: killed {killed} process(es) of the hook an earlier run left running \
                     (process group {})",
                    spec.id,
                    leftover.pgid
                );
            }
            dir.clear_hook().map_err(wrap)?;
        }
        let disk = dir.load().map_err(wrap)?;
        let pipefail = super::reload::shell_pipefail(&spec);
        Ok(DeploymentState {
            spec,
            pipefail,
            dir,
            disk,
            reported: BTreeMap::new(),
            view: View::default(),
            warned: BTreeSet::new(),
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            blocked_until: None,
            watches: None,
            watch_id: 0,
            watch_retry: None,
            watch_backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            own_failed: Arc::default(),
            book: Arc::default(),
            rescan,
            own_check_at: None,
            reasons: BTreeMap::new(),
            reasons_written: BTreeSet::new(),
            announced: None,
            hook: None,
            kept_check_at: None,
            health_wait: None,
            restarting: None,
            restarts_written: BTreeMap::new(),
            hook_noted: None,
            secret: None,
            agents_seen: None,
        })
    }

    pub(crate) fn label(&self, version: &VersionName) -> String {
        format!("{} {version}", self.spec.id)
    }

    pub(crate) fn warn_once(&mut self, what: String) {
        if self.warned.insert(what.clone()) {
            log::warn!("{}: {what}", self.spec.id);
        }
    }

    pub(crate) fn watch_target(&self, node: &str, session: &Arc<Mutex<Option<String>>>) -> Target {
        Target {
            prefix: self.spec.prefix.clone(),
            node: node.to_string(),
            own: self.own_failed.clone(),
            book: self.book.clone(),
            rescan: self.rescan,
            session: session.clone(),
        }
    }

    /// This node's keys are gone or unknown (a new session, Consul's state
    /// replaced): every key is written again by the next plans.
    pub(crate) fn forget_reports(&mut self) {
        self.reported.clear();
        self.restarts_written.clear();
        self.hook_noted = None;
        self.secret = None;
        self.announced = None;
        self.sync_own_failed();
    }

    /// Records a key this node wrote (or deleted, with `None`).
    pub(crate) fn record_report(&mut self, version: &VersionName, state: Option<NodeState>) {
        match state {
            Some(state) => {
                self.reported.insert(version.clone(), state);
            }
            None => {
                self.reported.remove(version);
            }
        }
        self.sync_own_failed();
    }

    /// The versions this node reported `failed`.
    pub(crate) fn own_failed(&self) -> BTreeSet<VersionName> {
        self.own_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn sync_own_failed(&mut self) {
        let failed: BTreeSet<VersionName> = self
            .reported
            .iter()
            .filter(|(_, s)| **s == NodeState::Failed)
            .map(|(v, _)| v.clone())
            .collect();
        self.own_check_at = match (failed.is_empty(), self.own_check_at) {
            (true, _) => None,
            (false, Some(at)) => Some(at),
            (false, None) => Some(Instant::now() + OWN_CHECK),
        };
        *self.own_failed.lock().unwrap_or_else(|e| e.into_inner()) = failed;
    }
}
