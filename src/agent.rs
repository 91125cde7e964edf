//! The agent: one main loop that makes this host follow the Consul tree.
//!
//! Every decision and every write happens on this loop. Other threads only
//! wait and post events to it: watches (blocking queries), the session
//! keeper, and the signal forwarder (which also reports SIGCHLD, so no
//! thread waits for a hook); a hook's output has a reader thread. The loop:
//!
//! 1. takes the events that arrived (observations, a lost session, signals);
//! 2. makes sure a session exists and the watches match what it needs to see;
//! 3. asks [`plan`] what to do for each deployment whose view of the tree is
//!    complete, and executes the first action of one plan (or its leading
//!    reports, in one transaction), round robin across deployments, then
//!    goes back to 1;
//! 4. with nothing to do, sleeps until the next event.
//!
//! Running a hook happens inside the loop too: while it runs, the loop
//! waits for its exit, its timeout, or a signal, and keeps other events for
//! later. So a shutdown can let the hook finish within the grace period.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::cli::AgentArgs;
use crate::config::{self, AgentConfig, Deployment};
use crate::consul::{Consul, TxnOp};
use crate::error::{Error, Result};
use crate::hooks::{self, Hook, HookKind};
use crate::local_state::DeploymentDir;
use crate::pacing::Backoff;
use crate::plan::{Action, LocalVersion, OnDisk, Reports, RolloutAttempt, Wanted, plan};
use crate::session::{self, Keeper};
use crate::signals::{self, Signal};
use crate::tree::{Listing, NodeState};
use crate::version_name::VersionName;
use crate::watch::{self, Health, Seen, Target, WatchHandle};

/// After SIGTERM to a hook's process group, how long until SIGKILL.
const KILL_AFTER: Duration = Duration::from_secs(5);
/// While a hook runs, how often to check on it besides SIGCHLD.
const CHILD_POLL: Duration = Duration::from_secs(1);

/// What the other threads tell the main loop.
pub(crate) enum Event {
    Seen { watch: u64, seen: Seen },
    SessionLost { session: String },
    Signal(Signal),
}

/// Runs the agent until it is told to stop.
pub(crate) fn run(args: AgentArgs) -> Result<()> {
    let config = config::resolve_agent(&args, &config::process_env)?;
    crate::logging::init(config.log_level);
    let (tx, rx) = mpsc::channel();
    let signal_tx = tx.clone();
    signals::forward(move |signal| signal_tx.send(Event::Signal(signal)).is_ok())
        .map_err(|e| Error::Config(format!("cannot install signal handlers: {e}")))?;
    let mut agent = Agent::new(args, config, tx, rx)?;
    agent.run();
    Ok(())
}

/// Why the main loop watches something.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Purpose {
    /// The names under the prefix.
    Listing,
    /// `<prefix>/current`.
    Current,
    /// `<prefix>/<version>/`: does the version still exist?
    Folder(VersionName),
    /// This node's key of a version it reported `failed`: an operator
    /// deleting it asks for a retry.
    OwnKey(VersionName),
}

type WatchKey = (String, Purpose);

struct RunningWatch {
    id: u64,
    _handle: WatchHandle,
}

/// What the watches of one deployment have seen so far.
#[derive(Default)]
struct View {
    /// `None` until the listing is seen; `Some(None)` if the prefix is empty.
    listing: Option<Option<Listing>>,
    /// `None` until seen; then the valid version `current` names, if any.
    current: Option<Option<VersionName>>,
    /// Folder keys seen: exists or not.
    folders: BTreeMap<VersionName, bool>,
    /// Folder keys this node re-created, until a watch confirms them.
    repaired: BTreeSet<VersionName>,
}

impl View {
    /// What the tree wants, once everything needed has been seen. `None`
    /// while incomplete, and while the prefix is empty or unreadable: an
    /// agent never cleans because a listing came back empty.
    fn wanted(&self) -> Option<Wanted> {
        let listing = self.listing.as_ref()?.as_ref()?;
        let current = self.current.clone()?;
        let mut versions = listing.plain.clone();
        for version in &listing.folders {
            match self.folders.get(version) {
                None => return None,
                Some(true) => {
                    versions.insert(version.clone());
                }
                Some(false) => {}
            }
        }
        versions.extend(self.repaired.iter().cloned());
        Some(Wanted { versions, current })
    }
}

