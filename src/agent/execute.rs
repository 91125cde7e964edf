//! Doing a plan's actions, and what a failure of each means.
//!
//! Writes to Consul carry their own conditions, so that a stale view can
//! never make them wrong:
//! - a node key is written only together with a check that its version's
//!   key exists (in the same transaction): an agent never writes a node key
//!   for a version the tree it talks to lacks, whatever it saw before;
//! - `current`'s missing folder key is re-created only if `current` still
//!   has the ModifyIndex the agent saw (and only if the key is still
//!   missing): a version an operator removed meanwhile is never brought back.
//!
//! A rejected write is an answer, not an outage: a missing version key means
//! the version is gone (forget it); a key held by one of this agent's own old
//! sessions (a snapshot restore brings them back) means destroying that
//! session; a key held by a session it does not know means another agent
//! has its name.

use std::path::PathBuf;
use std::time::Instant;

use super::health::{HealthGate, Next};
use super::hook_run::{HealthWait, HookRun, Stop, Then};
use super::{Agent, Failure};
use crate::consul::{Conflict, Read, TxnOp, TxnOutcome};
use crate::hooks::{HookFailure, HookKind};
use crate::plan::{Action, LocalVersion, RolloutAttempt};
use crate::tree::{FailReason, NodeState};
use crate::version_name::VersionName;

