//! The soak: a random mix of deploys (at once and in waves), rollbacks,
//! removals, agents killed with -9 and restarted, and Consul leaders killed, against a 3-server
//! cluster and four agents, for a set time (60 s by default, as in CI;
//! `DEPRO_SOAK_SECS=600` for the long run docs/reliability.md reports), with
//! the recorder checking the invariants throughout. At the end the faults
//! stop and the fleet must converge with nothing lost. `DEPRO_SEED` replays
//! a run's choices; the figures are printed and written to
//! `target/soak-report.json`.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::cluster::Cluster;
use support::{Consul, Fleet, Output, Rng, finish, spawn};

#[derive(Default, Debug, serde::Serialize)]
struct Report {
    seconds: u64,
    seed_note: String,
    rounds: usize,
    commands: BTreeMap<String, BTreeMap<String, usize>>,
    faults: BTreeMap<String, usize>,
    /// What the commands that did not succeed said (the first 30).
    refusals: Vec<String>,
    switches_checked: usize,
    live_checks: usize,
    tree_snapshots: usize,
    violations: Vec<String>,
}

impl Report {
    fn command(&mut self, what: &str, out: &Output) {
        let code = out.code.map_or("killed".into(), |c| c.to_string());
        if out.code != Some(0) && self.refusals.len() < 30 {
            self.refusals.push(format!("{what}: {}", out.error()));
        }
        *self
            .commands
            .entry(what.to_string())
            .or_default()
            .entry(code)
            .or_default() += 1;
    }
    fn fault(&mut self, what: &str) {
        *self.faults.entry(what.to_string()).or_default() += 1;
    }
}