struct DeploymentState {
    spec: Deployment,
    /// The spec's shell has `set -o pipefail` (probed once, not per hook).
    pipefail: bool,
    dir: DeploymentDir,
    disk: OnDisk,
    /// This node's keys in Consul under the current session.
    reported: BTreeMap<VersionName, NodeState>,
    view: View,
    /// Names under the prefix already warned about.
    warned: BTreeSet<String>,
    backoff: Backoff,
    blocked_until: Option<Instant>,
}

impl DeploymentState {
    fn open(spec: Deployment) -> Result<DeploymentState> {
        let wrap = |e: Error| Error::Config(format!("{}.path: {e}", spec.origin));
        let dir = DeploymentDir::open(&spec.path).map_err(wrap)?;
        if let Some(pgid) = dir.leftover_hook() {
            if hooks::kill_leftover(pgid) {
                log::warn!(
                    "{}: killed the hook (process group {pgid}) an earlier run left running",
                    spec.id
                );
            }
            dir.clear_hook().map_err(wrap)?;
        }
        let disk = dir.load().map_err(wrap)?;
        let pipefail = shell_pipefail(&spec);
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
        })
    }

    fn label(&self, version: &VersionName) -> String {
        format!("{} {version}", self.spec.id)
    }

    fn warn_once(&mut self, what: String) {
        if self.warned.insert(what.clone()) {
            log::warn!("{}: {what}", self.spec.id);
        }
    }
}

struct ActiveSession {
    id: String,
    _keeper: Keeper,
}

struct Agent {
    args: AgentArgs,
    config: AgentConfig,
    consul: Arc<Consul>,
    health: Arc<Health>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    /// Events that arrived while a hook ran, handled after it.
    pending: VecDeque<Event>,
    deployments: Vec<DeploymentState>,
    watches: BTreeMap<WatchKey, RunningWatch>,
    watch_keys: BTreeMap<u64, WatchKey>,
    session: Option<ActiveSession>,
    /// Sessions an earlier run of the agent left; destroyed (and their keys
    /// with them) before a new session takes over.
    stale_sessions: BTreeSet<String>,
    session_retry: Option<Instant>,
    session_backoff: Backoff,
    stopping: bool,
    next_id: u64,
    last_served: usize,
}

/// How an action failed.
enum Failure {
    /// Talking to Consul failed: logged by `Health`, retried with backoff.
    Consul(crate::consul::ConsulError),
    /// Anything else: logged here, retried with backoff.
    Other(String),
}

impl From<crate::consul::ConsulError> for Failure {
    fn from(e: crate::consul::ConsulError) -> Failure {
        Failure::Consul(e)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        match e {
            Error::Consul(e) => Failure::Consul(*e),
            other => Failure::Other(other.to_string()),
        }
    }
}