/// How often a version kept because Consul hides its keys is checked again.
pub(crate) const KEPT_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Reports written in one transaction: at most three operations each (the
/// version's key checked, the node key written, its failure reason written
/// or deleted), and Consul takes at most 64.
pub(crate) const REPORTS_PER_TXN: usize = crate::consul::MAX_TXN_OPS / 3;

/// How long an agent uses the prefix's secret before it reads it again (a
/// secret rotated by an operator is taken up within this time, or at a
/// reload).
const SECRET_FOR: std::time::Duration = std::time::Duration::from_secs(300);

/// How long an agent trusts its listing of the prefix's agents for
/// deciding where to fetch an artifact from.
const AGENTS_SEEN_FOR: std::time::Duration = std::time::Duration::from_secs(60);

impl Agent {
    /// Does the first action of `batch` (all of it, if it is reports). An
    /// action that runs a hook only starts it: its end is handled by
    /// [`Agent::finished`].
    pub(super) fn execute(&mut self, index: usize, mut batch: Vec<Action>) {
        log::debug!("{}: {batch:?}", self.deployments[index].spec.id);
        if batch.iter().all(super::is_report) {
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

    /// Writes (or deletes) this node's keys for several versions in one
    /// transaction: one write for Consul, one wake-up for the other agents.
    fn report(&mut self, index: usize, batch: &[Action]) -> Result<(), Failure> {
        let Some(session) = self.sessions.id().map(String::from) else {
            return Ok(());
        };
        let name = self.config.name.clone();
        let deployment = &mut self.deployments[index];
        let now_ms = crate::logging::now_ms();
        // Per action: the node key, and the version key it is checked against.
        let mut keys: Vec<(String, Option<String>)> = Vec::new();
        for action in batch {
            match action {
                Action::Report(version, _) => {
                    let node_key = deployment.spec.prefix.node_key(version, &name);
                    let Some(version_key) = deployment.view.key_of(version) else {
                        // The plan reports only versions the view holds.
                        return Err(Failure::Other(format!(
                            "internal: no key known for {version}; not reporting it"
                        )));
                    };
                    keys.push((node_key, Some(version_key.to_string())));
                }
                Action::Unreport(version) => {
                    keys.push((deployment.spec.prefix.node_key(version, &name), None));
                }
                _ => unreachable!("only reports are batched"),
            }
        }
        // Failure reasons: written with a `failed` key, deleted with the
        // next report of another state.
        let mut reasons: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        for action in batch {
            let (version, failed) = match action {
                Action::Report(version, state) => (version, *state == NodeState::Failed),
                Action::Unreport(version) => (version, false),
                _ => continue,
            };
            let key = deployment.spec.prefix.reason_key(version, &name);
            if failed {
                let reason = deployment.reasons.get(version).cloned().unwrap_or_else(|| {
                    FailReason::other(None, "failed in an earlier run of the agent".into())
                });
                reasons.push((key, Some(reason.to_json())));
            } else if deployment.reasons_written.contains(version) {
                reasons.push((key, None));
            }
        }
        // The operations, and for each the action it belongs to.
        let mut ops: Vec<TxnOp<'_>> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (i, (action, (node_key, version_key))) in batch.iter().zip(&keys).enumerate() {
            match (action, version_key) {
                (Action::Report(_, state), Some(version_key)) => {
                    ops.push(TxnOp::Get { key: version_key });
                    // The flags say when: `depro status -json` shows it.
                    ops.push(TxnOp::Lock {
                        key: node_key,
                        value: state.as_str().as_bytes(),
                        session: &session,
                        flags: now_ms,
                    });
                    owner.extend([i, i]);
                }
                _ => {
                    ops.push(TxnOp::Delete { key: node_key });
                    owner.push(i);
                }
            }
        }
        // Restart acknowledgements (`depro restart`): written with the
        // `active` report of the live version once its restart settled,
        // deleted with the node key.
        let mut acks: Vec<(VersionName, String, Option<Vec<u8>>)> = Vec::new();
        for action in batch {
            match action {
                Action::Report(version, NodeState::Active)
                    if deployment.disk.live.as_ref() == Some(version) =>
                {
                    if let Some(id) = deployment.disk.restarted
                        && deployment.restarts_written.get(version) != Some(&id)
                    {
                        let key = deployment.spec.prefix.restarted_key(version, &name);
                        acks.push((version.clone(), key, Some(id.to_string().into_bytes())));
                    }
                }
                Action::Unreport(version) if deployment.restarts_written.contains_key(version) => {
                    let key = deployment.spec.prefix.restarted_key(version, &name);
                    acks.push((version.clone(), key, None));
                }
                _ => {}
            }
        }
        let pairs = reasons.iter().map(|(k, v)| (k, v));
        for (key, value) in pairs.chain(acks.iter().map(|(_, k, v)| (k, v))) {
            ops.push(match value {
                Some(value) => TxnOp::Lock {
                    key,
                    value,
                    session: &session,
                    flags: 0,
                },
                None => TxnOp::Delete { key },
            });
        }
        let outcome = self.consul.txn(&ops)?;
        self.health.reachable(&self.consul);
        let failures = match outcome {
            TxnOutcome::Committed(_) => {
                let deployment = &mut self.deployments[index];
                for (version, _, value) in acks {
                    match (value, deployment.disk.restarted) {
                        (Some(_), Some(id)) => deployment.restarts_written.insert(version, id),
                        _ => deployment.restarts_written.remove(&version),
                    };
                }
                for action in batch {
                    match action {
                        Action::Report(version, state) => {
                            log::info!("{}: {state}", deployment.label(version));
                            deployment.record_report(version, Some(*state));
                            if *state == NodeState::Failed {
                                deployment.reasons_written.insert(version.clone());
                            } else {
                                deployment.reasons_written.remove(version);
                            }
                        }
                        Action::Unreport(version) => {
                            log::info!("{}: removed", deployment.label(version));
                            deployment.record_report(version, None);
                            deployment.reasons_written.remove(version);
                        }
                        _ => {}
                    }
                }
                return Ok(());
            }
            TxnOutcome::Rejected(failures) => failures,
        };
        // Nothing was written. Act on why, then the next plan tries again.
        if failures.iter().any(|f| f.conflict == Conflict::Missing) {
            // A version key the view holds is gone: the view is outdated
            // (a removal raced this write, or Consul lost its data). Read the
            // tree again before anything else is decided from it.
            self.refresh_tree(index);
        }
        for failure in failures {
            let Some(&i) = owner.get(failure.op) else {
                continue;
            };
            let (node_key, _) = &keys[i];
            let version = match &batch[i] {
                Action::Report(v, _) | Action::Unreport(v) => v.clone(),
                _ => continue,
            };
            match failure.conflict {
                Conflict::Missing => log::debug!(
                    "{}: its key is gone from the tree; not reporting it",
                    self.deployments[index].label(&version)
                ),
                Conflict::LockHeld => self.resolve_lock_conflict(node_key)?,
                Conflict::InvalidSession => self.session_lost(&session),
                Conflict::Denied => {
                    return Err(Failure::Consul(
                        self.consul
                            .denied(format!("writing {node_key:?}"), failure.what),
                    ));
                }
                Conflict::LockDelay | Conflict::Stale | Conflict::Other => {
                    return Err(Failure::Other(format!(
                        "Consul refused to write {node_key:?}: {}; retrying",
                        failure.what
                    )));
                }
            }
        }
        Ok(())
    }

    /// What this agent says of itself under `.agents/` and `.known/`.
    pub(super) fn agent_record(&self) -> crate::tree::AgentRecord {
        crate::tree::AgentRecord {
            depro: env!("CARGO_PKG_VERSION").to_string(),
            since: self.started_at.clone(),
            listen: self.config.listen.map(|a| a.to_string()),
            zone: self.config.zone.clone(),
            ..Default::default()
        }
    }

    /// Remembers, as the agent stops, that it left each prefix it was
    /// announced under (`.known/<node>` with `left`, and the index its
    /// announcement was created at), so that `depro events -since` tells
    /// the departure; one transaction, not retried (a stop does not wait).
    pub(super) fn remember_leaving(&self) {
        let left = crate::logging::timestamp();
        let records: Vec<(String, Vec<u8>, String)> = self
            .deployments
            .iter()
            .filter_map(|d| {
                let record = crate::tree::AgentRecord {
                    left: Some(left.clone()),
                    joined: d.announced?,
                    ..self.agent_record()
                };
                let value = serde_json::to_vec(&record).unwrap_or_default();
                let prefix = &d.spec.prefix;
                let name = &self.config.name;
                Some((prefix.known_key(name), value, prefix.agent_key(name)))
            })
            .collect();
        // The announcement goes in the same transaction: the record's
        // index is the departure's.
        let ops: Vec<TxnOp> = records
            .iter()
            .flat_map(|(key, value, announced)| {
                [TxnOp::Set { key, value }, TxnOp::Delete { key: announced }]
            })
            .collect();
        if !ops.is_empty() {
            if let Err(e) = self.consul.txn(&ops) {
                log::debug!("could not record leaving: {e}");
            }
        }
    }

    /// Announces this agent under `<prefix>/.agents/<node>` for every
    /// deployment that has not under the current session: held by the
    /// session, so the announcement ends with the agent; and remembers it
    /// under `<prefix>/.known/<node>`, which stays.
    pub(super) fn announce_membership(&mut self) {
        let Some(session) = self.sessions.id().map(String::from) else {
            return;
        };
        let now = Instant::now();
        let record = self.agent_record();
        if self.config.listen.is_some() {
            for index in 0..self.deployments.len() {
                if self.deployments[index].announced.is_none() {
                    let _ = self.secret_of(index);
                }
            }
        }
        let value = serde_json::to_vec(&record).unwrap_or_default();
        for index in 0..self.deployments.len() {
            let deployment = &self.deployments[index];
            if deployment.announced.is_some() || deployment.blocked_until.is_some_and(|at| at > now)
            {
                continue;
            }
            let key = deployment.spec.prefix.agent_key(&self.config.name);
            let known = deployment.spec.prefix.known_key(&self.config.name);
            let op = TxnOp::Lock {
                key: &key,
                value: &value,
                session: &session,
                flags: 0,
            };
            // Remembered too, past this agent's life (`depro status` shows
            // it absent once it stops, until `depro forget`).
            let remember = TxnOp::Set {
                key: &known,
                value: &value,
            };
            let result = match self.consul.txn(&[op, remember]) {
                Ok(TxnOutcome::Committed(entries)) => {
                    log::debug!("{}: announced as {key}", deployment.spec.id);
                    let at = entries.first().map_or(0, |e| e.create_index);
                    self.deployments[index].announced = Some(at);
                    Ok(())
                }
                Ok(TxnOutcome::Rejected(failures)) => match failures.first().map(|f| f.conflict) {
                    Some(Conflict::InvalidSession) => {
                        self.session_lost(&session);
                        return;
                    }
                    Some(Conflict::LockHeld) => self.resolve_lock_conflict(&key),
                    _ => Err(Failure::Other(format!(
                        "Consul refused to write {key:?}: {}; retrying",
                        failures.first().map(|f| f.what.as_str()).unwrap_or("")
                    ))),
                },
                Err(e) => Err(Failure::Consul(e)),
            };
            if result.is_err() {
                self.settle(index, result);
            }
        }
    }

    /// Replaces the view of the tree with a fresh read; if Consul does not
    /// answer, voids it (the watch posts once Consul answers again).
    pub(super) fn refresh_tree(&mut self, index: usize) {
        let target = self.deployments[index].watch_target(&self.config.name, &self.session_cell);
        let prefix = self.deployments[index].spec.prefix.as_dir().to_string();
        match super::watch::look_now(&self.consul, &target) {
            Ok(seen) => {
                self.deployments[index].view.see_tree(seen, &prefix);
            }
            Err(e) => {
                self.health.unreachable(&e);
                self.deployments[index].view.forget_tree();
            }
        }
    }

    /// Another session holds this node's key. If it is one of this agent's
    /// own old sessions (a snapshot restore brought it back), destroy it
    /// (its keys go with it); otherwise another agent has this name.
    fn resolve_lock_conflict(&mut self, key: &str) -> Result<(), Failure> {
        let holder = self
            .consul
            .get(key, Read::consistent())?
            .value
            .and_then(|e| e.session);
        let Some(holder) = holder else {
            return Ok(()); // released meanwhile: the next try writes it
        };
        if self.sessions.is_own_old(&holder) {
            self.consul.destroy_session(&holder)?;
            log::warn!(
                "destroyed this agent's earlier session {holder}, which still held {key} \
                 (a snapshot restore brings old sessions back)"
            );
            return Ok(());
        }
        let name = &self.config.name;
        // Only for the message: a token that may not read it gets none.
        let owner = self
            .consul
            .session_info(&holder)
            .ok()
            .flatten()
            .map(|s| s.name)
            .unwrap_or_default();
        Err(Failure::Other(format!(
            "Consul refused to let this node write {key}: session {holder} ({owner:?}) holds it. \
             Is another agent named {name:?} running? Give each agent its own -name"
        )))
    }

    /// Re-creates `current`'s missing folder key, only if `current` is still
    /// what the agent saw and the key still missing.
    fn repair(&mut self, index: usize, version: &VersionName) -> Result<(), Failure> {
        let deployment = &mut self.deployments[index];
        let key = deployment.spec.prefix.folder_key(version);
        let current_key = deployment.spec.prefix.current_key();
        let Some(seen) = deployment.view.current_index() else {
            return Ok(());
        };
        let ops = [
            TxnOp::CheckIndex {
                key: &current_key,
                index: seen,
            },
            TxnOp::Cas {
                key: &key,
                value: b"",
                index: 0,
            },
        ];
        let outcome = self.consul.txn(&ops)?;
        let deployment = &mut self.deployments[index];
        match &outcome {
            TxnOutcome::Committed(_) => {
                log::warn!(
                    "{}: current names {version} but its folder key was missing; re-created it",
                    deployment.spec.id
                );
                deployment.view.repaired(version, key);
            }
            TxnOutcome::Rejected(failures) => {
                if let Some(denied) = failures.iter().find(|f| f.conflict == Conflict::Denied) {
                    return Err(Failure::Consul(
                        self.consul
                            .denied(format!("creating {key:?}"), denied.what.clone()),
                    ));
                }
                if outcome.failure_of(0).is_some() {
                    log::info!(
                        "{}: not re-creating {key}: current changed since it was read",
                        deployment.spec.id
                    );
                    deployment.view.current_outdated();
                } else {
                    // Someone else re-created it first.
                    deployment.view.repaired(version, key);
                }
            }
        }
        Ok(())
    }

    fn stage(&mut self, index: usize, version: &VersionName) -> Result<(), Failure> {
        let deployment = &mut self.deployments[index];
        match deployment.dir.stage(version) {
            Ok(()) => {
                deployment
                    .disk
                    .versions
                    .insert(version.clone(), LocalVersion::Deploying);
            }
            // A disk that is full, a directory that is not depro's: this
            // version fails here, the others go on (cleaning may free space).
            Err(e) => self.deploy_failed(index, version, FailReason::other(None, e.to_string())),
        }
        Ok(())
    }

    fn deploy(&mut self, index: usize, version: &VersionName) -> Result<(), Failure> {
        let dir = match self.deployments[index].dir.fresh_version_dir(version) {
            Ok(dir) => dir,
            Err(e) => {
                self.deploy_failed(index, version, FailReason::other(None, e.to_string()));
                return Ok(());
            }
        };
        log::info!(
            "{}: deploying into {}",
            self.deployments[index].label(version),
            dir.display()
        );
        let timeout = self.deployments[index].spec.timeout;
        // With trusted keys, only a version whose artifact one of them
        // signed (for this prefix and version) is fetched or deployed.
        let artifact = self.artifact_of(index, version)?;
        let spec = &self.deployments[index].spec;
        if !spec.trusted_keys.is_empty() {
            let verdict = match &artifact {
                None => Err(
                    "it names no artifact, and this deployment deploys only versions \
                             whose artifact a trusted key signed (trusted_keys)"
                        .to_string(),
                ),
                Some(a) => crate::signing::verify(
                    &spec.trusted_keys,
                    &crate::signing::message(&spec.prefix.to_string(), version.as_str(), a),
                    a.signature.as_ref(),
                ),
            };
            if let Err(why) = verdict {
                let why = format!("refused: {why}");
                self.deploy_failed(index, version, FailReason::other(None, why));
                return Ok(());
            }
        }
        // An artifact is fetched and verified first, unless it was already.
        let then = match artifact {
            // From Consul: untrusted (the digest names a file).
            Some(mut artifact) => {
                match crate::artifact::parse_sha256(&artifact.sha256)
                    .and_then(|hex| artifact.check().map(|()| hex))
                {
                    Ok(hex) => artifact.sha256 = hex,
                    Err(e) => {
                        let why = format!("its artifact, as the tree records it, is unusable: {e}");
                        self.deploy_failed(index, version, FailReason::other(None, why));
                        return Ok(());
                    }
                }
                let dest = self.deployments[index]
                    .dir
                    .artifact_path(version, &artifact.sha256);
                match dest.exists() {
                    true => Then::Deploy {
                        artifact: Some((artifact, dest)),
                    },
                    false => {
                        if let Some(parent) = dest.parent()
                            && let Err(e) = std::fs::create_dir_all(parent)
                        {
                            let why = format!("cannot make {}: {e}", parent.display());
                            self.deploy_failed(index, version, FailReason::other(None, why));
                            return Ok(());
                        }
                        log::info!(
                            "{}: fetching its artifact {}",
                            self.deployments[index].label(version),
                            crate::artifact::redact(&artifact.url)
                        );
                        // Its pieces' digests, for the fetch to check a
                        // peer's bytes as they come (from Consul: checked).
                        let pieces = dest.with_extension("pieces");
                        let _ = std::fs::remove_file(&pieces);
                        if let Some(p) = &artifact.pieces {
                            match p.usable(artifact.size) {
                                true => {
                                    let _ =
                                        std::fs::write(&pieces, format!("{} {}", p.size, p.sha256));
                                }
                                false => log::warn!(
                                    "{}: its artifact's pieces, as the tree records them, are \
                                     unusable; only the whole is checked",
                                    self.deployments[index].label(version)
                                ),
                            }
                        }
                        let origin_hosts = artifact
                            .origin_hosts
                            .map_or(crate::fan_out::ORIGIN_HOSTS, |n| n.clamp(1, 1000) as usize);
                        let (peers, origin_now, token) =
                            self.peers_for(index, &artifact.sha256, origin_hosts);
                        Then::Fetch {
                            artifact,
                            dest,
                            peers,
                            origin_now,
                            token,
                        }
                    }
                }
            }
            None => Then::Deploy { artifact: None },
        };
        self.start_deploy(index, version, dir, timeout, then)
    }

    /// Starts the deploy hook (or the fetch before it).
    fn start_deploy(
        &mut self,
        index: usize,
        version: &VersionName,
        dir: std::path::PathBuf,
        timeout: std::time::Duration,
        then: Then,
    ) -> Result<(), Failure> {
        let fetching = matches!(then, Then::Fetch { .. });
        match self.start_hook(index, HookKind::Deploy, version, dir, timeout, then) {
            Ok(true) => Ok(()),
            Ok(false) if fetching => unreachable!("a fetch always runs"),
            Ok(false) => self.deployed(index, version, Ok(()), None),
            Err(failure) => self.deployed(index, version, Err(failure), None),
        }
    }

    /// The prefix's secret (`<prefix>/.secret`), made if missing (by
    /// check-and-set: the first agent's wins), read again after
    /// [`SECRET_FOR`]; the artifact server serves this deployment's
    /// artifacts to holders of tokens under it (and under the one before).
    pub(super) fn secret_of(&mut self, index: usize) -> Option<String> {
        if let Some((at, secret)) = &self.deployments[index].secret
            && at.elapsed() < SECRET_FOR
        {
            return Some(secret.clone());
        }
        let deployment = &self.deployments[index];
        let key = deployment.spec.prefix.secret_key();
        let read = |consul: &crate::consul::Consul| {
            consul
                .get(&key, crate::consul::Read::consistent())
                .ok()
                .map(|a| {
                    a.value
                        .map(|e| String::from_utf8_lossy(&e.value).trim().to_string())
                })
        };
        let secret = match read(&self.consul)? {
            Some(secret) if secret.len() >= 32 => secret,
            _ => {
                let new = crate::peer::new_secret()?;
                let op = TxnOp::Cas {
                    key: &key,
                    value: new.as_bytes(),
                    index: 0,
                };
                let _ = self.consul.txn(&[op]);
                read(&self.consul)?.filter(|s| s.len() >= 32)?
            }
        };
        self.served
            .allow(deployment.spec.path.clone(), secret.clone());
        self.deployments[index].secret = Some((Instant::now(), secret.clone()));
        Some(secret)
    }

    /// Where this host fetches an artifact from (`fan_out`): the
    /// peers to ask, best first, whether the origin is for it now, and the
    /// token that opens the artifact on the peers.
    fn peers_for(
        &mut self,
        index: usize,
        sha256: &str,
        origin_hosts: usize,
    ) -> (Vec<String>, bool, String) {
        let Some(secret) = self.secret_of(index) else {
            return (Vec::new(), true, String::new());
        };
        let token = crate::peer::token(&secret, sha256);
        let prefix = self.deployments[index].spec.prefix.clone();
        // The prefix's agents, read at most once a minute (from any server,
        // `?stale`): one listing per host, not per host and version; a
        // member that is not what the listing says costs a dropped request
        // or a less even tree, and the bytes are verified anyway.
        let fresh = self.deployments[index]
            .agents_seen
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < AGENTS_SEEN_FOR);
        if !fresh {
            let read = crate::consul::Read {
                consistency: crate::consul::Consistency::Stale,
                ..crate::consul::Read::default()
            };
            let Ok(agents) = self.consul.list_starting_with(&prefix.agents_dir(), read) else {
                return (Vec::new(), true, token);
            };
            let tree = crate::tree::Tree::parse(&prefix, &agents.value);
            self.deployments[index].agents_seen =
                Some((Instant::now(), tree.agents.into_iter().collect()));
        }
        let agents = self.deployments[index]
            .agents_seen
            .as_ref()
            .map_or(&[][..], |(_, agents)| &agents[..]);
        // From the tree: only a plain ADDR:PORT is ever asked.
        let mut members: Vec<crate::fan_out::Member<'_>> = agents
            .iter()
            .map(|(node, record)| crate::fan_out::Member {
                name: node,
                listen: record.listen.as_deref().and_then(|l| l.parse().ok()),
                zone: record.zone.as_deref(),
            })
            .collect();
        // This host as it is, whatever the listing says (it may predate its
        // announcement): every host must see itself where the others do.
        members.retain(|m| m.name != self.config.name);
        members.push(crate::fan_out::Member {
            name: &self.config.name,
            listen: self.config.listen,
            zone: self.config.zone.as_deref(),
        });
        let sources = crate::fan_out::sources(
            &self.config.name,
            self.config.zone.as_deref(),
            &members,
            sha256,
            origin_hosts,
        );
        let peers = sources
            .peers
            .iter()
            .map(|a| format!("http://{a}"))
            .collect();
        (peers, sources.origin_now, token)
    }

    /// The artifact `version`'s folder key names, read from Consul (the
    /// listing the agent follows has names only). A key another tool wrote
    /// has none; one that names an unusable artifact fails the version.
    fn artifact_of(
        &mut self,
        index: usize,
        version: &VersionName,
    ) -> Result<Option<crate::artifact::Artifact>, Failure> {
        let Some(key) = self.deployments[index]
            .view
            .key_of(version)
            .map(String::from)
        else {
            return Ok(None);
        };
        let read = crate::consul::Read::consistent();
        let answer = self.consul.get(&key, read).map_err(Failure::Consul)?;
        let meta = answer
            .value
            .map(|e| crate::tree::VersionMeta::parse(&e.value))
            .unwrap_or_default();
        Ok(meta.artifact)
    }

    /// The fetch of `version`'s artifact ended: on success the deploy hook
    /// runs with it; otherwise the version fails here with the fetch's
    /// reason (its last line: a digest mismatch names both digests).
    fn fetched(
        &mut self,
        index: usize,
        version: &VersionName,
        artifact: crate::artifact::Artifact,
        dest: std::path::PathBuf,
        outcome: Result<(), HookFailure>,
        stop: Option<Stop>,
    ) -> Result<(), Failure> {
        let told = crate::artifact::progress_of(&dest);
        let _ = std::fs::remove_file(dest.with_extension("progress"));
        match outcome {
            Ok(()) if dest.exists() => {
                let source = match told.strip_prefix(crate::artifact::FETCHED_FROM) {
                    Some("peer") => "peer",
                    _ => "origin",
                };
                let bytes = std::fs::metadata(&dest).map_or(0, |m| m.len());
                let id = &self.deployments[index].spec.id;
                crate::metrics::METRICS.fetched(id, source, bytes);
                let dir = self.deployments[index].dir.version_path(version);
                let timeout = self.deployments[index].spec.timeout;
                let then = Then::Deploy {
                    artifact: Some((artifact, dest)),
                };
                self.start_deploy(index, version, dir, timeout, then)
            }
            Ok(()) => {
                let why = format!("the artifact's fetch left nothing at {}", dest.display());
                self.deploy_failed(index, version, FailReason::other(None, why));
                Ok(())
            }
            Err(failure) if matches!(stop, Some(Stop::Preempted(_))) => {
                self.deployed(index, version, Err(failure), stop)
            }
            Err(failure) => {
                let last = failure.output.lines().rev().find(|l| !l.trim().is_empty());
                let mut reason = FailReason::of_hook(&failure);
                reason.error = match last {
                    Some(line) if failure.exit_code == Some(1) => {
                        format!("fetching the artifact failed: {line}")
                    }
                    _ => format!("fetching the artifact failed: it {}", failure.what),
                };
                self.deploy_failed(index, version, reason);
                Ok(())
            }
        }
    }

    /// A hook ended: what it means for its step.
    pub(super) fn finished(
        &mut self,
        index: usize,
        run: HookRun,
        outcome: Result<(), HookFailure>,
    ) -> Result<(), Failure> {
        let HookRun {
            version,
            then,
            stop,
            ..
        } = run;
        match then {
            Then::Deploy { .. } => self.deployed(index, &version, outcome, stop),
            Then::Fetch { artifact, dest, .. } => {
                self.fetched(index, &version, artifact, dest, outcome, stop)
            }
            Then::Rollout { from } => self.rolled_out(index, &version, from, outcome),
            Then::Health { from, gate } => self.checked(index, &version, from, gate, outcome, stop),
            Then::Clean => self.cleaned(index, &version, outcome, stop),
        }
    }

    /// The deploy hook of `version` ended.
    fn deployed(
        &mut self,
        index: usize,
        version: &VersionName,
        outcome: Result<(), HookFailure>,
        stop: Option<Stop>,
    ) -> Result<(), Failure> {
        if let Some(Stop::Preempted(_)) = stop {
            // Not ready (its marker still says deploying): deployed again
            // once the deployment is free, or cleaned if it was removed.
            log::info!(
                "{}: its deploy was stopped; it is deployed again later if it is still wanted",
                self.deployments[index].label(version)
            );
            self.recover_state_dir(index, "deploy")?;
            return Ok(());
        }
        if let Some(why) = self.recover_state_dir(index, "deploy")? {
            self.deploy_failed(
                index,
                version,
                FailReason::other(Some(HookKind::Deploy), why),
            );
            return Ok(());
        }
        let outcome = outcome
            .map_err(|failure| Box::new(FailReason::of_hook(&failure)))
            .and_then(|()| {
                self.deployments[index]
                    .dir
                    .mark_ready(version)
                    .map_err(|e| Box::new(FailReason::other(None, e.to_string())))
            });
        match outcome {
            Ok(()) => {
                let deployment = &mut self.deployments[index];
                deployment
                    .disk
                    .versions
                    .insert(version.clone(), LocalVersion::Ready);
                log::info!("{}: deployed", deployment.label(version));
            }
            Err(why) => self.deploy_failed(index, version, *why),
        }
        Ok(())
    }

    /// `version` failed here: reported `failed` (with why) until an
    /// operator retries.
    fn deploy_failed(&mut self, index: usize, version: &VersionName, why: FailReason) {
        let deployment = &mut self.deployments[index];
        deployment
            .disk
            .versions
            .insert(version.clone(), LocalVersion::DeployFailed);
        log::error!(
            "{}: {}; reporting failed (fix it, then retry without moving current: `depro deploy {version} -prefix={} -no-rollout`)",
            deployment.label(version),
            why.error,
            deployment.spec.prefix
        );
        deployment.reasons.insert(version.clone(), why);
    }

    fn rollout(
        &mut self,
        index: usize,
        to: &VersionName,
        from: Option<&VersionName>,
    ) -> Result<(), Failure> {
        let deployment = &mut self.deployments[index];
        if let Err(e) = deployment.dir.begin_rollout(to) {
            // The hook never ran: what runs is what ran before.
            self.rollout_failed(index, to, FailReason::other(None, e.to_string()));
            return Ok(());
        }
        deployment.disk.rollout = Some(RolloutAttempt { to: to.clone() });
        // A restart of the live version (`depro restart`) is remembered
        // once its rollout settles.
        deployment.restarting = deployment
            .view
            .wanted()
            .filter(|w| w.current.as_ref() == Some(to))
            .and_then(|w| w.restart);
        let from_text = from
            .map(|v| v.to_string())
            .unwrap_or_else(|| "nothing".into());
        log::info!("{}: rolling out (from {from_text})", deployment.label(to));
        let cwd = deployment.spec.path.clone();
        let timeout = deployment.spec.timeout;
        let then = Then::Rollout {
            from: from.cloned(),
        };
        match self.start_hook(index, HookKind::Rollout, to, cwd, timeout, then) {
            Ok(true) => Ok(()),
            Ok(false) => self.rolled_out(index, to, from.cloned(), Ok(())),
            Err(failure) => self.rolled_out(index, to, from.cloned(), Err(failure)),
        }
    }

    /// The rollout hook of `to` ended: on success the node runs `to`, and
    /// its health checks start.
    fn rolled_out(
        &mut self,
        index: usize,
        to: &VersionName,
        from: Option<VersionName>,
        outcome: Result<(), HookFailure>,
    ) -> Result<(), Failure> {
        if let Some(why) = self.recover_state_dir(index, "rollout")? {
            self.rollout_failed(index, to, FailReason::other(Some(HookKind::Rollout), why));
            return Ok(());
        }
        if let Err(failure) = outcome {
            // The rollout stays unsettled (so the next one runs whatever
            // current is) and the version failed until an operator retries.
            self.rollout_failed(index, to, FailReason::of_hook(&failure));
            return Ok(());
        }
        let deployment = &mut self.deployments[index];
        deployment.disk.switched = Some(to.clone());
        if let Err(e) = deployment.dir.mark_switched(to) {
            log::warn!("{}: {e}", deployment.spec.id);
        }
        if deployment.spec.health.is_empty() {
            return self.settle_rollout(index, to);
        }
        let still_current = deployment
            .view
            .wanted()
            .is_some_and(|w| w.current.as_ref() == Some(to));
        if !still_current {
            // Current moved on while the hook ran: no health checks for a
            // version that is not wanted any more (the rollout stays
            // unsettled, and the next one goes on from here).
            return Ok(());
        }
        let gate = HealthGate::new(Instant::now(), deployment.spec.health_timeout);
        self.check_health(index, to, from, gate)
    }

    /// Starts a health check of `to` (unless the agent is stopping: then
    /// the rollout stays unsettled and runs again when it starts again).
    fn check_health(
        &mut self,
        index: usize,
        to: &VersionName,
        from: Option<VersionName>,
        mut gate: HealthGate,
    ) -> Result<(), Failure> {
        if self.stopping {
            return Ok(());
        }
        let deployment = &self.deployments[index];
        let timeout = gate.attempt(Instant::now(), deployment.spec.timeout);
        let cwd = deployment.spec.path.clone();
        let then = Then::Health {
            from: from.clone(),
            gate,
        };
        match self.start_hook(index, HookKind::Health, to, cwd, timeout, then) {
            Ok(true) => Ok(()),
            Ok(false) => self.checked(index, to, from, gate, Ok(()), None),
            Err(failure) => self.checked(index, to, from, gate, Err(failure), None),
        }
    }

    /// A health check of `to` ended: healthy, check again later, or give up.
    fn checked(
        &mut self,
        index: usize,
        to: &VersionName,
        from: Option<VersionName>,
        gate: HealthGate,
        outcome: Result<(), HookFailure>,
        stop: Option<Stop>,
    ) -> Result<(), Failure> {
        let label = self.deployments[index].label(to);
        let failure = match outcome {
            Ok(()) => {
                log::info!(
                    "{label}: healthy (health hook passed, attempt {})",
                    gate.attempts
                );
                return self.settle_rollout(index, to);
            }
            Err(failure) => failure,
        };
        if matches!(stop, Some(Stop::Shutdown | Stop::Preempted(_))) || self.stopping {
            // Cut short, not failed: the rollout stays unsettled.
            return Ok(());
        }
        let next = gate.after_failure(Instant::now());
        if let Next::Attempt(at) = next {
            log::info!(
                "{label}: {failure}; checking again in {}",
                crate::duration::human(at.saturating_duration_since(Instant::now()))
            );
        }
        let wait = HealthWait {
            to: to.clone(),
            from,
            gate,
            next,
            last: failure,
        };
        if matches!(next, Next::GiveUp(at) if at <= Instant::now()) {
            return self.health_due(index, wait);
        }
        self.deployments[index].health_wait = Some(wait);
        Ok(())
    }

    /// The time of a health wait has come: check again, or fail the gate.
    pub(super) fn health_due(&mut self, index: usize, wait: HealthWait) -> Result<(), Failure> {
        let HealthWait {
            to,
            from,
            gate,
            next,
            last,
        } = wait;
        match next {
            Next::Attempt(_) => self.check_health(index, &to, from, gate),
            Next::GiveUp(_) => {
                let mut reason = FailReason::of_hook(&last);
                reason.error = format!(
                    "the health hook did not pass within {} ({}; the last one {})",
                    crate::duration::human(gate.limit),
                    gate.summary(Instant::now()),
                    last.what
                );
                reason.timed_out = true;
                self.rollout_failed(index, &to, reason);
                Ok(())
            }
        }
    }

    /// `to` passed its rollout (and health checks): it is live.
    fn settle_rollout(&mut self, index: usize, to: &VersionName) -> Result<(), Failure> {
        let deployment = &mut self.deployments[index];
        match deployment.dir.finish_rollout(to) {
            Ok(()) => {
                deployment.disk.live = Some(to.clone());
                deployment.disk.rollout = None;
                deployment.disk.switched = None;
                log::info!("{}: live", deployment.label(to));
                if let Some(id) = deployment.restarting.take() {
                    // Not recorded (a full disk): the restart runs again,
                    // which a rollout hook must bear anyway (a crash).
                    if let Err(e) = deployment.dir.mark_restarted(id) {
                        log::warn!("{}: {e}", deployment.spec.id);
                    }
                    deployment.disk.restarted = Some(id);
                }
            }
            // The hook switched; if this cannot be recorded, the node's
            // state is not what it would say: report the rollout failed.
            Err(e) => self.rollout_failed(
                index,
                to,
                FailReason::other(None, format!("the rollout hook succeeded but {e}")),
            ),
        }
        Ok(())
    }

    fn rollout_failed(&mut self, index: usize, to: &VersionName, why: FailReason) {
        let deployment = &mut self.deployments[index];
        deployment.disk.rollout_failed.insert(to.clone());
        log::error!(
            "{}: {}; reporting failed (fix it, then retry without moving current: `depro deploy {to} -prefix={} -no-rollout`)",
            deployment.label(to),
            why.error,
            deployment.spec.prefix
        );
        deployment.reasons.insert(to.clone(), why);
    }

    /// Before cleaning a version that left the listing: a listing leaves
    /// out the keys the token may not read, so the version is confirmed
    /// gone by reading its key (folder key, then plain key) on the leader:
    /// Consul answers a key the token may not read with a denial, not with
    /// "not found". A version whose key is denied, or still there, is kept
    /// as it is and checked again every [`KEPT_RECHECK`] (the tree is read
    /// again too).
    fn confirm_removed(&mut self, index: usize, version: &VersionName) -> Result<bool, Failure> {
        let folder = self.deployments[index].spec.prefix.folder_key(version);
        let plain = folder.trim_end_matches('/').to_string();
        let mut why = None;
        for key in [&folder, &plain] {
            match self.consul.get(key, Read::consistent()) {
                Ok(answer) if answer.value.is_none() => continue,
                Ok(_) => {
                    why = Some(format!("{key} is still there"));
                    break;
                }
                Err(e) if matches!(e.kind, crate::consul::ConsulErrorKind::Denied(_)) => {
                    let deployment = &mut self.deployments[index];
                    deployment.warn_once(format!(
                        "{version} is gone from the listing, but Consul denies this agent's token \
                         its key {key}: keeping it as it is (directory and node key), checking \
                         again every {}",
                        crate::duration::human(KEPT_RECHECK)
                    ));
                    why = Some(String::new());
                    break;
                }
                Err(e) => return Err(Failure::Consul(e)),
            }
        }
        let Some(why) = why else {
            return Ok(true);
        };
        if !why.is_empty() {
            log::info!(
                "{}: left the listing but {why}; keeping it, and reading the tree again",
                self.deployments[index].label(version)
            );
        }
        let deployment = &mut self.deployments[index];
        deployment.view.keep(version);
        deployment.kept_check_at = Some(Instant::now() + KEPT_RECHECK);
        self.refresh_tree(index);
        Ok(false)
    }

    fn clean(&mut self, index: usize, version: &VersionName) -> Result<(), Failure> {
        if !self.confirm_removed(index, version)? {
            return Ok(());
        }
        let deployment = &self.deployments[index];
        let cwd: PathBuf = deployment.spec.path.clone();
        log::info!("{}: cleaning", deployment.label(version));
        if !deployment.dir.owns(version) {
            return self.cleaned(index, version, Ok(()), None);
        }
        // From here a crash leaves it "not ready", never ready-but-partial;
        // and so does this agent (it reports it busy, never ready, if the
        // version comes back meanwhile).
        deployment.dir.begin_clean(version)?;
        let timeout = deployment.spec.timeout;
        self.deployments[index]
            .disk
            .versions
            .insert(version.clone(), LocalVersion::Deploying);
        match self.start_hook(index, HookKind::Clean, version, cwd, timeout, Then::Clean) {
            Ok(true) => Ok(()),
            Ok(false) => self.cleaned(index, version, Ok(()), None),
            Err(failure) => self.cleaned(index, version, Err(failure), None),
        }
    }

    /// The clean hook of `version` ended (or there is none): its directory
    /// goes, whatever the hook said, unless it was stopped to let current
    /// go first (then it is cleaned again later).
    fn cleaned(
        &mut self,
        index: usize,
        version: &VersionName,
        outcome: Result<(), HookFailure>,
        stop: Option<Stop>,
    ) -> Result<(), Failure> {
        if let Some(Stop::Preempted(_)) = stop {
            log::info!(
                "{}: its clean was stopped; it is cleaned again later",
                self.deployments[index].label(version)
            );
            if self.recover_state_dir(index, "clean")?.is_some() {
                self.deployments[index].dir.begin_clean(version)?;
            }
            return Ok(());
        }
        if let Err(why) = outcome {
            log::warn!(
                "{}: {why}; removing the directory anyway",
                self.deployments[index].label(version)
            );
        }
        if self.recover_state_dir(index, "clean")?.is_some() {
            self.deployments[index].dir.begin_clean(version)?;
        }
        let deployment = &mut self.deployments[index];
        deployment.dir.remove_version(version)?;
        deployment.disk.versions.remove(version);
        deployment.disk.rollout_failed.remove(version);
        deployment.reasons.remove(version);
        Ok(())
    }

    /// After a hook: if it deleted depro's state directory, make it again,
    /// take its lock again, write back every marker the agent knows, and
    /// say why the step that ran it cannot count.
    fn recover_state_dir(&mut self, index: usize, hook: &str) -> Result<Option<String>, Failure> {
        let deployment = &mut self.deployments[index];
        if !deployment.dir.recover_state_dir()? {
            return Ok(None);
        }
        deployment.dir.restore(&deployment.disk)?;
        let why = format!(
            "the {hook} hook deleted depro's state directory ({}/.depro); depro made it again \
             (its lock on the deployment path was held throughout)",
            deployment.spec.path.display()
        );
        log::warn!("{}: {why}", deployment.spec.id);
        Ok(Some(why))
    }

    /// This node's `failed` key for `version` is gone. An operator deleting
    /// it asks for a retry; a lost session deletes it too, and is no such
    /// request. Confirmed on the leader, then told apart by asking Consul
    /// whether the session lives.
    /// Checks, for each deployment whose time has come, that this node's
    /// `failed` keys still exist (one read-only transaction): one deleted by
    /// hand asks for a retry.
    pub(super) fn check_own_keys(&mut self) {
        let now = Instant::now();
        for index in 0..self.deployments.len() {
            let deployment = &mut self.deployments[index];
            if deployment.own_check_at.is_none_or(|at| at > now) {
                continue;
            }
            deployment.own_check_at = Some(now + super::deployment::OWN_CHECK);
            let own: Vec<VersionName> = deployment.own_failed().into_iter().collect();
            let keys: Vec<String> = own
                .iter()
                .map(|v| deployment.spec.prefix.node_key(v, &self.config.name))
                .collect();
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let missing: Vec<VersionName> = match self.consul.missing_keys(&refs) {
                Ok(missing) => own
                    .into_iter()
                    .zip(&keys)
                    .filter(|(_, key)| missing.contains(key.as_str()))
                    .map(|(v, _)| v)
                    .collect(),
                Err(e) => {
                    self.health.unreachable(&e);
                    continue;
                }
            };
            for version in missing {
                self.own_key_gone(index, &version);
            }
        }
    }

    pub(super) fn own_key_gone(&mut self, index: usize, version: &VersionName) {
        let deployment = &self.deployments[index];
        if deployment.reported.get(version) != Some(&crate::tree::NodeState::Failed) {
            return;
        }
        let Some(session) = self.sessions.id().map(String::from) else {
            return;
        };
        let key = deployment.spec.prefix.node_key(version, &self.config.name);
        let verdict = self
            .consul
            .get(&key, Read::consistent())
            .and_then(|answer| {
                if answer.value.is_some() {
                    return Ok(None); // a follower lagged: it is still there
                }
                Ok(Some(self.consul.session_info(&session)?.is_some()))
            });
        match verdict {
            Ok(None) => {}
            Ok(Some(true)) => super::reload::retry(&mut self.deployments[index], version),
            Ok(Some(false)) => self.session_lost(&session),
            Err(e) => {
                // Cannot tell: report `failed` again rather than retry on a guess.
                self.health.unreachable(&e);
                self.deployments[index].record_report(version, None);
            }
        }
    }
}
