//! Progressive delivery (issue 10), against real Consul with real agents:
//! fleet membership and `-nodes=all`, failure reasons, health gates, and
//! canary and batched rollouts.

mod support;

use nix::sys::signal::Signal;
use std::time::Duration;

use support::{Fleet, spawn, wait_for};

/// Adds a health hook to every agent of the fleet (before they start): it
/// passes on a node once `healthy` (or `healthy-$VERSION`) exists in the
/// node's directory, and says so either way.
fn with_health(fleet: &mut Fleet<'_>, health_timeout: &str) {
    for agent in &mut fleet.agents {
        let ctl = agent.dir.display().to_string();
        agent.deployments[0]["health"] = serde_json::json!([
            format!("echo \"health $VERSION\" >> {ctl}/hooks.log"),
            format!(
                "if [ -e {ctl}/healthy ] || [ -e {ctl}/healthy-$VERSION ]; then exit 0; fi; \
                 echo \"$VERSION answers 503 on $AGENT_NAME\"; exit 7"
            ),
        ]);
        agent.deployments[0]["health_timeout"] = health_timeout.into();
    }
}

/// `n` agents with a health hook (`health_timeout`) on which v1 is healthy,
/// running v1.
fn healthy_on_v1(n: usize, health_timeout: &str) -> Fleet<'static> {
    let mut fleet = Fleet::new(n);
    with_health(&mut fleet, health_timeout);
    fleet.start_all();
    for agent in &fleet.agents {
        agent.set_flag("healthy-v1", true);
    }
    fleet.depro(&["deploy", "v1", &format!("-nodes={n}")]).ok();
    fleet
}

fn healthy_everywhere(fleet: &Fleet<'_>) {
    for agent in &fleet.agents {
        agent.set_flag("healthy", true);
    }
}

// ------------------------------------------------------------ membership

