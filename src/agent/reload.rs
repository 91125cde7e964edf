//! SIGHUP and shutdown: switching to a new configuration without losing
//! the running one when the new one is bad, and ending cleanly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::Agent;
use super::deployment::DeploymentState;
use super::view::View;
use crate::config::{self, AgentConfig, Deployment};
use crate::consul::Consul;
use crate::error::{Error, Result};
use crate::hooks;
use crate::plan::LocalVersion;
use crate::version_name::VersionName;

/// A client certificate that expires within this is warned about, at start
/// and at each reload.
pub(super) const CERT_WARNING: std::time::Duration = std::time::Duration::from_secs(7 * 86400);

/// How often at most the credential files are read again after refusals.
const CREDENTIALS_READ: std::time::Duration = std::time::Duration::from_secs(10);

impl Agent {
    pub(super) fn reload(&mut self) {
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
        // The prefixes' secrets are read again (an operator rotated one).
        for index in 0..self.deployments.len() {
            self.deployments[index].secret = None;
            if self.config.listen.is_some() {
                let _ = self.secret_of(index);
            }
        }
    }

    /// Consul refused the credentials: if the token file or the TLS files
    /// changed since they were read (a secrets agent or cert tool rewrote
    /// them without SIGHUP), reconnect with them. At most every
    /// [`CREDENTIALS_READ`].
    pub(super) fn credentials_refused(&mut self) {
        if self.stopping
            || self
                .credentials_read
                .is_some_and(|at| at.elapsed() < CREDENTIALS_READ)
        {
            return;
        }
        self.credentials_read = Some(std::time::Instant::now());
        let Ok(new) = config::resolve_agent(&self.args, &config::process_env) else {
            return; // a broken edit waits for SIGHUP, which says why
        };
        let Ok(consul) = Consul::new(&new.consul) else {
            return;
        };
        let renewed = new.consul.token != self.config.consul.token
            || consul.tls().fingerprint != self.consul.tls().fingerprint;
        if renewed && new.consul.address == self.config.consul.address {
            log::info!(
                "Consul refused the credentials, and the token or certificate files changed since \
                 they were read: reconnecting with the new ones"
            );
            let mut config = self.config.clone();
            config.consul = new.consul;
            if let Err(e) = self.apply(config) {
                log::error!("cannot reconnect with the new credentials: {e}");
            }
        }
    }

    /// Switches to a new configuration. Nothing changes unless all of it
    /// can be applied (every new deployment path opened).
    fn apply(&mut self, new: AgentConfig) -> Result<()> {
        let consul = Consul::new(&new.consul).map_err(Error::Config)?;
        for warning in &new.warnings {
            log::warn!("{warning}");
        }
        if let Some(warning) = crate::consul::expiry_warning(consul.tls(), CERT_WARNING) {
            log::warn!("{warning}");
        }
        let mut opened = BTreeMap::new();
        for spec in &new.deployments {
            if !self.deployments.iter().any(|d| d.spec.path == spec.path) {
                opened.insert(
                    spec.path.clone(),
                    DeploymentState::open(spec.clone(), new.rescan_interval)?,
                );
            }
        }
        crate::logging::set_level(new.log_level);
        crate::logging::set_context(&new.name, super::deployment_ids(&new));
        // The TLS files' contents too: a certificate renewed in place keeps
        // its path.
        let reconnect = new.consul != self.config.consul
            || consul.tls().fingerprint != self.consul.tls().fingerprint
            || new.name != self.config.name
            || new.session_ttl != self.config.session_ttl
            || new.rescan_interval != self.config.rescan_interval;
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
                    kept.rescan = new.rescan_interval;
                    kept
                }
            };
            self.deployments.push(deployment);
        }
        for gone in &mut old {
            if let Some(run) = gone.hook.take() {
                log::warn!("{}: no longer configured while a hook runs", gone.spec.id);
                self.abandon_hook(run);
            }
        }
        drop(old); // releases the locks of deployments no longer configured
        // Artifacts of deployments no longer configured are served no more.
        let paths: Vec<_> = self
            .deployments
            .iter()
            .map(|d| d.spec.path.clone())
            .collect();
        self.served.keep_only(&paths);
        if reconnect || topology_changed {
            // Start over with Consul: new watches, and a new session that
            // registers every version again.
            self.sessions.end(&self.consul);
            for deployment in &mut self.deployments {
                deployment.watches = None;
                deployment.watch_retry = None;
                deployment.view = View::default();
                deployment.forget_reports();
            }
            self.consul = Arc::new(consul);
        }
        self.config = new;
        Ok(())
    }

    pub(super) fn shut_down(&mut self) {
        for deployment in &mut self.deployments {
            deployment.watches = None;
        }
        self.remember_leaving();
        self.sessions.end(&self.consul);
        log::info!(
            "depro agent {} stopped after {} requests to Consul",
            self.config.name,
            self.consul.request_count()
        );
    }
}

/// Probes whether the deployment's shell has pipefail, and warns when it
/// has not and a hook uses a pipe.
pub(super) fn shell_pipefail(spec: &Deployment) -> bool {
    let pipefail = hooks::supports_pipefail(&spec.shell);
    for warning in hook_warnings(spec, pipefail) {
        log::warn!("{warning}");
    }
    pipefail
}

/// What the agent warns about a deployment's hooks (and `agent -check`
/// prints): a pipe under a shell without pipefail, where a failing command
/// inside a pipeline goes unnoticed; no hooks at all.
pub(super) fn hook_warnings(spec: &Deployment, pipefail: bool) -> Vec<String> {
    let mut hooks = spec
        .deploy
        .iter()
        .chain(&spec.rollout)
        .chain(&spec.clean)
        .chain(&spec.health);
    let mut warnings = Vec::new();
    if hooks.clone().next().is_none() {
        warnings.push(format!(
            "{}: no hooks: versions are empty directories and a rollout changes nothing but \
             <path>/current; add a \"deploy\" hook that fetches the build, and a \"rollout\" hook",
            spec.origin
        ));
    }
    if !pipefail && hooks.any(|l| hooks::has_pipe(l)) {
        warnings.push(format!(
            "{}: {} has no pipefail, so a failing command inside a pipeline of a hook goes unnoticed; \
             set \"shell\": \"bash\"",
            spec.origin,
            spec.shell.display()
        ));
    }
    warnings
}

/// An operator deleted this node's `failed` key: try again.
pub(super) fn retry(deployment: &mut DeploymentState, version: &VersionName) {
    log::info!(
        "{}: failed key removed by an operator; retrying",
        deployment.label(version)
    );
    deployment.record_report(version, None);
    if deployment.disk.versions.get(version) == Some(&LocalVersion::DeployFailed) {
        deployment.disk.versions.remove(version);
    }
    deployment.disk.rollout_failed.remove(version);
    deployment.reasons.remove(version);
}

pub(super) fn describe_files(files: &[PathBuf]) -> String {
    if files.is_empty() {
        "no config files read".to_string()
    } else {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        format!("read {}", names.join(", "))
    }
}
