//! `depro agent -check`: validates the configuration exactly as the agent
//! would take it (files, their owners and modes, fields, shells, paths,
//! the token file), without contacting Consul, and says what it found. The
//! systemd unit runs it before starting the agent and before a reload, so a
//! broken edit never reaches a running agent.

use std::path::Path;

use crate::cli::AgentArgs;
use crate::config::{self, AgentConfig};
use crate::error::{Error, Result};

/// Checks the configuration; `Ok` with the warnings the agent would log
/// and a one-line summary, or the first problem, naming its file and field.
pub(crate) fn check(args: &AgentArgs) -> Result<(Vec<String>, String)> {
    let config = config::resolve_agent(args, &config::process_env)?;
    // The client as the agent makes it (TLS files read), without a request.
    let consul = crate::consul::Consul::new(&config.consul).map_err(Error::Config)?;
    let mut warnings = config.warnings.clone();
    warnings.extend(crate::consul::expiry_warning(
        consul.tls(),
        super::reload::CERT_WARNING,
    ));
    for deployment in &config.deployments {
        writable_path(&deployment.path)
            .map_err(|why| Error::Config(format!("{}.path: {why}", deployment.origin)))?;
        let pipefail = crate::hooks::supports_pipefail(&deployment.shell);
        warnings.extend(super::reload::hook_warnings(deployment, pipefail));
    }
    Ok((warnings, summary(&config, consul.server())))
}

/// The agent must be able to make (or use) the deployment directory.
fn writable_path(path: &Path) -> std::result::Result<(), String> {
    let mut existing = path;
    while !existing.exists() {
        existing = existing
            .parent()
            .ok_or_else(|| format!("no part of {} exists", path.display()))?;
    }
    if !existing.is_dir() {
        return Err(format!(
            "{} is not a directory; name a directory (or one to be created)",
            existing.display()
        ));
    }
    nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK)
        .map_err(|e| {
            format!(
                "{} is not writable by this user ({e}); run the agent as a user that may write it, or change its owner",
                existing.display()
            )
        })
}

fn summary(config: &AgentConfig, server: &str) -> String {
    let files: Vec<String> = config
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    let ids: Vec<&str> = config.deployments.iter().map(|d| d.id.as_str()).collect();
    format!(
        "the configuration is valid: node {}, {} deployment{} ({}), Consul at {} (not contacted); read {}",
        config.name,
        ids.len(),
        if ids.len() == 1 { "" } else { "s" },
        if ids.is_empty() {
            "none: the agent would idle".to_string()
        } else {
            ids.join(", ")
        },
        server,
        if files.is_empty() {
            "no files".to_string()
        } else {
            files.join(", ")
        }
    )
}
