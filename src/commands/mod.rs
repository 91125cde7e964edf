//! The operator commands: they read and drive the Consul tree, and enforce
//! its guarantees (see docs/protocol.md). Each command resolves its
//! settings into a [`Ctx`] first, then talks to Consul through it.

/// A command's result line: on stdout, or on stderr under `-json` (see
/// `result`).
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::commands::result::say(&format!($($arg)*))
    };
}

mod control;
mod deploy;
mod driver;
mod dry_run;
mod events;
mod history;
mod interrupt;
mod policy;
mod progress;
mod remove;
mod restart;
mod result;
mod status;
mod switch;
mod switch_plan;
mod wait;
mod waves;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

pub(crate) use control::{forget, pause, resume};
pub(crate) use deploy::{deploy, rollback, rollout};
pub(crate) use history::history;

/// `depro events`.
pub(crate) fn events(args: crate::cli::EventsArgs, env: Env<'_>) -> Result<()> {
    let mut ctx = Ctx::resolve(&args.tree, env)?;
    events::events(&mut ctx, args.tree.json, args.since)
}
pub(crate) use policy::policy;
pub(crate) use remove::{prune, remove};
pub(crate) use restart::restart;
pub(crate) use status::status;
pub(crate) use wait::wait;

use crate::cli::TreeArgs;
use crate::config::{self, Env, FileConnection};
use crate::consul::{
    Conflict, Consul, ConsulError, ConsulErrorKind, KvEntry, Read, TxnOp, TxnOutcome,
};
use crate::cursor::{Cursor, Pacing, WAIT};
use crate::doorbell::{Change, Ring};
use crate::error::{Error, Result};
use crate::tree::{
    AgentRecord, CurrentKey, NodeEntry, Policy, Prefix, RolloutPlan, Tree, VersionInfo,
};
use crate::version_name::VersionName;
use progress::Progress;

/// How many times a command rings again when another one rang first.
const RING_TRIES: usize = 10;

/// A tree of at most about this many keys is read in one answer (a few
/// MiB); a bigger one version by version.
const ONE_READ_KEYS: usize = 20_000;

/// How many reads a big tree's read has in flight at once.
const READERS: usize = 4;

/// A ring of the doorbell, ready to go into a transaction.
pub(crate) struct Bell {
    key: String,
    value: String,
    index: u64,
}

impl Bell {
    pub(crate) fn op(&self) -> TxnOp<'_> {
        TxnOp::Cas {
            key: &self.key,
            value: self.value.as_bytes(),
            index: self.index,
        }
    }
}

/// What every tree command works with.
pub(crate) struct Ctx {
    pub consul: Arc<Consul>,
    pub prefix: Prefix,
    pub out: Progress,
    /// Who runs the command, for the history in the tree: `user@host`.
    pub user: String,
    /// Node states already printed, per version, so that progress lines
    /// continue across the phases of a command.
    seen: BTreeMap<VersionName, BTreeMap<String, NodeEntry>>,
    /// Long-running hooks already said (node, start, a fetch's progress),
    /// once each.
    hooks_said: BTreeSet<(String, u64, String)>,
    /// Versions that exist as plain keys (`<prefix>/<version>`, made by
    /// other tools), as reads found them.
    plain: std::cell::RefCell<BTreeSet<VersionName>>,
    /// Until when requests that fail for a passing reason (Consul
    /// unreachable, a 5xx during a leader election) are tried again: the
    /// command's deadline, or [`RETRY_FOR`] from its start.
    pub deadline: Instant,
    /// Consul has answered this command once: from then on an unreachable
    /// Consul is a passing outage, not a wrong address.
    contacted: std::cell::Cell<bool>,
    /// The command's own `-nodes`, for hints that name a command to run
    /// (` -nodes=3`; empty for commands without one).
    pub nodes_flag: String,
    /// All its switch flags (see `SwitchFlags::repeated`), for hints that
    /// run the same deploy or rollout again.
    pub switch_flags: String,
    /// Why the switch is made, in the operator's words (`-message`),
    /// recorded with it.
    pub message: Option<String>,
}

/// How long a command without a -timeout rides out a passing failure.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// What a command sees while it follows one version.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// The version's key (`exists`) and its nodes.
    pub info: VersionInfo,
    /// `<prefix>/current` as last read.
    pub current: Option<CurrentKey>,
    /// Nodes whose key disappeared while following, and why.
    pub vanished: BTreeMap<String, Vanished>,
    /// The live agents that follow the prefix (when followed, see [`Also`]).
    pub agents: BTreeMap<String, AgentRecord>,
    /// The progressive rollout under way and its index (when followed).
    pub rollout: Option<(RolloutPlan, u64)>,
}

