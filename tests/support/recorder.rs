//! The recorder: checks depro's invariants continuously while a fault
//! scenario runs, not only at its end.
//!
//! - Every few milliseconds, for every agent: the version its `live` link
//!   and its local `current` file name must be one whose deploy hook
//!   finished on that node (the hooks' log ends each successful deploy with
//!   `deployed <version>`, after every other line of the hook).
//! - All along, the tree is followed with blocking queries (consistent
//!   reads, from whichever server answers): every value of every key and the
//!   index it was written at. From this, after the fact: a `depro deploy
//!   -nodes=N` that exited 0 had at least N nodes with the version ready,
//!   and none failed, when `current` moved to it.
//! - Nothing outside the deployment paths is created or deleted: the set of
//!   paths under the fleet's root, but for the deployment paths and the
//!   files the test bed itself writes, is the same at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the recorder watches on one node.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub deployment_path: PathBuf,
    pub hooks_log: PathBuf,
}

/// One observed write of one key: its value and index.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Write {
    index: u64,
    value: String,
    held: bool,
}

#[derive(Default)]
struct Seen {
    /// Per key, every write observed (by any server's follower), by index.
    writes: BTreeMap<String, BTreeMap<u64, Write>>,
    /// Per key, the indexes at which it was observed missing after a write.
    gone: BTreeMap<String, BTreeSet<u64>>,
    snapshots: usize,
}

pub struct Recorder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    violations: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Seen>>,
    samples: Arc<AtomicUsize>,
    prefix: String,
    root: PathBuf,
    outside: BTreeSet<PathBuf>,
    deployment_paths: Vec<PathBuf>,
}

/// What a run found.
#[derive(Debug)]
pub struct Findings {
    pub violations: Vec<String>,
    /// How many times every node's live version was checked.
    pub samples: usize,
    /// How many snapshots of the tree were observed.
    pub snapshots: usize,
}

