//! The agent on a small, locked-down box (issue 12): it works inside a
//! 32 MiB memory cgroup (with its hooks), and its state on disk is small.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::Fleet;

const LIMIT: u64 = 32 * 1024 * 1024;

/// The agent as shipped: the static release binary packaging/build.sh
/// leaves in dist/ (scripts/test.sh builds it first), else this build's.
fn shipped_binary() -> (String, bool) {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "dist/depro-{}-x86_64-unknown-linux-musl",
        env!("CARGO_PKG_VERSION")
    ));
    match dist.exists() {
        true => (dist.display().to_string(), true),
        false => {
            eprintln!(
                "{} is missing (packaging/build.sh): using the debug build",
                dist.display()
            );
            (support::depro_bin().to_string(), false)
        }
    }
}

/// A memory cgroup limited to [`LIMIT`]; removed on drop.
struct MemoryCgroup {
    dir: PathBuf,
    /// cgroup v2 (`memory.max`) or v1 (`memory.limit_in_bytes`).
    v2: bool,
}

impl MemoryCgroup {
    /// Makes one where this machine lets us: cgroup v2 with the memory
    /// controller, or v1's memory hierarchy. `Err` says why not.
    fn make(name: &str) -> Result<MemoryCgroup, String> {
        let v2_root = Path::new("/sys/fs/cgroup");
        let controllers = std::fs::read_to_string(v2_root.join("cgroup.controllers"));
        let (dir, v2) = match controllers {
            Ok(list) if list.split_whitespace().any(|c| c == "memory") => {
                (v2_root.join(name), true)
            }
            _ => (v2_root.join("memory").join(name), false),
        };
        std::fs::create_dir(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let cgroup = MemoryCgroup { dir, v2 };
        let limit = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(cgroup.dir.join(limit), LIMIT.to_string())
            .map_err(|e| format!("cannot set {limit}: {e}"))?;
        if !v2 {
            // Without swap accounting this file is absent: then there is no
            // swap to escape to either.
            let _ = std::fs::write(
                cgroup.dir.join("memory.memsw.limit_in_bytes"),
                LIMIT.to_string(),
            );
        }
        Ok(cgroup)
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// The most memory the group used (v1), or its current use (v2, which
    /// has no peak before Linux 5.19), and how often it hit the limit.
    fn usage_and_pressure(&self) -> (u64, u64) {
        let read = |name: &str| {
            std::fs::read_to_string(self.dir.join(name))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        if self.v2 {
            let peak = read("memory.peak")
                .parse()
                .or_else(|_| read("memory.current").parse())
                .unwrap_or(0);
            let events = read("memory.events");
            let count = |key: &str| {
                events
                    .lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (peak, count("oom ") + count("oom_kill "))
        } else {
            (
                read("memory.max_usage_in_bytes").parse().unwrap_or(0),
                read("memory.failcnt").parse().unwrap_or(0),
            )
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn disk_usage(path: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            disk_usage(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

#[test]
fn an_agent_in_a_32_mib_memory_cgroup_deploys_rolls_out_and_cleans_with_small_state() {
    let name = format!("depro-test-{}", std::process::id());
    let cgroup = match MemoryCgroup::make(&name) {
        Ok(cgroup) => Some(cgroup),
        Err(why) => {
            // A machine that lets no process make a cgroup: the memory
            // limit is not tested here, the rest of the test still runs.
            eprintln!("no memory cgroup on this machine ({why}); running without the limit");
            None
        }
    };
    let mut fleet = Fleet::new(1);
    let (binary, shipped) = shipped_binary();
    fleet.agents[0].program = match &cgroup {
        // The agent joins the group before it starts; its hooks inherit it.
        Some(cgroup) => vec![
            "sh".into(),
            "-c".into(),
            format!(
                "echo $$ > {} && exec \"$0\" \"$@\"",
                cgroup.procs().display()
            ),
            binary,
        ],
        None => vec![binary],
    };
    fleet.start_all();
    for version in ["v1", "v2", "v3"] {
        fleet.depro(&["deploy", version]).ok();
        fleet.expect_active(version);
    }
    fleet.depro(&["rollback"]).ok();
    fleet.expect_active("v2");
    fleet.depro(&["remove", "v1", "v3", "-wait"]).ok();
    let pid = fleet.agents[0].pid();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the agent died:\n{}",
        fleet.agents[0].log()
    );

    // depro's own state on disk: the bookkeeping under <path>/.depro.
    let state = disk_usage(&fleet.agents[0].dir.join("api/.depro"));
    assert!(state < 16 * 1024, "{state} bytes of state");
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    eprintln!("agent: {rss_kib} KiB resident, {state} bytes of state");
    if shipped {
        // The static binary, idle after the work: a few MiB (the benchmark
        // measures it precisely; this bound catches a leak or a bloat).
        assert!(rss_kib < 8 * 1024, "{rss_kib} KiB resident");
    }

    if let Some(cgroup) = &cgroup {
        let member = std::fs::read_to_string(cgroup.procs()).unwrap();
        assert!(
            member.lines().any(|p| p == pid.to_string()),
            "the agent is not in {}",
            cgroup.dir.display()
        );
        let (peak, pressure) = cgroup.usage_and_pressure();
        eprintln!(
            "cgroup {}: peak {} KiB of {} KiB, limit hit {pressure} times",
            cgroup.dir.display(),
            peak / 1024,
            LIMIT / 1024
        );
        assert!(peak > 0 && peak < LIMIT, "peak {peak}");
        assert_eq!(pressure, 0, "the group hit its 32 MiB limit");
    }
    fleet.agents.clear();
}

#[test]
fn an_agent_on_a_read_only_root_file_system_works_with_only_its_node_directory_writable() {
    // What the hardened unit's ProtectSystem=strict with ReadWritePaths=
    // does, without systemd: a mount namespace of its own where / is
    // read-only but for the node's directory (its deployment path, and the
    // hooks.log the test hooks write). The agent must need nothing else.
    let mut fleet = Fleet::new(1);
    let node = fleet.agents[0].dir.display().to_string();
    fleet.agents[0].program = vec![
        "unshare".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        format!("mount --bind {node} {node} && mount -o remount,bind,ro / && exec \"$0\" \"$@\""),
        support::depro_bin().to_string(),
    ];
    fleet.start_all();
    fleet.depro(&["deploy", "v1"]).ok();
    fleet.depro(&["deploy", "v2"]).ok();
    fleet.expect_active("v2");
    fleet.depro(&["rollback"]).ok();
    fleet.expect_active("v1");
    fleet.depro(&["remove", "v2", "-wait"]).ok();
    let log = fleet.agents[0].log();
    assert!(!log.contains("Read-only file system"), "{log}");
    // The namespace really is read-only outside the node's directory.
    let pid = fleet.agents[0].pid();
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/"))
        .unwrap();
    assert!(
        root.split_whitespace().nth(3).unwrap().starts_with("ro"),
        "{root}"
    );
}

/// A field of `/proc/<pid>/smaps_rollup`, in KiB.
fn smaps_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Resident memory the process still uses: its RSS without the pages its
/// allocator gave back with `MADV_FREE` (counted in the RSS until the
/// kernel needs them).
fn used_kib(pid: i32) -> u64 {
    smaps_kib(pid, "Rss") - smaps_kib(pid, "LazyFree")
}

/// Sets (or, with `None`, deletes the trees of) keys in transactions of
/// Consul's 64 operations at most.
fn txn_all(fleet: &Fleet, ops: Vec<serde_json::Value>) {
    for chunk in ops.chunks(64) {
        fleet.consul.call(
            "PUT",
            "txn",
            Some(serde_json::to_string(chunk).unwrap().as_bytes()),
        );
    }
    fleet.consul.ring(&fleet.prefix);
}

/// Issue 19: an agent's memory grew ~1.2 KB per version (its view of the
/// tree held in three copies, every name copied into each map). The
/// shipped binary with its default hooks, one node: `DEPRO_MANY_ROUNDS`
/// times (default 5), `DEPRO_MANY_VERSIONS` versions (default 1,000) are
/// added and deployed, then all removed. Each costs well under 1 KB, and
/// what a prune frees is given back or kept by the allocator for the next
/// versions (musl's keeps a group of small blocks while one of them
/// lives): memory levels off, it does not add up round after round.
#[test]
fn an_agent_s_memory_grows_little_per_version_and_levels_off_as_versions_come_and_go() {
    let many: usize = std::env::var("DEPRO_MANY_VERSIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let mut fleet = Fleet::new(1);
    let (binary, shipped) = shipped_binary();
    fleet.agents[0].program = vec![binary];
    fleet.start_all();
    fleet.depro(&["deploy", "v0"]).ok();
    fleet.expect_active("v0");
    let pid = fleet.agents[0].pid();
    let p = fleet.prefix.clone();
    let ready = |f: &Fleet| {
        f.consul
            .tree(&format!("{p}/"))
            .values()
            .filter(|(v, _)| v == "ready")
            .count()
    };
    let add = |names: &[String]| {
        txn_all(
            &fleet,
            names
                .iter()
                .map(|v| serde_json::json!({"KV": {"Verb": "set", "Key": format!("{p}/{v}/"), "Value": ""}}))
                .collect(),
        );
    };
    let remove = |names: &[String]| {
        txn_all(
            &fleet,
            names
                .iter()
                .map(|v| serde_json::json!({"KV": {"Verb": "delete-tree", "Key": format!("{p}/{v}/")}}))
                .collect(),
        );
    };
    let patience = Duration::from_secs(600);
    let before = used_kib(pid);
    let mut peaks = Vec::new();
    let mut pruned = Vec::new();
    let rounds: usize = std::env::var("DEPRO_MANY_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5)
        .max(2);
    for round in 0..rounds {
        let names: Vec<String> = (1..=many).map(|i| format!("r{round}-{i}")).collect();
        add(&names);
        fleet.wait_within(patience, "every version ready", |f| ready(f) == many);
        peaks.push(used_kib(pid));
        remove(&names);
        fleet.wait_within(patience, "the removed versions cleaned", |f| {
            f.agents[0].version_dirs("api").len() == 1
        });
        pruned.push(used_kib(pid));
    }
    let grown = peaks[0].saturating_sub(before);
    let per_version = grown * 1024 / many as u64;
    let report = format!(
        "agent ({}): {before} KiB in use with 1 version; {many} more, then back to 1, {rounds} times: \
         {peaks:?} KiB, {pruned:?} KiB ({per_version} B per version; RSS now {} KiB, of which LazyFree {} KiB)",
        if shipped { "static" } else { "debug" },
        rss_kib(pid),
        smaps_kib(pid, "LazyFree"),
    );
    eprintln!("{report}");
    // 520 B measured on a quiet machine, 778 B under CI's load (1,122-1,239
    // before issue 19), in a shipped binary.
    if shipped {
        assert!(per_version <= 950, "{report}");
    }
    // What a prune frees comes back: to the kernel, or to the allocator,
    // which the next versions reuse. Under load the allocator's share grows
    // for a round or two (CI, three rounds: after the prunes 3,300, 3,576,
    // 3,708 KiB), then levels off (eight rounds of 600: 3,324, 3,600, 3,720,
    // 3,672, 3,708, 3,692, 3,684, 3,720). So the last round adds little to
    // the one before (half the first round's growth at most: a leak of what
    // the versions took adds all of it each round), and its peak is no
    // higher than the earlier ones' by more.
    let slack = grown / 2;
    let n = pruned.len();
    assert!(
        n < 2 || pruned[n - 1] <= pruned[n - 2] + slack,
        "memory still adds up after the last prune: {report}"
    );
    let highest_before = peaks[..n - 1].iter().copied().max().unwrap_or(peaks[0]);
    assert!(
        peaks[n - 1] <= highest_before.max(peaks[0]) + slack,
        "memory still adds up at the last peak: {report}"
    );
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap()
}
