//! The hooks the agent runs: at most one per deployment, each part of its
//! deployment's state (what it is, since when, until when, why it is being
//! stopped, what its end leads to). The main loop never waits for one:
//! SIGCHLD tells it that children ended ([`Agent::children_ended`]), the
//! output hub that a finished hook's output is read
//! ([`Agent::output_ended`]), and its deadlines are the loop's timers
//! ([`Agent::check_hooks`]).
//!
//! A hook is stopped (its timeout, the shutdown's grace period, or a
//! preemption) with SIGTERM to everything it started, then SIGKILL
//! [`KILL_AFTER`] later. When its shell ends, what is left of it is killed
//! ([`hooks::end_leftovers`]).

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::Agent;
use super::health::{HealthGate, Next};
use crate::consul::{TxnOp, TxnOutcome};
use crate::hooks::{self, Hook, HookFailure, HookKind};
use crate::plan::Preempt;
use crate::version_name::VersionName;

/// After SIGTERM to a hook, how long until SIGKILL (and after SIGKILL, how
/// long until the agent stops waiting for it).
pub(crate) const KILL_AFTER: Duration = Duration::from_secs(5);

/// A hook that runs this long is noted in the tree (`<version>/.hook/
/// <node>`: its kind, or `fetch` for an artifact's fetch; since when), so that `depro status` and a waiting
/// command say what a node is busy with; a quicker one costs no write.
pub(crate) const NOTED_AFTER: Duration = Duration::from_secs(3);

/// A fetch's note is written again this often, with its progress (one
/// write per fetching host; a fetch from a peer seldom lasts that long).
pub(crate) const FETCH_NOTED_EVERY: Duration = Duration::from_secs(10);

/// A hook that runs (or has just ended) in a deployment.
pub(crate) struct HookRun {
    /// This run's number, for its output.
    pub id: u64,
    pub kind: HookKind,
    pub version: VersionName,
    pub running: hooks::Running,
    pub timeout: Duration,
    pub phase: Phase,
    /// When the phase's time is up: the timeout, then the kill.
    pub deadline: Instant,
    /// Why it is being stopped, if it is.
    pub stop: Option<Stop>,
    /// Its deadline is the end of the shutdown's grace period (before its
    /// timeout).
    pub cut_by_shutdown: bool,
    /// What its end leads to.
    pub then: Then,
    /// When it started (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// When to note it in the tree, if it still runs then.
    pub note_at: Option<Instant>,
}

pub(crate) enum Phase {
    Running,
    /// SIGTERM sent.
    Terminated,
    /// SIGKILL sent.
    Killed,
    /// Its shell ended (`None`: it did not, even after SIGKILL); its output
    /// is being read to the end.
    Ended(Option<std::io::Result<ExitStatus>>),
}

/// Why a hook is being stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    Timeout,
    Shutdown,
    Preempted(Preempt),
}

/// What a hook's end leads to.
pub(crate) enum Then {
    /// The deploy hook, with the version's verified artifact, if it has one.
    Deploy {
        artifact: Option<(crate::artifact::Artifact, PathBuf)>,
    },
    /// The fetch of a version's artifact (a helper process, stopped and
    /// timed as the deploy hook it precedes), into that path.
    Fetch {
        artifact: crate::artifact::Artifact,
        dest: PathBuf,
        /// The peers to ask, best first (`http://ADDR`).
        peers: Vec<String>,
        /// The origin is for this host now (`fan_out`).
        origin_now: bool,
        /// The token that opens it on them.
        token: String,
    },
    Rollout {
        from: Option<VersionName>,
    },
    Health {
        from: Option<VersionName>,
        gate: HealthGate,
    },
    Clean,
}

/// Between two health checks: when the next one runs, or when the gate
/// fails.
pub(crate) struct HealthWait {
    pub to: VersionName,
    pub from: Option<VersionName>,
    pub gate: HealthGate,
    pub next: Next,
    /// How the last attempt failed.
    pub last: HookFailure,
}

/// What a deployment is busy with, for the plan: the hook's kind and
/// version, and whether it is past stopping.
pub(crate) fn busy_with(
    hook: Option<&HookRun>,
    wait: Option<&HealthWait>,
) -> Option<(HookKind, VersionName, bool)> {
    if let Some(hook) = hook {
        // A hook already being stopped, or already ended, is not stopped again.
        let stoppable = hook.stop.is_none() && matches!(hook.phase, Phase::Running);
        return Some((hook.kind, hook.version.clone(), !stoppable));
    }
    wait.map(|w| (HookKind::Health, w.to.clone(), false))
}