#[test]
fn status_lists_the_agents_that_follow_the_prefix_and_a_stopped_agent_is_shown_absent_until_forgotten()
 {
    let mut fleet = Fleet::start(2);
    let key = |node: &str| format!("{}/.agents/{node}", fleet.prefix);
    fleet.wait("both agents announced", |f| {
        f.consul.get(&key("node1")).is_some() && f.consul.get(&key("node2")).is_some()
    });
    let record: serde_json::Value =
        serde_json::from_str(&fleet.consul.get(&key("node1")).unwrap()).unwrap();
    assert_eq!(record["depro"], env!("CARGO_PKG_VERSION"));
    assert!(
        record["since"].as_str().unwrap().starts_with("20"),
        "{record}"
    );

    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    let status = fleet.depro(&["status"]).ok().to_string();
    assert!(
        status.contains(&format!("node1  {}", env!("CARGO_PKG_VERSION"))),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    assert!(json["agents"]["node2"]["since"].is_string(), "{json}");

    // A stopped agent's session ends, and its announcement with it.
    fleet.agents[1].signal(Signal::SIGTERM);
    fleet.agents[1].wait_exit();
    fleet.wait("node2's announcement gone", |f| {
        f.consul.get(&key("node2")).is_none()
    });
    let json: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    assert!(json["agents"]["node2"].is_null(), "{json}");
    assert!(json["agents"]["node1"].is_object(), "{json}");

    // Issue 20: it is remembered, shown absent, until forgotten.
    assert!(json["absent"]["node2"]["since"].is_string(), "{json}");
    assert!(json["absent"]["node1"].is_null(), "{json}");
    let status = fleet.depro(&["status"]);
    let text = status.result();
    assert!(text.contains("node2  absent"), "{text}");
    assert!(text.contains("absent: node2 (started 20"), "{text}");
    fleet
        .depro(&["forget", "node1"])
        .fails(2, &["node1's agent follows", "stop it"]);
    fleet
        .depro(&["forget", "node9"])
        .fails(2, &["node9 is not remembered"]);
    let out = fleet.depro(&["forget", "node2"]);
    assert!(out.result().contains("forgot node2"), "{out:#?}");
    let status = fleet.depro(&["status"]);
    assert!(!status.result().contains("node2"), "{status:#?}");
}

#[test]
fn nodes_all_counts_every_live_agent_and_not_one_that_stopped() {
    let mut fleet = Fleet::start(3);
    let out = fleet.depro(&["deploy", "v1", "-nodes=all"]);
    assert!(out.ok().contains("3/3 ready"), "{out:#?}");
    fleet.expect_active("v1");

    fleet.agents[2].signal(Signal::SIGTERM);
    fleet.agents[2].wait_exit();
    fleet.wait("node3's announcement gone", |f| {
        f.consul
            .get(&format!("{}/.agents/node3", f.prefix))
            .is_none()
    });
    let out = fleet.depro(&["deploy", "v2", "-nodes=all"]);
    assert!(out.ok().contains("2/2 ready"), "{out:#?}");
    // The agent that stopped is named, not silently left out.
    assert!(
        out.ok()
            .contains("(-nodes=all of 2 agents, 1 absent: node3: 2 needed)"),
        "{out:#?}"
    );
    assert_eq!(fleet.current().as_deref(), Some("v2"));
    for agent in &fleet.agents[..2] {
        assert_eq!(agent.live("api").as_deref(), Some("v2"));
    }
}

#[test]
fn min_nodes_is_a_floor_under_nodes_all_when_most_agents_are_gone() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=all"]).ok();
    // Two live agents are "all", but the operator asked for at least three.
    let out = fleet.depro(&["deploy", "v2", "-nodes=all", "-min-nodes=3", "-timeout=3s"]);
    out.fails(
        3,
        &[
            "timed out",
            "2 of the 3 nodes needed",
            "current unchanged (still v1)",
        ],
    );
    assert!(
        out.stderr
            .contains("(-nodes=all of 2 agents, -min-nodes=3: 3 needed"),
        "{out:#?}"
    );
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    // The dry run counts the same way.
    let out = fleet.depro(&["rollout", "v2", "-nodes=all", "-min-nodes=3", "-dry-run"]);
    assert!(
        out.ok()
            .contains("would wait until 3 nodes (-nodes=all of 2 live agents, -min-nodes=3)"),
        "{out:#?}"
    );
    // A floor the fleet reaches does not hold the switch.
    let out = fleet.depro(&["rollout", "v2", "-nodes=all", "-min-nodes=2"]);
    assert!(out.ok().contains("2/2 ready"), "{out:#?}");
    assert_eq!(fleet.current().as_deref(), Some("v2"));
}

#[test]
fn nodes_as_a_share_counts_that_share_of_the_live_agents_rounded_up() {
    let fleet = Fleet::start(4);
    fleet.wait("every agent announced", |f| {
        (1..=4).all(|i| {
            f.consul
                .get(&format!("{}/.agents/node{i}", f.prefix))
                .is_some()
        })
    });
    // 50% of 4 live agents: 2 nodes needed.
    let out = fleet.depro(&["deploy", "v1", "-nodes=50%"]);
    assert!(
        out.ok().contains("ready (-nodes=50% of 4 agents: 2 needed"),
        "{out:#?}"
    );
    // 60% of 4, rounded up: 3.
    let out = fleet.depro(&["deploy", "v2", "-nodes=60%"]);
    assert!(
        out.ok().contains("ready (-nodes=60% of 4 agents: 3 needed"),
        "{out:#?}"
    );
    assert_eq!(fleet.current().as_deref(), Some("v2"));
}

#[test]
fn nodes_all_with_an_agent_that_never_reports_times_out_names_it_and_keeps_current() {
    let fleet = Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=all"]).ok();
    // node3's agent runs and follows the prefix, but never gets v2 ready.
    fleet.agents[2].set_flag("block-deploy", true);
    let out = fleet.depro(&["deploy", "v2", "-nodes=all", "-timeout=3s"]);
    out.fails(3, &["timed out", "node3", "current unchanged (still v1)"]);
    assert!(
        !out.error().contains("node1") && !out.error().contains("node2"),
        "{out:#?}"
    );
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    fleet.agents[2].set_flag("release", true);
}

// ------------------------------------------------------- failure reasons

