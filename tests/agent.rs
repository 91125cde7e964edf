//! The agent against a real Consul: each test names the behaviour it checks.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::{Agent, Consul, Fleet, wait_for};

#[test]
fn a_fresh_deploy_reaches_every_agent_and_current_goes_live() {
    let fleet = Fleet::start(3);
    fleet.add_version("v1");
    fleet.expect_state("v1", "ready");
    for agent in &fleet.agents {
        assert_eq!(agent.live("api"), None, "rolled out before current was set");
    }
    fleet.set_current("v1");
    fleet.expect_active("v1");
    for agent in &fleet.agents {
        let version =
            std::fs::read_to_string(agent.deployment_path("api").join("v1/version.txt")).unwrap();
        assert_eq!(version.trim(), "v1");
        let local = std::fs::read_to_string(agent.deployment_path("api").join("current")).unwrap();
        assert_eq!(
            local.trim(),
            "v1",
            "the local version file follows the rollout"
        );
        // Hooks ran in order: deploy (in the version's directory), then rollout.
        let log = agent.hooks_log();
        assert!(
            log[0].starts_with("deploy v1 ") && log[0].ends_with("/api/v1"),
            "{log:?}"
        );
        assert_eq!(log[1], "deployed v1");
        assert_eq!(log[2], "rollout v1 from=");
        // The hook environment.
        let env = std::fs::read_to_string(agent.dir.join("env-deploy-v1")).unwrap();
        let path = agent.deployment_path("api");
        for expected in [
            "VERSION=v1".to_string(),
            "DEPLOYMENT_ID=api".to_string(),
            format!("DEPLOYMENT_PATH={}", path.display()),
            format!("DEPLOYMENT_PREFIX={}", fleet.prefix),
            format!("AGENT_NAME={}", agent.name),
            format!("VERSION_PATH={}", path.join("v1").display()),
        ] {
            assert!(
                env.lines().any(|l| l == expected),
                "{expected} missing from {env}"
            );
        }
    }
}

#[test]
fn a_second_version_is_staged_then_switched_and_the_first_goes_back_to_ready() {
    let fleet = Fleet::start(3);
    fleet.add_version("v1");
    fleet.set_current("v1");
    fleet.expect_active("v1");
    fleet.add_version("v2");
    fleet.expect_state("v2", "ready");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    fleet.expect_state("v1", "ready");
    for agent in &fleet.agents {
        assert!(
            agent
                .hooks_log()
                .contains(&"rollout v2 from=v1".to_string())
        );
        assert_eq!(agent.version_dirs("api"), ["v1", "v2"]);
    }
}

#[test]
fn a_late_joiner_bootstraps_itself_to_current() {
    let mut fleet = Fleet::start(2);
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    fleet.join("late");
    fleet.expect_active("v2");
    // Current first, then the rest: v1 may still be deploying when v2 is
    // active on the new node.
    fleet.expect_state("v1", "ready");
    let late = fleet.agents.last().unwrap();
    assert_eq!(
        late.version_dirs("api"),
        ["v1", "v2"],
        "it has every version in the tree"
    );
    let log = late.hooks_log();
    assert!(
        log[0].starts_with("deploy v2 "),
        "current is deployed first: {log:?}"
    );
}

#[test]
fn removing_a_version_cleans_its_directories_and_keys_on_every_node() {
    let fleet = Fleet::start(3);
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    fleet.expect_state("v1", "ready");
    fleet.remove_version("v1");
    fleet.expect_gone("v1");
    let tree = fleet.consul.tree(&format!("{}/", fleet.prefix));
    assert!(tree.keys().all(|k| !k.contains("/v1/")), "{tree:?}");
    for agent in &fleet.agents {
        assert!(agent.hooks_log().contains(&"clean v1".to_string()));
        assert_eq!(agent.version_dirs("api"), ["v2"]);
    }
}

