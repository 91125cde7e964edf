//! The operator commands: they read and drive the Consul tree, and enforce
//! its guarantees (see docs/protocol.md). Each command resolves its
//! settings into a [`Ctx`] first, then talks to Consul through it.

mod deploy;
mod progress;
mod remove;
mod status;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub(crate) use deploy::{deploy, rollback, rollout};
pub(crate) use remove::{prune, remove};
pub(crate) use status::status;

use crate::cli::TreeArgs;
use crate::config::{self, Env, FileConnection};
use crate::consul::{Consul, Read};
use crate::error::{Error, Result};
use crate::pacing::{Backoff, TokenBucket};
use crate::tree::{NodeEntry, Prefix, Tree, VersionInfo};
use crate::version_name::VersionName;
use progress::Progress;

/// What every tree command works with.
pub(crate) struct Ctx {
    pub consul: Consul,
    pub prefix: Prefix,
    pub out: Progress,
    /// Who runs the command, for the history in the tree: `user@host`.
    pub user: String,
    /// Node states already printed, per version, so that progress lines
    /// continue across the phases of a command.
    seen: BTreeMap<VersionName, BTreeMap<String, NodeEntry>>,
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
        let user = env("USER")
            .or_else(|| env("LOGNAME"))
            .unwrap_or_else(|| "unknown".into());
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        Ok(Ctx {
            consul,
            prefix,
            out: Progress::new(),
            user: format!("{user}@{host}"),
            seen: BTreeMap::new(),
        })
    }

    /// Reads the whole tree under the prefix.
    pub(crate) fn read_tree(&self) -> Result<Tree> {
        let answer = self.consul.list(self.prefix.as_dir(), Read::now())?;
        Ok(Tree::parse(&self.prefix, &answer.value))
    }

    /// Reads the tree and fails clearly if there is nothing under the prefix.
    pub(crate) fn read_existing_tree(&self) -> Result<Tree> {
        let tree = self.read_tree()?;
        if tree.versions.is_empty() && tree.current.is_none() {
            return Err(Error::Refused(format!(
                "nothing under {}/ in Consul at {}: check -prefix (and that the ACL token may read it), \
                 or deploy a first version with `depro deploy VERSION -prefix={}`",
                self.prefix,
                self.consul.server(),
                self.prefix
            )));
        }
        Ok(tree)
    }

    /// Follows one version's keys with blocking queries, printing every
    /// node's state change (and `gone` for a node whose key disappeared),
    /// until `decide` returns a value or `deadline` passes (`Ok(None)`).
    pub(crate) fn follow<T>(
        &mut self,
        version: &VersionName,
        deadline: Instant,
        gone: &str,
        mut decide: impl FnMut(&mut Progress, &VersionInfo) -> Option<T>,
    ) -> Result<Option<T>> {
        let mut index = 0;
        let mut seen = self.seen.remove(version).unwrap_or_default();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        // Every node's state write wakes this query, and each answer lists
        // every node: pace the reads so that a storm of writes from a large
        // fleet costs a bounded number of them (at most 20 a second).
        let mut bucket = TokenBucket::new(4, Duration::from_millis(50), Instant::now());
        let folder = self.prefix.folder_key(version);
        loop {
            let pause = bucket.take(Instant::now());
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
            let now = Instant::now();
            let wait = deadline
                .saturating_duration_since(now)
                .max(Duration::from_secs(1));
            let read = if index == 0 {
                Read::now()
            } else {
                Read::blocking(index, wait.min(crate::watch::WAIT), false)
            };
            let answer = match self.consul.list(&folder, read) {
                Ok(answer) => answer,
                Err(e) if e.is_transient() && now < deadline => {
                    self.out
                        .line(&format!("(Consul: {}; retrying)", e.summary()));
                    std::thread::sleep(
                        backoff
                            .next_delay()
                            .min(deadline.saturating_duration_since(now)),
                    );
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            backoff.reset();
            index = if answer.index < index {
                0
            } else {
                answer.index.max(1)
            };
            let tree = Tree::parse(&self.prefix, &answer.value);
            let info = tree.versions.get(version).cloned().unwrap_or_default();
            for (node, entry) in &info.nodes {
                match seen.get(node) {
                    None => self.out.line(&format!("{node}: {}", entry.state)),
                    Some(old) if old.state != entry.state => self
                        .out
                        .line(&format!("{node}: {} -> {}", old.state, entry.state)),
                    Some(_) => {}
                }
            }
            for node in seen.keys().filter(|n| !info.nodes.contains_key(*n)) {
                self.out.line(&format!("{node}: {gone}"));
            }
            seen = info.nodes.clone();
            let outcome = match decide(&mut self.out, &info) {
                Some(result) => Some(Some(result)),
                None if Instant::now() >= deadline => Some(None),
                None => None,
            };
            if let Some(outcome) = outcome {
                self.out.finish();
                self.seen.insert(version.clone(), seen);
                return Ok(outcome);
            }
        }
    }
}

/// A version name from the command line.
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