#[test]
fn a_failed_deploy_hook_s_exit_status_and_output_reach_the_cli_and_status() {
    let fleet = Fleet::start(2);
    fleet.agents[1].set_flag("fail-deploy", true);
    let out = fleet.depro(&["deploy", "v1", "-nodes=2"]);
    out.fails(
        2,
        &["v1 failed on node2 (the deploy hook exited with status 3)"],
    );
    // The retry hint is a complete command, -nodes included.
    assert!(
        out.stderr.contains(&format!(
            "`depro deploy v1 -prefix={} -nodes=2` again to retry",
            fleet.prefix
        )),
        "{out:#?}"
    );
    // (`node2: busy -> failed: …`, or `node2: failed: …` when the command
    // saw it failed first.)
    assert!(
        out.shown
            .contains("failed: the deploy hook exited with status 3\n"),
        "{out:#?}"
    );
    assert!(
        out.shown.contains("    | deploy fails on purpose"),
        "{out:#?}"
    );

    let status = fleet.depro(&["status"]).ok().to_string();
    assert!(
        status.contains("v1 on node2: the deploy hook exited with status 3"),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    let reason = &json["versions"][0]["reasons"]["node2"];
    assert_eq!(reason["hook"], "deploy", "{json}");
    assert_eq!(reason["exit_code"], 3, "{json}");
    assert!(
        reason["output"]
            .as_str()
            .unwrap()
            .ends_with("deploy fails on purpose"),
        "{json}"
    );

    // The agent's log names a retry that is safe to paste: it knows no
    // rollout policy, so it does not offer a switch (a pasted plain deploy
    // would move every node at once to a build whose canary just failed).
    let hint = format!("`depro deploy v1 -prefix={} -no-rollout`", fleet.prefix);
    assert!(
        fleet.agents[1].log().contains(&hint),
        "{}",
        fleet.agents[1].log()
    );

    // Fixed and retried: the reason goes with the failed key.
    fleet.agents[1].set_flag("fail-deploy", false);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    assert_eq!(
        fleet
            .consul
            .get(&format!("{}/v1/.reason/node2", fleet.prefix)),
        None
    );
    fleet.expect_active("v1");
}

#[test]
fn a_hook_s_output_reaches_the_terminal_with_control_characters_escaped() {
    let mut fleet = Fleet::new(1);
    let ctl = fleet.agents[0].dir.display().to_string();
    fleet.agents[0].deployments[0]["deploy"] = serde_json::json!([
        "printf 'evil \\033]0;owned\\007 title\\n'",
        format!("if [ -e {ctl}/fail-deploy ]; then exit 5; fi"),
    ]);
    fleet.agents[0].set_flag("fail-deploy", true);
    fleet.start_all();
    let out = fleet.depro(&["deploy", "v1"]);
    out.fails(2, &["the deploy hook exited with status 5"]);
    assert!(
        out.shown.contains("| evil \\u{1b}]0;owned\\u{7} title"),
        "{out:#?}"
    );
    assert!(
        !out.shown.contains('\x1b') && !out.shown.contains('\x07'),
        "{out:#?}"
    );
}

// ----------------------------------------------------------- health gates

#[test]
fn a_node_reports_active_only_once_its_health_hook_passes() {
    let mut fleet = Fleet::new(1);
    with_health(&mut fleet, "1m");
    fleet.start_all();
    let deploy = spawn(fleet.depro_command(&["deploy", "v1"]));
    let agent = &fleet.agents[0];
    wait_for("two failed health checks", || {
        agent
            .hooks_log()
            .iter()
            .filter(|l| *l == "health v1")
            .count()
            >= 2
    });
    // Rolled out, but not healthy yet: not active.
    assert_eq!(fleet.node_state("v1", "node1").as_deref(), Some("ready"));
    agent.set_flag("healthy", true);
    let out = support::finish(deploy);
    assert!(out.ok().contains("active on 1/1 nodes"), "{out:#?}");
    fleet.expect_active("v1");
}

#[test]
fn an_unhealthy_node_is_reported_failed_with_the_health_hook_s_reason() {
    let mut fleet = Fleet::new(2);
    with_health(&mut fleet, "2s");
    fleet.start_all();
    healthy_everywhere(&fleet);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.agents[1].set_flag("healthy", false);
    let out = fleet.depro(&["deploy", "v2", "-nodes=2"]);
    out.fails(
        2,
        &[
            "the rollout of v2 failed on node2",
            "the health hook did not pass within 2s",
            "exited with status 7",
        ],
    );
    assert!(
        out.shown.contains("    | v2 answers 503 on node2"),
        "{out:#?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    let reason = &json["versions"][1]["reasons"]["node2"];
    assert_eq!(reason["hook"], "health", "{json}");
    assert_eq!(reason["exit_code"], 7, "{json}");
    assert_eq!(reason["timed_out"], true, "{json}");
    // Rolling back puts node2 on v1 again, healthy (v1 is healthy-v1 there).
    fleet.agents[1].set_flag("healthy-v1", true);
    fleet.depro(&["rollback"]).ok();
    fleet.expect_active("v1");
}

// ------------------------------------------------ canary and batched rollouts

/// Every agent's live version, by node.
fn live(fleet: &Fleet<'_>) -> Vec<Option<String>> {
    fleet.agents.iter().map(|a| a.live("api")).collect()
}

/// Samples every agent's live version every few milliseconds until told
/// to stop: what each node ran, in order (consecutive repeats dropped).
struct LiveSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<String>>>,
}

impl LiveSampler {
    fn start(fleet: &Fleet<'_>) -> LiveSampler {
        let paths: Vec<std::path::PathBuf> = fleet
            .agents
            .iter()
            .map(|a| a.deployment_path("api").join("live"))
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen: Vec<Vec<String>> = vec![Vec::new(); paths.len()];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for (path, seen) in paths.iter().zip(&mut seen) {
                    let live = std::fs::read_link(path)
                        .ok()
                        .and_then(|t| Some(t.file_name()?.to_string_lossy().into_owned()))
                        .unwrap_or_default();
                    if seen.last() != Some(&live) {
                        seen.push(live);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            seen
        });
        LiveSampler { stop, thread }
    }

    fn finish(self) -> Vec<Vec<String>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn a_canary_rollout_switches_in_waves_and_each_node_runs_the_old_or_the_new_version() {
    let mut fleet = Fleet::new(4);
    with_health(&mut fleet, "30s");
    fleet.start_all();
    healthy_everywhere(&fleet);
    fleet.depro(&["deploy", "v1", "-nodes=4"]).ok();
    let recorder = fleet.record(&[fleet.consul.addr()]);
    let sampler = LiveSampler::start(&fleet);
    let deploy = spawn(fleet.depro_command(&[
        "deploy",
        "v2",
        "-nodes=all",
        "-canary=1",
        "-batch=2",
        "-pause=2s",
    ]));
    // The canary is active on v2 while the rest still run v1, and current
    // has not moved.
    fleet.wait("the canary active on v2", |f| {
        f.node_state("v2", "node1").as_deref() == Some("active")
    });
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    assert_eq!(
        live(&fleet),
        [Some("v2"), Some("v1"), Some("v1"), Some("v1")].map(|v| v.map(String::from))
    );
    for node in ["node2", "node3", "node4"] {
        assert_eq!(fleet.node_state("v2", node).as_deref(), Some("ready"));
        assert_eq!(fleet.node_state("v1", node).as_deref(), Some("active"));
    }
    let out = support::finish(deploy);
    let text = out.ok();
    for line in [
        "rolling out v2 in 3 waves (1 + 2 + 1); the other nodes stay on v1",
        "wave 1/3: node1 active on v2",
        "pausing 2s before wave 2/3",
        "wave 2/3: node2, node3 active on v2",
        "wave 3/3: node4 active on v2",
        "v2 is current",
    ] {
        assert!(text.contains(line), "{line:?} missing: {out:#?}");
    }
    fleet.expect_active("v2");
    assert_eq!(
        fleet.consul.get(&format!("{}/.rollout", fleet.prefix)),
        None
    );
    // All along, every node ran v1, then v2: never anything else, never
    // back and forth.
    for (agent, ran) in fleet.agents.iter().zip(sampler.finish()) {
        assert_eq!(ran, ["v1", "v2"], "{}", agent.name);
    }
    let findings = recorder.finish();
    assert!(findings.violations.is_empty(), "{:#?}", findings.violations);
    // Every node ran exactly one rollout of v2.
    for agent in &fleet.agents {
        let rollouts = agent
            .hooks_log()
            .iter()
            .filter(|l| l.starts_with("rollout v2"))
            .count();
        assert_eq!(rollouts, 1, "{}", agent.name);
    }
}

#[test]
fn of_two_operators_starting_progressive_rollouts_at_once_exactly_one_wins() {
    let fleet = Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    for version in ["v2", "v3"] {
        fleet
            .depro(&["deploy", version, "-nodes=3", "-no-rollout"])
            .ok();
    }
    let start = |version: &str| {
        spawn(fleet.depro_command(&["rollout", version, "-canary=1", "-batch=1", "-pause=1s"]))
    };
    let (a, b) = (start("v2"), start("v3"));
    let (a, b) = (support::finish(a), support::finish(b));
    let (winner, loser) = match (a.code, b.code) {
        (Some(0), Some(5)) => ("v2", &b),
        (Some(5), Some(0)) => ("v3", &a),
        _ => panic!("not exactly one winner:\n{a:#?}\n{b:#?}"),
    };
    assert!(loser.error().contains("progressive rollout"), "{loser:#?}");
    assert_eq!(fleet.current().as_deref(), Some(winner));
    fleet.expect_active(winner);
}

#[test]
fn a_rollback_can_go_in_waves_too() {
    let fleet = Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    fleet.depro(&["deploy", "v2", "-nodes=3"]).ok();
    let out = fleet.depro(&["rollback", "-nodes=all", "-batch=1"]);
    let text = out.ok();
    assert!(
        text.contains("rolling out v1 in 3 waves (1 + 1 + 1)"),
        "{out:#?}"
    );
    assert!(text.contains("wave 3/3: node3 active on v1"), "{out:#?}");
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    fleet.expect_active("v1");
}

#[test]
fn a_failing_health_hook_on_the_canary_halts_the_rollout_and_rollback_on_failure_restores_it() {
    let fleet = healthy_on_v1(3, "2s");
    // v2 is healthy everywhere but on the canary, node1.
    for agent in &fleet.agents[1..] {
        agent.set_flag("healthy-v2", true);
    }
    let out = fleet.depro(&[
        "deploy",
        "v2",
        "-nodes=3",
        "-canary=1",
        "-batch=1",
        "-rollback-on-failure",
    ]);
    out.fails(
        2,
        &[
            "the rollout of v2 halted in wave 1 of 3",
            "failed on node1 (the health hook did not pass within 2s",
            "rolled back: v1 runs again on node1",
            "current stays v1",
        ],
    );
    assert!(
        out.shown.contains("    | v2 answers 503 on node1"),
        "{out:#?}"
    );
    // No node of a later wave switched, and every node runs v1 again.
    for agent in &fleet.agents[1..] {
        assert!(
            !agent
                .hooks_log()
                .iter()
                .any(|l| l.starts_with("rollout v2")),
            "{}: {:?}",
            agent.name,
            agent.hooks_log()
        );
    }
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    fleet.expect_active("v1");
    assert_eq!(
        fleet.consul.get(&format!("{}/.rollout", fleet.prefix)),
        None
    );
}

#[test]
fn an_interrupted_progressive_rollout_shows_in_status_and_is_resumed_or_undone() {
    let mut fleet = Fleet::new(3);
    with_health(&mut fleet, "30s");
    fleet.start_all();
    healthy_everywhere(&fleet);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    fleet
        .depro(&["deploy", "v2", "-nodes=3", "-no-rollout"])
        .ok();

    // The operator's laptop closes during the pause after the canary.
    let interrupted = |fleet: &Fleet<'_>, version: &str| {
        let mut rollout =
            spawn(fleet.depro_command(&["rollout", version, "-canary=1", "-batch=1", "-pause=1m"]));
        fleet.wait("the canary active", |f| {
            f.node_state(version, "node1").as_deref() == Some("active")
        });
        rollout.kill().unwrap();
        rollout.wait().unwrap();
    };
    interrupted(&fleet, "v2");
    // Killed, the command holds the waves until its session lapses.
    fleet.wait_within(
        Duration::from_secs(40),
        "the killed command's claim lapses",
        |f| f.consul.get(&format!("{}/.driver", f.prefix)).is_none(),
    );
    let status = fleet.depro(&["status"]).ok().to_string();
    for line in [
        "progressive rollout of v2 under way: wave 1 of 3",
        "switched to v2: node1",
        "every other node runs current (v1)",
        "depro rollout v2 -prefix=",
        "depro rollback -prefix=",
    ] {
        assert!(status.contains(line), "{line:?} missing: {status}");
    }
    let json: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    assert_eq!(json["rollout"]["version"], "v2", "{json}");
    assert_eq!(json["rollout"]["in_effect"], true, "{json}");
    assert_eq!(json["rollout"]["started_waves"], 1, "{json}");

    // Another operator's rollout of another version is refused meanwhile.
    fleet
        .depro(&["rollout", "v1"])
        .fails(5, &["progressive rollout of v2 is under way"]);

    // A host that joins now follows current (v1), not the half-done wave.
    fleet.join("node4");
    healthy_everywhere(&fleet);
    fleet.wait("node4 active on v1", |f| {
        f.node_state("v1", "node4").as_deref() == Some("active")
    });
    assert_eq!(fleet.agents[3].live("api").as_deref(), Some("v1"));

    // Resumed: the remaining waves, then current.
    // (Without the rollout's own -pause=1m: this command's flag holds.)
    let out = fleet.depro(&["rollout", "v2", "-nodes=4", "-pause=0s"]);
    let text = out.ok();
    assert!(text.contains("resuming the rollout of v2"), "{out:#?}");
    assert!(text.contains("wave 3/3: node3 active on v2"), "{out:#?}");
    assert_eq!(fleet.current().as_deref(), Some("v2"));
    fleet.expect_active("v2");
    assert_eq!(
        fleet.consul.get(&format!("{}/.rollout", fleet.prefix)),
        None
    );

    // Interrupted again with v3, then undone with `depro rollback`.
    fleet
        .depro(&["deploy", "v3", "-nodes=4", "-no-rollout"])
        .ok();
    interrupted(&fleet, "v3");
    let out = fleet.depro(&["rollback"]);
    assert!(out.ok().contains("undid the rollout of v3"), "{out:#?}");
    assert_eq!(fleet.current().as_deref(), Some("v2"));
    fleet.expect_active("v2");
    assert_eq!(
        fleet.consul.get(&format!("{}/.rollout", fleet.prefix)),
        None
    );
}

#[test]
fn progressive_flags_without_a_current_version_are_refused() {
    let fleet = Fleet::start(1);
    fleet
        .depro(&["deploy", "v1", "-canary=1"])
        .fails(2, &["current is not set", "without -canary or -batch"]);
    assert_eq!(fleet.current(), None);
}

#[test]
fn a_halted_rollout_is_resumed_by_deploy_once_the_cause_is_fixed() {
    let fleet = healthy_on_v1(3, "2s");
    for agent in &fleet.agents[..2] {
        agent.set_flag("healthy-v2", true);
    }
    // The second wave's node3 fails; nothing is rolled back.
    let out = fleet.depro(&["deploy", "v2", "-nodes=3", "-canary=1", "-batch=2"]);
    out.fails(
        2,
        &[
            "halted in wave 2 of 2",
            "failed on node3",
            &format!(
                // The same rollout: its canary and batch flags too.
                "resume with `depro deploy v2 -prefix={} -nodes=3 -canary=1 -batch=2`",
                fleet.prefix
            ),
        ],
    );
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    // Removing the version being rolled out is refused meanwhile.
    fleet
        .depro(&["remove", "v2"])
        .fails(2, &["being rolled out progressively"]);
    // Fixed, then resumed: node3 is asked to try again, and the rollout
    // goes on from its second wave.
    fleet.agents[2].set_flag("healthy-v2", true);
    let out = fleet.depro(&["deploy", "v2", "-nodes=3"]);
    let text = out.ok();
    assert!(
        text.contains("node3: failed before; asked it to try again"),
        "{out:#?}"
    );
    assert!(
        text.contains("resuming the rollout of v2: wave 2 of 2"),
        "{out:#?}"
    );
    assert_eq!(fleet.current().as_deref(), Some("v2"));
    fleet.expect_active("v2");
}

#[test]
fn a_node_whose_agent_stops_during_the_rollout_is_waited_for_and_named_if_it_never_returns() {
    let fleet = Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    fleet.agents[2].set_flag("block-rollout", true);
    let deploy = spawn(fleet.depro_command(&["deploy", "v2", "-nodes=3", "-timeout=5s"]));
    let pid_file = fleet.agents[2].dir.join("rollout.pid");
    wait_for("node3's rollout hook to run", || pid_file.exists());
    // node3's host dies: its agent is gone and Consul ends its session.
    let session = fleet.session_of("v2", "node3").unwrap();
    let mut fleet = fleet;
    fleet.agents[2].kill9();
    fleet.consul.destroy_session(&session);
    let out = support::finish(deploy);
    out.fails(
        3,
        &[
            "2 of 3 nodes active",
            "the agents of node3 stopped during the rollout and have not come back",
        ],
    );
    fleet.agents[2].set_flag("release-rollout", true);
}

#[test]
fn a_rollout_plan_depro_did_not_write_is_never_resumed_only_undone() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet
        .depro(&["deploy", "v2", "-nodes=2", "-no-rollout"])
        .ok();
    let index = fleet
        .modify_index(&format!("{}/current", fleet.prefix))
        .unwrap();
    // Another tool (or a hand edit) left a plan with no waves.
    let plan = serde_json::json!({
        "version": "v2", "base": "v1", "base_index": index,
        "waves": [], "started_waves": 3, "switched": [],
    });
    fleet
        .consul
        .put(&format!("{}/.rollout", fleet.prefix), &plan.to_string());
    fleet
        .depro(&["rollout", "v2", "-nodes=2"])
        .fails(2, &["cannot resume", "depro rollback"]);
    let out = fleet.depro(&["rollback"]);
    assert!(out.ok().contains("undid the rollout of v2"), "{out:#?}");
    fleet.depro(&["rollout", "v2", "-nodes=2"]).ok();
    fleet.expect_active("v2");
}