impl Agent {
    /// Starts a hook of a deployment. `Ok(false)`: the deployment has no
    /// such hook, which counts as success at once.
    pub(super) fn start_hook(
        &mut self,
        index: usize,
        kind: HookKind,
        version: &VersionName,
        cwd: PathBuf,
        timeout: Duration,
        then: Then,
    ) -> Result<bool, HookFailure> {
        let deployment = &self.deployments[index];
        let spec = &deployment.spec;
        // The fetch of an artifact: depro itself, its inputs (untrusted,
        // from Consul) in its environment, never in the shell's text.
        let fetch = [format!(
            "exec \"$DEPRO_SELF\" {}",
            crate::artifact::FETCH_COMMAND
        )];
        let lines: &[String] = match (&then, kind) {
            (Then::Fetch { .. }, _) => &fetch,
            (_, HookKind::Deploy) => &spec.deploy,
            (_, HookKind::Rollout) => &spec.rollout,
            (_, HookKind::Health) => &spec.health,
            (_, HookKind::Clean) => &spec.clean,
        };
        if lines.is_empty() {
            return Ok(false);
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
        match &then {
            Then::Fetch {
                artifact,
                dest,
                peers,
                origin_now,
                token,
            } => {
                env.push((crate::artifact::ENV_PEERS, peers.join(" ")));
                let origin = if *origin_now { "now" } else { "later" };
                env.push((crate::artifact::ENV_ORIGIN, origin.into()));
                env.push((crate::artifact::ENV_TOKEN, token.clone()));
                // This very binary, also once a package upgrade replaced
                // the file (the agent runs on until it is restarted).
                env.push(("DEPRO_SELF", format!("/proc/{}/exe", std::process::id())));
                env.push((crate::artifact::ENV_URL, artifact.url.clone()));
                env.push((crate::artifact::ENV_SHA256, artifact.sha256.clone()));
                let size = artifact.size.map(|s| s.to_string()).unwrap_or_default();
                env.push((crate::artifact::ENV_SIZE, size));
                env.push((crate::artifact::ENV_DEST, dest.display().to_string()));
            }
            Then::Deploy {
                artifact: Some((artifact, path)),
            } => {
                env.push(("ARTIFACT", path.display().to_string()));
                env.push(("ARTIFACT_SHA256", artifact.sha256.clone()));
            }
            _ => {}
        }
        if let Then::Rollout { from } | Then::Health { from, .. } = &then {
            env.push((
                "PREVIOUS_VERSION",
                from.as_ref().map(|v| v.to_string()).unwrap_or_default(),
            ));
        }
        let label = format!("{} {version} {}", spec.id, kind.as_str());
        let hook = Hook {
            kind,
            shell: &spec.shell,
            lines,
            cwd: &cwd,
            env,
            pipefail: deployment.pipefail,
        };
        let (running, output) = hooks::spawn(&hook).map_err(|e| {
            HookFailure::not_run(
                kind,
                format!("could not be started with {}: {e}", spec.shell.display()),
            )
        })?;
        if let Err(e) = deployment.dir.record_hook(&running.leftover()) {
            log::warn!("{e}");
        }
        self.next_run += 1;
        let id = self.next_run;
        self.output.add(id, output, label);
        let mut run = HookRun {
            id,
            kind,
            version: version.clone(),
            running,
            timeout,
            phase: Phase::Running,
            deadline: Instant::now() + timeout,
            stop: None,
            cut_by_shutdown: false,
            then,
            started_ms: crate::logging::now_ms(),
            note_at: Some(Instant::now() + NOTED_AFTER),
        };
        let grace_end = Instant::now() + self.config.shutdown_grace;
        if self.stopping && grace_end < run.deadline {
            // Only a rollout's own steps start during a shutdown.
            run.deadline = grace_end;
            run.cut_by_shutdown = true;
        }
        self.deployments[index].hook = Some(run);
        Ok(true)
    }

    /// Stops a deployment's hook: SIGTERM now, SIGKILL later. A health
    /// check between two attempts is simply dropped.
    pub(super) fn stop_hook(&mut self, index: usize, why: Stop) {
        let deployment = &mut self.deployments[index];
        if let Some(wait) = deployment.health_wait.take() {
            log::info!(
                "{}: no more health checks: {}",
                deployment.label(&wait.to),
                describe(why)
            );
            return;
        }
        let Some(run) = deployment.hook.as_mut() else {
            return;
        };
        if !matches!(run.phase, Phase::Running) {
            return;
        }
        log::warn!(
            "[{} {} {}] {}; stopping it",
            deployment.spec.id,
            run.version,
            run.kind.as_str(),
            describe(why)
        );
        run.running.terminate();
        run.phase = Phase::Terminated;
        run.stop = Some(why);
        run.deadline = Instant::now() + KILL_AFTER;
    }

    /// Timeouts, kills, and health checks whose time has come.
    pub(super) fn check_hooks(&mut self) {
        for index in 0..self.deployments.len() {
            let due = self.deployments[index].hook.as_mut().and_then(|run| {
                let due = run.note_at.is_some_and(|at| at <= Instant::now())
                    && matches!(run.phase, Phase::Running);
                due.then(|| {
                    run.note_at = None;
                    let what = match &run.then {
                        // A fetch is noted again as it goes, with what its
                        // helper last said (bytes, rate, from where).
                        Then::Fetch { dest, .. } => {
                            run.note_at = Some(Instant::now() + FETCH_NOTED_EVERY);
                            let told = crate::artifact::progress_of(dest);
                            format!("fetch\n{told}")
                        }
                        _ => run.kind.as_str().to_string(),
                    };
                    (what, run.version.clone(), run.started_ms)
                })
            });
            if let Some((what, version, since_ms)) = due {
                self.note_hook(index, &what, &version, since_ms);
            }
        }
        for index in 0..self.deployments.len() {
            let now = Instant::now();
            let deployment = &mut self.deployments[index];
            if let Some(run) = deployment.hook.as_mut() {
                if run.deadline > now {
                    continue;
                }
                match run.phase {
                    Phase::Running => {
                        let why = if run.cut_by_shutdown {
                            Stop::Shutdown
                        } else {
                            Stop::Timeout
                        };
                        self.stop_hook(index, why);
                    }
                    Phase::Terminated => {
                        run.running.kill();
                        run.phase = Phase::Killed;
                        run.deadline = now + KILL_AFTER;
                    }
                    Phase::Killed => {
                        run.phase = Phase::Ended(None);
                        run.deadline = now + KILL_AFTER;
                        self.output.finish(run.id);
                    }
                    Phase::Ended(_) => {
                        // The output hub always answers; a safety net.
                        let id = run.id;
                        self.output_ended(id, String::new());
                    }
                }
                continue;
            }
            let due = deployment
                .health_wait
                .as_ref()
                .is_some_and(|wait| match wait.next {
                    Next::Attempt(at) | Next::GiveUp(at) => at <= now,
                });
            if due && let Some(wait) = deployment.health_wait.take() {
                let result = self.health_due(index, wait);
                self.settle(index, result);
            }
        }
    }

    /// The earliest time a hook needs the loop.
    pub(super) fn hooks_wakeup(&self) -> Option<Instant> {
        self.deployments
            .iter()
            .flat_map(|d| {
                let wait = d.health_wait.as_ref().map(|w| match w.next {
                    Next::Attempt(at) | Next::GiveUp(at) => at,
                });
                // Only a running hook is noted (one being stopped is not).
                let note = d
                    .hook
                    .as_ref()
                    .filter(|h| matches!(h.phase, Phase::Running))
                    .and_then(|h| h.note_at);
                [d.hook.as_ref().map(|h| h.deadline), wait, note]
            })
            .flatten()
            .min()
    }

    /// SIGCHLD: reaps every child that ended. A hook's shell: what is left
    /// of the hook is killed and its output read to the end. Any other
    /// child is an orphan the agent inherited; its end may have left
    /// others, which are killed.
    pub(super) fn children_ended(&mut self) {
        let ended = hooks::reap();
        if ended.is_empty() {
            return;
        }
        let mut orphans = false;
        for (pid, status) in ended {
            let owner = self.deployments.iter().position(|d| {
                d.hook
                    .as_ref()
                    .is_some_and(|h| h.running.pid() == pid && !matches!(h.phase, Phase::Ended(_)))
            });
            let Some(index) = owner else {
                orphans = true;
                continue;
            };
            let others: Vec<&hooks::Running> = self
                .deployments
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index)
                .filter_map(|(_, d)| d.hook.as_ref())
                .filter(|h| !matches!(h.phase, Phase::Ended(_)))
                .map(|h| &h.running)
                .collect();
            let run = self.deployments[index].hook.as_ref().expect("owner");
            let killed = hooks::end_leftovers(Some(&run.running), &others);
            log::debug!(
                "{} {} {}: ended ({killed} leftover process(es) signalled)",
                self.deployments[index].spec.id,
                run.version,
                run.kind.as_str()
            );
            let run = self.deployments[index].hook.as_mut().expect("owner");
            run.phase = Phase::Ended(Some(status));
            run.deadline = Instant::now() + KILL_AFTER;
            self.output.finish(run.id);
        }
        if orphans {
            self.end_orphans();
        }
    }

