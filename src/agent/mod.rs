//! The agent: one main loop that makes this host follow the Consul tree.
//!
//! Every decision and every write happens on this loop, and it never waits
//! for a hook. Other threads only wait and post events to it: each
//! deployment's two watches, the session keeper, the signal forwarder
//! (which also reports SIGCHLD: the loop reaps its children itself), and one
//! thread that reads every hook's output. Their number does not depend on
//! what the hooks do. The loop:
//!
//! 1. takes the events that arrived (observations, a lost session, signals,
//!    ended children, a finished hook's output);
//! 2. handles the hooks whose time is up (timeouts, kills) and the health
//!    checks that are due;
//! 3. makes sure a session exists and every deployment's watches run;
//! 4. asks [`plan`](crate::plan::plan) what to do for each deployment whose
//!    view of the tree is complete, and does the first action of one plan
//!    (or its leading reports, in one transaction), round robin across
//!    deployments, then goes back to 1. An action that runs a hook starts
//!    it and returns; while a deployment's hook runs, only its reports are
//!    written, and [`preempt`](crate::plan::preempt) says whether the hook
//!    must stop to let `current` go first. Hooks of different deployments
//!    run at the same time (deploy and clean hooks up to
//!    `max_parallel_hooks`);
//! 5. with nothing to do, sleeps until the next event or timer.
//!
//! The rooms:
//! - [`view`]: the view of a deployment's tree and how observations update
//!   it (pure);
//! - [`watch`]: the watch threads, and the shared record of Consul's health;
//! - [`session`]: the session's lifecycle (leftovers, keeper, loss, its own
//!   old sessions);
//! - [`deployment`]: one deployment's state, opened from its directory;
//! - [`execute`]: doing a plan's actions and handling the ends of their
//!   hooks, and what a failure of each means;
//! - [`hook_run`]: the hook a deployment runs: starting it, its deadlines,
//!   stopping it, its end;
//! - [`health`]: when the next health check runs, and when the gate fails;
//! - [`reload`]: SIGHUP, and shutting down;
//! - [`check`]: `agent -check`, the configuration validated without Consul.

mod check;
mod deployment;
mod execute;
mod health;
mod hook_run;
mod reload;
mod scout;
mod session;
mod view;
mod watch;

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Instant;

use crate::cli::AgentArgs;
use crate::config::{self, AgentConfig};
use crate::consul::Consul;
use crate::error::{Error, Result};
use crate::hook_output::OutputHub;
use crate::plan::{Action, Preempt, Reports, RunningHook, plan, preempt};
use crate::signals::{self, Signal};
use deployment::DeploymentState;
use session::{Ensured, Sessions};
use watch::{Health, Part, Seen};

/// What the other threads tell the main loop.
pub(crate) enum Event {
    /// A deployment's watches (identified by the id they were started with).
    Seen {
        watch: u64,
        seen: Seen,
    },
    SessionLost {
        session: String,
    },
    /// Consul answers again after an outage that may have left the watches'
    /// queries on dead connections.
    ConsulBack,
    Signal(Signal),
    /// Consul refused the credentials (a denial, a TLS refusal).
    Refused,
    /// A finished hook's output is read to its end.
    HookOutput {
        run: u64,
        tail: String,
    },
}

/// The deployments' ids, longest first (so that `api-web` is told from `api`
/// in log lines).
pub(crate) fn deployment_ids(config: &AgentConfig) -> Vec<String> {
    let mut ids: Vec<String> = config.deployments.iter().map(|d| d.id.clone()).collect();
    ids.sort_by_key(|id| std::cmp::Reverse(id.len()));
    ids
}