/// What [`Ctx::follow`] follows besides the version and `current`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Also {
    pub agents: bool,
    pub rollout: bool,
}

/// Why a node's key disappeared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vanished {
    /// Its agent deleted it (its session is alive): after cleaning, or
    /// after an operator asked it to retry.
    ByAgent,
    /// Its session ended (the agent died or lost Consul): Consul deleted
    /// every key it held.
    AgentGone,
}

/// What the reader threads of [`Ctx::follow`] post.
enum Update {
    Version(Vec<KvEntry>),
    Current(Option<KvEntry>),
    Agents(Vec<KvEntry>),
    Rollout(Option<KvEntry>),
    Retrying(String),
    Failed(ConsulError),
}

impl Ctx {
    pub(crate) fn resolve(args: &TreeArgs, env: Env<'_>) -> Result<Ctx> {
        let text = args
            .prefix
            .clone()
            .or_else(|| env("DEPRO_PREFIX"))
            .ok_or_else(|| {
                Error::Usage(
                    "-prefix is required (or set DEPRO_PREFIX), e.g. -prefix=api/version".into(),
                )
            })?;
        let prefix = Prefix::parse(&text).map_err(|why| Error::Usage(format!("-prefix: {why}")))?;
        let settings =
            config::resolve_connection(&args.connection, env, &FileConnection::default())?;
        let consul = Consul::new(&settings).map_err(Error::Config)?;
        Ok(Ctx {
            consul: Arc::new(consul),
            prefix,
            out: Progress::new(args.quiet),
            user: user_at_host(env),
            seen: BTreeMap::new(),
            hooks_said: BTreeSet::new(),
            plain: Default::default(),
            deadline: Instant::now() + RETRY_FOR,
            contacted: std::cell::Cell::new(false),
            nodes_flag: String::new(),
            switch_flags: String::new(),
            message: None,
        })
    }

    /// Runs one request, trying it again after a failure that may pass (an
    /// outage, a leader election) until the command's deadline. Every
    /// request a command makes this way is safe to repeat. Before Consul
    /// has answered once, an unreachable address fails at once (most likely
    /// a wrong -server, not an outage).
    pub(crate) fn retrying<T>(
        &self,
        mut request: impl FnMut(&Consul) -> std::result::Result<T, ConsulError>,
    ) -> Result<T> {
        let mut backoff =
            crate::pacing::Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
        loop {
            let result = request(&self.consul);
            let answered = match &result {
                Ok(_) => true,
                Err(e) => !matches!(
                    e.kind,
                    crate::consul::ConsulErrorKind::Unreachable(_)
                        | crate::consul::ConsulErrorKind::Tls(_)
                ),
            };
            if answered {
                self.contacted.set(true);
            }
            match result {
                Err(e)
                    if e.is_transient()
                        && self.contacted.get()
                        && Instant::now() < self.deadline =>
                {
                    self.out.retrying(&e.summary());
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    std::thread::sleep(backoff.next_delay().min(left));
                }
                other => return Ok(other?),
            }
        }
    }

    /// Notes the command's switch flags for the hints it prints.
    pub(crate) fn hints_repeat(&mut self, flags: &crate::cli::SwitchFlags) {
        self.nodes_flag = format!(" -nodes={}", flags.need());
        self.switch_flags = flags.repeated();
        self.message = flags.message.clone();
    }

    /// A command to paste that rolls `current` back out to `base` as it
    /// was read (or a note that it was unset).
    pub(crate) fn back_to(&self, base: Option<&CurrentKey>) -> String {
        match base.and_then(|c| c.version.as_ref()) {
            Some(v) => format!(
                "go back with `depro rollout {v} -prefix={}{}`",
                self.prefix, self.nodes_flag
            ),
            None => format!(
                "current was {} before",
                base.map_or("unset".into(), |c| crate::tree::shown(&c.value))
            ),
        }
    }

    /// Records what an interruption leaves once `current` is `version`:
    /// the nodes are rolling it out.
    pub(crate) fn leaves_rolling_out(&self, version: &VersionName, base: Option<&CurrentKey>) {
        interrupt::leaves(format!(
            "current is {version} and the nodes go on rolling it out; follow them with \
             `depro wait {version} -for=active -prefix={}{}`, or {}",
            self.prefix,
            self.nodes_flag,
            self.back_to(base)
        ));
    }

