//! The fault suite: scenarios against real Consul (a 3-server cluster on
//! loopback where servers fail) and real agents, with the recorder checking
//! the invariants all along (see tests/support/recorder.rs and
//! docs/reliability.md). Each scenario has a short form (the default, for
//! CI) and a long one: `DEPRO_FAULTS_LONG=1`. Failures print their seed;
//! `DEPRO_SEED=<seed>` replays the same choices.

mod support;

use std::collections::BTreeMap;
use std::process::Child;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::cluster::Cluster;
use support::recorder::Findings;
use support::{Consul, Fleet, Output, Rng, finish, spawn, wait_for};

/// How long converging may take after the last fault (an election, a
/// session that must expire, agents that back off).
const SETTLE: Duration = Duration::from_secs(90);

fn long() -> bool {
    std::env::var_os("DEPRO_FAULTS_LONG").is_some()
}

fn rounds(short: usize, long_form: usize) -> usize {
    if long() { long_form } else { short }
}

/// Exit codes seen, and what the commands that did not succeed said.
#[derive(Default, Debug)]
struct Outcomes(BTreeMap<Option<i32>, usize>, Vec<String>);

impl Outcomes {
    fn add(&mut self, out: &Output) {
        *self.0.entry(out.code).or_default() += 1;
        if out.code != Some(0) {
            self.1.push(out.error().to_string());
        }
    }
}

fn assert_clean(what: &str, findings: Findings, outcomes: &Outcomes) {
    eprintln!(
        "{what}: {} live checks, {} tree snapshots, exits {:?}",
        findings.samples, findings.snapshots, outcomes.0
    );
    for said in &outcomes.1 {
        eprintln!("{what}: refused: {said}");
    }
    assert!(
        findings.violations.is_empty(),
        "{what}: invariants broken: {:#?}",
        findings.violations
    );
    assert!(findings.samples > 10, "the recorder did not run");
}

/// A server that answers, for a command.
fn some_server(cluster: &Cluster, rng: &mut Rng) -> String {
    let up: Vec<usize> = (0..3).filter(|i| cluster.is_up(*i)).collect();
    cluster.addr(up[rng.below(up.len())])
}

#[test]
fn the_leader_killed_during_deploys_breaks_no_guarantee_and_the_fleet_converges() {
    let mut rng = Rng::new("leader killed during deploys");
    let cluster = Cluster::start();
    let consul = Consul::remote(cluster.addrs());
    let mut fleet = Fleet::spread(&consul, &cluster.addrs(), 3);
    fleet.start_all();
    let recorder = fleet.record(&cluster.addrs());
    let mut outcomes = Outcomes::default();
    for round in 0..rounds(2, 10) {
        let version = format!("v{round}");
        let server = some_server(&cluster, &mut rng);
        let deploy =
            spawn(fleet.depro_via(&server, &["deploy", &version, "-nodes=3", "-timeout=120s"]));
        std::thread::sleep(rng.upto(Duration::from_millis(400)));
        let killed = cluster.kill_leader();
        cluster.wait_leader();
        cluster.restart(killed);
        let out = finish(deploy);
        outcomes.add(&out);
        if out.code == Some(0) {
            recorder.check_switch(&version, 3);
        }
        cluster.wait_healthy();
        fleet.expect_converged(SETTLE);
    }
    assert_clean("leader killed during deploys", recorder.finish(), &outcomes);
    assert!(
        outcomes.0.contains_key(&Some(0)),
        "no deploy succeeded: {outcomes:?}"
    );
}

