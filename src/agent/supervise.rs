//! Running a hook from the main loop: its environment, waiting for it
//! (SIGCHLD wakes the loop; no thread waits), its timeout, and a shutdown
//! that lets it finish within the grace period.
//!
//! While a hook runs, the loop keeps every other event for later, except
//! the signals that concern the hook: SIGCHLD, and SIGTERM/SIGINT (which
//! shorten the wait to the grace period; a second one kills the hook and
//! exits).

use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use super::{Agent, Event};
use crate::hooks::{self, Hook, HookFailure, HookKind};
use crate::signals::Signal;
use crate::version_name::VersionName;

/// After SIGTERM to a hook's process group, how long until SIGKILL.
const KILL_AFTER: Duration = Duration::from_secs(5);
/// While a hook runs, how often to check on it besides SIGCHLD.
const CHILD_POLL: Duration = Duration::from_secs(1);

impl Agent {
    /// Runs a hook to its end, its timeout, or the end of the shutdown
    /// grace period. Other events that arrive meanwhile are kept for later.
    pub(super) fn run_hook(
        &mut self,
        index: usize,
        kind: HookKind,
        version: &VersionName,
        cwd: PathBuf,
        previous: Option<Option<&VersionName>>,
        timeout: Duration,
    ) -> Result<(), HookFailure> {
        let spec = &self.deployments[index].spec;
        let lines = match kind {
            HookKind::Deploy => &spec.deploy,
            HookKind::Rollout => &spec.rollout,
            HookKind::Health => &spec.health,
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
        let hook = Hook {
            kind,
            shell: &spec.shell,
            lines,
            cwd: &cwd,
            env,
            label: format!("{} {version}", spec.id),
            pipefail: self.deployments[index].pipefail,
        };
        let mut running = hooks::spawn(&hook).map_err(|e| {
            HookFailure::not_run(
                kind,
                format!("could not be started with {}: {e}", spec.shell.display()),
            )
        })?;
        let dir = &self.deployments[index].dir;
        if let Err(e) = dir.record_hook(&running.leftover()) {
            log::warn!("{e}");
        }
        let outcome = self.wait_for_hook(&mut running, kind, version, index, timeout);
        if let Err(e) = self.deployments[index].dir.clear_hook() {
            log::warn!("{e}");
        }
        outcome
    }

    /// Waits `duration` between hook runs, keeping other events for later;
    /// returns whether the agent was told to stop meanwhile.
    pub(super) fn pause(&mut self, duration: Duration) -> bool {
        let end = Instant::now() + duration;
        while !self.stopping {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.rx.recv_timeout(left) {
                Ok(Event::Signal(Signal::Stop(number))) => self.stop(number),
                Ok(Event::Signal(Signal::ChildExited)) => {}
                Ok(other) => self.pending.push_back(other),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return true,
            }
        }
        self.stopping
    }

    fn wait_for_hook(
        &mut self,
        running: &mut hooks::Running,
        kind: HookKind,
        version: &VersionName,
        index: usize,
        timeout: Duration,
    ) -> Result<(), HookFailure> {
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
                // A hook's processes end with it: its background jobs too.
                running.kill();
                let Some(mut failure) = HookFailure::of(kind, &status) else {
                    return Ok(());
                };
                failure.output = running.output_tail();
                if phase != Phase::Running {
                    match why {
                        Why::Timeout => {
                            failure.timed_out = true;
                            failure.what = format!(
                                "timed out after {} and {}",
                                crate::duration::human(timeout),
                                failure.what
                            );
                        }
                        Why::Shutdown => {
                            failure.what =
                                format!("was stopped by the agent's shutdown and {}", failure.what);
                        }
                    }
                }
                return Err(failure);
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
                    Phase::Killed => {
                        let mut failure =
                            HookFailure::not_run(kind, "did not end even after SIGKILL".into());
                        failure.timed_out = matches!(why, Why::Timeout);
                        failure.output = running.output_tail();
                        return Err(failure);
                    }
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
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(HookFailure::not_run(kind, "lost track of the hook".into()));
                }
            }
        }
    }
}