#[test]
fn a_version_removed_during_its_progressive_rollout_halts_it_at_once_and_leaves_nothing_to_resume()
{
    let fleet = healthy_on_v1(3, "30s");
    healthy_everywhere(&fleet);
    let deploy = spawn(fleet.depro_command(&[
        "deploy",
        "v2",
        "-nodes=all",
        "-canary=1",
        "-batch=1",
        "-pause=3s",
        "-timeout=60s",
    ]));
    fleet.wait("the canary active on v2", |f| {
        f.node_state("v2", "node1").as_deref() == Some("active")
    });
    // `depro remove` refuses a version under a plan...
    fleet
        .depro(&["remove", "v2"])
        .fails(2, &["being rolled out progressively"]);
    // ...but any client can delete its key.
    let started = std::time::Instant::now();
    fleet.consul.delete(&format!("{}/v2/", fleet.prefix));
    let out = support::finish(deploy);
    out.fails(
        2,
        &["v2 was removed from the tree meanwhile", "go back to v1"],
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "waited its timeout: {:?}",
        started.elapsed()
    );
    // The plan went with it: status offers nothing to resume, and every
    // node runs v1 again.
    let status = fleet.depro(&["status"]);
    assert!(!status.ok().contains("resume:"), "{status:#?}");
    assert_eq!(
        fleet.consul.get(&format!("{}/.rollout", fleet.prefix)),
        None
    );
    fleet.wait("every node back on v1", |f| {
        f.agents
            .iter()
            .all(|a| a.live("api").as_deref() == Some("v1"))
    });
}