impl Recorder {
    /// Starts recording `nodes` under `root` (the fleet's directory) and
    /// the tree under `prefix`, read from any of `servers`.
    /// `token`: the ACL token the followers read the tree with, if Consul
    /// has ACLs on.
    pub fn start(
        root: &Path,
        nodes: Vec<Node>,
        servers: Vec<String>,
        prefix: &str,
        token: Option<String>,
    ) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let samples = Arc::new(AtomicUsize::new(0));
        let deployment_paths: Vec<PathBuf> =
            nodes.iter().map(|n| n.deployment_path.clone()).collect();
        let outside = outside_paths(root, &deployment_paths);
        let mut threads = Vec::new();
        {
            let (stop, violations, samples) = (stop.clone(), violations.clone(), samples.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for node in &nodes {
                        if let Some(broken) = check_live(node) {
                            let mut v = violations.lock().unwrap();
                            if !v.contains(&broken) {
                                v.push(broken);
                            }
                        }
                    }
                    samples.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        // One follower per server: while one restarts, the others see.
        for server in servers {
            let (stop, seen, prefix) = (stop.clone(), seen.clone(), format!("{prefix}/"));
            let token = token.clone();
            threads.push(std::thread::spawn(move || {
                follow_tree(&server, &prefix, token.as_deref(), &stop, &seen)
            }));
        }
        Recorder {
            stop,
            threads,
            violations,
            seen,
            samples,
            prefix: prefix.to_string(),
            root: root.to_path_buf(),
            outside,
            deployment_paths,
        }
    }

    /// Checks that the switch of `current` to `version` happened with at
    /// least `need` nodes having it ready and none failed (for a deploy that
    /// exited 0). Recorded as a violation if not.
    pub fn check_switch(&self, version: &str, need: usize) {
        if let Err(why) = self.switch_was_safe(version, need) {
            self.violations.lock().unwrap().push(why);
        }
    }

    fn switch_was_safe(&self, version: &str, need: usize) -> Result<(), String> {
        let current_key = format!("{}/current", self.prefix);
        let switched = || {
            self.seen
                .lock()
                .unwrap()
                .writes
                .get(&current_key)
                .and_then(|writes| writes.values().rfind(|w| w.value == version))
                .map(|w| w.index)
        };
        // The followers may be a moment behind the command that switched.
        let start = std::time::Instant::now();
        while switched().is_none() && start.elapsed() < super::PATIENCE {
            std::thread::sleep(Duration::from_millis(20));
        }
        let switch =
            switched().ok_or_else(|| format!("current was never seen naming {version}"))?;
        let seen = self.seen.lock().unwrap();
        let node_prefix = format!("{}/{version}/", self.prefix);
        let mut ready = Vec::new();
        for (key, writes) in seen.writes.range(node_prefix.clone()..) {
            let Some(node) = key.strip_prefix(&node_prefix) else {
                break;
            };
            if node.is_empty() {
                continue;
            }
            // The node's last write before the switch, unless it was gone by then.
            let Some((_, last)) = writes.range(..switch).next_back() else {
                continue;
            };
            let gone_between = seen
                .gone
                .get(key)
                .is_some_and(|g| g.range(last.index + 1..=switch).next().is_some());
            if !last.held || gone_between {
                continue;
            }
            match last.value.as_str() {
                "ready" | "active" => ready.push(node.to_string()),
                "failed" => {
                    return Err(format!(
                        "current moved to {version} (index {switch}) while {node} had it failed"
                    ));
                }
                _ => {}
            }
        }
        if ready.len() < need {
            return Err(format!(
                "current moved to {version} (index {switch}) with {} nodes ready ({ready:?}), {need} needed",
                ready.len()
            ));
        }
        Ok(())
    }

    /// How many times the live links were checked so far.
    pub fn samples(&self) -> usize {
        self.samples.load(Ordering::Relaxed)
    }

    /// Stops recording and returns what it found, including whether
    /// anything outside the deployment paths changed.
    pub fn finish(mut self) -> Findings {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let mut violations = self.violations.lock().unwrap().clone();
        let now = outside_paths(&self.root, &self.deployment_paths);
        for created in now.difference(&self.outside) {
            violations.push(format!(
                "created outside the deployment paths: {}",
                created.display()
            ));
        }
        for deleted in self.outside.difference(&now) {
            violations.push(format!(
                "deleted outside the deployment paths: {}",
                deleted.display()
            ));
        }
        if Path::new("/.depro").exists() {
            violations.push("/.depro exists".into());
        }
        Findings {
            violations,
            samples: self.samples.load(Ordering::Relaxed),
            snapshots: self.seen.lock().unwrap().snapshots,
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The live link and the local `current` must name a version whose last
/// deploy on this node finished.
fn check_live(node: &Node) -> Option<String> {
    let named: Vec<(&str, String)> = [
        (
            "live",
            std::fs::read_link(node.deployment_path.join("live"))
                .ok()
                .and_then(|t| Some(t.file_name()?.to_string_lossy().into_owned())),
        ),
        (
            "current",
            std::fs::read_to_string(node.deployment_path.join("current"))
                .ok()
                .map(|t| t.trim().to_string()),
        ),
    ]
    .into_iter()
    .filter_map(|(what, v)| Some((what, v.filter(|v| !v.is_empty())?)))
    .collect();
    if named.is_empty() {
        return None;
    }
    let log = std::fs::read_to_string(&node.hooks_log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    for (what, version) in named {
        let started = lines
            .iter()
            .rposition(|l| l.starts_with(&format!("deploy {version} ")));
        let finished = lines
            .iter()
            .rposition(|l| *l == format!("deployed {version}"));
        let ok = match (started, finished) {
            (Some(s), Some(f)) => f > s,
            _ => false,
        };
        if !ok {
            return Some(format!(
                "{}: its {what} names {version}, whose deploy hook has not finished there",
                node.name
            ));
        }
    }
    None
}

/// Every path under `root` but the deployment paths and what the test bed
/// writes (control files, logs, config).
fn outside_paths(root: &Path, deployment_paths: &[PathBuf]) -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, skip: &[PathBuf], out: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if skip.iter().any(|s| s == &path) || is_test_bed_file(&path) {
                continue;
            }
            out.insert(path.clone());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, skip, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, deployment_paths, &mut out);
    out
}

/// Files the test bed writes next to the deployment paths.
fn is_test_bed_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.ends_with(".log")
        || name.ends_with(".pid")
        || name.starts_with("env-deploy-")
        || name == "conf"
        || name == "depro.json"
        || [
            "fail-deploy",
            "block-deploy",
            "release",
            "fail-rollout",
            "block-rollout",
            "release-rollout",
            "block-clean",
            "release-clean",
            "background-child",
            "exec-sleep",
            "rm-state",
            "fill-disk",
            "slow",
        ]
        .contains(&name.as_str())
        || name.starts_with("fail-rollout-")
}

/// Follows the tree on one server with blocking recursive reads (each
/// answered by that server, `?stale`, so a follower answers too while there
/// is no leader), recording every write.
fn follow_tree(
    server: &str,
    prefix: &str,
    token: Option<&str>,
    stop: &AtomicBool,
    seen: &Mutex<Seen>,
) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .new_agent();
    let mut index = 0u64;
    let mut last: BTreeMap<String, Write> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let url = format!("http://{server}/v1/kv/{prefix}?recurse&stale&index={index}&wait=1s");
        let mut request = agent.get(&url);
        if let Some(token) = token {
            request = request.header("X-Consul-Token", token);
        }
        let answer = request.call().ok().and_then(|mut response| {
            let status = response.status().as_u16();
            let header = response.headers().get("X-Consul-Index")?.to_str().ok()?;
            let new_index: u64 = header.parse().ok()?;
            let body = response.body_mut().read_to_string().ok()?;
            (status == 200 || status == 404).then_some((new_index, body))
        });
        let Some((new_index, body)) = answer else {
            index = 0;
            last.clear();
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        index = if new_index < index { 0 } else { new_index };
        let entries: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        let now: BTreeMap<String, Write> = entries
            .iter()
            .map(|e| {
                let key = e["Key"].as_str().unwrap_or_default().to_string();
                let value = e["Value"].as_str().map(super::unbase64).unwrap_or_default();
                let write = Write {
                    index: e["ModifyIndex"].as_u64().unwrap_or(0),
                    value,
                    held: e["Session"].as_str().is_some_and(|s| !s.is_empty()),
                };
                (key, write)
            })
            .collect();
        let mut seen = seen.lock().unwrap();
        seen.snapshots += 1;
        for (key, write) in &now {
            seen.writes
                .entry(key.clone())
                .or_default()
                .insert(write.index, write.clone());
        }
        for key in last.keys().filter(|k| !now.contains_key(*k)) {
            seen.gone.entry(key.clone()).or_default().insert(new_index);
        }
        last = now;
    }
}