#[test]
fn the_running_version_is_kept_until_another_one_is_rolled_out_even_when_its_key_is_gone() {
    let fleet = Fleet::start(1);
    let agent = &fleet.agents[0];
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v1");
    fleet.expect_active("v1");
    // v2's rollout fails here, so this node keeps running v1...
    agent.set_flag("fail-rollout", true);
    fleet.set_current("v2");
    fleet.expect_state("v2", "failed");
    // ...and v1 is removed from the tree: it must stay, since it runs.
    fleet.remove_version("v1");
    wait_for("the agent to see v1's removal", || {
        agent
            .log()
            .contains("api v1: its key is gone from the tree")
    });
    // One more change to be sure a whole reconcile pass ran after it.
    fleet.add_version("v3");
    fleet.expect_state("v3", "ready");
    assert!(agent.deployment_path("api").join("v1").exists());
    assert_eq!(agent.live("api").as_deref(), Some("v1"));
    assert!(!agent.hooks_log().contains(&"clean v1".to_string()));
    // Once v2 is rolled out (the operator retries), v1 goes.
    agent.set_flag("fail-rollout", false);
    fleet.consul.delete(&format!("{}/v2/node1", fleet.prefix));
    fleet.expect_active("v2");
    fleet.expect_gone("v1");
}

#[test]
fn current_without_its_folder_key_is_repaired_by_the_nodes_that_have_it() {
    // The folder key is deleted by hand, without ringing the doorbell: the
    // agents find out at their next whole read, every rescan_interval.
    let mut fleet = Fleet::new(2);
    for agent in &mut fleet.agents {
        agent.extra = serde_json::json!({ "rescan_interval": "1s" });
    }
    fleet.start_all();
    fleet.add_version("v1");
    fleet.set_current("v1");
    fleet.expect_active("v1");
    let folder = format!("{}/v1/", fleet.prefix);
    fleet.consul.delete(&folder);
    fleet.wait("the folder key re-created", |f| {
        f.consul.get(&folder).is_some()
    });
    fleet.expect_active("v1");
    for agent in &fleet.agents {
        assert!(!agent.hooks_log().contains(&"clean v1".to_string()));
    }
}

#[test]
fn current_is_never_rolled_out_where_the_deploy_hook_failed() {
    let fleet = Fleet::start(3);
    fleet.add_version("v1");
    fleet.set_current("v1");
    fleet.expect_active("v1");
    fleet.agents[1].set_flag("fail-deploy", true);
    fleet.add_version("v2");
    fleet.wait("node2 failed, others ready", |f| {
        f.node_state("v2", "node2").as_deref() == Some("failed")
            && f.node_state("v2", "node1").as_deref() == Some("ready")
            && f.node_state("v2", "node3").as_deref() == Some("ready")
    });
    fleet.set_current("v2");
    fleet.wait("v2 active on node1 and node3", |f| {
        f.node_state("v2", "node1").as_deref() == Some("active")
            && f.node_state("v2", "node3").as_deref() == Some("active")
    });
    let broken = &fleet.agents[1];
    assert_eq!(
        broken.live("api").as_deref(),
        Some("v1"),
        "node2 keeps running v1"
    );
    assert_eq!(fleet.node_state("v1", "node2").as_deref(), Some("active"));
    assert_eq!(fleet.node_state("v2", "node2").as_deref(), Some("failed"));
    assert!(
        !broken
            .hooks_log()
            .iter()
            .any(|l| l.starts_with("rollout v2"))
    );
    assert!(
        broken
            .log()
            .contains("the deploy hook exited with status 3"),
        "{}",
        broken.log()
    );
}

#[test]
fn deleting_a_failed_key_makes_the_agent_retry() {
    let fleet = Fleet::start(1);
    let agent = &fleet.agents[0];
    agent.set_flag("fail-deploy", true);
    fleet.add_version("v1");
    fleet.set_current("v1");
    fleet.expect_state("v1", "failed");
    agent.set_flag("fail-deploy", false);
    fleet.consul.delete(&format!("{}/v1/node1", fleet.prefix));
    fleet.expect_active("v1");
    let deploys = agent
        .hooks_log()
        .iter()
        .filter(|l| l.starts_with("deploy v1"))
        .count();
    assert_eq!(deploys, 2);
}

#[test]
fn a_failed_rollout_is_reported_and_rolling_back_restores_the_old_version() {
    let fleet = Fleet::start(1);
    let agent = &fleet.agents[0];
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v1");
    fleet.expect_active("v1");
    agent.set_flag("fail-rollout", true);
    fleet.set_current("v2");
    fleet.expect_state("v2", "failed");
    agent.set_flag("fail-rollout", false);
    fleet.set_current("v1");
    fleet.wait("v1 rolled out again", |_| {
        agent
            .hooks_log()
            .iter()
            .filter(|l| l.starts_with("rollout v1"))
            .count()
            == 2
    });
    fleet.expect_active("v1");
    // The failure sticks (current cannot be moved back to v2 by accident)...
    assert_eq!(fleet.node_state("v2", "node1").as_deref(), Some("failed"));
    // ...until an operator deletes the failed key: then v2 is ready again,
    // and rolled out once it is current.
    fleet.consul.delete(&format!("{}/v2/node1", fleet.prefix));
    fleet.expect_state("v2", "ready");
    fleet.set_current("v2");
    fleet.expect_active("v2");
}