/// Issue 20: a prefix that agents follow but that has no version yet was
/// "nothing under …" (exit 2), as if no fleet were there.
#[test]
fn status_of_a_prefix_with_agents_and_no_version_yet_lists_the_agents() {
    let fleet = Fleet::start(2);
    fleet.wait("both agents announced", |f| {
        (1..=2).all(|i| {
            f.consul
                .get(&format!("{}/.agents/node{i}", f.prefix))
                .is_some()
        })
    });
    let status = fleet.depro(&["status"]).ok().to_string();
    assert!(
        status.contains("node1") && status.contains("node2"),
        "{status}"
    );
    assert!(
        status.contains("no version yet; 2 agents follow the prefix"),
        "{status}"
    );
    // The scout's lock is depro's own key, not a name to ignore.
    assert!(!status.contains("ignored"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    assert!(json["agents"]["node1"].is_object(), "{json}");
    assert_eq!(json["versions"], serde_json::json!([]), "{json}");
}

// ------------------------------------------------------- the rollout policy

/// Issue 20: the rollout policy lived only in each command's flags, so a
/// plain deploy (a script, a pasted hint) switched every node at once.
#[test]
fn a_policy_in_the_tree_is_followed_by_every_switch_and_a_command_s_own_flags_override_it() {
    let fleet = Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    let out = fleet.depro(&[
        "policy",
        "-nodes=all",
        "-canary=1",
        "-batch=1",
        "-message=canary first",
    ]);
    assert!(
        out.result()
            .contains("rollout policy -nodes=all -canary=1 -batch=1 (was: none)"),
        "{out:#?}"
    );
    let shown = fleet.depro(&["policy"]);
    assert!(
        shown
            .result()
            .contains("rollout policy -nodes=all -canary=1 -batch=1 (set by "),
        "{shown:#?}"
    );

    // A plain deploy follows it, and says so.
    let out = fleet.depro(&["deploy", "v2"]);
    let text = out.ok();
    assert!(
        text.contains("): -nodes=all -canary=1 -batch=1\n"),
        "{out:#?}"
    );
    assert!(text.contains("rolling out v2 in 3 waves"), "{out:#?}");
    fleet.expect_active("v2");

    // The dry run plans the same waves; the command's own flags hold for
    // it: -canary=0 -batch=0 switch every node at once.
    fleet.depro(&["deploy", "v3", "-no-rollout"]).ok();
    let dry = fleet.depro(&["rollout", "v3", "-dry-run"]);
    assert!(dry.ok().contains("would roll out in waves"), "{dry:#?}");
    let out = fleet.depro(&["rollout", "v3", "-canary=0", "-batch=0"]);
    let text = out.ok();
    assert!(
        text.contains("): -nodes=all; this command's own: -canary=0 -batch=0"),
        "{out:#?}"
    );
    assert!(!text.contains("waves"), "{out:#?}");
    assert_eq!(fleet.current().as_deref(), Some("v3"));

    // history and status show it.
    let history = fleet.depro(&["history"]);
    let history = history.result();
    assert!(
        history.contains("POLICY") && history.contains("-nodes=all -canary=1 -batch=1"),
        "{history}"
    );
    assert!(history.contains("canary first"), "{history}");
    let status = fleet.depro(&["status"]);
    assert!(
        status
            .result()
            .contains("rollout policy: -nodes=all -canary=1 -batch=1 (by "),
        "{status:#?}"
    );

    // Cleared: a plain deploy switches at once again.
    let out = fleet.depro(&["policy", "-clear"]);
    assert!(
        out.result()
            .contains("rollout policy cleared (was: -nodes=all"),
        "{out:#?}"
    );
    let out = fleet.depro(&["deploy", "v4", "-nodes=3"]);
    assert!(
        !out.ok().contains("waves") && !out.ok().contains("policy of"),
        "{out:#?}"
    );

    // A policy depro cannot read (written by hand) is refused, named.
    fleet.consul.put(
        &format!("{}/.policy", fleet.prefix),
        r#"{"flags": "-canary=x"}"#,
    );
    fleet
        .depro(&["deploy", "v5"])
        .fails(2, &[".policy holds a policy depro cannot read", "-canary"]);
    assert!(fleet.consul.get(&format!("{}/v5/", fleet.prefix)).is_none());
}