#[test]
fn a_soak_of_deploys_rollbacks_removals_and_failures_breaks_no_invariant() {
    let seconds: u64 = std::env::var("DEPRO_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut rng = Rng::new("soak");
    let cluster = Cluster::start();
    let consul = Consul::remote(cluster.addrs());
    let mut fleet = Fleet::spread(&consul, &cluster.addrs(), 4);
    for agent in &fleet.agents {
        agent.set_flag("slow", true);
    }
    fleet.start_all();
    let recorder = fleet.record(&cluster.addrs());
    let mut report = Report {
        seconds,
        seed_note: "replay with the DEPRO_SEED printed on stderr".into(),
        ..Report::default()
    };
    let start = Instant::now();
    let mut next_version = 0;
    let mut dead: Vec<usize> = Vec::new();
    let mut server_down: Option<usize> = None;
    while start.elapsed() < Duration::from_secs(seconds) {
        report.rounds += 1;
        let alive = (fleet.agents.len() - dead.len()) as u32;
        let server = {
            let up: Vec<usize> = (0..3).filter(|i| cluster.is_up(*i)).collect();
            cluster.addr(up[rng.below(up.len())])
        };
        // Up to two agents may die while a command runs: ask for the rest.
        let need = alive.saturating_sub(2).max(1);
        let nodes = format!("-nodes={need}");
        let (what, command, version) = match rng.below(12) {
            0..=4 => {
                next_version += 1;
                let v = format!("s{next_version}");
                let c = fleet.depro_via(&server, &["deploy", &v, &nodes, "-timeout=60s"]);
                ("deploy", c, Some(v))
            }
            // In waves: a canary, then half of the rest at a time; a
            // switched node killed meanwhile is waited for until the
            // timeout, a failed one halts the rollout (undone or not).
            10 | 11 => {
                next_version += 1;
                let v = format!("s{next_version}");
                let mut args = vec![
                    "deploy",
                    v.as_str(),
                    nodes.as_str(),
                    "-canary=1",
                    "-batch=50%",
                    "-pause=200ms",
                    "-timeout=20s",
                ];
                let what = if rng.below(2) == 0 {
                    args.push("-rollback-on-failure");
                    "deploy in waves -rollback-on-failure"
                } else {
                    "deploy in waves"
                };
                (what, fleet.depro_via(&server, &args), Some(v))
            }
            5 | 6 => (
                "rollback",
                fleet.depro_via(&server, &["rollback", &nodes, "-timeout=60s"]),
                None,
            ),
            7 => (
                "prune",
                fleet.depro_via(&server, &["prune", "-keep=3"]),
                None,
            ),
            _ => {
                let tree = fleet.consul.tree(&format!("{}/", fleet.prefix));
                let current = fleet.current();
                let old = tree
                    .keys()
                    .filter_map(|k| k.strip_prefix(&format!("{}/", fleet.prefix)))
                    .filter_map(|k| k.strip_suffix('/'))
                    .find(|v| Some(*v) != current.as_deref())
                    .map(String::from);
                match old {
                    Some(old) => (
                        "remove -wait",
                        fleet.depro_via(&server, &["remove", &old, "-wait", "-timeout=60s"]),
                        None,
                    ),
                    None => continue,
                }
            }
        };
        let child = spawn(command);
        // Up to two faults while it runs.
        for _ in 0..rng.below(3) {
            std::thread::sleep(rng.upto(Duration::from_millis(500)));
            match rng.below(4) {
                0 | 1 if dead.len() < 2 => {
                    let victim = rng.below(fleet.agents.len());
                    if !dead.contains(&victim) {
                        fleet.agents[victim].kill9();
                        dead.push(victim);
                        report.fault("agent kill -9");
                    }
                }
                2 if !dead.is_empty() => {
                    let back = dead.remove(rng.below(dead.len()));
                    fleet.agents[back].start();
                    report.fault("agent restart");
                }
                3 if server_down.is_none() && cluster.leader().is_some() => {
                    server_down = Some(cluster.kill_leader());
                    report.fault("leader kill");
                }
                _ => {}
            }
        }
        if let Some(down) = server_down.take() {
            std::thread::sleep(rng.upto(Duration::from_secs(2)));
            cluster.restart(down);
            report.fault("server restart");
            cluster.wait_healthy();
        }
        let out = finish(child);
        // On stderr, for a failed run's replay.
        eprintln!(
            "soak: {what} {}: exit {:?}: {}",
            version.as_deref().unwrap_or(""),
            out.code,
            out.stderr.lines().last().unwrap_or("")
        );
        report.command(what, &out);
        if let (Some(version), Some(0)) = (&version, out.code) {
            recorder.check_switch(version, need as usize);
            report.switches_checked += 1;
        }
    }
    // The faults stop: everything comes back and must converge.
    for back in dead.drain(..) {
        fleet.agents[back].start();
    }
    cluster.wait_healthy();
    // A rollout in waves that halted (a switched node killed until its
    // timeout) stays in the tree, as designed, until resumed or undone:
    // with the faults over, its resume (the command it printed, from the
    // plan's flags) must finish it.
    let plan = consul.get(&format!("{}/.rollout", fleet.prefix));
    if let Some(plan) = plan {
        let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
        let version = plan["version"].as_str().unwrap().to_string();
        let mut args = vec!["deploy", version.as_str()];
        args.extend(plan["flags"].as_str().unwrap_or("").split_whitespace());
        args.push("-timeout=60s");
        let out = fleet.depro(&args);
        report.command("resume after the faults", &out);
        out.ok();
        let need = args
            .iter()
            .find_map(|a| a.strip_prefix("-nodes="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        recorder.check_switch(&version, need);
        report.switches_checked += 1;
    }
    fleet.expect_converged(Duration::from_secs(120));
    // A short run can draw no successful switch at all (a deploy whose
    // node died between `ready` and its rollout waits for it until its
    // timeout): one more deploy, without faults, so that every run checks
    // at least one switch.
    if report.switches_checked == 0 {
        next_version += 1;
        let version = format!("s{next_version}");
        let need = fleet.agents.len();
        let out = fleet.depro(&[
            "deploy",
            &version,
            &format!("-nodes={need}"),
            "-timeout=60s",
        ]);
        report.command("deploy (after the faults)", &out);
        out.ok();
        recorder.check_switch(&version, need);
        report.switches_checked += 1;
        fleet.expect_converged(Duration::from_secs(120));
    }
    let findings = recorder.finish();
    report.live_checks = findings.samples;
    report.tree_snapshots = findings.snapshots;
    report.violations = findings.violations;
    let json = serde_json::to_string_pretty(&report).unwrap();
    eprintln!("{json}");
    let _ = std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/soak-report.json"),
        &json,
    );
    assert!(report.violations.is_empty(), "{json}");
    assert!(report.switches_checked > 0, "no deploy succeeded: {json}");
}