    /// Kills the orphans the agent inherited that belong to no running hook.
    pub(super) fn end_orphans(&self) {
        let running: Vec<&hooks::Running> = self
            .deployments
            .iter()
            .filter_map(|d| d.hook.as_ref())
            .filter(|h| !matches!(h.phase, Phase::Ended(_)))
            .map(|h| &h.running)
            .collect();
        let killed = hooks::end_leftovers(None, &running);
        if killed > 0 {
            log::info!("killed {killed} process(es) that outlived the hook that started them");
        }
    }

    /// A hook's output is read to the end: the hook is over.
    pub(super) fn output_ended(&mut self, id: u64, tail: String) {
        let Some(index) = self
            .deployments
            .iter()
            .position(|d| d.hook.as_ref().is_some_and(|h| h.id == id))
        else {
            return; // its deployment was unconfigured meanwhile
        };
        let deployment = &mut self.deployments[index];
        if !matches!(
            deployment.hook.as_ref().map(|h| &h.phase),
            Some(Phase::Ended(_))
        ) {
            return;
        }
        let mut run = deployment.hook.take().expect("found");
        // A hook that did not end even after SIGKILL stays recorded: the
        // next agent tries again to end it.
        if matches!(run.phase, Phase::Ended(Some(_)))
            && let Err(e) = deployment.dir.clear_hook()
        {
            log::warn!("{e}");
        }
        if deployment.hook_noted.as_ref() == Some(&run.version) {
            self.unnote_hook(index);
        }
        let Phase::Ended(status) = std::mem::replace(&mut run.phase, Phase::Running) else {
            unreachable!("checked")
        };
        let outcome = outcome(&run, status, tail);
        let kind = match run.then {
            Then::Fetch { .. } => "fetch",
            _ => run.kind.as_str(),
        };
        let seconds = crate::logging::now_ms().saturating_sub(run.started_ms) as f64 / 1000.0;
        let id = &self.deployments[index].spec.id;
        crate::metrics::METRICS.hook_ran(id, kind, seconds, outcome.is_ok());
        let result = self.finished(index, run, outcome);
        self.settle(index, result);
    }