    /// The doorbell's part of a transaction that makes `change`: a
    /// check-and-set of `<prefix>/.changed` on its index as read now, so
    /// that agents can tell whether they missed a ring (see `doorbell`).
    pub(crate) fn ring(&self, change: Change) -> Result<Bell> {
        let key = self.prefix.changed_key();
        // From the leader, like every read a write is conditioned on: right
        // after an election a default read may be older than the last ring.
        let answer = self.retrying(|c| c.get(&key, Read::consistent()))?;
        let after = answer.value.map_or(0, |e| e.modify_index);
        let value = Ring { change, after }.text(&self.user, &crate::logging::timestamp());
        Ok(Bell {
            key,
            value,
            index: after,
        })
    }

    /// Runs `ops` in one transaction together with a ring of the doorbell
    /// that says what they change, so that the agents act at once. Retried
    /// like any request (every use is safe to repeat), and again when only
    /// the ring failed (another command rang first).
    pub(crate) fn write_ringing(&self, ops: &[TxnOp<'_>], change: Change) -> Result<TxnOutcome> {
        for _ in 0..RING_TRIES {
            let bell = self.ring(change.clone())?;
            let mut all = ops.to_vec();
            all.push(bell.op());
            let outcome = self.retrying(|c| c.txn(&all))?;
            if let TxnOutcome::Rejected(failures) = &outcome {
                if let Some(denied) = failures.iter().find(|f| f.conflict == Conflict::Denied) {
                    return Err(Error::Consul(Box::new(self.consul.denied(
                        format!(
                            "writing {:?}",
                            all.get(denied.op).map_or("the transaction", |op| op.key())
                        ),
                        denied.what.clone(),
                    ))));
                }
                if failures.iter().all(|f| f.op == ops.len()) {
                    continue;
                }
            }
            return Ok(outcome);
        }
        Err(self.bell_kept_ringing())
    }

    /// Other commands kept ringing the doorbell faster than this one could.
    pub(crate) fn bell_kept_ringing(&self) -> Error {
        Error::LostRace(format!(
            "{} kept changing while this command tried to write (other commands on {} at the same time?); try again",
            self.prefix.changed_key(),
            self.prefix
        ))
    }

    /// Reads the whole tree under the prefix (`?consistent`: the reads a
    /// command decides on come from a leader that has caught up), in
    /// answers of bounded size: the one-level listing and the agents'
    /// announcements first; then, for a tree of at most [`ONE_READ_KEYS`]
    /// keys (about: versions × agents), everything in one read; for a
    /// bigger one, each version's folder on its own (a few at a time) and
    /// depro's own keys in one transaction. Never the whole of a big prefix
    /// in one answer (Consul's and depro's limits on an answer's size).
    pub(crate) fn read_tree(&mut self) -> Result<Tree> {
        let entries = self.read_entries()?;
        let tree = Tree::parse(&self.prefix, &entries);
        *self.plain.borrow_mut() = tree
            .versions
            .iter()
            .filter(|(_, info)| info.key.as_ref().is_some_and(|(k, _)| !k.ends_with('/')))
            .map(|(v, _)| v.clone())
            .collect();
        Ok(tree)
    }

    /// Every entry under the prefix, in answers of bounded size (see
    /// [`Ctx::read_tree`]).
    fn read_entries(&self) -> Result<Vec<KvEntry>> {
        let dir = self.prefix.as_dir().to_string();
        let names = self
            .retrying(|c| c.keys(&dir, Read::consistent()))?
            .value
            .unwrap_or_default();
        let agents_dir = self.prefix.agents_dir();
        let agents = self
            .retrying(|c| c.list(&agents_dir, Read::consistent()))?
            .value;
        let folders: Vec<&String> = names
            .iter()
            .filter(|n| n.ends_with('/') && **n != agents_dir)
            .collect();
        // Versions × agents estimates the keys; where agents do not announce
        // themselves (older agents) it is too low, and an answer over the
        // limit sends the read version by version.
        let mut per_version = agents.len();
        if per_version < 2
            && let Some(sample) = folders.last()
        {
            // No announcements to count: count one version's keys.
            per_version = self
                .retrying(|c| c.keys(sample, Read::consistent()))?
                .value
                .map_or(0, |keys| keys.len());
        }
        let estimate = folders.len().saturating_mul(per_version.max(1));
        if estimate <= ONE_READ_KEYS {
            match self.retrying(|c| c.list(&dir, Read::consistent())) {
                Ok(answer) => return Ok(answer.value),
                Err(Error::Consul(e)) if matches!(e.kind, ConsulErrorKind::TooLarge(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // The plain keys (current, depro's own, versions another tool made
        // plain) in transactions of reads; each folder on its own.
        let plain: Vec<&str> = names
            .iter()
            .filter(|n| !n.ends_with('/'))
            .map(String::as_str)
            .collect();
        let mut entries = agents;
        for chunk in plain.chunks(crate::consul::MAX_TXN_OPS) {
            let ops: Vec<TxnOp<'_>> = chunk.iter().map(|key| TxnOp::Get { key }).collect();
            let outcome =
                self.retrying(|c| c.read_txn(&ops, crate::consul::Consistency::Consistent))?;
            match outcome {
                TxnOutcome::Committed(found) => entries.extend(found),
                // A key deleted since the listing: read them one by one.
                TxnOutcome::Rejected(_) => {
                    for key in chunk {
                        if let Some(entry) =
                            self.retrying(|c| c.get(key, Read::consistent()))?.value
                        {
                            entries.push(entry);
                        }
                    }
                }
            }
        }
        // A few readers at once, each trying a failed read again a few
        // times (a leader election, say), as `retrying` does.
        let consul = &self.consul;
        let read = |folder: &str| -> std::result::Result<Vec<KvEntry>, ConsulError> {
            let mut tries = 0;
            loop {
                match consul.list(folder, Read::consistent()) {
                    Ok(answer) => return Ok(answer.value),
                    Err(e) if e.is_transient() && tries < 5 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(200 << tries));
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let lists: Vec<std::result::Result<Vec<KvEntry>, ConsulError>> =
            std::thread::scope(|scope| {
                let per_thread = folders.len().div_ceil(READERS).max(1);
                let handles: Vec<_> = folders
                    .chunks(per_thread)
                    .map(|part| {
                        scope.spawn(move || {
                            let mut out = Vec::new();
                            for folder in part {
                                out.extend(read(folder)?);
                            }
                            Ok(out)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Ok(Vec::new())))
                    .collect()
            });
        for list in lists {
            entries.extend(list.map_err(|e| Error::Consul(Box::new(e)))?);
        }
        Ok(entries)
    }

    /// Reads one version's keys from the leader: its key and its nodes.
    pub(crate) fn read_version(&self, version: &VersionName) -> Result<VersionInfo> {
        let read = |listing: String| -> Result<VersionInfo> {
            let answer = self.retrying(|c| c.list_starting_with(&listing, Read::consistent()))?;
            Ok(Tree::parse(&self.prefix, &answer.value)
                .versions
                .remove(version)
                .unwrap_or_default())
        };
        let info = read(self.version_listing(version))?;
        if info.exists || self.plain.borrow().contains(version) {
            return Ok(info);
        }
        // No folder key: perhaps another tool made it a plain key.
        let plain = format!("{}{version}", self.prefix.as_dir());
        if self
            .retrying(|c| c.get(&plain, Read::consistent()))?
            .value
            .is_some()
        {
            self.plain.borrow_mut().insert(version.clone());
            return read(self.version_listing(version));
        }
        Ok(info)
    }

    /// Reads the key that makes `version` exist (its folder key, or a plain
    /// key), alone: `None` if there is none.
    pub(crate) fn read_version_key(&self, version: &VersionName) -> Result<Option<KvEntry>> {
        let keys = [
            self.prefix.folder_key(version),
            format!("{}{version}", self.prefix.as_dir()),
        ];
        for key in keys {
            if let Some(entry) = self.retrying(|c| c.get(&key, Read::consistent()))?.value {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// Whether any agent announces itself under the prefix.
    pub(crate) fn followed(&self) -> Result<bool> {
        let dir = self.prefix.agents_dir();
        let answer = self.retrying(|c| c.keys(&dir, Read::consistent()))?;
        Ok(answer.value.is_some_and(|keys| !keys.is_empty()))
    }

    /// For a prefix no agent follows (a typo, most often): the sibling
    /// prefix nearest in spelling that agents do follow, as a hint
    /// (" (did you mean -prefix=api/version?)"), or nothing. Only on that
    /// error path: a listing of the parent and of a few candidates'
    /// agents.
    pub(crate) fn nearest_followed(&self) -> String {
        let text = self.prefix.to_string();
        let Some((parent, last)) = text.rsplit_once('/') else {
            return String::new();
        };
        let dir = format!("{parent}/");
        // A hint: any server may answer.
        let hint = Read {
            consistency: crate::consul::Consistency::Stale,
            ..Read::default()
        };
        let Ok(answer) = self.consul.keys(&dir, hint) else {
            return String::new();
        };
        let mut near: Vec<(usize, String)> = answer
            .value
            .unwrap_or_default()
            .iter()
            .filter_map(|k| k.strip_prefix(&dir)?.strip_suffix('/'))
            .filter(|name| *name != last && !name.contains('/'))
            .map(|name| (edit_distance(name, last), name.to_string()))
            .filter(|(d, _)| *d <= 2.max(last.len() / 3))
            .collect();
        near.sort();
        for (_, name) in near.into_iter().take(3) {
            let agents = format!("{dir}{name}/{}/", crate::tree::AGENTS);
            if self
                .consul
                .keys(&agents, hint)
                .is_ok_and(|a| a.value.is_some_and(|k| !k.is_empty()))
            {
                // Names from Consul are untrusted: escaped as any.
                return format!(
                    " (did you mean -prefix={}?)",
                    crate::tree::shown(&format!("{dir}{name}"))
                );
            }
        }
        String::new()
    }

    /// Reads `current` from the leader.
    pub(crate) fn read_current(&self) -> Result<Option<CurrentKey>> {
        let key = self.prefix.current_key();
        let answer = self.retrying(|c| c.get(&key, Read::consistent()))?;
        Ok(answer.value.map(|e| CurrentKey::from_entry(&e)))
    }

    /// Reads the live agents that follow the prefix, from the leader.
    pub(crate) fn read_agents(&self) -> Result<BTreeMap<String, AgentRecord>> {
        let dir = self.prefix.agents_dir();
        let answer = self.retrying(|c| c.list_starting_with(&dir, Read::consistent()))?;
        Ok(Tree::parse(&self.prefix, &answer.value).agents)
    }

    /// Reads the record of the last switches and its index (0: none yet),
    /// from the leader.
    pub(crate) fn read_history(&self) -> Result<(crate::tree::History, u64)> {
        let key = self.prefix.history_key();
        let answer = self.retrying(|c| c.get(&key, Read::consistent()))?;
        Ok(answer.value.map_or_else(Default::default, |e| {
            (crate::tree::History::parse(&e.value), e.modify_index)
        }))
    }

    /// The nodes of the agents that have followed the prefix, live or not
    /// (`.known`).
    pub(crate) fn read_known(&self) -> Result<BTreeSet<String>> {
        let dir = format!("{}{}/", self.prefix.as_dir(), crate::tree::KNOWN);
        let answer = self.retrying(|c| c.keys(&dir, Read::consistent()))?;
        Ok(answer
            .value
            .unwrap_or_default()
            .iter()
            .filter_map(|k| k.strip_prefix(&dir))
            .filter(|n| crate::tree::check_node_name(n).is_ok())
            .map(String::from)
            .collect())
    }

    /// Reads the prefix's rollout policy, if any, from the leader.
    pub(crate) fn read_policy(&self) -> Result<Option<(Policy, u64)>> {
        let key = self.prefix.policy_key();
        let answer = self.retrying(|c| c.get(&key, Read::consistent()))?;
        Ok(answer
            .value
            .and_then(|e| Policy::parse(&e.value).map(|p| (p, e.modify_index)))
            .filter(|(p, _)| !p.flags.is_empty()))
    }

    /// The prefix's rollout policy and its flags, read with the command
    /// line's rules. A policy depro cannot read is a refusal, or with
    /// `lenient` (a rollback) a warning and no policy.
    pub(crate) fn policy_flags(
        &self,
        lenient: bool,
    ) -> Result<Option<(Policy, crate::cli::SwitchFlags)>> {
        let Some((policy, _)) = self.read_policy()? else {
            return Ok(None);
        };
        match crate::cli::parse_policy(&policy.flags) {
            Ok(stored) => Ok(Some((policy, stored))),
            Err(e) => {
                let what = format!(
                    "{} holds a policy depro cannot read ({e}); set it again with `depro policy \
                     -prefix={} FLAGS`, or clear it with `depro policy -prefix={} -clear`",
                    self.prefix.policy_key(),
                    self.prefix,
                    self.prefix
                );
                if !lenient {
                    return Err(Error::Refused(what));
                }
                self.out
                    .line(&format!("{what}; this rollback goes on without it"));
                Ok(None)
            }
        }
    }

    /// Reads the progressive rollout under way, if any, from the leader.
    pub(crate) fn read_rollout(&self) -> Result<Option<(RolloutPlan, u64)>> {
        let key = self.prefix.rollout_key();
        let answer = self.retrying(|c| c.get(&key, Read::consistent()))?;
        Ok(answer
            .value
            .and_then(|e| RolloutPlan::parse(&e.value).map(|p| (p, e.modify_index))))
    }

    /// Reads the tree and fails clearly if there is nothing under the prefix.
    pub(crate) fn read_existing_tree(&mut self) -> Result<Tree> {
        let tree = self.read_tree()?;
        self.check_not_empty(&tree)?;
        Ok(tree)
    }

    /// Fails clearly if `tree` (as read) holds nothing: exit 2, or exit 4
    /// when the token may not read the prefix.
    pub(crate) fn check_not_empty(&self, tree: &Tree) -> Result<()> {
        if tree.versions.is_empty() && tree.current.is_none() {
            // Consul answers a listing the token may not read as an empty
            // one; a read of one key under the prefix tells them apart
            // (denied: exit 4, with Consul's reason).
            let probe = self.prefix.changed_key();
            self.retrying(|c| c.get(&probe, Read::consistent()))?;
            return Err(Error::Refused(format!(
                "nothing under {}/ in Consul at {}{}: check -prefix (and that the ACL token may read it), \
                 or deploy a first version with `depro deploy VERSION -prefix={}`",
                self.prefix,
                self.consul.server(),
                self.nearest_followed(),
                self.prefix
            )));
        }
        Ok(())
    }

    /// The prefix that lists a version's keys: its folder, which holds the
    /// folder key and the node keys. A version made by another tool as a
    /// plain key `<prefix>/<version>` is listed by the bare name, which
    /// also matches longer names (the parser keeps only this version).
    fn version_listing(&self, version: &VersionName) -> String {
        if self.plain.borrow().contains(version) {
            format!("{}{version}", self.prefix.as_dir())
        } else {
            self.prefix.folder_key(version)
        }
    }

    /// Follows one version's keys and `current` with blocking `?stale`
    /// reads, printing every node's state change, until `decide` returns a
    /// value or `deadline` passes (`Ok(None)`). `decide` sees the version's
    /// keys, `current`, and the nodes whose key vanished and why.
    ///
    /// A follower may lag behind the leader, even behind this command's own
    /// writes: every decision taken on a stale read is taken again on a read
    /// from the leader, and only kept if the leader's view leads to it too.
    pub(crate) fn follow<T>(
        &mut self,
        version: &VersionName,
        deadline: Instant,
        decide: impl FnMut(&mut Progress, &Seen) -> Option<T>,
    ) -> Result<Option<T>> {
        self.follow_also(version, deadline, Also::default(), decide)
    }

    /// [`Ctx::follow`], also following the agents or the rollout under way.
    pub(crate) fn follow_also<T>(
        &mut self,
        version: &VersionName,
        deadline: Instant,
        also: Also,
        mut decide: impl FnMut(&mut Progress, &Seen) -> Option<T>,
    ) -> Result<Option<T>> {
        let (tx, rx) = mpsc::channel();
        let listing = self.version_listing(version);
        let current_key = self.prefix.current_key();
        spawn_reader(self.consul.clone(), tx.clone(), move |consul, read| {
            let answer = consul.list_starting_with(&listing, read)?;
            Ok((answer.index, Update::Version(answer.value)))
        });
        spawn_reader(self.consul.clone(), tx.clone(), move |consul, read| {
            let answer = consul.get(&current_key, read)?;
            Ok((answer.index, Update::Current(answer.value)))
        });
        if also.agents {
            let agents = self.prefix.agents_dir();
            spawn_reader(self.consul.clone(), tx.clone(), move |consul, read| {
                let answer = consul.list_starting_with(&agents, read)?;
                Ok((answer.index, Update::Agents(answer.value)))
            });
        }
        if also.rollout {
            let key = self.prefix.rollout_key();
            spawn_reader(self.consul.clone(), tx.clone(), move |consul, read| {
                let answer = consul.get(&key, read)?;
                Ok((answer.index, Update::Rollout(answer.value)))
            });
        }
        drop(tx);
        let mut printed = self.seen.remove(version).unwrap_or_default();
        let mut seen = Seen::default();
        let (mut have_version, mut have_current) = (false, false);
        let (mut have_agents, mut have_rollout) = (!also.agents, !also.rollout);
        let outcome = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Woken every second at least: the progress's clock ticks.
            let update = match rx.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok(update) => update,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    self.out.tick();
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => break Ok(None),
                Err(RecvTimeoutError::Disconnected) => break Ok(None),
            };
            match update {
                Update::Version(entries) => {
                    have_version = true;
                    seen.info = Tree::parse(&self.prefix, &entries)
                        .versions
                        .remove(version)
                        .unwrap_or_default();
                }
                Update::Current(entry) => {
                    have_current = true;
                    seen.current = entry.map(|e| CurrentKey::from_entry(&e));
                }
                Update::Agents(entries) => {
                    have_agents = true;
                    seen.agents = Tree::parse(&self.prefix, &entries).agents;
                    self.out.nodes_seen(seen.agents.len());
                }
                Update::Rollout(entry) => {
                    have_rollout = true;
                    seen.rollout = entry
                        .and_then(|e| RolloutPlan::parse(&e.value).map(|p| (p, e.modify_index)));
                }
                Update::Retrying(why) => {
                    self.out.retrying(&why);
                    continue;
                }
                Update::Failed(e) => break Err(e.into()),
            }
            let complete = have_version && have_current && have_agents && have_rollout;
            if !complete {
                continue;
            }
            // Printed once everything is read: the agents tell how many
            // nodes to expect, and so whether progress is compact.
            self.print_changes(&mut printed, &seen.info, &mut seen.vanished);
            if decide(&mut self.out, &seen).is_some() {
                let leader = match self.read_version(version).and_then(|info| {
                    Ok(Seen {
                        info,
                        current: self.read_current()?,
                        vanished: seen.vanished.clone(),
                        agents: match also.agents {
                            true => self.read_agents()?,
                            false => BTreeMap::new(),
                        },
                        rollout: match also.rollout {
                            true => self.read_rollout()?,
                            false => None,
                        },
                    })
                }) {
                    Ok(leader) => leader,
                    Err(Error::Consul(e)) if e.is_transient() => continue,
                    Err(e) => break Err(e),
                };
                if let Some(result) = decide(&mut self.out, &leader) {
                    break Ok(Some(result));
                }
            }
        };
        self.out.finish();
        self.seen.insert(version.clone(), printed);
        outcome
    }

    /// Prints what changed since `printed`; a node whose key vanished is
    /// told apart by whether its session still exists.
    fn print_changes(
        &mut self,
        printed: &mut BTreeMap<String, NodeEntry>,
        info: &VersionInfo,
        vanished: &mut BTreeMap<String, Vanished>,
    ) {
        self.out.nodes_seen(info.nodes.len());
        for (node, entry) in &info.nodes {
            vanished.remove(node);
            let line = match printed.get(node) {
                None => format!("{node}: {}", entry.state),
                Some(old) if old.state != entry.state => {
                    format!("{node}: {} -> {}", old.state, entry.state)
                }
                Some(_) => continue,
            };
            match info.reasons.get(node) {
                Some(reason) if entry.state == crate::tree::NodeState::Failed => {
                    self.out.line(&format!("{line}: {}", reason.shown("    ")))
                }
                _ if entry.state == crate::tree::NodeState::Failed => self.out.line(&line),
                _ => self.out.node_line(&line),
            }
        }
        let gone: BTreeSet<String> = printed
            .keys()
            .filter(|n| !info.nodes.contains_key(*n))
            .cloned()
            .collect();
        for node in gone {
            let session = &printed[&node].session;
            let why = match self.consul.session_info(session) {
                Ok(Some(_)) => Vanished::ByAgent,
                Ok(None) => Vanished::AgentGone,
                // Cannot tell: say the agent may be gone, the cautious reading.
                Err(_) => Vanished::AgentGone,
            };
            match why {
                Vanished::ByAgent => self.out.node_line(&format!("{node}: removed its key")),
                Vanished::AgentGone => self.out.line(&format!(
                    "{node}: gone (its agent stopped: its session ended)"
                )),
            }
            vanished.insert(node, why);
        }
        *printed = info.nodes.clone();
        // A hook that runs long, once per run: what a node is busy with.
        for (node, hook, since) in status::running_hooks(info) {
            // A fetch's progress is said again as it changes.
            let detail = status::fetch_detail(info, node);
            let run = (node.clone(), since, detail.clone());
            if self.hooks_said.insert(run) {
                let age = match since > 0 {
                    true => format!(
                        " for {}",
                        crate::duration::human(Duration::from_millis(
                            crate::logging::now_ms().saturating_sub(since)
                        ))
                    ),
                    false => String::new(),
                };
                let doing = match hook {
                    "fetch" => "fetching its artifact".to_string(),
                    hook => format!("in its {hook} hook"),
                };
                self.out.node_line(&format!("{node}: {doing}{age}{detail}"));
            }
        }
    }
}

/// A thread that follows one read with a [`Cursor`] and posts each answer
/// that differs from the last; it ends when the receiver is gone.
fn spawn_reader(
    consul: Arc<Consul>,
    tx: Sender<Update>,
    read: impl Fn(&Consul, Read) -> std::result::Result<(u64, Update), ConsulError> + Send + 'static,
) {
    let spawned = std::thread::Builder::new()
        .name("follow".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            // Every node's write wakes the version's reader: idle answers
            // (nothing new for this reader) are paced, changes are not.
            let pacing = Pacing {
                burst: 4,
                refill: Duration::from_millis(50),
            };
            let mut cursor = Cursor::new(WAIT, true, pacing);
            let mut last: Option<String> = None;
            loop {
                let pause = cursor.pause(Instant::now());
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
                match read(&consul, cursor.read()) {
                    Ok((index, update)) => {
                        let fingerprint = format!("{:?}", fingerprint(&update));
                        let changed = last.as_deref() != Some(fingerprint.as_str());
                        cursor.answered(index, changed);
                        if changed {
                            last = Some(fingerprint);
                            if tx.send(update).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) if e.is_transient() => {
                        if tx.send(Update::Retrying(e.summary())).is_err() {
                            return;
                        }
                        std::thread::sleep(cursor.failed());
                    }
                    Err(e) => {
                        let _ = tx.send(Update::Failed(e));
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        // The decision loop then times out; say why.
        eprintln!("depro: cannot start a thread to follow Consul: {e}");
    }
}

/// What makes two answers the same: keys, values, sessions and indexes.
fn fingerprint(update: &Update) -> Vec<(String, u64, Option<String>)> {
    let entries: Vec<&KvEntry> = match update {
        Update::Version(entries) | Update::Agents(entries) => entries.iter().collect(),
        Update::Current(entry) | Update::Rollout(entry) => entry.iter().collect(),
        _ => Vec::new(),
    };
    entries
        .into_iter()
        .map(|e| (e.key.clone(), e.modify_index, e.session.clone()))
        .collect()
}

/// A version name from the command line.
/// Who runs a command, `user@host`: $USER, else $LOGNAME, else the name
/// of the uid (cron and systemd units often set neither), else the uid.
pub(crate) fn user_at_host(env: Env<'_>) -> String {
    let user = env("USER")
        .or_else(|| env("LOGNAME"))
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| {
            let uid = nix::unistd::getuid();
            nix::unistd::User::from_uid(uid)
                .ok()
                .flatten()
                .map_or_else(|| format!("uid {uid}"), |u| u.name)
        });
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}

pub(crate) fn version_arg(text: &str) -> Result<VersionName> {
    VersionName::parse(text).map_err(|why| Error::Usage(format!("version {text:?}: {why}")))
}

/// Node names as a short list for messages: `node1, node2 and 3 more`.
pub(crate) fn names<'a>(nodes: impl IntoIterator<Item = &'a String>) -> String {
    let all: Vec<&String> = nodes.into_iter().collect();
    let shown: Vec<&str> = all.iter().take(5).map(|s| s.as_str()).collect();
    match all.len() {
        n if n > 5 => format!("{} and {} more", shown.join(", "), n - 5),
        _ => shown.join(", "),
    }
}

/// Seconds, for summaries.
pub(crate) fn took(start: Instant) -> String {
    format!("{:.1}s", start.elapsed().as_secs_f64())
}

/// Levenshtein distance between two short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    #[test]
    fn edit_distance_counts_the_letters_to_change() {
        assert_eq!(super::edit_distance("version", "version"), 0);
        assert_eq!(super::edit_distance("versoin", "version"), 2);
        assert_eq!(super::edit_distance("verion", "version"), 1);
        assert_eq!(super::edit_distance("api", ""), 3);
        assert_eq!(super::edit_distance("web", "api"), 3);
    }
}