/// Runs the agent until it is told to stop.
pub(crate) fn run(args: AgentArgs) -> Result<()> {
    if args.check {
        // The warnings the agent would log, on stderr; the verdict on stdout.
        let (warnings, summary) = check::check(&args)?;
        for warning in warnings {
            eprintln!("depro: warning: {warning}");
        }
        println!("{summary}");
        return Ok(());
    }
    let config = config::resolve_agent(&args, &config::process_env)?;
    crate::logging::init(config.log_level, args.log_format);
    crate::logging::set_context(&config.name, deployment_ids(&config));
    for warning in &config.warnings {
        log::warn!("{warning}");
    }
    if !crate::hooks::become_subreaper() {
        log::warn!(
            "cannot become a child subreaper: a hook's process that leaves its process group \
             and clears its environment may outlive the hook"
        );
    }
    let (tx, rx) = mpsc::channel();
    let signal_tx = tx.clone();
    signals::forward(move |signal| signal_tx.send(Event::Signal(signal)).is_ok())
        .map_err(|e| Error::Config(format!("cannot install signal handlers: {e}")))?;
    let mut agent = Agent::new(args, config, tx, rx)?;
    agent.run();
    Ok(())
}

/// How often the metrics are rendered (Prometheus scrapes every 15 s or
/// more).
const METRICS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) struct Agent {
    args: AgentArgs,
    config: AgentConfig,
    consul: Arc<Consul>,
    health: Arc<Health>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    /// Reads every hook's output.
    output: OutputHub,
    /// The number of the last hook run started.
    next_run: u64,
    deployments: Vec<DeploymentState>,
    sessions: Sessions,
    stopping: bool,
    /// When the credential files were last read again after a refusal.
    credentials_read: Option<Instant>,
    /// The session in use, for the threads that need it (the scouts).
    session_cell: Arc<std::sync::Mutex<Option<String>>>,
    next_watch: u64,
    last_served: usize,
    /// When this agent started, for its announcements.
    started_at: String,
    /// What the artifact server may serve (with `listen`).
    served: crate::peer::Served,
    /// When to render the metrics next (with `metrics_file` or `listen`).
    metrics_at: Option<Instant>,
}