#[test]
fn the_leader_killed_during_remove_wait_leaves_no_version_behind() {
    let mut rng = Rng::new("leader killed during remove -wait");
    let cluster = Cluster::start();
    let consul = Consul::remote(cluster.addrs());
    let mut fleet = Fleet::spread(&consul, &cluster.addrs(), 3);
    fleet.start_all();
    let recorder = fleet.record(&cluster.addrs());
    let mut outcomes = Outcomes::default();
    let mut previous: Option<String> = None;
    for round in 0..rounds(2, 6) {
        let version = format!("v{round}");
        let out = fleet
            .depro_via(
                &some_server(&cluster, &mut rng),
                &["deploy", &version, "-nodes=3"],
            )
            .output()
            .unwrap();
        Output::of(out).ok();
        recorder.check_switch(&version, 3);
        let Some(old) = previous.replace(version) else {
            continue;
        };
        let remove = spawn(fleet.depro_via(
            &some_server(&cluster, &mut rng),
            &["remove", &old, "-wait", "-timeout=120s"],
        ));
        std::thread::sleep(rng.upto(Duration::from_millis(300)));
        let killed = cluster.kill_leader();
        cluster.wait_leader();
        cluster.restart(killed);
        outcomes.add(&finish(remove));
        cluster.wait_healthy();
        fleet.expect_converged(SETTLE);
        fleet.expect_gone(&old);
    }
    assert_clean(
        "leader killed during remove -wait",
        recorder.finish(),
        &outcomes,
    );
}

#[test]
fn servers_restarted_one_by_one_while_deploys_continue() {
    let mut rng = Rng::new("rolling restart");
    let cluster = Cluster::start();
    let consul = Consul::remote(cluster.addrs());
    let mut fleet = Fleet::spread(&consul, &cluster.addrs(), 3);
    fleet.start_all();
    let recorder = fleet.record(&cluster.addrs());
    let mut outcomes = Outcomes::default();
    let mut round = 0;
    for _ in 0..rounds(1, 3) {
        for server in 0..3 {
            let version = format!("v{round}");
            round += 1;
            let deploy = spawn(fleet.depro_via(
                &cluster.addr((server + 1) % 3),
                &["deploy", &version, "-nodes=3", "-timeout=120s"],
            ));
            std::thread::sleep(rng.upto(Duration::from_millis(300)));
            cluster.restart(server);
            let out = finish(deploy);
            outcomes.add(&out);
            if out.code == Some(0) {
                recorder.check_switch(&version, 3);
            }
            cluster.wait_healthy();
            fleet.expect_converged(SETTLE);
        }
    }
    assert_clean("rolling restart", recorder.finish(), &outcomes);
    assert_eq!(
        outcomes.0.keys().collect::<Vec<_>>(),
        [&Some(0)],
        "{outcomes:?}"
    );
}

#[test]
fn agents_killed_at_random_moments_of_every_hook_kind_never_run_a_half_deployed_version() {
    let mut rng = Rng::new("agents killed in hooks");
    let consul = Consul::shared();
    let mut fleet = Fleet::new(3);
    for agent in &fleet.agents {
        agent.set_flag("slow", true);
    }
    fleet.start_all();
    let recorder = fleet.record(&[consul.addr()]);
    let mut outcomes = Outcomes::default();
    let mut kills = 0;
    for round in 0..rounds(6, 40) {
        let version = format!("v{round}");
        // A deploy, a rollback now and then, a removal of an old version:
        // every hook kind runs while agents die.
        let mut commands =
            vec![fleet.depro_command(&["deploy", &version, "-nodes=1", "-timeout=60s"])];
        if round % 3 == 2 {
            commands.push(fleet.depro_command(&["rollback", "-nodes=1", "-timeout=60s"]));
        }
        if round >= 3 {
            commands.push(fleet.depro_command(&["prune", "-keep=2"]));
        }
        for command in commands {
            let child = spawn(command);
            std::thread::sleep(rng.upto(Duration::from_millis(600)));
            let victim = rng.below(3);
            fleet.agents[victim].kill9();
            kills += 1;
            std::thread::sleep(rng.upto(Duration::from_millis(300)));
            fleet.agents[victim].start();
            outcomes.add(&finish(child));
        }
        fleet.expect_converged(SETTLE);
    }
    eprintln!("{kills} agents killed");
    assert_clean("agents killed in hooks", recorder.finish(), &outcomes);
}

