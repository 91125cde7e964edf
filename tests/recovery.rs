//! The agent when Consul loses, restores or replaces its data, and when its
//! view of the tree lags: each test reproduces a break that was found and
//! is named after what must hold instead.

mod support;

use std::time::{Duration, Instant};

use support::proxy::{Action, Match, Proxy};
use support::{Consul, Fleet, wait_for};

/// Polls for `window` that `condition` keeps holding (for "never" claims:
/// nothing to wait for, only a span to watch).
fn holds_for(window: Duration, what: &str, mut condition: impl FnMut() -> Option<String>) {
    let start = Instant::now();
    while start.elapsed() < window {
        if let Some(broken) = condition() {
            panic!("{what} broke after {:?}: {broken}", start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Consul whose index is far above what a fresh one starts from.
fn long_lived_consul() -> Consul {
    let consul = Consul::start();
    consul.pump_index(400);
    assert!(consul.index() > 400);
    consul
}

#[test]
fn after_consul_restarts_with_a_lower_index_the_fleet_follows_a_new_deploy_within_seconds() {
    let consul = long_lived_consul();
    let mut fleet = Fleet::on(&consul, 2);
    fleet.start_all();
    fleet.add_version("v1");
    fleet.set_current("v1");
    fleet.expect_active("v1");
    // Consul comes back without its data: its index starts low again.
    consul.restart();
    assert!(consul.index() < 100);
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
}

#[test]
fn after_consul_lost_its_data_agents_write_no_node_key_for_a_version_the_new_tree_lacks() {
    let consul = long_lived_consul();
    let mut fleet = Fleet::on(&consul, 2);
    fleet.start_all();
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    fleet.expect_state("v1", "ready");
    consul.restart();
    // The agents reconnect and register new sessions...
    fleet.wait("every agent registered with the new Consul", |f| {
        f.agents
            .iter()
            .all(|a| !f.consul.agent_sessions(&a.name).is_empty())
    });
    // ...and the empty tree stays empty: no node key, nothing cleaned (the
    // agents create the doorbell, announce (and remember) themselves and one
    // scouts: no versions).
    let prefix = format!("{}/", fleet.prefix);
    let doorbell = format!("{prefix}.changed");
    let scout = format!("{prefix}.scout");
    fleet.wait("both agents announced again", |f| {
        f.agents
            .iter()
            .all(|a| consul.get(&format!("{prefix}.agents/{}", a.name)).is_some())
    });
    holds_for(Duration::from_secs(3), "the empty tree", || {
        let mut tree = consul.tree(&prefix);
        tree.remove(&doorbell);
        tree.remove(&scout);
        // Announcements, what the agents remember of themselves, and the
        // scout's records of the versions that vanished (for `events`).
        tree.retain(|key, _| {
            !key.starts_with(&format!("{prefix}.agents/"))
                && !key.starts_with(&format!("{prefix}.known/"))
                && !key.starts_with(&format!("{prefix}.removed/"))
        });
        if !tree.is_empty() {
            return Some(format!("{tree:?}"));
        }
        fleet
            .agents
            .iter()
            .find(|a| a.version_dirs("api") != ["v1", "v2"])
            .map(|a| format!("{} has {:?}\n{}", a.name, a.version_dirs("api"), a.log()))
    });
    // Writing current alone rebuilds it (the repair rule).
    fleet.set_current("v2");
    fleet.expect_active("v2");
    let tree = consul.tree(&prefix);
    assert!(
        tree.keys().all(|k| !k.contains("/v1/")),
        "a node key for v1 was written into the new tree: {tree:?}"
    );
}

#[test]
fn after_a_snapshot_restore_nothing_in_the_restored_tree_is_cleaned_and_agents_know_their_old_sessions()
 {
    let consul = Consul::start();
    let mut fleet = Fleet::on(&consul, 2);
    fleet.start_all();
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    fleet.expect_state("v1", "ready");
    let snapshot = consul.snapshot();
    let restored_sessions: Vec<String> = fleet
        .agents
        .iter()
        .map(|a| fleet.session_of("v2", &a.name).unwrap())
        .collect();
    // Life goes on after the snapshot: the agents restart (new sessions),
    // and a version the snapshot lacks is deployed.
    for agent in &mut fleet.agents {
        agent.kill9();
        agent.start();
    }
    fleet.wait("new sessions", |f| {
        f.agents.iter().enumerate().all(|(i, a)| {
            f.session_of("v2", &a.name)
                .is_some_and(|s| s != restored_sessions[i])
        })
    });
    fleet.add_version("v3");
    fleet.expect_state("v3", "ready");

    consul.restore(&snapshot);
    // The restored tree has v1 and v2 (current), held by the sessions of
    // the agents' earlier runs. v3 is gone from it: it is cleaned.
    fleet.expect_gone("v3");
    fleet.wait("every key held by a live session of its own agent", |f| {
        f.agents.iter().enumerate().all(|(i, a)| {
            ["v1", "v2"].iter().all(|v| {
                f.session_of(v, &a.name)
                    .is_some_and(|s| s != restored_sessions[i])
            })
        })
    });
    fleet.expect_active("v2");
    fleet.expect_state("v1", "ready");
    for agent in &fleet.agents {
        assert_eq!(agent.version_dirs("api"), ["v1", "v2"], "{}", agent.name);
        let log = agent.hooks_log();
        assert!(
            !log.iter().any(|l| l == "clean v1" || l == "clean v2"),
            "{}: {log:?}",
            agent.name
        );
        assert!(
            !agent.log().contains("Is another agent named"),
            "{}",
            agent.log()
        );
    }
}

#[test]
fn a_lost_session_does_not_make_the_agent_retry_a_failed_deploy_by_itself() {
    let fleet = Fleet::start(1);
    let agent = &fleet.agents[0];
    agent.set_flag("fail-deploy", true);
    fleet.add_version("v1");
    fleet.expect_state("v1", "failed");
    let old = fleet.session_of("v1", "node1").unwrap();
    // The session expires (or the local Consul agent restarts): the key goes.
    fleet.consul.destroy_session(&old);
    fleet.wait("v1 failed again under a new session", |f| {
        f.session_of("v1", "node1").is_some_and(|s| s != old)
            && f.node_state("v1", "node1").as_deref() == Some("failed")
    });
    let deploys = agent
        .hooks_log()
        .iter()
        .filter(|l| l.starts_with("deploy v1"))
        .count();
    assert_eq!(deploys, 1, "retried without an operator: {}", agent.log());
    // An operator's retry still works.
    agent.set_flag("fail-deploy", false);
    fleet.consul.delete(&format!("{}/v1/node1", fleet.prefix));
    fleet.expect_state("v1", "ready");
}

#[test]
fn repair_never_resurrects_a_version_an_operator_removed_while_the_agent_saw_an_old_current() {
    let consul = Consul::shared();
    let proxy = Proxy::start(&consul.addr());
    // This agent learns of every change of current two seconds late.
    proxy.rule(
        Match::get("/current"),
        Action::DelayAnswer(Duration::from_secs(2)),
        0,
    );
    let mut fleet = Fleet::through(consul, &proxy.addr(), 1);
    fleet.start_all();
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v1");
    fleet.expect_active("v1");
    fleet.expect_state("v2", "ready");
    // In one transaction: current moves to v2 and v1 is removed. The agent
    // sees v1's folder key go while it still believes current is v1.
    let p = &fleet.prefix;
    let txn = serde_json::json!([
        {"KV": {"Verb": "set", "Key": format!("{p}/current"), "Value": "djI="}},
        {"KV": {"Verb": "delete", "Key": format!("{p}/v1/")}},
        // A ring in the same transaction, as a tool would that rings.
        {"KV": {"Verb": "set", "Key": format!("{p}/.changed"),
                "Value": support::base64("switched to v2 and removed v1")}},
    ]);
    consul.call("PUT", "txn", Some(txn.to_string().as_bytes()));
    fleet.expect_active("v2");
    fleet.expect_gone("v1");
    assert_eq!(
        consul.get(&format!("{p}/v1/")),
        None,
        "the removed version was re-created"
    );
}

#[test]
fn a_huge_or_hostile_current_is_logged_and_shown_bounded_and_escaped() {
    let fleet = Fleet::start(1);
    fleet.add_version("v1");
    fleet.expect_state("v1", "ready");
    let hostile = format!("\x1b[31m{}", "x".repeat(511 * 1024));
    fleet.set_current(&hostile);
    let agent = &fleet.agents[0];
    wait_for("the agent to ignore the invalid current", || {
        agent.log().contains("ignoring")
    });
    // One more change, so that the agent has surely logged all it will.
    fleet.add_version("v2");
    fleet.expect_state("v2", "ready");
    let log = agent.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2048, "a log line of {longest} bytes");
    assert!(!log.contains('\x1b'), "an escape reached the log");
    let status = fleet.depro(&["status"]);
    let text = status.ok();
    assert!(text.len() < 4096, "status printed {} bytes", text.len());
    assert!(!text.contains('\x1b'), "an escape reached the terminal");
    assert!(text.contains("not a valid version"), "{text}");
}

/// The pids controller of cgroup v1 (this machine kind has it): limits
/// how many threads and processes a group may have.
struct PidsLimit {
    dir: std::path::PathBuf,
}

impl PidsLimit {
    fn around(pid: i32) -> PidsLimit {
        let root = std::path::Path::new("/sys/fs/cgroup/pids");
        assert!(
            root.join("cgroup.procs").exists(),
            "this test needs the cgroup v1 pids controller at {} (and root)",
            root.display()
        );
        let dir = root.join(format!("depro-test-{}-{pid}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        PidsLimit { dir }
    }
    fn current(&self) -> usize {
        std::fs::read_to_string(self.dir.join("pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
    fn set(&self, max: &str) {
        std::fs::write(self.dir.join("pids.max"), max).unwrap();
    }
}

impl Drop for PidsLimit {
    fn drop(&mut self) {
        let parent = self.dir.parent().unwrap().join("cgroup.procs");
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(&parent, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_deployment_whose_watch_cannot_start_is_retried_not_left_stalled() {
    let consul = Consul::shared();
    let mut fleet = Fleet::new(1);
    fleet.start_all();
    fleet.add_version("v1");
    fleet.expect_state("v1", "ready");
    let agent = &mut fleet.agents[0];
    // No new thread (nor process) may start in the agent...
    let limit = PidsLimit::around(agent.pid());
    limit.set(&limit.current().to_string());
    // ...when a reload adds a deployment.
    let web = support::unique_prefix("web");
    agent
        .deployments
        .push(support::default_deployment("web", &agent.dir, &web));
    agent.write_config();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    consul.add_version(&web, "w1");
    wait_for("the failure to start to be logged", || {
        agent.log().contains("cannot start")
    });
    limit.set("max");
    let key = format!("{web}/w1/{}", agent.name);
    support::wait_for_within(
        support::PATIENCE,
        "web w1 ready once threads can start again",
        &mut || consul.get(&key).as_deref() == Some("ready"),
        || agent.log(),
    );
}

#[test]
fn a_prefix_holding_only_depro_s_own_keys_counts_as_empty_and_nothing_is_cleaned() {
    // The agents write the doorbell and their announcements themselves, so
    // a tree that lost everything else still holds them: it must read as
    // empty (nothing is cleaned), as a prefix with nothing at all does.
    let fleet = Fleet::start(1);
    fleet.add_version("v1");
    fleet.add_version("v2");
    fleet.set_current("v2");
    fleet.expect_active("v2");
    fleet.expect_state("v1", "ready");
    let prefix = format!("{}/", fleet.prefix);
    wait_for("the agent's announcement", || {
        fleet
            .consul
            .get(&format!("{prefix}.agents/node1"))
            .is_some()
    });
    for key in ["current", "v1/node1", "v2/node1", "v1/", "v2/"] {
        fleet.consul.delete(&format!("{prefix}{key}"));
    }
    fleet.consul.ring(&fleet.prefix);
    let agent = &fleet.agents[0];
    wait_for("the agent to see an empty prefix", || {
        agent.log().contains("nothing under")
    });
    holds_for(Duration::from_secs(2), "the versions on disk", || {
        (agent.version_dirs("api") != ["v1", "v2"]).then(|| {
            format!(
                "{:?} left on disk\n{}",
                agent.version_dirs("api"),
                agent.log()
            )
        })
    });
}