impl Agent {
    fn new(
        args: AgentArgs,
        config: AgentConfig,
        tx: Sender<Event>,
        rx: Receiver<Event>,
    ) -> Result<Agent> {
        let consul = Arc::new(Consul::new(&config.consul).map_err(Error::Config)?);
        let mut deployments = Vec::new();
        let mut stale_sessions = BTreeSet::new();
        for spec in &config.deployments {
            let state = DeploymentState::open(spec.clone())?;
            stale_sessions.extend(state.dir.saved_session());
            deployments.push(state);
        }
        Ok(Agent {
            args,
            config,
            consul,
            health: Arc::new(Health::default()),
            tx,
            rx,
            pending: VecDeque::new(),
            deployments,
            watches: BTreeMap::new(),
            watch_keys: BTreeMap::new(),
            session: None,
            stale_sessions,
            session_retry: None,
            session_backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(10)),
            stopping: false,
            next_id: 0,
            last_served: 0,
        })
    }

    fn run(&mut self) {
        self.announce();
        loop {
            while let Some(event) = self.pending.pop_front().or_else(|| self.rx.try_recv().ok()) {
                self.handle(event);
            }
            if self.stopping {
                break;
            }
            self.ensure_session();
            self.sync_watches();
            if let Some((index, action)) = self.next_action() {
                self.execute(index, action);
                continue;
            }
            let event = match self.next_wakeup() {
                Some(at) => match self
                    .rx
                    .recv_timeout(at.saturating_duration_since(Instant::now()))
                {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match self.rx.recv() {
                    Ok(event) => event,
                    Err(_) => break,
                },
            };
            self.handle(event);
        }
        self.shut_down();
    }

    fn announce(&self) {
        if self.deployments.is_empty() {
            log::info!(
                "depro agent {} is idle: no deployments configured ({}); add a config and reload (SIGHUP)",
                self.config.name,
                describe_files(&self.config.files)
            );
        } else {
            let ids: Vec<&str> = self
                .deployments
                .iter()
                .map(|d| d.spec.id.as_str())
                .collect();
            log::info!(
                "depro agent {} follows {} via Consul at {}",
                self.config.name,
                ids.join(", "),
                self.consul.server()
            );
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    // ---- events ----

    fn handle(&mut self, event: Event) {
        match event {
            Event::Seen { watch, seen } => self.seen(watch, seen),
            Event::SessionLost { session } => {
                if self.session.as_ref().is_some_and(|s| s.id == session) {
                    log::warn!(
                        "the Consul session expired or was lost; making a new one and registering again"
                    );
                    self.session = None;
                    for deployment in &mut self.deployments {
                        deployment.reported.clear();
                    }
                }
            }
            Event::Signal(Signal::ChildExited) => {} // no hook runs now
            Event::Signal(Signal::Stop(number)) => self.stop(number),
            Event::Signal(Signal::Reload) => self.reload(),
        }
    }

    fn stop(&mut self, number: i32) {
        if self.stopping {
            log::warn!("{} again: exiting now", signals::name(number));
            std::process::exit(128 + number);
        }
        log::info!("{}: shutting down", signals::name(number));
        self.stopping = true;
    }

    fn seen(&mut self, watch: u64, seen: Seen) {
        let Some((id, purpose)) = self.watch_keys.get(&watch).cloned() else {
            return; // a watch stopped since
        };
        let Some(index) = self.deployments.iter().position(|d| d.spec.id == id) else {
            return;
        };
        let have_session = self.session.is_some();
        let deployment = &mut self.deployments[index];
        match (purpose, seen) {
            (Purpose::Listing, Seen::Keys(keys)) => {
                let listing = keys.map(|keys| Listing::parse(&deployment.spec.prefix, &keys));
                if let Some(listing) = &listing {
                    for name in &listing.ignored {
                        deployment.warn_once(format!(
                            "ignoring {:?} under {}: not a valid version name",
                            name, deployment.spec.prefix
                        ));
                    }
                } else if deployment.view.listing.as_ref().is_none_or(Option::is_some) {
                    log::info!(
                        "{}: nothing under {} yet (or the token cannot read it); waiting",
                        deployment.spec.id,
                        deployment.spec.prefix
                    );
                }
                deployment.view.listing = Some(listing);
            }
            (Purpose::Current, Seen::Key(value)) => {
                let text = value.map(|v| String::from_utf8_lossy(&v).trim().to_string());
                let current = match text.as_deref() {
                    None | Some("") => None,
                    Some(text) => match VersionName::parse(text) {
                        Ok(version) => Some(version),
                        Err(why) => {
                            deployment.warn_once(format!(
                                "ignoring {}current = {text:?}: {why}",
                                deployment.spec.prefix.as_dir()
                            ));
                            None
                        }
                    },
                };
                deployment.view.current = Some(current);
            }
            (Purpose::Folder(version), Seen::Key(value)) => {
                if value.is_none() {
                    log::debug!("{}: the folder key is gone", deployment.label(&version));
                }
                deployment.view.repaired.remove(&version);
                deployment.view.folders.insert(version, value.is_some());
            }
            (Purpose::OwnKey(version), Seen::Key(None)) => {
                let failed = deployment.reported.get(&version) == Some(&NodeState::Failed);
                if failed && have_session {
                    retry(deployment, &version);
                }
            }
            _ => {}
        }
    }

    // ---- session and watches ----

    fn ensure_session(&mut self) {
        if self.session.is_some() || self.deployments.is_empty() {
            return;
        }
        if self.session_retry.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let result = self.make_session();
        match result {
            Ok(id) => {
                self.health.reachable(&self.consul);
                self.session_backoff.reset();
                self.session_retry = None;
                log::info!("registered with Consul (session {id})");
                for deployment in &mut self.deployments {
                    deployment.reported.clear();
                    if let Err(e) = deployment.dir.save_session(Some(&id)) {
                        log::warn!("{}: {e}", deployment.spec.id);
                    }
                }
                let tx = self.tx.clone();
                let lost = id.clone();
                let keeper = session::keep_alive(
                    self.consul.clone(),
                    id.clone(),
                    self.config.session_ttl,
                    self.health.clone(),
                    move || {
                        let _ = tx.send(Event::SessionLost { session: lost });
                    },
                );
                self.session = Some(ActiveSession {
                    id,
                    _keeper: keeper,
                });
            }
            Err(e) => {
                self.health.unreachable(&e);
                self.session_retry = Some(Instant::now() + self.session_backoff.next_delay());
            }
        }
    }

    fn make_session(&mut self) -> std::result::Result<String, crate::consul::ConsulError> {
        while let Some(old) = self.stale_sessions.first().cloned() {
            self.consul.destroy_session(&old)?;
            log::info!("destroyed the session {old} of an earlier run");
            self.stale_sessions.remove(&old);
        }
        let name = format!("depro agent {}", self.config.name);
        self.consul.create_session(&name, self.config.session_ttl)
    }

    /// Starts the watches the deployments need and stops the others.
    fn sync_watches(&mut self) {
        let mut desired: BTreeMap<WatchKey, Target> = BTreeMap::new();
        for deployment in &self.deployments {
            let spec = &deployment.spec;
            let id = &spec.id;
            desired.insert(
                (id.clone(), Purpose::Listing),
                Target::Keys {
                    prefix: spec.prefix.as_dir().to_string(),
                },
            );
            desired.insert(
                (id.clone(), Purpose::Current),
                Target::Key {
                    key: spec.prefix.current_key(),
                    consistent: false,
                },
            );
            if let Some(Some(listing)) = &deployment.view.listing {
                for version in &listing.folders {
                    desired.insert(
                        (id.clone(), Purpose::Folder(version.clone())),
                        Target::Key {
                            key: spec.prefix.folder_key(version),
                            consistent: false,
                        },
                    );
                }
            }
            for (version, state) in &deployment.reported {
                if *state == NodeState::Failed {
                    desired.insert(
                        (id.clone(), Purpose::OwnKey(version.clone())),
                        Target::Key {
                            key: spec.prefix.node_key(version, &self.config.name),
                            consistent: true,
                        },
                    );
                }
            }
        }
        let obsolete: Vec<WatchKey> = self
            .watches
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in obsolete {
            if let Some(watch) = self.watches.remove(&key) {
                self.watch_keys.remove(&watch.id);
            }
            if let (id, Purpose::Folder(version)) = &key {
                if let Some(deployment) = self.deployments.iter_mut().find(|d| &d.spec.id == id) {
                    deployment.view.folders.remove(version);
                }
            }
        }
        for (key, target) in desired {
            if self.watches.contains_key(&key) {
                continue;
            }
            let id = self.next_id();
            let tx = self.tx.clone();
            let handle = watch::spawn(
                self.consul.clone(),
                target,
                self.health.clone(),
                move |seen| tx.send(Event::Seen { watch: id, seen }).is_ok(),
            );
            self.watch_keys.insert(id, key.clone());
            self.watches.insert(
                key,
                RunningWatch {
                    id,
                    _handle: handle,
                },
            );
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let mut at = self
            .session_retry
            .filter(|_| self.session.is_none() && !self.deployments.is_empty());
        for deployment in &self.deployments {
            if let Some(blocked) = deployment.blocked_until {
                at = Some(at.map_or(blocked, |a| a.min(blocked)));
            }
        }
        at
    }

    // ---- planning and doing ----

    /// The next thing to do: one action, or the leading run of a plan's
    /// reports (written in one transaction).
    fn next_action(&mut self) -> Option<(usize, Vec<Action>)> {
        let count = self.deployments.len();
        let now = Instant::now();
        for k in 0..count {
            let index = (self.last_served + 1 + k) % count;
            let deployment = &mut self.deployments[index];
            if deployment.blocked_until.is_some_and(|at| at > now) {
                continue;
            }
            deployment.blocked_until = None;
            let Some(wanted) = deployment.view.wanted() else {
                continue;
            };
            let reports = match self.session {
                Some(_) => Reports::Online(&deployment.reported),
                None => Reports::Offline,
            };
            let actions = plan(&wanted, &deployment.disk, reports);
            let reports = actions.iter().take_while(|a| is_report(a)).count();
            // Consul takes at most 64 operations in one transaction.
            let batch: Vec<Action> = actions.into_iter().take(reports.clamp(1, 64)).collect();
            if !batch.is_empty() {
                self.last_served = index;
                return Some((index, batch));
            }
        }
        None
    }

    fn execute(&mut self, index: usize, mut batch: Vec<Action>) {
        log::debug!("{}: {batch:?}", self.deployments[index].spec.id);
        if batch.iter().all(is_report) {
            let result = self.report(index, &batch);
            return self.settle(index, result);
        }
        let result = match batch.swap_remove(0) {
            Action::Report(..) | Action::Unreport(_) => unreachable!("reports are batched"),
            Action::Repair(version) => self.repair(index, &version),
            Action::Stage(version) => self.stage(index, &version),
            Action::Deploy(version) => self.deploy(index, &version),
            Action::Rollout { to, from } => self.rollout(index, &to, from.as_ref()),
            Action::Clean(version) => self.clean(index, &version),
        };
        self.settle(index, result);
    }

    /// After an action: reset the deployment's backoff, or log and back off.
    fn settle(&mut self, index: usize, result: std::result::Result<(), Failure>) {
        let deployment = &mut self.deployments[index];
        match result {
            Ok(()) => deployment.backoff.reset(),
            Err(failure) => {
                match failure {
                    Failure::Consul(e) => self.health.unreachable(&e),
                    Failure::Other(message) => log::error!("{}: {message}", deployment.spec.id),
                }
                deployment.blocked_until = Some(Instant::now() + deployment.backoff.next_delay());
            }
        }
    }

    /// Writes (or deletes) this node's keys for several versions in one
    /// transaction: one write for Consul, one wake-up for the other agents.
    fn report(&mut self, index: usize, batch: &[Action]) -> std::result::Result<(), Failure> {
        let Some(session) = &self.session else {
            return Ok(());
        };
        let deployment = &mut self.deployments[index];
        let name = &self.config.name;
        let keys: Vec<String> = batch
            .iter()
            .map(|action| match action {
                Action::Report(version, _) | Action::Unreport(version) => {
                    deployment.spec.prefix.node_key(version, name)
                }
                _ => unreachable!("only reports are batched"),
            })
            .collect();
        let ops: Vec<TxnOp<'_>> = batch
            .iter()
            .zip(&keys)
            .map(|(action, key)| match action {
                Action::Report(_, state) => TxnOp::Lock {
                    key,
                    value: state.as_str().as_bytes(),
                    session: &session.id,
                },
                _ => TxnOp::Delete { key },
            })
            .collect();
        if !matches!(
            self.consul.txn(&ops)?,
            crate::consul::TxnOutcome::Committed(_)
        ) {
            return Err(Failure::Other(format!(
                "Consul refused to let this node write {keys:?}: another session holds one of them. \
                 Is another agent named {name:?} running? Give each agent its own -name"
            )));
        }
        self.health.reachable(&self.consul);
        for action in batch {
            match action {
                Action::Report(version, state) => {
                    log::info!("{}: {state}", deployment.label(version));
                    deployment.reported.insert(version.clone(), *state);
                }
                Action::Unreport(version) => {
                    log::info!("{}: removed", deployment.label(version));
                    deployment.reported.remove(version);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn repair(&mut self, index: usize, version: &VersionName) -> std::result::Result<(), Failure> {
        let deployment = &mut self.deployments[index];
        let key = deployment.spec.prefix.folder_key(version);
        if self.consul.create(&key, b"")? {
            log::warn!(
                "{}: current names {version} but its folder key was missing; re-created it",
                deployment.spec.id
            );
        }
        deployment.view.repaired.insert(version.clone());
        Ok(())
    }

    fn stage(&mut self, index: usize, version: &VersionName) -> std::result::Result<(), Failure> {
        let deployment = &mut self.deployments[index];
        match deployment.dir.stage(version) {
            Ok(()) => {
                deployment
                    .disk
                    .versions
                    .insert(version.clone(), LocalVersion::Deploying);
                Ok(())
            }
            Err(Error::Refused(why)) => {
                log::error!("{}: {why}", deployment.label(version));
                deployment
                    .disk
                    .versions
                    .insert(version.clone(), LocalVersion::DeployFailed);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn deploy(&mut self, index: usize, version: &VersionName) -> std::result::Result<(), Failure> {
        let dir = self.deployments[index].dir.fresh_version_dir(version)?;
        log::info!(
            "{}: deploying into {}",
            self.deployments[index].label(version),
            dir.display()
        );
        let outcome = self.run_hook(index, HookKind::Deploy, version, dir, None);
        let deployment = &mut self.deployments[index];
        match outcome {
            Ok(()) => {
                deployment.dir.mark_ready(version)?;
                deployment
                    .disk
                    .versions
                    .insert(version.clone(), LocalVersion::Ready);
                log::info!("{}: deployed", deployment.label(version));
            }
            Err(why) => {
                deployment
                    .disk
                    .versions
                    .insert(version.clone(), LocalVersion::DeployFailed);
                log::error!(
                    "{}: the deploy hook {why}; reporting failed (fix it, then run `depro deploy {version}` again to retry)",
                    deployment.label(version)
                );
            }
        }
        Ok(())
    }

    fn rollout(
        &mut self,
        index: usize,
        to: &VersionName,
        from: Option<&VersionName>,
    ) -> std::result::Result<(), Failure> {
        let deployment = &mut self.deployments[index];
        deployment.dir.begin_rollout(to)?;
        deployment.disk.rollout = Some(RolloutAttempt { to: to.clone() });
        let from_text = from
            .map(|v| v.to_string())
            .unwrap_or_else(|| "nothing".into());
        log::info!("{}: rolling out (from {from_text})", deployment.label(to));
        let cwd = deployment.spec.path.clone();
        let outcome = self.run_hook(index, HookKind::Rollout, to, cwd, Some(from));
        let deployment = &mut self.deployments[index];
        match outcome {
            Ok(()) => {
                deployment.dir.finish_rollout(to)?;
                deployment.disk.live = Some(to.clone());
                deployment.disk.rollout = None;
                log::info!("{}: live", deployment.label(to));
            }
            Err(why) => {
                // The rollout stays unsettled (so the next one runs whatever
                // current is) and the version failed until an operator retries.
                deployment.disk.rollout_failed.insert(to.clone());
                log::error!(
                    "{}: the rollout hook {why}; reporting failed",
                    deployment.label(to)
                );
            }
        }
        Ok(())
    }

    fn clean(&mut self, index: usize, version: &VersionName) -> std::result::Result<(), Failure> {
        let deployment = &self.deployments[index];
        let cwd = deployment.spec.path.clone();
        log::info!("{}: cleaning", deployment.label(version));
        if deployment.dir.owns(version) {
            if let Err(why) = self.run_hook(index, HookKind::Clean, version, cwd, None) {
                log::warn!(
                    "{}: the clean hook {why}; removing the directory anyway",
                    self.deployments[index].label(version)
                );
            }
        }
        let deployment = &mut self.deployments[index];
        deployment.dir.remove_version(version)?;
        deployment.disk.versions.remove(version);
        deployment.disk.rollout_failed.remove(version);
        Ok(())
    }

    /// Runs a hook to its end, its timeout, or the end of the shutdown
    /// grace period. Other events that arrive meanwhile are kept for later.
    fn run_hook(
        &mut self,
        index: usize,
        kind: HookKind,
        version: &VersionName,
        cwd: PathBuf,
        previous: Option<Option<&VersionName>>,
    ) -> std::result::Result<(), String> {
        let spec = &self.deployments[index].spec;
        let lines = match kind {
            HookKind::Deploy => &spec.deploy,
            HookKind::Rollout => &spec.rollout,
            HookKind::Clean => &spec.clean,
        };
        if lines.is_empty() {
            return Ok(());
        }
        let mut env = vec![
            ("VERSION", version.to_string()),
            ("DEPLOYMENT_ID", spec.id.clone()),
            ("DEPLOYMENT_PATH", spec.path.display().to_string()),
            ("DEPLOYMENT_PREFIX", spec.prefix.to_string()),
            ("AGENT_NAME", self.config.name.clone()),
            (
                "VERSION_PATH",
                spec.path.join(version.as_str()).display().to_string(),
            ),
        ];
        if let Some(previous) = previous {
            env.push((
                "PREVIOUS_VERSION",
                previous.map(|v| v.to_string()).unwrap_or_default(),
            ));
        }
        let timeout = spec.timeout;
        let hook = Hook {
            kind,
            shell: &spec.shell,
            lines,
            cwd: &cwd,
            env,
            label: format!("{} {version}", spec.id),
            pipefail: self.deployments[index].pipefail,
        };
        let mut running = hooks::spawn(&hook)
            .map_err(|e| format!("could not be started with {}: {e}", spec.shell.display()))?;
        let dir = &self.deployments[index].dir;
        if let Err(e) = dir.record_hook(running.pgid()) {
            log::warn!("{e}");
        }
        let outcome = self.wait_for_hook(&mut running, kind, version, index, timeout);
        if let Err(e) = self.deployments[index].dir.clear_hook() {
            log::warn!("{e}");
        }
        outcome
    }

    fn wait_for_hook(
        &mut self,
        running: &mut hooks::Running,
        kind: HookKind,
        version: &VersionName,
        index: usize,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        #[derive(Clone, Copy, PartialEq)]
        enum Phase {
            Running,
            Terminated,
            Killed,
        }
        #[derive(Clone, Copy)]
        enum Why {
            Timeout,
            Shutdown,
        }
        let mut phase = Phase::Running;
        let mut why = Why::Timeout;
        let mut deadline = Instant::now() + timeout;
        if self.stopping {
            deadline = Instant::now();
            why = Why::Shutdown;
        }
        loop {
            if let Some(status) = running.try_wait() {
                if phase != Phase::Running {
                    running.kill(); // leave no stragglers in the group
                }
                return match (hooks::failure(&status), phase) {
                    (None, _) => Ok(()),
                    (Some(failure), Phase::Running) => Err(failure),
                    (Some(failure), _) => Err(match why {
                        Why::Timeout => format!(
                            "timed out after {} and {failure}",
                            crate::duration::human(timeout)
                        ),
                        Why::Shutdown => {
                            format!("was stopped by the agent's shutdown and {failure}")
                        }
                    }),
                };
            }
            let now = Instant::now();
            if now >= deadline {
                match phase {
                    Phase::Running => {
                        log::warn!(
                            "[{} {version} {}] {}; stopping its process group",
                            self.deployments[index].spec.id,
                            kind.as_str(),
                            match why {
                                Why::Timeout =>
                                    format!("timed out after {}", crate::duration::human(timeout)),
                                Why::Shutdown => "the shutdown grace period is over".to_string(),
                            }
                        );
                        running.terminate();
                        phase = Phase::Terminated;
                    }
                    Phase::Terminated => {
                        running.kill();
                        phase = Phase::Killed;
                    }
                    Phase::Killed => return Err("did not end even after SIGKILL".to_string()),
                }
                deadline = now + KILL_AFTER;
                continue;
            }
            // SIGCHLD wakes this up when the hook ends; the poll interval is
            // only a safety net.
            match self.rx.recv_timeout((deadline - now).min(CHILD_POLL)) {
                Ok(Event::Signal(Signal::ChildExited)) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Event::Signal(Signal::Stop(number))) => {
                    if self.stopping {
                        running.kill();
                    }
                    self.stop(number);
                    let grace = self.config.shutdown_grace;
                    log::info!(
                        "letting the running {} hook finish (at most {})",
                        kind.as_str(),
                        crate::duration::human(grace)
                    );
                    let end = Instant::now() + grace;
                    if phase == Phase::Running && end < deadline {
                        deadline = end;
                        why = Why::Shutdown;
                    }
                }
                Ok(other) => self.pending.push_back(other),
                Err(RecvTimeoutError::Disconnected) => return Err("lost track of the hook".into()),
            }
        }
    }

    // ---- reload and shutdown ----

    fn reload(&mut self) {
        if self.stopping {
            return;
        }
        log::info!("SIGHUP: reloading the configuration");
        let applied =
            config::resolve_agent(&self.args, &config::process_env).and_then(|new| self.apply(new));
        match applied {
            Ok(()) => self.announce(),
            Err(e) => log::error!("reload: {e}; keeping the running configuration"),
        }
    }

    /// Switches to a new configuration. Nothing changes unless all of it
    /// can be applied (every new deployment path opened).
    fn apply(&mut self, new: AgentConfig) -> Result<()> {
        let consul = Consul::new(&new.consul).map_err(Error::Config)?;
        let mut opened = BTreeMap::new();
        for spec in &new.deployments {
            if !self.deployments.iter().any(|d| d.spec.path == spec.path) {
                opened.insert(spec.path.clone(), DeploymentState::open(spec.clone())?);
            }
        }
        crate::logging::set_level(new.log_level);
        let reconnect = new.consul != self.config.consul
            || new.name != self.config.name
            || new.session_ttl != self.config.session_ttl;
        let mut old = std::mem::take(&mut self.deployments);
        let mut topology_changed = old.len() != new.deployments.len() || !opened.is_empty();
        for spec in &new.deployments {
            let deployment = match opened.remove(&spec.path) {
                Some(fresh) => fresh,
                None => {
                    let at = old
                        .iter()
                        .position(|d| d.spec.path == spec.path)
                        .expect("kept deployment");
                    let mut kept = old.remove(at);
                    topology_changed |= kept.spec.id != spec.id || kept.spec.prefix != spec.prefix;
                    if kept.spec != *spec {
                        kept.pipefail = shell_pipefail(spec);
                    }
                    kept.spec = spec.clone();
                    kept
                }
            };
            self.deployments.push(deployment);
        }
        drop(old); // releases the locks of deployments no longer configured
        if reconnect || topology_changed {
            // Start over with Consul: a new session re-registers every version.
            self.end_session();
            self.watches.clear();
            self.watch_keys.clear();
            for deployment in &mut self.deployments {
                deployment.view = View::default();
                deployment.reported.clear();
            }
            self.consul = Arc::new(consul);
        }
        self.config = new;
        Ok(())
    }

    fn end_session(&mut self) {
        if let Some(session) = self.session.take() {
            match self.consul.destroy_session(&session.id) {
                Ok(()) => log::info!("destroyed the session {}", session.id),
                Err(e) => log::warn!("{e}; it expires by itself"),
            }
            for deployment in &self.deployments {
                let _ = deployment.dir.save_session(None);
            }
        }
    }

    fn shut_down(&mut self) {
        self.watches.clear();
        self.end_session();
        log::info!(
            "depro agent {} stopped after {} requests to Consul",
            self.config.name,
            self.consul.request_count()
        );
    }
}

fn is_report(action: &Action) -> bool {
    matches!(action, Action::Report(..) | Action::Unreport(_))
}

/// Probes whether the deployment's shell has pipefail, and warns when it
/// has not and a hook uses a pipe.
fn shell_pipefail(spec: &Deployment) -> bool {
    let pipefail = hooks::supports_pipefail(&spec.shell);
    let piped = spec
        .deploy
        .iter()
        .chain(&spec.rollout)
        .chain(&spec.clean)
        .any(|l| hooks::has_pipe(l));
    if piped && !pipefail {
        log::warn!(
            "{}: {} has no pipefail, so a failing command inside a pipeline of a hook goes unnoticed; \
             set \"shell\": \"bash\"",
            spec.origin,
            spec.shell.display()
        );
    }
    pipefail
}

/// An operator deleted this node's `failed` key: try again.
fn retry(deployment: &mut DeploymentState, version: &VersionName) {
    log::info!(
        "{}: failed key removed by an operator; retrying",
        deployment.label(version)
    );
    deployment.reported.remove(version);
    if deployment.disk.versions.get(version) == Some(&LocalVersion::DeployFailed) {
        deployment.disk.versions.remove(version);
    }
    deployment.disk.rollout_failed.remove(version);
}

fn describe_files(files: &[PathBuf]) -> String {
    if files.is_empty() {
        "no config files read".to_string()
    } else {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        format!("read {}", names.join(", "))
    }
}