/// How an action failed.
pub(crate) enum Failure {
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
        if let Some(warning) = crate::consul::expiry_warning(consul.tls(), reload::CERT_WARNING) {
            log::warn!("{warning}");
        }
        let mut deployments = Vec::new();
        let mut recorded = Vec::new();
        for spec in &config.deployments {
            let state = DeploymentState::open(spec.clone(), config.rescan_interval)?;
            for id in state.dir.saved_sessions() {
                if !recorded.contains(&id) {
                    recorded.push(id);
                }
            }
            deployments.push(state);
        }
        let posted = tx.clone();
        let output =
            OutputHub::start(move |run, tail| posted.send(Event::HookOutput { run, tail }).is_ok())
                .map_err(|e| {
                    Error::Config(format!("cannot start a thread to read hooks' output: {e}"))
                })?;
        let health = Arc::new(Health::default());
        let back = tx.clone();
        health.on_return(move || {
            let _ = back.send(Event::ConsulBack);
        });
        let refused = tx.clone();
        health.on_refused(move || {
            let _ = refused.send(Event::Refused);
        });
        let served = crate::peer::Served::default();
        if let Some(addr) = config.listen {
            crate::peer::serve(addr, served.clone(), config.upload_limit).map_err(|e| {
                Error::Config(format!("listen: cannot serve artifacts on {addr}: {e}"))
            })?;
        }
        Ok(Agent {
            args,
            config,
            consul,
            health,
            tx,
            rx,
            output,
            next_run: 0,
            deployments,
            sessions: Sessions::new(recorded),
            stopping: false,
            credentials_read: None,
            session_cell: Arc::default(),
            next_watch: 0,
            last_served: 0,
            started_at: crate::logging::timestamp(),
            served,
            metrics_at: Some(Instant::now()),
        })
    }

    fn run(&mut self) {
        self.announce();
        loop {
            while let Ok(event) = self.rx.try_recv() {
                self.handle(event);
            }
            if self.stopping && !self.any_hook() {
                break;
            }
            self.check_hooks();
            self.recheck_kept();
            self.publish_metrics();
            if !self.stopping {
                self.ensure_session();
                self.share_session();
                self.start_watches();
                self.announce_membership();
                self.check_own_keys();
                match self.next_step() {
                    Some((index, Step::Act(actions))) => {
                        self.execute(index, actions);
                        continue;
                    }
                    Some((index, Step::Stop(why))) => {
                        self.stop_hook(index, hook_run::Stop::Preempted(why));
                        continue;
                    }
                    None => {}
                }
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
                reload::describe_files(&self.config.files)
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

    /// Renders the metrics, if due: into `metrics_file` (atomically, for
    /// node_exporter's textfile collector) and for `/metrics`.
    fn publish_metrics(&mut self) {
        let wanted = self.config.metrics_file.is_some() || self.config.listen.is_some();
        if !wanted || self.metrics_at.is_some_and(|at| at > Instant::now()) {
            self.metrics_at = self.metrics_at.filter(|_| wanted);
            return;
        }
        self.metrics_at = Some(Instant::now() + METRICS_EVERY);
        let seen: Vec<crate::metrics::DeploymentSeen<'_>> = self
            .deployments
            .iter()
            .map(|d| crate::metrics::DeploymentSeen {
                id: &d.spec.id,
                live: d.disk.live.as_ref().map(|v| v.as_str()),
                states: d
                    .reported
                    .iter()
                    .map(|(v, state)| (v.as_str(), state.as_str()))
                    .collect(),
            })
            .collect();
        let text = crate::metrics::METRICS.render(&self.config.name, &seen);
        if let Some(file) = &self.config.metrics_file
            && let Err(e) = crate::local_state::atomic_write(
                file,
                text.trim_end(),
                crate::local_state::Durability::CrashSafe,
            )
        {
            log::warn!("metrics_file: {e}");
        }
        self.served.set_metrics(text);
    }

    // ---- events ----

    fn handle(&mut self, event: Event) {
        match event {
            Event::Seen { watch, seen } => self.seen(watch, seen),
            Event::SessionLost { session } => self.session_lost(&session),
            Event::ConsulBack => self.restart_watches(),
            Event::Signal(Signal::ChildExited) => self.children_ended(),
            Event::Signal(Signal::Stop(number)) => self.stop(number),
            Event::Signal(Signal::Reload) => self.reload(),
            Event::HookOutput { run, tail } => self.output_ended(run, tail),
            Event::Refused => self.credentials_refused(),
        }
    }

    fn stop(&mut self, number: i32) {
        if self.stopping {
            log::warn!("{} again: exiting now", signals::name(number));
            self.kill_hooks();
            std::process::exit(128 + number);
        }
        log::info!("{}: shutting down", signals::name(number));
        self.stopping = true;
        self.shorten_hooks();
    }

    fn session_lost(&mut self, session: &str) {
        if self.sessions.lost(session) {
            for deployment in &mut self.deployments {
                deployment.forget_reports();
            }
        }
    }

    fn seen(&mut self, watch: u64, seen: Seen) {
        let Some(index) = self.deployments.iter().position(|d| d.watch_id == watch) else {
            return; // watches stopped since (reload)
        };
        let deployment = &mut self.deployments[index];
        match seen {
            Seen::Tree(tree) => {
                let prefix = deployment.spec.prefix.as_dir().to_string();
                let noticed = deployment.view.see_tree(tree, &prefix);
                if noticed.emptied {
                    log::info!(
                        "{}: nothing under {} (or the token cannot read it); waiting",
                        deployment.spec.id,
                        deployment.spec.prefix
                    );
                }
                for warning in noticed.warnings {
                    deployment.warn_once(warning);
                }
                for version in &noticed.removed {
                    log::debug!(
                        "{}: its key is gone from the tree",
                        deployment.label(version)
                    );
                }
                for version in noticed.own_missing {
                    self.own_key_gone(index, &version);
                }
            }
            Seen::Current(current) => {
                let key = deployment.spec.prefix.current_key();
                if let Some(warning) = deployment.view.see_current(current, &key) {
                    deployment.warn_once(warning);
                }
                if deployment.view.current_unlisted() {
                    log::debug!(
                        "{}: current names a version the tree did not list; reading it whole",
                        deployment.spec.id
                    );
                    self.refresh_tree(index);
                }
            }
            Seen::Replaced(part) => {
                log::warn!(
                    "{}: Consul's index went backwards (its state was replaced: restarted without \
                     its data, rebuilt or restored); reading it again and registering this node's keys again",
                    deployment.spec.id
                );
                match part {
                    Part::Tree => deployment.view.forget_tree(),
                    Part::Current => deployment.view.forget_current(),
                }
                deployment.forget_reports();
            }
        }
    }

    // ---- session and watches ----

    fn ensure_session(&mut self) {
        if self.deployments.is_empty() {
            return;
        }
        let tx = self.tx.clone();
        let ensured = self.sessions.ensure(
            &self.consul,
            &self.config.name,
            self.config.session_ttl,
            &self.health,
            move |session| {
                let _ = tx.send(Event::SessionLost { session });
            },
        );
        if let Ensured::Ready { new: true } = ensured {
            let history = self.sessions.history();
            for deployment in &mut self.deployments {
                deployment.forget_reports();
                if let Err(e) = deployment.dir.save_sessions(&history) {
                    log::warn!("{}: {e}", deployment.spec.id);
                }
            }
        }
    }

    /// Tells the threads that need it which session is in use.
    fn share_session(&self) {
        let id = self.sessions.id();
        let mut cell = self.session_cell.lock().unwrap_or_else(|e| e.into_inner());
        if cell.as_deref() != id {
            *cell = id.map(String::from);
        }
    }

    /// Ends every deployment's watches (their queries and connections at
    /// once); the next pass starts them again, and they read the tree and
    /// `current` afresh. After an outage a blocking query may sit on a
    /// connection that died with the link until it times out (a minute):
    /// the catch-up must not wait for it.
    fn restart_watches(&mut self) {
        log::debug!("restarting the watches after the outage, and retrying at once");
        self.sessions.hurry();
        for deployment in &mut self.deployments {
            deployment.watches = None;
            // What backed off during the outage goes on now, not when its
            // backoff (up to 30 s) runs out.
            deployment.blocked_until = None;
            deployment.backoff.reset();
            deployment.watch_retry = None;
            deployment.watch_backoff.reset();
        }
    }

    /// Starts the watches of deployments that have none; a thread that
    /// cannot be started is logged and retried with backoff.
    fn start_watches(&mut self) {
        let now = Instant::now();
        for deployment in &mut self.deployments {
            if deployment.watches.is_some() || deployment.watch_retry.is_some_and(|at| at > now) {
                continue;
            }
            self.next_watch += 1;
            let id = self.next_watch;
            let tx = self.tx.clone();
            let started = watch::start(
                &self.consul,
                deployment.watch_target(&self.config.name, &self.session_cell),
                self.health.clone(),
                move |seen| tx.send(Event::Seen { watch: id, seen }).is_ok(),
            );
            match started {
                Ok(watches) => {
                    if deployment.watch_retry.take().is_some() {
                        log::info!("{}: its watches run now", deployment.spec.id);
                    }
                    deployment.watches = Some(watches);
                    deployment.watch_id = id;
                    deployment.watch_backoff.reset();
                }
                Err(e) => {
                    let delay = deployment.watch_backoff.next_delay();
                    log::error!(
                        "{}: cannot start a thread to watch {} ({e}); it follows nothing until it can; \
                         retrying in {}",
                        deployment.spec.id,
                        deployment.spec.prefix,
                        crate::duration::human(delay)
                    );
                    deployment.watch_retry = Some(now + delay);
                }
            }
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let mut at = self
            .sessions
            .retry_at()
            .filter(|_| !self.deployments.is_empty() && !self.stopping);
        if let Some(hooks) = self.hooks_wakeup() {
            at = Some(at.map_or(hooks, |a| a.min(hooks)));
        }
        if self.stopping {
            return at;
        }
        if let Some(metrics) = self.metrics_at {
            at = Some(at.map_or(metrics, |a| a.min(metrics)));
        }
        for deployment in &self.deployments {
            for time in [
                deployment.blocked_until,
                deployment.watch_retry,
                deployment.own_check_at,
                deployment.kept_check_at,
            ]
            .into_iter()
            .flatten()
            {
                at = Some(at.map_or(time, |a| a.min(time)));
            }
        }
        at
    }

    // ---- planning ----

    /// The next thing to do: one action, or the leading run of a plan's
    /// reports (written in one transaction), or a running hook to stop.
    /// Deployments are served round robin, but `current`'s own steps (its
    /// deploy, its rollout) go before the others' deploys and cleans, so
    /// that a slot `max_parallel_hooks` frees goes to them.
    fn next_step(&mut self) -> Option<(usize, Step)> {
        let count = self.deployments.len();
        let now = Instant::now();
        let room = self
            .config
            .max_parallel_hooks
            .is_none_or(|max| self.heavy_hooks() < max);
        let mut fallback: Option<(usize, Step)> = None;
        for k in 0..count {
            let index = (self.last_served + 1 + k) % count;
            let deployment = &mut self.deployments[index];
            let blocked = deployment.blocked_until.is_some_and(|at| at > now);
            if !blocked {
                deployment.blocked_until = None;
            }
            let Some(wanted) = deployment.view.wanted() else {
                continue;
            };
            let reports = match self.sessions.id() {
                Some(_) => Reports::Online(&deployment.reported),
                None => Reports::Offline,
            };
            let actions = plan(wanted, &deployment.disk, reports);
            let reports = actions.iter().take_while(|a| is_report(a)).count();
            let busy =
                hook_run::busy_with(deployment.hook.as_ref(), deployment.health_wait.as_ref());
            let step = if let Some((kind, version, past_stopping)) = busy {
                let running = RunningHook {
                    kind,
                    version: &version,
                };
                // Even in backoff: a rollback must not wait for it.
                match preempt(wanted, &deployment.disk, running) {
                    Some(why) if !past_stopping => Step::Stop(why),
                    _ if reports > 0 && !blocked => Step::Act(
                        actions
                            .into_iter()
                            .take(reports.min(execute::REPORTS_PER_TXN))
                            .collect(),
                    ),
                    _ => continue,
                }
            } else {
                if blocked {
                    continue;
                }
                let first = actions.first();
                let heavy =
                    reports == 0 && matches!(first, Some(Action::Deploy(_) | Action::Clean(_)));
                if heavy && !room {
                    continue;
                }
                let urgent = match first {
                    Some(Action::Rollout { .. }) => true,
                    Some(Action::Stage(v) | Action::Deploy(v)) => {
                        wanted.current.as_ref() == Some(v)
                    }
                    _ => false,
                };
                // Two operations per report (a check and a write), at most 64.
                let batch: Vec<Action> = actions
                    .into_iter()
                    .take(reports.clamp(1, execute::REPORTS_PER_TXN))
                    .collect();
                if batch.is_empty() {
                    continue;
                }
                if !urgent && heavy {
                    // Served if no deployment has one of current's steps.
                    if fallback.is_none() {
                        fallback = Some((index, Step::Act(batch)));
                    }
                    continue;
                }
                Step::Act(batch)
            };
            self.last_served = index;
            return Some((index, step));
        }
        let (index, step) = fallback?;
        self.last_served = index;
        Some((index, step))
    }

    /// Versions kept because Consul hid them are checked again when their
    /// time comes (the plan asks to clean them, which confirms first).
    fn recheck_kept(&mut self) {
        let now = Instant::now();
        for deployment in &mut self.deployments {
            if deployment.kept_check_at.is_some_and(|at| at <= now) {
                deployment.kept_check_at = None;
                deployment.view.recheck_kept();
            }
        }
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
}

/// What the loop does next for a deployment.
enum Step {
    Act(Vec<Action>),
    /// Stop the deployment's running hook.
    Stop(Preempt),
}

fn is_report(action: &Action) -> bool {
    matches!(action, Action::Report(..) | Action::Unreport(_))
}
