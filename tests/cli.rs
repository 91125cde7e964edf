//! The operator commands against real agents and a real Consul.

mod support;

use std::process::Stdio;

use support::{Fleet, depro_command, finish};

const SEED_VERSION: &str = "585ecfabf5b41bae1db7bd566ce984d77568987d";

#[test]
fn the_seed_deploy_reaches_three_nodes_end_to_end() {
    let fleet = Fleet::start(3);
    let out = fleet.depro(&["deploy", SEED_VERSION, "-nodes=3"]);
    let stdout = out.ok();
    assert!(
        stdout.contains(&format!("{SEED_VERSION} is current under {}", fleet.prefix)),
        "{stdout}"
    );
    assert!(stdout.contains("active on 3/3 nodes"), "{stdout}");
    for node in ["node1", "node2", "node3"] {
        assert!(
            stdout.contains(&format!("{node}: busy")) || stdout.contains(&format!("{node}: ready")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("{node}: ready -> active")),
            "{stdout}"
        );
    }
    assert!(stdout.contains("3/3 ready"), "{stdout}");
    assert_eq!(fleet.current().as_deref(), Some(SEED_VERSION));
    // The command returns only once the rollout is confirmed: no waiting here.
    for agent in &fleet.agents {
        assert_eq!(agent.live("api").as_deref(), Some(SEED_VERSION));
        assert_eq!(
            fleet.node_state(SEED_VERSION, &agent.name).as_deref(),
            Some("active")
        );
    }
    // Deploying the current version again is a successful no-op.
    let again = fleet.depro(&["deploy", SEED_VERSION, "-nodes=3"]);
    assert!(again.ok().contains("was already current"), "{again:#?}");
}

#[test]
fn more_nodes_than_the_fleet_has_times_out_with_exit_3_and_current_unchanged() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    let out = fleet.depro(&["deploy", "v2", "-nodes=3", "-timeout=2s"]);
    out.fails(
        3,
        &[
            "timed out",
            "2 of the 3 nodes",
            "current unchanged (still v1)",
        ],
    );
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    for agent in &fleet.agents {
        assert_eq!(agent.live("api").as_deref(), Some("v1"));
    }
}

#[test]
fn a_timeout_with_enough_nodes_ready_names_the_node_still_busy_that_held_the_switch() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.agents[1].set_flag("block-deploy", true);
    let out = fleet.depro(&["deploy", "v2", "-nodes=1", "-timeout=2s"]);
    out.fails(
        3,
        &[
            "timed out waiting for v2",
            "1 node has it (1 needed), but node2 reported it and is still busy",
            "every node that reports a version must have it before current moves",
            "current unchanged (still v1)",
        ],
    );
    assert!(
        !out.stderr.contains("of the 1 nodes needed"),
        "{}",
        out.stderr
    );
    // Its progress counts the nodes that must have it: every one that
    // reported (issue 20: it said "1/1 ready" while it waited).
    assert!(
        out.stderr
            .contains("1/2 ready (1 needed, and every node that reported)")
            && !out.stderr.contains("1/1 ready"),
        "{}",
        out.stderr
    );
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    fleet.agents[1].set_flag("block-deploy", false);
    fleet.agents[1].set_flag("release", true);
}

#[test]
fn a_failing_deploy_hook_exits_2_naming_the_node_and_a_retry_after_the_fix_succeeds() {
    let fleet = Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    fleet.agents[2].set_flag("fail-deploy", true);
    let out = fleet.depro(&["deploy", "v2", "-nodes=3"]);
    out.fails(2, &["v2 failed on node3", "current unchanged (still v1)"]);
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    for agent in &fleet.agents {
        assert_eq!(agent.live("api").as_deref(), Some("v1"), "{}", agent.name);
    }
    fleet.agents[2].set_flag("fail-deploy", false);
    let retry = fleet.depro(&["deploy", "v2", "-nodes=3"]);
    assert!(
        retry
            .ok()
            .contains("node3: failed before; asked it to try again"),
        "{retry:#?}"
    );
    fleet.expect_active("v2");
}