    /// Notes a hook that has been running for [`NOTED_AFTER`] under
    /// `<version>/.hook/<node>` (its kind; its start in the flags), held by
    /// the session. Best effort: a write that fails only leaves it unsaid.
    fn note_hook(&mut self, index: usize, what: &str, version: &VersionName, since_ms: u64) {
        let Some(session) = self.sessions.id().map(String::from) else {
            return;
        };
        let deployment = &self.deployments[index];
        let key = deployment.spec.prefix.hook_key(version, &self.config.name);
        let op = TxnOp::Lock {
            key: &key,
            value: what.as_bytes(),
            session: &session,
            flags: since_ms,
        };
        match self.consul.txn(&[op]) {
            Ok(TxnOutcome::Committed(_)) => {
                self.deployments[index].hook_noted = Some(version.clone());
            }
            Ok(TxnOutcome::Rejected(_)) | Err(_) => {
                log::debug!(
                    "{}: could not note its {what} hook",
                    deployment.label(version)
                );
            }
        }
    }

    /// Deletes the note of the hook that ended (best effort: the note goes
    /// with the session anyway, and readers show it only for a busy node).
    fn unnote_hook(&mut self, index: usize) {
        let deployment = &mut self.deployments[index];
        let Some(version) = deployment.hook_noted.take() else {
            return;
        };
        let key = deployment.spec.prefix.hook_key(&version, &self.config.name);
        if let Err(e) = self.consul.txn(&[TxnOp::Delete { key: &key }]) {
            log::debug!(
                "{}: could not delete {key}: {e}",
                deployment.label(&version)
            );
        }
    }