#[test]
fn kill_9_during_a_deploy_hook_then_restart_converges_without_a_half_deployed_version() {
    let mut fleet = Fleet::start(2);
    fleet.agents[0].set_flag("block-deploy", true);
    fleet.add_version("v1");
    fleet.set_current("v1");
    let pid_file = fleet.agents[0].dir.join("hook.pid");
    let orphan = support::pid_written(&pid_file);
    assert_eq!(fleet.node_state("v1", "node1").as_deref(), Some("busy"));
    fleet.agents[0].kill9();
    std::fs::remove_file(&pid_file).unwrap();

    fleet.agents[0].start();
    // The restarted agent kills the hook its predecessor left running...
    wait_for("the orphaned hook to be killed", || {
        !std::path::Path::new(&format!("/proc/{orphan}")).exists()
            || std::fs::read_to_string(format!("/proc/{orphan}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    // ...and deploys afresh, never reporting the half-deployed attempt ready.
    wait_for("the second attempt to start", || pid_file.exists());
    assert_eq!(fleet.node_state("v1", "node1").as_deref(), Some("busy"));
    assert_eq!(fleet.agents[0].live("api"), None);
    fleet.agents[0].set_flag("release", true);
    fleet.expect_active("v1");
    let deploys = fleet.agents[0]
        .hooks_log()
        .iter()
        .filter(|l| l.starts_with("deploy v1"))
        .count();
    assert_eq!(deploys, 2, "deployed again from scratch");
}

#[test]
fn consul_killed_and_restarted_while_agents_run_converges_after() {
    let consul = Consul::start();
    let mut fleet = Fleet::on(&consul, 3);
    fleet.start_all();
    fleet.add_version("v1");
    fleet.set_current("v1");
    fleet.expect_active("v1");

    // Dev mode: the restart loses every key and session, and indexes go back.
    consul.kill();
    for agent in &mut fleet.agents {
        assert!(
            agent.is_running(),
            "{} exited while Consul was down",
            agent.name
        );
        assert_eq!(agent.live("api").as_deref(), Some("v1"), "keeps running v1");
    }
    consul.restart();

    // Only `current` is written again: agents that have it re-create its
    // folder key and register themselves (the repair rule).
    fleet.set_current("v1");
    fleet.expect_active("v1");
    assert_eq!(
        fleet
            .consul
            .get(&format!("{}/v1/", fleet.prefix))
            .as_deref(),
        Some("")
    );
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    for agent in &mut fleet.agents {
        assert!(agent.is_running());
        // Logged once per change of state (the repeats are debug lines).
        let log = agent.log();
        let warnings = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("is unreachable while"))
            .count();
        assert!(
            (1..=2).contains(&warnings),
            "outage logged {warnings} times by {}: {log}",
            agent.name
        );
    }
}

#[test]
fn a_hook_that_outlives_its_timeout_is_killed_with_its_process_group() {
    let fleet = Fleet::new(1);
    let mut fleet = fleet;
    let agent = &mut fleet.agents[0];
    agent.deployments[0]["timeout"] = "1s".into();
    agent.deployments[0]["deploy"] = serde_json::json!([format!(
        "sleep 60 & echo $! > {}/sleeper.pid; wait",
        agent.dir.display()
    )]);
    agent.start();
    fleet.add_version("v1");
    fleet.expect_state("v1", "failed");
    let agent = &fleet.agents[0];
    assert!(
        agent.log().contains("timed out after 1s"),
        "{}",
        agent.log()
    );
    let sleeper = std::fs::read_to_string(agent.dir.join("sleeper.pid")).unwrap();
    wait_for("the hook's child to be gone", || {
        !std::path::Path::new(&format!("/proc/{}", sleeper.trim())).exists()
    });
}

#[test]
fn sigterm_lets_a_running_hook_finish_then_exits_cleanly() {
    let mut fleet = Fleet::start(1);
    fleet.agents[0].set_flag("block-deploy", true);
    fleet.add_version("v1");
    let pid_file = fleet.agents[0].dir.join("hook.pid");
    wait_for("the deploy hook to start", || pid_file.exists());
    fleet.agents[0].signal(Signal::SIGTERM);
    wait_for("the agent to acknowledge", || {
        fleet.agents[0]
            .log()
            .contains("letting the running deploy hook finish")
    });
    assert!(
        fleet.agents[0].is_running(),
        "exited before the hook finished"
    );
    fleet.agents[0].set_flag("release", true);
    assert_eq!(fleet.agents[0].wait_exit(), Some(0));
    let agent = &fleet.agents[0];
    assert!(agent.log().contains("api v1: deployed"), "{}", agent.log());
    assert_eq!(
        fleet.node_state("v1", "node1"),
        None,
        "session destroyed, key gone"
    );
    // The finished deploy counts after a restart: no second deploy.
    fleet.agents[0].set_flag("block-deploy", false);
    fleet.agents[0].start();
    fleet.expect_state("v1", "ready");
    assert_eq!(
        fleet.agents[0]
            .hooks_log()
            .iter()
            .filter(|l| l.starts_with("deploy v1"))
            .count(),
        1
    );
}

#[test]
fn sigterm_kills_a_hook_that_outlives_the_grace_period() {
    let mut fleet = Fleet::new(1);
    fleet.agents[0].extra = serde_json::json!({"shutdown_grace": "500ms"});
    fleet.agents[0].set_flag("block-deploy", true);
    fleet.start_all();
    fleet.add_version("v1");
    let pid_file = fleet.agents[0].dir.join("hook.pid");
    let hook = support::pid_written(&pid_file);
    fleet.agents[0].signal(Signal::SIGTERM);
    assert_eq!(fleet.agents[0].wait_exit(), Some(0));
    assert!(
        !std::path::Path::new(&format!("/proc/{hook}")).exists(),
        "the hook survived"
    );
    assert!(fleet.agents[0].log().contains("grace period is over"));
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut fleet = Fleet::start(1);
    fleet.agents[0].set_flag("block-deploy", true);
    fleet.add_version("v1");
    let pid_file = fleet.agents[0].dir.join("hook.pid");
    wait_for("the deploy hook to start", || pid_file.exists());
    fleet.agents[0].signal(Signal::SIGINT);
    wait_for("the agent to acknowledge", || {
        fleet.agents[0].log().contains("letting the running")
    });
    fleet.agents[0].signal(Signal::SIGINT);
    assert_eq!(fleet.agents[0].wait_exit(), Some(130));
}

#[test]
fn hostile_version_keys_are_ignored_with_one_warning_and_touch_nothing_outside() {
    let fleet = Fleet::start(1);
    let consul = fleet.consul;
    let p = &fleet.prefix;
    for hostile in [
        "../../etc/",
        "../escape",
        ".hidden/",
        "-rf/",
        "a b/",
        "x;reboot/",
    ] {
        consul.put_verbatim(&format!("{p}/{hostile}"), "");
    }
    consul.put_verbatim(&format!("{p}/current"), "../../etc");
    fleet.add_version("v1");
    fleet.expect_state("v1", "ready");
    // More writes under the prefix: still one warning per name.
    fleet.add_version("v2");
    fleet.expect_state("v2", "ready");
    let agent = &fleet.agents[0];
    // current's watch sees it on its own schedule (paced while the key did
    // not exist and other writes woke it).
    wait_for("the invalid current to be noticed", || {
        agent.log().contains("current = \"../../etc\"")
    });
    let log = agent.log();
    // One level down, `../../etc/` and `../escape` are both the name `..`.
    for name in ["../", ".hidden/", "-rf/", "a b/", "x;reboot/"] {
        let warnings = log.matches(&format!("ignoring {name:?}")).count();
        assert_eq!(warnings, 1, "{name}: {log}");
    }
    assert_eq!(log.matches("current = \"../../etc\"").count(), 1, "{log}");
    assert_eq!(log.matches("ignoring ").count(), 6, "{log}");
    assert_eq!(agent.version_dirs("api"), ["v1", "v2"]);
    assert_eq!(
        agent.live("api"),
        None,
        "an invalid current is not rolled out"
    );
    let outside: Vec<_> = std::fs::read_dir(&agent.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !outside.iter().any(|n| n == "etc" || n == "escape"),
        "{outside:?}"
    );
}

#[test]
fn two_deployments_in_one_agent_both_react_promptly() {
    let root = tempfile::tempdir().unwrap();
    let consul = Consul::shared();
    let api = support::unique_prefix("api");
    let web = support::unique_prefix("web");
    let mut agent = Agent::new(root.path(), "both", &consul.addr(), &api);
    agent
        .deployments
        .push(support::default_deployment("web", &agent.dir, &web));
    agent.start();
    wait_for("the agent to register", || {
        agent.log().contains("registered with Consul")
    });
    // Alternate changes between the prefixes: each is acted on while the
    // other prefix's blocking queries are still waiting. The versions are
    // created as a tool that does not ring the doorbell would: setting
    // `current` to a version the agent has not seen makes it read the tree.
    for (i, prefix) in [&web, &api, &web, &api].iter().enumerate() {
        let version = format!("v{i}");
        consul.put(&format!("{prefix}/{version}/"), "");
        consul.put(&format!("{prefix}/current"), &version);
        let key = format!("{prefix}/{version}/both");
        support::wait_for_within(
            Duration::from_secs(10),
            &format!("{key} active"),
            &mut || consul.get(&key).as_deref() == Some("active"),
            || agent.log(),
        );
    }
}

#[test]
fn the_first_switch_under_a_fresh_prefix_is_rolled_out_at_once_after_a_burst_of_node_writes() {
    // A Consul of its own. Before the first switch `current` does not
    // exist, and Consul wakes a query on a missing key at every write
    // anywhere: the nodes' busy and ready writes wake every agent's watch
    // of `current` with nothing new, and such wake-ups are paced (one per
    // five seconds after a burst). The switch itself must not wait behind
    // that pacing.
    let consul = Consul::start();
    let mut fleet = Fleet::on(&consul, 3);
    fleet.start_all();
    for agent in &fleet.agents {
        wait_for("the agent to register", || {
            agent.log().contains("registered with Consul")
        });
    }
    let mut child = fleet
        .depro_command(&["deploy", "v1", "-nodes=3"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let progress = std::io::BufReader::new(child.stderr.take().unwrap());
    let (mut switched, mut active) = (None, None);
    let mut seen = Vec::new();
    for line in std::io::BufRead::lines(progress) {
        let line = line.unwrap();
        let text = support::without_elapsed(&line);
        if text.starts_with("current: unset -> v1") {
            switched = Some(Instant::now());
        }
        if text == "3/3 active" {
            active = Some(Instant::now());
        }
        seen.push(line);
    }
    assert!(child.wait().unwrap().success(), "{seen:#?}");
    let (switched, active) = (switched.expect("no switch"), active.expect("not active"));
    let took = active - switched;
    assert!(
        took < Duration::from_secs(3),
        "the rollout came {took:?} after the switch (the pacing of idle wake-ups is 5 s)\n{seen:#?}\n{}",
        fleet.diagnostics()
    );
}

#[test]
fn a_lost_session_is_replaced_and_every_version_registered_again() {
    let fleet = Fleet::start(2);
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    fleet.expect_state("v1", "ready");
    let prefix = format!("{}/", fleet.prefix);
    let before = fleet.consul.tree(&prefix);
    let old_sessions = fleet.consul.sessions_under(&prefix);
    assert_eq!(old_sessions.len(), 2);
    // Expire this fleet's sessions: every node key goes with them.
    for id in &old_sessions {
        fleet.consul.destroy_session(id);
    }
    fleet.wait("every node key held by a new session", |f| {
        let now = f.consul.sessions_under(&prefix);
        now.len() == 2 && now.is_disjoint(&old_sessions)
    });
    fleet.expect_active("v2");
    fleet.expect_state("v1", "ready");
    let after = fleet.consul.tree(&prefix);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    assert!(
        after
            .iter()
            // Node keys and announcements (what an agent remembers of
            // itself under .known/ is not held: it outlives the agent).
            .filter(|(k, _)| k.contains("/node") && !k.contains("/.known/"))
            .all(|(_, (_, held))| *held)
    );
    for agent in &fleet.agents {
        wait_for("the loss to be logged", || {
            agent.log().contains("session expired or was lost")
        });
    }
}

#[test]
fn sighup_picks_up_a_new_deployment_and_keeps_the_old_config_when_the_new_one_is_bad() {
    let root = tempfile::tempdir().unwrap();
    let consul = Consul::shared();
    let api = support::unique_prefix("api");
    let web = support::unique_prefix("web");
    let mut agent = Agent::new(root.path(), "reloader", &consul.addr(), &api);
    agent.start();
    consul.add_version(&api, "v1");
    let api_key = format!("{api}/v1/reloader");
    wait_for("api v1 ready", || {
        consul.get(&api_key).as_deref() == Some("ready")
    });

    // A broken config is refused and the agent carries on.
    std::fs::write(agent.dir.join("conf/depro.json"), "{ \"name\": ").unwrap();
    agent.signal(Signal::SIGHUP);
    wait_for("the reload error", || {
        agent.log().contains("keeping the running configuration")
    });
    assert!(agent.is_running());
    consul.add_version(&api, "v2");
    wait_for("api v2 ready under the old config", || {
        consul.get(&format!("{api}/v2/reloader")).as_deref() == Some("ready")
    });

    // A good config with a second deployment is applied.
    agent
        .deployments
        .push(support::default_deployment("web", &agent.dir, &web));
    agent.write_config();
    agent.signal(Signal::SIGHUP);
    consul.add_version(&web, "w1");
    wait_for("web w1 ready after the reload", || {
        consul.get(&format!("{web}/w1/reloader")).as_deref() == Some("ready")
    });
    wait_for("api keys registered again", || {
        consul.get(&api_key).as_deref() == Some("ready")
    });
}

#[test]
fn an_agent_without_deployments_idles_and_starts_working_on_reload() {
    let root = tempfile::tempdir().unwrap();
    let consul = Consul::shared();
    let prefix = support::unique_prefix("idle");
    let mut agent = Agent::new(root.path(), "idler", &consul.addr(), &prefix);
    let deployment = agent.deployments.pop().unwrap();
    agent.start();
    wait_for("the idle message", || {
        agent.log().contains("is idle: no deployments configured")
    });
    assert!(agent.is_running());
    agent.deployments.push(deployment);
    agent.write_config();
    agent.signal(Signal::SIGHUP);
    consul.add_version(&prefix, "v1");
    wait_for("v1 ready after the reload", || {
        consul.get(&format!("{prefix}/v1/idler")).as_deref() == Some("ready")
    });
}

#[test]
fn the_seed_config_runs_verbatim() {
    // The seed's example config, with the one fix the issue allows (the comma),
    // run as `depro agent -config-dir=<dir>/`. Its server is pointed at the
    // test's Consul through CONSUL_HTTP_ADDR (the environment beats files).
    // Its paths are the seed's own, /data/deploy/{api,website}: this test
    // needs root, as the agent would.
    let consul = Consul::start();
    let conf = tempfile::tempdir().unwrap();
    let seed = include_str!("data/seed-config.json");
    std::fs::write(conf.path().join("depro.json"), seed).unwrap();
    let created: Vec<&str> = ["/data/deploy/api", "/data/deploy/website"]
        .into_iter()
        .filter(|p| !std::path::Path::new(p).exists())
        .collect();
    let log = conf.path().join("agent.log");
    let mut child = std::process::Command::new(support::depro_bin())
        .arg("agent")
        .arg(format!("-config-dir={}/", conf.path().display()))
        .env("CONSUL_HTTP_ADDR", consul.addr())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    consul.add_version("api/version", "v1");
    consul.add_version("website/version", "v1");
    // No artifact server here: both deploys run their hooks and fail cleanly.
    for prefix in ["api/version", "website/version"] {
        let key = format!("{prefix}/v1/workerNode1");
        support::wait_for_within(
            support::PATIENCE,
            &format!("{key} failed"),
            &mut || consul.get(&key).as_deref() == Some("failed"),
            read_log,
        );
    }
    assert!(
        read_log().contains("follows api, website"),
        "{}",
        read_log()
    );
    assert!(std::path::Path::new("/data/deploy/api/.depro/versions/v1").exists());
    child.kill().unwrap();
    child.wait().unwrap();
    for path in created {
        std::fs::remove_dir_all(path).unwrap();
    }
}

/// The agent's threads and its open sockets (TCP connections to Consul).
fn threads_and_sockets(pid: i32) -> (usize, usize) {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    let sockets = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count();
    (threads, sockets)
}

#[test]
fn an_agent_with_hundreds_of_versions_keeps_the_threads_and_connections_it_has_with_one() {
    let mut fleet = Fleet::new(1);
    fleet.agents[0].deployments[0]["deploy"] = serde_json::json!(["true"]);
    fleet.agents[0].deployments[0]["rollout"] = serde_json::json!(["true"]);
    fleet.start_all();
    fleet.add_version("v0");
    fleet.expect_state("v0", "ready");
    let pid = fleet.agents[0].pid();
    let (threads, sockets) = threads_and_sockets(pid);
    assert!(threads <= 8, "{threads} threads with one version");
    // 300 versions, created in a few transactions.
    let p = fleet.prefix.clone();
    for chunk in (1..=300).collect::<Vec<_>>().chunks(60) {
        let ops: Vec<serde_json::Value> = chunk
            .iter()
            .map(|i| serde_json::json!({"KV": {"Verb": "set", "Key": format!("{p}/v{i}/"), "Value": ""}}))
            .collect();
        fleet.consul.call(
            "PUT",
            "txn",
            Some(serde_json::to_string(&ops).unwrap().as_bytes()),
        );
    }
    fleet.consul.ring(&p);
    // All of them (no hook still running, with its output reader thread).
    fleet.wait_within(Duration::from_secs(120), "300 versions ready", |f| {
        let tree = f.consul.tree(&format!("{p}/"));
        let ready = tree
            .iter()
            .filter(|(k, (v, _))| k.ends_with("/node1") && (v == "ready" || v == "active"))
            .count();
        ready == 301
    });
    let (threads_after, sockets_after) = threads_and_sockets(pid);
    assert!(
        threads_after <= threads,
        "threads grew with the versions: {threads} -> {threads_after}"
    );
    assert!(
        sockets_after <= sockets + 2,
        "connections grew with the versions: {sockets} -> {sockets_after}"
    );
    // Its session renewals never starve behind its watches: for more than
    // twice the session's TTL (10 s), the same session holds its keys.
    let session = fleet.session_of("v0", "node1").expect("v0's key is held");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(25) {
        let now = fleet.session_of("v0", "node1");
        assert_eq!(
            now.as_ref(),
            Some(&session),
            "the session changed or was lost\n{}",
            fleet.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !fleet.agents[0]
            .log()
            .contains("session expired or was lost")
    );
}

#[test]
fn a_deployment_removed_by_a_reload_ends_its_watches_and_connections_at_once() {
    // A Consul of its own, so that no other test's write wakes a query.
    let consul = Consul::start();
    let root = tempfile::tempdir().unwrap();
    let api = support::unique_prefix("api");
    let web = support::unique_prefix("web");
    // Under web there is nothing this agent acts on or writes: its watches
    // sit in their blocking queries until something changes there.
    consul.put(&format!("{web}/.readme"), "no versions yet");
    let mut agent = Agent::new(root.path(), "both", &consul.addr(), &api);
    agent
        .deployments
        .push(support::default_deployment("web", &agent.dir, &web));
    agent.start();
    consul.add_version(&api, "v1");
    wait_for("api v1 ready", || {
        consul.get(&format!("{api}/v1/both")).as_deref() == Some("ready")
    });
    let pid = agent.pid();
    let (threads, sockets) = threads_and_sockets(pid);
    agent.deployments.pop();
    agent.write_config();
    agent.signal(Signal::SIGHUP);
    // web's watches wait in queries that would return only after their
    // wait (a minute): they end now, with their connections.
    support::wait_for_within(
        Duration::from_secs(5),
        "web's watch threads and connections to go",
        &mut || {
            let (t, s) = threads_and_sockets(pid);
            // Its two watches: the tree's and current's.
            t <= threads - 2 && s <= sockets - 2
        },
        || {
            format!(
                "{:?} then {:?}\n{}",
                (threads, sockets),
                threads_and_sockets(pid),
                agent.log()
            )
        },
    );
}

#[test]
fn other_nodes_writes_during_deploys_cost_an_agent_no_walk_of_the_prefix() {
    // Every node's state writes land under the prefix. An agent reads the
    // tree whole (a listing, which costs the server a walk over every key
    // under the prefix) only when it starts, misses a ring, or rescans; a
    // deploy by the CLI costs each agent the same few requests however
    // many nodes write. node1 talks to Consul through a proxy that counts.
    let consul = Consul::start();
    let proxy = support::proxy::Proxy::start(&consul.addr());
    let mut fleet = Fleet::on(&consul, 4);
    fleet.agents[0].server = proxy.addr();
    // node1 is not the scout (the one agent that reads the prefix for other
    // clients' changes, tests/seed.rs): the others start first and one of
    // them takes the scout's lock.
    for agent in &mut fleet.agents[1..] {
        agent.start();
    }
    let scout = format!("{}/.scout", fleet.prefix);
    wait_for("a scout", || consul.get(&scout).is_some());
    fleet.agents[0].start();
    fleet.depro(&["deploy", "v1", "-nodes=4"]).ok();
    let before = proxy.log().len();
    for version in ["v2", "v3", "v4"] {
        fleet.depro(&["deploy", version, "-nodes=4"]).ok();
    }
    let during = proxy.log()[before..].to_vec();
    let listings: Vec<&String> = during.iter().filter(|r| r.contains("keys")).collect();
    assert!(listings.is_empty(), "listings during deploys: {during:#?}");
    // Per deploy: two rings heard, `current` read once, three node writes
    // (busy, ready, then active with the old version ready), a session
    // renewal now and then.
    assert!(
        during.len() <= 3 * 8,
        "{} requests for 3 deploys: {during:#?}",
        during.len()
    );
}

#[test]
fn an_agent_that_crash_restarts_never_locks_its_host_out_of_consul_under_default_limits() {
    // Consul's default limits: 200 HTTP connections per client address. A
    // query that a killed agent left waiting stays on the server until its
    // wait runs out, so each start costs what its watches hold then. With
    // one watch per version, 20 versions and 9 quick restarts locked every
    // client of the host (agent, CLI, curl) out of Consul.
    let consul = Consul::start_with_default_limits();
    let mut fleet = Fleet::on(&consul, 1);
    fleet.agents[0].deployments[0]["deploy"] = serde_json::json!(["true"]);
    fleet.agents[0].deployments[0]["rollout"] = serde_json::json!(["true"]);
    fleet.start_all();
    for i in 0..20 {
        fleet.add_version(&format!("v{i}"));
    }
    fleet.set_current("v0");
    fleet.expect_state("v0", "active");
    fleet.expect_state("v19", "ready");
    let registered = |agent: &Agent| agent.log().matches("registered with Consul").count();
    for restart in 1..=15 {
        let agent = &mut fleet.agents[0];
        agent.kill9();
        agent.start();
        wait_for("the agent to register again", || {
            registered(&fleet.agents[0]) > restart
        });
    }
    // The CLI still reaches Consul from this address, and the agent still
    // follows a deploy.
    fleet.depro(&["deploy", "v20", "-nodes=1"]).ok();
    fleet.expect_state("v20", "active");
}

#[test]
fn a_crash_loop_of_a_hundred_quick_restarts_never_locks_the_host_out_of_consul() {
    // Under Consul's default limits (200 connections per client address).
    // Each start leaves its blocking queries held on the server when it is
    // killed: for their whole wait (a minute) they would add up to the
    // limit within about 100 restarts at four a second; a first wait of a
    // few seconds keeps them to a few dozen.
    let consul = Consul::start_with_default_limits();
    let mut fleet = Fleet::on(&consul, 1);
    fleet.start_all();
    fleet.depro(&["deploy", "v1", "-nodes=1"]).ok();
    let registered = |agent: &Agent| agent.log().matches("registered with Consul").count();
    for restart in 1..=100 {
        let paced = Instant::now() + Duration::from_millis(250);
        let agent = &mut fleet.agents[0];
        agent.kill9();
        agent.start();
        wait_for("the agent to register again", || {
            registered(&fleet.agents[0]) > restart
        });
        // Its watches are in their blocking queries.
        wait_for("the agent's watches to read the tree", || {
            fleet.agents[0].log().matches("read the tree whole").count() > restart
        });
        // A crash loop's pace (systemd's RestartSec=100ms and a start).
        std::thread::sleep(paced.saturating_duration_since(Instant::now()));
    }
    // The CLI still reaches Consul from this address, and the agent still
    // follows a deploy.
    fleet.depro(&["deploy", "v2", "-nodes=1"]).ok();
    fleet.expect_state("v2", "active");
}