#[test]
fn of_two_racing_deploys_exactly_one_wins_and_the_other_exits_5() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v0", "-nodes=2"]).ok();
    // Hold both deploys at step 2, so that both read `current` before either switches.
    for agent in &fleet.agents {
        agent.set_flag("block-deploy", true);
    }
    let spawn = |version: &str| {
        fleet
            .depro_command(&["deploy", version, "-nodes=2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn("va");
    let b = spawn("vb");
    // Both folder keys exist: both commands have read `current` already.
    fleet.wait("both versions created", |f| {
        ["va", "vb"]
            .iter()
            .all(|v| f.consul.get(&format!("{}/{v}/", f.prefix)).is_some())
    });
    for agent in &fleet.agents {
        agent.set_flag("release", true);
    }
    let (a, b) = (finish(a), finish(b));
    let codes = [a.code, b.code];
    assert!(
        codes.contains(&Some(0)) && codes.contains(&Some(5)),
        "{a:#?}\n{b:#?}"
    );
    let (winner, loser, loser_out) = if a.code == Some(0) {
        ("va", "vb", &b)
    } else {
        ("vb", "va", &a)
    };
    // The loser lost either while it waited ("is not current") or at its
    // own check-and-set, when both became ready at once ("is ready but
    // not current"): both say who won and that its version is not current.
    loser_out.fails(
        5,
        &[
            &format!("was changed to {winner} by "),
            &format!("; {loser} is "),
            "not current",
            // The hint is a command to paste as it is, -nodes included.
            &format!("`depro rollout {loser} -prefix={} -nodes=2`", fleet.prefix),
        ],
    );
    assert_eq!(fleet.current().as_deref(), Some(winner));
    fleet.expect_active(winner);
}

#[test]
fn rollback_and_rollout_move_current_and_every_node_follows() {
    let fleet = Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    fleet.depro(&["deploy", "v2", "-nodes=3"]).ok();
    let agree = |version: &str| {
        assert_eq!(fleet.current().as_deref(), Some(version));
        for agent in &fleet.agents {
            assert_eq!(
                fleet.node_state(version, &agent.name).as_deref(),
                Some("active")
            );
            assert_eq!(agent.live("api").as_deref(), Some(version));
        }
    };
    agree("v2");
    let back = fleet.depro(&["rollback", "-nodes=3"]);
    let text = back.ok();
    assert!(
        text.contains(&format!("rolling back {} from v2 to v1", fleet.prefix)),
        "{text}"
    );
    agree("v1");
    fleet.depro(&["rollout", "v2", "-nodes=3"]).ok();
    agree("v2");
    // Rolling back twice toggles: the version current before v2 is v1.
    fleet.depro(&["rollback", "-nodes=3"]).ok();
    agree("v1");
    fleet.depro(&["rollback", "-nodes=3", "-to=v2"]).ok();
    agree("v2");
}

#[test]
fn a_failed_rollout_is_reported_per_node_and_can_switch_current_back() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.agents[1].set_flag("fail-rollout-v2", true);
    let out = fleet.depro(&["deploy", "v2", "-nodes=2", "-rollback-on-failure"]);
    out.fails(
        2,
        &[
            "the rollout of v2 failed on node2",
            "current switched back to v1",
        ],
    );
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    fleet.expect_state("v1", "active");
    // The failure sticks until an operator retries (with deploy), so a
    // rollout refuses before switching.
    let out = fleet.depro(&["rollout", "v2", "-nodes=2"]);
    out.fails(2, &["v2 failed on node2", "current unchanged (still v1)"]);
    fleet.agents[1].set_flag("fail-rollout-v2", false);
    fleet.depro(&["deploy", "v2", "-nodes=2"]).ok();
    fleet.expect_active("v2");
}

#[test]
fn remove_refuses_the_current_version() {
    let fleet = Fleet::start(1);
    fleet.depro(&["deploy", "v1"]).ok();
    fleet
        .depro(&["remove", "v1"])
        .fails(2, &["v1 is current", "roll out another version first"]);
    assert!(fleet.consul.get(&format!("{}/v1/", fleet.prefix)).is_some());
}

#[test]
fn remove_wait_ends_with_no_directories_and_no_keys_on_any_node() {
    let fleet = Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    fleet.depro(&["deploy", "v2", "-nodes=3"]).ok();
    let out = fleet.depro(&["remove", "v1", "-wait"]);
    let text = out.ok();
    assert!(text.contains("purged from 3 nodes"), "{text}");
    // Immediately, with no polling: -wait returned only after the purge.
    let tree = fleet.consul.tree(&format!("{}/", fleet.prefix));
    assert!(tree.keys().all(|k| !k.contains("/v1/")), "{tree:?}");
    for agent in &fleet.agents {
        assert!(
            !agent.deployment_path("api").join("v1").exists(),
            "{}",
            agent.name
        );
    }
}

#[test]
fn prune_keeps_exactly_k_plus_nothing_else() {
    let fleet = Fleet::start(1);
    for v in ["v1", "v2", "v3", "v4", "v5"] {
        fleet.depro(&["deploy", v]).ok();
    }
    let out = fleet.depro(&["prune", "-keep=2"]);
    assert!(out.ok().contains("pruned v1, v2, v3"), "{out:#?}");
    let status = fleet.depro(&["status", "-json"]);
    let doc: serde_json::Value = serde_json::from_str(status.ok()).unwrap();
    let existing: Vec<&str> = doc["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["removing"] == false)
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(existing, ["v4", "v5"]);
    fleet.expect_gone("v1");
    // -keep on deploy does the same afterwards, never touching current or the previous one.
    fleet.depro(&["deploy", "v6", "-keep=1"]).ok();
    fleet.expect_gone("v4");
    assert!(
        fleet.consul.get(&format!("{}/v5/", fleet.prefix)).is_some(),
        "the previous version is kept"
    );
}

#[test]
fn status_shows_a_fleet_with_mixed_states_as_a_table_and_as_json() {
    let fleet = Fleet::start(3);
    fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
    fleet.agents[1].set_flag("fail-deploy", true);
    fleet.agents[2].set_flag("block-deploy", true);
    fleet.depro(&["deploy", "v2", "-no-rollout", "-nodes=1", "-timeout=1s"]);
    fleet.wait("mixed states", |f| {
        f.node_state("v2", "node1").as_deref() == Some("ready")
            && f.node_state("v2", "node2").as_deref() == Some("failed")
            && f.node_state("v2", "node3").as_deref() == Some("busy")
    });
    let table = fleet.depro(&["status"]);
    let text = table.ok();
    assert!(
        text.starts_with(&format!("{}: current v1\n", fleet.prefix)),
        "{text}"
    );
    let lines: Vec<&str> = text.lines().collect();
    let row = |first: &str| {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(first))
            .copied()
            .unwrap_or("")
    };
    let words = |line: &str| {
        line.split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(words(row("v1"))[..6], ["v1", "current", "3", "0", "0", "0"]);
    assert_eq!(words(row("v2"))[..5], ["v2", "0", "1", "1", "1"]);
    // Each node's agent (its depro version), then its state per version.
    let agent = env!("CARGO_PKG_VERSION");
    assert_eq!(words(row("node2")), ["node2", agent, "active", "failed"]);
    // A busy node says for how long.
    let node3 = words(row("node3"));
    assert_eq!(node3[..4], ["node3", agent, "active", "busy"]);
    assert!(node3.len() == 5 && node3[4].ends_with('s'), "{node3:?}");
    // Columns line up.
    let header = row("VERSION");
    assert_eq!(header.find("ACTIVE"), row("v1").find('3'));

    let json = fleet.depro(&["query", "-json"]);
    let doc: serde_json::Value = serde_json::from_str(json.ok()).unwrap();
    assert_eq!(doc["current"], "v1");
    assert_eq!(doc["versions"][1]["nodes"]["node2"], "failed");
    assert_eq!(doc["versions"][1]["counts"]["busy"], 1);
    assert_eq!(doc["versions"][0]["counts"]["active"], 3);
    let one = fleet.depro(&["status", "v2", "-json"]);
    let doc: serde_json::Value = serde_json::from_str(one.ok()).unwrap();
    assert_eq!(doc["versions"].as_array().unwrap().len(), 1);
    // A node whose agent is gone (session destroyed) is not listed.
    let mut fleet = fleet;
    fleet.agents[1].signal(nix::sys::signal::Signal::SIGTERM);
    fleet.agents[1].wait_exit();
    let doc: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    assert!(doc["versions"][0]["nodes"].get("node2").is_none(), "{doc}");
}

#[test]
fn bad_version_names_and_empty_prefixes_get_clear_errors() {
    let fleet = Fleet::start(1);
    fleet
        .depro(&["deploy", "../etc"])
        .fails(1, &["version \"../etc\"", "cannot start with"]);
    fleet.depro(&["deploy", "a/b"]).fails(1, &["'/'"]);
    fleet.depro(&["deploy", "current"]).fails(1, &["reserved"]);
    // An agent follows the prefix: status shows it (issue 20); a prefix
    // with neither agents nor versions is refused.
    fleet.wait("node1 announced", |f| {
        f.consul
            .get(&format!("{}/.agents/node1", f.prefix))
            .is_some()
    });
    assert!(
        fleet.depro(&["status"]).ok().contains("no version yet"),
        "status of a followed prefix"
    );
    let unused = format!("{}-unused", fleet.prefix);
    support::Output::of(
        depro_command(
            &fleet.consul.addr(),
            &["status", &format!("-prefix={unused}")],
        )
        .output()
        .unwrap(),
    )
    .fails(2, &["nothing under", &unused, "check -prefix"]);
    fleet.depro(&["rollback"]).fails(2, &["nothing under"]);
    fleet.depro(&["remove", "v1"]).fails(2, &["nothing under"]);
    fleet.depro(&["deploy", "v1"]).ok();
    fleet
        .depro(&["rollout", "v9"])
        .fails(2, &["v9 is not in the tree", "depro deploy v9"]);
    fleet
        .depro(&["remove", "v9"])
        .fails(2, &["v9 is not in the tree"]);
    fleet.depro(&["rollback"]).fails(2, &["no earlier version"]);
    let out = depro_command(&fleet.consul.addr(), &["status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-prefix is required"));
}

#[test]
fn an_unreachable_consul_exits_4_and_the_prefix_can_come_from_the_environment() {
    let port = support::free_port();
    let out = depro_command(&format!("127.0.0.1:{port}"), &["status"])
        .env("DEPRO_PREFIX", "api/version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("127.0.0.1:{port} is unreachable")),
        "{stderr}"
    );
    assert!(stderr.contains("CONSUL_HTTP_ADDR"), "{stderr}");
}

#[test]
fn no_rollout_stages_everywhere_and_rollout_switches_later() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    let out = fleet.depro(&["deploy", "v2", "-nodes=2", "-no-rollout"]);
    assert!(out.ok().contains("v2 is ready on 2 nodes"), "{out:#?}");
    assert_eq!(fleet.current().as_deref(), Some("v1"));
    fleet.expect_state("v2", "ready");
    fleet.depro(&["rollout", "v2", "-nodes=2"]).ok();
    fleet.expect_active("v2");
}

#[test]
fn on_a_terminal_the_count_updates_in_place() {
    let fleet = Fleet::start(2);
    // script(1) gives the command a pseudo-terminal and records what it printed.
    let command = format!(
        "{} deploy v1 -nodes=2 -prefix={} -server={}",
        support::depro_bin(),
        fleet.prefix,
        fleet.consul.addr()
    );
    let out = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .output()
        .expect("script(1) from util-linux is needed");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // The count is redrawn in place after the time since the start.
    let in_place = text
        .split("\r\x1b[K")
        .skip(1)
        .any(|drawn| drawn.trim_start().split_once("s 2/2 active").is_some());
    assert!(in_place, "no in-place count: {text:?}");
    // Node lines still get lines of their own.
    assert!(
        text.contains("node1: ready -> active\r\n") || text.contains("node1: ready -> active\n"),
        "{text:?}"
    );
    fleet.expect_active("v1");
}

#[test]
fn a_deploy_reads_current_and_its_version_never_the_whole_prefix() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    let proxy = support::proxy::Proxy::start(&fleet.consul.addr());
    fleet
        .depro_via(&proxy.addr(), &["deploy", "v2", "-nodes=2"])
        .output()
        .unwrap();
    fleet.expect_active("v2");
    let whole = format!("GET /v1/kv/{}/?", fleet.prefix);
    let log = proxy.log();
    assert!(
        !log.iter().any(|r| r.starts_with(&whole)),
        "read the whole prefix: {log:#?}"
    );
    // The switch read the version's key alone (no ?recurse).
    let key = format!("GET /v1/kv/{}/v2/?consistent", fleet.prefix);
    assert!(log.iter().any(|r| r == &key), "{log:#?}");
}