#[test]
fn an_agent_stopped_past_its_session_ttl_drops_out_of_the_counts_and_catches_up() {
    let cluster = Cluster::start();
    let consul = Consul::remote(cluster.addrs());
    let mut fleet = Fleet::spread(&consul, &cluster.addrs(), 3);
    fleet.start_all();
    let recorder = fleet.record(&cluster.addrs());
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    fleet.agents[2].signal(Signal::SIGSTOP);
    // Its session expires (2 × TTL): its keys go, it counts no more.
    fleet.wait_within(Duration::from_secs(60), "node3's keys to expire", |f| {
        f.node_state("v1", "node3").is_none()
    });
    let out = fleet.depro(&["deploy", "v2", "-nodes=2", "-timeout=60s"]);
    assert!(out.ok().contains("active on 2/2 nodes"), "{out:#?}");
    recorder.check_switch("v2", 2);
    fleet.agents[2].signal(Signal::SIGCONT);
    fleet.expect_converged(SETTLE);
    assert_clean(
        "SIGSTOP past the TTL",
        recorder.finish(),
        &Outcomes::default(),
    );
}

#[test]
fn of_two_then_five_racing_deploys_exactly_one_wins_each_time() {
    let consul = Consul::shared();
    let mut fleet = Fleet::new(2);
    fleet.start_all();
    let recorder = fleet.record(&[consul.addr()]);
    fleet.depro(&["deploy", "v0", "-nodes=2"]).ok();
    let mut outcomes = Outcomes::default();
    for (race, operators) in [2usize, 5].into_iter().enumerate() {
        // Hold every deploy hook until all operators have started.
        for agent in &fleet.agents {
            agent.set_flag("release", false);
            agent.set_flag("block-deploy", true);
        }
        let versions: Vec<String> = (0..operators).map(|i| format!("r{race}-{i}")).collect();
        let children: Vec<Child> = versions
            .iter()
            .map(|v| spawn(fleet.depro_command(&["deploy", v, "-nodes=2", "-timeout=60s"])))
            .collect();
        fleet.wait("every racing version created", |f| {
            versions
                .iter()
                .all(|v| f.consul.get(&format!("{}/{v}/", f.prefix)).is_some())
        });
        for agent in &fleet.agents {
            agent.set_flag("block-deploy", false);
            agent.set_flag("release", true);
        }
        let outs: Vec<Output> = children.into_iter().map(finish).collect();
        let winners: Vec<&String> = versions
            .iter()
            .zip(&outs)
            .filter(|(_, o)| o.code == Some(0))
            .map(|(v, _)| v)
            .collect();
        for out in &outs {
            outcomes.add(out);
            assert!(
                out.code == Some(0) || out.code == Some(5),
                "a racing deploy ended otherwise: {out:#?}"
            );
        }
        assert_eq!(winners.len(), 1, "{outs:#?}");
        assert_eq!(fleet.current().as_deref(), Some(winners[0].as_str()));
        recorder.check_switch(winners[0], 2);
        fleet.expect_converged(SETTLE);
    }
    assert_clean("racing deploys", recorder.finish(), &outcomes);
}

#[test]
fn a_deploy_racing_a_rollback_or_a_removal_keeps_the_tree_and_the_fleet_consistent() {
    let mut rng = Rng::new("deploy vs rollback/remove");
    let consul = Consul::shared();
    let mut fleet = Fleet::new(2);
    fleet.start_all();
    let recorder = fleet.record(&[consul.addr()]);
    fleet.depro(&["deploy", "v0", "-nodes=2"]).ok();
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    let mut outcomes = Outcomes::default();
    for round in 2..2 + rounds(4, 20) {
        let version = format!("v{round}");
        let deploy = spawn(fleet.depro_command(&["deploy", &version, "-nodes=2", "-timeout=60s"]));
        std::thread::sleep(rng.upto(Duration::from_millis(150)));
        let other = if round % 2 == 0 {
            fleet.depro(&["rollback", "-nodes=2", "-timeout=60s"])
        } else {
            fleet.depro(&["remove", &version, "-timeout=60s"])
        };
        outcomes.add(&other);
        let out = finish(deploy);
        outcomes.add(&out);
        if out.code == Some(0) {
            recorder.check_switch(&version, 2);
        }
        // Whatever won, current names a version that exists, and the
        // fleet follows it.
        let current = fleet.current().unwrap();
        assert!(
            fleet
                .consul
                .get(&format!("{}/{current}/", fleet.prefix))
                .is_some(),
            "current names {current}, which is not in the tree"
        );
        fleet.expect_converged(SETTLE);
    }
    assert_clean("deploy vs rollback/remove", recorder.finish(), &outcomes);
}