    /// The agent got SIGTERM or SIGINT: running hooks get the grace period
    /// (if it ends before their timeout); no health check starts again.
    pub(super) fn shorten_hooks(&mut self) {
        let grace = self.config.shutdown_grace;
        let end = Instant::now() + grace;
        for deployment in &mut self.deployments {
            if let Some(wait) = deployment.health_wait.take() {
                log::info!(
                    "{}: the health checks stop with the agent; they run again when it starts",
                    deployment.label(&wait.to)
                );
            }
            if let Some(run) = deployment.hook.as_mut()
                && matches!(run.phase, Phase::Running)
            {
                log::info!(
                    "{} {}: letting the running {} hook finish (at most {})",
                    deployment.spec.id,
                    run.version,
                    run.kind.as_str(),
                    crate::duration::human(grace)
                );
                if end < run.deadline {
                    run.deadline = end;
                    run.cut_by_shutdown = true;
                }
            }
        }
    }

    /// A deployment is no longer configured (a reload): its hook is killed
    /// now, and its end is not waited for.
    pub(super) fn abandon_hook(&mut self, run: HookRun) {
        log::warn!(
            "the {} hook of {} (pid {}) is killed: its deployment is no longer configured",
            run.kind.as_str(),
            run.version,
            run.running.pid()
        );
        if !matches!(run.phase, Phase::Ended(Some(_))) {
            run.running.kill();
        }
        self.output.finish(run.id);
    }

    /// A second SIGTERM: every hook is killed now.
    pub(super) fn kill_hooks(&mut self) {
        for deployment in &self.deployments {
            if let Some(run) = &deployment.hook
                && !matches!(run.phase, Phase::Ended(Some(_)))
            {
                run.running.kill();
            }
        }
    }

    pub(super) fn any_hook(&self) -> bool {
        self.deployments.iter().any(|d| d.hook.is_some())
    }

    /// Deploy and clean hooks running on the host (what
    /// `max_parallel_hooks` bounds).
    pub(super) fn heavy_hooks(&self) -> usize {
        self.deployments
            .iter()
            .filter(|d| {
                d.hook
                    .as_ref()
                    .is_some_and(|h| matches!(h.kind, HookKind::Deploy | HookKind::Clean))
            })
            .count()
    }
}

/// How a hook ended, as the step that ran it sees it.
fn outcome(
    run: &HookRun,
    status: Option<std::io::Result<ExitStatus>>,
    tail: String,
) -> Result<(), HookFailure> {
    let Some(status) = status else {
        let mut failure = HookFailure::not_run(run.kind, "did not end even after SIGKILL".into());
        failure.timed_out = run.stop == Some(Stop::Timeout);
        failure.output = tail;
        return Err(failure);
    };
    let stopped = matches!(run.stop, Some(Stop::Timeout | Stop::Shutdown));
    let failure = match HookFailure::of(run.kind, &status) {
        Some(failure) => Some(failure),
        // Stopped, it may have exited 0 on SIGTERM: its work is not done.
        None if stopped => Some(HookFailure::not_run(run.kind, "exited 0".into())),
        None => None,
    };
    let Some(mut failure) = failure else {
        return Ok(());
    };
    failure.output = tail;
    match run.stop {
        Some(Stop::Timeout) => {
            failure.timed_out = true;
            failure.what = format!(
                "timed out after {} and {}",
                crate::duration::human(run.timeout),
                failure.what
            );
        }
        Some(Stop::Shutdown) => {
            failure.what = format!("was stopped by the agent's shutdown and {}", failure.what);
        }
        Some(Stop::Preempted(why)) => {
            failure.what = format!("was stopped ({}) and {}", preempted(why), failure.what);
        }
        None => {}
    }
    Err(failure)
}

fn describe(why: Stop) -> String {
    match why {
        Stop::Timeout => "timed out".into(),
        Stop::Shutdown => "the shutdown grace period is over".into(),
        Stop::Preempted(why) => preempted(why).into(),
    }
}

fn preempted(why: Preempt) -> &'static str {
    match why {
        Preempt::ForRollout => "current is ready here and is rolled out first",
        Preempt::ForCurrent => "current is deployed first",
        Preempt::Removed => "its version was removed",
        Preempt::CurrentMoved => "current moved to another version",
    }
}