/// Issue 20: with neither `$USER` nor `$LOGNAME` (cron jobs, systemd
/// units, this test machine), every switch was "by unknown@host".
#[test]
fn without_user_or_logname_a_switch_is_by_the_uid_s_name() {
    let fleet = Fleet::start(1);
    let out = fleet
        .depro_command(&["deploy", "v1"])
        .env_remove("USER")
        .env_remove("LOGNAME")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let id = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let name = String::from_utf8(id.stdout).unwrap().trim().to_string();
    let folder = fleet.consul.get(&format!("{}/v1/", fleet.prefix)).unwrap();
    assert!(
        folder.contains(&format!("\"created_by\":\"{name}@")),
        "{folder}"
    );
    assert!(!folder.contains("unknown@"), "{folder}");
}

/// Issue 20: when the whole tree went while a deploy waited (Consul lost
/// its data, or someone deleted the prefix), the deploy said "current
/// unchanged (still v1)" from what it read at its start.
#[test]
fn a_deploy_whose_version_goes_with_current_says_what_it_saw_not_current_unchanged() {
    let fleet = Fleet::start(2);
    fleet.depro(&["deploy", "v1", "-nodes=2"]).ok();
    fleet.agents[1].set_flag("block-deploy", true);
    let deploy = support::spawn(fleet.depro_command(&["deploy", "v2", "-nodes=2", "-timeout=60s"]));
    fleet.wait("node2 busy with v2", |f| {
        f.node_state("v2", "node2").as_deref() == Some("busy")
    });
    fleet.consul.delete(&format!("{}/?recurse", fleet.prefix));
    let out = finish(deploy);
    out.fails(
        2,
        &[
            "v2 was removed from",
            "current is unset now (it was v1 when this command started: did Consul lose its data",
        ],
    );
    assert!(!out.stderr.contains("current unchanged"), "{}", out.stderr);
    fleet.agents[1].set_flag("block-deploy", false);
    fleet.agents[1].set_flag("release", true);
}