#[test]
fn hostile_hooks_that_flood_their_output_or_kill_themselves_break_nothing() {
    let consul = Consul::shared();
    let mut fleet = Fleet::new(2);
    for agent in &mut fleet.agents {
        let hostile = serde_json::json!([
            "if [ \"$VERSION\" = flood ]; then head -c 2000000 /dev/urandom; printf '\\033]0;owned\\007\\n'; fi",
            "if [ \"$VERSION\" = suicide ]; then kill -9 $$; fi",
        ]);
        let deploy = agent.deployments[0]["deploy"].as_array().unwrap().clone();
        let mut lines = hostile.as_array().unwrap().clone();
        lines.extend(deploy);
        agent.deployments[0]["deploy"] = lines.into();
    }
    fleet.start_all();
    let recorder = fleet.record(&[consul.addr()]);
    fleet.depro(&["deploy", "flood", "-nodes=2"]).ok();
    fleet
        .depro(&["deploy", "suicide", "-nodes=2"])
        .fails(2, &["suicide failed on"]);
    fleet.depro(&["deploy", "v3", "-nodes=2"]).ok();
    for agent in &mut fleet.agents {
        assert!(agent.is_running());
        let log = agent.log();
        assert!(!log.contains('\x1b'), "an escape reached the log");
        let longest = log.lines().map(str::len).max().unwrap_or(0);
        assert!(longest < 4096, "a log line of {longest} bytes");
        assert!(log.contains("was killed by SIGKILL"), "{log}");
    }
    fleet.expect_converged(SETTLE);
    wait_for("nothing left of the hooks", || {
        fleet
            .agents
            .iter()
            .all(|a| a.hooks_log().iter().any(|l| l == "deployed v3"))
    });
    assert_clean("hostile hooks", recorder.finish(), &Outcomes::default());
}

#[test]
fn the_recorder_catches_each_kind_of_violation_it_checks() {
    let consul = Consul::shared();
    let mut fleet = Fleet::new(2);
    fleet.start_all();
    let recorder = fleet.record(&[consul.addr()]);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    recorder.check_switch("v1", 2);
    // current moved with one node ready where two were needed.
    fleet.agents[1].set_flag("block-deploy", true);
    fleet.add_version("v2");
    fleet.wait("node1 ready, node2 busy", |f| {
        f.node_state("v2", "node1").as_deref() == Some("ready")
            && f.node_state("v2", "node2").as_deref() == Some("busy")
    });
    fleet.set_current("v2");
    recorder.check_switch("v2", 2);
    // A live link to a version whose deploy never finished there.
    let path = fleet.agents[1].deployment_path("api");
    fleet.agents[1].kill9();
    std::os::unix::fs::symlink(path.join("v2"), path.join("live.fake")).unwrap();
    std::fs::rename(path.join("live.fake"), path.join("live")).unwrap();
    let sampled = recorder.samples();
    wait_for("the recorder to sample the live links", || {
        recorder.samples() > sampled + 2
    });
    // Something created outside the deployment paths.
    std::fs::create_dir(fleet.agents[0].dir.join("stray")).unwrap();
    let findings = recorder.finish();
    let all = findings.violations.join("\n");
    assert!(
        all.contains("current moved to v2") && all.contains("2 needed"),
        "{all}"
    );
    assert!(all.contains("node2: its live names v2"), "{all}");
    assert!(
        all.contains("created outside the deployment paths") && all.contains("stray"),
        "{all}"
    );
    assert!(!all.contains("moved to v1"), "v1's switch was fine: {all}");
}