/// Issue 20: a prefix with a typo had `rollout` suggest a deploy, and the
/// deploy then waited its whole timeout for agents that follow another
/// prefix. Both now name the prefix the agents follow.
#[test]
fn a_misspelt_prefix_is_said_at_once_with_the_prefix_the_agents_follow() {
    let fleet = Fleet::start(1);
    fleet.depro(&["deploy", "v1"]).ok();
    let typo = fleet.prefix.replace("/version", "/versoin");
    let meant = format!("did you mean -prefix={}?", fleet.prefix);
    let rollout = support::Output::of(
        depro_command(
            &fleet.consul.addr(),
            &["rollout", "v1", &format!("-prefix={typo}")],
        )
        .output()
        .unwrap(),
    );
    rollout.fails(2, &["no agent follows that prefix", &meant]);
    let status = support::Output::of(
        depro_command(
            &fleet.consul.addr(),
            &["status", &format!("-prefix={typo}")],
        )
        .output()
        .unwrap(),
    );
    status.fails(2, &["nothing under", &meant]);
    let deploy = support::Output::of(
        depro_command(
            &fleet.consul.addr(),
            &["deploy", "v2", &format!("-prefix={typo}"), "-timeout=1s"],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(deploy.code, Some(3), "{deploy:#?}");
    let said = deploy
        .stderr
        .lines()
        .find(|l| l.contains(&format!("no agent follows {typo}")))
        .unwrap_or_else(|| panic!("{deploy:#?}"));
    assert!(said.contains(&meant), "{said}");
    assert!(said.starts_with("  0."), "said at once: {said}");
}

/// Issue 20: while Consul was away, a command printed "(Consul: …;
/// retrying)" at every attempt (every 0.4 s or so). Now once, then a line
/// every 10 s at most with the count of attempts.
#[test]
fn a_consul_outage_during_a_command_is_said_once_not_at_every_retry() {
    let fleet = Fleet::start(1);
    fleet.depro(&["deploy", "v1"]).ok();
    fleet.agents[0].set_flag("block-deploy", true);
    let proxy = support::proxy::Proxy::start(&fleet.consul.addr());
    let deploy = support::spawn(fleet.depro_via(&proxy.addr(), &["deploy", "v2", "-timeout=6s"]));
    fleet.wait("node1 busy with v2", |f| {
        f.node_state("v2", "node1").as_deref() == Some("busy")
    });
    proxy.cut();
    let out = finish(deploy);
    assert_ne!(out.code, Some(0), "{out:#?}");
    let retries = out.stderr.matches("(Consul: ").count();
    assert!(
        (1..=2).contains(&retries),
        "{retries} retry lines in 6 s: {}",
        out.stderr
    );
    fleet.agents[0].set_flag("block-deploy", false);
    fleet.agents[0].set_flag("release", true);
}

/// Issue 20: after a rollback from v3, `previous` was v3 again (rollback
/// would go back to it), and `prune -keep=1` removed v1, the last good
/// version, keeping one that failed everywhere.
#[test]
fn rollback_and_prune_know_good_versions_from_bad_ones() {
    let fleet = Fleet::start(2);
    for version in ["v1", "v2", "v3"] {
        fleet.depro(&["deploy", version, "-nodes=2"]).ok();
    }
    fleet.depro(&["rollback", "-nodes=2"]).ok();
    assert_eq!(fleet.current().as_deref(), Some("v2"));
    for agent in &fleet.agents {
        agent.set_flag("fail-deploy", true);
    }
    fleet
        .depro(&["deploy", "v4", "-nodes=2"])
        .fails(2, &["v4 failed"]);
    fleet.expect_state("v4", "failed");
    let json: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    assert_eq!(json["previous"], "v1", "not v3, rolled back from");
    assert!(
        fleet.depro(&["rollback", "-dry-run"]).ok().contains("v1"),
        "the dry run goes back to v1"
    );
    // v1 is the rollback target; v3 ran and counts; v4 failed and does not.
    let out = fleet.depro(&["prune", "-keep=1"]);
    assert!(out.ok().contains("nothing to prune"), "{out:#?}");
    let out = fleet.depro(&["prune", "-keep=1", "-failed"]);
    assert!(out.ok().contains("pruned v4 from"), "{out:#?}");
    for version in ["v1", "v2", "v3"] {
        assert!(
            fleet.node_state(version, "node1").is_some(),
            "{version} kept"
        );
    }
    for agent in &fleet.agents {
        agent.set_flag("fail-deploy", false);
    }
}

/// Issue 20: a switch can say why (`-message`), and history and status
/// show it.
#[test]
fn a_switch_s_message_is_in_history_and_status() {
    let fleet = Fleet::start(1);
    fleet.depro(&["deploy", "v1", "-message=first cut"]).ok();
    fleet
        .depro(&["deploy", "v2", "-message=fixes the login timeout"])
        .ok();
    fleet.depro(&["rollback", "-message=v2 leaks memory"]).ok();
    let history = fleet.depro(&["history"]).ok().to_string();
    let line = |version: &str, how: &str| {
        history
            .lines()
            .find(|l| l.contains(&format!(" {version} ")) && l.contains(how))
            .unwrap_or_else(|| panic!("{history}"))
            .to_string()
    };
    assert!(
        history.lines().next().unwrap().ends_with("MESSAGE"),
        "{history}"
    );
    assert!(
        line("v2", "deploy").ends_with("fixes the login timeout"),
        "{history}"
    );
    assert!(
        line("v1", "rollback").ends_with("v2 leaks memory"),
        "{history}"
    );
    let status = fleet.depro(&["status"]).ok().to_string();
    assert!(status.contains(": current v1: v2 leaks memory"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(fleet.depro(&["status", "-json"]).ok()).unwrap();
    assert_eq!(
        json["versions"][0]["current_message"], "v2 leaks memory",
        "{json}"
    );
    assert!(json["versions"][1]["current_message"].is_null(), "{json}");
    fleet
        .depro(&["deploy", "v3", "-message="])
        .fails(1, &["-message", "one line"]);
}

/// Issue 20: a long wait looked dead in a log: nothing was printed while
/// the count did not change. Off a terminal, it is printed again after 10
/// s of silence.
#[test]
fn a_long_wait_off_a_terminal_prints_a_heartbeat_every_ten_seconds() {
    let fleet = Fleet::start(1);
    fleet.depro(&["deploy", "v1"]).ok();
    fleet.agents[0].set_flag("block-deploy", true);
    let out = fleet.depro(&["deploy", "v2", "-timeout=16s"]);
    assert_eq!(out.code, Some(3), "{out:#?}");
    // (After its last line: `node1: in its deploy hook for 3s`, at 3 s.)
    let at = |line: &str| -> f64 { line.trim().split('s').next().unwrap().parse().unwrap() };
    let timed = |l: &&str| {
        let first = l.trim_start().split(' ').next().unwrap_or_default();
        first
            .strip_suffix('s')
            .is_some_and(|n| n.parse::<f64>().is_ok())
    };
    let lines: Vec<&str> = out.stderr.lines().filter(timed).collect();
    let beat = lines
        .iter()
        .position(|l| l.ends_with("0/1 ready (still waiting)"))
        .unwrap_or_else(|| panic!("no heartbeat: {}", out.stderr));
    assert!(beat > 0, "{}", out.stderr);
    let silence = at(lines[beat]) - at(lines[beat - 1]);
    assert!((10.0..12.5).contains(&silence), "{}", out.stderr);
    fleet.agents[0].set_flag("block-deploy", false);
    fleet.agents[0].set_flag("release", true);
}
